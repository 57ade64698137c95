//! The policy on final objects: a node's writes and a user's role assignments are decided on
//! the objects a write would store (after a patch or apply), whatever the content type, and a
//! request's path and body name the same object.

use serde_json::{Value, json};
use stratus_api_types::identity::Role;

use crate::fixtures::{APPLY, As, Cloud, JSON, JSON_PATCH, MERGE, Obj, STRATEGIC, YAML, refused};

/// Project `demo` with Server `web` placed on node `a` (hypervisors `a` and `b`), with a
/// finalizer as the compute agent holds one.
async fn placed() -> Cloud {
    let c = Cloud::with_demo().await;
    c.hypervisor("a", 4, 4096).await;
    c.hypervisor("b", 4, 4096).await;
    c.create(
        &Obj::server("demo", "web")
            .finalizer("compute.stratus.dev/teardown")
            .label("app", "web"),
    )
    .await
    .expect("server");
    c.bind("demo", "web", "a").await.expect("bind");
    c
}

/// Asserts `r` is refused with `code`, and that `before` is what is stored now.
async fn refused_unchanged(
    c: &Cloud,
    r: Result<Value, stratus_apiserver::base::error::ApiError>,
    code: u16,
    kind: &str,
    ns: Option<&str>,
    name: &str,
    before: &Value,
) {
    let e = refused(r);
    assert_eq!(e.code, code, "{}", e.message);
    assert_eq!(
        &c.get(kind, ns, name).await.expect("still there"),
        before,
        "unchanged"
    );
}

