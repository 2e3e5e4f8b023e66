//! Exports: volumes served over NBD, with their advertised limits and counters.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use serde::Serialize;
use tandem_core::nbd::{tflag, BlockSizes, ExportCatalog, ExportInfo, ExportLimits};

use crate::metrics::IoMetrics;
use crate::replication::Replicator;
use crate::storage::faulty::FaultSwitch;
use crate::volume::Volume;

/// Largest READ/WRITE payload advertised (NBD_INFO_BLOCK_SIZE maximum).
pub const MAX_PAYLOAD: u32 = 32 << 20;

/// Per-export counters (monotonic, except `connections`).
#[derive(Debug, Default)]
pub struct ExportStats {
    /// Open connections in transmission.
    pub connections: AtomicU64,
    /// Completed reads.
    pub reads: AtomicU64,
    /// Completed writes.
    pub writes: AtomicU64,
    /// Bytes read.
    pub read_bytes: AtomicU64,
    /// Bytes written.
    pub write_bytes: AtomicU64,
    /// Completed flushes.
    pub flushes: AtomicU64,
    /// Completed trims and write-zeroes.
    pub discards: AtomicU64,
    /// Requests refused as invalid (bad range, alignment, flags, command).
    pub invalid: AtomicU64,
    /// Requests failed by the storage.
    pub io_errors: AtomicU64,
}

/// A snapshot of an export for `tandemctl status`.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct ExportStatus {
    /// Export name.
    pub name: String,
    /// Volume UUID.
    pub uuid: String,
    /// Backing path.
    pub backing: String,
    /// Storage engine kind.
    pub engine: String,
    /// Size in bytes.
    pub size: u64,
    /// Logical block size.
    pub block_size: u32,
    /// Read-only export.
    pub read_only: bool,
    /// Open connections.
    pub connections: u64,
    /// Completed reads.
    pub reads: u64,
    /// Completed writes.
    pub writes: u64,
    /// Bytes read.
    pub read_bytes: u64,
    /// Bytes written.
    pub write_bytes: u64,
    /// Completed flushes.
    pub flushes: u64,
    /// Completed trims and write-zeroes.
    pub discards: u64,
    /// Invalid requests refused.
    pub invalid: u64,
    /// Storage errors.
    pub io_errors: u64,
    /// Replication state, for a replicated volume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replication: Option<ReplicationStatus>,
}

/// Replication state of one export.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct ReplicationStatus {
    /// This node's role: Primary or Secondary.
    pub role: String,
    /// This node's disk state.
    pub disk: String,
    /// Frontend requests in flight in the replica.
    pub in_flight: usize,
    /// Dual-primary concurrent-write conflicts detected since start (both
    /// Primaries wrote overlapping blocks; ordered the same on both, R9).
    #[serde(default)]
    pub conflicts: u64,
    /// The local disk failed and is detached (disk `Diskless`): I/O goes
    /// through UpToDate peers (docs/replication.md, R23).
    #[serde(default)]
    pub detached: bool,
    /// Per peer.
    pub peers: Vec<PeerStatusJson>,
    /// Quorum and witness (R25).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quorum: Option<crate::witness::QuorumStatus>,
    /// This node volunteers to discard its data in a split brain (R24).
    #[serde(default)]
    pub discard_my_data: bool,
}

/// One peer, as `tandemctl status` shows it.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct PeerStatusJson {
    /// Peer node name.
    pub name: String,
    /// Connection state.
    pub connection: String,
    /// Replication state.
    pub replication: String,
    /// Peer disk state as this node sees it.
    pub disk: String,
    /// The peer missed writes and needs a resync.
    pub outdated: bool,
    /// Role the peer last reported: Primary, Secondary or Unknown.
    #[serde(default)]
    pub role: String,
    /// Requests sent to the peer and not yet acknowledged by it.
    #[serde(default)]
    pub in_flight: usize,
    /// Bytes the peer may lack: the regions marked in this node's bitmap
    /// for it, plus the bytes sent and not yet acknowledged.
    #[serde(default)]
    pub out_of_sync_bytes: u64,
    /// The resync running with this peer, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sync: Option<SyncJson>,
    /// The last handshake found a split brain.
    #[serde(default)]
    pub split_brain: bool,
    /// The online verify with this peer, running or last finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verify: Option<VerifyJson>,
}

