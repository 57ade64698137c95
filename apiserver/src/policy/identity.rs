//! Identity: passwords (argon2 hashes, never served), signed expiring bearer tokens with
//! revocation, the role assignments that authorise every request, and the throttling of
//! failed logins.
//!
//! Secrets live under `{prefix}/_system/`, outside every served resource's keys, so no API
//! call can read them.
//!
//! # Guarantees
//! - What a password or a token allows is tied to its User's uid: a password record and a
//!   token hold the uid they were made for, and a role assignment counts only while the User
//!   that owns it (its `ownerReferences`, set at admission) has that uid. A new User with a
//!   deleted one's name inherits nothing, even before the garbage collector removes the old
//!   assignments.
//! - A password change moves the user's token generation: every token issued before it stops
//!   working at once on every replica (save the changer's own, for a change of one's own
//!   password).
//! - argon2 runs on a few threads of its own with a bounded queue, never on the async workers;
//!   a full queue is a 429, not a longer wait.

use argon2::{Argon2, PasswordHasher, PasswordVerifier};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use ring::hmac;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::oneshot;

use crate::base::error::ApiError;
use crate::policy::roles::Grant;
use stratus_api_types::identity::Role;

use crate::storage::keys;
use crate::storage::store::{Guard, Read, Store, StoreError, Stored};

/// What a verified token says.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Claims {
    /// The user.
    #[serde(rename = "u")]
    pub user: String,
    /// Token id, for revocation.
    #[serde(rename = "j")]
    pub jti: String,
    /// Expiry, seconds since the epoch.
    #[serde(rename = "e")]
    pub exp: i64,
    /// The user's uid when the token was issued.
    #[serde(rename = "i", default)]
    pub uid: String,
    /// The user's token generation when the token was issued (see [`PasswordRecord`]).
    #[serde(rename = "g", default)]
    pub generation: u64,
    /// The project the token is scoped to (an identity login's): it acts there only.
    #[serde(rename = "p", default, skip_serializing_if = "Option::is_none")]
    pub project: Option<Scope>,
}

/// A project a token is scoped to, by name and uid: a new Project of the same name is
/// another scope, which the token does not reach.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Scope {
    /// The project's (and its namespace's) name.
    #[serde(rename = "n")]
    pub name: String,
    /// The Project's uid when the token was issued.
    #[serde(rename = "i")]
    pub uid: String,
}

/// Signs and verifies tokens.
#[derive(Debug)]
pub struct Signer {
    key: hmac::Key,
}

/// Signing key, passwords, revocations, grants.
#[derive(Debug)]
pub struct Identity {
    store: Store,
    prefix: String,
    /// What tokens were found to allow, while nothing that decides it has changed.
    memo: std::sync::Mutex<Memo>,
    /// Reads of the marker's revision, shared between concurrent requests.
    marker_reads: MarkerReads,
    /// A hash of a password nobody has, checked for unknown users so that they take as long
    /// to refuse as a wrong password.
    dummy_hash: String,
    /// Where argon2 runs.
    hasher: Hasher,
    /// Failed logins of Users, of names that are no User and per source address, shared by
    /// every replica (etcd).
    pub logins: super::logins::Logins,
    /// The token signer every replica shares.
    pub signer: Signer,
}

const TOKEN_PREFIX: &str = "st1.";

/// The most tokens [`Identity::token_grants`] remembers; past it, it starts afresh.
const MEMO_CAPACITY: usize = 10_000;

/// Token answers as of one revision of the identity marker ([`keys::marker_key`]).
#[derive(Debug, Default)]
struct Memo {
    /// The marker's `mod_revision` when the answers were read (0: the marker is absent).
    marker: i64,
    /// Per token id: its user's grants, or None when the token no longer holds.
    tokens: std::collections::HashMap<String, Option<Vec<Grant>>>,
}

impl Memo {
    fn get(&self, marker: i64, jti: &str) -> Option<Option<Vec<Grant>>> {
        (self.marker == marker)
            .then(|| self.tokens.get(jti).cloned())
            .flatten()
    }

    /// Keeps an answer read at `marker`, unless newer ones are already kept.
    fn keep(&mut self, marker: i64, jti: &str, answer: Option<Vec<Grant>>) {
        if marker > self.marker || self.tokens.len() >= MEMO_CAPACITY {
            self.marker = self.marker.max(marker);
            self.tokens.clear();
        }
        if marker == self.marker {
            self.tokens.insert(jti.to_string(), answer);
        }
    }
}

/// Reads of the marker key's revision, one at a time, each answering every request that
/// arrived before it was sent: a request sees every write that finished before it arrived,
/// and concurrent requests share reads instead of sending one each.
#[derive(Debug)]
struct MarkerReads {
    store: Store,
    key: String,
    pending: Arc<std::sync::Mutex<Pending>>,
}

#[derive(Debug, Default)]
struct Pending {
    /// Whether a reader task is running.
    reading: bool,
    /// Requests waiting for the next read.
    waiting: Vec<oneshot::Sender<Result<i64, ApiError>>>,
}

