//! The quota controller: keeps each Quota's `status.used` equal to what its project consumes,
//! counted from its own watch caches of the counted kinds (admission enforces the limits;
//! this makes them visible).

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use kube::api::{Api, DynamicObject};
use kube::discovery::ApiResource;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use serde_json::{Map, Value, json};
use stratus_api_types::compute::Flavor;
use stratus_api_types::identity::{Quota, QuotaPhase, QuotaUsage};
use stratus_api_types::quota::{COUNTED, usage};
use stratus_runtime::policy::kube_retry;
use stratus_runtime::{Classify, Retry, Runtime};

/// The field manager of the quota controller's status writes.
const MANAGER: &str = "stratus-quota";

/// Why a reconcile failed, and whether retrying can help.
#[derive(Debug, thiserror::Error)]
pub enum QuotaError {
    /// Writing the status failed.
    #[error("write the quota's status")]
    Api(#[source] kube::Error),
    /// The usage counted does not fit the status's schema (a bug: a counted field that
    /// `QuotaUsage` lacks).
    #[error("usage does not fit the status")]
    Usage(#[source] serde_json::Error),
}

impl Classify for QuotaError {
    fn retry(&self) -> Retry {
        match self {
            Self::Api(e) => kube_retry(e),
            Self::Usage(_) => Retry::Never,
        }
    }
}

/// One counted kind and the cache of its objects.
struct Counted {
    group: &'static str,
    kind: &'static str,
    objects: Store<DynamicObject>,
}

struct Ctx {
    runtime: Runtime<Quota>,
    flavors: Store<Flavor>,
    counted: Vec<Counted>,
}

fn resource((group, kind, plural): (&str, &str, &str)) -> ApiResource {
    ApiResource {
        group: group.into(),
        version: "v1".into(),
        api_version: format!("{group}/v1"),
        kind: kind.into(),
        plural: plural.into(),
    }
}

/// Counts what a project uses, from the caches.
fn used_in(ctx: &Ctx, ns: &str) -> Result<QuotaUsage, QuotaError> {
    let flavor = |name: &str| {
        ctx.flavors
            .get(&ObjectRef::new(name))
            .map(|f| (u64::from(f.spec.vcpus), f.spec.ram_mib))
    };
    let mut used = Map::new();
    for c in &ctx.counted {
        for o in ctx.counted_in(c, ns) {
            let v = serde_json::to_value(&*o).unwrap_or(Value::Null);
            for (field, amount) in usage(c.group, c.kind, &v, &flavor) {
                let e = used.entry(field).or_insert(json!(0));
                *e = json!(e.as_u64().unwrap_or(0) + amount);
            }
        }
    }
    serde_json::from_value(Value::Object(used)).map_err(QuotaError::Usage)
}

impl Ctx {
    fn counted_in(&self, c: &Counted, ns: &str) -> Vec<Arc<DynamicObject>> {
        c.objects
            .state()
            .into_iter()
            .filter(|o| o.namespace().as_deref() == Some(ns))
            .collect()
    }
}

async fn reconcile(q: Arc<Quota>, ctx: Arc<Ctx>) -> Result<Action, QuotaError> {
    let result = recount(&q, &ctx).await;
    ctx.runtime.finish(&q, result).await
}

async fn recount(q: &Quota, ctx: &Ctx) -> Result<Action, QuotaError> {
    let Some(ns) = q.namespace() else {
        return Ok(Action::await_change());
    };
    // Counting from caches that have not listed yet would report zero.
    stratus_runtime::store_ready(&ctx.flavors).await;
    for c in &ctx.counted {
        stratus_runtime::store_ready(&c.objects).await;
    }
    let used = used_in(ctx, &ns)?;
    let limits = serde_json::to_value(&q.spec.limits).unwrap_or(Value::Null);
    let counted = serde_json::to_value(&used).unwrap_or(Value::Null);
    let exceeded = counted.as_object().into_iter().flatten().any(|(f, u)| {
        limits
            .get(f)
            .and_then(Value::as_u64)
            .is_some_and(|l| u.as_u64().unwrap_or(0) > l)
    });
    let mut status = q.status.clone().unwrap_or_default();
    status.phase = if exceeded {
        QuotaPhase::Exceeded
    } else {
        QuotaPhase::Active
    };
    status.used = used;
    status.observed_generation = q.metadata.generation;
    ctx.runtime
        .write_status(q, &status)
        .await
        .map_err(QuotaError::Api)?;
    // Changes to counted objects trigger a reconcile; the requeue only repairs missed events.
    Ok(Action::requeue(Duration::from_secs(300)))
}

fn error_policy(q: Arc<Quota>, e: &QuotaError, ctx: Arc<Ctx>) -> Action {
    ctx.runtime.error_policy(&q, e)
}

/// Keeps of a counted object only what counting reads (its spec), so the caches hold no
/// status, managed fields or annotations.
fn slim(o: &mut DynamicObject) {
    o.metadata.managed_fields = None;
    o.metadata.annotations = None;
    o.metadata.labels = None;
    if let Some(m) = o.data.as_object_mut() {
        m.retain(|k, _| k == "spec");
        // A Server's user data counts for nothing and is often its largest field.
        if let Some(spec) = m.get_mut("spec").and_then(serde_json::Value::as_object_mut) {
            spec.remove("userData");
        }
    }
}

/// Runs the controller until the process ends.
pub async fn run(client: Client) {
    let quotas: Api<Quota> = Api::all(client.clone());
    let mut controller = Controller::new(quotas, watcher::Config::default());
    let (flavors, flavor_writer) = reflector::store();
    let flavor_stream = watcher(
        Api::<Flavor>::all(client.clone()),
        watcher::Config::default(),
    )
    .default_backoff()
    .modify(|f: &mut Flavor| f.metadata.managed_fields = None)
    .reflect(flavor_writer)
    .applied_objects();
    let mut counted = Vec::new();
    for c in COUNTED {
        let ar = resource(c);
        let writer = reflector::store::Writer::<DynamicObject>::new(ar.clone());
        let objects = writer.as_reader();
        let stream = watcher(
            Api::<DynamicObject>::all_with(client.clone(), &ar),
            watcher::Config::default(),
        )
        .default_backoff()
        .modify(slim)
        .reflect(writer)
        .touched_objects();
        let quotas = controller.store();
        // A change to a counted object recounts every Quota of its project.
        controller = controller.watches_stream_with(
            stream,
            move |o: DynamicObject| {
                let ns = o.namespace();
                quotas
                    .state()
                    .into_iter()
                    .filter(|q| q.namespace() == ns)
                    .map(|q| ObjectRef::from_obj(&*q))
                    .collect::<Vec<_>>()
            },
            ar,
        );
        counted.push(Counted {
            group: c.0,
            kind: c.1,
            objects,
        });
    }
    let ctx = Arc::new(Ctx {
        runtime: Runtime::new(client, MANAGER),
        flavors,
        counted,
    });
    let flavors = flavor_stream.for_each(|_| async {});
    let quotas = controller
        .run(reconcile, error_policy, ctx)
        .for_each(|_| async {});
    futures::join!(flavors, quotas);
}
