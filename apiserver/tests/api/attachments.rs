//! Volumes attached to Servers at admission: the claim in the Server's own transaction, the
//! refusals (a volume of another project, one held by another server, one not bootable), the
//! race for one volume, and what a compute node may read of an attached volume. Ports named
//! by a Server: claimed in its write (of many Servers at once, one gets it), freed when it drops
//! them or goes, bound to the Port's uid; networks a project may not use refused.

use serde_json::{Value, json};

use stratus_api_types::ports::CLAIMED_BY;
use stratus_apiserver::admission::CLUSTER_ADMIN;

use crate::fixtures::{Cloud, MERGE, Obj, field, refused, refused_naming};

fn volume(ns: &str, name: &str) -> Obj {
    Obj(json!({
        "apiVersion": "storage.stratus.dev/v1", "kind": "Volume",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"sizeGiB": 1},
    }))
}

fn with_volumes(ns: &str, name: &str, volumes: &[&str]) -> Obj {
    let list: Vec<Value> = volumes.iter().map(|v| json!({"volume": v})).collect();
    Obj::server(ns, name).spec("volumes", json!(list))
}

/// Places volume `name` of project demo on `node`, as the volume scheduler does: through its
/// binding, on a new file pool `p1` of that node (Ready, 10 GiB).
pub async fn place_volume(c: &Cloud, name: &str, node: &str) {
    c.create(&Obj(json!({
        "apiVersion": "storage.stratus.dev/v1", "kind": "StoragePool",
        "metadata": {"name": "p1"},
        "spec": {"backend": "file", "node": node, "path": "/srv/p1", "reservedPercentage": 0},
    })))
    .await
    .expect("pool");
    c.patch(
        &c.status("StoragePool", None, "p1"),
        MERGE,
        &json!({"status": {"phase": "Ready", "capacityGiB": 10}}),
        "",
    )
    .await
    .expect("capacity");
    let t = stratus_apiserver::resource::verbs::Target {
        subresource: Some("binding".into()),
        ..c.target("Volume", Some("demo"), Some(name))
    };
    c.api
        .bind(
            &t,
            json!({"target": {"name": "p1"}}).to_string().as_bytes(),
            crate::fixtures::JSON,
            &stratus_apiserver::resource::review::AllowAll,
        )
        .await
        .expect("placed");
}

async fn attached_to(c: &Cloud, ns: &str, name: &str) -> Value {
    c.get("Volume", Some(ns), name).await.expect("volume")["status"]["attachedTo"].clone()
}

#[tokio::test]
async fn a_server_claims_its_volumes_in_its_own_write() {
    let c = Cloud::with_demo().await;
    c.create(&volume("demo", "data")).await.expect("volume");
    c.create(&with_volumes("demo", "web", &["data"]))
        .await
        .expect("server");
    let v = c.get("Volume", Some("demo"), "data").await.expect("volume");
    assert_eq!(v["status"]["attachedTo"], "web", "{v}");
    assert_eq!(v["status"]["conditions"][0]["type"], "Attached", "{v}");

    // Another server is refused, naming the field and the holder; nothing is written.
    let before = c.revision().await;
    let e = refused_naming(
        c.create(&with_volumes("demo", "db", &["data"])).await,
        409,
        "spec.volumes[0].volume",
    );
    assert!(e.message.contains("\"web\""), "{}", e.message);
    assert_eq!(c.revision().await, before);
    assert_eq!(refused(c.get("Server", Some("demo"), "db").await).code, 404);
    // So is adding it to an existing server.
    c.create(&Obj::server("demo", "db")).await.expect("db");
    let t = c.target("Server", Some("demo"), Some("db"));
    refused_naming(
        c.patch(
            &t,
            MERGE,
            &json!({"spec": {"volumes": [{"volume": "data"}]}}),
            "",
        )
        .await,
        409,
        "spec.volumes[0].volume",
    );
    assert_eq!(attached_to(&c, "demo", "data").await, "web");
    // And deleting it while attached.
    assert_eq!(
        refused(c.delete("Volume", Some("demo"), "data", "").await).code,
        409
    );
}

