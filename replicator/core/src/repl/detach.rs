//! Local disk errors (R23 in `docs/replication.md`): an I/O error on the
//! local disk detaches it, and I/O continues through UpToDate peers.
//!
//! * Any local I/O error (a frontend write, TRIM, WRITE_ZEROES or flush, a
//!   peer operation being applied, a metadata write, a read) detaches the
//!   disk: the own disk state becomes Diskless (not persisted — the disk
//!   failed), [`Event::Detached`] is emitted, peers learn it through a
//!   `StateUpdate`, a running resync is stopped (its peers are
//!   disconnected), pending metadata changes are forgotten and nothing is
//!   written to or read from the disk again (`LocalIo` outputs stop; the
//!   operations fail inside the replica).
//! * A Primary draws a new generation when it detaches and shares it with
//!   its in-sync peers (again on every reconnect while detached): its own
//!   disk lacks the writes from then on, so when it comes back (a restart
//!   with a healthy disk) the peers' history makes it a full-sync target.
//! * Once detached, a frontend request completes OK if and only if a peer
//!   acknowledged it (the peer has the data; also for the request whose
//!   local I/O failed); with no UpToDate peer it fails with `EIO`. Protocol
//!   A waits for that ack too.
//! * Frontend reads ([`Input::FrontendRead`]) go to an UpToDate peer as
//!   `ReadRequest`; the peer reads its disk (`Output::Read`) and answers
//!   `ReadReply`. A reply with an error, or the loss of the peer, retries on
//!   another peer; with none left the read fails with `EIO`.
//! * A detached Secondary acknowledges every data frame with `EIO`, so its
//!   Primary marks the writes in its bitmap (`PeerIoError`), and it answers
//!   `ReadRequest`s with `EIO`. A detached node is never promoted (its disk
//!   is not UpToDate; only a diskless client is, R28) and the handshake with a Diskless side starts no
//!   resync either way.
//!
//! [`Input::FrontendRead`]: super::Input::FrontendRead

use std::collections::BTreeMap;

use bytes::Bytes;

use super::frame::{Frame, Hello, MAX_DATA};
use super::peer::{PeerSet, PeerSync};
use super::replica::Replica;
use super::state::{ConnState, DiskState, Role};
use super::write_path::IoOwner;
use super::{errno, Event, IoId, Output, PeerId, ReqId};

/// Detach state and reads served through peers.
#[derive(Debug, Default)]
pub(crate) struct Detach {
    /// Local I/Os issued while detached: they fail in
    /// [`Replica::detached_progress`] instead of reaching the disk.
    pub(crate) failed_ios: Vec<IoId>,
    /// Peers are yet to hear the detach (a StateUpdate goes out after the
    /// acks of the operations that failed, so they count as peer errors).
    announce: bool,
    /// Frontend reads sent to a peer, by ReadRequest id.
    reads: BTreeMap<u64, RemoteRead>,
    next_read: u64,
}

#[derive(Debug)]
struct RemoteRead {
    req: ReqId,
    offset: u64,
    len: u64,
    peer: PeerId,
    epoch: u64,
    /// Peers tried already.
    tried: PeerSet,
}

impl Replica {
    /// Whether the local disk is detached (Diskless).
    pub fn is_detached(&self) -> bool {
        self.disk == DiskState::Diskless
    }

    /// Detaches the local disk after an I/O error (`errno`). Idempotent.
    pub(crate) fn detach(&mut self, errno: i32) {
        if self.disk == DiskState::Diskless {
            return;
        }
        self.event(Event::Detached { errno });
        self.uptodate_at = None;
        self.mt.forget();
        self.disk = DiskState::Diskless;
        self.event(Event::DiskStateChanged {
            state: DiskState::Diskless,
        });
        self.dt.announce = true;
        // A resync needs a disk on both ends.
        for i in 0..self.peers.len() {
            let p = &self.peers[i];
            if p.conn != ConnState::StandAlone && !matches!(p.sync, PeerSync::None) {
                self.disconnect(
                    PeerId(i as u8),
                    "local disk detached after an I/O error: resync stopped".into(),
                );
            }
        }
        if self.role == Role::Primary {
            self.detached_generation();
        }
    }

    /// A Primary that detached starts a new generation, shared with its
    /// in-sync peers (in memory only here: the disk is gone).
    fn detached_generation(&mut self) {
        let old = self.meta.current;
        self.meta.history.rotate_right(1);
        self.meta.history[0] = old;
        self.meta.current = self.next_gen();
        let current = self.meta.current;
        self.event(Event::NewGeneration { current });
        for i in 0..self.peers.len() {
            if self.peers[i].replicating() {
                self.share_generation(PeerId(i as u8));
            }
        }
    }

