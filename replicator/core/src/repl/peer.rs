//! What a replica knows about each peer.

use std::collections::BTreeMap;

use super::frame::HelloGens;
use super::state::{ConnState, DiskState, ReplState, Role};
use super::sync::SyncRole;
use super::{IoId, PeerId, Time};
use crate::meta::Bitmap;

/// A small set of peers (at most [`super::MAX_PEERS`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct PeerSet(u8);

impl PeerSet {
    pub(crate) fn insert(&mut self, p: PeerId) {
        self.0 |= 1 << p.0;
    }
    pub(crate) fn remove(&mut self, p: PeerId) -> bool {
        let had = self.contains(p);
        self.0 &= !(1 << p.0);
        had
    }
    pub(crate) fn contains(&self, p: PeerId) -> bool {
        p.0 < 8 && self.0 & (1 << p.0) != 0
    }
    pub(crate) fn is_empty(&self) -> bool {
        self.0 == 0
    }
    pub(crate) fn iter(self) -> impl Iterator<Item = PeerId> {
        (0..8u8).filter(move |i| self.0 & (1 << i) != 0).map(PeerId)
    }
}

/// This node as a sync source towards a peer.
#[derive(Debug, Clone, Default)]
pub(crate) struct Source {
    /// Waiting for the target's `SyncBits` (last frame not yet received).
    pub(crate) awaiting_bits: bool,
    /// Next bit to look at.
    pub(crate) cursor: u64,
    /// Reads in flight: io → (resync id, first bit, last bit).
    pub(crate) reads: BTreeMap<IoId, (u64, u64, u64)>,
    /// Frames sent and not acked: id → (first bit, last bit).
    pub(crate) sent: BTreeMap<u64, (u64, u64)>,
    pub(crate) next_id: u64,
    /// Bytes moved so far.
    pub(crate) done: u64,
    /// Bytes to move when the sync started (bits known then).
    pub(crate) total: u64,
    /// When the sync started.
    pub(crate) started: Time,
    /// Fixed rate: the next read may not start before this.
    pub(crate) next_start: Time,
    /// Checksum-based resync (R26): runs whose target digests were asked
    /// for and which are not finished: resync id → run.
    pub(crate) csum: BTreeMap<u64, CsumRun>,
    /// Data frames of checksum runs sent and not acked: id → (run id,
    /// bytes).
    pub(crate) csum_pieces: BTreeMap<u64, (u64, u64)>,
    /// Bytes compared by digest so far.
    pub(crate) compared: u64,
    /// Bytes found identical by digest (not sent).
    pub(crate) identical: u64,
}

impl Source {
    /// Runs in flight (reads, frames not acked, checksum runs), each
    /// counted once.
    pub(crate) fn in_flight(&self) -> usize {
        let plain_reads = self
            .reads
            .values()
            .filter(|(id, _, _)| !self.csum.contains_key(id))
            .count();
        plain_reads + self.sent.len() + self.csum.len()
    }

    /// The bit ranges in flight: reads, frames not acked, checksum runs.
    pub(crate) fn runs_in_flight(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.reads
            .values()
            .map(|(_, a, b)| (*a, *b))
            .chain(self.sent.values().copied())
            .chain(self.csum.values().map(|r| (r.first, r.last)))
    }
}

/// One run of a checksum-based resync (R26).
#[derive(Debug, Clone, Default)]
pub(crate) struct CsumRun {
    /// First bit.
    pub(crate) first: u64,
    /// Bit after the last.
    pub(crate) last: u64,
    /// This node's data, once read.
    pub(crate) data: Option<bytes::Bytes>,
    /// The target's digests, once received.
    pub(crate) remote: Option<Vec<u64>>,
    /// Data frames sent for it and not yet acked (compared already).
    pub(crate) pieces: usize,
}

/// Sync state towards one peer.
#[derive(Debug, Clone, Default)]
pub(crate) enum PeerSync {
    /// No sync (in sync, or not connected).
    #[default]
    None,
    /// This node sends.
    Source(Source),
    /// Every bit is synced and `SyncDone` sent; waiting for the peer to
    /// report UpToDate before forgetting its bitmap generation.
    SourceDone {
        /// Bytes moved.
        done: u64,
        /// Bytes compared by digest (R26).
        compared: u64,
        /// Bytes found identical by digest and not sent (R26).
        identical: u64,
    },
    /// This node receives.
    Target {
        /// Bytes written so far.
        received: u64,
    },
}

/// Writes sent to a peer and not yet covered by a flush it acknowledged, at
/// extent granularity: if the peer restarts, they may be lost there.
#[derive(Debug, Clone)]
pub(crate) struct Unflushed {
    /// Since the last flush sent.
    pub(crate) cur: Bitmap,
    /// Covered by flushes in flight: flush id → extents.
    pub(crate) pending: Vec<(u64, Bitmap)>,
}

