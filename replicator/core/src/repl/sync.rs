//! Generations, dirty bitmaps, metadata persistence and resync.
//!
//! The rules are in `docs/replication.md` ("Generations and resync"):
//!
//! - A Primary that writes while a peer does not receive the write records
//!   the region in that peer's bitmap *durably before* the write is
//!   submitted, and the first such write starts a new generation (the peer's
//!   bitmap generation is the one it was left in).
//! - On connect both sides exchange generations in `Hello` and run the same
//!   pure [`decide`] on them: in sync, source, target, split brain or
//!   unrelated.
//! - The source sends only the regions marked in its bitmap (ORed with the
//!   target's), reading them from its disk; writes keep flowing meanwhile.
//! - With `resync_checksums` (R26) the source first asks the target for
//!   the digests of each run it reads and sends only the blocks whose
//!   digests differ; identical blocks are cleared from the bitmap unsent.

use bytes::Bytes;
use std::collections::BTreeMap;

use super::frame::{
    Frame, HelloGens, SplitBrainPolicy, MAX_SYNC_RANGES, MAX_VERIFY_LEN, VERIFY_BLOCK,
};
use super::peer::{CsumRun, PeerSet, PeerSync, Source};
use super::replica::Replica;
use super::state::{ConnState, DiskState, Role};
use super::write_path::IoOwner;
use super::{errno, Event, IoId, Op, OutdatedReason, Output, PeerId, Time};
use crate::meta::{Bitmap, History, MetaRecord, SLOTS};

/// A metadata block to write, from [`Output::MetaWrite`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum MetaAt {
    /// Record copy 0 (A) or 1 (B) (`meta::RECORD_OFFSETS`).
    Record(u8),
    /// Activity-log copy 0 or 1 (`meta::AL_OFFSETS`).
    ActivityLog(u8),
    /// Page `page` of the bitmap in slot `slot` (`meta::Layout::page_offset`).
    BitmapPage {
        /// Slot.
        slot: u8,
        /// Page.
        page: u64,
    },
}

/// The metadata a replica starts from, read from disk by the driver.
#[derive(Debug, Clone)]
pub struct LoadedMeta {
    /// The newest valid record ([`MetaRecord::initial`] for a new volume).
    pub record: MetaRecord,
    /// Index of the copy it came from (the next update goes to the other).
    pub newest_copy: usize,
    /// The bitmap of each slot that names a peer (`None`: read as clear).
    pub bitmaps: [Option<Bitmap>; SLOTS],
    /// The activity log found on disk (extents hot when the node stopped).
    pub activity_log: crate::meta::ActivityLog,
    /// Index of the activity-log copy it came from.
    pub newest_al_copy: usize,
}

impl LoadedMeta {
    /// Reads the metadata from its on-disk parts: the two record copies and,
    /// through `read_slot(slot, bytes)`, the first `bytes` bytes of each
    /// used slot's bitmap. A blank record (a new volume) gives
    /// [`LoadedMeta::fresh`] with `chunk` and `disk`; a record whose both
    /// copies are damaged is an error naming why.
    pub fn from_parts(
        record_a: &[u8],
        record_b: &[u8],
        size: u64,
        chunk: u32,
        disk: DiskState,
        mut read_slot: impl FnMut(usize, u64) -> Vec<u8>,
    ) -> Result<LoadedMeta, String> {
        let Some((record, newest_copy)) = crate::meta::select(record_a, record_b)? else {
            return Ok(LoadedMeta::fresh(chunk, disk));
        };
        let mut bitmaps: [Option<Bitmap>; SLOTS] = [None, None, None];
        for (s, slot) in record.peers.iter().enumerate() {
            if slot.name.is_empty() {
                continue;
            }
            let empty = Bitmap::new(size, record.chunk);
            let bytes = read_slot(s, empty.len().div_ceil(8));
            bitmaps[s] = Some(Bitmap::from_bytes(size, record.chunk, &bytes));
        }
        Ok(LoadedMeta {
            record,
            newest_copy,
            bitmaps,
            activity_log: Default::default(),
            newest_al_copy: 1,
        })
    }

    /// Reads the metadata from individually stored blocks (`block(at)`:
    /// the last content written to `at`, `None` if never written) — for
    /// drivers that keep metadata blocks apart, like the simulator.
    pub fn from_blocks<'a>(
        size: u64,
        chunk: u32,
        disk: DiskState,
        block: impl Fn(MetaAt) -> Option<&'a [u8]>,
    ) -> Result<LoadedMeta, String> {
        let zero = [0u8; crate::meta::RECORD_SIZE];
        let get = |at| block(at).unwrap_or(&zero[..]);
        LoadedMeta::from_parts(
            get(MetaAt::Record(0)),
            get(MetaAt::Record(1)),
            size,
            chunk,
            disk,
            |slot, bytes| {
                let mut out = Vec::new();
                let mut page = 0;
                while (out.len() as u64) < bytes {
                    out.extend_from_slice(get(MetaAt::BitmapPage {
                        slot: slot as u8,
                        page,
                    }));
                    page += 1;
                }
                out
            },
        )?
        .with_activity_log(get(MetaAt::ActivityLog(0)), get(MetaAt::ActivityLog(1)))
    }

    /// Adds the activity log read from its two copies.
    pub fn with_activity_log(mut self, a: &[u8], b: &[u8]) -> Result<LoadedMeta, String> {
        let (al, idx) = crate::meta::ActivityLog::select(a, b)?;
        self.activity_log = al;
        self.newest_al_copy = idx;
        Ok(self)
    }

    /// The metadata of a new volume.
    pub fn fresh(chunk: u32, disk: DiskState) -> LoadedMeta {
        LoadedMeta {
            record: MetaRecord::initial(chunk, disk),
            newest_copy: 1,
            bitmaps: [None, None, None],
            activity_log: Default::default(),
            newest_al_copy: 1,
        }
    }
}

/// A node's side of a resync.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SyncRole {
    /// Sends its data.
    Source,
    /// Receives; Inconsistent until done.
    Target,
}

/// What two replicas do after their handshake ([`decide`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Same data: replicate from now on.
    InSync,
    /// This node sends; `full`: every block (the bitmap is not usable).
    Source {
        /// Full sync.
        full: bool,
    },
    /// This node receives.
    Target {
        /// Full sync.
        full: bool,
    },
    /// Both wrote while apart.
    SplitBrain,
    /// No generation in common: different data sets.
    Unrelated,
    /// The side that would have to send is not UpToDate.
    NoUpToDate,
    /// The side that would have to receive is Primary.
    TargetIsPrimary,
    /// This node would be the source, but neither side is Primary: only a
    /// Primary sends a resync (so a target never has two sources). The
    /// sync starts when this node is promoted.
    SourceWaits,
    /// This node would be the target of a Secondary: it holds itself
    /// Outdated until a Primary resyncs it.
    TargetWaits,
}

impl Decision {
    /// The decision as the other side sees it.
    pub fn mirror(self) -> Decision {
        match self {
            Decision::Source { full } => Decision::Target { full },
            Decision::Target { full } => Decision::Source { full },
            Decision::SourceWaits => Decision::TargetWaits,
            Decision::TargetWaits => Decision::SourceWaits,
            d => d,
        }
    }
}

