//! The node's Hypervisor object: registered by the agent, its status (capacity, what is placed
//! on it, Ready) kept current, and a Lease renewed as the node's heartbeat.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use kube::Client;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::reflector::Store;
use serde_json::json;
use stratus_api_types::common::{ConditionType, Reason, Time};
use stratus_api_types::compute::HypervisorType;
use stratus_api_types::compute::{
    ComputeResources, Hypervisor, HypervisorPhase, HypervisorStatus, Server,
};
use stratus_runtime::Runtime;

use super::Config;
use super::driver::{DomainDriver as Driver, DriverError};

pub use stratus_api_types::compute::NODE_LEASE_NAMESPACE as LEASE_NAMESPACE;
/// How many heartbeats a Lease lasts: a node is NotReady after missing this many.
pub const HEARTBEATS_PER_LEASE: u32 = 4;
/// The longest interval between heartbeats: the node lifecycle controller believes a Lease
/// for at most 40 s after its renewal, so four heartbeats must fit in that.
pub const MAX_HEARTBEAT_SECONDS: u64 = 10;

/// Failures of registration and heartbeats (all retried).
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// A request to the API server failed.
    #[error("request to the API server")]
    Api(#[source] kube::Error),
    /// libvirt could not describe the node.
    #[error("hypervisor")]
    Driver(#[from] DriverError),
    /// The state directory's file system could not be measured.
    #[error("measure the state directory")]
    Disk(#[source] std::io::Error),
    /// A blocking task panicked (a bug).
    #[error("blocking task failed")]
    Join(#[from] tokio::task::JoinError),
}

/// Size of the file system holding `dir`, in GiB.
fn disk_gib(dir: &Path) -> Result<u64, NodeError> {
    let st = rustix::fs::statvfs(dir).map_err(|e| NodeError::Disk(e.into()))?;
    Ok(st.f_blocks.saturating_mul(st.f_frsize) >> 30)
}

/// Creates the node's Hypervisor if it is absent (the spec is then the operator's to edit;
/// the agent never writes it again).
async fn register(
    client: &Client,
    config: &Config,
    hypervisor_type: HypervisorType,
) -> Result<(), NodeError> {
    let api: Api<Hypervisor> = Api::all(client.clone());
    if api
        .get_opt(&config.node)
        .await
        .map_err(NodeError::Api)?
        .is_some()
    {
        return Ok(());
    }
    let hv: Hypervisor = serde_json::from_value(json!({
        "apiVersion": "compute.stratus.dev/v1",
        "kind": "Hypervisor",
        "metadata": {"name": config.node},
        "spec": {"availabilityZone": config.zone, "hypervisorType": hypervisor_type},
    }))
    .map_err(|e| NodeError::Api(kube::Error::SerdeError(e)))?;
    match api.create(&PostParams::default(), &hv).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
        Err(e) => Err(NodeError::Api(e)),
    }
}

/// The node's status from the hypervisor and what is placed on it.
async fn status(
    driver: &Arc<dyn Driver>,
    config: &Config,
    servers: &Store<Server>,
    current: Option<&HypervisorStatus>,
) -> Result<HypervisorStatus, NodeError> {
    let d = Arc::clone(driver);
    let info = tokio::task::spawn_blocking(move || d.node_info()).await??;
    let dir = config.state_dir.clone();
    let disk = tokio::task::spawn_blocking(move || disk_gib(&dir)).await??;
    let mut allocated = ComputeResources::default();
    let mut count = 0u32;
    for s in servers.state() {
        let Some(st) = s.status.as_ref() else {
            continue;
        };
        if st.hypervisor.as_deref() != Some(config.node.as_str()) {
            continue;
        }
        count += 1;
        if let Some(a) = &st.allocated {
            allocated.vcpus += a.vcpus;
            allocated.ram_mib += a.ram_mib;
            allocated.disk_gib += a.disk_gib;
        }
    }
    let mut status = current.cloned().unwrap_or_default();
    status.phase = HypervisorPhase::Ready;
    status.capacity = Some(ComputeResources {
        vcpus: u64::from(info.cpus),
        ram_mib: info.memory_mib,
        disk_gib: disk,
    });
    status.allocated = Some(allocated);
    status.servers = Some(count);
    status.hypervisor_version = Some(info.hypervisor_version);
    ConditionType::Ready
        .yes(
            Reason::AgentReady,
            "the compute agent is running and heartbeating",
        )
        .set(&mut status.conditions, None);
    Ok(status)
}

/// Renews the node's Lease (creating it the first time).
async fn beat(client: &Client, node: &str, every: Duration) -> Result<(), NodeError> {
    let api: Api<Lease> = Api::namespaced(client.clone(), LEASE_NAMESPACE);
    let now = jiff::Timestamp::now().to_string();
    let lease = json!({
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {"name": node, "namespace": LEASE_NAMESPACE},
        "spec": {
            "holderIdentity": node,
            "leaseDurationSeconds": (every * HEARTBEATS_PER_LEASE).as_secs().max(1),
            "renewTime": now,
        },
    });
    api.patch(
        node,
        &PatchParams::apply("stratus-agent").force(),
        &Patch::Apply(lease),
    )
    .await
    .map_err(NodeError::Api)?;
    Ok(())
}

/// One heartbeat: the Lease, then the Hypervisor's status if anything in it changed.
async fn heartbeat(
    client: &Client,
    runtime: &Runtime<Hypervisor>,
    driver: &Arc<dyn Driver>,
    config: &Config,
    servers: &Store<Server>,
) -> Result<(), NodeError> {
    beat(client, &config.node, config.heartbeat).await?;
    let api: Api<Hypervisor> = Api::all(client.clone());
    let current = api.get_opt(&config.node).await.map_err(NodeError::Api)?;
    let Some(current) = current else {
        return register(client, config, driver.hypervisor_type()).await;
    };
    let old = current.status.clone();
    let mut next = status(driver, config, servers, old.as_ref()).await?;
    // The heartbeat time lives in the Lease; the status only moves when something else does.
    next.last_heartbeat_time = old.as_ref().and_then(|s| s.last_heartbeat_time.clone());
    if old.as_ref() == Some(&next) {
        return Ok(());
    }
    next.last_heartbeat_time = Some(Time(jiff::Timestamp::now()));
    runtime
        .write_status(&current, &next)
        .await
        .map_err(NodeError::Api)?;
    Ok(())
}

/// Registers the node and keeps its heartbeat going until the task is dropped.
pub(crate) async fn run(
    client: Client,
    driver: Arc<dyn Driver>,
    config: Config,
    servers: Store<Server>,
) {
    let mut pause = Duration::from_millis(200);
    loop {
        match register(&client, &config, driver.hypervisor_type()).await {
            Ok(()) => break,
            Err(e) => {
                tracing::warn!(error = %e, "cannot register the hypervisor; retrying");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(10));
            }
        }
    }
    let runtime = Runtime::new(client.clone(), super::server::MANAGER);
    let mut tick = tokio::time::interval(config.heartbeat);
    loop {
        tick.tick().await;
        if let Err(e) = heartbeat(&client, &runtime, &driver, &config, &servers).await {
            tracing::warn!(error = %e, "heartbeat failed");
        }
    }
}
