//! One watch per kind shared by the controllers that read it: one decoded (slimmed) copy of
//! each object in one reflector store, and every change told to each subscriber.
//!
//! kube-runtime's shared stores (`store_shared`, `ReflectHandle`) do the same with
//! backpressure on the watch; they wait forever when an object is deleted before a
//! subscriber reads it, and tell no deletions. Here the watch never waits for a subscriber:
//! one that falls behind is told to read everything again, which a level-triggered
//! controller handles as it handles a relist.

use std::pin::pin;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use kube::runtime::reflector::{Lookup, ObjectRef, Store, store::Writer};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use stratus_api_types::compute::{Flavor, Server};
use tokio::sync::broadcast;

/// Changes a subscriber may be behind by before it is told to read everything again.
const BACKLOG: usize = 4096;

/// What the watch saw, as told to subscribers.
enum Told<K: Lookup>
where
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    /// The object was created or changed (read it from the store: it may have changed since).
    Applied(ObjectRef<K>),
    /// The object was deleted: its last state.
    Deleted(Arc<K>),
    /// Everything may have changed (a relist, or a subscriber that fell behind).
    Relisted,
}

impl<K: Lookup> Clone for Told<K>
where
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    fn clone(&self) -> Self {
        match self {
            Self::Applied(r) => Self::Applied(r.clone()),
            Self::Deleted(o) => Self::Deleted(Arc::clone(o)),
            Self::Relisted => Self::Relisted,
        }
    }
}

/// A change as a subscriber sees it.
#[derive(Debug)]
pub enum Change<K> {
    /// Created or changed: the object as the store has it now.
    Applied(Arc<K>),
    /// Deleted: its last state.
    Deleted(Arc<K>),
    /// Everything may have changed: every object the store has now (a subscriber keeping an
    /// index of its own starts it over from these).
    Relisted(Vec<Arc<K>>),
}

impl<K> Change<K> {
    /// The objects it touched.
    pub fn into_objects(self) -> Vec<Arc<K>> {
        match self {
            Self::Applied(o) | Self::Deleted(o) => vec![o],
            Self::Relisted(all) => all,
        }
    }
}

/// The readable side of a shared watch: its store, and subscriptions to its changes.
pub struct Shared<K: Lookup + Clone + 'static>
where
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    store: Store<K>,
    tx: broadcast::Sender<Told<K>>,
}

impl<K: Lookup + Clone + 'static> Clone for Shared<K>
where
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    fn clone(&self) -> Self {
        Self {
            store: self.store.clone(),
            tx: self.tx.clone(),
        }
    }
}

