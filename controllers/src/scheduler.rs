//! The scheduler: places each unplaced Server on a Hypervisor (filters, then weighers) through
//! the `binding` subresource, which claims the capacity in the same etcd transaction as the
//! placement, so a stale view here can cost a retry but never an overcommit.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use kube::api::Api;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource, ResourceExt};
use stratus_api_types::common::{Blocked, ConditionType, Reason};
use stratus_api_types::compute::{
    Flavor, Hypervisor, Server, ServerGroup, ServerGroupPolicy, ServerGroupSpec, ServerPhase,
};
use stratus_api_types::placement::{self, Amount, Lack};
use stratus_runtime::policy::kube_retry;
use stratus_runtime::{Classify, Retry, Runtime};

use crate::cache::{Change, Shared};

/// How candidates that pass the filters are ordered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Weigher {
    /// Most free RAM first: spreads servers over hypervisors (Nova's default).
    #[default]
    Spread,
    /// Least free RAM first: fills one hypervisor before the next.
    Pack,
}

/// Why a reconcile failed; every one may succeed on retry.
#[derive(Debug, thiserror::Error)]
pub enum SchedulerError {
    /// A request to the API server failed.
    #[error("request to the API server")]
    Api(#[source] kube::Error),
    /// A Server without a namespace (a bug elsewhere: Server is namespaced).
    #[error("server has no namespace")]
    NoNamespace,
}

impl Classify for SchedulerError {
    fn retry(&self) -> Retry {
        match self {
            Self::Api(e) => kube_retry(e),
            Self::NoNamespace => Retry::Never,
        }
    }
}

/// The group a server belongs to and where its other members are.
pub struct Group<'a> {
    /// The group's policy.
    pub spec: &'a ServerGroupSpec,
    /// Hypervisor name → members placed there (this server excluded).
    pub members: &'a HashMap<String, u32>,
}

/// How many of the best hypervisors [`rank`] returns: the ones a placement tries in turn.
pub const CANDIDATES: usize = 5;

