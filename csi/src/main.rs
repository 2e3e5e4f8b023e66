//! `tandem-csi`: the CSI driver binary (controller or node mode).

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tandem_csi::controller::{ControllerService, TestHooks};
use tandem_csi::csi::controller_server::ControllerServer;
use tandem_csi::csi::identity_server::IdentityServer;
use tandem_csi::identity::IdentityService;
use tandem_csi::inventory::Inventory;
use tandem_csi::server;
use tandem_csi::store::FileStore;

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
        /// Directory of the file volume-record store.
        #[arg(long, default_value = "/var/lib/tandem-csi/volumes")]
        state_dir: PathBuf,
        /// Storage-node inventory (TOML: [[node]] name, capacity_bytes, topology).
        #[arg(long)]
        nodes: PathBuf,
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
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("tokio runtime")?;
    let path = server::socket_path(&cli.endpoint)?;
    rt.block_on(async move {
        let router = match cli.mode {
            Mode::Controller { state_dir, nodes } => {
                let inventory = Inventory::load(&nodes)?;
                let store = FileStore::open(&state_dir).map_err(|e| anyhow::anyhow!("{e}"))?;
                let ctrl =
                    ControllerService::new(Arc::new(store), inventory, TestHooks::from_env());
                tracing::info!(endpoint = %path.display(), "tandem-csi controller");
                tonic::transport::Server::builder()
                    .add_service(IdentityServer::new(IdentityService))
                    .add_service(ControllerServer::new(ctrl))
            }
        };
        let listener = server::bind(&path)?;
        server::serve(router, listener, &path).await
    })
}
