//! Ports and the Servers they belong to, on a real etcd: an owner reference to a Server is
//! the controllers' to write, at a Port's create and at every update (a replace, a merge or
//! JSON patch, an apply: decided on the object that results), and a Port bound to a Server
//! that is gone is claimed at once by the next Server that names it.

use serde_json::{Value, json};

use stratus_apiserver::admission::CLUSTER_ADMIN;
use stratus_apiserver::base::error::ApiResult;
use stratus_apiserver::resource::verbs::Target;

use crate::fixtures::{APPLY, Cloud, JSON_PATCH, MERGE, Obj, field, refused, refused_naming};

/// An owner reference to Server `server` (as stored), its controller or not.
fn owner(server: &Value, controller: bool) -> Value {
    json!({"apiVersion": "compute.stratus.dev/v1", "kind": "Server",
           "name": server["metadata"]["name"], "uid": server["metadata"]["uid"],
           "controller": controller})
}

/// The owner references of Port `name` of project demo, as stored.
async fn owners(c: &Cloud, name: &str) -> Value {
    c.get("Port", Some("demo"), name).await.expect("port")["metadata"]["ownerReferences"].clone()
}

/// A patch of `t` (its answer dropped).
async fn patch(c: &Cloud, t: &Target, content_type: &str, body: &Value) -> ApiResult<()> {
    c.patch(t, content_type, body, "").await.map(|_| ())
}

/// A member's server-side apply of Port `name` (on network blue) with owner references `refs`.
async fn apply_owners(c: &Cloud, t: &Target, name: &str, refs: &Value) -> ApiResult<()> {
    c.patch(
        t,
        APPLY,
        &json!({"apiVersion": "network.stratus.dev/v1", "kind": "Port",
                "metadata": {"name": name, "namespace": "demo", "ownerReferences": refs},
                "spec": {"network": "blue"}}),
        "fieldManager=member&force=true",
    )
    .await
    .map(|_| ())
}

/// Asserts every write (how, result) was refused 403 naming metadata.ownerReferences.
fn all_refused_naming_owners(writes: Vec<(&str, ApiResult<()>)>, context: &str) {
    for (how, r) in writes {
        let e = refused(r);
        assert_eq!(
            (e.code, field(&e)),
            (403, "metadata.ownerReferences"),
            "{how}{context}: {e:?}"
        );
    }
}

#[tokio::test]
async fn an_update_giving_a_port_a_server_owner_is_the_controllers_alone() {
    let (_etcd, c) = crate::api::etcd::cloud().await;
    c.create(&Obj::network("demo", "blue"))
        .await
        .expect("network");
    let web = c.create(&Obj::server("demo", "web")).await.expect("web");
    let stored = c
        .create(&Obj::port("demo", "mine", "blue"))
        .await
        .expect("port");
    let t = c.target("Port", Some("demo"), Some("mine"));
    // Every way a member can write the Port's metadata, each adding a reference to web.
    for controller in [true, false] {
        let refs = json!([owner(&web, controller)]);
        let mut replaced = stored.clone();
        replaced["metadata"]["ownerReferences"] = refs.clone();
        let writes: Vec<(&str, _)> = vec![
            ("replace", c.put(&t, &replaced).await.map(|_| ())),
            (
                "merge patch",
                patch(
                    &c,
                    &t,
                    MERGE,
                    &json!({"metadata": {"ownerReferences": refs}}),
                )
                .await,
            ),
            (
                "JSON patch",
                patch(
                    &c,
                    &t,
                    JSON_PATCH,
                    &json!([{"op": "add", "path": "/metadata/ownerReferences", "value": refs}]),
                )
                .await,
            ),
            ("apply", apply_owners(&c, &t, "mine", &refs).await),
        ];
        all_refused_naming_owners(writes, &format!(", controller {controller}"));
    }
    assert_eq!(owners(&c, "mine").await, Value::Null, "nothing written");
    // A write that leaves the Port's owners as they are is the member's to make.
    c.patch(
        &t,
        MERGE,
        &json!({"metadata": {"labels": {"tier": "web"}}}),
        "",
    )
    .await
    .expect("a label");
    // The controllers give it an owner; the member may then write it, but not make that
    // reference the Port's controller, nor point it at another Server.
    CLUSTER_ADMIN
        .scope(
            true,
            c.patch(
                &t,
                MERGE,
                &json!({"metadata": {"ownerReferences": [owner(&web, false)]}}),
                "",
            ),
        )
        .await
        .expect("the controllers' write");
    c.patch(
        &t,
        MERGE,
        &json!({"metadata": {"labels": {"tier": "db"}}}),
        "",
    )
    .await
    .expect("a label, the owner kept");
    let db = c.create(&Obj::server("demo", "db")).await.expect("db");
    for refs in [json!([owner(&web, true)]), json!([owner(&db, false)])] {
        refused_naming(
            c.patch(
                &t,
                MERGE,
                &json!({"metadata": {"ownerReferences": refs}}),
                "",
            )
            .await,
            403,
            "metadata.ownerReferences",
        );
    }
    assert_eq!(owners(&c, "mine").await, json!([owner(&web, false)]));
}

