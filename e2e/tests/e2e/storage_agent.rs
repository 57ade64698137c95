//! The storage agent against a real API server: one node's `stratus agent --roles storage`
//! serving an LVM pool (a volume group on a loop device over a file the test creates; this
//! kernel has no device-mapper, so volumes are reached through loop devices at their
//! extents) and a file pool (a directory). The pools register Ready with their capacity; a
//! pool naming the node that it does not configure is NotReady; Volumes placed on each pool
//! (placement written by the test as the volume scheduler's binding would) go Available with
//! their LV or file and device path; bytes written through the device are in a snapshot, in a
//! volume restored from it and in a clone; a volume grows keeping its data; an LV removed
//! behind the agent's back is reported, not made again empty; deleting everything leaves no
//! LV, file or loop device; an agent killed in the middle of a clone converges when started
//! again, with nothing partial left and the data whole. The agent runs as its node
//! (`system:node:NAME`), so the node authorizer's storage rules are what it goes through.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use stratus_e2e::{Apiserver, Etcd, Proc, stratus_bin, wait_until};

const NS: &str = "stor";
const NODE: &str = "sn1";
/// The project whose public image a volume of [`NS`] is made from.
const PUBLISHER: &str = "stor-pub";
const GIB: u64 = 1 << 30;
/// Generous: builds and guests of other tests share two cores.
const WAIT: Duration = Duration::from_secs(240);

