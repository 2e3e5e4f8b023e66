//! The on-disk volume superblock and the layout of a backing device.
//!
//! A backing (regular file or block device) is laid out as:
//!
//! ```text
//! offset 0          superblock copy A (4 KiB)
//! offset 4096       superblock copy B (4 KiB)
//! offset 8192       reserved metadata (generation ids, activity log, dirty
//!                   bitmaps: later format features), zero-filled at creation
//! data_offset       data area: `size` bytes, what the export shows
//! ```
//!
//! Both copies carry the same fields and a sequence number; a reader takes the
//! valid copy with the highest sequence number, so a torn write of one copy
//! loses nothing. Updates alternate between copies. The format is described
//! field by field in `docs/on-disk-format.md`.

use bytes::{Buf, BufMut};

/// Magic at offset 0 of each copy.
pub const MAGIC: [u8; 8] = *b"TANDEMSB";
/// Format version this build writes.
pub const FORMAT_VERSION: u32 = 1;
/// Incompatible-feature bits this build understands (none yet). A copy with
/// any other bit set was written by a newer build whose data this build must
/// not touch.
pub const KNOWN_INCOMPAT: u32 = 0;
/// Size of one superblock copy; the checksum sits in its last 4 bytes.
pub const SUPERBLOCK_SIZE: usize = 4096;
/// Byte offsets of the two copies.
pub const COPY_OFFSETS: [u64; 2] = [0, SUPERBLOCK_SIZE as u64];
/// Longest volume name.
pub const MAX_NAME_LEN: usize = 64;
/// Peers whose dirty bitmaps (4 KiB per bit) the metadata area reserves room for.
pub const RESERVED_PEERS: u64 = 3;
const MIB: u64 = 1 << 20;

/// A volume's identity and geometry, as stored on its backing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Superblock {
    /// Format version of the copy (see [`FORMAT_VERSION`]).
    pub format_version: u32,
    /// Incompatible features in use (see [`KNOWN_INCOMPAT`]).
    pub incompat: u32,
    /// Sequence number; the valid copy with the highest one wins.
    pub seq: u64,
    /// Volume UUID, identical on every replica of the volume.
    pub volume_uuid: [u8; 16],
    /// Human name of the volume (at most [`MAX_NAME_LEN`] bytes of UTF-8).
    pub name: String,
    /// Size of the data area in bytes (a multiple of `block_size`).
    pub size: u64,
    /// Logical block size: 512 or 4096.
    pub block_size: u32,
    /// Start of the data area (a multiple of 1 MiB).
    pub data_offset: u64,
    /// Creation time, seconds since the Unix epoch (informational).
    pub created_unix_secs: u64,
}

/// Why a volume cannot grow to the requested size.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum GrowError {
    /// The new size is smaller than the current one.
    #[error("shrinking is not supported: the volume has {size} bytes, {new_size} requested (data past the new end would be lost)")]
    Shrink {
        /// Current size.
        size: u64,
        /// Requested size.
        new_size: u64,
    },
    /// The new size is not a multiple of the block size.
    #[error("{new_size} bytes is not a multiple of the volume's block size ({block_size})")]
    Unaligned {
        /// Requested size.
        new_size: u64,
        /// Block size.
        block_size: u32,
    },
    /// The metadata area has no room for the bitmaps of the new size.
    #[error("{new_size} bytes is more than this volume can grow to without moving its data ({max} bytes: its metadata area has room for the dirty bitmaps of at most that); create a larger volume and copy the data")]
    TooLarge {
        /// Requested size.
        new_size: u64,
        /// Largest possible size.
        max: u64,
    },
    /// The grown superblock would be invalid.
    #[error("{0}")]
    Invalid(SuperblockError),
}

