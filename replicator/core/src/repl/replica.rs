//! The [`Replica`] state machine: dispatch, timers, roles.

use std::collections::{BTreeMap, VecDeque};

use super::config::{Config, ConfigError};
use super::frame::Frame;
use super::peer::{Peer, PeerSet, PeerStatus, PeerSync, SyncProgress};
use super::state::{ConnState, DiskState, Role};
use super::sync::{seed_for, LoadedMeta, MetaTracker, SyncRole};
use super::write_path::{Apply, IoOwner, Request, WriteIndex};
use super::{Event, Input, IoId, OutdatedReason, Output, PeerId, Time};
use crate::meta::{Bitmap, MetaRecord, PeerSlot, SLOTS};

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
    /// The driver refused (e.g. the witness says this node missed writes).
    #[error("{0}")]
    Refused(String),
    /// A Primary cannot volunteer to discard its data.
    #[error("this node is Primary; demote it before discarding its data")]
    DiscardOnPrimary,
    /// A diskless client (R28) is promoted only while a connected peer is
    /// UpToDate: it has no data of its own.
    #[error("diskless client: no connected UpToDate peer to read and write through")]
    NoUpToDatePeer,
    /// Demotion waits until no frontend request is in flight.
    #[error("{0} frontend requests still in flight; retry when they completed")]
    RequestsInFlight(usize),
    /// Demotion waits until peers flushed the writes they acknowledged
    /// (R20: the activity log of a Secondary is empty); a flush is sent.
    #[error("peers are flushing writes they acknowledged; retry shortly")]
    PeersFlushing,
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
    /// `requests` and `applies` by state, so the write path looks only at
    /// those that can move.
    pub(crate) wx: WriteIndex,
    pub(crate) ios: BTreeMap<IoId, IoOwner>,
    /// Dual-primary conflicts detected (R9), for status.
    pub(crate) conflicts: u64,
    /// Inside [`Replica::begin_batch`] .. [`Replica::end_batch`].
    pub(crate) batching: bool,
    /// The metadata record as it is (or is about to be) on disk.
    pub(crate) meta: MetaRecord,
    /// The record copy the next update goes to.
    pub(crate) next_copy: u8,
    /// Record slot of each peer.
    pub(crate) slots: Vec<usize>,
    /// Dirty bitmap of each peer.
    pub(crate) bitmaps: Vec<Bitmap>,
    pub(crate) mt: MetaTracker,
    pub(crate) rng: u64,
    /// Changes on every start (see `HelloGens::instance`).
    pub(crate) instance: u64,
    /// Sync target: metadata version resync writes wait for (Inconsistent
    /// durable before the first one).
    pub(crate) target_wait: u64,
    /// Sync target: (source, version, bytes) — UpToDate once `version` is
    /// durable.
    pub(crate) uptodate_at: Option<(PeerId, u64, u64)>,
    /// Metadata version peer writes wait for: a generation adopted from a
    /// Primary is durable before anything sent after it is acknowledged.
    pub(crate) gen_wait: u64,
    /// Activity log: hot extent → (last use, metadata version that made it
    /// hot).
    pub(crate) al: BTreeMap<u64, (u64, u64)>,
    pub(crate) al_clock: u64,
    pub(crate) al_seq: u64,
    pub(crate) next_al_copy: u8,
    /// The log is rewritten only once this metadata version is durable.
    pub(crate) al_guard: u64,
    /// An extent left the log: the next log write waits for a local flush
    /// submitted after that (R20).
    pub(crate) al_flush_needed: bool,
    /// That local flush is in flight.
    pub(crate) al_flush_in_flight: bool,
    /// Detached disk and remote reads (R23).
    pub(crate) dt: super::detach::Detach,
    /// Volunteer as the target of a split-brain resolution (R24).
    pub(crate) discard_my_data: bool,
    /// Wall clock (ms since the Unix epoch) the driver last reported.
    pub(crate) wall_ms: u64,
    /// Wall clock when this node last became Primary (0: not since start).
    pub(crate) primary_since: u64,
    /// The driver granted this Primary the right to complete writes a peer
    /// did not get (R25; always true without `solo_needs_grant`).
    pub(crate) solo_granted: bool,
    /// Online growth in progress (R29).
    pub(crate) growth: Option<super::grow::Growth>,
}

