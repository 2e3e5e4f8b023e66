//! Fault injection: an [`Engine`] wrapper whose reads and/or writes fail
//! with `EIO` while a [`FaultSwitch`] is armed, optionally only inside a
//! byte range.
//!
//! `tandemd` wraps every export's engine in a [`FaultyEngine`] and arms its
//! switch on the admin request `inject_fault` (`tandemctl inject-fault`);
//! `clear_fault` disarms it. It is compiled in on purpose: the admin socket
//! is root-only (mode 0600), and the disarmed cost is one relaxed atomic
//! load per operation. Tests use it to exercise the detach-on-error path
//! (`docs/replication.md`, R23).
//!
//! Which operations fail while armed:
//! * `reads`: reads overlapping the range (every read without a range);
//! * `writes`: writes, trims and write-zeroes overlapping the range (all of
//!   them without a range), and flushes when no range is given (a bad
//!   sector range does not fail a cache flush).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use super::{BoxFuture, Engine, IoBuf, IoError, IoResult, Op};

/// What fails while a [`FaultSwitch`] is armed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Fault {
    /// Reads fail.
    pub reads: bool,
    /// Writes, trims, write-zeroes (and flushes, without a range) fail.
    pub writes: bool,
    /// Only operations overlapping `[start, end)` (backing offsets) fail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub range: Option<(u64, u64)>,
}

impl Fault {
    fn hits(&self, op: Op, offset: u64, len: u64) -> bool {
        let in_range = match self.range {
            None => true,
            Some((s, e)) => offset < e && offset.saturating_add(len.max(1)) > s,
        };
        match op {
            Op::Read => self.reads && in_range,
            Op::Write | Op::Trim | Op::WriteZeroes => self.writes && in_range,
            Op::Flush => self.writes && self.range.is_none(),
            Op::Open => false,
        }
    }
}

/// The runtime switch shared by a [`FaultyEngine`] and whoever controls it.
#[derive(Debug, Default)]
pub struct FaultSwitch {
    armed: AtomicBool,
    fault: Mutex<Fault>,
    /// Operations failed on purpose so far.
    injected: std::sync::atomic::AtomicU64,
}

impl FaultSwitch {
    /// A disarmed switch.
    pub fn new() -> Arc<FaultSwitch> {
        Arc::new(FaultSwitch::default())
    }

    /// Arms the switch with `fault` (replacing any earlier one). A fault
    /// with neither `reads` nor `writes` disarms it.
    pub fn set(&self, fault: Fault) {
        *self.fault.lock().unwrap_or_else(|e| e.into_inner()) = fault;
        self.armed
            .store(fault.reads || fault.writes, Ordering::Release);
    }

    /// Disarms the switch.
    pub fn clear(&self) {
        self.set(Fault::default());
    }

    /// The fault in force, if armed.
    pub fn get(&self) -> Option<Fault> {
        if !self.armed.load(Ordering::Acquire) {
            return None;
        }
        Some(*self.fault.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Operations failed on purpose since start.
    pub fn injected(&self) -> u64 {
        self.injected.load(Ordering::Relaxed)
    }

    /// `Err(EIO)` if `op` at `offset..offset+len` must fail now.
    fn check(&self, op: Op, offset: u64, len: u64) -> IoResult<()> {
        if !self.armed.load(Ordering::Relaxed) {
            return Ok(());
        }
        match self.get() {
            Some(f) if f.hits(op, offset, len) => {
                self.injected.fetch_add(1, Ordering::Relaxed);
                Err(IoError::new(
                    op,
                    offset,
                    len,
                    std::io::Error::from_raw_os_error(libc::EIO),
                ))
            }
            _ => Ok(()),
        }
    }
}

/// An engine that fails operations while its [`FaultSwitch`] says so and
/// passes everything else to the inner engine.
pub struct FaultyEngine {
    inner: Arc<dyn Engine>,
    switch: Arc<FaultSwitch>,
}

impl std::fmt::Debug for FaultyEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultyEngine")
            .field("inner", &self.inner.kind())
            .field("fault", &self.switch.get())
            .finish()
    }
}

impl FaultyEngine {
    /// Wraps `inner`; `switch` controls it.
    pub fn new(inner: Arc<dyn Engine>, switch: Arc<FaultSwitch>) -> FaultyEngine {
        FaultyEngine { inner, switch }
    }
}

