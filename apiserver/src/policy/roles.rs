//! Roles: what a user's role assignments allow, checked on the typed request before anything
//! is read or written, and on a role assignment's final objects before it is written.

use stratus_api_types::identity::Role;

use serde_json::Value;

use crate::base::error::ApiError;
use crate::policy::authn::Caller;
use crate::policy::request::RequestInfo;
use crate::resource::registry::Registry;
use crate::resource::review::Review;

/// A role a user holds: in one project, or everywhere.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// The project; None for a cluster-wide assignment.
    pub namespace: Option<String>,
    /// What the assignment allows.
    pub role: Role,
}

fn allows(role: Role, verb: &str, group: &str, resource: &str) -> bool {
    let read = matches!(verb, "get" | "list" | "watch");
    match role {
        Role::Admin => true,
        // Members run the project but do not set its quota or hand out roles.
        Role::Member => {
            read || !(group == "identity.stratus.dev"
                && matches!(resource, "quotas" | "roleassignments"))
        }
        Role::Reader => read,
    }
}

/// Cluster-scoped resources every authenticated user may read (the flavor catalogue).
const PUBLIC_READ: [(&str, &str); 1] = [("compute.stratus.dev", "flavors")];

/// Whether `grants` allow the request. Requests that name no resource (discovery, OpenAPI) are
/// open to every authenticated user.
pub fn authorize(
    user: &str,
    grants: &[Grant],
    info: &RequestInfo,
    namespaced: bool,
) -> Result<(), ApiError> {
    let Some(group) = info.group.as_deref() else {
        return Ok(());
    };
    let cluster = |g: &Grant| g.namespace.is_none();
    // Status and placement are the cloud's own (written by its controllers and agents); of the
    // users, only admins may write them.
    let sub_write =
        !info.subresource.is_empty() && !matches!(info.verb.as_str(), "get" | "list" | "watch");
    // Status, placement (binding: co-residency targeting) and quotas are set by the cloud
    // and its operators: of the users, only cluster admins write them, never a project's own
    // admin.
    let operators_only = sub_write
        || (group == "identity.stratus.dev"
            && info.resource == "quotas"
            && !matches!(info.verb.as_str(), "get" | "list" | "watch"));
    let role_allows = |g: &Grant| {
        allows(g.role, &info.verb, group, &info.resource)
            && (!operators_only || (g.role == Role::Admin && cluster(g)))
    };
    let ok = if !namespaced {
        let read = matches!(info.verb.as_str(), "get" | "list" | "watch");
        let self_user = group == "identity.stratus.dev"
            && info.resource == "users"
            && info.name == user
            && info.verb == "get";
        let own_namespace = info.resource == "namespaces"
            && info.verb == "get"
            && grants
                .iter()
                .any(|g| g.namespace.as_deref() == Some(info.name.as_str()));
        self_user
            || own_namespace
            || (read && PUBLIC_READ.contains(&(group, info.resource.as_str())))
            || grants.iter().filter(|g| cluster(g)).any(|g| {
                allows(g.role, &info.verb, group, &info.resource) && (read || g.role == Role::Admin)
            })
    } else if info.namespace.is_empty() {
        grants.iter().filter(|g| cluster(g)).any(role_allows)
    } else {
        grants
            .iter()
            .filter(|g| cluster(g) || g.namespace.as_deref() == Some(info.namespace.as_str()))
            .any(role_allows)
    };
    if ok {
        return Ok(());
    }
    let scope = if info.namespace.is_empty() {
        "at the cluster scope".to_string()
    } else {
        format!("in the namespace \"{}\"", info.namespace)
    };
    Err(ApiError::forbidden(format!(
        "{}{} is forbidden: User \"{user}\" cannot {} resource \"{}\" in API group \"{group}\" {scope}",
        info.resource,
        if group.is_empty() {
            String::new()
        } else {
            format!(".{group}")
        },
        info.verb,
        info.resource,
    )))
}

