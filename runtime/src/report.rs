//! A reconciler's runtime: its client, its per-object [`Backoff`], and the report in status of
//! failures that retrying cannot fix (the `Reconciled` condition).

use std::fmt::Debug;

use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::{Client, Resource, ResourceExt};
use serde::Serialize;
use serde_json::{Value, json};
use stratus_api_types::common::{Condition, ConditionType, ConditionUpdate, Reason};

use crate::policy::{Backoff, Classify, Retry, chain};

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
    /// Only the `Reconciled` condition is written (by [`Runtime::set_condition`]), and only
    /// when it changes. A failed write is logged, not raised: the reconcile's own result
    /// stands.
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
                failed.then(|| ConditionType::Reconciled.yes(Reason::Reconciled, ""))
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

    /// Makes `status` the status of `obj` by server-side apply under this runtime's field
    /// manager, forced (a reconciler is the authority on the fields it writes): it applies
    /// the fields it applied before (as the object stored now says) and the fields that
    /// differ from the status `obj` was read with (see [`crate::status::to_apply`]), each
    /// field it did not change with the value stored now (see [`crate::status::merged`]). So
    /// it owns exactly what it writes; fields other writers own (a placement, another
    /// component's conditions) are left as they are, whatever happened to them since `obj`
    /// was read; a field it wrote before and `status` lacks is removed only when `obj` had
    /// it (a field written since `obj` was read, by this reconciler or another, stays). No
    /// resourceVersion is sent: there is no read-modify-write to lose. Returns whether
    /// anything was sent (nothing is, and nothing is read, when `status` is the status `obj`
    /// has).
    ///
    /// # Errors
    /// The API refused the write.
    pub async fn write_status<S: Serialize>(
        &self,
        obj: &K,
        status: &S,
    ) -> Result<bool, kube::Error> {
        let new = serde_json::to_value(status).unwrap_or(Value::Null);
        self.apply_status(obj, &self.manager, new).await
    }

    /// Applies `new` as the status `manager` writes of `obj` (see [`Runtime::write_status`]).
    async fn apply_status(&self, obj: &K, manager: &str, new: Value) -> Result<bool, kube::Error> {
        let read = serde_json::to_value(obj).unwrap_or(Value::Null);
        let old = read.get("status").cloned().unwrap_or(Value::Null);
        if old == new {
            return Ok(false);
        }
        let api = self.api(obj);
        // What this manager owns, and the status it is to change, are read from the object
        // as stored: `obj` may be older than this reconcile's own earlier write (a cache
        // tells a reconcile of another writer's change before its own), and a cache may keep
        // objects without their managed fields. Applied to `obj`'s status, the fields of
        // that earlier write that `obj` lacks would be left out, and so removed.
        let mut stored = serde_json::to_value(api.get(&obj.name_any()).await?).unwrap_or_default();
        let managed = stored
            .pointer_mut("/metadata/managedFields")
            .map(Value::take)
            .unwrap_or(Value::Null);
        let live = stored
            .get_mut("status")
            .map(Value::take)
            .unwrap_or(Value::Null);
        let owned = crate::status::owned_status(&managed, manager);
        let Some(status) = crate::status::to_apply(&old, &new, &live, &owned) else {
            return Ok(false);
        };
        let mut metadata = json!({ "name": obj.name_any() });
        if let Some(ns) = obj.namespace() {
            metadata["namespace"] = json!(ns);
        }
        let body = json!({
            "apiVersion": K::api_version(&()),
            "kind": K::kind(&()),
            "metadata": metadata,
            "status": status,
        });
        api.patch_status(
            &obj.name_any(),
            &PatchParams::apply(manager).force(),
            &Patch::Apply(body),
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

    /// Sets one condition in `obj`'s status, as described at [`Runtime::finish`]: applied
    /// under a field manager of its own (this runtime's, suffixed with the condition type), so
    /// the apply holds that one condition and nothing else this reconciler writes. Nothing is
    /// sent when the condition is already as asked.
    ///
    /// # Errors
    /// The API refused the write.
    pub async fn set_condition(
        &self,
        obj: &K,
        update: &ConditionUpdate,
    ) -> Result<(), kube::Error> {
        let mut conds = conditions(obj);
        if !update.set(&mut conds, obj.meta().generation) {
            return Ok(());
        }
        let mut status = serde_json::to_value(obj)
            .ok()
            .and_then(|mut v| v.get_mut("status").map(Value::take))
            .filter(Value::is_object)
            .unwrap_or_else(|| json!({}));
        status["conditions"] = serde_json::to_value(conds).unwrap_or(Value::Null);
        let manager = format!("{}-{}", self.manager, update.type_.as_str().to_lowercase());
        self.apply_status(obj, &manager, status).await.map(drop)
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
