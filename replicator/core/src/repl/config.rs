//! Replica configuration, validated once by [`Config::validate`].

use std::time::Duration;

use super::frame::{SplitBrainPolicy, MAX_NODE_NAME, PROTOCOL_VERSION};
use super::state::{DiskState, Protocol, Role};

/// Default interval between keepalive pings: 1 s.
pub const DEFAULT_KEEPALIVE: Duration = Duration::from_secs(1);
/// Default time without any frame after which a peer is declared lost: 5 s.
pub const DEFAULT_PEER_TIMEOUT: Duration = Duration::from_secs(5);
/// Most peers a volume may have (4 replicas in all).
pub const MAX_PEERS: usize = 3;

/// Configuration of one replica of one volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// This node's name (1 to 64 bytes); compared with the name the peers
    /// expect, and the tie-breaker in dual-primary conflicts.
    pub node_name: String,
    /// Volume UUID, identical on every replica.
    pub volume_uuid: [u8; 16],
    /// Volume size in bytes (a non-zero multiple of `block_size`).
    pub size: u64,
    /// Logical block size: a power of two from 512 to 65536.
    pub block_size: u32,
    /// Replication protocol (default [`Protocol::C`]).
    pub protocol: Protocol,
    /// Names of the peers (1 to [`MAX_PEERS`]); [`super::PeerId`] `n` is
    /// `peers[n]`.
    pub peers: Vec<String>,
    /// Role at start (default Secondary).
    pub initial_role: Role,
    /// Own disk state at start (default UpToDate: a new volume whose replicas
    /// are all zero, or what the metadata says). Later issues read it from
    /// the metadata area.
    pub initial_disk: DiskState,
    /// Dual-primary mode for live migration (default off; needs protocol C).
    pub allow_two_primaries: bool,
    /// Interval between pings on an idle connection (default 1 s).
    pub keepalive_interval: Duration,
    /// A peer that sent nothing for this long is lost (default 5 s; must be
    /// longer than the keepalive interval).
    pub peer_timeout: Duration,
    /// Replication protocol version sent in Hello (default
    /// [`PROTOCOL_VERSION`]; only tests change it).
    pub protocol_version: u32,
    /// Bytes of data per dirty-bitmap bit (default 4 KiB; a power of two
    /// from the block size to 1 MiB). Fixed when the volume is created.
    pub bitmap_chunk: u32,
    /// Granularity at which a Primary remembers the writes a peer has not
    /// flushed yet (default 4 MiB; a power of two, at least `bitmap_chunk`).
    /// If the peer restarts, those extents are resynced.
    pub extent_size: u64,
    /// Seed for new generation ids and the instance id; the driver passes
    /// fresh randomness on every start (the core reads no entropy itself).
    pub gen_seed: u64,
    /// Extents (`extent_size` each) the activity log keeps hot (default
    /// 256, i.e. 1 GiB; at most `meta::AL_MAX_EXTENTS`). After a Primary
    /// crash these extents are resynced.
    pub al_extents: usize,
    /// Most bytes per second a resync sends to one peer (0: no fixed
    /// limit, the default).
    pub resync_rate: u64,
    /// Adaptive resync (default on): while frontend requests are in
    /// flight, at most 2 resync reads or frames are in flight per peer
    /// (16 otherwise), so the resync yields to application I/O.
    pub resync_adaptive: bool,
    /// What a handshake that finds a split brain does (default
    /// [`SplitBrainPolicy::Disconnect`]; R24).
    pub after_split_brain: SplitBrainPolicy,
    /// A Primary completes a write that some peer did not get only after
    /// the driver granted it the right to write alone
    /// ([`super::Replica::grant_solo`]): set with a witness (the witness
    /// grants) or to freeze on peer loss (R25). Default off: a Primary
    /// continues alone at once.
    pub solo_needs_grant: bool,
    /// Checksum-based resync (R26, default off): as sync source, compare
    /// each marked run with the target's data by digest first
    /// ([`super::Frame::ResyncDigestRequest`]) and send only the blocks
    /// that differ. Costs a read on the target and a round trip per run;
    /// pays off on slow links and when most marked data is in fact
    /// identical (activity-log recovery after a Primary crash). Only the
    /// source's setting matters; every node answers digest requests.
    pub resync_checksums: bool,
    /// This node is a diskless client (R28): it holds no data and no
    /// metadata, starts Diskless, never takes part in a resync, and as
    /// Primary completes a write only once every peer acknowledged it.
    /// Every peer must be a replica (`diskless_peers` empty).
    pub diskless: bool,
    /// Peers that are diskless clients (R28): never marked as missing
    /// writes (they hold no data), and they do not count when a Primary
    /// asks whether every peer receives its writes (R25).
    pub diskless_peers: Vec<String>,
}

