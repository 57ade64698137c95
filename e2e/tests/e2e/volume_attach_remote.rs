//! A volume of one node attached to a real guest on another, over NBD, once for each pool
//! backend: a file pool in a directory the test makes, and an LVM pool on a loop-backed volume
//! group the test makes and removes. The storage node runs the storage agent (exports on its
//! storage address), the compute node the compute agent, whose libvirtd (and so QEMU) lives in
//! a network namespace of its own, joined to the storage node's by a veth pair the test makes,
//! as two hosts on a storage network. The guest on the compute node reads the partition table
//! written into the volume on the storage node; no other address reaches the export's port;
//! the storage agent, killed and started again, takes its export back without the guest losing
//! it; the guest writes to the disk (from the shell on its console) and, once detached, the
//! data is in the volume on the storage node and the export is gone; attached to a second
//! server on the compute node, its guest reads back what the first wrote. Grown while
//! attached over NBD, the guest sees the new size without losing its disk (the storage node
//! serves the volume anew at its size and the compute node moves the disk to that export),
//! reads its data back and writes past the old end; the first export ends once left. Each
//! backend's run has names and addresses of its own, so both run at once.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;
use stratus_e2e::node::{Guest, Node};
use stratus_e2e::{Cloud, Proc, stratus_bin, wait_until};

use super::volume_attach::{Vg, delete_once_released, partition_table};

/// Generous: builds and TCG guests of other tests share two cores.
const WAIT: Duration = Duration::from_secs(300);

/// One run's project, nodes and storage network.
struct Site {
    ns: &'static str,
    /// The storage node (the host's namespace) and the compute node (its libvirtd's).
    storage: &'static str,
    compute: &'static str,
    /// The storage network: the storage node's end and the compute node's.
    storage_ip: &'static str,
    compute_ip: &'static str,
    host_link: &'static str,
    node_link: &'static str,
    /// The storage agent's nftables table on `storage_ip`.
    table: &'static str,
}

const FILE_SITE: Site = Site {
    ns: "nbdvols",
    storage: "nbd-a",
    compute: "nbd-b",
    storage_ip: "10.251.15.1",
    compute_ip: "10.251.15.2",
    host_link: "nbd-st0",
    node_link: "nbd-cn0",
    table: "stratus_nbd_10_251_15_1",
};

const LVM_SITE: Site = Site {
    ns: "nbdlvm",
    storage: "nbd-la",
    compute: "nbd-lb",
    storage_ip: "10.251.15.5",
    compute_ip: "10.251.15.6",
    host_link: "nbd-st1",
    node_link: "nbd-cn1",
    table: "stratus_nbd_10_251_15_5",
};

/// The storage node's pool: a directory, or a volume group on a loop device.
pub(super) enum Pool {
    File(std::path::PathBuf),
    Lvm(Vg),
}

impl Pool {
    pub(super) fn name(&self) -> &'static str {
        match self {
            Self::File(_) => "files",
            Self::Lvm(_) => "fast",
        }
    }

    /// `--storage-pool`'s value.
    pub(super) fn arg(&self) -> String {
        match self {
            Self::File(dir) => format!("files=file:{}", dir.display()),
            Self::Lvm(vg) => format!("fast=lvm:{}", vg.name),
        }
    }

    /// Whether the volume at `path` is gone from the pool.
    pub(super) fn gone(&self, path: &str) -> bool {
        match self {
            Self::File(_) => !std::path::Path::new(path).exists(),
            // A loop device's node outlives it: the LV is what goes.
            Self::Lvm(vg) => super::storage_agent::lvs(&vg.name).is_ok_and(|l| l.is_empty()),
        }
    }
}

pub(super) fn json(cloud: &Cloud, ns: &str, args: &[&str]) -> Result<Value> {
    let mut a = vec!["-n", ns];
    a.extend_from_slice(args);
    a.extend(["-o", "json"]);
    Ok(serde_json::from_str(&cloud.kubectl_ok(&a)?)?)
}

fn volume(cloud: &Cloud, ns: &str) -> Result<Value> {
    json(cloud, ns, &["get", "volume", "far"])
}

