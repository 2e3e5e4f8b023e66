//! Online verify (rule R22 in `docs/replication.md`): compares this node's
//! data with a peer's by digest while I/O continues, reports the block
//! ranges that differ and can mark them for resync.
//!
//! The verifying node walks the volume in requests of at most
//! [`MAX_VERIFY_LEN`] bytes, [`VERIFY_WINDOW`] at a time. For each it reads
//! its own data ([`Output::Read`]) and sends the peer a
//! [`Frame::VerifyRequest`]; the peer reads the same range and answers with
//! one [`block_digest`] per [`VERIFY_BLOCK`] in a [`Frame::VerifyReply`].
//!
//! Writes keep flowing meanwhile, so a block may differ only because a
//! write had reached one disk and not yet the other. The rule that keeps
//! such blocks out of the report: a block is *disturbed* if a frontend
//! request or peer operation overlapping it was alive (not yet retired, i.e.
//! not yet acknowledged by every peer) at any time while its request was in
//! flight. A differing block is reported only if it differed in two checks,
//! the second of which was undisturbed; a disturbed differing block is
//! checked again, at most [`MAX_ATTEMPTS`] times, then counted as skipped.
//! An undisturbed block reads the same data on both nodes unless the
//! replicas really differ: every write retired before the request started
//! is on both disks (a peer acknowledges a write only once it is on its
//! disk), and no other write touched the block while it was read.
//!
//! Only a node with an UpToDate disk verifies, against a connected peer that
//! is UpToDate with no resync running, and only while no connected peer is
//! Primary (a Primary's writes reach its peers' disks before this node hears
//! of them): in practice on the Primary. With marking, the
//! differing blocks are set in the peer's bitmap (durably, as a missed write
//! would be: a new generation starts) and the connection is closed once
//! that is durable; the reconnect's handshake makes this node the sync
//! source of exactly those chunks (or, if neither node is Primary, once
//! this node is promoted).

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use bytes::Bytes;

use super::frame::{Frame, MAX_VERIFY_LEN, VERIFY_BLOCK};
use super::peer::{PeerSet, PeerSync};
use super::replica::Replica;
use super::state::{ConnState, DiskState, Role};
use super::write_path::IoOwner;
use super::{errno, Event, IoId, OutdatedReason, Output, PeerId, Time};

/// Verify requests in flight per peer.
pub const VERIFY_WINDOW: usize = 4;
/// Checks of one block before a block that keeps differing while written
/// to is given up (counted in [`VerifyProgress::skipped_bytes`]).
pub const MAX_ATTEMPTS: u8 = 8;
/// Verify requests from one peer served at once; more is a protocol
/// violation (the verifying side keeps [`VERIFY_WINDOW`]).
const MAX_SERVING: usize = 16;

