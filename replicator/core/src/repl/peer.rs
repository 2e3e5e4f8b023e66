//! What a replica knows about each peer.

use super::state::{ConnState, DiskState, ReplState, Role};
use super::{PeerId, Time};

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
    /// Sticky: the peer missed writes (or may have) and needs a full resync.
    /// Cleared only by a resync (a later issue).
    pub(crate) outdated: bool,
    pub(crate) last_rx: Time,
    pub(crate) next_ping: Time,
}

impl Peer {
    pub(crate) fn new(name: String) -> Peer {
        Peer {
            name,
            conn: ConnState::StandAlone,
            epoch: 0,
            role: None,
            disk: None,
            outdated: false,
            last_rx: Time::ZERO,
            next_ping: Time::ZERO,
        }
    }

    /// Whether writes are replicated to this peer: connected, reports an
    /// UpToDate disk, and not held Outdated.
    pub(crate) fn replicating(&self) -> bool {
        self.conn == ConnState::Connected
            && self.disk == Some(DiskState::UpToDate)
            && !self.outdated
    }

    /// The peer's disk as this node sees it: its report, lowered to Outdated
    /// if this node holds it Outdated.
    pub(crate) fn effective_disk(&self) -> Option<DiskState> {
        match self.disk {
            Some(d) if self.outdated => Some(d.min(DiskState::Outdated)),
            other => other.or(self.outdated.then_some(DiskState::Outdated)),
        }
    }
}

/// A snapshot of one peer, from [`super::Replica::peer_status`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerStatus {
    /// The peer's configured name.
    pub name: String,
    /// Connection state.
    pub conn: ConnState,
    /// Whether writes are replicated to it.
    pub repl: ReplState,
    /// Role it last reported.
    pub role: Option<Role>,
    /// Its disk as this node sees it (its report, lowered to Outdated when
    /// this node holds it Outdated; `None` if never heard and not outdated).
    pub disk: Option<DiskState>,
    /// This node holds it Outdated (it missed writes; needs a resync).
    pub outdated: bool,
    /// Frontend requests (writes, trims, write-zeroes, flushes) sent to this
    /// peer and not yet acknowledged by it.
    pub in_flight: usize,
    /// Bytes of the volume this peer may not hold yet. While it is held
    /// Outdated: the whole volume size (without dirty bitmaps it needs a full
    /// resync). Otherwise: the bytes of writes, trims and write-zeroes sent
    /// to it and not yet acknowledged (0 when it is in sync). Bitmaps (a
    /// later issue) will refine the Outdated case to the dirty regions.
    pub out_of_sync_bytes: u64,
}

impl PeerStatus {
    /// A snapshot of `p` with the counters the replica computed.
    pub(crate) fn new(p: &Peer, in_flight: usize, out_of_sync_bytes: u64) -> PeerStatus {
        PeerStatus {
            name: p.name.clone(),
            conn: p.conn,
            repl: if p.replicating() {
                ReplState::Established
            } else {
                ReplState::Off
            },
            role: p.role,
            disk: p.effective_disk(),
            outdated: p.outdated,
            in_flight,
            out_of_sync_bytes,
        }
    }
}
