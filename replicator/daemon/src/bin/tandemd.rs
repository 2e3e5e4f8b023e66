//! `tandemd`: the Tandem daemon.

use anyhow::Result;
use clap::{Parser, Subcommand};
use tandem_daemon::config::{Config, Overrides};
use tandem_daemon::demo::DemoArgs;
use tandem_daemon::demo_sites::SitesArgs;

/// Tandem block replication daemon: serves volumes over NBD.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve the configured exports until SIGINT/SIGTERM.
    Run(Overrides),
    /// Run the two-site demo: two sites and a witness on loopback, a
    /// workload, site A killed, site B takes over, every acknowledged write
    /// verified, site A resynced (`--single-node` for the one-node demo).
    Demo(SitesArgs),
    /// Run a witness: a diskless third vote for replicated volumes (who
    /// may write alone, who may take over; docs/replication.md, R25).
    Witness(tandem_daemon::witness::WitnessArgs),
}

fn init_logging(filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(filter));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

fn main() {
    let cli = Cli::parse();
    if let Err(e) = real_main(cli) {
        eprintln!("tandemd: {e:#}");
        std::process::exit(1);
    }
}

fn runtime(worker_threads: usize) -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(worker_threads)
        .enable_all()
        .thread_name("tandemd")
        .build()?)
}

fn real_main(cli: Cli) -> Result<()> {
    let default_rt = || runtime(tandem_daemon::config::default_worker_threads());
    match cli.command {
        Cmd::Run(o) => {
            let config = Config::from_overrides(&o)?;
            init_logging(&config.log.level);
            let rt = runtime(config.runtime.worker_threads())?;
            rt.block_on(tandem_daemon::daemon::run(config))
        }
        Cmd::Witness(args) => {
            init_logging(&args.log_level);
            default_rt()?.block_on(tandem_daemon::witness::run(args))
        }
        Cmd::Demo(args) if args.single_node => {
            init_logging("warn");
            default_rt()?.block_on(tandem_daemon::demo::run(DemoArgs {
                size: args.size,
                dir: args.dir,
                serve: args.serve,
                engine: tandem_daemon::config::EngineKind::Uring,
            }))
        }
        Cmd::Demo(args) => {
            init_logging("warn");
            default_rt()?.block_on(tandem_daemon::demo_sites::run(args))
        }
    }
}
