//! Structural schemas: pruning of unknown fields, defaulting and validation of objects.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use schemars::JsonSchema;
use serde_json::{Map, Value};

use crate::base::error::Cause;
use crate::base::field_path::FieldPath;

/// The schema of `T` in the structural form Kubernetes uses for CRDs (no `$ref`, enums and
/// nullable fields rewritten), as kube-derive generates it.
pub fn schema_for<T: JsonSchema>() -> Value {
    let generator = schemars::generate::SchemaSettings::openapi3()
        .with(|s| {
            s.inline_subschemas = true;
            s.meta_schema = None;
        })
        .with_transform(schemars::transform::AddNullable::default())
        .with_transform(kube_core_schema::StructuralSchemaRewriter)
        .with_transform(kube_core_schema::OptionalEnum)
        .with_transform(kube_core_schema::OptionalIntOrString)
        .into_generator();
    serde_json::to_value(generator.into_root_schema_for::<T>()).unwrap_or(Value::Null)
}

use kube::core::schema as kube_core_schema;

/// One node of a structural schema.
#[derive(Debug, Clone, Default)]
struct Node {
    nullable: bool,
    properties: BTreeMap<String, Node>,
    additional: Option<Box<Node>>,
    items: Option<Box<Node>>,
    preserve_unknown: bool,
    is_object: bool,
    default: Option<Value>,
    list: ListType,
}

/// How server-side apply merges a list (`x-kubernetes-list-type`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum ListType {
    /// Replaced whole, by one owner (a list without a marker, or `atomic`).
    #[default]
    Atomic,
    /// Items are objects told apart by these fields (`map` with `x-kubernetes-list-map-keys`);
    /// each item, and each field of it, has its own owner.
    Map(Vec<String>),
    /// Items are distinct scalars, each with its own owner (`set`).
    Set,
}

/// Where a field sits in a compiled schema, for server-side apply to know its lists'
/// types; `Shape::unknown()` (no schema) treats every list as atomic.
#[derive(Debug, Clone, Copy, Default)]
pub struct Shape<'a>(Option<&'a Node>);

impl<'a> Shape<'a> {
    /// A shape without a schema: every list atomic.
    pub const fn unknown() -> Self {
        Self(None)
    }

    /// The shape of the field `name` of this object (or of its map's values).
    pub fn field(self, name: &str) -> Self {
        Self(
            self.0
                .and_then(|n| n.properties.get(name).or(n.additional.as_deref())),
        )
    }

    /// The shape of this list's items.
    pub fn item(self) -> Self {
        Self(self.0.and_then(|n| n.items.as_deref()))
    }

    /// How this list merges.
    pub fn list(self) -> &'a ListType {
        static ATOMIC: ListType = ListType::Atomic;
        self.0.map_or(&ATOMIC, |n| &n.list)
    }
}

