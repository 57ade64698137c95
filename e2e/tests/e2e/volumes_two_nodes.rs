//! The block-storage suite across nodes, once for each pool backend (an LVM pool on a
//! loop-backed volume group the test makes, and a file pool in a directory it makes). Node A
//! runs the storage agent alone (in the host's namespace); each other node runs the compute
//! agent, its libvirtd (and so QEMU) in a network namespace of its own joined to A's by a veth
//! pair, as hosts on a storage network; every volume is on A's pool and reaches the guests
//! over NBD (TLS). A guest on node B writes to a volume; detached, the volume is snapshotted,
//! a volume is made from the snapshot and another cloned from it, and it is grown; all three
//! are plugged into the running guest, which reads what it wrote from each and finds the
//! grown one at its new size. Meanwhile a server on B boots from a volume of A's pool made
//! from the test guest's image; the volume grows while the guest runs (its root disk moves
//! to the grown volume's export) and while it is off (started again, it is defined on the
//! export served then), the guest seeing each new size; deleting the server keeps the volume. On three nodes, a
//! multi-attach volume of A is held by a guest on B and one on C at once, each node through
//! an export of its own: one writes, the other reads. Each run has names and addresses of its
//! own, so all of them run at once.

use std::collections::BTreeMap;
use std::os::unix::fs::FileExt;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use serde_json::Value;
use stratus_e2e::node::{Guest, Node};
use stratus_e2e::{Cloud, Proc, stratus_bin, wait_until};

use super::volume_attach::{Vg, delete_once_released, server_yaml, volume_yaml};
use super::volume_attach_remote::{Cleanup, Pool, json};

/// Generous: builds and TCG guests of other tests share two cores.
const WAIT: Duration = Duration::from_secs(420);

/// A compute node of a run and its link to the storage node.
struct Consumer {
    name: &'static str,
    /// Its address on the storage network.
    ip: &'static str,
    /// The host's end of its link: the storage address itself, or an address of the link's
    /// own through which the node reaches the storage address.
    host_end: &'static str,
    host_link: &'static str,
    node_link: &'static str,
}

/// One run's project, storage node, storage address and compute nodes.
struct Layout {
    ns: &'static str,
    storage: &'static str,
    storage_ip: &'static str,
    /// The storage agent's nftables table on `storage_ip`.
    table: &'static str,
    consumers: &'static [Consumer],
}

const FILE_SUITE: Layout = Layout {
    ns: "suitefile",
    storage: "sfa",
    storage_ip: "10.251.16.1",
    table: "stratus_nbd_10_251_16_1",
    consumers: &[Consumer {
        name: "sfb",
        ip: "10.251.16.2",
        host_end: "10.251.16.1",
        host_link: "vsu-st0",
        node_link: "vsu-cn0",
    }],
};

const LVM_SUITE: Layout = Layout {
    ns: "suitelvm",
    storage: "sla",
    storage_ip: "10.251.16.5",
    table: "stratus_nbd_10_251_16_5",
    consumers: &[Consumer {
        name: "slb",
        ip: "10.251.16.6",
        host_end: "10.251.16.5",
        host_link: "vsu-st1",
        node_link: "vsu-cn1",
    }],
};

const MULTI: Layout = Layout {
    ns: "suitema",
    storage: "sma",
    storage_ip: "10.251.16.9",
    table: "stratus_nbd_10_251_16_9",
    consumers: &[
        Consumer {
            name: "smb",
            ip: "10.251.16.10",
            host_end: "10.251.16.9",
            host_link: "vsu-st2",
            node_link: "vsu-cn2",
        },
        Consumer {
            name: "smc",
            ip: "10.251.16.14",
            host_end: "10.251.16.13",
            host_link: "vsu-st3",
            node_link: "vsu-cn3",
        },
    ],
};

/// A running cloud of `layout`: the storage node's agent serving `pool`, the compute nodes
/// (each in the availability zone named after it), the project, the flavors and the test
/// guest's Images with a shell on its console. Dropped in the order of the fields.
struct Rig {
    _storage_agent: Proc,
    cloud: Cloud,
    _links: Vec<Cleanup>,
    nodes: Vec<Node>,
    _guest: Guest,
    state: tempfile::TempDir,
    pool: Pool,
    layout: &'static Layout,
}

