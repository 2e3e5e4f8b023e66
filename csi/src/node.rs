//! The CSI Node service: stage a volume as a block device on this node,
//! publish it into pods, tear it all down again.
//!
//! Staging a volume, step by step (each step is recorded in
//! `STATE/staged/<id>.json` before the next starts, so an unstage after a
//! failure or a plugin restart undoes exactly what exists):
//!
//! 1. the local replica's backing `DATA/<id>.img` is created with
//!    `tandemctl create` unless it exists (same UUID on every replica);
//! 2. a `tandemd` serving that one export runs in `STATE/run/<id>/` (its own
//!    NBD and admin sockets, its own process group, so it outlives a plugin
//!    restart);
//! 3. the attacher turns the NBD export into a block device: the kernel
//!    `nbd` driver over netlink where it exists ([`crate::nbd_kernel`],
//!    `/dev/nbdN`), otherwise `nbdfuse` exposes it as a file and `losetup`
//!    makes a loop device of it (`--attacher`);
//! 4. for a filesystem volume, the device is formatted when blank (`blkid`
//!    finds nothing) and mounted on the staging path.
//!
//! Publishing bind-mounts the device file (block) or the staging directory
//! (filesystem) onto the target path, read-only when asked. Unpublish and
//! unstage are idempotent and leave no mount, loop device, process or run
//! directory behind; the backing file stays (it is the replica's data).
//!
//! With a replica agent (`--store`, see [`crate::agent`]) a
//! replicated volume's `tandemd` is the agent's, already running as
//! Secondary with its peers: steps 1 and 2 become "promote it" (Primary,
//! or the second Primary of a dual-primary live migration) and unstage
//! demotes it instead of stopping it. Without an agent, or for a volume
//! whose record has no replication addresses, the staged `tandemd` serves
//! the local replica alone (see `docs/csi.md`).

use std::collections::{BTreeMap, HashMap};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bpfman_csi::v1 as csi;
use bpfman_csi::v1::node_server::Node;
use bpfman_csi::v1::node_service_capability::{rpc::Type as RpcType, Rpc, Type as CapType};
use serde::{Deserialize, Serialize};
use tonic::{Request, Response, Status};

use crate::agent::{Agent, Member, TlsFiles};
use crate::controller::{
    reply, CTX_REPLICAS, CTX_SIZE, CTX_UUID, PUB_DATA_ON, PUB_OTHER, PUB_ROLE, PUB_SIZE,
};
use crate::error::{required, Error, Result};
use crate::inflight::InFlight;
use crate::params::{Access, Capability};
use crate::placement::NODE_TOPOLOGY_KEY;
use crate::store::{valid_id, StoreKind, VolumeRecord};
use crate::sys;

/// How long `tandemd` and `nbdfuse` may take to become ready.
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// How long `tandemd` gets to flush and exit after SIGTERM.
const STOP_GRACE: Duration = Duration::from_secs(20);

/// The node plugin's configuration.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// This node's id (must match the controller's inventory).
    pub node_id: String,
    /// Topology labels reported in NodeGetInfo.
    pub topology: BTreeMap<String, String>,
    /// Staged-volume records and per-volume run directories.
    pub state_dir: PathBuf,
    /// Backing files of local replicas.
    pub data_dir: PathBuf,
    /// The `tandemd` binary.
    pub tandemd: PathBuf,
    /// The `tandemctl` binary.
    pub tandemctl: PathBuf,
    /// The volume-record store the replica agent reads (the controller's
    /// `--store`); `None`: no agent, volumes are served unreplicated.
    pub store: Option<StoreKind>,
    /// The node certificate replicated volumes authenticate with.
    pub tls: Option<TlsFiles>,
    /// How staged volumes become block devices.
    pub attacher: Attacher,
}

/// How a staged volume's NBD export becomes a block device (`--attacher`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Attacher {
    /// The kernel nbd driver where it exists (its netlink family resolves,
    /// after `modprobe nbd`), the built-in FUSE client + loop otherwise; a
    /// failed kernel attach falls back to FUSE + loop.
    #[default]
    Auto,
    /// The kernel nbd driver over netlink (`/dev/nbdN`); the plugin refuses
    /// to start without it. Grows online.
    Nbd,
    /// The built-in FUSE NBD client (`tandem-csi fuse-nbd`) + a loop device
    /// with direct I/O. Grows online.
    Fuse,
    /// `nbdfuse` + a loop device with direct I/O. Does not grow online
    /// (nbdfuse cannot change the file's size): expansion needs a restage.
    Nbdfuse,
}

/// Version of the staged-volume record format.
const STAGED_VERSION: u32 = 1;

/// What has been set up for one staged volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Staged {
    version: u32,
    volume_id: String,
    staging_path: PathBuf,
    block: bool,
    fs_type: Option<String>,
    backing: PathBuf,
    run_dir: PathBuf,
    tandemd_pid: Option<u32>,
    /// The FUSE NBD client's pid (built-in `tandem-csi fuse-nbd` or
    /// `nbdfuse`; the field keeps its first name for old records).
    nbdfuse_pid: Option<u32>,
    loop_dev: Option<String>,
    /// The kernel nbd device index when the kernel attacher made the device.
    #[serde(default)]
    nbd_index: Option<u32>,
    mounted: bool,
    complete: bool,
    /// Target paths the volume is published at.
    #[serde(default)]
    targets: Vec<PathBuf>,
    /// The replica agent's directory when its `tandemd` serves the volume
    /// (replicated): unstage demotes that `tandemd` instead of stopping it.
    #[serde(default)]
    replica_dir: Option<PathBuf>,
}

impl Staged {
    fn fuse_dir(&self) -> PathBuf {
        self.run_dir.join("fuse")
    }

    /// The block device a pod gets.
    fn device(&self) -> Option<String> {
        match self.nbd_index {
            Some(i) => Some(crate::nbd_kernel::device_path(i).display().to_string()),
            None => self.loop_dev.clone(),
        }
    }

    fn nbd_socket(&self) -> PathBuf {
        self.replica_dir
            .as_ref()
            .unwrap_or(&self.run_dir)
            .join("nbd.sock")
    }

    /// The admin socket of the `tandemd` serving the volume (the replica
    /// agent's for a replicated volume).
    fn admin_socket(&self) -> PathBuf {
        self.replica_dir
            .as_ref()
            .unwrap_or(&self.run_dir)
            .join("admin.sock")
    }
}

/// The node service.
pub struct NodeService {
    cfg: Arc<NodeConfig>,
    inflight: InFlight,
    agent: Option<Arc<Agent>>,
    /// Whether devices are made by the kernel nbd driver.
    kernel_nbd: bool,
}

