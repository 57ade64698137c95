//! Block storage admission: Volume and VolumeSnapshot checks, the `volumes/{name}/binding`
//! placement with its capacity claims, extends, quota, deletes refused while in use, and what
//! a node may touch.

use serde_json::{Value, json};
use stratus_apiserver::admission::CLUSTER_ADMIN;
use stratus_apiserver::admission::pools::{MAX_POOLS_PER_NODE, claim_key};
use stratus_apiserver::base::error::ApiResult;
use stratus_apiserver::resource::review::AllowAll;
use stratus_apiserver::resource::verbs::Target;

use crate::fixtures::{Cloud, JSON, MERGE, Obj, answer, field, refused, refused_naming};

fn volume(ns: &str, name: &str, size: Value) -> Obj {
    Obj(json!({
        "apiVersion": "storage.stratus.dev/v1", "kind": "Volume",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"sizeGiB": size},
    }))
}

fn snapshot(ns: &str, name: &str, of: &str) -> Obj {
    Obj(json!({
        "apiVersion": "storage.stratus.dev/v1", "kind": "VolumeSnapshot",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"volume": of},
    }))
}

/// A cloud with project `demo` and a Ready LVM pool `p1` on node `n1` whose agent reported
/// `capacity` GiB (nothing reserved).
async fn with_pool(capacity: u64) -> Cloud {
    let c = Cloud::with_demo().await;
    pool(&c, "p1", "n1", capacity).await;
    c
}

/// Pool `name` on `node`, created by an operator, whose agent reported `capacity` GiB.
async fn pool(c: &Cloud, name: &str, node: &str, capacity: u64) {
    CLUSTER_ADMIN
        .scope(
            true,
            Box::pin(c.create(&Obj(json!({
                "apiVersion": "storage.stratus.dev/v1", "kind": "StoragePool",
                "metadata": {"name": name},
                "spec": {"backend": "lvm", "node": node, "vgName": "stratus", "reservedPercentage": 0},
            })))),
        )
        .await
        .expect("pool");
    let status = json!({"status": {"phase": "Ready", "capacityGiB": capacity}});
    c.patch(&c.status("StoragePool", None, name), MERGE, &status, "")
        .await
        .expect("report capacity");
}

async fn bind(c: &Cloud, name: &str, pool: &str) -> ApiResult<u16> {
    let body = json!({"target": {"name": pool}}).to_string();
    let t = Target {
        subresource: Some("binding".into()),
        ..c.target("Volume", Some("demo"), Some(name))
    };
    c.api
        .bind(&t, body.as_bytes(), JSON, &AllowAll)
        .await
        .map(|o| answer(o).0)
}

#[tokio::test]
async fn a_volume_has_a_size_of_at_least_one_gib_and_a_bounded_one() {
    let c = with_pool(10).await;
    for size in [json!(0), json!(-1), json!(65_537), json!("ten")] {
        let before = c.revision().await;
        let e = refused(c.create(&volume("demo", "v", size.clone())).await);
        assert_eq!((e.code, field(&e)), (422, "spec.sizeGiB"), "{size}: {e:?}");
        assert_eq!(c.revision().await, before, "nothing written for {size}");
    }
    let v = c
        .create(&volume("demo", "v", json!(1)))
        .await
        .expect("1 GiB");
    assert_eq!(v["status"]["phase"], "Pending", "waits for the scheduler");
}

#[tokio::test]
async fn names_with_shell_metacharacters_are_refused_wherever_they_appear() {
    let c = with_pool(10).await;
    for name in ["v;rm -rf /", "$(reboot)", "a`id`", "v|x", "../etc"] {
        let e = refused(c.create(&volume("demo", name, json!(1))).await);
        assert_eq!((e.code, field(&e)), (422, "metadata.name"), "{name}");
        let from = volume("demo", "v", json!(1)).spec("source", json!({"snapshot": name}));
        let e = refused(c.create(&from).await);
        assert_eq!(e.code, 422, "{name}");
        assert_eq!(field(&e), "spec.source.snapshot", "{name}");
        let e = refused(c.create(&snapshot("demo", "s", name)).await);
        assert_eq!((e.code, field(&e)), (422, "spec.volume"), "{name}");
        let e = refused(bind(&c, "v", name).await);
        assert_eq!(e.code, 404, "no volume v yet");
    }
    c.create(&volume("demo", "v", json!(1))).await.expect("v");
    let e = refused(bind(&c, "v", "p1;reboot").await);
    assert_eq!((e.code, field(&e)), (422, "target.name"));
}

#[tokio::test]
async fn a_source_is_exactly_one_thing_that_exists_in_the_namespace() {
    let c = with_pool(10).await;
    let two =
        volume("demo", "v", json!(1)).spec("source", json!({"image": "cirros", "volume": "other"}));
    refused_naming(c.create(&two).await, 422, "spec.source");
    let none = volume("demo", "v", json!(1)).spec("source", json!({}));
    assert_eq!(field(&refused(c.create(&none).await)), "spec.source");
    for (f, what) in [
        ("snapshot", "spec.source.snapshot"),
        ("volume", "spec.source.volume"),
        ("image", "spec.source.image"),
    ] {
        let from = volume("demo", "v", json!(1)).spec("source", json!({f: "missing"}));
        let e = refused(c.create(&from).await);
        assert_eq!((e.code, field(&e)), (422, what), "{e:?}");
        assert!(e.message.contains("missing"), "{}", e.message);
    }
    // An image of the project, or a public one of another project, will do.
    c.create(&Obj::project("shared")).await.expect("project");
    for (ns, visibility) in [("demo", "private"), ("shared", "public")] {
        c.create(&Obj(json!({
            "apiVersion": "image.stratus.dev/v1", "kind": "Image",
            "metadata": {"name": format!("img-{ns}"), "namespace": ns},
            "spec": {"diskFormat": "qcow2", "visibility": visibility,
                     "source": {"url": "https://images.example/cirros.qcow2"}},
        })))
        .await
        .expect("image");
    }
    for img in ["img-demo", "img-shared"] {
        let from = volume("demo", img, json!(1)).spec("source", json!({"image": img}));
        c.create(&from).await.expect("from an image");
    }
    // A clone is at least as large as what it copies.
    c.create(&volume("demo", "big", json!(5)))
        .await
        .expect("big");
    let small = volume("demo", "small", json!(2)).spec("source", json!({"volume": "big"}));
    refused_naming(c.create(&small).await, 422, "spec.sizeGiB");
    let clone = volume("demo", "clone", json!(5)).spec("source", json!({"volume": "big"}));
    c.create(&clone).await.expect("a clone of the same size");
}

#[tokio::test]
async fn binding_places_the_volume_and_claims_its_size() {
    let c = with_pool(10).await;
    c.create(&volume("demo", "a", json!(6))).await.expect("a");
    c.create(&volume("demo", "b", json!(5))).await.expect("b");
    c.create(&volume("demo", "c", json!(4))).await.expect("c");
    assert_eq!(bind(&c, "a", "p1").await.expect("a fits"), 201);
    let a = c.get("Volume", Some("demo"), "a").await.expect("a");
    assert_eq!(a["status"]["pool"], "p1");
    assert_eq!(a["status"]["node"], "n1");
    assert_eq!(a["status"]["phase"], "Creating");
    let scheduled = &a["status"]["conditions"][0];
    assert_eq!(
        (
            &scheduled["type"],
            &scheduled["status"],
            &scheduled["reason"]
        ),
        (&json!("Scheduled"), &json!("True"), &json!("Bound"))
    );
    let e = refused(bind(&c, "b", "p1").await);
    assert_eq!(e.code, 409);
    assert!(
        e.message.contains("4 GiB free, 5 GiB asked"),
        "{}",
        e.message
    );
    assert_eq!(bind(&c, "c", "p1").await.expect("c fills it"), 201);
    assert_eq!(
        bind(&c, "a", "p1").await.expect("again: no second claim"),
        201
    );
    let e = refused(bind(&c, "missing", "p1").await);
    assert_eq!(e.code, 404);
    refused_naming(bind(&c, "b", "nowhere").await, 422, "target.name");
    // Placed: not moved by another binding, nor by a status write.
    pool(&c, "p2", "n2", 10).await;
    assert_eq!(refused(bind(&c, "a", "p2").await).code, 409);
    let status = c.status("Volume", Some("demo"), "a");
    refused_naming(
        c.patch(&status, MERGE, &json!({"status": {"pool": "p2"}}), "")
            .await,
        422,
        "status.pool",
    );
    refused_naming(
        c.patch(&status, MERGE, &json!({"status": {"node": "n2"}}), "")
            .await,
        422,
        "status.node",
    );
    // Unbinding is not a thing a volume does.
    let t = Target {
        subresource: Some("binding".into()),
        ..c.target("Volume", Some("demo"), Some("a"))
    };
    assert_eq!(refused(c.api.unbind(&t, &AllowAll).await).code, 405);
}

