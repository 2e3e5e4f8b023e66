//! Storage engines: byte-addressed access to a volume's backing (a regular
//! file or a block device, or memory in tests).
//!
//! One [`Engine`] trait, three implementations:
//! * [`uring::UringEngine`] — io_uring, `O_DIRECT` when the backing allows it;
//!   the default on Linux.
//! * [`sync::SyncEngine`] — portable `pread`/`pwrite` on tokio's blocking pool.
//! * [`memory::MemoryEngine`] — a heap buffer, for tests and the simulator.
//!
//! All three pass the same conformance suite (`conformance.rs`).
//! [`faulty::FaultyEngine`] wraps any of them for fault injection (reads or
//! writes fail with `EIO` on an admin request).
//!
//! Offsets are absolute offsets in the backing; the volume layer
//! (`crate::volume`) adds the data-area offset and checks ranges.

use std::future::Future;
use std::pin::Pin;

mod backing;
mod buf;
#[cfg(test)]
mod conformance;
pub mod faulty;
pub mod memory;
pub mod none;
pub mod sync;
pub mod uring;

pub use backing::{Backing, BackingKind, DirectIo};
pub use buf::{IoBuf, PooledBytes};

/// A boxed, sendable future, as returned by [`Engine`] methods.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// The operation an [`IoError`] happened in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Read.
    Read,
    /// Write.
    Write,
    /// Flush (fdatasync).
    Flush,
    /// Trim (punch hole / discard).
    Trim,
    /// Write zeroes.
    WriteZeroes,
    /// Opening or sizing the backing.
    Open,
}

/// A storage error: what failed, where, and the OS error.
#[derive(Debug, thiserror::Error)]
#[error("{op:?} of {len} bytes at backing offset {offset} failed: {source}")]
pub struct IoError {
    /// The operation.
    pub op: Op,
    /// Backing offset.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
    /// The underlying error.
    #[source]
    pub source: std::io::Error,
}

impl IoError {
    /// Builds an error.
    pub fn new(op: Op, offset: u64, len: u64, source: std::io::Error) -> Self {
        IoError {
            op,
            offset,
            len,
            source,
        }
    }
}

/// Result of a storage operation.
pub type IoResult<T> = Result<T, IoError>;

/// Byte-addressed asynchronous access to a backing.
///
/// Contract (enforced by the conformance suite):
/// * `read` fills the whole buffer or fails; `write` writes the whole buffer
///   or fails. Short transfers are retried inside the engine.
/// * A write is visible to every later read once its future completed.
/// * `write` with `fua = true` is durable when it completes; `flush` makes
///   every write completed before the call durable.
/// * `trim` and `write_zeroes` make the range read back as zeroes
///   (`write_zeroes` with `may_punch = false` keeps the range allocated).
/// * Futures own their buffers; dropping a future before it completes never
///   frees memory the kernel is still writing into.
/// * Offsets and lengths are the caller's to check against [`Engine::len`].
pub trait Engine: Send + Sync + 'static {
    /// Short name for logs and metrics: `uring`, `sync` or `memory`.
    fn kind(&self) -> &'static str;
    /// Size of the backing in bytes.
    fn len(&self) -> u64;
    /// Whether the backing is empty (never true for a usable volume).
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Alignment (bytes) that buffers, offsets and lengths must have: the
    /// direct-I/O alignment when `O_DIRECT` is in use, 1 otherwise.
    fn alignment(&self) -> u32;
    /// Reads `buf.len()` bytes at `offset` into `buf`.
    fn read(&self, offset: u64, buf: IoBuf) -> BoxFuture<(IoBuf, IoResult<()>)>;
    /// Writes `buf` at `offset`; durable on completion when `fua`.
    fn write(&self, offset: u64, buf: IoBuf, fua: bool) -> BoxFuture<(IoBuf, IoResult<()>)>;
    /// Makes every completed write durable.
    fn flush(&self) -> BoxFuture<IoResult<()>>;
    /// Discards a range; it reads back as zeroes.
    fn trim(&self, offset: u64, len: u64) -> BoxFuture<IoResult<()>>;
    /// Writes zeroes over a range; `may_punch` allows deallocating it.
    fn write_zeroes(&self, offset: u64, len: u64, may_punch: bool) -> BoxFuture<IoResult<()>>;
}