impl NodeService {
    /// A node service; creates its state and data directories.
    pub fn new(cfg: NodeConfig) -> anyhow::Result<NodeService> {
        // Unix socket paths are limited to 107 bytes; the longest one is
        // STATE/run/tdm-<uuid>/admin.sock.
        let longest =
            cfg.state_dir.as_os_str().len() + "/run/tdm-".len() + 36 + "/admin.sock".len();
        if longest > 107 {
            anyhow::bail!(
                "--state-dir {}: too long for the per-volume unix sockets (at most {} bytes)",
                cfg.state_dir.display(),
                cfg.state_dir.as_os_str().len() - (longest - 107)
            );
        }
        for d in [
            cfg.state_dir.join("staged"),
            cfg.state_dir.join("run"),
            cfg.data_dir.clone(),
        ] {
            std::fs::create_dir_all(&d)
                .map_err(|e| anyhow::anyhow!("creating {}: {e}", d.display()))?;
        }
        let kernel_nbd = match cfg.attacher {
            Attacher::Nbdfuse | Attacher::Fuse => false,
            Attacher::Nbd => {
                crate::nbd_kernel::Nbd::open()
                    .map_err(|e| anyhow::anyhow!("--attacher nbd: {e:#}"))?;
                true
            }
            Attacher::Auto => match crate::nbd_kernel::Nbd::open() {
                Ok(_) => true,
                Err(e) => {
                    tracing::info!("no kernel nbd ({e:#}): attaching with FUSE + loop");
                    false
                }
            },
        };
        tracing::info!(
            attacher = if kernel_nbd {
                "kernel nbd (netlink)"
            } else if cfg.attacher == Attacher::Nbdfuse {
                "nbdfuse + loop"
            } else {
                "built-in FUSE + loop"
            },
            "block devices"
        );
        let agent = match &cfg.store {
            Some(kind) => {
                let store = kind
                    .open()
                    .map_err(|e| anyhow::anyhow!("--store {kind}: {e}"))?;
                Some(Arc::new(Agent::new(
                    crate::agent::AgentConfig {
                        node_id: cfg.node_id.clone(),
                        state_dir: cfg.state_dir.clone(),
                        data_dir: cfg.data_dir.clone(),
                        tandemd: cfg.tandemd.clone(),
                        tandemctl: cfg.tandemctl.clone(),
                        tls: cfg.tls.clone(),
                    },
                    store,
                )?))
            }
            None => None,
        };
        Ok(NodeService {
            cfg: Arc::new(cfg),
            inflight: InFlight::default(),
            agent,
            kernel_nbd,
        })
    }

    /// The replica agent (with `--store`); the caller runs its loop.
    pub fn agent(&self) -> Option<Arc<Agent>> {
        self.agent.clone()
    }

    fn record_path(&self, id: &str) -> PathBuf {
        self.cfg.state_dir.join("staged").join(format!("{id}.json"))
    }

    fn load(&self, id: &str) -> Result<Option<Staged>> {
        let p = self.record_path(id);
        match std::fs::read_to_string(&p) {
            Ok(t) => serde_json::from_str(&t)
                .map(Some)
                .map_err(|e| Error::internal(format!("{}: corrupt staged record", p.display()), e)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::internal(p.display(), e)),
        }
    }

    fn save(&self, s: &Staged) -> Result<()> {
        let p = self.record_path(&s.volume_id);
        let tmp = p.with_extension("json.tmp");
        let json = serde_json::to_vec_pretty(s)
            .map_err(|e| Error::internal("encoding staged record", e))?;
        std::fs::write(&tmp, json)
            .and_then(|()| std::fs::rename(&tmp, &p))
            .map_err(|e| Error::internal(format!("writing {}", p.display()), e))
    }