/// Ranks the hypervisors a server needing `need` may go to, best first (at most
/// [`CANDIDATES`]); or says why there is none (`0/N hypervisors are available: …`, as
/// kube-scheduler puts it). `used(name)` is what a hypervisor already holds.
///
/// Called for every placement over every hypervisor, so it allocates only for the hosts
/// that fit.
pub fn rank(
    zone: Option<&str>,
    need: Amount,
    hypervisors: &[Arc<Hypervisor>],
    used: &dyn Fn(&str) -> Amount,
    group: Option<&Group<'_>>,
    weigher: Weigher,
) -> Result<Vec<String>, Blocked> {
    let mut refused: BTreeMap<&'static str, usize> = BTreeMap::new();
    let mut fit: Vec<(f64, f64, &str)> = Vec::new();
    let affinity_hosts: Vec<&String> = group
        .filter(|g| g.spec.policy == ServerGroupPolicy::Affinity)
        .map(|g| {
            g.members
                .iter()
                .filter(|(_, n)| **n > 0)
                .map(|(h, _)| h)
                .collect()
        })
        .unwrap_or_default();
    for hv in hypervisors {
        let name = hv.metadata.name.as_deref().unwrap_or_default();
        let capacity = hv.status.as_ref().and_then(|s| s.capacity.as_ref());
        let members_here = group
            .and_then(|g| g.members.get(name))
            .copied()
            .unwrap_or(0);
        let why: Option<&'static str> = if hv.spec.disabled {
            Some("disabled")
        } else if !hv.is_ready() {
            Some("not ready")
        } else if zone.is_some_and(|z| z != hv.spec.availability_zone) {
            Some("in another availability zone")
        } else if group.is_some_and(|g| {
            g.spec.policy == ServerGroupPolicy::AntiAffinity
                && members_here >= g.spec.max_server_per_host.unwrap_or(1)
        }) {
            Some("hosting the anti-affinity group's members")
        } else if !affinity_hosts.is_empty() && !affinity_hosts.iter().any(|h| *h == name) {
            Some("not hosting the affinity group's members")
        } else {
            match capacity {
                None => Some("not reporting capacity"),
                Some(c) => {
                    let limit = placement::allocatable(&hv.spec, c);
                    let used_here = used(name);
                    match placement::lacking(limit, used_here, need) {
                        Some(Lack::Vcpus) => Some("insufficient vcpus"),
                        Some(Lack::Ram) => Some("insufficient ram"),
                        Some(Lack::Disk) => Some("insufficient disk"),
                        None => {
                            let free_ram = limit.ram_mib - used_here.ram_mib - need.ram_mib;
                            let ram = match weigher {
                                Weigher::Spread => free_ram,
                                Weigher::Pack => -free_ram,
                            };
                            let grouped = match group.map(|g| g.spec.policy) {
                                Some(ServerGroupPolicy::SoftAffinity) => f64::from(members_here),
                                Some(ServerGroupPolicy::SoftAntiAffinity) => {
                                    -f64::from(members_here)
                                }
                                _ => 0.0,
                            };
                            fit.push((grouped, ram, name));
                            None
                        }
                    }
                }
            }
        };
        if let Some(why) = why {
            *refused.entry(why).or_default() += 1;
        }
    }
    if fit.is_empty() {
        let mut reasons: Vec<(usize, &str)> =
            refused.into_iter().map(|(why, n)| (n, why)).collect();
        reasons.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(b.1)));
        let detail: Vec<String> = reasons
            .iter()
            .map(|(n, why)| format!("{n} {why}"))
            .collect();
        let message = if hypervisors.is_empty() {
            "0/0 hypervisors are available: no hypervisor is registered".to_string()
        } else {
            format!(
                "0/{} hypervisors are available: {}",
                hypervisors.len(),
                detail.join(", ")
            )
        };
        return Err(Blocked::new(Reason::Unschedulable, message));
    }
    // The group weigher first (it is a preference between hosts that all fit), then RAM, then
    // the name so equal hosts are ordered the same way every time.
    let order = |a: &(f64, f64, &str), b: &(f64, f64, &str)| {
        b.0.total_cmp(&a.0)
            .then(b.1.total_cmp(&a.1))
            .then(a.2.cmp(b.2))
    };
    if fit.len() > CANDIDATES {
        fit.select_nth_unstable_by(CANDIDATES - 1, order);
        fit.truncate(CANDIDATES);
    }
    fit.sort_by(order);
    Ok(fit.into_iter().map(|(_, _, n)| n.to_string()).collect())
}

struct Ctx {
    client: Client,
    runtime: Runtime<Server>,
    servers: Store<Server>,
    hypervisors: Store<Hypervisor>,
    flavors: Store<Flavor>,
    groups: Store<ServerGroup>,
    /// Placements made here that the index may not show yet (server key → hypervisor, claim
    /// and when), so concurrent reconciles see each other's choices at once.
    assumed: Mutex<HashMap<String, (String, Amount, std::time::Instant)>>,
    /// Where every placed server is, from the Server watch.
    placements: Arc<Mutex<Placements>>,
    weigher: Weigher,
    recorder: Recorder,
}

/// How long a placement made here counts before the watch must have shown it.
const ASSUME_FOR: Duration = Duration::from_secs(30);

/// Where every placed Server is and what it claims, kept from the Server watch as it happens:
/// an index beside the cache, so a placement does not walk every Server.
#[derive(Default)]
struct Placements {
    by_server: HashMap<String, (String, Amount)>,
    by_hv: HashMap<String, Amount>,
}

impl Placements {
    fn set(&mut self, key: String, placed: Option<(String, Amount)>) {
        if let Some((hv, a)) = self.by_server.remove(&key)
            && let Some(e) = self.by_hv.get_mut(&hv)
        {
            *e = Amount {
                vcpus: e.vcpus - a.vcpus,
                ram_mib: e.ram_mib - a.ram_mib,
                disk_gib: e.disk_gib - a.disk_gib,
            };
        }
        if let Some((hv, a)) = placed {
            let e = self.by_hv.entry(hv.clone()).or_default();
            *e = e.plus(a);
            self.by_server.insert(key, (hv, a));
        }
    }

