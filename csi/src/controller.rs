//! The CSI Controller service: volume records, placement, publication.
//!
//! Every mutating call takes the volume's in-flight guard first (a second
//! concurrent call on the same volume gets `ABORTED`), and CreateVolume
//! persists the record as `Creating` before acting, so a retry after a crash
//! resumes with the same id and placement.
//!
//! In this version the controller's "acting" is bookkeeping only: replicas
//! are realised on the nodes by the node plugin when the volume is staged
//! (see `docs/csi.md`, "What the driver does today").

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bpfman_csi::v1 as csi;
use bpfman_csi::v1::controller_server::Controller;
use bpfman_csi::v1::controller_service_capability::{rpc::Type as RpcType, Rpc, Type as CapType};
use tonic::{Request, Response, Status};

use crate::error::{required, Error, Result};
use crate::inflight::InFlight;
use crate::inventory::Inventory;
use crate::params::{size_fits, size_for, Access, Capability, VolumeParams, SIZE_ALIGN};
use crate::placement::{self, Segment, NODE_TOPOLOGY_KEY};
use crate::store::{
    Attachment, Client, Replica, VolumeRecord, VolumeState, VolumeStore, RECORD_VERSION,
};

/// Volume-context key: the volume UUID.
pub const CTX_UUID: &str = "tandem.io/uuid";
/// Volume-context key: size in bytes.
pub const CTX_SIZE: &str = "tandem.io/size";
/// Volume-context key: replica nodes, comma separated, in placement order.
pub const CTX_REPLICAS: &str = "tandem.io/replicas";
/// Volume-context key: replication protocol.
pub const CTX_PROTOCOL: &str = "tandem.io/protocol";
/// Volume-context key: witness node (absent without a witness).
pub const CTX_WITNESS: &str = "tandem.io/witness";
/// Publish-context key: `primary` (the only writer) or `dual-primary`.
pub const PUB_ROLE: &str = "tandem.io/role";
/// Publish-context key: the other node the volume is published to, in dual-primary.
pub const PUB_OTHER: &str = "tandem.io/other-primary";
/// Publish-context key: the node whose replica holds the volume's data (the
/// first node it was published to). A node without a replica must not
/// create a blank one unless it is this node.
pub const PUB_DATA_ON: &str = "tandem.io/data-on";
/// Publish-context key: the volume's current size in bytes (the volume
/// context keeps the size at creation; expansion is offline, so a
/// publication after ControllerExpandVolume carries the grown size, and
/// NodeStageVolume grows the local replica to it).
pub const PUB_SIZE: &str = "tandem.io/size";

/// Hooks the conformance tests use to reach states that are otherwise racy
/// to produce. Read once from the environment; all off by default.
#[derive(Debug, Clone, Default)]
pub struct TestHooks {
    /// `TANDEM_CSI_TEST_DELAY_MS`: sleep this long inside every mutating
    /// call, while holding the volume's in-flight guard.
    pub delay: Duration,
    /// `TANDEM_CSI_TEST_CRASH_AFTER_CREATING=1`: exit (code 86) right after
    /// persisting a new record as `Creating`, like a crash.
    pub crash_after_creating: bool,
}

impl TestHooks {
    /// Reads the hooks from the environment.
    pub fn from_env() -> TestHooks {
        TestHooks {
            delay: std::env::var("TANDEM_CSI_TEST_DELAY_MS")
                .ok()
                .and_then(|v| v.parse().ok())
                .map(Duration::from_millis)
                .unwrap_or_default(),
            crash_after_creating: std::env::var("TANDEM_CSI_TEST_CRASH_AFTER_CREATING")
                .is_ok_and(|v| v == "1"),
        }
    }
}

/// The controller service.
pub struct ControllerService {
    store: Arc<dyn VolumeStore>,
    inventory: Inventory,
    inflight: InFlight,
    /// Serialises placement with persisting its record, so two volumes
    /// created at once never count the same free space twice.
    alloc: tokio::sync::Mutex<()>,
    hooks: TestHooks,
    /// UDP ports replicas may listen on (`--replication-ports`).
    ports: std::ops::RangeInclusive<u16>,
}

/// Most nodes in a volume, replicas and diskless clients together (each
/// replica's metadata has a slot per other node, `tandem_core::meta::SLOTS`).
pub const MAX_MEMBERS: usize = 4;

