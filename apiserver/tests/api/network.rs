//! Network IPAM at admission: VNIs, subnets checked against their network, and a Port's MAC
//! and addresses claimed in the create's transaction and freed with its delete.

use std::collections::HashSet;

use serde_json::{Value, json};
use stratus_apiserver::admission::CLUSTER_ADMIN;
use stratus_apiserver::base::error::ApiError;
use stratus_apiserver::storage::keys;

use crate::fixtures::{Cloud, MERGE, Obj, refused};

const V1: &str = "network.stratus.dev/v1";

fn network(name: &str) -> Obj {
    Obj(json!({"apiVersion": V1, "kind": "Network",
        "metadata": {"name": name, "namespace": "demo"}, "spec": {}}))
}

fn subnet(name: &str, network: &str, cidr: &str) -> Obj {
    Obj(json!({"apiVersion": V1, "kind": "Subnet",
        "metadata": {"name": name, "namespace": "demo"},
        "spec": {"network": network, "cidr": cidr}}))
}

fn port(name: &str, network: &str) -> Obj {
    Obj(json!({"apiVersion": V1, "kind": "Port",
        "metadata": {"name": name, "namespace": "demo"}, "spec": {"network": network}}))
}

/// The one field a refusal names, and its code.
fn field_of(e: &ApiError) -> (u16, String) {
    let fields: Vec<&str> = e.details.causes.iter().map(|c| c.field.as_str()).collect();
    assert_eq!(fields.len(), 1, "one field at fault: {e:?}");
    (e.code, fields[0].to_string())
}

fn ips(p: &Value) -> Vec<String> {
    p["status"]["fixedIPs"]
        .as_array()
        .unwrap_or_else(|| panic!("no fixed IPs: {p}"))
        .iter()
        .map(|f| f["ipAddress"].as_str().unwrap_or_default().to_string())
        .collect()
}

fn uid(o: &Value) -> String {
    o["metadata"]["uid"].as_str().expect("uid").to_string()
}

/// A cloud with project `demo`, network `n` and its subnet `s` (10.0.0.0/24).
async fn with_subnet() -> (Cloud, Value) {
    let c = Cloud::with_demo().await;
    let n = c.create(&network("n")).await.expect("network");
    c.create(&subnet("s", "n", "10.0.0.0/24"))
        .await
        .expect("subnet");
    (c, n)
}

/// The address claims on the network of uid `uid`.
async fn claims(c: &Cloud, uid: &str) -> Vec<Value> {
    c.api
        .store
        .list(&keys::ip_claims("/registry", uid), None, 0, 0)
        .await
        .expect("list")
        .items
        .into_iter()
        .map(|(_, claim)| claim.value)
        .collect()
}

/// How many addresses ports hold on the network of uid `uid` (not its subnets' gateways).
async fn claimed(c: &Cloud, uid: &str) -> usize {
    claims(c, uid)
        .await
        .iter()
        .filter(|claim| claim.get("port").is_some())
        .count()
}

/// The holder recorded in the claim of address `ip` on the network of uid `uid`.
async fn claim_of(c: &Cloud, uid: &str, ip: &str) -> Option<Value> {
    c.api
        .store
        .get(&keys::ip_claim(
            "/registry",
            uid,
            ip.parse().expect("an address"),
        ))
        .await
        .expect("get")
        .map(|s| s.value)
}

#[tokio::test]
async fn a_vxlan_network_has_its_own_vni_at_once_and_frees_it_when_deleted() {
    let c = Cloud::with_demo().await;
    let a = c.create(&network("a")).await.expect("a");
    let b = c.create(&network("b")).await.expect("b");
    let vni = |o: &Value| o["status"]["vni"].as_u64().unwrap_or(0);
    assert!(vni(&a) >= 1 && vni(&a) <= 16_777_215, "{a}");
    assert_ne!(vni(&a), vni(&b));
    let stored = c.get("Network", Some("demo"), "a").await.expect("a");
    assert_eq!(vni(&stored), vni(&a), "the answer is what was stored");
    let key = keys::vni_claim("/registry", u32::try_from(vni(&a)).expect("24 bits"));
    assert!(c.api.store.get(&key).await.expect("read").is_some());
    let e = refused(
        c.patch(
            &c.status("Network", Some("demo"), "a"),
            MERGE,
            &json!({"status": {"vni": 7}}),
            "",
        )
        .await,
    );
    assert_eq!(field_of(&e), (422, "status.vni".into()));
    c.patch(
        &c.status("Network", Some("demo"), "a"),
        MERGE,
        &json!({"status": {"phase": "Active"}}),
        "",
    )
    .await
    .expect("the rest of the status is the agents'");
    c.delete("Network", Some("demo"), "a", "")
        .await
        .expect("delete");
    assert!(
        c.api.store.get(&key).await.expect("read").is_none(),
        "freed"
    );
}

#[tokio::test]
async fn only_a_cluster_admin_makes_a_flat_or_external_network() {
    let c = Cloud::with_demo().await;
    let flat = network("f")
        .spec("segmentation", json!("flat"))
        .spec("physicalNetwork", json!("br-ex"));
    let e = refused(c.create(&flat).await);
    assert_eq!(e.code, 403);
    assert!(e.message.contains("spec.segmentation"), "{}", e.message);
    let e = refused(c.create(&network("x").spec("external", json!(true))).await);
    assert_eq!(e.code, 403);
    assert!(e.message.contains("spec.external"), "{}", e.message);
    c.create(&network("x")).await.expect("a tenant network");
    let e = refused(
        c.patch(
            &c.target("Network", Some("demo"), Some("x")),
            MERGE,
            &json!({"spec": {"external": true}}),
            "",
        )
        .await,
    );
    assert_eq!(e.code, 403, "{}", e.message);
    CLUSTER_ADMIN
        .scope(true, c.create(&flat.spec("external", json!(true))))
        .await
        .expect("the operator's uplink");
    c.patch(
        &c.target("Network", Some("demo"), Some("f")),
        MERGE,
        &json!({"spec": {"mtu": 1500}}),
        "",
    )
    .await
    .expect("what is already external stays writable by the project");
}