pub(super) fn run(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .env("LVM_SUPPRESS_FD_WARNINGS", "1")
        .output()
        .with_context(|| format!("run {program}"))?;
    if !out.status.success() {
        bail!(
            "{program} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// lvm2 without device-mapper where the kernel has none.
pub(super) fn lvm(program: &str, args: &[&str]) -> Result<String> {
    let dm = std::fs::read_to_string("/proc/misc").is_ok_and(|m| m.contains("device-mapper"));
    let mut all: Vec<&str> = if dm {
        vec![]
    } else {
        vec!["--driverloaded", "n"]
    };
    all.extend_from_slice(args);
    run(program, &all)
}

/// The names of the LVs of `vg`.
pub(super) fn lvs(vg: &str) -> Result<Vec<String>> {
    Ok(lvm("lvs", &["--noheadings", "-o", "lv_name", vg])?
        .lines()
        .map(|l| l.trim().to_owned())
        .filter(|l| !l.is_empty())
        .collect())
}

/// Loop devices over `backing`.
pub(super) fn loops_over(backing: &Path) -> Result<Vec<String>> {
    let out = run(
        "losetup",
        &["--noheadings", "--list", "--output", "NAME,BACK-FILE"],
    )?;
    let backing = std::fs::canonicalize(backing)?;
    Ok(out
        .lines()
        .filter_map(|l| {
            let mut parts = l.split_whitespace();
            let name = parts.next()?;
            let back = parts.next()?;
            (std::fs::canonicalize(back).ok()? == backing).then(|| name.to_owned())
        })
        .collect())
}

/// The volume group and file pool the test made, removed (with every loop device over
/// them) when dropped.
struct Host {
    dir: tempfile::TempDir,
    vg: String,
    pv: PathBuf,
    files: PathBuf,
    /// Where the file pool's filesystem is mounted.
    mount: PathBuf,
}

impl Host {
    fn new() -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let vg = format!("stratus-e2e-{}", std::process::id());
        let img = dir.path().join("pv.img");
        std::fs::File::create(&img)?.set_len(16 * GIB)?;
        let pv =
            PathBuf::from(run("losetup", &["--find", "--show", &img.to_string_lossy()])?.trim());
        // The file pool on a filesystem of its own, as an operator would give it: its
        // capacity (the filesystem's free space) is then the same on every host, whatever the
        // host's own disk has free and whoever else writes to it.
        let fs = dir.path().join("files.img");
        std::fs::File::create(&fs)?.set_len(24 * GIB)?;
        run(
            "mkfs.ext4",
            &[
                "-q",
                "-F",
                "-E",
                "lazy_itable_init=1,lazy_journal_init=1",
                &fs.to_string_lossy(),
            ],
        )?;
        let mount = dir.path().join("filesfs");
        std::fs::create_dir(&mount)?;
        run(
            "mount",
            &[
                "-o",
                "loop",
                &fs.to_string_lossy(),
                &mount.to_string_lossy(),
            ],
        )?;
        let files = mount.join("pool");
        let host = Self {
            dir,
            vg,
            pv,
            files,
            mount,
        };
        std::fs::create_dir(&host.files)?;
        lvm("pvcreate", &["-y", &host.pv.to_string_lossy()])?;
        lvm("vgcreate", &[&host.vg, &host.pv.to_string_lossy()])?;
        Ok(host)
    }

    fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    fn kubeconfig(&self) -> PathBuf {
        self.dir.path().join("node.kubeconfig")
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        for dev in loops_over(&self.pv).unwrap_or_default() {
            let _ = run("losetup", &["--detach", &dev]);
        }
        let _ = lvm("vgremove", &["-f", &self.vg]);
        let _ = lvm("pvremove", &["-y", &self.pv.to_string_lossy()]);
        let _ = run("losetup", &["--detach", &self.pv.to_string_lossy()]);
        let mount = self.mount.to_string_lossy();
        if run("umount", &[&mount]).is_err() {
            let _ = run("umount", &["--lazy", &mount]);
        }
    }
}

/// Gives the node its identity (`system:node:NODE`, a token of its own) and a kubeconfig
/// for it; the API server is restarted to read the token.
fn node_identity(api: &mut Apiserver, host: &Host) -> Result<()> {
    let admin = api.kubeconfig();
    let tokens = admin.with_file_name("tokens.csv");
    let token = format!("{NODE}-token-0123456789abcdef");
    let mut text = std::fs::read_to_string(&tokens)?;
    text.push_str(&format!("{token},system:node:{NODE}\n"));
    std::fs::write(
        host.kubeconfig(),
        std::fs::read_to_string(&admin)?.replace(stratus_e2e::TEST_TOKEN, &token),
    )?;
    std::fs::write(&tokens, text)?;
    api.restart()
}

/// The node's storage agent, running as the node.
fn agent(host: &Host) -> Result<Proc> {
    std::fs::create_dir_all(host.state())?;
    Proc::spawn(
        "storage agent",
        Command::new(stratus_bin())
            .args(["agent", "--roles", "storage", "--node", NODE])
            .arg("--kubeconfig")
            .arg(host.kubeconfig())
            .arg("--state-dir")
            .arg(host.state())
            .args(["--storage-pool", &format!("fast=lvm:{}", host.vg)])
            .args([
                "--storage-pool",
                &format!("files=file:{}", host.files.display()),
            ])
            .args(["--storage-heartbeat-seconds", "1", "--resync-seconds", "2"])
            // The test's images are served from loopback.
            .arg("--image-url-allow-loopback")
            .env("STRATUS_LOG", "info,stratus_storage_agent=debug"),
        &host.dir.path().join(format!(
            "agent-{}.log",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis())
                .unwrap_or_default()
        )),
    )
}

fn get(api: &Apiserver, kind: &str, name: &str, path: &str) -> String {
    api.kubectl_ok(&[
        "-n",
        NS,
        "get",
        kind,
        name,
        "-o",
        &format!("jsonpath={path}"),
    ])
    .unwrap_or_default()
}

fn apply(api: &Apiserver, yaml: &str) -> Result<()> {
    api.kubectl_in(&["-n", NS, "apply", "-f", "-"], yaml)?;
    Ok(())
}

/// Places `kind/name` on pool `pool` of the node: a Volume through the `binding`
/// subresource, as the volume scheduler does; a snapshot is placed by its create's admission
/// on its volume's pool. Where the API has no such placement yet, the test writes it in
/// status as admin, as the placement would.
fn place(api: &Apiserver, kind: &str, name: &str, pool: &str, size: Option<u64>) -> Result<()> {
    if kind == "volume" {
        let bound = api.kubectl_in(
            &[
                "create",
                "--raw",
                &format!("/apis/storage.stratus.dev/v1/namespaces/{NS}/volumes/{name}/binding"),
                "-f",
                "-",
            ],
            &serde_json::json!({"target": {"name": pool}}).to_string(),
        );
        match bound {
            Ok(_) => return Ok(()),
            Err(e) if format!("{e:#}").contains("NotFound") => {}
            Err(e) => return Err(e),
        }
    } else if get(api, kind, name, "{.status.pool}") == pool {
        return Ok(());
    }
    let mut status = serde_json::json!({"pool": pool, "node": NODE, "phase": "Creating"});
    if let Some(s) = size {
        status["sizeGiB"] = s.into();
    }
    let body = serde_json::json!({ "status": status }).to_string();
    api.kubectl_ok(&[
        "-n",
        NS,
        "patch",
        kind,
        name,
        "--subresource=status",
        "--type=merge",
        "-p",
        &body,
    ])?;
    Ok(())
}

fn volume(api: &Apiserver, name: &str, size: u64, source: Option<(&str, &str)>) -> Result<()> {
    let source = source
        .map(|(k, v)| format!("\n  source:\n    {k}: {v}"))
        .unwrap_or_default();
    apply(
        api,
        &format!(
            "apiVersion: storage.stratus.dev/v1\nkind: Volume\nmetadata:\n  name: {name}\nspec:\n  sizeGiB: {size}{source}\n"
        ),
    )
}

fn snapshot(api: &Apiserver, name: &str, of: &str) -> Result<()> {
    apply(
        api,
        &format!(
            "apiVersion: storage.stratus.dev/v1\nkind: VolumeSnapshot\nmetadata:\n  name: {name}\nspec:\n  volume: {of}\n"
        ),
    )
}

/// Waits until `kind/name` is Available; its device path (a snapshot: empty).
fn available(api: &Apiserver, kind: &str, name: &str) -> Result<String> {
    wait_until(WAIT, &format!("{kind} {name} Available"), || {
        (get(api, kind, name, "{.status.phase}") == "Available")
            .then(|| get(api, kind, name, "{.status.devicePath}"))
    })
    .with_context(|| {
        format!(
            "{kind} {name}: {}",
            api.kubectl_ok(&["-n", NS, "get", kind, name, "-o", "yaml"])
                .unwrap_or_default()
        )
    })
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_add((i % 253) as u8) | 1)
        .collect()
}

