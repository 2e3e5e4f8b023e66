//! The built-in FUSE attacher (`tandem-csi fuse-nbd`): a FUSE file system
//! with one file, `nbd`, whose bytes are an NBD export, for a loop device to
//! turn into a block device where the kernel has no `nbd` driver.
//!
//! It does what `nbdfuse` does, plus the one thing `nbdfuse` cannot: the
//! file **grows online**. `truncate -s SIZE` (`set_len`) on the file asks
//! the NBD server for the export's size again (a fresh handshake) and takes
//! the new size when the export has it; `losetup -c` then grows the loop
//! device (LOOP_SET_CAPACITY reads the file's size). Shrinking is refused.
//!
//! Each FUSE worker thread (16) borrows a connection from a pool (simple
//! replies, one request at a time per connection); a connection that fails
//! is dropped and the request answered with `EIO`, the next one connects
//! anew; so are connections opened before a growth (the server checks a
//! connection's requests against the size it negotiated). Asynchronous
//! direct I/O and 64 background requests let a loop device keep many
//! requests in flight. The file is
//! opened with `FOPEN_DIRECT_IO`: every read and write
//! goes to the server, nothing is cached in this node's page cache (the
//! loop device uses direct I/O too, so a block the other Primary wrote
//! during a live migration is never served stale).

use std::ffi::OsStr;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, INodeNo, LockOwner, MountOption,
    OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyWrite,
    Request, WriteFlags,
};
use tandem_core::nbd::{
    decode_reply_header, Command, ReplyHeader, Request as NbdRequest, SIMPLE_REPLY_LEN,
};

/// The file's name in the mount.
pub const FILE_NAME: &str = "nbd";
const FILE_INO: INodeNo = INodeNo(2);
const TTL: Duration = Duration::from_secs(1);
/// FUSE worker threads (and at most as many NBD connections).
const THREADS: usize = 16;
/// Largest read or write the kernel sends in one request (it splits
/// larger ones; a 1 MiB request from an unaligned user buffer is refused by
/// the kernel's FUSE direct I/O otherwise).
const MAX_IO: u32 = 512 << 10;
/// Handshake and request timeout (a request the server does not answer in
/// this time fails with `EIO`).
const TIMEOUT: Duration = Duration::from_secs(60);

/// One NBD connection in the transmission phase.
struct Conn {
    s: UnixStream,
    cookie: u64,
    /// The file's size generation it was opened in: the server checks
    /// requests against the size a connection negotiated, so connections
    /// from before a growth are dropped rather than reused.
    gen: u64,
}

impl Conn {
    /// Opens a connection to `export` at `socket` in the transmission
    /// phase (simple replies), tagged `gen`; returns it and the export.
    fn open(
        socket: &Path,
        export: &str,
        gen: u64,
    ) -> anyhow::Result<(Conn, crate::nbd_kernel::Export)> {
        let (mut socks, e) = crate::nbd_kernel::handshake(socket, export, 1, TIMEOUT)?;
        let s = socks.pop().context("no connection")?;
        s.set_read_timeout(Some(TIMEOUT))?;
        s.set_write_timeout(Some(TIMEOUT))?;
        Ok((Conn { s, cookie: 0, gen }, e))
    }

    /// One request; `data` is the write payload, `out` receives read data.
    fn request(
        &mut self,
        command: Command,
        offset: u64,
        length: u32,
        data: &[u8],
        out: &mut [u8],
    ) -> std::io::Result<u32> {
        self.cookie += 1;
        let mut hdr = Vec::with_capacity(28);
        NbdRequest {
            flags: 0,
            command,
            cookie: self.cookie,
            offset,
            length,
        }
        .encode(&mut hdr);
        self.s.write_all(&hdr)?;
        if !data.is_empty() {
            self.s.write_all(data)?;
        }
        let mut r = [0u8; SIMPLE_REPLY_LEN];
        self.s.read_exact(&mut r)?;
        let bad = |why: String| std::io::Error::new(std::io::ErrorKind::InvalidData, why);
        match decode_reply_header(&r) {
            Ok(ReplyHeader::Simple { cookie, error }) if cookie == self.cookie => {
                if error == 0 && !out.is_empty() {
                    self.s.read_exact(out)?;
                }
                Ok(error)
            }
            Ok(h) => Err(bad(format!("unexpected NBD reply {h:?}"))),
            Err(e) => Err(bad(e.to_string())),
        }
    }
}

