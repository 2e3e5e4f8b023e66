//! CSI conformance, Identity and Controller: the real `tandem-csi controller`
//! on a temporary unix socket, driven over gRPC.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::*;
use tandem_csi::csi;
use tandem_csi::csi::volume_capability::access_mode::Mode;
use tonic::Code;

fn zones(v: &csi::Volume) -> BTreeSet<String> {
    v.accessible_topology
        .iter()
        .map(|t| t.segments[ZONE].clone())
        .collect()
}

fn nodes(v: &csi::Volume) -> Vec<String> {
    v.accessible_topology
        .iter()
        .map(|t| t.segments[NODE].clone())
        .collect()
}

#[test]
fn identity_reports_name_capabilities_and_readiness() {
    let d = Driver::controller(INVENTORY, &[]);
    block_on(async {
        let mut id = d.identity().await;
        let info = id
            .get_plugin_info(csi::GetPluginInfoRequest {})
            .await
            .unwrap()
            .into_inner();
        assert_eq!(info.name, "csi.tandem.io");
        assert!(!info.vendor_version.is_empty());
        let caps = id
            .get_plugin_capabilities(csi::GetPluginCapabilitiesRequest {})
            .await
            .unwrap()
            .into_inner();
        let dbg = format!("{caps:?}");
        use csi::plugin_capability::{service, Type};
        let services: Vec<i32> = caps
            .capabilities
            .iter()
            .filter_map(|c| match &c.r#type {
                Some(Type::Service(s)) => Some(s.r#type),
                _ => None,
            })
            .collect();
        assert!(
            services.contains(&(service::Type::ControllerService as i32)),
            "{dbg}"
        );
        assert!(
            services.contains(&(service::Type::VolumeAccessibilityConstraints as i32)),
            "{dbg}"
        );
        assert!(
            caps.capabilities
                .iter()
                .any(|c| matches!(&c.r#type, Some(Type::VolumeExpansion(e)) if e.r#type == csi::plugin_capability::volume_expansion::Type::Online as i32)),
            "{dbg}"
        );
        let probe = id.probe(csi::ProbeRequest {}).await.unwrap().into_inner();
        assert_eq!(probe.ready, Some(true));

        let mut c = d.controller_client().await;
        let caps = c
            .controller_get_capabilities(csi::ControllerGetCapabilitiesRequest {})
            .await
            .unwrap()
            .into_inner();
        use csi::controller_service_capability::{rpc::Type as R, Type as T};
        let rpcs: BTreeSet<i32> = caps
            .capabilities
            .iter()
            .filter_map(|c| match &c.r#type {
                Some(T::Rpc(r)) => Some(r.r#type),
                _ => None,
            })
            .collect();
        for want in [
            R::CreateDeleteVolume,
            R::PublishUnpublishVolume,
            R::ListVolumes,
            R::GetCapacity,
            R::ExpandVolume,
        ] {
            assert!(rpcs.contains(&(want as i32)), "missing {want:?}");
        }
    });
}

#[test]
fn create_volume_is_idempotent_by_name_and_conflicts_are_already_exists() {
    let d = Driver::controller(INVENTORY, &[]);
    block_on(async {
        let mut c = d.controller_client().await;
        let req = create_req("pvc-1", GIB + 1, vec![rwo_block()], &[]);
        let v1 = c
            .create_volume(req.clone())
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap();
        // Rounded up to 1 MiB.
        assert_eq!(v1.capacity_bytes, GIB + (1 << 20));
        assert!(v1.volume_id.starts_with("tdm-"));
        assert_eq!(
            v1.volume_context["tandem.io/size"],
            v1.capacity_bytes.to_string()
        );
        // Same request again: the same volume.
        let v2 = c
            .create_volume(req.clone())
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap();
        assert_eq!(v1, v2);
        // Same name, a range the existing size still satisfies: still the same.
        let v3 = c
            .create_volume(create_req("pvc-1", GIB, vec![rwo_block()], &[]))
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap();
        assert_eq!(v1, v3);
        // Same name, bigger size: ALREADY_EXISTS.
        let m = expect_code(
            c.create_volume(create_req("pvc-1", 2 * GIB, vec![rwo_block()], &[]))
                .await,
            Code::AlreadyExists,
        );
        assert!(m.contains("pvc-1"), "{m}");
        // Same name, other parameters: ALREADY_EXISTS.
        expect_code(
            c.create_volume(create_req(
                "pvc-1",
                GIB + 1,
                vec![rwo_block()],
                &[("protocol", "A")],
            ))
            .await,
            Code::AlreadyExists,
        );
        // A different name is a different volume.
        let other = c
            .create_volume(create_req("pvc-2", GIB, vec![rwo_block()], &[]))
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap();
        assert_ne!(other.volume_id, v1.volume_id);
    });
}

#[test]
fn create_volume_refuses_bad_arguments_with_invalid_argument() {
    let d = Driver::controller(INVENTORY, &[]);
    block_on(async {
        let mut c = d.controller_client().await;
        let cases: Vec<(&str, csi::CreateVolumeRequest, &str)> = vec![
            (
                "no name",
                create_req("", GIB, vec![rwo_block()], &[]),
                "name",
            ),
            (
                "no capabilities",
                create_req("v", GIB, vec![], &[]),
                "volume_capabilities",
            ),
            (
                "RWX filesystem",
                create_req(
                    "v",
                    GIB,
                    vec![cap(Mode::MultiNodeMultiWriter, false, "ext4")],
                    &[],
                ),
                "MULTI_NODE_MULTI_WRITER",
            ),
            (
                "unknown fs",
                create_req(
                    "v",
                    GIB,
                    vec![cap(Mode::SingleNodeWriter, false, "zfs")],
                    &[],
                ),
                "zfs",
            ),
            (
                "reader-only many",
                create_req(
                    "v",
                    GIB,
                    vec![cap(Mode::MultiNodeReaderOnly, true, "")],
                    &[],
                ),
                "MULTI_NODE_READER_ONLY",
            ),
            (
                "capability without access type",
                create_req(
                    "v",
                    GIB,
                    vec![csi::VolumeCapability {
                        access_mode: rwo_block().access_mode,
                        access_type: None,
                    }],
                    &[],
                ),
                "access_type",
            ),
            (
                "bad replicas",
                create_req("v", GIB, vec![rwo_block()], &[("replicas", "9")]),
                "replicas",
            ),
            (
                "bad protocol",
                create_req("v", GIB, vec![rwo_block()], &[("protocol", "B")]),
                "protocol",
            ),
            (
                "bad witness",
                create_req("v", GIB, vec![rwo_block()], &[("witness", "2")]),
                "witness",
            ),
            (
                "unknown parameter",
                create_req("v", GIB, vec![rwo_block()], &[("colour", "red")]),
                "colour",
            ),
            (
                "negative size",
                create_req("v", -5, vec![rwo_block()], &[]),
                "negative",
            ),
            (
                "inverted range",
                csi::CreateVolumeRequest {
                    capacity_range: Some(csi::CapacityRange {
                        required_bytes: 2 * GIB,
                        limit_bytes: GIB,
                    }),
                    ..create_req("v", 0, vec![rwo_block()], &[])
                },
                "exceeds",
            ),
        ];
        for (what, req, needle) in cases {
            let m = expect_code(c.create_volume(req).await, Code::InvalidArgument);
            assert!(
                m.contains(needle),
                "{what}: message {m:?} does not mention {needle:?}"
            );
        }
        // A range with no multiple of 1 MiB in it: OUT_OF_RANGE.
        let req = csi::CreateVolumeRequest {
            capacity_range: Some(csi::CapacityRange {
                required_bytes: 10,
                limit_bytes: 1000,
            }),
            ..create_req("v", 0, vec![rwo_block()], &[])
        };
        expect_code(c.create_volume(req).await, Code::OutOfRange);
        // Nothing was recorded by any of these.
        let list = c
            .list_volumes(csi::ListVolumesRequest::default())
            .await
            .unwrap()
            .into_inner();
        assert!(list.entries.is_empty(), "{list:?}");
    });
}

#[test]
fn placement_spreads_replicas_over_zones_and_honours_topology_requirements() {
    let d = Driver::controller(INVENTORY, &[]);
    block_on(async {
        let mut c = d.controller_client().await;
        // Default: 2 replicas in 2 distinct zones.
        let v = c
            .create_volume(create_req("two", GIB, vec![rwo_block()], &[]))
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap();
        assert_eq!(v.accessible_topology.len(), 2, "{v:?}");
        assert_eq!(zones(&v).len(), 2, "{v:?}");
        assert_eq!(v.volume_context["tandem.io/replicas"], nodes(&v).join(","));

        // Three replicas: one per zone a, b, c.
        let v = c
            .create_volume(create_req(
                "three",
                GIB,
                vec![rwo_block()],
                &[("replicas", "3")],
            ))
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap();
        assert_eq!(zones(&v), ["a", "b", "c"].map(String::from).into());

        // Requisite zones b and c only, preferred node c1 first.
        let mut req = create_req("req", GIB, vec![rwo_block()], &[]);
        req.accessibility_requirements = Some(csi::TopologyRequirement {
            requisite: vec![topo(&[(ZONE, "b")]), topo(&[(ZONE, "c")])],
            preferred: vec![topo(&[(NODE, "c1"), (ZONE, "c")])],
        });
        let v = c
            .create_volume(req)
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap();
        assert_eq!(nodes(&v), ["c1", "b1"]);

        // The scheduler's preferred node (WaitForFirstConsumer) holds the first replica.
        let mut req = create_req("pref", GIB, vec![rwo_block()], &[]);
        req.accessibility_requirements = Some(csi::TopologyRequirement {
            requisite: vec![],
            preferred: vec![topo(&[(NODE, "a2"), (ZONE, "a")])],
        });
        let v = c
            .create_volume(req)
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap();
        assert_eq!(nodes(&v)[0], "a2");
        assert_eq!(zones(&v).len(), 2);

        // Witness: a third zone, named in the volume context.
        let v = c
            .create_volume(create_req(
                "wit",
                GIB,
                vec![rwo_block()],
                &[("witness", "true")],
            ))
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap();
        let w = &v.volume_context["tandem.io/witness"];
        assert!(
            !nodes(&v).contains(w),
            "witness {w} on a replica node: {v:?}"
        );

        // A custom spread key: "rack", which only a1 and b1 carry.
        let inv = r#"
[[node]]
name = "n1"
capacity_bytes = 10737418240
topology = { "rack" = "r1", "topology.kubernetes.io/zone" = "a" }
[[node]]
name = "n2"
capacity_bytes = 10737418240
topology = { "rack" = "r2", "topology.kubernetes.io/zone" = "a" }
"#;
        let d2 = Driver::controller(inv, &[]);
        let mut c2 = d2.controller_client().await;
        let v = c2
            .create_volume(create_req(
                "rack",
                GIB,
                vec![rwo_block()],
                &[("topologyKey", "rack")],
            ))
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap();
        let racks: BTreeSet<String> = v
            .accessible_topology
            .iter()
            .map(|t| t.segments["rack"].clone())
            .collect();
        assert_eq!(racks.len(), 2, "{v:?}");
        // Same nodes by zone: impossible.
        expect_code(
            c2.create_volume(create_req("zone", GIB, vec![rwo_block()], &[]))
                .await,
            Code::ResourceExhausted,
        );
    });
}

#[test]
fn impossible_placements_are_resource_exhausted_and_record_nothing() {
    let d = Driver::controller(INVENTORY, &[]);
    block_on(async {
        let mut c = d.controller_client().await;
        // Four zones needed, three exist.
        let m = expect_code(
            c.create_volume(create_req(
                "v4",
                GIB,
                vec![rwo_block()],
                &[("replicas", "4")],
            ))
            .await,
            Code::ResourceExhausted,
        );
        assert!(
            m.contains("a1") && m.contains("zone"),
            "message should describe the nodes: {m}"
        );
        // Larger than any node.
        expect_code(
            c.create_volume(create_req("big", 11 * GIB, vec![rwo_block()], &[]))
                .await,
            Code::ResourceExhausted,
        );
        // Requisite allows a single zone only.
        let mut req = create_req("onezone", GIB, vec![rwo_block()], &[]);
        req.accessibility_requirements = Some(csi::TopologyRequirement {
            requisite: vec![topo(&[(ZONE, "a")])],
            preferred: vec![],
        });
        expect_code(c.create_volume(req).await, Code::ResourceExhausted);
        // Witness with replicas in all three zones.
        expect_code(
            c.create_volume(create_req(
                "wit3",
                GIB,
                vec![rwo_block()],
                &[("replicas", "3"), ("witness", "true")],
            ))
            .await,
            Code::ResourceExhausted,
        );
        // Capacity is consumed: b and c have 10 GiB; after a 6 GiB volume on
        // b+c (a is full by another), a second 6 GiB volume cannot fit twice.
        let list = c
            .list_volumes(csi::ListVolumesRequest::default())
            .await
            .unwrap()
            .into_inner();
        assert!(list.entries.is_empty());
        let mut ok = 0;
        for i in 0..4 {
            match c
                .create_volume(create_req(
                    &format!("six{i}"),
                    6 * GIB,
                    vec![rwo_block()],
                    &[],
                ))
                .await
            {
                Ok(_) => ok += 1,
                Err(s) => assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}"),
            }
        }
        // Zones a (2 nodes), b, c: four nodes of 10 GiB, each fits one 6 GiB
        // replica, two replicas per volume: exactly two volumes.
        assert_eq!(ok, 2);
    });
}

#[test]
fn delete_volume_is_idempotent_and_refused_while_published() {
    let d = Driver::controller(INVENTORY, &[]);
    block_on(async {
        let mut c = d.controller_client().await;
        expect_code(
            c.delete_volume(csi::DeleteVolumeRequest::default()).await,
            Code::InvalidArgument,
        );
        // Unknown volume: OK.
        c.delete_volume(csi::DeleteVolumeRequest {
            volume_id: "tdm-unknown".into(),
            ..Default::default()
        })
        .await
        .unwrap();
        let v = c
            .create_volume(create_req("del", GIB, vec![rwo_block()], &[]))
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap();
        let node = nodes(&v)[0].clone();
        c.controller_publish_volume(csi::ControllerPublishVolumeRequest {
            volume_id: v.volume_id.clone(),
            node_id: node.clone(),
            volume_capability: Some(rwo_block()),
            ..Default::default()
        })
        .await
        .unwrap();
        let del = csi::DeleteVolumeRequest {
            volume_id: v.volume_id.clone(),
            ..Default::default()
        };
        let m = expect_code(c.delete_volume(del.clone()).await, Code::FailedPrecondition);
        assert!(m.contains(&node), "{m}");
        c.controller_unpublish_volume(csi::ControllerUnpublishVolumeRequest {
            volume_id: v.volume_id.clone(),
            node_id: node,
            ..Default::default()
        })
        .await
        .unwrap();
        c.delete_volume(del.clone()).await.unwrap();
        c.delete_volume(del).await.unwrap();
        let list = c
            .list_volumes(csi::ListVolumesRequest::default())
            .await
            .unwrap()
            .into_inner();
        assert!(list.entries.is_empty());
        // Its space is free again: the name can be created anew.
        c.create_volume(create_req("del", GIB, vec![rwo_block()], &[]))
            .await
            .unwrap();
    });
}

fn publish(
    vol: &str,
    node: &str,
    cap: csi::VolumeCapability,
    readonly: bool,
) -> csi::ControllerPublishVolumeRequest {
    csi::ControllerPublishVolumeRequest {
        volume_id: vol.into(),
        node_id: node.into(),
        volume_capability: Some(cap),
        readonly,
        ..Default::default()
    }
}

fn unpublish(vol: &str, node: &str) -> csi::ControllerUnpublishVolumeRequest {
    csi::ControllerUnpublishVolumeRequest {
        volume_id: vol.into(),
        node_id: node.into(),
        ..Default::default()
    }
}

#[test]
fn publish_single_writer_then_dual_primary_for_rwx_block() {
    let d = Driver::controller(INVENTORY, &[]);
    block_on(async {
        let mut c = d.controller_client().await;
        let v = c
            .create_volume(create_req(
                "rwx",
                GIB,
                vec![rwx_block()],
                &[("replicas", "3")],
            ))
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap();
        let id = v.volume_id.clone();
        let n = nodes(&v);
        let (src, dst, third) = (&n[0], &n[1], &n[2]);

        // Errors first.
        expect_code(
            c.controller_publish_volume(publish("", src, rwx_block(), false))
                .await,
            Code::InvalidArgument,
        );
        expect_code(
            c.controller_publish_volume(publish(&id, "", rwx_block(), false))
                .await,
            Code::InvalidArgument,
        );
        expect_code(
            c.controller_publish_volume(csi::ControllerPublishVolumeRequest {
                volume_capability: None,
                ..publish(&id, src, rwx_block(), false)
            })
            .await,
            Code::InvalidArgument,
        );
        expect_code(
            c.controller_publish_volume(publish("tdm-nope", src, rwx_block(), false))
                .await,
            Code::NotFound,
        );
        expect_code(
            c.controller_publish_volume(publish(&id, "no-such-node", rwx_block(), false))
                .await,
            Code::NotFound,
        );
        expect_code(
            c.controller_publish_volume(publish(
                &id,
                src,
                cap(Mode::MultiNodeMultiWriter, false, "ext4"),
                false,
            ))
            .await,
            Code::InvalidArgument,
        );

        // First attach: the only primary. Idempotent.
        let ctx = c
            .controller_publish_volume(publish(&id, src, rwx_block(), false))
            .await
            .unwrap()
            .into_inner()
            .publish_context;
        assert_eq!(ctx["tandem.io/role"], "primary");
        assert_eq!(
            &ctx["tandem.io/data-on"], src,
            "the first publication holds the data"
        );
        let again = c
            .controller_publish_volume(publish(&id, src, rwx_block(), false))
            .await
            .unwrap()
            .into_inner()
            .publish_context;
        assert_eq!(again, ctx);
        // Same node, incompatible (read-only now): ALREADY_EXISTS.
        expect_code(
            c.controller_publish_volume(publish(&id, src, rwx_block(), true))
                .await,
            Code::AlreadyExists,
        );
        // Second node as single writer: refused while published elsewhere.
        expect_code(
            c.controller_publish_volume(publish(&id, dst, rwo_block(), false))
                .await,
            Code::FailedPrecondition,
        );
        // Second node as RWX block: dual-primary.
        let ctx = c
            .controller_publish_volume(publish(&id, dst, rwx_block(), false))
            .await
            .unwrap()
            .into_inner()
            .publish_context;
        assert_eq!(ctx["tandem.io/role"], "dual-primary");
        assert_eq!(&ctx["tandem.io/other-primary"], src);
        // Third: refused, exactly two primaries.
        let m = expect_code(
            c.controller_publish_volume(publish(&id, third, rwx_block(), false))
                .await,
            Code::FailedPrecondition,
        );
        assert!(m.contains("two"), "{m}");
        let list = c
            .list_volumes(csi::ListVolumesRequest::default())
            .await
            .unwrap()
            .into_inner();
        let published: BTreeSet<String> = list.entries[0]
            .status
            .as_ref()
            .unwrap()
            .published_node_ids
            .iter()
            .cloned()
            .collect();
        assert_eq!(published, [src.clone(), dst.clone()].into());

        // The source detaches (migration done): back to a single primary, and
        // a new attach is dual-primary again with the remaining node.
        c.controller_unpublish_volume(unpublish(&id, src))
            .await
            .unwrap();
        c.controller_unpublish_volume(unpublish(&id, src))
            .await
            .unwrap();
        let ctx = c
            .controller_publish_volume(publish(&id, dst, rwx_block(), false))
            .await
            .unwrap()
            .into_inner()
            .publish_context;
        assert_eq!(ctx["tandem.io/role"], "primary", "{ctx:?}");
        // The data stays where it was first written (no replication yet).
        assert_eq!(&ctx["tandem.io/data-on"], src, "{ctx:?}");
        let ctx = c
            .controller_publish_volume(publish(&id, third, rwx_block(), false))
            .await
            .unwrap()
            .into_inner()
            .publish_context;
        assert_eq!(ctx["tandem.io/role"], "dual-primary");
        assert_eq!(&ctx["tandem.io/other-primary"], dst);

        // Unpublish of unknown volumes and empty node ids is OK.
        c.controller_unpublish_volume(unpublish("tdm-gone", src))
            .await
            .unwrap();
        c.controller_unpublish_volume(unpublish(&id, ""))
            .await
            .unwrap();
        expect_code(
            c.controller_unpublish_volume(unpublish("", src)).await,
            Code::InvalidArgument,
        );

        // A node without a replica cannot attach (no remote attach yet).
        let v = c
            .create_volume(create_req("local", GIB, vec![rwo_block()], &[]))
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap();
        let holders = nodes(&v);
        let outsider = ["a1", "a2", "b1", "c1"]
            .into_iter()
            .find(|n| !holders.iter().any(|h| h == n))
            .unwrap();
        expect_code(
            c.controller_publish_volume(publish(&v.volume_id, outsider, rwo_block(), false))
                .await,
            Code::FailedPrecondition,
        );
        // Protocol A never goes dual-primary.
        let v = c
            .create_volume(create_req(
                "async",
                GIB,
                vec![rwx_block()],
                &[("protocol", "A")],
            ))
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap();
        let n = nodes(&v);
        c.controller_publish_volume(publish(&v.volume_id, &n[0], rwx_block(), false))
            .await
            .unwrap();
        let m = expect_code(
            c.controller_publish_volume(publish(&v.volume_id, &n[1], rwx_block(), false))
                .await,
            Code::FailedPrecondition,
        );
        assert!(m.contains("protocol"), "{m}");
    });
}

#[test]
fn validate_volume_capabilities_confirms_only_supported_ones() {
    let d = Driver::controller(INVENTORY, &[]);
    block_on(async {
        let mut c = d.controller_client().await;
        let v = c
            .create_volume(create_req("val", GIB, vec![rwo_block()], &[]))
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap();
        let req = |caps: Vec<csi::VolumeCapability>| csi::ValidateVolumeCapabilitiesRequest {
            volume_id: v.volume_id.clone(),
            volume_capabilities: caps,
            ..Default::default()
        };
        for ok in [
            vec![rwo_block()],
            vec![rwx_block()],
            vec![cap(Mode::SingleNodeWriter, false, "xfs"), rwo_block()],
        ] {
            let r = c
                .validate_volume_capabilities(req(ok.clone()))
                .await
                .unwrap()
                .into_inner();
            assert_eq!(r.confirmed.map(|c| c.volume_capabilities), Some(ok));
        }
        let r = c
            .validate_volume_capabilities(req(vec![cap(Mode::MultiNodeMultiWriter, false, "ext4")]))
            .await
            .unwrap()
            .into_inner();
        assert!(r.confirmed.is_none());
        assert!(r.message.contains("block"), "{}", r.message);
        let r = c
            .validate_volume_capabilities(csi::ValidateVolumeCapabilitiesRequest {
                parameters: map(&[("replicas", "3")]),
                ..req(vec![rwo_block()])
            })
            .await
            .unwrap()
            .into_inner();
        assert!(
            r.confirmed.is_none(),
            "differing parameters must not be confirmed"
        );
        expect_code(
            c.validate_volume_capabilities(req(vec![])).await,
            Code::InvalidArgument,
        );
        expect_code(
            c.validate_volume_capabilities(csi::ValidateVolumeCapabilitiesRequest {
                volume_id: "tdm-nope".into(),
                ..req(vec![rwo_block()])
            })
            .await,
            Code::NotFound,
        );
    });
}

#[test]
fn list_volumes_paginates_and_refuses_bad_tokens() {
    let d = Driver::controller(INVENTORY, &[]);
    block_on(async {
        let mut c = d.controller_client().await;
        let mut ids = BTreeSet::new();
        for i in 0..5 {
            let v = c
                .create_volume(create_req(
                    &format!("l{i}"),
                    1 << 20,
                    vec![rwo_block()],
                    &[],
                ))
                .await
                .unwrap()
                .into_inner()
                .volume
                .unwrap();
            ids.insert(v.volume_id);
        }
        let mut seen = Vec::new();
        let mut token = String::new();
        loop {
            let r = c
                .list_volumes(csi::ListVolumesRequest {
                    max_entries: 2,
                    starting_token: token.clone(),
                })
                .await
                .unwrap()
                .into_inner();
            assert!(r.entries.len() <= 2);
            seen.extend(r.entries.into_iter().map(|e| e.volume.unwrap().volume_id));
            if r.next_token.is_empty() {
                break;
            }
            token = r.next_token;
        }
        assert_eq!(seen.len(), 5);
        assert_eq!(seen.into_iter().collect::<BTreeSet<_>>(), ids);
        // csi-sanity: "should fail when an invalid starting_token is
        // passed" uses "invalid-token", a well-formed id of no volume.
        for bad in ["not a token!", "invalid-token"] {
            expect_code(
                c.list_volumes(csi::ListVolumesRequest {
                    max_entries: 0,
                    starting_token: bad.into(),
                })
                .await,
                Code::Aborted,
            );
        }
        expect_code(
            c.list_volumes(csi::ListVolumesRequest {
                max_entries: -1,
                starting_token: String::new(),
            })
            .await,
            Code::InvalidArgument,
        );
    });
}

#[test]
fn get_capacity_is_the_largest_volume_placeable_per_segment() {
    let d = Driver::controller(INVENTORY, &[]);
    block_on(async {
        let mut c = d.controller_client().await;
        let cap_for =
            |topology: Option<csi::Topology>, params: &[(&str, &str)]| csi::GetCapacityRequest {
                volume_capabilities: vec![rwo_block()],
                parameters: map(params),
                accessible_topology: topology,
            };
        let all = c
            .get_capacity(cap_for(None, &[]))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(all.available_capacity, 10 * GIB);
        assert_eq!(all.maximum_volume_size, Some(10 * GIB));
        // Accessible from zone a or node a1 (the segments Kubernetes asks
        // about): the first replica there, the second in another zone.
        let a = c
            .get_capacity(cap_for(Some(topo(&[(ZONE, "a")])), &[]))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(a.available_capacity, 10 * GIB);
        let a1 = c
            .get_capacity(cap_for(Some(topo(&[(ZONE, "a"), (NODE, "a1")])), &[]))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(a1.available_capacity, 10 * GIB);
        // A segment no node matches: nothing.
        let z = c
            .get_capacity(cap_for(Some(topo(&[(ZONE, "z")])), &[]))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(z.available_capacity, 0);
        // After an 8 GiB volume on two zones, the rest shrinks accordingly.
        let mut req = create_req("eight", 8 * GIB, vec![rwo_block()], &[]);
        req.accessibility_requirements = Some(csi::TopologyRequirement {
            requisite: vec![topo(&[(ZONE, "b")]), topo(&[(ZONE, "c")])],
            preferred: vec![],
        });
        c.create_volume(req).await.unwrap();
        let all = c
            .get_capacity(cap_for(None, &[]))
            .await
            .unwrap()
            .into_inner();
        // a1/a2 have 10 GiB but share a zone; b and c have 2 GiB left.
        assert_eq!(all.available_capacity, 2 * GIB);
        let three = c
            .get_capacity(cap_for(None, &[("replicas", "3")]))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(three.available_capacity, 2 * GIB);
        // From node a2: a2 holds 10 GiB, but the second replica must go to
        // b1 or c1 (2 GiB left each); a single replica may use all 10 GiB.
        let a2 = topo(&[(ZONE, "a"), (NODE, "a2")]);
        let r = c
            .get_capacity(cap_for(Some(a2.clone()), &[]))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.available_capacity, 2 * GIB);
        let r = c
            .get_capacity(cap_for(Some(a2), &[("replicas", "1")]))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.available_capacity, 10 * GIB);
        expect_code(
            c.get_capacity(cap_for(None, &[("replicas", "x")])).await,
            Code::InvalidArgument,
        );
    });
}