fn write_at(path: &str, offset: u64, bytes: &[u8]) -> Result<()> {
    let f = OpenOptions::new().write(true).open(path)?;
    f.write_all_at(bytes, offset)?;
    f.sync_all()?;
    Ok(())
}

fn read_at(path: &str, offset: u64, len: usize) -> Result<Vec<u8>> {
    let f = std::fs::File::open(path)?;
    let mut buf = vec![0; len];
    f.read_exact_at(&mut buf, offset)?;
    Ok(buf)
}

fn size_of(path: &str) -> Result<u64> {
    if Path::new(path).is_file() {
        return Ok(std::fs::metadata(path)?.len());
    }
    Ok(run("blockdev", &["--getsize64", path])?.trim().parse()?)
}

fn uid(api: &Apiserver, kind: &str, name: &str) -> String {
    get(api, kind, name, "{.metadata.uid}")
}

fn delete(api: &Apiserver, kind: &str, name: &str) -> Result<()> {
    api.kubectl_ok(&["-n", NS, "delete", kind, name, "--wait=false"])?;
    wait_until(WAIT, &format!("{kind} {name} gone"), || {
        (!api
            .kubectl(&["-n", NS, "get", kind, name])
            .is_ok_and(|o| o.status.success()))
        .then_some(())
    })
}