/// An operator's over-subscription ratio lets a pool's claims reach that many times its
/// capacity (after the reserve), no more; a ratio below 1 or above 100 is refused naming it.
#[tokio::test]
async fn an_over_subscribed_pool_takes_claims_up_to_its_ratio() {
    let c = with_pool(10).await;
    let p1 = c.target("StoragePool", None, Some("p1"));
    for bad in [json!(0.5), json!(101), json!("2")] {
        let e = refused(
            c.patch(
                &p1,
                MERGE,
                &json!({"spec": {"overSubscriptionRatio": bad}}),
                "",
            )
            .await,
        );
        assert_eq!(
            (e.code, field(&e)),
            (422, "spec.overSubscriptionRatio"),
            "{bad}: {e:?}"
        );
    }
    c.patch(
        &p1,
        MERGE,
        &json!({"spec": {"overSubscriptionRatio": 2.5, "reservedPercentage": 20}}),
        "",
    )
    .await
    .expect("the operator's ratio");
    // 10 GiB, 8 after the reserve, 20 GiB of claims at 2.5.
    c.create(&volume("demo", "a", json!(15))).await.expect("a");
    c.create(&volume("demo", "b", json!(6))).await.expect("b");
    c.create(&volume("demo", "c", json!(5))).await.expect("c");
    assert_eq!(bind(&c, "a", "p1").await.expect("a fits"), 201);
    let e = refused(bind(&c, "b", "p1").await);
    assert_eq!(e.code, 409);
    assert!(
        e.message.contains("5 GiB free, 6 GiB asked"),
        "{}",
        e.message
    );
    assert_eq!(bind(&c, "c", "p1").await.expect("c fills it"), 201);
}

/// Binds on worker threads of their own, from two API servers (each with its own turn-taking
/// per pool): never more than the pool holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_bindings_from_two_api_servers_never_overcommit_a_pool() {
    let c = std::sync::Arc::new(with_pool(10).await);
    let other = std::sync::Arc::new(c.replica().await);
    let names: Vec<String> = (0..40).map(|i| format!("v{i}")).collect();
    for n in &names {
        c.create(&volume("demo", n, json!(1)))
            .await
            .expect("volume");
    }
    let binds: Vec<_> = names
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let api = std::sync::Arc::clone(if i % 2 == 0 { &c } else { &other });
            let n = n.clone();
            tokio::spawn(async move { bind(&api, &n, "p1").await })
        })
        .collect();
    let mut results = Vec::new();
    for b in binds {
        results.push(b.await.expect("the bind task"));
    }
    assert_eq!(
        results.iter().filter(|r| r.is_ok()).count(),
        10,
        "{results:?}"
    );
    assert!(
        results
            .iter()
            .filter_map(|r| r.as_ref().err())
            .all(|e| e.code == 409)
    );
    let placed = c
        .list("Volume", Some("demo"), "fieldSelector=status.pool%3Dp1")
        .await
        .expect("list");
    assert_eq!(crate::fixtures::names(&placed).len(), 10);
}

#[tokio::test]
async fn a_deleted_volume_frees_its_claim_and_a_pinned_one_goes_where_it_asks() {
    let c = with_pool(2).await;
    c.create(&volume("demo", "a", json!(2))).await.expect("a");
    c.create(&volume("demo", "b", json!(2))).await.expect("b");
    bind(&c, "a", "p1").await.expect("a");
    assert_eq!(refused(bind(&c, "b", "p1").await).code, 409);
    c.delete("Volume", Some("demo"), "a", "")
        .await
        .expect("delete a");
    // Its storage agent removes its data and releases it, as the agent does.
    c.patch(
        &c.target("Volume", Some("demo"), Some("a")),
        MERGE,
        &json!({"metadata": {"finalizers": null}}),
        "",
    )
    .await
    .expect("release a");
    assert_eq!(bind(&c, "b", "p1").await.expect("room again"), 201);
    pool(&c, "p2", "n2", 10).await;
    let pinned = volume("demo", "pinned", json!(1)).spec("storagePool", json!("p2"));
    c.create(&pinned).await.expect("pinned");
    let e = refused(bind(&c, "pinned", "p1").await);
    assert!(e.message.contains("spec.storagePool"), "{}", e.message);
    assert_eq!(bind(&c, "pinned", "p2").await.expect("where it asks"), 201);
    // A disabled pool takes nothing new.
    c.create(&volume("demo", "late", json!(1)))
        .await
        .expect("late");
    let t = c.target("StoragePool", None, Some("p2"));
    c.patch(&t, MERGE, &json!({"spec": {"disabled": true}}), "")
        .await
        .expect("disable");
    let e = refused(bind(&c, "late", "p2").await);
    assert!(e.message.contains("disabled"), "{}", e.message);
}

#[tokio::test]
async fn a_volume_grows_within_its_pool_and_quota_and_never_shrinks() {
    let c = with_pool(10).await;
    c.create(&volume("demo", "v", json!(4))).await.expect("v");
    c.create(&volume("demo", "w", json!(4))).await.expect("w");
    bind(&c, "v", "p1").await.expect("v");
    bind(&c, "w", "p1").await.expect("w");
    let t = c.target("Volume", Some("demo"), Some("v"));
    let grow = |size: u64| json!({"spec": {"sizeGiB": size}});
    let e = refused(c.patch(&t, MERGE, &grow(3), "").await);
    assert_eq!((e.code, field(&e)), (422, "spec.sizeGiB"), "a shrink");
    assert!(e.message.contains("cannot shrink"), "{}", e.message);
    c.patch(&t, MERGE, &grow(6), "")
        .await
        .expect("within the pool");
    let before = c.revision().await;
    let e = refused(c.patch(&t, MERGE, &grow(7), "").await);
    assert_eq!(e.code, 409, "past the pool: {e:?}");
    assert!(
        e.message.contains("0 GiB free, 1 GiB more asked"),
        "{}",
        e.message
    );
    assert_eq!(c.revision().await, before, "nothing written");
    let v = c.get("Volume", Some("demo"), "v").await.expect("v");
    assert_eq!(v["spec"]["sizeGiB"], 6);
    // The grown claim counts: nothing more fits.
    c.create(&volume("demo", "x", json!(1))).await.expect("x");
    assert_eq!(refused(bind(&c, "x", "p1").await).code, 409);
    // The source and where it may go do not change.
    refused_naming(
        c.patch(&t, MERGE, &json!({"spec": {"storagePool": "p9"}}), "")
            .await,
        422,
        "spec.storagePool",
    );
    // Quota counts the GiB of an extend as of a create.
    c.create(&Obj::quota("demo", "q", json!({"volumeGiB": 12})))
        .await
        .expect("quota");
    let e = refused(
        c.patch(
            &c.target("Volume", Some("demo"), Some("w")),
            MERGE,
            &grow(6),
            "",
        )
        .await,
    );
    assert_eq!(e.code, 403, "{e:?}");
    assert!(e.message.contains("exceeded quota"), "{}", e.message);
    let e = refused(c.create(&volume("demo", "y", json!(2))).await);
    assert_eq!(e.code, 403);
}

