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

/// The key of a claimed VXLAN network identifier: one per Network, cluster-wide.
pub fn vni_claim(prefix: &str, vni: u32) -> String {
    format!("{prefix}/_claims/network/vni/{vni:08}")
}

/// The key of a claimed physical network: one flat Network per host interface.
pub fn physical_network_claim(prefix: &str, physical_network: &str) -> String {
    format!("{prefix}/_claims/network/physical/{physical_network}")
}

/// The key of a claimed VLAN ID on a physical network: one `vlan` Network per tag.
pub fn vlan_claim(prefix: &str, physical_network: &str, id: u16) -> String {
    format!("{prefix}/_claims/network/vlan/{physical_network}/{id:04}")
}

/// The key prefix of the IPv4 addresses claimed on the Network of uid `network_uid`: one key
/// per address under it, named by the address as 8 hex digits, so keys sort as addresses and
/// a range of addresses is a range of keys. Keyed by uid, a re-created Network of the same
/// name inherits no claim.
pub fn ip_claims(prefix: &str, network_uid: &str) -> String {
    format!("{prefix}/_claims/network/{network_uid}/ip/")
}

/// The key of one claimed IPv4 address on a Network (see [`ip_claims`]).
pub fn ip_claim(prefix: &str, network_uid: &str, ip: std::net::Ipv4Addr) -> String {
    format!("{}{:08x}", ip_claims(prefix, network_uid), u32::from(ip))
}

/// The key of a claimed MAC address (lower case, colon-separated) on a Network.
pub fn mac_claim(prefix: &str, network_uid: &str, mac: &str) -> String {
    format!("{prefix}/_claims/network/{network_uid}/mac/{mac}")
}
