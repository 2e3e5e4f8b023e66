//! A volume: a backing with a checked superblock, exposing its data area.
//!
//! Opening a volume reads both superblock copies, refuses a backing that is
//! blank, corrupt, too small or that belongs to another volume, and repairs a
//! damaged copy from the good one. All I/O offsets are data-area offsets; the
//! volume adds the superblock's `data_offset` and refuses ranges outside the
//! data area (the frontend has already validated them; this is a second
//! guard, never a panic).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tandem_core::meta::{self, Layout};
use tandem_core::repl::{DiskState, LoadedMeta};
use tandem_core::superblock::{self, format_uuid, Selected, Superblock, SUPERBLOCK_SIZE};

use crate::storage::{Engine, IoBuf, IoError, IoResult, Op};

/// Why a volume cannot be created or opened.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    /// The backing has never been formatted.
    #[error("{path}: not a Tandem volume (both superblock copies are blank); format it with `tandemctl create {path} --size SIZE --name NAME`")]
    Blank {
        /// Backing path.
        path: String,
    },
    /// Both superblock copies are unusable.
    #[error("{path}: refusing to open: {source}")]
    Corrupt {
        /// Backing path.
        path: String,
        /// Both copies' problems.
        #[source]
        source: superblock::BothCopiesBad,
    },
    /// The superblock names another volume than the configuration.
    #[error("{path}: holds volume {found_name:?} ({found_uuid}), but the configuration expects {expected}; refusing to serve another volume's data")]
    WrongVolume {
        /// Backing path.
        path: String,
        /// Name on disk.
        found_name: String,
        /// UUID on disk.
        found_uuid: String,
        /// What the configuration asked for.
        expected: String,
    },
    /// The backing is smaller than the superblock says.
    #[error("{path}: backing is {len} bytes but the superblock needs {need} (data offset {data_offset} + size {size}); was it truncated?")]
    TooSmall {
        /// Backing path.
        path: String,
        /// Backing length.
        len: u64,
        /// Needed length.
        need: u64,
        /// Data offset.
        data_offset: u64,
        /// Volume size.
        size: u64,
    },
    /// Creating over an existing volume without `force`.
    #[error("{path}: already holds Tandem volume {name:?} ({uuid}); pass --force to overwrite it")]
    Exists {
        /// Backing path.
        path: String,
        /// Name on disk.
        name: String,
        /// UUID on disk.
        uuid: String,
    },
    /// Invalid creation parameters.
    #[error("{path}: {source}")]
    Invalid {
        /// Backing path.
        path: String,
        /// What is wrong.
        #[source]
        source: superblock::SuperblockError,
    },
    /// Storage error.
    #[error("{path}: {source}")]
    Io {
        /// Backing path.
        path: String,
        /// The storage error.
        #[source]
        source: IoError,
    },
}

/// What the configuration expects to find on a backing.
#[derive(Debug, Clone, Default)]
pub struct Expect {
    /// Volume name the superblock must carry (if set).
    pub name: Option<String>,
    /// Volume UUID the superblock must carry (if set).
    pub uuid: Option<[u8; 16]>,
}

/// An open volume.
pub struct Volume {
    path: PathBuf,
    /// The superblock in force and the index (0 = A, 1 = B) of the copy
    /// holding it: the next update writes the other copy.
    superblock: Mutex<(Superblock, usize)>,
    /// The data-area size in force (grows with [`Volume::grow`]).
    size: AtomicU64,
    data_offset: u64,
    block_size: u32,
    engine: Arc<dyn Engine>,
    read_only: bool,
    /// One growth at a time.
    grow_lock: tokio::sync::Mutex<()>,
    /// A diskless client's volume (no backing).
    diskless: bool,
}

