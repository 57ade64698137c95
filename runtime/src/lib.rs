//! What every Stratus controller and agent shares, on top of kube-runtime: one error policy
//! with per-object capped backoff driven by each error's own classification
//! ([`policy`]), failures that retrying cannot fix reported in the object's status
//! ([`report`]), Events ([`events`]), the release of a finalizer another component added
//! ([`finalizer`]), waiting for a reflector's first list ([`store_ready`]), and (feature
//! `allowlist`) the nftables table that lets only named sources reach a node's own servers.
//!
//! A reconciler built on it has this shape (the controllers crate and the agents each follow
//! it):
//!
//! ```text
//! async fn reconcile(obj: Arc<Image>, ctx: Arc<Ctx>) -> Result<Action, MyError> {
//!     let result = reconcile_inner(&obj, &ctx).await;   // the work; waiting is Ok(requeue)
//!     ctx.runtime.finish(&*obj, result).await           // backoff reset or status report
//! }
//! fn error_policy(obj: Arc<Image>, e: &MyError, ctx: Arc<Ctx>) -> Action {
//!     ctx.runtime.error_policy(&*obj, e)                // per-object, by e.retry()
//! }
//! ```

#[cfg(feature = "allowlist")]
pub mod allowlist;
pub mod client;
pub mod events;
pub mod finalizer;
pub mod image_token;
pub mod policy;
pub mod report;
pub mod status;

use std::time::Duration;

pub use policy::{Backoff, Classify, Retry};
pub use report::Runtime;

/// Waits until `store` holds its first full list (or its writer is gone).
///
/// Not `Store::wait_until_ready` alone: kube-runtime's readiness is a oneshot channel that
/// keeps one waker, so of several reconciles waiting at once only the last one polled is woken
/// and the others wait forever (a hypervisor never marked NotReady was this). Polling it
/// again every 50 ms until it answers cannot miss the moment.
pub async fn store_ready<K>(store: &kube::runtime::reflector::Store<K>)
where
    K: kube::runtime::reflector::Lookup + Clone + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    while tokio::time::timeout(Duration::from_millis(50), store.wait_until_ready())
        .await
        .is_err()
    {}
}

/// Runs a blocking call (libvirt, qemu-img, a download) on tokio's blocking pool.
///
/// # Errors
/// The call panicked: a bug, which the caller's error classifies as [`Retry::Never`].
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, tokio::task::JoinError> {
    tokio::task::spawn_blocking(f).await
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::coordination::v1::Lease;
    use kube::runtime::{reflector, watcher};

    #[tokio::test]
    async fn every_waiter_sees_the_store_become_ready() {
        let (store, mut writer) = reflector::store::<Lease>();
        let waiters: Vec<_> = (0..8)
            .map(|_| {
                let store = store.clone();
                tokio::spawn(async move { super::store_ready(&store).await })
            })
            .collect();
        // Every waiter has polled (and parked) before the store becomes ready.
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        writer.apply_watcher_event(&watcher::Event::Init);
        writer.apply_watcher_event(&watcher::Event::InitDone);
        for w in waiters {
            tokio::time::timeout(std::time::Duration::from_secs(5), w)
                .await
                .expect("a waiter was never woken")
                .expect("the waiter ran");
        }
    }
}
