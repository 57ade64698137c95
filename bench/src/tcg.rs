//! A real TCG guest: a Server applied through the API until the guest prints its marker on
//! the serial console, side by side with `virsh create` of the same kind of domain (same
//! builder, same kernel, initramfs, overlay and config drive) on the same libvirtd.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use kube::api::{Api, DeleteParams, DynamicObject, PostParams};
use kube::discovery::ApiResource;
use serde_json::json;
use stratus_agents::compute::driver::disk::{self, ConfigDrive};
use stratus_agents::compute::driver::xml::{DomainKind, domain_xml};
use stratus_agents::compute::driver::{
    Backing, DiskFormat, DiskSpec, DomainSpec, KernelBoot, Owner,
};
use stratus_e2e::node::{Guest, Node};
use stratus_e2e::{Cloud, wait_until};

const MARKER: &str = "STRATUS-GUEST-READY";
const LIMIT: Duration = Duration::from_secs(120);

fn servers(client: &kube::Client) -> Api<DynamicObject> {
    Api::namespaced_with(
        client.clone(),
        "demo",
        &ApiResource::erase::<stratus_api_types::compute::Server>(&()),
    )
}

pub(crate) fn has_marker(path: &Path) -> bool {
    std::fs::read_to_string(path).is_ok_and(|t| t.contains(MARKER))
}

/// Stratus: create the Server, wait for the marker in its console log.
async fn stratus_once(client: &kube::Client, node: &Node, name: &str) -> Result<Duration> {
    let api = servers(client);
    let obj: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "compute.stratus.dev/v1", "kind": "Server",
        "metadata": {"name": name},
        "spec": {"flavor": "m1.nano", "image": "tiny"},
    }))?;
    let t = Instant::now();
    let created = api.create(&PostParams::default(), &obj).await?;
    let uid = created.metadata.uid.context("no uid")?;
    let log = node
        .dir
        .path()
        .join("state/servers")
        .join(&uid)
        .join("console.log");
    loop {
        if has_marker(&log) {
            break;
        }
        if t.elapsed() > LIMIT {
            bail!("{name}: no marker after {LIMIT:?}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let took = t.elapsed();
    api.delete(name, &DeleteParams::default()).await?;
    let domain = format!("stratus-{uid}");
    wait_until(LIMIT, "the server's domain to go", || {
        node.domains()
            .ok()
            .filter(|d| !d.contains(&domain))
            .map(|_| ())
    })?;
    Ok(took)
}

/// A domain of the tiny guest made by hand in `d` (its root overlay, config drive and
/// console log), as the compute agent builds a Server's: `name` and `uid` are the domain's.
pub(crate) fn reference_domain(
    guest: &Guest,
    d: &Path,
    name: String,
    uid: String,
) -> Result<DomainSpec> {
    disk::create_overlay(
        &guest.dir.join("disk.qcow2"),
        DiskFormat::Qcow2,
        &d.join("root.qcow2"),
        1,
    )?;
    disk::write_config_drive(
        &d.join("config.iso"),
        &ConfigDrive {
            instance_id: &uid,
            hostname: "reference",
            public_keys: &[],
            user_data: None,
            network_config: None,
        },
    )?;
    let spec = DomainSpec {
        name,
        uuid: uid.clone(),
        vcpus: 1,
        memory_mib: 128,
        kernel: Some(KernelBoot {
            kernel: guest.dir.join("vmlinuz"),
            initrd: Some(guest.dir.join("initrd.img")),
            cmdline: "console=ttyS0 quiet".into(),
        }),
        disks: vec![
            DiskSpec {
                path: d.join("root.qcow2"),
                format: DiskFormat::Qcow2,
                readonly: false,
                backing: Some(Backing {
                    path: guest.dir.join("disk.qcow2"),
                    format: DiskFormat::Qcow2,
                }),
            },
            DiskSpec {
                path: d.join("config.iso"),
                format: DiskFormat::Raw,
                readonly: true,
                backing: None,
            },
        ],
        console_log: d.join("console.log"),
        interfaces: Vec::new(),
        owner: Owner {
            namespace: "ref".into(),
            name: "ref".into(),
            uid,
        },
    };
    Ok(spec)
}

/// The reference: the same kind of domain, made by hand and started with `virsh create`.
fn virsh_once(guest: &Guest, node: &Node, round: usize) -> Result<Duration> {
    let dir = tempfile::tempdir()?;
    let spec = reference_domain(
        guest,
        dir.path(),
        format!("stratus-ref-{round}"),
        format!("00000000-0000-4000-8000-{round:012}"),
    )?;
    let d = dir.path();
    let xml = d.join("domain.xml");
    std::fs::write(&xml, domain_xml(&spec, DomainKind::Qemu))?;
    let t = Instant::now();
    let out = Command::new("virsh")
        .args(["-c", &node.uri(), "create"])
        .arg(&xml)
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "virsh create: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    while !has_marker(&spec.console_log) {
        if t.elapsed() > LIMIT {
            bail!("reference: no marker after {LIMIT:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let took = t.elapsed();
    node.virsh(&["destroy", &spec.name])?;
    Ok(took)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v.get(v.len() / 2).copied().unwrap_or_default()
}

/// `stratus-bench tcg`.
pub async fn bench(rounds: usize) -> Result<()> {
    let guest = Guest::serve()?;
    let mut node = Node::start("tcg-node")?;
    let cloud = Cloud::up_with(&["--nodes", "tcg-node"])?;
    cloud.projects(&["demo"])?;
    let flavors = stratus_e2e::repo_root().join("examples/flavors.yaml");
    cloud.kubectl_ok(&["apply", "-f", flavors.to_str().unwrap_or_default()])?;
    cloud.kubectl_in(&["apply", "-f", "-"], &guest.images_yaml("demo")?)?;
    node.start_agent(&cloud)?;
    let client = cloud.client().await?;
    // One boot first, not measured: the node's image cache fills, QEMU's files are in the
    // page cache for both sides.
    stratus_once(&client, &node, "warm-up").await?;
    virsh_once(&guest, &node, 1000)?;
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    for r in 0..rounds {
        ours.push(stratus_once(&client, &node, &format!("tcg-{r}")).await?);
        theirs.push(virsh_once(&guest, &node, r)?);
    }
    let (o, t) = (median(ours.clone()), median(theirs.clone()));
    println!("| {rounds} rounds, alternating | median | min | max |");
    println!("|---|---|---|---|");
    let row = |label: &str, v: &[Duration]| {
        println!(
            "| {label} | {} | {} | {} |",
            crate::ms(median(v.to_vec())),
            crate::ms(v.iter().min().copied().unwrap_or_default()),
            crate::ms(v.iter().max().copied().unwrap_or_default()),
        );
    };
    row("reference: virsh create → marker on the console", &theirs);
    row(
        "Stratus: create Server → scheduler → agent → marker on the console",
        &ours,
    );
    println!();
    println!(
        "Stratus - virsh (medians): {:+.0} ms.",
        o.as_secs_f64() * 1e3 - t.as_secs_f64() * 1e3
    );
    Ok(())
}
