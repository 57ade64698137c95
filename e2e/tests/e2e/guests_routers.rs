//! Real TCG guests behind a Router, on two simulated nodes: each node is a libvirtd in a
//! network namespace of its own (named as the node), the two joined by a veth underlay
//! (192.0.2.0/24), each running `stratus agent --roles compute,network --physical-interface
//! physnet1=physnet` against one `stratus up` cloud, in an availability zone named as the
//! node; an "external" namespace's bridge (203.0.113.1/24) joins both nodes' `physnet`. An
//! admin's flat external Network on physnet1 and project `gr`'s Network (10.71.0.0/24) are
//! joined by Router `r1`, placed on node A (the only node granted physnet1 until it is
//! placed); node B runs the guests, `f` with a FloatingIP and `s` without, and a namespace
//! "probe" is plugged in on node A as the device of a Port.
//!
//! Asserted, through the real guests' own stacks (virtio-net, their checksum offloads, the
//! MTU DHCP gave them):
//! - the external namespace pings `f`'s floating address and the reply comes from it; it
//!   fetches a page and 256 KiB from `f`'s busybox httpd over TCP on that address;
//! - `s` pings the external namespace and fetches 256 KiB from its HTTP server: both see only
//!   the router's gateway address as the source (an nft counter per source, the server's
//!   log), never `s`'s own;
//! - a remote-group rule: `f`'s group lets ICMP in from members of group `clients`; the
//!   probe's running ping (one ICMP id) to `f`, unanswered, is answered within a second of the
//!   API write that adds `clients` to the probe's Port, and stops within a second of the one
//!   that takes it away; the real guest `s` is kept out, then let in once its Port joins
//!   `clients`, then kept out again once it leaves;
//! - node A dies (its agent killed, its underlay and `physnet` down, its router namespace left
//!   as it was): the router moves to node B once A's Lease expires, the external namespace's
//!   running ping to the floating address is answered again (the outage is printed), and
//!   TCP to `f` and SNAT from `s` work through node B.
//!
//! One test per pair of datapaths (node A's, node B's): kernel + kernel, OVS + OVS, kernel +
//! OVS.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use serde_json::{Value, json};
use stratus_e2e::net::{
    ContinuousPing, Datapath, Namespaces, Switch, UNDERLAY, checksum_underlay, count_pings_from,
    external_bridge, external_network_yaml, namespaces_with_mac, ping_reply_source, pings_counted,
    plug_cloud_port, underlay,
};
use stratus_e2e::node::{Guest, Node, NodeNetns};
use stratus_e2e::{Cloud, MergePatcher, Proc, ip, netns_exec, repo_root, wait_until};

const P: &str = "gr";
const EXT_NS: &str = "grext";
const EXTERNAL: &str = "203.0.113.1";
/// A TCG guest's boot and its first lease, on two cores shared with other tests.
const BOOT: Duration = Duration::from_secs(300);
/// Generous: the agents and controllers share two cores with every other test.
const T: Duration = Duration::from_secs(120);
/// The bound the issue names for a security-group change, from the API write to the effect.
const AT_ONCE: Duration = Duration::from_secs(1);
/// The size of the files fetched over TCP each way: many segments of the guests' MTU.
const BIG: usize = 256 * 1024;

/// The nodes and what runs beside them, dropped in order: the agents (so that they make
/// nothing again) and the router's namespaces (on both nodes: the dead node's is left as it
/// was), the switches, the external HTTP server, the external and probe namespaces, the
/// nodes' namespaces with their DHCP servers, the nodes (guests, libvirtd).
struct Rig {
    gateway_mac: Option<String>,
    switches: Vec<Switch>,
    web: Option<Proc>,
    host: Option<Namespaces>,
    nets: Vec<NodeNetns>,
    nodes: Vec<Node>,
}

impl Drop for Rig {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            n.kill_agent();
        }
        if let Some(mac) = &self.gateway_mac {
            for ns in namespaces_with_mac("qrouter-", mac) {
                let _ = ip(&["netns", "del", &ns]);
            }
        }
    }
}

