//! The write path: frontend requests on a Primary, peer operations on any
//! node, ordering of overlapping writes, completion and acks.
//!
//! Everything converges in [`Replica::progress`], which repeatedly submits
//! what is no longer blocked and completes what is finished until nothing
//! changes. The rules it implements are numbered in `docs/replication.md`.

use std::collections::BTreeSet;

use super::frame::{Frame, MAX_DATA};
use super::peer::{PeerSet, PeerSync};
use super::replica::Replica;
use super::state::{ConnState, DiskState, Protocol, Role};
use super::sync::MetaKey;
use super::{errno, Event, IoId, Op, OutdatedReason, Output, PeerId, ReqId};

/// Progress of the local part of an operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LocalState {
    /// Waiting behind an overlapping operation.
    NotSubmitted,
    /// `LocalIo` emitted, `LocalDone` not yet received.
    Pending,
    /// Finished with this result.
    Done(Result<(), i32>),
}

/// A frontend request on a Primary, alive until it is done locally and on
/// every peer it was sent to (even if already completed, protocol A).
#[derive(Debug)]
pub(crate) struct Request {
    pub(crate) req: ReqId,
    pub(crate) op: Op,
    pub(crate) range: Option<(u64, u64)>,
    pub(crate) local: LocalState,
    /// Dual-primary: write the data again once the local I/O is done (R9).
    pub(crate) reapply: bool,
    /// Dual-primary: conflicting peer writes still being applied that will
    /// ask for a re-apply; the request neither completes nor retires before.
    pub(crate) pins: u32,
    /// Peers whose ack is awaited.
    pub(crate) peers_pending: PeerSet,
    /// `Complete` already emitted.
    pub(crate) completed: bool,
    /// Metadata version (bitmap bits, generation) that must be durable
    /// before the request is submitted or completed.
    pub(crate) meta_wait: u64,
    /// Its extents are in the activity log (R20).
    pub(crate) al_admitted: bool,
    /// A peer acknowledged it without error (R23: the result once the
    /// local disk is detached).
    pub(crate) peer_ok: bool,
    /// Peers that acknowledged it without error (a diskless client
    /// completes a request only once every peer did, R28).
    pub(crate) acked_ok: PeerSet,
    /// Issued by the replica itself (a flush the activity log waits for,
    /// R20): completes without a `Complete` output.
    pub(crate) internal: bool,
}

/// What a peer operation is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ApplyKind {
    /// A replicated write, trim, write-zeroes or flush: answered with `Ack`.
    Data,
    /// Resync data: answered with `ResyncAck`.
    Resync,
    /// The end of a resync: flush, then adopt the source's generations.
    SyncDone {
        current: u64,
        history: crate::meta::History,
    },
}

/// A peer's data frame or flush being applied locally.
#[derive(Debug)]
pub(crate) struct Apply {
    pub(crate) peer: PeerId,
    pub(crate) epoch: u64,
    pub(crate) id: u64,
    pub(crate) op: Op,
    pub(crate) range: Option<(u64, u64)>,
    pub(crate) local: LocalState,
    /// Dual-primary: local requests whose local I/O must finish first.
    pub(crate) wait_for: Vec<u64>,
    /// Dual-primary: local requests to re-apply after this one (R9).
    pub(crate) reapply_after: Vec<u64>,
    pub(crate) reapply_marked: bool,
    pub(crate) kind: ApplyKind,
    /// Metadata version that must be durable before the local I/O.
    pub(crate) meta_wait: u64,
}

/// Who waits for a local I/O.
#[derive(Debug, Clone, Copy)]
pub(crate) enum IoOwner {
    Request(u64),
    Apply(u64),
    Meta(MetaKey),
    /// The local flush an activity-log write that drops extents waits for.
    AlFlush,
    ResyncRead {
        peer: PeerId,
        epoch: u64,
    },
    /// Online verify: this node's own data (R22).
    VerifyRead {
        peer: PeerId,
        epoch: u64,
    },
    /// Online verify (R22) or a checksum-based resync (R26, `resync`):
    /// data whose digests the peer asked for.
    VerifyServe {
        peer: PeerId,
        epoch: u64,
        id: u64,
        len: u64,
        resync: bool,
    },
    /// A frontend read served locally (R23).
    FrontendRead {
        req: ReqId,
        offset: u64,
        len: u64,
    },
    /// A peer's ReadRequest (R23).
    PeerRead {
        peer: PeerId,
        epoch: u64,
        id: u64,
    },
}

