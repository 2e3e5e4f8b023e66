//! Replica metadata on disk: the metadata record (generation ids, own disk
//! state, one slot per peer) and the per-peer dirty bitmaps.
//!
//! Both live in the metadata area between the superblocks and the data area
//! (layout in `docs/on-disk-format.md`):
//!
//! ```text
//! 8192               metadata record copy A (4 KiB)
//! 12288              metadata record copy B (4 KiB)
//! 1 MiB              dirty bitmap of slot 0, then slot 1, slot 2
//!                    (each rounded up to 4 KiB pages)
//! data_offset        data area
//! ```
//!
//! The record is written like the superblock: to the copy that is not the
//! newest, with `seq + 1`, durably, so a torn write leaves the previous version
//! readable. A blank record (both copies all zero, as `tandemctl create`
//! leaves them) reads as [`MetaRecord::initial`]: every replica of a new
//! volume starts in the same generation, holding the same (zero) data.
//!
//! Bitmaps are plain bit arrays (bit *i* covers bytes `[i × chunk, (i+1) ×
//! chunk)` of the data area; bit 0 is the least significant bit of byte 0),
//! written a 4 KiB page at a time. A set bit means "this chunk may differ on
//! that peer". Extra set bits only cost resync time; a missing bit would lose
//! data, so the replica makes a bit durable before the write it covers.

use bytes::{Buf, BufMut};

use crate::repl::DiskState;
use crate::superblock::{check_block, BlockFault};

/// Magic at offset 0 of each record copy.
pub const MAGIC: [u8; 8] = *b"TANDEMMD";
/// Record format version this build writes.
pub const VERSION: u32 = 1;
/// Incompatible-feature bits this build understands (none yet).
pub const KNOWN_INCOMPAT: u32 = 0;
/// Size of one record copy; the checksum sits in its last 4 bytes.
pub const RECORD_SIZE: usize = 4096;
/// Backing offsets of the two record copies.
pub const RECORD_OFFSETS: [u64; 2] = [8192, 12288];
/// Backing offset of the first bitmap slot.
pub const BITMAP_AREA_OFFSET: u64 = 1 << 20;
/// Unit in which bitmaps are written.
pub const PAGE_SIZE: usize = 4096;
/// Bits in one bitmap page.
pub const BITS_PER_PAGE: u64 = PAGE_SIZE as u64 * 8;
/// Peer slots in a record (a volume has at most 4 replicas).
pub const SLOTS: usize = 3;
/// Default bytes of data per bitmap bit.
pub const DEFAULT_CHUNK: u32 = 4096;
/// Largest bytes of data per bitmap bit.
pub const MAX_CHUNK: u32 = 1 << 20;
/// The generation every replica of a new volume starts in.
pub const INITIAL_GENERATION: u64 = 1;
/// Earlier generations a record keeps.
pub const HISTORY: usize = 8;
/// Earlier generations, newest first (0 = none).
pub type History = [u64; HISTORY];

/// Longest peer name in a slot.
pub const MAX_PEER_NAME: usize = 64;

const SLOT_LEN: usize = 1 + MAX_PEER_NAME + 16;

/// The peer part of a record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerSlot {
    /// The peer's node name (empty: slot unused).
    pub name: String,
    /// The generation this node was in when it stopped replicating to the
    /// peer: the peer's bitmap counts every write since. 0: the peer is in
    /// sync (as far as the bitmap goes).
    pub bitmap_gen: u64,
    /// Another generation the peer may still be in when its bitmap started
    /// (the last one it was known to hold durably, if this node had moved
    /// on since); 0 if none.
    pub bitmap_alt: u64,
}

/// The metadata record: what a replica must remember across restarts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaRecord {
    /// Bumped on every update; the valid copy with the highest wins.
    pub seq: u64,
    /// Own disk state (UpToDate, Outdated or Inconsistent).
    pub disk: DiskState,
    /// Bytes of data per bitmap bit (a power of two, 512 to [`MAX_CHUNK`]).
    pub chunk: u32,
    /// Current generation: changes whenever this replica's data starts to
    /// diverge from a peer's (a Primary writing without it) or adopts a sync
    /// source's data.
    pub current: u64,
    /// Earlier generations, newest first (0 = none).
    pub history: History,
    /// One slot per peer, matched by name.
    pub peers: [PeerSlot; SLOTS],
}