/// One side's handshake facts.
#[derive(Debug, Clone, Copy)]
pub struct View<'a> {
    /// Generations it sent.
    pub gens: HelloGens,
    /// Role it sent.
    pub role: Role,
    /// Disk it sent.
    pub disk: DiskState,
    /// Its node name (tie-breaker).
    pub name: &'a str,
}

/// Decides the sync direction from both sides' handshake facts. Pure and
/// symmetric: `decide(a, b) == decide(b, a).mirror()`, so both sides reach the
/// same conclusion without another round trip.
pub fn decide(me: &View, peer: &View) -> Decision {
    let (m, p) = (&me.gens, &peer.gens);
    let up = DiskState::UpToDate;
    // R16's tie-break between equals: the Primary; else the side that did
    // not volunteer to discard its data (a node the witness holds
    // outdated does, R25); else the lower name.
    let i_win = || match (me.role, peer.role) {
        (Role::Primary, Role::Secondary) => true,
        (Role::Secondary, Role::Primary) => false,
        _ => match (m.discard_my_data, p.discard_my_data) {
            (false, true) => true,
            (true, false) => false,
            _ => me.name < peer.name,
        },
    };
    // Generation 0: a replica created Inconsistent, holding no data yet.
    let d = if m.current == 0 || p.current == 0 {
        match (m.current == 0, p.current == 0) {
            (false, true) => Decision::Source { full: true },
            (true, false) => Decision::Target { full: true },
            _ => Decision::NoUpToDate,
        }
    } else if m.current == p.current {
        let clean = m.dirty_bits == 0 && p.dirty_bits == 0;
        match (me.disk == up, peer.disk == up) {
            (true, true) if clean => Decision::InSync,
            (true, true) if i_win() => Decision::Source { full: false },
            (true, true) => Decision::Target { full: false },
            (true, false) => Decision::Source { full: clean },
            (false, true) => Decision::Target { full: clean },
            (false, false) => Decision::NoUpToDate,
        }
    } else {
        // The generations the peer may hold for a bitmap to be a valid
        // base: the one this node diverged from, and every one between it
        // and the last the peer confirmed (it may not have persisted the
        // newest it was sent).
        let base = |g: &HelloGens, cur: u64| {
            if g.bitmap_gen == 0 || cur == 0 {
                return false;
            }
            if g.bitmap_gen == cur || g.bitmap_alt == cur {
                return true;
            }
            let (Some(from), Some(to)) = (
                g.history.iter().position(|h| *h == g.bitmap_gen),
                g.history
                    .iter()
                    .position(|h| *h == g.bitmap_alt && g.bitmap_alt != 0),
            ) else {
                return false;
            };
            from < to && g.history[from..=to].contains(&cur)
        };
        let i_src = base(m, p.current);
        let p_src = base(p, m.current);
        match (i_src, p_src) {
            (true, false) => Decision::Source { full: false },
            (false, true) => Decision::Target { full: false },
            (true, true) => Decision::SplitBrain,
            (false, false) => {
                let i_hist = p.current != 0 && m.history.contains(&p.current);
                let p_hist = m.current != 0 && p.history.contains(&m.current);
                let known = |g: &HelloGens| {
                    std::iter::once(g.bitmap_gen)
                        .chain(g.history)
                        .filter(|x| *x != 0)
                        .collect::<Vec<_>>()
                };
                let (km, kp) = (known(m), known(p));
                let shared = km.iter().any(|x| kp.contains(x));
                if m.bitmap_gen != 0 && m.bitmap_gen == p.bitmap_gen {
                    Decision::SplitBrain
                } else if i_hist && !p_hist {
                    Decision::Source { full: true }
                } else if p_hist && !i_hist {
                    Decision::Target { full: true }
                } else if shared || (i_hist && p_hist) {
                    Decision::SplitBrain
                } else {
                    Decision::Unrelated
                }
            }
        }
    };
    let d = if d == Decision::SplitBrain {
        resolve_split_brain(m, p).unwrap_or(d)
    } else {
        d
    };
    match d {
        Decision::Source { .. } if me.disk != up => Decision::NoUpToDate,
        Decision::Target { .. } if peer.disk != up => Decision::NoUpToDate,
        Decision::Source { .. } if peer.role == Role::Primary => Decision::TargetIsPrimary,
        Decision::Target { .. } if me.role == Role::Primary => Decision::TargetIsPrimary,
        Decision::Source { .. } if me.role != Role::Primary => Decision::SourceWaits,
        Decision::Target { .. } if peer.role != Role::Primary => Decision::TargetWaits,
        d => d,
    }
}

/// Resolves a split brain (R24) if one side volunteered to discard its data
/// or both sides name the same automatic policy and it picks a side;
/// `None` leaves it a split brain. The side discarding its data is the
/// target; the resync is bitmap-based when both bitmaps count from a common
/// generation (their union then covers every chunk either side changed),
/// full otherwise.
fn resolve_split_brain(m: &HelloGens, p: &HelloGens) -> Option<Decision> {
    let i_lose = match (m.discard_my_data, p.discard_my_data) {
        (true, false) => true,
        (false, true) => false,
        (true, true) => return None,
        (false, false) if m.split_brain_policy != p.split_brain_policy => return None,
        (false, false) => match m.split_brain_policy {
            SplitBrainPolicy::Disconnect => return None,
            SplitBrainPolicy::DiscardZeroChanges => match (m.dirty_bits, p.dirty_bits) {
                (0, x) if x != 0 => true,
                (x, 0) if x != 0 => false,
                _ => return None,
            },
            SplitBrainPolicy::DiscardLeastChanges => match m.dirty_bits.cmp(&p.dirty_bits) {
                std::cmp::Ordering::Less => true,
                std::cmp::Ordering::Greater => false,
                std::cmp::Ordering::Equal => return None,
            },
            SplitBrainPolicy::DiscardYoungerPrimary => {
                if m.primary_since == 0 || p.primary_since == 0 {
                    return None;
                }
                match m.primary_since.cmp(&p.primary_since) {
                    std::cmp::Ordering::Greater => true,
                    std::cmp::Ordering::Less => false,
                    std::cmp::Ordering::Equal => return None,
                }
            }
        },
    };
    let bases = |g: &HelloGens| [g.bitmap_gen, g.bitmap_alt].into_iter().filter(|x| *x != 0);
    let common = bases(m).any(|x| bases(p).any(|y| y == x));
    let full = !common;
    Some(if i_lose {
        Decision::Target { full }
    } else {
        Decision::Source { full }
    })
}

/// Which metadata block a change dirtied (the record regardless of copy).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum MetaKey {
    Record,
    Al,
    Page { slot: u8, page: u64 },
}

#[derive(Debug, Clone, Default)]
struct KeyState {
    /// Version of the last in-memory change.
    changed_at: u64,
    /// Version of the content last written durably.
    written_upto: u64,
    /// Version of the content being written.
    in_flight: Option<u64>,
    /// The last write failed; not retried until the next change.
    failed: bool,
}

