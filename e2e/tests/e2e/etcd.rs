//! etcd as `stratus up` runs it: TLS only, clients and peers need a certificate of etcd's own
//! CA, private files, and history compacted (old watches answer 410 Gone).

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};
use stratus_e2e::{Apiserver, Cloud, Etcd, wait_until};

fn mode(p: &Path) -> Result<u32> {
    Ok(std::fs::metadata(p)
        .with_context(|| format!("stat {}", p.display()))?
        .permissions()
        .mode()
        & 0o777)
}

fn etcdctl(args: &[&str]) -> Result<std::process::Output> {
    Ok(Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args(["--dial-timeout", "3s", "--command-timeout", "5s"])
        .args(args)
        .output()?)
}

#[test]
fn stratus_up_etcd_refuses_clients_without_its_certificate() -> Result<()> {
    let cloud = Cloud::up()?;
    let endpoint = cloud.etcd_endpoint();
    let tls = cloud.etcd_tls();
    let ca = tls.ca_file.to_str().context("path")?.to_string();

    // With the client certificate, etcd answers, and holds the cloud's objects.
    let out = cloud.etcdctl(&[
        "get",
        "/stratus/",
        "--prefix",
        "--keys-only",
        "--limit",
        "1",
    ])?;
    assert!(
        out.status.success() && !out.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // No certificate: refused, over TLS and in the clear.
    let plain = endpoint.replacen("https://", "http://", 1);
    for args in [
        vec![
            "--endpoints",
            &endpoint,
            "--cacert",
            &ca,
            "endpoint",
            "health",
        ],
        vec![
            "--endpoints",
            &endpoint,
            "--insecure-skip-tls-verify",
            "get",
            "/stratus/",
            "--prefix",
        ],
        vec!["--endpoints", &plain, "get", "/stratus/", "--prefix"],
    ] {
        let out = etcdctl(&args)?;
        assert!(!out.status.success(), "{args:?} was answered");
        assert!(out.stdout.is_empty(), "{args:?} read something");
    }
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "5", "--cacert", &ca])
        .arg(format!("{endpoint}/version"))
        .output()?;
    assert!(
        !out.status.success(),
        "curl without a certificate was answered"
    );

    // A certificate of the cloud's CA (the API server's own) is not etcd's.
    let pki = cloud.dir.path().join("pki");
    let cert = pki.join("apiserver.crt");
    let key = pki.join("apiserver.key");
    let (cert, key) = (
        cert.to_str().context("path")?,
        key.to_str().context("path")?,
    );
    let out = etcdctl(&[
        "--endpoints",
        &endpoint,
        "--cacert",
        &ca,
        "--cert",
        cert,
        "--key",
        key,
        "get",
        "/stratus/",
        "--prefix",
    ])?;
    assert!(
        !out.status.success(),
        "the cloud CA's certificate was accepted"
    );

    // The data directory and every key are private.
    assert_eq!(mode(&cloud.dir.path().join("etcd"))?, 0o700);
    let etcd_pki = pki.join("etcd");
    assert_eq!(mode(&etcd_pki)?, 0o700);
    for key in ["server.key", "peer.key", "apiserver-etcd-client.key"] {
        assert_eq!(mode(&etcd_pki.join(key))?, 0o600, "{key}");
    }
    assert_eq!(mode(&pki.join("apiserver.key"))?, 0o600);

    // And the cloud works through it.
    cloud.kubectl_in(
        &["apply", "-f", "-"],
        "apiVersion: compute.stratus.dev/v1\nkind: Flavor\nmetadata:\n  name: tls\nspec:\n  vcpus: 1\n  ramMiB: 256\n  diskGiB: 1\n",
    )?;
    cloud.kubectl_ok(&["get", "flavor", "tls"])?;
    Ok(())
}

#[test]
fn etcd_compacts_its_history_and_old_watches_are_gone() -> Result<()> {
    let cloud = Cloud::up_with(&["--etcd-auto-compaction-retention", "2s"])?;
    let flavors = "/apis/compute.stratus.dev/v1/flavors";
    cloud.kubectl_in(
        &["apply", "-f", "-"],
        "apiVersion: compute.stratus.dev/v1\nkind: Flavor\nmetadata:\n  name: old\nspec:\n  vcpus: 1\n  ramMiB: 256\n  diskGiB: 1\n",
    )?;
    let old = cloud.list_rv(flavors)?;
    let first = cloud.kubectl_ok(&["get", "--raw", &format!("{flavors}?limit=1")])?;
    let _: serde_json::Value = serde_json::from_str(&first)?;
    cloud.kubectl_ok(&[
        "patch",
        "flavor",
        "old",
        "--type",
        "merge",
        "-p",
        r#"{"spec":{"vcpus":2}}"#,
    ])?;
    // etcd itself compacts (nobody asks it to): a watch from the old revision becomes 410.
    wait_until(Duration::from_secs(60), "etcd to compact", || {
        let out = cloud
            .kubectl(&[
                "get",
                "--raw",
                &format!("{flavors}?watch=true&resourceVersion={old}&timeoutSeconds=1"),
            ])
            .ok()?;
        let text = String::from_utf8_lossy(&out.stdout);
        (text.contains("\"ERROR\"") && text.contains("410")).then_some(())
    })?;
    // A fresh list and watch still work.
    let now = cloud.list_rv(flavors)?;
    let out = cloud.kubectl_ok(&[
        "get",
        "--raw",
        &format!("{flavors}?watch=true&resourceVersion={now}&timeoutSeconds=1"),
    ])?;
    assert!(!out.contains("410"), "{out}");
    Ok(())
}

#[tokio::test]
async fn an_apiserver_reaches_etcd_over_tls_with_kube_apiserver_flags() -> Result<()> {
    let etcd = Etcd::start_tls()?;
    let server = Apiserver::start_on(&etcd)?;
    server.kubectl_in(
        &["apply", "-f", "-"],
        "apiVersion: compute.stratus.dev/v1\nkind: Flavor\nmetadata:\n  name: tls\nspec:\n  vcpus: 1\n  ramMiB: 256\n  diskGiB: 1\n",
    )?;
    let out = etcd.ctl(&["get", "/stratus/", "--prefix", "--keys-only"])?;
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("flavors/tls"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The store refuses to mix: TLS settings with an http endpoint, or https without them.
    let tls = etcd.client_tls().context("tls")?;
    let plain = etcd.endpoint.replacen("https://", "http://", 1);
    assert!(
        stratus_apiserver::storage::store::Store::connect_with(&[plain], Some(&tls))
            .await
            .is_err()
    );
    assert!(
        stratus_apiserver::storage::store::Store::connect(std::slice::from_ref(&etcd.endpoint))
            .await
            .is_err()
    );
    Ok(())
}
