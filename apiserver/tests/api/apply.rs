//! Server-side apply through the verbs: lists the schema marks as maps merge item by item,
//! each item's fields with their own owners; other lists stay one field.

use serde_json::{Value, json};

use crate::fixtures::{APPLY, Cloud, MERGE, Obj, refused};

fn condition(type_: &str, status: &str, reason: &str) -> Value {
    json!({"type": type_, "status": status, "reason": reason, "message": "",
           "lastTransitionTime": "2026-01-01T00:00:00Z"})
}

/// A status apply of `conditions` to Server `demo/web`.
fn status(conditions: Value) -> Value {
    json!({"apiVersion": "compute.stratus.dev/v1", "kind": "Server",
           "metadata": {"name": "web", "namespace": "demo"},
           "status": {"conditions": conditions}})
}

async fn with_server() -> Cloud {
    let c = Cloud::with_demo().await;
    c.create(&Obj::server("demo", "web")).await.expect("server");
    c
}

async fn conditions(c: &Cloud) -> Value {
    c.get("Server", Some("demo"), "web").await.expect("get")["status"]["conditions"].clone()
}

#[tokio::test]
async fn two_managers_owning_one_condition_each_never_clobber_each_other() {
    let c = with_server().await;
    let t = c.status("Server", Some("demo"), "web");
    c.patch(
        &t,
        APPLY,
        &status(json!([condition("Ready", "False", "Building")])),
        "fieldManager=agent&force=true",
    )
    .await
    .expect("the agent applies Ready");
    c.patch(
        &t,
        APPLY,
        &status(json!([condition("Scheduled", "True", "Placed")])),
        "fieldManager=scheduler&force=true",
    )
    .await
    .expect("the scheduler applies Scheduled");
    // Each applies its condition again, changed, without force: neither conflicts, neither
    // removes the other's.
    c.patch(
        &t,
        APPLY,
        &status(json!([condition("Ready", "True", "Running")])),
        "fieldManager=agent",
    )
    .await
    .expect("the agent owns Ready");
    c.patch(
        &t,
        APPLY,
        &status(json!([condition("Scheduled", "True", "Rebalanced")])),
        "fieldManager=scheduler",
    )
    .await
    .expect("the scheduler owns Scheduled");
    assert_eq!(
        conditions(&c).await,
        json!([
            condition("Ready", "True", "Running"),
            condition("Scheduled", "True", "Rebalanced")
        ])
    );
    let got = c.get("Server", Some("demo"), "web").await.expect("get");
    let managed = got["metadata"]["managedFields"]
        .as_array()
        .expect("managed fields");
    let agent = managed
        .iter()
        .find(|e| e["manager"] == "agent")
        .expect("the agent's entry");
    assert_eq!(agent["operation"], "Apply");
    assert_eq!(agent["subresource"], "status");
    let ready = &agent["fieldsV1"]["f:status"]["f:conditions"]["k:{\"type\":\"Ready\"}"];
    assert!(
        ready.get(".").is_some() && ready.get("f:reason").is_some(),
        "{agent}"
    );
    assert!(
        agent["fieldsV1"]["f:status"]["f:conditions"]
            .get("k:{\"type\":\"Scheduled\"}")
            .is_none(),
        "{agent}"
    );
}

#[tokio::test]
async fn an_apply_that_drops_an_owned_condition_removes_only_that_one() {
    let c = with_server().await;
    let t = c.status("Server", Some("demo"), "web");
    c.patch(
        &t,
        APPLY,
        &status(json!([
            condition("Ready", "False", "Building"),
            condition("Drifted", "False", "InSync")
        ])),
        "fieldManager=agent&force=true",
    )
    .await
    .expect("the agent applies two conditions");
    c.patch(
        &t,
        APPLY,
        &status(json!([condition("Scheduled", "True", "Placed")])),
        "fieldManager=scheduler&force=true",
    )
    .await
    .expect("the scheduler applies one");
    c.patch(
        &t,
        APPLY,
        &status(json!([condition("Ready", "False", "Building")])),
        "fieldManager=agent",
    )
    .await
    .expect("the agent drops Drifted");
    assert_eq!(
        conditions(&c).await,
        json!([
            condition("Ready", "False", "Building"),
            condition("Scheduled", "True", "Placed")
        ])
    );
}

