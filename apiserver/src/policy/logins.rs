//! Failed logins counted for every API server replica at once: the lockout of a user and the
//! throttling of a source address hold on every replica, so N replicas do not give an
//! attacker N times the attempts.
//!
//! Each replica keeps its own count per (user, source bucket) and per source bucket in etcd,
//! one key per (user and bucket or bucket, replica) under `{prefix}/_system/logins/` (outside
//! every served
//! resource's keys and every identity-marked prefix, so a failure moves no token answer). A
//! login is judged on the sum of every replica's fresh counts, read in one request with the
//! keys of its user and address.
//!
//! # Source buckets
//! A source is counted by its bucket ([`bucket`]): an IPv4 address by itself, an IPv6 one by
//! its /64 (what one host or site is given, so an attacker's addresses in it share one
//! budget). A user's failures are counted per bucket: failures from one bucket lock the user
//! out for that bucket alone, so an attacker cannot lock a user (`admin`) out of every other
//! address. There is no lockout of a user over every source: it would be the same denial of
//! service for anyone holding a few buckets (an IPv6 /48 is 65,536 of them). Guessing from
//! many buckets is bounded by each bucket's lockout and throttle and by the replicas' hashing
//! queue (429 past it).
//!
//! # Guarantees
//! - A failed login is answered only once its failure is in etcd (or etcd failed): the next
//!   attempt, on any replica, counts it. Concurrent attempts may each pass the check before
//!   the others' failures are written, as on one replica; they are bounded by the hashing
//!   queue (see [`super::identity::LoginPolicy::hash_queue`]).
//! - Bounded writes: a replica writes only its own keys, so replicas never conflict, and its
//!   failures go out in batches (every failure waiting while a batch is written goes in the
//!   next one), at most one batch per [`FLUSH_INTERVAL`] and [`BATCH_KEYS`] keys per batch.
//!   A failed-login storm is at most 10 etcd transactions a second per replica, whatever its
//!   rate; a failure is also a password hash, so a replica makes only tens a second anyway.
//! - Bounded keys: user counts are kept only for users that exist; every key is bound to a
//!   lease that outlives its count's expiry by at most [`LEASE_ROTATION`], so etcd forgets
//!   counts that no longer matter. One lease per kind per replica per rotation.
//! - A successful login removes every replica's count of its user.
//!
//! # Names that are no User
//! A made-up name's failures are counted over every replica too, as a User's are (so that it
//! locks out after as many tries in all, and which of the two a name is cannot be told by
//! trying it on another replica or from another address), without a key per name: in one of
//! [`MADE_UP_BUCKETS`] shared counts, chosen by an HMAC-SHA256 of the source bucket and the
//! name under a key derived from the cluster's token signing key (in etcd, outside every
//! served resource), so a client can neither aim two names at one count nor know which names
//! share one. A made-up name's count is its bucket's: the failures in a row of every
//! (name, source bucket) pair hashed there, so it locks out after at most as many tries as a
//! User's, sooner when other made-up names failed in its bucket lately. Users never share a
//! count. At most [`MADE_UP_BUCKETS`] keys per replica, whatever the names; filling them all
//! takes `lockout_failure_attempts` times that many failures within `lockout_duration`, more
//! than the replicas' hashing threads verify in that time.

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use serde_json::{Value, json};

use super::identity::{LoginPolicy, Refusal};
use crate::storage::store::{Guard, Read, Store, StoreError};

/// The shortest time between two batches of one replica.
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(100);

/// The most keys one batch writes (etcd refuses transactions of more than 128 operations).
pub const BATCH_KEYS: usize = 48;

/// How long one lease takes new keys before the next is granted.
pub const LEASE_ROTATION: i64 = 60;

/// The most counts a replica remembers of its own; past it, stale ones are forgotten.
const CAPACITY: usize = 100_000;

/// How long a replica answers a refusal it read (a lockout, a throttled address) from its
/// memory before reading etcd again: a storm against a locked-out user or a throttled
/// address costs one etcd read a second per replica, not one per attempt. A successful login
/// on another replica is so seen up to this late.
pub const REFUSAL_MEMORY: Duration = Duration::from_secs(1);

/// The most refusals remembered; past it, they are forgotten.
const REFUSALS: usize = 10_000;

/// How many counts names that are no User share (see the module's documentation).
pub const MADE_UP_BUCKETS: u32 = 65_536;

