//! `tandemd` configuration: a TOML file plus command-line overrides, validated
//! once at start. Every error names the source (file or command line), the
//! field and what is wrong.
//!
//! ```toml
//! [nbd]
//! unix = "/run/tandem/nbd.sock"      # at least one of unix / tcp
//! tcp = "127.0.0.1:10809"
//!
//! [admin]
//! socket = "/run/tandem/admin.sock"  # root-only unix socket for tandemctl
//!
//! [log]
//! level = "info"                     # tracing filter, e.g. "info,tandem_daemon=debug"
//!
//! [metrics]                          # optional; no metrics endpoint when absent
//! listen = "127.0.0.1:9640"          # HTTP: GET /metrics (Prometheus / OpenMetrics text)
//!
//! [runtime]
//! worker_threads = 2                 # async worker threads (default 2, 1 on one CPU)
//!
//! [[export]]
//! name = "vm1"                       # NBD export name
//! backing = "/var/lib/tandem/vm1.img"
//! volume = "vm1"                     # optional: superblock name must match
//! uuid = "…"                         # optional: superblock UUID must match
//! engine = "uring"                   # uring (default) | sync | memory
//! direct = "auto"                    # auto (default) | on | off: O_DIRECT
//! read_only = false
//! queue_depth = 256                  # io_uring entries
//! # diskless = true                  # a diskless client (R28): no backing; needs
//! # size = "64G"                     #   uuid, size (block_size 512 | 4096) and
//! #                                  #   [export.replication] with the replicas as peers
//!
//! [export.replication]               # optional: replicate this export
//! node = "alpha"                     # this node (the SAN of cert)
//! listen = "10.0.0.1:7788"           # QUIC (UDP)
//! cert = "/etc/tandem/alpha.crt"
//! key = "/etc/tandem/alpha.key"
//! ca = "/etc/tandem/ca.crt"
//! role = "secondary"                 # primary | secondary (default)
//! protocol = "C"                     # C (default) | A
//! allow_two_primaries = false        # dual-primary for live migration; needs protocol C
//! resync_rate = "100M"               # bytes/s a resync may send per peer (default: no fixed limit)
//! resync_adaptive = true             # resync yields to application I/O (default)
//! resync_checksums = false           # as sync source, send only blocks whose digests differ (R26)
//! after_split_brain = "disconnect"  # | discard-zero-changes | discard-least-changes | discard-younger-primary
//! on_peer_loss = "continue"          # without a witness: continue (default) | freeze
//! on_no_quorum = "suspend"           # writes nobody grants: suspend (default) | io-error
//! auto_failover = true               # with a witness: promote when the Primary is gone (default)
//! failover_timeout = "2s"            # how long the Primary must be gone first
//! witness = { name = "witness", address = "10.0.0.3:7790" }   # optional third vote
//! peers = [{ name = "beta", address = "10.0.0.2:7788" }]   # diskless = true: a diskless client
//! ```

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::storage::DirectIo;

/// Default admin socket path.
pub const DEFAULT_ADMIN_SOCKET: &str = "/run/tandem/admin.sock";

/// A configuration error: where, which field, what.
#[derive(Debug, thiserror::Error)]
#[error("{source_name}: {field}: {message}")]
pub struct ConfigError {
    /// The file path or "command line".
    pub source_name: String,
    /// Dotted field path, e.g. `export[1].uuid`.
    pub field: String,
    /// What is wrong.
    pub message: String,
}

/// Storage engine choice.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum EngineKind {
    /// io_uring (default).
    #[default]
    Uring,
    /// pread/pwrite on a thread pool.
    Sync,
    /// In memory; the backing file is read at start and never written (tests only).
    Memory,
}

/// `[nbd]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NbdConfig {
    /// Unix socket to listen on.
    pub unix: Option<PathBuf>,
    /// TCP address to listen on.
    pub tcp: Option<SocketAddr>,
}

/// `[admin]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Admin unix socket (mode 0600).
    #[serde(default = "default_admin_socket")]
    pub socket: PathBuf,
}

fn default_admin_socket() -> PathBuf {
    PathBuf::from(DEFAULT_ADMIN_SOCKET)
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            socket: default_admin_socket(),
        }
    }
}

/// `[log]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// A `tracing` filter directive.
    #[serde(default = "default_level")]
    pub level: String,
}

fn default_level() -> String {
    "info".into()
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: default_level(),
        }
    }
}

/// `[runtime]`: the daemon's threads.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeConfig {
    /// Worker threads of the async runtime (1 to [`MAX_WORKER_THREADS`]).
    /// Default: [`default_worker_threads`].
    pub worker_threads: Option<usize>,
}

/// The most worker threads `[runtime].worker_threads` accepts.
pub const MAX_WORKER_THREADS: usize = 256;

