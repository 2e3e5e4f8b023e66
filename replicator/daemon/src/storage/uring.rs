//! The io_uring engine.
//!
//! One ring per engine, behind a mutex. Every in-flight operation has a
//! [`Slot`] in a slab; the slot owns the operation's buffer, so memory the
//! kernel reads from or writes into lives until its completion arrives, even
//! when the caller dropped the future. An eventfd registered with the ring
//! wakes a single reaper task, which drains the completion queue and hands
//! results (and buffers) back through oneshot channels.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use io_uring::{opcode, register, squeue, types, IoUring};
use slab::Slab;
use tokio::io::unix::AsyncFd;
use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};

use super::backing::{is_unsupported, ZERO_CHUNK};
use super::{Backing, BackingKind, BoxFuture, Engine, IoBuf, IoError, IoResult, Op};

/// Largest single read or write handed to the kernel; longer requests are
/// split (the kernel caps a transfer just below 2 GiB anyway).
const MAX_RW: usize = 1 << 30;

/// How often an `EINTR`/`EAGAIN` result is retried before giving up.
const MAX_RETRIES: u32 = 1000;

/// The largest queue depth accepted (the kernel's SQ limit).
const MAX_QUEUE_DEPTH: u32 = 32768;

/// An [`Engine`] on io_uring, `O_DIRECT` when the [`Backing`] uses it.
///
/// * Reads and writes are `IORING_OP_READ`/`WRITE`; short transfers are
///   resubmitted for the remainder, `EINTR`/`EAGAIN` are retried.
/// * A FUA write carries `RWF_DSYNC`; flush is `IORING_OP_FSYNC` with
///   `DATASYNC`.
/// * Trim is `fallocate(PUNCH_HOLE | KEEP_SIZE)`; write-zeroes is the same
///   when `may_punch`, else `fallocate(ZERO_RANGE | KEEP_SIZE)`. Both also
///   work on block devices (Linux 4.9+: punch = discard that guarantees
///   zeroes, zero range = `BLKZEROOUT`). Where a mode is unsupported the
///   engine falls back to `ZERO_RANGE`, then `BLKZEROOUT` (block devices,
///   on the blocking pool), then writing zero buffers of at most 1 MiB.
///   `BLKDISCARD` is never used: discarded sectors need not read back zeroes.
/// * Alignment: with `O_DIRECT`, a request whose offset, length or buffer
///   address is not a multiple of [`Engine::alignment`] fails with `EINVAL`
///   (no bounce buffering). [`Backing::open`] with [`super::DirectIo::Auto`]
///   falls back to buffered I/O when the volume block size is smaller than
///   the direct-I/O alignment, so the volume layer never hits this.
/// * At most `cq_entries` (twice the queue depth) operations are in flight;
///   further ones wait for a permit.
/// * The ring is restricted to the four opcodes above when the kernel
///   supports restrictions (5.10+).
///
/// Must be created inside a tokio runtime (it spawns the reaper task there).
/// Cloning is cheap; clones share the ring. When the last clone is dropped
/// while operations whose futures were dropped are still in flight, the drop
/// blocks until the kernel completed them.
#[derive(Clone)]
pub struct UringEngine {
    inner: Arc<Inner>,
}

struct Inner {
    backing: Backing,
    state: Mutex<RingState>,
    permits: Arc<Semaphore>,
    /// A duplicate of the eventfd the reaper waits on, to wake it on drop.
    wake_fd: OwnedFd,
    queue_depth: u32,
    restricted: bool,
}

struct RingState {
    ring: IoUring,
    slots: Slab<Slot>,
    /// An operation has queued SQEs and will submit them (with everything
    /// queued meanwhile) after yielding once; see [`UringEngine::execute`].
    submit_scheduled: bool,
}

/// One in-flight operation.
struct Slot {
    /// The buffer the kernel is using, if any. Never touched until the
    /// completion for this slot arrives.
    buf: Option<IoBuf>,
    tx: Option<oneshot::Sender<Done>>,
    _permit: OwnedSemaphorePermit,
}

struct Done {
    res: i32,
    buf: Option<IoBuf>,
}

