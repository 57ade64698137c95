//! `stratus controllers`: the cluster-wide reconcilers, against any API server.

use std::path::PathBuf;

use anyhow::{Context, Result};
use stratus_controllers::image_store::DataWriter;
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
    /// Keep the data of each Image with a URL source, once downloaded and verified, in the
    /// cloud's object store (the API server's --object-store-url): nodes then read it from the
    /// API server, and the URL is fetched once.
    #[arg(long)]
    pub store_url_images: bool,
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
    let store = args
        .store_url_images
        .then(|| DataWriter::new(config.clone()));
    let client = stratus_runtime::client::client(config).context("build the API client")?;
    run_with_client(
        client,
        args.lease_seconds,
        args.weigher.into(),
        (args.image_dir, policy, store),
    )
    .await
}

/// Runs every controller with the credentials of a kubeconfig file (keeping URL sources'
/// image data in the object store with `store_url_images`).
/// (`stratus up` is the only candidate for the Lease, so a short one lets a restarted cloud
/// take its controllers back quickly.)
pub async fn run_with_kubeconfig(
    path: PathBuf,
    image_dir: PathBuf,
    images: ImagePolicyArgs,
    store_url_images: bool,
) -> Result<()> {
    let config = Kubeconfig::file(&path).config().await?;
    let policy = images.policy(api_server_addrs(&config).await);
    let store = store_url_images.then(|| DataWriter::new(config.clone()));
    let client = stratus_runtime::client::client(config).context("build the API client")?;
    run_with_client(client, 4, Weigher::Spread, (image_dir, policy, store)).await
}

/// Runs the controllers, starting them again (after a growing pause) whenever they stop with
/// an error, so a slow API server at start-up or a transient failure does not leave the cloud
/// without them.
async fn run_with_client(
    client: kube::Client,
    lease_seconds: u64,
    weigher: Weigher,
    (image_dir, image_policy, image_store): (
        PathBuf,
        stratus_image_cache::Policy,
        Option<DataWriter>,
    ),
) -> Result<()> {
    let mut election = stratus_controllers::Election::new(lease_seconds);
    election.weigher = weigher;
    election.image_dir = image_dir;
    election.image_policy = image_policy;
    election.image_store = image_store;
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