/// Worker threads when `[runtime].worker_threads` is not set: two, or one
/// on a single-CPU machine. The data path is a few cheap steps per request
/// (NBD, QUIC, io_uring), and the CPUs belong to the workloads (VMs) the
/// volumes serve; more threads mostly add cross-thread wake-ups.
pub fn default_worker_threads() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get().min(2))
}

/// `n` worker threads are within 1..=[`MAX_WORKER_THREADS`].
fn check_worker_threads(n: usize, source: &str, field: &str) -> Result<(), ConfigError> {
    if (1..=MAX_WORKER_THREADS).contains(&n) {
        return Ok(());
    }
    Err(err(
        source,
        field,
        format!("{n} is not between 1 and {MAX_WORKER_THREADS}"),
    ))
}

impl RuntimeConfig {
    /// The worker threads to start.
    pub fn worker_threads(&self) -> usize {
        self.worker_threads.unwrap_or_else(default_worker_threads)
    }
}

/// `[metrics]`: the Prometheus endpoint (absent: none).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// TCP address of the HTTP `/metrics` listener.
    pub listen: SocketAddr,
}

/// One `[[export]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportConfig {
    /// NBD export name.
    pub name: String,
    /// Backing file or block device (omitted with `diskless`).
    #[serde(default)]
    pub backing: PathBuf,
    /// A diskless client (R28): no backing; reads and writes go to the
    /// replicas named in `[export.replication]`. Needs `uuid` and `size`.
    #[serde(default)]
    pub diskless: bool,
    /// Volume size (e.g. `"64M"`), only with `diskless`: must equal the
    /// replicas' (the handshake checks).
    #[serde(default)]
    pub size: Option<String>,
    /// Logical block size, only with `diskless` (512, the default, or 4096;
    /// must equal the replicas').
    #[serde(default)]
    pub block_size: Option<u32>,
    /// Expected volume name in the superblock.
    pub volume: Option<String>,
    /// Expected volume UUID in the superblock.
    pub uuid: Option<String>,
    /// Description for NBD_OPT_LIST.
    #[serde(default)]
    pub description: String,
    /// Storage engine.
    #[serde(default)]
    pub engine: EngineKind,
    /// O_DIRECT policy.
    #[serde(default)]
    pub direct: DirectIo,
    /// Refuse writes.
    #[serde(default)]
    pub read_only: bool,
    /// io_uring queue depth.
    #[serde(default = "default_queue_depth")]
    pub queue_depth: u32,
    /// Synchronous replication to peers (absent: a local-only volume).
    #[serde(default)]
    pub replication: Option<ReplicationConfig>,
}

/// Role a replicated volume starts in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StartRole {
    /// Accepts frontend writes and replicates them.
    Primary,
    /// Applies the primary's writes; refuses frontend writes (default).
    #[default]
    Secondary,
}

/// Replication protocol.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub enum ProtocolConfig {
    /// Complete when durable locally and acknowledged by every UpToDate peer (default).
    #[default]
    C,
    /// Complete when durable locally and queued for the peers.
    A,
}

/// `[export.replication]`: this volume's replicas and how to reach them.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicationConfig {
    /// This node's name; must be the SAN of `cert`.
    pub node: String,
    /// QUIC address to listen on for this volume's peers.
    pub listen: SocketAddr,
    /// This node's certificate (PEM), signed by the cluster CA.
    pub cert: PathBuf,
    /// This node's private key (PEM).
    pub key: PathBuf,
    /// The cluster CA certificate (PEM).
    pub ca: PathBuf,
    /// Role at start.
    #[serde(default)]
    pub role: StartRole,
    /// Replication protocol.
    #[serde(default)]
    pub protocol: ProtocolConfig,
    /// Dual-primary mode, for live migration only: a second node may be
    /// promoted while this one is Primary (exactly two Primaries; needs
    /// protocol C). Concurrent writes to the same blocks are detected,
    /// reported and ordered the same on both (docs/replication.md, R9).
    #[serde(default)]
    pub allow_two_primaries: bool,
    /// Most bytes per second a resync sends to one peer, e.g. `"100M"`
    /// (default: no fixed limit).
    #[serde(default)]
    pub resync_rate: Option<String>,
    /// While application I/O is in flight, keep at most 2 resync requests
    /// in flight per peer instead of 16 (default on).
    #[serde(default = "default_true")]
    pub resync_adaptive: bool,
    /// Checksum-based resync (docs/replication.md, R26; default off): as
    /// sync source, ask the target for the digests of each marked run and
    /// send only the 4 KiB blocks that differ. Worth it on slow links and
    /// where most marked data is in fact identical (the activity-log
    /// extents resynced after a Primary crash); it costs a read of the
    /// marked data on the target. Only the sync source's setting matters;
    /// set it the same on every replica so it holds whichever way a resync
    /// runs. Every peer must run a build that knows frames 21–22.
    #[serde(default)]
    pub resync_checksums: bool,
    /// What a handshake that finds a split brain does: `disconnect`
    /// (default), `discard-zero-changes`, `discard-least-changes` or
    /// `discard-younger-primary` (docs/replication.md, R24).
    #[serde(default)]
    pub after_split_brain: Option<String>,
    /// Without a witness, what a Primary does when a peer is lost:
    /// `continue` writing alone (default) or `freeze` until it returns.
    #[serde(default)]
    pub on_peer_loss: Option<String>,
    /// Writes neither a peer nor the witness lets complete: `suspend`
    /// (default: held until one does) or `io-error` (failed with EIO).
    #[serde(default)]
    pub on_no_quorum: Option<String>,
    /// With a witness: promote this node when its Primary has been gone
    /// for `failover_timeout` and the witness agrees (default on).
    #[serde(default = "default_true")]
    pub auto_failover: bool,
    /// How long the Primary must be gone before a failover, e.g. `"2s"` or
    /// `"500ms"` (default 2 s).
    #[serde(default)]
    pub failover_timeout: Option<String>,
    /// A witness at a third site (`tandemd witness`).
    #[serde(default)]
    pub witness: Option<PeerConfig>,
    /// The other replicas (1 to 3).
    pub peers: Vec<PeerConfig>,
}

