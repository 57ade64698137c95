//! Types served from another type's storage under other field names: `events.k8s.io/v1`
//! Events are core/v1 Events, as Kubernetes serves them, so an event recorded through either
//! API (kube-runtime's `Recorder` uses events.k8s.io) shows in `kubectl describe` (core/v1).

use bytes::Bytes;
use futures::StreamExt;
use serde_json::{Map, Value};

use crate::resource::outcome::{Events, Item, List};

/// How a view maps onto its backing type.
#[derive(Debug, Clone, Copy)]
pub struct View {
    /// `apiVersion` of the view.
    pub api_version: &'static str,
    /// `apiVersion` of the backing type.
    pub backing_api_version: &'static str,
    /// `(view field, backing field)`: top-level fields stored under another name.
    pub renames: &'static [(&'static str, &'static str)],
}

/// events.k8s.io/v1 Event over core/v1 Event.
pub const EVENTS: View = View {
    api_version: "events.k8s.io/v1",
    backing_api_version: "v1",
    renames: &[
        ("regarding", "involvedObject"),
        ("note", "message"),
        ("reportingController", "reportingComponent"),
        ("deprecatedSource", "source"),
        ("deprecatedFirstTimestamp", "firstTimestamp"),
        ("deprecatedLastTimestamp", "lastTimestamp"),
        ("deprecatedCount", "count"),
    ],
};

fn rename(v: &mut Value, pairs: impl Iterator<Item = (&'static str, &'static str)>) {
    let Some(m) = v.as_object_mut() else { return };
    let moved: Vec<(&str, Option<Value>)> = pairs.map(|(from, to)| (to, m.remove(from))).collect();
    for (to, val) in moved {
        if let Some(val) = val {
            m.insert(to.to_string(), val);
        }
    }
}

impl View {
    fn set_api_version(v: &mut Value, api_version: &str) {
        if let Some(m) = v.as_object_mut()
            && m.contains_key("apiVersion")
        {
            m.insert("apiVersion".into(), Value::String(api_version.into()));
        }
    }

    /// A body (object, or merge patch) in the view's form → the backing form.
    pub fn to_backing(&self, mut v: Value) -> Value {
        rename(&mut v, self.renames.iter().copied());
        Self::set_api_version(&mut v, self.backing_api_version);
        v
    }

    /// A stored object → the view's form.
    pub fn from_backing(&self, mut v: Value) -> Value {
        rename(&mut v, self.renames.iter().map(|(a, b)| (*b, *a)));
        Self::set_api_version(&mut v, self.api_version);
        v
    }

    /// A field path of the view (`regarding.name`) → the backing path (`involvedObject.name`).
    pub fn backing_path(&self, path: &str) -> String {
        let (head, rest) = match path.split_once('.') {
            Some((h, r)) => (h, Some(r)),
            None => (path, None),
        };
        let head = self
            .renames
            .iter()
            .find(|(v, _)| *v == head)
            .map_or(head, |(_, b)| *b);
        match rest {
            Some(r) => format!("{head}.{r}"),
            None => head.to_string(),
        }
    }

    /// A JSON patch (RFC 6902) in the view's form → the backing form.
    pub fn json_patch_to_backing(&self, mut ops: Value) -> Value {
        for op in ops.as_array_mut().into_iter().flatten() {
            for key in ["path", "from"] {
                if let Some(p) = op.get(key).and_then(Value::as_str) {
                    let dotted = p.trim_start_matches('/').replacen('/', ".", 1);
                    let head = self.backing_path(dotted.split('.').next().unwrap_or_default());
                    let tail = p
                        .trim_start_matches('/')
                        .split_once('/')
                        .map(|(_, t)| format!("/{t}"))
                        .unwrap_or_default();
                    op[key] = Value::String(format!("/{head}{tail}"));
                }
            }
        }
        ops
    }

    /// A response body (object, list, or Status) → the view's form.
    pub fn response(&self, mut v: Value) -> Value {
        let kind = v
            .get("kind")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        if kind.ends_with("List") {
            if let Some(items) = v.get_mut("items").and_then(Value::as_array_mut) {
                for item in items.iter_mut() {
                    *item = self.from_backing(std::mem::take(item));
                }
            }
            Self::set_api_version(&mut v, self.api_version);
            v
        } else if kind == "Status" || kind == "Table" || kind.starts_with("PartialObjectMetadata") {
            v
        } else {
            self.from_backing(v)
        }
    }

    /// A collection answered as it is read → the view's form (a Table's or metadata list's
    /// rows stay as they are).
    pub fn list(&self, mut list: List) -> List {
        let kind = list
            .head
            .get("kind")
            .and_then(Value::as_str)
            .unwrap_or_default();
        if !kind.ends_with("List") || kind.starts_with("PartialObjectMetadata") {
            return list;
        }
        list.head
            .insert("apiVersion".into(), Value::String(self.api_version.into()));
        let view = *self;
        list.pages = list
            .pages
            .map(move |page| {
                page?
                    .into_iter()
                    .map(|i| Ok(Item::Value(view.from_backing(i.into_value()?))))
                    .collect()
            })
            .boxed();
        list
    }

    /// One watch event line → the view's form.
    pub fn watch_line(&self, line: &[u8]) -> Bytes {
        let Ok(mut ev) = serde_json::from_slice::<Map<String, Value>>(line) else {
            return Bytes::copy_from_slice(line);
        };
        if let Some(obj) = ev.remove("object") {
            let obj = if ev.get("type").and_then(Value::as_str) == Some("BOOKMARK") {
                let mut o = obj;
                Self::set_api_version(&mut o, self.api_version);
                o
            } else {
                self.response(obj)
            };
            ev.insert("object".into(), obj);
        }
        let mut out = Value::Object(ev).to_string().into_bytes();
        out.push(b'\n');
        Bytes::from(out)
    }

    /// A watch's events → the same events in the view's form (one event per chunk, as the
    /// watch handler writes them).
    pub fn watch_events(&self, events: Events) -> Events {
        let view = *self;
        events
            .map(move |chunk| chunk.map(|c| view.watch_line(&c)))
            .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn events_round_trip_between_the_two_apis() {
        let v1 = json!({"apiVersion": "events.k8s.io/v1", "kind": "Event", "metadata": {"name": "e"},
            "regarding": {"kind": "Server", "name": "web-1"}, "note": "placed", "reason": "Scheduled",
            "reportingController": "stratus-scheduler", "series": {"count": 2}});
        let core = EVENTS.to_backing(v1.clone());
        assert_eq!(core["apiVersion"], "v1");
        assert_eq!(core["involvedObject"]["name"], "web-1");
        assert_eq!(core["message"], "placed");
        assert_eq!(core["reportingComponent"], "stratus-scheduler");
        assert!(core.get("note").is_none());
        assert_eq!(EVENTS.from_backing(core), v1);
        assert_eq!(EVENTS.backing_path("regarding.name"), "involvedObject.name");
        assert_eq!(EVENTS.backing_path("reason"), "reason");
        let ops = EVENTS.json_patch_to_backing(json!([{"op": "replace", "path": "/note", "value": "x"}, {"op": "add", "path": "/regarding/name", "value": "y"}]));
        assert_eq!(ops[0]["path"], "/message");
        assert_eq!(ops[1]["path"], "/involvedObject/name");
    }
}
