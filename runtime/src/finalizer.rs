//! Finalizers one component adds and another releases: the API server's binding puts a
//! node's cleanup finalizer on what it places there, and the node's agent drops it once the
//! host holds nothing of the object any more.

use std::fmt::Debug;

use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams};
use kube::{Client, Resource, ResourceExt};
use serde_json::json;

/// Drops `finalizer` from `obj`, on the version of it that was read: a merge patch with its
/// `resourceVersion`, so a concurrent change makes it a 409 for the caller to retry (the
/// other finalizers are then the newest ones).
///
/// # Guarantees
/// Idempotent: an object without the finalizer, or already gone, is left alone (`Ok`).
///
/// # Errors
/// The API refused the write (a 409 among them).
pub async fn release<K>(client: &Client, obj: &K, finalizer: &str) -> Result<(), kube::Error>
where
    K: Resource<DynamicType = ()> + Clone + Debug,
{
    if !obj.finalizers().iter().any(|f| f == finalizer) {
        return Ok(());
    }
    let ar = ApiResource::erase::<K>(&());
    let api: Api<DynamicObject> = match obj.namespace() {
        Some(ns) => Api::namespaced_with(client.clone(), &ns, &ar),
        None => Api::all_with(client.clone(), &ar),
    };
    let rest: Vec<&String> = obj
        .finalizers()
        .iter()
        .filter(|f| *f != finalizer)
        .collect();
    let patch = json!({"metadata": {
        "finalizers": rest,
        "resourceVersion": obj.resource_version(),
    }});
    match api
        .patch(
            &obj.name_any(),
            &PatchParams::default(),
            &Patch::Merge(patch),
        )
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(e),
    }
}
