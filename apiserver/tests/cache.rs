//! LISTs and watches answered from the watch cache, over the in-memory store (and one check on
//! a real etcd): the same objects and revisions etcd's read gives, never an older state than
//! etcd's unless `resourceVersion=0` allows it, and continue tokens that keep their list at
//! one revision.

#[allow(dead_code)]
mod common;
#[allow(dead_code, unused_imports)]
#[path = "api/fixtures.rs"]
mod fixtures;

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use stratus_apiserver::resource::verbs::{Params, Selectors};
use stratus_apiserver::storage::hub::Hub;

use common::Etcd;
use fixtures::{Cloud, MERGE, Obj, names, rv};

fn name(i: usize) -> String {
    format!("f-{i:03}")
}

/// Flavors `f-000`… : every 7th `tier=gold`, every 5th (not gold) `tier=silver`.
async fn flavors(c: &Cloud, n: usize) {
    for i in 0..n {
        let mut f = Obj::flavor(&name(i), 1, 512);
        if i % 7 == 0 {
            f = f.label("tier", "gold");
        } else if i % 5 == 0 {
            f = f.label("tier", "silver");
        }
        c.create(&f).await.expect("create");
    }
}

fn query(q: &str) -> Params {
    Params::parse(Some(q)).expect("query")
}

