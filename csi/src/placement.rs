//! Replica placement: a pure function from the cluster's nodes and one
//! volume's request to the nodes that hold its replicas.
//!
//! Rules, in order:
//! 1. A node is *eligible* when it has at least `size` bytes free, carries a
//!    value for the spread key (the topology key replicas must differ on,
//!    e.g. `topology.kubernetes.io/zone`), and — when the request has
//!    requisite topologies — matches at least one of them. A node matches a
//!    segment when every key of the segment has the same value among the
//!    node's segments (its labels plus [`NODE_TOPOLOGY_KEY`] = its name).
//! 2. Eligible nodes are ranked by the first preferred segment they match
//!    (earlier is better; matching none ranks last), then by free space
//!    (more is better), then by name.
//! 3. Replicas are taken in rank order, skipping any node whose spread-key
//!    value is already used. This finds a placement whenever one exists:
//!    one exists exactly when the eligible nodes span at least `replicas`
//!    distinct spread-key values.
//!
//! Every replica must match the requisite topologies (not only the first):
//! a StorageClass's `allowedTopologies` keeps all of a volume's data inside
//! the allowed zones.

use std::collections::{BTreeMap, BTreeSet};

/// The topology key every Tandem node reports with its own name, so a
/// volume can be pinned to the nodes that hold its replicas.
pub const NODE_TOPOLOGY_KEY: &str = "topology.tandem.io/node";

/// A topology segment: key → value (CSI `Topology.segments`).
pub type Segment = BTreeMap<String, String>;

/// A candidate node for a replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    /// Node name (the CSI node id).
    pub name: String,
    /// Topology labels, e.g. `topology.kubernetes.io/zone = a`.
    pub labels: BTreeMap<String, String>,
    /// Free capacity in bytes.
    pub free_bytes: u64,
}

impl Node {
    /// The value of topology key `key` for this node ([`NODE_TOPOLOGY_KEY`]
    /// is the node name).
    pub fn segment_value(&self, key: &str) -> Option<&str> {
        if key == NODE_TOPOLOGY_KEY {
            Some(&self.name)
        } else {
            self.labels.get(key).map(String::as_str)
        }
    }

    /// Whether every key of `segment` has the same value on this node.
    pub fn matches(&self, segment: &Segment) -> bool {
        segment
            .iter()
            .all(|(k, v)| self.segment_value(k) == Some(v.as_str()))
    }

    /// The segment this node reports: its labels plus its name under
    /// [`NODE_TOPOLOGY_KEY`].
    pub fn segment(&self) -> Segment {
        let mut s = self.labels.clone();
        s.insert(NODE_TOPOLOGY_KEY.to_string(), self.name.clone());
        s
    }
}

/// What one volume needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request<'a> {
    /// Number of replicas (each on its own node, in distinct spread-key values).
    pub replicas: usize,
    /// Bytes each replica needs.
    pub size: u64,
    /// Topology key replicas must differ on.
    pub spread_key: &'a str,
    /// Every replica must match one of these (none: no constraint).
    pub requisite: &'a [Segment],
    /// Ranked preferences: nodes matching an earlier segment come first.
    pub preferred: &'a [Segment],
}

/// Picks the nodes for a volume's replicas following the module's rules, in
/// rank order (the first is the best-ranked, e.g. the node the scheduler
/// selected). Returns `None` when no placement exists.
pub fn place<'n>(nodes: &'n [Node], req: &Request<'_>) -> Option<Vec<&'n Node>> {
    let mut eligible: Vec<(usize, &Node)> = nodes
        .iter()
        .filter(|n| n.free_bytes >= req.size)
        .filter(|n| n.segment_value(req.spread_key).is_some())
        .filter(|n| req.requisite.is_empty() || req.requisite.iter().any(|s| n.matches(s)))
        .map(|n| {
            let rank = req
                .preferred
                .iter()
                .position(|s| n.matches(s))
                .unwrap_or(usize::MAX);
            (rank, n)
        })
        .collect();
    eligible.sort_by(|(ra, a), (rb, b)| {
        ra.cmp(rb)
            .then(b.free_bytes.cmp(&a.free_bytes))
            .then(a.name.cmp(&b.name))
    });
    let mut used: BTreeSet<&str> = BTreeSet::new();
    let mut chosen = Vec::with_capacity(req.replicas);
    for (_, n) in eligible {
        if chosen.len() == req.replicas {
            break;
        }
        let zone = n.segment_value(req.spread_key)?;
        if used.insert(zone) {
            chosen.push(n);
        }
    }
    (chosen.len() == req.replicas && req.replicas > 0).then_some(chosen)
}

