//! Node lifecycle: a Hypervisor whose heartbeat Lease expired is marked NotReady (so nothing
//! new is placed there), and its Servers are handled as their policy says: `Evacuate` ones are
//! taken off it (the scheduler places them elsewhere and that node's agent rebuilds them),
//! `Manual` ones are marked Error, and ones being deleted are released (the lost host cannot
//! run their cleanup; its agent sweeps them away if it comes back).

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::Api;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource, ResourceExt};
use stratus_api_types::common::{ConditionType, Reason};
use stratus_api_types::compute::{
    EvacuationPolicy, Hypervisor, HypervisorPhase, Server, ServerPhase,
};
use stratus_runtime::policy::kube_retry;
use stratus_runtime::{Classify, Retry, Runtime};

use crate::cache::Shared;

pub use stratus_api_types::compute::NODE_LEASE_NAMESPACE as LEASE_NAMESPACE;

/// The field manager of the statuses this controller writes.
const MANAGER: &str = "stratus-node-lifecycle";

/// How often every hypervisor is checked regardless of events.
const RESYNC: Duration = Duration::from_secs(5);

/// Why a reconcile failed; every one may succeed on retry.
#[derive(Debug, thiserror::Error)]
pub enum NodesError {
    /// A request to the API server failed.
    #[error("request to the API server")]
    Api(#[source] kube::Error),
}

impl Classify for NodesError {
    fn retry(&self) -> Retry {
        match self {
            Self::Api(e) => kube_retry(e),
        }
    }
}

struct Ctx {
    client: Client,
    runtime: Runtime<Hypervisor>,
    /// Writes the status of a lost hypervisor's Servers.
    servers_runtime: Runtime<Server>,
    leases: Store<Lease>,
    servers: Store<Server>,
    recorder: Recorder,
}

/// What a node's Lease says of its heartbeat, as this controller believes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Heartbeat {
    /// No usable Lease: the node never heartbeated (registered by hand, agent not started).
    Never,
    /// The heartbeat counts until then.
    Until(jiff::Timestamp),
    /// The Lease says it was renewed this many seconds ahead of this controller's clock, past
    /// [`MAX_CLOCK_SKEW`]: a clock gone wrong or a forged Lease, no heartbeat.
    Ahead(i64),
}

/// The longest a Lease is believed after its renewal, whatever its `leaseDurationSeconds`
/// says (router placement's bound, Kubernetes' node monitor grace period).
const MAX_LEASE_DURATION: jiff::SignedDuration = crate::routers::MAX_LEASE_DURATION;

/// How far ahead of this controller's clock a `renewTime` may be and still be believed.
const MAX_CLOCK_SKEW: jiff::SignedDuration = crate::routers::MAX_CLOCK_SKEW;

/// The node's heartbeat from its Lease, as of `now` (this controller's clock).
///
/// # Guarantees
/// Both numbers are the node's own words, so neither is taken as written (as router
/// placement judges the network agents' Leases): the duration honoured is at most
/// [`MAX_LEASE_DURATION`], and a `renewTime` more than [`MAX_CLOCK_SKEW`] ahead of `now` is no
/// heartbeat. A node that stops renewing is lost at most `MAX_CLOCK_SKEW +
/// MAX_LEASE_DURATION` after its last renewal, whatever it wrote: a huge duration or a renewal
/// dated years ahead does not keep its Servers from being evacuated.
fn heartbeat(lease: Option<&Lease>, now: jiff::Timestamp) -> Heartbeat {
    let Some((renewed, seconds)) = lease
        .and_then(|l| l.spec.as_ref())
        .and_then(|s| Some((s.renew_time.as_ref()?.0, s.lease_duration_seconds?)))
    else {
        return Heartbeat::Never;
    };
    let ahead = renewed.duration_since(now);
    if ahead > MAX_CLOCK_SKEW {
        return Heartbeat::Ahead(ahead.as_secs());
    }
    let honoured =
        jiff::SignedDuration::from_secs(i64::from(seconds.max(0))).min(MAX_LEASE_DURATION);
    match renewed.checked_add(honoured) {
        Ok(until) => Heartbeat::Until(until),
        Err(_) => Heartbeat::Never,
    }
}

async fn publish<K: Resource<DynamicType = ()>>(
    ctx: &Ctx,
    obj: &K,
    type_: EventType,
    reason: &str,
    note: String,
) {
    let reference = obj.object_ref(&());
    stratus_runtime::events::publish(
        &ctx.recorder,
        &reference,
        type_,
        "NodeLifecycle",
        reason,
        note,
    )
    .await;
}

