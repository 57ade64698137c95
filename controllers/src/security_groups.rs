//! The default security group controller: every active Project has a SecurityGroup `default`
//! in its namespace, as every Neutron project does — ingress only from the ports in the group
//! itself (remote group `default`), all IPv4 egress. Ports that name no group get it.
//!
//! It is created only when absent, so a user's edits to it are kept; deleted, it is created
//! again. A Project being deleted gets none (its namespace is being emptied), nor does one the
//! project controller has not yet taken charge of (without its cleanup finalizer, a group made
//! now could outlive the Project). A create the API refuses (a Quota on `securityGroups`) is
//! logged and told in a Warning Event on the Project, and tried again with backoff.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use kube::api::{Api, ObjectMeta, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{EventType, Recorder, Reporter};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use stratus_api_types::identity::{Project, ProjectPhase};
use stratus_api_types::network::{
    Direction, EtherType, Protocol, SecurityGroup, SecurityGroupRule, SecurityGroupSpec,
};
use stratus_runtime::policy::{chain, kube_retry, namespace_terminating};
use stratus_runtime::{Classify, Retry, Runtime};

/// The name of every project's default security group.
pub const NAME: &str = "default";

/// The label marking a security group Stratus created, and its value.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
/// The value of [`MANAGED_BY_LABEL`] on a default group Stratus created.
pub const MANAGED_BY: &str = "stratus";

/// The field manager of the groups this controller creates.
const MANAGER: &str = "stratus-security-group-controller";

