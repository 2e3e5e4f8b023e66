//! Opening a volume's backing: a regular file or a block device, with
//! `O_DIRECT` when the filesystem or device accepts it.
//!
//! Also holds the blocking helpers shared by the engines for ranges that have
//! to read back as zeroes (`fallocate` modes, `BLKZEROOUT`, zero writes).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::os::unix::io::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};

use super::{IoBuf, IoError, IoResult, Op};

/// What a [`Backing`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackingKind {
    /// A regular file (sparse files are fine).
    File,
    /// A block device (`/dev/sdX`, `/dev/nvmeXnY`, a loop device, ...).
    BlockDevice,
}

/// Whether to open the backing with `O_DIRECT`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DirectIo {
    /// Use `O_DIRECT` when the backing accepts it and its alignment is not
    /// larger than the alignment the volume guarantees; buffered otherwise.
    #[default]
    Auto,
    /// Require `O_DIRECT`; opening fails when it cannot be used.
    On,
    /// Always use the page cache.
    Off,
}

/// Largest chunk written at once when a range has to be zeroed by writing.
pub(crate) const ZERO_CHUNK: usize = 1 << 20;

mod ioctls {
    // BLKGETSIZE64 = _IOR(0x12, 114, size_t); the kernel always stores a u64.
    nix::ioctl_read_bad!(
        blkgetsize64,
        nix::request_code_read!(0x12, 114, std::mem::size_of::<libc::size_t>()),
        u64
    );
    // BLKSSZGET = _IO(0x12, 104), stores an int.
    nix::ioctl_read_bad!(blksszget, nix::request_code_none!(0x12, 104), libc::c_int);
    // BLKZEROOUT = _IO(0x12, 127), takes {start, len} in bytes.
    nix::ioctl_write_ptr_bad!(blkzeroout, nix::request_code_none!(0x12, 127), [u64; 2]);
}

/// An open backing: the file descriptor plus what the engines need to know
/// about it (size, kind, direct-I/O alignment).
#[derive(Debug)]
pub struct Backing {
    file: File,
    kind: BackingKind,
    len: u64,
    direct: bool,
    align: u32,
    path: PathBuf,
}

fn with_path(path: &Path, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("{}: {}", path.display(), e))
}

fn open_err(path: &Path, e: io::Error) -> IoError {
    IoError::new(Op::Open, 0, 0, with_path(path, e))
}

fn in_use() -> io::Error {
    io::Error::new(
        io::ErrorKind::ResourceBusy,
        "in use: another process (a running tandemd?) holds a lock on this backing",
    )
}

/// Whether an error means "this operation is not supported here".
pub(crate) fn is_unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::ENOTTY) | Some(libc::ENOSYS)
    ) || e.kind() == io::ErrorKind::Unsupported
}

/// Direct-I/O offset alignment of an open regular file, from
/// `statx(STATX_DIOALIGN)` (Linux 6.1+). `Ok(None)` when the kernel or
/// filesystem does not report it; `Ok(Some(0))` when the file does not
/// support direct I/O at all.
fn statx_dio_align(fd: RawFd) -> Option<u32> {
    // SAFETY: statx is plain old data; all-zero is a valid value.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: fd is open for the duration of the call, the path is a valid
    // NUL-terminated empty string (with AT_EMPTY_PATH it names fd itself) and
    // stx is a valid, writable statx buffer.
    let rc = unsafe {
        libc::statx(
            fd,
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut stx,
        )
    };
    if rc != 0 || stx.stx_mask & libc::STATX_DIOALIGN == 0 {
        return None;
    }
    Some(stx.stx_dio_offset_align)
}

fn blk_size64(fd: RawFd) -> io::Result<u64> {
    let mut size: u64 = 0;
    // SAFETY: fd is an open block device and `size` is a valid u64 for the
    // kernel to store into.
    unsafe { ioctls::blkgetsize64(fd, &mut size) }.map_err(io::Error::from)?;
    Ok(size)
}

fn blk_logical_block_size(fd: RawFd) -> io::Result<u32> {
    let mut ss: libc::c_int = 0;
    // SAFETY: fd is an open block device and `ss` is a valid int for the
    // kernel to store into.
    unsafe { ioctls::blksszget(fd, &mut ss) }.map_err(io::Error::from)?;
    Ok(u32::try_from(ss).unwrap_or(512).max(1))
}

