//! kubectl against `stratus up`: the workflows a user runs every day.

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::Value;
use stratus_e2e::{Cloud, repo_root, wait_until};

const FLAVOR: &str = "apiVersion: compute.stratus.dev/v1\nkind: Flavor\nmetadata:\n  name: t1.test\n  labels:\n    tier: test\nspec:\n  vcpus: 2\n  ramMiB: 1024\n  diskGiB: 10\n";

fn json(s: &str) -> Result<Value> {
    Ok(serde_json::from_str(s)?)
}

#[test]
fn examples_apply_get_explain_diff() -> Result<()> {
    let cloud = Cloud::up()?;
    let examples = repo_root().join("examples");
    let examples = examples.to_str().unwrap_or_default();
    let out = cloud.kubectl_ok(&["apply", "-f", examples])?;
    assert!(
        out.contains("flavor.compute.stratus.dev/m1.tiny created"),
        "{out}"
    );
    assert!(
        out.contains("server.compute.stratus.dev/web-1 created"),
        "{out}"
    );
    // Applying again writes nothing: kubectl may still send a patch where the API server
    // defaulted a field inside a list (a rule's `protocol: any`), but the patch changes no
    // object, so the resourceVersion of no object that only apply writes moves. Kinds whose
    // status controllers keep writing meanwhile (subnets' address counts, ports made for
    // servers, routers, rings, volumes) are left out: their versions move with or without
    // the apply.
    let versions = || {
        cloud.kubectl_ok(&[
            "get",
            "flavors,keypairs,networks,securitygroups",
            "-A",
            "-o",
            "jsonpath={range .items[*]}{.metadata.name}={.metadata.resourceVersion} {end}",
        ])
    };
    let before = versions()?;
    let again = cloud.kubectl_ok(&["apply", "-f", examples])?;
    assert!(
        !again.lines().any(|l| l.trim_end().ends_with(" created")),
        "re-applying the examples created objects again:\n{again}"
    );
    assert_eq!(
        versions()?,
        before,
        "re-applying the examples wrote to etcd"
    );

    // Tables with the printer columns; wide adds the priority-1 columns.
    let table = cloud.kubectl_ok(&["get", "flavors"])?;
    let header = table.lines().next().unwrap_or_default();
    assert!(
        header.starts_with("NAME") && header.contains("VCPUS") && header.contains("AGE"),
        "{table}"
    );
    assert!(table.contains("m1.tiny"), "{table}");
    let servers = cloud.kubectl_ok(&["-n", "demo", "get", "servers"])?;
    for col in ["STATUS", "FLAVOR", "IMAGE", "NODE", "ADDRESSES", "AGE"] {
        assert!(
            servers.lines().next().unwrap_or_default().contains(col),
            "missing {col}: {servers}"
        );
    }
    let narrow = cloud
        .kubectl_ok(&["-n", "demo", "get", "servers"])?
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .count();
    let wide = cloud
        .kubectl_ok(&["-n", "demo", "get", "servers", "-o", "wide"])?
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .count();
    assert!(
        wide > narrow,
        "-o wide shows no extra column ({wide} vs {narrow})"
    );
    // Every kind at once through the category.
    let all = cloud.kubectl_ok(&["get", "stratus", "-A"])?;
    assert!(
        all.contains("server.compute.stratus.dev/web-1")
            && all.contains("flavor.compute.stratus.dev/m1.small"),
        "{all}"
    );
    // A Project is a namespace.
    let ns = cloud.kubectl_ok(&["get", "namespaces", "-o", "name"])?;
    assert!(ns.lines().any(|l| l == "namespace/demo"), "{ns}");
    // Short names work.
    assert!(
        cloud
            .kubectl_ok(&["-n", "demo", "get", "srv", "web-1", "-o", "name"])?
            .contains("server.compute.stratus.dev/web-1")
    );

    // -o yaml carries the system metadata.
    let y = cloud.kubectl_ok(&["get", "flavor", "m1.tiny", "-o", "json"])?;
    let v = json(&y)?;
    assert_eq!(v["metadata"]["generation"], 1);
    assert!(v["metadata"]["uid"].as_str().is_some_and(|u| u.len() == 36));
    assert!(
        v["metadata"]["resourceVersion"]
            .as_str()
            .is_some_and(|r| r.parse::<i64>().is_ok())
    );
    let yaml = cloud.kubectl_ok(&["get", "flavor", "m1.tiny", "-o", "yaml"])?;
    assert!(
        yaml.contains("kind: Flavor") && yaml.contains("vcpus: 1"),
        "{yaml}"
    );

    // Label and field selectors.
    cloud.kubectl_in(&["apply", "-f", "-"], FLAVOR)?;
    let by_label = cloud.kubectl_ok(&["get", "flavors", "-l", "tier=test", "-o", "name"])?;
    assert_eq!(by_label.trim(), "flavor.compute.stratus.dev/t1.test");
    let by_field = cloud.kubectl_ok(&[
        "get",
        "flavors",
        "--field-selector",
        "metadata.name=m1.small",
        "-o",
        "name",
    ])?;
    assert_eq!(by_field.trim(), "flavor.compute.stratus.dev/m1.small");
    let not = cloud.kubectl_ok(&[
        "get",
        "flavors",
        "--field-selector",
        "metadata.name!=m1.small",
        "-o",
        "name",
    ])?;
    assert!(
        !not.contains("m1.small") && not.contains("m1.tiny"),
        "{not}"
    );
    let err = cloud.kubectl_err(&["get", "flavors", "--field-selector", "spec.secret=1"])?;
    assert!(err.contains("spec.secret"), "{err}");

    // explain reads the published OpenAPI schema.
    let explain = cloud.kubectl_ok(&["explain", "server.spec"])?;
    assert!(
        explain.contains("flavor") && explain.contains("powerState"),
        "{explain}"
    );
    let explain = cloud.kubectl_ok(&["explain", "subnet.spec.cidr"])?;
    assert!(
        explain.contains("cidr") && explain.contains("string"),
        "{explain}"
    );

    // diff: nothing to say when nothing changed, a diff and exit 1 when something did.
    let same = cloud.kubectl(&["diff", "-f", &format!("{examples}/flavors.yaml")])?;
    assert_eq!(
        same.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&same.stderr)
    );
    let changed = cloud
        .kubectl_cmd()
        .args(["diff", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    let out = feed(changed, &FLAVOR.replace("vcpus: 2", "vcpus: 3"))?;
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("-  vcpus: 2") && text.contains("+  vcpus: 3"),
        "{text}"
    );
    // The dry run changed nothing.
    assert_eq!(
        json(&cloud.kubectl_ok(&["get", "flavor", "t1.test", "-o", "json"])?)?["spec"]["vcpus"],
        2
    );

    // Server-side apply: creates, updates what its manager owns, conflicts with another
    // manager's change, and --force-conflicts takes the field over.
    let ssa = FLAVOR.replace("t1.test", "ssa.test");
    let out = cloud.kubectl_in(&["apply", "--server-side", "-f", "-"], &ssa)?;
    assert!(out.contains("serverside-applied"), "{out}");
    cloud.kubectl_in(
        &["apply", "--server-side", "-f", "-"],
        &ssa.replace("vcpus: 2", "vcpus: 4"),
    )?;
    cloud.kubectl_ok(&[
        "patch",
        "flavor",
        "ssa.test",
        "--type",
        "merge",
        "-p",
        r#"{"spec":{"ramMiB":2048}}"#,
    ])?;
    let conflict = cloud
        .kubectl_cmd()
        .args(["apply", "--server-side", "-f", "-"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let out = feed(conflict, &ssa.replace("vcpus: 2", "vcpus: 4"))?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("conflict") && err.contains(".spec.ramMiB") && err.contains("kubectl-patch"),
        "{err}"
    );
    cloud.kubectl_in(
        &["apply", "--server-side", "--force-conflicts", "-f", "-"],
        &ssa.replace("vcpus: 2", "vcpus: 4"),
    )?;
    let v = json(&cloud.kubectl_ok(&["get", "flavor", "ssa.test", "-o", "json"])?)?;
    assert_eq!(
        (v["spec"]["vcpus"].as_i64(), v["spec"]["ramMiB"].as_i64()),
        (Some(4), Some(1024))
    );
    // Dropping a field from the applied configuration removes it.
    cloud.kubectl_in(
        &["apply", "--server-side", "-f", "-"],
        &ssa.replace("  labels:\n    tier: test\n", ""),
    )?;
    let v = json(&cloud.kubectl_ok(&["get", "flavor", "ssa.test", "-o", "json"])?)?;
    assert!(
        v["metadata"]
            .get("labels")
            .is_none_or(|l| l.get("tier").is_none()),
        "{v}"
    );
    Ok(())
}

fn feed(mut child: std::process::Child, input: &str) -> Result<std::process::Output> {
    use std::io::Write;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(input.as_bytes())?;
    }
    Ok(child.wait_with_output()?)
}