impl MarkerReads {
    /// The marker's revision (0: absent), read after this call began.
    async fn revision(&self) -> Result<i64, ApiError> {
        let (tx, rx) = oneshot::channel();
        let start = {
            let mut p = self
                .pending
                .lock()
                .map_err(|_| ApiError::from(StoreError::Poisoned))?;
            p.waiting.push(tx);
            !std::mem::replace(&mut p.reading, true)
        };
        if start {
            let (store, key, pending) =
                (self.store.clone(), self.key.clone(), self.pending.clone());
            tokio::spawn(async move {
                loop {
                    // Only the requests already waiting: later ones need a later read.
                    let batch = match pending.lock() {
                        Ok(mut p) if !p.waiting.is_empty() => std::mem::take(&mut p.waiting),
                        Ok(mut p) => {
                            p.reading = false;
                            return;
                        }
                        Err(_) => return,
                    };
                    let read = store
                        .read_many(&[Read::Presence(&key)])
                        .await
                        .map(|(r, _)| r.first().map_or(0, |r| revision_of(r)))
                        .map_err(ApiError::from);
                    for w in batch {
                        let _ = w.send(read.clone());
                    }
                }
            });
        }
        rx.await.map_err(|_| ApiError::from(StoreError::Poisoned))?
    }
}

fn now() -> i64 {
    jiff::Timestamp::now().as_second()
}

impl Identity {
    /// Loads the token signing key from etcd, making it on first start (every API server
    /// replica shares it).
    ///
    /// # Errors
    /// When etcd cannot be reached.
    pub async fn load(
        store: Store,
        prefix: &str,
        policy: &LoginPolicy,
    ) -> Result<Self, StoreError> {
        let key_path = format!("{prefix}/_system/token-key");
        let fresh = ring::rand::SystemRandom::new();
        let mut bytes = [0u8; 32];
        ring::rand::SecureRandom::fill(&fresh, &mut bytes).map_err(|_| StoreError::Poisoned)?;
        let stored = store
            .first_written(&key_path, &Value::String(B64.encode(bytes)))
            .await?;
        let material = stored
            .as_str()
            .and_then(|k| B64.decode(k).ok())
            .ok_or(StoreError::Poisoned)?;
        let dummy_hash = Argon2::default()
            .hash_password(uuid::Uuid::new_v4().to_string().as_bytes())
            .map(|h| h.to_string())
            .map_err(|_| StoreError::Poisoned)?;
        // The key that picks a made-up login name's count: every replica's, no client's.
        let made_up = hmac::sign(
            &hmac::Key::new(hmac::HMAC_SHA256, &material),
            super::logins::MADE_UP_LABEL,
        );
        let logins = super::logins::Logins::new(
            store.clone(),
            prefix,
            policy,
            hmac::Key::new(hmac::HMAC_SHA256, made_up.as_ref()),
        );
        Ok(Self {
            store: store.clone(),
            prefix: prefix.to_string(),
            memo: std::sync::Mutex::default(),
            marker_reads: MarkerReads {
                store,
                key: keys::marker_key(prefix),
                pending: Arc::default(),
            },
            dummy_hash,
            hasher: Hasher::new(
                policy.hash_threads,
                policy.hash_queue,
                policy.source_failure_attempts > 0,
            )
            .map_err(|_| StoreError::Poisoned)?,
            logins,
            signer: Signer {
                key: hmac::Key::new(hmac::HMAC_SHA256, &material),
            },
        })
    }
}

impl Signer {
    /// A token for `user`, valid for `ttl` seconds, as the password check `v` found them.
    pub fn issue(&self, user: &str, v: &Verified, ttl: i64) -> (String, Claims) {
        self.issue_scoped(user, v, ttl, None)
    }

    /// As [`Signer::issue`], scoped to a project when `project` is given.
    pub fn issue_scoped(
        &self,
        user: &str,
        v: &Verified,
        ttl: i64,
        project: Option<Scope>,
    ) -> (String, Claims) {
        let claims = Claims {
            user: user.to_string(),
            jti: uuid::Uuid::new_v4().simple().to_string(),
            exp: now() + ttl,
            uid: v.uid.clone(),
            generation: v.generation,
            project,
        };
        let payload = B64.encode(serde_json::to_vec(&claims).unwrap_or_default());
        let signed = format!("{TOKEN_PREFIX}{payload}");
        let sig = B64.encode(hmac::sign(&self.key, signed.as_bytes()).as_ref());
        (format!("{signed}.{sig}"), claims)
    }

    /// The claims of a token this cluster signed and that has not expired.
    pub fn verify(&self, token: &str) -> Option<Claims> {
        let rest = token.strip_prefix(TOKEN_PREFIX)?;
        let (payload, sig) = rest.rsplit_once('.')?;
        let sig = B64.decode(sig).ok()?;
        hmac::verify(
            &self.key,
            format!("{TOKEN_PREFIX}{payload}").as_bytes(),
            &sig,
        )
        .ok()?;
        let claims: Claims = serde_json::from_slice(&B64.decode(payload).ok()?).ok()?;
        (claims.exp > now()).then_some(claims)
    }
}

impl Identity {
    fn password_key(&self, user: &str) -> String {
        keys::password(&self.prefix, user)
    }

    fn user_key(&self, user: &str) -> String {
        keys::object(&self.prefix, "identity.stratus.dev", "users", None, user)
    }

    pub(crate) fn revoked_key(&self, jti: &str) -> String {
        format!("{}/_system/revoked/{jti}", self.prefix)
    }

