//! The image controller: downloads each Image's data once (as Glance's web-download import
//! does) under the operator's URL policy, verifies it against `spec.sha256`, inspects it
//! (no backing file, data file or format other than declared), and reports its size and
//! checksum in status: `Active` when verified, `Error` with a reason when not. Nodes still
//! verify and inspect what they cache. An Image kept in the object store (`source.swift`) is
//! read through the API server (`images/NAME/data`), which reads it with a short-lived
//! read-only token of the Image's project, so it can only name its own project's objects.
//! With an object store (`stratus controllers --store-url-images`), a URL source's verified
//! data is then kept there through the API server ([`crate::image_store`]), which makes the
//! Image Active with `status.stored`: nodes read it from the API server, and the URL is
//! fetched once. An uploaded Image (`source.upload`) is the API server's: its upload verifies it and keeps
//! its data in the object store; once such an Image is deleted, the controller has the API
//! server remove that data (`DELETE images/NAME/data`), which releases the Image's
//! [`DATA_FINALIZER`].

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use kube::Client;
use kube::api::Api;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::watcher;
use stratus_api_types::common::{ConditionType, Reason};
use stratus_api_types::image::{DATA_FINALIZER, DiskFormat, Image, ImagePhase, ImageStatus};
use stratus_image_cache::{CachedImage, Format, ImageCache, ImageError, Policy, Unsafe};
use stratus_runtime::policy::kube_retry;
use stratus_runtime::{Classify, Retry, Runtime};

use crate::image_store::DataWriter;

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
    /// An Image without a uid (a bug elsewhere).
    #[error("image lacks a uid")]
    Incomplete,
}

impl Classify for ImagesError {
    fn retry(&self) -> Retry {
        match self {
            Self::Api(e) => kube_retry(e),
            Self::Join(_) | Self::Incomplete => Retry::Never,
        }
    }
}

struct Ctx {
    client: Client,
    runtime: Runtime<Image>,
    cache: Arc<ImageCache>,
    /// Where URL sources' verified data is kept, when the cloud has an object store.
    store: Option<DataWriter>,
}

async fn reconcile(image: Arc<Image>, ctx: Arc<Ctx>) -> Result<Action, ImagesError> {
    let result = verify(&image, &ctx).await;
    ctx.runtime.finish(&image, result).await
}

