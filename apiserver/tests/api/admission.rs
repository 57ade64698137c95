//! Admission: quota and compute placement, each atomic with the write it admits.

use serde_json::json;

use crate::fixtures::{Cloud, MERGE, Obj, refused};

#[tokio::test]
async fn a_create_over_quota_is_403_and_not_stored() {
    let c = Cloud::with_demo().await;
    c.create(&Obj::quota("demo", "q", json!({"servers": 2})))
        .await
        .expect("quota");
    c.create(&Obj::server("demo", "a")).await.expect("1 of 2");
    c.create(&Obj::server("demo", "b")).await.expect("2 of 2");
    let before = c.revision().await;
    let e = refused(c.create(&Obj::server("demo", "c")).await);
    assert_eq!(e.code, 403);
    assert!(e.message.contains("exceeded quota: q"), "{}", e.message);
    assert_eq!(refused(c.get("Server", Some("demo"), "c").await).code, 404);
    assert_eq!(c.revision().await, before, "nothing written");
    c.delete("Server", Some("demo"), "a", "")
        .await
        .expect("free one");
    c.create(&Obj::server("demo", "c"))
        .await
        .expect("fits again");
}

#[tokio::test]
async fn quota_counts_the_flavor_and_refuses_a_resize_past_it() {
    let c = Cloud::with_demo().await;
    c.create(&Obj::flavor("big", 4, 4096))
        .await
        .expect("flavor big");
    c.create(&Obj::quota("demo", "q", json!({"vcpus": 3})))
        .await
        .expect("quota");
    let e = refused(
        c.create(&Obj::server("demo", "huge").spec("flavor", json!("big")))
            .await,
    );
    assert_eq!(e.code, 403);
    c.create(&Obj::server("demo", "a")).await.expect("1 vCPU");
    let t = c.target("Server", Some("demo"), Some("a"));
    let e = refused(
        c.patch(&t, MERGE, &json!({"spec": {"flavor": "big"}}), "")
            .await,
    );
    assert_eq!(e.code, 403, "a resize past the quota");
    let a = c.get("Server", Some("demo"), "a").await.expect("a");
    assert_eq!(a["spec"]["flavor"], "small");
}

#[tokio::test]
async fn quota_holds_under_concurrent_creates() {
    let c = Cloud::with_demo().await;
    c.create(&Obj::quota("demo", "q", json!({"servers": 3})))
        .await
        .expect("quota");
    let creates = (0..12).map(|i| {
        let c = &c;
        async move { c.create(&Obj::server("demo", &format!("s{i}"))).await }
    });
    let results = futures::future::join_all(creates).await;
    let ok = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(ok, 3);
    assert!(
        results
            .iter()
            .filter_map(|r| r.as_ref().err())
            .all(|e| e.code == 403)
    );
    let list = c.list("Server", Some("demo"), "").await.expect("list");
    assert_eq!(crate::fixtures::names(&list).len(), 3);
}

#[tokio::test]
async fn binding_claims_capacity_and_refuses_overcommit() {
    let c = Cloud::with_demo().await;
    c.hypervisor("h1", 2, 1024).await;
    for s in ["a", "b", "c"] {
        c.create(&Obj::server("demo", s)).await.expect("server");
    }
    assert_eq!(c.bind("demo", "a", "h1").await.expect("a fits"), 201);
    assert_eq!(c.bind("demo", "b", "h1").await.expect("b fits"), 201);
    let e = refused(c.bind("demo", "c", "h1").await);
    assert_eq!(e.code, 409);
    assert!(e.message.contains("insufficient"), "{}", e.message);
    let placed = c.get("Server", Some("demo"), "a").await.expect("a");
    assert_eq!(placed["status"]["hypervisor"], "h1");
    assert_eq!(placed["status"]["phase"], "Scheduled");
    assert!(
        placed["metadata"]["finalizers"]
            .as_array()
            .is_some_and(|f| f.iter().any(|f| f == "compute.stratus.dev/teardown"))
    );
    let c_server = c.get("Server", Some("demo"), "c").await.expect("c");
    assert!(
        c_server["status"].get("hypervisor").is_none(),
        "c stays unplaced"
    );
}

#[tokio::test]
async fn api_servers_binding_at_once_never_overcommit() {
    let c = Cloud::with_demo().await;
    let other = c.replica().await;
    // Room for one: each API server takes its placements in turn, so the two race.
    c.hypervisor("h1", 1, 512).await;
    let servers: Vec<String> = (0..4).map(|i| format!("s{i}")).collect();
    for s in &servers {
        c.create(&Obj::server("demo", s)).await.expect("server");
    }
    let binds = servers.iter().enumerate().map(|(i, s)| {
        let api = if i % 2 == 0 { &c } else { &other };
        api.bind("demo", s, "h1")
    });
    let results = futures::future::join_all(binds).await;
    assert_eq!(
        results.iter().filter(|r| r.is_ok()).count(),
        1,
        "{results:?}"
    );
    assert!(
        results
            .iter()
            .filter_map(|r| r.as_ref().err())
            .all(|e| e.code == 409)
    );
    let placed = c
        .list(
            "Server",
            Some("demo"),
            "fieldSelector=status.hypervisor%3Dh1",
        )
        .await
        .expect("list");
    assert_eq!(crate::fixtures::names(&placed).len(), 1);
}