    /// Sets a user's password (stored only as an argon2 hash, with the user's uid) and moves
    /// the user's token generation: every token issued before stops working, except `keep`
    /// (the changer's own token, when users change their own password).
    ///
    /// # Errors
    /// 422 for a password shorter than 8 characters; 404 for a user that does not exist; 429
    /// when the hashing queue is full; 503 when etcd is unreachable.
    pub async fn set_password(
        &self,
        user: &str,
        password: &str,
        keep: Option<&str>,
    ) -> Result<(), ApiError> {
        if password.chars().count() < 8 {
            return Err(ApiError::invalid(
                "User",
                "identity.stratus.dev",
                "users",
                user,
                vec![crate::base::error::Cause::invalid(
                    "password",
                    "must be at least 8 characters",
                )],
            ));
        }
        let password = password.to_string();
        let hash = self
            .hasher
            .run(move || {
                Argon2::default()
                    .hash_password(password.as_bytes())
                    .map(|h| h.to_string())
            })
            .await?
            .map_err(|e| ApiError::internal(format!("hash a password: {e}")))?;
        let key = self.password_key(user);
        let user_key = self.user_key(user);
        for _ in 0..16 {
            let (read, _) = self
                .store
                .read_many(&[Read::Key(&user_key), Read::Key(&key)])
                .await
                .map_err(ApiError::from)?;
            let Some((_, u)) = read.first().and_then(|r| r.first()) else {
                return Err(ApiError::not_found("identity.stratus.dev", "users", user));
            };
            let uid = crate::base::meta::meta_str(&u.value, "uid").unwrap_or_default();
            let current = read.get(1).and_then(|r| r.first());
            let generation = current
                .map(|(_, s)| PasswordRecord::of(&s.value))
                .filter(|r| r.uid.as_deref() == Some(uid))
                .map_or(0, |r| r.generation);
            let record = PasswordRecord {
                hash: hash.clone(),
                uid: Some(uid.to_string()),
                generation: generation + 1,
                keep: keep.map(String::from),
            };
            let value = serde_json::to_value(&record)
                .map_err(|e| ApiError::internal(format!("encode a password record: {e}")))?;
            let mut guards = vec![Guard::Revision(&user_key, u.mod_revision)];
            guards.push(match current {
                Some((_, c)) => Guard::Revision(&key, c.mod_revision),
                None => Guard::Absent(&key),
            });
            if self
                .store
                .write_many(&guards, &[(&key, &value)], &[])
                .await
                .map_err(ApiError::from)?
                .is_some()
            {
                return Ok(());
            }
        }
        Err(ApiError::conflict(
            "identity.stratus.dev",
            "users",
            user,
            "the user changed while its password was set; retry",
        ))
    }

    /// Whether `password` is the user's: the uid and token generation it was checked against
    /// when it is. Unknown users, users without a password and passwords of a deleted user of
    /// the same name take as long as a wrong password and answer the same.
    ///
    /// # Errors
    /// 429 when the hashing queue is full; 503 when etcd is unreachable.
    pub async fn check_password(
        &self,
        user: &str,
        password: &str,
    ) -> Result<Option<Verified>, ApiError> {
        self.verify_password(user, password, None)
            .await
            .map(|(v, _)| v)
    }

    /// As [`Identity::check_password`], also saying whether `user` is a User (for counting
    /// its failures; the client is never told), for a login from `source`: one source bucket
    /// (an IPv4 address, an IPv6 /64) holds at most a quarter of the hashing queue's places,
    /// so that one address's burst leaves room for everyone else's logins (unless the policy
    /// limits no source: `source_failure_attempts` 0).
    ///
    /// # Errors
    /// As [`Identity::check_password`]; 429 also when `source` holds its share of the queue.
    pub async fn verify_password(
        &self,
        user: &str,
        password: &str,
        source: Option<IpAddr>,
    ) -> Result<(Option<Verified>, bool), ApiError> {
        let (user_key, key) = (self.user_key(user), self.password_key(user));
        let (read, _) = self
            .store
            .read_many(&[Read::Key(&user_key), Read::Key(&key)])
            .await
            .map_err(ApiError::from)?;
        let uid = read
            .first()
            .and_then(|r| r.first())
            .and_then(|(_, u)| crate::base::meta::meta_str(&u.value, "uid"))
            .map(String::from);
        let record = read
            .get(1)
            .and_then(|r| r.first())
            .map(|(_, s)| PasswordRecord::of(&s.value))
            .filter(|r| uid.is_some() && r.holds_for(uid.as_deref()));
        let hash = record
            .as_ref()
            .map_or_else(|| self.dummy_hash.clone(), |r| r.hash.clone());
        let password = password.to_string();
        let ok = self
            .hasher
            .run_for(source.map(super::logins::bucket), move || {
                Argon2::default()
                    .verify_password(password.as_bytes(), hash.as_str())
                    .is_ok()
            })
            .await?;
        let known = uid.is_some();
        Ok((
            match (ok, record, uid) {
                (true, Some(r), Some(uid)) => Some(Verified {
                    uid,
                    generation: r.generation,
                }),
                _ => None,
            },
            known,
        ))
    }

