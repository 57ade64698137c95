//! Block storage at admission (Cinder's API checks, Stratus' claims): Volumes and
//! VolumeSnapshots are checked against what they name, placed on a StoragePool through the
//! `volumes/{name}/binding` subresource, and their pool capacity claimed in the same etcd
//! transaction as the write that needs it.
//!
//! # Claims
//! A placed Volume or a VolumeSnapshot holds one claim of its size under
//! `{prefix}/_claims/storage/{pool}/{uid}` ([`Claims`], shared with compute placement). A
//! pool's allocation is the sum of its claims read at one revision, and every write that adds
//! to it (a binding, an extend, a snapshot) fails its transaction if any claim on the pool
//! changed since, so concurrent writers never overcommit a pool. A claim goes in the
//! transaction that deletes its object (after the storage agent released its finalizer).
//!
//! # Checks
//! - A Volume's size is 1 to 65,536 GiB; it grows (an extend, whose claim and quota grow in
//!   the update's transaction, refused with 409 when its pool lacks room) and never shrinks
//!   (422 on `spec.sizeGiB`). Attached over NBD (to a server on another node than its
//!   pool's) it grows as on its own node: its storage node serves it anew at its size beside
//!   the export the guest holds, and the consuming node moves the guest's disk (a volume's,
//!   or the root disk of a server booting from it) to it; not one whose export is served
//!   without TLS (a grown export lets in a second client of the node's address): 422 on
//!   `spec.sizeGiB`. It does
//!   not grow while attached (to any server) on a pool whose agent
//!   reports it grows no volume a server holds (`status.growsInUse` `Never`; 422 on
//!   `spec.sizeGiB`): it would wait until detached, for a boot volume for good. A pool that
//!   grows one only where the space after it is free (`WhenSpaceFollows`), or that reports
//!   nothing (an older agent), takes the grow: only its agent knows, and says on the volume
//!   why it waits. Its source is exactly one of an image (of the project, or a
//!   public one), a snapshot or a volume of its namespace, which must exist (422) and not be
//!   larger than it; the source and where the volume may go are immutable. `spec.multiAttach`
//!   changes only while no server holds the volume (422 on `spec.multiAttach`).
//! - A VolumeSnapshot's volume must exist in its namespace (422 on `spec.volume`); the
//!   snapshot is placed on its volume's pool and node, with the volume's size, phase
//!   `Creating` and its claim: at its create when the volume is placed, else by the volume's
//!   binding (it waits `Pending`, `Ready=False` `SourceNotReady`, and says so when it does not
//!   fit). An attached volume is snapshotted only with `spec.force`, as Cinder.
//! - A Volume that is attached, or has snapshots, is not deleted (409), as Cinder refuses;
//!   the snapshots check holds until the delete is written (a snapshot's create holds the
//!   volume as it read it).
//! - A Volume or VolumeSnapshot that a Volume still `Pending` or `Creating` is made from
//!   (its `spec.source`) is not deleted (409 naming those volumes): the storage agent may be
//!   copying it. The check holds until the delete is written.
//! - `status.pool` and `status.node` are set only by the placement (and a snapshot's
//!   `status.sizeGiB` only at its create): a status write changing them is 422.
//!
//! # Quota
//! Volumes, their GiB and snapshots count against quotas, a snapshot's GiB (its volume's size
//! when taken) in `volumeGiB` with the volumes' as Cinder's `gigabytes`: every write here that
//! adds to what quota counts carries [`quota::check`]'s guards in its own transaction.

use futures::future::BoxFuture;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value, json};
use stratus_api_types::common::{ConditionType, Reason};
use stratus_api_types::storage::{
    InUseGrowth, StoragePool, TEARDOWN_FINALIZER, VOLUME_UID, VolumePhase, VolumeSpec,
    volume_export_name,
};

use crate::admission::binding::{self, Claims, Placed, Placement, PlacementLocks, Seen};
use crate::admission::{Admission, Change, Ctx, Held, Subject, Written, quota};
use crate::base::error::{ApiError, ApiResult, Cause};
use crate::base::meta;
use crate::storage::keys;
use crate::storage::store::{Guard, Read, Stored, Write};

/// The API group of the storage kinds.
pub const GROUP: &str = "storage.stratus.dev";

/// The claims' space under `_claims/`.
const SPACE: &str = "storage";
/// How many times a write is tried again when another got in between.
const RETRIES: usize = 48;
/// The largest volume, GiB (as the schema says).
const MAX_GIB: u64 = 65_536;

/// Whether objects of `kind` are Volumes, the storage kind with a `binding` subresource.
pub fn is_volume(group: &str, kind: &str) -> bool {
    group == GROUP && kind == "Volume"
}

/// Block storage admission: registered for Volumes and VolumeSnapshots, before quota.
#[derive(Debug)]
pub struct Storage;

impl Admission for Storage {
    /// A Volume waits for the volume scheduler (`Pending`); a snapshot is placed at create.
    fn initial_status(&self) -> Option<Value> {
        Some(json!({"phase": VolumePhase::Pending}))
    }

    /// Refuses a status write that moves the placement (or a snapshot's size, which its claim
    /// follows).
    fn check_status_write(&self, s: &Subject<'_>, old: &Value, new: &Value) -> ApiResult<()> {
        let causes: Vec<Cause> = protected(s.kind)
            .iter()
            .filter(|f| old.pointer(&format!("/status/{f}")) != new.pointer(&format!("/status/{f}")))
            .map(|f| {
                Cause::invalid(
                    format!("status.{f}"),
                    "Forbidden: set only by the placement (volumes/binding, or a snapshot's create)",
                )
            })
            .collect();
        if causes.is_empty() {
            Ok(())
        } else {
            Err(invalid(s, new, causes))
        }
    }

    /// The object's claim on its pool.
    fn attached_keys(&self, prefix: &str, obj: &Value) -> Vec<String> {
        let pool = obj.pointer("/status/pool").and_then(Value::as_str);
        match (pool, meta::meta_str(obj, "uid")) {
            (Some(pool), Some(uid)) => vec![claim_key(prefix, pool, uid)],
            _ => Vec::new(),
        }
    }

