//! `meta.k8s.io/v1` Table and PartialObjectMetadata renderings (what `kubectl get` asks for).

use serde_json::{Value, json};

use crate::resource::registry::ResourceType;

/// How the client asked to see objects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rendering {
    /// The objects themselves.
    Full,
    /// A `Table` with printer columns.
    Table,
    /// `PartialObjectMetadata` (metadata only).
    Metadata,
}

impl Rendering {
    /// Reads the `Accept` header.
    pub fn from_accept(accept: &str) -> Self {
        for range in accept.split(',') {
            let params: Vec<&str> = range.split(';').map(str::trim).collect();
            let is_meta_group = params.contains(&"g=meta.k8s.io");
            if !is_meta_group {
                if params.first().is_some_and(|m| {
                    *m == "application/json" || *m == "*/*" || m.starts_with("application/")
                }) {
                    return Rendering::Full;
                }
                continue;
            }
            if params.contains(&"as=Table") && params.contains(&"v=v1") {
                return Rendering::Table;
            }
            if params
                .iter()
                .any(|p| *p == "as=PartialObjectMetadata" || *p == "as=PartialObjectMetadataList")
                && params.contains(&"v=v1")
            {
                return Rendering::Metadata;
            }
        }
        Rendering::Full
    }
}

/// Evaluates the simple JSONPath forms printer columns use: `.a.b`, `.a[0].b`, `.a[*].b`.
pub fn json_path(obj: &Value, path: &str) -> Vec<Value> {
    let mut cur = vec![obj.clone()];
    let path = path.trim().trim_start_matches('{').trim_end_matches('}');
    for raw in path
        .trim_start_matches('.')
        .split('.')
        .filter(|s| !s.is_empty())
    {
        let (name, index) = match raw.split_once('[') {
            Some((n, rest)) => (n, Some(rest.trim_end_matches(']'))),
            None => (raw, None),
        };
        let mut next = Vec::new();
        for v in cur {
            let v = if name.is_empty() {
                Some(v)
            } else {
                v.get(name).cloned()
            };
            let Some(v) = v else { continue };
            match index {
                None => next.push(v),
                Some("*") => next.extend(v.as_array().cloned().unwrap_or_default()),
                Some(i) => {
                    if let (Ok(i), Some(a)) = (i.parse::<usize>(), v.as_array()) {
                        next.extend(a.get(i).cloned());
                    }
                }
            }
        }
        cur = next;
    }
    cur
}

/// A human duration the way kubectl prints ages: `45s`, `12m`, `5h`, `3d`.
pub fn human_age(rfc3339: &str) -> String {
    let Ok(t) = rfc3339.parse::<jiff::Timestamp>() else {
        return "<unknown>".into();
    };
    let secs = (jiff::Timestamp::now().as_second() - t.as_second()).max(0);
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 600 => format!("{}m{}s", s / 60, s % 60),
        s if s < 3 * 3600 => format!("{}m", s / 60),
        s if s < 8 * 3600 => format!("{}h{}m", s / 3600, (s % 3600) / 60),
        s if s < 48 * 3600 => format!("{}h", s / 3600),
        s if s < 8 * 86400 => format!("{}d{}h", s / 86400, (s % 86400) / 3600),
        s => format!("{}d", s / 86400),
    }
}

fn cell(values: Vec<Value>, type_: &str) -> Value {
    if values.is_empty() {
        return Value::Null;
    }
    if type_ == "date" {
        return values[0]
            .as_str()
            .map_or(Value::Null, |s| Value::String(human_age(s)));
    }
    if values.len() == 1 {
        return match (&values[0], type_) {
            (Value::String(_) | Value::Number(_) | Value::Bool(_), _) => values[0].clone(),
            (other, _) => Value::String(other.to_string()),
        };
    }
    Value::String(
        values
            .iter()
            .map(|v| {
                v.as_str()
                    .map(String::from)
                    .unwrap_or_else(|| v.to_string())
            })
            .collect::<Vec<_>>()
            .join(","),
    )
}

