//! VolumeExports at admission: an export names the volume it serves exactly, is named for its
//! (volume, node) pair, and is served at the storage address the volume's pool recorded.
//!
//! # Guarantees
//! - A VolumeExport is created only for a Volume that exists with the uid it names
//!   (`spec.volume`, 422 on `spec.volume.uid` otherwise), whose data is on
//!   `spec.storageNode` (its `status.node`, 422 on `spec.storageNode` otherwise), and under
//!   the name [`volume_export_name`] gives its (volume uid, node) pair (422 on
//!   `metadata.name`): one export per pair, and a second create of it is 409. The create holds
//!   the Volume as read.
//! - It is created only to a node (`spec.node`) an attachment of the volume is on (one of its
//!   `status.attachments[].node`, as read in that same revision; 422 on `spec.node`
//!   otherwise): whoever may create exports cannot have a volume's data served to a node no
//!   Server holding it is placed on.
//! - One project has at most [`EXPORTS_PER_PROJECT_AND_STORAGE_NODE`] exports from one
//!   storage node (403 beyond it), counted at a revision the create holds (concurrent creates
//!   are checked again): no project takes every export port of a storage address.
//! - Its spec never changes (422 on `spec`): the storage node serves and the node connects to
//!   what it was made for.
//! - A status recording where it is served (`status.host`, newly or moved) records the
//!   storage address the volume's pool's node recorded (the pool's `status.storageAddress`,
//!   which only an operator moves), and the write holds the pool as read: 422 on
//!   `status.host` otherwise. Compute nodes connect to no other host, and to a port of the
//!   cluster's export range alone (`status.port` is 1024 or above here; each compute node
//!   checks it against `--export-ports`).

use futures::future::BoxFuture;
use serde_json::Value;
use stratus_api_types::storage::{VolumeExportSpec, volume_export_name};

use crate::admission::{Admission, Change, Ctx, Subject, Written};
use crate::base::error::{ApiError, ApiResult, Cause};
use crate::base::meta;
use crate::storage::keys;
use crate::storage::store::Write;

/// The group of the kind.
const GROUP: &str = "storage.stratus.dev";

/// How often a create is checked again when what it read changed before its write.
const RETRIES: usize = 5;

/// The most VolumeExports one project may have from one storage node.
///
/// Each export is one `qemu-nbd` on a port of its own of the storage node's storage address,
/// from a range of 191 by default (`--export-ports 10809-10999`), shared by every project.
/// Without a bound one project takes them all: 16 servers on other nodes, each holding 12
/// multi-attach volumes of one pool, are 192 exports, and every other project's remote
/// attachment on that node then waits for a port. 48 (a quarter of the default range) is
/// 16 servers with 3 remote volumes each, or 3 servers with all 16 of theirs, on top of
/// any number of local attachments (which need no export); the range holds four such
/// projects at once. Refused with 403 (a limit, as an exceeded quota is), the attachments
/// controller tries again and the attachment waits until an export of the project ends.
pub const EXPORTS_PER_PROJECT_AND_STORAGE_NODE: usize = 48;

/// Admission of VolumeExports.
pub struct VolumeExports;

impl Admission for VolumeExports {
    fn write<'a>(
        &'a self,
        ctx: Ctx<'a>,
        s: Subject<'a>,
        w: Change<'a>,
    ) -> Option<BoxFuture<'a, ApiResult<Written>>> {
        (s.group == GROUP && s.kind == "VolumeExport").then(|| {
            Box::pin(async move {
                match w.old {
                    None => create(ctx, &s, w).await,
                    Some((old, rev)) => update(ctx, &s, w, old, rev).await,
                }
            }) as BoxFuture<'a, _>
        })
    }
}

fn invalid(s: &Subject<'_>, obj: &Value, field: &str, message: String) -> ApiError {
    ApiError::invalid(
        s.kind,
        s.group,
        s.plural,
        meta::meta_str(obj, "name").unwrap_or_default(),
        vec![Cause::invalid(field, message)],
    )
}