fn wait_volume(
    cloud: &Cloud,
    ns: &str,
    what: &str,
    pred: impl Fn(&Value) -> bool,
) -> Result<Value> {
    wait_until(WAIT, what, || volume(cloud, ns).ok().filter(|v| pred(v))).with_context(|| {
        cloud
            .kubectl_ok(&["-n", ns, "get", "volume", "far", "-o", "yaml"])
            .unwrap_or_default()
    })
}

fn run(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("run {program}"))?;
    ensure!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The storage network and what the storage agent leaves serving: removed however the test
/// ends (the veth pair with its host end; the exports' processes by the pids the agent
/// recorded, and their table).
pub(super) struct Cleanup {
    pub(super) exports: std::path::PathBuf,
    pub(super) host_link: &'static str,
    pub(super) table: &'static str,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", self.host_link])
            .status();
        for entry in std::fs::read_dir(&self.exports)
            .into_iter()
            .flatten()
            .flatten()
        {
            let record = std::fs::read(entry.path())
                .ok()
                .and_then(|b| serde_json::from_slice::<Value>(&b).ok());
            if let Some(pid) = record.as_ref().and_then(|r| r["pid"].as_u64()) {
                let _ = Command::new("kill").arg(pid.to_string()).status();
            }
        }
        // Gone already when another link's cleanup took it.
        let _ = Command::new("nft")
            .args(["delete", "table", "inet", self.table])
            .stderr(std::process::Stdio::null())
            .status();
    }
}

/// Server `name` of project `ns` Running on `compute` (the only compute node), and its guest's
/// kernel having read the partition table of its volume (`vdc`): its uid and domain.
fn scanned_by(cloud: &Cloud, ns: &str, compute: &Node, name: &str) -> Result<(String, String)> {
    let server = wait_until(WAIT, &format!("{name} Running"), || {
        json(cloud, ns, &["get", "server", name])
            .ok()
            .filter(|s| s["status"]["phase"] == "Running")
    })
    .with_context(|| compute.agent_log())?;
    assert_eq!(server["status"]["hypervisor"], compute.name.as_str());
    let uid = server["metadata"]["uid"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    wait_until(WAIT, &format!("{name}'s partition scan of vdc"), || {
        compute
            .console(&uid)
            .contains("vdc: vdc1 vdc2")
            .then_some(())
    })
    .with_context(|| format!("console:\n{}", compute.console(&uid)))?;
    let dom = format!("stratus-{uid}");
    Ok((uid, dom))
}

/// Whether a TCP connection from `from` to `to` is dropped (times out) rather than answered
/// or refused.
fn dropped(from: &str, to: &str) -> Result<bool> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.bind(format!("{from}:0").parse()?)?;
        let to = to.parse()?;
        match tokio::time::timeout(Duration::from_secs(3), socket.connect(to)).await {
            Err(_) => Ok(true),
            Ok(Ok(_)) => Ok(false),
            Ok(Err(e)) => bail!("connecting to {to}: {e} (not dropped: nothing listens?)"),
        }
    })
}

#[test]
fn a_volume_of_another_node_attaches_over_nbd_to_a_real_guest() -> Result<()> {
    let storage = tempfile::tempdir()?;
    let pool = storage.path().join("pool");
    std::fs::create_dir_all(&pool)?;
    attaches_over_nbd(&FILE_SITE, storage, Pool::File(pool))
}

#[test]
fn a_volume_of_another_nodes_lvm_pool_attaches_over_nbd_to_a_real_guest() -> Result<()> {
    let vg = Vg::new(&format!("stratus-e2e-nbd-{}", std::process::id()), 4 << 30)?;
    attaches_over_nbd(&LVM_SITE, tempfile::tempdir()?, Pool::Lvm(vg))
}