/// Tracks which metadata changes are durable. Every change bumps a version;
/// "version v is durable" means every change made up to v is on disk.
#[derive(Debug, Clone, Default)]
pub(crate) struct MetaTracker {
    version: u64,
    keys: BTreeMap<MetaKey, KeyState>,
}

impl MetaTracker {
    pub(crate) fn touch(&mut self, key: MetaKey) -> u64 {
        self.version += 1;
        let k = self.keys.entry(key).or_default();
        k.changed_at = self.version;
        k.failed = false;
        self.version
    }

    pub(crate) fn durable(&self, v: u64) -> bool {
        self.keys
            .values()
            .all(|k| k.written_upto >= v || k.changed_at <= k.written_upto)
    }

    /// [`MetaTracker::durable`], ignoring the block `except`.
    fn durable_except(&self, v: u64, except: MetaKey) -> bool {
        self.keys
            .iter()
            .all(|(key, k)| *key == except || k.written_upto >= v || k.changed_at <= k.written_upto)
    }

    /// A change up to `v` cannot be made durable (its write failed).
    pub(crate) fn failed(&self, v: u64) -> bool {
        self.keys
            .values()
            .any(|k| k.failed && k.written_upto < v && k.changed_at > k.written_upto)
    }

    fn to_write(&self) -> Vec<MetaKey> {
        self.keys
            .iter()
            .filter(|(_, k)| k.changed_at > k.written_upto && k.in_flight.is_none() && !k.failed)
            .map(|(key, _)| *key)
            .collect()
    }

    fn issued(&mut self, key: MetaKey) {
        let v = self.version;
        if let Some(k) = self.keys.get_mut(&key) {
            k.in_flight = Some(v);
        }
    }

    fn done(&mut self, key: MetaKey, ok: bool) {
        let Some(k) = self.keys.get_mut(&key) else {
            return;
        };
        let v = k.in_flight.take().unwrap_or(0);
        if ok {
            k.written_upto = k.written_upto.max(v);
            if k.changed_at <= k.written_upto {
                self.keys.remove(&key);
            }
        } else {
            k.failed = true;
        }
    }

    /// Forgets every change not yet durable (the disk is detached: there
    /// is nothing to write them to). Returns whether there were any.
    pub(crate) fn forget(&mut self) -> bool {
        let any = !self.keys.is_empty();
        self.keys.clear();
        any
    }

    /// A bitmap page write is in flight.
    pub(crate) fn page_in_flight(&self) -> bool {
        self.keys
            .iter()
            .any(|(key, k)| matches!(key, MetaKey::Page { .. }) && k.in_flight.is_some())
    }

    /// Nothing waits to be written or is being written.
    pub(crate) fn is_idle(&self) -> bool {
        self.keys.is_empty()
    }
}

pub(crate) fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Seeds the generation generator from the driver's seed and the node name,
/// so two nodes never draw the same ids even from the same seed.
pub(crate) fn seed_for(seed: u64, name: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    seed ^ h
}

/// Why an activity-log extent may not be evicted yet (R20): a Primary
/// that crashes must find in its log every extent where a replica may lack
/// a write another has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AlHold {
    /// Nothing: it may go (after a local flush).
    Free,
    /// A request there is in flight.
    Request,
    /// A connected peer acknowledged a write there but has not flushed it.
    PeerUnflushed,
    /// A peer lost while holding unflushed writes there.
    LostPeer,
}

/// Most bytes one resync read covers.
const RESYNC_RUN: u64 = 1 << 20;
/// Most resync reads plus frames in flight per peer.
const RESYNC_WINDOW: usize = 16;
/// The same while frontend requests are in flight (adaptive mode).
const RESYNC_WINDOW_BUSY: usize = 2;

impl Replica {
    /// A fresh generation id (never 0 or the initial one).
    pub(crate) fn next_gen(&mut self) -> u64 {
        loop {
            let g = splitmix(&mut self.rng);
            if g > crate::meta::INITIAL_GENERATION {
                return g;
            }
        }
    }

    pub(crate) fn slot(&self, peer: PeerId) -> usize {
        self.slots[peer.0 as usize]
    }

    fn touch_record(&mut self) -> u64 {
        self.mt.touch(MetaKey::Record)
    }

    fn touch_pages(&mut self, peer: PeerId, pages: Option<(u64, u64)>) -> u64 {
        let mut v = 0;
        if let Some((a, b)) = pages {
            let slot = self.slot(peer) as u8;
            for page in a..b {
                v = self.mt.touch(MetaKey::Page { slot, page });
            }
        }
        v
    }

    /// Persists a disk-state change (UpToDate, Outdated, Inconsistent).
    pub(crate) fn persist_disk(&mut self, disk: DiskState) -> u64 {
        if matches!(
            disk,
            DiskState::UpToDate | DiskState::Outdated | DiskState::Inconsistent
        ) && self.meta.disk != disk
        {
            self.meta.disk = disk;
            return self.touch_record();
        }
        0
    }

    /// Emits writes for every metadata block changed and not being written.
    pub(crate) fn meta_flush(&mut self) -> bool {
        if self.mt.is_idle() {
            // The common case on the write path: nothing to persist.
            return false;
        }
        let mut keys = self.mt.to_write();
        if self.grow_holds_pages() {
            // R29: a growth may move the bitmap slots on disk.
            keys.retain(|k| !matches!(k, MetaKey::Page { .. }));
        }
        if !self.mt.durable_except(self.al_guard, MetaKey::Al) {
            // Crash recovery marked the old log's extents in the bitmaps:
            // the log is rewritten only once those bits are durable.
            keys.retain(|k| *k != MetaKey::Al);
        }
        if (self.al_flush_needed || self.al_flush_in_flight) && keys.contains(&MetaKey::Al) {
            // R20: a log that no longer names an extent is written only
            // after a local flush has made the writes completed in that
            // extent durable; otherwise a crash could lose them from this
            // disk while the log no longer says the extent needs a resync.
            keys.retain(|k| *k != MetaKey::Al);
            if !self.al_flush_in_flight {
                self.al_flush_needed = false;
                self.al_flush_in_flight = true;
                self.new_io(IoOwner::AlFlush, Op::Flush);
            }
        }
        let any = !keys.is_empty();
        for key in keys {
            let (at, data) = match key {
                MetaKey::Al => {
                    self.al_seq += 1;
                    let copy = self.next_al_copy;
                    self.next_al_copy ^= 1;
                    let al = crate::meta::ActivityLog {
                        seq: self.al_seq,
                        extents: self.al.keys().copied().collect(),
                    };
                    (
                        MetaAt::ActivityLog(copy),
                        Bytes::copy_from_slice(&al.encode()),
                    )
                }
                MetaKey::Record => {
                    self.meta.seq += 1;
                    let copy = self.next_copy;
                    self.next_copy ^= 1;
                    (
                        MetaAt::Record(copy),
                        Bytes::copy_from_slice(&self.meta.encode()),
                    )
                }
                MetaKey::Page { slot, page } => {
                    let data = match self.slots.iter().position(|s| *s == slot as usize) {
                        Some(p) => self.bitmaps[p].page_bytes(page),
                        None => vec![0; crate::meta::PAGE_SIZE],
                    };
                    (MetaAt::BitmapPage { slot, page }, Bytes::from(data))
                }
            };
            self.mt.issued(key);
            let io = IoId(self.next_io);
            self.next_io += 1;
            self.ios.insert(io, IoOwner::Meta(key));
            self.out.push_back(Output::MetaWrite { io, at, data });
        }
        any
    }

