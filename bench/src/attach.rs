//! A volume hot-plugged into a running TCG guest: a Volume on a file pool (made by the storage
//! agent) attached to a running Server by adding it to `spec.volumes` until the disk is in the
//! domain as libvirt holds it, and detached until it is gone, side by side in one run with the
//! same done by hand on the same libvirtd: `qemu-img create` of a raw file in the same pool
//! directory and `virsh attach-device --persistent` / `detach-device` of the same disk XML the
//! compute agent writes, into a running guest of the same kind defined by hand (the compute
//! agent unplugs from its own domains any disk their Server does not name).
//!
//! Local: the pool is on the compute node. Remote (`--remote`): the pool is on a storage node
//! whose agent exports the volume over NBD (`qemu-nbd` and its nftables rule) to the compute
//! node, whose libvirtd lives in a network namespace of its own joined to the host's by a veth
//! pair of the benchmark's (addresses and names no test uses); the reference serves its file
//! with `qemu-nbd` by hand and plugs in the same `<disk type='network'>`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use kube::api::{Api, DynamicObject, Patch, PatchParams};
use kube::discovery::ApiResource;
use serde_json::json;
use stratus_agents::compute::driver::VolumeDisk;
use stratus_agents::compute::driver::xml::{DomainKind, domain_xml, nbd_path, volume_disk_xml};
use stratus_api_types::storage::Volume;
use stratus_e2e::node::{Guest, Node};
use stratus_e2e::{Cloud, Proc, stratus_bin, wait_until};

use crate::storage::{make, median, ratio, remove, row, run, volume};
use crate::tcg::{has_marker, reference_domain};

/// Names and addresses of one benchmark's cloud: its compute node, project and Server, and
/// its storage network (none a test uses; each benchmark has its own, so two can run at once).
pub(crate) struct Site {
    /// The compute node (its libvirtd in namespaces of its own), and the project and Server.
    pub(crate) node: &'static str,
    pub(crate) ns: &'static str,
    pub(crate) server: &'static str,
    /// The storage node (its storage agent alone, in the host's namespace) and the storage
    /// network: its address on the host's end of the veth pair, the compute node's in its
    /// libvirtd's namespace.
    pub(crate) storage_node: &'static str,
    pub(crate) storage_ip: &'static str,
    pub(crate) compute_ip: &'static str,
    pub(crate) host_link: &'static str,
    pub(crate) node_link: &'static str,
    /// The storage agent's nftables table on `storage_ip`.
    pub(crate) table: &'static str,
}

const SITE: Site = Site {
    node: "bench-attach",
    ns: "bench-attach",
    server: "bench-vm",
    storage_node: "bench-attach-st",
    storage_ip: "10.251.201.1",
    compute_ip: "10.251.201.2",
    host_link: "bench-st0",
    node_link: "bench-cn0",
    table: "stratus_nbd_10_251_201_1",
};
/// Generous bounds for one step: TCG guests and builds share two cores.
pub(crate) const WAIT: Duration = Duration::from_secs(300);
/// How often the domain's disks are looked at (the same for both sides).
const POLL: Duration = Duration::from_millis(20);
/// The hand-made guest the reference plugs its disk into.
const REF_DOMAIN: &str = "bench-attach-ref";
/// The volume's disk in either guest (after the root disk and the config drive).
const TARGET: &str = "vdc";
/// The reference's `qemu-nbd` port on the storage address, outside the agent's export ports
/// (10809-10999) and the kernel's ephemeral ones.
const REF_PORT: u16 = 10700;
/// What the tiny guest prints on its console once its init runs.
const MARKER: &str = "STRATUS-GUEST-READY";

/// The targets of the domain's disks, as `virsh domblklist` shows them.
fn targets(node: &Node, domain: &str) -> Result<Vec<String>> {
    let out = node.virsh(&["domblklist", domain])?;
    ensure!(
        out.status.success(),
        "virsh domblklist: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .skip(2)
        .filter_map(|l| l.split_whitespace().next().map(String::from))
        .collect())
}

