//! Namespace lifecycle through kubectl: a Project being deleted takes no new content, whatever
//! the verb or the kind, and once it is gone its namespace is not found.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use stratus_e2e::{Cloud, wait_until, with_stdin};

const KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGJ1c3RlZC10ZXN0LWtleS1mb3ItcGFnaW5n lifecycle";

fn keypair(name: &str, finalizer: bool) -> String {
    format!(
        "apiVersion: compute.stratus.dev/v1\nkind: Keypair\nmetadata:\n  name: {name}\n  namespace: demo\n{}spec:\n  publicKey: {KEY}\n",
        if finalizer {
            "  finalizers: [stratus.dev/hold]\n"
        } else {
            ""
        }
    )
}

fn server(name: &str) -> String {
    format!(
        "apiVersion: compute.stratus.dev/v1\nkind: Server\nmetadata:\n  name: {name}\n  namespace: demo\nspec:\n  flavor: small\n  image: cirros\n"
    )
}

fn port(name: &str) -> String {
    format!(
        "apiVersion: network.stratus.dev/v1\nkind: Port\nmetadata:\n  name: {name}\n  namespace: demo\nspec:\n  network: net\n"
    )
}

const CONTENT: &str = "apiVersion: compute.stratus.dev/v1
kind: Flavor
metadata:
  name: small
spec:
  vcpus: 1
  ramMiB: 256
  diskGiB: 1
---
apiVersion: identity.stratus.dev/v1
kind: Quota
metadata:
  name: q
  namespace: demo
spec:
  limits:
    servers: 10
---
apiVersion: network.stratus.dev/v1
kind: Network
metadata:
  name: net
  namespace: demo
spec: {}
---
apiVersion: network.stratus.dev/v1
kind: Subnet
metadata:
  name: s
  namespace: demo
spec:
  network: net
  cidr: 10.0.0.0/24
";

/// kubectl with `doc` on stdin: it must fail; its stderr.
fn refused(cloud: &Cloud, args: &[&str], doc: &str) -> Result<String> {
    let mut cmd = cloud.kubectl_cmd();
    cmd.args(args);
    let out = with_stdin(cmd, doc)?;
    ensure!(
        !out.status.success(),
        "kubectl {} was accepted:\n{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout)
    );
    Ok(String::from_utf8_lossy(&out.stderr).into_owned())
}

fn names(cloud: &Cloud, kind: &str) -> Result<String> {
    cloud.kubectl_ok(&[
        "-n",
        "demo",
        "get",
        kind,
        "-o",
        "jsonpath={.items[*].metadata.name}",
    ])
}

#[test]
fn a_terminating_project_takes_no_new_content_and_a_deleted_one_has_no_namespace() -> Result<()> {
    let cloud = Cloud::up()?;
    cloud.projects(&["demo"])?;
    cloud.kubectl_in(&["apply", "-f", "-"], CONTENT)?;
    cloud.kubectl_in(&["create", "-f", "-"], &keypair("held", true))?;
    // The project controller adopts the Project (its cleanup finalizer) before it is deleted.
    wait_until(
        Duration::from_secs(90),
        "the project's cleanup finalizer",
        || {
            cloud
                .kubectl_ok(&[
                    "get",
                    "project",
                    "demo",
                    "-o",
                    "jsonpath={.metadata.finalizers}",
                ])
                .ok()
                .filter(|f| f.contains("project-cleanup"))
        },
    )?;

    // The deletion begins; the finalizer on `held` keeps the Project terminating.
    cloud.kubectl_ok(&["delete", "project", "demo", "--wait=false"])?;
    wait_until(
        Duration::from_secs(90),
        "namespace demo to be Terminating",
        || {
            let phase = cloud
                .kubectl_ok(&["get", "namespace", "demo", "-o", "jsonpath={.status.phase}"])
                .ok()?;
            (phase == "Terminating").then_some(())
        },
    )
    .with_context(|| cloud.log())?;

    let forbidden = |resource: &str, name: &str| {
        format!(
            "{resource} \"{name}\" is forbidden: unable to create new content in namespace demo because it is being terminated"
        )
    };
    for (args, doc, resource, name) in [
        (
            &["create", "-f", "-"][..],
            keypair("k1", false),
            "keypairs.compute.stratus.dev",
            "k1",
        ),
        (
            &["apply", "-f", "-"][..],
            keypair("k2", false),
            "keypairs.compute.stratus.dev",
            "k2",
        ),
        (
            &["apply", "--server-side", "-f", "-"][..],
            keypair("k3", false),
            "keypairs.compute.stratus.dev",
            "k3",
        ),
        // Quota admission writes a Server's create, IPAM a Port's.
        (
            &["create", "-f", "-"][..],
            server("web-1"),
            "servers.compute.stratus.dev",
            "web-1",
        ),
        (
            &["apply", "--server-side", "-f", "-"][..],
            server("web-2"),
            "servers.compute.stratus.dev",
            "web-2",
        ),
        (
            &["create", "-f", "-"][..],
            port("p1"),
            "ports.network.stratus.dev",
            "p1",
        ),
    ] {
        let err = refused(&cloud, args, &doc)?;
        ensure!(
            err.contains("Error from server (Forbidden)")
                && err.contains(&forbidden(resource, name)),
            "kubectl {} {name}: {err}",
            args.join(" ")
        );
    }
    // Nothing was made.
    ensure!(names(&cloud, "keypairs")? == "held", "keypairs in demo");
    ensure!(names(&cloud, "servers")?.is_empty(), "servers in demo");
    ensure!(names(&cloud, "ports")?.is_empty(), "ports in demo");

    // What remains may still change: its finalizer goes, and the deletion completes.
    cloud.kubectl_ok(&[
        "-n",
        "demo",
        "patch",
        "keypair",
        "held",
        "--type=merge",
        "-p",
        r#"{"metadata":{"finalizers":null}}"#,
    ])?;
    wait_until(Duration::from_secs(90), "project demo to be gone", || {
        let out = cloud.kubectl(&["get", "project", "demo"]).ok()?;
        (!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("not found"))
            .then_some(())
    })
    .with_context(|| cloud.log())?;
    // A namespace without a Project is not found.
    let err = refused(&cloud, &["create", "-f", "-"], &keypair("k4", false))?;
    ensure!(
        err.contains("Error from server (NotFound)")
            && err.contains("namespaces \"demo\" not found"),
        "{err}"
    );
    Ok(())
}
