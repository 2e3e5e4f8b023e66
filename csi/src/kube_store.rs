//! Volume records as Kubernetes custom resources: one cluster-scoped
//! `TandemVolume` (`tandem.io/v1alpha1`, `deploy/crds.yaml`) per volume.
//!
//! The record's immutable-ish part lives in `spec` (name, uuid, size,
//! params, replicas and their replication addresses, witness), its
//! lifecycle in `status` (state, attachments, `initialized_on`), written
//! through the `status` subresource. A `TandemVolume` without a status is
//! a record persisted as `Creating` whose status write did not happen yet
//! (a crash between the two writes): it reads back as `Creating`, and the
//! controller's retry resumes it.
//!
//! Writes are optimistic: every replace carries the `resourceVersion` this
//! store last read (or wrote) for the object, and a create is refused when
//! the object exists. A lost race is [`Error::Aborted`] ("retry"), which
//! the CSI sidecars retry; the retry reads the object again first.
//!
//! The [`VolumeStore`] trait is synchronous and is called from async gRPC
//! handlers and the agent loop. The kube client therefore runs on its own
//! single-threaded tokio runtime on a dedicated thread; a call sends the
//! request there and waits for the answer (inside a multi-threaded runtime
//! via `block_in_place`, so the caller's runtime moves its other tasks
//! away). Nothing calls `block_on` inside the caller's runtime, and each
//! call is bounded by [`CALL_TIMEOUT`].

use std::borrow::Cow;
use std::collections::HashMap;
use std::future::Future;
use std::sync::{mpsc, Mutex};
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, DeleteParams, ListParams, PostParams, Preconditions};
use kube::core::ClusterResourceScope;
use kube::Resource;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::params::VolumeParams;
use crate::store::{
    Attachment, Client, Replica, VolumeRecord, VolumeState, VolumeStore, RECORD_VERSION,
};

/// The custom resource's API group.
pub const GROUP: &str = "tandem.io";
/// The custom resource's version this build reads and writes.
pub const VERSION: &str = "v1alpha1";
/// `GROUP/VERSION`.
pub const API_VERSION: &str = "tandem.io/v1alpha1";
/// The custom resource's kind.
pub const KIND: &str = "TandemVolume";
/// The custom resource's plural (its URL path segment).
pub const PLURAL: &str = "tandemvolumes";
/// The field manager the store's writes are recorded under.
pub const FIELD_MANAGER: &str = "tandem-csi";
/// Longest a single API call may take before the store reports an error.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// A `TandemVolume` object as the API server stores it. `spec` and
/// `status` are kept as JSON so that an object this build cannot read
/// (a newer record version, a corrupt field) is still listed and reported
/// by name with a clear error, instead of failing the whole response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TandemVolume {
    /// `tandem.io/v1alpha1`.
    #[serde(rename = "apiVersion")]
    pub api_version: String,
    /// `TandemVolume`.
    pub kind: String,
    /// Name (the CSI volume id), resourceVersion, ...
    pub metadata: ObjectMeta,
    /// [`VolumeSpec`] as JSON.
    pub spec: serde_json::Value,
    /// [`VolumeStatus`] as JSON; absent until the first status write.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<serde_json::Value>,
}

impl Resource for TandemVolume {
    type DynamicType = ();
    type Scope = ClusterResourceScope;

    fn kind(_: &()) -> Cow<'_, str> {
        KIND.into()
    }
    fn group(_: &()) -> Cow<'_, str> {
        GROUP.into()
    }
    fn version(_: &()) -> Cow<'_, str> {
        VERSION.into()
    }
    fn plural(_: &()) -> Cow<'_, str> {
        PLURAL.into()
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// `.spec` of a `TandemVolume` (field names as in `deploy/crds.yaml`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeSpec {
    /// Record format version ([`RECORD_VERSION`]).
    pub version: u32,
    /// CSI name the CO chose.
    pub name: String,
    /// Volume UUID.
    pub uuid: uuid::Uuid,
    /// Size in bytes.
    pub size: u64,
    /// StorageClass parameters.
    pub params: VolumeParams,
    /// Replicas in placement order.
    pub replicas: Vec<Replica>,
    /// The replicas allow two Primaries.
    #[serde(default)]
    pub allow_two_primaries: bool,
    /// Node of the witness.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub witness: Option<String>,
    /// Where the witness listens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub witness_address: Option<std::net::SocketAddr>,
}