#[tokio::test]
async fn a_port_bound_to_another_server_is_refused_naming_the_field() {
    let c = Cloud::with_demo().await;
    c.create(&Obj(
        json!({"apiVersion": "network.stratus.dev/v1", "kind": "Network",
        "metadata": {"name": "blue", "namespace": "demo"}, "spec": {}}),
    ))
    .await
    .expect("network");
    c.create(&Obj(
        json!({"apiVersion": "network.stratus.dev/v1", "kind": "Port",
        "metadata": {"name": "mine", "namespace": "demo"}, "spec": {"network": "blue"}}),
    ))
    .await
    .expect("port");
    c.create(&Obj::server("demo", "web")).await.expect("web");
    c.create(&Obj::server("demo", "db")).await.expect("db");
    let add = json!({"spec": {"networks": [{"network": "blue"}, {"port": "mine"}]}});
    let server = |name: &str| c.target("Server", Some("demo"), Some(name));
    // Free: web names it (`openstack server add port web mine`); bound to web (as the ports
    // controller binds it), web keeps it through its other writes.
    c.patch(&server("web"), MERGE, &add, "")
        .await
        .expect("a free port is added");
    c.patch(
        &c.status("Port", Some("demo"), "mine"),
        MERGE,
        &json!({"status": {"boundTo": "web"}}),
        "",
    )
    .await
    .expect("bound");
    c.patch(
        &server("web"),
        MERGE,
        &json!({"spec": {"hostname": "web"}}),
        "",
    )
    .await
    .expect("web keeps its port");
    // db asking for it is refused, naming the field and the holder; nothing is written.
    let before = c.revision().await;
    let e = refused_naming(
        c.patch(&server("db"), MERGE, &add, "").await,
        409,
        "spec.networks[1].port",
    );
    assert!(e.message.contains("\"web\""), "{}", e.message);
    assert_eq!(c.revision().await, before);
    refused_naming(
        c.create(&Obj::server("demo", "cache").spec("networks", json!([{"port": "mine"}])))
            .await,
        409,
        "spec.networks[0].port",
    );
    // Dropped by web: still bound to web (its guest may still have the NIC), so db waits
    // until the ports controller unbinds it, lest two guests share one MAC and address.
    c.patch(
        &server("web"),
        MERGE,
        &json!({"spec": {"networks": [{"network": "blue"}]}}),
        "",
    )
    .await
    .expect("web drops its port");
    let before = c.revision().await;
    let e = refused_naming(
        c.patch(&server("db"), MERGE, &add, "").await,
        409,
        "spec.networks[1].port",
    );
    assert!(
        e.message.contains("bound to server \"web\""),
        "{}",
        e.message
    );
    assert_eq!(c.revision().await, before, "nothing written");
    c.patch(
        &c.status("Port", Some("demo"), "mine"),
        MERGE,
        &json!({"status": {"boundTo": null}}),
        "",
    )
    .await
    .expect("unbound");
    c.patch(&server("db"), MERGE, &add, "")
        .await
        .expect("a released port is added");
    assert_eq!(c.port_claim("demo", "mine").await, "db");
}

async fn as_admin<T>(f: impl std::future::Future<Output = T>) -> T {
    CLUSTER_ADMIN.scope(true, f).await
}

/// The operator's uplink: external network `public` of project demo, made by a cluster admin.
async fn uplink(c: &Cloud) {
    as_admin(c.create(&Obj::network("demo", "public").spec("external", json!(true))))
        .await
        .expect("the operator's uplink");
}

#[tokio::test]
async fn of_many_servers_naming_one_free_port_at_once_exactly_one_gets_it() {
    let c = Cloud::with_demo().await;
    c.create_all(&[
        Obj::network("demo", "blue"),
        Obj::port("demo", "mine", "blue"),
    ])
    .await;
    // Twelve creates and twelve updates of existing servers, all at once.
    for i in 0..12 {
        c.create(&Obj::server("demo", &format!("old-{i}")))
            .await
            .expect("server");
    }
    let creates = (0..12).map(|i| {
        let c = &c;
        async move {
            c.create(&Obj::server_on_port("demo", &format!("new-{i}"), "mine"))
                .await
        }
    });
    let updates = (0..12).map(|i| {
        let c = &c;
        async move {
            c.patch(
                &c.target("Server", Some("demo"), Some(&format!("old-{i}"))),
                MERGE,
                &json!({"spec": {"networks": [{"port": "mine"}]}}),
                "",
            )
            .await
            .map(|(_, v)| v)
        }
    });
    let (created, updated) = futures::join!(
        futures::future::join_all(creates),
        futures::future::join_all(updates)
    );
    let mut winners = Vec::new();
    for r in created.into_iter().chain(updated) {
        match r {
            Ok(s) => winners.push(
                s["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
            ),
            Err(e) => {
                assert_eq!((e.code, field(&e)), (409, "spec.networks[0].port"), "{e:?}");
                assert!(e.message.contains("is claimed by server"), "{}", e.message);
            }
        }
    }
    assert_eq!(winners.len(), 1, "{winners:?}");
    assert_eq!(c.port_claim("demo", "mine").await, winners[0]);
    // Only the winner was written naming the port.
    let list = c.list("Server", Some("demo"), "").await.expect("servers");
    let naming: Vec<&str> = list["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|s| {
            s["spec"]["networks"]
                .as_array()
                .is_some_and(|n| !n.is_empty())
        })
        .filter_map(|s| s["metadata"]["name"].as_str())
        .collect();
    assert_eq!(naming, [winners[0].as_str()]);
}

