//! Field ownership (`metadata.managedFields`) and server-side apply.
//!
//! Objects are tracked down to their leaves; a list is one atomic field, as Kubernetes treats
//! lists without merge keys.

use std::collections::BTreeSet;

use serde_json::{Map, Value, json};

use crate::base::error::Cause;
use crate::base::meta;

type Path = Vec<String>;

/// Metadata fields a user owns; the rest of metadata is the server's.
const USER_META: [&str; 4] = ["labels", "annotations", "finalizers", "ownerReferences"];

fn leaves(v: &Value, path: &mut Path, out: &mut BTreeSet<Path>) {
    match v {
        Value::Object(m) if !m.is_empty() => {
            for (k, child) in m {
                path.push(k.clone());
                leaves(child, path, out);
                path.pop();
            }
        }
        _ => {
            out.insert(path.clone());
        }
    }
}

/// The owned leaf paths of an object: everything but apiVersion, kind and server metadata.
fn field_set(obj: &Value) -> BTreeSet<Path> {
    let mut out = BTreeSet::new();
    let Some(m) = obj.as_object() else { return out };
    for (k, v) in m {
        match k.as_str() {
            "apiVersion" | "kind" => {}
            "metadata" => {
                for f in USER_META {
                    if let Some(child) = v.get(f) {
                        leaves(child, &mut vec!["metadata".into(), f.into()], &mut out);
                    }
                }
            }
            _ => leaves(v, &mut vec![k.clone()], &mut out),
        }
    }
    out
}

/// `to_fields_v1(&field_set(obj))` in one walk, without building the set: what a create
/// records for its manager.
fn fields_v1_of(obj: &Value) -> Value {
    fn mirror(v: &Value) -> Value {
        match v {
            Value::Object(m) if !m.is_empty() => Value::Object(
                m.iter()
                    .map(|(k, child)| (format!("f:{k}"), mirror(child)))
                    .collect(),
            ),
            _ => Value::Object(Map::new()),
        }
    }
    let mut root = Map::new();
    let Some(m) = obj.as_object() else {
        return Value::Object(root);
    };
    for (k, v) in m {
        match k.as_str() {
            "apiVersion" | "kind" => {}
            "metadata" => {
                let owned: Map<String, Value> = USER_META
                    .iter()
                    .filter_map(|f| v.get(*f).map(|child| (format!("f:{f}"), mirror(child))))
                    .collect();
                if !owned.is_empty() {
                    root.insert("f:metadata".into(), Value::Object(owned));
                }
            }
            _ => {
                root.insert(format!("f:{k}"), mirror(v));
            }
        }
    }
    Value::Object(root)
}

fn get<'a>(v: &'a Value, path: &[String]) -> Option<&'a Value> {
    path.iter().try_fold(v, |cur, seg| cur.get(seg))
}

fn remove(v: &mut Value, path: &[String]) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let mut cur = v;
    for seg in parents {
        match cur.get_mut(seg) {
            Some(next) => cur = next,
            None => return,
        }
    }
    if let Some(m) = cur.as_object_mut() {
        m.remove(last);
    }
}

fn to_fields_v1(set: &BTreeSet<Path>) -> Value {
    let mut root = Map::new();
    for path in set {
        let mut cur = &mut root;
        for seg in path {
            let entry = cur.entry(format!("f:{seg}")).or_insert_with(|| json!({}));
            cur = match entry {
                Value::Object(m) => m,
                _ => unreachable!("entries are objects"),
            };
        }
    }
    Value::Object(root)
}

fn from_fields_v1(v: &Value, path: &mut Path, out: &mut BTreeSet<Path>) {
    let Some(m) = v.as_object() else { return };
    let children: Vec<(&String, &Value)> = m.iter().filter(|(k, _)| k.starts_with("f:")).collect();
    if children.is_empty() {
        if !path.is_empty() {
            out.insert(path.clone());
        }
        return;
    }
    for (k, child) in children {
        path.push(k[2..].to_string());
        from_fields_v1(child, path, out);
        path.pop();
    }
}

/// One `managedFields` entry.
#[derive(Debug, Clone)]
struct Entry {
    manager: String,
    operation: String,
    api_version: String,
    subresource: Option<String>,
    time: String,
    fields: BTreeSet<Path>,
}