#[test]
fn controller_expand_volume_grows_within_free_space() {
    let d = Driver::controller(INVENTORY, &[]);
    block_on(async {
        let mut c = d.controller_client().await;
        let v = c
            .create_volume(create_req("grow", GIB, vec![rwo_block()], &[]))
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap();
        let req =
            |bytes: i64, cap: Option<csi::VolumeCapability>| csi::ControllerExpandVolumeRequest {
                volume_id: v.volume_id.clone(),
                capacity_range: Some(csi::CapacityRange {
                    required_bytes: bytes,
                    limit_bytes: 0,
                }),
                volume_capability: cap,
                ..Default::default()
            };
        let r = c
            .controller_expand_volume(req(2 * GIB, Some(rwo_block())))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.capacity_bytes, 2 * GIB);
        // Smaller than the current size: no-op, reports the current size.
        let r = c
            .controller_expand_volume(req(GIB, None))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.capacity_bytes, 2 * GIB);
        let r = c
            .controller_expand_volume(req(
                3 * GIB,
                Some(cap(Mode::SingleNodeWriter, false, "ext4")),
            ))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.capacity_bytes, 3 * GIB);
        assert!(
            r.node_expansion_required,
            "a filesystem must be grown on the node"
        );
        let list = c
            .list_volumes(csi::ListVolumesRequest::default())
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            list.entries[0].volume.as_ref().unwrap().capacity_bytes,
            3 * GIB
        );
        expect_code(
            c.controller_expand_volume(req(20 * GIB, None)).await,
            Code::ResourceExhausted,
        );
        // Expansion is online: accepted while published (the node grows
        // replica and device in NodeExpandVolume); a publication carries
        // the current size (the volume context keeps the old one), which
        // NodeStageVolume grows the local replica to.
        let node = nodes(&v)[0].clone();
        let ctx = c
            .controller_publish_volume(publish(&v.volume_id, &node, rwo_block(), false))
            .await
            .unwrap()
            .into_inner()
            .publish_context;
        assert_eq!(ctx["tandem.io/size"], (3 * GIB).to_string());
        assert_eq!(v.volume_context["tandem.io/size"], GIB.to_string());
        let r = c
            .controller_expand_volume(req(4 * GIB, Some(rwo_block())))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.capacity_bytes, 4 * GIB);
        assert!(
            r.node_expansion_required,
            "a published block device is grown on the node"
        );
        c.controller_unpublish_volume(unpublish(&v.volume_id, &node))
            .await
            .unwrap();
        expect_code(
            c.controller_expand_volume(csi::ControllerExpandVolumeRequest {
                volume_id: "tdm-nope".into(),
                ..req(5 * GIB, None)
            })
            .await,
            Code::NotFound,
        );
        expect_code(
            c.controller_expand_volume(csi::ControllerExpandVolumeRequest {
                capacity_range: None,
                ..req(4 * GIB, None)
            })
            .await,
            Code::InvalidArgument,
        );
    });
}