/// The digest of one block of data, as carried in [`Frame::VerifyReply`]:
/// CRC-32 (IEEE) of the data in the high 32 bits, and in the low 32 bits a
/// multiply-rotate hash over its 8-byte little-endian words (the last one
/// zero-padded), seeded with the length and finished with the MurmurHash3
/// 64-bit finalizer. Both sides compute the same function, so it is part
/// of the wire protocol.
pub fn block_digest(data: &[u8]) -> u64 {
    let crc = crc32fast::hash(data);
    let mut h: u64 = 0x9e37_79b9_7f4a_7c15 ^ data.len() as u64;
    let mut words = data.chunks_exact(8);
    for w in &mut words {
        let mut b = [0u8; 8];
        b.copy_from_slice(w);
        h = (h ^ u64::from_le_bytes(b))
            .wrapping_mul(0xff51_afd7_ed55_8ccd)
            .rotate_left(31);
    }
    let rest = words.remainder();
    if !rest.is_empty() {
        let mut b = [0u8; 8];
        b[..rest.len()].copy_from_slice(rest);
        h = (h ^ u64::from_le_bytes(b))
            .wrapping_mul(0xff51_afd7_ed55_8ccd)
            .rotate_left(31);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^= h >> 33;
    (u64::from(crc) << 32) | (h & 0xffff_ffff)
}

/// The digests of `data`, one per [`VERIFY_BLOCK`].
pub fn digests(data: &[u8]) -> Vec<u64> {
    data.chunks(VERIFY_BLOCK as usize)
        .map(block_digest)
        .collect()
}

/// Why [`Replica::start_verify`] refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// No such peer.
    #[error("unknown peer")]
    UnknownPeer,
    /// The peer is not connected.
    #[error("peer {0} is not connected")]
    NotConnected(String),
    /// Only an UpToDate disk is a reference to compare against.
    #[error("own disk is {0:?}; only an UpToDate disk verifies")]
    DiskNotUpToDate(DiskState),
    /// The peer is not UpToDate, or a resync with it runs or is due.
    #[error("peer {0} is not UpToDate and in sync (a resync runs or is due)")]
    PeerNotInSync(String),
    /// A connected peer (the one named) is Primary: its writes reach disks
    /// before this node hears of them, so differences could not be told
    /// from writes in flight.
    #[error("peer {0} is Primary; run verify on the Primary")]
    PeerIsPrimary(String),
    /// A verify with this peer is already running.
    #[error("a verify with peer {0} is already running")]
    AlreadyRunning(String),
}

/// Progress or result of an online verify with one peer
/// ([`Replica::verify_status`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyProgress {
    /// Bytes compared so far (first pass).
    pub done_bytes: u64,
    /// Bytes to compare: the volume size.
    pub total_bytes: u64,
    /// Bytes found different (confirmed by a second, undisturbed check).
    pub differing_bytes: u64,
    /// The differing byte ranges `[start, end)`, sorted and merged.
    pub ranges: Vec<(u64, u64)>,
    /// Bytes that kept being written while checked and were given up.
    pub skipped_bytes: u64,
    /// The verify is over (completed or aborted).
    pub finished: bool,
    /// Why it stopped early, if it did.
    pub aborted: Option<String>,
    /// The differing blocks were marked for resync.
    pub marked: bool,
    /// Time since it started (until it finished).
    pub elapsed: Duration,
}

/// One verify request in flight.
#[derive(Debug, Clone)]
struct Chunk {
    offset: u64,
    len: u64,
    /// Checks of these blocks before this one.
    attempts: u8,
    local: Option<Vec<u64>>,
    remote: Option<Vec<u64>>,
    /// Per block: a write overlapped it while in flight.
    disturbed: Vec<bool>,
}

/// The verifying side's state for one peer.
#[derive(Debug, Clone)]
pub(crate) struct Verify {
    mark: bool,
    total: u64,
    cursor: u64,
    done: u64,
    /// Ranges to check again: (offset, len, checks so far).
    retry: VecDeque<(u64, u64, u8)>,
    chunks: BTreeMap<u64, Chunk>,
    /// Local reads in flight: io → request id.
    reads: BTreeMap<IoId, u64>,
    next_id: u64,
    /// Confirmed differing ranges: start → end, merged.
    found: BTreeMap<u64, u64>,
    differing: u64,
    skipped: u64,
    finished: bool,
    aborted: Option<String>,
    marked: bool,
    /// Marking: close the connection once this metadata version is durable.
    mark_wait: Option<u64>,
    started: Time,
    elapsed: Duration,
}

impl Verify {
    fn add_found(&mut self, start: u64, end: u64) {
        self.differing += end - start;
        let (mut s, mut e) = (start, end);
        if let Some((&ps, &pe)) = self.found.range(..=s).next_back() {
            if pe >= s {
                s = ps;
                e = e.max(pe);
                self.found.remove(&ps);
            }
        }
        while let Some((&ns, &ne)) = self.found.range(s..).next() {
            if ns > e {
                break;
            }
            e = e.max(ne);
            self.found.remove(&ns);
        }
        self.found.insert(s, e);
    }

    fn ranges(&self) -> Vec<(u64, u64)> {
        self.found.iter().map(|(s, e)| (*s, *e)).collect()
    }