/// Why one superblock copy is unusable.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum SuperblockError {
    /// The copy is all zeroes: nothing was ever written here.
    #[error("blank (all zeroes): not a Tandem volume")]
    Blank,
    /// Magic mismatch: something else lives here.
    #[error("bad magic {0:02x?}: not a Tandem volume")]
    Magic([u8; 8]),
    /// Checksum mismatch: torn or corrupted write.
    #[error("checksum mismatch (stored {stored:#010x}, computed {computed:#010x}): torn write or corruption")]
    Checksum {
        /// Checksum stored in the copy.
        stored: u32,
        /// Checksum computed over the copy.
        computed: u32,
    },
    /// Written by a newer build using features this build does not know.
    #[error("format version {version} with incompatible features {incompat:#x}: written by a newer Tandem, upgrade to open it")]
    Incompatible {
        /// Version found.
        version: u32,
        /// Incompatible feature bits found.
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
    /// Fewer bytes than a copy.
    #[error("truncated: {0} of {SUPERBLOCK_SIZE} bytes")]
    Truncated(usize),
}

/// Both copies are unusable.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("no valid superblock: copy A: {a}; copy B: {b}")]
pub struct BothCopiesBad {
    /// Why copy A is unusable.
    pub a: SuperblockError,
    /// Why copy B is unusable.
    pub b: SuperblockError,
}

impl BothCopiesBad {
    /// True when neither copy was ever written (a blank backing).
    pub fn is_blank(&self) -> bool {
        self.a == SuperblockError::Blank && self.b == SuperblockError::Blank
    }
}

/// The copy chosen by [`select`] and the state of each copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selected {
    /// The newest valid copy.
    pub superblock: Superblock,
    /// Index (0 = A, 1 = B) of the chosen copy.
    pub index: usize,
    /// Problems with the other copy, if any (the daemon rewrites it).
    pub other_error: Option<SuperblockError>,
}

/// Size of the metadata area for a new volume of `size` bytes: 1 MiB for
/// superblocks and future fixed-size records, plus room for
/// [`RESERVED_PEERS`] dirty bitmaps at 4 KiB per bit, rounded up to 1 MiB.
pub fn metadata_area_size(size: u64) -> u64 {
    let bitmap_bytes = size.div_ceil(4096).div_ceil(8);
    let total = MIB + RESERVED_PEERS * bitmap_bytes;
    total.div_ceil(MIB) * MIB
}

impl Superblock {
    /// Describes a new volume; `data_offset` follows [`metadata_area_size`].
    pub fn new(
        volume_uuid: [u8; 16],
        name: &str,
        size: u64,
        block_size: u32,
        created_unix_secs: u64,
    ) -> Result<Self, SuperblockError> {
        let sb = Superblock {
            format_version: FORMAT_VERSION,
            incompat: 0,
            seq: 1,
            volume_uuid,
            name: name.to_string(),
            size,
            block_size,
            data_offset: metadata_area_size(size),
            created_unix_secs,
        };
        sb.check()?;
        Ok(sb)
    }

    /// The superblock of this volume grown online to `new_size` bytes
    /// (`docs/on-disk-format.md`, "Growing a volume"): same identity and
    /// data offset, `seq + 1`. The metadata area is not moved, so the
    /// three dirty bitmaps at `chunk` bytes per bit must still fit below
    /// `data_offset`; whether their on-disk slots move is the caller's
    /// concern ([`crate::meta::Layout`]).
    pub fn grown(&self, new_size: u64, chunk: u32) -> Result<Superblock, GrowError> {
        if new_size < self.size {
            return Err(GrowError::Shrink {
                size: self.size,
                new_size,
            });
        }
        if new_size % u64::from(self.block_size) != 0 {
            return Err(GrowError::Unaligned {
                new_size,
                block_size: self.block_size,
            });
        }
        let max = self.max_grow_size(chunk);
        if new_size > max {
            return Err(GrowError::TooLarge { new_size, max });
        }
        let mut sb = self.clone();
        sb.size = new_size;
        sb.seq = self.seq.wrapping_add(1);
        sb.check().map_err(GrowError::Invalid)?;
        Ok(sb)
    }

    /// The largest size this volume can grow to without moving its data:
    /// three bitmaps at `chunk` bytes per bit must fit between 1 MiB and
    /// `data_offset`, and the data area must end below 2^63.
    pub fn max_grow_size(&self, chunk: u32) -> u64 {
        let room = self.data_offset.saturating_sub(MIB) / RESERVED_PEERS;
        let slot_bytes = room / 4096 * 4096;
        let by_bitmap = slot_bytes
            .saturating_mul(8)
            .saturating_mul(u64::from(chunk.max(1)));
        let by_range = (i64::MAX as u64).saturating_sub(self.data_offset);
        let max = by_bitmap.min(by_range);
        max - max % u64::from(self.block_size.max(1))
    }