/// Why a reconcile failed, and whether retrying can help.
#[derive(Debug, thiserror::Error)]
pub enum SecurityGroupsError {
    /// Reading or creating through the API failed.
    #[error("read or create through the API")]
    Api(#[source] kube::Error),
    /// The API refused to create the group (a Quota on `securityGroups`, most likely): an
    /// operator raising the quota or the user freeing a group mends it, so it is tried again
    /// with backoff.
    #[error("the API refused to create security group {NAME:?}")]
    Refused(#[source] kube::Error),
}

impl Classify for SecurityGroupsError {
    fn retry(&self) -> Retry {
        match self {
            Self::Api(e) => kube_retry(e),
            Self::Refused(_) => Retry::Backoff,
        }
    }
}

/// What to do about a Project's default group.
#[derive(Debug, Clone, PartialEq)]
pub enum Plan {
    /// Create this group.
    Create(Box<SecurityGroup>),
    /// It exists: leave it as it is (the user may have edited it).
    Keep,
    /// The Project is being deleted: make nothing in its namespace.
    Terminating,
    /// The project controller has not yet put its cleanup finalizer on the Project: wait for
    /// it (adding it is a change, which reconciles the Project again).
    NotAdopted,
}

/// The default group of namespace `namespace`: ingress from its own members, all IPv4 egress,
/// labelled as Stratus's.
pub fn default_group(namespace: &str) -> SecurityGroup {
    let rule = |direction, remote_group: Option<&str>, description: &str| SecurityGroupRule {
        direction,
        ethertype: EtherType::IPv4,
        protocol: Protocol::Any,
        port_range_min: None,
        port_range_max: None,
        icmp_type: None,
        icmp_code: None,
        remote_ip_prefix: None,
        remote_group: remote_group.map(String::from),
        description: Some(description.into()),
    };
    SecurityGroup {
        metadata: ObjectMeta {
            name: Some(NAME.into()),
            namespace: Some(namespace.into()),
            labels: Some([(MANAGED_BY_LABEL.to_string(), MANAGED_BY.to_string())].into()),
            ..ObjectMeta::default()
        },
        spec: SecurityGroupSpec {
            rules: vec![
                rule(
                    Direction::Ingress,
                    Some(NAME),
                    "anything from the ports in this group",
                ),
                rule(Direction::Egress, None, "all outgoing IPv4"),
            ],
            description: Some("Default security group".into()),
        },
        status: None,
    }
}

/// Whether `project` is being deleted.
pub fn terminating(project: &Project) -> bool {
    project.metadata.deletion_timestamp.is_some()
        || project
            .status
            .as_ref()
            .is_some_and(|s| s.phase == ProjectPhase::Terminating)
}

/// What to do about `project`'s default group, `existing` being the group `default` in its
/// namespace, if any.
pub fn plan(project: &Project, existing: Option<&SecurityGroup>) -> Plan {
    if terminating(project) {
        return Plan::Terminating;
    }
    if existing.is_some() {
        return Plan::Keep;
    }
    if !project
        .finalizers()
        .iter()
        .any(|f| f == crate::project::FINALIZER)
    {
        return Plan::NotAdopted;
    }
    Plan::Create(Box::new(default_group(&project.name_any())))
}

/// What a failed create means: `Ok` when nothing is left to do (another writer made the group;
/// the Project is gone, or being deleted), else the error to retry.
///
/// # Errors
/// [`SecurityGroupsError::Refused`] for a refused create (403), [`SecurityGroupsError::Api`]
/// for any other failure.
pub fn create_failed(e: kube::Error) -> Result<(), SecurityGroupsError> {
    match e {
        // Made meanwhile (by a user, or by this controller's earlier try): it is kept as is.
        kube::Error::Api(s) if s.code == 409 => Ok(()),
        // The namespace's Project is gone, or its deletion began since it was read: its
        // deletion is an event of its own, and nothing is to be made in its namespace.
        kube::Error::Api(s) if s.code == 404 => Ok(()),
        e if namespace_terminating(&e) => Ok(()),
        kube::Error::Api(s) if s.code == 403 => {
            Err(SecurityGroupsError::Refused(kube::Error::Api(s)))
        }
        e => Err(SecurityGroupsError::Api(e)),
    }
}

struct Ctx {
    runtime: Runtime<Project>,
    recorder: Recorder,
}

async fn reconcile(project: Arc<Project>, ctx: Arc<Ctx>) -> Result<Action, SecurityGroupsError> {
    let result = ensure(&project, &ctx).await;
    // Only the backoff is kept: the Project's status is the project controller's.
    if result.is_ok() {
        ctx.runtime.backoff().succeeded(&project);
    }
    result
}

async fn ensure(cached: &Project, ctx: &Ctx) -> Result<Action, SecurityGroupsError> {
    let client = ctx.runtime.client();
    let ns = cached.name_any();
    // Read live: a cache that has not yet seen the Project's deletion must not fill the
    // namespace the project controller is emptying.
    let Some(project) = Api::<Project>::all(client.clone())
        .get_opt(&ns)
        .await
        .map_err(SecurityGroupsError::Api)?
    else {
        return Ok(Action::await_change());
    };
    let groups: Api<SecurityGroup> = Api::namespaced(client.clone(), &ns);
    let existing = groups
        .get_opt(NAME)
        .await
        .map_err(SecurityGroupsError::Api)?;
    match plan(&project, existing.as_ref()) {
        Plan::Create(group) => {
            let params = PostParams {
                field_manager: Some(MANAGER.into()),
                ..PostParams::default()
            };
            match groups.create(&params, &group).await {
                Ok(_) => {
                    tracing::info!(project = %ns, "created the project's default security group");
                }
                Err(e) => {
                    if let Err(e) = create_failed(e) {
                        if let SecurityGroupsError::Refused(_) = e {
                            let note =
                                format!("cannot create security group {NAME:?}: {}", chain(&e));
                            tracing::warn!(project = %ns, "{note}");
                            stratus_runtime::events::publish(
                                &ctx.recorder,
                                &project.object_ref(&()),
                                EventType::Warning,
                                "CreateDefaultSecurityGroup",
                                "DefaultSecurityGroupRefused",
                                note,
                            )
                            .await;
                        }
                        return Err(e);
                    }
                }
            }
            Ok(Action::requeue(Duration::from_secs(600)))
        }
        Plan::Keep => Ok(Action::requeue(Duration::from_secs(600))),
        Plan::Terminating | Plan::NotAdopted => Ok(Action::await_change()),
    }
}

fn error_policy(project: Arc<Project>, e: &SecurityGroupsError, ctx: Arc<Ctx>) -> Action {
    tracing::debug!(project = %project.name_any(), error = %chain(e), "default security group not ensured");
    ctx.runtime.error_policy(&project, e)
}

/// Runs the controller until its watches end.
pub async fn run(client: Client) {
    let ctx = Arc::new(Ctx {
        runtime: Runtime::new(client.clone(), MANAGER),
        recorder: Recorder::new(
            client.clone(),
            Reporter {
                controller: MANAGER.into(),
                instance: None,
            },
        ),
    });
    Controller::new(
        Api::<Project>::all(client.clone()),
        watcher::Config::default(),
    )
    // A deleted default group is made again.
    .watches(
        Api::<SecurityGroup>::all(client),
        watcher::Config::default(),
        |g: SecurityGroup| {
            (g.name_any() == NAME)
                .then(|| g.namespace())
                .flatten()
                .map(|ns| ObjectRef::<Project>::new(&ns))
        },
    )
    .run(reconcile, error_policy, ctx)
    .for_each(|_| async {})
    .await;
}
