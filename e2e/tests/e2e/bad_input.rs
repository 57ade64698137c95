//! Bad input answers 4xx with a `Status` naming the field, and leaves etcd unchanged.

use anyhow::Result;
use serde_json::{Value, json};
use stratus_e2e::Cloud;

struct Raw {
    client: kube::Client,
}

impl Raw {
    async fn send(
        &self,
        method: &str,
        path: &str,
        content_type: &str,
        body: Vec<u8>,
    ) -> Result<(u16, Value)> {
        let req = http::Request::builder()
            .method(method)
            .uri(path)
            .header("Content-Type", content_type)
            .body(body)?;
        let resp = self.client.send(req.map(kube::client::Body::from)).await?;
        let code = resp.status().as_u16();
        let bytes = http_body_util::BodyExt::collect(resp.into_body())
            .await?
            .to_bytes();
        Ok((
            code,
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| json!({"raw": String::from_utf8_lossy(&bytes)})),
        ))
    }
}

const FLAVORS: &str = "/apis/compute.stratus.dev/v1/flavors";

/// Every object of a collection with its resourceVersion.
async fn collection_state(raw: &Raw, collection: &str) -> Result<Vec<(String, String)>> {
    let (code, list) = raw
        .send("GET", collection, "application/json", vec![])
        .await?;
    anyhow::ensure!(code == 200, "list {collection}: {list}");
    let mut items: Vec<(String, String)> = list["items"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|i| {
            (
                i["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                i["metadata"]["resourceVersion"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            )
        })
        .collect();
    items.sort();
    Ok(items)
}

/// Sends a bad request and checks: the code, a Status body, the field named, nothing written.
#[allow(clippy::too_many_arguments)] // one line per case reads best in the test below
async fn refused(
    cloud: &Cloud,
    raw: &Raw,
    method: &str,
    path: &str,
    ct: &str,
    body: &str,
    code: u16,
    field: &str,
) -> Result<Value> {
    // What the request could have written: its collection, object by object. (The store's
    // revision as a whole moves on its own: the controllers renew their leader Lease.)
    let collection = if method == "POST" {
        path.split('?').next().unwrap_or(path)
    } else {
        path.rsplit_once('/').map_or(path, |(c, _)| c)
    };
    let before = collection_state(raw, collection).await?;
    let (got, status) = raw.send(method, path, ct, body.as_bytes().to_vec()).await?;
    assert_eq!(got, code, "{method} {path} with {body}: {status}");
    assert_eq!(status["kind"], "Status", "{status}");
    assert_eq!(status["code"], code, "{status}");
    let text = status.to_string();
    assert!(
        text.contains(field),
        "the answer does not name {field}: {status}"
    );
    assert_eq!(
        collection_state(raw, collection).await?,
        before,
        "etcd changed after a refused request"
    );
    let _ = cloud;
    Ok(status)
}

fn flavor(spec: &str) -> String {
    format!(
        r#"{{"apiVersion":"compute.stratus.dev/v1","kind":"Flavor","metadata":{{"name":"f1"}},"spec":{spec}}}"#
    )
}

#[tokio::test]
async fn bad_input_is_refused_with_the_field_named() -> Result<()> {
    let cloud = Cloud::up()?;
    cloud.projects(&["demo"])?;
    let raw = Raw {
        client: cloud.client().await?,
    };
    let j = "application/json";
    refused(
        &cloud,
        &raw,
        "POST",
        FLAVORS,
        j,
        r#"{"apiVersion": "compute.stratus.dev/v1", "kind": "#,
        400,
        "decoding JSON",
    )
    .await?;
    refused(
        &cloud,
        &raw,
        "POST",
        FLAVORS,
        "application/yaml",
        "apiVersion: compute.stratus.dev/v1\nkind: [Flavor\n",
        400,
        "decoding YAML",
    )
    .await?;
    let s = refused(
        &cloud,
        &raw,
        "POST",
        FLAVORS,
        j,
        &flavor(r#"{"vcpus":1,"ramMiB":512,"diskGiB":1,"bogus":true}"#),
        400,
        "spec.bogus",
    )
    .await?;
    assert_eq!(s["reason"], "BadRequest");
    refused(
        &cloud,
        &raw,
        "POST",
        FLAVORS,
        j,
        &flavor(r#"{"vcpus":1,"vcpus":2,"ramMiB":512,"diskGiB":1}"#),
        400,
        "spec.vcpus",
    )
    .await?;
    let s = refused(
        &cloud,
        &raw,
        "POST",
        FLAVORS,
        j,
        &flavor(r#"{"vcpus":"two","ramMiB":512,"diskGiB":1}"#),
        422,
        "spec.vcpus",
    )
    .await?;
    assert_eq!(s["reason"], "Invalid");
    assert_eq!(s["details"]["causes"][0]["field"], "spec.vcpus");
    refused(
        &cloud,
        &raw,
        "POST",
        FLAVORS,
        j,
        &flavor(r#"{"vcpus":-4,"ramMiB":512,"diskGiB":1}"#),
        422,
        "spec.vcpus",
    )
    .await?;
    refused(
        &cloud,
        &raw,
        "POST",
        FLAVORS,
        j,
        &flavor(r#"{"ramMiB":512,"diskGiB":1}"#),
        422,
        "vcpus",
    )
    .await?;
    let bad_name = r#"{"apiVersion":"compute.stratus.dev/v1","kind":"Flavor","metadata":{"name":"Bad_Name<x>"},"spec":{"vcpus":1,"ramMiB":512,"diskGiB":1}}"#;
    refused(
        &cloud,
        &raw,
        "POST",
        FLAVORS,
        j,
        bad_name,
        422,
        "metadata.name",
    )
    .await?;
    let wrong_kind = r#"{"apiVersion":"compute.stratus.dev/v1","kind":"Server","metadata":{"name":"x"},"spec":{}}"#;
    refused(&cloud, &raw, "POST", FLAVORS, j, wrong_kind, 400, "Server").await?;
    refused(&cloud, &raw, "POST", FLAVORS, j, "[1, 2]", 400, "object").await?;

    // Namespaced kinds: negative size and a bad CIDR.
    let vols = "/apis/storage.stratus.dev/v1/namespaces/demo/volumes";
    let vol = r#"{"apiVersion":"storage.stratus.dev/v1","kind":"Volume","metadata":{"name":"v1"},"spec":{"sizeGiB":-1}}"#;
    refused(&cloud, &raw, "POST", vols, j, vol, 422, "spec.sizeGiB").await?;
    let subnets = "/apis/network.stratus.dev/v1/namespaces/demo/subnets";
    let subnet = r#"{"apiVersion":"network.stratus.dev/v1","kind":"Subnet","metadata":{"name":"s1"},"spec":{"network":"private","cidr":"10.0.0.0/33"}}"#;
    refused(&cloud, &raw, "POST", subnets, j, subnet, 422, "spec.cidr").await?;
    let subnet = r#"{"apiVersion":"network.stratus.dev/v1","kind":"Subnet","metadata":{"name":"s1"},"spec":{"network":"private","cidr":"10.0.0.0/24","gatewayIP":"10.9.9.1"}}"#;
    refused(
        &cloud,
        &raw,
        "POST",
        subnets,
        j,
        subnet,
        422,
        "spec.gatewayIP",
    )
    .await?;

    // Too large a body.
    let big = flavor(&format!(
        r#"{{"vcpus":1,"ramMiB":512,"diskGiB":1,"description":"{}"}}"#,
        "x".repeat(2 * 1024 * 1024)
    ));
    refused(&cloud, &raw, "POST", FLAVORS, j, &big, 413, "too large").await?;

    // Stale resourceVersion: 409, the newer write kept.
    let (code, created) = raw
        .send(
            "POST",
            FLAVORS,
            j,
            flavor(r#"{"vcpus":1,"ramMiB":512,"diskGiB":1}"#).into_bytes(),
        )
        .await?;
    assert_eq!(code, 201, "{created}");
    let mut first = created.clone();
    first["spec"]["vcpus"] = json!(2);
    let (code, _) = raw
        .send(
            "PUT",
            &format!("{FLAVORS}/f1"),
            j,
            first.to_string().into_bytes(),
        )
        .await?;
    assert_eq!(code, 200);
    let mut stale = created.clone();
    stale["spec"]["vcpus"] = json!(3);
    let s = refused(
        &cloud,
        &raw,
        "PUT",
        &format!("{FLAVORS}/f1"),
        j,
        &stale.to_string(),
        409,
        "modified",
    )
    .await?;
    assert_eq!(s["reason"], "Conflict");
    let (_, now) = raw.send("GET", &format!("{FLAVORS}/f1"), j, vec![]).await?;
    assert_eq!(now["spec"]["vcpus"], 2);
    // A PUT without resourceVersion is refused, not a blind overwrite.
    let mut blind = now.clone();
    blind["metadata"]
        .as_object_mut()
        .map(|m| m.remove("resourceVersion"));
    refused(
        &cloud,
        &raw,
        "PUT",
        &format!("{FLAVORS}/f1"),
        j,
        &blind.to_string(),
        422,
        "metadata.resourceVersion",
    )
    .await?;
    // A JSON patch whose later operation fails after an earlier one added a field, which a
    // failed `move` then took away: 422 naming the operation, the object as it was.
    refused(
        &cloud,
        &raw,
        "PATCH",
        &format!("{FLAVORS}/f1"),
        "application/json-patch+json",
        r#"[{"op":"add","path":"/spec/extra","value":{}},{"op":"move","path":"/metadata/finalizers/-","from":"/spec/extra"}]"#,
        422,
        "/metadata/finalizers/-",
    )
    .await?;
    // Creating it again: 409 AlreadyExists.
    let s = refused(
        &cloud,
        &raw,
        "POST",
        FLAVORS,
        j,
        &flavor(r#"{"vcpus":1,"ramMiB":512,"diskGiB":1}"#),
        409,
        "already exists",
    )
    .await?;
    assert_eq!(s["reason"], "AlreadyExists");
    // Unknown paths and kinds: 404 Status, never a 500.
    let (code, s) = raw
        .send("GET", "/apis/compute.stratus.dev/v1/nothings", j, vec![])
        .await?;
    assert_eq!((code, s["kind"].as_str()), (404, Some("Status")));
    let (code, _) = raw
        .send(
            "GET",
            "/apis/compute.stratus.dev/v1/namespaces/demo/flavors",
            j,
            vec![],
        )
        .await?;
    assert_eq!(code, 404, "a cluster-scoped kind has no namespaced path");
    let (code, _) = raw
        .send("GET", &format!("{FLAVORS}?limit=abc"), j, vec![])
        .await?;
    assert_eq!(code, 400);
    let (code, _) = raw
        .send("GET", &format!("{FLAVORS}?continue=garbage"), j, vec![])
        .await?;
    assert_eq!(code, 400);
    // An access review that is not an object (`kubectl auth can-i` sends one): 400, not a
    // dropped connection.
    for body in [r#""x""#, "1e308", "[null]", "true"] {
        let (code, s) = raw
            .send(
                "POST",
                "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews",
                j,
                body.as_bytes().to_vec(),
            )
            .await?;
        assert_eq!(
            (code, s["kind"].as_str()),
            (400, Some("Status")),
            "{body}: {s}"
        );
        assert!(
            s["message"]
                .as_str()
                .is_some_and(|m| m.contains("SelfSubjectAccessReview")),
            "{s}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn watch_on_a_compacted_revision_is_gone() -> Result<()> {
    let cloud = Cloud::up()?;
    let raw = Raw {
        client: cloud.client().await?,
    };
    let (code, created) = raw
        .send(
            "POST",
            FLAVORS,
            "application/json",
            flavor(r#"{"vcpus":1,"ramMiB":512,"diskGiB":1}"#).into_bytes(),
        )
        .await?;
    assert_eq!(code, 201);
    let old_rv: i64 = created["metadata"]["resourceVersion"]
        .as_str()
        .unwrap_or_default()
        .parse()?;
    for v in 2..5 {
        let (code, _) = raw
            .send(
                "PATCH",
                &format!("{FLAVORS}/f1"),
                "application/merge-patch+json",
                format!(r#"{{"spec":{{"vcpus":{v}}}}}"#).into_bytes(),
            )
            .await?;
        assert_eq!(code, 200);
    }
    let now: i64 = cloud.list_rv(FLAVORS)?.parse()?;
    let out = cloud.etcdctl(&["compact", &now.to_string()])?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The watch answers 200 and then a single ERROR event with a 410 Status, as client-go expects.
    let (code, body) = raw
        .send(
            "GET",
            &format!("{FLAVORS}?watch=true&resourceVersion={old_rv}"),
            "application/json",
            vec![],
        )
        .await?;
    assert_eq!(code, 200);
    assert_eq!(body["type"], "ERROR", "{body}");
    assert_eq!(body["object"]["code"], 410, "{body}");
    assert_eq!(body["object"]["reason"], "Expired");
    // A list continuing at a compacted revision is 410 too; a fresh list works.
    let (code, _) = raw
        .send(
            "GET",
            &format!("{FLAVORS}?watch=true&resourceVersion={now}&timeoutSeconds=1"),
            "application/json",
            vec![],
        )
        .await?;
    assert_eq!(code, 200);
    Ok(())
}

#[tokio::test]
async fn bookmarks_initial_events_and_dry_run() -> Result<()> {
    let cloud = Cloud::up()?;
    let raw = Raw {
        client: cloud.client().await?,
    };
    let j = "application/json";
    // dryRun=All: the answer is the object as it would be stored; nothing is stored.
    let before = collection_state(&raw, FLAVORS).await?;
    let (code, obj) = raw
        .send(
            "POST",
            &format!("{FLAVORS}?dryRun=All"),
            j,
            flavor(r#"{"vcpus":1,"ramMiB":512,"diskGiB":1}"#).into_bytes(),
        )
        .await?;
    assert_eq!(code, 201, "{obj}");
    assert_eq!(
        obj["spec"]["isPublic"], true,
        "defaults were not applied: {obj}"
    );
    assert_eq!(collection_state(&raw, FLAVORS).await?, before);
    let (code, _) = raw.send("GET", &format!("{FLAVORS}/f1"), j, vec![]).await?;
    assert_eq!(code, 404);
    let (code, s) = raw
        .send(
            "POST",
            &format!("{FLAVORS}?dryRun=Some"),
            j,
            flavor(r#"{"vcpus":1,"ramMiB":512,"diskGiB":1}"#).into_bytes(),
        )
        .await?;
    assert_eq!(code, 400, "{s}");

    let (code, created) = raw
        .send(
            "POST",
            FLAVORS,
            j,
            flavor(r#"{"vcpus":1,"ramMiB":512,"diskGiB":1}"#).into_bytes(),
        )
        .await?;
    assert_eq!(code, 201);
    // Bookmarks arrive on a quiet watch (the test cloud sends one a second) and carry a
    // resourceVersion at least as new as the watch's start.
    let rv: i64 = created["metadata"]["resourceVersion"]
        .as_str()
        .unwrap_or_default()
        .parse()?;
    let out = cloud.kubectl_ok(&[
        "get",
        "--raw",
        &format!(
            "{FLAVORS}?watch=true&allowWatchBookmarks=true&resourceVersion={rv}&timeoutSeconds=10"
        ),
    ])?;
    let events: Vec<Value> = out
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let bookmarks: Vec<&Value> = events.iter().filter(|e| e["type"] == "BOOKMARK").collect();
    assert!(!bookmarks.is_empty(), "no bookmark in 10 s: {out}");
    let brv: i64 = bookmarks[0]["object"]["metadata"]["resourceVersion"]
        .as_str()
        .unwrap_or_default()
        .parse()?;
    assert!(brv >= rv, "bookmark {brv} older than the watch start {rv}");
    assert!(
        events.iter().all(|e| e["type"] == "BOOKMARK"),
        "events on a quiet watch: {out}"
    );
    // sendInitialEvents: the current objects as ADDED, then a bookmark marking their end.
    let out = cloud.kubectl_ok(&["get", "--raw", &format!("{FLAVORS}?watch=true&sendInitialEvents=true&allowWatchBookmarks=true&resourceVersionMatch=NotOlderThan&timeoutSeconds=10")])?;
    let events: Vec<Value> = out
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    assert_eq!(events[0]["type"], "ADDED");
    assert_eq!(events[0]["object"]["metadata"]["name"], "f1");
    assert_eq!(events[1]["type"], "BOOKMARK");
    assert_eq!(
        events[1]["object"]["metadata"]["annotations"]["k8s.io/initial-events-end"],
        "true"
    );
    Ok(())
}

/// Seeded random requests (paths, methods, parameters, content types, mutated objects and
/// patches of every kind) as an admin, a project member and a node: none may get a 5xx or
/// make a handler panic (no answer, twice; a panic in the server's log). See
/// `e2e/python/fuzz.py`.
#[test]
fn random_requests_never_get_a_5xx_or_a_handler_panic() -> Result<()> {
    let mut cloud = Cloud::up()?;
    cloud.projects(&["demo"])?;
    cloud.add_token("fuzz-node-token-0123456789", "system:node:node-1")?;
    let examples = stratus_e2e::repo_root().join("examples");
    cloud.kubectl_ok(&["apply", "-f", examples.to_str().unwrap_or_default()])?;
    let script = stratus_e2e::repo_root().join("e2e/python/fuzz.py");
    let out = std::process::Command::new("/usr/bin/python3")
        .arg(&script)
        .arg(cloud.kubeconfig())
        .args(["fuzz-node-token-0123456789", "1", "3000"])
        .output()?;
    assert!(
        out.status.success(),
        "{}\n{}\nstratus log:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        cloud.log()
    );
    let log = cloud.log();
    assert!(!log.contains("panicked"), "a panic in the server:\n{log}");
    Ok(())
}

/// A refused request whose body comes after its headers (a slow client, or one under load)
/// leaves its HTTP/1.1 connection open for the next request. See `e2e/python/keepalive.py`.
#[test]
fn a_refused_request_keeps_its_connection_alive() -> Result<()> {
    let cloud = Cloud::up()?;
    let script = stratus_e2e::repo_root().join("e2e/python/keepalive.py");
    let out = std::process::Command::new("/usr/bin/python3")
        .arg(&script)
        .arg(cloud.kubeconfig())
        .output()?;
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}
