//! The [`Replica`] state machine: dispatch, timers, roles.

use std::collections::{BTreeMap, VecDeque};

use super::config::{Config, ConfigError};
use super::frame::Frame;
use super::peer::{Peer, PeerStatus};
use super::state::{ConnState, DiskState, Role};
use super::write_path::{Apply, IoOwner, Request};
use super::{Event, Input, IoId, OutdatedReason, Output, PeerId, Time};

/// Why [`Replica::promote`] or [`Replica::demote`] refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RoleError {
    /// Only an UpToDate disk may become Primary.
    #[error("own disk is {0:?}, only an UpToDate disk may be promoted")]
    DiskNotUpToDate(DiskState),
    /// A connected peer is Primary and dual-primary is off.
    #[error("peer {0} is Primary and allow_two_primaries is off")]
    PeerIsPrimary(String),
    /// Dual-primary allows exactly two primaries.
    #[error("two primaries already (dual-primary allows at most two)")]
    TooManyPrimaries,
    /// Demotion waits until no frontend request is in flight.
    #[error("{0} frontend requests still in flight; retry when they completed")]
    RequestsInFlight(usize),
}

/// One node's replication state machine for one volume.
///
/// See the [module docs](super) for the driver loop.
#[derive(Debug)]
pub struct Replica {
    pub(crate) cfg: Config,
    pub(crate) role: Role,
    pub(crate) disk: DiskState,
    pub(crate) peers: Vec<Peer>,
    pub(crate) out: VecDeque<Output>,
    pub(crate) now: Time,
    pub(crate) next_io: u64,
    pub(crate) next_seq: u64,
    pub(crate) next_nonce: u64,
    pub(crate) next_apply: u64,
    /// Frontend requests by sequence number (issue order).
    pub(crate) requests: BTreeMap<u64, Request>,
    /// Peer operations being applied locally, by arrival order.
    pub(crate) applies: BTreeMap<u64, Apply>,
    pub(crate) ios: BTreeMap<IoId, IoOwner>,
    /// Dual-primary conflicts detected (R9), for status.
    pub(crate) conflicts: u64,
}

impl Replica {
    /// A replica in its initial role and disk state, no peer connected.
    pub fn new(cfg: Config, now: Time) -> Result<Replica, ConfigError> {
        cfg.validate()?;
        let peers = cfg.peers.iter().cloned().map(Peer::new).collect();
        Ok(Replica {
            role: cfg.initial_role,
            disk: cfg.initial_disk,
            cfg,
            peers,
            out: VecDeque::new(),
            now,
            next_io: 1,
            next_seq: 1,
            next_nonce: 1,
            next_apply: 1,
            requests: BTreeMap::new(),
            applies: BTreeMap::new(),
            ios: BTreeMap::new(),
            conflicts: 0,
        })
    }

    /// Feeds one input. Outputs are queued for [`Replica::poll_output`].
    pub fn handle(&mut self, now: Time, input: Input) {
        self.now = self.now.max(now);
        match input {
            Input::Frontend { req, op } => self.on_frontend(req, op),
            Input::LocalDone { io, result } => self.on_local_done(io, result),
            Input::PeerConnected { peer } => self.on_peer_connected(peer),
            Input::PeerFrame { peer, frame } => self.on_peer_frame(peer, frame),
            Input::PeerDisconnected { peer } => {
                if self.peer(peer).is_some() {
                    self.peer_lost(peer);
                }
            }
        }
        self.progress();
    }