    pub(crate) fn on_meta_done(&mut self, key: MetaKey, result: Result<(), i32>) {
        self.mt.done(key, result.is_ok());
    }

    /// Starts a new generation if one of `peers` has no bitmap generation
    /// yet (it was in sync): from now on this node's data differs from
    /// theirs. Returns the metadata version to wait for (0: no change).
    pub(crate) fn diverge_from(&mut self, peers: PeerSet, reason: OutdatedReason) -> u64 {
        if self.cfg.diskless {
            // R28: a diskless client has no data to diverge; its writes
            // fail unless every peer acknowledged them.
            return 0;
        }
        let fresh: Vec<PeerId> = peers
            .iter()
            .filter(|p| !self.is_client_peer(*p))
            .filter(|p| self.meta.peers[self.slot(*p)].bitmap_gen == 0)
            .collect();
        if fresh.is_empty() {
            return 0;
        }
        let old = self.meta.current;
        for p in &fresh {
            let s = self.slot(*p);
            self.meta.peers[s].bitmap_gen = old;
            let confirmed = self.peers[p.0 as usize].confirmed_gen;
            self.meta.peers[s].bitmap_alt = if confirmed != old { confirmed } else { 0 };
            self.event(Event::PeerOutdated { peer: *p, reason });
        }
        self.meta.history.rotate_right(1);
        self.meta.history[0] = old;
        self.meta.current = self.next_gen();
        let current = self.meta.current;
        let history = self.meta.history;
        self.event(Event::NewGeneration { current });
        // Peers still in sync share the new generation (a sync target gets
        // it in SyncDone; one that got SyncDone already gets it now).
        for i in 0..self.peers.len() {
            let p = &self.peers[i];
            if p.replicating()
                && !matches!(p.sync, PeerSync::Source(_))
                && !peers.contains(PeerId(i as u8))
            {
                let boundary = self.next_seq;
                self.peers[i].gen_unconfirmed.push_back((boundary, current));
                self.send(PeerId(i as u8), Frame::Generation { current, history });
            }
        }
        self.touch_record()
    }

    /// Marks bytes `[start, end)` as missed by `peers`. Returns the metadata
    /// version that must be durable before the write may proceed (0: none).
    pub(crate) fn mark_missed(
        &mut self,
        peers: PeerSet,
        (start, end): (u64, u64),
        reason: OutdatedReason,
    ) -> u64 {
        let mut v = self.diverge_from(peers, reason);
        if self.cfg.diskless {
            return v;
        }
        let holders: Vec<PeerId> = peers.iter().filter(|p| !self.is_client_peer(*p)).collect();
        for p in holders {
            let bm = &mut self.bitmaps[p.0 as usize];
            let (a, b) = bm.bits_of(start, end);
            let pages = bm.set_bits(a, b);
            v = v.max(self.touch_pages(p, pages));
        }
        v
    }

    /// Bits wholly inside `[start, end)`.
    fn bits_inside(&self, peer: PeerId, start: u64, end: u64) -> (u64, u64) {
        let bm = &self.bitmaps[peer.0 as usize];
        let c = bm.chunk();
        let first = start.div_ceil(c);
        let last = if end >= self.cfg.size {
            bm.len()
        } else {
            end / c
        };
        (first, last.max(first))
    }

    /// A write the peer acknowledged during a resync makes whole chunks it
    /// covers identical: their bits need no resync.
    pub(crate) fn clear_synced_by_write(&mut self, peer: PeerId, range: (u64, u64)) {
        if !matches!(self.peers[peer.0 as usize].sync, PeerSync::Source(_)) {
            return;
        }
        let (a, b) = self.bits_inside(peer, range.0, range.1);
        let pages = self.bitmaps[peer.0 as usize].clear_bits(a, b);
        self.touch_pages(peer, pages);
    }

    /// What this node tells `peer` in its Hello.
    pub(crate) fn hello_gens(&self, peer: PeerId) -> HelloGens {
        HelloGens {
            current: self.meta.current,
            bitmap_gen: self.meta.peers[self.slot(peer)].bitmap_gen,
            bitmap_alt: self.meta.peers[self.slot(peer)].bitmap_alt,
            history: self.meta.history,
            dirty_bits: self.bitmaps[peer.0 as usize].count(),
            chunk: self.cfg.bitmap_chunk,
            instance: self.instance,
            discard_my_data: self.discard_my_data,
            split_brain_policy: self.cfg.after_split_brain,
            primary_since: self.primary_since,
        }
    }

    /// Acts on the handshake decision once the peer is Connected.
    pub(crate) fn start_sync(&mut self, peer: PeerId, d: Decision, theirs: &HelloGens) {
        let peer_instance = theirs.instance;
        let i = peer.0 as usize;
        let restarted = self.peers[i].instance.is_some_and(|x| x != peer_instance);
        self.peers[i].instance = Some(peer_instance);
        let mut lost = self.peers[i].lost_unflushed.take();
        if !restarted {
            // Same process: what it had not flushed is still unflushed there.
            if let Some(l) = lost.take() {
                for (a, b) in l.runs() {
                    self.peers[i].unflushed.cur.set_bits(a, b);
                }
            }
        }
        match d {
            Decision::Source { full } => {
                let bm = &mut self.bitmaps[i];
                let mut pages = None;
                if full {
                    pages = bm.set_all();
                    // Every bit counts from the peer's generation on: an
                    // interrupted full sync resumes as a bitmap-based one.
                    let s = self.slots[i];
                    if self.meta.peers[s].bitmap_gen != theirs.current {
                        self.meta.peers[s].bitmap_gen = theirs.current;
                        self.meta.peers[s].bitmap_alt = 0;
                        self.mt.touch(MetaKey::Record);
                    }
                } else if let Some(lost) = lost {
                    // The peer restarted: writes it acknowledged but had not
                    // flushed may be gone.
                    let ext = lost.chunk();
                    for (a, b) in lost.runs() {
                        let (x, y) = bm.bits_of(a * ext, b * ext);
                        if let Some((p, q)) = bm.set_bits(x, y) {
                            pages = Some(match pages {
                                None => (p, q),
                                Some((pp, qq)) => (p.min(pp), q.max(qq)),
                            });
                        }
                    }
                }
                self.touch_pages(peer, pages);
                self.peers[i].sync = PeerSync::Source(Source {
                    awaiting_bits: true,
                    next_id: 1,
                    started: self.now,
                    ..Source::default()
                });
            }
            Decision::Target { full: _ } => {
                self.peers[i].sync = PeerSync::Target { received: 0 };
                let v = self.persist_disk(DiskState::Inconsistent);
                self.target_wait = self.target_wait.max(v);
                self.set_disk(DiskState::Inconsistent);
                let runs = self.bitmaps[i].runs();
                let mut chunks = runs.chunks(MAX_SYNC_RANGES).peekable();
                if chunks.peek().is_none() {
                    self.send(
                        peer,
                        Frame::SyncBits {
                            ranges: Vec::new(),
                            last: true,
                        },
                    );
                }
                while let Some(c) = chunks.next() {
                    let last = chunks.peek().is_none();
                    self.send(
                        peer,
                        Frame::SyncBits {
                            ranges: c.to_vec(),
                            last,
                        },
                    );
                }
                self.event(Event::SyncStarted {
                    peer,
                    role: SyncRole::Target,
                    bytes: 0,
                });
            }
            Decision::InSync => {
                // Same generation, no bits: whatever this node remembered
                // about the peer's divergence (e.g. a SyncDone it never
                // heard confirmed) is settled.
                let s = self.slots[i];
                if self.meta.peers[s].bitmap_gen != 0 && self.bitmaps[i].count() == 0 {
                    self.meta.peers[s].bitmap_gen = 0;
                    self.meta.peers[s].bitmap_alt = 0;
                    self.mt.touch(MetaKey::Record);
                }
            }
            Decision::SourceWaits => self.peers[i].sync_deferred = true,
            Decision::TargetWaits => {
                self.peers[i].sync_deferred = true;
                // A Primary this node is in sync with knows better than a
                // Secondary peer: only without one does it hold itself
                // Outdated.
                let in_sync_with_primary = self.peers.iter().any(|p| {
                    p.conn == ConnState::Connected
                        && p.role == Some(Role::Primary)
                        && matches!(p.sync, PeerSync::None)
                        && p.disk == Some(DiskState::UpToDate)
                });
                if self.disk == DiskState::UpToDate && !in_sync_with_primary {
                    self.set_disk(DiskState::Outdated);
                }
            }
            _ => {}
        }
    }

