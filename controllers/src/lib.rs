//! Stratus cluster-wide reconcilers, each driven by kube-runtime against the API server, run
//! by whichever `stratus controllers` instance holds the leader Lease.

pub mod attachments;
mod binding;
pub mod cache;
pub mod floating_ips;
pub mod gc;
pub mod image_store;
pub mod images;
pub mod nodes;
pub mod ports;
pub mod project;
pub mod quota;
pub mod rings;
pub mod routers;
pub mod scheduler;
pub mod security_groups;
pub mod subnets;
pub mod volumes;

use std::time::Duration;

use kube_lease_manager::{LeaseManagerBuilder, LeaseManagerError};

/// Namespace of the controllers' leader Lease.
pub const LEASE_NAMESPACE: &str = "stratus-system";
/// Name of the controllers' leader Lease.
pub const LEASE_NAME: &str = "stratus-controllers";

/// Keeps of a cached Server what the cluster-wide controllers read: not its user data (often
/// the largest field, and a secret) nor its managed fields, so caches of many servers stay
/// small. They write Servers only with merge patches, never from the cached copy whole.
pub(crate) fn slim_server(s: &mut stratus_api_types::compute::Server) {
    s.spec.user_data = None;
    s.metadata.managed_fields = None;
}

/// Failures that stop the controllers.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The garbage collector stopped.
    #[error("garbage collector")]
    Gc(#[from] gc::GcError),
    /// The leader Lease could not be read or written.
    #[error("leader election")]
    Lease(#[from] LeaseManagerError),
    /// The leader election task ended.
    #[error("leader election task ended")]
    LeaseTask,
}

/// Leader election settings.
#[derive(Debug, Clone)]
pub struct Election {
    /// This instance's identity, recorded as the Lease holder.
    pub identity: String,
    /// Seconds a leader holds the Lease without renewing it; a standby takes over after that.
    pub lease_seconds: u64,
    /// How the scheduler orders the hypervisors a server fits on.
    pub weigher: scheduler::Weigher,
    /// Where the image controller keeps the image data it verifies.
    pub image_dir: std::path::PathBuf,
    /// What the image controller may fetch, and how much.
    pub image_policy: stratus_image_cache::Policy,
    /// Where the image controller keeps URL sources' verified data (the object store,
    /// through the API server); `None`: nodes fetch them from their URLs.
    pub image_store: Option<image_store::DataWriter>,
}

impl Election {
    /// An identity unique to this process.
    pub fn new(lease_seconds: u64) -> Self {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        let identity = format!("{}-{}", host.trim(), uuid::Uuid::new_v4().simple());
        Self {
            identity,
            lease_seconds: lease_seconds.max(2),
            weigher: scheduler::Weigher::Spread,
            image_dir: std::env::temp_dir().join("stratus-images"),
            image_policy: stratus_image_cache::Policy::default(),
            image_store: None,
        }
    }
}

/// Runs every controller while this instance holds the leader Lease; stands by otherwise.
/// A deleted Lease counts as lost: the controllers stop and the election starts again,
/// creating it anew (the Lease manager alone would carry on without one, and a second
/// instance could then lead at the same time).
///
/// # Errors
/// The first controller failure that retrying cannot fix, or a lost connection to the Lease.
pub async fn run(client: kube::Client, election: Election) -> Result<(), Error> {
    loop {
        tokio::select! {
            result = elect_and_run(&client, &election) => return result,
            () = lease_deleted(&client, election.lease_seconds) => {
                tracing::warn!(
                    identity = %election.identity,
                    "the controllers' leader lease was deleted: controllers stopped; electing again"
                );
            }
        }
    }
}

/// Returns once the leader Lease is found missing (checked once per lease period).
async fn lease_deleted(client: &kube::Client, lease_seconds: u64) {
    let leases: kube::Api<k8s_openapi::api::coordination::v1::Lease> =
        kube::Api::namespaced(client.clone(), LEASE_NAMESPACE);
    loop {
        tokio::time::sleep(Duration::from_secs(lease_seconds.max(1))).await;
        if let Ok(None) = leases.get_opt(LEASE_NAME).await {
            return;
        }
    }
}

/// One election: waits for the Lease, runs the controllers while holding it.
async fn elect_and_run(client: &kube::Client, election: &Election) -> Result<(), Error> {
    let duration = election.lease_seconds;
    let manager = LeaseManagerBuilder::new(client.clone(), LEASE_NAME)
        .with_namespace(LEASE_NAMESPACE)
        .with_identity(&election.identity)
        .with_duration(duration)
        .with_grace((duration / 3).max(1))
        .build()
        .await?;
    let (mut leader, task) = manager.watch().await;
    // Whoever stops this function (an abort at shutdown) stops lease renewal with it.
    let mut task = tokio_util::task::AbortOnDropHandle::new(task);
    tracing::info!(identity = %election.identity, "waiting for the controllers' leader lease");
    let result = loop {
        while !*leader.borrow_and_update() {
            if leader.changed().await.is_err() {
                break;
            }
        }
        if task.is_finished() {
            break Err(Error::LeaseTask);
        }
        tracing::info!(identity = %election.identity, "leading: controllers started");
        let mut controllers =
            tokio_util::task::AbortOnDropHandle::new(tokio::spawn(every_controller(
                client.clone(),
                election.weigher,
                election.image_dir.clone(),
                election.image_policy.clone(),
                election.image_store.clone(),
            )));
        tokio::select! {
            done = &mut controllers => {
                break match done {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(e)) => Err(e.into()),
                    Err(_) => Err(Error::LeaseTask),
                };
            }
            _ = async {
                loop {
                    if leader.changed().await.is_err() || !*leader.borrow_and_update() {
                        return;
                    }
                }
            } => {
                controllers.abort();
                tracing::warn!(identity = %election.identity, "lost the leader lease: controllers stopped");
                // Give the new leader a moment before competing again.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    drop(leader);
    let _ = (&mut task).await;
    result
}

/// Every controller, until one stops.
///
/// The controllers that read every Server (the scheduler, node lifecycle, ports, volume
/// attachments) or every Flavor (the scheduler, quota) share one watch and one cached copy
/// of each (see [`cache`]), so a cloud with many objects holds each once, not once per
/// controller.
async fn every_controller(
    client: kube::Client,
    weigher: scheduler::Weigher,
    image_dir: std::path::PathBuf,
    image_policy: stratus_image_cache::Policy,
    image_store: Option<image_store::DataWriter>,
) -> Result<(), gc::GcError> {
    let (servers, server_watch) = cache::servers(&client);
    let (flavors, flavor_watch) = cache::flavors(&client);
    // None of them ends on its own; if one does, say which (the caller starts them again).
    let stopped = |which: &str| tracing::warn!(controller = which, "a controller stopped");
    tokio::select! {
        r = gc::run(client.clone()) => r,
        () = server_watch => { stopped("the Server watch"); Ok(()) }
        () = flavor_watch => { stopped("the Flavor watch"); Ok(()) }
        () = quota::run(client.clone(), flavors.store()) => { stopped("quota"); Ok(()) }
        () = project::run(client.clone()) => { stopped("project"); Ok(()) }
        () = scheduler::run_shared(client.clone(), weigher, &servers, &flavors) => { stopped("scheduler"); Ok(()) }
        () = nodes::run(client.clone(), &servers) => { stopped("node lifecycle"); Ok(()) }
        () = ports::run(client.clone(), &servers) => { stopped("ports"); Ok(()) }
        () = routers::run(client.clone()) => { stopped("routers"); Ok(()) }
        () = floating_ips::run(client.clone()) => { stopped("floating IPs"); Ok(()) }
        () = security_groups::run(client.clone()) => { stopped("default security groups"); Ok(()) }
        () = subnets::run(client.clone()) => { stopped("subnet usage"); Ok(()) }
        () = volumes::run(client.clone()) => { stopped("volume scheduler"); Ok(()) }
        () = attachments::run(client.clone(), &servers) => { stopped("volume attachments"); Ok(()) }
        () = rings::run(client.clone()) => { stopped("object rings"); Ok(()) }
        () = images::run(client, image_dir, image_policy, image_store) => { stopped("images"); Ok(()) }
    }
}

#[cfg(test)]
mod tests {
    use stratus_api_types::compute::Server;

    #[test]
    fn a_cached_server_keeps_what_scheduling_and_evacuation_read_but_not_its_user_data() {
        let mut s: Server = serde_json::from_value(serde_json::json!({
            "apiVersion": "compute.stratus.dev/v1", "kind": "Server",
            "metadata": {"name": "web", "namespace": "demo", "managedFields": [{"manager": "m"}]},
            "spec": {"flavor": "m1.small", "image": "tiny", "serverGroup": "g",
                     "evacuationPolicy": "Evacuate", "userData": "c2VjcmV0"},
            "status": {"hypervisor": "n1", "allocated": {"vcpus": 1, "ramMiB": 512, "diskGiB": 1}},
        }))
        .expect("a server");
        let before = s.clone();
        super::slim_server(&mut s);
        assert_eq!(s.spec.user_data, None);
        assert_eq!(s.metadata.managed_fields, None);
        assert_eq!(s.status, before.status);
        let mut spec = before.spec.clone();
        spec.user_data = None;
        assert_eq!(s.spec, spec);
    }
}