/// A shared watch over `events` (a watcher's, already slimmed as its readers need): the
/// handle to read it, and the future that runs it (it ends when the watch does).
pub fn shared<K, S>(
    events: S,
    dyntype: K::DynamicType,
) -> (Shared<K>, impl Future<Output = ()> + Send + 'static)
where
    K: Lookup + Clone + Send + Sync + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone + Send + Sync,
    S: Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static,
{
    let mut writer = Writer::new(dyntype.clone());
    let (tx, _) = broadcast::channel(BACKLOG);
    let handle = Shared {
        store: writer.as_reader(),
        tx: tx.clone(),
    };
    let run = async move {
        let mut events = pin!(events);
        while let Some(event) = events.next().await {
            let event = match event {
                Ok(event) => event,
                Err(e) => {
                    tracing::debug!(error = %e, "shared watch error; the watcher backs off and retries");
                    continue;
                }
            };
            writer.apply_watcher_event(&event);
            // No subscriber is no error: there is nobody to tell.
            let _ = match event {
                watcher::Event::Apply(o) => {
                    tx.send(Told::Applied(o.to_object_ref(dyntype.clone())))
                }
                watcher::Event::Delete(o) => tx.send(Told::Deleted(Arc::new(o))),
                watcher::Event::InitDone => tx.send(Told::Relisted),
                watcher::Event::Init | watcher::Event::InitApply(_) => continue,
            };
        }
    };
    (handle, run)
}

/// The shared watch of every Server, each kept without its user data and managed fields
/// ([`crate::slim_server`]): what the scheduler, node lifecycle and ports controllers read,
/// and what wakes the attachments controller.
pub fn servers(client: &Client) -> (Shared<Server>, impl Future<Output = ()> + Send + 'static) {
    shared(
        watcher(
            Api::<Server>::all(client.clone()),
            watcher::Config::default(),
        )
        .default_backoff()
        .modify(crate::slim_server),
        (),
    )
}

/// The shared watch of every Flavor, each kept without its managed fields: what the
/// scheduler and the quota controller read.
pub fn flavors(client: &Client) -> (Shared<Flavor>, impl Future<Output = ()> + Send + 'static) {
    shared(
        watcher(
            Api::<Flavor>::all(client.clone()),
            watcher::Config::default(),
        )
        .default_backoff()
        .modify(|f: &mut Flavor| f.metadata.managed_fields = None),
        (),
    )
}

impl<K> Shared<K>
where
    K: Lookup + Clone + Send + Sync + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone + Send + Sync,
{
    /// The store: one copy of every object, shared by every reader.
    pub fn store(&self) -> Store<K> {
        self.store.clone()
    }

    /// Every change from now on, starting with a [`Change::Relisted`] of what the store
    /// holds (empty before the first list; the list's end is told again).
    pub fn changes(&self) -> impl Stream<Item = Change<K>> + Send + 'static {
        let rx = self.tx.subscribe();
        let store = self.store.clone();
        let first = futures::stream::iter([Told::Relisted]);
        let rest = futures::stream::unfold(rx, |mut rx| async move {
            match rx.recv().await {
                Ok(told) => Some((told, rx)),
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    tracing::debug!(
                        missed,
                        "a shared watch's subscriber fell behind: reading everything again"
                    );
                    Some((Told::Relisted, rx))
                }
                Err(broadcast::error::RecvError::Closed) => None,
            }
        });
        first.chain(rest).filter_map(move |told| {
            let change = match told {
                // Deleted since: its deletion follows.
                Told::Applied(r) => store.get(&r).map(Change::Applied),
                Told::Deleted(o) => Some(Change::Deleted(o)),
                Told::Relisted => Some(Change::Relisted(store.state())),
            };
            futures::future::ready(change)
        })
    }

    /// Every object created, changed or deleted from now on (each one in the store at
    /// first, and after a relist): a controller's trigger stream
    /// (`Controller::for_shared_stream`, `watches_shared_stream`).
    pub fn touched(&self) -> impl Stream<Item = Arc<K>> + Send + 'static {
        self.changes()
            .flat_map(|change| futures::stream::iter(change.into_objects()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::FutureExt;
    use k8s_openapi::api::core::v1::ConfigMap;

    fn cm(name: &str, v: &str) -> ConfigMap {
        let mut c = ConfigMap::default();
        c.metadata.name = Some(name.into());
        c.metadata.namespace = Some("ns".into());
        c.data = Some([("v".to_string(), v.to_string())].into());
        c
    }

    fn value(c: &ConfigMap) -> String {
        c.data
            .as_ref()
            .and_then(|d| d.get("v"))
            .cloned()
            .unwrap_or_default()
    }

    type Events =
        futures::channel::mpsc::UnboundedSender<Result<watcher::Event<ConfigMap>, watcher::Error>>;

    fn watch() -> (Shared<ConfigMap>, Events, tokio::task::JoinHandle<()>) {
        let (tx, rx) = futures::channel::mpsc::unbounded();
        let (shared, run) = shared(rx, ());
        (shared, tx, tokio::spawn(run))
    }

    async fn settle() {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    /// What `stream` has ready now.
    fn ready<T>(stream: &mut (impl Stream<Item = T> + Unpin)) -> Vec<T> {
        std::iter::from_fn(|| stream.next().now_or_never().flatten()).collect()
    }

    fn name(c: &ConfigMap) -> String {
        c.metadata.name.clone().unwrap_or_default()
    }

    #[tokio::test]
    async fn subscribers_see_the_list_then_each_change_and_deletion_from_one_store() {
        let (shared, events, _run) = watch();
        let mut scheduler = Box::pin(shared.touched());
        let mut index = Box::pin(shared.changes());
        // Before the list: nothing yet.
        assert!(matches!(&ready(&mut index)[..], [Change::Relisted(all)] if all.is_empty()));
        assert!(ready(&mut scheduler).is_empty());
        for e in [
            watcher::Event::Init,
            watcher::Event::InitApply(cm("a", "1")),
            watcher::Event::InitApply(cm("b", "1")),
            watcher::Event::InitDone,
        ] {
            events.unbounded_send(Ok(e)).expect("send");
        }
        settle().await;
        let mut listed: Vec<String> = ready(&mut scheduler).iter().map(|o| name(o)).collect();
        listed.sort();
        assert_eq!(listed, ["a", "b"]);
        assert!(matches!(&ready(&mut index)[..], [Change::Relisted(all)] if all.len() == 2));
        for e in [
            watcher::Event::Apply(cm("a", "2")),
            watcher::Event::Delete(cm("b", "1")),
        ] {
            events.unbounded_send(Ok(e)).expect("send");
        }
        settle().await;
        let seen: Vec<String> = ready(&mut scheduler)
            .iter()
            .map(|o| format!("{}={}", name(o), value(o)))
            .collect();
        assert_eq!(seen, ["a=2", "b=1"]);
        let changes = ready(&mut index);
        assert!(
            matches!(&changes[..], [Change::Applied(a), Change::Deleted(b)] if value(a) == "2" && name(b) == "b"),
            "{changes:?}"
        );
        // One copy, seen by every reader.
        assert_eq!(shared.store().state().len(), 1);
    }

    #[tokio::test]
    async fn a_change_to_an_object_deleted_since_is_skipped_without_stopping_the_stream() {
        let (shared, events, _run) = watch();
        events
            .unbounded_send(Ok(watcher::Event::Init))
            .expect("send");
        events
            .unbounded_send(Ok(watcher::Event::InitDone))
            .expect("send");
        settle().await;
        let mut touched = Box::pin(shared.touched());
        assert!(ready(&mut touched).is_empty());
        for e in [
            watcher::Event::Apply(cm("gone", "1")),
            watcher::Event::Delete(cm("gone", "1")),
            watcher::Event::Apply(cm("next", "1")),
        ] {
            events.unbounded_send(Ok(e)).expect("send");
        }
        settle().await;
        // The first change finds nothing in the store; the deletion and the next change
        // still come.
        let names: Vec<String> = ready(&mut touched).iter().map(|o| name(o)).collect();
        assert_eq!(names, ["gone", "next"]);
    }

    #[tokio::test]
    async fn a_subscriber_that_falls_behind_reads_everything_again() {
        let (shared, events, _run) = watch();
        let mut slow = Box::pin(shared.changes());
        assert!(matches!(slow.next().await, Some(Change::Relisted(_))));
        events
            .unbounded_send(Ok(watcher::Event::Init))
            .expect("send");
        events
            .unbounded_send(Ok(watcher::Event::InitDone))
            .expect("send");
        let last = BACKLOG + 10;
        for i in 0..=last {
            let o = cm(&format!("o{}", i % 7), &i.to_string());
            events
                .unbounded_send(Ok(watcher::Event::Apply(o)))
                .expect("send");
        }
        let newest = ObjectRef::new(&format!("o{}", last % 7)).within("ns");
        while shared
            .store()
            .get(&newest)
            .is_none_or(|o| value(&o) != last.to_string())
        {
            tokio::task::yield_now().await;
        }
        // Behind by more than the backlog: told to read everything, which is all 7.
        match slow.next().await {
            Some(Change::Relisted(all)) => assert_eq!(all.len(), 7),
            other => panic!("expected a relist, got {other:?}"),
        }
    }
}
