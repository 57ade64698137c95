//! Three object nodes, each `stratus agent --roles object` running as its node
//! (`system:node:NAME`) on an address of its own (127.0.78.2–4, the same ports on each) with
//! directory devices, against `stratus up`: account, container and object rings applied from
//! YAML are built by the ring controller and installed by every agent, which runs Debian's
//! Swift servers and their replicators, updaters and auditors and reports them Ready on its
//! ObjectNode, all three with the cluster's hash file (made by the first, 0600) as their
//! servers' swift.conf (0640) and never in their logs. An object written to its three
//! primaries (Swift's `direct_client`, through the installed ring) is on each node's device; one agent killed, its servers stop; its replica
//! removed meanwhile and the agent started again, its servers come back and the other nodes'
//! replicators put the replica back (found by scanning the device). A device taken away is
//! reported Failed and drained: the object ring's next version holds nothing on it.
//! Needs Debian's swift-account, swift-container, swift-object and python3-swift.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use base64::Engine as _;
use stratus_api_types::object::{
    DeviceState, ObjectNode, ObjectNodePhase, ObjectRing, ObjectRingVersion,
};
use stratus_e2e::{Cloud, Proc, stratus_bin, wait_until};
use stratus_ring::RingData;

/// Generous: twelve Python processes a node start on a loaded two-core machine.
const WAIT: Duration = Duration::from_secs(300);
const PORTS: [(&str, u16); 3] = [
    ("account", 16_212),
    ("container", 16_211),
    ("object", 16_210),
];

fn ip(i: usize) -> String {
    format!("127.0.78.{}", i + 2)
}

fn name(i: usize) -> String {
    format!("oa-{}", i + 1)
}

/// The devices of node `i`: one each, two on the third (so that one can be drained while
/// three zones still hold the three replicas). By weight alone the third zone would take two
/// replicas of some partitions and the others none, and which partition an object is in
/// depends on the cluster's hash, random per run: the rings' overload of a half lets every
/// partition keep one replica in each zone (as Swift's operators set it for unequal zones).
fn devices(i: usize) -> &'static [&'static str] {
    if i == 2 { &["d1", "d2"] } else { &["d1"] }
}

fn rings_yaml() -> String {
    let mut out = String::new();
    for (kind, port) in PORTS {
        out.push_str(&format!(
            "apiVersion: object.stratus.dev/v1\nkind: ObjectRing\nmetadata:\n  name: oa-{kind}\nspec:\n  ringType: {kind}\n  partPower: 4\n  replicas: 3\n  minPartHours: 0\n  overload: 0.5\n  devices:\n"
        ));
        for i in 0..3 {
            for d in devices(i) {
                out.push_str(&format!(
                    "    - {{zone: {}, ip: {}, port: {port}, device: {d}, weight: 100, node: {}}}\n",
                    i + 1,
                    ip(i),
                    name(i)
                ));
            }
        }
        out.push_str("---\n");
    }
    out
}

struct Node {
    i: usize,
    dir: PathBuf,
    kubeconfig: PathBuf,
    /// The cluster's hash file, one for the three nodes.
    hash_file: PathBuf,
    agent: Option<Proc>,
}

impl Node {
    fn devices_dir(&self) -> PathBuf {
        self.dir.join("devices")
    }

    fn swift_dir(&self) -> PathBuf {
        self.dir.join("state").join("object").join("swift")
    }

    fn start(&mut self) -> Result<()> {
        let mut cmd = Command::new(stratus_bin());
        cmd.args(["agent", "--roles", "object", "--node", &name(self.i)])
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .arg("--state-dir")
            .arg(self.dir.join("state"))
            .args(["--object-ip", &ip(self.i)])
            .arg("--object-devices-dir")
            .arg(self.devices_dir())
            .arg("--object-unmounted-devices")
            .arg("--swift-hash-file")
            .arg(&self.hash_file)
            // On loopback every connection comes from 127.0.0.1 (the nodes' replicators and
            // this test's client alike), so the allow-list must admit it here; what it drops
            // is tested on the host in the agent's crate (filter.rs).
            .args(["--object-proxy", "127.0.0.1"])
            .args(["--object-replication-interval", "2"])
            .args(["--object-heartbeat-seconds", "2"]);
        for (kind, port) in PORTS {
            cmd.args([format!("--{kind}-port"), port.to_string()]);
        }
        for d in devices(self.i) {
            cmd.args(["--object-device", d]);
        }
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or_default();
        self.agent = Some(Proc::spawn(
            "object agent",
            cmd.env("STRATUS_LOG", "info"),
            &self.dir.join(format!("agent-{stamp}.log")),
        )?);
        Ok(())
    }

