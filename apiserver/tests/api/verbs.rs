//! The resource verbs: what a client relies on from create, get, list, update, patch, delete
//! and deletecollection.

use serde_json::json;

use stratus_apiserver::resource::review::AllowAll;

use crate::fixtures::{APPLY, Cloud, JSON_PATCH, MERGE, Obj, names, refused, rv};

#[tokio::test]
async fn a_created_object_is_read_back_with_server_fields() {
    let c = Cloud::new().await;
    let created = c
        .create(&Obj::flavor("small", 1, 512))
        .await
        .expect("create");
    let got = c.get("Flavor", None, "small").await.expect("get");
    assert_eq!(got, created, "GET answers what POST answered");
    assert_eq!(rv(&got), c.revision().await);
    assert!(
        got["metadata"]["uid"]
            .as_str()
            .is_some_and(|u| !u.is_empty())
    );
    assert!(got["metadata"]["creationTimestamp"].is_string());
    assert_eq!(got["metadata"]["generation"], 1);
    assert_eq!(got["spec"]["vcpus"], 1);
}

#[tokio::test]
async fn a_second_create_of_a_name_is_409_already_exists() {
    let c = Cloud::new().await;
    c.create(&Obj::flavor("small", 1, 512))
        .await
        .expect("create");
    let e = refused(c.create(&Obj::flavor("small", 2, 1024)).await);
    assert_eq!((e.code, e.reason), (409, "AlreadyExists"));
    let got = c.get("Flavor", None, "small").await.expect("get");
    assert_eq!(got["spec"]["vcpus"], 1, "the first object stays");
}

#[tokio::test]
async fn an_invalid_object_is_422_and_not_stored() {
    let c = Cloud::new().await;
    let before = c.revision().await;
    let e = refused(
        c.create(&Obj::flavor("small", 1, 512).spec("vcpus", json!("many")))
            .await,
    );
    assert_eq!(e.code, 422);
    assert_eq!(c.revision().await, before);
}

#[tokio::test]
async fn a_namespaced_object_needs_its_project() {
    let c = Cloud::with_demo().await;
    let e = refused(c.create(&Obj::server("nowhere", "web-1")).await);
    assert_eq!(e.code, 404);
    assert_eq!(e.details.kind.as_deref(), Some("namespaces"));
    c.create(&Obj::server("demo", "web-1"))
        .await
        .expect("in demo");
}

#[tokio::test]
async fn get_of_a_missing_object_is_404() {
    let c = Cloud::new().await;
    let e = refused(c.get("Flavor", None, "none").await);
    assert_eq!((e.code, e.reason), (404, "NotFound"));
}

#[tokio::test]
async fn update_with_a_stale_resource_version_is_409_and_changes_nothing() {
    let c = Cloud::new().await;
    let first = c
        .create(&Obj::flavor("small", 1, 512))
        .await
        .expect("create");
    let t = c.target("Flavor", None, Some("small"));
    let mut bigger = first.clone();
    bigger["spec"]["vcpus"] = json!(2);
    let second = c
        .put(&t, &bigger)
        .await
        .expect("update at the current version");
    assert!(rv(&second) > rv(&first));
    assert_eq!(
        second["metadata"]["generation"], 2,
        "a spec change bumps generation"
    );

    let mut stale = first.clone();
    stale["spec"]["vcpus"] = json!(8);
    let e = refused(c.put(&t, &stale).await);
    assert_eq!((e.code, e.reason), (409, "Conflict"));
    let got = c.get("Flavor", None, "small").await.expect("get");
    assert_eq!(got, second);
}

#[tokio::test]
async fn a_metadata_only_update_keeps_generation() {
    let c = Cloud::new().await;
    let mut f = c
        .create(&Obj::flavor("small", 1, 512))
        .await
        .expect("create");
    f["metadata"]["labels"] = json!({"tier": "gold"});
    let got = c
        .put(&c.target("Flavor", None, Some("small")), &f)
        .await
        .expect("update");
    assert_eq!(got["metadata"]["labels"]["tier"], "gold");
    assert_eq!(got["metadata"]["generation"], 1);
}