/// What the key that picks a made-up name's count is derived with, from the token key.
pub const MADE_UP_LABEL: &[u8] = b"stratus made-up login names v1";

/// What a count is of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Failed logins of a user in a row; lapses `lockout_duration` after its last failure.
    User,
    /// Failed logins from a source address in a window that opens at its first failure.
    Source,
}

/// One replica's count of one user or address, as it reads or writes it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Count {
    count: u32,
    /// Unix seconds: the last failure (a user's), the window's opening (an address's).
    at: i64,
}

impl Count {
    fn of(v: &Value) -> Self {
        Self {
            count: v
                .get("count")
                .and_then(Value::as_u64)
                .map_or(0, |c| u32::try_from(c).unwrap_or(u32::MAX)),
            at: v.get("at").and_then(Value::as_i64).unwrap_or(0),
        }
    }

    fn value(self) -> Value {
        json!({"count": self.count, "at": self.at})
    }
}

/// This replica's own count of one key.
#[derive(Debug, Clone, Copy, Default)]
struct Own {
    kind: Option<Kind>,
    /// The count as last written (or being written).
    written: Count,
    /// Failures not yet written.
    pending: u32,
    /// The key's revision as last written (0: not written, or gone).
    rev: i64,
}

impl Own {
    fn total(&self) -> Count {
        Count {
            count: self.written.count.saturating_add(self.pending),
            at: self.written.at,
        }
    }
}

#[derive(Debug, Default)]
struct State {
    own: HashMap<String, Own>,
    dirty: BTreeSet<String>,
    /// Per kind: the lease new keys are put with, and when it was granted (unix seconds).
    leases: [Option<(i64, i64)>; 2],
}

/// The bucket `ip`'s failures are counted in: an IPv4 address (or an IPv4-mapped IPv6 one)
/// by itself, an IPv6 address by its /64 network (its last 64 bits zero).
#[must_use]
pub fn bucket(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(std::net::Ipv6Addr::from(
                v6.to_bits() & !((1u128 << 64) - 1),
            )),
        },
    }
}

/// What [`Logins::check`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checked {
    /// Why the login is refused before its password is looked at.
    pub refusal: Option<Refusal>,
    /// The user's fresh failures from this source's bucket over every replica (for a name
    /// that is no User, its bucket's).
    pub user_failures: u32,
}

/// Failed logins per user and per source address, shared by every replica through etcd.
#[derive(Debug)]
pub struct Logins {
    store: Store,
    /// The key prefix of every object.
    prefix: String,
    root: String,
    /// Picks a made-up name's count ([`MADE_UP_BUCKETS`]).
    made_up: ring::hmac::Key,
    replica: String,
    policy: LoginPolicy,
    state: Mutex<State>,
    /// Held while a batch is written; when the last one began.
    flushing: tokio::sync::Mutex<Option<Instant>>,
    /// Refusals read lately, by the user's or address's key prefix, until when they are
    /// answered from memory.
    refused: Mutex<HashMap<String, (Refusal, i64, Instant)>>,
}

fn secs(d: Duration) -> i64 {
    i64::try_from(d.as_secs()).unwrap_or(i64::MAX)
}

impl Logins {
    /// The counts of this replica (a new id each start) under `{prefix}/_system/logins/`;
    /// `made_up` picks the count of a name that is no User (every replica must have the same,
    /// and no client: derived from the token signing key with [`MADE_UP_LABEL`]).
    pub fn new(store: Store, prefix: &str, policy: &LoginPolicy, made_up: ring::hmac::Key) -> Self {
        Self {
            store,
            prefix: prefix.to_owned(),
            root: format!("{prefix}/_system/logins/"),
            made_up,
            replica: uuid::Uuid::new_v4().simple().to_string(),
            policy: policy.clone(),
            state: Mutex::default(),
            flushing: tokio::sync::Mutex::new(None),
            refused: Mutex::default(),
        }
    }

    /// The prefix of every replica's count of `user` from `source`'s bucket (the user named
    /// by a hash: any string a client sends makes a key of the same short length).
    fn user_prefix(&self, user: &str, source: Option<IpAddr>) -> String {
        let digest = ring::digest::digest(&ring::digest::SHA256, user.as_bytes());
        let from = source.map_or_else(|| "unknown".to_string(), |ip| bucket(ip).to_string());
        format!("{}users/{}/{from}/", self.root, B64.encode(digest.as_ref()))
    }