    fn observe(&mut self, change: &Change<Server>) {
        let placement = |s: &Server| {
            let st = s.status.as_ref()?;
            Some((st.hypervisor.clone()?, Amount::from(st.allocated.as_ref()?)))
        };
        match change {
            Change::Applied(s) => self.set(server_key(s), placement(s)),
            Change::Deleted(s) => self.set(server_key(s), None),
            // Everything may have changed: rebuilt from what the cache holds.
            Change::Relisted(all) => {
                *self = Self::default();
                for s in all {
                    self.set(server_key(s), placement(s));
                }
            }
        }
    }
}

fn server_key(s: &Server) -> String {
    format!("{}/{}", s.namespace().unwrap_or_default(), s.name_any())
}

impl Ctx {
    /// Ranks the hypervisors for the server `me` (in `ns`, of `group`) from what each holds:
    /// the index from the cache plus this scheduler's own recent binds the cache may not show
    /// yet, and where the group's other members are.
    fn rank_for(
        &self,
        me: &str,
        ns: &str,
        group: Option<&ServerGroup>,
        zone: Option<&str>,
        need: Amount,
        hypervisors: &[Arc<Hypervisor>],
    ) -> Result<Vec<String>, Blocked> {
        let Ok(index) = self.placements.lock() else {
            return Err(Blocked::new(
                Reason::Unschedulable,
                "the scheduler's placement index is unusable",
            ));
        };
        let mut recent: HashMap<String, Amount> = HashMap::new();
        let mut members: HashMap<String, u32> = HashMap::new();
        let mut in_group: HashSet<String> = HashSet::new();
        if let Some(group) = group {
            let name = group.name_any();
            for s in self.servers.state() {
                if s.namespace().as_deref() == Some(ns)
                    && s.spec.server_group.as_deref() == Some(name.as_str())
                {
                    in_group.insert(server_key(&s));
                }
            }
            for k in in_group.iter().filter(|k| *k != me) {
                if let Some((hv, _)) = index.by_server.get(k) {
                    *members.entry(hv.clone()).or_default() += 1;
                }
            }
        }
        if let Ok(mut assumed) = self.assumed.lock() {
            // Once the index shows a placement it counts from there; an assumption the index
            // never confirms (the server went at once) expires.
            assumed.retain(|k, (_, _, at)| {
                !index.by_server.contains_key(k) && at.elapsed() < ASSUME_FOR
            });
            for (k, (hv, a, _)) in assumed.iter() {
                let e = recent.entry(hv.clone()).or_default();
                *e = e.plus(*a);
                if k != me && in_group.contains(k) {
                    *members.entry(hv.clone()).or_default() += 1;
                }
            }
        }
        let used = |hv: &str| {
            let base = index.by_hv.get(hv).copied().unwrap_or_default();
            recent.get(hv).map_or(base, |r| base.plus(*r))
        };
        let g = group.map(|g| Group {
            spec: &g.spec,
            members: &members,
        });
        rank(zone, need, hypervisors, &used, g.as_ref(), self.weigher)
    }

    fn assume(&self, key: &str, hv: &str, a: Amount) {
        if let Ok(mut m) = self.assumed.lock() {
            m.insert(
                key.to_string(),
                (hv.to_string(), a, std::time::Instant::now()),
            );
        }
    }

    fn forget(&self, key: &str) {
        if let Ok(mut m) = self.assumed.lock() {
            m.remove(key);
        }
    }
}

async fn publish(ctx: &Ctx, server: &Server, type_: EventType, reason: &str, note: String) {
    record(&ctx.recorder, &server.object_ref(&()), type_, reason, note).await;
}

/// Records a scheduling Event about `reference`.
async fn record(
    recorder: &Recorder,
    reference: &k8s_openapi::api::core::v1::ObjectReference,
    type_: EventType,
    reason: &str,
    note: String,
) {
    stratus_runtime::events::publish(recorder, reference, type_, "Scheduling", reason, note).await;
}

