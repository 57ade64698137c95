//! The node authorizer's graph and its restrictions, as a node agent's identity meets them:
//! what registering its Hypervisor may declare, which finalizers it may touch, where its reads
//! of flavors come from, and the network agent's edges (ports placed on the node, their
//! networks, subnets and security groups, the other ports of those networks, every
//! Hypervisor).

use serde_json::{Value, json};

use crate::fixtures::{Cloud, JSON, JSON_PATCH, MERGE, Obj, refused};

const TEARDOWN: &str = "compute.stratus.dev/teardown";

/// A Hypervisor as a node would register it, with `spec`.
fn registration(name: &str, spec: Value) -> String {
    json!({
        "apiVersion": "compute.stratus.dev/v1", "kind": "Hypervisor",
        "metadata": {"name": name}, "spec": spec,
    })
    .to_string()
}

#[tokio::test]
async fn a_node_registers_its_hypervisor_with_zone_and_type_alone() {
    let c = Cloud::with_demo().await;
    let hvs = c.target("Hypervisor", None, None);
    let a = c.node("a");
    let mut labelled: Value =
        serde_json::from_str(&registration("a", json!({"hypervisorType": "qemu"}))).expect("JSON");
    labelled["metadata"]["labels"] = json!({"node-restriction.stratus.dev/secure": "true"});
    for (body, field) in [
        // Attracting tenants' servers beyond what the hardware holds.
        (
            registration("a", json!({"cpuAllocationRatio": 1000.0})),
            "spec.cpuAllocationRatio",
        ),
        (
            registration("a", json!({"ramAllocationRatio": 100.0})),
            "spec.ramAllocationRatio",
        ),
        (
            registration("a", json!({"reservedHostMemoryMiB": 0})),
            "spec.reservedHostMemoryMiB",
        ),
        (labelled.to_string(), "metadata.labels"),
    ] {
        let e = refused(a.create(&hvs, JSON, &body).await);
        assert_eq!(e.code, 403, "{body}: {}", e.message);
        assert!(e.message.contains(field), "{field}: {}", e.message);
        assert_eq!(refused(c.get("Hypervisor", None, "a").await).code, 404);
    }
    // Another node's name, even with nothing more.
    let e = refused(
        a.create(
            &hvs,
            JSON,
            &registration("b", json!({"hypervisorType": "qemu"})),
        )
        .await,
    );
    assert_eq!(e.code, 403, "{}", e.message);
    // What the compute agent's registration writes.
    let made = a
        .create(
            &hvs,
            JSON,
            &registration(
                "a",
                json!({"availabilityZone": "az1", "hypervisorType": "qemu"}),
            ),
        )
        .await
        .expect("registered");
    assert_eq!(made["spec"]["availabilityZone"], "az1");
    assert_eq!(made["spec"]["cpuAllocationRatio"], 16.0);

    // Deleting it would decommission the node: an operator's act.
    let hv_a = c.target("Hypervisor", None, Some("a"));
    let before = c.get("Hypervisor", None, "a").await.expect("a");
    let e = refused(a.delete(&hv_a, "").await);
    assert_eq!(e.code, 403, "{}", e.message);
    assert!(e.message.contains("decommission"), "{}", e.message);
    assert_eq!(c.get("Hypervisor", None, "a").await.expect("kept"), before);
    // Nor labels it afterwards.
    let e = refused(
        a.patch(&hv_a, MERGE, r#"{"metadata": {"labels": {"x": "y"}}}"#)
            .await,
    );
    assert_eq!(e.code, 403, "{}", e.message);
    assert_eq!(c.get("Hypervisor", None, "a").await.expect("kept"), before);
}

/// Project `demo` with Server `web` placed on node `a` (hypervisors `a` and `b`), holding the
/// compute agent's finalizer (added by the binding) and another component's.
async fn placed() -> Cloud {
    let c = Cloud::with_demo().await;
    c.hypervisor("a", 4, 4096).await;
    c.hypervisor("b", 4, 4096).await;
    c.create(&Obj::server("demo", "web").finalizer("example.com/keep"))
        .await
        .expect("server");
    c.bind("demo", "web", "a").await.expect("bind");
    c
}

fn finalizers(obj: &Value) -> Vec<String> {
    obj["metadata"]["finalizers"]
        .as_array()
        .map(|f| {
            f.iter()
                .filter_map(Value::as_str)
                .map(String::from)
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn a_node_adds_and_removes_its_own_finalizer_only() {
    let c = placed().await;
    let a = c.node("a");
    let t = c.target("Server", Some("demo"), Some("web"));
    let before = c.get("Server", Some("demo"), "web").await.expect("web");
    assert_eq!(finalizers(&before), ["example.com/keep", TEARDOWN]);
    for (ct, body) in [
        // Another component's finalizer removed (it would let the server go before it did
        // its part).
        (MERGE, json!({"metadata": {"finalizers": [TEARDOWN]}}).to_string()),
        (
            JSON_PATCH,
            json!([{"op": "remove", "path": "/metadata/finalizers/0"}]).to_string(),
        ),
        // A finalizer of its own making (holding the server undeletable).
        (
            JSON_PATCH,
            json!([{"op": "add", "path": "/metadata/finalizers/-", "value": "evil.example/forever"}])
                .to_string(),
        ),
        // Its own finalizer swapped for another's name.
        (
            MERGE,
            json!({"metadata": {"finalizers": ["example.com/keep", "example.com/other"]}})
                .to_string(),
        ),
    ] {
        let e = refused(a.patch(&t, ct, &body).await);
        assert_eq!(e.code, 403, "{body}: {}", e.message);
        assert!(e.message.contains(TEARDOWN), "{}", e.message);
        assert_eq!(
            c.get("Server", Some("demo"), "web").await.expect("web"),
            before,
            "{body}"
        );
    }
    // Its own: released, then added back.
    let released = a
        .patch(
            &t,
            MERGE,
            &json!({"metadata": {"finalizers": ["example.com/keep"]}}).to_string(),
        )
        .await
        .expect("its own released");
    assert_eq!(finalizers(&released), ["example.com/keep"]);
    let added = a
        .patch(
            &t,
            JSON_PATCH,
            &json!([{"op": "add", "path": "/metadata/finalizers/-", "value": TEARDOWN}])
                .to_string(),
        )
        .await
        .expect("its own added");
    assert_eq!(finalizers(&added), ["example.com/keep", TEARDOWN]);
    // Node b, where nothing is placed, touches none.
    let e = refused(
        c.node("b")
            .patch(
                &t,
                MERGE,
                &json!({"metadata": {"finalizers": ["example.com/keep"]}}).to_string(),
            )
            .await,
    );
    assert_eq!(e.code, 403, "{}", e.message);
}

#[tokio::test]
async fn a_node_reads_the_flavors_of_what_is_placed_on_it_in_any_project() {
    let c = placed().await;
    c.create(&Obj::project("other")).await.expect("project");
    c.create(&Obj::flavor("large", 2, 1024))
        .await
        .expect("flavor");
    c.create(&Obj::server("other", "big").spec("flavor", json!("large")))
        .await
        .expect("server");
    let large = c.target("Flavor", None, Some("large"));
    // Not placed yet: on no node's graph.
    assert_eq!(refused(c.node("b").read(&large, "").await).code, 403);
    c.bind("other", "big", "b").await.expect("bind");
    let got = c.node("b").read(&large, "").await.expect("its server's");
    assert_eq!(got["metadata"]["name"], "large");
    assert_eq!(refused(c.node("a").read(&large, "").await).code, 403);
    // A server of the same name placed elsewhere lends nothing.
    c.create(&Obj::server("demo", "big").spec("flavor", json!("small")))
        .await
        .expect("server");
    c.bind("demo", "big", "a").await.expect("bind");
    assert_eq!(refused(c.node("a").read(&large, "").await).code, 403);
    // Gone with the server.
    c.patch(
        &c.target("Server", Some("other"), Some("big")),
        MERGE,
        &json!({"metadata": {"finalizers": []}}),
        "",
    )
    .await
    .expect("finalizers dropped");
    c.delete("Server", Some("other"), "big", "")
        .await
        .expect("server deleted");
    assert_eq!(
        refused(c.get("Server", Some("other"), "big").await).code,
        404
    );
    assert_eq!(refused(c.node("b").read(&large, "").await).code, 403);
}

/// A namespaced network object of `kind`.
fn net_obj(kind: &str, ns: &str, name: &str, spec: Value) -> Obj {
    Obj(json!({
        "apiVersion": "network.stratus.dev/v1", "kind": kind,
        "metadata": {"name": name, "namespace": ns}, "spec": spec,
    }))
}

/// Projects `demo` and `other`: in `demo`, network `net` (subnet `sub`) with port `pa` on
/// node `a` (security group `web`) and port `pb` on node `b`, and network `lonely` with port
/// `pl` on node `b`; in `other`, network `net` with port `po` on node `b`. Groups `default`
/// and `web` in `demo`, `default` in `other`.
async fn networks() -> Cloud {
    let c = Cloud::with_demo().await;
    c.create(&Obj::project("other")).await.expect("project");
    c.hypervisor("a", 4, 4096).await;
    c.hypervisor("b", 4, 4096).await;
    for (ns, net, cidr) in [
        ("demo", "net", "10.0.0.0/24"),
        ("demo", "lonely", "10.0.1.0/24"),
        ("other", "net", "10.9.0.0/24"),
    ] {
        c.create(&net_obj("Network", ns, net, json!({})))
            .await
            .expect("network");
        c.create(&net_obj(
            "Subnet",
            ns,
            &format!("{net}-sub"),
            json!({"network": net, "cidr": cidr}),
        ))
        .await
        .expect("subnet");
    }
    for (ns, name) in [("demo", "default"), ("demo", "web"), ("other", "default")] {
        c.create(&net_obj("SecurityGroup", ns, name, json!({"rules": []})))
            .await
            .expect("security group");
    }
    for (ns, port, net, node, groups) in [
        ("demo", "pa", "net", "a", Some(json!(["web"]))),
        ("demo", "pb", "net", "b", None),
        ("demo", "pl", "lonely", "b", None),
        ("other", "po", "net", "b", None),
    ] {
        let mut spec = json!({"network": net});
        if let Some(g) = groups {
            spec["securityGroups"] = g;
        }
        c.create(&net_obj("Port", ns, port, spec))
            .await
            .expect("port");
        // Its addresses are the address management's; its placement, the binding's.
        let status = json!({"status": {"phase": "Down", "hypervisor": node, "boundTo": "web"}});
        c.patch(&c.status("Port", Some(ns), port), MERGE, &status, "")
            .await
            .expect("placed");
    }
    c
}

#[tokio::test]
async fn a_node_reads_the_network_graph_of_its_ports_and_no_more() {
    let c = networks().await;
    let a = c.node("a");
    let ports = |ns: Option<&str>| c.target("Port", ns, None);
    let port = |ns: &str, n: &str| c.target("Port", Some(ns), Some(n));

    // Its own ports, listed across projects by their placement.
    let mine = a
        .read(&ports(None), "fieldSelector=status.hypervisor=a")
        .await
        .expect("its ports");
    assert_eq!(crate::fixtures::names(&mine), ["pa"]);
    // The other ports of its networks: by name, and listed by network in the project.
    a.read(&port("demo", "pb"), "")
        .await
        .expect("a peer on net");
    let peers = a
        .read(&ports(Some("demo")), "fieldSelector=spec.network=net")
        .await
        .expect("net's ports");
    assert_eq!(crate::fixtures::names(&peers), ["pa", "pb"]);
    // Its networks, their subnets, its ports' security groups.
    for (kind, name) in [
        ("Network", "net"),
        ("Subnet", "net-sub"),
        ("SecurityGroup", "web"),
    ] {
        a.read(&c.target(kind, Some("demo"), Some(name)), "")
            .await
            .unwrap_or_else(|e| panic!("{kind} {name}: {}", e.message));
    }
    a.read(
        &c.target("Subnet", Some("demo"), None),
        "fieldSelector=spec.network=net",
    )
    .await
    .expect("net's subnets");
    a.read(
        &c.target("Network", Some("demo"), None),
        "fieldSelector=metadata.name=net",
    )
    .await
    .expect("net, watched alone");
    // Every hypervisor (peers' tunnel addresses), read-only.
    let hvs = a
        .read(&c.target("Hypervisor", None, None), "")
        .await
        .expect("hypervisors");
    assert_eq!(crate::fixtures::names(&hvs), ["a", "b"]);

    // Nothing of networks it has no port on, in its projects or another tenant's.
    for (what, r) in [
        (
            "a port of another network",
            a.read(&port("demo", "pl"), "").await,
        ),
        (
            "another tenant's port",
            a.read(&port("other", "po"), "").await,
        ),
        ("every port", a.read(&ports(None), "").await),
        ("a project's ports", a.read(&ports(Some("demo")), "").await),
        (
            "another node's ports",
            a.read(&ports(None), "fieldSelector=status.hypervisor=b")
                .await,
        ),
        (
            "the ports of another network",
            a.read(&ports(Some("demo")), "fieldSelector=spec.network=lonely")
                .await,
        ),
        (
            "the ports of another tenant's network of the same name",
            a.read(&ports(Some("other")), "fieldSelector=spec.network=net")
                .await,
        ),
        (
            "a network it has no port on",
            a.read(&c.target("Network", Some("demo"), Some("lonely")), "")
                .await,
        ),
        (
            "another tenant's network",
            a.read(&c.target("Network", Some("other"), Some("net")), "")
                .await,
        ),
        (
            "every network",
            a.read(&c.target("Network", None, None), "").await,
        ),
        (
            "a subnet of another network",
            a.read(&c.target("Subnet", Some("demo"), Some("lonely-sub")), "")
                .await,
        ),
        (
            "another tenant's subnets",
            a.read(
                &c.target("Subnet", Some("other"), None),
                "fieldSelector=spec.network=net",
            )
            .await,
        ),
        (
            "a group none of its ports is in",
            a.read(
                &c.target("SecurityGroup", Some("demo"), Some("default")),
                "",
            )
            .await,
        ),
        (
            "another tenant's group",
            a.read(
                &c.target("SecurityGroup", Some("other"), Some("default")),
                "",
            )
            .await,
        ),
    ] {
        let e = refused(r);
        assert_eq!(e.code, 403, "{what}: {}", e.message);
    }
    // Node b's port `pb` names no group: `default` is its group.
    c.node("b")
        .read(
            &c.target("SecurityGroup", Some("demo"), Some("default")),
            "",
        )
        .await
        .expect("pb's default group");
    // A node writes no hypervisor but its own, reads notwithstanding.
    let e = refused(
        a.patch(
            &c.status("Hypervisor", None, "b"),
            MERGE,
            r#"{"status": {"phase": "NotReady"}}"#,
        )
        .await,
    );
    assert_eq!(e.code, 403, "{}", e.message);
}

#[tokio::test]
async fn a_node_writes_the_status_of_its_ports_but_not_their_addresses_or_placement() {
    let c = networks().await;
    let a = c.node("a");
    let pa = c.status("Port", Some("demo"), "pa");
    let before = c.get("Port", Some("demo"), "pa").await.expect("pa");
    for (field, body) in [
        (
            "status.macAddress",
            json!({"status": {"macAddress": "fa:16:3e:00:00:02"}}),
        ),
        (
            "status.fixedIPs",
            json!({"status": {"fixedIPs": [{"subnet": "net-sub", "ipAddress": "10.0.0.12"}]}}),
        ),
        ("status.boundTo", json!({"status": {"boundTo": "db"}})),
    ] {
        let e = refused(a.patch(&pa, MERGE, &body.to_string()).await);
        assert_eq!(e.code, 403, "{field}: {}", e.message);
        assert!(e.message.contains(field), "{field}: {}", e.message);
        assert_eq!(
            c.get("Port", Some("demo"), "pa").await.expect("pa"),
            before,
            "{field}"
        );
    }
    // Handing the port to another node, spelled as a copy.
    let away = json!([{"op": "copy", "from": "/status/boundTo", "path": "/status/hypervisor"}])
        .to_string();
    assert_eq!(refused(a.patch(&pa, JSON_PATCH, &away).await).code, 403);
    // Another node's port, even on its own network.
    let pb = c.status("Port", Some("demo"), "pb");
    let pb_before = c.get("Port", Some("demo"), "pb").await.expect("pb");
    let up = json!({"status": {"phase": "Active"}}).to_string();
    assert_eq!(refused(a.patch(&pb, MERGE, &up).await).code, 403);
    assert_eq!(
        c.get("Port", Some("demo"), "pb").await.expect("pb"),
        pb_before
    );
    // Nor a port's spec (its addresses asked for), even its own.
    let spec = json!({"spec": {"fixedIPs": [{"ipAddress": "10.0.0.99"}]}}).to_string();
    assert_eq!(
        refused(
            a.patch(&c.target("Port", Some("demo"), Some("pa")), MERGE, &spec)
                .await
        )
        .code,
        403
    );
    // Its own port's phase and conditions it reports.
    let got = a.patch(&pa, MERGE, &up).await.expect("its own port");
    assert_eq!(got["status"]["phase"], "Active");
    assert_eq!(got["status"]["macAddress"], before["status"]["macAddress"]);
}

/// The managedFields entry of `manager` in `obj`.
fn managed_entry(obj: &Value, manager: &str) -> Option<Value> {
    obj["metadata"]["managedFields"]
        .as_array()?
        .iter()
        .find(|e| e["manager"] == manager)
        .cloned()
}

#[tokio::test]
async fn a_node_cannot_rewrite_who_owns_the_fields_of_what_is_placed_on_it() {
    let c = placed().await;
    let a = c.node("a");
    let t = c.target("Server", Some("demo"), Some("web"));
    let before = c.get("Server", Some("demo"), "web").await.expect("web");
    let tenant = managed_entry(&before, "test").expect("the tenant's entry");
    assert!(
        tenant["fieldsV1"]["f:spec"].get("f:flavor").is_some(),
        "{tenant}"
    );
    // Its own finalizer released, with managedFields claiming the whole spec for the node and
    // dropping the tenant's entry.
    let forged = json!([{"manager": "caller", "operation": "Update",
                         "apiVersion": "compute.stratus.dev/v1", "fieldsType": "FieldsV1",
                         "time": "2026-01-01T00:00:00Z", "fieldsV1": {"f:spec": {}}}]);
    let released = a
        .patch(
            &t,
            MERGE,
            &json!({"metadata": {"finalizers": ["example.com/keep"], "managedFields": forged}})
                .to_string(),
        )
        .await
        .expect("its own finalizer released");
    assert_eq!(finalizers(&released), ["example.com/keep"]);
    let stored = c.get("Server", Some("demo"), "web").await.expect("web");
    assert_eq!(managed_entry(&stored, "test"), Some(tenant.clone()));
    let node = managed_entry(&stored, "caller");
    assert!(
        node.as_ref()
            .is_none_or(|e| e["fieldsV1"].get("f:spec").is_none()),
        "the node owns nothing of the spec: {node:?}"
    );
    // Added back by a JSON patch that also empties managedFields: the tenant's entry stays,
    // and the node owns its finalizer.
    let added = a
        .patch(
            &t,
            JSON_PATCH,
            &json!([{"op": "replace", "path": "/metadata/managedFields", "value": []},
                    {"op": "add", "path": "/metadata/finalizers/-", "value": TEARDOWN}])
            .to_string(),
        )
        .await
        .expect("its own finalizer added");
    assert_eq!(finalizers(&added), ["example.com/keep", TEARDOWN]);
    let stored = c.get("Server", Some("demo"), "web").await.expect("web");
    assert_eq!(managed_entry(&stored, "test"), Some(tenant));
    let owners: Vec<&Value> = stored["metadata"]["managedFields"]
        .as_array()
        .expect("managed fields")
        .iter()
        .filter(|e| {
            e["fieldsV1"]["f:metadata"]["f:finalizers"]
                .get(format!("v:\"{TEARDOWN}\""))
                .is_some()
        })
        .collect();
    assert_eq!(owners.len(), 1, "{stored}");
    assert_eq!(owners[0]["manager"], "caller");
}

/// The object agent's edges: every ObjectRing and ObjectRingVersion read, its own ObjectNode
/// registered with its address and nothing an operator owns, then only its status written;
/// another node's ObjectNode neither written nor read.
#[tokio::test]
async fn a_node_registers_its_object_node_and_writes_only_its_status() {
    let c = Cloud::new().await;
    let ring = json!({
        "apiVersion": "object.stratus.dev/v1", "kind": "ObjectRing",
        "metadata": {"name": "object"},
        "spec": {"ringType": "object", "partPower": 4, "replicas": 1, "devices": []},
    });
    c.create(&Obj(ring)).await.expect("ring");
    let a = c.node("a");
    let rings = a
        .read(&c.target("ObjectRing", None, None), "")
        .await
        .expect("a node lists the rings");
    assert_eq!(rings["items"].as_array().map(Vec::len), Some(1));
    a.read(&c.target("ObjectRingVersion", None, None), "watch=false")
        .await
        .expect("and their versions");

    let nodes = c.target("ObjectNode", None, None);
    let object_node = |name: &str| {
        json!({
            "apiVersion": "object.stratus.dev/v1", "kind": "ObjectNode",
            "metadata": {"name": name}, "spec": {"ip": "10.0.0.1"},
        })
    };
    let e = refused(a.create(&nodes, JSON, &object_node("b").to_string()).await);
    assert_eq!(e.code, 403, "{}", e.message);
    let mut labelled = object_node("a");
    labelled["metadata"]["labels"] = json!({"x": "y"});
    let e = refused(a.create(&nodes, JSON, &labelled.to_string()).await);
    assert!(
        e.code == 403 && e.message.contains("metadata.labels"),
        "{}",
        e.message
    );
    a.create(&nodes, JSON, &object_node("a").to_string())
        .await
        .expect("registered");

    let mine = c.target("ObjectNode", None, Some("a"));
    let status =
        r#"{"status": {"phase": "Degraded", "devices": [{"name": "d1", "state": "Failed"}]}}"#;
    let written = a
        .patch(&c.status("ObjectNode", None, "a"), MERGE, status)
        .await
        .expect("its status");
    assert_eq!(written["status"]["devices"][0]["state"], "Failed");
    // Its spec is the operator's once registered: another address would drain other
    // nodes' devices.
    let before = c.get("ObjectNode", None, "a").await.expect("a");
    let e = refused(
        a.patch(&mine, MERGE, r#"{"spec": {"ip": "10.0.0.2"}}"#)
            .await,
    );
    assert_eq!(e.code, 403, "{}", e.message);
    assert_eq!(c.get("ObjectNode", None, "a").await.expect("kept"), before);
    let e = refused(a.delete(&mine, "").await);
    assert_eq!(e.code, 403, "{}", e.message);

    // Another node's (at an address of its own: one address is one node).
    let mut b = object_node("b");
    b["spec"]["ip"] = json!("10.0.0.3");
    c.create(&Obj(b)).await.expect("b");
    let theirs = c.status("ObjectNode", None, "b");
    let e = refused(a.patch(&theirs, MERGE, status).await);
    assert_eq!(e.code, 403, "{}", e.message);
    let e = refused(a.read(&c.target("ObjectNode", None, Some("b")), "").await);
    assert_eq!(e.code, 403, "{}", e.message);
}
