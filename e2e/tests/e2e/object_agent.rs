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
//! On addresses of their own (127.0.79.x), three nodes behind a real Swift proxy with Stratus
//! identity: one node down, a user's PUT and GET go on; back, it gets what was written
//! meanwhile. On 127.0.80.x, two nodes given different hash files: the second is named by
//! the ring (HashMismatch) and installs none of its versions until given the cluster's file.
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

/// The address block of the first test's nodes (127.0.78.2-4); each test has its own, as the
/// servers' ports and rsync's are the same on every node.
const NET: u8 = 78;

/// Node `i`'s address in block `net`.
fn ip(net: u8, i: usize) -> String {
    format!("127.0.{net}.{}", i + 2)
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

fn rings_yaml(net: u8) -> String {
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
                    ip(net, i),
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
    /// Its address block.
    net: u8,
    dir: PathBuf,
    kubeconfig: PathBuf,
    /// The cluster's hash file, one for the three nodes.
    hash_file: PathBuf,
    agent: Option<Proc>,
}

impl Node {
    fn ip(&self) -> String {
        ip(self.net, self.i)
    }

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
            .args(["--object-ip", &self.ip()])
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

    /// Waits until all three of its servers answer Swift's healthcheck (`up`), or none does.
    fn wait_serving(&self, up: bool) -> Result<()> {
        let what = if up { "to answer" } else { "to stop" };
        wait_until(WAIT, &format!("{}'s servers {what}", name(self.i)), || {
            PORTS
                .iter()
                .all(|(_, port)| healthy(&self.ip(), *port) == up)
                .then_some(())
        })
        .with_context(|| self.log())
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

    /// The `.data` file of the object whose hash directory is `hash` in partition `part`, if
    /// one of this node's devices holds it.
    fn holds(&self, part: u32, hash: &str) -> Option<PathBuf> {
        self.files("objects", part, "data").into_iter().find(|p| {
            p.parent()
                .and_then(Path::file_name)
                .is_some_and(|d| d == hash)
        })
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
        let table = format!("stratus_swift_{}", self.ip().replace('.', "_"));
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

/// `stratus up` with three object nodes on block `net`, each agent started with the one hash
/// file of the cluster and the system identities `extra` (token, user) in the token file; the
/// three rings applied; once every node is Ready with them and its servers answer.
fn cluster(net: u8, extra: &[(&str, &str)]) -> Result<(Cloud, tempfile::TempDir, Vec<Node>)> {
    let mut cloud = Cloud::up()?;
    let tokens = cloud.dir.path().join("tokens.csv");
    let mut text = std::fs::read_to_string(&tokens)?;
    for (token, user) in extra {
        text.push_str(&format!("{token},{user}\n"));
    }
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
            net,
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
    cloud.kubectl_in(&["apply", "-f", "-"], &rings_yaml(net))?;

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
        n.wait_serving(true)?;
    }
    Ok((cloud, tmp, nodes))
}

#[test]
fn three_nodes_serve_rings_restart_and_repair_replicas() -> Result<()> {
    let (cloud, _tmp, mut nodes) = cluster(NET, &[])?;

    // The three nodes share the cluster's hash: the first to start made the file (0600), and
    // each wrote it as its servers' swift.conf (0640), never into its log.
    let hash = std::fs::read_to_string(&nodes[0].hash_file)?;
    ensure!(mode(&nodes[0].hash_file)? == 0o600, "the hash file's mode");
    let values: Vec<&str> = hash
        .lines()
        .filter(|l| l.starts_with("swift_hash_path_"))
        .filter_map(|l| l.split_once(" = ").map(|(_, v)| v))
        .collect();
    ensure!(values.len() == 2 && values.iter().all(|v| v.len() >= 32));
    // And the cluster's fingerprint salt, Stratus's own: not Swift's to read.
    ensure!(
        hash.lines()
            .any(|l| l.starts_with("stratus_fingerprint_salt = ")),
        "the hash file has no fingerprint salt"
    );
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
    ensure!(
        !conf.contains("stratus_fingerprint_salt"),
        "swift.conf holds the fingerprint salt"
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
    nodes[0].wait_serving(false)?;
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
    nodes[0].wait_serving(true)?;
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
    let drained = format!("{}/d2", nodes[2].ip());
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
        .find(|d| d.ip == nodes[2].ip() && d.device == "d2")
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
    for n in &nodes {
        for (_, port) in PORTS {
            ensure!(!healthy(&n.ip(), port), "{}:{port} still answers", n.ip());
        }
    }
    Ok(())
}

/// The address block of the node-down test's nodes (127.0.79.2-4).
const NET_DOWN: u8 = 79;

/// Where Swift places `/account/container/object` under the object ring and the cluster's hash
/// in `swift_dir` (its `swift.conf`, read as the servers read theirs): the partition and the
/// name of the object's hash directory.
fn object_location(swift_dir: &Path, account: &str, object: &str) -> Result<(u32, String)> {
    let out = Command::new("/usr/bin/python3")
        .arg("-c")
        .arg(
            "import sys\nfrom swift.common.utils import set_swift_dir, hash_path\n\
             set_swift_dir(sys.argv[1])\nfrom swift.common.ring import Ring\n\
             ring = Ring(sys.argv[1], ring_name='object')\n\
             print(ring.get_part(sys.argv[2], 'c', sys.argv[3]), hash_path(sys.argv[2], 'c', sys.argv[3]))\n",
        )
        .arg(swift_dir)
        .args([account, object])
        .output()?;
    ensure!(
        out.status.success(),
        "python3 ring: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let (part, hash) = text.trim().split_once(' ').context("part and hash")?;
    Ok((part.parse()?, hash.to_owned()))
}

/// A real Swift proxy (Debian's proxy application, run as `swift-proxy-server` runs it) on
/// 127.0.0.1:`port` with Stratus identity, reading the rings and the cluster's `swift.conf`
/// of `swift_dir`; its log in `dir`.
fn start_proxy(cloud: &Cloud, swift_dir: &Path, dir: &Path, port: u16) -> Result<Proc> {
    let conf = dir.join("proxy-server.conf");
    std::fs::write(
        &conf,
        super::object_proxy::proxy_conf(
            port,
            swift_dir,
            &format!("{}/identity/v3", cloud.url),
            &cloud.dir.path().join("pki/ca.crt"),
        ),
    )?;
    // swift.conf is read from a fixed path by Swift's programs; set_swift_dir points this
    // one at the cluster's, as the object agent's bind mount does for the servers.
    let proxy = Proc::spawn(
        "swift-proxy-server",
        Command::new("/usr/bin/python3")
            .arg("-c")
            .arg(
                "import sys\nfrom swift.common.utils import set_swift_dir\n\
                 set_swift_dir(sys.argv[1])\nfrom swift.common.wsgi import run_wsgi\n\
                 sys.exit(run_wsgi(sys.argv[2], 'proxy-server', verbose=True))\n",
            )
            .arg(swift_dir)
            .arg(&conf),
        &dir.join("proxy.log"),
    )?;
    wait_until(WAIT, "the Swift proxy to listen", || {
        std::net::TcpStream::connect(("127.0.0.1", port)).ok()
    })
    .with_context(|| std::fs::read_to_string(dir.join("proxy.log")).unwrap_or_default())?;
    Ok(proxy)
}

/// One node of three down: a user's PUT and GET through a real Swift proxy with Stratus
/// identity keep working (two of three replicas are Swift's write quorum); the node back, the
/// other nodes' replicators bring it the object written while it was away (found on its
/// device where the ring and the cluster's hash place it).
#[test]
fn a_node_down_leaves_the_proxy_serving_and_comes_back_up_to_date() -> Result<()> {
    use super::object_proxy::{PROXY_TOKEN, keystone_login, member, run, swift_status};
    let (cloud, tmp, mut nodes) =
        cluster(NET_DOWN, &[(PROXY_TOKEN, "system:service:object-proxy")])?;
    cloud.projects(&["oad"])?;
    member(|a, i| cloud.kubectl_in(a, i), "odette", "oad")?;
    let uid = cloud.kubectl_ok(&["get", "project", "oad", "-o", "jsonpath={.metadata.uid}"])?;
    let account = format!("AUTH_{uid}");
    let ca = cloud.dir.path().join("pki/ca.crt");
    let token = keystone_login(&cloud.url, &ca, "odette", "oad")?;
    // The proxy reads the rings node 2 installed; node 2 stays up.
    let port = stratus_e2e::free_port();
    let _proxy = start_proxy(&cloud, &nodes[1].swift_dir(), tmp.path(), port)?;
    let proxy_log = || std::fs::read_to_string(tmp.path().join("proxy.log")).unwrap_or_default();
    let url = format!("http://127.0.0.1:{port}/v1/{account}/c");
    let put = |object: &str, body: &str| -> Result<()> {
        run(
            Command::new("curl")
                .args(["-sS", "--fail", "-m", "120", "-X", "PUT"])
                .args(["-H", &format!("X-Auth-Token: {token}")])
                .args(["--data-binary", body])
                .arg(format!("{url}/{object}")),
            &format!("PUT {object}"),
        )
        .with_context(proxy_log)?;
        Ok(())
    };
    let get = |object: &str| -> Result<Vec<u8>> {
        Ok(run(
            Command::new("curl")
                .args(["-sS", "--fail", "-m", "120"])
                .args(["-H", &format!("X-Auth-Token: {token}")])
                .arg(format!("{url}/{object}")),
            &format!("GET {object}"),
        )
        .with_context(proxy_log)?
        .stdout)
    };

    ensure!(
        swift_status("PUT", &url, &token).with_context(proxy_log)? == 201,
        "the container: {}",
        proxy_log()
    );
    put("before", "written by three")?;
    let (part, hash) = object_location(&nodes[1].swift_dir(), &account, "before")?;
    for n in &nodes {
        ensure!(
            n.holds(part, &hash).is_some(),
            "{} holds no replica of the object",
            name(n.i)
        );
    }

    // Node 1 down (its agent killed, its servers with it): writes and reads go on.
    nodes[0].agent.as_mut().context("agent")?.kill();
    nodes[0].wait_serving(false)?;
    put("during", "written by two")?;
    ensure!(get("before")? == b"written by three");
    ensure!(get("during")? == b"written by two");
    let (part, hash) = object_location(&nodes[1].swift_dir(), &account, "during")?;
    ensure!(nodes[0].holds(part, &hash).is_none(), "node 1 was down");

    // Node 1 back: the replicators bring it what was written meanwhile.
    nodes[0].start()?;
    nodes[0].wait_serving(true)?;
    let copy = wait_until(
        WAIT,
        "node 1's copy of the object written while it was down",
        || nodes[0].holds(part, &hash),
    )
    .with_context(|| nodes[1].log())?;
    ensure!(std::fs::read(&copy)? == b"written by two");
    ensure!(get("during")? == b"written by two");
    drop(nodes);
    Ok(())
}

/// The address block of the hash test's nodes (127.0.80.2-3).
const NET_HASH: u8 = 80;

/// The condition `type_` of `conditions`: its status and message.
fn condition(
    conditions: &[stratus_api_types::common::Condition],
    type_: &str,
) -> Option<(String, String)> {
    conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status.clone(), c.message.clone()))
}

/// Two object nodes given different hash files: the second to register (a tie goes to the
/// first) is named by its ring's status, gets `HashMismatch=True` and a Warning Event, and
/// installs none of the ring's versions while the first does; given the cluster's hash file,
/// it installs the ring and the mismatch clears. Neither fingerprint is a hash value. Given
/// the cluster's file without its fingerprint salt (a v1 fingerprint of the same hash), it is
/// named again, for its fingerprint's version.
#[test]
fn a_node_given_another_hash_file_is_named_and_installs_no_ring() -> Result<()> {
    let mut cloud = Cloud::up()?;
    let tokens = cloud.dir.path().join("tokens.csv");
    let mut text = std::fs::read_to_string(&tokens)?;
    let tmp = tempfile::tempdir()?;
    let mut nodes = Vec::new();
    for i in 0..2 {
        let token = format!("{}-token-0123456789abcdef", name(i));
        text.push_str(&format!("{token},system:node:{}\n", name(i)));
        let dir = tmp.path().join(name(i));
        std::fs::create_dir_all(dir.join("devices").join("d1"))?;
        nodes.push(Node {
            i,
            net: NET_HASH,
            kubeconfig: cloud.kubeconfig_with(&name(i), Some(&token))?,
            hash_file: tmp.path().join(format!("hash-{i}")),
            dir,
            agent: None,
        });
    }
    std::fs::write(&tokens, text)?;
    cloud.restart()?;
    let fingerprint = |i: usize| object_node(&cloud, &name(i))?.status?.hash_fingerprint;
    // oa-1 registers first.
    nodes[0].start()?;
    let first = wait_until(WAIT, "oa-1's fingerprint", || fingerprint(0))?;
    nodes[1].start()?;
    let second = wait_until(WAIT, "oa-2's fingerprint", || fingerprint(1))?;
    ensure!(first != second, "two hash files, one fingerprint");
    for (i, f) in [&first, &second].into_iter().enumerate() {
        let hash = std::fs::read_to_string(&nodes[i].hash_file)?;
        // A new hash file is salted: a v2 fingerprint naming the salt, none of the values.
        let digits = f.rsplit(':').next().unwrap_or_default();
        ensure!(
            f.starts_with("v2:") && digits.len() == 16 && !hash.contains(digits),
            "fingerprint {f} shows the hash"
        );
    }

    // The ring paused until its status names the odd node: no version is built before.
    let ring_yaml = |paused: bool| {
        let mut y = format!(
            "apiVersion: object.stratus.dev/v1\nkind: ObjectRing\nmetadata:\n  name: oh-object\nspec:\n  ringType: object\n  partPower: 4\n  replicas: 2\n  minPartHours: 0\n  paused: {paused}\n  devices:\n"
        );
        for n in &nodes {
            y.push_str(&format!(
                "    - {{zone: {}, ip: {}, port: 16210, device: d1, weight: 100, node: {}}}\n",
                n.i + 1,
                n.ip(),
                name(n.i)
            ));
        }
        y
    };
    cloud.kubectl_in(&["apply", "-f", "-"], &ring_yaml(true))?;
    wait_until(WAIT, "the ring to name oa-2", || {
        let s = ring(&cloud, "oh-object")?.status?;
        (s.hash_mismatch == [name(1)] && s.hash_fingerprint.as_ref() == Some(&first)).then_some(())
    })?;
    cloud.kubectl_in(&["apply", "-f", "-"], &ring_yaml(false))?;
    let r = wait_until(WAIT, "the ring built", || {
        let r = ring(&cloud, "oh-object")?;
        r.status.as_ref()?.version.map(|_| r)
    })?;
    let s = r.status.unwrap_or_default();
    let (status, message) =
        condition(&s.conditions, "HashMismatch").context("the ring's HashMismatch")?;
    ensure!(status == "True" && message.contains(&name(1)), "{message}");

    // oa-1 installs it; oa-2 says why it does not, on its ObjectNode and in an Event.
    let installed = |i: usize| -> Option<Vec<String>> {
        let s = object_node(&cloud, &name(i))?.status?;
        Some(s.rings.into_iter().map(|r| r.file).collect())
    };
    wait_until(WAIT, "oa-1 to install the ring", || {
        installed(0).filter(|r| r.iter().any(|f| f == "object.ring.gz"))
    })
    .with_context(|| nodes[0].log())?;
    let (status, message) = wait_until(WAIT, "oa-2's HashMismatch", || {
        let s = object_node(&cloud, &name(1))?.status?;
        condition(&s.conditions, "HashMismatch").filter(|(st, _)| st == "True")
    })
    .with_context(|| nodes[1].log())?;
    ensure!(
        message.contains(&second) && message.contains(&first),
        "{status}: {message}"
    );
    wait_until(WAIT, "oa-2's HashMismatch Event", || {
        let out = cloud
            .kubectl_ok(&[
                "get",
                "events",
                "-A",
                "--field-selector",
                "reason=HashMismatch",
                "-o",
                "jsonpath={.items[*].involvedObject.name}",
            ])
            .ok()?;
        out.split_whitespace().any(|n| n == name(1)).then_some(())
    })?;
    ensure!(
        installed(1).is_some_and(|r| r.is_empty()),
        "oa-2 installed {:?}",
        installed(1)
    );
    ensure!(
        !nodes[1].swift_dir().join("object.ring.gz").exists(),
        "oa-2's ring file"
    );

    // Given the cluster's hash file, oa-2 installs the ring and the mismatch clears.
    nodes[1].agent.take();
    nodes[1].wait_serving(false)?;
    nodes[1].hash_file = nodes[0].hash_file.clone();
    nodes[1].start()?;
    wait_until(WAIT, "oa-2 to install the ring", || {
        installed(1).filter(|r| r.iter().any(|f| f == "object.ring.gz"))
    })
    .with_context(|| nodes[1].log())?;
    wait_until(WAIT, "the mismatch to clear", || {
        let node = object_node(&cloud, &name(1))?.status?;
        let ring = ring(&cloud, "oh-object")?.status?;
        (condition(&node.conditions, "HashMismatch")?.0 == "False"
            && ring.hash_mismatch.is_empty()
            && condition(&ring.conditions, "HashMismatch")?.0 == "False")
            .then_some(())
    })?;

    // The cluster's hash file without its fingerprint salt (the same hash, a v1 fingerprint):
    // a fingerprint of another version is another hash to the ring and to the node.
    nodes[1].agent.take();
    nodes[1].wait_serving(false)?;
    let unsalted = tmp.path().join("hash-unsalted");
    let text: String = std::fs::read_to_string(&nodes[0].hash_file)?
        .lines()
        .filter(|l| !l.starts_with("stratus_fingerprint_salt"))
        .map(|l| format!("{l}\n"))
        .collect();
    {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&unsalted)?
            .write_all(text.as_bytes())?;
    }
    nodes[1].hash_file = unsalted;
    nodes[1].start()?;
    let reason = |conditions: &[stratus_api_types::common::Condition]| {
        conditions
            .iter()
            .find(|c| c.type_ == "HashMismatch" && c.status == "True")
            .map(|c| c.reason.clone())
    };
    wait_until(
        WAIT,
        "the ring to name oa-2 for its fingerprint version",
        || {
            let s = ring(&cloud, "oh-object")?.status?;
            (s.hash_mismatch == [name(1)]
                && s.hash_fingerprint.as_ref() == Some(&first)
                && reason(&s.conditions)? == "HashFingerprintVersion")
                .then_some(())
        },
    )
    .with_context(|| nodes[1].log())?;
    wait_until(
        WAIT,
        "oa-2's HashMismatch for its fingerprint version",
        || {
            let s = object_node(&cloud, &name(1))?.status?;
            (s.hash_fingerprint
                .as_deref()
                .is_some_and(|f| !f.starts_with("v2:"))
                && reason(&s.conditions)? == "HashFingerprintVersion")
                .then_some(())
        },
    )
    .with_context(|| nodes[1].log())?;
    drop(nodes);
    Ok(())
}