/// Takes a Server off its hypervisor (`DELETE servers/{name}/binding`).
async fn unbind(client: &Client, ns: &str, name: &str) -> Result<(), NodesError> {
    let req = http::Request::delete(format!(
        "/apis/compute.stratus.dev/v1/namespaces/{ns}/servers/{name}/binding"
    ))
    .body(Vec::new())
    .map_err(|e| NodesError::Api(kube::Error::HttpError(e)))?;
    match client.request::<serde_json::Value>(req).await {
        Ok(_) => Ok(()),
        // Gone, or no longer placed: nothing left to do.
        Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => Ok(()),
        Err(e) => Err(NodesError::Api(e)),
    }
}

/// Handles the Servers of a lost hypervisor.
async fn handle_servers(ctx: &Ctx, hv: &str) -> Result<(), NodesError> {
    for s in ctx.servers.state() {
        let Some(st) = s.status.as_ref() else {
            continue;
        };
        if st.hypervisor.as_deref() != Some(hv) {
            continue;
        }
        let Some(ns) = s.namespace() else { continue };
        let name = s.name_any();
        if s.metadata.deletion_timestamp.is_some() {
            unbind(&ctx.client, &ns, &name).await?;
            continue;
        }
        match s.spec.evacuation_policy {
            EvacuationPolicy::Evacuate => {
                unbind(&ctx.client, &ns, &name).await?;
                publish(
                    ctx,
                    &*s,
                    EventType::Warning,
                    "Evacuating",
                    format!(
                        "hypervisor {hv} stopped heartbeating; rebuilding the server elsewhere"
                    ),
                )
                .await;
            }
            EvacuationPolicy::Manual if st.phase != ServerPhase::Error => {
                let mut status = st.clone();
                let message = format!(
                    "hypervisor {hv} stopped heartbeating; evacuationPolicy is Manual, so the server waits for an operator"
                );
                status.phase = ServerPhase::Error;
                ConditionType::Ready
                    .no(Reason::HypervisorLost, message.clone())
                    .set(&mut status.conditions, s.metadata.generation);
                ctx.servers_runtime
                    .write_status(&s, &status)
                    .await
                    .map_err(NodesError::Api)?;
                publish(ctx, &*s, EventType::Warning, "HypervisorLost", message).await;
            }
            EvacuationPolicy::Manual => {}
        }
    }
    Ok(())
}

async fn reconcile(hv: Arc<Hypervisor>, ctx: Arc<Ctx>) -> Result<Action, NodesError> {
    let result = sync(Arc::clone(&hv), Arc::clone(&ctx)).await;
    ctx.runtime.finish(&hv, result).await
}

async fn sync(hv: Arc<Hypervisor>, ctx: Arc<Ctx>) -> Result<Action, NodesError> {
    let name = hv.name_any();
    tracing::trace!(hypervisor = %name, "node lifecycle: looking");
    stratus_runtime::store_ready(&ctx.leases).await;
    stratus_runtime::store_ready(&ctx.servers).await;
    let lease = match ctx
        .leases
        .get(&ObjectRef::new(&name).within(LEASE_NAMESPACE))
    {
        Some(l) => Some((*l).clone()),
        // Not in the cache (yet): ask the API server rather than take the node for one that
        // never heartbeated.
        None => {
            tracing::trace!(hypervisor = %name, "node lifecycle: lease not cached, reading it");
            Api::<Lease>::namespaced(ctx.client.clone(), LEASE_NAMESPACE)
                .get_opt(&name)
                .await
                .map_err(NodesError::Api)?
        }
    };
    tracing::trace!(hypervisor = %name, found = lease.is_some(), "node lifecycle: lease read");
    let now = jiff::Timestamp::now();
    let message = match heartbeat(lease.as_ref(), now) {
        // Never heartbeated (registered by hand, or its agent not started yet).
        Heartbeat::Never => return Ok(Action::requeue(Duration::from_secs(30))),
        Heartbeat::Until(until) if until > now => {
            // Look again just after the heartbeat would expire.
            let left = Duration::try_from(until.duration_since(now)).unwrap_or_default();
            tracing::trace!(hypervisor = %name, %until, "node lifecycle: heartbeat current");
            return Ok(Action::requeue(left + Duration::from_secs(1)));
        }
        Heartbeat::Until(until) => format!("no heartbeat since {until}"),
        Heartbeat::Ahead(s) => format!(
            "its Lease says it was renewed {s} s ahead of this controller's clock; not believed"
        ),
    };
    if hv.is_ready() {
        let mut status = hv.status.clone().unwrap_or_default();
        tracing::info!(hypervisor = %name, %message, "node lifecycle: heartbeat lost, marking NotReady");
        status.phase = HypervisorPhase::NotReady;
        ConditionType::Ready
            .no(Reason::HeartbeatLost, message.clone())
            .set(&mut status.conditions, None);
        ctx.runtime
            .write_status(&hv, &status)
            .await
            .map_err(NodesError::Api)?;
        publish(&ctx, &*hv, EventType::Warning, "NodeNotReady", message).await;
    }
    handle_servers(&ctx, &name).await?;
    Ok(Action::requeue(Duration::from_secs(10)))
}