    /// Whether `current` is `name`'s password, for a change of one's own password: refused
    /// (false) while `name` is locked out, and a wrong one counted as a failed login is, over
    /// every replica: a User's failures under its name, a name that is no User's (a User gone
    /// since its token was issued) in its made-up-name bucket, the same counts a login reads.
    ///
    /// # Errors
    /// 429 when the hashing queue is full; 503 when etcd is unreachable.
    pub async fn check_current_password(
        &self,
        name: &str,
        current: &str,
    ) -> Result<bool, ApiError> {
        let unix = jiff::Timestamp::now().as_second();
        let shared = self
            .logins
            .check(Some(name), None, unix)
            .await
            .map_err(ApiError::from)?;
        if shared.refusal.is_some() {
            return Ok(false);
        }
        let (verified, known) = self.verify_password(name, current, None).await?;
        if verified.is_some() {
            return Ok(true);
        }
        if known {
            self.logins.failed(Some(name), None, unix).await;
        } else {
            self.logins.failed_made_up(name, None, unix).await;
        }
        Ok(false)
    }

    /// Revokes a token until it would have expired anyway.
    pub async fn revoke(&self, c: &Claims) -> Result<(), ApiError> {
        let ttl = (c.exp - now()).max(1);
        self.store
            .put_with_ttl(&self.revoked_key(&c.jti), ttl)
            .await
            .map_err(ApiError::from)
    }

    /// What a verified token allows now: its user's grants, or None when the token was
    /// revoked, its user is gone, disabled or another user of the same name, or its user's
    /// password changed since it was issued. Grants in a disabled project are left out. A
    /// change takes effect from the very next request: every such write also puts the marker
    /// key, so one read of the marker's revision tells whether an answer read before still
    /// holds; if not, the revocation, the user, its password record and the role assignments
    /// are read afresh, with the marker, in one transaction (and the projects granted, after).
    pub async fn token_grants(&self, c: &Claims) -> Result<Option<Vec<Grant>>, ApiError> {
        let at = self.marker_reads.revision().await?;
        if let Some(answer) = self.memo.lock().ok().and_then(|m| m.get(at, &c.jti)) {
            return Ok(answer);
        }
        let marker = keys::marker_key(&self.prefix);
        let revoked = self.revoked_key(&c.jti);
        let user = self.user_key(&c.user);
        let password = self.password_key(&c.user);
        let assignments = format!("{}/identity.stratus.dev/roleassignments/", self.prefix);
        let (read, _) = self
            .store
            .read_many(&[
                Read::Presence(&marker),
                Read::Presence(&revoked),
                Read::Key(&user),
                Read::Key(&password),
                Read::Prefix(&assignments),
            ])
            .await
            .map_err(ApiError::from)?;
        let [
            marker_read,
            revoked_read,
            user_read,
            password_read,
            assignments_read,
        ] = <[Vec<(String, Stored)>; 5]>::try_from(read)
            .map_err(|_| ApiError::internal("etcd answered a read of five with another count"))?;
        let uid = user_read
            .first()
            .filter(|(_, u)| {
                u.value.pointer("/spec/enabled").and_then(Value::as_bool) != Some(false)
            })
            .and_then(|(_, u)| crate::base::meta::meta_str(&u.value, "uid"))
            .filter(|uid| *uid == c.uid);
        let current = password_read
            .first()
            .map(|(_, s)| PasswordRecord::of(&s.value))
            .is_some_and(|r| r.holds_for(uid) && r.admits(c));
        let mut answer = (revoked_read.is_empty() && current)
            .then(|| uid.map(|uid| grants_of(&c.user, uid, assignments_read)))
            .flatten();
        if let Some(grants) = answer.as_mut() {
            self.drop_disabled_projects(grants).await?;
        }
        if let Ok(mut m) = self.memo.lock() {
            m.keep(revision_of(&marker_read), &c.jti, answer.clone());
        }
        Ok(answer)
    }

    /// `grants` narrowed to the project `scope`: its own and the cluster-wide ones, as grants
    /// in that project; None when the Project is gone, another of the same name, or none of
    /// the grants reaches it.
    ///
    /// # Errors
    /// 503 when etcd is unreachable.
    pub async fn scoped(
        &self,
        grants: Vec<Grant>,
        scope: &Scope,
    ) -> Result<Option<Vec<Grant>>, ApiError> {
        let key = keys::object(
            &self.prefix,
            "identity.stratus.dev",
            "projects",
            None,
            &scope.name,
        );
        let project = self.store.get(&key).await.map_err(ApiError::from)?;
        if project.is_none_or(|p| {
            crate::base::meta::meta_str(&p.value, "uid") != Some(scope.uid.as_str())
                || p.value.pointer("/spec/enabled").and_then(Value::as_bool) == Some(false)
        }) {
            return Ok(None);
        }
        let narrowed: Vec<Grant> = grants
            .into_iter()
            .filter(|g| g.namespace.as_deref().is_none_or(|ns| ns == scope.name))
            .map(|g| Grant {
                namespace: Some(scope.name.clone()),
                role: g.role,
            })
            .collect();
        Ok((!narrowed.is_empty()).then_some(narrowed))
    }