impl Slot {
    fn complete(mut self, res: i32) {
        if let Some(tx) = self.tx.take() {
            // If the future was dropped, the buffer is freed here, after the
            // kernel is done with it.
            let _ = tx.send(Done {
                res,
                buf: self.buf.take(),
            });
        }
    }
}

fn is_retryable(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EINTR) | Some(libc::EAGAIN))
}

fn is_transient_submit(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EAGAIN) | Some(libc::EBUSY) | Some(libc::EINTR)
    )
}

/// Submits every queued SQE. `EAGAIN` when some could not be submitted yet.
fn flush_sq(ring: &mut IoUring) -> io::Result<()> {
    loop {
        match ring.submit() {
            Ok(_) => {
                return if ring.submission().is_empty() {
                    Ok(())
                } else {
                    Err(io::Error::from_raw_os_error(libc::EAGAIN))
                };
            }
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            Err(e) => return Err(e),
        }
    }
}

fn read_eventfd(fd: RawFd) -> io::Result<u64> {
    let mut v: u64 = 0;
    // SAFETY: `v` is a valid, writable 8-byte buffer for the duration of the
    // call; an eventfd read transfers exactly 8 bytes.
    let n = unsafe { libc::read(fd, (&mut v as *mut u64).cast(), 8) };
    match n {
        8 => Ok(v),
        n if n < 0 => Err(io::Error::last_os_error()),
        _ => Err(io::Error::other("short eventfd read")),
    }
}

fn write_eventfd(fd: RawFd) {
    let v: u64 = 1;
    // SAFETY: `v` is a valid 8-byte buffer for the duration of the call.
    let _ = unsafe { libc::write(fd, (&v as *const u64).cast(), 8) };
}

fn open_err(backing: &Backing, e: io::Error) -> IoError {
    IoError::new(
        Op::Open,
        0,
        0,
        io::Error::new(
            e.kind(),
            format!("io_uring for {}: {}", backing.path().display(), e),
        ),
    )
}

/// Builds the ring, restricted to our opcodes when the kernel allows it.
/// Returns the ring and whether it is restricted.
fn build_ring(entries: u32, eventfd: RawFd) -> io::Result<(IoUring, bool)> {
    let ops = [
        opcode::Read::CODE,
        opcode::Write::CODE,
        opcode::Fsync::CODE,
        opcode::Fallocate::CODE,
    ];
    let check_ops = |ring: &IoUring| -> io::Result<()> {
        let mut probe = register::Probe::new();
        ring.submitter().register_probe(&mut probe)?;
        for op in ops {
            if !probe.is_supported(op) {
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    format!("io_uring opcode {op} not supported by this kernel"),
                ));
            }
        }
        Ok(())
    };

    // Restricted ring: created disabled, restricted, then enabled (5.10+).
    if let Ok(ring) = IoUring::builder().setup_r_disabled().build(entries) {
        check_ops(&ring)?;
        ring.submitter().register_eventfd(eventfd)?;
        let mut res: Vec<register::Restriction> = ops
            .iter()
            .map(|&op| register::Restriction::sqe_op(op))
            .collect();
        match ring.submitter().register_restrictions(&mut res) {
            Ok(()) => {
                ring.submitter().register_enable_rings()?;
                return Ok((ring, true));
            }
            Err(e) => {
                tracing::debug!(error = %e, "io_uring restrictions unavailable");
                if ring.submitter().register_enable_rings().is_ok() {
                    return Ok((ring, false));
                }
            }
        }
    }
    let ring = IoUring::builder().build(entries)?;
    check_ops(&ring)?;
    ring.submitter().register_eventfd(eventfd)?;
    Ok((ring, false))
}

impl UringEngine {
    /// Sets up a ring of `queue_depth` submission entries (clamped to
    /// 1..=32768; the kernel rounds up to a power of two) for `backing` and
    /// spawns its reaper task on the current tokio runtime.
    ///
    /// Fails (with [`Op::Open`]) outside a tokio runtime, when io_uring is
    /// unavailable (old kernel, seccomp, `kernel.io_uring_disabled`), or when
    /// the kernel lacks one of the opcodes used; callers can then fall back
    /// to [`super::sync::SyncEngine`].
    pub fn new(backing: Backing, queue_depth: u32) -> IoResult<UringEngine> {
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(open_err(
                &backing,
                io::Error::other("UringEngine::new must be called inside a tokio runtime"),
            ));
        }
        let entries = queue_depth.clamp(1, MAX_QUEUE_DEPTH);