    /// An attached Volume, or one with snapshots, stays (409); so does a Volume or snapshot
    /// a volume still being made is made from.
    fn check_delete<'a>(
        &'a self,
        ctx: Ctx<'a>,
        s: Subject<'a>,
        obj: &'a Value,
    ) -> Option<BoxFuture<'a, ApiResult<Vec<Held>>>> {
        (s.group == GROUP && matches!(s.kind, "Volume" | "VolumeSnapshot"))
            .then(|| Box::pin(not_in_use(ctx, s, obj)) as BoxFuture<'a, _>)
    }

    /// Creates with their checks and claims; updates with theirs.
    fn write<'a>(
        &'a self,
        ctx: Ctx<'a>,
        s: Subject<'a>,
        w: Change<'a>,
    ) -> Option<BoxFuture<'a, ApiResult<Written>>> {
        let ns = s.namespace?;
        Some(match (s.kind, w.old) {
            ("Volume", None) => Box::pin(create_volume(ctx, s, ns, w)),
            ("VolumeSnapshot", None) => Box::pin(create_snapshot(ctx, s, ns, w)),
            ("Volume", Some((old, rev))) => Box::pin(update_volume(ctx, s, ns, w, old, rev)),
            ("VolumeSnapshot", Some((old, rev))) => Box::pin(update_snapshot(ctx, s, w, old, rev)),
            _ => return None,
        })
    }
}

/// The status fields only the placement sets.
fn protected(kind: &str) -> &'static [&'static str] {
    match kind {
        "Volume" => &["pool", "node"],
        "VolumeSnapshot" => &["pool", "node", "sizeGiB"],
        _ => &[],
    }
}

/// The claims on pool `pool`.
fn claims(prefix: &str, pool: &str) -> Claims {
    Claims::on(prefix, SPACE, pool)
}

/// The claim of the object of `uid` on pool `pool`.
fn claim_key(prefix: &str, pool: &str, uid: &str) -> String {
    claims(prefix, pool).key(uid)
}

/// What the claims read hold, GiB.
fn claimed_gib<'a>(claims: impl IntoIterator<Item = &'a Value>) -> u64 {
    claims
        .into_iter()
        .filter_map(|c| c.get("sizeGiB").and_then(Value::as_u64))
        .fold(0, u64::saturating_add)
}

/// The room left on a pool whose other claims hold `others` GiB, or why there is none to ask.
fn room(pool_name: &str, pool: &Value, others: u64) -> Result<u64, String> {
    let pool: StoragePool = serde_json::from_value(pool.clone())
        .map_err(|e| format!("storage pool {pool_name} cannot be read: {e}"))?;
    let allocatable = pool
        .allocatable_gib()
        .ok_or_else(|| format!("storage pool {pool_name} has not reported its capacity"))?;
    Ok(allocatable.saturating_sub(others))
}

/// Refuses `need` GiB more on a pool with `free` left.
fn fits(pool_name: &str, pool: &Value, others: u64, need: u64) -> Result<(), String> {
    let free = room(pool_name, pool, others)?;
    if need > free {
        return Err(format!(
            "storage pool {pool_name} has insufficient capacity: {free} GiB free, {need} GiB asked"
        ));
    }
    Ok(())
}

fn name_of(obj: &Value) -> &str {
    meta::meta_str(obj, "name").unwrap_or_default()
}

fn going(obj: &Value) -> bool {
    obj.pointer("/metadata/deletionTimestamp").is_some()
}

/// 422 for the object.
fn invalid(s: &Subject<'_>, obj: &Value, causes: Vec<Cause>) -> ApiError {
    ApiError::invalid(s.kind, s.group, s.plural, name_of(obj), causes)
}

/// 422 for one field.
fn invalid_field(s: &Subject<'_>, obj: &Value, field: &str, message: String) -> ApiError {
    invalid(s, obj, vec![Cause::invalid(field, message)])
}

/// 422: the object a field names does not exist.
fn not_found_field(s: &Subject<'_>, obj: &Value, field: &str, message: String) -> ApiError {
    invalid(
        s,
        obj,
        vec![Cause {
            reason: "FieldValueNotFound".into(),
            message,
            field: field.into(),
        }],
    )
}

/// 409 naming the field whose value cannot be had now.
fn conflict_field(s: &Subject<'_>, obj: &Value, field: &str, message: String) -> ApiError {
    let mut e = ApiError::conflict(
        s.group,
        s.plural,
        name_of(obj),
        format!("{field}: {message}"),
    );
    e.details.causes.push(Cause::invalid(field, message));
    e
}

/// 409: the retries ran out.
fn too_busy(s: &Subject<'_>, obj: &Value) -> ApiError {
    ApiError::conflict(
        s.group,
        s.plural,
        name_of(obj),
        "too many concurrent changes to the storage pool or project; retry",
    )
}

/// The object's spec as its typed form.
fn spec<T: DeserializeOwned>(s: &Subject<'_>, obj: &Value) -> ApiResult<T> {
    serde_json::from_value(obj.get("spec").cloned().unwrap_or(Value::Null))
        .map_err(|e| invalid_field(s, obj, "spec", format!("Invalid value: {e}")))
}

/// Checks a Volume's spec on its own: its size, and a source naming exactly one thing.
fn check_volume_spec(s: &Subject<'_>, obj: &Value, spec: &VolumeSpec) -> ApiResult<()> {
    let mut causes = Vec::new();
    if !(1..=MAX_GIB).contains(&spec.size_gib) {
        causes.push(Cause::invalid(
            "spec.sizeGiB",
            format!(
                "Invalid value: {}: a volume is 1 to {MAX_GIB} GiB",
                spec.size_gib
            ),
        ));
    }
    if let Some(source) = &spec.source
        && source.given().len() != 1
    {
        causes.push(Cause::invalid(
            "spec.source",
            "Invalid value: exactly one of image, snapshot or volume",
        ));
    }
    if causes.is_empty() {
        Ok(())
    } else {
        Err(invalid(s, obj, causes))
    }
}

/// After a create's transaction failed: what the create answers (the object exists, or its
/// Project changed since it was checked), or `None` to try again.
async fn settled(ctx: Ctx<'_>, w: &Change<'_>) -> ApiResult<Option<Written>> {
    if let Some(now) = ctx.store.get(w.key).await.map_err(ApiError::from)? {
        return Ok(Some(Write::Conflict(now.mod_revision).into()));
    }
    if super::parent_changed(ctx, w.parent).await? {
        return Ok(Some(Write::Conflict(0).into()));
    }
    Ok(None)
}

/// After an update's transaction failed: the object's answer when it changed since it was
/// read, or `None` to try again.
async fn changed(ctx: Ctx<'_>, key: &str, rev: i64) -> ApiResult<Option<Written>> {
    let now = ctx.store.get(key).await.map_err(ApiError::from)?;
    Ok(match now.map(|s| s.mod_revision) {
        Some(r) if r == rev => None,
        r => Some(Write::Conflict(r.unwrap_or(0)).into()),
    })
}