fn entries(obj: &Value) -> Vec<Entry> {
    obj.pointer("/metadata/managedFields")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|e| {
            let mut fields = BTreeSet::new();
            if let Some(f) = e.get("fieldsV1") {
                from_fields_v1(f, &mut Vec::new(), &mut fields);
            }
            Entry {
                manager: e
                    .get("manager")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .into(),
                operation: e
                    .get("operation")
                    .and_then(Value::as_str)
                    .unwrap_or("Update")
                    .into(),
                api_version: e
                    .get("apiVersion")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .into(),
                subresource: e
                    .get("subresource")
                    .and_then(Value::as_str)
                    .map(String::from),
                time: e
                    .get("time")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .into(),
                fields,
            }
        })
        .collect()
}

/// One managedFields entry, built in place (`json!` would copy `fields` through the
/// serializer).
fn entry_json(
    manager: String,
    operation: String,
    api_version: String,
    time: String,
    subresource: Option<String>,
    fields: Value,
) -> Value {
    let mut entry = Map::new();
    entry.insert("manager".into(), Value::String(manager));
    entry.insert("operation".into(), Value::String(operation));
    entry.insert("apiVersion".into(), Value::String(api_version));
    entry.insert("time".into(), Value::String(time));
    entry.insert("fieldsType".into(), Value::String("FieldsV1".into()));
    entry.insert("fieldsV1".into(), fields);
    if let Some(s) = subresource {
        entry.insert("subresource".into(), Value::String(s));
    }
    Value::Object(entry)
}

fn store_entries(obj: &mut Value, list: Vec<Entry>) {
    let list: Vec<Value> = list
        .into_iter()
        .filter(|e| !e.fields.is_empty())
        .map(|e| {
            let fields = to_fields_v1(&e.fields);
            entry_json(
                e.manager,
                e.operation,
                e.api_version,
                e.time,
                e.subresource,
                fields,
            )
        })
        .collect();
    let m = meta::meta_mut(obj);
    if list.is_empty() {
        m.remove("managedFields");
    } else {
        m.insert("managedFields".into(), Value::Array(list));
    }
}

fn overlaps(a: &[String], b: &[String]) -> bool {
    a.starts_with(b) || b.starts_with(a)
}

fn drop_overlapping(set: &mut BTreeSet<Path>, p: &[String]) {
    set.retain(|q| !overlaps(q, p));
}

/// Records that `manager` changed `new` from `old` (a create when `old` is None): the fields it
/// changed become its own and no longer anyone else's; fields that no longer exist are owned by
/// nobody.
pub fn record_update(
    new: &mut Value,
    old: Option<&Value>,
    manager: &str,
    api_version: &str,
    subresource: Option<&str>,
) {
    if old.is_none() && new.pointer("/metadata/managedFields").is_none() {
        // A create: every field is the creator's.
        let fields = fields_v1_of(new);
        if fields.as_object().is_some_and(|f| !f.is_empty()) {
            let entry = entry_json(
                manager.into(),
                "Update".into(),
                api_version.into(),
                meta::now(),
                subresource.map(String::from),
                fields,
            );
            meta::meta_mut(new).insert("managedFields".into(), Value::Array(vec![entry]));
        }
        return;
    }
    let mut list = entries(new);
    let now_set = field_set(new);
    let changed: Vec<Path> = now_set
        .iter()
        .filter(|p| old.is_none_or(|o| get(o, p) != get(new, p)))
        .cloned()
        .collect();
    for e in &mut list {
        e.fields.retain(|p| get(new, p).is_some());
        if !(e.manager == manager
            && e.operation == "Update"
            && e.subresource.as_deref() == subresource)
        {
            for p in &changed {
                drop_overlapping(&mut e.fields, p);
            }
        }
    }
    if !changed.is_empty() {
        let idx = list.iter().position(|e| {
            e.manager == manager
                && e.operation == "Update"
                && e.subresource.as_deref() == subresource
        });
        let entry = match idx {
            Some(i) => &mut list[i],
            None => {
                list.push(Entry {
                    manager: manager.into(),
                    operation: "Update".into(),
                    api_version: api_version.into(),
                    subresource: subresource.map(String::from),
                    time: String::new(),
                    fields: BTreeSet::new(),
                });
                let last = list.len() - 1;
                &mut list[last]
            }
        };
        entry.fields.extend(changed);
        entry.time = meta::now();
        entry.api_version = api_version.into();
    }
    store_entries(new, list);
}