    /// Total backing size this volume needs.
    pub fn backing_len(&self) -> u64 {
        self.data_offset + self.size
    }

    /// UUID in the usual 8-4-4-4-12 hex form.
    pub fn uuid_string(&self) -> String {
        format_uuid(&self.volume_uuid)
    }

    fn check(&self) -> Result<(), SuperblockError> {
        let field = |field, why: String| Err(SuperblockError::Field { field, why });
        if self.block_size != 512 && self.block_size != 4096 {
            return field(
                "block_size",
                format!("{} is not 512 or 4096", self.block_size),
            );
        }
        if self.size == 0 || self.size % u64::from(self.block_size) != 0 {
            return field(
                "size",
                format!("{} is not a positive multiple of the block size", self.size),
            );
        }
        if self.data_offset < 2 * SUPERBLOCK_SIZE as u64 || self.data_offset % MIB != 0 {
            return field(
                "data_offset",
                format!(
                    "{} is not a multiple of 1 MiB past the superblocks",
                    self.data_offset
                ),
            );
        }
        if self.data_offset.checked_add(self.size).is_none() {
            return field("size", "data area end overflows".into());
        }
        if self.name.len() > MAX_NAME_LEN {
            return field("name", format!("longer than {MAX_NAME_LEN} bytes"));
        }
        if self.volume_uuid == [0; 16] {
            return field("volume_uuid", "all zero".into());
        }
        Ok(())
    }

    /// Encodes one 4 KiB copy, checksum included.
    pub fn encode(&self) -> [u8; SUPERBLOCK_SIZE] {
        let mut block = [0u8; SUPERBLOCK_SIZE];
        let mut b = &mut block[..];
        b.put_slice(&MAGIC);
        b.put_u32(self.format_version);
        b.put_u32(self.incompat);
        b.put_u64(self.seq);
        b.put_slice(&self.volume_uuid);
        b.put_u64(self.size);
        b.put_u32(self.block_size);
        b.put_u64(self.data_offset);
        b.put_u64(self.created_unix_secs);
        let name = &self.name.as_bytes()[..self.name.len().min(MAX_NAME_LEN)];
        b.put_u16(name.len() as u16);
        b.put_slice(name);
        let crc = crc32fast::hash(&block[..SUPERBLOCK_SIZE - 4]);
        block[SUPERBLOCK_SIZE - 4..].copy_from_slice(&crc.to_be_bytes());
        block
    }

    /// Decodes and checks one copy.
    pub fn decode(bytes: &[u8]) -> Result<Self, SuperblockError> {
        let block = check_block(bytes, SUPERBLOCK_SIZE, &MAGIC).map_err(|f| match f {
            BlockFault::Truncated(n) => SuperblockError::Truncated(n),
            BlockFault::Blank => SuperblockError::Blank,
            BlockFault::Magic(m) => SuperblockError::Magic(m),
            BlockFault::Checksum { stored, computed } => {
                SuperblockError::Checksum { stored, computed }
            }
        })?;
        let mut b = &block[8..];
        let format_version = b.get_u32();
        let incompat = b.get_u32();
        if incompat & !KNOWN_INCOMPAT != 0 || format_version == 0 {
            return Err(SuperblockError::Incompatible {
                version: format_version,
                incompat,
            });
        }
        let seq = b.get_u64();
        let mut volume_uuid = [0u8; 16];
        b.copy_to_slice(&mut volume_uuid);
        let size = b.get_u64();
        let block_size = b.get_u32();
        let data_offset = b.get_u64();
        let created_unix_secs = b.get_u64();
        let name_len = usize::from(b.get_u16());
        if name_len > MAX_NAME_LEN {
            return Err(SuperblockError::Field {
                field: "name",
                why: format!("length {name_len} exceeds {MAX_NAME_LEN}"),
            });
        }
        let name = std::str::from_utf8(&b[..name_len])
            .map_err(|_| SuperblockError::Field {
                field: "name",
                why: "not UTF-8".into(),
            })?
            .to_string();
        let sb = Superblock {
            format_version,
            incompat,
            seq,
            volume_uuid,
            name,
            size,
            block_size,
            data_offset,
            created_unix_secs,
        };
        sb.check()?;
        Ok(sb)
    }
}