/// Why a volume cannot grow.
#[derive(Debug, thiserror::Error)]
pub enum GrowError {
    /// The request itself is refused (shrink, alignment, too large).
    #[error("{path}: {source}")]
    Refused {
        /// Backing path.
        path: String,
        /// Why.
        #[source]
        source: superblock::GrowError,
    },
    /// A read-only volume.
    #[error("{0}: the volume is read-only")]
    ReadOnly(String),
    /// The bitmap slots would move while one of them holds set bits.
    #[error("{path}: growing to {new_size} bytes moves the dirty bitmaps of peers, and bitmap slot {slot} records regions out of sync: resync (or let the peer connect) first")]
    BitmapInUse {
        /// Backing path.
        path: String,
        /// Requested size.
        new_size: u64,
        /// A slot with set bits.
        slot: usize,
    },
    /// The backing cannot hold the new size.
    #[error("{path}: cannot extend the backing to {need} bytes: {why}")]
    Backing {
        /// Backing path.
        path: String,
        /// Needed length.
        need: u64,
        /// What went wrong.
        why: String,
    },
    /// Metadata or storage error.
    #[error("{path}: {why}")]
    Io {
        /// Backing path.
        path: String,
        /// What failed.
        why: String,
    },
}

impl std::fmt::Debug for Volume {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Volume")
            .field("path", &self.path)
            .field("size", &self.size())
            .field("data_offset", &self.data_offset)
            .field("engine", &self.engine.kind())
            .finish()
    }
}

async fn read_superblocks(engine: &dyn Engine) -> IoResult<IoBuf> {
    let (buf, res) = engine.read(0, IoBuf::zeroed(2 * SUPERBLOCK_SIZE)).await;
    res.map(|()| buf)
}

/// Formats a backing as a new volume: zeroes the metadata area, then writes
/// both superblock copies and flushes. Refuses a backing that already holds a
/// volume unless `force`.
pub async fn create(
    engine: &dyn Engine,
    path: &Path,
    new: Superblock,
    force: bool,
) -> Result<Superblock, VolumeError> {
    let p = path.display().to_string();
    let io = |source| VolumeError::Io {
        path: p.clone(),
        source,
    };
    if engine.len() < new.backing_len() {
        return Err(VolumeError::TooSmall {
            path: p.clone(),
            len: engine.len(),
            need: new.backing_len(),
            data_offset: new.data_offset,
            size: new.size,
        });
    }
    if !force {
        let buf = read_superblocks(engine).await.map_err(io)?;
        if let Ok(sel) = superblock::select(&buf[..SUPERBLOCK_SIZE], &buf[SUPERBLOCK_SIZE..]) {
            return Err(VolumeError::Exists {
                path: p.clone(),
                uuid: sel.superblock.uuid_string(),
                name: sel.superblock.name,
            });
        }
    }
    // Zero the metadata area (reserved for later format features) without
    // writing gigabytes: it is at most ~100 MiB even for huge volumes.
    engine
        .write_zeroes(0, new.data_offset, false)
        .await
        .map_err(io)?;
    for off in superblock::COPY_OFFSETS {
        let (_, res) = engine
            .write(off, IoBuf::from_slice(&new.encode()), true)
            .await;
        res.map_err(io)?;
    }
    engine.flush().await.map_err(io)?;
    Ok(new)
}

impl Volume {
    /// The volume of a diskless client (R28): no backing, no superblock on
    /// disk; the name, UUID, size and block size come from the
    /// configuration (the replicas' handshake checks UUID, size and block
    /// size). Every data I/O on it fails with `EIO`; the replication core
    /// sends none.
    pub fn diskless(
        name: &str,
        volume_uuid: [u8; 16],
        size: u64,
        block_size: u32,
    ) -> Result<Volume, String> {
        let sb =
            Superblock::new(volume_uuid, name, size, block_size, 0).map_err(|e| e.to_string())?;
        let engine = Arc::new(crate::storage::none::NoDisk::new(sb.backing_len()));
        Ok(Volume {
            path: PathBuf::from("(diskless)"),
            size: AtomicU64::new(sb.size),
            data_offset: sb.data_offset,
            block_size: sb.block_size,
            superblock: Mutex::new((sb, 0)),
            engine,
            read_only: false,
            grow_lock: tokio::sync::Mutex::new(()),
            diskless: true,
        })
    }