fn merge(dst: &mut Value, src: &Value) {
    match (dst, src) {
        (Value::Object(d), Value::Object(s)) => {
            for (k, v) in s {
                match d.get_mut(k) {
                    Some(existing) if existing.is_object() && v.is_object() => merge(existing, v),
                    _ => {
                        d.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        (d, s) => *d = s.clone(),
    }
}

/// Server-side apply of `applied` by `manager` onto `live`: fields `manager` applied before and
/// no longer applies are removed (unless someone else owns them), applied fields are merged in,
/// and changing a field another manager owns is a conflict unless `force`.
///
/// # Errors
/// The conflicts, one cause per field, naming the manager that owns it.
pub fn apply(
    live: &Value,
    applied: &Value,
    manager: &str,
    api_version: &str,
    force: bool,
    subresource: Option<&str>,
) -> Result<Value, Vec<Cause>> {
    let mut list = entries(live);
    let mine = |e: &Entry| {
        e.manager == manager && e.operation == "Apply" && e.subresource.as_deref() == subresource
    };
    let applied_set = field_set(applied);
    let previous: BTreeSet<Path> = list
        .iter()
        .filter(|e| mine(e))
        .flat_map(|e| e.fields.clone())
        .collect();

    let mut conflicts = Vec::new();
    for p in &applied_set {
        let (now, want) = (get(live, p), get(applied, p));
        if now.is_none() || now == want {
            continue;
        }
        for e in list.iter_mut().filter(|e| !mine(e)) {
            if e.fields.iter().any(|q| overlaps(q, p)) {
                if force {
                    drop_overlapping(&mut e.fields, p);
                } else {
                    let field = format!(".{}", p.join("."));
                    conflicts.push(Cause {
                        reason: "FieldManagerConflict".into(),
                        message: format!(
                            "conflict with \"{}\"{}: {field}",
                            e.manager,
                            if e.operation == "Update" {
                                " using ".to_string() + &e.api_version
                            } else {
                                String::new()
                            }
                        ),
                        field,
                    });
                }
            }
        }
    }
    if !conflicts.is_empty() {
        return Err(conflicts);
    }

    let mut out = live.clone();
    if let Some(m) = out.get_mut("metadata").and_then(Value::as_object_mut) {
        m.remove("managedFields");
    }
    for p in previous.difference(&applied_set) {
        let owned_elsewhere = list
            .iter()
            .filter(|e| !mine(e))
            .any(|e| e.fields.iter().any(|q| overlaps(q, p)));
        if !owned_elsewhere {
            remove(&mut out, p);
        }
    }
    let mut body = applied.clone();
    if let Some(m) = body.get_mut("metadata").and_then(Value::as_object_mut) {
        m.retain(|k, _| {
            USER_META.contains(&k.as_str())
                || matches!(k.as_str(), "name" | "namespace" | "generateName")
        });
    }
    if out.as_object().is_none_or(Map::is_empty) {
        out = json!({});
    }
    merge(&mut out, &body);

    // Re-applying the same fields is a no-op: the entry keeps its time, so nothing is written.
    let time = list
        .iter()
        .find(|e| mine(e) && e.fields == applied_set && e.api_version == api_version)
        .map(|e| e.time.clone())
        .unwrap_or_else(meta::now);
    list.retain(|e| !mine(e));
    list.push(Entry {
        manager: manager.into(),
        operation: "Apply".into(),
        api_version: api_version.into(),
        subresource: subresource.map(String::from),
        time,
        fields: applied_set,
    });
    store_entries(&mut out, list);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(spec: Value) -> Value {
        json!({"apiVersion": "compute.stratus.dev/v1", "kind": "Flavor", "metadata": {"name": "f"}, "spec": spec})
    }

    #[test]
    fn a_create_records_the_same_fields_as_the_general_rule() {
        let o = json!({
            "apiVersion": "compute.stratus.dev/v1", "kind": "Server",
            "metadata": {"name": "s", "namespace": "p", "uid": "u", "labels": {"a": "1", "b": ""},
                         "annotations": {}, "finalizers": ["x"]},
            "spec": {"flavor": "m1", "networks": [{"network": "n"}], "empty": {},
                     "nested": {"deep": {"leaf": 1, "list": []}}},
            "status": {"phase": "Pending"}
        });
        assert_eq!(fields_v1_of(&o), to_fields_v1(&field_set(&o)));
        let bare = json!({"apiVersion": "v1", "kind": "X", "metadata": {"name": "n"}});
        assert_eq!(fields_v1_of(&bare), to_fields_v1(&field_set(&bare)));
        // And record_update of a create matches the general path's result.
        let mut fast = o.clone();
        record_update(&mut fast, None, "kubectl", "compute.stratus.dev/v1", None);
        let entry = &fast["metadata"]["managedFields"][0];
        assert_eq!(entry["manager"], "kubectl");
        assert_eq!(entry["operation"], "Update");
        assert_eq!(entry["fieldsV1"], to_fields_v1(&field_set(&o)));
    }

    #[test]
    fn apply_then_reapply_without_a_field_removes_it() {
        let first = apply(
            &json!({}),
            &obj(json!({"vcpus": 1, "ramMiB": 512})),
            "a",
            "v1",
            false,
            None,
        )
        .expect("applies");
        assert_eq!(first["spec"]["ramMiB"], 512);
        let second =
            apply(&first, &obj(json!({"vcpus": 2})), "a", "v1", false, None).expect("applies");
        assert_eq!(second["spec"], json!({"vcpus": 2}));
        let mf = second["metadata"]["managedFields"]
            .as_array()
            .expect("managed");
        assert_eq!(mf.len(), 1);
        assert_eq!(mf[0]["fieldsV1"], json!({"f:spec": {"f:vcpus": {}}}));
    }

    #[test]
    fn reapplying_the_same_configuration_changes_nothing() {
        let cfg = obj(json!({"vcpus": 1}));
        let mut first = apply(&json!({}), &cfg, "a", "v1", false, None).expect("applies");
        // Make the recorded time clearly in the past.
        first["metadata"]["managedFields"][0]["time"] = json!("2020-01-01T00:00:00Z");
        let again = apply(&first, &cfg, "a", "v1", false, None).expect("applies");
        assert_eq!(again, first);
    }

    #[test]
    fn changing_anothers_field_conflicts_unless_forced() {
        let first = apply(
            &json!({}),
            &obj(json!({"vcpus": 1})),
            "a",
            "v1",
            false,
            None,
        )
        .expect("applies");
        let err = apply(&first, &obj(json!({"vcpus": 4})), "b", "v1", false, None)
            .expect_err("conflicts");
        assert_eq!(err[0].field, ".spec.vcpus");
        assert!(err[0].message.contains("\"a\""));
        // Same value: shared ownership, no conflict.
        let shared =
            apply(&first, &obj(json!({"vcpus": 1})), "b", "v1", false, None).expect("applies");
        assert_eq!(
            shared["metadata"]["managedFields"].as_array().map(Vec::len),
            Some(2)
        );
        let forced =
            apply(&first, &obj(json!({"vcpus": 4})), "b", "v1", true, None).expect("applies");
        assert_eq!(forced["spec"]["vcpus"], 4);
        let mf = forced["metadata"]["managedFields"]
            .as_array()
            .expect("managed");
        assert_eq!(mf.len(), 1, "a lost its only field: {mf:?}");
    }

    #[test]
    fn updates_take_ownership_from_appliers() {
        let mut o = apply(
            &json!({}),
            &obj(json!({"vcpus": 1, "ramMiB": 512})),
            "a",
            "v1",
            false,
            None,
        )
        .expect("applies");
        let old = o.clone();
        o["spec"]["vcpus"] = json!(8);
        record_update(&mut o, Some(&old), "kubectl-edit", "v1", None);
        let mf = o["metadata"]["managedFields"]
            .as_array()
            .expect("managed")
            .clone();
        assert_eq!(mf.len(), 2);
        assert_eq!(mf[0]["fieldsV1"], json!({"f:spec": {"f:ramMiB": {}}}));
        assert_eq!(mf[1]["manager"], "kubectl-edit");
        // Now "a" re-applying vcpus=1 conflicts with kubectl-edit.
        let err = apply(
            &o,
            &obj(json!({"vcpus": 1, "ramMiB": 512})),
            "a",
            "v1",
            false,
            None,
        )
        .expect_err("conflicts");
        assert!(err[0].message.contains("kubectl-edit"), "{err:?}");
    }

    #[test]
    fn fields_owned_by_another_survive_removal_by_the_applier() {
        let first = apply(
            &json!({}),
            &obj(json!({"vcpus": 1})),
            "a",
            "v1",
            false,
            None,
        )
        .expect("applies");
        let both =
            apply(&first, &obj(json!({"vcpus": 1})), "b", "v1", false, None).expect("applies");
        let after = apply(&both, &json!({"apiVersion": "compute.stratus.dev/v1", "kind": "Flavor", "metadata": {"name": "f"}}), "a", "v1", false, None).expect("applies");
        assert_eq!(after["spec"]["vcpus"], 1);
    }
}