#[tokio::test]
async fn a_node_changes_no_spec_whatever_the_content_type() {
    let c = placed().await;
    let a = c.node("a");
    let t = c.target("Server", Some("demo"), Some("web"));
    let before = c.get("Server", Some("demo"), "web").await.expect("web");
    let mut put = before.clone();
    put["spec"]["image"] = json!("evil");
    let yaml_put = serde_saphyr::to_string(&put).expect("YAML");
    let attempts: [(&str, String); 7] = [
        (MERGE, json!({"spec": {"image": "evil"}}).to_string()),
        (JSON_PATCH, json!([{"op": "replace", "path": "/spec", "value": {"flavor": "small", "image": "evil"}}]).to_string()),
        // The path spelled with an escaped letter: "/spec/im\u0061ge".
        (JSON_PATCH, r#"[{"op": "replace", "path": "/spec/im\u0061ge", "value": "evil"}]"#.into()),
        // A move whose target looks like a finalizer, taking its value from the labels.
        (JSON_PATCH, json!([{"op": "move", "from": "/metadata/labels/app", "path": "/metadata/finalizers/-"}]).to_string()),
        (JSON_PATCH, json!([{"op": "copy", "from": "/metadata/name", "path": "/spec/image"}]).to_string()),
        (APPLY, "apiVersion: compute.stratus.dev/v1\nkind: Server\nmetadata:\n  name: web\n  namespace: demo\nspec:\n  flavor: small\n  image: evil\n".into()),
        (YAML, yaml_put.clone()),
    ];
    for (ct, body) in attempts {
        let r = if ct == YAML {
            a.put(&t, ct, &body).await
        } else {
            a.patch(&t, ct, &body).await
        };
        let e = refused(r);
        assert_eq!(e.code, 403, "{ct} {body}: {}", e.message);
    }
    refused_unchanged(
        &c,
        a.put(&t, JSON, &put.to_string()).await,
        403,
        "Server",
        Some("demo"),
        "web",
        &before,
    )
    .await;
    assert_eq!(
        c.get("Server", Some("demo"), "web").await.expect("web"),
        before
    );
}

#[tokio::test]
async fn a_node_releases_finalizers_only_of_what_is_placed_on_it() {
    let c = placed().await;
    let t = c.target("Server", Some("demo"), Some("web"));
    let before = c.get("Server", Some("demo"), "web").await.expect("web");
    let release = json!([{"op": "test", "path": "/metadata/finalizers/0", "value": "compute.stratus.dev/teardown"}, {"op": "remove", "path": "/metadata/finalizers/0"}]).to_string();
    refused_unchanged(
        &c,
        c.node("b").patch(&t, JSON_PATCH, &release).await,
        403,
        "Server",
        Some("demo"),
        "web",
        &before,
    )
    .await;
    // A release that also changes a label is more than a release.
    let more = json!({"metadata": {"finalizers": [], "labels": {"x": "y"}}}).to_string();
    refused_unchanged(
        &c,
        c.node("a").patch(&t, MERGE, &more).await,
        403,
        "Server",
        Some("demo"),
        "web",
        &before,
    )
    .await;
    let released = c
        .node("a")
        .patch(&t, JSON_PATCH, &release)
        .await
        .expect("released");
    assert_eq!(
        released["metadata"]
            .get("finalizers")
            .map(|f| f.as_array().map(Vec::len)),
        Some(Some(0))
    );
}

#[tokio::test]
async fn a_node_writes_status_only_of_what_stays_on_it() {
    let c = placed().await;
    let st = c.status("Server", Some("demo"), "web");
    let before = c.get("Server", Some("demo"), "web").await.expect("web");
    let phase = json!({"status": {"phase": "Running"}}).to_string();
    refused_unchanged(
        &c,
        c.node("b").patch(&st, MERGE, &phase).await,
        403,
        "Server",
        Some("demo"),
        "web",
        &before,
    )
    .await;
    // Moving the server to another node through its status, spelled as a copy.
    let away =
        json!([{"op": "copy", "from": "/metadata/name", "path": "/status/hypervisor"}]).to_string();
    refused_unchanged(
        &c,
        c.node("a").patch(&st, JSON_PATCH, &away).await,
        403,
        "Server",
        Some("demo"),
        "web",
        &before,
    )
    .await;
    let got = c
        .node("a")
        .patch(&st, MERGE, &phase)
        .await
        .expect("its own");
    assert_eq!(got["status"]["phase"], "Running");
}

fn lease(name: &str) -> Value {
    json!({
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": name, "namespace": "kube-node-lease"},
        "spec": {"holderIdentity": name, "leaseDurationSeconds": 40, "renewTime": "2030-01-01T00:00:00.000000Z"},
    })
}

#[tokio::test]
async fn a_node_touches_no_other_nodes_lease() {
    let c = Cloud::new().await;
    let (a, b) = (c.node("a"), c.node("b"));
    let leases = c.target("Lease", Some("kube-node-lease"), None);
    let lease_a = c.target("Lease", Some("kube-node-lease"), Some("a"));
    let lease_b = c.target("Lease", Some("kube-node-lease"), Some("b"));
    b.create(&leases, JSON, &lease("b").to_string())
        .await
        .expect("b's own");
    let before = c
        .get("Lease", Some("kube-node-lease"), "b")
        .await
        .expect("b");
    // DELETE .../leases/b with a body naming a.
    let opts =
        json!({"kind": "DeleteOptions", "apiVersion": "v1", "metadata": {"name": "a"}}).to_string();
    refused_unchanged(
        &c,
        a.delete(&lease_b, &opts).await,
        403,
        "Lease",
        Some("kube-node-lease"),
        "b",
        &before,
    )
    .await;
    // Apply to .../leases/a with a body naming b: the names disagree.
    let mut old = lease("b");
    old["spec"]["renewTime"] = json!("2000-01-01T00:00:00.000000Z");
    let e = refused(a.patch(&lease_a, APPLY, &old.to_string()).await);
    assert_eq!(e.code, 400);
    assert_eq!(e.details.causes[0].field, "metadata.name");
    assert_eq!(
        c.get("Lease", Some("kube-node-lease"), "b")
            .await
            .expect("b"),
        before
    );
    assert_eq!(
        refused(c.get("Lease", Some("kube-node-lease"), "a").await).code,
        404
    );
    // A create of b's lease, in YAML, and a merge patch of it.
    let yaml = serde_saphyr::to_string(&lease("b")).expect("YAML");
    refused_unchanged(
        &c,
        a.create(&leases, YAML, &yaml).await,
        403,
        "Lease",
        Some("kube-node-lease"),
        "b",
        &before,
    )
    .await;
    refused_unchanged(
        &c,
        a.patch(
            &lease_b,
            MERGE,
            r#"{"spec": {"renewTime": "2000-01-01T00:00:00.000000Z"}}"#,
        )
        .await,
        403,
        "Lease",
        Some("kube-node-lease"),
        "b",
        &before,
    )
    .await;
    let renew = json!({"spec": {"renewTime": "2000-01-01T00:00:00.000000Z"}}).to_string();
    refused_unchanged(
        &c,
        a.patch(&lease_b, STRATEGIC, &renew).await,
        403,
        "Lease",
        Some("kube-node-lease"),
        "b",
        &before,
    )
    .await;
    // Its own lease, handed to another holder by a JSON patch, is no longer its own.
    a.patch(&lease_a, APPLY, &lease("a").to_string())
        .await
        .expect("a's own, applied");
    let rename =
        json!([{"op": "replace", "path": "/spec/holderIdentity", "value": "b"}]).to_string();
    let e = refused(a.patch(&lease_a, JSON_PATCH, &rename).await);
    assert_eq!(e.code, 403);
    // Elsewhere than kube-node-lease, not even its own name.
    let other = c.target("Lease", Some("kube-system"), None);
    let mut there = lease("a");
    there["metadata"]["namespace"] = json!("kube-system");
    assert_eq!(
        refused(a.create(&other, JSON, &there.to_string()).await).code,
        403
    );
    assert_eq!(refused(a.read(&lease_b, "").await).code, 403);
    a.read(&lease_a, "").await.expect("its own");
}

#[tokio::test]
async fn a_node_reads_only_its_graph() {
    let c = placed().await;
    c.create(&Obj::flavor("other", 2, 1024))
        .await
        .expect("flavor");
    let a = c.node("a");
    let b = c.node("b");
    let web = c.target("Server", Some("demo"), Some("web"));
    a.read(&web, "").await.expect("placed on a");
    assert_eq!(refused(b.read(&web, "").await).code, 403);
    let small = c.target("Flavor", None, Some("small"));
    a.read(&small, "").await.expect("its server's flavor");
    assert_eq!(
        refused(b.read(&small, "").await).code,
        403,
        "no server of b uses it"
    );
    assert_eq!(
        refused(a.read(&c.target("Flavor", None, Some("other")), "").await).code,
        403
    );
    assert_eq!(
        refused(a.read(&c.target("Flavor", None, None), "").await).code,
        403
    );
    // Every Hypervisor, read-only (as kubelets read every Node; see `node.rs`).
    a.read(&c.target("Hypervisor", None, Some("b")), "")
        .await
        .expect("a peer's");
    for (kind, ns) in [
        ("User", None),
        ("RoleAssignment", Some("demo")),
        ("Quota", Some("demo")),
        ("Project", None),
        ("Network", Some("demo")),
        ("Volume", Some("demo")),
    ] {
        let e = refused(a.read(&c.target(kind, ns, None), "").await);
        assert_eq!(e.code, 403, "{kind}");
    }
}

#[tokio::test]
async fn a_node_writes_only_its_own_hypervisor_status() {
    let c = placed().await;
    let before = c.get("Hypervisor", None, "b").await.expect("b");
    let st_b = c.status("Hypervisor", None, "b");
    let down = json!({"status": {"phase": "NotReady"}}).to_string();
    refused_unchanged(
        &c,
        c.node("a").patch(&st_b, MERGE, &down).await,
        403,
        "Hypervisor",
        None,
        "b",
        &before,
    )
    .await;
    // Its own spec is the operator's.
    let hv_a = c.target("Hypervisor", None, Some("a"));
    let a_before = c.get("Hypervisor", None, "a").await.expect("a");
    refused_unchanged(
        &c,
        c.node("a")
            .patch(&hv_a, MERGE, r#"{"spec": {"cpuAllocationRatio": 64}}"#)
            .await,
        403,
        "Hypervisor",
        None,
        "a",
        &a_before,
    )
    .await;
    c.node("a")
        .patch(&c.status("Hypervisor", None, "a"), MERGE, &down)
        .await
        .expect("its own status");
    assert_eq!(
        refused(
            c.node("a")
                .delete_collection(&c.target("Hypervisor", None, None))
                .await
        )
        .code,
        403
    );
}

#[tokio::test]
async fn a_node_records_only_its_own_events() {
    let c = Cloud::with_demo().await;
    let events = c.target("Event", Some("demo"), None);
    let event = |name: &str, by: &str| {
        json!({
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"name": name, "namespace": "demo"},
            "involvedObject": {"kind": "Server", "namespace": "demo", "name": "web"},
            "reason": "Started", "message": "started", "type": "Normal",
            "reportingComponent": "stratus-agent", "reportingInstance": by,
        })
    };
    let yaml = serde_saphyr::to_string(&event("e1", "b")).expect("YAML");
    assert_eq!(
        refused(c.node("a").create(&events, YAML, &yaml).await).code,
        403
    );
    assert_eq!(refused(c.get("Event", Some("demo"), "e1").await).code, 404);
    let yaml = serde_saphyr::to_string(&event("e1", "a")).expect("YAML");
    c.node("a")
        .create(&events, YAML, &yaml)
        .await
        .expect("its own");
    let t = c.target("Event", Some("demo"), Some("e1"));
    let before = c.get("Event", Some("demo"), "e1").await.expect("e1");
    refused_unchanged(
        &c,
        c.node("a")
            .patch(&t, MERGE, r#"{"reportingInstance": "b"}"#)
            .await,
        403,
        "Event",
        Some("demo"),
        "e1",
        &before,
    )
    .await;
    refused_unchanged(
        &c,
        c.node("b").patch(&t, MERGE, r#"{"message": "lies"}"#).await,
        403,
        "Event",
        Some("demo"),
        "e1",
        &before,
    )
    .await;
}

fn assignment(ns: &str, name: &str, user: &str, role: &str) -> Value {
    json!({
        "apiVersion": "identity.stratus.dev/v1", "kind": "RoleAssignment",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"user": user, "role": role},
    })
}

/// Project `demo` where `pat` is admin (through RoleAssignment `pat-admin`).
async fn project_admin() -> (Cloud, Value) {
    let c = Cloud::with_demo().await;
    // An assignment names a User that exists (admission makes it owned by that User).
    for user in ["pat", "sam", "root"] {
        c.create(&Obj(json!({
            "apiVersion": "identity.stratus.dev/v1", "kind": "User",
            "metadata": {"name": user}, "spec": {},
        })))
        .await
        .expect("user");
    }
    let ras = c.target("RoleAssignment", Some("demo"), None);
    c.user("root", &[(None, Role::Admin)])
        .create(
            &ras,
            JSON,
            &assignment("demo", "pat-admin", "pat", "admin").to_string(),
        )
        .await
        .expect("pat's assignment");
    let created = c
        .get("RoleAssignment", Some("demo"), "pat-admin")
        .await
        .expect("stored");
    (c, created)
}

fn pat(c: &Cloud) -> As<'_> {
    c.user("pat", &[(Some("demo"), Role::Admin)])
}

#[tokio::test]
async fn a_project_admin_grants_no_cluster_wide_role_whatever_the_spelling() {
    let (c, before) = project_admin().await;
    let t = c.target("RoleAssignment", Some("demo"), Some("pat-admin"));
    let mut put = before.clone();
    put["spec"]["clusterWide"] = json!(true);
    let attempts: [(&str, String); 6] = [
        // The attack as reported: the key spelled with an escaped letter.
        (JSON_PATCH, r#"[{"op":"add","path":"/spec/cluster\u0057ide","value":true}]"#.into()),
        (JSON_PATCH, json!([{"op": "copy", "from": "/metadata/generation", "path": "/spec/clusterWide"}]).to_string()),
        (MERGE, r#"{"spec": {"cluster\u0057ide": true}}"#.into()),
        (APPLY, "apiVersion: identity.stratus.dev/v1\nkind: RoleAssignment\nmetadata:\n  name: pat-admin\n  namespace: demo\nspec:\n  user: pat\n  role: admin\n  \"cluster\\x57ide\": true\n".into()),
        (YAML, serde_saphyr::to_string(&put).expect("YAML")),
        (JSON, put.to_string()),
    ];
    for (ct, body) in attempts {
        let r = match ct {
            YAML | JSON => pat(&c).put(&t, ct, &body).await,
            _ => pat(&c).patch(&t, ct, &body).await,
        };
        let e = refused(r);
        // (a copy of a number into a boolean field is refused by the schema first.)
        assert!(
            matches!(e.code, 403 | 422),
            "{ct} {body}: {} {}",
            e.code,
            e.message
        );
        let now = c
            .get("RoleAssignment", Some("demo"), "pat-admin")
            .await
            .expect("there");
        assert_eq!(now, before, "{ct} {body}: unchanged");
    }
    // A new cluster-wide assignment, and one in another project.
    let ras = c.target("RoleAssignment", Some("demo"), None);
    let mut wide = assignment("demo", "wide", "pat", "admin");
    wide["spec"]["clusterWide"] = json!(true);
    assert_eq!(
        refused(
            pat(&c)
                .create(&ras, YAML, &serde_saphyr::to_string(&wide).expect("YAML"))
                .await
        )
        .code,
        403
    );
    assert_eq!(
        refused(c.get("RoleAssignment", Some("demo"), "wide").await).code,
        404
    );
    c.create(&Obj::project("other")).await.expect("other");
    let elsewhere = c.target("RoleAssignment", Some("other"), None);
    assert_eq!(
        refused(
            pat(&c)
                .create(
                    &elsewhere,
                    JSON,
                    &assignment("other", "x", "pat", "admin").to_string()
                )
                .await
        )
        .code,
        403
    );
    // Within the project, as an admin may.
    pat(&c)
        .create(
            &ras,
            JSON,
            &assignment("demo", "sam", "sam", "member").to_string(),
        )
        .await
        .expect("a member");
}

#[tokio::test]
async fn a_project_admin_deletes_no_cluster_wide_assignment() {
    let (c, _) = project_admin().await;
    let ras = c.target("RoleAssignment", Some("demo"), None);
    let mut wide = assignment("demo", "root-wide", "root", "admin");
    wide["spec"]["clusterWide"] = json!(true);
    c.user("root", &[(None, Role::Admin)])
        .create(&ras, JSON, &wide.to_string())
        .await
        .expect("by a cluster admin");
    let before = c
        .get("RoleAssignment", Some("demo"), "root-wide")
        .await
        .expect("there");
    let t = c.target("RoleAssignment", Some("demo"), Some("root-wide"));
    refused_unchanged(
        &c,
        pat(&c).delete(&t, "").await,
        403,
        "RoleAssignment",
        Some("demo"),
        "root-wide",
        &before,
    )
    .await;
    refused_unchanged(
        &c,
        pat(&c).delete_collection(&ras).await,
        403,
        "RoleAssignment",
        Some("demo"),
        "root-wide",
        &before,
    )
    .await;
    refused_unchanged(
        &c,
        pat(&c)
            .patch(&t, MERGE, r#"{"spec": {"role": "reader"}}"#)
            .await,
        403,
        "RoleAssignment",
        Some("demo"),
        "root-wide",
        &before,
    )
    .await;
}

#[tokio::test]
async fn a_json_patch_is_bounded_in_operations_and_in_what_it_makes() {
    let c = Cloud::with_demo().await;
    c.create(&Obj::flavor("small2", 1, 512).label("a", &"x".repeat(60)))
        .await
        .expect("flavor");
    let t = c.target("Flavor", None, Some("small2"));
    let before = c.get("Flavor", None, "small2").await.expect("there");
    // 20 copies of /metadata into itself double it each time: 2^20 times its size.
    let ops: Vec<Value> = (0..20)
        .map(|i| json!({"op": "copy", "from": "/metadata", "path": format!("/metadata/labels/c{i}")}))
        .collect();
    let started = std::time::Instant::now();
    let e = refused(
        c.user("root", &[(None, Role::Admin)])
            .patch(&t, JSON_PATCH, &Value::Array(ops).to_string())
            .await,
    );
    assert_eq!(e.code, 413, "{}", e.message);
    assert!(e.message.contains("operation"), "{}", e.message);
    assert!(
        started.elapsed() < std::time::Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(
        c.get("Flavor", None, "small2").await.expect("there"),
        before
    );
    let many: Vec<Value> = (0..10_001)
        .map(|_| json!({"op": "test", "path": "/kind", "value": "Flavor"}))
        .collect();
    let e = refused(
        c.user("root", &[(None, Role::Admin)])
            .patch(&t, JSON_PATCH, &Value::Array(many).to_string())
            .await,
    );
    assert_eq!(e.code, 413);
    assert!(e.message.contains("10000"), "{}", e.message);
    // A merge patch making a large object is bounded too.
    let big = json!({"metadata": {"annotations": {"a": "x".repeat(2 * 1024 * 1024)}}}).to_string();
    assert_eq!(
        refused(
            c.user("root", &[(None, Role::Admin)])
                .patch(&t, MERGE, &big)
                .await
        )
        .code,
        413
    );
    assert_eq!(
        c.get("Flavor", None, "small2").await.expect("there"),
        before
    );
}

#[tokio::test]
async fn the_path_and_the_body_name_the_same_object() {
    let c = placed().await;
    let root = c.user("root", &[(None, Role::Admin)]);
    let before = c.get("Server", Some("demo"), "web").await.expect("web");
    let t = c.target("Server", Some("demo"), Some("web"));
    let mut renamed = before.clone();
    renamed["metadata"]["name"] = json!("other");
    let e = refused(root.put(&t, JSON, &renamed.to_string()).await);
    assert_eq!(
        (e.code, e.details.causes[0].field.as_str()),
        (400, "metadata.name")
    );
    let mut moved = before.clone();
    moved["metadata"]["namespace"] = json!("elsewhere");
    let e = refused(
        root.put(&t, YAML, &serde_saphyr::to_string(&moved).expect("YAML"))
            .await,
    );
    assert_eq!(
        (e.code, e.details.causes[0].field.as_str()),
        (400, "metadata.namespace")
    );
    let e = refused(
        root.patch(&t, MERGE, r#"{"metadata": {"name": "other"}}"#)
            .await,
    );
    assert_eq!(
        (e.code, e.details.causes[0].field.as_str()),
        (400, "metadata.name")
    );
    let e = refused(
        root.patch(
            &t,
            JSON_PATCH,
            r#"[{"op": "replace", "path": "/metadata/namespace", "value": "x"}]"#,
        )
        .await,
    );
    assert_eq!(
        (e.code, e.details.causes[0].field.as_str()),
        (400, "metadata.namespace")
    );
    // An apply that would create: the path's name, not the body's.
    let new = c.target("Server", Some("demo"), Some("new"));
    let body = Obj::server("demo", "newer").0.to_string();
    let e = refused(root.patch(&new, APPLY, &body).await);
    assert_eq!(
        (e.code, e.details.causes[0].field.as_str()),
        (400, "metadata.name")
    );
    assert_eq!(
        refused(c.get("Server", Some("demo"), "newer").await).code,
        404
    );
    assert_eq!(
        refused(c.get("Server", Some("demo"), "new").await).code,
        404
    );
    // A create whose body names another namespace.
    let e = refused(
        root.create(
            &c.target("Server", Some("demo"), None),
            JSON,
            &Obj::server("other", "x").0.to_string(),
        )
        .await,
    );
    assert_eq!(
        (e.code, e.details.causes[0].field.as_str()),
        (400, "metadata.namespace")
    );
    // A binding naming another server.
    let e = refused(
        root.bind(
            &t,
            r#"{"metadata": {"name": "other"}, "target": {"name": "b"}}"#,
        )
        .await,
    );
    assert_eq!(
        (e.code, e.details.causes[0].field.as_str()),
        (400, "metadata.name")
    );
    assert_eq!(
        c.get("Server", Some("demo"), "web").await.expect("web"),
        before
    );
    assert_eq!(
        c.get("Server", Some("demo"), "web").await.expect("web")["status"]["hypervisor"],
        "a"
    );
}

fn image(name: &str, visibility: &str) -> Value {
    json!({
        "apiVersion": "image.stratus.dev/v1", "kind": "Image",
        "metadata": {"name": name, "namespace": "demo"},
        "spec": {"diskFormat": "qcow2", "containerFormat": "bare", "visibility": visibility,
                 "source": {"url": "https://images.example/disk.qcow2"}},
    })
}

#[tokio::test]
async fn only_cluster_admins_publish_change_or_delete_public_images() {
    let (c, _) = project_admin().await;
    let images = c.target("Image", Some("demo"), None);
    // A project admin keeps private images, but publishes none, whatever the spelling.
    pat(&c)
        .create(&images, JSON, &image("mine", "private").to_string())
        .await
        .expect("a private image");
    assert_eq!(
        refused(
            pat(&c)
                .create(
                    &images,
                    YAML,
                    &serde_saphyr::to_string(&image("pub", "public")).expect("YAML")
                )
                .await
        )
        .code,
        403
    );
    assert_eq!(refused(c.get("Image", Some("demo"), "pub").await).code, 404);
    let mine = c.target("Image", Some("demo"), Some("mine"));
    let before = c.get("Image", Some("demo"), "mine").await.expect("mine");
    for (ct, body) in [
        (MERGE, json!({"spec": {"visibility": "public"}}).to_string()),
        (JSON_PATCH, r#"[{"op":"replace","path":"/spec/visibilit\u0079","value":"public"}]"#.to_string()),
        (APPLY, "apiVersion: image.stratus.dev/v1\nkind: Image\nmetadata:\n  name: mine\n  namespace: demo\nspec:\n  diskFormat: qcow2\n  containerFormat: bare\n  visibility: public\n  source:\n    url: https://images.example/disk.qcow2\n".to_string()),
    ] {
        refused_unchanged(&c, pat(&c).patch(&mine, ct, &body).await, 403, "Image", Some("demo"), "mine", &before).await;
    }
    // A cluster admin publishes; the project's admin may then neither change nor delete it.
    let root = c.user("root", &[(None, Role::Admin)]);
    root.create(&images, JSON, &image("pub", "public").to_string())
        .await
        .expect("published by a cluster admin");
    let published = c.target("Image", Some("demo"), Some("pub"));
    let before = c.get("Image", Some("demo"), "pub").await.expect("pub");
    refused_unchanged(
        &c,
        pat(&c)
            .patch(
                &published,
                MERGE,
                &json!({"spec": {"source": {"url": "https://evil.example/x"}}}).to_string(),
            )
            .await,
        403,
        "Image",
        Some("demo"),
        "pub",
        &before,
    )
    .await;
    refused_unchanged(
        &c,
        pat(&c).delete(&published, "").await,
        403,
        "Image",
        Some("demo"),
        "pub",
        &before,
    )
    .await;
}
