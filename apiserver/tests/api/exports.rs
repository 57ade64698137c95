//! VolumeExports: made for a volume and a node exactly, read by the two nodes they name and by
//! no tenant, their status written by their storage node alone, at the address its pool
//! records.

use serde_json::{Value, json};
use stratus_api_types::identity::Role;
use stratus_api_types::storage::volume_export_name;
use stratus_apiserver::admission::CLUSTER_ADMIN;
use stratus_apiserver::admission::exports::EXPORTS_PER_PROJECT_AND_STORAGE_NODE;

use crate::fixtures::{Cloud, JSON, MERGE, Obj, field, refused, refused_naming};

/// A cloud with project demo, pool p1 on node n1, and volume v placed on it and attached to
/// server s-n2 on node n2: its uid.
async fn placed() -> (Cloud, String) {
    let c = Cloud::with_demo().await;
    let uid = place(&c).await;
    (c, uid)
}

/// Pool p1 on node n1 and volume v placed on it and attached to server s-n2 on node n2, in
/// cloud `c` (with project demo): v's uid.
async fn place(c: &Cloud) -> String {
    CLUSTER_ADMIN
        .scope(
            true,
            Box::pin(c.create(&Obj(json!({
                "apiVersion": "storage.stratus.dev/v1", "kind": "StoragePool",
                "metadata": {"name": "p1"},
                "spec": {"backend": "lvm", "node": "n1", "vgName": "stratus", "reservedPercentage": 0},
            })))),
        )
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
    attached_on(c, "demo", "v", &["n2".to_owned()]).await
}

/// The export of volume v (of `uid`, on n1) to `node`, named `name`.
fn export(name: &str, uid: &str, storage: &str, node: &str) -> Obj {
    Obj(json!({
        "apiVersion": "storage.stratus.dev/v1", "kind": "VolumeExport",
        "metadata": {"name": name},
        "spec": {"volume": {"namespace": "demo", "name": "v", "uid": uid},
                 "storageNode": storage, "node": node},
    }))
}

/// One export per (volume, node), under the name of the pair, for the volume that exists with
/// that uid, on the node its data is on, to a node one of its attachments is on: anything else is 422 naming the field, a second
/// create 409, a change of its spec 422.
#[tokio::test]
async fn an_export_is_made_only_for_its_volume_and_node_exactly() {
    let (c, uid) = placed().await;
    let name = format!("{uid}.n2");
    let e = refused_naming(
        c.create(&export("v.n2", &uid, "n1", "n2")).await,
        422,
        "metadata.name",
    );
    assert!(e.message.contains(&name), "{}", e.message);
    refused_naming(
        c.create(&export("other.n2", "other", "n1", "n2")).await,
        422,
        "spec.volume.uid",
    );
    let e = refused_naming(
        c.create(&export(&name, &uid, "n9", "n2")).await,
        422,
        "spec.storageNode",
    );
    assert!(e.message.contains("on n1"), "{}", e.message);
    let e = refused(
        c.create(&export(&format!("{uid}.n1"), &uid, "n1", "n1"))
            .await,
    );
    assert_eq!((e.code, field(&e)), (422, "spec.node"), "{e:?}");
    // Only to a node an attachment of the volume is on: n3 holds none.
    let e = refused_naming(
        c.create(&export(&format!("{uid}.n3"), &uid, "n1", "n3"))
            .await,
        422,
        "spec.node",
    );
    assert!(e.message.contains("no attachment"), "{}", e.message);
    c.create(&export(&name, &uid, "n1", "n2"))
        .await
        .expect("the export to n2");
    let again = refused(c.create(&export(&name, &uid, "n1", "n2")).await);
    assert_eq!(again.code, 409, "{again:?}");
    let x = c.target("VolumeExport", None, Some(&name));
    refused_naming(
        c.patch(&x, MERGE, &json!({"spec": {"node": "n3"}}), "")
            .await,
        422,
        "spec",
    );
}

