//! The `binding` subresource the placement controllers write: one POST that places an object
//! and claims what it needs there in the API server's transaction.

use kube::{Client, Resource};
use serde_json::json;

/// Binds the `K` named `name` in `ns` to `target` (a Server's hypervisor, a Volume's pool).
/// `Ok(false)`: the API server refused it as a conflict (the target filled up or changed
/// meanwhile), so the next candidate may be tried.
pub(crate) async fn bind<K: Resource<DynamicType = ()>>(
    client: &Client,
    ns: &str,
    name: &str,
    target: &str,
) -> Result<bool, kube::Error> {
    let (group, plural) = (K::group(&()), K::plural(&()));
    let body = json!({
        "apiVersion": format!("{group}/v1"),
        "kind": "Binding",
        "metadata": {"name": name, "namespace": ns},
        "target": {"name": target},
    });
    let req = http::Request::post(format!(
        "/apis/{group}/v1/namespaces/{ns}/{plural}/{name}/binding"
    ))
    .header(http::header::CONTENT_TYPE, "application/json")
    .body(body.to_string().into_bytes())
    .map_err(kube::Error::HttpError)?;
    match client.request::<serde_json::Value>(req).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}
