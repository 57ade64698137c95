//! The watch cache: per resource type, every object's stored bytes and what selectors look at
//! (labels and the type's selectable fields), kept by the type's shared watch feed, so that a
//! LIST with selectors or `resourceVersion=0` costs what it returns (kube-apiserver's cacher).
//!
//! # Guarantees
//! - A ready cache holds the type's objects exactly as etcd held them at its revision: it is
//!   built from one read of the type at a revision R, then follows the shared feed from R + 1,
//!   applying each revision's changes together (the feed never splits one).
//! - A cache that may have missed a change (etcd compacted what its feed needed, it fell too
//!   far behind the feed, the feed ended) is not served from; it reads the type again and
//!   follows the feed from there, with a capped backoff while etcd cannot be read.
//! - A page at a given revision (a continued list) is answered only when the cache can prove
//!   that part of the collection has not changed since that revision; otherwise the caller
//!   reads etcd at that revision.
//! - A cache no LIST or watch has asked for during the hub's idle period is stopped and
//!   dropped (see [`crate::storage::hub::Hub::cache`]); the next LIST builds it again.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::Duration;

use bytes::Bytes;
use serde_json::Value;
use tokio::sync::{broadcast, watch};

use crate::storage::hub::{Change, Hub, Item};
use crate::storage::store::StoreError;

/// The first pause before reading the type again after a failed build.
const MIN_PAUSE: Duration = Duration::from_millis(100);
/// The longest pause between builds.
const MAX_PAUSE: Duration = Duration::from_secs(10);
/// How often a reader waiting for the cache to catch up asks the feed for progress again.
const PROGRESS_AGAIN: Duration = Duration::from_millis(250);

/// One cached object.
#[derive(Debug)]
pub struct Entry {
    rev: i64,
    stored: Bytes,
    labels: Box<[(Box<str>, Box<str>)]>,
    /// The values of the cache's selectable fields, in its order.
    fields: Box<[Box<str>]>,
}

impl Entry {
    fn new(rev: i64, stored: Bytes, obj: &Value, paths: &[String]) -> Self {
        let labels = obj
            .pointer("/metadata/labels")
            .and_then(Value::as_object)
            .map(|m| {
                m.iter()
                    .filter_map(|(k, v)| Some((k.as_str().into(), v.as_str()?.into())))
                    .collect()
            })
            .unwrap_or_default();
        let fields = paths
            .iter()
            .map(|p| field_text(obj, p).into_boxed_str())
            .collect();
        Self {
            rev,
            stored,
            labels,
            fields,
        }
    }

    /// Bytes this entry holds beyond its stored value (labels, fields, the entry itself).
    fn overhead(&self) -> usize {
        std::mem::size_of::<Self>()
            + self
                .labels
                .iter()
                .map(|(k, v)| k.len() + v.len() + 32)
                .sum::<usize>()
            + self.fields.iter().map(|f| f.len() + 16).sum::<usize>()
    }
}

/// A cached object as a selector sees it.
#[derive(Debug, Clone, Copy)]
pub struct Object<'a> {
    entry: &'a Entry,
    paths: &'a [String],
}

impl<'a> Object<'a> {
    /// The value of label `key`.
    pub fn label(&self, key: &str) -> Option<&'a str> {
        self.entry
            .labels
            .iter()
            .find(|(k, _)| &**k == key)
            .map(|(_, v)| &**v)
    }

    /// The value of the selectable field `path` as a field selector compares it (see
    /// [`field_text`]); `None` for a field the cache does not keep.
    pub fn field(&self, path: &str) -> Option<&'a str> {
        let path = path.trim_start_matches('.');
        let i = self.paths.iter().position(|p| p == path)?;
        self.entry.fields.get(i).map(|f| &**f)
    }
}