impl Rig {
    fn logs(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("agent of {}:\n{}", n.name, n.agent_log()))
            .chain(self.switches.iter().map(|s| s.daemon_logs(60)))
            .collect::<Vec<_>>()
            .join("\n----\n")
    }
}

/// The external network (project [`EXT_NS`]), project [`P`]'s network, groups, Ports and
/// Router, and its two Servers on node `b`.
fn objects_yaml(b: &str) -> String {
    let external = external_network_yaml(EXT_NS, "physnet1");
    format!(
        r#"{external}---
apiVersion: network.stratus.dev/v1
kind: Network
metadata: {{name: net, namespace: {P}}}
spec: {{}}
---
apiVersion: network.stratus.dev/v1
kind: Subnet
metadata: {{name: sn, namespace: {P}}}
spec: {{network: net, cidr: 10.71.0.0/24, gatewayIP: 10.71.0.1}}
---
apiVersion: network.stratus.dev/v1
kind: SecurityGroup
metadata: {{name: web, namespace: {P}}}
spec:
  rules:
  - {{direction: egress}}
  - {{direction: ingress, protocol: icmp, remoteIPPrefix: 203.0.113.0/24}}
  - {{direction: ingress, protocol: tcp, portRangeMin: 8080, portRangeMax: 8080, remoteIPPrefix: 203.0.113.0/24}}
  - {{direction: ingress, protocol: icmp, remoteGroup: clients}}
---
apiVersion: network.stratus.dev/v1
kind: SecurityGroup
metadata: {{name: clients, namespace: {P}}}
spec:
  rules:
  - {{direction: egress}}
---
apiVersion: network.stratus.dev/v1
kind: SecurityGroup
metadata: {{name: quiet, namespace: {P}}}
spec:
  rules:
  - {{direction: egress}}
---
apiVersion: network.stratus.dev/v1
kind: Port
metadata: {{name: f-port, namespace: {P}}}
spec: {{network: net, securityGroups: [web]}}
---
apiVersion: network.stratus.dev/v1
kind: Port
metadata: {{name: s-port, namespace: {P}}}
spec: {{network: net, securityGroups: [default]}}
---
apiVersion: network.stratus.dev/v1
kind: Port
metadata: {{name: probe, namespace: {P}}}
spec: {{network: net, securityGroups: [quiet]}}
---
apiVersion: network.stratus.dev/v1
kind: Router
metadata: {{name: r1, namespace: {P}}}
spec:
  externalGateway: {{network: {EXT_NS}/ext}}
  interfaces: [{{subnet: sn}}]
---
apiVersion: compute.stratus.dev/v1
kind: Server
metadata: {{name: f, namespace: {P}}}
spec: {{flavor: m1.nano, image: tiny, availabilityZone: {b}, networks: [{{port: f-port}}]}}
---
apiVersion: compute.stratus.dev/v1
kind: Server
metadata: {{name: s, namespace: {P}}}
spec: {{flavor: m1.nano, image: tiny, availabilityZone: {b}, networks: [{{port: s-port}}]}}
"#
    )
}

fn get(cloud: &Cloud, ns: &str, kind: &str, name: &str) -> Option<Value> {
    let out = cloud
        .kubectl_ok(&["-n", ns, "get", kind, name, "-o", "json"])
        .ok()?;
    serde_json::from_str(&out).ok()
}

/// A field of `kind` `name` of project `ns` once `ok` holds of it.
fn field_when(
    cloud: &Cloud,
    ns: &str,
    kind: &str,
    name: &str,
    pointer: &str,
    ok: impl Fn(&Value) -> bool,
) -> Option<Value> {
    get(cloud, ns, kind, name)?
        .pointer(pointer)
        .filter(|v| ok(v))
        .cloned()
}

/// A guest of the test: its Server's uid (and so its domain), its Port's address.
struct Vm {
    uid: String,
    ip: String,
}

impl Vm {
    fn domain(&self) -> String {
        format!("stratus-{}", self.uid)
    }
}

