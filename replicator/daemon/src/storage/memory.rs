//! An in-memory engine for tests and the simulator.

use std::io;
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use super::{BoxFuture, Engine, IoBuf, IoError, IoResult, Op};

/// An [`Engine`] over a heap buffer. Every operation completes immediately;
/// flush is a no-op (nothing is ever lost). Alignment is 1. Ranges beyond
/// the end fail with `EINVAL` rather than panicking.
///
/// Cloning is cheap and clones share the data.
#[derive(Clone, Debug)]
pub struct MemoryEngine {
    data: Arc<RwLock<Vec<u8>>>,
    len: u64,
}

impl MemoryEngine {
    /// A zero-filled volume of `len` bytes.
    ///
    /// Panics if `len` does not fit in memory's address space (`usize`).
    pub fn new(len: u64) -> MemoryEngine {
        let n = usize::try_from(len).expect("MemoryEngine length fits in usize");
        MemoryEngine {
            data: Arc::new(RwLock::new(vec![0u8; n])),
            len,
        }
    }

    /// A copy of the whole contents (for tests).
    pub fn contents(&self) -> Vec<u8> {
        self.rd().clone()
    }

    fn rd(&self) -> RwLockReadGuard<'_, Vec<u8>> {
        // A panic while holding the lock cannot leave the bytes invalid.
        self.data.read().unwrap_or_else(|e| e.into_inner())
    }

    fn wr(&self) -> RwLockWriteGuard<'_, Vec<u8>> {
        self.data.write().unwrap_or_else(|e| e.into_inner())
    }

    fn range(&self, op: Op, offset: u64, len: u64) -> IoResult<std::ops::Range<usize>> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => Ok(offset as usize..end as usize),
            _ => Err(IoError::new(
                op,
                offset,
                len,
                io::Error::from_raw_os_error(libc::EINVAL),
            )),
        }
    }

    fn zero(&self, op: Op, offset: u64, len: u64) -> IoResult<()> {
        let r = self.range(op, offset, len)?;
        self.wr()[r].fill(0);
        Ok(())
    }
}

impl Engine for MemoryEngine {
    fn kind(&self) -> &'static str {
        "memory"
    }

    fn len(&self) -> u64 {
        self.len
    }

    fn alignment(&self) -> u32 {
        1
    }

    fn read(&self, offset: u64, mut buf: IoBuf) -> BoxFuture<(IoBuf, IoResult<()>)> {
        let r = self
            .range(Op::Read, offset, buf.len() as u64)
            .map(|r| buf.copy_from_slice(&self.rd()[r]));
        Box::pin(std::future::ready((buf, r)))
    }

    fn write(&self, offset: u64, buf: IoBuf, _fua: bool) -> BoxFuture<(IoBuf, IoResult<()>)> {
        let r = self
            .range(Op::Write, offset, buf.len() as u64)
            .map(|r| self.wr()[r].copy_from_slice(&buf));
        Box::pin(std::future::ready((buf, r)))
    }

    fn flush(&self) -> BoxFuture<IoResult<()>> {
        Box::pin(std::future::ready(Ok(())))
    }

    fn trim(&self, offset: u64, len: u64) -> BoxFuture<IoResult<()>> {
        Box::pin(std::future::ready(self.zero(Op::Trim, offset, len)))
    }

    fn write_zeroes(&self, offset: u64, len: u64, _may_punch: bool) -> BoxFuture<IoResult<()>> {
        Box::pin(std::future::ready(self.zero(Op::WriteZeroes, offset, len)))
    }
}
