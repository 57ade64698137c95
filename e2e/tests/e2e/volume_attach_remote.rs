//! A volume of one node attached to a real guest on another, over NBD: node `nbd-a` runs the
//! storage agent (a file pool in a directory the test makes, exports on its storage address),
//! node `nbd-b` the compute agent, whose libvirtd (and so QEMU) lives in a network namespace of
//! its own, joined to `nbd-a`'s by a veth pair the test makes, as two hosts on a storage
//! network. The guest on `nbd-b` reads the partition table written into the volume on `nbd-a`;
//! no other address reaches the export's port; the storage agent, killed and started again,
//! takes its export back without the guest losing it; the guest writes to the disk (from the
//! shell on its console) and, once detached, the data is in the volume on `nbd-a` and the
//! export is gone. Attached over NBD the volume does not grow (422, nothing changed).

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;
use stratus_e2e::node::{Guest, Node};
use stratus_e2e::{Cloud, Proc, stratus_bin, wait_until};

use super::volume_attach::partition_table;

const NS: &str = "nbdvols";
const STORAGE: &str = "nbd-a";
const COMPUTE: &str = "nbd-b";
/// The storage network: `nbd-a`'s end (the host's namespace) and `nbd-b`'s (its libvirtd's).
const STORAGE_IP: &str = "10.251.15.1";
const COMPUTE_IP: &str = "10.251.15.2";
const HOST_LINK: &str = "nbd-st0";
const NODE_LINK: &str = "nbd-cn0";
/// The storage agent's nftables table on [`STORAGE_IP`].
const TABLE: &str = "stratus_nbd_10_251_15_1";
/// Generous: builds and TCG guests of other tests share two cores.
const WAIT: Duration = Duration::from_secs(300);

fn json(cloud: &Cloud, args: &[&str]) -> Result<Value> {
    let mut a = vec!["-n", NS];
    a.extend_from_slice(args);
    a.extend(["-o", "json"]);
    Ok(serde_json::from_str(&cloud.kubectl_ok(&a)?)?)
}

fn volume(cloud: &Cloud) -> Result<Value> {
    json(cloud, &["get", "volume", "far"])
}