#[test]
fn patch_status_subresource_and_wait_for_condition() -> Result<()> {
    let cloud = Cloud::up()?;
    cloud.kubectl_in(&["apply", "-f", "-"], FLAVOR)?;
    cloud.kubectl_ok(&[
        "patch",
        "flavor",
        "t1.test",
        "--type",
        "merge",
        "-p",
        r#"{"spec":{"vcpus":8}}"#,
    ])?;
    cloud.kubectl_ok(&[
        "patch",
        "flavor",
        "t1.test",
        "--type",
        "json",
        "-p",
        r#"[{"op":"replace","path":"/spec/ramMiB","value":4096}]"#,
    ])?;
    let v = json(&cloud.kubectl_ok(&["get", "flavor", "t1.test", "-o", "json"])?)?;
    assert_eq!(
        (v["spec"]["vcpus"].as_i64(), v["spec"]["ramMiB"].as_i64()),
        (Some(8), Some(4096))
    );
    assert_eq!(
        v["metadata"]["generation"], 3,
        "each spec change bumps generation"
    );
    // A metadata-only change does not.
    cloud.kubectl_ok(&["label", "flavor", "t1.test", "extra=yes"])?;
    assert_eq!(
        json(&cloud.kubectl_ok(&["get", "flavor", "t1.test", "-o", "json"])?)?["metadata"]["generation"],
        3
    );
    // Strategic merge patch is refused with 415, as for any custom kind.
    let err = cloud.kubectl_err(&[
        "patch",
        "flavor",
        "t1.test",
        "-p",
        r#"{"spec":{"vcpus":1}}"#,
    ])?;
    assert!(err.contains("not supported"), "{err}");

    // Status is written through its subresource only.
    let ready = r#"{"status":{"phase":"Active","conditions":[{"type":"Ready","status":"True","reason":"Test","message":"ok","lastTransitionTime":"2026-01-01T00:00:00Z"}]}}"#;
    cloud.kubectl_ok(&["patch", "flavor", "t1.test", "--type", "merge", "-p", ready])?;
    assert!(
        json(&cloud.kubectl_ok(&["get", "flavor", "t1.test", "-o", "json"])?)?
            .get("status")
            .is_none(),
        "a spec write changed status"
    );
    let (tx, rx) = std::sync::mpsc::channel();
    let waiter = {
        let mut cmd = cloud.kubectl_cmd();
        cmd.args([
            "wait",
            "--for=condition=Ready",
            "flavor/t1.test",
            "--timeout=90s",
        ]);
        std::thread::spawn(move || {
            let _ = tx.send(cmd.output());
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        rx.try_recv().is_err(),
        "wait returned before the condition was set"
    );
    cloud.kubectl_ok(&[
        "patch",
        "flavor",
        "t1.test",
        "--subresource=status",
        "--type",
        "merge",
        "-p",
        ready,
    ])?;
    let out = rx.recv_timeout(Duration::from_secs(90))??;
    let _ = waiter.join();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("condition met"));
    let v = json(&cloud.kubectl_ok(&["get", "flavor", "t1.test", "-o", "json"])?)?;
    assert_eq!(v["status"]["conditions"][0]["type"], "Ready");
    assert_eq!(v["spec"]["vcpus"], 8, "a status write changed spec");
    assert_eq!(
        v["metadata"]["generation"], 3,
        "a status write bumped generation"
    );
    Ok(())
}

#[test]
fn watch_sees_updates_and_deletion_waits_for_finalizers() -> Result<()> {
    let cloud = Cloud::up()?;
    cloud.kubectl_in(&["apply", "-f", "-"], FLAVOR)?;
    let mut watch = cloud
        .kubectl_cmd()
        .args(["get", "flavors", "-w", "--output-watch-events"])
        .stdout(Stdio::piped())
        .spawn()?;
    let lines = BufReader::new(watch.stdout.take().expect("stdout")).lines();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for l in lines.map_while(Result::ok) {
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    let mut seen = Vec::new();
    let mut expect = |what: &dyn Fn(&str) -> bool| -> Result<()> {
        wait_until(Duration::from_secs(60), "a watch line", || {
            while let Ok(l) = rx.try_recv() {
                seen.push(l);
            }
            seen.iter()
                .position(|l| what(l))
                .map(|i| seen.drain(..=i).count())
        })
        .map(|_| ())
    };
    // Lines are `EVENT NAME VCPUS RAM DISK PUBLIC AGE`, rendered from the server's Table.
    let col = |l: &str, i: usize| l.split_whitespace().nth(i).unwrap_or_default().to_string();
    expect(&|l| col(l, 0) == "ADDED" && col(l, 1) == "t1.test" && col(l, 2) == "2")?;
    cloud.kubectl_ok(&[
        "patch",
        "flavor",
        "t1.test",
        "--type",
        "merge",
        "-p",
        r#"{"spec":{"vcpus":6},"metadata":{"finalizers":["stratus.dev/hold"]}}"#,
    ])?;
    expect(&|l| col(l, 0) == "MODIFIED" && col(l, 1) == "t1.test" && col(l, 2) == "6")?;

    // kubectl delete waits while a finalizer holds the object.
    let mut delete = cloud
        .kubectl_cmd()
        .args(["delete", "flavor", "t1.test", "--timeout=180s"])
        .stdout(Stdio::piped())
        .spawn()?;
    expect(&|l| col(l, 0) == "MODIFIED" && col(l, 1) == "t1.test")?;
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        delete.try_wait()?.is_none(),
        "kubectl delete returned while a finalizer remained"
    );
    let v = json(&cloud.kubectl_ok(&["get", "flavor", "t1.test", "-o", "json"])?)?;
    assert!(v["metadata"]["deletionTimestamp"].is_string());
    // Adding a finalizer to an object being deleted is refused.
    let err = cloud.kubectl_err(&[
        "patch",
        "flavor",
        "t1.test",
        "--type",
        "json",
        "-p",
        r#"[{"op":"add","path":"/metadata/finalizers/-","value":"stratus.dev/more"}]"#,
    ])?;
    assert!(err.contains("finalizers"), "{err}");
    cloud.kubectl_ok(&[
        "patch",
        "flavor",
        "t1.test",
        "--type",
        "json",
        "-p",
        r#"[{"op":"remove","path":"/metadata/finalizers"}]"#,
    ])?;
    let status = wait_until(Duration::from_secs(90), "kubectl delete to return", || {
        delete.try_wait().ok().flatten()
    })?;
    assert!(status.success());
    expect(&|l| col(l, 0) == "DELETED" && col(l, 1) == "t1.test")?;
    let err = cloud.kubectl_err(&["get", "flavor", "t1.test"])?;
    assert!(
        err.contains("NotFound") || err.contains("not found"),
        "{err}"
    );
    let _ = watch.kill();
    Ok(())
}

#[test]
fn describe_shows_events() -> Result<()> {
    let cloud = Cloud::up()?;
    cloud.projects(&["demo"])?;
    let examples = repo_root().join("examples/server.yaml");
    cloud.kubectl_ok(&["apply", "-f", examples.to_str().unwrap_or_default()])?;
    let uid = cloud.kubectl_ok(&[
        "-n",
        "demo",
        "get",
        "server",
        "web-1",
        "-o",
        "jsonpath={.metadata.uid}",
    ])?;
    let event = format!(
        "apiVersion: v1\nkind: Event\nmetadata:\n  name: web-1.scheduled\n  namespace: demo\ninvolvedObject:\n  apiVersion: compute.stratus.dev/v1\n  kind: Server\n  name: web-1\n  namespace: demo\n  uid: {uid}\nreason: Scheduled\nmessage: placed on node-1\ntype: Normal\nsource:\n  component: stratus-scheduler\nfirstTimestamp: \"2026-01-01T00:00:00Z\"\nlastTimestamp: \"2026-01-01T00:00:00Z\"\ncount: 1\n"
    );
    cloud.kubectl_in(&["create", "-f", "-"], &event)?;
    let d = cloud.kubectl_ok(&["-n", "demo", "describe", "server", "web-1"])?;
    assert!(
        d.contains("Events:") && d.contains("Scheduled") && d.contains("placed on node-1"),
        "{d}"
    );
    // Events of other objects are not shown.
    let d2 = cloud.kubectl_ok(&["-n", "demo", "describe", "server", "web-2"])?;
    assert!(!d2.contains("placed on node-1"), "{d2}");
    // The field agents select on: the hypervisor a Server is placed on (status, set by the
    // binding the scheduler makes).
    let flavors = repo_root().join("examples/flavors.yaml");
    cloud.kubectl_ok(&["apply", "-f", flavors.to_str().unwrap_or_default()])?;
    cloud.place("demo", "web-1", "node-1")?;
    let on_node = cloud.kubectl_ok(&[
        "-n",
        "demo",
        "get",
        "servers",
        "--field-selector",
        "status.hypervisor=node-1",
        "-o",
        "name",
    ])?;
    assert_eq!(on_node.trim(), "server.compute.stratus.dev/web-1");
    let wide = cloud.kubectl_ok(&["-n", "demo", "get", "server", "web-1"])?;
    assert!(wide.contains("node-1"), "the NODE column is empty: {wide}");
    let events = cloud.kubectl_ok(&["-n", "demo", "get", "events"])?;
    assert!(events.contains("Scheduled"), "{events}");
    Ok(())
}

#[test]
fn pagination_over_a_thousand_objects() -> Result<()> {
    let cloud = Cloud::up()?;
    cloud.projects(&["paging"])?;
    let mut docs = String::new();
    for i in 0..1000 {
        docs.push_str(&format!("---\napiVersion: compute.stratus.dev/v1\nkind: Keypair\nmetadata:\n  name: key-{i:04}\n  namespace: paging\nspec:\n  publicKey: ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGJ1c3RlZC10ZXN0LWtleS1mb3ItcGFnaW5n test-{i}\n"));
    }
    cloud.kubectl_in(&["create", "-f", "-"], &docs)?;
    let names = cloud.kubectl_ok(&[
        "-n",
        "paging",
        "get",
        "keypairs",
        "--chunk-size=100",
        "-o",
        "name",
    ])?;
    let names: Vec<&str> = names.lines().collect();
    assert_eq!(names.len(), 1000);
    let mut sorted = names.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), 1000, "duplicates across pages");
    // The raw pages: 100 each, one continue token per page, all at one revision.
    let mut token = String::new();
    let mut pages = 0;
    let mut rv = None;
    loop {
        let path = format!(
            "/apis/compute.stratus.dev/v1/namespaces/paging/keypairs?limit=100{}",
            if token.is_empty() {
                String::new()
            } else {
                format!("&continue={token}")
            }
        );
        let v = json(&cloud.kubectl_ok(&["get", "--raw", &path])?)?;
        pages += 1;
        assert_eq!(v["items"].as_array().map(Vec::len), Some(100));
        let page_rv = v["metadata"]["resourceVersion"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert_eq!(
            rv.get_or_insert(page_rv.clone()),
            &page_rv,
            "pages read at different revisions"
        );
        if pages == 3 {
            // A write in the middle of paging does not shift the pages.
            cloud.kubectl_ok(&["-n", "paging", "delete", "keypair", "key-0000"])?;
        }
        match v["metadata"]["continue"].as_str() {
            Some(t) if !t.is_empty() => token = t.to_string(),
            _ => break,
        }
    }
    assert_eq!(pages, 10);
    Ok(())
}

