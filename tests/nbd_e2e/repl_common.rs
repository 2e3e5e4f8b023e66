//! Helpers shared by the replication end-to-end tests.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use tandem_tests::{data_offset, read_file_at, run, run_ok, run_timeout, tandemctl, Daemon};

/// Size of the replicated test volumes.
pub const SIZE: u64 = 64 << 20;

/// fio write+verify (or `--verify_only`) through `uri`; extra args appended.
pub fn fio_cmd(uri: &str, verify_only: bool, extra: &[&str]) -> Command {
    let mut cmd = Command::new("fio");
    cmd.arg("--verify_state_save=0")
        .current_dir(std::env::temp_dir())
        .args([
            "--name=repl",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randwrite",
            "--bsrange=4k-128k",
            &format!("--size={SIZE}"),
            "--iodepth=16",
            "--verify=crc32c",
            "--verify_fatal=1",
            "--randseed=91",
        ]);
    if verify_only {
        cmd.arg("--verify_only");
    } else {
        cmd.args(["--do_verify=1", "--fsync=32"]);
    }
    cmd.args(extra);
    cmd
}

pub fn fio(uri: &str, verify_only: bool) {
    let out = run_timeout(
        &mut fio_cmd(uri, verify_only, &[]),
        Duration::from_secs(120),
    );
    assert!(
        out.status.success(),
        "fio (verify_only={verify_only}) failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn issue(certs: &Path, node: &str) {
    run_ok(
        Command::new(tandemctl())
            .args(["cert", "issue", "--ca-dir"])
            .arg(certs)
            .args(["--node", node, "--out-dir"])
            .arg(certs),
    );
}

/// A CA in `dir` with certificates for alpha and beta.
pub fn cluster_certs(dir: &Path) {
    run_ok(
        Command::new(tandemctl())
            .args(["ca", "create", "--dir"])
            .arg(dir),
    );
    for n in ["alpha", "beta"] {
        issue(dir, n);
    }
}

pub const UUID: &str = "5e1f0000-0000-4000-8000-0000000ce7a5";
/// Certificate files one node uses.
pub struct NodeFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

impl NodeFiles {
    pub fn from_dir(dir: &Path, node: &str) -> Self {
        NodeFiles {
            cert: dir.join(format!("{node}.crt")),
            key: dir.join(format!("{node}.key")),
            ca: dir.join("ca.crt"),
        }
    }
}

pub struct NodeSpec<'a> {
    pub me: &'a str,
    pub role: &'a str,
    pub listen: String,
    pub peer: &'a str,
    pub peer_addr: String,
    pub files: NodeFiles,
    pub netns: Option<&'a str>,
    pub size: u64,
}

/// Specs for a loopback pair: alpha (primary) and beta (secondary) on free
/// UDP ports, certificates from `certs` (see [`cluster_certs`]).
pub fn loopback_specs(certs: &Path) -> (NodeSpec<'static>, NodeSpec<'static>) {
    let (pa, pb) = (free_udp_port(), free_udp_port());
    let spec = |me, role, listen: u16, peer, peer_port: u16| NodeSpec {
        me,
        role,
        listen: format!("127.0.0.1:{listen}"),
        peer,
        peer_addr: format!("127.0.0.1:{peer_port}"),
        files: NodeFiles::from_dir(certs, me),
        netns: None,
        size: SIZE,
    };
    (
        spec("alpha", "primary", pa, "beta", pb),
        spec("beta", "secondary", pb, "alpha", pa),
    )
}

pub fn node(s: NodeSpec) -> Daemon {
    node_with(s, "")
}

/// Like [`node`], with `extra` TOML lines appended to `[export.replication]`
/// (e.g. `allow_two_primaries = true`).
pub fn node_with(s: NodeSpec, extra: &str) -> Daemon {
    node_with_peers(s, &[], extra)
}

