//! A reconciler's runtime: its client, its per-object [`Backoff`], and the report in status of
//! failures that retrying cannot fix (the `Reconciled` condition).

use std::fmt::Debug;

use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::{Client, Resource, ResourceExt};
use serde::Serialize;
use serde_json::{Value, json};
use stratus_api_types::common::{Condition, ConditionType, ConditionUpdate};

use crate::policy::{Backoff, Classify, Retry, chain, kube_retry};

/// Reason of `Reconciled=True`, written only to clear an earlier failure.
const RECOVERED: &str = "Reconciled";

/// What one reconciler (a controller, or an agent's loop) keeps between reconciles: nothing
/// about any object but how often it failed in a row.
pub struct Runtime<K: Resource> {
    client: Client,
    backoff: Backoff<K>,
    manager: String,
}

impl<K> Runtime<K>
where
    K: Resource<DynamicType = ()> + Serialize + Clone + Debug,
{
    /// A runtime whose status writes are recorded under the field manager `manager`.
    pub fn new(client: Client, manager: &str) -> Self {
        Self::with_backoff(client, manager, Backoff::default())
    }

    /// As [`Runtime::new`], with other delays.
    pub fn with_backoff(client: Client, manager: &str, backoff: Backoff<K>) -> Self {
        Self {
            client,
            backoff,
            manager: manager.into(),
        }
    }

    /// The API client.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The per-object backoff.
    pub fn backoff(&self) -> &Backoff<K> {
        &self.backoff
    }

    /// The error policy: requeues `obj` after its delay for `e` (see [`Backoff`]).
    pub fn error_policy<E: Classify>(&self, obj: &K, e: &E) -> Action {
        self.backoff.error_policy(obj, e)
    }

    /// Ends a reconcile of `obj`: a success forgets its failures (and clears an earlier
    /// `Reconciled=False`); a failure that retrying cannot fix sets `Reconciled=False` with
    /// the error's reason and chain as message. Returns `result` as it was.
    ///
    /// # Guarantees
    /// Only the `Reconciled` condition is written, on the version of `obj` it was computed
    /// from (a conflict reads the object again, a few times), and only when it changes. A
    /// failed write is logged, not raised: the reconcile's own result stands.
    pub async fn finish<E: Classify>(
        &self,
        obj: &K,
        result: Result<Action, E>,
    ) -> Result<Action, E> {
        let update = match &result {
            Ok(_) => {
                self.backoff.succeeded(obj);
                let failed = conditions(obj)
                    .iter()
                    .any(|c| c.type_ == ConditionType::Reconciled.as_str() && c.status == "False");
                failed.then(|| ConditionType::Reconciled.yes(RECOVERED, ""))
            }
            Err(e) if e.retry() == Retry::Never => {
                Some(ConditionType::Reconciled.no(e.reason(), chain(e)))
            }
            Err(_) => None,
        };
        if let Some(update) = update
            && let Err(e) = self.set_condition(obj, &update).await
        {
            tracing::warn!(object = %obj.name_any(), error = %chain(&e), "cannot report the reconcile in status");
        }
        result
    }

    /// Makes `status` the status of `obj`: sends only what differs from the status `obj` was
    /// read with (see [`crate::status::merge_diff`]), so fields other writers own (a
    /// placement, another component's conditions) are left as they are. Returns whether
    /// anything was written. A reconcile that writes twice passes the second time the object
    /// with the status it wrote first.
    ///
    /// # Errors
    /// The API refused the write.
    pub async fn write_status<S: Serialize>(
        &self,
        obj: &K,
        status: &S,
    ) -> Result<bool, kube::Error> {
        let old = serde_json::to_value(obj)
            .ok()
            .and_then(|mut v| v.get_mut("status").map(Value::take))
            .unwrap_or(Value::Null);
        let new = serde_json::to_value(status).unwrap_or(Value::Null);
        let Some(diff) = crate::status::merge_diff(&old, &new) else {
            return Ok(false);
        };
        let pp = PatchParams {
            field_manager: Some(self.manager.clone()),
            ..Default::default()
        };
        self.api(obj)
            .patch_status(
                &obj.name_any(),
                &pp,
                &Patch::Merge(json!({ "status": diff })),
            )
            .await?;
        Ok(true)
    }

    fn api(&self, obj: &K) -> Api<DynamicObject> {
        let ar = ApiResource::erase::<K>(&());
        match obj.namespace() {
            Some(ns) => Api::namespaced_with(self.client.clone(), &ns, &ar),
            None => Api::all_with(self.client.clone(), &ar),
        }
    }

    /// Sets one condition in `obj`'s status, as described at [`Runtime::finish`].
    ///
    /// # Errors
    /// The API refused the write, or it conflicted every time.
    pub async fn set_condition(
        &self,
        obj: &K,
        update: &ConditionUpdate,
    ) -> Result<(), kube::Error> {
        let api = self.api(obj);
        let name = obj.name_any();
        let pp = PatchParams {
            field_manager: Some(self.manager.clone()),
            ..Default::default()
        };
        let mut current = serde_json::to_value(obj).unwrap_or(Value::Null);
        for _ in 0..3 {
            let mut conds = conditions_of(&current);
            if !update.set(&mut conds, obj.meta().generation) {
                return Ok(());
            }
            let patch = json!({
                "metadata": {"resourceVersion": current.pointer("/metadata/resourceVersion")},
                "status": {"conditions": conds},
            });
            match api.patch_status(&name, &pp, &Patch::Merge(patch)).await {
                Ok(_) => return Ok(()),
                Err(e) if kube_retry(&e) == Retry::Soon => {
                    let fresh = api.get(&name).await?;
                    current = serde_json::to_value(fresh).unwrap_or(Value::Null);
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

fn conditions(obj: &impl Serialize) -> Vec<Condition> {
    conditions_of(&serde_json::to_value(obj).unwrap_or(Value::Null))
}

fn conditions_of(v: &Value) -> Vec<Condition> {
    v.pointer("/status/conditions")
        .cloned()
        .and_then(|c| serde_json::from_value(c).ok())
        .unwrap_or_default()
}
