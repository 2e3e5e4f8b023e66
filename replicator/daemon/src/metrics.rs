//! Prometheus metrics: the registry, per-volume and per-peer handles, and a
//! tiny HTTP/1.1 server for `GET /metrics` (OpenMetrics text format, encoded
//! by `prometheus-client`).
//!
//! Hot paths never look up labels: every export gets an [`IoMetrics`] of
//! pre-resolved counter and histogram handles when it is opened, and every
//! replicated volume a [`ReplicationMetrics`] with one [`PeerMetrics`] per
//! configured peer. Values that are cheap to read but awkward to push (peer
//! RTT, role, peer connection state, requests in flight) are sampled when
//! `/metrics` is scraped ([`Metrics::render`]).
//!
//! The metric names and their meaning are listed in `docs/operations.md`.

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};
use tandem_core::nbd::Command;
use tandem_core::repl::{ConnState, FrameError, PeerId, Role};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tracing::{debug, warn};

use crate::export::Exports;
use crate::nbd::server::Shutdown;

/// `Content-Type` of a `/metrics` reply (what `prometheus-client` encodes).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// Largest request head (request line and headers) the server reads.
pub const MAX_REQUEST: usize = 8 << 10;
/// Time a client has to send its request head.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Scrapes served at once; further connections wait to be accepted.
const MAX_CONNECTIONS: usize = 16;
/// How long a scrape waits for a replication driver's status.
const STATUS_TIMEOUT: Duration = Duration::from_secs(1);

/// Latency histogram buckets: 25 µs doubling to ~13 s (20 buckets).
fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(25e-6, 2.0, 20))
}

