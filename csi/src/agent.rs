//! The node replica agent: realises every replica the volume records place
//! on this node, whether or not the CO ever stages the volume here.
//!
//! A reconcile pass (at start, then every [`RECONCILE_EVERY`], and on
//! demand from NodeStageVolume) reads the records through the
//! [`VolumeStore`] and, for each replicated record
//! ([`VolumeRecord::replicated`]) listing this node:
//!
//! 1. creates the backing `DATA/<id>.img` with the volume's UUID unless it
//!    exists (every replica of a new volume is UpToDate: all zeroes);
//! 2. writes `STATE/rep/<id>/tandemd.toml`: the export with an
//!    `[export.replication]` table (this node's name and address from the
//!    record, the node certificate, every other replica as a peer, role
//!    Secondary, the volume's protocol and `allow_two_primaries`);
//! 3. keeps a `tandemd` running on it (NBD and admin sockets in the same
//!    directory, its own process group so it outlives a plugin restart),
//!    restarting it when it died.
//!
//! The volume's diskless clients (remote attach: published nodes without a
//! replica, [`VolumeRecord::clients`]) are peers of every replica too,
//! marked `diskless`. On a client's node the agent runs the client's
//! `tandemd` the same way, in the same directory layout: an export with no
//! backing (`diskless = true`, the volume's UUID and size), every replica
//! as a peer (R28). A configuration that changed (a client added or
//! removed) restarts `tandemd` only while the volume is not staged on this
//! node: the controller attaches a client only while the volume is
//! attached nowhere else, so no replica is Primary then.
//!
//! A replica directory whose record is gone, is `Deleting` or no longer
//! lists this node is removed: `tandemd` stopped, backing deleted, then the
//! directory (which marks the replica as the agent's to remove). A replica
//! (or client) still staged on this node is kept until it is unstaged.
//!
//! Role changes are NodeStage's and NodeUnstage's (`tandemctl promote` /
//! `demote` on the admin socket, see [`Agent::promote`]).

use std::collections::BTreeSet;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::error::{Error, Result};
use crate::store::{valid_id, VolumeRecord, VolumeState, VolumeStore};
use crate::sys;

/// How often the agent reconciles.
pub const RECONCILE_EVERY: Duration = Duration::from_secs(1);
/// How long a promotion waits for the peers to connect and agree.
const PEER_WAIT: Duration = Duration::from_secs(20);
/// How long `tandemd` gets to flush and exit after SIGTERM.
const STOP_GRACE: Duration = Duration::from_secs(20);

/// The node certificate and the cluster CA the replicas authenticate with.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// Cluster CA certificate.
    pub ca: PathBuf,
    /// This node's certificate (its SAN is the node id).
    pub cert: PathBuf,
    /// Its private key.
    pub key: PathBuf,
}

/// What the agent needs to know about its node.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// This node's id: the replica's `node` name, the certificate's SAN.
    pub node_id: String,
    /// Staged records (`STATE/staged`) and replica directories (`STATE/rep`).
    pub state_dir: PathBuf,
    /// Backing files.
    pub data_dir: PathBuf,
    /// The `tandemd` binary.
    pub tandemd: PathBuf,
    /// The `tandemctl` binary.
    pub tandemctl: PathBuf,
    /// Node certificate; required to run replicated volumes.
    pub tls: Option<TlsFiles>,
}

/// A running replica's `tandemd`.
#[derive(Debug, Clone)]
pub struct Running {
    /// Its pid.
    pub pid: u32,
    /// Its replica directory (`STATE/rep/<id>`).
    pub dir: PathBuf,
}

impl Running {
    /// The NBD unix socket.
    pub fn nbd_socket(&self) -> PathBuf {
        self.dir.join("nbd.sock")
    }
    /// The admin socket.
    pub fn admin_socket(&self) -> PathBuf {
        self.dir.join("admin.sock")
    }
}

/// The replica agent of one node.
pub struct Agent {
    cfg: AgentConfig,
    store: Arc<dyn VolumeStore>,
    /// Serialises reconcile passes with the stage/unstage calls into them.
    lock: tokio::sync::Mutex<()>,
    /// The last error per volume, logged once rather than every second.
    last_error: std::sync::Mutex<std::collections::HashMap<String, String>>,
    /// Data size of each replica's backing, as last read or set.
    sizes: std::sync::Mutex<std::collections::HashMap<String, u64>>,
}

#[derive(Serialize)]
struct TandemdToml {
    export: Vec<ExportToml>,
}

