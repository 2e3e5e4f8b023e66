//! Running `tandemd`: open every export, listen, serve until a signal.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use tandem_core::superblock::{self, SUPERBLOCK_SIZE};
use tokio::net::TcpListener;
use tracing::{error, info, warn};

use crate::config::{
    Config, EngineKind, ExportConfig, ProtocolConfig, ReplicationConfig, StartRole,
};
use crate::export::{Export, Exports};
use crate::metrics::Metrics;
use crate::nbd::server::{self, Shutdown};
use crate::replication::{self, Replicator};
use crate::storage::{
    faulty::{FaultSwitch, FaultyEngine},
    memory::MemoryEngine,
    sync::SyncEngine,
    uring::UringEngine,
    Backing, Engine, IoBuf,
};
use crate::transport::{PeerEndpoint, TlsIdentity};
use crate::volume::{Expect, Volume};
use tandem_core::repl;

/// Reads the block size from a backing's superblock with plain file I/O, so
/// the engine can pick direct I/O knowing the smallest request it will see.
/// Any problem yields 512 (the smallest); the volume open reports real errors.
fn peek_block_size(path: &Path) -> u32 {
    use std::io::Read;
    let mut buf = vec![0u8; 2 * SUPERBLOCK_SIZE];
    let ok = std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut buf))
        .is_ok();
    if !ok {
        return 512;
    }
    superblock::select(&buf[..SUPERBLOCK_SIZE], &buf[SUPERBLOCK_SIZE..])
        .map_or(512, |s| s.superblock.block_size)
}

/// How long `tandemd` waits at start-up for a backing locked by another
/// process (see [`Backing::lock_waiting`]): long enough for a killed
/// daemon's in-flight I/O to drain, short enough that a second daemon on a
/// backing in use is refused promptly.
pub const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Opens the storage engine for an export.
pub async fn open_engine(e: &ExportConfig) -> Result<Arc<dyn Engine>> {
    let path = &e.backing;
    let min_align = peek_block_size(path);
    Ok(match e.engine {
        EngineKind::Uring => {
            let b = Backing::open(path, e.direct, e.read_only, min_align)?;
            b.lock_waiting(!e.read_only, LOCK_WAIT).await?;
            Arc::new(UringEngine::new(b, e.queue_depth)?)
        }
        EngineKind::Sync => {
            let b = Backing::open(path, e.direct, e.read_only, min_align)?;
            b.lock_waiting(!e.read_only, LOCK_WAIT).await?;
            Arc::new(SyncEngine::new(b))
        }
        EngineKind::Memory => {
            let data = std::fs::read(path)
                .with_context(|| format!("{}: reading into memory", path.display()))?;
            let m = MemoryEngine::new(data.len() as u64);
            let (_, res) = m.write(0, IoBuf::from_slice(&data), false).await;
            res?;
            Arc::new(m)
        }
    })
}

/// Opens one export's volume, checking its superblock against the config,
/// and registers its metrics in `metrics`.
pub async fn open_export(e: &ExportConfig, metrics: &Metrics) -> Result<Arc<Export>> {
    if e.diskless {
        return open_diskless_export(e, metrics);
    }
    // Every engine is wrapped for fault injection (admin `inject_fault`,
    // root only); disarmed it costs one atomic load per operation.
    let faults = FaultSwitch::new();
    let engine: Arc<dyn Engine> =
        Arc::new(FaultyEngine::new(open_engine(e).await?, faults.clone()));
    let expect = Expect {
        name: e.volume.clone(),
        uuid: e.uuid.as_deref().and_then(superblock::parse_uuid),
    };
    let volume = Volume::open(engine, &e.backing, &expect, e.read_only).await?;
    let sb = volume.superblock();
    info!(
        export = %e.name, volume = %sb.name, uuid = %sb.uuid_string(), size = sb.size,
        block_size = sb.block_size, engine = volume.engine().kind(),
        alignment = volume.engine().alignment(), backing = %e.backing.display(),
        "export ready"
    );
    let volume = Arc::new(volume);
    let mut export = Export::new(e.name.clone(), e.description.clone(), volume.clone());
    export.faults = faults;
    export.io = metrics.io(&e.name, &volume.superblock().uuid_string());
    if let Some(r) = &e.replication {
        let peers: Vec<String> = r.peers.iter().map(|p| p.name.clone()).collect();
        let meta = volume
            .load_replica_meta(tandem_core::meta::DEFAULT_CHUNK)
            .await
            .with_context(|| format!("export {:?}", e.name))?;
        export.replicator = Some(
            start_replication(
                r,
                &volume,
                meta,
                metrics.replication(&e.name, &peers),
                false,
            )
            .with_context(|| format!("export {:?}: starting replication", e.name))?,
        );
    }
    Ok(Arc::new(export))
}

