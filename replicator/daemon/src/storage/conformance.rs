//! One conformance suite for every [`Engine`].
//!
//! Each `async fn` below takes a [`Fixture`] and checks one part of the
//! engine contract; the `suite!` macro instantiates every check for every
//! fixture (memory, sync and io_uring on files in `/var/tmp`, the temp dir and
//! `/dev/shm`, buffered and direct, and on loop devices when
//! `TANDEM_TEST_LOOPDEV=1`). Random choices come from a seed printed at the
//! start of each test; set `TANDEM_TEST_SEED` to replay one.

use std::any::Any;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::memory::MemoryEngine;
use super::sync::SyncEngine;
use super::uring::UringEngine;
use super::{Backing, BackingKind, DirectIo, Engine, IoBuf, Op};

const LEN: u64 = 16 << 20;
const MIB: u64 = 1 << 20;

// ---------------------------------------------------------------- helpers

struct Rng(u64);

impl Rng {
    fn new(test: &str, fixture: &str) -> Rng {
        let seed = std::env::var("TANDEM_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(1)
            });
        eprintln!("conformance {fixture}::{test}: TANDEM_TEST_SEED={seed}");
        Rng(seed | 1)
    }

    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(len + 8);
        while v.len() < len {
            v.extend_from_slice(&self.next().to_le_bytes());
        }
        v.truncate(len);
        v
    }
}

fn pattern(tag: u64, len: usize) -> Vec<u8> {
    let mut r = Rng(tag.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    r.bytes(len)
}

/// The block size tests use: the engine's alignment, at least 512.
fn blk(e: &dyn Engine) -> u64 {
    u64::from(e.alignment()).max(512)
}

async fn write(e: &dyn Engine, off: u64, data: &[u8], fua: bool) {
    let (_, r) = e.write(off, IoBuf::from_slice(data), fua).await;
    r.unwrap_or_else(|err| panic!("{}: write {} at {off}: {err}", e.kind(), data.len()));
}

async fn read(e: &dyn Engine, off: u64, len: usize) -> Vec<u8> {
    let (buf, r) = e.read(off, IoBuf::zeroed(len)).await;
    r.unwrap_or_else(|err| panic!("{}: read {len} at {off}: {err}", e.kind()));
    assert_eq!(buf.len(), len);
    buf.to_vec()
}

#[track_caller]
fn assert_bytes(got: &[u8], want: &[u8], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!(
            "{what}: first difference at byte {i}: got {:#04x}, want {:#04x}",
            got[i], want[i]
        );
    }
}

#[track_caller]
fn assert_zero(got: &[u8], what: &str) {
    if let Some(i) = got.iter().position(|&b| b != 0) {
        panic!("{what}: byte {i} is {:#04x}, want 0", got[i]);
    }
}

// --------------------------------------------------------------- fixtures

type MakeEngine = Box<dyn Fn(Backing) -> Arc<dyn Engine> + Send + Sync>;

/// An engine under test plus what the checks need to know about it.
struct Fixture {
    name: &'static str,
    engine: Arc<dyn Engine>,
    /// Path of the backing (file or device), to reopen it read-only.
    path: Option<PathBuf>,
    /// A regular file whose `st_blocks` shows the backing's allocation.
    blocks_path: Option<PathBuf>,
    /// Builds another engine of the same kind over a backing.
    make: Option<MakeEngine>,
    /// Direct I/O setting the fixture was opened with.
    direct: DirectIo,
    /// Dropped after the engine: temp dirs, loop devices.
    _guard: Option<Box<dyn Any + Send>>,
}

impl Fixture {
    fn e(&self) -> &dyn Engine {
        &*self.engine
    }

    fn blocks(&self) -> Option<u64> {
        let p = self.blocks_path.as_ref()?;
        Some(std::fs::metadata(p).expect("stat backing").blocks())
    }
}

#[derive(Clone, Copy)]
enum Kind {
    Sync,
    Uring(u32),
}

fn maker(kind: Kind) -> MakeEngine {
    Box::new(move |b: Backing| -> Arc<dyn Engine> {
        match kind {
            Kind::Sync => Arc::new(SyncEngine::new(b)),
            Kind::Uring(qd) => Arc::new(UringEngine::new(b, qd).expect("io_uring engine")),
        }
    })
}

