//! The portable engine: `pread`/`pwrite` on tokio's blocking thread pool.

use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use super::{Backing, BoxFuture, Engine, IoBuf, IoError, IoResult, Op};

/// An [`Engine`] doing positioned blocking I/O on `spawn_blocking` threads.
///
/// FUA writes are a write followed by `fdatasync`; flush is `fdatasync`.
/// Trim and write-zeroes use `fallocate` (`PUNCH_HOLE` / `ZERO_RANGE`, both
/// with `KEEP_SIZE`), then `BLKZEROOUT` on block devices, then zero writes.
///
/// With `O_DIRECT`, requests whose offset, length or buffer address is not a
/// multiple of [`Engine::alignment`] fail with `EINVAL` (no bounce buffering;
/// [`Backing::open`] picks buffered I/O when the volume's block size is
/// smaller than the direct-I/O alignment).
///
/// Must be used from within a tokio runtime. Cloning is cheap.
#[derive(Clone, Debug)]
pub struct SyncEngine {
    backing: Arc<Backing>,
}

impl SyncEngine {
    /// Wraps an open backing.
    pub fn new(backing: Backing) -> SyncEngine {
        SyncEngine {
            backing: Arc::new(backing),
        }
    }

    /// The backing.
    pub fn backing(&self) -> &Backing {
        &self.backing
    }
}

fn join_error(e: tokio::task::JoinError) -> io::Error {
    io::Error::other(format!("blocking I/O task failed: {e}"))
}

impl Engine for SyncEngine {
    fn kind(&self) -> &'static str {
        "sync"
    }

    fn len(&self) -> u64 {
        self.backing.len()
    }

    fn alignment(&self) -> u32 {
        self.backing.alignment()
    }

    fn read(&self, offset: u64, mut buf: IoBuf) -> BoxFuture<(IoBuf, IoResult<()>)> {
        let b = self.backing.clone();
        Box::pin(async move {
            let len = buf.len();
            let task = tokio::task::spawn_blocking(move || {
                let r = b
                    .check_aligned(offset, len as u64, buf.as_ptr() as usize)
                    .and_then(|()| b.file().read_exact_at(&mut buf, offset));
                (buf, r)
            });
            match task.await {
                Ok((buf, r)) => (
                    buf,
                    r.map_err(|e| IoError::new(Op::Read, offset, len as u64, e)),
                ),
                // The buffer went down with the task; hand back a fresh one.
                Err(e) => (
                    IoBuf::zeroed(len),
                    Err(IoError::new(Op::Read, offset, len as u64, join_error(e))),
                ),
            }
        })
    }

    fn write(&self, offset: u64, buf: IoBuf, fua: bool) -> BoxFuture<(IoBuf, IoResult<()>)> {
        let b = self.backing.clone();
        Box::pin(async move {
            let len = buf.len();
            let task = tokio::task::spawn_blocking(move || {
                let r = b
                    .check_aligned(offset, len as u64, buf.as_ptr() as usize)
                    .and_then(|()| b.file().write_all_at(&buf, offset))
                    .and_then(|()| if fua { b.file().sync_data() } else { Ok(()) });
                (buf, r)
            });
            match task.await {
                Ok((buf, r)) => (
                    buf,
                    r.map_err(|e| IoError::new(Op::Write, offset, len as u64, e)),
                ),
                Err(e) => (
                    IoBuf::zeroed(len),
                    Err(IoError::new(Op::Write, offset, len as u64, join_error(e))),
                ),
            }
        })
    }

    fn flush(&self) -> BoxFuture<IoResult<()>> {
        let b = self.backing.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || b.file().sync_data())
                .await
                .map_err(join_error)
                .and_then(|r| r)
                .map_err(|e| IoError::new(Op::Flush, 0, 0, e))
        })
    }

    fn trim(&self, offset: u64, len: u64) -> BoxFuture<IoResult<()>> {
        self.zero(Op::Trim, offset, len, true)
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_punch: bool) -> BoxFuture<IoResult<()>> {
        self.zero(Op::WriteZeroes, offset, len, may_punch)
    }
}

impl SyncEngine {
    fn zero(&self, op: Op, offset: u64, len: u64, may_punch: bool) -> BoxFuture<IoResult<()>> {
        let b = self.backing.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || b.zero_range_blocking(offset, len, may_punch))
                .await
                .map_err(join_error)
                .and_then(|r| r)
                .map_err(|e| IoError::new(op, offset, len, e))
        })
    }
}
