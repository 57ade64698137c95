//! `authentication.k8s.io/v1` SelfSubjectReview: who the caller is, as `kubectl auth whoami`
//! asks it.
//!
//! The answer holds only what the request's own credentials already say: the user name, the
//! token's uid, and in `extra` the projects the caller has a role in (its own role
//! assignments, which the API server loaded to authorize the request anyway). That is how a
//! member learns which projects to offer in a project switcher without being allowed to LIST
//! role assignments: a LIST narrowed to "the ones naming me" would rest on a selector the
//! caller could leave out, and would tell of projects by their assignments' names; this answer
//! cannot name a project the caller is not in.

use std::collections::BTreeSet;

use axum::http::StatusCode;
use axum::response::Response;
use serde_json::{Value, json};

use crate::base::error::{ApiError, ApiResult};
use crate::http::response::json_response;
use crate::policy::authn::Caller;

/// The `extra` key listing the projects the caller has a role in.
pub const PROJECTS: &str = "projects.stratus.dev/member-of";
/// The `extra` key listing the roles the caller holds in every project.
pub const CLUSTER_ROLES: &str = "projects.stratus.dev/cluster-roles";

/// Answers a SelfSubjectReview POST with the caller's user info (201, as kube-apiserver).
pub fn review(bytes: &[u8], caller: &Caller) -> ApiResult<Response> {
    // The review carries no question: a JSON body must still be a SelfSubjectReview, a
    // protobuf one (kubectl may send it so) is not read.
    if !crate::http::protobuf::is_protobuf(bytes) && !bytes.iter().all(u8::is_ascii_whitespace) {
        let body: Value = crate::base::body::decode(bytes, false)?.value;
        let kind = body.get("kind").and_then(Value::as_str);
        if !body.is_object() || kind.is_some_and(|k| k != "SelfSubjectReview") {
            return Err(ApiError::bad_request(
                "kind: the request body must be a SelfSubjectReview object",
            ));
        }
    }
    Ok(json_response(StatusCode::CREATED, &answer(caller), &[]))
}

/// The SelfSubjectReview naming `caller`.
fn answer(caller: &Caller) -> Value {
    let mut info = json!({
        "username": caller.user,
        "groups": ["system:authenticated"],
    });
    if let Some(claims) = caller.claims.as_ref().filter(|c| !c.uid.is_empty()) {
        info["uid"] = json!(claims.uid);
    }
    let projects: BTreeSet<&str> = caller
        .grants
        .iter()
        .filter_map(|g| g.namespace.as_deref())
        .collect();
    let cluster: BTreeSet<String> = caller
        .grants
        .iter()
        .filter(|g| g.namespace.is_none())
        .filter_map(|g| serde_json::to_value(g.role).ok())
        .filter_map(|r| r.as_str().map(str::to_string))
        .collect();
    let mut extra = serde_json::Map::new();
    if !projects.is_empty() {
        extra.insert(PROJECTS.into(), json!(projects));
    }
    if !cluster.is_empty() {
        extra.insert(CLUSTER_ROLES.into(), json!(cluster));
    }
    if !extra.is_empty() {
        info["extra"] = Value::Object(extra);
    }
    json!({
        "kind": "SelfSubjectReview",
        "apiVersion": "authentication.k8s.io/v1",
        "metadata": {"creationTimestamp": null},
        "status": {"userInfo": info},
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::roles::Grant;
    use stratus_api_types::identity::Role;

    fn caller(grants: Vec<Grant>) -> Caller {
        Caller {
            user: "dana".into(),
            user_agent: String::new(),
            system: false,
            grants,
            claims: None,
        }
    }

    #[test]
    fn names_the_caller_and_only_its_own_projects() {
        let a = answer(&caller(vec![
            Grant {
                namespace: Some("b".into()),
                role: Role::Reader,
            },
            Grant {
                namespace: Some("a".into()),
                role: Role::Member,
            },
            Grant {
                namespace: Some("a".into()),
                role: Role::Reader,
            },
        ]));
        assert_eq!(a["status"]["userInfo"]["username"], "dana");
        assert_eq!(
            a["status"]["userInfo"]["extra"][PROJECTS],
            json!(["a", "b"])
        );
        assert_eq!(a["status"]["userInfo"]["extra"].get(CLUSTER_ROLES), None);
    }

    #[test]
    fn a_cluster_wide_role_is_a_role_not_a_project() {
        let a = answer(&caller(vec![Grant {
            namespace: None,
            role: Role::Admin,
        }]));
        assert_eq!(
            a["status"]["userInfo"]["extra"][CLUSTER_ROLES],
            json!(["admin"])
        );
        assert_eq!(a["status"]["userInfo"]["extra"].get(PROJECTS), None);
        assert_eq!(
            answer(&caller(vec![]))["status"]["userInfo"].get("extra"),
            None
        );
    }

    #[test]
    fn a_body_of_another_kind_is_refused() {
        let e = review(br#"{"kind":"SelfSubjectAccessReview"}"#, &caller(vec![]))
            .expect_err("another kind is refused");
        assert_eq!(e.code, 400);
        assert!(e.message.contains("kind"), "{}", e.message);
        assert!(review(b"", &caller(vec![])).is_ok());
        assert!(
            review(
                br#"{"kind":"SelfSubjectReview","apiVersion":"authentication.k8s.io/v1"}"#,
                &caller(vec![])
            )
            .is_ok()
        );
    }
}