/// Which requests and peer operations are in which state, so that
/// [`Replica::progress`] looks at the few that can move instead of scanning
/// every one in flight on every event.
///
/// Kept in step wherever a request or peer operation is added, changes
/// `local` or `reapply`, or is removed. An entry whose operation has moved
/// on (or is gone) is skipped and dropped when it is used, so a stale entry
/// costs a lookup, never a wrong decision; only a missing entry could stall
/// an operation, and every insertion point adds one.
#[derive(Debug, Default)]
pub(crate) struct WriteIndex {
    /// Requests with `local == NotSubmitted`.
    pub(crate) req_waiting: BTreeSet<u64>,
    /// Requests with `local == Done(_)`.
    pub(crate) req_done: BTreeSet<u64>,
    /// Requests with `reapply` set (dual-primary, R9).
    pub(crate) req_reapply: BTreeSet<u64>,
    /// Peer operations with `local == NotSubmitted`.
    pub(crate) apply_waiting: BTreeSet<u64>,
    /// Peer operations with `local == Done(_)`.
    pub(crate) apply_done: BTreeSet<u64>,
    /// Reused for snapshots of the sets above.
    scratch: Vec<u64>,
}

impl WriteIndex {
    /// A snapshot of `set` in ascending order, in the reusable buffer
    /// (hand it back with [`WriteIndex::give_back`]).
    fn snapshot(set: &BTreeSet<u64>, scratch: &mut Vec<u64>) -> Vec<u64> {
        let mut v = std::mem::take(scratch);
        v.clear();
        v.extend(set.iter().copied());
        v
    }

    fn give_back(&mut self, v: Vec<u64>) {
        if v.capacity() > self.scratch.capacity() {
            self.scratch = v;
        }
    }
}

fn overlaps(a: Option<(u64, u64)>, b: Option<(u64, u64)>) -> bool {
    match (a, b) {
        (Some((s1, e1)), Some((s2, e2))) => s1 < e2 && s2 < e1,
        _ => false,
    }
}

fn frame_for(op: &Op, id: u64) -> Frame {
    match op {
        Op::Write { offset, data, fua } => Frame::Write {
            id,
            offset: *offset,
            fua: *fua,
            data: data.clone(),
        },
        Op::Flush => Frame::Flush { id },
        Op::Trim { offset, len, fua } => Frame::Trim {
            id,
            offset: *offset,
            len: *len,
            fua: *fua,
        },
        Op::WriteZeroes {
            offset,
            len,
            no_hole,
            fua,
        } => Frame::WriteZeroes {
            id,
            offset: *offset,
            len: *len,
            no_hole: *no_hole,
            fua: *fua,
        },
    }
}

impl Replica {
    /// `Err(errno)` unless the operation is aligned, non-empty, within the
    /// volume and within the frame size limit.
    fn check_op(&self, op: &Op) -> Result<(), i32> {
        let bs = u64::from(self.cfg.block_size);
        let (offset, len) = match op {
            Op::Flush => return Ok(()),
            Op::Write { offset, data, .. } => {
                if data.len() > MAX_DATA {
                    return Err(errno::EINVAL);
                }
                (*offset, data.len() as u64)
            }
            Op::Trim { offset, len, .. } | Op::WriteZeroes { offset, len, .. } => (*offset, *len),
        };
        if len == 0 || offset % bs != 0 || len % bs != 0 {
            return Err(errno::EINVAL);
        }
        match offset.checked_add(len) {
            Some(end) if end <= self.cfg.size => Ok(()),
            _ => Err(errno::ENOSPC),
        }
    }

    pub(crate) fn new_io(&mut self, owner: IoOwner, op: Op) {
        let io = IoId(self.next_io);
        self.next_io += 1;
        self.ios.insert(io, owner);
        if self.disk == DiskState::Diskless {
            // R23: nothing goes to a detached disk; it fails in progress().
            self.dt.failed_ios.push(io);
            return;
        }
        self.out.push_back(Output::LocalIo { io, op });
    }

