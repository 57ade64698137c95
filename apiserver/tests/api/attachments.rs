//! Volumes attached to Servers at admission: the claim in the Server's own transaction, the
//! refusals (a volume of another project, one held by another server, one not bootable), the
//! race for one volume, and what a compute node may read of an attached volume. Ports named
//! by a Server: one bound to another server refused.

use serde_json::{Value, json};

use crate::fixtures::{Cloud, MERGE, Obj, refused};

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

fn field(e: &stratus_apiserver::base::error::ApiError) -> &str {
    e.details
        .causes
        .first()
        .map(|c| c.field.as_str())
        .unwrap_or_default()
}

/// Places volume `name` of project demo on `node`, as the volume scheduler does: through its
/// binding, on a new file pool `p1` of that node (Ready, 10 GiB).
async fn place_volume(c: &Cloud, name: &str, node: &str) {
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
    let e = refused(c.create(&with_volumes("demo", "db", &["data"])).await);
    assert_eq!(
        (e.code, field(&e)),
        (409, "spec.volumes[0].volume"),
        "{e:?}"
    );
    assert!(e.message.contains("\"web\""), "{}", e.message);
    assert_eq!(c.revision().await, before);
    assert_eq!(refused(c.get("Server", Some("demo"), "db").await).code, 404);
    // So is adding it to an existing server.
    c.create(&Obj::server("demo", "db")).await.expect("db");
    let t = c.target("Server", Some("demo"), Some("db"));
    let e = refused(
        c.patch(
            &t,
            MERGE,
            &json!({"spec": {"volumes": [{"volume": "data"}]}}),
            "",
        )
        .await,
    );
    assert_eq!((e.code, field(&e)), (409, "spec.volumes[0].volume"));
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
    let e = refused(c.patch(&server("db"), MERGE, &add, "").await);
    assert_eq!((e.code, field(&e)), (409, "spec.networks[1].port"), "{e:?}");
    assert!(e.message.contains("\"web\""), "{}", e.message);
    assert_eq!(c.revision().await, before);
    let e = refused(
        c.create(&Obj::server("demo", "cache").spec("networks", json!([{"port": "mine"}])))
            .await,
    );
    assert_eq!((e.code, field(&e)), (409, "spec.networks[0].port"), "{e:?}");
    // Released (taken out of web, unbound by the ports controller): db may have it.
    c.patch(
        &c.status("Port", Some("demo"), "mine"),
        MERGE,
        &json!({"status": {"boundTo": null}}),
        "",
    )
    .await
    .expect("released");
    c.patch(&server("db"), MERGE, &add, "")
        .await
        .expect("a released port is added");
}

#[tokio::test]
async fn a_server_names_only_existing_volumes_of_its_own_project() {
    let c = Cloud::with_demo().await;
    c.create(&Obj::project("other")).await.expect("project");
    c.create(&volume("other", "theirs")).await.expect("volume");
    let before = c.revision().await;
    let e = refused(c.create(&with_volumes("demo", "web", &["theirs"])).await);
    assert_eq!(
        (e.code, field(&e)),
        (422, "spec.volumes[0].volume"),
        "{e:?}"
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
    let e = refused(c.create(&booting("plain")).await);
    assert_eq!((e.code, field(&e)), (422, "spec.bootVolume"), "{e:?}");
    c.create(&booting("root")).await.expect("server");
    assert_eq!(attached_to(&c, "demo", "root").await, "web");
    let t = c.target("Server", Some("demo"), Some("web"));
    let e = refused(
        c.patch(&t, MERGE, &json!({"spec": {"bootVolume": "plain"}}), "")
            .await,
    );
    assert_eq!((e.code, field(&e)), (422, "spec.bootVolume"));
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