    /// Next output, in the order the driver must act on them.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.out.pop_front()
    }

    /// When [`Replica::handle_timeout`] must next be called (keepalive or
    /// peer timeout), if ever.
    pub fn poll_timeout(&self) -> Option<Time> {
        self.peers
            .iter()
            .filter(|p| p.conn != ConnState::StandAlone)
            .map(|p| p.next_ping.min(p.last_rx + self.cfg.peer_timeout))
            .min()
    }

    /// Fires due timers: pings idle peers and declares silent ones lost.
    pub fn handle_timeout(&mut self, now: Time) {
        self.now = self.now.max(now);
        for i in 0..self.peers.len() {
            let id = PeerId(i as u8);
            let p = &self.peers[i];
            if p.conn == ConnState::StandAlone {
                continue;
            }
            if self.now >= p.last_rx + self.cfg.peer_timeout {
                self.event(Event::PeerTimeout { peer: id });
                self.disconnect(id, "peer timeout: no frame received".into());
            } else if self.now >= p.next_ping {
                let nonce = self.next_nonce;
                self.next_nonce += 1;
                self.peers[i].next_ping = self.now + self.cfg.keepalive_interval;
                self.send(id, Frame::Ping { nonce });
            }
        }
        self.progress();
    }

    /// Becomes Primary. Refused unless the own disk is UpToDate, and while a
    /// connected peer is Primary (with `allow_two_primaries`: while two
    /// nodes already are).
    pub fn promote(&mut self, now: Time) -> Result<(), RoleError> {
        self.now = self.now.max(now);
        if self.role == Role::Primary {
            return Ok(());
        }
        if self.disk != DiskState::UpToDate {
            return Err(RoleError::DiskNotUpToDate(self.disk));
        }
        let primaries: Vec<&Peer> = self
            .peers
            .iter()
            .filter(|p| p.conn == ConnState::Connected && p.role == Some(Role::Primary))
            .collect();
        if let Some(p) = primaries.first() {
            if !self.cfg.allow_two_primaries {
                return Err(RoleError::PeerIsPrimary(p.name.clone()));
            }
            if primaries.len() >= 2 {
                return Err(RoleError::TooManyPrimaries);
            }
        }
        self.set_role(Role::Primary);
        Ok(())
    }

    /// Becomes Secondary. Refused while frontend requests are in flight (the
    /// caller stops the frontend, waits for completions and retries).
    pub fn demote(&mut self, now: Time) -> Result<(), RoleError> {
        self.now = self.now.max(now);
        if self.role == Role::Secondary {
            return Ok(());
        }
        if !self.requests.is_empty() {
            return Err(RoleError::RequestsInFlight(self.requests.len()));
        }
        self.set_role(Role::Secondary);
        Ok(())
    }

    /// Own role.
    pub fn role(&self) -> Role {
        self.role
    }

    /// Own disk state.
    pub fn disk_state(&self) -> DiskState {
        self.disk
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// What this node knows about a peer (`None` for an unknown id),
    /// including the requests it has not acknowledged yet and the bytes it
    /// is out of sync by (see [`PeerStatus::out_of_sync_bytes`]).
    pub fn peer_status(&self, peer: PeerId) -> Option<PeerStatus> {
        let p = self.peer(peer)?;
        let mut in_flight = 0usize;
        let mut unacked_bytes = 0u64;
        for r in self
            .requests
            .values()
            .filter(|r| r.peers_pending.contains(peer))
        {
            in_flight += 1;
            if let Some((start, end)) = r.range {
                unacked_bytes = unacked_bytes.saturating_add(end.saturating_sub(start));
            }
        }
        // R7 keeps overlapping requests from being in flight together, so
        // the sum counts no byte twice; the cap is for safety only.
        let out_of_sync = if p.outdated {
            self.cfg.size
        } else {
            unacked_bytes.min(self.cfg.size)
        };
        Some(PeerStatus::new(p, in_flight, out_of_sync))
    }

    /// Dual-primary concurrent-write conflicts detected since start (each
    /// also reported as [`Event::ConcurrentWriteConflict`], R9).
    pub fn concurrent_write_conflicts(&self) -> u64 {
        self.conflicts
    }

    /// Frontend requests not yet completed or still awaiting peer acks.
    pub fn requests_in_flight(&self) -> usize {
        self.requests.len()
    }

    /// Whether nothing is pending: no request, no peer operation being
    /// applied, no local I/O outstanding, no output queued.
    pub fn is_idle(&self) -> bool {
        self.requests.is_empty()
            && self.applies.is_empty()
            && self.ios.is_empty()
            && self.out.is_empty()
    }

    // ---- helpers shared by the other files ----

    pub(crate) fn peer(&self, id: PeerId) -> Option<&Peer> {
        self.peers.get(id.0 as usize)
    }

    pub(crate) fn event(&mut self, e: Event) {
        self.out.push_back(Output::Event(e));
    }

    pub(crate) fn send(&mut self, peer: PeerId, frame: Frame) {
        self.out.push_back(Output::Send { peer, frame });
    }

    pub(crate) fn set_role(&mut self, role: Role) {
        self.role = role;
        self.event(Event::RoleChanged { role });
        self.broadcast_state();
    }

    pub(crate) fn set_disk(&mut self, disk: DiskState) {
        if self.disk != disk {
            self.disk = disk;
            self.event(Event::DiskStateChanged { state: disk });
            self.broadcast_state();
        }
    }

    pub(crate) fn state_update_for(&self, peer: PeerId) -> Frame {
        Frame::StateUpdate {
            role: self.role,
            disk: self.disk,
            peer_outdated: self.peer(peer).is_some_and(|p| p.outdated),
        }
    }

    /// Sends own role and disk state to every connected peer.
    pub(crate) fn broadcast_state(&mut self) {
        for i in 0..self.peers.len() {
            let id = PeerId(i as u8);
            if self.peers[i].conn == ConnState::Connected {
                let f = self.state_update_for(id);
                self.send(id, f);
            }
        }
    }

    /// Holds a peer Outdated (sticky), telling it if connected.
    pub(crate) fn mark_outdated(&mut self, peer: PeerId, reason: OutdatedReason) {
        let i = peer.0 as usize;
        if self.peers[i].outdated {
            return;
        }
        self.peers[i].outdated = true;
        self.event(Event::PeerOutdated { peer, reason });
        if self.peers[i].conn == ConnState::Connected {
            let f = self.state_update_for(peer);
            self.send(peer, f);
        }
    }

    /// Closes the connection from this side: Disconnect output + loss.
    pub(crate) fn disconnect(&mut self, peer: PeerId, reason: String) {
        self.out.push_back(Output::Disconnect { peer, reason });
        self.peer_lost(peer);
    }

    /// The connection is gone: waits for its acks end, a Primary holds the
    /// peer Outdated (it may have missed or lost writes).
    pub(crate) fn peer_lost(&mut self, peer: PeerId) {
        let i = peer.0 as usize;
        if self.peers[i].conn == ConnState::StandAlone {
            return;
        }
        self.peers[i].conn = ConnState::StandAlone;
        self.peers[i].epoch += 1;
        self.event(Event::PeerConnState {
            peer,
            state: ConnState::StandAlone,
        });
        for r in self.requests.values_mut() {
            r.peers_pending.remove(peer);
        }
        if self.role == Role::Primary {
            self.mark_outdated(peer, OutdatedReason::ConnectionLost);
        }
    }
}