/// Default activity-log size: 256 extents.
pub const DEFAULT_AL_EXTENTS: usize = 256;

/// Default bytes per bitmap bit: 4 KiB.
pub const DEFAULT_BITMAP_CHUNK: u32 = crate::meta::DEFAULT_CHUNK;
/// Default extent for unflushed-write tracking: 4 MiB.
pub const DEFAULT_EXTENT: u64 = 4 << 20;

/// A configuration field holds an impossible value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("replication config field {field} invalid: {why}")]
pub struct ConfigError {
    /// Field name.
    pub field: &'static str,
    /// What is wrong.
    pub why: String,
}

impl Config {
    /// A configuration with every default: protocol C, Secondary, UpToDate,
    /// no dual-primary, keepalive 1 s, peer timeout 5 s.
    pub fn new(
        node_name: impl Into<String>,
        volume_uuid: [u8; 16],
        size: u64,
        block_size: u32,
        peers: Vec<String>,
    ) -> Config {
        Config {
            node_name: node_name.into(),
            volume_uuid,
            size,
            block_size,
            protocol: Protocol::C,
            peers,
            initial_role: Role::Secondary,
            initial_disk: DiskState::UpToDate,
            allow_two_primaries: false,
            keepalive_interval: DEFAULT_KEEPALIVE,
            peer_timeout: DEFAULT_PEER_TIMEOUT,
            protocol_version: PROTOCOL_VERSION,
            bitmap_chunk: DEFAULT_BITMAP_CHUNK.max(block_size),
            extent_size: DEFAULT_EXTENT,
            gen_seed: 0,
            al_extents: DEFAULT_AL_EXTENTS,
            resync_rate: 0,
            resync_adaptive: true,
            after_split_brain: SplitBrainPolicy::Disconnect,
            solo_needs_grant: false,
            resync_checksums: false,
            diskless: false,
            diskless_peers: Vec::new(),
        }
    }

