//! Two tandemd processes replicating one volume over QUIC with mutual TLS
//! (loopback): fio verify=crc32c through the primary's export, the two
//! backings' data areas byte-identical afterwards, then a role swap and fio
//! verify on the new primary.

use std::time::Duration;

use crate::repl_common::{
    assert_same_data, connected_loopback_pair, ctl, fio, peer, resynced_bytes, status_text,
    wait_until, SIZE, UUID,
};
use tandem_tests::{block_on, create_volume, data_offset, heavy_lock, require, write_file_at};

#[test]
fn two_nodes_replicate_synchronously_and_swap_roles() {
    if !require("fio", "fio") {
        return;
    }
    let _heavy = heavy_lock();
    let (_certs, mut a, mut b) = connected_loopback_pair();

    fio(&a.uri("vol"), false);

    // Protocol C: everything fio was acknowledged is on both sites.
    let da = assert_same_data(&a, &b, "alpha and beta after fio");
    assert!(da.iter().any(|&x| x != 0), "fio wrote nothing?");

    // Status while connected: nothing in flight, nothing out of sync.
    for d in [&a, &b] {
        let p = peer(d);
        assert_eq!(p["in_flight"], 0, "{p}");
        assert_eq!(p["out_of_sync_bytes"], 0, "{p}");
    }
    let text = status_text(&a);
    assert!(
        text.contains(
            "  beta role:Secondary connection:Connected replication:Established \
             peer-disk:UpToDate in-flight:0 out-of-sync:0B\n"
        ),
        "tandemctl status:\n{text}"
    );

    // Swap roles: beta becomes primary and serves the same data.
    ctl(&a, "demote");
    ctl(&b, "promote");
    let s = b.export_status("vol");
    assert_eq!(s["replication"]["role"], "Primary", "{s}");
    fio(&b.uri("vol"), true);

    // The peer is lost and writes continue: the chunk written is marked
    // out of sync with it.
    a.stop();
    block_on(async {
        let mut c = b.client("vol").await;
        c.write(0, &[0x5a; 4096], false)
            .await
            .expect("write on beta");
        c.flush().await.expect("flush on beta");
    });
    wait_until(
        "beta to mark alpha outdated",
        Duration::from_secs(15),
        || peer(&b)["outdated"] == true,
    );
    let p = peer(&b);
    assert_ne!(p["connection"], "Connected", "{p}");
    assert_eq!(p["out_of_sync_bytes"], 4096, "{p}");
    assert_eq!(p["in_flight"], 0, "{p}");
    let text = status_text(&b);
    assert!(
        text.contains("in-flight:0 out-of-sync:4KiB (outdated: needs resync)"),
        "tandemctl status:\n{text}"
    );

    // alpha comes back (as configured, Primary: refused while beta is
    // Primary), is demoted, and beta resyncs it: not the whole volume.
    a.start();
    ctl(&a, "demote");
    wait_until("beta to resync alpha", Duration::from_secs(30), || {
        let p = peer(&b);
        p["connection"] == "Connected"
            && p["replication"] == "Established"
            && p["out_of_sync_bytes"] == 0
            && p["outdated"] == false
    });
    assert_eq!(a.export_status("vol")["replication"]["disk"], "UpToDate");
    assert_same_data(&a, &b, "alpha after the resync");
    // The dirty chunk, plus at most the one 4 MiB extent of writes beta had
    // sent to alpha unflushed before alpha stopped (alpha restarted, so
    // beta cannot know they reached its disk).
    let moved = resynced_bytes(&b);
    assert!(
        (4096..=4096 + (4 << 20)).contains(&moved),
        "resync moved {moved} bytes; beta's log:\n{}",
        b.log()
    );
    b.stop();
    a.stop();
}