/// One peer of a replicated volume.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerConfig {
    /// The peer's node name (its certificate's SAN).
    pub name: String,
    /// Its QUIC address for this volume.
    pub address: SocketAddr,
    /// The peer is a diskless client of this volume (R28): it holds no
    /// data, so it never needs a resync and never counts as missing writes.
    #[serde(default)]
    pub diskless: bool,
}

fn default_true() -> bool {
    true
}

/// Parses `"2s"`, `"500ms"` or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let t = s.trim();
    let (num, mult) = if let Some(n) = t.strip_suffix("ms") {
        (n, 1u64)
    } else if let Some(n) = t.strip_suffix('s') {
        (n, 1000)
    } else {
        (t, 1000)
    };
    let n: u64 = num
        .trim()
        .parse()
        .map_err(|_| format!("{s:?}: not a duration (e.g. \"2s\" or \"500ms\")"))?;
    n.checked_mul(mult)
        .map(std::time::Duration::from_millis)
        .ok_or_else(|| format!("{s:?}: too long"))
}

impl ExportConfig {
    /// `size` of a diskless export in bytes.
    pub fn diskless_size(&self) -> Result<u64, String> {
        match &self.size {
            None => Err("a diskless export needs the volume's size".into()),
            Some(s) => match crate::parse_size(s) {
                Ok(0) => Err(format!("{s:?}: must be positive")),
                Ok(n) => Ok(n),
                Err(e) => Err(format!("{s:?}: {e}")),
            },
        }
    }
}

impl ReplicationConfig {
    /// `after_split_brain` as a policy.
    pub fn split_brain_policy(&self) -> Result<tandem_core::repl::SplitBrainPolicy, String> {
        match &self.after_split_brain {
            None => Ok(Default::default()),
            Some(s) => tandem_core::repl::SplitBrainPolicy::from_name(s).ok_or_else(|| {
                format!("{s:?}: use disconnect, discard-zero-changes, discard-least-changes or discard-younger-primary")
            }),
        }
    }

    /// `on_peer_loss = "freeze"`.
    pub fn freeze_on_peer_loss(&self) -> Result<bool, String> {
        match self.on_peer_loss.as_deref() {
            None | Some("continue") => Ok(false),
            Some("freeze") => Ok(true),
            Some(s) => Err(format!("{s:?}: use continue or freeze")),
        }
    }

    /// `on_no_quorum`.
    pub fn no_quorum(&self) -> Result<crate::witness::NoQuorum, String> {
        match self.on_no_quorum.as_deref() {
            None | Some("suspend") => Ok(crate::witness::NoQuorum::Suspend),
            Some("io-error") => Ok(crate::witness::NoQuorum::IoError),
            Some(s) => Err(format!("{s:?}: use suspend or io-error")),
        }
    }

    /// `failover_timeout` (default 2 s).
    pub fn failover_timeout(&self) -> Result<std::time::Duration, String> {
        match &self.failover_timeout {
            None => Ok(std::time::Duration::from_secs(2)),
            Some(s) => parse_duration(s),
        }
    }

    /// `resync_rate` in bytes per second (0: no fixed limit).
    pub fn resync_rate_bytes(&self) -> Result<u64, String> {
        match &self.resync_rate {
            None => Ok(0),
            Some(s) => match crate::parse_size(s) {
                Ok(0) => Err(format!(
                    "{s:?}: must be positive (leave it out for no limit)"
                )),
                Ok(n) => Ok(n),
                Err(e) => Err(format!("{s:?}: {e}")),
            },
        }
    }
}

fn default_queue_depth() -> u32 {
    256
}

