//! The network agent's Open vSwitch datapath against a real API server: two nodes (network
//! namespaces joined by a veth underlay on 192.0.2.0/24), node 1 on the kernel datapath and
//! node 2 on `stratus agent --roles network --datapath ovs` (which starts its own
//! `ovsdb-server` and `ovs-vswitchd` in the node's namespace, userspace datapath, files under
//! its state directory), one Network across both. The ports go Active; each guest takes its
//! address from its own node's dnsmasq and pings the other across VXLAN between a Linux
//! VXLAN device and an OVS tunnel port; the OVS node's tunnel port and delivery flows deleted
//! by hand are back within seconds with Events; a restarted OVS agent changes no flow (a
//! ping running across the restart loses no packet); a security-group rule removed, then
//! added back, is enforced by the OVS node's conntrack flows; with the ports deleted nothing
//! of Stratus's is left on either node (no port, tunnel or flow of a network or port on the
//! switch). The switch is stopped and the namespaces removed when the test ends, even when
//! it fails.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use stratus_e2e::net::{
    Namespaces, UNDERLAY, agent_logs, links_of_kind, network_agent, ping, plug_port, underlay,
};
use stratus_e2e::{Apiserver, Etcd, Proc, ip, wait_until};

use super::network_agent::{NS, exec, jsonpath, kubectl, lease, patch_status};

/// Generous: the agents and the userspace switch share two cores with every other test.
const T: Duration = Duration::from_secs(120);

/// The cookie kinds (a cookie's top byte) of a network's and a port's flows, and of what
/// `learn()` adds (no object's).
const KIND_NETWORK: u64 = 0x52;
const KIND_PORT: u64 = 0x53;
const LEARNED: u64 = 0x5f;

/// The OVS node's switch: its tools pointed at the daemons the agent started under its state
/// directory, which are stopped when this is dropped (after the agents, before the
/// namespaces go).
struct Switch {
    dir: PathBuf,
}