    /// Opens the volume on `engine`, checking the superblock against `expect`.
    pub async fn open(
        engine: Arc<dyn Engine>,
        path: &Path,
        expect: &Expect,
        read_only: bool,
    ) -> Result<Volume, VolumeError> {
        let p = path.display().to_string();
        let io = |source| VolumeError::Io {
            path: p.clone(),
            source,
        };
        if engine.len() < 2 * SUPERBLOCK_SIZE as u64 {
            return Err(VolumeError::TooSmall {
                path: p.clone(),
                len: engine.len(),
                need: 2 * SUPERBLOCK_SIZE as u64,
                data_offset: 0,
                size: 0,
            });
        }
        let buf = read_superblocks(engine.as_ref()).await.map_err(io)?;
        let Selected {
            superblock: sb,
            index,
            other_error,
        } = match superblock::select(&buf[..SUPERBLOCK_SIZE], &buf[SUPERBLOCK_SIZE..]) {
            Ok(s) => s,
            Err(e) if e.is_blank() => return Err(VolumeError::Blank { path: p }),
            Err(source) => return Err(VolumeError::Corrupt { path: p, source }),
        };
        let name_ok = expect.name.as_ref().is_none_or(|n| *n == sb.name);
        let uuid_ok = expect.uuid.is_none_or(|u| u == sb.volume_uuid);
        if !name_ok || !uuid_ok {
            let mut expected = Vec::new();
            if let Some(n) = &expect.name {
                expected.push(format!("name {n:?}"));
            }
            if let Some(u) = &expect.uuid {
                expected.push(format!("uuid {}", format_uuid(u)));
            }
            return Err(VolumeError::WrongVolume {
                path: p,
                found_name: sb.name.clone(),
                found_uuid: sb.uuid_string(),
                expected: expected.join(" and "),
            });
        }
        if engine.len() < sb.backing_len() {
            return Err(VolumeError::TooSmall {
                path: p,
                len: engine.len(),
                need: sb.backing_len(),
                data_offset: sb.data_offset,
                size: sb.size,
            });
        }
        if let Some(err) = other_error {
            let other = 1 - index;
            let label = ["A", "B"][other];
            if read_only {
                tracing::warn!(path = %p, copy = label, %err, "superblock copy damaged; read-only, not repairing");
            } else {
                tracing::warn!(path = %p, copy = label, %err, "superblock copy damaged; rewriting it from the good copy");
                let (_, res) = engine
                    .write(
                        superblock::COPY_OFFSETS[other],
                        IoBuf::from_slice(&sb.encode()),
                        true,
                    )
                    .await;
                res.map_err(io)?;
            }
        }
        Ok(Volume {
            path: path.to_path_buf(),
            size: AtomicU64::new(sb.size),
            data_offset: sb.data_offset,
            block_size: sb.block_size,
            superblock: Mutex::new((sb, index)),
            engine,
            read_only,
            grow_lock: tokio::sync::Mutex::new(()),
            diskless: false,
        })
    }

    /// The superblock in force (a copy: growth may replace it).
    pub fn superblock(&self) -> Superblock {
        self.superblock
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .0
            .clone()
    }

    /// Checks that the superblock allows growing to `new_size` (not
    /// smaller, block-aligned, within what the metadata area holds) without
    /// changing anything; [`Volume::grow`] checks again.
    pub async fn check_grow(&self, new_size: u64) -> Result<(), GrowError> {
        if self.diskless {
            return Ok(());
        }
        let p = self.path.display().to_string();
        if self.read_only {
            return Err(GrowError::ReadOnly(p));
        }
        let chunk = self.meta_chunk().await?;
        self.superblock()
            .grown(new_size, chunk)
            .map(|_| ())
            .map_err(|source| GrowError::Refused { path: p, source })
    }

    /// The bitmap granularity: the replica record's, or the default for a
    /// volume never replicated.
    async fn meta_chunk(&self) -> Result<u32, GrowError> {
        let io = |why: String| GrowError::Io {
            path: self.path.display().to_string(),
            why,
        };
        let rec = self
            .read_meta(meta::RECORD_OFFSETS[0], 2 * meta::RECORD_SIZE)
            .await
            .map_err(|e| io(format!("reading the replica metadata: {e}")))?;
        let (a, b) = rec.split_at(meta::RECORD_SIZE);
        match meta::select(a, b) {
            Ok(Some((r, _))) => Ok(r.chunk),
            Ok(None) => Ok(meta::DEFAULT_CHUNK),
            Err(e) => Err(io(e)),
        }
    }