    /// What the User `user` of uid `uid` is granted now (for a credential of that user's, not
    /// a token): None when the user is gone, disabled or another of the same name. Grants in
    /// a disabled project are left out.
    ///
    /// # Errors
    /// 503 when etcd is unreachable.
    pub async fn user_grants(&self, user: &str, uid: &str) -> Result<Option<Vec<Grant>>, ApiError> {
        let user_key = self.user_key(user);
        let assignments = format!("{}/identity.stratus.dev/roleassignments/", self.prefix);
        let (read, _) = self
            .store
            .read_many(&[Read::Key(&user_key), Read::Prefix(&assignments)])
            .await
            .map_err(ApiError::from)?;
        let [user_read, assignments_read] = <[Vec<(String, Stored)>; 2]>::try_from(read)
            .map_err(|_| ApiError::internal("etcd answered a read of two with another count"))?;
        let current = user_read.first().is_some_and(|(_, u)| {
            u.value.pointer("/spec/enabled").and_then(Value::as_bool) != Some(false)
                && crate::base::meta::meta_str(&u.value, "uid") == Some(uid)
        });
        if !current {
            return Ok(None);
        }
        let mut grants = grants_of(user, uid, assignments_read);
        self.drop_disabled_projects(&mut grants).await?;
        Ok(Some(grants))
    }

    /// Leaves out grants in projects that are disabled (`spec.enabled: false`) or gone.
    async fn drop_disabled_projects(&self, grants: &mut Vec<Grant>) -> Result<(), ApiError> {
        let mut projects: Vec<String> = grants.iter().filter_map(|g| g.namespace.clone()).collect();
        projects.sort_unstable();
        projects.dedup();
        if projects.is_empty() {
            return Ok(());
        }
        let project_keys: Vec<String> = projects
            .iter()
            .map(|p| keys::object(&self.prefix, "identity.stratus.dev", "projects", None, p))
            .collect();
        let reads: Vec<Read<'_>> = project_keys.iter().map(|k| Read::Key(k)).collect();
        let (read, _) = self.store.read_many(&reads).await.map_err(ApiError::from)?;
        let enabled: Vec<&String> = projects
            .iter()
            .zip(&read)
            .filter(|(_, r)| {
                r.first().is_some_and(|(_, p)| {
                    p.value.pointer("/spec/enabled").and_then(Value::as_bool) != Some(false)
                })
            })
            .map(|(p, _)| p)
            .collect();
        // System namespaces (stratus-system) have no Project and are never disabled.
        grants.retain(|g| match &g.namespace {
            Some(ns) => {
                enabled.contains(&ns)
                    || crate::resource::verbs::SYSTEM_NAMESPACES.contains(&ns.as_str())
            }
            None => true,
        });
        Ok(())
    }
}

/// What a password check found: whose password it was.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// The user's uid.
    pub uid: String,
    /// The user's token generation.
    pub generation: u64,
}

/// A stored password: its argon2 hash, the uid of the User it was set for, and the user's
/// token generation (tokens of another generation no longer hold, save `keep`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PasswordRecord {
    /// The argon2 hash (PHC string).
    pub hash: String,
    /// The uid of the User the password was set for; None for a record from before uids were
    /// recorded (it holds for the user of that name until the password is next set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
    /// Moved on every password change.
    #[serde(default)]
    pub generation: u64,
    /// A token id that survives the last change (the changer's own token).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep: Option<String>,
}

impl PasswordRecord {
    /// Reads a stored record (a bare string is a hash stored before records had fields).
    pub fn of(v: &Value) -> Self {
        match v {
            Value::String(hash) => Self {
                hash: hash.clone(),
                uid: None,
                generation: 0,
                keep: None,
            },
            other => serde_json::from_value(other.clone()).unwrap_or(Self {
                // Unreadable: no password matches an empty hash.
                hash: String::new(),
                uid: Some(String::new()),
                generation: 0,
                keep: None,
            }),
        }
    }

    /// Whether the record belongs to the User with `uid` (None: no such user).
    fn holds_for(&self, uid: Option<&str>) -> bool {
        uid.is_some() && (self.uid.is_none() || self.uid.as_deref() == uid)
    }

    /// Whether a token is of the current generation (or the one kept).
    fn admits(&self, c: &Claims) -> bool {
        c.generation == self.generation || self.keep.as_deref() == Some(c.jti.as_str())
    }
}

/// The revision of a read of one key; 0 when it is absent.
fn revision_of(read: &[(String, Stored)]) -> i64 {
    read.first().map_or(0, |(_, s)| s.mod_revision)
}

/// Whether an assignment belongs to the User with `uid`: the User it names owns it (set at
/// admission), or, for an assignment stored before owners were recorded, no User does.
fn owned_by(assignment: &Value, uid: &str) -> bool {
    let users: Vec<&Value> = assignment
        .pointer("/metadata/ownerReferences")
        .and_then(Value::as_array)
        .map(|refs| {
            refs.iter()
                .filter(|r| {
                    r.get("kind").and_then(Value::as_str) == Some("User")
                        && r.get("apiVersion").and_then(Value::as_str)
                            == Some("identity.stratus.dev/v1")
                })
                .collect()
        })
        .unwrap_or_default();
    users.is_empty()
        || users
            .iter()
            .all(|r| r.get("uid").and_then(Value::as_str) == Some(uid))
}

/// `user`'s grants among role assignments, `uid` being the User's current uid.
fn grants_of(user: &str, uid: &str, assignments: Vec<(String, Stored)>) -> Vec<Grant> {
    assignments
        .into_iter()
        .filter(|(_, s)| s.value.pointer("/spec/user").and_then(Value::as_str) == Some(user))
        .filter(|(_, s)| owned_by(&s.value, uid))
        .filter(|(_, s)| s.value.pointer("/metadata/deletionTimestamp").is_none())
        .filter_map(|(_, s)| {
            // Every stored assignment names a role: the schema requires one of the enum's.
            let role =
                serde_json::from_value::<Role>(s.value.pointer("/spec/role")?.clone()).ok()?;
            Some(Grant {
                namespace: if s
                    .value
                    .pointer("/spec/clusterWide")
                    .and_then(Value::as_bool)
                    == Some(true)
                {
                    None
                } else {
                    s.value
                        .pointer("/metadata/namespace")
                        .and_then(Value::as_str)
                        .map(String::from)
                },
                role,
            })
        })
        .collect()
}