/// Records why the server waits (`Scheduled=False`, phase Pending), unless its condition
/// already says so.
async fn mark_unschedulable(ctx: &Ctx, server: &Server, u: &Blocked) -> Result<(), SchedulerError> {
    let mut status = server.status.clone().unwrap_or_default();
    let current = ConditionType::Scheduled.find(&status.conditions);
    if current.is_some_and(|c| c.status == "False" && c.message == u.message) {
        return Ok(());
    }
    status.phase = ServerPhase::Pending;
    u.condition(ConditionType::Scheduled)
        .set(&mut status.conditions, server.metadata.generation);
    ctx.runtime
        .write_status(server, &status)
        .await
        .map_err(SchedulerError::Api)?;
    publish(
        ctx,
        server,
        EventType::Warning,
        "FailedScheduling",
        u.message.clone(),
    )
    .await;
    Ok(())
}

async fn reconcile(server: Arc<Server>, ctx: Arc<Ctx>) -> Result<Action, SchedulerError> {
    let result = sync(Arc::clone(&server), Arc::clone(&ctx)).await;
    ctx.runtime.finish(&server, result).await
}

async fn sync(server: Arc<Server>, ctx: Arc<Ctx>) -> Result<Action, SchedulerError> {
    if server.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    stratus_runtime::store_ready(&ctx.hypervisors).await;
    stratus_runtime::store_ready(&ctx.flavors).await;
    stratus_runtime::store_ready(&ctx.groups).await;
    let ns = server.namespace().ok_or(SchedulerError::NoNamespace)?;
    let name = server.name_any();
    if let Some(hv) = server.status.as_ref().and_then(|s| s.hypervisor.as_ref()) {
        return reclaim(&ctx, &server, &ns, hv).await;
    }
    let key = server_key(&server);
    let Some(flavor) = ctx.flavors.get(&ObjectRef::new(&server.spec.flavor)) else {
        let u = Blocked::new(
            Reason::FlavorNotFound,
            format!("flavor \"{}\" not found", server.spec.flavor),
        );
        mark_unschedulable(&ctx, &server, &u).await?;
        return Ok(Action::requeue(Duration::from_secs(30)));
    };
    let group = match &server.spec.server_group {
        Some(g) => match ctx.groups.get(&ObjectRef::new(g).within(&ns)) {
            Some(group) => Some(group),
            None => {
                let u = Blocked::new(
                    Reason::ServerGroupNotFound,
                    format!("server group \"{g}\" not found"),
                );
                mark_unschedulable(&ctx, &server, &u).await?;
                return Ok(Action::requeue(Duration::from_secs(30)));
            }
        },
        None => None,
    };
    let need = Amount::from(&placement::claim(&flavor.spec));
    let hypervisors = ctx.hypervisors.state();
    let ranked = ctx.rank_for(
        &key,
        &ns,
        group.as_deref(),
        server.spec.availability_zone.as_deref(),
        need,
        &hypervisors,
    );
    let candidates = match ranked {
        Ok(c) => c,
        Err(u) => {
            mark_unschedulable(&ctx, &server, &u).await?;
            return Ok(Action::requeue(Duration::from_secs(30)));
        }
    };
    for hv in &candidates {
        ctx.assume(&key, hv, need);
        match crate::binding::bind::<Server>(&ctx.client, &ns, &name, hv).await {
            Ok(true) => {
                tracing::debug!(server = %key, hypervisor = %hv, "placed");
                // Recorded on the side, as kube-scheduler's event broadcaster does: the next
                // placement need not wait for it.
                let (recorder, reference) = (ctx.recorder.clone(), server.object_ref(&()));
                let note = format!("placed on hypervisor {hv}");
                tokio::spawn(async move {
                    record(&recorder, &reference, EventType::Normal, "Scheduled", note).await;
                });
                return Ok(Action::await_change());
            }
            Ok(false) => ctx.forget(&key),
            Err(e) => {
                ctx.forget(&key);
                return Err(SchedulerError::Api(e));
            }
        }
    }
    // Every candidate filled up meanwhile: look again with a fresher view.
    Ok(Action::requeue(Duration::from_millis(200)))
}

