//! How a failed reconcile is retried: each error says what retrying can do ([`Classify`]), and
//! one [`Backoff`] per reconciler spaces an object's retries by how often it failed in a row.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use kube::Resource;
use kube::runtime::controller::Action;
use kube::runtime::reflector::ObjectRef;
use stratus_api_types::common::Reason;

/// What retrying a failed reconcile can do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// A moment fixes it (another writer got there first: a 409): again soon.
    Soon,
    /// It may pass (the API server, the host or a download is unavailable): again after a
    /// backoff that doubles with each failure in a row, up to a cap.
    Backoff,
    /// Retrying the same object cannot fix it (a bug; a request the API refuses as invalid or
    /// forbidden): reported in the object's status, and tried again only at the cap, in case
    /// what was wrong around it was mended.
    Never,
}

/// An error that says whether retrying can help.
pub trait Classify: std::error::Error {
    /// What retrying can do about this error.
    fn retry(&self) -> Retry;

    /// A CamelCase reason for status and logs: [`Reason::ReconcileError`] unless an error
    /// says better.
    fn reason(&self) -> &'static str {
        Reason::ReconcileError.as_str()
    }
}

/// How a failed request to the API server is retried: a conflict soon, an unavailable or
/// overloaded server (or no answer at all) with backoff, a refused request never.
pub fn kube_retry(e: &kube::Error) -> Retry {
    match e {
        kube::Error::Api(s) if s.code == 409 => Retry::Soon,
        // Gone meanwhile (its deletion is an event of its own), or a server in trouble.
        kube::Error::Api(s) if s.code == 404 || s.code == 410 || s.code == 429 => Retry::Backoff,
        kube::Error::Api(s) if s.code >= 500 => Retry::Backoff,
        // 400, 403, 422, ...: what was sent is refused, and will be again.
        kube::Error::Api(_) => Retry::Never,
        _ => Retry::Backoff,
    }
}

/// Whether the API refused a create because its namespace's Project is being deleted (403
/// with cause `NamespaceTerminating`, as Kubernetes' NamespaceLifecycle answers): nothing is
/// to be made there any more, so a reconciler waits for the deletion rather than retrying.
pub fn namespace_terminating(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 403
        && s.details.as_ref().is_some_and(|d| d.causes.iter().any(|c| c.reason == "NamespaceTerminating")))
}

/// The error chain as one line: `what failed: why: why`.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// Per-object retry delays: each object's failures in a row, forgotten when it succeeds.
///
/// # Guarantees
/// - [`Retry::Soon`] waits `soon` doubled per failure in a row, at most `soon_cap`.
/// - [`Retry::Backoff`] waits `first` doubled per failure in a row, at most `cap`.
/// - [`Retry::Never`] waits `cap`.
/// - One object's failures never lengthen another's delays.
pub struct Backoff<K: Resource> {
    failures: Mutex<HashMap<ObjectRef<K>, u32>>,
    soon: Duration,
    soon_cap: Duration,
    first: Duration,
    cap: Duration,
}

impl<K> Default for Backoff<K>
where
    K: Resource<DynamicType = ()>,
{
    /// Soon: 100 ms up to 5 s; backoff: 1 s up to 5 minutes.
    fn default() -> Self {
        Self::new(
            Duration::from_millis(100),
            Duration::from_secs(5),
            Duration::from_secs(1),
            Duration::from_secs(300),
        )
    }
}

impl<K: Resource> std::fmt::Debug for Backoff<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backoff")
            .field("first", &self.first)
            .field("cap", &self.cap)
            .finish_non_exhaustive()
    }
}

