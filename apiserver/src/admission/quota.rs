//! Quota at admission: a create that would take a project over one of its Quotas' limits is
//! refused, and the check is atomic with the write. The flavor a Server names is checked here
//! too, where it is read: a non-public flavor (`isPublic: false`) only for cluster admins'
//! Servers (there is no per-project flavor sharing), and, when a quota limits the project,
//! only a flavor that exists (a Server of an unknown flavor would count as zero).
//!
//! # Guarantees
//! Usage is computed from the store at one revision R, and the create's etcd transaction
//! requires that neither the counted kind's objects in the project nor its Quotas changed
//! since R. Concurrent creates therefore serialise on the project: 50 at once against a limit
//! of 10 leave exactly 10, with no counter that could drift.

use futures::future::BoxFuture;
use serde_json::Value;

use crate::admission::{Admission, Change, Ctx, Subject, Written};
use crate::base::error::{ApiError, ApiResult, Cause};
use crate::storage::keys;
use crate::storage::store::{Stored, Write};

pub use stratus_api_types::quota::{counted, usage};

/// How many times a create is retried when another write to the same project's counted
/// objects got in between.
const RETRIES: usize = 64;

/// Quota at admission: registered for every counted kind.
#[derive(Debug)]
pub struct Quota;

impl Admission for Quota {
    /// Creates or updates the object if the project's Quotas allow what the write adds (a new
    /// object, a resize to a larger flavor, a grown volume), atomically with the check.
    fn write<'a>(
        &'a self,
        ctx: Ctx<'a>,
        s: Subject<'a>,
        w: Change<'a>,
    ) -> Option<BoxFuture<'a, ApiResult<Written>>> {
        let ns = s.namespace?;
        Some(Box::pin(async move {
            write_within_quota(ctx, s, ns, w).await.map(Written::from)
        }))
    }
}

async fn write_within_quota(
    ctx: Ctx<'_>,
    rt: Subject<'_>,
    ns: &str,
    w: Change<'_>,
) -> ApiResult<Write> {
    let expected = w.old.map(|(_, rev)| rev);
    for _ in 0..RETRIES {
        let held = check(ctx, rt, ns, w).await?;
        let guards: Vec<(&str, i64)> = held.iter().map(|(p, at)| (p.as_str(), *at)).collect();
        match ctx
            .store
            .write_guarded(w.key, w.new, expected, &guards, w.parent)
            .await
            .map_err(ApiError::from)?
        {
            Write::Done(rev) => return Ok(Write::Done(rev)),
            // Only a guard failed (the key is as expected): something counted changed since
            // it was counted, so count again.
            Write::Conflict(rev) if rev == expected.unwrap_or(0) && !guards.is_empty() => {
                // Unless what failed is the parent (the Project) having changed: checked again.
                if super::parent_changed(ctx, w.parent).await? {
                    return Ok(Write::Conflict(0));
                }
                continue;
            }
            // The key itself changed (or exists, on create), or its parent changed: no retry
            // here can help.
            conflict => return Ok(conflict),
        }
    }
    Err(too_busy(rt, w.new))
}

/// 409: the project's counted objects kept changing under the check.
pub fn too_busy(rt: Subject<'_>, new: &Value) -> ApiError {
    ApiError::conflict(
        rt.group,
        rt.plural,
        crate::base::meta::meta_str(new, "name").unwrap_or_default(),
        "too many concurrent changes to the project's quota-counted objects; retry",
    )
}