    /// After a promotion: re-run the handshake with peers whose resync
    /// waited for a Primary.
    pub(crate) fn restart_deferred_syncs(&mut self) {
        for i in 0..self.peers.len() {
            if self.peers[i].sync_deferred && self.peers[i].conn == ConnState::Connected {
                self.disconnect(
                    PeerId(i as u8),
                    "promoted: reconnecting to resync the peer".into(),
                );
            }
        }
    }

    pub(crate) fn on_sync_bits(&mut self, peer: PeerId, ranges: Vec<(u64, u64)>, last: bool) {
        let i = peer.0 as usize;
        if !matches!(&self.peers[i].sync, PeerSync::Source(s) if s.awaiting_bits) {
            return self.violation(peer, "SyncBits while not expecting them");
        }
        let nbits = self.bitmaps[i].len();
        if ranges.iter().any(|(_, b)| *b > nbits) {
            return self.violation(peer, "SyncBits beyond the end of the volume");
        }
        for (a, b) in ranges {
            let pages = self.bitmaps[i].set_bits(a, b);
            self.touch_pages(peer, pages);
        }
        if last {
            let total = self.bitmaps[i].dirty_bytes();
            if let PeerSync::Source(s) = &mut self.peers[i].sync {
                s.awaiting_bits = false;
                s.total = total;
            }
            self.event(Event::SyncStarted {
                peer,
                role: SyncRole::Source,
                bytes: total,
            });
        }
    }

    /// Bytes of resync in flight towards any peer overlapping `range`.
    pub(crate) fn resync_overlaps(&self, range: (u64, u64)) -> bool {
        self.peers.iter().enumerate().any(|(i, p)| match &p.sync {
            PeerSync::Source(s) => s.runs_in_flight().any(|(a, b)| {
                let (x, y) = self.bitmaps[i].byte_range(a, b);
                x < range.1 && range.0 < y
            }),
            _ => false,
        })
    }

    fn busy_range(&self, (x, y): (u64, u64)) -> bool {
        let hit = |r: Option<(u64, u64)>| r.is_some_and(|(s, e)| s < y && x < e);
        self.requests.values().any(|r| hit(r.range)) || self.applies.values().any(|a| hit(a.range))
    }

    /// Starts resync reads while the window allows; sends SyncDone when
    /// every bit is synced. Returns whether anything happened.
    pub(crate) fn pump_resync(&mut self) -> bool {
        let mut changed = false;
        for i in 0..self.peers.len() {
            let peer = PeerId(i as u8);
            while let PeerSync::Source(s) = &self.peers[i].sync {
                // R21: adaptive mode yields to frontend I/O; a fixed rate
                // spaces the reads out.
                let window = if self.cfg.resync_adaptive && !self.requests.is_empty() {
                    RESYNC_WINDOW_BUSY
                } else {
                    RESYNC_WINDOW
                };
                let rate = self.cfg.resync_rate;
                if s.awaiting_bits
                    || s.in_flight() >= window
                    || (rate > 0 && s.next_start > self.now)
                {
                    break;
                }
                let bm = &self.bitmaps[i];
                // With a fixed rate, runs of about 50 ms worth keep it smooth.
                let run = if rate > 0 {
                    RESYNC_RUN.min((rate / 20).max(bm.chunk()))
                } else {
                    RESYNC_RUN
                };
                let max_bits = (run / bm.chunk()).max(1);
                let in_flight: Vec<(u64, u64)> = s.runs_in_flight().collect();
                // The next run not already in flight, from the cursor, then
                // once more from the start.
                let mut cursor = s.cursor;
                let mut wrapped = cursor == 0;
                let found = loop {
                    match bm.next_run(cursor, max_bits) {
                        None if wrapped => break None,
                        None => {
                            cursor = 0;
                            wrapped = true;
                        }
                        Some((a, b)) => {
                            let end = in_flight
                                .iter()
                                .filter(|(x, y)| *x < b && a < *y)
                                .map(|(_, y)| *y)
                                .max();
                            match end {
                                Some(e) => cursor = e.max(a + 1),
                                None => break Some((a, b)),
                            }
                        }
                    }
                };
                let Some((a, b)) = found else {
                    if in_flight.is_empty() && bm.count() == 0 {
                        self.peers[i].sync = PeerSync::SourceDone {
                            done: s.done,
                            compared: s.compared,
                            identical: s.identical,
                        };
                        self.peers[i].sync_done_gen = Some(self.meta.current);
                        self.peers[i].gen_unconfirmed.clear();
                        let f = Frame::SyncDone {
                            current: self.meta.current,
                            history: self.meta.history,
                        };
                        self.send(peer, f);
                        changed = true;
                    }
                    break;
                };
                let (x, y) = bm.byte_range(a, b);
                if self.busy_range((x, y)) {
                    // A write to this region is in flight; it goes first.
                    break;
                }
                let io = IoId(self.next_io);
                self.next_io += 1;
                let epoch = self.peers[i].epoch;
                self.ios.insert(io, IoOwner::ResyncRead { peer, epoch });
                let now = self.now;
                let checksums = self.cfg.resync_checksums;
                if let PeerSync::Source(s) = &mut self.peers[i].sync {
                    let id = s.next_id;
                    s.next_id += 1;
                    s.reads.insert(io, (id, a, b));
                    s.cursor = b;
                    if checksums && y - x <= MAX_VERIFY_LEN {
                        // R26: ask for the target's digests while reading.
                        s.csum.insert(
                            id,
                            CsumRun {
                                first: a,
                                last: b,
                                ..CsumRun::default()
                            },
                        );
                        self.out.push_back(Output::Send {
                            peer,
                            frame: Frame::ResyncDigestRequest {
                                id,
                                offset: x,
                                len: y - x,
                            },
                        });
                    }
                    if rate > 0 {
                        let nanos = u128::from(y - x) * 1_000_000_000 / u128::from(rate);
                        // A token bucket with 100 ms of burst: a late
                        // timer catches up, an idle spell does not bank.
                        let floor = Time::from_nanos(now.as_nanos().saturating_sub(100_000_000));
                        s.next_start = s.next_start.max(floor)
                            + std::time::Duration::from_nanos(
                                u64::try_from(nanos).unwrap_or(u64::MAX),
                            );
                    }
                }
                self.out.push_back(Output::Read {
                    io,
                    offset: x,
                    len: y - x,
                });
                changed = true;
            }
        }
        changed
    }

