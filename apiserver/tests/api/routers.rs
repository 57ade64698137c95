//! Routers and floating IPs at admission: a floating IP's address allocated from its external
//! network in its create's transaction and freed with its delete; a Router's spec checked
//! against what it names; a subnet's gateway taken only by a Router's interface Port made by
//! a trusted identity.

use std::collections::HashSet;

use serde_json::{Value, json};
use stratus_apiserver::admission::CLUSTER_ADMIN;
use stratus_apiserver::admission::network::{ROUTER_GATEWAY, gateway_port_claim};
use stratus_apiserver::base::error::ApiError;
use stratus_apiserver::storage::keys;

use crate::fixtures::{Cloud, JSON, JSON_PATCH, MERGE, Obj, refused};

const V1: &str = "network.stratus.dev/v1";

fn obj(kind: &str, ns: &str, name: &str, spec: Value) -> Obj {
    Obj(json!({"apiVersion": V1, "kind": kind,
        "metadata": {"name": name, "namespace": ns}, "spec": spec}))
}

fn fip(name: &str, network: &str) -> Obj {
    obj(
        "FloatingIP",
        "demo",
        name,
        json!({"floatingNetwork": network}),
    )
}

fn router(name: &str, spec: Value) -> Obj {
    obj("Router", "demo", name, spec)
}

/// The code of a refusal and the fields it names.
fn fields(e: &ApiError) -> (u16, Vec<String>) {
    (
        e.code,
        e.details.causes.iter().map(|c| c.field.clone()).collect(),
    )
}

async fn as_admin<T>(f: impl std::future::Future<Output = T>) -> T {
    CLUSTER_ADMIN.scope(true, f).await
}

/// Project `demo` and project `ops` holding the external network `ext` (admin-made) with a
/// subnet of `pool` addresses from 203.0.113.10 on.
async fn with_external(pool: u8) -> (Cloud, Value) {
    let c = Cloud::with_demo().await;
    c.create(&Obj::project("ops")).await.expect("project ops");
    let ext = as_admin(c.create(&obj(
        "Network",
        "ops",
        "ext",
        json!({"external": true, "segmentation": "flat", "physicalNetwork": "physnet1"}),
    )))
    .await
    .expect("external network");
    let last = 10 + pool - 1;
    as_admin(c.create(&obj(
        "Subnet",
        "ops",
        "ext-v4",
        json!({"network": "ext", "cidr": "203.0.113.0/24", "gatewayIP": "203.0.113.1",
               "enableDHCP": false,
               "allocationPools": [{"start": "203.0.113.10", "end": format!("203.0.113.{last}")}]}),
    )))
    .await
    .expect("external subnet");
    (c, ext)
}

fn address(f: &Value) -> String {
    f["status"]["floatingIPAddress"]
        .as_str()
        .unwrap_or_else(|| panic!("no address: {f}"))
        .to_string()
}

