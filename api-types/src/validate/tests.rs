use serde_json::{Value, json};

use super::validate;

/// Field paths of the errors `validate` reports for an object of `kind` with `spec`.
fn errors(group: &str, kind: &str, spec: Value) -> Vec<String> {
    let obj = json!({
        "apiVersion": format!("{group}/v1"),
        "kind": kind,
        "metadata": {"name": "x", "namespace": "demo"},
        "spec": spec,
    });
    match validate(group, kind, &obj) {
        Ok(()) => Vec::new(),
        Err(errs) => errs.into_iter().map(|e| e.field).collect(),
    }
}

fn identity(kind: &str, spec: Value) -> Vec<String> {
    errors("identity.stratus.dev", kind, spec)
}
fn compute(kind: &str, spec: Value) -> Vec<String> {
    errors("compute.stratus.dev", kind, spec)
}
fn image(spec: Value) -> Vec<String> {
    errors("image.stratus.dev", "Image", spec)
}
fn network(kind: &str, spec: Value) -> Vec<String> {
    errors("network.stratus.dev", kind, spec)
}
fn storage(kind: &str, spec: Value) -> Vec<String> {
    errors("storage.stratus.dev", kind, spec)
}
fn ring(spec: Value) -> Vec<String> {
    errors("object.stratus.dev", "ObjectRing", spec)
}

const KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIIAE4COqXr5at+NWW12Pky2bcpuhb0DP+OskDhJRD6a1 me@host";

#[test]
fn unknown_kind_and_missing_spec() {
    assert_eq!(compute("Pod", json!({})), ["kind"]);
    let obj = json!({"apiVersion": "compute.stratus.dev/v1", "kind": "Flavor", "metadata": {}});
    let errs = validate("compute.stratus.dev", "Flavor", &obj).expect_err("no spec");
    assert_eq!(errs[0].field, "spec");
}

#[test]
fn unknown_and_mistyped_fields_are_rejected() {
    let errs = validate(
        "compute.stratus.dev",
        "Flavor",
        &json!({"spec": {"vcpus": 1, "ramMiB": 64, "diskGiB": 1, "ramMB": 64}}),
    )
    .expect_err("unknown field");
    assert_eq!(errs.len(), 1);
    assert_eq!(errs[0].field, "spec");
    assert!(errs[0].reason.contains("ramMB"), "{}", errs[0].reason);

    // Nested structs deny unknown fields too.
    assert_eq!(
        compute(
            "Server",
            json!({"flavor": "m1", "image": "i", "networks": [{"network": "n", "ip": "1.2.3.4"}]})
        ),
        ["spec"]
    );
    // A required field missing.
    assert_eq!(network("Subnet", json!({"cidr": "10.0.0.0/24"})), ["spec"]);
    // A value outside the enum.
    assert_eq!(
        identity("RoleAssignment", json!({"user": "alice", "role": "owner"})),
        ["spec"]
    );
}

#[test]
fn field_error_display_names_field_and_value() {
    let errs = validate(
        "network.stratus.dev",
        "Subnet",
        &json!({"spec": {"network": "n", "cidr": "10.0.0.0/24", "gatewayIP": "10.0.1.1"}}),
    )
    .expect_err("gateway outside");
    assert_eq!(
        errs[0].to_string(),
        "spec.gatewayIP: not inside cidr 10.0.0.0/24 (value: \"10.0.1.1\")"
    );
}

#[test]
fn identity_kinds() {
    assert!(identity("Project", json!({"description": "d"})).is_empty());
    assert!(identity("User", json!({"email": "a@example.org"})).is_empty());
    assert_eq!(identity("User", json!({"email": "nobody"})), ["spec.email"]);
    assert!(identity("RoleAssignment", json!({"user": "alice", "role": "member"})).is_empty());
    assert!(identity("Quota", json!({"limits": {"servers": 10, "ramMiB": 4096}})).is_empty());
    assert_eq!(identity("Quota", json!({"limits": {"gpus": 1}})), ["spec"]);
}