/// Whether a Primary may complete writes (R25), from [`Replica::quorum`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quorum {
    /// Every peer is connected and receives every write (none is left
    /// behind).
    pub all_replicating: bool,
    /// The driver granted writing alone ([`Replica::grant_solo`]).
    pub solo_granted: bool,
    /// Frontend requests done locally but held back: some peer does not
    /// have them and writing alone is not granted.
    pub held: usize,
}

impl Replica {
    /// A replica of a new volume: its initial role and disk state, every
    /// peer in sync, no peer connected.
    ///
    /// A diskless client (`cfg.diskless`, R28) starts here too: Diskless,
    /// with no metadata (nothing is ever written for it).
    pub fn new(cfg: Config, now: Time) -> Result<Replica, ConfigError> {
        let disk = if cfg.diskless {
            DiskState::Diskless
        } else {
            cfg.initial_disk
        };
        let meta = LoadedMeta::fresh(cfg.bitmap_chunk, disk);
        Replica::with_meta(cfg, meta, now)
    }

    /// A replica resuming from the metadata the driver read from its disk.
    /// The own disk state comes from the record (`cfg.initial_disk` is
    /// ignored); peers are matched to record slots by name, and a peer
    /// without a slot gets a free one (its bitmap starts clear, in sync).
    pub fn with_meta(cfg: Config, loaded: LoadedMeta, now: Time) -> Result<Replica, ConfigError> {
        cfg.validate()?;
        let err = |field, why: String| Err(ConfigError { field, why });
        let mut record = loaded.record;
        if record.chunk != cfg.bitmap_chunk {
            return err(
                "bitmap_chunk",
                format!(
                    "{} does not match the volume's metadata ({} bytes per bit)",
                    cfg.bitmap_chunk, record.chunk
                ),
            );
        }
        if cfg.initial_role == Role::Primary && record.disk != DiskState::UpToDate {
            return err(
                "initial_role",
                format!(
                    "the local disk is {:?} (from its metadata); only an UpToDate disk may start Primary",
                    record.disk
                ),
            );
        }
        let mut mt = MetaTracker::default();
        let mut bitmaps_in = loaded.bitmaps;
        let mut slots = Vec::with_capacity(cfg.peers.len());
        let mut bitmaps = Vec::with_capacity(cfg.peers.len());
        let mut taken = [false; SLOTS];
        for name in &cfg.peers {
            if let Some(s) = record.slot_of(name) {
                taken[s] = true;
            }
        }
        for name in &cfg.peers {
            let s = match record.slot_of(name) {
                Some(s) => s,
                None => {
                    let Some(free) = (0..SLOTS).find(|s| !taken[*s]) else {
                        return err("peers", "no free metadata slot".into());
                    };
                    taken[free] = true;
                    record.peers[free] = PeerSlot {
                        name: name.clone(),
                        bitmap_gen: 0,
                        bitmap_alt: 0,
                    };
                    bitmaps_in[free] = None;
                    mt.touch(super::sync::MetaKey::Record);
                    free
                }
            };
            slots.push(s);
            let bm = bitmaps_in[s]
                .take()
                .filter(|b| b.chunk() == u64::from(cfg.bitmap_chunk))
                .unwrap_or_else(|| Bitmap::new(cfg.size, cfg.bitmap_chunk));
            bitmaps.push(bm);
        }
        let al_loaded = loaded.activity_log;
        let al_newest = loaded.newest_al_copy;
        let mut rng = seed_for(cfg.gen_seed, &cfg.node_name);
        let instance = super::sync::splitmix(&mut rng);
        let peers = cfg
            .peers
            .iter()
            .cloned()
            .map(|n| Peer::new(n, cfg.size, cfg.extent_size))
            .collect();
        let mut r = Replica {
            role: cfg.initial_role,
            disk: record.disk,
            next_copy: if loaded.newest_copy == 0 { 1 } else { 0 },
            meta: record,
            slots,
            bitmaps,
            mt,
            rng,
            instance,
            target_wait: 0,
            uptodate_at: None,
            gen_wait: 0,
            al: BTreeMap::new(),
            al_clock: 0,
            al_seq: al_loaded.seq,
            next_al_copy: if al_newest == 0 { 1 } else { 0 },
            al_guard: 0,
            al_flush_needed: false,
            al_flush_in_flight: false,
            discard_my_data: false,
            wall_ms: 0,
            primary_since: 0,
            solo_granted: !cfg.solo_needs_grant,
            growth: None,
            dt: Default::default(),
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
            wx: WriteIndex::default(),
            ios: BTreeMap::new(),
            conflicts: 0,
            batching: false,
        };
        r.recover_activity_log(&al_loaded.extents);
        Ok(r)
    }

