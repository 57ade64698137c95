//! The garbage collector: cascading deletion through `ownerReferences` (background, foreground
//! and orphan), as Kubernetes' garbage collector does it.
//!
//! # Guarantees
//! - An object is deleted only when every owner it names is gone: the absence seen in the cache
//!   is confirmed by a live read, and the delete carries a uid precondition, so an object
//!   recreated under the same name is never touched.
//! - An owner being deleted in the foreground keeps its `foregroundDeletion` finalizer until no
//!   dependent of it remains; one deleted with `orphan` keeps its `orphan` finalizer until no
//!   dependent references it any more.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::api::{
    Api, DeleteParams, DynamicObject, Patch, PatchParams, Preconditions, PropagationPolicy,
};
use kube::core::DynamicResourceScope;
use kube::discovery::{ApiCapabilities, ApiResource, Discovery, Scope, verbs};
use kube::runtime::events::{EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource, ResourceExt};
use serde_json::json;
use tokio::sync::mpsc;

/// Failures that stop the collector.
#[derive(Debug, thiserror::Error)]
pub enum GcError {
    /// The API server's discovery failed; retrying may help once it is up.
    #[error("discover served resources")]
    Discovery(#[source] kube::Error),
}

/// A served resource the collector follows.
struct Kind {
    ar: Arc<ApiResource>,
    caps: ApiCapabilities,
    store: Store<Collected>,
}

/// What the collector keeps of an object: its metadata, slimmed to its identity, owners,
/// finalizers and deletion ([`slim`]). Decoded from the watch into this directly, so neither
/// the rest of the object nor a copy of its kind's names is held per object (a cache key
/// holds the kind as a shared pointer).
#[derive(Clone, Debug, Default, serde::Deserialize, serde::Serialize)]
pub struct Collected {
    metadata: ObjectMeta,
}

impl Resource for Collected {
    type DynamicType = Arc<ApiResource>;
    type Scope = DynamicResourceScope;

    fn kind(dt: &Arc<ApiResource>) -> Cow<'_, str> {
        dt.kind.as_str().into()
    }
    fn group(dt: &Arc<ApiResource>) -> Cow<'_, str> {
        dt.group.as_str().into()
    }
    fn version(dt: &Arc<ApiResource>) -> Cow<'_, str> {
        dt.version.as_str().into()
    }
    fn api_version(dt: &Arc<ApiResource>) -> Cow<'_, str> {
        dt.api_version.as_str().into()
    }
    fn plural(dt: &Arc<ApiResource>) -> Cow<'_, str> {
        dt.plural.as_str().into()
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

const FOREGROUND: &str = "foregroundDeletion";
const ORPHAN: &str = "orphan";
/// How often a full pass runs even when nothing changed.
const RESYNC: Duration = Duration::from_secs(30);

/// Runs the collector until the process ends.
///
/// # Errors
/// Only when the served resources cannot be discovered.
pub async fn run(client: Client) -> Result<(), GcError> {
    let discovery = Discovery::new(client.clone())
        .run()
        .await
        .map_err(GcError::Discovery)?;
    let (tx, mut rx) = mpsc::channel::<()>(1);
    let mut kinds = Vec::new();
    // The watchers end with this function (when leadership is lost, or at shutdown).
    let mut watchers = Vec::new();
    for group in discovery.groups() {
        for (ar, caps) in group.recommended_resources() {
            if !(caps.supports_operation(verbs::WATCH) && caps.supports_operation(verbs::DELETE))
                || ar.kind == "Event"
            {
                continue;
            }
            let ar = Arc::new(ar);
            let writer = reflector::store::Writer::<Collected>::new(Arc::clone(&ar));
            let store = writer.as_reader();
            let api: Api<Collected> = Api::all_with(client.clone(), &ar);
            let stream = reflector::reflector(
                writer,
                watcher(api, watcher::Config::default())
                    .default_backoff()
                    .modify(slim),
            );
            let tx = tx.clone();
            watchers.push(tokio_util::task::AbortOnDropHandle::new(tokio::spawn(async move {
                let mut stream = std::pin::pin!(stream);
                while let Some(ev) = stream.next().await {
                    if let Err(e) = ev {
                        tracing::debug!(error = %e, "gc watch error; the watcher backs off and retries");
                    }
                    let _ = tx.try_send(());
                }
            })));
            kinds.push(Kind { ar, caps, store });
        }
    }
    let by_kind: HashMap<(String, String), usize> = kinds
        .iter()
        .enumerate()
        .map(|(i, k)| ((k.ar.api_version.clone(), k.ar.kind.clone()), i))
        .collect();
    let reporter = Reporter {
        controller: "stratus-garbage-collector".into(),
        instance: None,
    };
    let gc = Collector {
        recorder: Recorder::new(client.clone(), reporter),
        client,
        kinds,
        by_kind,
        told: std::sync::Mutex::new(HashMap::new()),
    };
    loop {
        let _ = tokio::time::timeout(RESYNC, rx.recv()).await;
        // Let a burst of changes settle into one pass.
        tokio::time::sleep(Duration::from_millis(50)).await;
        while rx.try_recv().is_ok() {}
        gc.pass().await;
    }
}

