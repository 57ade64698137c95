//! Keeps the data of a URL-sourced Image the image controller downloaded and verified in the
//! cloud's object store, through the API server (`PUT images/NAME/data`, which checks it again
//! and keeps it in the image store's account): nodes then read it from the API server
//! (`GET images/NAME/data`) rather than from the URL, which may since have gone.
//!
//! # Guarantees
//! - The data is streamed from the controller's cache file, never held whole in memory.
//! - The request carries the controllers' own credentials (their kubeconfig) and nothing of
//!   the image's URL; it ends within [`STORE_DEADLINE`].

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Limited, StreamBody};
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::rt::TokioExecutor;
use kube::client::ConfigExt as _;
use stratus_api_types::image::Image;
use tokio::io::AsyncReadExt as _;

/// The longest one image's data may take to reach the object store (as an upload's).
pub const STORE_DEADLINE: Duration = Duration::from_secs(3 * 3600);
/// The largest piece of data sent at once.
const CHUNK: usize = 256 * 1024;
/// The most of an error answer read, for its message.
const MAX_ANSWER: usize = 64 * 1024;

/// Why the data was not stored.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The HTTP client could not be made from the kubeconfig.
    #[error("make the API client")]
    Client(#[source] kube::Error),
    /// The cached data could not be read.
    #[error("read the cached image data")]
    Read(#[source] std::io::Error),
    /// The request could not be made.
    #[error("build the request")]
    Request(#[source] http::Error),
    /// The API server could not be reached, or the request broke off.
    #[error("send the data to the API server")]
    Send(#[source] tower::BoxError),
    /// The API server refused the data.
    #[error("the API server answered {code}: {message}")]
    Refused {
        /// The HTTP status.
        code: u16,
        /// Its `Status` message.
        message: String,
    },
    /// It took longer than [`STORE_DEADLINE`].
    #[error("not stored within {} s", STORE_DEADLINE.as_secs())]
    Timeout,
}

/// The HTTP client's error, as the auth layer's (a named function: a generic one leaves the
/// upload's future short of `Send` for every lifetime).
fn boxed(e: hyper_util::client::legacy::Error) -> tower::BoxError {
    Box::new(e)
}

/// Sends image data to the API server with the controllers' credentials.
#[derive(Clone)]
pub struct DataWriter {
    config: kube::Config,
}

impl std::fmt::Debug for DataWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataWriter")
            .field("cluster_url", &self.config.cluster_url.to_string())
            .finish_non_exhaustive()
    }
}

impl DataWriter {
    /// A writer with the credentials and TLS settings of `config` (the controllers' own).
    pub fn new(config: kube::Config) -> Self {
        Self { config }
    }

    /// Sends the `size` bytes at `path` as `image`'s data (`PUT images/NAME/data`).
    ///
    /// # Errors
    /// [`StoreError`]: what the API server answered (e.g. 503 without an object store, 413
    /// over its size limit, 409 for an Image that went Active or was made anew meanwhile),
    /// or why it was not reached.
    pub async fn put(&self, image: &Image, path: &Path, size: u64) -> Result<(), StoreError> {
        tokio::time::timeout(STORE_DEADLINE, self.send(image, path, size))
            .await
            .unwrap_or(Err(StoreError::Timeout))
    }

    async fn send(&self, image: &Image, path: &Path, size: u64) -> Result<(), StoreError> {
        use tower::ServiceExt as _;
        let ns = image.metadata.namespace.as_deref().unwrap_or_default();
        let name = image.metadata.name.as_deref().unwrap_or_default();
        let connector = self
            .config
            .rustls_https_connector()
            .map_err(StoreError::Client)?;
        let http = HttpClient::builder(TokioExecutor::new()).build(connector);
        let service = tower::ServiceBuilder::new()
            .layer(self.config.base_uri_layer())
            .option_layer(self.config.auth_layer().map_err(StoreError::Client)?)
            // One error type under the auth layer's two kinds, as kube's own client has.
            .map_err(boxed)
            .service(http);
        let file = tokio::fs::File::open(path)
            .await
            .map_err(StoreError::Read)?;
        let chunks = futures::stream::try_unfold(file, |mut file| async move {
            let mut buf = vec![0u8; CHUNK];
            let n = file.read(&mut buf).await?;
            if n == 0 {
                return Ok(None);
            }
            buf.truncate(n);
            Ok::<_, std::io::Error>(Some((http_body::Frame::data(Bytes::from(buf)), file)))
        });
        let request = http::Request::put(format!(
            "/apis/image.stratus.dev/v1/namespaces/{ns}/images/{name}/data"
        ))
        .header(http::header::CONTENT_TYPE, "application/octet-stream")
        .header(http::header::CONTENT_LENGTH, size)
        .body(StreamBody::new(Box::pin(chunks)))
        .map_err(StoreError::Request)?;
        let response = service.oneshot(request).await.map_err(StoreError::Send)?;
        let code = response.status();
        if code.is_success() {
            return Ok(());
        }
        let answer = Limited::new(response.into_body(), MAX_ANSWER)
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let message = serde_json::from_slice::<serde_json::Value>(&answer)
            .ok()
            .and_then(|v| v.get("message")?.as_str().map(str::to_owned))
            .unwrap_or_else(|| code.canonical_reason().unwrap_or_default().to_owned());
        Err(StoreError::Refused {
            code: code.as_u16(),
            message,
        })
    }
}
