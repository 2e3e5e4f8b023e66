//! Checksum-based resync (docs/replication.md, R26) with two real tandemd
//! processes: after kill -9 of the Primary, the activity-log extents it
//! may have written alone are resynced. Almost all of that data is in fact
//! identical on both sites (protocol C wrote it to both); with
//! `resync_checksums = true` only the blocks whose digests differ cross
//! the link. The same scenario runs once without checksums for comparison.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::repl_common::{
    assert_same_data, cluster_certs, ctl, loopback_specs, node_with, peer, peer_connected,
    resynced_bytes, spawn_writers, wait_until, SIZE,
};
use tandem_tests::{block_on, heavy_lock};

/// What a resync as sync source did, from the source's log and metrics.
#[derive(Debug, Default)]
struct Resync {
    /// Bytes moved (`SyncFinished`): data and zero frames.
    moved: u64,
    /// Bytes compared by digest (`SyncChecksums`).
    compared: u64,
    /// Of those, bytes found identical and not sent.
    identical: u64,
    /// Bytes the activity-log recovery marked on the crashed Primary.
    marked: u64,
}

/// Sums `field: N` over the `SyncChecksums` events in a log.
fn checksum_field(log: &str, field: &str) -> u64 {
    let key = format!("{field}: ");
    log.lines()
        .filter(|l| l.contains("SyncChecksums"))
        .filter_map(|l| {
            let rest = &l[l.find(&key)? + key.len()..];
            let end = rest
                .find(|c: char| !c.is_ascii_digit())
                .unwrap_or(rest.len());
            rest[..end].parse::<u64>().ok()
        })
        .sum()
}

/// The value of one sample line `name{labels} value` in a `/metrics` scrape.
fn scrape(port: u16, series: &str) -> Option<u64> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    out.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse::<u64>().ok())
}

fn free_tcp_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind tcp");
    l.local_addr().expect("local_addr").port()
}

/// Writers on alpha (Primary) over the first 8 MiB, kill -9 of alpha,
/// beta promoted and writing one block at 40 MiB, alpha back as
/// Secondary and resynced by beta. Returns what beta's resync did; both
/// data areas are checked byte-identical at the end.
fn crash_the_primary_and_resync(checksums: bool) -> Resync {
    let certs = tempfile::tempdir().expect("tempdir");
    cluster_certs(certs.path());
    let (sa, sb) = loopback_specs(certs.path());
    let extra = format!("resync_checksums = {checksums}");
    let mut a = node_with(sa, &extra);
    let mut b = node_with(sb, &extra);
    let metrics = free_tcp_port();
    b.add_args(&["--metrics-listen", &format!("127.0.0.1:{metrics}")]);
    a.start();
    b.start();
    wait_until("alpha and beta to connect", Duration::from_secs(20), || {
        peer_connected(&a) && peer_connected(&b)
    });

    let stop = Arc::new(AtomicBool::new(false));
    let writers = spawn_writers(a.socket(), 4, 2 << 20, 1024, &stop);
    std::thread::sleep(Duration::from_millis(1500));
    a.kill9();
    stop.store(true, Ordering::Relaxed);
    let written: usize = writers
        .into_iter()
        .map(|w| w.join().expect("writer").0.len())
        .sum();
    assert!(written > 100, "the writers barely wrote ({written} blocks)");

    wait_until(
        "beta to notice alpha is gone",
        Duration::from_secs(15),
        || peer(&b)["connection"] != "Connected",
    );
    ctl(&b, "promote");
    block_on(async {
        let mut c = b.client("vol").await;
        c.write(40 << 20, &[0x7e; 4096], false)
            .await
            .expect("write on beta");
        c.flush().await.expect("flush on beta");
    });

    a.start();
    ctl(&a, "demote");
    wait_until("beta to resync alpha", Duration::from_secs(60), || {
        let p = peer(&b);
        p["connection"] == "Connected"
            && p["replication"] == "Established"
            && p["out_of_sync_bytes"] == 0
    });
    let alog = a.log();
    let marked = alog
        .lines()
        .find(|l| l.contains("activity log not empty at start"))
        .and_then(|l| {
            let rest = &l[l.find(" bytes=")? + 7..];
            let end = rest
                .find(|c: char| !c.is_ascii_digit())
                .unwrap_or(rest.len());
            rest[..end].parse::<u64>().ok()
        })
        .unwrap_or_else(|| panic!("no activity-log recovery in alpha's log:\n{alog}"));
    let blog = b.log();
    let r = Resync {
        moved: resynced_bytes(&b),
        compared: checksum_field(&blog, "compared_bytes"),
        identical: checksum_field(&blog, "identical_bytes"),
        marked,
    };
    // The metrics say the same as the log.
    let series = |m: &str| format!(r#"{m}{{volume="vol",peer="alpha"}}"#);
    assert_eq!(
        scrape(metrics, &series("tandem_peer_resync_compared_bytes_total")),
        Some(r.compared),
        "{r:?}"
    );
    assert_eq!(
        scrape(metrics, &series("tandem_peer_resync_identical_bytes_total")),
        Some(r.identical),
        "{r:?}"
    );
    assert_eq!(
        scrape(metrics, &series("tandem_peer_resync_bytes_total")),
        Some(r.moved),
        "{r:?}"
    );
    b.stop();
    a.stop();
    assert_same_data(&a, &b, "alpha and beta after the failover and resync");
    r
}

/// R26: after kill -9 of the Primary, a checksum-based resync of the
/// activity-log extents moves only the blocks that really differ — far
/// less than a plain resync of the same scenario — and both backing files
/// end byte-identical.
#[test]
fn checksum_resync_after_a_primary_crash_sends_only_the_blocks_that_differ() {
    let _heavy = heavy_lock();
    let plain = crash_the_primary_and_resync(false);
    let csum = crash_the_primary_and_resync(true);
    println!(
        "resync after kill -9 of the Primary: without checksums {plain:?}; with checksums {csum:?}"
    );
    // Without checksums every marked byte moves, nothing is compared.
    assert_eq!((plain.compared, plain.identical), (0, 0), "{plain:?}");
    assert!(plain.moved >= plain.marked, "{plain:?}");
    // With them every marked byte (the activity-log extents and beta's
    // block) is compared, and only the differing ones move: at least
    // beta's own 4 KiB, at most a few blocks in flight at the kill.
    assert!(csum.marked >= 4 << 20, "{csum:?}");
    assert!(csum.compared >= csum.marked, "{csum:?}");
    assert_eq!(csum.moved, csum.compared - csum.identical, "{csum:?}");
    assert!(
        (4096..=256 << 10).contains(&csum.moved),
        "moved {} of {} compared bytes: {csum:?}",
        csum.moved,
        csum.compared
    );
    assert!(
        csum.moved * 16 < plain.moved,
        "checksums must save most of the transfer: {csum:?} vs {plain:?}"
    );
    assert!(csum.moved < SIZE);
}
