//! Logging in (`POST .../tokens`) and changing passwords (`PUT .../users/{name}/password`):
//! throttled per user and per source address over every API server replica
//! ([`crate::policy::logins`]), hashed off the async workers, audited.

use std::net::IpAddr;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use crate::base::error::{ApiError, ApiResult, Cause};
use crate::http::response::json_response;
use crate::http::server::AppState;
use crate::policy::authn::Caller;
use crate::policy::identity::{Claims, Refusal, Scope};
use crate::resource::outcome::Outcome;

/// How a login ended, for the audit log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Attempt {
    /// The user name the client gave ("" when the body named none).
    pub user: String,
    /// `success`, `failure`, `locked`, `throttled`, `invalid` or `error`.
    pub result: &'static str,
}

/// `POST .../tokens`: a token for a user and password (no other authentication needed). An
/// unknown user, a wrong password, a disabled user and a locked-out user get the same 401; a
/// locked-out user's password is not even checked. A source address that failed too often
/// lately gets 429 with `Retry-After`.
pub(crate) async fn issue_token(
    state: &AppState,
    bytes: &[u8],
    source: Option<IpAddr>,
) -> (Response, Attempt) {
    let mut attempt = Attempt {
        user: String::new(),
        result: "invalid",
    };
    let answer = login(state, bytes, source, &mut attempt).await;
    (answer.unwrap_or_else(IntoResponse::into_response), attempt)
}

async fn login(
    state: &AppState,
    bytes: &[u8],
    source: Option<IpAddr>,
    attempt: &mut Attempt,
) -> ApiResult<Response> {
    let req = crate::base::body::decode(bytes, false)?.value;
    let field = |k: &str| req.get(k).and_then(Value::as_str).unwrap_or_default();
    let (user, password) = (field("user"), field("password"));
    attempt.user = user.to_string();
    let ttl = req
        .get("expirationSeconds")
        .and_then(Value::as_i64)
        .unwrap_or(3600);
    if !(1..=86_400).contains(&ttl) {
        return Err(ApiError::bad_request(
            "expirationSeconds: must be between 1 and 86400",
        ));
    }
    let (token, claims) = password_login(
        state,
        user,
        password,
        ttl,
        async || Ok(None),
        source,
        attempt,
    )
    .await?;
    let expires = jiff::Timestamp::from_second(claims.exp)
        .map(|t| t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string())
        .unwrap_or_default();
    Ok(json_response(
        StatusCode::CREATED,
        &json!({
            "apiVersion": "identity.stratus.dev/v1", "kind": "Token", "user": user, "token": token, "expiresAt": expires,
        }),
        &[],
    ))
}

/// A token for `user` if `password` is theirs, valid for `ttl` seconds (scoped to what `scope`
/// resolves to, only once the password is right: the user must hold a role there), throttled
/// and locked out as every login is.
/// An unknown user, a wrong password, a disabled user, a locked-out user and a scope the user
/// has no role in get the same 401; `attempt.result` says which for the audit log.
///
/// # Errors
/// 401 as above; 429 for a throttled source or a full hashing queue; 503 without etcd.
pub(crate) async fn password_login(
    state: &AppState,
    user: &str,
    password: &str,
    ttl: i64,
    scope: impl AsyncFnOnce() -> ApiResult<Option<Scope>>,
    source: Option<IpAddr>,
    attempt: &mut Attempt,
) -> ApiResult<(String, Claims)> {
    let id = &state.identity;
    let unix = jiff::Timestamp::now().as_second();
    // Users, names that are no User and source addresses, over every replica.
    let shared = id
        .logins
        .check(Some(user), source, unix)
        .await
        .map_err(ApiError::from)?;
    match shared.refusal {
        None => {}
        Some(Refusal::Locked) => {
            attempt.result = "locked";
            return Err(ApiError::unauthorized());
        }
        Some(Refusal::Throttled(after)) => {
            attempt.result = "throttled";
            return Err(ApiError::too_many_requests(
                "too many failed logins from this address; retry later",
                after,
            ));
        }
    }
    attempt.result = "error";
    let (verified, known) = id.verify_password(user, password, source).await?;
    let Some(verified) = verified else {
        if known {
            id.logins.failed(Some(user), source, unix).await;
        } else {
            id.logins.failed_made_up(user, source, unix).await;
        }
        attempt.result = "failure";
        return Err(ApiError::unauthorized());
    };
    // The scope is resolved only for the right password: a project that is not there is
    // answered as a wrong password is (401), after the same throttle.
    attempt.result = "failure";
    let scope = scope().await?;
    let (token, claims) = id.signer.issue_scoped(user, &verified, ttl, scope);
    // A disabled user: the right password, but no token; nor for a project it has no role in.
    let grants = id.token_grants(&claims).await?;
    let granted = match (grants, &claims.project) {
        (Some(g), Some(scope)) => id.scoped(g, scope).await?.is_some(),
        (g, None) => g.is_some(),
        (None, Some(_)) => false,
    };
    if !granted {
        attempt.result = "failure";
        return Err(ApiError::unauthorized());
    }
    if shared.user_failures > 0
        && let Err(e) = id.logins.succeeded(user, source).await
    {
        tracing::warn!(error = %e, "failed logins: forget a user's count after its login");
    }
    attempt.result = "success";
    Ok((token, claims))
}

