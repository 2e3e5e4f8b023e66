//! Tandem's CSI driver. For now this crate holds only the placement rule the
//! controller will use: a pure function that picks nodes for a volume's
//! replicas so that no two share a failure domain (zone). The gRPC services
//! arrive with the CSI issue.

/// A candidate node for a replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    /// Node name.
    pub name: String,
    /// Value of the topology key replicas must differ on (e.g. the zone).
    pub zone: String,
    /// Free capacity in bytes.
    pub free_bytes: u64,
}

/// Picks `replicas` nodes in distinct zones, each with at least `size` bytes
/// free, preferring the nodes with the most free space. Returns `None` when no
/// such choice exists.
pub fn place(nodes: &[Node], replicas: usize, size: u64) -> Option<Vec<&Node>> {
    let mut fitting: Vec<&Node> = nodes.iter().filter(|n| n.free_bytes >= size).collect();
    fitting.sort_by(|a, b| b.free_bytes.cmp(&a.free_bytes).then(a.name.cmp(&b.name)));
    let mut chosen: Vec<&Node> = Vec::with_capacity(replicas);
    for n in fitting {
        if chosen.len() == replicas {
            break;
        }
        if chosen.iter().all(|c| c.zone != n.zone) {
            chosen.push(n);
        }
    }
    (chosen.len() == replicas).then_some(chosen)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(name: &str, zone: &str, free: u64) -> Node {
        Node {
            name: name.into(),
            zone: zone.into(),
            free_bytes: free,
        }
    }

    #[test]
    fn replicas_land_in_distinct_zones() {
        let nodes = [n("a1", "a", 10), n("a2", "a", 20), n("b1", "b", 5)];
        let p = place(&nodes, 2, 5).unwrap();
        assert_eq!(
            p.iter().map(|x| x.name.as_str()).collect::<Vec<_>>(),
            ["a2", "b1"]
        );
        assert!(place(&nodes, 2, 6).is_none());
        assert!(place(&nodes, 3, 1).is_none());
    }
}