/// The whole configuration.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// NBD listeners.
    #[serde(default)]
    pub nbd: NbdConfig,
    /// Admin API.
    #[serde(default)]
    pub admin: AdminConfig,
    /// Logging.
    #[serde(default)]
    pub log: LogConfig,
    /// Prometheus metrics endpoint.
    #[serde(default)]
    pub metrics: Option<MetricsConfig>,
    /// Async runtime.
    #[serde(default)]
    pub runtime: RuntimeConfig,
    /// Exports.
    #[serde(default, rename = "export")]
    pub exports: Vec<ExportConfig>,
}

/// Command-line overrides (see `tandemd run --help`).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct Overrides {
    /// TOML configuration file.
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// Serve NBD on this unix socket (overrides [nbd].unix).
    #[arg(long, value_name = "PATH")]
    pub nbd_unix: Option<PathBuf>,
    /// Serve NBD on this TCP address (overrides [nbd].tcp).
    #[arg(long, value_name = "ADDR")]
    pub nbd_tcp: Option<String>,
    /// Admin socket path (overrides [admin].socket).
    #[arg(long, value_name = "PATH")]
    pub admin_socket: Option<PathBuf>,
    /// Add an export: NAME=BACKING (repeatable).
    #[arg(long = "export", value_name = "NAME=BACKING")]
    pub exports: Vec<String>,
    /// Storage engine for --export exports.
    #[arg(long, value_enum, default_value_t = EngineKind::Uring)]
    pub engine: EngineKind,
    /// O_DIRECT for --export exports: auto, on or off.
    #[arg(long, default_value = "auto")]
    pub direct: String,
    /// Log filter (overrides [log].level), e.g. "debug".
    #[arg(long, value_name = "FILTER")]
    pub log_level: Option<String>,
    /// Serve Prometheus metrics over HTTP on this address (overrides [metrics].listen).
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<String>,
    /// Worker threads of the async runtime (overrides [runtime].worker_threads; default 2).
    #[arg(long, value_name = "N")]
    pub worker_threads: Option<usize>,
}

fn err(source: &str, field: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError {
        source_name: source.to_string(),
        field: field.into(),
        message: message.into(),
    }
}

impl Config {
    /// Parses TOML text; `source` names it in errors.
    pub fn parse(text: &str, source: &str) -> Result<Config, ConfigError> {
        toml::from_str(text).map_err(|e| {
            let field = e
                .span()
                .map(|s| {
                    let start = s.start.min(text.len());
                    let line = text[..start].lines().count().max(1);
                    // A value of the wrong type: name its key too.
                    let from = text[..start].rfind('\n').map_or(0, |i| i + 1);
                    let here = text[from..].lines().next().unwrap_or("");
                    match here.split_once('=') {
                        Some((key, _))
                            if start > from + key.len()
                                && !key.trim().is_empty()
                                && !key.contains(['[', '{', '"']) =>
                        {
                            format!("line {line}: {}", key.trim())
                        }
                        _ => format!("line {line}"),
                    }
                })
                .unwrap_or_else(|| "toml".into());
            err(source, field, e.message().to_string())
        })
    }

