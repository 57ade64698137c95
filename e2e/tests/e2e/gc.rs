//! Cascading deletion through ownerReferences, by the garbage collector of `stratus up`.

use std::time::Duration;

use anyhow::{Context, Result};
use stratus_e2e::{Cloud, wait_until};

fn owned_keypair(name: &str, owner: &str, uid: &str, finalizer: bool) -> String {
    format!(
        "apiVersion: compute.stratus.dev/v1\nkind: Keypair\nmetadata:\n  name: {name}\n  namespace: demo\n{}  ownerReferences:\n  - apiVersion: compute.stratus.dev/v1\n    kind: Flavor\n    name: {owner}\n    uid: {uid}\n    blockOwnerDeletion: true\nspec:\n  publicKey: ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGJ1c3RlZC10ZXN0LWtleS1mb3ItcGFnaW5n gc\n",
        if finalizer {
            "  finalizers: [stratus.dev/hold]\n"
        } else {
            ""
        }
    )
}

fn flavor(cloud: &Cloud, name: &str) -> Result<String> {
    cloud.kubectl_in(&["apply", "-f", "-"], &format!("apiVersion: compute.stratus.dev/v1\nkind: Flavor\nmetadata:\n  name: {name}\nspec:\n  vcpus: 1\n  ramMiB: 256\n  diskGiB: 1\n"))?;
    cloud.kubectl_ok(&["get", "flavor", name, "-o", "jsonpath={.metadata.uid}"])
}

fn gone(cloud: &Cloud, args: &[&str]) -> bool {
    cloud
        .kubectl(args)
        .map(|o| !o.status.success() && String::from_utf8_lossy(&o.stderr).contains("not found"))
        .unwrap_or(false)
}

#[test]
fn owner_deletion_cascades_background_foreground_and_orphan() -> Result<()> {
    let cloud = Cloud::up()?;
    cloud.projects(&["demo"])?;
    let t = Duration::from_secs(90);

    // Background: the owner goes at once, its dependents after it.
    let uid = flavor(&cloud, "bg")?;
    cloud.kubectl_in(
        &["apply", "-f", "-"],
        &owned_keypair("bg-child", "bg", &uid, false),
    )?;
    // An object whose owner still exists is left alone.
    let keep_uid = flavor(&cloud, "keep")?;
    cloud.kubectl_in(
        &["apply", "-f", "-"],
        &owned_keypair("keep-child", "keep", &keep_uid, false),
    )?;
    cloud.kubectl_ok(&["delete", "flavor", "bg"])?;
    wait_until(t, "bg-child to be collected", || {
        gone(&cloud, &["-n", "demo", "get", "keypair", "bg-child"]).then_some(())
    })
    .with_context(|| cloud.log())?;
    // A dependent naming an owner uid that never existed (a recreated owner) is collected too,
    // while one whose owner lives stays.
    cloud.kubectl_in(
        &["apply", "-f", "-"],
        &owned_keypair(
            "stale-child",
            "keep",
            "00000000-0000-0000-0000-000000000000",
            false,
        ),
    )?;
    wait_until(t, "stale-child to be collected", || {
        gone(&cloud, &["-n", "demo", "get", "keypair", "stale-child"]).then_some(())
    })?;
    cloud.kubectl_ok(&["-n", "demo", "get", "keypair", "keep-child"])?;

    // Foreground: the owner waits, with its finalizer, until its dependents are gone.
    let uid = flavor(&cloud, "fg")?;
    cloud.kubectl_in(
        &["apply", "-f", "-"],
        &owned_keypair("fg-child", "fg", &uid, true),
    )?;
    cloud.kubectl_ok(&[
        "delete",
        "flavor",
        "fg",
        "--cascade=foreground",
        "--wait=false",
    ])?;
    wait_until(t, "fg-child to be marked for deletion", || {
        cloud
            .kubectl_ok(&[
                "-n",
                "demo",
                "get",
                "keypair",
                "fg-child",
                "-o",
                "jsonpath={.metadata.deletionTimestamp}",
            ])
            .ok()
            .filter(|s| !s.is_empty())
    })?;
    std::thread::sleep(Duration::from_millis(500));
    let fins = cloud.kubectl_ok(&[
        "get",
        "flavor",
        "fg",
        "-o",
        "jsonpath={.metadata.finalizers}",
    ])?;
    assert!(
        fins.contains("foregroundDeletion"),
        "the owner went before its dependent: {fins}"
    );
    // The owner says what its deletion waits for.
    let told = wait_until(t, "an event saying what the deletion waits for", || {
        cloud
            .kubectl_ok(&["describe", "flavor", "fg"])
            .ok()
            .filter(|d| d.contains("WaitingForDependents"))
    })?;
    assert!(told.contains("Keypair/fg-child"), "{told}");
    cloud.kubectl_ok(&[
        "-n",
        "demo",
        "patch",
        "keypair",
        "fg-child",
        "--type",
        "json",
        "-p",
        r#"[{"op":"remove","path":"/metadata/finalizers"}]"#,
    ])?;
    wait_until(t, "fg to be deleted", || {
        gone(&cloud, &["get", "flavor", "fg"]).then_some(())
    })?;

    // Orphan: the owner goes, the dependent stays without its ownerReference.
    let uid = flavor(&cloud, "or")?;
    cloud.kubectl_in(
        &["apply", "-f", "-"],
        &owned_keypair("or-child", "or", &uid, false),
    )?;
    cloud.kubectl_ok(&["delete", "flavor", "or", "--cascade=orphan"])?;
    assert!(gone(&cloud, &["get", "flavor", "or"]));
    let refs = cloud.kubectl_ok(&[
        "-n",
        "demo",
        "get",
        "keypair",
        "or-child",
        "-o",
        "jsonpath={.metadata.ownerReferences}",
    ])?;
    assert!(
        refs.trim().is_empty(),
        "orphan keeps an ownerReference: {refs}"
    );
    std::thread::sleep(Duration::from_secs(1));
    cloud.kubectl_ok(&["-n", "demo", "get", "keypair", "or-child"])?;
    Ok(())
}

