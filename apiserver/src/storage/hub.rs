//! Shared watch feeds: one store watch per resource type and API server, decoded once and fanned
//! out to every client watch of that type, with a bounded history so watches starting a
//! little in the past are served from memory (what kube-apiserver's watch cache does).
//!
//! # Guarantees
//! A subscriber gets every change with a revision at or after the one it asked for, in
//! revision order, with no gap and no duplicate — or no subscription at all (`None`), when the
//! shared feed cannot prove it has every such change; the subscriber then gets a private feed.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use bytes::Bytes;
use serde_json::Value;
use tokio::sync::{Notify, broadcast};

use crate::base::meta::with_rv;
use crate::storage::cache::Cache;
use crate::storage::kv::{Event, KeyValue, WatchFeed, WatchMsg};
use crate::storage::store::{Store, StoreError};

/// Changes kept in memory per resource type (a watch resuming from further back gets a private
/// etcd watch instead; memory stays bounded at a few MB per busy type).
const HISTORY: usize = 1024;
/// Bytes of changes kept per resource type, estimated (large objects, such as Servers with
/// user data, are kept for fewer changes).
const HISTORY_BYTES: usize = 8 << 20;
/// Items a slow subscriber may fall behind before it is cut off (it then watches again).
const BACKLOG: usize = 4096;
/// How long a watch cache no LIST or watch asks for is kept (kube-apiserver keeps every
/// type's; here a type a client listed once with a selector does not hold its objects in
/// memory for good).
pub const CACHE_IDLE: Duration = Duration::from_secs(600);

/// One change of one object.
#[derive(Debug)]
pub struct Change {
    /// The etcd revision of the change.
    pub rev: i64,
    /// The object's key.
    pub key: String,
    /// The object after the change (None: deleted).
    pub new: Option<Value>,
    /// The object before the change (None: created).
    pub old: Option<Value>,
    /// The object after the change as stored (without `resourceVersion`): the watch cache
    /// keeps these very bytes.
    pub stored: Option<Bytes>,
    /// What the change holds in memory, estimated: its values as stored, decoded and encoded.
    size: usize,
    new_json: OnceLock<Bytes>,
    old_json: OnceLock<Bytes>,
}

impl Change {
    /// The JSON of the object after the change (or before, for a deletion), encoded once for
    /// every subscriber.
    pub fn json(&self, after: bool) -> Option<Bytes> {
        let (v, cell) = if after {
            (&self.new, &self.new_json)
        } else {
            (&self.old, &self.old_json)
        };
        v.as_ref().map(|v| {
            cell.get_or_init(|| Bytes::from(crate::base::meta::to_json(v)))
                .clone()
        })
    }
}

/// What a subscriber receives.
#[derive(Debug, Clone)]
pub enum Item {
    /// A change.
    Change(Arc<Change>),
    /// Every change up to this revision has been sent (a bookmark may be emitted). Sent after
    /// each batch of changes etcd delivers (a batch holds whole revisions) and on etcd's
    /// progress reports.
    Progress(i64),
    /// The requested revision has been compacted (etcd's compaction revision): `410 Gone`.
    Gone(i64),
}

struct Feed {
    /// Every change from this revision on is in `history` or still to come.
    complete_from: i64,
    history: VecDeque<Arc<Change>>,
    /// The estimated bytes of `history`.
    history_bytes: usize,
    tx: broadcast::Sender<Item>,
    alive: bool,
    /// etcd refused the start revision as compacted (at this compaction revision).
    gone: Option<i64>,
    /// Asks the feed's task for an etcd progress report now.
    progress: Arc<Notify>,
}

/// The feeds of one API server.
#[derive(Debug)]
pub struct Hub {
    store: Store,
    progress_every: Duration,
    feeds: Mutex<HashMap<String, Arc<Mutex<Feed>>>>,
    /// The watch cache of each type a LIST has asked for (see [`Hub::cache`]).
    caches: Mutex<HashMap<String, Arc<Cache>>>,
    /// How long an unused watch cache is kept.
    cache_idle: Duration,
    /// Whether a task is dropping idle caches.
    sweeping: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for Feed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Feed")
            .field("complete_from", &self.complete_from)
            .field("len", &self.history.len())
            .finish()
    }
}

