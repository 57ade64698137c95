//! [`Kv`] in memory, with etcd's guarantees (see [`crate::storage::kv`]): one revision per
//! transaction, every key's history back to the compacted revision, ranges at past revisions,
//! watches replayed from history, leases. For tests: nothing is persisted.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use tokio::sync::mpsc;

use crate::storage::kv::{
    Compare, CompareOp, Event, KeyValue, Kv, Op, Range, RangeResp, Target, Txn, TxnResp, WatchFeed,
    WatchMsg,
};
use crate::storage::store::StoreError;

/// An in-memory store; clones share it.
#[derive(Clone, Default)]
pub struct Memory {
    state: Arc<Mutex<State>>,
}

impl std::fmt::Debug for Memory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Memory").finish_non_exhaustive()
    }
}

/// One version of a key.
#[derive(Debug, Clone)]
struct Version {
    revision: i64,
    /// Its place among the changes of its transaction.
    sub: usize,
    create_revision: i64,
    /// `None`: the key was deleted.
    value: Option<Arc<[u8]>>,
    lease: i64,
}

#[derive(Debug)]
struct Watcher {
    key: Vec<u8>,
    end: Vec<u8>,
    tx: mpsc::UnboundedSender<WatchMsg>,
}

#[derive(Debug)]
struct State {
    revision: i64,
    compacted: i64,
    /// Every key's versions, oldest first.
    keys: BTreeMap<Vec<u8>, Vec<Version>>,
    watchers: Vec<Watcher>,
    next_lease: i64,
}

impl Default for State {
    fn default() -> Self {
        // etcd starts at revision 1, with nothing compacted.
        Self {
            revision: 1,
            compacted: 0,
            keys: BTreeMap::new(),
            watchers: Vec::new(),
            next_lease: 1,
        }
    }
}

/// Whether `key` is in `[start, end)`; `end` `None`: only `start`; `[0]`: every key from
/// `start` on.
fn within(key: &[u8], start: &[u8], end: Option<&[u8]>) -> bool {
    match end {
        None => key == start,
        Some([0]) => key >= start,
        Some(end) => key >= start && key < end,
    }
}

fn bounds<'a>(start: &'a [u8], end: Option<&'a [u8]>) -> (Bound<&'a [u8]>, Bound<&'a [u8]>) {
    match end {
        None => (Bound::Included(start), Bound::Included(start)),
        Some([0]) => (Bound::Included(start), Bound::Unbounded),
        Some(end) if end <= start => (Bound::Included(start), Bound::Excluded(start)),
        Some(end) => (Bound::Included(start), Bound::Excluded(end)),
    }
}

impl Version {
    fn key_value(&self, key: &[u8], with_value: bool) -> KeyValue {
        KeyValue {
            key: key.to_vec(),
            value: match (&self.value, with_value) {
                (Some(v), true) => v.to_vec(),
                _ => Vec::new(),
            },
            mod_revision: self.revision,
        }
    }
}

/// The version of a key live at `revision`.
fn at(versions: &[Version], revision: i64) -> Option<&Version> {
    versions
        .iter()
        .rev()
        .find(|v| v.revision <= revision)
        .filter(|v| v.value.is_some())
}

impl State {
    fn range(&self, r: &Range, revision: i64) -> Result<RangeResp, StoreError> {
        let read_at = if r.revision > 0 { r.revision } else { revision };
        if read_at > revision {
            return Err(StoreError::FutureRevision);
        }
        if read_at < self.compacted {
            return Err(StoreError::Compacted);
        }
        let mut kvs = Vec::new();
        let mut count = 0;
        for (key, versions) in self.keys.range::<[u8], _>(bounds(&r.key, r.end.as_deref())) {
            let Some(v) = at(versions, read_at) else {
                continue;
            };
            count += 1;
            if !r.count_only && (r.limit <= 0 || (kvs.len() as i64) < r.limit) {
                kvs.push(v.key_value(key, !r.keys_only));
            }
        }
        Ok(RangeResp {
            more: r.limit > 0 && count > r.limit,
            kvs,
            count,
            revision,
        })
    }

    /// Whether a compare holds on the live keys.
    fn holds(&self, c: &Compare) -> bool {
        let found: Vec<&Version> = self
            .keys
            .range::<[u8], _>(bounds(&c.key, c.end.as_deref()))
            .filter_map(|(_, versions)| at(versions, i64::MAX))
            .collect();
        let check = |v: Option<&Version>| {
            let actual = match (c.target, v) {
                (_, None) => 0,
                (Target::Mod, Some(v)) => v.revision,
                (Target::Create, Some(v)) => v.create_revision,
            };
            match c.op {
                CompareOp::Equal => actual == c.revision,
                CompareOp::Greater => actual > c.revision,
                CompareOp::Less => actual < c.revision,
            }
        };
        if found.is_empty() {
            check(None)
        } else {
            found.into_iter().all(|v| check(Some(v)))
        }
    }