/// Waits until the driver's log shows `op` holding a volume's guard for the
/// `nth` time (the first is 1).
async fn wait_started(d: &Driver, op: &str, nth: usize) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let n = d
            .log_text()
            .lines()
            .filter(|l| l.contains("operation started") && l.contains(op))
            .count();
        if n >= nth {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{op} never started:\n{}",
            d.log_text()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[test]
fn a_second_operation_on_a_busy_volume_is_aborted() {
    let d = Driver::controller(INVENTORY, &[("TANDEM_CSI_TEST_DELAY_MS", "1000")]);
    block_on(async {
        let c = d.controller_client().await;
        let mut c1 = c.clone();
        let slow = tokio::spawn(async move {
            c1.create_volume(create_req("busy", GIB, vec![rwo_block()], &[]))
                .await
        });
        wait_started(&d, "CreateVolume", 1).await;
        let mut c2 = c.clone();
        let m = expect_code(
            c2.create_volume(create_req("busy", GIB, vec![rwo_block()], &[]))
                .await,
            Code::Aborted,
        );
        assert!(m.contains("in progress"), "{m}");
        let v = slow.await.unwrap().unwrap().into_inner().volume.unwrap();
        // Once the first finishes, the same volume takes operations again.
        let mut c3 = c.clone();
        let id = v.volume_id.clone();
        let slow_delete = tokio::spawn(async move {
            c3.delete_volume(csi::DeleteVolumeRequest {
                volume_id: id,
                ..Default::default()
            })
            .await
        });
        wait_started(&d, "DeleteVolume", 1).await;
        let mut c4 = c.clone();
        expect_code(
            c4.controller_expand_volume(csi::ControllerExpandVolumeRequest {
                volume_id: v.volume_id.clone(),
                capacity_range: Some(csi::CapacityRange {
                    required_bytes: 2 * GIB,
                    limit_bytes: 0,
                }),
                ..Default::default()
            })
            .await,
            Code::Aborted,
        );
        slow_delete.await.unwrap().unwrap();
        // Another volume is not blocked while one is busy.
        let mut c5 = c.clone();
        let busy = tokio::spawn(async move {
            c5.create_volume(create_req("busy", GIB, vec![rwo_block()], &[]))
                .await
        });
        wait_started(&d, "CreateVolume", 2).await;
        c4.create_volume(create_req("other", GIB, vec![rwo_block()], &[]))
            .await
            .unwrap();
        busy.await.unwrap().unwrap();
    });
}

#[test]
fn create_resumes_after_a_crash_between_record_and_ready() {
    let mut d = Driver::controller(INVENTORY, &[("TANDEM_CSI_TEST_CRASH_AFTER_CREATING", "1")]);
    let req = create_req("crashy", GIB, vec![rwo_block()], &[("replicas", "3")]);
    block_on(async {
        let mut c = d.controller_client().await;
        let r = c.create_volume(req.clone()).await;
        assert!(
            r.is_err(),
            "the crash hook should have killed the call: {r:?}"
        );
    });
    assert_eq!(d.wait_exit(Duration::from_secs(10)), Some(86));
    // The record was persisted as Creating before the crash.
    let files: Vec<String> = std::fs::read_dir(d.path().join("volumes"))
        .unwrap()
        .map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap())
        .collect();
    assert_eq!(files.len(), 1);
    assert!(files[0].contains("\"Creating\""), "{}", files[0]);
    d.set_env("TANDEM_CSI_TEST_CRASH_AFTER_CREATING", None);
    d.start();
    block_on(async {
        let mut c = d.controller_client().await;
        let v = c
            .create_volume(req.clone())
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap();
        assert_eq!(zones(&v).len(), 3);
        let list = c
            .list_volumes(csi::ListVolumesRequest::default())
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            list.entries.len(),
            1,
            "the retry must not create a second volume"
        );
        assert_eq!(
            list.entries[0].volume.as_ref().unwrap().volume_id,
            v.volume_id
        );
    });
    assert!(d.log_text().contains("resuming"), "{}", d.log_text());
    let rec = std::fs::read_to_string(
        std::fs::read_dir(d.path().join("volumes"))
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path(),
    )
    .unwrap();
    assert!(rec.contains("\"Ready\""), "{rec}");
}