impl Node {
    fn compile(schema: &Value) -> Self {
        let mut n = Node {
            nullable: schema
                .get("nullable")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            preserve_unknown: schema
                .get("x-kubernetes-preserve-unknown-fields")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            default: schema.get("default").cloned(),
            list: match schema.get("x-kubernetes-list-type").and_then(Value::as_str) {
                Some("map") => {
                    let keys: Vec<String> = schema
                        .get("x-kubernetes-list-map-keys")
                        .and_then(Value::as_array)
                        .into_iter()
                        .flatten()
                        .filter_map(|k| k.as_str().map(String::from))
                        .collect();
                    // A map without keys cannot tell its items apart: atomic.
                    if keys.is_empty() {
                        ListType::Atomic
                    } else {
                        ListType::Map(keys)
                    }
                }
                Some("set") => ListType::Set,
                _ => ListType::Atomic,
            },
            ..Default::default()
        };
        n.is_object = schema.get("type").and_then(Value::as_str) == Some("object")
            || schema.get("properties").is_some();
        if let Some(props) = schema.get("properties").and_then(Value::as_object) {
            for (k, v) in props {
                n.properties.insert(k.clone(), Node::compile(v));
            }
        }
        // Properties declared only inside anyOf/oneOf/allOf branches still count as known.
        for key in ["anyOf", "oneOf", "allOf"] {
            for branch in schema
                .get(key)
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                if let Some(props) = branch.get("properties").and_then(Value::as_object) {
                    n.is_object = true;
                    for (k, v) in props {
                        n.properties
                            .entry(k.clone())
                            .or_insert_with(|| Node::compile(v));
                    }
                }
            }
        }
        match schema.get("additionalProperties") {
            Some(Value::Object(_)) => {
                n.additional = Some(Box::new(Node::compile(&schema["additionalProperties"])));
            }
            Some(Value::Bool(true)) => n.preserve_unknown = true,
            _ => {}
        }
        if let Some(items) = schema.get("items") {
            n.items = Some(Box::new(Node::compile(items)));
        }
        // `{"type": "object"}` with nothing declared is a free-form object (e.g. FieldsV1).
        if n.is_object
            && n.properties.is_empty()
            && n.additional.is_none()
            && schema.get("additionalProperties").is_none()
        {
            n.preserve_unknown = true;
        }
        n
    }

    /// Removes unknown fields and nulls where the schema does not allow null, recording the
    /// unknown fields' paths; then fills defaults for absent fields.
    fn prune_and_default(&self, v: &mut Value, at: FieldPath<'_>, unknown: &mut Vec<String>) {
        match v {
            Value::Object(map) => {
                if let Some(add) = &self.additional {
                    map.retain(|k, child| {
                        add.prune_and_default(child, FieldPath::Key(&at, k), unknown);
                        !child.is_null() || add.nullable
                    });
                    return;
                }
                if self.preserve_unknown && self.properties.is_empty() {
                    return;
                }
                if !self.is_object {
                    return;
                }
                // Known fields are walked, unknown ones kept only where the schema preserves
                // them, and nulls dropped where the schema does not allow null.
                map.retain(|k, cv| match self.properties.get(k) {
                    Some(child) => {
                        child.prune_and_default(cv, FieldPath::Key(&at, k), unknown);
                        !cv.is_null() || child.nullable
                    }
                    None if self.preserve_unknown => !cv.is_null(),
                    None => {
                        unknown.push(FieldPath::Key(&at, k).render());
                        false
                    }
                });
                for (k, child) in &self.properties {
                    if !map.contains_key(k)
                        && let Some(d) = &child.default
                    {
                        let mut d = d.clone();
                        child.prune_and_default(&mut d, FieldPath::Key(&at, k), &mut Vec::new());
                        map.insert(k.clone(), d);
                    }
                }
            }
            Value::Array(items) => {
                if let Some(item) = &self.items {
                    for (i, child) in items.iter_mut().enumerate() {
                        item.prune_and_default(child, FieldPath::Index(&at, i), unknown);
                    }
                }
            }
            _ => {}
        }
    }
}

/// A compiled object schema: a tree for pruning and defaulting plus a JSON Schema validator.
pub struct Structural {
    root: Node,
    validator: jsonschema::Validator,
}

impl std::fmt::Debug for Structural {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Structural").finish_non_exhaustive()
    }
}

/// The schema of `metadata`, shared by every kind, with Kubernetes' list types: finalizers
/// are a set and owner references a map keyed by `uid`, so server-side apply merges them
/// (a controller's finalizer and a manifest's live side by side).
pub fn object_meta_schema() -> Value {
    let mut s = schema_for::<ObjectMeta>();
    if let Some(o) = s.as_object_mut() {
        o.remove("title");
    }
    if let Some(f) = s
        .pointer_mut("/properties/finalizers")
        .and_then(Value::as_object_mut)
    {
        f.insert("x-kubernetes-list-type".into(), "set".into());
    }
    if let Some(r) = s
        .pointer_mut("/properties/ownerReferences")
        .and_then(Value::as_object_mut)
    {
        r.insert("x-kubernetes-list-type".into(), "map".into());
        r.insert(
            "x-kubernetes-list-map-keys".into(),
            serde_json::json!(["uid"]),
        );
    }
    s
}