    fn in_flight(&self) -> bool {
        !self.chunks.is_empty()
    }
}

impl Replica {
    /// Starts an online verify against `peer` (rule R22): compares every
    /// block of the volume by digest while I/O continues. With `mark`, the
    /// blocks found different are marked for resync from this node and the
    /// connection is re-established to run it. Progress and the result:
    /// [`Replica::verify_status`] and [`Event::VerifyFinished`].
    pub fn start_verify(&mut self, now: Time, peer: PeerId, mark: bool) -> Result<(), VerifyError> {
        self.now = self.now.max(now);
        self.verify_eligible(peer)?;
        let i = peer.0 as usize;
        if let Some(v) = &self.peers[i].verify {
            if !v.finished || v.mark_wait.is_some() {
                return Err(VerifyError::AlreadyRunning(self.peers[i].name.clone()));
            }
        }
        // Ids keep growing across verifies, so replies to an aborted one are
        // told apart (and ignored).
        let next_id = self.peers[i].verify.as_ref().map_or(1, |v| v.next_id);
        self.peers[i].verify = Some(Verify {
            mark,
            total: self.cfg.size,
            cursor: 0,
            done: 0,
            retry: VecDeque::new(),
            chunks: BTreeMap::new(),
            reads: BTreeMap::new(),
            next_id,
            found: BTreeMap::new(),
            differing: 0,
            skipped: 0,
            finished: false,
            aborted: None,
            marked: false,
            mark_wait: None,
            started: self.now,
            elapsed: Duration::ZERO,
        });
        self.progress();
        Ok(())
    }

    /// The online verify with `peer`, running or last finished (`None` if
    /// none was started since this node started, or for an unknown peer).
    pub fn verify_status(&self, peer: PeerId) -> Option<VerifyProgress> {
        let v = self.peer(peer)?.verify.as_ref()?;
        Some(VerifyProgress {
            done_bytes: v.done,
            total_bytes: v.total,
            differing_bytes: v.differing,
            ranges: v.ranges(),
            skipped_bytes: v.skipped,
            finished: v.finished,
            aborted: v.aborted.clone(),
            marked: v.marked,
            elapsed: if v.finished {
                v.elapsed
            } else {
                self.now.since(v.started)
            },
        })
    }

    fn verify_eligible(&self, peer: PeerId) -> Result<(), VerifyError> {
        let p = self.peer(peer).ok_or(VerifyError::UnknownPeer)?;
        if p.conn != ConnState::Connected {
            return Err(VerifyError::NotConnected(p.name.clone()));
        }
        if self.disk != DiskState::UpToDate {
            return Err(VerifyError::DiskNotUpToDate(self.disk));
        }
        if !matches!(p.sync, PeerSync::None)
            || p.disk != Some(DiskState::UpToDate)
            || self.holds_outdated(peer)
        {
            return Err(VerifyError::PeerNotInSync(p.name.clone()));
        }
        // Any Primary but this node writes to the peer before this node
        // hears of the write.
        if let Some(q) = self
            .peers
            .iter()
            .find(|q| q.conn == ConnState::Connected && q.role == Some(Role::Primary))
        {
            return Err(VerifyError::PeerIsPrimary(q.name.clone()));
        }
        Ok(())
    }

    /// Ends a running verify early.
    fn abort_verify(&mut self, peer: PeerId, why: String) {
        let now = self.now;
        let Some(v) = self.peers[peer.0 as usize].verify.as_mut() else {
            return;
        };
        if v.finished {
            return;
        }
        v.finished = true;
        v.aborted = Some(why.clone());
        v.elapsed = now.since(v.started);
        v.chunks.clear();
        v.reads.clear();
        v.retry.clear();
        let e = Event::VerifyFinished {
            peer,
            compared_bytes: v.done,
            differing_bytes: v.differing,
            ranges: v.ranges(),
            skipped_bytes: v.skipped,
            marked: false,
            aborted: Some(why),
        };
        self.event(e);
    }

