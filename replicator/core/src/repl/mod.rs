//! The replication state machine (sans-IO) and its wire frames.
//!
//! A [`Replica`] is one node's view of one volume. It is driven like
//! quinn-proto: the driver feeds it [`Input`]s with the current [`Time`]
//! ([`Replica::handle`]), drains [`Output`]s ([`Replica::poll_output`]) and
//! calls [`Replica::handle_timeout`] once [`Replica::poll_timeout`] has passed.
//! It never reads a clock, touches a disk or opens a socket: local I/O and
//! frames to peers are [`Output`]s, their results come back as [`Input`]s.
//!
//! # Driver loop
//!
//! 1. Feed every event as an [`Input`] to [`Replica::handle`] (or call
//!    [`Replica::promote`] / [`Replica::demote`]).
//! 2. Drain [`Replica::poll_output`] until `None` and act on each output *in
//!    order*: perform [`Output::LocalIo`] on the local disk and report
//!    [`Input::LocalDone`]; queue [`Output::Send`] on the peer's ordered
//!    stream; answer the frontend on [`Output::Complete`]; close the transport
//!    on [`Output::Disconnect`].
//! 3. Sleep until a new event or [`Replica::poll_timeout`], whichever comes
//!    first; at the timeout call [`Replica::handle_timeout`] and go to 2.
//!
//! The rules the state machine keeps (completion, ordering, durability, peer
//! states) are numbered in `docs/replication.md`, each with its test.

mod config;
mod detach;
pub mod frame;
mod grow;
mod handshake;
pub mod lanes;
mod peer;
mod replica;
mod state;
mod sync;
mod verify;
mod write_path;

#[cfg(test)]
mod tests;

pub use config::{
    Config, ConfigError, DEFAULT_AL_EXTENTS, DEFAULT_BITMAP_CHUNK, DEFAULT_EXTENT,
    DEFAULT_KEEPALIVE, DEFAULT_PEER_TIMEOUT, MAX_PEERS,
};
pub use frame::{Frame, FrameError, Hello, HelloGens, SplitBrainPolicy};
pub use grow::GrowError;
pub use peer::{PeerStatus, SyncProgress};
pub use replica::{Quorum, Replica, RoleError};
pub use state::{ConnState, DiskState, Protocol, ReplState, Role};
pub use sync::{decide, Decision, LoadedMeta, MetaAt, SyncRole};
pub use verify::{block_digest, VerifyError, VerifyProgress, MAX_ATTEMPTS, VERIFY_WINDOW};

use bytes::Bytes;
use std::time::Duration;

/// errno values the replica reports (Linux numbering, which the NBD protocol
/// shares for these).
pub mod errno {
    /// Operation not permitted: a write to a Secondary.
    pub const EPERM: i32 = 1;
    /// Input/output error.
    pub const EIO: i32 = 5;
    /// Invalid argument: misaligned, empty or oversized request.
    pub const EINVAL: i32 = 22;
    /// Request beyond the end of the volume.
    pub const ENOSPC: i32 = 28;
}

/// A point in time, in nanoseconds of a monotonic clock chosen by the driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Time(u64);

impl Time {
    /// The driver's epoch.
    pub const ZERO: Time = Time(0);

    /// A time `nanos` nanoseconds after the epoch.
    pub const fn from_nanos(nanos: u64) -> Time {
        Time(nanos)
    }

    /// Nanoseconds since the epoch.
    pub const fn as_nanos(self) -> u64 {
        self.0
    }

    /// Time elapsed since `earlier` (zero if `earlier` is later).
    pub fn since(self, earlier: Time) -> Duration {
        Duration::from_nanos(self.0.saturating_sub(earlier.0))
    }
}

impl std::ops::Add<Duration> for Time {
    type Output = Time;

    /// `self + d`, saturating at the end of time.
    fn add(self, d: Duration) -> Time {
        Time(
            self.0
                .saturating_add(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)),
        )
    }
}

/// A peer: index into [`Config::peers`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PeerId(pub u8);

/// A frontend request, named by the driver; echoed in [`Output::Complete`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ReqId(pub u64);

/// A local I/O, named by the replica; echoed in [`Input::LocalDone`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct IoId(pub u64);

/// A block operation, from the frontend or to the local disk. Reads are not
/// the replica's business while the local disk is attached: the driver
/// serves them from the local disk (see [`Input::FrontendRead`] otherwise).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Write `data` at `offset`.
    Write {
        /// Byte offset.
        offset: u64,
        /// Data (a buffer handle, never copied by the replica).
        data: Bytes,
        /// Durable before completion.
        fua: bool,
    },
    /// Make every completed write durable.
    Flush,
    /// Discard a range (reads back zeroes).
    Trim {
        /// Byte offset.
        offset: u64,
        /// Length in bytes.
        len: u64,
        /// Durable before completion.
        fua: bool,
    },
    /// Write zeroes to a range.
    WriteZeroes {
        /// Byte offset.
        offset: u64,
        /// Length in bytes.
        len: u64,
        /// Must not deallocate.
        no_hole: bool,
        /// Durable before completion.
        fua: bool,
    },
}

