//! The image controller: downloads each Image's data once (as Glance's web-download import
//! does), verifies it against `spec.sha256`, and reports its size and checksum in status:
//! `Active` when verified, `Error` with a reason when not. Nodes still verify what they cache.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use serde_json::json;
use stratus_api_types::common::{Time, set_condition};
use stratus_api_types::image::{Image, ImagePhase};
use stratus_image_cache::{ImageCache, ImageError};

/// Why a reconcile failed; every one may succeed on retry.
#[derive(Debug, thiserror::Error)]
pub enum ImagesError {
    /// A request to the API server failed.
    #[error("request to the API server")]
    Api(#[source] kube::Error),
    /// The download task panicked (a bug).
    #[error("download task failed")]
    Join(#[from] tokio::task::JoinError),
    /// An Image without a namespace (a bug elsewhere: Image is namespaced).
    #[error("image has no namespace")]
    NoNamespace,
}

struct Ctx {
    client: Client,
    cache: Arc<ImageCache>,
}

async fn write(ctx: &Ctx, image: &Image, status: serde_json::Value) -> Result<(), ImagesError> {
    let ns = image.namespace().ok_or(ImagesError::NoNamespace)?;
    Api::<Image>::namespaced(ctx.client.clone(), &ns)
        .patch_status(
            &image.name_any(),
            &PatchParams::default(),
            &Patch::Merge(json!({ "status": status })),
        )
        .await
        .map_err(ImagesError::Api)?;
    Ok(())
}

async fn reconcile(image: Arc<Image>, ctx: Arc<Ctx>) -> Result<Action, ImagesError> {
    let generation = image.metadata.generation;
    let current = image.status.clone().unwrap_or_default();
    // A verified image, or one whose data is wrong, is done until its spec changes; a failed
    // download is tried again.
    let wrong_data = current
        .conditions
        .iter()
        .any(|c| c.type_ == "Verified" && c.reason == "ChecksumMismatch");
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
    if first_try && current.phase != ImagePhase::Downloading {
        write(
            &ctx,
            &image,
            json!({"phase": "Downloading", "observedGeneration": generation}),
        )
        .await?;
    }
    let cache = Arc::clone(&ctx.cache);
    let url = image.spec.source.url.clone();
    let sum = image.spec.sha256.clone();
    let got = tokio::task::spawn_blocking(move || cache.fetch(&url, sum.as_deref())).await?;
    let mut conditions = current.conditions.clone();
    let now = Time(jiff::Timestamp::now());
    let mut next = Action::await_change();
    let status = match got {
        Ok(c) => {
            let how = if image.spec.sha256.is_some() {
                "the data matches spec.sha256"
            } else {
                "no checksum given; the data's checksum is recorded"
            };
            set_condition(
                &mut conditions,
                "Verified",
                true,
                "Verified",
                how,
                generation,
                now.clone(),
            );
            set_condition(
                &mut conditions,
                "Ready",
                true,
                "Active",
                "servers can boot from it",
                generation,
                now,
            );
            json!({"phase": "Active", "sizeBytes": c.size, "sha256": c.sha256,
                   "conditions": conditions, "observedGeneration": generation})
        }
        Err(e) => {
            let (reason, message) = match &e {
                ImageError::ChecksumMismatch { expected, actual } => (
                    "ChecksumMismatch",
                    format!("the data's sha256 is {actual}, not {expected}"),
                ),
                other => {
                    next = Action::requeue(Duration::from_secs(30));
                    ("DownloadFailed", other.to_string())
                }
            };
            set_condition(
                &mut conditions,
                "Verified",
                false,
                reason,
                &message,
                generation,
                now.clone(),
            );
            set_condition(
                &mut conditions,
                "Ready",
                false,
                reason,
                &message,
                generation,
                now,
            );
            json!({"phase": "Error", "conditions": conditions, "observedGeneration": generation})
        }
    };
    // A retry that fails the same way changes nothing.
    let before = serde_json::to_value(&current).unwrap_or_default();
    let unchanged = [
        "phase",
        "conditions",
        "observedGeneration",
        "sha256",
        "sizeBytes",
    ]
    .iter()
    .all(|k| before.get(k) == status.get(k));
    if !unchanged {
        write(&ctx, &image, status).await?;
    }
    Ok(next)
}

fn error_policy(_i: Arc<Image>, e: &ImagesError, _ctx: Arc<Ctx>) -> Action {
    tracing::warn!(error = %e, "image reconcile failed; retrying");
    Action::requeue(Duration::from_secs(5))
}

/// Runs the image controller, caching image data under `dir`, until its watch ends.
pub async fn run(client: Client, dir: PathBuf) {
    let ctx = Arc::new(Ctx {
        client: client.clone(),
        cache: Arc::new(ImageCache::new(dir)),
    });
    Controller::new(Api::<Image>::all(client), watcher::Config::default())
        .run(reconcile, error_policy, ctx)
        .for_each(|_| async {})
        .await;
}