    /// The prefix of every replica's count of the made-up names that share `user`'s bucket
    /// from `source`'s bucket.
    fn made_up_prefix(&self, user: &str, source: Option<IpAddr>) -> String {
        let from = source.map_or_else(|| "unknown".to_string(), |ip| bucket(ip).to_string());
        let mut ctx = ring::hmac::Context::with_key(&self.made_up);
        ctx.update(&(from.len() as u64).to_be_bytes());
        ctx.update(from.as_bytes());
        ctx.update(user.as_bytes());
        let tag = ctx.sign();
        let mut first = [0u8; 4];
        first.copy_from_slice(&tag.as_ref()[..4]);
        let index = u32::from_be_bytes(first) % MADE_UP_BUCKETS;
        format!("{}made-up/{index:05}/", self.root)
    }

    fn source_prefix(&self, ip: IpAddr) -> String {
        format!("{}sources/{}/", self.root, bucket(ip))
    }

    fn expiry(&self, kind: Kind) -> i64 {
        match kind {
            Kind::User => secs(self.policy.lockout_duration),
            Kind::Source => secs(self.policy.source_window),
        }
    }

    fn fresh(&self, kind: Kind, c: Count, now: i64) -> bool {
        c.count > 0 && now.saturating_sub(c.at) < self.expiry(kind)
    }

    /// Whether a login of `user` from `source` may be tried at `now` (unix seconds), over
    /// every replica's counts.
    ///
    /// # Errors
    /// etcd could not be read.
    pub async fn check(
        &self,
        user: Option<&str>,
        source: Option<IpAddr>,
        now: i64,
    ) -> Result<Checked, StoreError> {
        let p = &self.policy;
        let user = user.filter(|_| p.lockout_failure_attempts > 0);
        let user_prefix = user.map(|u| self.user_prefix(u, source));
        let source_prefix = source
            .filter(|_| p.source_failure_attempts > 0)
            .map(|ip| self.source_prefix(ip));
        // Whether the name is a User, and the count of its bucket if it is not.
        let made_up_prefix = user.map(|u| self.made_up_prefix(u, source));
        let user_key = user.map(|u| {
            crate::storage::keys::object(&self.prefix, "identity.stratus.dev", "users", None, u)
        });
        let reads: Vec<Read<'_>> = user_prefix
            .iter()
            .chain(source_prefix.iter())
            .chain(made_up_prefix.iter())
            .map(|k| Read::Prefix(k))
            .chain(user_key.iter().map(|k| Read::Presence(k)))
            .collect();
        if reads.is_empty() {
            return Ok(Checked {
                refusal: None,
                user_failures: 0,
            });
        }
        if let Some(refusal) = self.remembered(&source_prefix, &user_prefix, now) {
            return Ok(Checked {
                refusal: Some(refusal),
                user_failures: 0,
            });
        }
        let (read, revision) = self.store.read_many(&reads).await?;
        let mut read = read.into_iter();
        let mut sum = |kind: Kind, prefix: &Option<String>| -> Vec<Count> {
            let Some(prefix) = prefix else {
                return Vec::new();
            };
            let found = read.next().unwrap_or_default();
            self.counts(kind, prefix, &found, revision, now)
        };
        let users = sum(Kind::User, &user_prefix);
        let sources = sum(Kind::Source, &source_prefix);
        let made_up = sum(Kind::User, &made_up_prefix);
        let known = read.next().is_some_and(|r| !r.is_empty());
        let users = if known { users } else { made_up };
        let user_failures = users
            .iter()
            .map(|c| c.count)
            .fold(0u32, u32::saturating_add);
        let source_failures = sources
            .iter()
            .map(|c| c.count)
            .fold(0u32, u32::saturating_add);
        let refusal = if source_prefix.is_some() && source_failures >= p.source_failure_attempts {
            let window = self.expiry(Kind::Source);
            let left = sources
                .iter()
                .map(|c| c.at.saturating_add(window).saturating_sub(now))
                .max()
                .unwrap_or(1);
            Some(Refusal::Throttled(
                u32::try_from(left.max(1)).unwrap_or(u32::MAX),
            ))
        } else if user_prefix.is_some() && user_failures >= p.lockout_failure_attempts {
            Some(Refusal::Locked)
        } else {
            None
        };
        if let Some(r) = refusal {
            let key = match r {
                Refusal::Throttled(_) => source_prefix,
                Refusal::Locked => user_prefix,
            };
            if let (Some(key), Ok(mut m)) = (key, self.refused.lock()) {
                if m.len() >= REFUSALS {
                    m.clear();
                }
                m.insert(key, (r, now, Instant::now() + REFUSAL_MEMORY));
            }
        }
        Ok(Checked {
            refusal,
            user_failures,
        })
    }

