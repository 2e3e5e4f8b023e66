//! The witness: a diskless third vote that arbitrates who may write alone
//! (`docs/replication.md`, R25).
//!
//! A witness is `tandemd witness` at a third site. Every replica of a volume
//! that names it keeps a QUIC + mutual-TLS connection to it (the same
//! endpoint, ALPN and certificates as peer replication; the node name is the
//! certificate's) and talks JSON lines on one bidirectional stream:
//!
//! * `report`: role, disk and the peers it is not replicating to — sent on
//!   connect and on every change; answered with the node's standing (is it
//!   outdated, who holds the volume).
//! * `solo`: "may I complete writes a peer did not get?" — from a Primary
//!   that lost a peer (`promote: false`), or from an UpToDate Secondary that
//!   lost its Primary for the failover timeout (`promote: true`).
//! * `release`: every peer is back in sync; the grant is returned.
//!
//! The witness grants writing alone to at most one node per volume (the
//! *holder*) and remembers durably, in its state file, which nodes missed
//! writes (*outdated*): those are never granted anything until the holder
//! releases them after their resync. A takeover is granted only while no
//! other node of the volume is connected to the witness as Primary. So a
//! write completes only with every peer, or on the one node the witness
//! chose; a node cut off from both its peer and the witness holds its writes
//! (or fails them) and never acknowledges one.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use tandem_core::repl::{Replica, Time};
use tandem_core::witness as wcore;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::transport::PeerEndpoint;

/// Longest JSON line either side accepts.
const MAX_LINE: usize = 64 << 10;

/// A message from a replica to the witness.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum ToWitness {
    /// The node's state for a volume.
    Report {
        /// Volume UUID (hex).
        volume: String,
        /// `primary` or `secondary`.
        role: String,
        /// Own disk state.
        disk: String,
        /// Peers this node is not replicating to.
        lagging: Vec<String>,
    },
    /// Asks to complete writes that `lagging` peers do not get.
    Solo {
        /// Volume UUID (hex).
        volume: String,
        /// Take over as Primary (failover) rather than continue as one.
        promote: bool,
        /// Peers this node is not replicating to.
        lagging: Vec<String>,
    },
    /// Every peer is back in sync: the grant is returned.
    Release {
        /// Volume UUID (hex).
        volume: String,
    },
}

/// The witness's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verdict {
    /// Volume UUID (hex).
    pub volume: String,
    /// What it answers: `report`, `solo` or `release`.
    pub answers: String,
    /// For `solo`: whether it asked to take over.
    #[serde(default)]
    pub promote: bool,
    /// For `solo`: granted.
    pub granted: bool,
    /// The node allowed to write alone, if any.
    pub holder: Option<String>,
    /// The asking node missed writes: it may not write or be promoted
    /// until resynced.
    pub outdated: bool,
    /// Why (for logs).
    pub reason: String,
}

/// Durable arbitration state of one volume, as stored in the state file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct VolumeState {
    holder: Option<String>,
    outdated: BTreeSet<String>,
}

impl From<ToWitness> for wcore::ToWitness {
    fn from(m: ToWitness) -> wcore::ToWitness {
        match m {
            ToWitness::Report {
                volume,
                role,
                disk,
                lagging,
            } => wcore::ToWitness::Report {
                volume,
                primary: role == "primary",
                disk,
                lagging,
            },
            ToWitness::Solo {
                volume,
                promote,
                lagging,
            } => wcore::ToWitness::Solo {
                volume,
                promote,
                lagging,
            },
            ToWitness::Release { volume } => wcore::ToWitness::Release { volume },
        }
    }
}

impl From<wcore::ToWitness> for ToWitness {
    fn from(m: wcore::ToWitness) -> ToWitness {
        match m {
            wcore::ToWitness::Report {
                volume,
                primary,
                disk,
                lagging,
            } => ToWitness::Report {
                volume,
                role: if primary { "primary" } else { "secondary" }.into(),
                disk,
                lagging,
            },
            wcore::ToWitness::Solo {
                volume,
                promote,
                lagging,
            } => ToWitness::Solo {
                volume,
                promote,
                lagging,
            },
            wcore::ToWitness::Release { volume } => ToWitness::Release { volume },
        }
    }
}

impl From<wcore::Verdict> for Verdict {
    fn from(v: wcore::Verdict) -> Verdict {
        Verdict {
            volume: v.volume,
            answers: match v.answers {
                wcore::Answers::Report => "report",
                wcore::Answers::Solo => "solo",
                wcore::Answers::Release => "release",
            }
            .into(),
            promote: v.promote,
            granted: v.granted,
            holder: v.holder,
            outdated: v.outdated,
            reason: v.reason,
        }
    }
}