/// An online verify, as `tandemctl status` and `tandemctl verify` show it.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct VerifyJson {
    /// Bytes compared so far.
    pub done_bytes: u64,
    /// Bytes to compare (the volume size).
    pub total_bytes: u64,
    /// Bytes found different.
    pub differing_bytes: u64,
    /// The differing byte ranges `[start, end)`.
    pub ranges: Vec<(u64, u64)>,
    /// Bytes written to during every check and given up.
    #[serde(default)]
    pub skipped_bytes: u64,
    /// Over (completed or aborted).
    pub finished: bool,
    /// Why it stopped early.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aborted: Option<String>,
    /// The differing blocks were marked for resync.
    #[serde(default)]
    pub marked: bool,
    /// Milliseconds since it started (until it finished).
    #[serde(default)]
    pub elapsed_ms: u64,
}

impl From<&tandem_core::repl::VerifyProgress> for VerifyJson {
    fn from(v: &tandem_core::repl::VerifyProgress) -> VerifyJson {
        VerifyJson {
            done_bytes: v.done_bytes,
            total_bytes: v.total_bytes,
            differing_bytes: v.differing_bytes,
            ranges: v.ranges.clone(),
            skipped_bytes: v.skipped_bytes,
            finished: v.finished,
            aborted: v.aborted.clone(),
            marked: v.marked,
            elapsed_ms: u64::try_from(v.elapsed.as_millis()).unwrap_or(u64::MAX),
        }
    }
}

/// A resync in progress, as `tandemctl status` shows it.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct SyncJson {
    /// `SyncSource` or `SyncTarget`: this node's side.
    pub role: String,
    /// Bytes moved so far.
    pub done_bytes: u64,
    /// Bytes left (known on the source; 0 on the target).
    pub remaining_bytes: u64,
    /// Estimated seconds left at the rate so far (source only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eta_secs: Option<u64>,
    /// Checksum-based resync (R26, source): bytes compared by digest with
    /// the target so far.
    #[serde(default)]
    pub compared_bytes: u64,
    /// Of those, bytes found identical and not sent.
    #[serde(default)]
    pub identical_bytes: u64,
}

/// One exported volume.
#[derive(Debug)]
pub struct Export {
    /// NBD export name.
    pub name: String,
    /// Description shown by `NBD_OPT_LIST`/`INFO`.
    pub description: String,
    /// The volume.
    pub volume: Arc<Volume>,
    /// Counters.
    pub stats: ExportStats,
    /// Prometheus I/O metric handles (in no registry unless `tandemd` set them).
    pub io: IoMetrics,
    /// The replication driver, for a replicated volume: every write, flush,
    /// trim and write-zeroes goes through it (reads stay local).
    pub replicator: Option<Replicator>,
    /// Fault injection for this export's engine (admin `inject_fault`).
    pub faults: Arc<FaultSwitch>,
}

impl Export {
    /// Wraps a volume.
    pub fn new(name: String, description: String, volume: Arc<Volume>) -> Self {
        Export {
            name,
            description,
            volume,
            stats: ExportStats::default(),
            io: IoMetrics::default(),
            replicator: None,
            faults: FaultSwitch::new(),
        }
    }

    /// What the handshake advertises.
    pub fn info(&self) -> ExportInfo {
        let mut flags = tflag::HAS_FLAGS
            | tflag::SEND_FLUSH
            | tflag::SEND_FUA
            | tflag::SEND_TRIM
            | tflag::SEND_WRITE_ZEROES
            | tflag::CAN_MULTI_CONN;
        if self.volume.read_only() {
            flags |= tflag::READ_ONLY;
        }
        let bs = self.volume.block_size();
        ExportInfo {
            name: self.name.clone(),
            description: self.description.clone(),
            size: self.volume.size(),
            flags,
            block_sizes: BlockSizes {
                minimum: bs,
                preferred: bs.max(4096),
                maximum: MAX_PAYLOAD,
            },
        }
    }

    /// What transmission enforces (matches [`Export::info`]).
    pub fn limits(&self) -> ExportLimits {
        ExportLimits {
            size: self.volume.size(),
            min_block: self.volume.block_size(),
            max_payload: MAX_PAYLOAD,
            read_only: self.volume.read_only(),
        }
    }