    fn volume_id<'a>(&self, id: &'a str) -> Result<&'a str> {
        let id = required("volume_id", id)?;
        if !valid_id(id) {
            return Err(Error::InvalidArgument(format!(
                "volume_id {id:?}: expected 1 to 128 of a-z A-Z 0-9 - _"
            )));
        }
        Ok(id)
    }

    async fn stage(&self, req: csi::NodeStageVolumeRequest) -> Result<()> {
        let id = self.volume_id(&req.volume_id)?;
        let staging = PathBuf::from(required("staging_target_path", &req.staging_target_path)?);
        let cap = Capability::parse(
            req.volume_capability
                .as_ref()
                .ok_or_else(|| Error::InvalidArgument("volume_capability is required".into()))?,
        )?;
        let ctx = &req.volume_context;
        let size: u64 = ctx
            .get(CTX_SIZE)
            .and_then(|s| s.parse().ok())
            .filter(|s| *s > 0)
            .ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "volume_context[{CTX_SIZE}] must hold the volume size in bytes"
                ))
            })?;
        // A publication after an (offline) expansion carries the grown size.
        let size = match req.publish_context.get(PUB_SIZE) {
            Some(p) => p.parse::<u64>().map(|p| p.max(size)).map_err(|_| {
                Error::InvalidArgument(format!(
                    "publish_context[{PUB_SIZE}] {p:?} is not a size in bytes"
                ))
            })?,
            None => size,
        };
        let uuid: uuid::Uuid = ctx
            .get(CTX_UUID)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| {
                Error::InvalidArgument(format!("volume_context[{CTX_UUID}] must hold a UUID"))
            })?;
        let record = match &self.agent {
            Some(a) => a.replicated_record(id)?,
            None => None,
        };
        let dual = req.publish_context.get(PUB_ROLE).map(String::as_str) == Some("dual-primary");
        if let Some(rec) = &record {
            match crate::agent::member(rec, &self.cfg.node_id) {
                Some(Member::Replica) => {}
                // Remote attach: this node's diskless client (R28).
                Some(Member::Client) if !dual => {}
                Some(Member::Client) => {
                    return Err(Error::FailedPrecondition(format!(
                        "node {} holds no replica of {id}: it attaches remotely only as the \
                         volume's single user, not as one of two primaries",
                        self.cfg.node_id
                    )))
                }
                None => {
                    return Err(Error::FailedPrecondition(format!(
                        "node {} holds no replica of {id} (replicas: {}) and the volume is not \
                         published to it (ControllerPublishVolume attaches it remotely)",
                        self.cfg.node_id,
                        rec.replicas
                            .iter()
                            .map(|r| r.node.as_str())
                            .collect::<Vec<_>>()
                            .join(",")
                    )))
                }
            }
        } else if let Some(replicas) = ctx.get(CTX_REPLICAS) {
            if !replicas.split(',').any(|n| n == self.cfg.node_id) {
                return Err(Error::FailedPrecondition(format!(
                    "node {} holds no replica of {id} (replicas: {replicas}); remote attach \
                     needs a volume the replica agents replicate (node plugins with --store and \
                     node addresses in the controller's inventory)",
                    self.cfg.node_id
                )));
            }
        }
        if dual && record.is_none() {
            return Err(Error::FailedPrecondition(format!(
                "volume {id} is published to two nodes (dual-primary, live migration), but this \
                 version of the node plugin does not replicate between replicas yet; refusing to \
                 serve two diverging copies"
            )));
        }
        if record.is_none() && ctx.get(CTX_REPLICAS).is_some_and(|r| r.contains(',')) {
            tracing::warn!(
                volume = %id,
                "serving the local replica only: this version of the driver does not configure \
                 replication between the replicas it placed"
            );
        }
        let _guard = self.inflight.begin(id, "NodeStageVolume")?;
        let (block, fs_type, flags) = match &cap.access {
            Access::Block => (true, None, Vec::new()),
            Access::Mount { fs_type, flags } => (false, Some(fs_type.clone()), flags.clone()),
        };
        if let Some(s) = self.load(id)? {
            if s.complete {
                if s.staging_path != staging || s.block != block || s.fs_type != fs_type {
                    return Err(Error::AlreadyExists(format!(
                        "volume {id} is already staged at {} as {}",
                        s.staging_path.display(),
                        if s.block { "block" } else { "filesystem" }
                    )));
                }
                let problems = problems(&s)?;
                if problems.is_empty() {
                    return Ok(());
                }
                // Broken, e.g. after a node reboot (the record survives,
                // processes, loop devices and mounts do not): stage anew,
                // unless a pod still uses the old device.
                let published = mounted_targets(&s)?;
                if !published.is_empty() {
                    return Err(Error::FailedPrecondition(format!(
                        "volume {id} is staged but broken ({}) while still published at {}; \
                         unpublish it, then stage again",
                        problems.join("; "),
                        published.join(", ")
                    )));
                }
                tracing::warn!(volume = %id, "staged volume is broken ({}); staging it again", problems.join("; "));
            } else {
                tracing::info!(volume = %id, "undoing an incomplete stage before staging again");
            }
            self.teardown(s).await?;
        }
        let mut s = Staged {
            version: STAGED_VERSION,
            volume_id: id.to_string(),
            staging_path: staging.clone(),
            block,
            fs_type: fs_type.clone(),
            backing: self.cfg.data_dir.join(format!("{id}.img")),
            run_dir: self.cfg.state_dir.join("run").join(id),
            tandemd_pid: None,
            nbdfuse_pid: None,
            loop_dev: None,
            nbd_index: None,
            mounted: false,
            complete: false,
            targets: Vec::new(),
            replica_dir: None,
        };
        if s.run_dir.join("admin.sock").as_os_str().len() > 107 {
            return Err(Error::InvalidArgument(format!(
                "volume_id {id:?} is too long for a unix socket under {}",
                s.run_dir.display()
            )));
        }
        self.save(&s)?;
        let other = if dual {
            Some(
                req.publish_context
                    .get(PUB_OTHER)
                    .map(String::as_str)
                    .unwrap_or("the other node"),
            )
        } else {
            None
        };
        let staged = match &record {
            Some(rec) => {
                self.stage_replicated(&mut s, rec, other, cap.read_only, &flags)
                    .await
            }
            None => {
                self.stage_steps(
                    &mut s,
                    size,
                    uuid,
                    cap.read_only,
                    &flags,
                    req.publish_context.get(PUB_DATA_ON).map(String::as_str),
                )
                .await
            }
        };
        match staged {
            Ok(()) => {
                s.complete = true;
                self.save(&s)?;
                tracing::info!(volume = %id, device = ?s.device(), staging = %staging.display(), "staged");
                Ok(())
            }
            Err(e) => {
                tracing::warn!(volume = %id, "stage failed, undoing: {e}");
                if let Err(t) = self.teardown(s).await {
                    tracing::warn!(volume = %id, "undoing a failed stage: {t}");
                }
                Err(e)
            }
        }
    }

    async fn stage_steps(
        &self,
        s: &mut Staged,
        size: u64,
        uuid: uuid::Uuid,
        read_only: bool,
        flags: &[String],
        data_on: Option<&str>,
    ) -> Result<()> {
        let id = s.volume_id.clone();
        let existed = s.backing.exists();
        // 1. The local replica's backing. Until replication is wired up,
        // only the node holding the volume's data may create it: anywhere
        // else a blank replica would be served in place of the data.
        if !s.backing.exists() {
            if let Some(data_on) = data_on.filter(|n| *n != self.cfg.node_id) {
                return Err(Error::FailedPrecondition(format!(
                    "volume {id} has no replica on this node yet and its data is on node \
                     {data_on}; this version does not replicate, so it will not serve a blank \
                     replica in its place"
                )));
            }
            let tandemctl = self.cfg.tandemctl.display().to_string();
            let backing = s.backing.display().to_string();
            let size = size.to_string();
            let uuid = uuid.to_string();
            sys::run(
                &tandemctl,
                &[
                    "create", &backing, "--size", &size, "--name", &id, "--uuid", &uuid,
                ],
            )
            .await?;
        }
        // An existing replica smaller than the volume (expanded since it
        // was last staged) is grown before tandemd serves it: offline, which
        // also works for a replicated volume (R27).
        if existed {
            let backing = s.backing.display().to_string();
            let tandemctl = self.cfg.tandemctl.display().to_string();
            let have = sys::backing_size(&tandemctl, &backing).await?;
            if have < size {
                let size_s = size.to_string();
                sys::run(&tandemctl, &["resize", "--offline", &backing, &size_s]).await?;
                tracing::info!(volume = %id, from = have, to = size, "replica grown");
            }
        }
        // 2. tandemd for this volume.
        std::fs::create_dir_all(&s.run_dir)
            .map_err(|e| Error::internal(format!("creating {}", s.run_dir.display()), e))?;
        let admin = s.run_dir.join("admin.sock");
        let log_path = s.run_dir.join("tandemd.log");
        let log =
            std::fs::File::create(&log_path).map_err(|e| Error::internal(log_path.display(), e))?;
        let err_log = log
            .try_clone()
            .map_err(|e| Error::internal(log_path.display(), e))?;
        let child = std::process::Command::new(&self.cfg.tandemd)
            .arg("run")
            .arg("--export")
            .arg(format!("{id}={}", s.backing.display()))
            .arg("--nbd-unix")
            .arg(s.nbd_socket())
            .arg("--admin-socket")
            .arg(&admin)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err_log)
            .process_group(0)
            .spawn()
            .map_err(|e| Error::internal(format!("starting {}", self.cfg.tandemd.display()), e))?;
        s.tandemd_pid = Some(child.id());
        self.save(s)?;
        let sock = s.nbd_socket();
        wait_ready(child.id(), &log_path, "tandemd", || {
            std::os::unix::net::UnixStream::connect(&sock).is_ok()
        })
        .await?;
        self.attach(s, read_only, flags).await
    }

    /// Steps 1 and 2 of a replicated volume: the agent's `tandemd` (started
    /// now if the agent has not yet), promoted; then steps 3 and 4.
    async fn stage_replicated(
        &self,
        s: &mut Staged,
        rec: &VolumeRecord,
        other_primary: Option<&str>,
        read_only: bool,
        flags: &[String],
    ) -> Result<()> {
        let agent = self
            .agent
            .as_ref()
            .ok_or_else(|| Error::Internal("replicated stage without an agent".into()))?;
        let running = agent.ensure(rec).await?;
        s.replica_dir = Some(running.dir.clone());
        s.tandemd_pid = Some(running.pid);
        self.save(s)?;
        agent.promote(rec, &running, other_primary).await?;
        std::fs::create_dir_all(&s.run_dir)
            .map_err(|e| Error::internal(format!("creating {}", s.run_dir.display()), e))?;
        self.attach(s, read_only, flags).await
    }

    /// Steps 3 and 4: the NBD export as a block device, formatted and
    /// mounted for a filesystem volume.
    async fn attach(&self, s: &mut Staged, read_only: bool, flags: &[String]) -> Result<()> {
        // 3. The block device.
        let dev = match self.attach_kernel(s).await {
            Some(dev) => dev?,
            None => self.attach_fuse(s).await?,
        };
        self.format_and_mount(s, &dev, read_only, flags).await
    }

    /// Step 3 with the kernel nbd driver; `None` when it is not used (not
    /// available, or `auto` and the kernel attach failed: nothing is left
    /// attached, nbdfuse + loop takes over).
    async fn attach_kernel(&self, s: &mut Staged) -> Option<Result<String>> {
        if !self.kernel_nbd {
            return None;
        }
        let id = s.volume_id.clone();
        let socket = s.nbd_socket();
        let conns = std::thread::available_parallelism().map_or(1, |n| n.get().min(4));
        let name = id.clone();
        let attached =
            tokio::task::spawn_blocking(move || crate::nbd_kernel::attach(&socket, &name, conns))
                .await
                .map_err(|e| anyhow::anyhow!("kernel nbd attach task: {e}"))
                .and_then(|r| r);
        let index = match attached {
            Ok((index, export)) => {
                tracing::info!(volume = %id, device = index, size = export.size, "kernel nbd attached");
                index
            }
            Err(e) if self.cfg.attacher == Attacher::Auto => {
                tracing::warn!(volume = %id, "kernel nbd attach failed, using FUSE + loop: {e:#}");
                return None;
            }
            Err(e) => {
                return Some(Err(Error::Internal(format!(
                    "volume {id}: kernel nbd attach: {e:#}"
                ))))
            }
        };
        s.nbd_index = Some(index);
        if let Err(e) = self.save(s) {
            return Some(Err(e));
        }
        // The device node appears through devtmpfs/udev.
        let dev = crate::nbd_kernel::device_path(index);
        let deadline = Instant::now() + Duration::from_secs(5);
        while !dev.exists() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if !dev.exists() {
            return Some(Err(Error::Internal(format!(
                "volume {id}: {} did not appear",
                dev.display()
            ))));
        }
        Some(Ok(dev.display().to_string()))
    }

    /// Step 3 with a FUSE NBD client (built in, or `nbdfuse`) + a loop
    /// device.
    async fn attach_fuse(&self, s: &mut Staged) -> Result<String> {
        let id = s.volume_id.clone();
        let fuse = s.fuse_dir();
        std::fs::create_dir_all(&fuse)
            .map_err(|e| Error::internal(format!("creating {}", fuse.display()), e))?;
        let pidfile = s.run_dir.join("fuse.pid");
        let flog_path = s.run_dir.join("fuse.log");
        let flog = std::fs::File::create(&flog_path)
            .map_err(|e| Error::internal(flog_path.display(), e))?;
        let ferr = flog
            .try_clone()
            .map_err(|e| Error::internal(flog_path.display(), e))?;
        let mut cmd = if self.cfg.attacher == Attacher::Nbdfuse {
            let uri = format!("nbd+unix:///{id}?socket={}", s.nbd_socket().display());
            let mut c = std::process::Command::new("nbdfuse");
            c.arg("-P").arg(&pidfile).arg(&fuse).arg(&uri);
            c
        } else {
            let exe = std::env::current_exe()
                .map_err(|e| Error::internal("locating the tandem-csi binary", e))?;
            let mut c = std::process::Command::new(exe);
            c.arg("fuse-nbd")
                .arg("--socket")
                .arg(s.nbd_socket())
                .arg("--export")
                .arg(&id)
                .arg("--pidfile")
                .arg(&pidfile)
                .arg(&fuse);
            c
        };
        let what = if self.cfg.attacher == Attacher::Nbdfuse {
            "nbdfuse"
        } else {
            "tandem-csi fuse-nbd"
        };
        let child = cmd
            .stdin(Stdio::null())
            .stdout(flog)
            .stderr(ferr)
            .process_group(0)
            .spawn()
            .map_err(|e| Error::internal(format!("starting {what}"), e))?;
        s.nbdfuse_pid = Some(child.id());
        self.save(s)?;
        let file = fuse.join("nbd");
        wait_ready(child.id(), &flog_path, what, || {
            pidfile.exists() && file.exists()
        })
        .await?;
        let file_s = file.display().to_string();
        // --direct-io: the loop device reads and writes the FUSE file
        // with O_DIRECT, past the page cache, so a block another Primary
        // wrote (dual-primary) is never served stale from this node's cache.
        let dev = sys::run("losetup", &["--find", "--show", "--direct-io=on", &file_s])
            .await?
            .trim()
            .to_string();
        if !dev.starts_with("/dev/loop") {
            return Err(Error::Internal(format!("losetup printed {dev:?}")));
        }
        s.loop_dev = Some(dev.clone());
        self.save(s)?;
        Ok(dev)
    }

    /// Step 4: format a blank filesystem volume and mount it.
    async fn format_and_mount(
        &self,
        s: &mut Staged,
        dev: &str,
        read_only: bool,
        flags: &[String],
    ) -> Result<()> {
        let id = s.volume_id.clone();
        let dev = dev.to_string();
        if let Some(fs) = s.fs_type.clone() {
            let found = sys::output("blkid", &["-p", "-o", "value", "-s", "TYPE", &dev]).await?;
            let existing = String::from_utf8_lossy(&found.stdout).trim().to_string();
            match found.status.code() {
                Some(0) if !existing.is_empty() => {
                    if existing != fs {
                        return Err(Error::FailedPrecondition(format!(
                            "volume {id} holds a {existing} filesystem, not {fs}"
                        )));
                    }
                    // The volume may have grown since the filesystem was
                    // made (offline expansion): grow ext4 before mounting.
                    if fs == "ext4" && !read_only {
                        grow_fs(&id, &fs, &dev, &s.staging_path, false).await?;
                    }
                }
                Some(0) | Some(2) => {
                    tracing::info!(volume = %id, fs, "blank volume: creating the filesystem");
                    let mkfs = format!("mkfs.{fs}");
                    let args: Vec<&str> = match fs.as_str() {
                        "ext4" => vec!["-q", "-F", &dev],
                        _ => vec!["-q", &dev],
                    };
                    sys::run(&mkfs, &args).await?;
                }
                _ => {
                    return Err(Error::Internal(format!(
                        "blkid {dev}: {}: {}",
                        found.status,
                        String::from_utf8_lossy(&found.stderr).trim()
                    )))
                }
            }
            std::fs::create_dir_all(&s.staging_path).map_err(|e| {
                Error::internal(format!("creating {}", s.staging_path.display()), e)
            })?;
            let mut opts: Vec<String> = flags.to_vec();
            if read_only {
                opts.push("ro".into());
            }
            let staging = s.staging_path.display().to_string();
            let mut args: Vec<&str> = vec!["-t", &fs];
            let joined = opts.join(",");
            if !opts.is_empty() {
                args.extend(["-o", &joined]);
            }
            args.extend([dev.as_str(), staging.as_str()]);
            s.mounted = true; // recorded first: unstage checks the mount table anyway
            self.save(s)?;
            sys::run("mount", &args).await?;
            if fs == "xfs" && !read_only && !existing.is_empty() {
                grow_fs(&id, &fs, &dev, &s.staging_path, true).await?;
            }
        }
        Ok(())
    }

    /// The size the volume's `tandemd` serves (`tandemctl status`).
    async fn tandemd_size(&self, s: &Staged) -> Result<u64> {
        let admin = s.admin_socket().display().to_string();
        let out = sys::run(
            &self.cfg.tandemctl.display().to_string(),
            &["status", "--json", "--admin-socket", &admin],
        )
        .await?;
        let v: serde_json::Value = serde_json::from_str(&out)
            .map_err(|e| Error::internal("tandemctl status --json", e))?;
        v["exports"]
            .as_array()
            .and_then(|a| a.iter().find(|e| e["name"] == s.volume_id.as_str()))
            .and_then(|e| e["size"].as_u64())
            .ok_or_else(|| {
                Error::Internal(format!(
                    "tandemctl status names no export {} with a size",
                    s.volume_id
                ))
            })
    }

    /// Grows the volume's `tandemd` online (`tandemctl resize`).
    async fn tandemd_grow(&self, s: &Staged, size: u64) -> Result<()> {
        let admin = s.admin_socket().display().to_string();
        let size_s = size.to_string();
        sys::run(
            &self.cfg.tandemctl.display().to_string(),
            &["resize", &s.volume_id, &size_s, "--admin-socket", &admin],
        )
        .await?;
        tracing::info!(volume = %s.volume_id, size, "replica grown");
        Ok(())
    }

    /// NodeExpandVolume: grows the volume's `tandemd` online (`tandemctl
    /// resize`; a replicated volume's Primary grows every replica, R29),
    /// then the device in place ([`NodeService::grow_device`]; an nbdfuse
    /// device cannot: `FAILED_PRECONDITION`, the replica grown for the next
    /// stage), then the filesystem (`resize2fs`, `xfs_growfs`, both
    /// online). A device already large enough (staged after an offline
    /// expansion) only has its filesystem checked.
    async fn expand(&self, req: csi::NodeExpandVolumeRequest) -> Result<u64> {
        let id = self.volume_id(&req.volume_id)?;
        let path = PathBuf::from(required("volume_path", &req.volume_path)?);
        let want = match &req.capacity_range {
            Some(r) if r.required_bytes != 0 || r.limit_bytes != 0 => {
                Some(crate::params::size_for(Some(r))?)
            }
            _ => None,
        };
        let _guard = self.inflight.begin(id, "NodeExpandVolume")?;
        let s = self
            .load(id)?
            .filter(|s| s.complete)
            .ok_or_else(|| Error::NotFound(format!("volume {id} is not staged on this node")))?;
        if path != s.staging_path && !s.targets.contains(&path) {
            return Err(Error::NotFound(format!(
                "volume_path {}: volume {id} is neither staged nor published there",
                path.display()
            )));
        }
        let dev = s
            .device()
            .ok_or_else(|| Error::Internal(format!("volume {id}: staged without a device")))?;
        let mut have = sys::size_of(Path::new(&dev))?;
        if let Some(want) = want.filter(|w| *w > have) {
            if self.tandemd_size(&s).await? < want {
                self.tandemd_grow(&s, want).await?;
            }
            self.grow_device(&s, &dev, have, want).await?;
            have = sys::size_of(Path::new(&dev))?;
            if have < want {
                return Err(Error::Internal(format!(
                    "volume {id}: {dev} is {have} bytes after growing to {want}"
                )));
            }
            tracing::info!(volume = %id, device = %dev, size = have, "device grown online");
        }
        if let Some(fs) = &s.fs_type {
            grow_fs(id, fs, &dev, &s.staging_path, true).await?;
        }
        Ok(have)
    }

    /// Grows the staged device `dev` (of `have` bytes) to `want` bytes in
    /// place, its `tandemd` already grown: the kernel nbd device with
    /// `NBD_CMD_RECONFIGURE`; the built-in FUSE file by truncating it (it
    /// takes the export's new size), then the loop device re-reads it. An
    /// nbdfuse device cannot grow: `FAILED_PRECONDITION`.
    async fn grow_device(&self, s: &Staged, dev: &str, have: u64, want: u64) -> Result<()> {
        let id = &s.volume_id;
        let failed = |what: String| {
            Error::FailedPrecondition(format!(
                "volume {id}: its replica is grown to {want} bytes, but growing {what}; \
                 unstage and stage it again"
            ))
        };
        if let Some(index) = s.nbd_index {
            return tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
                crate::nbd_kernel::Nbd::open()?.resize(index, want)
            })
            .await
            .map_err(|e| Error::Internal(format!("kernel nbd resize task: {e}")))?
            .map_err(|e| failed(format!("{dev} failed: {e:#}")));
        }
        let builtin = s
            .nbdfuse_pid
            .is_some_and(|pid| sys::process_matches(pid, "fuse-nbd"));
        if !builtin {
            return Err(Error::FailedPrecondition(format!(
                "volume {id} is in use as {dev} of {have} bytes: its replica is grown to \
                 {want} bytes, but the nbdfuse + loop device cannot change size while \
                 staged; unstage and stage it again (or run the node plugin with \
                 --attacher auto or fuse, whose devices grow online)"
            )));
        }
        let file = s.fuse_dir().join(crate::fuse_nbd::FILE_NAME);
        tokio::task::spawn_blocking(move || {
            std::fs::OpenOptions::new()
                .write(true)
                .open(&file)
                .and_then(|f| f.set_len(want))
        })
        .await
        .map_err(|e| Error::Internal(format!("growing the FUSE file: {e}")))?
        .map_err(|e| failed(format!("the FUSE file failed: {e}")))?;
        sys::run("losetup", &["-c", dev]).await?;
        Ok(())
    }

    /// Undoes whatever a staged record says exists, in reverse order, then
    /// removes the record. Safe to repeat.
    async fn teardown(&self, s: Staged) -> Result<()> {
        let id = s.volume_id.clone();
        if s.mounted || s.fs_type.is_some() {
            sys::unmount_all(&s.staging_path).await?;
        }
        // Kernel nbd devices of this volume: the recorded one, and any a
        // crash left before its index was recorded (they name the volume as
        // their backend).
        let mut nbd: Vec<u32> = s.nbd_index.into_iter().collect();
        nbd.extend(crate::nbd_kernel::devices_serving(&id));
        nbd.sort_unstable();
        nbd.dedup();
        for index in nbd {
            if crate::nbd_kernel::serves(index, &id) {
                let v = id.clone();
                tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
                    crate::nbd_kernel::Nbd::open()?.disconnect(index)?;
                    crate::nbd_kernel::wait_disconnected(index, &v, Duration::from_secs(10))
                })
                .await
                .map_err(|e| Error::Internal(format!("kernel nbd disconnect task: {e}")))?
                .map_err(|e| {
                    Error::FailedPrecondition(format!(
                        "volume {id}: disconnecting /dev/nbd{index}: {e:#}; retry NodeUnstageVolume"
                    ))
                })?;
                tracing::info!(volume = %id, device = index, "kernel nbd disconnected");
            }
        }
        if let Some(dev) = &s.loop_dev {
            if sys::loop_backing_file(dev).is_some_and(|b| b == s.fuse_dir().join("nbd")) {
                sys::run("losetup", &["-d", dev]).await?;
                // A device still open (udev probing it, a stale user) is
                // detached when released: give that a moment.
                for _ in 0..100 {
                    if sys::loop_backing_file(dev).is_none() {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                if sys::loop_backing_file(dev).is_some() {
                    return Err(Error::FailedPrecondition(format!(
                        "volume {id}: {dev} is still in use (published somewhere?); it detaches \
                         when released, retry NodeUnstageVolume"
                    )));
                }
            }
        }
        let fuse = s.fuse_dir();
        if sys::is_mount_point(&fuse)? {
            let f = fuse.display().to_string();
            if sys::run("fusermount3", &["-u", &f]).await.is_err() {
                sys::run("fusermount3", &["-u", "-z", &f]).await?;
            }
        }
        if let Some(pid) = s.nbdfuse_pid {
            // Either FUSE server has the mount point on its command line.
            let needle = fuse.display().to_string();
            sys::stop_process(pid, &needle, Duration::from_secs(5)).await;
            sys::reap(pid as libc::pid_t); // if it had died already
        }
        if s.replica_dir.is_some() {
            // The agent's tandemd keeps running, as Secondary again.
            match &self.agent {
                Some(a) => a.demote(&id).await?,
                None => {
                    return Err(Error::FailedPrecondition(format!(
                        "volume {id} was staged through the replica agent, but this node plugin \
                         runs without --store"
                    )))
                }
            }
        } else if let Some(pid) = s.tandemd_pid {
            sys::stop_process(pid, &id, STOP_GRACE).await;
            sys::reap(pid as libc::pid_t);
        }
        match std::fs::remove_dir_all(&s.run_dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(Error::internal(
                    format!("removing {}", s.run_dir.display()),
                    e,
                ))
            }
        }
        match std::fs::remove_file(self.record_path(&id)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::internal("removing staged record", e)),
        }
    }

    async fn unstage(&self, req: csi::NodeUnstageVolumeRequest) -> Result<()> {
        let id = self.volume_id(&req.volume_id)?;
        let staging = PathBuf::from(required("staging_target_path", &req.staging_target_path)?);
        let _guard = self.inflight.begin(id, "NodeUnstageVolume")?;
        match self.load(id)? {
            Some(s) => {
                let published = mounted_targets(&s)?;
                if !published.is_empty() {
                    return Err(Error::FailedPrecondition(format!(
                        "volume {id} is still published at {}; unpublish it first",
                        published.join(", ")
                    )));
                }
                self.teardown(s).await?;
                tracing::info!(volume = %id, "unstaged");
            }
            None => sys::unmount_all(&staging).await?,
        }
        Ok(())
    }

    async fn publish(&self, req: csi::NodePublishVolumeRequest) -> Result<()> {
        let id = self.volume_id(&req.volume_id)?;
        let target = PathBuf::from(required("target_path", &req.target_path)?);
        let staging = PathBuf::from(required("staging_target_path", &req.staging_target_path)?);
        let cap = Capability::parse(
            req.volume_capability
                .as_ref()
                .ok_or_else(|| Error::InvalidArgument("volume_capability is required".into()))?,
        )?;
        let _guard = self.inflight.begin(id, "NodePublishVolume")?;
        let mut s = self
            .load(id)?
            .filter(|s| s.complete)
            .ok_or_else(|| Error::FailedPrecondition(format!("volume {id} is not staged")))?;
        if s.staging_path != staging {
            return Err(Error::InvalidArgument(format!(
                "staging_target_path {} differs from where {id} is staged ({})",
                staging.display(),
                s.staging_path.display()
            )));
        }
        if s.block != (cap.access == Access::Block) {
            return Err(Error::InvalidArgument(format!(
                "volume {id} is staged as {} but published as {}",
                if s.block { "block" } else { "filesystem" },
                if s.block { "filesystem" } else { "block" }
            )));
        }
        if sys::is_mount_point(&target)? {
            return Ok(());
        }
        let source = if s.block {
            let dev = s
                .device()
                .ok_or_else(|| Error::Internal(format!("volume {id}: staged without a device")))?;
            if let Some(parent) = target.parent() {
                std::fs::create_dir_all(parent)
                    .map_err(|e| Error::internal(format!("creating {}", parent.display()), e))?;
            }
            std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&target)
                .map_err(|e| Error::internal(format!("creating {}", target.display()), e))?;
            dev
        } else {
            std::fs::create_dir_all(&target)
                .map_err(|e| Error::internal(format!("creating {}", target.display()), e))?;
            s.staging_path.display().to_string()
        };
        let t = target.display().to_string();
        if !s.targets.contains(&target) {
            s.targets.push(target.clone());
            self.save(&s)?;
        }
        sys::run("mount", &["--bind", &source, &t]).await?;
        if req.readonly || cap.read_only {
            if let Err(e) = sys::run("mount", &["-o", "remount,bind,ro", &t]).await {
                let _ = sys::unmount_all(&target).await;
                return Err(e);
            }
        }
        tracing::info!(volume = %id, target = %t, readonly = req.readonly, "published");
        Ok(())
    }

    async fn unpublish(&self, req: csi::NodeUnpublishVolumeRequest) -> Result<()> {
        let id = self.volume_id(&req.volume_id)?;
        let target = PathBuf::from(required("target_path", &req.target_path)?);
        let _guard = self.inflight.begin(id, "NodeUnpublishVolume")?;
        sys::unmount_all(&target).await?;
        let removed = match std::fs::symlink_metadata(&target) {
            Ok(m) if m.is_dir() => std::fs::remove_dir(&target),
            Ok(_) => std::fs::remove_file(&target),
            Err(_) => Ok(()),
        };
        removed.map_err(|e| Error::internal(format!("removing {}", target.display()), e))?;
        if let Some(mut s) = self.load(id)? {
            if s.targets.contains(&target) {
                s.targets.retain(|t| *t != target);
                self.save(&s)?;
            }
        }
        Ok(())
    }

    fn stats(
        &self,
        req: csi::NodeGetVolumeStatsRequest,
    ) -> Result<csi::NodeGetVolumeStatsResponse> {
        let id = self.volume_id(&req.volume_id)?;
        let path = PathBuf::from(required("volume_path", &req.volume_path)?);
        let s = self
            .load(id)?
            .filter(|s| s.complete)
            .ok_or_else(|| Error::NotFound(format!("volume {id} is not staged on this node")))?;
        let meta = std::fs::metadata(&path)
            .map_err(|e| Error::NotFound(format!("volume_path {}: {e}", path.display())))?;
        use std::os::unix::fs::FileTypeExt;
        let usage = if meta.file_type().is_block_device() {
            vec![csi::VolumeUsage {
                total: sys::size_of(&path)? as i64,
                unit: csi::volume_usage::Unit::Bytes as i32,
                ..Default::default()
            }]
        } else {
            let ([total, avail, used], [inodes, ifree, iused]) = sys::fs_usage(&path)?;
            vec![
                csi::VolumeUsage {
                    available: avail as i64,
                    total: total as i64,
                    used: used as i64,
                    unit: csi::volume_usage::Unit::Bytes as i32,
                },
                csi::VolumeUsage {
                    available: ifree as i64,
                    total: inodes as i64,
                    used: iused as i64,
                    unit: csi::volume_usage::Unit::Inodes as i32,
                },
            ]
        };
        let problems = problems(&s)?;
        Ok(csi::NodeGetVolumeStatsResponse {
            usage,
            volume_condition: Some(csi::VolumeCondition {
                abnormal: !problems.is_empty(),
                message: if problems.is_empty() {
                    "ok".into()
                } else {
                    problems.join("; ")
                },
            }),
        })
    }
}

