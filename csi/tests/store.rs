//! The volume-record stores held to one contract: the same test body runs
//! against the file store and against the Kubernetes store.
//!
//! No Kubernetes API server can run on this machine, so the Kubernetes
//! store talks to a stand-in: a small HTTP/1.1 server on loopback that
//! implements the `tandemvolumes` resource the way the API server does for
//! a cluster-scoped custom resource with a status subresource (create:
//! status ignored, 409 AlreadyExists; get: 404; replace: resourceVersion
//! required and must match, else 409 Conflict, status ignored; replace of `/status`:
//! only the status taken; delete with resourceVersion preconditions;
//! list), validating every written object against `deploy/crds.yaml`.
//! The real kube-rs client, its HTTP and JSON paths, run unchanged.

mod common;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use common::*;
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{json, Value};
use tandem_csi::controller::{volume_id, ControllerService, TestHooks};
use tandem_csi::csi;
use tandem_csi::csi::controller_server::Controller;
use tandem_csi::error::{Error, Result};
use tandem_csi::inventory::Inventory;
use tandem_csi::kube_store::KubeStore;
use tandem_csi::store::{
    Attachment, Client, FileStore, Replica, VolumeRecord, VolumeState, VolumeStore, RECORD_VERSION,
};

// ---------------------------------------------------------------------------
// The API-server stand-in.

const PREFIX: &str = "/apis/tandem.io/v1alpha1/tandemvolumes";

#[derive(Default)]
struct ApiState {
    objects: BTreeMap<String, Value>,
    rv: u64,
    /// `METHOD path` of every request, in order.
    requests: Vec<String>,
}

struct ApiServer {
    addr: SocketAddr,
    state: Arc<Mutex<ApiState>>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl ApiServer {
    /// Serves on 127.0.0.1 from its own thread and runtime (the stores
    /// block their callers while a request is under way).
    fn start() -> ApiServer {
        let state = Arc::new(Mutex::new(ApiState::default()));
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
        let st = state.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let l = tokio::net::TcpListener::bind("127.0.0.1:0")
                    .await
                    .expect("bind");
                addr_tx.send(l.local_addr().expect("addr")).expect("send");
                loop {
                    let (conn, _) = tokio::select! {
                        c = l.accept() => c.expect("accept"),
                        _ = &mut stop_rx => return,
                    };
                    let st = st.clone();
                    tokio::spawn(async move {
                        let svc = hyper::service::service_fn(move |req| {
                            let st = st.clone();
                            async move { Ok::<_, Infallible>(handle(&st, req).await) }
                        });
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(hyper_util::rt::TokioIo::new(conn), svc)
                            .await;
                    });
                }
            });
        });
        ApiServer {
            addr: addr_rx.recv().expect("stand-in address"),
            state,
            _stop: stop_tx,
        }
    }

    fn store(&self) -> KubeStore {
        let url = format!("http://{}", self.addr).parse().expect("url");
        KubeStore::with_config(kube::Config::new(url)).expect("kube store")
    }

    fn state(&self) -> std::sync::MutexGuard<'_, ApiState> {
        self.state.lock().expect("state")
    }
}

fn reply(code: StatusCode, body: &Value) -> Response<Full<Bytes>> {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("response")
}

fn status(code: StatusCode, reason: &str, message: String) -> Response<Full<Bytes>> {
    reply(
        code,
        &json!({
            "apiVersion": "v1", "kind": "Status", "metadata": {},
            "status": "Failure", "message": message, "reason": reason,
            "code": code.as_u16(),
        }),
    )
}

fn conflict(name: &str) -> Response<Full<Bytes>> {
    status(
        StatusCode::CONFLICT,
        "Conflict",
        format!(
            "Operation cannot be fulfilled on tandemvolumes.tandem.io \"{name}\": the object \
             has been modified; please apply your changes to the latest version and try again"
        ),
    )
}

fn rv_of(v: &Value) -> Option<&str> {
    v["metadata"]["resourceVersion"].as_str()
}

