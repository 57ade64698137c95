//! Field ownership (`metadata.managedFields`) and server-side apply.
//!
//! Objects are tracked down to their leaves, in the `fieldsV1` form Kubernetes uses. A list
//! is one atomic field unless its schema says otherwise, as in Kubernetes' structured merge
//! diff: the items of an `x-kubernetes-list-type: map` list are tracked one by one by their
//! `x-kubernetes-list-map-keys` (`k:{"type":"Ready"}`), each item's fields with their own
//! owners, and the items of a `set` by their value (`v:"a"`). Two managers can so each own
//! one condition of the same `status.conditions`.

use std::borrow::Borrow;
use std::collections::{BTreeSet, HashMap};
use std::ops::Bound;

use serde_json::{Map, Value, json};

use crate::base::error::Cause;
use crate::base::meta;
use crate::resource::schema::{ListType, Shape};

/// A field's path as its `fieldsV1` segments: `f:name` (an object's field), `k:{...}` (a map
/// list's item by its keys), `v:...` (a set's item by its value). A path ending in an item
/// stands for the item's presence (`.` in `fieldsV1`), not for its fields.
type Path = Vec<String>;

/// Metadata fields a user owns; the rest of metadata is the server's.
const USER_META: [&str; 4] = ["labels", "annotations", "finalizers", "ownerReferences"];

fn is_item(seg: &str) -> bool {
    seg.starts_with("k:") || seg.starts_with("v:")
}

fn ends_in_item(p: &[String]) -> bool {
    p.last().is_some_and(|s| is_item(s))
}

/// The segment of a map list's item: `None` when it is not an object or lacks a key.
fn item_key(item: &Value, keys: &[String]) -> Option<String> {
    let fields = item.as_object()?;
    let mut key = Map::new();
    for name in keys {
        key.insert(name.clone(), fields.get(name)?.clone());
    }
    Some(format!("k:{}", Value::Object(key)))
}

/// The segments of a list's items, in order; `None` when the list is atomic (by its schema, or
/// because its items cannot be told apart: a missing key, a duplicate, a set of objects).
fn item_segs(items: &[Value], shape: Shape<'_>) -> Option<Vec<String>> {
    let segs: Vec<String> = match shape.list() {
        ListType::Atomic => return None,
        ListType::Map(keys) => items
            .iter()
            .map(|i| item_key(i, keys))
            .collect::<Option<_>>()?,
        ListType::Set => items
            .iter()
            .map(|i| (!i.is_object() && !i.is_array()).then(|| format!("v:{i}")))
            .collect::<Option<_>>()?,
    };
    let distinct: BTreeSet<&String> = segs.iter().collect();
    (distinct.len() == segs.len()).then_some(segs)
}

fn leaves(v: &Value, shape: Shape<'_>, path: &mut Path, out: &mut BTreeSet<Path>) {
    match v {
        Value::Object(m) if !m.is_empty() => {
            for (k, child) in m {
                path.push(format!("f:{k}"));
                leaves(child, shape.field(k), path, out);
                path.pop();
            }
        }
        // An empty map list or set holds no item to own (it is no claim on the whole list).
        Value::Array(items) => match item_segs(items, shape) {
            Some(segs) => {
                for (seg, item) in segs.into_iter().zip(items) {
                    path.push(seg);
                    out.insert(path.clone());
                    if let Value::Object(fields) = item {
                        for (k, child) in fields {
                            path.push(format!("f:{k}"));
                            leaves(child, shape.item().field(k), path, out);
                            path.pop();
                        }
                    }
                    path.pop();
                }
            }
            None => {
                out.insert(path.clone());
            }
        },
        _ => {
            out.insert(path.clone());
        }
    }
}

/// The owned paths of an object: everything but apiVersion, kind and server metadata.
fn field_set(obj: &Value, shape: Shape<'_>) -> BTreeSet<Path> {
    let mut out = BTreeSet::new();
    let Some(m) = obj.as_object() else { return out };
    for (k, v) in m {
        match k.as_str() {
            "apiVersion" | "kind" => {}
            "metadata" => {
                for f in USER_META {
                    if let Some(child) = v.get(f) {
                        leaves(
                            child,
                            shape.field("metadata").field(f),
                            &mut vec!["f:metadata".into(), format!("f:{f}")],
                            &mut out,
                        );
                    }
                }
            }
            _ => leaves(v, shape.field(k), &mut vec![format!("f:{k}")], &mut out),
        }
    }
    out
}

/// `to_fields_v1(&field_set(obj))` in one walk, without building the set: what a create
/// records for its manager.
fn fields_v1_of(obj: &Value, shape: Shape<'_>) -> Value {
    /// `None` where `leaves` records nothing.
    fn mirror(v: &Value, shape: Shape<'_>) -> Option<Value> {
        match v {
            Value::Object(m) if !m.is_empty() => {
                let fields: Map<String, Value> = m
                    .iter()
                    .filter_map(|(k, child)| {
                        mirror(child, shape.field(k)).map(|f| (format!("f:{k}"), f))
                    })
                    .collect();
                (!fields.is_empty()).then_some(Value::Object(fields))
            }
            Value::Array(items) if item_segs(items, shape).is_some() => {
                let mut set = BTreeSet::new();
                leaves(v, shape, &mut Vec::new(), &mut set);
                (!set.is_empty()).then(|| to_fields_v1(&set))
            }
            _ => Some(Value::Object(Map::new())),
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
                    .filter_map(|f| {
                        let fields = mirror(v.get(*f)?, shape.field("metadata").field(f))?;
                        Some((format!("f:{f}"), fields))
                    })
                    .collect();
                if !owned.is_empty() {
                    root.insert("f:metadata".into(), Value::Object(owned));
                }
            }
            _ => {
                if let Some(fields) = mirror(v, shape.field(k)) {
                    root.insert(format!("f:{k}"), fields);
                }
            }
        }
    }
    Value::Object(root)
}