/// Why a 4 KiB checksummed metadata block fails its framing checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BlockFault {
    /// Fewer bytes than a block.
    Truncated(usize),
    /// All zeroes.
    Blank,
    /// Another magic.
    Magic([u8; 8]),
    /// CRC-32 of all but the last 4 bytes differs from those 4 bytes.
    Checksum { stored: u32, computed: u32 },
}

/// The framing every metadata block shares (superblock, replica record,
/// activity log): `size` bytes, `magic` first, CRC-32 (IEEE) of the rest in
/// the last 4 bytes. Returns the block.
pub(crate) fn check_block<'a>(
    bytes: &'a [u8],
    size: usize,
    magic: &[u8; 8],
) -> Result<&'a [u8], BlockFault> {
    if bytes.len() < size {
        return Err(BlockFault::Truncated(bytes.len()));
    }
    let block = &bytes[..size];
    if block.iter().all(|&x| x == 0) {
        return Err(BlockFault::Blank);
    }
    let mut found = [0u8; 8];
    found.copy_from_slice(&block[..8]);
    if found != *magic {
        return Err(BlockFault::Magic(found));
    }
    let mut stored = [0u8; 4];
    stored.copy_from_slice(&block[size - 4..]);
    let stored = u32::from_be_bytes(stored);
    let computed = crc32fast::hash(&block[..size - 4]);
    if stored != computed {
        return Err(BlockFault::Checksum { stored, computed });
    }
    Ok(block)
}

/// Chooses the superblock from the two copies (each [`SUPERBLOCK_SIZE`] bytes).
pub fn select(copy_a: &[u8], copy_b: &[u8]) -> Result<Selected, BothCopiesBad> {
    match (Superblock::decode(copy_a), Superblock::decode(copy_b)) {
        (Ok(a), Ok(b)) => {
            let other_error = (a.volume_uuid != b.volume_uuid).then(|| SuperblockError::Field {
                field: "volume_uuid",
                why: "the two copies name different volumes".into(),
            });
            let (superblock, index) = if b.seq > a.seq { (b, 1) } else { (a, 0) };
            Ok(Selected {
                superblock,
                index,
                other_error,
            })
        }
        (Ok(a), Err(e)) => Ok(Selected {
            superblock: a,
            index: 0,
            other_error: Some(e),
        }),
        (Err(e), Ok(b)) => Ok(Selected {
            superblock: b,
            index: 1,
            other_error: Some(e),
        }),
        (Err(a), Err(b)) => Err(BothCopiesBad { a, b }),
    }
}