#[tokio::test]
async fn a_floating_ip_has_its_address_at_once_until_the_network_is_full() {
    let (c, ext) = with_external(3).await;
    let uid = ext["metadata"]["uid"].as_str().expect("uid");
    let mut got = HashSet::new();
    for i in 0..3 {
        let f = c
            .create(&fip(&format!("f{i}"), "ops/ext"))
            .await
            .expect("a floating IP");
        assert_eq!(f["status"]["phase"], "Down", "{f}");
        let a = address(&f);
        assert!(
            ["203.0.113.10", "203.0.113.11", "203.0.113.12"].contains(&a.as_str()),
            "{a}"
        );
        got.insert(a.clone());
        let claim = c
            .api
            .store
            .get(&keys::ip_claim("/registry", uid, a.parse().expect("ip")))
            .await
            .expect("read")
            .expect("claimed");
        assert_eq!(claim.value["floatingip"], format!("demo/f{i}"));
    }
    assert_eq!(got.len(), 3, "no address twice");
    let e = refused(c.create(&fip("f3", "ops/ext")).await);
    assert_eq!(fields(&e), (409, vec!["spec.floatingNetwork".to_string()]));
    assert!(e.message.contains("no free address"), "{}", e.message);
    // A Port on the external network cannot take an address a floating IP holds.
    let f0 = c.get("FloatingIP", Some("demo"), "f0").await.expect("f0");
    let e = refused(
        as_admin(c.create(&obj(
            "Port",
            "ops",
            "p",
            json!({"network": "ext", "fixedIPs": [{"ipAddress": address(&f0)}]}),
        )))
        .await,
    );
    assert_eq!(
        fields(&e),
        (409, vec!["spec.fixedIPs[0].ipAddress".to_string()])
    );
    assert!(e.message.contains("floatingip demo/f0"), "{}", e.message);
    // Its address and network are its create's.
    let e = refused(
        c.patch(
            &c.status("FloatingIP", Some("demo"), "f0"),
            MERGE,
            &json!({"status": {"floatingIPAddress": "203.0.113.99"}}),
            "",
        )
        .await,
    );
    assert_eq!(
        fields(&e),
        (422, vec!["status.floatingIPAddress".to_string()])
    );
    // The external network and its subnet stay while floating IPs hold their addresses.
    for (kind, name) in [("Subnet", "ext-v4"), ("Network", "ext")] {
        let e = refused(as_admin(c.delete(kind, Some("ops"), name, "")).await);
        assert_eq!(e.code, 409, "{}", e.message);
        assert!(e.message.contains("floating IP demo/f0"), "{}", e.message);
    }
    c.delete("FloatingIP", Some("demo"), "f0", "")
        .await
        .expect("delete");
    let again = c
        .create(&fip("f4", "ops/ext"))
        .await
        .expect("the freed address");
    assert_eq!(address(&again), address(&f0));
}

#[tokio::test]
async fn a_floating_ip_comes_only_from_an_external_network() {
    let (c, _) = with_external(3).await;
    c.create(&obj("Network", "demo", "tenant", json!({})))
        .await
        .expect("tenant network");
    c.create(&obj(
        "Subnet",
        "demo",
        "tenant-v4",
        json!({"network": "tenant", "cidr": "10.0.0.0/24"}),
    ))
    .await
    .expect("subnet");
    let e = refused(c.create(&fip("f", "tenant")).await);
    assert_eq!(fields(&e), (422, vec!["spec.floatingNetwork".to_string()]));
    assert!(e.message.contains("not external"), "{}", e.message);
    let e = refused(c.create(&fip("f", "ops/nothing")).await);
    assert_eq!(fields(&e), (422, vec!["spec.floatingNetwork".to_string()]));
    assert_eq!(e.details.causes[0].reason, "FieldValueNotFound");
    let e = refused(c.create(&fip("f", "Ops/ext; rm -rf /")).await);
    assert_eq!(e.code, 422, "{}", e.message);
    assert!(
        c.get("FloatingIP", Some("demo"), "f").await.is_err(),
        "nothing stored"
    );
}

#[tokio::test]
async fn floating_ips_created_at_once_never_share_an_address() {
    let (c, _) = with_external(10).await;
    let creates = (0..20).map(|i| {
        let c = &c;
        async move { c.create(&fip(&format!("f{i}"), "ops/ext")).await }
    });
    let results = futures::future::join_all(creates).await;
    let ok: Vec<String> = results
        .iter()
        .filter_map(|r| r.as_ref().ok())
        .map(address)
        .collect();
    assert_eq!(ok.len(), 10);
    assert_eq!(ok.iter().collect::<HashSet<_>>().len(), 10, "{ok:?}");
    for e in results.iter().filter_map(|r| r.as_ref().err()) {
        assert_eq!(e.code, 409, "{}", e.message);
    }
}