/// A map list's item key (`{"type":"Ready"}`), parsed.
fn parse_key(seg: &str) -> Option<Map<String, Value>> {
    serde_json::from_str(seg.strip_prefix("k:")?).ok()
}

/// The segment of each item of a list, for finding items by segment: `None` for an item that
/// has none (an atomic list's items, a map list's item without its keys, a set's object).
fn each_seg(items: &[Value], shape: Shape<'_>) -> Vec<Option<String>> {
    match shape.list() {
        ListType::Atomic => vec![None; items.len()],
        ListType::Map(keys) => items.iter().map(|i| item_key(i, keys)).collect(),
        ListType::Set => items
            .iter()
            .map(|i| (!i.is_object() && !i.is_array()).then(|| format!("v:{i}")))
            .collect(),
    }
}

/// Every value of an object by its path, built in one walk: looking up each of an object's
/// paths then costs no scan of a list, where finding an item by its key in each of n paths
/// would cost n² (a list's first item with a segment answers for it).
struct Index<'a>(HashMap<Path, &'a Value>);

impl<'a> Index<'a> {
    fn new(v: &'a Value, shape: Shape<'_>) -> Self {
        fn walk<'a>(
            v: &'a Value,
            shape: Shape<'_>,
            path: &mut Path,
            out: &mut HashMap<Path, &'a Value>,
        ) {
            if out.contains_key(path.as_slice()) {
                return;
            }
            out.insert(path.clone(), v);
            match v {
                Value::Object(m) => {
                    for (k, child) in m {
                        path.push(format!("f:{k}"));
                        walk(child, shape.field(k), path, out);
                        path.pop();
                    }
                }
                Value::Array(items) => {
                    for (seg, item) in each_seg(items, shape).into_iter().zip(items) {
                        if let Some(seg) = seg {
                            path.push(seg);
                            walk(item, shape.item(), path, out);
                            path.pop();
                        }
                    }
                }
                _ => {}
            }
        }
        let mut out = HashMap::new();
        walk(v, shape, &mut Vec::new(), &mut out);
        Self(out)
    }

    fn get(&self, path: &[String]) -> Option<&'a Value> {
        self.0.get(path).copied()
    }
}

/// Removes the values at `paths` from `v` in one walk (an item from its list by its segment),
/// descending only where a path leads.
fn remove_all(v: &mut Value, shape: Shape<'_>, paths: &BTreeSet<Path>) {
    fn walk(v: &mut Value, shape: Shape<'_>, path: &mut Path, paths: &BTreeSet<Path>) {
        match v {
            Value::Object(m) => m.retain(|k, child| {
                path.push(format!("f:{k}"));
                let keep = !paths.contains(path.as_slice());
                if keep && within(paths, path).next().is_some() {
                    walk(child, shape.field(k), path, paths);
                }
                path.pop();
                keep
            }),
            Value::Array(items) => {
                let segs = each_seg(items, shape);
                let mut kept = Vec::with_capacity(items.len());
                for (seg, mut item) in segs.into_iter().zip(std::mem::take(items)) {
                    if let Some(seg) = seg {
                        path.push(seg);
                        let keep = !paths.contains(path.as_slice());
                        if keep && within(paths, path).next().is_some() {
                            walk(&mut item, shape.item(), path, paths);
                        }
                        path.pop();
                        if !keep {
                            continue;
                        }
                    }
                    kept.push(item);
                }
                *items = kept;
            }
            _ => {}
        }
    }
    if !paths.is_empty() {
        walk(v, shape, &mut Vec::new(), paths);
    }
}

/// The paths of `set` that are `p` or lie within it: one range of the sorted set.
fn within<'s, T: Borrow<[String]> + Ord>(
    set: &'s BTreeSet<T>,
    p: &'s [String],
) -> impl Iterator<Item = &'s [String]> + 's {
    set.range::<[String], _>((Bound::Included(p), Bound::Unbounded))
        .map(Borrow::borrow)
        .take_while(move |q: &&[String]| q.starts_with(p))
}

/// The paths of `set` that are proper prefixes of `p` and hold it whole (not an item's
/// presence).
fn holders<'s, T: Borrow<[String]> + Ord>(
    set: &'s BTreeSet<T>,
    p: &'s [String],
) -> impl Iterator<Item = &'s [String]> + 's {
    (1..p.len())
        .filter(move |n| !ends_in_item(&p[..*n]))
        .filter_map(move |n| set.get(&p[..n]).map(Borrow::borrow))
}