/// The file system: one regular file backed by an NBD export.
pub struct NbdFile {
    socket: PathBuf,
    export: String,
    size: AtomicU64,
    /// Bumped by every growth (see [`Conn::gen`]).
    gen: AtomicU64,
    read_only: bool,
    /// The export's minimum block size: requests to the server are
    /// aligned to it.
    block: u64,
    pool: Mutex<Vec<Conn>>,
    /// Serialises read-modify-write of unaligned writes.
    rmw: Mutex<()>,
}

impl NbdFile {
    /// Connects to export `export` of the NBD server at `socket` (to learn
    /// its size and check it is there).
    pub fn connect(socket: &Path, export: &str) -> anyhow::Result<NbdFile> {
        let (c, e) = Conn::open(socket, export, 0)?;
        Ok(NbdFile {
            socket: socket.to_path_buf(),
            export: export.to_string(),
            size: AtomicU64::new(e.size),
            gen: AtomicU64::new(0),
            read_only: e.flags & tandem_core::nbd::tflag::READ_ONLY != 0,
            block: u64::from(e.min_block.max(1)),
            pool: Mutex::new(vec![c]),
            rmw: Mutex::new(()),
        })
    }

    /// The export's size as the server tells a new connection, and that
    /// connection (kept for the pool).
    fn fresh(&self) -> anyhow::Result<(Conn, u64)> {
        // Read before the handshake: a growth meanwhile marks it old.
        let gen = self.gen.load(Ordering::Acquire);
        let (c, e) = Conn::open(&self.socket, &self.export, gen)?;
        Ok((c, e.size))
    }

    /// Runs one request on a pooled connection (a new one when none is
    /// free); errno on failure.
    fn io(
        &self,
        command: Command,
        offset: u64,
        length: u32,
        data: &[u8],
        out: &mut [u8],
    ) -> Result<(), Errno> {
        let pooled = self.pool.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let mut c = match pooled {
            Some(c) => c,
            None => match self.fresh() {
                Ok((c, _)) => c,
                Err(e) => {
                    tracing::warn!("NBD reconnect: {e:#}");
                    return Err(Errno::EIO);
                }
            },
        };
        match c.request(command, offset, length, data, out) {
            Ok(error) => {
                if c.gen == self.gen.load(Ordering::Acquire) {
                    self.pool.lock().unwrap_or_else(|e| e.into_inner()).push(c);
                }
                match error {
                    0 => Ok(()),
                    e => Err(Errno::from_i32(i32::try_from(e).unwrap_or(libc::EIO))),
                }
            }
            Err(e) => {
                tracing::warn!("NBD {command:?} at {offset}: {e}; dropping the connection");
                Err(Errno::EIO)
            }
        }
    }

    /// Reads `len` bytes at `offset`, through block-aligned requests (the
    /// kernel sends unaligned reads for unaligned user buffers).
    fn read_at(&self, offset: u64, len: u64) -> Result<Vec<u8>, Errno> {
        let start = offset - offset % self.block;
        let end = (offset + len).div_ceil(self.block) * self.block;
        let mut buf = vec![0u8; (end - start) as usize];
        let mut at = 0usize;
        while at < buf.len() {
            let n = (buf.len() - at).min(MAX_IO as usize);
            self.io(
                Command::Read,
                start + at as u64,
                n as u32,
                &[],
                &mut buf[at..at + n],
            )?;
            at += n;
        }
        let skip = (offset - start) as usize;
        buf.drain(..skip);
        buf.truncate(len as usize);
        Ok(buf)
    }

