//! The quota controller: keeps each Quota's `status.used` equal to what its project consumes,
//! counted from its own watch caches of the counted kinds (admission enforces the limits;
//! this makes them visible).

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use std::borrow::Cow;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::Api;
use kube::core::DynamicResourceScope;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource, ResourceExt};
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

/// A counted kind, as the watch of its objects names it (the dynamic type of [`Counted`]:
/// a few static names, so a cache key costs a pointer, not a copy of five strings).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CountedKind {
    group: &'static str,
    kind: &'static str,
    plural: &'static str,
}

/// What the quota controller keeps of a counted object: its name and namespace, and the
/// fields that [`usage`] reads (a Server's flavor, a Volume's size, a VolumeSnapshot's size
/// as its create recorded it in status). Decoded from the watch into this directly, so no
/// cached copy holds the rest of the object.
#[derive(Clone, Debug, Default, serde::Deserialize, serde::Serialize)]
pub struct Counted {
    metadata: ObjectMeta,
    #[serde(default)]
    spec: CountedSpec,
    #[serde(default, skip_serializing_if = "CountedStatus::is_empty")]
    status: CountedStatus,
}

/// The counted fields of a status, as [`CountedSpec`].
#[derive(Clone, Debug, Default, serde::Deserialize, serde::Serialize)]
struct CountedStatus {
    #[serde(rename = "sizeGiB", default, skip_serializing_if = "Option::is_none")]
    size_gib: Option<Value>,
}

impl CountedStatus {
    fn is_empty(&self) -> bool {
        self.size_gib.is_none()
    }
}

/// The counted fields of a spec; any JSON, as `usage` reads them (a kind whose spec has a
/// field of the same name but another type still decodes).
#[derive(Clone, Debug, Default, serde::Deserialize, serde::Serialize)]
struct CountedSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    flavor: Option<Value>,
    #[serde(rename = "sizeGiB", default, skip_serializing_if = "Option::is_none")]
    size_gib: Option<Value>,
}

impl Resource for Counted {
    type DynamicType = CountedKind;
    type Scope = DynamicResourceScope;

    fn kind(dt: &CountedKind) -> Cow<'_, str> {
        dt.kind.into()
    }
    fn group(dt: &CountedKind) -> Cow<'_, str> {
        dt.group.into()
    }
    fn version(_: &CountedKind) -> Cow<'_, str> {
        "v1".into()
    }
    fn plural(dt: &CountedKind) -> Cow<'_, str> {
        dt.plural.into()
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// One counted kind and the cache of its objects.
struct CountedCache {
    kind: CountedKind,
    objects: Store<Counted>,
}

struct Ctx {
    runtime: Runtime<Quota>,
    flavors: Store<Flavor>,
    counted: Vec<CountedCache>,
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
            for (field, amount) in usage(c.kind.group, c.kind.kind, &v, &flavor) {
                let e = used.entry(field).or_insert(json!(0));
                *e = json!(e.as_u64().unwrap_or(0) + amount);
            }
        }
    }
    serde_json::from_value(Value::Object(used)).map_err(QuotaError::Usage)
}