#[tokio::test]
async fn merge_patch_changes_only_what_it_names() {
    let c = Cloud::new().await;
    c.create(&Obj::flavor("small", 1, 512).label("keep", "yes"))
        .await
        .expect("create");
    let t = c.target("Flavor", None, Some("small"));
    let patch = json!({"metadata": {"labels": {"tier": "gold"}}, "spec": {"ramMiB": 1024}});
    let (code, patched) = c.patch(&t, MERGE, &patch, "").await.expect("patch");
    assert_eq!(code, 200);
    assert_eq!(
        patched["metadata"]["labels"],
        json!({"keep": "yes", "tier": "gold"})
    );
    assert_eq!(
        (
            patched["spec"]["ramMiB"].as_u64(),
            patched["spec"]["vcpus"].as_u64()
        ),
        (Some(1024), Some(1))
    );
    assert_eq!(c.get("Flavor", None, "small").await.expect("get"), patched);
}

#[tokio::test]
async fn a_merge_patch_with_a_stale_resource_version_is_409() {
    let c = Cloud::new().await;
    let first = c
        .create(&Obj::flavor("small", 1, 512))
        .await
        .expect("create");
    let t = c.target("Flavor", None, Some("small"));
    c.patch(&t, MERGE, &json!({"spec": {"vcpus": 2}}), "")
        .await
        .expect("patch");
    let stale =
        json!({"metadata": {"resourceVersion": rv(&first).to_string()}, "spec": {"vcpus": 4}});
    let e = refused(c.patch(&t, MERGE, &stale, "").await);
    assert_eq!(e.code, 409);
    assert_eq!(
        c.get("Flavor", None, "small").await.expect("get")["spec"]["vcpus"],
        2
    );
}

#[tokio::test]
async fn a_patch_cannot_change_the_kind_or_api_version() {
    let c = Cloud::new().await;
    c.create(&Obj::flavor("small", 1, 512))
        .await
        .expect("create");
    let t = c.target("Flavor", None, Some("small"));
    let status = c.status("Flavor", None, "small");
    for (target, ct, patch) in [
        (
            &t,
            JSON_PATCH,
            json!([{"op": "replace", "path": "/kind", "value": "Volume"}]),
        ),
        (
            &t,
            JSON_PATCH,
            json!([{"op": "remove", "path": "/apiVersion"}]),
        ),
        (
            &t,
            JSON_PATCH,
            json!([{"op": "move", "from": "/kind", "path": "/spec/kind"}]),
        ),
        (&t, MERGE, json!({"apiVersion": "compute.stratus.dev/v2"})),
        (&t, MERGE, json!({"kind": null})),
        (
            &status,
            JSON_PATCH,
            json!([{"op": "replace", "path": "/kind", "value": "Volume"}]),
        ),
    ] {
        let e = refused(c.patch(target, ct, &patch, "").await);
        assert_eq!(e.code, 400, "{patch}: {e:?}");
    }
    let got = c.get("Flavor", None, "small").await.expect("get");
    assert_eq!(got["kind"], "Flavor");
    assert_eq!(got["apiVersion"], "compute.stratus.dev/v1");
}

#[tokio::test]
async fn json_patch_applies_its_operations_or_none() {
    let c = Cloud::new().await;
    c.create(&Obj::flavor("small", 1, 512))
        .await
        .expect("create");
    let t = c.target("Flavor", None, Some("small"));
    let ops = json!([
        {"op": "test", "path": "/spec/vcpus", "value": 1},
        {"op": "replace", "path": "/spec/vcpus", "value": 2},
    ]);
    let (_, patched) = c.patch(&t, JSON_PATCH, &ops, "").await.expect("patch");
    assert_eq!(patched["spec"]["vcpus"], 2);
    // The same test now fails: the replace after it must not happen either.
    let ops = json!([
        {"op": "replace", "path": "/spec/ramMiB", "value": 4096},
        {"op": "test", "path": "/spec/vcpus", "value": 1},
    ]);
    let e = refused(c.patch(&t, JSON_PATCH, &ops, "").await);
    assert_eq!(e.code, 422);
    let got = c.get("Flavor", None, "small").await.expect("get");
    assert_eq!(got["spec"]["ramMiB"], 512);
}

#[tokio::test]
async fn apply_creates_then_updates_and_reports_conflicts_between_managers() {
    let c = Cloud::new().await;
    let t = c.target("Flavor", None, Some("small"));
    let applied = Obj::flavor("small", 1, 512).0;
    let (code, _) = c
        .patch(&t, APPLY, &applied, "fieldManager=alice")
        .await
        .expect("apply creates");
    assert_eq!(code, 201);
    let mut more = applied.clone();
    more["spec"]["vcpus"] = json!(2);
    let (code, got) = c
        .patch(&t, APPLY, &more, "fieldManager=alice")
        .await
        .expect("apply updates");
    assert_eq!((code, got["spec"]["vcpus"].as_u64()), (200, Some(2)));

    let mut other = applied.clone();
    other["spec"]["vcpus"] = json!(4);
    let e = refused(c.patch(&t, APPLY, &other, "fieldManager=bob").await);
    assert_eq!(e.code, 409, "bob does not own spec.vcpus");
    assert_eq!(
        c.get("Flavor", None, "small").await.expect("get")["spec"]["vcpus"],
        2
    );
    let (_, forced) = c
        .patch(&t, APPLY, &other, "fieldManager=bob&force=true")
        .await
        .expect("a forced apply takes the field");
    assert_eq!(forced["spec"]["vcpus"], 4);
}

