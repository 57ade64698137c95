//! The key-value operations the store is built on, as a trait ([`Kv`]) in etcd's model:
//! etcd's client implements it ([`crate::storage::etcd`]), and so does an in-memory store for
//! tests ([`crate::storage::memory`]).
//!
//! # Guarantees
//! Every implementation keeps what the verbs and admission rely on:
//! - one revision for the whole store, raised by one for each transaction that changes
//!   something (a transaction that only reads, or whose deletes find nothing, leaves it);
//! - per key, the revision of its last change (`mod_revision`) and of its creation;
//! - a transaction's compares are checked and its operations applied as one atomic step;
//!   compares over a range hold when every key in it satisfies them (a range with no key
//!   compares as one absent key, with revisions 0);
//! - a range at a past revision sees the store as it was then, for every revision not older
//!   than the compacted one ([`StoreError::Compacted`] below it, [`StoreError::FutureRevision`]
//!   beyond the current one);
//! - a watch from revision R delivers every change at R or later under its range, in revision
//!   order, each with the key's previous value; from a compacted R, it is cancelled with the
//!   compaction revision instead.

use std::future::Future;

use crate::storage::store::StoreError;

/// One stored key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    /// The key.
    pub key: Vec<u8>,
    /// The value (empty for a keys-only read or a deletion).
    pub value: Vec<u8>,
    /// The revision of the key's last change.
    pub mod_revision: i64,
}

/// A read of one key or of a range of keys.
#[derive(Debug, Clone, Default)]
pub struct Range {
    /// The key, or the first key of the range.
    pub key: Vec<u8>,
    /// The first key after the range; `None`: only `key`. `[0]` means every key from `key` on.
    pub end: Option<Vec<u8>>,
    /// The revision to read at; 0: the current one.
    pub revision: i64,
    /// At most this many keys; 0: all.
    pub limit: i64,
    /// Keys and revisions only, no values.
    pub keys_only: bool,
    /// The count only, no keys.
    pub count_only: bool,
}

/// What a [`Range`] found.
#[derive(Debug, Clone, Default)]
pub struct RangeResp {
    /// The keys, in key order (none for a count-only read).
    pub kvs: Vec<KeyValue>,
    /// Whether keys remain beyond `limit`.
    pub more: bool,
    /// How many keys the range holds, regardless of `limit`.
    pub count: i64,
    /// The store's current revision (not the one read at).
    pub revision: i64,
}

/// What a [`Compare`] looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// The revision of the key's last change (0: absent).
    Mod,
    /// The revision of the key's creation (0: absent).
    Create,
}

/// How a [`Compare`] compares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompareOp {
    /// `==`
    Equal,
    /// `>`
    Greater,
    /// `<`
    Less,
}

/// A condition of a transaction, on one key or on every key of a range.
#[derive(Debug, Clone)]
pub struct Compare {
    /// The key, or the first key of the range.
    pub key: Vec<u8>,
    /// The first key after the range; `None`: only `key`.
    pub end: Option<Vec<u8>>,
    /// What is compared.
    pub target: Target,
    /// How.
    pub op: CompareOp,
    /// With what.
    pub revision: i64,
}

impl Compare {
    /// The key's `target` revision compares to `revision` by `op`.
    pub fn key(key: &str, target: Target, op: CompareOp, revision: i64) -> Self {
        Self {
            key: key.into(),
            end: None,
            target,
            op,
            revision,
        }
    }
}

/// One operation of a transaction.
#[derive(Debug, Clone)]
pub enum Op {
    /// Writes a key, bound to a lease when `lease` is not 0 (the key goes when it expires).
    Put {
        /// The key.
        key: Vec<u8>,
        /// The value.
        value: Vec<u8>,
        /// The lease, or 0.
        lease: i64,
    },
    /// Deletes a key (nothing happens if it is absent).
    Delete(Vec<u8>),
    /// Reads, as [`Kv::range`] does, at the transaction's revision.
    Get(Range),
}

impl Op {
    /// The put of `value` at `key`, bound to no lease.
    pub fn put(key: &str, value: Vec<u8>) -> Self {
        Self::Put {
            key: key.into(),
            value,
            lease: 0,
        }
    }