impl From<Verdict> for wcore::Verdict {
    fn from(v: Verdict) -> wcore::Verdict {
        wcore::Verdict {
            volume: v.volume,
            answers: match v.answers.as_str() {
                "solo" => wcore::Answers::Solo,
                "release" => wcore::Answers::Release,
                _ => wcore::Answers::Report,
            },
            promote: v.promote,
            granted: v.granted,
            holder: v.holder,
            outdated: v.outdated,
            reason: v.reason,
        }
    }
}

/// The witness: the core's decisions ([`wcore::Arbiter`]) plus the state
/// file.
#[derive(Debug)]
pub struct Arbiter {
    inner: wcore::Arbiter,
    path: Option<PathBuf>,
}

impl Arbiter {
    /// Loads the state file (a missing file is an empty state).
    pub fn load(path: Option<PathBuf>) -> Result<Arbiter> {
        let volumes: BTreeMap<String, VolumeState> = match &path {
            Some(p) => match std::fs::read(p) {
                Ok(b) => serde_json::from_slice(&b)
                    .with_context(|| format!("{}: not a witness state file", p.display()))?,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
                Err(e) => return Err(e).with_context(|| format!("{}: reading", p.display())),
            },
            None => BTreeMap::new(),
        };
        let volumes = volumes
            .into_iter()
            .map(|(k, v)| {
                (
                    k,
                    wcore::VolumeState {
                        holder: v.holder,
                        outdated: v.outdated,
                    },
                )
            })
            .collect();
        Ok(Arbiter {
            inner: wcore::Arbiter::new(volumes),
            path,
        })
    }

    fn persist(&self) -> Result<()> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let volumes: BTreeMap<&String, VolumeState> = self
            .inner
            .volumes()
            .iter()
            .map(|(k, v)| {
                (
                    k,
                    VolumeState {
                        holder: v.holder.clone(),
                        outdated: v.outdated.clone(),
                    },
                )
            })
            .collect();
        let tmp = path.with_extension("tmp");
        let data = serde_json::to_vec_pretty(&volumes)?;
        {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp)
                .with_context(|| format!("{}: creating", tmp.display()))?;
            f.write_all(&data)?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, path).with_context(|| format!("{}: renaming", path.display()))?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            if let Ok(d) = std::fs::File::open(dir) {
                let _ = d.sync_all();
            }
        }
        Ok(())
    }

    /// Forgets the connection `conn` (it ended).
    pub fn disconnected(&mut self, conn: u64) {
        self.inner.disconnected(conn);
    }

    /// Handles one message from `node` on connection `conn`. A change to
    /// the durable state is written before the answer (an error then
    /// denies).
    pub fn handle(&mut self, node: &str, conn: u64, msg: ToWitness) -> Verdict {
        let (mut v, undo) = self.inner.handle(node, conn, msg.into());
        if let Some(undo) = undo {
            if let Err(e) = self.persist() {
                warn!(error = %format!("{e:#}"), "witness state not saved; denying");
                self.inner.revert(undo, node, &mut v, &format!("{e:#}"));
            }
        }
        v.into()
    }
}

/// `tandemd witness` arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct WitnessArgs {
    /// QUIC address to listen on.
    #[arg(long)]
    pub listen: SocketAddr,
    /// The witness's certificate (PEM), signed by the cluster CA; its node
    /// name is what the replicas name as `witness.name`.
    #[arg(long)]
    pub cert: PathBuf,
    /// Its private key (PEM).
    #[arg(long)]
    pub key: PathBuf,
    /// The cluster CA certificate (PEM).
    #[arg(long)]
    pub ca: PathBuf,
    /// Node names allowed to connect (comma-separated), e.g. `alpha,beta`.
    #[arg(long, value_delimiter = ',', required = true)]
    pub allow: Vec<String>,
    /// Where the arbitration state is kept (who writes alone, who missed
    /// writes); it must survive restarts.
    #[arg(long, default_value = "/var/lib/tandem/witness.json")]
    pub state: PathBuf,
    /// Log filter.
    #[arg(long, default_value = "info")]
    pub log_level: String,
}