impl<K> Backoff<K>
where
    K: Resource<DynamicType = ()>,
{
    /// A backoff with these delays (see the guarantees above).
    pub fn new(soon: Duration, soon_cap: Duration, first: Duration, cap: Duration) -> Self {
        Self {
            failures: Mutex::new(HashMap::new()),
            soon,
            soon_cap,
            first,
            cap,
        }
    }

    /// Counts a failure of `obj` and returns how long to wait before its next try.
    pub fn failed(&self, obj: &K, retry: Retry) -> Duration {
        let n = {
            let mut failures = self
                .failures
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let n = failures.entry(ObjectRef::from_obj(obj)).or_insert(0);
            *n = n.saturating_add(1);
            *n
        };
        let doubled = |base: Duration, cap: Duration| {
            let factor = 1u32.checked_shl(n.saturating_sub(1)).unwrap_or(u32::MAX);
            base.saturating_mul(factor).min(cap)
        };
        match retry {
            Retry::Soon => doubled(self.soon, self.soon_cap),
            Retry::Backoff => doubled(self.first, self.cap),
            Retry::Never => self.cap,
        }
    }

    /// Forgets `obj`'s failures: its next failure starts from the first delay again.
    pub fn succeeded(&self, obj: &K) {
        self.failures
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&ObjectRef::from_obj(obj));
    }

    /// How many times in a row `obj` has failed.
    pub fn failures(&self, obj: &K) -> u32 {
        self.failures
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&ObjectRef::from_obj(obj))
            .copied()
            .unwrap_or(0)
    }

    /// The error policy: logs `e` where it is handled and requeues `obj` after its delay.
    pub fn error_policy<E: Classify>(&self, obj: &K, e: &E) -> Action {
        let retry = e.retry();
        let delay = self.failed(obj, retry);
        let object = ObjectRef::from_obj(obj);
        let error = chain(e);
        match retry {
            Retry::Soon => {
                tracing::debug!(%object, %error, ?delay, "reconcile failed; retrying soon")
            }
            Retry::Backoff => tracing::warn!(%object, %error, ?delay, "reconcile failed; retrying"),
            Retry::Never => {
                tracing::error!(%object, %error, ?delay, "reconcile failed; retrying cannot help, reported in status")
            }
        }
        Action::requeue(delay)
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::coordination::v1::Lease;
    use kube::api::ObjectMeta;

    use super::*;

    fn lease(name: &str) -> Lease {
        Lease {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("ns".into()),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn backoff_doubles_per_failure_up_to_the_cap_and_resets_on_success() {
        let b = Backoff::<Lease>::default();
        let a = lease("a");
        let delays: Vec<_> = (0..11).map(|_| b.failed(&a, Retry::Backoff)).collect();
        assert_eq!(
            delays,
            [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300].map(secs)
        );
        b.succeeded(&a);
        assert_eq!(b.failures(&a), 0);
        assert_eq!(b.failed(&a, Retry::Backoff), secs(1));
    }

    #[test]
    fn objects_back_off_independently() {
        let b = Backoff::<Lease>::default();
        for _ in 0..5 {
            b.failed(&lease("a"), Retry::Backoff);
        }
        assert_eq!(b.failed(&lease("b"), Retry::Backoff), secs(1));
        assert_eq!(b.failures(&lease("a")), 5);
    }

    #[test]
    fn soon_starts_small_and_never_waits_the_cap() {
        let b = Backoff::<Lease>::default();
        let a = lease("a");
        assert_eq!(b.failed(&a, Retry::Soon), Duration::from_millis(100));
        assert_eq!(b.failed(&a, Retry::Soon), Duration::from_millis(200));
        for _ in 0..40 {
            b.failed(&a, Retry::Soon);
        }
        assert_eq!(b.failed(&a, Retry::Soon), secs(5));
        assert_eq!(b.failed(&lease("c"), Retry::Never), secs(300));
    }

    #[test]
    fn api_errors_are_classified_by_code() {
        let status = |code: u16| {
            kube::Error::Api(Box::new(kube::core::Status {
                code,
                ..Default::default()
            }))
        };
        assert_eq!(kube_retry(&status(409)), Retry::Soon);
        assert_eq!(kube_retry(&status(503)), Retry::Backoff);
        assert_eq!(kube_retry(&status(429)), Retry::Backoff);
        assert_eq!(kube_retry(&status(422)), Retry::Never);
        assert_eq!(kube_retry(&status(403)), Retry::Never);
    }

    #[test]
    fn a_create_in_a_terminating_namespace_is_told_from_other_refusals() {
        // As the API server sends it.
        let forbidden = |cause: &str| {
            let status: kube::core::Status = serde_json::from_value(serde_json::json!({
                "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "code": 403, "reason": "Forbidden",
                "message": "keypairs.compute.stratus.dev \"k\" is forbidden: unable to create new content in namespace demo because it is being terminated",
                "details": {"name": "k", "group": "compute.stratus.dev", "kind": "keypairs",
                    "causes": [{"reason": cause, "message": "namespace demo is being terminated",
                        "field": "metadata.namespace"}]},
            }))
            .expect("a Status");
            kube::Error::Api(Box::new(status))
        };
        assert!(super::namespace_terminating(&forbidden(
            "NamespaceTerminating"
        )));
        assert!(!super::namespace_terminating(&forbidden("QuotaExceeded")));
        let quota = kube::Error::Api(Box::new(kube::core::Status {
            code: 403,
            message: "exceeded quota".into(),
            ..Default::default()
        }));
        assert!(!super::namespace_terminating(&quota));
    }
}