/// Why a record copy is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MetaError {
    /// All zeroes.
    #[error("blank")]
    Blank,
    /// Not a metadata record.
    #[error("bad magic {0:02x?}")]
    Magic([u8; 8]),
    /// Torn or corrupted.
    #[error("checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    Checksum {
        /// Stored.
        stored: u32,
        /// Computed.
        computed: u32,
    },
    /// Written by a newer build.
    #[error(
        "version {version} with incompatible features {incompat:#x}: written by a newer Tandem"
    )]
    Incompatible {
        /// Version found.
        version: u32,
        /// Bits found.
        incompat: u32,
    },
    /// A field holds an impossible value.
    #[error("field {field} invalid: {why}")]
    Field {
        /// Field name.
        field: &'static str,
        /// What is wrong.
        why: String,
    },
    /// Too few bytes.
    #[error("truncated: {0} of {RECORD_SIZE} bytes")]
    Truncated(usize),
}

impl MetaRecord {
    /// The record of a new replica: generation [`INITIAL_GENERATION`] (the
    /// same on every replica of a new volume, all zero), no history, no
    /// peer out of sync — or, with `disk` Inconsistent, generation 0: a
    /// replica that holds no data yet and takes a full sync.
    pub fn initial(chunk: u32, disk: DiskState) -> MetaRecord {
        MetaRecord {
            seq: 0,
            disk,
            chunk,
            current: if disk == DiskState::Inconsistent {
                0
            } else {
                INITIAL_GENERATION
            },
            history: [0; HISTORY],
            peers: std::array::from_fn(|_| PeerSlot {
                name: String::new(),
                bitmap_gen: 0,
                bitmap_alt: 0,
            }),
        }
    }

    /// The slot holding `name`, if any.
    pub fn slot_of(&self, name: &str) -> Option<usize> {
        self.peers
            .iter()
            .position(|p| !p.name.is_empty() && p.name == name)
    }

    /// Encodes one copy, checksum included.
    pub fn encode(&self) -> [u8; RECORD_SIZE] {
        let mut block = [0u8; RECORD_SIZE];
        let mut b = &mut block[..];
        b.put_slice(&MAGIC);
        b.put_u32(VERSION);
        b.put_u32(0);
        b.put_u64(self.seq);
        b.put_u8(self.disk.code());
        b.put_u8(0);
        b.put_u32(self.chunk);
        b.put_u64(self.current);
        for h in self.history {
            b.put_u64(h);
        }
        for p in &self.peers {
            let name = &p.name.as_bytes()[..p.name.len().min(MAX_PEER_NAME)];
            let mut fixed = [0u8; MAX_PEER_NAME];
            fixed[..name.len()].copy_from_slice(name);
            b.put_u8(name.len() as u8);
            b.put_slice(&fixed);
            b.put_u64(p.bitmap_gen);
            b.put_u64(p.bitmap_alt);
        }
        let crc = crc32fast::hash(&block[..RECORD_SIZE - 4]);
        block[RECORD_SIZE - 4..].copy_from_slice(&crc.to_be_bytes());
        block
    }