async fn handle(state: &Mutex<ApiState>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return status(StatusCode::BAD_REQUEST, "BadRequest", e.to_string()),
    };
    let body: Value = if body.is_empty() {
        Value::Null
    } else {
        match serde_json::from_slice(&body) {
            Ok(v) => v,
            Err(e) => return status(StatusCode::BAD_REQUEST, "BadRequest", e.to_string()),
        }
    };
    let mut st = state.lock().expect("state");
    st.requests.push(format!("{method} {path}"));
    let Some(rest) = path.strip_prefix(PREFIX) else {
        return status(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("no route {path}"),
        );
    };
    let parts: Vec<&str> = rest.split('/').filter(|s| !s.is_empty()).collect();
    let schema = crd::schema();
    let invalid = |obj: &Value| {
        let v = crd::violations(&schema, obj);
        (!v.is_empty()).then(|| {
            status(
                StatusCode::UNPROCESSABLE_ENTITY,
                "Invalid",
                format!("TandemVolume is invalid: {}", v.join("; ")),
            )
        })
    };
    let not_found = |name: &str| {
        status(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("tandemvolumes.tandem.io \"{name}\" not found"),
        )
    };
    match (&method, parts.as_slice()) {
        (&Method::GET, []) => {
            let items: Vec<Value> = st.objects.values().cloned().collect();
            reply(
                StatusCode::OK,
                &json!({
                    "apiVersion": "tandem.io/v1alpha1", "kind": "TandemVolumeList",
                    "metadata": {"resourceVersion": st.rv.to_string()}, "items": items,
                }),
            )
        }
        (&Method::POST, []) => {
            let mut obj = body;
            let Some(name) = obj["metadata"]["name"].as_str().map(str::to_string) else {
                return status(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "Invalid",
                    "no name".into(),
                );
            };
            if obj["apiVersion"] != "tandem.io/v1alpha1" || obj["kind"] != "TandemVolume" {
                return status(StatusCode::BAD_REQUEST, "BadRequest", "wrong kind".into());
            }
            if st.objects.contains_key(&name) {
                return status(
                    StatusCode::CONFLICT,
                    "AlreadyExists",
                    format!("tandemvolumes.tandem.io \"{name}\" already exists"),
                );
            }
            // The status subresource: a create ignores the status.
            if let Some(o) = obj.as_object_mut() {
                o.remove("status");
            }
            if let Some(r) = invalid(&obj) {
                return r;
            }
            st.rv += 1;
            obj["metadata"]["resourceVersion"] = json!(st.rv.to_string());
            obj["metadata"]["uid"] = json!(format!("uid-{}", st.rv));
            obj["metadata"]["creationTimestamp"] = json!("2026-01-01T00:00:00Z");
            st.objects.insert(name, obj.clone());
            reply(StatusCode::CREATED, &obj)
        }
        (&Method::GET, [name]) => match st.objects.get(*name) {
            Some(o) => reply(StatusCode::OK, o),
            None => not_found(name),
        },
        (&Method::PUT, [name]) | (&Method::PUT, [name, "status"]) => {
            let name = name.to_string();
            let Some(cur) = st.objects.get(&name).cloned() else {
                return not_found(&name);
            };
            // Custom resources allow no unconditional update.
            let Some(rv) = rv_of(&body) else {
                return status(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "Invalid",
                    "metadata.resourceVersion: Invalid value: 0x0: must be specified for an update"
                        .into(),
                );
            };
            if Some(rv) != rv_of(&cur) {
                return conflict(&name);
            }
            let mut new = cur.clone();
            if parts.len() == 2 {
                // /status: only the status is taken.
                new["status"] = body["status"].clone();
            } else {
                // The main resource: the status is ignored.
                new["spec"] = body["spec"].clone();
            }
            if let Some(r) = invalid(&new) {
                return r;
            }
            st.rv += 1;
            new["metadata"]["resourceVersion"] = json!(st.rv.to_string());
            st.objects.insert(name, new.clone());
            reply(StatusCode::OK, &new)
        }
        (&Method::DELETE, [name]) => {
            let Some(cur) = st.objects.get(*name).cloned() else {
                return not_found(name);
            };
            if let Some(want) = body["preconditions"]["resourceVersion"].as_str() {
                if Some(want) != rv_of(&cur) {
                    return conflict(name);
                }
            }
            st.objects.remove(*name);
            reply(StatusCode::OK, &cur)
        }
        _ => status(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            format!("{method} {path}"),
        ),
    }
}

// ---------------------------------------------------------------------------
// The contract.

/// A store that records the state of every `put` and can fail the puts
/// that follow a `Creating` one, like a controller crashing right after
/// persisting a new record.
struct Recording {
    inner: Arc<dyn VolumeStore>,
    puts: Mutex<Vec<(String, VolumeState)>>,
    crash_after_creating: bool,
}

