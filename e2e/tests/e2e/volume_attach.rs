//! Volumes attached to real guests: one simulated node runs the compute agent (its own
//! libvirtd, real TCG guests) and the storage agent (a file pool in a directory the test
//! makes), both as the node. A volume holding a partition table the test wrote is attached
//! at the server's create, and the guest's kernel reads it (its partitions on the console);
//! a second server asking for it is refused (409 naming the field and the holder), and of two
//! servers racing for one volume exactly one gets it; the volume grows while attached and the
//! guest sees the new size; it is detached (data kept, `attachedTo` released), grown and at
//! once plugged in again while the guest runs, which sees it at its new size from the start
//! (never at the old one, then growing); deleting it attached is refused, detached it goes. A
//! volume made from the tiny image boots a server to its init, and grows while the guest
//! runs (its kernel sees the root disk's new size). On an LVM pool without
//! device-mapper, an attached volume grows under its running guest when the extents after it
//! are free, and waits to be detached, saying why, when they are not.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use serde_json::Value;
use stratus_e2e::node::{Guest, Node};
use stratus_e2e::{Cloud, Proc, stratus_bin, wait_until};

const NS: &str = "vols";
const NODE: &str = "va";
/// Generous: builds and TCG guests of other tests share two cores.
const WAIT: Duration = Duration::from_secs(240);
const GIB: u64 = 1 << 30;

fn json(cloud: &Cloud, args: &[&str]) -> Result<Value> {
    let mut a = vec!["-n", NS];
    a.extend_from_slice(args);
    a.extend(["-o", "json"]);
    Ok(serde_json::from_str(&cloud.kubectl_ok(&a)?)?)
}

fn apply(cloud: &Cloud, yaml: &str) -> Result<String> {
    cloud.kubectl_in(&["-n", NS, "apply", "-f", "-"], yaml)
}

/// Waits for `kind/name` to satisfy `pred`, showing it when it does not.
fn wait_for(
    cloud: &Cloud,
    kind: &str,
    name: &str,
    what: &str,
    pred: impl Fn(&Value) -> bool,
) -> Result<Value> {
    wait_until(WAIT, what, || {
        json(cloud, &["get", kind, name]).ok().filter(|v| pred(v))
    })
    .with_context(|| {
        format!(
            "{kind} {name}: {}",
            cloud
                .kubectl_ok(&["-n", NS, "get", kind, name, "-o", "yaml"])
                .unwrap_or_default()
        )
    })
}

pub(super) fn volume_yaml(name: &str, extra: &str) -> String {
    format!(
        "---\napiVersion: storage.stratus.dev/v1\nkind: Volume\nmetadata:\n  name: {name}\nspec:\n  sizeGiB: 1\n{extra}"
    )
}

pub(super) fn server_yaml(name: &str, spec: &str) -> String {
    format!(
        "---\napiVersion: compute.stratus.dev/v1\nkind: Server\nmetadata:\n  name: {name}\nspec:\n  flavor: m1.nano\n{spec}"
    )
}

/// A master boot record with two Linux partitions: what the guest's kernel reads from the
/// disk and names on its console (` vdc: vdc1 vdc2`).
pub(super) fn partition_table() -> [u8; 512] {
    let mut mbr = [0u8; 512];
    for (i, start) in [2048u32, 4096].into_iter().enumerate() {
        let e = 446 + 16 * i;
        mbr[e + 4] = 0x83;
        mbr[e + 8..e + 12].copy_from_slice(&start.to_le_bytes());
        mbr[e + 12..e + 16].copy_from_slice(&2048u32.to_le_bytes());
    }
    mbr[510] = 0x55;
    mbr[511] = 0xaa;
    mbr
}

/// How many times the guest's kernel listed a disk's two partitions on the console
/// (`[ 1.2] vdc: vdc1 vdc2`; a disk plugged in again may get another name).
pub(super) fn partition_scans(console: &str) -> usize {
    console
        .lines()
        .filter(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            w.len() >= 3 && {
                let (disk, p1, p2) = (w[w.len() - 3], w[w.len() - 2], w[w.len() - 1]);
                disk.starts_with("vd")
                    && disk.ends_with(':')
                    && p1 == format!("{}1", disk.trim_end_matches(':'))
                    && p2 == format!("{}2", disk.trim_end_matches(':'))
            }
        })
        .count()
}