    /// A refusal of the address or the user read less than [`REFUSAL_MEMORY`] ago, in the
    /// same second of `now`.
    fn remembered(
        &self,
        source: &Option<String>,
        user: &Option<String>,
        now: i64,
    ) -> Option<Refusal> {
        let m = self.refused.lock().ok()?;
        let instant = Instant::now();
        [source, user].into_iter().flatten().find_map(|k| {
            m.get(k)
                .filter(|(_, at, until)| *at == now && *until > instant)
                .map(|(r, _, _)| *r)
        })
    }

    /// The fresh counts of every replica under `prefix`, as read at `revision`: this
    /// replica's own from its memory (with its failures not yet written), forgotten when its
    /// key went since it was written (a successful login elsewhere, or its lease).
    fn counts(
        &self,
        kind: Kind,
        prefix: &str,
        found: &[(String, crate::storage::store::Stored)],
        revision: i64,
        now: i64,
    ) -> Vec<Count> {
        let own_key = format!("{prefix}{}", self.replica);
        let mut out: Vec<Count> = found
            .iter()
            .filter(|(k, _)| *k != own_key)
            .map(|(_, s)| Count::of(&s.value))
            .filter(|c| self.fresh(kind, *c, now))
            .collect();
        if let Ok(mut st) = self.state.lock()
            && let Some(own) = st.own.get_mut(&own_key)
        {
            let present = found.iter().any(|(k, _)| *k == own_key);
            if !present && own.rev != 0 && revision > own.rev {
                own.written = Count::default();
                own.rev = 0;
            }
            let total = own.total();
            if self.fresh(kind, total, now) {
                out.push(total);
            }
        }
        out
    }

    /// Counts a failed login at `now` (unix seconds): of `user` (a user that exists) and from
    /// `source`; returns once the failure is written to etcd (or writing it failed, which is
    /// logged: the failure is then counted by this replica alone until a later batch writes
    /// it).
    pub async fn failed(&self, user: Option<&str>, source: Option<IpAddr>, now: i64) {
        let key = user.map(|u| self.user_prefix(u, source));
        self.count(key, source, now).await;
    }

    /// As [`Logins::failed`], for `name`, which is no User: counted in its bucket.
    pub async fn failed_made_up(&self, name: &str, source: Option<IpAddr>, now: i64) {
        self.count(Some(self.made_up_prefix(name, source)), source, now)
            .await;
    }

    /// Counts a failure under `user` (the prefix of a user's or a bucket's count) and from
    /// `source`.
    async fn count(&self, user: Option<String>, source: Option<IpAddr>, now: i64) {
        let p = &self.policy;
        let keys: Vec<(Kind, String)> = user
            .filter(|_| p.lockout_failure_attempts > 0)
            .map(|u| (Kind::User, format!("{u}{}", self.replica)))
            .into_iter()
            .chain(source.filter(|_| p.source_failure_attempts > 0).map(|ip| {
                (
                    Kind::Source,
                    format!("{}{}", self.source_prefix(ip), self.replica),
                )
            }))
            .collect();
        if keys.is_empty() {
            return;
        }
        if let Ok(mut st) = self.state.lock() {
            if st.own.len() >= CAPACITY {
                let dirty = st.dirty.clone();
                st.own.retain(|k, o| {
                    dirty.contains(k) || o.kind.is_some_and(|kind| self.fresh(kind, o.total(), now))
                });
            }
            for (kind, key) in keys {
                let own = st.own.entry(key.clone()).or_default();
                own.kind = Some(kind);
                if !self.fresh(kind, own.total(), now) {
                    own.written = Count { count: 0, at: now };
                    own.pending = 0;
                }
                own.pending += 1;
                if kind == Kind::User {
                    own.written.at = now;
                }
                st.dirty.insert(key);
            }
        }
        self.flush(now).await;
    }

