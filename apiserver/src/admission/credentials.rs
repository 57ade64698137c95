//! S3 credentials at admission: the access key id is made by the server and indexed, and the
//! secret derived, in the create's transaction.
//!
//! # Guarantees
//! - The secret is never stored: it is `HMAC-SHA256(credential key, access key id, uid)`, the
//!   credential key living under `{prefix}/_system/` beside the token signing key, which no API
//!   call reads. S3 signatures are HMACs keyed by the secret, so whoever checks one needs the
//!   secret itself (a hash would not do); deriving it keeps nothing per credential to leak and
//!   gives a re-created credential (new uid) a new secret. It is in the create's answer only.
//! - The object, its index key (`{prefix}/_system/s3credentials/{access key id}`, naming the
//!   object, its uid and its Project's uid) and the check that its User still has the uid it
//!   is owned by are one transaction; the index key goes in the transaction that deletes the
//!   object. A key signs only while that very Project lives (`s3tokens` compares its uid and
//!   refuses a Project being deleted), so an index record left by a Project removed before
//!   its namespace was emptied gives nothing to a new Project of the same name.
//! - `spec.user` and `status` never change after the create.

use base64::Engine;
use futures::future::BoxFuture;
use ring::hmac;
use serde_json::{Value, json};

use crate::admission::{Admission, Change, Ctx, Subject, Written};
use crate::base::error::{ApiError, ApiResult, Cause};
use crate::storage::keys;
use crate::storage::store::{Guard, Store, Write};

const GROUP: &str = "identity.stratus.dev";
const RETRIES: usize = 16;
/// The longest access key id looked up (ours are 32 hexadecimal digits).
pub const MAX_ACCESS_KEY: usize = 64;

/// The index record's field naming the uid of the credential's Project.
pub const PROJECT_UID: &str = "projectUid";

/// What an unknown access key's signature is checked against in place of a credential's uid
/// (no uid is empty), so that it costs what a known key's does.
pub const NO_CREDENTIAL: &str = "";

/// Admission of S3Credentials: registered for `identity.stratus.dev` S3Credentials.
#[derive(Debug)]
pub struct S3Credentials;

/// The index key of an access key id.
pub fn index_key(prefix: &str, access: &str) -> String {
    format!("{prefix}/_system/s3credentials/{access}")
}

/// The key every API server replica derives secrets with, made on first use.
///
/// # Errors
/// 503 when etcd is unreachable.
pub async fn derivation_key(store: &Store, prefix: &str) -> ApiResult<hmac::Key> {
    let key = format!("{prefix}/_system/s3-credential-key");
    let stored = match store.get(&key).await.map_err(ApiError::from)? {
        Some(s) => s.value,
        None => {
            let mut bytes = [0u8; 32];
            ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
                .map_err(|_| ApiError::internal("no randomness for the S3 credential key"))?;
            let fresh = Value::String(base64::engine::general_purpose::STANDARD.encode(bytes));
            store
                .first_written(&key, &fresh)
                .await
                .map_err(ApiError::from)?
        }
    };
    let material = stored
        .as_str()
        .and_then(|k| base64::engine::general_purpose::STANDARD.decode(k).ok())
        .ok_or_else(|| ApiError::internal("the stored S3 credential key is unreadable"))?;
    Ok(hmac::Key::new(hmac::HMAC_SHA256, &material))
}

/// The secret of the credential of access key id `access` and uid `uid`.
pub fn secret(key: &hmac::Key, access: &str, uid: &str) -> String {
    let tag = hmac::sign(key, format!("s3-secret\n{access}\n{uid}").as_bytes());
    hex(&tag.as_ref()[..20])
}

/// Lower-case hexadecimal.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// The access key id of a stored credential.
pub fn access_key(obj: &Value) -> Option<&str> {
    obj.pointer("/status/accessKeyId").and_then(Value::as_str)
}

impl Admission for S3Credentials {
    /// The index key of its access key id.
    fn attached_keys(&self, prefix: &str, obj: &Value) -> Vec<String> {
        access_key(obj)
            .map(|a| vec![index_key(prefix, a)])
            .unwrap_or_default()
    }