/// Grows the filesystem on `dev` to the device's size when it is smaller:
/// ext4 with `resize2fs` (offline after `e2fsck -f -p` when not `mounted`;
/// online needs `CAP_SYS_RESOURCE`), xfs with `xfs_growfs` on the mounted
/// `staging` path. Returns whether it grew anything.
async fn grow_fs(id: &str, fs: &str, dev: &str, staging: &Path, mounted: bool) -> Result<bool> {
    match fs {
        "ext4" => {
            let dev_bytes = sys::size_of(Path::new(dev))?;
            let head = sys::run("dumpe2fs", &["-h", dev]).await?;
            let field = |name: &str| {
                head.lines()
                    .find_map(|l| l.strip_prefix(name))
                    .and_then(|v| v.trim().parse::<u64>().ok())
            };
            let (Some(blocks), Some(bsize)) = (field("Block count:"), field("Block size:")) else {
                return Err(Error::Internal(format!(
                    "dumpe2fs -h {dev}: no block count or block size"
                )));
            };
            if blocks.saturating_add(1).saturating_mul(bsize) > dev_bytes {
                return Ok(false);
            }
            if !mounted {
                // resize2fs wants a freshly checked filesystem; exit 1 means
                // errors were fixed.
                let out = sys::output("e2fsck", &["-f", "-p", dev]).await?;
                if !matches!(out.status.code(), Some(0 | 1)) {
                    return Err(Error::FailedPrecondition(format!(
                        "volume {id}: e2fsck -f -p {dev} before growing: {}: {}",
                        out.status,
                        String::from_utf8_lossy(&out.stdout).trim()
                    )));
                }
            }
            sys::run("resize2fs", &[dev]).await?;
        }
        "xfs" => {
            let staging = staging.display().to_string();
            let before = sys::fs_usage(Path::new(&staging))?.0[0];
            sys::run("xfs_growfs", &[&staging]).await?;
            if sys::fs_usage(Path::new(&staging))?.0[0] <= before {
                return Ok(false);
            }
        }
        other => {
            return Err(Error::Internal(format!(
                "volume {id}: do not know how to grow a {other} filesystem"
            )))
        }
    }
    tracing::info!(volume = %id, fs, device = %dev, "filesystem grown to the device size");
    Ok(true)
}

