//! Status writes: a reconciler computes the whole typed status it wants, and only what differs
//! from the status it read is sent, as a JSON merge patch under its field manager.

use serde_json::{Map, Value};

/// The JSON merge patch (RFC 7386) that turns `old` into `new`; `None` when they are equal.
/// Fields `new` lacks are removed (`null`); objects are compared field by field, anything
/// else (lists included) is replaced whole.
pub fn merge_diff(old: &Value, new: &Value) -> Option<Value> {
    match (old, new) {
        (Value::Object(o), Value::Object(n)) => {
            let mut out = Map::new();
            for (k, nv) in n {
                match o.get(k) {
                    Some(ov) => {
                        if let Some(d) = merge_diff(ov, nv) {
                            out.insert(k.clone(), d);
                        }
                    }
                    None => {
                        out.insert(k.clone(), nv.clone());
                    }
                }
            }
            for k in o.keys() {
                if !n.contains_key(k) {
                    out.insert(k.clone(), Value::Null);
                }
            }
            (!out.is_empty()).then_some(Value::Object(out))
        }
        _ if old == new => None,
        _ => Some(new.clone()),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::merge_diff;

    #[test]
    fn only_what_changed_is_sent_and_dropped_fields_are_removed() {
        let old = json!({"phase": "Error", "sha256": "ab", "conditions": [{"type": "Ready"}],
                         "placement": {"node": "a", "claim": 1}});
        let new = json!({"phase": "Active", "conditions": [{"type": "Ready"}, {"type": "Verified"}],
                         "placement": {"node": "a"}});
        assert_eq!(
            merge_diff(&old, &new),
            Some(json!({"phase": "Active", "sha256": null,
                        "conditions": [{"type": "Ready"}, {"type": "Verified"}],
                        "placement": {"claim": null}}))
        );
        assert_eq!(merge_diff(&old, &old), None);
        assert_eq!(
            merge_diff(&Value::Null, &json!({"phase": "Active"})),
            Some(json!({"phase": "Active"}))
        );
    }

    use serde_json::Value;
}