        // SAFETY: eventfd has no memory arguments; the result is checked.
        let raw = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if raw < 0 {
            return Err(open_err(&backing, io::Error::last_os_error()));
        }
        // SAFETY: `raw` is a freshly created descriptor that nothing else owns.
        let efd = unsafe { OwnedFd::from_raw_fd(raw) };
        let wake_fd = efd.try_clone().map_err(|e| open_err(&backing, e))?;

        let (ring, restricted) =
            build_ring(entries, efd.as_raw_fd()).map_err(|e| open_err(&backing, e))?;
        let cq_entries = ring.params().cq_entries() as usize;
        // SAFETY: `efd` is an owned, valid descriptor; the AsyncFd owns it and
        // it is closed only when the AsyncFd (and its registration) is dropped.
        let afd = unsafe { AsyncFd::register_with_interest(efd, tokio::io::Interest::READABLE) }
            .map_err(|e| open_err(&backing, e.into()))?;

        let inner = Arc::new(Inner {
            backing,
            state: Mutex::new(RingState {
                ring,
                slots: Slab::with_capacity(cq_entries),
                submit_scheduled: false,
            }),
            permits: Arc::new(Semaphore::new(cq_entries)),
            wake_fd,
            queue_depth: entries,
            restricted,
        });
        tokio::spawn(reaper(Arc::downgrade(&inner), afd));
        Ok(UringEngine { inner })
    }

    /// The backing.
    pub fn backing(&self) -> &Backing {
        &self.inner.backing
    }

    /// The submission queue depth asked for (after clamping).
    pub fn queue_depth(&self) -> u32 {
        self.inner.queue_depth
    }

    /// Whether the ring is restricted to the engine's opcodes.
    pub fn is_restricted(&self) -> bool {
        self.inner.restricted
    }

    fn fd(&self) -> types::Fd {
        types::Fd(self.inner.backing.fd())
    }

    /// Runs one SQE to completion. `buf` is the buffer the SQE points into
    /// (if any); it comes back with the result. `None` comes back only when
    /// the ring failed in a way that leaves the operation's fate unknown; the
    /// buffer then stays owned by the slab.
    async fn execute(
        &self,
        sqe: squeue::Entry,
        buf: Option<IoBuf>,
    ) -> (io::Result<u32>, Option<IoBuf>) {
        let permit = match self.inner.permits.clone().acquire_owned().await {
            Ok(p) => p,
            Err(_) => return (Err(io::Error::other("io_uring engine closed")), buf),
        };
        let (tx, rx) = oneshot::channel();
        let mut slot = Slot {
            buf,
            tx: Some(tx),
            _permit: permit,
        };
        loop {
            match self.inner.push(&sqe, slot) {
                Push::Submitted | Push::Queued => break,
                Push::Schedule => {
                    // Let the other tasks that are ready queue their SQEs
                    // first, then submit them all with one `io_uring_enter`:
                    // one syscall and one device notification for a batch
                    // instead of one each. Dropped before submitting, the
                    // guard submits.
                    let mut batch = Batch(Some(&self.inner));
                    tokio::task::yield_now().await;
                    match batch.submit() {
                        Ok(()) => break,
                        Err(e) if is_transient_submit(&e) => {
                            if let Err(e) = self.kick().await {
                                return (Err(e), None);
                            }
                            break;
                        }
                        Err(e) => return (Err(e), None),
                    }
                }
                Push::Deferred => {
                    if let Err(e) = self.kick().await {
                        return (Err(e), None);
                    }
                    break;
                }
                // The SQE sits in the ring; the slot keeps the buffer.
                Push::Failed(e) => return (Err(e), None),
                Push::Full(s, Ok(())) => slot = s,
                Push::Full(s, Err(e)) if is_transient_submit(&e) => {
                    slot = s;
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                Push::Full(mut s, Err(e)) => return (Err(e), s.buf.take()),
            }
        }
        match rx.await {
            Ok(Done { res, buf }) if res < 0 => (Err(io::Error::from_raw_os_error(-res)), buf),
            Ok(Done { res, buf }) => (Ok(res as u32), buf),
            Err(_) => (Err(io::Error::other("io_uring engine shut down")), None),
        }
    }

    /// Retries submitting queued SQEs after a transient failure.
    async fn kick(&self) -> io::Result<()> {
        loop {
            tokio::time::sleep(Duration::from_millis(1)).await;
            let r = {
                let mut st = self.inner.lock();
                if st.ring.submission().is_empty() {
                    Ok(())
                } else {
                    flush_sq(&mut st.ring)
                }
            };
            match r {
                Ok(()) => return Ok(()),
                Err(e) if is_transient_submit(&e) => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Like `execute` without a buffer, retrying `EINTR`/`EAGAIN`.
    async fn execute_nobuf(&self, sqe: squeue::Entry) -> io::Result<u32> {
        let mut tries = 0;
        loop {
            match self.execute(sqe.clone(), None).await.0 {
                Err(e) if is_retryable(&e) && tries < MAX_RETRIES => {
                    tries += 1;
                    tokio::task::yield_now().await;
                }
                r => return r,
            }
        }
    }

    async fn rw(
        &self,
        write: bool,
        offset: u64,
        mut buf: IoBuf,
        fua: bool,
    ) -> (IoBuf, IoResult<()>) {
        let op = if write { Op::Write } else { Op::Read };
        let total = buf.len();
        let err = |e| IoError::new(op, offset, total as u64, e);
        if let Err(e) = if write { Ok(()) } else { buf.check_readable() } {
            return (buf, Err(err(e)));
        }
        if let Err(e) =
            self.inner
                .backing
                .check_aligned(offset, total as u64, buf.as_ptr() as usize)
        {
            return (buf, Err(err(e)));
        }
        let mut done = 0usize;
        let mut tries = 0;
        while done < total {
            let n = (total - done).min(MAX_RW) as u32;
            let pos = offset + done as u64;
            // SAFETY: done < total <= capacity, so the pointer stays inside
            // the buffer's allocation.
            let ptr = unsafe { buf.as_mut_ptr().add(done) };
            let sqe = if write {
                opcode::Write::new(self.fd(), ptr, n)
                    .offset(pos)
                    .rw_flags(if fua { libc::RWF_DSYNC } else { 0 })
                    .build()
            } else {
                opcode::Read::new(self.fd(), ptr, n).offset(pos).build()
            };
            let (res, back) = self.execute(sqe, Some(buf)).await;
            // `back` is None only together with an error.
            buf = back.unwrap_or_else(|| IoBuf::zeroed(total));
            match res {
                Ok(0) => {
                    let kind = if write {
                        io::ErrorKind::WriteZero
                    } else {
                        io::ErrorKind::UnexpectedEof
                    };
                    let e = io::Error::new(kind, format!("transfer stopped after {done} bytes"));
                    return (buf, Err(err(e)));
                }
                Ok(k) => done += k as usize,
                Err(e) if is_retryable(&e) && tries < MAX_RETRIES => {
                    tries += 1;
                    tokio::task::yield_now().await;
                }
                Err(e) => return (buf, Err(err(e))),
            }
        }
        (buf, Ok(()))
    }

    async fn zero(&self, op: Op, offset: u64, len: u64, may_punch: bool) -> IoResult<()> {
        if len == 0 {
            return Ok(());
        }
        let err = |e| IoError::new(op, offset, len, e);
        for &mode in self.inner.backing.zero_modes(may_punch) {
            let sqe = opcode::Fallocate::new(self.fd(), len)
                .offset(offset)
                .mode(mode)
                .build();
            match self.execute_nobuf(sqe).await {
                Ok(_) => return Ok(()),
                Err(e) if is_unsupported(&e) => continue,
                Err(e) => return Err(err(e)),
            }
        }
        if self.inner.backing.kind() == BackingKind::BlockDevice {
            let inner = self.inner.clone();
            let r =
                tokio::task::spawn_blocking(move || inner.backing.blkzeroout_blocking(offset, len))
                    .await
                    .unwrap_or_else(|e| {
                        Err(io::Error::other(format!("blocking task failed: {e}")))
                    });
            match r {
                Ok(()) => return Ok(()),
                Err(e) if is_unsupported(&e) => {}
                Err(e) => return Err(err(e)),
            }
        }
        let mut buf = IoBuf::zeroed(len.min(ZERO_CHUNK as u64) as usize);
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(ZERO_CHUNK as u64) as usize;
            buf.set_len(n);
            let (b, r) = self.rw(true, offset + done, buf, false).await;
            r.map_err(|e| err(e.source))?;
            buf = b;
            done += n as u64;
        }
        Ok(())
    }
}

/// Outcome of [`Inner::push`].
enum Push {
    /// Queued and submitted to the kernel.
    Submitted,
    /// Queued; the operation that scheduled the batch submits it.
    Queued,
    /// Queued; the caller submits the batch (after letting others queue).
    Schedule,
    /// Queued; the kernel did not take it yet (transient error).
    Deferred,
    /// Queued, but submitting failed for good.
    Failed(io::Error),
    /// The submission queue was full: the slot comes back, with the result
    /// of pushing the queued entries to the kernel.
    Full(Slot, io::Result<()>),
}

/// The submission of a batch of queued SQEs, owed by the operation that
/// scheduled it ([`Push::Schedule`]); done on drop if not done before, so a
/// cancelled operation never strands the SQEs queued behind it.
struct Batch<'a>(Option<&'a Inner>);

impl Batch<'_> {
    fn submit(&mut self) -> io::Result<()> {
        match self.0.take() {
            Some(inner) => {
                let mut st = inner.lock();
                // Cleared under the lock: an SQE queued after this point
                // schedules its own submission.
                st.submit_scheduled = false;
                if st.ring.submission().is_empty() {
                    // The reaper submitted them on its way.
                    return Ok(());
                }
                flush_sq(&mut st.ring)
            }
            None => Ok(()),
        }
    }
}

