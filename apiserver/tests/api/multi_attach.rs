//! Multi-attach volumes at admission: a volume held by one Server is refused to a second
//! unless it is `spec.multiAttach`; a multi-attach volume is held by up to 16 Servers of its
//! project, each listed in `status.attachments`; its `spec.multiAttach` changes only while no
//! Server holds it; it is not deleted while any does; a compute node reads it through any of
//! its servers placed there, and no node rewrites its attachments.

use serde_json::{Value, json};

use crate::fixtures::{Cloud, MERGE, Obj, refused, refused_naming};

fn volume(name: &str, multi: bool) -> Obj {
    Obj(json!({
        "apiVersion": "storage.stratus.dev/v1", "kind": "Volume",
        "metadata": {"name": name, "namespace": "demo"},
        "spec": {"sizeGiB": 1, "multiAttach": multi},
    }))
}

fn holding(ns: &str, server: &str, volume: &str) -> Obj {
    Obj::server(ns, server).spec("volumes", json!([{"volume": volume}]))
}

/// The servers in the volume's `status.attachments`, and its `status.attachedTo`.
async fn holders(c: &Cloud, name: &str) -> (Vec<String>, Value) {
    let v = c.get("Volume", Some("demo"), name).await.expect("volume");
    let servers = v["status"]["attachments"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|a| a["server"].as_str().map(str::to_owned))
        .collect();
    (servers, v["status"]["attachedTo"].clone())
}

#[tokio::test]
async fn a_second_server_takes_a_volume_only_when_it_is_multi_attach() {
    let c = Cloud::with_demo().await;
    c.create(&volume("data", false)).await.expect("volume");
    c.create(&volume("shared", true)).await.expect("volume");
    c.create(&holding("demo", "web", "data"))
        .await
        .expect("web");
    let (servers, first) = holders(&c, "data").await;
    assert_eq!((servers, first), (vec!["web".to_string()], json!("web")));

    // A plain volume: the second server is refused, naming the field, the holder and why;
    // nothing is written.
    let before = c.revision().await;
    let e = refused_naming(
        c.create(&holding("demo", "db", "data")).await,
        409,
        "spec.volumes[0].volume",
    );
    assert!(
        e.message.contains("\"web\"") && e.message.contains("spec.multiAttach"),
        "{}",
        e.message
    );
    assert_eq!(c.revision().await, before);

    // A multi-attach volume: both servers hold it, in the order they took it.
    c.create(&holding("demo", "web2", "shared"))
        .await
        .expect("web2");
    c.create(&holding("demo", "db2", "shared"))
        .await
        .expect("db2");
    let (servers, first) = holders(&c, "shared").await;
    assert_eq!(servers, ["web2", "db2"]);
    assert_eq!(first, "web2", "attachedTo stays the first");
    let v = c
        .get("Volume", Some("demo"), "shared")
        .await
        .expect("volume");
    assert_eq!(v["status"]["conditions"][0]["type"], "Attached", "{v}");

    // Of another project: not found there (a server names its own project's volumes).
    c.create(&Obj::project("other")).await.expect("project");
    refused_naming(
        c.create(&holding("other", "intruder", "shared")).await,
        422,
        "spec.volumes[0].volume",
    );
    assert_eq!(holders(&c, "shared").await.0, ["web2", "db2"]);

    // Held by any server: not deleted.
    let e = refused(c.delete("Volume", Some("demo"), "shared", "").await);
    assert_eq!(e.code, 409, "{e:?}");
}

#[tokio::test]
async fn a_multi_attach_volume_has_at_most_sixteen_servers() {
    let c = Cloud::with_demo().await;
    c.create(&volume("shared", true)).await.expect("volume");
    for i in 0..16 {
        c.create(&holding("demo", &format!("s{i}"), "shared"))
            .await
            .unwrap_or_else(|e| panic!("server {i}: {e:?}"));
    }
    let before = c.revision().await;
    let e = refused_naming(
        c.create(&holding("demo", "s16", "shared")).await,
        409,
        "spec.volumes[0].volume",
    );
    assert!(e.message.contains("16 servers"), "{}", e.message);
    assert_eq!(c.revision().await, before, "nothing written");
    assert_eq!(holders(&c, "shared").await.0.len(), 16);
}

#[tokio::test]
async fn of_servers_racing_for_a_multi_attach_volume_each_is_listed_once() {
    let c = Cloud::with_demo().await;
    c.create(&volume("shared", true)).await.expect("volume");
    let servers: Vec<Obj> = (0..8)
        .map(|i| holding("demo", &format!("s{i}"), "shared"))
        .collect();
    let results = futures::future::join_all(servers.iter().map(|s| c.create(s))).await;
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    let mut got = holders(&c, "shared").await.0;
    got.sort();
    let want: Vec<String> = (0..8).map(|i| format!("s{i}")).collect();
    assert_eq!(got, want, "no claim lost to another");
}

#[tokio::test]
async fn multi_attach_changes_only_while_no_server_holds_the_volume() {
    let c = Cloud::with_demo().await;
    c.create(&volume("shared", true)).await.expect("volume");
    let t = c.target("Volume", Some("demo"), Some("shared"));
    // Detached: it may change both ways.
    for multi in [false, true] {
        c.patch(&t, MERGE, &json!({"spec": {"multiAttach": multi}}), "")
            .await
            .expect("detached");
    }
    c.create(&holding("demo", "web", "shared"))
        .await
        .expect("web");
    refused_naming(
        c.patch(&t, MERGE, &json!({"spec": {"multiAttach": false}}), "")
            .await,
        422,
        "spec.multiAttach",
    );
    let v = c
        .get("Volume", Some("demo"), "shared")
        .await
        .expect("volume");
    assert_eq!(v["spec"]["multiAttach"], true);
}