/// Target paths of a staged volume that are still mounted.
fn mounted_targets(s: &Staged) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for t in &s.targets {
        if sys::is_mount_point(t)? {
            out.push(t.display().to_string());
        }
    }
    Ok(out)
}

/// What is wrong with a completely staged volume (empty when healthy):
/// its `tandemd` or `nbdfuse` died, its loop device is gone or points
/// elsewhere, its filesystem is not mounted.
fn problems(s: &Staged) -> Result<Vec<String>> {
    let mut p = Vec::new();
    if !s
        .tandemd_pid
        .is_some_and(|pid| sys::process_matches(pid, &s.volume_id))
    {
        p.push("tandemd is not running".to_string());
    }
    if let Some(index) = s.nbd_index {
        if !crate::nbd_kernel::serves(index, &s.volume_id) {
            p.push(format!(
                "/dev/nbd{index} is no longer connected to the volume"
            ));
        }
    } else {
        let fuse = s.fuse_dir().display().to_string();
        if !s
            .nbdfuse_pid
            .is_some_and(|pid| sys::process_matches(pid, &fuse))
        {
            p.push("the FUSE NBD client is not running".to_string());
        }
        match &s.loop_dev {
            Some(dev) if sys::loop_backing_file(dev) == Some(s.fuse_dir().join("nbd")) => {}
            Some(dev) => p.push(format!("{dev} is no longer attached to the volume")),
            None => p.push("no loop device".to_string()),
        }
    }
    if s.fs_type.is_some() && !sys::is_mount_point(&s.staging_path)? {
        p.push(format!("{} is not mounted", s.staging_path.display()));
    }
    Ok(p)
}