impl Drop for Batch<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.submit() {
            tracing::debug!(error = %e, "io_uring batch submission deferred");
        }
    }
}

impl Inner {
    /// Queues `sqe` for `slot` and submits it, or leaves the submission to
    /// the batch it joins ([`Push::Queued`]) or starts ([`Push::Schedule`]).
    fn push(&self, sqe: &squeue::Entry, slot: Slot) -> Push {
        let mut st = self.lock();
        let key = st.slots.insert(slot);
        let entry = sqe.clone().user_data(key as u64);
        // SAFETY: the SQE's buffer pointer (if any) points into the IoBuf now
        // owned by slot `key`; the slot is removed only when the CQE carrying
        // `key` is reaped (or in `Inner::drop` after waiting for every CQE),
        // so the memory stays valid while the kernel uses it. The backing's
        // fd is owned by `Inner`, which outlives the ring. The entry is fully
        // initialized by its builder.
        let pushed = unsafe { st.ring.submission().push(&entry) }.is_ok();
        if pushed {
            if st.submit_scheduled {
                return Push::Queued;
            }
            if tokio::runtime::Handle::try_current().is_ok() {
                st.submit_scheduled = true;
                return Push::Schedule;
            }
            return match flush_sq(&mut st.ring) {
                Ok(()) => Push::Submitted,
                Err(e) if is_transient_submit(&e) => Push::Deferred,
                Err(e) => Push::Failed(e),
            };
        }
        // SQ full (only after earlier submissions failed): nothing refers to
        // `key` yet, so the slot can be taken back.
        let slot = st.slots.remove(key);
        let r = flush_sq(&mut st.ring);
        Push::Full(slot, r)
    }