/// Snapshot, restore, clone and extend on one pool; answers nothing but checks the data.
fn data_survives_every_copy(api: &Apiserver, pool: &str, prefix: &str) -> Result<()> {
    let (v, s, r, c) = (
        format!("{prefix}-v"),
        format!("{prefix}-s"),
        format!("{prefix}-r"),
        format!("{prefix}-c"),
    );
    volume(api, &v, 1, None)?;
    place(api, "volume", &v, pool, None)?;
    let dev = available(api, "volume", &v)?;
    ensure!(size_of(&dev)? == GIB, "{dev} is not 1 GiB");
    ensure!(get(api, "volume", &v, "{.status.sizeGiB}") == "1");
    let first = pattern(17, 1 << 20);
    write_at(&dev, 3 << 20, &first)?;

    // Grows keeping its data (on LVM: into the free space right after it).
    api.kubectl_ok(&[
        "-n",
        NS,
        "patch",
        "volume",
        &v,
        "--type=merge",
        "-p",
        r#"{"spec":{"sizeGiB":2}}"#,
    ])?;
    let dev = wait_until(WAIT, "the volume grown", || {
        (get(api, "volume", &v, "{.status.sizeGiB}") == "2"
            && get(api, "volume", &v, "{.status.phase}") == "Available")
            .then(|| get(api, "volume", &v, "{.status.devicePath}"))
    })?;
    ensure!(size_of(&dev)? == 2 * GIB, "{dev} did not grow");
    ensure!(
        read_at(&dev, 3 << 20, first.len())? == first,
        "data lost growing"
    );
    ensure!(
        read_at(&dev, GIB + (5 << 20), 4096)? == vec![0; 4096],
        "new space not zero"
    );

    snapshot(api, &s, &v)?;
    place(api, "volumesnapshot", &s, pool, Some(2))?;
    available(api, "volumesnapshot", &s)?;
    ensure!(!get(api, "volumesnapshot", &s, "{.status.createdAt}").is_empty());
    let second = pattern(99, 1 << 20);
    write_at(&dev, 3 << 20, &second)?;

    volume(api, &r, 2, Some(("snapshot", &s)))?;
    place(api, "volume", &r, pool, None)?;
    let rdev = available(api, "volume", &r)?;
    ensure!(
        read_at(&rdev, 3 << 20, first.len())? == first,
        "the restored volume lacks the snapshot's data"
    );

    volume(api, &c, 2, Some(("volume", &v)))?;
    place(api, "volume", &c, pool, None)?;
    let cdev = available(api, "volume", &c)?;
    ensure!(
        read_at(&cdev, 3 << 20, second.len())? == second,
        "the clone lacks the volume's data"
    );
    ensure!(read_at(&dev, 3 << 20, second.len())? == second);

    // Grows again now that its snapshot follows it (on LVM without device-mapper: into a
    // copy that takes its place).
    api.kubectl_ok(&[
        "-n",
        NS,
        "patch",
        "volume",
        &v,
        "--type=merge",
        "-p",
        r#"{"spec":{"sizeGiB":3}}"#,
    ])?;
    let dev = wait_until(WAIT, "the volume grown again", || {
        (get(api, "volume", &v, "{.status.sizeGiB}") == "3"
            && get(api, "volume", &v, "{.status.phase}") == "Available")
            .then(|| get(api, "volume", &v, "{.status.devicePath}"))
    })
    .with_context(|| {
        api.kubectl_ok(&["-n", NS, "get", "volume", &v, "-o", "yaml"])
            .unwrap_or_default()
    })?;
    ensure!(size_of(&dev)? == 3 * GIB, "{dev} did not grow again");
    ensure!(
        read_at(&dev, 3 << 20, second.len())? == second,
        "data lost growing again"
    );
    ensure!(read_at(&dev, 2 * GIB + (1 << 20), 4096)? == vec![0; 4096]);
    ensure!(
        read_at(&rdev, 3 << 20, first.len())? == first,
        "the restored volume changed"
    );
    Ok(())
}