fn open_raw(path: &Path, read_only: bool, direct: bool) -> io::Result<File> {
    let mut flags = libc::O_CLOEXEC;
    if direct {
        flags |= libc::O_DIRECT;
    }
    OpenOptions::new()
        .read(true)
        .write(!read_only)
        .custom_flags(flags)
        .open(path)
}

impl Backing {
    /// Opens `path` (a regular file or a block device) read-write, or
    /// read-only when `read_only`.
    ///
    /// `min_request_align` is the alignment (bytes) that the caller
    /// guarantees for every request's offset and length — the volume block
    /// size (512 or 4096); buffers are [`IoBuf`]s and always page-aligned.
    /// With [`DirectIo::Auto`], `O_DIRECT` is used only when the open
    /// succeeds (tmpfs and some FUSE filesystems refuse it with `EINVAL`),
    /// the backing reports direct-I/O support, an aligned probe read works,
    /// and the direct-I/O alignment is at most `min_request_align`;
    /// otherwise the backing is opened buffered. With [`DirectIo::On`] any of
    /// these failing is an error.
    pub fn open(
        path: &Path,
        direct: DirectIo,
        read_only: bool,
        min_request_align: u32,
    ) -> IoResult<Backing> {
        Self::open_unlocked(path, direct, read_only, min_request_align)
    }

    /// Locks the backing with `flock`: `exclusive` for a writer, shared for
    /// a reader. `tandemd` locks every backing it serves and `tandemctl
    /// create` locks the backing it formats, so two processes never write
    /// one backing. Fails with "in use" when another process holds a
    /// conflicting lock. The lock lives as long as this `Backing`.
    pub fn lock(&self, exclusive: bool) -> IoResult<()> {
        if self.try_lock(exclusive)? {
            Ok(())
        } else {
            Err(open_err(&self.path, in_use()))
        }
    }

    /// Like [`Backing::lock`], but waits up to `wait` (polling) while
    /// another process holds a conflicting lock.
    ///
    /// A `tandemd` killed with I/O in flight keeps its lock for a moment
    /// after it has exited and been reaped: the kernel tears its io_uring
    /// down asynchronously, and the backing's file — with its `flock` — is
    /// closed only when the ring's last request has completed. A daemon
    /// restarted at once (a supervisor, a failover script) waits that out
    /// instead of refusing to start.
    pub async fn lock_waiting(&self, exclusive: bool, wait: std::time::Duration) -> IoResult<()> {
        let deadline = std::time::Instant::now() + wait;
        let mut logged = false;
        loop {
            if self.try_lock(exclusive)? {
                return Ok(());
            }
            if std::time::Instant::now() >= deadline {
                return Err(open_err(&self.path, in_use()));
            }
            if !logged {
                tracing::info!(path = %self.path.display(), wait_s = wait.as_secs(),
                    "backing locked by another process; waiting for it to be released");
                logged = true;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    /// One non-blocking `flock`: `Ok(false)` when another process holds a
    /// conflicting lock.
    fn try_lock(&self, exclusive: bool) -> IoResult<bool> {
        let op = if exclusive {
            libc::LOCK_EX
        } else {
            libc::LOCK_SH
        };
        // SAFETY: flock on a descriptor we own; no memory is involved.
        if unsafe { libc::flock(self.fd(), op | libc::LOCK_NB) } != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                return Ok(false);
            }
            return Err(open_err(&self.path, e));
        }
        Ok(true)
    }

    fn open_unlocked(
        path: &Path,
        direct: DirectIo,
        read_only: bool,
        min_request_align: u32,
    ) -> IoResult<Backing> {
        let want_direct = direct != DirectIo::Off;
        if want_direct {
            match open_raw(path, read_only, true) {
                Ok(file) => match Self::probe_direct(path, file, min_request_align) {
                    Ok(b) => return Ok(b),
                    Err(e) if direct == DirectIo::On => return Err(open_err(path, e)),
                    Err(e) => {
                        tracing::debug!(path = %path.display(), error = %e,
                            "direct I/O not usable, falling back to buffered I/O");
                    }
                },
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) && direct == DirectIo::Auto => {
                    tracing::debug!(path = %path.display(),
                        "O_DIRECT refused by the filesystem, using buffered I/O");
                }
                Err(e) => return Err(open_err(path, e)),
            }
        }
        let file = open_raw(path, read_only, false).map_err(|e| open_err(path, e))?;
        let (kind, len) = Self::describe(&file).map_err(|e| open_err(path, e))?;
        Ok(Backing {
            file,
            kind,
            len,
            direct: false,
            align: 1,
            path: path.to_path_buf(),
        })
    }