/// The guards every create carries: the object is absent, its Project as checked, quota holds.
fn create_guards<'a>(w: &Change<'a>, quota: &'a [(String, i64)]) -> Vec<Guard<'a>> {
    let mut g = vec![Guard::Absent(w.key)];
    g.extend(w.parent.map(|(k, rev)| Guard::Revision(k, rev)));
    g.extend(quota.iter().map(|(p, at)| Guard::Unchanged(p, *at)));
    g
}

/// A source snapshot or volume as read: refused when missing, going, or larger than `size`.
fn check_source(
    s: &Subject<'_>,
    obj: &Value,
    field: &str,
    what: &str,
    name: &str,
    read: Option<&Stored>,
    size: u64,
) -> ApiResult<()> {
    let Some(src) = read else {
        return Err(not_found_field(
            s,
            obj,
            field,
            format!("Not found: {what} {name:?} does not exist in this namespace"),
        ));
    };
    if going(&src.value) {
        return Err(conflict_field(
            s,
            obj,
            field,
            format!("{what} {name:?} is being deleted"),
        ));
    }
    let size_of = match what {
        "snapshot" => "/status/sizeGiB",
        _ => "/spec/sizeGiB",
    };
    if let Some(theirs) = src.value.pointer(size_of).and_then(Value::as_u64)
        && theirs > size
    {
        return Err(invalid_field(
            s,
            obj,
            "spec.sizeGiB",
            format!(
                "Invalid value: {size}: smaller than its source {what} {name:?} ({theirs} GiB)"
            ),
        ));
    }
    Ok(())
}

/// Whether an Image `name` exists in `ns`, or as a public image of any project (as a Server's
/// image is found).
async fn image_exists(ctx: Ctx<'_>, ns: &str, name: &str) -> ApiResult<bool> {
    let key = keys::object(ctx.prefix, "image.stratus.dev", "images", Some(ns), name);
    if ctx.store.get(&key).await.map_err(ApiError::from)?.is_some() {
        return Ok(true);
    }
    let all = keys::collection(ctx.prefix, "image.stratus.dev", "images", None);
    let page = ctx
        .store
        .list(&all, None, 0, 0)
        .await
        .map_err(ApiError::from)?;
    Ok(page.items.iter().any(|(_, i)| {
        name_of(&i.value) == name
            && i.value.pointer("/spec/visibility").and_then(Value::as_str) == Some("public")
    }))
}

async fn create_volume(
    ctx: Ctx<'_>,
    s: Subject<'_>,
    ns: &str,
    w: Change<'_>,
) -> ApiResult<Written> {
    let spec: VolumeSpec = spec(&s, w.new)?;
    check_volume_spec(&s, w.new, &spec)?;
    let given = spec.source.as_ref().map(|x| x.given()).unwrap_or_default();
    let (field, what, name) = match given.first() {
        Some(("image", name)) => {
            if !image_exists(ctx, ns, name).await? {
                return Err(not_found_field(
                    &s,
                    w.new,
                    "spec.source.image",
                    format!("Not found: image {name:?} is neither in this project nor public"),
                ));
            }
            (None, "image", *name)
        }
        Some((f, name)) => (Some(format!("spec.source.{f}")), *f, *name),
        None => (None, "", ""),
    };
    let source_key = field.as_ref().map(|_| {
        let plural = if what == "snapshot" {
            "volumesnapshots"
        } else {
            "volumes"
        };
        keys::object(ctx.prefix, GROUP, plural, Some(ns), name)
    });
    for _ in 0..RETRIES {
        let quota = quota::check(ctx, s, ns, w).await?;
        let mut guards = create_guards(&w, &quota);
        if let (Some(f), Some(k)) = (&field, &source_key) {
            let src = ctx.store.get(k).await.map_err(ApiError::from)?;
            check_source(&s, w.new, f, what, name, src.as_ref(), spec.size_gib)?;
            if let Some(src) = src {
                guards.push(Guard::Revision(k, src.mod_revision));
            }
        }
        if let Some(rev) = ctx
            .store
            .write_many(&guards, &[(w.key, w.new)], &[])
            .await
            .map_err(ApiError::from)?
        {
            return Ok(Write::Done(rev).into());
        }
        if let Some(done) = settled(ctx, &w).await? {
            return Ok(done);
        }
    }
    Err(too_busy(&s, w.new))
}