    /// The agent's logs so far.
    fn log(&self) -> String {
        let mut out = String::new();
        for e in std::fs::read_dir(&self.dir).into_iter().flatten().flatten() {
            if e.file_name().to_string_lossy().starts_with("agent-") {
                out.push_str(&std::fs::read_to_string(e.path()).unwrap_or_default());
            }
        }
        out
    }

    /// The `.data` files of the object under partition `part` on this node's devices.
    fn replicas(&self, part: u32) -> Vec<PathBuf> {
        self.files("objects", part, "data")
    }

    /// The files ending in `.ext` under `dir`'s partition `part` on this node's devices.
    fn files(&self, dir: &str, part: u32, ext: &str) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for d in devices(self.i) {
            find_files(
                &self.devices_dir().join(d).join(dir).join(part.to_string()),
                ext,
                &mut out,
            );
        }
        out
    }
}

impl Drop for Node {
    /// The agent stopped, its allow-list goes too (it outlives the agent on purpose).
    fn drop(&mut self) {
        drop(self.agent.take());
        let table = format!("stratus_swift_{}", ip(self.i).replace('.', "_"));
        let _ = Command::new("nft")
            .args(["delete", "table", "inet", &table])
            .stderr(std::process::Stdio::null())
            .status();
    }
}

fn mode(path: &Path) -> Result<u32> {
    use std::os::unix::fs::PermissionsExt as _;
    Ok(std::fs::metadata(path)?.permissions().mode() & 0o777)
}

fn find_files(dir: &Path, ext: &str, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            find_files(&p, ext, out);
        } else if p.extension().is_some_and(|x| x == ext) {
            out.push(p);
        }
    }
}

/// Whether `ip:port` answers Swift's healthcheck.
fn healthy(ip: &str, port: u16) -> bool {
    Command::new("curl")
        .args(["-sf", "-m", "5", "--noproxy", "*"])
        .arg(format!("http://{ip}:{port}/healthcheck"))
        .output()
        .is_ok_and(|o| o.status.success() && o.stdout == b"OK")
}