#[tokio::test]
async fn a_flat_network_names_a_physical_network_of_its_own() {
    CLUSTER_ADMIN.scope(true, flat_networks()).await;
}

async fn flat_networks() {
    let c = Cloud::with_demo().await;
    let flat = |name: &str| network(name).spec("segmentation", json!("flat"));
    let e = refused(c.create(&flat("f")).await);
    assert_eq!(field_of(&e), (422, "spec.physicalNetwork".into()));
    let e = refused(
        c.create(&network("v").spec("physicalNetwork", json!("eth1")))
            .await,
    );
    assert_eq!(field_of(&e), (422, "spec.physicalNetwork".into()));
    let f = c
        .create(&flat("f").spec("physicalNetwork", json!("eth1")))
        .await
        .expect("flat");
    assert!(f["status"].get("vni").is_none());
    let e = refused(
        c.create(&flat("g").spec("physicalNetwork", json!("eth1")))
            .await,
    );
    assert_eq!(field_of(&e), (409, "spec.physicalNetwork".into()));
    let e = refused(
        c.patch(
            &c.target("Network", Some("demo"), Some("f")),
            MERGE,
            &json!({"spec": {"physicalNetwork": "eth2"}}),
            "",
        )
        .await,
    );
    assert_eq!(field_of(&e), (422, "spec.physicalNetwork".into()));
    c.delete("Network", Some("demo"), "f", "")
        .await
        .expect("delete");
    c.create(&flat("g").spec("physicalNetwork", json!("eth1")))
        .await
        .expect("the physical network is free again");
}

#[tokio::test]
async fn a_subnet_is_checked_against_its_network() {
    let c = Cloud::with_demo().await;
    let e = refused(c.create(&subnet("s", "nope", "10.0.0.0/24")).await);
    assert_eq!(field_of(&e), (422, "spec.network".into()));
    c.create(&network("n")).await.expect("n");
    c.create(&network("m")).await.expect("m");
    for (cidr, extra, field) in [
        ("10.0.0.1/24", json!({}), "spec.cidr"),
        ("fd00::/64", json!({}), "spec.cidr"),
        ("10.0.0.0/15", json!({}), "spec.cidr"),
        (
            "10.0.0.0/24",
            json!({"gatewayIP": "10.0.1.1"}),
            "spec.gatewayIP",
        ),
        (
            "10.0.0.0/24",
            json!({"allocationPools": [{"start": "10.0.0.1", "end": "10.0.0.9"}]}),
            "spec.gatewayIP",
        ),
        (
            "10.0.0.0/24",
            json!({"allocationPools": [{"start": "10.0.0.9", "end": "10.0.0.5"}]}),
            "spec.allocationPools[0].end",
        ),
        (
            "10.0.0.0/24",
            json!({"allocationPools": [{"start": "10.0.0.5", "end": "10.0.1.5"}]}),
            "spec.allocationPools[0].end",
        ),
    ] {
        let mut s = subnet("bad", "n", cidr);
        if let (Some(spec), Some(e)) = (s.0["spec"].as_object_mut(), extra.as_object()) {
            spec.extend(e.clone());
        }
        let e = refused(c.create(&s).await);
        assert_eq!(field_of(&e), (422, field.into()), "{cidr} {extra}");
    }
    let s = c.create(&subnet("s", "n", "10.0.0.0/24")).await.expect("s");
    assert_eq!(s["status"]["gatewayIP"], "10.0.0.1");
    let n = c.get("Network", Some("demo"), "n").await.expect("n");
    assert_eq!(
        s["metadata"]["ownerReferences"],
        json!([{"apiVersion": "network.stratus.dev/v1", "kind": "Network", "name": "n", "uid": uid(&n)}]),
        "deleted with its network"
    );
    let e = refused(c.create(&subnet("t", "n", "10.0.0.128/25")).await);
    assert_eq!(field_of(&e), (422, "spec.cidr".into()));
    assert!(e.message.contains("overlaps subnet \"s\""), "{}", e.message);
    c.create(&subnet("t", "m", "10.0.0.0/24"))
        .await
        .expect("the same range on another network");
    let e = refused(
        c.patch(
            &c.target("Subnet", Some("demo"), Some("s")),
            MERGE,
            &json!({"spec": {"cidr": "10.0.1.0/24"}}),
            "",
        )
        .await,
    );
    assert_eq!(field_of(&e), (422, "spec.cidr".into()));
    let e = refused(
        c.patch(
            &c.target("Subnet", Some("demo"), Some("s")),
            MERGE,
            &json!({"spec": {"network": "m"}}),
            "",
        )
        .await,
    );
    assert_eq!(field_of(&e), (422, "spec.network".into()));
    let e = refused(
        c.patch(
            &c.status("Subnet", Some("demo"), "s"),
            MERGE,
            &json!({"status": {"gatewayIP": "10.0.0.9"}}),
            "",
        )
        .await,
    );
    assert_eq!(field_of(&e), (422, "status.gatewayIP".into()));
}