type F64Gauge = Gauge<f64, AtomicU64>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct IoLabels {
    volume: String,
    op: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VolumeLabels {
    volume: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct InfoLabels {
    volume: String,
    uuid: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PeerLabels {
    volume: String,
    peer: String,
}

/// The NBD operations counted, in [`IoMetrics`] order.
const OPS: [&str; 5] = ["read", "write", "flush", "trim", "write_zeroes"];

fn op_index(c: Command) -> Option<usize> {
    Some(match c {
        Command::Read => 0,
        Command::Write => 1,
        Command::Flush => 2,
        Command::Trim => 3,
        Command::WriteZeroes => 4,
        _ => return None,
    })
}

#[derive(Debug, Clone)]
struct OpMetrics {
    requests: Counter,
    bytes: Counter,
    errors: Counter,
    latency: Histogram,
}

impl OpMetrics {
    fn detached() -> Self {
        OpMetrics {
            requests: Counter::default(),
            bytes: Counter::default(),
            errors: Counter::default(),
            latency: latency_histogram(),
        }
    }
}

/// Pre-resolved I/O metric handles of one export (cheap to clone).
#[derive(Debug, Clone)]
pub struct IoMetrics {
    ops: [OpMetrics; 5],
    invalid: Counter,
}

impl Default for IoMetrics {
    /// Handles that count but are in no registry (exports not served by
    /// `tandemd run`, e.g. in tests).
    fn default() -> Self {
        IoMetrics {
            ops: std::array::from_fn(|_| OpMetrics::detached()),
            invalid: Counter::default(),
        }
    }
}

impl IoMetrics {
    /// Records one executed request: its command, length, outcome and the
    /// time from decoding it to its reply being ready. Bytes count only
    /// successful requests (TRIM and WRITE_ZEROES count their range).
    pub fn record(&self, command: Command, length: u32, ok: bool, elapsed: Duration) {
        let Some(i) = op_index(command) else {
            return;
        };
        let m = &self.ops[i];
        m.requests.inc();
        if ok {
            if command != Command::Flush {
                m.bytes.inc_by(u64::from(length));
            }
        } else {
            m.errors.inc();
        }
        m.latency.observe(elapsed.as_secs_f64());
    }

    /// Records a request refused by validation.
    pub fn invalid(&self) {
        self.invalid.inc();
    }
}

#[derive(Debug, Default)]
struct LinkState {
    /// Attached peer streams (normally 0 or 1; 2 briefly while a new
    /// connection replaces a dying one).
    live: u32,
    /// The newest attached connection, for RTT.
    conn: Option<quinn::Connection>,
    /// Frames queued for the peer's stream writers and not yet written.
    frames: u64,
    /// Their encoded bytes.
    bytes: u64,
}

/// Metrics of one peer of one replicated volume.
#[derive(Debug)]
pub struct PeerMetrics {
    rtt: F64Gauge,
    connected: Gauge,
    outdated: Gauge,
    reconnects: Counter,
    checksum_errors: Counter,
    bad_frames: Counter,
    backlog_bytes: Gauge,
    backlog_frames: Gauge,
    resync_bytes: Counter,
    resync_compared_bytes: Counter,
    resync_identical_bytes: Counter,
    resyncs: Counter,
    split_brain: Counter,
    verify_differing_bytes: Counter,
    attaches: AtomicU64,
    link: Mutex<LinkState>,
}

impl PeerMetrics {
    fn detached() -> Self {
        PeerMetrics {
            rtt: F64Gauge::default(),
            connected: Gauge::default(),
            outdated: Gauge::default(),
            reconnects: Counter::default(),
            checksum_errors: Counter::default(),
            bad_frames: Counter::default(),
            backlog_bytes: Gauge::default(),
            backlog_frames: Gauge::default(),
            resync_bytes: Counter::default(),
            resync_compared_bytes: Counter::default(),
            resync_identical_bytes: Counter::default(),
            resyncs: Counter::default(),
            split_brain: Counter::default(),
            verify_differing_bytes: Counter::default(),
            attaches: AtomicU64::new(0),
            link: Mutex::new(LinkState::default()),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, LinkState> {
        self.link.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn publish_backlog(&self, s: &LinkState) {
        self.backlog_bytes
            .set(i64::try_from(s.bytes).unwrap_or(i64::MAX));
        self.backlog_frames
            .set(i64::try_from(s.frames).unwrap_or(i64::MAX));
    }

    /// The current backlog: (frames, bytes) queued and not yet written.
    pub fn backlog(&self) -> (u64, u64) {
        let s = self.state();
        (s.frames, s.bytes)
    }

    /// Reconnects counted so far.
    pub fn reconnects(&self) -> u64 {
        self.reconnects.get()
    }

    /// Checksum errors and all bad frames counted so far.
    pub fn frame_errors(&self) -> (u64, u64) {
        (self.checksum_errors.get(), self.bad_frames.get())
    }

    /// Resyncs finished as source and the bytes they moved.
    pub fn resynced(&self) -> (u64, u64) {
        (self.resyncs.get(), self.resync_bytes.get())
    }

    /// Bytes compared by digest in finished checksum-based resyncs as
    /// source, and of those the bytes found identical (R26).
    pub fn resync_checksums(&self) -> (u64, u64) {
        (
            self.resync_compared_bytes.get(),
            self.resync_identical_bytes.get(),
        )
    }
}

/// Held while a peer stream is attached; its drop marks the link gone.
#[must_use = "the link counts as attached only while the guard lives"]
#[derive(Debug)]
pub struct LinkGuard {
    peer: Option<Arc<PeerMetrics>>,
    id: usize,
}

impl Drop for LinkGuard {
    fn drop(&mut self) {
        let Some(p) = &self.peer else {
            return;
        };
        let mut s = p.state();
        s.live = s.live.saturating_sub(1);
        if s.conn.as_ref().is_some_and(|c| c.stable_id() == self.id) {
            s.conn = None;
        }
        if s.live == 0 {
            // Frames queued for a dead link are never written.
            s.frames = 0;
            s.bytes = 0;
            p.publish_backlog(&s);
        }
    }
}

/// Metrics of one replicated volume: one [`PeerMetrics`] per configured
/// peer (indexed by [`PeerId`]) and the volume's replication gauges.
#[derive(Debug)]
pub struct ReplicationMetrics {
    peers: Vec<Arc<PeerMetrics>>,
    in_flight: Gauge,
    primary: Gauge,
    detached: Gauge,
}

impl ReplicationMetrics {
    /// Counts a replication event (finished resyncs, split brains).
    pub fn event(&self, e: &tandem_core::repl::Event) {
        use tandem_core::repl::{Event, SyncRole};
        match e {
            Event::SyncFinished {
                peer,
                role: SyncRole::Source,
                bytes,
            } => {
                if let Some(p) = self.peer(*peer) {
                    p.resyncs.inc();
                    p.resync_bytes.inc_by(*bytes);
                }
            }
            Event::SyncChecksums {
                peer,
                compared_bytes,
                identical_bytes,
            } => {
                if let Some(p) = self.peer(*peer) {
                    p.resync_compared_bytes.inc_by(*compared_bytes);
                    p.resync_identical_bytes.inc_by(*identical_bytes);
                }
            }
            Event::SplitBrain { peer } => {
                if let Some(p) = self.peer(*peer) {
                    p.split_brain.inc();
                }
            }
            Event::VerifyFinished {
                peer,
                differing_bytes,
                ..
            } => {
                if let Some(p) = self.peer(*peer) {
                    p.verify_differing_bytes.inc_by(*differing_bytes);
                }
            }
            _ => {}
        }
    }

    /// Handles in no registry, for `n_peers` peers (tests, tools).
    pub fn detached(n_peers: usize) -> Arc<Self> {
        Arc::new(ReplicationMetrics {
            peers: (0..n_peers)
                .map(|_| Arc::new(PeerMetrics::detached()))
                .collect(),
            in_flight: Gauge::default(),
            primary: Gauge::default(),
            detached: Gauge::default(),
        })
    }

    /// One peer's metrics.
    pub fn peer(&self, peer: PeerId) -> Option<&Arc<PeerMetrics>> {
        self.peers.get(usize::from(peer.0))
    }

    /// A peer stream was attached on `conn`: counts a reconnect if this is
    /// not the peer's first connection, and keeps `conn` for RTT sampling.
    pub fn attach(&self, peer: PeerId, conn: &quinn::Connection) -> LinkGuard {
        let Some(p) = self.peer(peer) else {
            return LinkGuard { peer: None, id: 0 };
        };
        if p.attaches
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            > 0
        {
            p.reconnects.inc();
        }
        let mut s = p.state();
        s.live += 1;
        s.conn = Some(conn.clone());
        p.rtt.set(conn.rtt().as_secs_f64());
        LinkGuard {
            peer: Some(p.clone()),
            id: conn.stable_id(),
        }
    }

    /// A frame of `len` encoded bytes was queued for the peer's writer.
    /// Ignored while no stream is attached (nothing will write it).
    pub fn enqueued(&self, peer: PeerId, len: usize) {
        let Some(p) = self.peer(peer) else {
            return;
        };
        let mut s = p.state();
        if s.live == 0 {
            return;
        }
        s.frames += 1;
        s.bytes += len as u64;
        p.publish_backlog(&s);
    }

    /// A stream writer wrote `frames` queued frames of `len` encoded bytes
    /// (as counted by [`Self::enqueued`]) to its stream.
    pub fn written(&self, peer: PeerId, frames: usize, len: usize) {
        let Some(p) = self.peer(peer) else {
            return;
        };
        let mut s = p.state();
        s.frames = s.frames.saturating_sub(frames as u64);
        s.bytes = s.bytes.saturating_sub(len as u64);
        p.publish_backlog(&s);
    }

    /// A frame from the peer failed to decode (the connection is closed).
    /// A frame envelope from the peer failed its checksum (the connection
    /// is closed): a bad frame and a checksum error.
    pub fn bad_envelope(&self, peer: PeerId) {
        let Some(p) = self.peer(peer) else {
            return;
        };
        p.bad_frames.inc();
        p.checksum_errors.inc();
    }

    /// A frame from the peer failed to decode (the connection is closed).
    pub fn bad_frame(&self, peer: PeerId, e: &FrameError) {
        let Some(p) = self.peer(peer) else {
            return;
        };
        p.bad_frames.inc();
        if matches!(e, FrameError::Checksum { .. }) {
            p.checksum_errors.inc();
        }
    }

    /// Samples RTTs of attached connections.
    fn sample_rtt(&self) {
        for p in &self.peers {
            if let Some(c) = &p.state().conn {
                p.rtt.set(c.rtt().as_secs_f64());
            }
        }
    }
}

/// The daemon's metric registry.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    io_requests: Family<IoLabels, Counter>,
    io_bytes: Family<IoLabels, Counter>,
    io_errors: Family<IoLabels, Counter>,
    io_latency: Family<IoLabels, Histogram, fn() -> Histogram>,
    io_invalid: Family<VolumeLabels, Counter>,
    volume_info: Family<InfoLabels, Gauge>,
    in_flight: Family<VolumeLabels, Gauge>,
    primary: Family<VolumeLabels, Gauge>,
    detached: Family<VolumeLabels, Gauge>,
    peer_rtt: Family<PeerLabels, F64Gauge>,
    peer_connected: Family<PeerLabels, Gauge>,
    peer_outdated: Family<PeerLabels, Gauge>,
    peer_reconnects: Family<PeerLabels, Counter>,
    peer_checksum_errors: Family<PeerLabels, Counter>,
    peer_bad_frames: Family<PeerLabels, Counter>,
    backlog_bytes: Family<PeerLabels, Gauge>,
    backlog_frames: Family<PeerLabels, Gauge>,
    resync_bytes: Family<PeerLabels, Counter>,
    resync_compared_bytes: Family<PeerLabels, Counter>,
    resync_identical_bytes: Family<PeerLabels, Counter>,
    resyncs: Family<PeerLabels, Counter>,
    split_brain: Family<PeerLabels, Counter>,
    verify_differing_bytes: Family<PeerLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// A registry with every Tandem metric family.
    pub fn new() -> Self {
        let mut m = Metrics {
            registry: Registry::with_prefix("tandem"),
            io_requests: Family::default(),
            io_bytes: Family::default(),
            io_errors: Family::default(),
            io_latency: Family::new_with_constructor(latency_histogram as fn() -> Histogram),
            io_invalid: Family::default(),
            volume_info: Family::default(),
            in_flight: Family::default(),
            primary: Family::default(),
            detached: Family::default(),
            peer_rtt: Family::default(),
            peer_connected: Family::default(),
            peer_outdated: Family::default(),
            peer_reconnects: Family::default(),
            peer_checksum_errors: Family::default(),
            peer_bad_frames: Family::default(),
            backlog_bytes: Family::default(),
            backlog_frames: Family::default(),
            resync_bytes: Family::default(),
            resync_compared_bytes: Family::default(),
            resync_identical_bytes: Family::default(),
            resyncs: Family::default(),
            split_brain: Family::default(),
            verify_differing_bytes: Family::default(),
        };
        let r = &mut m.registry;
        // Counter names get `_total` appended by the encoder.
        r.register(
            "io_requests",
            "NBD requests executed, by volume and operation (successful or not; invalid requests are not included)",
            m.io_requests.clone(),
        );
        r.register_with_unit(
            "io",
            "Bytes of successful NBD requests (trim and write_zeroes: the range length; flush: 0)",
            Unit::Bytes,
            m.io_bytes.clone(),
        );
        r.register(
            "io_errors",
            "NBD requests that failed in storage or replication",
            m.io_errors.clone(),
        );
        r.register_with_unit(
            "io_latency",
            "Time from an NBD request being decoded to its reply being ready",
            Unit::Seconds,
            m.io_latency.clone(),
        );
        r.register(
            "io_invalid_requests",
            "NBD requests refused by validation (range, alignment, flags, command)",
            m.io_invalid.clone(),
        );
        r.register(
            "volume_info",
            "Exported volumes (always 1), with the volume UUID",
            m.volume_info.clone(),
        );
        r.register(
            "replication_requests_in_flight",
            "Frontend writes, flushes, trims and write-zeroes in the replica and not yet completed (sampled at scrape)",
            m.in_flight.clone(),
        );
        r.register(
            "replication_primary",
            "1 if this node is Primary for the replicated volume, 0 if Secondary (sampled at scrape)",
            m.primary.clone(),
        );
        r.register(
            "volume_detached",
            "1 if this node's local disk failed and is detached (Diskless: I/O goes through peers), 0 otherwise (sampled at scrape)",
            m.detached.clone(),
        );
        r.register_with_unit(
            "peer_rtt",
            "QUIC round-trip time estimate to the peer (sampled at scrape; last value while disconnected)",
            Unit::Seconds,
            m.peer_rtt.clone(),
        );
        r.register(
            "peer_connected",
            "1 if the replication link to the peer is Connected (handshake done), else 0 (sampled at scrape)",
            m.peer_connected.clone(),
        );
        r.register(
            "peer_resync_bytes",
            "Bytes this node sent to the peer in finished resyncs (as sync source)",
            m.resync_bytes.clone(),
        );
        r.register(
            "peer_resync_compared_bytes",
            "Bytes this node compared by digest with the peer before sending them in finished checksum-based resyncs (R26, as sync source)",
            m.resync_compared_bytes.clone(),
        );
        r.register(
            "peer_resync_identical_bytes",
            "Of the compared bytes, those found identical on the peer and not sent (R26)",
            m.resync_identical_bytes.clone(),
        );
        r.register(
            "peer_resyncs",
            "Resyncs to the peer finished with this node as sync source",
            m.resyncs.clone(),
        );
        r.register(
            "peer_split_brains",
            "Handshakes with the peer that found a split brain (both sides wrote while apart)",
            m.split_brain.clone(),
        );
        r.register(
            "peer_verify_differing_bytes",
            "Bytes online verify found different on the peer (R22), summed over finished verifies",
            m.verify_differing_bytes.clone(),
        );
        r.register(
            "peer_outdated",
            "1 if the peer missed writes and needs a resync, else 0 (sampled at scrape)",
            m.peer_outdated.clone(),
        );
        r.register(
            "peer_reconnects",
            "Replication streams established with the peer after the first",
            m.peer_reconnects.clone(),
        );
        r.register(
            "peer_checksum_errors",
            "Frames from the peer whose CRC did not match (each closes the connection)",
            m.peer_checksum_errors.clone(),
        );
        r.register(
            "peer_bad_frames",
            "Frames from the peer that failed to decode for any reason, checksum errors included (each closes the connection)",
            m.peer_bad_frames.clone(),
        );
        r.register_with_unit(
            "replication_backlog",
            "Bytes of frames queued for the peer and not yet written to its QUIC stream",
            Unit::Bytes,
            m.backlog_bytes.clone(),
        );
        r.register(
            "replication_backlog_frames",
            "Frames queued for the peer and not yet written to its QUIC stream",
            m.backlog_frames.clone(),
        );
        m
    }

    /// Registers an export and returns its pre-resolved I/O handles.
    pub fn io(&self, volume: &str, uuid: &str) -> IoMetrics {
        self.volume_info
            .get_or_create(&InfoLabels {
                volume: volume.to_string(),
                uuid: uuid.to_string(),
            })
            .set(1);
        let ops = std::array::from_fn(|i| {
            let l = IoLabels {
                volume: volume.to_string(),
                op: OPS[i],
            };
            OpMetrics {
                requests: self.io_requests.get_or_create_owned(&l),
                bytes: self.io_bytes.get_or_create_owned(&l),
                errors: self.io_errors.get_or_create_owned(&l),
                latency: self.io_latency.get_or_create_owned(&l),
            }
        });
        IoMetrics {
            ops,
            invalid: self.io_invalid.get_or_create_owned(&VolumeLabels {
                volume: volume.to_string(),
            }),
        }
    }

    /// Registers a replicated volume and its peers (in configuration order,
    /// so a [`PeerId`] indexes them).
    pub fn replication(&self, volume: &str, peers: &[String]) -> Arc<ReplicationMetrics> {
        let v = VolumeLabels {
            volume: volume.to_string(),
        };
        let peers = peers
            .iter()
            .map(|p| {
                let l = PeerLabels {
                    volume: volume.to_string(),
                    peer: p.clone(),
                };
                Arc::new(PeerMetrics {
                    rtt: self.peer_rtt.get_or_create_owned(&l),
                    connected: self.peer_connected.get_or_create_owned(&l),
                    outdated: self.peer_outdated.get_or_create_owned(&l),
                    reconnects: self.peer_reconnects.get_or_create_owned(&l),
                    checksum_errors: self.peer_checksum_errors.get_or_create_owned(&l),
                    bad_frames: self.peer_bad_frames.get_or_create_owned(&l),
                    backlog_bytes: self.backlog_bytes.get_or_create_owned(&l),
                    backlog_frames: self.backlog_frames.get_or_create_owned(&l),
                    resync_bytes: self.resync_bytes.get_or_create_owned(&l),
                    resync_compared_bytes: self.resync_compared_bytes.get_or_create_owned(&l),
                    resync_identical_bytes: self.resync_identical_bytes.get_or_create_owned(&l),
                    resyncs: self.resyncs.get_or_create_owned(&l),
                    split_brain: self.split_brain.get_or_create_owned(&l),
                    verify_differing_bytes: self.verify_differing_bytes.get_or_create_owned(&l),
                    attaches: AtomicU64::new(0),
                    link: Mutex::new(LinkState::default()),
                })
            })
            .collect();
        Arc::new(ReplicationMetrics {
            peers,
            in_flight: self.in_flight.get_or_create_owned(&v),
            primary: self.primary.get_or_create_owned(&v),
            detached: self.detached.get_or_create_owned(&v),
        })
    }

    /// Samples the scrape-time values (RTT, role, connection states,
    /// requests in flight) of every export, then encodes everything.
    pub async fn render(&self, exports: &Exports) -> String {
        for e in exports.iter() {
            let Some(r) = &e.replicator else {
                continue;
            };
            let m = r.metrics();
            m.sample_rtt();
            let Ok(Ok(st)) = tokio::time::timeout(STATUS_TIMEOUT, r.status()).await else {
                debug!(export = %e.name, "no replication status for metrics");
                continue;
            };
            m.in_flight
                .set(i64::try_from(st.in_flight).unwrap_or(i64::MAX));
            m.primary.set(i64::from(st.role == Role::Primary));
            m.detached
                .set(i64::from(st.disk == tandem_core::repl::DiskState::Diskless));
            for (i, p) in st.peers.iter().enumerate() {
                if let Some(pm) = m.peers.get(i) {
                    pm.connected.set(i64::from(p.conn == ConnState::Connected));
                    pm.outdated.set(i64::from(p.outdated));
                }
            }
        }
        self.encode()
    }

    /// Encodes the registry as it is (OpenMetrics text, ending in `# EOF`).
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(16 << 10);
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            warn!(error = %e, "encoding metrics failed");
        }
        out
    }
}

/// What a request head asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// `GET /metrics` (any query string).
    Metrics,
    /// Another path.
    NotFound,
    /// `/metrics` with a method other than GET.
    MethodNotAllowed,
    /// Not an HTTP/1.x request line.
    BadRequest,
}

/// Routes a request head (request line and headers, as read).
pub fn route(head: &[u8]) -> Route {
    let Ok(text) = std::str::from_utf8(head) else {
        return Route::BadRequest;
    };
    let line = text.split("\r\n").next().unwrap_or("");
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Route::BadRequest;
    };
    if method.is_empty()
        || !method.bytes().all(|b| b.is_ascii_uppercase())
        || !target.starts_with('/')
        || !matches!(version, "HTTP/1.0" | "HTTP/1.1")
    {
        return Route::BadRequest;
    }
    let path = target.split('?').next().unwrap_or(target);
    if path != "/metrics" {
        return Route::NotFound;
    }
    if method != "GET" {
        return Route::MethodNotAllowed;
    }
    Route::Metrics
}

/// Reads a request head: `Ok(Some(head))` once `\r\n\r\n` arrives,
/// `Ok(None)` on EOF first, `Err(())` when it exceeds [`MAX_REQUEST`].
async fn read_head<S: AsyncRead + Unpin>(
    s: &mut S,
) -> std::io::Result<Result<Option<Vec<u8>>, ()>> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            return Ok(Ok(None));
        }
        let from = buf.len().saturating_sub(3);
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf[from..].windows(4).position(|w| w == b"\r\n\r\n") {
            if from + i + 4 > MAX_REQUEST {
                return Ok(Err(()));
            }
            buf.truncate(from + i);
            return Ok(Ok(Some(buf)));
        }
        if buf.len() > MAX_REQUEST {
            return Ok(Err(()));
        }
    }
}