/// A field's value as a field selector compares it: strings as is, other scalars in JSON
/// form, an absent field or `null` as "".
pub fn field_text(obj: &Value, path: &str) -> String {
    let mut cur = obj;
    for seg in path.trim_start_matches('.').split('.') {
        match cur.get(seg) {
            Some(v) => cur = v,
            None => return String::new(),
        }
    }
    match cur {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// One page read from the cache.
#[derive(Debug)]
pub struct Page {
    /// The selected objects, in key order: (`resourceVersion`, value as stored).
    pub items: Vec<(i64, Bytes)>,
    /// The revision the page shows the collection at.
    pub revision: i64,
    /// When the page stopped at its limit with keys left after it: its last key.
    pub last_key: Option<String>,
}

#[derive(Debug, Default)]
struct State {
    ready: bool,
    /// Every change up to this revision is applied, none after it.
    revision: i64,
    /// The revision the cache was read at: it knows every change after it.
    since: i64,
    /// The revision of the last deletion applied.
    last_delete: i64,
    objects: BTreeMap<Box<str>, Entry>,
}

impl State {
    /// Applies one revision's changes.
    fn apply(&mut self, changes: &[Arc<Change>], paths: &[String]) {
        for c in changes {
            match (&c.new, &c.stored) {
                (Some(obj), Some(stored)) => {
                    let entry = Entry::new(c.rev, stored.clone(), obj, paths);
                    self.objects.insert(c.key.as_str().into(), entry);
                }
                _ => {
                    self.objects.remove(c.key.as_str());
                    self.last_delete = self.last_delete.max(c.rev);
                }
            }
            self.revision = self.revision.max(c.rev);
        }
    }
}

/// What a cache holds, for measuring it.
#[derive(Debug, Clone, Copy, Default)]
pub struct Footprint {
    /// Objects.
    pub objects: usize,
    /// Bytes of their stored values.
    pub stored_bytes: usize,
    /// Bytes of keys, labels, field values and entries (an estimate).
    pub index_bytes: usize,
}

/// The watch cache of one resource type.
#[derive(Debug)]
pub struct Cache {
    prefix: String,
    /// The selectable fields kept, without a leading `.`.
    paths: Vec<String>,
    state: RwLock<State>,
    /// The revision the cache has caught up to; 0 while it is not ready.
    caught_up: watch::Sender<i64>,
    /// When a LIST or watch last asked for the cache.
    used: Mutex<tokio::time::Instant>,
    /// Set once the cache is dropped: its task ends.
    stopped: watch::Sender<bool>,
}

impl Cache {
    /// A cache of the type under `prefix`, keeping the values of `fields`, built and kept by
    /// a task of its own (which ends once `hub` is gone).
    pub(crate) fn start(hub: Weak<Hub>, prefix: &str, fields: Vec<String>) -> Arc<Self> {
        let cache = Arc::new(Self {
            prefix: prefix.to_string(),
            paths: fields
                .into_iter()
                .map(|f| f.trim_start_matches('.').to_string())
                .collect(),
            state: RwLock::new(State::default()),
            caught_up: watch::Sender::new(0),
            used: Mutex::new(tokio::time::Instant::now()),
            stopped: watch::Sender::new(false),
        });
        let mut stopped = cache.stopped.subscribe();
        let task = run(Arc::clone(&cache), hub);
        tokio::spawn(async move {
            tokio::select! {
                () = task => {}
                _ = stopped.wait_for(|s| *s) => {}
            }
        });
        cache
    }

    /// Records a use of the cache (a LIST or watch asked for it).
    pub(crate) fn touch(&self) {
        if let Ok(mut used) = self.used.lock() {
            *used = tokio::time::Instant::now();
        }
    }

    /// How long since a LIST or watch last asked for the cache.
    pub(crate) fn idle(&self) -> Duration {
        self.used.lock().map(|u| u.elapsed()).unwrap_or_default()
    }

    /// Stops the cache for good: its task ends (with its feed subscription) and what it
    /// holds is freed once no reader holds it; a reader that still does finds it not ready
    /// and reads etcd.
    pub(crate) fn stop(&self) {
        self.stopped.send_replace(true);
        self.invalidate();
    }

    /// The revision the cache has caught up to, once it is ready.
    pub fn revision(&self) -> Option<i64> {
        Some(*self.caught_up.borrow()).filter(|r| *r > 0)
    }

    /// What the cache holds now.
    pub fn footprint(&self) -> Footprint {
        let Ok(st) = self.state.read() else {
            return Footprint::default();
        };
        Footprint {
            objects: st.objects.len(),
            stored_bytes: st.objects.values().map(|e| e.stored.len()).sum(),
            index_bytes: st
                .objects
                .iter()
                .map(|(k, e)| k.len() + 48 + e.overhead())
                .sum(),
        }
    }

    /// Waits until the cache is ready and has applied every change up to revision `min`
    /// (0: any state), asking the feed for progress reports while it is behind; false when
    /// that takes longer than `timeout` (the caller then reads etcd).
    pub async fn wait(&self, hub: &Hub, min: i64, timeout: Duration) -> bool {
        let mut rx = self.caught_up.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let at = *rx.borrow_and_update();
            if at > 0 && at >= min {
                return true;
            }
            if at > 0 {
                hub.request_progress(&self.prefix);
            }
            let until = deadline.min(tokio::time::Instant::now() + PROGRESS_AGAIN);
            match tokio::time::timeout_at(until, rx.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return false,
                Err(_) if tokio::time::Instant::now() >= deadline => return false,
                Err(_) => {}
            }
        }
    }

    /// The objects under `prefix` (the type's, or a namespace's) from key `start` on, selected
    /// by `select`, at most `limit` of them (0: all). With `at`, the page shows the collection
    /// at that revision (a continued list) or is not answered; without, at the cache's
    /// current revision. `None` when the cache is not ready or cannot show revision `at`.
    pub fn page(
        &self,
        prefix: &str,
        start: Option<&str>,
        limit: usize,
        at: Option<i64>,
        select: impl Fn(Object<'_>) -> bool,
    ) -> Option<Page> {
        let st = self.state.read().ok()?;
        if !st.ready {
            return None;
        }
        if let Some(rev) = at
            && (rev < st.since || rev > st.revision || st.last_delete > rev)
        {
            return None;
        }
        let from = start.unwrap_or(prefix);
        let mut items = Vec::new();
        let mut last_key = None;
        let mut range = st
            .objects
            .range::<str, _>((Bound::Included(from), Bound::Unbounded))
            .take_while(|(k, _)| k.starts_with(prefix))
            .peekable();
        while let Some((key, entry)) = range.next() {
            if at.is_some_and(|rev| entry.rev > rev) {
                return None;
            }
            let object = Object {
                entry,
                paths: &self.paths,
            };
            if !select(object) {
                continue;
            }
            items.push((entry.rev, entry.stored.clone()));
            if limit > 0 && items.len() >= limit {
                if range.peek().is_some() {
                    last_key = Some(key.to_string());
                }
                break;
            }
        }
        Some(Page {
            items,
            revision: at.unwrap_or(st.revision),
            last_key,
        })
    }

    fn publish(&self, st: &State) {
        self.caught_up
            .send_replace(if st.ready { st.revision.max(1) } else { 0 });
    }

    /// Forgets everything: nothing is served until the next build.
    fn invalidate(&self) {
        if let Ok(mut st) = self.state.write() {
            *st = State::default();
            self.publish(&st);
        }
    }

    /// Reads the whole type at the current revision and subscribes to the shared feed just
    /// after it; the cache is then ready.
    async fn build(&self, hub: &Hub) -> Result<broadcast::Receiver<Item>, BuildError> {
        let mut scan = hub.store().scan(&self.prefix, None, 0, 0);
        let mut objects = BTreeMap::new();
        while let Some(page) = scan.next_raw().await? {
            for kv in page {
                let key = String::from_utf8_lossy(&kv.key).into_owned();
                let obj: Value = match serde_json::from_slice(&kv.value) {
                    Ok(v) => v,
                    Err(e) => {
                        tracing::warn!(key, error = %e, "watch cache: a stored value is not JSON; left out");
                        continue;
                    }
                };
                let entry = Entry::new(kv.mod_revision, Bytes::from(kv.value), &obj, &self.paths);
                objects.insert(key.into_boxed_str(), entry);
            }
        }
        let read_at = scan.revision();
        let sub = hub
            .subscribe_shared(&self.prefix, read_at + 1)
            .await?
            .ok_or(BuildError::FeedAhead)?;
        if sub.gone.is_some() {
            return Err(BuildError::FeedAhead);
        }
        let mut st = self.state.write().map_err(|_| StoreError::Poisoned)?;
        *st = State {
            ready: true,
            revision: read_at,
            since: read_at,
            last_delete: 0,
            objects,
        };
        // The feed's history ends where a batch ends: whole revisions.
        st.apply(&sub.past, &self.paths);
        self.publish(&st);
        Ok(sub.rx)
    }

    /// Applies the feed's changes until the cache can no longer be sure it has them all.
    async fn follow(&self, mut rx: broadcast::Receiver<Item>) -> &'static str {
        let mut pending: Vec<Arc<Change>> = Vec::new();
        loop {
            // A revision is applied whole: once a later one, or a report that it has been
            // sent in full, arrives.
            let (change, progress) = match rx.recv().await {
                Ok(Item::Change(c)) => (Some(c), None),
                Ok(Item::Progress(rev)) => (None, Some(rev)),
                Ok(Item::Gone(_)) => return "etcd compacted the revisions its feed needed",
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    return "it fell too far behind its feed";
                }
                Err(broadcast::error::RecvError::Closed) => return "its feed ended",
            };
            let newer = match &change {
                Some(c) => pending.first().is_some_and(|p| p.rev != c.rev),
                None => true,
            };
            if newer {
                let Ok(mut st) = self.state.write() else {
                    return "its lock was poisoned";
                };
                st.apply(&pending, &self.paths);
                pending.clear();
                if let Some(rev) = progress {
                    st.revision = st.revision.max(rev);
                }
                self.publish(&st);
            }
            pending.extend(change);
        }
    }
}