    /// Grows the data area online to `new_size` bytes (`docs/operations.md`,
    /// "Growing a volume"); returns the size before. Crash-safe: the
    /// backing is extended and the new area zeroed and flushed first, then
    /// the superblock copy that is not in force is written with the new size
    /// and `seq + 1` (FUA); a crash before that leaves the old size (and an
    /// unused backing tail), after it the new one. Requests already
    /// validated against the old size stay valid; new NBD connections see
    /// the new size. Growing to the current size is a no-op.
    pub async fn grow(&self, new_size: u64) -> Result<u64, GrowError> {
        let _one = self.grow_lock.lock().await;
        let p = self.path.display().to_string();
        let io = |why: String| GrowError::Io {
            path: p.clone(),
            why,
        };
        if self.read_only {
            return Err(GrowError::ReadOnly(p));
        }
        let (cur, index) = self
            .superblock
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if new_size == cur.size {
            return Ok(cur.size);
        }
        let chunk = self.meta_chunk().await?;
        let new = cur
            .grown(new_size, chunk)
            .map_err(|source| GrowError::Refused {
                path: p.clone(),
                source,
            })?;
        // Slots 1 and 2 start at `1 MiB + s × slot_bytes`: when the slot size
        // changes they move. Only an all-clear bitmap area may move (it
        // reads the same at any offset, and the area past it was zeroed at
        // creation); otherwise refuse rather than lose out-of-sync marks.
        let old_layout = Layout::new(cur.size, chunk, self.data_offset).map_err(io)?;
        let new_layout = Layout::new(new.size, chunk, self.data_offset).map_err(io)?;
        if old_layout.slot_bytes != new_layout.slot_bytes {
            for slot in 0..meta::SLOTS {
                let bytes = usize::try_from(old_layout.slot_bytes).unwrap_or(usize::MAX);
                let bits = self
                    .read_meta(old_layout.page_offset(slot, 0), bytes)
                    .await
                    .map_err(|e| io(format!("reading bitmap slot {slot}: {e}")))?;
                if bits.iter().any(|&b| b != 0) {
                    return Err(GrowError::BitmapInUse {
                        path: p,
                        new_size,
                        slot,
                    });
                }
            }
        }
        // Extend the backing (a regular file; a block device must already
        // be large enough) and make the new length durable.
        let need = new.backing_len();
        let path = self.path.clone();
        let before = tokio::task::spawn_blocking(move || extend_backing(&path, need))
            .await
            .map_err(|e| io(format!("extending the backing: {e}")))?
            .map_err(|why| GrowError::Backing {
                path: p.clone(),
                need,
                why,
            })?;
        // Whatever lay in a pre-existing tail (or on a block device) past the
        // old end is zeroed: the new area reads as zeroes on every replica.
        let old_end = cur.backing_len();
        let dirty_end = before.min(need);
        if dirty_end > old_end {
            self.engine
                .write_zeroes(old_end, dirty_end - old_end, true)
                .await
                .map_err(|e| io(format!("zeroing the new area: {e}")))?;
        }
        self.engine
            .flush()
            .await
            .map_err(|e| io(format!("flushing: {e}")))?;
        let other = 1 - index;
        let (_, res) = self
            .engine
            .write(
                superblock::COPY_OFFSETS[other],
                IoBuf::from_slice(&new.encode()),
                true,
            )
            .await;
        res.map_err(|e| {
            io(format!(
                "writing superblock copy {}: {e}",
                ["A", "B"][other]
            ))
        })?;
        self.engine
            .flush()
            .await
            .map_err(|e| io(format!("flushing: {e}")))?;
        *self.superblock.lock().unwrap_or_else(|e| e.into_inner()) = (new, other);
        self.size.store(new_size, Ordering::Release);
        tracing::info!(path = %p, from = cur.size, to = new_size, "volume grown");
        Ok(cur.size)
    }

    /// A diskless client's volume (R28) takes the size its replicas grew
    /// to (R29): nothing is on disk.
    pub fn grow_diskless(&self, new_size: u64) -> Result<(), String> {
        let mut sb = self.superblock.lock().unwrap_or_else(|e| e.into_inner());
        if new_size < sb.0.size {
            return Err(format!("cannot shrink from {} to {new_size}", sb.0.size));
        }
        sb.0.size = new_size;
        self.size.store(new_size, Ordering::Release);
        Ok(())
    }

    /// Backing path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Data-area size in bytes.
    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    /// Logical block size.
    pub fn block_size(&self) -> u32 {
        self.block_size
    }

