//! Several `stratus controllers` instances: one leads through a Lease, a standby takes over
//! when the leader dies.

use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};
use stratus_e2e::{Apiserver, Etcd, Proc, stratus_bin, wait_until};

fn controllers(server: &Apiserver, log: &std::path::Path) -> Result<Proc> {
    Proc::spawn(
        "stratus controllers",
        Command::new(stratus_bin())
            .arg("controllers")
            .arg("--kubeconfig")
            .arg(server.kubeconfig())
            .args(["--lease-seconds", "6"]),
        log,
    )
}

fn leading(log: &std::path::Path) -> bool {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .contains("leading: controllers started")
}

/// Who holds the controllers' leader Lease.
fn lease_holder(server: &Apiserver) -> Result<String> {
    server.kubectl_ok(&[
        "-n",
        "stratus-system",
        "get",
        "lease",
        "stratus-controllers",
        "-o",
        "jsonpath={.spec.holderIdentity}",
    ])
}

/// Creates an owner and a dependent, deletes the owner, and waits for the dependent to go.
fn gc_works(server: &Apiserver, tag: &str) -> Result<()> {
    let owner = format!("owner-{tag}");
    let flavor = format!(
        "apiVersion: compute.stratus.dev/v1\nkind: Flavor\nmetadata:\n  name: {owner}\nspec:\n  vcpus: 1\n  ramMiB: 64\n  diskGiB: 0\n"
    );
    let path =
        std::env::temp_dir().join(format!("stratus-leader-{tag}-{}.yaml", std::process::id()));
    std::fs::write(&path, flavor)?;
    server.kubectl_ok(&["apply", "-f", path.to_str().unwrap_or_default()])?;
    let uid = server.kubectl_ok(&["get", "flavor", &owner, "-o", "jsonpath={.metadata.uid}"])?;
    let child = format!(
        "apiVersion: compute.stratus.dev/v1\nkind: Keypair\nmetadata:\n  name: child-{tag}\n  namespace: demo\n  ownerReferences:\n  - apiVersion: compute.stratus.dev/v1\n    kind: Flavor\n    name: {owner}\n    uid: {uid}\nspec:\n  publicKey: ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGJ1c3RlZC10ZXN0LWtleS1mb3ItcGFnaW5n x\n"
    );
    std::fs::write(&path, child)?;
    server.kubectl_ok(&["apply", "-f", path.to_str().unwrap_or_default()])?;
    let _ = std::fs::remove_file(&path);
    server.kubectl_ok(&["delete", "flavor", &owner])?;
    wait_until(
        Duration::from_secs(30),
        "the dependent to be collected",
        || {
            server
                .kubectl(&["-n", "demo", "get", "keypair", &format!("child-{tag}")])
                .ok()
                .filter(|o| !o.status.success())
        },
    )?;
    Ok(())
}

#[test]
fn one_leader_and_a_standby_that_takes_over() -> Result<()> {
    let etcd = Etcd::start()?;
    let server = Apiserver::start(&etcd.endpoint)?;
    server.projects(&["demo"])?;
    let dir = tempfile::tempdir()?;
    let (log_a, log_b) = (dir.path().join("a.log"), dir.path().join("b.log"));
    let mut a = controllers(&server, &log_a)?;
    wait_until(Duration::from_secs(20), "a to lead", || {
        leading(&log_a).then_some(())
    })?;
    let mut b = controllers(&server, &log_b)?;
    std::thread::sleep(Duration::from_secs(8));
    assert!(
        !leading(&log_b),
        "two leaders at once:\n{}",
        std::fs::read_to_string(&log_b)?
    );
    let holder = lease_holder(&server)?;
    assert!(
        std::fs::read_to_string(&log_a)?.contains(holder.trim()),
        "the Lease names {holder}, not a"
    );
    gc_works(&server, "a")?;

    // The leader dies without releasing its Lease: the standby takes over once it expires
    // (6 s here; renewal every 4 s leaves room for a loaded machine).
    a.kill();
    wait_until(Duration::from_secs(30), "b to take over", || {
        leading(&log_b).then_some(())
    })
    .with_context(|| std::fs::read_to_string(&log_b).unwrap_or_default())?;
    assert!(b.running());
    gc_works(&server, "b")?;
    Ok(())
}

#[test]
fn a_deleted_leader_lease_is_created_again_and_held() -> Result<()> {
    let etcd = Etcd::start()?;
    let server = Apiserver::start(&etcd.endpoint)?;
    server.projects(&["demo"])?;
    let dir = tempfile::tempdir()?;
    let log = dir.path().join("a.log");
    let mut a = controllers(&server, &log)?;
    wait_until(Duration::from_secs(20), "a to lead", || {
        leading(&log).then_some(())
    })?;
    server.kubectl_ok(&[
        "-n",
        "stratus-system",
        "delete",
        "lease",
        "stratus-controllers",
    ])?;
    // The controllers stop, elect again (creating the Lease anew) and lead once more.
    wait_until(
        Duration::from_secs(30),
        "the Lease to be held again",
        || {
            let reelected = std::fs::read_to_string(&log)
                .unwrap_or_default()
                .split("electing again")
                .nth(1)
                .is_some_and(|after| after.contains("leading: controllers started"));
            let holder = lease_holder(&server).unwrap_or_default();
            (reelected && !holder.trim().is_empty()).then_some(())
        },
    )
    .with_context(|| std::fs::read_to_string(&log).unwrap_or_default())?;
    assert!(a.running());
    gc_works(&server, "again")?;
    a.kill();
    Ok(())
}