    /// The connection to `peer` is gone: a running verify is aborted.
    pub(crate) fn verify_peer_lost(&mut self, peer: PeerId) {
        self.abort_verify(peer, "peer disconnected".into());
    }

    /// A write to `range` starts (frontend request or peer operation): the
    /// blocks it overlaps in verify requests in flight are disturbed.
    pub(crate) fn verify_disturb(&mut self, range: Option<(u64, u64)>) {
        let Some((s, e)) = range else { return };
        for p in self.peers.iter_mut() {
            let Some(v) = p.verify.as_mut() else { continue };
            for c in v.chunks.values_mut() {
                disturb(c, s, e);
            }
        }
    }

    /// Starts verify requests while the window allows, finishes verifies
    /// with nothing left, aborts those whose peer no longer qualifies, and
    /// closes the connection of a marked one once the marks are durable.
    /// Returns whether anything happened.
    pub(crate) fn pump_verify(&mut self) -> bool {
        let mut changed = false;
        for i in 0..self.peers.len() {
            let peer = PeerId(i as u8);
            let Some(v) = &self.peers[i].verify else {
                continue;
            };
            if let Some(wait) = v.mark_wait {
                if self.peers[i].conn != ConnState::Connected {
                    if let Some(v) = self.peers[i].verify.as_mut() {
                        v.mark_wait = None;
                    }
                } else if self.mt.durable(wait) {
                    if let Some(v) = self.peers[i].verify.as_mut() {
                        v.mark_wait = None;
                    }
                    self.disconnect(
                        peer,
                        "online verify: reconnecting to resync the differing blocks".into(),
                    );
                    changed = true;
                }
                continue;
            }
            if v.finished {
                continue;
            }
            if let Err(e) = self.verify_eligible(peer) {
                self.abort_verify(peer, e.to_string());
                changed = true;
                continue;
            }
            while let Some(v) = self.peers[i].verify.as_mut() {
                if v.chunks.len() >= VERIFY_WINDOW {
                    break;
                }
                let (offset, len, attempts) = if let Some(r) = v.retry.pop_front() {
                    r
                } else if v.cursor < v.total {
                    let len = MAX_VERIFY_LEN.min(v.total - v.cursor);
                    let r = (v.cursor, len, 0);
                    v.cursor += len;
                    r
                } else {
                    break;
                };
                let id = v.next_id;
                v.next_id += 1;
                let blocks = len.div_ceil(VERIFY_BLOCK) as usize;
                let mut c = Chunk {
                    offset,
                    len,
                    attempts,
                    local: None,
                    remote: None,
                    disturbed: vec![false; blocks],
                };
                let (s, e) = (offset, offset + len);
                let live = self
                    .requests
                    .values()
                    .map(|r| r.range)
                    .chain(self.applies.values().map(|a| a.range))
                    .flatten()
                    .filter(|(a, b)| *a < e && s < *b);
                for (a, b) in live {
                    disturb(&mut c, a, b);
                }
                let io = IoId(self.next_io);
                self.next_io += 1;
                let epoch = self.peers[i].epoch;
                self.ios.insert(io, IoOwner::VerifyRead { peer, epoch });
                if let Some(v) = self.peers[i].verify.as_mut() {
                    v.chunks.insert(id, c);
                    v.reads.insert(io, id);
                }
                self.out.push_back(Output::Read { io, offset, len });
                self.send(peer, Frame::VerifyRequest { id, offset, len });
                changed = true;
            }
            let Some(v) = self.peers[i].verify.as_mut() else {
                continue;
            };
            if !v.in_flight() && v.retry.is_empty() && v.cursor >= v.total {
                self.finish_verify(peer);
                changed = true;
            }
        }
        changed
    }