    fn share_generation(&mut self, peer: PeerId) {
        let (current, history) = (self.meta.current, self.meta.history);
        let boundary = self.next_seq;
        self.peers[peer.0 as usize]
            .gen_unconfirmed
            .push_back((boundary, current));
        self.send(peer, Frame::Generation { current, history });
    }

    /// [`Replica::on_local_done`], detaching on an error first. A peer
    /// operation that finishes after the detach is acknowledged with an
    /// error even if it succeeded: the disk no longer counts.
    pub(crate) fn on_local_done_checked(&mut self, io: IoId, result: Result<(), i32>) {
        let Some(owner) = self.ios.get(&io) else {
            return; // Unknown or duplicate completion: a driver bug, ignored.
        };
        let apply = matches!(owner, IoOwner::Apply(_));
        if let Err(e) = result {
            self.detach(e);
        }
        let result = match result {
            Ok(()) if apply && self.disk == DiskState::Diskless => Err(errno::EIO),
            r => r,
        };
        self.on_local_done(io, result);
    }

    /// [`Replica::on_read_done`] for resync reads; frontend and peer reads
    /// here. A failed read detaches the disk.
    pub(crate) fn on_read_done_checked(&mut self, io: IoId, result: Result<Bytes, i32>) {
        match self.ios.get(&io).copied() {
            Some(IoOwner::FrontendRead { req, offset, len }) => {
                self.ios.remove(&io);
                match result {
                    Ok(data) if data.len() as u64 == len => {
                        self.out.push_back(Output::ReadComplete {
                            req,
                            result: Ok(data),
                        })
                    }
                    other => {
                        self.detach(other.err().unwrap_or(errno::EIO));
                        self.forward_read(req, offset, len, PeerSet::default());
                    }
                }
            }
            Some(IoOwner::PeerRead { peer, epoch, id }) => {
                self.ios.remove(&io);
                let (status, data) = match result {
                    Ok(d) if self.disk == DiskState::UpToDate => (0, d),
                    Ok(_) => (errno::EIO as u32, Bytes::new()),
                    Err(e) => {
                        self.detach(e);
                        (u32::try_from(e).unwrap_or(0).max(1), Bytes::new())
                    }
                };
                let p = &self.peers[peer.0 as usize];
                if p.epoch == epoch && p.conn == ConnState::Connected {
                    self.send(peer, Frame::ReadReply { id, status, data });
                }
            }
            Some(
                IoOwner::ResyncRead { .. }
                | IoOwner::VerifyRead { .. }
                | IoOwner::VerifyServe { .. },
            ) => {
                if let Err(e) = result {
                    self.detach(e);
                }
                self.on_read_done(io, result);
            }
            _ => {}
        }
    }

    /// `Err(errno)` unless a read is aligned, non-empty, within the volume
    /// and within the frame size limit.
    fn check_read(&self, offset: u64, len: u64) -> Result<(), i32> {
        let bs = u64::from(self.cfg.block_size);
        if len == 0 || len > MAX_DATA as u64 || offset % bs != 0 || len % bs != 0 {
            return Err(errno::EINVAL);
        }
        match offset.checked_add(len) {
            Some(end) if end <= self.cfg.size => Ok(()),
            _ => Err(errno::ENOSPC),
        }
    }

    /// A frontend read the driver did not serve itself.
    pub(crate) fn on_frontend_read(
        &mut self,
        req: ReqId,
        offset: u64,
        len: u64,
        local_error: Option<i32>,
    ) {
        if let Some(e) = local_error {
            self.detach(e);
        }
        if let Err(e) = self.check_read(offset, len) {
            self.out.push_back(Output::ReadComplete {
                req,
                result: Err(e),
            });
            return;
        }
        if self.disk != DiskState::Diskless {
            let io = IoId(self.next_io);
            self.next_io += 1;
            self.ios
                .insert(io, IoOwner::FrontendRead { req, offset, len });
            self.out.push_back(Output::Read { io, offset, len });
            return;
        }
        self.forward_read(req, offset, len, PeerSet::default());
    }

    /// Whether `peer` may serve reads: connected, UpToDate, no resync, and
    /// missing no write of this node.
    pub(crate) fn read_source(&self, peer: PeerId) -> bool {
        let p = &self.peers[peer.0 as usize];
        p.conn == ConnState::Connected
            && p.disk == Some(DiskState::UpToDate)
            && matches!(p.sync, PeerSync::None)
            && !self.holds_outdated(peer)
    }