#[test]
fn a_storage_agent_serves_lvm_and_file_pools() -> Result<()> {
    let host = Host::new()?;
    let etcd = Etcd::start()?;
    let mut api = Apiserver::start_on(&etcd)?;
    api.projects(&[NS, PUBLISHER])?;
    node_identity(&mut api, &host)?;
    // A pool naming the node that the node does not configure: reported, never touched.
    api.kubectl_in(
        &["apply", "-f", "-"],
        &format!("apiVersion: storage.stratus.dev/v1\nkind: StoragePool\nmetadata:\n  name: stray\nspec:\n  backend: lvm\n  node: {NODE}\n  vgName: operator-vg\n"),
    )?;
    let mut proc = agent(&host)?;

    // Both pools register Ready with their capacity.
    let vg_gib: u64 = lvm(
        "vgs",
        &[
            "--noheadings",
            "--units",
            "b",
            "--nosuffix",
            "-o",
            "vg_size",
            &host.vg,
        ],
    )?
    .trim()
    .parse::<u64>()?
        >> 30;
    // The file pool's filesystem: (all of it, what an unprivileged writer has free), GiB.
    let fs_gib = || -> (u64, u64) {
        let out = run(
            "stat",
            &["-f", "-c", "%b %a %S", &host.files.to_string_lossy()],
        )
        .unwrap_or_default();
        let n: Vec<u64> = out
            .split_whitespace()
            .map(|n| n.parse::<u64>().unwrap_or_default())
            .collect();
        match n[..] {
            [blocks, avail, size] => ((blocks * size) >> 30, (avail * size) >> 30),
            _ => (0, 0),
        }
    };
    let capacity = |pool: &str| {
        api.kubectl_ok(&[
            "get",
            "storagepool",
            pool,
            "-o",
            "jsonpath={.status.phase} {.status.capacityGiB}",
        ])
        .unwrap_or_default()
    };
    wait_until(WAIT, "pool fast Ready", || {
        (capacity("fast") == format!("Ready {vg_gib}")).then_some(())
    })
    .with_context(|| {
        api.kubectl_ok(&["get", "storagepool", "fast", "-o", "yaml"])
            .unwrap_or_default()
    })?;
    // The file pool holds nothing yet: its capacity is the filesystem's free space, not the
    // filesystem's size, which the filesystem's own metadata takes part of.
    wait_until(WAIT, "pool files Ready with the free space", || {
        let (before, got, after) = (fs_gib(), capacity("files"), fs_gib());
        let gib: u64 = got.strip_prefix("Ready ")?.parse().ok()?;
        let (low, high) = (before.1.min(after.1), before.1.max(after.1));
        (gib + 1 >= low && gib <= high + 1 && gib < before.0).then_some(())
    })
    .with_context(|| {
        format!(
            "filesystem (size, free) {:?} GiB: {}",
            fs_gib(),
            api.kubectl_ok(&["get", "storagepool", "files", "-o", "yaml"])
                .unwrap_or_default()
        )
    })?;
    let beat = api.kubectl_ok(&[
        "get",
        "storagepool",
        "fast",
        "-o",
        "jsonpath={.status.lastHeartbeatTime}",
    ])?;
    wait_until(Duration::from_secs(30), "a newer heartbeat", || {
        (api.kubectl_ok(&[
            "get",
            "storagepool",
            "fast",
            "-o",
            "jsonpath={.status.lastHeartbeatTime}",
        ])
        .unwrap_or_default()
            != beat)
            .then_some(())
    })?;
    wait_until(WAIT, "pool stray NotReady", || {
        (api.kubectl_ok(&[
            "get",
            "storagepool",
            "stray",
            "-o",
            "jsonpath={.status.phase} {.status.conditions[0].reason}",
        ])
        .unwrap_or_default()
            == "NotReady NotConfigured")
            .then_some(())
    })?;

    data_survives_every_copy(&api, "fast", "l")?;
    let lv = format!("volume-{}", uid(&api, "volume", "l-v"));
    ensure!(lvs(&host.vg)?.contains(&lv), "no LV {lv}");
    ensure!(
        lvs(&host.vg)?.contains(&format!("snap-{}", uid(&api, "volumesnapshot", "l-s"))),
        "no LV of the snapshot"
    );
    data_survives_every_copy(&api, "files", "f")?;
    let file = host
        .files
        .join(format!("volume-{}.raw", uid(&api, "volume", "f-v")));
    ensure!(file.is_file(), "no file {}", file.display());
    ensure!(
        get(&api, "volume", "f-v", "{.status.devicePath}") == file.to_string_lossy(),
        "a file volume's device is its file"
    );
    // What the file pool holds is let go now: deleting a volume and its snapshot removes
    // their files.
    for (kind, name) in [
        ("volume", "f-c"),
        ("volume", "f-r"),
        ("volumesnapshot", "f-s"),
        ("volume", "f-v"),
    ] {
        delete(&api, kind, name)?;
    }
    ensure!(!file.exists(), "{} left after its volume", file.display());

    // An LV removed behind the agent's back is reported, not made again empty.
    volume(&api, "doomed", 1, None)?;
    place(&api, "volume", "doomed", "fast", None)?;
    let dev = available(&api, "volume", "doomed")?;
    let doomed = format!("volume-{}", uid(&api, "volume", "doomed"));
    lvm("lvremove", &["-y", &format!("{}/{doomed}", host.vg)])?;
    run("losetup", &["--detach", &dev])?;
    wait_until(WAIT, "the missing volume reported", || {
        (get(
            &api,
            "volume",
            "doomed",
            "{.status.phase} {.status.conditions[?(@.type==\"Ready\")].reason}",
        ) == "Error DataMissing")
            .then_some(())
    })?;
    std::thread::sleep(Duration::from_secs(5));
    ensure!(!lvs(&host.vg)?.contains(&doomed), "the LV was made again");
    let events = api.kubectl_ok(&["-n", NS, "get", "events", "-o", "json"])?;
    ensure!(
        events.contains("DataMissing"),
        "no Event of the missing data: {events}"
    );

    // Killed in the middle of a clone of real data, the agent converges when started again.
    volume(&api, "big", 2, None)?;
    place(&api, "volume", "big", "fast", None)?;
    let bdev = available(&api, "volume", "big")?;
    let data = pattern(5, 8 << 20);
    for i in 0..48u64 {
        write_at(&bdev, i * (32 << 20), &data)?;
    }
    volume(&api, "big-clone", 2, Some(("volume", "big")))?;
    place(&api, "volume", "big-clone", "fast", None)?;
    let partial = wait_until(WAIT, "a partial clone", || {
        lvs(&host.vg)
            .ok()?
            .into_iter()
            .find(|l| l.ends_with(".partial"))
    })?;
    proc.kill();
    ensure!(
        lvs(&host.vg)?.contains(&partial),
        "the partial clone is not there to recover"
    );
    // The data of a volume deleted while the node was taken for lost (the volume scheduler
    // let it go without the agent): no Volume names it, so the agent removes it when it comes
    // back, and nothing else.
    let orphan = host.files.join("volume-0rphan-0f-a-lost-node.raw");
    std::fs::write(&orphan, b"left behind")?;
    let keep = host.files.join("operator-notes.raw");
    std::fs::write(&keep, b"not a volume")?;
    let mut proc = agent(&host)?;
    wait_until(WAIT, "the orphaned volume file removed", || {
        (!orphan.exists()).then_some(())
    })?;
    ensure!(keep.exists(), "a file that is no volume's was removed");
    std::fs::remove_file(&keep)?;
    let cdev = available(&api, "volume", "big-clone")?;
    ensure!(
        !lvs(&host.vg)?.iter().any(|l| l.ends_with(".partial")),
        "a partial LV is left"
    );
    for i in [0u64, 17, 47] {
        ensure!(
            read_at(&cdev, i * (32 << 20), data.len())? == data,
            "the clone lost data at {i}"
        );
    }

    // A volume made from an Image (qcow2, served over HTTP) holds its disk when Available.
    let images = host.dir.path().join("images");
    std::fs::create_dir(&images)?;
    let disk = pattern(61, 3 << 20);
    let raw = images.join("disk.raw");
    std::fs::write(&raw, &disk)?;
    run(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            &raw.to_string_lossy(),
            &images.join("disk.qcow2").to_string_lossy(),
        ],
    )?;
    let server = stratus_e2e::node::FileServer::serve(&images)?;
    apply(
        &api,
        &format!(
            "apiVersion: image.stratus.dev/v1\nkind: Image\nmetadata:\n  name: tiny\nspec:\n  diskFormat: qcow2\n  source:\n    url: {}/disk.qcow2\n",
            server.url
        ),
    )?;
    for (name, pool) in [("l-img", "fast"), ("f-img", "files")] {
        volume(&api, name, 1, Some(("image", "tiny")))?;
        place(&api, "volume", name, pool, None)?;
        let dev = available(&api, "volume", name)?;
        ensure!(
            read_at(&dev, 0, disk.len())? == disk,
            "{name} lacks the image's data"
        );
        ensure!(read_at(&dev, 5 << 20, 4096)? == vec![0; 4096]);
    }

    // A volume made from another project's public image: found as a server's image is (the
    // project's own first, then the public ones), read by the node through the node
    // authorizer's rules.
    api.kubectl_in(
        &["-n", PUBLISHER, "apply", "-f", "-"],
        &format!(
            "apiVersion: image.stratus.dev/v1\nkind: Image\nmetadata:\n  name: shared-tiny\nspec:\n  diskFormat: qcow2\n  visibility: public\n  source:\n    url: {}/disk.qcow2\n",
            server.url
        ),
    )?;
    volume(&api, "f-pub", 1, Some(("image", "shared-tiny")))?;
    place(&api, "volume", "f-pub", "files", None)?;
    let dev = available(&api, "volume", "f-pub")?;
    ensure!(
        read_at(&dev, 0, disk.len())? == disk,
        "f-pub lacks the public image's data"
    );

    // Deleting everything leaves nothing behind.
    for (kind, name) in [
        ("volume", "f-pub"),
        ("volume", "l-img"),
        ("volume", "f-img"),
        ("volume", "big-clone"),
        ("volume", "big"),
        ("volume", "doomed"),
        ("volume", "l-c"),
        ("volume", "l-r"),
        ("volumesnapshot", "l-s"),
        ("volume", "l-v"),
    ] {
        delete(&api, kind, name)?;
    }
    ensure!(lvs(&host.vg)?.is_empty(), "LVs left: {:?}", lvs(&host.vg)?);
    ensure!(
        loops_over(&host.pv)?.is_empty(),
        "loop devices left: {:?}",
        loops_over(&host.pv)?
    );
    let left: Vec<_> = std::fs::read_dir(&host.files)?
        .flatten()
        .map(|e| e.file_name())
        .collect();
    ensure!(left.is_empty(), "files left: {left:?}");
    let _ = proc.terminate();
    Ok(())
}