/// The default `--replication-ports`.
pub const DEFAULT_REPLICATION_PORTS: std::ops::RangeInclusive<u16> = 7800..=8799;

/// The volume id for a CSI name: `tdm-<uuid v5 of the name>`. Deterministic,
/// so a retried CreateVolume finds its record even after a crash.
pub fn volume_id(name: &str) -> (String, uuid::Uuid) {
    const NS: uuid::Uuid = uuid::Uuid::from_u128(0x7a6e_6465_6d2d_4353_4900_0000_0000_0001);
    let u = uuid::Uuid::new_v5(&NS, name.as_bytes());
    (format!("tdm-{u}"), u)
}

/// Whether `s` has the form of a volume id this driver hands out (`tdm-<uuid>`).
pub fn is_volume_id(s: &str) -> bool {
    s.strip_prefix("tdm-")
        .and_then(|u| uuid::Uuid::try_parse(u).ok())
        .is_some_and(|u| format!("tdm-{u}") == s)
}

fn segment_of(t: &csi::Topology) -> Segment {
    t.segments
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// Where the volume is accessible from. A replicated single-primary
/// volume: every node of its replicas' zones (a node without a replica
/// attaches as a diskless client). A volume for live migration
/// (`allow_two_primaries`) or one the driver does not replicate: only the
/// replica nodes themselves — a migration's target must hold a replica
/// (remote attach is single-node), so the scheduler must not pick another.
fn topology_of(rec: &VolumeRecord) -> Vec<csi::Topology> {
    let mut out: Vec<csi::Topology> = Vec::new();
    let per_node = !rec.replicated() || rec.allow_two_primaries;
    for r in &rec.replicas {
        let mut segments = HashMap::from([(rec.params.topology_key.clone(), r.zone.clone())]);
        if per_node {
            segments.insert(NODE_TOPOLOGY_KEY.to_string(), r.node.clone());
        }
        let t = csi::Topology { segments };
        if !out.contains(&t) {
            out.push(t);
        }
    }
    out
}

fn volume_context(rec: &VolumeRecord) -> HashMap<String, String> {
    let mut ctx = HashMap::from([
        (CTX_UUID.to_string(), rec.uuid.to_string()),
        (CTX_SIZE.to_string(), rec.size.to_string()),
        (
            CTX_REPLICAS.to_string(),
            rec.replicas
                .iter()
                .map(|r| r.node.as_str())
                .collect::<Vec<_>>()
                .join(","),
        ),
        (
            CTX_PROTOCOL.to_string(),
            rec.params.protocol.as_str().to_string(),
        ),
    ]);
    if let Some(w) = &rec.witness {
        ctx.insert(CTX_WITNESS.to_string(), w.clone());
    }
    ctx
}

fn to_volume(rec: &VolumeRecord) -> csi::Volume {
    csi::Volume {
        capacity_bytes: rec.size as i64,
        volume_id: rec.id.clone(),
        volume_context: volume_context(rec),
        content_source: None,
        accessible_topology: topology_of(rec),
    }
}

fn publish_context(rec: &VolumeRecord, node: &str) -> HashMap<String, String> {
    let others: Vec<&str> = rec
        .attachments
        .iter()
        .map(|a| a.node.as_str())
        .filter(|n| *n != node)
        .collect();
    let mut ctx = HashMap::from([(
        PUB_ROLE.to_string(),
        if others.is_empty() {
            "primary"
        } else {
            "dual-primary"
        }
        .to_string(),
    )]);
    if let Some(o) = others.first() {
        ctx.insert(PUB_OTHER.to_string(), o.to_string());
    }
    if let Some(n) = &rec.initialized_on {
        ctx.insert(PUB_DATA_ON.to_string(), n.clone());
    }
    ctx.insert(PUB_SIZE.to_string(), rec.size.to_string());
    ctx
}

impl ControllerService {
    /// A controller over `store` placing replicas on `inventory`'s nodes.
    pub fn new(store: Arc<dyn VolumeStore>, inventory: Inventory, hooks: TestHooks) -> Self {
        ControllerService {
            store,
            inventory,
            inflight: InFlight::default(),
            alloc: tokio::sync::Mutex::new(()),
            hooks,
            ports: DEFAULT_REPLICATION_PORTS,
        }
    }

    /// Replicas listen on ports of `ports` (one per replica and volume,
    /// distinct per address).
    pub fn with_replication_ports(mut self, ports: std::ops::RangeInclusive<u16>) -> Self {
        self.ports = ports;
        self
    }

    /// Replication addresses for replicas on `nodes`: each node's inventory
    /// address with the lowest port of the range no other replica on that
    /// address uses. `None` when a node has no address (the volume is then
    /// not replicated by the node agents).
    fn replication_addresses(
        &self,
        nodes: &[&str],
        records: &[VolumeRecord],
    ) -> Result<Option<Vec<std::net::SocketAddr>>> {
        let mut ips = Vec::new();
        for n in nodes {
            match self.inventory.node(n).and_then(|s| s.address) {
                Some(ip) => ips.push(ip),
                None => return Ok(None),
            }
        }
        let mut used: std::collections::BTreeSet<std::net::SocketAddr> = records
            .iter()
            .flat_map(|r| {
                r.replicas
                    .iter()
                    .filter_map(|rep| rep.address)
                    .chain(r.witness_address)
                    .chain(r.clients.iter().map(|c| c.address))
            })
            .collect();
        let mut out = Vec::new();
        for ip in ips {
            let port = self
                .ports
                .clone()
                .find(|p| !used.contains(&std::net::SocketAddr::new(ip, *p)))
                .ok_or_else(|| {
                    Error::ResourceExhausted(format!(
                        "no free replication port on {ip} in {}-{}",
                        self.ports.start(),
                        self.ports.end()
                    ))
                })?;
            let a = std::net::SocketAddr::new(ip, port);
            used.insert(a);
            out.push(a);
        }
        Ok(Some(out))
    }

    async fn test_delay(&self) {
        if !self.hooks.delay.is_zero() {
            tokio::time::sleep(self.hooks.delay).await;
        }
    }

    fn existing(&self, id: &str) -> Result<VolumeRecord> {
        self.store
            .get(id)?
            .ok_or_else(|| Error::NotFound(format!("volume {id} does not exist")))
    }

    async fn create(&self, req: csi::CreateVolumeRequest) -> Result<csi::Volume> {
        let name = required("name", &req.name)?;
        let caps = Capability::parse_all(&req.volume_capabilities)?;
        let params = VolumeParams::parse(&req.parameters)?;
        if req.volume_content_source.is_some() {
            return Err(Error::InvalidArgument(
                "volume_content_source: snapshots and clones are not supported".into(),
            ));
        }
        let size = size_for(req.capacity_range.as_ref())?;
        let (id, uuid) = volume_id(name);
        let _guard = self.inflight.begin(&id, "CreateVolume")?;
        self.test_delay().await;
        let _alloc = self.alloc.lock().await;

        if let Some(mut rec) = self.store.get(&id)? {
            if rec.name != name {
                return Err(Error::Internal(format!(
                    "volume id {id} belongs to name {:?}, not {name:?}",
                    rec.name
                )));
            }
            if rec.state == VolumeState::Deleting {
                return Err(Error::Aborted(format!(
                    "volume {name:?} ({id}) is being deleted; retry"
                )));
            }
            if rec.params != params {
                return Err(Error::AlreadyExists(format!(
                    "volume {name:?} exists with other parameters ({:?})",
                    rec.params
                )));
            }
            if !size_fits(rec.size, req.capacity_range.as_ref()) {
                return Err(Error::AlreadyExists(format!(
                    "volume {name:?} exists with {} bytes, outside the requested capacity range",
                    rec.size
                )));
            }
            if rec.state == VolumeState::Creating {
                tracing::info!(volume = %id, "resuming a CreateVolume interrupted after persisting its record");
                self.finish_create(&mut rec)?;
            }
            return Ok(to_volume(&rec));
        }

        let (requisite, preferred): (Vec<Segment>, Vec<Segment>) = req
            .accessibility_requirements
            .as_ref()
            .map(|t| {
                (
                    t.requisite.iter().map(segment_of).collect(),
                    t.preferred.iter().map(segment_of).collect(),
                )
            })
            .unwrap_or_default();
        let records = self.store.list()?;
        let nodes = self.inventory.candidates(&records);
        let preq = placement::Request {
            replicas: params.replicas as usize,
            size,
            spread_key: &params.topology_key,
            requisite: &requisite,
            preferred: &preferred,
        };
        let chosen = placement::place(&nodes, &preq).ok_or_else(|| {
            Error::ResourceExhausted(format!(
                "no placement for {} replicas of {size} bytes in distinct {:?} values{}; nodes: {}",
                params.replicas,
                params.topology_key,
                if requisite.is_empty() {
                    String::new()
                } else {
                    format!(" within {} requisite topologies", requisite.len())
                },
                describe_nodes(&nodes, &params.topology_key)
            ))
        })?;
        let witness = if params.witness {
            Some(
                placement::place_witness(&nodes, &chosen, &preq)
                    .ok_or_else(|| {
                        Error::ResourceExhausted(format!(
                            "witness requested but no node has a {:?} value different from the replicas'",
                            params.topology_key
                        ))
                    })?
                    .name
                    .clone(),
            )
        } else {
            None
        };
        // Replicas first, then the witness: it listens on its node too.
        let mut names: Vec<&str> = chosen.iter().map(|n| n.name.as_str()).collect();
        names.extend(witness.as_deref());
        let mut addresses = self.replication_addresses(&names, &records)?;
        let witness_address = match (&witness, addresses.as_mut()) {
            (Some(_), Some(a)) => a.pop(),
            _ => None,
        };
        let allow_two_primaries = params.protocol == crate::params::Protocol::C
            && caps
                .iter()
                .any(|c| c.multi_node && c.access == Access::Block && !c.read_only);
        let mut rec = VolumeRecord {
            version: RECORD_VERSION,
            id: id.clone(),
            name: name.to_string(),
            uuid,
            size,
            replicas: chosen
                .iter()
                .enumerate()
                .map(|(i, n)| Replica {
                    node: n.name.clone(),
                    zone: n
                        .segment_value(&params.topology_key)
                        .unwrap_or_default()
                        .to_string(),
                    address: addresses.as_ref().map(|a| a[i]),
                })
                .collect(),
            params,
            witness,
            state: VolumeState::Creating,
            attachments: Vec::new(),
            initialized_on: None,
            allow_two_primaries,
            witness_address,
            clients: Vec::new(),
        };
        self.store.put(&rec)?;
        if self.hooks.crash_after_creating {
            tracing::warn!(volume = %id, "TANDEM_CSI_TEST_CRASH_AFTER_CREATING: exiting");
            std::process::exit(86);
        }
        self.finish_create(&mut rec)?;
        tracing::info!(volume = %id, name, size, replicas = ?rec.replicas, "volume created");
        Ok(to_volume(&rec))
    }

    /// The acting part of CreateVolume, resumable: in this version the
    /// replicas are realised by the node plugin at stage time, so this only
    /// marks the record Ready.
    fn finish_create(&self, rec: &mut VolumeRecord) -> Result<()> {
        rec.state = VolumeState::Ready;
        self.store.put(rec)
    }

    async fn delete(&self, req: csi::DeleteVolumeRequest) -> Result<()> {
        let id = required("volume_id", &req.volume_id)?;
        let _guard = self.inflight.begin(id, "DeleteVolume")?;
        self.test_delay().await;
        let Some(mut rec) = self.store.get(id)? else {
            return Ok(());
        };
        if !rec.attachments.is_empty() {
            return Err(Error::FailedPrecondition(format!(
                "volume {id} is still published to {}",
                rec.attachments
                    .iter()
                    .map(|a| a.node.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        if rec.state != VolumeState::Deleting {
            rec.state = VolumeState::Deleting;
            self.store.put(&rec)?;
        }
        self.store.delete(id)?;
        tracing::info!(volume = %id, "volume deleted");
        Ok(())
    }

    async fn publish(
        &self,
        req: csi::ControllerPublishVolumeRequest,
    ) -> Result<HashMap<String, String>> {
        let id = required("volume_id", &req.volume_id)?;
        let node = required("node_id", &req.node_id)?;
        let cap = Capability::parse(
            req.volume_capability
                .as_ref()
                .ok_or_else(|| Error::InvalidArgument("volume_capability is required".into()))?,
        )?;
        let _guard = self.inflight.begin(id, "ControllerPublishVolume")?;
        self.test_delay().await;
        let mut rec = self.existing(id)?;
        if self.inventory.node(node).is_none() {
            return Err(Error::NotFound(format!(
                "node {node:?} is not a Tandem node"
            )));
        }
        if let Some(a) = rec.attachments.iter().find(|a| a.node == node) {
            if a.readonly != req.readonly || a.multi_node != cap.multi_node {
                return Err(Error::AlreadyExists(format!(
                    "volume {id} is already published to {node} with readonly={} multi_node={}",
                    a.readonly, a.multi_node
                )));
            }
            return Ok(publish_context(&rec, node));
        }
        let replica_nodes = || {
            rec.replicas
                .iter()
                .map(|r| r.node.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        };
        let remote = !rec.replicas.iter().any(|r| r.node == node);
        if remote {
            // Remote attach: the node uses the volume through the replicas
            // as a diskless client (R28), the only user of the volume.
            if !rec.replicated() {
                return Err(Error::FailedPrecondition(format!(
                    "node {node} holds no replica of volume {id} (replicas: {}), and the volume \
                     is not replicated by the driver (a replica node has no address in the \
                     inventory), so it cannot be attached remotely",
                    replica_nodes()
                )));
            }
            if self.inventory.node(node).and_then(|n| n.address).is_none() {
                return Err(Error::FailedPrecondition(format!(
                    "node {node} holds no replica of volume {id} (replicas: {}) and has no \
                     address in the inventory, which attaching it remotely needs",
                    replica_nodes()
                )));
            }
            if let Some(other) = rec.attachments.first() {
                return Err(Error::FailedPrecondition(format!(
                    "volume {id} is published to node {}; node {node} holds no replica and \
                     attaches remotely only while the volume is attached nowhere else (a live \
                     migration needs a replica on both nodes: {})",
                    other.node,
                    replica_nodes()
                )));
            }
            if rec.replicas.len() + rec.clients.len() >= MAX_MEMBERS {
                return Err(Error::ResourceExhausted(format!(
                    "volume {id} has {} replicas and {} remote attachments; a volume has at most \
                     {MAX_MEMBERS} members",
                    rec.replicas.len(),
                    rec.clients.len()
                )));
            }
        } else if let Some(c) = rec.clients.first() {
            return Err(Error::FailedPrecondition(format!(
                "volume {id} is attached remotely to node {} (which holds no replica); a \
                 second attachment is refused until it detaches",
                c.node
            )));
        }
        match rec.attachments.as_slice() {
            [] => {}
            [other] if cap.multi_node && other.multi_node && !req.readonly && !other.readonly => {
                if rec.params.protocol != crate::params::Protocol::C {
                    return Err(Error::FailedPrecondition(format!(
                        "volume {id} uses protocol A; dual-primary needs protocol C"
                    )));
                }
                if rec.replicated() && !rec.allow_two_primaries {
                    return Err(Error::FailedPrecondition(format!(
                        "volume {id} was not created for MULTI_NODE_MULTI_WRITER block access, \
                         so its replicas do not allow two primaries"
                    )));
                }
                tracing::info!(volume = %id, source = %other.node, target = node, "second attachment: dual-primary");
            }
            [other] => {
                return Err(Error::FailedPrecondition(format!(
                    "volume {id} is published to node {} and not as a MULTI_NODE_MULTI_WRITER \
                     block volume on both",
                    other.node
                )))
            }
            _ => {
                return Err(Error::FailedPrecondition(format!(
                "volume {id} is already published to two nodes (dual-primary allows exactly two)"
            )))
            }
        }
        let _alloc;
        if remote {
            // Persisted with the attachment: the replicas' agents add the
            // client as a peer, the client node's agent starts its tandemd.
            _alloc = self.alloc.lock().await;
            let records = self.store.list()?;
            let address = self
                .replication_addresses(&[node], &records)?
                .and_then(|a| a.first().copied())
                .ok_or_else(|| {
                    Error::FailedPrecondition(format!("node {node} has no inventory address"))
                })?;
            rec.clients.push(Client {
                node: node.to_string(),
                address,
            });
            tracing::info!(volume = %id, node, %address, "remote attach: diskless client");
        }
        rec.attachments.push(Attachment {
            node: node.to_string(),
            readonly: req.readonly,
            multi_node: cap.multi_node,
        });
        if rec.initialized_on.is_none() {
            rec.initialized_on = Some(node.to_string());
        }
        self.store.put(&rec)?;
        Ok(publish_context(&rec, node))
    }

    async fn unpublish(&self, req: csi::ControllerUnpublishVolumeRequest) -> Result<()> {
        let id = required("volume_id", &req.volume_id)?;
        let _guard = self.inflight.begin(id, "ControllerUnpublishVolume")?;
        self.test_delay().await;
        let Some(mut rec) = self.store.get(id)? else {
            return Ok(());
        };
        let before = (rec.attachments.len(), rec.clients.len());
        if req.node_id.is_empty() {
            rec.attachments.clear();
            rec.clients.clear();
        } else {
            rec.attachments.retain(|a| a.node != req.node_id);
            rec.clients.retain(|c| c.node != req.node_id);
        }
        if (rec.attachments.len(), rec.clients.len()) != before {
            self.store.put(&rec)?;
            if let [remaining] = rec.attachments.as_slice() {
                tracing::info!(volume = %id, primary = %remaining.node, "back to a single primary");
            }
        }
        Ok(())
    }

    fn validate(
        &self,
        req: csi::ValidateVolumeCapabilitiesRequest,
    ) -> Result<csi::ValidateVolumeCapabilitiesResponse> {
        let id = required("volume_id", &req.volume_id)?;
        if req.volume_capabilities.is_empty() {
            return Err(Error::InvalidArgument(
                "volume_capabilities is required".into(),
            ));
        }
        let rec = self.existing(id)?;
        let unconfirmed = |message: String| csi::ValidateVolumeCapabilitiesResponse {
            confirmed: None,
            message,
        };
        for c in &req.volume_capabilities {
            if let Err(e) = Capability::parse(c) {
                return Ok(unconfirmed(e.to_string()));
            }
        }
        if !req.parameters.is_empty() {
            match VolumeParams::parse(&req.parameters) {
                Ok(p) if p == rec.params => {}
                Ok(_) => {
                    return Ok(unconfirmed(
                        "parameters differ from the volume's".to_string(),
                    ))
                }
                Err(e) => return Ok(unconfirmed(e.to_string())),
            }
        }
        Ok(csi::ValidateVolumeCapabilitiesResponse {
            confirmed: Some(csi::validate_volume_capabilities_response::Confirmed {
                volume_context: req.volume_context,
                volume_capabilities: req.volume_capabilities,
                parameters: req.parameters,
                mutable_parameters: HashMap::new(),
            }),
            message: String::new(),
        })
    }

    fn list(&self, req: csi::ListVolumesRequest) -> Result<csi::ListVolumesResponse> {
        if req.max_entries < 0 {
            return Err(Error::InvalidArgument(format!(
                "max_entries {} is negative",
                req.max_entries
            )));
        }
        let records = self.store.list()?;
        let start = if req.starting_token.is_empty() {
            0
        } else {
            // The token is the last id returned (records are sorted by id):
            // a volume id of this driver, `tdm-<uuid>`, whether or not that
            // volume still exists (it may be deleted between pages).
            if !is_volume_id(&req.starting_token) {
                return Err(Error::Aborted(format!(
                    "starting_token {:?} is not a token this driver returned",
                    req.starting_token
                )));
            }
            records.partition_point(|r| r.id.as_str() <= req.starting_token.as_str())
        };
        let max = if req.max_entries == 0 {
            usize::MAX
        } else {
            req.max_entries as usize
        };
        let page: Vec<&VolumeRecord> = records.iter().skip(start).take(max).collect();
        let next_token = if start + page.len() < records.len() {
            page.last().map(|r| r.id.clone()).unwrap_or_default()
        } else {
            String::new()
        };
        Ok(csi::ListVolumesResponse {
            entries: page
                .iter()
                .map(|r| csi::list_volumes_response::Entry {
                    volume: Some(to_volume(r)),
                    status: Some(csi::list_volumes_response::VolumeStatus {
                        published_node_ids: r.attachments.iter().map(|a| a.node.clone()).collect(),
                        volume_condition: None,
                    }),
                })
                .collect(),
            next_token,
        })
    }

    fn capacity(&self, req: csi::GetCapacityRequest) -> Result<csi::GetCapacityResponse> {
        for c in &req.volume_capabilities {
            Capability::parse(c)?;
        }
        let params = VolumeParams::parse(&req.parameters)?;
        let accessible: Option<Segment> = req.accessible_topology.as_ref().map(segment_of);
        let nodes = self.inventory.candidates(&self.store.list()?);
        let max = placement::max_volume_size(
            &nodes,
            &placement::Request {
                replicas: params.replicas as usize,
                size: 0,
                spread_key: &params.topology_key,
                requisite: &[],
                preferred: &[],
            },
            accessible.as_ref(),
        );
        let max = (max / SIZE_ALIGN * SIZE_ALIGN).min(i64::MAX as u64) as i64;
        Ok(csi::GetCapacityResponse {
            available_capacity: max,
            maximum_volume_size: Some(max),
            minimum_volume_size: Some(SIZE_ALIGN as i64),
        })
    }

    async fn expand(
        &self,
        req: csi::ControllerExpandVolumeRequest,
    ) -> Result<csi::ControllerExpandVolumeResponse> {
        let id = required("volume_id", &req.volume_id)?;
        let range = req
            .capacity_range
            .as_ref()
            .ok_or_else(|| Error::InvalidArgument("capacity_range is required".into()))?;
        let new_size = size_for(Some(range))?;
        if let Some(c) = &req.volume_capability {
            Capability::parse(c)?;
        }
        let _guard = self.inflight.begin(id, "ControllerExpandVolume")?;
        self.test_delay().await;
        let _alloc = self.alloc.lock().await;
        let mut rec = self.existing(id)?;
        if new_size > rec.size {
            // Published or not: a published volume grows online when the
            // CO calls NodeExpandVolume on its node (R29 grows every
            // replica from the Primary); an unpublished one when it is
            // next staged (and its replica agents grow it meanwhile).
            let grow = new_size - rec.size;
            let nodes = self.inventory.candidates(&self.store.list()?);
            for r in &rec.replicas {
                let free = nodes
                    .iter()
                    .find(|n| n.name == r.node)
                    .map_or(0, |n| n.free_bytes);
                if free < grow {
                    return Err(Error::ResourceExhausted(format!(
                        "cannot grow volume {id} by {grow} bytes: node {} has {free} bytes free",
                        r.node
                    )));
                }
            }
            rec.size = new_size;
            self.store.put(&rec)?;
            tracing::info!(volume = %id, size = new_size, "volume expanded");
        }
        Ok(csi::ControllerExpandVolumeResponse {
            capacity_bytes: rec.size as i64,
            // The node grows the device (and the filesystem): the staged
            // one online, or checks it at the next stage.
            node_expansion_required: true,
        })
    }
}

fn describe_nodes(nodes: &[placement::Node], key: &str) -> String {
    if nodes.is_empty() {
        return "none configured".into();
    }
    nodes
        .iter()
        .map(|n| {
            format!(
                "{} ({}={}, {} bytes free)",
                n.name,
                key,
                n.segment_value(key).unwrap_or("<unset>"),
                n.free_bytes
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn rpc(t: RpcType) -> csi::ControllerServiceCapability {
    csi::ControllerServiceCapability {
        r#type: Some(CapType::Rpc(Rpc { r#type: t as i32 })),
    }
}

/// Logs an error where it is handled (here: turned into a gRPC status).
/// `tonic::Status` is large, but the trait's signatures fix it.
#[allow(clippy::result_large_err)]
pub(crate) fn reply<T>(op: &str, r: Result<T>) -> std::result::Result<Response<T>, Status> {
    match r {
        Ok(v) => Ok(Response::new(v)),
        Err(e) => {
            tracing::warn!(op, code = ?e.code(), "{e}");
            Err(e.into())
        }
    }
}

#[tonic::async_trait]
impl Controller for ControllerService {
    async fn create_volume(
        &self,
        request: Request<csi::CreateVolumeRequest>,
    ) -> std::result::Result<Response<csi::CreateVolumeResponse>, Status> {
        let r = self.create(request.into_inner()).await;
        reply(
            "CreateVolume",
            r.map(|v| csi::CreateVolumeResponse { volume: Some(v) }),
        )
    }

    async fn delete_volume(
        &self,
        request: Request<csi::DeleteVolumeRequest>,
    ) -> std::result::Result<Response<csi::DeleteVolumeResponse>, Status> {
        let r = self.delete(request.into_inner()).await;
        reply("DeleteVolume", r.map(|()| csi::DeleteVolumeResponse {}))
    }

    async fn controller_publish_volume(
        &self,
        request: Request<csi::ControllerPublishVolumeRequest>,
    ) -> std::result::Result<Response<csi::ControllerPublishVolumeResponse>, Status> {
        let r = self.publish(request.into_inner()).await;
        reply(
            "ControllerPublishVolume",
            r.map(|publish_context| csi::ControllerPublishVolumeResponse { publish_context }),
        )
    }

    async fn controller_unpublish_volume(
        &self,
        request: Request<csi::ControllerUnpublishVolumeRequest>,
    ) -> std::result::Result<Response<csi::ControllerUnpublishVolumeResponse>, Status> {
        let r = self.unpublish(request.into_inner()).await;
        reply(
            "ControllerUnpublishVolume",
            r.map(|()| csi::ControllerUnpublishVolumeResponse {}),
        )
    }

    async fn validate_volume_capabilities(
        &self,
        request: Request<csi::ValidateVolumeCapabilitiesRequest>,
    ) -> std::result::Result<Response<csi::ValidateVolumeCapabilitiesResponse>, Status> {
        reply(
            "ValidateVolumeCapabilities",
            self.validate(request.into_inner()),
        )
    }

    async fn list_volumes(
        &self,
        request: Request<csi::ListVolumesRequest>,
    ) -> std::result::Result<Response<csi::ListVolumesResponse>, Status> {
        reply("ListVolumes", self.list(request.into_inner()))
    }

    async fn get_capacity(
        &self,
        request: Request<csi::GetCapacityRequest>,
    ) -> std::result::Result<Response<csi::GetCapacityResponse>, Status> {
        reply("GetCapacity", self.capacity(request.into_inner()))
    }

    async fn controller_get_capabilities(
        &self,
        _request: Request<csi::ControllerGetCapabilitiesRequest>,
    ) -> std::result::Result<Response<csi::ControllerGetCapabilitiesResponse>, Status> {
        Ok(Response::new(csi::ControllerGetCapabilitiesResponse {
            capabilities: [
                RpcType::CreateDeleteVolume,
                RpcType::PublishUnpublishVolume,
                RpcType::ListVolumes,
                RpcType::ListVolumesPublishedNodes,
                RpcType::GetCapacity,
                RpcType::ExpandVolume,
                RpcType::PublishReadonly,
            ]
            .into_iter()
            .map(rpc)
            .collect(),
        }))
    }

    async fn create_snapshot(
        &self,
        _request: Request<csi::CreateSnapshotRequest>,
    ) -> std::result::Result<Response<csi::CreateSnapshotResponse>, Status> {
        Err(Status::unimplemented("snapshots are not supported"))
    }

    async fn delete_snapshot(
        &self,
        _request: Request<csi::DeleteSnapshotRequest>,
    ) -> std::result::Result<Response<csi::DeleteSnapshotResponse>, Status> {
        Err(Status::unimplemented("snapshots are not supported"))
    }

    async fn list_snapshots(
        &self,
        _request: Request<csi::ListSnapshotsRequest>,
    ) -> std::result::Result<Response<csi::ListSnapshotsResponse>, Status> {
        Err(Status::unimplemented("snapshots are not supported"))
    }

    async fn controller_expand_volume(
        &self,
        request: Request<csi::ControllerExpandVolumeRequest>,
    ) -> std::result::Result<Response<csi::ControllerExpandVolumeResponse>, Status> {
        let r = self.expand(request.into_inner()).await;
        reply("ControllerExpandVolume", r)
    }

    async fn controller_get_volume(
        &self,
        _request: Request<csi::ControllerGetVolumeRequest>,
    ) -> std::result::Result<Response<csi::ControllerGetVolumeResponse>, Status> {
        Err(Status::unimplemented(
            "ControllerGetVolume is not supported",
        ))
    }

    async fn controller_modify_volume(
        &self,
        _request: Request<csi::ControllerModifyVolumeRequest>,
    ) -> std::result::Result<Response<csi::ControllerModifyVolumeResponse>, Status> {
        Err(Status::unimplemented(
            "ControllerModifyVolume is not supported",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Volume ids are derived from names; changing the derivation would make
    /// an upgraded controller create a second volume for a retried name.
    #[test]
    fn volume_ids_are_stable() {
        let (id, uuid) = volume_id("pvc-1");
        assert_eq!(id, format!("tdm-{uuid}"));
        assert_eq!(id, PINNED_PVC_1);
        assert_ne!(volume_id("pvc-2").0, id);
        assert!(crate::store::valid_id(&id));
        assert!(is_volume_id(&id));
        for bad in [
            "invalid-token",
            "tdm-",
            "tdm-xyz",
            "TDM-0b7cd4f2-2572-5839-986f-c27b333b2c6b",
        ] {
            assert!(!is_volume_id(bad), "{bad}");
        }
    }

    const PINNED_PVC_1: &str = "tdm-0b7cd4f2-2572-5839-986f-c27b333b2c6b";
}