#[tokio::test]
async fn apply_needs_a_field_manager() {
    let c = Cloud::new().await;
    let t = c.target("Flavor", None, Some("small"));
    let e = refused(
        c.patch(&t, APPLY, &Obj::flavor("small", 1, 512).0, "")
            .await,
    );
    assert_eq!(e.code, 400);
    assert!(c.get("Flavor", None, "small").await.is_err());
}

#[tokio::test]
async fn delete_removes_the_object() {
    let c = Cloud::new().await;
    c.create(&Obj::flavor("small", 1, 512))
        .await
        .expect("create");
    let (code, _) = c.delete("Flavor", None, "small", "").await.expect("delete");
    assert_eq!(code, 200);
    assert_eq!(refused(c.get("Flavor", None, "small").await).code, 404);
    assert_eq!(
        refused(c.delete("Flavor", None, "small", "").await).code,
        404
    );
}

#[tokio::test]
async fn a_finalizer_holds_a_deleted_object_until_it_is_removed() {
    let c = Cloud::new().await;
    c.create(&Obj::flavor("small", 1, 512).finalizer("example.com/hold"))
        .await
        .expect("create");
    let (code, deleting) = c.delete("Flavor", None, "small", "").await.expect("delete");
    assert_eq!(code, 202, "accepted, not done");
    assert!(deleting["metadata"]["deletionTimestamp"].is_string());
    let held = c.get("Flavor", None, "small").await.expect("still there");
    assert_eq!(
        held["metadata"]["deletionTimestamp"],
        deleting["metadata"]["deletionTimestamp"]
    );

    let t = c.target("Flavor", None, Some("small"));
    let add = json!({"metadata": {"finalizers": ["example.com/hold", "example.com/late"]}});
    let e = refused(c.patch(&t, MERGE, &add, "").await);
    assert_eq!(e.code, 422, "no new finalizer on an object being deleted");

    let release = json!({"metadata": {"finalizers": null}});
    c.patch(&t, MERGE, &release, "").await.expect("release");
    assert_eq!(
        refused(c.get("Flavor", None, "small").await).code,
        404,
        "gone with its last finalizer"
    );
}

#[tokio::test]
async fn delete_with_a_stale_precondition_is_409() {
    let c = Cloud::new().await;
    let first = c
        .create(&Obj::flavor("small", 1, 512))
        .await
        .expect("create");
    let t = c.target("Flavor", None, Some("small"));
    c.patch(&t, MERGE, &json!({"spec": {"vcpus": 2}}), "")
        .await
        .expect("patch");
    let body = json!({"preconditions": {"resourceVersion": rv(&first).to_string()}}).to_string();
    let e = refused(
        c.api
            .delete(&t, body.as_bytes(), &Default::default(), &AllowAll)
            .await,
    );
    assert_eq!(e.code, 409);
    c.get("Flavor", None, "small").await.expect("still there");
}

#[tokio::test]
async fn dry_run_answers_as_a_write_but_stores_nothing() {
    let c = Cloud::new().await;
    let before = c.revision().await;
    let (code, answered) = c
        .create_with(&Obj::flavor("small", 1, 512), "dryRun=All")
        .await
        .expect("dry-run create");
    assert_eq!(code, 201);
    assert_eq!(answered["spec"]["vcpus"], 1);
    assert_eq!(refused(c.get("Flavor", None, "small").await).code, 404);
    assert_eq!(c.revision().await, before);

    let stored = c
        .create(&Obj::flavor("small", 1, 512))
        .await
        .expect("create");
    let t = c.target("Flavor", None, Some("small"));
    let (_, answered) = c
        .patch(&t, MERGE, &json!({"spec": {"vcpus": 8}}), "dryRun=All")
        .await
        .expect("dry-run patch");
    assert_eq!(answered["spec"]["vcpus"], 8);
    c.delete("Flavor", None, "small", "dryRun=All")
        .await
        .expect("dry-run delete");
    assert_eq!(c.get("Flavor", None, "small").await.expect("get"), stored);
}

