//! Object storage on etcd: one key per object, every write one transaction comparing
//! `mod_revision`, `resourceVersion` = etcd revision. The transactions are built here from the
//! [`Kv`] vocabulary; etcd ([`Etcd`]) or memory ([`Memory`], for tests) runs them.

use etcd_client::Error as EtcdError;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use serde_json::Value;

use crate::base::error::ApiError;
use crate::storage::etcd::{Etcd, EtcdTls, EtcdWatch};
use crate::storage::kv::{
    Compare, CompareOp, KeyValue, Kv, Op, Range, RangeResp, Target, Txn, TxnResp, WatchFeed,
    WatchMsg,
};
use crate::storage::memory::{Memory, MemoryWatch};
use crate::storage::migrate;
use std::sync::Arc;
use std::time::Instant;

/// Failures of the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// etcd could not be reached or answered with an error.
    #[error("etcd request failed")]
    Etcd(#[source] EtcdError),
    /// etcd refused the request itself (too large, malformed): retrying cannot help.
    #[error("etcd refused the request: {0}")]
    Rejected(String),
    /// The requested revision has been compacted away.
    #[error("the requested revision has been compacted")]
    Compacted,
    /// The requested revision is newer than the store's.
    #[error("the requested revision is in the future")]
    FutureRevision,
    /// A lock was poisoned by a panic elsewhere (a bug; the request may be retried).
    #[error("internal state is unavailable after a failure")]
    Poisoned,
    /// The backend refused a malformed request (a bug in the caller).
    #[error("the store refused the request: {0}")]
    Refused(&'static str),
    /// A TLS file for etcd cannot be read.
    #[error("read {}", path.display())]
    ReadFile {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// An endpoint's scheme does not match whether TLS is configured.
    #[error(
        "etcd endpoint {endpoint} must start with {expected} (https endpoints go with the etcd CA file, http ones without)"
    )]
    Endpoint {
        /// The endpoint.
        endpoint: String,
        /// The scheme it must have.
        expected: &'static str,
    },
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

/// gRPC status codes of requests that fail the same way however often they are sent:
/// `INVALID_ARGUMENT` (etcd's "request is too large", a malformed request), `FAILED_PRECONDITION`,
/// `OUT_OF_RANGE` (an answer over the client's message limit), `UNIMPLEMENTED`. Every other
/// code (`UNAVAILABLE`, `DEADLINE_EXCEEDED`, a lost leader, …) may pass on a retry.
const PERMANENT_GRPC_CODES: [i32; 4] = [3, 9, 11, 12];

impl From<EtcdError> for StoreError {
    fn from(e: EtcdError) -> Self {
        let text = e.to_string();
        if text.contains("required revision has been compacted") {
            StoreError::Compacted
        } else if text.contains("required revision is a future revision") {
            StoreError::FutureRevision
        } else if let EtcdError::GRpcStatus(status) = &e
            && PERMANENT_GRPC_CODES.contains(&(status.code() as i32))
        {
            StoreError::Rejected(status.message().to_string())
        } else {
            StoreError::Etcd(e)
        }
    }
}

impl StoreError {
    /// Whether the request failed for the size of what it asked for: a smaller read may pass.
    fn too_large(&self) -> bool {
        matches!(self, StoreError::Rejected(m) if m.contains("too large"))
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

/// How the store reads a range in pages: every page at the first's revision, each of at most
/// `keys` keys and, once the size of the objects is known, of about `bytes` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Paging {
    /// The most keys one etcd range reads.
    pub keys: i64,
    /// The bytes of values one etcd range aims at (the key count of the next range follows
    /// from the average size of the values read so far).
    pub bytes: usize,
}

impl Default for Paging {
    /// 1000 keys or 4 MiB: a page of Flavors is ~0.6 MiB, and no page nears the etcd
    /// client's message limit.
    fn default() -> Self {
        Self {
            keys: 1000,
            bytes: 4 * 1024 * 1024,
        }
    }
}

/// A read of every key of a range, page by page, at one revision (the first page's): the
/// next page is requested from etcd while the caller handles the current one, and at most
/// those two are held.
pub struct Scan {
    kv: Backend,
    paging: Paging,
    end: Vec<u8>,
    /// Where the next page starts; `None` once the range is read.
    next: Option<Vec<u8>>,
    revision: i64,
    /// Keys still wanted (`None`: all).
    remaining: Option<i64>,
    /// Whether keys remain after the last one read (when `remaining` stopped the scan).
    more: bool,
    seen_keys: usize,
    seen_bytes: usize,
    /// The key count of the first range (`None`: as `paging` says).
    first_keys: Option<i64>,
    /// Whether the next page is requested before the current one is handed out.
    prefetch: bool,
    ahead: Option<tokio::task::JoinHandle<Result<RangeResp, StoreError>>>,
    latency: Option<Arc<Latency>>,
}

impl std::fmt::Debug for Scan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scan")
            .field("revision", &self.revision)
            .field("remaining", &self.remaining)
            .finish_non_exhaustive()
    }
}