/// An update of a Volume: the size only grows, and a placed volume's claim grows with it
/// (and its quota), atomically with the check that its pool has room.
async fn update_volume(
    ctx: Ctx<'_>,
    s: Subject<'_>,
    ns: &str,
    w: Change<'_>,
    old: &Value,
    rev: i64,
) -> ApiResult<Written> {
    let before: VolumeSpec = spec(&s, old)?;
    let after: VolumeSpec = spec(&s, w.new)?;
    check_volume_spec(&s, w.new, &after)?;
    let mut causes = Vec::new();
    if after.size_gib < before.size_gib {
        causes.push(Cause::invalid(
            "spec.sizeGiB",
            format!(
                "Invalid value: {}: a volume cannot shrink (it is {} GiB)",
                after.size_gib, before.size_gib
            ),
        ));
    }
    for f in ["source", "storagePool", "availabilityZone", "volumeType"] {
        let p = format!("/spec/{f}");
        if old.pointer(&p) != w.new.pointer(&p) {
            causes.push(Cause::invalid(
                format!("spec.{f}"),
                "Invalid value: field is immutable",
            ));
        }
    }
    if before.multi_attach != after.multi_attach && attached(old) {
        causes.push(Cause::invalid(
            "spec.multiAttach",
            format!(
                "Invalid value: {}: changes only while no server holds the volume (its status.attachments)",
                after.multi_attach
            ),
        ));
    }
    if !causes.is_empty() {
        return Err(invalid(&s, w.new, causes));
    }
    if after.size_gib == before.size_gib {
        return Ok(ctx
            .store
            .write_guarded(w.key, w.new, Some(rev), &[], None)
            .await
            .map_err(ApiError::from)?
            .into());
    }
    if going(old) {
        return Err(conflict_field(
            &s,
            w.new,
            "spec.sizeGiB",
            "the volume is being deleted".into(),
        ));
    }
    if let Some(why) = not_grown_over_nbd(ctx, old).await? {
        return Err(invalid_field(
            &s,
            w.new,
            "spec.sizeGiB",
            format!("Invalid value: {}: cannot grow while {why}", after.size_gib),
        ));
    }
    let placed = old.pointer("/status/pool").and_then(Value::as_str);
    let uid = meta::meta_str(old, "uid").unwrap_or_default();
    for _ in 0..RETRIES {
        let quota = quota::check(ctx, s, ns, w).await?;
        let mut guards = vec![Guard::Revision(w.key, rev)];
        guards.extend(quota.iter().map(|(p, at)| Guard::Unchanged(p, *at)));
        let claim = json!({
            "volume": format!("{ns}/{}", name_of(w.new)),
            "sizeGiB": after.size_gib,
        });
        let Some(pool) = placed else {
            // Not placed yet: the scheduler places it at its new size.
            if let Some(r) = write(ctx, &guards, &[(w.key, w.new)]).await? {
                return Ok(Write::Done(r).into());
            }
            if let Some(done) = changed(ctx, w.key, rev).await? {
                return Ok(done);
            }
            continue;
        };
        let PoolRead {
            key: pool_key,
            claims: on,
            mine,
            pool: pool_obj,
            others,
            at,
        } = read_pool(ctx, pool, uid).await?;
        let Some(pool_obj) = pool_obj else {
            return Err(conflict_field(
                &s,
                w.new,
                "spec.sizeGiB",
                format!("cannot extend: storage pool {pool} is gone"),
            ));
        };
        if attached(old) && grows_in_use(&pool_obj.value) == Some(InUseGrowth::Never) {
            // Decided on the pool as read: the write holds its revision.
            return Err(invalid_field(
                &s,
                w.new,
                "spec.sizeGiB",
                format!(
                    "Invalid value: {}: cannot grow while attached: storage pool {pool} grows no volume a server holds (its status.growsInUse is Never); detach it (take it out of the server's spec.volumes: a stopped server keeps it attached), grow it, attach it again",
                    after.size_gib
                ),
            ));
        }
        let (from, to) = (before.size_gib, after.size_gib);
        let refuse = |why: String| {
            conflict_field(
                &s,
                w.new,
                "spec.sizeGiB",
                format!("cannot extend from {from} to {to} GiB: {why}"),
            )
        };
        let room = room(pool, &pool_obj.value, others).map_err(refuse)?;
        if to > room {
            return Err(refuse(format!(
                "storage pool {pool} has insufficient capacity: {} GiB free, {} GiB more asked",
                room.saturating_sub(from),
                to - from
            )));
        }
        let grown = pool_obj.mod_revision;
        guards.push(Guard::Revision(&pool_key, grown));
        guards.push(Guard::Unchanged(on.prefix(), at));
        if let Some(r) = write(ctx, &guards, &[(w.key, w.new), (&mine, &claim)]).await? {
            return Ok(Write::Done(r).into());
        }
        if let Some(done) = changed(ctx, w.key, rev).await? {
            return Ok(done);
        }
    }
    Err(too_busy(&s, w.new))
}

/// Whether a Server holds the stored Volume `vol` (`status.attachedTo`, the first of
/// `status.attachments`). The update holds the volume as read, so no Server takes it before
/// what is decided on this is written.
fn attached(vol: &Value) -> bool {
    vol.pointer("/status/attachedTo")
        .and_then(Value::as_str)
        .is_some()
}

/// Why the stored Volume `vol`, attached over NBD (to a server placed on another node than
/// the volume's), cannot grow there, if it cannot: its export is served without TLS (its
/// VolumeExport's `status.tls` false: the storage agent runs with `--nbd-insecure`), and a
/// grown export lets in a second client of the consuming node's address for the guest's
/// move (of a volume's disk, or of the root disk of a server booting from it), which a host
/// that spoofs that address could take without TLS. An export not served yet (no
/// `status.port`) is made at the grown size.
async fn not_grown_over_nbd(ctx: Ctx<'_>, vol: &Value) -> ApiResult<Option<String>> {
    let st = |p: &str| vol.pointer(&format!("/status/{p}")).and_then(Value::as_str);
    let (Some(home), Some(uid)) = (st("node"), meta::meta_str(vol, "uid")) else {
        return Ok(None);
    };
    let listed = vol.pointer("/status/attachments").and_then(Value::as_array);
    // `attachments`, or `attachedTo` alone for a status written before there were any.
    let remote: Vec<(&str, &str)> = match listed.filter(|a| !a.is_empty()) {
        Some(all) => all
            .iter()
            .filter_map(|a| {
                let server = a.get("server").and_then(Value::as_str)?;
                let node = a.get("node").and_then(Value::as_str)?;
                (node != home).then_some((server, node))
            })
            .collect(),
        None => st("attachedTo")
            .zip(st("attachedNode").filter(|n| *n != home))
            .into_iter()
            .collect(),
    };
    for (server, node) in remote {
        let export_key = keys::object(
            ctx.prefix,
            GROUP,
            "volumeexports",
            None,
            &volume_export_name(uid, node),
        );
        let (got, _) = ctx
            .store
            .read_many(&[Read::Key(&export_key)])
            .await
            .map_err(ApiError::from)?;
        let field = |p: &str| got[0].first().and_then(|(_, o)| o.value.pointer(p));
        let served = field("/status/port").is_some();
        if served && field("/status/tls").and_then(Value::as_bool) != Some(true) {
            return Ok(Some(format!(
                "attached over NBD to server {server} on node {node} and served without TLS (the storage agent of {home} runs with --nbd-insecure): a grown export would take a second client of that node's address; serve exports over TLS (--nbd-tls-dir), or detach it, grow it, attach it again"
            )));
        }
    }
    Ok(None)
}

/// What the stored StoragePool `pool` reports of growing volumes in use (`status.growsInUse`;
/// `None`: nothing, or nothing this API server knows).
fn grows_in_use(pool: &Value) -> Option<InUseGrowth> {
    serde_json::from_value(pool.pointer("/status/growsInUse")?.clone()).ok()
}

/// A pool and its claims, read at one revision.
struct PoolRead {
    /// The pool's key.
    key: String,
    /// Its claims.
    claims: Claims,
    /// The key of the claim of the object being written.
    mine: String,
    /// The pool, if it exists.
    pool: Option<Stored>,
    /// What every other claim on it holds, GiB.
    others: u64,
    /// The revision read at.
    at: i64,
}

/// Reads pool `pool` and its claims, for the object of `uid` claiming on it.
async fn read_pool(ctx: Ctx<'_>, pool: &str, uid: &str) -> ApiResult<PoolRead> {
    let key = keys::object(ctx.prefix, GROUP, "storagepools", None, pool);
    let on = claims(ctx.prefix, pool);
    let mine = on.key(uid);
    let (mut got, at) = ctx
        .store
        .read_many(&[Read::Key(&key), Read::Prefix(on.prefix())])
        .await
        .map_err(ApiError::from)?;
    let others = claimed_gib(
        got[1]
            .iter()
            .filter(|(k, _)| *k != mine)
            .map(|(_, c)| &c.value),
    );
    Ok(PoolRead {
        pool: got[0].pop().map(|(_, p)| p),
        key,
        claims: on,
        mine,
        others,
        at,
    })
}