/// Project `demo` with networks `a` (subnet `a4`, 10.0.0.0/24) and `b` (subnets `b4`,
/// 10.0.1.0/24, and `b5`, 10.0.2.0/24), and `ops/ext`.
async fn with_tenant() -> Cloud {
    let (c, _) = with_external(3).await;
    for (net, subnets) in [
        ("a", vec![("a4", "10.0.0.0/24")]),
        ("b", vec![("b4", "10.0.1.0/24"), ("b5", "10.0.2.0/24")]),
        ("c", vec![("c4", "10.0.0.128/25")]),
    ] {
        c.create(&obj("Network", "demo", net, json!({})))
            .await
            .expect("network");
        for (name, cidr) in subnets {
            c.create(&obj(
                "Subnet",
                "demo",
                name,
                json!({"network": net, "cidr": cidr}),
            ))
            .await
            .expect("subnet");
        }
    }
    c
}

#[tokio::test]
async fn a_router_names_subnets_and_networks_it_can_use() {
    let c = with_tenant().await;
    let iface = |s: &str| json!({"subnet": s});
    let cases = [
        (
            json!({"interfaces": [iface("a4"), iface("missing")]}),
            "spec.interfaces[1].subnet",
        ),
        (
            json!({"interfaces": [iface("b4"), iface("b5")]}),
            "spec.interfaces[1].subnet",
        ),
        (
            json!({"interfaces": [iface("a4"), iface("c4")]}),
            "spec.interfaces[1].subnet",
        ),
        (
            json!({"interfaces": [iface("a4"), iface("a4")]}),
            "spec.interfaces[1]",
        ),
        (
            json!({"interfaces": [iface("a4")], "externalGateway": {"network": "b"}}),
            "spec.externalGateway.network",
        ),
        (
            json!({"interfaces": [iface("a4")], "externalGateway": {"network": "ops/none"}}),
            "spec.externalGateway.network",
        ),
        (
            json!({"interfaces": [iface("a4")],
                   "routes": [{"destination": "192.168.0.0/16", "nexthop": "10.9.0.1"}]}),
            "spec.routes[0].nexthop",
        ),
        (
            json!({"interfaces": [iface("a4")],
                   "routes": [{"destination": "192.168.0.1/16", "nexthop": "10.0.0.5"}]}),
            "spec.routes[0].destination",
        ),
    ];
    for (spec, field) in cases {
        let e = refused(c.create(&router("r", spec.clone())).await);
        assert_eq!(
            fields(&e),
            (422, vec![field.to_string()]),
            "{spec}: {}",
            e.message
        );
    }
    assert!(
        c.get("Router", Some("demo"), "r").await.is_err(),
        "nothing stored"
    );
    let ok = c
        .create(&router(
            "r",
            json!({"interfaces": [iface("a4"), iface("b4")],
                   "externalGateway": {"network": "ops/ext"},
                   "routes": [{"destination": "192.168.0.0/16", "nexthop": "10.0.1.7"},
                              {"destination": "198.51.100.0/24", "nexthop": "203.0.113.1"}]}),
        ))
        .await
        .expect("a router of two subnets with a gateway");
    assert_eq!(ok["status"]["phase"], "Pending");
    let e = refused(
        c.patch(
            &c.target("Router", Some("demo"), Some("r")),
            MERGE,
            &json!({"spec": {"interfaces": [{"subnet": "a4"}, {"subnet": "c4"}]}}),
            "",
        )
        .await,
    );
    assert_eq!(
        fields(&e),
        (
            422,
            vec![
                "spec.interfaces[1].subnet".to_string(),
                "spec.routes[0].nexthop".to_string()
            ]
        ),
        "the interface overlaps, and the route's next hop was on the subnet it drops"
    );
}