#[test]
fn restart_keeps_objects_and_watches_resume() -> Result<()> {
    let mut cloud = Cloud::up()?;
    cloud.kubectl_in(&["apply", "-f", "-"], FLAVOR)?;
    let rv = cloud.list_rv("/apis/compute.stratus.dev/v1/flavors")?;
    // System namespaces have a uid and a creation time (`kubectl get ns` shows an age), the
    // same after a restart.
    let system_ns = |cloud: &Cloud| {
        cloud.kubectl_ok(&[
            "get",
            "namespace",
            "kube-system",
            "-o",
            "jsonpath={.metadata.uid} {.metadata.creationTimestamp}",
        ])
    };
    let before = system_ns(&cloud)?;
    let (uid, created) = before.split_once(' ').unwrap_or_default();
    assert!(
        uid.len() == 36 && created.parse::<jiff::Timestamp>().is_ok(),
        "kube-system: uid and creationTimestamp {before:?}"
    );
    cloud.restart()?;
    assert_eq!(
        system_ns(&cloud)?,
        before,
        "kube-system changed across a restart"
    );
    let v = json(&cloud.kubectl_ok(&["get", "flavor", "t1.test", "-o", "json"])?)?;
    assert_eq!(v["spec"]["vcpus"], 2, "object lost across restart");
    cloud.kubectl_ok(&[
        "patch",
        "flavor",
        "t1.test",
        "--type",
        "merge",
        "-p",
        r#"{"spec":{"vcpus":5}}"#,
    ])?;
    // A client that saw `rv` before the restart resumes its watch from there.
    let out = cloud.kubectl_ok(&[
        "get",
        "--raw",
        &format!(
            "/apis/compute.stratus.dev/v1/flavors?watch=true&resourceVersion={rv}&timeoutSeconds=10"
        ),
    ])?;
    let events: Vec<Value> = out
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    assert_eq!(events.len(), 1, "{out}");
    assert_eq!(events[0]["type"], "MODIFIED");
    assert_eq!(events[0]["object"]["spec"]["vcpus"], 5);
    Ok(())
}