/// Checks a write of a counted kind against its project's Quotas; the guards (key prefix,
/// revision) the write's transaction must carry as [`Guard::Unchanged`](crate::storage::store::Guard::Unchanged) for the check to hold
/// (none when no quota limits the project). An admission that makes the write of a counted
/// kind itself calls this on each attempt and writes with these guards, so quota and its own
/// claims are one transaction.
///
/// # Errors
/// 403 when the write would exceed a quota; 422 for a flavor the project may not use.
pub async fn check(
    ctx: Ctx<'_>,
    rt: Subject<'_>,
    ns: &str,
    w: Change<'_>,
) -> ApiResult<Vec<(String, i64)>> {
    let Change { key, old, new, .. } = w;
    let name = new
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let quota_prefix = keys::collection(ctx.prefix, "identity.stratus.dev", "quotas", Some(ns));
    let kind_prefix = rt.collection(ctx.prefix, ns);
    // The flavor a Server takes on (at create, or a resize to another one).
    let server = rt.group == "compute.stratus.dev" && rt.kind == "Server";
    fn flavor_of(o: &Value) -> Option<&str> {
        o.pointer("/spec/flavor").and_then(Value::as_str)
    }
    let new_flavor =
        flavor_of(new).filter(|f| server && old.is_none_or(|(o, _)| flavor_of(o) != Some(*f)));
    let refuse = |message: String| {
        ApiError::invalid(
            rt.kind,
            rt.group,
            rt.plural,
            name,
            vec![Cause::invalid("spec.flavor", message)],
        )
    };
    let quotas = ctx
        .store
        .list(&quota_prefix, None, 0, 0)
        .await
        .map_err(ApiError::from)?;
    let limited = quotas.items.iter().any(|(_, q)| {
        q.value
            .pointer("/spec/limits")
            .and_then(Value::as_object)
            .is_some_and(|m| !m.is_empty())
    });
    if let Some(f) = new_flavor {
        let key = keys::object(ctx.prefix, "compute.stratus.dev", "flavors", None, f);
        match ctx.store.get(&key).await.map_err(ApiError::from)? {
            Some(flavor)
                if flavor
                    .value
                    .pointer("/spec/isPublic")
                    .and_then(Value::as_bool)
                    == Some(false)
                    && !crate::admission::by_cluster_admin() =>
            {
                return Err(refuse(format!(
                    "Forbidden: flavor \"{f}\" is not public: only cluster admins' servers may use it"
                )));
            }
            None if limited => {
                return Err(refuse(format!(
                    "Not found: flavor \"{f}\" does not exist, and the project's quota counts what a server's flavor takes"
                )));
            }
            _ => {}
        }
    }
    // Whether a quota limits anything an object of this kind uses (the fields are the kind's,
    // whatever the amounts).
    let limits_kind = usage(rt.group, rt.kind, new, &|_| None)
        .iter()
        .any(|(f, _)| {
            quotas.items.iter().any(|(_, q)| {
                q.value
                    .pointer(&format!("/spec/limits/{f}"))
                    .is_some_and(|l| !l.is_null())
            })
        });
    if !limited || !limits_kind {
        // Nothing of the kind is limited: nothing to count (and no list of its objects), and
        // no serialising on the kind's objects; only a change to the Quotas meanwhile could
        // make it limited.
        return Ok(vec![(quota_prefix, quotas.revision)]);
    }
    let at = quotas.revision;
    let existing = ctx
        .store
        .list(&kind_prefix, None, at, 0)
        .await
        .map_err(ApiError::from)?;
    let mut flavors = flavors_named(ctx, new, &existing.items, at).await?;
    if let Some((o, _)) = old {
        flavors.extend(flavors_named(ctx, o, &[], at).await?);
    }
    let flavor = |n: &str| flavors.iter().find(|(f, _)| f == n).map(|(_, v)| *v);
    // A stored Server whose flavor is gone counts what was claimed for it, not zero.
    let counted = |o: &Value| {
        usage(rt.group, rt.kind, o, &|n: &str| {
            flavor(n).or_else(|| allocated(o))
        })
    };
    let before = old.map(|(o, _)| counted(o)).unwrap_or_default();
    // Only what the write adds is checked: a shrink or an unchanged size always passes.
    let grows: Vec<(&str, u64)> = usage(rt.group, rt.kind, new, &flavor)
        .into_iter()
        .filter(|(f, a)| *a > before.iter().find(|(g, _)| g == f).map_or(0, |(_, b)| *b))
        .collect();
    if grows.is_empty() {
        // A write that adds nothing cannot exceed a limit, however the count moves.
        return Ok(Vec::new());
    }
    // Other kinds counting what the write adds (a snapshot's GiB with the volumes'), read at
    // the same revision and held by the write as the kind's own objects are.
    let mut shared: Vec<(&str, &str, String)> = Vec::new();
    let mut shared_use: Vec<(&str, u64)> = Vec::new();
    for (g, k, plural) in grows
        .iter()
        .flat_map(|(f, _)| stratus_api_types::quota::sharing(rt.group, rt.kind, f))
    {
        if shared.iter().any(|(sg, sk, _)| (*sg, *sk) == (g, k)) {
            continue;
        }
        let prefix = keys::collection(ctx.prefix, g, plural, Some(ns));
        let page = ctx
            .store
            .list(&prefix, None, at, 0)
            .await
            .map_err(ApiError::from)?;
        for (_, o) in &page.items {
            shared_use.extend(usage(g, k, &o.value, &|_| None));
        }
        shared.push((g, k, prefix));
    }
    for (field, amount) in &grows {
        let others: u64 = shared_use
            .iter()
            .filter(|(f, _)| f == field)
            .map(|(_, a)| a)
            .sum();
        let used: u64 = existing
            .items
            .iter()
            .filter(|(k, _)| k != key)
            .flat_map(|(_, s)| counted(&s.value))
            .filter(|(f, _)| f == field)
            .map(|(_, a)| a)
            .sum::<u64>()
            + others;
        for (_, q) in &quotas.items {
            let Some(limit) = q
                .value
                .pointer(&format!("/spec/limits/{field}"))
                .and_then(Value::as_u64)
            else {
                continue;
            };
            if used + amount > limit {
                let quota = q
                    .value
                    .pointer("/metadata/name")
                    .and_then(Value::as_str)
                    .unwrap_or_default();
                return Err(ApiError::forbidden(format!(
                    "{}.{} \"{name}\" is forbidden: exceeded quota: {quota}, requested: {field}={amount}, used: {field}={used}, limited: {field}={limit}",
                    rt.plural, rt.group,
                )));
            }
        }
    }
    let mut held = vec![(kind_prefix, at), (quota_prefix, at)];
    held.extend(shared.into_iter().map(|(_, _, prefix)| (prefix, at)));
    Ok(held)
}

