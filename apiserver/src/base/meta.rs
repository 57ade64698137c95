//! Object metadata rules: names, labels, system fields set by the server.

use serde_json::{Map, Value, json};

use crate::base::error::Cause;

/// The JSON encoding of a value, written straight into bytes (`Value`'s `Display` goes through
/// the formatter, which costs more per field).
pub fn to_json(v: &Value) -> Vec<u8> {
    // Encoding a `Value` cannot fail: its map keys are strings.
    serde_json::to_vec(v).unwrap_or_default()
}

/// Sets `metadata.resourceVersion` from the etcd revision.
pub fn with_rv(mut v: Value, rev: i64) -> Value {
    meta_mut(&mut v).insert("resourceVersion".into(), Value::String(rev.to_string()));
    v
}

/// The current time as Kubernetes writes `metav1.Time` (RFC 3339, seconds).
pub fn now() -> String {
    jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

/// The current time as `metav1.MicroTime`.
pub fn now_micro() -> String {
    jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%S.%6fZ")
        .to_string()
}

fn is_label_like(s: &str, max: usize, extra: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= max
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || extra.contains(c))
}

/// A DNS-1123 subdomain: what object names must be.
pub fn is_dns1123_subdomain(s: &str) -> bool {
    s.len() <= 253
        && s.split('.').all(|part| {
            let b = part.as_bytes();
            !b.is_empty()
                && b[0].is_ascii_alphanumeric()
                && b[b.len() - 1].is_ascii_alphanumeric()
                && part
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        })
}

/// A DNS-1123 label: what namespace (project) names must be.
pub fn is_dns1123_label(s: &str) -> bool {
    s.len() <= 63 && !s.contains('.') && is_dns1123_subdomain(s)
}

/// A qualified name (`prefix/name` or `name`), as label keys, annotation keys and finalizers use.
pub fn is_qualified_name(s: &str) -> bool {
    let (prefix, name) = match s.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, s),
    };
    prefix.is_none_or(is_dns1123_subdomain) && is_label_like(name, 63, "-_.")
}

/// Checks the user-settable parts of metadata; returns every violation.
pub fn validate(meta: &Value, namespaced: bool) -> Vec<Cause> {
    let mut causes = Vec::new();
    let name = meta.get("name").and_then(Value::as_str).unwrap_or_default();
    if !name.is_empty() && !is_dns1123_subdomain(name) {
        causes.push(Cause::invalid(
            "metadata.name",
            format!("Invalid value: \"{name}\": a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character"),
        ));
    }
    if let Some(ns) = meta.get("namespace").and_then(Value::as_str)
        && namespaced
        && !is_dns1123_label(ns)
    {
        causes.push(Cause::invalid(
            "metadata.namespace",
            format!("Invalid value: \"{ns}\": must be a DNS-1123 label"),
        ));
    }
    if let Some(labels) = meta.get("labels").and_then(Value::as_object) {
        for (k, v) in labels {
            if !is_qualified_name(k) {
                causes.push(Cause::invalid(format!("metadata.labels.{k}"), format!("Invalid value: \"{k}\": name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (at most 63)")));
            }
            let v = v.as_str().unwrap_or_default();
            if !v.is_empty() && !is_label_like(v, 63, "-_.") {
                causes.push(Cause::invalid(format!("metadata.labels.{k}"), format!("Invalid value: \"{v}\": a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (at most 63)")));
            }
        }
    }
    if let Some(ann) = meta.get("annotations").and_then(Value::as_object) {
        let mut total = 0;
        for (k, v) in ann {
            total += k.len() + v.as_str().map_or(0, str::len);
            if !is_qualified_name(k) {
                causes.push(Cause::invalid(
                    format!("metadata.annotations.{k}"),
                    format!("Invalid value: \"{k}\": must be a qualified name"),
                ));
            }
        }
        if total > 256 * 1024 {
            causes.push(Cause::invalid(
                "metadata.annotations",
                "Too long: must have at most 262144 bytes",
            ));
        }
    }
    for (i, f) in meta
        .get("finalizers")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .enumerate()
    {
        let f = f.as_str().unwrap_or_default();
        if !is_qualified_name(f) {
            causes.push(Cause::invalid(
                format!("metadata.finalizers[{i}]"),
                format!("Invalid value: \"{f}\": must be a qualified name"),
            ));
        }
    }
    for (i, r) in meta
        .get("ownerReferences")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .enumerate()
    {
        for field in ["apiVersion", "kind", "name", "uid"] {
            if r.get(field)
                .and_then(Value::as_str)
                .is_none_or(str::is_empty)
            {
                causes.push(Cause {
                    reason: "FieldValueRequired".into(),
                    message: "Required value".into(),
                    field: format!("metadata.ownerReferences[{i}].{field}"),
                });
            }
        }
    }
    let controllers = meta
        .get("ownerReferences")
        .and_then(Value::as_array)
        .map_or(0, |refs| {
            refs.iter()
                .filter(|r| r.get("controller").and_then(Value::as_bool) == Some(true))
                .count()
        });
    if controllers > 1 {
        causes.push(Cause::invalid(
            "metadata.ownerReferences",
            "Invalid value: only one reference can have Controller set to true",
        ));
    }
    causes
}