    /// Checks every field; the error names the first bad one.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let err = |field, why: &str| {
            Err(ConfigError {
                field,
                why: why.to_owned(),
            })
        };
        let name_ok = |n: &str| !n.is_empty() && n.len() <= MAX_NODE_NAME;
        if !name_ok(&self.node_name) {
            return err("node_name", "must be 1 to 64 bytes");
        }
        if !(self.block_size.is_power_of_two() && (512..=65536).contains(&self.block_size)) {
            return err("block_size", "must be a power of two from 512 to 65536");
        }
        if self.size == 0 || self.size % u64::from(self.block_size) != 0 {
            return err("size", "must be a non-zero multiple of block_size");
        }
        if self.peers.is_empty() || self.peers.len() > MAX_PEERS {
            return err("peers", "must name 1 to 3 peers");
        }
        for (i, p) in self.peers.iter().enumerate() {
            if !name_ok(p) {
                return err("peers", "each name must be 1 to 64 bytes");
            }
            if *p == self.node_name {
                return err("peers", "a peer has this node's own name");
            }
            if self.peers[..i].contains(p) {
                return err("peers", "duplicate peer name");
            }
        }
        if let Some(d) = self.diskless_peers.iter().find(|d| !self.peers.contains(d)) {
            return Err(ConfigError {
                field: "diskless_peers",
                why: format!("{d:?} is not one of the peers"),
            });
        }
        if self.diskless && !self.diskless_peers.is_empty() {
            return err(
                "diskless_peers",
                "a diskless client's peers must all be replicas",
            );
        }
        if self.diskless && self.initial_role == Role::Primary {
            return err(
                "initial_role",
                "a diskless client starts Secondary (promote it once a peer is UpToDate)",
            );
        }
        if self.allow_two_primaries && self.protocol != Protocol::C {
            return err("allow_two_primaries", "dual-primary needs protocol C");
        }
        if self.initial_role == Role::Primary && self.initial_disk != DiskState::UpToDate {
            return err("initial_role", "only an UpToDate disk may start Primary");
        }
        if !self.bitmap_chunk.is_power_of_two()
            || self.bitmap_chunk < self.block_size
            || self.bitmap_chunk > crate::meta::MAX_CHUNK
        {
            return err(
                "bitmap_chunk",
                "must be a power of two from the block size to 1 MiB",
            );
        }
        if !self.extent_size.is_power_of_two()
            || self.extent_size < u64::from(self.bitmap_chunk)
            || self.extent_size > 1 << 30
        {
            return err(
                "extent_size",
                "must be a power of two from bitmap_chunk to 1 GiB",
            );
        }
        if self.al_extents == 0 || self.al_extents > crate::meta::AL_MAX_EXTENTS {
            return err("al_extents", "must be 1 to 508");
        }
        if self.keepalive_interval.is_zero() {
            return err("keepalive_interval", "must be positive");
        }
        if self.peer_timeout <= self.keepalive_interval {
            return err("peer_timeout", "must be longer than keepalive_interval");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok() -> Config {
        Config::new("a", [1; 16], 1 << 20, 512, vec!["b".into()])
    }

    #[test]
    fn defaults_are_documented_values() {
        let c = ok();
        assert_eq!(c.protocol, Protocol::C);
        assert_eq!(c.keepalive_interval, Duration::from_secs(1));
        assert_eq!(c.peer_timeout, Duration::from_secs(5));
        assert!(!c.allow_two_primaries);
        assert_eq!(c.validate(), Ok(()));
    }

    #[test]
    fn errors_name_the_field() {
        type Tweak = Box<dyn Fn(&mut Config)>;
        let cases: Vec<(&str, Tweak)> = vec![
            ("node_name", Box::new(|c| c.node_name.clear())),
            ("block_size", Box::new(|c| c.block_size = 1000)),
            ("size", Box::new(|c| c.size = 1000)),
            ("peers", Box::new(|c| c.peers.clear())),
            ("peers", Box::new(|c| c.peers = vec!["a".into()])),
            (
                "peers",
                Box::new(|c| c.peers = vec!["b".into(), "b".into()]),
            ),
            (
                "peers",
                Box::new(|c| c.peers = ["b", "c", "d", "e"].map(String::from).to_vec()),
            ),
            (
                "allow_two_primaries",
                Box::new(|c| {
                    c.allow_two_primaries = true;
                    c.protocol = Protocol::A
                }),
            ),
            (
                "initial_role",
                Box::new(|c| {
                    c.initial_role = Role::Primary;
                    c.initial_disk = DiskState::Outdated
                }),
            ),
            (
                "diskless_peers",
                Box::new(|c| c.diskless_peers = vec!["x".into()]),
            ),
            (
                "initial_role",
                Box::new(|c| {
                    c.diskless = true;
                    c.initial_role = Role::Primary
                }),
            ),
            (
                "peer_timeout",
                Box::new(|c| c.peer_timeout = Duration::from_millis(500)),
            ),
        ];
        for (field, f) in cases {
            let mut c = ok();
            f(&mut c);
            assert_eq!(c.validate().unwrap_err().field, field);
        }
    }
}