    /// Forgets every replica's count of `user` from `source`'s bucket (after a successful
    /// login from it; another bucket's count, an attacker's, stays).
    ///
    /// # Errors
    /// etcd could not be written.
    pub async fn succeeded(&self, user: &str, source: Option<IpAddr>) -> Result<(), StoreError> {
        let prefix = self.user_prefix(user, source);
        if let Ok(mut m) = self.refused.lock() {
            m.remove(&prefix);
        }
        if let Ok(mut st) = self.state.lock() {
            let own_key = format!("{prefix}{}", self.replica);
            st.own.remove(&own_key);
            st.dirty.remove(&own_key);
        }
        let keys = self.store.keys(&prefix).await?;
        if !keys.is_empty() {
            let deletes: Vec<&str> = keys.iter().map(String::as_str).collect();
            self.store.write_many(&[], &[], &deletes).await?;
        }
        Ok(())
    }

    /// The lease of `kind` for keys put at `now`, granted when the current one is too old.
    async fn lease(&self, kind: Kind, now: i64) -> Result<i64, StoreError> {
        let slot = usize::from(kind == Kind::Source);
        if let Ok(st) = self.state.lock()
            && let Some((id, granted)) = st.leases[slot]
            && now.saturating_sub(granted) < LEASE_ROTATION
        {
            return Ok(id);
        }
        let id = self
            .store
            .grant_lease(self.expiry(kind).saturating_add(LEASE_ROTATION))
            .await?;
        if let Ok(mut st) = self.state.lock() {
            st.leases[slot] = Some((id, now));
        }
        Ok(id)
    }

