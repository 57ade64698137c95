//! Namespace lifecycle: nothing is created in a namespace whose Project is being deleted,
//! whichever admission writes the create, and no create lands after the deletion began.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use serde_json::{Value, json};
use stratus_apiserver::base::error::ApiError;

use crate::fixtures::{APPLY, Cloud, MERGE, Obj, names, refused, rv};

const KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDzM6cD2PSCyKxSeVPmPvv9Hz0pJGCsTbkMdcTFTAw4Z demo";

fn keypair(name: &str) -> Obj {
    Obj(
        json!({"apiVersion": "compute.stratus.dev/v1", "kind": "Keypair",
        "metadata": {"name": name, "namespace": "demo"}, "spec": {"publicKey": KEY}}),
    )
}

fn subnet(name: &str, cidr: &str) -> Obj {
    Obj(
        json!({"apiVersion": "network.stratus.dev/v1", "kind": "Subnet",
        "metadata": {"name": name, "namespace": "demo"},
        "spec": {"network": "n", "cidr": cidr}}),
    )
}

/// Kubernetes' answer to a create in a terminating namespace.
fn assert_terminating(e: &ApiError, resource: &str, name: &str) {
    assert_eq!((e.code, e.reason), (403, "Forbidden"), "{e:?}");
    assert_eq!(
        e.message,
        format!(
            "{resource} \"{name}\" is forbidden: unable to create new content in namespace demo because it is being terminated"
        )
    );
    let causes: Vec<(&str, &str)> = e
        .details
        .causes
        .iter()
        .map(|c| (c.reason.as_str(), c.field.as_str()))
        .collect();
    assert_eq!(causes, [("NamespaceTerminating", "metadata.namespace")]);
}

/// Project `demo` (held by a finalizer) with network `n`, subnet `s`, a Quota on servers and
/// one Server `kept`.
async fn demo_with_content() -> Cloud {
    let c = Cloud::new().await;
    c.create(&Obj::project("demo").finalizer("test/hold"))
        .await
        .expect("project");
    c.create(&Obj::flavor("small", 1, 512))
        .await
        .expect("flavor");
    c.create(&Obj::quota("demo", "q", json!({"servers": 100_000})))
        .await
        .expect("quota");
    c.create(&Obj::network("demo", "n")).await.expect("network");
    c.create(&subnet("s", "10.0.0.0/16")).await.expect("subnet");
    c.create(&Obj::server("demo", "kept"))
        .await
        .expect("server");
    c
}

/// Begins the deletion of Project `demo`; the revision it began at.
async fn delete_demo(c: &Cloud) -> i64 {
    let (code, body) = c
        .delete("Project", None, "demo", "")
        .await
        .expect("delete project");
    // Accepted: the finalizer holds the Project, terminating.
    assert_eq!(code, 202);
    assert!(body["metadata"]["deletionTimestamp"].is_string(), "{body}");
    rv(&body)
}

#[tokio::test]
async fn every_create_in_a_terminating_namespace_is_403_and_nothing_is_written() {
    let c = demo_with_content().await;
    // The Project is read from the watch cache from here on: the deletion that follows is
    // seen through it, or through the create's failed transaction.
    c.create(&keypair("before")).await.expect("keypair");
    delete_demo(&c).await;
    let before = c.revision().await;

    // Plain creates, through each admission that writes a create: none (Keypair), quota
    // (Server), IPAM (Network, Subnet, Port).
    assert_terminating(
        &refused(c.create(&keypair("k1")).await),
        "keypairs.compute.stratus.dev",
        "k1",
    );
    assert_terminating(
        &refused(c.create(&Obj::server("demo", "web-1")).await),
        "servers.compute.stratus.dev",
        "web-1",
    );
    assert_terminating(
        &refused(c.create(&Obj::network("demo", "n2")).await),
        "networks.network.stratus.dev",
        "n2",
    );
    assert_terminating(
        &refused(c.create(&subnet("s2", "10.1.0.0/24")).await),
        "subnets.network.stratus.dev",
        "s2",
    );
    assert_terminating(
        &refused(c.create(&Obj::port("demo", "p1", "n")).await),
        "ports.network.stratus.dev",
        "p1",
    );
    // A server-side apply that would create.
    let t = c.target("Keypair", Some("demo"), Some("k2"));
    assert_terminating(
        &refused(
            c.patch(&t, APPLY, &keypair("k2").0, "fieldManager=kubectl")
                .await,
        ),
        "keypairs.compute.stratus.dev",
        "k2",
    );
    // A dry run is refused the same way.
    assert_terminating(
        &refused(c.create_with(&keypair("k3"), "dryRun=All").await),
        "keypairs.compute.stratus.dev",
        "k3",
    );
    assert_eq!(c.revision().await, before, "nothing was written");
    assert_eq!(
        names(&c.list("Keypair", Some("demo"), "").await.expect("list")),
        ["before"]
    );

    // What is there may still change (and go): the namespace is emptied through updates and
    // deletes.
    let label = json!({"metadata": {"labels": {"going": "yes"}}});
    c.patch(
        &c.target("Server", Some("demo"), Some("kept")),
        MERGE,
        &label,
        "",
    )
    .await
    .expect("an update in a terminating namespace");
    c.delete("Keypair", Some("demo"), "before", "")
        .await
        .expect("a delete in a terminating namespace");
}

