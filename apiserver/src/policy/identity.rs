//! Identity: passwords (argon2 hashes, never served), signed expiring bearer tokens with
//! revocation, and the role assignments that authorise every request.
//!
//! Secrets live under `{prefix}/_system/`, outside every served resource's keys, so no API
//! call can read them.

use argon2::{Argon2, PasswordHasher, PasswordVerifier};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use ring::hmac;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::sync::Arc;
use tokio::sync::oneshot;

use crate::base::error::ApiError;
use crate::policy::roles::Grant;
use stratus_api_types::identity::Role;

use crate::storage::keys;
use crate::storage::store::{Read, Store, StoreError, Stored, Write};

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
    pub async fn load(store: Store, prefix: &str) -> Result<Self, StoreError> {
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
            signer: Signer {
                key: hmac::Key::new(hmac::HMAC_SHA256, &material),
            },
        })
    }
}

impl Signer {
    /// A token for `user`, valid for `ttl` seconds.
    pub fn issue(&self, user: &str, ttl: i64) -> (String, Claims) {
        let claims = Claims {
            user: user.to_string(),
            jti: uuid::Uuid::new_v4().simple().to_string(),
            exp: now() + ttl,
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
        format!("{}/_system/passwords/{user}", self.prefix)
    }

    fn revoked_key(&self, jti: &str) -> String {
        format!("{}/_system/revoked/{jti}", self.prefix)
    }

    /// Sets a user's password (stored only as an argon2 hash).
    ///
    /// # Errors
    /// 422 for a password shorter than 8 characters; 503 when etcd is unreachable.
    pub async fn set_password(&self, user: &str, password: &str) -> Result<(), ApiError> {
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
        let hash = Argon2::default()
            .hash_password(password.as_bytes())
            .map_err(|e| ApiError::internal(format!("hash a password: {e}")))?
            .to_string();
        let key = self.password_key(user);
        loop {
            let current = self.store.get(&key).await.map_err(ApiError::from)?;
            let written = match current {
                Some(c) => {
                    self.store
                        .update(&key, &Value::String(hash.clone()), c.mod_revision)
                        .await
                }
                None => self.store.create(&key, &Value::String(hash.clone())).await,
            }
            .map_err(ApiError::from)?;
            if let Write::Done(_) = written {
                return Ok(());
            }
        }
    }

    /// Whether `password` is the user's. Unknown users and users without a password take as
    /// long as a wrong password and answer the same.
    pub async fn check_password(&self, user: &str, password: &str) -> Result<bool, ApiError> {
        let stored = self
            .store
            .get(&self.password_key(user))
            .await
            .map_err(ApiError::from)?;
        let hash = stored
            .as_ref()
            .and_then(|s| s.value.as_str())
            .unwrap_or(&self.dummy_hash)
            .to_string();
        let ok = Argon2::default()
            .verify_password(password.as_bytes(), hash.as_str())
            .is_ok();
        Ok(ok && stored.is_some())
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
    /// revoked or its user is gone or disabled. A change takes effect from the very next
    /// request: every such write also puts the marker key, so one read of the marker's
    /// revision tells whether an answer read before still holds; if not, the revocation, the
    /// user and the role assignments are read afresh, with the marker, in one transaction.
    pub async fn token_grants(&self, c: &Claims) -> Result<Option<Vec<Grant>>, ApiError> {
        let at = self.marker_reads.revision().await?;
        if let Some(answer) = self.memo.lock().ok().and_then(|m| m.get(at, &c.jti)) {
            return Ok(answer);
        }
        let marker = keys::marker_key(&self.prefix);
        let revoked = self.revoked_key(&c.jti);
        let user = format!("{}/identity.stratus.dev/users/{}", self.prefix, c.user);
        let assignments = format!("{}/identity.stratus.dev/roleassignments/", self.prefix);
        let (read, _) = self
            .store
            .read_many(&[
                Read::Presence(&marker),
                Read::Presence(&revoked),
                Read::Key(&user),
                Read::Prefix(&assignments),
            ])
            .await
            .map_err(ApiError::from)?;
        let [marker_read, revoked_read, user_read, assignments_read] =
            <[Vec<(String, Stored)>; 4]>::try_from(read).map_err(|_| {
                ApiError::internal("etcd answered a read of four with another count")
            })?;
        let valid = revoked_read.is_empty()
            && user_read.first().is_some_and(|(_, u)| {
                u.value.pointer("/spec/enabled").and_then(Value::as_bool) != Some(false)
            });
        let answer = valid.then(|| grants_of(&c.user, assignments_read));
        if let Ok(mut m) = self.memo.lock() {
            m.keep(revision_of(&marker_read), &c.jti, answer.clone());
        }
        Ok(answer)
    }
}

/// The revision of a read of one key; 0 when it is absent.
fn revision_of(read: &[(String, Stored)]) -> i64 {
    read.first().map_or(0, |(_, s)| s.mod_revision)
}

/// `user`'s grants among role assignments.
fn grants_of(user: &str, assignments: Vec<(String, Stored)>) -> Vec<Grant> {
    assignments
        .into_iter()
        .filter(|(_, s)| s.value.pointer("/spec/user").and_then(Value::as_str) == Some(user))
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
        let (tok, claims) = id.issue("alice", 60);
        assert_eq!(id.verify(&tok), Some(claims));
        let (old, _) = id.issue("alice", -1);
        assert_eq!(id.verify(&old), None);
        let forged = tok.replace("st1.", "st1.x");
        assert_eq!(id.verify(&forged), None);
        let other = Signer {
            key: hmac::Key::new(hmac::HMAC_SHA256, b"other"),
        };
        assert_eq!(other.verify(&tok), None);
    }
}