fn get_json(cloud: &Cloud, kind: &str, name: &str) -> Option<serde_json::Value> {
    let out = cloud.kubectl(&["get", kind, name, "-o", "json"]).ok()?;
    if !out.status.success() {
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
}

fn object_node(cloud: &Cloud, name: &str) -> Option<ObjectNode> {
    serde_json::from_value(get_json(cloud, "objectnode", name)?).ok()
}

fn ring(cloud: &Cloud, name: &str) -> Option<ObjectRing> {
    serde_json::from_value(get_json(cloud, "objectring", name)?).ok()
}

/// Node `i`'s ObjectNode once it is Ready with the three rings installed.
fn ready(cloud: &Cloud, i: usize) -> Option<ObjectNode> {
    let n = object_node(cloud, &name(i))?;
    let s = n.status.as_ref()?;
    (s.phase == ObjectNodePhase::Ready && s.rings.len() == 3 && s.processes.len() == 13)
        .then_some(n)
}

/// Writes the object through Swift's `direct_client` to the primaries the ring at
/// `swift_dir` names; its partition.
fn put_object(swift_dir: &Path) -> Result<u32> {
    direct_put(
        swift_dir,
        "ring = Ring(sys.argv[1], ring_name='object')\n\
         part, nodes = ring.get_nodes('AUTH_oa', 'c', 'o')\n\
         for n in nodes:\n\
         \x20   direct_client.direct_put_object(n, part, 'AUTH_oa', 'c', 'o', b'hello stratus', content_length=13)\n",
    )
}

/// Creates container `db` of account `AUTH_oa` through Swift's `direct_client` on the
/// primaries of the container ring at `swift_dir`; its partition.
fn put_container(swift_dir: &Path) -> Result<u32> {
    direct_put(
        swift_dir,
        "ring = Ring(sys.argv[1], ring_name='container')\n\
         part, nodes = ring.get_nodes('AUTH_oa', 'db')\n\
         for n in nodes:\n\
         \x20   direct_client.direct_put_container(n, part, 'AUTH_oa', 'db')\n",
    )
}

/// Runs `script` (which sets `part`) with Swift's `Ring` and `direct_client` imported and the
/// ring directory as its argument, whose `swift.conf` (the cluster's hash) it reads as the
/// servers do; the partition it printed.
fn direct_put(swift_dir: &Path, script: &str) -> Result<u32> {
    let out = Command::new("/usr/bin/python3")
        .arg("-c")
        .arg(format!(
            "import sys\nfrom swift.common.utils import set_swift_dir\nset_swift_dir(sys.argv[1])\nfrom swift.common.ring import Ring\nfrom swift.common import direct_client\n{script}print(part)"
        ))
        .arg(swift_dir)
        .output()?;
    ensure!(
        out.status.success(),
        "python3 direct_client: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).trim().parse()?)
}

#[test]
fn three_nodes_serve_rings_restart_and_repair_replicas() -> Result<()> {
    let mut cloud = Cloud::up()?;
    let tokens = cloud.dir.path().join("tokens.csv");
    let mut text = std::fs::read_to_string(&tokens)?;
    let tmp = tempfile::tempdir()?;
    let mut nodes = Vec::new();
    for i in 0..3 {
        let token = format!("{}-token-0123456789abcdef", name(i));
        text.push_str(&format!("{token},system:node:{}\n", name(i)));
        let dir = tmp.path().join(name(i));
        for d in devices(i) {
            std::fs::create_dir_all(dir.join("devices").join(d))?;
        }
        nodes.push(Node {
            i,
            kubeconfig: cloud.kubeconfig_with(&name(i), Some(&token))?,
            dir,
            hash_file: tmp.path().join("cluster").join("swift-hash"),
            agent: None,
        });
    }
    std::fs::write(&tokens, text)?;
    cloud.restart()?;
    for n in &mut nodes {
        n.start()?;
    }
    cloud.kubectl_in(&["apply", "-f", "-"], &rings_yaml())?;

    // Every node installs the three rings and runs its servers and daemons.
    for n in &nodes {
        let i = n.i;
        let node = wait_until(WAIT, &format!("{} Ready with three rings", name(i)), || {
            ready(&cloud, i)
        })
        .with_context(|| {
            format!(
                "ObjectNode: {:?}\nagent log:\n{}",
                get_json(&cloud, "objectnode", &name(i)),
                n.log()
            )
        })?;
        let s = node.status.unwrap_or_default();
        ensure!(s.devices.len() == devices(i).len());
        ensure!(
            s.devices
                .iter()
                .all(|d| d.state == DeviceState::Healthy && d.writable),
            "{:?}",
            s.devices
        );
        wait_until(WAIT, &format!("{}'s servers to answer", name(i)), || {
            PORTS
                .iter()
                .all(|(_, port)| healthy(&ip(i), *port))
                .then_some(())
        })?;
    }

    // The three nodes share the cluster's hash: the first to start made the file (0600), and
    // each wrote it as its servers' swift.conf (0640), never into its log.
    let hash = std::fs::read_to_string(&nodes[0].hash_file)?;
    ensure!(mode(&nodes[0].hash_file)? == 0o600, "the hash file's mode");
    let values: Vec<&str> = hash
        .lines()
        .filter_map(|l| l.split_once(" = ").map(|(_, v)| v))
        .collect();
    ensure!(values.len() == 2 && values.iter().all(|v| v.len() >= 32));
    let conf = std::fs::read_to_string(nodes[0].swift_dir().join("swift.conf"))?;
    for n in &nodes {
        let path = n.swift_dir().join("swift.conf");
        ensure!(
            std::fs::read_to_string(&path)? == conf,
            "{} differs",
            path.display()
        );
        ensure!(
            mode(&path)? == 0o640,
            "{} is readable by others",
            path.display()
        );
        let log = n.log();
        ensure!(
            values.iter().all(|v| !log.contains(v)),
            "a hash value in the log"
        );
    }
    ensure!(
        values.iter().all(|v| conf.contains(&format!(" = {v}\n"))),
        "swift.conf holds other values than the hash file"
    );

    // An object on its three primaries, one on each node.
    let part = put_object(&nodes[0].swift_dir())?;
    for n in &nodes {
        ensure!(
            n.replicas(part).len() == 1,
            "{} holds no replica",
            name(n.i)
        );
    }

    // A container database taken away from node 1 is put back whole by the other nodes'
    // replicators, over node 1's rsync daemon.
    let container_part = put_container(&nodes[0].swift_dir())?;
    // Each node's replicator may be a ring version behind node 1's for a moment (and move
    // the database where that version says): every node holds it once they agree.
    wait_until(WAIT, "the container database on every node", || {
        nodes
            .iter()
            .all(|n| n.files("containers", container_part, "db").len() == 1)
            .then_some(())
    })
    .with_context(|| nodes[2].log())?;
    let dbs = nodes[0].files("containers", container_part, "db");
    ensure!(dbs.len() == 1, "node 1 holds {dbs:?} of the container");
    let hash_dir = dbs[0].parent().context("the database's directory")?;
    std::fs::remove_dir_all(hash_dir)?;
    wait_until(WAIT, "the container database back on node 1", || {
        (nodes[0].files("containers", container_part, "db").len() == 1).then_some(())
    })
    .with_context(|| nodes[1].log())?;

    // Node 1's agent killed: its servers stop with it.
    nodes[0].agent.as_mut().context("agent")?.kill();
    wait_until(WAIT, "node 1's servers to stop", || {
        PORTS
            .iter()
            .all(|(_, port)| !healthy(&ip(0), *port))
            .then_some(())
    })?;
    // Its replica is lost meanwhile (a replaced disk).
    std::fs::remove_dir_all(
        nodes[0]
            .devices_dir()
            .join("d1")
            .join("objects")
            .join(part.to_string()),
    )?;
    ensure!(nodes[0].replicas(part).is_empty());

    // Started again: its servers come back and the replicators repair the replica.
    nodes[0].start()?;
    wait_until(WAIT, "node 1's servers back", || {
        PORTS
            .iter()
            .all(|(_, port)| healthy(&ip(0), *port))
            .then_some(())
    })?;
    let repaired = wait_until(WAIT, "the replicators to repair node 1's replica", || {
        nodes[0].replicas(part).pop()
    })?;
    ensure!(std::fs::read(&repaired)? == b"hello stratus");
    // The replicators report their passes.
    wait_until(WAIT, "object replication reported on oa-2", || {
        let n = object_node(&cloud, &name(1))?;
        n.status?
            .replication
            .iter()
            .find(|r| r.ring_type == stratus_api_types::object::RingType::Object)?
            .last_pass
            .clone()
    })?;

    // Node 3's second device taken away: Failed, and drained from the object ring.
    let before = ring(&cloud, "oa-object").context("ring")?;
    let before = before.status.and_then(|s| s.version).unwrap_or_default();
    std::fs::rename(
        nodes[2].devices_dir().join("d2"),
        nodes[2].devices_dir().join("d2.gone"),
    )?;
    wait_until(WAIT, "oa-3 to report d2 failed", || {
        let n = object_node(&cloud, &name(2))?;
        let s = n.status?;
        (s.phase == ObjectNodePhase::Degraded
            && s.devices
                .iter()
                .any(|d| d.name == "d2" && d.state == DeviceState::Failed))
        .then_some(())
    })?;
    let drained = format!("{}/d2", ip(2));
    let built = wait_until(WAIT, "the object ring to drain d2", || {
        let r = ring(&cloud, "oa-object")?;
        let s = r.status.clone()?;
        (s.drained_devices == [drained.clone()] && s.version > Some(before)).then_some(r)
    })?;
    let version_name = built
        .status
        .as_ref()
        .and_then(|s| s.ring_version.clone())
        .context("ringVersion")?;
    let version: ObjectRingVersion = serde_json::from_value(
        get_json(&cloud, "objectringversion", &version_name).context("version")?,
    )?;
    let bytes = base64::engine::general_purpose::STANDARD.decode(&version.spec.ring_file)?;
    let data = RingData::read_v1(bytes.as_slice())?;
    let d2 = data
        .devs
        .iter()
        .flatten()
        .find(|d| d.ip == ip(2) && d.device == "d2")
        .map(|d| d.id)
        .context("d2 in the ring")?;
    ensure!(
        data.replica2part2dev.iter().flatten().all(|&dev| dev != d2),
        "the drained device still holds replicas"
    );
    // The spec is the operator's: d2 keeps its weight there.
    let spec = ring(&cloud, "oa-object").context("ring")?;
    ensure!(spec.spec.devices.iter().all(|d| d.weight == 100.0));

    // Every agent stopped, its servers go.
    for n in &mut nodes {
        if let Some(mut a) = n.agent.take() {
            a.terminate()?;
        }
    }
    for i in 0..3 {
        for (_, port) in PORTS {
            ensure!(!healthy(&ip(i), port), "{}:{port} still answers", ip(i));
        }
    }
    Ok(())
}
