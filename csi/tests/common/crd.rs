//! The `TandemVolume` CRD in `deploy/crds.yaml` as a validator: what the
//! API server would refuse (wrong type, value outside an enum or a bound,
//! missing required field) or silently drop (a field the schema does not
//! name) in an object's `spec` and `status`.

use serde_json::Value;

/// The v1alpha1 `openAPIV3Schema` of `deploy/crds.yaml`.
pub fn schema() -> Value {
    let p = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/crds.yaml");
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    let crd: Value = serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    let versions = crd["spec"]["versions"].as_array().expect("spec.versions");
    let v = versions
        .iter()
        .find(|v| v["name"] == "v1alpha1")
        .expect("version v1alpha1");
    v["schema"]["openAPIV3Schema"].clone()
}

/// Every way `obj` (a whole `TandemVolume`) breaks `schema`, as
/// `path: problem` lines; empty when the API server would store it as is.
pub fn violations(schema: &Value, obj: &Value) -> Vec<String> {
    let mut out = Vec::new();
    let mut top = obj.clone();
    // apiVersion, kind and metadata are the API server's, not the schema's.
    if let Some(o) = top.as_object_mut() {
        o.remove("apiVersion");
        o.remove("kind");
        o.remove("metadata");
    }
    walk(&top, schema, "", &mut out);
    out
}

fn walk(v: &Value, s: &Value, path: &str, out: &mut Vec<String>) {
    if v.is_null() {
        if s["nullable"] != Value::Bool(true) {
            out.push(format!("{path}: null, not nullable"));
        }
        return;
    }
    let ty = s["type"].as_str().unwrap_or("");
    let ok = match ty {
        "object" => v.is_object(),
        "array" => v.is_array(),
        "string" => v.is_string(),
        "integer" => v.is_i64() || v.is_u64(),
        "number" => v.is_number(),
        "boolean" => v.is_boolean(),
        _ => true,
    };
    if !ok {
        out.push(format!("{path}: {v} is not of type {ty}"));
        return;
    }
    if let Some(allowed) = s["enum"].as_array() {
        if !allowed.contains(v) {
            out.push(format!("{path}: {v} not in enum {allowed:?}"));
        }
    }
    if let (Some(n), Some(min)) = (v.as_f64(), s["minimum"].as_f64()) {
        if n < min {
            out.push(format!("{path}: {n} below minimum {min}"));
        }
    }
    if let (Some(n), Some(max)) = (v.as_f64(), s["maximum"].as_f64()) {
        if n > max {
            out.push(format!("{path}: {n} above maximum {max}"));
        }
    }
    match v {
        Value::Object(o) => {
            for r in s["required"].as_array().into_iter().flatten() {
                let r = r.as_str().unwrap_or("");
                if !o.contains_key(r) {
                    out.push(format!("{path}.{r}: required, missing"));
                }
            }
            for (k, child) in o {
                let p = format!("{path}.{k}");
                match s["properties"].get(k) {
                    Some(cs) => walk(child, cs, &p, out),
                    None if s["x-kubernetes-preserve-unknown-fields"] == Value::Bool(true) => {}
                    None => out.push(format!(
                        "{p}: not in the CRD schema (the API server would drop it)"
                    )),
                }
            }
        }
        Value::Array(items) => {
            if let Some(max) = s["maxItems"].as_u64() {
                if items.len() as u64 > max {
                    out.push(format!("{path}: {} items, at most {max}", items.len()));
                }
            }
            for (i, item) in items.iter().enumerate() {
                walk(item, &s["items"], &format!("{path}[{i}]"), out);
            }
        }
        _ => {}
    }
}
