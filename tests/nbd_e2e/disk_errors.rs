//! Local disk errors (docs/replication.md, R23; promises 51 and 52): EIO
//! injected into a node's storage engine with `tandemctl inject-fault`.
//! With an UpToDate peer the Primary detaches its disk and every write,
//! flush and read continues through the peer (fio verify=crc32c passes);
//! without one the error reaches the NBD client — never a silent success.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::repl_common::{
    assert_same_data, cluster_certs, connected_loopback_pair, ctl, fio_cmd, loopback_specs, node,
    peer, resynced_bytes, status_text, wait_until, SIZE,
};
use tandem_tests::{block_on, heavy_lock, require, run, run_ok, tandemctl, Daemon};

fn inject(d: &Daemon, args: &[&str]) {
    run_ok(
        Command::new(tandemctl())
            .args(["inject-fault", "vol"])
            .args(args)
            .arg("--admin-socket")
            .arg(d.admin_socket()),
    );
}

fn clear(d: &Daemon) {
    run_ok(
        Command::new(tandemctl())
            .args(["clear-fault", "vol", "--admin-socket"])
            .arg(d.admin_socket()),
    );
}

#[test]
fn a_failing_primary_disk_detaches_and_io_continues_through_the_peer() {
    if !require("fio", "fio") {
        return;
    }
    let _heavy = heavy_lock();
    let (_certs, a, b) = connected_loopback_pair();
    // fio writes at a bounded rate (about 4 s for the 64 MiB), then reads
    // everything back to verify it; the disk fails early in the writes.
    let mut child = fio_cmd(&a.uri("vol"), false, &["--rate=,16m"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn fio");
    std::thread::sleep(Duration::from_millis(1200));
    assert!(
        child.try_wait().expect("fio status").is_none(),
        "fio finished before the fault was injected"
    );
    inject(&a, &["--reads", "--writes"]);
    let started = Instant::now();
    let out = loop {
        if child.try_wait().expect("fio status").is_some() {
            break child.wait_with_output().expect("fio output");
        }
        if started.elapsed() > Duration::from_secs(120) {
            let _ = child.kill();
            panic!("fio did not finish");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        out.status.success(),
        "fio through the detached primary failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // alpha is Diskless (detached), still Primary; beta UpToDate.
    let s = a.export_status("vol");
    let r = &s["replication"];
    assert_eq!(r["disk"], "Diskless", "{s}");
    assert_eq!(r["detached"], true, "{s}");
    assert_eq!(r["role"], "Primary", "{s}");
    assert_eq!(peer(&a)["disk"], "UpToDate", "{s}");
    let sb = b.export_status("vol");
    assert_eq!(sb["replication"]["disk"], "UpToDate", "{sb}");
    assert_eq!(peer(&b)["disk"], "Diskless", "{sb}");
    let text = status_text(&a);
    assert!(
        text.contains("disk:Diskless(detached: local disk failed)"),
        "tandemctl status:\n{text}"
    );
    assert!(a.log().contains("local disk failed: detached"), "log");

    // The fault is still armed: every read below goes through beta. fio
    // verifies the whole job again, and beta's own disk holds the same.
    let verify = |uri: &str| {
        let out = run(&mut fio_cmd(uri, true, &[]));
        assert!(
            out.status.success(),
            "fio verify through {uri} failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    };
    verify(&a.uri("vol"));
    verify(&b.uri("vol"));

    // Clearing the fault does not re-attach the disk: it stays detached
    // until tandemd restarts (docs/operations.md).
    clear(&a);
    block_on(async {
        let mut c = a.client("vol").await;
        c.write(0, &[0x6b; 4096], true).await.expect("write");
        c.flush().await.expect("flush");
    });
    assert_eq!(a.export_status("vol")["replication"]["disk"], "Diskless");
    // A Diskless node is never promoted: demote it, and promotion fails.
    ctl(&a, "demote");
    let out = crate::repl_common::ctl_output(&a, "promote");
    assert!(!out.status.success(), "promoting a Diskless node succeeded");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Diskless"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn without_an_up_to_date_peer_an_injected_eio_reaches_the_nbd_client() {
    let _heavy = heavy_lock();
    // A plain (unreplicated) export: the engine's error is the reply.
    let d = Daemon::builder().volume("vol", 8 << 20).start();
    inject(&d, &["--writes", "--offset", "1048576", "--len", "4096"]);
    block_on(async {
        let mut c = d.client("vol").await;
        c.write(0, &[1; 4096], false)
            .await
            .expect("outside the range");
        assert!(c.write(1 << 20, &[1; 4096], false).await.is_err());
        let mut buf = vec![0u8; 4096];
        c.read(1 << 20, &mut buf)
            .await
            .expect("reads are not failed");
    });
    inject(&d, &["--reads"]);
    block_on(async {
        let mut c = d.client("vol").await;
        let mut buf = vec![0u8; 4096];
        assert!(c.read(0, &mut buf).await.is_err());
        c.write(1 << 20, &[2; 4096], false)
            .await
            .expect("writes work again");
    });
    clear(&d);
    block_on(async {
        let mut c = d.client("vol").await;
        let mut buf = vec![0u8; 4096];
        c.read(1 << 20, &mut buf).await.expect("read");
        assert_eq!(buf, vec![2; 4096]);
    });

    // A replicated Primary whose peer is down: its disk fails, it detaches,
    // and with nobody holding the data every write, flush and read fails.
    let certs = tempfile::tempdir().expect("tempdir");
    cluster_certs(certs.path());
    let (sa, _sb) = loopback_specs(certs.path());
    let mut a = node(sa);
    a.start();
    block_on(async {
        let mut c = a.client("vol").await;
        c.write(0, &[3; 4096], false).await.expect("healthy write");
    });
    inject(&a, &["--writes"]);
    block_on(async {
        let mut c = a.client("vol").await;
        assert!(c.write(4096, &[4; 4096], false).await.is_err());
    });
    wait_until("alpha to detach", Duration::from_secs(10), || {
        a.export_status("vol")["replication"]["disk"] == "Diskless"
    });
    clear(&a);
    block_on(async {
        let mut c = a.client("vol").await;
        assert!(c.write(8192, &[5; 4096], false).await.is_err());
        assert!(c.flush().await.is_err());
        let mut buf = vec![0u8; 4096];
        assert!(c.read(0, &mut buf).await.is_err());
    });
    let s = a.export_status("vol");
    assert!(s["io_errors"].as_u64().unwrap_or(0) >= 4, "{s}");
}

/// Writes `n` 64 KiB blocks of `byte` from `at` through `d`, then flushes.
fn write_blocks(d: &Daemon, at: u64, n: u64, byte: u8) {
    block_on(async {
        let mut c = d.client("vol").await;
        for k in 0..n {
            c.write(at + k * 65536, &[byte; 65536], false)
                .await
                .unwrap_or_else(|e| panic!("write {k} at {at}: {e:#}"));
        }
        c.flush().await.expect("flush");
    });
}

/// Re-attach of a Secondary = restart with the disk healthy: the Primary's
/// bitmap (the writes it failed, and every write since) drives the resync.
#[test]
fn a_failed_secondary_disk_is_resynced_from_the_primary_bitmap_after_a_restart() {
    let _heavy = heavy_lock();
    let (_certs, mut a, mut b) = connected_loopback_pair();
    write_blocks(&a, 0, 16, 1);
    inject(&b, &["--writes"]);
    // beta's disk fails: alpha's writes complete (on alpha's disk).
    write_blocks(&a, 4 << 20, 16, 2);
    wait_until("beta to detach", Duration::from_secs(10), || {
        b.export_status("vol")["replication"]["disk"] == "Diskless"
    });
    wait_until(
        "alpha to see beta Diskless",
        Duration::from_secs(10),
        || peer(&a)["disk"] == "Diskless",
    );
    write_blocks(&a, 8 << 20, 16, 3);
    let p = peer(&a);
    assert_eq!(p["outdated"], true, "{p}");
    assert!(
        p["out_of_sync_bytes"].as_u64().unwrap_or(0) >= 2 << 20,
        "{p}"
    );
    // Re-attach: restart beta (the injected fault does not survive it).
    b.restart();
    wait_until("alpha to resync beta", Duration::from_secs(60), || {
        let p = peer(&a);
        p["replication"] == "Established"
            && p["out_of_sync_bytes"] == 0
            && b.export_status("vol")["replication"]["disk"] == "UpToDate"
    });
    let moved = resynced_bytes(&a);
    assert!(
        (2 << 20..SIZE).contains(&moved),
        "a bitmap-based resync, not a full one: moved {moved} bytes"
    );
    a.stop();
    b.stop();
    assert_same_data(&a, &b, "alpha and the re-attached beta");
}

/// A detached Primary is switched over and comes back (restart with the
/// disk healthy) as a full-sync target: it missed every write issued while
/// it was detached.
#[test]
fn a_detached_primary_comes_back_after_a_switchover_with_a_full_sync() {
    let _heavy = heavy_lock();
    let (_certs, mut a, mut b) = connected_loopback_pair();
    write_blocks(&a, 0, 16, 1);
    inject(&a, &["--writes"]);
    write_blocks(&a, 4 << 20, 16, 2);
    assert_eq!(a.export_status("vol")["replication"]["disk"], "Diskless");
    ctl(&a, "demote");
    ctl(&b, "promote");
    write_blocks(&b, 8 << 20, 16, 3);
    a.restart();
    ctl(&a, "demote");
    wait_until("beta to resync alpha", Duration::from_secs(60), || {
        let p = peer(&b);
        p["replication"] == "Established"
            && p["out_of_sync_bytes"] == 0
            && a.export_status("vol")["replication"]["disk"] == "UpToDate"
    });
    assert_eq!(resynced_bytes(&b), SIZE, "a full sync moves every chunk");
    a.stop();
    b.stop();
    assert_same_data(&a, &b, "the re-attached alpha and beta");
}
