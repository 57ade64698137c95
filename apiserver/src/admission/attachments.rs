//! Volumes attached to Servers, claimed at admission: a Server's create or update that adds a
//! Volume to `spec.volumes` (or names it as `spec.bootVolume`) writes the Volume's
//! `status.attachedTo` (and phase `InUse`, `Attached=True`) in the same etcd transaction as
//! the Server, guarded by the Volume's revision, so two Servers never both hold one volume.
//!
//! # Checks
//! - The Volume must exist in the Server's namespace (422 `FieldValueNotFound` on
//!   `spec.volumes[i].volume` or `spec.bootVolume`: a Server names volumes of its own
//!   project only), and not be being deleted (409).
//! - A Volume attached to another Server is refused unless it is `spec.multiAttach`: 409
//!   naming the field and that server. A multi-attach Volume is attached to at most
//!   [`MAX_ATTACHMENTS`] Servers (409 for one more), all of its project (it is looked up in
//!   the Server's namespace). Each claim adds the Server to `status.attachments`; the first
//!   is also `status.attachedTo`.
//! - A boot volume must be `spec.bootable` (422), and `spec.bootVolume` cannot change (422).
//!
//! # Ports
//! The Ports a write adds to `spec.networks` (`spec.networks[i].port`: `openstack server add
//! port`) are claimed in the same transaction, and the Networks it adds checked
//! ([`ports`]): a Port another Server holds, or being deleted, is refused, 409 naming the
//! field and that server; an external Network, 403 unless a cluster admin writes. The ports
//! controller binds a claimed Port; a Port not made yet is reserved and waited for there (the
//! Server says so), as Kubernetes objects may name what is created after them.
//!
//! # Release
//! The attachment outlives the Server's spec: a Volume removed from `spec.volumes`, or whose
//! Server is deleted, keeps that Server in `status.attachments` until the Server's guest no longer has it
//! (the compute agent observed the generation that dropped it, or the Server is gone after
//! its teardown): the attachments controller then takes it out (the others stay), with the Volume's
//! resourceVersion as precondition. A Volume added again meanwhile is written again here,
//! which moves that resourceVersion, so the release of an attachment a Server holds again
//! fails rather than freeing it.

use futures::future::BoxFuture;
use serde_json::Value;
use stratus_api_types::common::ConditionType;
use stratus_api_types::compute::ServerSpec;
use stratus_api_types::storage::{MAX_ATTACHMENTS, VolumeAttachment, VolumePhase};

mod ports;

pub use ports::{may_attach_external, reservation, reservations};

use crate::admission::binding::{self, is_server};
use crate::admission::{Admission, Change, Ctx, Subject, Written, quota};
use crate::base::error::{ApiError, ApiResult, Cause};
use crate::base::meta;
use crate::storage::keys;
use crate::storage::store::{Guard, Read, Write};

/// The API group of Volumes.
const STORAGE: &str = "storage.stratus.dev";
/// How many times a write is tried again when another got in between.
const RETRIES: usize = 48;

/// Volume attachments: registered for Servers, before quota (whose guards its write carries).
#[derive(Debug)]
pub struct Attachments;

impl Admission for Attachments {
    /// The reservations of the Ports a Server named before they existed.
    fn attached_keys(&self, prefix: &str, obj: &Value) -> Vec<String> {
        ports::attached_keys(prefix, obj)
    }

    /// A Server's create or update that attaches a volume it did not have (or changes its boot
    /// volume); any other write is quota's.
    fn write<'a>(
        &'a self,
        ctx: Ctx<'a>,
        s: Subject<'a>,
        w: Change<'a>,
    ) -> Option<BoxFuture<'a, ApiResult<Written>>> {
        if !is_server(s.group, s.kind) {
            return None;
        }
        let ns = s.namespace?;
        let new = volumes_of(w.new);
        let old = w.old.map(|(o, _)| volumes_of(o)).unwrap_or_default();
        let boot_changed = w.old.is_some_and(|(o, _)| boot_of(o) != boot_of(w.new));
        let added = new.iter().any(|(_, v)| !old.iter().any(|(_, o)| o == v));
        (added || boot_changed || ports::touches(&w))
            .then(|| Box::pin(attach(ctx, s, ns, w)) as BoxFuture<'a, _>)
    }
}

/// `spec.bootVolume`.
fn boot_of(obj: &Value) -> Option<&str> {
    obj.pointer("/spec/bootVolume").and_then(Value::as_str)
}

/// The volumes a Server holds, with the field naming each: `spec.bootVolume`, then
/// `spec.volumes[i].volume`.
fn volumes_of(obj: &Value) -> Vec<(String, String)> {
    let Ok(spec) =
        serde_json::from_value::<ServerSpec>(obj.get("spec").cloned().unwrap_or(Value::Null))
    else {
        return Vec::new();
    };
    let boot = spec.boot_volume.map(|b| ("spec.bootVolume".to_string(), b));
    boot.into_iter()
        .chain(
            spec.volumes
                .into_iter()
                .enumerate()
                .map(|(i, v)| (format!("spec.volumes[{i}].volume"), v.volume)),
        )
        .collect()
}

