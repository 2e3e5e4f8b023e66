//! The "engine" of a diskless client (R28 in `docs/replication.md`): there
//! is no disk. Every data operation fails with `EIO`; the replication core
//! never issues one (it starts Diskless), so this only guards against a
//! bug sending data to nowhere and reporting success.

use std::io;

use super::{BoxFuture, Engine, IoBuf, IoError, IoResult, Op};

/// An [`Engine`] of `len` bytes that holds nothing.
#[derive(Debug, Clone)]
pub struct NoDisk {
    len: u64,
}

impl NoDisk {
    /// A disk-less engine that claims `len` bytes.
    pub fn new(len: u64) -> NoDisk {
        NoDisk { len }
    }
}

fn eio(op: Op, offset: u64, len: u64) -> IoError {
    IoError::new(op, offset, len, io::Error::from_raw_os_error(libc::EIO))
}

impl Engine for NoDisk {
    fn kind(&self) -> &'static str {
        "none"
    }
    fn len(&self) -> u64 {
        self.len
    }
    fn alignment(&self) -> u32 {
        1
    }
    fn read(&self, offset: u64, buf: IoBuf) -> BoxFuture<(IoBuf, IoResult<()>)> {
        let n = buf.len() as u64;
        Box::pin(async move { (buf, Err(eio(Op::Read, offset, n))) })
    }
    fn write(&self, offset: u64, buf: IoBuf, _fua: bool) -> BoxFuture<(IoBuf, IoResult<()>)> {
        let n = buf.len() as u64;
        Box::pin(async move { (buf, Err(eio(Op::Write, offset, n))) })
    }
    fn flush(&self) -> BoxFuture<IoResult<()>> {
        // Nothing was ever written: nothing to make durable.
        Box::pin(async { Ok(()) })
    }
    fn trim(&self, offset: u64, len: u64) -> BoxFuture<IoResult<()>> {
        Box::pin(async move { Err(eio(Op::Trim, offset, len)) })
    }
    fn write_zeroes(&self, offset: u64, len: u64, _may_punch: bool) -> BoxFuture<IoResult<()>> {
        Box::pin(async move { Err(eio(Op::WriteZeroes, offset, len)) })
    }
}