impl Op {
    /// The byte range `[start, end)` the operation changes, if any (`None` for
    /// flushes; saturates on overflow, which validation rejects).
    pub fn range(&self) -> Option<(u64, u64)> {
        match self {
            Op::Write { offset, data, .. } => {
                Some((*offset, offset.saturating_add(data.len() as u64)))
            }
            Op::Trim { offset, len, .. } | Op::WriteZeroes { offset, len, .. } => {
                Some((*offset, offset.saturating_add(*len)))
            }
            Op::Flush => None,
        }
    }

    /// Whether the operation asks for durability before completion (FUA, or a
    /// flush).
    pub fn is_durable(&self) -> bool {
        match self {
            Op::Write { fua, .. } | Op::Trim { fua, .. } | Op::WriteZeroes { fua, .. } => *fua,
            Op::Flush => true,
        }
    }
}

/// Something that happened, fed to [`Replica::handle`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// A frontend request (never a read).
    Frontend {
        /// Driver's name for it.
        req: ReqId,
        /// The operation.
        op: Op,
    },
    /// A [`Output::LocalIo`] finished.
    LocalDone {
        /// The I/O.
        io: IoId,
        /// `Err(errno)` on failure.
        result: Result<(), i32>,
    },
    /// The transport to a peer is up (a fresh ordered stream).
    PeerConnected {
        /// Which peer.
        peer: PeerId,
    },
    /// A frame arrived from a peer, in stream order.
    PeerFrame {
        /// From which peer.
        peer: PeerId,
        /// The decoded frame.
        frame: Frame,
    },
    /// The transport to a peer broke; frames not yet delivered are lost.
    PeerDisconnected {
        /// Which peer.
        peer: PeerId,
    },
    /// An [`Output::Read`] finished.
    ReadDone {
        /// The read.
        io: IoId,
        /// The data (exactly the length asked for) or `Err(errno)`.
        result: Result<Bytes, i32>,
    },
    /// A frontend read the driver does not serve from the local disk
    /// itself: the disk is detached, or the driver's local read failed with
    /// `local_error` (which detaches it, R23). Served from the local disk
    /// (while attached) or through an UpToDate peer; answered with
    /// [`Output::ReadComplete`].
    FrontendRead {
        /// Driver's name for it.
        req: ReqId,
        /// Byte offset.
        offset: u64,
        /// Length in bytes.
        len: u64,
        /// errno of the driver's failed local read, if it tried one.
        local_error: Option<i32>,
    },
}

/// Something the driver must do, from [`Replica::poll_output`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// Perform `op` on the local disk, then report [`Input::LocalDone`].
    LocalIo {
        /// Echo in `LocalDone`.
        io: IoId,
        /// What to do.
        op: Op,
    },
    /// Queue `frame` on the peer's ordered stream.
    Send {
        /// To which peer.
        peer: PeerId,
        /// The frame.
        frame: Frame,
    },
    /// Answer the frontend request.
    Complete {
        /// Which request.
        req: ReqId,
        /// `Err(errno)` on failure.
        result: Result<(), i32>,
    },
    /// Close the transport to the peer *after* sending the frames queued
    /// before this output (a graceful close, so a `HelloRefused` reaches the
    /// peer). The replica already treats the peer as gone: frames still
    /// arriving from it and a later [`Input::PeerDisconnected`] are ignored.
    Disconnect {
        /// Which peer.
        peer: PeerId,
        /// Why, for logs.
        reason: String,
    },
    /// Write `data` to the metadata area at `at`, durably (FUA or write +
    /// flush), then report [`Input::LocalDone`].
    MetaWrite {
        /// Echo in `LocalDone`.
        io: IoId,
        /// Which metadata block.
        at: MetaAt,
        /// Its new content (4 KiB).
        data: Bytes,
    },
    /// Read `len` bytes of the data area at `offset` (for a resync), then
    /// report [`Input::ReadDone`].
    Read {
        /// Echo in `ReadDone`.
        io: IoId,
        /// Byte offset.
        offset: u64,
        /// Length.
        len: u64,
    },
    /// Answer a frontend read ([`Input::FrontendRead`]).
    ReadComplete {
        /// Which request.
        req: ReqId,
        /// The data (exactly the length asked for) or `Err(errno)`.
        result: Result<Bytes, i32>,
    },
    /// Grow the local disk's data area to `size` bytes (R29: backing
    /// extended, new area zeroed, new size durable), then call
    /// [`Replica::grown`]. Metadata writes are held back meanwhile.
    Grow {
        /// New data-area size in bytes.
        size: u64,
    },
    /// Something worth logging or counting.
    Event(Event),
}