#[tokio::test]
async fn a_node_reads_a_multi_attach_volume_through_any_of_its_servers_and_keeps_the_list() {
    let c = Cloud::with_demo().await;
    c.hypervisor("n1", 4, 4096).await;
    c.hypervisor("n2", 4, 4096).await;
    c.hypervisor("n3", 4, 4096).await;
    c.create(&volume("shared", true)).await.expect("volume");
    c.create(&holding("demo", "web", "shared"))
        .await
        .expect("web");
    c.create(&holding("demo", "db", "shared"))
        .await
        .expect("db");
    c.bind("demo", "web", "n1").await.expect("web placed");
    c.bind("demo", "db", "n2").await.expect("db placed");
    let t = c.target("Volume", Some("demo"), Some("shared"));
    c.node("n1").read(&t, "").await.expect("web's node");
    c.node("n2")
        .read(&t, "")
        .await
        .expect("db's node, the second");
    assert_eq!(refused(c.node("n3").read(&t, "").await).code, 403);
    // The storage node reports on the volume, the attachments kept; it cannot rewrite them
    // (they are the API server's and the attachments controller's).
    crate::api::attachments::place_volume(&c, "shared", "s1").await;
    let status = c.status("Volume", Some("demo"), "shared");
    c.node("s1")
        .patch(
            &status,
            MERGE,
            r#"{"status":{"phase":"InUse","sizeGiB":1}}"#,
        )
        .await
        .expect("its report");
    assert_eq!(holders(&c, "shared").await.0, ["web", "db"]);
    for body in [
        r#"{"status":{"attachments":[{"server":"web"}]}}"#,
        r#"{"status":{"attachments":[{"server":"web"},{"server":"db"},{"server":"evil"}]}}"#,
    ] {
        let e = refused(c.node("s1").patch(&status, MERGE, body).await);
        assert!(matches!(e.code, 403 | 422), "{body}: {e:?}");
    }
    assert_eq!(holders(&c, "shared").await.0, ["web", "db"]);
}

/// A multi-attach volume whose servers sit on two nodes other than its own is served to each
/// by an export of its own (what the attachments controller makes): each node reads the volume
/// and its own export, never where and under what name the other node is served; the storage
/// node reads and reports both.
#[tokio::test]
async fn each_node_of_a_multi_attach_volume_reads_its_own_export_alone() {
    let c = Cloud::with_demo().await;
    c.hypervisor("n1", 4, 4096).await;
    c.hypervisor("n2", 4, 4096).await;
    c.create(&volume("shared", true)).await.expect("volume");
    for (server, node) in [("web", "n1"), ("db", "n2")] {
        c.create(&holding("demo", server, "shared"))
            .await
            .expect("server");
        c.bind("demo", server, node).await.expect("placed");
    }
    crate::api::attachments::place_volume(&c, "shared", "s1").await;
    // The nodes the attachments controller records each server on.
    c.patch(
        &c.status("Volume", Some("demo"), "shared"),
        MERGE,
        &json!({"status": {"attachments": [{"server": "web", "node": "n1"},
                                           {"server": "db", "node": "n2"}]}}),
        "",
    )
    .await
    .expect("attached on n1 and n2");
    c.storage_address("s1", "p1", "10.0.0.1").await;
    let vol = c
        .get("Volume", Some("demo"), "shared")
        .await
        .expect("volume");
    let uid = vol["metadata"]["uid"].as_str().expect("a uid");
    for (node, name) in [("n1", "x1"), ("n2", "x2")] {
        let export = format!("{uid}.{node}");
        c.create(&Obj(json!({
            "apiVersion": "storage.stratus.dev/v1", "kind": "VolumeExport",
            "metadata": {"name": export},
            "spec": {"volume": {"namespace": "demo", "name": "shared", "uid": uid},
                     "storageNode": "s1", "node": node},
        })))
        .await
        .expect("an export per node");
        c.node("s1")
            .patch(
                &c.status("VolumeExport", None, &export),
                MERGE,
                &json!({"status": {"host": "10.0.0.1", "port": 10809, "exportName": name}})
                    .to_string(),
            )
            .await
            .expect("served by its storage node");
    }
    let t = c.target("Volume", Some("demo"), Some("shared"));
    let x = |node: &str| c.target("VolumeExport", None, Some(&format!("{uid}.{node}")));
    for (node, other) in [("n1", "n2"), ("n2", "n1")] {
        c.node(node).read(&t, "").await.expect("the volume");
        let own = c.node(node).read(&x(node), "").await.expect("its export");
        assert_eq!(own["spec"]["node"], node);
        assert_eq!(
            refused(c.node(node).read(&x(other), "").await).code,
            403,
            "{node} reads {other}'s export"
        );
    }
    let served = c
        .node("s1")
        .read(
            &c.target("VolumeExport", None, None),
            "fieldSelector=spec.storageNode%3Ds1",
        )
        .await
        .expect("those s1 serves");
    assert_eq!(crate::fixtures::names(&served).len(), 2);
}
