//! Several `stratus controllers` instances: one leads through a Lease, a standby takes over
//! when the leader dies.

use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};
use k8s_openapi::api::coordination::v1::Lease;
use stratus_e2e::{Apiserver, Etcd, Proc, stratus_bin, wait_until};

/// How long the leader Lease lasts unrenewed. The leader renews it a third of that before it
/// ends: 8 s of slack, which a loaded machine does not use up (with 6 s, a renewal 2 s late
/// handed the Lease to the standby while its holder lived).
const LEASE: Duration = Duration::from_secs(24);

/// Generous: the controllers share two cores with every other test.
const T: Duration = Duration::from_secs(90);

fn controllers(server: &Apiserver, dir: &std::path::Path, log: &str) -> Result<Proc> {
    Proc::spawn(
        "stratus controllers",
        Command::new(stratus_bin())
            .arg("controllers")
            .arg("--kubeconfig")
            .arg(server.kubeconfig())
            .args(["--lease-seconds", &LEASE.as_secs().to_string()])
            .arg("--image-dir")
            .arg(dir.join(format!("{log}-images"))),
        &dir.join(format!("{log}.log")),
    )
}

/// The controllers' leader Lease as the API server has it, when there is one.
fn lease(server: &Apiserver) -> Result<Option<Lease>> {
    let out = server.kubectl(&[
        "-n",
        "stratus-system",
        "get",
        "lease",
        "stratus-controllers",
        "--ignore-not-found",
        "-o",
        "json",
    ])?;
    anyhow::ensure!(
        out.status.success(),
        "kubectl get lease: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    if out.stdout.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    Ok(Some(
        serde_json::from_slice(&out.stdout).context("read the Lease")?,
    ))
}

/// Who holds the controllers' leader Lease (nobody: `None`).
fn holder(lease: &Lease) -> Option<String> {
    lease
        .spec
        .as_ref()
        .and_then(|s| s.holder_identity.clone())
        .filter(|h| !h.is_empty())
}

/// Waits until the Lease exists and `held` accepts it; answers its uid and holder.
fn wait_for_lease(
    server: &Apiserver,
    what: &str,
    held: impl Fn(&str, &str) -> bool,
) -> Result<(String, String)> {
    wait_until(T, what, || {
        let lease = lease(server).ok()??;
        let uid = lease.metadata.uid.clone()?;
        let holder = holder(&lease)?;
        held(&uid, &holder).then_some((uid, holder))
    })
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
    wait_until(T, "the dependent to be collected", || {
        server
            .kubectl(&["-n", "demo", "get", "keypair", &format!("child-{tag}")])
            .ok()
            .filter(|o| !o.status.success())
    })?;
    Ok(())
}

#[test]
fn one_leader_and_a_standby_that_takes_over() -> Result<()> {
    let etcd = Etcd::start()?;
    let server = Apiserver::start(&etcd.endpoint)?;
    server.projects(&["demo"])?;
    let dir = tempfile::tempdir()?;
    let log_b = dir.path().join("b.log");
    let mut a = controllers(&server, dir.path(), "a")?;
    // a runs alone, so the holder is a.
    let (_, first) = wait_for_lease(&server, "a to hold the Lease", |_, _| true)?;
    gc_works(&server, "a")?;
    let renewed = |l: &Lease| l.spec.as_ref().and_then(|s| s.renew_time.clone());
    let before = lease(&server)?.context("the Lease is gone")?;

    // b stands by for longer than the Lease lasts: a keeps renewing it and b never takes it.
    let mut b = controllers(&server, dir.path(), "b")?;
    std::thread::sleep(LEASE + Duration::from_secs(4));
    let after = lease(&server)?.context("the Lease is gone")?;
    assert_eq!(
        holder(&after).as_deref(),
        Some(first.as_str()),
        "the Lease changed hands while its holder lived:\n{}",
        std::fs::read_to_string(&log_b)?
    );
    assert_ne!(renewed(&after), renewed(&before), "a stopped renewing");
    assert!(b.running());

    // The leader dies without releasing its Lease: the standby takes over once it expires
    // (`LEASE`).
    a.kill();
    wait_for_lease(&server, "b to take the Lease over", |_, h| h != first)
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
    let mut a = controllers(&server, dir.path(), "a")?;
    let (old, first) = wait_for_lease(&server, "a to hold the Lease", |_, _| true)?;
    server.kubectl_ok(&[
        "-n",
        "stratus-system",
        "delete",
        "lease",
        "stratus-controllers",
    ])?;
    // The controllers stop, elect again (creating the Lease anew) and lead once more.
    wait_for_lease(&server, "a new Lease held by a", |uid, h| {
        uid != old && h == first
    })
    .with_context(|| std::fs::read_to_string(&log).unwrap_or_default())?;
    assert!(a.running());
    gc_works(&server, "again")?;
    a.kill();
    Ok(())
}
