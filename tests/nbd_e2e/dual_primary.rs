//! Dual-primary mode (live migration) with two real tandemd processes over
//! QUIC + mTLS on loopback: with `allow_two_primaries` both nodes are
//! promoted and write through their own NBD exports; disjoint writes reach
//! both backings, concurrent writes to the same blocks are detected, counted
//! in `tandemctl status` and ordered the same on both (docs/replication.md,
//! R9). Without it a second promotion is refused; with protocol A the daemon
//! refuses to start.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::repl_common::{
    assert_same_data, cluster_certs, ctl, ctl_output, data_area, loopback_specs, node_with, peer,
    peer_connected, wait_until, SIZE,
};
use tandem_daemon::nbd::client::Client;
use tandem_tests::{block_on, heavy_lock, Daemon};

const BS: usize = 4096;
/// The contended blocks: few, so that both sides hit the same ones often.
const HOT_BASE: u64 = 8 << 20;
const HOT_BLOCKS: u64 = 4;
/// Writer threads per node and 4k writes per thread.
const WRITERS: u64 = 2;
const WRITES: u64 = 250;

struct Pair {
    a: Daemon,
    b: Daemon,
    _certs: tempfile::TempDir,
}

fn pair(extra: &str) -> Pair {
    let certs = tempfile::tempdir().expect("tempdir");
    cluster_certs(certs.path());
    let (sa, sb) = loopback_specs(certs.path());
    let a = node_with(sa, extra);
    let b = node_with(sb, extra);
    Pair {
        a,
        b,
        _certs: certs,
    }
}

fn start(p: &mut Pair) {
    p.a.start();
    p.b.start();
    wait_until("alpha and beta to connect", Duration::from_secs(20), || {
        peer_connected(&p.a) && peer_connected(&p.b)
    });
}

/// A 4k block naming its writer: the tag (node, thread, sequence) repeated.
fn tagged(node: u64, thread: u64, seq: u64) -> Vec<u8> {
    let tag = (node << 48) | (thread << 32) | seq;
    tag.to_le_bytes().repeat(BS / 8)
}

/// The tag a block holds if it is one whole tagged write.
fn tag_of(block: &[u8]) -> Option<u64> {
    let tag = u64::from_le_bytes(block[..8].try_into().ok()?);
    (block == tag.to_le_bytes().repeat(BS / 8).as_slice()).then_some(tag)
}

fn write_all(socket: &Path, writes: Vec<(u64, Vec<u8>)>) {
    block_on(async {
        let mut c = Client::connect_unix(socket, "vol")
            .await
            .expect("connect to the export");
        for (offset, data) in &writes {
            c.write(*offset, data, false)
                .await
                .unwrap_or_else(|e| panic!("write at {offset}: {e:#}"));
        }
        c.flush().await.expect("flush");
    });
}

fn socket(d: &Daemon) -> PathBuf {
    d.socket().to_path_buf()
}

fn assert_in_sync(d: &Daemon) {
    let p = peer(d);
    assert_eq!(p["connection"], "Connected", "{p}");
    assert_eq!(p["replication"], "Established", "{p}");
    assert_eq!(p["outdated"], false, "{p}");
    assert_eq!(p["in_flight"], 0, "{p}");
    assert_eq!(p["out_of_sync_bytes"], 0, "{p}");
}

