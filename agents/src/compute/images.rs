//! The node's image cache kept to what its guests use: each Server pins the Images its guest
//! is built from (before they are fetched), and a periodic sweep drops the pins of Servers
//! that are neither placed on the node nor running here, and removes the data of Images no
//! pin is left on (a deleted Image's data goes with its last guest).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use kube::ResourceExt;
use kube::runtime::reflector::Store;
use stratus_api_types::compute::Server;
use stratus_image_cache::{ImageCache, ImageError};

use super::driver::{DomainDriver, DomainInfo, DriverError};

/// How long a sweep waits for the agent's Servers to be listed before it passes its turn.
const READY_WAIT: Duration = Duration::from_secs(2);

/// Failures of a sweep of the image cache (all retried on the next pass).
#[derive(Debug, thiserror::Error)]
pub enum SweepError {
    /// The guests could not be listed.
    #[error("list the guests")]
    Driver(#[from] DriverError),
    /// The cache could not be swept.
    #[error("sweep the image cache")]
    Cache(#[from] ImageError),
    /// A blocking task panicked (a bug).
    #[error("blocking task failed")]
    Join(#[from] tokio::task::JoinError),
}

/// The Servers whose images the node keeps: those placed on it (`placed`: the agent's
/// Servers, all placed on the node) and those whose guest is defined here (a guest outlives
/// its Server until it is torn down).
pub fn users(placed: &[Arc<Server>], guests: &[DomainInfo]) -> HashSet<String> {
    placed
        .iter()
        .filter_map(|s| s.uid())
        .chain(
            guests
                .iter()
                .filter_map(|d| Some(d.owner.as_ref()?.uid.clone())),
        )
        .collect()
}

/// One pass: removes the cached data of every Image no Server in [`users`] uses any more
/// (see [`ImageCache::sweep`]); answers the uids of the Images removed. Until the agent's
/// Servers are listed it removes nothing (waiting a little), so a Server placed here is never
/// taken for gone.
///
/// # Errors
/// Listing the guests or sweeping the cache failed; nothing is removed for a guest list
/// that could not be read.
pub async fn sweep(
    cache: &Arc<ImageCache>,
    driver: &Arc<dyn DomainDriver>,
    servers: &Store<Server>,
) -> Result<Vec<String>, SweepError> {
    if tokio::time::timeout(READY_WAIT, stratus_runtime::store_ready(servers))
        .await
        .is_err()
    {
        return Ok(Vec::new());
    }
    let d = Arc::clone(driver);
    let guests = tokio::task::spawn_blocking(move || d.list()).await??;
    // Listed after the guests: a Server placed meanwhile is in it, and one whose guest was
    // defined just before is placed.
    let users = users(&servers.state(), &guests);
    let c = Arc::clone(cache);
    Ok(tokio::task::spawn_blocking(move || c.sweep(|u| users.contains(u))).await??)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use serde_json::json;
    use stratus_image_cache::{Format, Policy, Request};

    use super::super::driver::conformance;
    use super::super::driver::fake::FakeDomains;
    use super::*;

    fn server(uid: &str) -> Arc<Server> {
        Arc::new(
            serde_json::from_value(json!({
                "apiVersion": "compute.stratus.dev/v1", "kind": "Server",
                "metadata": {"name": "web", "namespace": "demo", "uid": uid},
                "spec": {"flavor": "m1.tiny", "image": "tiny"},
                "status": {"hypervisor": "n1"}
            }))
            .expect("a server"),
        )
    }

    /// Image `image`'s data in `cache`, pinned by `user` and fetched as the agent does.
    fn cached(cache: &ImageCache, src: &Path, image: &str, user: &str) -> std::path::PathBuf {
        cache.pin(image, user).expect("pin");
        let url = url::Url::from_file_path(src).expect("absolute").to_string();
        cache
            .fetch(&Request {
                uid: image,
                url: &url,
                sha256: None,
                format: Format::Raw,
            })
            .expect("fetch")
            .path
    }

    #[tokio::test]
    async fn an_images_data_goes_with_the_last_guest_using_it() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let src = tmp.path().join("disk.raw");
        std::fs::write(&src, b"bytes of a disk").expect("write");
        let cache = Arc::new(ImageCache::new(
            tmp.path().join("images"),
            Policy {
                allow_file: true,
                ..Policy::default()
            },
        ));
        let fake = Arc::new(FakeDomains::default());
        let driver: Arc<dyn DomainDriver> = fake.clone();
        let (reader, mut writer) = kube::runtime::reflector::store::<Server>();
        writer.apply_watcher_event(&kube::runtime::watcher::Event::Init);
        writer.apply_watcher_event(&kube::runtime::watcher::Event::InitDone);

        // Server s1's guest runs here from image i1; s2 is placed here (its guest not built
        // yet) and pinned image i2; image i3's only user, s3, is gone.
        let i1 = cached(&cache, &src, "i1", "s1");
        let i2 = cached(&cache, &src, "i2", "s2");
        let i3 = cached(&cache, &src, "i3", "s3");
        driver
            .define(&conformance::spec("stratus-s1", "s1", tmp.path()))
            .expect("define");
        writer.apply_watcher_event(&kube::runtime::watcher::Event::Apply(
            (*server("s2")).clone(),
        ));

        let removed = sweep(&cache, &driver, &reader).await.expect("sweep");
        assert_eq!(removed, ["i3"]);
        assert!(i1.is_file() && i2.is_file());
        assert!(!i3.exists());

        // s1's guest is torn down and s2 leaves the node: their images go.
        driver.undefine("stratus-s1").expect("undefine");
        writer.apply_watcher_event(&kube::runtime::watcher::Event::Delete(
            (*server("s2")).clone(),
        ));
        let mut removed = sweep(&cache, &driver, &reader).await.expect("sweep");
        removed.sort();
        assert_eq!(removed, ["i1", "i2"]);
        assert!(!i1.exists() && !i2.exists());
        assert!(
            sweep(&cache, &driver, &reader)
                .await
                .expect("sweep")
                .is_empty()
        );
    }

    #[tokio::test]
    async fn no_sweep_before_the_servers_are_listed() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let src = tmp.path().join("disk.raw");
        std::fs::write(&src, b"bytes of a disk").expect("write");
        let cache = Arc::new(ImageCache::new(
            tmp.path().join("images"),
            Policy {
                allow_file: true,
                ..Policy::default()
            },
        ));
        let driver: Arc<dyn DomainDriver> = Arc::new(FakeDomains::default());
        let (reader, _writer) = kube::runtime::reflector::store::<Server>();
        let i1 = cached(&cache, &src, "i1", "s1");
        assert!(
            sweep(&cache, &driver, &reader)
                .await
                .expect("sweep")
                .is_empty()
        );
        assert!(i1.is_file(), "s1 may be placed here: not known yet");
    }

    #[tokio::test]
    async fn no_sweep_when_the_guests_cannot_be_listed() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let src = tmp.path().join("disk.raw");
        std::fs::write(&src, b"bytes of a disk").expect("write");
        let cache = Arc::new(ImageCache::new(
            tmp.path().join("images"),
            Policy {
                allow_file: true,
                ..Policy::default()
            },
        ));
        let fake = Arc::new(FakeDomains::default());
        fake.fail(super::super::driver::fake::Verb::List, 1);
        let driver: Arc<dyn DomainDriver> = fake.clone();
        let (reader, mut writer) = kube::runtime::reflector::store::<Server>();
        writer.apply_watcher_event(&kube::runtime::watcher::Event::Init);
        writer.apply_watcher_event(&kube::runtime::watcher::Event::InitDone);
        let i1 = cached(&cache, &src, "i1", "s1");
        assert!(matches!(
            sweep(&cache, &driver, &reader).await,
            Err(SweepError::Driver(_))
        ));
        assert!(i1.is_file(), "kept while its guest may run");
    }
}