/// Checks that snapshot `s` of the 3 GiB volume on pool `p1` (node `n1`, 10 GiB) is placed
/// there with that size, and that its claim counts: 3 + 3 of 10 leave 4 for a volume `w`.
async fn placed_beside_its_volume(c: &Cloud, s: &Value) {
    assert_eq!(s["status"]["pool"], "p1");
    assert_eq!(s["status"]["node"], "n1");
    assert_eq!(s["status"]["sizeGiB"], 3);
    assert_eq!(s["status"]["phase"], "Creating");
    c.create(&volume("demo", "w", json!(5))).await.expect("w");
    let e = refused(bind(c, "w", "p1").await);
    assert!(
        e.message.contains("4 GiB free, 5 GiB asked"),
        "{}",
        e.message
    );
}

#[tokio::test]
async fn a_snapshot_is_placed_with_its_volume_and_holds_it() {
    let c = with_pool(10).await;
    let e = refused_naming(
        c.create(&snapshot("demo", "s", "missing")).await,
        422,
        "spec.volume",
    );
    assert!(e.message.contains("does not exist"), "{}", e.message);
    c.create(&volume("demo", "v", json!(3))).await.expect("v");
    bind(&c, "v", "p1").await.expect("v");
    let s = c.create(&snapshot("demo", "s", "v")).await.expect("s");
    placed_beside_its_volume(&c, &s).await;
    // A volume made from it goes to its pool, at least its size.
    pool(&c, "p2", "n2", 10).await;
    let small = volume("demo", "r", json!(2)).spec("source", json!({"snapshot": "s"}));
    assert_eq!(field(&refused(c.create(&small).await)), "spec.sizeGiB");
    let from = volume("demo", "r", json!(3)).spec("source", json!({"snapshot": "s"}));
    c.create(&from).await.expect("r");
    let e = refused(bind(&c, "r", "p2").await);
    assert!(e.message.contains("storage pool p1"), "{}", e.message);
    // Its volume is not deleted under it (409, as Cinder), nor its placement rewritten.
    let e = refused(c.delete("Volume", Some("demo"), "v", "").await);
    assert_eq!(e.code, 409);
    assert!(e.message.contains("1 snapshot(s) (s)"), "{}", e.message);
    let st = c.status("VolumeSnapshot", Some("demo"), "s");
    refused_naming(
        c.patch(&st, MERGE, &json!({"status": {"sizeGiB": 1}}), "")
            .await,
        422,
        "status.sizeGiB",
    );
    let t = c.target("VolumeSnapshot", Some("demo"), Some("s"));
    refused_naming(
        c.patch(&t, MERGE, &json!({"spec": {"volume": "w"}}), "")
            .await,
        422,
        "spec.volume",
    );
    // Nor is the snapshot deleted while a volume made from it is still Pending.
    let e = refused(c.delete("VolumeSnapshot", Some("demo"), "s", "").await);
    assert_eq!(e.code, 409, "{e:?}");
    assert!(
        e.message
            .contains("snapshot \"s\" is the source of 1 volume(s) still being made (r)"),
        "{}",
        e.message
    );
    assert!(c.get("VolumeSnapshot", Some("demo"), "s").await.is_ok());
    c.delete("Volume", Some("demo"), "r", "")
        .await
        .expect("delete the volume made from it");
    c.delete("VolumeSnapshot", Some("demo"), "s", "")
        .await
        .expect("delete the snapshot");
    c.delete("Volume", Some("demo"), "v", "")
        .await
        .expect("then its volume");
    assert_eq!(bind(&c, "w", "p1").await.expect("both claims freed"), 201);
}

/// The `Ready` condition of a stored object.
fn ready(obj: &Value) -> Value {
    obj["status"]["conditions"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["type"] == "Ready"))
        .cloned()
        .unwrap_or_default()
}

/// A snapshot of a volume not placed yet is accepted and waits (`Pending`, `Ready=False`
/// `SourceNotReady`, no pool, no claim, its volume not deletable); the volume's binding places
/// it on the volume's pool with its claim. One that does not fit there stays `Pending` saying
/// why, and a later binding of its volume places it once there is room.
#[tokio::test]
async fn a_snapshot_of_an_unplaced_volume_waits_and_is_placed_with_it() {
    let c = with_pool(10).await;
    c.create(&volume("demo", "v", json!(3))).await.expect("v");
    let s = c
        .create(&snapshot("demo", "early", "v"))
        .await
        .expect("accepted before its volume is placed");
    assert_eq!(s["status"]["phase"], "Pending");
    assert_eq!(s["status"]["pool"], Value::Null);
    assert_eq!(s["status"]["sizeGiB"], Value::Null);
    assert_eq!(
        (ready(&s)["status"].as_str(), ready(&s)["reason"].as_str()),
        (Some("False"), Some("SourceNotReady"))
    );
    let e = refused(c.delete("Volume", Some("demo"), "v", "").await);
    assert_eq!(e.code, 409, "its volume stays: {e:?}");
    bind(&c, "v", "p1").await.expect("v");
    let s = c
        .get("VolumeSnapshot", Some("demo"), "early")
        .await
        .expect("early");
    placed_beside_its_volume(&c, &s).await;
    // 3 + 3 + 3 leave no room for a snapshot of a third 3 GiB volume: it waits, saying why.
    c.create(&volume("demo", "big", json!(3)))
        .await
        .expect("big");
    c.create(&snapshot("demo", "late", "big"))
        .await
        .expect("accepted");
    bind(&c, "big", "p1").await.expect("big fits");
    let late = c
        .get("VolumeSnapshot", Some("demo"), "late")
        .await
        .expect("late");
    assert_eq!(late["status"]["phase"], "Pending");
    assert_eq!(late["status"]["pool"], Value::Null);
    let why = ready(&late)["message"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(why.contains("1 GiB free, 3 GiB asked"), "{why}");
    // Room made, the next binding of its volume places it.
    c.delete("VolumeSnapshot", Some("demo"), "early", "")
        .await
        .expect("early goes");
    bind(&c, "big", "p1").await.expect("bound again");
    let late = c
        .get("VolumeSnapshot", Some("demo"), "late")
        .await
        .expect("late");
    assert_eq!(
        (
            late["status"]["pool"].as_str(),
            late["status"]["phase"].as_str()
        ),
        (Some("p1"), Some("Creating"))
    );
    assert_eq!(late["status"]["sizeGiB"], 3);
}

/// Snapshots asked while their volume is being bound are all placed, whichever is written
/// first: a create that read the volume unplaced is refused by its guard once the binding is
/// written, and reads it again; one written before is placed by the binding.
#[tokio::test]
async fn snapshots_asked_during_the_binding_are_all_placed() {
    let c = with_pool(100).await;
    c.create(&volume("demo", "v", json!(1))).await.expect("v");
    let snaps = (0..8).map(|i| {
        let c = &c;
        async move { c.create(&snapshot("demo", &format!("s{i}"), "v")).await }
    });
    let (bound, made) = tokio::join!(bind(&c, "v", "p1"), futures::future::join_all(snaps));
    bound.expect("bound");
    for m in made {
        m.expect("accepted");
    }
    for i in 0..8 {
        let s = c
            .get("VolumeSnapshot", Some("demo"), &format!("s{i}"))
            .await
            .expect("a snapshot");
        assert_eq!(s["status"]["pool"], "p1", "s{i}: {s}");
    }
}

#[tokio::test]
async fn a_source_is_not_deleted_while_a_volume_is_being_made_from_it() {
    let c = with_pool(10).await;
    c.create(&volume("demo", "v", json!(1))).await.expect("v");
    bind(&c, "v", "p1").await.expect("v");
    let clone = |name: &str| volume("demo", name, json!(1)).spec("source", json!({"volume": "v"}));
    c.create(&clone("c1")).await.expect("c1");
    c.create(&clone("c2")).await.expect("c2");
    let refused_delete = |why: &'static str| {
        let c = &c;
        async move {
            let e = refused(c.delete("Volume", Some("demo"), "v", "").await);
            assert_eq!(e.code, 409, "{why}: {e:?}");
            assert!(c.get("Volume", Some("demo"), "v").await.is_ok(), "{why}");
            e.message
        }
    };
    // Both Pending: both named.
    let said = refused_delete("pending").await;
    assert!(
        said.contains("volume \"v\" is the source of 2 volume(s) still being made (c1, c2)"),
        "{said}"
    );
    // Placed, the agent is copying it.
    bind(&c, "c1", "p1").await.expect("c1");
    c.delete("Volume", Some("demo"), "c2", "")
        .await
        .expect("c2 goes");
    let said = refused_delete("creating").await;
    assert!(said.contains("1 volume(s) still being made (c1)"), "{said}");
    // Made (or failed): the source goes.
    let st = c.status("Volume", Some("demo"), "c1");
    c.patch(&st, MERGE, &json!({"status": {"phase": "Available"}}), "")
        .await
        .expect("c1 made");
    c.delete("Volume", Some("demo"), "v", "")
        .await
        .expect("delete the source once its clone is made");
    assert!(c.get("Volume", Some("demo"), "c1").await.is_ok());
}

