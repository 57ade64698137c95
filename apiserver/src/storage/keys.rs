//! Where objects live in etcd: `{prefix}/{group}/{plural}/[{namespace}/]{name}`, the core group
//! spelled `core`.

/// The key prefix holding every object of a type (with a trailing `/`), or of one namespace
/// when `namespace` is given.
pub fn collection(prefix: &str, group: &str, plural: &str, namespace: Option<&str>) -> String {
    let group = if group.is_empty() { "core" } else { group };
    match namespace {
        Some(ns) => format!("{prefix}/{group}/{plural}/{ns}/"),
        None => format!("{prefix}/{group}/{plural}/"),
    }
}

/// The key of one object.
pub fn object(
    prefix: &str,
    group: &str,
    plural: &str,
    namespace: Option<&str>,
    name: &str,
) -> String {
    format!("{}{name}", collection(prefix, group, plural, namespace))
}

/// The key of a user's password record (outside every served resource's keys).
pub fn password(prefix: &str, user: &str) -> String {
    format!("{prefix}/_system/passwords/{user}")
}

/// The key every write of a user, a role assignment, a project, a password or a token
/// revocation also puts (see
/// [`crate::storage::store::Store::with_marker`]): while its revision stands, no token's answer has changed.
pub fn marker_key(prefix: &str) -> String {
    format!("{prefix}/_system/identity-marker")
}

/// The keys whose writes change what a token allows: see [`marker_key`].
pub fn marked_prefixes(prefix: &str) -> Vec<String> {
    vec![
        format!("{prefix}/identity.stratus.dev/users/"),
        format!("{prefix}/identity.stratus.dev/roleassignments/"),
        format!("{prefix}/identity.stratus.dev/projects/"),
        format!("{prefix}/_system/revoked/"),
        format!("{prefix}/_system/passwords/"),
    ]
}
