//! Two tandemd processes replicating one volume over QUIC with mutual TLS
//! (loopback): fio verify=crc32c through the primary's export, the two
//! backings' data areas byte-identical afterwards, then a role swap and fio
//! verify on the new primary.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::repl_common::{cluster_certs, fio, SIZE};
use tandem_tests::{data_offset, heavy_lock, read_file_at, require, run_ok, tandemctl, Daemon};

const UUID: &str = "5e1f0000-0000-4000-8000-00000000c0de";

fn free_udp_port() -> u16 {
    let s = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind udp");
    s.local_addr().expect("local_addr").port()
}

fn node(certs: &Path, me: &str, role: &str, listen: u16, peer: &str, peer_port: u16) -> Daemon {
    let mut d = Daemon::builder()
        .volume_with("vol", SIZE, &["--uuid", UUID])
        .prepare();
    let backing = d.backing("vol").display().to_string();
    let c = certs.display();
    d.set_config(&format!(
        r#"
[[export]]
name = "vol"
backing = "{backing}"
[export.replication]
node = "{me}"
listen = "127.0.0.1:{listen}"
cert = "{c}/{me}.crt"
key = "{c}/{me}.key"
ca = "{c}/ca.crt"
role = "{role}"
peers = [{{ name = "{peer}", address = "127.0.0.1:{peer_port}" }}]
"#
    ));
    d
}

fn peer_connected(d: &Daemon) -> bool {
    let s = d.export_status("vol");
    s["replication"]["peers"][0]["connection"] == "Connected"
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn ctl(d: &Daemon, verb: &str) {
    run_ok(
        Command::new(tandemctl())
            .arg(verb)
            .arg("vol")
            .arg("--admin-socket")
            .arg(d.admin_socket()),
    );
}

#[test]
fn two_nodes_replicate_synchronously_and_swap_roles() {
    if !require("fio", "fio") {
        return;
    }
    let _heavy = heavy_lock();
    let certs = tempfile::tempdir().expect("tempdir");
    cluster_certs(certs.path());
    let (pa, pb) = (free_udp_port(), free_udp_port());
    let mut a = node(certs.path(), "alpha", "primary", pa, "beta", pb);
    let mut b = node(certs.path(), "beta", "secondary", pb, "alpha", pa);
    a.start();
    b.start();
    wait_until("alpha to connect to beta", || {
        peer_connected(&a) && peer_connected(&b)
    });

    fio(&a.uri("vol"), false);

    // Protocol C: everything fio was acknowledged is on both sites.
    let (fa, fb) = (
        a.backing("vol").to_path_buf(),
        b.backing("vol").to_path_buf(),
    );
    let da = read_file_at(&fa, data_offset(&fa), SIZE as usize);
    let db = read_file_at(&fb, data_offset(&fb), SIZE as usize);
    let first_diff = da.iter().zip(&db).position(|(x, y)| x != y);
    assert_eq!(first_diff, None, "data areas differ between alpha and beta");
    assert!(da.iter().any(|&x| x != 0), "fio wrote nothing?");

    // Swap roles: beta becomes primary and serves the same data.
    ctl(&a, "demote");
    ctl(&b, "promote");
    let s = b.export_status("vol");
    assert_eq!(s["replication"]["role"], "Primary", "{s}");
    fio(&b.uri("vol"), true);
    a.stop();
    b.stop();
}