    pub(crate) fn on_read_done(&mut self, io: IoId, result: Result<Bytes, i32>) {
        if matches!(
            self.ios.get(&io),
            Some(IoOwner::VerifyRead { .. } | IoOwner::VerifyServe { .. })
        ) {
            return self.on_verify_read_done(io, result);
        }
        let Some(IoOwner::ResyncRead { peer, epoch }) = self.ios.remove(&io) else {
            return;
        };
        let i = peer.0 as usize;
        if self.peers[i].epoch != epoch {
            return;
        }
        let PeerSync::Source(s) = &mut self.peers[i].sync else {
            return;
        };
        let Some((id, a, b)) = s.reads.remove(&io) else {
            return;
        };
        let (x, y) = self.bitmaps[i].byte_range(a, b);
        let data = match result {
            Ok(d) if d.len() as u64 == y - x => d,
            other => {
                let errno = other.err().unwrap_or(errno::EIO);
                self.event(Event::LocalIoError { errno });
                return self.disconnect(peer, "resync read from the local disk failed".into());
            }
        };
        if let PeerSync::Source(s) = &mut self.peers[i].sync {
            if let Some(run) = s.csum.get_mut(&id) {
                run.data = Some(data);
                return self.csum_compare(peer, id);
            }
        }
        // Split the run at chunk boundaries into all-zero and data pieces:
        // zero pieces travel without payload (an initial sync of a mostly
        // empty volume moves little data).
        let chunk = self.bitmaps[i].chunk();
        let zero_at = |bit: u64| {
            let s = ((bit - a) * chunk) as usize;
            let e = (((bit + 1 - a) * chunk) as usize).min(data.len());
            data[s..e].iter().all(|&c| c == 0)
        };
        let mut first = a;
        let mut pieces = Vec::new();
        while first < b {
            let zero = zero_at(first);
            let mut last = first + 1;
            while last < b && zero_at(last) == zero {
                last += 1;
            }
            pieces.push((first, last, zero));
            first = last;
        }
        for (n, (p, q, zero)) in pieces.into_iter().enumerate() {
            let piece_id = match &mut self.peers[i].sync {
                PeerSync::Source(_) if n == 0 => id,
                PeerSync::Source(s) => {
                    s.next_id += 1;
                    s.next_id - 1
                }
                _ => return,
            };
            if let PeerSync::Source(s) = &mut self.peers[i].sync {
                s.sent.insert(piece_id, (p, q));
            }
            let (ps, pe) = self.bitmaps[i].byte_range(p, q);
            let f = if zero {
                Frame::ResyncZeroes {
                    id: piece_id,
                    offset: ps,
                    len: pe - ps,
                }
            } else {
                Frame::ResyncData {
                    id: piece_id,
                    offset: ps,
                    data: data.slice((ps - x) as usize..(pe - x) as usize),
                }
            };
            self.send(peer, f);
        }
    }

    pub(crate) fn on_resync_ack(&mut self, peer: PeerId, id: u64, status: u32) {
        let i = peer.0 as usize;
        let PeerSync::Source(s) = &mut self.peers[i].sync else {
            return self.violation(peer, "ResyncAck without a resync");
        };
        if let Some((run, bytes)) = s.csum_pieces.remove(&id) {
            if status != 0 {
                return self.disconnect(
                    peer,
                    format!("peer failed to write resync data (errno {status})"),
                );
            }
            s.done += bytes;
            let Some(r) = s.csum.get_mut(&run) else {
                return;
            };
            r.pieces = r.pieces.saturating_sub(1);
            if r.pieces == 0 {
                let (a, b) = (r.first, r.last);
                s.csum.remove(&run);
                let pages = self.bitmaps[i].clear_bits(a, b);
                self.touch_pages(peer, pages);
            }
            return;
        }
        let Some((a, b)) = s.sent.remove(&id) else {
            return self.violation(peer, "ResyncAck for a frame it was not sent");
        };
        if status != 0 {
            return self.disconnect(
                peer,
                format!("peer failed to write resync data (errno {status})"),
            );
        }
        let (x, y) = self.bitmaps[i].byte_range(a, b);
        s.done += y - x;
        let pages = self.bitmaps[i].clear_bits(a, b);
        self.touch_pages(peer, pages);
    }

    /// The sync target adopted our data: forget its bitmap generation.
    pub(crate) fn on_peer_up_to_date(&mut self, peer: PeerId) {
        let i = peer.0 as usize;
        if let PeerSync::SourceDone {
            done,
            compared,
            identical,
        } = self.peers[i].sync
        {
            self.peers[i].sync = PeerSync::None;
            if let Some(g) = self.peers[i].sync_done_gen.take() {
                self.peers[i].confirmed_gen = g;
            }
            if self.bitmaps[i].count() == 0 {
                let s = self.slot(peer);
                if self.meta.peers[s].bitmap_gen != 0 {
                    self.meta.peers[s].bitmap_gen = 0;
                    self.touch_record();
                }
            }
            if compared > 0 {
                self.event(Event::SyncChecksums {
                    peer,
                    compared_bytes: compared,
                    identical_bytes: identical,
                });
            }
            self.event(Event::SyncFinished {
                peer,
                role: SyncRole::Source,
                bytes: done,
            });
        }
    }

    /// Target: every resync write and every earlier write is durable (the
    /// SyncDone apply flushed); adopt the source's generations.
    pub(crate) fn adopt_sync(&mut self, peer: PeerId, current: u64, history: History) {
        let i = peer.0 as usize;
        let received = match self.peers[i].sync {
            PeerSync::Target { received } => received,
            _ => return,
        };
        let (current, history) = self.peers[i]
            .pending_gen
            .take()
            .unwrap_or((current, history));
        self.meta.current = current;
        self.meta.history = history;
        let s = self.slot(peer);
        self.meta.peers[s].bitmap_gen = 0;
        let pages = self.bitmaps[i].clear_bits(0, u64::MAX);
        self.touch_pages(peer, pages);
        self.meta.disk = DiskState::UpToDate;
        let v = self.touch_record();
        self.uptodate_at = Some((peer, v, received));
    }