    /// Whether writes are refused.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// The storage engine.
    pub fn engine(&self) -> &Arc<dyn Engine> {
        &self.engine
    }

    fn range(&self, op: Op, offset: u64, len: u64) -> IoResult<u64> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size() => Ok(self.data_offset + offset),
            _ => Err(IoError::new(
                op,
                offset,
                len,
                std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "range outside the volume's data area",
                ),
            )),
        }
    }

    fn writable(&self, op: Op, offset: u64, len: u64) -> IoResult<()> {
        if self.read_only {
            return Err(IoError::new(
                op,
                offset,
                len,
                std::io::Error::from_raw_os_error(libc::EROFS),
            ));
        }
        Ok(())
    }

    /// Reads `buf.len()` bytes at data offset `offset`.
    pub async fn read(&self, offset: u64, buf: IoBuf) -> (IoBuf, IoResult<()>) {
        if let Err(e) = buf.check_readable() {
            return (buf, Err(IoError::new(Op::Read, offset, 0, e)));
        }
        match self.range(Op::Read, offset, buf.len() as u64) {
            Ok(at) => self.engine.read(at, buf).await,
            Err(e) => (buf, Err(e)),
        }
    }

    /// Writes `buf` at data offset `offset`; durable on completion if `fua`.
    pub async fn write(&self, offset: u64, buf: IoBuf, fua: bool) -> (IoBuf, IoResult<()>) {
        let len = buf.len() as u64;
        match self
            .writable(Op::Write, offset, len)
            .and_then(|()| self.range(Op::Write, offset, len))
        {
            Ok(at) => self.engine.write(at, buf, fua).await,
            Err(e) => (buf, Err(e)),
        }
    }

    /// Makes every completed write durable.
    pub async fn flush(&self) -> IoResult<()> {
        self.engine.flush().await
    }

    /// Discards a range (reads back as zeroes); durable on completion if `fua`.
    pub async fn trim(&self, offset: u64, len: u64, fua: bool) -> IoResult<()> {
        self.writable(Op::Trim, offset, len)?;
        let at = self.range(Op::Trim, offset, len)?;
        self.engine.trim(at, len).await?;
        if fua {
            self.engine.flush().await?;
        }
        Ok(())
    }

    /// Writes one metadata block (replica metadata record or bitmap page)
    /// at backing offset `at`, durably. Refused outside the metadata area
    /// past the superblocks.
    pub async fn write_meta(&self, at: u64, data: &[u8]) -> IoResult<()> {
        let len = data.len() as u64;
        let first = 2 * SUPERBLOCK_SIZE as u64;
        if at < first || at.saturating_add(len) > self.data_offset {
            return Err(IoError::new(
                Op::Write,
                at,
                len,
                std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "metadata write outside the metadata area",
                ),
            ));
        }
        self.writable(Op::Write, at, len)?;
        let (_, res) = self.engine.write(at, IoBuf::from_slice(data), true).await;
        res
    }

    /// Reads `len` bytes of the metadata area at backing offset `at`.
    pub async fn read_meta(&self, at: u64, len: usize) -> IoResult<IoBuf> {
        if at.saturating_add(len as u64) > self.data_offset {
            return Err(IoError::new(
                Op::Read,
                at,
                len as u64,
                std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "metadata read outside the metadata area",
                ),
            ));
        }
        let (buf, res) = self.engine.read(at, IoBuf::zeroed(len)).await;
        res.map(|()| buf)
    }

    /// Where this volume's bitmaps live at `chunk` bytes per bit.
    pub fn bitmap_layout(&self, chunk: u32) -> Result<Layout, String> {
        Layout::new(self.size(), chunk, self.data_offset)
    }

    /// Reads the replica metadata (generations, bitmaps; `docs/on-disk-format.md`).
    /// A volume whose record was never written (new, or created before
    /// replication metadata existed) gets the metadata of a new volume with
    /// `chunk` bytes per bitmap bit.
    pub async fn load_replica_meta(&self, chunk: u32) -> anyhow::Result<(LoadedMeta, Layout)> {
        let p = self.path.display();
        let rec = self
            .read_meta(meta::RECORD_OFFSETS[0], 2 * meta::RECORD_SIZE)
            .await
            .map_err(|e| anyhow::anyhow!("{p}: reading the replica metadata: {e}"))?;
        let (a, b) = rec.split_at(meta::RECORD_SIZE);
        let chunk = match meta::select(a, b) {
            Ok(Some((r, _))) => r.chunk,
            Ok(None) => chunk,
            Err(e) => anyhow::bail!("{p}: {e}"),
        };
        let sb = &self.superblock();
        let layout =
            Layout::new(sb.size, chunk, sb.data_offset).map_err(|e| anyhow::anyhow!("{p}: {e}"))?;
        let mut slots: Vec<Vec<u8>> = Vec::new();
        for s in 0..meta::SLOTS {
            let bytes = usize::try_from(layout.slot_bytes).unwrap_or(usize::MAX);
            let buf = self
                .read_meta(layout.page_offset(s, 0), bytes)
                .await
                .map_err(|e| anyhow::anyhow!("{p}: reading bitmap slot {s}: {e}"))?;
            slots.push(buf.to_vec());
        }
        let loaded = LoadedMeta::from_parts(a, b, sb.size, chunk, DiskState::UpToDate, |s, n| {
            let n = usize::try_from(n).unwrap_or(usize::MAX);
            slots[s][..n.min(slots[s].len())].to_vec()
        })
        .map_err(|e| anyhow::anyhow!("{p}: {e}"))?;
        let al = self
            .read_meta(meta::AL_OFFSETS[0], 2 * meta::RECORD_SIZE)
            .await
            .map_err(|e| anyhow::anyhow!("{p}: reading the activity log: {e}"))?;
        let (al_a, al_b) = al.split_at(meta::RECORD_SIZE);
        let loaded = loaded
            .with_activity_log(al_a, al_b)
            .map_err(|e| anyhow::anyhow!("{p}: {e}"))?;
        Ok((loaded, layout))
    }

    /// Zeroes a range; `may_punch` allows deallocating it.
    pub async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_punch: bool,
        fua: bool,
    ) -> IoResult<()> {
        self.writable(Op::WriteZeroes, offset, len)?;
        let at = self.range(Op::WriteZeroes, offset, len)?;
        self.engine.write_zeroes(at, len, may_punch).await?;
        if fua {
            self.engine.flush().await?;
        }
        Ok(())
    }
}