async fn verify(image: &Image, ctx: &Ctx) -> Result<Action, ImagesError> {
    // The data the API server keeps goes with its Image; the finalizer is the API server's
    // to drop once the data is gone (an upload under way is a 409: tried again).
    if stratus_runtime::finalizer::stage(image, DATA_FINALIZER)
        == stratus_runtime::finalizer::Stage::Cleanup
    {
        stratus_runtime::image_token::remove_data(&ctx.client, image)
            .await
            .map_err(ImagesError::Api)?;
        return Ok(Action::await_change());
    }
    let generation = image.metadata.generation;
    let current = image.status.clone().unwrap_or_default();
    // A verified image, or one whose data is wrong, is done until its spec changes; a failed
    // download is tried again.
    let wrong_data = ConditionType::Verified
        .find(&current.conditions)
        .and_then(|c| Reason::parse(&c.reason))
        .is_some_and(|r| FINAL_REASONS.contains(&r));
    let settled =
        current.phase == ImagePhase::Active || (current.phase == ImagePhase::Error && wrong_data);
    // An uploaded image's status is its upload's (`PUT images/NAME/data`, in the API server),
    // and so is a URL source's once its data is handed to the API server (`Uploading`, then
    // `status.stored`): a reconcile of an older copy must not write over what the API server
    // wrote since.
    if image.metadata.deletion_timestamp.is_some()
        || image.spec.source.upload.is_some()
        || current.phase == ImagePhase::Uploading
        || current.stored.is_some()
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
    let format = cache_format(image.spec.disk_format);
    let got = fetch(image, ctx, format).await?;
    let mut next = Action::await_change();
    status.observed_generation = generation;
    match got {
        Ok(c) if stores(ctx.store.is_some(), image, &current) => {
            match ctx.store.as_ref().map(|w| w.put(image, &c.path, c.size)) {
                // The API server checked the data again, kept it and made the Image Active
                // with where it is.
                Some(put) => match put.await {
                    Ok(()) => {
                        tracing::info!(size = c.size, "image data stored in the object store");
                        return Ok(Action::await_change());
                    }
                    // The Image went Active, or its upload is under way, since this copy
                    // of it was read: the API server's status stands; look again.
                    Err(crate::image_store::StoreError::Refused { code: 409, .. }) => {
                        return Ok(Action::requeue(Duration::from_secs(5)));
                    }
                    Err(e) => {
                        next = Action::requeue(Duration::from_secs(30));
                        let message = format!(
                            "the data was verified but not stored in the object store (tried again): {}",
                            stratus_runtime::policy::chain(&e)
                        );
                        status.phase = ImagePhase::Error;
                        ConditionType::Ready
                            .no(Reason::StoreFailed, message)
                            .set(&mut status.conditions, generation);
                    }
                },
                None => return Ok(Action::await_change()),
            }
        }
        Ok(c) => {
            let how = if image.spec.sha256.is_some() {
                "the data matches spec.sha256"
            } else {
                "no checksum given; the data's checksum is recorded"
            };
            let how = format!("{how}; inspected: a self-contained {format} image");
            status.phase = ImagePhase::Active;
            status.size_bytes = Some(c.size);
            status.sha256 = Some(c.sha256);
            ConditionType::Verified
                .yes(Reason::Verified, how)
                .set(&mut status.conditions, generation);
            ConditionType::Ready
                .yes(Reason::Active, "servers can boot from it")
                .set(&mut status.conditions, generation);
        }
        Err(Fetch::Served(e)) => {
            next = Action::requeue(Duration::from_secs(30));
            let message = format!(
                "the API server did not serve the object: {}",
                stratus_runtime::policy::chain(&e)
            );
            let reason = match &e {
                kube::Error::Api(s) if s.code == 404 => Reason::SourceNotFound,
                kube::Error::Api(s) if s.code == 403 => Reason::SourceForbidden,
                _ => Reason::DownloadFailed,
            };
            status.phase = ImagePhase::Error;
            ConditionType::Verified
                .no(reason, message.clone())
                .set(&mut status.conditions, generation);
            ConditionType::Ready
                .no(reason, message)
                .set(&mut status.conditions, generation);
        }
        Err(Fetch::Image(e)) => {
            let (reason, message) = refusal(&e);
            if !e.is_final() {
                next = Action::requeue(Duration::from_secs(30));
            }
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

/// Whether `image`'s verified data is to be kept in the object store: a URL source's, with a
/// store, not kept yet, and not already Active (an Image verified before without the store
/// keeps being fetched from its URL: its data cannot change once Active).
fn stores(has_store: bool, image: &Image, current: &ImageStatus) -> bool {
    has_store
        && image.spec.source.url.is_some()
        && current.stored.is_none()
        && current.phase != ImagePhase::Active
}

/// Why a fetch failed: the API server did not serve an object's data, or the fetch itself.
enum Fetch {
    Served(kube::Error),
    Image(ImageError),
}

/// The Image's data in the cache, from its URL or, through the API server
/// (`images/NAME/data`, which reads it with a token of the Image's project), from the object
/// store.
async fn fetch(
    image: &Image,
    ctx: &Ctx,
    format: Format,
) -> Result<Result<CachedImage, Fetch>, ImagesError> {
    let cache = Arc::clone(&ctx.cache);
    let uid = image.metadata.uid.clone().ok_or(ImagesError::Incomplete)?;
    let sum = image.spec.sha256.clone();
    let source = image.spec.source.clone();
    let data = match stratus_runtime::image_token::served_data(&ctx.client, image).await {
        Ok(d) => d,
        Err(e) => return Ok(Err(Fetch::Served(e))),
    };
    let got = stratus_runtime::blocking(move || {
        cache.fetch_source(&uid, &source, sum.as_deref(), format, data)
    })
    .await?;
    Ok(got.map_err(Fetch::Image))
}

/// Reasons of a `Verified=False` that are final until the spec changes: the data is wrong,
/// too large or refused by inspection.
const FINAL_REASONS: &[Reason] = &[
    Reason::ChecksumMismatch,
    Reason::DownloadTooLarge,
    Reason::BackingFile,
    Reason::DataFile,
    Reason::ProtocolFileName,
    Reason::FormatMismatch,
    Reason::VirtualSizeTooLarge,
    Reason::Unreadable,
];

/// The condition reason of data refused by inspection.
fn unsafe_reason(u: &Unsafe) -> Reason {
    match u {
        Unsafe::BackingFile(_) => Reason::BackingFile,
        Unsafe::DataFile(_) => Reason::DataFile,
        Unsafe::Protocol(_) => Reason::ProtocolFileName,
        Unsafe::FormatMismatch { .. } => Reason::FormatMismatch,
        Unsafe::VirtualSizeTooLarge { .. } => Reason::VirtualSizeTooLarge,
        Unsafe::Unreadable { .. } => Reason::Unreadable,
    }
}

/// The condition reason and message for a failed fetch.
fn refusal(e: &ImageError) -> (Reason, String) {
    match e {
        ImageError::ChecksumMismatch { expected, actual } => (
            Reason::ChecksumMismatch,
            format!("the data's sha256 is {actual}, not {expected}"),
        ),
        ImageError::TooLarge { limit, .. } => (
            Reason::DownloadTooLarge,
            format!("the data is larger than this cloud's limit of {limit} bytes"),
        ),
        ImageError::Unsafe(u) => (unsafe_reason(u), format!("the image data is refused: {u}")),
        ImageError::Refused { .. } => (Reason::UrlRefused, stratus_runtime::policy::chain(e)),
        ImageError::Inspect(_) => (Reason::InspectionFailed, stratus_runtime::policy::chain(e)),
        ImageError::ObjectStatus {
            code: 401 | 403, ..
        } => (
            Reason::SourceForbidden,
            format!("{e}: the object is not readable with a token of the image's project"),
        ),
        ImageError::ObjectStatus { code: 404, .. } => (
            Reason::SourceNotFound,
            format!("{e}: no such container or object in the image's project's account"),
        ),
        _ => (Reason::DownloadFailed, stratus_runtime::policy::chain(e)),
    }
}

/// The format the cache inspects an Image's data as.
pub fn cache_format(format: DiskFormat) -> Format {
    match format {
        DiskFormat::Qcow2 => Format::Qcow2,
        DiskFormat::Raw => Format::Raw,
        DiskFormat::Iso => Format::Iso,
        DiskFormat::Aki => Format::Kernel,
        DiskFormat::Ari => Format::Ramdisk,
    }
}

fn error_policy(image: Arc<Image>, e: &ImagesError, ctx: Arc<Ctx>) -> Action {
    ctx.runtime.error_policy(&image, e)
}

/// Runs the image controller, caching image data under `dir` fetched under `policy` (and
/// keeping URL sources' data in the object store through `store`, when given), until its
/// watch ends.
pub async fn run(client: Client, dir: PathBuf, policy: Policy, store: Option<DataWriter>) {
    let ctx = Arc::new(Ctx {
        client: client.clone(),
        runtime: Runtime::new(client.clone(), MANAGER),
        cache: Arc::new(ImageCache::new(dir, policy)),
        store,
    });
    Controller::new(Api::<Image>::all(client), watcher::Config::default())
        .run(reconcile, error_policy, ctx)
        .for_each(|_| async {})
        .await;
}

#[cfg(test)]
mod tests {
    use stratus_api_types::image::{ImageSource, ImageUpload, StoredObject};

    use super::*;

    #[test]
    fn only_a_url_sources_data_not_kept_yet_is_stored() {
        let image = |source: ImageSource| {
            let spec = serde_json::json!({"diskFormat": "qcow2", "source": source});
            Image::new("disk", serde_json::from_value(spec).expect("an ImageSpec"))
        };
        let url = image(ImageSource {
            url: Some("http://images.example/disk.qcow2".into()),
            ..ImageSource::default()
        });
        let upload = image(ImageSource {
            upload: Some(ImageUpload {}),
            ..ImageSource::default()
        });
        let downloading = ImageStatus {
            phase: ImagePhase::Downloading,
            ..ImageStatus::default()
        };
        let kept = ImageStatus {
            stored: Some(StoredObject {
                container: "stratus-images".into(),
                object: "uid".into(),
            }),
            ..downloading.clone()
        };
        let active = ImageStatus {
            phase: ImagePhase::Active,
            ..ImageStatus::default()
        };
        assert!(stores(true, &url, &downloading));
        assert!(stores(true, &url, &ImageStatus::default()));
        // No object store: fetched from its URL, as before.
        assert!(!stores(false, &url, &downloading));
        // Kept already, or Active without it (its data cannot change): not again.
        assert!(!stores(true, &url, &kept));
        assert!(!stores(true, &url, &active));
        // Not a URL source.
        assert!(!stores(true, &upload, &downloading));
    }
}