#[derive(Serialize)]
struct ExportToml {
    name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    backing: Option<String>,
    /// A diskless client (R28): no backing; `uuid` and `size` given.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    diskless: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    uuid: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    size: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    replication: Option<ReplicationToml>,
}

#[derive(Serialize)]
struct ReplicationToml {
    node: String,
    listen: String,
    cert: String,
    key: String,
    ca: String,
    role: String,
    protocol: String,
    allow_two_primaries: bool,
    peers: Vec<PeerToml>,
    #[serde(skip_serializing_if = "Option::is_none")]
    witness: Option<PeerToml>,
    #[serde(skip_serializing_if = "Option::is_none")]
    auto_failover: Option<bool>,
}

#[derive(Serialize)]
struct PeerToml {
    name: String,
    address: String,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    diskless: bool,
}

/// What this node is for a volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Member {
    /// It holds one of the replicas.
    Replica,
    /// It uses the volume without a replica (remote attach, R28).
    Client,
}

/// What `node` is for the volume of `rec`, if anything but the witness.
pub fn member(rec: &VolumeRecord, node: &str) -> Option<Member> {
    if rec.replicas.iter().any(|r| r.node == node) {
        Some(Member::Replica)
    } else if rec.clients.iter().any(|c| c.node == node) {
        Some(Member::Client)
    } else {
        None
    }
}

impl Agent {
    /// An agent reading records from `store`.
    pub fn new(cfg: AgentConfig, store: Arc<dyn VolumeStore>) -> anyhow::Result<Agent> {
        let rep = cfg.state_dir.join("rep");
        std::fs::create_dir_all(&rep)
            .map_err(|e| anyhow::anyhow!("creating {}: {e}", rep.display()))?;
        Ok(Agent {
            cfg,
            store,
            lock: tokio::sync::Mutex::new(()),
            last_error: Default::default(),
            sizes: Default::default(),
        })
    }

    /// The record of volume `id` if the agents replicate it (every replica
    /// has a replication address).
    pub fn replicated_record(&self, id: &str) -> Result<Option<VolumeRecord>> {
        Ok(self.store.get(id)?.filter(|r| r.replicated()))
    }

    /// Reconciles forever, every [`RECONCILE_EVERY`].
    pub async fn run(self: Arc<Self>) {
        loop {
            if let Err(e) = self.reconcile().await {
                tracing::warn!("replica agent: {e}");
            }
            tokio::time::sleep(RECONCILE_EVERY).await;
        }
    }

    fn replica_dir(&self, id: &str) -> PathBuf {
        self.cfg.state_dir.join("rep").join(id)
    }

    fn backing(&self, id: &str) -> PathBuf {
        self.cfg.data_dir.join(format!("{id}.img"))
    }

    fn staged(&self, id: &str) -> bool {
        self.cfg
            .state_dir
            .join("staged")
            .join(format!("{id}.json"))
            .exists()
    }

    /// One pass: realise every replica the records place here, remove the
    /// ones no record wants. A store that cannot be read removes nothing.
    pub async fn reconcile(&self) -> Result<()> {
        let _l = self.lock.lock().await;
        let records = self.store.list()?;
        let mut wanted = BTreeSet::new();
        for rec in &records {
            if rec.state == VolumeState::Deleting || !rec.replicated() {
                continue;
            }
            let result = if member(rec, &self.cfg.node_id).is_some() {
                wanted.insert(rec.id.clone());
                self.ensure_locked(rec, false).await.map(|_| ())
            } else if self.is_witness(rec) {
                wanted.insert(rec.id.clone());
                self.ensure_witness(rec).await
            } else {
                continue;
            };
            self.note(&rec.id, result);
        }
        let dir = self.cfg.state_dir.join("rep");
        let rd = std::fs::read_dir(&dir).map_err(|e| Error::internal(dir.display(), e))?;
        for entry in rd.flatten() {
            let Some(id) = entry.file_name().to_str().map(str::to_string) else {
                continue;
            };
            if !valid_id(&id) || wanted.contains(&id) {
                continue;
            }
            if self.staged(&id) {
                tracing::warn!(volume = %id, "replica no longer wanted here but still staged; removing it after NodeUnstageVolume");
                continue;
            }
            let removed = self.remove_locked(&id).await;
            self.note(&id, removed);
        }
        Ok(())
    }