fn name_of(obj: &Value) -> &str {
    meta::meta_str(obj, "name").unwrap_or_default()
}

/// 422 on the Server for one field.
fn invalid(s: &Subject<'_>, obj: &Value, cause: Cause) -> ApiError {
    ApiError::invalid(s.kind, s.group, s.plural, name_of(obj), vec![cause])
}

/// 409 on the Server naming the field whose volume cannot be had.
fn conflict(s: &Subject<'_>, obj: &Value, field: &str, message: String) -> ApiError {
    let mut e = ApiError::conflict(
        s.group,
        s.plural,
        name_of(obj),
        format!("{field}: {message}"),
    );
    e.details.causes.push(Cause::invalid(field, message));
    e
}

/// The Servers holding `vol` (its `status.attachments`, or `status.attachedTo` alone as a
/// status written before there were attachments), each with its node.
fn holders(vol: &Value) -> Vec<VolumeAttachment> {
    let listed = vol
        .pointer("/status/attachments")
        .cloned()
        .and_then(|a| serde_json::from_value::<Vec<VolumeAttachment>>(a).ok())
        .unwrap_or_default();
    if !listed.is_empty() {
        return listed;
    }
    let st = |f: &str| {
        vol.pointer(&format!("/status/{f}"))
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    st("attachedTo")
        .map(|server| VolumeAttachment {
            server,
            node: st("attachedNode"),
        })
        .into_iter()
        .collect()
}

/// Whether the Server `obj` may take `vol` (the volume `name` at `field`): it exists, is not
/// being deleted, is free, already the server's or multi-attach with room for one more, and
/// is bootable when it is to boot from.
fn claimable(
    s: &Subject<'_>,
    obj: &Value,
    field: &str,
    name: &str,
    vol: Option<&Value>,
    boot: bool,
) -> ApiResult<()> {
    let server = name_of(obj);
    let Some(v) = vol else {
        return Err(invalid(
            s,
            obj,
            Cause {
                reason: "FieldValueNotFound".into(),
                message: format!("Not found: volume {name:?} does not exist in this namespace"),
                field: field.into(),
            },
        ));
    };
    if v.pointer("/metadata/deletionTimestamp").is_some() {
        return Err(conflict(
            s,
            obj,
            field,
            format!("volume {name:?} is being deleted"),
        ));
    }
    let held = holders(v);
    if !held.iter().any(|h| h.server == server) {
        let shared = v.pointer("/spec/multiAttach").and_then(Value::as_bool) == Some(true);
        match held.first() {
            Some(other) if !shared => {
                return Err(conflict(
                    s,
                    obj,
                    field,
                    format!(
                        "volume {name:?} is attached to server {:?}; detach it there first (only a volume with spec.multiAttach is attached to several servers)",
                        other.server
                    ),
                ));
            }
            Some(_) if held.len() >= MAX_ATTACHMENTS => {
                return Err(conflict(
                    s,
                    obj,
                    field,
                    format!(
                        "volume {name:?} is attached to {} servers, the most a multi-attach volume is attached to; detach it from one first",
                        held.len()
                    ),
                ));
            }
            _ => {}
        }
    }
    if boot && v.pointer("/spec/bootable").and_then(Value::as_bool) != Some(true) {
        return Err(invalid(
            s,
            obj,
            Cause::invalid(
                field,
                format!("Invalid value: {name:?}: the volume is not bootable (its spec.bootable)"),
            ),
        ));
    }
    Ok(())
}

/// `vol` claimed for Server `server`: added to `status.attachments` (and `status.attachedTo`
/// when it is the first), phase `InUse` once made, `Attached=True`.
fn claimed(vol: &Value, server: &str) -> ApiResult<Value> {
    let mut held = holders(vol);
    if !held.iter().any(|h| h.server == server) {
        held.push(VolumeAttachment {
            server: server.into(),
            node: None,
        });
    }
    let mut v = vol.clone();
    let generation = v.pointer("/metadata/generation").and_then(Value::as_i64);
    let status = binding::status_mut(&mut v)?;
    if let Some(first) = held.first() {
        status.insert("attachedTo".into(), Value::from(first.server.as_str()));
    }
    let servers: Vec<&str> = held.iter().map(|h| h.server.as_str()).collect();
    let message = match servers.as_slice() {
        [one] => format!("attached to server {one}"),
        many => format!("attached to servers {}", many.join(", ")),
    };
    status.insert(
        "attachments".into(),
        serde_json::to_value(&held).unwrap_or_default(),
    );
    if status.get("phase").and_then(Value::as_str) == Some("Available") {
        status.insert(
            "phase".into(),
            serde_json::to_value(VolumePhase::InUse).unwrap_or_default(),
        );
    }
    binding::set_condition(
        status,
        &ConditionType::Attached.yes("Attached", message),
        generation,
    );
    Ok(v)
}

/// Writes the Server with the volumes it adds claimed, and quota's guards, in one transaction.
async fn attach(ctx: Ctx<'_>, s: Subject<'_>, ns: &str, w: Change<'_>) -> ApiResult<Written> {
    if let Some((old, _)) = w.old
        && boot_of(old) != boot_of(w.new)
    {
        return Err(invalid(
            &s,
            w.new,
            Cause::invalid(
                "spec.bootVolume",
                "Invalid value: field is immutable (the server's root disk)",
            ),
        ));
    }
    let server = name_of(w.new);
    let before = w.old.map(|(o, _)| volumes_of(o)).unwrap_or_default();
    // Only the volumes the write adds are claimed (and written: see the module's Release).
    let added: Vec<(String, String)> = volumes_of(w.new)
        .into_iter()
        .filter(|(_, v)| !before.iter().any(|(_, b)| b == v))
        .collect();
    let keys: Vec<String> = added
        .iter()
        .map(|(_, v)| keys::object(ctx.prefix, STORAGE, "volumes", Some(ns), v))
        .collect();
    for _ in 0..RETRIES {
        let held = quota::check(ctx, s, ns, w).await?;
        let reads: Vec<Read<'_>> = keys.iter().map(|k| Read::Key(k)).collect();
        let (got, _) = ctx.store.read_many(&reads).await.map_err(ApiError::from)?;
        let ports = ports::plan(ctx, &s, ns, &w).await?;
        let mut guards = match w.old {
            Some((_, rev)) => vec![Guard::Revision(w.key, rev)],
            None => vec![Guard::Absent(w.key)],
        };
        guards.extend(w.parent.map(|(k, rev)| Guard::Revision(k, rev)));
        guards.extend(held.iter().map(|(p, at)| Guard::Unchanged(p, *at)));
        let mut writes = Vec::with_capacity(added.len());
        for (((field, name), key), found) in added.iter().zip(&keys).zip(&got) {
            let vol = found.first().map(|(_, v)| v);
            claimable(
                &s,
                w.new,
                field,
                name,
                vol.map(|v| &v.value),
                field == "spec.bootVolume",
            )?;
            if let Some(v) = vol {
                guards.push(Guard::Revision(key, v.mod_revision));
                writes.push((key.as_str(), claimed(&v.value, server)?));
            }
        }
        guards.extend(ports.guards());
        let mut puts: Vec<(&str, &Value)> = vec![(w.key, w.new)];
        puts.extend(writes.iter().map(|(k, v)| (*k, v)));
        puts.extend(ports.puts.iter().map(|(k, v)| (k.as_str(), v)));
        let deletes: Vec<&str> = ports.deletes.iter().map(String::as_str).collect();
        if let Some(rev) = ctx
            .store
            .write_many(&guards, &puts, &deletes)
            .await
            .map_err(ApiError::from)?
        {
            return Ok(Write::Done(rev).into());
        }
        // The Server itself changed (or exists, on create), or its Project did: answered as
        // the store would; else a volume, a port or quota changed under the check: look again.
        let now = ctx.store.get(w.key).await.map_err(ApiError::from)?;
        match (w.old, now) {
            (None, Some(now)) => return Ok(Write::Conflict(now.mod_revision).into()),
            (Some((_, rev)), now) if now.as_ref().map(|n| n.mod_revision) != Some(rev) => {
                return Ok(Write::Conflict(now.map_or(0, |n| n.mod_revision)).into());
            }
            _ => {}
        }
        if super::parent_changed(ctx, w.parent).await? {
            return Ok(Write::Conflict(0).into());
        }
    }
    Err(quota::too_busy(s, w.new))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    pub(super) fn subject() -> Subject<'static> {
        Subject {
            group: "compute.stratus.dev",
            kind: "Server",
            plural: "servers",
            namespaced: true,
            namespace: Some("demo"),
            name: "web",
        }
    }

    #[test]
    fn the_volumes_of_a_server_are_named_by_their_fields() {
        let s = json!({"spec": {"flavor": "m1", "bootVolume": "root",
                                 "volumes": [{"volume": "a"}, {"volume": "b"}]}});
        assert_eq!(
            volumes_of(&s),
            [
                ("spec.bootVolume".to_string(), "root".to_string()),
                ("spec.volumes[0].volume".into(), "a".into()),
                ("spec.volumes[1].volume".into(), "b".into()),
            ]
        );
    }

    #[test]
    fn a_volume_is_claimed_only_when_free_or_already_ours() {
        let server = json!({"metadata": {"name": "web"}});
        let s = subject();
        let f = "spec.volumes[0].volume";
        let e = claimable(&s, &server, f, "data", None, false).expect_err("missing");
        assert_eq!((e.code, e.details.causes[0].field.as_str()), (422, f));
        let free = json!({"spec": {"sizeGiB": 1}, "status": {"phase": "Available"}});
        assert!(claimable(&s, &server, f, "data", Some(&free), false).is_ok());
        let ours = json!({"spec": {"sizeGiB": 1}, "status": {"attachedTo": "web"}});
        assert!(claimable(&s, &server, f, "data", Some(&ours), false).is_ok());
        let theirs = json!({"spec": {"sizeGiB": 1}, "status": {"attachedTo": "db"}});
        let e = claimable(&s, &server, f, "data", Some(&theirs), false).expect_err("taken");
        assert_eq!(e.code, 409);
        assert_eq!(e.details.causes[0].field, f);
        assert!(e.message.contains("\"db\""), "{}", e.message);
        let going = json!({"metadata": {"deletionTimestamp": "2026-01-01T00:00:00Z"}});
        assert_eq!(
            claimable(&s, &server, f, "data", Some(&going), false)
                .expect_err("going")
                .code,
            409
        );
        let e = claimable(&s, &server, "spec.bootVolume", "data", Some(&free), true)
            .expect_err("not bootable");
        assert_eq!(
            (e.code, e.details.causes[0].field.as_str()),
            (422, "spec.bootVolume")
        );
    }

    #[test]
    fn a_multi_attach_volume_is_claimed_by_several_servers_up_to_its_bound() {
        let server = json!({"metadata": {"name": "web"}});
        let s = subject();
        let f = "spec.volumes[0].volume";
        let held_by = |n: usize, multi: bool| {
            let attachments: Vec<Value> = (0..n)
                .map(|i| json!({"server": format!("db-{i}"), "node": "n1"}))
                .collect();
            json!({"spec": {"sizeGiB": 1, "multiAttach": multi},
                   "status": {"attachedTo": "db-0", "attachments": attachments}})
        };
        assert!(claimable(&s, &server, f, "data", Some(&held_by(1, true)), false).is_ok());
        assert!(
            claimable(&s, &server, f, "data", Some(&held_by(15, true)), false).is_ok(),
            "the sixteenth"
        );
        let e = claimable(&s, &server, f, "data", Some(&held_by(16, true)), false)
            .expect_err("a seventeenth");
        assert_eq!((e.code, e.details.causes[0].field.as_str()), (409, f));
        assert!(e.message.contains("16 servers"), "{}", e.message);
        let e = claimable(&s, &server, f, "data", Some(&held_by(1, false)), false)
            .expect_err("not multi-attach");
        assert_eq!((e.code, e.details.causes[0].field.as_str()), (409, f));
        assert!(e.message.contains("spec.multiAttach"), "{}", e.message);
        // A status written before there were attachments: attachedTo is the one holder.
        let legacy = json!({"spec": {"sizeGiB": 1, "multiAttach": true},
                            "status": {"attachedTo": "db", "attachedNode": "n2"}});
        assert!(claimable(&s, &server, f, "data", Some(&legacy), false).is_ok());
        let c = claimed(&legacy, "web").expect("claimed");
        assert_eq!(
            c["status"]["attachments"],
            json!([{"server": "db", "node": "n2"}, {"server": "web"}])
        );
        assert_eq!(
            c["status"]["attachedTo"], "db",
            "the first stays attachedTo"
        );
        assert!(
            c["status"]["conditions"][0]["message"]
                .as_str()
                .is_some_and(|m| m.contains("db, web")),
            "{}",
            c["status"]["conditions"][0]
        );
        // Claimed again by a server that holds it: listed once.
        assert_eq!(
            claimed(&c, "web").expect("claimed")["status"]["attachments"],
            c["status"]["attachments"]
        );
    }

    #[test]
    fn a_claimed_volume_says_so() {
        let v = json!({"metadata": {"name": "data", "generation": 1},
                       "status": {"phase": "Available", "node": "n1"}});
        let c = claimed(&v, "web").expect("claimed");
        assert_eq!(c["status"]["attachedTo"], "web");
        assert_eq!(c["status"]["attachments"], json!([{"server": "web"}]));
        assert_eq!(c["status"]["phase"], "InUse");
        assert_eq!(c["status"]["node"], "n1");
        assert_eq!(c["status"]["conditions"][0]["type"], "Attached");
        // Not made yet: its phase stays the storage agent's.
        let pending = json!({"metadata": {"name": "data"}, "status": {"phase": "Creating"}});
        assert_eq!(
            claimed(&pending, "web").expect("claimed")["status"]["phase"],
            "Creating"
        );
    }
}