/// Whether io_uring can be used here (seccomp and sysctls can forbid it).
fn uring_available() -> bool {
    match io_uring::IoUring::new(2) {
        Ok(_) => true,
        Err(e) => {
            eprintln!("io_uring unavailable ({e}); skipping io_uring fixtures");
            false
        }
    }
}

fn file_fixture(
    name: &'static str,
    kind: Kind,
    dir: &Path,
    direct: DirectIo,
    min_align: u32,
) -> Option<Fixture> {
    if matches!(kind, Kind::Uring(_)) && !uring_available() {
        return None;
    }
    if !dir.is_dir() {
        eprintln!("{name}: {} missing; skipped", dir.display());
        return None;
    }
    let td = tempfile::Builder::new()
        .prefix("tandem-conformance-")
        .tempdir_in(dir)
        .expect("temp dir");
    let p = td.path().join("backing.img");
    Backing::create_file(&p, LEN).expect("create backing");
    let b = Backing::open(&p, direct, false, min_align).expect("open backing");
    eprintln!(
        "{name}: {} direct={} alignment={}",
        p.display(),
        b.is_direct(),
        b.alignment()
    );
    if direct == DirectIo::Off || min_align < b.alignment() {
        assert!(!b.is_direct());
    }
    let make = maker(kind);
    Some(Fixture {
        name,
        engine: make(b),
        path: Some(p.clone()),
        blocks_path: Some(p),
        make: Some(make),
        direct,
        _guard: Some(Box::new(td)),
    })
}

/// A loop device over a sparse file in /var/tmp, detached on drop.
struct LoopDev {
    dev: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        let _ = std::process::Command::new("losetup")
            .arg("-d")
            .arg(&self.dev)
            .status();
    }
}

fn loop_fixture(name: &'static str, kind: Kind) -> Option<Fixture> {
    if std::env::var_os("TANDEM_TEST_LOOPDEV").is_none() {
        eprintln!("{name}: set TANDEM_TEST_LOOPDEV=1 (root) to test on a loop device");
        return None;
    }
    if matches!(kind, Kind::Uring(_)) && !uring_available() {
        return None;
    }
    let td = tempfile::Builder::new()
        .prefix("tandem-conformance-")
        .tempdir_in("/var/tmp")
        .expect("temp dir");
    let file = td.path().join("loop.img");
    Backing::create_file(&file, LEN).expect("create loop file");
    let out = std::process::Command::new("losetup")
        .args(["-f", "--show"])
        .arg(&file)
        .output()
        .expect("run losetup");
    assert!(
        out.status.success(),
        "losetup: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dev = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    let guard = LoopDev {
        dev: dev.clone(),
        _dir: td,
    };
    let b = Backing::open(&dev, DirectIo::Auto, false, 512).expect("open loop device");
    assert_eq!(b.kind(), BackingKind::BlockDevice);
    assert_eq!(b.len(), LEN);
    eprintln!(
        "{name}: {} direct={} alignment={}",
        dev.display(),
        b.is_direct(),
        b.alignment()
    );
    let make = maker(kind);
    Some(Fixture {
        name,
        engine: make(b),
        path: Some(dev),
        blocks_path: Some(file),
        make: Some(make),
        direct: DirectIo::Auto,
        _guard: Some(Box::new(guard)),
    })
}

fn memory() -> Option<Fixture> {
    Some(Fixture {
        name: "memory",
        engine: Arc::new(MemoryEngine::new(LEN)),
        path: None,
        blocks_path: None,
        make: None,
        direct: DirectIo::Off,
        _guard: None,
    })
}

fn var_tmp() -> PathBuf {
    PathBuf::from("/var/tmp")
}

fn sync_var_tmp() -> Option<Fixture> {
    file_fixture("sync_var_tmp", Kind::Sync, &var_tmp(), DirectIo::Auto, 4096)
}

fn sync_tmp() -> Option<Fixture> {
    file_fixture(
        "sync_tmp",
        Kind::Sync,
        &std::env::temp_dir(),
        DirectIo::Auto,
        4096,
    )
}

