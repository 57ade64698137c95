//! Placement: the `servers/{name}/binding` subresource records a Server's hypervisor and claims
//! its flavor's resources there in the same etcd transaction, so concurrent schedulers never
//! overcommit a hypervisor. The claim machinery ([`Claims`], [`PlacementLocks::place`]) is
//! shared with volume placement (`admission/storage.rs`).
//!
//! A claim is one key per placed object under `{prefix}/_claims/{space}/{target}/` (a Server's
//! under `compute/{hypervisor}/`), outside every served resource. A target's allocation is the
//! sum of its claims, read at one revision; the write succeeds only if no claim appeared there
//! since, so the check and the claim are one atomic step. A claim goes in the transaction that
//! deletes its object.

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::{Value, json};

use crate::admission::{Admission, Ctx, Subject};
use crate::base::error::{ApiError, ApiResult, Cause};
use crate::storage::keys;
use crate::storage::store::{Guard, Read, Stored};
use stratus_api_types::common::{Condition, ConditionType, ConditionUpdate, Reason};
use stratus_api_types::compute::{ComputeResources, FlavorSpec, HypervisorSpec, ServerPhase};
use stratus_api_types::placement::{self, Amount};

pub use stratus_api_types::compute::TEARDOWN_FINALIZER;

const GROUP: &str = "compute.stratus.dev";
const RETRIES: usize = 32;

/// Whether objects of `kind` are Servers, the kind with a `binding` subresource.
pub fn is_server(group: &str, kind: &str) -> bool {
    group == GROUP && kind == "Server"
}

/// Compute placement at admission: registered for Servers.
#[derive(Debug)]
pub struct Binding;

impl Admission for Binding {
    /// A Server waits for the scheduler (`Pending`), as a Pod does.
    fn initial_status(&self) -> Option<Value> {
        Some(json!({"phase": ServerPhase::Pending}))
    }

    /// Refuses a status write that changes what only a binding sets (the placement and the
    /// resources claimed for it).
    fn check_status_write(&self, s: &Subject<'_>, old: &Value, new: &Value) -> ApiResult<()> {
        for field in ["hypervisor", "allocated"] {
            let p = format!("/status/{field}");
            if old.pointer(&p) != new.pointer(&p) {
                return Err(ApiError::invalid(
                    s.kind,
                    s.group,
                    s.plural,
                    new.pointer("/metadata/name")
                        .and_then(Value::as_str)
                        .unwrap_or_default(),
                    vec![Cause::invalid(
                        format!("status.{field}"),
                        "Forbidden: set only through the binding subresource",
                    )],
                ));
            }
        }
        Ok(())
    }

    /// A placed Server's claim on its hypervisor.
    fn attached_keys(&self, prefix: &str, obj: &Value) -> Vec<String> {
        let hv = obj.pointer("/status/hypervisor").and_then(Value::as_str);
        let ns = obj.pointer("/metadata/namespace").and_then(Value::as_str);
        let name = obj.pointer("/metadata/name").and_then(Value::as_str);
        match (hv, ns, name) {
            (Some(hv), Some(ns), Some(name)) => vec![claim_key(prefix, hv, ns, name)],
            _ => Vec::new(),
        }
    }
}

/// One lock per placement target: concurrent placements onto the same hypervisor or pool take
/// turns in this process instead of failing each other's transaction guard and retrying. (The
/// guard still makes placements from several API servers safe; this only spares the retries.)
#[derive(Debug, Default)]
pub struct PlacementLocks(std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>);

impl PlacementLocks {
    fn of(&self, target: &str) -> Arc<tokio::sync::Mutex<()>> {
        match self.0.lock() {
            Ok(mut m) => m.entry(target.to_string()).or_default().clone(),
            // A poisoned map only loses the turn-taking, never correctness.
            Err(_) => Arc::default(),
        }
    }
}

