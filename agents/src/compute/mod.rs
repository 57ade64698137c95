//! The compute agent: the node's Hypervisor object and the libvirt guests of its Servers.

pub mod console;
pub mod driver;
pub mod images;
pub mod interfaces;
pub mod node;
pub mod server;
pub mod volumes;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use kube::Client;
use kube::runtime::events::{Recorder, Reporter};
use stratus_api_types::compute::HypervisorType;

use driver::disk::HostDisks;
use driver::fake::MemoryDisks;
use driver::{Disks, DomainDriver};
use stratus_image_cache::ImageCache;

/// How the agent runs on its node.
#[derive(Debug, Clone)]
pub struct Config {
    /// The node's name: its Hypervisor object and its `system:node:NAME` identity.
    pub node: String,
    /// Where the image cache and the guests' disks, config drives and console logs live.
    pub state_dir: PathBuf,
    /// Availability zone the node registers in.
    pub zone: String,
    /// How often the node's Lease is renewed (it lasts four of these).
    pub heartbeat: Duration,
    /// How often each guest is read back from libvirt even without an event.
    pub resync: Duration,
    /// What the node's image cache may fetch, and how much.
    pub image_policy: stratus_image_cache::Policy,
    /// The cluster's volume export ports (`--export-ports`): a volume of another node is
    /// attached over NBD only on one of them.
    pub export_ports: stratus_api_types::storage::PortRange,
    /// Whether a volume of another node is attached from an export served without TLS
    /// (`stratus agent --nbd-insecure`); by default only from one served over TLS.
    pub nbd_insecure: bool,
}

impl Config {
    /// What this node accepts of a volume another node serves it over NBD.
    pub fn nbd(&self) -> volumes::NbdPolicy {
        volumes::NbdPolicy {
            ports: self.export_ports,
            insecure: self.nbd_insecure,
        }
    }
}

/// How often guests whose Server is gone, and cached images no guest uses, are looked for.
const SWEEP: Duration = Duration::from_secs(30);

/// The disks for guests of `driver`: the host's, unless the driver runs no guest that could
/// open them (libvirt's `test:///` driver, for scale runs), whose disks are kept in memory.
pub fn disks_for(driver: &dyn DomainDriver) -> Arc<dyn Disks> {
    match driver.hypervisor_type() {
        HypervisorType::Qemu => Arc::new(HostDisks),
        HypervisorType::Test => Arc::new(MemoryDisks::default()),
    }
}

/// Runs the compute agent with the disks [`disks_for`] the driver (see [`run_with`]).
pub async fn run(client: Client, driver: Arc<dyn DomainDriver>, config: Config) {
    let disks = disks_for(driver.as_ref());
    run_with(client, driver, disks, config).await;
}

/// Runs the compute agent until it is dropped: registers the node (as the hypervisor type the
/// driver runs), heartbeats, reconciles the Servers placed on it, and sweeps away guests
/// nothing owns any more and the cached images none of its guests uses.
pub async fn run_with(
    client: Client,
    hypervisor: Arc<dyn DomainDriver>,
    disks: Arc<dyn Disks>,
    config: Config,
) {
    let ctx = Arc::new(server::Ctx {
        recorder: Recorder::new(
            client.clone(),
            Reporter {
                controller: "stratus-compute-agent".into(),
                instance: Some(config.node.clone()),
            },
        ),
        images: Arc::new(ImageCache::new(
            config.state_dir.join("images"),
            config.image_policy.clone(),
        )),
        client: client.clone(),
        runtime: stratus_runtime::Runtime::new(client.clone(), "stratus-compute-agent"),
        driver: Arc::clone(&hypervisor),
        disks,
        config: config.clone(),
    });
    // libvirt's lifecycle events make a guest changed behind Stratus's back (destroyed,
    // undefined, crashed, powered off) be looked at at once; without them, every `resync`.
    let (tx, events) = tokio::sync::mpsc::unbounded_channel();
    let hv = Arc::clone(&hypervisor);
    match tokio::task::spawn_blocking(move || hv.subscribe(tx)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "no domain events; guests are only polled"),
        Err(e) => tracing::warn!(error = %e, "no domain events; guests are only polled"),
    }
    let (servers, reconcile) = server::controller(Arc::clone(&ctx), events);
    let placed = servers.clone();
    let consoles = console::run(
        client.clone(),
        servers.clone(),
        config.node.clone(),
        config.state_dir.clone(),
    );
    let heartbeat = node::run(client, hypervisor, config, servers);
    let sweeper = async {
        let mut tick = tokio::time::interval(SWEEP);
        loop {
            tick.tick().await;
            match server::sweep(&ctx).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(removed = n, "removed guests whose servers are gone"),
                Err(e) => tracing::warn!(error = %e, "sweep failed"),
            }
            match images::sweep(&ctx.images, &ctx.driver, &placed).await {
                Ok(gone) if gone.is_empty() => {}
                Ok(gone) => tracing::info!(images = ?gone, "removed cached images no guest uses"),
                Err(e) => tracing::warn!(error = %e, "image cache sweep failed"),
            }
        }
    };
    tokio::select! {
        () = reconcile => tracing::warn!("the server controller stopped"),
        () = heartbeat => {}
        () = sweeper => {}
        () = consoles => {}
    }
}