/// The node served and the storage node read an export naming them (by name, or listed by
/// their field); another node, and a project's members (even its admin), read none. Only the
/// storage node writes its status, at the address its pool records; no node creates or
/// deletes one.
#[tokio::test]
async fn only_the_nodes_an_export_names_read_it_and_only_its_storage_node_reports_it() {
    let (c, uid) = placed().await;
    let name = format!("{uid}.n2");
    c.create(&export(&name, &uid, "n1", "n2"))
        .await
        .expect("the export to n2");
    let x = c.target("VolumeExport", None, Some(&name));
    let all = c.target("VolumeExport", None, None);
    for node in ["n1", "n2"] {
        c.node(node).read(&x, "").await.expect("named in it");
    }
    let listed = c
        .node("n2")
        .read(&all, "fieldSelector=spec.node%3Dn2")
        .await
        .expect("those to n2");
    assert_eq!(crate::fixtures::names(&listed), std::slice::from_ref(&name));
    let listed = c
        .node("n1")
        .read(&all, "fieldSelector=spec.storageNode%3Dn1")
        .await
        .expect("those n1 serves");
    assert_eq!(crate::fixtures::names(&listed), std::slice::from_ref(&name));
    let n3 = c.node("n3");
    assert_eq!(refused(n3.read(&x, "").await).code, 403);
    for query in [
        "",
        "fieldSelector=spec.node%3Dn2",
        "fieldSelector=spec.storageNode%3Dn1",
    ] {
        assert_eq!(refused(n3.read(&all, query).await).code, 403, "{query}");
    }
    // Where a project's volume is served is not the project's to read, nor its admin's.
    for (user, grants) in [
        ("dev", vec![(Some("demo"), Role::Member)]),
        ("boss", vec![(Some("demo"), Role::Admin)]),
    ] {
        let u = c.user(user, &grants);
        assert_eq!(refused(u.read(&x, "").await).code, 403, "{user}");
        assert_eq!(refused(u.read(&all, "").await).code, 403, "{user}");
    }
    // Status: the storage node's, at its pool's storage address.
    let status = c.status("VolumeExport", None, &name);
    let served = |host: &str, port: u16| {
        json!({"status": {"host": host, "port": port, "exportName": "x1", "tls": true}}).to_string()
    };
    let e = refused(
        c.node("n2")
            .patch(&status, MERGE, &served("10.0.0.1", 10809))
            .await,
    );
    assert_eq!(e.code, 403, "the node served does not report it: {e:?}");
    let e = refused_naming(
        c.node("n1")
            .patch(&status, MERGE, &served("10.0.0.1", 10809))
            .await,
        422,
        "status.host",
    );
    assert!(
        e.message.contains("records no storage address"),
        "{}",
        e.message
    );
    c.storage_address("n1", "p1", "10.0.0.1").await;
    let e = refused_naming(
        c.node("n1")
            .patch(&status, MERGE, &served("10.0.0.9", 10809))
            .await,
        422,
        "status.host",
    );
    assert!(e.message.contains("not 10.0.0.1"), "{}", e.message);
    let e = refused(
        c.patch(
            &status,
            MERGE,
            &serde_json::from_str::<Value>(&served("10.0.0.9", 10809)).expect("JSON"),
            "",
        )
        .await,
    );
    assert_eq!(field(&e), "status.host", "an admin's write too");
    let e = refused(
        c.node("n1")
            .patch(&status, MERGE, &served("10.0.0.1", 22))
            .await,
    );
    assert_eq!(e.code, 422, "a port below the export ports: {e:?}");
    c.node("n1")
        .patch(&status, MERGE, &served("10.0.0.1", 10809))
        .await
        .expect("served at its pool's address");
    let got = c.node("n2").read(&x, "").await.expect("read by n2");
    assert_eq!(got["status"]["port"], 10809);
    // No node makes or ends one: the attachments controller does.
    let body =
        serde_json::to_string(&export(&format!("{uid}.n3"), &uid, "n1", "n3").0).expect("JSON");
    for node in ["n1", "n3"] {
        assert_eq!(
            refused(c.node(node).create(&all, JSON, &body).await).code,
            403
        );
        assert_eq!(refused(c.node(node).delete(&x, "").await).code, 403);
    }
    let e = refused(
        c.node("n1")
            .patch(&x, MERGE, r#"{"metadata": {"labels": {"a": "b"}}}"#)
            .await,
    );
    assert_eq!(e.code, 403, "{e:?}");
}

/// A Volume stored with an export in its status (before exports were VolumeExports) still
/// decodes, without it; a Volume's status cannot record one any more.
#[tokio::test]
async fn a_volumes_status_records_no_export() {
    let (c, _) = placed().await;
    let vol = c.status("Volume", Some("demo"), "v");
    let e = refused(
        c.patch(
            &vol,
            MERGE,
            &json!({"status": {"export": {"node": "n2", "host": "10.0.0.1", "port": 10809, "name": "x1"}}}),
            "",
        )
        .await,
    );
    assert_eq!((e.code, field(&e)), (400, "status.export"), "{e:?}");
    let stored = json!({"apiVersion": "storage.stratus.dev/v1", "kind": "Volume",
        "metadata": {"name": "v", "namespace": "demo"}, "spec": {"sizeGiB": 1},
        "status": {"phase": "InUse", "node": "n1", "attachedTo": "web",
                   "export": {"node": "n2", "host": "10.0.0.1", "port": 10809, "name": "x1"}}});
    let v: stratus_api_types::storage::Volume =
        serde_json::from_value(stored).expect("an older stored volume decodes");
    let st = v.status.expect("a status");
    assert!(st.dropped_export.is_some());
    let written = serde_json::to_value(&st).expect("JSON");
    assert_eq!(written.get("export"), None, "never written again");
}

/// A Volume stored with `status.export` by older code (written straight to etcd, as it was)
/// is never served with it: not to a project member's GET or LIST, nor in a watch event; the
/// rest of its status is served as stored.
#[tokio::test]
async fn a_volumes_export_stored_by_older_code_is_never_served() {
    let (_etcd, c) = crate::api::etcd::cloud().await;
    place(&c).await;
    let key = "/registry/storage.stratus.dev/volumes/demo/v";
    let stored = c.api.store.get(key).await.expect("read").expect("stored");
    let mut older = stored.value.clone();
    older["status"]["export"] =
        json!({"node": "n2", "host": "10.0.0.1", "port": 10809, "name": "x1"});
    let mut events = c
        .watch(
            "Volume",
            Some("demo"),
            &format!("resourceVersion={}", stored.mod_revision),
        )
        .await
        .expect("a watch");
    c.api
        .store
        .update(key, &older, stored.mod_revision)
        .await
        .expect("written as older code did");
    let (kind, got) = events.next().await;
    assert_eq!(kind, "MODIFIED");
    assert_eq!(got["status"].get("export"), None, "watched: {got}");
    assert_eq!(got["status"]["attachments"][0]["server"], "s-n2", "{got}");
    let dev = c.user("dev", &[(Some("demo"), Role::Member)]);
    let t = c.target("Volume", Some("demo"), Some("v"));
    let got = dev.read(&t, "").await.expect("a member's GET");
    assert_eq!(got["status"].get("export"), None, "read: {got}");
    assert_eq!(got["status"]["attachments"][0]["node"], "n2", "{got}");
    let all = c.target("Volume", Some("demo"), None);
    for query in ["", "resourceVersion=0", "limit=1"] {
        let list = dev.read(&all, query).await.expect("a member's LIST");
        let item = &list["items"][0];
        assert_eq!(item["metadata"]["name"], "v", "{list}");
        assert_eq!(
            item["status"].get("export"),
            None,
            "listed ({query}): {list}"
        );
    }
    // A fresh watch's first event is the stored object, without it too.
    let mut events = c.watch("Volume", Some("demo"), "").await.expect("a watch");
    let (kind, got) = events.next().await;
    assert_eq!(kind, "ADDED");
    assert_eq!(
        got["status"].get("export"),
        None,
        "watched from the start: {got}"
    );
}

/// Volume `name` of project `ns` (multi-attach, 1 GiB) placed on pool p1 and attached to a
/// server on each of `nodes`: its uid.
async fn attached_on(c: &Cloud, ns: &str, name: &str, nodes: &[String]) -> String {
    c.create(&Obj(json!({
        "apiVersion": "storage.stratus.dev/v1", "kind": "Volume",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"sizeGiB": 1, "multiAttach": true},
    })))
    .await
    .expect("a volume");
    let t = stratus_apiserver::resource::verbs::Target {
        subresource: Some("binding".into()),
        ..c.target("Volume", Some(ns), Some(name))
    };
    c.api
        .bind(
            &t,
            json!({"target": {"name": "p1"}}).to_string().as_bytes(),
            JSON,
            &stratus_apiserver::resource::review::AllowAll,
        )
        .await
        .expect("placed on p1");
    let attachments: Vec<Value> = nodes
        .iter()
        .map(|n| json!({"server": format!("s-{n}"), "node": n}))
        .collect();
    c.patch(
        &c.status("Volume", Some(ns), name),
        MERGE,
        &json!({"status": {"phase": "InUse", "attachments": attachments}}),
        "",
    )
    .await
    .expect("attached");
    let v = c.get("Volume", Some(ns), name).await.expect("the volume");
    v["metadata"]["uid"].as_str().expect("a uid").to_owned()
}

