//! Strategic merge patch for the Kubernetes built-in types Stratus serves (Lease, Event), as
//! kubectl's default `kubectl patch` and client libraries send it. Maps merge as in a JSON merge
//! patch; lists replace, except those Kubernetes merges: `metadata.finalizers` (a set) and
//! `metadata.ownerReferences` (keyed by `uid`).

use serde_json::{Map, Value};

use crate::base::error::Cause;

/// Lists merged by key rather than replaced: (path, key; None for a set of scalars).
const MERGED_LISTS: [(&str, Option<&str>); 2] = [
    ("metadata.finalizers", None),
    ("metadata.ownerReferences", Some("uid")),
];

/// Applies `patch` to `doc`.
///
/// # Errors
/// A cause naming the directive Stratus does not support.
pub fn patch(doc: &Value, patch: &Value) -> Result<Value, Cause> {
    let mut out = doc.clone();
    merge(&mut out, patch, "")?;
    Ok(out)
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

fn merge(dst: &mut Value, patch: &Value, path: &str) -> Result<(), Cause> {
    let Value::Object(p) = patch else {
        *dst = patch.clone();
        return Ok(());
    };
    if !dst.is_object() {
        *dst = Value::Object(Map::new());
    }
    let Some(d) = dst.as_object_mut() else {
        return Ok(());
    };
    for (k, v) in p {
        if let Some(field) = k.strip_prefix("$deleteFromPrimitiveList/") {
            if let (Some(Value::Array(have)), Value::Array(gone)) = (d.get_mut(field), v) {
                have.retain(|x| !gone.contains(x));
            }
            continue;
        }
        if k.starts_with("$setElementOrder/") || k == "$retainKeys" {
            continue;
        }
        if k.starts_with('$') {
            return Err(Cause::invalid(
                join(path, k),
                format!("unsupported strategic merge patch directive {k}"),
            ));
        }
        let here = join(path, k);
        if v.is_null() {
            d.remove(k);
            continue;
        }
        let merged = MERGED_LISTS
            .iter()
            .find(|(p, _)| *p == here)
            .map(|(_, key)| *key);
        match (merged, d.get_mut(k), v) {
            (Some(key), Some(Value::Array(have)), Value::Array(add)) => merge_list(have, add, key),
            (_, Some(existing), Value::Object(_)) if existing.is_object() => {
                merge(existing, v, &here)?
            }
            _ => {
                let mut fresh = Value::Null;
                merge(&mut fresh, v, &here)?;
                d.insert(k.clone(), if v.is_object() { fresh } else { v.clone() });
            }
        }
    }
    Ok(())
}

fn merge_list(have: &mut Vec<Value>, add: &[Value], key: Option<&str>) {
    for item in add {
        match key {
            None if !have.contains(item) => have.push(item.clone()),
            None => {}
            Some(key) => {
                let id = item.get(key);
                if item.get("$patch").and_then(Value::as_str) == Some("delete") {
                    have.retain(|x| x.get(key) != id);
                } else if let Some(existing) = have.iter_mut().find(|x| x.get(key) == id) {
                    json_patch::merge(existing, item);
                } else {
                    have.push(item.clone());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn maps_merge_lists_replace_and_finalizers_union() {
        let doc = json!({"metadata": {"name": "l", "finalizers": ["a"], "labels": {"x": "1"}}, "spec": {"holderIdentity": "n1", "list": [1, 2]}});
        let out = patch(&doc, &json!({"metadata": {"finalizers": ["b"], "labels": {"x": null, "y": "2"}}, "spec": {"holderIdentity": "n2", "list": [3]}})).expect("patches");
        assert_eq!(out["metadata"]["finalizers"], json!(["a", "b"]));
        assert_eq!(out["metadata"]["labels"], json!({"y": "2"}));
        assert_eq!(out["spec"], json!({"holderIdentity": "n2", "list": [3]}));
        let out = patch(
            &out,
            &json!({"metadata": {"$deleteFromPrimitiveList/finalizers": ["a"]}}),
        )
        .expect("patches");
        assert_eq!(out["metadata"]["finalizers"], json!(["b"]));
    }

    #[test]
    fn owner_references_merge_by_uid() {
        let doc = json!({"metadata": {"ownerReferences": [{"uid": "1", "name": "a"}, {"uid": "2", "name": "b"}]}});
        let out = patch(&doc, &json!({"metadata": {"ownerReferences": [{"uid": "2", "name": "B"}, {"uid": "3", "name": "c"}, {"uid": "1", "$patch": "delete"}]}})).expect("patches");
        assert_eq!(
            out["metadata"]["ownerReferences"],
            json!([{"uid": "2", "name": "B"}, {"uid": "3", "name": "c"}])
        );
    }

    #[test]
    fn unknown_directives_are_refused() {
        assert!(patch(&json!({}), &json!({"$patch": "replace"})).is_err());
    }
}