fn sync_shm() -> Option<Fixture> {
    file_fixture(
        "sync_shm",
        Kind::Sync,
        Path::new("/dev/shm"),
        DirectIo::Auto,
        4096,
    )
}

fn uring_var_tmp() -> Option<Fixture> {
    file_fixture(
        "uring_var_tmp",
        Kind::Uring(64),
        &var_tmp(),
        DirectIo::Auto,
        4096,
    )
}

fn uring_tmp() -> Option<Fixture> {
    file_fixture(
        "uring_tmp",
        Kind::Uring(64),
        &std::env::temp_dir(),
        DirectIo::Auto,
        4096,
    )
}

fn uring_shm() -> Option<Fixture> {
    file_fixture(
        "uring_shm",
        Kind::Uring(64),
        Path::new("/dev/shm"),
        DirectIo::Auto,
        4096,
    )
}

fn uring_buffered() -> Option<Fixture> {
    file_fixture(
        "uring_buffered",
        Kind::Uring(64),
        &var_tmp(),
        DirectIo::Off,
        512,
    )
}

/// Volume block size 512: direct only if the DIO alignment is 512.
fn uring_auto512() -> Option<Fixture> {
    file_fixture(
        "uring_auto512",
        Kind::Uring(64),
        &var_tmp(),
        DirectIo::Auto,
        512,
    )
}

/// A tiny ring, so that the in-flight bound and queue-full paths run.
fn uring_qd2() -> Option<Fixture> {
    file_fixture(
        "uring_qd2",
        Kind::Uring(2),
        &var_tmp(),
        DirectIo::Auto,
        4096,
    )
}

fn uring_loopdev() -> Option<Fixture> {
    loop_fixture("uring_loopdev", Kind::Uring(64))
}

fn sync_loopdev() -> Option<Fixture> {
    loop_fixture("sync_loopdev", Kind::Sync)
}

// ----------------------------------------------------------------- checks

/// Random writes of 512 B..1 MiB at random aligned offsets, each read back,
/// then the whole backing compared against a model.
async fn roundtrip_random(fx: &Fixture) {
    let e = fx.e();
    let b = blk(e);
    let mut rng = Rng::new("roundtrip_random", fx.name);
    let mut model = vec![0u8; LEN as usize];
    let mut sizes: Vec<u64> = vec![512, 4096, 65536, MIB, 3 * 4096, MIB - 4096];
    for _ in 0..24 {
        sizes.push(512 << rng.below(12));
        sizes.push(512 * (1 + rng.below(2048)));
    }
    for size in sizes {
        let size = size.div_ceil(b) * b;
        let off = rng.below((LEN - size) / b + 1) * b;
        let data = rng.bytes(size as usize);
        write(e, off, &data, rng.below(8) == 0).await;
        model[off as usize..(off + size) as usize].copy_from_slice(&data);
        let got = read(e, off, size as usize).await;
        assert_bytes(
            &got,
            &data,
            &format!("{}: read back {size} at {off}", fx.name),
        );
    }
    // Overlapping writes above: the model holds the last one everywhere.
    let chunk = 4 * MIB;
    for off in (0..LEN).step_by(chunk as usize) {
        let got = read(e, off, chunk as usize).await;
        assert_bytes(
            &got,
            &model[off as usize..(off + chunk) as usize],
            &format!("{}: model at {off}", fx.name),
        );
    }
}

/// Overlapping writes, one after the other: the later one wins.
async fn overlapping_later_wins(fx: &Fixture) {
    let e = fx.e();
    let k = 64 * 1024;
    write(e, MIB, &vec![0xaa; k], false).await;
    write(e, MIB + k as u64 / 2, &vec![0xbb; k], false).await;
    let got = read(e, MIB, k + k / 2).await;
    assert!(got[..k / 2].iter().all(|&x| x == 0xaa), "{}", fx.name);
    assert!(got[k / 2..].iter().all(|&x| x == 0xbb), "{}", fx.name);
    // And again with the second write FUA and overlapping from below.
    write(e, MIB + k as u64 / 4, &vec![0xcc; k / 2], true).await;
    let got = read(e, MIB, k + k / 2).await;
    assert!(got[..k / 4].iter().all(|&x| x == 0xaa), "{}", fx.name);
    assert!(
        got[k / 4..3 * k / 4].iter().all(|&x| x == 0xcc),
        "{}",
        fx.name
    );
    assert!(got[3 * k / 4..].iter().all(|&x| x == 0xbb), "{}", fx.name);
}