#[test]
fn flavor_and_hypervisor() {
    assert!(
        compute(
            "Flavor",
            json!({"vcpus": 1, "ramMiB": 512, "diskGiB": 1, "extraSpecs": {"hw:cpu_policy": "dedicated"}})
        )
        .is_empty()
    );
    assert_eq!(
        compute(
            "Flavor",
            json!({"vcpus": 1, "ramMiB": 512, "diskGiB": 1, "extraSpecs": {"": "x"}})
        ),
        ["spec.extraSpecs"]
    );
    assert!(
        compute(
            "Hypervisor",
            json!({"disabled": true, "disabledReason": "maintenance"})
        )
        .is_empty()
    );
    assert_eq!(
        compute("Hypervisor", json!({"disabledReason": "maintenance"})),
        ["spec.disabledReason"]
    );
}

#[test]
fn keypair_key_data_must_match_type() {
    assert!(compute("Keypair", json!({"publicKey": KEY})).is_empty());
    let wrong_type = KEY.replacen("ssh-ed25519", "ssh-rsa", 1);
    assert_eq!(
        compute("Keypair", json!({"publicKey": wrong_type})),
        ["spec.publicKey"]
    );
    assert_eq!(
        compute("Keypair", json!({"publicKey": "ssh-ed25519 !!!notbase64"})),
        ["spec.publicKey"]
    );
    assert_eq!(
        compute("Keypair", json!({"publicKey": "ssh-ed25519"})),
        ["spec.publicKey"]
    );
}

#[test]
fn server_group_rules() {
    assert!(
        compute(
            "ServerGroup",
            json!({"policy": "anti-affinity", "maxServerPerHost": 2})
        )
        .is_empty()
    );
    assert_eq!(
        compute(
            "ServerGroup",
            json!({"policy": "affinity", "maxServerPerHost": 2})
        ),
        ["spec.maxServerPerHost"]
    );
}

#[test]
fn server_boot_source_is_exactly_one() {
    assert!(compute("Server", json!({"flavor": "m1", "image": "cirros"})).is_empty());
    assert!(compute("Server", json!({"flavor": "m1", "bootVolume": "root"})).is_empty());
    assert_eq!(compute("Server", json!({"flavor": "m1"})), ["spec.image"]);
    assert_eq!(
        compute(
            "Server",
            json!({"flavor": "m1", "image": "cirros", "bootVolume": "root"})
        ),
        ["spec.bootVolume"]
    );
}

#[test]
fn server_networks_and_volumes() {
    let good = json!({
        "flavor": "m1", "image": "cirros",
        "networks": [{"network": "private", "fixedIP": "10.0.0.5"}, {"port": "p1"}, {"network": "v6", "fixedIP": "2001:db8::5"}, {"network": "private", "subnet": "private-v4"}, {"network": "private", "subnet": "private-v4", "fixedIP": "10.0.0.6"}],
        "volumes": [{"volume": "data"}],
        "userData": "I2Nsb3VkLWNvbmZpZwo=",
    });
    assert!(compute("Server", good).is_empty());

    let bad = json!({
        "flavor": "m1", "bootVolume": "root",
        "networks": [
            {},
            {"network": "a", "port": "p"},
            {"port": "p1", "fixedIP": "10.0.0.5"},
            {"port": "p1"},
            {"network": "a", "fixedIP": "10.0.0.300"},
            {"port": "p2", "subnet": "s"},
        ],
        "volumes": [{"volume": "data"}, {"volume": "data"}, {"volume": "root"}],
        "userData": "not base64!",
    });
    assert_eq!(
        compute("Server", bad),
        [
            "spec.networks[0]",
            "spec.networks[1].port",
            "spec.networks[2].fixedIP",
            "spec.networks[3].port",
            "spec.networks[4].fixedIP",
            "spec.networks[5].subnet",
            "spec.volumes[1]",
            "spec.volumes[2].volume",
            "spec.userData",
        ]
    );
}