    /// Loads a file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let source = path.display().to_string();
        let text = std::fs::read_to_string(path)
            .map_err(|e| err(&source, "file", format!("cannot read: {e}")))?;
        Config::parse(&text, &source)
    }

    /// Builds the effective configuration from an optional file and flags, then validates it.
    pub fn from_overrides(o: &Overrides) -> Result<Config, ConfigError> {
        let mut c = match &o.config {
            Some(p) => Config::load(p)?,
            None => Config::default(),
        };
        let cli = "command line";
        if let Some(u) = &o.nbd_unix {
            c.nbd.unix = Some(u.clone());
        }
        if let Some(t) = &o.nbd_tcp {
            let addr = t.parse().map_err(|e| {
                err(
                    cli,
                    "--nbd-tcp",
                    format!("{t:?} is not an address like 127.0.0.1:10809: {e}"),
                )
            })?;
            c.nbd.tcp = Some(addr);
        }
        if let Some(a) = &o.admin_socket {
            c.admin.socket = a.clone();
        }
        if let Some(l) = &o.log_level {
            c.log.level = l.clone();
        }
        if let Some(n) = o.worker_threads {
            check_worker_threads(n, cli, "--worker-threads")?;
            c.runtime.worker_threads = Some(n);
        }
        if let Some(m) = &o.metrics_listen {
            let listen = m.parse().map_err(|e| {
                err(
                    cli,
                    "--metrics-listen",
                    format!("{m:?} is not an address like 127.0.0.1:9640: {e}"),
                )
            })?;
            c.metrics = Some(MetricsConfig { listen });
        }
        let direct = match o.direct.as_str() {
            "auto" => DirectIo::Auto,
            "on" => DirectIo::On,
            "off" => DirectIo::Off,
            other => {
                return Err(err(
                    cli,
                    "--direct",
                    format!("{other:?} is not auto, on or off"),
                ))
            }
        };
        for spec in &o.exports {
            let Some((name, backing)) = spec.split_once('=') else {
                return Err(err(
                    cli,
                    "--export",
                    format!("{spec:?} is not NAME=BACKING"),
                ));
            };
            c.exports.push(ExportConfig {
                name: name.to_string(),
                backing: PathBuf::from(backing),
                diskless: false,
                size: None,
                block_size: None,
                volume: None,
                uuid: None,
                description: String::new(),
                engine: o.engine,
                direct,
                read_only: false,
                queue_depth: default_queue_depth(),
                replication: None,
            });
        }
        let source = o
            .config
            .as_ref()
            .map_or_else(|| cli.to_string(), |p| p.display().to_string());
        c.validate(&source)?;
        Ok(c)
    }

    /// Checks cross-field rules.
    pub fn validate(&self, source: &str) -> Result<(), ConfigError> {
        if let Some(n) = self.runtime.worker_threads {
            check_worker_threads(n, source, "runtime.worker_threads")?;
        }
        if self.nbd.unix.is_none() && self.nbd.tcp.is_none() {
            return Err(err(
                source,
                "nbd",
                "no listener: set nbd.unix and/or nbd.tcp (or --nbd-unix/--nbd-tcp)",
            ));
        }
        if self.exports.is_empty() {
            return Err(err(
                source,
                "export",
                "no exports: add an [[export]] table (or --export NAME=BACKING)",
            ));
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log.level) {
            return Err(err(
                source,
                "log.level",
                format!("{:?} is not a tracing filter: {e}", self.log.level),
            ));
        }
        if let Some(m) = &self.metrics {
            if m.listen.port() == 0 {
                return Err(err(
                    source,
                    "metrics.listen",
                    format!("{}: give a fixed port for Prometheus to scrape", m.listen),
                ));
            }
            if self.nbd.tcp == Some(m.listen) {
                return Err(err(
                    source,
                    "metrics.listen",
                    format!("{} is also nbd.tcp", m.listen),
                ));
            }
        }
        let mut names = HashSet::new();
        for (i, e) in self.exports.iter().enumerate() {
            let f = |field: &str| format!("export[{i}].{field}");
            if e.name.is_empty() || e.name.len() > 4096 {
                return Err(err(source, f("name"), "must be 1 to 4096 bytes"));
            }
            if !names.insert(e.name.as_str()) {
                return Err(err(
                    source,
                    f("name"),
                    format!("{:?} is used by another export", e.name),
                ));
            }
            if e.diskless {
                if !e.backing.as_os_str().is_empty() {
                    return Err(err(
                        source,
                        f("backing"),
                        "a diskless export has no backing",
                    ));
                }
                if e.uuid.is_none() {
                    return Err(err(
                        source,
                        f("uuid"),
                        "a diskless export needs the volume's uuid",
                    ));
                }
                if let Err(why) = e.diskless_size() {
                    return Err(err(source, f("size"), why));
                }
                if !matches!(e.block_size, None | Some(512) | Some(4096)) {
                    return Err(err(source, f("block_size"), "must be 512 or 4096"));
                }
                let Some(r) = &e.replication else {
                    return Err(err(
                        source,
                        f("replication"),
                        "a diskless export needs [export.replication] with the replicas as peers",
                    ));
                };
                if r.role == StartRole::Primary {
                    return Err(err(
                        source,
                        format!("export[{i}].replication.role"),
                        "a diskless client starts secondary; promote it once a replica is connected",
                    ));
                }
                if let Some(j) = r.peers.iter().position(|p| p.diskless) {
                    return Err(err(
                        source,
                        format!("export[{i}].replication.peers[{j}].diskless"),
                        "a diskless client's peers must be replicas",
                    ));
                }
            } else {
                if e.backing.as_os_str().is_empty() {
                    return Err(err(source, f("backing"), "empty path"));
                }
                if e.size.is_some() || e.block_size.is_some() {
                    return Err(err(
                        source,
                        f(if e.size.is_some() {
                            "size"
                        } else {
                            "block_size"
                        }),
                        "only for a diskless export (a backing's superblock holds it)",
                    ));
                }
            }
            if let Some(u) = &e.uuid {
                if tandem_core::superblock::parse_uuid(u).is_none() {
                    return Err(err(source, f("uuid"), format!("{u:?} is not a UUID")));
                }
            }
            if let Some(v) = &e.volume {
                if v.len() > tandem_core::superblock::MAX_NAME_LEN {
                    return Err(err(source, f("volume"), "longer than 64 bytes"));
                }
            }
            if let Some(r) = &e.replication {
                let f = |field: &str| format!("export[{i}].replication.{field}");
                if let Err(why) = crate::transport::certs::validate_node_name(&r.node) {
                    return Err(err(source, f("node"), why.to_string()));
                }
                if r.peers.is_empty() || r.peers.len() > 3 {
                    return Err(err(source, f("peers"), "give 1 to 3 peers"));
                }
                for (j, p) in r.peers.iter().enumerate() {
                    if let Err(why) = crate::transport::certs::validate_node_name(&p.name) {
                        return Err(err(source, f(&format!("peers[{j}].name")), why.to_string()));
                    }
                    if p.name == r.node {
                        return Err(err(
                            source,
                            f(&format!("peers[{j}].name")),
                            "is this node itself",
                        ));
                    }
                }
                if e.read_only {
                    return Err(err(
                        source,
                        f("role"),
                        "a replicated export cannot be read_only",
                    ));
                }
                if let Err(why) = r.resync_rate_bytes() {
                    return Err(err(source, f("resync_rate"), why));
                }
                if let Err(why) = r.split_brain_policy() {
                    return Err(err(source, f("after_split_brain"), why));
                }
                if let Err(why) = r.freeze_on_peer_loss() {
                    return Err(err(source, f("on_peer_loss"), why));
                }
                if let Err(why) = r.no_quorum() {
                    return Err(err(source, f("on_no_quorum"), why));
                }
                if let Err(why) = r.failover_timeout() {
                    return Err(err(source, f("failover_timeout"), why));
                }
                if let Some(w) = &r.witness {
                    if let Err(why) = crate::transport::certs::validate_node_name(&w.name) {
                        return Err(err(source, f("witness.name"), why.to_string()));
                    }
                    if w.name == r.node || r.peers.iter().any(|p| p.name == w.name) {
                        return Err(err(
                            source,
                            f("witness.name"),
                            "the witness must be a node of its own (not this node or a peer)",
                        ));
                    }
                    if r.freeze_on_peer_loss().unwrap_or(false) {
                        return Err(err(
                            source,
                            f("on_peer_loss"),
                            "with a witness, the witness decides (leave on_peer_loss out)",
                        ));
                    }
                }
                if r.allow_two_primaries && r.protocol != ProtocolConfig::C {
                    return Err(err(
                        source,
                        f("allow_two_primaries"),
                        "dual-primary needs protocol = \"C\" (every write acknowledged by both Primaries)",
                    ));
                }
            }
            if !(1..=4096).contains(&e.queue_depth) || !e.queue_depth.is_power_of_two() {
                return Err(err(
                    source,
                    f("queue_depth"),
                    format!("{} is not a power of two from 1 to 4096", e.queue_depth),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_file_parses() {
        let c = Config::parse(
            r#"
            [nbd]
            unix = "/tmp/x.sock"
            [[export]]
            name = "a"
            backing = "/tmp/a.img"
            engine = "sync"
            direct = "off"
            uuid = "01234567-89ab-cdef-0123-456789abcdef"
            "#,
            "t.toml",
        )
        .unwrap();
        c.validate("t.toml").unwrap();
        assert_eq!(c.exports[0].engine, EngineKind::Sync);
        assert_eq!(c.exports[0].direct, DirectIo::Off);
        assert_eq!(c.admin.socket, PathBuf::from(DEFAULT_ADMIN_SOCKET));
    }

    #[test]
    fn errors_name_file_field_and_problem() {
        let e = Config::parse("[nbd]\nunix = 3\n", "f.toml")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("f.toml: line 2:"), "{e}");
        let e = Config::parse("[nbd]\nbogus = 1\n", "f.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("bogus"), "{e}");
        let c = Config::parse(
            "[nbd]\nunix='/s'\n[[export]]\nname='a'\nbacking='/a'\nuuid='nope'\n",
            "f.toml",
        )
        .unwrap();
        let e = c.validate("f.toml").unwrap_err().to_string();
        assert_eq!(e, "f.toml: export[0].uuid: \"nope\" is not a UUID");
        let c = Config::parse("[[export]]\nname='a'\nbacking='/a'\n", "f.toml").unwrap();
        assert!(c
            .validate("f.toml")
            .unwrap_err()
            .to_string()
            .contains("f.toml: nbd: no listener"));
        let c = Config::parse(
            "[nbd]\nunix='/s'\n[[export]]\nname='a'\nbacking='/a'\n[[export]]\nname='a'\nbacking='/b'\n",
            "f.toml",
        )
        .unwrap();
        assert!(c
            .validate("f.toml")
            .unwrap_err()
            .to_string()
            .contains("export[1].name"));
    }

    const REPLICATED: &str = r#"
        [nbd]
        unix = "/s"
        [[export]]
        name = "a"
        backing = "/a"
        [export.replication]
        node = "alpha"
        listen = "127.0.0.1:7788"
        cert = "/c"
        key = "/k"
        ca = "/ca"
        peers = [{ name = "beta", address = "127.0.0.1:7789" }]
        "#;

    #[test]
    fn a_diskless_export_needs_uuid_size_and_replicas_and_no_backing() {
        let ok = REPLICATED.replace(
            "backing = \"/a\"",
            "diskless = true\n        uuid = \"01234567-89ab-cdef-0123-456789abcdef\"\n        size = \"64M\"",
        );
        let c = Config::parse(&ok, "f.toml").unwrap();
        c.validate("f.toml").unwrap();
        assert_eq!(c.exports[0].diskless_size(), Ok(64 << 20));
        let refused = |text: &str| {
            Config::parse(text, "f.toml")
                .and_then(|c| c.validate("f.toml"))
                .unwrap_err()
                .to_string()
        };
        let e = refused(&ok.replace("diskless = true", "diskless = true\nbacking = \"/a\""));
        assert!(e.contains("export[0].backing"), "{e}");
        let e = refused(&ok.replace("size = \"64M\"", ""));
        assert!(e.contains("export[0].size"), "{e}");
        let e = refused(&ok.replace("uuid = \"01234567-89ab-cdef-0123-456789abcdef\"", ""));
        assert!(e.contains("export[0].uuid"), "{e}");
        let e = refused(&ok.replace("peers = [", "role = \"primary\"\npeers = ["));
        assert!(e.contains("export[0].replication.role"), "{e}");
        let e = refused(&ok.replace("7789\" }", "7789\", diskless = true }"));
        assert!(e.contains("peers[0].diskless"), "{e}");
        // size belongs to diskless exports only; replicas mark client peers.
        let e = refused(&REPLICATED.replace("backing = \"/a\"", "backing = \"/a\"\nsize = \"1M\""));
        assert!(e.contains("export[0].size"), "{e}");
        let c = Config::parse(
            &REPLICATED.replace("7789\" }", "7789\", diskless = true }"),
            "f.toml",
        )
        .unwrap();
        c.validate("f.toml").unwrap();
        assert!(c.exports[0].replication.as_ref().unwrap().peers[0].diskless);
    }

    #[test]
    fn resync_rate_and_adaptive_mode() {
        let c = Config::parse(REPLICATED, "f.toml").unwrap();
        let r = c.exports[0].replication.as_ref().unwrap();
        assert_eq!(r.resync_rate_bytes(), Ok(0));
        assert!(r.resync_adaptive);
        let set = format!("{REPLICATED}resync_rate = \"25M\"\nresync_adaptive = false\n");
        let c = Config::parse(&set, "f.toml").unwrap();
        c.validate("f.toml").unwrap();
        let r = c.exports[0].replication.as_ref().unwrap();
        assert_eq!(r.resync_rate_bytes(), Ok(25 << 20));
        assert!(!r.resync_adaptive);
        for bad in ["fast", "0"] {
            let t = format!("{REPLICATED}resync_rate = \"{bad}\"\n");
            let e = Config::parse(&t, "f.toml")
                .unwrap()
                .validate("f.toml")
                .unwrap_err()
                .to_string();
            assert!(
                e.starts_with("f.toml: export[0].replication.resync_rate:"),
                "{e}"
            );
        }
    }

    #[test]
    fn resync_checksums_defaults_off_and_must_be_a_boolean() {
        let c = Config::parse(REPLICATED, "f.toml").unwrap();
        assert!(!c.exports[0].replication.as_ref().unwrap().resync_checksums);
        let on = format!("{REPLICATED}resync_checksums = true\n");
        let c = Config::parse(&on, "f.toml").unwrap();
        c.validate("f.toml").unwrap();
        assert!(c.exports[0].replication.as_ref().unwrap().resync_checksums);
        let bad = format!("{REPLICATED}resync_checksums = \"yes\"\n");
        let e = Config::parse(&bad, "f.toml").unwrap_err().to_string();
        assert!(
            e.starts_with("f.toml: line 14: resync_checksums: invalid type"),
            "{e}"
        );
    }

    #[test]
    fn allow_two_primaries_defaults_off_and_needs_protocol_c() {
        let c = Config::parse(REPLICATED, "f.toml").unwrap();
        c.validate("f.toml").unwrap();
        let r = c.exports[0].replication.as_ref().unwrap();
        assert!(!r.allow_two_primaries);
        assert_eq!(r.protocol, ProtocolConfig::C);
        let on = format!("{REPLICATED}allow_two_primaries = true\n");
        let c = Config::parse(&on, "f.toml").unwrap();
        c.validate("f.toml").unwrap();
        assert!(
            c.exports[0]
                .replication
                .as_ref()
                .unwrap()
                .allow_two_primaries
        );
        let a = format!("{on}protocol = \"A\"\n");
        let e = Config::parse(&a, "f.toml")
            .unwrap()
            .validate("f.toml")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("f.toml: export[0].replication.allow_two_primaries: dual-primary needs protocol = \"C\""),
            "{e}"
        );
    }

    #[test]
    fn overrides_add_exports() {
        let o = Overrides {
            nbd_unix: Some("/s".into()),
            exports: vec!["v=/tmp/v.img".into()],
            direct: "off".into(),
            ..Default::default()
        };
        let c = Config::from_overrides(&o).unwrap();
        assert_eq!(c.exports[0].name, "v");
        assert_eq!(c.exports[0].direct, DirectIo::Off);
        let bad = Overrides {
            exports: vec!["novalue".into()],
            ..o
        };
        let e = Config::from_overrides(&bad).unwrap_err().to_string();
        assert!(e.starts_with("command line: --export:"), "{e}");
    }

    #[test]
    fn worker_threads_default_section_and_flag() {
        let base = "[nbd]\nunix='/s'\n[[export]]\nname='a'\nbacking='/a'\n";
        let c = Config::parse(base, "f.toml").unwrap();
        c.validate("f.toml").unwrap();
        assert_eq!(c.runtime.worker_threads(), default_worker_threads());
        assert!((1..=2).contains(&default_worker_threads()));

        let c = Config::parse(&format!("{base}[runtime]\nworker_threads = 1\n"), "f.toml").unwrap();
        c.validate("f.toml").unwrap();
        assert_eq!(c.runtime.worker_threads(), 1);
        let c = Config::parse(&format!("{base}[runtime]\nworker_threads = 0\n"), "f.toml").unwrap();
        let e = c.validate("f.toml").unwrap_err().to_string();
        assert_eq!(
            e,
            "f.toml: runtime.worker_threads: 0 is not between 1 and 256"
        );
        let e = Config::parse(
            &format!("{base}[runtime]\nworker_threads = 'many'\n"),
            "f.toml",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("worker_threads"), "{e}");

        let mut o = Overrides {
            nbd_unix: Some("/s".into()),
            exports: vec!["a=/a".into()],
            worker_threads: Some(3),
            direct: "auto".into(),
            ..Default::default()
        };
        assert_eq!(
            Config::from_overrides(&o).unwrap().runtime.worker_threads(),
            3
        );
        o.worker_threads = Some(0);
        let e = Config::from_overrides(&o).unwrap_err().to_string();
        assert!(
            e.contains("--worker-threads: 0 is not between 1 and 256"),
            "{e}"
        );
    }

    #[test]
    fn metrics_section_and_flag() {
        let base = "[nbd]\nunix='/s'\n[[export]]\nname='a'\nbacking='/a'\n";
        let c = Config::parse(base, "f.toml").unwrap();
        c.validate("f.toml").unwrap();
        assert!(c.metrics.is_none(), "metrics must be off by default");

        let c = Config::parse(
            &format!("{base}[metrics]\nlisten = '127.0.0.1:9640'\n"),
            "f.toml",
        )
        .unwrap();
        c.validate("f.toml").unwrap();
        assert_eq!(
            c.metrics.as_ref().map(|m| m.listen),
            Some("127.0.0.1:9640".parse().unwrap())
        );

        let e = Config::parse(&format!("{base}[metrics]\nlisten = 'nope'\n"), "f.toml")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("f.toml: line 7:"), "{e}");
        let e = Config::parse(
            &format!("{base}[metrics]\nlisten='127.0.0.1:1'\nport = 3\n"),
            "f.toml",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("unknown field `port`"), "{e}");
        let c = Config::parse(
            &format!("{base}[metrics]\nlisten = '127.0.0.1:0'\n"),
            "f.toml",
        )
        .unwrap();
        let e = c.validate("f.toml").unwrap_err().to_string();
        assert!(e.starts_with("f.toml: metrics.listen: 127.0.0.1:0:"), "{e}");
        let c = Config::parse(
            "[nbd]\ntcp='127.0.0.1:10809'\n[metrics]\nlisten='127.0.0.1:10809'\n[[export]]\nname='a'\nbacking='/a'\n",
            "f.toml",
        )
        .unwrap();
        let e = c.validate("f.toml").unwrap_err().to_string();
        assert_eq!(e, "f.toml: metrics.listen: 127.0.0.1:10809 is also nbd.tcp");

        let o = Overrides {
            nbd_unix: Some("/s".into()),
            exports: vec!["v=/tmp/v.img".into()],
            direct: "auto".into(),
            metrics_listen: Some("[::1]:9641".into()),
            ..Default::default()
        };
        let c = Config::from_overrides(&o).unwrap();
        assert_eq!(
            c.metrics.map(|m| m.listen),
            Some("[::1]:9641".parse().unwrap())
        );
        let bad = Overrides {
            metrics_listen: Some("localhost".into()),
            ..o
        };
        let e = Config::from_overrides(&bad).unwrap_err().to_string();
        assert!(
            e.starts_with("command line: --metrics-listen: \"localhost\" is not an address"),
            "{e}"
        );
    }
}
