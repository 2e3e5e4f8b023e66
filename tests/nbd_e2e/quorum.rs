//! Split brain and quorum with real processes on loopback: a witness
//! (`tandemd witness`), automatic failover after `kill -9` of the Primary,
//! an isolated Primary that holds its writes (an nftables rule drops every
//! packet to and from its UDP port, cutting it off from its peer and the
//! witness at once), and a split brain resolved with
//! `tandemctl resolve --discard-my-data` (docs/replication.md, R24 and R25).

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::repl_common::{
    assert_same_data, cluster_certs, connected_loopback_pair, ctl, issue, loopback_specs,
    node_with, peer, resynced_bytes, wait_until, SIZE,
};
use tandem_tests::{block_on, heavy_lock, require, run, tandemctl, tandemd, Daemon};

/// A running `tandemd witness`, killed on drop.
struct Witness {
    child: Child,
    addr: String,
    log: std::path::PathBuf,
}

impl Witness {
    fn start(certs: &Path, state: &Path) -> Witness {
        issue(certs, "witness");
        let port = crate::repl_common::free_udp_port();
        let addr = format!("127.0.0.1:{port}");
        let log = certs.join("witness.log");
        let child = Command::new(tandemd())
            .args(["witness", "--listen", &addr, "--allow", "alpha,beta"])
            .arg("--cert")
            .arg(certs.join("witness.crt"))
            .arg("--key")
            .arg(certs.join("witness.key"))
            .arg("--ca")
            .arg(certs.join("ca.crt"))
            .arg("--state")
            .arg(state)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("witness log"))
            .spawn()
            .expect("start tandemd witness");
        Witness { child, addr, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Witness {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Drops every UDP packet to or from `port` on loopback while it lives.
struct Isolate(String);

impl Isolate {
    fn port(port: u16) -> Isolate {
        let table = format!("tdmiso{port}");
        let nft = |args: &[&str]| {
            let out = run(Command::new("nft").args(args));
            assert!(
                out.status.success(),
                "nft {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        nft(&["add", "table", "inet", &table]);
        nft(&[
            "add", "chain", "inet", &table, "out", "{", "type", "filter", "hook", "output",
            "priority", "0", ";", "}",
        ]);
        let p = port.to_string();
        nft(&[
            "add", "rule", "inet", &table, "out", "udp", "sport", &p, "drop",
        ]);
        nft(&[
            "add", "rule", "inet", &table, "out", "udp", "dport", &p, "drop",
        ]);
        Isolate(table)
    }
}

impl Drop for Isolate {
    fn drop(&mut self) {
        let _ = run(Command::new("nft").args(["delete", "table", "inet", &self.0]));
    }
}

fn can_nft() -> bool {
    if !require("nft", "nftables") {
        return false;
    }
    let probe = "tdmprobe";
    let ok = run(Command::new("nft").args(["add", "table", "inet", probe]))
        .status
        .success();
    let _ = run(Command::new("nft").args(["delete", "table", "inet", probe]));
    if !ok {
        tandem_tests::skip("nftables is not usable here (needs root and nf_tables)");
    }
    ok
}

fn port_of(addr: &str) -> u16 {
    addr.rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("port")
}

/// alpha (Primary) and beta (Secondary) using `w` as witness.
fn pair_with_witness(certs: &Path, w: &Witness, extra: &str) -> (Daemon, Daemon, u16) {
    let (sa, sb) = loopback_specs(certs);
    let alpha_port = port_of(&sa.listen);
    let cfg = format!(
        "witness = {{ name = \"witness\", address = \"{}\" }}\nfailover_timeout = \"1s\"\n{extra}",
        w.addr
    );
    let mut a = node_with(sa, &cfg);
    let mut b = node_with(sb, &cfg);
    a.start();
    b.start();
    wait_until(
        "alpha, beta and the witness to connect",
        Duration::from_secs(20),
        || {
            let q = |d: &Daemon| d.export_status("vol")["replication"]["quorum"].clone();
            peer(&a)["replication"] == "Established"
                && peer(&b)["replication"] == "Established"
                && q(&a)["witness_connected"] == true
                && q(&b)["witness_connected"] == true
        },
    );
    (a, b, alpha_port)
}

fn role(d: &Daemon) -> String {
    d.export_status("vol")["replication"]["role"]
        .as_str()
        .unwrap_or("")
        .to_owned()
}

/// R25 / item 9's promise: with a witness, `kill -9` of the Primary makes
/// the other site promote itself within the failover timeout, and every
/// acknowledged write reads back there. The returning node is outdated by
/// the witness, stands down, and is resynced.
#[test]
fn with_a_witness_the_other_site_takes_over_after_kill_9_and_keeps_every_acknowledged_write() {
    let _heavy = heavy_lock();
    let certs = tempfile::tempdir().expect("tempdir");
    cluster_certs(certs.path());
    let w = Witness::start(certs.path(), &certs.path().join("witness.json"));
    let (mut a, b, _) = pair_with_witness(certs.path(), &w, "");

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writers = crate::repl_common::spawn_writers(a.socket(), 4, 2 << 20, 2048, &stop);
    std::thread::sleep(Duration::from_millis(1500));
    a.kill9();
    let killed = Instant::now();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let results: Vec<_> = writers
        .into_iter()
        .map(|w| w.join().expect("writer"))
        .collect();
    let total: usize = results.iter().map(|(acked, _)| acked.len()).sum();
    assert!(total > 100, "the writers barely wrote ({total} blocks)");

    // No operator: beta promotes itself once the witness agrees.
    wait_until("beta to take over", Duration::from_secs(30), || {
        role(&b) == "Primary"
    });
    let failover = block_on(async {
        let mut c = b.client("vol").await;
        c.write(40 << 20, &[0x7e; 4096], false)
            .await
            .expect("write on beta after the failover");
        let took = killed.elapsed();
        let mut buf = vec![0u8; 4096];
        for (acked, pending) in &results {
            for (off, data) in acked {
                c.read(*off, &mut buf).await.expect("read on beta");
                let ok =
                    buf == *data || pending.as_ref().is_some_and(|(p, d)| p == off && buf == *d);
                assert!(ok, "acknowledged write at {off} lost after the failover");
            }
        }
        c.flush().await.expect("flush on beta");
        took
    });
    eprintln!(
        "failover: kill -9 of the Primary -> the other site acknowledged a write in {:.2} s ({total} acknowledged writes verified)",
        failover.as_secs_f64()
    );
    assert!(
        failover < Duration::from_secs(30),
        "failover took {failover:?}"
    );
    let q = &b.export_status("vol")["replication"]["quorum"];
    assert_eq!(q["failovers"], 1, "{q}");
    assert_eq!(q["holder"], "beta", "{q}");

    // alpha returns, still configured Primary: the witness says it missed
    // writes, it stands down and is resynced; then the grant is released.
    a.start();
    wait_until("beta to resync alpha", Duration::from_secs(60), || {
        let p = peer(&b);
        p["connection"] == "Connected"
            && p["replication"] == "Established"
            && p["out_of_sync_bytes"] == 0
    });
    assert_eq!(role(&a), "Secondary");
    wait_until(
        "the witness to release beta's grant",
        Duration::from_secs(10),
        || b.export_status("vol")["replication"]["quorum"]["holder"].is_null(),
    );
    let moved = resynced_bytes(&b);
    assert!(
        moved < SIZE / 2,
        "resync moved {moved} bytes, not the activity-log extents and beta's write"
    );
    assert!(w.log().contains("witness verdict"), "{}", w.log());
    let (mut a, mut b) = (a, b);
    b.stop();
    a.stop();
    assert_same_data(&a, &b, "alpha and beta after the failover and resync");
}

/// R25: a Primary cut off from both its peer and the witness acknowledges
/// no further write (it holds them); the other site takes over; once the
/// network heals the isolated node learns it lost, fails the held write,
/// stands down and takes the new Primary's data.
#[test]
fn an_isolated_primary_holds_its_writes_and_the_other_site_takes_over() {
    let _heavy = heavy_lock();
    if !can_nft() {
        return;
    }
    let certs = tempfile::tempdir().expect("tempdir");
    cluster_certs(certs.path());
    let w = Witness::start(certs.path(), &certs.path().join("witness.json"));
    let (mut a, mut b, alpha_port) = pair_with_witness(certs.path(), &w, "");
    block_on(async {
        let mut c = a.client("vol").await;
        c.write(0, &[0x11; 4096], false).await.expect("write");
        c.flush().await.expect("flush");
    });

    let iso = Isolate::port(alpha_port);
    let cut = Instant::now();
    // A write on alpha now: it must not be acknowledged.
    let sock = a.socket().to_path_buf();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let r = block_on(async move {
            let mut c = tandem_daemon::nbd::client::Client::connect_unix(&sock, "vol")
                .await
                .expect("connect");
            c.write(0, &[0x5a; 4096], false).await
        });
        let _ = tx.send(r);
    });
    wait_until("beta to take over", Duration::from_secs(30), || {
        role(&b) == "Primary"
    });
    eprintln!(
        "isolated Primary: the other site promoted itself {:.2} s after the cut",
        cut.elapsed().as_secs_f64()
    );
    assert!(
        rx.recv_timeout(Duration::from_millis(500)).is_err(),
        "the isolated Primary acknowledged (or failed) a write it may not complete"
    );
    let q = &a.export_status("vol")["replication"]["quorum"];
    assert_eq!(q["held"], 1, "{q}");
    assert!(
        crate::repl_common::status_text(&a).contains("SUSPENDED"),
        "{}",
        crate::repl_common::status_text(&a)
    );
    block_on(async {
        let mut c = b.client("vol").await;
        c.write(0, &[0xb0; 4096], false)
            .await
            .expect("write on beta");
        c.write(8192, &[0xb1; 4096], false)
            .await
            .expect("write on beta");
        c.flush().await.expect("flush");
    });

    drop(iso);
    let held = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the held write to end once alpha learns it lost");
    assert!(held.is_err(), "the held write must fail, not succeed");
    wait_until("beta to resync alpha", Duration::from_secs(60), || {
        let p = peer(&b);
        p["connection"] == "Connected" && p["replication"] == "Established"
    });
    assert_eq!(role(&a), "Secondary");
    b.stop();
    a.stop();
    let data = assert_same_data(&a, &b, "alpha and beta after alpha's isolation");
    assert_eq!(&data[..4096], &[0xb0; 4096][..], "beta's write wins");
    assert_eq!(&data[8192..12288], &[0xb1; 4096][..]);
}

/// R24: a split brain (both wrote while apart) is detected on both sides
/// and overwrites nothing; `tandemctl resolve --discard-my-data` on one of
/// them resolves it with a bitmap-based resync (only the chunks either side
/// changed move).
#[test]
fn a_split_brain_is_resolved_by_discarding_one_sides_changes() {
    let _heavy = heavy_lock();
    if !can_nft() {
        return;
    }
    let (_certs, mut a, mut b) = connected_loopback_pair();
    let alpha_port = {
        let cfg = std::fs::read_to_string(a.dir().join("tandemd.toml")).unwrap_or_default();
        cfg.lines()
            .find(|l| l.starts_with("listen = "))
            .map(|l| port_of(l.trim_end_matches('"')))
            .expect("alpha's listen address")
    };
    let iso = Isolate::port(alpha_port);
    wait_until("both to notice the cut", Duration::from_secs(20), || {
        peer(&a)["connection"] != "Connected" && peer(&b)["connection"] != "Connected"
    });
    ctl(&b, "promote");
    block_on(async {
        let mut c = a.client("vol").await;
        c.write(0, &[0xa1; 4096], false)
            .await
            .expect("write on alpha");
        c.flush().await.expect("flush");
        let mut c = b.client("vol").await;
        c.write(4096, &[0xb2; 4096], false)
            .await
            .expect("write on beta");
        c.flush().await.expect("flush");
    });
    ctl(&b, "demote");
    drop(iso);
    wait_until(
        "both to detect the split brain",
        Duration::from_secs(30),
        || peer(&a)["split_brain"] == true && peer(&b)["split_brain"] == true,
    );
    // Nothing was overwritten.
    let (da, db) = (
        crate::repl_common::data_area(&a, SIZE),
        crate::repl_common::data_area(&b, SIZE),
    );
    assert_eq!(&da[4096..8192], &[0u8; 4096][..]);
    assert_eq!(&db[..4096], &[0u8; 4096][..]);
    let text = crate::repl_common::status_text(&b);
    assert!(text.contains("SPLIT BRAIN"), "{text}");

    // beta's changes go.
    let out = run(Command::new(tandemctl())
        .args(["resolve", "vol", "--admin-socket"])
        .arg(b.admin_socket()));
    assert!(
        !out.status.success(),
        "resolve without --discard-my-data must refuse"
    );
    let out = run(Command::new(tandemctl())
        .args(["resolve", "vol", "--discard-my-data", "--admin-socket"])
        .arg(b.admin_socket()));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_until("the resolution resync", Duration::from_secs(60), || {
        let (p, q) = (peer(&a), peer(&b));
        p["replication"] == "Established"
            && q["replication"] == "Established"
            && p["out_of_sync_bytes"] == 0
    });
    let moved = resynced_bytes(&a);
    assert!(
        (8192..=1 << 20).contains(&moved),
        "the resolution moved {moved} bytes: the chunks both sides changed, not the volume"
    );
    assert_eq!(peer(&a)["split_brain"], false);
    b.stop();
    a.stop();
    let data = assert_same_data(&a, &b, "after resolving the split brain");
    assert_eq!(&data[..4096], &[0xa1; 4096][..], "alpha's change kept");
    assert_eq!(
        &data[4096..8192],
        &[0u8; 4096][..],
        "beta's change discarded"
    );
}