#[tokio::test]
async fn an_attached_volume_is_not_deleted_nor_snapshotted_without_force() {
    let c = with_pool(10).await;
    c.create(&volume("demo", "v", json!(1))).await.expect("v");
    bind(&c, "v", "p1").await.expect("v");
    let st = c.status("Volume", Some("demo"), "v");
    c.patch(&st, MERGE, &json!({"status": {"attachedTo": "web"}}), "")
        .await
        .expect("attached");
    let e = refused(c.delete("Volume", Some("demo"), "v", "").await);
    assert_eq!(e.code, 409);
    assert!(
        e.message.contains("attached to server \"web\""),
        "{}",
        e.message
    );
    assert!(
        c.get("Volume", Some("demo"), "v").await.is_ok(),
        "still there"
    );
    refused_naming(
        c.create(&snapshot("demo", "s", "v")).await,
        409,
        "spec.volume",
    );
    let forced = snapshot("demo", "s", "v").spec("force", json!(true));
    c.create(&forced).await.expect("with force");
}

#[tokio::test]
async fn snapshots_count_against_quota_at_once() {
    let c = with_pool(100).await;
    c.create(&volume("demo", "v", json!(1))).await.expect("v");
    bind(&c, "v", "p1").await.expect("v");
    c.create(&Obj::quota("demo", "q", json!({"snapshots": 2})))
        .await
        .expect("quota");
    let creates = (0..8).map(|i| {
        let c = &c;
        async move { c.create(&snapshot("demo", &format!("s{i}"), "v")).await }
    });
    let results = futures::future::join_all(creates).await;
    assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 2);
    assert!(
        results
            .iter()
            .filter_map(|r| r.as_ref().err())
            .all(|e| e.code == 403)
    );
}

/// A node's storage agent: the volumes and snapshots placed on it (status and its own
/// finalizer), the images they are made from, its own pools; nothing of another node's.
#[tokio::test]
async fn a_node_touches_only_the_storage_placed_on_it() {
    let c = with_pool(10).await;
    pool(&c, "p2", "n2", 10).await;
    c.create(&Obj(json!({
        "apiVersion": "image.stratus.dev/v1", "kind": "Image",
        "metadata": {"name": "img", "namespace": "demo"},
        "spec": {"diskFormat": "qcow2", "source": {"url": "https://images.example/i.qcow2"}},
    })))
    .await
    .expect("a private image");
    let mine = volume("demo", "mine", json!(1)).spec("source", json!({"image": "img"}));
    c.create(&mine).await.expect("mine");
    c.create(&volume("demo", "theirs", json!(1)))
        .await
        .expect("theirs");
    bind(&c, "mine", "p1").await.expect("on n1");
    bind(&c, "theirs", "p2").await.expect("on n2");
    c.create(&snapshot("demo", "snap-mine", "mine"))
        .await
        .expect("s");
    c.create(&snapshot("demo", "snap-theirs", "theirs"))
        .await
        .expect("s");
    let n1 = c.node("n1");
    let vols = c.target("Volume", Some("demo"), None);
    let one = |kind: &str, name: &str| c.target(kind, Some("demo"), Some(name));
    n1.read(&one("Volume", "mine"), "")
        .await
        .expect("its volume");
    assert_eq!(
        refused(n1.read(&one("Volume", "theirs"), "").await).code,
        403
    );
    n1.read(&vols, "fieldSelector=status.node%3Dn1")
        .await
        .expect("list its own");
    assert_eq!(refused(n1.read(&vols, "").await).code, 403);
    assert_eq!(
        refused(n1.read(&vols, "fieldSelector=status.node%3Dn2").await).code,
        403
    );
    n1.read(&one("VolumeSnapshot", "snap-mine"), "")
        .await
        .expect("its snapshot");
    assert_eq!(
        refused(n1.read(&one("VolumeSnapshot", "snap-theirs"), "").await).code,
        403
    );
    let snaps = c.target("VolumeSnapshot", Some("demo"), None);
    n1.read(&snaps, "fieldSelector=status.node%3Dn1")
        .await
        .expect("list its own");
    assert_eq!(refused(n1.read(&snaps, "").await).code, 403);
    n1.read(&one("Image", "img"), "")
        .await
        .expect("the image its volume is made from");
    assert_eq!(
        refused(c.node("n2").read(&one("Image", "img"), "").await).code,
        403
    );
    // Status of what is placed on it, keeping the placement.
    let status = |kind: &str, name: &str| c.status(kind, Some("demo"), name);
    let available = r#"{"status": {"phase": "Available", "devicePath": "/dev/loop7"}}"#;
    n1.patch(&status("Volume", "mine"), MERGE, available)
        .await
        .expect("its status");
    n1.patch(
        &status("VolumeSnapshot", "snap-mine"),
        MERGE,
        r#"{"status": {"phase": "Available"}}"#,
    )
    .await
    .expect("its snapshot's status");
    let e = refused(
        n1.patch(&status("Volume", "theirs"), MERGE, available)
            .await,
    );
    assert_eq!(e.code, 403);
    let e = refused(
        n1.patch(
            &status("Volume", "mine"),
            MERGE,
            r#"{"status": {"node": "n2"}}"#,
        )
        .await,
    );
    assert_eq!(e.code, 403, "it keeps the placement: {e:?}");
    // Which node the volume is exported to is the attachments controller's.
    let e = refused(
        n1.patch(
            &status("Volume", "mine"),
            MERGE,
            r#"{"status": {"attachedNode": "n9"}}"#,
        )
        .await,
    );
    assert_eq!(e.code, 403, "attachedNode: {e:?}");
    assert!(e.message.contains("attachedNode"), "{}", e.message);
    // Its own finalizer on what is placed on it, nothing else of the spec.
    let fin = r#"{"metadata": {"finalizers": ["storage.stratus.dev/teardown"]}}"#;
    n1.patch(&one("Volume", "mine"), MERGE, fin)
        .await
        .expect("its finalizer");
    n1.patch(&one("VolumeSnapshot", "snap-mine"), MERGE, fin)
        .await
        .expect("its finalizer on a snapshot");
    assert_eq!(
        refused(n1.patch(&one("Volume", "theirs"), MERGE, fin).await).code,
        403
    );
    let grow = r#"{"spec": {"sizeGiB": 2}}"#;
    assert_eq!(
        refused(n1.patch(&one("Volume", "mine"), MERGE, grow).await).code,
        403
    );
    // No creates, deletes or placements of volumes; no other node's pools.
    let body = serde_json::to_string(&volume("demo", "new", json!(1)).0).expect("JSON");
    assert_eq!(refused(n1.create(&vols, JSON, &body).await).code, 403);
    assert_eq!(
        refused(n1.delete(&one("Volume", "mine"), "").await).code,
        403
    );
    let e = refused(
        n1.bind(&one("Volume", "theirs"), r#"{"target": {"name": "p1"}}"#)
            .await,
    );
    assert_eq!(e.code, 403);
    // Another node's pool is read by name alone (its storage address), never listed.
    n1.read(&c.target("StoragePool", None, Some("p2")), "")
        .await
        .expect("a pool by name");
    let pools = c.target("StoragePool", None, None);
    assert_eq!(refused(n1.read(&pools, "").await).code, 403);
    assert_eq!(
        refused(n1.read(&pools, "fieldSelector=spec.node%3Dn2").await).code,
        403
    );
    let e = refused(
        n1.patch(
            &c.status("StoragePool", None, "p2"),
            MERGE,
            r#"{"status": {"capacityGiB": 1000}}"#,
        )
        .await,
    );
    assert_eq!(e.code, 403);
}

/// Records `status` (its attachments) on volume `demo/v`, as the attachments controller does.
async fn record_attachment(c: &Cloud, status: Value) {
    c.patch(
        &c.status("Volume", Some("demo"), "v"),
        MERGE,
        &json!({ "status": status }),
        "",
    )
    .await
    .expect("the attachment recorded");
}

/// Grows volume `demo/v` to `gib` GiB.
async fn grow_v(c: &Cloud, gib: u64) -> ApiResult<(u16, Value)> {
    let vol = c.target("Volume", Some("demo"), Some("v"));
    c.patch(&vol, MERGE, &json!({"spec": {"sizeGiB": gib}}), "")
        .await
}

/// A volume attached over NBD (its server on another node than its pool's) grows as one
/// attached on its own node does: its storage node serves it anew at its size and the
/// consuming node moves its guest's disk to that export. The pool's answer still holds: on
/// a pool that grows no volume in use it is refused (422), over NBD as locally.
#[tokio::test]
async fn a_volume_attached_over_nbd_grows_as_a_local_one() {
    let c = with_pool(10).await;
    c.create(&volume("demo", "v", json!(1))).await.expect("v");
    bind(&c, "v", "p1").await.expect("on n1");
    let attach = |to: Value| {
        let status = json!({"attachedTo": to.as_str().map(|_| "web"), "attachedNode": to});
        record_attachment(&c, status)
    };
    let grow = |gib| grow_v(&c, gib);
    attach(json!("n2")).await;
    grow(2).await.expect("grown while attached over NBD");
    let v = c.get("Volume", Some("demo"), "v").await.expect("v");
    assert_eq!(v["spec"]["sizeGiB"], 2);
    c.patch(
        &c.status("StoragePool", None, "p1"),
        MERGE,
        &json!({"status": {"growsInUse": "Never"}}),
        "",
    )
    .await
    .expect("the pool's report");
    let before = c.revision().await;
    let e = refused_naming(grow(3).await, 422, "spec.sizeGiB");
    assert!(e.message.contains("growsInUse"), "{}", e.message);
    assert_eq!(c.revision().await, before, "nothing written");
    attach(Value::Null).await;
    grow(3).await.expect("grown once detached");
    let v = c.get("Volume", Some("demo"), "v").await.expect("v");
    assert_eq!(v["spec"]["sizeGiB"], 3);
}

/// A volume a server boots from over NBD (the server placed on another node than the
/// volume's) grows as one it boots from on its own node: the consuming node moves the root
/// disk to the grown volume's export (served without TLS it does not, as a volume's disk:
/// `exports.rs`).
#[tokio::test]
async fn a_boot_volume_attached_over_nbd_grows_as_a_local_one() {
    let c = with_pool(10).await;
    c.create(&volume("demo", "v", json!(1)).spec("bootable", json!(true)))
        .await
        .expect("v");
    bind(&c, "v", "p1").await.expect("on n1");
    let mut s = Obj::server("demo", "web").spec("bootVolume", json!("v"));
    s.0["spec"].as_object_mut().map(|m| m.remove("image"));
    c.create(&s).await.expect("web boots from v");
    let on = |node: &'static str| {
        let status = json!({"attachedTo": "web", "attachedNode": node,
                            "attachments": [{"server": "web", "node": node}]});
        record_attachment(&c, status)
    };
    on("n1").await;
    grow_v(&c, 2).await.expect("grown: booted on its own node");
    on("n2").await;
    grow_v(&c, 3).await.expect("grown: booted over NBD");
    let v = c.get("Volume", Some("demo"), "v").await.expect("v");
    assert_eq!(v["spec"]["sizeGiB"], 3);
}

