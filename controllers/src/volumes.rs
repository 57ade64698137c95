//! The volume scheduler (Cinder's scheduler): places each Pending Volume on a StoragePool
//! through the `volumes/{name}/binding` subresource, which claims the pool capacity in the
//! same etcd transaction as the placement, so a stale view here can cost a retry but never an
//! overcommit; and keeps each pool's `status.allocatedGiB` and `status.volumes`.
//!
//! A pool takes a volume when it is Ready, not disabled, the one `spec.storagePool` names (if
//! it names one), in `spec.availabilityZone` (if given), labelled with `spec.volumeType` (if
//! given, label `storage.stratus.dev/volume-type`) and has room: its capacity less the reserved
//! percentage less what its volumes and snapshots hold. A volume made from a snapshot or
//! another volume goes to its source's pool (the data is there). The pools with most room come
//! first (Cinder's capacity weigher). A volume that fits nowhere stays Pending with
//! `Scheduled=False` and the reason, and is looked at again when a pool changes.
//!
//! A deleted Volume whose pool is gone, or whose pool's agent has been silent for
//! [`LOST_AFTER`], goes without its agent's teardown (its finalizer released, its claim freed
//! with it); the agent removes the data of Volumes that no longer exist if it comes back.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use kube::api::Api;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource, ResourceExt};
use stratus_api_types::common::{Blocked, ConditionType, Reason};
use stratus_api_types::storage::{
    StoragePool, TEARDOWN_FINALIZER, VOLUME_TYPE_LABEL, VOLUME_UID, Volume, VolumeSnapshot,
};
use stratus_runtime::policy::kube_retry;
use stratus_runtime::{Classify, Retry, Runtime};

/// The field manager of the volume scheduler's status writes.
const MANAGER: &str = "stratus-volume-scheduler";
/// How many of the best pools a placement tries in turn.
pub const CANDIDATES: usize = 5;
/// How long a placement made here counts before the watch must have shown it.
const ASSUME_FOR: Duration = Duration::from_secs(30);
/// How often a volume that fits nowhere is looked at again without any pool changing.
const RETRY_PENDING: Duration = Duration::from_secs(30);

/// Why a reconcile failed; every one may succeed on retry.
#[derive(Debug, thiserror::Error)]
pub enum VolumesError {
    /// A request to the API server failed.
    #[error("request to the API server")]
    Api(#[source] kube::Error),
    /// A Volume without a namespace (a bug elsewhere: Volume is namespaced).
    #[error("volume has no namespace")]
    NoNamespace,
}

impl Classify for VolumesError {
    fn retry(&self) -> Retry {
        match self {
            Self::Api(e) => kube_retry(e),
            Self::NoNamespace => Retry::Never,
        }
    }
}

/// What a volume asks of a pool, beyond room.
#[derive(Debug, Clone, Copy, Default)]
pub struct Wants<'a> {
    /// GiB.
    pub size_gib: u64,
    /// The pool `spec.storagePool` names.
    pub pool: Option<&'a str>,
    /// The pool its source is in (a snapshot's or cloned volume's).
    pub source_pool: Option<&'a str>,
    /// `spec.availabilityZone`.
    pub zone: Option<&'a str>,
    /// `spec.volumeType`.
    pub volume_type: Option<&'a str>,
}

/// How long after its agent's last heartbeat a Ready pool still takes volumes: its agent
/// writes one every few seconds, so a pool silent for longer is on a node that stopped.
pub const HEARTBEAT_GRACE: jiff::SignedDuration = jiff::SignedDuration::from_secs(40);

/// Whether `pool`'s last heartbeat is older than [`HEARTBEAT_GRACE`] at `now` (a pool that
/// never reported one is judged by its phase alone).
fn heartbeat_stale(pool: &StoragePool, now: jiff::Timestamp) -> bool {
    pool.status
        .as_ref()
        .and_then(|s| s.last_heartbeat_time.as_ref())
        .is_some_and(|t| now.duration_since(t.0) > HEARTBEAT_GRACE)
}

