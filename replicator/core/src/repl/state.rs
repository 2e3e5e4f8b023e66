//! Roles, disk states and connection states, mirroring DRBD's names.

/// A node's role for the volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// Serves frontend I/O and replicates it to peers.
    Primary,
    /// Applies the primary's writes; refuses frontend writes.
    Secondary,
}

/// State of a replica's data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DiskState {
    /// No local disk attached.
    Diskless,
    /// The data is not usable (e.g. a sync target in the middle of a sync).
    Inconsistent,
    /// Consistent but missed writes: needs a resync before it may serve.
    Outdated,
    /// Has every acknowledged write.
    UpToDate,
}

/// Replication protocol: when a write is reported complete.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Protocol {
    /// Asynchronous: complete once the local write is done and the frames are
    /// queued for the peers. The last writes may be lost with the primary.
    A,
    /// Synchronous (default): complete once the local write is done and every
    /// UpToDate connected peer acknowledged it.
    #[default]
    C,
}

/// State of the connection to one peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ConnState {
    /// No transport (never connected, lost, refused or timed out).
    StandAlone,
    /// Transport up, handshake in progress.
    Connecting,
    /// Handshake done.
    Connected,
}

/// Replication state towards one peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReplState {
    /// Writes are not replicated to this peer.
    Off,
    /// Connected and UpToDate: every write is replicated to this peer.
    Established,
    /// Resync running, this node is the source (writes are replicated too).
    SyncSource,
    /// Resync running, this node is the target.
    SyncTarget,
}

impl Role {
    /// Wire code.
    pub fn code(self) -> u8 {
        match self {
            Role::Primary => 1,
            Role::Secondary => 2,
        }
    }

    /// Role for a wire code, if known.
    pub fn from_code(c: u8) -> Option<Role> {
        match c {
            1 => Some(Role::Primary),
            2 => Some(Role::Secondary),
            _ => None,
        }
    }
}

impl DiskState {
    /// Wire code.
    pub fn code(self) -> u8 {
        match self {
            DiskState::Diskless => 0,
            DiskState::Inconsistent => 1,
            DiskState::Outdated => 2,
            DiskState::UpToDate => 3,
        }
    }

    /// Disk state for a wire code, if known.
    pub fn from_code(c: u8) -> Option<DiskState> {
        match c {
            0 => Some(DiskState::Diskless),
            1 => Some(DiskState::Inconsistent),
            2 => Some(DiskState::Outdated),
            3 => Some(DiskState::UpToDate),
            _ => None,
        }
    }
}
