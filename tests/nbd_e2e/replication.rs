//! Two tandemd processes replicating one volume over QUIC with mutual TLS
//! (loopback): fio verify=crc32c through the primary's export, the two
//! backings' data areas byte-identical afterwards, then a role swap and fio
//! verify on the new primary.

use std::time::Duration;

use crate::repl_common::{
    assert_same_data, cluster_certs, ctl, fio, loopback_specs, node, peer, peer_connected,
    status_text, wait_until, SIZE,
};
use tandem_tests::{block_on, heavy_lock, require};

#[test]
fn two_nodes_replicate_synchronously_and_swap_roles() {
    if !require("fio", "fio") {
        return;
    }
    let _heavy = heavy_lock();
    let certs = tempfile::tempdir().expect("tempdir");
    cluster_certs(certs.path());
    let (sa, sb) = loopback_specs(certs.path());
    let mut a = node(sa);
    let mut b = node(sb);
    a.start();
    b.start();
    wait_until("alpha to connect to beta", Duration::from_secs(20), || {
        peer_connected(&a) && peer_connected(&b)
    });

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

    // The peer is lost and writes continue: without bitmaps the whole
    // volume is out of sync with it.
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
    assert_eq!(p["out_of_sync_bytes"], SIZE, "{p}");
    assert_eq!(p["in_flight"], 0, "{p}");
    let text = status_text(&b);
    assert!(
        text.contains("in-flight:0 out-of-sync:64MiB (outdated: needs resync)"),
        "tandemctl status:\n{text}"
    );
    b.stop();
}
