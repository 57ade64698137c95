//! A LIST's `resourceVersion` and `resourceVersionMatch` against a real etcd, as Kubernetes
//! reads them: `Exact` shows the collection at that revision (410 once etcd compacted it),
//! `NotOlderThan` a state at least that new, a bare revision `NotOlderThan` (a first page of
//! one: `Exact`), and every combination Kubernetes refuses a 400 naming the parameter.

#[allow(dead_code)]
mod common;
#[allow(dead_code, unused_imports)]
#[path = "api/fixtures.rs"]
mod fixtures;

use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use stratus_apiserver::base::error::ApiError;
use stratus_apiserver::resource::registry::Registry;
use stratus_apiserver::resource::verbs::Api;

use common::Etcd;
use fixtures::{Cloud, Obj, names};

/// An API server over a new etcd.
async fn cloud() -> (Etcd, Cloud) {
    let (etcd, store) = Etcd::start().await;
    let registry = Arc::new(Registry::stratus().expect("the Stratus kinds"));
    let api = Api::open(store, registry, "/registry", Duration::from_millis(200))
        .await
        .expect("open the API");
    (etcd, Cloud { api })
}

/// The list's own `metadata.resourceVersion`.
fn list_rv(list: &Value) -> i64 {
    list["metadata"]["resourceVersion"]
        .as_str()
        .and_then(|r| r.parse().ok())
        .unwrap_or_else(|| panic!("no resourceVersion in {list}"))
}

async fn revision(c: &Cloud) -> i64 {
    c.api.store.revision().await.expect("etcd's revision")
}

async fn flavors(c: &Cloud, q: &str) -> Result<Value, ApiError> {
    c.list("Flavor", None, q).await
}

/// Flavors a and b at `before`; then c created and a deleted.
async fn history(c: &Cloud) -> i64 {
    for n in ["a", "b"] {
        c.create(&Obj::flavor(n, 1, 512).label("tier", "gold"))
            .await
            .expect("create");
    }
    let before = revision(c).await;
    c.create(&Obj::flavor("c", 1, 512).label("tier", "gold"))
        .await
        .expect("create");
    c.delete("Flavor", None, "a", "").await.expect("delete a");
    before
}

#[tokio::test]
async fn exact_shows_the_collection_at_that_revision_paged_or_not() {
    let (_etcd, c) = cloud().await;
    let before = history(&c).await;
    for q in [
        format!("resourceVersion={before}&resourceVersionMatch=Exact"),
        format!("resourceVersion={before}&resourceVersionMatch=Exact&labelSelector=tier%3Dgold"),
        // Kubernetes' rule for a first page of a given revision: that revision.
        format!("resourceVersion={before}&limit=500"),
    ] {
        let list = flavors(&c, &q).await.expect(&q);
        assert_eq!(names(&list), ["a", "b"], "{q}");
        assert_eq!(list_rv(&list), before, "{q}");
    }
    // Page by page: every page at that revision, the token carrying it.
    let first = flavors(
        &c,
        &format!("resourceVersion={before}&resourceVersionMatch=Exact&limit=1"),
    )
    .await
    .expect("first page");
    assert_eq!(names(&first), ["a"]);
    let token = first["metadata"]["continue"].as_str().expect("a token");
    let second = flavors(&c, &format!("limit=1&continue={token}"))
        .await
        .expect("second page");
    assert_eq!(names(&second), ["b"]);
    assert_eq!(list_rv(&second), before);
    // Without a resourceVersion: now.
    let now = flavors(&c, "").await.expect("list");
    assert_eq!(names(&now), ["b", "c"]);
}