/// The capacity claims on one placement target (a hypervisor, a storage pool): one key per
/// holder under `{prefix}/_claims/{space}/{target}/`, outside every served resource. What the
/// target holds is the sum of its claims read at one revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Claims(String);

impl Claims {
    /// The claims on `target` in `space` (`compute`, `storage`).
    pub(crate) fn on(prefix: &str, space: &str, target: &str) -> Self {
        Self(format!("{prefix}/_claims/{space}/{target}/"))
    }

    /// The prefix every claim on the target is under.
    pub(crate) fn prefix(&self) -> &str {
        &self.0
    }

    /// The claim of `holder` (a path below the target's prefix).
    pub(crate) fn key(&self, holder: &str) -> String {
        format!("{}{holder}", self.0)
    }
}

/// What a placement read, at one revision.
pub(crate) struct Seen {
    /// The object being placed.
    pub object: Stored,
    /// The target, if it exists.
    pub target: Option<Stored>,
    /// Every claim on the target but the object's own.
    pub others: Vec<Value>,
    /// What [`Placement::more`] asked for, in order.
    pub more: Vec<Vec<(String, Stored)>>,
}

/// What a placement decided from what it read.
pub(crate) enum Placed {
    /// Nothing to write: the object is placed as asked already.
    AsIs,
    /// Write `object` and its `claim`, provided the object, the target and the keys of `held`
    /// are at the revisions read and no claim on the target changed.
    Write {
        object: Value,
        claim: Value,
        held: Vec<(String, i64)>,
    },
}

/// One placement: the object at `object` onto the target at `target`, claiming `claim` among
/// `claims`.
pub(crate) struct Placement<'a> {
    pub object: &'a str,
    pub target: &'a str,
    pub claims: &'a Claims,
    pub claim: &'a str,
    /// More to read in the same request (e.g. the flavors).
    pub more: &'a [Read<'a>],
}

impl PlacementLocks {
    /// Places an object: reads it, its target, the target's claims and `more` at one revision,
    /// lets `decide` check and build the placed object and its claim, and writes both in one
    /// transaction that fails if anything read changed; tried again then, in turn with the
    /// target's other placements made by this process.
    ///
    /// # Errors
    /// `missing` when the object is gone; what `decide` refuses; `busy` when other placements
    /// kept winning.
    pub(crate) async fn place(
        &self,
        ctx: Ctx<'_>,
        p: Placement<'_>,
        missing: impl Fn() -> ApiError,
        busy: impl FnOnce() -> ApiError,
        mut decide: impl FnMut(Seen) -> ApiResult<Placed>,
    ) -> ApiResult<()> {
        let turn = self.of(p.claims.prefix());
        let _turn = turn.lock().await;
        let mut reads = vec![
            Read::Key(p.object),
            Read::Key(p.target),
            Read::Prefix(p.claims.prefix()),
        ];
        reads.extend_from_slice(p.more);
        for _ in 0..RETRIES {
            let (mut got, at) = ctx.store.read_many(&reads).await.map_err(ApiError::from)?;
            let more = got.split_off(3);
            let others = std::mem::take(&mut got[2])
                .into_iter()
                .filter(|(k, _)| *k != p.claim)
                .map(|(_, c)| c.value)
                .collect();
            let target = got[1].pop().map(|(_, s)| s);
            let object = got[0].pop().map(|(_, s)| s).ok_or_else(&missing)?;
            let (object_rev, target_rev) =
                (object.mod_revision, target.as_ref().map(|t| t.mod_revision));
            let (new, claim, held) = match decide(Seen {
                object,
                target,
                others,
                more,
            })? {
                Placed::AsIs => return Ok(()),
                Placed::Write {
                    object,
                    claim,
                    held,
                } => (object, claim, held),
            };
            let mut guards = vec![
                Guard::Revision(p.object, object_rev),
                Guard::Unchanged(p.claims.prefix(), at),
            ];
            guards.extend(target_rev.map(|rev| Guard::Revision(p.target, rev)));
            guards.extend(held.iter().map(|(k, rev)| Guard::Revision(k, *rev)));
            let written = ctx
                .store
                .write_many(&guards, &[(p.object, &new), (p.claim, &claim)], &[])
                .await
                .map_err(ApiError::from)?;
            if written.is_some() {
                return Ok(());
            }
        }
        Err(busy())
    }
}

