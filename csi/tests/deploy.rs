//! The manifests in `deploy/` agree with the driver: the driver name, the
//! StorageClass parameters (each example's parameters are accepted by the
//! controller's parser), the CRD's fields (every field the Kubernetes
//! store writes is in its schema), the RBAC the stores need and the
//! `--store` flags of the controller and node manifests.

#[path = "common/crd.rs"]
mod crd;

use std::collections::HashMap;
use std::path::PathBuf;

use serde::Deserialize;
use serde_json::Value;
use tandem_csi::kube_store;
use tandem_csi::store::{Attachment, Replica, StoreKind, VolumeRecord, VolumeState};

use tandem_csi::identity::DRIVER_NAME;
use tandem_csi::params::VolumeParams;

fn deploy(file: &str) -> String {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(file);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// The `parameters:` maps of every StorageClass document (a minimal reader
/// for the flat `key: "value"` lines those maps use).
fn storage_class_parameters(text: &str) -> Vec<HashMap<String, String>> {
    let mut out = Vec::new();
    for doc in text.split("\n---") {
        let mut params = None::<HashMap<String, String>>;
        for line in doc.lines() {
            if line.starts_with("parameters:") {
                params = Some(HashMap::new());
                continue;
            }
            if let Some(p) = params.as_mut() {
                if let Some(kv) = line.strip_prefix("  ") {
                    if kv.starts_with(' ') || kv.starts_with('#') {
                        continue;
                    }
                    let (k, v) = kv.split_once(':').expect("key: value");
                    p.insert(k.trim().to_string(), v.trim().trim_matches('"').to_string());
                } else if !line.trim().is_empty() {
                    out.push(params.take().unwrap());
                }
            }
        }
        if let Some(p) = params {
            out.push(p);
        }
    }
    out
}

#[test]
fn manifests_name_this_driver() {
    assert!(deploy("csidriver.yaml").contains(&format!("name: {DRIVER_NAME}")));
    let sc = deploy("storageclass.yaml");
    let classes = sc.matches("kind: StorageClass").count();
    assert!(classes >= 3);
    assert_eq!(
        sc.matches(&format!("provisioner: {DRIVER_NAME}")).count(),
        classes
    );
    assert!(deploy("node.yaml").contains(&format!("plugins/{DRIVER_NAME}/csi.sock")));
}

#[test]
fn example_storage_class_parameters_are_accepted() {
    let all = storage_class_parameters(&deploy("storageclass.yaml"));
    assert!(all.len() >= 3, "{all:?}");
    for p in &all {
        VolumeParams::parse(p).unwrap_or_else(|e| panic!("{p:?}: {e}"));
    }
    assert!(all
        .iter()
        .any(|p| p.get("witness").map(String::as_str) == Some("true")));
    assert!(all
        .iter()
        .any(|p| p.get("protocol").map(String::as_str) == Some("A")));
}

#[test]
fn crd_mirrors_the_volume_record_fields() {
    let crd = deploy("crds.yaml");
    for field in [
        "name:",
        "uuid:",
        "size:",
        "replicas:",
        "topology_key:",
        "protocol:",
        "witness:",
        "state:",
        "attachments:",
        "initialized_on:",
        "address:",
        "allow_two_primaries:",
        "witness_address:",
        "multi_node:",
        "readonly:",
        "clients:",
    ] {
        assert!(crd.contains(field), "crds.yaml lacks {field}");
    }
    for state in ["Creating", "Ready", "Deleting"] {
        assert!(crd.contains(state));
    }
}

/// A record with every optional field set, and one with none.
fn records() -> [VolumeRecord; 2] {
    let full = VolumeRecord {
        version: tandem_csi::store::RECORD_VERSION,
        id: "tdm-0f4c1f3e-8d4e-5b8e-9a7b-1c2d3e4f5a6b".into(),
        name: "pvc-1".into(),
        uuid: uuid::Uuid::from_u128(7),
        size: 1 << 30,
        params: VolumeParams {
            witness: true,
            ..VolumeParams::default()
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
                address: Some("10.0.0.2:7800".parse().unwrap()),
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
                readonly: true,
                multi_node: true,
            },
        ],
        initialized_on: Some("a1".into()),
        allow_two_primaries: true,
        witness_address: Some("10.0.0.3:7801".parse().unwrap()),
        clients: vec![tandem_csi::store::Client {
            node: "d1".into(),
            address: "10.0.0.4:7802".parse().unwrap(),
        }],
    };
    let mut minimal = full.clone();
    minimal.replicas.iter_mut().for_each(|r| r.address = None);
    minimal.witness = None;
    minimal.witness_address = None;
    minimal.attachments.clear();
    minimal.initialized_on = None;
    minimal.allow_two_primaries = false;
    minimal.clients.clear();
    minimal.state = VolumeState::Creating;
    [full, minimal]
}