/// Opens a diskless client export (R28): no backing, no metadata; the
/// replica starts Diskless and reaches the data through its peers.
fn open_diskless_export(e: &ExportConfig, metrics: &Metrics) -> Result<Arc<Export>> {
    let bad = |why: String| anyhow::anyhow!("export {:?}: {why}", e.name);
    let r = e
        .replication
        .as_ref()
        .ok_or_else(|| bad("a diskless export needs [export.replication]".into()))?;
    let uuid = e
        .uuid
        .as_deref()
        .and_then(superblock::parse_uuid)
        .ok_or_else(|| bad("a diskless export needs the volume's uuid".into()))?;
    let size = e.diskless_size().map_err(bad)?;
    let name = e.volume.clone().unwrap_or_else(|| e.name.clone());
    let volume = Volume::diskless(&name, uuid, size, e.block_size.unwrap_or(512)).map_err(bad)?;
    let sb = volume.superblock();
    info!(
        export = %e.name, volume = %sb.name, uuid = %sb.uuid_string(), size = sb.size,
        block_size = sb.block_size, "diskless export ready: I/O goes to the replicas"
    );
    let volume = Arc::new(volume);
    let mut export = Export::new(e.name.clone(), e.description.clone(), volume.clone());
    export.io = metrics.io(&e.name, &sb.uuid_string());
    let peers: Vec<String> = r.peers.iter().map(|p| p.name.clone()).collect();
    let layout = volume
        .bitmap_layout(tandem_core::meta::DEFAULT_CHUNK)
        .map_err(bad)?;
    let meta = (
        repl::LoadedMeta::fresh(tandem_core::meta::DEFAULT_CHUNK, repl::DiskState::Diskless),
        layout,
    );
    export.replicator = Some(
        start_replication(r, &volume, meta, metrics.replication(&e.name, &peers), true)
            .with_context(|| format!("export {:?}: starting replication", e.name))?,
    );
    Ok(Arc::new(export))
}

/// Starts the replication driver of a volume, its QUIC listener, and a
/// connector for each peer whose name sorts after ours (the other side
/// connects to us).
fn start_replication(
    r: &ReplicationConfig,
    volume: &Arc<Volume>,
    meta: (repl::LoadedMeta, tandem_core::meta::Layout),
    metrics: Arc<crate::metrics::ReplicationMetrics>,
    diskless: bool,
) -> Result<Replicator> {
    let sb = volume.superblock();
    let mut cfg = repl::Config::new(
        r.node.clone(),
        sb.volume_uuid,
        sb.size,
        sb.block_size,
        r.peers.iter().map(|p| p.name.clone()).collect(),
    );
    cfg.initial_role = match r.role {
        StartRole::Primary => repl::Role::Primary,
        StartRole::Secondary => repl::Role::Secondary,
    };
    cfg.protocol = match r.protocol {
        ProtocolConfig::C => repl::Protocol::C,
        ProtocolConfig::A => repl::Protocol::A,
    };
    cfg.allow_two_primaries = r.allow_two_primaries;
    cfg.diskless = diskless;
    cfg.diskless_peers = r
        .peers
        .iter()
        .filter(|p| p.diskless)
        .map(|p| p.name.clone())
        .collect();
    cfg.resync_rate = r
        .resync_rate_bytes()
        .map_err(|e| anyhow::anyhow!("resync_rate {e}"))?;
    cfg.resync_adaptive = r.resync_adaptive;
    cfg.resync_checksums = r.resync_checksums;
    cfg.after_split_brain = r
        .split_brain_policy()
        .map_err(|e| anyhow::anyhow!("after_split_brain {e}"))?;
    let freeze = r
        .freeze_on_peer_loss()
        .map_err(|e| anyhow::anyhow!("on_peer_loss {e}"))?;
    cfg.solo_needs_grant = r.witness.is_some() || freeze;
    cfg.gen_seed = u64::from_le_bytes(
        uuid::Uuid::new_v4().as_bytes()[..8]
            .try_into()
            .unwrap_or([7; 8]),
    );
    let (loaded, layout) = meta;
    cfg.bitmap_chunk = loaded.record.chunk;
    info!(
        volume = %sb.name,
        disk = ?loaded.record.disk,
        generation = format_args!("{:016x}", loaded.record.current),
        "replica metadata loaded"
    );
    let replica = if diskless {
        repl::Replica::new(cfg, repl::Time::ZERO)
    } else {
        repl::Replica::with_meta(cfg, loaded, repl::Time::ZERO)
    }
    .map_err(|e| anyhow::anyhow!("replication config: {e}"))?;
    let identity = TlsIdentity::load(&r.cert, &r.key, &r.ca)?;
    if identity.node_name() != r.node {
        anyhow::bail!(
            "{}: certificate is for node {:?}, but replication.node is {:?}",
            r.cert.display(),
            identity.node_name(),
            r.node
        );
    }
    let endpoint = Arc::new(PeerEndpoint::bind(
        r.listen,
        &identity,
        r.peers.iter().map(|p| p.name.clone()).collect(),
    )?);
    let quorum = crate::witness::QuorumCtl::new(
        crate::witness::volume_key(&sb.volume_uuid),
        r.witness.is_some(),
        r.auto_failover,
        r.failover_timeout()
            .map_err(|e| anyhow::anyhow!("failover_timeout {e}"))?,
        r.no_quorum()
            .map_err(|e| anyhow::anyhow!("on_no_quorum {e}"))?,
    );
    let replicator = Replicator::spawn_full(replica, volume.clone(), layout, metrics, quorum);
    if let Some(w) = &r.witness {
        info!(witness = %w.name, address = %w.address, auto_failover = r.auto_failover, "using a witness");
        tokio::spawn(crate::witness::run_client(
            endpoint.clone(),
            w.name.clone(),
            w.address,
            replicator.witness_events(),
        ));
    }
    info!(
        node = %r.node, listen = %r.listen, role = ?r.role, protocol = ?r.protocol,
        allow_two_primaries = r.allow_two_primaries, "replication listening"
    );
    tokio::spawn(replication::run_acceptor(
        endpoint.clone(),
        replicator.clone(),
    ));
    for p in &r.peers {
        if r.node < p.name {
            tokio::spawn(replication::run_connector(
                endpoint.clone(),
                replicator.clone(),
                p.name.clone(),
                p.address,
            ));
        }
    }
    Ok(replicator)
}