/// The prefix of the claims of every Server placed on `hypervisor`, each
/// `{namespace}/{name}` under it (the node authorizer reads it as the node's index).
pub(crate) fn claims_prefix(prefix: &str, hypervisor: &str) -> String {
    Claims::on(prefix, "compute", hypervisor)
        .prefix()
        .to_string()
}

fn claim_key(prefix: &str, hypervisor: &str, namespace: &str, name: &str) -> String {
    Claims::on(prefix, "compute", hypervisor).key(&format!("{namespace}/{name}"))
}

/// What a Hypervisor can hold, from its stored object; `None` until its agent reported a
/// capacity.
fn limit(hv: &Value) -> Option<Amount> {
    let spec: HypervisorSpec = serde_json::from_value(hv.get("spec")?.clone()).ok()?;
    let capacity: ComputeResources =
        serde_json::from_value(hv.pointer("/status/capacity")?.clone()).ok()?;
    Some(placement::allocatable(&spec, &capacity))
}

fn amount(v: &Value) -> Amount {
    serde_json::from_value::<ComputeResources>(v.clone())
        .map(|r| Amount::from(&r))
        .unwrap_or_default()
}

/// Sets a condition in a stored object's `status.conditions`, by the rule every Stratus
/// component uses (`lastTransitionTime` moves only when the status does).
pub(crate) fn set_condition(
    status: &mut serde_json::Map<String, Value>,
    update: &ConditionUpdate,
    generation: Option<i64>,
) {
    let mut conditions: Vec<Condition> = status
        .get("conditions")
        .and_then(|c| serde_json::from_value(c.clone()).ok())
        .unwrap_or_default();
    update.set(&mut conditions, generation);
    if let Ok(v) = serde_json::to_value(conditions) {
        status.insert("conditions".into(), v);
    }
}

/// The target a Binding names (`target.name`), a DNS-1123 subdomain.
///
/// # Errors
/// 400 for a body that does not decode; 422 (from `invalid`) when the name is missing or bad.
pub(crate) fn target_name(
    bytes: &[u8],
    content_type: &str,
    kind: &str,
    invalid: &dyn Fn(&str, String) -> ApiError,
) -> ApiResult<String> {
    let body = crate::base::body::decode(bytes, crate::base::body::is_yaml(content_type))?.value;
    body.pointer("/target/name")
        .and_then(Value::as_str)
        .filter(|n| crate::base::meta::is_dns1123_subdomain(n))
        .map(String::from)
        .ok_or_else(|| {
            invalid(
                "target.name",
                format!("Required value: the name of a {kind}"),
            )
        })
}

/// `POST servers/{name}/binding` with `{"target": {"name": HYPERVISOR}}`: places the Server
/// on the hypervisor if its flavor fits there, claiming the resources atomically; binding
/// again to the same hypervisor re-claims for the current flavor (a resize).
///
/// # Errors
/// 404 for a missing Server; 422 for a missing target, hypervisor or flavor; 409 when the
/// Server is being deleted or placed elsewhere, the hypervisor is disabled or full.
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
            "servers",
            t.name,
            vec![Cause::invalid(field, message)],
        )
    };
    let target = target_name(bytes, content_type, "Hypervisor", &invalid)?;
    let ns = t.namespace.unwrap_or_default();
    let server_key = t.key(ctx.prefix);
    let hv_key = keys::object(ctx.prefix, GROUP, "hypervisors", None, &target);
    // Flavors are few: reading them all in the same request saves a round trip.
    let flavors = keys::collection(ctx.prefix, GROUP, "flavors", None);
    let claims = Claims::on(ctx.prefix, "compute", &target);
    let claim = claim_key(ctx.prefix, &target, ns, t.name);
    let conflict = |why: String| ApiError::conflict(GROUP, "servers", t.name, why);
    let placement = Placement {
        object: &server_key,
        target: &hv_key,
        claims: &claims,
        claim: &claim,
        more: &[Read::Prefix(&flavors)],
    };
    let busy = || conflict("too many concurrent placements on the hypervisor; retry".into());
    locks
        .place(
            ctx,
            placement,
            || t.not_found(),
            busy,
            |seen| place_server(seen, &target, &invalid, &conflict, ctx.prefix),
        )
        .await?;
    Ok(201)
}