/// FUA writes and flushes succeed and the data stays readable.
async fn fua_and_flush(fx: &Fixture) {
    let e = fx.e();
    e.flush().await.expect("flush with nothing written");
    let data = pattern(1, 256 * 1024);
    write(e, 2 * MIB, &data, true).await;
    let data2 = pattern(2, 8192);
    write(e, 3 * MIB, &data2, false).await;
    e.flush().await.expect("flush");
    e.flush().await.expect("second flush");
    assert_bytes(&read(e, 2 * MIB, data.len()).await, &data, "fua data");
    assert_bytes(&read(e, 3 * MIB, data2.len()).await, &data2, "flushed data");
}

/// Trim reads back zeroes, leaves neighbours alone and deallocates files.
async fn trim_zeroes_and_deallocates(fx: &Fixture) {
    let e = fx.e();
    let b = blk(e);
    let off = 4 * MIB;
    let data = pattern(3, MIB as usize);
    write(e, off, &data, false).await;
    e.flush().await.expect("flush");
    let before = fx.blocks();
    e.trim(off, MIB).await.expect("trim");
    assert_zero(&read(e, off, MIB as usize).await, "trimmed range");
    if let (Some(before), Some(after)) = (before, fx.blocks()) {
        assert!(
            after + MIB / 512 / 2 <= before,
            "{}: trim did not deallocate: st_blocks {before} -> {after}",
            fx.name
        );
    }
    // A one-block trim in the middle of written data.
    let data = pattern(4, 3 * b as usize);
    write(e, 6 * MIB, &data, false).await;
    e.trim(6 * MIB + b, b).await.expect("small trim");
    let got = read(e, 6 * MIB, 3 * b as usize).await;
    let bu = b as usize;
    assert_bytes(&got[..bu], &data[..bu], "before small trim");
    assert_zero(&got[bu..2 * bu], "small trim");
    assert_bytes(&got[2 * bu..], &data[2 * bu..], "after small trim");
    // Trimming never-written space is fine too.
    e.trim(12 * MIB, 2 * MIB).await.expect("trim of a hole");
    assert_zero(&read(e, 12 * MIB, 2 * MIB as usize).await, "trimmed hole");
}

/// Write-zeroes with and without punching reads back zeroes; without
/// punching the range stays allocated.
async fn write_zeroes_both_modes(fx: &Fixture) {
    let e = fx.e();
    let b = blk(e);
    for (i, punch) in [false, true].into_iter().enumerate() {
        let off = (8 + 2 * i as u64) * MIB;
        let data = pattern(10 + i as u64, MIB as usize + 2 * b as usize);
        write(e, off - b, &data, false).await;
        e.flush().await.expect("flush");
        let before = fx.blocks();
        e.write_zeroes(off, MIB, punch).await.expect("write_zeroes");
        let got = read(e, off - b, data.len()).await;
        let bu = b as usize;
        assert_bytes(&got[..bu], &data[..bu], "before zeroed range");
        assert_zero(
            &got[bu..bu + MIB as usize],
            &format!("zeroed range (punch={punch})"),
        );
        assert_bytes(
            &got[bu + MIB as usize..],
            &data[bu + MIB as usize..],
            "after zeroed range",
        );
        if !punch {
            e.flush().await.expect("flush");
            if let (Some(before), Some(after)) = (before, fx.blocks()) {
                assert!(
                    after >= before,
                    "{}: write_zeroes without punch deallocated: {before} -> {after}",
                    fx.name
                );
            }
        }
    }
    // Larger than the 1 MiB zero-write chunk, unaligned to it.
    let len = 3 * MIB + 5 * b;
    write(e, 0, &pattern(12, len as usize), false).await;
    e.write_zeroes(0, len, false)
        .await
        .expect("big write_zeroes");
    assert_zero(&read(e, 0, len as usize).await, "big zeroed range");
}