/// A volume attached (on its own node, or to any of its servers) on a pool whose agent says
/// it grows no volume in use does not grow: 422 on `spec.sizeGiB` naming the pool and the
/// reason, nothing written. On a pool that grows one in place, or that says nothing (an
/// older agent), or detached, it grows; the pool's answer is the one read with the write.
#[tokio::test]
async fn a_volume_attached_on_a_pool_that_cannot_grow_it_in_use_does_not_grow() {
    let c = with_pool(10).await;
    c.create(&volume("demo", "v", json!(1))).await.expect("v");
    bind(&c, "v", "p1").await.expect("on n1");
    let says = |growth: Value| {
        let c = &c;
        async move {
            c.patch(
                &c.status("StoragePool", None, "p1"),
                MERGE,
                &json!({"status": {"growsInUse": growth}}),
                "",
            )
            .await
            .expect("the pool's report");
        }
    };
    let attach = |to: Value| {
        let status = json!({
            "attachedTo": to.as_str().map(|_| "web"),
            "attachedNode": to,
            "attachments": to.as_str().map(|n| json!([
                {"server": "web", "node": n},
                {"server": "db", "node": n},
            ])),
        });
        record_attachment(&c, status)
    };
    let grow = |gib| grow_v(&c, gib);
    says(json!("Never")).await;
    attach(json!("n1")).await;
    let before = c.revision().await;
    let e = refused_naming(grow(2).await, 422, "spec.sizeGiB");
    assert!(
        e.message
            .contains("storage pool p1 grows no volume a server holds")
            && e.message.contains("detach it"),
        "{}",
        e.message
    );
    assert_eq!(c.revision().await, before, "nothing written");
    let v = c.get("Volume", Some("demo"), "v").await.expect("v");
    assert_eq!(v["spec"]["sizeGiB"], 1);
    // A shrink or an unchanged size is judged as ever: only a grow is refused for this.
    grow(1).await.expect("the same size");

    // In place when the space after it is free: only the agent knows; the API lets it by.
    says(json!("WhenSpaceFollows")).await;
    grow(2).await.expect("grown on a pool growing in place");
    // An agent that says nothing: as before the pools said anything.
    c.patch(
        &c.status("StoragePool", None, "p1"),
        MERGE,
        &json!({"status": {"growsInUse": null}}),
        "",
    )
    .await
    .expect("the field gone");
    grow(3).await.expect("grown on a pool that says nothing");
    says(json!("Never")).await;
    assert_eq!(refused(grow(4).await).code, 422);
    attach(Value::Null).await;
    grow(4).await.expect("grown once detached");
    let v = c.get("Volume", Some("demo"), "v").await.expect("v");
    assert_eq!(v["spec"]["sizeGiB"], 4);
    // An unknown answer is refused at the pool's status write.
    let bad = c
        .patch(
            &c.status("StoragePool", None, "p1"),
            MERGE,
            &json!({"status": {"growsInUse": "Sometimes"}}),
            "",
        )
        .await;
    refused_naming(bad, 422, "status.growsInUse");
}