    /// Feeds one input. Outputs are queued for [`Replica::poll_output`].
    pub fn handle(&mut self, now: Time, input: Input) {
        self.now = self.now.max(now);
        match input {
            Input::Frontend { req, op } => self.on_frontend(req, op),
            Input::LocalDone { io, result } => self.on_local_done_checked(io, result),
            Input::PeerConnected { peer } => self.on_peer_connected(peer),
            Input::PeerFrame { peer, frame } => self.on_peer_frame(peer, frame),
            Input::PeerDisconnected { peer } => {
                if self.peer(peer).is_some() {
                    self.peer_lost(peer);
                }
            }
            Input::ReadDone { io, result } => self.on_read_done_checked(io, result),
            Input::FrontendRead {
                req,
                offset,
                len,
                local_error,
            } => self.on_frontend_read(req, offset, len, local_error),
        }
        if !self.batching {
            self.progress();
        }
    }

    /// Starts a batch: until [`Replica::end_batch`], [`Replica::handle`]
    /// only records its input, and the write path runs once at the end for
    /// all of them. A driver that finds several inputs waiting (completions,
    /// frames, requests) hands them over in one batch instead of running the
    /// write path after each. The outcome is one the inputs could have had
    /// arriving one by one at the same instant; other calls (timeouts, role
    /// changes) run the write path as always.
    pub fn begin_batch(&mut self) {
        self.batching = true;
    }