impl Structural {
    /// Compiles an object schema (the `openAPIV3Schema` of a CRD version). The object's
    /// `metadata` is checked against Kubernetes' `ObjectMeta` schema.
    pub fn compile(schema: &Value) -> Result<Self, String> {
        let mut schema = schema.clone();
        let props = schema
            .as_object_mut()
            .ok_or("schema is not an object")?
            .entry("properties")
            .or_insert_with(|| Value::Object(Map::new()));
        let props = props.as_object_mut().ok_or("properties is not an object")?;
        props.insert("metadata".into(), object_meta_schema());
        props
            .entry("apiVersion")
            .or_insert(serde_json::json!({"type": "string"}));
        props
            .entry("kind")
            .or_insert(serde_json::json!({"type": "string"}));
        let root = Node::compile(&schema);
        let validator = jsonschema::draft4::options()
            .should_validate_formats(true)
            .should_ignore_unknown_formats(true)
            .build(&to_json_schema(&schema))
            .map_err(|e| e.to_string())?;
        Ok(Self { root, validator })
    }

    /// The object's shape, for server-side apply.
    pub fn shape(&self) -> Shape<'_> {
        Shape(Some(&self.root))
    }

    /// Prunes unknown fields (returned, as paths) and fills defaults.
    pub fn prune_and_default(&self, obj: &mut Value) -> Vec<String> {
        let mut unknown = Vec::new();
        self.root
            .prune_and_default(obj, FieldPath::Root, &mut unknown);
        unknown
    }

    /// Validates a pruned, defaulted object; each error names the field at fault.
    pub fn validate(&self, obj: &Value) -> Vec<Cause> {
        // The common case, a valid object, stops at the first check instead of collecting.
        if self.validator.is_valid(obj) {
            return Vec::new();
        }
        let mut causes: Vec<Cause> = self
            .validator
            .iter_errors(obj)
            .map(|e| {
                let field = pointer_to_path(e.instance_path().as_str());
                // A missing property is named itself, as Kubernetes does: `spec.size:
                // Required value`, not a complaint about `spec`.
                if let jsonschema::error::ValidationErrorKind::Required { property } = e.kind()
                    && let Some(name) = property.as_str()
                {
                    return Cause {
                        reason: "FieldValueRequired".into(),
                        message: "Required value".into(),
                        field: if field.is_empty() {
                            name.to_string()
                        } else {
                            format!("{field}.{name}")
                        },
                    };
                }
                Cause::invalid(
                    if field.is_empty() {
                        "<root>".to_string()
                    } else {
                        field
                    },
                    e.to_string(),
                )
            })
            .collect();
        causes.dedup();
        causes
    }
}

/// `/spec/rules/0/port` → `spec.rules[0].port`.
pub fn pointer_to_path(pointer: &str) -> String {
    let mut out = String::new();
    for seg in pointer.split('/').skip(1) {
        let seg = seg.replace("~1", "/").replace("~0", "~");
        if !seg.is_empty() && seg.bytes().all(|b| b.is_ascii_digit()) {
            out.push_str(&format!("[{seg}]"));
        } else {
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(&seg);
        }
    }
    out
}

