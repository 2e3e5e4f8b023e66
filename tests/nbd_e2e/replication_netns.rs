//! Replication between two tandemd processes in separate network namespaces
//! joined by a veth pair: fio verify through the primary and a role swap,
//! the link cut under load (link down, or an nftables drop rule) with the
//! primary serving on and the peer marked outdated, and certificate refusals
//! (foreign CA, expired, wrong node name) that replicate nothing.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use crate::repl_common::{
    assert_same_data, cluster_certs, ctl, data_area, fio, fio_cmd, issue, node, peer,
    peer_connected, resynced_bytes, wait_until, NodeFiles, NodeSpec, SIZE,
};
use tandem_daemon::transport::certs::{issue_node_cert, CaFiles};
use tandem_tests::{
    heavy_lock, netns_exec_ok, require, run_ok, tandemctl, wait_timeout, Daemon, NetnsPair,
};

const PORT: u16 = 7789;

/// alpha (primary) in `ns.a`, beta (secondary) in `ns.b`, started.
/// Certificates, alpha and beta in `ns` (see [`netns_pair`]), connected.
fn connected_netns_pair(ns: &NetnsPair) -> (tempfile::TempDir, Daemon, Daemon) {
    let certs = tempfile::tempdir().expect("tempdir");
    cluster_certs(certs.path());
    let (a, b) = netns_pair(ns, certs.path());
    wait_until("alpha and beta to connect", Duration::from_secs(20), || {
        peer_connected(&a) && peer_connected(&b)
    });
    (certs, a, b)
}

fn netns_pair(ns: &NetnsPair, certs: &Path) -> (Daemon, Daemon) {
    let mut a = node(NodeSpec {
        me: "alpha",
        role: "primary",
        listen: format!("{}:{PORT}", ns.addr_a),
        peer: "beta",
        peer_addr: format!("{}:{PORT}", ns.addr_b),
        files: NodeFiles::from_dir(certs, "alpha"),
        netns: Some(&ns.a),
        size: SIZE,
    });
    let mut b = node(NodeSpec {
        me: "beta",
        role: "secondary",
        listen: format!("{}:{PORT}", ns.addr_b),
        peer: "alpha",
        peer_addr: format!("{}:{PORT}", ns.addr_a),
        files: NodeFiles::from_dir(certs, "beta"),
        netns: Some(&ns.b),
        size: SIZE,
    });
    a.start();
    b.start();
    (a, b)
}

#[test]
fn replication_across_namespaces() {
    if !require("fio", "fio") {
        return;
    }
    let _heavy = heavy_lock();
    let Some(ns) = NetnsPair::create() else {
        return;
    };
    let (_certs, mut a, mut b) = connected_netns_pair(&ns);

    fio(&a.uri("vol"), false);

    let da = assert_same_data(&a, &b, "alpha and beta after fio");
    assert!(da.iter().any(|&x| x != 0), "fio wrote nothing?");

    ctl(&a, "demote");
    ctl(&b, "promote");
    let s = b.export_status("vol");
    assert_eq!(s["replication"]["role"], "Primary", "{s}");
    fio(&b.uri("vol"), true);
    a.stop();
    b.stop();
}

/// How the link between the namespaces is cut and healed.
#[derive(Clone, Copy, Debug)]
enum Cut {
    LinkDown,
    NftDrop,
}

fn cut(ns: &NetnsPair, how: Cut) {
    match how {
        Cut::LinkDown => {
            netns_exec_ok(&ns.a, "ip", &["link", "set", &ns.veth_a, "down"]);
        }
        Cut::NftDrop => {
            netns_exec_ok(&ns.a, "nft", &["add", "table", "inet", "tdmcut"]);
            for (chain, hook) in [("in", "input"), ("out", "output")] {
                netns_exec_ok(
                    &ns.a,
                    "nft",
                    &[
                        "add",
                        "chain",
                        "inet",
                        "tdmcut",
                        chain,
                        &format!("{{ type filter hook {hook} priority 0 ; policy accept ; }}"),
                    ],
                );
                let dev = if hook == "input" {
                    "iifname"
                } else {
                    "oifname"
                };
                netns_exec_ok(
                    &ns.a,
                    "nft",
                    &[
                        "add", "rule", "inet", "tdmcut", chain, dev, &ns.veth_a, "drop",
                    ],
                );
            }
        }
    }
}

