//! Object storage on etcd: one key per object, every write one transaction comparing
//! `mod_revision`, `resourceVersion` = etcd revision.

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, Error as EtcdError, GetOptions, Txn, TxnOp,
    TxnOpResponse, WatchOptions,
};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use serde_json::Value;

use crate::base::error::ApiError;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Failures of the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// etcd could not be reached or answered with an error.
    #[error("etcd request failed")]
    Etcd(#[source] EtcdError),
    /// The requested revision has been compacted away.
    #[error("the requested revision has been compacted")]
    Compacted,
    /// The requested revision is newer than the store's.
    #[error("the requested revision is in the future")]
    FutureRevision,
    /// A lock was poisoned by a panic elsewhere (a bug; the request may be retried).
    #[error("internal state is unavailable after a failure")]
    Poisoned,
    /// A stored value is not a JSON object (written by something other than Stratus).
    #[error("stored value at {key} is not valid JSON")]
    Corrupt {
        /// The key holding the value.
        key: String,
        /// Why it does not parse.
        #[source]
        source: serde_json::Error,
    },
}

impl From<EtcdError> for StoreError {
    fn from(e: EtcdError) -> Self {
        let text = e.to_string();
        if text.contains("required revision has been compacted") {
            StoreError::Compacted
        } else if text.contains("required revision is a future revision") {
            StoreError::FutureRevision
        } else {
            StoreError::Etcd(e)
        }
    }
}

/// One stored object with its revisions.
#[derive(Debug, Clone)]
pub struct Stored {
    /// The object as stored (without `metadata.resourceVersion`).
    pub value: Value,
    /// The revision of its last change: its `resourceVersion`.
    pub mod_revision: i64,
}

/// One page of a range read.
#[derive(Debug)]
pub struct Page {
    /// Keys and objects in key order.
    pub items: Vec<(String, Stored)>,
    /// The revision the page was read at.
    pub revision: i64,
    /// Whether keys remain after the last one returned.
    pub more: bool,
}

/// The outcome of a conditional write.
#[derive(Debug, PartialEq, Eq)]
pub enum Write {
    /// Written at this revision.
    Done(i64),
    /// The key's current revision was not the expected one (0: the key is absent).
    Conflict(i64),
}