/// Like [`node_with`], with `more_peers` (name, address) configured after
/// the spec's peer (volumes with three or four replicas).
pub fn node_with_peers(s: NodeSpec, more_peers: &[(&str, String)], extra: &str) -> Daemon {
    let mut b = Daemon::builder().volume_with("vol", s.size, &["--uuid", UUID]);
    if let Some(ns) = s.netns {
        b = b.netns(ns);
    }
    let mut d = b.prepare();
    let backing = d.backing("vol").display().to_string();
    d.set_config(&format!(
        r#"
[[export]]
name = "vol"
backing = "{backing}"
[export.replication]
node = "{me}"
listen = "{listen}"
cert = "{cert}"
key = "{key}"
ca = "{ca}"
role = "{role}"
peers = [{{ name = "{peer}", address = "{peer_addr}" }}{more}]
{extra}
"#,
        me = s.me,
        listen = s.listen,
        cert = s.files.cert.display(),
        key = s.files.key.display(),
        ca = s.files.ca.display(),
        role = s.role,
        peer = s.peer,
        peer_addr = s.peer_addr,
        more = more_peers
            .iter()
            .map(|(name, addr)| format!(r#", {{ name = "{name}", address = "{addr}" }}"#))
            .collect::<String>(),
    ));
    d
}

pub fn peer(d: &Daemon) -> tandem_tests::Json {
    d.export_status("vol")["replication"]["peers"][0].clone()
}

pub fn peer_connected(d: &Daemon) -> bool {
    peer(d)["connection"] == "Connected"
}

pub fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub fn ctl(d: &Daemon, verb: &str) {
    run_ok(
        Command::new(tandemctl())
            .arg(verb)
            .arg("vol")
            .arg("--admin-socket")
            .arg(d.admin_socket()),
    );
}

/// `tandemctl VERB vol` without asserting success (for refusals).
pub fn ctl_output(d: &Daemon, verb: &str) -> std::process::Output {
    run(Command::new(tandemctl())
        .arg(verb)
        .arg("vol")
        .arg("--admin-socket")
        .arg(d.admin_socket()))
}

/// `tandemctl status vol` (human output).
pub fn status_text(d: &Daemon) -> String {
    run_ok(
        Command::new(tandemctl())
            .args(["status", "vol", "--admin-socket"])
            .arg(d.admin_socket()),
    )
}

/// A UDP port free right now on loopback.
pub fn free_udp_port() -> u16 {
    let s = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind udp");
    s.local_addr().expect("local_addr").port()
}

/// Asserts that `a` and `b` hold byte-identical data areas (`what` says
/// why they should); returns `a`'s data area.
pub fn assert_same_data(a: &Daemon, b: &Daemon, what: &str) -> Vec<u8> {
    let (da, db) = (data_area(a, SIZE), data_area(b, SIZE));
    let first_diff = da.iter().zip(&db).position(|(x, y)| x != y);
    assert_eq!(first_diff, None, "data areas differ: {what}");
    da
}

pub fn data_area(d: &Daemon, size: u64) -> Vec<u8> {
    let f = d.backing("vol");
    read_file_at(f, data_offset(f), size as usize)
}

/// Bytes `d` sent as sync source in finished resyncs, from its log
/// (`SyncFinished { .., role: Source, bytes: N }` events).
pub fn resynced_bytes(d: &Daemon) -> u64 {
    tandem_daemon::demo_sites::resynced_bytes_in_log(&d.log())
}

/// A started loopback pair (alpha primary, beta secondary) with a fresh
/// cluster CA, connected. Keep the returned directory alive as long as the
/// daemons run.
pub fn connected_loopback_pair() -> (tempfile::TempDir, Daemon, Daemon) {
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
    (certs, a, b)
}

/// What one writer of [`spawn_writers`] saw: the blocks acknowledged to
/// it (offset → data) and the write that failed, if one did (it may or may
/// not have landed anywhere).
pub type WriterResult = (
    std::collections::HashMap<u64, Vec<u8>>,
    Option<(u64, Vec<u8>)>,
);

/// Starts `n` NBD writers on `socket` (export `vol`), writer `t` writing
/// 4 KiB blocks round-robin over its own `region` bytes at `t * region`,
/// each block naming writer and sequence number. A writer stops at its
/// first failed write, or once `stop` is set and it wrote more than
/// `min_writes` blocks.
pub fn spawn_writers(
    socket: &Path,
    n: u64,
    region: u64,
    min_writes: u64,
    stop: &std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> Vec<std::thread::JoinHandle<WriterResult>> {
    (0..n)
        .map(|t| {
            let sock = socket.to_path_buf();
            let stop = stop.clone();
            std::thread::spawn(move || {
                tandem_tests::block_on(async move {
                    let mut acked = std::collections::HashMap::new();
                    let mut c = tandem_daemon::nbd::client::Client::connect_unix(&sock, "vol")
                        .await
                        .expect("connect");
                    for i in 0u64.. {
                        let off = t * region + (i * 4096) % region;
                        let mut data = vec![0u8; 4096];
                        data[..16].copy_from_slice(&[t.to_le_bytes(), i.to_le_bytes()].concat());
                        data[16..].fill((t * 31 + i) as u8 | 1);
                        match c.write(off, &data, false).await {
                            Ok(()) => {
                                acked.insert(off, data);
                            }
                            Err(_) => return (acked, Some((off, data))),
                        }
                        if stop.load(std::sync::atomic::Ordering::Relaxed) && i > min_writes {
                            return (acked, None);
                        }
                    }
                    unreachable!()
                })
            })
        })
        .collect()
}
