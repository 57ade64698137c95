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
    let rest: Vec<&String> = obj
        .finalizers()
        .iter()
        .filter(|f| *f != finalizer)
        .collect();
    let patch = json!({"metadata": {
        "finalizers": rest,
        "resourceVersion": obj.resource_version(),
    }});
    match api(client, obj)
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

/// Where an object stands with a finalizer its reconciler owns: every case of (has the
/// finalizer, is being deleted), so that a reconcile matches on it exhaustively.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Live, without the finalizer yet: add it before anything is made for the object.
    Adopt,
    /// Live, with the finalizer: reconcile it.
    Live,
    /// Being deleted, with the finalizer: clean up; release the finalizer once nothing is
    /// left, or report what is waited for and requeue (a wait is not an error).
    Cleanup,
    /// Being deleted, without the finalizer: nothing of ours is left.
    Gone,
}

/// The [`Stage`] of `obj` for `finalizer`.
pub fn stage<K: Resource>(obj: &K, finalizer: &str) -> Stage {
    let has = obj.finalizers().iter().any(|f| f == finalizer);
    match (has, obj.meta().deletion_timestamp.is_some()) {
        (false, false) => Stage::Adopt,
        (true, false) => Stage::Live,
        (true, true) => Stage::Cleanup,
        (false, true) => Stage::Gone,
    }
}

/// Adds `finalizer` to `obj`, on the version of it that was read (as [`release`]).
///
/// # Guarantees
/// Idempotent: an object that has it already is left alone.
///
/// # Errors
/// The API refused the write (a 409 among them).
pub async fn add<K>(client: &Client, obj: &K, finalizer: &str) -> Result<(), kube::Error>
where
    K: Resource<DynamicType = ()> + Clone + Debug,
{
    if obj.finalizers().iter().any(|f| f == finalizer) {
        return Ok(());
    }
    let mut all = obj.finalizers().to_vec();
    all.push(finalizer.into());
    let patch = json!({"metadata": {
        "finalizers": all,
        "resourceVersion": obj.resource_version(),
    }});
    api(client, obj)
        .patch(
            &obj.name_any(),
            &PatchParams::default(),
            &Patch::Merge(patch),
        )
        .await
        .map(|_| ())
}

fn api<K>(client: &Client, obj: &K) -> Api<DynamicObject>
where
    K: Resource<DynamicType = ()>,
{
    let ar = ApiResource::erase::<K>(&());
    match obj.namespace() {
        Some(ns) => Api::namespaced_with(client.clone(), &ns, &ar),
        None => Api::all_with(client.clone(), &ar),
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::coordination::v1::Lease;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use kube::api::ObjectMeta;

    use super::*;

    #[test]
    fn every_combination_has_its_stage() {
        let lease = |finalizers: &[&str], deleting: bool| Lease {
            metadata: ObjectMeta {
                name: Some("l".into()),
                finalizers: Some(finalizers.iter().map(|f| f.to_string()).collect()),
                deletion_timestamp: deleting.then(|| Time(k8s_openapi::jiff::Timestamp::now())),
                ..Default::default()
            },
            ..Default::default()
        };
        assert_eq!(stage(&lease(&[], false), "f"), Stage::Adopt);
        assert_eq!(stage(&lease(&["other"], false), "f"), Stage::Adopt);
        assert_eq!(stage(&lease(&["other", "f"], false), "f"), Stage::Live);
        assert_eq!(stage(&lease(&["f"], true), "f"), Stage::Cleanup);
        assert_eq!(stage(&lease(&["other"], true), "f"), Stage::Gone);
    }
}