#[tokio::test]
async fn changing_anothers_condition_is_409_naming_the_field_and_manager_unless_forced() {
    let c = with_server().await;
    let t = c.status("Server", Some("demo"), "web");
    c.patch(
        &t,
        APPLY,
        &status(json!([condition("Ready", "True", "Running")])),
        "fieldManager=agent&force=true",
    )
    .await
    .expect("the agent applies Ready");
    let e = refused(
        c.patch(
            &t,
            APPLY,
            &status(json!([condition("Ready", "Unknown", "Running")])),
            "fieldManager=nodes",
        )
        .await,
    );
    assert_eq!(e.code, 409);
    let fields: Vec<&str> = e.details.causes.iter().map(|c| c.field.as_str()).collect();
    assert_eq!(fields, [".status.conditions[type=\"Ready\"].status"]);
    assert!(e.details.causes[0].message.contains("\"agent\""), "{e:?}");
    assert_eq!(conditions(&c).await[0]["status"], "True", "nothing written");
    c.patch(
        &t,
        APPLY,
        &status(json!([condition("Ready", "Unknown", "Running")])),
        "fieldManager=nodes&force=true",
    )
    .await
    .expect("a forced apply takes the field");
    assert_eq!(conditions(&c).await[0]["status"], "Unknown");
}

#[tokio::test]
async fn a_spec_list_without_a_map_marker_stays_one_field() {
    let c = Cloud::with_demo().await;
    let t = c.target("Server", Some("demo"), Some("web"));
    let server = |networks: Value| {
        let mut o = Obj::server("demo", "web").0;
        o["spec"]["networks"] = networks;
        o
    };
    c.patch(
        &t,
        APPLY,
        &server(json!([{"network": "a"}])),
        "fieldManager=kubectl",
    )
    .await
    .expect("kubectl creates the server by applying it");
    let e = refused(
        c.patch(
            &t,
            APPLY,
            &server(json!([{"network": "b"}])),
            "fieldManager=other",
        )
        .await,
    );
    assert_eq!(e.code, 409);
    assert_eq!(e.details.causes[0].field, ".spec.networks");
    // The owner replaces the list whole: no item of the old one is merged in.
    let (_, got) = c
        .patch(
            &t,
            APPLY,
            &server(json!([{"network": "b"}, {"network": "c"}])),
            "fieldManager=kubectl",
        )
        .await
        .expect("kubectl applies again");
    let networks: Vec<&str> = got["spec"]["networks"]
        .as_array()
        .expect("networks")
        .iter()
        .filter_map(|n| n["network"].as_str())
        .collect();
    assert_eq!(networks, ["b", "c"]);
}

#[tokio::test]
async fn a_manifests_status_is_never_its_appliers() {
    let c = Cloud::with_demo().await;
    let t = c.target("Server", Some("demo"), Some("web"));
    // An exported Server, status and all, applied as a manifest.
    let mut manifest = Obj::server("demo", "web").0;
    manifest["status"] = json!({"conditions": [condition("Ready", "True", "Running")]});
    c.patch(&t, APPLY, &manifest, "fieldManager=kubectl")
        .await
        .expect("kubectl creates the server by applying it");
    c.patch(
        &c.status("Server", Some("demo"), "web"),
        APPLY,
        &status(json!([condition("Ready", "False", "Building")])),
        "fieldManager=agent",
    )
    .await
    .expect("the agent's status apply conflicts with no one");
    let (_, got) = c
        .patch(&t, APPLY, &manifest, "fieldManager=kubectl")
        .await
        .expect("applying the manifest again is no conflict over the status");
    assert_eq!(
        got["status"]["conditions"],
        json!([condition("Ready", "False", "Building")])
    );
    let managed = got["metadata"]["managedFields"]
        .as_array()
        .expect("managed fields");
    let kubectl = managed
        .iter()
        .find(|e| e["manager"] == "kubectl")
        .expect("kubectl's entry");
    assert!(kubectl["fieldsV1"].get("f:status").is_none(), "{kubectl}");
    assert!(
        kubectl["fieldsV1"]["f:spec"].get("f:flavor").is_some(),
        "{kubectl}"
    );
}