#[tokio::test]
async fn a_route_out_by_the_external_network_goes_through_its_gateway_only() {
    let c = with_tenant().await;
    // Another project's router, or anyone's, may hold any other address there: a route
    // through 203.0.113.10 would carry this project's traffic into what is not its own.
    let spec = |hop: &str| {
        json!({"interfaces": [{"subnet": "a4"}], "externalGateway": {"network": "ops/ext"},
               "routes": [{"destination": "10.20.0.0/24", "nexthop": hop}]})
    };
    for hop in ["203.0.113.10", "203.0.113.200"] {
        let e = refused(c.create(&router("r", spec(hop))).await);
        assert_eq!(
            fields(&e),
            (422, vec!["spec.routes[0].nexthop".to_string()]),
            "{hop}: {}",
            e.message
        );
        assert!(
            e.message.contains(hop) && e.message.contains("203.0.113.1 (the upstream router)"),
            "{}",
            e.message
        );
    }
    assert!(
        c.get("Router", Some("demo"), "r").await.is_err(),
        "nothing stored"
    );
    c.create(&router("r", spec("203.0.113.1")))
        .await
        .expect("a route through the external network's gateway");
    // Nor can an update point a route at another address there.
    let e = refused(
        c.patch(
            &c.target("Router", Some("demo"), Some("r")),
            MERGE,
            &json!({"spec": {"routes": [{"destination": "10.20.0.0/24",
                                         "nexthop": "203.0.113.11"}]}}),
            "",
        )
        .await,
    );
    assert_eq!(
        fields(&e),
        (422, vec!["spec.routes[0].nexthop".to_string()]),
        "{}",
        e.message
    );
    let stored = c.get("Router", Some("demo"), "r").await.expect("router");
    assert_eq!(stored["spec"]["routes"][0]["nexthop"], "203.0.113.1");
}

/// A router interface Port of `router` (name, uid) on subnet `subnet` of network `net`,
/// asking for `ip`.
fn interface_port(name: &str, router: &Value, net: &str, subnet: &str, ip: &str) -> Obj {
    let mut p = obj(
        "Port",
        "demo",
        name,
        json!({"network": net, "fixedIPs": [{"subnet": subnet, "ipAddress": ip}],
               "portSecurityEnabled": false}),
    );
    p.0["metadata"]["ownerReferences"] = json!([{
        "apiVersion": V1, "kind": "Router",
        "name": router["metadata"]["name"], "uid": router["metadata"]["uid"],
        "controller": true,
    }]);
    p
}

#[tokio::test]
async fn only_a_routers_interface_made_by_the_system_takes_a_subnets_gateway() {
    let c = with_tenant().await;
    let r = c
        .create(&router("r", json!({"interfaces": [{"subnet": "a4"}]})))
        .await
        .expect("router");
    let a = c.get("Network", Some("demo"), "a").await.expect("a");
    let uid = a["metadata"]["uid"].as_str().expect("uid");
    // A tenant's Port, even one claiming to be the router's, and carrying the annotation.
    let mut forged = interface_port("p", &r, "a", "a4", "10.0.0.1");
    forged.0["metadata"]["annotations"] = json!({ROUTER_GATEWAY: "10.0.0.1"});
    let e = refused(c.create(&forged).await);
    assert_eq!(
        fields(&e),
        (409, vec!["spec.fixedIPs[0].ipAddress".to_string()])
    );
    assert!(e.message.contains("gateway"), "{}", e.message);
    // The system, for a subnet the router has no interface on.
    let e = refused(as_admin(c.create(&interface_port("p", &r, "b", "b4", "10.0.1.1"))).await);
    assert_eq!(e.code, 409, "{}", e.message);
    // The system, for the router's interface: it takes the gateway.
    let p = as_admin(c.create(&interface_port("rif-a4", &r, "a", "a4", "10.0.0.1")))
        .await
        .expect("the router's interface");
    assert_eq!(p["status"]["fixedIPs"][0]["ipAddress"], "10.0.0.1");
    assert_eq!(p["metadata"]["annotations"][ROUTER_GATEWAY], "10.0.0.1");
    let ip: std::net::Ipv4Addr = "10.0.0.1".parse().expect("ip");
    let read = |k: String| {
        let c = &c;
        async move { c.api.store.get(&k).await.expect("read").map(|s| s.value) }
    };
    assert!(
        read(gateway_port_claim("/registry", uid, ip))
            .await
            .is_some()
    );
    // Only one interface per gateway.
    let e = refused(as_admin(c.create(&interface_port("rif-2", &r, "a", "a4", "10.0.0.1"))).await);
    assert_eq!(
        fields(&e),
        (409, vec!["spec.fixedIPs[0].ipAddress".to_string()])
    );
    // A tenant's Port created plainly never carries the annotation, nor gets it later.
    let t = c
        .create(&{
            let mut t = obj("Port", "demo", "t", json!({"network": "a"}));
            t.0["metadata"]["annotations"] = json!({ROUTER_GATEWAY: "10.0.0.1"});
            t
        })
        .await
        .expect("a tenant port");
    assert!(
        t["metadata"]["annotations"].get(ROUTER_GATEWAY).is_none(),
        "{t}"
    );
    let e = refused(
        c.patch(
            &c.target("Port", Some("demo"), Some("t")),
            MERGE,
            &json!({"metadata": {"annotations": {ROUTER_GATEWAY: "10.0.0.1"}}}),
            "",
        )
        .await,
    );
    assert_eq!(e.code, 422, "{}", e.message);
    // The subnet stays while its router interface does (Neutron's 409).
    let e = refused(c.delete("Subnet", Some("demo"), "a4", "").await);
    assert_eq!(e.code, 409, "{}", e.message);
    assert!(e.message.contains("rif-a4"), "{}", e.message);
    // The interface's delete frees its own claim, not the subnet's gateway.
    c.delete("Port", Some("demo"), "rif-a4", "")
        .await
        .expect("delete");
    assert!(
        read(gateway_port_claim("/registry", uid, ip))
            .await
            .is_none()
    );
    let gw = read(keys::ip_claim("/registry", uid, ip))
        .await
        .expect("the subnet's gateway claim stays");
    assert_eq!(gw["role"], "gateway");
    as_admin(c.create(&interface_port("rif-a4", &r, "a", "a4", "10.0.0.1")))
        .await
        .expect("taken again");
}

