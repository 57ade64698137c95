//! Provider networks across the Open vSwitch datapath and the kernel one, against a real
//! API server: two nodes (network namespaces joined by a veth underlay on 192.0.2.0/24),
//! node 1 on the kernel datapath and node 2 on `stratus agent --roles network --datapath
//! ovs` (which starts its own `ovsdb-server` and `ovs-vswitchd` in the node's namespace,
//! userspace datapath, files under its state directory), one Network across both. The same
//! two nodes carry a vlan provider network (an 802.1Q sub-interface on the kernel node, tags
//! pushed and stripped by the switch's flows on the OVS node, the frames tagged on the veth
//! between the nodes' physical interfaces) and a flat one (untagged on that veth); each
//! guest takes its address from its own node's dnsmasq and pings the other; with the ports
//! deleted nothing of Stratus's is left on either node (no port or flow of a network or port
//! on the switch). A VXLAN network across a kernel node and an OVS node (and two OVS nodes)
//! is `network_agent`'s two-node test on those pairings. The switch is stopped and the
//! namespaces removed when a test ends, even when it fails.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use stratus_e2e::net::{
    Datapath, KIND_NETWORK, KIND_PORT, Namespaces, Switch, UNDERLAY, agent_logs, checksum_underlay,
    links_of_kind, network_agent_on, ping, plug_port, underlay,
};
use stratus_e2e::{Apiserver, Etcd, Proc, ip, netns_exec, wait_until};

use super::network_agent::{NS, exec, jsonpath, kubectl, lease, patch_status};

/// Generous: the agents and the userspace switch share two cores with every other test.
const T: Duration = Duration::from_secs(120);

/// The physical network the provider networks' tests map on both nodes, and the veth
/// between the nodes that stands in for its wire (`phys` in each).
const PHYSNET: &str = "physnet1";
const PHYS: &str = "phys";

/// Two nodes of one network, as the tests here share them: node 1 on the kernel datapath,
/// node 2 on Open vSwitch (namespaces joined by a veth underlay, and for a provider network
/// by a second veth, `phys`, mapped to [`PHYSNET`] on both), a guest namespace plugged into
/// each as the device of its Port (p1 on node 1, p2 on node 2, in the group `default` that
/// lets ICMP in from its members), both agents running as their nodes, both Ports Active and
/// Wired. Dropped in order: the agents, the switch, the namespaces (with the agents' DHCP
/// servers), the rest.
struct Mixed {
    /// The kernel node's agent and the OVS node's.
    _agents: [Proc; 2],
    switch: Switch,
    _host: Namespaces,
    /// The node namespaces.
    nodes: [String; 2],
    /// The guest namespaces and their addresses.
    guests: [(String, String); 2],
    /// The agents' state directories.
    states: [tempfile::TempDir; 2],
    /// The nodes' kubeconfigs.
    _ids: tempfile::TempDir,
    api: Apiserver,
    _etcd: Etcd,
}