/// Waits until the domain holds the volume's disk (`present`) or does not (`!present`).
async fn until_disk(node: &Node, domain: &str, present: bool) -> Result<()> {
    let t = Instant::now();
    loop {
        if targets(node, domain)?.iter().any(|s| s == TARGET) == present {
            return Ok(());
        }
        ensure!(
            t.elapsed() < WAIT,
            "{domain}: disk {TARGET} {} after {WAIT:?}\nagent log:\n{}",
            if present {
                "not attached"
            } else {
                "still attached"
            },
            node.agent_log()
        );
        tokio::time::sleep(POLL).await;
    }
}

/// The Servers of `ns`.
pub(crate) fn servers(client: &kube::Client, ns: &str) -> Api<DynamicObject> {
    Api::namespaced_with(
        client.clone(),
        ns,
        &ApiResource::erase::<stratus_api_types::compute::Server>(&()),
    )
}

/// Sets Server `server`'s `spec.volumes` to `volumes`.
pub(crate) async fn set_volumes(
    api: &Api<DynamicObject>,
    server: &str,
    volumes: &[&str],
) -> Result<()> {
    let list: Vec<_> = volumes.iter().map(|v| json!({"volume": v})).collect();
    api.patch(
        server,
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"volumes": list}})),
    )
    .await?;
    Ok(())
}

/// `virsh attach-device` or `detach-device` of `xml`, live and in the definition, as the
/// compute agent does for a running persistent domain.
fn virsh_device(node: &Node, verb: &str, domain: &str, xml: &Path) -> Result<()> {
    let xml = xml.to_str().context("a UTF-8 path")?;
    virsh_ok(node, &[verb, domain, xml, "--persistent"])
}

fn virsh_ok(node: &Node, args: &[&str]) -> Result<()> {
    let out = node.virsh(args)?;
    ensure!(
        out.status.success(),
        "virsh {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// What the remote case leaves on the host, removed however the benchmark ends: the veth
/// pair (with its host end), the exports' `qemu-nbd` processes (by the pids the storage agent
/// recorded, and the reference's), and the agent's nftables table.
pub(crate) struct Remote {
    exports: PathBuf,
    reference_pid: PathBuf,
    host_link: &'static str,
    table: &'static str,
}

impl Remote {
    /// Joins `node`'s network namespace (its libvirtd's) to the host's by `site`'s veth pair.
    fn join(node: &Node, storage_dir: &Path, site: &Site) -> Result<Self> {
        let remote = Self {
            exports: storage_dir.join("storage-state/exports"),
            reference_pid: storage_dir.join("reference-nbd.pid"),
            host_link: site.host_link,
            table: site.table,
        };
        node.join_host(
            site.host_link,
            &format!("{}/30", site.storage_ip),
            site.node_link,
            &format!("{}/30", site.compute_ip),
        )?;
        Ok(remote)
    }

    /// Stops the reference's `qemu-nbd`, if it runs.
    fn stop_reference(&self) {
        if let Ok(pid) = std::fs::read_to_string(&self.reference_pid) {
            let _ = Command::new("kill").arg(pid.trim()).status();
            let _ = std::fs::remove_file(&self.reference_pid);
        }
    }
}

impl Drop for Remote {
    fn drop(&mut self) {
        self.stop_reference();
        for entry in std::fs::read_dir(&self.exports)
            .into_iter()
            .flatten()
            .flatten()
        {
            let record = std::fs::read(entry.path())
                .ok()
                .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok());
            if let Some(pid) = record.as_ref().and_then(|r| r["pid"].as_u64()) {
                let _ = Command::new("kill").arg(pid.to_string()).status();
            }
        }
        let _ = Command::new("nft")
            .args(["delete", "table", "inet", self.table])
            .status();
        let _ = Command::new("ip")
            .args(["link", "del", self.host_link])
            .status();
    }
}

/// How the compute node takes the storage node's volumes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Nbd {
    /// No storage node: the compute node's own pool alone.
    None,
    /// Over NBD in the clear (`--nbd-insecure` on both nodes).
    Insecure,
    /// Over NBD with TLS: each node's certificate from the cloud's NBD CA.
    Tls,
}

