//! The compute agent's driver traits end to end: real QEMU passes the same suite as the fake
//! and libvirt's test driver, and the agent runs a server through failures, drift and deletion
//! on a fake host (no libvirt, no disks) against a real cloud.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::Value;
use stratus_agents::compute::driver::fake::{FakeDomains, MemoryDisk, MemoryDisks, Verb};
use stratus_agents::compute::driver::libvirt::Libvirt;
use stratus_agents::compute::driver::{DomainDriver, DomainState, conformance};
use stratus_api_types::compute::HypervisorType;
use stratus_e2e::node::{FileServer, Node};
use stratus_e2e::{Cloud, repo_root, wait_until};

const T: Duration = Duration::from_secs(90);

#[test]
fn real_qemu_passes_the_domain_driver_suite() -> Result<()> {
    let node = Node::start("conformance")?;
    let lv = Libvirt::connect(&node.uri())?;
    assert_eq!(lv.hypervisor_type(), HypervisorType::Qemu);
    let dir = node.dir.path().join("state/conformance");
    std::fs::create_dir_all(&dir)?;
    let status = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(dir.join("root.qcow2"))
        .arg("64M")
        .status()?;
    assert!(status.success(), "qemu-img create");
    std::fs::write(dir.join("config.iso"), [0u8; 4096])?;
    let uuid = format!("7e1c0c8e-0000-4000-8000-{:012x}", std::process::id());
    conformance::domain_driver(&lv, &conformance::spec("stratus-conformance", &uuid, &dir));
    Ok(())
}

fn server_json(cloud: &Cloud, name: &str) -> Option<Value> {
    let out = cloud
        .kubectl_ok(&["-n", "demo", "get", "server", name, "-o", "json"])
        .ok()?;
    serde_json::from_str(&out).ok()
}

fn sha256(path: &Path) -> Result<String> {
    let out = Command::new("sha256sum").arg(path).output()?;
    String::from_utf8(out.stdout)?
        .split_whitespace()
        .next()
        .map(str::to_owned)
        .context("sha256sum printed nothing")
}

#[test]
fn the_agent_runs_a_server_on_a_fake_host_through_failures_drift_and_deletion() -> Result<()> {
    let cloud = Cloud::up_with(&["--nodes", "fake-1"])?;
    cloud.projects(&["demo"])?;
    let dir = tempfile::tempdir()?;
    let image = dir.path().join("disk.img");
    std::fs::write(&image, vec![7u8; 1 << 20])?;
    let files = FileServer::serve(dir.path())?;
    let flavors = repo_root().join("examples/flavors.yaml");
    cloud.kubectl_ok(&["apply", "-f", flavors.to_str().unwrap_or_default()])?;
    cloud.kubectl_in(
        &["apply", "-f", "-"],
        &format!(
            "apiVersion: image.stratus.dev/v1\nkind: Image\nmetadata:\n  name: tiny\n  namespace: demo\nspec:\n  diskFormat: raw\n  containerFormat: bare\n  sha256: {}\n  source:\n    url: {}/disk.img\n",
            sha256(&image)?,
            files.url
        ),
    )?;

    let rt = tokio::runtime::Runtime::new()?;
    let domains = Arc::new(FakeDomains::default());
    let disks = Arc::new(MemoryDisks::default());
    // The first two defines fail: the agent retries (with backoff) and gets there.
    domains.fail(Verb::Define, 2);
    let kubeconfig = cloud.dir.path().join("node-fake-1.kubeconfig");
    let client = rt.block_on(async {
        let kc = kube::config::Kubeconfig::read_from(&kubeconfig)?;
        let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?;
        anyhow::Ok(kube::Client::try_from(cfg)?)
    })?;
    let state_dir = dir.path().join("state");
    std::fs::create_dir_all(&state_dir)?;
    let agent = rt.spawn(stratus_agents::compute::run_with(
        client,
        Arc::clone(&domains) as Arc<dyn DomainDriver>,
        Arc::clone(&disks) as _,
        stratus_agents::compute::Config {
            node: "fake-1".into(),
            state_dir: state_dir.clone(),
            zone: "nova".into(),
            heartbeat: Duration::from_secs(1),
            resync: Duration::from_secs(2),
            // This test's own file server, explicitly.
            image_policy: stratus_image_cache::Policy {
                allow_hosts: vec![files.url.trim_start_matches("http://").parse()?],
                ..Default::default()
            },
            export_ports: Default::default(),
            nbd_insecure: false,
        },
    ));
    // The node registers as what its driver runs.
    wait_until(
        T,
        "the fake hypervisor to register as type test and be Ready",
        || {
            cloud
            .kubectl_ok(&[
                "get",
                "hypervisor",
                "fake-1",
                "-o",
                "jsonpath={.spec.hypervisorType} {.status.conditions[?(@.type==\"Ready\")].status}",
            ])
            .ok()
            .filter(|s| s == "test True")
        },
    )
    .with_context(|| {
        format!(
            "hypervisor: {:?}",
            cloud.kubectl(&["get", "hypervisor", "fake-1", "-o", "yaml"])
        )
    })?;

    cloud.kubectl_in(
        &["apply", "-f", "-"],
        "apiVersion: compute.stratus.dev/v1\nkind: Server\nmetadata:\n  name: web\n  namespace: demo\nspec:\n  flavor: m1.nano\n  image: tiny\n",
    )?;
    let s = wait_until(T, "the server to run on the fake host", || {
        server_json(&cloud, "web").filter(|s| s["status"]["phase"] == "Running")
    })?;
    let uid = s["metadata"]["uid"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let domain = format!("stratus-{uid}");
    assert_eq!(s["status"]["hypervisor"], "fake-1");
    assert_eq!(
        domains.failures_left(Verb::Define),
        0,
        "both failed defines were retried"
    );
    let spec = domains.spec(&domain).context("the domain is defined")?;
    assert_eq!((spec.vcpus, spec.memory_mib), (1, 128));
    let guest_dir = state_dir.join("servers").join(&uid);
    match disks.get(&guest_dir.join("root.qcow2")) {
        Some(MemoryDisk::Root { size_gib, .. }) => assert_eq!(size_gib, 1),
        other => panic!("root disk: {other:?}"),
    }
    match disks.get(&guest_dir.join("config.iso")) {
        Some(MemoryDisk::ConfigDrive {
            instance_id,
            hostname,
            ..
        }) => assert_eq!(
            (instance_id.as_str(), hostname.as_str()),
            (uid.as_str(), "web")
        ),
        other => panic!("config drive: {other:?}"),
    }

    // Powered off behind the agent's back: its lifecycle event brings the agent back at once,
    // and the default driftPolicy starts the guest again.
    domains.set_state(&domain, DomainState::Shutoff);
    wait_until(T, "a Restarted event", || {
        cloud
            .kubectl_ok(&["-n", "demo", "get", "events"])
            .ok()
            .filter(|e| e.contains("Restarted"))
    })?;
    wait_until(T, "the guest running again", || {
        domains
            .lookup(&domain)
            .ok()
            .flatten()
            .filter(|d| d.state == DomainState::Running)
    })?;

    // Deleted: the domain and its disks go, then the finalizer, then the Server.
    cloud.kubectl_ok(&["-n", "demo", "delete", "server", "web", "--timeout=180s"])?;
    assert_eq!(domains.lookup(&domain)?, None);
    assert!(
        !disks.paths().iter().any(|p| p.starts_with(&guest_dir)),
        "disks left: {:?}",
        disks.paths()
    );
    agent.abort();
    Ok(())
}
