//! Status writes by server-side apply: a reconciler computes the whole typed status it wants,
//! and applies, under its field manager, the fields it owns and the fields it changed, so it
//! owns exactly what it writes and never the fields of another writer.

use serde_json::{Map, Value};

/// The list field every Stratus status keys by `type` (`x-kubernetes-list-type: map`).
const CONDITIONS: &str = "conditions";

/// The status to apply for a reconciler that read `read` and wants `new`, when the status
/// stored now is `live` and the reconciler owns `owned` (its apply's `fieldsV1` under
/// `f:status`; `{}` when it owns nothing yet): of the status it means ([`merged`]: `live` with
/// its changes from `read` to `new`), every field it owns, and every field that differs from
/// `live`. A field it owned and dropped (`read` has it, `new` lacks it) is left out, so the
/// apply removes it; a field it owns that was written after `read` is applied as stored, not
/// dropped; a field of another writer it did not change is left out, so the apply keeps it as
/// the other wrote it. `None` when `new` is `read`, or when it changes nothing stored.
///
/// Conditions go item by item (by `type`), whole: the writer of a condition owns all of it.
/// Any other list is one field.
pub fn to_apply(read: &Value, new: &Value, live: &Value, owned: &Value) -> Option<Value> {
    if read == new {
        return None;
    }
    over(live, &merged(read, new, live), owned)
}