    fn finish_verify(&mut self, peer: PeerId) {
        let i = peer.0 as usize;
        let now = self.now;
        let Some(v) = self.peers[i].verify.as_mut() else {
            return;
        };
        v.finished = true;
        v.elapsed = now.since(v.started);
        let ranges = v.ranges();
        let mark = v.mark && !ranges.is_empty();
        if mark {
            let mut only = PeerSet::default();
            only.insert(peer);
            let mut wait = 0;
            for r in &ranges {
                wait = wait.max(self.mark_missed(only, *r, OutdatedReason::VerifyMismatch));
            }
            if let Some(v) = self.peers[i].verify.as_mut() {
                v.marked = true;
                v.mark_wait = Some(wait);
            }
        }
        let Some(v) = self.peers[i].verify.as_ref() else {
            return;
        };
        let e = Event::VerifyFinished {
            peer,
            compared_bytes: v.done,
            differing_bytes: v.differing,
            ranges,
            skipped_bytes: v.skipped,
            marked: mark,
            aborted: None,
        };
        self.event(e);
    }

    /// A local read for verify finished: on the verifying side (its own
    /// digests) or the serving side (digests for the peer).
    pub(crate) fn on_verify_read_done(&mut self, io: IoId, result: Result<Bytes, i32>) {
        match self.ios.remove(&io) {
            Some(IoOwner::VerifyRead { peer, epoch }) => {
                let i = peer.0 as usize;
                if self.peers[i].epoch != epoch {
                    return;
                }
                let Some(v) = self.peers[i].verify.as_mut() else {
                    return;
                };
                let Some(id) = v.reads.remove(&io) else {
                    return;
                };
                let Some(c) = v.chunks.get_mut(&id) else {
                    return;
                };
                match result {
                    Ok(d) if d.len() as u64 == c.len => c.local = Some(digests(&d)),
                    other => {
                        let errno = other.err().unwrap_or(errno::EIO);
                        self.event(Event::LocalIoError { errno });
                        return self.abort_verify(
                            peer,
                            format!("read from the local disk failed (errno {errno})"),
                        );
                    }
                }
                self.verify_chunk_done(peer, id);
            }
            Some(IoOwner::VerifyServe {
                peer,
                epoch,
                id,
                len,
                resync,
            }) => {
                let p = &self.peers[peer.0 as usize];
                if p.epoch != epoch || p.conn != ConnState::Connected {
                    return;
                }
                let (status, digests) = match result {
                    Ok(d) if d.len() as u64 == len => (0, digests(&d)),
                    other => {
                        let errno = other.err().unwrap_or(errno::EIO);
                        self.event(Event::LocalIoError { errno });
                        let status = u32::try_from(errno).unwrap_or(errno::EIO as u32).max(1);
                        (status, Vec::new())
                    }
                };
                let f = if resync {
                    Frame::ResyncDigestReply {
                        id,
                        status,
                        digests,
                    }
                } else {
                    Frame::VerifyReply {
                        id,
                        status,
                        digests,
                    }
                };
                self.send(peer, f);
            }
            Some(other) => {
                self.ios.insert(io, other);
            }
            None => {}
        }
    }

    /// Serving side: the peer asks for digests of a range.
    pub(crate) fn on_verify_request(&mut self, peer: PeerId, id: u64, offset: u64, len: u64) {
        let size = self.cfg.size;
        let end = offset.saturating_add(len);
        if offset % VERIFY_BLOCK != 0
            || end > size
            || len == 0
            || len > MAX_VERIFY_LEN
            || (len % VERIFY_BLOCK != 0 && end != size)
        {
            return self.violation(peer, "VerifyRequest outside the volume or misaligned");
        }
        let epoch = self.peers[peer.0 as usize].epoch;
        let serving = self
            .ios
            .values()
            .filter(|o| matches!(o, IoOwner::VerifyServe { peer: p, epoch: e, resync: false, .. } if *p == peer && *e == epoch))
            .count();
        if serving >= MAX_SERVING {
            return self.violation(peer, "too many VerifyRequests in flight");
        }
        let io = IoId(self.next_io);
        self.next_io += 1;
        self.ios.insert(
            io,
            IoOwner::VerifyServe {
                peer,
                epoch,
                id,
                len,
                resync: false,
            },
        );
        self.out.push_back(Output::Read { io, offset, len });
    }