/// Decides a Server's placement on hypervisor `target` from what [`PlacementLocks::place`]
/// read (the flavors as `more[0]`).
fn place_server(
    seen: Seen,
    target: &str,
    invalid: &dyn Fn(&str, String) -> ApiError,
    conflict: &dyn Fn(String) -> ApiError,
    prefix: &str,
) -> ApiResult<Placed> {
    let Seen {
        object: server,
        target: hv,
        others,
        mut more,
    } = seen;
    let all_flavors = more.pop().unwrap_or_default();
    if server
        .value
        .pointer("/metadata/deletionTimestamp")
        .is_some()
    {
        return Err(conflict("the server is being deleted".into()));
    }
    let bound = server
        .value
        .pointer("/status/hypervisor")
        .and_then(Value::as_str);
    if let Some(other) = bound.filter(|b| *b != target) {
        return Err(conflict(format!("the server is placed on {other}")));
    }
    let hv =
        hv.ok_or_else(|| invalid("target.name", format!("Not found: hypervisor \"{target}\"")))?;
    if hv.value.pointer("/spec/disabled").and_then(Value::as_bool) == Some(true) {
        return Err(conflict(format!("hypervisor {target} is disabled")));
    }
    let limit = limit(&hv.value)
        .ok_or_else(|| conflict(format!("hypervisor {target} has not reported its capacity")))?;
    let flavor_name = server
        .value
        .pointer("/spec/flavor")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let flavor_key = keys::object(prefix, GROUP, "flavors", None, flavor_name);
    let flavor = all_flavors
        .into_iter()
        .find(|(k, _)| *k == flavor_key)
        .map(|(_, f)| f)
        .ok_or_else(|| {
            invalid(
                "spec.flavor",
                format!("Not found: flavor \"{flavor_name}\""),
            )
        })?;
    let spec: FlavorSpec =
        serde_json::from_value(flavor.value.get("spec").cloned().unwrap_or_default())
            .map_err(|e| invalid("spec.flavor", format!("flavor \"{flavor_name}\": {e}")))?;
    let need = placement::claim(&spec);
    let used = others
        .iter()
        .map(amount)
        .fold(Amount::default(), Amount::plus);
    if let Some((_, why)) = placement::shortfall(limit, used, Amount::from(&need)) {
        return Err(conflict(format!("hypervisor {target}: {why}")));
    }
    let mut new = server.value.clone();
    let generation = new.pointer("/metadata/generation").and_then(Value::as_i64);
    {
        let m = crate::base::meta::meta_mut(&mut new);
        let mut finalizers = crate::base::meta::finalizers(&server.value);
        if !finalizers.iter().any(|f| f == TEARDOWN_FINALIZER) {
            finalizers.push(TEARDOWN_FINALIZER.to_string());
        }
        m.insert("finalizers".into(), json!(finalizers));
    }
    let status = status_mut(&mut new)?;
    status.insert("hypervisor".into(), json!(target));
    status.insert(
        "allocated".into(),
        serde_json::to_value(&need).map_err(|e| ApiError::internal(e.to_string()))?,
    );
    if status
        .get("phase")
        .and_then(Value::as_str)
        .is_none_or(|p| p == "Pending")
    {
        status.insert("phase".into(), json!(ServerPhase::Scheduled));
    }
    set_condition(
        status,
        &ConditionType::Scheduled.yes(Reason::Bound, format!("placed on hypervisor {target}")),
        generation,
    );
    if new == server.value {
        return Ok(Placed::AsIs);
    }
    // The claim is the resources alone (what `amount` reads back).
    let claim = serde_json::to_value(&need).map_err(|e| ApiError::internal(e.to_string()))?;
    Ok(Placed::Write {
        object: new,
        claim,
        held: vec![(flavor_key, flavor.mod_revision)],
    })
}