/// Why a build failed.
#[derive(Debug, thiserror::Error)]
enum BuildError {
    #[error("read the type")]
    Store(#[from] StoreError),
    #[error("the shared feed no longer holds the changes after the read")]
    FeedAhead,
}

/// Builds the cache and keeps it, rebuilding it whenever it may have missed a change.
async fn run(cache: Arc<Cache>, hub: Weak<Hub>) {
    let mut pause = MIN_PAUSE;
    loop {
        let rx = {
            let Some(hub) = hub.upgrade() else { return };
            cache.build(&hub).await
        };
        match rx {
            Ok(rx) => {
                let began = tokio::time::Instant::now();
                let why = cache.follow(rx).await;
                cache.invalidate();
                if began.elapsed() > MAX_PAUSE * 3 {
                    pause = MIN_PAUSE;
                }
                tracing::info!(
                    prefix = cache.prefix,
                    why,
                    "watch cache reading its type again"
                );
            }
            Err(e) => {
                cache.invalidate();
                tracing::warn!(prefix = cache.prefix, error = %e, "watch cache could not be built");
            }
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(MAX_PAUSE);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    use crate::storage::store::{Store, Write};

    const TYPE: &str = "/r/compute.stratus.dev/servers/";

    fn fields() -> Vec<String> {
        vec![
            "metadata.name".into(),
            "metadata.namespace".into(),
            ".status.hypervisor".into(),
        ]
    }

    fn server(ns: &str, name: &str, tier: &str, node: Option<&str>) -> Value {
        let mut s = json!({
            "kind": "Server",
            "metadata": {"name": name, "namespace": ns, "labels": {"tier": tier}},
            "spec": {"flavor": "small"},
        });
        if let Some(node) = node {
            s["status"] = json!({"hypervisor": node});
        }
        s
    }

    fn key(ns: &str, name: &str) -> String {
        format!("{TYPE}{ns}/{name}")
    }

    async fn put(store: &Store, ns: &str, name: &str, obj: &Value) -> i64 {
        let k = key(ns, name);
        let current = store.get(&k).await.expect("get").map(|s| s.mod_revision);
        let w = match current {
            Some(rev) => store.update(&k, obj, rev).await,
            None => store.create(&k, obj).await,
        };
        match w.expect("write") {
            Write::Done(rev) => rev,
            Write::Conflict(rev) => panic!("conflict at {rev}"),
        }
    }

    /// A hub on a fresh store and the cache of [`TYPE`], ready.
    async fn ready(store: &Store) -> (Arc<Hub>, Arc<Cache>) {
        let hub = Arc::new(Hub::new(store.clone(), Duration::from_secs(60)));
        let cache = hub.cache(TYPE, &fields()).expect("cache");
        assert!(cache.wait(&hub, 0, Duration::from_secs(5)).await, "built");
        (hub, cache)
    }

    /// Names and revisions of the page's objects (decoded from the bytes kept).
    fn shown(page: &Page) -> Vec<(String, i64)> {
        page.items
            .iter()
            .map(|(rev, stored)| {
                let v: Value = serde_json::from_slice(stored).expect("stored JSON");
                (
                    v["metadata"]["name"].as_str().expect("name").to_string(),
                    *rev,
                )
            })
            .collect()
    }

    fn all(cache: &Cache, prefix: &str) -> Page {
        cache.page(prefix, None, 0, None, |_| true).expect("ready")
    }

    /// Waits until the cache has every change etcd (here memory) has.
    async fn caught_up(hub: &Hub, cache: &Cache) -> i64 {
        let now = hub.store().revision().await.expect("revision");
        assert!(
            cache.wait(hub, now, Duration::from_secs(5)).await,
            "caught up"
        );
        now
    }

    #[tokio::test]
    async fn the_cache_follows_creates_updates_and_deletes_in_order() {
        let store = Store::memory();
        let a = put(&store, "p1", "a", &server("p1", "a", "web", None)).await;
        put(&store, "p2", "b", &server("p2", "b", "db", None)).await;
        let (hub, cache) = ready(&store).await;
        assert_eq!(shown(&all(&cache, TYPE)).len(), 2);

        let c = put(&store, "p1", "c", &server("p1", "c", "web", None)).await;
        let b2 = put(&store, "p2", "b", &server("p2", "b", "web", Some("n1"))).await;
        store.delete(&key("p1", "a"), a, &[]).await.expect("delete");
        let now = caught_up(&hub, &cache).await;

        let page = all(&cache, TYPE);
        assert!(page.revision >= now);
        assert_eq!(
            shown(&page),
            [("c".to_string(), c), ("b".to_string(), b2)],
            "key order: p1/c before p2/b; a deleted; b at its update's revision"
        );
        // The bytes kept are the bytes stored.
        let stored = store.get(&key("p2", "b")).await.expect("get").expect("b");
        let cached: Value = serde_json::from_slice(&page.items[1].1).expect("JSON");
        assert_eq!(cached, stored.value);
        // A namespace's prefix holds only its own.
        assert_eq!(
            shown(&all(&cache, &format!("{TYPE}p1/"))),
            [("c".to_string(), c)]
        );
    }

    #[tokio::test]
    async fn labels_and_selectable_fields_are_read_from_the_cached_object() {
        let store = Store::memory();
        put(&store, "p1", "a", &server("p1", "a", "web", Some("n1"))).await;
        put(&store, "p1", "b", &server("p1", "b", "db", None)).await;
        let (_hub, cache) = ready(&store).await;
        let pick = |f: &dyn Fn(Object<'_>) -> bool| {
            shown(&cache.page(TYPE, None, 0, None, f).expect("ready"))
                .into_iter()
                .map(|(n, _)| n)
                .collect::<Vec<_>>()
        };
        assert_eq!(pick(&|o| o.label("tier") == Some("web")), ["a"]);
        assert_eq!(pick(&|o| o.label("zone").is_none()), ["a", "b"]);
        assert_eq!(pick(&|o| o.field("status.hypervisor") == Some("n1")), ["a"]);
        // An absent field reads as "", as a field selector compares it.
        assert_eq!(pick(&|o| o.field(".status.hypervisor") == Some("")), ["b"]);
        assert_eq!(
            pick(&|o| o.field("metadata.namespace") == Some("p1")).len(),
            2
        );
        // A field the cache does not keep is not made up.
        assert_eq!(pick(&|o| o.field("spec.flavor").is_some()).len(), 0);
    }

    #[tokio::test]
    async fn any_state_is_served_at_once_and_a_consistent_read_waits_for_the_write() {
        let store = Store::memory();
        put(&store, "p1", "a", &server("p1", "a", "web", None)).await;
        let (hub, cache) = ready(&store).await;
        let before = cache.revision().expect("ready");
        let b = put(&store, "p1", "b", &server("p1", "b", "web", None)).await;
        // Nothing has run since the write: the cache shows the state before it, and says so.
        let any = all(&cache, TYPE);
        assert_eq!(any.revision, before);
        assert!(any.revision < b);
        assert_eq!(shown(&any).len(), 1);
        // Waiting for etcd's current revision brings the write in.
        caught_up(&hub, &cache).await;
        let now = all(&cache, TYPE);
        assert!(now.revision >= b);
        assert_eq!(shown(&now)[1], ("b".to_string(), b));
    }

    #[tokio::test]
    async fn a_consistent_read_waits_for_progress_when_the_type_is_quiet() {
        let store = Store::memory();
        put(&store, "p1", "a", &server("p1", "a", "web", None)).await;
        let (hub, cache) = ready(&store).await;
        // Writes elsewhere raise etcd's revision; only a progress report tells the cache it
        // has missed nothing (the feed reports every 60 s on its own).
        for i in 0..3 {
            store
                .create(
                    &format!("/r/other/{i}"),
                    &json!({"metadata": {"name": "x"}}),
                )
                .await
                .expect("create");
        }
        let now = store.revision().await.expect("revision");
        assert!(cache.revision().expect("ready") < now);
        assert!(cache.wait(&hub, now, Duration::from_secs(5)).await);
        assert!(all(&cache, TYPE).revision >= now);
    }

    #[tokio::test]
    async fn pages_at_a_revision_are_served_only_while_that_part_is_unchanged() {
        let store = Store::memory();
        for n in ["a", "b", "c", "d"] {
            put(&store, "p1", n, &server("p1", n, "web", None)).await;
        }
        let (hub, cache) = ready(&store).await;
        let first = cache.page(TYPE, None, 2, None, |_| true).expect("ready");
        assert_eq!(first.last_key.as_deref(), Some(key("p1", "b").as_str()));
        let at = first.revision;
        let next = format!("{}\0", key("p1", "b"));
        let second = cache
            .page(TYPE, Some(&next), 2, Some(at), |_| true)
            .expect("unchanged since");
        assert_eq!(shown(&second).len(), 2);
        assert_eq!(second.revision, at);
        assert_eq!(second.last_key, None, "nothing after d");

        // A change before the continued part leaves it servable; one inside it does not.
        put(&store, "p1", "a", &server("p1", "a", "db", None)).await;
        caught_up(&hub, &cache).await;
        assert!(
            cache
                .page(TYPE, Some(&next), 2, Some(at), |_| true)
                .is_some()
        );
        put(&store, "p1", "d", &server("p1", "d", "db", None)).await;
        caught_up(&hub, &cache).await;
        assert!(
            cache
                .page(TYPE, Some(&next), 2, Some(at), |_| true)
                .is_none()
        );
        // So does any deletion since (the cache no longer knows what was where).
        let first = cache.page(TYPE, None, 2, None, |_| true).expect("ready");
        let a = store.get(&key("p1", "a")).await.expect("get").expect("a");
        store
            .delete(&key("p1", "a"), a.mod_revision, &[])
            .await
            .expect("delete");
        caught_up(&hub, &cache).await;
        assert!(
            cache
                .page(TYPE, Some(&next), 2, Some(first.revision), |_| true)
                .is_none()
        );
        // Nor a revision before the cache was read, or after what it has.
        assert!(cache.page(TYPE, None, 2, Some(1), |_| true).is_none());
        assert!(
            cache
                .page(TYPE, None, 2, Some(i64::MAX), |_| true)
                .is_none()
        );
    }

    #[tokio::test]
    async fn a_cache_that_loses_its_feed_reads_its_type_again_and_misses_nothing() {
        let store = Store::memory();
        let a = put(&store, "p1", "a", &server("p1", "a", "web", None)).await;
        put(&store, "p1", "b", &server("p1", "b", "web", None)).await;
        let (hub, cache) = ready(&store).await;
        let built_at = cache.revision().expect("ready");

        // The feed's watch breaks; these changes reach no watch at all.
        store.cancel_watches();
        let c = put(&store, "p1", "c", &server("p1", "c", "web", None)).await;
        store.delete(&key("p1", "a"), a, &[]).await.expect("delete");
        let now = store.revision().await.expect("revision");

        // Until it has read the type again, it answers nothing rather than the old state.
        assert!(
            cache.wait(&hub, now, Duration::from_secs(5)).await,
            "rebuilt"
        );
        let page = all(&cache, TYPE);
        assert!(page.revision >= now && page.revision > built_at);
        assert_eq!(
            shown(&page).into_iter().map(|(n, _)| n).collect::<Vec<_>>(),
            ["b", "c"]
        );
        assert_eq!(shown(&page)[1].1, c);
        // And it follows the new feed.
        let d = put(&store, "p1", "d", &server("p1", "d", "web", None)).await;
        caught_up(&hub, &cache).await;
        assert_eq!(
            shown(&all(&cache, TYPE)).last(),
            Some(&("d".to_string(), d))
        );
    }

    #[tokio::test]
    async fn a_cache_is_not_served_while_its_feed_is_broken() {
        let store = Store::memory();
        put(&store, "p1", "a", &server("p1", "a", "web", None)).await;
        let (_hub, cache) = ready(&store).await;
        store.cancel_watches();
        // Let the feed see the cancel and the cache drop what it held (it reads its type
        // again only after a pause, which yielding does not reach).
        for _ in 0..1000 {
            if cache.revision().is_none() {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert!(cache.revision().is_none(), "not ready once its feed ended");
        assert!(cache.page(TYPE, None, 0, None, |_| true).is_none());
    }

    #[tokio::test]
    async fn a_cache_nothing_asks_for_is_dropped_and_built_again_when_asked() {
        let store = Store::memory();
        put(&store, "p1", "a", &server("p1", "a", "web", None)).await;
        let idle = Duration::from_millis(300);
        let hub = Arc::new(Hub::new(store.clone(), Duration::from_secs(60)).with_cache_idle(idle));
        let cache = hub.cache(TYPE, &fields()).expect("cache");
        assert!(cache.wait(&hub, 0, Duration::from_secs(5)).await, "built");
        let held = Arc::downgrade(&cache);
        drop(cache);
        // Asked for more often than the idle period, for several periods: kept.
        for _ in 0..8 {
            tokio::time::sleep(idle / 3).await;
            assert!(hub.cache(TYPE, &fields()).is_some());
        }
        assert_eq!(hub.caches().len(), 1);
        assert!(held.upgrade().is_some(), "kept while asked for");
        // Not asked for: dropped, its task ended and what it held freed.
        let started = tokio::time::Instant::now();
        while held.strong_count() > 0 {
            assert!(
                started.elapsed() < idle * 10,
                "dropped after {idle:?} unused"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(hub.caches().is_empty());
        // A change meanwhile, then the next LIST builds the cache again and sees it.
        let b = put(&store, "p1", "b", &server("p1", "b", "web", None)).await;
        let again = hub.cache(TYPE, &fields()).expect("cache");
        assert_eq!(caught_up(&hub, &again).await, b);
        let names: Vec<String> = shown(&all(&again, TYPE))
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(names, ["a", "b"]);
        // And the sweeper started again with it: dropped again once unused.
        let held = Arc::downgrade(&again);
        drop(again);
        let started = tokio::time::Instant::now();
        while held.strong_count() > 0 {
            assert!(started.elapsed() < idle * 10, "dropped again");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