/// Who may set `name`'s password, and whether they must give the current one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Setter {
    /// Users changing their own password: the current one is required, and their other
    /// tokens are revoked.
    Own,
    /// A cluster admin (or a system identity other than a node) resetting it: every token of
    /// the user is revoked.
    Admin,
}

fn setter(caller: &Caller, name: &str) -> ApiResult<Setter> {
    if caller.system && caller.user.starts_with("system:node:") {
        return Err(ApiError::forbidden(format!(
            "User \"{}\" cannot set passwords: nodes manage no users",
            caller.user
        )));
    }
    if !caller.system && caller.user == name {
        Ok(Setter::Own)
    } else if caller.cluster_admin() {
        Ok(Setter::Admin)
    } else {
        Err(ApiError::forbidden(format!(
            "User \"{}\" cannot set the password of another user",
            caller.user
        )))
    }
}

fn invalid(name: &str, field: &str, message: &str) -> ApiError {
    ApiError::invalid(
        "User",
        "identity.stratus.dev",
        "users",
        name,
        vec![Cause::invalid(field, message)],
    )
}

/// `PUT .../users/{name}/password` with `{"password": NEW, "currentPassword": OLD}`: users
/// change their own (the current password required; their other tokens stop working); cluster
/// admins reset anyone's (every token of that user stops working). Nodes set none.
pub(crate) async fn change_password(
    state: &AppState,
    name: &str,
    bytes: &[u8],
    caller: &Caller,
) -> ApiResult<Response> {
    let who = setter(caller, name)?;
    let body = crate::base::body::decode(bytes, false)?.value;
    let password = body
        .get("password")
        .and_then(Value::as_str)
        .ok_or_else(|| invalid(name, "password", "Required value"))?;
    let id = &state.identity;
    let keep = match who {
        Setter::Admin => None,
        Setter::Own => {
            let current = body
                .get("currentPassword")
                .and_then(Value::as_str)
                .ok_or_else(|| {
                    invalid(
                        name,
                        "currentPassword",
                        "Required value: changing one's own password needs the current one",
                    )
                })?;
            let wrong = || {
                invalid(
                    name,
                    "currentPassword",
                    "Forbidden: not the current password",
                )
            };
            if !id.check_current_password(name, current).await? {
                return Err(wrong());
            }
            caller.claims.as_ref().map(|c| c.jti.as_str())
        }
    };
    id.set_password(name, password, keep).await?;
    Ok(Outcome::success().into_response())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::roles::Grant;
    use stratus_api_types::identity::Role;

    fn caller(user: &str, system: bool, grants: Vec<Grant>) -> Caller {
        Caller {
            user: user.into(),
            user_agent: String::new(),
            system,
            grants,
            claims: None,
        }
    }

    #[test]
    fn only_cluster_admins_set_others_passwords_and_nodes_none() {
        let admin = vec![Grant {
            namespace: None,
            role: Role::Admin,
        }];
        let project_admin = vec![Grant {
            namespace: Some("p".into()),
            role: Role::Admin,
        }];
        assert_eq!(
            setter(&caller("alice", false, vec![]), "alice").ok(),
            Some(Setter::Own)
        );
        assert_eq!(
            setter(&caller("root", false, admin.clone()), "alice").ok(),
            Some(Setter::Admin)
        );
        assert_eq!(
            setter(&caller("root", false, admin), "root").ok(),
            Some(Setter::Own),
            "an admin changing their own password gives the current one"
        );
        assert_eq!(
            setter(&caller("system:admin", true, vec![]), "alice").ok(),
            Some(Setter::Admin)
        );
        for c in [
            caller("bob", false, project_admin),
            caller("system:node:n1", true, vec![]),
        ] {
            assert_eq!(
                setter(&c, "admin").map_err(|e| e.code).err(),
                Some(403),
                "{}",
                c.user
            );
        }
        assert_eq!(
            setter(&caller("system:node:n1", true, vec![]), "system:node:n1")
                .map_err(|e| e.code)
                .err(),
            Some(403)
        );
    }
}