impl Recording {
    fn new(inner: Arc<dyn VolumeStore>, crash_after_creating: bool) -> Arc<Recording> {
        Arc::new(Recording {
            inner,
            puts: Mutex::new(Vec::new()),
            crash_after_creating,
        })
    }
    fn puts(&self) -> Vec<(String, VolumeState)> {
        self.puts.lock().expect("puts").clone()
    }
}

impl VolumeStore for Recording {
    fn get(&self, id: &str) -> Result<Option<VolumeRecord>> {
        self.inner.get(id)
    }
    fn put(&self, record: &VolumeRecord) -> Result<()> {
        if self.crash_after_creating && record.state != VolumeState::Creating {
            return Err(Error::Internal("simulated crash".into()));
        }
        self.inner.put(record)?;
        self.puts
            .lock()
            .expect("puts")
            .push((record.id.clone(), record.state));
        Ok(())
    }
    fn delete(&self, id: &str) -> Result<()> {
        self.inner.delete(id)
    }
    fn list(&self) -> Result<Vec<VolumeRecord>> {
        self.inner.list()
    }
}

fn controller(store: Arc<dyn VolumeStore>) -> ControllerService {
    let inv = Inventory::parse("test inventory", INVENTORY).expect("inventory");
    ControllerService::new(store, inv, TestHooks::default())
}

async fn create(
    ctrl: &ControllerService,
    name: &str,
) -> std::result::Result<csi::Volume, tonic::Status> {
    let params = [("replicas", "2"), ("witness", "true")];
    let req = create_req(name, GIB, vec![rwx_block()], &params);
    Ok(ctrl
        .create_volume(tonic::Request::new(req))
        .await?
        .into_inner()
        .volume
        .expect("volume"))
}

async fn delete(ctrl: &ControllerService, id: &str) -> std::result::Result<(), tonic::Status> {
    ctrl.delete_volume(tonic::Request::new(csi::DeleteVolumeRequest {
        volume_id: id.into(),
        ..Default::default()
    }))
    .await
    .map(|_| ())
}

fn ids(store: &dyn VolumeStore) -> Vec<String> {
    store
        .list()
        .expect("list")
        .into_iter()
        .map(|r| r.id)
        .collect()
}