/// A subscription: the changes already known, then the live receiver.
#[derive(Debug)]
pub struct Subscription {
    /// Changes from the requested revision on that the feed already has.
    pub past: Vec<Arc<Change>>,
    /// Set when the requested revision was compacted: etcd's compaction revision.
    pub gone: Option<i64>,
    /// Changes still to come.
    pub rx: broadcast::Receiver<Item>,
}

impl Hub {
    /// A hub whose feeds report progress every `progress_every`.
    pub fn new(store: Store, progress_every: Duration) -> Self {
        Self {
            store,
            progress_every,
            feeds: Mutex::new(HashMap::new()),
            caches: Mutex::new(HashMap::new()),
            cache_idle: CACHE_IDLE,
            sweeping: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// The same hub, dropping a watch cache once no LIST or watch has asked for it for
    /// `idle` (default [`CACHE_IDLE`]).
    #[must_use]
    pub fn with_cache_idle(mut self, idle: Duration) -> Self {
        self.cache_idle = idle;
        self
    }

    /// The store the hub watches.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The watch cache of the type stored under `type_prefix`, started on first use (kept by
    /// the type's shared feed from then on), holding the values of `fields` for field
    /// selectors; see [`Cache`]. A cache nothing asks for during the hub's idle period
    /// ([`CACHE_IDLE`], [`Hub::with_cache_idle`]) is stopped and dropped, freeing what it
    /// held; the next call starts it again.
    pub fn cache(self: &Arc<Self>, type_prefix: &str, fields: &[String]) -> Option<Arc<Cache>> {
        let mut caches = self.caches.lock().ok()?;
        if let Some(c) = caches.get(type_prefix) {
            c.touch();
            return Some(Arc::clone(c));
        }
        let cache = Cache::start(Arc::downgrade(self), type_prefix, fields.to_vec());
        caches.insert(type_prefix.to_string(), Arc::clone(&cache));
        if !self
            .sweeping
            .swap(true, std::sync::atomic::Ordering::AcqRel)
        {
            tokio::spawn(sweep(Arc::downgrade(self), self.cache_idle));
        }
        Some(cache)
    }

    /// The caches started so far, by type prefix (for measuring what they hold).
    pub fn caches(&self) -> Vec<(String, Arc<Cache>)> {
        self.caches
            .lock()
            .map(|m| m.iter().map(|(k, v)| (k.clone(), Arc::clone(v))).collect())
            .unwrap_or_default()
    }

    /// Asks the shared feed of `type_prefix`, if there is one, for an etcd progress report
    /// now: its subscribers then learn the revision every change has been sent up to.
    pub fn request_progress(&self, type_prefix: &str) {
        let feed = self
            .feeds
            .lock()
            .ok()
            .and_then(|m| m.get(type_prefix).cloned());
        if let Some(f) = feed
            && let Ok(f) = f.lock()
        {
            f.progress.notify_one();
        }
    }

    /// Subscribes to the shared feed of `type_prefix` from `from` on (starting it if there is
    /// none); `None` when it cannot serve `from` (it started later, or its history has moved
    /// past it): the caller then reads the store again at a newer revision.
    ///
    /// # Errors
    /// When etcd cannot be reached.
    pub async fn subscribe_shared(
        &self,
        type_prefix: &str,
        from: i64,
    ) -> Result<Option<Subscription>, StoreError> {
        self.shared(type_prefix, from).await
    }

    /// Subscribes to changes of the type stored under `type_prefix`, from revision `from` on:
    /// from the type's shared feed when it holds every such change, otherwise from a private
    /// feed (an etcd watch of the subscriber's own, ended when the subscriber goes).
    ///
    /// # Errors
    /// When etcd cannot be reached.
    pub async fn subscribe(
        &self,
        type_prefix: &str,
        from: i64,
    ) -> Result<Subscription, StoreError> {
        if let Some(sub) = self.shared(type_prefix, from).await? {
            return Ok(sub);
        }
        let feed = self.start(type_prefix, from, true).await?;
        take(&feed, from).ok_or(StoreError::Poisoned)
    }

    async fn shared(
        &self,
        type_prefix: &str,
        from: i64,
    ) -> Result<Option<Subscription>, StoreError> {
        // Revisions etcd has compacted are not served from memory either: a private feed then
        // reports them `Gone` as etcd does.
        if from > 1 {
            match self.store.list(type_prefix, None, from - 1, 1).await {
                Err(StoreError::Compacted) => return Ok(None),
                Err(StoreError::FutureRevision) | Ok(_) => {}
                Err(e) => return Err(e),
            }
        }
        let existing = match self.feeds.lock() {
            Ok(mut map) => {
                map.retain(|_, f| f.lock().map(|f| f.alive).unwrap_or(false));
                map.get(type_prefix).cloned()
            }
            Err(_) => return Ok(None),
        };
        let feed = match existing {
            Some(f) => f,
            None => {
                let f = self.start(type_prefix, from, false).await?;
                let Ok(mut map) = self.feeds.lock() else {
                    return Ok(None);
                };
                // Another subscriber may have started one meanwhile; keep the first.
                map.entry(type_prefix.to_string()).or_insert(f).clone()
            }
        };
        Ok(take(&feed, from))
    }

    /// Starts a feed at `from`. A private feed ends once nobody listens.
    async fn start(
        &self,
        type_prefix: &str,
        from: i64,
        private: bool,
    ) -> Result<Arc<Mutex<Feed>>, StoreError> {
        let mut ws = self.store.watch(type_prefix, from).await?;
        let (tx, _) = broadcast::channel(BACKLOG);
        let feed = Arc::new(Mutex::new(Feed {
            complete_from: from,
            history: VecDeque::new(),
            history_bytes: 0,
            tx,
            alive: true,
            gone: None,
            progress: Arc::new(Notify::new()),
        }));
        let task_feed = Arc::clone(&feed);
        let wanted = feed
            .lock()
            .map(|f| Arc::clone(&f.progress))
            .map_err(|_| StoreError::Poisoned)?;
        // A private feed checks often whether its subscriber is still there.
        let every = if private {
            self.progress_every.min(Duration::from_secs(5))
        } else {
            self.progress_every
        };
        let prefix = type_prefix.to_string();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.tick().await;
            loop {
                tokio::select! {
                    msg = ws.message() => {
                        let events = match msg {
                            Ok(Some(WatchMsg::Events(events))) => events,
                            Ok(Some(WatchMsg::Canceled { compact_revision })) => {
                                if compact_revision > 0 && let Ok(mut f) = task_feed.lock() {
                                    f.gone = Some(compact_revision);
                                    let _ = f.tx.send(Item::Gone(compact_revision));
                                }
                                break;
                            }
                            Ok(Some(WatchMsg::Progress(rev))) => {
                                let Ok(f) = task_feed.lock() else { break };
                                let _ = f.tx.send(Item::Progress(rev));
                                continue;
                            }
                            Ok(None) | Err(_) => break,
                        };
                        let Ok(mut f) = task_feed.lock() else { break };
                        let mut last = None;
                        for ev in events {
                            let Some(change) = decode(ev) else { continue };
                            let change = Arc::new(change);
                            last = Some(change.rev);
                            f.history_bytes += change.size;
                            f.history.push_back(Arc::clone(&change));
                            while f.history.len() > HISTORY
                                || (f.history_bytes > HISTORY_BYTES && f.history.len() > 1)
                            {
                                let Some(evicted) = f.history.pop_front() else { break };
                                f.history_bytes -= evicted.size;
                                f.complete_from = evicted.rev + 1;
                            }
                            let _ = f.tx.send(Item::Change(change));
                        }
                        // etcd never splits a revision between two batches: every change of
                        // the batch's last revision has now been sent.
                        if let Some(rev) = last {
                            let _ = f.tx.send(Item::Progress(rev));
                        }
                    }
                    () = wanted.notified() => {
                        if ws.request_progress().await.is_err() {
                            break;
                        }
                    }
                    _ = tick.tick() => {
                        let unused = task_feed.lock().map(|f| f.tx.receiver_count() == 0).unwrap_or(true);
                        // A shared feed that lost the race to be registered is held by nobody else.
                        let orphaned = Arc::strong_count(&task_feed) == 1;
                        if (private && unused) || orphaned || ws.request_progress().await.is_err() {
                            break;
                        }
                    }
                }
            }
            // The feed is gone: its subscribers see the channel close and their clients watch
            // again from their last revision (served by a new feed).
            tracing::debug!(prefix, "watch feed ended");
            if let Ok(mut f) = task_feed.lock() {
                f.alive = false;
                f.history.clear();
                f.history_bytes = 0;
                let (tx, _) = broadcast::channel(1);
                f.tx = tx;
            }
        });
        Ok(feed)
    }
}