#[test]
fn records_survive_a_restart_and_sigterm_removes_the_socket() {
    let mut d = Driver::controller(INVENTORY, &[]);
    let v = block_on(async {
        let mut c = d.controller_client().await;
        let v = c
            .create_volume(create_req("keep", GIB, vec![rwx_block()], &[]))
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap();
        c.controller_publish_volume(publish(&v.volume_id, &nodes(&v)[0], rwx_block(), false))
            .await
            .unwrap();
        v
    });
    d.stop();
    d.start();
    block_on(async {
        let mut c = d.controller_client().await;
        let list = c
            .list_volumes(csi::ListVolumesRequest::default())
            .await
            .unwrap()
            .into_inner();
        assert_eq!(list.entries.len(), 1);
        assert_eq!(list.entries[0].volume.as_ref(), Some(&v));
        assert_eq!(
            list.entries[0].status.as_ref().unwrap().published_node_ids,
            [nodes(&v)[0].clone()]
        );
    });
    // A second driver on the same socket is refused while the first listens.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tandem-csi"))
        .args(["controller", "--nodes"])
        .arg(d.path().join("nodes.toml"))
        .arg("--state-dir")
        .arg(d.path().join("other"))
        .arg("--endpoint")
        .arg(format!("unix://{}", d.socket.display()))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("already listening"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    d.stop();
}

#[test]
fn a_broken_inventory_stops_startup_naming_file_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let inv = dir.path().join("nodes.toml");
    std::fs::write(&inv, "[[node]]\nname = \"x\"\ncapacity_bytes = -1\n").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tandem-csi"))
        .args(["controller", "--nodes"])
        .arg(&inv)
        .arg("--state-dir")
        .arg(dir.path().join("v"))
        .arg("--endpoint")
        .arg(format!("unix://{}", dir.path().join("s.sock").display()))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("nodes.toml") && err.contains("capacity_bytes"),
        "{err}"
    );
}