/// A running NBD + admin server (used by `tandemd run` and the demo).
pub struct Running {
    /// The exports.
    pub exports: Arc<Exports>,
    /// Cancels every listener and connection.
    pub shutdown: Shutdown,
    /// Listener descriptions.
    pub listeners: Vec<String>,
    /// The metric registry (served on `[metrics].listen` when configured).
    pub metrics: Arc<Metrics>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    sockets: Vec<std::path::PathBuf>,
}

impl Running {
    /// Stops listening, closes connections, flushes every volume, removes socket files.
    pub async fn stop(self) -> Result<()> {
        self.shutdown.cancel();
        for t in self.tasks {
            let _ = t.await;
        }
        let mut failed = None;
        for e in self.exports.iter() {
            if e.replicator.as_ref().is_some_and(|r| r.is_detached()) {
                // R23: nothing goes to a disk detached after an I/O error.
                warn!(export = %e.name, "local disk detached after an I/O error: not flushed");
                continue;
            }
            if let Err(err) = e.volume.flush().await {
                error!(export = %e.name, error = %err, "final flush failed");
                failed = Some(err);
            }
        }
        for s in &self.sockets {
            let _ = std::fs::remove_file(s);
        }
        match failed {
            Some(e) => Err(e.into()),
            None => Ok(()),
        }
    }
}

/// Opens every export and starts the listeners. `admin`: bind the admin socket.
pub async fn start(config: &Config, admin: bool) -> Result<Running> {
    let metrics = Arc::new(Metrics::new());
    let mut list = Vec::new();
    for e in &config.exports {
        list.push(
            open_export(e, &metrics)
                .await
                .with_context(|| format!("export {:?}", e.name))?,
        );
    }
    let exports = Arc::new(Exports::new(list));
    let shutdown = Shutdown::default();
    let mut tasks = Vec::new();
    let mut listeners = Vec::new();
    let mut sockets = Vec::new();
    if let Some(p) = &config.nbd.unix {
        let l = server::bind_unix(p)?;
        listeners.push(format!("nbd+unix:///?socket={}", p.display()));
        sockets.push(p.clone());
        tasks.push(tokio::spawn(server::serve_unix(
            l,
            exports.clone(),
            shutdown.clone(),
        )));
    }
    if let Some(a) = config.nbd.tcp {
        let l = TcpListener::bind(a)
            .await
            .with_context(|| format!("binding NBD TCP listener {a}"))?;
        let local = l.local_addr()?;
        listeners.push(format!("nbd://{local}/"));
        tasks.push(tokio::spawn(server::serve_tcp(
            l,
            exports.clone(),
            shutdown.clone(),
        )));
    }
    // Bound before the admin socket, so a ready admin socket means a ready
    // metrics endpoint too.
    if let Some(m) = &config.metrics {
        let l = TcpListener::bind(m.listen).await.with_context(|| {
            format!(
                "[metrics].listen {}: binding the metrics listener",
                m.listen
            )
        })?;
        info!(listen = %l.local_addr()?, "serving metrics on http://{}/metrics", l.local_addr()?);
        tasks.push(tokio::spawn(crate::metrics::serve(
            l,
            metrics.clone(),
            exports.clone(),
            shutdown.clone(),
        )));
    }
    if admin {
        let p = &config.admin.socket;
        let l = crate::admin::bind(p)?;
        sockets.push(p.clone());
        tasks.push(tokio::spawn(crate::admin::serve(
            l,
            exports.clone(),
            listeners.clone(),
            shutdown.clone(),
        )));
    }
    for l in &listeners {
        info!(listener = %l, "serving NBD");
    }
    Ok(Running {
        exports,
        shutdown,
        listeners,
        metrics,
        tasks,
        sockets,
    })
}

/// `tandemd run`: serve until SIGINT or SIGTERM.
pub async fn run(config: Config) -> Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let running = start(&config, true).await?;
    info!(admin = %config.admin.socket.display(), "tandemd ready");
    tokio::select! {
        _ = term.recv() => info!("SIGTERM: shutting down"),
        _ = int.recv() => info!("SIGINT: shutting down"),
    }
    running.stop().await?;
    info!("stopped; all volumes flushed");
    Ok(())
}