#[tokio::test]
async fn taking_a_servers_owner_reference_off_a_port_is_the_controllers_alone() {
    let (_etcd, c) = crate::api::etcd::cloud().await;
    c.create(&Obj::network("demo", "blue"))
        .await
        .expect("network");
    let web = c.create(&Obj::server("demo", "web")).await.expect("web");
    // The ports controller makes a Port for web: its controller reference and no claim yet.
    let mut made = Obj::port("demo", "web-0", "blue");
    made.0["metadata"]["ownerReferences"] = json!([owner(&web, true)]);
    let stored = CLUSTER_ADMIN
        .scope(true, c.create(&made))
        .await
        .expect("the controllers' port");
    let t = c.target("Port", Some("demo"), Some("web-0"));
    // Every way a member can write the Port's metadata, each taking web's reference off or
    // making it no longer the controller.
    let mut bare = stored.clone();
    bare["metadata"]
        .as_object_mut()
        .expect("metadata")
        .remove("ownerReferences");
    let mut emptied = stored.clone();
    emptied["metadata"]["ownerReferences"] = json!([]);
    let writes: Vec<(&str, _)> = vec![
        ("replace without it", c.put(&t, &bare).await.map(|_| ())),
        ("replace with none", c.put(&t, &emptied).await.map(|_| ())),
        (
            "merge patch to null",
            patch(
                &c,
                &t,
                MERGE,
                &json!({"metadata": {"ownerReferences": null}}),
            )
            .await,
        ),
        (
            "merge patch, not the controller",
            patch(
                &c,
                &t,
                MERGE,
                &json!({"metadata": {"ownerReferences": [owner(&web, false)]}}),
            )
            .await,
        ),
        (
            "JSON patch remove",
            patch(
                &c,
                &t,
                JSON_PATCH,
                &json!([{"op": "remove", "path": "/metadata/ownerReferences"}]),
            )
            .await,
        ),
        (
            "apply, not the controller",
            apply_owners(&c, &t, "web-0", &json!([owner(&web, false)])).await,
        ),
    ];
    all_refused_naming_owners(writes, "");
    assert_eq!(owners(&c, "web-0").await, json!([owner(&web, true)]));
    // So no other Server can take the Port made for web.
    let e = refused(
        c.create(&Obj::server_on_port("demo", "other", "web-0"))
            .await,
    );
    assert_eq!(e.code, 409, "{e:?}");
    // The controllers may take it off (the ports controller orphaning it).
    CLUSTER_ADMIN
        .scope(
            true,
            c.patch(
                &t,
                MERGE,
                &json!({"metadata": {"ownerReferences": null}}),
                "",
            ),
        )
        .await
        .expect("the controllers' write");
    assert_eq!(owners(&c, "web-0").await, Value::Null);
}

/// Binds Port `port` to Server `server`, as the ports controller does.
async fn bind(c: &Cloud, port: &str, server: &str) {
    c.patch(
        &c.status("Port", Some("demo"), port),
        MERGE,
        &json!({"status": {"boundTo": server}}),
        "",
    )
    .await
    .expect("bound");
}

#[tokio::test]
async fn a_port_bound_to_a_server_that_is_gone_is_claimed_at_once() {
    let (_etcd, c) = crate::api::etcd::cloud().await;
    c.create_all(&[
        Obj::network("demo", "blue"),
        Obj::port("demo", "p", "blue"),
        Obj::server_on_port("demo", "a", "p"),
    ])
    .await;
    bind(&c, "p", "a").await;
    // While a exists the port is its guest's: b waits (409 naming the field).
    refused_naming(
        c.create(&Obj::server_on_port("demo", "b", "p")).await,
        409,
        "spec.networks[0].port",
    );
    // a deleted: b, created at once (before the ports controller unbinds the port), gets it.
    c.delete("Server", Some("demo"), "a", "")
        .await
        .expect("delete a");
    c.create(&Obj::server_on_port("demo", "b", "p"))
        .await
        .expect("b claims a port bound to a server that is gone");
    assert_eq!(c.port_claim("demo", "p").await, "b");

    // Made anew under the bound server's name: the new one's guest never had the NIC.
    c.create(&Obj::port("demo", "q", "blue"))
        .await
        .expect("port");
    c.create(&Obj::server_on_port("demo", "x", "q"))
        .await
        .expect("server x");
    bind(&c, "q", "x").await;
    c.delete("Server", Some("demo"), "x", "")
        .await
        .expect("delete x");
    c.create(&Obj::server("demo", "x"))
        .await
        .expect("another x, naming no port");
    c.create(&Obj::server_on_port("demo", "y", "q"))
        .await
        .expect("y claims a port bound to the old x");
    assert_eq!(c.port_claim("demo", "q").await, "y");
}

#[tokio::test]
async fn a_port_bound_to_a_server_being_deleted_is_not_claimed() {
    let (_etcd, c) = crate::api::etcd::cloud().await;
    c.create_all(&[Obj::network("demo", "blue"), Obj::port("demo", "p", "blue")])
        .await;
    // A finalizer holds a (as the compute agent's holds a placed server until its guest is
    // torn down).
    c.create(&Obj::server_on_port("demo", "a", "p").finalizer("example.com/hold"))
        .await
        .expect("server a");
    bind(&c, "p", "a").await;
    c.delete("Server", Some("demo"), "a", "")
        .await
        .expect("delete a");
    let before = c.revision().await;
    let e = refused_naming(
        c.create(&Obj::server_on_port("demo", "b", "p")).await,
        409,
        "spec.networks[0].port",
    );
    assert!(e.message.contains("bound to server \"a\""), "{}", e.message);
    assert_eq!(c.revision().await, before, "nothing written");
    // Once it is gone, b gets it.
    c.patch(
        &c.target("Server", Some("demo"), Some("a")),
        MERGE,
        &json!({"metadata": {"finalizers": null}}),
        "",
    )
    .await
    .expect("a's finalizer released");
    c.create(&Obj::server_on_port("demo", "b", "p"))
        .await
        .expect("b claims it");
    assert_eq!(c.port_claim("demo", "p").await, "b");
}