/// Extends the backing at `path` to at least `need` bytes and syncs it;
/// returns its length before. A block device (or a file that cannot grow)
/// must already be large enough.
fn extend_backing(path: &Path, need: u64) -> Result<u64, String> {
    use std::io::{Seek, SeekFrom};
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|e| format!("opening: {e}"))?;
    let meta = f.metadata().map_err(|e| format!("stat: {e}"))?;
    let len = if meta.is_file() {
        meta.len()
    } else {
        f.seek(SeekFrom::End(0))
            .map_err(|e| format!("measuring: {e}"))?
    };
    if len >= need {
        return Ok(len);
    }
    if !meta.is_file() {
        return Err(format!(
            "it is a {len}-byte device: grow the device (e.g. lvextend) first"
        ));
    }
    f.set_len(need).map_err(|e| format!("set_len: {e}"))?;
    f.sync_all().map_err(|e| format!("fsync: {e}"))?;
    Ok(len)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::sync::SyncEngine;
    use crate::storage::{Backing, DirectIo};
    use std::os::unix::fs::FileExt;

    const MIB: u64 = 1 << 20;

    async fn open(path: &Path) -> Volume {
        let engine = Arc::new(SyncEngine::new(
            Backing::open(path, DirectIo::Off, false, 512).expect("backing"),
        ));
        Volume::open(engine, path, &Expect::default(), false)
            .await
            .expect("open")
    }

    /// A 4 MiB volume in a file, its data area filled with a pattern.
    async fn formatted(dir: &Path) -> (PathBuf, Superblock) {
        let path = dir.join("v.img");
        let sb = Superblock::new([3; 16], "v", 4 * MIB, 512, 0).expect("sb");
        let f = std::fs::File::create(&path).expect("create");
        f.set_len(sb.backing_len()).expect("set_len");
        let engine = SyncEngine::new(Backing::open(&path, DirectIo::Off, false, 512).expect("b"));
        create(&engine, &path, sb.clone(), false)
            .await
            .expect("format");
        let pattern: Vec<u8> = (0..sb.size).map(|i| (i * 7 % 251) as u8).collect();
        f.write_all_at(&pattern, sb.data_offset).expect("pattern");
        (path, sb)
    }

    #[tokio::test]
    async fn grow_keeps_data_zeroes_the_new_area_and_survives_reopen() {
        let dir = tempfile::tempdir().expect("tmp");
        let (path, sb) = formatted(dir.path()).await;
        // Garbage in a pre-existing tail past the old end must not show
        // through in the grown area.
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .expect("o");
        f.write_all_at(&[0xEE; 4096], sb.backing_len() + 8192)
            .expect("tail");
        let v = open(&path).await;
        assert!(matches!(
            v.grow(2 * MIB).await,
            Err(GrowError::Refused {
                source: superblock::GrowError::Shrink { .. },
                ..
            })
        ));
        assert_eq!(v.grow(16 * MIB).await.expect("grow"), 4 * MIB);
        assert_eq!(v.size(), 16 * MIB);
        assert_eq!(v.superblock().seq, sb.seq + 1);
        let (old, res) = v.read(0, IoBuf::zeroed(4 * MIB as usize)).await;
        res.expect("read old");
        assert!(old
            .iter()
            .enumerate()
            .all(|(i, &b)| b == (i as u64 * 7 % 251) as u8));
        let (new, res) = v.read(4 * MIB, IoBuf::zeroed(12 * MIB as usize)).await;
        res.expect("read new");
        assert!(new.iter().all(|&b| b == 0), "grown area not zero");
        let (_, res) = v
            .write(16 * MIB - 4096, IoBuf::from_slice(&[9; 4096]), true)
            .await;
        res.expect("write at the new end");
        let (_, res) = v.read(16 * MIB, IoBuf::zeroed(512)).await;
        assert!(res.is_err(), "past the new end");
        // Idempotent.
        assert_eq!(v.grow(16 * MIB).await.expect("same size"), 16 * MIB);
        drop(v);
        let v = open(&path).await;
        assert_eq!(v.size(), 16 * MIB);
        let (end, res) = v.read(16 * MIB - 4096, IoBuf::zeroed(4096)).await;
        res.expect("read end");
        assert!(end.iter().all(|&b| b == 9));
    }

    #[tokio::test]
    async fn a_torn_superblock_update_leaves_the_old_size() {
        let dir = tempfile::tempdir().expect("tmp");
        let (path, sb) = formatted(dir.path()).await;
        let v = open(&path).await;
        v.grow(8 * MIB).await.expect("grow");
        drop(v);
        // The update went to copy B (A held seq 1 and won the tie); tear it.
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .expect("o");
        f.write_all_at(&[0xAB; 100], superblock::COPY_OFFSETS[1] + 50)
            .expect("tear");
        let v = open(&path).await;
        assert_eq!(v.size(), sb.size, "the old copy is in force");
        // And growing again writes the torn copy, not the good one.
        v.grow(8 * MIB).await.expect("grow again");
        drop(v);
        assert_eq!(open(&path).await.size(), 8 * MIB);
    }

    #[tokio::test]
    async fn growth_that_moves_bitmaps_with_set_bits_is_refused() {
        let dir = tempfile::tempdir().expect("tmp");
        let (path, _) = formatted(dir.path()).await;
        let v = open(&path).await;
        // 4 MiB → 8 MiB keeps one 4 KiB page per slot: nothing moves.
        v.write_meta(meta::BITMAP_AREA_OFFSET, &[1; 4096])
            .await
            .expect("mark");
        v.grow(8 * MIB).await.expect("same slot size");
        // 8 MiB → 512 MiB needs 4 pages per slot: slot 0 has set bits.
        let e = v.grow(512 * MIB).await.unwrap_err();
        assert!(matches!(e, GrowError::BitmapInUse { slot: 0, .. }), "{e}");
        assert_eq!(v.size(), 8 * MIB);
        v.write_meta(meta::BITMAP_AREA_OFFSET, &[0; 4096])
            .await
            .expect("clear");
        v.grow(512 * MIB).await.expect("clear bitmaps may move");
        // Beyond what the 2 MiB metadata area can describe.
        let e = v.grow(64 << 30).await.unwrap_err();
        assert!(e.to_string().contains("without moving its data"), "{e}");
    }
}