impl Drop for Scan {
    fn drop(&mut self) {
        if let Some(h) = self.ahead.take() {
            h.abort();
        }
    }
}

/// One range of a [`Scan`], halving the key count while etcd finds the answer too large.
/// Each page read is timed as a `list` of the scanned type, as a one-range list was.
async fn read_page(
    kv: Backend,
    mut r: Range,
    latency: Option<Arc<Latency>>,
) -> Result<RangeResp, StoreError> {
    let started = Instant::now();
    let resp = loop {
        match kv.range(r.clone()).await {
            Err(e) if e.too_large() && r.limit > 1 => r.limit /= 2,
            other => break other,
        }
    };
    if let Some(l) = latency {
        l.observe("list", &String::from_utf8_lossy(&r.key), started);
    }
    resp
}

impl Scan {
    /// The revision the scan reads at (0 until the first page is read, when none was given).
    pub fn revision(&self) -> i64 {
        self.revision
    }

    /// The scan with its first range reading at most `keys` keys (a paged LIST asks for
    /// about what its page holds), and no page requested before it is wanted.
    #[must_use]
    pub fn paced(mut self, keys: i64) -> Self {
        self.first_keys = Some(keys.clamp(1, self.paging.keys.max(1)));
        self.prefetch = false;
        self
    }

    /// Whether every key of the range has been handed out.
    pub fn done(&self) -> bool {
        self.next.is_none() && self.ahead.is_none()
    }

    /// The key count of the next range.
    fn next_limit(&self) -> i64 {
        let mut keys = self.paging.keys.max(1);
        if self.seen_keys == 0
            && let Some(first) = self.first_keys
        {
            keys = first;
        }
        if self.seen_keys > 0 && self.seen_bytes > 0 {
            let average = (self.seen_bytes / self.seen_keys).max(1);
            keys = keys.min(
                i64::try_from(self.paging.bytes / average)
                    .unwrap_or(i64::MAX)
                    .max(1),
            );
        }
        match self.remaining {
            Some(r) => keys.min(r),
            None => keys,
        }
    }

    fn range(&self, start: Vec<u8>) -> Range {
        Range {
            key: start,
            end: Some(self.end.clone()),
            revision: self.revision,
            limit: self.next_limit(),
            ..Range::default()
        }
    }

    /// The next page of keys and objects, in key order; `None` once the range is read.
    ///
    /// # Errors
    /// [`StoreError::Compacted`] when the scan's revision is compacted between two pages;
    /// backend failures; [`StoreError::Corrupt`] for a value that is not JSON.
    pub async fn next(&mut self) -> Result<Option<Vec<(String, Stored)>>, StoreError> {
        match self.next_raw().await? {
            Some(kvs) => kvs
                .into_iter()
                .map(decode_kv)
                .collect::<Result<Vec<_>, _>>()
                .map(Some),
            None => Ok(None),
        }
    }