#[test]
fn image_kernel_ramdisk_rules() {
    let src = json!({"url": "https://example.org/cirros.img"});
    assert!(image(json!({"diskFormat": "qcow2", "source": src})).is_empty());
    assert!(
        image(json!({"diskFormat": "aki", "containerFormat": "aki", "source": src})).is_empty()
    );
    assert!(
        image(json!({
            "diskFormat": "raw", "source": src,
            "kernelImage": "k", "ramdiskImage": "r", "kernelCmdline": "console=ttyS0"
        }))
        .is_empty()
    );
    // A kernel must say so in its container format, a disk must not.
    assert_eq!(
        image(json!({"diskFormat": "aki", "source": src})),
        ["spec.containerFormat"]
    );
    assert_eq!(
        image(json!({"diskFormat": "qcow2", "containerFormat": "ari", "source": src})),
        ["spec.containerFormat"]
    );
    // A kernel cannot itself name a kernel.
    assert_eq!(
        image(
            json!({"diskFormat": "ari", "containerFormat": "ari", "source": src, "kernelImage": "k"})
        ),
        ["spec.kernelImage"]
    );
    assert_eq!(
        image(
            json!({"diskFormat": "qcow2", "source": src, "ramdiskImage": "r", "kernelCmdline": "x"})
        ),
        ["spec.ramdiskImage", "spec.kernelCmdline"]
    );
    // The source is required.
    assert_eq!(image(json!({"diskFormat": "qcow2"})), ["spec"]);
}

#[test]
fn an_image_source_is_one_url_or_one_swift_object_of_safe_names() {
    let swift = |container: &str, object: &str| {
        image(json!({
            "diskFormat": "raw",
            "source": {"swift": {"container": container, "object": object}},
        }))
    };
    assert!(swift("images", "cirros.raw").is_empty());
    assert!(swift("images", "distro/v1/disk.raw").is_empty());
    assert!(swift(&"c".repeat(256), &"o".repeat(1024)).is_empty());
    // Exactly one source.
    assert_eq!(
        image(json!({"diskFormat": "raw", "source": {}})),
        ["spec.source"]
    );
    assert_eq!(
        image(json!({
            "diskFormat": "raw",
            "source": {"url": "https://example.org/a", "swift": {"container": "c", "object": "o"}},
        })),
        ["spec.source"]
    );
    // Names Swift refuses, and path tricks that would name another object or account.
    for (container, object, field) in [
        ("", "o", "spec.source.swift.container"),
        ("a/b", "o", "spec.source.swift.container"),
        ("..", "o", "spec.source.swift.container"),
        (".", "o", "spec.source.swift.container"),
        ("c\u{7}", "o", "spec.source.swift.container"),
        (&"c".repeat(257), "o", "spec.source.swift.container"),
        ("c", "", "spec.source.swift.object"),
        ("c", "../../AUTH_other/c/o", "spec.source.swift.object"),
        ("c", "a/./b", "spec.source.swift.object"),
        ("c", "/o", "spec.source.swift.object"),
        ("c", "o/", "spec.source.swift.object"),
        ("c", "a//b", "spec.source.swift.object"),
        ("c", "o\n", "spec.source.swift.object"),
        ("c", &"o".repeat(1025), "spec.source.swift.object"),
    ] {
        assert_eq!(
            swift(container, object),
            [field],
            "{container:?} {object:?}"
        );
    }
    // Unknown fields are refused, as everywhere.
    assert_eq!(
        image(json!({
            "diskFormat": "raw",
            "source": {"swift": {"container": "c", "object": "o", "account": "AUTH_x"}},
        })),
        ["spec"]
    );
}

#[test]
fn network_segmentation() {
    assert!(network("Network", json!({})).is_empty());
    assert!(
        network(
            "Network",
            json!({"segmentation": "flat", "physicalNetwork": "br-ex"})
        )
        .is_empty()
    );
    assert_eq!(
        network("Network", json!({"segmentation": "flat"})),
        ["spec.physicalNetwork"]
    );
    assert_eq!(
        network("Network", json!({"physicalNetwork": "br-ex"})),
        ["spec.physicalNetwork"]
    );
}

#[test]
fn subnet_good() {
    assert!(
        network(
            "Subnet",
            json!({
                "network": "n", "cidr": "10.0.0.0/24", "gatewayIP": "10.0.0.1",
                "allocationPools": [{"start": "10.0.0.10", "end": "10.0.0.99"}, {"start": "10.0.0.100", "end": "10.0.0.254"}],
                "dnsNameservers": ["192.0.2.53", "2001:db8::53"],
                "hostRoutes": [{"destination": "192.168.0.0/16", "nexthop": "10.0.0.254"}],
            })
        )
        .is_empty()
    );
    assert!(
        network(
            "Subnet",
            json!({"network": "n", "cidr": "2001:db8:1::/64", "gatewayIP": "2001:db8:1::1",
                   "allocationPools": [{"start": "2001:db8:1::10", "end": "2001:db8:1::ffff"}]})
        )
        .is_empty()
    );
    // /31 point-to-point: both addresses usable.
    assert!(
        network(
            "Subnet",
            json!({"network": "n", "cidr": "10.0.0.0/31", "gatewayIP": "10.0.0.0"})
        )
        .is_empty()
    );
}