#[test]
fn leases_and_strict_validation_through_kubectl() -> Result<()> {
    let cloud = Cloud::up()?;
    cloud.projects(&["leases-test"])?;
    // Leases, as leader election and node heartbeats use them.
    let lease = "apiVersion: coordination.k8s.io/v1\nkind: Lease\nmetadata:\n  name: test-lease\n  namespace: leases-test\nspec:\n  holderIdentity: node-1\n  leaseDurationSeconds: 15\n";
    cloud.kubectl_in(&["apply", "-f", "-"], lease)?;
    let out = cloud.kubectl_ok(&["-n", "leases-test", "get", "leases"])?;
    assert!(out.contains("HOLDER") && out.contains("node-1"), "{out}");
    let now = "2026-01-01T00:00:00.000000Z";
    cloud.kubectl_ok(&[
        "-n",
        "leases-test",
        "patch",
        "lease",
        "test-lease",
        "--type",
        "merge",
        "-p",
        &format!(r#"{{"spec":{{"holderIdentity":"node-2","renewTime":"{now}"}}}}"#),
    ])?;
    let v = json(&cloud.kubectl_ok(&[
        "-n",
        "leases-test",
        "get",
        "lease",
        "test-lease",
        "-o",
        "json",
    ])?)?;
    assert_eq!(v["spec"]["holderIdentity"], "node-2");
    // Built-in types take kubectl's default strategic merge patch, as in Kubernetes.
    cloud.kubectl_ok(&[
        "-n",
        "leases-test",
        "patch",
        "lease",
        "test-lease",
        "-p",
        r#"{"spec":{"leaseTransitions":3}}"#,
    ])?;
    let v2 = json(&cloud.kubectl_ok(&[
        "-n",
        "leases-test",
        "get",
        "lease",
        "test-lease",
        "-o",
        "json",
    ])?)?;
    assert_eq!(
        (
            v2["spec"]["leaseTransitions"].as_i64(),
            v2["spec"]["holderIdentity"].as_str()
        ),
        (Some(3), Some("node-2"))
    );
    assert_eq!(v["spec"]["renewTime"], now);
    let err = cloud.kubectl_err(&[
        "-n",
        "leases-test",
        "patch",
        "lease",
        "test-lease",
        "--type",
        "merge",
        "-p",
        r#"{"spec":{"leaseDurationSeconds":"long"}}"#,
    ])?;
    assert!(err.contains("spec.leaseDurationSeconds"), "{err}");

    // kubectl's default (server-side strict validation) names the unknown field.
    let err = cloud
        .kubectl_cmd()
        .args(["apply", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let out = feed(
        err,
        &FLAVOR.replace("  vcpus: 2\n", "  vcpus: 2\n  vcpu: 3\n"),
    )?;
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("spec.vcpu"), "{text}");
    // With --validate=false the unknown field is dropped and the object stored.
    let ok = cloud
        .kubectl_cmd()
        .args(["apply", "--validate=false", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    assert!(
        feed(
            ok,
            &FLAVOR.replace("  vcpus: 2\n", "  vcpus: 2\n  vcpu: 3\n")
        )?
        .status
        .success()
    );
    let v = json(&cloud.kubectl_ok(&["get", "flavor", "t1.test", "-o", "json"])?)?;
    assert!(v["spec"].get("vcpu").is_none(), "{v}");
    // generateName makes a fresh name each time.
    let generated = "apiVersion: compute.stratus.dev/v1\nkind: Flavor\nmetadata:\n  generateName: auto-\nspec:\n  vcpus: 1\n  ramMiB: 128\n  diskGiB: 1\n";
    let a = cloud.kubectl_in(&["create", "-f", "-", "-o", "name"], generated)?;
    let b = cloud.kubectl_in(&["create", "-f", "-", "-o", "name"], generated)?;
    assert!(
        a.starts_with("flavor.compute.stratus.dev/auto-") && a != b,
        "{a} {b}"
    );
    // deletecollection by label.
    cloud.kubectl_ok(&["label", "flavor", "t1.test", "gone=yes"])?;
    // (kubectl delete -l lists then deletes one by one; --raw sends one deletecollection.)
    cloud.kubectl_ok(&[
        "delete",
        "--raw",
        "/apis/compute.stratus.dev/v1/flavors?labelSelector=gone%3Dyes",
    ])?;
    assert!(
        cloud
            .kubectl_err(&["get", "flavor", "t1.test"])?
            .contains("not found")
    );
    assert!(
        cloud
            .kubectl_ok(&["get", "flavors", "-o", "name"])?
            .contains("auto-")
    );
    // OpenAPI v2 carries every kind with its group-version-kind.
    let v2 = json(&cloud.kubectl_ok(&["get", "--raw", "/openapi/v2"])?)?;
    let server = &v2["definitions"]["dev.stratus.compute.v1.Server"];
    assert_eq!(
        server["x-kubernetes-group-version-kind"][0]["kind"],
        "Server"
    );
    assert!(server["properties"]["spec"]["properties"]["flavor"].is_object());
    Ok(())
}

#[test]
fn audit_log_records_who_did_what_with_which_outcome() -> Result<()> {
    let cloud = Cloud::up()?;
    cloud.kubectl_in(&["apply", "-f", "-"], FLAVOR)?;
    cloud.kubectl_ok(&["delete", "flavor", "t1.test"])?;
    cloud.kubectl_err(&["get", "flavor", "nothing-here"])?;
    // A request with a bad token is refused and recorded as anonymous.
    let out = cloud
        .kubectl_cmd()
        .args(["--token", "not-a-token", "get", "flavors"])
        .output()?;
    assert!(!out.status.success());
    let log_path = cloud.dir.path().join("audit.log");
    let records = wait_until(Duration::from_secs(60), "the audit records", || {
        let text = std::fs::read_to_string(&log_path).ok()?;
        let recs: Vec<Value> = text
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        // (The controllers' first Lease request may come after the test's own requests.)
        let controllers = recs.iter().any(|r| {
            r["user"]["username"] == "system:stratus-controllers"
                && r["objectRef"]["resource"] == "leases"
        });
        (controllers && recs.iter().any(|r| r["responseStatus"]["code"] == 401)).then_some(recs)
    })?;
    let find = |verb: &str, code: i64| {
        records.iter().find(|r| {
            r["verb"] == verb
                && r["objectRef"]["resource"] == "flavors"
                && r["responseStatus"]["code"] == code
        })
    };
    let created = find("create", 201).context("no audit record of the create")?;
    assert_eq!(created["user"]["username"], "system:admin");
    assert_eq!(created["objectRef"]["apiGroup"], "compute.stratus.dev");
    assert_eq!(created["apiVersion"], "audit.k8s.io/v1");
    assert!(
        created["userAgent"]
            .as_str()
            .is_some_and(|u| u.starts_with("kubectl"))
    );
    assert_eq!(created["sourceIPs"][0], "127.0.0.1");
    let deleted = find("delete", 200).context("no audit record of the delete")?;
    assert_eq!(deleted["objectRef"]["name"], "t1.test");
    assert!(find("get", 404).is_some(), "the failed get is not recorded");
    let refused = records
        .iter()
        .find(|r| r["responseStatus"]["code"] == 401)
        .context("no 401 record")?;
    assert_eq!(refused["user"]["username"], "system:anonymous");
    // The controllers act as their own service identity (here: holding their Lease).
    assert!(
        records
            .iter()
            .any(|r| r["user"]["username"] == "system:stratus-controllers"
                && r["objectRef"]["resource"] == "leases"),
        "no request by the controllers' identity"
    );
    // Nothing secret is logged: no token, no object bodies.
    let text = std::fs::read_to_string(&log_path)?;
    assert!(
        !text.contains("not-a-token") && !text.contains("ramMiB"),
        "the audit log leaks request content"
    );
    Ok(())
}

/// `GET /metrics` counts and times requests under kube-apiserver's metric names and labels
/// (so its dashboards work), counts open watches, and names no resource a client made up.
#[test]
fn metrics_count_requests_as_kube_apiserver_does() -> Result<()> {
    let cloud = Cloud::up()?;
    cloud.kubectl_in(&["create", "-f", "-"], FLAVOR)?;
    cloud.kubectl_ok(&["get", "flavors"])?;
    cloud.kubectl_ok(&["get", "flavor", "t1.test"])?;
    cloud.kubectl_in(&["apply", "--server-side", "-f", "-"], FLAVOR)?;
    let _ = cloud.kubectl(&["get", "--raw", "/apis/made.up/v1/client-chosen-name"])?;
    let metrics = || cloud.kubectl_ok(&["get", "--raw", "/metrics"]);
    // A series' value; None when the series is absent.
    let value = |text: &str, series: &str| -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
    };
    let flavors = |verb: &str, code: &str| {
        format!(
            r#"apiserver_request_total{{verb="{verb}",group="compute.stratus.dev",version="v1",resource="flavors",subresource="",code="{code}"}}"#
        )
    };
    let text = metrics()?;
    for (verb, code) in [
        ("POST", "201"),
        ("LIST", "200"),
        ("GET", "200"),
        ("APPLY", "200"),
    ] {
        let n = value(&text, &flavors(verb, code));
        assert!(n.is_some_and(|n| n >= 1.0), "{verb} {code}: {n:?}\n{text}");
    }
    assert!(
        text.contains(r#"apiserver_request_duration_seconds_bucket{le="0.6",verb="POST",group="compute.stratus.dev",version="v1",resource="flavors",subresource=""}"#),
        "{text}"
    );
    assert!(
        !text.contains("client-chosen-name") && !text.contains("made.up"),
        "{text}"
    );
    assert!(text.ends_with("# EOF\n"), "{text}");
    // Stored objects are counted (the first count runs as the server starts, before the
    // flavor was created: the examples' kinds are there, at 0 or more).
    assert!(
        value(
            &text,
            r#"apiserver_storage_objects{resource="flavors.compute.stratus.dev"}"#
        )
        .is_some(),
        "{text}"
    );
    // The etcd requests behind them, timed by operation and type.
    for op in ["create", "get", "list"] {
        let series = format!(
            r#"etcd_request_duration_seconds_count{{operation="{op}",type="compute.stratus.dev/flavors"}}"#
        );
        let n = value(&text, &series);
        assert!(n.is_some_and(|n| n >= 1.0), "{series}: {n:?}\n{text}");
    }

    // An open watch is counted while it lasts (of events, which no controller watches).
    let open = r#"apiserver_longrunning_requests{verb="WATCH",group="",version="v1",resource="events",subresource=""}"#;
    let before = value(&metrics()?, open).unwrap_or(0.0);
    let mut watch = std::process::Command::new("kubectl")
        .env("KUBECONFIG", cloud.kubeconfig())
        .env("HOME", cloud.dir.path())
        .args(["get", "events", "--all-namespaces", "--watch"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let seen = wait_until(Duration::from_secs(60), "the watch to be counted", || {
        metrics()
            .ok()
            .filter(|t| value(t, open) == Some(before + 1.0))
    });
    let _ = watch.kill();
    let _ = watch.wait();
    seen?;
    wait_until(
        Duration::from_secs(60),
        "the ended watch to be uncounted",
        || metrics().ok().filter(|t| value(t, open) == Some(before)),
    )?;
    Ok(())
}

/// `apiserver_storage_objects` counts what etcd holds of each resource.
#[tokio::test]
async fn stored_objects_are_counted_per_resource() -> Result<()> {
    let etcd = stratus_e2e::Etcd::start()?;
    let store =
        stratus_apiserver::storage::store::Store::connect(std::slice::from_ref(&etcd.endpoint))
            .await?;
    let kinds = stratus_apiserver::resource::registry::Registry::stratus()?;
    let flavors = kinds
        .by_kind("compute.stratus.dev", "Flavor")
        .context("the Flavor kind")?;
    for name in ["a", "b", "c"] {
        let key = flavors.key("/registry", None, name);
        store
            .create(&key, &serde_json::json!({"metadata": {"name": name}}))
            .await?;
    }
    let metrics = stratus_apiserver::http::metrics::Metrics::default();
    metrics.count_objects(&store, &kinds, "/registry").await;
    let text = metrics.encode();
    for line in [
        r#"apiserver_storage_objects{resource="flavors.compute.stratus.dev"} 3"#,
        r#"apiserver_storage_objects{resource="servers.compute.stratus.dev"} 0"#,
        r#"apiserver_storage_objects{resource="events"} 0"#,
    ] {
        assert!(text.lines().any(|l| l == line), "{line}\n{text}");
    }
    Ok(())
}
