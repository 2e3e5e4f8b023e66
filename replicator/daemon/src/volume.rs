//! A volume: a backing with a checked superblock, exposing its data area.
//!
//! Opening a volume reads both superblock copies, refuses a backing that is
//! blank, corrupt, too small or that belongs to another volume, and repairs a
//! damaged copy from the good one. All I/O offsets are data-area offsets; the
//! volume adds the superblock's `data_offset` and refuses ranges outside the
//! data area (the frontend has already validated them; this is a second
//! guard, never a panic).

use std::path::{Path, PathBuf};
use std::sync::Arc;

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
    superblock: Superblock,
    engine: Arc<dyn Engine>,
    read_only: bool,
}

impl std::fmt::Debug for Volume {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Volume")
            .field("path", &self.path)
            .field("name", &self.superblock.name)
            .field("uuid", &self.superblock.uuid_string())
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
            superblock: sb,
            engine,
            read_only,
        })
    }

    /// The superblock in force.
    pub fn superblock(&self) -> &Superblock {
        &self.superblock
    }

    /// Backing path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Data-area size in bytes.
    pub fn size(&self) -> u64 {
        self.superblock.size
    }

    /// Logical block size.
    pub fn block_size(&self) -> u32 {
        self.superblock.block_size
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
            Some(end) if end <= self.superblock.size => Ok(self.superblock.data_offset + offset),
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
        if at < first || at.saturating_add(len) > self.superblock.data_offset {
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
        if at.saturating_add(len as u64) > self.superblock.data_offset {
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
        Layout::new(self.superblock.size, chunk, self.superblock.data_offset)
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
        let sb = &self.superblock;
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
