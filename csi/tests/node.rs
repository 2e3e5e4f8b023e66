//! CSI conformance, Node: the real `tandem-csi node` on a temporary unix
//! socket, staging volumes with a real `tandemd`, a FUSE NBD client and a loop
//! device, publishing with bind mounts, and leaving nothing behind.
//!
//! Tests that need root, FUSE, loop devices or tools print `skipping:
//! <reason>` (a failure under `TANDEM_REQUIRE_ALL=1` for a missing tool or
//! binary). A guard tears down every mount, loop device and process a test
//! created, even when it fails.

mod common;

use std::fs::OpenOptions;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use common::*;
use tandem_csi::csi;
use tandem_csi::csi::volume_capability::access_mode::Mode;
use tonic::Code;

const VOL: u64 = 64 << 20;
const NODE_ID: &str = "node-a";

fn require_all() -> bool {
    std::env::var("TANDEM_REQUIRE_ALL").is_ok_and(|v| v == "1")
}

/// Prints `skipping: reason` and returns false; panics under TANDEM_REQUIRE_ALL=1.
fn skip(reason: &str) -> bool {
    if require_all() {
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

/// tandemd and tandemctl next to the tandem-csi binary (same profile).
fn tandem_bins() -> Option<(PathBuf, PathBuf)> {
    let dir = Path::new(env!("CARGO_BIN_EXE_tandem-csi"))
        .parent()?
        .to_path_buf();
    let (d, c) = (dir.join("tandemd"), dir.join("tandemctl"));
    if d.is_file() && c.is_file() {
        Some((d, c))
    } else {
        skip(&format!(
            "tandemd/tandemctl not built in {} (cargo build -p tandem-daemon, same profile)",
            dir.display()
        ));
        None
    }
}

/// Root, /dev/fuse, /dev/loop-control and the tools a real stage needs.
fn require_devices(fs: bool) -> bool {
    let mut tools = vec![
        ("fusermount3", "fuse3"),
        ("losetup", "mount"),
        ("mount", "mount"),
        ("blkid", "util-linux"),
    ];
    if fs {
        tools.push(("mkfs.ext4", "e2fsprogs"));
    }
    for (t, p) in tools {
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

/// Serialises the device-heavy tests of this binary.
fn heavy_lock() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// Everything under `dir` that is mounted, deepest first.
fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut v: Vec<PathBuf> = text
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(PathBuf::from)
        .filter(|m| m.starts_with(dir))
        .collect();
    v.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    v
}

/// Loop devices whose backing file is under `dir`.
fn loops_under(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir("/sys/block") {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if let Ok(b) = std::fs::read_to_string(e.path().join("loop/backing_file")) {
                if Path::new(b.trim_end()).starts_with(dir) {
                    out.push(format!("/dev/{name}"));
                }
            }
        }
    }
    out
}

/// Processes whose command line mentions `dir`.
fn processes_under(dir: &Path) -> Vec<u32> {
    let needle = dir.display().to_string();
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir("/proc") {
        for e in rd.flatten() {
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
    }
    out
}

/// Removes whatever a test left under its directory: mounts (lazily),
/// loop devices, processes. Runs on drop, so also after a failed assert.
struct Cleanup(PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        // Loop devices first: their backing file (on the nbdfuse mount)
        // only shows its full path while that mount is attached.
        for l in loops_under(&self.0) {
            let _ = Command::new("losetup").arg("-d").arg(&l).output();
        }
        for m in mounts_under(&self.0) {
            let _ = Command::new("umount").arg("-l").arg(&m).output();
        }
        for pid in processes_under(&self.0) {
            // SAFETY: kill(2) on processes our test started (their command
            // line names our temporary directory).
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        }
    }
}

/// Asserts nothing is left: no mount, loop device or process under `dir`
/// (other than the driver itself), no run directory.
fn assert_nothing_left(d: &Driver) {
    let dir = d.path();
    assert_eq!(
        mounts_under(dir),
        Vec::<PathBuf>::new(),
        "mounts left behind"
    );
    assert_eq!(
        loops_under(dir),
        Vec::<String>::new(),
        "loop devices left behind"
    );
    // Give killed children a moment to disappear from /proc.
    let mut left = Vec::new();
    for _ in 0..100 {
        left = processes_under(&dir.join("state/run"));
        if left.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(left.is_empty(), "processes left behind: {left:?}");
    let run = dir.join("state/run");
    let entries: Vec<_> = std::fs::read_dir(&run)
        .map(|r| r.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(
        entries.is_empty(),
        "run directories left behind: {entries:?}"
    );
}

fn node_driver(bins: Option<(PathBuf, PathBuf)>) -> Driver {
    node_driver_with(bins, "fuse")
}

/// A node plugin with `--attacher attacher`.
fn node_driver_with(bins: Option<(PathBuf, PathBuf)>, attacher: &str) -> Driver {
    let dir = tempfile::Builder::new()
        .prefix("tandem-csi-node-")
        .tempdir_in("/var/tmp")
        .expect("temp dir");
    let (tandemd, tandemctl) = bins.unwrap_or_else(|| {
        (
            "/nonexistent/tandemd".into(),
            "/nonexistent/tandemctl".into(),
        )
    });
    let args = vec![
        "node".to_string(),
        "--node-id".into(),
        NODE_ID.into(),
        "--topology".into(),
        format!("{ZONE}=room-a"),
        "--state-dir".into(),
        dir.path().join("state").display().to_string(),
        "--data-dir".into(),
        dir.path().join("data").display().to_string(),
        "--tandemd".into(),
        tandemd.display().to_string(),
        "--tandemctl".into(),
        tandemctl.display().to_string(),
        "--attacher".into(),
        attacher.into(),
    ];
    Driver::start_with(dir, args, &[])
}

fn vol_ctx(size: u64) -> std::collections::HashMap<String, String> {
    map(&[
        ("tandem.io/size", &size.to_string()),
        ("tandem.io/uuid", "5e1f0000-0000-4000-8000-000000000001"),
        ("tandem.io/replicas", &format!("{NODE_ID},node-b")),
    ])
}

fn stage_req(d: &Driver, id: &str, c: csi::VolumeCapability) -> csi::NodeStageVolumeRequest {
    csi::NodeStageVolumeRequest {
        volume_id: id.into(),
        staging_target_path: d.path().join("staging").join(id).display().to_string(),
        volume_capability: Some(c),
        volume_context: vol_ctx(VOL),
        ..Default::default()
    }
}

fn publish_req(
    d: &Driver,
    id: &str,
    target: &Path,
    c: csi::VolumeCapability,
    readonly: bool,
) -> csi::NodePublishVolumeRequest {
    csi::NodePublishVolumeRequest {
        volume_id: id.into(),
        staging_target_path: d.path().join("staging").join(id).display().to_string(),
        target_path: target.display().to_string(),
        volume_capability: Some(c),
        readonly,
        ..Default::default()
    }
}

fn unpublish_req(id: &str, target: &Path) -> csi::NodeUnpublishVolumeRequest {
    csi::NodeUnpublishVolumeRequest {
        volume_id: id.into(),
        target_path: target.display().to_string(),
    }
}

fn unstage_req(d: &Driver, id: &str) -> csi::NodeUnstageVolumeRequest {
    csi::NodeUnstageVolumeRequest {
        volume_id: id.into(),
        staging_target_path: d.path().join("staging").join(id).display().to_string(),
    }
}

fn mount_fstype(target: &Path) -> String {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    text.lines()
        .find(|l| l.split(' ').nth(4) == Some(&target.display().to_string()))
        .and_then(|l| l.split(" - ").nth(1))
        .and_then(|rest| rest.split(' ').next())
        .unwrap_or_default()
        .to_string()
}

fn mount_options(target: &Path) -> String {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    text.lines()
        .find(|l| l.split(' ').nth(4) == Some(&target.display().to_string()))
        .and_then(|l| l.split(' ').nth(5))
        .unwrap_or_default()
        .to_string()
}

#[test]
fn node_reports_its_id_topology_and_capabilities() {
    let d = node_driver(None);
    block_on(async {
        let mut n = d.node_client().await;
        let info = n
            .node_get_info(csi::NodeGetInfoRequest {})
            .await
            .unwrap()
            .into_inner();
        assert_eq!(info.node_id, NODE_ID);
        let t = info.accessible_topology.unwrap().segments;
        assert_eq!(t[ZONE], "room-a");
        assert_eq!(t[NODE], NODE_ID);
        let caps = n
            .node_get_capabilities(csi::NodeGetCapabilitiesRequest {})
            .await
            .unwrap()
            .into_inner();
        use csi::node_service_capability::{rpc::Type as R, Type as T};
        let rpcs: Vec<i32> = caps
            .capabilities
            .iter()
            .filter_map(|c| match &c.r#type {
                Some(T::Rpc(r)) => Some(r.r#type),
                _ => None,
            })
            .collect();
        assert!(rpcs.contains(&(R::StageUnstageVolume as i32)));
        assert!(rpcs.contains(&(R::ExpandVolume as i32)));
        assert!(rpcs.contains(&(R::GetVolumeStats as i32)));
        // This driver was given no tandemd: Probe says it is not ready, and why.
        let mut id = d.identity().await;
        let m = expect_code(
            id.probe(csi::ProbeRequest {}).await,
            Code::FailedPrecondition,
        );
        assert!(m.contains("/nonexistent/tandemd"), "{m}");
    });
}

#[test]
fn node_calls_validate_arguments_and_teardown_of_unknown_volumes_is_ok() {
    let d = node_driver(None);
    block_on(async {
        let mut n = d.node_client().await;
        let good = stage_req(&d, "tdm-x", rwo_block());
        let bad: Vec<(&str, csi::NodeStageVolumeRequest)> = vec![
            (
                "no id",
                csi::NodeStageVolumeRequest {
                    volume_id: "".into(),
                    ..good.clone()
                },
            ),
            (
                "bad id",
                csi::NodeStageVolumeRequest {
                    volume_id: "../../etc".into(),
                    ..good.clone()
                },
            ),
            (
                "no staging path",
                csi::NodeStageVolumeRequest {
                    staging_target_path: "".into(),
                    ..good.clone()
                },
            ),
            (
                "no capability",
                csi::NodeStageVolumeRequest {
                    volume_capability: None,
                    ..good.clone()
                },
            ),
            (
                "RWX filesystem",
                csi::NodeStageVolumeRequest {
                    volume_capability: Some(cap(Mode::MultiNodeMultiWriter, false, "ext4")),
                    ..good.clone()
                },
            ),
            (
                "no size",
                csi::NodeStageVolumeRequest {
                    volume_context: Default::default(),
                    ..good.clone()
                },
            ),
        ];
        for (what, req) in bad {
            let m = expect_code(n.node_stage_volume(req).await, Code::InvalidArgument);
            eprintln!("{what}: {m}");
        }
        // A node holding no replica: FAILED_PRECONDITION (no remote attach yet).
        let mut other = good.clone();
        other
            .volume_context
            .insert("tandem.io/replicas".into(), "node-b,node-c".into());
        expect_code(n.node_stage_volume(other).await, Code::FailedPrecondition);
        // The volume's data is on another node and this node has no
        // replica yet: no blank replica is created in its place.
        let mut elsewhere = stage_req(&d, "tdm-x", rwo_block());
        elsewhere.publish_context = map(&[
            ("tandem.io/role", "primary"),
            ("tandem.io/data-on", "node-b"),
        ]);
        let m = expect_code(
            n.node_stage_volume(elsewhere).await,
            Code::FailedPrecondition,
        );
        assert!(m.contains("node-b") && m.contains("blank"), "{m}");
        let staged: Vec<_> = std::fs::read_dir(d.path().join("state/staged"))
            .unwrap()
            .collect();
        assert!(
            staged.is_empty(),
            "a refused stage left a record: {staged:?}"
        );
        assert!(
            !d.path().join("data/tdm-x.img").exists(),
            "a refused stage created a backing"
        );
        // Dual-primary needs replication between the replicas, which the
        // node plugin does not configure yet: refused rather than serving
        // two diverging copies.
        let mut dual = stage_req(&d, "tdm-x", rwx_block());
        dual.publish_context = map(&[
            ("tandem.io/role", "dual-primary"),
            ("tandem.io/other-primary", "node-b"),
        ]);
        let m = expect_code(n.node_stage_volume(dual).await, Code::FailedPrecondition);
        assert!(m.contains("dual-primary"), "{m}");
        // Publish before stage.
        let target = d.path().join("target");
        expect_code(
            n.node_publish_volume(publish_req(&d, "tdm-x", &target, rwo_block(), false))
                .await,
            Code::FailedPrecondition,
        );
        expect_code(
            n.node_publish_volume(csi::NodePublishVolumeRequest {
                target_path: "".into(),
                ..publish_req(&d, "tdm-x", &target, rwo_block(), false)
            })
            .await,
            Code::InvalidArgument,
        );
        // Unpublish / unstage of things that do not exist: OK.
        n.node_unpublish_volume(unpublish_req("tdm-x", &target))
            .await
            .unwrap();
        n.node_unstage_volume(unstage_req(&d, "tdm-x"))
            .await
            .unwrap();
        expect_code(
            n.node_unstage_volume(unstage_req(&d, "")).await,
            Code::InvalidArgument,
        );
        expect_code(
            n.node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
                volume_id: "tdm-x".into(),
                volume_path: target.display().to_string(),
                staging_target_path: String::new(),
            })
            .await,
            Code::NotFound,
        );
        // NodeExpandVolume (csi-sanity's cases): no id or no path is
        // INVALID_ARGUMENT, a volume not staged here NOT_FOUND.
        expect_code(
            n.node_expand_volume(csi::NodeExpandVolumeRequest {
                volume_path: target.display().to_string(),
                ..Default::default()
            })
            .await,
            Code::InvalidArgument,
        );
        expect_code(
            n.node_expand_volume(csi::NodeExpandVolumeRequest {
                volume_id: "tdm-x".into(),
                ..Default::default()
            })
            .await,
            Code::InvalidArgument,
        );
        expect_code(
            n.node_expand_volume(csi::NodeExpandVolumeRequest {
                volume_id: "tdm-x".into(),
                volume_path: "some/path".into(),
                ..Default::default()
            })
            .await,
            Code::NotFound,
        );
    });
}

fn write_read_block(dev: &Path, offset: u64, data: &[u8]) {
    let mut f = OpenOptions::new().read(true).write(true).open(dev).unwrap();
    f.seek(SeekFrom::Start(offset)).unwrap();
    f.write_all(data).unwrap();
    f.sync_all().unwrap();
}

fn read_block(dev: &Path, offset: u64, len: usize) -> Vec<u8> {
    let mut f = OpenOptions::new().read(true).open(dev).unwrap();
    f.seek(SeekFrom::Start(offset)).unwrap();
    let mut v = vec![0u8; len];
    f.read_exact(&mut v).unwrap();
    v
}

#[test]
fn block_volume_stage_publish_unstage_with_real_devices() {
    let Some(bins) = tandem_bins() else { return };
    if !require_devices(false) {
        return;
    }
    let _serial = heavy_lock();
    let d = node_driver(Some(bins));
    let _cleanup = Cleanup(d.path().to_path_buf());
    let id = "tdm-block";
    let pods = d.path().join("pods");
    let t1 = pods.join("p1/dev");
    let t2 = pods.join("p2/dev");
    let data: Vec<u8> = (0..(1u32 << 20))
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    block_on(async {
        // Everything staging needs is here: Probe is ready.
        let mut ident = d.identity().await;
        let probe = ident
            .probe(csi::ProbeRequest {})
            .await
            .unwrap()
            .into_inner();
        assert_eq!(probe.ready, Some(true));
        let mut n = d.node_client().await;
        n.node_stage_volume(stage_req(&d, id, rwo_block()))
            .await
            .unwrap();
        // Idempotent.
        n.node_stage_volume(stage_req(&d, id, rwo_block()))
            .await
            .unwrap();
        // Staged elsewhere or as a filesystem: ALREADY_EXISTS.
        let mut elsewhere = stage_req(&d, id, rwo_block());
        elsewhere.staging_target_path = d.path().join("other").display().to_string();
        expect_code(n.node_stage_volume(elsewhere).await, Code::AlreadyExists);
        assert_eq!(loops_under(d.path()).len(), 1);
        assert!(
            d.path().join(format!("data/{id}.img")).is_file(),
            "backing not created"
        );

        n.node_publish_volume(publish_req(&d, id, &t1, rwo_block(), false))
            .await
            .unwrap();
        n.node_publish_volume(publish_req(&d, id, &t1, rwo_block(), false))
            .await
            .unwrap();
        let meta = std::fs::metadata(&t1).unwrap();
        assert!(
            meta.file_type().is_block_device(),
            "{} is not a block device",
            t1.display()
        );
        write_read_block(&t1, 3 << 20, &data);
        assert!(read_block(&t1, 3 << 20, data.len()) == data);

        let stats = n
            .node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
                volume_id: id.into(),
                volume_path: t1.display().to_string(),
                staging_target_path: String::new(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(stats.usage[0].total, VOL as i64);
        assert!(!stats.volume_condition.unwrap().abnormal);

        // A read-only publication of the same device: the bind mount is ro.
        n.node_publish_volume(publish_req(&d, id, &t2, rwo_block(), true))
            .await
            .unwrap();
        let opts = mount_options(&t2);
        assert!(
            opts.split(',').any(|o| o == "ro"),
            "read-only publish mounted {opts}"
        );
        assert!(read_block(&t2, 3 << 20, data.len()) == data);

        // Unstage while published: refused, nothing torn down.
        let m = expect_code(
            n.node_unstage_volume(unstage_req(&d, id)).await,
            Code::FailedPrecondition,
        );
        assert!(m.contains("published"), "{m}");
        assert!(read_block(&t1, 3 << 20, data.len()) == data);

        for t in [&t1, &t2] {
            n.node_unpublish_volume(unpublish_req(id, t)).await.unwrap();
            n.node_unpublish_volume(unpublish_req(id, t)).await.unwrap();
            assert!(!t.exists(), "{} left behind", t.display());
        }
        n.node_unstage_volume(unstage_req(&d, id)).await.unwrap();
        n.node_unstage_volume(unstage_req(&d, id)).await.unwrap();
    });
    assert_nothing_left(&d);

    // Staged again: the data written before is still there (tandemd flushed it).
    block_on(async {
        let mut n = d.node_client().await;
        n.node_stage_volume(stage_req(&d, id, rwo_block()))
            .await
            .unwrap();
        n.node_publish_volume(publish_req(&d, id, &t1, rwo_block(), false))
            .await
            .unwrap();
        assert!(
            read_block(&t1, 3 << 20, data.len()) == data,
            "data lost across unstage/stage"
        );
        n.node_unpublish_volume(unpublish_req(id, &t1))
            .await
            .unwrap();
        n.node_unstage_volume(unstage_req(&d, id)).await.unwrap();
    });
    assert_nothing_left(&d);
}

#[test]
fn filesystem_volume_is_formatted_once_mounted_and_published() {
    check_filesystem("ext4", VOL, ("mkfs.ext4", "e2fsprogs"));
}

#[test]
fn xfs_volume_is_formatted_once_mounted_and_published() {
    // mkfs.xfs refuses filesystems under 300 MiB.
    check_filesystem("xfs", 320 << 20, ("mkfs.xfs", "xfsprogs"));
}

fn check_filesystem(fs_type: &str, size: u64, (mkfs, package): (&str, &str)) {
    let Some(bins) = tandem_bins() else { return };
    if !require_devices(true) {
        return;
    }
    if !on_path(mkfs) {
        skip(&format!("{mkfs} not installed (apt-get install {package})"));
        return;
    }
    let _serial = heavy_lock();
    let d = node_driver(Some(bins));
    let _cleanup = Cleanup(d.path().to_path_buf());
    let id = format!("tdm-{fs_type}");
    let id = id.as_str();
    let fs = cap(Mode::SingleNodeWriter, false, fs_type);
    let stage_req = |d: &Driver, id: &str, c: csi::VolumeCapability| csi::NodeStageVolumeRequest {
        volume_context: vol_ctx(size),
        ..stage_req(d, id, c)
    };
    let t1 = d.path().join("pods/p1/mount");
    let t2 = d.path().join("pods/p2/mount");
    block_on(async {
        let mut n = d.node_client().await;
        n.node_stage_volume(stage_req(&d, id, fs.clone()))
            .await
            .unwrap();
        let staging = d.path().join("staging").join(id);
        assert!(
            mount_options(&staging).contains("rw"),
            "staging not mounted"
        );
        n.node_publish_volume(publish_req(&d, id, &t1, fs.clone(), false))
            .await
            .unwrap();
        std::fs::write(t1.join("hello.txt"), b"tandem").unwrap();
        // Publishing a filesystem volume as block: INVALID_ARGUMENT.
        expect_code(
            n.node_publish_volume(publish_req(&d, id, &t2, rwo_block(), false))
                .await,
            Code::InvalidArgument,
        );
        // Read-only publication: writes fail with EROFS.
        n.node_publish_volume(publish_req(&d, id, &t2, fs.clone(), true))
            .await
            .unwrap();
        assert_eq!(std::fs::read(t2.join("hello.txt")).unwrap(), b"tandem");
        let e = std::fs::write(t2.join("nope.txt"), b"x").unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{e}");

        let stats = n
            .node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
                volume_id: id.into(),
                volume_path: t1.display().to_string(),
                staging_target_path: String::new(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(stats.usage.len(), 2, "bytes and inodes: {stats:?}");
        assert!(stats.usage[0].total > 0 && stats.usage[0].total <= size as i64);
        // The filesystem is the one asked for.
        let fstype = mount_fstype(&t1);
        assert_eq!(fstype, fs_type);

        for t in [&t1, &t2] {
            n.node_unpublish_volume(unpublish_req(id, t)).await.unwrap();
        }
        n.node_unstage_volume(unstage_req(&d, id)).await.unwrap();
    });
    assert_nothing_left(&d);
    // Staged again: not reformatted, the file is still there.
    block_on(async {
        let mut n = d.node_client().await;
        n.node_stage_volume(stage_req(&d, id, fs.clone()))
            .await
            .unwrap();
        n.node_publish_volume(publish_req(&d, id, &t1, fs.clone(), false))
            .await
            .unwrap();
        assert_eq!(std::fs::read(t1.join("hello.txt")).unwrap(), b"tandem");
        n.node_unpublish_volume(unpublish_req(id, &t1))
            .await
            .unwrap();
        n.node_unstage_volume(unstage_req(&d, id)).await.unwrap();
    });
    assert_nothing_left(&d);
}

#[test]
fn unstage_after_a_plugin_restart_still_cleans_up() {
    let Some(bins) = tandem_bins() else { return };
    if !require_devices(false) {
        return;
    }
    let _serial = heavy_lock();
    let mut d = node_driver(Some(bins));
    let _cleanup = Cleanup(d.path().to_path_buf());
    let id = "tdm-restart";
    block_on(async {
        let mut n = d.node_client().await;
        n.node_stage_volume(stage_req(&d, id, rwo_block()))
            .await
            .unwrap();
    });
    // The plugin restarts (upgrade, crash): tandemd and nbdfuse keep running.
    d.stop();
    assert_eq!(
        loops_under(d.path()).len(),
        1,
        "the device must survive a plugin restart"
    );
    d.start();
    block_on(async {
        let mut n = d.node_client().await;
        // Stage is still idempotent, unstage still finds everything.
        n.node_stage_volume(stage_req(&d, id, rwo_block()))
            .await
            .unwrap();
        n.node_unstage_volume(unstage_req(&d, id)).await.unwrap();
    });
    assert_nothing_left(&d);
}

#[test]
fn controller_and_node_provision_publish_and_delete_a_block_volume() {
    let Some(bins) = tandem_bins() else { return };
    if !require_devices(false) {
        return;
    }
    let _serial = heavy_lock();
    let inventory = format!(
        r#"
[[node]]
name = "{NODE_ID}"
capacity_bytes = 1073741824
topology = {{ "{ZONE}" = "room-a" }}
[[node]]
name = "node-b"
capacity_bytes = 1073741824
topology = {{ "{ZONE}" = "room-b" }}
"#
    );
    let ctrl = Driver::controller(&inventory, &[]);
    let node = node_driver(Some(bins));
    let _cleanup = Cleanup(node.path().to_path_buf());
    let target = node.path().join("pods/vm/disk");
    block_on(async {
        let mut c = ctrl.controller_client().await;
        let mut n = node.node_client().await;
        // The CO asks for the volume near the node the pod was scheduled on.
        let info = n
            .node_get_info(csi::NodeGetInfoRequest {})
            .await
            .unwrap()
            .into_inner();
        let mut req = create_req("pvc-vm", VOL as i64, vec![rwx_block()], &[]);
        req.accessibility_requirements = Some(csi::TopologyRequirement {
            requisite: vec![],
            preferred: vec![info.accessible_topology.clone().unwrap()],
        });
        let v = c
            .create_volume(req)
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap();
        assert_eq!(v.accessible_topology[0].segments[NODE], NODE_ID);
        let publish = c
            .controller_publish_volume(csi::ControllerPublishVolumeRequest {
                volume_id: v.volume_id.clone(),
                node_id: info.node_id.clone(),
                volume_capability: Some(rwx_block()),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let staging = node.path().join("staging").join(&v.volume_id);
        n.node_stage_volume(csi::NodeStageVolumeRequest {
            volume_id: v.volume_id.clone(),
            publish_context: publish.publish_context.clone(),
            staging_target_path: staging.display().to_string(),
            volume_capability: Some(rwx_block()),
            volume_context: v.volume_context.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
        n.node_publish_volume(csi::NodePublishVolumeRequest {
            volume_id: v.volume_id.clone(),
            publish_context: publish.publish_context,
            staging_target_path: staging.display().to_string(),
            target_path: target.display().to_string(),
            volume_capability: Some(rwx_block()),
            volume_context: v.volume_context.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
        write_read_block(&target, 0, b"a VM disk");
        assert_eq!(read_block(&target, 0, 9), b"a VM disk");
        assert_eq!(
            std::fs::File::open(&target)
                .unwrap()
                .seek(SeekFrom::End(0))
                .unwrap(),
            VOL
        );
        // The replica's backing carries the volume's UUID.
        let backing = node.path().join(format!("data/{}.img", v.volume_id));
        let inspect = Command::new(&tandem_bins().unwrap().1)
            .arg("inspect")
            .arg(&backing)
            .arg("--json")
            .output()
            .unwrap();
        assert!(
            String::from_utf8_lossy(&inspect.stdout).contains(&v.volume_context["tandem.io/uuid"]),
            "{}",
            String::from_utf8_lossy(&inspect.stdout)
        );

        n.node_unpublish_volume(unpublish_req(&v.volume_id, &target))
            .await
            .unwrap();
        n.node_unstage_volume(csi::NodeUnstageVolumeRequest {
            volume_id: v.volume_id.clone(),
            staging_target_path: staging.display().to_string(),
        })
        .await
        .unwrap();
        c.controller_unpublish_volume(csi::ControllerUnpublishVolumeRequest {
            volume_id: v.volume_id.clone(),
            node_id: info.node_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
        c.delete_volume(csi::DeleteVolumeRequest {
            volume_id: v.volume_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    });
    assert_nothing_left(&node);
}

#[test]
fn a_broken_stage_is_reported_and_staged_again() {
    let Some(bins) = tandem_bins() else { return };
    if !require_devices(false) {
        return;
    }
    let _serial = heavy_lock();
    let d = node_driver(Some(bins));
    let _cleanup = Cleanup(d.path().to_path_buf());
    let id = "tdm-broken";
    let target = d.path().join("pods/p/dev");
    block_on(async {
        let mut n = d.node_client().await;
        n.node_stage_volume(stage_req(&d, id, rwo_block()))
            .await
            .unwrap();
        n.node_publish_volume(publish_req(&d, id, &target, rwo_block(), false))
            .await
            .unwrap();
        write_read_block(&target, 0, b"before the crash");
        // tandemd and nbdfuse die (a crash, an OOM kill; after a node
        // reboot the loop device and mounts are gone too).
        let pids = processes_under(&d.path().join("state/run"));
        assert_eq!(pids.len(), 2, "expected tandemd and nbdfuse: {pids:?}");
        for pid in pids {
            // SAFETY: kill(2) on processes this test's driver started.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        }
        std::thread::sleep(Duration::from_millis(200));
        let stats = n
            .node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
                volume_id: id.into(),
                volume_path: target.display().to_string(),
                staging_target_path: String::new(),
            })
            .await
            .unwrap()
            .into_inner();
        let cond = stats.volume_condition.unwrap();
        assert!(cond.abnormal, "{cond:?}");
        assert!(cond.message.contains("tandemd is not running"), "{cond:?}");
        // Still published: staging again is refused, saying why.
        let m = expect_code(
            n.node_stage_volume(stage_req(&d, id, rwo_block())).await,
            Code::FailedPrecondition,
        );
        assert!(m.contains("broken") && m.contains("published"), "{m}");
        n.node_unpublish_volume(unpublish_req(id, &target))
            .await
            .unwrap();
        // Now NodeStage repairs it: a new tandemd, nbdfuse and loop device,
        // and the acknowledged write is still there.
        n.node_stage_volume(stage_req(&d, id, rwo_block()))
            .await
            .unwrap();
        n.node_publish_volume(publish_req(&d, id, &target, rwo_block(), false))
            .await
            .unwrap();
        assert_eq!(read_block(&target, 0, 16), b"before the crash");
        n.node_unpublish_volume(unpublish_req(id, &target))
            .await
            .unwrap();
        n.node_unstage_volume(unstage_req(&d, id)).await.unwrap();
    });
    assert_nothing_left(&d);
}

fn expand_req(id: &str, path: &Path, bytes: u64) -> csi::NodeExpandVolumeRequest {
    csi::NodeExpandVolumeRequest {
        volume_id: id.into(),
        volume_path: path.display().to_string(),
        capacity_range: Some(csi::CapacityRange {
            required_bytes: bytes as i64,
            limit_bytes: 0,
        }),
        ..Default::default()
    }
}

/// The total bytes NodeGetVolumeStats reports for a mounted volume.
async fn fs_total(
    n: &mut tandem_csi::csi::node_client::NodeClient<tonic::transport::Channel>,
    id: &str,
    path: &Path,
) -> u64 {
    let stats = n
        .node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
            volume_id: id.into(),
            volume_path: path.display().to_string(),
            staging_target_path: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    stats.usage[0].total as u64
}

/// Expansion as Kubernetes drives it. Online (the default attacher, the
/// built-in FUSE file + loop): NodeExpandVolume on a published xfs volume
/// grows the replica, the device and the mounted filesystem in place
/// (`xfs_growfs`; an ext4 one would need `CAP_SYS_RESOURCE` for an online
/// `resize2fs`, which these machines lack), data written before is intact
/// and the new space takes writes; a published block device has the new
/// size at once, old data intact, the new area zero. Offline: a stage
/// whose publish context carries a grown size attaches a device of that
/// size and grows an ext4 filesystem before mounting it. With `--attacher
/// nbdfuse` the device cannot grow while staged: FAILED_PRECONDITION, the
/// replica grown.
#[test]
fn expanding_a_staged_volume_grows_replica_device_and_filesystem() {
    let Some(bins) = tandem_bins() else { return };
    if !require_devices(true) {
        return;
    }
    for (tool, package) in [("resize2fs", "e2fsprogs"), ("mkfs.xfs", "xfsprogs")] {
        if !on_path(tool) {
            skip(&format!("{tool} not installed (apt-get install {package})"));
            return;
        }
    }
    let _serial = heavy_lock();
    let d = node_driver(Some(bins));
    let _cleanup = Cleanup(d.path().to_path_buf());
    let big: u64 = 160 << 20;
    let payload: Vec<u8> = (0..(3u32 << 20))
        .map(|i| (i.wrapping_mul(2654435761) >> 11) as u8)
        .collect();
    let grown_stage = |c: csi::VolumeCapability, vol: &str| {
        let mut r = stage_req(&d, vol, c);
        r.publish_context = map(&[
            ("tandem.io/role", "primary"),
            ("tandem.io/size", &big.to_string()),
        ]);
        r
    };
    block_on(async {
        let mut n = d.node_client().await;

        // Online, xfs (at least 300 MiB): grown while mounted and in use.
        let xid = "tdm-grow-xfs";
        let (x_old, x_new): (u64, u64) = (320 << 20, 480 << 20);
        let xfs = cap(Mode::SingleNodeWriter, false, "xfs");
        let mut req = stage_req(&d, xid, xfs.clone());
        req.volume_context = vol_ctx(x_old);
        n.node_stage_volume(req).await.unwrap();
        let tx = d.path().join("pods/px/mount");
        n.node_publish_volume(publish_req(&d, xid, &tx, xfs.clone(), false))
            .await
            .unwrap();
        std::fs::write(tx.join("data.bin"), &payload).unwrap();
        let before = fs_total(&mut n, xid, &tx).await;
        let r = n
            .node_expand_volume(expand_req(xid, &tx, x_new))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.capacity_bytes, x_new as i64, "device of the new size");
        let backing = d.path().join("data").join(format!("{xid}.img"));
        let len = std::fs::metadata(&backing).unwrap().len();
        assert!(len >= x_new, "backing not grown: {len} bytes");
        assert!(
            std::fs::read(tx.join("data.bin")).unwrap() == payload,
            "data changed"
        );
        let after = fs_total(&mut n, xid, &tx).await;
        assert!(
            after >= before + (120 << 20),
            "filesystem not grown online: {before} -> {after} bytes"
        );
        // More than the free space before the growth fits now.
        let more = vec![0x5Au8; (before as usize).saturating_sub(8 << 20).max(1 << 20)];
        std::fs::write(tx.join("more.bin"), &more).unwrap();
        // A request the device already satisfies changes nothing and
        // reports the device size.
        let r = n
            .node_expand_volume(expand_req(xid, &tx, x_old))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.capacity_bytes, x_new as i64);
        n.node_unpublish_volume(unpublish_req(xid, &tx))
            .await
            .unwrap();
        n.node_unstage_volume(unstage_req(&d, xid)).await.unwrap();

        // Offline, ext4: the replica is grown before the next stage (as
        // the agent does for a replicated volume), which attaches the
        // grown device and grows the filesystem before mounting it.
        let id = "tdm-grow";
        let fs = cap(Mode::SingleNodeWriter, false, "ext4");
        let staging = d.path().join("staging").join(id);
        let t1 = d.path().join("pods/p1/mount");
        n.node_stage_volume(stage_req(&d, id, fs.clone()))
            .await
            .unwrap();
        n.node_publish_volume(publish_req(&d, id, &t1, fs.clone(), false))
            .await
            .unwrap();
        std::fs::write(t1.join("data.bin"), &payload).unwrap();
        n.node_unpublish_volume(unpublish_req(id, &t1))
            .await
            .unwrap();
        n.node_unstage_volume(unstage_req(&d, id)).await.unwrap();
        n.node_stage_volume(grown_stage(fs.clone(), id))
            .await
            .unwrap();
        let r = n
            .node_expand_volume(expand_req(id, &staging, big))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.capacity_bytes, big as i64, "device of the new size");
        n.node_publish_volume(publish_req(&d, id, &t1, fs.clone(), false))
            .await
            .unwrap();
        assert!(
            std::fs::read(t1.join("data.bin")).unwrap() == payload,
            "data changed"
        );
        let total = fs_total(&mut n, id, &t1).await;
        assert!(total > 128 << 20, "filesystem not grown: {total} bytes");
        let more = vec![0x5Au8; 100 << 20];
        std::fs::write(t1.join("more.bin"), &more).unwrap();
        assert_eq!(
            std::fs::metadata(t1.join("more.bin")).unwrap().len(),
            more.len() as u64
        );
        n.node_unpublish_volume(unpublish_req(id, &t1))
            .await
            .unwrap();
        n.node_unstage_volume(unstage_req(&d, id)).await.unwrap();

        // Block: the device itself has the grown size, old data intact.
        let bid = "tdm-grow-block";
        n.node_stage_volume(stage_req(&d, bid, rwo_block()))
            .await
            .unwrap();
        let t2 = d.path().join("pods/p2/dev");
        n.node_publish_volume(publish_req(&d, bid, &t2, rwo_block(), false))
            .await
            .unwrap();
        write_read_block(&t2, VOL - (1 << 20), &payload[..1 << 20]);
        n.node_unpublish_volume(unpublish_req(bid, &t2))
            .await
            .unwrap();
        n.node_unstage_volume(unstage_req(&d, bid)).await.unwrap();
        n.node_stage_volume(grown_stage(rwo_block(), bid))
            .await
            .unwrap();
        n.node_publish_volume(publish_req(&d, bid, &t2, rwo_block(), false))
            .await
            .unwrap();
        let size = std::fs::File::open(&t2)
            .and_then(|mut f| f.seek(SeekFrom::End(0)))
            .unwrap();
        assert_eq!(size, big, "block device size");
        assert!(
            read_block(&t2, VOL - (1 << 20), 1 << 20) == payload[..1 << 20],
            "block data changed"
        );
        assert!(
            read_block(&t2, VOL, 1 << 20).iter().all(|&b| b == 0),
            "grown area not zero"
        );
        write_read_block(&t2, big - 4096, &[7; 4096]);
        assert_eq!(read_block(&t2, big - 4096, 4096), vec![7; 4096]);
        // Online, published: the block device grows under its user.
        let bigger = big + (32 << 20);
        let r = n
            .node_expand_volume(expand_req(bid, &t2, bigger))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.capacity_bytes, bigger as i64);
        let size = std::fs::File::open(&t2)
            .and_then(|mut f| f.seek(SeekFrom::End(0)))
            .unwrap();
        assert_eq!(size, bigger, "published block device grown online");
        assert_eq!(read_block(&t2, big - 4096, 4096), vec![7; 4096]);
        assert!(read_block(&t2, big, 1 << 20).iter().all(|&b| b == 0));
        write_read_block(&t2, bigger - 4096, &[9; 4096]);
        n.node_unpublish_volume(unpublish_req(bid, &t2))
            .await
            .unwrap();
        n.node_unstage_volume(unstage_req(&d, bid)).await.unwrap();
    });
    assert_nothing_left(&d);
    // nbdfuse cannot change its file's size: the replica grows, the device
    // does not, and the caller is told to stage again.
    if !on_path("nbdfuse") {
        skip("nbdfuse not installed (apt-get install nbdfuse)");
        return;
    }
    let d = node_driver_with(tandem_bins(), "nbdfuse");
    let _cleanup = Cleanup(d.path().to_path_buf());
    block_on(async {
        let mut n = d.node_client().await;
        let id = "tdm-grow-nbdfuse";
        n.node_stage_volume(stage_req(&d, id, rwo_block()))
            .await
            .unwrap();
        let t = d.path().join("pods/p3/dev");
        n.node_publish_volume(publish_req(&d, id, &t, rwo_block(), false))
            .await
            .unwrap();
        let m = expect_code(
            n.node_expand_volume(expand_req(id, &t, big)).await,
            Code::FailedPrecondition,
        );
        assert!(m.contains("stage it again"), "{m}");
        let backing = d.path().join("data").join(format!("{id}.img"));
        let len = std::fs::metadata(&backing).unwrap().len();
        assert!(len >= big, "backing not grown: {len} bytes");
        n.node_unpublish_volume(unpublish_req(id, &t))
            .await
            .unwrap();
        n.node_unstage_volume(unstage_req(&d, id)).await.unwrap();
    });
    assert_nothing_left(&d);
}

/// Starts a `tandemd` serving a fresh 64 MiB export `name` on
/// `DIR/nbd.sock`; returns the process.
fn tandemd_export(bins: &(PathBuf, PathBuf), dir: &Path, name: &str) -> std::process::Child {
    let img = dir.join(format!("{name}.img"));
    let out = Command::new(&bins.1)
        .args(["create"])
        .arg(&img)
        .args(["--size", &VOL.to_string(), "--name", name])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let sock = dir.join("nbd.sock");
    let mut child = Command::new(&bins.0)
        .arg("run")
        .arg("--export")
        .arg(format!("{name}={}", img.display()))
        .arg("--nbd-unix")
        .arg(&sock)
        .arg("--admin-socket")
        .arg(dir.join("admin.sock"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    for _ in 0..500 {
        if std::os::unix::net::UnixStream::connect(&sock).is_ok() {
            return child;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("tandemd did not listen on {}", sock.display());
}

/// One simple-reply NBD request on a socket in the transmission phase, as
/// the kernel driver sends them; returns the reply's error and data.
fn nbd_simple(
    s: &mut std::os::unix::net::UnixStream,
    kind: u16,
    cookie: u64,
    offset: u64,
    len: u32,
    payload: &[u8],
) -> (u32, Vec<u8>) {
    let mut req = Vec::new();
    req.extend_from_slice(&0x2560_9513u32.to_be_bytes());
    req.extend_from_slice(&0u16.to_be_bytes());
    req.extend_from_slice(&kind.to_be_bytes());
    req.extend_from_slice(&cookie.to_be_bytes());
    req.extend_from_slice(&offset.to_be_bytes());
    req.extend_from_slice(&len.to_be_bytes());
    req.extend_from_slice(payload);
    s.write_all(&req).unwrap();
    let mut h = [0u8; 16];
    s.read_exact(&mut h).unwrap();
    assert_eq!(h[0..4], 0x6744_6698u32.to_be_bytes(), "not a simple reply");
    assert_eq!(h[8..16], cookie.to_be_bytes());
    let err = u32::from_be_bytes(h[4..8].try_into().unwrap());
    let mut data = vec![
        0u8;
        if kind == 0 && err == 0 {
            len as usize
        } else {
            0
        }
    ];
    s.read_exact(&mut data).unwrap();
    (err, data)
}

/// What the kernel attacher hands the kernel: connections to tandemd that
/// finished the handshake without structured replies, in the transmission
/// phase, each taking simple-reply requests, and seeing each other's writes.
#[test]
fn kernel_nbd_handshake_leaves_tandemd_connections_in_the_transmission_phase() {
    let Some(bins) = tandem_bins() else { return };
    let dir = tempfile::Builder::new()
        .prefix("tandem-csi-hs-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let mut child = tandemd_export(&bins, dir.path(), "tdm-hs");
    let sock = dir.path().join("nbd.sock");
    let (mut conns, export) =
        tandem_csi::nbd_kernel::handshake(&sock, "tdm-hs", 2, Duration::from_secs(5)).unwrap();
    assert_eq!(conns.len(), 2);
    assert_eq!(export.size, VOL);
    assert_ne!(export.flags & 1, 0, "NBD_FLAG_HAS_FLAGS");
    assert_ne!(export.flags & (1 << 2), 0, "NBD_FLAG_SEND_FLUSH");
    assert!(export.min_block >= 1 && export.min_block <= 4096);
    let data: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 3) as u8).collect();
    let (a, b) = conns.split_at_mut(1);
    // WRITE on the first connection, FLUSH, READ it back on the second.
    assert_eq!(nbd_simple(&mut a[0], 1, 1, 1 << 20, 4096, &data).0, 0);
    assert_eq!(nbd_simple(&mut a[0], 3, 2, 0, 0, &[]).0, 0);
    let (err, back) = nbd_simple(&mut b[0], 0, 3, 1 << 20, 4096, &[]);
    assert_eq!(err, 0);
    assert!(back == data, "read back differs");
    // Out of range: an error reply, the connection stays usable.
    let (err, _) = nbd_simple(&mut b[0], 0, 4, VOL, 4096, &[]);
    assert_ne!(err, 0, "a read past the end succeeded");
    assert_eq!(nbd_simple(&mut b[0], 0, 5, 0, 512, &[]).0, 0);
    drop(conns);
    // A wrong export name: a clear error naming it.
    let e = tandem_csi::nbd_kernel::handshake(&sock, "tdm-nope", 1, Duration::from_secs(5))
        .expect_err("unknown export accepted");
    assert!(format!("{e:#}").contains("tdm-nope"), "{e:#}");
    let _ = child.kill();
    let _ = child.wait();
}

/// `--attacher nbd` on a kernel without the nbd driver: the plugin refuses
/// to start and says why; `auto` starts (with nbdfuse + loop).
#[test]
fn attacher_nbd_without_the_kernel_driver_refuses_to_start() {
    if tandem_csi::nbd_kernel::available() {
        eprintln!("skipping: this kernel has the nbd driver (see the kernel nbd test)");
        return;
    }
    let dir = tempfile::Builder::new()
        .prefix("tandem-csi-att-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_tandem-csi"))
        .args(["--endpoint"])
        .arg(format!("unix://{}", dir.path().join("csi.sock").display()))
        .args(["node", "--node-id", "n1", "--state-dir"])
        .arg(dir.path().join("state"))
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .args(["--attacher", "nbd"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("tandem-csi node --attacher nbd started without a kernel nbd driver");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(!status.success());
    assert!(
        err.contains("--attacher nbd") && err.contains("no nbd driver"),
        "{err}"
    );
}

/// With the kernel nbd driver: a block volume staged as `/dev/nbdN`
/// (netlink), written and read through a pod's bind mount, grown online by
/// NodeExpandVolume with its data, and gone after unstage.
#[test]
fn block_volume_through_the_kernel_nbd_attacher_grows_online() {
    let Some(bins) = tandem_bins() else { return };
    if !tandem_csi::nbd_kernel::available() {
        eprintln!(
            "skipping: no kernel nbd module (the nbd generic netlink family is not registered)"
        );
        return;
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipping: kernel nbd devices need root");
        return;
    }
    let _serial = heavy_lock();
    let d = node_driver_with(Some(bins), "nbd");
    let _cleanup = Cleanup(d.path().to_path_buf());
    let id = "tdm-knbd";
    let t1 = d.path().join("pods/p1/dev");
    let data: Vec<u8> = (0..(1u32 << 20))
        .map(|i| (i.wrapping_mul(2654435761) >> 11) as u8)
        .collect();
    block_on(async {
        let mut n = d.node_client().await;
        n.node_stage_volume(stage_req(&d, id, rwo_block()))
            .await
            .unwrap();
        n.node_publish_volume(publish_req(&d, id, &t1, rwo_block(), false))
            .await
            .unwrap();
        assert!(loops_under(d.path()).is_empty(), "a loop device was used");
        let meta = std::fs::metadata(&t1).unwrap();
        assert!(meta.file_type().is_block_device());
        use std::os::unix::fs::MetadataExt;
        assert_eq!(libc::major(meta.rdev()), 43, "not an nbd device");
        write_read_block(&t1, 5 << 20, &data);
        assert_eq!(sys_size(&t1), VOL);
        // Online growth.
        n.node_expand_volume(expand_req(id, &t1, 2 * VOL))
            .await
            .unwrap();
        assert_eq!(sys_size(&t1), 2 * VOL);
        assert!(read_block(&t1, 5 << 20, data.len()) == data);
        write_read_block(&t1, VOL + (1 << 20), &data);
        n.node_unpublish_volume(unpublish_req(id, &t1))
            .await
            .unwrap();
        n.node_unstage_volume(unstage_req(&d, id)).await.unwrap();
    });
    assert!(
        tandem_csi::nbd_kernel::devices_serving(id).is_empty(),
        "an nbd device still serves {id}"
    );
    assert_nothing_left(&d);
}

/// The size of a block device.
fn sys_size(dev: &Path) -> u64 {
    let mut f = std::fs::File::open(dev).unwrap();
    f.seek(SeekFrom::End(0)).unwrap()
}

/// The built-in FUSE attacher (`tandem-csi fuse-nbd`) on its own: the file
/// has the export's size, carries reads and writes to `tandemd` (a write
/// through the file reads back through a fresh NBD client's view: the
/// backing), refuses to shrink and to grow past the export (ENOSPC), grows
/// to the export's new size after `tandemctl resize`, and exits when
/// unmounted.
#[test]
fn the_fuse_file_grows_only_to_the_exports_size() {
    let Some(bins) = tandem_bins() else { return };
    if !require_devices(false) {
        return;
    }
    let _serial = heavy_lock();
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let mut tandemd = tandemd_export(&bins, dir.path(), "tdm-fuse");
    let mnt = dir.path().join("fuse");
    std::fs::create_dir(&mnt).unwrap();
    let pidfile = dir.path().join("fuse.pid");
    let mut fuse = Command::new(env!("CARGO_BIN_EXE_tandem-csi"))
        .arg("fuse-nbd")
        .arg("--socket")
        .arg(dir.path().join("nbd.sock"))
        .args(["--export", "tdm-fuse", "--pidfile"])
        .arg(&pidfile)
        .arg(&mnt)
        .spawn()
        .unwrap();
    let file = mnt.join("nbd");
    for _ in 0..500 {
        if pidfile.exists() {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let result = std::panic::catch_unwind(|| {
        assert_eq!(std::fs::metadata(&file).unwrap().len(), VOL);
        let data: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8).collect();
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&file)
            .unwrap();
        use std::os::unix::fs::FileExt;
        // 1 MiB from an unaligned buffer: the kernel sends unaligned
        // pieces, which the client aligns (read-modify-write at the edges).
        let put = |at: u64| f.write_all_at(&data, at).unwrap();
        put(VOL - (1 << 20));
        f.sync_all().unwrap();
        let mut back = vec![0u8; 1 << 20];
        f.read_exact_at(&mut back, VOL - (1 << 20)).unwrap();
        assert!(back == data, "read back through the file");
        // Past the end: refused, nothing written.
        assert!(f.write_all_at(&[1; 4096], VOL).is_err());
        let e = f.set_len(VOL + (1 << 20)).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "{e}");
        let e = f.set_len(VOL - (1 << 20)).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EPERM), "{e}");
        assert_eq!(std::fs::metadata(&file).unwrap().len(), VOL);
        let out = Command::new(&bins.1)
            .args([
                "resize",
                "tdm-fuse",
                &(2 * VOL).to_string(),
                "--admin-socket",
            ])
            .arg(dir.path().join("admin.sock"))
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        f.set_len(2 * VOL).unwrap();
        assert_eq!(std::fs::metadata(&file).unwrap().len(), 2 * VOL);
        put(2 * VOL - (1 << 20));
        f.read_exact_at(&mut back, 2 * VOL - (1 << 20)).unwrap();
        assert!(back == data, "read back in the grown area");
        f.read_exact_at(&mut back, VOL - (1 << 20)).unwrap();
        assert!(back == data, "old data after growing");
        drop(f);
        // The backing holds what was written through the file.
        let img = dir.path().join("tdm-fuse.img");
        let inspect = Command::new(&bins.1)
            .arg("inspect")
            .arg(&img)
            .arg("--json")
            .output()
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&inspect.stdout).unwrap();
        let off = v["data_offset"].as_u64().unwrap();
        let raw = std::fs::read(&img).unwrap();
        let at = (off + VOL - (1 << 20)) as usize;
        assert!(raw[at..at + (1 << 20)] == data[..], "backing content");
    });
    let _ = Command::new("fusermount3").arg("-u").arg(&mnt).status();
    let mut exited = false;
    for _ in 0..500 {
        if fuse.try_wait().unwrap().is_some() {
            exited = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    if !exited {
        let _ = fuse.kill();
        let _ = fuse.wait();
    }
    let _ = tandemd.kill();
    let _ = tandemd.wait();
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
    assert!(exited, "tandem-csi fuse-nbd did not exit once unmounted");
}