    /// Decodes and checks one copy.
    pub fn decode(bytes: &[u8]) -> Result<MetaRecord, MetaError> {
        let block = check_block(bytes, RECORD_SIZE, &MAGIC).map_err(|f| match f {
            BlockFault::Truncated(n) => MetaError::Truncated(n),
            BlockFault::Blank => MetaError::Blank,
            BlockFault::Magic(m) => MetaError::Magic(m),
            BlockFault::Checksum { stored, computed } => MetaError::Checksum { stored, computed },
        })?;
        let field = |field, why: String| MetaError::Field { field, why };
        let mut b = &block[8..];
        let version = b.get_u32();
        let incompat = b.get_u32();
        if version == 0 || incompat & !KNOWN_INCOMPAT != 0 {
            return Err(MetaError::Incompatible { version, incompat });
        }
        let seq = b.get_u64();
        let disk = match DiskState::from_code(b.get_u8()) {
            Some(d @ (DiskState::UpToDate | DiskState::Outdated | DiskState::Inconsistent)) => d,
            _ => {
                return Err(field(
                    "disk",
                    "not UpToDate, Outdated or Inconsistent".into(),
                ))
            }
        };
        let _flags = b.get_u8();
        let chunk = b.get_u32();
        if !chunk.is_power_of_two() || !(512..=MAX_CHUNK).contains(&chunk) {
            return Err(field(
                "chunk",
                format!("{chunk} is not a power of two from 512 to 1 MiB"),
            ));
        }
        let current = b.get_u64();
        if current == 0 && disk != DiskState::Inconsistent {
            return Err(field("current", "zero on a consistent disk".into()));
        }
        let mut history = [0; HISTORY];
        for h in history.iter_mut() {
            *h = b.get_u64();
        }
        let mut peers: [PeerSlot; SLOTS] = std::array::from_fn(|_| PeerSlot {
            name: String::new(),
            bitmap_gen: 0,
            bitmap_alt: 0,
        });
        for (i, slot) in peers.iter_mut().enumerate() {
            let n = usize::from(b.get_u8());
            if n > MAX_PEER_NAME {
                return Err(field("peer name", format!("slot {i}: length {n}")));
            }
            let name = std::str::from_utf8(&b[..n])
                .map_err(|_| field("peer name", format!("slot {i}: not UTF-8")))?
                .to_owned();
            b.advance(MAX_PEER_NAME);
            slot.name = name;
            slot.bitmap_gen = b.get_u64();
            slot.bitmap_alt = b.get_u64();
        }
        const { assert!(SLOT_LEN * SLOTS < RECORD_SIZE) };
        Ok(MetaRecord {
            seq,
            disk,
            chunk,
            current,
            history,
            peers,
        })
    }
}

/// Chooses the record from its two copies: the valid one with the higher
/// `seq`; both blank gives `Ok(None)` (a new volume); both unusable otherwise
/// is an error naming each copy's problem. Returns the index of the copy
/// chosen (the next update goes to the other one).
#[allow(clippy::type_complexity)]
pub fn select(a: &[u8], b: &[u8]) -> Result<Option<(MetaRecord, usize)>, String> {
    match (MetaRecord::decode(a), MetaRecord::decode(b)) {
        (Ok(x), Ok(y)) => Ok(Some(if y.seq > x.seq { (y, 1) } else { (x, 0) })),
        (Ok(x), Err(_)) => Ok(Some((x, 0))),
        (Err(_), Ok(y)) => Ok(Some((y, 1))),
        (Err(MetaError::Blank), Err(MetaError::Blank)) => Ok(None),
        (Err(ea), Err(eb)) => Err(format!(
            "no valid metadata record: copy A: {ea}; copy B: {eb}"
        )),
    }
}

/// Backing offsets of the two activity-log copies.
pub const AL_OFFSETS: [u64; 2] = [16384, 20480];
/// Magic of an activity-log copy.
pub const AL_MAGIC: [u8; 8] = *b"TANDEMAL";
/// Most extents one activity-log copy holds.
pub const AL_MAX_EXTENTS: usize = (RECORD_SIZE - 8 - 4 - 8 - 4 - 4) / 8;

/// The activity log: the extents a Primary may have writes in flight in.
/// After a crash they are resynced (see `docs/on-disk-format.md`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ActivityLog {
    /// Bumped on every update; the valid copy with the higher one wins.
    pub seq: u64,
    /// Extent numbers (byte offset / extent size), sorted.
    pub extents: Vec<u64>,
}

impl ActivityLog {
    /// Encodes one copy (at most [`AL_MAX_EXTENTS`] extents are kept).
    pub fn encode(&self) -> [u8; RECORD_SIZE] {
        let mut block = [0u8; RECORD_SIZE];
        let n = self.extents.len().min(AL_MAX_EXTENTS);
        let mut b = &mut block[..];
        b.put_slice(&AL_MAGIC);
        b.put_u32(VERSION);
        b.put_u64(self.seq);
        b.put_u32(n as u32);
        for e in &self.extents[..n] {
            b.put_u64(*e);
        }
        let crc = crc32fast::hash(&block[..RECORD_SIZE - 4]);
        block[RECORD_SIZE - 4..].copy_from_slice(&crc.to_be_bytes());
        block
    }