/// History from `from` on plus a live receiver, taken under the feed's lock so that nothing
/// falls between them; None when the feed cannot serve `from`.
fn take(feed: &Mutex<Feed>, from: i64) -> Option<Subscription> {
    let f = feed.lock().ok()?;
    if f.gone.is_none() && (!f.alive || from < f.complete_from) {
        return None;
    }
    let past = f
        .history
        .iter()
        .filter(|c| c.rev >= from)
        .cloned()
        .collect();
    Some(Subscription {
        past,
        gone: f.gone,
        rx: f.tx.subscribe(),
    })
}

/// The change a watch event records (None for a value Stratus cannot decode).
pub fn decode(ev: Event) -> Option<Change> {
    let rev = ev.kv.mod_revision;
    let parse = |kv: &KeyValue| {
        Store::decode(&kv.key, &kv.value, kv.mod_revision)
            .ok()
            .map(|s| with_rv(s.value, rev))
    };
    let old = ev.prev.as_ref().and_then(parse);
    // Each value is held as stored, decoded (about twice its size) and encoded for watchers.
    let size = 4 * (ev.kv.value.len() + ev.prev.as_ref().map_or(0, |p| p.value.len()))
        + std::mem::size_of::<Change>();
    let (new, stored) = if ev.deleted {
        (None, None)
    } else {
        (Some(parse(&ev.kv)?), Some(Bytes::from(ev.kv.value)))
    };
    Some(Change {
        rev,
        key: String::from_utf8_lossy(&ev.kv.key).into_owned(),
        new,
        old,
        stored,
        size,
        new_json: OnceLock::new(),
        old_json: OnceLock::new(),
    })
}