#[tokio::test]
async fn a_port_made_anew_under_a_claimed_name_is_free() {
    let c = Cloud::with_demo().await;
    c.create_all(&[
        Obj::network("demo", "blue"),
        Obj::port("demo", "mine", "blue"),
        Obj::server_on_port("demo", "web", "mine"),
    ])
    .await;
    assert_eq!(c.port_claim("demo", "mine").await, "web");
    // Deleted and made again: web still names it, but its claim went with the old Port.
    c.delete("Port", Some("demo"), "mine", "")
        .await
        .expect("delete");
    c.create(&Obj::port("demo", "mine", "blue"))
        .await
        .expect("port again");
    assert_eq!(c.port_claim("demo", "mine").await, "");
    c.create(&Obj::server_on_port("demo", "db", "mine"))
        .await
        .expect("the new port is free");
    assert_eq!(c.port_claim("demo", "mine").await, "db");
    // A write to the Port cannot set or change its claim.
    let e = refused(
        c.patch(
            &c.target("Port", Some("demo"), Some("mine")),
            MERGE,
            &json!({"metadata": {"annotations": {CLAIMED_BY: "web/x"}}}),
            "",
        )
        .await,
    );
    assert_eq!(e.code, 422, "{e:?}");
    assert_eq!(c.port_claim("demo", "mine").await, "db");
}

#[tokio::test]
async fn a_deleted_server_leaves_its_port_free() {
    let c = Cloud::with_demo().await;
    c.create_all(&[
        Obj::network("demo", "blue"),
        Obj::port("demo", "mine", "blue"),
        Obj::server_on_port("demo", "web", "mine"),
    ])
    .await;
    refused_naming(
        c.create(&Obj::server_on_port("demo", "db", "mine")).await,
        409,
        "spec.networks[0].port",
    );
    c.delete("Server", Some("demo"), "web", "")
        .await
        .expect("delete web");
    c.create(&Obj::server_on_port("demo", "db", "mine"))
        .await
        .expect("web's port is free once web is gone");
    assert_eq!(c.port_claim("demo", "mine").await, "db");
    // A Server made anew under the holder's name holds nothing of the old one's.
    c.delete("Server", Some("demo"), "db", "")
        .await
        .expect("delete db");
    c.create(&Obj::server("demo", "db"))
        .await
        .expect("db again");
    c.create(&Obj::server_on_port("demo", "cache", "mine"))
        .await
        .expect("the new db holds nothing");
}

#[tokio::test]
async fn a_port_named_before_it_exists_is_reserved_and_claimed_at_its_create() {
    let c = Cloud::with_demo().await;
    c.create_all(&[
        Obj::network("demo", "blue"),
        Obj::server_on_port("demo", "web", "later"),
    ])
    .await;
    let e = refused_naming(
        c.create(&Obj::server_on_port("demo", "db", "later")).await,
        409,
        "spec.networks[0].port",
    );
    assert!(e.message.contains("\"web\""), "{}", e.message);
    c.create(&Obj::port("demo", "later", "blue"))
        .await
        .expect("port");
    assert_eq!(c.port_claim("demo", "later").await, "web");
    refused_naming(
        c.create(&Obj::server_on_port("demo", "db", "later")).await,
        409,
        "spec.networks[0].port",
    );
    // A reservation dropped goes with the write that drops it.
    c.create(&Obj::server_on_port("demo", "cache", "other"))
        .await
        .expect("cache");
    c.patch(
        &c.target("Server", Some("demo"), Some("cache")),
        MERGE,
        &json!({"spec": {"networks": []}}),
        "",
    )
    .await
    .expect("cache drops it");
    c.create(&Obj::server_on_port("demo", "db", "other"))
        .await
        .expect("a dropped reservation is free");
    // And with the Server's delete.
    c.delete("Server", Some("demo"), "db", "")
        .await
        .expect("delete db");
    c.create(&Obj::server_on_port("demo", "api", "other"))
        .await
        .expect("a deleted server's reservation is free");
    c.create(&Obj::port("demo", "other", "blue"))
        .await
        .expect("port");
    assert_eq!(c.port_claim("demo", "other").await, "api");
}