/// The schema shape at `path`.
fn shape_at<'a>(shape: Shape<'a>, path: &[String]) -> Shape<'a> {
    path.iter()
        .fold(shape, |s, seg| match seg.strip_prefix("f:") {
            Some(name) => s.field(name),
            None => s.item(),
        })
}

/// A field as Kubernetes names it in a conflict: `.status.conditions[type="Ready"].status`.
fn render(path: &[String]) -> String {
    let mut out = String::new();
    for seg in path {
        if let Some(name) = seg.strip_prefix("f:") {
            out.push('.');
            out.push_str(name);
        } else if let Some(key) = parse_key(seg) {
            let parts: Vec<String> = key.iter().map(|(k, v)| format!("{k}={v}")).collect();
            out.push_str(&format!("[{}]", parts.join(",")));
        } else if let Some(value) = seg.strip_prefix("v:") {
            out.push_str(&format!("[={value}]"));
        }
    }
    out
}

fn to_fields_v1(set: &BTreeSet<Path>) -> Value {
    let mut root = Map::new();
    for path in set {
        let mut cur = &mut root;
        for seg in path {
            let entry = cur.entry(seg.clone()).or_insert_with(|| json!({}));
            cur = match entry {
                Value::Object(m) => m,
                _ => unreachable!("entries are objects"),
            };
        }
        if ends_in_item(path) {
            cur.insert(".".into(), json!({}));
        }
    }
    Value::Object(root)
}

fn from_fields_v1(v: &Value, path: &mut Path, out: &mut BTreeSet<Path>) {
    let Some(m) = v.as_object() else { return };
    let mut leaf = true;
    for (k, child) in m {
        if k == "." {
            leaf = false;
            if !path.is_empty() {
                out.insert(path.clone());
            }
        } else if k.starts_with("f:") || is_item(k) {
            leaf = false;
            path.push(k.clone());
            from_fields_v1(child, path, out);
            path.pop();
        }
    }
    if leaf && !path.is_empty() {
        out.insert(path.clone());
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

/// The paths of `set` that overlap `p`, found by range and prefix lookups rather than a scan
/// of the set. Owning one of two paths and changing the other touch the same value when they
/// are the same field or one lies within the other; an item's presence does not hold the
/// item's fields: who owns `conditions[type="Ready"]` does not own its `status`.
fn overlapping<'s, T: Borrow<[String]> + Ord>(
    set: &'s BTreeSet<T>,
    p: &'s [String],
) -> Vec<&'s [String]> {
    let mut out: Vec<&[String]> = holders(set, p).collect();
    if ends_in_item(p) {
        out.extend(set.get(p).map(Borrow::borrow));
    } else {
        out.extend(within(set, p));
    }
    out
}

/// Whether a path of `set` overlaps `p` (see [`overlapping`]).
fn overlaps_any<T: Borrow<[String]> + Ord>(set: &BTreeSet<T>, p: &[String]) -> bool {
    holders(set, p).next().is_some()
        || if ends_in_item(p) {
            set.contains(p)
        } else {
            within(set, p).next().is_some()
        }
}

/// Whether a path of `set`, owned by another manager, keeps `p` from being removed: it is `p`
/// or lies within it (an item stays while anyone owns a field of it), or it holds `p` whole.
fn keeps<T: Borrow<[String]> + Ord>(set: &BTreeSet<T>, p: &[String]) -> bool {
    within(set, p).next().is_some() || holders(set, p).next().is_some()
}

/// Whether `p` is a key field of a map list's item (`conditions[type="Ready"].type`): it goes
/// only with its item.
fn is_key_field(p: &[String]) -> bool {
    match p {
        [.., item, field] => parse_key(item)
            .zip(field.strip_prefix("f:"))
            .is_some_and(|(key, name)| key.contains_key(name)),
        _ => false,
    }
}

/// Whether the value at `p` differs between `old` and `new`; for an item, whether it is new.
fn changed(old: &Index<'_>, new: &Index<'_>, p: &[String]) -> bool {
    if ends_in_item(p) {
        old.get(p).is_none()
    } else {
        old.get(p) != new.get(p)
    }
}