/// Refuses what a user's roles do not allow, before anything is read or written.
///
/// # Errors
/// 403 naming what the user cannot do.
pub fn authorize_request(
    registry: &Registry,
    info: &RequestInfo,
    caller: &Caller,
) -> Result<(), ApiError> {
    let Some(group) = info.group.as_deref() else {
        return Ok(());
    };
    let namespaced = registry
        .get(group, &info.version, &info.resource)
        .is_some_and(|rt| rt.namespaced);
    authorize(&caller.user, &caller.grants, info, namespaced)
}

/// Decides a user's write on its final objects (old and new): a role assignment that is
/// cluster-wide before or after the write is made, changed or deleted only by a cluster admin,
/// and any other only by an admin of its project (a user grants no role beyond its own).
///
/// # Errors
/// 403 naming why.
pub fn review(caller: &Caller, r: &Review<'_>) -> Result<(), ApiError> {
    if caller.cluster_admin() {
        return Ok(());
    }
    match (r.target.rt.group.as_str(), r.target.rt.plural.as_str()) {
        ("identity.stratus.dev", "roleassignments") => role_assignment(caller, r),
        ("image.stratus.dev", "images") => image(caller, r),
        (super::credentials::GROUP, super::credentials::PLURAL) => {
            super::credentials::review(caller, r)
        }
        _ => Ok(()),
    }
}

/// Role assignments: only cluster admins touch cluster-wide ones; a project's admins grant
/// roles in their project only.
fn role_assignment(caller: &Caller, r: &Review<'_>) -> Result<(), ApiError> {
    let wide = |v: &Value| v.pointer("/spec/clusterWide").and_then(Value::as_bool) == Some(true);
    if r.old.into_iter().chain(r.new).any(wide) {
        return Err(ApiError::forbidden(format!(
            "User \"{}\" cannot grant cluster-wide roles: only a cluster admin makes, changes or deletes a role assignment with spec.clusterWide",
            caller.user
        )));
    }
    let ns = r.target.namespace.as_deref();
    let admin_here = caller
        .grants
        .iter()
        .any(|g| g.role == Role::Admin && g.namespace.as_deref() == ns && ns.is_some());
    if !admin_here {
        return Err(ApiError::forbidden(format!(
            "User \"{}\" cannot grant roles in the namespace \"{}\": only its admins do",
            caller.user,
            ns.unwrap_or_default()
        )));
    }
    Ok(())
}