#[tokio::test]
async fn a_conditions_list_holds_at_most_64_conditions() {
    let c = with_server().await;
    let t = c.status("Server", Some("demo"), "web");
    let many = |n: usize| -> Value {
        (0..n)
            .map(|i| condition(&format!("C{i}"), "True", "Set"))
            .collect::<Vec<_>>()
            .into()
    };
    for query in ["fieldManager=agent&force=true", ""] {
        let e = if query.is_empty() {
            refused(c.patch(&t, MERGE, &status(many(65)), "").await)
        } else {
            refused(c.patch(&t, APPLY, &status(many(65)), query).await)
        };
        assert_eq!(e.code, 422, "{}", e.message);
        assert!(
            e.details
                .causes
                .iter()
                .any(|c| c.field == "status.conditions"),
            "{e:?}"
        );
        assert_eq!(conditions(&c).await, Value::Null, "nothing written");
    }
    c.patch(
        &t,
        APPLY,
        &status(many(64)),
        "fieldManager=agent&force=true",
    )
    .await
    .expect("64 conditions");
    assert_eq!(conditions(&c).await.as_array().map(Vec::len), Some(64));
}

/// Labels `k00000`… (`n` of them): small in the object, and as large again in managedFields.
fn labels(from: usize, n: usize) -> Value {
    (from..from + n)
        .map(|i| (format!("k{i:06}"), json!("")))
        .collect::<serde_json::Map<_, _>>()
        .into()
}

#[tokio::test]
async fn an_object_too_large_with_its_managed_fields_is_413_and_not_written() {
    let c = Cloud::with_demo().await;
    let t = c.target("Flavor", None, Some("small"));
    let before = c.get("Flavor", None, "small").await.expect("small");
    // 70,000 labels make 0.84 MB of object, under the 1.5 MiB limit, and 0.98 MB more of
    // managedFields for the manager that set them.
    let big = json!({"metadata": {"labels": labels(0, 70_000)}});
    let e = refused(c.patch(&t, MERGE, &big, "").await);
    assert_eq!(
        (e.code, e.reason),
        (413, "RequestEntityTooLarge"),
        "{}",
        e.message
    );
    assert_eq!(c.get("Flavor", None, "small").await.expect("small"), before);
    // So is a create.
    let mut flavor = Obj::flavor("big", 1, 512);
    flavor.0["metadata"]["labels"] = labels(0, 70_000);
    assert_eq!(refused(c.create(&flavor).await).code, 413);
    assert_eq!(
        refused(c.get("Flavor", None, "big").await).code,
        404,
        "nothing created"
    );
    // A write that fits, managedFields and all, is stored.
    let (_, got) = c
        .patch(
            &t,
            MERGE,
            &json!({"metadata": {"labels": labels(0, 20_000)}}),
            "",
        )
        .await
        .expect("a smaller write");
    assert_eq!(
        got["metadata"]["labels"].as_object().map(|l| l.len()),
        Some(20_000)
    );
}

#[tokio::test]
async fn recording_a_large_objects_fields_leaves_other_requests_served() {
    // One async worker (a current-thread runtime): reads sent one after another while a write
    // of 50,000 labels is made keep being answered while its field ownership is recorded (off
    // the worker), none of them waiting for most of the write.
    let c = Cloud::with_demo().await;
    let t = c.target("Flavor", None, Some("small"));
    let big = json!({"metadata": {"labels": labels(0, 50_000)}});
    let done = std::cell::Cell::new(false);
    let (write, longest_read) = tokio::join!(
        async {
            let started = std::time::Instant::now();
            c.patch(&t, MERGE, &big, "").await.expect("the write");
            done.set(true);
            started.elapsed()
        },
        async {
            let mut longest = std::time::Duration::ZERO;
            while !done.get() {
                let started = std::time::Instant::now();
                c.get("Project", None, "demo").await.expect("a read");
                longest = longest.max(started.elapsed());
            }
            longest
        }
    );
    assert!(
        longest_read * 2 < write,
        "a read waited {longest_read:?} of the write's {write:?}"
    );
    let got = c.get("Flavor", None, "small").await.expect("small");
    assert_eq!(
        got["metadata"]["labels"].as_object().map(|l| l.len()),
        Some(50_000)
    );
}