/// What every store must do, driven through the controller where the
/// behaviour is the controller's (idempotent create by name, Creating
/// persisted before acting, resume after a crash, idempotent delete) and
/// directly for the record round trip.
async fn contract(store: Arc<dyn VolumeStore>) {
    assert_eq!(ids(&*store), Vec::<String>::new());
    assert_eq!(store.get("tdm-missing").expect("get"), None);
    assert_eq!(store.get("../etc/passwd").expect("get"), None);

    // A new volume: persisted as Creating first, then Ready.
    let rec = Recording::new(store.clone(), false);
    let v = create(&controller(rec.clone()), "pvc-a")
        .await
        .expect("create");
    let id = v.volume_id.clone();
    assert_eq!(
        rec.puts(),
        [
            (id.clone(), VolumeState::Creating),
            (id.clone(), VolumeState::Ready)
        ]
    );
    let stored = store.get(&id).expect("get").expect("record");
    assert_eq!(stored.state, VolumeState::Ready);
    assert_eq!(stored.name, "pvc-a");

    // The same name again, from a restarted controller: the same volume,
    // nothing written.
    let rec2 = Recording::new(store.clone(), false);
    let again = create(&controller(rec2.clone()), "pvc-a")
        .await
        .expect("again");
    assert_eq!(again.volume_id, id);
    assert_eq!(again.accessible_topology, v.accessible_topology);
    assert!(rec2.puts().is_empty(), "{:?}", rec2.puts());
    assert_eq!(ids(&*store), vec![id.clone()]);

    // A crash right after persisting Creating: the record is there, and
    // the retry resumes it with the same placement instead of placing again.
    let crashing = Recording::new(store.clone(), true);
    let e = create(&controller(crashing.clone()), "pvc-b")
        .await
        .expect_err("crash");
    assert!(e.message().contains("simulated crash"), "{e:?}");
    let (id_b, _) = volume_id("pvc-b");
    assert_eq!(crashing.puts(), [(id_b.clone(), VolumeState::Creating)]);
    let half = store.get(&id_b).expect("get").expect("persisted first");
    assert_eq!(half.state, VolumeState::Creating);
    let resumed = create(&controller(store.clone()), "pvc-b")
        .await
        .expect("resume");
    assert_eq!(resumed.volume_id, id_b);
    let done = store.get(&id_b).expect("get").expect("record");
    assert_eq!(done.state, VolumeState::Ready);
    assert_eq!(done.replicas, half.replicas);
    assert_eq!(done.witness, half.witness);
    let mut sorted = vec![id.clone(), id_b.clone()];
    sorted.sort();
    assert_eq!(ids(&*store), sorted);

    // Every field round-trips, and updates replace.
    let mut full = done.clone();
    full.attachments = vec![
        Attachment {
            node: full.replicas[0].node.clone(),
            readonly: false,
            multi_node: true,
        },
        Attachment {
            node: full.replicas[1].node.clone(),
            readonly: true,
            multi_node: true,
        },
    ];
    full.initialized_on = Some(full.replicas[0].node.clone());
    full.allow_two_primaries = true;
    full.witness_address = Some("10.0.0.3:7802".parse().expect("addr"));
    full.clients = vec![Client {
        node: "c1".into(),
        address: "10.0.0.4:7803".parse().expect("addr"),
    }];
    full.replicas = vec![
        Replica {
            node: "a1".into(),
            zone: "a".into(),
            address: Some("10.0.0.1:7800".parse().expect("addr")),
        },
        Replica {
            node: "b1".into(),
            zone: "b".into(),
            address: Some("[fd00::2]:7801".parse().expect("addr")),
        },
    ];
    store.put(&full).expect("put");
    assert_eq!(store.get(&id_b).expect("get"), Some(full.clone()));
    full.attachments.pop();
    store.put(&full).expect("put");
    assert_eq!(store.get(&id_b).expect("get"), Some(full.clone()));
    assert_eq!(full.version, RECORD_VERSION);

    // Delete: refused while published, then idempotent.
    let ctrl = controller(store.clone());
    let e = delete(&ctrl, &id_b).await.expect_err("published");
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);
    full.attachments.clear();
    store.put(&full).expect("put");
    delete(&ctrl, &id_b).await.expect("delete");
    delete(&ctrl, &id_b).await.expect("delete again");
    assert_eq!(store.get(&id_b).expect("get"), None);
    store
        .delete(&id_b)
        .expect("store delete of a missing record");
    assert_eq!(ids(&*store), vec![id.clone()]);
    delete(&ctrl, &id).await.expect("delete");
    assert_eq!(ids(&*store), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_store_meets_the_store_contract() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = FileStore::open(&dir.path().join("volumes")).expect("file store");
    contract(Arc::new(store)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_store_meets_the_store_contract_against_an_api_server_stand_in() {
    let api = ApiServer::start();
    contract(Arc::new(api.store())).await;
    // It went through the custom resource and its status subresource.
    let reqs = api.state().requests.clone();
    for want in [
        format!("POST {PREFIX}"),
        format!("PUT {PREFIX}/"),
        format!("GET {PREFIX}"),
        format!("DELETE {PREFIX}/"),
    ] {
        assert!(
            reqs.iter().any(|r| r.starts_with(&want)),
            "{want}: {reqs:#?}"
        );
    }
    assert!(reqs.iter().any(|r| r.ends_with("/status")), "{reqs:#?}");
}

/// The same, from a current-thread runtime (the node agent's tests use
/// one): the store's calls do not need the caller's runtime.
#[test]
fn kube_store_works_from_a_current_thread_runtime() {
    let api = ApiServer::start();
    let store: Arc<dyn VolumeStore> = Arc::new(api.store());
    block_on(async move {
        let v = create(&controller(store.clone()), "pvc-c")
            .await
            .expect("create");
        assert_eq!(ids(&*store), [v.volume_id]);
    });
}

fn record(id: &str) -> VolumeRecord {
    let (_, uuid) = volume_id(id);
    VolumeRecord {
        version: RECORD_VERSION,
        id: id.into(),
        name: format!("name-{id}"),
        uuid,
        size: 1 << 30,
        params: tandem_csi::params::VolumeParams::default(),
        replicas: vec![Replica {
            node: "a1".into(),
            zone: "a".into(),
            address: None,
        }],
        witness: None,
        state: VolumeState::Creating,
        attachments: vec![],
        initialized_on: None,
        allow_two_primaries: false,
        witness_address: None,
        clients: vec![],
    }
}

#[test]
fn kube_store_writes_are_conditional_on_the_resource_version_it_read() {
    let api = ApiServer::start();
    let a = api.store();
    let b = api.store();
    let mut r = record("tdm-1");
    a.put(&r).expect("create");
    // B never read it: its create is refused, retryably.
    let e = b.put(&r).expect_err("exists");
    assert!(matches!(e, Error::Aborted(_)), "{e:?}");
    assert!(e.to_string().contains("retry"), "{e}");
    // Both read it; A writes first; B's write is a conflict.
    assert!(b.get("tdm-1").expect("get").is_some());
    r.state = VolumeState::Ready;
    a.put(&r).expect("a");
    r.attachments.push(Attachment {
        node: "a1".into(),
        readonly: false,
        multi_node: false,
    });
    let e = b.put(&r).expect_err("stale");
    assert!(matches!(e, Error::Aborted(_)), "{e:?}");
    assert!(
        e.to_string().contains("tdm-1") && e.to_string().contains("retry"),
        "{e}"
    );
    // A delete based on a stale read is refused too.
    assert!(b.get("tdm-1").expect("get").is_some());
    r.state = VolumeState::Ready;
    r.initialized_on = Some("a1".into());
    a.put(&r).expect("a again");
    let e = b.delete("tdm-1").expect_err("stale delete");
    assert!(matches!(e, Error::Aborted(_)), "{e:?}");
    // The retry reads first and succeeds.
    assert_eq!(
        b.get("tdm-1").expect("get").expect("rec").state,
        VolumeState::Ready
    );
    r.attachments.push(Attachment {
        node: "a1".into(),
        readonly: false,
        multi_node: false,
    });
    b.put(&r).expect("retry");
    assert_eq!(a.get("tdm-1").expect("get"), Some(r));
    b.delete("tdm-1").expect("delete");
    assert_eq!(a.get("tdm-1").expect("get"), None);
}

#[test]
fn kube_store_reads_a_status_less_object_as_creating_and_refuses_newer_ones() {
    let api = ApiServer::start();
    let store = api.store();
    let r = record("tdm-2");
    store.put(&r).expect("put");
    // A crash between the create and the status write leaves no status.
    api.state()
        .objects
        .get_mut("tdm-2")
        .expect("object")
        .as_object_mut()
        .expect("object")
        .remove("status");
    let got = api.store().get("tdm-2").expect("get").expect("record");
    assert_eq!(got.state, VolumeState::Creating);
    assert_eq!(got.replicas, r.replicas);
    // A record written by a newer driver is refused by name, in get and list.
    api.state().objects.get_mut("tdm-2").expect("object")["spec"]["version"] =
        json!(RECORD_VERSION + 1);
    let e = store.get("tdm-2").expect_err("newer");
    assert!(
        e.to_string().contains("newer") && e.to_string().contains("tdm-2"),
        "{e}"
    );
    let e = store.list().expect_err("newer");
    assert!(e.to_string().contains("newer"), "{e}");
}

#[test]
fn kube_store_reports_an_unreachable_api_server_clearly() {
    // A port nothing listens on.
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    drop(l);
    let url = format!("http://{addr}").parse().expect("url");
    let store = KubeStore::with_config(kube::Config::new(url)).expect("store");
    let e = store.get("tdm-3").expect_err("unreachable");
    assert!(
        e.to_string()
            .contains("kubernetes store: get TandemVolume tdm-3"),
        "{e}"
    );
}

/// A kubeconfig naming the stand-in (plain HTTP, no credentials).
fn kubeconfig(dir: &std::path::Path, api: &ApiServer) -> String {
    let path = dir.join("kubeconfig");
    let text = format!(
        "apiVersion: v1\nkind: Config\n\
         clusters:\n- name: stand-in\n  cluster:\n    server: http://{}\n\
         users:\n- name: test\n  user: {{}}\n\
         contexts:\n- name: test\n  context:\n    cluster: stand-in\n    user: test\n\
         current-context: test\n",
        api.addr
    );
    std::fs::write(&path, text).expect("kubeconfig");
    path.display().to_string()
}

fn list_requests(api: &ApiServer) -> usize {
    let want = format!("GET {PREFIX}");
    api.state().requests.iter().filter(|r| **r == want).count()
}

/// `tandem-csi controller --store kubernetes` (KUBECONFIG) keeps its
/// records in the API server (stand-in), across a restart; `tandem-csi
/// node --store kubernetes` runs the replica agent reading them.
#[test]
fn the_binaries_use_the_kubernetes_store_with_store_kubernetes() {
    let api = ApiServer::start();
    let dir = tempfile::Builder::new()
        .prefix("tandem-csi-")
        .tempdir()
        .expect("temp dir");
    let kc = kubeconfig(dir.path(), &api);
    let inv = dir.path().join("nodes.toml");
    std::fs::write(&inv, INVENTORY).expect("inventory");
    let args = vec![
        "controller".to_string(),
        "--store".into(),
        "kubernetes".into(),
        "--nodes".into(),
        inv.display().to_string(),
    ];
    let env = [("KUBECONFIG", kc.as_str()), ("KUBERNETES_SERVICE_HOST", "")];
    let mut d = Driver::start_with(dir, args, &env);
    let req = create_req("pvc-k", GIB, vec![rwo_block()], &[]);
    let id = block_on(async {
        let mut c = d.controller_client().await;
        c.create_volume(req.clone())
            .await
            .expect("create")
            .into_inner()
            .volume
            .expect("volume")
            .volume_id
    });
    {
        let st = api.state();
        let obj = st.objects.get(&id).expect("TandemVolume created");
        assert_eq!(obj["spec"]["name"], "pvc-k");
        assert_eq!(obj["status"]["state"], "Ready");
    }
    assert!(
        d.log_text().contains("store=kubernetes"),
        "{}",
        d.log_text()
    );
    d.stop();
    d.start();
    let again = block_on(async {
        let mut c = d.controller_client().await;
        c.create_volume(req)
            .await
            .expect("create again")
            .into_inner()
            .volume
            .expect("volume")
            .volume_id
    });
    assert_eq!(again, id);
    assert_eq!(api.state().objects.len(), 1);
    d.stop();

    // The node plugin's agent lists the records from the API server.
    let ndir = tempfile::Builder::new()
        .prefix("tandem-csi-")
        .tempdir()
        .expect("temp dir");
    let kc = kubeconfig(ndir.path(), &api);
    let args = vec![
        "node".to_string(),
        "--node-id".into(),
        "a1".into(),
        "--store".into(),
        "kubernetes".into(),
        "--state-dir".into(),
        ndir.path().join("state").display().to_string(),
        "--data-dir".into(),
        ndir.path().join("data").display().to_string(),
        "--tandemd".into(),
        "/nonexistent/tandemd".into(),
        "--tandemctl".into(),
        "/nonexistent/tandemctl".into(),
    ];
    let env = [("KUBECONFIG", kc.as_str()), ("KUBERNETES_SERVICE_HOST", "")];
    let before = list_requests(&api);
    let mut n = Driver::start_with(ndir, args, &env);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while list_requests(&api) == before {
        assert!(
            std::time::Instant::now() < deadline,
            "the node agent never listed the TandemVolumes:\n{}",
            n.log_text()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(
        n.log_text().contains("replica agent on"),
        "{}",
        n.log_text()
    );
    n.stop();
}

#[test]
fn store_flags_are_validated() {
    let dir = tempfile::tempdir().expect("tempdir");
    let run = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_tandem-csi"))
            .args(args)
            .arg("--endpoint")
            .arg(format!("unix://{}", dir.path().join("s.sock").display()))
            .output()
            .expect("run");
        assert!(!out.status.success(), "{args:?}");
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    let nodes = dir.path().join("nodes.toml");
    std::fs::write(&nodes, INVENTORY).expect("inventory");
    let nodes = nodes.display().to_string();
    let e = run(&["controller", "--nodes", &nodes, "--store", "etcd"]);
    assert!(e.contains("file:DIR") && e.contains("kubernetes"), "{e}");
    let e = run(&[
        "controller",
        "--nodes",
        &nodes,
        "--store",
        "kubernetes",
        "--state-dir",
        "/x",
    ]);
    assert!(e.contains("cannot be used with"), "{e}");
    let e = run(&[
        "node",
        "--node-id",
        "a1",
        "--store",
        "file:/x",
        "--volumes-dir",
        "/x",
    ]);
    assert!(e.contains("cannot be used with"), "{e}");
    // No cluster configuration: a clear error, not a hang.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tandem-csi"))
        .args(["controller", "--nodes", &nodes, "--store", "kubernetes"])
        .arg("--endpoint")
        .arg(format!("unix://{}", dir.path().join("s.sock").display()))
        .env("KUBECONFIG", dir.path().join("missing"))
        .env("HOME", dir.path())
        .env_remove("KUBERNETES_SERVICE_HOST")
        .output()
        .expect("run");
    assert!(!out.status.success());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(
        e.contains("--store kubernetes") && e.contains("configuration"),
        "{e}"
    );
}