    /// Logs a reconcile error for volume `id` when it is new (a persistent
    /// one is logged once, not every pass), and its end.
    fn note(&self, id: &str, result: Result<()>) {
        let mut last = self.last_error.lock().unwrap_or_else(|e| e.into_inner());
        match result {
            Ok(()) => {
                if last.remove(id).is_some() {
                    tracing::info!(volume = %id, "replica agent: recovered");
                }
            }
            Err(e) => {
                let msg = e.to_string();
                if last.get(id) != Some(&msg) {
                    tracing::warn!(volume = %id, "replica agent: {msg}");
                    last.insert(id.to_string(), msg);
                }
            }
        }
    }

    /// Makes sure the replica (or client) of `rec` runs here with the
    /// record's configuration. NodeStage calls this rather than wait for the
    /// next pass, before it attaches a device: a changed configuration
    /// restarts `tandemd` even though the stage is already recorded.
    pub async fn ensure(&self, rec: &VolumeRecord) -> Result<Running> {
        let _l = self.lock.lock().await;
        self.ensure_locked(rec, true).await
    }

    fn config_text(&self, rec: &VolumeRecord) -> Result<String> {
        let node = &self.cfg.node_id;
        let client = match member(rec, node) {
            Some(m) => m == Member::Client,
            None => {
                return Err(Error::FailedPrecondition(format!(
                    "node {node} holds no replica of {} and is not its client",
                    rec.id
                )))
            }
        };
        let listen = if client {
            rec.clients
                .iter()
                .find(|c| &c.node == node)
                .map(|c| c.address)
        } else {
            rec.replicas
                .iter()
                .find(|r| &r.node == node)
                .and_then(|r| r.address)
        };
        // Every replica but this node, then (on a replica) the clients.
        let mut peers: Vec<PeerToml> = rec
            .replicas
            .iter()
            .filter(|r| &r.node != node)
            .map(|r| PeerToml {
                name: r.node.clone(),
                address: r.address.map(|a| a.to_string()).unwrap_or_default(),
                diskless: false,
            })
            .collect();
        if !client {
            peers.extend(rec.clients.iter().map(|c| PeerToml {
                name: c.node.clone(),
                address: c.address.to_string(),
                diskless: true,
            }));
        }
        let replication = if !peers.is_empty() {
            let tls = self.cfg.tls.as_ref().ok_or_else(|| {
                Error::FailedPrecondition(format!(
                    "volume {} is replicated but this node plugin has no --tls-ca/--tls-cert/--tls-key",
                    rec.id
                ))
            })?;
            let listen = listen.ok_or_else(|| {
                Error::Internal(format!("volume {}: no replication address", rec.id))
            })?;
            Some(ReplicationToml {
                node: self.cfg.node_id.clone(),
                listen: listen.to_string(),
                cert: tls.cert.display().to_string(),
                key: tls.key.display().to_string(),
                ca: tls.ca.display().to_string(),
                role: "secondary".into(),
                protocol: rec.params.protocol.as_str().to_string(),
                allow_two_primaries: rec.allow_two_primaries,
                peers,
                // A client takes no part in the witness's arbitration: it
                // completes a write only once every replica has it.
                witness: rec
                    .witness
                    .as_ref()
                    .zip(rec.witness_address)
                    .filter(|_| !client)
                    .map(|(name, a)| PeerToml {
                        name: name.clone(),
                        address: a.to_string(),
                        diskless: false,
                    }),
                // The CO decides where the volume is Primary (NodeStage);
                // the witness only arbitrates who may write alone. A replica
                // promoting itself would stay Primary with no stage to
                // demote it.
                auto_failover: (!client && rec.witness_address.is_some() && rec.witness.is_some())
                    .then_some(false),
            })
        } else {
            None
        };
        let cfg = TandemdToml {
            export: vec![ExportToml {
                name: rec.id.clone(),
                backing: (!client).then(|| self.backing(&rec.id).display().to_string()),
                diskless: client,
                uuid: client.then(|| rec.uuid.to_string()),
                size: client.then(|| rec.size.to_string()),
                replication,
            }],
        };
        toml::to_string(&cfg).map_err(|e| Error::internal("encoding tandemd.toml", e))
    }

    fn is_witness(&self, rec: &VolumeRecord) -> bool {
        rec.witness.as_deref() == Some(self.cfg.node_id.as_str()) && rec.witness_address.is_some()
    }