    /// Snapshot for status.
    pub fn status(&self) -> ExportStatus {
        let s = &self.stats;
        let sb = self.volume.superblock();
        ExportStatus {
            name: self.name.clone(),
            uuid: sb.uuid_string(),
            backing: self.volume.path().display().to_string(),
            engine: self.volume.engine().kind().to_string(),
            size: sb.size,
            block_size: sb.block_size,
            read_only: self.volume.read_only(),
            connections: s.connections.load(Relaxed),
            reads: s.reads.load(Relaxed),
            writes: s.writes.load(Relaxed),
            read_bytes: s.read_bytes.load(Relaxed),
            write_bytes: s.write_bytes.load(Relaxed),
            flushes: s.flushes.load(Relaxed),
            discards: s.discards.load(Relaxed),
            invalid: s.invalid.load(Relaxed),
            io_errors: s.io_errors.load(Relaxed),
            replication: None,
        }
    }

    /// Snapshot for status, including the replica's state.
    pub async fn full_status(&self) -> ExportStatus {
        let mut st = self.status();
        if let Some(r) = &self.replicator {
            if let Ok(rs) = r.status().await {
                st.replication = Some(ReplicationStatus {
                    role: format!("{:?}", rs.role),
                    disk: format!("{:?}", rs.disk),
                    in_flight: rs.in_flight,
                    conflicts: rs.conflicts,
                    detached: rs.disk == tandem_core::repl::DiskState::Diskless,
                    peers: rs
                        .peers
                        .iter()
                        .zip(rs.verify.iter().chain(std::iter::repeat(
                            &None::<tandem_core::repl::VerifyProgress>,
                        )))
                        .map(|(p, v)| PeerStatusJson {
                            name: p.name.clone(),
                            connection: format!("{:?}", p.conn),
                            replication: format!("{:?}", p.repl),
                            disk: p
                                .disk
                                .map_or_else(|| "DUnknown".into(), |d| format!("{d:?}")),
                            outdated: p.outdated,
                            role: p
                                .role
                                .map_or_else(|| "Unknown".into(), |r| format!("{r:?}")),
                            in_flight: p.in_flight,
                            out_of_sync_bytes: p.out_of_sync_bytes,
                            sync: p.sync.map(|s| SyncJson {
                                role: match s.role {
                                    tandem_core::repl::SyncRole::Source => "SyncSource".into(),
                                    tandem_core::repl::SyncRole::Target => "SyncTarget".into(),
                                },
                                done_bytes: s.done_bytes,
                                remaining_bytes: s.remaining_bytes,
                                eta_secs: {
                                    // Progress counts identical bytes too.
                                    let covered = s.done_bytes + s.identical_bytes;
                                    (covered > 0 && !s.elapsed.is_zero()).then(|| {
                                        let rate = covered as f64 / s.elapsed.as_secs_f64();
                                        (s.remaining_bytes as f64 / rate).ceil() as u64
                                    })
                                },
                                compared_bytes: s.compared_bytes,
                                identical_bytes: s.identical_bytes,
                            }),
                            split_brain: p.split_brain,
                            verify: v.as_ref().map(VerifyJson::from),
                        })
                        .collect(),
                    quorum: Some(rs.quorum),
                    discard_my_data: rs.discard_my_data,
                });
            }
        }
        st
    }
}

/// All exports of a daemon. The first is the default (selected by the empty name).
#[derive(Debug, Default)]
pub struct Exports {
    list: Vec<Arc<Export>>,
}

impl Exports {
    /// Builds the set; names must be unique (checked by config validation).
    pub fn new(list: Vec<Arc<Export>>) -> Self {
        Exports { list }
    }

    /// Finds an export by name; "" is the default export.
    pub fn get(&self, name: &str) -> Option<&Arc<Export>> {
        if name.is_empty() {
            return self.list.first();
        }
        self.list.iter().find(|e| e.name == name)
    }

    /// All exports.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Export>> {
        self.list.iter()
    }
}

impl ExportCatalog for Exports {
    fn lookup(&self, name: &str) -> Option<ExportInfo> {
        self.get(name).map(|e| e.info())
    }

    fn list(&self) -> Vec<(String, String)> {
        self.list
            .iter()
            .map(|e| (e.name.clone(), e.description.clone()))
            .collect()
    }
}