/// The (vCPUs, RAM MiB) a placed Server claimed (`status.allocated`).
fn allocated(server: &Value) -> Option<(u64, u64)> {
    let a = server.pointer("/status/allocated")?;
    let get = |f: &str| a.get(f).and_then(Value::as_u64);
    Some((get("vcpus")?, get("ramMiB")?))
}

/// The (vCPUs, RAM MiB) of every flavor the new object and the existing ones name.
async fn flavors_named(
    ctx: Ctx<'_>,
    obj: &Value,
    existing: &[(String, Stored)],
    at: i64,
) -> ApiResult<Vec<(String, (u64, u64))>> {
    let mut names: Vec<&str> = existing
        .iter()
        .filter_map(|(_, s)| s.value.pointer("/spec/flavor").and_then(Value::as_str))
        .collect();
    names.extend(obj.pointer("/spec/flavor").and_then(Value::as_str));
    names.sort_unstable();
    names.dedup();
    let mut out = Vec::new();
    for n in names {
        let key = keys::object(ctx.prefix, "compute.stratus.dev", "flavors", None, n);
        let page = ctx
            .store
            .list(&key, None, at, 1)
            .await
            .map_err(ApiError::from)?;
        if let Some((k, s)) = page.items.first().filter(|(k, _)| *k == key) {
            let _ = k;
            let get = |p: &str| s.value.pointer(p).and_then(Value::as_u64).unwrap_or(0);
            out.push((n.to_string(), (get("/spec/vcpus"), get("/spec/ramMiB"))));
        }
    }
    Ok(out)
}