    /// The next page as etcd answered it (values not decoded); `None` once the range is read.
    ///
    /// # Errors
    /// As [`Scan::next`], but for values that are not JSON.
    pub async fn next_raw(&mut self) -> Result<Option<Vec<KeyValue>>, StoreError> {
        let resp = match self.ahead.take() {
            Some(h) => h.await.map_err(|_| StoreError::Poisoned)??,
            None => {
                let Some(start) = self.next.take() else {
                    return Ok(None);
                };
                read_page(self.kv.clone(), self.range(start), self.latency.clone()).await?
            }
        };
        if self.revision <= 0 {
            self.revision = resp.revision;
        }
        self.seen_keys += resp.kvs.len();
        self.seen_bytes += resp.kvs.iter().map(|kv| kv.value.len()).sum::<usize>();
        if let Some(r) = &mut self.remaining {
            *r -= resp.kvs.len() as i64;
        }
        self.more = resp.more;
        self.next = match resp.kvs.last() {
            Some(last) if resp.more && self.remaining.is_none_or(|r| r > 0) => {
                let mut k = last.key.clone();
                k.push(0);
                Some(k)
            }
            _ => None,
        };
        if self.prefetch
            && let Some(start) = self.next.take()
        {
            let r = self.range(start);
            self.ahead = Some(tokio::spawn(read_page(
                self.kv.clone(),
                r,
                self.latency.clone(),
            )));
        }
        if resp.kvs.is_empty() {
            return Ok(None);
        }
        Ok(Some(resp.kvs))
    }
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

/// A handle on the object store (etcd, or memory in tests); cheap to clone.
#[derive(Clone)]
pub struct Store {
    kv: Backend,
    paging: Paging,
    marker: Option<Arc<Marker>>,
    latency: Option<Arc<Latency>>,
}

/// Where a [`Store`] keeps its keys. An enum rather than a `dyn Kv`: the backend is chosen
/// without a boxed future per request, on the create path as everywhere.
#[derive(Clone, Debug)]
#[expect(
    clippy::large_enum_variant,
    reason = "etcd's client was held inline before; boxing it would allocate on each clone"
)]
enum Backend {
    Etcd(Etcd),
    Memory(Memory),
}

/// An open watch of a [`Store`].
#[derive(Debug)]
#[expect(
    clippy::large_enum_variant,
    reason = "one per watch feed, never moved on a hot path"
)]
pub enum Watch {
    /// On etcd.
    Etcd(EtcdWatch),
    /// On a [`Memory`] store.
    Memory(MemoryWatch),
}

impl WatchFeed for Watch {
    async fn message(&mut self) -> Result<Option<WatchMsg>, StoreError> {
        let mut msg = match self {
            Self::Etcd(w) => w.message().await,
            Self::Memory(w) => w.message().await,
        }?;
        if let Some(m) = &mut msg {
            migrate::watch(m);
        }
        Ok(msg)
    }

    async fn request_progress(&mut self) -> Result<(), StoreError> {
        match self {
            Self::Etcd(w) => w.request_progress().await,
            Self::Memory(w) => w.request_progress().await,
        }
    }
}

impl Kv for Backend {
    type Watch = Watch;

    async fn range(&self, r: Range) -> Result<RangeResp, StoreError> {
        let mut resp = match self {
            Self::Etcd(kv) => kv.range(r).await,
            Self::Memory(kv) => kv.range(r).await,
        }?;
        migrate::range(&mut resp);
        Ok(resp)
    }

    async fn txn(&self, t: Txn) -> Result<TxnResp, StoreError> {
        let mut resp = match self {
            Self::Etcd(kv) => kv.txn(t).await,
            Self::Memory(kv) => kv.txn(t).await,
        }?;
        resp.gets.iter_mut().for_each(migrate::range);
        Ok(resp)
    }

    async fn watch(&self, key: &str, end: Vec<u8>, start: i64) -> Result<Watch, StoreError> {
        match self {
            Self::Etcd(kv) => kv.watch(key, end, start).await.map(Watch::Etcd),
            Self::Memory(kv) => kv.watch(key, end, start).await.map(Watch::Memory),
        }
    }

    async fn compact(&self, revision: i64) -> Result<(), StoreError> {
        match self {
            Self::Etcd(kv) => kv.compact(revision).await,
            Self::Memory(kv) => kv.compact(revision).await,
        }
    }

    async fn grant_lease(&self, ttl: i64) -> Result<i64, StoreError> {
        match self {
            Self::Etcd(kv) => kv.grant_lease(ttl).await,
            Self::Memory(kv) => kv.grant_lease(ttl).await,
        }
    }