impl Ctx {
    fn counted_in(&self, c: &CountedCache, ns: &str) -> Vec<Arc<Counted>> {
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

/// Keeps of a counted object's metadata only what the cache needs: its name and namespace.
fn slim(o: &mut Counted) {
    let m = std::mem::take(&mut o.metadata);
    o.metadata = ObjectMeta {
        name: m.name,
        namespace: m.namespace,
        ..ObjectMeta::default()
    };
}

/// A counted object as the quota controller's cache holds it, decoded from its stored JSON
/// (for measuring what the cache costs).
///
/// # Errors
/// The JSON is not an object with metadata.
pub fn cached(json: &[u8]) -> serde_json::Result<Counted> {
    let mut o: Counted = serde_json::from_slice(json)?;
    slim(&mut o);
    Ok(o)
}

/// Runs the controller until the process ends, reading Flavors from the controllers' shared
/// cache.
pub async fn run(client: Client, flavors: Store<Flavor>) {
    let quotas: Api<Quota> = Api::all(client.clone());
    let mut controller = Controller::new(quotas, watcher::Config::default());
    let mut counted = Vec::new();
    for (group, kind, plural) in COUNTED {
        let dt = CountedKind {
            group,
            kind,
            plural,
        };
        let writer = reflector::store::Writer::<Counted>::new(dt);
        let objects = writer.as_reader();
        let stream = watcher(
            Api::<Counted>::all_with(client.clone(), &dt),
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
            move |o: Counted| {
                let ns = o.namespace();
                quotas
                    .state()
                    .into_iter()
                    .filter(|q| q.namespace() == ns)
                    .map(|q| ObjectRef::from_obj(&*q))
                    .collect::<Vec<_>>()
            },
            dt,
        );
        counted.push(CountedCache { kind: dt, objects });
    }
    let ctx = Arc::new(Ctx {
        runtime: Runtime::new(client, MANAGER),
        flavors,
        counted,
    });
    controller
        .run(reconcile, error_policy, ctx)
        .for_each(|_| async {})
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_counted_object_keeps_what_usage_reads_and_nothing_else() {
        let server = json!({
            "apiVersion": "compute.stratus.dev/v1", "kind": "Server",
            "metadata": {"name": "web", "namespace": "demo", "uid": "u1",
                         "labels": {"a": "b"}, "managedFields": [{"manager": "m"}]},
            "spec": {"flavor": "m1.small", "image": "tiny", "userData": "c2VjcmV0",
                     "networks": [{"network": "n"}]},
            "status": {"hypervisor": "n1"},
        });
        let mut o: Counted = serde_json::from_value(server.clone()).expect("a server");
        slim(&mut o);
        let kept = serde_json::to_value(&o).expect("encodes");
        assert_eq!(
            kept,
            json!({"metadata": {"name": "web", "namespace": "demo"}, "spec": {"flavor": "m1.small"}})
        );
        let flavor = |n: &str| (n == "m1.small").then_some((2, 2048));
        let group = "compute.stratus.dev";
        assert_eq!(
            usage(group, "Server", &kept, &flavor),
            usage(group, "Server", &server, &flavor)
        );
        let volume =
            json!({"metadata": {"name": "v"}, "spec": {"sizeGiB": 20, "source": {"image": "i"}}});
        let o: Counted = serde_json::from_value(volume.clone()).expect("a volume");
        let kept = serde_json::to_value(&o).expect("encodes");
        let group = "storage.stratus.dev";
        assert_eq!(
            usage(group, "Volume", &kept, &flavor),
            usage(group, "Volume", &volume, &flavor)
        );
        // A snapshot's GiB are in its status (its volume's size when it was taken).
        let snapshot = json!({"metadata": {"name": "s"}, "spec": {"volume": "v"},
                              "status": {"sizeGiB": 4, "phase": "Available"}});
        let o: Counted = serde_json::from_value(snapshot.clone()).expect("a snapshot");
        let kept = serde_json::to_value(&o).expect("encodes");
        assert_eq!(
            kept,
            json!({"metadata": {"name": "s"}, "spec": {}, "status": {"sizeGiB": 4}})
        );
        assert_eq!(
            usage(group, "VolumeSnapshot", &kept, &flavor),
            usage(group, "VolumeSnapshot", &snapshot, &flavor)
        );
        assert_eq!(
            usage(group, "VolumeSnapshot", &kept, &flavor),
            [("snapshots", 1), ("volumeGiB", 4)]
        );
        // A kind whose spec has a field of the same name and another type, or no spec.
        let odd = json!({"metadata": {"name": "x"}, "spec": {"flavor": {"name": "f"}}});
        assert!(serde_json::from_value::<Counted>(odd).is_ok());
        assert!(serde_json::from_value::<Counted>(json!({"metadata": {"name": "y"}})).is_ok());
    }
}