#[tokio::test]
async fn not_older_than_shows_a_state_at_least_that_new() {
    let (_etcd, c) = cloud().await;
    let before = history(&c).await;
    let now = revision(&c).await;
    for q in [
        format!("resourceVersion={before}"),
        format!("resourceVersion={before}&resourceVersionMatch=NotOlderThan"),
        format!("resourceVersion={before}&resourceVersionMatch=NotOlderThan&limit=1"),
        // From the watch cache (a selector), once it has reached the revision.
        format!("resourceVersion={now}&labelSelector=tier%3Dgold"),
        format!(
            "resourceVersion={now}&resourceVersionMatch=NotOlderThan&labelSelector=tier%3Dgold"
        ),
    ] {
        let list = flavors(&c, &q).await.expect(&q);
        assert!(list_rv(&list) >= now, "{q}: {list}");
        let want: &[&str] = if q.contains("limit=1") {
            &["b"]
        } else {
            &["b", "c"]
        };
        assert_eq!(names(&list), want, "{q}");
    }
    // A revision etcd has not reached: Kubernetes' "Too large resource version".
    let ahead = now + 1000;
    for q in [
        format!("resourceVersion={ahead}"),
        format!(
            "resourceVersion={ahead}&resourceVersionMatch=NotOlderThan&labelSelector=tier%3Dgold"
        ),
        format!("resourceVersion={ahead}&resourceVersionMatch=Exact"),
        format!("resourceVersion={ahead}&limit=10"),
    ] {
        let e = flavors(&c, &q).await.expect_err(&q);
        assert_eq!((e.code, e.reason), (504, "Timeout"), "{q}: {e:?}");
        assert!(
            e.message.contains("Too large resource version"),
            "{q}: {}",
            e.message
        );
    }
}

#[tokio::test]
async fn an_exact_revision_etcd_compacted_is_410_expired() {
    let (_etcd, c) = cloud().await;
    let before = history(&c).await;
    let now = revision(&c).await;
    c.api.store.compact(now).await.expect("compact");
    for q in [
        format!("resourceVersion={before}&resourceVersionMatch=Exact"),
        format!("resourceVersion={before}&resourceVersionMatch=Exact&limit=1"),
        format!("resourceVersion={before}&limit=1"),
        format!(
            "resourceVersion={before}&resourceVersionMatch=Exact&fieldSelector=metadata.name%3Db"
        ),
    ] {
        let e = flavors(&c, &q).await.expect_err(&q);
        assert_eq!((e.code, e.reason), (410, "Expired"), "{q}: {e:?}");
        assert!(
            e.message
                .contains(&format!("too old resource version: {before}")),
            "{q}: {}",
            e.message
        );
    }
    // What is not compacted still reads; NotOlderThan an old revision reads now.
    let list = flavors(
        &c,
        &format!("resourceVersion={now}&resourceVersionMatch=Exact"),
    )
    .await
    .expect("at the compaction revision");
    assert_eq!(names(&list), ["b", "c"]);
    let list = flavors(&c, &format!("resourceVersion={before}"))
        .await
        .expect("not older than");
    assert_eq!(names(&list), ["b", "c"]);
}

#[tokio::test]
async fn combinations_kubernetes_refuses_are_400_naming_the_parameter() {
    let (_etcd, c) = cloud().await;
    history(&c).await;
    let first = flavors(&c, "limit=1").await.expect("first page");
    let token = first["metadata"]["continue"].as_str().expect("a token");
    for (q, says) in [
        (
            "resourceVersion=abc".to_string(),
            "resourceVersion: Invalid value: \"abc\"",
        ),
        (
            "resourceVersion=-1&limit=5".to_string(),
            "resourceVersion: Invalid value",
        ),
        (
            "resourceVersionMatch=Exact".to_string(),
            "resourceVersionMatch: Forbidden",
        ),
        (
            "resourceVersionMatch=NotOlderThan".to_string(),
            "unless resourceVersion is provided",
        ),
        (
            "resourceVersion=0&resourceVersionMatch=Exact".to_string(),
            "forbidden for resourceVersion \"0\"",
        ),
        (
            "resourceVersion=3&resourceVersionMatch=Latest".to_string(),
            "resourceVersionMatch: Unsupported value",
        ),
        (
            format!("resourceVersion=3&resourceVersionMatch=Exact&limit=1&continue={token}"),
            "forbidden when continue is provided",
        ),
        (
            format!("resourceVersion=3&limit=1&continue={token}"),
            "resourceVersion: Forbidden",
        ),
    ] {
        let e = flavors(&c, &q).await.expect_err(&q);
        assert_eq!(e.code, 400, "{q}: {e:?}");
        assert!(e.message.contains(says), "{q}: {}", e.message);
    }
    // resourceVersion=0 with a token continues the token's list.
    let next = flavors(&c, &format!("resourceVersion=0&limit=1&continue={token}"))
        .await
        .expect("continued");
    assert_eq!(names(&next), ["c"]);
}