/// A controller on `inventory` with `--replication-ports ports`, its record
/// directory next to it.
fn replicating_controller(inventory: &str, ports: &str) -> (Driver, std::path::PathBuf) {
    let dir = tempfile::Builder::new()
        .prefix("tandem-csi-")
        .tempdir()
        .expect("temp dir");
    let inv = dir.path().join("nodes.toml");
    std::fs::write(&inv, inventory).unwrap();
    let volumes = dir.path().join("volumes");
    let args = vec![
        "controller".to_string(),
        "--state-dir".into(),
        volumes.display().to_string(),
        "--nodes".into(),
        inv.display().to_string(),
        "--replication-ports".into(),
        ports.into(),
    ];
    (Driver::start_with(dir, args, &[]), volumes)
}

/// Replication addresses: each replica gets its node's inventory address and
/// the lowest free port of `--replication-ports` on that address, persisted
/// in the record; an exhausted range is `RESOURCE_EXHAUSTED`; a deleted
/// volume's ports are reused; only a volume created for RWX block allows
/// two primaries (a second attachment of any other replicated volume is
/// `FAILED_PRECONDITION`).
#[test]
fn replicated_volumes_get_distinct_persisted_addresses_and_only_rwx_two_primaries() {
    let (d, volumes) = replicating_controller(
        &format!(
            r#"
[[node]]
name = "a"
capacity_bytes = 10737418240
topology = {{ "{ZONE}" = "room-a" }}
address = "127.0.0.1"
[[node]]
name = "b"
capacity_bytes = 10737418240
topology = {{ "{ZONE}" = "room-b" }}
address = "127.0.0.1"
[[node]]
name = "c"
capacity_bytes = 10737418240
topology = {{ "{ZONE}" = "room-c" }}
address = "10.9.9.9"
"#
        ),
        "9000-9003",
    );
    let record = |id: &str| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(volumes.join(format!("{id}.json"))).unwrap())
            .unwrap()
    };
    let addresses = |id: &str| -> Vec<(String, String)> {
        record(id)["replicas"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r["node"].as_str().unwrap().to_string(),
                    r["address"].as_str().unwrap_or("none").to_string(),
                )
            })
            .collect()
    };
    let pair = vec![topo(&[(ZONE, "room-a")]), topo(&[(ZONE, "room-b")])];
    block_on(async {
        let mut c = d.controller_client().await;
        let create = |name: &str, cap: csi::VolumeCapability| {
            let mut r = create_req(name, GIB, vec![cap], &[("replicas", "2")]);
            r.accessibility_requirements = Some(csi::TopologyRequirement {
                requisite: pair.clone(),
                preferred: vec![],
            });
            r
        };
        let rwo = c
            .create_volume(create("rwo", rwo_block()))
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap();
        let rwx = c
            .create_volume(create("rwx", rwx_block()))
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap();
        let mut got = addresses(&rwo.volume_id);
        got.extend(addresses(&rwx.volume_id));
        got.sort();
        let ports: BTreeSet<&str> = got.iter().map(|(_, a)| a.as_str()).collect();
        assert_eq!(
            ports,
            BTreeSet::from([
                "127.0.0.1:9000",
                "127.0.0.1:9001",
                "127.0.0.1:9002",
                "127.0.0.1:9003"
            ]),
            "{got:?}"
        );
        assert_eq!(record(&rwo.volume_id)["allow_two_primaries"], false);
        assert_eq!(record(&rwx.volume_id)["allow_two_primaries"], true);
        // A single-primary replicated volume is accessible from its zones
        // (remote attach); a live-migration volume only from its replica
        // nodes, so a migration target always holds a replica.
        let nodes = |v: &csi::Volume| -> BTreeSet<Option<String>> {
            v.accessible_topology
                .iter()
                .map(|t| t.segments.get(NODE).cloned())
                .collect()
        };
        assert_eq!(nodes(&rwo), BTreeSet::from([None]), "{rwo:?}");
        assert_eq!(
            nodes(&rwx),
            BTreeSet::from([Some("a".to_string()), Some("b".to_string())]),
            "{rwx:?}"
        );
        // The range is used up on 127.0.0.1.
        let msg = expect_code(
            c.create_volume(create("third", rwo_block())).await,
            Code::ResourceExhausted,
        );
        assert!(msg.contains("replication port"), "{msg}");
        // A retried CreateVolume keeps its addresses.
        let before = addresses(&rwo.volume_id);
        c.create_volume(create("rwo", rwo_block())).await.unwrap();
        assert_eq!(addresses(&rwo.volume_id), before);

        // Two primaries only for the volume created for RWX block.
        c.controller_publish_volume(publish(&rwo.volume_id, "a", rwx_block(), false))
            .await
            .unwrap();
        let msg = expect_code(
            c.controller_publish_volume(publish(&rwo.volume_id, "b", rwx_block(), false))
                .await,
            Code::FailedPrecondition,
        );
        assert!(msg.contains("MULTI_NODE_MULTI_WRITER"), "{msg}");
        c.controller_publish_volume(publish(&rwx.volume_id, "a", rwx_block(), false))
            .await
            .unwrap();
        let ctx = c
            .controller_publish_volume(publish(&rwx.volume_id, "b", rwx_block(), false))
            .await
            .unwrap()
            .into_inner()
            .publish_context;
        assert_eq!(ctx["tandem.io/role"], "dual-primary");

        // Deleting a volume frees its ports.
        c.controller_unpublish_volume(unpublish(&rwo.volume_id, "a"))
            .await
            .unwrap();
        c.delete_volume(csi::DeleteVolumeRequest {
            volume_id: rwo.volume_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
        let third = c
            .create_volume(create("third", rwo_block()))
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap();
        let mut a = addresses(&third.volume_id);
        a.sort();
        let mut b = before.clone();
        b.sort();
        assert_eq!(a.len(), 2);
        let freed: BTreeSet<&str> = b.iter().map(|(_, x)| x.as_str()).collect();
        assert!(
            a.iter().all(|(_, x)| freed.contains(x.as_str())),
            "{a:?} {b:?}"
        );
    });
}

/// Remote attach: a replicated volume is accessible from every node of its
/// replicas' zones; publishing it to a node without a replica records that
/// node as a diskless client with its own replication address (persisted
/// with the attachment, idempotent), only while the volume is attached
/// nowhere else; a node without an inventory address cannot be a client;
/// unpublishing removes the client.
#[test]
fn a_node_without_a_replica_is_published_as_a_diskless_client_with_its_own_address() {
    let (d, volumes) = replicating_controller(
        &format!(
            r#"
[[node]]
name = "a"
capacity_bytes = 10737418240
topology = {{ "{ZONE}" = "room-a" }}
address = "127.0.0.1"
[[node]]
name = "b"
capacity_bytes = 10737418240
topology = {{ "{ZONE}" = "room-b" }}
address = "127.0.0.1"
[[node]]
name = "c"
capacity_bytes = 0
topology = {{ "{ZONE}" = "room-c" }}
address = "127.0.0.2"
[[node]]
name = "d"
capacity_bytes = 0
topology = {{ "{ZONE}" = "room-c" }}
"#
        ),
        "9000-9010",
    );
    let record = |id: &str| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(volumes.join(format!("{id}.json"))).unwrap())
            .unwrap()
    };
    block_on(async {
        let mut c = d.controller_client().await;
        let v = c
            .create_volume(create_req("remote", GIB, vec![rwo_block()], &[]))
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap();
        let id = v.volume_id.clone();
        // Zones only: any node of room-a or room-b may use it.
        assert_eq!(
            zones(&v),
            BTreeSet::from(["room-a".to_string(), "room-b".to_string()])
        );
        assert!(
            v.accessible_topology
                .iter()
                .all(|t| !t.segments.contains_key(NODE)),
            "{v:?}"
        );
        assert_eq!(v.volume_context["tandem.io/replicas"], "a,b");

        let ctx = c
            .controller_publish_volume(publish(&id, "c", rwo_block(), false))
            .await
            .unwrap()
            .into_inner()
            .publish_context;
        assert_eq!(ctx["tandem.io/role"], "primary");
        let clients = record(&id)["clients"].clone();
        assert_eq!(
            clients,
            serde_json::json!([{ "node": "c", "address": "127.0.0.2:9000" }])
        );
        // Idempotent.
        c.controller_publish_volume(publish(&id, "c", rwo_block(), false))
            .await
            .unwrap();
        assert_eq!(record(&id)["clients"], clients);
        // No second attachment while a client uses it, replica or not.
        let m = expect_code(
            c.controller_publish_volume(publish(&id, "a", rwo_block(), false))
                .await,
            Code::FailedPrecondition,
        );
        assert!(m.contains("attached remotely to node c"), "{m}");
        // A node without an inventory address cannot be a client.
        let m = expect_code(
            c.controller_publish_volume(publish(&id, "d", rwo_block(), false))
                .await,
            Code::FailedPrecondition,
        );
        assert!(m.contains("no address in the inventory"), "{m}");
        // A volume that cannot be deleted while a client uses it.
        expect_code(
            c.delete_volume(csi::DeleteVolumeRequest {
                volume_id: id.clone(),
                ..Default::default()
            })
            .await,
            Code::FailedPrecondition,
        );
        c.controller_unpublish_volume(unpublish(&id, "c"))
            .await
            .unwrap();
        assert!(record(&id).get("clients").is_none(), "{}", record(&id));
        assert_eq!(record(&id)["attachments"], serde_json::json!([]));

        // While a replica node uses it, no client attaches (a live
        // migration needs a replica on both nodes).
        c.controller_publish_volume(publish(&id, "a", rwo_block(), false))
            .await
            .unwrap();
        let m = expect_code(
            c.controller_publish_volume(publish(&id, "c", rwo_block(), false))
                .await,
            Code::FailedPrecondition,
        );
        assert!(m.contains("attached nowhere else"), "{m}");
        c.controller_unpublish_volume(unpublish(&id, "a"))
            .await
            .unwrap();
    });
}