impl Switch {
    fn vsctl(&self, args: &[&str]) -> Result<String> {
        let out = Command::new("ovs-vsctl")
            .arg(format!("--db=unix:{}", self.dir.join("db.sock").display()))
            .arg("--timeout=30")
            .args(args)
            .output()
            .context("run ovs-vsctl")?;
        if !out.status.success() {
            bail!(
                "ovs-vsctl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn ofctl(&self, command: &str, args: &[&str]) -> Result<String> {
        let out = Command::new("ovs-ofctl")
            .args(["-O", "OpenFlow15", command])
            .arg(format!("unix:{}", self.dir.join("br-int.mgmt").display()))
            .args(args)
            .output()
            .context("run ovs-ofctl")?;
        if !out.status.success() {
            bail!(
                "ovs-ofctl {command} {args:?}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The integration bridge's flows the agent owns (everything but learned MACs), without
    /// counters.
    fn owned_flows(&self) -> Result<BTreeSet<String>> {
        Ok(self
            .ofctl("dump-flows", &["--no-stats"])?
            .lines()
            .filter(|l| cookie(l).is_some_and(|c| c >> 56 != LEARNED && c != 0))
            .map(str::to_owned)
            .collect())
    }

    /// How many distinct objects of `kind` have flows.
    fn objects(&self, kind: u64) -> Result<usize> {
        Ok(self
            .ofctl("dump-flows", &["--no-stats"])?
            .lines()
            .filter_map(cookie)
            .filter(|c| c >> 56 == kind)
            .collect::<BTreeSet<_>>()
            .len())
    }

    /// The integration bridge's ports.
    fn ports(&self) -> Result<BTreeSet<String>> {
        Ok(self
            .vsctl(&["list-ports", "br-int"])?
            .lines()
            .map(str::to_owned)
            .collect())
    }

    /// The tunnel ports (VXLAN interfaces) of the integration bridge.
    fn tunnels(&self) -> Result<BTreeSet<String>> {
        let out = self.vsctl(&[
            "--format=csv",
            "--no-headings",
            "--columns=name",
            "find",
            "Interface",
            "type=vxlan",
        ])?;
        Ok(out
            .lines()
            .map(|l| l.trim_matches('"').to_owned())
            .collect())
    }

    /// The pid a daemon's pid file names, while that process is the daemon.
    fn pid(&self, daemon: &str) -> Option<String> {
        let pid = std::fs::read_to_string(self.dir.join(format!("{daemon}.pid"))).ok()?;
        let pid = pid.trim().to_owned();
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
        (comm.trim() == daemon).then_some(pid)
    }
}

impl Drop for Switch {
    fn drop(&mut self) {
        for daemon in ["ovs-vswitchd", "ovsdb-server"] {
            let Some(pid) = self.pid(daemon) else {
                continue;
            };
            let _ = Command::new("kill").arg(&pid).status();
            let stopped = wait_until(Duration::from_secs(10), daemon, || {
                self.pid(daemon).is_none().then_some(())
            });
            if stopped.is_err() {
                let _ = Command::new("kill").args(["-KILL", &pid]).status();
            }
        }
    }
}

/// The cookie of one line of `ovs-ofctl dump-flows`.
fn cookie(line: &str) -> Option<u64> {
    let hex = line.trim().strip_prefix("cookie=0x")?;
    let hex = hex.split(',').next()?;
    u64::from_str_radix(hex, 16).ok()
}

/// A node's network agent on datapath `datapath`, its tunnel at `underlay`
/// (`--underlay-ip ADDRESS` or `--tunnel-interface NAME`).
fn agent(
    node: &str,
    datapath: &str,
    underlay: [&str; 2],
    state: &Path,
    kubeconfigs: &Path,
) -> Result<Proc> {
    let kubeconfig = kubeconfigs.join(format!("{node}.kubeconfig"));
    network_agent(
        node,
        &kubeconfig,
        state,
        &[&["--datapath", datapath][..], &underlay].concat(),
    )
}

/// How many repairs of drift the Events count (an Event repeated is one Event with a series
/// count).
fn drift_repairs(api: &Apiserver) -> u64 {
    let Ok(list) = kubectl(api, &["get", "events", "-o", "json"]) else {
        return 0;
    };
    let list: serde_json::Value = serde_json::from_str(&list).unwrap_or_default();
    list["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["reason"] == "DriftRepaired")
        .map(|e| e["series"]["count"].as_u64().unwrap_or(1))
        .sum()
}

#[test]
fn a_network_spans_a_kernel_node_and_an_ovs_node_through_the_agents() -> Result<()> {
    let etcd = Etcd::start()?;
    let mut api = Apiserver::start_on(&etcd)?;
    api.projects(&[NS])?;
    let tag = std::process::id();
    let (n1, n2) = (format!("sovs-{tag}-n1"), format!("sovs-{tag}-n2"));
    let (g1, g2) = (format!("sovs-{tag}-g1"), format!("sovs-{tag}-g2"));
    let (s1, s2) = (tempfile::tempdir()?, tempfile::tempdir()?);
    let _host = Namespaces::add(&[&n1, &n2, &g1, &g2], &[s1.path(), s2.path()])?;
    let switch = Switch {
        dir: s2.path().join("network/ovs"),
    };
    underlay(&n1, &n2)?;
    // A NIC fills in the UDP checksums the kernel's VXLAN leaves to it; a veth hands them on
    // unfilled, and OVS's userspace datapath drops such packets.
    assert!(exec(&n1, &["ethtool", "-K", "underlay", "tx", "off"]));

    api.kubectl_in(
        &["apply", "-f", "-"],
        &format!(
            r#"
apiVersion: compute.stratus.dev/v1
kind: Hypervisor
metadata: {{name: {n1}}}
spec: {{hypervisorType: qemu}}
---
apiVersion: compute.stratus.dev/v1
kind: Hypervisor
metadata: {{name: {n2}}}
spec: {{hypervisorType: qemu}}
---
apiVersion: network.stratus.dev/v1
kind: Network
metadata: {{name: net, namespace: {NS}}}
spec: {{}}
---
apiVersion: network.stratus.dev/v1
kind: Subnet
metadata: {{name: sn, namespace: {NS}}}
spec: {{network: net, cidr: 10.61.0.0/24, gatewayIP: 10.61.0.1}}
---
apiVersion: network.stratus.dev/v1
kind: SecurityGroup
metadata: {{name: default, namespace: {NS}}}
spec:
  rules:
  - {{direction: ingress, protocol: icmp, remoteGroup: default}}
  - {{direction: egress}}
---
apiVersion: network.stratus.dev/v1
kind: Port
metadata: {{name: p1, namespace: {NS}}}
spec: {{network: net}}
---
apiVersion: network.stratus.dev/v1
kind: Port
metadata: {{name: p2, namespace: {NS}}}
spec: {{network: net}}
"#
        ),
    )?;
    if jsonpath(&api, "network", "net", "{.status.vni}")?.is_empty() {
        patch_status(&api, "network", "net", serde_json::json!({"vni": 6101}))?;
    }
    let mut guests = Vec::new();
    for (i, (port, node, guest)) in [("p1", &n1, &g1), ("p2", &n2, &g2)].into_iter().enumerate() {
        let device = format!("tp-ovs-{}", i + 1);
        let addr = plug_port(&api, NS, port, node, &device, guest, Some(1450))?;
        guests.push((guest.clone(), addr));
    }

    let ids = tempfile::tempdir()?;
    api.node_identities(&[&n1, &n2], ids.path())?;
    let states = [s1.path(), s2.path()];
    let _a1 = agent(
        &n1,
        "kernel",
        ["--underlay-ip", UNDERLAY[0]],
        s1.path(),
        ids.path(),
    )?;
    // The OVS node's tunnel interface goes on its switch's underlay bridge, which the
    // userspace datapath sends VXLAN from.
    let ovs_underlay = ["--tunnel-interface", "underlay"];
    let mut a2 = agent(&n2, "ovs", ovs_underlay, s2.path(), ids.path())?;

    for (node, want) in [(&n1, UNDERLAY[0]), (&n2, UNDERLAY[1])] {
        wait_until(T, "the node's hostIP", || {
            api.kubectl_ok(&["get", "hypervisor", node, "-o", "jsonpath={.status.hostIP}"])
                .ok()
                .filter(|ip| ip == want)
        })
        .with_context(|| agent_logs(&states))?;
    }
    for port in ["p1", "p2"] {
        wait_until(T, "the port to be Active", || {
            jsonpath(&api, "port", port, "{.status.phase}")
                .ok()
                .filter(|p| p == "Active")
        })
        .with_context(|| agent_logs(&states))?;
        let ready = jsonpath(
            &api,
            "port",
            port,
            "{.status.conditions[?(@.type==\"Ready\")].reason}",
        )?;
        assert_eq!(ready, "Wired", "{port}");
    }
    // The OVS node: its guest's port on the integration bridge with its flows, one tunnel
    // port, to the kernel node.
    let ports = switch.ports()?;
    assert!(ports.contains("tp-ovs-2"), "{ports:?}");
    let tunnels = switch.tunnels()?;
    assert_eq!(tunnels.len(), 1, "{tunnels:?}");
    let options = switch.vsctl(&[
        "get",
        "Interface",
        tunnels.first().map_or("", String::as_str),
        "options:remote_ip",
    ])?;
    assert_eq!(options.trim().trim_matches('"'), UNDERLAY[0]);
    // The guest's port and the DHCP server's; one network.
    assert_eq!(switch.objects(KIND_PORT)?, 2);
    assert_eq!(switch.objects(KIND_NETWORK)?, 1);

    // Each guest takes its address from its own node's dnsmasq; they reach each other.
    let dir = tempfile::tempdir()?;
    for (guest, addr) in &guests {
        let offered = wait_until(T, "a DHCP offer", || lease(guest, dir.path()))
            .with_context(|| agent_logs(&states))?;
        assert_eq!(&offered, addr, "{guest}");
        ip(&[
            "-n",
            guest,
            "addr",
            "add",
            &format!("{addr}/24"),
            "dev",
            "eth0",
        ])?;
    }
    let (ip1, ip2) = (guests[0].1.clone(), guests[1].1.clone());
    wait_until(T, "the kernel node's guest to reach the OVS node's", || {
        ping(&g1, &ip2).then_some(())
    })?;
    wait_until(T, "the OVS node's guest to reach the kernel node's", || {
        ping(&g2, &ip1).then_some(())
    })?;

    // Drift by hand on the OVS node, one at a time (the repair of one writes every missing
    // flow, so two made at once could be repaired by one step): its tunnel port, then its
    // delivery flows; each is back within seconds, with an Event.
    // A repair counted by the Events, and said in the OVS agent's log with `what`.
    let repaired = |before: u64, what: &str| {
        wait_until(T, what, || {
            (drift_repairs(&api) > before && agent_logs(&[s2.path()]).contains(what)).then_some(())
        })
        .with_context(|| {
            format!(
                "events: {}\nagent logs:\n{}",
                kubectl(&api, &["get", "events", "-o", "json"]).unwrap_or_default(),
                agent_logs(&states)
            )
        })
    };
    let tunnel = tunnels.first().cloned().context("a tunnel port")?;
    let before = drift_repairs(&api);
    switch.vsctl(&["del-port", "br-int", &tunnel])?;
    wait_until(T, "the tunnel port to be back", || {
        (switch.tunnels().ok()? == tunnels).then_some(())
    })?;
    repaired(before, "set the FDB of")?;
    wait_until(T, "the overlay to work again", || {
        ping(&g1, &ip2).then_some(())
    })?;
    let before = drift_repairs(&api);
    switch.ofctl("del-flows", &["table=30"])?;
    repaired(before, "put tp-ovs-2 on")?;
    wait_until(T, "the overlay to work again", || {
        ping(&g1, &ip2).then_some(())
    })?;

    // A restarted OVS agent finds its switch right and changes no flow; a ping running
    // across the restart (40 echoes 150 ms apart) loses none.
    wait_until(T, "the guests to ping again", || {
        ping(&g2, &ip1).then_some(())
    })?;
    let before = switch.owned_flows()?;
    let pinger = Command::new("ip")
        .args([
            "netns", "exec", &g1, "busybox", "ping", "-c", "40", "-i", "0.15", "-W", "3",
        ])
        .arg(&ip2)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    std::thread::sleep(Duration::from_millis(500));
    a2.terminate()?;
    a2 = agent(&n2, "ovs", ovs_underlay, s2.path(), ids.path())?;
    let out = pinger.wait_with_output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("40 packets transmitted, 40 packets received"),
        "packets lost across the OVS agent's restart: {text}"
    );
    // Two resyncs of the restarted agent at least.
    std::thread::sleep(Duration::from_secs(3));
    assert!(a2.running(), "{}", agent_logs(&states));
    assert_eq!(switch.owned_flows()?, before, "a restart changed flows");

    // Security groups on the OVS node: without the ICMP rule, its guest is not reached
    // (nor the kernel node's); with it back, both are.
    let group = |rules: &str| {
        format!(
            "apiVersion: network.stratus.dev/v1\nkind: SecurityGroup\nmetadata: {{name: default, namespace: {NS}}}\nspec:\n  rules:\n{rules}"
        )
    };
    let icmp = "  - {direction: ingress, protocol: icmp, remoteGroup: default}\n";
    let egress = "  - {direction: egress}\n";
    // At once: the agents' one-second resync, plus kubectl and ping on a loaded machine.
    let at_once = Duration::from_secs(45);
    api.kubectl_in(&["apply", "-f", "-"], &group(egress))?;
    wait_until(
        at_once,
        "ICMP to the OVS node's guest to be dropped",
        || (!ping(&g1, &ip2)).then_some(()),
    )?;
    wait_until(
        at_once,
        "ICMP to the kernel node's guest to be dropped",
        || (!ping(&g2, &ip1)).then_some(()),
    )?;
    // Stays dropped: not a packet lost by chance.
    for _ in 0..3 {
        assert!(!ping(&g1, &ip2), "ICMP to the OVS node's guest passed");
    }
    api.kubectl_in(&["apply", "-f", "-"], &group(&format!("{icmp}{egress}")))?;
    wait_until(
        at_once,
        "ICMP to the OVS node's guest to be allowed",
        || ping(&g1, &ip2).then_some(()),
    )?;
    wait_until(
        at_once,
        "ICMP to the kernel node's guest to be allowed",
        || ping(&g2, &ip1).then_some(()),
    )?;

    // The ports deleted: nothing of Stratus's is left on either node.
    kubectl(&api, &["delete", "port", "p1", "p2"])?;
    wait_until(T, "the kernel node to be clean", || {
        let clean = links_of_kind(&n1, "vxlan").ok()?.is_empty()
            && links_of_kind(&n1, "bridge").ok()?.is_empty()
            && !exec(&n1, &["nft", "list", "table", "inet", "stratus"]);
        clean.then_some(())
    })?;
    wait_until(T, "the OVS node's switch to be clean", || {
        let clean = switch.ports().ok()?.is_empty()
            && switch.objects(KIND_NETWORK).ok()? == 0
            && switch.objects(KIND_PORT).ok()? == 0;
        clean.then_some(())
    })
    .with_context(|| {
        format!(
            "ports {:?}, flows:\n{}",
            switch.ports(),
            switch.ofctl("dump-flows", &[]).unwrap_or_default()
        )
    })?;
    for dir in states {
        let left: Vec<_> = std::fs::read_dir(dir.join("network/dhcp"))?
            .flatten()
            .collect();
        assert!(left.is_empty(), "DHCP servers left: {left:?}");
    }
    assert!(a2.running(), "{}", agent_logs(&states));
    Ok(())
}
