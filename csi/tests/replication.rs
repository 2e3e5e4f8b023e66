//! Replication wired by the driver: the real `tandem-csi controller` and
//! two real `tandem-csi node` plugins (nodes `a` and `b`, zones room-a and
//! room-b) on loopback, sharing the controller's volume-record directory.
//! Their replica agents start the replicated `tandemd`s (mutual TLS with a
//! cluster CA made by `tandemctl ca create`); NodeStage promotes, unstage
//! demotes; fio writes through one node's loop device and verifies through
//! the other's; the backing files of both sites hold the same data.
//!
//! Needs root, FUSE, loop devices and `fio`; otherwise prints
//! `skipping: <reason>` (a failure under `TANDEM_REQUIRE_ALL=1`).

mod common;

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::*;
use tandem_csi::csi;
use tonic::Code;

const VOL: u64 = 64 << 20;

fn skip(reason: &str) -> bool {
    if std::env::var("TANDEM_REQUIRE_ALL").is_ok_and(|v| v == "1") {
        panic!("TANDEM_REQUIRE_ALL=1 but {reason}");
    }
    eprintln!("skipping: {reason}");
    false
}

fn on_path(tool: &str) -> bool {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].iter().map(PathBuf::from))
        .any(|d| d.join(tool).is_file())
}

/// tandemd and tandemctl next to the tandem-csi binary.
fn tandem_bins() -> Option<(PathBuf, PathBuf)> {
    let dir = Path::new(env!("CARGO_BIN_EXE_tandem-csi")).parent()?;
    let (d, c) = (dir.join("tandemd"), dir.join("tandemctl"));
    if d.is_file() && c.is_file() {
        Some((d, c))
    } else {
        skip("tandemd/tandemctl not built (cargo build -p tandem-daemon --bins)");
        None
    }
}

fn require_devices() -> bool {
    for (t, p) in [
        ("fusermount3", "fuse3"),
        ("losetup", "mount"),
        ("fio", "fio"),
    ] {
        if !on_path(t) {
            return skip(&format!("{t} not installed (apt-get install {p})"));
        }
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipping: loop devices and mount need root");
        return false;
    }
    for dev in ["/dev/fuse", "/dev/loop-control"] {
        if let Err(e) = OpenOptions::new().read(true).write(true).open(dev) {
            eprintln!("skipping: {dev} unavailable: {e}");
            return false;
        }
    }
    true
}

/// The tests of this binary each run four tandemd-heavy processes: one at a time.
fn heavy_lock() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// Detaches loop devices, unmounts and kills whatever a test left under
/// its directories, also after a failed assert.
struct Cleanup(Vec<PathBuf>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for dir in &self.0 {
            if let Ok(rd) = std::fs::read_dir("/sys/block") {
                for e in rd.flatten() {
                    if let Ok(b) = std::fs::read_to_string(e.path().join("loop/backing_file")) {
                        if Path::new(b.trim_end()).starts_with(dir) {
                            let dev = format!("/dev/{}", e.file_name().to_string_lossy());
                            let _ = Command::new("losetup").arg("-d").arg(dev).output();
                        }
                    }
                }
            }
            let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
            let mut mounts: Vec<&str> = text
                .lines()
                .filter_map(|l| l.split(' ').nth(4))
                .filter(|m| Path::new(m).starts_with(dir))
                .collect();
            mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
            for m in mounts {
                let _ = Command::new("umount").arg("-l").arg(m).output();
            }
            for pid in processes_under(dir) {
                // SAFETY: kill(2) on processes whose command line names our temp dir.
                unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            }
        }
    }
}

/// Processes whose command line mentions `dir`.
fn processes_under(dir: &Path) -> Vec<u32> {
    let needle = dir.display().to_string();
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if pid == std::process::id() {
            continue;
        }
        if let Ok(c) = std::fs::read(e.path().join("cmdline")) {
            if String::from_utf8_lossy(&c)
                .replace('\0', " ")
                .contains(&needle)
            {
                out.push(pid);
            }
        }
    }
    out
}

/// The controller, nodes `a` and `b`, the cluster certificates.
struct Cluster {
    ctrl: Driver,
    a: Driver,
    b: Driver,
    /// Node c (room-c), started only for volumes with a witness.
    c: Option<Driver>,
    _certs: tempfile::TempDir,
    tandemctl: PathBuf,
}

/// The pid in a pid file, 0 when there is none.
fn pid(file: &Path) -> u32 {
    std::fs::read_to_string(file)
        .ok()
        .and_then(|t| t.trim().parse().ok())
        .unwrap_or(0)
}

fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().expect("spawn");
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("bind udp")
        .port()
}

impl Cluster {
    fn start(bins: (PathBuf, PathBuf)) -> Cluster {
        Self::start_with(bins, false)
    }