#[test]
fn crd_schema_accepts_every_field_the_kubernetes_store_writes() {
    let schema = crd::schema();
    for rec in records() {
        let obj = serde_json::to_value(kube_store::to_resource(&rec).unwrap()).unwrap();
        assert_eq!(obj["apiVersion"], kube_store::API_VERSION);
        assert_eq!(obj["kind"], kube_store::KIND);
        let v = crd::violations(&schema, &obj);
        assert!(v.is_empty(), "{}", v.join("\n"));
    }
    for state in ["Creating", "Ready", "Deleting"] {
        let mut obj =
            serde_json::to_value(kube_store::to_resource(&records()[0]).unwrap()).unwrap();
        obj["status"]["state"] = state.into();
        assert!(crd::violations(&schema, &obj).is_empty(), "{state}");
    }
    // The validator is not vacuous: a field the schema lacks, a wrong type
    // and a missing required field are reported.
    let mut obj = serde_json::to_value(kube_store::to_resource(&records()[0]).unwrap()).unwrap();
    obj["spec"]["replicas"][0]["port"] = 7800.into();
    obj["status"]["attachments"][0]["readonly"] = "yes".into();
    obj["spec"].as_object_mut().unwrap().remove("version");
    let v = crd::violations(&schema, &obj).join("\n");
    assert!(
        v.contains(".spec.replicas[0].port: not in the CRD schema"),
        "{v}"
    );
    assert!(v.contains(".status.attachments[0].readonly"), "{v}");
    assert!(v.contains(".spec.version: required"), "{v}");
}

#[test]
fn crd_names_the_group_version_and_scope_the_store_uses() {
    let crd: Value = serde_yaml::from_str(&deploy("crds.yaml")).unwrap();
    assert_eq!(crd["spec"]["group"], kube_store::GROUP);
    assert_eq!(crd["spec"]["scope"], "Cluster");
    assert_eq!(crd["spec"]["names"]["kind"], kube_store::KIND);
    assert_eq!(crd["spec"]["names"]["plural"], kube_store::PLURAL);
    assert_eq!(
        crd["metadata"]["name"],
        format!("{}.{}", kube_store::PLURAL, kube_store::GROUP)
    );
    let v = &crd["spec"]["versions"][0];
    assert_eq!(v["name"], kube_store::VERSION);
    assert_eq!(v["storage"], true);
    // The store writes the status through its subresource.
    assert!(v["subresources"]["status"].is_object());
}

/// Every YAML document of a manifest file.
fn documents(file: &str) -> Vec<Value> {
    let text = deploy(file);
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| Value::deserialize(d).unwrap_or_else(|e| panic!("{file}: {e}")))
        .filter(|v| !v.is_null())
        .collect()
}

/// The verbs `role` grants on `resource` in group tandem.io.
fn verbs(docs: &[Value], role: &str, resource: &str) -> Vec<String> {
    let role = docs
        .iter()
        .find(|d| d["kind"] == "ClusterRole" && d["metadata"]["name"] == role)
        .unwrap_or_else(|| panic!("ClusterRole {role}"));
    let mut out = Vec::new();
    for rule in role["rules"].as_array().unwrap() {
        let groups = rule["apiGroups"].as_array().unwrap();
        let resources = rule["resources"].as_array().unwrap();
        if groups.iter().any(|g| g == "tandem.io") && resources.iter().any(|r| r == resource) {
            out.extend(
                rule["verbs"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_str().unwrap().to_string()),
            );
        }
    }
    out
}

