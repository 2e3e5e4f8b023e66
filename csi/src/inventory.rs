//! The controller's view of the storage nodes: a TOML file listing each
//! node, its topology labels and the bytes it offers for replicas.
//!
//! ```toml
//! [[node]]
//! name = "node-a1"                  # the node plugin's --node-id
//! capacity_bytes = 107374182400
//! topology = { "topology.kubernetes.io/zone" = "room-a" }
//! ```
//!
//! Free space is the capacity minus the sizes of the replicas the volume
//! records place on the node (records in every state count, so a volume
//! still `Creating` keeps its space).

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

use crate::placement::Node;
use crate::store::VolumeRecord;

/// Whether `name` can be a node id: 1 to 253 characters of `a-z A-Z 0-9 - _ .`.
pub fn valid_node_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

/// One storage node.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSpec {
    /// Node id (as the node plugin reports it).
    pub name: String,
    /// Bytes available for replicas on this node.
    pub capacity_bytes: u64,
    /// Topology labels.
    #[serde(default)]
    pub topology: BTreeMap<String, String>,
    /// The IP address the node's replicas listen on for their peers. A
    /// volume is replicated by the node agents only when every node it is
    /// placed on has one; each replica gets a port of the controller's
    /// `--replication-ports` range.
    #[serde(default)]
    pub address: Option<std::net::IpAddr>,
}

/// Every storage node.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Inventory {
    /// The nodes.
    #[serde(default, rename = "node")]
    pub nodes: Vec<NodeSpec>,
}

impl Inventory {
    /// Parses and validates an inventory; errors name the source and the field.
    pub fn parse(source: &str, text: &str) -> anyhow::Result<Inventory> {
        let inv: Inventory = toml::from_str(text).map_err(|e| anyhow::anyhow!("{source}: {e}"))?;
        let mut seen = std::collections::BTreeSet::new();
        for (i, n) in inv.nodes.iter().enumerate() {
            if !valid_node_name(&n.name) {
                anyhow::bail!(
                    "{source}: node[{i}].name: {:?} is not a node name (1 to 253 of a-z A-Z 0-9 - _ .)",
                    n.name
                );
            }
            if !seen.insert(n.name.as_str()) {
                anyhow::bail!("{source}: node[{i}].name: {:?} is listed twice", n.name);
            }
            if n.capacity_bytes > i64::MAX as u64 {
                anyhow::bail!("{source}: node[{i}].capacity_bytes: too large");
            }
        }
        Ok(inv)
    }

    /// Reads and validates an inventory file.
    pub fn load(path: &Path) -> anyhow::Result<Inventory> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        Self::parse(&path.display().to_string(), &text)
    }

    /// The node named `name`.
    pub fn node(&self, name: &str) -> Option<&NodeSpec> {
        self.nodes.iter().find(|n| n.name == name)
    }

    /// Placement candidates with their free space after `records`.
    pub fn candidates(&self, records: &[VolumeRecord]) -> Vec<Node> {
        self.nodes
            .iter()
            .map(|n| {
                let used: u64 = records
                    .iter()
                    .filter(|r| r.replicas.iter().any(|rep| rep.node == n.name))
                    .map(|r| r.size)
                    .sum();
                Node {
                    name: n.name.clone(),
                    labels: n.topology.clone(),
                    free_bytes: n.capacity_bytes.saturating_sub(used),
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_refuses_duplicates_and_unknown_fields() {
        let inv = Inventory::parse(
            "inv.toml",
            r#"
[[node]]
name = "a1"
capacity_bytes = 100
topology = { "topology.kubernetes.io/zone" = "a" }
[[node]]
name = "b1"
capacity_bytes = 50
"#,
        )
        .unwrap();
        assert_eq!(inv.nodes.len(), 2);
        let e = Inventory::parse(
            "inv.toml",
            "[[node]]\nname='a'\ncapacity_bytes=1\n[[node]]\nname='a'\ncapacity_bytes=1\n",
        )
        .unwrap_err();
        assert!(e.to_string().contains("node[1].name"), "{e}");
        let e = Inventory::parse("inv.toml", "[[node]]\nname='a'\ncapacity=1\n").unwrap_err();
        assert!(
            e.to_string().contains("inv.toml") && e.to_string().contains("capacity"),
            "{e}"
        );
    }
}