/// Per-peer state.
#[derive(Debug, Clone)]
pub(crate) struct Peer {
    pub(crate) name: String,
    pub(crate) conn: ConnState,
    /// Bumped on every connect and loss; acks of an older connection are
    /// dropped.
    pub(crate) epoch: u64,
    /// Role and own disk state the peer last reported (None: never heard).
    pub(crate) role: Option<Role>,
    pub(crate) disk: Option<DiskState>,
    pub(crate) last_rx: Time,
    pub(crate) next_ping: Time,
    /// What this node put in its Hello to the peer (the decision uses it).
    pub(crate) hello_sent: Option<(HelloGens, Role, DiskState)>,
    pub(crate) sync: PeerSync,
    /// The handshake found a resync needed but neither side Primary.
    pub(crate) sync_deferred: bool,
    /// Sync target: a Generation that arrived before the SyncDone applied.
    pub(crate) pending_gen: Option<(u64, crate::meta::History)>,
    /// The generation the peer is known to hold durably.
    pub(crate) confirmed_gen: u64,
    /// Source: the generation sent in SyncDone (confirmed with UpToDate).
    pub(crate) sync_done_gen: Option<u64>,
    /// Generations sent and not yet confirmed: (first request seq whose
    /// ack confirms it, generation).
    pub(crate) gen_unconfirmed: std::collections::VecDeque<(u64, u64)>,
    /// The last handshake found a split brain (cleared by a good handshake).
    pub(crate) split_brain: bool,
    /// The peer's instance id at the last handshake.
    pub(crate) instance: Option<u64>,
    pub(crate) unflushed: Unflushed,
    /// Extents unflushed on the peer when it was lost: resynced if it turns
    /// out to have restarted since.
    pub(crate) lost_unflushed: Option<Bitmap>,
    /// Online verify with this peer, running or last finished (R22).
    pub(crate) verify: Option<super::verify::Verify>,
}

impl Peer {
    pub(crate) fn new(name: String, size: u64, extent: u64) -> Peer {
        let ext = u32::try_from(extent).unwrap_or(u32::MAX);
        Peer {
            name,
            conn: ConnState::StandAlone,
            epoch: 0,
            role: None,
            disk: None,
            last_rx: Time::ZERO,
            next_ping: Time::ZERO,
            hello_sent: None,
            sync: PeerSync::None,
            sync_deferred: false,
            pending_gen: None,
            confirmed_gen: 0,
            sync_done_gen: None,
            gen_unconfirmed: std::collections::VecDeque::new(),
            split_brain: false,
            instance: None,
            unflushed: Unflushed {
                cur: Bitmap::new(size, ext),
                pending: Vec::new(),
            },
            lost_unflushed: None,
            verify: None,
        }
    }

    /// Whether writes are replicated to this peer: connected and either
    /// reporting UpToDate with no sync running, or a sync target of this
    /// node (it gets every write while the resync fills in the rest).
    pub(crate) fn replicating(&self) -> bool {
        if self.conn != ConnState::Connected {
            return false;
        }
        match self.sync {
            PeerSync::None => self.disk == Some(DiskState::UpToDate),
            PeerSync::Source(_) | PeerSync::SourceDone { .. } => true,
            PeerSync::Target { .. } => self.disk == Some(DiskState::UpToDate),
        }
    }

    pub(crate) fn repl_state(&self) -> ReplState {
        if self.conn != ConnState::Connected {
            return ReplState::Off;
        }
        match self.sync {
            // Until the target confirms it is UpToDate, the sync is not over.
            PeerSync::Source(_) | PeerSync::SourceDone { .. } => ReplState::SyncSource,
            PeerSync::Target { .. } => ReplState::SyncTarget,
            PeerSync::None if self.replicating() => ReplState::Established,
            PeerSync::None => ReplState::Off,
        }
    }
}

/// Progress of a resync with one peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyncProgress {
    /// This node's side.
    pub role: SyncRole,
    /// Bytes moved so far.
    pub done_bytes: u64,
    /// Bytes still to move (known on the source; 0 on the target).
    pub remaining_bytes: u64,
    /// Time since the sync started (source; zero on the target).
    pub elapsed: std::time::Duration,
    /// Checksum-based resync (R26, source): bytes whose digests were
    /// compared with the target's so far.
    pub compared_bytes: u64,
    /// Of those, bytes found identical and therefore not sent.
    pub identical_bytes: u64,
}

/// A snapshot of one peer, from [`super::Replica::peer_status`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerStatus {
    /// The peer's configured name.
    pub name: String,
    /// Connection state.
    pub conn: ConnState,
    /// Whether writes are replicated to it, or a resync runs.
    pub repl: ReplState,
    /// Role it last reported.
    pub role: Option<Role>,
    /// Its disk as this node sees it: its report, lowered to Outdated while
    /// this node holds writes it lacks (`None` if never heard and in sync).
    pub disk: Option<DiskState>,
    /// This node holds writes the peer lacks (its bitmap for the peer has
    /// bits, or started in an earlier generation): it needs a resync.
    pub outdated: bool,
    /// Frontend requests (writes, trims, write-zeroes, flushes) sent to this
    /// peer and not yet acknowledged by it.
    pub in_flight: usize,
    /// Bytes of the volume this peer may not hold: the regions marked in
    /// this node's bitmap for it, plus writes sent and not yet acknowledged.
    pub out_of_sync_bytes: u64,
    /// The resync running with this peer, if any.
    pub sync: Option<SyncProgress>,
    /// The last handshake found a split brain: both sides wrote while apart.
    pub split_brain: bool,
}