/// A storage address is one node's, and in a network the operator granted: a pool recording
/// one outside (loopback, where etcd and the API server listen; link-local; public) is 422 on
/// `status.storageAddress`, nothing written; the pools of one node share theirs; another
/// node recording it is 422 naming the node that holds it, also when both write at once; the
/// address is free again once no pool of its node records it; loopback is granted only when
/// the operator says so (`--storage-cidr`).
#[tokio::test]
async fn a_storage_address_is_one_nodes_and_in_a_granted_network() {
    let c = with_pool(10).await;
    pool(&c, "p2", "n2", 10).await;
    pool(&c, "p3", "n1", 10).await;
    let record = |a: &str| json!({"status": {"storageAddress": a}}).to_string();
    let at = |name: &str| c.status("StoragePool", None, name);
    let operator = |pool: &'static str, address: &'static str| operator_records(&c, pool, address);
    for outside in ["127.0.0.1", "169.254.169.254", "8.8.8.8", "::1"] {
        let before = c.revision().await;
        let e = refused(c.node("n1").patch(&at("p1"), MERGE, &record(outside)).await);
        assert_eq!(
            (e.code, field(&e)),
            (422, "status.storageAddress"),
            "{outside}: {e:?}"
        );
        assert!(e.message.contains("--storage-cidr"), "{}", e.message);
        assert_eq!(c.revision().await, before, "nothing written for {outside}");
    }
    c.node("n1")
        .patch(&at("p1"), MERGE, &record("10.0.0.1"))
        .await
        .expect("n1's address");
    c.node("n1")
        .patch(&at("p3"), MERGE, &record("10.0.0.1"))
        .await
        .expect("a second pool of n1 at the same address");
    let taken = |e: stratus_apiserver::base::error::ApiError, holder: &str| {
        assert_eq!((e.code, field(&e)), (422, "status.storageAddress"), "{e:?}");
        assert_eq!(e.details.causes[0].reason, "FieldValueDuplicate", "{e:?}");
        assert!(
            e.message.contains(&format!("node \"{holder}\"")),
            "{}",
            e.message
        );
    };
    taken(
        refused(
            c.node("n2")
                .patch(&at("p2"), MERGE, &record("10.0.0.1"))
                .await,
        ),
        "n1",
    );
    // By an operator too: the address stays n1's.
    taken(refused(operator("p2", "10.0.0.1").await), "n1");
    c.node("n2")
        .patch(&at("p2"), MERGE, &record("10.0.0.2"))
        .await
        .expect("n2's own address");
    // Two nodes recording one address at once, spelt two ways: one has it.
    pool(&c, "p4", "n4", 10).await;
    pool(&c, "p5", "n5", 10).await;
    let (n4, n5) = (c.node("n4"), c.node("n5"));
    let (t4, t5) = (at("p4"), at("p5"));
    let (r4, r5) = (record("fd00::7"), record("fd00:0:0::7"));
    let (a, b) = futures::join!(n4.patch(&t4, MERGE, &r4), n5.patch(&t5, MERGE, &r5),);
    let refusals: Vec<_> = [a, b].into_iter().filter_map(Result::err).collect();
    assert_eq!(refusals.len(), 1, "{refusals:?}");
    assert_eq!(refusals[0].details.causes[0].reason, "FieldValueDuplicate");
    // Free once no pool of n1 records it: p1 moved by an operator, p3 deleted.
    operator("p1", "10.0.0.3")
        .await
        .expect("moved by an operator");
    taken(refused(operator("p2", "10.0.0.1").await), "n1");
    c.delete("StoragePool", None, "p3", "")
        .await
        .expect("p3 deleted");
    operator("p2", "10.0.0.1")
        .await
        .expect("the freed address, moved to n2 by an operator");
    taken(refused(operator("p1", "10.0.0.1").await), "n2");

    // Loopback only where the operator grants it.
    let granted = Cloud {
        api: Cloud::with_demo()
            .await
            .api
            .with_storage_ranges(vec!["127.0.0.0/8".parse().expect("a network")]),
    };
    pool(&granted, "lo", "n1", 10).await;
    let e = refused(
        granted
            .node("n1")
            .patch(
                &granted.status("StoragePool", None, "lo"),
                MERGE,
                &record("10.0.0.1"),
            )
            .await,
    );
    assert!(e.message.contains("127.0.0.0/8"), "{}", e.message);
    granted
        .node("n1")
        .patch(
            &granted.status("StoragePool", None, "lo"),
            MERGE,
            &record("127.0.0.5"),
        )
        .await
        .expect("a granted loopback address");
}

/// The key of StoragePool `name` in the store.
fn pool_key(name: &str) -> String {
    stratus_apiserver::storage::keys::object(
        "/registry",
        "storage.stratus.dev",
        "storagepools",
        None,
        name,
    )
}

/// The node named by the claim pool `pool` holds on `ip`, if it holds one.
async fn claimed_by(c: &Cloud, ip: &str, pool: &str) -> Option<String> {
    let key = claim_key("/registry", ip.parse().expect("an address"), pool);
    let claim = c.api.store.get(&key).await.expect("read")?;
    claim.value["node"].as_str().map(str::to_owned)
}

/// Pool `name` as a pool whose address was recorded before addresses were claimed: `address`
/// in its status, written past admission, with no claim (`claim`: one naming that node).
async fn recorded_unclaimed(c: &Cloud, name: &str, address: &str, claim: Option<&str>) {
    let key = pool_key(name);
    let mut p = c
        .api
        .store
        .get(&key)
        .await
        .expect("read")
        .expect("the pool");
    let stale = p.value["status"]["storageAddress"]
        .as_str()
        .and_then(|a| a.parse().ok())
        .map(|ip| claim_key("/registry", ip, name));
    p.value["status"]["storageAddress"] = json!(address);
    let claim_of = claim_key("/registry", address.parse().expect("an address"), name);
    let holder = claim.map(|n| json!({"node": n}));
    let mut puts = vec![(key.as_str(), &p.value)];
    puts.extend(holder.as_ref().map(|h| (claim_of.as_str(), h)));
    let deletes: Vec<&str> = stale
        .as_deref()
        .filter(|s| *s != claim_of)
        .into_iter()
        .collect();
    assert!(
        c.api
            .store
            .write_many(&[], &puts, &deletes)
            .await
            .expect("write")
            .is_some()
    );
}

/// An operator (a cluster admin) records `address` as pool `pool`'s storage address.
async fn operator_records(c: &Cloud, pool: &str, address: &str) -> ApiResult<(u16, Value)> {
    let (t, patch) = (
        c.status("StoragePool", None, pool),
        json!({"status": {"storageAddress": address}}),
    );
    CLUSTER_ADMIN
        .scope(true, Box::pin(c.patch(&t, MERGE, &patch, "")))
        .await
}

/// The 422 on `on` that `write` gets, having written nothing.
async fn invalid_unwritten(
    c: &Cloud,
    on: &str,
    write: impl std::future::Future<Output = ApiResult<Value>>,
) -> stratus_apiserver::base::error::ApiError {
    let before = c.revision().await;
    let e = refused(write.await);
    assert_eq!((e.code, field(&e)), (422, on), "{e:?}");
    assert_eq!(c.revision().await, before, "nothing written");
    e
}

/// A node's heartbeat: its pool's status written again (a new `lastHeartbeatTime`), the
/// address kept.
async fn heartbeat(c: &Cloud, node: &str, pool: &str) -> ApiResult<Value> {
    static BEATS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let beat = BEATS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let at = format!("2026-01-01T{:02}:{:02}:00Z", beat / 60 % 24, beat % 60);
    c.node(node)
        .patch(
            &c.status("StoragePool", None, pool),
            MERGE,
            &json!({"status": {"lastHeartbeatTime": at}}).to_string(),
        )
        .await
}