fn spec(s: &Subject<'_>, obj: &Value) -> ApiResult<VolumeExportSpec> {
    obj.get("spec")
        .cloned()
        .and_then(|v| serde_json::from_value(v).ok())
        .ok_or_else(|| {
            invalid(
                s,
                obj,
                "spec",
                "Invalid value: not a VolumeExport spec".into(),
            )
        })
}

/// The Volume `spec` names, as stored, with its key.
async fn volume(ctx: Ctx<'_>, spec: &VolumeExportSpec) -> ApiResult<Option<(String, Value, i64)>> {
    let v = &spec.volume;
    let key = keys::object(ctx.prefix, GROUP, "volumes", Some(&v.namespace), &v.name);
    let got = ctx.store.get(&key).await.map_err(ApiError::from)?;
    Ok(got
        .filter(|s| meta::meta_str(&s.value, "uid") == Some(v.uid.as_str()))
        .map(|s| (key, s.value, s.mod_revision)))
}

async fn create(ctx: Ctx<'_>, s: &Subject<'_>, w: Change<'_>) -> ApiResult<Written> {
    let spec = spec(s, w.new)?;
    let want = volume_export_name(&spec.volume.uid, &spec.node);
    if meta::meta_str(w.new, "name") != Some(want.as_str()) {
        return Err(invalid(
            s,
            w.new,
            "metadata.name",
            format!(
                "Invalid value: a volume's export to a node is named {want:?} (volume uid, then node)"
            ),
        ));
    }
    for _ in 0..RETRIES {
        let written = create_once(ctx, s, w, &spec).await?;
        // Absent, so what changed is the volume or the exports counted: checked again.
        if !matches!(written.write, Write::Conflict(0)) {
            return Ok(written);
        }
    }
    Err(ApiError::conflict(
        GROUP,
        s.plural,
        meta::meta_str(w.new, "name").unwrap_or_default(),
        "the volume or its project's exports kept changing while the export was created; retry",
    ))
}

/// One try of [`create`] past its name check: `Conflict(0)` when the volume, or an export,
/// changed between the read and the write.
async fn create_once(
    ctx: Ctx<'_>,
    s: &Subject<'_>,
    w: Change<'_>,
    spec: &VolumeExportSpec,
) -> ApiResult<Written> {
    let Some((key, vol, rev)) = volume(ctx, spec).await? else {
        return Err(invalid(
            s,
            w.new,
            "spec.volume.uid",
            format!(
                "Invalid value: {:?}: volume {}/{} does not exist with this uid",
                spec.volume.uid, spec.volume.namespace, spec.volume.name
            ),
        ));
    };
    let on = vol.pointer("/status/node").and_then(Value::as_str);
    if on != Some(spec.storage_node.as_str()) {
        return Err(invalid(
            s,
            w.new,
            "spec.storageNode",
            format!(
                "Invalid value: {:?}: the volume's data is on {} (its status.node)",
                spec.storage_node,
                on.unwrap_or("no node yet")
            ),
        ));
    }
    let attached = vol
        .pointer("/status/attachments")
        .and_then(Value::as_array)
        .is_some_and(|all| {
            all.iter()
                .any(|a| a.get("node").and_then(Value::as_str) == Some(spec.node.as_str()))
        });
    if !attached {
        return Err(invalid(
            s,
            w.new,
            "spec.node",
            format!(
                "Invalid value: {:?}: no attachment of volume {}/{} is on this node (its status.attachments[].node)",
                spec.node, spec.volume.namespace, spec.volume.name
            ),
        ));
    }
    // The exports one project has from this storage node, read at one revision the write
    // holds: no two creates both take the last one.
    let prefix = keys::collection(ctx.prefix, GROUP, "volumeexports", None);
    let all = ctx
        .store
        .list(&prefix, None, 0, 0)
        .await
        .map_err(ApiError::from)?;
    let ns = spec.volume.namespace.as_str();
    let held = all
        .items
        .iter()
        .filter(|(_, x)| {
            x.value
                .pointer("/spec/volume/namespace")
                .and_then(Value::as_str)
                == Some(ns)
                && x.value.pointer("/spec/storageNode").and_then(Value::as_str)
                    == Some(spec.storage_node.as_str())
        })
        .count();
    if held >= EXPORTS_PER_PROJECT_AND_STORAGE_NODE {
        return Err(ApiError::forbidden(format!(
            "volumeexports \"{}\" is forbidden: project {ns} has {held} exports from storage node {}, the most one project may have from one storage node ({EXPORTS_PER_PROJECT_AND_STORAGE_NODE}); detach volumes of servers on other nodes first",
            meta::meta_str(w.new, "name").unwrap_or_default(),
            spec.storage_node
        )));
    }
    Ok(ctx
        .store
        .write_guarded(
            w.key,
            w.new,
            None,
            &[(prefix.as_str(), all.revision)],
            Some((&key, rev)),
        )
        .await
        .map_err(ApiError::from)?
        .into())
}