/// 256 operations in flight at once, on distinct offsets.
async fn concurrent_256(fx: &Fixture) {
    let e = fx.engine.clone();
    let b = blk(&*e);
    let n = 256u64;
    let size = move |i: u64| (b * (1 + i % 4)) as usize;
    let stride = 8 * b;
    assert!(n * stride <= LEN);
    let mut tasks = Vec::new();
    for i in 0..n {
        let fut = e.write(
            i * stride,
            IoBuf::from_slice(&pattern(100 + i, size(i))),
            i % 16 == 0,
        );
        tasks.push(tokio::spawn(fut));
    }
    for t in tasks {
        let (_, r) = t.await.expect("join");
        r.expect("concurrent write");
    }
    let mut tasks = Vec::new();
    for i in 0..n {
        tasks.push(tokio::spawn(e.read(i * stride, IoBuf::zeroed(size(i)))));
    }
    for (i, t) in tasks.into_iter().enumerate() {
        let (buf, r) = t.await.expect("join");
        r.expect("concurrent read");
        assert_bytes(
            &buf,
            &pattern(100 + i as u64, size(i as u64)),
            &format!("block {i}"),
        );
    }
    // Mixed: reads, writes, flushes and trims together.
    let mut tasks = Vec::new();
    for i in 0..n {
        let e2 = e.clone();
        tasks.push(tokio::spawn(async move {
            let off = i * stride;
            match i % 4 {
                0 => {
                    let (_, r) = e2
                        .write(off, IoBuf::from_slice(&pattern(500 + i, b as usize)), false)
                        .await;
                    r.map(|_| ())
                }
                1 => e2.trim(off, b).await,
                2 => e2.flush().await,
                _ => {
                    let (buf, r) = e2.read(off, IoBuf::zeroed(size(i))).await;
                    r.map(|_| assert_bytes(&buf, &pattern(100 + i, size(i)), "mixed read"))
                }
            }
        }));
    }
    for t in tasks {
        t.await.expect("join").expect("mixed op");
    }
    for i in (0..n).step_by(4) {
        let got = read(&*e, i * stride, b as usize).await;
        assert_bytes(&got, &pattern(500 + i, b as usize), "mixed write");
        let got = read(&*e, (i + 1) * stride, b as usize).await;
        assert_zero(&got, "mixed trim");
    }
}

/// Dropping read and write futures before they complete neither crashes nor
/// corrupts anything; later I/O works.
async fn dropped_futures(fx: &Fixture) {
    let e = fx.engine.clone();
    let keep = pattern(20, 2 * MIB as usize);
    write(&*e, 0, &keep, false).await;
    for round in 0..4u64 {
        for i in 0..32u64 {
            let off = (i % 2) * MIB;
            // Polled once (submitted), then dropped.
            let _ = tokio::time::timeout(Duration::ZERO, e.read(off, IoBuf::zeroed(MIB as usize)))
                .await;
            // Writes into a scratch area, dropped the same way.
            let w = e.write(
                4 * MIB + i * 65536,
                IoBuf::from_slice(&pattern(round, 65536)),
                false,
            );
            let _ = tokio::time::timeout(Duration::ZERO, w).await;
            // Spawned and aborted.
            let t = tokio::spawn(e.read(off, IoBuf::zeroed(MIB as usize)));
            if i % 3 == 0 {
                tokio::task::yield_now().await;
            }
            t.abort();
            // Never polled at all.
            drop(e.read(off, IoBuf::zeroed(4096)));
        }
        assert_bytes(
            &read(&*e, 0, keep.len()).await,
            &keep,
            "data under dropped reads",
        );
    }
    let more = pattern(21, MIB as usize);
    write(&*e, 8 * MIB, &more, true).await;
    assert_bytes(
        &read(&*e, 8 * MIB, more.len()).await,
        &more,
        "I/O after dropped futures",
    );
    e.flush().await.expect("flush after dropped futures");
}