fn error_policy(hv: Arc<Hypervisor>, e: &NodesError, ctx: Arc<Ctx>) -> Action {
    ctx.runtime.error_policy(&hv, e)
}

/// Runs the node lifecycle controller until its watches end, reading Servers from the
/// controllers' shared cache.
pub async fn run(client: Client, servers: &Shared<Server>) {
    let (leases, lease_writer) = reflector::store();
    let lease_stream = watcher(
        Api::<Lease>::namespaced(client.clone(), LEASE_NAMESPACE),
        watcher::Config::default(),
    )
    .default_backoff()
    .reflect(lease_writer)
    .applied_objects();
    let ctx = Arc::new(Ctx {
        runtime: Runtime::new(client.clone(), MANAGER),
        servers_runtime: Runtime::new(client.clone(), MANAGER),
        recorder: Recorder::new(
            client.clone(),
            Reporter {
                controller: "stratus-node-lifecycle".into(),
                instance: None,
            },
        ),
        client: client.clone(),
        leases,
        servers: servers.store(),
    });
    // Every hypervisor is looked at again every few seconds as well: a heartbeat that stops
    // produces no event, and a missed requeue must not leave a lost node Ready.
    let resync = futures::stream::unfold((), |()| async {
        tokio::time::sleep(RESYNC).await;
        Some(((), ()))
    });
    Controller::new(Api::<Hypervisor>::all(client), watcher::Config::default())
        .reconcile_all_on(resync)
        // A renewed Lease is its hypervisor's heartbeat.
        .watches_stream(lease_stream, |l: Lease| Some(ObjectRef::new(&l.name_any())))
        // A server placed on a lost hypervisor gets handled as it appears.
        .watches_shared_stream(servers.touched(), |s: Arc<Server>| {
            s.status
                .as_ref()
                .and_then(|st| st.hypervisor.as_ref())
                .map(|h| ObjectRef::new(h))
        })
        .run(reconcile, error_policy, ctx)
        .for_each(|_| async {})
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::coordination::v1::LeaseSpec;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;

    fn lease(renewed: jiff::Timestamp, seconds: i32) -> Lease {
        Lease {
            spec: Some(LeaseSpec {
                renew_time: Some(MicroTime(renewed)),
                lease_duration_seconds: Some(seconds),
                ..LeaseSpec::default()
            }),
            ..Lease::default()
        }
    }

    #[test]
    fn a_nodes_lease_is_judged_by_the_controllers_clock_not_its_word() {
        let now = jiff::Timestamp::from_second(1_800_000_000).expect("time");
        let secs = jiff::SignedDuration::from_secs;
        let at = |d: i64| now.checked_add(secs(d)).expect("time");
        // An honest Lease: renewed 10 s ago for 40 s.
        assert_eq!(
            heartbeat(Some(&lease(at(-10), 40)), now),
            Heartbeat::Until(at(30))
        );
        // A duration of a year is honoured for 40 s: renewed a minute ago, the node is lost.
        let year = heartbeat(Some(&lease(at(-60), 365 * 86_400)), now);
        assert_eq!(year, Heartbeat::Until(at(-20)));
        assert!(matches!(year, Heartbeat::Until(u) if u <= now), "lost");
        // A renewal a little ahead (clock skew) is believed; one an hour or years ahead is not.
        assert_eq!(
            heartbeat(Some(&lease(at(3), 40)), now),
            Heartbeat::Until(at(43))
        );
        assert_eq!(
            heartbeat(Some(&lease(at(3600), 40)), now),
            Heartbeat::Ahead(3600)
        );
        let far = jiff::Timestamp::from_second(4_000_000_000).expect("time");
        assert!(matches!(
            heartbeat(Some(&lease(far, i32::MAX)), now),
            Heartbeat::Ahead(_)
        ));
        // A negative duration is none; no Lease or no renewal is no heartbeat at all.
        assert_eq!(
            heartbeat(Some(&lease(at(-1), -5)), now),
            Heartbeat::Until(at(-1))
        );
        assert_eq!(heartbeat(None, now), Heartbeat::Never);
        assert_eq!(heartbeat(Some(&Lease::default()), now), Heartbeat::Never);
    }
}