/// `.status` of a `TandemVolume`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeStatus {
    /// Lifecycle state.
    pub state: VolumeState,
    /// Nodes the volume is published to.
    #[serde(default)]
    pub attachments: Vec<Attachment>,
    /// The node the volume was first published to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initialized_on: Option<String>,
    /// Published nodes without a replica (diskless clients) and their
    /// replication addresses.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub clients: Vec<Client>,
}

/// Whether `name` is a valid Kubernetes object name (DNS-1123 subdomain).
pub fn valid_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 253
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-' || *c == b'.')
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
}

/// The custom resource for `rec` (no resourceVersion).
pub fn to_resource(rec: &VolumeRecord) -> Result<TandemVolume> {
    if !valid_name(&rec.id) {
        return Err(Error::Internal(format!(
            "volume id {:?} is not a valid Kubernetes object name",
            rec.id
        )));
    }
    let spec = VolumeSpec {
        version: rec.version,
        name: rec.name.clone(),
        uuid: rec.uuid,
        size: rec.size,
        params: rec.params.clone(),
        replicas: rec.replicas.clone(),
        allow_two_primaries: rec.allow_two_primaries,
        witness: rec.witness.clone(),
        witness_address: rec.witness_address,
    };
    let status = VolumeStatus {
        state: rec.state,
        attachments: rec.attachments.clone(),
        initialized_on: rec.initialized_on.clone(),
        clients: rec.clients.clone(),
    };
    let enc = |e| Error::internal(format!("encoding TandemVolume {}", rec.id), e);
    Ok(TandemVolume {
        api_version: API_VERSION.into(),
        kind: KIND.into(),
        metadata: ObjectMeta {
            name: Some(rec.id.clone()),
            ..ObjectMeta::default()
        },
        spec: serde_json::to_value(spec).map_err(enc)?,
        status: Some(serde_json::to_value(status).map_err(enc)?),
    })
}

/// The record a custom resource holds. Refuses, naming the object, other
/// API versions and kinds, record versions newer than this build's, and
/// specs or statuses that do not decode.
pub fn from_resource(tv: &TandemVolume) -> Result<VolumeRecord> {
    let id = tv.metadata.name.clone().unwrap_or_default();
    let what = format!("TandemVolume {id:?}");
    if tv.api_version != API_VERSION || tv.kind != KIND {
        return Err(Error::Internal(format!(
            "{what}: is {} {}, this driver reads {API_VERSION} {KIND}",
            tv.api_version, tv.kind
        )));
    }
    if id.is_empty() {
        return Err(Error::Internal("TandemVolume without metadata.name".into()));
    }
    let version = tv.spec.get("version").and_then(|v| v.as_u64());
    match version {
        Some(v) if v > u64::from(RECORD_VERSION) => {
            return Err(Error::Internal(format!(
                "{what}: record version {v} is newer than this driver's {RECORD_VERSION}"
            )))
        }
        Some(0) | None => {
            return Err(Error::Internal(format!(
                "{what}: spec.version is missing or not a positive integer"
            )))
        }
        Some(_) => {}
    }
    let spec: VolumeSpec = serde_json::from_value(tv.spec.clone())
        .map_err(|e| Error::internal(format!("{what}: corrupt spec"), e))?;
    let status: Option<VolumeStatus> = match &tv.status {
        None => None,
        Some(s) if s.as_object().is_some_and(|o| o.is_empty()) => None,
        Some(s) => Some(
            serde_json::from_value(s.clone())
                .map_err(|e| Error::internal(format!("{what}: corrupt status"), e))?,
        ),
    };
    // No status yet: created, status write not done: Creating.
    let status = status.unwrap_or(VolumeStatus {
        state: VolumeState::Creating,
        attachments: Vec::new(),
        initialized_on: None,
        clients: Vec::new(),
    });
    Ok(VolumeRecord {
        version: spec.version,
        id,
        name: spec.name,
        uuid: spec.uuid,
        size: spec.size,
        params: spec.params,
        replicas: spec.replicas,
        witness: spec.witness,
        state: status.state,
        attachments: status.attachments,
        initialized_on: status.initialized_on,
        allow_two_primaries: spec.allow_two_primaries,
        witness_address: spec.witness_address,
        clients: status.clients,
    })
}

