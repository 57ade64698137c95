//! The `stratus` client verbs against `stratus up`.

use std::io::{BufRead, BufReader, Write};
use std::process::{Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use stratus_e2e::{Cloud, repo_root, wait_until};

fn run(cloud: &Cloud, args: &[&str], stdin: Option<&str>) -> Result<Output> {
    let mut child = cloud
        .stratus_cmd()
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input.as_bytes())?;
    }
    Ok(child.wait_with_output()?)
}

fn ok(cloud: &Cloud, args: &[&str], stdin: Option<&str>) -> Result<String> {
    let out = run(cloud, args, stdin)?;
    if !out.status.success() {
        bail!(
            "stratus {} failed: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn client_verbs_apply_get_describe_diff_wait_delete() -> Result<()> {
    let cloud = Cloud::up()?;
    let flavors = repo_root().join("examples/flavors.yaml");
    let flavors = flavors.to_str().unwrap_or_default();
    let documents = std::fs::read_to_string(flavors)?
        .lines()
        .filter(|l| *l == "kind: Flavor")
        .count();
    assert!(
        documents > 1,
        "examples/flavors.yaml has {documents} flavors"
    );
    let out = ok(&cloud, &["apply", "-f", flavors], None)?;
    assert!(
        out.contains("flavor.compute.stratus.dev/m1.tiny created"),
        "{out}"
    );
    assert_eq!(out.lines().count(), documents, "{out}");
    let created: Vec<&str> = out
        .lines()
        .filter_map(|l| l.strip_suffix(" created"))
        .collect();
    let again = ok(&cloud, &["apply", "-f", flavors], None)?;
    // Every object reported again, each one unchanged.
    let unchanged: Vec<&str> = again
        .lines()
        .filter_map(|l| l.strip_suffix(" unchanged"))
        .collect();
    assert_eq!(unchanged.len(), documents, "{again}");
    assert_eq!(unchanged, created, "{again}");
    // The server records stratus as the manager of what it applied.
    let managers = cloud.kubectl_ok(&[
        "get",
        "flavor",
        "m1.tiny",
        "--show-managed-fields",
        "-o",
        "jsonpath={.metadata.managedFields[*].manager}",
    ])?;
    assert_eq!(managers.trim(), "stratus");

    let table = ok(&cloud, &["get", "flavors"], None)?;
    assert!(
        table.lines().next().unwrap_or_default().starts_with("NAME")
            && table.contains("VCPUS")
            && table.contains("m1.small"),
        "{table}"
    );
    let yaml = ok(&cloud, &["get", "fl", "m1.tiny", "-o", "yaml"], None)?;
    assert!(
        yaml.contains("vcpus: 1") && yaml.contains("kind: Flavor"),
        "{yaml}"
    );
    let names = ok(
        &cloud,
        &[
            "get",
            "flavors",
            "-o",
            "name",
            "--field-selector",
            "metadata.name=m1.small",
        ],
        None,
    )?;
    assert_eq!(names.trim(), "flavor.compute.stratus.dev/m1.small");
    let unknown = run(&cloud, &["get", "nonsense"], None)?;
    assert!(
        !unknown.status.success() && String::from_utf8_lossy(&unknown.stderr).contains("nonsense")
    );

    // diff: exit 0 and nothing when equal; exit 1 and a unified diff when not; nothing written.
    let same = run(&cloud, &["diff", "-f", flavors], None)?;
    assert_eq!(
        same.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&same.stdout)
    );
    let changed = std::fs::read_to_string(repo_root().join("examples/flavors.yaml"))?
        .replace("ramMiB: 512", "ramMiB: 768");
    let d = run(&cloud, &["diff", "-f", "-"], Some(&changed))?;
    assert_eq!(d.status.code(), Some(1));
    let text = String::from_utf8_lossy(&d.stdout);
    assert!(
        text.contains("-  ramMiB: 512") && text.contains("+  ramMiB: 768"),
        "{text}"
    );
    assert_eq!(
        cloud.kubectl_ok(&["get", "flavor", "m1.tiny", "-o", "jsonpath={.spec.ramMiB}"])?,
        "512"
    );

    // wait: reports progress, returns when the condition holds.
    let mut waiter = cloud
        .stratus_cmd()
        .args([
            "wait",
            "flavor/m1.tiny",
            "--for=condition=Ready",
            "--timeout",
            "180",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    std::thread::sleep(Duration::from_millis(800));
    assert!(
        waiter.try_wait()?.is_none(),
        "wait returned before the condition held"
    );
    let ready = r#"{"status":{"conditions":[{"type":"Ready","status":"True","reason":"Test","message":"ok","lastTransitionTime":"2026-01-01T00:00:00Z"}]}}"#;
    cloud.kubectl_ok(&[
        "patch",
        "flavor",
        "m1.tiny",
        "--subresource=status",
        "--type",
        "merge",
        "-p",
        ready,
    ])?;
    let status = wait_until(Duration::from_secs(90), "stratus wait to return", || {
        waiter.try_wait().ok().flatten()
    })?;
    let out = waiter.wait_with_output()?;
    assert!(status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("condition met"));

    // describe shows the object and its events.
    let d = ok(&cloud, &["describe", "flavor", "m1.tiny"], None)?;
    assert!(d.contains("name: m1.tiny") && d.contains("Events:"), "{d}");

    // delete waits for finalizers and says so.
    cloud.kubectl_ok(&[
        "patch",
        "flavor",
        "m1.small",
        "--type",
        "merge",
        "-p",
        r#"{"metadata":{"finalizers":["stratus.dev/hold"]}}"#,
    ])?;
    let mut del = cloud
        .stratus_cmd()
        .args(["delete", "flavor", "m1.small", "--timeout", "180"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    // What it says, as it says it: the finalizer stays until it has said that it waits (a
    // slow start could otherwise see the object already gone).
    let said = Arc::new(Mutex::new(String::new()));
    let reader = {
        let said = Arc::clone(&said);
        let stderr = del.stderr.take().context("stderr")?;
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut said = said.lock().unwrap_or_else(|e| e.into_inner());
                said.push_str(&line);
                said.push('\n');
            }
        })
    };
    let said_so = || said.lock().unwrap_or_else(|e| e.into_inner()).clone();
    wait_until(Duration::from_secs(90), "stratus delete to wait", || {
        said_so().contains("waiting for finalizers").then_some(())
    })?;
    assert!(
        del.try_wait()?.is_none(),
        "delete returned while a finalizer held the object"
    );
    cloud.kubectl_ok(&[
        "patch",
        "flavor",
        "m1.small",
        "--type",
        "json",
        "-p",
        r#"[{"op":"remove","path":"/metadata/finalizers"}]"#,
    ])?;
    let status = wait_until(Duration::from_secs(90), "stratus delete to return", || {
        del.try_wait().ok().flatten()
    })?;
    let _ = reader.join();
    assert!(status.success(), "{}", said_so());
    assert!(
        cloud
            .kubectl_err(&["get", "flavor", "m1.small"])?
            .contains("not found")
    );
    Ok(())
}