    /// Writes `data` at `offset`; an unaligned write reads the edge blocks,
    /// patches them and writes whole blocks (serialised against other
    /// unaligned writes; the loop device sends aligned ones only).
    fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), Errno> {
        let len = data.len() as u64;
        if offset % self.block == 0 && len % self.block == 0 {
            return self.io(Command::Write, offset, len as u32, data, &mut []);
        }
        let _one = self.rmw.lock().unwrap_or_else(|e| e.into_inner());
        let start = offset - offset % self.block;
        let end = (offset + len).div_ceil(self.block) * self.block;
        let mut buf = self.read_at(start, end - start)?;
        let skip = (offset - start) as usize;
        buf[skip..skip + data.len()].copy_from_slice(data);
        self.io(Command::Write, start, (end - start) as u32, &buf, &mut [])
    }

    fn attr(&self, ino: INodeNo) -> Option<FileAttr> {
        let (kind, perm, nlink, size) = match ino {
            INodeNo::ROOT => (FileType::Directory, 0o755, 2, 0),
            FILE_INO => (
                FileType::RegularFile,
                if self.read_only { 0o400 } else { 0o600 },
                1,
                self.size.load(Ordering::Acquire),
            ),
            _ => return None,
        };
        Some(FileAttr {
            ino,
            size,
            blocks: size.div_ceil(512),
            atime: UNIX_EPOCH,
            mtime: UNIX_EPOCH,
            ctime: UNIX_EPOCH,
            crtime: UNIX_EPOCH,
            kind,
            perm,
            nlink,
            uid: 0,
            gid: 0,
            rdev: 0,
            flags: 0,
            blksize: 4096,
        })
    }

    /// `set_len(size)`: grow to `size` if the export has it.
    fn grow_to(&self, size: u64) -> Result<(), Errno> {
        let cur = self.size.load(Ordering::Acquire);
        if size == cur {
            return Ok(());
        }
        if size < cur {
            tracing::warn!(from = cur, to = size, "refusing to shrink the NBD file");
            return Err(Errno::EPERM);
        }
        let (mut c, export) = self.fresh().map_err(|e| {
            tracing::warn!("NBD handshake for the new size: {e:#}");
            Errno::EIO
        })?;
        if export < size {
            tracing::warn!(export, asked = size, "the export is smaller than asked");
            return Err(Errno::ENOSPC);
        }
        // Connections negotiated before know the old size only (the server
        // refuses their requests past it): retire them, keep the new one.
        let mut pool = self.pool.lock().unwrap_or_else(|e| e.into_inner());
        c.gen = self.gen.fetch_add(1, Ordering::AcqRel) + 1;
        pool.clear();
        pool.push(c);
        drop(pool);
        self.size.fetch_max(size, Ordering::AcqRel);
        tracing::info!(from = cur, to = size, "NBD file grown");
        Ok(())
    }
}