/// The Kubernetes store. See the module documentation.
pub struct KubeStore {
    api: Api<TandemVolume>,
    rt: tokio::runtime::Handle,
    /// The object as last read or written, per name: writes are
    /// conditional on its resourceVersion.
    seen: Mutex<HashMap<String, TandemVolume>>,
    /// Dropping it stops the client thread.
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl std::fmt::Debug for KubeStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeStore").finish_non_exhaustive()
    }
}

enum CallError {
    Kube(kube::Error),
    Timeout,
}

impl KubeStore {
    /// Connects with the in-cluster configuration (service account) or,
    /// outside a cluster, `KUBECONFIG` / `~/.kube/config`.
    pub fn connect() -> Result<KubeStore> {
        Self::start(|| async {
            kube::Config::infer()
                .await
                .map_err(|e| Error::internal("kubernetes store: no cluster configuration", e))
        })
    }

    /// Connects with an explicit client configuration.
    pub fn with_config(config: kube::Config) -> Result<KubeStore> {
        Self::start(move || async move { Ok(config) })
    }

    fn start<F, Fut>(config: F) -> Result<KubeStore>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Result<kube::Config>>,
    {
        let (ready_tx, ready_rx) = mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        std::thread::Builder::new()
            .name("tandem-kube-store".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready_tx.send(Err(Error::internal(
                            "kubernetes store: starting its runtime",
                            e,
                        )));
                        return;
                    }
                };
                let client = rt.block_on(async {
                    let mut cfg = config().await?;
                    cfg.connect_timeout.get_or_insert(Duration::from_secs(10));
                    cfg.read_timeout.get_or_insert(CALL_TIMEOUT);
                    cfg.write_timeout.get_or_insert(CALL_TIMEOUT);
                    kube::Client::try_from(cfg)
                        .map_err(|e| Error::internal("kubernetes store: creating the client", e))
                });
                let client = match client {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok((rt.handle().clone(), client)));
                // Serve calls until the store is dropped.
                let _ = rt.block_on(stop_rx);
            })
            .map_err(|e| Error::internal("kubernetes store: starting its thread", e))?;
        let (rt, client) = ready_rx.recv().map_err(|_| {
            Error::Internal("kubernetes store: its thread stopped while starting".into())
        })??;
        Ok(KubeStore {
            api: Api::all(client),
            rt,
            seen: Mutex::new(HashMap::new()),
            _stop: stop_tx,
        })
    }

    /// Runs `f(api)` on the client runtime and waits for its result.
    fn call<T, F, Fut>(&self, f: F) -> Result<std::result::Result<T, CallError>>
    where
        T: Send + 'static,
        F: FnOnce(Api<TandemVolume>) -> Fut,
        Fut: Future<Output = kube::Result<T>> + Send + 'static,
    {
        let (tx, rx) = mpsc::channel();
        let fut = f(self.api.clone());
        self.rt.spawn(async move {
            let r = match tokio::time::timeout(CALL_TIMEOUT, fut).await {
                Ok(r) => r.map_err(CallError::Kube),
                Err(_) => Err(CallError::Timeout),
            };
            let _ = tx.send(r);
        });
        let wait = move || rx.recv();
        let r = match tokio::runtime::Handle::try_current() {
            Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(wait)
            }
            _ => wait(),
        };
        r.map_err(|_| Error::Internal("kubernetes store: its client thread stopped".into()))
    }

    fn seen(&self) -> std::sync::MutexGuard<'_, HashMap<String, TandemVolume>> {
        // The map is a cache: a panic elsewhere cannot leave it inconsistent.
        self.seen.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn remember(&self, tv: &TandemVolume) {
        if let Some(name) = &tv.metadata.name {
            self.seen().insert(name.clone(), tv.clone());
        }
    }

    /// `put`: create, or replace spec and/or status, conditionally.
    fn write(&self, record: &VolumeRecord) -> Result<()> {
        let id = record.id.as_str();
        let want = to_resource(record)?;
        let seen = self.seen().get(id).cloned();
        let pp = PostParams {
            field_manager: Some(FIELD_MANAGER.into()),
            ..PostParams::default()
        };
        let mut cur = match seen {
            None => {
                // Not read by this store: it must not exist yet.
                let obj = want.clone();
                let pp = pp.clone();
                self.call(|api| async move { api.create(&pp, &obj).await })?
                    .map_err(|e| call_error("create", id, e))?
            }
            Some(mut seen) if seen.spec != want.spec => {
                seen.spec = want.spec.clone();
                let name = id.to_string();
                let pp = pp.clone();
                self.call(|api| async move { api.replace(&name, &pp, &seen).await })?
                    .map_err(|e| call_error("replace", id, e))?
            }
            Some(seen) => seen,
        };
        // Whatever the status in `cur`, it is the server's: the status
        // subresource ignores it on create and replace.
        if cur.status != want.status {
            cur.status = want.status.clone();
            let body = serde_json::to_vec(&cur)
                .map_err(|e| Error::internal(format!("encoding TandemVolume {id}"), e))?;
            let name = id.to_string();
            let res = self.call(|api| async move { api.replace_status(&name, &pp, body).await })?;
            cur = res.map_err(|e| call_error("write status of", id, e))?;
        }
        self.remember(&cur);
        Ok(())
    }
}