    fn lock(&self) -> MutexGuard<'_, RingState> {
        // Nothing panics while holding the lock; if something did, the ring
        // and slab are still consistent.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Drains the completion queue and completes the slots (outside the lock).
    fn reap(&self) {
        let mut done = Vec::new();
        {
            let mut st = self.lock();
            let RingState { ring, slots, .. } = &mut *st;
            for cqe in ring.completion() {
                if let Some(slot) = slots.try_remove(cqe.user_data() as usize) {
                    done.push((slot, cqe.result()));
                } else {
                    tracing::error!(
                        user_data = cqe.user_data(),
                        "io_uring completion for unknown slot"
                    );
                }
            }
            // SQEs left behind by a transient submit failure.
            if !ring.submission().is_empty() {
                if let Err(e) = flush_sq(ring) {
                    tracing::debug!(error = %e, "io_uring resubmission deferred");
                }
            }
        }
        for (slot, res) in done {
            slot.complete(res);
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        let st = self.state.get_mut().unwrap_or_else(|e| e.into_inner());
        // Operations whose futures were dropped may still be in flight: wait
        // for the kernel to finish with their buffers before freeing them.
        while !st.slots.is_empty() {
            match st.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => {
                    tracing::error!(error = %e, in_flight = st.slots.len(),
                        "io_uring wait failed on drop; leaking in-flight buffers");
                    for mut slot in st.slots.drain() {
                        std::mem::forget(slot.buf.take());
                    }
                    break;
                }
            }
            let RingState { ring, slots, .. } = &mut *st;
            for cqe in ring.completion() {
                if let Some(slot) = slots.try_remove(cqe.user_data() as usize) {
                    slot.complete(cqe.result());
                }
            }
        }
        // Let the reaper notice that the engine is gone.
        write_eventfd(self.wake_fd.as_raw_fd());
    }
}