    /// Verifying side: the peer's digests for a request.
    pub(crate) fn on_verify_reply(&mut self, peer: PeerId, id: u64, status: u32, d: Vec<u64>) {
        let i = peer.0 as usize;
        let Some(v) = self.peers[i].verify.as_mut() else {
            return; // Nothing asked since start: a stray reply, ignored.
        };
        if id >= v.next_id {
            return self.violation(peer, "VerifyReply for a request it was not sent");
        }
        let Some(c) = v.chunks.get_mut(&id) else {
            return; // A reply to an aborted verify.
        };
        if status != 0 {
            return self.abort_verify(
                peer,
                format!("peer failed to read its data (errno {status})"),
            );
        }
        if d.len() as u64 != c.len.div_ceil(VERIFY_BLOCK) {
            return self.violation(peer, "VerifyReply with the wrong number of digests");
        }
        c.remote = Some(d);
        self.verify_chunk_done(peer, id);
    }

    /// Compares a request's digests once both are in.
    fn verify_chunk_done(&mut self, peer: PeerId, id: u64) {
        let i = peer.0 as usize;
        let Some(v) = self.peers[i].verify.as_mut() else {
            return;
        };
        let ready = v
            .chunks
            .get(&id)
            .is_some_and(|c| c.local.is_some() && c.remote.is_some());
        if !ready {
            return;
        }
        let Some(c) = v.chunks.remove(&id) else {
            return;
        };
        let (Some(local), Some(remote)) = (&c.local, &c.remote) else {
            return;
        };
        let end = c.offset + c.len;
        let block = |k: usize| {
            let s = c.offset + k as u64 * VERIFY_BLOCK;
            (s, (s + VERIFY_BLOCK).min(end))
        };
        // Runs of blocks to check again, and confirmed differing runs.
        let mut again: Vec<(u64, u64)> = Vec::new();
        let mut found: Vec<(u64, u64)> = Vec::new();
        let push = |list: &mut Vec<(u64, u64)>, (s, e): (u64, u64)| match list.last_mut() {
            Some(last) if last.1 == s && e - last.0 <= MAX_VERIFY_LEN => last.1 = e,
            _ => list.push((s, e)),
        };
        let mut skipped = 0;
        for k in 0..local.len() {
            if local[k] == remote[k] {
                continue;
            }
            let b = block(k);
            if c.attempts >= 1 && !c.disturbed[k] {
                push(&mut found, b);
            } else if c.attempts + 1 >= MAX_ATTEMPTS {
                skipped += b.1 - b.0;
            } else {
                push(&mut again, b);
            }
        }
        if c.attempts == 0 {
            v.done += c.len;
        }
        v.skipped += skipped;
        for (s, e) in found {
            v.add_found(s, e);
        }
        for (s, e) in again {
            v.retry.push_back((s, e - s, c.attempts + 1));
        }
    }
}

fn disturb(c: &mut Chunk, s: u64, e: u64) {
    let end = c.offset + c.len;
    if e <= c.offset || s >= end {
        return;
    }
    let first = (s.max(c.offset) - c.offset) / VERIFY_BLOCK;
    let last = (e.min(end) - c.offset).div_ceil(VERIFY_BLOCK);
    for k in first..last {
        if let Some(d) = c.disturbed.get_mut(k as usize) {
            *d = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_tell_blocks_apart() {
        let a = vec![0u8; 4096];
        let mut b = a.clone();
        assert_eq!(block_digest(&a), block_digest(&b));
        b[4095] = 1;
        assert_ne!(block_digest(&a), block_digest(&b));
        // Same CRC-32 affine structure is not enough: moving a bit changes both halves.
        let mut c = a.clone();
        c[0] = 1;
        assert_ne!(block_digest(&b) as u32, block_digest(&c) as u32);
        assert_ne!(block_digest(&a[..512]), block_digest(&a[..1024]));
        assert_eq!(digests(&vec![7u8; 4096 * 2 + 512]).len(), 3);
    }
}