    /// Writes the failures not yet written, in batches, one batch at a time per replica.
    async fn flush(&self, now: i64) {
        let mut last = self.flushing.lock().await;
        let mut conflicts = 0;
        loop {
            // Nothing left: an earlier batch carried this caller's failure.
            if self.batch().is_empty() {
                return;
            }
            if let Some(t) = *last {
                tokio::time::sleep_until((t + FLUSH_INTERVAL).into()).await;
            }
            // Every failure recorded while waiting goes in this batch.
            let batch = self.batch();
            if batch.is_empty() {
                return;
            }
            *last = Some(Instant::now());
            match self.write(&batch, now).await {
                Ok(true) => {}
                Ok(false) if conflicts < 4 => conflicts += 1,
                Ok(false) => {
                    tracing::warn!("failed logins: batch kept conflicting; counted here only");
                    self.forget_dirty(&batch);
                    return;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "failed logins: write counts to etcd");
                    self.forget_dirty(&batch);
                    return;
                }
            }
        }
    }

    /// The next batch: up to [`BATCH_KEYS`] keys with failures not yet written.
    fn batch(&self) -> Vec<(String, Own)> {
        match self.state.lock() {
            Ok(st) => st
                .dirty
                .iter()
                .take(BATCH_KEYS)
                .filter_map(|k| st.own.get(k).map(|o| (k.clone(), *o)))
                .collect(),
            Err(_) => Vec::new(),
        }
    }

    /// Gives up writing `batch` for now: the next failure's batch carries it.
    fn forget_dirty(&self, batch: &[(String, Own)]) {
        if let Ok(mut st) = self.state.lock() {
            for (k, _) in batch {
                st.dirty.remove(k);
            }
        }
    }

    /// One batch: `Ok(false)` when one of its keys changed under it (it is read again, and
    /// the batch recomputed).
    async fn write(&self, batch: &[(String, Own)], now: i64) -> Result<bool, StoreError> {
        let mut leases = [0i64; 2];
        for (_, o) in batch {
            if let Some(kind) = o.kind {
                let slot = usize::from(kind == Kind::Source);
                if leases[slot] == 0 {
                    leases[slot] = self.lease(kind, now).await?;
                }
            }
        }
        let values: Vec<(String, Value, i64, Own)> = batch
            .iter()
            .map(|(k, o)| {
                let slot = usize::from(o.kind == Some(Kind::Source));
                (k.clone(), o.total().value(), leases[slot], *o)
            })
            .collect();
        let guards: Vec<Guard<'_>> = values
            .iter()
            .map(|(k, _, _, o)| Guard::Revision(k, o.rev))
            .collect();
        let puts: Vec<(&str, &Value, i64)> = values
            .iter()
            .map(|(k, v, lease, _)| (k.as_str(), v, *lease))
            .collect();
        if let Some(rev) = self.store.write_leased(&guards, &puts).await? {
            if let Ok(mut st) = self.state.lock() {
                for (k, o) in batch {
                    let Some(own) = st.own.get_mut(k) else {
                        continue;
                    };
                    own.written = o.total();
                    own.pending = own.pending.saturating_sub(o.pending);
                    own.rev = rev;
                    if own.pending == 0 {
                        st.dirty.remove(k);
                    }
                }
            }
            return Ok(true);
        }
        // A key went (a successful login elsewhere removed it, or its lease expired): what
        // was written of it no longer counts.
        let reads: Vec<Read<'_>> = batch.iter().map(|(k, _)| Read::Presence(k)).collect();
        let (read, _) = self.store.read_many(&reads).await?;
        if let Ok(mut st) = self.state.lock() {
            for ((k, o), found) in batch.iter().zip(read) {
                let rev = found.first().map_or(0, |(_, s)| s.mod_revision);
                if rev != o.rev
                    && let Some(own) = st.own.get_mut(k)
                {
                    own.written.count = 0;
                    own.rev = rev;
                }
            }
        }
        Ok(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> LoginPolicy {
        LoginPolicy {
            lockout_failure_attempts: 3,
            lockout_duration: Duration::from_secs(60),
            source_failure_attempts: 5,
            source_window: Duration::from_secs(10),
            hash_threads: 1,
            hash_queue: 1,
        }
    }

    /// Two replicas on one store.
    fn replicas() -> (Store, Logins, Logins) {
        let store = Store::memory();
        let key = || ring::hmac::Key::new(ring::hmac::HMAC_SHA256, b"cluster");
        let a = Logins::new(store.clone(), "/p", &policy(), key());
        let b = Logins::new(store.clone(), "/p", &policy(), key());
        (store, a, b)
    }

    /// Makes Users `names` (the counts of other names are their buckets').
    async fn users(store: &Store, names: &[&str]) {
        for n in names {
            let key = crate::storage::keys::object("/p", "identity.stratus.dev", "users", None, n);
            store
                .create(
                    &key,
                    &json!({"metadata": {"name": n, "uid": format!("u-{n}")}}),
                )
                .await
                .expect("a user");
        }
    }

    async fn refusal(l: &Logins, user: &str, ip: Option<IpAddr>, now: i64) -> Option<Refusal> {
        l.check(Some(user), ip, now).await.expect("read").refusal
    }

    #[tokio::test]
    async fn failures_on_one_replica_lock_the_user_out_on_another_until_a_success() {
        let (store, a, b) = replicas();
        users(&store, &["alice", "bob", "carol"]).await;
        let t0 = 1_000_000;
        // Two failures on A, one on B: three in all.
        a.failed(Some("alice"), None, t0).await;
        a.failed(Some("alice"), None, t0).await;
        assert_eq!(refusal(&b, "alice", None, t0).await, None);
        b.failed(Some("alice"), None, t0).await;
        for l in [&a, &b] {
            assert_eq!(refusal(l, "alice", None, t0).await, Some(Refusal::Locked));
        }
        assert_eq!(refusal(&b, "bob", None, t0).await, None, "another user");
        // Locked until the lockout ends after the last failure.
        assert_eq!(
            refusal(&a, "alice", None, t0 + 59).await,
            Some(Refusal::Locked)
        );
        assert_eq!(refusal(&a, "alice", None, t0 + 60).await, None);

        // A success on one replica forgets every replica's count, this one's memory too.
        a.failed(Some("carol"), None, t0).await;
        b.failed(Some("carol"), None, t0).await;
        assert_eq!(
            b.check(Some("carol"), None, t0)
                .await
                .expect("read")
                .user_failures,
            2
        );
        b.succeeded("carol", None).await.expect("forget");
        assert_eq!(
            a.check(Some("carol"), None, t0)
                .await
                .expect("read")
                .user_failures,
            0
        );
        // A's next failure starts afresh rather than bringing back what was forgotten.
        a.failed(Some("carol"), None, t0).await;
        assert_eq!(
            b.check(Some("carol"), None, t0)
                .await
                .expect("read")
                .user_failures,
            1
        );
    }

    #[tokio::test]
    async fn a_made_up_name_locks_out_over_every_replica_in_a_bucket_of_few() {
        let (store, a, b) = replicas();
        let ip: IpAddr = [10, 0, 0, 1].into();
        let t0 = 6_000_000;
        for l in [&a, &b] {
            l.failed_made_up("ghost", Some(ip), t0).await;
        }
        assert_eq!(refusal(&a, "ghost", Some(ip), t0).await, None);
        b.failed_made_up("ghost", Some(ip), t0).await;
        for l in [&a, &b] {
            assert_eq!(
                refusal(l, "ghost", Some(ip), t0).await,
                Some(Refusal::Locked)
            );
        }
        assert_eq!(
            refusal(&a, "ghost", Some([10, 0, 0, 2].into()), t0).await,
            None,
            "another address's bucket"
        );
        // A User of that name does not share the made-up name's count.
        users(&store, &["ghost"]).await;
        assert_eq!(refusal(&a, "ghost", Some(ip), t0 + 1).await, None);
        // A bucket is picked by the cluster's key: the same on every replica, another
        // with another key; many names, few keys.
        assert_eq!(
            a.made_up_prefix("ghost", Some(ip)),
            b.made_up_prefix("ghost", Some(ip))
        );
        let other = Logins::new(
            store.clone(),
            "/p",
            &policy(),
            ring::hmac::Key::new(ring::hmac::HMAC_SHA256, b"another cluster"),
        );
        let names: Vec<String> = (0..64).map(|i| format!("n{i}")).collect();
        let differ = names
            .iter()
            .filter(|n| a.made_up_prefix(n, Some(ip)) != other.made_up_prefix(n, Some(ip)))
            .count();
        assert!(differ > 60, "{differ} of 64 names differ");
        for n in &names {
            a.failed_made_up(n, Some(ip), t0).await;
        }
        let keys = store
            .keys("/p/_system/logins/made-up/")
            .await
            .expect("keys");
        // One key per bucket and replica (64 names and ghost on A, ghost on B), each a
        // bucket of the fixed few.
        assert!(keys.len() <= 66, "{} keys", keys.len());
        assert!(keys.iter().all(|k| {
            k.split('/')
                .nth(5)
                .and_then(|i| i.parse::<u32>().ok())
                .is_some_and(|i| i < MADE_UP_BUCKETS)
        }));
    }

    #[tokio::test]
    async fn a_source_address_is_throttled_over_every_replica_whatever_the_names() {
        let (_, a, b) = replicas();
        let ip: IpAddr = [10, 0, 0, 1].into();
        let t0 = 2_000_000;
        // Names that are no User: counted against the address only.
        for i in 0..5 {
            let l = if i % 2 == 0 { &a } else { &b };
            assert_eq!(refusal(l, &format!("u{i}"), Some(ip), t0).await, None);
            l.failed(None, Some(ip), t0 + 1).await;
        }
        for l in [&a, &b] {
            assert_eq!(
                refusal(l, "new", Some(ip), t0 + 4).await,
                Some(Refusal::Throttled(7)),
                "the window opened at t0 + 1 and lasts 10 s"
            );
        }
        assert_eq!(
            refusal(&a, "new", Some([10, 0, 0, 2].into()), t0).await,
            None
        );
        assert_eq!(refusal(&b, "new", Some(ip), t0 + 11).await, None);
        assert_eq!(
            b.check(Some("u0"), None, t0)
                .await
                .expect("read")
                .user_failures,
            0,
            "no count is kept for a name that is no User"
        );
    }

    #[tokio::test]
    async fn a_storm_of_failures_is_a_few_etcd_writes() {
        let (store, a, b) = replicas();
        users(&store, &["victim"]).await;
        let a = std::sync::Arc::new(a);
        let t0 = 3_000_000;
        // Warm the leases, so what is counted is the failures' writes.
        a.failed(Some("warm"), Some([10, 0, 0, 9].into()), t0).await;
        let before = store.revision().await.expect("revision");
        let started = Instant::now();
        // 100 failures from 100 IPv4 addresses (a user key and a source key each) and 100
        // from one IPv6 /64 (one of each).
        let v6 =
            |i: u16| -> IpAddr { std::net::Ipv6Addr::new(0x2001, 0xdb8, 7, 7, 0, 0, 0, i).into() };
        let storm: Vec<_> = (0..200u16)
            .map(|i| {
                let a = std::sync::Arc::clone(&a);
                let ip: IpAddr = if i < 100 {
                    [10, 1, 0, u8::try_from(i).expect("small")].into()
                } else {
                    v6(i)
                };
                tokio::spawn(async move {
                    a.failed(Some("victim"), Some(ip), t0).await;
                })
            })
            .collect();
        for t in storm {
            t.await.expect("failure counted");
        }
        let writes = store.revision().await.expect("revision") - before;
        // 200 failures on 202 keys: batches of BATCH_KEYS keys, one per FLUSH_INTERVAL.
        let most = i64::try_from(202usize.div_ceil(BATCH_KEYS)).expect("small");
        assert!(
            (1..=most).contains(&writes),
            "{writes} transactions for 200 failures"
        );
        assert!(
            started.elapsed() >= FLUSH_INTERVAL * 3,
            "batches are spaced"
        );
        // Every one of them is counted, on the other replica too.
        let failures = |ip: IpAddr| {
            let b = &b;
            async move {
                b.check(Some("victim"), Some(ip), t0)
                    .await
                    .expect("read")
                    .user_failures
            }
        };
        assert_eq!(failures(v6(0xffff)).await, 100);
        for i in 0..100u8 {
            assert_eq!(failures([10, 1, 0, i].into()).await, 1, "10.1.0.{i}");
        }
    }

    #[tokio::test]
    async fn failures_from_one_source_lock_the_user_out_for_that_source_only() {
        let (store, a, b) = replicas();
        users(&store, &["admin"]).await;
        let attacker: IpAddr = [203, 0, 113, 7].into();
        let owner: IpAddr = [198, 51, 100, 2].into();
        let t0 = 4_000_000;
        for l in [&a, &b, &a] {
            l.failed(Some("admin"), Some(attacker), t0).await;
        }
        for l in [&a, &b] {
            assert_eq!(
                refusal(l, "admin", Some(attacker), t0).await,
                Some(Refusal::Locked),
                "the attacker's address is locked out"
            );
            assert_eq!(
                refusal(l, "admin", Some(owner), t0).await,
                None,
                "another address still logs in"
            );
        }
        // The owner's success forgets the owner's count, not the attacker's lockout.
        b.failed(Some("admin"), Some(owner), t0).await;
        a.succeeded("admin", Some(owner)).await.expect("forget");
        assert_eq!(
            b.check(Some("admin"), Some(owner), t0)
                .await
                .expect("read")
                .user_failures,
            0
        );
        assert_eq!(
            refusal(&b, "admin", Some(attacker), t0 + 1).await,
            Some(Refusal::Locked)
        );
    }

    #[tokio::test]
    async fn ipv6_addresses_of_one_64_share_one_budget() {
        let (store, a, b) = replicas();
        users(&store, &["admin"]).await;
        let t0 = 5_000_000;
        let ip = |s: &str| -> IpAddr { s.parse().expect("address") };
        // Three addresses of 2001:db8:1:2::/64 lock the user out for all of it.
        for (i, s) in ["2001:db8:1:2::1", "2001:db8:1:2::2", "2001:db8:1:2:ffff::9"]
            .into_iter()
            .enumerate()
        {
            let l = if i % 2 == 0 { &a } else { &b };
            l.failed(Some("admin"), Some(ip(s)), t0).await;
        }
        assert_eq!(
            refusal(&a, "admin", Some(ip("2001:db8:1:2:abcd::1")), t0).await,
            Some(Refusal::Locked)
        );
        assert_eq!(
            refusal(&b, "admin", Some(ip("2001:db8:1:3::1")), t0).await,
            None,
            "the next /64 is another bucket"
        );
        // Five failures under made-up names from five addresses of one /64 throttle it.
        for i in 0..5u16 {
            a.failed(None, Some(ip(&format!("2001:db8:9:9::{i:x}"))), t0)
                .await;
        }
        assert!(matches!(
            refusal(&b, "new", Some(ip("2001:db8:9:9:1:2:3:4")), t0).await,
            Some(Refusal::Throttled(_))
        ));
        assert_eq!(
            refusal(&b, "new", Some(ip("2001:db8:9:a::1")), t0).await,
            None
        );
        // An IPv4 address is its own bucket, as its IPv4-mapped IPv6 form.
        assert_eq!(bucket(ip("::ffff:10.0.0.1")), ip("10.0.0.1"));
        assert_eq!(bucket(ip("10.0.0.1")), ip("10.0.0.1"));
        assert_eq!(bucket(ip("2001:db8::1:2:3:4")), ip("2001:db8::"));
    }
}