/// An object as the collector's cache holds it, decoded from its stored JSON (for measuring
/// what the cache costs).
///
/// # Errors
/// The JSON is not an object with metadata.
pub fn cached(json: &[u8]) -> serde_json::Result<Collected> {
    let mut o: Collected = serde_json::from_slice(json)?;
    slim(&mut o);
    Ok(o)
}

/// Keeps of an object only what collection reads (its identity, owners, finalizers and
/// deletion), so the caches of every kind hold metadata, not whole objects.
fn slim(o: &mut Collected) {
    let m = &mut o.metadata;
    m.managed_fields = None;
    m.annotations = None;
    m.labels = None;
}

struct Collector {
    client: Client,
    kinds: Vec<Kind>,
    by_kind: HashMap<(String, String), usize>,
    recorder: Recorder,
    /// The last waiting message published per owner uid, so an unchanged wait is not
    /// published again on every pass (only an optimisation: losing it re-publishes once).
    told: std::sync::Mutex<HashMap<String, String>>,
}

fn has_finalizer(o: &Collected, f: &str) -> bool {
    o.finalizers().iter().any(|x| x == f)
}

impl Collector {
    fn api(&self, kind: usize, namespace: Option<&str>) -> Api<DynamicObject> {
        let k = &self.kinds[kind];
        match (namespace, &k.caps.scope) {
            (Some(ns), Scope::Namespaced) => Api::namespaced_with(self.client.clone(), ns, &*k.ar),
            _ => Api::all_with(self.client.clone(), &*k.ar),
        }
    }

    /// One look at every object: collect dependents of deleted owners, finish foreground and
    /// orphan deletions.
    async fn pass(&self) {
        let mut all: Vec<(usize, Arc<Collected>)> = Vec::new();
        for (i, k) in self.kinds.iter().enumerate() {
            all.extend(k.store.state().into_iter().map(|o| (i, o)));
        }
        let uids: HashSet<String> = all.iter().filter_map(|(_, o)| o.uid()).collect();
        let mut dependents: HashMap<String, Vec<(usize, Arc<Collected>)>> = HashMap::new();
        for (i, o) in &all {
            for r in o.owner_references() {
                dependents
                    .entry(r.uid.clone())
                    .or_default()
                    .push((*i, o.clone()));
            }
        }
        for (i, o) in &all {
            if o.metadata.deletion_timestamp.is_none() {
                continue;
            }
            let uid = o.uid().unwrap_or_default();
            let deps = dependents.get(&uid).cloned().unwrap_or_default();
            if has_finalizer(o, FOREGROUND) {
                if deps.is_empty() {
                    self.remove_finalizer(*i, o, FOREGROUND).await;
                } else {
                    self.tell_waiting(*i, o, &deps).await;
                    for (di, d) in &deps {
                        if d.metadata.deletion_timestamp.is_none() {
                            self.delete(*di, d, PropagationPolicy::Foreground).await;
                        }
                    }
                }
            } else if has_finalizer(o, ORPHAN) {
                for (di, d) in &deps {
                    self.drop_owner_refs(*di, d, std::slice::from_ref(&uid))
                        .await;
                }
                if deps.is_empty() {
                    self.remove_finalizer(*i, o, ORPHAN).await;
                }
            }
        }
        for (i, o) in &all {
            let refs = o.owner_references();
            if refs.is_empty() {
                continue;
            }
            let missing: Vec<&OwnerReference> =
                refs.iter().filter(|r| !uids.contains(&r.uid)).collect();
            if missing.is_empty() {
                continue;
            }
            let mut gone = Vec::new();
            for r in missing {
                if self.owner_gone(r, o.namespace().as_deref()).await {
                    gone.push(r.uid.clone());
                }
            }
            if gone.is_empty() {
                continue;
            }
            if gone.len() == refs.len() {
                self.delete(*i, o, PropagationPolicy::Background).await;
            } else {
                self.drop_owner_refs(*i, o, &gone).await;
            }
        }
    }

    /// Says on the owner, as an Event, which dependents its foreground deletion waits for.
    async fn tell_waiting(&self, kind: usize, owner: &Collected, deps: &[(usize, Arc<Collected>)]) {
        let mut names: Vec<String> = deps
            .iter()
            .map(|(k, d)| format!("{}/{}", self.kinds[*k].ar.kind, d.name_any()))
            .collect();
        names.sort();
        let shown = names
            .iter()
            .take(10)
            .cloned()
            .collect::<Vec<_>>()
            .join(", ");
        let more = if names.len() > 10 {
            format!(" and {} more", names.len() - 10)
        } else {
            String::new()
        };
        let note = format!(
            "waiting for {} dependent(s) to be deleted: {shown}{more}",
            names.len()
        );
        let uid = owner.uid().unwrap_or_default();
        if self
            .told
            .lock()
            .ok()
            .and_then(|t| t.get(&uid).cloned())
            .as_deref()
            == Some(note.as_str())
        {
            return;
        }
        let reference = owner.object_ref(&self.kinds[kind].ar);
        let told = stratus_runtime::events::publish(
            &self.recorder,
            &reference,
            EventType::Normal,
            "ForegroundDelete",
            "WaitingForDependents",
            note.clone(),
        )
        .await;
        // Not recorded: told again on the next pass.
        if told && let Ok(mut t) = self.told.lock() {
            t.insert(uid, note);
        }
    }