    /// Decodes one copy; `Ok(None)` when it is blank.
    pub fn decode(bytes: &[u8]) -> Result<Option<ActivityLog>, String> {
        let block = match check_block(bytes, RECORD_SIZE, &AL_MAGIC) {
            Ok(b) => b,
            Err(BlockFault::Blank) => return Ok(None),
            Err(BlockFault::Truncated(n)) => {
                return Err(format!("truncated: {n} of {RECORD_SIZE} bytes"))
            }
            Err(BlockFault::Magic(_)) => return Err("bad magic".into()),
            Err(BlockFault::Checksum { .. }) => return Err("checksum mismatch".into()),
        };
        let mut b = &block[8..];
        let version = b.get_u32();
        if version != VERSION {
            return Err(format!("version {version}: written by a newer Tandem"));
        }
        let seq = b.get_u64();
        let n = b.get_u32() as usize;
        if n > AL_MAX_EXTENTS {
            return Err(format!("{n} extents (at most {AL_MAX_EXTENTS})"));
        }
        let extents = (0..n).map(|_| b.get_u64()).collect();
        Ok(Some(ActivityLog { seq, extents }))
    }

    /// The newer valid copy (empty if both are blank); both damaged is an
    /// error naming why.
    pub fn select(a: &[u8], b: &[u8]) -> Result<(ActivityLog, usize), String> {
        match (ActivityLog::decode(a), ActivityLog::decode(b)) {
            (Ok(Some(x)), Ok(Some(y))) => Ok(if y.seq > x.seq { (y, 1) } else { (x, 0) }),
            (Ok(Some(x)), _) => Ok((x, 0)),
            (_, Ok(Some(y))) => Ok((y, 1)),
            (Ok(None), Ok(None)) => Ok((ActivityLog::default(), 1)),
            (Ok(None), Err(e)) | (Err(e), Ok(None)) => {
                // A torn first write of the log: nothing was ever hot
                // before it, but be conservative and say so.
                Err(format!(
                    "activity log copy damaged ({e}) and the other blank"
                ))
            }
            (Err(ea), Err(eb)) => Err(format!("no valid activity log: copy A: {ea}; copy B: {eb}")),
        }
    }
}

/// Where a volume's bitmaps live on its backing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// Bytes of one slot's bitmap (whole pages).
    pub slot_bytes: u64,
}

impl Layout {
    /// The layout for a data area of `size` bytes at `data_offset`, with
    /// `chunk` bytes per bit. Errors when three bitmaps do not fit below the
    /// data area.
    pub fn new(size: u64, chunk: u32, data_offset: u64) -> Result<Layout, String> {
        let bits = size.div_ceil(u64::from(chunk));
        let slot_bytes = bits.div_ceil(8).div_ceil(PAGE_SIZE as u64) * PAGE_SIZE as u64;
        let end = BITMAP_AREA_OFFSET + SLOTS as u64 * slot_bytes;
        if end > data_offset {
            return Err(format!(
                "the metadata area ({data_offset} bytes) has no room for {SLOTS} bitmaps of {slot_bytes} bytes at {chunk} bytes per bit"
            ));
        }
        Ok(Layout { slot_bytes })
    }

    /// Backing offset of page `page` of slot `slot`'s bitmap.
    pub fn page_offset(&self, slot: usize, page: u64) -> u64 {
        BITMAP_AREA_OFFSET + slot as u64 * self.slot_bytes + page * PAGE_SIZE as u64
    }
}

/// A dirty bitmap: one bit per `chunk` bytes of the data area.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bitmap {
    chunk: u64,
    size: u64,
    nbits: u64,
    words: Vec<u64>,
    count: u64,
}

impl Bitmap {
    /// An all-clear bitmap for `size` bytes at `chunk` bytes per bit.
    pub fn new(size: u64, chunk: u32) -> Bitmap {
        let chunk = u64::from(chunk.max(1));
        let nbits = size.div_ceil(chunk);
        Bitmap {
            chunk,
            size,
            nbits,
            words: vec![0; nbits.div_ceil(64) as usize],
            count: 0,
        }
    }