/// One benchmark's cloud, as `stratus-bench storage-attach` and `storage-write` run it: a
/// compute node (its own libvirtd in namespaces of its own, as the e2e tests' nodes) running
/// the compute agent, and `stratus up` for it (and for the storage node, when there is one,
/// reached over the storage network of [`Remote`]), with a Server of the tiny test guest
/// running. The storage agents, which the caller starts ([`Bed::storage_agent`]), go before
/// it. Dropped, everything goes in this order: the cloud, the storage network and what it
/// served, the storage node's directory, the compute node (its guests and libvirtd), the
/// guest's file server.
pub(crate) struct Bed {
    pub(crate) cloud: Cloud,
    pub(crate) network: Option<Remote>,
    /// The storage node's directory: its agent's state and log (and its pool, the caller's).
    pub(crate) storage_dir: tempfile::TempDir,
    pub(crate) node: Node,
    pub(crate) guest: Guest,
    /// The running Server's uid.
    pub(crate) uid: String,
    pub(crate) site: &'static Site,
    nbd: Nbd,
}

impl Bed {
    /// Starts it all and waits for the Server to be Running; with `shell`, its guest gives a
    /// root shell on its console ([`Guest::shell_images_yaml`]).
    pub(crate) fn up(site: &'static Site, nbd: Nbd, shell: bool) -> Result<Self> {
        let guest = Guest::serve()?;
        let mut node = Node::start(site.node)?;
        // The storage node: a directory of its own, no libvirtd.
        let storage_dir = tempfile::tempdir()?;
        let remote = nbd != Nbd::None;
        let network = if remote {
            Some(Remote::join(&node, storage_dir.path(), site)?)
        } else {
            None
        };
        let nodes = if remote {
            format!("{},{}", site.node, site.storage_node)
        } else {
            site.node.to_string()
        };
        let cloud = Cloud::up_with(&["--nodes", &nodes])?;
        cloud.projects(&[site.ns])?;
        if nbd == Nbd::Tls {
            // The storage node's certificate names its storage address; the compute node's
            // goes where its libvirtd reads it.
            cloud.nbd_certificate(
                site.storage_node,
                Some(site.storage_ip),
                &storage_dir.path().join("nbd-tls"),
            )?;
            cloud.nbd_certificate(site.node, None, &node.nbd_tls_dir())?;
        }
        node.start_agent_with(
            &cloud,
            if nbd == Nbd::Insecure {
                &["--nbd-insecure"]
            } else {
                &[]
            },
        )?;
        let flavors = stratus_e2e::repo_root().join("examples/flavors.yaml");
        cloud.kubectl_ok(&["apply", "-f", flavors.to_str().unwrap_or_default()])?;
        let images = if shell {
            guest.shell_images_yaml(site.ns)?
        } else {
            guest.images_yaml(site.ns)?
        };
        cloud.kubectl_in(&["apply", "-f", "-"], &images)?;
        if remote {
            // The compute node's address on the storage network, which its network agent
            // would report (it runs none here): the one address the export lets in.
            wait_until(WAIT, "the compute node's Hypervisor", || {
                cloud.kubectl_ok(&["get", "hypervisor", site.node]).ok()
            })?;
            cloud.kubectl_ok(&[
                "patch",
                "hypervisor",
                site.node,
                "--subresource=status",
                "--type=merge",
                "-p",
                &format!(r#"{{"status":{{"hostIP":"{}"}}}}"#, site.compute_ip),
            ])?;
        }
        cloud.kubectl_in(
            &["-n", site.ns, "apply", "-f", "-"],
            &format!(
                "apiVersion: compute.stratus.dev/v1\nkind: Server\nmetadata:\n  name: {}\nspec:\n  flavor: m1.nano\n  image: tiny\n",
                site.server
            ),
        )?;
        let uid = wait_until(WAIT, "the server Running", || {
            let out = cloud
                .kubectl_ok(&["-n", site.ns, "get", "server", site.server, "-o", "json"])
                .ok()?;
            let s: serde_json::Value = serde_json::from_str(&out).ok()?;
            (s["status"]["phase"] == "Running")
                .then(|| s["metadata"]["uid"].as_str().map(String::from))?
        })?;
        Ok(Self {
            cloud,
            network,
            storage_dir,
            node,
            guest,
            uid,
            site,
            nbd,
        })
    }

    /// The Server's domain.
    pub(crate) fn domain(&self) -> String {
        format!("stratus-{}", self.uid)
    }

    /// The directory of the storage node's pool (`remote`) or of the compute node's.
    pub(crate) fn pool_dir(&self, remote: bool) -> &Path {
        if remote {
            self.storage_dir.path()
        } else {
            self.node.dir.path()
        }
    }

    /// A storage agent serving `pool` (`NAME=BACKEND:WHERE`), its state and log in
    /// [`Bed::pool_dir`]: the storage node's (`remote`: exporting on the storage address, in
    /// the clear or over TLS as the compute node takes them), or the compute node's own.
    pub(crate) fn storage_agent(&self, remote: bool, pool: &str) -> Result<Proc> {
        let (node, dir) = if remote {
            (self.site.storage_node, self.storage_dir.path())
        } else {
            (self.site.node, self.node.dir.path())
        };
        let mut cmd = Command::new(stratus_bin());
        cmd.args(["agent", "--roles", "storage", "--node", node])
            .arg("--kubeconfig")
            .arg(
                self.cloud
                    .dir
                    .path()
                    .join(format!("node-{node}.kubeconfig")),
            )
            .arg("--state-dir")
            .arg(dir.join("storage-state"))
            .args(["--storage-pool", pool])
            .args(["--storage-heartbeat-seconds", "1"]);
        if remote {
            cmd.args(["--storage-address", self.site.storage_ip]);
            match self.nbd {
                // Over NBD in the clear, as the reference's qemu-nbd by hand serves it.
                Nbd::Insecure => {
                    cmd.arg("--nbd-insecure");
                }
                Nbd::Tls => {
                    cmd.arg("--nbd-tls-dir").arg(dir.join("nbd-tls"));
                }
                Nbd::None => anyhow::bail!("no storage node without a storage network"),
            }
        }
        Proc::spawn("storage agent", &mut cmd, &dir.join("storage-agent.log"))
    }
}

/// lvm2 without device-mapper where the kernel has none (as the storage agent runs it).
fn lvm(program: &str, args: &[&str]) -> Result<String> {
    let mut all = if device_mapper() {
        vec![]
    } else {
        vec!["--driverloaded", "n"]
    };
    all.extend_from_slice(args);
    run(program, &all)
}

fn device_mapper() -> bool {
    std::fs::read_to_string("/proc/misc").is_ok_and(|m| m.contains("device-mapper"))
}

/// A bytes figure of an lvm2 report (`--units b --nosuffix`).
fn report_bytes(text: &str) -> Result<u64> {
    text.trim()
        .parse()
        .with_context(|| format!("lvm2 reported {text:?}"))
}

/// The LVM pool of `--lvm`: a volume group of the benchmark's own name on a loop device over
/// a sparse file, removed (with every loop device over it) when dropped.
struct VolumeGroup {
    vg: String,
    pv: String,
}

impl VolumeGroup {
    fn new(dir: &Path) -> Result<Self> {
        let img = dir.join("pv.img");
        std::fs::File::create(&img)?.set_len(16 << 30)?;
        let img = img.to_str().context("a UTF-8 path")?;
        let group = Self {
            vg: format!("stratus-bench-attach-{}", std::process::id()),
            pv: run("losetup", &["--find", "--show", img])?
                .trim()
                .to_string(),
        };
        lvm("pvcreate", &["-y", &group.pv])?;
        lvm("vgcreate", &[&group.vg, &group.pv])?;
        Ok(group)
    }