impl Mixed {
    /// The rig with `prefix` naming its namespaces, its Network `net` (10.61.0.0/24) of
    /// spec `spec` (YAML flow mapping); with a `segmentation` in it, the nodes are granted
    /// [`PHYSNET`] and joined by [`PHYS`]. The Ports `wired` are waited for to be Active.
    fn start(prefix: &str, spec: &str, wired: &[&str]) -> Result<Self> {
        let provider = spec.contains("segmentation");
        let etcd = Etcd::start()?;
        let mut api = Apiserver::start_on(&etcd)?;
        api.projects(&[NS])?;
        let tag = std::process::id();
        let [n1, n2, g1, g2] = ["n1", "n2", "g1", "g2"].map(|n| format!("{prefix}-{tag}-{n}"));
        let states = [tempfile::tempdir()?, tempfile::tempdir()?];
        let host = Namespaces::add(&[&n1, &n2, &g1, &g2], &[states[0].path(), states[1].path()])?;
        let switch = Switch::of_state(states[1].path());
        underlay(&n1, &n2)?;
        checksum_underlay(&n1)?;
        if provider {
            // Down: the agents bring up what their networks use.
            ip(&[
                "link", "add", PHYS, "netns", &n1, "type", "veth", "peer", "name", PHYS, "netns",
                &n2,
            ])?;
        }
        let granted = if provider {
            format!("\n  annotations: {{network.stratus.dev/physical-networks: {PHYSNET}}}")
        } else {
            String::new()
        };
        api.kubectl_in(
            &["apply", "-f", "-"],
            &format!(
                r#"
apiVersion: compute.stratus.dev/v1
kind: Hypervisor
metadata:
  name: {n1}{granted}
spec: {{hypervisorType: qemu}}
---
apiVersion: compute.stratus.dev/v1
kind: Hypervisor
metadata:
  name: {n2}{granted}
spec: {{hypervisorType: qemu}}
---
apiVersion: network.stratus.dev/v1
kind: Network
metadata: {{name: net, namespace: {NS}}}
spec: {spec}
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
        if !provider && jsonpath(&api, "network", "net", "{.status.vni}")?.is_empty() {
            patch_status(&api, "network", "net", serde_json::json!({"vni": 6101}))?;
        }
        let mut addrs = Vec::new();
        for (i, (port, node, guest)) in [("p1", &n1, &g1), ("p2", &n2, &g2)].into_iter().enumerate()
        {
            let device = format!("tp-ovs-{}", i + 1);
            addrs.push(plug_port(&api, NS, port, node, &device, guest, Some(1450))?);
        }

        let ids = tempfile::tempdir()?;
        api.node_identities(&[&n1, &n2], ids.path())?;
        let physical = format!("{PHYSNET}={PHYS}");
        let extra = if provider {
            vec!["--physical-interface", &physical]
        } else {
            vec![]
        };
        let agent = |i: usize, node: &str, datapath: Datapath| {
            let kubeconfig = ids.path().join(format!("{node}.kubeconfig"));
            network_agent_on(
                node,
                datapath,
                UNDERLAY[i],
                &kubeconfig,
                states[i].path(),
                &extra,
            )
        };
        let a1 = agent(0, &n1, Datapath::Kernel)?;
        let a2 = agent(1, &n2, Datapath::Ovs)?;
        let m = Mixed {
            _agents: [a1, a2],
            switch,
            _host: host,
            nodes: [n1, n2],
            guests: [(g1, addrs[0].clone()), (g2, addrs[1].clone())],
            states,
            _ids: ids,
            api,
            _etcd: etcd,
        };
        let logs = || m.logs();
        for (node, want) in m.nodes.iter().zip(UNDERLAY) {
            wait_until(T, "the node's hostIP", || {
                m.api
                    .kubectl_ok(&["get", "hypervisor", node, "-o", "jsonpath={.status.hostIP}"])
                    .ok()
                    .filter(|ip| ip == want)
            })
            .with_context(logs)?;
        }
        for port in wired {
            wait_until(T, "the port to be Active", || {
                jsonpath(&m.api, "port", port, "{.status.phase}")
                    .ok()
                    .filter(|p| p == "Active")
            })
            .with_context(logs)?;
            let ready = jsonpath(
                &m.api,
                "port",
                port,
                "{.status.conditions[?(@.type==\"Ready\")].reason}",
            )?;
            assert_eq!(ready, "Wired", "{port}");
        }
        Ok(m)
    }

    /// Both agents' logs.
    fn logs(&self) -> String {
        agent_logs(&[self.states[0].path(), self.states[1].path()])
    }

    /// Each guest takes its address from its own node's dnsmasq, and they ping each other.
    fn lease_and_ping(&self) -> Result<()> {
        let dir = tempfile::tempdir()?;
        for (guest, addr) in &self.guests {
            let offered = wait_until(T, "a DHCP offer", || lease(guest, dir.path()))
                .with_context(|| self.logs())?;
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
        let [(g1, ip1), (g2, ip2)] = &self.guests;
        wait_until(T, "the kernel node's guest to reach the OVS node's", || {
            ping(g1, ip2).then_some(())
        })
        .with_context(|| self.logs())?;
        wait_until(T, "the OVS node's guest to reach the kernel node's", || {
            ping(g2, ip1).then_some(())
        })
        .with_context(|| self.logs())?;
        Ok(())
    }

    /// The MACs that answer guest 1's ARP for its DHCP server's address (the kernel node's
    /// server's, read from its namespace; three broadcast probes): that server's alone while
    /// nothing from the wire reaches the OVS node's server, which has the same address.
    fn dhcp_server_macs(&self) -> Result<BTreeSet<String>> {
        let dir = self.states[0].path().join("network/dhcp");
        let server_ns = std::fs::read_dir(&dir)?
            .flatten()
            .next()
            .context("the kernel node's DHCP server")?
            .file_name();
        let out = ip(&[
            "-n",
            &server_ns.to_string_lossy(),
            "-j",
            "-4",
            "addr",
            "show",
        ])?;
        let links: serde_json::Value = serde_json::from_str(&out).context("ip's JSON")?;
        let server = links
            .as_array()
            .into_iter()
            .flatten()
            .filter(|l| l["ifname"] != "lo")
            .flat_map(|l| l["addr_info"].as_array().cloned().unwrap_or_default())
            .find_map(|a| a["local"].as_str().map(str::to_owned))
            .with_context(|| format!("the DHCP server's address: {out}"))?;
        let (_, out) = netns_exec(
            &self.guests[0].0,
            &[
                "busybox", "arping", "-b", "-c", "3", "-w", "4", "-I", "eth0", &server,
            ],
        );
        Ok(out
            .lines()
            .filter(|l| l.contains("reply from"))
            .filter_map(|l| Some(l.split('[').nth(1)?.split(']').next()?.to_owned()))
            .collect())
    }

    /// Deletes both Ports and waits until neither node has anything of the network's: no
    /// bridge, VXLAN or VLAN device, nft table on the kernel node; no port, network or port
    /// flows on the OVS node's switch.
    fn delete_ports_and_wait_clean(&self) -> Result<()> {
        kubectl(&self.api, &["delete", "port", "p1", "p2"])?;
        let n1 = &self.nodes[0];
        wait_until(T, "the kernel node to be clean", || {
            let clean = ["vxlan", "bridge", "vlan"]
                .iter()
                .all(|k| links_of_kind(n1, k).is_ok_and(|l| l.is_empty()))
                && !exec(n1, &["nft", "list", "table", "inet", "stratus"]);
            clean.then_some(())
        })?;
        let switch = &self.switch;
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
        for dir in &self.states {
            let left: Vec<_> = std::fs::read_dir(dir.path().join("network/dhcp"))?
                .flatten()
                .collect();
            assert!(left.is_empty(), "DHCP servers left: {left:?}");
        }
        Ok(())
    }
}

/// Whether this kernel makes VLAN sub-interfaces (CONFIG_VLAN_8021Q), tried on a dummy link
/// in a namespace of the test's own.
fn kernel_has_8021q() -> Result<bool> {
    let ns = format!("sovq-{}", std::process::id());
    ip(&["netns", "add", &ns])?;
    let made = ip(&["-n", &ns, "link", "add", "probe", "type", "dummy"]).and_then(|_| {
        ip(&[
            "-n", &ns, "link", "add", "link", "probe", "name", "probe.1", "type", "vlan", "id", "1",
        ])
    });
    ip(&["netns", "del", &ns])?;
    Ok(made.is_ok())
}

/// The packets a link of namespace `ns` has received.
fn rx_packets(ns: &str, link: &str) -> Result<u64> {
    let out = ip(&["-n", ns, "-s", "-j", "link", "show", link])?;
    let v: serde_json::Value = serde_json::from_str(&out).context("ip's JSON")?;
    v[0]["stats64"]["rx"]["packets"]
        .as_u64()
        .with_context(|| format!("the packets {link} received: {out}"))
}

/// What the OVS node's switch counted on its flow that strips VLAN `id` from frames
/// arriving on the physical interface (its datapath's counts are added about every second).
fn stripped(switch: &Switch, id: u16) -> Result<u64> {
    Ok(switch
        .ofctl("dump-flows", &[&format!("table=0,dl_vlan={id}")])?
        .lines()
        .filter_map(|l| l.split("n_packets=").nth(1))
        .filter_map(|r| r.split(',').next()?.parse::<u64>().ok())
        .sum())
}

/// A vlan provider network across the kernel node and the OVS node, the nodes' `phys`
/// interfaces joined by a veth standing in for the wire of physnet1: the kernel node makes
/// an 802.1Q sub-interface of `phys` with the VLAN ID on the network's bridge, the OVS node
/// puts `phys` on its integration bridge and tags and strips in its flows (no tunnel port).
/// Each guest takes its lease from its own node, and only that node's DHCP server answers for
/// its address (the other node's, of the same address, is out of the wire's reach). The
/// guests ping each other; every frame between them crosses the wire tagged with the
/// network's VLAN ID, each way (the kernel's sub-interface of that ID receives the OVS node's,
/// the switch's strip flow of that ID counts the kernel node's); with the ports gone, neither
/// node has the network and `phys` is left on both, on no bridge. On a kernel without 802.1Q
/// (CONFIG_VLAN_8021Q) the kernel node's port says so and the OVS node's is wired alone.
#[test]
fn a_vlan_network_spans_a_kernel_node_and_an_ovs_node_through_the_agents() -> Result<()> {
    const VLAN: u16 = 617;
    let dot1q = kernel_has_8021q()?;
    let wired: &[&str] = if dot1q { &["p1", "p2"] } else { &["p2"] };
    let m = Mixed::start(
        "sovl",
        &format!("{{segmentation: vlan, physicalNetwork: {PHYSNET}, segmentationID: {VLAN}}}"),
        wired,
    )?;
    let (n1, n2) = (&m.nodes[0], &m.nodes[1]);
    let id = jsonpath(&m.api, "network", "net", "{.status.segmentationID}")?;
    assert_eq!(id, VLAN.to_string(), "the VLAN ID asked for");
    let ports = m.switch.ports()?;
    assert!(
        ports.contains(PHYS) && ports.contains("tp-ovs-2"),
        "{ports:?}"
    );
    if !dot1q {
        // The kernel node cannot make its side: its port says why, as README promises; the
        // frames across the wire need a kernel with CONFIG_VLAN_8021Q (CI's has it).
        let said = wait_until(T, "p1 to say the kernel has no 802.1Q", || {
            jsonpath(
                &m.api,
                "port",
                "p1",
                "{.status.conditions[?(@.type==\"Ready\")].message}",
            )
            .ok()
            .filter(|msg| msg.contains("no 802.1Q VLAN support"))
        });
        said.with_context(|| m.logs())?;
        eprintln!(
            "this kernel has no 802.1Q: the kernel node's side of VLAN {VLAN} is not crossed"
        );
        return Ok(());
    }
    assert_eq!(
        m.switch.tunnels()?,
        BTreeSet::new(),
        "no tunnel for a vlan network"
    );
    // The kernel node's sub-interface of phys, with the network's VLAN ID.
    let out = ip(&["-n", n1, "-d", "-j", "link", "show", "type", "vlan"])?;
    let vlans: serde_json::Value = serde_json::from_str(&out)?;
    let [sub] = vlans.as_array().map(Vec::as_slice).unwrap_or_default() else {
        bail!("one VLAN sub-interface on the kernel node: {out}");
    };
    assert_eq!(sub["link"], PHYS, "{sub}");
    assert_eq!(sub["linkinfo"]["info_data"]["id"], VLAN, "{sub}");
    let sub = sub["ifname"].as_str().context("its name")?.to_owned();
    assert!(links_of_kind(n1, "bridge")?.len() == 1);

    m.lease_and_ping()?;
    let servers = m.dhcp_server_macs()?;
    assert_eq!(
        servers.len(),
        1,
        "the DHCP server's address answered by {servers:?}"
    );
    // Tagged both ways: count pings after the first (ARP is resolved by now).
    let [(g1, _), (_, ip2)] = &m.guests;
    let count = 10;
    let (rx, strip) = (rx_packets(n1, &sub)?, stripped(&m.switch, VLAN)?);
    for _ in 0..count {
        assert!(ping(g1, ip2), "VLAN {VLAN} across the nodes");
    }
    wait_until(
        T,
        "the switch to count the tagged frames it stripped",
        || (stripped(&m.switch, VLAN).ok()? >= strip + count).then_some(()),
    )?;
    let got = rx_packets(n1, &sub)? - rx;
    assert!(
        got >= count,
        "the kernel's VLAN {VLAN} received {got} of {count} replies"
    );

    m.delete_ports_and_wait_clean()?;
    for n in [n1, n2] {
        let phys = ip(&["-n", n, "-j", "link", "show", PHYS])?;
        assert!(!phys.contains("\"master\""), "{n}: {phys}");
    }
    Ok(())
}

/// A flat provider network across the kernel node and the OVS node on the same wire: the
/// kernel node's `phys` is a port of the network's bridge, the OVS node's a port of its
/// integration bridge; each guest takes its lease from its own node, only that node's DHCP
/// server answers for its address; the guests ping each other over untagged frames; with
/// the ports gone `phys` is left on both nodes, on no bridge.
#[test]
fn a_flat_network_spans_a_kernel_node_and_an_ovs_node_through_the_agents() -> Result<()> {
    let m = Mixed::start(
        "sovf",
        &format!("{{segmentation: flat, physicalNetwork: {PHYSNET}, mtu: 1450}}"),
        &["p1", "p2"],
    )?;
    let n1 = &m.nodes[0];
    let ports = m.switch.ports()?;
    assert!(ports.contains(PHYS), "{ports:?}");
    assert_eq!(
        m.switch.tunnels()?,
        BTreeSet::new(),
        "no tunnel for a flat network"
    );
    let bridges = links_of_kind(n1, "bridge")?;
    let phys = ip(&["-n", n1, "-j", "link", "show", PHYS])?;
    assert!(
        bridges.len() == 1 && phys.contains(&format!("\"master\":\"{}\"", bridges[0])),
        "{bridges:?} {phys}"
    );
    m.lease_and_ping()?;
    let servers = m.dhcp_server_macs()?;
    assert_eq!(
        servers.len(),
        1,
        "the DHCP server's address answered by {servers:?}"
    );
    m.delete_ports_and_wait_clean()?;
    for n in &m.nodes {
        let phys = ip(&["-n", n, "-j", "link", "show", PHYS])?;
        assert!(!phys.contains("\"master\""), "{n}: {phys}");
    }
    Ok(())
}