fn response(status: &str, content_type: &str, body: &str) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    if status.starts_with("405") {
        out.push_str("Allow: GET\r\n");
    }
    out.push_str("\r\n");
    let mut out = out.into_bytes();
    out.extend_from_slice(body.as_bytes());
    out
}

/// Serves one HTTP connection: one request, one reply, then close.
pub async fn handle_connection<S>(s: S, metrics: &Metrics, exports: &Exports)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    handle_with_timeout(s, metrics, exports, REQUEST_TIMEOUT).await;
}

async fn handle_with_timeout<S>(mut s: S, metrics: &Metrics, exports: &Exports, timeout: Duration)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let head = match tokio::time::timeout(timeout, read_head(&mut s)).await {
        Err(_) => {
            debug!("metrics client sent no request within {timeout:?}");
            let _ = s
                .write_all(&response(
                    "408 Request Timeout",
                    "text/plain",
                    "request timeout\n",
                ))
                .await;
            let _ = s.shutdown().await;
            return;
        }
        Ok(Err(e)) => {
            debug!(error = %e, "metrics connection");
            return;
        }
        Ok(Ok(Ok(None))) => return,
        Ok(Ok(Err(()))) => None,
        Ok(Ok(Ok(Some(h)))) => Some(h),
    };
    let reply = match head.as_deref().map_or(Route::BadRequest, route) {
        Route::Metrics => response("200 OK", CONTENT_TYPE, &metrics.render(exports).await),
        Route::NotFound => response("404 Not Found", "text/plain", "not found; try /metrics\n"),
        Route::MethodNotAllowed => response(
            "405 Method Not Allowed",
            "text/plain",
            "only GET is allowed\n",
        ),
        Route::BadRequest => response("400 Bad Request", "text/plain", "bad request\n"),
    };
    if let Err(e) = s.write_all(&reply).await {
        debug!(error = %e, "metrics reply");
        return;
    }
    let _ = s.shutdown().await;
}