/// The last bytes of the backing can be read and written; reads past the end
/// fail cleanly.
async fn end_of_backing(fx: &Fixture) {
    let e = fx.e();
    let b = blk(e);
    assert_eq!(e.len(), LEN);
    assert!(!e.is_empty());
    let tail = pattern(30, b as usize);
    write(e, LEN - b, &tail, false).await;
    assert_bytes(&read(e, LEN - b, b as usize).await, &tail, "last block");
    let got = read(e, LEN - MIB, MIB as usize).await;
    assert_bytes(&got[(MIB - b) as usize..], &tail, "last MiB");
    let (_, r) = e.read(LEN - b, IoBuf::zeroed(2 * b as usize)).await;
    let err = r.expect_err("read past the end must fail");
    assert_eq!(err.op, Op::Read);
    assert_eq!(err.offset, LEN - b);
    assert_eq!(err.len, 2 * b);
    let (_, r) = e.read(LEN, IoBuf::zeroed(b as usize)).await;
    r.expect_err("read at the end must fail");
}

/// A write on a read-only backing is an error, not a panic; reads work.
async fn read_only_write_fails(fx: &Fixture) {
    let (Some(path), Some(make)) = (&fx.path, &fx.make) else {
        return;
    };
    write(fx.e(), 0, &pattern(40, 4096), false).await;
    let b = Backing::open(path, fx.direct, true, 4096).expect("open read-only");
    let ro = make(b);
    let (_, r) = ro.write(0, IoBuf::zeroed(4096), false).await;
    let err = r.expect_err("write to a read-only backing");
    assert_eq!(err.op, Op::Write);
    assert_eq!(err.source.raw_os_error(), Some(libc::EBADF), "{err}");
    let err = ro
        .trim(0, 4096)
        .await
        .expect_err("trim of a read-only backing");
    assert_eq!(err.op, Op::Trim);
    assert_bytes(
        &read(&*ro, 0, 4096).await,
        &pattern(40, 4096),
        "read-only read",
    );
}

/// Alignment contract: unaligned requests work without direct I/O and fail
/// with EINVAL (not a panic, not corruption) with it.
async fn alignment_contract(fx: &Fixture) {
    let e = fx.e();
    let a = u64::from(e.alignment());
    if a <= 1 {
        let data = pattern(50, 777);
        write(e, 12345, &data, false).await;
        assert_bytes(&read(e, 12345, 777).await, &data, "unaligned roundtrip");
        e.write_zeroes(12345 + 100, 77, false)
            .await
            .expect("unaligned zeroes");
        e.trim(12345 + 300, 33).await.expect("unaligned trim");
        let got = read(e, 12345, 777).await;
        assert_bytes(&got[..100], &data[..100], "unaligned zeroes: before");
        assert_zero(&got[100..177], "unaligned zeroes");
        assert_bytes(&got[177..300], &data[177..300], "between");
        assert_zero(&got[300..333], "unaligned trim");
        assert_bytes(&got[333..], &data[333..], "after");
        return;
    }
    let before = read(e, 0, 2 * a as usize).await;
    let (_, r) = e
        .write(a / 2, IoBuf::from_slice(&vec![0xee; a as usize]), false)
        .await;
    let err = r.expect_err("misaligned offset");
    assert_eq!(err.source.raw_os_error(), Some(libc::EINVAL), "{err}");
    let (_, r) = e.read(0, IoBuf::zeroed(a as usize + 1)).await;
    let err = r.expect_err("misaligned length");
    assert_eq!(err.source.raw_os_error(), Some(libc::EINVAL), "{err}");
    assert_bytes(
        &read(e, 0, 2 * a as usize).await,
        &before,
        "after rejected writes",
    );
}

/// Empty requests succeed and do nothing.
async fn empty_requests(fx: &Fixture) {
    let e = fx.e();
    let (buf, r) = e.read(4096, IoBuf::zeroed(0)).await;
    r.expect("empty read");
    assert!(buf.is_empty());
    let (_, r) = e.write(4096, IoBuf::zeroed(0), true).await;
    r.expect("empty write");
    e.trim(4096, 0).await.expect("empty trim");
    e.write_zeroes(4096, 0, true)
        .await
        .expect("empty write_zeroes");
}