    /// Sends the read to an UpToDate peer not tried yet, or fails it.
    fn forward_read(&mut self, req: ReqId, offset: u64, len: u64, tried: PeerSet) {
        let target = (0..self.peers.len())
            .map(|i| PeerId(i as u8))
            .find(|p| !tried.contains(*p) && self.read_source(*p));
        let Some(peer) = target else {
            self.out.push_back(Output::ReadComplete {
                req,
                result: Err(errno::EIO),
            });
            return;
        };
        self.dt.next_read += 1;
        let id = self.dt.next_read;
        let epoch = self.peers[peer.0 as usize].epoch;
        self.dt.reads.insert(
            id,
            RemoteRead {
                req,
                offset,
                len,
                peer,
                epoch,
                tried,
            },
        );
        self.send(peer, Frame::ReadRequest { id, offset, len });
    }

    /// A peer asks this node to read for it.
    pub(crate) fn on_read_request(&mut self, peer: PeerId, id: u64, offset: u64, len: u64) {
        if self.check_read(offset, len).is_err() {
            return self.violation(peer, "read request outside the volume or misaligned");
        }
        if self.disk != DiskState::UpToDate {
            let status = errno::EIO as u32;
            return self.send(
                peer,
                Frame::ReadReply {
                    id,
                    status,
                    data: Bytes::new(),
                },
            );
        }
        let epoch = self.peers[peer.0 as usize].epoch;
        let io = IoId(self.next_io);
        self.next_io += 1;
        self.ios.insert(io, IoOwner::PeerRead { peer, epoch, id });
        self.out.push_back(Output::Read { io, offset, len });
    }

    /// A peer answered a read.
    pub(crate) fn on_read_reply(&mut self, peer: PeerId, id: u64, status: u32, data: Bytes) {
        if self.dt.reads.get(&id).is_none_or(|r| r.peer != peer) {
            return self.violation(peer, "read reply for a read it was not asked");
        }
        let Some(mut r) = self.dt.reads.remove(&id) else {
            return;
        };
        if status == 0 && data.len() as u64 == r.len {
            self.out.push_back(Output::ReadComplete {
                req: r.req,
                result: Ok(data),
            });
            return;
        }
        r.tried.insert(peer);
        if status == 0 {
            self.violation(peer, "read reply of the wrong length");
        }
        self.forward_read(r.req, r.offset, r.len, r.tried);
    }

    /// The handshake with a Diskless peer, or while this node is Diskless:
    /// connected, no generation decision, no resync. A detached Primary
    /// (re)shares its generation with an UpToDate peer, which may have
    /// missed it.
    pub(crate) fn diskless_handshake(&mut self, peer: PeerId, h: &Hello) {
        let p = &mut self.peers[peer.0 as usize];
        p.split_brain = false;
        p.sync_deferred = false;
        p.gen_unconfirmed.clear();
        p.conn = ConnState::Connected;
        p.role = Some(h.role);
        p.disk = Some(h.disk);
        if h.disk == DiskState::Diskless {
            // Its disk failed: which generation that disk holds is unknown,
            // so a later divergence from it never takes a bitmap as enough.
            p.confirmed_gen = 0;
        }
        self.event(Event::PeerConnState {
            peer,
            state: ConnState::Connected,
        });
        self.event(Event::PeerStateChanged {
            peer,
            role: h.role,
            disk: h.disk,
        });
        let f = self.state_update_for(peer);
        self.send(peer, f);
        // A diskless client (R28) has no generation of its own to share.
        if self.role == Role::Primary
            && self.disk == DiskState::Diskless
            && !self.cfg.diskless
            && h.disk == DiskState::UpToDate
        {
            self.share_generation(peer);
        }
    }

    /// One round of detached housekeeping inside `progress`: local I/O
    /// issued while detached fails, metadata changes are dropped, reads
    /// whose peer was lost are retried elsewhere. Returns whether anything
    /// changed.
    pub(crate) fn detached_progress(&mut self) -> bool {
        let mut changed = false;
        if self.disk == DiskState::Diskless {
            changed |= self.mt.forget();
        }
        if std::mem::take(&mut self.dt.announce) {
            self.broadcast_state();
        }
        for io in std::mem::take(&mut self.dt.failed_ios) {
            changed = true;
            match self.ios.remove(&io) {
                Some(IoOwner::Request(seq)) => self.request_done(seq, Err(errno::EIO)),
                Some(IoOwner::Apply(n)) => self.apply_done(n, Err(errno::EIO)),
                Some(IoOwner::AlFlush) => self.al_flush_in_flight = false,
                _ => {}
            }
        }
        if !self.dt.reads.is_empty() {
            let lost: Vec<u64> = self
                .dt
                .reads
                .iter()
                .filter(|(_, r)| {
                    let p = &self.peers[r.peer.0 as usize];
                    p.epoch != r.epoch || p.conn != ConnState::Connected
                })
                .map(|(id, _)| *id)
                .collect();
            for id in lost {
                if let Some(mut r) = self.dt.reads.remove(&id) {
                    r.tried.insert(r.peer);
                    self.forward_read(r.req, r.offset, r.len, r.tried);
                }
            }
        }
        changed
    }
}
