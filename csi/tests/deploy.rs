//! The manifests in `deploy/` agree with the driver: the driver name, the
//! StorageClass parameters (each example's parameters are accepted by the
//! controller's parser) and the CRD's fields.

use std::collections::HashMap;
use std::path::PathBuf;

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
    ] {
        assert!(crd.contains(field), "crds.yaml lacks {field}");
    }
    for state in ["Creating", "Ready", "Deleting"] {
        assert!(crd.contains(state));
    }
}