#[test]
fn subnet_cidr_must_be_a_network() {
    assert_eq!(
        network("Subnet", json!({"network": "n", "cidr": "10.0.0.1/24"})),
        ["spec.cidr"]
    );
    assert_eq!(
        network("Subnet", json!({"network": "n", "cidr": "10.0.0.0/33"})),
        ["spec.cidr"]
    );
    assert_eq!(
        network("Subnet", json!({"network": "n", "cidr": "10.0.0.0"})),
        ["spec.cidr"]
    );
    assert_eq!(
        network("Subnet", json!({"network": "n", "cidr": "2001:db8::1/64"})),
        ["spec.cidr"]
    );
}

#[test]
fn subnet_gateway_and_pools() {
    let errs = network(
        "Subnet",
        json!({
            "network": "n", "cidr": "10.0.0.0/24", "gatewayIP": "10.0.0.50",
            "allocationPools": [
                {"start": "10.0.0.10", "end": "10.0.0.99"},    // contains the gateway
                {"start": "10.0.0.90", "end": "10.0.0.120"},   // overlaps [0]
                {"start": "10.0.0.200", "end": "10.0.0.150"},  // end before start
                {"start": "10.0.1.1", "end": "10.0.0.255"},    // outside; broadcast
                {"start": "2001:db8::1", "end": "10.0.0.2"},   // wrong family
            ],
        }),
    );
    assert_eq!(
        errs,
        [
            "spec.allocationPools[0]",
            "spec.allocationPools[1]",
            "spec.allocationPools[2].end",
            "spec.allocationPools[3].start",
            "spec.allocationPools[3].end",
            "spec.allocationPools[4].start",
        ]
    );
    assert_eq!(
        network(
            "Subnet",
            json!({"network": "n", "cidr": "10.0.0.0/24", "gatewayIP": "10.0.1.1"})
        ),
        ["spec.gatewayIP"]
    );
    assert_eq!(
        network(
            "Subnet",
            json!({"network": "n", "cidr": "10.0.0.0/24", "gatewayIP": "10.0.0.0"})
        ),
        ["spec.gatewayIP"]
    );
    assert_eq!(
        network(
            "Subnet",
            json!({"network": "n", "cidr": "10.0.0.0/24", "gatewayIP": "10.0.0.1", "disableGateway": true})
        ),
        ["spec.gatewayIP"]
    );
}

#[test]
fn subnet_dns_and_routes() {
    let errs = network(
        "Subnet",
        json!({
            "network": "n", "cidr": "10.0.0.0/24",
            "dnsNameservers": ["192.0.2.53", "192.0.2.53", "dns.example.org"],
            "hostRoutes": [
                {"destination": "192.168.0.0/16", "nexthop": "10.0.0.254"},
                {"destination": "192.168.0.0/16", "nexthop": "10.0.0.253"},
                {"destination": "192.168.1.1/24", "nexthop": "10.0.0.254"},
                {"destination": "2001:db8::/32", "nexthop": "10.0.0.254"},
            ],
        }),
    );
    assert_eq!(
        errs,
        [
            "spec.dnsNameservers[1]",
            "spec.dnsNameservers[2]",
            "spec.hostRoutes[1].destination",
            "spec.hostRoutes[2].destination",
            "spec.hostRoutes[3].nexthop",
            "spec.hostRoutes[3].destination",
        ]
    );
}