#[test]
fn deleting_a_project_deletes_its_objects_first() -> Result<()> {
    let cloud = Cloud::up()?;
    let t = Duration::from_secs(90);
    let network =
        "apiVersion: network.stratus.dev/v1\nkind: Network\nmetadata:\n  name: n1\nspec: {}\n";
    // No Project, no namespace: nothing can be created in it.
    let err = cloud
        .kubectl_in(&["-n", "gone", "create", "-f", "-"], network)
        .expect_err("created in a namespace with no Project");
    assert!(
        err.to_string().contains(r#"namespaces "gone" not found"#),
        "{err}"
    );
    assert!(gone(&cloud, &["get", "namespace", "gone"]));
    let listed = cloud.kubectl_ok(&["get", "namespaces", "-o", "name"])?;
    assert!(!listed.contains("namespace/gone"), "{listed}");
    assert!(listed.contains("namespace/default"), "{listed}");
    cloud.kubectl_in(
        &["apply", "-f", "-"],
        "apiVersion: identity.stratus.dev/v1\nkind: Project\nmetadata:\n  name: gone\nspec: {}\n",
    )?;
    let phase =
        cloud.kubectl_ok(&["get", "namespace", "gone", "-o", "jsonpath={.status.phase}"])?;
    assert_eq!(phase, "Active");
    // The namespace carries its Project's uid and creation time (`kubectl get ns` shows an age).
    let project = cloud.kubectl_ok(&[
        "get",
        "project",
        "gone",
        "-o",
        "jsonpath={.metadata.uid} {.metadata.creationTimestamp}",
    ])?;
    let namespace = cloud.kubectl_ok(&[
        "get",
        "namespace",
        "gone",
        "-o",
        "jsonpath={.metadata.uid} {.metadata.creationTimestamp}",
    ])?;
    assert_eq!(namespace, project);
    assert!(project.len() > 30, "{project}");
    wait_until(t, "the project's cleanup finalizer", || {
        cloud
            .kubectl_ok(&[
                "get",
                "project",
                "gone",
                "-o",
                "jsonpath={.metadata.finalizers}",
            ])
            .ok()
            .filter(|f| f.contains("project-cleanup"))
    })?;
    cloud.kubectl_in(&["-n", "gone", "create", "-f", "-"], network)?;
    // An object whose own finalizer (an agent's host cleanup) holds it.
    cloud.kubectl_in(
        &["-n", "gone", "create", "-f", "-"],
        "apiVersion: compute.stratus.dev/v1\nkind: Keypair\nmetadata:\n  name: k1\n  finalizers: [stratus.dev/hold]\nspec:\n  publicKey: ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGJ1c3RlZC10ZXN0LWtleS1mb3ItcGFnaW5n p\n",
    )?;
    cloud.kubectl_ok(&["delete", "project", "gone", "--wait=false"])?;
    wait_until(t, "the network to go", || {
        gone(&cloud, &["-n", "gone", "get", "network", "n1"]).then_some(())
    })?;
    wait_until(t, "the keypair to be marked", || {
        cloud
            .kubectl_ok(&[
                "-n",
                "gone",
                "get",
                "keypair",
                "k1",
                "-o",
                "jsonpath={.metadata.deletionTimestamp}",
            ])
            .ok()
            .filter(|s| !s.is_empty())
    })?;
    // The waiting deletion says what it waits for, as a namespace's does in Kubernetes.
    let condition = |type_: &str| {
        cloud
            .kubectl_ok(&[
                "get",
                "project",
                "gone",
                "-o",
                &format!("jsonpath={{.status.conditions[?(@.type==\"{type_}\")].message}}"),
            ])
            .ok()
    };
    wait_until(t, "the project to name the keypair it waits for", || {
        condition("ContentRemaining").filter(|m| {
            m == "Some resources are remaining: keypairs.compute.stratus.dev has 1 resource instances"
        })
    })?;
    assert_eq!(
        condition("FinalizersRemaining").as_deref(),
        Some(
            "Some content in the project has finalizers remaining: stratus.dev/hold in 1 resource instances"
        )
    );
    std::thread::sleep(Duration::from_secs(1));
    let phase = cloud.kubectl_ok(&["get", "project", "gone", "-o", "jsonpath={.status.phase}"])?;
    assert_eq!(phase, "Terminating", "the project went before its objects");
    let phase =
        cloud.kubectl_ok(&["get", "namespace", "gone", "-o", "jsonpath={.status.phase}"])?;
    assert_eq!(phase, "Terminating");
    cloud.kubectl_ok(&[
        "-n",
        "gone",
        "patch",
        "keypair",
        "k1",
        "--type",
        "json",
        "-p",
        r#"[{"op":"remove","path":"/metadata/finalizers"}]"#,
    ])?;
    wait_until(t, "the project to go", || {
        gone(&cloud, &["get", "project", "gone"]).then_some(())
    })?;
    // Its namespace went with it.
    assert!(gone(&cloud, &["get", "namespace", "gone"]));
    assert!(
        cloud
            .kubectl_in(&["-n", "gone", "create", "-f", "-"], network)
            .is_err()
    );
    Ok(())
}