/// A replica rebuilt with `tandemctl create --inconsistent` (a replaced disk)
/// holds no data: it cannot be promoted, and the primary gives it a full
/// sync, after which both backings are byte-identical.
#[test]
fn a_rebuilt_replica_takes_a_full_sync() {
    if !require("fio", "fio") {
        return;
    }
    let _heavy = heavy_lock();
    let (_certs, mut a, mut b) = connected_loopback_pair();
    fio(&a.uri("vol"), false);

    // beta's disk is replaced: fill it with garbage, re-create it.
    b.stop();
    wait_until(
        "alpha to notice beta is gone",
        Duration::from_secs(15),
        || peer(&a)["connection"] != "Connected",
    );
    let backing = b.backing("vol").to_path_buf();
    let off = data_offset(&backing);
    write_file_at(&backing, off, &vec![0xee; 1 << 20]);
    create_volume(
        &backing,
        "vol",
        SIZE,
        &["--uuid", UUID, "--force", "--inconsistent"],
    );
    b.start();
    wait_until(
        "alpha to fully resync beta",
        Duration::from_secs(60),
        || {
            let p = peer(&a);
            p["replication"] == "Established"
                && p["out_of_sync_bytes"] == 0
                && b.export_status("vol")["replication"]["disk"] == "UpToDate"
        },
    );
    assert_eq!(b.export_status("vol")["replication"]["disk"], "UpToDate");
    assert_eq!(resynced_bytes(&a), SIZE, "a full sync moves every chunk");
    a.stop();
    b.stop();
    assert_same_data(&a, &b, "alpha and the rebuilt beta");
}

/// kill -9 of the primary in the middle of writes: the secondary is promoted
/// and serves every acknowledged write; the old primary comes back, its
/// activity log marks the extents it may have written alone, and the new
/// primary resyncs those (and its own new writes) — not the whole volume.
#[test]
fn killing_the_primary_mid_write_loses_no_acknowledged_write() {
    let _heavy = heavy_lock();
    let (_certs, mut a, mut b) = connected_loopback_pair();

    // Four writers, each on its own 2 MiB region (the first 8 MiB).
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writers = crate::repl_common::spawn_writers(a.socket(), 4, 2 << 20, 4096, &stop);
    std::thread::sleep(Duration::from_millis(1500));
    a.kill9();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let results: Vec<_> = writers
        .into_iter()
        .map(|w| w.join().expect("writer"))
        .collect();
    let total: usize = results.iter().map(|(acked, _)| acked.len()).sum();
    assert!(total > 100, "the writers barely wrote ({total} blocks)");

    // Fail over: beta is promoted and holds every acknowledged write.
    wait_until(
        "beta to notice alpha is gone",
        Duration::from_secs(15),
        || peer(&b)["connection"] != "Connected",
    );
    ctl(&b, "promote");
    block_on(async {
        let mut c = b.client("vol").await;
        let mut buf = vec![0u8; 4096];
        for (acked, pending) in &results {
            for (off, data) in acked {
                c.read(*off, &mut buf).await.expect("read on beta");
                let ok =
                    buf == *data || pending.as_ref().is_some_and(|(p, d)| p == off && buf == *d);
                assert!(ok, "acknowledged write at {off} lost after failover");
            }
        }
        // The new primary writes while alpha is away.
        c.write(40 << 20, &[0x7e; 4096], false)
            .await
            .expect("write on beta");
        c.flush().await.expect("flush on beta");
    });

    // alpha returns (configured Primary: refused while beta is), is
    // demoted, and beta resyncs it.
    a.start();
    ctl(&a, "demote");
    wait_until("beta to resync alpha", Duration::from_secs(60), || {
        let p = peer(&b);
        p["connection"] == "Connected"
            && p["replication"] == "Established"
            && p["out_of_sync_bytes"] == 0
    });
    assert!(
        a.log().contains("activity log not empty at start"),
        "alpha's log:\n{}",
        a.log()
    );
    let moved = resynced_bytes(&b);
    assert!(
        (4096..=16 << 20).contains(&moved),
        "resync moved {moved} bytes: the activity-log extents of the first 8 MiB and beta's write, not the {SIZE}-byte volume"
    );
    b.stop();
    a.stop();
    assert_same_data(&a, &b, "alpha and beta after failover and resync");
}

