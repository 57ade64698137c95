//! An Image's data as the API server serves it (`GET images/NAME/data`: an uploaded image, or
//! a `source.swift` object, read from the object store by the API server), and its removal
//! with its Image (`DELETE images/NAME/data`).

use std::io;

use kube::Client;
use stratus_api_types::image::Image;

/// Removes the data the API server keeps of the deleted Image `image` from the object store,
/// then the Image's data finalizer (`DELETE images/NAME/data`, for the controllers' identity).
///
/// # Guarantees
/// Idempotent: an Image without the finalizer, or gone, is answered `Ok`.
///
/// # Errors
/// What the API server answers: 409 while an upload of the Image is under way (retry), 503
/// when the object store does not delete.
pub async fn remove_data(client: &Client, image: &Image) -> Result<(), kube::Error> {
    let ns = image.metadata.namespace.as_deref().unwrap_or_default();
    let name = image.metadata.name.as_deref().unwrap_or_default();
    let path = format!("/apis/image.stratus.dev/v1/namespaces/{ns}/images/{name}/data");
    let request = http::Request::delete(path)
        .body(Vec::new())
        .map_err(kube::Error::HttpError)?;
    match client.request_text(request).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(e),
    }
}

/// Chunks of `images/NAME/data` in flight between the API server's stream and the blocking
/// reader.
const CHUNKS: usize = 4;
/// The largest chunk read at once.
const CHUNK: usize = 256 * 1024;

/// Whether `image`'s data is served by the API server (`images/NAME/data`): an uploaded
/// image's, an object of the object store's (`source.swift`), or a URL source's the image
/// controller stored in the object store (`status.stored`); any other Image with a URL
/// source is fetched from its URL.
pub fn served(image: &Image) -> bool {
    image.spec.source.upload.is_some() || image.spec.source.swift.is_some() || stored(image)
}

/// Whether `image`'s data is kept in the image store (`status.stored`, written only by the
/// API server once the data is verified): an uploaded image's, or a URL source's.
fn stored(image: &Image) -> bool {
    image.status.as_ref().is_some_and(|s| s.stored.is_some())
}

/// The SHA-256 `image`'s data must have: `spec.sha256`, or for data kept in the image store
/// (an uploaded image, a stored URL source) the one recorded when it was stored (so a node
/// checks what it is served against what was stored).
pub fn checksum(image: &Image) -> Option<String> {
    image.spec.sha256.clone().or_else(|| {
        (image.spec.source.upload.is_some() || stored(image))
            .then_some(image.status.as_ref())
            .flatten()
            .and_then(|s| s.sha256.clone())
    })
}

/// `image`'s data from the API server (`GET images/NAME/data`), as a blocking reader for the
/// image cache: read it on a blocking thread. The stream is read by a task of its own, a few
/// chunks ahead.
///
/// # Errors
/// What the API server answers: 403 for a caller that may not read the data (a node: no
/// Server or Volume placed on it is made from it), 409 for an uploaded Image that is not
/// Active, 503 for a cloud without an object store.
pub async fn image_data(client: &Client, image: &Image) -> Result<ImageData, kube::Error> {
    use futures::AsyncReadExt as _;
    let ns = image.metadata.namespace.as_deref().unwrap_or_default();
    let name = image.metadata.name.as_deref().unwrap_or_default();
    let path = format!("/apis/image.stratus.dev/v1/namespaces/{ns}/images/{name}/data");
    let request = http::Request::get(path)
        .body(Vec::new())
        .map_err(kube::Error::HttpError)?;
    let stream = client.request_stream(request).await?;
    let (tx, rx) = tokio::sync::mpsc::channel(CHUNKS);
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        loop {
            let mut buf = vec![0u8; CHUNK];
            let sent = match stream.read(&mut buf).await {
                Ok(0) => return,
                Ok(n) => {
                    buf.truncate(n);
                    tx.send(Ok(buf)).await
                }
                Err(e) => tx.send(Err(e)).await,
            };
            if sent.is_err() {
                return;
            }
        }
    });
    Ok(ImageData {
        rx,
        chunk: Vec::new(),
        at: 0,
    })
}

/// `image`'s data from the API server when it serves it ([`served`]), named for errors and
/// logs; `None` for an Image fetched from its URL.
///
/// # Errors
/// As [`image_data`]'s.
pub async fn served_data(
    client: &Client,
    image: &Image,
) -> Result<Option<(String, ImageData)>, kube::Error> {
    if !served(image) {
        return Ok(None);
    }
    let data = image_data(client, image).await?;
    let name = image.metadata.name.as_deref().unwrap_or_default();
    Ok(Some((format!("images/{name}/data"), data)))
}

/// A blocking reader of an Image's data streamed from the API server ([`image_data`]).
#[derive(Debug)]
pub struct ImageData {
    rx: tokio::sync::mpsc::Receiver<io::Result<Vec<u8>>>,
    chunk: Vec<u8>,
    at: usize,
}

impl io::Read for ImageData {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.at == self.chunk.len() {
            match self.rx.blocking_recv() {
                None => return Ok(0),
                Some(Err(e)) => return Err(e),
                Some(Ok(chunk)) => {
                    self.chunk = chunk;
                    self.at = 0;
                }
            }
        }
        let n = buf.len().min(self.chunk.len() - self.at);
        buf[..n].copy_from_slice(&self.chunk[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use stratus_api_types::image::{ImagePhase, ImageStatus, StoredObject};

    use super::*;

    fn url_image(sha256: Option<&str>, status: Option<ImageStatus>) -> Image {
        let url = "http://images.example/disk.qcow2";
        let spec =
            serde_json::json!({"diskFormat": "qcow2", "source": {"url": url}, "sha256": sha256});
        let mut image = Image::new("disk", serde_json::from_value(spec).expect("an ImageSpec"));
        image.status = status;
        image
    }

    #[test]
    fn a_stored_url_source_is_served_and_checked_against_its_recorded_checksum() {
        let recorded = "a".repeat(64);
        let active = ImageStatus {
            phase: ImagePhase::Active,
            sha256: Some(recorded.clone()),
            ..ImageStatus::default()
        };
        let stored = ImageStatus {
            stored: Some(StoredObject {
                container: "stratus-images".into(),
                object: "uid".into(),
            }),
            ..active.clone()
        };
        // Not kept: fetched from the URL, checked against spec.sha256 alone.
        let fetched = url_image(None, Some(active));
        assert!(!served(&fetched));
        assert_eq!(checksum(&fetched), None);
        // Kept: read from the API server, checked against what was recorded when stored.
        let kept = url_image(None, Some(stored.clone()));
        assert!(served(&kept));
        assert_eq!(checksum(&kept), Some(recorded));
        // spec.sha256 still wins.
        let given = "b".repeat(64);
        assert_eq!(
            checksum(&url_image(Some(&given), Some(stored))),
            Some(given)
        );
    }
}