fn heal(ns: &NetnsPair, how: Cut) {
    match how {
        Cut::LinkDown => {
            netns_exec_ok(&ns.a, "ip", &["link", "set", &ns.veth_a, "up"]);
        }
        Cut::NftDrop => {
            netns_exec_ok(&ns.a, "nft", &["delete", "table", "inet", "tdmcut"]);
        }
    }
}

fn link_cut_during_writes(how: Cut) {
    if !require("fio", "fio") {
        return;
    }
    if matches!(how, Cut::NftDrop) && !require("nft", "nftables") {
        return;
    }
    let _heavy = heavy_lock();
    let Some(ns) = NetnsPair::create() else {
        return;
    };
    let (_certs, mut a, mut b) = connected_netns_pair(&ns);

    // ~6 s of rate-limited writes, then verify; the link goes away after 2 s.
    let mut job: Child = fio_cmd(&a.uri("vol"), false, &["--rate=12m"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning fio");
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        job.try_wait().expect("try_wait").is_none(),
        "fio finished before the link was cut: the cut would test nothing"
    );
    let cut_at = Instant::now();
    cut(&ns, how);
    let st = wait_timeout(&mut job, Duration::from_secs(90));
    if st.is_none() {
        let _ = job.kill();
    }
    let out = job.wait_with_output().expect("fio output");
    assert!(
        st.is_some_and(|s| s.success()),
        "fio through alpha failed or hung after the link was cut ({how:?}, {st:?}):\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!(
        "{how:?}: fio finished {:.1} s after the cut",
        cut_at.elapsed().as_secs_f64()
    );

    // The primary noticed, and marks the peer outdated.
    wait_until(
        "alpha to mark beta disconnected and outdated",
        Duration::from_secs(15),
        || {
            let p = peer(&a);
            p["connection"] != "Connected" && p["outdated"] == true
        },
    );
    let p = peer(&a);
    assert_ne!(p["disk"], "UpToDate", "cut-off peer claimed UpToDate: {p}");
    let dirty = p["out_of_sync_bytes"].as_u64().unwrap_or(0);
    assert!(
        dirty > 0 && dirty < SIZE,
        "an outdated peer is out of sync by the chunks written since the cut: {p}"
    );
    a.assert_running();
    b.assert_running();
    fio(&a.uri("vol"), true);

    // Heal: alpha reconnects and resyncs exactly the dirty chunks.
    heal(&ns, how);
    wait_until(
        "alpha to reconnect to beta and resync it after the link healed",
        Duration::from_secs(60),
        || {
            let p = peer(&a);
            p["connection"] == "Connected"
                && p["replication"] == "Established"
                && p["out_of_sync_bytes"] == 0
                && p["outdated"] == false
        },
    );
    assert_eq!(b.export_status("vol")["replication"]["disk"], "UpToDate");
    let moved = resynced_bytes(&a);
    eprintln!("{how:?}: dirty {dirty} bytes of {SIZE}, resynced {moved}");
    assert_eq!(moved, dirty, "the resync moved the dirty set, nothing else");
    a.stop();
    b.stop();
    assert_same_data(&a, &b, "alpha and beta after the resync");
}

#[test]
fn link_cut_during_writes_keeps_primary_serving() {
    link_cut_during_writes(Cut::LinkDown);
}

#[test]
fn nft_drop_during_writes_keeps_primary_serving() {
    link_cut_during_writes(Cut::NftDrop);
}

fn free_udp_port() -> u16 {
    let s = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind udp");
    s.local_addr().expect("local_addr").port()
}

/// One refusal case: beta's certificate files, and what both logs must say.
struct Case {
    what: &'static str,
    /// The node name beta's tandemd runs as (its certificate's name).
    beta_node: &'static str,
    beta: NodeFiles,
    /// Substrings one of which must appear in alpha's / beta's log.
    alpha_log: &'static [&'static str],
    beta_log: &'static [&'static str],
}