/// Formats a UUID as 8-4-4-4-12 lowercase hex.
pub fn format_uuid(u: &[u8; 16]) -> String {
    let h: String = u.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// Parses an 8-4-4-4-12 (or 32-digit) hex UUID.
pub fn parse_uuid(s: &str) -> Option<[u8; 16]> {
    let hex: Vec<u8> = s.bytes().filter(|&c| c != b'-').collect();
    if hex.len() != 32 || !s.is_ascii() {
        return None;
    }
    let mut out = [0u8; 16];
    for (i, pair) in hex.chunks(2).enumerate() {
        let text = std::str::from_utf8(pair).ok()?;
        out[i] = u8::from_str_radix(text, 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sb() -> Superblock {
        Superblock::new([7; 16], "vm1", 256 << 20, 512, 1_700_000_000).unwrap()
    }

    #[test]
    fn round_trip_and_layout() {
        let s = sb();
        assert_eq!(Superblock::decode(&s.encode()), Ok(s.clone()));
        assert_eq!(s.data_offset, 2 * MIB);
        assert_eq!(metadata_area_size(1 << 40), 97 * MIB);
        assert_eq!(parse_uuid(&s.uuid_string()), Some([7; 16]));
    }

    #[test]
    fn torn_copy_falls_back_to_the_other() {
        let mut s = sb();
        let a = s.encode();
        s.seq = 2;
        let mut b = s.encode();
        b[100] ^= 1; // torn/corrupted newer copy
        let sel = select(&a, &b).unwrap();
        assert_eq!(sel.index, 0);
        assert_eq!(sel.superblock.seq, 1);
        assert!(matches!(
            sel.other_error,
            Some(SuperblockError::Checksum { .. })
        ));
        let sel = select(&a, &s.encode()).unwrap();
        assert_eq!((sel.index, sel.superblock.seq), (1, 2));
    }

    #[test]
    fn errors_say_why() {
        let z = [0u8; SUPERBLOCK_SIZE];
        assert!(select(&z, &z).unwrap_err().is_blank());
        let mut junk = [0xabu8; SUPERBLOCK_SIZE];
        assert!(matches!(
            Superblock::decode(&junk),
            Err(SuperblockError::Magic(_))
        ));
        junk[..8].copy_from_slice(&MAGIC);
        assert!(matches!(
            Superblock::decode(&junk),
            Err(SuperblockError::Checksum { .. })
        ));
        let mut newer = sb();
        newer.incompat = 1 << 4;
        assert!(matches!(
            Superblock::decode(&newer.encode()),
            Err(SuperblockError::Incompatible { .. })
        ));
        assert!(Superblock::new([1; 16], "x", 1000, 512, 0).is_err());
        assert!(Superblock::new([1; 16], "x", 4096, 1024, 0).is_err());
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..5000)) {
            let _ = Superblock::decode(&bytes);
        }

        #[test]
        fn any_single_bit_flip_is_detected(bit in 0usize..(SUPERBLOCK_SIZE * 8)) {
            let mut block = sb().encode();
            block[bit / 8] ^= 1 << (bit % 8);
            prop_assert!(Superblock::decode(&block).is_err());
        }
    }

    #[test]
    fn growing_keeps_identity_and_refuses_shrink_misalignment_and_overflow() {
        let old = Superblock::new([7; 16], "v", 64 << 20, 4096, 1).unwrap();
        let g = old.grown(128 << 20, 4096).unwrap();
        assert_eq!(
            (g.size, g.seq, g.data_offset, &g.name, g.volume_uuid),
            (
                128 << 20,
                old.seq + 1,
                old.data_offset,
                &old.name,
                old.volume_uuid
            )
        );
        assert_eq!(old.grown(old.size, 4096).unwrap().size, old.size);
        assert!(matches!(
            old.grown(32 << 20, 4096),
            Err(GrowError::Shrink { .. })
        ));
        assert!(matches!(
            old.grown((64 << 20) + 512, 4096),
            Err(GrowError::Unaligned { .. })
        ));
        // A 64 MiB volume has a 2 MiB data offset: 1 MiB for 3 bitmaps,
        // 85 pages (348 160 bytes) each, 4 KiB per bit: about 10.6 GiB.
        let max = old.max_grow_size(4096);
        assert_eq!(max, 348_160 * 8 * 4096);
        assert!(old.grown(max, 4096).is_ok());
        let e = old.grown(max + 4096, 4096).unwrap_err();
        assert!(e.to_string().contains("without moving its data"), "{e}");
    }

    proptest! {
        /// Every size `grown` accepts leaves room for the three bitmaps
        /// (the same rule `meta::Layout` enforces when the volume opens).
        #[test]
        fn grown_sizes_fit_the_bitmap_layout(
            mib in 1u64..4096,
            extra in 0u64..(1 << 40),
            chunk_shift in 9u32..=20,
        ) {
            let chunk = 1u32 << chunk_shift;
            let old = Superblock::new([1; 16], "v", mib << 20, 512, 0).unwrap();
            let new_size = (old.size + extra) / 512 * 512;
            match old.grown(new_size, chunk) {
                Ok(g) => {
                    prop_assert!(crate::meta::Layout::new(g.size, chunk, g.data_offset).is_ok());
                    prop_assert_eq!(g.backing_len(), g.data_offset + new_size);
                }
                Err(GrowError::TooLarge { max, .. }) => {
                    prop_assert!(new_size > max);
                    prop_assert!(crate::meta::Layout::new(max, chunk, old.data_offset).is_ok());
                }
                Err(e) => prop_assert!(false, "{e}"),
            }
        }
    }
}