#[tokio::test]
async fn a_server_uses_only_networks_its_project_may_use() {
    let c = Cloud::with_demo().await;
    uplink(&c).await;
    as_admin(c.create(&Obj::port("demo", "uplink", "public")))
        .await
        .expect("a port on it");
    let before = c.revision().await;
    let on = |net: &str| {
        Obj::server("demo", "web").spec("networks", json!([{"network": "blue"}, {"network": net}]))
    };
    c.create(&Obj::network("demo", "blue"))
        .await
        .expect("network");
    let before_web = c.revision().await;
    assert!(before_web > before);
    // An external network, or a port on one: 403 naming the field, nothing stored.
    refused_naming(
        c.create(&on("public")).await,
        403,
        "spec.networks[1].network",
    );
    refused_naming(
        c.create(&Obj::server_on_port("demo", "web", "uplink"))
            .await,
        403,
        "spec.networks[0].port",
    );
    assert_eq!(c.revision().await, before_web, "nothing written");
    // Another project's network cannot even be named.
    c.create(&Obj::project("other")).await.expect("project");
    refused_naming(
        c.create(&on("other/blue")).await,
        422,
        "spec.networks[1].network",
    );
    // A network not made yet is waited for; an admin may attach the uplink.
    c.create(&on("later")).await.expect("a network made later");
    as_admin(
        c.create(&Obj::server("demo", "edge").spec("networks", json!([{"network": "public"}]))),
    )
    .await
    .expect("an admin attaches a server to an external network");
    // Adding it later by an update is refused the same way.
    refused_naming(
        c.patch(
            &c.target("Server", Some("demo"), Some("web")),
            MERGE,
            &json!({"spec": {"networks": [{"network": "blue"}, {"network": "later"}, {"network": "public"}]}}),
            "",
        )
        .await, 403, "spec.networks[2].network");
}

/// A member cannot reach the cloud's uplink through a Port either: not by making one on it
/// (named by her Server beforehand or not), and not by one her reservation would become the
/// claim of when the operator makes it.
#[tokio::test]
async fn a_member_attaches_no_server_to_an_external_network_through_a_port() {
    let c = Cloud::with_demo().await;
    uplink(&c).await;
    c.create(&Obj::server_on_port("demo", "web", "p"))
        .await
        .expect("a port named before it exists");
    let before = c.revision().await;
    for name in ["p", "other"] {
        let e = refused_naming(
            c.create(&Obj::port("demo", name, "public")).await,
            403,
            "spec.network",
        );
        assert!(e.message.contains("external"), "{}", e.message);
    }
    assert_eq!(c.revision().await, before, "nothing written");
    // Made by the operator, the port is not the member's Server's for its reservation.
    as_admin(c.create(&Obj::port("demo", "p", "public")))
        .await
        .expect("the operator's port");
    assert_eq!(c.port_claim("demo", "p").await, "");
    // A Server an admin wrote takes it so.
    as_admin(c.create(&Obj::server_on_port("demo", "edge", "q")))
        .await
        .expect("an admin's server");
    as_admin(c.create(&Obj::port("demo", "q", "public")))
        .await
        .expect("the operator's port");
    assert_eq!(c.port_claim("demo", "q").await, "edge");
}