/// Accepts `/metrics` connections until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    exports: Arc<Exports>,
    shutdown: Shutdown,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        // Wait for a free slot (or shutdown) before accepting more.
        let permit = tokio::select! {
            _ = shutdown.cancelled() => return,
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let metrics = metrics.clone();
                    let exports = exports.clone();
                    tokio::spawn(async move {
                        handle_connection(stream, &metrics, &exports).await;
                        drop(permit);
                    });
                }
                Err(e) => {
                    warn!(error = %e, "accept on metrics listener failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn exchange(request: &[u8], metrics: &Metrics) -> String {
        let (mut client, server) = tokio::io::duplex(1 << 20);
        let exports = Exports::default();
        let serve = handle_connection(server, metrics, &exports);
        let talk = async {
            client.write_all(request).await.expect("write");
            client.shutdown().await.expect("shutdown");
            let mut out = Vec::new();
            client.read_to_end(&mut out).await.expect("read");
            String::from_utf8(out).expect("utf8")
        };
        let ((), out) = tokio::join!(serve, talk);
        out
    }

    fn status_line(reply: &str) -> &str {
        reply.split("\r\n").next().unwrap_or("")
    }

    #[tokio::test]
    async fn metrics_get_returns_200_with_every_family() {
        let m = Metrics::new();
        let io = m.io("vol1", "5e1f0000-0000-4000-8000-0000000ce7a5");
        io.record(Command::Write, 4096, true, Duration::from_micros(100));
        io.record(Command::Write, 512, true, Duration::from_millis(3));
        io.record(Command::Read, 8192, false, Duration::from_micros(10));
        io.record(Command::Flush, 0, true, Duration::from_millis(1));
        io.invalid();
        let r = m.replication("vol1", &["beta".to_string()]);
        r.bad_frame(
            PeerId(0),
            &FrameError::Checksum {
                stored: 1,
                computed: 2,
            },
        );
        r.bad_frame(PeerId(0), &FrameError::BadMagic(7));
        r.event(&tandem_core::repl::Event::SyncChecksums {
            peer: PeerId(0),
            compared_bytes: 1 << 20,
            identical_bytes: 3 << 18,
        });
        r.event(&tandem_core::repl::Event::SyncFinished {
            peer: PeerId(0),
            role: tandem_core::repl::SyncRole::Source,
            bytes: 1 << 18,
        });
        let reply = exchange(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", &m).await;
        assert_eq!(status_line(&reply), "HTTP/1.1 200 OK", "{reply}");
        let (head, body) = reply.split_once("\r\n\r\n").expect("head and body");
        assert!(
            head.contains(&format!("Content-Type: {CONTENT_TYPE}")),
            "{head}"
        );
        assert!(
            head.contains(&format!("Content-Length: {}", body.len())),
            "{head}"
        );
        assert!(head.contains("Connection: close"), "{head}");
        for line in [
            r#"tandem_io_requests_total{volume="vol1",op="write"} 2"#,
            r#"tandem_io_requests_total{volume="vol1",op="read"} 1"#,
            r#"tandem_io_bytes_total{volume="vol1",op="write"} 4608"#,
            r#"tandem_io_bytes_total{volume="vol1",op="read"} 0"#,
            r#"tandem_io_errors_total{volume="vol1",op="read"} 1"#,
            r#"tandem_io_errors_total{volume="vol1",op="write"} 0"#,
            r#"tandem_io_latency_seconds_count{volume="vol1",op="write"} 2"#,
            r#"tandem_io_latency_seconds_bucket{le="0.0002",volume="vol1",op="write"} 1"#,
            r#"tandem_io_latency_seconds_bucket{le="+Inf",volume="vol1",op="write"} 2"#,
            r#"tandem_io_invalid_requests_total{volume="vol1"} 1"#,
            r#"tandem_volume_info{volume="vol1",uuid="5e1f0000-0000-4000-8000-0000000ce7a5"} 1"#,
            r#"tandem_peer_checksum_errors_total{volume="vol1",peer="beta"} 1"#,
            r#"tandem_peer_bad_frames_total{volume="vol1",peer="beta"} 2"#,
            r#"tandem_peer_reconnects_total{volume="vol1",peer="beta"} 0"#,
            r#"tandem_peer_connected{volume="vol1",peer="beta"} 0"#,
            r#"tandem_peer_resyncs_total{volume="vol1",peer="beta"} 1"#,
            r#"tandem_peer_resync_bytes_total{volume="vol1",peer="beta"} 262144"#,
            r#"tandem_peer_resync_compared_bytes_total{volume="vol1",peer="beta"} 1048576"#,
            r#"tandem_peer_resync_identical_bytes_total{volume="vol1",peer="beta"} 786432"#,
            r#"tandem_replication_backlog_bytes{volume="vol1",peer="beta"} 0"#,
            r#"tandem_replication_backlog_frames{volume="vol1",peer="beta"} 0"#,
            r#"tandem_replication_requests_in_flight{volume="vol1"} 0"#,
            r#"tandem_replication_primary{volume="vol1"} 0"#,
            r#"tandem_volume_detached{volume="vol1"} 0"#,
            "# TYPE tandem_io_latency_seconds histogram",
            "# TYPE tandem_peer_rtt_seconds gauge",
            "# EOF",
        ] {
            assert!(
                body.lines().any(|l| l == line),
                "missing line {line:?} in:\n{body}"
            );
        }
    }

    #[tokio::test]
    async fn other_paths_get_404_other_methods_405() {
        let m = Metrics::new();
        for (req, status) in [
            (&b"GET / HTTP/1.1\r\n\r\n"[..], "HTTP/1.1 404 Not Found"),
            (b"GET /metricsx HTTP/1.0\r\n\r\n", "HTTP/1.1 404 Not Found"),
            (
                b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
                "HTTP/1.1 405 Method Not Allowed",
            ),
            (b"GET /metrics?x=1 HTTP/1.1\r\n\r\n", "HTTP/1.1 200 OK"),
        ] {
            let reply = exchange(req, &m).await;
            assert_eq!(status_line(&reply), status, "{req:?}: {reply}");
        }
    }

    #[tokio::test]
    async fn malformed_or_oversized_requests_get_400() {
        let m = Metrics::new();
        let huge = format!(
            "GET /metrics HTTP/1.1\r\nX: {}\r\n\r\n",
            "a".repeat(MAX_REQUEST)
        );
        for req in [
            &b"hello\r\n\r\n"[..],
            b"GET /metrics\r\n\r\n",
            b"GET metrics HTTP/1.1\r\n\r\n",
            b"GET /metrics HTTP/2.0\r\n\r\n",
            b"GET /metrics HTTP/1.1 extra\r\n\r\n",
            b"\xff\xfe /metrics HTTP/1.1\r\n\r\n",
            huge.as_bytes(),
        ] {
            let reply = exchange(req, &m).await;
            assert_eq!(
                status_line(&reply),
                "HTTP/1.1 400 Bad Request",
                "{:?}",
                String::from_utf8_lossy(&req[..req.len().min(40)])
            );
        }
        // EOF before a full head: no reply, just close.
        assert_eq!(exchange(b"GET /metr", &m).await, "");
    }

    #[tokio::test]
    async fn silent_client_times_out() {
        let m = Metrics::new();
        let exports = Exports::default();
        let (mut client, server) = tokio::io::duplex(1 << 16);
        client
            .write_all(b"GET /metrics HTTP/1.1\r\n")
            .await
            .expect("write");
        let serve = handle_with_timeout(server, &m, &exports, Duration::from_millis(50));
        let talk = async {
            let mut out = Vec::new();
            client.read_to_end(&mut out).await.expect("read");
            String::from_utf8(out).expect("utf8")
        };
        let ((), out) = tokio::join!(serve, talk);
        assert_eq!(status_line(&out), "HTTP/1.1 408 Request Timeout");
    }

    #[test]
    fn backlog_counts_frames_until_written_and_resets_when_the_link_goes() {
        let r = ReplicationMetrics::detached(1);
        let p = PeerId(0);
        // Nothing attached: nothing will be written, nothing is counted.
        r.enqueued(p, 100);
        assert_eq!(r.peer(p).expect("peer").backlog(), (0, 0));
        // Attach needs a quinn::Connection; simulate the guard's effect.
        let pm = r.peer(p).expect("peer").clone();
        pm.state().live = 1;
        r.enqueued(p, 100);
        r.enqueued(p, 50);
        r.enqueued(p, 30);
        assert_eq!(pm.backlog(), (3, 180));
        assert_eq!(pm.backlog_bytes.get(), 180);
        assert_eq!(pm.backlog_frames.get(), 3);
        r.written(p, 2, 150);
        assert_eq!(pm.backlog(), (1, 30));
        r.enqueued(p, 20);
        r.written(p, 2, 50);
        assert_eq!(pm.backlog(), (0, 0));
        assert_eq!(pm.backlog_frames.get(), 0);
        r.enqueued(p, 70);
        drop(LinkGuard {
            peer: Some(pm.clone()),
            id: 0,
        });
        assert_eq!(pm.backlog(), (0, 0));
        assert_eq!(pm.backlog_bytes.get(), 0);
    }

    /// A peer that sends a frame with a bad CRC, then (reconnecting) one
    /// with bad magic: both counted as bad frames, the first also as a
    /// checksum error, and the second connection as a reconnect.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn corrupt_frames_from_a_real_peer_are_counted() {
        use crate::replication::{run_acceptor, Replicator};
        use crate::storage::{memory::MemoryEngine, Engine};
        use crate::transport::{certs, PeerEndpoint, TlsIdentity};
        use crate::volume::Volume;
        use bytes::BytesMut;
        use std::time::SystemTime;
        use tandem_core::repl::{Frame, Replica, Time};
        use tandem_core::superblock::Superblock;

        const SIZE: u64 = 8 << 20;
        let ca = certs::create_ca("test CA", Duration::from_secs(3600)).expect("ca");
        let identity = |node: &str| {
            let now = SystemTime::now();
            let c = certs::issue_node_cert(
                &ca,
                node,
                now - Duration::from_secs(60),
                now + Duration::from_secs(3600),
            )
            .expect("cert");
            TlsIdentity::from_pem(&c.cert_pem, &c.key_pem, &ca.cert_pem).expect("identity")
        };
        let uuid = [7; 16];
        let sb = Superblock::new(uuid, "m", SIZE, 512, 0).expect("superblock");
        let mem = MemoryEngine::new(sb.backing_len());
        let path = std::path::Path::new("mem");
        crate::volume::create(&mem, path, sb, false)
            .await
            .expect("create");
        let engine: Arc<dyn Engine> = Arc::new(mem);
        let volume = Volume::open(engine, path, &Default::default(), false)
            .await
            .expect("open");
        let cfg = tandem_core::repl::Config::new("beta", uuid, SIZE, 512, vec!["alpha".into()]);
        let replica = Replica::new(cfg, Time::ZERO).expect("replica");
        let registry = Metrics::new();
        let rm = registry.replication("m", &["alpha".to_string()]);
        let layout = volume.bitmap_layout(4096).expect("layout");
        let r = Replicator::spawn_with_metrics(replica, Arc::new(volume), layout, rm.clone());
        let addr = "127.0.0.1:0".parse().expect("addr");
        let beta = Arc::new(
            PeerEndpoint::bind(addr, &identity("beta"), vec!["alpha".into()]).expect("bind"),
        );
        tokio::spawn(run_acceptor(beta.clone(), r));
        let alpha =
            PeerEndpoint::bind(addr, &identity("alpha"), vec!["beta".into()]).expect("bind");
        let pm = rm.peer(PeerId(0)).expect("peer").clone();

        for round in 0..2u64 {
            let conn = alpha
                .connect(beta.local_addr().expect("addr"), "beta")
                .await
                .expect("connect");
            let (mut send, _recv) = conn.open_bi().await.expect("open stream");
            let mut buf = BytesMut::new();
            let env = tandem_core::repl::lanes::Envelope {
                seq: 0,
                barrier: None,
            };
            env.encode(&mut buf);
            let at = tandem_core::repl::lanes::ENVELOPE_LEN;
            Frame::Ping { nonce: 42 }.encode(&mut buf);
            if round == 0 {
                buf[at + 12] ^= 1; // in the CRC-covered header: checksum mismatch
            } else {
                buf[at] ^= 0xff; // bad magic
            }
            send.write_all(&buf).await.expect("send");
            // Beta closes the connection on the bad frame.
            tokio::time::timeout(Duration::from_secs(10), conn.closed())
                .await
                .expect("beta closes the connection");
            for _ in 0..200 {
                if pm.frame_errors().1 > round {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        assert_eq!(pm.frame_errors(), (1, 2), "(checksum errors, bad frames)");
        assert_eq!(pm.reconnects(), 1);
        let text = registry.encode();
        for line in [
            r#"tandem_peer_checksum_errors_total{volume="m",peer="alpha"} 1"#,
            r#"tandem_peer_bad_frames_total{volume="m",peer="alpha"} 2"#,
            r#"tandem_peer_reconnects_total{volume="m",peer="alpha"} 1"#,
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in:\n{text}"
            );
        }
    }

    #[test]
    fn checksum_errors_are_a_subset_of_bad_frames() {
        let r = ReplicationMetrics::detached(2);
        r.bad_frame(PeerId(1), &FrameError::UnknownKind(9));
        r.bad_frame(
            PeerId(1),
            &FrameError::Checksum {
                stored: 0,
                computed: 1,
            },
        );
        r.bad_frame(PeerId(7), &FrameError::UnknownKind(9)); // no such peer: ignored
        assert_eq!(r.peer(PeerId(1)).expect("peer").frame_errors(), (1, 2));
        assert_eq!(r.peer(PeerId(0)).expect("peer").frame_errors(), (0, 0));
    }

    #[test]
    fn io_record_counts_requests_bytes_errors_and_latency() {
        let io = IoMetrics::default();
        io.record(Command::Trim, 1 << 20, true, Duration::from_micros(30));
        io.record(Command::Flush, 0, true, Duration::from_micros(30));
        io.record(Command::Write, 4096, false, Duration::from_micros(30));
        io.record(Command::Disc, 0, true, Duration::ZERO); // not an I/O op
        let trim = &io.ops[3];
        assert_eq!((trim.requests.get(), trim.bytes.get()), (1, 1 << 20));
        let w = &io.ops[1];
        assert_eq!((w.requests.get(), w.bytes.get(), w.errors.get()), (1, 0, 1));
        assert_eq!(io.ops[2].bytes.get(), 0);
        assert_eq!(io.ops.iter().map(|o| o.requests.get()).sum::<u64>(), 3);
    }
}