/// The store error for a failed call `op` on volume `id`.
fn call_error(op: &str, id: &str, e: CallError) -> Error {
    match e {
        CallError::Kube(kube::Error::Api(r)) if r.code == 409 => Error::Aborted(format!(
            "volume {id}: {op} TandemVolume: changed concurrently ({}: {}); retry",
            r.reason, r.message
        )),
        CallError::Kube(e) => {
            Error::internal(format!("kubernetes store: {op} TandemVolume {id}"), e)
        }
        CallError::Timeout => Error::Internal(format!(
            "kubernetes store: {op} TandemVolume {id}: no answer within {CALL_TIMEOUT:?}"
        )),
    }
}

impl VolumeStore for KubeStore {
    fn get(&self, id: &str) -> Result<Option<VolumeRecord>> {
        if !valid_name(id) {
            return Ok(None);
        }
        let name = id.to_string();
        let got = self
            .call(|api| async move { api.get_opt(&name).await })?
            .map_err(|e| call_error("get", id, e))?;
        match got {
            Some(tv) => {
                let rec = from_resource(&tv)?;
                self.remember(&tv);
                Ok(Some(rec))
            }
            None => {
                self.seen().remove(id);
                Ok(None)
            }
        }
    }

    fn put(&self, record: &VolumeRecord) -> Result<()> {
        let r = self.write(record);
        if r.is_err() {
            // Whatever happened, the next write must read the object first.
            self.seen().remove(&record.id);
        }
        r
    }

    fn delete(&self, id: &str) -> Result<()> {
        if !valid_name(id) {
            return Err(Error::NotFound(format!("volume {id:?} does not exist")));
        }
        let rv = self
            .seen()
            .get(id)
            .and_then(|tv| tv.metadata.resource_version.clone());
        let dp = DeleteParams {
            preconditions: rv.map(|rv| Preconditions {
                resource_version: Some(rv),
                uid: None,
            }),
            ..DeleteParams::default()
        };
        let name = id.to_string();
        let res = self.call(|api| async move { api.delete(&name, &dp).await.map(|_| ()) })?;
        match res {
            Ok(()) => {}
            Err(CallError::Kube(kube::Error::Api(r))) if r.code == 404 => {}
            Err(e) => {
                self.seen().remove(id);
                return Err(call_error("delete", id, e));
            }
        }
        self.seen().remove(id);
        Ok(())
    }