/// Waits until `ready()` holds, failing early (with the log's tail) if the
/// process `pid` exits.
pub(crate) async fn wait_ready(
    pid: u32,
    log: &Path,
    what: &str,
    mut ready: impl FnMut() -> bool,
) -> Result<()> {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if ready() {
            return Ok(());
        }
        let mut status = 0;
        // SAFETY: waitpid on our own child with WNOHANG.
        let rc = unsafe { libc::waitpid(pid as libc::pid_t, &mut status, libc::WNOHANG) };
        let tail = || {
            let t = std::fs::read_to_string(log).unwrap_or_default();
            let lines: Vec<&str> = t.lines().rev().take(10).collect();
            lines.into_iter().rev().collect::<Vec<_>>().join("\n")
        };
        if rc == pid as libc::pid_t {
            return Err(Error::Internal(format!(
                "{what} exited before it was ready:\n{}",
                tail()
            )));
        }
        if Instant::now() >= deadline {
            return Err(Error::Internal(format!(
                "{what} not ready within {READY_TIMEOUT:?}:\n{}",
                tail()
            )));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn rpc(t: RpcType) -> csi::NodeServiceCapability {
    csi::NodeServiceCapability {
        r#type: Some(CapType::Rpc(Rpc { r#type: t as i32 })),
    }
}

#[tonic::async_trait]
impl Node for NodeService {
    async fn node_stage_volume(
        &self,
        request: Request<csi::NodeStageVolumeRequest>,
    ) -> std::result::Result<Response<csi::NodeStageVolumeResponse>, Status> {
        let r = self.stage(request.into_inner()).await;
        reply(
            "NodeStageVolume",
            r.map(|()| csi::NodeStageVolumeResponse {}),
        )
    }

    async fn node_unstage_volume(
        &self,
        request: Request<csi::NodeUnstageVolumeRequest>,
    ) -> std::result::Result<Response<csi::NodeUnstageVolumeResponse>, Status> {
        let r = self.unstage(request.into_inner()).await;
        reply(
            "NodeUnstageVolume",
            r.map(|()| csi::NodeUnstageVolumeResponse {}),
        )
    }

    async fn node_publish_volume(
        &self,
        request: Request<csi::NodePublishVolumeRequest>,
    ) -> std::result::Result<Response<csi::NodePublishVolumeResponse>, Status> {
        let r = self.publish(request.into_inner()).await;
        reply(
            "NodePublishVolume",
            r.map(|()| csi::NodePublishVolumeResponse {}),
        )
    }

    async fn node_unpublish_volume(
        &self,
        request: Request<csi::NodeUnpublishVolumeRequest>,
    ) -> std::result::Result<Response<csi::NodeUnpublishVolumeResponse>, Status> {
        let r = self.unpublish(request.into_inner()).await;
        reply(
            "NodeUnpublishVolume",
            r.map(|()| csi::NodeUnpublishVolumeResponse {}),
        )
    }

    async fn node_get_volume_stats(
        &self,
        request: Request<csi::NodeGetVolumeStatsRequest>,
    ) -> std::result::Result<Response<csi::NodeGetVolumeStatsResponse>, Status> {
        reply("NodeGetVolumeStats", self.stats(request.into_inner()))
    }

    async fn node_expand_volume(
        &self,
        request: Request<csi::NodeExpandVolumeRequest>,
    ) -> std::result::Result<Response<csi::NodeExpandVolumeResponse>, Status> {
        let r = self.expand(request.into_inner()).await;
        reply(
            "NodeExpandVolume",
            r.map(|bytes| csi::NodeExpandVolumeResponse {
                capacity_bytes: i64::try_from(bytes).unwrap_or(i64::MAX),
            }),
        )
    }

    async fn node_get_capabilities(
        &self,
        _request: Request<csi::NodeGetCapabilitiesRequest>,
    ) -> std::result::Result<Response<csi::NodeGetCapabilitiesResponse>, Status> {
        Ok(Response::new(csi::NodeGetCapabilitiesResponse {
            capabilities: [
                RpcType::StageUnstageVolume,
                RpcType::GetVolumeStats,
                RpcType::VolumeCondition,
                RpcType::ExpandVolume,
            ]
            .into_iter()
            .map(rpc)
            .collect(),
        }))
    }

    async fn node_get_info(
        &self,
        _request: Request<csi::NodeGetInfoRequest>,
    ) -> std::result::Result<Response<csi::NodeGetInfoResponse>, Status> {
        let mut segments: HashMap<String, String> = self
            .cfg
            .topology
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        segments.insert(NODE_TOPOLOGY_KEY.to_string(), self.cfg.node_id.clone());
        Ok(Response::new(csi::NodeGetInfoResponse {
            node_id: self.cfg.node_id.clone(),
            max_volumes_per_node: 0,
            accessible_topology: Some(csi::Topology { segments }),
        }))
    }
}