/// The fields of `new` that `owned` owns or that differ from `old` (see [`to_apply`]).
fn over(old: &Value, new: &Value, owned: &Value) -> Option<Value> {
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

/// The status a reconciler that read `read` and wants `new` means, now that the stored status
/// is `live`: `live` with the reconciler's changes (what differs between `read` and `new`)
/// made to it. A field the reconciler did not change keeps its stored value, so a reconcile
/// that read a copy older than a write made since (its own earlier write, which its cache has
/// not seen yet) neither drops the fields that write added nor sends back their older values.
/// A field `read` has and `new` lacks is dropped.
///
/// Conditions merge item by item (by `type`); any other list is one value.
pub fn merged(read: &Value, new: &Value, live: &Value) -> Value {
    merge(Some(read), new, Some(live)).unwrap_or_else(|| Value::Object(Map::new()))
}

/// One field of [`merged`]: `None` when it is not to be there.
fn merge(read: Option<&Value>, new: &Value, live: Option<&Value>) -> Option<Value> {
    if read == Some(new) {
        return live.cloned();
    }
    let (Some(Value::Object(read)), Value::Object(new)) = (read, new) else {
        return Some(new.clone());
    };
    let mut out = match live {
        Some(Value::Object(live)) => live.clone(),
        _ => Map::new(),
    };
    for (k, nv) in new {
        let part = match (k.as_str(), read.get(k), nv, out.get(k)) {
            (CONDITIONS, Some(Value::Array(rv)), Value::Array(nv), lv) => {
                let lv = lv.and_then(Value::as_array).map_or(&[][..], Vec::as_slice);
                Some(merge_conditions(rv, nv, lv))
            }
            (_, rv, nv, lv) => merge(rv, nv, lv),
        };
        match part {
            Some(v) => out.insert(k.clone(), v),
            None => out.remove(k),
        };
    }
    for k in read.keys().filter(|k| !new.contains_key(*k)) {
        out.remove(k);
    }
    Some(Value::Object(out))
}

/// [`merged`] for conditions: the stored ones, each the reconciler changed (or added) put in
/// its place (or after them), each it dropped taken out.
fn merge_conditions(read: &[Value], new: &[Value], live: &[Value]) -> Value {
    let type_of = |c: &Value| c.get("type").cloned();
    let find = |list: &[Value], t: &Option<Value>| -> Option<usize> {
        t.as_ref()
            .and_then(|t| list.iter().position(|c| type_of(c).as_ref() == Some(t)))
    };
    let mut out = live.to_vec();
    for c in new {
        let t = type_of(c);
        if t.is_some() && find(read, &t).map(|i| &read[i]) == Some(c) {
            continue;
        }
        match find(&out, &t) {
            Some(i) => out[i] = c.clone(),
            None => out.push(c.clone()),
        }
    }
    for c in read {
        let t = type_of(c);
        if find(new, &t).is_none()
            && let Some(i) = find(&out, &t)
        {
            out.remove(i);
        }
    }
    Value::Array(out)
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
            to_apply(&old, &new, &old, &json!({})),
            Some(json!({"phase": "Running", "conditions": [cond("Ready", "True")]}))
        );
        assert_eq!(to_apply(&old, &old, &old, &json!({})), None);
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
            to_apply(&old, &new, &old, &owned),
            Some(json!({"phase": "Error", "conditions": [cond("Ready", "True")]}))
        );
    }

    #[test]
    fn nested_objects_carry_only_their_owned_or_changed_fields() {
        let owned = json!({"f:capacity": {"f:vcpus": {}}});
        let old = json!({"capacity": {"vcpus": 2, "ramMiB": 512}, "allocated": {"vcpus": 1}});
        let new = json!({"capacity": {"vcpus": 2, "ramMiB": 1024}, "allocated": {"vcpus": 1}});
        assert_eq!(
            to_apply(&old, &new, &old, &owned),
            Some(json!({"capacity": {"vcpus": 2, "ramMiB": 1024}}))
        );
    }

    /// The compute agent built a guest (phase Running, with the flavor, image and launch time
    /// it made it with) and is then told of another writer's change made before that write:
    /// the copy it reconciles lacks what it wrote. It observes the guest, now shut off, and
    /// writes phase and power state from that copy.
    fn agent_after_its_build() -> (Value, Value, Value, Value) {
        let owned = json!({"f:phase": {}, "f:flavor": {}, "f:image": {}, "f:launchedAt": {},
                           "f:powerState": {},
                           "f:conditions": {"k:{\"type\":\"Ready\"}": {".": {}, "f:status": {}}}});
        let live = json!({"hypervisor": "n1", "phase": "Running", "flavor": "m1.small",
                          "image": "tiny", "launchedAt": "2026-12-01T08:00:00Z",
                          "powerState": "Running",
                          "addresses": [{"ip": "10.0.0.5"}],
                          "conditions": [cond("Allocated", "True"), cond("Ready", "True")]});
        let read = json!({"hypervisor": "n1", "phase": "Building",
                          "addresses": [{"ip": "10.0.0.5"}],
                          "conditions": [cond("Allocated", "True"), cond("Ready", "False")]});
        let new = json!({"hypervisor": "n1", "phase": "Stopped", "powerState": "Shutdown",
                         "addresses": [{"ip": "10.0.0.5"}],
                         "conditions": [cond("Allocated", "True"), cond("Ready", "False")]});
        (read, new, live, owned)
    }

    #[test]
    fn a_write_from_a_copy_older_than_the_writers_last_write_keeps_what_that_write_added() {
        let (read, new, live, owned) = agent_after_its_build();
        // Applied from the old copy alone, the apply would leave out flavor, image and
        // launchedAt, which the agent owns: the API server would remove them.
        assert_eq!(
            to_apply(&read, &new, &live, &owned),
            Some(
                json!({"phase": "Stopped", "flavor": "m1.small", "image": "tiny",
                        "launchedAt": "2026-12-01T08:00:00Z", "powerState": "Shutdown",
                        "conditions": [cond("Ready", "True")]})
            )
        );
        // What that copy leads to is already stored: nothing is sent.
        let mut running = new.clone();
        running["phase"] = json!("Running");
        running["powerState"] = json!("Running");
        running["conditions"] = json!([cond("Allocated", "True"), cond("Ready", "True")]);
        assert_eq!(to_apply(&read, &running, &live, &owned), None);
    }

    #[test]
    fn a_field_written_since_the_read_and_not_changed_is_applied_as_stored() {
        let (_, _, mut live, owned) = agent_after_its_build();
        live["phase"] = json!("Stopped");
        // The copy has the launch time of an earlier boot; this write changes only the phase.
        let mut read = live.clone();
        read["launchedAt"] = json!("2026-12-01T07:00:00Z");
        let mut new = read.clone();
        new["phase"] = json!("Running");
        let sent = to_apply(&read, &new, &live, &owned).expect("something to apply");
        assert_eq!(sent["launchedAt"], "2026-12-01T08:00:00Z");
        assert_eq!(sent["phase"], "Running");
        // Another writer's fields are not taken over.
        assert_eq!(sent.get("addresses"), None);
        assert_eq!(sent.get("hypervisor"), None);
    }

    #[test]
    fn a_field_the_writer_drops_is_removed_even_from_an_old_copy() {
        let (_, _, live, owned) = agent_after_its_build();
        // A rebuild drops the image it saw; the copy's other fields are older than stored.
        let mut read = live.clone();
        read["launchedAt"] = json!("2026-12-01T07:00:00Z");
        let mut new = read.clone();
        new.as_object_mut().map(|m| m.remove("image"));
        new["conditions"] = json!([cond("Allocated", "True")]);
        let sent = to_apply(&read, &new, &live, &owned).expect("something to apply");
        assert_eq!(sent.get("image"), None, "{sent}");
        assert_eq!(sent["flavor"], "m1.small");
        assert_eq!(sent["launchedAt"], "2026-12-01T08:00:00Z");
        // Its Ready condition dropped: left out, so removed; Allocated is another's.
        assert_eq!(sent["conditions"], json!([]));
        // Nothing changed from the copy: nothing sent, whatever is stored.
        assert_eq!(to_apply(&read, &read, &live, &owned), None);
    }

    #[test]
    fn merged_is_the_stored_status_with_the_writers_changes() {
        let read = json!({"a": 1, "b": {"x": 1, "y": 1}, "gone": true,
                          "conditions": [cond("Ready", "False"), cond("Old", "True")]});
        let new = json!({"a": 2, "b": {"x": 1, "y": 2},
                         "conditions": [cond("Ready", "True"), cond("New", "True")]});
        let live = json!({"a": 1, "b": {"x": 5, "y": 1, "z": 1}, "gone": true, "later": 1,
                          "conditions": [cond("Other", "True"), cond("Ready", "False"),
                                         cond("Old", "True")]});
        assert_eq!(
            merged(&read, &new, &live),
            json!({"a": 2, "b": {"x": 5, "y": 2, "z": 1}, "later": 1,
                   "conditions": [cond("Other", "True"), cond("Ready", "True"),
                                  cond("New", "True")]})
        );
        // A read as fresh as what is stored: what the writer wants.
        assert_eq!(merged(&read, &new, &read), new);
        // Nothing stored yet: the changes alone.
        assert_eq!(
            merged(&json!({}), &json!({"phase": "Running"}), &Value::Null),
            json!({"phase": "Running"})
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
