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

/// When the node's heartbeat stops counting, from its Lease; `None` without a usable Lease.
fn expiry(lease: &Lease) -> Option<jiff::Timestamp> {
    let spec = lease.spec.as_ref()?;
    let renewed = spec.renew_time.as_ref()?.0;
    let seconds = i64::from(spec.lease_duration_seconds?);
    renewed
        .checked_add(jiff::SignedDuration::from_secs(seconds))
        .ok()
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
    let Some(until) = lease.as_ref().and_then(expiry) else {
        // Never heartbeated (registered by hand, or its agent not started yet).
        return Ok(Action::requeue(Duration::from_secs(30)));
    };
    let now = jiff::Timestamp::now();
    if until > now {
        // Look again just after the heartbeat would expire.
        let left = Duration::try_from(until.duration_since(now)).unwrap_or_default();
        tracing::trace!(hypervisor = %name, %until, "node lifecycle: heartbeat current");
        return Ok(Action::requeue(left + Duration::from_secs(1)));
    }
    if hv.is_ready() {
        let mut status = hv.status.clone().unwrap_or_default();
        let message = format!("no heartbeat since {until}");
        tracing::info!(hypervisor = %name, %until, "node lifecycle: heartbeat lost, marking NotReady");
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

/// Runs the node lifecycle controller until its watches end.
pub async fn run(client: Client) {
    let (leases, lease_writer) = reflector::store();
    let (servers, server_writer) = reflector::store();
    let lease_stream = watcher(
        Api::<Lease>::namespaced(client.clone(), LEASE_NAMESPACE),
        watcher::Config::default(),
    )
    .default_backoff()
    .reflect(lease_writer)
    .applied_objects();
    let server_stream = watcher(
        Api::<Server>::all(client.clone()),
        watcher::Config::default(),
    )
    .default_backoff()
    .modify(crate::slim_server)
    .reflect(server_writer)
    .touched_objects();
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
        servers,
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
        .watches_stream(server_stream, |s: Server| {
            s.status
                .and_then(|st| st.hypervisor)
                .map(|h| ObjectRef::new(&h))
        })
        .run(reconcile, error_policy, ctx)
        .for_each(|_| async {})
        .await;
}