/// Why a peer was marked Outdated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutdatedReason {
    /// A write was not replicated to it (not connected or not UpToDate).
    MissedWrite,
    /// The connection was lost (or timed out) while this node was Primary.
    ConnectionLost,
    /// It acknowledged a write with an error.
    PeerIoError,
    /// Online verify found its data different (R22) and was asked to mark
    /// the blocks for resync.
    VerifyMismatch,
}

/// A notable state change, for logs and metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The connection state towards a peer changed.
    PeerConnState {
        /// Which peer.
        peer: PeerId,
        /// New state.
        state: ConnState,
    },
    /// The handshake was refused (by us or by the peer).
    HandshakeRefused {
        /// Which peer.
        peer: PeerId,
        /// Why.
        reason: String,
        /// True if this node refused, false if the peer did.
        by_us: bool,
    },
    /// A peer is now held Outdated: it needs a full resync.
    PeerOutdated {
        /// Which peer.
        peer: PeerId,
        /// Why.
        reason: OutdatedReason,
    },
    /// The own disk state changed (e.g. a peer said we missed writes).
    DiskStateChanged {
        /// New state.
        state: DiskState,
    },
    /// The own role changed.
    RoleChanged {
        /// New role.
        role: Role,
    },
    /// A peer's role or disk state as it reported them.
    PeerStateChanged {
        /// Which peer.
        peer: PeerId,
        /// Its role.
        role: Role,
        /// Its own disk state.
        disk: DiskState,
    },
    /// Both nodes are Primary outside dual-primary mode: connection refused.
    SplitRoleRefused {
        /// Which peer.
        peer: PeerId,
    },
    /// No frame from the peer within the peer timeout.
    PeerTimeout {
        /// Which peer.
        peer: PeerId,
    },
    /// Dual-primary: a peer's write overlaps a local write in flight. Both
    /// are applied in the same order everywhere (docs/replication.md, R9).
    ConcurrentWriteConflict {
        /// Which peer.
        peer: PeerId,
        /// Start of the peer's write.
        offset: u64,
        /// Its length.
        len: u64,
    },
    /// The local disk failed (an I/O error) and is detached: the own disk
    /// is Diskless from now on, nothing more is written to or read from it,
    /// and I/O continues through UpToDate peers (R23).
    Detached {
        /// errno of the failure that detached it.
        errno: i32,
    },
    /// A local I/O failed.
    LocalIoError {
        /// errno.
        errno: i32,
    },
    /// A resync with a peer started.
    SyncStarted {
        /// Which peer.
        peer: PeerId,
        /// This node's side.
        role: SyncRole,
        /// Bytes to move (known on the source; 0 on the target).
        bytes: u64,
    },
    /// A resync with a peer finished: both hold the same data.
    SyncFinished {
        /// Which peer.
        peer: PeerId,
        /// This node's side.
        role: SyncRole,
        /// Bytes moved (source), or received (target).
        bytes: u64,
    },
    /// Sync source, checksum-based resync (R26): how the resync that
    /// finished next (the [`Event::SyncFinished`] that follows) compared
    /// the data before sending it.
    SyncChecksums {
        /// Which peer.
        peer: PeerId,
        /// Bytes whose digests were compared with the peer's.
        compared_bytes: u64,
        /// Of those, bytes found identical and not sent.
        identical_bytes: u64,
    },
    /// Both sides wrote while apart: the connection is refused until an
    /// operator resolves it.
    SplitBrain {
        /// Which peer.
        peer: PeerId,
    },
    /// The activity log found at start was not empty (the node stopped
    /// without emptying it, e.g. crashed as Primary): its extents are
    /// marked for resync with every peer.
    ActivityLogRecovered {
        /// Extents.
        extents: usize,
        /// Bytes they cover.
        bytes: u64,
    },
    /// This node started a new generation (its data diverges from a peer's).
    NewGeneration {
        /// The new current generation.
        current: u64,
    },
    /// An online verify with a peer finished or was aborted (R22).
    VerifyFinished {
        /// Which peer.
        peer: PeerId,
        /// Bytes compared.
        compared_bytes: u64,
        /// Bytes found different.
        differing_bytes: u64,
        /// The differing byte ranges `[start, end)`, sorted and merged.
        ranges: Vec<(u64, u64)>,
        /// Bytes that kept being written while checked and were given up.
        skipped_bytes: u64,
        /// The differing blocks were marked for resync.
        marked: bool,
        /// Why it stopped early (`None`: it compared the whole volume).
        aborted: Option<String>,
    },
    /// A growth (R29) finished on this node.
    GrowFinished {
        /// The size before.
        from: u64,
        /// The size asked for.
        size: u64,
        /// This node coordinated it (answer the operator).
        coordinator: bool,
        /// `Err`: the local disk could not grow (the size stays `from`).
        result: Result<(), String>,
        /// Coordinator: peers lost before they answered (name, why): they
        /// connect again only once they have the same size.
        failed: Vec<(String, String)>,
    },
    /// The peer broke the protocol (e.g. data frames from a non-Primary).
    ProtocolViolation {
        /// Which peer.
        peer: PeerId,
        /// What it did.
        what: &'static str,
    },
}