    /// Keeps this volume's `tandemd witness` running on this node (the
    /// record names it the witness): listening on the record's witness
    /// address, admitting the replica nodes, its state in the volume's
    /// directory.
    async fn ensure_witness(&self, rec: &VolumeRecord) -> Result<()> {
        let id = &rec.id;
        let dir = self.replica_dir(id);
        if self.running(id).is_some() {
            return Ok(());
        }
        let tls = self.cfg.tls.as_ref().ok_or_else(|| {
            Error::FailedPrecondition(format!(
                "this node is the witness of {id} but the node plugin has no --tls-ca/--tls-cert/--tls-key"
            ))
        })?;
        let listen = rec
            .witness_address
            .ok_or_else(|| Error::Internal(format!("volume {id}: no witness address")))?;
        std::fs::create_dir_all(&dir)
            .map_err(|e| Error::internal(format!("creating {}", dir.display()), e))?;
        let allow = rec
            .replicas
            .iter()
            .map(|r| r.node.as_str())
            .collect::<Vec<_>>()
            .join(",");
        let log_path = dir.join("witness.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| Error::internal(log_path.display(), e))?;
        let err_log = log
            .try_clone()
            .map_err(|e| Error::internal(log_path.display(), e))?;
        let child = std::process::Command::new(&self.cfg.tandemd)
            .arg("witness")
            .arg("--listen")
            .arg(listen.to_string())
            .arg("--allow")
            .arg(&allow)
            .arg("--cert")
            .arg(&tls.cert)
            .arg("--key")
            .arg(&tls.key)
            .arg("--ca")
            .arg(&tls.ca)
            .arg("--state")
            .arg(dir.join("witness.json"))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err_log)
            .process_group(0)
            .spawn()
            .map_err(|e| Error::internal(format!("starting {}", self.cfg.tandemd.display()), e))?;
        let pid = child.id();
        let pidfile = dir.join("tandemd.pid");
        std::fs::write(&pidfile, pid.to_string())
            .map_err(|e| Error::internal(format!("writing {}", pidfile.display()), e))?;
        // No socket to wait for: give it a moment to fail on bad input.
        tokio::time::sleep(Duration::from_millis(300)).await;
        sys::reap(pid as libc::pid_t);
        if !sys::process_matches(pid, &dir.display().to_string()) {
            let tail = std::fs::read_to_string(&log_path).unwrap_or_default();
            return Err(Error::Internal(format!(
                "tandemd witness for {id} exited: {}",
                tail.lines().rev().take(5).collect::<Vec<_>>().join(" / ")
            )));
        }
        tracing::info!(volume = %id, pid, %listen, "witness running");
        Ok(())
    }