#[test]
fn port_rules() {
    assert!(
        network(
            "Port",
            json!({
                "network": "n",
                "fixedIPs": [{"subnet": "s"}, {"ipAddress": "10.0.0.5"}, {"subnet": "s6", "ipAddress": "2001:db8::5"}],
                "macAddress": "fa:16:3e:00:00:01",
                "securityGroups": ["default", "web"],
                "allowedAddressPairs": [{"ipAddress": "10.0.0.100"}, {"ipAddress": "10.0.1.0/24", "macAddress": "fa:16:3e:00:00:02"}],
            })
        )
        .is_empty()
    );
    assert!(
        network(
            "Port",
            json!({"network": "n", "portSecurityEnabled": false})
        )
        .is_empty()
    );
    let errs = network(
        "Port",
        json!({
            "network": "n",
            "fixedIPs": [{}, {"ipAddress": "10.0.0.5"}, {"ipAddress": "10.0.0.5"}, {"ipAddress": "10.0.0"}],
            "macAddress": "01:00:5e:00:00:01",
            "securityGroups": ["a", "a"],
            "allowedAddressPairs": [{"ipAddress": "10.0.0.0/40", "macAddress": "00:00:00:00:00:00"}],
        }),
    );
    assert_eq!(
        errs,
        [
            "spec.fixedIPs[0]",
            "spec.fixedIPs[2].ipAddress",
            "spec.fixedIPs[3].ipAddress",
            "spec.macAddress",
            "spec.securityGroups[1]",
            "spec.allowedAddressPairs[0].ipAddress",
            "spec.allowedAddressPairs[0].macAddress",
        ]
    );
    assert_eq!(
        network(
            "Port",
            json!({"network": "n", "portSecurityEnabled": false, "securityGroups": ["default"],
                   "allowedAddressPairs": [{"ipAddress": "10.0.0.9"}]})
        ),
        ["spec.securityGroups", "spec.allowedAddressPairs"]
    );
}

#[test]
fn router_and_floating_ip() {
    assert!(
        network(
            "Router",
            json!({"externalGateway": {"network": "public"}, "interfaces": [{"subnet": "a"}, {"subnet": "b"}],
                   "routes": [{"destination": "10.1.0.0/16", "nexthop": "10.0.0.5"}]})
        )
        .is_empty()
    );
    assert_eq!(
        network(
            "Router",
            json!({"interfaces": [{"subnet": "a"}, {"subnet": "a"}],
                   "routes": [{"destination": "10.1.0.0/16", "nexthop": "fe80::1"}]})
        ),
        ["spec.interfaces[1]", "spec.routes[0].nexthop"]
    );
    assert!(
        network(
            "FloatingIP",
            json!({"floatingNetwork": "public", "port": "p", "fixedIP": "10.0.0.5"})
        )
        .is_empty()
    );
    assert!(network("FloatingIP", json!({"floatingNetwork": "public"})).is_empty());
    assert_eq!(
        network(
            "FloatingIP",
            json!({"floatingNetwork": "public", "fixedIP": "10.0.0.5"})
        ),
        ["spec.fixedIP"]
    );
}

#[test]
fn security_group_rules() {
    assert!(
        network(
            "SecurityGroup",
            json!({"rules": [
                {"direction": "egress"},
                {"direction": "ingress", "protocol": "tcp", "portRangeMin": 22, "portRangeMax": 22, "remoteIPPrefix": "0.0.0.0/0"},
                {"direction": "ingress", "protocol": "udp", "portRangeMin": 53},
                {"direction": "ingress", "protocol": "icmp", "icmpType": 8, "icmpCode": 0},
                {"direction": "ingress", "ethertype": "IPv6", "protocol": "icmp", "remoteIPPrefix": "::/0"},
                {"direction": "ingress", "remoteGroup": "default"},
            ]})
        )
        .is_empty()
    );
    let errs = network(
        "SecurityGroup",
        json!({"rules": [
            {"direction": "ingress", "protocol": "tcp", "portRangeMin": 80, "portRangeMax": 79},
            {"direction": "ingress", "protocol": "icmp", "portRangeMin": 80},
            {"direction": "ingress", "protocol": "tcp", "portRangeMax": 80},
            {"direction": "ingress", "protocol": "tcp", "icmpType": 8},
            {"direction": "ingress", "protocol": "icmp", "icmpCode": 0},
            {"direction": "ingress", "remoteIPPrefix": "10.0.0.0/8", "remoteGroup": "default"},
            {"direction": "ingress", "remoteIPPrefix": "10.0.0.1/8"},
            {"direction": "ingress", "ethertype": "IPv6", "remoteIPPrefix": "10.0.0.0/8"},
            {"direction": "egress", "description": "all"},
            {"direction": "egress", "description": "all again"},
        ]}),
    );
    assert_eq!(
        errs,
        [
            "spec.rules[0].portRangeMax",
            "spec.rules[1].portRangeMin",
            "spec.rules[2].portRangeMin",
            "spec.rules[3].icmpType",
            "spec.rules[4].icmpType",
            "spec.rules[5].remoteGroup",
            "spec.rules[6].remoteIPPrefix",
            "spec.rules[7].remoteIPPrefix",
            "spec.rules[9]",
        ]
    );
}