    /// Loop devices over the group's PV (the volumes' data, without device-mapper).
    fn loops(&self) -> Vec<String> {
        run(
            "losetup",
            &["--associated", &self.pv, "--noheadings", "--output", "NAME"],
        )
        .unwrap_or_default()
        .lines()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
        .collect()
    }

    /// The reference: `lvcreate` of a 1 GiB LV made as the storage agent makes one, and its
    /// block device (without device-mapper, a loop device over its extents on the PV).
    fn create(&self, name: &str) -> Result<String> {
        if device_mapper() {
            lvm("lvcreate", &["-y", "-L", "1G", "-n", name, &self.vg])?;
            return Ok(format!("/dev/{}/{name}", self.vg));
        }
        lvm(
            "lvcreate",
            &[
                "-y",
                "--activate",
                "n",
                "--zero",
                "n",
                "--alloc",
                "contiguous",
                "-L",
                "1G",
                "-n",
                name,
                &self.vg,
            ],
        )?;
        let field = |program: &str, field: &str, of: &str| -> Result<u64> {
            report_bytes(&lvm(
                program,
                &[
                    "--noheadings",
                    "--units",
                    "b",
                    "--nosuffix",
                    "-o",
                    field,
                    of,
                ],
            )?)
        };
        let lv = format!("{}/{name}", self.vg);
        let extent = field("vgs", "vg_extent_size", &self.vg)?;
        let start = field("pvs", "pe_start", &self.pv)?;
        // One contiguous segment: `PV:FIRST-LAST`.
        let ranges = lvm("lvs", &["--noheadings", "-o", "seg_pe_ranges", &lv])?;
        let first: u64 = ranges
            .trim()
            .rsplit_once(':')
            .and_then(|(_, r)| r.split_once('-'))
            .and_then(|(first, _)| first.parse().ok())
            .with_context(|| format!("the extents of {lv}: {ranges:?}"))?;
        let offset = (start + first * extent).to_string();
        let size = (1u64 << 30).to_string();
        let args = [
            "--find",
            "--show",
            "--offset",
            &offset,
            "--sizelimit",
            &size,
        ];
        Ok(run("losetup", &[&args[..], &[self.pv.as_str()]].concat())?
            .trim()
            .to_string())
    }