impl Filesystem for NbdFile {
    fn init(&mut self, _req: &Request, config: &mut fuser::KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_write(MAX_IO);
        // Let the loop device's queue reach the server: many requests in
        // flight (the kernel default is 12).
        let _ = config.set_max_background(64);
        // Asynchronous direct I/O: the loop device's requests are in flight
        // together instead of one after the other.
        let _ = config.add_capabilities(fuser::InitFlags::FUSE_ASYNC_DIO);
        let _ = config.set_congestion_threshold(48);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.attr(FILE_INO) {
            Some(a) if parent == INodeNo::ROOT && name == FILE_NAME => {
                reply.entry(&TTL, &a, fuser::Generation(0))
            }
            _ => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.attr(ino) {
            Some(a) => reply.attr(&TTL, &a),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<fuser::TimeOrNow>,
        _mtime: Option<fuser::TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        if ino != FILE_INO {
            return reply.error(Errno::EPERM);
        }
        if let Some(size) = size {
            if let Err(e) = self.grow_to(size) {
                return reply.error(e);
            }
        }
        match self.attr(ino) {
            Some(a) => reply.attr(&TTL, &a),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if ino != FILE_INO {
            return reply.error(Errno::EISDIR);
        }
        if self.read_only && flags.0 & libc::O_ACCMODE != libc::O_RDONLY {
            return reply.error(Errno::EROFS);
        }
        reply.opened(FileHandle(0), FopenFlags::FOPEN_DIRECT_IO)
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        if ino != FILE_INO {
            return reply.error(Errno::EISDIR);
        }
        let end = self.size.load(Ordering::Acquire);
        let len = u64::from(size).min(end.saturating_sub(offset));
        if len == 0 {
            return reply.data(&[]);
        }
        match self.read_at(offset, len) {
            Ok(buf) => reply.data(&buf),
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        if ino != FILE_INO {
            return reply.error(Errno::EISDIR);
        }
        let end = self.size.load(Ordering::Acquire);
        let Ok(len) = u32::try_from(data.len()) else {
            return reply.error(Errno::EINVAL);
        };
        if offset.saturating_add(u64::from(len)) > end {
            return reply.error(Errno::ENOSPC);
        }
        match self.write_at(offset, data) {
            Ok(()) => reply.written(len),
            Err(e) => reply.error(e),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // close(): writes were sent to the server already (direct I/O).
        reply.ok()
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        match self.io(Command::Flush, 0, 0, &[], &mut []) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        if ino != INodeNo::ROOT {
            return reply.error(Errno::ENOTDIR);
        }
        let entries = [
            (INodeNo::ROOT, FileType::Directory, "."),
            (INodeNo::ROOT, FileType::Directory, ".."),
            (FILE_INO, FileType::RegularFile, FILE_NAME),
        ];
        for (i, (ino, kind, name)) in entries.into_iter().enumerate().skip(offset as usize) {
            if reply.add(ino, (i + 1) as u64, kind, name) {
                break;
            }
        }
        reply.ok()
    }
}

/// `tandem-csi fuse-nbd`: mounts the file system at `mountpoint` (the file
/// is `mountpoint/nbd`), writes `pidfile` once mounted, and serves until
/// unmounted (`fusermount3 -u`).
pub fn run(
    socket: &Path,
    export: &str,
    mountpoint: &Path,
    pidfile: Option<&Path>,
) -> anyhow::Result<()> {
    if !mountpoint.is_dir() {
        bail!("{}: not a directory", mountpoint.display());
    }
    let fs = NbdFile::connect(socket, export)
        .with_context(|| format!("NBD export {export:?} at {}", socket.display()))?;
    tracing::info!(
        export,
        size = fs.size.load(Ordering::Acquire),
        mountpoint = %mountpoint.display(),
        "serving the NBD export as a file"
    );
    let mut cfg = fuser::Config::default();
    cfg.mount_options = vec![
        MountOption::FSName(format!("tandem-nbd:{export}")),
        MountOption::Subtype("tandem-nbd".into()),
        MountOption::NoExec,
        MountOption::NoSuid,
        MountOption::NoDev,
        MountOption::CUSTOM(format!("max_read={MAX_IO}")),
    ];
    cfg.n_threads = Some(THREADS);
    cfg.clone_fd = true;
    let session = fuser::Session::new(fs, mountpoint, &cfg)
        .with_context(|| format!("mounting FUSE at {}", mountpoint.display()))?;
    if let Some(p) = pidfile {
        std::fs::write(p, format!("{}\n", std::process::id()))
            .with_context(|| format!("writing {}", p.display()))?;
    }
    session.run().context("serving FUSE requests")?;
    tracing::info!(mountpoint = %mountpoint.display(), "unmounted");
    Ok(())
}