    /// Applies a change at `revision` and returns its event.
    fn write(
        &mut self,
        key: &[u8],
        value: Option<Vec<u8>>,
        lease: i64,
        revision: i64,
        sub: usize,
    ) -> Option<Event> {
        let versions = self.keys.entry(key.to_vec()).or_default();
        let prev = at(versions, i64::MAX).cloned();
        if value.is_none() && prev.is_none() {
            return None;
        }
        let deleted = value.is_none();
        let version = Version {
            revision,
            sub,
            create_revision: prev.as_ref().map_or(revision, |p| p.create_revision),
            value: value.map(Arc::from),
            lease,
        };
        let event = Event {
            kv: version.key_value(key, true),
            prev: prev.map(|p| p.key_value(key, true)),
            deleted,
        };
        versions.push(version);
        Some(event)
    }

    fn publish(&mut self, events: &[Event]) {
        if events.is_empty() {
            return;
        }
        self.watchers.retain(|w| {
            let mine: Vec<Event> = events
                .iter()
                .filter(|e| within(&e.kv.key, &w.key, Some(&w.end)))
                .cloned()
                .collect();
            mine.is_empty() || w.tx.send(WatchMsg::Events(mine)).is_ok()
        });
    }

    /// Every change under `[key, end)` from `from` on, grouped by revision.
    fn history(&self, key: &[u8], end: &[u8], from: i64) -> Vec<Vec<Event>> {
        let mut changes: Vec<(i64, usize, Event)> = Vec::new();
        for (k, versions) in self.keys.range::<[u8], _>(bounds(key, Some(end))) {
            for (i, v) in versions.iter().enumerate() {
                if v.revision < from {
                    continue;
                }
                let prev = i
                    .checked_sub(1)
                    .and_then(|p| versions.get(p))
                    .filter(|p| p.value.is_some());
                changes.push((
                    v.revision,
                    v.sub,
                    Event {
                        kv: v.key_value(k, true),
                        prev: prev.map(|p| p.key_value(k, true)),
                        deleted: v.value.is_none(),
                    },
                ));
            }
        }
        changes.sort_by_key(|(rev, sub, _)| (*rev, *sub));
        let mut out: Vec<Vec<Event>> = Vec::new();
        let mut last = None;
        for (rev, _, e) in changes {
            match out.last_mut() {
                Some(group) if last == Some(rev) => group.push(e),
                _ => out.push(vec![e]),
            }
            last = Some(rev);
        }
        out
    }
}

impl Memory {
    /// An empty store at revision 1.
    pub fn new() -> Self {
        Self::default()
    }

    /// Cancels every open watch, as etcd does when a watch's stream breaks: each receives
    /// [`WatchMsg::Canceled`] (with no compaction revision) and nothing after it.
    pub fn cancel_watches(&self) {
        if let Ok(mut s) = self.lock() {
            for w in s.watchers.drain(..) {
                let _ = w.tx.send(WatchMsg::Canceled {
                    compact_revision: 0,
                });
            }
        }
    }

    fn lock(&self) -> Result<MutexGuard<'_, State>, StoreError> {
        self.state.lock().map_err(|_| StoreError::Poisoned)
    }

    fn txn_now(&self, t: Txn) -> Result<TxnResp, StoreError> {
        let mut s = self.lock()?;
        let succeeded = t.when.iter().all(|c| s.holds(c));
        let ops = if succeeded { t.then } else { t.otherwise };
        let mut written: Vec<&[u8]> = ops
            .iter()
            .filter_map(|o| match o {
                Op::Put { key, .. } | Op::Delete(key) => Some(key.as_slice()),
                Op::Get(_) => None,
            })
            .collect();
        written.sort_unstable();
        if written.windows(2).any(|w| w[0] == w[1]) {
            return Err(StoreError::Refused(
                "a key is written twice in one transaction",
            ));
        }
        let next = s.revision + 1;
        let mut events = Vec::new();
        let mut gets = Vec::new();
        for op in ops {
            match op {
                Op::Put { key, value, lease } => {
                    let sub = events.len();
                    events.extend(s.write(&key, Some(value), lease, next, sub));
                }
                Op::Delete(key) => {
                    let sub = events.len();
                    events.extend(s.write(&key, None, 0, next, sub));
                }
                // Reads see the writes before them in the transaction.
                Op::Get(r) => {
                    gets.push(s.range(&r, if events.is_empty() { s.revision } else { next })?)
                }
            }
        }
        if !events.is_empty() {
            s.revision = next;
        }
        for g in &mut gets {
            g.revision = s.revision;
        }
        s.publish(&events);
        Ok(TxnResp {
            succeeded,
            revision: s.revision,
            gets,
        })
    }

    /// Deletes every key still bound to `lease`, in one revision.
    fn expire(state: &Weak<Mutex<State>>, lease: i64) {
        let Some(state) = state.upgrade() else { return };
        let memory = Memory { state };
        let keys: Vec<Vec<u8>> = match memory.lock() {
            Ok(s) => s
                .keys
                .iter()
                .filter(|(_, v)| at(v, i64::MAX).is_some_and(|v| v.lease == lease))
                .map(|(k, _)| k.clone())
                .collect(),
            Err(_) => return,
        };
        if keys.is_empty() {
            return;
        }
        let _ = memory.txn_now(Txn {
            then: keys.into_iter().map(Op::Delete).collect(),
            ..Txn::default()
        });
    }
}