    /// Checks that an `O_DIRECT` descriptor is usable and builds the backing.
    fn probe_direct(path: &Path, file: File, min_request_align: u32) -> io::Result<Backing> {
        let (kind, len) = Self::describe(&file)?;
        let fd = file.as_raw_fd();
        let align = match kind {
            BackingKind::BlockDevice => blk_logical_block_size(fd)?,
            BackingKind::File => match statx_dio_align(fd) {
                Some(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::Unsupported,
                        "the filesystem does not support direct I/O on this file",
                    ))
                }
                Some(a) => a,
                None => 512,
            },
        };
        if align > min_request_align.max(1) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "direct-I/O alignment {align} is larger than the request alignment \
                     {min_request_align}"
                ),
            ));
        }
        // Some filesystems accept O_DIRECT at open time and refuse it at I/O
        // time; one aligned read tells.
        let probe_len = (align as u64).max(512);
        if len >= probe_len {
            let mut buf = IoBuf::zeroed(probe_len as usize);
            file.read_exact_at(&mut buf, 0)?;
        }
        Ok(Backing {
            file,
            kind,
            len,
            direct: true,
            align,
            path: path.to_path_buf(),
        })
    }

    fn describe(file: &File) -> io::Result<(BackingKind, u64)> {
        let meta = file.metadata()?;
        let ft = meta.file_type();
        if ft.is_block_device() {
            Ok((BackingKind::BlockDevice, blk_size64(file.as_raw_fd())?))
        } else if ft.is_file() {
            Ok((BackingKind::File, meta.len()))
        } else {
            Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "backing is neither a regular file nor a block device",
            ))
        }
    }

    /// Creates the regular file `path` if missing and extends it (sparse) to
    /// `len` bytes if it is shorter; never shrinks it.
    pub fn create_file(path: &Path, len: u64) -> IoResult<()> {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)
            .map_err(|e| open_err(path, e))?;
        let cur = f.metadata().map_err(|e| open_err(path, e))?.len();
        if cur < len {
            f.set_len(len).map_err(|e| open_err(path, e))?;
        }
        Ok(())
    }

    /// Regular file or block device.
    pub fn kind(&self) -> BackingKind {
        self.kind
    }

    /// Size in bytes, as measured when opened.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the backing has no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether the descriptor uses `O_DIRECT`.
    pub fn is_direct(&self) -> bool {
        self.direct
    }

    /// Alignment that offsets, lengths and buffer addresses must have: the
    /// direct-I/O alignment with `O_DIRECT`, 1 otherwise.
    pub fn alignment(&self) -> u32 {
        self.align
    }

    /// The path it was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The raw file descriptor (owned by the backing).
    pub fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// The open file.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Checks a data request against the direct-I/O alignment: with
    /// `O_DIRECT`, misaligned requests fail with `EINVAL` instead of being
    /// bounced (the volume layer never sends them, see [`Backing::open`]).
    pub(crate) fn check_aligned(&self, offset: u64, len: u64, addr: usize) -> io::Result<()> {
        let a = self.align as u64;
        if a > 1 && (offset % a != 0 || len % a != 0 || addr as u64 % a != 0) {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        Ok(())
    }

    /// The `fallocate` modes to try, in order, to make a range read back as
    /// zeroes. Block devices accept `PUNCH_HOLE` (discard that guarantees
    /// zeroes) and `ZERO_RANGE` (`BLKZEROOUT`) since Linux 4.9.
    pub(crate) fn zero_modes(&self, may_punch: bool) -> &'static [libc::c_int] {
        const PUNCH: libc::c_int = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        const ZERO: libc::c_int = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;
        if may_punch {
            &[PUNCH, ZERO]
        } else {
            &[ZERO]
        }
    }

    /// Blocking `fallocate(2)`.
    pub(crate) fn fallocate_blocking(
        &self,
        mode: libc::c_int,
        offset: u64,
        len: u64,
    ) -> io::Result<()> {
        let off = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        let l =
            libc::off_t::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        loop {
            // SAFETY: plain syscall on a descriptor we own; no memory is passed.
            let rc = unsafe { libc::fallocate(self.fd(), mode, off, l) };
            if rc == 0 {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }

    /// Blocking `BLKZEROOUT` on a block device.
    pub(crate) fn blkzeroout_blocking(&self, offset: u64, len: u64) -> io::Result<()> {
        if self.kind != BackingKind::BlockDevice {
            return Err(io::Error::from_raw_os_error(libc::ENOTTY));
        }
        let range = [offset, len];
        loop {
            // SAFETY: fd is an open block device; `range` is a valid [u64; 2]
            // that outlives the call.
            match unsafe { ioctls::blkzeroout(self.fd(), &range) } {
                Ok(_) => return Ok(()),
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Blocking zero writes in chunks of at most [`ZERO_CHUNK`] bytes.
    pub(crate) fn write_zeroes_by_writing(&self, offset: u64, len: u64) -> io::Result<()> {
        let mut buf = IoBuf::zeroed((len.min(ZERO_CHUNK as u64)) as usize);
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(ZERO_CHUNK as u64) as usize;
            buf.set_len(n);
            self.file.write_all_at(&buf, offset + done)?;
            done += n as u64;
        }
        Ok(())
    }

    /// Blocking: makes `[offset, offset + len)` read back as zeroes, trying
    /// the `fallocate` modes, then `BLKZEROOUT` (block devices), then writes.
    pub(crate) fn zero_range_blocking(
        &self,
        offset: u64,
        len: u64,
        may_punch: bool,
    ) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        for &mode in self.zero_modes(may_punch) {
            match self.fallocate_blocking(mode, offset, len) {
                Ok(()) => return Ok(()),
                Err(e) if is_unsupported(&e) => continue,
                Err(e) => return Err(e),
            }
        }
        if self.kind == BackingKind::BlockDevice {
            match self.blkzeroout_blocking(offset, len) {
                Ok(()) => return Ok(()),
                Err(e) if is_unsupported(&e) => {}
                Err(e) => return Err(e),
            }
        }
        self.write_zeroes_by_writing(offset, len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_open_and_describe() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("b.img");
        Backing::create_file(&p, 1 << 20).unwrap();
        Backing::create_file(&p, 4096).unwrap(); // never shrinks
        let b = Backing::open(&p, DirectIo::Off, false, 512).unwrap();
        assert_eq!(b.kind(), BackingKind::File);
        assert_eq!(b.len(), 1 << 20);
        assert!(!b.is_direct());
        assert_eq!(b.alignment(), 1);
        assert_eq!(b.path(), p.as_path());

        let b = Backing::open(&p, DirectIo::Auto, true, 4096).unwrap();
        if b.is_direct() {
            assert!(b.alignment() >= 1 && b.alignment() <= 4096);
        }
        // A request alignment of 1 can never use O_DIRECT with Auto...
        let b = Backing::open(&p, DirectIo::Auto, true, 1).unwrap();
        assert!(!b.is_direct() || b.alignment() == 1);
        // ...and is an error with On (unless the alignment really is 1).
        if let Err(e) = Backing::open(&p, DirectIo::On, true, 1) {
            assert_eq!(e.op, Op::Open);
            assert!(e.to_string().contains("b.img"), "{e}");
        }
    }

    #[test]
    fn missing_file_error_names_path() {
        let e =
            Backing::open(Path::new("/nonexistent/x.img"), DirectIo::Auto, false, 512).unwrap_err();
        assert_eq!(e.op, Op::Open);
        assert_eq!(e.source.kind(), io::ErrorKind::NotFound);
        assert!(e.to_string().contains("/nonexistent/x.img"), "{e}");
    }

    #[test]
    fn direct_io_deserializes_lowercase() {
        #[derive(serde::Deserialize)]
        struct C {
            d: DirectIo,
        }
        let c: C = serde_json::from_str(r#"{"d":"on"}"#).unwrap();
        assert_eq!(c.d, DirectIo::On);
        let c: C = serde_json::from_str(r#"{"d":"auto"}"#).unwrap();
        assert_eq!(c.d, DirectIo::Auto);
        let c: C = serde_json::from_str(r#"{"d":"off"}"#).unwrap();
        assert_eq!(c.d, DirectIo::Off);
        assert_eq!(DirectIo::default(), DirectIo::Auto);
    }
}
