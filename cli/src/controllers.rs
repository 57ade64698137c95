//! `stratus controllers`: the cluster-wide reconcilers, against any API server.

use std::path::PathBuf;

use anyhow::{Context, Result};
use stratus_controllers::scheduler::Weigher;

use crate::image_policy::{ImagePolicyArgs, api_server_addrs};
use crate::kubeconfig::Kubeconfig;

/// Options of `stratus controllers`.
#[derive(Debug, clap::Args)]
pub struct ControllersArgs {
    /// kubeconfig of the controllers' identity (defaults to the files $KUBECONFIG lists, then
    /// ~/.kube/config).
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// Seconds the leader holds its Lease without renewing it before a standby takes over.
    #[arg(long, default_value_t = 15)]
    pub lease_seconds: u64,
    /// How the scheduler orders hypervisors a server fits on.
    #[arg(long, value_enum, default_value_t = WeigherArg::Spread)]
    pub weigher: WeigherArg,
    /// Where the image controller keeps the image data it downloads and verifies.
    #[arg(long, default_value = "/var/lib/stratus/images")]
    pub image_dir: PathBuf,
    /// What the image controller may fetch.
    #[command(flatten)]
    pub images: ImagePolicyArgs,
}

/// `--weigher`: the scheduler's [`Weigher`], named on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum WeigherArg {
    /// Most free RAM first: spreads servers over hypervisors.
    Spread,
    /// Least free RAM first: fills one hypervisor before the next.
    Pack,
}

impl From<WeigherArg> for Weigher {
    fn from(w: WeigherArg) -> Self {
        match w {
            WeigherArg::Spread => Self::Spread,
            WeigherArg::Pack => Self::Pack,
        }
    }
}

/// Runs every controller until it fails.
pub async fn run(args: ControllersArgs) -> Result<()> {
    let config = Kubeconfig::locate(args.kubeconfig.as_deref())?
        .config()
        .await?;
    let policy = args.images.policy(api_server_addrs(&config).await);
    let client = kube::Client::try_from(config).context("build the API client")?;
    run_with_client(
        client,
        args.lease_seconds,
        args.weigher.into(),
        args.image_dir,
        policy,
    )
    .await
}

/// Runs every controller with the credentials of a kubeconfig file.
/// (`stratus up` is the only candidate for the Lease, so a short one lets a restarted cloud
/// take its controllers back quickly.)
pub async fn run_with_kubeconfig(
    path: PathBuf,
    image_dir: PathBuf,
    images: ImagePolicyArgs,
) -> Result<()> {
    let config = Kubeconfig::file(&path).config().await?;
    let policy = images.policy(api_server_addrs(&config).await);
    let client = kube::Client::try_from(config).context("build the API client")?;
    run_with_client(client, 4, Weigher::Spread, image_dir, policy).await
}

/// Runs the controllers, starting them again (after a growing pause) whenever they stop with
/// an error, so a slow API server at start-up or a transient failure does not leave the cloud
/// without them.
async fn run_with_client(
    client: kube::Client,
    lease_seconds: u64,
    weigher: Weigher,
    image_dir: PathBuf,
    image_policy: stratus_image_cache::Policy,
) -> Result<()> {
    let mut election = stratus_controllers::Election::new(lease_seconds);
    election.weigher = weigher;
    election.image_dir = image_dir;
    election.image_policy = image_policy;
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
