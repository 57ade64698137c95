//! Watches: changes from a revision, and 410 Gone for a compacted one.

use serde_json::json;

use crate::fixtures::{Cloud, MERGE, Obj, rv};

#[tokio::test]
async fn a_watch_from_a_revision_sees_every_later_change_in_order() {
    let c = Cloud::new().await;
    let a = c.create(&Obj::flavor("a", 1, 512)).await.expect("a");
    let t = c.target("Flavor", None, Some("a"));
    let (_, patched) = c
        .patch(&t, MERGE, &json!({"spec": {"vcpus": 2}}), "")
        .await
        .expect("patch");
    c.create(&Obj::flavor("b", 1, 512)).await.expect("b");
    let mut w = c
        .watch("Flavor", None, &format!("resourceVersion={}", rv(&a)))
        .await
        .expect("watch");
    let (ty, obj) = w.next().await;
    assert_eq!(
        (ty.as_str(), obj["spec"]["vcpus"].as_u64()),
        ("MODIFIED", Some(2))
    );
    assert_eq!(rv(&obj), rv(&patched));
    let (ty, obj) = w.next().await;
    assert_eq!(
        (ty.as_str(), obj["metadata"]["name"].as_str()),
        ("ADDED", Some("b"))
    );
    // And what happens after the watch started.
    c.delete("Flavor", None, "a", "").await.expect("delete");
    let (ty, obj) = w.next().await;
    assert_eq!(
        (ty.as_str(), obj["metadata"]["name"].as_str()),
        ("DELETED", Some("a"))
    );
}

#[tokio::test]
async fn a_watch_without_a_revision_starts_with_the_current_objects() {
    let c = Cloud::new().await;
    c.create(&Obj::flavor("a", 1, 512)).await.expect("a");
    let mut w = c.watch("Flavor", None, "").await.expect("watch");
    let (ty, obj) = w.next().await;
    assert_eq!(
        (ty.as_str(), obj["metadata"]["name"].as_str()),
        ("ADDED", Some("a"))
    );
    c.create(&Obj::flavor("b", 1, 512)).await.expect("b");
    let (ty, obj) = w.next().await;
    assert_eq!(
        (ty.as_str(), obj["metadata"]["name"].as_str()),
        ("ADDED", Some("b"))
    );
}

#[tokio::test]
async fn a_selected_watch_reports_objects_leaving_the_selection_as_deleted() {
    let c = Cloud::new().await;
    let a = c
        .create(&Obj::flavor("a", 1, 512).label("tier", "web"))
        .await
        .expect("a");
    let mut w = c
        .watch(
            "Flavor",
            None,
            &format!("resourceVersion={}&labelSelector=tier%3Dweb", rv(&a)),
        )
        .await
        .expect("watch");
    c.create(&Obj::flavor("b", 1, 512))
        .await
        .expect("b, not selected");
    let t = c.target("Flavor", None, Some("a"));
    c.patch(
        &t,
        MERGE,
        &json!({"metadata": {"labels": {"tier": "db"}}}),
        "",
    )
    .await
    .expect("relabel");
    let (ty, obj) = w.next().await;
    assert_eq!(
        (ty.as_str(), obj["metadata"]["name"].as_str()),
        ("DELETED", Some("a"))
    );
}

#[tokio::test]
async fn a_watch_from_a_compacted_revision_is_410_gone() {
    let c = Cloud::new().await;
    let a = c.create(&Obj::flavor("a", 1, 512)).await.expect("a");
    c.create(&Obj::flavor("b", 1, 512)).await.expect("b");
    c.create(&Obj::flavor("c", 1, 512)).await.expect("c");
    c.api
        .store
        .compact(c.revision().await)
        .await
        .expect("compact");
    let mut w = c
        .watch("Flavor", None, &format!("resourceVersion={}", rv(&a)))
        .await
        .expect("the watch opens");
    let (ty, status) = w.next().await;
    assert_eq!(ty, "ERROR");
    assert_eq!(
        (status["code"].as_u64(), status["reason"].as_str()),
        (Some(410), Some("Expired"))
    );
}