/// One read of [`Store::read_many`].
#[derive(Debug, Clone, Copy)]
pub enum Read<'a> {
    /// One key.
    Key(&'a str),
    /// Every key under a prefix.
    Prefix(&'a str),
    /// Whether one key exists, and its revision: its value is neither read nor decoded (the
    /// item's value is `null`).
    Presence(&'a str),
}

/// A condition of [`Store::write_many`].
#[derive(Debug, Clone, Copy)]
pub enum Guard<'a> {
    /// The key is at this revision.
    Revision(&'a str, i64),
    /// The key is absent.
    Absent(&'a str),
    /// No key under the prefix changed (or appeared) after the revision.
    Unchanged(&'a str, i64),
}

/// A handle on etcd; cheap to clone.
#[derive(Clone)]
pub struct Store {
    client: Client,
    marker: Option<Arc<Marker>>,
    latency: Option<Arc<Latency>>,
}

/// What an etcd request is timed under (kube-apiserver's `etcd_request_duration_seconds`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StorageOp {
    /// get, list, create, update, delete, read (several keys at once) or write (several).
    pub operation: &'static str,
    /// What the first key names: `GROUP/RESOURCE`, or `_system/WHAT`.
    pub r#type: String,
}

/// The histograms etcd requests are timed in.
pub type LatencyFamily = Family<StorageOp, Histogram, fn() -> Histogram>;

struct Latency {
    family: LatencyFamily,
    prefix: String,
}

/// `GROUP/RESOURCE` (or `_system/WHAT`) of a key under `prefix`.
fn type_of(prefix: &str, key: &str) -> String {
    let rest = key
        .strip_prefix(prefix)
        .unwrap_or(key)
        .trim_start_matches('/');
    let mut parts = rest.splitn(3, '/');
    match (parts.next(), parts.next()) {
        (Some(a), Some(b)) => format!("{a}/{b}"),
        (Some(a), None) => a.to_string(),
        _ => String::new(),
    }
}

/// A key that every write under some prefixes also puts, in the same transaction, so that
/// its `mod_revision` changes whenever anything under them does: one small read then tells
/// whether anything there changed since a cached answer was read.
#[derive(Debug)]
struct Marker {
    key: String,
    prefixes: Vec<String>,
}

impl Marker {
    /// Whether one of `keys` is under a marked prefix.
    fn covers<'a>(&self, keys: impl IntoIterator<Item = &'a str>) -> bool {
        keys.into_iter()
            .any(|k| self.prefixes.iter().any(|p| k.starts_with(p.as_str())))
    }
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").finish_non_exhaustive()
    }
}

fn decode(key: &[u8], value: &[u8], mod_revision: i64) -> Result<(String, Stored), StoreError> {
    let key = String::from_utf8_lossy(key).into_owned();
    let value = serde_json::from_slice(value).map_err(|source| StoreError::Corrupt {
        key: key.clone(),
        source,
    })?;
    Ok((
        key,
        Stored {
            value,
            mod_revision,
        },
    ))
}

/// The first key after every key starting with `prefix`.
pub fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

impl Store {
    /// Connects to etcd.
    pub async fn connect(endpoints: &[String]) -> Result<Self, StoreError> {
        let opts = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(5))
            .with_timeout(Duration::from_secs(30))
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(10));
        let client = Client::connect(endpoints, Some(opts)).await?;
        Ok(Self {
            client,
            marker: None,
            latency: None,
        })
    }

    /// This store, timing every etcd request in `family` by operation and the type of the
    /// key (its path under `prefix`).
    #[must_use]
    pub fn with_latency(mut self, family: LatencyFamily, prefix: &str) -> Self {
        self.latency = Some(Arc::new(Latency {
            family,
            prefix: prefix.to_string(),
        }));
        self
    }

    fn observe(&self, operation: &'static str, key: &str, started: Instant) {
        if let Some(l) = &self.latency {
            l.family
                .get_or_create(&StorageOp {
                    operation,
                    r#type: type_of(&l.prefix, key),
                })
                .observe(started.elapsed().as_secs_f64());
        }
    }

    /// This store, with every write (put or delete) of a key under one of `prefixes` also
    /// putting `key`, in the same transaction. Every writer of those keys must use it.
    #[must_use]
    pub fn with_marker(mut self, key: String, prefixes: Vec<String>) -> Self {
        self.marker = Some(Arc::new(Marker { key, prefixes }));
        self
    }

    /// The put of the marker key, when one of `keys` is under a marked prefix.
    fn mark<'a>(&self, keys: impl IntoIterator<Item = &'a str>) -> Option<TxnOp> {
        let m = self.marker.as_deref()?;
        m.covers(keys).then(|| TxnOp::put(m.key.as_str(), "", None))
    }

    /// Reads one object.
    pub async fn get(&self, key: &str) -> Result<Option<Stored>, StoreError> {
        let started = Instant::now();
        let resp = self.client.kv_client().get(key, None).await?;
        self.observe("get", key, started);
        match resp.kvs().first() {
            Some(kv) => Ok(Some(decode(kv.key(), kv.value(), kv.mod_revision())?.1)),
            None => Ok(None),
        }
    }

    /// The store's current revision.
    pub async fn revision(&self) -> Result<i64, StoreError> {
        let resp = self
            .client
            .kv_client()
            .get("\0", Some(GetOptions::new().with_count_only()))
            .await?;
        Ok(resp.header().map(|h| h.revision()).unwrap_or(0))
    }

    /// What `key` holds, writing `value` there first if it is absent, in one transaction:
    /// whoever writes it first wins, and everyone reads the winner's value.
    pub async fn first_written(&self, key: &str, value: &Value) -> Result<Value, StoreError> {
        let txn = Txn::new()
            .when([Compare::create_revision(key, CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key, crate::base::meta::to_json(value), None)])
            .or_else([TxnOp::get(key, None)]);
        let started = Instant::now();
        let resp = self.client.kv_client().txn(txn).await?;
        self.observe("create", key, started);
        if resp.succeeded() {
            return Ok(value.clone());
        }
        for op in resp.op_responses() {
            if let TxnOpResponse::Get(g) = op
                && let Some(kv) = g.kvs().first()
            {
                return decode(kv.key(), kv.value(), kv.mod_revision()).map(|(_, s)| s.value);
            }
        }
        // Deleted between the compare and the read: not possible within one transaction.
        Err(StoreError::Poisoned)
    }

    /// Creates `key` if it is absent.
    pub async fn create(&self, key: &str, value: &Value) -> Result<Write, StoreError> {
        self.create_under(key, value, None).await
    }

    /// Creates `key` if it is absent and, when given, the `parent` key exists (a namespaced
    /// object's Project), checked in the same transaction. `Conflict(0)` then means the parent
    /// is missing.
    pub async fn create_under(
        &self,
        key: &str,
        value: &Value,
        parent: Option<&str>,
    ) -> Result<Write, StoreError> {
        self.write_guarded(key, value, None, &[], parent).await
    }

    /// Writes `key` if its revision is still `expected` (None: if it is absent) and no key
    /// under any of the `guards` prefixes changed after the guard's revision (and the `parent`
    /// key, when given, exists). `Conflict(rev)`
    /// carries the key's current revision (0: absent), so a caller can tell a failed guard
    /// (`rev` is what it expected) from a changed key.
    pub async fn write_guarded(
        &self,
        key: &str,
        value: &Value,
        expected: Option<i64>,
        guards: &[(&str, i64)],
        parent: Option<&str>,
    ) -> Result<Write, StoreError> {
        let mut compares = vec![match expected {
            Some(rev) => Compare::mod_revision(key, CompareOp::Equal, rev),
            None => Compare::create_revision(key, CompareOp::Equal, 0),
        }];
        if let Some(parent) = parent {
            compares.push(Compare::create_revision(parent, CompareOp::Greater, 0));
        }
        for (prefix, at) in guards {
            compares.push(
                Compare::mod_revision(*prefix, CompareOp::Less, at + 1)
                    .with_range(prefix_end(prefix)),
            );
        }
        let ops: Vec<TxnOp> =
            std::iter::once(TxnOp::put(key, crate::base::meta::to_json(value), None))
                .chain(self.mark([key]))
                .collect();
        let txn = Txn::new()
            .when(compares)
            .and_then(ops)
            .or_else([TxnOp::get(key, None)]);
        let op = if expected.is_some() {
            "update"
        } else {
            "create"
        };
        self.run(op, key, txn).await
    }

    /// Replaces `key` if its revision is still `expected`.
    pub async fn update(
        &self,
        key: &str,
        value: &Value,
        expected: i64,
    ) -> Result<Write, StoreError> {
        self.write_guarded(key, value, Some(expected), &[], None)
            .await
    }

    /// Deletes `key` if its revision is still `expected`, together with `attached` keys
    /// (what the object holds, such as its placement claim).
    pub async fn delete(
        &self,
        key: &str,
        expected: i64,
        attached: &[String],
    ) -> Result<Write, StoreError> {
        let ops: Vec<TxnOp> = std::iter::once(TxnOp::delete(key, None))
            .chain(attached.iter().map(|k| TxnOp::delete(k.as_str(), None)))
            .chain(self.mark(std::iter::once(key).chain(attached.iter().map(String::as_str))))
            .collect();
        let txn = Txn::new()
            .when([Compare::mod_revision(key, CompareOp::Equal, expected)])
            .and_then(ops)
            .or_else([TxnOp::get(key, None)]);
        self.run("delete", key, txn).await
    }

    async fn run(&self, operation: &'static str, key: &str, txn: Txn) -> Result<Write, StoreError> {
        let started = Instant::now();
        let resp = self.client.kv_client().txn(txn).await?;
        self.observe(operation, key, started);
        let revision = resp.header().map(|h| h.revision()).unwrap_or(0);
        if resp.succeeded() {
            return Ok(Write::Done(revision));
        }
        let current = resp
            .op_responses()
            .into_iter()
            .find_map(|op| match op {
                TxnOpResponse::Get(g) => {
                    Some(g.kvs().first().map(|kv| kv.mod_revision()).unwrap_or(0))
                }
                _ => None,
            })
            .unwrap_or(0);
        Ok(Write::Conflict(current))
    }

    /// Reads keys in `[start, prefix_end(prefix))` at `revision` (0: latest), at most `limit`
    /// (0: all).
    pub async fn list(
        &self,
        prefix: &str,
        start: Option<&str>,
        revision: i64,
        limit: i64,
    ) -> Result<Page, StoreError> {
        let mut opts = GetOptions::new().with_range(prefix_end(prefix));
        if revision > 0 {
            opts = opts.with_revision(revision);
        }
        if limit > 0 {
            opts = opts.with_limit(limit);
        }
        let started = Instant::now();
        let resp = self
            .client
            .kv_client()
            .get(start.unwrap_or(prefix), Some(opts))
            .await?;
        self.observe("list", prefix, started);
        let revision = if revision > 0 {
            revision
        } else {
            resp.header().map(|h| h.revision()).unwrap_or(0)
        };
        let items = resp
            .kvs()
            .iter()
            .map(|kv| decode(kv.key(), kv.value(), kv.mod_revision()))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Page {
            items,
            revision,
            more: resp.more(),
        })
    }

    /// Reads several keys and prefixes at one revision, in one request: one `Vec` per read
    /// (a key's holds zero or one item), and the revision.
    pub async fn read_many(
        &self,
        reads: &[Read<'_>],
    ) -> Result<(Vec<Vec<(String, Stored)>>, i64), StoreError> {
        let ops: Vec<TxnOp> = reads
            .iter()
            .map(|r| match r {
                Read::Key(k) => TxnOp::get(*k, None),
                Read::Prefix(p) => {
                    TxnOp::get(*p, Some(GetOptions::new().with_range(prefix_end(p))))
                }
                Read::Presence(k) => TxnOp::get(*k, Some(GetOptions::new().with_keys_only())),
            })
            .collect();
        let started = Instant::now();
        let resp = self
            .client
            .kv_client()
            .txn(Txn::new().and_then(ops))
            .await?;
        if let Some(Read::Key(k) | Read::Prefix(k) | Read::Presence(k)) = reads.first() {
            self.observe("read", k, started);
        }
        let revision = resp.header().map(|h| h.revision()).unwrap_or(0);
        let mut out = Vec::with_capacity(reads.len());
        for (op, read) in resp.op_responses().into_iter().zip(reads) {
            if let TxnOpResponse::Get(g) = op {
                out.push(
                    g.kvs()
                        .iter()
                        .map(|kv| match read {
                            Read::Presence(_) => Ok((
                                String::from_utf8_lossy(kv.key()).into_owned(),
                                Stored {
                                    value: Value::Null,
                                    mod_revision: kv.mod_revision(),
                                },
                            )),
                            _ => decode(kv.key(), kv.value(), kv.mod_revision()),
                        })
                        .collect::<Result<Vec<_>, _>>()?,
                );
            }
        }
        Ok((out, revision))
    }

    /// Applies `puts` and `deletes` in one transaction if every guard holds; `Ok(None)` when
    /// one does not (nothing is written), else the revision written at.
    pub async fn write_many(
        &self,
        guards: &[Guard<'_>],
        puts: &[(&str, &Value)],
        deletes: &[&str],
    ) -> Result<Option<i64>, StoreError> {
        let compares: Vec<Compare> = guards
            .iter()
            .map(|g| match g {
                Guard::Revision(k, rev) => Compare::mod_revision(*k, CompareOp::Equal, *rev),
                Guard::Absent(k) => Compare::create_revision(*k, CompareOp::Equal, 0),
                Guard::Unchanged(p, at) => {
                    Compare::mod_revision(*p, CompareOp::Less, at + 1).with_range(prefix_end(p))
                }
            })
            .collect();
        let ops: Vec<TxnOp> = puts
            .iter()
            .map(|(k, v)| TxnOp::put(*k, crate::base::meta::to_json(v), None))
            .chain(deletes.iter().map(|k| TxnOp::delete(*k, None)))
            .chain(self.mark(puts.iter().map(|(k, _)| *k).chain(deletes.iter().copied())))
            .collect();
        let started = Instant::now();
        let resp = self
            .client
            .kv_client()
            .txn(Txn::new().when(compares).and_then(ops))
            .await?;
        if let Some(k) = puts.first().map(|(k, _)| *k).or(deletes.first().copied()) {
            self.observe("write", k, started);
        }
        Ok(resp
            .succeeded()
            .then(|| resp.header().map(|h| h.revision()).unwrap_or(0)))
    }

    /// Writes an empty marker at `key` that etcd removes after `ttl` seconds.
    pub async fn put_with_ttl(&self, key: &str, ttl: i64) -> Result<(), StoreError> {
        let lease = self.client.lease_client().grant(ttl, None).await?;
        let opts = etcd_client::PutOptions::new().with_lease(lease.id());
        let ops: Vec<TxnOp> = std::iter::once(TxnOp::put(key, "", Some(opts)))
            .chain(self.mark([key]))
            .collect();
        self.client
            .kv_client()
            .txn(Txn::new().and_then(ops))
            .await?;
        Ok(())
    }

    /// How many keys are under `prefix` (nothing is read but the count).
    pub async fn count(&self, prefix: &str) -> Result<i64, StoreError> {
        let opts = GetOptions::new()
            .with_range(prefix_end(prefix))
            .with_count_only();
        let started = Instant::now();
        let resp = self.client.kv_client().get(prefix, Some(opts)).await?;
        self.observe("count", prefix, started);
        Ok(resp.count())
    }

    /// Every key under `prefix` (values are not read).
    pub async fn keys(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        let opts = GetOptions::new()
            .with_range(prefix_end(prefix))
            .with_keys_only();
        let resp = self.client.kv_client().get(prefix, Some(opts)).await?;
        Ok(resp
            .kvs()
            .iter()
            .map(|kv| String::from_utf8_lossy(kv.key()).into_owned())
            .collect())
    }

    /// Opens an etcd watch on every key under `prefix`, from `start_revision` on, with previous
    /// values (so deletions and selector transitions can be reported).
    pub async fn watch(
        &self,
        prefix: &str,
        start_revision: i64,
    ) -> Result<etcd_client::WatchStream, StoreError> {
        let opts = WatchOptions::new()
            .with_range(prefix_end(prefix))
            .with_start_revision(start_revision)
            .with_prev_key()
            .with_progress_notify();
        Ok(self.client.watch_client().watch(prefix, Some(opts)).await?)
    }

    /// Compacts history up to `revision` (used by tests of `410 Gone` and by maintenance).
    pub async fn compact(&self, revision: i64) -> Result<(), StoreError> {
        self.client.kv_client().compact(revision, None).await?;
        Ok(())
    }

    /// Decodes one key/value pair of a watch event.
    pub fn decode(key: &[u8], value: &[u8], mod_revision: i64) -> Result<Stored, StoreError> {
        decode(key, value, mod_revision).map(|(_, s)| s)
    }
}

/// How a store failure is answered.
impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Compacted => {
                Self::gone("The resourceVersion for the provided list is too old.")
            }
            StoreError::FutureRevision => Self::timeout("Too large resource version"),
            StoreError::Poisoned => {
                Self::unavailable("the API server's watch state is unavailable; retry")
            }
            StoreError::Corrupt { key, .. } => {
                Self::internal(format!("stored object at {key} cannot be decoded"))
            }
            StoreError::Etcd(e) => {
                Self::unavailable(format!("the object store is unavailable: {e}"))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{Marker, prefix_end, type_of};

    #[test]
    fn prefix_end_is_the_next_key() {
        assert_eq!(prefix_end("/a/b/"), b"/a/b0".to_vec());
        assert_eq!(prefix_end("a\u{7f}"), b"a\x80".to_vec());
    }

    #[test]
    fn a_key_is_timed_under_its_group_and_resource() {
        assert_eq!(
            type_of(
                "/registry",
                "/registry/compute.stratus.dev/servers/demo/web-1"
            ),
            "compute.stratus.dev/servers"
        );
        assert_eq!(
            type_of("/registry", "/registry/_system/token-key"),
            "_system/token-key"
        );
        assert_eq!(
            type_of("/registry", "/registry/core/namespaces/"),
            "core/namespaces"
        );
    }

    #[test]
    fn the_marker_covers_writes_under_its_prefixes_only() {
        let m = Marker {
            key: "/s/_system/marker".into(),
            prefixes: vec!["/s/users/".into(), "/s/revoked/".into()],
        };
        assert!(m.covers(["/s/users/una"]));
        assert!(m.covers(["/s/flavors/small", "/s/revoked/abc"]));
        assert!(!m.covers(["/s/flavors/small", "/s/users"]));
        assert!(!m.covers(["/s/usersx/una"]));
        assert!(!m.covers([]));
    }
}