/// A placed Server whose flavor changed (a resize): claims the new flavor's resources on
/// its hypervisor (the agent resizes the guest once the claim is made), or says why it cannot.
async fn reclaim(ctx: &Ctx, server: &Server, ns: &str, hv: &str) -> Result<Action, SchedulerError> {
    let Some(flavor) = ctx.flavors.get(&ObjectRef::new(&server.spec.flavor)) else {
        // The agent reports a missing flavor.
        return Ok(Action::await_change());
    };
    let claim = placement::claim(&flavor.spec);
    if server.status.as_ref().and_then(|s| s.allocated.as_ref()) == Some(&claim) {
        return Ok(Action::await_change());
    }
    if crate::binding::bind::<Server>(&ctx.client, ns, &server.name_any(), hv)
        .await
        .map_err(SchedulerError::Api)?
    {
        publish(
            ctx,
            server,
            EventType::Normal,
            "ResizeClaimed",
            format!("claimed flavor {} on hypervisor {hv}", server.spec.flavor),
        )
        .await;
        return Ok(Action::await_change());
    }
    let message = format!(
        "hypervisor {hv} has no room for flavor {} (cold migration to another hypervisor is not supported yet)",
        server.spec.flavor
    );
    let mut status = server.status.clone().unwrap_or_default();
    let current = ConditionType::Resized.find(&status.conditions);
    if current.is_none_or(|c| c.message != message) {
        ConditionType::Resized
            .no(Reason::InsufficientCapacity, message.clone())
            .set(&mut status.conditions, server.metadata.generation);
        ctx.runtime
            .write_status(server, &status)
            .await
            .map_err(SchedulerError::Api)?;
        publish(ctx, server, EventType::Warning, "ResizeFailed", message).await;
    }
    Ok(Action::requeue(Duration::from_secs(30)))
}

fn error_policy(server: Arc<Server>, e: &SchedulerError, ctx: Arc<Ctx>) -> Action {
    ctx.runtime.error_policy(&server, e)
}

/// A mapper from any change to every Server still waiting for a placement.
fn waiting<T>(
    store: Store<Server>,
) -> impl Fn(T) -> Vec<ObjectRef<Server>> + Send + Sync + 'static {
    move |_| {
        store
            .state()
            .into_iter()
            .filter(|s| {
                s.status
                    .as_ref()
                    .and_then(|st| st.hypervisor.as_ref())
                    .is_none()
            })
            .map(|s| ObjectRef::from_obj(&*s))
            .collect()
    }
}

/// Runs the scheduler until its watches end, with watches of its own.
pub async fn run(client: Client, weigher: Weigher) {
    let (servers, server_watch) = crate::cache::servers(&client);
    let (flavors, flavor_watch) = crate::cache::flavors(&client);
    tokio::select! {
        () = run_shared(client, weigher, &servers, &flavors) => {}
        () = server_watch => {}
        () = flavor_watch => {}
    }
}