fn wait_volume(cloud: &Cloud, what: &str, pred: impl Fn(&Value) -> bool) -> Result<Value> {
    wait_until(WAIT, what, || volume(cloud).ok().filter(|v| pred(v))).with_context(|| {
        cloud
            .kubectl_ok(&["-n", NS, "get", "volume", "far", "-o", "yaml"])
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
struct Cleanup {
    exports: std::path::PathBuf,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["link", "del", HOST_LINK]).status();
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
        let _ = Command::new("nft")
            .args(["delete", "table", "inet", TABLE])
            .status();
    }
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
    let guest = Guest::serve()?;
    // nbd-a runs no guests: its storage agent alone, in the host's namespace.
    let storage = tempfile::tempdir()?;
    let mut compute = Node::start(COMPUTE)?;
    let _cleanup = Cleanup {
        exports: storage.path().join("storage-state/exports"),
    };
    compute.join_host(
        HOST_LINK,
        &format!("{STORAGE_IP}/30"),
        NODE_LINK,
        &format!("{COMPUTE_IP}/30"),
    )?;
    let cloud = Cloud::up_with(&["--nodes", &format!("{STORAGE},{COMPUTE}")])?;
    cloud.projects(&[NS])?;
    compute.start_agent(&cloud)?;
    let pool = storage.path().join("pool");
    std::fs::create_dir_all(&pool)?;
    // Each node's NBD certificate from the cloud's NBD CA: nbd-a's names its storage address,
    // nbd-b's goes where its libvirtd reads it.
    let nbd_tls = storage.path().join("nbd-tls");
    for (node, address, out) in [
        (STORAGE, Some(STORAGE_IP), nbd_tls.clone()),
        (COMPUTE, None, compute.nbd_tls_dir()),
    ] {
        let mut pki = Command::new(stratus_bin());
        pki.args(["pki", "nbd-node", node, "--ca-dir"])
            .arg(cloud.dir.path().join("pki/nbd"))
            .arg("--out")
            .arg(out);
        if let Some(a) = address {
            pki.args(["--address", a]);
        }
        let out = pki.output()?;
        ensure!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let storage_agent = |log: &str| {
        Proc::spawn(
            "storage agent",
            Command::new(stratus_bin())
                .args(["agent", "--roles", "storage", "--node", STORAGE])
                .arg("--kubeconfig")
                .arg(cloud.dir.path().join(format!("node-{STORAGE}.kubeconfig")))
                .arg("--state-dir")
                .arg(storage.path().join("storage-state"))
                .args(["--storage-pool", &format!("files=file:{}", pool.display())])
                .args(["--storage-address", STORAGE_IP])
                .arg("--nbd-tls-dir")
                .arg(&nbd_tls)
                .args(["--storage-heartbeat-seconds", "1", "--resync-seconds", "2"]),
            &storage.path().join(log),
        )
    };
    let mut agent = storage_agent("storage-agent.log")?;
    let flavors = stratus_e2e::repo_root().join("examples/flavors.yaml");
    cloud.kubectl_ok(&["apply", "-f", flavors.to_str().unwrap_or_default()])?;
    let images = guest.images_yaml(NS)?.replace(
        "console=ttyS0 quiet",
        "console=ttyS0 loglevel=7 stratus.shell",
    );
    cloud.kubectl_in(&["-n", NS, "apply", "-f", "-"], &images)?;
    // nbd-b's address on the storage network, as its network agent reports it.
    wait_until(WAIT, "nbd-b's Hypervisor", || {
        cloud.kubectl_ok(&["get", "hypervisor", COMPUTE]).ok()
    })?;
    cloud.kubectl_ok(&[
        "patch",
        "hypervisor",
        COMPUTE,
        "--subresource=status",
        "--type=merge",
        "-p",
        &format!(r#"{{"status":{{"hostIP":"{COMPUTE_IP}"}}}}"#),
    ])?;

    // A volume on nbd-a's pool (the only one) holding a partition table.
    cloud.kubectl_in(
        &["-n", NS, "apply", "-f", "-"],
        "apiVersion: storage.stratus.dev/v1\nkind: Volume\nmetadata:\n  name: far\nspec:\n  sizeGiB: 1\n",
    )?;
    let vol = wait_volume(&cloud, "volume far Available", |v| {
        v["status"]["phase"] == "Available" && v["status"]["devicePath"].is_string()
    })?;
    assert_eq!(vol["status"]["node"], STORAGE);
    let path = vol["status"]["devicePath"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    OpenOptions::new()
        .write(true)
        .open(&path)?
        .write_all_at(&partition_table(), 0)?;

    // A server, placed on nbd-b (the only compute node), attaches it at its create.
    cloud.kubectl_in(
        &["-n", NS, "apply", "-f", "-"],
        "apiVersion: compute.stratus.dev/v1\nkind: Server\nmetadata:\n  name: vm\nspec:\n  flavor: m1.nano\n  image: tiny\n  volumes:\n  - volume: far\n",
    )?;
    let vol = wait_volume(&cloud, "far attached on nbd-b", |v| {
        v["status"]["attachedNode"] == COMPUTE
    })?;
    // Its export to nbd-b: a cluster-scoped VolumeExport named for (volume uid, node), which
    // the project's members do not read (the Volume carries no export).
    ensure!(vol["status"].get("export").is_none(), "{vol}");
    let export_name = format!(
        "{}.{COMPUTE}",
        vol["metadata"]["uid"].as_str().unwrap_or_default()
    );
    let exported = wait_until(WAIT, "far's VolumeExport to nbd-b served", || {
        json(&cloud, &["get", "volumeexport", &export_name])
            .ok()
            .filter(|x| x["status"]["port"].is_u64())
    })
    .with_context(|| {
        std::fs::read_to_string(storage.path().join("storage-agent.log")).unwrap_or_default()
    })?;
    assert_eq!(exported["spec"]["storageNode"], STORAGE);
    assert_eq!(exported["spec"]["node"], COMPUTE);
    let export = exported["status"].clone();
    assert_eq!(export["host"], STORAGE_IP, "{export}");
    assert_eq!(
        export["tls"], true,
        "served over TLS to nbd-b's certificate: {export}"
    );
    let port = export["port"].as_u64().unwrap_or_default();
    // On a port of the exports' own range, outside the kernel's ephemeral ports, at the
    // address nbd-a recorded for its pool (which the API and nbd-b hold the export to).
    ensure!((10809..=10999).contains(&port), "port {port}");
    let recorded = cloud.kubectl_ok(&[
        "get",
        "storagepool",
        "files",
        "-o",
        "jsonpath={.status.storageAddress}",
    ])?;
    assert_eq!(recorded.trim(), STORAGE_IP);
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
    let server = wait_until(WAIT, "vm Running", || {
        json(&cloud, &["get", "server", "vm"])
            .ok()
            .filter(|s| s["status"]["phase"] == "Running")
    })
    .with_context(|| compute.agent_log())?;
    assert_eq!(server["status"]["hypervisor"], COMPUTE);
    let uid = server["metadata"]["uid"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let dom = format!("stratus-{uid}");
    // The guest's kernel read the partition table written on nbd-a, over the network.
    wait_until(WAIT, "the guest's partition scan of vdc", || {
        compute
            .console(&uid)
            .contains("vdc: vdc1 vdc2")
            .then_some(())
    })
    .with_context(|| format!("console:\n{}", compute.console(&uid)))?;
    let xml = String::from_utf8_lossy(&compute.virsh(&["dumpxml", &dom])?.stdout).into_owned();
    ensure!(
        xml.contains("protocol='nbd'")
            && xml.contains("tls='yes'")
            && xml.contains(&format!("<host name='{STORAGE_IP}' port='{port}'/>")),
        "{xml}"
    );

    // Attached over NBD, it does not grow (QEMU's NBD client keeps the size it connected
    // with): refused whole, the guest's disk as it was.
    let refused = cloud.kubectl_err(&[
        "-n",
        NS,
        "patch",
        "volume",
        "far",
        "--type=merge",
        "-p",
        r#"{"spec":{"sizeGiB":2}}"#,
    ])?;
    ensure!(
        refused.contains("spec.sizeGiB") && refused.contains("over NBD"),
        "{refused}"
    );
    assert_eq!(volume(&cloud)?["spec"]["sizeGiB"], 1);

    // Only nbd-b's address reaches the export: this host's own address on the storage
    // network, as any other, has its connection dropped.
    ensure!(
        dropped(STORAGE_IP, &format!("{STORAGE_IP}:{port}"))?,
        "a connection from {STORAGE_IP} to the export was answered"
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
    let again = json(&cloud, &["get", "volumeexport", &export_name])?;
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

    // Detached: the disk leaves the guest, the export ends, the data is in the volume on nbd-a.
    cloud.kubectl_ok(&[
        "-n",
        NS,
        "patch",
        "server",
        "vm",
        "--type=json",
        "-p",
        r#"[{"op":"remove","path":"/spec/volumes"}]"#,
    ])?;
    let vol = wait_volume(&cloud, "far released", |v| {
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
    let table = run("nft", &["list", "table", "inet", TABLE])?;
    ensure!(!table.contains(&format!("dport {port}")), "{table}");
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

    cloud.kubectl_ok(&["-n", NS, "delete", "server", "vm", "--wait=false"])?;
    cloud.kubectl_ok(&["-n", NS, "delete", "volume", "far", "--wait=false"])?;
    wait_until(WAIT, "the volume gone", || {
        (!std::path::Path::new(&path).exists()).then_some(())
    })?;
    drop(agent);
    Ok(())
}