/// Picks a node for a volume's disk-less witness: one whose spread-key value
/// differs from every replica's (a third site), preferring nodes that match
/// the requisite topologies, then by name. `None` when no such node exists.
pub fn place_witness<'n>(
    nodes: &'n [Node],
    replicas: &[&Node],
    req: &Request<'_>,
) -> Option<&'n Node> {
    let used: BTreeSet<&str> = replicas
        .iter()
        .filter_map(|r| r.segment_value(req.spread_key))
        .collect();
    let mut candidates: Vec<&Node> = nodes
        .iter()
        .filter(|n| {
            n.segment_value(req.spread_key)
                .is_some_and(|z| !used.contains(z))
        })
        .collect();
    candidates.sort_by_key(|n| {
        let outside = !(req.requisite.is_empty() || req.requisite.iter().any(|s| n.matches(s)));
        (outside, n.name.clone())
    });
    candidates.first().copied()
}

/// The largest volume size for which [`place`] finds a placement with these
/// constraints (`req.size` is ignored) whose first replica matches
/// `accessible` (when given): the capacity "accessible from" a topology
/// segment, since a pod uses the replica on its own node and the others may
/// be anywhere. 0 when none fits even an empty volume.
pub fn max_volume_size(nodes: &[Node], req: &Request<'_>, accessible: Option<&Segment>) -> u64 {
    // Rank nodes matching `accessible` first: the greedy placement then
    // starts there whenever such a node is eligible, and whether the rest
    // fits does not depend on which matching node starts it.
    let preferred: Vec<Segment> = accessible
        .into_iter()
        .cloned()
        .chain(req.preferred.iter().cloned())
        .collect();
    let fits = |size: u64| {
        let r = Request {
            size,
            preferred: &preferred,
            ..req.clone()
        };
        place(nodes, &r).is_some_and(|p| accessible.is_none_or(|a| p[0].matches(a)))
    };
    // Feasibility only shrinks as the size grows, and only changes at a
    // node's free-space value: try those, largest first.
    let mut sizes: Vec<u64> = nodes.iter().map(|n| n.free_bytes).collect();
    sizes.sort_unstable_by(|a, b| b.cmp(a));
    sizes.dedup();
    sizes.into_iter().find(|&size| fits(size)).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const ZONE: &str = "topology.kubernetes.io/zone";

    fn n(name: &str, zone: &str, free: u64) -> Node {
        Node {
            name: name.into(),
            labels: [(ZONE.to_string(), zone.to_string())].into(),
            free_bytes: free,
        }
    }

    fn seg(pairs: &[(&str, &str)]) -> Segment {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn req<'a>(
        replicas: usize,
        size: u64,
        reqs: &'a [Segment],
        prefs: &'a [Segment],
    ) -> Request<'a> {
        Request {
            replicas,
            size,
            spread_key: ZONE,
            requisite: reqs,
            preferred: prefs,
        }
    }

    fn names(p: &[&Node]) -> Vec<String> {
        p.iter().map(|x| x.name.clone()).collect()
    }

    #[test]
    fn replicas_land_in_distinct_zones() {
        let nodes = [n("a1", "a", 10), n("a2", "a", 20), n("b1", "b", 5)];
        let p = place(&nodes, &req(2, 5, &[], &[])).unwrap();
        assert_eq!(names(&p), ["a2", "b1"]);
        assert!(place(&nodes, &req(2, 6, &[], &[])).is_none());
        assert!(place(&nodes, &req(3, 1, &[], &[])).is_none());
        assert!(place(&nodes, &req(0, 1, &[], &[])).is_none());
    }

    #[test]
    fn requisite_limits_every_replica() {
        let nodes = [n("a1", "a", 10), n("b1", "b", 10), n("c1", "c", 100)];
        let only_ab = [seg(&[(ZONE, "a")]), seg(&[(ZONE, "b")])];
        let p = place(&nodes, &req(2, 5, &only_ab, &[])).unwrap();
        assert_eq!(names(&p), ["a1", "b1"]);
        // Only one zone allowed: two replicas cannot fit.
        assert!(place(&nodes, &req(2, 5, &only_ab[..1], &[])).is_none());
        // A node-level requisite (the scheduler's chosen node only).
        let node_only = [seg(&[(NODE_TOPOLOGY_KEY, "c1")])];
        assert_eq!(
            names(&place(&nodes, &req(1, 5, &node_only, &[])).unwrap()),
            ["c1"]
        );
    }

    #[test]
    fn preferred_segments_rank_first() {
        let nodes = [n("a1", "a", 10), n("b1", "b", 50), n("c1", "c", 100)];
        let prefs = [seg(&[(NODE_TOPOLOGY_KEY, "a1")]), seg(&[(ZONE, "b")])];
        let p = place(&nodes, &req(2, 5, &[], &prefs)).unwrap();
        assert_eq!(names(&p), ["a1", "b1"]);
        // Without preferences: most free space first.
        assert_eq!(
            names(&place(&nodes, &req(2, 5, &[], &[])).unwrap()),
            ["c1", "b1"]
        );
    }

    #[test]
    fn nodes_without_the_spread_key_are_not_eligible() {
        let mut bare = n("x", "a", 100);
        bare.labels.clear();
        let nodes = [bare, n("b1", "b", 10)];
        assert!(place(&nodes, &req(2, 5, &[], &[])).is_none());
        assert_eq!(names(&place(&nodes, &req(1, 5, &[], &[])).unwrap()), ["b1"]);
    }

    #[test]
    fn witness_goes_to_a_third_zone() {
        let nodes = [n("a1", "a", 10), n("b1", "b", 10), n("c1", "c", 0)];
        let r = req(2, 5, &[], &[]);
        let p = place(&nodes, &r).unwrap();
        assert_eq!(
            place_witness(&nodes, &p, &r).map(|w| w.name.as_str()),
            Some("c1")
        );
        assert!(place_witness(&nodes[..2], &p, &r).is_none());
    }

    #[test]
    fn max_size_is_the_largest_placeable() {
        let nodes = [n("a1", "a", 10), n("a2", "a", 30), n("b1", "b", 20)];
        assert_eq!(max_volume_size(&nodes, &req(2, 0, &[], &[]), None), 20);
        assert_eq!(max_volume_size(&nodes, &req(1, 0, &[], &[]), None), 30);
        assert_eq!(max_volume_size(&nodes, &req(3, 0, &[], &[]), None), 0);
        let only_a = [seg(&[(ZONE, "a")])];
        assert_eq!(max_volume_size(&nodes, &req(1, 0, &only_a, &[]), None), 30);
        // Accessible from one node: that node holds the first replica, the
        // second goes to another zone.
        let a1 = seg(&[(NODE_TOPOLOGY_KEY, "a1")]);
        assert_eq!(max_volume_size(&nodes, &req(2, 0, &[], &[]), Some(&a1)), 10);
        assert_eq!(max_volume_size(&nodes, &req(1, 0, &[], &[]), Some(&a1)), 10);
        let b = seg(&[(ZONE, "b")]);
        assert_eq!(max_volume_size(&nodes, &req(2, 0, &[], &[]), Some(&b)), 20);
        let c = seg(&[(ZONE, "c")]);
        assert_eq!(max_volume_size(&nodes, &req(1, 0, &[], &[]), Some(&c)), 0);
    }

    fn arb_nodes() -> impl Strategy<Value = Vec<Node>> {
        proptest::collection::vec((0u8..5, 0u64..100), 0..12).prop_map(|v| {
            v.into_iter()
                .enumerate()
                .map(|(i, (z, free))| n(&format!("n{i}"), &format!("z{z}"), free))
                .collect()
        })
    }

    proptest! {
        /// A placement, when returned, has the right count, distinct zones,
        /// enough space, respects requisite; and `None` means no placement
        /// exists (fewer distinct eligible zones than replicas).
        #[test]
        fn placement_is_sound_and_complete(
            nodes in arb_nodes(),
            replicas in 1usize..4,
            size in 0u64..100,
            req_zones in proptest::collection::btree_set(0u8..5, 0..4),
            pref_zone in proptest::option::of(0u8..5),
        ) {
            let requisite: Vec<Segment> =
                req_zones.iter().map(|z| seg(&[(ZONE, &format!("z{z}"))])).collect();
            let preferred: Vec<Segment> =
                pref_zone.iter().map(|z| seg(&[(ZONE, &format!("z{z}"))])).collect();
            let r = req(replicas, size, &requisite, &preferred);
            let eligible_zones: BTreeSet<&str> = nodes
                .iter()
                .filter(|x| x.free_bytes >= size)
                .filter(|x| requisite.is_empty() || requisite.iter().any(|s| x.matches(s)))
                .filter_map(|x| x.segment_value(ZONE))
                .collect();
            match place(&nodes, &r) {
                Some(p) => {
                    prop_assert_eq!(p.len(), replicas);
                    let zones: BTreeSet<&str> = p.iter().filter_map(|x| x.segment_value(ZONE)).collect();
                    prop_assert_eq!(zones.len(), replicas, "zones not distinct: {:?}", names(&p));
                    for x in &p {
                        prop_assert!(x.free_bytes >= size);
                        prop_assert!(requisite.is_empty() || requisite.iter().any(|s| x.matches(s)));
                    }
                    // The preferred zone, when it has an eligible node, is used first.
                    if let Some(z) = pref_zone {
                        let z = format!("z{z}");
                        if eligible_zones.contains(z.as_str()) {
                            prop_assert_eq!(p[0].segment_value(ZONE), Some(z.as_str()));
                        }
                    }
                }
                None => prop_assert!(eligible_zones.len() < replicas,
                    "no placement returned but {} eligible zones for {} replicas", eligible_zones.len(), replicas),
            }
        }

        /// `max_volume_size` is placeable (with its first replica in the
        /// accessible segment) and one byte more is not, checked against a
        /// brute force over every choice of first node.
        #[test]
        fn max_volume_size_is_tight(
            nodes in arb_nodes(),
            replicas in 1usize..4,
            zone in proptest::option::of(0u8..5),
        ) {
            let r = req(replicas, 0, &[], &[]);
            let acc = zone.map(|z| seg(&[(ZONE, &format!("z{z}"))]));
            let max = max_volume_size(&nodes, &r, acc.as_ref());
            // Brute force: some node matching `acc` with `size` free, plus
            // replicas-1 other zones with a node of `size` free.
            let fits = |size: u64| {
                nodes.iter().filter(|f| f.free_bytes >= size)
                    .filter(|f| acc.as_ref().is_none_or(|a| f.matches(a)))
                    .any(|first| {
                        let z0 = first.segment_value(ZONE);
                        let others: BTreeSet<&str> = nodes.iter()
                            .filter(|x| x.free_bytes >= size)
                            .filter_map(|x| x.segment_value(ZONE))
                            .filter(|z| Some(*z) != z0)
                            .collect();
                        others.len() + 1 >= replicas
                    })
            };
            if max > 0 || fits(0) {
                prop_assert!(fits(max), "max {} does not fit", max);
            }
            prop_assert!(!fits(max + 1), "max {} is not tight", max);
        }
    }
}