/// How logins are throttled and where their hashing runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoginPolicy {
    /// Failed logins in a row from one source bucket (an IPv4 address, an IPv6 /64) after
    /// which a user is locked out for that bucket (Keystone's `lockout_failure_attempts`,
    /// counted per source); 0: never.
    pub lockout_failure_attempts: u32,
    /// How long a locked-out user stays locked out after the last failure (Keystone's
    /// `lockout_duration`).
    pub lockout_duration: Duration,
    /// Failed logins one source bucket (an IPv4 address, an IPv6 /64) may make per
    /// `source_window`; 0: no limit (then neither is its share of the hashing queue limited).
    pub source_failure_attempts: u32,
    /// The window of `source_failure_attempts`.
    pub source_window: Duration,
    /// Threads that hash and verify passwords.
    pub hash_threads: usize,
    /// Password checks that may wait for a hashing thread; past it, logins are answered 429.
    /// One source bucket holds at most a quarter of it.
    pub hash_queue: usize,
}

impl Default for LoginPolicy {
    /// 6 failures lock a user out for 30 minutes; 30 failures a minute from one address are
    /// throttled; half the cores (at least one) hash.
    fn default() -> Self {
        let cores = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
        Self {
            lockout_failure_attempts: 6,
            lockout_duration: Duration::from_secs(30 * 60),
            source_failure_attempts: 30,
            source_window: Duration::from_secs(60),
            hash_threads: (cores / 2).max(1),
            hash_queue: 16,
        }
    }
}

type Job = Box<dyn FnOnce() + Send>;

/// How much nicer the hashing threads are than the threads that serve requests, so that a
/// burst of logins keeping them busy takes the CPU only when serving has none to spend (on a
/// machine of 2 cores, one hashing thread at full speed otherwise doubles every request's
/// latency).
const HASH_NICE: i32 = 10;

/// A few threads of their own for argon2, fed through a bounded queue, below the serving
/// threads' priority.
#[derive(Debug)]
struct Hasher {
    jobs: std::sync::mpsc::SyncSender<Job>,
    /// Jobs queued or running per source bucket.
    sources: Arc<Mutex<HashMap<IpAddr, usize>>>,
    /// The most jobs one source bucket may have queued or running, if sources are limited.
    source_share: Option<usize>,
}

/// A source bucket's place among the hashing jobs, given back when the job has run (or was
/// never run).
struct SourcePlace {
    sources: Arc<Mutex<HashMap<IpAddr, usize>>>,
    source: IpAddr,
}

impl Drop for SourcePlace {
    fn drop(&mut self) {
        if let Ok(mut sources) = self.sources.lock()
            && let Some(n) = sources.get_mut(&self.source)
        {
            *n = n.saturating_sub(1);
            if *n == 0 {
                sources.remove(&self.source);
            }
        }
    }
}

impl Hasher {
    /// `threads` threads (at least one) [`HASH_NICE`] nicer than the caller, with room for
    /// `queue` waiting jobs; `per_source`: a quarter of the places (at least one) at most for
    /// one source bucket (off where sources are not limited: the addresses are not the
    /// clients', as behind a proxy). The threads end when the hasher is dropped.
    fn new(threads: usize, queue: usize, per_source: bool) -> std::io::Result<Self> {
        let (jobs, rx) = std::sync::mpsc::sync_channel::<Job>(queue);
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..threads.max(1) {
            let rx = Arc::clone(&rx);
            std::thread::Builder::new()
                .name(format!("argon2-{i}"))
                .spawn(move || {
                    // On Linux a nice value is the calling thread's own (`who` 0 is this
                    // thread, not the process), inherited from the thread that made it.
                    // Raising it needs no privilege; a failure only leaves the thread at the
                    // serving threads' priority.
                    let lowered = rustix::process::getpriority_process(None).and_then(|own| {
                        rustix::process::setpriority_process(None, (own + HASH_NICE).min(19))
                    });
                    if let Err(e) = lowered {
                        tracing::warn!(error = %e, "lowering the password hashing thread's priority");
                    }
                    loop {
                        let job = match rx.lock() {
                            Ok(rx) => rx.recv(),
                            Err(_) => return,
                        };
                        match job {
                            Ok(job) => job(),
                            Err(_) => return,
                        }
                    }
                })?;
        }
        Ok(Self {
            jobs,
            sources: Arc::default(),
            source_share: per_source.then_some((queue.max(1) / 4).max(1)),
        })
    }

    /// Runs `f` on a hashing thread.
    ///
    /// # Errors
    /// 429 when the queue is full.
    async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, ApiError> {
        self.run_for(None, f).await
    }

    /// Runs `f` on a hashing thread for a request from `source` (a bucket).
    ///
    /// # Errors
    /// 429 when the queue is full or `source` has its share of it.
    async fn run_for<T: Send + 'static>(
        &self,
        source: Option<IpAddr>,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, ApiError> {
        self.submit_for(source, f)?
            .await
            .map_err(|_| ApiError::internal("the password hashing threads stopped"))
    }

