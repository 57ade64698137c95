//! The ports controller's decisions: which Port each `spec.networks` entry uses or creates,
//! how a Port is placed with its Server, when it is released, and the Server's addresses.

use serde_json::json;
use stratus_api_types::common::Reason;
use stratus_api_types::compute::{AddressType, Server};
use stratus_api_types::network::Port;
use stratus_api_types::ports::CLAIMED_BY;
use stratus_controllers::ports::{
    EntryPlan, addresses, placed_status, plan_entry, released_status, stale, subnet_refusal,
};

fn server(networks: serde_json::Value, hypervisor: Option<&str>) -> Server {
    serde_json::from_value(json!({
        "apiVersion": "compute.stratus.dev/v1", "kind": "Server",
        "metadata": {"name": "web", "namespace": "demo", "uid": "s-1"},
        "spec": {"flavor": "m1.nano", "image": "tiny", "networks": networks},
        "status": {"hypervisor": hypervisor},
    }))
    .expect("a server")
}

fn port(name: &str, owner: Option<&str>, bound_to: Option<&str>) -> Port {
    let owners: Vec<_> = owner
        .into_iter()
        .map(|uid| {
            json!({"apiVersion": "compute.stratus.dev/v1", "kind": "Server",
                          "name": "x", "uid": uid, "controller": true})
        })
        .collect();
    serde_json::from_value(json!({
        "apiVersion": "network.stratus.dev/v1", "kind": "Port",
        "metadata": {"name": name, "namespace": "demo", "uid": "0f9e2c1a-77b3-4d2e-9a41-5e3c7d1b2a90",
                     "ownerReferences": owners},
        "spec": {"network": "private"},
        "status": {"phase": "Down", "macAddress": "fa:16:3e:00:00:01",
                   "fixedIPs": [{"subnet": "private-v4", "ipAddress": "10.0.0.5"}],
                   "boundTo": bound_to},
    }))
    .expect("a port")
}

fn claimed(mut p: Port, by: &str) -> Port {
    p.metadata.annotations = Some([(CLAIMED_BY.to_string(), by.to_string())].into());
    p
}

fn blocked_reason(p: EntryPlan) -> Reason {
    match p {
        EntryPlan::Blocked(b) => b.reason,
        other => panic!("not blocked: {other:?}"),
    }
}

#[test]
fn an_entry_with_a_network_creates_a_port_owned_by_the_server() {
    let s = server(json!([{"network": "private", "fixedIP": "10.0.0.9"}]), None);
    let EntryPlan::Create(p) = plan_entry(&s, 0, &s.spec.networks[0], None) else {
        panic!("no create");
    };
    assert_eq!(p.metadata.name.as_deref(), Some("web-0"));
    assert_eq!(p.metadata.namespace.as_deref(), Some("demo"));
    assert_eq!(p.spec.network, "private");
    assert_eq!(p.spec.fixed_ips.len(), 1);
    assert_eq!(p.spec.fixed_ips[0].ip_address.as_deref(), Some("10.0.0.9"));
    let owners = p.metadata.owner_references.expect("an owner");
    assert_eq!(owners.len(), 1);
    assert_eq!(owners[0].uid, "s-1");
    assert_eq!(owners[0].kind, "Server");
    assert_eq!(owners[0].controller, Some(true));
    // Once made, it is used as it is.
    let mut made = port("web-0", Some("s-1"), None);
    made.spec = p.spec.clone();
    assert_eq!(
        plan_entry(&s, 0, &s.spec.networks[0], Some(&made)),
        EntryPlan::Use
    );
}