/// Ranks the pools a volume may go to, most room first (at most [`CANDIDATES`]); or says why
/// there is none (`0/N storage pools are available: …`). `used(name)` is what a pool holds.
pub fn rank(
    wants: Wants<'_>,
    pools: &[Arc<StoragePool>],
    used: &dyn Fn(&str) -> u64,
    now: jiff::Timestamp,
) -> Result<Vec<String>, Blocked> {
    if let Some(asked) = wants.pool
        && !pools.iter().any(|p| p.name_any() == asked)
    {
        return Err(Blocked::new(
            Reason::NoPoolAvailable,
            format!("storage pool {asked:?} (spec.storagePool) does not exist"),
        ));
    }
    let mut refused: std::collections::BTreeMap<&'static str, usize> = Default::default();
    let mut fit: Vec<(u64, String)> = Vec::new();
    for p in pools {
        let name = p.name_any();
        let why: Option<&'static str> = if wants.pool.is_some_and(|a| a != name) {
            Some("not the pool asked for")
        } else if wants.source_pool.is_some_and(|s| s != name) {
            Some("not where the volume's source is")
        } else if p.spec.disabled {
            Some("disabled")
        } else if !p.is_ready() {
            Some("not ready")
        } else if heartbeat_stale(p, now) {
            Some("not heartbeating")
        } else if wants
            .zone
            .is_some_and(|z| p.spec.availability_zone.as_deref() != Some(z))
        {
            Some("in another availability zone")
        } else if wants
            .volume_type
            .is_some_and(|t| p.labels().get(VOLUME_TYPE_LABEL).map(String::as_str) != Some(t))
        {
            Some("not of the volume type")
        } else {
            match p.allocatable_gib() {
                None => Some("not reporting capacity"),
                Some(total) => {
                    let free = total.saturating_sub(used(&name));
                    if free < wants.size_gib {
                        Some("insufficient capacity")
                    } else {
                        fit.push((free - wants.size_gib, name));
                        None
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
        let detail: Vec<String> = reasons.iter().map(|(n, w)| format!("{n} {w}")).collect();
        let message = if pools.is_empty() {
            "0/0 storage pools are available: no storage pool is registered".to_string()
        } else {
            format!(
                "0/{} storage pools are available for {} GiB: {}",
                pools.len(),
                wants.size_gib,
                detail.join(", ")
            )
        };
        return Err(Blocked::new(Reason::NoPoolAvailable, message));
    }
    // Most room left first, then the name so equal pools are ordered the same way every time.
    fit.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    fit.truncate(CANDIDATES);
    Ok(fit.into_iter().map(|(_, n)| n).collect())
}

/// What each pool holds, GiB, and how many volumes, from the volumes and snapshots cached.
fn holdings(
    volumes: &[Arc<Volume>],
    snapshots: &[Arc<VolumeSnapshot>],
) -> HashMap<String, (u64, u32)> {
    let mut by_pool: HashMap<String, (u64, u32)> = HashMap::new();
    for v in volumes {
        if let Some(pool) = v.status.as_ref().and_then(|s| s.pool.as_ref()) {
            let e = by_pool.entry(pool.clone()).or_default();
            e.0 = e.0.saturating_add(v.spec.size_gib);
            e.1 = e.1.saturating_add(1);
        }
    }
    for s in snapshots {
        let st = s.status.as_ref();
        if let (Some(pool), Some(size)) = (
            st.and_then(|s| s.pool.as_ref()),
            st.and_then(|s| s.size_gib),
        ) {
            let e = by_pool.entry(pool.clone()).or_default();
            e.0 = e.0.saturating_add(size);
        }
    }
    by_pool
}

fn volume_key(v: &Volume) -> String {
    format!("{}/{}", v.namespace().unwrap_or_default(), v.name_any())
}

struct Ctx {
    client: Client,
    runtime: Runtime<Volume>,
    volumes: Store<Volume>,
    pools: Store<StoragePool>,
    snapshots: Store<VolumeSnapshot>,
    /// Placements made here that the cache may not show yet (volume key → pool, GiB, when).
    assumed: Mutex<HashMap<String, (String, u64, Instant)>>,
    recorder: Recorder,
}

impl Ctx {
    /// What each pool holds: the cache, and this scheduler's own recent binds it may not show.
    fn used(&self) -> HashMap<String, u64> {
        let volumes = self.volumes.state();
        let mut used: HashMap<String, u64> = holdings(&volumes, &self.snapshots.state())
            .into_iter()
            .map(|(p, (gib, _))| (p, gib))
            .collect();
        let placed: std::collections::HashSet<String> = volumes
            .iter()
            .filter(|v| v.status.as_ref().is_some_and(|s| s.pool.is_some()))
            .map(|v| volume_key(v))
            .collect();
        if let Ok(mut assumed) = self.assumed.lock() {
            assumed.retain(|k, (_, _, at)| !placed.contains(k) && at.elapsed() < ASSUME_FOR);
            for (pool, gib, _) in assumed.values() {
                *used.entry(pool.clone()).or_default() += gib;
            }
        }
        used
    }

    fn assume(&self, key: &str, pool: &str, gib: u64) {
        if let Ok(mut m) = self.assumed.lock() {
            m.insert(key.to_string(), (pool.to_string(), gib, Instant::now()));
        }
    }

    fn forget(&self, key: &str) {
        if let Ok(mut m) = self.assumed.lock() {
            m.remove(key);
        }
    }

    /// The pool a volume's source is in, or why the volume waits for it.
    fn source_pool(&self, v: &Volume, ns: &str) -> Result<Option<String>, Blocked> {
        let Some(source) = &v.spec.source else {
            return Ok(None);
        };
        let (what, placed) = if let Some(s) = &source.snapshot {
            let snap = self.snapshots.get(&ObjectRef::new(s).within(ns));
            (
                format!("snapshot {s:?}"),
                snap.map(|x| x.status.as_ref().and_then(|st| st.pool.clone())),
            )
        } else if let Some(src) = &source.volume {
            let vol = self.volumes.get(&ObjectRef::new(src).within(ns));
            (
                format!("volume {src:?}"),
                vol.map(|x| x.status.as_ref().and_then(|st| st.pool.clone())),
            )
        } else {
            return Ok(None);
        };
        match placed {
            None => Err(Blocked::new(
                Reason::SourceNotReady,
                format!("its source {what} does not exist"),
            )),
            Some(None) => Err(Blocked::new(
                Reason::SourceNotReady,
                format!("its source {what} is not placed on a storage pool yet"),
            )),
            Some(Some(pool)) => Ok(Some(pool)),
        }
    }
}

async fn publish(ctx: &Ctx, v: &Volume, type_: EventType, reason: &str, note: String) {
    stratus_runtime::events::publish(
        &ctx.recorder,
        &v.object_ref(&()),
        type_,
        "Scheduling",
        reason,
        note,
    )
    .await;
}

/// Records why the volume waits (`Scheduled=False`), unless its condition already says so.
async fn mark_unschedulable(ctx: &Ctx, v: &Volume, why: &Blocked) -> Result<(), VolumesError> {
    let mut status = v.status.clone().unwrap_or_default();
    let current = ConditionType::Scheduled.find(&status.conditions);
    if current.is_some_and(|c| c.status == "False" && c.message == why.message) {
        return Ok(());
    }
    why.condition(ConditionType::Scheduled)
        .set(&mut status.conditions, v.metadata.generation);
    ctx.runtime
        .write_status(v, &status)
        .await
        .map_err(VolumesError::Api)?;
    publish(
        ctx,
        v,
        EventType::Warning,
        "FailedScheduling",
        why.message.clone(),
    )
    .await;
    Ok(())
}

async fn reconcile(v: Arc<Volume>, ctx: Arc<Ctx>) -> Result<Action, VolumesError> {
    let result = place(&v, &ctx).await;
    ctx.runtime.finish(&v, result).await
}

/// How long a pool's agent may be silent before the Volumes deleted on it go without it (as
/// Kubernetes lets a lost node's pods and attachments go after its grace): its node is taken
/// for gone, so the volume's claim is freed and its agent, if it comes back, removes the data
/// no Volume names any more.
pub const LOST_AFTER: jiff::SignedDuration = jiff::SignedDuration::from_mins(5);

/// Why a deleted Volume placed on `pool` (`None`: the pool is gone) may go without its
/// storage agent's teardown, if it may: the pool is gone, or its agent has not heartbeated
/// for [`LOST_AFTER`] (a pool that never reported one is not judged).
pub fn abandoned(name: &str, pool: Option<&StoragePool>, now: jiff::Timestamp) -> Option<String> {
    let Some(pool) = pool else {
        return Some(format!("its storage pool {name} is gone"));
    };
    let last = pool.status.as_ref()?.last_heartbeat_time.as_ref()?.0;
    let silent = now.duration_since(last);
    (silent > LOST_AFTER).then(|| {
        format!(
            "the storage agent of node {} has not heartbeated pool {name} for {} s",
            pool.spec.node,
            silent.as_secs()
        )
    })
}

/// A deleted Volume placed on a pool whose node is gone ([`abandoned`]): the storage agent's
/// finalizer is released for it, with an Event saying why; otherwise looked at again later.
async fn let_go(v: &Volume, ctx: &Ctx) -> Result<Action, VolumesError> {
    let Some(pool) = v.status.as_ref().and_then(|s| s.pool.clone()) else {
        return Ok(Action::await_change());
    };
    if !v.finalizers().iter().any(|f| f == TEARDOWN_FINALIZER) {
        return Ok(Action::await_change());
    }
    stratus_runtime::store_ready(&ctx.pools).await;
    let p = ctx.pools.get(&ObjectRef::new(&pool));
    let Some(why) = abandoned(&pool, p.as_deref(), jiff::Timestamp::now()) else {
        return Ok(Action::requeue(RETRY_PENDING));
    };
    stratus_runtime::finalizer::release(&ctx.client, v, TEARDOWN_FINALIZER)
        .await
        .map_err(VolumesError::Api)?;
    tracing::warn!(volume = %volume_key(v), %why, "deleted without its storage agent");
    publish(
        ctx,
        v,
        EventType::Warning,
        "NodeLost",
        format!(
            "deleted without its storage agent: {why}; the agent removes its data if it comes back"
        ),
    )
    .await;
    Ok(Action::await_change())
}

async fn place(v: &Volume, ctx: &Ctx) -> Result<Action, VolumesError> {
    if v.metadata.deletion_timestamp.is_some() {
        return let_go(v, ctx).await;
    }
    let ns = v.namespace().ok_or(VolumesError::NoNamespace)?;
    let name = v.name_any();
    if let Some(pool) = v.status.as_ref().and_then(|s| s.pool.clone()) {
        stratus_runtime::store_ready(&ctx.snapshots).await;
        if !snapshots_waiting(&ctx.snapshots.state(), v) {
            return Ok(Action::await_change());
        }
        // Snapshots asked before it was placed that its binding could not place (no room
        // then): bound again to its pool, which places them once there is room.
        crate::binding::bind::<Volume>(&ctx.client, &ns, &name, &pool)
            .await
            .map_err(VolumesError::Api)?;
        return Ok(Action::requeue(RETRY_PENDING));
    }
    stratus_runtime::store_ready(&ctx.pools).await;
    stratus_runtime::store_ready(&ctx.snapshots).await;
    let key = volume_key(v);
    let source_pool = match ctx.source_pool(v, &ns) {
        Ok(p) => p,
        Err(why) => {
            mark_unschedulable(ctx, v, &why).await?;
            return Ok(Action::requeue(RETRY_PENDING));
        }
    };
    let wants = Wants {
        size_gib: v.spec.size_gib,
        pool: v.spec.storage_pool.as_deref(),
        source_pool: source_pool.as_deref(),
        zone: v.spec.availability_zone.as_deref(),
        volume_type: v.spec.volume_type.as_deref(),
    };
    let used = ctx.used();
    let candidates = match rank(
        wants,
        &ctx.pools.state(),
        &|p| used.get(p).copied().unwrap_or(0),
        jiff::Timestamp::now(),
    ) {
        Ok(c) => c,
        Err(why) => {
            mark_unschedulable(ctx, v, &why).await?;
            return Ok(Action::requeue(RETRY_PENDING));
        }
    };
    for pool in &candidates {
        ctx.assume(&key, pool, v.spec.size_gib);
        match crate::binding::bind::<Volume>(&ctx.client, &ns, &name, pool).await {
            Ok(true) => {
                tracing::debug!(volume = %key, pool = %pool, "placed");
                publish(
                    ctx,
                    v,
                    EventType::Normal,
                    "Scheduled",
                    format!("placed on storage pool {pool}"),
                )
                .await;
                return Ok(Action::await_change());
            }
            Ok(false) => ctx.forget(&key),
            Err(e) => {
                ctx.forget(&key);
                return Err(VolumesError::Api(e));
            }
        }
    }
    // Every candidate filled up meanwhile: look again with a fresher view.
    Ok(Action::requeue(Duration::from_millis(200)))
}

/// Whether a snapshot of `v` (by its uid) waits for its placement: not placed, not deleted.
fn snapshots_waiting(snapshots: &[Arc<VolumeSnapshot>], v: &Volume) -> bool {
    let uid = v.uid();
    snapshots.iter().any(|s| {
        s.namespace() == v.namespace()
            && s.annotations().get(VOLUME_UID) == uid.as_ref()
            && s.metadata.deletion_timestamp.is_none()
            && s.status.as_ref().is_none_or(|st| st.pool.is_none())
    })
}

fn error_policy(v: Arc<Volume>, e: &VolumesError, ctx: Arc<Ctx>) -> Action {
    ctx.runtime.error_policy(&v, e)
}

/// A mapper from any change to every Volume still waiting for a pool.
fn waiting<T>(
    store: Store<Volume>,
) -> impl Fn(T) -> Vec<ObjectRef<Volume>> + Send + Sync + 'static {
    move |_| {
        store
            .state()
            .into_iter()
            .filter(|v| {
                v.metadata.deletion_timestamp.is_none()
                    && v.status.as_ref().is_none_or(|s| s.pool.is_none())
            })
            .map(|v| ObjectRef::from_obj(&*v))
            .collect()
    }
}

/// What the pool accounting reads.
struct Accounts {
    runtime: Runtime<StoragePool>,
    volumes: Store<Volume>,
    snapshots: Store<VolumeSnapshot>,
}

/// Writes a pool's `status.allocatedGiB` and `status.volumes` from the volumes and snapshots
/// placed on it (what their claims hold), once its agent has reported a status.
async fn account(pool: Arc<StoragePool>, ctx: Arc<Accounts>) -> Result<Action, VolumesError> {
    let result = async {
        let Some(current) = pool.status.as_ref() else {
            return Ok(Action::await_change());
        };
        stratus_runtime::store_ready(&ctx.volumes).await;
        stratus_runtime::store_ready(&ctx.snapshots).await;
        let (gib, count) = holdings(&ctx.volumes.state(), &ctx.snapshots.state())
            .remove(&pool.name_any())
            .unwrap_or_default();
        let mut status = current.clone();
        status.allocated_gib = Some(gib);
        status.volumes = Some(count);
        ctx.runtime
            .write_status(&pool, &status)
            .await
            .map_err(VolumesError::Api)?;
        Ok(Action::await_change())
    }
    .await;
    ctx.runtime.finish(&pool, result).await
}

fn account_error(pool: Arc<StoragePool>, e: &VolumesError, ctx: Arc<Accounts>) -> Action {
    ctx.runtime.error_policy(&pool, e)
}

/// The pool an object is placed on, as the reference to reconcile.
fn pool_of(pool: Option<&String>) -> Option<ObjectRef<StoragePool>> {
    pool.map(|p| ObjectRef::new(p))
}

/// Runs the volume scheduler and the pool accounting until their watches end.
pub async fn run(client: Client) {
    tokio::join!(schedule(client.clone()), keep_accounts(client));
}

async fn schedule(client: Client) {
    let cfg = watcher::Config::default;
    let (pools, pool_writer) = reflector::store();
    let (snapshots, snap_writer) = reflector::store();
    let (volumes, volume_writer) = reflector::store();
    let pool_stream = watcher(Api::<StoragePool>::all(client.clone()), cfg())
        .default_backoff()
        .reflect(pool_writer)
        .applied_objects();
    let snap_stream = watcher(Api::<VolumeSnapshot>::all(client.clone()), cfg())
        .default_backoff()
        .reflect(snap_writer)
        .touched_objects();
    let volume_stream = watcher(Api::<Volume>::all(client.clone()), cfg())
        .default_backoff()
        .modify(|v: &mut Volume| v.metadata.managed_fields = None)
        .reflect(volume_writer)
        .touched_objects();
    let ctx = Arc::new(Ctx {
        runtime: Runtime::new(client.clone(), MANAGER),
        recorder: Recorder::new(
            client.clone(),
            Reporter {
                controller: MANAGER.into(),
                instance: None,
            },
        ),
        client,
        volumes: volumes.clone(),
        pools,
        snapshots,
        assumed: Mutex::new(HashMap::new()),
    });
    Controller::for_stream(volume_stream, volumes.clone())
        .with_config(kube::runtime::controller::Config::default().concurrency(16))
        // A pool or snapshot that appears or changes (room freed, a source placed) may let
        // waiting volumes go.
        .watches_stream(pool_stream, waiting(volumes.clone()))
        .watches_stream(snap_stream, waiting(volumes))
        .run(reconcile, error_policy, ctx)
        .for_each(|_| async {})
        .await;
}

async fn keep_accounts(client: Client) {
    let cfg = watcher::Config::default;
    let (volumes, volume_writer) = reflector::store();
    let (snapshots, snap_writer) = reflector::store();
    let volume_stream = watcher(Api::<Volume>::all(client.clone()), cfg())
        .default_backoff()
        .modify(|v: &mut Volume| v.metadata.managed_fields = None)
        .reflect(volume_writer)
        .touched_objects();
    let snap_stream = watcher(Api::<VolumeSnapshot>::all(client.clone()), cfg())
        .default_backoff()
        .reflect(snap_writer)
        .touched_objects();
    let ctx = Arc::new(Accounts {
        runtime: Runtime::new(client.clone(), MANAGER),
        volumes,
        snapshots,
    });
    Controller::new(Api::<StoragePool>::all(client), watcher::Config::default())
        .watches_stream(volume_stream, |v: Volume| {
            pool_of(v.status.as_ref().and_then(|s| s.pool.as_ref()))
        })
        .watches_stream(snap_stream, |s: VolumeSnapshot| {
            pool_of(s.status.as_ref().and_then(|s| s.pool.as_ref()))
        })
        .run(account, account_error, ctx)
        .for_each(|_| async {})
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use stratus_api_types::storage::{StorageBackend, StoragePoolPhase, StoragePoolSpec};
    use stratus_api_types::storage::{StoragePoolStatus, VolumeSpec, VolumeStatus};

    /// A Ready LVM pool of `capacity` GiB on node `n-NAME`.
    fn pool(name: &str, capacity: u64) -> StoragePool {
        let mut p = StoragePool::new(
            name,
            StoragePoolSpec {
                backend: StorageBackend::Lvm,
                node: format!("n-{name}"),
                vg_name: Some("vg".into()),
                path: None,
                availability_zone: None,
                reserved_percentage: 0,
                over_subscription_ratio: None,
                disabled: false,
            },
        );
        p.status = Some(StoragePoolStatus {
            phase: StoragePoolPhase::Ready,
            capacity_gib: Some(capacity),
            last_heartbeat_time: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                heartbeat(),
            )),
            ..Default::default()
        });
        p
    }

    /// When the fixtures' agents last reported.
    fn heartbeat() -> jiff::Timestamp {
        "2026-01-01T00:00:00Z".parse().expect("a timestamp")
    }

    /// A few seconds after the fixtures' heartbeat.
    fn now() -> jiff::Timestamp {
        heartbeat() + jiff::SignedDuration::from_secs(5)
    }

    /// A pool whose agent stopped heartbeating gets no volumes, whatever its phase still
    /// says; one that never reported a heartbeat is judged by its phase.
    #[test]
    fn a_deleted_volume_goes_without_its_agent_only_once_its_node_is_lost() {
        let p = pool("p1", 10);
        let at = |secs: i64| heartbeat() + jiff::SignedDuration::from_secs(secs);
        assert_eq!(abandoned("p1", Some(&p), at(5)), None, "heartbeating");
        assert_eq!(abandoned("p1", Some(&p), at(300)), None, "within the grace");
        let why = abandoned("p1", Some(&p), at(301)).expect("lost");
        assert!(why.contains("node n-p1") && why.contains("301 s"), "{why}");
        let gone = abandoned("p1", None, at(5)).expect("no pool");
        assert!(gone.contains("storage pool p1 is gone"), "{gone}");
        let mut silent = pool("p2", 10);
        silent.status = Some(StoragePoolStatus::default());
        assert_eq!(
            abandoned("p2", Some(&silent), at(10_000)),
            None,
            "never reported"
        );
    }

    #[test]
    fn a_pool_whose_agent_went_silent_gets_nothing() {
        let pools = all(vec![pool("a", 10), pool("b", 50)]);
        let later = heartbeat() + HEARTBEAT_GRACE + jiff::SignedDuration::from_secs(1);
        let err = rank(wants(1), &pools, &nothing, later).expect_err("both silent");
        assert!(
            err.message.contains("2 not heartbeating"),
            "{}",
            err.message
        );
        let mut unreported = pool("c", 10);
        if let Some(s) = unreported.status.as_mut() {
            s.last_heartbeat_time = None;
        }
        let pools = all(vec![pool("a", 10), unreported]);
        assert_eq!(
            rank(wants(1), &pools, &nothing, later),
            Ok(vec!["c".into()])
        );
    }

    fn wants(size_gib: u64) -> Wants<'static> {
        Wants {
            size_gib,
            ..Default::default()
        }
    }

    fn nothing(_: &str) -> u64 {
        0
    }

    fn all(pools: Vec<StoragePool>) -> Vec<Arc<StoragePool>> {
        pools.into_iter().map(Arc::new).collect()
    }

    #[test]
    fn the_pool_with_most_room_comes_first() {
        let pools = all(vec![pool("a", 10), pool("b", 50), pool("c", 20)]);
        let used = |p: &str| if p == "b" { 45 } else { 0 };
        assert_eq!(
            rank(wants(2), &pools, &used, now()),
            Ok(vec!["c".into(), "a".into(), "b".into()])
        );
        // What is held counts: 5 GiB left on b, 10 on a.
        assert_eq!(
            rank(wants(6), &pools, &used, now()),
            Ok(vec!["c".into(), "a".into()])
        );
    }

    #[test]
    fn nothing_fits_says_why_for_each_pool() {
        let mut off = pool("off", 100);
        off.spec.disabled = true;
        let mut down = pool("down", 100);
        if let Some(s) = down.status.as_mut() {
            s.phase = StoragePoolPhase::NotReady;
        }
        let mut silent = pool("silent", 0);
        if let Some(s) = silent.status.as_mut() {
            s.capacity_gib = None;
        }
        let mut reserved = pool("reserved", 10);
        reserved.spec.reserved_percentage = 50;
        let pools = all(vec![pool("full", 10), reserved, off, down, silent]);
        let used = |p: &str| if p == "full" { 10 } else { 0 };
        let err = rank(wants(6), &pools, &used, now()).expect_err("nothing fits");
        assert_eq!(err.reason, Reason::NoPoolAvailable);
        assert_eq!(
            err.message,
            "0/5 storage pools are available for 6 GiB: 2 insufficient capacity, 1 disabled, 1 not ready, 1 not reporting capacity"
        );
        let err = rank(wants(1), &[], &nothing, now()).expect_err("no pools");
        assert!(err.message.contains("no storage pool is registered"));
    }

    #[test]
    fn an_over_subscribed_pool_takes_its_ratio_of_its_capacity_after_the_reserve() {
        let mut thin = pool("thin", 10);
        thin.spec.over_subscription_ratio = Some(3.0);
        thin.spec.reserved_percentage = 20;
        let pools = all(vec![thin]);
        // 10 GiB, 8 of them allocatable, thrice: 24 GiB of claims.
        let used = |_: &str| 20;
        assert!(
            rank(wants(4), &pools, &used, now()).is_ok(),
            "24 GiB in all"
        );
        let err = rank(wants(5), &pools, &used, now()).expect_err("25 GiB is over");
        assert_eq!(
            err.message,
            "0/1 storage pools are available for 5 GiB: 1 insufficient capacity"
        );
    }

    #[test]
    fn a_volume_goes_where_it_asks_and_where_its_source_is() {
        let mut fast = pool("fast", 10);
        fast.metadata.labels = Some([(VOLUME_TYPE_LABEL.to_string(), "ssd".to_string())].into());
        let mut far = pool("far", 100);
        far.spec.availability_zone = Some("az2".into());
        let pools = all(vec![pool("a", 100), fast, far]);
        let pinned = Wants {
            pool: Some("fast"),
            ..wants(1)
        };
        assert_eq!(
            rank(pinned, &pools, &nothing, now()),
            Ok(vec!["fast".into()])
        );
        let typed = Wants {
            volume_type: Some("ssd"),
            ..wants(1)
        };
        assert_eq!(
            rank(typed, &pools, &nothing, now()),
            Ok(vec!["fast".into()])
        );
        let zoned = Wants {
            zone: Some("az2"),
            ..wants(1)
        };
        assert_eq!(rank(zoned, &pools, &nothing, now()), Ok(vec!["far".into()]));
        let restored = Wants {
            source_pool: Some("a"),
            ..wants(1)
        };
        assert_eq!(
            rank(restored, &pools, &nothing, now()),
            Ok(vec!["a".into()])
        );
        let missing = Wants {
            pool: Some("gone"),
            ..wants(1)
        };
        let err = rank(missing, &pools, &nothing, now()).expect_err("no such pool");
        assert!(
            err.message
                .contains("\"gone\" (spec.storagePool) does not exist")
        );
        // Its source's pool full: nowhere else will do.
        let full_source = Wants {
            source_pool: Some("fast"),
            ..wants(20)
        };
        let err = rank(full_source, &pools, &nothing, now()).expect_err("full");
        assert!(
            err.message
                .contains("2 not where the volume's source is, 1 insufficient capacity"),
            "{}",
            err.message
        );
    }

    #[test]
    fn a_placed_volume_is_bound_again_only_for_its_waiting_snapshots() {
        let v: Volume = serde_json::from_value(json!({
            "apiVersion": "storage.stratus.dev/v1", "kind": "Volume",
            "metadata": {"name": "v", "namespace": "demo", "uid": "u1"},
            "spec": {"sizeGiB": 1},
            "status": {"pool": "p", "node": "n"},
        }))
        .expect("a volume");
        let snap = |ns: &str, of: &str, status: serde_json::Value, deleted: bool| {
            let mut s: VolumeSnapshot = serde_json::from_value(json!({
                "apiVersion": "storage.stratus.dev/v1", "kind": "VolumeSnapshot",
                "metadata": {"name": "s", "namespace": ns,
                             "annotations": {VOLUME_UID: of}},
                "spec": {"volume": "v"},
                "status": status,
            }))
            .expect("a snapshot");
            if deleted {
                s.metadata.deletion_timestamp = Some(
                    k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(heartbeat()),
                );
            }
            Arc::new(s)
        };
        let pending = json!({"phase": "Pending"});
        assert!(snapshots_waiting(
            &[snap("demo", "u1", pending.clone(), false)],
            &v
        ));
        assert!(!snapshots_waiting(&[], &v));
        for other in [
            snap(
                "demo",
                "u1",
                json!({"phase": "Creating", "pool": "p"}),
                false,
            ),
            snap("demo", "u0", pending.clone(), false),
            snap("other", "u1", pending.clone(), false),
            snap("demo", "u1", pending.clone(), true),
        ] {
            assert!(
                !snapshots_waiting(std::slice::from_ref(&other), &v),
                "{other:?}"
            );
        }
    }

    #[test]
    fn a_pool_holds_its_volumes_and_snapshots() {
        let vol = |name: &str, size: u64, pool: Option<&str>| {
            let mut v = Volume::new(
                name,
                VolumeSpec {
                    size_gib: size,
                    storage_pool: None,
                    volume_type: None,
                    availability_zone: None,
                    source: None,
                    bootable: false,
                    multi_attach: false,
                    description: None,
                },
            );
            v.status = Some(VolumeStatus {
                pool: pool.map(String::from),
                ..Default::default()
            });
            Arc::new(v)
        };
        let snap: VolumeSnapshot = serde_json::from_value(json!({
            "apiVersion": "storage.stratus.dev/v1", "kind": "VolumeSnapshot",
            "metadata": {"name": "s", "namespace": "p"},
            "spec": {"volume": "a"},
            "status": {"pool": "p1", "sizeGiB": 3},
        }))
        .expect("a snapshot");
        let held = holdings(
            &[
                vol("a", 3, Some("p1")),
                vol("b", 4, Some("p1")),
                vol("c", 9, None),
            ],
            &[Arc::new(snap)],
        );
        assert_eq!(held.get("p1"), Some(&(10, 2)));
        assert_eq!(held.len(), 1, "an unplaced volume holds nothing");
    }
}