macro_rules! tests_for {
    ($fixture:ident: $($check:ident),* $(,)?) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $check() {
            let Some(fx) = super::$fixture() else { return };
            super::$check(&fx).await;
        }
    )*};
}

macro_rules! suite {
    ($($fixture:ident),* $(,)?) => {$(
        mod $fixture {
            tests_for!($fixture:
                roundtrip_random,
                overlapping_later_wins,
                fua_and_flush,
                trim_zeroes_and_deallocates,
                write_zeroes_both_modes,
                concurrent_256,
                dropped_futures,
                end_of_backing,
                read_only_write_fails,
                alignment_contract,
                empty_requests,
            );
        }
    )*};
}

suite!(
    memory,
    sync_var_tmp,
    sync_tmp,
    sync_shm,
    uring_var_tmp,
    uring_tmp,
    uring_shm,
    uring_buffered,
    uring_auto512,
    uring_qd2,
    uring_loopdev,
    sync_loopdev,
);

// ------------------------------------------------- engine-specific checks

/// Dropping the last handle of a uring engine while dropped operations are
/// still in flight waits for them instead of freeing their buffers early.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uring_drop_engine_with_inflight_ops() {
    let Some(fx) = uring_var_tmp() else { return };
    let path = fx.path.clone().expect("file fixture");
    for _ in 0..8 {
        let b = Backing::open(&path, DirectIo::Auto, false, 4096).expect("open");
        let e = UringEngine::new(b, 8).expect("engine");
        eprintln!("{e:?} restricted={}", e.is_restricted());
        for i in 0..16u64 {
            let f = e.read((i % 16) * MIB, IoBuf::zeroed(MIB as usize));
            let _ = tokio::time::timeout(Duration::ZERO, f).await;
        }
        drop(e);
    }
    // The fixture's own engine still works.
    let data = pattern(60, 4096);
    write(fx.e(), 0, &data, false).await;
    assert_bytes(&read(fx.e(), 0, 4096).await, &data, "after drops");
}

/// Writes queued behind the operation that schedules a batched submission
/// are submitted even when that operation is cancelled before it submits,
/// and a batch of many becomes one submission that completes every write.
#[tokio::test(flavor = "current_thread")]
async fn uring_batch_survives_a_cancelled_submitter() {
    use std::task::Poll;
    let Some(fx) = uring_var_tmp() else { return };
    let path = fx.path.clone().expect("file fixture");
    let b = Backing::open(&path, DirectIo::Auto, false, 4096).expect("open");
    let e = UringEngine::new(b, 64).expect("engine");
    async fn once(f: &mut super::BoxFuture<(IoBuf, super::IoResult<()>)>) -> bool {
        std::future::poll_fn(|cx| Poll::Ready(f.as_mut().poll(cx).is_pending())).await
    }
    let (a, b) = (pattern(70, 4096), pattern(71, 4096));
    let mut first = e.write(0, IoBuf::from_slice(&a), false);
    let mut second = e.write(4096, IoBuf::from_slice(&b), false);
    assert!(
        once(&mut first).await,
        "the submitter yields before submitting"
    );
    assert!(
        once(&mut second).await,
        "the second write waits for its completion"
    );
    // Cancelled while yielding: its drop submits both queued writes.
    drop(first);
    let (_, r) = tokio::time::timeout(Duration::from_secs(10), second)
        .await
        .expect("the queued write was submitted and completed");
    r.expect("second write");
    assert_bytes(&read(&e, 4096, 4096).await, &b, "second write");
    // 48 writes started together (so they queue behind one submitter) all
    // complete with their data.
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..48u64 {
        let e = e.clone();
        tasks.spawn(async move {
            let d = pattern(100 + i, 4096);
            let (_, r) = e.write((8 + i) * 4096, IoBuf::from_slice(&d), false).await;
            r.expect("batched write");
            (i, d)
        });
    }
    while let Some(done) = tasks.join_next().await {
        let (i, d) = done.expect("write task");
        assert_bytes(&read(&e, (8 + i) * 4096, 4096).await, &d, "batched write");
    }
}

