//! Status writes by server-side apply: a reconciler computes the whole typed status it wants,
//! and applies, under its field manager, the fields it owns and the fields it changed, so it
//! owns exactly what it writes and never the fields of another writer.

use serde_json::{Map, Value};

/// The list field every Stratus status keys by `type` (`x-kubernetes-list-type: map`).
const CONDITIONS: &str = "conditions";

/// The status to apply for a reconciler that read `old`, wants `new`, and owns `owned` (its
/// apply's `fieldsV1` under `f:status`; `{}` when it owns nothing yet): every field of `new` it
/// owns, and every field of `new` that differs from `old`. A field it owned and `new` lacks is
/// left out, so the apply removes it; a field of another writer it did not change is left out,
/// so the apply keeps it as the other wrote it. `None` when `new` is `old`.
///
/// Conditions go item by item (by `type`), whole: the writer of a condition owns all of it.
/// Any other list is one field.
pub fn to_apply(old: &Value, new: &Value, owned: &Value) -> Option<Value> {
    if old == new {
        return None;
    }
    // At the top, `{}` owns nothing; below, it owns its field whole.
    let owned = owned.as_object().filter(|o| !o.is_empty());
    Some(pick(Some(old), new, owned).unwrap_or_else(|| Value::Object(Map::new())))
}

/// Whether a `fieldsV1` node owns its field whole (it names nothing inside it).
fn whole(owned: &Map<String, Value>) -> bool {
    !owned
        .keys()
        .any(|k| k.starts_with("f:") || k.starts_with("k:"))
}

/// What of `new` to apply, given its `old` value and the node of `fieldsV1` that owns it
/// (`None`: not owned): `None` when nothing of it is owned or changed.
fn pick(old: Option<&Value>, new: &Value, owned: Option<&Map<String, Value>>) -> Option<Value> {
    let changed = old != Some(new);
    match (old, new, owned) {
        (_, _, Some(o)) if whole(o) => Some(new.clone()),
        (Some(Value::Object(old)), Value::Object(new), owned) => {
            let mut out = Map::new();
            for (k, nv) in new {
                let own = owned
                    .and_then(|o| o.get(&format!("f:{k}")))
                    .and_then(Value::as_object);
                let part = match (k.as_str(), old.get(k), nv) {
                    (CONDITIONS, Some(Value::Array(ov)), Value::Array(nv)) => {
                        conditions(ov, nv, own)
                    }
                    (_, ov, nv) => pick(ov, nv, own),
                };
                if let Some(part) = part {
                    out.insert(k.clone(), part);
                }
            }
            (!out.is_empty() || changed && new.is_empty()).then_some(Value::Object(out))
        }
        _ if changed || owned.is_some() => Some(new.clone()),
        _ => None,
    }
}

/// The conditions of `new` that are owned (by `k:{"type":...}`) or differ from `old`'s
/// condition of their type.
fn conditions(old: &[Value], new: &[Value], owned: Option<&Map<String, Value>>) -> Option<Value> {
    let type_of = |c: &Value| c.get("type").cloned();
    let picked: Vec<Value> = new
        .iter()
        .filter(|c| {
            let Some(t) = type_of(c) else { return true };
            let key = format!("k:{}", serde_json::json!({ "type": t }));
            owned.is_some_and(|o| o.contains_key(&key))
                || old.iter().find(|o| type_of(o).as_ref() == Some(&t)) != Some(*c)
        })
        .cloned()
        .collect();
    (!picked.is_empty() || owned.is_some()).then_some(Value::Array(picked))
}

/// The `fieldsV1` under `f:status` of the apply entry of `manager` on the status subresource,
/// among `managed_fields` (an object's `metadata.managedFields`); `{}` when there is none.
pub fn owned_status(managed_fields: &Value, manager: &str) -> Value {
    managed_fields
        .as_array()
        .into_iter()
        .flatten()
        .find(|e| {
            e.get("manager").and_then(Value::as_str) == Some(manager)
                && e.get("operation").and_then(Value::as_str) == Some("Apply")
                && e.get("subresource").and_then(Value::as_str) == Some("status")
        })
        .and_then(|e| e.pointer("/fieldsV1/f:status"))
        .cloned()
        .unwrap_or_else(|| Value::Object(Map::new()))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn cond(t: &str, s: &str) -> Value {
        json!({"type": t, "status": s, "reason": "R", "message": ""})
    }

    #[test]
    fn a_first_write_applies_only_what_it_changed() {
        let old = json!({"phase": "Pending", "placement": {"node": "a"},
                         "conditions": [cond("Scheduled", "True")]});
        let new = json!({"phase": "Running", "placement": {"node": "a"},
                         "conditions": [cond("Scheduled", "True"), cond("Ready", "True")]});
        assert_eq!(
            to_apply(&old, &new, &json!({})),
            Some(json!({"phase": "Running", "conditions": [cond("Ready", "True")]}))
        );
        assert_eq!(to_apply(&old, &old, &json!({})), None);
    }

    #[test]
    fn owned_fields_are_applied_again_and_dropped_ones_left_out() {
        let owned = json!({"f:phase": {}, "f:sha256": {},
                           "f:conditions": {"k:{\"type\":\"Ready\"}": {".": {}, "f:status": {}}}});
        let old = json!({"phase": "Active", "sha256": "ab", "sizeBytes": 3,
                         "conditions": [cond("Ready", "True"), cond("Reconciled", "False")]});
        // The phase changes; sha256 is dropped (left out, so the apply removes it); Ready is
        // owned and applied again unchanged; Reconciled is another writer's, unchanged.
        let new = json!({"phase": "Error", "sizeBytes": 3,
                         "conditions": [cond("Ready", "True"), cond("Reconciled", "False")]});
        assert_eq!(
            to_apply(&old, &new, &owned),
            Some(json!({"phase": "Error", "conditions": [cond("Ready", "True")]}))
        );
    }

    #[test]
    fn nested_objects_carry_only_their_owned_or_changed_fields() {
        let owned = json!({"f:capacity": {"f:vcpus": {}}});
        let old = json!({"capacity": {"vcpus": 2, "ramMiB": 512}, "allocated": {"vcpus": 1}});
        let new = json!({"capacity": {"vcpus": 2, "ramMiB": 1024}, "allocated": {"vcpus": 1}});
        assert_eq!(
            to_apply(&old, &new, &owned),
            Some(json!({"capacity": {"vcpus": 2, "ramMiB": 1024}}))
        );
    }

    #[test]
    fn the_owned_entry_is_the_managers_status_apply() {
        let mf = json!([
            {"manager": "agent", "operation": "Update", "subresource": "status",
             "fieldsV1": {"f:status": {"f:phase": {}}}},
            {"manager": "agent", "operation": "Apply", "subresource": "status",
             "fieldsV1": {"f:status": {"f:sha256": {}}}},
            {"manager": "other", "operation": "Apply", "subresource": "status",
             "fieldsV1": {"f:status": {"f:phase": {}}}},
        ]);
        assert_eq!(owned_status(&mf, "agent"), json!({"f:sha256": {}}));
        assert_eq!(owned_status(&mf, "nobody"), json!({}));
        assert_eq!(owned_status(&Value::Null, "agent"), json!({}));
    }
}
