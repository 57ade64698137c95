//! `stratus agent`: one node's agents (compute now), against an API server.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use stratus_agents::compute::driver::libvirt::Libvirt;

/// Options of `stratus agent`.
#[derive(Debug, clap::Args)]
pub struct AgentArgs {
    /// The node's name (its Hypervisor object; the agent's identity is `system:node:NAME`).
    #[arg(long)]
    pub node: String,
    /// kubeconfig of the node's identity (defaults to the files $KUBECONFIG lists, then
    /// ~/.kube/config).
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// libvirt connection URI: `qemu:///system`, a socket of its own
    /// (`qemu:///system?socket=PATH`), or `test:///default` for scale runs without guests.
    #[arg(long, default_value = "qemu:///system")]
    pub libvirt_uri: String,
    /// Where the image cache and the guests' disks, config drives and console logs live.
    #[arg(long, default_value = "/var/lib/stratus")]
    pub state_dir: PathBuf,
    /// Availability zone the node registers in.
    #[arg(long, default_value = "nova")]
    pub zone: String,
    /// Seconds between heartbeats; the node is NotReady after missing four.
    #[arg(long, default_value_t = 10)]
    pub heartbeat_seconds: u64,
    /// Seconds between reads of each guest's state from libvirt. libvirt's domain events
    /// already report changes at once; this is the safety net for a missed one.
    #[arg(long, default_value_t = 10)]
    pub resync_seconds: u64,
    /// What the node's image cache may fetch.
    #[command(flatten)]
    pub images: crate::image_policy::ImagePolicyArgs,
}

/// Runs the node's agents until Ctrl-C or SIGTERM.
pub async fn run(args: AgentArgs) -> Result<()> {
    let kube_config = crate::kubeconfig::Kubeconfig::locate(args.kubeconfig.as_deref())?
        .config()
        .await?;
    let image_policy = args
        .images
        .policy(crate::image_policy::api_server_addrs(&kube_config).await);
    let client = kube::Client::try_from(kube_config).context("build the API client")?;
    std::fs::create_dir_all(&args.state_dir)
        .with_context(|| format!("create {}", args.state_dir.display()))?;
    let uri = args.libvirt_uri.clone();
    let libvirt = tokio::task::spawn_blocking(move || Libvirt::connect(&uri))
        .await
        .context("connect to libvirt")?
        .with_context(|| format!("connect to libvirt at {}", args.libvirt_uri))?;
    let config = stratus_agents::compute::Config {
        node: args.node,
        state_dir: std::path::absolute(&args.state_dir).context("resolve the state directory")?,
        zone: args.zone,
        heartbeat: std::time::Duration::from_secs(args.heartbeat_seconds.max(1)),
        resync: std::time::Duration::from_secs(args.resync_seconds.max(1)),
        image_policy,
    };
    tracing::info!(node = %config.node, uri = %args.libvirt_uri, "compute agent starting");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("install SIGTERM handler")?;
    tokio::select! {
        () = stratus_agents::compute::run(client, Arc::new(libvirt), config) => {}
        _ = tokio::signal::ctrl_c() => tracing::info!("interrupted"),
        _ = term.recv() => tracing::info!("terminated"),
    }
    Ok(())
}