    /// Target: claims UpToDate once the adopted record is durable.
    pub(crate) fn finish_target(&mut self) -> bool {
        let Some((peer, v, received)) = self.uptodate_at else {
            return false;
        };
        if !self.mt.durable(v) {
            return false;
        }
        self.uptodate_at = None;
        self.discard_my_data = false;
        let i = peer.0 as usize;
        if matches!(self.peers[i].sync, PeerSync::Target { .. }) {
            self.peers[i].sync = PeerSync::None;
        }
        self.event(Event::SyncFinished {
            peer,
            role: SyncRole::Target,
            bytes: received,
        });
        self.set_disk(DiskState::UpToDate);
        true
    }

    /// An in-sync Primary peer started a new generation: share it.
    pub(crate) fn on_generation(&mut self, peer: PeerId, current: u64, history: History) {
        let i = peer.0 as usize;
        let p = &self.peers[i];
        if p.role != Some(Role::Primary)
            || matches!(p.sync, PeerSync::Source(_) | PeerSync::SourceDone { .. })
        {
            return self.violation(
                peer,
                "Generation from a peer that is not an in-sync Primary",
            );
        }
        if let PeerSync::Target { .. } = p.sync {
            if self.uptodate_at.is_some_and(|(q, _, _)| q == peer) {
                // SyncDone adopted already; the claim waits for the record.
                self.meta.current = current;
                self.meta.history = history;
                self.gen_wait = self.touch_record();
            } else {
                // Adopted together with the SyncDone that precedes... or
                // follows: SyncDone carries the source's generation at
                // the time it was sent, this one is newer.
                self.peers[i].pending_gen = Some((current, history));
            }
            return;
        }
        if self.disk == DiskState::UpToDate && self.meta.current != current {
            self.meta.current = current;
            self.meta.history = history;
            // Nothing sent after it is acknowledged before it is durable,
            // so the Primary can tell which generation this node holds.
            self.gen_wait = self.touch_record();
        }
    }

    /// Bytes the peer may lack according to the bitmap.
    pub(crate) fn bitmap_bytes(&self, peer: PeerId) -> u64 {
        self.bitmaps[peer.0 as usize].dirty_bytes()
    }

    /// Whether this node holds writes the peer lacks.
    pub(crate) fn holds_outdated(&self, peer: PeerId) -> bool {
        self.meta.peers[self.slot(peer)].bitmap_gen != 0
            || self.bitmaps[peer.0 as usize].count() > 0
    }

    /// Activity log (R20): makes the extents of `range` hot before a
    /// frontend write to them starts. Returns the metadata version to wait
    /// for (0: already hot), or `None` when the log is full of extents
    /// with writes in flight (the request waits).
    pub(crate) fn al_admit(&mut self, seq: u64, (start, end): (u64, u64)) -> Option<u64> {
        let ext = self.cfg.extent_size;
        let (first, last) = (start / ext, end.saturating_sub(1) / ext);
        self.al_clock += 1;
        let clock = self.al_clock;
        let mut missing = Vec::new();
        // An extent added for an earlier request may not be durable yet.
        let mut wait = 0;
        for e in first..=last {
            match self.al.get_mut(&e) {
                Some((t, v)) => {
                    *t = clock;
                    wait = wait.max(*v);
                }
                None => missing.push(e),
            }
        }
        if missing.is_empty() {
            return Some(wait);
        }
        // A request wider than the log gets the log to itself.
        let room = self
            .cfg
            .al_extents
            .max(usize::try_from(last - first + 1).unwrap_or(usize::MAX));
        while self.al.len() + missing.len() > room {
            // Never one of the extents this request needs (it may hold
            // some of them already).
            let own = |e: u64| (first..=last).contains(&e);
            let victim = self
                .al
                .iter()
                .filter(|(e, _)| !own(**e) && self.al_hold(**e, seq) == AlHold::Free)
                .min_by_key(|(_, (t, _))| *t)
                .map(|(e, _)| *e);
            if let Some(victim) = victim {
                self.al.remove(&victim);
                self.al_flush_needed = true;
                continue;
            }
            // Every extent is held. An extent whose only hold is writes a
            // lost peer had not flushed goes to that peer's bitmap instead
            // (durable before the log that drops it: al_guard).
            let lost = self
                .al
                .iter()
                .filter(|(e, _)| !own(**e) && self.al_hold(**e, seq) == AlHold::LostPeer)
                .min_by_key(|(_, (t, _))| *t)
                .map(|(e, _)| *e);
            if let Some(e) = lost {
                for i in 0..self.peers.len() {
                    let Some(l) = self.peers[i].lost_unflushed.as_mut() else {
                        continue;
                    };
                    if e < l.len() && l.get(e) {
                        l.clear_bits(e, e + 1);
                        self.mark_lost_extents(i, e, e + 1);
                    }
                }
                continue;
            }
            // Writes peers acknowledged but have not flushed: ask them to.
            if self
                .al
                .keys()
                .any(|e| !own(*e) && self.al_hold(*e, seq) == AlHold::PeerUnflushed)
            {
                self.internal_flush();
            }
            return None;
        }
        let v = self.mt.touch(MetaKey::Al);
        for e in missing {
            self.al.insert(e, (clock, v));
        }
        Some(v.max(wait))
    }

    /// Moves the extents lost peers had not flushed to their bitmaps
    /// (R20: before the activity log that covered them is emptied).
    pub(crate) fn mark_lost_unflushed(&mut self) {
        for i in 0..self.peers.len() {
            let Some(l) = self.peers[i].lost_unflushed.take() else {
                continue;
            };
            for (a, b) in l.runs() {
                self.mark_lost_extents(i, a, b);
            }
        }
    }

    /// Marks extents `[first, end)` in peer `i`'s bitmap, durably before
    /// the next activity-log write (R20: a lost peer's unflushed writes).
    fn mark_lost_extents(&mut self, i: usize, first: u64, end: u64) {
        let ext = self.cfg.extent_size;
        let mut only = PeerSet::default();
        only.insert(PeerId(i as u8));
        let range = (first * ext, (end * ext).min(self.cfg.size));
        let v = self.mark_missed(only, range, OutdatedReason::ConnectionLost);
        self.al_guard = self.al_guard.max(v);
    }

    /// What keeps activity-log extent `e` from being evicted (R20).
    /// `seq` is the request being admitted.
    fn al_hold(&self, e: u64, seq: u64) -> AlHold {
        let ext = self.cfg.extent_size;
        let (s, t) = (e * ext, (e + 1) * ext);
        let busy = self.requests.iter().any(|(k, r)| {
            *k != seq
                && (r.al_admitted || r.local != super::write_path::LocalState::NotSubmitted)
                && r.range.is_some_and(|(a, b)| a < t && s < b)
        });
        if busy {
            return AlHold::Request;
        }
        // The peer's unflushed-write tracking uses extent-sized bits.
        let has = |b: &Bitmap| e < b.len() && b.get(e);
        for p in &self.peers {
            if has(&p.unflushed.cur) || p.unflushed.pending.iter().any(|(_, b)| has(b)) {
                return AlHold::PeerUnflushed;
            }
        }
        if self
            .peers
            .iter()
            .any(|p| p.lost_unflushed.as_ref().is_some_and(has))
        {
            return AlHold::LostPeer;
        }
        AlHold::Free
    }