    /// Grows the bitmap to cover `size` bytes (the volume grew): the new
    /// bits are clear, the old ones keep their value. A smaller `size` is
    /// ignored.
    pub fn grow(&mut self, size: u64) {
        if size <= self.size {
            return;
        }
        self.size = size;
        self.nbits = size.div_ceil(self.chunk);
        self.words.resize(self.nbits.div_ceil(64) as usize, 0);
    }

    /// A bitmap read from disk: `bytes` holds the slot's pages (at least
    /// `ceil(nbits / 8)` bytes; bits past the end of the volume are ignored).
    pub fn from_bytes(size: u64, chunk: u32, bytes: &[u8]) -> Bitmap {
        let mut bm = Bitmap::new(size, chunk);
        for (i, w) in bm.words.iter_mut().enumerate() {
            let mut le = [0u8; 8];
            let start = i * 8;
            if start < bytes.len() {
                let end = (start + 8).min(bytes.len());
                le[..end - start].copy_from_slice(&bytes[start..end]);
            }
            *w = u64::from_le_bytes(le);
        }
        let tail = bm.nbits % 64;
        if tail != 0 {
            if let Some(last) = bm.words.last_mut() {
                *last &= (1u64 << tail) - 1;
            }
        }
        bm.count = bm.words.iter().map(|w| u64::from(w.count_ones())).sum();
        bm
    }

    /// Bytes of data per bit.
    pub fn chunk(&self) -> u64 {
        self.chunk
    }

    /// Number of bits.
    pub fn len(&self) -> u64 {
        self.nbits
    }

    /// Whether the bitmap covers nothing (a zero-size volume).
    pub fn is_empty(&self) -> bool {
        self.nbits == 0
    }

    /// Number of set bits.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Bytes of data the set bits cover (the last chunk may be short).
    pub fn dirty_bytes(&self) -> u64 {
        if self.count == 0 {
            return 0;
        }
        let mut bytes = self.count * self.chunk;
        if self.get(self.nbits - 1) {
            bytes -= self.nbits * self.chunk - self.size;
        }
        bytes
    }

    /// Whether bit `i` is set.
    pub fn get(&self, i: u64) -> bool {
        i < self.nbits && self.words[(i / 64) as usize] & (1 << (i % 64)) != 0
    }

    /// The bits covering bytes `[start, end)`.
    pub fn bits_of(&self, start: u64, end: u64) -> (u64, u64) {
        let first = (start / self.chunk).min(self.nbits);
        let last = end.div_ceil(self.chunk).min(self.nbits);
        (first, last.max(first))
    }

    /// Byte range `[start, end)` of bits `[first, last)`, clipped to the volume.
    pub fn byte_range(&self, first: u64, last: u64) -> (u64, u64) {
        (
            (first * self.chunk).min(self.size),
            (last * self.chunk).min(self.size),
        )
    }

    /// Sets bits `[first, last)`; returns the pages (first, last+1) whose
    /// content changed, if any.
    pub fn set_bits(&mut self, first: u64, last: u64) -> Option<(u64, u64)> {
        self.change(first, last, true)
    }

    /// Clears bits `[first, last)`; returns the pages whose content changed.
    pub fn clear_bits(&mut self, first: u64, last: u64) -> Option<(u64, u64)> {
        self.change(first, last, false)
    }

    /// Sets every bit.
    pub fn set_all(&mut self) -> Option<(u64, u64)> {
        self.set_bits(0, self.nbits)
    }

    fn change(&mut self, first: u64, last: u64, set: bool) -> Option<(u64, u64)> {
        let last = last.min(self.nbits);
        let mut changed: Option<(u64, u64)> = None;
        let mut i = first;
        while i < last {
            let w = (i / 64) as usize;
            let lo = i % 64;
            let hi = (last - (i - lo)).min(64);
            let mask = if hi - lo == 64 {
                u64::MAX
            } else {
                ((1u64 << (hi - lo)) - 1) << lo
            };
            let old = self.words[w];
            let new = if set { old | mask } else { old & !mask };
            if new != old {
                self.words[w] = new;
                let delta = u64::from((old ^ new).count_ones());
                if set {
                    self.count += delta;
                } else {
                    self.count -= delta;
                }
                let page = i / BITS_PER_PAGE;
                changed = Some(match changed {
                    None => (page, page + 1),
                    Some((a, _)) => (a, page + 1),
                });
            }
            i = i - lo + 64;
        }
        changed
    }

