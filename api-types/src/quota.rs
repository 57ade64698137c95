//! Which kinds count against a project's Quota, and how much each object uses: the one rule
//! the API server's admission and the quota controller share.

use serde_json::Value;

/// Every kind counted against quotas: `(group, kind, plural)`.
pub const COUNTED: [(&str, &str, &str); 9] = [
    ("compute.stratus.dev", "Server", "servers"),
    ("storage.stratus.dev", "Volume", "volumes"),
    ("storage.stratus.dev", "VolumeSnapshot", "volumesnapshots"),
    ("network.stratus.dev", "Network", "networks"),
    ("network.stratus.dev", "Subnet", "subnets"),
    ("network.stratus.dev", "Port", "ports"),
    ("network.stratus.dev", "Router", "routers"),
    ("network.stratus.dev", "FloatingIP", "floatingips"),
    ("network.stratus.dev", "SecurityGroup", "securitygroups"),
];

/// The quota resources (fields of `QuotaLimits`, as serialised) one object uses.
/// `flavor` gives a flavor's (vCPUs, RAM MiB) by name; an unknown flavor counts as zero.
pub fn usage(
    group: &str,
    kind: &str,
    obj: &Value,
    flavor: &dyn Fn(&str) -> Option<(u64, u64)>,
) -> Vec<(&'static str, u64)> {
    let u = |p: &str| obj.pointer(p).and_then(Value::as_u64).unwrap_or(0);
    match (group, kind) {
        ("compute.stratus.dev", "Server") => {
            let (vcpus, ram) = obj
                .pointer("/spec/flavor")
                .and_then(Value::as_str)
                .and_then(flavor)
                .unwrap_or((0, 0));
            vec![("servers", 1), ("vcpus", vcpus), ("ramMiB", ram)]
        }
        ("storage.stratus.dev", "Volume") => {
            vec![("volumes", 1), ("volumeGiB", u("/spec/sizeGiB"))]
        }
        // As Cinder's `gigabytes`: a snapshot's GiB (its volume's size when it was taken,
        // which its create records) count with the volumes'.
        ("storage.stratus.dev", "VolumeSnapshot") => {
            vec![("snapshots", 1), ("volumeGiB", u("/status/sizeGiB"))]
        }
        ("network.stratus.dev", "Network") => vec![("networks", 1)],
        ("network.stratus.dev", "Subnet") => vec![("subnets", 1)],
        ("network.stratus.dev", "Port") => vec![("ports", 1)],
        ("network.stratus.dev", "Router") => vec![("routers", 1)],
        ("network.stratus.dev", "FloatingIP") => vec![("floatingIPs", 1)],
        ("network.stratus.dev", "SecurityGroup") => vec![("securityGroups", 1)],
        _ => Vec::new(),
    }
}

/// The counted kinds other than `(group, kind)` whose objects also use quota resource `field`
/// (a VolumeSnapshot's GiB count in `volumeGiB` with the Volumes'): `(group, kind, plural)`.
pub fn sharing(
    group: &str,
    kind: &str,
    field: &str,
) -> Vec<(&'static str, &'static str, &'static str)> {
    let empty = Value::Object(serde_json::Map::new());
    COUNTED
        .into_iter()
        .filter(|(g, k, _)| (*g, *k) != (group, kind))
        .filter(|(g, k, _)| {
            usage(g, k, &empty, &|_| None)
                .iter()
                .any(|(f, _)| *f == field)
        })
        .collect()
}

/// Whether objects of a kind count against quotas.
pub fn counted(group: &str, kind: &str) -> bool {
    COUNTED.iter().any(|(g, k, _)| *g == group && *k == kind)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn servers_use_their_flavor_and_volumes_their_size() {
        let flavor = |n: &str| (n == "m1.small").then_some((2, 2048));
        let s = json!({"spec": {"flavor": "m1.small"}});
        assert_eq!(
            usage("compute.stratus.dev", "Server", &s, &flavor),
            vec![("servers", 1), ("vcpus", 2), ("ramMiB", 2048)]
        );
        let v = json!({"spec": {"sizeGiB": 20}});
        assert_eq!(
            usage("storage.stratus.dev", "Volume", &v, &flavor),
            vec![("volumes", 1), ("volumeGiB", 20)]
        );
        let snap = json!({"spec": {"volume": "v"}, "status": {"sizeGiB": 7}});
        assert_eq!(
            usage("storage.stratus.dev", "VolumeSnapshot", &snap, &flavor),
            vec![("snapshots", 1), ("volumeGiB", 7)]
        );
        assert!(counted("network.stratus.dev", "Port"));
        assert!(!counted("compute.stratus.dev", "Keypair"));
        // Volumes and snapshots share volumeGiB (as Cinder's gigabytes), nothing else shares.
        assert_eq!(
            sharing("storage.stratus.dev", "Volume", "volumeGiB"),
            vec![("storage.stratus.dev", "VolumeSnapshot", "volumesnapshots")]
        );
        assert_eq!(
            sharing("storage.stratus.dev", "VolumeSnapshot", "volumeGiB"),
            vec![("storage.stratus.dev", "Volume", "volumes")]
        );
        assert!(sharing("storage.stratus.dev", "Volume", "volumes").is_empty());
        assert!(sharing("compute.stratus.dev", "Server", "vcpus").is_empty());
        // Every counted kind has a rule, and every rule a counted kind.
        for (g, k, _) in COUNTED {
            assert!(!usage(g, k, &json!({}), &flavor).is_empty(), "{k}");
        }
    }
}