/// Runs the scheduler until its watches end, reading Servers and Flavors from shared caches
/// (whose watches the caller runs).
pub async fn run_shared(
    client: Client,
    weigher: Weigher,
    servers: &Shared<Server>,
    flavors: &Shared<Flavor>,
) {
    let (hypervisors, hv_writer) = reflector::store();
    let (groups, group_writer) = reflector::store();
    let cfg = watcher::Config::default;
    let hv_stream = watcher(Api::<Hypervisor>::all(client.clone()), cfg())
        .default_backoff()
        .reflect(hv_writer)
        .applied_objects();
    let group_stream = watcher(Api::<ServerGroup>::all(client.clone()), cfg())
        .default_backoff()
        .reflect(group_writer)
        .applied_objects();
    let placements: Arc<Mutex<Placements>> = Arc::default();
    let index = placements.clone();
    // The index follows the Server changes in the order the controller is told of them, so
    // a reconcile sees every placement up to its own server's change.
    let server_stream = servers.changes().flat_map(move |change| {
        if let Ok(mut p) = index.lock() {
            p.observe(&change);
        }
        futures::stream::iter(change.into_objects())
    });
    let store = servers.store();
    let controller = Controller::for_shared_stream(server_stream, store.clone())
        .with_config(kube::runtime::controller::Config::default().concurrency(64));
    let ctx = Arc::new(Ctx {
        runtime: Runtime::new(client.clone(), "stratus-scheduler"),
        recorder: Recorder::new(
            client.clone(),
            Reporter {
                controller: "stratus-scheduler".into(),
                instance: None,
            },
        ),
        client,
        servers: store.clone(),
        hypervisors,
        flavors: flavors.store(),
        groups,
        assumed: Mutex::new(HashMap::new()),
        placements,
        weigher,
    });
    let waiting_for_flavor = waiting(store.clone());
    // Which flavor changed does not matter (every waiting server is looked at again): one
    // trigger per change, not one per flavor when every flavor is listed again.
    let flavor_changes = flavors
        .changes()
        .filter_map(|change| futures::future::ready(change.into_objects().into_iter().next()));
    controller
        // A hypervisor, flavor or group that appears or changes may let waiting servers fit.
        .watches_stream(hv_stream, waiting(store.clone()))
        .watches_shared_stream(flavor_changes, move |f: Arc<Flavor>| waiting_for_flavor(f))
        .watches_stream(group_stream, waiting(store))
        .run(reconcile, error_policy, ctx)
        .for_each(|_| async {})
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// What each hypervisor holds, from a map (absent: nothing).
    fn holding(used: &HashMap<String, Amount>) -> impl Fn(&str) -> Amount + '_ {
        |h| used.get(h).copied().unwrap_or_default()
    }
    use stratus_api_types::compute::{ComputeResources, HypervisorStatus};

    /// A Ready hypervisor with 4 vCPUs, `ram` MiB and 100 GiB, ratios 1.0 and no reservation.
    fn hv(name: &str, ram: u64) -> Arc<Hypervisor> {
        let mut h = Hypervisor::new(
            name,
            serde_json::from_value(json!({
                "cpuAllocationRatio": 1.0, "ramAllocationRatio": 1.0, "reservedHostMemoryMiB": 0
            }))
            .expect("a hypervisor spec"),
        );
        h.status = Some(HypervisorStatus {
            capacity: Some(ComputeResources {
                vcpus: 4,
                ram_mib: ram,
                disk_gib: 100,
            }),
            conditions: vec![
                serde_json::from_value(json!({
                    "type": "Ready", "status": "True", "reason": "Heartbeat", "message": "",
                    "lastTransitionTime": "2026-01-01T00:00:00Z"
                }))
                .expect("a condition"),
            ],
            ..Default::default()
        });
        Arc::new(h)
    }

    fn need(ram: f64) -> Amount {
        Amount {
            vcpus: 1.0,
            ram_mib: ram,
            disk_gib: 1.0,
        }
    }

    fn group(policy: &str) -> ServerGroupSpec {
        serde_json::from_value(json!({ "policy": policy })).expect("a group spec")
    }

    fn placed(name: &str, hv: Option<&str>, ram: u64) -> Server {
        serde_json::from_value(json!({
            "apiVersion": "compute.stratus.dev/v1", "kind": "Server",
            "metadata": {"name": name, "namespace": "p"},
            "spec": {"flavor": "f", "image": "i"},
            "status": hv.map(|h| json!({"hypervisor": h, "allocated": {"vcpus": 1, "ramMiB": ram, "diskGiB": 1}})),
        }))
        .expect("a server")
    }

    #[test]
    fn the_placement_index_follows_the_watch() {
        let applied = |s: Server| Change::Applied(Arc::new(s));
        let mut p = Placements::default();
        p.observe(&applied(placed("a", None, 0)));
        assert!(p.by_hv.is_empty());
        p.observe(&applied(placed("a", Some("h1"), 512)));
        p.observe(&applied(placed("b", Some("h1"), 256)));
        assert_eq!(p.by_hv["h1"].ram_mib, 768.0);
        // Resized, moved, deleted.
        p.observe(&applied(placed("a", Some("h1"), 1024)));
        assert_eq!(p.by_hv["h1"].ram_mib, 1280.0);
        p.observe(&applied(placed("b", Some("h2"), 256)));
        assert_eq!(
            (p.by_hv["h1"].ram_mib, p.by_hv["h2"].ram_mib),
            (1024.0, 256.0)
        );
        p.observe(&Change::Deleted(Arc::new(placed("a", Some("h1"), 1024))));
        assert_eq!(p.by_hv["h1"].ram_mib, 0.0);
        // A relist starts over from what the cache holds.
        p.observe(&Change::Relisted(vec![Arc::new(placed(
            "b",
            Some("h2"),
            256,
        ))]));
        assert_eq!(p.by_server.len(), 1);
        assert_eq!(p.by_hv.get("h1"), None);
        assert_eq!(p.by_hv["h2"].ram_mib, 256.0);
    }

    #[test]
    fn spread_prefers_free_ram_and_pack_the_fullest_host() {
        let hvs = [hv("a", 4096), hv("b", 8192), hv("c", 2048)];
        let used: HashMap<String, Amount> = HashMap::new();
        let spread = rank(
            None,
            need(512.0),
            &hvs,
            &holding(&used),
            None,
            Weigher::Spread,
        );
        assert_eq!(spread, Ok(vec!["b".into(), "a".into(), "c".into()]));
        let pack = rank(
            None,
            need(512.0),
            &hvs,
            &holding(&used),
            None,
            Weigher::Pack,
        );
        assert_eq!(pack, Ok(vec!["c".into(), "a".into(), "b".into()]));
    }

    #[test]
    fn nothing_fits_says_why_for_each_host() {
        let mut down = (*hv("down", 8192)).clone();
        if let Some(s) = down.status.as_mut() {
            s.conditions.clear();
        }
        let mut off = (*hv("off", 8192)).clone();
        off.spec.disabled = true;
        let hvs = [
            hv("small", 1024),
            hv("small2", 1024),
            Arc::new(down),
            Arc::new(off),
        ];
        let err = rank(
            None,
            need(2048.0),
            &hvs,
            &|_: &str| Amount::default(),
            None,
            Weigher::Spread,
        )
        .expect_err("nothing fits");
        assert_eq!(err.reason, Reason::Unschedulable);
        assert_eq!(
            err.message,
            "0/4 hypervisors are available: 2 insufficient ram, 1 disabled, 1 not ready"
        );
        // What is already claimed counts.
        let used = HashMap::from([("big".to_string(), need(7680.0))]);
        let err = rank(
            None,
            need(1024.0),
            &[hv("big", 8192)],
            &holding(&used),
            None,
            Weigher::Spread,
        )
        .expect_err("full");
        assert!(
            err.message.contains("1 insufficient ram"),
            "{}",
            err.message
        );
        let err = rank(
            None,
            need(1.0),
            &[],
            &|_: &str| Amount::default(),
            None,
            Weigher::Spread,
        )
        .expect_err("no hosts");
        assert!(err.message.contains("no hypervisor is registered"));
    }

    #[test]
    fn zones_are_filtered() {
        let mut other = (*hv("other", 8192)).clone();
        other.spec.availability_zone = "az2".into();
        let hvs = [hv("home", 4096), Arc::new(other)];
        let r = rank(
            Some("az2"),
            need(512.0),
            &hvs,
            &|_: &str| Amount::default(),
            None,
            Weigher::Spread,
        );
        assert_eq!(r, Ok(vec!["other".into()]));
    }

    #[test]
    fn server_groups_place_members_apart_or_together() {
        let hvs = [hv("a", 8192), hv("b", 4096)];
        let nothing: HashMap<String, Amount> = HashMap::new();
        let one_on_a = HashMap::from([("a".to_string(), 1)]);
        let one_on_each = HashMap::from([("a".to_string(), 1), ("b".to_string(), 1)]);
        let place = |policy: &str, members: &HashMap<String, u32>| {
            let spec = group(policy);
            let g = Group {
                spec: &spec,
                members,
            };
            rank(
                None,
                need(512.0),
                &hvs,
                &holding(&nothing),
                Some(&g),
                Weigher::Spread,
            )
        };
        assert_eq!(place("anti-affinity", &one_on_a), Ok(vec!["b".into()]));
        assert_eq!(place("affinity", &one_on_a), Ok(vec!["a".into()]));
        // Soft anti-affinity prefers the other host even with less RAM, but keeps both.
        assert_eq!(
            place("soft-anti-affinity", &one_on_a),
            Ok(vec!["b".into(), "a".into()])
        );
        // Hard anti-affinity with every host taken: nowhere.
        let err = place("anti-affinity", &one_on_each).expect_err("no host left");
        assert!(
            err.message
                .contains("2 hosting the anti-affinity group's members")
        );
    }
}
