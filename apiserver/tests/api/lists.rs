//! Lists of many pages: the store reads a range in small pages here, so a few hundred
//! objects take dozens of etcd-sized reads, all at one revision.

use futures::StreamExt;
use serde_json::Value;
use stratus_apiserver::resource::outcome::{Item, List, Outcome};
use stratus_apiserver::resource::table::Rendering;
use stratus_apiserver::resource::verbs::Params;
use stratus_apiserver::storage::store::Paging;

use crate::fixtures::{Cloud, Obj, names, refused, rv};

/// Pages of 16 keys (or about 2 KiB of values).
const SMALL: Paging = Paging {
    keys: 16,
    bytes: 2048,
};

fn name(i: usize) -> String {
    format!("f-{i:03}")
}

/// A cloud holding `n` Flavors `f-000`…, every 7th labelled `tier=gold`.
async fn flavors(n: usize) -> Cloud {
    let c = Cloud::with_paging(SMALL).await;
    for i in 0..n {
        let mut f = Obj::flavor(&name(i), 1, 512);
        if i % 7 == 0 {
            f = f.label("tier", "gold");
        }
        c.create(&f).await.expect("create");
    }
    c
}

async fn streamed(c: &Cloud, rendering: Rendering, query: &str) -> List {
    let t = c.target("Flavor", None, None);
    let p = Params::parse(Some(query)).expect("query");
    match c.api.list(&t, rendering, &p).await.expect("list") {
        Outcome::List(l) => l,
        other => panic!("an unpaged list answered whole: {other:?}"),
    }
}

#[tokio::test]
async fn an_unpaged_list_is_streamed_at_one_revision_while_writes_happen() {
    let c = flavors(300).await;
    let before = c.revision().await;
    let mut list = streamed(&c, Rendering::Full, "").await;
    assert_eq!(list.head["kind"], "FlavorList");
    assert_eq!(
        list.head["metadata"]["resourceVersion"],
        before.to_string(),
        "read at the first page's revision"
    );
    let values = |page: Vec<Item>| -> Vec<Value> {
        page.into_iter()
            .map(|i| i.into_value().expect("JSON"))
            .collect()
    };
    let mut seen = values(list.pages.next().await.expect("a page").expect("read"));
    // Written while the list is being read: not in it.
    c.create(&Obj::flavor("f-1500", 1, 512))
        .await
        .expect("create");
    c.delete("Flavor", None, &name(250), "")
        .await
        .expect("delete");
    c.create(&Obj::flavor("a-first", 1, 512))
        .await
        .expect("create");
    let mut pages = 1;
    while let Some(page) = list.pages.next().await {
        seen.extend(values(page.expect("read")));
        pages += 1;
    }
    assert!(pages >= 300 / 16, "read in many pages, not {pages}");
    let doc = serde_json::json!({"items": seen});
    assert_eq!(names(&doc), (0..300).map(name).collect::<Vec<_>>());
    assert!(seen.iter().all(|o| rv(o) > 0 && rv(o) <= before));
    // Answered as stored, with the same resourceVersion a GET shows.
    for i in [0, 17, 299] {
        assert_eq!(seen[i], c.get("Flavor", None, &name(i)).await.expect("get"));
    }
    // A new list sees the writes.
    let now = c.list("Flavor", None, "").await.expect("list");
    assert_eq!(names(&now).len(), 301);
    assert_eq!(names(&now)[0], "a-first");
}

#[tokio::test]
async fn selectors_choose_across_pages() {
    let c = flavors(200).await;
    let gold: Vec<String> = (0..200).filter(|i| i % 7 == 0).map(name).collect();
    let listed = c
        .list("Flavor", None, "labelSelector=tier%3Dgold")
        .await
        .expect("list");
    assert_eq!(names(&listed), gold);
    let others = c
        .list("Flavor", None, "labelSelector=tier!%3Dgold")
        .await
        .expect("list");
    assert_eq!(names(&others).len(), 200 - gold.len());
    let one = c
        .list("Flavor", None, "fieldSelector=metadata.name%3Df-123")
        .await
        .expect("list");
    assert_eq!(names(&one), ["f-123"]);
    let all_but_one = c
        .list("Flavor", None, "fieldSelector=metadata.name!%3Df-123")
        .await
        .expect("list");
    assert_eq!(names(&all_but_one).len(), 199);
    assert!(!names(&all_but_one).contains(&"f-123".to_string()));

    // Paged by 5 with the selector: the tokens walk every page to exactly the selected.
    let mut seen = Vec::new();
    let mut query = "limit=5&labelSelector=tier%3Dgold".to_string();
    loop {
        let page = c.list("Flavor", None, &query).await.expect("page");
        assert!(names(&page).len() <= 5);
        seen.extend(names(&page));
        match page["metadata"]["continue"].as_str() {
            Some(t) => query = format!("limit=5&labelSelector=tier%3Dgold&continue={t}"),
            None => break,
        }
    }
    assert_eq!(seen, gold);
}

