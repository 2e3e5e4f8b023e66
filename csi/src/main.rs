//! `tandem-csi`: the CSI driver binary (controller or node mode).

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tandem_csi::agent::TlsFiles;
use tandem_csi::controller::{ControllerService, TestHooks};
use tandem_csi::csi::controller_server::ControllerServer;
use tandem_csi::csi::identity_server::IdentityServer;
use tandem_csi::csi::node_server::NodeServer;
use tandem_csi::identity::IdentityService;
use tandem_csi::inventory::{valid_node_name, Inventory};
use tandem_csi::node::{NodeConfig, NodeService};
use tandem_csi::server;
use tandem_csi::store::StoreKind;

#[derive(Parser)]
#[command(name = "tandem-csi", version, about = "Tandem CSI driver")]
struct Cli {
    /// CSI endpoint: unix:///path/to/csi.sock
    #[arg(long, global = true, default_value = "unix:///csi/csi.sock")]
    endpoint: String,
    /// Log filter (RUST_LOG syntax).
    #[arg(long, global = true, default_value = "info")]
    log_level: String,
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand)]
enum Mode {
    /// Identity + Controller services.
    Controller {
        /// The volume-record store: file:DIR (one JSON file per volume;
        /// standalone use) or kubernetes (TandemVolume custom resources;
        /// in-cluster configuration or KUBECONFIG). Default:
        /// file:/var/lib/tandem-csi/volumes.
        #[arg(long, value_name = "file:DIR|kubernetes")]
        store: Option<StoreKind>,
        /// Deprecated: the same as --store file:DIR.
        #[arg(long, conflicts_with = "store")]
        state_dir: Option<PathBuf>,
        /// Storage-node inventory (TOML: [[node]] name, capacity_bytes, topology).
        #[arg(long)]
        nodes: PathBuf,
        /// UDP ports replicas listen on for their peers, LOW-HIGH (one per
        /// replica and volume, distinct per node address).
        #[arg(long, default_value = "7800-8799", value_parser = parse_ports)]
        replication_ports: std::ops::RangeInclusive<u16>,
    },
    /// Identity + Node services (run on every storage node, as root).
    Node {
        /// This node's id; must match the controller's inventory.
        #[arg(long)]
        node_id: String,
        /// A topology label this node reports: KEY=VALUE (repeatable),
        /// e.g. topology.kubernetes.io/zone=room-a.
        #[arg(long = "topology", value_name = "KEY=VALUE")]
        topology: Vec<String>,
        /// Staged-volume records and per-volume run directories.
        #[arg(long, default_value = "/var/lib/tandem-csi/node")]
        state_dir: PathBuf,
        /// Backing files of local replicas.
        #[arg(long, default_value = "/var/lib/tandem/volumes")]
        data_dir: PathBuf,
        /// The tandemd binary.
        #[arg(long, default_value = "tandemd")]
        tandemd: PathBuf,
        /// The tandemctl binary.
        #[arg(long, default_value = "tandemctl")]
        tandemctl: PathBuf,
        /// The volume-record store, the controller's (file:DIR, a shared
        /// directory, or kubernetes); enables the replica agent, which runs
        /// every replica the records place on this node. Without it
        /// volumes are served unreplicated.
        #[arg(long, value_name = "file:DIR|kubernetes")]
        store: Option<StoreKind>,
        /// Deprecated: the same as --store file:DIR.
        #[arg(long, conflicts_with = "store")]
        volumes_dir: Option<PathBuf>,
        /// Cluster CA certificate (peer mutual TLS of replicated volumes).
        #[arg(long, requires_all = ["tls_cert", "tls_key"])]
        tls_ca: Option<PathBuf>,
        /// This node's certificate; its SAN must be --node-id.
        #[arg(long, requires_all = ["tls_ca", "tls_key"])]
        tls_cert: Option<PathBuf>,
        /// This node's private key.
        #[arg(long, requires_all = ["tls_ca", "tls_cert"])]
        tls_key: Option<PathBuf>,
        /// How a staged volume becomes a block device: the kernel nbd driver
        /// over netlink (`nbd`), the built-in FUSE client + a loop device
        /// (`fuse`), nbdfuse + a loop device (`nbdfuse`: no online
        /// growth), or the kernel driver where it exists and the built-in
        /// FUSE client otherwise (`auto`).
        #[arg(long, value_enum, default_value = "auto")]
        attacher: tandem_csi::node::Attacher,
    },
    /// Serve an NBD export as the file MOUNTPOINT/nbd through FUSE (the
    /// node plugin runs this for each staged volume; a loop device makes
    /// it a block device). The file grows online when truncated to a size
    /// the export has. Runs until unmounted.
    FuseNbd {
        /// The NBD server's unix socket.
        #[arg(long)]
        socket: PathBuf,
        /// The export name.
        #[arg(long)]
        export: String,
        /// Written with this process's pid once mounted.
        #[arg(long)]
        pidfile: Option<PathBuf>,
        /// An empty directory to mount on.
        mountpoint: PathBuf,
    },
}