    /// Confirms with a live read that the owner a reference names no longer exists.
    async fn owner_gone(&self, r: &OwnerReference, namespace: Option<&str>) -> bool {
        let Some(&kind) = self.by_kind.get(&(r.api_version.clone(), r.kind.clone())) else {
            // An owner of a kind nobody serves cannot exist.
            return true;
        };
        match self.api(kind, namespace).get_opt(&r.name).await {
            Ok(Some(owner)) => owner.uid().as_deref() != Some(r.uid.as_str()),
            Ok(None) => true,
            Err(e) => {
                tracing::debug!(error = %e, owner = %r.name, "cannot confirm owner is gone; will retry");
                false
            }
        }
    }

    async fn delete(&self, kind: usize, o: &Collected, policy: PropagationPolicy) {
        let dp = DeleteParams {
            propagation_policy: Some(policy),
            preconditions: Some(Preconditions {
                uid: o.uid(),
                resource_version: None,
            }),
            ..Default::default()
        };
        let name = o.name_any();
        match self
            .api(kind, o.namespace().as_deref())
            .delete(&name, &dp)
            .await
        {
            Ok(_) => tracing::info!(kind = %self.kinds[kind].ar.kind, %name, "garbage-collected"),
            Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => {}
            Err(e) => tracing::warn!(error = %e, %name, "garbage collection failed; will retry"),
        }
    }

    async fn patch_meta(&self, kind: usize, o: &Collected, meta: serde_json::Value) {
        let mut meta = meta;
        meta["resourceVersion"] = json!(o.resource_version());
        let name = o.name_any();
        let pp = PatchParams {
            field_manager: Some("stratus-gc".into()),
            ..Default::default()
        };
        match self
            .api(kind, o.namespace().as_deref())
            .patch(&name, &pp, &Patch::Merge(json!({"metadata": meta})))
            .await
        {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => {}
            Err(e) => {
                tracing::warn!(error = %e, %name, "garbage collector update failed; will retry")
            }
        }
    }

    async fn remove_finalizer(&self, kind: usize, o: &Collected, f: &str) {
        let rest: Vec<&String> = o.finalizers().iter().filter(|x| *x != f).collect();
        let rest = if rest.is_empty() {
            serde_json::Value::Null
        } else {
            json!(rest)
        };
        self.patch_meta(kind, o, json!({"finalizers": rest})).await;
    }

    async fn drop_owner_refs(&self, kind: usize, o: &Collected, uids: &[String]) {
        let keep: Vec<&OwnerReference> = o
            .owner_references()
            .iter()
            .filter(|r| !uids.contains(&r.uid))
            .collect();
        // null removes the field: an orphan is left with no ownerReferences at all.
        let refs = if keep.is_empty() {
            serde_json::Value::Null
        } else {
            json!(keep)
        };
        self.patch_meta(kind, o, json!({"ownerReferences": refs}))
            .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cache_keeps_what_collection_reads_and_nothing_else() {
        let mut o: Collected = serde_json::from_value(json!({
            "apiVersion": "compute.stratus.dev/v1", "kind": "Server",
            "metadata": {"name": "web", "namespace": "demo", "uid": "u1", "resourceVersion": "7",
                "labels": {"a": "b"}, "annotations": {"big": "x".repeat(1000)},
                "finalizers": ["foregroundDeletion"],
                "deletionTimestamp": "2026-01-01T00:00:00Z",
                "ownerReferences": [{"apiVersion": "v1", "kind": "X", "name": "o", "uid": "u0"}],
                "managedFields": [{"manager": "m"}]},
            "spec": {"userData": "x".repeat(1000)},
            "status": {"phase": "Running"},
        }))
        .expect("an object");
        slim(&mut o);
        // Nothing but metadata is kept.
        assert_eq!(
            serde_json::to_value(&o)
                .expect("encodes")
                .as_object()
                .map(|m| m.len()),
            Some(1)
        );
        assert_eq!(
            (o.name_any(), o.namespace(), o.uid(), o.resource_version()),
            (
                "web".into(),
                Some("demo".into()),
                Some("u1".into()),
                Some("7".into())
            )
        );
        assert!(has_finalizer(&o, FOREGROUND));
        assert!(o.metadata.deletion_timestamp.is_some());
        assert_eq!(o.owner_references()[0].uid, "u0");
        assert!(o.metadata.annotations.is_none() && o.metadata.managed_fields.is_none());
    }
}