    /// Ends a batch and runs the write path (see [`Replica::begin_batch`]).
    pub fn end_batch(&mut self) {
        self.batching = false;
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
            .chain(self.resync_timer())
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

    /// Becomes Primary. Refused unless the own disk is UpToDate (a diskless
    /// client, R28: unless a connected peer is UpToDate), and while a
    /// connected peer is Primary (with `allow_two_primaries`: while two
    /// nodes already are).
    pub fn promote(&mut self, now: Time) -> Result<(), RoleError> {
        self.now = self.now.max(now);
        if self.role == Role::Primary {
            return Ok(());
        }
        if self.cfg.diskless {
            let up = (0..self.peers.len()).any(|i| self.read_source(PeerId(i as u8)));
            if !up {
                return Err(RoleError::NoUpToDatePeer);
            }
        } else if self.disk != DiskState::UpToDate {
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
        self.restart_deferred_syncs();
        self.progress();
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
        // R20: a Secondary has no activity log, so every write a peer
        // acknowledged must be durable there first (flushed, or marked in
        // that peer's bitmap when it is gone).
        let unflushed = self.peers.iter().any(|p| {
            p.conn == ConnState::Connected
                && (p.unflushed.cur.count() > 0 || !p.unflushed.pending.is_empty())
        });
        if unflushed {
            self.internal_flush();
            self.progress();
            return Err(RoleError::PeersFlushing);
        }
        self.mark_lost_unflushed();
        self.set_role(Role::Secondary);
        self.clear_activity_log();
        self.progress();
        Ok(())
    }

    /// Volunteers (or stops volunteering) to be the sync target if a
    /// handshake finds a split brain: this node's changes since the split
    /// are discarded and overwritten by the peer's (R24). Refused on a
    /// Primary. Takes effect at the next handshake; cleared once a resync
    /// made this node UpToDate.
    pub fn set_discard_my_data(&mut self, on: bool) -> Result<(), RoleError> {
        if on && self.role == Role::Primary {
            return Err(RoleError::DiscardOnPrimary);
        }
        self.discard_my_data = on;
        Ok(())
    }

    /// Whether this node volunteers to discard its data in a split brain.
    pub fn discard_my_data(&self) -> bool {
        self.discard_my_data
    }

    /// The wall clock, in ms since the Unix epoch (the core reads no clock;
    /// the driver reports it before promoting). Used only to compare when
    /// two nodes became Primary (`discard-younger-primary`).
    pub fn set_wall_clock(&mut self, unix_ms: u64) {
        self.wall_ms = unix_ms;
    }

    /// Grants this node the right to complete writes that a peer does not
    /// get (R25): the witness agreed that this node writes alone, or the
    /// operator unfroze it. Held requests complete.
    pub fn grant_solo(&mut self, now: Time) {
        self.now = self.now.max(now);
        self.solo_granted = true;
        self.progress();
    }

    /// Takes the grant back (with `solo_needs_grant`; e.g. every peer is
    /// back in sync and the witness released it).
    pub fn revoke_solo(&mut self) {
        self.solo_granted = !self.cfg.solo_needs_grant;
    }

    /// Whether writes may complete, and how many are held back (R25).
    pub fn quorum(&self) -> Quorum {
        let held = if self.may_complete() {
            0
        } else {
            self.requests
                .values()
                .filter(|r| {
                    !r.completed && matches!(r.local, super::write_path::LocalState::Done(_))
                })
                .count()
        };
        Quorum {
            all_replicating: self.all_replicating(),
            solo_granted: self.solo_granted,
            held,
        }
    }

    /// Fails every held request (R25) with `errno` (the node lost quorum
    /// and is configured to fail I/O, or lost the arbitration).
    pub fn fail_held(&mut self, now: Time, errno: i32) {
        self.now = self.now.max(now);
        if self.may_complete() {
            return;
        }
        let held: Vec<u64> = self
            .requests
            .iter()
            .filter(|(_, r)| {
                !r.completed && matches!(r.local, super::write_path::LocalState::Done(_))
            })
            .map(|(s, _)| *s)
            .collect();
        for seq in held {
            let Some(r) = self.requests.get_mut(&seq) else {
                continue;
            };
            r.completed = true;
            let req = r.req;
            if !r.internal {
                self.out.push_back(Output::Complete {
                    req,
                    result: Err(errno),
                });
            }
            if r.peers_pending.is_empty() {
                self.remove_request(seq);
            }
        }
        self.progress();
    }

    pub(crate) fn all_replicating(&self) -> bool {
        self.peers
            .iter()
            .enumerate()
            .all(|(i, p)| p.replicating() || self.is_client_peer(PeerId(i as u8)))
    }

    /// Whether `peer` is a diskless client (R28): it holds no data, so it
    /// never misses a write.
    pub(crate) fn is_client_peer(&self, peer: PeerId) -> bool {
        self.peers
            .get(peer.0 as usize)
            .is_some_and(|p| self.cfg.diskless_peers.contains(&p.name))
    }

    /// R25: a request may complete if no peer is left behind, or writing
    /// alone is granted.
    pub(crate) fn may_complete(&self) -> bool {
        self.solo_granted || self.all_replicating()
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
        let out_of_sync = self
            .bitmap_bytes(peer)
            .saturating_add(unacked_bytes)
            .min(self.cfg.size);
        let outdated = self.holds_outdated(peer);
        let remaining = self.bitmap_bytes(peer);
        let sync = match &p.sync {
            PeerSync::None => None,
            PeerSync::Source(s) => Some(SyncProgress {
                role: SyncRole::Source,
                done_bytes: s.done,
                remaining_bytes: remaining,
                elapsed: self.now.since(s.started),
                compared_bytes: s.compared,
                identical_bytes: s.identical,
            }),
            PeerSync::SourceDone {
                done,
                compared,
                identical,
            } => Some(SyncProgress {
                role: SyncRole::Source,
                done_bytes: *done,
                remaining_bytes: 0,
                elapsed: std::time::Duration::ZERO,
                compared_bytes: *compared,
                identical_bytes: *identical,
            }),
            PeerSync::Target { received } => Some(SyncProgress {
                role: SyncRole::Target,
                done_bytes: *received,
                remaining_bytes: 0,
                elapsed: std::time::Duration::ZERO,
                compared_bytes: 0,
                identical_bytes: 0,
            }),
        };
        let disk = match p.disk {
            Some(d) if outdated => Some(d.min(DiskState::Outdated)),
            other => other.or(outdated.then_some(DiskState::Outdated)),
        };
        Some(PeerStatus {
            name: p.name.clone(),
            conn: p.conn,
            repl: p.repl_state(),
            role: p.role,
            disk,
            outdated,
            in_flight,
            out_of_sync_bytes: out_of_sync,
            sync,
            split_brain: p.split_brain,
        })
    }

    /// The current generation (see `docs/replication.md`).
    pub fn current_generation(&self) -> u64 {
        self.meta.current
    }

    /// The metadata record as this replica last changed it.
    pub fn meta_record(&self) -> &MetaRecord {
        &self.meta
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
            && self.mt.is_idle()
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
        if role == Role::Primary {
            self.primary_since = self.wall_ms;
        }
        self.event(Event::RoleChanged { role });
        self.broadcast_state();
    }

    pub(crate) fn set_disk(&mut self, disk: DiskState) {
        self.persist_disk(disk);
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
            peer_outdated: self.peer(peer).is_some() && self.holds_outdated(peer),
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

    /// Closes the connection from this side: Disconnect output + loss.
    pub(crate) fn disconnect(&mut self, peer: PeerId, reason: String) {
        self.out.push_back(Output::Disconnect { peer, reason });
        self.peer_lost(peer);
    }

    /// The connection is gone: requests stop waiting for its acks, and
    /// the writes it may not have (sent and not acknowledged) are marked in
    /// its bitmap; those acknowledged but not flushed there are remembered
    /// in case it restarted (R6).
    pub(crate) fn peer_lost(&mut self, peer: PeerId) {
        let i = peer.0 as usize;
        if self.peers[i].conn == ConnState::StandAlone {
            return;
        }
        self.peers[i].conn = ConnState::StandAlone;
        self.peers[i].epoch += 1;
        self.peers[i].hello_sent = None;
        self.peers[i].sync = PeerSync::None;
        self.peers[i].pending_gen = None;
        self.verify_peer_lost(peer);
        self.grow_peer_lost(peer);
        self.event(Event::PeerConnState {
            peer,
            state: ConnState::StandAlone,
        });
        let mut only = PeerSet::default();
        only.insert(peer);
        let unacked: Vec<(u64, Option<(u64, u64)>)> = self
            .requests
            .iter_mut()
            .filter_map(|(s, r)| r.peers_pending.remove(peer).then_some((*s, r.range)))
            .collect();
        for (seq, range) in unacked {
            if let Some(range) = range {
                let v = self.mark_missed(only, range, OutdatedReason::ConnectionLost);
                if let Some(r) = self.requests.get_mut(&seq) {
                    r.meta_wait = r.meta_wait.max(v);
                }
            }
        }
        let ext = u32::try_from(self.cfg.extent_size).unwrap_or(u32::MAX);
        let u = &mut self.peers[i].unflushed;
        let mut lost = std::mem::replace(&mut u.cur, Bitmap::new(self.cfg.size, ext));
        for (_, b) in u.pending.drain(..) {
            for (a, z) in b.runs() {
                lost.set_bits(a, z);
            }
        }
        if lost.count() > 0 {
            if let Some(prev) = self.peers[i].lost_unflushed.take() {
                for (a, z) in prev.runs() {
                    lost.set_bits(a, z);
                }
            }
            // Should the peer come back restarted, this node must be its
            // sync source: diverge now.
            self.diverge_from(only, OutdatedReason::ConnectionLost);
            self.peers[i].lost_unflushed = Some(lost);
        }
    }
}
