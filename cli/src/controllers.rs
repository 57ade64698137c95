//! `stratus controllers`: the cluster-wide reconcilers, against any API server.

use std::path::PathBuf;

use anyhow::{Context, Result};

/// Options of `stratus controllers`.
#[derive(Debug, clap::Args)]
pub struct ControllersArgs {
    /// kubeconfig of the controllers' identity (defaults to $KUBECONFIG or ~/.kube/config).
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// Seconds the leader holds its Lease without renewing it before a standby takes over.
    #[arg(long, default_value_t = 15)]
    pub lease_seconds: u64,
    /// How the scheduler orders hypervisors a server fits on: `spread` (most free RAM first)
    /// or `pack` (fill one hypervisor before the next).
    #[arg(long, default_value = "spread", value_parser = ["spread", "pack"])]
    pub weigher: String,
    /// Where the image controller keeps the image data it downloads and verifies.
    #[arg(long, default_value = "/var/lib/stratus/images")]
    pub image_dir: PathBuf,
}

/// A client from a kubeconfig file, or the one kubectl would use.
pub async fn client(kubeconfig: Option<PathBuf>) -> Result<kube::Client> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(&path)
                .with_context(|| format!("read {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &Default::default())
                .await
                .context("load kubeconfig")?
        }
        None => kube::Config::infer().await.context("find a kubeconfig")?,
    };
    kube::Client::try_from(config).context("build the API client")
}

/// Runs every controller until it fails.
pub async fn run(args: ControllersArgs) -> Result<()> {
    let weigher = if args.weigher == "pack" {
        stratus_controllers::scheduler::Weigher::Pack
    } else {
        stratus_controllers::scheduler::Weigher::Spread
    };
    run_with_client(
        client(args.kubeconfig).await?,
        args.lease_seconds,
        weigher,
        args.image_dir,
    )
    .await
}

/// Runs every controller with the credentials of a kubeconfig file.
/// (`stratus up` is the only candidate for the Lease, so a short one lets a restarted cloud
/// take its controllers back quickly.)
pub async fn run_with_kubeconfig(path: PathBuf, image_dir: PathBuf) -> Result<()> {
    run_with_client(
        client(Some(path)).await?,
        4,
        stratus_controllers::scheduler::Weigher::Spread,
        image_dir,
    )
    .await
}

/// Runs the controllers, starting them again (after a growing pause) whenever they stop with
/// an error, so a slow API server at start-up or a transient failure does not leave the cloud
/// without them.
async fn run_with_client(
    client: kube::Client,
    lease_seconds: u64,
    weigher: stratus_controllers::scheduler::Weigher,
    image_dir: PathBuf,
) -> Result<()> {
    let mut election = stratus_controllers::Election::new(lease_seconds);
    election.weigher = weigher;
    election.image_dir = image_dir;
    let mut pause = std::time::Duration::from_millis(200);
    loop {
        match stratus_controllers::run(client.clone(), election.clone()).await {
            // The controllers never finish on their own: one that stopped is started again.
            Ok(()) => tracing::warn!("controllers stopped; restarting"),
            Err(e) => {
                let e = anyhow::Error::new(e).context("run the controllers");
                tracing::error!(error = format!("{e:#}"), "controllers stopped; restarting");
            }
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(std::time::Duration::from_secs(10));
    }
}