/// `tandemd witness`: serves until SIGINT/SIGTERM.
pub async fn run(args: WitnessArgs) -> Result<()> {
    let identity = crate::transport::TlsIdentity::load(&args.cert, &args.key, &args.ca)?;
    if let Some(dir) = args.state.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("{}: creating", dir.display()))?;
    }
    // Load first: a broken state file stops startup, naming it.
    Arbiter::load(Some(args.state.clone()))?;
    let endpoint = PeerEndpoint::bind(args.listen, &identity, args.allow.clone())?;
    info!(node = identity.node_name(), listen = %args.listen, allow = ?args.allow, state = %args.state.display(), "witness listening");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = serve(endpoint, Some(args.state)) => r,
        _ = tokio::signal::ctrl_c() => Ok(()),
        _ = term.recv() => Ok(()),
    }
}

/// Runs a witness on `endpoint` until it closes.
pub async fn serve(endpoint: PeerEndpoint, state: Option<PathBuf>) -> Result<()> {
    let arbiter = Arc::new(Mutex::new(Arbiter::load(state)?));
    let mut next_conn = 0u64;
    loop {
        let (node, conn) = match endpoint.accept().await {
            Ok(x) => x,
            Err(crate::transport::TransportError::Closed) => return Ok(()),
            Err(e) => {
                debug!(error = %e, "witness accept failed");
                continue;
            }
        };
        next_conn += 1;
        let id = next_conn;
        let arbiter = arbiter.clone();
        tokio::spawn(async move {
            info!(%node, "replica connected to the witness");
            if let Err(e) = serve_conn(&arbiter, &node, id, &conn).await {
                debug!(%node, error = %format!("{e:#}"), "witness connection");
            }
            if let Ok(mut a) = arbiter.lock() {
                a.disconnected(id);
            }
            info!(%node, "replica left the witness");
        });
    }
}

async fn serve_conn(
    arbiter: &Mutex<Arbiter>,
    node: &str,
    id: u64,
    conn: &quinn::Connection,
) -> Result<()> {
    let (mut send, recv) = conn.accept_bi().await?;
    let mut lines = BufReader::new(recv);
    let mut line = String::new();
    loop {
        line.clear();
        let n = (&mut lines)
            .take(MAX_LINE as u64)
            .read_line(&mut line)
            .await?;
        if n == 0 {
            return Ok(());
        }
        if !line.ends_with('\n') {
            conn.close(1u32.into(), b"line too long");
            anyhow::bail!("line longer than {MAX_LINE} bytes");
        }
        let msg: ToWitness = match serde_json::from_str(line.trim_end()) {
            Ok(m) => m,
            Err(e) => {
                conn.close(1u32.into(), b"bad message");
                anyhow::bail!("bad message: {e}");
            }
        };
        let verdict = match arbiter.lock() {
            Ok(mut a) => a.handle(node, id, msg.clone()),
            Err(_) => anyhow::bail!("witness state poisoned"),
        };
        if !matches!(msg, ToWitness::Report { .. }) || verdict.outdated {
            info!(%node, volume = %verdict.volume, answers = %verdict.answers, granted = verdict.granted, holder = ?verdict.holder, outdated = verdict.outdated, reason = %verdict.reason, "witness verdict");
        }
        let mut out = serde_json::to_vec(&verdict)?;
        out.push(b'\n');
        send.write_all(&out).await?;
    }
}

pub use tandem_core::witness::NoQuorum;

/// The driver's side of quorum: the core's policy ([`wcore::QuorumCtl`])
/// plus the channel to the witness client.
#[derive(Debug)]
pub struct QuorumCtl {
    inner: wcore::QuorumCtl,
    tx: Option<mpsc::UnboundedSender<ToWitness>>,
}

/// Quorum facts for status.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct QuorumStatus {
    /// A witness is configured.
    pub witness: bool,
    /// Connected to it.
    pub witness_connected: bool,
    /// The witness says this node missed writes.
    pub outdated: bool,
    /// The node the witness lets write alone.
    pub holder: Option<String>,
    /// Writes held back waiting for a peer or a grant.
    pub held: usize,
    /// This node may complete writes its peers do not get.
    pub solo_granted: bool,
    /// Automatic promotions done by this node.
    pub failovers: u64,
}

impl QuorumCtl {
    /// `witness`: one is configured. `volume`: the UUID in hex.
    pub fn new(
        volume: String,
        witness: bool,
        auto_failover: bool,
        failover_timeout: Duration,
        on_no_quorum: NoQuorum,
    ) -> QuorumCtl {
        QuorumCtl {
            inner: wcore::QuorumCtl::new(
                volume,
                witness,
                auto_failover,
                failover_timeout,
                on_no_quorum,
            ),
            tx: None,
        }
    }