#[tokio::test]
async fn of_overlapping_subnets_created_at_once_exactly_one_is_stored() {
    let c = Cloud::with_demo().await;
    c.create(&network("n")).await.expect("n");
    let creates = (0..8).map(|i| {
        let c = &c;
        let cidr = if i % 2 == 0 {
            "10.1.0.0/16"
        } else {
            "10.1.7.0/24"
        };
        async move { c.create(&subnet(&format!("s{i}"), "n", cidr)).await }
    });
    let results = futures::future::join_all(creates).await;
    assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 1);
    for e in results.iter().filter_map(|r| r.as_ref().err()) {
        assert_eq!(field_of(e), (422, "spec.cidr".into()));
    }
}

#[tokio::test]
async fn a_port_has_its_mac_and_address_in_the_answer_to_its_create() {
    let (c, n) = with_subnet().await;
    c.create(&subnet("s2", "n", "192.168.0.0/24"))
        .await
        .expect("a second subnet");
    let p = c.create(&port("p", "n")).await.expect("port");
    assert_eq!(p["status"]["phase"], "Down");
    let mac = p["status"]["macAddress"].as_str().expect("a MAC");
    assert!(mac.starts_with("fa:16:3e:"), "{mac}");
    let got = ips(&p);
    assert_eq!(got.len(), 2, "one address from each subnet: {p}");
    assert!(
        got.iter().any(|a| a.starts_with("10.0.0."))
            && got.iter().any(|a| a.starts_with("192.168.0."))
    );
    assert!(!got.contains(&"10.0.0.1".to_string()), "never the gateway");
    let stored = c.get("Port", Some("demo"), "p").await.expect("p");
    assert_eq!(stored["status"], p["status"]);
    assert_eq!(claimed(&c, &uid(&n)).await, 2);
    c.delete("Port", Some("demo"), "p", "")
        .await
        .expect("delete");
    assert_eq!(claimed(&c, &uid(&n)).await, 0, "freed with the port");
}

#[tokio::test]
async fn a_port_asking_for_an_address_gets_it_or_a_refusal_naming_the_field() {
    let (c, _) = with_subnet().await;
    c.create(&network("m")).await.expect("m");
    c.create(&subnet("o", "m", "172.16.0.0/24"))
        .await
        .expect("o");
    let ask = |name: &str, fixed: Value| port(name, "n").spec("fixedIPs", fixed);
    let p = c
        .create(&ask("p", json!([{"ipAddress": "10.0.0.50"}])))
        .await
        .expect("p");
    assert_eq!(ips(&p), ["10.0.0.50"]);
    assert_eq!(p["status"]["fixedIPs"][0]["subnet"], "s");
    let cases = [
        (
            json!([{"subnet": "s"}, {"ipAddress": "10.0.0.50"}]),
            409,
            "spec.fixedIPs[1].ipAddress",
        ),
        (
            json!([{"ipAddress": "10.0.9.9"}]),
            422,
            "spec.fixedIPs[0].ipAddress",
        ),
        (
            json!([{"subnet": "s", "ipAddress": "10.0.0.255"}]),
            422,
            "spec.fixedIPs[0].ipAddress",
        ),
        (
            json!([{"ipAddress": "172.16.0.5"}]),
            422,
            "spec.fixedIPs[0].ipAddress",
        ),
        (json!([{"subnet": "o"}]), 422, "spec.fixedIPs[0].subnet"),
        (
            json!([{"subnet": "missing"}]),
            422,
            "spec.fixedIPs[0].subnet",
        ),
        (json!([{}]), 422, "spec.fixedIPs[0]"),
        (
            json!([{"ipAddress": "10.0.0.7"}, {"ipAddress": "10.0.0.7"}]),
            422,
            "spec.fixedIPs[1].ipAddress",
        ),
    ];
    for (fixed, code, field) in cases {
        let before = c.revision().await;
        let e = refused(c.create(&ask("q", fixed.clone())).await);
        assert_eq!(field_of(&e), (code, field.into()), "{fixed}: {}", e.message);
        assert_eq!(c.revision().await, before, "{fixed}: nothing written");
    }
    let e = refused(
        c.create(&port("q", "n").spec("macAddress", p["status"]["macAddress"].clone()))
            .await,
    );
    assert_eq!(field_of(&e), (409, "spec.macAddress".into()));
    let e = refused(c.create(&port("q", "nope")).await);
    assert_eq!(field_of(&e), (422, "spec.network".into()));
    let q = c
        .create(&ask("q", json!([{"subnet": "s"}])).spec("macAddress", json!("02:00:00:00:00:01")))
        .await
        .expect("a MAC asked for");
    assert_eq!(q["status"]["macAddress"], "02:00:00:00:00:01");
    c.delete("Port", Some("demo"), "p", "")
        .await
        .expect("delete p");
    c.create(&ask("r", json!([{"ipAddress": "10.0.0.50"}])))
        .await
        .expect("the address is free again");
}