/// The export of volume `name` of `ns` (of `uid`, on n1) to `node`.
fn export_of(ns: &str, name: &str, uid: &str, node: &str) -> Obj {
    Obj(json!({
        "apiVersion": "storage.stratus.dev/v1", "kind": "VolumeExport",
        "metadata": {"name": volume_export_name(uid, node)},
        "spec": {"volume": {"namespace": ns, "name": name, "uid": uid},
                 "storageNode": "n1", "node": node},
    }))
}

/// One project has at most EXPORTS_PER_PROJECT_AND_STORAGE_NODE exports from one storage
/// node (each takes a port of its storage address): beyond it 403 saying why, while another
/// project still gets one.
#[tokio::test]
async fn a_project_takes_a_bounded_number_of_a_storage_nodes_exports() {
    let (c, _) = placed().await;
    let max = EXPORTS_PER_PROJECT_AND_STORAGE_NODE;
    let nodes: Vec<String> = (1..=16).map(|i| format!("m{i}")).collect();
    let mut made = 0;
    let mut vols = 0;
    while made < max {
        vols += 1;
        let name = format!("w{vols}");
        let uid = attached_on(&c, "demo", &name, &nodes).await;
        for node in nodes.iter().take(max - made) {
            c.create(&export_of("demo", &name, &uid, node))
                .await
                .expect("within the bound");
            made += 1;
        }
    }
    let uid = attached_on(&c, "demo", "last", &nodes).await;
    let e = refused(c.create(&export_of("demo", "last", &uid, "m1")).await);
    assert_eq!(e.code, 403, "{e:?}");
    assert!(
        e.message.contains(&format!(
            "project demo has {max} exports from storage node n1"
        )),
        "{}",
        e.message
    );
    c.create(&Obj::project("other"))
        .await
        .expect("project other");
    let uid = attached_on(&c, "other", "x", &nodes[..1]).await;
    c.create(&export_of("other", "x", &uid, "m1"))
        .await
        .expect("another project's export");
}