    /// Status is the server's: nobody writes it.
    fn check_status_write(&self, s: &Subject<'_>, old: &Value, new: &Value) -> ApiResult<()> {
        if old.get("status") == new.get("status") {
            return Ok(());
        }
        Err(invalid(
            s,
            new,
            "status",
            "Forbidden: made by the server at creation",
        ))
    }

    fn write<'a>(
        &'a self,
        ctx: Ctx<'a>,
        s: Subject<'a>,
        w: Change<'a>,
    ) -> Option<BoxFuture<'a, ApiResult<Written>>> {
        Some(Box::pin(write(ctx, s, w)))
    }
}

fn invalid(s: &Subject<'_>, obj: &Value, field: &str, message: &str) -> ApiError {
    ApiError::invalid(
        s.kind,
        s.group,
        s.plural,
        crate::base::meta::meta_str(obj, "name").unwrap_or_default(),
        vec![Cause::invalid(field, message)],
    )
}

fn user_of(obj: &Value) -> &str {
    obj.pointer("/spec/user")
        .and_then(Value::as_str)
        .unwrap_or_default()
}

async fn write(ctx: Ctx<'_>, s: Subject<'_>, w: Change<'_>) -> ApiResult<Written> {
    let Change {
        key,
        old,
        new,
        parent,
    } = w;
    if let Some((old, rev)) = old {
        // An update: the user and what the server made stay as they were.
        if user_of(old) != user_of(new) {
            return Err(invalid(
                &s,
                new,
                "spec.user",
                "Invalid value: field is immutable",
            ));
        }
        let mut obj = new.clone();
        match (obj.as_object_mut(), old.get("status")) {
            (Some(o), Some(status)) => o.insert("status".into(), status.clone()),
            (Some(o), None) => o.remove("status"),
            (None, _) => None,
        };
        let write = ctx
            .store
            .write_guarded(key, &obj, Some(rev), &[], None)
            .await
            .map_err(ApiError::from)?;
        return Ok(Written {
            write,
            stored: Some(obj),
        });
    }
    let user = user_of(new);
    let uid = crate::base::meta::meta_str(new, "uid").unwrap_or_default();
    let user_key = keys::object(ctx.prefix, GROUP, "users", None, user);
    let derive = derivation_key(ctx.store, ctx.prefix).await?;
    for _ in 0..RETRIES {
        let Some(u) = ctx.store.get(&user_key).await.map_err(ApiError::from)? else {
            return Err(ApiError::invalid(
                s.kind,
                s.group,
                s.plural,
                crate::base::meta::meta_str(new, "name").unwrap_or_default(),
                vec![Cause {
                    reason: "FieldValueNotFound".into(),
                    message: format!("Not found: User \"{user}\" does not exist"),
                    field: "spec.user".into(),
                }],
            ));
        };
        let user_uid = crate::base::meta::meta_str(&u.value, "uid").unwrap_or_default();
        // The Project at the revision the create holds it at (read again if it changed).
        let project_uid = match parent {
            Some((p, rev)) => match ctx.store.get(p).await.map_err(ApiError::from)? {
                Some(found) if found.mod_revision == rev => {
                    crate::base::meta::meta_str(&found.value, "uid").map(String::from)
                }
                _ => return Ok(Write::Conflict(0).into()),
            },
            None => None,
        };
        let access = uuid::Uuid::new_v4().simple().to_string();
        let mut obj = crate::admission::identity::owned(new, user, user_uid);
        obj["status"] = json!({ "accessKeyId": access });
        let index = index_key(ctx.prefix, &access);
        let record = json!({
            "namespace": s.namespace.unwrap_or_default(),
            "name": crate::base::meta::meta_str(new, "name").unwrap_or_default(),
            "uid": uid,
            PROJECT_UID: project_uid,
        });
        let mut guards = vec![
            Guard::Absent(key),
            Guard::Absent(&index),
            Guard::Revision(&user_key, u.mod_revision),
        ];
        if let Some((p, rev)) = parent {
            guards.push(Guard::Revision(p, rev));
        }
        if let Some(rev) = ctx
            .store
            .write_many(&guards, &[(key, &obj), (&index, &record)], &[])
            .await
            .map_err(ApiError::from)?
        {
            // The secret is in this answer only.
            obj["status"]["secretAccessKey"] = Value::String(secret(&derive, &access, uid));
            return Ok(Written {
                write: Write::Done(rev),
                stored: Some(obj),
            });
        }
        if let Some(existing) = ctx.store.get(key).await.map_err(ApiError::from)? {
            return Ok(Write::Conflict(existing.mod_revision).into());
        }
        if crate::admission::parent_changed(ctx, parent).await? {
            return Ok(Write::Conflict(0).into());
        }
        // The user changed meanwhile: read it again.
    }
    Err(ApiError::conflict(
        s.group,
        s.plural,
        s.name,
        "the user kept changing while the credential was made; retry",
    ))
}