#[tokio::test]
async fn a_continue_token_is_followed_by_a_streamed_rest() {
    let c = flavors(120).await;
    let first = c.list("Flavor", None, "limit=50").await.expect("page");
    assert_eq!(names(&first).len(), 50);
    let at = first["metadata"]["resourceVersion"].clone();
    c.delete("Flavor", None, &name(100), "")
        .await
        .expect("delete");
    let token = first["metadata"]["continue"].as_str().expect("token");
    // The rest, without a limit: streamed, at the token's revision.
    let rest = c
        .list("Flavor", None, &format!("continue={token}"))
        .await
        .expect("rest");
    assert_eq!(rest["metadata"]["resourceVersion"], at);
    assert_eq!(names(&rest), (50..120).map(name).collect::<Vec<_>>());
    assert!(rest["metadata"].get("continue").is_none());
    // A paged read exactly to the end hands out no token.
    let whole = c.list("Flavor", None, "limit=120").await.expect("page");
    assert_eq!(names(&whole).len(), 119);
    assert!(
        whole["metadata"].get("continue").is_none(),
        "{}",
        whole["metadata"]
    );
    let short = c.list("Flavor", None, "limit=118").await.expect("page");
    assert!(short["metadata"].get("continue").is_some());
}

#[tokio::test]
async fn a_compacted_token_is_refused_before_anything_is_streamed() {
    let c = flavors(40).await;
    let first = c.list("Flavor", None, "limit=10").await.expect("page");
    let token = first["metadata"]["continue"]
        .as_str()
        .expect("token")
        .to_string();
    c.create(&Obj::flavor("late", 1, 512))
        .await
        .expect("create");
    c.api
        .store
        .compact(c.revision().await)
        .await
        .expect("compact");
    let e = refused(c.list("Flavor", None, &format!("continue={token}")).await);
    assert_eq!((e.code, e.reason), (410, "Expired"));
}

#[tokio::test]
async fn tables_and_metadata_lists_are_streamed_too() {
    let c = flavors(100).await;
    let table = streamed(&c, Rendering::Table, "labelSelector=tier%3Dgold")
        .await
        .collect()
        .await
        .expect("table");
    assert_eq!(table["kind"], "Table");
    assert!(
        table["columnDefinitions"]
            .as_array()
            .is_some_and(|c| !c.is_empty())
    );
    let rows = table["rows"].as_array().expect("rows");
    assert_eq!(rows.len(), (0..100).filter(|i| i % 7 == 0).count());
    assert_eq!(rows[1]["cells"][0], "f-007");
    let meta = streamed(&c, Rendering::Metadata, "")
        .await
        .collect()
        .await
        .expect("metadata");
    assert_eq!(meta["kind"], "PartialObjectMetadataList");
    assert_eq!(names(&meta).len(), 100);
    assert!(meta["items"][0].get("spec").is_none());
}

#[tokio::test]
async fn an_empty_collection_streams_an_empty_list() {
    let c = Cloud::with_paging(SMALL).await;
    let list = c.list("Flavor", None, "").await.expect("list");
    assert_eq!(list["items"], serde_json::json!([]));
    assert!(
        list["metadata"]["resourceVersion"]
            .as_str()
            .is_some_and(|r| r != "0")
    );
}

#[tokio::test]
async fn readers_of_whole_prefixes_read_every_page() {
    let c = flavors(100).await;
    let prefix = c
        .target("Flavor", None, None)
        .rt
        .key_prefix("/registry", None);
    let page = c.api.store.list(&prefix, None, 0, 0).await.expect("list");
    assert_eq!(page.items.len(), 100);
    assert!(!page.more);
    let capped = c.api.store.list(&prefix, None, 0, 40).await.expect("list");
    assert_eq!(capped.items.len(), 40);
    assert!(capped.more);
    let at = c.revision().await;
    let mut scan = c.api.store.scan(&prefix, None, 0, 0);
    let mut pages = 0;
    while let Some(p) = scan.next().await.expect("page") {
        assert!(!p.is_empty() && p.len() <= 16);
        pages += 1;
    }
    assert_eq!(scan.revision(), at);
    assert!(
        pages > 100 / 16,
        "the byte budget makes pages of a few keys: {pages}"
    );
}