#[test]
fn certificate_refusals_write_nothing() {
    const SMALL: u64 = 8 << 20;
    let _heavy = heavy_lock();
    let good = tempfile::tempdir().expect("tempdir");
    cluster_certs(good.path());

    // (a) beta's certificate (and CA) from a foreign cluster.
    let foreign = tempfile::tempdir().expect("tempdir");
    run_ok(
        Command::new(tandemctl())
            .args(["ca", "create", "--dir"])
            .arg(foreign.path()),
    );
    issue(foreign.path(), "beta");
    // (a') the same with a foreign CA of a different name.
    let foreign2 = tempfile::tempdir().expect("tempdir");
    run_ok(
        Command::new(tandemctl())
            .args(["ca", "create", "--name", "Some other cluster CA", "--dir"])
            .arg(foreign2.path()),
    );
    issue(foreign2.path(), "beta");
    // (b) an expired certificate for beta from the real CA.
    let expired = tempfile::tempdir().expect("tempdir");
    let ca = CaFiles::load(good.path()).expect("load CA");
    let now = SystemTime::now();
    let day = Duration::from_secs(86_400);
    issue_node_cert(&ca, "beta", now - 30 * day, now - day)
        .expect("issue expired cert")
        .write(expired.path())
        .expect("write expired cert");
    // (c) a valid certificate for "gamma" presented at beta's address.
    let gamma = tempfile::tempdir().expect("tempdir");
    issue_node_cert(&ca, "gamma", now - day, now + 365 * day)
        .expect("issue gamma cert")
        .write(gamma.path())
        .expect("write gamma cert");

    let ca_crt = good.path().join("ca.crt");
    let cases = vec![
        Case {
            what: "foreign CA",
            beta_node: "beta",
            beta: NodeFiles {
                cert: foreign.path().join("beta.crt"),
                key: foreign.path().join("beta.key"),
                // Its own cluster CA: tandemd refuses to start with a node
                // certificate that does not chain to its configured CA.
                ca: foreign.path().join("ca.crt"),
            },
            // Both CAs are named "Tandem cluster CA", so rustls finds an
            // issuer by name and reports BadSignature ("TLS handshake
            // failure"), not UnknownIssuer: see
            // foreign_ca_with_same_name_is_reported_as_unknown_issuer.
            alpha_log: &["unknown issuer", "BadSignature"],
            beta_log: &["unknown issuer", "BadSignature"],
        },
        Case {
            what: "foreign CA (other name)",
            beta_node: "beta",
            beta: NodeFiles {
                cert: foreign2.path().join("beta.crt"),
                key: foreign2.path().join("beta.key"),
                ca: foreign2.path().join("ca.crt"),
            },
            alpha_log: &["unknown issuer"],
            beta_log: &["unknown issuer"],
        },
        Case {
            what: "expired certificate",
            beta_node: "beta",
            beta: NodeFiles {
                cert: expired.path().join("beta.crt"),
                key: expired.path().join("beta.key"),
                ca: ca_crt.clone(),
            },
            alpha_log: &["expired"],
            beta_log: &["refused our certificate", "refused us"],
        },
        Case {
            what: "wrong node name",
            // tandemd refuses to start when its certificate's name differs
            // from `replication.node`, so "beta" runs as gamma.
            beta_node: "gamma",
            beta: NodeFiles {
                cert: gamma.path().join("gamma.crt"),
                key: gamma.path().join("gamma.key"),
                ca: ca_crt.clone(),
            },
            alpha_log: &["unexpected node name", "UnexpectedName"],
            beta_log: &["refused our certificate", "refused us", "unexpected"],
        },
    ];

    // Start every pair at once, so the waiting overlaps.
    let mut pairs = Vec::new();
    for c in cases {
        let (pa, pb) = (free_udp_port(), free_udp_port());
        let mut a = node(NodeSpec {
            me: "alpha",
            role: "primary",
            listen: format!("127.0.0.1:{pa}"),
            peer: "beta",
            peer_addr: format!("127.0.0.1:{pb}"),
            files: NodeFiles::from_dir(good.path(), "alpha"),
            netns: None,
            size: SMALL,
        });
        let beta_files = NodeFiles {
            cert: c.beta.cert.clone(),
            key: c.beta.key.clone(),
            ca: c.beta.ca.clone(),
        };
        let mut b = node(NodeSpec {
            me: c.beta_node,
            role: "secondary",
            listen: format!("127.0.0.1:{pb}"),
            peer: "alpha",
            peer_addr: format!("127.0.0.1:{pa}"),
            files: beta_files,
            netns: None,
            size: SMALL,
        });
        a.start();
        b.start();
        pairs.push((c, a, b));
    }

    let deadline = Instant::now() + Duration::from_secs(4);
    while Instant::now() < deadline {
        for (c, a, b) in &pairs {
            assert!(
                !peer_connected(a) && !peer_connected(b),
                "{}: the pair connected despite the bad certificate",
                c.what
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }

    for (c, a, b) in &mut pairs {
        // A WARN line mentioning a refusal and one of the expected words.
        let refusal = |log: &str, words: &[&str]| {
            log.lines()
                .find(|l| {
                    let l = l.to_lowercase();
                    l.contains("refus") && words.iter().any(|w| l.contains(&w.to_lowercase()))
                })
                .map(str::to_string)
        };
        let (la, lb) = (a.log(), b.log());
        let ra = refusal(&la, c.alpha_log);
        let rb = refusal(&lb, c.beta_log);
        assert!(
            ra.is_some(),
            "{}: alpha's log has no refusal ({:?}):\n{la}",
            c.what,
            c.alpha_log
        );
        assert!(
            rb.is_some(),
            "{}: beta's log has no refusal ({:?}):\n{lb}",
            c.what,
            c.beta_log
        );
        eprintln!("{}:\n  alpha: {ra:?}\n  beta:  {rb:?}", c.what);

        // A write through alpha completes locally...
        let mut conn = a.raw();
        conn.handshake("vol");
        let data = vec![0xa5u8; 64 << 10];
        conn.write_read_check(1 << 20, &data);
        let (e, _) = conn.call(3, 0, 0, 0, &[]); // FLUSH
        assert_eq!(e, 0, "{}: FLUSH on alpha failed", c.what);
        drop(conn);
        let da = data_area(a, SMALL);
        assert_eq!(
            &da[1 << 20..(1 << 20) + data.len()],
            &data[..],
            "{}: alpha's backing lacks the write",
            c.what
        );
        assert!(!peer_connected(a), "{}: connected after all", c.what);
        // ...and nothing reaches beta.
        let db = data_area(b, SMALL);
        assert!(
            db.iter().all(|&x| x == 0),
            "{}: beta's data area was written to",
            c.what
        );
        a.assert_running();
        b.assert_running();
    }
    for (_, mut a, mut b) in pairs {
        a.stop();
        b.stop();
    }
}

/// A foreign cluster's CA made with `tandemctl ca create` (default name, as
/// every cluster's is) is reported as "unknown issuer" on both sides: the
/// issuer is found by name, but its signature (BadSignature / alert
/// DecryptError) does not verify against our CA.
#[test]
fn foreign_ca_with_same_name_is_reported_as_unknown_issuer() {
    let good = tempfile::tempdir().expect("tempdir");
    cluster_certs(good.path());
    let foreign = tempfile::tempdir().expect("tempdir");
    cluster_certs(foreign.path());
    let (pa, pb) = (free_udp_port(), free_udp_port());
    let mut a = node(NodeSpec {
        me: "alpha",
        role: "primary",
        listen: format!("127.0.0.1:{pa}"),
        peer: "beta",
        peer_addr: format!("127.0.0.1:{pb}"),
        files: NodeFiles::from_dir(good.path(), "alpha"),
        netns: None,
        size: 1 << 20,
    });
    let mut b = node(NodeSpec {
        me: "beta",
        role: "secondary",
        listen: format!("127.0.0.1:{pb}"),
        peer: "alpha",
        peer_addr: format!("127.0.0.1:{pa}"),
        files: NodeFiles::from_dir(foreign.path(), "beta"),
        netns: None,
        size: 1 << 20,
    });
    a.start();
    b.start();
    wait_until("alpha to log a refusal", Duration::from_secs(10), || {
        a.log().contains("refused")
    });
    let line = a
        .log()
        .lines()
        .find(|l| l.contains("refused"))
        .map(str::to_string)
        .unwrap_or_default();
    assert!(
        line.contains("unknown issuer"),
        "foreign CA not reported as unknown issuer: {line}"
    );
    a.stop();
    b.stop();
}