    /// Crash recovery (R20): the extents of the activity log found at
    /// start may hold writes some replica has and another lacks; mark them
    /// for every peer so the next handshake resyncs them.
    pub(crate) fn recover_activity_log(&mut self, extents: &[u64]) {
        if extents.is_empty() {
            return;
        }
        let ext = self.cfg.extent_size;
        let mut v = 0;
        for i in 0..self.peers.len() {
            for e in extents {
                let bm = &mut self.bitmaps[i];
                let (a, b) = bm.bits_of(e * ext, (e + 1) * ext);
                let pages = bm.set_bits(a, b);
                v = v.max(self.touch_pages(PeerId(i as u8), pages));
            }
        }
        self.al_guard = v;
        self.al_clock += 1;
        for e in extents {
            self.al.insert(*e, (0, 0));
        }
        self.event(Event::ActivityLogRecovered {
            extents: extents.len(),
            bytes: extents.len() as u64 * ext,
        });
    }

    /// Empties the activity log (a Secondary has no frontend writes).
    pub(crate) fn clear_activity_log(&mut self) {
        if !self.al.is_empty() {
            self.al.clear();
            self.al_flush_needed = true;
            self.mt.touch(MetaKey::Al);
        }
    }

    /// With a fixed resync rate: when the next resync read may start.
    pub(crate) fn resync_timer(&self) -> Option<Time> {
        if self.cfg.resync_rate == 0 {
            return None;
        }
        self.peers
            .iter()
            .enumerate()
            .filter_map(|(i, p)| match &p.sync {
                PeerSync::Source(s)
                    if !s.awaiting_bits
                        && s.next_start > self.now
                        && self.bitmaps[i].count() > 0 =>
                {
                    Some(s.next_start)
                }
                _ => None,
            })
            .min()
    }

    /// A peer that is Connecting freezes new frontend writes: its Hello
    /// carried this node's generations, which must not move until the
    /// handshake is done.
    pub(crate) fn handshake_in_progress(&self) -> bool {
        self.peers.iter().any(|p| p.conn == ConnState::Connecting)
    }

    /// Sync target (R26): the source asks for the digests of this node's
    /// data in a range before sending it.
    pub(crate) fn on_resync_digest_request(
        &mut self,
        peer: PeerId,
        id: u64,
        offset: u64,
        len: u64,
    ) {
        let i = peer.0 as usize;
        if !matches!(self.peers[i].sync, PeerSync::Target { .. }) {
            return self.violation(peer, "ResyncDigestRequest while not a sync target");
        }
        let bs = u64::from(self.cfg.block_size);
        let end = offset.saturating_add(len);
        if len == 0
            || len > MAX_VERIFY_LEN
            || offset % bs != 0
            || len % bs != 0
            || end > self.cfg.size
        {
            return self.violation(peer, "ResyncDigestRequest outside the volume or misaligned");
        }
        let epoch = self.peers[i].epoch;
        let serving = self
            .ios
            .values()
            .filter(|o| matches!(o, IoOwner::VerifyServe { peer: p, epoch: e, resync: true, .. } if *p == peer && *e == epoch))
            .count();
        if serving >= RESYNC_WINDOW {
            return self.violation(peer, "too many ResyncDigestRequests in flight");
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
                resync: true,
            },
        );
        self.out.push_back(Output::Read { io, offset, len });
    }

    /// Sync source (R26): the target's digests for a run.
    pub(crate) fn on_resync_digest_reply(
        &mut self,
        peer: PeerId,
        id: u64,
        status: u32,
        digests: Vec<u64>,
    ) {
        let i = peer.0 as usize;
        let PeerSync::Source(s) = &mut self.peers[i].sync else {
            return self.violation(peer, "ResyncDigestReply without a resync");
        };
        let Some(run) = s.csum.get_mut(&id) else {
            return self.violation(peer, "ResyncDigestReply for a request it was not sent");
        };
        if run.remote.is_some() || run.pieces > 0 {
            return self.violation(peer, "second ResyncDigestReply for a request");
        }
        if status != 0 {
            return self.disconnect(
                peer,
                format!("peer failed to read its data for a resync checksum (errno {status})"),
            );
        }
        let (x, y) = self.bitmaps[i].byte_range(run.first, run.last);
        if digests.len() as u64 != (y - x).div_ceil(VERIFY_BLOCK) {
            return self.violation(peer, "ResyncDigestReply with the wrong number of digests");
        }
        run.remote = Some(digests);
        self.csum_compare(peer, id);
    }

    /// Sync source (R26): once both this node's data and the target's
    /// digests of a run are in, sends the blocks that differ (whole
    /// `max(4 KiB, block size)` units) and clears the run's bits once they
    /// are acknowledged — at once if every block is identical.
    fn csum_compare(&mut self, peer: PeerId, run_id: u64) {
        let i = peer.0 as usize;
        let unit = VERIFY_BLOCK.max(u64::from(self.cfg.block_size));
        let per = (unit / VERIFY_BLOCK) as usize;
        let PeerSync::Source(s) = &mut self.peers[i].sync else {
            return;
        };
        let Some(run) = s.csum.get_mut(&run_id) else {
            return;
        };
        if run.data.is_none() || run.remote.is_none() {
            return; // The other half is not in yet.
        }
        let (Some(data), Some(remote)) = (run.data.take(), run.remote.take()) else {
            return;
        };
        let (first, last) = (run.first, run.last);
        let (x, y) = self.bitmaps[i].byte_range(first, last);
        let local = super::verify::digests(&data);
        // Differing units, merged into pieces (start, end, all zero) in
        // bytes from `x`.
        let units = (y - x).div_ceil(unit);
        let unit_range = |k: u64| {
            let s = k * unit;
            (s, (s + unit).min(y - x))
        };
        let mut pieces: Vec<(u64, u64, bool)> = Vec::new();
        let mut identical = 0;
        for k in 0..units {
            let (us, ue) = unit_range(k);
            let d = (k as usize * per)..((k as usize + 1) * per).min(local.len());
            if local[d.clone()] == remote[d] {
                identical += ue - us;
                continue;
            }
            let zero = data[us as usize..ue as usize].iter().all(|&c| c == 0);
            match pieces.last_mut() {
                Some((_, pe, z)) if *pe == us && *z == zero => *pe = ue,
                _ => pieces.push((us, ue, zero)),
            }
        }
        s.compared += y - x;
        s.identical += identical;
        if pieces.is_empty() {
            s.csum.remove(&run_id);
            let pages = self.bitmaps[i].clear_bits(first, last);
            self.touch_pages(peer, pages);
            return;
        }
        let mut frames = Vec::with_capacity(pieces.len());
        for (ps, pe, zero) in pieces {
            let id = s.next_id;
            s.next_id += 1;
            s.csum_pieces.insert(id, (run_id, pe - ps));
            frames.push(if zero {
                Frame::ResyncZeroes {
                    id,
                    offset: x + ps,
                    len: pe - ps,
                }
            } else {
                Frame::ResyncData {
                    id,
                    offset: x + ps,
                    data: data.slice(ps as usize..pe as usize),
                }
            });
        }
        if let Some(run) = s.csum.get_mut(&run_id) {
            run.pieces = frames.len();
        }
        for f in frames {
            self.send(peer, f);
        }
    }
}