    /// Whether the driver should tick periodically.
    pub fn active(&self) -> bool {
        self.inner.active()
    }

    /// The witness connection is up; messages go to `tx`.
    pub fn witness_up(&mut self, tx: mpsc::UnboundedSender<ToWitness>) {
        self.tx = Some(tx);
        self.inner.witness_up();
    }

    /// The witness connection is gone.
    pub fn witness_down(&mut self) {
        self.tx = None;
        self.inner.witness_down();
    }

    /// Refuses a manual promotion the witness forbids.
    pub fn may_promote(&self) -> Result<(), String> {
        self.inner.may_promote()
    }

    /// Status for `tandemctl status`.
    pub fn status(&self, replica: &Replica) -> QuorumStatus {
        let f = self.inner.facts(replica);
        QuorumStatus {
            witness: f.witness,
            witness_connected: f.witness_connected && self.tx.is_some(),
            outdated: f.outdated,
            holder: f.holder,
            held: f.held,
            solo_granted: f.solo_granted,
            failovers: f.failovers,
        }
    }

    /// Sends what the core produced and logs its notes.
    fn flush(&mut self) {
        while let Some(o) = self.inner.poll() {
            match o {
                wcore::QuorumOutput::Send(m) => {
                    let sent = self.tx.as_ref().is_some_and(|tx| tx.send(m.into()).is_ok());
                    if !sent {
                        // The client task is gone: as if disconnected.
                        self.witness_down();
                    }
                }
                wcore::QuorumOutput::Note(n) => match n {
                    wcore::Note::FailedHeld { held } => {
                        warn!(held, "no quorum: failing held writes with EIO")
                    }
                    wcore::Note::AskingTakeover => info!(
                        "the Primary is gone for the failover timeout; asking the witness to take over"
                    ),
                    wcore::Note::FailedOver => {
                        warn!("failover: promoted to Primary with the witness's grant")
                    }
                    wcore::Note::PromotionRefused(e) => {
                        warn!(error = %e, "failover granted but promotion refused")
                    }
                    wcore::Note::Denied(reason) => {
                        debug!(%reason, "the witness denied writing alone")
                    }
                    wcore::Note::StandingDown(reason) => warn!(
                        %reason,
                        "the witness says this node missed writes; standing down"
                    ),
                    wcore::Note::DemoteFailed(e) => {
                        warn!(error = %e, "could not demote after losing the arbitration")
                    }
                },
            }
        }
    }

    /// Acts on the replica's state: reports changes, asks for grants,
    /// releases them, fails held writes without quorum, and starts a
    /// failover once the Primary has been gone for the timeout.
    pub fn tick(&mut self, replica: &mut Replica, now: Time) {
        self.inner.tick(replica, now);
        self.flush();
    }

    /// Acts on a verdict from the witness.
    pub fn verdict(&mut self, replica: &mut Replica, now: Time, v: Verdict, wall_ms: u64) {
        self.inner.verdict(replica, now, v.into(), wall_ms);
        self.flush();
    }
}