#[tokio::test]
async fn a_node_reads_and_writes_only_its_own_routers_and_their_floating_ips() {
    let c = with_tenant().await;
    c.create(&router(
        "r",
        json!({"interfaces": [{"subnet": "a4"}], "externalGateway": {"network": "ops/ext"}}),
    ))
    .await
    .expect("router");
    c.patch(
        &c.status("Router", Some("demo"), "r"),
        MERGE,
        &json!({"status": {"node": "a"}}),
        "",
    )
    .await
    .expect("placed on a");
    c.create(&fip("f", "ops/ext")).await.expect("fip");
    c.patch(
        &c.status("FloatingIP", Some("demo"), "f"),
        MERGE,
        &json!({"status": {"router": "r", "fixedIP": "10.0.0.5"}}),
        "",
    )
    .await
    .expect("associated through r");
    let (a, b) = (c.node("a"), c.node("b"));
    let r = c.target("Router", Some("demo"), Some("r"));
    let routers = c.target("Router", None, None);
    let f = c.target("FloatingIP", Some("demo"), Some("f"));
    let fips = c.target("FloatingIP", Some("demo"), None);
    a.read(&r, "").await.expect("a reads its router");
    a.read(&routers, "fieldSelector=status.node%3Da")
        .await
        .expect("a lists its routers");
    a.read(&f, "")
        .await
        .expect("a reads its router's floating IP");
    a.read(&fips, "fieldSelector=status.router%3Dr")
        .await
        .expect("a lists its router's floating IPs");
    for (who, t, q) in [
        (&a, &routers, ""),
        (&b, &r, ""),
        (&b, &routers, "fieldSelector=status.node%3Da"),
        (&b, &f, ""),
        (&b, &fips, "fieldSelector=status.router%3Dr"),
        (&a, &fips, ""),
    ] {
        assert_eq!(refused(who.read(t, q).await).code, 403, "{q}");
    }
    let phase = json!({"status": {"phase": "Active"}}).to_string();
    let (rs, fs) = (
        c.status("Router", Some("demo"), "r"),
        c.status("FloatingIP", Some("demo"), "f"),
    );
    for (t, kind, name) in [(&rs, "Router", "r"), (&fs, "FloatingIP", "f")] {
        let before = c.get(kind, Some("demo"), name).await.expect("stored");
        let e = refused(b.patch(t, MERGE, &phase).await);
        assert_eq!(e.code, 403, "{}", e.message);
        assert_eq!(
            c.get(kind, Some("demo"), name).await.expect("stored"),
            before
        );
    }
    for (t, body) in [
        (&rs, json!({"status": {"node": "b"}})),
        (
            &rs,
            json!({"status": {"externalGatewayIPs": ["203.0.113.50"]}}),
        ),
        (&fs, json!({"status": {"router": "other"}})),
        (&fs, json!({"status": {"fixedIP": "10.0.0.9"}})),
    ] {
        let e = refused(a.patch(t, MERGE, &body.to_string()).await);
        assert_eq!(e.code, 403, "{body}: {}", e.message);
    }
    a.patch(&rs, MERGE, &phase)
        .await
        .expect("a writes its router's phase");
    a.patch(&fs, MERGE, &phase)
        .await
        .expect("and its floating IP's");
    let e = refused(
        a.patch(&r, MERGE, &json!({"spec": {"interfaces": []}}).to_string())
            .await,
    );
    assert_eq!(e.code, 403, "{}", e.message);
}