#[tokio::test]
async fn no_port_takes_its_subnets_gateway_network_or_broadcast_address() {
    let (c, n) = with_subnet().await;
    let mut g = subnet("g", "n", "10.0.1.0/24");
    g.0["spec"]["gatewayIP"] = json!("10.0.1.254");
    c.create(&g).await.expect("a subnet with its gateway given");
    let ask = |fixed: Value| port("p", "n").spec("fixedIPs", fixed);
    let cases = [
        (
            json!([{"ipAddress": "10.0.0.1"}]),
            409,
            "spec.fixedIPs[0].ipAddress",
        ),
        (
            json!([{"subnet": "s"}, {"subnet": "g", "ipAddress": "10.0.1.254"}]),
            409,
            "spec.fixedIPs[1].ipAddress",
        ),
        (
            json!([{"ipAddress": "10.0.0.0"}]),
            422,
            "spec.fixedIPs[0].ipAddress",
        ),
        (
            json!([{"subnet": "s", "ipAddress": "10.0.0.0"}]),
            422,
            "spec.fixedIPs[0].ipAddress",
        ),
        (
            json!([{"ipAddress": "10.0.1.255"}]),
            422,
            "spec.fixedIPs[0].ipAddress",
        ),
    ];
    for (fixed, code, field) in cases {
        let before = c.revision().await;
        let e = refused(c.create(&ask(fixed.clone())).await);
        assert_eq!(field_of(&e), (code, field.into()), "{fixed}: {}", e.message);
        let why = if code == 409 {
            "the subnet's gateway address"
        } else if fixed.to_string().contains(".255") {
            "the broadcast address of subnet \"g\""
        } else {
            "the network address of subnet \"s\""
        };
        assert!(
            e.message.contains(why) || e.details.causes[0].message.contains(why),
            "{fixed}: {e:?}"
        );
        assert_eq!(c.revision().await, before, "{fixed}: nothing written");
    }
    // The gateway is claimed for its subnet (where a router interface will take it from) and
    // freed with the subnet.
    let held = claim_of(&c, &uid(&n), "10.0.1.254").await.expect("claimed");
    assert_eq!(
        (held["subnet"].as_str(), held["role"].as_str()),
        (Some("demo/g"), Some("gateway"))
    );
    c.delete("Subnet", Some("demo"), "g", "")
        .await
        .expect("delete g");
    assert_eq!(
        claim_of(&c, &uid(&n), "10.0.1.254").await,
        None,
        "freed with its subnet"
    );
    // A subnet whose gateway a port already holds (one that outlived an earlier subnet of the
    // range) is refused, naming the gateway.
    c.create(&ask(json!([{"subnet": "s", "ipAddress": "10.0.0.9"}])))
        .await
        .expect("p");
    c.delete("Port", Some("demo"), "p", "")
        .await
        .expect("p goes");
    let q = c
        .create(&port("q", "n").spec("fixedIPs", json!([{"ipAddress": "10.0.0.9"}])))
        .await
        .expect("q");
    assert_eq!(ips(&q), ["10.0.0.9"]);
    // As a subnet deleted before deletes were checked for ports on it (or with its project)
    // leaves them.
    let key = keys::object(
        "/registry",
        "network.stratus.dev",
        "subnets",
        Some("demo"),
        "s",
    );
    let at = c
        .api
        .store
        .get(&key)
        .await
        .expect("get")
        .expect("s")
        .mod_revision;
    c.api
        .store
        .delete(&key, at, &[])
        .await
        .expect("delete s from under its port");
    let mut again = subnet("s2", "n", "10.0.0.0/24");
    again.0["spec"]["gatewayIP"] = json!("10.0.0.9");
    let e = refused(c.create(&again).await);
    assert_eq!(
        field_of(&e),
        (409, "spec.gatewayIP".into()),
        "{}",
        e.message
    );
    assert!(e.message.contains("port demo/q"), "{}", e.message);
}

#[tokio::test]
async fn an_exhausted_subnet_is_409_until_a_port_goes() {
    let c = Cloud::with_demo().await;
    let n = c.create(&network("n")).await.expect("n");
    let mut s = subnet("s", "n", "10.0.0.0/24");
    s.0["spec"]["allocationPools"] = json!([
        {"start": "10.0.0.10", "end": "10.0.0.11"},
        {"start": "10.0.0.20", "end": "10.0.0.20"},
    ]);
    // No DHCP server, whose address would take one of the three.
    s.0["spec"]["enableDHCP"] = json!(false);
    c.create(&s).await.expect("subnet");
    let mut got = HashSet::new();
    for i in 0..3 {
        let p = c
            .create(&port(&format!("p{i}"), "n"))
            .await
            .expect("a port");
        got.extend(ips(&p));
    }
    let want: HashSet<String> = ["10.0.0.10", "10.0.0.11", "10.0.0.20"]
        .map(String::from)
        .into();
    assert_eq!(got, want);
    let e = refused(c.create(&port("p3", "n")).await);
    assert_eq!(field_of(&e), (409, "spec.fixedIPs".into()));
    assert!(e.message.contains("no free address"), "{}", e.message);
    assert_eq!(
        claimed(&c, &uid(&n)).await,
        3,
        "nothing claimed for the refused"
    );
    c.delete("Port", Some("demo"), "p1", "")
        .await
        .expect("free one");
    let p = c.create(&port("p3", "n")).await.expect("fits again");
    assert_eq!(ips(&p).len(), 1);
}

#[tokio::test]
async fn the_last_free_address_of_a_large_pool_is_found() {
    let c = Cloud::with_demo().await;
    c.create(&network("n")).await.expect("n");
    let mut s = subnet("s", "n", "10.0.0.0/24");
    s.0["spec"]["allocationPools"] = json!([{"start": "10.0.0.2", "end": "10.0.0.201"}]);
    s.0["spec"]["enableDHCP"] = json!(false);
    c.create(&s).await.expect("subnet");
    // Every address but the pool's first, asked for by value: a random probe looks from its
    // address on, so only reading the pool in order finds it (bar a 1 in 50 chance).
    for i in 3..=201 {
        c.create(
            &port(&format!("p{i}"), "n")
                .spec("fixedIPs", json!([{"ipAddress": format!("10.0.0.{i}")}])),
        )
        .await
        .expect("a port");
    }
    let last = c
        .create(&port("last", "n"))
        .await
        .expect("the last address");
    assert_eq!(ips(&last), ["10.0.0.2"]);
    let e = refused(c.create(&port("more", "n")).await);
    assert_eq!(field_of(&e), (409, "spec.fixedIPs".into()));
}