/// A Port controlled by a Server (the one the ports controller makes for its entry) is made by
/// the controllers alone: a member's would pass for the Server's own.
#[tokio::test]
async fn only_the_controllers_make_a_port_controlled_by_a_server() {
    let c = Cloud::with_demo().await;
    c.create(&Obj::network("demo", "blue"))
        .await
        .expect("network");
    let web = c.create(&Obj::server("demo", "web")).await.expect("web");
    let mut made = Obj::port("demo", "web-0", "blue");
    made.0["metadata"]["ownerReferences"] = json!([{
        "apiVersion": "compute.stratus.dev/v1", "kind": "Server", "name": "web",
        "uid": web["metadata"]["uid"], "controller": true, "blockOwnerDeletion": true,
    }]);
    let before = c.revision().await;
    refused_naming(c.create(&made).await, 403, "metadata.ownerReferences");
    assert_eq!(c.revision().await, before, "nothing written");
    as_admin(c.create(&made))
        .await
        .expect("the controllers make it");
}

#[tokio::test]
async fn a_server_names_only_existing_volumes_of_its_own_project() {
    let c = Cloud::with_demo().await;
    c.create(&Obj::project("other")).await.expect("project");
    c.create(&volume("other", "theirs")).await.expect("volume");
    let before = c.revision().await;
    let e = refused_naming(
        c.create(&with_volumes("demo", "web", &["theirs"])).await,
        422,
        "spec.volumes[0].volume",
    );
    assert_eq!(e.details.causes[0].reason, "FieldValueNotFound");
    assert_eq!(c.revision().await, before, "nothing written");
    assert_eq!(attached_to(&c, "other", "theirs").await, Value::Null);
}

#[tokio::test]
async fn a_boot_volume_is_bootable_and_stays() {
    let c = Cloud::with_demo().await;
    c.create(&volume("demo", "plain")).await.expect("volume");
    c.create(&volume("demo", "root").spec("bootable", json!(true)))
        .await
        .expect("volume");
    let booting = |v: &str| {
        let mut s = Obj::server("demo", "web").spec("bootVolume", json!(v));
        s.0["spec"].as_object_mut().map(|m| m.remove("image"));
        s
    };
    refused_naming(c.create(&booting("plain")).await, 422, "spec.bootVolume");
    c.create(&booting("root")).await.expect("server");
    assert_eq!(attached_to(&c, "demo", "root").await, "web");
    let t = c.target("Server", Some("demo"), Some("web"));
    refused_naming(
        c.patch(&t, MERGE, &json!({"spec": {"bootVolume": "plain"}}), "")
            .await,
        422,
        "spec.bootVolume",
    );
}

#[tokio::test]
async fn of_servers_racing_for_one_volume_exactly_one_gets_it() {
    let c = Cloud::with_demo().await;
    c.create(&volume("demo", "data")).await.expect("volume");
    let servers: Vec<Obj> = (0..8)
        .map(|i| with_volumes("demo", &format!("s{i}"), &["data"]))
        .collect();
    let results = futures::future::join_all(servers.iter().map(|s| c.create(s))).await;
    let won: Vec<usize> = results
        .iter()
        .enumerate()
        .filter_map(|(i, r)| r.is_ok().then_some(i))
        .collect();
    assert_eq!(won.len(), 1, "{results:?}");
    for r in &results {
        if let Err(e) = r {
            assert_eq!((e.code, field(e)), (409, "spec.volumes[0].volume"), "{e:?}");
        }
    }
    assert_eq!(
        attached_to(&c, "demo", "data").await,
        format!("s{}", won[0])
    );
}

async fn read(
    c: &Cloud,
    name: &str,
    node: &str,
) -> stratus_apiserver::base::error::ApiResult<Value> {
    let t = c.target("Volume", Some("demo"), Some(name));
    c.node(node).read(&t, "").await
}

#[tokio::test]
async fn a_compute_node_reads_a_volume_attached_to_a_server_placed_on_it() {
    let c = Cloud::with_demo().await;
    c.hypervisor("n1", 4, 4096).await;
    c.create(&volume("demo", "data")).await.expect("volume");
    c.create(&volume("demo", "spare")).await.expect("volume");
    c.create(&with_volumes("demo", "web", &["data"]))
        .await
        .expect("server");
    // Not placed yet: nothing ties the volume to a node.
    assert_eq!(refused(read(&c, "data", "n1").await).code, 403);
    c.bind("demo", "web", "n1").await.expect("placed");
    read(&c, "data", "n1")
        .await
        .expect("attached to a server placed on n1");
    assert_eq!(refused(read(&c, "data", "n2").await).code, 403);
    assert_eq!(refused(read(&c, "spare", "n1").await).code, 403);
}