fn main() {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&cli.log_level)),
        )
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    if let Err(e) = run(cli) {
        eprintln!("tandem-csi: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    if let Mode::FuseNbd {
        socket,
        export,
        pidfile,
        mountpoint,
    } = &cli.mode
    {
        return tandem_csi::fuse_nbd::run(socket, export, mountpoint, pidfile.as_deref());
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("tokio runtime")?;
    let path = server::socket_path(&cli.endpoint)?;
    rt.block_on(async move {
        let router = match cli.mode {
            Mode::Controller {
                store,
                state_dir,
                nodes,
                replication_ports,
            } => {
                let inventory = Inventory::load(&nodes)?;
                let kind = match (store, state_dir) {
                    (Some(kind), _) => kind,
                    (None, Some(dir)) => {
                        tracing::warn!(
                            "--state-dir is deprecated: use --store file:{}",
                            dir.display()
                        );
                        StoreKind::File(dir)
                    }
                    (None, None) => StoreKind::File(DEFAULT_STORE_DIR.into()),
                };
                let store = kind
                    .open()
                    .map_err(|e| anyhow::anyhow!("--store {kind}: {e}"))?;
                let ctrl = ControllerService::new(store, inventory, TestHooks::from_env())
                    .with_replication_ports(replication_ports);
                tracing::info!(endpoint = %path.display(), store = %kind, "tandem-csi controller");
                tonic::transport::Server::builder()
                    .add_service(IdentityServer::new(IdentityService::default()))
                    .add_service(ControllerServer::new(ctrl))
            }
            Mode::Node {
                node_id,
                topology,
                state_dir,
                data_dir,
                tandemd,
                tandemctl,
                store,
                volumes_dir,
                tls_ca,
                tls_cert,
                tls_key,
                attacher,
            } => {
                if !valid_node_name(&node_id) {
                    anyhow::bail!("--node-id {node_id:?}: expected 1 to 253 of a-z A-Z 0-9 - _ .");
                }
                let mut labels = BTreeMap::new();
                for t in &topology {
                    let (k, v) = t
                        .split_once('=')
                        .filter(|(k, v)| !k.is_empty() && !v.is_empty())
                        .ok_or_else(|| anyhow::anyhow!("--topology {t:?}: expected KEY=VALUE"))?;
                    labels.insert(k.to_string(), v.to_string());
                }
                let mut required_programs: Vec<PathBuf> = vec![
                    tandemd.clone(),
                    tandemctl.clone(),
                    "mount".into(),
                    "umount".into(),
                    "blkid".into(),
                ];
                let mut required_devices: Vec<PathBuf> = Vec::new();
                // The kernel nbd attacher needs neither FUSE nor loop
                // devices; `auto` may fall back to them.
                if attacher == tandem_csi::node::Attacher::Nbdfuse {
                    required_programs.push("nbdfuse".into());
                }
                if attacher != tandem_csi::node::Attacher::Nbd {
                    required_programs.extend(["fusermount3", "losetup"].map(PathBuf::from));
                    required_devices.extend(["/dev/fuse", "/dev/loop-control"].map(PathBuf::from));
                }
                let identity = IdentityService {
                    required_programs,
                    required_devices,
                };
                for m in identity.missing() {
                    tracing::warn!("missing {m}: Probe reports not ready until it is installed");
                }
                let store = match (store, volumes_dir) {
                    (Some(kind), _) => Some(kind),
                    (None, Some(dir)) => {
                        tracing::warn!(
                            "--volumes-dir is deprecated: use --store file:{}",
                            dir.display()
                        );
                        Some(StoreKind::File(dir))
                    }
                    (None, None) => None,
                };
                let store_set = store.is_some();
                let tls_set = tls_cert.is_some();
                let node = NodeService::new(NodeConfig {
                    node_id,
                    topology: labels,
                    state_dir,
                    data_dir,
                    tandemd,
                    tandemctl,
                    store,
                    tls: match (tls_ca, tls_cert, tls_key) {
                        (Some(ca), Some(cert), Some(key)) => Some(TlsFiles { ca, cert, key }),
                        _ => None,
                    },
                    attacher,
                })?;
                if store_set && !tls_set {
                    tracing::warn!("--store without --tls-ca/--tls-cert/--tls-key: volumes with more than one replica cannot be replicated on this node");
                }
                if let Some(agent) = node.agent() {
                    tracing::info!(
                        "replica agent on: reconciling every {:?}",
                        tandem_csi::agent::RECONCILE_EVERY
                    );
                    tokio::spawn(agent.run());
                }
                tracing::info!(endpoint = %path.display(), "tandem-csi node");
                tonic::transport::Server::builder()
                    .add_service(IdentityServer::new(identity))
                    .add_service(NodeServer::new(node))
            }
            Mode::FuseNbd { .. } => unreachable!("served above"),
        };
        let listener = server::bind(&path)?;
        server::serve(router, listener, &path).await
    })
}

/// The controller's store without --store or --state-dir.
const DEFAULT_STORE_DIR: &str = "/var/lib/tandem-csi/volumes";

/// `LOW-HIGH`, a non-empty port range.
fn parse_ports(s: &str) -> Result<std::ops::RangeInclusive<u16>, String> {
    let (lo, hi) = s
        .split_once('-')
        .ok_or_else(|| format!("{s:?}: expected LOW-HIGH, e.g. 7800-8799"))?;
    let lo: u16 = lo.trim().parse().map_err(|e| format!("{lo:?}: {e}"))?;
    let hi: u16 = hi.trim().parse().map_err(|e| format!("{hi:?}: {e}"))?;
    if lo == 0 || lo > hi {
        return Err(format!("{s:?}: expected 1 <= LOW <= HIGH"));
    }
    Ok(lo..=hi)
}
