//! StorageClass parameters, volume capabilities and capacity ranges: the
//! validation of everything a CreateVolume request carries besides its name.

use std::collections::HashMap;

use bpfman_csi::v1::volume_capability::{access_mode::Mode, AccessType as PbAccessType};
use bpfman_csi::v1::{CapacityRange, VolumeCapability};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Default topology key replicas must differ on.
pub const DEFAULT_TOPOLOGY_KEY: &str = "topology.kubernetes.io/zone";
/// Default replica count.
pub const DEFAULT_REPLICAS: u32 = 2;
/// Most replicas a volume may have (tandemd allows up to 3 peers).
pub const MAX_REPLICAS: u32 = 4;
/// Size of a volume created without a capacity range (1 GiB).
pub const DEFAULT_SIZE: u64 = 1 << 30;
/// Volume sizes are multiples of this (1 MiB).
pub const SIZE_ALIGN: u64 = 1 << 20;

/// StorageClass parameter: replica count (`1`..`4`, default 2).
pub const P_REPLICAS: &str = "replicas";
/// StorageClass parameter: topology key replicas must differ on.
pub const P_TOPOLOGY_KEY: &str = "topologyKey";
/// StorageClass parameter: replication protocol, `C` (default) or `A`.
pub const P_PROTOCOL: &str = "protocol";
/// StorageClass parameter: a disk-less witness for quorum, `true`/`false` (default false).
pub const P_WITNESS: &str = "witness";

/// Replication protocol (DRBD's letters).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Protocol {
    /// Synchronous: acknowledged when durable on every UpToDate replica.
    C,
    /// Asynchronous: acknowledged when local and queued for the peer.
    A,
}

impl Protocol {
    /// `"C"` or `"A"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::C => "C",
            Protocol::A => "A",
        }
    }
}

/// A volume's parameters, from its StorageClass.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeParams {
    /// Number of replicas, each in a distinct `topology_key` value.
    pub replicas: u32,
    /// Topology key replicas must differ on.
    pub topology_key: String,
    /// Replication protocol.
    pub protocol: Protocol,
    /// Whether a disk-less witness (quorum vote) is placed in a third zone.
    pub witness: bool,
}

impl Default for VolumeParams {
    fn default() -> Self {
        VolumeParams {
            replicas: DEFAULT_REPLICAS,
            topology_key: DEFAULT_TOPOLOGY_KEY.to_string(),
            protocol: Protocol::C,
            witness: false,
        }
    }
}

impl VolumeParams {
    /// Parses StorageClass parameters. Keys under `csi.storage.k8s.io/`
    /// (added by the external-provisioner) are ignored; any other unknown key
    /// or a malformed value is `INVALID_ARGUMENT` naming the key.
    pub fn parse(params: &HashMap<String, String>) -> Result<VolumeParams> {
        let mut p = VolumeParams::default();
        let mut keys: Vec<&String> = params.keys().collect();
        keys.sort();
        for key in keys {
            let value = params[key].trim();
            let bad =
                |why: &str| Error::InvalidArgument(format!("parameter {key}={value:?}: {why}"));
            match key.as_str() {
                P_REPLICAS => {
                    p.replicas = value
                        .parse()
                        .ok()
                        .filter(|n| (1..=MAX_REPLICAS).contains(n))
                        .ok_or_else(|| bad(&format!("expected 1 to {MAX_REPLICAS}")))?;
                }
                P_TOPOLOGY_KEY => {
                    if value.is_empty() || value.contains(char::is_whitespace) {
                        return Err(bad("expected a topology label key"));
                    }
                    p.topology_key = value.to_string();
                }
                P_PROTOCOL => {
                    p.protocol = match value {
                        "C" | "c" => Protocol::C,
                        "A" | "a" => Protocol::A,
                        _ => return Err(bad("expected C or A")),
                    }
                }
                P_WITNESS => {
                    p.witness = match value {
                        "true" | "on" | "yes" => true,
                        "false" | "off" | "no" => false,
                        _ => return Err(bad("expected true or false")),
                    }
                }
                k if k.starts_with("csi.storage.k8s.io/") => {}
                _ => {
                    return Err(Error::InvalidArgument(format!(
                        "unknown parameter {key:?} (known: {P_REPLICAS}, {P_TOPOLOGY_KEY}, \
                         {P_PROTOCOL}, {P_WITNESS})"
                    )))
                }
            }
        }
        Ok(p)
    }
}

/// How a volume is accessed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Access {
    /// A raw block device.
    Block,
    /// A filesystem of this type (`ext4` or `xfs`) with these mount flags.
    Mount {
        /// Filesystem type.
        fs_type: String,
        /// Extra mount options.
        flags: Vec<String>,
    },
}

/// A validated volume capability.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capability {
    /// Block or filesystem.
    pub access: Access,
    /// Several nodes may write at once (MULTI_NODE_MULTI_WRITER, block only).
    pub multi_node: bool,
    /// Only reads (SINGLE_NODE_READER_ONLY).
    pub read_only: bool,
}

/// Filesystems the node plugin can create and mount.
pub const FS_TYPES: &[&str] = &["ext4", "xfs"];