#[tokio::test]
async fn a_storage_node_keeps_the_attachment_it_reports_on() {
    let c = Cloud::with_demo().await;
    c.create(&volume("demo", "data")).await.expect("volume");
    place_volume(&c, "data", "n1").await;
    c.create(&with_volumes("demo", "web", &["data"]))
        .await
        .expect("server");
    let status = c.status("Volume", Some("demo"), "data");
    let n1 = c.node("n1");
    // The node reports its volume, the attachment kept.
    n1.patch(
        &status,
        MERGE,
        r#"{"status":{"phase":"InUse","sizeGiB":1}}"#,
    )
    .await
    .expect("its status");
    assert_eq!(attached_to(&c, "demo", "data").await, "web");
    // It cannot let the volume go (or give it to another server) itself.
    for body in [
        r#"{"status":{"attachedTo":null}}"#,
        r#"{"status":{"attachedTo":"db"}}"#,
    ] {
        let e = refused(n1.patch(&status, MERGE, body).await);
        assert!(matches!(e.code, 403 | 422), "{body}: {e:?}");
    }
    assert_eq!(attached_to(&c, "demo", "data").await, "web");
}

#[tokio::test]
async fn a_compute_node_reads_the_images_its_boot_volume_recorded_and_no_namesake() {
    let c = Cloud::with_demo().await;
    c.hypervisor("n1", 4, 4096).await;
    let image = |name: &str, format: &str, kernel: Option<&str>| {
        let container = if format == "aki" { "aki" } else { "bare" };
        let mut spec = json!({"diskFormat": format, "containerFormat": container,
                              "source": {"url": format!("https://images.example/{name}")}});
        if let Some(k) = kernel {
            spec["kernelImage"] = json!(k);
        }
        Obj(json!({
            "apiVersion": "image.stratus.dev/v1", "kind": "Image",
            "metadata": {"name": name, "namespace": "demo"},
            "spec": spec,
        }))
    };
    let uid = |v: Value| {
        v["metadata"]["uid"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    let kernel = uid(c.create(&image("k", "aki", None)).await.expect("kernel"));
    let tiny = uid(c
        .create(&image("tiny", "raw", Some("k")))
        .await
        .expect("image"));
    c.create(
        &volume("demo", "root")
            .spec("bootable", json!(true))
            .spec("source", json!({"image": "tiny"})),
    )
    .await
    .expect("volume");
    // The storage node the volume is placed on reads its image and that image's kernel (to
    // record them when it fills the volume); before its placement it reads neither.
    let storage_read = |name: &'static str| {
        let t = c.target("Image", Some("demo"), Some(name));
        let s1 = c.node("s1");
        async move { s1.read(&t, "").await }
    };
    assert_eq!(refused(storage_read("k").await).code, 403);
    place_volume(&c, "root", "s1").await;
    storage_read("tiny").await.expect("its volume's image");
    storage_read("k").await.expect("that image's kernel");
    // What the storage agent records when it fills the volume.
    c.patch(
        &c.status("Volume", Some("demo"), "root"),
        MERGE,
        &json!({"status": {
            "sourceImage": {"namespace": "demo", "name": "tiny", "uid": tiny},
            "kernelImage": {"namespace": "demo", "name": "k", "uid": kernel},
        }}),
        "",
    )
    .await
    .expect("recorded");
    let mut s = Obj::server("demo", "web").spec("bootVolume", json!("root"));
    s.0["spec"].as_object_mut().map(|m| m.remove("image"));
    c.create(&s).await.expect("server");
    c.bind("demo", "web", "n1").await.expect("placed");
    let read = |name: &'static str| {
        let t = c.target("Image", Some("demo"), Some(name));
        let n1 = c.node("n1");
        async move { n1.read(&t, "").await }
    };
    read("tiny").await.expect("the volume's image");
    read("k").await.expect("its kernel");
    // The kernel re-published under its name: a new image the volume was not made from.
    c.delete("Image", Some("demo"), "k", "")
        .await
        .expect("delete");
    let again = uid(c
        .create(&image("k", "aki", None))
        .await
        .expect("kernel again"));
    assert_ne!(again, kernel);
    assert_eq!(refused(read("k").await).code, 403);
    read("tiny").await.expect("the volume's image still");
}
