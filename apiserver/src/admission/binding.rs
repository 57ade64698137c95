//! Placement: the `servers/{name}/binding` subresource records a Server's hypervisor and claims
//! its flavor's resources there in the same etcd transaction, so concurrent schedulers never
//! overcommit a hypervisor.
//!
//! A claim is one key per placed Server under `{prefix}/_claims/compute/{hypervisor}/`, outside
//! every served resource. A hypervisor's allocation is the sum of its claims, read at one
//! revision; the write succeeds only if no claim appeared there since, so the check and the
//! claim are one atomic step. A claim goes in the transaction that deletes its Server.

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::{Value, json};

use crate::admission::{Admission, Ctx, Subject};
use crate::base::error::{ApiError, ApiResult, Cause};
use crate::storage::keys;
use crate::storage::store::{Guard, Read};
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

/// One lock per hypervisor: concurrent placements onto the same hypervisor take turns in this
/// process instead of failing each other's transaction guard and retrying. (The guard still
/// makes placements from several API servers safe; this only spares the retries.)
#[derive(Debug, Default)]
pub struct PlacementLocks(std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>);

impl PlacementLocks {
    fn of(&self, hypervisor: &str) -> Arc<tokio::sync::Mutex<()>> {
        match self.0.lock() {
            Ok(mut m) => m.entry(hypervisor.to_string()).or_default().clone(),
            // A poisoned map only loses the turn-taking, never correctness.
            Err(_) => Arc::default(),
        }
    }
}

/// The prefix of the claims of every Server placed on `hypervisor`, each
/// `{namespace}/{name}` under it (the node authorizer reads it as the node's index).
pub(crate) fn claims_prefix(prefix: &str, hypervisor: &str) -> String {
    format!("{prefix}/_claims/compute/{hypervisor}/")
}

fn claim_key(prefix: &str, hypervisor: &str, namespace: &str, name: &str) -> String {
    format!("{}{namespace}/{name}", claims_prefix(prefix, hypervisor))
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
fn set_condition(
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
    let body = crate::base::body::decode(bytes, crate::base::body::is_yaml(content_type))?.value;
    let invalid = |field: &str, message: String| {
        ApiError::invalid(
            "Binding",
            GROUP,
            "servers",
            t.name,
            vec![Cause::invalid(field, message)],
        )
    };
    let target = body
        .pointer("/target/name")
        .and_then(Value::as_str)
        .filter(|n| crate::base::meta::is_dns1123_subdomain(n))
        .ok_or_else(|| {
            invalid(
                "target.name",
                "Required value: the name of a Hypervisor".into(),
            )
        })?
        .to_string();
    let ns = t.namespace.unwrap_or_default();
    let server_key = t.key(ctx.prefix);
    let hv_key = keys::object(ctx.prefix, GROUP, "hypervisors", None, &target);
    // Flavors are few: reading them all in the same request saves a round trip.
    let flavors = keys::collection(ctx.prefix, GROUP, "flavors", None);
    let claims = claims_prefix(ctx.prefix, &target);
    let claim = claim_key(ctx.prefix, &target, ns, t.name);
    let conflict = |why: String| ApiError::conflict(GROUP, "servers", t.name, why);
    let turn = locks.of(&target);
    let _turn = turn.lock().await;
    for _ in 0..RETRIES {
        let (mut reads, at) = ctx
            .store
            .read_many(&[
                Read::Key(&server_key),
                Read::Key(&hv_key),
                Read::Prefix(&claims),
                Read::Prefix(&flavors),
            ])
            .await
            .map_err(ApiError::from)?;
        let all_flavors = std::mem::take(&mut reads[3]);
        let held = std::mem::take(&mut reads[2]);
        let hv = reads[1].pop().map(|(_, s)| s);
        let server = reads[0]
            .pop()
            .map(|(_, s)| s)
            .ok_or_else(|| t.not_found())?;
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
        let hv = hv
            .ok_or_else(|| invalid("target.name", format!("Not found: hypervisor \"{target}\"")))?;
        if hv.value.pointer("/spec/disabled").and_then(Value::as_bool) == Some(true) {
            return Err(conflict(format!("hypervisor {target} is disabled")));
        }
        let limit = limit(&hv.value).ok_or_else(|| {
            conflict(format!("hypervisor {target} has not reported its capacity"))
        })?;
        let flavor_name = server
            .value
            .pointer("/spec/flavor")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let flavor_key = keys::object(ctx.prefix, GROUP, "flavors", None, flavor_name);
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
        let used = held
            .iter()
            .filter(|(k, _)| *k != claim)
            .map(|(_, c)| amount(&c.value))
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
        let Some(obj) = new.as_object_mut() else {
            return Err(ApiError::internal("a stored server is not an object"));
        };
        let status = obj
            .entry("status")
            .or_insert_with(|| json!({}))
            .as_object_mut()
            .ok_or_else(|| ApiError::internal("a stored server's status is not an object"))?;
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
            return Ok(201);
        }
        // The claim is the resources alone (what `amount` reads back).
        let claimed = serde_json::to_value(&need).map_err(|e| ApiError::internal(e.to_string()))?;
        let written = ctx
            .store
            .write_many(
                &[
                    Guard::Revision(&server_key, server.mod_revision),
                    Guard::Revision(&hv_key, hv.mod_revision),
                    Guard::Revision(&flavor_key, flavor.mod_revision),
                    Guard::Unchanged(&claims, at),
                ],
                &[(&server_key, &new), (&claim, &claimed)],
                &[],
            )
            .await
            .map_err(ApiError::from)?;
        if written.is_some() {
            return Ok(201);
        }
    }
    Err(conflict(
        "too many concurrent placements on the hypervisor; retry".into(),
    ))
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