/// One guarded transaction of puts; its revision, or `None` when a guard failed.
async fn write(
    ctx: Ctx<'_>,
    guards: &[Guard<'_>],
    puts: &[(&str, &Value)],
) -> ApiResult<Option<i64>> {
    ctx.store
        .write_many(guards, puts, &[])
        .await
        .map_err(ApiError::from)
}

/// The Volume uid a snapshot records.
fn volume_uid(obj: &Value) -> Option<&str> {
    obj.pointer("/metadata/annotations")
        .and_then(|a| a.get(VOLUME_UID))
        .and_then(Value::as_str)
}

/// `obj` annotated with its Volume's uid.
fn set_volume_uid(obj: &mut Value, uid: &str) {
    let m = meta::meta_mut(obj);
    if !m.get("annotations").is_some_and(Value::is_object) {
        m.insert("annotations".into(), json!({}));
    }
    if let Some(a) = m.get_mut("annotations").and_then(Value::as_object_mut) {
        a.insert(VOLUME_UID.into(), json!(uid));
    }
}

/// Where a snapshot of the stored Volume `vol` goes: its pool and node, and the GiB it
/// claims there (the volume's size); `None` while the volume is placed nowhere.
fn snapshot_target(vol: &Value) -> Option<(&str, &str, u64)> {
    let pool = vol.pointer("/status/pool").and_then(Value::as_str)?;
    let node = vol.pointer("/status/node").and_then(Value::as_str)?;
    let size = vol
        .pointer("/spec/sizeGiB")
        .and_then(Value::as_u64)
        .unwrap_or(0);
    Some((pool, node, size))
}

/// A snapshot placed on its volume's pool, ready to be written with its claim.
struct SnapshotPlaced {
    /// The snapshot with its placement (`status.pool`, `node`, `sizeGiB`, phase `Creating`).
    obj: Value,
    /// Its claim's key and value.
    claim: (String, Value),
    /// The pool's key and the revision it was read at.
    pool: (String, i64),
    /// The pool's claims' prefix and the revision they were read at.
    claims: (String, i64),
}

/// Places snapshot `obj` (of namespace `ns`) on the pool of its volume `volume`, as stored
/// (`vol`, placed): reads the pool and its claims; `Err` says why the snapshot does not fit.
async fn place_snapshot(
    ctx: Ctx<'_>,
    ns: &str,
    obj: &Value,
    volume: &str,
    vol: &Value,
) -> ApiResult<Result<SnapshotPlaced, String>> {
    let Some((pool, node, size)) = snapshot_target(vol) else {
        return Ok(Err(format!(
            "volume {volume:?} is not placed on a storage pool yet"
        )));
    };
    let uid = meta::meta_str(obj, "uid").unwrap_or_default();
    let PoolRead {
        key: pool_key,
        claims: on,
        mine,
        pool: pool_obj,
        others,
        at,
    } = read_pool(ctx, pool, uid).await?;
    let Some(pool_obj) = pool_obj else {
        return Ok(Err(format!(
            "the storage pool {pool} of volume {volume:?} is gone"
        )));
    };
    if let Err(why) = fits(pool, &pool_obj.value, others, size) {
        return Ok(Err(format!(
            "no room for a snapshot of volume {volume:?}: {why}"
        )));
    }
    let mut placed = obj.clone();
    let generation = obj.pointer("/metadata/generation").and_then(Value::as_i64);
    let status = binding::status_mut(&mut placed)?;
    status.extend(Map::from_iter([
        ("phase".into(), json!("Creating")),
        ("pool".into(), json!(pool)),
        ("node".into(), json!(node)),
        ("sizeGiB".into(), json!(size)),
    ]));
    if status.contains_key("conditions") {
        // It waited for its volume's placement: it now waits for its node's copy.
        binding::set_condition(
            status,
            &ConditionType::Ready.no(
                Reason::SourceNotReady,
                format!(
                    "volume {volume:?} is placed on storage pool {pool} (node {node}); the copy is taken once it is made"
                ),
            ),
            generation,
        );
    }
    let claim = json!({
        "snapshot": format!("{ns}/{}", name_of(obj)),
        "sizeGiB": size,
    });
    Ok(Ok(SnapshotPlaced {
        obj: placed,
        claim: (mine, claim),
        pool: (pool_key, pool_obj.mod_revision),
        claims: (on.prefix().to_owned(), at),
    }))
}

/// A VolumeSnapshot's create: of a Volume of its namespace (422 when there is none), recorded
/// by uid; placed on the volume's pool with its claim when the volume is placed (409 when it
/// does not fit), else stored `Pending` (`Ready=False`, `SourceNotReady`) without a claim,
/// placed by the volume's binding ([`place_pending_snapshots`]).
async fn create_snapshot(
    ctx: Ctx<'_>,
    s: Subject<'_>,
    ns: &str,
    w: Change<'_>,
) -> ApiResult<Written> {
    let volume = w
        .new
        .pointer("/spec/volume")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let force = w.new.pointer("/spec/force").and_then(Value::as_bool) == Some(true);
    let volume_key = keys::object(ctx.prefix, GROUP, "volumes", Some(ns), volume);
    let field = "spec.volume";
    for _ in 0..RETRIES {
        let Some(vol) = ctx.store.get(&volume_key).await.map_err(ApiError::from)? else {
            return Err(not_found_field(
                &s,
                w.new,
                field,
                format!("Not found: volume {volume:?} does not exist in this namespace"),
            ));
        };
        let refuse = |why: String| Err(conflict_field(&s, w.new, field, why));
        if going(&vol.value) {
            return refuse(format!("volume {volume:?} is being deleted"));
        }
        if let Some(server) = vol
            .value
            .pointer("/status/attachedTo")
            .and_then(Value::as_str)
            && !force
        {
            return refuse(format!(
                "volume {volume:?} is attached to server {server:?}; set spec.force to snapshot it attached (crash-consistent)"
            ));
        }
        let mut obj = w.new.clone();
        set_volume_uid(
            &mut obj,
            meta::meta_str(&vol.value, "uid").unwrap_or_default(),
        );
        // The volume as read holds: a binding meanwhile makes this create read it again.
        let mut guards = vec![Guard::Revision(&volume_key, vol.mod_revision)];
        let placed = if snapshot_target(&vol.value).is_some() {
            match place_snapshot(ctx, ns, &obj, volume, &vol.value).await? {
                Ok(p) => Some(p),
                Err(why) => return refuse(why),
            }
        } else {
            let generation = obj.pointer("/metadata/generation").and_then(Value::as_i64);
            let status = binding::status_mut(&mut obj)?;
            status.insert("phase".into(), json!("Pending"));
            binding::set_condition(
                status,
                &ConditionType::Ready.no(
                    Reason::SourceNotReady,
                    format!(
                        "volume {volume:?} is not placed on a storage pool yet; the snapshot is placed with it and taken once it is made"
                    ),
                ),
                generation,
            );
            None
        };
        let obj = placed.as_ref().map_or(&obj, |p| &p.obj);
        if let Some(p) = &placed {
            guards.extend([
                Guard::Revision(&p.pool.0, p.pool.1),
                Guard::Unchanged(&p.claims.0, p.claims.1),
                Guard::Absent(&p.claim.0),
            ]);
        }
        // Its GiB count in the project's volumeGiB (as Cinder's gigabytes), checked on the
        // snapshot as stored, in the same transaction.
        let quota = quota::check(ctx, s, ns, Change { new: obj, ..w }).await?;
        guards.extend(create_guards(&w, &quota));
        let mut puts = vec![(w.key, obj)];
        puts.extend(placed.as_ref().map(|p| (p.claim.0.as_str(), &p.claim.1)));
        if let Some(rev) = write(ctx, &guards, &puts).await? {
            return Ok(Written {
                write: Write::Done(rev),
                stored: Some(obj.clone()),
            });
        }
        if let Some(done) = settled(ctx, &w).await? {
            return Ok(done);
        }
    }
    Err(too_busy(&s, w.new))
}

/// Records why snapshot `snap` (at `key`) is not placed with its volume: it stays `Pending`,
/// `Ready=False` with reason `SourceNotReady` and `why`.
async fn still_pending(ctx: Ctx<'_>, key: &str, snap: &Stored, why: String) -> ApiResult<()> {
    let mut told = snap.value.clone();
    let generation = told.pointer("/metadata/generation").and_then(Value::as_i64);
    binding::set_condition(
        binding::status_mut(&mut told)?,
        &ConditionType::Ready.no(Reason::SourceNotReady, why),
        generation,
    );
    if told != snap.value {
        // Lost to another write: the next binding tells it again.
        ctx.store
            .write_guarded(key, &told, Some(snap.mod_revision), &[], None)
            .await
            .map_err(ApiError::from)?;
    }
    Ok(())
}

/// Places the snapshots of the Volume of `uid` (`volume` in `ns`) that wait for its placement
/// (stored without `status.pool`), once its binding is written: each on the volume's pool,
/// with its claim and its `volumeGiB`, in a transaction of its own that holds the volume, the
/// pool, its claims and the project's quota as read. One that does not fit stays `Pending`
/// and says why. A snapshot created while the binding is written read the volume before it
/// and is refused by its guard on the volume, so it is read again and placed at its create:
/// none is left waiting.
async fn place_pending_snapshots(ctx: Ctx<'_>, ns: &str, volume: &str, uid: &str) -> ApiResult<()> {
    let rt = Subject {
        group: GROUP,
        kind: "VolumeSnapshot",
        plural: "volumesnapshots",
        namespaced: true,
        namespace: Some(ns),
        name: "",
    };
    let volume_key = keys::object(ctx.prefix, GROUP, "volumes", Some(ns), volume);
    let all = keys::collection(ctx.prefix, GROUP, "volumesnapshots", Some(ns));
    let page = ctx
        .store
        .list(&all, None, 0, 0)
        .await
        .map_err(ApiError::from)?;
    let waiting = page.items.into_iter().filter(|(_, x)| {
        volume_uid(&x.value) == Some(uid)
            && x.value.pointer("/status/pool").is_none()
            && !going(&x.value)
    });
    for (key, mut snap) in waiting {
        let name = name_of(&snap.value).to_owned();
        let s = Subject { name: &name, ..rt };
        for _ in 0..RETRIES {
            let Some(vol) = ctx.store.get(&volume_key).await.map_err(ApiError::from)? else {
                return Ok(());
            };
            if meta::meta_str(&vol.value, "uid") != Some(uid) {
                return Ok(());
            }
            let p = match place_snapshot(ctx, ns, &snap.value, volume, &vol.value).await? {
                Ok(p) => p,
                Err(why) => {
                    still_pending(ctx, &key, &snap, why).await?;
                    break;
                }
            };
            let change = Change {
                key: &key,
                old: Some((&snap.value, snap.mod_revision)),
                new: &p.obj,
                parent: None,
            };
            let quota = match quota::check(ctx, s, ns, change).await {
                Ok(q) => q,
                Err(e) if e.code == 403 => {
                    still_pending(ctx, &key, &snap, e.message).await?;
                    break;
                }
                Err(e) => return Err(e),
            };
            let mut guards = vec![
                Guard::Revision(&key, snap.mod_revision),
                Guard::Revision(&volume_key, vol.mod_revision),
                Guard::Revision(&p.pool.0, p.pool.1),
                Guard::Unchanged(&p.claims.0, p.claims.1),
                Guard::Absent(&p.claim.0),
            ];
            guards.extend(quota.iter().map(|(q, at)| Guard::Unchanged(q, *at)));
            if write(ctx, &guards, &[(&key, &p.obj), (&p.claim.0, &p.claim.1)])
                .await?
                .is_some()
            {
                break;
            }
            // Something read changed: the snapshot is read again (gone or placed: done).
            match ctx.store.get(&key).await.map_err(ApiError::from)? {
                Some(now) if now.value.pointer("/status/pool").is_none() && !going(&now.value) => {
                    snap = now;
                }
                _ => break,
            }
        }
    }
    Ok(())
}

/// An update of a VolumeSnapshot: only its description (and metadata) changes; the Volume uid
/// it records, dropped by a replace, is kept.
async fn update_snapshot(
    ctx: Ctx<'_>,
    s: Subject<'_>,
    w: Change<'_>,
    old: &Value,
    rev: i64,
) -> ApiResult<Written> {
    let mut causes = Vec::new();
    for f in ["volume", "force"] {
        let p = format!("/spec/{f}");
        if old.pointer(&p) != w.new.pointer(&p) {
            causes.push(Cause::invalid(
                format!("spec.{f}"),
                "Invalid value: field is immutable",
            ));
        }
    }
    let mut new = w.new.clone();
    match (volume_uid(old), volume_uid(w.new)) {
        (Some(a), Some(b)) if a != b => causes.push(Cause::invalid(
            format!("metadata.annotations[{VOLUME_UID}]"),
            "Invalid value: field is immutable",
        )),
        (Some(a), None) => set_volume_uid(&mut new, a),
        _ => {}
    }
    if !causes.is_empty() {
        return Err(invalid(&s, w.new, causes));
    }
    let written = ctx
        .store
        .write_guarded(w.key, &new, Some(rev), &[], None)
        .await
        .map_err(ApiError::from)?;
    Ok(Written {
        write: written,
        stored: (&new != w.new).then_some(new),
    })
}

/// Up to five of `names`, and how many more.
fn some_of(names: &[&str]) -> String {
    let shown = names.iter().take(5).copied().collect::<Vec<_>>().join(", ");
    match names.len() {
        n if n > 5 => format!("{shown} and {} more", n - 5),
        _ => shown,
    }
}

/// Refuses deleting an attached Volume, or one with snapshots (409 naming them), as Cinder
/// does, and a Volume or VolumeSnapshot that a Volume still `Pending` or `Creating` is made
/// from (409 naming those volumes: the storage agent may be copying it). Nothing is looked
/// for when its Project is being deleted (the project controller empties the namespace in
/// no particular order). What was read holds until the delete is written: no snapshot or
/// volume of the namespace may change meanwhile.
async fn not_in_use(ctx: Ctx<'_>, s: Subject<'_>, obj: &Value) -> ApiResult<Vec<Held>> {
    let name = name_of(obj);
    let (what, source_field) = match s.kind {
        "Volume" => ("volume", "/spec/source/volume"),
        _ => ("snapshot", "/spec/source/snapshot"),
    };
    let refuse = |why: String| {
        Err(ApiError::conflict(
            s.group,
            s.plural,
            name,
            format!("{what} {name:?} {why}"),
        ))
    };
    let is_volume = s.kind == "Volume";
    if is_volume && let Some(server) = obj.pointer("/status/attachedTo").and_then(Value::as_str) {
        return refuse(format!("is attached to server {server:?}; detach it first"));
    }
    let Some(ns) = s.namespace else {
        return Ok(Vec::new());
    };
    let uid = meta::meta_str(obj, "uid");
    let project = keys::object(ctx.prefix, "identity.stratus.dev", "projects", None, ns);
    let snapshots = keys::collection(ctx.prefix, GROUP, "volumesnapshots", Some(ns));
    let volumes = keys::collection(ctx.prefix, GROUP, "volumes", Some(ns));
    let (got, revision) = ctx
        .store
        .read_many(&[
            Read::Key(&project),
            Read::Prefix(&snapshots),
            Read::Prefix(&volumes),
        ])
        .await
        .map_err(ApiError::from)?;
    if got[0].first().is_none_or(|(_, p)| going(&p.value)) {
        return Ok(Vec::new());
    }
    if is_volume {
        let of_it: Vec<&str> = got[1]
            .iter()
            .map(|(_, x)| &x.value)
            .filter(|x| match volume_uid(x) {
                Some(v) => Some(v) == uid,
                None => x.pointer("/spec/volume").and_then(Value::as_str) == Some(name),
            })
            .map(name_of)
            .collect();
        if !of_it.is_empty() {
            return refuse(format!(
                "has {} snapshot(s) ({}); delete them first",
                of_it.len(),
                some_of(&of_it)
            ));
        }
    }
    let being_made: Vec<&str> = got[2]
        .iter()
        .map(|(_, x)| &x.value)
        .filter(|x| x.pointer(source_field).and_then(Value::as_str) == Some(name))
        .filter(|x| {
            let phase = x.pointer("/status/phase").and_then(Value::as_str);
            // A volume without a phase yet is Pending.
            phase.is_none_or(|p| p == "Pending" || p == "Creating")
        })
        .map(name_of)
        .collect();
    if !being_made.is_empty() {
        return refuse(format!(
            "is the source of {} volume(s) still being made ({}); delete it once they are made, or delete them first",
            being_made.len(),
            some_of(&being_made)
        ));
    }
    Ok(vec![
        Held {
            prefix: snapshots,
            revision,
        },
        Held {
            prefix: volumes,
            revision,
        },
    ])
}

/// `POST volumes/{name}/binding` with `{"target": {"name": POOL}}`: places the Volume on the
/// pool (its `status.pool`, the pool's node as `status.node`, phase `Creating`,
/// `Scheduled=True`, and the storage agent's teardown finalizer) if its size fits there,
/// claiming it in the same transaction; binding again to the same pool claims its current
/// size.
///
/// # Errors
/// 404 for a missing Volume; 422 for a missing target or pool; 409 when the Volume is being
/// deleted or placed elsewhere, or must go elsewhere (its `spec.storagePool`, its source's
/// pool), or the pool is disabled, has not reported its capacity, or is full.
pub async fn bind(
    ctx: Ctx<'_>,
    t: &Subject<'_>,
    locks: &PlacementLocks,
    bytes: &[u8],
    content_type: &str,
) -> ApiResult<u16> {
    let invalid = |field: &str, message: String| {
        ApiError::invalid(
            "Binding",
            GROUP,
            "volumes",
            t.name,
            vec![Cause::invalid(field, message)],
        )
    };
    let target = binding::target_name(bytes, content_type, "StoragePool", &invalid)?;
    let ns = t.namespace.unwrap_or_default();
    let volume_key = t.key(ctx.prefix);
    // The source is immutable: where it is decides where the volume may go.
    let volume = ctx
        .store
        .get(&volume_key)
        .await
        .map_err(ApiError::from)?
        .ok_or_else(|| t.not_found())?;
    let uid = meta::meta_str(&volume.value, "uid").unwrap_or_default();
    let source_key = ["snapshot", "volume"].into_iter().find_map(|f| {
        let name = volume
            .value
            .pointer(&format!("/spec/source/{f}"))?
            .as_str()?;
        let plural = if f == "snapshot" {
            "volumesnapshots"
        } else {
            "volumes"
        };
        Some(keys::object(ctx.prefix, GROUP, plural, Some(ns), name))
    });
    let pool_key = keys::object(ctx.prefix, GROUP, "storagepools", None, &target);
    let on = claims(ctx.prefix, &target);
    let claim = on.key(uid);
    let more: Vec<Read<'_>> = source_key.iter().map(|k| Read::Key(k)).collect();
    let placement = Placement {
        object: &volume_key,
        target: &pool_key,
        claims: &on,
        claim: &claim,
        more: &more,
    };
    let conflict = |why: String| ApiError::conflict(GROUP, "volumes", t.name, why);
    let busy = || conflict("too many concurrent placements on the storage pool; retry".into());
    locks
        .place(
            ctx,
            placement,
            || t.not_found(),
            busy,
            |seen| place_volume(seen, ns, &target, &invalid, &conflict),
        )
        .await?;
    // The volume is placed: the snapshots asked of it before are placed with it. One left
    // unplaced (this server stopped, the quota changed) is placed by the next binding the
    // volume scheduler sends for it.
    if let Err(e) = place_pending_snapshots(ctx, ns, t.name, uid).await {
        tracing::warn!(volume = t.name, namespace = ns, error = %e.message, "cannot place the snapshots waiting for the volume");
    }
    Ok(201)
}

/// Decides a Volume's placement on pool `target` from what [`PlacementLocks::place`] read
/// (its snapshot or volume source as `more[0]`, when it has one).
fn place_volume(
    seen: Seen,
    ns: &str,
    target: &str,
    invalid: &dyn Fn(&str, String) -> ApiError,
    conflict: &dyn Fn(String) -> ApiError,
) -> ApiResult<Placed> {
    let Seen {
        object: volume,
        target: pool,
        others,
        more,
    } = seen;
    let v = &volume.value;
    if going(v) {
        return Err(conflict("the volume is being deleted".into()));
    }
    if let Some(other) = v
        .pointer("/status/pool")
        .and_then(Value::as_str)
        .filter(|p| *p != target)
    {
        return Err(conflict(format!(
            "the volume is placed on storage pool {other}"
        )));
    }
    let pool =
        pool.ok_or_else(|| invalid("target.name", format!("Not found: storage pool {target:?}")))?;
    let p = &pool.value;
    if p.pointer("/spec/disabled").and_then(Value::as_bool) == Some(true) {
        return Err(conflict(format!("storage pool {target} is disabled")));
    }
    if let Some(asked) = v
        .pointer("/spec/storagePool")
        .and_then(Value::as_str)
        .filter(|a| *a != target)
    {
        return Err(conflict(format!(
            "the volume asks for storage pool {asked} (spec.storagePool)"
        )));
    }
    let mut held = Vec::new();
    if let Some((key, src)) = more.into_iter().flatten().next() {
        match src.value.pointer("/status/pool").and_then(Value::as_str) {
            Some(there) if there == target => held.push((key, src.mod_revision)),
            there => {
                return Err(conflict(format!(
                    "the volume is made from {} {:?}, in storage pool {}: it goes there",
                    src.value
                        .get("kind")
                        .and_then(Value::as_str)
                        .unwrap_or("source"),
                    name_of(&src.value),
                    there.unwrap_or("(not placed yet)"),
                )));
            }
        }
    }
    let size = v
        .pointer("/spec/sizeGiB")
        .and_then(Value::as_u64)
        .unwrap_or(0);
    fits(target, p, claimed_gib(&others), size).map_err(conflict)?;
    let node = p
        .pointer("/spec/node")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let mut new = v.clone();
    let generation = v.pointer("/metadata/generation").and_then(Value::as_i64);
    // The storage agent's finalizer, with the placement: a volume deleted before its agent
    // first sees it still waits for the agent to remove whatever it made of it.
    {
        let mut finalizers = meta::finalizers(v);
        if !finalizers.iter().any(|f| f == TEARDOWN_FINALIZER) {
            finalizers.push(TEARDOWN_FINALIZER.to_string());
            meta::meta_mut(&mut new).insert("finalizers".into(), json!(finalizers));
        }
    }
    let status = binding::status_mut(&mut new)?;
    status.insert("pool".into(), json!(target));
    status.insert("node".into(), json!(node));
    if status
        .get("phase")
        .and_then(Value::as_str)
        .is_none_or(|p| p == "Pending")
    {
        status.insert("phase".into(), json!(VolumePhase::Creating));
    }
    binding::set_condition(
        status,
        &ConditionType::Scheduled.yes(
            Reason::Bound,
            format!("placed on storage pool {target} (node {node})"),
        ),
        generation,
    );
    if &new == v {
        return Ok(Placed::AsIs);
    }
    Ok(Placed::Write {
        object: new,
        claim: json!({"volume": format!("{ns}/{}", name_of(v)), "sizeGiB": size}),
        held,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_placed_volumes_claim_goes_with_it() {
        let v = json!({"metadata": {"name": "v", "uid": "u1"}, "status": {"pool": "p1"}});
        assert_eq!(
            Storage.attached_keys("/r", &v),
            vec!["/r/_claims/storage/p1/u1".to_string()]
        );
        let pending =
            json!({"metadata": {"name": "v", "uid": "u1"}, "status": {"phase": "Pending"}});
        assert!(Storage.attached_keys("/r", &pending).is_empty());
    }

    #[test]
    fn what_a_pool_says_of_growing_volumes_in_use_is_read_from_its_status() {
        let said = |v: Value| grows_in_use(&json!({"status": v}));
        assert_eq!(
            said(json!({"growsInUse": "Never"})),
            Some(InUseGrowth::Never)
        );
        assert_eq!(
            said(json!({"growsInUse": "WhenSpaceFollows"})),
            Some(InUseGrowth::WhenSpaceFollows)
        );
        assert_eq!(
            said(json!({"growsInUse": "Always"})),
            Some(InUseGrowth::Always)
        );
        // An agent that says nothing (or something this server does not know) is not Never.
        assert_eq!(said(json!({})), None);
        assert_eq!(said(json!({"growsInUse": "Sometimes"})), None);
        assert_eq!(grows_in_use(&json!({})), None);
    }

    #[test]
    fn a_pool_fits_what_its_reserve_and_claims_leave() {
        let pool = json!({
            "apiVersion": "storage.stratus.dev/v1", "kind": "StoragePool",
            "metadata": {"name": "p"},
            "spec": {"backend": "lvm", "node": "n1", "vgName": "vg", "reservedPercentage": 20},
            "status": {"capacityGiB": 10},
        });
        assert_eq!(room("p", &pool, 3), Ok(5));
        assert!(fits("p", &pool, 3, 5).is_ok());
        let why = fits("p", &pool, 3, 6).expect_err("full");
        assert!(why.contains("5 GiB free, 6 GiB asked"), "{why}");
        let mut unreported = pool.clone();
        unreported["status"] = json!({});
        assert!(
            fits("p", &unreported, 0, 1)
                .expect_err("no capacity")
                .contains("has not reported its capacity")
        );
        assert_eq!(
            claimed_gib(&[json!({"sizeGiB": 2}), json!({"sizeGiB": 3}), json!({})]),
            5
        );
    }
}
