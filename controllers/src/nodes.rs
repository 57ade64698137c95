//! Node lifecycle: a Hypervisor whose heartbeat Lease expired is marked NotReady (so nothing
//! new is placed there), and its Servers are handled as their policy says: `Evacuate` ones are
//! taken off it (the scheduler places them elsewhere and that node's agent rebuilds them),
//! `Manual` ones are marked Error, and ones being deleted are released (the lost host cannot
//! run their cleanup; its agent sweeps them away if it comes back).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
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
    /// What this controller last saw of each node's Lease, and when by its own clock.
    seen: Mutex<HashMap<String, Seen>>,
}

/// The latest renewal this controller saw in a node's Lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Seen {
    /// The latest `renewTime` seen, or `None` when there was no usable Lease since this
    /// controller started.
    renewed: Option<jiff::Timestamp>,
    /// When this controller saw it (or, for `None`, first looked), by its own clock.
    at: jiff::Timestamp,
}

/// Records what `node`'s Lease says now and returns when, by this controller's clock, it last
/// saw the node renew it (as Kubernetes' node lifecycle controller keeps its probe time).
///
/// Only a `renewTime` later than any seen before is news: a Lease rewritten with the same or
/// an older renewal, deleted, or stripped of its renewal does not start the clock again. The
/// memory is this process's: after a restart every node's clock starts anew at its first look.
fn observe(
    seen: &mut HashMap<String, Seen>,
    node: &str,
    renewed: Option<jiff::Timestamp>,
    now: jiff::Timestamp,
) -> jiff::Timestamp {
    let entry = seen
        .entry(node.to_owned())
        .or_insert(Seen { renewed, at: now });
    if let Some(r) = renewed
        && entry.renewed.is_none_or(|last| r > last)
    {
        *entry = Seen { renewed, at: now };
    }
    entry.at
}

/// A Lease's renewal and duration, if it has both.
fn usable(lease: Option<&Lease>) -> Option<(jiff::Timestamp, i32)> {
    let spec = lease?.spec.as_ref()?;
    Some((spec.renew_time.as_ref()?.0, spec.lease_duration_seconds?))
}

/// Whether the hypervisor's agent has ever reported it (so a missing Lease means a lost
/// heartbeat, not an agent that never started).
fn has_reported(hv: &Hypervisor) -> bool {
    hv.status.as_ref().is_some_and(|s| {
        s.phase != HypervisorPhase::Pending || ConditionType::Ready.find(&s.conditions).is_some()
    })
}

/// What a node's Lease says of its heartbeat, as this controller believes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Heartbeat {
    /// No usable Lease (none, or without `renewTime` or `leaseDurationSeconds`): the
    /// heartbeat counts until then, [`MAX_LEASE_DURATION`] after this controller last saw a
    /// renewal (or first looked), unless the node never reported at all.
    Missing(jiff::Timestamp),
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

