//! Identity at admission: what belongs to a User is tied to its uid or removed with it. A
//! User's password goes in the transaction that deletes the User; a RoleAssignment is owned
//! (`ownerReferences`) by the User it names, as that User is when the assignment is written,
//! so the garbage collector removes it with its User and a new User of the same name never
//! inherits it.

use futures::future::BoxFuture;
use serde_json::{Value, json};

use crate::admission::{Admission, Change, Ctx, Subject, Written};
use crate::base::error::{ApiError, ApiResult, Cause};
use crate::storage::keys;
use crate::storage::store::Write;

const GROUP: &str = "identity.stratus.dev";
const RETRIES: usize = 16;

/// Admission of Users: registered for `identity.stratus.dev` Users.
#[derive(Debug)]
pub struct Users;

impl Admission for Users {
    /// The user's password record.
    fn attached_keys(&self, prefix: &str, obj: &Value) -> Vec<String> {
        crate::base::meta::meta_str(obj, "name")
            .map(|name| vec![keys::password(prefix, name)])
            .unwrap_or_default()
    }
}

/// Admission of RoleAssignments: registered for `identity.stratus.dev` RoleAssignments.
#[derive(Debug)]
pub struct Assignments;

impl Admission for Assignments {
    /// Writes the assignment owned by the User it names, atomically with reading that User's
    /// uid, and answers it as stored (with that owner reference); an assignment naming no
    /// existing User is refused.
    fn write<'a>(
        &'a self,
        ctx: Ctx<'a>,
        s: Subject<'a>,
        w: Change<'a>,
    ) -> Option<BoxFuture<'a, ApiResult<Written>>> {
        Some(Box::pin(write_owned(ctx, s, w)))
    }
}

/// `obj` with one owner reference to the User `user` of `uid`, in place of any other
/// reference to a User.
pub fn owned(obj: &Value, user: &str, uid: &str) -> Value {
    let mut obj = obj.clone();
    let mut refs: Vec<Value> = obj
        .pointer("/metadata/ownerReferences")
        .and_then(Value::as_array)
        .map(|r| {
            r.iter()
                .filter(|r| {
                    !(r.get("kind").and_then(Value::as_str) == Some("User")
                        && r.get("apiVersion").and_then(Value::as_str)
                            == Some("identity.stratus.dev/v1"))
                })
                .cloned()
                .collect()
        })
        .unwrap_or_default();
    refs.push(json!({
        "apiVersion": "identity.stratus.dev/v1",
        "kind": "User",
        "name": user,
        "uid": uid,
    }));
    if let Some(m) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
        m.insert("ownerReferences".into(), Value::Array(refs));
    }
    obj
}

/// Writes the assignment with its owner reference, and answers the object stored.
async fn write_owned(ctx: Ctx<'_>, s: Subject<'_>, w: Change<'_>) -> ApiResult<Written> {
    let Change {
        key,
        old,
        new,
        parent,
    } = w;
    let name = crate::base::meta::meta_str(new, "name").unwrap_or_default();
    let user = new
        .pointer("/spec/user")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let user_key = keys::object(ctx.prefix, GROUP, "users", None, user);
    let expected = old.map(|(_, rev)| rev);
    for _ in 0..RETRIES {
        let Some(u) = ctx.store.get(&user_key).await.map_err(ApiError::from)? else {
            return Err(ApiError::invalid(
                s.kind,
                s.group,
                s.plural,
                name,
                vec![Cause {
                    reason: "FieldValueNotFound".into(),
                    message: format!("Not found: User \"{user}\" does not exist"),
                    field: "spec.user".into(),
                }],
            ));
        };
        let uid = crate::base::meta::meta_str(&u.value, "uid").unwrap_or_default();
        let obj = owned(new, user, uid);
        match ctx
            .store
            .write_guarded(key, &obj, expected, &[(&user_key, u.mod_revision)], parent)
            .await
            .map_err(ApiError::from)?
        {
            Write::Done(rev) => {
                return Ok(Written {
                    write: Write::Done(rev),
                    stored: Some(obj),
                });
            }
            // Only the guard failed: the User changed since it was read; read it again.
            Write::Conflict(rev) if rev == expected.unwrap_or(0) => {
                if super::parent_changed(ctx, parent).await? {
                    return Ok(Write::Conflict(0).into());
                }
            }
            conflict => return Ok(conflict.into()),
        }
    }
    Err(s.conflict())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_assignment_is_owned_by_the_user_as_it_is_now() {
        let forged = json!({"metadata": {"name": "a", "ownerReferences": [
            {"apiVersion": "identity.stratus.dev/v1", "kind": "User", "name": "alice", "uid": "old"},
            {"apiVersion": "v1", "kind": "ConfigMap", "name": "c", "uid": "c1"},
        ]}});
        let o = owned(&forged, "alice", "new");
        let refs = o["metadata"]["ownerReferences"]
            .as_array()
            .expect("references");
        assert_eq!(refs.len(), 2);
        assert_eq!(refs[0]["kind"], "ConfigMap");
        assert_eq!(refs[1]["uid"], "new");
        assert_eq!(
            Users.attached_keys("/p", &json!({"metadata": {"name": "alice"}})),
            vec!["/p/_system/passwords/alice".to_string()]
        );
    }
}
