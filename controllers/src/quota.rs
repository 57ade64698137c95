//! The quota controller: keeps each Quota's `status.used` equal to what its project consumes,
//! counted from the store (admission enforces the limits; this makes them visible).

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use kube::api::{Api, DynamicObject, Patch, PatchParams};
use kube::discovery::ApiResource;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use serde_json::{Map, Value, json};
use stratus_api_types::compute::Flavor;
use stratus_api_types::identity::Quota;
use stratus_api_types::quota::{COUNTED, usage};

/// Why a reconcile failed; every one of them may succeed on retry.
#[derive(Debug, thiserror::Error)]
pub enum QuotaError {
    /// Reading the project's objects or writing the status failed.
    #[error("read or write through the API")]
    Api(#[source] kube::Error),
    /// The Quota has no namespace (a bug elsewhere: Quota is namespaced).
    #[error("quota has no namespace")]
    NoNamespace,
}

struct Ctx {
    client: Client,
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

/// Counts what a project uses.
async fn used_in(client: &Client, ns: &str) -> Result<Map<String, Value>, QuotaError> {
    let flavors: Vec<Flavor> = Api::<Flavor>::all(client.clone())
        .list(&Default::default())
        .await
        .map_err(QuotaError::Api)?
        .items;
    let flavor = |name: &str| {
        flavors
            .iter()
            .find(|f| f.name_any() == name)
            .map(|f| (u64::from(f.spec.vcpus), f.spec.ram_mib))
    };
    let mut used = Map::new();
    for c in COUNTED {
        let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), ns, &resource(c));
        let objs = api
            .list(&Default::default())
            .await
            .map_err(QuotaError::Api)?;
        // Every counted field shows, zero included.
        for (field, _) in usage(c.0, c.1, &json!({}), &flavor) {
            used.entry(field).or_insert(json!(0));
        }
        for o in objs.items {
            let v = serde_json::to_value(&o).unwrap_or(Value::Null);
            for (field, amount) in usage(c.0, c.1, &v, &flavor) {
                let e = used.entry(field).or_insert(json!(0));
                *e = json!(e.as_u64().unwrap_or(0) + amount);
            }
        }
    }
    Ok(used)
}

async fn reconcile(q: Arc<Quota>, ctx: Arc<Ctx>) -> Result<Action, QuotaError> {
    let ns = q.namespace().ok_or(QuotaError::NoNamespace)?;
    let used = used_in(&ctx.client, &ns).await?;
    let limits = serde_json::to_value(&q.spec.limits).unwrap_or(Value::Null);
    let exceeded = used.iter().any(|(f, u)| {
        limits
            .get(f)
            .and_then(Value::as_u64)
            .is_some_and(|l| u.as_u64().unwrap_or(0) > l)
    });
    let status = json!({"status": {
        "phase": if exceeded { "Exceeded" } else { "Active" },
        "used": used,
        "observedGeneration": q.metadata.generation,
    }});
    let api: Api<Quota> = Api::namespaced(ctx.client.clone(), &ns);
    let pp = PatchParams {
        field_manager: Some("stratus-quota".into()),
        ..Default::default()
    };
    api.patch_status(&q.name_any(), &pp, &Patch::Merge(status))
        .await
        .map_err(QuotaError::Api)?;
    // Changes to counted objects trigger a reconcile; the requeue only repairs missed events.
    Ok(Action::requeue(Duration::from_secs(300)))
}

fn error_policy(q: Arc<Quota>, e: &QuotaError, _: Arc<Ctx>) -> Action {
    tracing::warn!(quota = %q.name_any(), error = %e, "quota status not updated; retrying");
    Action::requeue(Duration::from_secs(5))
}

/// Runs the controller until the process ends.
pub async fn run(client: Client) {
    let quotas: Api<Quota> = Api::all(client.clone());
    let mut controller = Controller::new(quotas, watcher::Config::default());
    for c in COUNTED {
        let ar = resource(c);
        let store = controller.store();
        // A change to a counted object recounts every Quota of its project.
        controller = controller.watches_with(
            Api::<DynamicObject>::all_with(client.clone(), &ar),
            ar,
            watcher::Config::default(),
            move |o: DynamicObject| {
                let ns = o.namespace();
                store
                    .state()
                    .into_iter()
                    .filter(|q| q.namespace() == ns)
                    .map(|q| ObjectRef::from_obj(&*q))
                    .collect::<Vec<_>>()
            },
        );
    }
    controller
        .run(reconcile, error_policy, Arc::new(Ctx { client }))
        .for_each(|r| async move {
            if let Err(e) = r {
                tracing::debug!(error = %e, "quota reconcile");
            }
        })
        .await;
}