/// A Port of the created name controlled by the Server (an ownerReference anyone could have
/// written) is used only when it asks for what the entry does: not one on another network (the
/// cloud's uplink, say), nor one asking for other addresses.
#[test]
fn a_port_of_the_created_name_is_used_only_if_it_asks_for_the_entrys_network_and_address() {
    let s = server(
        json!([{"network": "private"}, {"network": "private", "subnet": "private-b", "fixedIP": "10.1.0.9"}]),
        None,
    );
    let made = |name: &str, spec: serde_json::Value| {
        let mut p = port(name, Some("s-1"), None);
        p.spec = serde_json::from_value(spec).expect("a port spec");
        p
    };
    let plain = &s.spec.networks[0];
    assert_eq!(
        plan_entry(
            &s,
            0,
            plain,
            Some(&made("web-0", json!({"network": "private"})))
        ),
        EntryPlan::Use
    );
    let named = &s.spec.networks[1];
    let asked = json!({"network": "private", "fixedIPs": [{"subnet": "private-b", "ipAddress": "10.1.0.9"}]});
    assert_eq!(
        plan_entry(&s, 1, named, Some(&made("web-1", asked))),
        EntryPlan::Use
    );
    for (i, spec) in [
        (0, json!({"network": "public"})),
        (
            0,
            json!({"network": "private", "fixedIPs": [{"ipAddress": "10.0.0.1"}]}),
        ),
        (
            1,
            json!({"network": "public", "fixedIPs": [{"subnet": "private-b", "ipAddress": "10.1.0.9"}]}),
        ),
        (
            1,
            json!({"network": "private", "fixedIPs": [{"subnet": "private-b", "ipAddress": "10.1.0.10"}]}),
        ),
        (
            1,
            json!({"network": "private", "fixedIPs": [{"subnet": "private-c", "ipAddress": "10.1.0.9"}]}),
        ),
        (1, json!({"network": "private"})),
    ] {
        let p = made(&format!("web-{i}"), spec.clone());
        let EntryPlan::Blocked(b) = plan_entry(&s, i, &s.spec.networks[i], Some(&p)) else {
            panic!("used: {spec}");
        };
        assert_eq!(b.reason, Reason::PortRefused, "{spec}");
        assert!(
            b.message
                .starts_with(&format!("spec.networks[{i}]: port \"web-{i}\""))
                && b.message.contains(&format!("{:?}", p.spec.network)),
            "{}",
            b.message
        );
    }
}

#[test]
fn a_port_of_the_created_name_that_is_not_the_servers_is_not_taken() {
    let s = server(json!([{"network": "private"}]), None);
    for existing in [port("web-0", None, None), port("web-0", Some("s-2"), None)] {
        assert_eq!(
            blocked_reason(plan_entry(&s, 0, &s.spec.networks[0], Some(&existing))),
            Reason::PortInUse
        );
    }
}

#[test]
fn an_entry_naming_a_port_uses_it_unless_another_server_has_it() {
    let s = server(json!([{"port": "mine"}]), None);
    let e = &s.spec.networks[0];
    assert_eq!(
        blocked_reason(plan_entry(&s, 0, e, None)),
        Reason::PortNotFound
    );
    // Claimed for web (by uid) at its write: used; bound to web before claims were recorded:
    // used; claimed by another server, or by none (made anew since web named it): not taken.
    assert_eq!(
        plan_entry(
            &s,
            0,
            e,
            Some(&claimed(port("mine", None, None), "web/s-1"))
        ),
        EntryPlan::Use
    );
    assert_eq!(
        plan_entry(&s, 0, e, Some(&port("mine", None, Some("web")))),
        EntryPlan::Use
    );
    assert_eq!(
        blocked_reason(plan_entry(&s, 0, e, Some(&port("mine", None, None)))),
        Reason::PortRefused
    );
    assert_eq!(
        blocked_reason(plan_entry(
            &s,
            0,
            e,
            Some(&claimed(port("mine", None, None), "web/s-0"))
        )),
        Reason::PortInUse
    );
    let EntryPlan::Blocked(b) =
        plan_entry(&s, 0, e, Some(&claimed(port("mine", None, None), "db/s-2")))
    else {
        panic!("claimed by db");
    };
    assert_eq!(b.reason, Reason::PortInUse);
    assert!(b.message.contains("\"db\""), "{}", b.message);
    let EntryPlan::Blocked(b) = plan_entry(&s, 0, e, Some(&port("mine", None, Some("db")))) else {
        panic!("taken from db");
    };
    assert_eq!(b.reason, Reason::PortInUse);
    assert!(b.message.contains("spec.networks[0]") && b.message.contains("\"db\""));
    assert_eq!(
        blocked_reason(plan_entry(&s, 0, e, Some(&port("mine", Some("s-2"), None)))),
        Reason::PortInUse
    );
}

#[test]
fn a_port_follows_its_servers_placement() {
    let p = port("web-0", Some("s-1"), None);
    let st = placed_status(&p, &server(json!([{"network": "private"}]), Some("node-a")));
    assert_eq!(st.bound_to.as_deref(), Some("web"));
    assert_eq!(st.hypervisor.as_deref(), Some("node-a"));
    assert_eq!(st.interface_name.as_deref(), Some("tap0f9e2c1a77b"));
    // Addresses stay as allocation made them.
    assert_eq!(
        st.mac_address,
        p.status.as_ref().and_then(|s| s.mac_address.clone())
    );
    assert_eq!(st.fixed_ips.len(), 1);
    // Unplaced (evacuation, unbinding): bound, on no node.
    let st = placed_status(&p, &server(json!([{"network": "private"}]), None));
    assert_eq!(st.bound_to.as_deref(), Some("web"));
    assert_eq!(st.hypervisor, None);
    let st = placed_status(&p, &server(json!([{"network": "private"}]), Some("node-b")));
    assert_eq!(st.hypervisor.as_deref(), Some("node-b"));
    // Released: nothing of the binding left, the addresses kept.
    let r = released_status(&port("mine", None, Some("web")));
    assert_eq!(
        (r.bound_to, r.hypervisor, r.interface_name),
        (None, None, None)
    );
    assert_eq!(r.fixed_ips.len(), 1);
}