/// The disks of a domain as `virsh domblklist` shows them: (target, source).
pub(super) fn blklist(node: &Node, domain: &str) -> Result<Vec<(String, String)>> {
    let out = node.virsh(&["domblklist", domain])?;
    ensure!(
        out.status.success(),
        "virsh domblklist: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .skip(2)
        .filter_map(|l| {
            let mut p = l.split_whitespace();
            Some((p.next()?.to_string(), p.next()?.to_string()))
        })
        .collect())
}

/// The capacity of a domain's disk, as `virsh domblkinfo` says.
fn capacity(node: &Node, domain: &str, target: &str) -> Option<u64> {
    let out = node.virsh(&["domblkinfo", domain, target]).ok()?;
    String::from_utf8_lossy(&out.stdout).lines().find_map(|l| {
        l.strip_prefix("Capacity:")
            .and_then(|v| v.trim().parse().ok())
    })
}

/// One simulated node running the compute agent and the storage agent (a file pool in a
/// directory of the node's), a cloud that knows it, project `ns`, the flavors, and the test
/// guest's Images with the kernel's messages on the console (it names the disks it finds),
/// and `cmdline` after them. Dropped in the order of the fields.
pub(super) struct OneNode {
    /// The storage agent.
    _storage: Proc,
    /// The cloud.
    pub cloud: Cloud,
    /// The node.
    pub node: Node,
    /// The test guest's file server.
    _guest: Guest,
    /// The pool's directory.
    pub pool: PathBuf,
}

impl OneNode {
    /// Starts node `name` for project `ns`.
    pub(super) fn start(name: &str, ns: &str, cmdline: &str) -> Result<Self> {
        Self::start_with(name, ns, cmdline, &[])
    }

    /// As [`OneNode::start`], the storage agent also serving `pools` (`NAME=lvm:VG`, …).
    pub(super) fn start_with(
        name: &str,
        ns: &str,
        cmdline: &str,
        pools: &[String],
    ) -> Result<Self> {
        let guest = Guest::serve()?;
        let mut node = Node::start(name)?;
        let cloud = Cloud::up_with(&["--nodes", name])?;
        cloud.projects(&[ns])?;
        node.start_agent(&cloud)?;
        let pool = node.dir.path().join("pool");
        std::fs::create_dir_all(&pool)?;
        let storage = Proc::spawn(
            "storage agent",
            Command::new(stratus_bin())
                .args(["agent", "--roles", "storage", "--node", name])
                .arg("--kubeconfig")
                .arg(cloud.dir.path().join(format!("node-{name}.kubeconfig")))
                .arg("--state-dir")
                .arg(node.dir.path().join("storage-state"))
                .args(["--storage-pool", &format!("files=file:{}", pool.display())])
                .args(pools.iter().flat_map(|p| ["--storage-pool", p.as_str()]))
                .args(["--storage-heartbeat-seconds", "1", "--resync-seconds", "2"])
                .arg("--image-url-allow-loopback"),
            &node.dir.path().join("storage-agent.log"),
        )?;
        let flavors = stratus_e2e::repo_root().join("examples/flavors.yaml");
        cloud.kubectl_ok(&["apply", "-f", flavors.to_str().unwrap_or_default()])?;
        let images = guest.images_yaml(ns)?.replace(
            "console=ttyS0 quiet",
            &format!("console=ttyS0 loglevel=7{cmdline}"),
        );
        cloud.kubectl_in(&["-n", ns, "apply", "-f", "-"], &images)?;
        Ok(Self {
            _storage: storage,
            cloud,
            node,
            _guest: guest,
            pool,
        })
    }
}