#[tokio::test]
async fn ports_created_at_once_never_share_an_address_or_a_mac() {
    let c = Cloud::with_demo().await;
    c.create(&network("n")).await.expect("n");
    let mut s = subnet("s", "n", "10.0.0.0/24");
    s.0["spec"]["allocationPools"] = json!([{"start": "10.0.0.100", "end": "10.0.0.119"}]);
    s.0["spec"]["enableDHCP"] = json!(false);
    c.create(&s).await.expect("subnet");
    let creates = (0..40).map(|i| {
        let c = &c;
        async move { c.create(&port(&format!("p{i}"), "n")).await }
    });
    let results = futures::future::join_all(creates).await;
    let ok: Vec<&Value> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
    assert_eq!(ok.len(), 20);
    for e in results.iter().filter_map(|r| r.as_ref().err()) {
        assert_eq!(e.code, 409, "{}", e.message);
        assert!(e.message.contains("no free address"), "{}", e.message);
    }
    let addresses: HashSet<String> = ok.iter().flat_map(|p| ips(p)).collect();
    let macs: HashSet<&str> = ok
        .iter()
        .filter_map(|p| p["status"]["macAddress"].as_str())
        .collect();
    assert_eq!((addresses.len(), macs.len()), (20, 20));
}

#[tokio::test]
async fn what_a_port_was_given_cannot_be_changed_by_a_write() {
    let (c, _) = with_subnet().await;
    let p = c.create(&port("p", "n")).await.expect("p");
    let t = c.target("Port", Some("demo"), Some("p"));
    // An address other than the one IPAM gave at random (a write of the same value would
    // change nothing and pass).
    let other = if ips(&p) == ["10.0.0.9"] {
        "10.0.0.10"
    } else {
        "10.0.0.9"
    };
    for (patch, field) in [
        (
            json!({"spec": {"fixedIPs": [{"ipAddress": other}]}}),
            "spec.fixedIPs",
        ),
        (
            json!({"spec": {"macAddress": "02:00:00:00:00:09"}}),
            "spec.macAddress",
        ),
        (json!({"spec": {"network": "m"}}), "spec.network"),
        (
            json!({"metadata": {"annotations": {"network.stratus.dev/network-uid": "other"}}}),
            "metadata.annotations[network.stratus.dev/network-uid]",
        ),
    ] {
        let e = refused(c.patch(&t, MERGE, &patch, "").await);
        assert_eq!(field_of(&e), (422, field.into()), "{patch}");
    }
    let status = c.status("Port", Some("demo"), "p");
    for (patch, field) in [
        (
            json!({"status": {"fixedIPs": [{"subnet": "s", "ipAddress": other}]}}),
            "status.fixedIPs",
        ),
        (
            json!({"status": {"macAddress": "02:00:00:00:00:09"}}),
            "status.macAddress",
        ),
    ] {
        let e = refused(c.patch(&status, MERGE, &patch, "").await);
        assert_eq!(field_of(&e), (422, field.into()), "{patch}");
    }
    c.patch(&status, MERGE, &json!({"status": {"phase": "Active"}}), "")
        .await
        .expect("the phase is the agent's");
    // A replace that leaves the annotation out keeps it (it names where the claims are).
    let mut replaced = c.get("Port", Some("demo"), "p").await.expect("p");
    replaced["metadata"]["annotations"] = json!({});
    replaced["spec"]["description"] = json!("web");
    let after = c.put(&t, &replaced).await.expect("replace");
    assert_eq!(
        after["metadata"]["annotations"]["network.stratus.dev/network-uid"],
        p["metadata"]["annotations"]["network.stratus.dev/network-uid"]
    );
    assert_eq!(after["status"]["fixedIPs"], p["status"]["fixedIPs"]);
}

#[tokio::test]
async fn a_network_made_again_under_the_same_name_inherits_no_claim() {
    let (c, old) = with_subnet().await;
    let p = c
        .create(&port("p", "n").spec("fixedIPs", json!([{"ipAddress": "10.0.0.5"}])))
        .await
        .expect("p");
    assert_eq!(ips(&p), ["10.0.0.5"]);
    let e = refused(c.delete("Network", Some("demo"), "n", "").await);
    assert_eq!(e.code, 409, "a port is on it: {}", e.message);
    c.delete("Port", Some("demo"), "p", "")
        .await
        .expect("delete p");
    c.delete("Network", Some("demo"), "n", "")
        .await
        .expect("delete n");
    let new = c.create(&network("n")).await.expect("n again");
    assert_ne!(uid(&old), uid(&new));
    let e = refused(
        c.create(&port("q", "n").spec("fixedIPs", json!([{"ipAddress": "10.0.0.5"}])))
            .await,
    );
    assert_eq!(
        field_of(&e),
        (422, "spec.fixedIPs[0].ipAddress".into()),
        "the old subnet is not the new network's"
    );
    c.create(&subnet("s2", "n", "10.0.0.0/24"))
        .await
        .expect("the range again, on the new network");
    let q = c
        .create(&port("q", "n").spec("fixedIPs", json!([{"ipAddress": "10.0.0.5"}])))
        .await
        .expect("the address is the new network's to give");
    assert_eq!(q["status"]["fixedIPs"][0]["subnet"], "s2");
}