/// A node's pools share one storage address: a node recording a second one for another of its
/// pools is 422 on `status.storageAddress` naming the one it has, nothing written, also when
/// it records two at once; an operator moves it (one pool at a time). So a stolen storage
/// node identity cannot squat on the addresses of storage nodes to come, one pool each.
#[tokio::test]
async fn a_node_holds_its_pools_at_one_storage_address() {
    let c = with_pool(10).await;
    pool(&c, "p2", "n1", 10).await;
    let record = |a: &str| json!({"status": {"storageAddress": a}}).to_string();
    let at = |name: &str| c.status("StoragePool", None, name);
    let n1 = c.node("n1");
    n1.patch(&at("p1"), MERGE, &record("10.0.0.1"))
        .await
        .expect("n1's address");
    let (p2, second) = (at("p2"), record("10.0.0.2"));
    let e = invalid_unwritten(&c, "status.storageAddress", n1.patch(&p2, MERGE, &second)).await;
    assert!(
        e.message.contains("10.0.0.1") && e.message.contains("\"p1\""),
        "{}",
        e.message
    );
    assert_eq!(claimed_by(&c, "10.0.0.2", "p2").await, None);
    n1.patch(&at("p2"), MERGE, &record("10.0.0.1"))
        .await
        .expect("its second pool at its address");
    // Two pools of one node recording two addresses at once: one has its address.
    pool(&c, "q1", "n2", 10).await;
    pool(&c, "q2", "n2", 10).await;
    let n2 = c.node("n2");
    let (t1, t2) = (at("q1"), at("q2"));
    let (r1, r2) = (record("10.0.0.21"), record("10.0.0.22"));
    let (a, b) = futures::join!(n2.patch(&t1, MERGE, &r1), n2.patch(&t2, MERGE, &r2));
    let refusals: Vec<_> = [a, b].into_iter().filter_map(Result::err).collect();
    assert_eq!(refusals.len(), 1, "{refusals:?}");
    assert_eq!(field(&refusals[0]), "status.storageAddress");
    // An operator moves n1's address, one pool at a time; its heartbeats go on meanwhile.
    let operator = |pool: &'static str| operator_records(&c, pool, "10.0.0.3");
    operator("p1").await.expect("p1 moved by an operator");
    heartbeat(&c, "n1", "p2").await.expect("p2's heartbeat");
    heartbeat(&c, "n1", "p1").await.expect("p1's heartbeat");
    operator("p2").await.expect("p2 moved by an operator");
    assert_eq!(
        claimed_by(&c, "10.0.0.3", "p2").await.as_deref(),
        Some("n1")
    );
    assert_eq!(claimed_by(&c, "10.0.0.1", "p2").await, None, "freed");
}

/// A node creates at most [`MAX_POOLS_PER_NODE`] pools for itself, also when it creates many
/// at once: past it, 403 saying an operator creates more, nothing written. An operator does;
/// another node is not counted against it, and a pool deleted makes room.
#[tokio::test]
async fn a_node_creates_a_bounded_number_of_pools() {
    let c = Cloud::with_demo().await;
    let pools = c.target("StoragePool", None, None);
    let body = |node: &str, name: &str| {
        json!({
            "apiVersion": "storage.stratus.dev/v1", "kind": "StoragePool",
            "metadata": {"name": name},
            "spec": {"backend": "lvm", "node": node, "vgName": name},
        })
        .to_string()
    };
    let n1 = c.node("n1");
    let tries = MAX_POOLS_PER_NODE + 4;
    let bodies: Vec<String> = (0..tries)
        .map(|i| body("n1", &format!("evil-{i}")))
        .collect();
    let answers =
        futures::future::join_all(bodies.iter().map(|b| n1.create(&pools, JSON, b))).await;
    let refusals: Vec<_> = answers.into_iter().filter_map(Result::err).collect();
    assert_eq!(refusals.len(), tries - MAX_POOLS_PER_NODE, "{refusals:?}");
    for e in &refusals {
        assert_eq!(e.code, 403, "{e:?}");
        assert!(
            e.message.contains("an operator creates more"),
            "{}",
            e.message
        );
    }
    let listed = c.list("StoragePool", None, "").await.expect("list");
    assert_eq!(crate::fixtures::names(&listed).len(), MAX_POOLS_PER_NODE);
    let before = c.revision().await;
    assert_eq!(
        refused(n1.create(&pools, JSON, &body("n1", "one-more")).await).code,
        403
    );
    assert_eq!(c.revision().await, before, "nothing written");
    c.node("n2")
        .create(&pools, JSON, &body("n2", "n2-fast"))
        .await
        .expect("another node's pool");
    pool(&c, "by-operator", "n1", 10).await;
    c.delete("StoragePool", None, "by-operator", "")
        .await
        .expect("deleted");
    c.delete("StoragePool", None, "evil-0", "")
        .await
        .expect("deleted");
    n1.create(&pools, JSON, &body("n1", "n1-fast"))
        .await
        .expect("room again");
}

/// A pool whose address was recorded before addresses were claimed (no claim, or one naming
/// another node) claims it in its next heartbeat, checked as a new address: then no other
/// node records it; one another node holds already, or one outside the granted networks, is
/// 422 on `status.storageAddress`, nothing written.
#[tokio::test]
async fn a_heartbeat_claims_an_address_recorded_before_claims() {
    let c = with_pool(10).await;
    pool(&c, "p2", "n2", 10).await;
    pool(&c, "p3", "n3", 10).await;
    let record = |a: &str| json!({"status": {"storageAddress": a}}).to_string();
    let at = |name: &str| c.status("StoragePool", None, name);
    recorded_unclaimed(&c, "p1", "10.0.0.1", None).await;
    heartbeat(&c, "n1", "p1").await.expect("p1's heartbeat");
    assert_eq!(
        claimed_by(&c, "10.0.0.1", "p1").await.as_deref(),
        Some("n1")
    );
    let e = refused(
        c.node("n2")
            .patch(&at("p2"), MERGE, &record("10.0.0.1"))
            .await,
    );
    assert_eq!(e.details.causes[0].reason, "FieldValueDuplicate", "{e:?}");
    assert!(e.message.contains("node \"n1\""), "{}", e.message);
    // A claim naming a node the pool is not on is made its node's.
    recorded_unclaimed(&c, "p1", "10.0.0.1", Some("n9")).await;
    heartbeat(&c, "n1", "p1").await.expect("p1's heartbeat");
    assert_eq!(
        claimed_by(&c, "10.0.0.1", "p1").await.as_deref(),
        Some("n1")
    );
    // Held by another node since: refused, as a new address would be.
    recorded_unclaimed(&c, "p3", "10.0.0.1", None).await;
    let e = invalid_unwritten(&c, "status.storageAddress", heartbeat(&c, "n3", "p3")).await;
    assert!(e.message.contains("node \"n1\""), "{}", e.message);
    // Outside the granted networks: refused until an operator records another.
    recorded_unclaimed(&c, "p2", "127.0.0.1", None).await;
    let e = invalid_unwritten(&c, "status.storageAddress", heartbeat(&c, "n2", "p2")).await;
    assert!(e.message.contains("--storage-cidr"), "{}", e.message);
    operator_records(&c, "p2", "10.0.0.2")
        .await
        .expect("moved by an operator");
    heartbeat(&c, "n2", "p2").await.expect("p2's heartbeat");
    assert_eq!(
        claimed_by(&c, "10.0.0.2", "p2").await.as_deref(),
        Some("n2")
    );
}

/// A pool's `spec.node` is immutable, for an operator too: 422 on `spec.node`, nothing
/// written (a pool moves by being deleted and created again), so its address's claim always
/// names the node it is on.
#[tokio::test]
async fn a_pools_node_is_immutable() {
    let c = with_pool(10).await;
    c.storage_address("n1", "p1", "10.0.0.1").await;
    let p1 = c.target("StoragePool", None, Some("p1"));
    let other = json!({"spec": {"node": "n2"}});
    let moved = CLUSTER_ADMIN.scope(true, c.patch(&p1, MERGE, &other, ""));
    let e = invalid_unwritten(&c, "spec.node", async { moved.await.map(|(_, v)| v) }).await;
    assert!(e.message.contains("immutable"), "{}", e.message);
    let p = c.get("StoragePool", None, "p1").await.expect("p1");
    assert_eq!(p["spec"]["node"], "n1");
    assert_eq!(
        claimed_by(&c, "10.0.0.1", "p1").await.as_deref(),
        Some("n1")
    );
    c.patch(&p1, MERGE, &json!({"spec": {"vgName": "other"}}), "")
        .await
        .expect("the rest of the spec is the operator's");
}