#[tokio::test]
async fn binding_again_to_the_same_hypervisor_does_not_claim_twice() {
    let c = Cloud::with_demo().await;
    c.hypervisor("h1", 2, 1024).await;
    c.create(&Obj::server("demo", "a")).await.expect("a");
    c.create(&Obj::server("demo", "b")).await.expect("b");
    c.bind("demo", "a", "h1").await.expect("bind");
    c.bind("demo", "a", "h1").await.expect("bind again");
    c.bind("demo", "b", "h1").await.expect("b still fits");
}

#[tokio::test]
async fn a_server_placed_elsewhere_is_not_bound_again() {
    let c = Cloud::with_demo().await;
    c.hypervisor("h1", 2, 1024).await;
    c.hypervisor("h2", 2, 1024).await;
    c.create(&Obj::server("demo", "a")).await.expect("a");
    c.bind("demo", "a", "h1").await.expect("bind");
    let e = refused(c.bind("demo", "a", "h2").await);
    assert_eq!(e.code, 409);
    let a = c.get("Server", Some("demo"), "a").await.expect("a");
    assert_eq!(a["status"]["hypervisor"], "h1");
}

#[tokio::test]
async fn a_deleted_server_frees_its_claim() {
    let c = Cloud::with_demo().await;
    c.hypervisor("h1", 1, 512).await;
    c.create(&Obj::server("demo", "a")).await.expect("a");
    c.create(&Obj::server("demo", "b")).await.expect("b");
    c.bind("demo", "a", "h1").await.expect("bind");
    assert_eq!(refused(c.bind("demo", "b", "h1").await).code, 409, "full");
    // The agent's finalizer holds the Server until the host is clean; then it goes.
    c.delete("Server", Some("demo"), "a", "")
        .await
        .expect("delete");
    let t = c.target("Server", Some("demo"), Some("a"));
    c.patch(&t, MERGE, &json!({"metadata": {"finalizers": null}}), "")
        .await
        .expect("the agent releases");
    assert_eq!(refused(c.get("Server", Some("demo"), "a").await).code, 404);
    assert_eq!(c.bind("demo", "b", "h1").await.expect("room again"), 201);
}

#[tokio::test]
async fn a_status_write_may_not_move_the_placement() {
    let c = Cloud::with_demo().await;
    c.hypervisor("h1", 2, 1024).await;
    c.create(&Obj::server("demo", "a")).await.expect("a");
    c.bind("demo", "a", "h1").await.expect("bind");
    let status = c.status("Server", Some("demo"), "a");
    let e = refused(
        c.patch(&status, MERGE, &json!({"status": {"hypervisor": "h2"}}), "")
            .await,
    );
    assert_eq!(e.code, 422);
    assert_eq!(
        e.details.causes.first().map(|c| c.field.as_str()),
        Some("status.hypervisor")
    );
    let e = refused(
        c.patch(
            &status,
            MERGE,
            &json!({"status": {"allocated": {"vcpus": 0}}}),
            "",
        )
        .await,
    );
    assert_eq!(e.code, 422);
    let (_, ok) = c
        .patch(&status, MERGE, &json!({"status": {"phase": "Running"}}), "")
        .await
        .expect("the rest of status is the agent's");
    assert_eq!(
        (
            ok["status"]["phase"].as_str(),
            ok["status"]["hypervisor"].as_str()
        ),
        (Some("Running"), Some("h1"))
    );
}

#[tokio::test]
async fn unbinding_frees_the_claim_and_waits_for_the_scheduler() {
    let c = Cloud::with_demo().await;
    c.hypervisor("h1", 1, 512).await;
    c.create(&Obj::server("demo", "a")).await.expect("a");
    c.create(&Obj::server("demo", "b")).await.expect("b");
    c.bind("demo", "a", "h1").await.expect("bind");
    c.api
        .unbind(
            &c.target("Server", Some("demo"), Some("a")),
            &stratus_apiserver::resource::review::AllowAll,
        )
        .await
        .expect("unbind");
    let a = c.get("Server", Some("demo"), "a").await.expect("a");
    assert!(a["status"].get("hypervisor").is_none());
    assert_eq!(a["status"]["phase"], "Evacuating");
    assert_eq!(c.bind("demo", "b", "h1").await.expect("room again"), 201);
}