/// The index record's field saying its Project's uid was bound by [`bind_unbound`].
pub const BOUND_BY: &str = "projectUidBoundBy";

/// What [`bind_unbound`] did with the index records lacking their Project's uid.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Bound {
    /// `namespace/name` of the credentials bound to their namespace's Project.
    pub bound: Vec<String>,
    /// `namespace/name` of those left unbound (refused as before), with why.
    pub left: Vec<(String, &'static str)>,
}

/// Binds each S3 credential made before index records named their Project's uid (and so
/// refused by `s3tokens` since) to the uid of the Project of its namespace, once: only when
/// that Project existed before the credential (its key was created at an earlier etcd
/// revision than the index record, which is written with the credential and never changed
/// but by this) and is not being deleted, and the credential is still the one the record
/// names. Each record bound says so (`projectUidBoundBy: migration`); one a Project made
/// after the key could have inherited stays unbound. Each write is guarded by the revisions
/// read, so a record or Project that changes meanwhile is left for the next start.
///
/// # Errors
/// Backend failures.
pub async fn bind_unbound(
    store: &Store,
    prefix: &str,
) -> Result<Bound, crate::storage::store::StoreError> {
    let mut out = Bound::default();
    let records = store
        .list(&format!("{prefix}/_system/s3credentials/"), None, 0, 0)
        .await?;
    for (index, record) in records.items {
        let field = |f: &str| {
            record
                .value
                .get(f)
                .and_then(Value::as_str)
                .unwrap_or_default()
        };
        if !field(PROJECT_UID).is_empty() {
            continue;
        }
        let (namespace, name, uid) = (field("namespace"), field("name"), field("uid"));
        let who = format!("{namespace}/{name}");
        let credential = keys::object(prefix, GROUP, "s3credentials", Some(namespace), name);
        let same = store.get(&credential).await?.is_some_and(|c| {
            !uid.is_empty() && crate::base::meta::meta_str(&c.value, "uid") == Some(uid)
        });
        if !same {
            out.left
                .push((who, "its credential is gone or was made again"));
            continue;
        }
        let project_key = keys::object(prefix, GROUP, "projects", None, namespace);
        let Some(project) = store.get(&project_key).await? else {
            out.left.push((who, "its namespace's Project is gone"));
            continue;
        };
        let project_uid = crate::base::meta::meta_str(&project.value, "uid").unwrap_or_default();
        if project
            .value
            .pointer("/metadata/deletionTimestamp")
            .is_some()
            || project_uid.is_empty()
        {
            out.left
                .push((who, "its namespace's Project is being deleted"));
            continue;
        }
        if store
            .created_after(&project_key, record.mod_revision)
            .await?
        {
            out.left
                .push((who, "its namespace's Project was made after it"));
            continue;
        }
        let mut bound = record.value.clone();
        bound[PROJECT_UID] = Value::String(project_uid.to_owned());
        bound[BOUND_BY] = Value::String("migration".into());
        let guards = [
            Guard::Revision(&index, record.mod_revision),
            Guard::Revision(&project_key, project.mod_revision),
        ];
        match store.write_many(&guards, &[(&index, &bound)], &[]).await? {
            Some(_) => out.bound.push(who),
            None => out.left.push((who, "it or its Project changed meanwhile")),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PREFIX: &str = "/t";

    fn meta(name: &str, uid: &str) -> Value {
        json!({"metadata": {"name": name, "uid": uid}})
    }

    /// A credential `name` (uid `uid`) in `ns` and its index record of the old form, with no
    /// Project uid; its access key id.
    async fn old_credential(store: &Store, ns: &str, name: &str, uid: &str) -> String {
        let access = format!("access-{name}");
        let key = keys::object(PREFIX, GROUP, "s3credentials", Some(ns), name);
        let record = json!({"namespace": ns, "name": name, "uid": uid, PROJECT_UID: null});
        let written = store
            .write_many(
                &[],
                &[
                    (&key, &meta(name, uid)),
                    (&index_key(PREFIX, &access), &record),
                ],
                &[],
            )
            .await
            .expect("write");
        assert!(written.is_some());
        access
    }

    async fn project(store: &Store, name: &str, uid: &str) {
        let key = keys::object(PREFIX, GROUP, "projects", None, name);
        store.create(&key, &meta(name, uid)).await.expect("project");
    }

    async fn record(store: &Store, access: &str) -> Value {
        store
            .get(&index_key(PREFIX, access))
            .await
            .expect("get")
            .expect("record")
            .value
    }

    #[tokio::test]
    async fn keys_made_before_the_binding_are_bound_to_a_project_older_than_they_are() {
        let store = Store::memory();
        project(&store, "old", "p-old").await;
        let kept = old_credential(&store, "old", "k1", "c1").await;
        // A Project made after its key (the key's Project deleted, a new one of the name
        // made): not bound, as it would inherit the old key.
        let orphan = old_credential(&store, "renamed", "k2", "c2").await;
        project(&store, "renamed", "p-new").await;
        // A record whose credential was made again (another uid): not bound.
        let stale = old_credential(&store, "old", "k3", "c3").await;
        let k3 = keys::object(PREFIX, GROUP, "s3credentials", Some("old"), "k3");
        let rev = store.get(&k3).await.expect("get").expect("k3").mod_revision;
        store
            .write_guarded(&k3, &meta("k3", "c3-again"), Some(rev), &[], None)
            .await
            .expect("rewrite");
        // A key made with its Project's uid stays as it is.
        let current = "access-current";
        let record_now =
            json!({"namespace": "old", "name": "k4", "uid": "c4", PROJECT_UID: "p-old"});
        store
            .create(&index_key(PREFIX, current), &record_now)
            .await
            .expect("record");

        let done = bind_unbound(&store, PREFIX).await.expect("bind");
        assert_eq!(done.bound, ["old/k1"]);
        let left: Vec<&str> = done.left.iter().map(|(w, _)| w.as_str()).collect();
        assert_eq!(left.len(), 2, "{:?}", done.left);
        assert!(left.contains(&"renamed/k2") && left.contains(&"old/k3"));
        let r = record(&store, &kept).await;
        assert_eq!(
            (r[PROJECT_UID].as_str(), r[BOUND_BY].as_str()),
            (Some("p-old"), Some("migration"))
        );
        assert!(record(&store, &orphan).await[PROJECT_UID].is_null());
        assert!(record(&store, &stale).await[PROJECT_UID].is_null());
        assert_eq!(record(&store, current).await, record_now);

        // Once: a second run binds nothing more and changes nothing.
        let again = bind_unbound(&store, PREFIX).await.expect("bind");
        assert!(again.bound.is_empty());
        assert_eq!(record(&store, &kept).await, r);
    }

    #[test]
    fn secrets_differ_per_key_and_credential_and_are_stable() {
        let k = hmac::Key::new(hmac::HMAC_SHA256, b"k");
        let a = secret(&k, "a1", "u1");
        assert_eq!(a.len(), 40);
        assert_eq!(a, secret(&k, "a1", "u1"));
        assert_ne!(a, secret(&k, "a1", "u2"), "a re-created credential");
        assert_ne!(a, secret(&k, "a2", "u1"));
        let other = hmac::Key::new(hmac::HMAC_SHA256, b"other");
        assert_ne!(a, secret(&other, "a1", "u1"));
    }
}