impl Engine for FaultyEngine {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }

    fn len(&self) -> u64 {
        self.inner.len()
    }

    fn alignment(&self) -> u32 {
        self.inner.alignment()
    }

    fn read(&self, offset: u64, buf: IoBuf) -> BoxFuture<(IoBuf, IoResult<()>)> {
        match self.switch.check(Op::Read, offset, buf.len() as u64) {
            Ok(()) => self.inner.read(offset, buf),
            Err(e) => Box::pin(async move { (buf, Err(e)) }),
        }
    }

    fn write(&self, offset: u64, buf: IoBuf, fua: bool) -> BoxFuture<(IoBuf, IoResult<()>)> {
        match self.switch.check(Op::Write, offset, buf.len() as u64) {
            Ok(()) => self.inner.write(offset, buf, fua),
            Err(e) => Box::pin(async move { (buf, Err(e)) }),
        }
    }

    fn flush(&self) -> BoxFuture<IoResult<()>> {
        match self.switch.check(Op::Flush, 0, 0) {
            Ok(()) => self.inner.flush(),
            Err(e) => Box::pin(async move { Err(e) }),
        }
    }

    fn trim(&self, offset: u64, len: u64) -> BoxFuture<IoResult<()>> {
        match self.switch.check(Op::Trim, offset, len) {
            Ok(()) => self.inner.trim(offset, len),
            Err(e) => Box::pin(async move { Err(e) }),
        }
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_punch: bool) -> BoxFuture<IoResult<()>> {
        match self.switch.check(Op::WriteZeroes, offset, len) {
            Ok(()) => self.inner.write_zeroes(offset, len, may_punch),
            Err(e) => Box::pin(async move { Err(e) }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::memory::MemoryEngine;
    use super::*;

    fn engine() -> (FaultyEngine, Arc<FaultSwitch>) {
        let sw = FaultSwitch::new();
        (
            FaultyEngine::new(Arc::new(MemoryEngine::new(1 << 20)), sw.clone()),
            sw,
        )
    }

    async fn rd(e: &FaultyEngine, off: u64, len: usize) -> IoResult<Vec<u8>> {
        let (buf, res) = e.read(off, IoBuf::zeroed(len)).await;
        res.map(|()| buf.to_vec())
    }

    async fn wr(e: &FaultyEngine, off: u64, data: &[u8]) -> IoResult<()> {
        e.write(off, IoBuf::from_slice(data), false).await.1
    }

    fn is_eio<T: std::fmt::Debug>(r: IoResult<T>) -> bool {
        matches!(r, Err(e) if e.source.raw_os_error() == Some(libc::EIO))
    }

    #[tokio::test]
    async fn disarmed_passes_everything_through() {
        let (e, sw) = engine();
        assert_eq!(sw.get(), None);
        wr(&e, 4096, &[7; 512]).await.unwrap();
        assert_eq!(rd(&e, 4096, 512).await.unwrap(), vec![7; 512]);
        e.flush().await.unwrap();
        e.trim(0, 512).await.unwrap();
        e.write_zeroes(0, 512, true).await.unwrap();
        assert_eq!(sw.injected(), 0);
        assert_eq!(e.kind(), "memory");
    }

    #[tokio::test]
    async fn write_faults_fail_writes_trims_zeroes_and_flushes_with_eio() {
        let (e, sw) = engine();
        wr(&e, 0, &[1; 512]).await.unwrap();
        sw.set(Fault {
            reads: false,
            writes: true,
            range: None,
        });
        assert!(is_eio(wr(&e, 0, &[2; 512]).await));
        assert!(is_eio(e.flush().await));
        assert!(is_eio(e.trim(0, 512).await));
        assert!(is_eio(e.write_zeroes(0, 512, false).await));
        // Reads still work and the failed write changed nothing.
        assert_eq!(rd(&e, 0, 512).await.unwrap(), vec![1; 512]);
        assert_eq!(sw.injected(), 4);
        sw.clear();
        wr(&e, 0, &[3; 512]).await.unwrap();
        e.flush().await.unwrap();
        assert_eq!(rd(&e, 0, 512).await.unwrap(), vec![3; 512]);
    }

    #[tokio::test]
    async fn read_faults_fail_reads_only() {
        let (e, sw) = engine();
        sw.set(Fault {
            reads: true,
            writes: false,
            range: None,
        });
        assert!(is_eio(rd(&e, 0, 512).await));
        wr(&e, 0, &[5; 512]).await.unwrap();
        e.flush().await.unwrap();
        sw.clear();
        assert_eq!(rd(&e, 0, 512).await.unwrap(), vec![5; 512]);
    }

    #[tokio::test]
    async fn a_range_limits_the_fault_to_overlapping_operations() {
        let (e, sw) = engine();
        sw.set(Fault {
            reads: true,
            writes: true,
            range: Some((8192, 12288)),
        });
        // Before, after and touching the edges: fine.
        wr(&e, 4096, &[1; 4096]).await.unwrap();
        wr(&e, 12288, &[1; 4096]).await.unwrap();
        rd(&e, 0, 8192).await.unwrap();
        // Overlapping by one byte: fails.
        assert!(is_eio(wr(&e, 8191, &[1; 2]).await));
        assert!(is_eio(rd(&e, 12287, 1).await));
        assert!(is_eio(e.trim(0, 1 << 20).await));
        // A flush is not a range operation.
        e.flush().await.unwrap();
    }

    #[test]
    fn fault_json_is_stable() {
        let f: Fault = serde_json::from_str(r#"{"reads":true,"writes":false}"#).unwrap();
        assert_eq!(
            f,
            Fault {
                reads: true,
                writes: false,
                range: None
            }
        );
        let f: Fault =
            serde_json::from_str(r#"{"reads":false,"writes":true,"range":[0,4096]}"#).unwrap();
        assert_eq!(f.range, Some((0, 4096)));
    }
}
