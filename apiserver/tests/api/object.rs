//! Object storage nodes and rings at admission: one address is one node, whether two
//! ObjectNodes claim it (at once or one after the other), an operator moves a node onto it,
//! or a ring's devices name two nodes at it; a node's address is freed with it.

use serde_json::{Value, json};

use crate::fixtures::{Cloud, MERGE, Obj, refused};

fn object_node(name: &str, ip: &str) -> Obj {
    Obj(json!({
        "apiVersion": "object.stratus.dev/v1", "kind": "ObjectNode",
        "metadata": {"name": name}, "spec": {"ip": ip},
    }))
}

fn ring(name: &str, devices: Value) -> Obj {
    Obj(json!({
        "apiVersion": "object.stratus.dev/v1", "kind": "ObjectRing",
        "metadata": {"name": name},
        "spec": {"ringType": "object", "partPower": 4, "replicas": 1, "devices": devices},
    }))
}

fn device(ip: &str, device: &str, node: &str) -> Value {
    json!({"zone": 1, "ip": ip, "port": 6200, "device": device, "weight": 100, "node": node})
}

/// The one cause of a 422, as (field, message).
fn cause(e: &stratus_apiserver::base::error::ApiError) -> (String, String) {
    assert_eq!(e.code, 422, "{}", e.message);
    assert_eq!(e.details.causes.len(), 1, "{:?}", e.details.causes);
    let c = &e.details.causes[0];
    (c.field.clone(), c.message.clone())
}

#[tokio::test]
async fn two_object_nodes_cannot_claim_one_address() {
    let c = Cloud::new().await;
    c.create(&object_node("a", "10.0.0.1")).await.expect("a");
    let e = refused(c.create(&object_node("b", "10.0.0.1")).await);
    let (field, message) = cause(&e);
    assert_eq!(field, "spec.ip");
    assert!(message.contains("ObjectNode \"a\""), "{message}");
    assert!(
        c.get("ObjectNode", None, "b").await.is_err(),
        "b was written"
    );
    c.create(&object_node("b", "10.0.0.2")).await.expect("b");

    // Moved by the operator onto a's address: refused, b as it was; onto a free one: its old
    // address is free for another node.
    let b = c.target("ObjectNode", None, Some("b"));
    let e = refused(
        c.patch(&b, MERGE, &json!({"spec": {"ip": "10.0.0.1"}}), "")
            .await,
    );
    assert_eq!(cause(&e).0, "spec.ip");
    let kept = c.get("ObjectNode", None, "b").await.expect("b");
    assert_eq!(kept["spec"]["ip"], "10.0.0.2");
    c.patch(&b, MERGE, &json!({"spec": {"ip": "10.0.0.3"}}), "")
        .await
        .expect("moved");
    c.create(&object_node("c", "10.0.0.2"))
        .await
        .expect("b's old address");
    // A status report (the address kept) is written as before.
    c.patch(
        &c.status("ObjectNode", None, "b"),
        MERGE,
        &json!({"status": {"phase": "Ready"}}),
        "",
    )
    .await
    .expect("status");

    // Deleted, a node frees its address.
    c.delete("ObjectNode", None, "a", "")
        .await
        .expect("deleted");
    c.create(&object_node("d", "10.0.0.1"))
        .await
        .expect("a's address, free again");
}

#[tokio::test]
async fn of_two_nodes_registering_one_address_at_once_one_is_refused() {
    let c = Cloud::new().await;
    for round in 0..10 {
        let ip = format!("10.0.1.{round}");
        let (x, y) = (format!("x{round}"), format!("y{round}"));
        let (nx, ny) = (object_node(&x, &ip), object_node(&y, &ip));
        let (one, two) = tokio::join!(c.create(&nx), c.create(&ny));
        let made = [&one, &two].iter().filter(|r| r.is_ok()).count();
        assert_eq!(made, 1, "round {round}: {one:?} {two:?}");
        let refused = [one, two]
            .into_iter()
            .find_map(Result::err)
            .expect("one refused");
        assert_eq!(refused.code, 422, "{}", refused.message);
    }
}

#[tokio::test]
async fn a_rings_devices_name_one_node_per_address() {
    let c = Cloud::new().await;
    // Two nodes at one address in one ring.
    let e = refused(
        c.create(&ring(
            "r1",
            json!([device("10.0.0.1", "d1", "a"), device("10.0.0.1", "d2", "b")]),
        ))
        .await,
    );
    let (field, message) = cause(&e);
    assert_eq!(field, "spec.devices[1].node");
    assert!(message.contains("one address, one node"), "{message}");
    // Two devices of one node at its address are fine.
    c.create(&ring(
        "r1",
        json!([device("10.0.0.1", "d1", "a"), device("10.0.0.1", "d2", "a")]),
    ))
    .await
    .expect("one node, two devices");

    // A device naming a node at the address another ObjectNode holds.
    c.create(&object_node("b", "10.0.0.2")).await.expect("b");
    let e = refused(
        c.create(&ring("r2", json!([device("10.0.0.2", "d1", "c")])))
            .await,
    );
    let (field, message) = cause(&e);
    assert_eq!(field, "spec.devices[0].ip");
    assert!(message.contains("ObjectNode \"b\""), "{message}");
    c.create(&ring("r2", json!([device("10.0.0.2", "d1", "b")])))
        .await
        .expect("b's own address");
    let r2 = c.target("ObjectRing", None, Some("r2"));
    let e = refused(
        c.patch(
            &r2,
            MERGE,
            &json!({"spec": {"devices": [device("10.0.0.2", "d1", "c")]}}),
            "",
        )
        .await,
    );
    assert_eq!(cause(&e).0, "spec.devices[0].ip");
}