    pub(crate) fn on_frontend(&mut self, req: ReqId, op: Op) {
        if self.role != Role::Primary {
            self.out.push_back(Output::Complete {
                req,
                result: Err(errno::EPERM),
            });
            return;
        }
        if let Err(e) = self.check_op(&op) {
            self.out.push_back(Output::Complete {
                req,
                result: Err(e),
            });
            return;
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        let range = op.range();
        self.verify_disturb(range);
        self.requests.insert(
            seq,
            Request {
                req,
                op,
                range,
                local: LocalState::NotSubmitted,
                reapply: false,
                pins: 0,
                peers_pending: PeerSet::default(),
                completed: false,
                meta_wait: 0,
                al_admitted: false,
                peer_ok: false,
                acked_ok: PeerSet::default(),
                internal: false,
            },
        );
        self.wx.req_waiting.insert(seq);
    }

    /// Starts a flush nobody waits for, so peers make the writes they
    /// acknowledged durable and the activity log can let their extents go
    /// (R20). At most one at a time.
    pub(crate) fn internal_flush(&mut self) {
        if self.role != Role::Primary || self.requests.values().any(|r| r.internal) {
            return;
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.requests.insert(
            seq,
            Request {
                req: ReqId(u64::MAX),
                op: Op::Flush,
                range: None,
                local: LocalState::NotSubmitted,
                reapply: false,
                pins: 0,
                peers_pending: PeerSet::default(),
                completed: false,
                meta_wait: 0,
                al_admitted: false,
                peer_ok: false,
                acked_ok: PeerSet::default(),
                internal: true,
            },
        );
        self.wx.req_waiting.insert(seq);
    }

    pub(crate) fn on_local_done(&mut self, io: IoId, result: Result<(), i32>) {
        let Some(owner) = self.ios.remove(&io) else {
            return; // Unknown or duplicate completion: a driver bug, ignored.
        };
        if let Err(errno) = result {
            self.event(Event::LocalIoError { errno });
        }
        match owner {
            IoOwner::Request(seq) => self.request_done(seq, result),
            IoOwner::Apply(n) => self.apply_done(n, result),
            IoOwner::Meta(key) => self.on_meta_done(key, result),
            // An error detached the disk (on_local_done_checked): the log
            // no longer matters. Either way this flush is over.
            IoOwner::AlFlush => self.al_flush_in_flight = false,
            IoOwner::ResyncRead { .. }
            | IoOwner::VerifyRead { .. }
            | IoOwner::VerifyServe { .. }
            | IoOwner::FrontendRead { .. }
            | IoOwner::PeerRead { .. } => {
                // A read completes with ReadDone; a LocalDone for it is a
                // driver bug. Put it back so ReadDone still finds it.
                self.ios.insert(io, owner);
            }
        }
    }

    pub(crate) fn on_ack(&mut self, peer: PeerId, id: u64, status: u32) {
        let Some(r) = self.requests.get_mut(&id) else {
            return self.violation(peer, "ack for a frame it was not sent");
        };
        if !r.peers_pending.remove(peer) {
            return self.violation(peer, "ack for a frame it was not sent");
        }
        let (range, flush) = (r.range, r.op == Op::Flush);
        if flush {
            self.peers[peer.0 as usize]
                .unflushed
                .pending
                .retain(|(f, _)| *f != id);
        }
        if status != 0 {
            // R12: the peer lacks this write; resync it after reconnecting.
            if let Some(range) = range {
                let mut only = PeerSet::default();
                only.insert(peer);
                let v = self.mark_missed(only, range, OutdatedReason::PeerIoError);
                if let Some(r) = self.requests.get_mut(&id) {
                    r.meta_wait = r.meta_wait.max(v);
                }
            }
            return self.disconnect(
                peer,
                format!("peer failed to apply a write (errno {status})"),
            );
        }
        if let Some(r) = self.requests.get_mut(&id) {
            r.peer_ok = true;
            r.acked_ok.insert(peer);
        }
        if let Some(range) = range {
            self.clear_synced_by_write(peer, range);
        }
        // An ack of a frame sent after a Generation confirms the peer holds
        // it durably.
        let p = &mut self.peers[peer.0 as usize];
        while p.gen_unconfirmed.front().is_some_and(|(b, _)| *b <= id) {
            if let Some((_, g)) = p.gen_unconfirmed.pop_front() {
                p.confirmed_gen = g;
            }
        }
    }

    /// Sync target: resync data and the end of the resync.
    pub(crate) fn on_resync_frame(&mut self, peer: PeerId, frame: Frame) {
        if !matches!(self.peers[peer.0 as usize].sync, PeerSync::Target { .. }) {
            return self.violation(peer, "resync frame while not a sync target");
        }
        let (id, op, kind) = match frame {
            Frame::ResyncData { id, offset, data } => (
                id,
                Op::Write {
                    offset,
                    data,
                    fua: true,
                },
                ApplyKind::Resync,
            ),
            Frame::ResyncZeroes { id, offset, len } => (
                id,
                Op::WriteZeroes {
                    offset,
                    len,
                    no_hole: false,
                    fua: true,
                },
                ApplyKind::Resync,
            ),
            Frame::SyncDone { current, history } => {
                (0, Op::Flush, ApplyKind::SyncDone { current, history })
            }
            _ => return,
        };
        if self.check_op(&op).is_err() {
            return self.violation(peer, "resync frame outside the volume or misaligned");
        }
        let n = self.next_apply;
        self.next_apply += 1;
        let epoch = self.peers[peer.0 as usize].epoch;
        let range = op.range();
        self.verify_disturb(range);
        self.applies.insert(
            n,
            Apply {
                peer,
                epoch,
                id,
                op,
                range,
                local: LocalState::NotSubmitted,
                wait_for: Vec::new(),
                reapply_after: Vec::new(),
                reapply_marked: false,
                kind,
                meta_wait: self.target_wait,
            },
        );
        self.wx.apply_waiting.insert(n);
    }

    pub(crate) fn on_peer_data(&mut self, peer: PeerId, frame: Frame) {
        if self.peers[peer.0 as usize].role != Some(Role::Primary) {
            return self.violation(peer, "data frame from a peer that is not Primary");
        }
        let (id, op) = match frame {
            Frame::Write {
                id,
                offset,
                fua,
                data,
            } => (id, Op::Write { offset, data, fua }),
            Frame::Trim {
                id,
                offset,
                len,
                fua,
            } => (id, Op::Trim { offset, len, fua }),
            Frame::WriteZeroes {
                id,
                offset,
                len,
                no_hole,
                fua,
            } => (
                id,
                Op::WriteZeroes {
                    offset,
                    len,
                    no_hole,
                    fua,
                },
            ),
            Frame::Flush { id } => (id, Op::Flush),
            _ => return,
        };
        if self.check_op(&op).is_err() {
            return self.violation(peer, "data frame outside the volume or misaligned");
        }
        let range = op.range();
        self.verify_disturb(range);
        // Local writes already submitted that overlap: the peer operation is
        // applied after their local I/O, so the local disk sees one order.
        let wait_for: Vec<u64> = self
            .requests
            .iter()
            .filter(|(_, r)| r.local != LocalState::NotSubmitted && overlaps(r.range, range))
            .map(|(s, _)| *s)
            .collect();
        // Dual-primary (R9): it is a conflict only if the peer has not acked
        // the local write yet, i.e. it wrote before applying ours. If it had
        // acked, it applied ours first and the natural order already agrees.
        let conflicts: Vec<u64> = wait_for
            .iter()
            .copied()
            .filter(|s| self.requests[s].peers_pending.contains(peer))
            .collect();
        let mut reapply_after = Vec::new();
        if !conflicts.is_empty() {
            let (offset, end) = range.unwrap_or((0, 0));
            self.conflicts += 1;
            self.event(Event::ConcurrentWriteConflict {
                peer,
                offset,
                len: end - offset,
            });
            if self.cfg.node_name < self.peers[peer.0 as usize].name {
                for s in &conflicts {
                    if let Some(r) = self.requests.get_mut(s) {
                        r.pins += 1;
                    }
                }
                reapply_after = conflicts;
            }
        }
        let n = self.next_apply;
        self.next_apply += 1;
        let epoch = self.peers[peer.0 as usize].epoch;
        self.applies.insert(
            n,
            Apply {
                peer,
                epoch,
                id,
                op,
                range,
                local: LocalState::NotSubmitted,
                wait_for,
                reapply_after,
                reapply_marked: false,
                kind: ApplyKind::Data,
                meta_wait: self.gen_wait,
            },
        );
        self.wx.apply_waiting.insert(n);
    }

    /// A frontend request must wait while an earlier overlapping request is
    /// alive (R7) or an overlapping peer operation is being applied.
    fn request_blocked(&self, seq: u64) -> bool {
        let range = self.requests[&seq].range;
        range.is_some()
            && (self
                .requests
                .range(..seq)
                .any(|(_, r)| overlaps(r.range, range))
                || self.applies.values().any(|a| overlaps(a.range, range))
                || self.handshake_in_progress()
                || range.is_some_and(|r| self.resync_overlaps(r)))
    }

    fn local_settled(&self, seq: u64) -> bool {
        self.requests
            .get(&seq)
            .is_none_or(|r| matches!(r.local, LocalState::Done(_)) && !r.reapply)
    }

    /// A peer operation waits for earlier overlapping ones (and a flush for
    /// every earlier one from the same peer, R5) and, in dual-primary, for
    /// the local writes it conflicts with.
    fn apply_blocked(&self, n: u64) -> bool {
        let a = &self.applies[&n];
        let earlier_busy = self.applies.range(..n).any(|(_, b)| {
            !matches!(b.local, LocalState::Done(_))
                && (overlaps(a.range, b.range) || (a.range.is_none() && a.peer == b.peer))
        });
        // A pinned local write will be written again: later peer writes wait
        // for that too, except the conflicting writes that pinned it.
        let settled = |s: &u64| {
            self.local_settled(*s)
                && (a.reapply_after.contains(s) || self.requests.get(s).is_none_or(|r| r.pins == 0))
        };
        earlier_busy || !a.wait_for.iter().all(settled) || !self.mt.durable(a.meta_wait)
    }

    fn submit_request(&mut self, seq: u64) {
        let op = self.requests[&seq].op.clone();
        self.new_io(IoOwner::Request(seq), op.clone());
        let frame = frame_for(&op, seq);
        let mut pending = PeerSet::default();
        let ext = self.cfg.extent_size;
        for i in 0..self.peers.len() {
            let id = PeerId(i as u8);
            if self.peers[i].replicating() {
                pending.insert(id);
                self.send(id, frame.clone());
                // Remember what the peer has not flushed (if it restarts,
                // that may be lost there).
                let u = &mut self.peers[i].unflushed;
                match (&op, op.range()) {
                    (Op::Flush, _) => {
                        let fresh = crate::meta::Bitmap::new(
                            self.cfg.size,
                            u32::try_from(ext).unwrap_or(u32::MAX),
                        );
                        let cur = std::mem::replace(&mut u.cur, fresh);
                        if cur.count() > 0 {
                            u.pending.push((seq, cur));
                        }
                    }
                    (o, Some((s, e))) if !o.is_durable() => {
                        let (a, b) = u.cur.bits_of(s, e);
                        u.cur.set_bits(a, b);
                    }
                    _ => {}
                }
            }
        }
        if let Some(r) = self.requests.get_mut(&seq) {
            r.local = LocalState::Pending;
            r.peers_pending = pending;
        }
        self.wx.req_waiting.remove(&seq);
    }

    /// The local I/O of request `seq` finished.
    pub(crate) fn request_done(&mut self, seq: u64, result: Result<(), i32>) {
        if let Some(r) = self.requests.get_mut(&seq) {
            r.local = LocalState::Done(result);
            self.wx.req_done.insert(seq);
        }
    }

    /// The local I/O of peer operation `n` finished.
    pub(crate) fn apply_done(&mut self, n: u64, result: Result<(), i32>) {
        if let Some(a) = self.applies.get_mut(&n) {
            a.local = LocalState::Done(result);
            self.wx.apply_done.insert(n);
        }
    }

    /// Retires request `seq`.
    pub(crate) fn remove_request(&mut self, seq: u64) -> Option<Request> {
        self.wx.req_waiting.remove(&seq);
        self.wx.req_done.remove(&seq);
        self.wx.req_reapply.remove(&seq);
        self.requests.remove(&seq)
    }

    /// Answers the peer for an applied operation (R4).
    fn acknowledge(&mut self, a: Apply, result: Result<(), i32>) {
        let p = &self.peers[a.peer.0 as usize];
        let live = p.epoch == a.epoch && p.conn == ConnState::Connected;
        let status = match result {
            Ok(()) => 0,
            Err(e) => u32::try_from(e).unwrap_or(errno::EIO as u32).max(1),
        };
        match a.kind {
            ApplyKind::Data => {
                if live {
                    self.send(a.peer, Frame::Ack { id: a.id, status });
                }
                if result.is_err() && self.disk == DiskState::UpToDate {
                    // This replica missed a write: it needs a resync.
                    self.set_disk(DiskState::Outdated);
                }
            }
            ApplyKind::Resync => {
                if live {
                    if let (PeerSync::Target { received }, Some((s, e))) =
                        (&mut self.peers[a.peer.0 as usize].sync, a.range)
                    {
                        if result.is_ok() {
                            *received += e - s;
                        }
                    }
                    self.send(a.peer, Frame::ResyncAck { id: a.id, status });
                }
            }
            ApplyKind::SyncDone { current, history } => {
                if !live {
                    return;
                }
                if result.is_err() {
                    self.disconnect(a.peer, "flush at the end of the resync failed".into());
                } else {
                    self.adopt_sync(a.peer, current, history);
                }
            }
        }
    }

    /// R1–R3: completes and retires the frontend requests that are done
    /// locally. Returns whether anything changed.
    fn complete_requests(&mut self) -> bool {
        if self.wx.req_done.is_empty() {
            return false;
        }
        let mut changed = false;
        // R23: once detached, only a peer's ack makes a request good.
        let detached = self.disk == DiskState::Diskless;
        let early = self.cfg.protocol == Protocol::A && !detached;
        let may_complete = self.may_complete();
        let ready = WriteIndex::snapshot(&self.wx.req_done, &mut self.wx.scratch);
        for &seq in &ready {
            let Some(r) = self.requests.get_mut(&seq) else {
                self.wx.req_done.remove(&seq);
                continue;
            };
            let LocalState::Done(mut result) = r.local else {
                self.wx.req_done.remove(&seq);
                continue;
            };
            if r.reapply
                || r.pins != 0
                || !(self.mt.durable(r.meta_wait) || self.mt.failed(r.meta_wait))
            {
                continue;
            }
            if detached {
                result = if r.peer_ok { Ok(()) } else { Err(errno::EIO) };
            }
            if self.cfg.diskless
                && !(0..self.peers.len()).all(|i| r.acked_ok.contains(PeerId(i as u8)))
            {
                // R28: only data on every replica counts.
                result = Err(errno::EIO);
            }
            let all_acked = r.peers_pending.is_empty();
            // R25: an error may always be reported; a success waits for
            // quorum.
            if r.internal {
                if !r.completed {
                    r.completed = true;
                    changed = true;
                }
            } else if !r.completed && (early || all_acked) && (may_complete || result.is_err()) {
                r.completed = true;
                let req = r.req;
                self.out.push_back(Output::Complete { req, result });
                changed = true;
            }
            if all_acked && r.completed {
                self.remove_request(seq);
                changed = true;
            }
        }
        self.wx.give_back(ready);
        changed
    }

    /// Runs the write path to a fixed point.
    ///
    /// Each round looks only at the operations [`WriteIndex`] lists in the
    /// state a rule applies to (in issue/arrival order, as a scan of all of
    /// them would): the cost of an event does not grow with the queue depth.
    pub(crate) fn progress(&mut self) {
        loop {
            let mut changed = false;

            // R7: submit frontend requests that are no longer blocked.
            let waiting = WriteIndex::snapshot(&self.wx.req_waiting, &mut self.wx.scratch);
            for &seq in &waiting {
                match self.requests.get(&seq) {
                    Some(r) if r.local == LocalState::NotSubmitted => {}
                    _ => {
                        self.wx.req_waiting.remove(&seq);
                        continue;
                    }
                }
                if self.request_blocked(seq) {
                    continue;
                }
                // R20: its extents are in the activity log, durably.
                let r = &self.requests[&seq];
                if let (Some(range), false) = (r.range, r.al_admitted) {
                    let before = self.requests.len();
                    match self.al_admit(seq, range) {
                        Some(v) => {
                            let r = self.requests.get_mut(&seq).expect("listed above");
                            r.al_admitted = true;
                            r.meta_wait = r.meta_wait.max(v);
                        }
                        None => {
                            // It may have started a flush (R20): go round.
                            changed |= self.requests.len() != before;
                            continue;
                        }
                    }
                }
                // R8: peers that will not get the write have it marked in
                // their bitmap, durably, first.
                let r = &self.requests[&seq];
                if let Some(range) = r.range {
                    let mut missing = PeerSet::default();
                    for (i, p) in self.peers.iter().enumerate() {
                        if !p.replicating() {
                            missing.insert(PeerId(i as u8));
                        }
                    }
                    if !missing.is_empty() {
                        let v = self.mark_missed(missing, range, OutdatedReason::MissedWrite);
                        let r = self.requests.get_mut(&seq).expect("listed above");
                        r.meta_wait = r.meta_wait.max(v);
                    }
                }
                let wait = self.requests[&seq].meta_wait;
                if !self.mt.durable(wait) {
                    if self.mt.failed(wait) {
                        let r = self.remove_request(seq).expect("listed above");
                        self.out.push_back(Output::Complete {
                            req: r.req,
                            result: Err(errno::EIO),
                        });
                        changed = true;
                    }
                    continue;
                }
                self.submit_request(seq);
                changed = true;
            }
            self.wx.give_back(waiting);

            // R9: re-apply local writes after a conflicting peer write.
            if !self.wx.req_reapply.is_empty() {
                let again = WriteIndex::snapshot(&self.wx.req_reapply, &mut self.wx.scratch);
                for &seq in &again {
                    let Some(r) = self.requests.get_mut(&seq) else {
                        self.wx.req_reapply.remove(&seq);
                        continue;
                    };
                    if !r.reapply {
                        self.wx.req_reapply.remove(&seq);
                        continue;
                    }
                    if !matches!(r.local, LocalState::Done(_)) {
                        continue;
                    }
                    r.reapply = false;
                    r.local = LocalState::Pending;
                    let op = r.op.clone();
                    self.wx.req_reapply.remove(&seq);
                    self.wx.req_done.remove(&seq);
                    self.new_io(IoOwner::Request(seq), op);
                    changed = true;
                }
                self.wx.give_back(again);
            }

            // Submit peer operations that are no longer blocked.
            if !self.wx.apply_waiting.is_empty() {
                let waiting = WriteIndex::snapshot(&self.wx.apply_waiting, &mut self.wx.scratch);
                for &n in &waiting {
                    match self.applies.get(&n) {
                        Some(a) if a.local == LocalState::NotSubmitted => {}
                        _ => {
                            self.wx.apply_waiting.remove(&n);
                            continue;
                        }
                    }
                    if !self.apply_blocked(n) {
                        let a = self.applies.get_mut(&n).expect("listed above");
                        a.local = LocalState::Pending;
                        let op = a.op.clone();
                        self.wx.apply_waiting.remove(&n);
                        self.new_io(IoOwner::Apply(n), op);
                        changed = true;
                    }
                }
                self.wx.give_back(waiting);
            }

            // R4: acknowledge peer operations once locally done.
            if !self.wx.apply_done.is_empty() {
                let done = WriteIndex::snapshot(&self.wx.apply_done, &mut self.wx.scratch);
                for &n in &done {
                    let Some(a) = self.applies.get(&n) else {
                        self.wx.apply_done.remove(&n);
                        continue;
                    };
                    let LocalState::Done(result) = a.local else {
                        self.wx.apply_done.remove(&n);
                        continue;
                    };
                    if !a.reapply_marked && !a.reapply_after.is_empty() {
                        let seqs = a.reapply_after.clone();
                        for s in seqs {
                            if let Some(r) = self.requests.get_mut(&s) {
                                r.reapply = true;
                                r.pins = r.pins.saturating_sub(1);
                                self.wx.req_reapply.insert(s);
                            }
                        }
                        self.applies.get_mut(&n).expect("listed").reapply_marked = true;
                        changed = true;
                        continue;
                    }
                    if !a.reapply_after.iter().all(|s| self.local_settled(*s)) {
                        continue;
                    }
                    let a = self.applies.remove(&n).expect("listed above");
                    self.wx.apply_done.remove(&n);
                    changed = true;
                    self.acknowledge(a, result);
                }
                self.wx.give_back(done);
            }

            // R1–R3: complete and retire frontend requests.
            changed |= self.complete_requests();

            changed |= self.pump_resync();
            changed |= self.pump_verify();
            changed |= self.finish_target();
            changed |= self.detached_progress();
            changed |= self.grow_progress();
            changed |= self.meta_flush();

            if !changed {
                break;
            }
        }
    }
}