/// The run on `site`, the storage node's agent (its state in `storage`) serving `pool`.
fn attaches_over_nbd(site: &Site, storage: tempfile::TempDir, pool: Pool) -> Result<()> {
    let Site {
        ns,
        storage: storage_node,
        compute: compute_node,
        storage_ip,
        compute_ip,
        ..
    } = *site;
    let guest = Guest::serve()?;
    // The storage node runs no guests: its storage agent alone, in the host's namespace.
    let mut compute = Node::start(compute_node)?;
    let _cleanup = Cleanup {
        exports: storage.path().join("storage-state/exports"),
        host_link: site.host_link,
        table: site.table,
    };
    compute.join_host(
        site.host_link,
        &format!("{storage_ip}/30"),
        site.node_link,
        &format!("{compute_ip}/30"),
    )?;
    let cloud = Cloud::up_with(&["--nodes", &format!("{storage_node},{compute_node}")])?;
    cloud.projects(&[ns])?;
    compute.start_agent(&cloud)?;
    // Each node's NBD certificate from the cloud's NBD CA: the storage node's names its storage address,
    // the compute node's goes where its libvirtd reads it.
    let nbd_tls = storage.path().join("nbd-tls");
    cloud.nbd_certificate(storage_node, Some(storage_ip), &nbd_tls)?;
    cloud.nbd_certificate(compute_node, None, &compute.nbd_tls_dir())?;
    let storage_agent = |log: &str| {
        Proc::spawn(
            "storage agent",
            Command::new(stratus_bin())
                .args(["agent", "--roles", "storage", "--node", storage_node])
                .arg("--kubeconfig")
                .arg(
                    cloud
                        .dir
                        .path()
                        .join(format!("node-{storage_node}.kubeconfig")),
                )
                .arg("--state-dir")
                .arg(storage.path().join("storage-state"))
                .args(["--storage-pool", &pool.arg()])
                .args(["--storage-address", storage_ip])
                .arg("--nbd-tls-dir")
                .arg(&nbd_tls)
                .args(["--storage-heartbeat-seconds", "1", "--resync-seconds", "2"]),
            &storage.path().join(log),
        )
    };
    let mut agent = storage_agent("storage-agent.log")?;
    let flavors = stratus_e2e::repo_root().join("examples/flavors.yaml");
    cloud.kubectl_ok(&["apply", "-f", flavors.to_str().unwrap_or_default()])?;
    let images = guest.images_yaml(ns)?.replace(
        "console=ttyS0 quiet",
        "console=ttyS0 loglevel=7 stratus.shell",
    );
    cloud.kubectl_in(&["-n", ns, "apply", "-f", "-"], &images)?;
    // the compute node's address on the storage network, as its network agent reports it.
    wait_until(WAIT, "the compute node's Hypervisor", || {
        cloud.kubectl_ok(&["get", "hypervisor", compute_node]).ok()
    })?;
    cloud.kubectl_ok(&[
        "patch",
        "hypervisor",
        compute_node,
        "--subresource=status",
        "--type=merge",
        "-p",
        &format!(r#"{{"status":{{"hostIP":"{compute_ip}"}}}}"#),
    ])?;

    // A volume on the storage node's pool (the only one) holding a partition table.
    cloud.kubectl_in(
        &["-n", ns, "apply", "-f", "-"],
        "apiVersion: storage.stratus.dev/v1\nkind: Volume\nmetadata:\n  name: far\nspec:\n  sizeGiB: 1\n",
    )?;
    let vol = wait_volume(&cloud, ns, "volume far Available", |v| {
        v["status"]["phase"] == "Available" && v["status"]["devicePath"].is_string()
    })?;
    assert_eq!(vol["status"]["node"], storage_node);
    let path = vol["status"]["devicePath"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    OpenOptions::new()
        .write(true)
        .open(&path)?
        .write_all_at(&partition_table(), 0)?;

    // A server, placed on the compute node (the only compute node), attaches it at its create.
    cloud.kubectl_in(
        &["-n", ns, "apply", "-f", "-"],
        "apiVersion: compute.stratus.dev/v1\nkind: Server\nmetadata:\n  name: vm\nspec:\n  flavor: m1.nano\n  image: tiny\n  volumes:\n  - volume: far\n",
    )?;
    let vol = wait_volume(&cloud, ns, "far attached on the compute node", |v| {
        v["status"]["attachedNode"] == compute_node
    })?;
    // Its export to the compute node: a cluster-scoped VolumeExport named for (volume uid, node), which
    // the project's members do not read (the Volume carries no export).
    ensure!(vol["status"].get("export").is_none(), "{vol}");
    let export_name = format!(
        "{}.{compute_node}",
        vol["metadata"]["uid"].as_str().unwrap_or_default()
    );
    let exported = wait_until(
        WAIT,
        "far's VolumeExport to the compute node served",
        || {
            json(&cloud, ns, &["get", "volumeexport", &export_name])
                .ok()
                .filter(|x| x["status"]["port"].is_u64())
        },
    )
    .with_context(|| {
        std::fs::read_to_string(storage.path().join("storage-agent.log")).unwrap_or_default()
    })?;
    assert_eq!(exported["spec"]["storageNode"], storage_node);
    assert_eq!(exported["spec"]["node"], compute_node);
    let export = exported["status"].clone();
    assert_eq!(export["host"], storage_ip, "{export}");
    assert_eq!(
        export["tls"], true,
        "served over TLS to the compute node's certificate: {export}"
    );
    let port = export["port"].as_u64().unwrap_or_default();
    // On a port of the exports' own range, outside the kernel's ephemeral ports, at the
    // address the storage node recorded for its pool (which the API and the compute node hold the export to).
    ensure!((10809..=10999).contains(&port), "port {port}");
    let recorded = cloud.kubectl_ok(&[
        "get",
        "storagepool",
        pool.name(),
        "-o",
        "jsonpath={.status.storageAddress}",
    ])?;
    assert_eq!(recorded.trim(), storage_ip);
    let ready = export["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["type"] == "Ready")
        .cloned()
        .unwrap_or_default();
    assert_eq!(
        (&ready["status"], &ready["reason"]),
        (&Value::from("True"), &Value::from("Exported")),
        "{ready}"
    );
    // The guest's kernel read the partition table written on the storage node, over the network.
    let (uid, dom) = scanned_by(&cloud, ns, &compute, "vm")?;
    let xml = String::from_utf8_lossy(&compute.virsh(&["dumpxml", &dom])?.stdout).into_owned();
    ensure!(
        xml.contains("protocol='nbd'")
            && xml.contains("tls='yes'")
            && xml.contains(&format!("<host name='{storage_ip}' port='{port}'/>")),
        "{xml}"
    );

    // Only the compute node's address reaches the export: this host's own address on the storage
    // network, as any other, has its connection dropped.
    ensure!(
        dropped(storage_ip, &format!("{storage_ip}:{port}"))?,
        "a connection from {storage_ip} to the export was answered"
    );

    // The storage agent dies and starts again: it takes the same export back (same process,
    // port and name), and the guest keeps its disk.
    let record = std::fs::read_dir(storage.path().join("storage-state/exports"))?
        .flatten()
        .find(|e| e.path().extension().is_some_and(|x| x == "json"))
        .context("the export's record")?
        .path();
    let pid_before = serde_json::from_slice::<Value>(&std::fs::read(&record)?)?["pid"].clone();
    agent.kill();
    agent = storage_agent("storage-agent-2.log")?;
    wait_until(WAIT, "the export taken back", || {
        std::fs::read_to_string(storage.path().join("storage-agent-2.log"))
            .ok()
            .filter(|l| l.contains("exports taken back"))
    })?;
    let pid_after = serde_json::from_slice::<Value>(&std::fs::read(&record)?)?["pid"].clone();
    assert_eq!(pid_before, pid_after, "the same qemu-nbd serves it");
    let again = json(&cloud, ns, &["get", "volumeexport", &export_name])?;
    assert_eq!(
        (&again["status"]["port"], &again["status"]["exportName"]),
        (&export["port"], &export["exportName"]),
        "served again at the same port and name"
    );

    // The guest writes to the disk, over NBD (its shell on the console, which the image's
    // command line opens); the marker it prints is computed, so the echoed command is not it.
    compute.type_until(
        &uid,
        &dom,
        "echo STRATUS-NBD-DATA | dd of=/dev/vdc bs=512 seek=2048 conv=fsync && echo NBD-WRITE-$((40+2))",
        "NBD-WRITE-42",
        10,
    )?;

    // Grown while the guest holds it: the storage node serves it anew at 2 GiB beside the
    // export the guest reads, the compute node moves the guest's disk to that one (QEMU's
    // NBD client keeps the size it connected with), and the guest sees the new size with
    // its data; the first export ends once left, and the domain's definition names the new.
    let (record, pid_after, port) = grown_over_nbd(
        &cloud,
        ns,
        &mut compute,
        (&uid, &dom),
        &export_name,
        (&record, port),
    )
    .with_context(|| {
        std::fs::read_to_string(storage.path().join("storage-agent-2.log")).unwrap_or_default()
    })
    .with_context(|| compute.agent_log())?;

    // Detached: the disk leaves the guest, the export ends, the data is in the volume on the
    // storage node.
    cloud.kubectl_ok(&[
        "-n",
        ns,
        "patch",
        "server",
        "vm",
        "--type=json",
        "-p",
        r#"[{"op":"remove","path":"/spec/volumes"}]"#,
    ])?;
    let vol = wait_volume(&cloud, ns, "far released", |v| {
        v["status"]["attachedTo"].is_null() && v["status"]["attachedNode"].is_null()
    })?;
    // Gone is NotFound: a server error or an unreachable API keeps the wait going (and fails it).
    wait_until(WAIT, "far's VolumeExport gone (NotFound)", || {
        cloud
            .kubectl(&["get", "volumeexport", &export_name, "-o", "name"])
            .ok()
            .filter(|o| !o.status.success())
            .filter(|o| String::from_utf8_lossy(&o.stderr).contains("(NotFound)"))
            .map(|_| ())
    })?;
    assert_eq!(vol["status"]["phase"], "Available");
    let out = compute.virsh(&["domblklist", &dom])?;
    let disks = String::from_utf8_lossy(&out.stdout);
    ensure!(!disks.contains("vdc"), "{disks}");
    wait_until(WAIT, "the export's record gone", || {
        (!record.exists()).then_some(())
    })?;
    let pid = pid_after.as_u64().unwrap_or_default();
    wait_until(Duration::from_secs(30), "qemu-nbd gone", || {
        (!std::path::Path::new(&format!("/proc/{pid}")).exists()).then_some(())
    })?;
    let table = run("nft", &["list", "table", "inet", site.table])?;
    ensure!(!table.contains(&format!("dport {port}")), "{table}");
    // Where the volume is now (an LV's loop device may be another once released).
    let path = vol["status"]["devicePath"]
        .as_str()
        .context("far's device path")?
        .to_string();
    let mut data = [0u8; 17];
    std::fs::File::open(&path)?.read_exact_at(&mut data, 1 << 20)?;
    ensure!(
        &data == b"STRATUS-NBD-DATA\n",
        "the guest's write is not in the volume: {:?}",
        String::from_utf8_lossy(&data)
    );
    let mut mbr = [0u8; 512];
    std::fs::File::open(&path)?.read_exact_at(&mut mbr, 0)?;
    assert_eq!(mbr, partition_table(), "the rest is as it was");
    let mut grown = [0u8; 14];
    std::fs::File::open(&path)?.read_exact_at(&mut grown, GROWN_AT)?;
    ensure!(
        &grown == b"STRATUS-GROWN\n",
        "the guest's write past the old end is not in the volume: {:?}",
        String::from_utf8_lossy(&grown)
    );

    // A second server on the compute node, attached the volume at its create: its guest reads
    // back, over a new export, what the first wrote (lowercased, so the echoed command is not
    // what it prints).
    cloud.kubectl_ok(&["-n", ns, "delete", "server", "vm", "--wait=false"])?;
    cloud.kubectl_in(
        &["-n", ns, "apply", "-f", "-"],
        "apiVersion: compute.stratus.dev/v1\nkind: Server\nmetadata:\n  name: vm2\nspec:\n  flavor: m1.nano\n  image: tiny\n  volumes:\n  - volume: far\n",
    )?;
    let (uid2, dom2) = scanned_by(&cloud, ns, &compute, "vm2")?;
    let xml = String::from_utf8_lossy(&compute.virsh(&["dumpxml", &dom2])?.stdout).into_owned();
    ensure!(
        xml.contains("protocol='nbd'") && xml.contains(&format!("<host name='{storage_ip}'")),
        "{xml}"
    );
    compute.type_until(
        &uid2,
        &dom2,
        "dd if=/dev/vdc bs=16 skip=65536 count=1 2>/dev/null | tr A-Z a-z",
        "stratus-nbd-data",
        10,
    )?;

    cloud.kubectl_ok(&["-n", ns, "delete", "server", "vm2", "--wait=false"])?;
    delete_once_released(&cloud, ns, &["far"])?;
    wait_until(WAIT, "the volume gone", || pool.gone(&path).then_some(()))?;
    drop(agent);
    Ok(())
}

/// Merges `body` into object `what` (`kind/name`) of project `ns`.
fn merge(cloud: &Cloud, ns: &str, what: &str, body: &str) -> Result<String> {
    cloud.kubectl_ok(&["-n", ns, "patch", what, "--type=merge", "-p", body])
}

/// Where the guest writes past its volume's first size once grown: 1 GiB and 1 MiB.
const GROWN_AT: u64 = (1 << 30) + (1 << 20);

/// Grows volume `far` of project `ns` from 1 to 2 GiB while the guest of server `uid`
/// (domain `dom`) on `compute` holds it over NBD, through the VolumeExport `export_name`
/// first served as recorded in `first` (its record, its port), and checks what the guest
/// and the storage node see. The compute agent is down meanwhile, its move of the disk cut
/// short after its first step; started again, it finishes it. Stopped and started, the
/// server's guest has the grown volume. The grown export's record, `qemu-nbd` pid and port.
fn grown_over_nbd(
    cloud: &Cloud,
    ns: &str,
    compute: &mut Node,
    (uid, dom): (&str, &str),
    export_name: &str,
    (first, first_port): (&std::path::Path, u64),
) -> Result<(std::path::PathBuf, Value, u64)> {
    let first_pid = serde_json::from_slice::<Value>(&std::fs::read(first)?)?["pid"]
        .as_u64()
        .unwrap_or_default();
    compute.kill_agent();
    merge(cloud, ns, "volume/far", r#"{"spec":{"sizeGiB":2}}"#)?;
    wait_volume(cloud, ns, "far grown to 2 GiB", |v| {
        v["status"]["sizeGiB"] == 2 && v["status"]["phase"] == "InUse"
    })?;
    let grown = wait_until(WAIT, "far's export served anew at 2 GiB", || {
        json(cloud, ns, &["get", "volumeexport", export_name])
            .ok()
            .filter(|x| {
                x["status"]["port"]
                    .as_u64()
                    .is_some_and(|p| p != first_port)
            })
    })?;
    let port = grown["status"]["port"].as_u64().unwrap_or_default();
    ensure!((10809..=10999).contains(&port), "port {port}");
    assert_eq!(grown["status"]["tls"], true, "{grown}");
    let name = grown["status"]["exportName"].as_str().unwrap_or_default();
    let host = grown["status"]["host"].as_str().unwrap_or_default();
    // The move's first step, as an agent killed after it leaves it: a node on the grown
    // export (with the TLS credentials libvirt made for the disk) under the disk's raw node,
    // the first export's node still there.
    let live = compute.virsh(&["dumpxml", dom])?;
    let live = String::from_utf8_lossy(&live.stdout).into_owned();
    let index = live
        .split("protocol='nbd'")
        .nth(1)
        .and_then(|s| s.split("index='").nth(1))
        .and_then(|s| s.split('\'').next())
        .context("the NBD disk's source index")?
        .to_owned();
    let qmp = |cmd: Value| -> Result<String> {
        let out = compute.virsh(&["qemu-monitor-command", dom, &cmd.to_string()])?;
        let said = String::from_utf8_lossy(&out.stdout).into_owned();
        ensure!(
            out.status.success() && said.contains("\"return\""),
            "{cmd}: {said}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(said)
    };
    let tls = format!("objlibvirt-{index}-storage_tls0");
    let objects =
        qmp(serde_json::json!({"execute": "qom-list", "arguments": {"path": "/objects"}}))?;
    ensure!(objects.contains(&tls), "{objects}");
    let moving = format!("stratus-{index}-moving");
    qmp(serde_json::json!({"execute": "blockdev-add", "arguments": {
        "driver": "nbd", "node-name": moving, "export": name, "tls-creds": tls,
        "server": {"type": "inet", "host": host, "port": port.to_string()},
    }}))?;
    qmp(
        serde_json::json!({"execute": "blockdev-reopen", "arguments": {"options": [{
            "node-name": format!("libvirt-{index}-format"), "driver": "raw", "file": moving,
            "read-only": false,
        }]}}),
    )?;
    compute.start_agent(cloud)?;
    // The guest sees 2 GiB (in 512-byte sectors) on the disk it had, without a reboot; the
    // marker is computed, so the echoed command is not it.
    compute.type_until(
        uid,
        dom,
        "echo VDC-SECTORS-$(cat /sys/block/vdc/size)",
        "VDC-SECTORS-4194304",
        20,
    )?;
    let console = compute.console(uid);
    ensure!(
        console.contains("vdc: detected capacity change from 2097152 to 4194304"),
        "the guest's kernel was not told: {console}"
    );
    // Its data read back through the grown export, and a write past the old end.
    compute.type_until(
        uid,
        dom,
        "dd if=/dev/vdc bs=16 skip=65536 count=1 2>/dev/null | tr A-Z a-z | tr -d '\\n'; echo -grown",
        "stratus-nbd-data-grown",
        10,
    )?;
    compute.type_until(
        uid,
        dom,
        &format!(
            "echo STRATUS-GROWN | dd of=/dev/vdc bs=512 seek={} conv=fsync && echo GROWN-WRITE-$((40+2))",
            GROWN_AT / 512
        ),
        "GROWN-WRITE-42",
        10,
    )?;
    // The first export ends once the guest left it: its record and its qemu-nbd go, one
    // export (the grown one) is left.
    let dir = first.parent().context("the records' directory")?;
    let records = || -> Vec<std::path::PathBuf> {
        std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .collect()
    };
    wait_until(WAIT, "the first export ended", || {
        (!first.exists() && !std::path::Path::new(&format!("/proc/{first_pid}")).exists())
            .then_some(())
    })?;
    let left = records();
    ensure!(left.len() == 1, "{left:?}");
    let record = left[0].clone();
    let pid = serde_json::from_slice::<Value>(&std::fs::read(&record)?)?["pid"].clone();
    // Started again, the domain connects to the export served now.
    let defined = compute.virsh(&["dumpxml", "--inactive", dom])?;
    let defined = String::from_utf8_lossy(&defined.stdout);
    ensure!(
        defined.contains(&format!("port='{port}'")) && defined.contains(name),
        "{defined}"
    );
    // No libvirt node was left behind: QEMU's disk reads the grown export alone.
    let nodes = compute.virsh(&[
        "qemu-monitor-command",
        dom,
        r#"{"execute":"query-named-block-nodes","arguments":{"flat":true}}"#,
    ])?;
    let nodes = String::from_utf8_lossy(&nodes.stdout);
    ensure!(
        !nodes.contains("-moving\"") && !nodes.contains(&format!(":{first_port}/")),
        "{nodes}"
    );
    // Stopped and started again (a new QEMU, from the definition): the guest has the disk
    // from the grown export, at its size, with what it wrote before and after the grow; the
    // computed marker is not the echoed command.
    let shells = || compute.console(uid).matches("built-in shell").count();
    let booted = shells();
    for (power, phase) in [("Stopped", "Stopped"), ("Running", "Running")] {
        let body = format!(r#"{{"spec":{{"powerState":"{power}"}}}}"#);
        merge(cloud, ns, "server/vm", &body)?;
        wait_until(WAIT, &format!("vm {phase}"), || {
            json(cloud, ns, &["get", "server", "vm"])
                .ok()
                .filter(|s| s["status"]["phase"] == phase)
        })?;
    }
    // Typed into only once booted (its console, appended to, holds the first boot's shell
    // too): a terminal held open and not read while the kernel writes to it stalls the boot.
    wait_until(WAIT, "the guest's shell after its start", || {
        (shells() > booted).then_some(())
    })?;
    compute.type_until(
        uid,
        dom,
        &format!(
            "echo R-$(dd if=/dev/vdc bs=512 skip={} count=1 2>/dev/null | head -c 13 | tr A-Z a-z)-$(dd if=/dev/vdc bs=16 skip=65536 count=1 2>/dev/null | head -c 16 | tr A-Z a-z)-$(cat /sys/block/vdc/size)",
            GROWN_AT / 512
        ),
        "R-stratus-grown-stratus-nbd-data-4194304",
        20,
    )?;
    Ok((record, pid, port))
}