/// A name from `generateName`: the prefix plus five random characters.
pub fn generate_name(prefix: &str) -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let bytes = uuid::Uuid::new_v4().into_bytes();
    let suffix: String = bytes
        .iter()
        .take(5)
        .map(|b| ALPHABET[*b as usize % ALPHABET.len()] as char)
        .collect();
    let prefix = if prefix.len() > 58 {
        &prefix[..58]
    } else {
        prefix
    };
    format!("{prefix}{suffix}")
}

/// The object's metadata map, created if absent.
pub fn meta_mut(obj: &mut Value) -> &mut Map<String, Value> {
    if !obj.get("metadata").is_some_and(Value::is_object) {
        obj["metadata"] = json!({});
    }
    match obj.get_mut("metadata") {
        Some(Value::Object(m)) => m,
        _ => unreachable!("metadata was just made an object"),
    }
}

/// A string field of metadata.
pub fn meta_str<'a>(obj: &'a Value, field: &str) -> Option<&'a str> {
    obj.get("metadata")
        .and_then(|m| m.get(field))
        .and_then(Value::as_str)
}

/// The object's finalizers.
pub fn finalizers(obj: &Value) -> Vec<String> {
    obj.pointer("/metadata/finalizers")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// Everything but metadata and status: what bumps `generation` when it changes.
pub fn spec_part(obj: &Value) -> Map<String, Value> {
    obj.as_object()
        .map(|m| {
            m.iter()
                .filter(|(k, _)| {
                    !matches!(k.as_str(), "metadata" | "status" | "apiVersion" | "kind")
                })
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(is_dns1123_subdomain("m1.tiny"));
        assert!(is_dns1123_subdomain("web-1"));
        assert!(!is_dns1123_subdomain("Web"));
        assert!(!is_dns1123_subdomain("a_b"));
        assert!(!is_dns1123_subdomain("-a"));
        assert!(!is_dns1123_subdomain("<script>"));
        assert!(!is_dns1123_subdomain(""));
        assert!(is_dns1123_label("demo"));
        assert!(!is_dns1123_label("a.b"));
        assert!(is_qualified_name("stratus.dev/protect"));
        assert!(!is_qualified_name("bad key"));
    }

    #[test]
    fn metadata_violations_name_the_field() {
        let causes = validate(
            &json!({"name": "Bad_Name", "labels": {"ok": "x", "bad key": "y", "k": "-v"}, "finalizers": ["a b"]}),
            true,
        );
        let fields: Vec<&str> = causes.iter().map(|c| c.field.as_str()).collect();
        assert_eq!(
            fields,
            vec![
                "metadata.name",
                "metadata.labels.bad key",
                "metadata.labels.k",
                "metadata.finalizers[0]"
            ]
        );
    }

    #[test]
    fn generated_names_are_valid_and_differ() {
        let a = generate_name("web-");
        assert!(a.starts_with("web-") && a.len() == 9 && is_dns1123_subdomain(&a));
        assert_ne!(a, generate_name("web-"));
    }
}