/// Turns an OpenAPI v3 schema (with `nullable` and `x-kubernetes-*` extensions) into plain
/// JSON Schema draft 4 for the validator.
fn to_json_schema(v: &Value) -> Value {
    match v {
        Value::Object(map) => {
            let mut out = Map::new();
            for (k, val) in map {
                if k.starts_with("x-kubernetes-") || k == "nullable" || k == "default" {
                    continue;
                }
                // `properties` and `additionalProperties` hold schemas keyed by name; everything
                // else that is an object or array is a schema or a list of them.
                let converted = if k == "properties" {
                    Value::Object(
                        val.as_object()
                            .map(|m| {
                                m.iter()
                                    .map(|(pk, pv)| (pk.clone(), to_json_schema(pv)))
                                    .collect()
                            })
                            .unwrap_or_default(),
                    )
                } else if k == "enum" || k == "required" || k == "example" {
                    val.clone()
                } else {
                    to_json_schema(val)
                };
                out.insert(k.clone(), converted);
            }
            if map
                .get("x-kubernetes-int-or-string")
                .and_then(Value::as_bool)
                == Some(true)
            {
                out.remove("type");
                out.insert("type".into(), serde_json::json!(["integer", "string"]));
            }
            if map.get("nullable").and_then(Value::as_bool) == Some(true) {
                if let Some(Value::String(t)) = out.get("type").cloned() {
                    out.insert("type".into(), serde_json::json!([t, "null"]));
                }
                if let Some(Value::Array(e)) = out.get_mut("enum")
                    && !e.contains(&Value::Null)
                {
                    e.push(Value::Null);
                }
            }
            // OpenAPI's int32/int64 are not JSON Schema formats the validator knows.
            Value::Object(out)
        }
        Value::Array(a) => Value::Array(a.iter().map(to_json_schema).collect()),
        other => other.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sample() -> Structural {
        Structural::compile(&json!({
            "type": "object",
            "properties": {
                "spec": {
                    "type": "object",
                    "required": ["size"],
                    "properties": {
                        "size": {"type": "integer", "minimum": 1},
                        "mode": {"type": "string", "enum": ["a", "b"], "default": "a"},
                        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                        "rules": {"type": "array", "items": {"type": "object", "properties": {"port": {"type": "integer", "maximum": 65535}}}},
                        "note": {"type": "string", "nullable": true}
                    }
                }
            }
        }))
        .expect("compiles")
    }

    #[test]
    fn unknown_fields_are_reported_with_their_path_and_removed() {
        let s = sample();
        let mut o =
            json!({"spec": {"size": 1, "bogus": 1, "rules": [{"port": 1, "x": 2}]}, "top": 1});
        let unknown = s.prune_and_default(&mut o);
        assert_eq!(unknown, vec!["spec.bogus", "spec.rules[0].x", "top"]);
        assert_eq!(o["spec"]["rules"][0], json!({"port": 1}));
        assert!(o.get("top").is_none());
    }

    #[test]
    fn metadata_is_checked_against_object_meta() {
        let s = sample();
        let mut o = json!({"metadata": {"name": "a", "nme": "typo"}, "spec": {"size": 1}});
        assert_eq!(s.prune_and_default(&mut o), vec!["metadata.nme"]);
        let mut o = json!({"metadata": {"name": "a", "labels": 5}, "spec": {"size": 1}});
        s.prune_and_default(&mut o);
        let causes = s.validate(&o);
        assert_eq!(causes[0].field, "metadata.labels");
    }

    #[test]
    fn defaults_fill_absent_fields_and_nulls_are_pruned_unless_nullable() {
        let s = sample();
        let mut o = json!({"spec": {"size": 1, "labels": null, "note": null}});
        s.prune_and_default(&mut o);
        assert_eq!(o["spec"]["mode"], "a");
        assert!(o["spec"].get("labels").is_none());
        assert!(o["spec"]["note"].is_null());
        assert!(s.validate(&o).is_empty());
    }

    #[test]
    fn violations_name_the_field() {
        let s = sample();
        let causes =
            s.validate(&json!({"spec": {"size": 0, "mode": "c", "rules": [{"port": 70000}]}}));
        let fields: Vec<&str> = causes.iter().map(|c| c.field.as_str()).collect();
        assert!(fields.contains(&"spec.size"), "{causes:?}");
        assert!(fields.contains(&"spec.mode"), "{causes:?}");
        assert!(fields.contains(&"spec.rules[0].port"), "{causes:?}");
        let missing = s.validate(&json!({"spec": {}}));
        assert_eq!(missing[0].field, "spec.size");
        assert_eq!(missing[0].reason, "FieldValueRequired");
        assert_eq!(missing[0].message, "Required value");
    }
}