impl Capability {
    /// Validates one capability. Supported: SINGLE_NODE_WRITER (and the
    /// single-node single/multi-writer variants) and SINGLE_NODE_READER_ONLY
    /// for block and filesystem; MULTI_NODE_MULTI_WRITER for block only
    /// (dual-primary during live migration). Anything else is
    /// `INVALID_ARGUMENT` saying why.
    pub fn parse(cap: &VolumeCapability) -> Result<Capability> {
        let mode = cap
            .access_mode
            .as_ref()
            .ok_or_else(|| {
                Error::InvalidArgument("volume capability: access_mode is required".into())
            })?
            .mode;
        let mode = Mode::try_from(mode).map_err(|_| {
            Error::InvalidArgument(format!("volume capability: unknown access mode {mode}"))
        })?;
        let access = match &cap.access_type {
            Some(PbAccessType::Block(_)) => Access::Block,
            Some(PbAccessType::Mount(m)) => {
                let fs_type = if m.fs_type.is_empty() {
                    "ext4"
                } else {
                    m.fs_type.as_str()
                };
                if !FS_TYPES.contains(&fs_type) {
                    return Err(Error::InvalidArgument(format!(
                        "volume capability: filesystem {fs_type:?} is not supported (use ext4 or xfs)"
                    )));
                }
                Access::Mount {
                    fs_type: fs_type.to_string(),
                    flags: m.mount_flags.clone(),
                }
            }
            None => {
                return Err(Error::InvalidArgument(
                    "volume capability: access_type (block or mount) is required".into(),
                ))
            }
        };
        let (multi_node, read_only) = match mode {
            Mode::SingleNodeWriter | Mode::SingleNodeSingleWriter | Mode::SingleNodeMultiWriter => {
                (false, false)
            }
            Mode::SingleNodeReaderOnly => (false, true),
            Mode::MultiNodeMultiWriter => {
                if access != Access::Block {
                    return Err(Error::InvalidArgument(
                        "volume capability: MULTI_NODE_MULTI_WRITER is supported only for block \
                         volumes (a filesystem cannot be mounted on two nodes at once)"
                            .into(),
                    ));
                }
                (true, false)
            }
            Mode::MultiNodeReaderOnly | Mode::MultiNodeSingleWriter | Mode::Unknown => {
                return Err(Error::InvalidArgument(format!(
                    "volume capability: access mode {} is not supported (supported: \
                     SINGLE_NODE_WRITER, SINGLE_NODE_READER_ONLY, MULTI_NODE_MULTI_WRITER for block)",
                    mode.as_str_name()
                )))
            }
        };
        Ok(Capability {
            access,
            multi_node,
            read_only,
        })
    }

    /// Validates a non-empty list of capabilities.
    pub fn parse_all(caps: &[VolumeCapability]) -> Result<Vec<Capability>> {
        if caps.is_empty() {
            return Err(Error::InvalidArgument(
                "volume_capabilities is required".into(),
            ));
        }
        caps.iter().map(Capability::parse).collect()
    }
}

/// The size to create for a capacity range: the required bytes (default
/// 1 GiB) rounded up to 1 MiB, or the limit rounded down to 1 MiB when that
/// overshoots it. `INVALID_ARGUMENT` for negative or inverted ranges,
/// `OUT_OF_RANGE` when no multiple of 1 MiB lies in the range.
pub fn size_for(range: Option<&CapacityRange>) -> Result<u64> {
    let (required, limit) = match range {
        Some(r) => (r.required_bytes, r.limit_bytes),
        None => (0, 0),
    };
    if required < 0 || limit < 0 {
        return Err(Error::InvalidArgument(format!(
            "capacity_range: negative bytes (required {required}, limit {limit})"
        )));
    }
    let (required, limit) = (required as u64, limit as u64);
    if limit != 0 && required > limit {
        return Err(Error::InvalidArgument(format!(
            "capacity_range: required_bytes {required} exceeds limit_bytes {limit}"
        )));
    }
    let want = if required == 0 {
        if limit != 0 {
            limit.min(DEFAULT_SIZE)
        } else {
            DEFAULT_SIZE
        }
    } else {
        required
    };
    let mut size = want.div_ceil(SIZE_ALIGN).saturating_mul(SIZE_ALIGN);
    if limit != 0 && size > limit {
        size = limit / SIZE_ALIGN * SIZE_ALIGN;
    }
    if size == 0 || size < required || size > i64::MAX as u64 {
        return Err(Error::OutOfRange(format!(
            "capacity_range: no multiple of 1 MiB between required {required} and limit {limit} bytes"
        )));
    }
    Ok(size)
}