    /// With `with_c`, node c's plugin runs too (the witness's node).
    fn start_with((tandemd, tandemctl): (PathBuf, PathBuf), with_c: bool) -> Cluster {
        let certs = tempfile::Builder::new()
            .prefix("tandem-csi-certs-")
            .tempdir()
            .expect("temp dir");
        run_ok(
            Command::new(&tandemctl)
                .args(["ca", "create", "--dir"])
                .arg(certs.path()),
        );
        for n in ["a", "b", "c"] {
            run_ok(
                Command::new(&tandemctl)
                    .args(["cert", "issue", "--ca-dir"])
                    .arg(certs.path())
                    .args(["--node", n, "--out-dir"])
                    .arg(certs.path()),
            );
        }
        let inventory = format!(
            r#"
[[node]]
name = "a"
capacity_bytes = 1073741824
topology = {{ "{ZONE}" = "room-a" }}
address = "127.0.0.1"
[[node]]
name = "b"
capacity_bytes = 1073741824
topology = {{ "{ZONE}" = "room-b" }}
address = "127.0.0.1"
[[node]]
name = "c"
capacity_bytes = 1073741824
topology = {{ "{ZONE}" = "room-c" }}
address = "127.0.0.1"
"#
        );
        let dir = tempfile::Builder::new()
            .prefix("tandem-csi-")
            .tempdir()
            .expect("temp dir");
        let inv = dir.path().join("nodes.toml");
        std::fs::write(&inv, inventory).expect("write inventory");
        let volumes = dir.path().join("volumes");
        let lo = free_udp_port().min(65000);
        let ctrl = Driver::start_with(
            dir,
            vec![
                "controller".into(),
                "--store".into(),
                format!("file:{}", volumes.display()),
                "--nodes".into(),
                inv.display().to_string(),
                "--replication-ports".into(),
                format!("{lo}-{}", lo + 30),
            ],
            &[],
        );
        let node = |id: &str| {
            let dir = tempfile::Builder::new()
                .prefix("tandem-csi-node-")
                .tempdir_in("/var/tmp")
                .expect("temp dir");
            let args = vec![
                "node".to_string(),
                "--attacher".into(),
                "fuse".into(),
                "--node-id".into(),
                id.into(),
                "--topology".into(),
                format!("{ZONE}=room-{id}"),
                "--state-dir".into(),
                dir.path().join("state").display().to_string(),
                "--data-dir".into(),
                dir.path().join("data").display().to_string(),
                "--tandemd".into(),
                tandemd.display().to_string(),
                "--tandemctl".into(),
                tandemctl.display().to_string(),
                "--store".into(),
                format!("file:{}", volumes.display()),
                "--tls-ca".into(),
                certs.path().join("ca.crt").display().to_string(),
                "--tls-cert".into(),
                certs.path().join(format!("{id}.crt")).display().to_string(),
                "--tls-key".into(),
                certs.path().join(format!("{id}.key")).display().to_string(),
            ];
            Driver::start_with(dir, args, &[])
        };
        let (a, b) = (node("a"), node("b"));
        let c = with_c.then(|| node("c"));
        Cluster {
            ctrl,
            a,
            b,
            c,
            _certs: certs,
            tandemctl,
        }
    }

    fn cleanup(&self) -> Cleanup {
        let mut dirs = vec![self.a.path().to_path_buf(), self.b.path().to_path_buf()];
        dirs.extend(self.c.as_ref().map(|c| c.path().to_path_buf()));
        Cleanup(dirs)
    }

    fn node(&self, n: &str) -> &Driver {
        match n {
            "a" => &self.a,
            "c" => self.c.as_ref().expect("node c runs"),
            _ => &self.b,
        }
    }

    fn admin(&self, n: &str, id: &str) -> PathBuf {
        self.node(n)
            .path()
            .join("state/rep")
            .join(id)
            .join("admin.sock")
    }

    fn backing(&self, n: &str, id: &str) -> PathBuf {
        self.node(n).path().join("data").join(format!("{id}.img"))
    }

    /// The export's replication status on node `n` (`Null` while its
    /// tandemd is not up).
    fn status(&self, n: &str, id: &str) -> serde_json::Value {
        let out = Command::new(&self.tandemctl)
            .args(["status", id, "--json", "--admin-socket"])
            .arg(self.admin(n, id))
            .output()
            .expect("tandemctl");
        if !out.status.success() {
            return serde_json::Value::Null;
        }
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status JSON");
        v["exports"][0]["replication"].clone()
    }