#[test]
fn a_port_is_released_when_its_server_is_gone_or_drops_it() {
    let bound = port("mine", None, Some("web"));
    let using = server(json!([{"port": "mine"}]), Some("n1"));
    let dropped = server(json!([{"network": "private"}]), Some("n1"));
    assert!(!stale(&bound, Some(&using)));
    assert!(stale(&bound, None));
    assert!(stale(&bound, Some(&dropped)));
    // A port bound to nothing is nobody's to release.
    assert!(!stale(&port("mine", None, None), None));
}

#[test]
fn addresses_list_each_ports_fixed_ips_in_guest_order() {
    let mut second = port("web-1", Some("s-1"), None);
    if let Some(st) = second.status.as_mut() {
        st.fixed_ips[0].ip_address = "10.0.1.7".into();
        st.mac_address = Some("fa:16:3e:00:00:02".into());
    }
    second.spec.network = "backend".into();
    let a = addresses(&[port("web-0", Some("s-1"), None), second]);
    assert_eq!(a.len(), 2);
    assert_eq!(
        (
            a[0].network.as_str(),
            a[0].port.as_deref(),
            a[0].ip.as_str()
        ),
        ("private", Some("web-0"), "10.0.0.5")
    );
    assert_eq!(a[0].mac.as_deref(), Some("fa:16:3e:00:00:01"));
    assert_eq!(a[0].type_, AddressType::Fixed);
    assert_eq!(
        (a[1].network.as_str(), a[1].ip.as_str(), a[1].mac.as_deref()),
        ("backend", "10.0.1.7", Some("fa:16:3e:00:00:02"))
    );
}

/// An entry naming a subnet asks its Port for an address of that subnet (the `fixedIP` in it,
/// when given); a subnet that does not exist or is on another network is said on the Server
/// under `spec.networks[i].subnet`.
#[test]
fn an_entry_naming_a_subnet_takes_its_address_from_it() {
    let s = server(
        json!([{"network": "private", "subnet": "private-b"},
               {"network": "private", "subnet": "private-b", "fixedIP": "10.1.0.9"}]),
        None,
    );
    for (i, ip) in [(0, None), (1, Some("10.1.0.9"))] {
        let EntryPlan::Create(p) = plan_entry(&s, i, &s.spec.networks[i], None) else {
            panic!("no create");
        };
        assert_eq!(p.spec.fixed_ips.len(), 1);
        assert_eq!(p.spec.fixed_ips[0].subnet.as_deref(), Some("private-b"));
        assert_eq!(p.spec.fixed_ips[0].ip_address.as_deref(), ip);
    }
    let subnet = |network: &str| -> stratus_api_types::network::Subnet {
        serde_json::from_value(json!({
            "apiVersion": "network.stratus.dev/v1", "kind": "Subnet",
            "metadata": {"name": "private-b", "namespace": "demo"},
            "spec": {"network": network, "cidr": "10.1.0.0/24"},
        }))
        .expect("a subnet")
    };
    let e = &s.spec.networks[0];
    assert_eq!(subnet_refusal(0, e, Some(&subnet("private"))), None);
    let other = subnet_refusal(0, e, Some(&subnet("public"))).expect("refused");
    assert_eq!(other.reason, Reason::PortRefused);
    assert!(
        other.message.starts_with("spec.networks[0].subnet: ")
            && other.message.contains("\"public\""),
        "{}",
        other.message
    );
    let missing = subnet_refusal(0, e, None).expect("refused");
    assert!(
        missing.message.starts_with("spec.networks[0].subnet: ")
            && missing.message.contains("not found"),
        "{}",
        missing.message
    );
    // An entry naming no subnet is never refused for one.
    let plain = server(json!([{"network": "private"}]), None);
    assert_eq!(subnet_refusal(0, &plain.spec.networks[0], None), None);
    let EntryPlan::Create(p) = plan_entry(&plain, 0, &plain.spec.networks[0], None) else {
        panic!("no create");
    };
    assert!(p.spec.fixed_ips.is_empty());
}