    async fn revoke_lease(&self, id: i64) -> Result<(), StoreError> {
        match self {
            Self::Etcd(kv) => kv.revoke_lease(id).await,
            Self::Memory(kv) => kv.revoke_lease(id).await,
        }
    }
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

impl Latency {
    fn observe(&self, operation: &'static str, key: &str, started: Instant) {
        self.family
            .get_or_create(&StorageOp {
                operation,
                r#type: type_of(&self.prefix, key),
            })
            .observe(started.elapsed().as_secs_f64());
    }
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

fn decode_kv(kv: KeyValue) -> Result<(String, Stored), StoreError> {
    decode(&kv.key, &kv.value, kv.mod_revision)
}

/// The compare of a [`Guard`].
fn guard(g: &Guard<'_>) -> Compare {
    match g {
        Guard::Revision(k, rev) => Compare::key(k, Target::Mod, CompareOp::Equal, *rev),
        Guard::Absent(k) => Compare::key(k, Target::Create, CompareOp::Equal, 0),
        Guard::Unchanged(p, at) => Compare {
            key: (*p).into(),
            end: Some(prefix_end(p)),
            target: Target::Mod,
            op: CompareOp::Less,
            revision: at + 1,
        },
    }
}

/// Every key under `prefix`.
fn prefix_range(prefix: &str) -> Range {
    Range {
        key: prefix.into(),
        end: Some(prefix_end(prefix)),
        ..Range::default()
    }
}

impl Store {
    /// Connects to etcd in the clear (`http://` endpoints).
    pub async fn connect(endpoints: &[String]) -> Result<Self, StoreError> {
        Self::connect_with(endpoints, None).await
    }

    /// Connects to etcd, over TLS with `tls` (`https://` endpoints).
    pub async fn connect_with(
        endpoints: &[String],
        tls: Option<&EtcdTls>,
    ) -> Result<Self, StoreError> {
        Ok(Self::over(Backend::Etcd(
            Etcd::connect(endpoints, tls).await?,
        )))
    }

    /// A store in memory, empty, with etcd's guarantees (see [`crate::storage::kv`]): for
    /// tests of what is built on the store.
    pub fn memory() -> Self {
        Self::over(Backend::Memory(Memory::new()))
    }

    /// Cancels every open watch of a store in memory (see [`Memory::cancel_watches`]), as a
    /// broken etcd watch stream does: for tests of what follows watches. Does nothing on etcd.
    pub fn cancel_watches(&self) {
        if let Backend::Memory(m) = &self.kv {
            m.cancel_watches();
        }
    }

    fn over(kv: Backend) -> Self {
        Self {
            kv,
            paging: Paging::default(),
            marker: None,
            latency: None,
        }
    }

    /// This store, reading whole ranges in pages of `paging` (tests make them small).
    #[must_use]
    pub fn with_paging(mut self, paging: Paging) -> Self {
        self.paging = paging;
        self
    }

    /// Reads keys in `[start, prefix_end(prefix))` at `revision` (0: the current one), at
    /// most `limit` (0: all), page by page; see [`Scan`].
    pub fn scan(&self, prefix: &str, start: Option<&str>, revision: i64, limit: i64) -> Scan {
        Scan {
            kv: self.kv.clone(),
            paging: self.paging,
            end: prefix_end(prefix),
            next: Some(start.unwrap_or(prefix).into()),
            revision,
            remaining: (limit > 0).then_some(limit),
            more: false,
            seen_keys: 0,
            seen_bytes: 0,
            first_keys: None,
            prefetch: true,
            ahead: None,
            latency: self.latency.clone(),
        }
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
            l.observe(operation, key, started);
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
    fn mark<'a>(&self, keys: impl IntoIterator<Item = &'a str>) -> Option<Op> {
        let m = self.marker.as_deref()?;
        m.covers(keys).then(|| Op::put(&m.key, Vec::new()))
    }

    /// Reads one object.
    pub async fn get(&self, key: &str) -> Result<Option<Stored>, StoreError> {
        let started = Instant::now();
        let resp = self
            .kv
            .range(Range {
                key: key.into(),
                ..Range::default()
            })
            .await?;
        self.observe("get", key, started);
        match resp.kvs.into_iter().next() {
            Some(kv) => Ok(Some(decode_kv(kv)?.1)),
            None => Ok(None),
        }
    }

    /// The store's current revision.
    pub async fn revision(&self) -> Result<i64, StoreError> {
        let resp = self
            .kv
            .range(Range {
                key: b"\0".to_vec(),
                count_only: true,
                ..Range::default()
            })
            .await?;
        Ok(resp.revision)
    }

