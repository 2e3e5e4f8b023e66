//! Daemon lifecycle and robustness: shutdown under load keeps every
//! acknowledged write, a second daemon cannot take over a socket or a backing
//! in use, and a client that never reads its replies cannot make the daemon
//! buffer without bound.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tandem_tests::{block_on, tandemd_must_refuse, Daemon, Rng};

const VOL: u64 = 256 << 20;

#[test]
fn sigterm_under_load_exits_cleanly_and_keeps_acknowledged_writes() {
    let mut d = Daemon::builder().volume("vol", VOL).start();
    // Acknowledged writes: (offset, seed, len). Each slot is written at most once.
    let acked: Arc<Mutex<Vec<(u64, u64, usize)>>> = Arc::default();
    let started = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..3u64)
        .map(|w| {
            let sock = d.socket().to_path_buf();
            let acked = acked.clone();
            let started = started.clone();
            std::thread::spawn(move || {
                block_on(async move {
                    let mut c = tandem_daemon::nbd::client::Client::connect_unix(&sock, "vol")
                        .await
                        .expect("connect");
                    for slot in 0..64u64 {
                        let off = (w * 64 + slot) << 20; // 64 one-MiB slots per writer
                        let seed = w * 1000 + slot;
                        let len = 256 << 10;
                        let data = Rng::new(seed).bytes(len);
                        if c.write(off, &data, false).await.is_err() {
                            return; // the daemon is shutting down
                        }
                        acked.lock().unwrap().push((off, seed, len));
                        started.store(true, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                })
            })
        })
        .collect();
    // An idle connection in transmission, and one stuck in negotiation.
    let mut idle = d.raw();
    idle.handshake("vol");
    let mut negotiating = d.raw();
    negotiating.fixed_newstyle();

    let deadline = Instant::now() + Duration::from_secs(10);
    while !started.load(Ordering::Relaxed) {
        assert!(
            Instant::now() < deadline,
            "writers never got an acknowledgement"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(100));
    let t = Instant::now();
    d.stop(); // SIGTERM; asserts exit status 0
    let took = t.elapsed();
    assert!(
        took < Duration::from_secs(10),
        "shutdown with clients connected took {took:?}"
    );
    assert!(
        idle.closed_within(Duration::from_secs(5)),
        "idle client not disconnected at shutdown"
    );
    assert!(
        negotiating.closed_within(Duration::from_secs(5)),
        "negotiating client not disconnected at shutdown"
    );
    for w in writers {
        w.join().expect("writer thread panicked");
    }
    assert!(
        d.log().contains("all volumes flushed"),
        "no final flush logged:\n{}",
        d.log()
    );

    d.start();
    let acked = acked.lock().unwrap().clone();
    assert!(!acked.is_empty());
    block_on(async {
        let mut c = d.client("vol").await;
        for (off, seed, len) in &acked {
            let mut back = vec![0u8; *len];
            c.read(*off, &mut back).await.expect("read");
            assert!(
                back == Rng::new(*seed).bytes(*len),
                "write acknowledged before SIGTERM lost at offset {off}"
            );
        }
        c.disconnect().await.expect("disconnect");
    });
    d.stop();
}

#[test]
fn second_daemon_cannot_take_over_a_live_socket() {
    let mut d = Daemon::builder().volume("vol", VOL).start();
    let other = d.dir().join("other.img");
    tandem_tests::create_volume(&other, "other", 64 << 20, &[]);
    let spec = format!("other={}", other.display());
    let admin2 = d.dir().join("admin2.sock").display().to_string();
    let sock = d.socket().display().to_string();
    let stderr = tandemd_must_refuse(&[
        "run",
        "--export",
        &spec,
        "--nbd-unix",
        &sock,
        "--admin-socket",
        &admin2,
    ]);
    assert!(
        stderr.contains("already listening"),
        "refusal does not say the socket is in use:\n{stderr}"
    );
    // The first daemon still owns the socket and serves.
    d.assert_running();
    let mut c = d.raw();
    c.handshake("vol");
    c.write_read_check(0, &Rng::new(1).bytes(4096));
    drop(c);
    d.stop();
}

/// Two daemons writing one backing would silently corrupt it; the second
/// must refuse (e.g. an exclusive `flock` on the backing, as DRBD refuses a
/// disk already attached).
#[test]
fn second_daemon_cannot_open_a_backing_in_use() {
    let mut d = Daemon::builder().volume("vol", VOL).start();
    let spec = format!("vol={}", d.backing("vol").display());
    let sock2 = d.dir().join("nbd2.sock");
    let admin2 = d.dir().join("admin2.sock");
    let mut cmd = std::process::Command::new(tandem_tests::tandemd());
    cmd.args(["run", "--export", &spec, "--nbd-unix"])
        .arg(&sock2)
        .arg("--admin-socket")
        .arg(&admin2)
        .env("NO_COLOR", "1")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    let mut second = cmd.spawn().expect("spawn second tandemd");
    let deadline = Instant::now() + Duration::from_secs(10);
    let served = loop {
        if second.try_wait().expect("try_wait").is_some() {
            break false;
        }
        if std::os::unix::net::UnixStream::connect(&sock2).is_ok() {
            break true;
        }
        assert!(
            Instant::now() < deadline,
            "second tandemd neither served nor exited"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    if served {
        let _ = second.kill();
    }
    let out = second.wait_with_output().expect("wait");
    let stderr = tandem_tests::strip_ansi(&String::from_utf8_lossy(&out.stderr));
    assert!(
        !served,
        "a second tandemd served {spec} while the first one was serving it \
         (no exclusive lock on the backing):\n{stderr}"
    );
    assert!(!out.status.success());
    assert!(
        stderr.contains("vol.img"),
        "refusal does not name the backing:\n{stderr}"
    );
    d.assert_running();
    d.stop();
}

/// A `tandemd` killed with I/O in flight holds its backing's lock for a
/// moment after it has been reaped (the kernel closes the file only when its
/// io_uring has drained). A daemon restarted at once waits for the lock
/// (up to 5 s) instead of refusing to start; one whose backing stays locked
/// is still refused (`second_daemon_cannot_open_a_backing_in_use`).
#[test]
fn a_backing_lock_released_soon_after_start_is_waited_for() {
    use std::os::fd::AsRawFd;
    let mut d = Daemon::builder().volume("vol", VOL).prepare();
    let holder = std::fs::File::open(d.backing("vol")).expect("open backing");
    // SAFETY: flock on a descriptor this test owns.
    let rc = unsafe { libc::flock(holder.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    assert_eq!(rc, 0, "flock: {}", std::io::Error::last_os_error());
    let release = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(1500));
        drop(holder);
    });
    let t0 = Instant::now();
    d.start();
    let waited = t0.elapsed();
    release.join().expect("release thread");
    assert!(
        waited >= Duration::from_millis(1400),
        "tandemd was ready after {waited:?}, before the lock was released"
    );
    assert!(
        d.log().contains("waiting for it to be released"),
        "no log line says tandemd waits for the lock:\n{}",
        d.log()
    );
    let mut c = d.raw();
    c.handshake("vol");
    c.write_read_check(0, &Rng::new(7).bytes(4096));
    drop(c);
    d.stop();
}

fn rss_bytes(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc/PID/status");
    let kb: u64 = s
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS");
    kb * 1024
}

/// The server bounds what one connection may have in flight
/// (`INFLIGHT_BYTES`, 64 MiB). A client that pipelines large READs and never
/// reads the replies must not make tandemd hold all that data in memory.
#[test]
fn client_that_never_reads_replies_cannot_exhaust_daemon_memory() {
    let mut d = Daemon::builder().volume("vol", VOL).start();
    let pid = d.pid();
    let mut c = d.raw();
    c.handshake("vol");
    let base = rss_bytes(pid);
    const N: u64 = 40; // 40 × 32 MiB = 1.25 GiB of read data requested
    for i in 0..N {
        c.request(0, 0, (i % 8) * (32 << 20), 32 << 20, &[]);
    }
    let mut peak = base;
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(3) {
        peak = peak.max(rss_bytes(pid));
        std::thread::sleep(Duration::from_millis(50));
    }
    let growth = peak.saturating_sub(base);
    // Meanwhile another client is served normally.
    let mut other = d.raw();
    other.handshake("vol");
    other.write_read_check(0, &Rng::new(2).bytes(4096));
    drop(c);
    drop(other);
    d.assert_running();
    assert!(
        growth < 256 << 20,
        "tandemd's RSS grew by {} MiB for one client that does not read its replies \
         ({} MiB of READs pipelined); replies should be bounded per connection",
        growth >> 20,
        (N * 32)
    );
    d.stop();
}