    /// The read of one key.
    pub fn get(key: &str) -> Self {
        Self::Get(Range {
            key: key.into(),
            ..Range::default()
        })
    }
}

/// A transaction: if every compare of `when` holds, `then`'s operations, else `otherwise`'s.
/// A key may be written (put or deleted) once per transaction.
#[derive(Debug, Clone, Default)]
pub struct Txn {
    /// The conditions.
    pub when: Vec<Compare>,
    /// What to do when they all hold.
    pub then: Vec<Op>,
    /// What to do when one does not.
    pub otherwise: Vec<Op>,
}

/// What a [`Txn`] did.
#[derive(Debug, Clone, Default)]
pub struct TxnResp {
    /// Whether every compare held (`then` ran).
    pub succeeded: bool,
    /// The store's revision after the transaction.
    pub revision: i64,
    /// The answers of the [`Op::Get`]s of the branch that ran, in order.
    pub gets: Vec<RangeResp>,
}

/// One change seen by a watch.
#[derive(Debug, Clone)]
pub struct Event {
    /// The key as written (the value is empty for a deletion); its `mod_revision` is the
    /// change's revision.
    pub kv: KeyValue,
    /// The key before the change, if it existed.
    pub prev: Option<KeyValue>,
    /// Whether the change deleted the key.
    pub deleted: bool,
}

/// What a watch delivers.
#[derive(Debug, Clone)]
pub enum WatchMsg {
    /// Changes, in revision order.
    Events(Vec<Event>),
    /// Every change up to this revision has been delivered.
    Progress(i64),
    /// The watch ended; when the start revision was compacted, with the compaction revision
    /// (else 0).
    Canceled {
        /// The store's compaction revision, or 0.
        compact_revision: i64,
    },
}

/// An open watch.
pub trait WatchFeed: Send {
    /// The next message; `None` once the watch has ended.
    ///
    /// # Errors
    /// When the backend fails.
    fn message(&mut self) -> impl Future<Output = Result<Option<WatchMsg>, StoreError>> + Send;

    /// Asks for a [`WatchMsg::Progress`] with the current revision.
    ///
    /// # Errors
    /// When the backend fails.
    fn request_progress(&mut self) -> impl Future<Output = Result<(), StoreError>> + Send;
}

/// The key-value backend of the store: etcd's model, kept to what the store uses.
pub trait Kv: Send + Sync {
    /// An open watch.
    type Watch: WatchFeed;

    /// Reads a key or a range.
    ///
    /// # Errors
    /// [`StoreError::Compacted`] or [`StoreError::FutureRevision`] for a revision that cannot
    /// be read; backend failures.
    fn range(&self, r: Range) -> impl Future<Output = Result<RangeResp, StoreError>> + Send;

    /// Runs a transaction.
    ///
    /// # Errors
    /// [`StoreError::Refused`] for a key written twice; backend failures.
    fn txn(&self, t: Txn) -> impl Future<Output = Result<TxnResp, StoreError>> + Send;

    /// Watches `[key, end)` from `start_revision` on (0: from the next change), reporting
    /// previous values.
    ///
    /// # Errors
    /// Backend failures (a compacted start revision is reported on the watch itself).
    fn watch(
        &self,
        key: &str,
        end: Vec<u8>,
        start_revision: i64,
    ) -> impl Future<Output = Result<Self::Watch, StoreError>> + Send;

    /// Forgets history before `revision`: reads and watches from older revisions are refused.
    ///
    /// # Errors
    /// [`StoreError::Compacted`] when already compacted there, [`StoreError::FutureRevision`].
    fn compact(&self, revision: i64) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// A lease of `ttl` seconds: keys put with it are deleted when it expires.
    ///
    /// # Errors
    /// Backend failures.
    fn grant_lease(&self, ttl: i64) -> impl Future<Output = Result<i64, StoreError>> + Send;

    /// Ends lease `id` now, deleting the keys put with it.
    ///
    /// # Errors
    /// Backend failures (an unknown or expired lease among them, on etcd).
    fn revoke_lease(&self, id: i64) -> impl Future<Output = Result<(), StoreError>> + Send;
}