#[tokio::test]
async fn quota_and_allocation_are_one_transaction() {
    let (c, n) = with_subnet().await;
    c.create(&Obj::quota("demo", "q", json!({"ports": 3})))
        .await
        .expect("quota");
    let creates = (0..10).map(|i| {
        let c = &c;
        async move { c.create(&port(&format!("p{i}"), "n")).await }
    });
    let results = futures::future::join_all(creates).await;
    assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 3);
    assert!(
        results
            .iter()
            .filter_map(|r| r.as_ref().err())
            .all(|e| e.code == 403),
        "the rest are over quota"
    );
    assert_eq!(
        claimed(&c, &uid(&n)).await,
        3,
        "no address claimed past the quota"
    );
    c.create(&Obj::quota("demo", "n", json!({"networks": 1})))
        .await
        .expect("a quota of networks");
    let e = refused(c.create(&network("m")).await);
    assert_eq!(e.code, 403, "{}", e.message);
}

#[tokio::test]
async fn a_quota_that_does_not_limit_ports_does_not_serialise_their_creates() {
    let (c, n) = with_subnet().await;
    c.create(&Obj::quota("demo", "q", json!({"servers": 1})))
        .await
        .expect("a quota of servers only");
    let creates = (0..100).map(|i| {
        let c = &c;
        async move { c.create(&port(&format!("p{i}"), "n")).await }
    });
    let results = futures::future::join_all(creates).await;
    let refused: Vec<&ApiError> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(refused.is_empty(), "{refused:?}");
    assert_eq!(claimed(&c, &uid(&n)).await, 100);
}

#[tokio::test]
async fn a_network_or_subnet_with_ports_on_it_stays_until_they_go() {
    let (c, n) = with_subnet().await;
    c.create(&subnet("s2", "n", "10.0.1.0/24"))
        .await
        .expect("s2");
    c.create(&subnet("idle", "n", "10.0.2.0/24"))
        .await
        .expect("idle");
    c.create(&port("p", "n").spec("fixedIPs", json!([{"subnet": "s"}])))
        .await
        .expect("p");
    c.create(&port("q", "n").spec("fixedIPs", json!([{"subnet": "s2"}])))
        .await
        .expect("q");
    for (kind, name, users) in [
        ("Subnet", "s", "(p)"),
        ("Subnet", "s2", "(q)"),
        ("Network", "n", "(p, q)"),
    ] {
        let before = c.revision().await;
        let e = refused(c.delete(kind, Some("demo"), name, "").await);
        assert_eq!(e.code, 409, "{kind} {name}: {}", e.message);

        assert!(e.message.contains(users), "{}", e.message);
        assert_eq!(c.revision().await, before, "{kind} {name}: nothing written");
        c.get(kind, Some("demo"), name).await.expect("still there");
    }
    c.delete("Subnet", Some("demo"), "idle", "")
        .await
        .expect("a subnet no port is on goes");
    c.delete("Port", Some("demo"), "q", "")
        .await
        .expect("q goes");
    c.delete("Subnet", Some("demo"), "s2", "")
        .await
        .expect("s2 goes once its port has");
    let e = refused(c.delete("Network", Some("demo"), "n", "").await);
    assert!(e.code == 409 && e.message.contains("(p)"), "{}", e.message);
    c.delete("Port", Some("demo"), "p", "")
        .await
        .expect("p goes");
    c.delete("Network", Some("demo"), "n", "")
        .await
        .expect("the network goes once its ports have");
    assert_eq!(claimed(&c, &uid(&n)).await, 0);
}

