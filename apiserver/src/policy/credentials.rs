//! S3 credentials are their user's: a user makes, reads and deletes only their own (a
//! project's admins and cluster admins see every one in their reach); service identities make
//! no API request at all.

use serde_json::Value;
use stratus_api_types::identity::Role;

use crate::base::error::{ApiError, ApiResult};
use crate::policy::authn::Caller;
use crate::policy::request::RequestInfo;
use crate::resource::review::Review;
use crate::resource::verbs::{Api, Params};
use crate::storage::store::Stored;

/// The group and plural of S3 credentials.
pub const GROUP: &str = "identity.stratus.dev";
/// The plural of S3 credentials.
pub const PLURAL: &str = "s3credentials";

/// Whether the caller sees every credential of `namespace`: a cluster admin or an admin of
/// that project.
fn sees_all(caller: &Caller, namespace: &str) -> bool {
    caller.cluster_admin()
        || caller
            .grants
            .iter()
            .any(|g| g.role == Role::Admin && g.namespace.as_deref() == Some(namespace))
}

/// Whether a field selector (`a=b,c!=d`) requires `spec.user` to be `user`.
fn selects_user(selector: &str, user: &str) -> bool {
    selector.split(',').any(|part| {
        part.split_once("==")
            .or_else(|| part.split_once('='))
            .filter(|(k, _)| !k.ends_with('!'))
            .is_some_and(|(k, v)| k.trim() == "spec.user" && v.trim() == user)
    })
}

/// A user's read of S3 credentials reaches only their own: a list or watch must select
/// `spec.user=<self>` (kubectl's `--field-selector`), a get is of a credential whose
/// `spec.user` is the caller (the object read to decide, and its key, are answered for the
/// get to reuse). Project admins and cluster admins read every credential in their reach.
///
/// # Errors
/// 403 naming what to ask instead; what reading the object fails with.
pub async fn restrict_read(
    api: &Api,
    info: &RequestInfo,
    params: &Params,
    caller: &Caller,
) -> ApiResult<Option<(String, Stored)>> {
    if info.group.as_deref() != Some(GROUP)
        || info.resource != PLURAL
        || sees_all(caller, &info.namespace)
    {
        return Ok(None);
    }
    match info.verb.as_str() {
        "list" | "watch" => {
            if selects_user(
                params.get("fieldSelector").unwrap_or_default(),
                &caller.user,
            ) {
                return Ok(None);
            }
            Err(ApiError::forbidden(format!(
                "User \"{0}\" cannot {1} every S3 credential of the namespace \"{2}\": select your own with the field selector spec.user={0}",
                caller.user, info.verb, info.namespace
            )))
        }
        "get" => {
            let key = crate::storage::keys::object(
                &api.prefix,
                GROUP,
                PLURAL,
                Some(&info.namespace),
                &info.name,
            );
            match api.store.get(&key).await.map_err(ApiError::from)? {
                Some(s) if owner(&s.value) == Some(caller.user.as_str()) => Ok(Some((key, s))),
                // Absent: answered 404 as for any object.
                None => Ok(None),
                Some(_) => Err(not_yours(caller)),
            }
        }
        _ => Ok(None),
    }
}

fn owner(v: &Value) -> Option<&str> {
    v.pointer("/spec/user").and_then(Value::as_str)
}

fn not_yours(caller: &Caller) -> ApiError {
    ApiError::forbidden(format!(
        "User \"{}\" cannot reach another user's S3 credential",
        caller.user
    ))
}

/// A user's write of an S3 credential, on its final objects: users make, change and delete
/// only their own (`spec.user` before and after the write is the caller). Cluster admins are
/// decided before this (they may make anyone's).
///
/// # Errors
/// 403 naming why.
pub fn review(caller: &Caller, r: &Review<'_>) -> ApiResult<()> {
    if r.old
        .into_iter()
        .chain(r.new)
        .all(|v| owner(v) == Some(caller.user.as_str()))
    {
        Ok(())
    } else {
        Err(not_yours(caller))
    }
}

/// A service identity's API request: refused, whatever it is.
pub fn service_refused(caller: &Caller) -> ApiError {
    ApiError::forbidden(format!(
        "User \"{}\" is a service identity: it validates tokens at /identity/v3 and makes no API request",
        caller.user
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_selector_of_ones_own_user_lists() {
        assert!(selects_user("spec.user=alice", "alice"));
        assert!(selects_user("metadata.name=k, spec.user==alice", "alice"));
        assert!(!selects_user("spec.user!=alice", "alice"));
        assert!(!selects_user("spec.user!=bob", "alice"));
        assert!(!selects_user("spec.user=bob", "alice"));
        assert!(!selects_user("spec.user=alice2", "alice"));
        assert!(!selects_user("", "alice"));
        assert!(!selects_user("spec.userx=alice", "alice"));
    }
}