    fn wait(&self, id: &str, what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
        let start = Instant::now();
        while !f() {
            assert!(
                start.elapsed() < timeout,
                "timed out waiting for {what}; a: {}; b: {}",
                self.status("a", id),
                self.status("b", id)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Both agents run the volume's replica and the two are connected and in sync.
    fn wait_connected(&self, id: &str) {
        self.wait(
            id,
            "both replicas connected",
            Duration::from_secs(30),
            || {
                ["a", "b"].iter().all(|n| {
                    let s = self.status(n, id);
                    s["disk"] == "UpToDate"
                        && s["peers"][0]["connection"] == "Connected"
                        && s["peers"][0]["disk"] == "UpToDate"
                })
            },
        );
    }

    /// The data area of node `n`'s backing file (its current size).
    fn data_area(&self, n: &str, id: &str) -> Vec<u8> {
        let backing = self.backing(n, id);
        let inspect: serde_json::Value = serde_json::from_str(&run_ok(
            Command::new(&self.tandemctl)
                .arg("inspect")
                .arg(&backing)
                .arg("--json"),
        ))
        .expect("inspect JSON");
        let off = inspect["data_offset"].as_u64().expect("data_offset");
        let size = inspect["size"].as_u64().expect("size");
        let mut f = std::fs::File::open(&backing).expect("backing");
        f.seek(SeekFrom::Start(off)).expect("seek");
        let mut buf = vec![0u8; size as usize];
        f.read_exact(&mut buf).expect("read data area");
        buf
    }

    /// DeleteVolume; then both agents stop the replica's tandemd and delete
    /// its backing and directory.
    async fn delete_and_wait_removed(&self, id: &str) {
        let mut c = self.ctrl.controller_client().await;
        c.delete_volume(csi::DeleteVolumeRequest {
            volume_id: id.into(),
            ..Default::default()
        })
        .await
        .expect("DeleteVolume");
        let nodes = if self.c.is_some() {
            &["a", "b", "c"][..]
        } else {
            &["a", "b"][..]
        };
        for n in nodes {
            let rep = self.node(n).path().join("state/rep").join(id);
            self.wait(
                id,
                &format!("node {n} to remove the replica"),
                Duration::from_secs(30),
                || {
                    !self.backing(n, id).exists()
                        && !rep.exists()
                        && processes_under(&rep).is_empty()
                },
            );
        }
    }
}

/// A node's CSI calls for one volume: ControllerPublish, NodeStage,
/// NodePublish (block); returns the target path (the device).
async fn attach(
    cl: &Cluster,
    n: &str,
    vol: &csi::Volume,
    cap: csi::VolumeCapability,
) -> Result<PathBuf, tonic::Status> {
    let d = cl.node(n);
    let mut c = cl.ctrl.controller_client().await;
    let mut nc = d.node_client().await;
    let publish = c
        .controller_publish_volume(csi::ControllerPublishVolumeRequest {
            volume_id: vol.volume_id.clone(),
            node_id: n.into(),
            volume_capability: Some(cap.clone()),
            volume_context: vol.volume_context.clone(),
            ..Default::default()
        })
        .await?
        .into_inner();
    let staging = d.path().join("staging").join(&vol.volume_id);
    let target = d.path().join("pods/vm/disk");
    nc.node_stage_volume(csi::NodeStageVolumeRequest {
        volume_id: vol.volume_id.clone(),
        publish_context: publish.publish_context.clone(),
        staging_target_path: staging.display().to_string(),
        volume_capability: Some(cap.clone()),
        volume_context: vol.volume_context.clone(),
        ..Default::default()
    })
    .await?;
    nc.node_publish_volume(csi::NodePublishVolumeRequest {
        volume_id: vol.volume_id.clone(),
        publish_context: publish.publish_context,
        staging_target_path: staging.display().to_string(),
        target_path: target.display().to_string(),
        volume_capability: Some(cap),
        volume_context: vol.volume_context.clone(),
        ..Default::default()
    })
    .await?;
    Ok(target)
}

/// NodeUnpublish, NodeUnstage, ControllerUnpublish.
async fn detach(cl: &Cluster, n: &str, id: &str) {
    let d = cl.node(n);
    let mut nc = d.node_client().await;
    let target = d.path().join("pods/vm/disk");
    nc.node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
        volume_id: id.into(),
        target_path: target.display().to_string(),
    })
    .await
    .expect("NodeUnpublish");
    nc.node_unstage_volume(csi::NodeUnstageVolumeRequest {
        volume_id: id.into(),
        staging_target_path: d.path().join("staging").join(id).display().to_string(),
    })
    .await
    .expect("NodeUnstage");
    let mut c = cl.ctrl.controller_client().await;
    c.controller_unpublish_volume(csi::ControllerUnpublishVolumeRequest {
        volume_id: id.into(),
        node_id: n.into(),
        ..Default::default()
    })
    .await
    .expect("ControllerUnpublish");
}

/// fio on a block device: write a verifiable pattern (seed `seed`) over
/// the whole device, or (`verify_only`) read it back and check every block.
fn fio(dev: &Path, seed: u32, verify_only: bool) {
    let start = Instant::now();
    let out = fio_cmd(dev, seed, verify_only).output().expect("spawn fio");
    check_fio(dev, seed, verify_only, start, out);
}

fn fio_cmd(dev: &Path, seed: u32, verify_only: bool) -> Command {
    // Bounded: a Primary that may not write (no quorum) holds its writes.
    let mut cmd = Command::new("timeout");
    cmd.args(["120", "fio"])
        .current_dir(dev.parent().expect("parent"))
        .args([
            "--name=csi",
            &format!("--filename={}", dev.display()),
            "--ioengine=psync",
            "--direct=1",
            "--rw=randwrite",
            "--bsrange=4k-64k",
            &format!("--size={VOL}"),
            "--verify=crc32c",
            "--verify_fatal=1",
            "--verify_state_save=0",
            &format!("--randseed={seed}"),
        ]);
    if verify_only {
        cmd.arg("--verify_only");
    } else {
        cmd.arg("--do_verify=0");
    }
    cmd
}

fn check_fio(dev: &Path, seed: u32, verify_only: bool, start: Instant, out: std::process::Output) {
    let summary = String::from_utf8_lossy(&out.stdout)
        .lines()
        .find(|l| {
            l.trim_start()
                .starts_with(if verify_only { "READ:" } else { "WRITE:" })
        })
        .unwrap_or_default()
        .trim()
        .to_string();
    eprintln!(
        "fio seed {seed} verify_only={verify_only} on {}: {:?}: {summary}",
        dev.display(),
        start.elapsed()
    );
    assert!(
        out.status.success(),
        "fio (seed {seed}, verify_only={verify_only}) on {} failed:\n{}\n{}",
        dev.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// 4 KiB block `block` of `dev`, read with O_DIRECT.
fn dd_read(dev: &Path, block: u64) -> Vec<u8> {
    let out = Command::new("dd")
        .arg(format!("if={}", dev.display()))
        .args(["bs=4096", "count=1", "iflag=direct", "status=none"])
        .arg(format!("skip={block}"))
        .output()
        .expect("dd");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// Writes 4 KiB block `block` of `dev` with O_DIRECT.
fn dd_write(dev: &Path, block: u64, data: &[u8]) {
    let src = dev.with_file_name("block.in");
    std::fs::write(&src, data).expect("write block.in");
    let out = Command::new("dd")
        .arg(format!("if={}", src.display()))
        .arg(format!("of={}", dev.display()))
        .args([
            "bs=4096",
            "count=1",
            "oflag=direct",
            "conv=notrunc",
            "status=none",
        ])
        .arg(format!("seek={block}"))
        .output()
        .expect("dd");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn create(cl: &Cluster, name: &str, cap: csi::VolumeCapability) -> csi::Volume {
    create_with(cl, name, cap, &[("replicas", "2")])
}

fn create_with(
    cl: &Cluster,
    name: &str,
    cap: csi::VolumeCapability,
    params: &[(&str, &str)],
) -> csi::Volume {
    block_on(async {
        let mut c = cl.ctrl.controller_client().await;
        let mut req = create_req(name, VOL as i64, vec![cap], params);
        req.accessibility_requirements = Some(csi::TopologyRequirement {
            requisite: vec![],
            preferred: vec![topo(&[(ZONE, "room-a")])],
        });
        c.create_volume(req)
            .await
            .expect("CreateVolume")
            .into_inner()
            .volume
            .expect("volume")
    })
}

fn replica_nodes(v: &csi::Volume) -> Vec<String> {
    let mut n: Vec<String> = v.volume_context["tandem.io/replicas"]
        .split(',')
        .map(str::to_string)
        .collect();
    n.sort();
    n
}

#[test]
fn replicated_volume_moves_between_nodes_with_its_data_and_delete_removes_both_replicas() {
    let Some(bins) = tandem_bins() else { return };
    if !require_devices() {
        return;
    }
    let _serial = heavy_lock();
    let mut cl = Cluster::start(bins);
    let _cleanup = cl.cleanup();
    let v = create(&cl, "pvc-moving", rwo_block());
    assert_eq!(replica_nodes(&v), ["a", "b"]);
    let id = v.volume_id.clone();
    // Both agents realise their replica without any CSI call on the nodes.
    let t = Instant::now();
    cl.wait_connected(&id);
    eprintln!("CreateVolume to both replicas connected: {:?}", t.elapsed());
    assert_eq!(cl.status("a", &id)["role"], "Secondary");
    assert_eq!(cl.status("b", &id)["role"], "Secondary");
    // The agent keeps its replica running: kill -9 b's tandemd, it comes back.
    let pidfile = cl.b.path().join("state/rep").join(&id).join("tandemd.pid");
    let old = pid(&pidfile);
    assert!(old > 0);
    // SAFETY: kill(2) on the tandemd the agent started for this test.
    unsafe { libc::kill(old as libc::pid_t, libc::SIGKILL) };
    cl.wait(
        &id,
        "b's agent to restart tandemd",
        Duration::from_secs(20),
        || {
            let p = pid(&pidfile);
            p != old && p != 0
        },
    );
    cl.wait_connected(&id);

    block_on(async {
        let t = Instant::now();
        let dev = attach(&cl, "a", &v, rwo_block()).await.expect("attach a");
        eprintln!(
            "publish + stage (promote, FUSE client, loop) on a: {:?}",
            t.elapsed()
        );
        assert_eq!(cl.status("a", &id)["role"], "Primary");
        // b cannot become a second Primary of a single-writer volume, even
        // when asked directly: tandemd refuses, the stage fails cleanly.
        let mut nb = cl.b.node_client().await;
        let msg = expect_code(
            nb.node_stage_volume(csi::NodeStageVolumeRequest {
                volume_id: id.clone(),
                publish_context: map(&[("tandem.io/role", "primary")]),
                staging_target_path: cl.b.path().join("staging").join(&id).display().to_string(),
                volume_capability: Some(rwo_block()),
                volume_context: v.volume_context.clone(),
                ..Default::default()
            })
            .await,
            Code::FailedPrecondition,
        );
        assert!(msg.contains("Primary"), "{msg}");
        assert!(!cl
            .b
            .path()
            .join("state/staged")
            .join(format!("{id}.json"))
            .exists());
        assert_eq!(cl.status("b", &id)["role"], "Secondary");
        fio(&dev, 7, false);
    });
    // A plugin restart keeps the replica's tandemd (its own process group)
    // and finds it again: same pid, still Primary, and unstage demotes it.
    let pidfile_a = cl.a.path().join("state/rep").join(&id).join("tandemd.pid");
    let before = pid(&pidfile_a);
    cl.a.stop();
    cl.a.start();
    std::thread::sleep(Duration::from_millis(1500)); // a reconcile pass
    assert_eq!(
        pid(&pidfile_a),
        before,
        "the agent restarted a running tandemd"
    );
    assert_eq!(cl.status("a", &id)["role"], "Primary");
    block_on(async {
        detach(&cl, "a", &id).await;
        assert_eq!(cl.status("a", &id)["role"], "Secondary");

        let dev = attach(&cl, "b", &v, rwo_block()).await.expect("attach b");
        assert_eq!(cl.status("b", &id)["role"], "Primary");
        assert_eq!(cl.status("b", &id)["peers"][0]["role"], "Secondary");
        // Every block a wrote reads back intact on b.
        fio(&dev, 7, true);
        detach(&cl, "b", &id).await;
    });
    let (da, db) = (cl.data_area("a", &id), cl.data_area("b", &id));
    assert!(
        da.iter().any(|b| *b != 0),
        "fio wrote nothing to a's backing"
    );
    assert_eq!(
        da.iter().zip(&db).position(|(x, y)| x != y),
        None,
        "the two sites' data areas differ"
    );
    block_on(cl.delete_and_wait_removed(&id));
}

#[test]
fn live_migration_rehearsal_dual_primary_handoff_and_third_attach_refused() {
    let Some(bins) = tandem_bins() else { return };
    if !require_devices() {
        return;
    }
    let _serial = heavy_lock();
    let cl = Cluster::start(bins);
    let _cleanup = cl.cleanup();
    let v = create(&cl, "pvc-vm-disk", rwx_block());
    assert_eq!(replica_nodes(&v), ["a", "b"]);
    let id = v.volume_id.clone();
    cl.wait_connected(&id);

    block_on(async {
        // The source: the VM writes through a.
        let src = attach(&cl, "a", &v, rwx_block()).await.expect("attach a");
        let started = Instant::now();
        let writer = fio_cmd(&src, 11, false)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn fio");
        std::thread::sleep(Duration::from_millis(500));
        // The target attaches while the source is Primary and writing:
        // dual-primary.
        let t = Instant::now();
        let dst = attach(&cl, "b", &v, rwx_block()).await.expect("attach b");
        eprintln!("second attachment (dual-primary) on b: {:?}", t.elapsed());
        assert_eq!(cl.status("a", &id)["role"], "Primary");
        assert_eq!(cl.status("b", &id)["role"], "Primary");
        // The source's writer was still writing when the target became
        // Primary (it runs for seconds; the attach takes ~0.1 s).
        let mut writer = writer;
        assert!(
            writer.try_wait().expect("try_wait").is_none(),
            "the source's writer finished before the target attached; the hand-off did not overlap"
        );
        let out = writer.wait_with_output().expect("fio");
        check_fio(&src, 11, false, started, out);
        // A third node is refused.
        let mut c = cl.ctrl.controller_client().await;
        let msg = expect_code(
            c.controller_publish_volume(csi::ControllerPublishVolumeRequest {
                volume_id: id.clone(),
                node_id: "c".into(),
                volume_capability: Some(rwx_block()),
                ..Default::default()
            })
            .await,
            Code::FailedPrecondition,
        );
        assert!(msg.contains('c'), "{msg}");
        // Hand-off: the source's writer has stopped; the target reads every
        // block the source wrote, then writes and verifies its own.
        fio(&dst, 11, true);
        // Both sides read what the other just wrote, even a block they
        // had read before (no stale cache on either node): what QEMU with
        // cache=none relies on while both run.
        for (reader, writer, mark) in [(&dst, &src, b'A'), (&src, &dst, b'B')] {
            let before = dd_read(reader, 5);
            let data = vec![mark; 4096];
            assert_ne!(before, data);
            dd_write(writer, 5, &data);
            let after = dd_read(reader, 5);
            assert!(
                after == data,
                "a stale block was read after the other node wrote it: {:?}… instead of {:?}…",
                &after[..8],
                &data[..8]
            );
        }
        fio(&dst, 12, false);
        fio(&dst, 12, true);
        // The source detaches: b is the single Primary again.
        let t = Instant::now();
        detach(&cl, "a", &id).await;
        eprintln!(
            "source detach (unpublish, demote, unpublish): {:?}",
            t.elapsed()
        );
        let (sa, sb) = (cl.status("a", &id), cl.status("b", &id));
        assert_eq!(sa["role"], "Secondary", "{sa}");
        assert_eq!(sb["role"], "Primary", "{sb}");
        assert_eq!(sb["peers"][0]["role"], "Secondary", "{sb}");
        assert_eq!(sb["peers"][0]["connection"], "Connected", "{sb}");
        // Still writable on b alone as Primary; a took every write.
        fio(&dst, 13, false);
        detach(&cl, "b", &id).await;
        let mut published: HashMap<String, usize> = HashMap::new();
        let list = c
            .list_volumes(csi::ListVolumesRequest::default())
            .await
            .expect("ListVolumes")
            .into_inner();
        for e in list.entries {
            let s = e.status.unwrap_or_default();
            published.insert(
                e.volume.unwrap_or_default().volume_id,
                s.published_node_ids.len(),
            );
        }
        assert_eq!(published.get(&id), Some(&0));
    });
    let (da, db) = (cl.data_area("a", &id), cl.data_area("b", &id));
    assert_eq!(
        da.iter().zip(&db).position(|(x, y)| x != y),
        None,
        "the two sites' data areas differ after the migration"
    );
    block_on(cl.delete_and_wait_removed(&id));
}

#[test]
fn losing_the_primarys_room_the_other_replica_takes_over_with_every_write_and_the_room_resyncs() {
    room_loss(false);
}

/// The same with a witness on node c (room-c): the agents run `tandemd
/// witness` there and configure both replicas with it; the surviving room
/// is granted writing alone, the returning room is told it missed writes.
#[test]
fn with_a_witness_on_a_third_node_the_surviving_room_takes_over_and_delete_removes_the_witness() {
    room_loss(true);
}

fn room_loss(witness: bool) {
    let Some(bins) = tandem_bins() else { return };
    if !require_devices() {
        return;
    }
    let _serial = heavy_lock();
    let mut cl = Cluster::start_with(bins, witness);
    let _cleanup = cl.cleanup();
    let params: &[(&str, &str)] = if witness {
        &[("replicas", "2"), ("witness", "true")]
    } else {
        &[("replicas", "2")]
    };
    let v = create_with(&cl, "pvc-room-loss", rwo_block(), params);
    let id = v.volume_id.clone();
    assert_eq!(replica_nodes(&v), ["a", "b"]);
    cl.wait_connected(&id);
    if witness {
        assert_eq!(v.volume_context["tandem.io/witness"], "c");
        cl.wait(
            &id,
            "both replicas to reach the witness",
            Duration::from_secs(30),
            || {
                ["a", "b"]
                    .iter()
                    .all(|n| cl.status(n, &id)["quorum"]["witness_connected"] == true)
            },
        );
    }
    block_on(async {
        let dev = attach(&cl, "a", &v, rwo_block()).await.expect("attach a");
        fio(&dev, 21, false);
    });
    // Room a goes dark: its plugin, tandemd and nbdfuse are killed (SIGKILL,
    // nothing flushed), its loop device and mounts vanish as in a reboot.
    drop(Cleanup(vec![cl.a.path().to_path_buf()]));
    cl.a.wait_exit(Duration::from_secs(10));
    block_on(async {
        // The CO force-detaches the dead node and attaches the volume in
        // room b: the stage waits for the peer, then promotes without it.
        let mut c = cl.ctrl.controller_client().await;
        c.controller_unpublish_volume(csi::ControllerUnpublishVolumeRequest {
            volume_id: id.clone(),
            node_id: "a".into(),
            ..Default::default()
        })
        .await
        .expect("ControllerUnpublish a");
        let t = Instant::now();
        let dev = attach(&cl, "b", &v, rwo_block()).await.expect("attach b");
        eprintln!("stage on b with room a down: {:?}", t.elapsed());
        assert_eq!(cl.status("b", &id)["role"], "Primary");
        // Every write acknowledged in room a is there.
        fio(&dev, 21, true);
        // Writes continue in room b alone.
        fio(&dev, 22, false);
        if witness {
            // ... because the witness granted b writing alone.
            let q = cl.status("b", &id)["quorum"].clone();
            assert_eq!(q["solo_granted"], true, "{q}");
        }
    });
    // Room a returns: its agent restarts the replica as Secondary, and b
    // resyncs it.
    cl.a.start();
    let t = Instant::now();
    cl.wait(
        &id,
        "a to be resynced from b",
        Duration::from_secs(60),
        || {
            let sa = cl.status("a", &id);
            let sb = cl.status("b", &id);
            sa["role"] == "Secondary"
                && sa["disk"] == "UpToDate"
                && sb["peers"][0]["disk"] == "UpToDate"
                && sb["peers"][0]["replication"] == "Established"
        },
    );
    eprintln!("room a back in sync: {:?}", t.elapsed());
    block_on(async {
        // The kubelet on the rebooted node unstages what it had staged.
        let mut na = cl.a.node_client().await;
        na.node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
            volume_id: id.clone(),
            target_path: cl.a.path().join("pods/vm/disk").display().to_string(),
        })
        .await
        .expect("NodeUnpublish a");
        na.node_unstage_volume(csi::NodeUnstageVolumeRequest {
            volume_id: id.clone(),
            staging_target_path: cl.a.path().join("staging").join(&id).display().to_string(),
        })
        .await
        .expect("NodeUnstage a after its reboot");
        detach(&cl, "b", &id).await;
    });
    let (da, db) = (cl.data_area("a", &id), cl.data_area("b", &id));
    assert_eq!(
        da.iter().zip(&db).position(|(x, y)| x != y),
        None,
        "the returned room's replica differs from the survivor's"
    );
    block_on(cl.delete_and_wait_removed(&id));
}

/// ControllerExpandVolume of a replicated volume, online and offline.
/// Online (published on a): the controller accepts it, NodeExpandVolume on
/// a grows both replicas from the Primary (R29) and the loop device under
/// its user; the replicas stay connected, both superblocks have the new
/// size, fio verifies every block written before, a write to the new area
/// is replicated. Offline (published nowhere): each node's agent grows its
/// replica offline (R27), the replicas connect once both are grown, and
/// the next stage, on b, gets a device of the new size with every block
/// intact. Both backings end byte-identical.
#[test]
fn an_expanded_replicated_volume_grows_on_both_replicas_with_its_data() {
    let Some(bins) = tandem_bins() else { return };
    if !require_devices() {
        return;
    }
    let _serial = heavy_lock();
    let cl = Cluster::start(bins);
    let _cleanup = cl.cleanup();
    let v = create(&cl, "pvc-growing", rwo_block());
    let id = v.volume_id.clone();
    cl.wait_connected(&id);
    let sizes = |want: u64| {
        ["a", "b"].iter().all(|n| {
            let out = Command::new(&cl.tandemctl)
                .arg("inspect")
                .arg(cl.backing(n, &id))
                .arg("--json")
                .output()
                .expect("tandemctl");
            serde_json::from_slice::<serde_json::Value>(&out.stdout)
                .ok()
                .and_then(|v| v["size"].as_u64())
                == Some(want)
        })
    };
    block_on(async {
        let dev = attach(&cl, "a", &v, rwo_block()).await.expect("attach a");
        fio(&dev, 11, false);
        let mut c = cl.ctrl.controller_client().await;
        let expand = |bytes: u64| csi::ControllerExpandVolumeRequest {
            volume_id: id.clone(),
            capacity_range: Some(csi::CapacityRange {
                required_bytes: bytes as i64,
                limit_bytes: 0,
            }),
            volume_capability: Some(rwo_block()),
            ..Default::default()
        };
        // Online, while a uses it.
        let r = c
            .controller_expand_volume(expand(2 * VOL))
            .await
            .expect("ControllerExpandVolume (published)")
            .into_inner();
        assert_eq!(r.capacity_bytes, (2 * VOL) as i64);
        assert!(r.node_expansion_required);
        let t = Instant::now();
        let target = cl.node("a").path().join("pods/vm/disk");
        let mut nc = cl.node("a").node_client().await;
        let r = nc
            .node_expand_volume(csi::NodeExpandVolumeRequest {
                volume_id: id.clone(),
                volume_path: target.display().to_string(),
                capacity_range: Some(csi::CapacityRange {
                    required_bytes: (2 * VOL) as i64,
                    limit_bytes: 0,
                }),
                volume_capability: Some(rwo_block()),
                ..Default::default()
            })
            .await
            .expect("NodeExpandVolume on a (online)")
            .into_inner();
        eprintln!(
            "online expansion (both replicas, device): {:?}",
            t.elapsed()
        );
        assert_eq!(r.capacity_bytes, (2 * VOL) as i64);
        let size = run_ok(Command::new("blockdev").arg("--getsize64").arg(&dev));
        assert_eq!(size.trim(), (2 * VOL).to_string(), "a's device grew online");
        assert!(sizes(2 * VOL), "both replicas have the new size");
        assert_eq!(cl.status("a", &id)["peers"][0]["connection"], "Connected");
        fio(&dev, 11, true);
        let last = 2 * VOL / 4096 - 1;
        assert_eq!(dd_read(&dev, last), vec![0u8; 4096], "new area not zero");
        dd_write(&dev, last, &[0x5a; 4096]);
        detach(&cl, "a", &id).await;

        // Offline, published nowhere: the agents grow their replicas.
        let r = c
            .controller_expand_volume(expand(3 * VOL))
            .await
            .expect("ControllerExpandVolume (not published)")
            .into_inner();
        assert_eq!(r.capacity_bytes, (3 * VOL) as i64);
        let t = Instant::now();
        cl.wait(&id, "both replicas grown", Duration::from_secs(60), || {
            sizes(3 * VOL)
        });
        cl.wait_connected(&id);
        eprintln!(
            "offline expansion to both replicas grown and connected: {:?}",
            t.elapsed()
        );
        let dev = attach(&cl, "b", &v, rwo_block()).await.expect("attach b");
        let size = run_ok(Command::new("blockdev").arg("--getsize64").arg(&dev));
        assert_eq!(
            size.trim(),
            (3 * VOL).to_string(),
            "the device has the new size"
        );
        fio(&dev, 11, true);
        assert_eq!(dd_read(&dev, last), vec![0x5a; 4096], "online write on b");
        let end = 3 * VOL / 4096 - 1;
        assert_eq!(dd_read(&dev, end), vec![0u8; 4096], "new area not zero");
        dd_write(&dev, end, &[0x6b; 4096]);
        assert_eq!(dd_read(&dev, end), vec![0x6b; 4096]);
        detach(&cl, "b", &id).await;
        let (a, b) = (cl.data_area("a", &id), cl.data_area("b", &id));
        assert_eq!(a.len() as u64, 3 * VOL);
        assert!(a == b, "both backings hold the same data");
        cl.delete_and_wait_removed(&id).await;
    });
}

/// Remote attach: node c holds no replica; ControllerPublish records it as
/// the volume's diskless client, the replicas' agents add it as a peer
/// (restarting their Secondary `tandemd`s), c's agent runs its diskless
/// `tandemd` (R28) and NodeStage promotes it once both replicas are
/// connected. fio writes and verifies through c's device; nothing is
/// stored on c; after c detaches its client is removed and the replicas
/// drop it; b then reads every block c wrote; both backings are identical.
#[test]
fn a_node_without_a_replica_attaches_remotely_through_both_replicas() {
    let Some(bins) = tandem_bins() else { return };
    if !require_devices() {
        return;
    }
    let _serial = heavy_lock();
    let mut cl = Cluster::start_with(bins, true);
    let _cleanup = cl.cleanup();
    let v = create(&cl, "pvc-remote", rwo_block());
    assert_eq!(replica_nodes(&v), ["a", "b"]);
    let id = v.volume_id.clone();
    cl.wait_connected(&id);
    let dirs: Vec<(&str, PathBuf)> = ["a", "b"]
        .iter()
        .map(|n| (*n, cl.node(n).path().to_path_buf()))
        .collect();
    let conf = |n: &str| {
        std::fs::read_to_string(
            dirs.iter()
                .find(|(m, _)| *m == n)
                .map(|(_, p)| p.clone())
                .unwrap_or_default()
                .join("state/rep")
                .join(&id)
                .join("tandemd.toml"),
        )
        .unwrap_or_default()
    };
    let dev = block_on(async {
        let t = Instant::now();
        let dev = attach(&cl, "c", &v, rwo_block())
            .await
            .expect("remote attach on c");
        eprintln!("publish + stage on c (remote attach): {:?}", t.elapsed());
        let s = cl.status("c", &id);
        assert_eq!(s["role"], "Primary", "{s}");
        assert_eq!(s["disk"], "Diskless", "{s}");
        for n in ["a", "b"] {
            assert!(conf(n).contains("diskless = true"), "{n}: {}", conf(n));
            assert_eq!(cl.status(n, &id)["role"], "Secondary");
        }
        fio(&dev, 21, false);
        fio(&dev, 21, true);
        assert!(
            !cl.backing("c", &id).exists(),
            "a diskless client stored the volume on its node"
        );
        dev
    });
    // A plugin restart on c keeps the client's tandemd (same pid, still
    // Primary) and its device: the data reads back through it.
    let pidfile_c = cl
        .node("c")
        .path()
        .join("state/rep")
        .join(&id)
        .join("tandemd.pid");
    let before = pid(&pidfile_c);
    assert!(before > 0);
    {
        let c = cl.c.as_mut().expect("c");
        c.stop();
        c.start();
    }
    std::thread::sleep(Duration::from_millis(1500)); // a reconcile pass
    assert_eq!(pid(&pidfile_c), before, "the agent restarted the client");
    assert_eq!(cl.status("c", &id)["role"], "Primary");
    fio(&dev, 21, true);
    block_on(async {
        detach(&cl, "c", &id).await;
        let rep_c = cl.c.as_ref().expect("c").path().join("state/rep").join(&id);
        cl.wait(
            &id,
            "c's agent to remove the client",
            Duration::from_secs(30),
            || !rep_c.exists() && processes_under(&rep_c).is_empty(),
        );
        cl.wait(
            &id,
            "the replicas to drop the client",
            Duration::from_secs(30),
            || ["a", "b"].iter().all(|n| !conf(n).contains("diskless")),
        );
        cl.wait_connected(&id);

        let dev = attach(&cl, "b", &v, rwo_block()).await.expect("attach b");
        // Every block c wrote through the replicas reads back on b.
        fio(&dev, 21, true);
        detach(&cl, "b", &id).await;
    });
    let (da, db) = (cl.data_area("a", &id), cl.data_area("b", &id));
    assert!(
        da.iter().any(|b| *b != 0),
        "fio wrote nothing to a's backing"
    );
    assert_eq!(
        da.iter().zip(&db).position(|(x, y)| x != y),
        None,
        "the two replicas' data areas differ"
    );
    block_on(cl.delete_and_wait_removed(&id));
}