/// (name, resourceVersion) of a list's items.
fn listed(list: &Value) -> Vec<(String, i64)> {
    list["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|o| (o["metadata"]["name"].as_str().unwrap_or("").into(), rv(o)))
        .collect()
}

/// The same LIST read from etcd (the verbs' read of the store, which the cache never serves).
async fn from_etcd(c: &Cloud, kind: &str, ns: Option<&str>, q: &str) -> Vec<(String, i64)> {
    let (items, _, _) = c
        .api
        .list_items(&c.target(kind, ns, None), &query(q))
        .await
        .expect("list from etcd");
    listed(&json!({ "items": items }))
}

/// Whether the watch cache answers this LIST (rather than leaving it to etcd).
async fn answered_by_cache(c: &Cloud, kind: &str, ns: Option<&str>, q: &str) -> bool {
    let t = c.target(kind, ns, None);
    let p = query(q);
    let sel = Selectors::parse(&t.rt, &p).expect("selectors");
    let limit = p.get("limit").map_or(0, |l| l.parse().expect("limit"));
    c.api
        .list_cached(&t, &p, &sel, limit, false)
        .await
        .expect("list")
        .is_some()
}

#[tokio::test]
async fn selected_lists_from_the_cache_are_exactly_what_etcd_selects() {
    let c = Cloud::with_demo().await;
    flavors(&c, 120).await;
    c.create(&Obj::project("other")).await.expect("project");
    for (ns, n) in [("demo", "s1"), ("demo", "s2"), ("other", "s1")] {
        c.create(&Obj::server(ns, n).label("tier", "gold"))
            .await
            .expect("server");
    }
    let queries = [
        "labelSelector=tier%3Dgold",
        "labelSelector=tier!%3Dgold",
        "labelSelector=tier%20in%20(gold,silver)",
        "labelSelector=!tier",
        "labelSelector=tier,tier!%3Dsilver",
        "fieldSelector=metadata.name!%3Df-010",
        "labelSelector=tier%3Dgold&fieldSelector=metadata.name%3Df-014",
    ];
    for q in queries {
        assert!(answered_by_cache(&c, "Flavor", None, q).await, "{q}");
        let cached = listed(&c.list("Flavor", None, q).await.expect("list"));
        assert_eq!(cached, from_etcd(&c, "Flavor", None, q).await, "{q}");
        assert!(!cached.is_empty(), "{q}");
    }
    // Namespaced: a namespace's list, and a field selector on the namespace across all.
    for (ns, q) in [
        (Some("demo"), "labelSelector=tier%3Dgold"),
        (None, "fieldSelector=metadata.namespace%3Dother"),
        (
            None,
            "labelSelector=tier%3Dgold&fieldSelector=metadata.namespace!%3Ddemo",
        ),
    ] {
        assert!(answered_by_cache(&c, "Server", ns, q).await, "{q}");
        let cached = listed(&c.list("Server", ns, q).await.expect("list"));
        assert_eq!(cached, from_etcd(&c, "Server", ns, q).await, "{q}");
    }
    assert_eq!(
        names(
            &c.list("Server", Some("demo"), "labelSelector=tier%3Dgold")
                .await
                .expect("list")
        ),
        ["s1", "s2"]
    );
    // Writes, then at once a selected list: it holds them.
    let t = c.target("Flavor", None, Some(&name(1)));
    c.patch(
        &t,
        MERGE,
        &json!({"metadata": {"labels": {"tier": "gold"}}}),
        "",
    )
    .await
    .expect("label");
    c.delete("Flavor", None, &name(7), "")
        .await
        .expect("delete");
    c.create(&Obj::flavor("f-500", 1, 512).label("tier", "gold"))
        .await
        .expect("create");
    let gold = c
        .list("Flavor", None, "labelSelector=tier%3Dgold")
        .await
        .expect("list");
    let gold = names(&gold);
    assert!(gold.contains(&name(1)) && gold.contains(&"f-500".to_string()));
    assert!(!gold.contains(&name(7)));
    assert_eq!(
        listed(
            &c.list("Flavor", None, "labelSelector=tier%3Dgold")
                .await
                .expect("list")
        ),
        from_etcd(&c, "Flavor", None, "labelSelector=tier%3Dgold").await
    );
}

#[tokio::test]
async fn a_write_through_another_api_server_is_in_the_next_selected_list() {
    let c = Cloud::new().await;
    flavors(&c, 30).await;
    let other = c.replica().await;
    // Both caches are built and current.
    for api in [&c, &other] {
        api.list("Flavor", None, "labelSelector=tier%3Dgold")
            .await
            .expect("list");
    }
    for i in 0..5 {
        let f = format!("new-{i}");
        let created = other
            .create(&Obj::flavor(&f, 1, 512).label("tier", "gold"))
            .await
            .expect("create");
        let list = c
            .list("Flavor", None, "labelSelector=tier%3Dgold")
            .await
            .expect("list");
        assert!(names(&list).contains(&f), "{f} missing from the next list");
        assert!(
            rv(&list) >= rv(&created),
            "the list is at the write's revision or later"
        );
        assert!(answered_by_cache(&c, "Flavor", None, "labelSelector=tier%3Dgold").await);
    }
}

#[tokio::test]
async fn resource_version_0_is_answered_from_the_cache_at_the_revision_it_names() {
    let c = Cloud::new().await;
    flavors(&c, 40).await;
    assert!(answered_by_cache(&c, "Flavor", None, "resourceVersion=0").await);
    let list = c
        .list("Flavor", None, "resourceVersion=0")
        .await
        .expect("list");
    let at = rv(&list);
    assert!(at <= c.revision().await);
    let items = listed(&list);
    assert_eq!(items.len(), 40);
    assert!(
        items.iter().all(|(_, r)| *r <= at),
        "nothing newer than the list says"
    );
    // A list without resourceVersion is not served from the cache.
    assert!(!answered_by_cache(&c, "Flavor", None, "").await);
}

#[tokio::test]
async fn pages_from_the_cache_show_one_revision_while_the_collection_changes() {
    let c = Cloud::new().await;
    flavors(&c, 140).await;
    let q = "limit=4&labelSelector=tier%3Dgold";
    assert!(answered_by_cache(&c, "Flavor", None, q).await);
    let before = from_etcd(&c, "Flavor", None, "labelSelector=tier%3Dgold").await;
    let first = c.list("Flavor", None, q).await.expect("page");
    let at = rv(&first);
    let mut seen = listed(&first);
    let mut token = first["metadata"]["continue"]
        .as_str()
        .expect("more pages")
        .to_string();
    // Changed after the first page: a gold Flavor further on loses its label, one is deleted,
    // a new one appears. The pages still show the collection at the first page's revision.
    let t = c.target("Flavor", None, Some(&name(133)));
    c.patch(
        &t,
        MERGE,
        &json!({"metadata": {"labels": {"tier": "bronze"}}}),
        "",
    )
    .await
    .expect("relabel");
    c.delete("Flavor", None, &name(126), "")
        .await
        .expect("delete");
    c.create(&Obj::flavor("f-999", 1, 512).label("tier", "gold"))
        .await
        .expect("create");
    loop {
        let page = c
            .list("Flavor", None, &format!("{q}&continue={token}"))
            .await
            .expect("page");
        assert_eq!(rv(&page), at, "every page at the first page's revision");
        seen.extend(listed(&page));
        match page["metadata"]["continue"].as_str() {
            Some(t) => token = t.to_string(),
            None => break,
        }
    }
    assert_eq!(seen, before);
    // Before the changes, pages come from the cache; a new list sees the changes.
    let now = names(
        &c.list("Flavor", None, "labelSelector=tier%3Dgold")
            .await
            .expect("list"),
    );
    assert!(now.contains(&"f-999".to_string()) && !now.contains(&name(133)));
}

#[tokio::test]
async fn a_selected_watch_starts_from_the_cache_without_a_gap_or_a_repeat() {
    let c = Cloud::new().await;
    flavors(&c, 30).await;
    let gold: Vec<String> = (0..30).filter(|i| i % 7 == 0).map(name).collect();
    // Built first, so the initial state below comes from it.
    c.list("Flavor", None, "labelSelector=tier%3Dgold")
        .await
        .expect("list");
    let mut w = c
        .watch(
            "Flavor",
            None,
            "labelSelector=tier%3Dgold&sendInitialEvents=true&allowWatchBookmarks=true",
        )
        .await
        .expect("watch");
    let mut initial = Vec::new();
    loop {
        let (ty, obj) = w.next().await;
        if ty == "BOOKMARK" {
            break;
        }
        assert_eq!(ty, "ADDED");
        initial.push(obj["metadata"]["name"].as_str().unwrap_or("").to_string());
    }
    assert_eq!(initial, gold);
    c.create(&Obj::flavor("f-new", 1, 512).label("tier", "gold"))
        .await
        .expect("create");
    let t = c.target("Flavor", None, Some(&name(7)));
    c.patch(
        &t,
        MERGE,
        &json!({"metadata": {"labels": {"tier": "silver"}}}),
        "",
    )
    .await
    .expect("relabel");
    let mut events = Vec::new();
    while events.len() < 2 {
        let (ty, obj) = w.next().await;
        if ty != "BOOKMARK" {
            events.push((
                ty,
                obj["metadata"]["name"].as_str().unwrap_or("").to_string(),
            ));
        }
    }
    assert_eq!(
        events,
        [
            ("ADDED".to_string(), "f-new".to_string()),
            ("DELETED".to_string(), name(7))
        ]
    );
}

#[tokio::test]
async fn on_etcd_a_quiet_type_catches_up_by_a_progress_report_not_a_timeout() {
    let (_etcd, store) = Etcd::start().await;
    let obj =
        |name: &str, tier: &str| json!({"metadata": {"name": name, "labels": {"tier": tier}}});
    for n in ["a", "b"] {
        store
            .create(&format!("/t/quiet/{n}"), &obj(n, "gold"))
            .await
            .expect("create");
    }
    let hub = Arc::new(Hub::new(store.clone(), Duration::from_secs(60)));
    let cache = hub
        .cache("/t/quiet/", &["metadata.name".to_string()])
        .expect("cache");
    assert!(cache.wait(&hub, 0, Duration::from_secs(10)).await, "built");
    // Another type changes: etcd's revision moves on, this type's watch sees nothing.
    for i in 0..5 {
        store
            .create(&format!("/t/busy/{i}"), &obj("x", "none"))
            .await
            .expect("create");
    }
    let now = store.revision().await.expect("revision");
    assert!(cache.revision().expect("ready") < now);
    let started = Instant::now();
    assert!(
        cache.wait(&hub, now, Duration::from_secs(10)).await,
        "caught up"
    );
    // The feed reports on its own every 60 s: only a requested report is this quick.
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    // And a change of the type itself is in the next consistent read.
    let b = store.get("/t/quiet/b").await.expect("get").expect("b");
    store
        .update("/t/quiet/b", &obj("b", "silver"), b.mod_revision)
        .await
        .expect("update");
    let now = store.revision().await.expect("revision");
    assert!(
        cache.wait(&hub, now, Duration::from_secs(10)).await,
        "caught up"
    );
    let gold = cache
        .page("/t/quiet/", None, 0, None, |o| {
            o.label("tier") == Some("gold")
        })
        .expect("ready");
    assert_eq!(gold.items.len(), 1);
    assert!(gold.revision >= now);
}