async fn reaper(inner: Weak<Inner>, afd: AsyncFd<OwnedFd>) {
    loop {
        let mut guard = match afd.readable().await {
            Ok(g) => g,
            Err(e) => {
                tracing::error!(error = %e, "io_uring reaper cannot poll its eventfd");
                return;
            }
        };
        // Reset the counter before draining, so a completion posted after the
        // drain always leaves the eventfd readable again.
        match guard.try_io(|fd| read_eventfd(fd.get_ref().as_raw_fd())) {
            Ok(Ok(_)) | Err(_) => {}
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "io_uring eventfd read failed");
                guard.clear_ready();
            }
        }
        let Some(inner) = inner.upgrade() else {
            return;
        };
        inner.reap();
    }
}

impl std::fmt::Debug for UringEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UringEngine")
            .field("backing", &self.inner.backing)
            .field("queue_depth", &self.inner.queue_depth)
            .field("restricted", &self.inner.restricted)
            .finish()
    }
}

impl Engine for UringEngine {
    fn kind(&self) -> &'static str {
        "uring"
    }

    fn len(&self) -> u64 {
        self.inner.backing.len()
    }

    fn alignment(&self) -> u32 {
        self.inner.backing.alignment()
    }

    fn read(&self, offset: u64, buf: IoBuf) -> BoxFuture<(IoBuf, IoResult<()>)> {
        let this = self.clone();
        Box::pin(async move { this.rw(false, offset, buf, false).await })
    }

    fn write(&self, offset: u64, buf: IoBuf, fua: bool) -> BoxFuture<(IoBuf, IoResult<()>)> {
        let this = self.clone();
        Box::pin(async move { this.rw(true, offset, buf, fua).await })
    }

    fn flush(&self) -> BoxFuture<IoResult<()>> {
        let this = self.clone();
        Box::pin(async move {
            let sqe = opcode::Fsync::new(this.fd())
                .flags(types::FsyncFlags::DATASYNC)
                .build();
            this.execute_nobuf(sqe)
                .await
                .map(drop)
                .map_err(|e| IoError::new(Op::Flush, 0, 0, e))
        })
    }

    fn trim(&self, offset: u64, len: u64) -> BoxFuture<IoResult<()>> {
        let this = self.clone();
        Box::pin(async move { this.zero(Op::Trim, offset, len, true).await })
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_punch: bool) -> BoxFuture<IoResult<()>> {
        let this = self.clone();
        Box::pin(async move { this.zero(Op::WriteZeroes, offset, len, may_punch).await })
    }
}