#[tokio::test]
async fn a_node_writes_its_own_network_agent_lease_and_reads_every_one() {
    use stratus_api_types::network::NETWORK_AGENT_LEASE_NAMESPACE as NS;
    let c = Cloud::new().await;
    let lease = |name: &str| {
        json!({
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": name, "namespace": NS,
                         "annotations": {"network.stratus.dev/tunnel-ip": "192.0.2.1"}},
            "spec": {"holderIdentity": name, "leaseDurationSeconds": 40,
                     "renewTime": "2030-01-01T00:00:00.000000Z"},
        })
        .to_string()
    };
    let (a, b) = (c.node("a"), c.node("b"));
    let leases = c.target("Lease", Some(NS), None);
    a.create(&leases, JSON, &lease("a")).await.expect("a's own");
    b.create(&leases, JSON, &lease("b")).await.expect("b's own");
    let e = refused(a.create(&leases, JSON, &lease("c")).await);
    assert_eq!(e.code, 403, "{}", e.message);
    let lease_b = c.target("Lease", Some(NS), Some("b"));
    let before = c.get("Lease", Some(NS), "b").await.expect("b");
    let e = refused(
        a.patch(
            &lease_b,
            MERGE,
            &json!({"spec": {"renewTime": "2000-01-01T00:00:00.000000Z"}}).to_string(),
        )
        .await,
    );
    assert_eq!(e.code, 403, "{}", e.message);
    assert_eq!(refused(a.delete(&lease_b, "").await).code, 403);
    assert_eq!(c.get("Lease", Some(NS), "b").await.expect("b"), before);
    let read = a.read(&lease_b, "").await.expect("a reads b's");
    assert_eq!(read["spec"]["holderIdentity"], "b");
    let all = a.read(&leases, "").await.expect("a lists them");
    assert_eq!(all["items"].as_array().map(Vec::len), Some(2));
    // Not the compute agents' leases of other nodes, nor any lease elsewhere.
    let e = refused(
        a.read(&c.target("Lease", Some("kube-node-lease"), Some("b")), "")
            .await,
    );
    assert_eq!(e.code, 403);
    let e = refused(
        a.read(&c.target("Lease", Some("stratus-system"), None), "")
            .await,
    );
    assert_eq!(e.code, 403);
}