/// A Project deleted before the project controller has seen it (none runs here) is held by
/// the cleanup finalizer it was created with: it stays, terminating, and so does its content,
/// for the controller to empty; it never goes at once leaving its objects behind.
#[tokio::test]
async fn a_project_deleted_at_once_waits_for_its_cleanup_whoever_created_it() {
    let c = Cloud::new().await;
    let created = c.create(&Obj::project("demo")).await.expect("project");
    assert_eq!(
        created["metadata"]["finalizers"],
        json!(["identity.stratus.dev/project-cleanup"])
    );
    // Owned by no field manager: an apply of the creator's that leaves it out keeps it.
    assert!(
        !created["metadata"]["managedFields"]
            .to_string()
            .contains("finalizers"),
        "{created}"
    );
    c.create(&keypair("k")).await.expect("keypair");
    delete_demo(&c).await;
    c.get("Project", None, "demo").await.expect("held");
    c.get("Keypair", Some("demo"), "k")
        .await
        .expect("the content stays for the controller to remove");

    // A server-side apply that creates, and a creator that names finalizers of its own.
    let t = c.target("Project", None, Some("applied"));
    let body = json!({"apiVersion": "identity.stratus.dev/v1", "kind": "Project",
        "metadata": {"name": "applied", "finalizers": ["example.com/hold"]}, "spec": {}});
    let (_, applied) = c
        .patch(&t, APPLY, &body, "fieldManager=kubectl")
        .await
        .expect("apply");
    assert_eq!(
        applied["metadata"]["finalizers"],
        json!(["example.com/hold", "identity.stratus.dev/project-cleanup"])
    );
    let (_, again) = c
        .patch(&t, APPLY, &body, "fieldManager=kubectl")
        .await
        .expect("apply again");
    assert_eq!(
        again["metadata"]["finalizers"], applied["metadata"]["finalizers"],
        "an apply without it keeps it"
    );
}

#[tokio::test]
async fn a_namespace_without_a_project_is_still_404() {
    let c = Cloud::new().await;
    let e = refused(c.create(&Obj::server("nowhere", "web-1")).await);
    assert_eq!(
        (e.code, e.details.kind.as_deref()),
        (404, Some("namespaces"))
    );
    assert_eq!(e.message, "namespaces \"nowhere\" not found");
}

#[tokio::test]
async fn a_project_that_only_changed_since_its_check_admits_the_create() {
    let c = demo_with_content().await;
    // Warm the Project's cache, then change the Project (a label, not a deletion) and create
    // at once: whether the cache has seen the change or the transaction finds it, the create
    // is checked again and passes.
    c.create(&keypair("k0")).await.expect("keypair");
    for i in 0..20 {
        let label = json!({"metadata": {"labels": {"round": i.to_string()}}});
        c.patch(&c.target("Project", None, Some("demo")), MERGE, &label, "")
            .await
            .expect("label the project");
        c.create(&keypair(&format!("k{}", i + 1)))
            .await
            .expect("a create in an active project");
        c.create(&Obj::port("demo", &format!("p{i}"), "n"))
            .await
            .expect("a port in an active project");
    }
}

/// Creates racing the Project's deletion: every create that succeeds was written before the
/// deletion began (so whoever lists the namespace after it began sees it), every one refused
/// is refused as terminating, and what the namespace holds is exactly what succeeded.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_create_lands_after_the_deletion_began() {
    let c = Arc::new(demo_with_content().await);
    c.create(&keypair("warm")).await.expect("keypair");
    let done = Arc::new(AtomicUsize::new(0));
    let mut writers = Vec::new();
    for w in 0..8 {
        let (c, done) = (Arc::clone(&c), Arc::clone(&done));
        writers.push(tokio::spawn(async move {
            let mut out: Vec<(String, Result<i64, ApiError>)> = Vec::new();
            for i in 0..20_000 {
                let (obj, name) = match i % 3 {
                    0 => {
                        let n = format!("k-{w}-{i}");
                        (keypair(&n), n)
                    }
                    1 => {
                        let n = format!("p-{w}-{i}");
                        (Obj::port("demo", &n, "n"), n)
                    }
                    _ => {
                        let n = format!("s-{w}-{i}");
                        (Obj::server("demo", &n), n)
                    }
                };
                let r = c.create(&obj).await.map(|v: Value| rv(&v));
                let refused = r.is_err();
                out.push((name, r));
                if refused {
                    return out;
                }
                done.fetch_add(1, Ordering::Relaxed);
                tokio::task::yield_now().await;
            }
            panic!("writer {w} was never refused");
        }));
    }
    while done.load(Ordering::Relaxed) < 80 {
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
    let began = delete_demo(&c).await;
    let mut created = Vec::new();
    let mut refusals = 0;
    for w in writers {
        for (name, r) in w.await.expect("writer") {
            match r {
                Ok(at) => {
                    assert!(
                        at < began,
                        "{name} was created at {at}, after the deletion began at {began}"
                    );
                    created.push(name);
                }
                Err(e) => {
                    let resource = match name.as_bytes()[0] {
                        b'k' => "keypairs.compute.stratus.dev",
                        b'p' => "ports.network.stratus.dev",
                        _ => "servers.compute.stratus.dev",
                    };
                    assert_terminating(&e, resource, &name);
                    refusals += 1;
                }
            }
        }
    }
    assert_eq!(
        refusals, 8,
        "every writer was refused once the deletion began"
    );
    let mut held: Vec<String> = Vec::new();
    for kind in ["Keypair", "Port", "Server"] {
        held.extend(
            names(&c.list(kind, Some("demo"), "").await.expect("list"))
                .into_iter()
                .filter(|n| n.contains('-')),
        );
    }
    held.sort();
    created.sort();
    assert_eq!(held, created);
}