/// Waits for Server `name` on node `node` to run with its Port `port`'s address leased.
fn running(cloud: &Cloud, rig: &Rig, name: &'static str, port: &str, node: usize) -> Result<Vm> {
    let s = wait_until(BOOT, &format!("{name} running"), || {
        get(cloud, P, "server", name).filter(|v| v["status"]["phase"] == "Running")
    })
    .with_context(|| rig.logs())?;
    ensure!(
        s["status"]["hypervisor"] == rig.nodes[node].name.as_str(),
        "{name} on {}",
        s["status"]["hypervisor"]
    );
    let p = get(cloud, P, "port", port).context("the port")?;
    let vm = Vm {
        uid: s["metadata"]["uid"].as_str().context("uid")?.to_owned(),
        ip: p["status"]["fixedIPs"][0]["ipAddress"]
            .as_str()
            .context("an address")?
            .to_owned(),
    };
    rig.nodes[node]
        .wait_lease(&vm.uid, "eth0", &vm.ip, BOOT)
        .with_context(|| format!("{name}'s lease\n{}", rig.logs()))?;
    Ok(vm)
}

/// `curl` from namespace `ns`: what it printed, if it succeeded.
fn curl(ns: &str, args: &[&str]) -> Option<String> {
    let mut all = vec!["curl", "-s", "--noproxy", "*", "-m", "30"];
    all.extend_from_slice(args);
    let (ok, out) = netns_exec(ns, &all);
    ok.then_some(out)
}

/// Checks that the external namespace reaches `f`'s busybox httpd on `fip`: its page, and
/// [`BIG`] bytes.
fn fetch_from_f(ext: &str, fip: &str) -> Result<()> {
    let page = wait_until(T, "f's page on its floating address", || {
        curl(ext, &[&format!("http://{fip}:8080/")])
    })?;
    ensure!(page.trim() == "F-42", "f's page: {page:?}");
    let size = curl(
        ext,
        &[
            "-o",
            "/dev/null",
            "-w",
            "%{size_download}",
            &format!("http://{fip}:8080/big"),
        ],
    )
    .context("256 KiB from f on its floating address")?;
    ensure!(size == BIG.to_string(), "fetched {size} bytes from f");
    Ok(())
}

/// Has `s` ping the external address and fetch [`BIG`] bytes from its server, `n` (a
/// number of this test's choosing) making the marker of the command unique.
fn s_reaches_outside(rig: &Rig, s: &Vm, b: usize, n: u32) -> Result<()> {
    let marker = format!("GR-SNAT{n}-");
    rig.nodes[b]
        .type_until(
            &s.uid,
            &s.domain(),
            &format!(
                "ping -c 3 -W 2 {EXTERNAL} >/dev/null && rm -f /tmp/big && timeout 60 wget -q -O /tmp/big http://{EXTERNAL}:8080/big && [ $(wc -c </tmp/big) -eq {BIG} ] && echo {marker}$((40+2))"
            ),
            &format!("{marker}42"),
            3,
        )
        .with_context(|| rig.logs())
}

/// The lines of the external HTTP server's log that record a fetch of `/big`.
fn fetches_of_big(log: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("GET /big "))
        .map(str::to_owned)
        .collect()
}