/// Another project's private network and a network that does not exist get the same answer,
/// for a floating IP and for a router's gateway: a tenant cannot probe which private networks
/// other projects have.
#[tokio::test]
async fn another_projects_private_network_is_answered_as_missing() {
    let (c, _) = with_external(3).await;
    c.create(&obj("Network", "ops", "private", json!({})))
        .await
        .expect("a private network of ops");
    let same = |e: &ApiError, reference: &str| {
        let c = &e.details.causes[0];
        (
            e.code,
            c.reason.clone(),
            c.field.clone(),
            c.message.replace(reference, "REF"),
            e.message.replace(reference, "REF"),
        )
    };
    let private = refused(c.create(&fip("f", "ops/private")).await);
    let missing = refused(c.create(&fip("f", "ops/absent")).await);
    assert_eq!(same(&private, "ops/private"), same(&missing, "ops/absent"));
    assert_eq!(private.details.causes[0].reason, "FieldValueNotFound");
    let gateway = |network: &str| {
        router(
            "r",
            json!({"interfaces": [], "externalGateway": {"network": network}}),
        )
    };
    let private = refused(c.create(&gateway("ops/private")).await);
    let missing = refused(c.create(&gateway("ops/absent")).await);
    assert_eq!(same(&private, "ops/private"), same(&missing, "ops/absent"));
    assert!(
        !private.message.contains("not external"),
        "{}",
        private.message
    );
}

/// A node cannot grant itself a physical network: the grant is
/// `network.stratus.dev/physical-networks` on its Hypervisor, whose metadata is the
/// operator's, however the node writes it (registering, merge patch, JSON patch, PUT); the
/// operator's grant stays, and the node's status writes keep it.
#[tokio::test]
async fn a_node_cannot_grant_itself_a_physical_network() {
    use stratus_api_types::network::PHYSICAL_NETWORKS_ANNOTATION as GRANT;
    let c = Cloud::new().await;
    let n1 = c.node("n1");
    let hvs = c.target("Hypervisor", None, None);
    let hv = |annotations: Value| {
        json!({
            "apiVersion": "compute.stratus.dev/v1", "kind": "Hypervisor",
            "metadata": {"name": "n1", "annotations": annotations},
            "spec": {"hypervisorType": "qemu"},
        })
        .to_string()
    };
    // Registering with the grant.
    let e = refused(n1.create(&hvs, JSON, &hv(json!({GRANT: "physnet1"}))).await);
    assert_eq!(e.code, 403, "{}", e.message);
    assert!(e.message.contains("metadata.annotations"), "{}", e.message);
    assert_eq!(refused(c.get("Hypervisor", None, "n1").await).code, 404);
    n1.create(&hvs, JSON, &hv(json!({})))
        .await
        .expect("registered");
    let own = c.target("Hypervisor", None, Some("n1"));
    let before = c.get("Hypervisor", None, "n1").await.expect("n1");
    // Granting itself afterwards, every way a write can say it.
    let mut put = before.clone();
    put["metadata"]["annotations"] = json!({GRANT: "physnet1"});
    for (kind, body) in [
        (
            MERGE,
            json!({"metadata": {"annotations": {GRANT: "physnet1"}}}).to_string(),
        ),
        (
            JSON_PATCH,
            json!([{"op": "add", "path": "/metadata/annotations", "value": {GRANT: "physnet1"}}])
                .to_string(),
        ),
    ] {
        let e = refused(n1.patch(&own, kind, &body).await);
        assert_eq!(e.code, 403, "{kind}: {}", e.message);
    }
    let e = refused(n1.put(&own, JSON, &put.to_string()).await);
    assert_eq!(e.code, 403, "PUT: {}", e.message);
    assert_eq!(c.get("Hypervisor", None, "n1").await.expect("kept"), before);
    // The operator grants it; the node can take it away no more than it could add it, and
    // its status writes keep it.
    c.patch(
        &own,
        MERGE,
        &json!({"metadata": {"annotations": {GRANT: "physnet1"}}}),
        "",
    )
    .await
    .expect("granted");
    let e = refused(
        n1.patch(
            &own,
            MERGE,
            &json!({"metadata": {"annotations": {GRANT: null}}}).to_string(),
        )
        .await,
    );
    assert_eq!(e.code, 403, "{}", e.message);
    n1.patch(
        &c.status("Hypervisor", None, "n1"),
        MERGE,
        &json!({"status": {"phase": "Ready"}}).to_string(),
    )
    .await
    .expect("its status");
    let after = c.get("Hypervisor", None, "n1").await.expect("n1");
    assert_eq!(after["metadata"]["annotations"][GRANT], "physnet1");
}
