//! The project controller: a deleted Project goes only after every object in its namespace is
//! gone — each object's own finalizers (the agents' host cleanup) run first.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use kube::api::{Api, DeleteParams, DynamicObject};
use kube::discovery::ApiResource;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use stratus_api_types::common::{ConditionType, Reason};
use stratus_api_types::identity::{Project, ProjectPhase, ProjectStatus};
use stratus_runtime::finalizer::{self, Stage};
use stratus_runtime::policy::kube_retry;
use stratus_runtime::{Classify, Retry, Runtime};

/// The finalizer that holds a Project until its namespace is empty. The API server sets it on
/// every Project at its creation (so a Project deleted before this controller sees it still
/// waits); the controller adds it only to a Project stored without it (before that rule, or
/// whose finalizers an operator replaced), which is then a no-op for every other Project.
pub const FINALIZER: &str = "identity.stratus.dev/project-cleanup";

/// The field manager of the project controller's status writes.
const MANAGER: &str = "stratus-project-controller";

/// Why a reconcile failed, and whether retrying can help. Waiting for a project's objects to
/// go is not one: it is reported in the Project's status.
#[derive(Debug, thiserror::Error)]
pub enum ProjectError {
    /// Reading, deleting or writing through the API failed.
    #[error("read, delete or write through the API")]
    Api(#[source] kube::Error),
}

impl Classify for ProjectError {
    fn retry(&self) -> Retry {
        match self {
            Self::Api(e) => kube_retry(e),
        }
    }
}

struct Ctx {
    runtime: Runtime<Project>,
    /// Every namespaced kind: what a project's namespace can hold.
    kinds: Vec<ApiResource>,
}

fn namespaced_kinds() -> Vec<ApiResource> {
    let mut kinds: Vec<ApiResource> = stratus_api_types::crds()
        .into_iter()
        .filter(|c| c.spec.scope == "Namespaced")
        .map(|c| ApiResource {
            api_version: format!("{}/v1", c.spec.group),
            group: c.spec.group,
            version: "v1".into(),
            kind: c.spec.names.kind,
            plural: c.spec.names.plural,
        })
        .collect();
    for (group, kind, plural) in [
        ("coordination.k8s.io", "Lease", "leases"),
        ("", "Event", "events"),
    ] {
        kinds.push(ApiResource {
            api_version: if group.is_empty() {
                "v1".into()
            } else {
                format!("{group}/v1")
            },
            group: group.into(),
            version: "v1".into(),
            kind: kind.into(),
            plural: plural.into(),
        });
    }
    kinds
}

/// What a deleted project's namespace still holds.
#[derive(Debug, Default, PartialEq, Eq)]
struct Remaining {
    /// `plural.group` → how many objects of it.
    kinds: BTreeMap<String, usize>,
    /// Finalizer → how many of the objects carry it.
    finalizers: BTreeMap<String, usize>,
}

impl Remaining {
    /// The status a Project waiting for these shows, as a namespace's does in Kubernetes
    /// (`NamespaceContentRemaining`, `NamespaceFinalizersRemaining`).
    fn status(&self, p: &Project) -> ProjectStatus {
        let mut status = p.status.clone().unwrap_or_default();
        status.phase = ProjectPhase::Terminating;
        let generation = p.metadata.generation;
        let list = |m: &BTreeMap<String, usize>, sep: &str| {
            m.iter()
                .map(|(k, n)| format!("{k}{sep}{n} resource instances"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let content = if self.kinds.is_empty() {
            ConditionType::ContentRemaining.no(Reason::ContentDeleted, "all resources are deleted")
        } else {
            ConditionType::ContentRemaining.yes(
                Reason::SomeResourcesRemain,
                format!(
                    "Some resources are remaining: {}",
                    list(&self.kinds, " has ")
                ),
            )
        };
        content.set(&mut status.conditions, generation);
        let finalizers = if self.finalizers.is_empty() {
            ConditionType::FinalizersRemaining
                .no(Reason::ContentHasNoFinalizers, "no content has finalizers")
        } else {
            ConditionType::FinalizersRemaining.yes(
                Reason::SomeFinalizersRemain,
                format!(
                    "Some content in the project has finalizers remaining: {}",
                    list(&self.finalizers, " in ")
                ),
            )
        };
        finalizers.set(&mut status.conditions, generation);
        status
    }
}

/// Deletes what is left in the namespace and says what still is.
async fn empty_namespace(ctx: &Ctx, ns: &str) -> Result<Remaining, ProjectError> {
    let mut remaining = Remaining::default();
    for ar in &ctx.kinds {
        let api: Api<DynamicObject> = Api::namespaced_with(ctx.runtime.client().clone(), ns, ar);
        for o in api
            .list(&Default::default())
            .await
            .map_err(ProjectError::Api)?
            .items
        {
            let kind = if ar.group.is_empty() {
                ar.plural.clone()
            } else {
                format!("{}.{}", ar.plural, ar.group)
            };
            *remaining.kinds.entry(kind).or_default() += 1;
            for f in o.finalizers() {
                *remaining.finalizers.entry(f.clone()).or_default() += 1;
            }
            if o.metadata.deletion_timestamp.is_none() {
                match api.delete(&o.name_any(), &DeleteParams::background()).await {
                    Ok(_) => {}
                    Err(kube::Error::Api(e)) if e.code == 404 => {}
                    Err(e) => return Err(ProjectError::Api(e)),
                }
            }
        }
    }
    Ok(remaining)
}

async fn reconcile(p: Arc<Project>, ctx: Arc<Ctx>) -> Result<Action, ProjectError> {
    let result = sync(&p, &ctx).await;
    ctx.runtime.finish(&p, result).await
}

async fn sync(p: &Project, ctx: &Ctx) -> Result<Action, ProjectError> {
    let client = ctx.runtime.client();
    match finalizer::stage(p, FINALIZER) {
        // Adding it is a change, which reconciles the Project again.
        Stage::Adopt => finalizer::add(client, p, FINALIZER)
            .await
            .map(|()| Action::await_change())
            .map_err(ProjectError::Api),
        Stage::Live => {
            let mut status = p.status.clone().unwrap_or_default();
            status.phase = ProjectPhase::Active;
            status.observed_generation = p.metadata.generation;
            ctx.runtime
                .write_status(p, &status)
                .await
                .map_err(ProjectError::Api)?;
            Ok(Action::requeue(Duration::from_secs(600)))
        }
        Stage::Cleanup => {
            let remaining = empty_namespace(ctx, &p.name_any()).await?;
            if remaining == Remaining::default() {
                finalizer::release(client, p, FINALIZER)
                    .await
                    .map_err(ProjectError::Api)?;
                return Ok(Action::await_change());
            }
            ctx.runtime
                .write_status(p, &remaining.status(p))
                .await
                .map_err(ProjectError::Api)?;
            tracing::info!(project = %p.name_any(), ?remaining, "project deletion waits for its objects");
            Ok(Action::requeue(Duration::from_secs(2)))
        }
        Stage::Gone => Ok(Action::await_change()),
    }
}

fn error_policy(p: Arc<Project>, e: &ProjectError, ctx: Arc<Ctx>) -> Action {
    ctx.runtime.error_policy(&p, e)
}

/// Runs the controller until the process ends.
pub async fn run(client: Client) {
    let projects: Api<Project> = Api::all(client.clone());
    Controller::new(projects, watcher::Config::default())
        .run(
            reconcile,
            error_policy,
            Arc::new(Ctx {
                runtime: Runtime::new(client, MANAGER),
                kinds: namespaced_kinds(),
            }),
        )
        .for_each(|_| async {})
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_waiting_deletion_names_what_remains_and_which_finalizers_hold_it() {
        let p = Project::new(
            "demo",
            stratus_api_types::identity::ProjectSpec {
                description: None,
                enabled: true,
            },
        );
        let remaining = Remaining {
            kinds: BTreeMap::from([
                ("keypairs.compute.stratus.dev".into(), 1),
                ("servers.compute.stratus.dev".into(), 2),
            ]),
            finalizers: BTreeMap::from([("compute.stratus.dev/teardown".into(), 2)]),
        };
        let status = remaining.status(&p);
        assert_eq!(status.phase, ProjectPhase::Terminating);
        let content = ConditionType::ContentRemaining
            .find(&status.conditions)
            .expect("ContentRemaining");
        assert_eq!(
            (content.status.as_str(), content.message.as_str()),
            (
                "True",
                "Some resources are remaining: keypairs.compute.stratus.dev has 1 resource instances, servers.compute.stratus.dev has 2 resource instances"
            )
        );
        let finalizers = ConditionType::FinalizersRemaining
            .find(&status.conditions)
            .expect("FinalizersRemaining");
        assert_eq!(
            finalizers.message,
            "Some content in the project has finalizers remaining: compute.stratus.dev/teardown in 2 resource instances"
        );
        let none = Remaining {
            kinds: BTreeMap::from([("networks.network.stratus.dev".into(), 1)]),
            ..Default::default()
        }
        .status(&p);
        assert!(!ConditionType::FinalizersRemaining.is_true(&none.conditions));
    }
}