/// Records that `manager` changed `new` from `old` (a create when `old` is None): the fields it
/// changed become its own and no longer anyone else's; fields that no longer exist are owned by
/// nobody. `shape` (the type's schema) says which lists are tracked item by item.
pub fn record_update(
    new: &mut Value,
    old: Option<&Value>,
    manager: &str,
    api_version: &str,
    subresource: Option<&str>,
    shape: Shape<'_>,
) {
    if old.is_none() && new.pointer("/metadata/managedFields").is_none() {
        // A create: every field is the creator's.
        let fields = fields_v1_of(new, shape);
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
    let now_set = field_set(new, shape);
    let new_index = Index::new(new, shape);
    let old_index = old.map(|o| Index::new(o, shape));
    let changed: Vec<Path> = now_set
        .iter()
        .filter(|p| old_index.as_ref().is_none_or(|o| changed(o, &new_index, p)))
        .cloned()
        .collect();
    // Each owned field is checked against the changed ones (and not each changed field
    // against each manager's), so the work follows the size of managedFields however many
    // entries it holds.
    let changed_set: BTreeSet<&[String]> = changed.iter().map(Vec::as_slice).collect();
    for e in &mut list {
        let others = !(e.manager == manager
            && e.operation == "Update"
            && e.subresource.as_deref() == subresource);
        e.fields
            .retain(|q| new_index.get(q).is_some() && !(others && overlaps_any(&changed_set, q)));
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

/// Merges `src` into `dst`: objects field by field, map lists and sets item by item (an item
/// `dst` lacks is appended), anything else replaced.
fn merge(dst: &mut Value, src: &Value, shape: Shape<'_>) {
    match (dst, src) {
        (Value::Object(d), Value::Object(s)) => {
            for (k, v) in s {
                match d.get_mut(k) {
                    Some(existing)
                        if (existing.is_object() && v.is_object())
                            || (existing.is_array() && v.is_array()) =>
                    {
                        merge(existing, v, shape.field(k));
                    }
                    _ => {
                        d.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        (Value::Array(d), Value::Array(s)) => match (item_segs(d, shape), item_segs(s, shape)) {
            (Some(have), Some(segs)) => {
                let mut at: HashMap<String, usize> =
                    have.into_iter().enumerate().map(|(i, h)| (h, i)).collect();
                for (seg, item) in segs.into_iter().zip(s) {
                    match at.get(&seg) {
                        Some(&i) => merge(&mut d[i], item, shape.item()),
                        None => {
                            at.insert(seg, d.len());
                            d.push(item.clone());
                        }
                    }
                }
            }
            _ => d.clone_from(s),
        },
        (d, s) => *d = s.clone(),
    }
}

/// Whether applying `want` where `now` is changes nothing by itself: an empty object, map list
/// or set merges into what is there.
fn merges_unchanged(now: &Value, want: &Value, shape: Shape<'_>) -> bool {
    match (now, want) {
        (Value::Object(_), Value::Object(w)) => w.is_empty(),
        (Value::Array(_), Value::Array(w)) => w.is_empty() && *shape.list() != ListType::Atomic,
        _ => false,
    }
}

/// What of an applied object the endpoint it was sent to applies, as Kubernetes resets the
/// rest: for a type with a status subresource, the object's own endpoint never applies
/// `status` and the status endpoint applies only `status` (and the names in metadata). A
/// manifest that carries a status (an exported object) so never makes its applier an owner
/// of the status the controllers write.
pub fn endpoint_part<'a>(
    applied: &'a Value,
    subresource: Option<&str>,
    status_subresource: bool,
) -> std::borrow::Cow<'a, Value> {
    use std::borrow::Cow;
    let Some(fields) = applied.as_object().filter(|_| status_subresource) else {
        return Cow::Borrowed(applied);
    };
    match subresource {
        None if fields.contains_key("status") => {
            let mut out = fields.clone();
            out.remove("status");
            Cow::Owned(Value::Object(out))
        }
        Some("status") => {
            let mut out: Map<String, Value> = fields
                .iter()
                .filter(|(k, _)| matches!(k.as_str(), "apiVersion" | "kind" | "status"))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            if let Some(m) = fields.get("metadata").and_then(Value::as_object) {
                let names: Map<String, Value> = m
                    .iter()
                    .filter(|(k, _)| matches!(k.as_str(), "name" | "namespace"))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                out.insert("metadata".into(), Value::Object(names));
            }
            Cow::Owned(Value::Object(out))
        }
        _ => Cow::Borrowed(applied),
    }
}

/// Server-side apply of `applied` by `manager` onto `live`: fields `manager` applied before and
/// no longer applies are removed (unless someone else owns them), applied fields are merged in,
/// and changing a field another manager owns is a conflict unless `force`. `shape` (the type's
/// schema) says which lists merge item by item; any other list is one field.
///
/// # Errors
/// The conflicts, one cause per field (`.status.conditions[type="Ready"].status`), naming the
/// manager that owns it.
pub fn apply(
    live: &Value,
    applied: &Value,
    manager: &str,
    api_version: &str,
    force: bool,
    subresource: Option<&str>,
    shape: Shape<'_>,
) -> Result<Value, Vec<Cause>> {
    let mut list = entries(live);
    let mine = |e: &Entry| {
        e.manager == manager && e.operation == "Apply" && e.subresource.as_deref() == subresource
    };
    let applied_set = field_set(applied, shape);
    let previous: BTreeSet<Path> = list
        .iter()
        .filter(|e| mine(e))
        .flat_map(|e| e.fields.clone())
        .collect();

    let live_index = Index::new(live, shape);
    let applied_index = Index::new(applied, shape);
    // The applied fields that change what is there. An item that is there already changes
    // only by its fields (checked each).
    let changing: BTreeSet<&[String]> = applied_set
        .iter()
        .filter(|p| !ends_in_item(p))
        .filter(|p| {
            let (Some(now), Some(want)) = (live_index.get(p), applied_index.get(p)) else {
                return false;
            };
            now != want && !merges_unchanged(now, want, shape_at(shape, p))
        })
        .map(Vec::as_slice)
        .collect();
    // Each other manager's field against the changing ones: the work follows the size of
    // managedFields however many entries it holds. A conflict is (field, entry), in the
    // field's order and then the entries'.
    let mut clashes: BTreeSet<(&[String], usize)> = BTreeSet::new();
    for (i, e) in list.iter().enumerate().filter(|(_, e)| !mine(e)) {
        for q in &e.fields {
            clashes.extend(overlapping(&changing, q).into_iter().map(|p| (p, i)));
        }
    }
    if !clashes.is_empty() {
        if !force {
            return Err(clashes
                .into_iter()
                .map(|(p, i)| {
                    let e = &list[i];
                    let field = render(p);
                    Cause {
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
                    }
                })
                .collect());
        }
        let taken: BTreeSet<usize> = clashes.iter().map(|(_, i)| *i).collect();
        for i in taken {
            list[i].fields.retain(|q| !overlaps_any(&changing, q));
        }
    }

    let mut out = live.clone();
    if let Some(m) = out.get_mut("metadata").and_then(Value::as_object_mut) {
        m.remove("managedFields");
    }
    let others: BTreeSet<&[String]> = list
        .iter()
        .filter(|e| !mine(e))
        .flat_map(|e| e.fields.iter().map(Vec::as_slice))
        .collect();
    let gone: BTreeSet<Path> = previous
        .difference(&applied_set)
        .filter(|p| !is_key_field(p) && !keeps(&others, p))
        .cloned()
        .collect();
    remove_all(&mut out, shape, &gone);
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
    merge(&mut out, &body, shape);

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
        assert_eq!(
            fields_v1_of(&o, Shape::unknown()),
            to_fields_v1(&field_set(&o, Shape::unknown()))
        );
        let bare = json!({"apiVersion": "v1", "kind": "X", "metadata": {"name": "n"}});
        assert_eq!(
            fields_v1_of(&bare, Shape::unknown()),
            to_fields_v1(&field_set(&bare, Shape::unknown()))
        );
        // And record_update of a create matches the general path's result.
        let mut fast = o.clone();
        record_update(
            &mut fast,
            None,
            "kubectl",
            "compute.stratus.dev/v1",
            None,
            Shape::unknown(),
        );
        let entry = &fast["metadata"]["managedFields"][0];
        assert_eq!(entry["manager"], "kubectl");
        assert_eq!(entry["operation"], "Update");
        assert_eq!(
            entry["fieldsV1"],
            to_fields_v1(&field_set(&o, Shape::unknown()))
        );
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
            Shape::unknown(),
        )
        .expect("applies");
        assert_eq!(first["spec"]["ramMiB"], 512);
        let second = apply(
            &first,
            &obj(json!({"vcpus": 2})),
            "a",
            "v1",
            false,
            None,
            Shape::unknown(),
        )
        .expect("applies");
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
        let mut first =
            apply(&json!({}), &cfg, "a", "v1", false, None, Shape::unknown()).expect("applies");
        // Make the recorded time clearly in the past.
        first["metadata"]["managedFields"][0]["time"] = json!("2020-01-01T00:00:00Z");
        let again = apply(&first, &cfg, "a", "v1", false, None, Shape::unknown()).expect("applies");
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
            Shape::unknown(),
        )
        .expect("applies");
        let err = apply(
            &first,
            &obj(json!({"vcpus": 4})),
            "b",
            "v1",
            false,
            None,
            Shape::unknown(),
        )
        .expect_err("conflicts");
        assert_eq!(err[0].field, ".spec.vcpus");
        assert!(err[0].message.contains("\"a\""));
        // Same value: shared ownership, no conflict.
        let shared = apply(
            &first,
            &obj(json!({"vcpus": 1})),
            "b",
            "v1",
            false,
            None,
            Shape::unknown(),
        )
        .expect("applies");
        assert_eq!(
            shared["metadata"]["managedFields"].as_array().map(Vec::len),
            Some(2)
        );
        let forced = apply(
            &first,
            &obj(json!({"vcpus": 4})),
            "b",
            "v1",
            true,
            None,
            Shape::unknown(),
        )
        .expect("applies");
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
            Shape::unknown(),
        )
        .expect("applies");
        let old = o.clone();
        o["spec"]["vcpus"] = json!(8);
        record_update(
            &mut o,
            Some(&old),
            "kubectl-edit",
            "v1",
            None,
            Shape::unknown(),
        );
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
            Shape::unknown(),
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
            Shape::unknown(),
        )
        .expect("applies");
        let both = apply(
            &first,
            &obj(json!({"vcpus": 1})),
            "b",
            "v1",
            false,
            None,
            Shape::unknown(),
        )
        .expect("applies");
        let after = apply(&both, &json!({"apiVersion": "compute.stratus.dev/v1", "kind": "Flavor", "metadata": {"name": "f"}}), "a", "v1", false, None, Shape::unknown()).expect("applies");
        assert_eq!(after["spec"]["vcpus"], 1);
    }

    /// A schema whose `status.conditions` is a map keyed by `type`, `spec.tags` a set and
    /// `spec.disks` a list without a marker.
    fn lists() -> crate::resource::schema::Structural {
        crate::resource::schema::Structural::compile(&json!({
            "type": "object",
            "properties": {
                "spec": {"type": "object", "properties": {
                    "tags": {"type": "array", "items": {"type": "string"},
                             "x-kubernetes-list-type": "set"},
                    "disks": {"type": "array", "items": {"type": "object",
                              "properties": {"name": {"type": "string"}, "size": {"type": "integer"}}}},
                }},
                "status": {"type": "object", "properties": {
                    "phase": {"type": "string"},
                    "conditions": {
                        "type": "array",
                        "x-kubernetes-list-type": "map",
                        "x-kubernetes-list-map-keys": ["type"],
                        "items": {"type": "object", "properties": {
                            "type": {"type": "string"}, "status": {"type": "string"},
                            "reason": {"type": "string"}, "message": {"type": "string"},
                        }},
                    },
                }},
            },
        }))
        .expect("compiles")
    }

    fn status(conditions: Value) -> Value {
        json!({"apiVersion": "v1", "kind": "K", "metadata": {"name": "o"},
               "status": {"conditions": conditions}})
    }

    fn cond(t: &str, s: &str, reason: &str) -> Value {
        json!({"type": t, "status": s, "reason": reason})
    }

    /// Thousands of items cost no scan of the list per item: recording an update that changes
    /// every one of 5,000 conditions, applying them all under another manager and applying
    /// none of them again take well under the bound, where a scan per item took minutes.
    #[test]
    fn thousands_of_map_items_are_recorded_and_applied_without_a_scan_per_item() {
        const N: usize = 5_000;
        let started = std::time::Instant::now();
        let schema = lists();
        let conds = |s: &str| -> Value {
            (0..N)
                .map(|i| cond(&format!("C{i}"), s, "R"))
                .collect::<Vec<_>>()
                .into()
        };
        let mut created = status(conds("False"));
        record_update(&mut created, None, "a", "v1", None, schema.shape());
        let mut updated = status(conds("True"));
        updated["metadata"] = created["metadata"].clone();
        record_update(
            &mut updated,
            Some(&created),
            "b",
            "v1",
            Some("status"),
            schema.shape(),
        );
        let entries = entries(&updated);
        assert_eq!(entries.len(), 2);
        let b = &entries[1];
        assert_eq!(b.manager, "b");
        // b owns each item's status, and only that; a keeps the items and their other fields.
        assert_eq!(b.fields.len(), N);
        assert!(
            b.fields
                .iter()
                .all(|p| p.last().is_some_and(|f| f == "f:status"))
        );
        assert!(entries[0].fields.contains(&vec![
            "f:status".to_string(),
            "f:conditions".into(),
            r#"k:{"type":"C4999"}"#.into(),
            "f:reason".into(),
        ]));
        assert!(
            !entries[0]
                .fields
                .iter()
                .any(|p| p.last().is_some_and(|f| f == "f:status"))
        );

        // c applies a new reason on every condition (forced over a), then applies none: the
        // reasons it took go with it, the items stay (a and b own fields of them).
        let mut applied = status(conds("True"));
        for c in applied["status"]["conditions"]
            .as_array_mut()
            .expect("list")
        {
            c["reason"] = json!("Applied");
            c.as_object_mut().expect("item").remove("status");
        }
        let took =
            apply(&updated, &applied, "c", "v1", true, None, schema.shape()).expect("forced apply");
        let list = took["status"]["conditions"].as_array().expect("list");
        assert_eq!(list.len(), N);
        assert!(
            list.iter()
                .all(|c| c["reason"] == "Applied" && c["status"] == "True")
        );
        let left = apply(
            &took,
            &status(json!([])),
            "c",
            "v1",
            false,
            None,
            schema.shape(),
        )
        .expect("applies");
        let list = left["status"]["conditions"].as_array().expect("list");
        assert_eq!(list.len(), N);
        assert!(
            list.iter()
                .all(|c| c.get("reason").is_none() && c["status"] == "True")
        );
        assert_eq!(list[N - 1]["type"], format!("C{}", N - 1));
        // About 1 s on a quiet machine; a scan per item took minutes. The bound leaves room
        // for a loaded machine, not for a quadratic pass.
        let elapsed = started.elapsed();
        assert!(
            elapsed < std::time::Duration::from_secs(60),
            "took {elapsed:?}"
        );
    }

    /// Thousands of managers cost no pass over every manager for each changed field: an update
    /// and a forced apply changing 4,000 labels, each owned by a manager of its own, take
    /// every label from its owner.
    #[test]
    fn thousands_of_managers_are_checked_field_by_field() {
        const N: usize = 4_000;
        let started = std::time::Instant::now();
        let labelled = |value: &str| -> Value {
            let labels: Map<String, Value> =
                (0..N).map(|i| (format!("l{i}"), json!(value))).collect();
            let managed: Vec<Value> = (0..N)
                .map(|i| {
                    let mut label = Map::new();
                    label.insert(format!("f:l{i}"), json!({}));
                    entry_json(
                        format!("m{i}"),
                        "Update".into(),
                        "v1".into(),
                        "2026-01-01T00:00:00Z".into(),
                        None,
                        json!({"f:metadata": {"f:labels": label}}),
                    )
                })
                .collect();
            json!({"apiVersion": "v1", "kind": "K",
                   "metadata": {"name": "o", "labels": labels, "managedFields": managed}})
        };
        let old = labelled("a");
        let mut new = labelled("b");
        record_update(&mut new, Some(&old), "x", "v1", None, Shape::unknown());
        let after = entries(&new);
        assert_eq!(after.len(), 1, "every other manager lost its only field");
        assert_eq!((after[0].manager.as_str(), after[0].fields.len()), ("x", N));

        let mut applied = labelled("c");
        applied["metadata"]
            .as_object_mut()
            .expect("metadata")
            .remove("managedFields");
        let conflict = apply(&old, &applied, "y", "v1", false, None, Shape::unknown())
            .expect_err("each label is another's");
        assert_eq!(conflict.len(), N);
        assert_eq!(conflict[0].field, ".metadata.labels.l0");
        let took = apply(&old, &applied, "y", "v1", true, None, Shape::unknown()).expect("forced");
        let after = entries(&took);
        assert_eq!(after.len(), 1);
        assert_eq!((after[0].manager.as_str(), after[0].fields.len()), ("y", N));
        // Well under 1 s on a quiet machine; a pass over every manager per field took minutes.
        let elapsed = started.elapsed();
        assert!(
            elapsed < std::time::Duration::from_secs(60),
            "took {elapsed:?}"
        );
    }

    #[test]
    fn map_list_items_are_tracked_by_key_as_kubernetes_encodes_them() {
        let schema = lists();
        let o = status(json!([cond("Ready", "True", "Running")]));
        let fields = fields_v1_of(&o, schema.shape());
        assert_eq!(
            fields,
            json!({"f:status": {"f:conditions": {"k:{\"type\":\"Ready\"}": {
                ".": {}, "f:type": {}, "f:status": {}, "f:reason": {}}}}})
        );
        assert_eq!(fields, to_fields_v1(&field_set(&o, schema.shape())));
        let mut back = BTreeSet::new();
        from_fields_v1(&fields, &mut Vec::new(), &mut back);
        assert_eq!(back, field_set(&o, schema.shape()));
        // An empty map list is no claim on the list: nothing to own.
        let empty = status(json!([]));
        assert_eq!(fields_v1_of(&empty, schema.shape()), json!({}));
        assert_eq!(to_fields_v1(&field_set(&empty, schema.shape())), json!({}));
    }

    #[test]
    fn two_managers_each_own_one_condition_of_the_same_list() {
        let schema = lists();
        let a = apply(
            &json!({}),
            &status(json!([cond("Ready", "True", "Running")])),
            "agent",
            "v1",
            true,
            Some("status"),
            schema.shape(),
        )
        .expect("applies");
        let b = apply(
            &a,
            &status(json!([cond("Scheduled", "True", "Placed")])),
            "scheduler",
            "v1",
            true,
            Some("status"),
            schema.shape(),
        )
        .expect("applies");
        assert_eq!(
            b["status"]["conditions"],
            json!([
                cond("Ready", "True", "Running"),
                cond("Scheduled", "True", "Placed")
            ])
        );
        // The agent changes its condition: the scheduler's stays.
        let c = apply(
            &b,
            &status(json!([cond("Ready", "False", "Stopped")])),
            "agent",
            "v1",
            false,
            Some("status"),
            schema.shape(),
        )
        .expect("no conflict: the agent owns Ready");
        assert_eq!(
            c["status"]["conditions"],
            json!([
                cond("Ready", "False", "Stopped"),
                cond("Scheduled", "True", "Placed")
            ])
        );
        // The agent stops applying Ready: it goes, the scheduler's condition does not.
        let d = apply(
            &c,
            &status(json!([])),
            "agent",
            "v1",
            false,
            Some("status"),
            schema.shape(),
        )
        .expect("applies");
        assert_eq!(
            d["status"]["conditions"],
            json!([cond("Scheduled", "True", "Placed")])
        );
    }

    #[test]
    fn changing_anothers_item_field_conflicts_by_item_unless_forced() {
        let schema = lists();
        let a = apply(
            &json!({}),
            &status(json!([cond("Ready", "True", "Running")])),
            "agent",
            "v1",
            false,
            Some("status"),
            schema.shape(),
        )
        .expect("applies");
        let err = apply(
            &a,
            &status(json!([cond("Ready", "Unknown", "Running")])),
            "nodes",
            "v1",
            false,
            Some("status"),
            schema.shape(),
        )
        .expect_err("conflicts");
        assert_eq!(err.len(), 1, "{err:?}");
        assert_eq!(err[0].field, ".status.conditions[type=\"Ready\"].status");
        assert!(err[0].message.contains("\"agent\""), "{err:?}");
        let forced = apply(
            &a,
            &status(json!([cond("Ready", "Unknown", "Running")])),
            "nodes",
            "v1",
            true,
            Some("status"),
            schema.shape(),
        )
        .expect("a forced apply takes the field");
        assert_eq!(forced["status"]["conditions"][0]["status"], "Unknown");
        // The agent kept the fields it still shares; it lost only `status`.
        let entries = entries(&forced);
        let agent = entries
            .iter()
            .find(|e| e.manager == "agent")
            .expect("agent");
        let ready = |f: &str| -> Path {
            ["f:status", "f:conditions", "k:{\"type\":\"Ready\"}", f]
                .map(String::from)
                .to_vec()
        };
        assert!(agent.fields.contains(&ready("f:reason")));
        assert!(!agent.fields.contains(&ready("f:status")));
    }

    #[test]
    fn an_item_stays_while_another_manager_owns_a_field_of_it() {
        let schema = lists();
        let a = apply(
            &json!({}),
            &status(json!([cond("Ready", "True", "Running")])),
            "agent",
            "v1",
            false,
            Some("status"),
            schema.shape(),
        )
        .expect("applies");
        let b = apply(
            &a,
            &status(json!([{"type": "Ready", "message": "seen"}])),
            "nodes",
            "v1",
            false,
            Some("status"),
            schema.shape(),
        )
        .expect("adds a field to the agent's item");
        let c = apply(
            &b,
            &status(json!([])),
            "agent",
            "v1",
            false,
            Some("status"),
            schema.shape(),
        )
        .expect("applies");
        // The item and its key stay for "nodes"; the agent's own fields go.
        assert_eq!(
            c["status"]["conditions"],
            json!([{"type": "Ready", "message": "seen"}])
        );
    }

    #[test]
    fn a_set_merges_by_value_and_an_unmarked_list_stays_atomic() {
        let schema = lists();
        let spec = |s: Value| json!({"apiVersion": "v1", "kind": "K", "metadata": {"name": "o"}, "spec": s});
        let a = apply(
            &json!({}),
            &spec(json!({"tags": ["a"], "disks": [{"name": "root", "size": 1}]})),
            "alice",
            "v1",
            false,
            None,
            schema.shape(),
        )
        .expect("applies");
        let b = apply(
            &a,
            &spec(json!({"tags": ["b"]})),
            "bob",
            "v1",
            false,
            None,
            schema.shape(),
        )
        .expect("a set's other item is no conflict");
        assert_eq!(b["spec"]["tags"], json!(["a", "b"]));
        let err = apply(
            &b,
            &spec(json!({"disks": [{"name": "data", "size": 2}]})),
            "bob",
            "v1",
            false,
            None,
            schema.shape(),
        )
        .expect_err("the list is one field, alice's");
        assert_eq!(err[0].field, ".spec.disks");
        let forced = apply(
            &b,
            &spec(json!({"disks": [{"name": "data", "size": 2}]})),
            "bob",
            "v1",
            true,
            None,
            schema.shape(),
        )
        .expect("forced");
        assert_eq!(
            forced["spec"]["disks"],
            json!([{"name": "data", "size": 2}])
        );
    }

    #[test]
    fn an_update_takes_only_the_items_it_changes() {
        let schema = lists();
        let a = apply(
            &json!({}),
            &status(json!([
                cond("Ready", "True", "Running"),
                cond("Scheduled", "True", "Placed")
            ])),
            "agent",
            "v1",
            false,
            Some("status"),
            schema.shape(),
        )
        .expect("applies");
        let mut edited = a.clone();
        edited["status"]["conditions"][1]["reason"] = json!("Moved");
        record_update(
            &mut edited,
            Some(&a),
            "kubectl-edit",
            "v1",
            Some("status"),
            schema.shape(),
        );
        // The agent still owns all of Ready, so applying it again is no conflict...
        apply(
            &edited,
            &status(json!([
                cond("Ready", "False", "Stopped"),
                cond("Scheduled", "True", "Placed")
            ])),
            "agent",
            "v1",
            false,
            Some("status"),
            schema.shape(),
        )
        .map_err(|e| format!("{e:?}"))
        .expect_err("...but Scheduled's reason is kubectl-edit's now");
        let ok = apply(
            &edited,
            &status(json!([
                cond("Ready", "False", "Stopped"),
                cond("Scheduled", "True", "Moved")
            ])),
            "agent",
            "v1",
            false,
            Some("status"),
            schema.shape(),
        )
        .expect("only Ready's fields changed");
        assert_eq!(ok["status"]["conditions"][0]["status"], "False");
    }

    #[test]
    fn finalizers_are_a_set_each_owned_by_who_added_it() {
        let schema = crate::resource::schema::Structural::compile(&json!({"type": "object"}))
            .expect("compiles");
        let with = |f: Value| {
            json!({"apiVersion": "v1", "kind": "K",
                                     "metadata": {"name": "o", "finalizers": f}})
        };
        let a = apply(
            &json!({}),
            &with(json!(["user.example/keep"])),
            "kubectl",
            "v1",
            false,
            None,
            schema.shape(),
        )
        .expect("applies");
        let mut added = a.clone();
        added["metadata"]["finalizers"] = json!(["user.example/keep", "stratus.dev/teardown"]);
        record_update(&mut added, Some(&a), "binding", "v1", None, schema.shape());
        // The manifest applied again, without the controller's finalizer: no conflict, and
        // the controller's finalizer stays.
        let again = apply(
            &added,
            &with(json!(["user.example/keep"])),
            "kubectl",
            "v1",
            false,
            None,
            schema.shape(),
        )
        .expect("no conflict over another's finalizer");
        assert_eq!(
            again["metadata"]["finalizers"],
            json!(["user.example/keep", "stratus.dev/teardown"])
        );
        let dropped = apply(
            &again,
            &with(json!([])),
            "kubectl",
            "v1",
            false,
            None,
            schema.shape(),
        )
        .expect("applies");
        assert_eq!(
            dropped["metadata"]["finalizers"],
            json!(["stratus.dev/teardown"])
        );
    }
}