/// A volume attached over NBD whose export is served without TLS (the storage agent runs
/// with `--nbd-insecure`) does not grow: 422 on `spec.sizeGiB` naming the reason, nothing
/// written (a grown export lets in a second client of the consuming node's address, which
/// without TLS any host spoofing it could take). Served over TLS, it grows.
#[tokio::test]
async fn a_volume_exported_without_tls_does_not_grow_while_attached() {
    let (c, uid) = placed().await;
    let name = volume_export_name(&uid, "n2");
    c.create(&export(&name, &uid, "n1", "n2"))
        .await
        .expect("the export to n2");
    c.storage_address("n1", "p1", "10.0.0.1").await;
    let status = c.status("VolumeExport", None, &name);
    let n1 = c.node("n1");
    let serve = |tls: bool| {
        let body = json!({"status": {"host": "10.0.0.1", "port": 10809, "exportName": "x1",
                                     "tls": tls}});
        let (n1, status) = (&n1, &status);
        async move { n1.patch(status, MERGE, &body.to_string()).await }
    };
    let vol = c.target("Volume", Some("demo"), Some("v"));
    let grow = |gib: u64| {
        let body = json!({"spec": {"sizeGiB": gib}});
        let (c, vol) = (&c, &vol);
        async move { c.patch(vol, MERGE, &body, "").await }
    };
    serve(false).await.expect("served in the clear");
    let before = c.revision().await;
    let e = refused_naming(grow(2).await, 422, "spec.sizeGiB");
    assert!(e.message.contains("without TLS"), "{}", e.message);
    assert_eq!(c.revision().await, before, "nothing written");
    serve(true).await.expect("served over TLS");
    grow(2).await.expect("grown: served over TLS");
    let v = c.get("Volume", Some("demo"), "v").await.expect("v");
    assert_eq!(v["spec"]["sizeGiB"], 2);
}