/// A stored object's `status`, made an object if it is not one.
///
/// # Errors
/// 500 when the stored object is not an object.
pub(crate) fn status_mut(obj: &mut Value) -> ApiResult<&mut serde_json::Map<String, Value>> {
    let Some(o) = obj.as_object_mut() else {
        return Err(ApiError::internal("a stored object is not an object"));
    };
    let status = o.entry("status").or_insert_with(|| json!({}));
    if !status.is_object() {
        *status = json!({});
    }
    status
        .as_object_mut()
        .ok_or_else(|| ApiError::internal("a stored object's status is not an object"))
}

/// `DELETE servers/{name}/binding`: takes a Server off its hypervisor (evacuation, when
/// the hypervisor is lost): its claim goes, `status.hypervisor` and `status.allocated` are
/// cleared, the host-cleanup finalizer is dropped (the lost host cannot run it; its agent
/// sweeps the guest away if it comes back), and the Server waits for the scheduler again.
///
/// # Errors
/// 404 for a missing Server; 409 when it is not placed or changed meanwhile.
pub async fn unbind(ctx: Ctx<'_>, t: &Subject<'_>) -> ApiResult<u16> {
    let key = t.key(ctx.prefix);
    let server = ctx
        .store
        .get(&key)
        .await
        .map_err(ApiError::from)?
        .ok_or_else(|| t.not_found())?;
    let Some(hv) = server
        .value
        .pointer("/status/hypervisor")
        .and_then(Value::as_str)
    else {
        return Err(ApiError::conflict(
            GROUP,
            "servers",
            t.name,
            "the server is not placed",
        ));
    };
    let claim = claim_key(ctx.prefix, hv, t.namespace.unwrap_or_default(), t.name);
    let mut new = server.value.clone();
    {
        let m = crate::base::meta::meta_mut(&mut new);
        let finalizers: Vec<String> = crate::base::meta::finalizers(&server.value)
            .into_iter()
            .filter(|f| f != TEARDOWN_FINALIZER)
            .collect();
        m.insert("finalizers".into(), json!(finalizers));
    }
    let generation = new.pointer("/metadata/generation").and_then(Value::as_i64);
    if let Some(status) = new.get_mut("status").and_then(Value::as_object_mut) {
        status.remove("hypervisor");
        status.remove("allocated");
        status.remove("instanceName");
        status.remove("launchedAt");
        status.insert("phase".into(), json!(ServerPhase::Evacuating));
        set_condition(
            status,
            &ConditionType::Scheduled.no(
                Reason::Evacuating,
                format!("taken off hypervisor {hv}; waiting to be placed again"),
            ),
            generation,
        );
    }
    // A Server whose only finalizer was the host's, already being deleted, just goes.
    let gone = new.pointer("/metadata/deletionTimestamp").is_some()
        && crate::base::meta::finalizers(&new).is_empty();
    let (puts, deletes): (Vec<(&str, &Value)>, Vec<&str>) = if gone {
        (vec![], vec![key.as_str(), claim.as_str()])
    } else {
        (vec![(key.as_str(), &new)], vec![claim.as_str()])
    };
    let written = ctx
        .store
        .write_many(
            &[Guard::Revision(&key, server.mod_revision)],
            &puts,
            &deletes,
        )
        .await
        .map_err(ApiError::from)?;
    match written {
        Some(_) => Ok(200),
        None => Err(t.conflict()),
    }
}
