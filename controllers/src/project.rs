//! The project controller: a deleted Project goes only after every object in its namespace is
//! gone — each object's own finalizers (the agents' host cleanup) run first.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams};
use kube::discovery::ApiResource;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::finalizer::{Event, finalizer};
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use serde_json::json;
use stratus_api_types::identity::Project;

/// The finalizer that holds a Project until its namespace is empty.
pub const FINALIZER: &str = "identity.stratus.dev/project-cleanup";

/// Why a reconcile did not finish; every one is retried.
#[derive(Debug, thiserror::Error)]
pub enum ProjectError {
    /// Reading or deleting through the API failed.
    #[error("read or delete through the API")]
    Api(#[source] kube::Error),
    /// Objects remain in the namespace (some wait for their own finalizers).
    #[error("waiting for {0} object(s) in the project to be deleted")]
    Waiting(usize),
    /// Adding or removing the finalizer failed.
    #[error("finalizer")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<ProjectError>>),
}

struct Ctx {
    client: Client,
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

/// Deletes what is left in the namespace; Ok once nothing is.
async fn empty_namespace(ctx: &Ctx, ns: &str) -> Result<(), ProjectError> {
    let mut remaining = 0;
    for ar in &ctx.kinds {
        let api: Api<DynamicObject> = Api::namespaced_with(ctx.client.clone(), ns, ar);
        for o in api
            .list(&Default::default())
            .await
            .map_err(ProjectError::Api)?
            .items
        {
            remaining += 1;
            if o.metadata.deletion_timestamp.is_none() {
                match api.delete(&o.name_any(), &DeleteParams::background()).await {
                    Ok(_) => {}
                    Err(kube::Error::Api(e)) if e.code == 404 => {}
                    Err(e) => return Err(ProjectError::Api(e)),
                }
            }
        }
    }
    if remaining > 0 {
        Err(ProjectError::Waiting(remaining))
    } else {
        Ok(())
    }
}

async fn reconcile(p: Arc<Project>, ctx: Arc<Ctx>) -> Result<Action, ProjectError> {
    let api: Api<Project> = Api::all(ctx.client.clone());
    finalizer(&api, FINALIZER, p, |event| async {
        match event {
            Event::Apply(p) => {
                if p.status.as_ref().is_none_or(|s| s.observed_generation != p.metadata.generation) {
                    let status = json!({"status": {"phase": "Active", "observedGeneration": p.metadata.generation}});
                    api.patch_status(&p.name_any(), &PatchParams::default(), &Patch::Merge(status)).await.map_err(ProjectError::Api)?;
                }
                Ok(Action::requeue(Duration::from_secs(600)))
            }
            Event::Cleanup(p) => {
                let status = json!({"status": {"phase": "Terminating"}});
                let _ = api.patch_status(&p.name_any(), &PatchParams::default(), &Patch::Merge(status)).await;
                empty_namespace(&ctx, &p.name_any()).await?;
                Ok(Action::await_change())
            }
        }
    })
    .await
    .map_err(|e| match e {
        kube::runtime::finalizer::Error::ApplyFailed(e) | kube::runtime::finalizer::Error::CleanupFailed(e) => e,
        other => ProjectError::Finalizer(Box::new(other)),
    })
}

fn error_policy(p: Arc<Project>, e: &ProjectError, _: Arc<Ctx>) -> Action {
    match e {
        ProjectError::Waiting(n) => {
            tracing::info!(project = %p.name_any(), remaining = n, "project deletion waits for its objects")
        }
        e => {
            tracing::warn!(project = %p.name_any(), error = %e, "project reconcile failed; retrying")
        }
    }
    Action::requeue(Duration::from_secs(2))
}

/// Runs the controller until the process ends.
pub async fn run(client: Client) {
    let projects: Api<Project> = Api::all(client.clone());
    Controller::new(projects, watcher::Config::default())
        .run(
            reconcile,
            error_policy,
            Arc::new(Ctx {
                client,
                kinds: namespaced_kinds(),
            }),
        )
        .for_each(|_| async {})
        .await;
}