/// Drops the hub's watch caches nothing has asked for during `idle`, saying what each held;
/// ends when none is left (the next cache started starts it again) or the hub is gone.
async fn sweep(hub: Weak<Hub>, idle: Duration) {
    let every = (idle / 4).max(Duration::from_millis(10));
    loop {
        tokio::time::sleep(every).await;
        let Some(hub) = hub.upgrade() else { return };
        let Ok(mut caches) = hub.caches.lock() else {
            return;
        };
        caches.retain(|prefix, cache| {
            if cache.idle() < idle {
                return true;
            }
            let held = cache.footprint();
            cache.stop();
            tracing::info!(
                prefix,
                objects = held.objects,
                stored_bytes = held.stored_bytes,
                index_bytes = held.index_bytes,
                idle_seconds = idle.as_secs(),
                "watch cache dropped: no LIST or watch asked for it"
            );
            false
        });
        if caches.is_empty() {
            hub.sweeping
                .store(false, std::sync::atomic::Ordering::Release);
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The next change a receiver gets (skipping progress reports).
    async fn next_change(rx: &mut broadcast::Receiver<Item>) -> Arc<Change> {
        loop {
            let item = tokio::time::timeout(Duration::from_secs(5), rx.recv())
                .await
                .expect("an item within 5 s")
                .expect("the feed goes on");
            if let Item::Change(c) = item {
                return c;
            }
        }
    }

    #[tokio::test]
    async fn large_changes_are_kept_for_fewer_revisions_and_a_watch_from_before_misses_none() {
        let store = Store::memory();
        let hub = Hub::new(store.clone(), Duration::from_secs(60));
        let start = store.revision().await.expect("revision") + 1;
        let mut first = hub.subscribe("/t/", start).await.expect("subscribe");
        let big = json!({"metadata": {"name": "x"}, "data": "x".repeat(1 << 20)});
        for i in 0..8 {
            store
                .create(&format!("/t/{i}"), &big)
                .await
                .expect("create");
        }
        for _ in 0..8 {
            next_change(&mut first.rx).await;
        }
        let kept = {
            let feeds = hub.feeds.lock().expect("feeds");
            let feed = feeds
                .get("/t/")
                .expect("the shared feed")
                .lock()
                .expect("feed");
            (feed.history.len(), feed.history_bytes)
        };
        assert!(kept.0 < 8, "{} changes of 1 MiB kept", kept.0);
        assert!(kept.1 <= HISTORY_BYTES, "{} bytes kept", kept.1);
        // A watch from the first revision still gets every change, in order.
        let mut late = hub.subscribe("/t/", start).await.expect("subscribe");
        let mut keys: Vec<String> = late.past.iter().map(|c| c.key.clone()).collect();
        while keys.len() < 8 {
            keys.push(next_change(&mut late.rx).await.key.clone());
        }
        let want: Vec<String> = (0..8).map(|i| format!("/t/{i}")).collect();
        assert_eq!(keys, want);
    }
}
