//! The token an Image's `source.swift` object is read with: asked of the API server
//! (`POST images/NAME/token`) by the component about to fetch it.

use kube::Client;
use kube::api::{Api, PostParams};
use stratus_api_types::image::{Image, ImageToken, ImageTokenStatus};

/// A short-lived read-only token of `image`'s project and its account's URL, when the Image
/// is kept in the object store; `None` for an Image with a URL source.
///
/// # Errors
/// What the API server answers: 403 for a caller that may not fetch the Image (a node: no
/// Server or Volume placed on it is made from it, whatever the Image's visibility), 503 for a
/// cloud without an object store.
pub async fn image_token(
    client: &Client,
    image: &Image,
) -> Result<Option<ImageTokenStatus>, kube::Error> {
    if image.spec.source.swift.is_none() {
        return Ok(None);
    }
    let ns = image.metadata.namespace.as_deref().unwrap_or_default();
    let name = image.metadata.name.as_deref().unwrap_or_default();
    let token: ImageToken = Api::<Image>::namespaced(client.clone(), ns)
        .create_subresource(
            "token",
            name,
            &PostParams::default(),
            &serde_json::Map::new(),
        )
        .await?;
    Ok(Some(token.status))
}