#[test]
fn rbac_lets_the_controller_write_and_the_node_agent_only_read_tandemvolumes() {
    let docs = documents("rbac.yaml");
    for resource in ["tandemvolumes", "tandemvolumes/status"] {
        let have = verbs(&docs, "tandem-csi-controller", resource);
        for want in [
            "get", "list", "watch", "create", "update", "patch", "delete",
        ] {
            assert!(
                have.iter().any(|v| v == want),
                "controller: {resource} {want}"
            );
        }
    }
    let node = verbs(&docs, "tandem-csi-node", "tandemvolumes");
    for want in ["get", "list", "watch"] {
        assert!(node.iter().any(|v| v == want), "node: {want}");
    }
    for write in ["create", "update", "patch", "delete"] {
        assert!(!node.iter().any(|v| v == write), "node may not {write}");
    }
    assert!(verbs(&docs, "tandem-csi-node", "tandemvolumes/status").is_empty());
    for sa in ["tandem-csi-controller", "tandem-csi-node"] {
        assert!(docs.iter().any(|d| d["kind"] == "ClusterRoleBinding"
            && d["roleRef"]["name"] == sa
            && d["subjects"][0]["name"] == sa));
    }
}

/// The `tandem-csi` container's args and the pod's service account, of
/// the workload in `file`.
fn driver_args(file: &str) -> (Vec<String>, String) {
    let docs = documents(file);
    let w = docs
        .iter()
        .find(|d| d["kind"] == "Deployment" || d["kind"] == "DaemonSet")
        .unwrap_or_else(|| panic!("{file}: no workload"));
    let pod = &w["spec"]["template"]["spec"];
    let c = pod["containers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "tandem-csi")
        .unwrap_or_else(|| panic!("{file}: no tandem-csi container"));
    let args = c["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .collect();
    (
        args,
        pod["serviceAccountName"].as_str().unwrap().to_string(),
    )
}

#[test]
fn controller_and_node_manifests_use_the_kubernetes_store() {
    for (file, mode, sa) in [
        ("controller.yaml", "controller", "tandem-csi-controller"),
        ("node.yaml", "node", "tandem-csi-node"),
    ] {
        let (args, account) = driver_args(file);
        assert_eq!(args[0], mode, "{file}");
        assert_eq!(account, sa, "{file}");
        let stores: Vec<&String> = args.iter().filter(|a| a.starts_with("--store")).collect();
        assert_eq!(stores.len(), 1, "{file}: {args:?}");
        let value = stores[0].strip_prefix("--store=").unwrap();
        assert_eq!(
            value.parse::<StoreKind>(),
            Ok(StoreKind::Kubernetes),
            "{file}"
        );
        for old in ["--volumes-dir", "--state-dir=/var/lib/tandem-csi/volumes"] {
            assert!(!args.iter().any(|a| a.starts_with(old)), "{file}: {old}");
        }
    }
}

/// Property paths of a schema (`.spec.replicas[].node`, ...).
fn schema_paths(s: &Value, path: &str, out: &mut Vec<String>) {
    if let Some(props) = s["properties"].as_object() {
        for (k, child) in props {
            let p = format!("{path}.{k}");
            out.push(p.clone());
            schema_paths(child, &p, out);
        }
    }
    if s["items"].is_object() {
        schema_paths(&s["items"], &format!("{path}[]"), out);
    }
}

/// Key paths of a JSON value, arrays as `[]`.
fn value_paths(v: &Value, path: &str, out: &mut Vec<String>) {
    match v {
        Value::Object(o) => {
            for (k, child) in o {
                let p = format!("{path}.{k}");
                out.push(p.clone());
                value_paths(child, &p, out);
            }
        }
        Value::Array(items) => {
            for item in items {
                value_paths(item, &format!("{path}[]"), out);
            }
        }
        _ => {}
    }
}

#[test]
fn crd_schema_has_no_field_the_kubernetes_store_does_not_write() {
    let mut declared = Vec::new();
    schema_paths(&crd::schema(), "", &mut declared);
    let full = serde_json::to_value(kube_store::to_resource(&records()[0]).unwrap()).unwrap();
    let mut written = Vec::new();
    value_paths(&full, "", &mut written);
    let stale: Vec<&String> = declared.iter().filter(|p| !written.contains(p)).collect();
    assert!(
        stale.is_empty(),
        "deploy/crds.yaml declares fields the driver never writes: {stale:?}"
    );
}