fn routed_guests(variant: &str, datapaths: [Datapath; 2]) -> Result<()> {
    let started = Instant::now();
    let guest = Guest::serve()?;
    let tag = format!("gr{}{variant}", std::process::id() % 100_000);
    let names = [format!("{tag}-a"), format!("{tag}-b")];
    let (ext, probe) = (format!("{tag}-x"), format!("{tag}-p"));
    let (a, b) = (0, 1);
    let mut rig = Rig {
        gateway_mac: None,
        switches: Vec::new(),
        web: None,
        host: None,
        nets: Vec::new(),
        nodes: Vec::new(),
    };
    for n in &names {
        rig.nodes.push(Node::start(n)?);
    }
    let cloud = Cloud::up_with(&["--nodes", &names.join(",")])?;
    cloud.projects(&[P, EXT_NS])?;
    for node in &rig.nodes {
        rig.nets.push(node.named_netns()?);
    }
    rig.host = Some(Namespaces::add(&[&ext, &probe], &[])?);
    underlay(&names[a], &names[b])?;
    if datapaths.contains(&Datapath::Ovs) {
        for (n, d) in names.iter().zip(datapaths) {
            if d == Datapath::Kernel {
                checksum_underlay(n)?;
            }
        }
    }
    external_bridge(&ext, &[&names[a], &names[b]], &format!("{EXTERNAL}/24"))?;
    for (i, node) in rig.nodes.iter_mut().enumerate() {
        let extra = [
            "--zone",
            &names[i],
            "--physical-interface",
            "physnet1=physnet",
        ];
        let switch = node.start_agent_on(&cloud, datapaths[i], UNDERLAY[i], &extra)?;
        rig.switches.extend(switch);
    }

    // The guest with a shell on its console, and the objects; node A alone granted physnet1,
    // so that the router goes there.
    let flavors = repo_root().join("examples/flavors.yaml");
    cloud.kubectl_ok(&["apply", "-f", flavors.to_str().unwrap_or_default()])?;
    cloud.kubectl_in(&["apply", "-f", "-"], &guest.shell_images_yaml(P)?)?;
    let grant = |node: &str| -> Result<()> {
        wait_until(T, &format!("Hypervisor {node}"), || {
            get(&cloud, "default", "hypervisor", node)
        })?;
        cloud.kubectl_ok(&[
            "annotate",
            "--overwrite",
            "hypervisor",
            node,
            "network.stratus.dev/physical-networks=physnet1",
        ])?;
        Ok(())
    };
    grant(&names[a])?;
    cloud.default_group_made(P)?;
    cloud.kubectl_in(&["apply", "-f", "-"], &objects_yaml(&names[b]))?;

    let placed = wait_until(T, "the router to be placed", || {
        field_when(&cloud, P, "router", "r1", "/status/node", |n| {
            n.as_str().is_some_and(|n| !n.is_empty())
        })
    })
    .with_context(|| rig.logs())?;
    ensure!(placed == names[a].as_str(), "the router went to {placed}");
    grant(&names[b])?;
    let router = wait_until(T, "the router to be Ready", || {
        get(&cloud, P, "router", "r1").filter(|r| {
            r["status"]["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|c| c["type"] == "Ready" && c["status"] == "True")
        })
    })
    .with_context(|| rig.logs())?;
    let gateway_ip = router["status"]["externalGatewayIPs"][0]
        .as_str()
        .context("the router's gateway address")?
        .to_owned();
    let gateway_port = router["status"]["externalGatewayPort"]
        .as_str()
        .context("the router's gateway port")?;
    let (gw_ns, gw_name) = gateway_port
        .split_once('/')
        .with_context(|| format!("gateway port {gateway_port:?}"))?;
    rig.gateway_mac = Some(
        get(&cloud, gw_ns, "port", gw_name)
            .and_then(|p| p["status"]["macAddress"].as_str().map(str::to_owned))
            .context("the gateway port's MAC")?,
    );

    // The probe on node A.
    let probe_ip = plug_cloud_port(&cloud, P, "probe", &names[a], "grprobe", &probe)?;
    ip(&[
        "-n",
        &probe,
        "addr",
        "add",
        &format!("{probe_ip}/24"),
        "dev",
        "eth0",
    ])?;

    let f = running(&cloud, &rig, "f", "f-port", b)?;
    let s = running(&cloud, &rig, "s", "s-port", b)?;
    let booted = started.elapsed();

    // 1. f on its floating address: ping (answered from that address), then TCP.
    cloud.kubectl_in(
        &["-n", P, "apply", "-f", "-"],
        &format!(
            "apiVersion: network.stratus.dev/v1\nkind: FloatingIP\nmetadata: {{name: f1}}\nspec: {{floatingNetwork: {EXT_NS}/ext, port: f-port}}\n"
        ),
    )?;
    let fip = wait_until(T, "f's floating address to be Active", || {
        let v = get(&cloud, P, "floatingip", "f1")?;
        (v["status"]["phase"] == "Active")
            .then(|| v["status"]["floatingIPAddress"].as_str().map(str::to_owned))
            .flatten()
    })
    .with_context(|| rig.logs())?;
    let source = wait_until(T, "f to answer on its floating address", || {
        ping_reply_source(&ext, &fip)
    })
    .with_context(|| rig.logs())?;
    ensure!(source == fip, "the echo to {fip} was answered by {source}");
    rig.nodes[b].type_until(
        &f.uid,
        &f.domain(),
        &format!(
            "mkdir -p /www && echo F-$((40+2)) >/www/index.html && dd if=/dev/zero of=/www/big bs=1024 count={} 2>/dev/null; httpd -p 8080 -h /www; echo GR-HTTPD-$((40+2))",
            BIG / 1024
        ),
        "GR-HTTPD-42",
        3,
    )?;
    fetch_from_f(&ext, &fip).with_context(|| rig.logs())?;

    // 2. s reaches the outside through the router's SNAT: the external side sees the
    // gateway's address, never s's.
    let root = tempfile::tempdir()?;
    std::fs::write(root.path().join("big"), vec![0u8; BIG])?;
    let web_log = rig.nodes[a].dir.path().join("external-http.log");
    rig.web = Some(Proc::spawn(
        "the external HTTP server",
        Command::new("ip")
            .args(["netns", "exec", &ext, "python3", "-m", "http.server"])
            .args(["--bind", EXTERNAL, "8080", "--directory"])
            .arg(root.path()),
        &web_log,
    )?);
    count_pings_from(&ext, &[&gateway_ip, &s.ip, &fip])?;
    s_reaches_outside(&rig, &s, b, 1)?;
    let fetches = fetches_of_big(&web_log);
    ensure!(
        !fetches.is_empty()
            && fetches
                .iter()
                .all(|l| l.starts_with(&format!("{gateway_ip} "))),
        "s's fetches, as the server saw them (SNAT to {gateway_ip}): {fetches:?}"
    );
    ensure!(
        pings_counted(&ext, &gateway_ip)? >= 3,
        "s's pings SNATed to {gateway_ip}"
    );
    ensure!(pings_counted(&ext, &s.ip)? == 0, "s's own address left");

    // 3. The remote group: ICMP into f from members of `clients`. The probe's running ping
    // goes unanswered; its Port joins `clients`, and it is answered within a second of the
    // write; leaves it, and it stops within a second.
    let ports = MergePatcher::new(&cloud, "network.stratus.dev", "Port", "ports", P, "probe")?;
    let groups = |names: &[&str]| json!({"spec": {"securityGroups": names}});
    let pings = ContinuousPing::start(&probe, &f.ip, T + T)?;
    std::thread::sleep(Duration::from_secs(3));
    ensure!(
        pings.replies_after(started).is_empty(),
        "the probe reached f before it joined clients"
    );
    let joined = Instant::now();
    ports.patch("probe", groups(&["quiet", "clients"]))?;
    let first = wait_until(T, "the probe's pings to f once a member", || {
        pings.replies_after(joined).first().copied()
    })
    .with_context(|| rig.logs())?;
    std::thread::sleep(Duration::from_secs(2));
    let left = Instant::now();
    ports.patch("probe", groups(&["quiet"]))?;
    let last = wait_until(T, "the probe's pings to f to stop", || {
        let last = pings.replies_after(left).last().copied();
        (last.unwrap_or(left).elapsed() >= Duration::from_secs(3)).then_some(last)
    })
    .with_context(|| rig.logs())?;
    drop(pings);
    let (let_in, cut) = (
        first.duration_since(joined),
        last.map_or(Duration::ZERO, |t| t.duration_since(left)),
    );
    eprintln!(
        "{variant}: the probe joined clients: first echo answered {let_in:?} after the write; left: last answered {cut:?} after"
    );
    ensure!(
        let_in <= AT_ONCE,
        "let in {let_in:?} after joining\n{}",
        rig.logs()
    );
    ensure!(
        cut <= AT_ONCE,
        "still answered {cut:?} after leaving\n{}",
        rig.logs()
    );

    // The real guest s: kept out, let in as a member, kept out again once it leaves.
    let s_node = &rig.nodes[b];
    let s_pings = |marker: &str, reached: bool| {
        let command = if reached {
            format!(
                "ping -c 3 -W 2 {} >/dev/null && echo {marker}$((40+2))",
                f.ip
            )
        } else {
            format!(
                "ping -c 3 -W 1 {} >/dev/null || echo {marker}$((40+2))",
                f.ip
            )
        };
        s_node
            .type_until(&s.uid, &s.domain(), &command, &format!("{marker}42"), 3)
            .with_context(|| rig.logs())
    };
    let s_port = MergePatcher::new(&cloud, "network.stratus.dev", "Port", "ports", P, "s-port")?;
    s_pings("GR-S-OUT1-", false)?;
    s_port.patch("s-port", groups(&["default", "clients"]))?;
    s_pings("GR-S-IN-", true)?;
    s_port.patch("s-port", groups(&["default"]))?;
    s_pings("GR-S-OUT2-", false)?;

    // 4. Node A dies: its agent killed, off both networks (as a node cut off rather than
    // powered off: its router namespace left as it was). The router moves to node B once
    // A's Lease expires, and the external side's running ping to f's floating address is
    // answered again.
    let outage = ContinuousPing::start(&ext, &fip, BOOT)?;
    let before = Instant::now();
    wait_until(
        T,
        "the floating address answering before the node dies",
        || outage.replies_after(before).first().copied(),
    )?;
    rig.nodes[a].kill_agent();
    for link in ["underlay", "physnet"] {
        ip(&["-n", &names[a], "link", "set", link, "down"])?;
    }
    let died = Instant::now();
    wait_until(T, "the floating address to go quiet", || {
        let last = outage.replies_after(died).last().copied();
        (last.unwrap_or(died).elapsed() >= Duration::from_secs(2)).then_some(())
    })?;
    let quiet = Instant::now();
    let moved = wait_until(Duration::from_secs(180), "the router to move", || {
        field_when(&cloud, P, "router", "r1", "/status/node", |n| {
            *n == names[b].as_str()
        })
        .map(|_| Instant::now())
    })
    .with_context(|| rig.logs())?;
    let resumed = wait_until(T, "the floating address to answer again", || {
        outage.replies_after(quiet).first().copied()
    })
    .with_context(|| rig.logs())?;
    drop(outage);
    eprintln!(
        "{variant}: node A died; the router moved {:?} after, the floating address answered again {:?} after",
        moved.duration_since(died),
        resumed.duration_since(died)
    );
    ensure!(
        ping_reply_source(&ext, &fip).as_deref() == Some(fip.as_str()),
        "the echo to {fip} is answered from elsewhere after the move"
    );
    fetch_from_f(&ext, &fip).with_context(|| rig.logs())?;
    let (counted, fetched) = (
        pings_counted(&ext, &gateway_ip)?,
        fetches_of_big(&web_log).len(),
    );
    s_reaches_outside(&rig, &s, b, 2)?;
    let fetches = fetches_of_big(&web_log);
    ensure!(
        fetches.len() > fetched
            && fetches
                .iter()
                .all(|l| l.starts_with(&format!("{gateway_ip} "))),
        "s's fetches through node B: {fetches:?}"
    );
    ensure!(pings_counted(&ext, &gateway_ip)? >= counted + 3);
    ensure!(pings_counted(&ext, &s.ip)? == 0, "s's own address left");
    let stale = namespaces_with_mac("qrouter-", rig.gateway_mac.as_deref().unwrap_or_default());
    ensure!(
        stale.len() == 2,
        "the router's namespace on B and the one left on the dead A: {stale:?}"
    );
    eprintln!(
        "{variant}: guests booted with leases in {booted:?}; whole test {:?}",
        started.elapsed()
    );
    drop(rig);
    Ok(())
}

#[test]
fn kernel_and_kernel() -> Result<()> {
    routed_guests("kk", [Datapath::Kernel, Datapath::Kernel])
}

#[test]
fn ovs_and_ovs() -> Result<()> {
    routed_guests("oo", [Datapath::Ovs, Datapath::Ovs])
}

#[test]
fn kernel_and_ovs() -> Result<()> {
    routed_guests("ko", [Datapath::Kernel, Datapath::Ovs])
}