impl Rig {
    fn start(layout: &'static Layout, pool: Pool) -> Result<Self> {
        let guest = Guest::serve()?;
        let state = tempfile::tempdir()?;
        let mut nodes = Vec::new();
        let mut links = Vec::new();
        for c in layout.consumers {
            let node = Node::start(c.name)?;
            links.push(Cleanup {
                exports: state.path().join("storage-state/exports"),
                host_link: c.host_link,
                table: layout.table,
            });
            node.join_host(
                c.host_link,
                &format!("{}/30", c.host_end),
                c.node_link,
                &format!("{}/30", c.ip),
            )?;
            if c.host_end != layout.storage_ip {
                node.ip(&[
                    "route",
                    "add",
                    &format!("{}/32", layout.storage_ip),
                    "via",
                    c.host_end,
                ])?;
            }
            nodes.push(node);
        }
        let names: Vec<&str> = std::iter::once(layout.storage)
            .chain(layout.consumers.iter().map(|c| c.name))
            .collect();
        let cloud = Cloud::up_with(&["--nodes", &names.join(",")])?;
        cloud.projects(&[layout.ns])?;
        for node in &mut nodes {
            let zone = node.name.clone();
            node.start_agent_with(&cloud, &["--zone", &zone])?;
        }
        // Each node's NBD certificate from the cloud's NBD CA: the storage node's names its
        // storage address, each compute node's goes where its libvirtd reads it.
        let nbd_tls = state.path().join("nbd-tls");
        cloud.nbd_certificate(layout.storage, Some(layout.storage_ip), &nbd_tls)?;
        for node in &nodes {
            cloud.nbd_certificate(&node.name, None, &node.nbd_tls_dir())?;
        }
        let storage_agent = Proc::spawn(
            "storage agent",
            Command::new(stratus_bin())
                .args(["agent", "--roles", "storage", "--node", layout.storage])
                .arg("--kubeconfig")
                .arg(
                    cloud
                        .dir
                        .path()
                        .join(format!("node-{}.kubeconfig", layout.storage)),
                )
                .arg("--state-dir")
                .arg(state.path().join("storage-state"))
                .args(["--storage-pool", &pool.arg()])
                .args(["--storage-address", layout.storage_ip])
                .arg("--nbd-tls-dir")
                .arg(&nbd_tls)
                .args(["--storage-heartbeat-seconds", "1", "--resync-seconds", "2"])
                // The test guest's image is served from loopback.
                .arg("--image-url-allow-loopback"),
            &state.path().join("storage-agent.log"),
        )?;
        let flavors = stratus_e2e::repo_root().join("examples/flavors.yaml");
        cloud.kubectl_ok(&["apply", "-f", flavors.to_str().unwrap_or_default()])?;
        let images = guest.images_yaml(layout.ns)?.replace(
            "console=ttyS0 quiet",
            "console=ttyS0 loglevel=7 stratus.shell",
        );
        cloud.kubectl_in(&["-n", layout.ns, "apply", "-f", "-"], &images)?;
        // Each compute node's address on the storage network, as its network agent reports it.
        for (c, node) in layout.consumers.iter().zip(&nodes) {
            wait_until(WAIT, "the compute node's Hypervisor", || {
                cloud.kubectl_ok(&["get", "hypervisor", c.name]).ok()
            })
            .with_context(|| node.agent_log())?;
            cloud.kubectl_ok(&[
                "patch",
                "hypervisor",
                c.name,
                "--subresource=status",
                "--type=merge",
                "-p",
                &format!(r#"{{"status":{{"hostIP":"{}"}}}}"#, c.ip),
            ])?;
        }
        Ok(Self {
            _storage_agent: storage_agent,
            cloud,
            _links: links,
            nodes,
            _guest: guest,
            state,
            pool,
            layout,
        })
    }

    fn apply(&self, yaml: &str) -> Result<String> {
        self.cloud
            .kubectl_in(&["-n", self.layout.ns, "apply", "-f", "-"], yaml)
    }

    fn kubectl(&self, args: &[&str]) -> Result<String> {
        let mut a = vec!["-n", self.layout.ns];
        a.extend_from_slice(args);
        self.cloud.kubectl_ok(&a)
    }

    fn get(&self, kind: &str, name: &str) -> Result<Value> {
        json(&self.cloud, self.layout.ns, &["get", kind, name])
    }

    /// `kind/name` once `pred` holds of it (shown, with the storage agent's log, if it never
    /// does).
    fn wait(
        &self,
        kind: &str,
        name: &str,
        what: &str,
        pred: impl Fn(&Value) -> bool,
    ) -> Result<Value> {
        wait_until(WAIT, &format!("{kind} {name} {what}"), || {
            self.get(kind, name).ok().filter(|v| pred(v))
        })
        .with_context(|| {
            format!(
                "{}\nstorage agent log:\n{}",
                self.kubectl(&["get", kind, name, "-o", "yaml"])
                    .unwrap_or_default(),
                self.storage_log()
            )
        })
    }

    /// Volume `name` Available on the storage node's pool; its uid.
    fn available(&self, name: &str) -> Result<String> {
        let v = self.wait("volume", name, "Available", |v| {
            v["status"]["phase"] == "Available" && v["status"]["devicePath"].is_string()
        })?;
        assert_eq!(v["status"]["node"], self.layout.storage, "{v}");
        assert_eq!(v["status"]["pool"], self.pool.name(), "{v}");
        Ok(v["metadata"]["uid"]
            .as_str()
            .unwrap_or_default()
            .to_string())
    }

    /// Server `name` Running on compute node `node` (an index of the layout's); its uid and
    /// domain.
    fn running(&self, node: usize, name: &str) -> Result<(String, String)> {
        let server = self
            .wait("server", name, "Running", |s| {
                s["status"]["phase"] == "Running"
            })
            .with_context(|| self.nodes[node].agent_log())?;
        assert_eq!(
            server["status"]["hypervisor"],
            self.nodes[node].name.as_str()
        );
        let uid = server["metadata"]["uid"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let dom = format!("stratus-{uid}");
        Ok((uid, dom))
    }

    /// Waits for `what` on the console of server `uid` on compute node `node`.
    fn console(&self, node: usize, uid: &str, what: &str) -> Result<()> {
        let node = &self.nodes[node];
        wait_until(WAIT, what, || {
            node.console(uid).contains(what).then_some(())
        })
        .with_context(|| format!("console of {uid}:\n{}", node.console(uid)))
    }

    /// The disk of domain `dom` on compute node `node` that holds `what` (a volume's
    /// `<serial>`, the root disk's `<target dev='vda'`) comes over NBD from the storage
    /// address, over TLS.
    fn over_nbd(&self, node: usize, dom: &str, what: &str) -> Result<()> {
        let out = self.nodes[node].virsh(&["dumpxml", dom])?;
        let xml = String::from_utf8_lossy(&out.stdout);
        let disk = xml
            .split("<disk ")
            .find(|d| d.contains(what))
            .with_context(|| format!("no disk holding {what} in {xml}"))?;
        ensure!(
            disk.contains("type='network'")
                && disk.contains("protocol='nbd'")
                && disk.contains("tls='yes'")
                && disk.contains(&format!("<host name='{}'", self.layout.storage_ip)),
            "{disk}"
        );
        Ok(())
    }

    fn storage_log(&self) -> String {
        std::fs::read_to_string(self.state.path().join("storage-agent.log")).unwrap_or_default()
    }
}

/// The serial a guest finds a volume's disk by (the first 20 hex digits of its uid).
fn serial(uid: &str) -> String {
    uid.chars()
        .filter(char::is_ascii_alphanumeric)
        .take(20)
        .collect()
}

/// The `<serial>` element of a volume's disk.
fn in_serial(uid: &str) -> String {
    format!("<serial>{}</serial>", serial(uid))
}

/// The marker the guests write to volumes, at 1 MiB.
const MARKER: &str = "STRATUS-SUITE-DATA";

/// Typed on a guest's shell: one line per disk, `DISK <serial> <sectors> <the marker's bytes
/// at 1 MiB, lowercased>` (lowercased so that the echoed command is not what it prints), then
/// `LISTED-<n>` (computed, for the same reason).
fn list_disks(n: u32) -> String {
    format!(
        "for d in /sys/block/vd?; do echo \"DISK $(cat $d/serial) $(cat $d/size) $(dd if=/dev/${{d##*/}} bs=2 skip=524288 count={} 2>/dev/null | tr A-Z a-z)\"; done; echo LISTED-$((1000+{n}))",
        MARKER.len() / 2
    )
}

/// The disks the guest listed ([`list_disks`]) on `console`: serial → (sectors, data); the
/// last listing of each serial wins.
fn listed_disks(console: &str) -> BTreeMap<String, (u64, String)> {
    console
        .lines()
        .filter_map(|l| {
            let rest = &l[l.find("DISK ")? + 5..];
            let mut w = rest.split_whitespace();
            let serial = w.next()?.to_string();
            let sectors = w.next()?.parse().ok()?;
            Some((serial, (sectors, w.next().unwrap_or_default().to_string())))
        })
        .collect()
}

fn patch(rig: &Rig, kind: &str, name: &str, body: &str) -> Result<String> {
    rig.kubectl(&["patch", kind, name, "--type=merge", "-p", body])
}

#[test]
fn the_file_pool_passes_the_suite_across_nodes() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let pool = dir.path().join("pool");
    std::fs::create_dir_all(&pool)?;
    suite(&FILE_SUITE, Pool::File(pool))
}

#[test]
fn the_lvm_pool_passes_the_suite_across_nodes() -> Result<()> {
    let vg = Vg::new(
        &format!("stratus-e2e-suite-{}", std::process::id()),
        12 << 30,
    )?;
    suite(&LVM_SUITE, Pool::Lvm(vg))
}

/// Snapshot, clone, extend while detached and boot-from-volume, a volume of node A's `pool`
/// used by guests on node B.
fn suite(layout: &'static Layout, pool: Pool) -> Result<()> {
    let rig = Rig::start(layout, pool)?;
    let b = &rig.nodes[0];

    // A volume, and a bootable one made from the test guest's image, both on A's pool.
    rig.apply(&volume_yaml("data", ""))?;
    rig.apply(&volume_yaml(
        "root",
        "  bootable: true\n  source:\n    image: tiny\n",
    ))?;
    let data_uid = rig.available("data")?;
    rig.available("root")?;

    // Two servers on B, booting at once: one with the volume, one from the bootable one.
    rig.apply(&server_yaml(
        "vm",
        "  image: tiny\n  volumes:\n  - volume: data\n",
    ))?;
    rig.apply(&server_yaml("boot", "  bootVolume: root\n"))?;
    let (uid, dom) = rig.running(0, "vm")?;
    let (boot_uid, boot_dom) = rig.running(0, "boot")?;

    // Booted from the volume over NBD: its init reports on the console.
    rig.console(0, &boot_uid, "STRATUS-GUEST-READY hostname=boot")?;
    rig.over_nbd(0, &boot_dom, "<target dev='vda'")?;
    // Grown while it runs: the root disk moves to the export serving the grown volume, and
    // the guest sees 2 GiB (4194304 sectors; the marker it prints is not the command).
    let root_sectors = |gib: u64| format!("ROOT-{}", gib << 21);
    let root_size = "echo ROOT-$(cat /sys/block/vda/size)";
    patch(&rig, "volume", "root", r#"{"spec":{"sizeGiB":2}}"#)?;
    rig.wait("volume", "root", "the boot volume grown to 2 GiB", |v| {
        v["status"]["sizeGiB"] == 2
    })?;
    b.type_until(&boot_uid, &boot_dom, root_size, &root_sectors(2), 10)
        .with_context(|| rig.storage_log())?;
    // Grown while its server is off: started again, its domain is defined anew on the
    // export serving the volume now (the one it was defined with ended), and the guest sees
    // 3 GiB.
    let shells = || b.console(&boot_uid).matches("built-in shell").count();
    let booted = shells();
    // The server powered to `state`, and its phase says so.
    let power = |state: &str| -> Result<Value> {
        let body = format!(r#"{{"spec":{{"powerState":"{state}"}}}}"#);
        patch(&rig, "server", "boot", &body)?;
        rig.wait("server", "boot", state, |s| s["status"]["phase"] == state)
    };
    power("Stopped")?;
    patch(&rig, "volume", "root", r#"{"spec":{"sizeGiB":3}}"#)?;
    rig.wait("volume", "root", "the boot volume grown to 3 GiB", |v| {
        v["status"]["sizeGiB"] == 3
    })?;
    power("Running")?;
    // Typed into only once booted again (its console, appended to, holds the first boot's
    // shell too).
    wait_until(WAIT, "the boot server's shell after its start", || {
        (shells() > booted).then_some(())
    })?;
    b.type_until(&boot_uid, &boot_dom, root_size, &root_sectors(3), 10)?;
    // Deleting its server keeps the volume.
    rig.kubectl(&["delete", "server", "boot", "--wait=false"])?;

    // The guest writes to its volume, over NBD (the marker it prints is computed, so the
    // echoed command is not it).
    rig.over_nbd(0, &dom, &in_serial(&data_uid))?;
    b.type_until(
        &uid,
        &dom,
        &format!(
            "echo {MARKER} | dd of=/dev/vdc bs=512 seek=2048 conv=fsync && echo SUITE-WRITE-$((40+2))"
        ),
        "SUITE-WRITE-42",
        10,
    )?;

    // Detached, it is snapshotted; a volume is made from the snapshot and another cloned
    // from it; then it grows to 2 GiB.
    rig.kubectl(&[
        "patch",
        "server",
        "vm",
        "--type=json",
        "-p",
        r#"[{"op":"remove","path":"/spec/volumes"}]"#,
    ])?;
    rig.wait("volume", "data", "released", |v| {
        v["status"]["attachedTo"].is_null() && v["status"]["phase"] == "Available"
    })?;
    rig.apply(
        "apiVersion: storage.stratus.dev/v1\nkind: VolumeSnapshot\nmetadata:\n  name: snap\nspec:\n  volume: data\n",
    )?;
    rig.wait("volumesnapshot", "snap", "Available", |s| {
        s["status"]["phase"] == "Available"
    })?;
    rig.apply(&volume_yaml("fromsnap", "  source:\n    snapshot: snap\n"))?;
    rig.apply(&volume_yaml("clone", "  source:\n    volume: data\n"))?;
    let snap_uid = rig.available("fromsnap")?;
    let clone_uid = rig.available("clone")?;
    patch(&rig, "volume", "data", r#"{"spec":{"sizeGiB":2}}"#)?;
    rig.wait("volume", "data", "grown to 2 GiB", |v| {
        v["status"]["sizeGiB"] == 2 && v["status"]["phase"] == "Available"
    })?;

    // The boot volume outlived its server, released and whole.
    rig.wait("volume", "root", "released", |v| {
        v["status"]["attachedTo"].is_null() && v["status"]["phase"] == "Available"
    })?;
    wait_until(WAIT, "the boot server gone", || {
        b.domains()
            .ok()
            .filter(|d| !d.contains(&boot_dom))
            .map(|_| ())
    })?;

    // All three plugged into the running guest on B: it reads what it wrote from each, and
    // finds the grown one at 2 GiB.
    patch(
        &rig,
        "server",
        "vm",
        r#"{"spec":{"volumes":[{"volume":"fromsnap"},{"volume":"clone"},{"volume":"data"}]}}"#,
    )?;
    for v in ["fromsnap", "clone", "data"] {
        rig.wait("volume", v, "attached on B", |v| {
            v["status"]["attachedNode"] == b.name.as_str()
        })?;
    }
    let expect = [
        (&snap_uid, 1u64 << 21),
        (&clone_uid, 1 << 21),
        (&data_uid, 1 << 22),
    ];
    let want = MARKER.to_lowercase();
    let mut tries = 0;
    wait_until(WAIT, "the three volumes read in the guest", || {
        // The disks come one by one: listed again until all three show.
        tries += 1;
        b.type_until(
            &uid,
            &dom,
            &list_disks(tries),
            &format!("LISTED-{}", 1000 + tries),
            10,
        )
        .ok()?;
        let disks = listed_disks(&b.console(&uid));
        expect
            .iter()
            .all(|(u, sectors)| disks.get(&serial(u)) == Some(&(*sectors, want.clone())))
            .then_some(())
    })
    .with_context(|| format!("after {tries} listings; console:\n{}", b.console(&uid)))?;
    for u in [&snap_uid, &clone_uid, &data_uid] {
        rig.over_nbd(0, &dom, &in_serial(u))?;
    }

    rig.kubectl(&["delete", "server", "vm", "--wait=false"])?;
    delete_once_released(&rig.cloud, layout.ns, &["fromsnap", "clone"])?;
    rig.kubectl(&[
        "delete",
        "volumesnapshot",
        "snap",
        "--wait=true",
        "--timeout=300s",
    ])?;
    delete_once_released(&rig.cloud, layout.ns, &["data", "root"])?;
    wait_until(WAIT, "the pool empty", || match &rig.pool {
        Pool::File(dir) => std::fs::read_dir(dir)
            .ok()?
            .flatten()
            .all(|e| !e.file_name().to_string_lossy().starts_with("volume-"))
            .then_some(()),
        Pool::Lvm(_) => rig.pool.gone("").then_some(()),
    })?;
    Ok(())
}

/// A multi-attach volume of node A's file pool held by a guest on node B and one on node C
/// at once: each node gets an export of its own; the guest on B writes, the one on C reads.
#[test]
fn a_multi_attach_volume_is_shared_by_guests_on_two_other_nodes() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let pool = dir.path().join("pool");
    std::fs::create_dir_all(&pool)?;
    let rig = Rig::start(&MULTI, Pool::File(pool))?;
    let ns = MULTI.ns;
    rig.apply(&volume_yaml("shared", "  multiAttach: true\n"))?;
    let vol_uid = rig.available("shared")?;
    let zones = ["smb", "smc"];
    for (server, zone) in ["onb", "onc"].into_iter().zip(zones) {
        rig.apply(&server_yaml(
            server,
            &format!("  image: tiny\n  availabilityZone: {zone}\n  volumes:\n  - volume: shared\n"),
        ))?;
    }
    let (b_uid, b_dom) = rig.running(0, "onb")?;
    let (c_uid, c_dom) = rig.running(1, "onc")?;

    // One VolumeExport per consuming node, each served on a port of its own.
    let mut ports = Vec::new();
    for zone in zones {
        let name = format!("{vol_uid}.{zone}");
        let export = wait_until(WAIT, &format!("VolumeExport {name} served"), || {
            json(&rig.cloud, ns, &["get", "volumeexport", &name])
                .ok()
                .filter(|x| x["status"]["port"].is_u64())
        })
        .with_context(|| rig.storage_log())?;
        assert_eq!(export["spec"]["node"], zone, "{export}");
        assert_eq!(export["status"]["host"], MULTI.storage_ip, "{export}");
        ports.push(export["status"]["port"].clone());
    }
    ensure!(ports[0] != ports[1], "{ports:?}");
    let vol = rig.get("volume", "shared")?;
    let nodes: Vec<&str> = vol["status"]["attachments"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|a| a["node"].as_str())
        .collect();
    assert_eq!(nodes, zones, "{vol}");
    rig.over_nbd(0, &b_dom, &in_serial(&vol_uid))?;
    rig.over_nbd(1, &c_dom, &in_serial(&vol_uid))?;

    // The guest on B writes and syncs; the one on C reads it from its own disk, past its
    // page cache (dashes printed as spaces, so that nothing echoed of the command is it).
    rig.nodes[0].type_until(
        &b_uid,
        &b_dom,
        &format!(
            "echo {MARKER} | dd of=/dev/vdc bs=512 seek=2048 conv=fsync && echo SHARED-WRITE-$((40+2))"
        ),
        "SHARED-WRITE-42",
        10,
    )?;
    let path = vol["status"]["devicePath"].as_str().unwrap_or_default();
    let mut data = [0u8; 18];
    std::fs::File::open(path)?.read_exact_at(&mut data, 1 << 20)?;
    ensure!(
        data == MARKER.as_bytes(),
        "the write is not in the volume: {:?}",
        String::from_utf8_lossy(&data)
    );
    rig.nodes[1].type_until(
        &c_uid,
        &c_dom,
        "echo 3 >/proc/sys/vm/drop_caches 2>/dev/null; dd if=/dev/vdc bs=512 skip=2048 count=1 2>/dev/null | head -c 18 | tr - ' '; echo; echo SHARED-READ-$((40+2))",
        "STRATUS SUITE DATA",
        10,
    )?;

    rig.kubectl(&["delete", "server", "onb", "onc", "--wait=false"])?;
    delete_once_released(&rig.cloud, ns, &["shared"])?;
    for zone in zones {
        let name = format!("{vol_uid}.{zone}");
        wait_until(WAIT, &format!("VolumeExport {name} gone"), || {
            rig.cloud
                .kubectl(&["get", "volumeexport", &name, "-o", "name"])
                .ok()
                .filter(|o| String::from_utf8_lossy(&o.stderr).contains("(NotFound)"))
                .map(|_| ())
        })?;
    }
    Ok(())
}
