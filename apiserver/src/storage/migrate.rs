//! Migration on read: what older code stored and must never be served again is taken out of
//! a value as the store reads it (range, transaction read, watch event), before any verb,
//! cache, watcher or admission check sees it.
//!
//! # Guarantees
//! - A Volume's `status.export` (stored before exports were VolumeExports: where and under
//!   what name its data is served, which every project member reads) is dropped from every
//!   value read under a Volume key. The revision is the stored one, so guards still compare
//!   against what etcd holds; the next write of the object stores it without the field.
//! - Every other value is passed on byte for byte (a cheap key and byte test decides).

use serde_json::Value;

use crate::storage::kv::{KeyValue, RangeResp, WatchMsg};

/// The keys of Volumes hold this, whatever the store's prefix (see [`super::keys`]).
const VOLUMES: &[u8] = b"/storage.stratus.dev/volumes/";

/// `kv`'s value as it is to be served.
pub fn key_value(kv: &mut KeyValue) {
    if !contains(&kv.key, VOLUMES) || !contains(&kv.value, b"\"export\"") {
        return;
    }
    let Ok(mut obj) = serde_json::from_slice::<Value>(&kv.value) else {
        // Undecodable values are reported where they are decoded.
        return;
    };
    let dropped = obj
        .get_mut("status")
        .and_then(Value::as_object_mut)
        .and_then(|s| s.remove("export"));
    if dropped.is_some()
        && let Ok(value) = serde_json::to_vec(&obj)
    {
        kv.value = value;
    }
}

/// Every value `resp` read, as it is to be served.
pub fn range(resp: &mut RangeResp) {
    resp.kvs.iter_mut().for_each(key_value);
}

/// Every value of a watch message, as it is to be served.
pub fn watch(msg: &mut WatchMsg) {
    if let WatchMsg::Events(events) = msg {
        for ev in events {
            key_value(&mut ev.kv);
            if let Some(prev) = &mut ev.prev {
                key_value(prev);
            }
        }
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(key: &str, value: &Value) -> KeyValue {
        KeyValue {
            key: key.into(),
            value: serde_json::to_vec(value).expect("JSON"),
            mod_revision: 7,
        }
    }

    #[test]
    fn a_stored_volumes_export_is_dropped_and_nothing_else_is_touched() {
        let with = serde_json::json!({"kind": "Volume", "metadata": {"name": "v"},
            "status": {"phase": "InUse", "export": {"host": "10.0.0.1", "port": 10809}}});
        let mut v = kv("/registry/storage.stratus.dev/volumes/demo/v", &with);
        key_value(&mut v);
        let got: Value = serde_json::from_slice(&v.value).expect("JSON");
        assert_eq!(got["status"], serde_json::json!({"phase": "InUse"}));
        assert_eq!(v.mod_revision, 7);
        // Another kind's "export" (a VolumeExport is all about one) is served as stored.
        let mut x = kv("/registry/storage.stratus.dev/volumeexports/u.n2", &with);
        let before = x.value.clone();
        key_value(&mut x);
        assert_eq!(x.value, before);
    }
}