/// Images: a public image is what every project boots, so only cluster admins publish one,
/// change one or delete one (Glance's `publicize_image`); a project keeps its private ones.
fn image(caller: &Caller, r: &Review<'_>) -> Result<(), ApiError> {
    let public =
        |v: &Value| v.pointer("/spec/visibility").and_then(Value::as_str) == Some("public");
    if r.old.into_iter().chain(r.new).any(public) {
        return Err(ApiError::forbidden(format!(
            "User \"{}\" cannot publish images: only a cluster admin makes, changes or deletes an image with spec.visibility public",
            caller.user
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(verb: &str, group: &str, resource: &str, ns: &str, name: &str) -> RequestInfo {
        RequestInfo {
            verb: verb.into(),
            group: Some(group.into()),
            version: "v1".into(),
            resource: resource.into(),
            subresource: String::new(),
            namespace: ns.into(),
            name: name.into(),
        }
    }

    fn grant(ns: Option<&str>, role: Role) -> Grant {
        Grant {
            namespace: ns.map(String::from),
            role,
        }
    }

    #[test]
    fn only_admins_write_status_and_placement() {
        let sub = |verb: &str, subresource: &str| RequestInfo {
            subresource: subresource.into(),
            ..info(verb, "compute.stratus.dev", "servers", "a", "web")
        };
        let member = vec![grant(Some("a"), Role::Member)];
        let admin = vec![grant(None, Role::Admin)];
        for (verb, subresource) in [
            ("patch", "status"),
            ("update", "status"),
            ("create", "binding"),
        ] {
            assert!(authorize("alice", &member, &sub(verb, subresource), true).is_err());
            assert!(authorize("root", &admin, &sub(verb, subresource), true).is_ok());
        }
        let project_admin = vec![grant(Some("a"), Role::Admin)];
        for (verb, subresource) in [
            ("patch", "status"),
            ("create", "binding"),
            ("delete", "binding"),
        ] {
            assert!(authorize("pat", &project_admin, &sub(verb, subresource), true).is_err());
        }
        let quota = |verb: &str| info(verb, "identity.stratus.dev", "quotas", "a", "q");
        for verb in ["create", "update", "patch", "delete"] {
            assert!(authorize("pat", &project_admin, &quota(verb), true).is_err());
            assert!(authorize("root", &admin, &quota(verb), true).is_ok());
        }
        assert!(authorize("pat", &project_admin, &quota("get"), true).is_ok());
        assert!(authorize("alice", &member, &sub("get", "status"), true).is_ok());
        assert!(authorize("alice", &member, &sub("patch", ""), true).is_ok());
    }

    #[test]
    fn members_work_in_their_project_only() {
        let g = vec![grant(Some("a"), Role::Member)];
        // (verb, group, resource, namespace, name, namespaced, allowed)
        let cases = [
            (
                "create",
                "compute.stratus.dev",
                "servers",
                "a",
                "",
                true,
                true,
            ),
            (
                "get",
                "compute.stratus.dev",
                "servers",
                "b",
                "x",
                true,
                false,
            ),
            // A list across every namespace.
            (
                "list",
                "compute.stratus.dev",
                "servers",
                "",
                "",
                true,
                false,
            ),
            (
                "create",
                "identity.stratus.dev",
                "roleassignments",
                "a",
                "",
                true,
                false,
            ),
            (
                "list",
                "compute.stratus.dev",
                "flavors",
                "",
                "",
                false,
                true,
            ),
            (
                "create",
                "compute.stratus.dev",
                "flavors",
                "",
                "",
                false,
                false,
            ),
            (
                "get",
                "identity.stratus.dev",
                "users",
                "",
                "alice",
                false,
                true,
            ),
            (
                "get",
                "identity.stratus.dev",
                "users",
                "",
                "bob",
                false,
                false,
            ),
        ];
        for (verb, group, resource, ns, name, namespaced, allowed) in cases {
            assert_eq!(
                authorize(
                    "alice",
                    &g,
                    &info(verb, group, resource, ns, name),
                    namespaced
                )
                .is_ok(),
                allowed,
                "{verb} {resource} {ns}/{name}"
            );
        }
    }

    #[test]
    fn readers_read_and_cluster_admins_do_everything() {
        let r = vec![grant(Some("a"), Role::Reader)];
        assert!(
            authorize(
                "rita",
                &r,
                &info("watch", "network.stratus.dev", "networks", "a", ""),
                true
            )
            .is_ok()
        );
        assert!(
            authorize(
                "rita",
                &r,
                &info("delete", "network.stratus.dev", "networks", "a", "n"),
                true
            )
            .is_err()
        );
        let a = vec![grant(None, Role::Admin)];
        assert!(
            authorize(
                "root",
                &a,
                &info("create", "compute.stratus.dev", "flavors", "", ""),
                false
            )
            .is_ok()
        );
        assert!(
            authorize(
                "root",
                &a,
                &info("list", "compute.stratus.dev", "servers", "", ""),
                true
            )
            .is_ok()
        );
        let e = authorize(
            "bob",
            &[],
            &info("get", "compute.stratus.dev", "servers", "a", "secret-name"),
            true,
        )
        .expect_err("denied");
        assert_eq!(e.code, 403);
        assert!(
            !e.message.contains("secret-name"),
            "the answer names the object: {}",
            e.message
        );
    }
}