/// Kill -9 the sync source, then the sync target, each about half-way
/// through a (rate-limited) resync: the resync resumes each time from the
/// persisted bitmaps — never a full sync of the volume — and both backings
/// end byte-identical with every write that was acknowledged.
#[test]
fn a_resync_resumes_after_the_source_and_then_the_target_are_killed_half_way() {
    use crate::repl_common::{cluster_certs, loopback_specs, node_with};
    let _heavy = heavy_lock();
    let certs = tempfile::tempdir().expect("tempdir");
    cluster_certs(certs.path());
    let (sa, sb) = loopback_specs(certs.path());
    // 16 MiB of a 64 MiB volume to move at 4 MB/s: about 4 s per pass.
    let mut a = node_with(sa, "resync_rate = \"4M\"");
    let mut b = node_with(sb, "resync_rate = \"4M\"");
    a.start();
    b.start();
    wait_until("alpha and beta to connect", Duration::from_secs(20), || {
        peer(&a)["replication"] == "Established"
    });
    const DIRTY: u64 = 16 << 20;
    b.stop();
    wait_until(
        "alpha to notice beta is gone",
        Duration::from_secs(15),
        || peer(&a)["connection"] != "Connected",
    );
    block_on(async {
        let mut c = a.client("vol").await;
        for i in 0..DIRTY >> 20 {
            let data = vec![(i as u8) | 0x80; 1 << 20];
            c.write(i << 20, &data, false).await.expect("write");
        }
        c.flush().await.expect("flush");
    });
    assert_eq!(peer(&a)["out_of_sync_bytes"], DIRTY);
    let half_way = |a: &tandem_tests::Daemon| {
        let p = peer(a);
        p["sync"]["done_bytes"].as_u64().unwrap_or(0) >= DIRTY / 3
    };

    // 1. The source dies half-way. (Restarted, its activity log marks the
    // extents it wrote as Primary again, so this pass may start over within
    // the dirty set — never the volume.)
    b.start();
    wait_until(
        "the first resync to get half-way",
        Duration::from_secs(30),
        || half_way(&a),
    );
    a.kill9();
    a.start();
    // 2. The target dies half-way through the resumed resync.
    wait_until(
        "the resumed resync to get half-way",
        Duration::from_secs(30),
        || half_way(&a),
    );
    let done_before_kill = peer(&a)["sync"]["done_bytes"].as_u64().unwrap_or(0);
    b.kill9();
    assert_eq!(
        resynced_bytes(&a),
        0,
        "no resync may have finished before the kills"
    );
    b.start();
    wait_until("the resync to finish", Duration::from_secs(60), || {
        let p = peer(&a);
        p["replication"] == "Established" && p["out_of_sync_bytes"] == 0
    });
    assert_eq!(b.export_status("vol")["replication"]["disk"], "UpToDate");
    let last = resynced_bytes(&a);
    eprintln!(
        "resync resume: {done_before_kill} bytes done when the target was killed, {last} moved after its restart (dirty set {DIRTY})"
    );
    assert!(
        last + done_before_kill <= DIRTY + (4 << 20) && last < DIRTY,
        "the last resync moved {last} bytes after {done_before_kill} were done: it must resume, not start over (dirty set {DIRTY})"
    );
    a.stop();
    b.stop();
    let data = assert_same_data(&a, &b, "after killing the source and the target mid-resync");
    for i in 0..DIRTY >> 20 {
        let off = (i << 20) as usize;
        assert!(
            data[off..off + (1 << 20)]
                .iter()
                .all(|&x| x == (i as u8) | 0x80),
            "MiB {i} lost"
        );
    }
}