#[test]
fn volume_source_is_at_most_one() {
    assert!(storage("Volume", json!({"sizeGiB": 1})).is_empty());
    assert!(storage("Volume", json!({"sizeGiB": 1, "source": {"snapshot": "s"}})).is_empty());
    assert_eq!(
        storage(
            "Volume",
            json!({"sizeGiB": 1, "source": {"image": "i", "volume": "v"}})
        ),
        ["spec.source"]
    );
    assert_eq!(
        storage("Volume", json!({"sizeGiB": 1, "source": {}})),
        ["spec.source"]
    );
    assert!(storage("VolumeSnapshot", json!({"volume": "v"})).is_empty());
}

#[test]
fn storage_pool_backend_fields() {
    assert!(
        storage(
            "StoragePool",
            json!({"backend": "lvm", "node": "n1", "vgName": "vg0"})
        )
        .is_empty()
    );
    assert!(
        storage(
            "StoragePool",
            json!({"backend": "file", "node": "n1", "path": "/var/lib/stratus/volumes"})
        )
        .is_empty()
    );
    assert_eq!(
        storage(
            "StoragePool",
            json!({"backend": "lvm", "node": "n1", "path": "/x"})
        ),
        ["spec.vgName", "spec.path"]
    );
    assert_eq!(
        storage(
            "StoragePool",
            json!({"backend": "file", "node": "n1", "vgName": "vg0"})
        ),
        ["spec.vgName", "spec.path"]
    );
    assert_eq!(
        storage(
            "StoragePool",
            json!({"backend": "file", "node": "n1", "path": "/srv/../etc"})
        ),
        ["spec.path"]
    );
}

#[test]
fn object_ring_devices() {
    let dev = |ip: &str, device: &str| json!({"zone": 1, "ip": ip, "port": 6200, "device": device, "weight": 100.0});
    assert!(
        ring(
            json!({"ringType": "object", "policyIndex": 1, "partPower": 10, "replicas": 3,
                    "devices": [dev("127.0.0.1", "sdb1"), dev("127.0.0.1", "sdc1")]})
        )
        .is_empty()
    );
    assert_eq!(
        ring(
            json!({"ringType": "account", "policyIndex": 1, "partPower": 10, "replicas": 3,
                    "devices": [dev("127.0.0.1", "sdb1"), dev("127.0.0.1", "sdb1"), dev("::1", "sdb1")]})
        ),
        ["spec.policyIndex", "spec.devices[1]", "spec.devices[2].ip"]
    );
    assert_eq!(
        ring(
            json!({"ringType": "account", "partPower": 10, "replicas": 3,
                    "devices": [{"zone": 1, "ip": "127.0.0.1", "port": 6200, "device": "d", "weight": -1.0}]})
        ),
        ["spec.devices[0].weight"]
    );
}

#[test]
fn object_ring_size_is_bounded_so_a_version_fits_in_one_object() {
    let spec = |power: u32, replicas: u32| {
        json!({"ringType": "object", "partPower": power, "replicas": replicas,
               "devices": [{"zone": 1, "ip": "127.0.0.1", "port": 6200, "device": "d", "weight": 1.0}]})
    };
    assert!(ring(spec(16, 4)).is_empty());
    assert!(ring(spec(18, 1)).is_empty());
    assert_eq!(ring(spec(16, 5)), ["spec.partPower"]);
    assert_eq!(ring(spec(20, 3)), ["spec.partPower"]);
    assert_eq!(ring(spec(32, 10)), ["spec.partPower"]);
    let mut bad = spec(10, 3);
    bad["overload"] = json!(101.0);
    assert_eq!(ring(bad), ["spec.overload"]);
}