#[test]
fn volumes_attach_to_real_guests_and_boot_them() -> Result<()> {
    let one = OneNode::start(NODE, NS, "")?;
    let (cloud, node, pool) = (&one.cloud, &one.node, &one.pool);

    // A volume holding a partition table.
    apply(cloud, &volume_yaml("data", ""))?;
    let vol = wait_for(cloud, "volume", "data", "volume data Available", |v| {
        v["status"]["phase"] == "Available" && v["status"]["devicePath"].is_string()
    })?;
    let path = vol["status"]["devicePath"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    OpenOptions::new()
        .write(true)
        .open(&path)?
        .write_all_at(&partition_table(), 0)?;

    // Attached at create: the guest's kernel reads its partitions.
    apply(
        cloud,
        &server_yaml("vm1", "  image: tiny\n  volumes:\n  - volume: data\n"),
    )?;
    let vm1 = wait_for(cloud, "server", "vm1", "vm1 Running", |s| {
        s["status"]["phase"] == "Running"
    })?;
    let uid1 = vm1["metadata"]["uid"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let dom1 = format!("stratus-{uid1}");
    let console = |uid: &str, what: &str, n: usize| {
        wait_until(WAIT, what, || {
            (node.console(uid).matches(what).count() >= n).then_some(())
        })
        .with_context(|| format!("console of {uid}:\n{}", node.console(uid)))
    };
    console(&uid1, "vdc: vdc1 vdc2", 1)?;
    assert_eq!(partition_scans(&node.console(&uid1)), 1);
    ensure!(
        blklist(node, &dom1)?.contains(&("vdc".into(), path.clone())),
        "{:?}",
        blklist(node, &dom1)
    );
    let vol = json(cloud, &["get", "volume", "data"])?;
    assert_eq!(vol["status"]["attachedTo"], "vm1", "{vol}");
    assert_eq!(vol["status"]["phase"], "InUse", "{vol}");

    // Held: a second server is refused, naming the field and the holder.
    let err = cloud
        .kubectl_in(
            &["-n", NS, "apply", "-f", "-"],
            &server_yaml("vm2", "  image: tiny\n  volumes:\n  - volume: data\n"),
        )
        .expect_err("a held volume is refused");
    let msg = format!("{err:#}");
    assert!(
        msg.contains("spec.volumes[0].volume")
            && msg.contains("\"vm1\"")
            && msg.contains("Conflict"),
        "{msg}"
    );
    ensure!(
        !cloud
            .kubectl_ok(&["-n", NS, "get", "servers", "-o", "name"])?
            .contains("vm2")
    );
    // Deleting it while attached is refused.
    let err = cloud.kubectl_err(&["-n", NS, "delete", "volume", "data", "--wait=false"])?;
    assert!(err.contains("attached"), "{err}");

    // Two servers racing for one volume: exactly one gets it.
    apply(cloud, &volume_yaml("contested", ""))?;
    let racers: Vec<_> = ["r1", "r2"]
        .into_iter()
        .map(|name| {
            let mut cmd = cloud.kubectl_cmd();
            cmd.args(["-n", NS, "create", "-f", "-"]);
            // In a zone no hypervisor is in: never placed, so no guest is built for it.
            let yaml = server_yaml(
                name,
                "  image: tiny\n  availabilityZone: nowhere\n  volumes:\n  - volume: contested\n",
            );
            std::thread::spawn(move || stratus_e2e::with_stdin(cmd, &yaml))
        })
        .collect();
    let mut won = Vec::new();
    for (name, r) in ["r1", "r2"].into_iter().zip(racers) {
        let out = r.join().map_err(|_| anyhow::anyhow!("racer panicked"))??;
        if out.status.success() {
            won.push(name);
        } else {
            let e = String::from_utf8_lossy(&out.stderr);
            assert!(
                e.contains("spec.volumes[0].volume") && e.contains("attached to server"),
                "{e}"
            );
        }
    }
    assert_eq!(won.len(), 1, "exactly one racer wins: {won:?}");
    let holder = json(cloud, &["get", "volume", "contested"])?;
    assert_eq!(holder["status"]["attachedTo"], won[0], "{holder}");
    cloud.kubectl_ok(&["-n", NS, "delete", "server", won[0], "--wait=false"])?;

    // Grown while attached: the running guest sees the new size.
    cloud.kubectl_ok(&[
        "-n",
        NS,
        "patch",
        "volume",
        "data",
        "--type=merge",
        "-p",
        r#"{"spec":{"sizeGiB":2}}"#,
    ])?;
    wait_until(WAIT, "the guest's disk at 2 GiB", || {
        (capacity(node, &dom1, "vdc") == Some(2 * GIB)).then_some(())
    })
    .with_context(|| format!("agent log:\n{}", node.agent_log()))?;
    console(&uid1, "new size: 4194304", 1)?;
    wait_for(cloud, "volume", "data", "volume data at 2 GiB", |v| {
        v["status"]["sizeGiB"] == 2 && v["status"]["phase"] == "InUse"
    })?;

    // Detached: gone from the guest, the attachment released, the data kept.
    cloud.kubectl_ok(&[
        "-n",
        NS,
        "patch",
        "server",
        "vm1",
        "--type=merge",
        "-p",
        r#"{"spec":{"volumes":[]}}"#,
    ])?;
    wait_until(WAIT, "vdc unplugged", || {
        blklist(node, &dom1)
            .ok()
            .filter(|l| !l.iter().any(|(t, _)| t == "vdc"))
            .map(|_| ())
    })
    .with_context(|| format!("agent log:\n{}", node.agent_log()))?;
    wait_for(cloud, "volume", "data", "volume data released", |v| {
        v["status"].get("attachedTo").is_none() && v["status"]["phase"] == "Available"
    })?;
    let mut head = [0u8; 512];
    std::fs::File::open(&path)?.read_exact_at(&mut head, 0)?;
    assert_eq!(head, partition_table(), "the data outlives the attachment");

    // Grown while detached and at once plugged in again while the guest runs: the compute
    // agent waits for the storage agent's extend, so the guest's kernel finds the disk at
    // 3 GiB (6291456 sectors) and reads the partitions again, and never sees it grow.
    let patch = |kind: &str, name: &str, body: &str| {
        cloud.kubectl_ok(&["-n", NS, "patch", kind, name, "--type=merge", "-p", body])
    };
    patch("volume", "data", r#"{"spec":{"sizeGiB":3}}"#)?;
    patch(
        "server",
        "vm1",
        r#"{"spec":{"volumes":[{"volume":"data"}]}}"#,
    )?;
    wait_until(WAIT, "the partitions read again", || {
        (partition_scans(&node.console(&uid1)) >= 2).then_some(())
    })
    .with_context(|| format!("console of {uid1}:\n{}", node.console(&uid1)))?;
    ensure!(blklist(node, &dom1)?.iter().any(|(_, s)| *s == path));
    assert_eq!(capacity(node, &dom1, "vdc"), Some(3 * GIB));
    console(&uid1, "] 6291456 512-byte logical blocks", 1)?;
    let seen = node.console(&uid1);
    ensure!(
        !seen.contains("new size: 6291456"),
        "the guest saw the disk grow after it was plugged in:\n{seen}"
    );
    assert_eq!(
        json(cloud, &["get", "volume", "data"])?["status"]["attachedTo"],
        "vm1"
    );

    // Boot from a volume made from the tiny image.
    apply(
        cloud,
        &volume_yaml("root", "  bootable: true\n  source:\n    image: tiny\n"),
    )?;
    wait_for(cloud, "volume", "root", "volume root Available", |v| {
        v["status"]["phase"] == "Available"
    })?;
    apply(cloud, &server_yaml("vm3", "  bootVolume: root\n"))?;
    let vm3 = wait_for(cloud, "server", "vm3", "vm3 Running", |s| {
        s["status"]["phase"] == "Running"
    })?;
    let uid3 = vm3["metadata"]["uid"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    console(&uid3, "STRATUS-GUEST-READY hostname=vm3", 1)?;
    let root_path = json(cloud, &["get", "volume", "root"])?["status"]["devicePath"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    ensure!(
        blklist(node, &format!("stratus-{uid3}"))?.contains(&("vda".into(), root_path)),
        "the volume is the root disk"
    );
    // Grown while its guest runs: the file QEMU holds grows by QEMU's resize, the guest's
    // kernel sees its root disk at 2 GiB, and the volume says so.
    patch("volume", "root", r#"{"spec":{"sizeGiB":2}}"#)?;
    console(&uid3, "new size: 4194304", 1)?;
    wait_for(cloud, "volume", "root", "volume root at 2 GiB", |v| {
        v["status"]["sizeGiB"] == 2 && v["status"]["phase"] == "InUse"
    })?;

    // Servers deleted: their volumes are released once their guests are gone, and then go.
    cloud.kubectl_ok(&[
        "-n",
        NS,
        "delete",
        "server",
        "vm1",
        "vm3",
        "--wait=true",
        "--timeout=240s",
    ])?;
    delete_once_released(cloud, NS, &["data", "root", "contested"])?;
    ensure!(
        std::fs::read_dir(pool)?
            .flatten()
            .all(|e| !e.file_name().to_string_lossy().starts_with("volume-")),
        "the pool is empty"
    );
    ensure!(node.domains()?.is_empty(), "{:?}", node.domains());
    Ok(())
}

/// A volume group on a loop device over a sparse file of the test's, removed with every loop
/// device over it when dropped.
pub(super) struct Vg {
    _dir: tempfile::TempDir,
    pub(super) name: String,
    pv: PathBuf,
}

impl Vg {
    pub(super) fn new(name: &str, size: u64) -> Result<Self> {
        use super::storage_agent::{lvm, run};
        let dir = tempfile::tempdir()?;
        let img = dir.path().join("pv.img");
        std::fs::File::create(&img)?.set_len(size)?;
        let pv =
            PathBuf::from(run("losetup", &["--find", "--show", &img.to_string_lossy()])?.trim());
        let vg = Self {
            _dir: dir,
            name: name.into(),
            pv,
        };
        lvm("pvcreate", &["-y", &vg.pv.to_string_lossy()])?;
        lvm("vgcreate", &[&vg.name, &vg.pv.to_string_lossy()])?;
        Ok(vg)
    }
}

impl Drop for Vg {
    fn drop(&mut self) {
        use super::storage_agent::{loops_over, lvm, run};
        for dev in loops_over(&self.pv).unwrap_or_default() {
            let _ = run("losetup", &["--detach", &dev]);
        }
        let _ = lvm("vgremove", &["-f", &self.name]);
        let _ = lvm("pvremove", &["-y", &self.pv.to_string_lossy()]);
        let _ = run("losetup", &["--detach", &self.pv.to_string_lossy()]);
    }
}

/// An LVM pool without device-mapper (a volume is a loop device over its extents) says it
/// grows a volume in use where the space after it is free: an attached volume grows under
/// its running guest, which sees the new size on the same device; with the extents after it
/// taken, the API takes the grow and the volume says why it waits (served at its size), and
/// it grows once detached, its data kept.
#[test]
fn an_lvm_volume_grows_under_its_guest_where_the_space_follows() -> Result<()> {
    const NS: &str = "lvmvols";
    let dm = std::fs::read_to_string("/proc/misc").is_ok_and(|m| m.contains("device-mapper"));
    let vg = Vg::new(&format!("stratus-e2e-held-{}", std::process::id()), 8 * GIB)?;
    let one = OneNode::start_with("vl", NS, "", &[format!("fast=lvm:{}", vg.name)])?;
    let (cloud, node) = (&one.cloud, &one.node);
    let json = |args: &[&str]| -> Result<Value> {
        let mut a = vec!["-n", NS];
        a.extend_from_slice(args);
        a.extend(["-o", "json"]);
        Ok(serde_json::from_str(&cloud.kubectl_ok(&a)?)?)
    };
    let wait_vol = |name: &str, what: &str, ok: &dyn Fn(&Value) -> bool| -> Result<Value> {
        wait_until(WAIT, what, || {
            json(&["get", "volume", name]).ok().filter(|v| ok(v))
        })
        .with_context(|| format!("storage agent log:\n{}", storage_log(node)))
    };
    let patch = |kind: &str, name: &str, body: &str| {
        cloud.kubectl_ok(&["-n", NS, "patch", kind, name, "--type=merge", "-p", body])
    };
    let said = wait_until(
        WAIT,
        "pool fast reports how it grows volumes in use",
        || {
            let p: Value = serde_json::from_str(
                &cloud
                    .kubectl_ok(&["get", "storagepool", "fast", "-o", "json"])
                    .ok()?,
            )
            .ok()?;
            p["status"]["growsInUse"].as_str().map(str::to_owned)
        },
    )?;
    assert_eq!(said, if dm { "Always" } else { "WhenSpaceFollows" });

    let on_fast = "  storagePool: fast\n";
    cloud.kubectl_in(
        &["-n", NS, "apply", "-f", "-"],
        &volume_yaml("held", on_fast),
    )?;
    let vol = wait_vol("held", "volume held Available", &|v| {
        v["status"]["phase"] == "Available" && v["status"]["devicePath"].is_string()
    })?;
    let device = vol["status"]["devicePath"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    OpenOptions::new()
        .write(true)
        .open(&device)?
        .write_all_at(b"held volume data", 0)?;
    cloud.kubectl_in(
        &["-n", NS, "apply", "-f", "-"],
        &server_yaml("vm", "  image: tiny\n  volumes:\n  - volume: held\n"),
    )?;
    let vm = wait_until(WAIT, "vm Running", || {
        json(&["get", "server", "vm"])
            .ok()
            .filter(|s| s["status"]["phase"] == "Running")
    })?;
    let uid = vm["metadata"]["uid"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let dom = format!("stratus-{uid}");
    let console = |what: &str| {
        wait_until(WAIT, what, || {
            node.console(&uid).contains(what).then_some(())
        })
        .with_context(|| format!("console of {uid}:\n{}", node.console(&uid)))
    };
    console("[vdc] 2097152 512-byte logical blocks")?;

    // The extents after it are free: it grows where it is, on the device the guest holds.
    patch("volume", "held", r#"{"spec":{"sizeGiB":2}}"#)?;
    wait_until(WAIT, "the guest's disk at 2 GiB", || {
        (capacity(node, &dom, "vdc") == Some(2 * GIB)).then_some(())
    })
    .with_context(|| format!("agent logs:\n{}\n{}", node.agent_log(), storage_log(node)))?;
    console("new size: 4194304")?;
    let vol = wait_vol("held", "volume held at 2 GiB", &|v| {
        v["status"]["sizeGiB"] == 2 && v["status"]["phase"] == "InUse"
    })?;
    assert_eq!(
        vol["status"]["devicePath"],
        device.as_str(),
        "the same device"
    );
    ensure!(blklist(node, &dom)?.contains(&("vdc".into(), device.clone())));

    if !dm {
        // Another volume takes the extents right after it: it cannot grow in place, and is
        // not moved under its guest.
        cloud.kubectl_in(
            &["-n", NS, "apply", "-f", "-"],
            &volume_yaml("next", on_fast),
        )?;
        wait_vol("next", "volume next Available", &|v| {
            v["status"]["phase"] == "Available"
        })?;
        patch("volume", "held", r#"{"spec":{"sizeGiB":3}}"#)?;
        // Extending while its agent tries, then InUse at its size, saying why.
        let vol = wait_vol("held", "volume held waiting to be detached", &|v| {
            v["status"]["phase"] == "InUse"
                && v["status"]["conditions"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|c| c["type"] == "Ready" && c["reason"] == "GrowsWhenDetached")
        })?;
        let ready = vol["status"]["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c["type"] == "Ready")
            .cloned()
            .unwrap_or_default();
        let message = ready["message"].as_str().unwrap_or_default();
        assert!(
            message.contains("are not free") && message.contains("grows once detached"),
            "{ready}"
        );
        assert_eq!(vol["status"]["sizeGiB"], 2, "{vol}");
        assert_eq!(capacity(node, &dom, "vdc"), Some(2 * GIB));

        // Detached, it moves and grows, its data kept.
        patch("server", "vm", r#"{"spec":{"volumes":[]}}"#)?;
        let vol = wait_vol("held", "volume held detached and at 3 GiB", &|v| {
            v["status"]["sizeGiB"] == 3 && v["status"]["phase"] == "Available"
        })?;
        let path = vol["status"]["devicePath"].as_str().unwrap_or_default();
        let mut head = [0u8; 16];
        std::fs::File::open(path)?.read_exact_at(&mut head, 0)?;
        assert_eq!(&head, b"held volume data");
    }

    cloud.kubectl_ok(&[
        "-n",
        NS,
        "delete",
        "server",
        "vm",
        "--wait=true",
        "--timeout=240s",
    ])?;
    delete_once_released(cloud, NS, if dm { &["held"] } else { &["held", "next"] })?;
    ensure!(
        super::storage_agent::lvs(&vg.name)?.is_empty(),
        "the volumes' LVs are gone"
    );
    drop(one);
    Ok(())
}

/// Deletes `volumes` of project `ns` once no server holds them (their servers deleted, the
/// guests gone), and waits for them to go.
pub(super) fn delete_once_released(cloud: &Cloud, ns: &str, volumes: &[&str]) -> Result<()> {
    for name in volumes {
        wait_until(WAIT, &format!("volume {name} released"), || {
            let got = cloud
                .kubectl_ok(&["-n", ns, "get", "volume", name, "-o", "json"])
                .ok()?;
            let v: Value = serde_json::from_str(&got).ok()?;
            v["status"].get("attachedTo").is_none().then_some(())
        })?;
        cloud.kubectl_ok(&[
            "-n",
            ns,
            "delete",
            "volume",
            name,
            "--wait=true",
            "--timeout=240s",
        ])?;
    }
    Ok(())
}

/// The storage agent's log of `node`.
fn storage_log(node: &Node) -> String {
    std::fs::read_to_string(node.dir.path().join("storage-agent.log")).unwrap_or_default()
}