    /// The replica's `tandemd`, if it runs.
    pub fn running(&self, id: &str) -> Option<Running> {
        let dir = self.replica_dir(id);
        let pid: u32 = std::fs::read_to_string(dir.join("tandemd.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()?;
        sys::reap(pid as libc::pid_t);
        if sys::process_matches(pid, &dir.display().to_string()) {
            Some(Running { pid, dir })
        } else {
            None
        }
    }

    /// `staging`: NodeStage asks, nothing is attached to `tandemd` yet.
    async fn ensure_locked(&self, rec: &VolumeRecord, staging: bool) -> Result<Running> {
        let id = &rec.id;
        let dir = self.replica_dir(id);
        let text = self.config_text(rec)?;
        if member(rec, &self.cfg.node_id) == Some(Member::Client) {
            std::fs::create_dir_all(&dir)
                .map_err(|e| Error::internal(format!("creating {}", dir.display()), e))?;
            return self.run_config(id, &dir, &text, staging).await;
        }
        let backing = self.backing(id);
        // The replica directory is created before the backing: a backing
        // without it was not made by the agent (e.g. served unreplicated
        // before the agent was turned on) and may differ from the other
        // replicas while looking just as current.
        if !dir.exists() && backing.exists() {
            return Err(Error::FailedPrecondition(format!(
                "{} exists but was not created by the replica agent (served unreplicated \
                 before?); refusing to replicate it, since it may differ from the other \
                 replicas: move it away to let the agent create this replica",
                backing.display()
            )));
        }
        std::fs::create_dir_all(&dir)
            .map_err(|e| Error::internal(format!("creating {}", dir.display()), e))?;
        if !backing.exists() {
            let tandemctl = self.cfg.tandemctl.display().to_string();
            let b = backing.display().to_string();
            let size = rec.size.to_string();
            let uuid = rec.uuid.to_string();
            sys::run(
                &tandemctl,
                &["create", &b, "--size", &size, "--name", id, "--uuid", &uuid],
            )
            .await?;
            tracing::info!(volume = %id, backing = %b, "replica created");
            self.set_size(id, rec.size);
        }
        // An expanded volume that is not published grows here, offline
        // (R27): every replica's agent does the same, and the replicas,
        // which refuse to connect while their sizes differ, connect again
        // once all are grown.
        let attached = !rec.attachments.is_empty();
        if !self.staged(id) && self.backing_size(id, &backing).await? < rec.size {
            if let (true, Some(r)) = (attached, self.running(id)) {
                // Published (online expansion, R29): the Primary grows
                // every replica connected to it (NodeExpandVolume). This
                // replica asks its own tandemd: a no-op once the Primary
                // grew it, refused while it is connected to the Primary
                // and not yet grown (wait), and a growth of its own when
                // it is connected to no Primary (it was down: it connects
                // again once both have the size).
                let size = rec.size.to_string();
                let out = self.ctl_with("resize", id, &[&size], &r).await?;
                if out.status.success() {
                    self.set_size(id, rec.size);
                    tracing::info!(volume = %id, size = rec.size, "replica has the expanded size (online)");
                } else {
                    let why = String::from_utf8_lossy(&out.stderr);
                    tracing::debug!(volume = %id, "replica not grown yet (the Primary grows it): {}", why.trim());
                }
                return self.run_config(id, &dir, &text, staging).await;
            }
            if let Some(r) = self.running(id) {
                sys::stop_process(r.pid, &dir.display().to_string(), STOP_GRACE).await;
            }
            let tandemctl = self.cfg.tandemctl.display().to_string();
            let b = backing.display().to_string();
            let size = rec.size.to_string();
            sys::run(&tandemctl, &["resize", "--offline", &b, &size]).await?;
            self.set_size(id, rec.size);
            tracing::info!(volume = %id, size = rec.size, "replica grown (offline)");
        }
        self.run_config(id, &dir, &text, staging).await
    }

    /// Writes `text` as the volume's `tandemd.toml` and keeps a `tandemd`
    /// running on it: started when not running, restarted when the
    /// configuration changed while no device uses it (the volume is not
    /// staged here, or NodeStage is about to attach one: `staging`).
    async fn run_config(&self, id: &str, dir: &Path, text: &str, staging: bool) -> Result<Running> {
        let conf = dir.join("tandemd.toml");
        let old = std::fs::read_to_string(&conf).ok();
        if old.as_deref() != Some(text) {
            std::fs::write(&conf, text)
                .map_err(|e| Error::internal(format!("writing {}", conf.display()), e))?;
        }
        if let Some(r) = self.running(id) {
            if old.is_none() || old.as_deref() == Some(text) || (self.staged(id) && !staging) {
                return Ok(r);
            }
            tracing::info!(volume = %id, "replica configuration changed: restarting tandemd");
            sys::stop_process(r.pid, &dir.display().to_string(), STOP_GRACE).await;
        }
        self.start(id, dir).await
    }

    fn set_size(&self, id: &str, size: u64) {
        if let Ok(mut m) = self.sizes.lock() {
            m.insert(id.to_owned(), size);
        }
    }

    /// The data size of `backing` (`tandemctl inspect`, then cached).
    async fn backing_size(&self, id: &str, backing: &Path) -> Result<u64> {
        if let Some(s) = self.sizes.lock().ok().and_then(|m| m.get(id).copied()) {
            return Ok(s);
        }
        let tandemctl = self.cfg.tandemctl.display().to_string();
        let b = backing.display().to_string();
        let size = sys::backing_size(&tandemctl, &b).await?;
        self.set_size(id, size);
        Ok(size)
    }

    async fn start(&self, id: &str, dir: &Path) -> Result<Running> {
        let log_path = dir.join("tandemd.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| Error::internal(log_path.display(), e))?;
        let err_log = log
            .try_clone()
            .map_err(|e| Error::internal(log_path.display(), e))?;
        let sock = dir.join("nbd.sock");
        let _ = std::fs::remove_file(&sock);
        let child = std::process::Command::new(&self.cfg.tandemd)
            .arg("run")
            .arg("--config")
            .arg(dir.join("tandemd.toml"))
            .arg("--nbd-unix")
            .arg(&sock)
            .arg("--admin-socket")
            .arg(dir.join("admin.sock"))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err_log)
            .process_group(0)
            .spawn()
            .map_err(|e| Error::internal(format!("starting {}", self.cfg.tandemd.display()), e))?;
        let pid = child.id();
        let pidfile = dir.join("tandemd.pid");
        std::fs::write(&pidfile, pid.to_string())
            .map_err(|e| Error::internal(format!("writing {}", pidfile.display()), e))?;
        crate::node::wait_ready(pid, &log_path, "tandemd", || {
            std::os::unix::net::UnixStream::connect(&sock).is_ok()
        })
        .await?;
        tracing::info!(volume = %id, pid, "replica tandemd running");
        Ok(Running {
            pid,
            dir: dir.to_path_buf(),
        })
    }

    async fn remove_locked(&self, id: &str) -> Result<()> {
        let dir = self.replica_dir(id);
        if let Some(r) = self.running(id) {
            sys::stop_process(r.pid, &dir.display().to_string(), STOP_GRACE).await;
        }
        let backing = self.backing(id);
        match std::fs::remove_file(&backing) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(Error::internal(
                    format!("removing {}", backing.display()),
                    e,
                ))
            }
        }
        std::fs::remove_dir_all(&dir)
            .map_err(|e| Error::internal(format!("removing {}", dir.display()), e))?;
        tracing::info!(volume = %id, "replica removed (tandemd stopped, backing deleted)");
        Ok(())
    }