#[tokio::test]
async fn a_projects_deletion_takes_its_networks_with_ports_on_them() {
    let (c, _) = with_subnet().await;
    c.create(&port("p", "n")).await.expect("p");
    // The project controller's finalizer holds the Project while its namespace empties.
    c.patch(
        &c.target("Project", None, Some("demo")),
        MERGE,
        &json!({"metadata": {"finalizers": ["identity.stratus.dev/project-cleanup"]}}),
        "",
    )
    .await
    .expect("finalizer");
    let (code, _) = c
        .delete("Project", None, "demo", "")
        .await
        .expect("delete the project");
    assert_eq!(code, 202, "held by its finalizer");
    c.delete("Network", Some("demo"), "n", "")
        .await
        .expect("a network goes with its project, ports or not");
    c.delete("Subnet", Some("demo"), "s", "")
        .await
        .expect("and its subnet");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_port_created_as_its_network_is_deleted_never_outlives_it() {
    let c = Cloud::with_demo().await;
    for i in 0..200 {
        let net = format!("n{i}");
        c.create(&network(&net)).await.expect("network");
        c.create(&subnet(&format!("s{i}"), &net, "10.0.0.0/24"))
            .await
            .expect("subnet");
        let (a, b) = (Cloud { api: c.api.clone() }, Cloud { api: c.api.clone() });
        let p = port(&format!("p{i}"), &net);
        let created = tokio::spawn(async move { a.create(&p).await.is_ok() });
        let gone = net.clone();
        let deleted = tokio::spawn(async move {
            b.delete("Network", Some("demo"), &gone, "")
                .await
                .map_err(|e| (e.code, e.message))
        });
        let (created, deleted) = (
            created.await.expect("create"),
            deleted.await.expect("delete"),
        );
        assert!(
            !(created && deleted.is_ok()),
            "round {i}: a port was created on a network deleted at once"
        );
        if let Err((code, message)) = &deleted {
            assert_eq!(*code, 409, "{message}");
        }
    }
}

/// A Subnet serving DHCP claims its DHCP server's address at its create (the first free one of
/// its pools, in `status.dhcpIP`), as Neutron's DHCP port takes one: no Port gets it, asked
/// for or allocated, however many are created at once; a write cannot change it; deleting the
/// Subnet frees it. A Subnet without DHCP claims none.
#[tokio::test]
async fn a_subnets_dhcp_address_is_claimed_and_no_port_gets_it() {
    let c = Cloud::with_demo().await;
    let n = c.create(&network("n")).await.expect("n");
    let mut s = subnet("s", "n", "10.0.0.0/24");
    s.0["spec"]["allocationPools"] = json!([{"start": "10.0.0.100", "end": "10.0.0.119"}]);
    let stored = c.create(&s).await.expect("subnet");
    assert_eq!(stored["status"]["dhcpIP"], "10.0.0.100", "{stored}");
    let claim = claim_of(&c, &uid(&n), "10.0.0.100")
        .await
        .expect("the DHCP address is claimed");
    assert_eq!(claim["subnet"], "demo/s");
    assert_eq!(claim["role"], "DHCP server");

    let e = refused(
        c.create(&port("asks", "n").spec("fixedIPs", json!([{"ipAddress": "10.0.0.100"}])))
            .await,
    );
    assert_eq!(field_of(&e), (409, "spec.fixedIPs[0].ipAddress".into()));
    assert!(e.message.contains("DHCP server"), "{}", e.message);

    // 19 addresses left for ports: 30 creates at once, 19 pass, none with the server's.
    let creates = (0..30).map(|i| {
        let c = &c;
        async move { c.create(&port(&format!("p{i}"), "n")).await }
    });
    let results = futures::future::join_all(creates).await;
    let ok: Vec<&Value> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
    assert_eq!(ok.len(), 19);
    let addresses: HashSet<String> = ok.iter().flat_map(|p| ips(p)).collect();
    assert_eq!(addresses.len(), 19);
    assert!(!addresses.contains("10.0.0.100"), "{addresses:?}");

    let e = refused(
        c.patch(
            &c.status("Subnet", Some("demo"), "s"),
            MERGE,
            &json!({"status": {"dhcpIP": "10.0.0.101"}}),
            "",
        )
        .await,
    );
    assert_eq!(field_of(&e), (422, "status.dhcpIP".into()));

    for i in 0..30 {
        let _ = c.delete("Port", Some("demo"), &format!("p{i}"), "").await;
    }
    c.delete("Subnet", Some("demo"), "s", "")
        .await
        .expect("delete the subnet");
    assert!(
        claim_of(&c, &uid(&n), "10.0.0.100").await.is_none(),
        "freed with its subnet"
    );

    let mut off = subnet("off", "n", "10.1.0.0/24");
    off.0["spec"]["enableDHCP"] = json!(false);
    let stored = c.create(&off).await.expect("subnet without DHCP");
    assert!(stored["status"]["dhcpIP"].is_null(), "{stored}");
}

/// The DHCP server claims of the network of uid `uid`.
async fn dhcp_claims(c: &Cloud, uid: &str) -> Vec<Value> {
    claims(c, uid)
        .await
        .into_iter()
        .filter(|claim| claim["role"] == "DHCP server")
        .collect()
}

/// DHCP turned on by an update claims the server's address then, as a create does: the first
/// free address of the pools (not one a port holds), in `status.dhcpIP`; off and on again keeps
/// it; concurrent updates claim one; no free address is 409 naming `spec.enableDHCP`, with the
/// Subnet left as it was.
#[tokio::test]
async fn dhcp_enabled_by_an_update_claims_the_servers_address() {
    let c = Cloud::with_demo().await;
    let n = c.create(&network("n")).await.expect("n");
    let subnet_off = |name: &str, cidr: &str, start: &str, end: &str| {
        let mut s = subnet(name, "n", cidr);
        s.0["spec"]["enableDHCP"] = json!(false);
        s.0["spec"]["allocationPools"] = json!([{"start": start, "end": end}]);
        s
    };
    c.create(&subnet_off("late", "10.2.0.0/24", "10.2.0.10", "10.2.0.12"))
        .await
        .expect("subnet");
    c.create(&port("first", "n").spec("fixedIPs", json!([{"ipAddress": "10.2.0.10"}])))
        .await
        .expect("port");
    let target = c.target("Subnet", Some("demo"), Some("late"));
    let dhcp = |on: bool| json!({"spec": {"enableDHCP": on}});
    let (_, stored) = c.patch(&target, MERGE, &dhcp(true), "").await.expect("on");
    assert_eq!(stored["status"]["dhcpIP"], "10.2.0.11", "{stored}");
    let claim = claim_of(&c, &uid(&n), "10.2.0.11").await.expect("claimed");
    assert_eq!(
        (&claim["subnet"], &claim["role"]),
        (&json!("demo/late"), &json!("DHCP server"))
    );
    // No port gets it.
    let e = refused(
        c.create(&port("asks", "n").spec("fixedIPs", json!([{"ipAddress": "10.2.0.11"}])))
            .await,
    );
    assert_eq!(field_of(&e), (409, "spec.fixedIPs[0].ipAddress".into()));
    // Off and on again: the same address, still one claim.
    c.patch(&target, MERGE, &dhcp(false), "")
        .await
        .expect("off");
    let (_, stored) = c.patch(&target, MERGE, &dhcp(true), "").await.expect("on");
    assert_eq!(stored["status"]["dhcpIP"], "10.2.0.11", "{stored}");
    assert_eq!(dhcp_claims(&c, &uid(&n)).await.len(), 1);

    // Two updates turning it on at once: one address claimed, the one the Subnet says.
    c.create(&subnet_off("both", "10.3.0.0/24", "10.3.0.10", "10.3.0.20"))
        .await
        .expect("subnet");
    let both = c.target("Subnet", Some("demo"), Some("both"));
    let on = [
        json!({"spec": {"enableDHCP": true}}),
        json!({"spec": {"enableDHCP": true, "description": "dhcp"}}),
    ];
    let results = futures::future::join_all(on.iter().map(|p| c.patch(&both, MERGE, p, ""))).await;
    for r in &results {
        if let Err(e) = r {
            assert_eq!(e.code, 409, "{e:?}");
        }
    }
    let stored = c.get("Subnet", Some("demo"), "both").await.expect("get");
    let claims: Vec<_> = dhcp_claims(&c, &uid(&n))
        .await
        .into_iter()
        .filter(|v| v["subnet"] == "demo/both")
        .collect();
    assert_eq!(claims.len(), 1, "{claims:?}");
    assert_eq!(stored["status"]["dhcpIP"], "10.3.0.10", "{stored}");

    // A pool with no free address: 409 on the field, and nothing changed.
    c.create(&subnet_off("full", "10.4.0.0/24", "10.4.0.10", "10.4.0.10"))
        .await
        .expect("subnet");
    c.create(&port("last", "n").spec("fixedIPs", json!([{"ipAddress": "10.4.0.10"}])))
        .await
        .expect("port");
    let full = c.target("Subnet", Some("demo"), Some("full"));
    let e = refused(c.patch(&full, MERGE, &dhcp(true), "").await);
    assert_eq!(field_of(&e), (409, "spec.enableDHCP".into()));
    let stored = c.get("Subnet", Some("demo"), "full").await.expect("get");
    assert_eq!(stored["spec"]["enableDHCP"], false, "{stored}");
    assert!(stored["status"]["dhcpIP"].is_null(), "{stored}");
}

#[tokio::test]
async fn a_vlan_network_holds_a_vlan_id_of_its_physical_network() {
    let c = Cloud::with_demo().await;
    let vlan = |name: &str| {
        network(name)
            .spec("segmentation", json!("vlan"))
            .spec("physicalNetwork", json!("physnet1"))
    };
    let e = refused(c.create(&vlan("t")).await);
    assert_eq!(e.code, 403, "a tenant makes no provider network: {e:?}");
    assert!(e.message.contains("spec.segmentation"), "{}", e.message);
    CLUSTER_ADMIN.scope(true, vlan_networks(c, vlan)).await;
}

async fn vlan_networks(c: Cloud, vlan: impl Fn(&str) -> Obj) {
    let vlan_id = |n: &Value| n["status"]["segmentationID"].as_u64();
    let e = refused(
        c.create(&network("v").spec("segmentation", json!("vlan")))
            .await,
    );
    assert_eq!(field_of(&e), (422, "spec.physicalNetwork".into()));
    for (id, why) in [(0, "below 1"), (4095, "reserved"), (5000, "above 4094")] {
        let e = refused(c.create(&vlan("v").spec("segmentationID", json!(id))).await);
        assert_eq!(field_of(&e), (422, "spec.segmentationID".into()), "{why}");
    }
    let e = refused(
        c.create(&network("x").spec("segmentationID", json!(7)))
            .await,
    );
    assert_eq!(field_of(&e), (422, "spec.segmentationID".into()), "vxlan");
    let a = c
        .create(&vlan("a").spec("segmentationID", json!(100)))
        .await
        .expect("a requested VLAN ID");
    assert_eq!(vlan_id(&a), Some(100));
    assert!(
        a["status"].get("vni").is_none(),
        "a vlan network has no VNI"
    );
    let e = refused(
        c.create(&vlan("b").spec("segmentationID", json!(100)))
            .await,
    );
    assert_eq!(field_of(&e), (409, "spec.segmentationID".into()));
    assert!(
        e.message.contains("demo/a"),
        "names who holds it: {}",
        e.message
    );
    let other = c
        .create(
            &vlan("o")
                .spec("physicalNetwork", json!("physnet2"))
                .spec("segmentationID", json!(100)),
        )
        .await
        .expect("the same ID on another physical network");
    assert_eq!(vlan_id(&other), Some(100));
    // Allocated: the lowest free ones, never one held.
    c.create(&vlan("r").spec("segmentationID", json!(1)))
        .await
        .expect("VLAN 1");
    let b = c.create(&vlan("b")).await.expect("an allocated VLAN ID");
    assert_eq!(vlan_id(&b), Some(2));
    let e = refused(
        c.patch(
            &c.target("Network", Some("demo"), Some("a")),
            MERGE,
            &json!({"spec": {"segmentationID": 200}}),
            "",
        )
        .await,
    );
    assert_eq!(field_of(&e), (422, "spec.segmentationID".into()));
    c.delete("Network", Some("demo"), "a", "")
        .await
        .expect("delete");
    let again = c
        .create(&vlan("c").spec("segmentationID", json!(100)))
        .await
        .expect("the VLAN ID is free again once its network is gone");
    assert_eq!(vlan_id(&again), Some(100));
}