    fn list(&self) -> Result<Vec<VolumeRecord>> {
        let items = self
            .call(|api| async move { api.list(&ListParams::default()).await })?
            .map_err(|e| call_error("list", "(all)", e))?
            .items;
        let mut out = Vec::with_capacity(items.len());
        for tv in &items {
            out.push(from_resource(tv)?);
        }
        for tv in &items {
            self.remember(tv);
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::params::Protocol;

    fn full() -> VolumeRecord {
        VolumeRecord {
            version: RECORD_VERSION,
            id: "tdm-0f4c1f3e-8d4e-5b8e-9a7b-1c2d3e4f5a6b".into(),
            name: "pvc-1".into(),
            uuid: uuid::Uuid::from_u128(0x0f4c1f3e_8d4e_5b8e_9a7b_1c2d3e4f5a6b),
            size: 1 << 30,
            params: VolumeParams {
                replicas: 2,
                topology_key: "topology.kubernetes.io/zone".into(),
                protocol: Protocol::C,
                witness: true,
            },
            replicas: vec![
                Replica {
                    node: "a1".into(),
                    zone: "a".into(),
                    address: Some("10.0.0.1:7800".parse().unwrap()),
                },
                Replica {
                    node: "b1".into(),
                    zone: "b".into(),
                    address: Some("[fd00::2]:7801".parse().unwrap()),
                },
            ],
            witness: Some("c1".into()),
            state: VolumeState::Ready,
            attachments: vec![
                Attachment {
                    node: "a1".into(),
                    readonly: false,
                    multi_node: true,
                },
                Attachment {
                    node: "b1".into(),
                    readonly: false,
                    multi_node: true,
                },
            ],
            initialized_on: Some("a1".into()),
            allow_two_primaries: true,
            witness_address: Some("10.0.0.3:7802".parse().unwrap()),
            clients: vec![Client {
                node: "d1".into(),
                address: "10.0.0.4:7803".parse().unwrap(),
            }],
        }
    }

    #[test]
    fn record_and_custom_resource_round_trip_through_json() {
        let mut minimal = full();
        minimal.replicas.iter_mut().for_each(|r| r.address = None);
        minimal.witness = None;
        minimal.witness_address = None;
        minimal.attachments.clear();
        minimal.clients.clear();
        minimal.initialized_on = None;
        minimal.allow_two_primaries = false;
        minimal.state = VolumeState::Creating;
        for rec in [full(), minimal] {
            let tv = to_resource(&rec).unwrap();
            assert_eq!(tv.metadata.name.as_deref(), Some(rec.id.as_str()));
            // Through the wire format, as the API server returns it.
            let json = serde_json::to_string(&tv).unwrap();
            let back: TandemVolume = serde_json::from_str(&json).unwrap();
            assert_eq!(from_resource(&back).unwrap(), rec);
        }
        let tv = to_resource(&full()).unwrap();
        assert_eq!(tv.spec["replicas"][1]["address"], "[fd00::2]:7801");
        assert_eq!(tv.status.as_ref().unwrap()["state"], "Ready");
        assert_eq!(tv.spec["params"]["protocol"], "C");
    }

    #[test]
    fn a_resource_without_status_reads_as_creating() {
        let mut tv = to_resource(&full()).unwrap();
        tv.status = None;
        let rec = from_resource(&tv).unwrap();
        assert_eq!(rec.state, VolumeState::Creating);
        assert!(rec.attachments.is_empty());
        tv.status = Some(serde_json::json!({}));
        assert_eq!(from_resource(&tv).unwrap().state, VolumeState::Creating);
    }

    #[test]
    fn newer_unknown_or_corrupt_resources_are_refused_naming_the_object() {
        let good = to_resource(&full()).unwrap();
        let name = good.metadata.name.clone().unwrap();

        let mut newer = good.clone();
        newer.spec["version"] = serde_json::json!(RECORD_VERSION + 1);
        // A newer record may have other fields: the version is checked first.
        newer.spec.as_object_mut().unwrap().remove("size");
        let e = from_resource(&newer).unwrap_err().to_string();
        assert!(e.contains("newer") && e.contains(&name), "{e}");

        let mut other = good.clone();
        other.api_version = "tandem.io/v1beta1".into();
        let e = from_resource(&other).unwrap_err().to_string();
        assert!(e.contains("v1beta1") && e.contains(&name), "{e}");

        let mut unversioned = good.clone();
        unversioned.spec.as_object_mut().unwrap().remove("version");
        let e = from_resource(&unversioned).unwrap_err().to_string();
        assert!(e.contains("spec.version"), "{e}");

        let mut corrupt = good.clone();
        corrupt.spec["uuid"] = serde_json::json!("not-a-uuid");
        let e = from_resource(&corrupt).unwrap_err().to_string();
        assert!(e.contains("corrupt spec") && e.contains(&name), "{e}");

        let mut bad_state = good;
        bad_state.status = Some(serde_json::json!({"state": "Exploded"}));
        let e = from_resource(&bad_state).unwrap_err().to_string();
        assert!(e.contains("corrupt status") && e.contains(&name), "{e}");
    }

    #[test]
    fn only_kubernetes_object_names_are_stored() {
        assert!(valid_name("tdm-0f4c1f3e-8d4e-5b8e-9a7b-1c2d3e4f5a6b"));
        for bad in ["", "Tdm-1", "tdm_1", "-tdm", "tdm-", "../x"] {
            assert!(!valid_name(bad), "{bad}");
        }
        let mut rec = full();
        rec.id = "Upper".into();
        assert!(to_resource(&rec).is_err());
    }
}