    async fn ctl(&self, verb: &str, id: &str, r: &Running) -> Result<std::process::Output> {
        self.ctl_with(verb, id, &[], r).await
    }

    /// `tandemctl VERB ID EXTRA… --admin-socket` of the replica's `tandemd`.
    async fn ctl_with(
        &self,
        verb: &str,
        id: &str,
        extra: &[&str],
        r: &Running,
    ) -> Result<std::process::Output> {
        let admin = r.admin_socket().display().to_string();
        let mut args = vec![verb, id];
        args.extend_from_slice(extra);
        args.extend(["--admin-socket", admin.as_str()]);
        if verb == "status" {
            args.push("--json");
        }
        sys::output(&self.cfg.tandemctl.display().to_string(), &args).await
    }

    /// The export's `replication` status object (`tandemctl status --json`).
    pub async fn status(&self, id: &str, r: &Running) -> Result<serde_json::Value> {
        let out = self.ctl("status", id, r).await?;
        if !out.status.success() {
            return Err(Error::Internal(format!(
                "tandemctl status {id}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)
            .map_err(|e| Error::internal(format!("tandemctl status {id}: bad JSON"), e))?;
        Ok(v["exports"]
            .as_array()
            .and_then(|a| a.iter().find(|e| e["name"] == id))
            .map(|e| e["replication"].clone())
            .unwrap_or(serde_json::Value::Null))
    }

    /// Makes the replica Primary for NodeStageVolume. With peers, first
    /// waits (up to [`PEER_WAIT`]) until every peer is connected, so the
    /// handshake has told this node whether its copy is current (a stale
    /// copy is not UpToDate and tandemd refuses to promote it); for
    /// dual-primary (`other_primary`) both disks must also be UpToDate and
    /// replicating, else the stage fails. tandemd's refusals (disk not
    /// UpToDate, a peer already Primary without dual-primary) are retried
    /// for [`PEER_WAIT`] (a dead peer is still "connected" for its peer
    /// timeout), then come back as `FAILED_PRECONDITION` with its reason.
    ///
    /// A diskless client (remote attach) is promoted only once every
    /// replica is connected and UpToDate: it completes a write only when
    /// every replica has it, so with one missing every write would fail.
    pub async fn promote(
        &self,
        rec: &VolumeRecord,
        r: &Running,
        other_primary: Option<&str>,
    ) -> Result<()> {
        let id = &rec.id;
        let client = member(rec, &self.cfg.node_id) == Some(Member::Client);
        if rec.replicas.len() > 1 || !rec.clients.is_empty() {
            let deadline = Instant::now() + PEER_WAIT;
            let mut last = serde_json::Value::Null;
            loop {
                last = self.status(id, r).await.unwrap_or(last);
                // The record's replicas and clients (a client detached
                // since tandemd started is not waited for).
                let peers: Vec<serde_json::Value> = last["peers"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
                    .into_iter()
                    .filter(|p| {
                        let name = p["name"].as_str().unwrap_or_default();
                        rec.replicas.iter().any(|r| r.node == name)
                            || rec.clients.iter().any(|c| c.node == name)
                    })
                    .collect();
                let connected =
                    !peers.is_empty() && peers.iter().all(|p| p["connection"] == "Connected");
                let in_sync = last["disk"] == "UpToDate"
                    && peers
                        .iter()
                        .all(|p| p["disk"] == "UpToDate" && p["replication"] == "Established");
                let replicas_ready = connected
                    && peers.len() == rec.replicas.len()
                    && peers.iter().all(|p| p["disk"] == "UpToDate");
                let ok = if client {
                    replicas_ready
                } else {
                    connected && (other_primary.is_none() || in_sync)
                };
                if ok {
                    break;
                }
                if Instant::now() >= deadline {
                    let describe = peers
                        .iter()
                        .map(|p| {
                            format!(
                                "{} {}/{}/{}",
                                p["name"].as_str().unwrap_or("?"),
                                p["connection"].as_str().unwrap_or("?"),
                                p["replication"].as_str().unwrap_or("?"),
                                p["disk"].as_str().unwrap_or("?")
                            )
                        })
                        .collect::<Vec<_>>()
                        .join(", ");
                    if client {
                        return Err(Error::FailedPrecondition(format!(
                            "volume {id}: this node holds no replica and uses the volume through \
                             every replica, but not all are connected and UpToDate: {describe}"
                        )));
                    }
                    if let Some(o) = other_primary {
                        return Err(Error::FailedPrecondition(format!(
                            "volume {id}: dual-primary needs the other primary {o} connected and \
                             in sync; local disk {}, peers: {describe}",
                            last["disk"].as_str().unwrap_or("?")
                        )));
                    }
                    tracing::warn!(volume = %id, peers = %describe, "peers not all connected and in sync; promoting anyway (tandemd decides)");
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        // A refusal may be stale news: a peer whose node just died still
        // counts as connected (and Primary) until its peer timeout (5 s).
        // Retry until PEER_WAIT is over, then report tandemd's reason.
        let deadline = Instant::now() + PEER_WAIT;
        loop {
            let out = self.ctl("promote", id, r).await?;
            if out.status.success() {
                tracing::info!(volume = %id, "replica promoted to Primary");
                return Ok(());
            }
            let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
            if Instant::now() >= deadline {
                return Err(Error::FailedPrecondition(format!(
                    "volume {id}: this node's replica cannot become Primary: {err}"
                )));
            }
            tracing::debug!(volume = %id, "promote refused, retrying: {err}");
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Makes the replica Secondary again (NodeUnstageVolume), retrying
    /// while requests are still in flight. A replica whose `tandemd` is not
    /// running is Secondary when it starts again.
    pub async fn demote(&self, id: &str) -> Result<()> {
        let Some(r) = self.running(id) else {
            return Ok(());
        };
        let deadline = Instant::now() + STOP_GRACE;
        loop {
            let out = self.ctl("demote", id, &r).await?;
            if out.status.success() {
                tracing::info!(volume = %id, "replica demoted to Secondary");
                return Ok(());
            }
            let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
            if Instant::now() >= deadline {
                return Err(Error::FailedPrecondition(format!(
                    "volume {id}: demoting the replica: {err}"
                )));
            }
            tracing::debug!(volume = %id, "demote refused, retrying: {err}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::params::VolumeParams;
    use crate::store::{FileStore, Replica, RECORD_VERSION};

    fn agent(dir: &Path, tls: bool) -> Agent {
        let store = FileStore::open(&dir.join("volumes")).unwrap();
        Agent::new(
            AgentConfig {
                node_id: "a".into(),
                state_dir: dir.join("state"),
                data_dir: dir.join("data"),
                tandemd: "/nonexistent/tandemd".into(),
                tandemctl: "/nonexistent/tandemctl".into(),
                tls: tls.then(|| TlsFiles {
                    ca: "/tls/ca.crt".into(),
                    cert: "/tls/a.crt".into(),
                    key: "/tls/a.key".into(),
                }),
            },
            Arc::new(store),
        )
        .unwrap()
    }

    fn record(nodes: &[&str]) -> VolumeRecord {
        VolumeRecord {
            version: RECORD_VERSION,
            id: "tdm-x".into(),
            name: "x".into(),
            uuid: uuid::Uuid::nil(),
            size: 1 << 20,
            params: VolumeParams::default(),
            replicas: nodes
                .iter()
                .enumerate()
                .map(|(i, n)| Replica {
                    node: n.to_string(),
                    zone: format!("z{i}"),
                    address: Some(format!("10.0.0.{}:{}", i + 1, 7800 + i).parse().unwrap()),
                })
                .collect(),
            witness: None,
            state: VolumeState::Ready,
            attachments: vec![],
            initialized_on: None,
            allow_two_primaries: true,
            witness_address: None,
            clients: vec![],
        }
    }

    #[test]
    fn config_names_this_node_its_address_and_every_other_replica_as_peer() {
        let d = tempfile::tempdir().unwrap();
        let a = agent(d.path(), true);
        let text = a.config_text(&record(&["b", "a", "c"])).unwrap();
        let v: toml::Value = toml::from_str(&text).unwrap();
        let e = &v["export"][0];
        assert_eq!(e["name"].as_str(), Some("tdm-x"));
        let r = &e["replication"];
        assert_eq!(r["node"].as_str(), Some("a"));
        assert_eq!(r["listen"].as_str(), Some("10.0.0.2:7801"));
        assert_eq!(r["role"].as_str(), Some("secondary"));
        assert_eq!(r["allow_two_primaries"].as_bool(), Some(true));
        assert_eq!(r["cert"].as_str(), Some("/tls/a.crt"));
        let peers: Vec<(&str, &str)> = r["peers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| (p["name"].as_str().unwrap(), p["address"].as_str().unwrap()))
            .collect();
        assert_eq!(peers, [("b", "10.0.0.1:7800"), ("c", "10.0.0.3:7802")]);
        assert!(r.get("witness").is_none() && r.get("auto_failover").is_none());
        // With a witness: named, and no self-promotion (the CO decides).
        let mut rec = record(&["b", "a"]);
        rec.witness = Some("w".into());
        rec.witness_address = Some("10.0.0.9:7805".parse().unwrap());
        let v: toml::Value = toml::from_str(&a.config_text(&rec).unwrap()).unwrap();
        let r = &v["export"][0]["replication"];
        assert_eq!(r["witness"]["name"].as_str(), Some("w"));
        assert_eq!(r["witness"]["address"].as_str(), Some("10.0.0.9:7805"));
        assert_eq!(r["auto_failover"].as_bool(), Some(false));
        // One replica: no replication table, no certificate needed.
        let text = agent(d.path(), false).config_text(&record(&["a"])).unwrap();
        assert!(!text.contains("replication"), "{text}");
    }

    #[test]
    fn replicated_volumes_need_a_certificate_and_a_replica_here() {
        let d = tempfile::tempdir().unwrap();
        let e = agent(d.path(), false)
            .config_text(&record(&["a", "b"]))
            .unwrap_err();
        assert!(matches!(e, Error::FailedPrecondition(_)) && e.to_string().contains("--tls-cert"));
        let e = agent(d.path(), true)
            .config_text(&record(&["b", "c"]))
            .unwrap_err();
        assert!(e.to_string().contains("holds no replica"), "{e}");
    }

    #[tokio::test]
    async fn a_backing_the_agent_did_not_create_is_not_replicated() {
        let d = tempfile::tempdir().unwrap();
        let a = agent(d.path(), true);
        std::fs::create_dir_all(d.path().join("data")).unwrap();
        std::fs::write(d.path().join("data/tdm-x.img"), b"old unreplicated data").unwrap();
        let e = a.ensure(&record(&["a", "b"])).await.unwrap_err();
        assert!(matches!(e, Error::FailedPrecondition(_)), "{e}");
        assert!(
            e.to_string().contains("not created by the replica agent"),
            "{e}"
        );
        assert!(!d.path().join("state/rep/tdm-x").exists());
        assert_eq!(
            std::fs::read(d.path().join("data/tdm-x.img")).unwrap(),
            b"old unreplicated data"
        );
    }

    #[tokio::test]
    async fn an_unreadable_store_removes_nothing_and_an_orphan_replica_is_removed() {
        let d = tempfile::tempdir().unwrap();
        let a = agent(d.path(), true);
        // A replica directory with no record: removed with its backing.
        std::fs::create_dir_all(d.path().join("state/rep/tdm-gone")).unwrap();
        std::fs::create_dir_all(d.path().join("data")).unwrap();
        std::fs::write(d.path().join("data/tdm-gone.img"), b"x").unwrap();
        // A corrupt record makes the store unreadable: nothing is removed.
        std::fs::write(d.path().join("volumes/tdm-bad.json"), b"{").unwrap();
        assert!(a.reconcile().await.is_err());
        assert!(d.path().join("data/tdm-gone.img").exists());
        std::fs::remove_file(d.path().join("volumes/tdm-bad.json")).unwrap();
        a.reconcile().await.unwrap();
        assert!(!d.path().join("data/tdm-gone.img").exists());
        assert!(!d.path().join("state/rep/tdm-gone").exists());
    }
}