#[tokio::test]
async fn list_pages_are_read_at_one_revision() {
    let c = Cloud::new().await;
    for n in ["a", "b", "c", "d", "e"] {
        c.create(&Obj::flavor(n, 1, 512)).await.expect("create");
    }
    let first = c.list("Flavor", None, "limit=2").await.expect("page 1");
    assert_eq!(names(&first), ["a", "b"]);
    let at = first["metadata"]["resourceVersion"].clone();
    // Written after the first page: not in the list being paged.
    c.create(&Obj::flavor("bb", 1, 512)).await.expect("create");
    c.delete("Flavor", None, "c", "").await.expect("delete");

    let mut seen = names(&first);
    let mut token = first["metadata"]["continue"]
        .as_str()
        .expect("a continue token")
        .to_string();
    loop {
        let page = c
            .list("Flavor", None, &format!("limit=2&continue={token}"))
            .await
            .expect("next page");
        assert_eq!(
            page["metadata"]["resourceVersion"], at,
            "every page at the first's revision"
        );
        seen.extend(names(&page));
        match page["metadata"]["continue"].as_str() {
            Some(t) => token = t.to_string(),
            None => break,
        }
    }
    assert_eq!(seen, ["a", "b", "c", "d", "e"]);
    let now = c.list("Flavor", None, "").await.expect("list");
    assert_eq!(names(&now), ["a", "b", "bb", "d", "e"]);
}

#[tokio::test]
async fn the_last_page_has_no_continue_token() {
    let c = Cloud::new().await;
    for n in ["a", "b"] {
        c.create(&Obj::flavor(n, 1, 512)).await.expect("create");
    }
    let page = c.list("Flavor", None, "limit=2").await.expect("list");
    assert_eq!(names(&page), ["a", "b"]);
    assert!(page["metadata"].get("continue").is_none(), "{page}");
}

#[tokio::test]
async fn a_continue_token_past_compaction_is_410() {
    let c = Cloud::new().await;
    for n in ["a", "b", "c"] {
        c.create(&Obj::flavor(n, 1, 512)).await.expect("create");
    }
    let first = c.list("Flavor", None, "limit=1").await.expect("page 1");
    let token = first["metadata"]["continue"]
        .as_str()
        .expect("token")
        .to_string();
    c.create(&Obj::flavor("d", 1, 512)).await.expect("create");
    c.api
        .store
        .compact(c.revision().await)
        .await
        .expect("compact");
    let e = refused(
        c.list("Flavor", None, &format!("limit=1&continue={token}"))
            .await,
    );
    assert_eq!((e.code, e.reason), (410, "Expired"));
}

#[tokio::test]
async fn a_continue_token_continues_only_its_own_list() {
    let c = Cloud::with_demo().await;
    c.create(&Obj::project("other")).await.expect("project");
    for (ns, n) in [("demo", "a"), ("demo", "b"), ("other", "a"), ("other", "b")] {
        c.create(&Obj::server(ns, n)).await.expect("server");
    }
    let first = c
        .list("Server", Some("demo"), "limit=1")
        .await
        .expect("page 1");
    let token = first["metadata"]["continue"]
        .as_str()
        .expect("token")
        .to_string();
    for (ns, query) in [
        (Some("other"), format!("limit=1&continue={token}")),
        (None, format!("limit=1&continue={token}")),
        (
            Some("demo"),
            format!("limit=1&labelSelector=tier%3Dweb&continue={token}"),
        ),
    ] {
        let e = refused(c.list("Server", ns, &query).await);
        assert_eq!(e.code, 400, "{ns:?} {query}: {e:?}");
    }
    let e = refused(
        c.list("Flavor", None, &format!("limit=1&continue={token}"))
            .await,
    );
    assert_eq!(e.code, 400);
    let e = refused(
        c.list("Server", Some("demo"), "limit=1&continue=bm90IGEgdG9rZW4")
            .await,
    );
    assert_eq!(e.code, 400);
    let rest = c
        .list("Server", Some("demo"), &format!("limit=1&continue={token}"))
        .await
        .expect("page 2");
    assert_eq!(names(&rest), ["b"]);
}