async fn update(
    ctx: Ctx<'_>,
    s: &Subject<'_>,
    w: Change<'_>,
    old: &Value,
    rev: i64,
) -> ApiResult<Written> {
    if old.get("spec") != w.new.get("spec") {
        return Err(invalid(
            s,
            w.new,
            "spec",
            "Invalid value: field is immutable: an export serves the volume and node it was made for"
                .into(),
        ));
    }
    let pool = served_at(ctx, s, old, w.new).await?;
    Ok(ctx
        .store
        .write_guarded(
            w.key,
            w.new,
            Some(rev),
            &[],
            pool.as_ref().map(|(k, r)| (k.as_str(), *r)),
        )
        .await
        .map_err(ApiError::from)?
        .into())
}

/// Checks the host a write newly records (`status.host`): the storage address the pool of the
/// export's volume records. Answers the pool's key and the revision it was read at.
async fn served_at(
    ctx: Ctx<'_>,
    s: &Subject<'_>,
    old: &Value,
    new: &Value,
) -> ApiResult<Option<(String, i64)>> {
    let Some(host) = new.pointer("/status/host").and_then(Value::as_str) else {
        return Ok(None);
    };
    if old.pointer("/status/host").and_then(Value::as_str) == Some(host) {
        return Ok(None);
    }
    let field = "status.host";
    let spec = spec(s, new)?;
    let pool = volume(ctx, &spec)
        .await?
        .and_then(|(_, v, _)| Some(v.pointer("/status/pool")?.as_str()?.to_owned()));
    let Some(pool) = pool else {
        return Err(invalid(
            s,
            new,
            field,
            format!("Invalid value: {host:?}: the volume is gone or in no storage pool"),
        ));
    };
    let key = keys::object(ctx.prefix, GROUP, "storagepools", None, &pool);
    let stored = ctx.store.get(&key).await.map_err(ApiError::from)?;
    let recorded = stored
        .as_ref()
        .and_then(|p| p.value.pointer("/status/storageAddress"))
        .and_then(Value::as_str);
    let ip = |a: &str| a.parse::<std::net::IpAddr>().ok();
    match (recorded, stored.as_ref().map(|p| p.mod_revision)) {
        (Some(a), Some(rev)) if ip(a).is_some() && ip(a) == ip(host) => Ok(Some((key, rev))),
        (Some(a), _) => Err(invalid(
            s,
            new,
            field,
            format!(
                "Invalid value: {host:?}: not {a}, the storage address storage pool {pool} records (status.storageAddress)"
            ),
        )),
        (None, _) => Err(invalid(
            s,
            new,
            field,
            format!(
                "Invalid value: {host:?}: storage pool {pool} records no storage address (status.storageAddress) to export at"
            ),
        )),
    }
}