impl Kv for Memory {
    type Watch = MemoryWatch;

    async fn range(&self, r: Range) -> Result<RangeResp, StoreError> {
        // As a request to etcd would, let other requests run meanwhile: concurrent verbs then
        // interleave between their reads and writes as they do on etcd.
        tokio::task::yield_now().await;
        let s = self.lock()?;
        s.range(&r, s.revision)
    }

    async fn txn(&self, t: Txn) -> Result<TxnResp, StoreError> {
        tokio::task::yield_now().await;
        self.txn_now(t)
    }

    async fn watch(
        &self,
        key: &str,
        end: Vec<u8>,
        start_revision: i64,
    ) -> Result<MemoryWatch, StoreError> {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut s = self.lock()?;
        let watch = MemoryWatch {
            memory: self.clone(),
            tx: tx.clone(),
            rx,
        };
        if start_revision > 0 && start_revision < s.compacted {
            let _ = tx.send(WatchMsg::Canceled {
                compact_revision: s.compacted,
            });
            drop(tx);
            return Ok(MemoryWatch {
                tx: mpsc::unbounded_channel().0,
                ..watch
            });
        }
        if start_revision > 0 {
            for group in s.history(key.as_bytes(), &end, start_revision) {
                let _ = tx.send(WatchMsg::Events(group));
            }
        }
        s.watchers.push(Watcher {
            key: key.as_bytes().to_vec(),
            end,
            tx,
        });
        Ok(watch)
    }

    async fn compact(&self, revision: i64) -> Result<(), StoreError> {
        let mut s = self.lock()?;
        if revision <= s.compacted {
            return Err(StoreError::Compacted);
        }
        if revision > s.revision {
            return Err(StoreError::FutureRevision);
        }
        s.compacted = revision;
        s.keys.retain(|_, versions| {
            // Keep what a read at `revision` or later needs: the version live at `revision`
            // (also the previous value of the next change) and every later one.
            let keep_from = versions
                .iter()
                .rposition(|v| v.revision <= revision)
                .unwrap_or(0);
            versions.drain(..keep_from);
            !(versions.len() == 1
                && versions[0].value.is_none()
                && versions[0].revision <= revision)
        });
        Ok(())
    }

    async fn grant_lease(&self, ttl: i64) -> Result<i64, StoreError> {
        let id = {
            let mut s = self.lock()?;
            s.next_lease += 1;
            s.next_lease
        };
        let state = Arc::downgrade(&self.state);
        let ttl = Duration::from_secs(u64::try_from(ttl).unwrap_or(0));
        tokio::spawn(async move {
            tokio::time::sleep(ttl).await;
            Memory::expire(&state, id);
        });
        Ok(id)
    }

    async fn revoke_lease(&self, id: i64) -> Result<(), StoreError> {
        Memory::expire(&Arc::downgrade(&self.state), id);
        Ok(())
    }
}

/// A watch on a [`Memory`] store.
#[derive(Debug)]
pub struct MemoryWatch {
    memory: Memory,
    /// For progress reports, which follow every change already sent.
    tx: mpsc::UnboundedSender<WatchMsg>,
    rx: mpsc::UnboundedReceiver<WatchMsg>,
}

impl WatchFeed for MemoryWatch {
    async fn message(&mut self) -> Result<Option<WatchMsg>, StoreError> {
        Ok(self.rx.recv().await)
    }

    async fn request_progress(&mut self) -> Result<(), StoreError> {
        // Under the lock, so that no change of a later revision is sent before it.
        let s = self.memory.lock()?;
        let _ = self.tx.send(WatchMsg::Progress(s.revision));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::within;

    #[test]
    fn ranges_are_half_open_and_zero_means_to_the_end() {
        assert!(within(b"/a/b", b"/a/", Some(b"/a0")));
        assert!(!within(b"/a0", b"/a/", Some(b"/a0")));
        assert!(within(b"/z", b"/a/", Some(&[0])));
        assert!(within(b"/a", b"/a", None));
        assert!(!within(b"/ab", b"/a", None));
    }
}