    /// The reference's delete: the loop device (without device-mapper), then `lvremove`.
    fn remove(&self, name: &str, device: &str) -> Result<()> {
        if device.starts_with("/dev/loop") {
            run("losetup", &["--detach", device])?;
        }
        lvm("lvremove", &["-y", &format!("{}/{name}", self.vg)])?;
        Ok(())
    }
}

impl Drop for VolumeGroup {
    fn drop(&mut self) {
        for dev in self.loops() {
            let _ = run("losetup", &["--detach", &dev]);
        }
        let _ = lvm("vgremove", &["-f", &self.vg]);
        let _ = lvm("pvremove", &["-y", &self.pv]);
        let _ = run("losetup", &["--detach", &self.pv]);
    }
}

/// `stratus-bench storage-attach [--remote | --lvm]`: `rounds` volumes, each made, attached to the
/// running guest, detached and deleted, alternating with the same by hand.
pub async fn bench(rounds: usize, remote: bool, lvm_pool: bool) -> Result<()> {
    let bed = Bed::up(&SITE, if remote { Nbd::Insecure } else { Nbd::None }, false)?;
    let (node, guest, uid) = (&bed.node, &bed.guest, &bed.uid);
    let pool_dir = bed.pool_dir(remote);
    let pool = pool_dir.join("pool");
    std::fs::create_dir_all(&pool)?;
    let group = if lvm_pool {
        Some(VolumeGroup::new(pool_dir)?)
    } else {
        None
    };
    let pool_arg = match &group {
        Some(g) => format!("fast=lvm:{}", g.vg),
        None => format!("files=file:{}", pool.display()),
    };
    let storage = bed.storage_agent(remote, &pool_arg)?;
    let domain = bed.domain();
    // The reference's guest: the same kind of domain, defined (persistent, as the agent's
    // are) and started by hand.
    let ref_dir = node.dir.path().join("reference");
    std::fs::create_dir_all(&ref_dir)?;
    let spec = reference_domain(
        guest,
        &ref_dir,
        REF_DOMAIN.into(),
        "00000000-0000-4000-8000-0000000a77ac".into(),
    )?;
    let ref_xml = ref_dir.join("domain.xml");
    std::fs::write(&ref_xml, domain_xml(&spec, DomainKind::Qemu))?;
    virsh_ok(node, &["define", ref_xml.to_str().context("a UTF-8 path")?])?;
    virsh_ok(node, &["start", REF_DOMAIN])?;
    // Both guests' kernels up, so that they answer an unplug.
    wait_until(WAIT, "the guests' init", || {
        (node.console(uid).contains(MARKER) && has_marker(&spec.console_log)).then_some(())
    })?;

    let client = bed.cloud.client().await?;
    let vols: Api<Volume> = Api::namespaced(client.clone(), SITE.ns);
    let srv = servers(&client, SITE.ns);
    let (mut ours_make, mut ours_attach, mut ours_detach) = (Vec::new(), Vec::new(), Vec::new());
    let (mut ref_make, mut ref_attach, mut ref_detach) = (Vec::new(), Vec::new(), Vec::new());
    let (mut ours_delete, mut ref_delete) = (Vec::new(), Vec::new());
    // Round 0 is a warm-up (the pool's first volume, the guest's first hot-plug): not counted.
    for r in 0..=rounds {
        let name = format!("v-{r}");
        let (made, _) = make(&vols, &volume(&name, 1, None)?).await?;
        let t = Instant::now();
        set_volumes(&srv, SITE.server, &[&name]).await?;
        until_disk(node, &domain, true).await?;
        let attached = t.elapsed();
        let t = Instant::now();
        set_volumes(&srv, SITE.server, &[]).await?;
        until_disk(node, &domain, false).await?;
        let detached = t.elapsed();
        // Deleted once the attachment is released (refused until then, not measured).
        let t = Instant::now();
        let deleted = loop {
            match remove(&vols, &name).await {
                Ok(took) => break took,
                Err(e) => {
                    ensure!(t.elapsed() < WAIT, "volume {name} not deleted: {e:#}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        };

        let ref_name = format!("reference-{r}");
        let file = pool.join(format!("{ref_name}.raw"));
        let xml = ref_dir.join("disk.xml");
        let t = Instant::now();
        let file_s = match &group {
            Some(g) => g.create(&ref_name)?,
            None => {
                let f = file.to_str().context("a UTF-8 path")?.to_string();
                run("qemu-img", &["create", "-q", "-f", "raw", &f, "1G"])?;
                f
            }
        };
        let disk_path = match &bed.network {
            None => PathBuf::from(&file_s),
            Some(net) => {
                // Served as the storage agent serves an export: one client, raw, by name;
                // `--fork` returns once it listens.
                let export = format!("reference-{r}");
                let pid_file = net.reference_pid.to_str().context("a UTF-8 path")?;
                run(
                    "qemu-nbd",
                    &[
                        "--fork",
                        "--pid-file",
                        pid_file,
                        "--bind",
                        SITE.storage_ip,
                        "--port",
                        &REF_PORT.to_string(),
                        "--export-name",
                        &export,
                        "--format",
                        "raw",
                        "--shared",
                        "1",
                        "--persistent",
                        &file_s,
                    ],
                )?;
                nbd_path(SITE.storage_ip.parse()?, REF_PORT, &export, false)
            }
        };
        let ref_made = t.elapsed();
        std::fs::write(
            &xml,
            volume_disk_xml(&VolumeDisk {
                path: disk_path,
                target: TARGET.into(),
                serial: format!("reference{r}"),
                shareable: false,
            }),
        )?;
        let t = Instant::now();
        virsh_device(node, "attach-device", REF_DOMAIN, &xml)?;
        until_disk(node, REF_DOMAIN, true).await?;
        let ref_attached = t.elapsed();
        let t = Instant::now();
        virsh_device(node, "detach-device", REF_DOMAIN, &xml)?;
        until_disk(node, REF_DOMAIN, false).await?;
        let ref_detached = t.elapsed();
        let t = Instant::now();
        if let Some(net) = &bed.network {
            net.stop_reference();
        }
        match &group {
            Some(g) => g.remove(&ref_name, &file_s)?,
            None => std::fs::remove_file(&file)?,
        }
        let ref_deleted = t.elapsed();

        if r > 0 {
            ours_make.push(made);
            ours_attach.push(attached);
            ours_detach.push(detached);
            ref_make.push(ref_made);
            ref_attach.push(ref_attached);
            ref_detach.push(ref_detached);
            ours_delete.push(deleted);
            ref_delete.push(ref_deleted);
        }
    }
    let sum = |a: &[Duration], b: &[Duration]| -> Vec<Duration> {
        a.iter().zip(b).map(|(x, y)| *x + *y).collect()
    };
    let (ours_total, ref_total) = (sum(&ours_make, &ours_attach), sum(&ref_make, &ref_attach));

    let (case, ref_make_label, ref_delete_label) = match (remote, lvm_pool) {
        (true, _) => (
            "another node's 1 GiB file-pool volume over NBD",
            "reference: `qemu-img create -f raw` 1 GiB + `qemu-nbd --fork`",
            "reference: stop `qemu-nbd` + `rm`",
        ),
        (false, true) => (
            "a 1 GiB volume of the node's LVM pool (loop-device VG)",
            "reference: `lvcreate` 1 GiB (+ `losetup --offset` without device-mapper)",
            "reference: (`losetup --detach` +) `lvremove`",
        ),
        (false, false) => (
            "a 1 GiB volume of the node's file pool",
            "reference: `qemu-img create -f raw` 1 GiB",
            "reference: `rm`",
        ),
    };
    println!(
        "| {case} hot-plugged into a running TCG guest, {rounds} rounds, alternating | median | min | max |"
    );
    println!("|---|---|---|---|");
    row(ref_make_label, &ref_make);
    row("Stratus: create Volume → Available", &ours_make);
    row(
        "reference: `virsh attach-device --persistent` → in the domain",
        &ref_attach,
    );
    row(
        "Stratus: Server `spec.volumes` += volume → in the domain",
        &ours_attach,
    );
    row("reference: create + attach", &ref_total);
    row("Stratus: create + attach", &ours_total);
    row(
        "reference: `virsh detach-device --persistent` → gone from the domain",
        &ref_detach,
    );
    row(
        "Stratus: Server `spec.volumes` -= volume → gone from the domain",
        &ours_detach,
    );
    row(ref_delete_label, &ref_delete);
    row("Stratus: delete Volume (detached) → gone", &ours_delete);
    println!();
    let plus = |a: &[Duration], b: &[Duration]| {
        (median(a.to_vec()).as_secs_f64() - median(b.to_vec()).as_secs_f64()) * 1e3
    };
    println!(
        "attach: Stratus {:.2}x the reference ({:+.0} ms); create + attach {:.2}x ({:+.0} ms); detach {:.2}x ({:+.0} ms); create {:.2}x ({:+.0} ms); delete {:.2}x ({:+.0} ms) (medians).",
        ratio(&ours_attach, &ref_attach),
        plus(&ours_attach, &ref_attach),
        ratio(&ours_total, &ref_total),
        plus(&ours_total, &ref_total),
        ratio(&ours_detach, &ref_detach),
        plus(&ours_detach, &ref_detach),
        ratio(&ours_make, &ref_make),
        plus(&ours_make, &ref_make),
        ratio(&ours_delete, &ref_delete),
        plus(&ours_delete, &ref_delete),
    );
    // The guests go before the node's libvirtd.
    srv.delete(SITE.server, &Default::default()).await?;
    virsh_ok(node, &["destroy", REF_DOMAIN])?;
    virsh_ok(node, &["undefine", REF_DOMAIN])?;
    // The agent stops before its volume group goes.
    drop(storage);
    drop(group);
    Ok(())
}