/// The node's heartbeat from its Lease, as of `now`, given `seen`: when this controller last
/// saw the Lease renewed (see [`observe`]), both by this controller's clock.
///
/// # Guarantees
/// Both numbers are the node's own words, so neither is taken as written (as router
/// placement judges the network agents' Leases): the duration honoured is at most
/// [`MAX_LEASE_DURATION`], counted from the renewal or from when this controller saw it,
/// whichever is earlier, and a `renewTime` more than [`MAX_CLOCK_SKEW`] ahead of `now` is no
/// heartbeat. A node that stops renewing is lost at most `MAX_LEASE_DURATION` after this
/// controller saw its last renewal, whatever it wrote: a huge duration, a renewal dated
/// years ahead, the same renewal written again, or a Lease deleted or stripped of its
/// renewal does not keep its Servers from being evacuated.
fn heartbeat(lease: Option<&Lease>, seen: jiff::Timestamp, now: jiff::Timestamp) -> Heartbeat {
    let by_us = |d| seen.checked_add(d).unwrap_or(seen);
    let Some((renewed, seconds)) = usable(lease) else {
        return Heartbeat::Missing(by_us(MAX_LEASE_DURATION));
    };
    let ahead = renewed.duration_since(now);
    if ahead > MAX_CLOCK_SKEW {
        return Heartbeat::Ahead(ahead.as_secs());
    }
    let honoured =
        jiff::SignedDuration::from_secs(i64::from(seconds.max(0))).min(MAX_LEASE_DURATION);
    let by_us = by_us(honoured);
    Heartbeat::Until(
        renewed
            .checked_add(honoured)
            .map_or(by_us, |u| u.min(by_us)),
    )
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
    let seen = {
        let mut seen = ctx.seen.lock().unwrap_or_else(|e| e.into_inner());
        let renewed = usable(lease.as_ref()).map(|(r, _)| r);
        observe(&mut seen, &name, renewed, now)
    };
    let message = match heartbeat(lease.as_ref(), seen, now) {
        // Never heartbeated (registered by hand, or its agent not started yet).
        Heartbeat::Missing(_) if !has_reported(&hv) => {
            return Ok(Action::requeue(Duration::from_secs(30)));
        }
        Heartbeat::Until(until) | Heartbeat::Missing(until) if until > now => {
            // Look again just after the heartbeat would expire.
            let left = Duration::try_from(until.duration_since(now)).unwrap_or_default();
            tracing::trace!(hypervisor = %name, %until, "node lifecycle: heartbeat current");
            return Ok(Action::requeue(left + Duration::from_secs(1)));
        }
        Heartbeat::Until(until) => format!("no heartbeat since {until}"),
        Heartbeat::Missing(_) => format!(
            "no heartbeat since {seen}: its Lease is gone or has no renewTime or leaseDurationSeconds"
        ),
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
        seen: Mutex::new(HashMap::new()),
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
            heartbeat(Some(&lease(at(-10), 40)), now, now),
            Heartbeat::Until(at(30))
        );
        // A duration of a year is honoured for 40 s: renewed a minute ago, the node is lost.
        let year = heartbeat(Some(&lease(at(-60), 365 * 86_400)), now, now);
        assert_eq!(year, Heartbeat::Until(at(-20)));
        assert!(matches!(year, Heartbeat::Until(u) if u <= now), "lost");
        // A renewal a little ahead (clock skew) is believed, for as long as from when this
        // controller saw it; one an hour or years ahead is not.
        assert_eq!(
            heartbeat(Some(&lease(at(3), 40)), now, now),
            Heartbeat::Until(at(40))
        );
        assert_eq!(
            heartbeat(Some(&lease(at(3600), 40)), now, now),
            Heartbeat::Ahead(3600)
        );
        let far = jiff::Timestamp::from_second(4_000_000_000).expect("time");
        assert!(matches!(
            heartbeat(Some(&lease(far, i32::MAX)), now, now),
            Heartbeat::Ahead(_)
        ));
        // A negative duration is none; no Lease or no renewal counts only the grace from when
        // this controller saw it so.
        assert_eq!(
            heartbeat(Some(&lease(at(-1), -5)), now, now),
            Heartbeat::Until(at(-1))
        );
        assert_eq!(heartbeat(None, now, now), Heartbeat::Missing(at(40)));
        assert_eq!(
            heartbeat(Some(&Lease::default()), now, now),
            Heartbeat::Missing(at(40))
        );
    }
}

#[cfg(test)]
mod lost_leases {
    use super::*;
    use k8s_openapi::api::coordination::v1::LeaseSpec;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
    use stratus_api_types::compute::HypervisorStatus;

    /// Watches one node's Lease over time as `sync` does: what it says is observed, then judged.
    struct Watching {
        seen: HashMap<String, Seen>,
    }

    impl Watching {
        fn new() -> Self {
            Self {
                seen: HashMap::new(),
            }
        }

        /// Whether the node still counts as heartbeating at `now` with `lease`.
        fn alive(&mut self, lease: Option<&Lease>, now: jiff::Timestamp) -> bool {
            let since = observe(&mut self.seen, "n1", usable(lease).map(|(r, _)| r), now);
            match heartbeat(lease, since, now) {
                Heartbeat::Until(until) | Heartbeat::Missing(until) => until > now,
                Heartbeat::Ahead(_) => false,
            }
        }
    }

    fn lease(renewed: Option<jiff::Timestamp>, seconds: Option<i32>) -> Lease {
        Lease {
            spec: Some(LeaseSpec {
                renew_time: renewed.map(MicroTime),
                lease_duration_seconds: seconds,
                ..LeaseSpec::default()
            }),
            ..Lease::default()
        }
    }