    /// Queues `f` for a request from `source` (a bucket); its answer comes on the receiver.
    ///
    /// # Errors
    /// 429 when the queue is full or `source` has its share of it.
    fn submit_for<T: Send + 'static>(
        &self,
        source: Option<IpAddr>,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<oneshot::Receiver<T>, ApiError> {
        let place = match source.zip(self.source_share) {
            None => None,
            Some((source, share)) => {
                let mut sources = self
                    .sources
                    .lock()
                    .map_err(|_| ApiError::internal("the password hashing queue is poisoned"))?;
                let n = sources.entry(source).or_insert(0);
                if *n >= share {
                    return Err(ApiError::too_many_requests(
                        "too many password checks from this address at once; retry",
                        1,
                    ));
                }
                *n += 1;
                Some(SourcePlace {
                    sources: Arc::clone(&self.sources),
                    source,
                })
            }
        };
        let (done, answer) = oneshot::channel();
        self.jobs
            .try_send(Box::new(move || {
                let answer = f();
                // The place is given back before the caller hears the answer.
                drop(place);
                let _ = done.send(answer);
            }))
            .map_err(|_| {
                ApiError::too_many_requests("too many password checks at once; retry", 1)
            })?;
        Ok(answer)
    }
}

/// Why a login is refused before its password is looked at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The user failed too often in a row: 401 until the lockout ends.
    Locked,
    /// The source address failed too often lately: 429, retry after this many seconds.
    Throttled(u32),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::roles::Grant;
    use stratus_api_types::identity::Role;

    #[test]
    fn remembered_answers_hold_only_at_the_marker_revision_they_were_read_at() {
        let mut m = Memo::default();
        let member = Some(vec![Grant {
            namespace: Some("p".into()),
            role: Role::Member,
        }]);
        assert_eq!(m.get(0, "t1"), None);
        m.keep(0, "t1", member.clone());
        assert_eq!(m.get(0, "t1"), Some(member.clone()));
        // The marker moved: nothing remembered holds.
        assert_eq!(m.get(7, "t1"), None);
        m.keep(7, "t2", None);
        assert_eq!(m.get(7, "t2"), Some(None));
        assert_eq!(
            m.get(7, "t1"),
            None,
            "an answer from before the change survived"
        );
        // An answer read before the newest one kept is not kept.
        m.keep(5, "t3", member.clone());
        assert_eq!(m.get(5, "t3"), None);
        assert_eq!(m.get(7, "t3"), None);
        // Full: it starts afresh rather than grow.
        for i in 0..MEMO_CAPACITY + 1 {
            m.keep(7, &format!("x{i}"), None);
        }
        assert!(m.tokens.len() <= MEMO_CAPACITY);
        assert_eq!(m.get(7, &format!("x{MEMO_CAPACITY}")), Some(None));
    }

    #[test]
    fn tokens_verify_and_expire() {
        let id = Signer {
            key: hmac::Key::new(hmac::HMAC_SHA256, b"k"),
        };
        let v = Verified {
            uid: "u1".into(),
            generation: 3,
        };
        let (tok, claims) = id.issue("alice", &v, 60);
        assert_eq!((claims.uid.as_str(), claims.generation), ("u1", 3));
        assert_eq!(id.verify(&tok), Some(claims));
        let (old, _) = id.issue("alice", &v, -1);
        assert_eq!(id.verify(&old), None);
        let forged = tok.replace("st1.", "st1.x");
        assert_eq!(id.verify(&forged), None);
        let other = Signer {
            key: hmac::Key::new(hmac::HMAC_SHA256, b"other"),
        };
        assert_eq!(other.verify(&tok), None);
    }

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

    #[tokio::test]
    async fn a_wrong_current_password_of_a_name_that_is_no_user_locks_it_on_every_replica() {
        let store = Store::memory();
        let a = Identity::load(store.clone(), "/p", &policy())
            .await
            .expect("replica a");
        let b = Identity::load(store.clone(), "/p", &policy())
            .await
            .expect("replica b");
        // A User gone since its token was issued: its name is a made-up one now.
        for i in 0..3 {
            assert!(
                !a.check_current_password("ghost", "guess")
                    .await
                    .expect("check"),
                "guess {i}"
            );
        }
        let now = jiff::Timestamp::now().as_second();
        let read = b
            .logins
            .check(Some("ghost"), None, now)
            .await
            .expect("read");
        assert_eq!(read.refusal, Some(Refusal::Locked));
        assert!(
            !b.check_current_password("ghost", "guess")
                .await
                .expect("check"),
            "locked on the other replica"
        );
        let other = b
            .logins
            .check(Some("alice"), None, now)
            .await
            .expect("read");
        assert_eq!(other.refusal, None, "another name");
    }

    #[test]
    fn password_records_hold_for_their_users_uid_and_generation() {
        let r = PasswordRecord::of(&serde_json::json!({
            "hash": "h", "uid": "u1", "generation": 2, "keep": "mine"
        }));
        assert!(r.holds_for(Some("u1")));
        assert!(!r.holds_for(Some("u2")), "a new user of the same name");
        assert!(!r.holds_for(None));
        let claims = |jti: &str, generation| Claims {
            user: "alice".into(),
            jti: jti.into(),
            exp: 0,
            uid: "u1".into(),
            generation,
            project: None,
        };
        assert!(r.admits(&claims("t", 2)));
        assert!(!r.admits(&claims("t", 1)), "a token from before the change");
        assert!(r.admits(&claims("mine", 1)), "the changer's own token");
        // A hash stored before records had fields holds for whoever has the name.
        let legacy = PasswordRecord::of(&Value::String("h".into()));
        assert!(legacy.holds_for(Some("anyone")) && legacy.admits(&claims("t", 0)));
        // Unreadable: holds for no one.
        assert!(!PasswordRecord::of(&serde_json::json!(7)).holds_for(Some("u1")));
    }

    #[test]
    fn assignments_count_only_for_the_user_that_owns_them() {
        let owned = |uid: &str| {
            serde_json::json!({"metadata": {"ownerReferences": [
                {"apiVersion": "identity.stratus.dev/v1", "kind": "User", "name": "alice", "uid": uid}
            ]}})
        };
        assert!(owned_by(&owned("u1"), "u1"));
        assert!(!owned_by(&owned("u0"), "u1"), "the deleted user's");
        assert!(owned_by(&serde_json::json!({"metadata": {}}), "u1"));
    }

    /// A job of no source that holds `h`'s one thread until the sender is used, started:
    /// everything queued after it waits.
    fn hold(h: &Hasher) -> (std::sync::mpsc::Sender<()>, oneshot::Receiver<()>) {
        let (release, wait) = std::sync::mpsc::channel::<()>();
        let (started_tx, started) = std::sync::mpsc::channel::<()>();
        let running = h
            .submit_for(None, move || {
                let _ = started_tx.send(());
                let _ = wait.recv();
            })
            .expect("queued");
        started.recv().expect("the held job started");
        (release, running)
    }

    #[tokio::test]
    async fn hashing_runs_off_the_async_workers_and_a_full_queue_is_a_429() {
        let h = Hasher::new(1, 1, true).expect("threads");
        let name = h
            .run(|| std::thread::current().name().map(String::from))
            .await
            .expect("ran");
        assert_eq!(name.as_deref(), Some("argon2-0"));
        // Below the caller's priority (on Linux, a thread's own nice value).
        let serving = rustix::process::getpriority_process(None).expect("own nice value");
        let hashing = h
            .run(|| rustix::process::getpriority_process(None).expect("hashing thread's nice"))
            .await
            .expect("ran");
        assert_eq!(
            hashing,
            (serving + HASH_NICE).min(19),
            "serving at {serving}"
        );
        // One job running, one waiting: the next is refused at once.
        let (release, running) = hold(&h);
        let queued = h.submit_for(None, || ()).expect("room for one waiting");
        let refused = h.submit_for(None, || ()).expect_err("a full queue");
        assert_eq!(refused.code, 429);
        let _ = release.send(());
        running.await.expect("the first job ran");
        queued.await.expect("the queued job ran");
    }

    #[tokio::test]
    async fn one_source_holds_at_most_a_quarter_of_the_hashing_queue() {
        let h = Hasher::new(1, 8, true).expect("threads");
        let (attacker, other) = (
            "192.0.2.1".parse::<IpAddr>().expect("address"),
            "198.51.100.7".parse::<IpAddr>().expect("address"),
        );
        // The thread held by a job of no source, so that everything after it waits.
        let (release, running) = hold(&h);
        let first = h
            .submit_for(Some(attacker), || 1)
            .expect("the attacker's first");
        let second = h
            .submit_for(Some(attacker), || 2)
            .expect("the attacker's second");
        let third = h
            .submit_for(Some(attacker), || 3)
            .expect_err("a quarter of 8 places is 2");
        assert_eq!(third.code, 429);
        assert!(
            third.message.contains("from this address"),
            "{}",
            third.message
        );
        let others = h
            .submit_for(Some(other), || 4)
            .expect("another address still gets in");
        let _ = release.send(());
        running.await.expect("ran");
        assert_eq!(first.await.expect("ran"), 1);
        assert_eq!(second.await.expect("ran"), 2);
        assert_eq!(others.await.expect("ran"), 4);
        // Its places given back once its jobs ran, the address gets in again; nothing is
        // kept for an address with none.
        assert_eq!(h.run_for(Some(attacker), || 5).await.expect("again"), 5);
        assert!(h.sources.lock().expect("lock").is_empty());
        // Where sources are not limited, one address may take every place.
        let open = Hasher::new(1, 8, false).expect("threads");
        let (release, running) = hold(&open);
        let all: Vec<_> = (0..8)
            .map(|i| open.submit_for(Some(attacker), move || i).expect("a place"))
            .collect();
        let _ = release.send(());
        running.await.expect("ran");
        for (i, job) in all.into_iter().enumerate() {
            assert_eq!(job.await.expect("ran"), i);
        }
        // A job refused by a full queue gives its place back too.
        let h = Hasher::new(1, 1, true).expect("threads");
        let (release, running) = hold(&h);
        let waiting = h.submit_for(None, || ()).expect("the one waiting place");
        let full = h
            .submit_for(Some(other), || ())
            .expect_err("the queue is full");
        assert_eq!(full.code, 429);
        assert!(h.sources.lock().expect("lock").is_empty());
        let _ = release.send(());
        running.await.expect("ran");
        waiting.await.expect("ran");
    }
}