/// A Project deleted and created again under the same name: its new members cannot read the
/// old Project's objects at an old revision (an Exact LIST, a watch from it), which etcd still
/// holds until it compacts; they get 410 Gone and list afresh. Reads from the new Project's
/// revisions on are served.
/// Project demo made with keypair `old-secret`, deleted (the keypair first) and made again,
/// empty; the revision at which the old one held its keypair.
async fn demo_recreated(c: &Cloud) -> i64 {
    c.create(&Obj::project("demo")).await.expect("project");
    c.create(&keypair("old-secret")).await.expect("keypair");
    let old = c.revision().await;
    c.delete("Keypair", Some("demo"), "old-secret", "")
        .await
        .expect("delete keypair");
    delete_demo(c).await;
    // The project controller's part: the namespace is empty, its finalizer goes.
    c.patch(
        &c.target("Project", None, Some("demo")),
        MERGE,
        &json!({"metadata": {"finalizers": null}}),
        "",
    )
    .await
    .expect("release");
    assert!(c.get("Project", None, "demo").await.is_err(), "gone");
    c.create(&Obj::project("demo"))
        .await
        .expect("project again");
    old
}

#[tokio::test]
async fn a_recreated_project_does_not_show_the_old_ones_objects_at_old_revisions() {
    let c = Cloud::new().await;
    let old = demo_recreated(&c).await;
    c.create(&keypair("new")).await.expect("keypair");
    let new = c.revision().await;

    for query in [
        format!("resourceVersion={old}&resourceVersionMatch=Exact"),
        format!("resourceVersion={old}&limit=10"),
    ] {
        let e = refused(c.list("Keypair", Some("demo"), &query).await);
        assert_eq!(e.code, 410, "{query}: {}", e.message);
        assert!(!e.message.contains("old-secret"), "{}", e.message);
    }
    match c
        .watch("Keypair", Some("demo"), &format!("resourceVersion={old}"))
        .await
    {
        Err(e) => assert_eq!(e.code, 410, "{}", e.message),
        Ok(_) => panic!("a watch from before the project was created again"),
    }

    let list = c
        .list(
            "Keypair",
            Some("demo"),
            &format!("resourceVersion={new}&resourceVersionMatch=Exact"),
        )
        .await
        .expect("a revision of the new project");
    assert_eq!(names(&list), ["new"]);
    c.watch("Keypair", Some("demo"), &format!("resourceVersion={new}"))
        .await
        .expect("a watch from the new project's revisions");
}

/// The same re-created Project read through a continue token forged to an old revision (the
/// token is neither secret nor signed: base64 of JSON naming the revision and the next key):
/// 410 Gone for a paged LIST, an unpaged one and a selector's (the watch cache's path), never
/// the old Project's objects.
#[tokio::test]
async fn a_continue_token_forged_to_before_a_recreated_project_is_410() {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let c = Cloud::new().await;
    let old = demo_recreated(&c).await;
    for name in ["new-a", "new-b"] {
        c.create(&keypair(name)).await.expect("keypair");
    }

    for selector in ["", "labelSelector=app%21%3Dx&"] {
        let first = c
            .list("Keypair", Some("demo"), &format!("{selector}limit=1"))
            .await
            .expect("first page");
        let token = first["metadata"]["continue"]
            .as_str()
            .unwrap_or_else(|| panic!("no continue token: {first}"));
        let mut raw: Value =
            serde_json::from_slice(&b64.decode(token).expect("base64")).expect("JSON");
        // The genuine token continues the new project's list.
        let next = c
            .list(
                "Keypair",
                Some("demo"),
                &format!("{selector}limit=1&continue={token}"),
            )
            .await
            .expect("genuine token");
        assert_eq!(names(&next), ["new-b"], "{selector}");
        raw["rv"] = json!(old);
        raw["start"] = json!("0");
        let forged = b64.encode(serde_json::to_vec(&raw).expect("JSON"));
        for query in [
            format!("{selector}limit=10&continue={forged}"),
            format!("{selector}continue={forged}"),
        ] {
            let e = refused(c.list("Keypair", Some("demo"), &query).await);
            assert_eq!(e.code, 410, "{query}: {}", e.message);
            assert!(!e.message.contains("old-secret"), "{}", e.message);
        }
    }
}