#[tokio::test]
async fn label_selectors_choose_by_labels() {
    let c = Cloud::new().await;
    c.create(&Obj::flavor("a", 1, 512).label("tier", "web"))
        .await
        .expect("a");
    c.create(&Obj::flavor("b", 1, 512).label("tier", "db"))
        .await
        .expect("b");
    c.create(&Obj::flavor("c", 1, 512)).await.expect("c");
    let web = c
        .list("Flavor", None, "labelSelector=tier%3Dweb")
        .await
        .expect("list");
    assert_eq!(names(&web), ["a"]);
    let not_web = c
        .list("Flavor", None, "labelSelector=tier!%3Dweb")
        .await
        .expect("list");
    assert_eq!(names(&not_web), ["b", "c"]);
    let some_tier = c
        .list("Flavor", None, "labelSelector=tier")
        .await
        .expect("list");
    assert_eq!(names(&some_tier), ["a", "b"]);
    let in_set = c
        .list("Flavor", None, "labelSelector=tier+in+(db,cache)")
        .await
        .expect("list");
    assert_eq!(names(&in_set), ["b"]);
}

#[tokio::test]
async fn field_selectors_choose_by_declared_fields() {
    let c = Cloud::with_demo().await;
    c.create(&Obj::server("demo", "a")).await.expect("a");
    c.create(&Obj::server("demo", "b").spec("flavor", json!("big")))
        .await
        .expect("b");
    let big = c
        .list("Server", Some("demo"), "fieldSelector=spec.flavor%3Dbig")
        .await
        .expect("list");
    assert_eq!(names(&big), ["b"]);
    let by_name = c
        .list("Server", Some("demo"), "fieldSelector=metadata.name%3Da")
        .await
        .expect("list");
    assert_eq!(names(&by_name), ["a"]);
    let e = refused(
        c.list("Server", Some("demo"), "fieldSelector=spec.image%3Dcirros")
            .await,
    );
    assert_eq!(e.code, 400, "a field the kind does not declare selectable");
}

#[tokio::test]
async fn a_namespace_lists_only_its_own_objects() {
    let c = Cloud::with_demo().await;
    c.create(&Obj::project("other")).await.expect("project");
    c.create(&Obj::server("demo", "a")).await.expect("a");
    c.create(&Obj::server("other", "b")).await.expect("b");
    assert_eq!(
        names(&c.list("Server", Some("demo"), "").await.expect("list")),
        ["a"]
    );
    assert_eq!(
        names(&c.list("Server", None, "").await.expect("list")).len(),
        2
    );
}

#[tokio::test]
async fn delete_collection_deletes_the_selected_objects_only() {
    let c = Cloud::new().await;
    c.create(&Obj::flavor("a", 1, 512).label("tier", "web"))
        .await
        .expect("a");
    c.create(
        &Obj::flavor("b", 1, 512)
            .label("tier", "web")
            .finalizer("example.com/hold"),
    )
    .await
    .expect("b");
    c.create(&Obj::flavor("c", 1, 512)).await.expect("c");
    let (code, _) = c
        .delete_collection("Flavor", None, "labelSelector=tier%3Dweb")
        .await
        .expect("deletecollection");
    assert_eq!(code, 200);
    let left = c.list("Flavor", None, "").await.expect("list");
    assert_eq!(
        names(&left),
        ["b", "c"],
        "a went; b waits for its finalizer; c was not selected"
    );
    let b = c.get("Flavor", None, "b").await.expect("b");
    assert!(b["metadata"]["deletionTimestamp"].is_string());
}

#[tokio::test]
async fn a_status_write_changes_status_only_and_a_spec_write_spec_only() {
    let c = Cloud::with_demo().await;
    let created = c
        .create(&Obj::server("demo", "web-1"))
        .await
        .expect("create");
    assert_eq!(created["status"]["phase"], "Pending");
    let status = c.status("Server", Some("demo"), "web-1");
    let mut both = created.clone();
    both["spec"]["flavor"] = json!("big");
    both["status"]["phase"] = json!("Running");
    let after_status = c.put(&status, &both).await.expect("status write");
    assert_eq!(
        after_status["spec"]["flavor"], "small",
        "spec is not written through status"
    );
    assert_eq!(after_status["status"]["phase"], "Running");
    assert_eq!(after_status["metadata"]["generation"], 1);

    let mut both = after_status.clone();
    both["spec"]["flavor"] = json!("big");
    both["status"]["phase"] = json!("Error");
    let after_spec = c
        .put(&c.target("Server", Some("demo"), Some("web-1")), &both)
        .await
        .expect("spec write");
    assert_eq!(after_spec["spec"]["flavor"], "big");
    assert_eq!(
        after_spec["status"]["phase"], "Running",
        "status is not written through the object"
    );
    assert_eq!(after_spec["metadata"]["generation"], 2);
}
