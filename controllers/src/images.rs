//! The image controller: downloads each Image's data once (as Glance's web-download import
//! does), verifies it against `spec.sha256`, and reports its size and checksum in status:
//! `Active` when verified, `Error` with a reason when not. Nodes still verify what they cache.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use kube::Client;
use kube::api::Api;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::watcher;
use stratus_api_types::common::ConditionType;
use stratus_api_types::image::{Image, ImagePhase};
use stratus_image_cache::{ImageCache, ImageError};
use stratus_runtime::policy::kube_retry;
use stratus_runtime::{Classify, Retry, Runtime};

/// The field manager of the image controller's status writes.
const MANAGER: &str = "stratus-image-controller";

/// Why a reconcile failed, and whether retrying can help.
#[derive(Debug, thiserror::Error)]
pub enum ImagesError {
    /// A request to the API server failed.
    #[error("request to the API server")]
    Api(#[source] kube::Error),
    /// The download task panicked (a bug).
    #[error("download task failed")]
    Join(#[from] tokio::task::JoinError),
}

impl Classify for ImagesError {
    fn retry(&self) -> Retry {
        match self {
            Self::Api(e) => kube_retry(e),
            Self::Join(_) => Retry::Never,
        }
    }
}

struct Ctx {
    runtime: Runtime<Image>,
    cache: Arc<ImageCache>,
}

async fn reconcile(image: Arc<Image>, ctx: Arc<Ctx>) -> Result<Action, ImagesError> {
    let result = verify(&image, &ctx).await;
    ctx.runtime.finish(&image, result).await
}

async fn verify(image: &Image, ctx: &Ctx) -> Result<Action, ImagesError> {
    let generation = image.metadata.generation;
    let current = image.status.clone().unwrap_or_default();
    // A verified image, or one whose data is wrong, is done until its spec changes; a failed
    // download is tried again.
    let wrong_data = ConditionType::Verified
        .find(&current.conditions)
        .is_some_and(|c| c.reason == CHECKSUM_MISMATCH);
    let settled =
        current.phase == ImagePhase::Active || (current.phase == ImagePhase::Error && wrong_data);
    if image.metadata.deletion_timestamp.is_some()
        || (settled && current.observed_generation == generation)
    {
        return Ok(Action::await_change());
    }
    // Downloading is shown for a first try (of this generation), not for every retry.
    let first_try =
        current.observed_generation != generation || current.phase == ImagePhase::Pending;
    let mut status = current.clone();
    // What the status is now, for the last write to send what differs from it.
    let mut written = image.clone();
    if first_try && current.phase != ImagePhase::Downloading {
        status.phase = ImagePhase::Downloading;
        status.observed_generation = generation;
        ctx.runtime
            .write_status(image, &status)
            .await
            .map_err(ImagesError::Api)?;
        written.status = Some(status.clone());
    }
    let cache = Arc::clone(&ctx.cache);
    let url = image.spec.source.url.clone();
    let sum = image.spec.sha256.clone();
    let got = stratus_runtime::blocking(move || cache.fetch(&url, sum.as_deref())).await?;
    let mut next = Action::await_change();
    status.observed_generation = generation;
    match got {
        Ok(c) => {
            let how = if image.spec.sha256.is_some() {
                "the data matches spec.sha256"
            } else {
                "no checksum given; the data's checksum is recorded"
            };
            status.phase = ImagePhase::Active;
            status.size_bytes = Some(c.size);
            status.sha256 = Some(c.sha256);
            ConditionType::Verified
                .yes("Verified", how)
                .set(&mut status.conditions, generation);
            ConditionType::Ready
                .yes("Active", "servers can boot from it")
                .set(&mut status.conditions, generation);
        }
        Err(e) => {
            let (reason, message) = match &e {
                ImageError::ChecksumMismatch { expected, actual } => (
                    CHECKSUM_MISMATCH,
                    format!("the data's sha256 is {actual}, not {expected}"),
                ),
                other => {
                    next = Action::requeue(Duration::from_secs(30));
                    ("DownloadFailed", stratus_runtime::policy::chain(other))
                }
            };
            status.phase = ImagePhase::Error;
            ConditionType::Verified
                .no(reason, message.clone())
                .set(&mut status.conditions, generation);
            ConditionType::Ready
                .no(reason, message)
                .set(&mut status.conditions, generation);
        }
    }
    // A retry that fails the same way changes nothing, and writes nothing.
    ctx.runtime
        .write_status(&written, &status)
        .await
        .map_err(ImagesError::Api)?;
    Ok(next)
}

/// Reason of a `Verified=False` for data whose digest is not `spec.sha256`: final until the
/// spec changes.
const CHECKSUM_MISMATCH: &str = "ChecksumMismatch";

fn error_policy(image: Arc<Image>, e: &ImagesError, ctx: Arc<Ctx>) -> Action {
    ctx.runtime.error_policy(&image, e)
}

/// Runs the image controller, caching image data under `dir`, until its watch ends.
pub async fn run(client: Client, dir: PathBuf) {
    let ctx = Arc::new(Ctx {
        runtime: Runtime::new(client.clone(), MANAGER),
        cache: Arc::new(ImageCache::new(dir)),
    });
    Controller::new(Api::<Image>::all(client), watcher::Config::default())
        .run(reconcile, error_policy, ctx)
        .for_each(|_| async {})
        .await;
}