/// Auto falls back to buffered I/O where O_DIRECT is refused or too coarse,
/// and On refuses a request alignment below the DIO alignment.
#[test]
fn direct_auto_fallback() {
    let td = tempfile::tempdir_in("/var/tmp").expect("temp dir");
    let p = td.path().join("b.img");
    Backing::create_file(&p, MIB).expect("create");
    let b = Backing::open(&p, DirectIo::Auto, false, 4096).expect("open");
    eprintln!(
        "/var/tmp: direct={} alignment={}",
        b.is_direct(),
        b.alignment()
    );
    if b.is_direct() {
        let a = b.alignment();
        if a > 1 {
            let b2 = Backing::open(&p, DirectIo::Auto, false, a / 2).expect("open");
            assert!(!b2.is_direct());
            let err = Backing::open(&p, DirectIo::On, false, a / 2).expect_err("On too coarse");
            assert_eq!(err.op, Op::Open);
        }
        let b3 = Backing::open(&p, DirectIo::On, false, a).expect("On");
        assert!(b3.is_direct());
    }
}

/// `UringEngine::new` outside a runtime is an error, not a panic.
#[test]
fn uring_new_outside_runtime_fails() {
    let td = tempfile::tempdir().expect("temp dir");
    let p = td.path().join("b.img");
    Backing::create_file(&p, MIB).expect("create");
    let b = Backing::open(&p, DirectIo::Off, false, 512).expect("open");
    let err = UringEngine::new(b, 8).expect_err("no runtime");
    assert_eq!(err.op, Op::Open);
}

/// Rough throughput numbers (not a conformance check): 4 KiB random writes
/// then reads, 64 in flight, on a 256 MiB file in /var/tmp.
/// `cargo test -p tandem-daemon --lib --release storage::conformance::measure -- --ignored --nocapture`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn measure_4k_random_qd64() {
    let td = tempfile::tempdir_in("/var/tmp").expect("temp dir");
    let p = td.path().join("bench.img");
    let len = 256 * MIB;
    Backing::create_file(&p, len).expect("create");
    let engines: Vec<(&str, Arc<dyn Engine>)> = vec![
        (
            "uring direct",
            Arc::new(
                UringEngine::new(
                    Backing::open(&p, DirectIo::Auto, false, 4096).expect("open"),
                    128,
                )
                .expect("uring"),
            ),
        ),
        (
            "sync direct",
            Arc::new(SyncEngine::new(
                Backing::open(&p, DirectIo::Auto, false, 4096).expect("open"),
            )),
        ),
        (
            "uring buffered",
            Arc::new(
                UringEngine::new(
                    Backing::open(&p, DirectIo::Off, false, 4096).expect("open"),
                    128,
                )
                .expect("uring"),
            ),
        ),
        (
            "sync buffered",
            Arc::new(SyncEngine::new(
                Backing::open(&p, DirectIo::Off, false, 4096).expect("open"),
            )),
        ),
        ("memory", Arc::new(MemoryEngine::new(len))),
    ];
    // Allocate the file first so reads hit real blocks.
    write(&*engines[0].1, 0, &vec![1u8; len as usize], false).await;
    engines[0].1.flush().await.expect("flush");
    for (name, e) in engines {
        for write_phase in [true, false] {
            let per_task = 2000u64;
            let start = std::time::Instant::now();
            let mut tasks = Vec::new();
            for t in 0..64u64 {
                let e = e.clone();
                tasks.push(tokio::spawn(async move {
                    let mut rng = Rng(t * 7919 + 1);
                    let mut buf = IoBuf::zeroed(4096);
                    for _ in 0..per_task {
                        let off = rng.below(len / 4096) * 4096;
                        let (b, r) = if write_phase {
                            e.write(off, buf, false).await
                        } else {
                            e.read(off, buf).await
                        };
                        r.expect("bench I/O");
                        buf = b;
                    }
                }));
            }
            for t in tasks {
                t.await.expect("join");
            }
            let secs = start.elapsed().as_secs_f64();
            let what = if write_phase { "write" } else { "read" };
            eprintln!(
                "{name:>15} 4k rand {what:5} qd64: {:>8.0} IOPS",
                (64 * per_task) as f64 / secs
            );
        }
    }
}