    /// The first run of set bits at or after bit `from`, at most `max` long:
    /// `(first, last)` with `last` exclusive.
    pub fn next_run(&self, from: u64, max: u64) -> Option<(u64, u64)> {
        let mut i = from;
        // Find the first set bit.
        loop {
            if i >= self.nbits {
                return None;
            }
            let w = self.words[(i / 64) as usize] >> (i % 64);
            if w == 0 {
                i = (i / 64 + 1) * 64;
                continue;
            }
            i += u64::from(w.trailing_zeros());
            break;
        }
        if i >= self.nbits {
            return None;
        }
        let first = i;
        let limit = first.saturating_add(max.max(1)).min(self.nbits);
        while i < limit && self.get(i) {
            i += 1;
        }
        Some((first, i))
    }

    /// Every run of set bits, in order.
    pub fn runs(&self) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        let mut from = 0;
        while let Some((a, b)) = self.next_run(from, u64::MAX) {
            out.push((a, b));
            from = b;
        }
        out
    }

    /// Number of pages the bitmap occupies on disk.
    pub fn pages(&self) -> u64 {
        self.nbits.div_ceil(BITS_PER_PAGE)
    }

    /// The on-disk bytes of page `page` (zero past the end).
    pub fn page_bytes(&self, page: u64) -> Vec<u8> {
        let mut out = vec![0u8; PAGE_SIZE];
        let first_word = (page * BITS_PER_PAGE / 64) as usize;
        for (k, dst) in out.chunks_exact_mut(8).enumerate() {
            if let Some(w) = self.words.get(first_word + k) {
                dst.copy_from_slice(&w.to_le_bytes());
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn rec() -> MetaRecord {
        let mut r = MetaRecord::initial(4096, DiskState::Outdated);
        r.seq = 9;
        r.current = 0xdead_beef;
        r.history = [7, 3, 0, 0, 0, 0, 0, 1];
        r.peers[1] = PeerSlot {
            name: "beta".into(),
            bitmap_gen: 42,
            bitmap_alt: 41,
        };
        r
    }

    #[test]
    fn record_round_trip_and_selection() {
        let r = rec();
        assert_eq!(MetaRecord::decode(&r.encode()).unwrap(), r);
        assert_eq!(r.slot_of("beta"), Some(1));
        assert_eq!(r.slot_of(""), None);
        let mut newer = r.clone();
        newer.seq = 10;
        newer.current = 5;
        let (got, idx) = select(&r.encode(), &newer.encode()).unwrap().unwrap();
        assert_eq!((got.current, idx), (5, 1));
        // A torn copy falls back to the other.
        let mut torn = newer.encode();
        torn[100] ^= 1;
        let (got, idx) = select(&r.encode(), &torn).unwrap().unwrap();
        assert_eq!((got.current, idx), (0xdead_beef, 0));
        // Both blank: a new volume.
        assert_eq!(select(&[0; RECORD_SIZE], &[0; RECORD_SIZE]).unwrap(), None);
        let err = select(&torn, &[1; RECORD_SIZE]).unwrap_err();
        assert!(
            err.contains("checksum mismatch") && err.contains("bad magic"),
            "{err}"
        );
    }

    #[test]
    fn record_errors_say_why() {
        let mut b = rec().encode();
        b[12..16].copy_from_slice(&1u32.to_be_bytes());
        let crc = crc32fast::hash(&b[..RECORD_SIZE - 4]);
        b[RECORD_SIZE - 4..].copy_from_slice(&crc.to_be_bytes());
        assert!(matches!(
            MetaRecord::decode(&b),
            Err(MetaError::Incompatible { .. })
        ));
        assert_eq!(MetaRecord::decode(&[0; 10]), Err(MetaError::Truncated(10)));
    }

    #[test]
    fn bitmap_sets_counts_and_runs() {
        let mut bm = Bitmap::new(10 * 4096 + 512, 4096);
        assert_eq!(bm.len(), 11);
        assert_eq!(bm.set_bits(2, 5), Some((0, 1)));
        assert_eq!(bm.set_bits(3, 4), None);
        assert_eq!(bm.count(), 3);
        bm.set_bits(10, 11);
        assert_eq!(bm.dirty_bytes(), 3 * 4096 + 512);
        assert_eq!(bm.runs(), vec![(2, 5), (10, 11)]);
        assert_eq!(bm.next_run(3, 1), Some((3, 4)));
        assert_eq!(bm.bits_of(4095, 4097), (0, 2));
        assert_eq!(bm.byte_range(10, 11), (40960, 41472));
        bm.clear_bits(0, 4);
        assert_eq!(bm.runs(), vec![(4, 5), (10, 11)]);
        let back = Bitmap::from_bytes(10 * 4096 + 512, 4096, &bm.page_bytes(0));
        assert_eq!(back, bm);
    }

    #[test]
    fn layout_fits_the_reserved_area() {
        use crate::superblock::metadata_area_size;
        for size in [1u64 << 20, 256 << 20, 1 << 40, (1 << 30) + 4096] {
            let l = Layout::new(size, DEFAULT_CHUNK, metadata_area_size(size)).unwrap();
            assert!(l.page_offset(2, 0) + l.slot_bytes <= metadata_area_size(size));
            assert!(l.page_offset(0, 0) >= RECORD_OFFSETS[1] + RECORD_SIZE as u64);
        }
        assert!(Layout::new(1 << 40, 512, metadata_area_size(1 << 40)).is_err());
    }

    #[test]
    fn activity_log_round_trips_and_selects_the_newest() {
        let a = ActivityLog {
            seq: 4,
            extents: vec![1, 7, 9],
        };
        let b = ActivityLog {
            seq: 5,
            extents: vec![2],
        };
        assert_eq!(ActivityLog::decode(&a.encode()), Ok(Some(a.clone())));
        assert_eq!(ActivityLog::select(&a.encode(), &b.encode()).unwrap().0, b);
        let mut torn = b.encode();
        torn[30] ^= 1;
        assert_eq!(ActivityLog::select(&a.encode(), &torn).unwrap().0, a);
        let blank = [0u8; RECORD_SIZE];
        assert_eq!(
            ActivityLog::select(&blank, &blank).unwrap().0.extents,
            Vec::<u64>::new()
        );
        assert!(ActivityLog::select(&torn, &[1; RECORD_SIZE]).is_err());
        assert!(AL_OFFSETS[1] + RECORD_SIZE as u64 <= BITMAP_AREA_OFFSET);
    }

    proptest! {
        #[test]
        fn activity_log_decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..RECORD_SIZE + 8)) {
            let _ = ActivityLog::decode(&bytes);
        }

        #[test]
        fn record_decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..RECORD_SIZE + 8)) {
            let _ = MetaRecord::decode(&bytes);
        }

        #[test]
        fn bitmap_matches_a_bool_model(ops in proptest::collection::vec((any::<bool>(), 0u64..300, 0u64..80), 1..40)) {
            let mut bm = Bitmap::new(300 * 512 - 100, 512);
            let mut model = vec![false; bm.len() as usize];
            for (set, a, n) in ops {
                let b = (a + n).min(bm.len());
                if set { bm.set_bits(a, b); } else { bm.clear_bits(a, b); }
                for m in model.iter_mut().take(b as usize).skip(a as usize) { *m = set; }
            }
            let want: Vec<u64> = (0..bm.len()).filter(|&i| model[i as usize]).collect();
            let got: Vec<u64> = bm.runs().into_iter().flat_map(|(a, b)| a..b).collect();
            prop_assert_eq!(&got, &want);
            prop_assert_eq!(bm.count(), want.len() as u64);
            let back = Bitmap::from_bytes(300 * 512 - 100, 512, &bm.page_bytes(0));
            prop_assert_eq!(back, bm);
        }
    }
}