/// The column definitions for a type.
pub fn columns(rt: &ResourceType) -> Vec<Value> {
    let mut cols = vec![
        json!({"name": "Name", "type": "string", "format": "name", "description": "Name must be unique within a namespace.", "priority": 0}),
    ];
    for c in &rt.printer_columns {
        cols.push(json!({
            "name": c.name, "type": if c.type_ == "date" { "string" } else { &c.type_ },
            "format": c.format.clone().unwrap_or_default(), "description": c.description, "priority": c.priority,
        }));
    }
    if !has_age(rt) {
        cols.push(json!({"name": "Age", "type": "string", "format": "", "description": "Time since the object was created.", "priority": 0}));
    }
    cols
}

fn has_age(rt: &ResourceType) -> bool {
    rt.printer_columns
        .iter()
        .any(|c| c.json_path.trim() == ".metadata.creationTimestamp")
}

/// `PartialObjectMetadata` of an object.
pub fn partial(obj: &Value) -> Value {
    json!({
        "kind": "PartialObjectMetadata",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": obj.get("metadata").cloned().unwrap_or_else(|| json!({})),
    })
}

/// One table row.
pub fn row(rt: &ResourceType, obj: &Value, include: &str) -> Value {
    let mut cells = vec![
        obj.pointer("/metadata/name")
            .cloned()
            .unwrap_or(Value::Null),
    ];
    for c in &rt.printer_columns {
        cells.push(cell(json_path(obj, &c.json_path), &c.type_));
    }
    if !has_age(rt) {
        cells.push(cell(json_path(obj, ".metadata.creationTimestamp"), "date"));
    }
    let object = match include {
        "None" => Value::Null,
        "Object" => obj.clone(),
        _ => partial(obj),
    };
    json!({"cells": cells, "object": object})
}

/// A Table of objects.
pub fn table(
    rt: &ResourceType,
    objs: &[Value],
    list_meta: Value,
    include: &str,
    with_columns: bool,
) -> Value {
    json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": list_meta,
        "columnDefinitions": if with_columns { Value::Array(columns(rt)) } else { json!([]) },
        "rows": objs.iter().map(|o| row(rt, o, include)).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_paths() {
        let o = json!({"status": {"phase": "Running", "addresses": [{"ip": "10.0.0.2"}, {"ip": "10.0.1.2"}]}});
        assert_eq!(json_path(&o, ".status.phase"), vec![json!("Running")]);
        assert_eq!(json_path(&o, ".status.addresses[*].ip").len(), 2);
        assert_eq!(
            json_path(&o, ".status.addresses[1].ip"),
            vec![json!("10.0.1.2")]
        );
        assert!(json_path(&o, ".status.missing").is_empty());
        assert_eq!(
            cell(json_path(&o, ".status.addresses[*].ip"), "string"),
            json!("10.0.0.2,10.0.1.2")
        );
    }

    #[test]
    fn accept_headers() {
        assert_eq!(
            Rendering::from_accept(
                "application/json;as=Table;v=v1;g=meta.k8s.io,application/json;as=Table;v=v1beta1;g=meta.k8s.io,application/json"
            ),
            Rendering::Table
        );
        assert_eq!(Rendering::from_accept("application/json"), Rendering::Full);
        assert_eq!(
            Rendering::from_accept(
                "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1"
            ),
            Rendering::Metadata
        );
        assert_eq!(
            Rendering::from_accept(
                "application/json;as=Table;v=v1beta1;g=meta.k8s.io, application/json"
            ),
            Rendering::Full
        );
    }

    #[test]
    fn ages() {
        let t = jiff::Timestamp::now() - jiff::SignedDuration::from_secs(3 * 3600);
        assert_eq!(human_age(&t.to_string()), "3h0m");
        assert_eq!(human_age("garbage"), "<unknown>");
    }
}