#[test]
fn dual_primary_writes_from_both_nodes_replicate_and_conflicts_are_reported() {
    let _heavy = heavy_lock();
    let mut p = pair("allow_two_primaries = true");
    start(&mut p);

    // Live migration: promote the target while the source is Primary.
    ctl(&p.b, "promote");
    wait_until("alpha to see beta Primary", Duration::from_secs(10), || {
        peer(&p.a)["role"] == "Primary"
    });
    for d in [&p.a, &p.b] {
        let s = d.export_status("vol");
        assert_eq!(s["replication"]["role"], "Primary", "{s}");
        assert_eq!(s["replication"]["conflicts"], 0, "{s}");
    }

    // Disjoint writes, one MiB from each side at the same time.
    let mib = 1u64 << 20;
    let chunks = |node: u64, base: u64| {
        (0..mib / BS as u64)
            .map(|i| (base + i * BS as u64, tagged(node, 0, i)))
            .collect::<Vec<_>>()
    };
    let (sa, sb) = (socket(&p.a), socket(&p.b));
    std::thread::scope(|s| {
        s.spawn(|| write_all(&sa, chunks(1, 0)));
        s.spawn(|| write_all(&sb, chunks(2, mib)));
    });
    let (da, db) = (data_area(&p.a, SIZE), data_area(&p.b, SIZE));
    assert!(
        da == db,
        "data areas differ after disjoint dual-primary writes"
    );
    for (node, base) in [(1u64, 0u64), (2, mib)] {
        for (offset, data) in chunks(node, base) {
            let o = offset as usize;
            assert!(
                da[o..o + BS] == data[..],
                "node {node}'s write at {offset} is missing"
            );
        }
    }
    for d in [&p.a, &p.b] {
        assert_in_sync(d);
    }

    // The same few blocks written from both sides at once, many times.
    std::thread::scope(|s| {
        for (node, sock) in [(1u64, &sa), (2, &sb)] {
            for t in 0..WRITERS {
                let writes = (0..WRITES)
                    .map(|i| {
                        let block = (i * 7 + t * 3 + node) % HOT_BLOCKS;
                        (HOT_BASE + block * BS as u64, tagged(node, t, i))
                    })
                    .collect();
                s.spawn(move || write_all(sock, writes));
            }
        }
    });
    let da = assert_same_data(
        &p.a,
        &p.b,
        "the two Primaries diverged after concurrent writes to the same blocks",
    );
    for k in 0..HOT_BLOCKS {
        let o = (HOT_BASE + k * BS as u64) as usize;
        let tag = tag_of(&da[o..o + BS])
            .unwrap_or_else(|| panic!("hot block {k} is not one whole write (torn?)"));
        assert!(
            matches!(tag >> 48, 1 | 2),
            "hot block {k} holds an unknown tag {tag:#x}"
        );
    }

    // Conflicts were detected and reported on both nodes (symmetrically:
    // the streams are ordered), and the nodes stayed connected and in sync
    // (nothing silently reordered or dropped).
    let mut counts = Vec::new();
    for (name, d) in [("alpha", &p.a), ("beta", &p.b)] {
        let s = d.export_status("vol");
        let conflicts = s["replication"]["conflicts"].as_u64().expect("conflicts");
        eprintln!("{name}: {conflicts} concurrent-write conflicts");
        assert!(
            conflicts > 0,
            "{name}: no concurrent-write conflict reported after {} racing writes: {s}",
            2 * WRITERS * WRITES
        );
        assert_in_sync(d);
        assert!(
            d.log().contains("ConcurrentWriteConflict"),
            "{name}: no conflict warning in the log"
        );
        counts.push(conflicts);
    }
    assert_eq!(counts[0], counts[1], "conflicts seen by one side only");

    // End of the migration: demote the source.
    ctl(&p.a, "demote");
    wait_until(
        "beta to see alpha Secondary",
        Duration::from_secs(10),
        || peer(&p.b)["role"] == "Secondary",
    );
    p.a.stop();
    p.b.stop();
}

#[test]
fn second_promote_is_refused_without_allow_two_primaries() {
    let mut p = pair("");
    start(&mut p);
    let out = ctl_output(&p.b, "promote");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "second promote succeeded");
    assert!(
        stderr.contains("promote refused: peer alpha is Primary and allow_two_primaries is off"),
        "unclear refusal: {stderr}"
    );
    let s = p.b.export_status("vol");
    assert_eq!(s["replication"]["role"], "Secondary", "{s}");
    assert_eq!(peer(&p.a)["role"], "Secondary");
    p.a.stop();
    p.b.stop();
}

#[test]
fn allow_two_primaries_with_protocol_a_is_refused_at_start() {
    let p = pair("allow_two_primaries = true\nprotocol = \"A\"");
    let err = p.a.must_refuse();
    assert!(
        err.contains(
            "export[0].replication.allow_two_primaries: dual-primary needs protocol = \"C\""
        ),
        "{err}"
    );
}
