//! A stored object's JSON answered without decoding it: `metadata.resourceVersion` spliced in.

/// `value` (a stored object, which never holds `metadata.resourceVersion`) with
/// `"resourceVersion":"REV"` as the first member of its top-level `metadata`; `None` when the
/// JSON is not an object with a `metadata` object, or when that already holds a
/// `resourceVersion` (the caller then decodes it).
///
/// The scan tracks strings (with escapes) and nesting through the whole value, so a value
/// cut short or with unbalanced brackets is left to decoding (which reports it) rather than
/// answered as it is.
pub fn with_rv(value: &[u8], rev: i64) -> Option<Vec<u8>> {
    let at = metadata_start(value)?;
    let empty = value[at..]
        .iter()
        .find(|b| !b.is_ascii_whitespace())
        .is_some_and(|b| *b == b'}');
    let rv = format!(
        "\"resourceVersion\":\"{rev}\"{}",
        if empty { "" } else { "," }
    );
    let mut out = Vec::with_capacity(value.len() + rv.len());
    out.extend_from_slice(&value[..at]);
    out.extend_from_slice(rv.as_bytes());
    out.extend_from_slice(&value[at..]);
    Some(out)
}

/// The offset just after the `{` of the top-level `metadata` object, when no key of that
/// object is `resourceVersion` and the value's strings and brackets are balanced.
fn metadata_start(v: &[u8]) -> Option<usize> {
    let first = v.iter().position(|b| !b.is_ascii_whitespace())?;
    if v[first] != b'{' {
        return None;
    }
    let mut depth = 0usize;
    let mut i = first;
    // The last string closed at the current depth, and whether a `:` followed it (a key).
    let mut last: Option<(usize, usize)> = None;
    let mut key: Option<(usize, usize)> = None;
    // Just after metadata's `{`, once entered; whether its `}` has been seen.
    let mut inside: Option<usize> = None;
    let mut closed = false;
    while i < v.len() {
        match v[i] {
            b'"' => {
                let start = i + 1;
                i += 1;
                while i < v.len() && v[i] != b'"' {
                    i += if v[i] == b'\\' { 2 } else { 1 };
                }
                if i >= v.len() {
                    return None;
                }
                last = Some((start, i));
            }
            b':' => key = last.take(),
            b'{' | b'[' => {
                depth += 1;
                let opened_metadata =
                    v[i] == b'{' && depth == 2 && key.is_some_and(|(s, e)| &v[s..e] == b"metadata");
                if opened_metadata {
                    inside = Some(i + 1);
                }
                key = None;
            }
            b'}' | b']' => {
                if depth == 2 && inside.is_some() {
                    closed = true;
                }
                depth = depth.checked_sub(1)?;
                key = None;
                if depth == 0 {
                    // The end of the object: only whitespace may follow.
                    let rest_blank = v[i + 1..].iter().all(u8::is_ascii_whitespace);
                    return inside.filter(|_| closed && rest_blank);
                }
            }
            b',' => key = None,
            _ => {}
        }
        if inside.is_some()
            && !closed
            && depth == 2
            && v[i] == b':'
            && key.is_some_and(|(s, e)| &v[s..e] == b"resourceVersion")
        {
            return None;
        }
        i += 1;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn spliced(v: &Value, rev: i64) -> Option<Value> {
        let bytes = with_rv(&serde_json::to_vec(v).expect("JSON"), rev)?;
        Some(serde_json::from_slice(&bytes).expect("still JSON"))
    }

    #[test]
    fn the_revision_goes_into_the_top_level_metadata() {
        let v = json!({"apiVersion": "v1", "kind": "X", "metadata": {"name": "a", "labels": {"metadata": "}{\"x"}}, "spec": {"metadata": {"q": 1}}});
        let out = spliced(&v, 42).expect("spliced");
        let mut want = v.clone();
        want["metadata"]["resourceVersion"] = json!("42");
        assert_eq!(out, want);
        let empty = spliced(&json!({"metadata": {}, "a": [1, {"b": "\\\""}]}), 7).expect("spliced");
        assert_eq!(empty["metadata"], json!({"resourceVersion": "7"}));
        // Before metadata, nested objects and strings that look like it.
        let tricky =
            json!({"a": {"metadata": {"x": 1}}, "b": "\"metadata\":{", "metadata": {"name": "n"}});
        let out = spliced(&tricky, 3).expect("spliced");
        assert_eq!(out["metadata"]["resourceVersion"], "3");
        assert!(out["a"]["metadata"].get("resourceVersion").is_none());
    }

    #[test]
    fn what_cannot_be_spliced_is_left_to_decoding() {
        assert!(spliced(&json!({"metadata": {"resourceVersion": "1"}}), 2).is_none());
        assert!(spliced(&json!({"metadata": "x"}), 2).is_none());
        assert!(spliced(&json!({"spec": {}}), 2).is_none());
        assert!(spliced(&json!([1, 2]), 2).is_none());
        assert!(with_rv(b"{\"metadata\":{\"name\":\"a", 2).is_none());
        assert!(with_rv(b"", 2).is_none());
        // Cut short after metadata, or with something after the object.
        assert!(with_rv(br#"{"metadata":{"name":"a"},"spec":{"x":[1,2"#, 2).is_none());
        assert!(with_rv(br#"{"metadata":{"name":"a"},"spec":{}}}"#, 2).is_none());
        assert!(with_rv(br#"{"metadata":{"name":"a"}} x"#, 2).is_none());
        assert!(with_rv(br#"{"metadata":{"name":"a"},"s":"\"}"}"#, 2).is_some());
        // A nested resourceVersion is not the object's.
        let nested = json!({"metadata": {"annotations": {"resourceVersion": "9"}}});
        assert_eq!(
            spliced(&nested, 2).expect("spliced")["metadata"]["resourceVersion"],
            "2"
        );
    }
}