    fn clock() -> impl Fn(i64) -> jiff::Timestamp {
        let t0 = jiff::Timestamp::from_second(1_800_000_000).expect("time");
        move |d| {
            t0.checked_add(jiff::SignedDuration::from_secs(d))
                .expect("time")
        }
    }

    #[test]
    fn a_deleted_lease_is_no_heartbeat_once_the_grace_from_the_last_renewal_has_passed() {
        let at = clock();
        let mut w = Watching::new();
        // Renewed every 10 s for 40 s.
        for t in [0, 10, 20] {
            assert!(w.alive(Some(&lease(Some(at(t)), Some(40))), at(t)));
        }
        // The node deletes its Lease at 25 s: still believed for the grace from the last
        // renewal seen...
        assert!(w.alive(None, at(25)));
        assert!(w.alive(None, at(59)));
        // ...and lost once it has passed, looked at however often.
        assert!(!w.alive(None, at(61)));
        assert!(!w.alive(None, at(600)));
        // A controller restarted meanwhile gives it the grace once more, and no more.
        let mut restarted = Watching::new();
        assert!(restarted.alive(None, at(600)));
        assert!(!restarted.alive(None, at(641)));
    }

    #[test]
    fn a_lease_without_a_renewal_or_duration_is_no_heartbeat_once_the_grace_has_passed() {
        let at = clock();
        let mut w = Watching::new();
        assert!(w.alive(Some(&lease(Some(at(0)), Some(40))), at(0)));
        // PUT back without renewTime at 5 s, and again and again: the clock is not restarted.
        for t in [5, 20, 35, 39] {
            assert!(w.alive(Some(&lease(None, Some(40))), at(t)), "{t}");
        }
        assert!(!w.alive(Some(&lease(None, Some(40))), at(41)));
        // Nor by switching to a Lease without a duration, or deleting it.
        assert!(!w.alive(Some(&lease(Some(at(0)), None)), at(50)));
        assert!(!w.alive(None, at(50)));
        // A renewal written again is a heartbeat again.
        assert!(w.alive(Some(&lease(Some(at(50)), Some(40))), at(50)));
    }

    #[test]
    fn a_lease_rewritten_with_the_same_renewal_still_expires() {
        let at = clock();
        let mut w = Watching::new();
        // Renewed at 0 s, then written again with that renewal (a new resourceVersion) often.
        let same = lease(Some(at(0)), Some(40));
        for t in [0, 15, 30, 39] {
            assert!(w.alive(Some(&same), at(t)), "{t}");
        }
        assert!(!w.alive(Some(&same), at(41)));
        // A renewal 4 s ahead (believed skew) written again and again counts from when this
        // controller saw it, not for 40 s past the node's word.
        let mut w = Watching::new();
        let ahead = lease(Some(at(4)), Some(40));
        assert!(w.alive(Some(&ahead), at(0)));
        assert!(w.alive(Some(&ahead), at(39)));
        assert!(!w.alive(Some(&ahead), at(41)));
        // Deleted, and written back with an older renewal, in turn: no grace is gained.
        for t in [42, 43, 44, 45] {
            assert!(!w.alive(None, at(t)), "{t}");
            assert!(!w.alive(Some(&same), at(t)), "{t}");
        }
    }

    #[test]
    fn a_missing_lease_matters_only_for_a_node_that_ever_reported() {
        let mut hv: Hypervisor = serde_json::from_value(serde_json::json!({
            "apiVersion": "compute.stratus.dev/v1", "kind": "Hypervisor",
            "metadata": {"name": "n1"}, "spec": {},
        }))
        .expect("a hypervisor");
        assert!(
            !has_reported(&hv),
            "registered by hand, agent never started"
        );
        hv.status = Some(HypervisorStatus::default());
        assert!(!has_reported(&hv), "Pending with no Ready condition");
        let mut status = HypervisorStatus {
            phase: HypervisorPhase::Ready,
            ..HypervisorStatus::default()
        };
        hv.status = Some(status.clone());
        assert!(has_reported(&hv));
        // Marked NotReady before a controller restart: still a node that reported.
        status.phase = HypervisorPhase::Pending;
        ConditionType::Ready
            .no(Reason::HeartbeatLost, "lost")
            .set(&mut status.conditions, None);
        hv.status = Some(status);
        assert!(has_reported(&hv));
    }
}