#[tokio::test]
async fn volume_gib_quota_holds_under_concurrent_creates() {
    let c = with_pool(100).await;
    c.create(&Obj::quota("demo", "q", json!({"volumeGiB": 5})))
        .await
        .expect("quota");
    let creates = (0..12).map(|i| {
        let c = &c;
        async move { c.create(&volume("demo", &format!("v{i}"), json!(1))).await }
    });
    let results = futures::future::join_all(creates).await;
    assert_eq!(
        results.iter().filter(|r| r.is_ok()).count(),
        5,
        "{results:?}"
    );
    assert!(
        results
            .iter()
            .filter_map(|r| r.as_ref().err())
            .all(|e| e.code == 403 && e.message.contains("volumeGiB"))
    );
    let list = c.list("Volume", Some("demo"), "").await.expect("list");
    assert_eq!(crate::fixtures::names(&list).len(), 5);
}

/// A node registers its own StoragePool with its store alone and then writes only its status:
/// labels, a zone, a reservation or `disabled` (what the volume scheduler places by) and
/// deleting it are the operator's, so a compromised node cannot make its pool attract other
/// projects' volumes.
#[tokio::test]
async fn a_node_registers_its_pool_with_its_store_alone() {
    let c = Cloud::with_demo().await;
    let n1 = c.node("n1");
    let pools = c.target("StoragePool", None, None);
    let body = |extra: Value| {
        let mut pool = json!({
            "apiVersion": "storage.stratus.dev/v1", "kind": "StoragePool",
            "metadata": {"name": "n1-fast"},
            "spec": {"backend": "lvm", "node": "n1", "vgName": "fast"},
        });
        for (path, value) in extra.as_object().into_iter().flatten() {
            let (section, field) = path.split_once('.').expect("section.field");
            pool[section][field] = value.clone();
        }
        pool.to_string()
    };
    for (extra, field) in [
        (
            json!({"metadata.labels": {"storage.stratus.dev/volume-type": "gold"}}),
            "metadata.labels",
        ),
        (
            json!({"spec.availabilityZone": "az9"}),
            "spec.availabilityZone",
        ),
        (
            json!({"spec.reservedPercentage": 0, "spec.disabled": true}),
            "spec.disabled",
        ),
        (
            json!({"spec.overSubscriptionRatio": 20.0}),
            "spec.overSubscriptionRatio",
        ),
    ] {
        let e = refused(n1.create(&pools, JSON, &body(extra)).await);
        assert_eq!(e.code, 403, "{field}");
        assert!(e.message.contains(field), "{field}: {}", e.message);
    }
    n1.create(&pools, JSON, &body(json!({})))
        .await
        .expect("its pool, its store alone");
    let mine = c.target("StoragePool", None, Some("n1-fast"));
    for patch in [
        r#"{"metadata": {"labels": {"storage.stratus.dev/volume-type": "gold"}}}"#,
        r#"{"spec": {"availabilityZone": "az9"}}"#,
        r#"{"spec": {"reservedPercentage": 50}}"#,
        r#"{"spec": {"overSubscriptionRatio": 20}}"#,
    ] {
        assert_eq!(
            refused(n1.patch(&mine, MERGE, patch).await).code,
            403,
            "{patch}"
        );
    }
    assert_eq!(refused(n1.delete(&mine, "").await).code, 403);
    n1.patch(
        &c.status("StoragePool", None, "n1-fast"),
        MERGE,
        r#"{"status": {"capacityGiB": 10}}"#,
    )
    .await
    .expect("its status");
    // The operator labels it and places by it.
    c.patch(
        &mine,
        MERGE,
        &json!({"metadata": {"labels": {"storage.stratus.dev/volume-type": "gold"}}}),
        "",
    )
    .await
    .expect("the operator's label");
}

/// A snapshot's GiB (its volume's size when taken) count in `volumeGiB` with the volumes', as
/// Cinder's `gigabytes`: with 10 GiB allowed and a 4 GiB volume, one snapshot of it fits and
/// the second is 403 naming volumeGiB; a new volume then has only what is left; concurrent
/// snapshot and volume creates never take the project over.
#[tokio::test]
async fn snapshot_gib_count_with_the_volumes_in_volume_gib() {
    let c = with_pool(100).await;
    c.create(&volume("demo", "v", json!(4))).await.expect("v");
    bind(&c, "v", "p1").await.expect("v placed");
    c.create(&Obj::quota("demo", "q", json!({"volumeGiB": 10})))
        .await
        .expect("quota");
    c.create(&snapshot("demo", "s1", "v")).await.expect("s1");
    let e = refused(c.create(&snapshot("demo", "s2", "v")).await);
    assert_eq!(e.code, 403, "{}", e.message);
    assert!(
        e.message.contains("volumeGiB=4") && e.message.contains("used: volumeGiB=8"),
        "{}",
        e.message
    );
    let e = refused(c.create(&volume("demo", "w", json!(3))).await);
    assert_eq!(e.code, 403, "{}", e.message);
    c.create(&volume("demo", "w", json!(2)))
        .await
        .expect("2 GiB left");

    // Deleting the snapshot gives its GiB back.
    c.delete("VolumeSnapshot", Some("demo"), "s1", "")
        .await
        .expect("delete s1");
    // Concurrent snapshots (4 GiB each) and 1 GiB volumes against the 4 GiB left.
    let snaps = (0..4).map(|i| {
        let c = &c;
        async move { c.create(&snapshot("demo", &format!("c{i}"), "v")).await }
    });
    let vols = (0..4).map(|i| {
        let c = &c;
        async move { c.create(&volume("demo", &format!("x{i}"), json!(1))).await }
    });
    let (snaps, vols) = futures::future::join(
        futures::future::join_all(snaps),
        futures::future::join_all(vols),
    )
    .await;
    let made_snaps = snaps.iter().filter(|r| r.is_ok()).count() as u64;
    let made_vols = vols.iter().filter(|r| r.is_ok()).count() as u64;
    assert!(
        made_snaps * 4 + made_vols <= 4 && made_snaps + made_vols > 0,
        "{made_snaps} snapshots and {made_vols} volumes made"
    );
    assert!(
        snaps
            .iter()
            .chain(vols.iter())
            .filter_map(|r| r.as_ref().err())
            .all(|e| e.code == 403 || e.code == 409),
        "{snaps:?} {vols:?}"
    );
}

/// The binding adds the storage agent's teardown finalizer with the placement, so a volume
/// deleted before its agent first saw it still waits for the agent (its claim held until
/// then); an unplaced volume has none and goes at once.
#[tokio::test]
async fn a_placed_volume_waits_for_its_agent_when_deleted() {
    let c = with_pool(10).await;
    c.create(&volume("demo", "v", json!(4))).await.expect("v");
    c.create(&volume("demo", "pending", json!(1)))
        .await
        .expect("pending");
    bind(&c, "v", "p1").await.expect("v placed");
    let v = c.get("Volume", Some("demo"), "v").await.expect("v");
    assert_eq!(
        v["metadata"]["finalizers"],
        json!(["storage.stratus.dev/teardown"])
    );
    // Binding again adds it once.
    bind(&c, "v", "p1").await.expect("again");
    let again = c.get("Volume", Some("demo"), "v").await.expect("v");
    assert_eq!(
        again["metadata"]["resourceVersion"],
        v["metadata"]["resourceVersion"]
    );

    c.delete("Volume", Some("demo"), "v", "")
        .await
        .expect("delete");
    let going = c
        .get("Volume", Some("demo"), "v")
        .await
        .expect("still there");
    assert!(going["metadata"]["deletionTimestamp"].is_string());
    c.create(&volume("demo", "w", json!(7))).await.expect("w");
    let e = refused(bind(&c, "w", "p1").await);
    assert!(
        e.message.contains("6 GiB free"),
        "the claim is held: {}",
        e.message
    );
    // The agent releases it: the volume and its claim go.
    c.patch(
        &c.target("Volume", Some("demo"), Some("v")),
        MERGE,
        &json!({"metadata": {"finalizers": null}}),
        "",
    )
    .await
    .expect("release");
    assert!(c.get("Volume", Some("demo"), "v").await.is_err());
    assert_eq!(bind(&c, "w", "p1").await.expect("room again"), 201);

    c.delete("Volume", Some("demo"), "pending", "")
        .await
        .expect("delete");
    assert!(c.get("Volume", Some("demo"), "pending").await.is_err());
}