    /// What `key` holds, writing `value` there first if it is absent, in one transaction:
    /// whoever writes it first wins, and everyone reads the winner's value.
    pub async fn first_written(&self, key: &str, value: &Value) -> Result<Value, StoreError> {
        let txn = Txn {
            when: vec![Compare::key(key, Target::Create, CompareOp::Equal, 0)],
            then: vec![Op::put(key, crate::base::meta::to_json(value))],
            otherwise: vec![Op::get(key)],
        };
        let started = Instant::now();
        let resp = self.kv.txn(txn).await?;
        self.observe("create", key, started);
        if resp.succeeded {
            return Ok(value.clone());
        }
        match resp
            .gets
            .into_iter()
            .next()
            .and_then(|g| g.kvs.into_iter().next())
        {
            Some(kv) => decode_kv(kv).map(|(_, s)| s.value),
            // Deleted between the compare and the read: not possible within one transaction.
            None => Err(StoreError::Poisoned),
        }
    }

    /// Creates `key` if it is absent.
    pub async fn create(&self, key: &str, value: &Value) -> Result<Write, StoreError> {
        self.create_under(key, value, None).await
    }

    /// Creates `key` if it is absent and, when given, the `parent` key (a namespaced object's
    /// Project) is still at the revision it was checked at, in the same transaction.
    /// `Conflict(0)` then means the parent changed (or went) since it was checked.
    pub async fn create_under(
        &self,
        key: &str,
        value: &Value,
        parent: Option<(&str, i64)>,
    ) -> Result<Write, StoreError> {
        self.write_guarded(key, value, None, &[], parent).await
    }

    /// Writes `key` if its revision is still `expected` (None: if it is absent) and no key
    /// under any of the `guards` prefixes changed after the guard's revision (and the `parent`
    /// key, when given, is still at its revision: [`Guard::Revision`]). `Conflict(rev)`
    /// carries the key's current revision (0: absent), so a caller can tell a failed guard
    /// (`rev` is what it expected) from a changed key.
    pub async fn write_guarded(
        &self,
        key: &str,
        value: &Value,
        expected: Option<i64>,
        guards: &[(&str, i64)],
        parent: Option<(&str, i64)>,
    ) -> Result<Write, StoreError> {
        let mut when = Vec::with_capacity(1 + guards.len() + usize::from(parent.is_some()));
        when.push(guard(&match expected {
            Some(rev) => Guard::Revision(key, rev),
            None => Guard::Absent(key),
        }));
        if let Some((parent, rev)) = parent {
            when.push(guard(&Guard::Revision(parent, rev)));
        }
        when.extend(
            guards
                .iter()
                .map(|(p, at)| guard(&Guard::Unchanged(p, *at))),
        );
        let then: Vec<Op> = std::iter::once(Op::put(key, crate::base::meta::to_json(value)))
            .chain(self.mark([key]))
            .collect();
        let txn = Txn {
            when,
            then,
            otherwise: vec![Op::get(key)],
        };
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
        let then: Vec<Op> = std::iter::once(Op::Delete(key.into()))
            .chain(attached.iter().map(|k| Op::Delete(k.as_str().into())))
            .chain(self.mark(std::iter::once(key).chain(attached.iter().map(String::as_str))))
            .collect();
        let txn = Txn {
            when: vec![guard(&Guard::Revision(key, expected))],
            then,
            otherwise: vec![Op::get(key)],
        };
        self.run("delete", key, txn).await
    }

    /// Runs a write whose `otherwise` reads the key: `Conflict` carries its revision.
    async fn run(&self, operation: &'static str, key: &str, txn: Txn) -> Result<Write, StoreError> {
        let started = Instant::now();
        let resp = self.kv.txn(txn).await?;
        self.observe(operation, key, started);
        if resp.succeeded {
            return Ok(Write::Done(resp.revision));
        }
        let current = resp
            .gets
            .first()
            .and_then(|g| g.kvs.first())
            .map_or(0, |kv| kv.mod_revision);
        Ok(Write::Conflict(current))
    }

    /// Reads keys in `[start, prefix_end(prefix))` at `revision` (0: latest), at most `limit`
    /// (0: all), in pages at one revision (see [`Scan`]), so no answer of etcd grows with
    /// the range.
    pub async fn list(
        &self,
        prefix: &str,
        start: Option<&str>,
        revision: i64,
        limit: i64,
    ) -> Result<Page, StoreError> {
        // Each page is timed as a `list` by the scan.
        let mut scan = self.scan(prefix, start, revision, limit);
        let mut items = Vec::new();
        while let Some(page) = scan.next().await? {
            items.extend(page);
        }
        Ok(Page {
            items,
            revision: scan.revision,
            more: scan.more,
        })
    }