/// Whether an existing size satisfies a capacity range.
pub fn size_fits(size: u64, range: Option<&CapacityRange>) -> bool {
    match range {
        None => true,
        Some(r) => {
            size >= r.required_bytes.max(0) as u64
                && (r.limit_bytes <= 0 || size <= r.limit_bytes as u64)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bpfman_csi::v1::volume_capability::{AccessMode, BlockVolume, MountVolume};

    fn params(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn cap(mode: Mode, block: bool, fs: &str) -> VolumeCapability {
        VolumeCapability {
            access_mode: Some(AccessMode { mode: mode as i32 }),
            access_type: Some(if block {
                PbAccessType::Block(BlockVolume {})
            } else {
                PbAccessType::Mount(MountVolume {
                    fs_type: fs.into(),
                    ..Default::default()
                })
            }),
        }
    }

    #[test]
    fn parameters_parse_with_defaults_and_name_bad_keys() {
        assert_eq!(
            VolumeParams::parse(&params(&[])).unwrap(),
            VolumeParams::default()
        );
        let p = VolumeParams::parse(&params(&[
            ("replicas", "3"),
            ("topologyKey", "rack"),
            ("protocol", "A"),
            ("witness", "true"),
            ("csi.storage.k8s.io/pvc/name", "x"),
        ]))
        .unwrap();
        assert_eq!(
            (p.replicas, p.topology_key.as_str(), p.protocol, p.witness),
            (3, "rack", Protocol::A, true)
        );
        for (k, v, needle) in [
            ("replicas", "0", "replicas"),
            ("replicas", "x", "replicas"),
            ("protocol", "B", "protocol"),
            ("witness", "maybe", "witness"),
            ("colour", "red", "colour"),
        ] {
            let e = VolumeParams::parse(&params(&[(k, v)])).unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument);
            assert!(e.to_string().contains(needle), "{e}");
        }
    }

    #[test]
    fn capabilities() {
        assert!(Capability::parse(&cap(Mode::SingleNodeWriter, true, "")).is_ok());
        assert!(Capability::parse(&cap(Mode::SingleNodeWriter, false, "")).is_ok());
        assert!(Capability::parse(&cap(Mode::SingleNodeWriter, false, "xfs")).is_ok());
        assert!(
            Capability::parse(&cap(Mode::MultiNodeMultiWriter, true, ""))
                .unwrap()
                .multi_node
        );
        let e = Capability::parse(&cap(Mode::MultiNodeMultiWriter, false, "ext4")).unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(Capability::parse(&cap(Mode::SingleNodeWriter, false, "ntfs")).is_err());
        assert!(Capability::parse(&cap(Mode::MultiNodeReaderOnly, true, "")).is_err());
        assert!(Capability::parse(&VolumeCapability::default()).is_err());
        assert!(Capability::parse_all(&[]).is_err());
    }

    #[test]
    fn sizes() {
        let r = |req, lim| {
            Some(CapacityRange {
                required_bytes: req,
                limit_bytes: lim,
            })
        };
        assert_eq!(size_for(None).unwrap(), DEFAULT_SIZE);
        assert_eq!(size_for(r(1, 0).as_ref()).unwrap(), SIZE_ALIGN);
        assert_eq!(size_for(r(0, 5 << 20).as_ref()).unwrap(), 5 << 20);
        assert_eq!(size_for(r(3 << 20, 0).as_ref()).unwrap(), 3 << 20);
        assert_eq!(size_for(r(1, (2 << 20) + 7).as_ref()).unwrap(), SIZE_ALIGN);
        assert_eq!(
            size_for(r(-1, 0).as_ref()).unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
        assert_eq!(
            size_for(r(10, 5).as_ref()).unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
        assert_eq!(
            size_for(r(5, 100).as_ref()).unwrap_err().code(),
            tonic::Code::OutOfRange
        );
        assert!(size_fits(4 << 20, r(1, 0).as_ref()));
        assert!(!size_fits(4 << 20, r(5 << 20, 0).as_ref()));
        assert!(!size_fits(4 << 20, r(0, 1 << 20).as_ref()));
    }
}

#[cfg(test)]
mod proptests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Any parameter map parses or is INVALID_ARGUMENT naming a key; never a panic.
        #[test]
        fn parameters_never_panic(
            map in proptest::collection::hash_map(
                prop_oneof![
                    Just("replicas".to_string()), Just("protocol".to_string()),
                    Just("witness".to_string()), Just("topologyKey".to_string()), ".{0,12}"
                ],
                ".{0,12}",
                0..5,
            )
        ) {
            match VolumeParams::parse(&map) {
                Ok(p) => prop_assert!((1..=MAX_REPLICAS).contains(&p.replicas)),
                Err(e) => {
                    prop_assert_eq!(e.code(), tonic::Code::InvalidArgument);
                    let msg = e.to_string();
                    prop_assert!(
                        map.keys().any(|k| msg.contains(k.as_str()) || msg.contains(&format!("{k:?}"))),
                        "{}", msg
                    );
                }
            }
        }

        /// Any capacity range gives a 1 MiB multiple inside it, or an error; never a panic.
        #[test]
        fn sizes_lie_in_the_range(required in any::<i64>(), limit in any::<i64>()) {
            let r = CapacityRange { required_bytes: required, limit_bytes: limit };
            if let Ok(size) = size_for(Some(&r)) {
                prop_assert_eq!(size % SIZE_ALIGN, 0);
                prop_assert!(size_fits(size, Some(&r)), "{} outside {:?}", size, r);
            }
        }
    }
}
