//! A diskless client (R28): three tandemd processes on loopback, two
//! replicas (alpha, beta, both Secondary) and gamma, whose export has no
//! backing. gamma is promoted, serves NBD, replicates every write to both
//! replicas (protocol C) and reads through them. fio verify=crc32c through
//! gamma; both replicas' data areas end identical; then gamma is demoted,
//! alpha promoted, and fio verifies the same data there.

use std::time::Duration;

use crate::repl_common::{
    assert_same_data, cluster_certs, ctl, ctl_output, data_area, fio, free_udp_port, issue,
    wait_until, NodeFiles, SIZE, UUID,
};
use tandem_tests::{block_on, heavy_lock, require, Daemon};

fn peer_named(d: &Daemon, name: &str) -> tandem_tests::Json {
    let s = d.export_status("vol");
    s["replication"]["peers"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["name"] == name).cloned())
        .unwrap_or_else(|| panic!("no peer {name} in {s}"))
}

fn replication_toml(me: &str, role: &str, listen: &str, f: &NodeFiles, peers: &str) -> String {
    format!(
        r#"[export.replication]
node = "{me}"
listen = "{listen}"
cert = "{cert}"
key = "{key}"
ca = "{ca}"
role = "{role}"
peers = [{peers}]
"#,
        cert = f.cert.display(),
        key = f.key.display(),
        ca = f.ca.display(),
    )
}

#[test]
fn a_diskless_client_writes_and_reads_through_two_replicas() {
    if !require("fio", "fio") {
        return;
    }
    let _heavy = heavy_lock();
    let certs = tempfile::tempdir().expect("tempdir");
    cluster_certs(certs.path());
    issue(certs.path(), "gamma");
    let ports: Vec<u16> = (0..3).map(|_| free_udp_port()).collect();
    let addr = |i: usize| format!("127.0.0.1:{}", ports[i]);
    let replica = |i: usize, me: &str, other: &str, other_i: usize| {
        let mut d = Daemon::builder()
            .volume_with("vol", SIZE, &["--uuid", UUID])
            .prepare();
        let backing = d.backing("vol").display().to_string();
        let peers = format!(
            r#"{{ name = "{other}", address = "{}" }}, {{ name = "gamma", address = "{}", diskless = true }}"#,
            addr(other_i),
            addr(2)
        );
        d.set_config(&format!(
            "[[export]]\nname = \"vol\"\nbacking = \"{backing}\"\n{}",
            replication_toml(
                me,
                "secondary",
                &addr(i),
                &NodeFiles::from_dir(certs.path(), me),
                &peers
            )
        ));
        d
    };
    let mut alpha = replica(0, "alpha", "beta", 1);
    let mut beta = replica(1, "beta", "alpha", 0);
    let mut gamma = Daemon::builder().prepare();
    let peers = format!(
        r#"{{ name = "alpha", address = "{}" }}, {{ name = "beta", address = "{}" }}"#,
        addr(0),
        addr(1)
    );
    gamma.set_config(&format!(
        "[[export]]\nname = \"vol\"\ndiskless = true\nuuid = \"{UUID}\"\nsize = \"{SIZE}\"\n{}",
        replication_toml(
            "gamma",
            "secondary",
            &addr(2),
            &NodeFiles::from_dir(certs.path(), "gamma"),
            &peers
        )
    ));

    // Without a replica, the client cannot be promoted.
    gamma.start();
    let st = gamma.export_status("vol");
    assert_eq!(st["replication"]["disk"], "Diskless", "{st}");
    let out = ctl_output(&gamma, "promote");
    assert!(!out.status.success(), "promoted with no replica");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("UpToDate peer"), "refusal reason: {err}");

    alpha.start();
    beta.start();
    let connected = |d: &Daemon, peer: &str| peer_named(d, peer)["connection"] == "Connected";
    wait_until(
        "all three nodes to connect",
        Duration::from_secs(30),
        || {
            connected(&alpha, "beta")
                && connected(&beta, "alpha")
                && connected(&gamma, "alpha")
                && connected(&gamma, "beta")
                && connected(&alpha, "gamma")
                && connected(&beta, "gamma")
        },
    );
    for p in ["alpha", "beta"] {
        let s = peer_named(&gamma, p);
        assert_eq!(s["disk"], "UpToDate", "{s}");
        assert_eq!(s["role"], "Secondary", "{s}");
    }
    assert_eq!(peer_named(&alpha, "gamma")["disk"], "Diskless");

    ctl(&gamma, "promote");
    wait_until(
        "the replicas to see gamma Primary",
        Duration::from_secs(10),
        || {
            peer_named(&alpha, "gamma")["role"] == "Primary"
                && peer_named(&beta, "gamma")["role"] == "Primary"
        },
    );
    fio(&gamma.uri("vol"), false);
    let da = assert_same_data(&alpha, &beta, "alpha and beta after fio through gamma");
    assert!(
        da.iter().any(|&x| x != 0),
        "fio wrote nothing to the replicas?"
    );
    // Every write reached both replicas: nothing for them to resync, and
    // the client does not make them diverge.
    for d in [&alpha, &beta] {
        let other = if std::ptr::eq(d, &alpha) {
            "beta"
        } else {
            "alpha"
        };
        let s = peer_named(d, other);
        assert_eq!(s["connection"], "Connected", "{s}");
        assert_eq!(s["outdated"], false, "{s}");
        assert_eq!(s["out_of_sync_bytes"], 0, "{s}");
    }

    // The data is on the replicas: gamma steps down, alpha takes over.
    ctl(&gamma, "demote");
    wait_until(
        "the replicas to see gamma Secondary",
        Duration::from_secs(10),
        || peer_named(&alpha, "gamma")["role"] == "Secondary",
    );
    ctl(&alpha, "promote");
    fio(&alpha.uri("vol"), true);
    // alpha writes with the client connected: beta gets every write, the
    // client is not counted as missing any.
    fio(&alpha.uri("vol"), false);
    assert_same_data(&alpha, &beta, "alpha and beta after fio through alpha");
    let g = peer_named(&alpha, "gamma");
    assert_eq!(g["outdated"], false, "{g}");
    assert_eq!(g["out_of_sync_bytes"], 0, "{g}");
    let b = peer_named(&alpha, "beta");
    assert_eq!(b["out_of_sync_bytes"], 0, "{b}");

    // Back to the client; then a replica is lost: writes through the
    // client fail with EIO (never a silent success), reads go on through
    // the other replica.
    wait_until("alpha to demote", Duration::from_secs(20), || {
        ctl_output(&alpha, "demote").status.success()
    });
    wait_until(
        "gamma to see alpha Secondary",
        Duration::from_secs(10),
        || peer_named(&gamma, "alpha")["role"] == "Secondary",
    );
    ctl(&gamma, "promote");
    beta.kill9();
    wait_until("gamma to lose beta", Duration::from_secs(20), || {
        peer_named(&gamma, "beta")["connection"] != "Connected"
    });
    let da = data_area(&alpha, SIZE);
    block_on(async {
        let mut c = gamma.client("vol").await;
        let w = c.write(1 << 20, &[0x5au8; 4096], false).await;
        assert!(w.is_err(), "a write without beta completed: {w:?}");
        let mut got = vec![0u8; 65536];
        c.read(2 << 20, &mut got).await.expect("read through alpha");
        assert_eq!(&got[..], &da[2 << 20..(2 << 20) + 65536]);
    });
}