    /// Reads several keys and prefixes at one revision, in one request: one `Vec` per read
    /// (a key's holds zero or one item), and the revision.
    pub async fn read_many(
        &self,
        reads: &[Read<'_>],
    ) -> Result<(Vec<Vec<(String, Stored)>>, i64), StoreError> {
        let then: Vec<Op> = reads
            .iter()
            .map(|r| match r {
                Read::Key(k) => Op::get(k),
                Read::Prefix(p) => Op::Get(prefix_range(p)),
                Read::Presence(k) => Op::Get(Range {
                    key: (*k).into(),
                    keys_only: true,
                    ..Range::default()
                }),
            })
            .collect();
        let started = Instant::now();
        let resp = self
            .kv
            .txn(Txn {
                then,
                ..Txn::default()
            })
            .await?;
        if let Some(Read::Key(k) | Read::Prefix(k) | Read::Presence(k)) = reads.first() {
            self.observe("read", k, started);
        }
        let mut out = Vec::with_capacity(reads.len());
        for (g, read) in resp.gets.into_iter().zip(reads) {
            out.push(
                g.kvs
                    .into_iter()
                    .map(|kv| match read {
                        Read::Presence(_) => Ok((
                            String::from_utf8_lossy(&kv.key).into_owned(),
                            Stored {
                                value: Value::Null,
                                mod_revision: kv.mod_revision,
                            },
                        )),
                        _ => decode_kv(kv),
                    })
                    .collect::<Result<Vec<_>, _>>()?,
            );
        }
        Ok((out, resp.revision))
    }

    /// Applies `puts` and `deletes` in one transaction if every guard holds; `Ok(None)` when
    /// one does not (nothing is written), else the revision written at.
    pub async fn write_many(
        &self,
        guards: &[Guard<'_>],
        puts: &[(&str, &Value)],
        deletes: &[&str],
    ) -> Result<Option<i64>, StoreError> {
        let then: Vec<Op> = puts
            .iter()
            .map(|(k, v)| Op::put(k, crate::base::meta::to_json(v)))
            .chain(deletes.iter().map(|k| Op::Delete((*k).into())))
            .chain(self.mark(puts.iter().map(|(k, _)| *k).chain(deletes.iter().copied())))
            .collect();
        let started = Instant::now();
        let resp = self
            .kv
            .txn(Txn {
                when: guards.iter().map(guard).collect(),
                then,
                otherwise: Vec::new(),
            })
            .await?;
        if let Some(k) = puts.first().map(|(k, _)| *k).or(deletes.first().copied()) {
            self.observe("write", k, started);
        }
        Ok(resp.succeeded.then_some(resp.revision))
    }

    /// Whether `key` was created after `revision` (its create revision is greater; false while
    /// it is absent), in one read-only transaction.
    ///
    /// # Errors
    /// Backend failures.
    pub async fn created_after(&self, key: &str, revision: i64) -> Result<bool, StoreError> {
        let resp = self
            .kv
            .txn(Txn {
                when: vec![Compare::key(
                    key,
                    Target::Create,
                    CompareOp::Greater,
                    revision,
                )],
                ..Txn::default()
            })
            .await?;
        Ok(resp.succeeded)
    }

    /// A lease of `ttl` seconds, for [`Store::write_leased`]: keys put with it go when it
    /// expires.
    ///
    /// # Errors
    /// Backend failures.
    pub async fn grant_lease(&self, ttl: i64) -> Result<i64, StoreError> {
        self.kv.grant_lease(ttl).await
    }

    /// Ends a lease of [`Store::grant_lease`] now, deleting the keys put with it.
    ///
    /// # Errors
    /// Backend failures.
    pub async fn revoke_lease(&self, id: i64) -> Result<(), StoreError> {
        self.kv.revoke_lease(id).await
    }

    /// Puts each `(key, value, lease)` (lease 0: none) in one transaction if every guard
    /// holds; `Ok(None)` when one does not (nothing is written), else the revision written at.
    /// For keys outside every marked prefix (no marker is put).
    pub async fn write_leased(
        &self,
        guards: &[Guard<'_>],
        puts: &[(&str, &Value, i64)],
    ) -> Result<Option<i64>, StoreError> {
        let then: Vec<Op> = puts
            .iter()
            .map(|(k, v, lease)| Op::Put {
                key: (*k).into(),
                value: crate::base::meta::to_json(v),
                lease: *lease,
            })
            .chain(self.mark(puts.iter().map(|(k, _, _)| *k)))
            .collect();
        let started = Instant::now();
        let resp = self
            .kv
            .txn(Txn {
                when: guards.iter().map(guard).collect(),
                then,
                otherwise: Vec::new(),
            })
            .await?;
        if let Some((k, _, _)) = puts.first() {
            self.observe("write", k, started);
        }
        Ok(resp.succeeded.then_some(resp.revision))
    }

    /// Writes an empty marker at `key` that etcd removes after `ttl` seconds.
    pub async fn put_with_ttl(&self, key: &str, ttl: i64) -> Result<(), StoreError> {
        let lease = self.kv.grant_lease(ttl).await?;
        let then: Vec<Op> = std::iter::once(Op::Put {
            key: key.into(),
            value: Vec::new(),
            lease,
        })
        .chain(self.mark([key]))
        .collect();
        self.kv
            .txn(Txn {
                then,
                ..Txn::default()
            })
            .await?;
        Ok(())
    }

    /// How many keys are under `prefix` (nothing is read but the count).
    pub async fn count(&self, prefix: &str) -> Result<i64, StoreError> {
        let started = Instant::now();
        let resp = self
            .kv
            .range(Range {
                count_only: true,
                ..prefix_range(prefix)
            })
            .await?;
        self.observe("count", prefix, started);
        Ok(resp.count)
    }

    /// Every key under `prefix` (values are not read).
    pub async fn keys(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        let resp = self
            .kv
            .range(Range {
                keys_only: true,
                ..prefix_range(prefix)
            })
            .await?;
        Ok(resp
            .kvs
            .iter()
            .map(|kv| String::from_utf8_lossy(&kv.key).into_owned())
            .collect())
    }

    /// Opens a watch on every key under `prefix`, from `start_revision` on, with previous
    /// values (so deletions and selector transitions can be reported).
    pub async fn watch(&self, prefix: &str, start_revision: i64) -> Result<Watch, StoreError> {
        self.kv
            .watch(prefix, prefix_end(prefix), start_revision)
            .await
    }

    /// Compacts history up to `revision` (used by tests of `410 Gone` and by maintenance).
    pub async fn compact(&self, revision: i64) -> Result<(), StoreError> {
        self.kv.compact(revision).await
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
            StoreError::Refused(why) => Self::internal(format!("the store refused a write: {why}")),
            e @ (StoreError::ReadFile { .. } | StoreError::Endpoint { .. }) => {
                Self::internal(e.to_string())
            }
            StoreError::Corrupt { key, .. } => {
                Self::internal(format!("stored object at {key} cannot be decoded"))
            }
            // etcd's limit on a write: the object is too large to store, as kube-apiserver
            // answers it.
            StoreError::Rejected(why) if why.contains("request is too large") => {
                let mut e = Self::too_large(0);
                e.message = format!("the object is too large to store: {why}");
                e
            }
            // Not retried, and no Retry-After: the same request fails the same way.
            StoreError::Rejected(why) => {
                Self::internal(format!("the object store refused the request: {why}"))
            }
            StoreError::Etcd(e) => {
                Self::unavailable(format!("the object store is unavailable: {e}"))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{Marker, StoreError, prefix_end, type_of};
    use crate::base::error::ApiError;

    #[test]
    fn a_refused_request_is_answered_at_once_without_retry_after() {
        let e = ApiError::from(StoreError::Rejected(
            "Error, decoded message length too large".into(),
        ));
        assert_eq!(e.code, 500);
        assert!(e.message.contains("decoded message length too large"));
        assert_eq!(e.details.retry_after, None);
        assert!(StoreError::Rejected("etcdserver: request is too large".into()).too_large());
        let e = ApiError::from(StoreError::Rejected(
            "etcdserver: request is too large".into(),
        ));
        assert_eq!((e.code, e.reason), (413, "RequestEntityTooLarge"));
        assert!(!StoreError::Rejected("etcdserver: invalid auth token".into()).too_large());
    }

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