/// Keeps a connection to the witness `name` at `addr` and relays messages
/// between it and the driver (`up`/`down`/`verdict` callbacks through
/// `events`).
pub async fn run_client(
    endpoint: Arc<PeerEndpoint>,
    name: String,
    addr: SocketAddr,
    events: mpsc::UnboundedSender<ClientEvent>,
) {
    loop {
        let never = std::future::pending::<()>();
        let conn = match endpoint
            .connect_with_backoff(
                addr,
                &name,
                Duration::from_millis(100),
                Duration::from_secs(2),
                never,
            )
            .await
        {
            Ok(c) => c,
            Err(e) => {
                warn!(witness = %name, error = %e, "giving up connecting to the witness");
                return;
            }
        };
        let (mut send, recv) = match conn.open_bi().await {
            Ok(s) => s,
            Err(e) => {
                debug!(error = %e, "opening the witness stream failed");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        info!(witness = %name, "connected to the witness");
        let (tx, mut rx) = mpsc::unbounded_channel::<ToWitness>();
        if events.send(ClientEvent::Up(tx)).is_err() {
            return;
        }
        let writer = tokio::spawn(async move {
            while let Some(m) = rx.recv().await {
                let Ok(mut line) = serde_json::to_vec(&m) else {
                    continue;
                };
                line.push(b'\n');
                if send.write_all(&line).await.is_err() {
                    return;
                }
            }
        });
        let mut lines = BufReader::new(recv);
        let mut line = String::new();
        loop {
            line.clear();
            match (&mut lines)
                .take(MAX_LINE as u64)
                .read_line(&mut line)
                .await
            {
                Ok(0) | Err(_) => break,
                Ok(_) if !line.ends_with('\n') => {
                    warn!("witness sent an overlong line; reconnecting");
                    break;
                }
                Ok(_) => match serde_json::from_str::<Verdict>(line.trim_end()) {
                    Ok(v) => {
                        if events.send(ClientEvent::Verdict(v)).is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        warn!(error = %e, "bad message from the witness; reconnecting");
                        break;
                    }
                },
            }
        }
        writer.abort();
        conn.close(0u32.into(), b"bye");
        warn!(witness = %name, "lost the witness");
        if events.send(ClientEvent::Down).is_err() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// What the witness client tells the driver.
#[derive(Debug)]
pub enum ClientEvent {
    /// Connected; send messages here.
    Up(mpsc::UnboundedSender<ToWitness>),
    /// Disconnected.
    Down,
    /// An answer.
    Verdict(Verdict),
}

/// The UUID bytes as lowercase hex.
pub fn volume_key(uuid: &[u8; 16]) -> String {
    uuid.iter().map(|b| format!("{b:02x}")).collect()
}

/// Default witness state file.
pub fn default_state_path() -> &'static Path {
    Path::new("/var/lib/tandem/witness.json")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn solo(promote: bool, lagging: &[&str]) -> ToWitness {
        ToWitness::Solo {
            volume: "v".into(),
            promote,
            lagging: lagging.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn report(primary: bool) -> ToWitness {
        ToWitness::Report {
            volume: "v".into(),
            role: if primary { "primary" } else { "secondary" }.into(),
            disk: "UpToDate".into(),
            lagging: vec![],
        }
    }

    #[test]
    fn one_holder_at_a_time_and_the_outdated_stay_out() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.json");
        let mut a = Arbiter::load(Some(path.clone())).unwrap();
        a.handle("alpha", 1, report(true));
        a.handle("beta", 2, report(false));
        // beta may not take over while alpha is Primary and reachable.
        let v = a.handle("beta", 2, solo(true, &["alpha"]));
        assert!(!v.granted, "{v:?}");
        // alpha lost beta and writes alone: beta is outdated.
        let v = a.handle("alpha", 1, solo(false, &["beta"]));
        assert!(v.granted && v.holder.as_deref() == Some("alpha"));
        // alpha's site dies: beta still may not take over (it missed writes).
        a.disconnected(1);
        let v = a.handle("beta", 2, solo(true, &["alpha"]));
        assert!(!v.granted && v.outdated, "{v:?}");
        // The state survives a witness restart.
        drop(a);
        let mut a = Arbiter::load(Some(path.clone())).unwrap();
        let v = a.handle("beta", 3, report(false));
        assert!(v.outdated);
        assert_eq!(v.holder.as_deref(), Some("alpha"));
        // alpha returns, resyncs beta, releases.
        a.handle("alpha", 4, report(true));
        let v = a.handle("alpha", 4, ToWitness::Release { volume: "v".into() });
        assert!(v.granted && v.holder.is_none());
        assert!(!a.handle("beta", 3, report(false)).outdated);
    }

    #[test]
    fn a_takeover_is_granted_once_the_primary_is_gone() {
        let mut a = Arbiter::load(None).unwrap();
        a.handle("alpha", 1, report(true));
        a.handle("beta", 2, report(false));
        a.disconnected(1);
        let v = a.handle("beta", 2, solo(true, &["alpha"]));
        assert!(v.granted, "{v:?}");
        // alpha comes back: it is outdated and may not write alone.
        let v = a.handle("alpha", 5, report(true));
        assert!(v.outdated);
        let v = a.handle("alpha", 5, solo(false, &["beta"]));
        assert!(!v.granted);
    }

    #[test]
    fn an_unwritable_state_file_denies() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missing-dir").join("w.json");
        let mut a = Arbiter::load(Some(path)).unwrap();
        let v = a.handle("alpha", 1, solo(false, &["beta"]));
        assert!(!v.granted);
        assert!(v.reason.contains("not saved"), "{}", v.reason);
        assert!(v.holder.is_none());
    }

    #[test]
    fn a_corrupt_state_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.json");
        std::fs::write(&path, b"{not json").unwrap();
        let e = Arbiter::load(Some(path)).unwrap_err();
        assert!(format!("{e:#}").contains("w.json"), "{e:#}");
    }
}
