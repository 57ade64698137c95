//! The network agent against a real API server, on every pairing of datapaths (kernel and
//! kernel, Open vSwitch and Open vSwitch, kernel and OVS; an OVS node's agent starts its own
//! `ovsdb-server` and `ovs-vswitchd` in the node's namespace, userspace datapath): two nodes
//! (network namespaces joined by a veth underlay on 192.0.2.0/24, each with a `stratus agent
//! --roles network`), guests (namespaces plugged in as the devices of Ports). Project
//! `netdemo` has a Network on 10.0.0.0/24 with a guest on each node; project `netother` a
//! Network of the same CIDR whose guests hold the same addresses. The agents report their
//! tunnel addresses and wire the ports (which go Active; a port whose device is not there is
//! Down saying so until it appears, which is no repair); the guests take their addresses by
//! DHCP from their own node and ping each other across VXLAN; the other project's guest
//! reaches its own network's holder of an address, and not one echo of it arrives at the
//! first project's; drift made by hand (a kernel node's VXLAN device, FDB entry and nft
//! table; an OVS node's tunnel port and delivery flows) is repaired within seconds with
//! Events; a restarted agent changes nothing (no flow, interface or switch reconfiguration;
//! a ping running across the restart loses no echo: every reply reaches the guest's kernel); a security-group rule removed, then added back, stops and starts running pings
//! (one ICMP id each) within a second of the API's answer to the write, on both nodes; with the ports deleted
//! nothing of Stratus's is left on the nodes. The namespaces and switches are removed when
//! a test ends, even when it fails.
//!
//! Each agent runs as its node (`system:node:NAME`), so the node authorizer's rules for the
//! network role are what it reads and writes through.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};
use stratus_e2e::net::{
    Datapath, KIND_NETWORK, KIND_PORT, Namespaces, Switch, UNDERLAY, agent_logs, checksum_underlay,
    count_pings_from, links_of_kind, network_agent_on, ping, pings_counted, plug_port,
    reached_after, underlay, unreached_after,
};
use stratus_e2e::{Apiserver, Etcd, Proc, ip, netns_exec, wait_until};

pub(super) const NS: &str = "netdemo";

/// Generous: the agents (and the userspace switches) share two cores with every other test.
const T: Duration = Duration::from_secs(120);

/// Runs `args` inside namespace `ns`; whether it succeeded.
pub(super) fn exec(ns: &str, args: &[&str]) -> bool {
    netns_exec(ns, args).0
}

pub(super) fn kubectl(api: &Apiserver, args: &[&str]) -> Result<String> {
    let mut full = vec!["-n", NS];
    full.extend_from_slice(args);
    api.kubectl_ok(&full)
}

pub(super) fn jsonpath(api: &Apiserver, kind: &str, name: &str, path: &str) -> Result<String> {
    api.jsonpath(NS, kind, name, path)
}

pub(super) fn patch_status(
    api: &Apiserver,
    kind: &str,
    name: &str,
    status: serde_json::Value,
) -> Result<()> {
    api.patch_status(NS, kind, name, status)?;
    Ok(())
}

/// Runs busybox's DHCP client once in `ns`; the address it was offered.
pub(super) fn lease(ns: &str, dir: &Path) -> Option<String> {
    let script = dir.join("udhcpc.sh");
    let result = dir.join("lease");
    let _ = std::fs::remove_file(&result);
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\n[ \"$1\" = bound ] && echo \"$ip\" > '{}'\nexit 0\n",
            result.display()
        ),
    )
    .ok()?;
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).ok()?;
    let script = script.to_string_lossy().into_owned();
    exec(
        ns,
        &[
            "busybox", "udhcpc", "-i", "eth0", "-n", "-q", "-f", "-t", "5", "-T", "1", "-s",
            &script,
        ],
    );
    Some(std::fs::read_to_string(&result).ok()?.trim().to_owned())
}

/// The other project, whose Network has the same CIDR and whose guests the same addresses.
const OTHER: &str = "netother";

/// How soon a security-group change must stop or start the pings, from the API's answer.
const WITHIN: Duration = Duration::from_secs(1);

fn ifindex(ns: &str, name: &str) -> Result<u64> {
    let out = ip(&["-n", ns, "-j", "link", "show", name])?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    v.get(0)
        .and_then(|l| l.get("ifindex")?.as_u64())
        .context("ifindex")
}

/// How many repairs of drift the Events count (an Event repeated is one Event with a series
/// count).
pub(super) fn drift_repairs(api: &Apiserver) -> u64 {
    let Ok(list) = api.kubectl_ok(&["get", "events", "-A", "-o", "json"]) else {
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

/// One node of the rig. Its switch is stopped when it is dropped (by the pid files in its
/// state directory, which must still be there).
struct Node {
    /// Its switch, on an OVS node.
    switch: Option<Switch>,
    /// Its agent's state directory.
    state: std::path::PathBuf,
    name: String,
    datapath: Datapath,
}

impl Node {
    fn log(&self) -> String {
        agent_logs(&[&self.state])
    }

    /// How often its agent's log says `what`.
    fn said(&self, what: &str) -> usize {
        self.log().matches(what).count()
    }

    /// What of its wiring a restart must leave as it is: a kernel node's VXLAN devices (by
    /// ifindex); an OVS node's flows, switch daemons, interfaces (by row and OpenFlow port:
    /// one re-created is a new row) and reconfiguration count (`next_cfg`, which every write
    /// that changes the database and waits for `ovs-vswitchd` raises).
    fn fingerprint(&self) -> Result<String> {
        Ok(match &self.switch {
            None => {
                let mut devices = BTreeMap::new();
                for vx in links_of_kind(&self.name, "vxlan")? {
                    devices.insert(ifindex(&self.name, &vx)?, vx);
                }
                format!("{devices:?}")
            }
            Some(s) => {
                let ifaces = s.vsctl(&[
                    "--format=csv",
                    "--no-headings",
                    "--columns=_uuid,name,ofport",
                    "list",
                    "Interface",
                ])?;
                format!(
                    "{:?} {:?} {:?} {:?} next_cfg={}",
                    s.owned_flows()?,
                    s.pid("ovs-vswitchd"),
                    s.pid("ovsdb-server"),
                    ifaces.lines().collect::<std::collections::BTreeSet<_>>(),
                    s.vsctl(&["get", "Open_vSwitch", ".", "next_cfg"])?.trim()
                )
            }
        })
    }

    /// Whether nothing of Stratus's networks is left on it: no bridge, VXLAN device or nft
    /// table on a kernel node; no port, network or port flows on an OVS node's switch.
    fn clean(&self) -> Result<bool> {
        Ok(match &self.switch {
            None => {
                links_of_kind(&self.name, "vxlan")?.is_empty()
                    && links_of_kind(&self.name, "bridge")?.is_empty()
                    && !exec(&self.name, &["nft", "list", "table", "inet", "stratus"])
            }
            Some(s) => {
                s.ports()?.is_empty() && s.objects(KIND_NETWORK)? == 0 && s.objects(KIND_PORT)? == 0
            }
        })
    }
}

/// The ICMP echo requests namespace `ns` has sent and the echo replies it has received, as
/// its kernel counts them (`OutEchos`, `InEchoReps` of `/proc/net/snmp`): what the network
/// delivered, whatever a pinging program's socket then dropped.
fn echo_counts(ns: &str) -> Result<(u64, u64)> {
    let (ok, snmp) = netns_exec(ns, &["cat", "/proc/net/snmp"]);
    anyhow::ensure!(ok, "read {ns}'s /proc/net/snmp: {snmp}");
    let mut icmp = snmp.lines().filter(|l| l.starts_with("Icmp: "));
    let (Some(names), Some(values)) = (icmp.next(), icmp.next()) else {
        anyhow::bail!("no Icmp counters in {ns}'s /proc/net/snmp: {snmp}");
    };
    let counters: BTreeMap<&str, &str> = names
        .split_whitespace()
        .zip(values.split_whitespace())
        .collect();
    let counter = |name: &str| -> Result<u64> {
        counters
            .get(name)
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("no {name} in {ns}'s /proc/net/snmp: {snmp}"))
    };
    Ok((counter("OutEchos")?, counter("InEchoReps")?))
}

/// Node `nodes[i]`'s wiring changed by hand, one thing at a time (the repair of one writes
/// every missing thing, so two made at once could be repaired by one step), each back within
/// seconds with a `DriftRepaired` Event and said in its agent's log; the overlay works again
/// (`probe`). A kernel node loses a VXLAN device, its flood entry to the other node and its
/// nft table; an OVS node its tunnel port and its delivery flows.
fn drift(api: &Apiserver, nodes: &[Node; 2], i: usize, probe: &dyn Fn() -> bool) -> Result<()> {
    let node = &nodes[i];
    let n = node.name.as_str();
    let peer = UNDERLAY[1 - i];
    let repaired = |before: (u64, usize), what: &str| {
        wait_until(T, what, || {
            (drift_repairs(api) > before.0 && node.said(what) > before.1).then_some(())
        })
        .with_context(|| {
            format!(
                "events: {}\nagent log:\n{}",
                api.kubectl_ok(&["get", "events", "-A", "-o", "json"])
                    .unwrap_or_default(),
                node.log()
            )
        })?;
        wait_until(T, "the overlay to work again", || probe().then_some(()))
    };
    let before = |what: &str| (drift_repairs(api), node.said(what));
    match &node.switch {
        None => {
            let sorted = || -> Option<Vec<String>> {
                let mut vx = links_of_kind(n, "vxlan").ok()?;
                vx.sort();
                Some(vx)
            };
            let vx = sorted().context("the VXLAN devices")?;
            assert_eq!(vx.len(), 2, "a VXLAN device per network: {vx:?}");
            let b = before("created VXLAN device");
            ip(&["-n", n, "link", "del", &vx[0]])?;
            wait_until(T, "the VXLAN device to be back", || {
                (sorted()? == vx).then_some(())
            })?;
            repaired(b, "created VXLAN device")?;
            let flood = format!("00:00:00:00:00:00 dst {peer}");
            let fdb = || netns_exec(n, &["bridge", "fdb", "show", "dev", &vx[0]]).1;
            assert!(fdb().contains(&flood), "{}", fdb());
            let b = before("set the FDB of");
            assert!(exec(
                n,
                &[
                    "bridge",
                    "fdb",
                    "del",
                    "00:00:00:00:00:00",
                    "dev",
                    &vx[0],
                    "dst",
                    peer
                ]
            ));
            repaired(b, "set the FDB of")?;
            assert!(fdb().contains(&flood), "{}", fdb());
            let b = before("applied the nft ruleset");
            assert!(exec(n, &["nft", "delete", "table", "inet", "stratus"]));
            repaired(b, "applied the nft ruleset")?;
            assert!(exec(n, &["nft", "list", "table", "inet", "stratus"]));
        }
        Some(switch) => {
            let tunnels = switch.tunnels()?;
            assert_eq!(
                tunnels.len(),
                1,
                "one tunnel, to the other node: {tunnels:?}"
            );
            let tunnel = tunnels.first().cloned().context("a tunnel port")?;
            let remote = switch.vsctl(&["get", "Interface", &tunnel, "options:remote_ip"])?;
            assert_eq!(remote.trim().trim_matches('"'), peer);
            let b = before("set the FDB of");
            switch.vsctl(&["del-port", "br-int", &tunnel])?;
            wait_until(T, "the tunnel port to be back", || {
                (switch.tunnels().ok()? == tunnels).then_some(())
            })?;
            repaired(b, "set the FDB of")?;
            let b = before("put tp-e2e-");
            switch.ofctl("del-flows", &["table=30"])?;
            repaired(b, "put tp-e2e-")?;
        }
    }
    Ok(())
}

/// The two-node test on nodes of datapaths `datapaths`, its namespaces named after `prefix`.
fn two_nodes(prefix: &str, datapaths: [Datapath; 2]) -> Result<()> {
    let etcd = Etcd::start()?;
    let mut api = Apiserver::start_on(&etcd)?;
    api.projects(&[NS, OTHER])?;
    let tag = std::process::id();
    let [n1, n2, g1, g2, g3, g4] =
        ["n1", "n2", "g1", "g2", "g3", "g4"].map(|n| format!("{prefix}-{tag}-{n}"));
    let states = [tempfile::tempdir()?, tempfile::tempdir()?];
    let host = Namespaces::add(
        &[&n1, &n2, &g1, &g2, &g3, &g4],
        &[states[0].path(), states[1].path()],
    )?;
    // Dropped before the namespaces (and the DHCP servers listed in the state directories)
    // go, and those before the state directories.
    let nodes = [
        (n1.clone(), datapaths[0], states[0].path()),
        (n2.clone(), datapaths[1], states[1].path()),
    ]
    .map(|(name, datapath, state)| Node {
        switch: (datapath == Datapath::Ovs).then(|| Switch::of_state(state)),
        state: state.to_owned(),
        name,
        datapath,
    });
    let state_paths = [states[0].path(), states[1].path()];
    let logs = || agent_logs(&state_paths);
    underlay(&n1, &n2)?;
    if datapaths.contains(&Datapath::Ovs) {
        for n in nodes.iter().filter(|n| n.datapath == Datapath::Kernel) {
            checksum_underlay(&n.name)?;
        }
    }

    // The cloud's objects (IPAM gives the VNIs, MACs and addresses); the ports' placement is
    // written as the compute side would.
    let network = |ns: &str, group: &str| {
        format!(
            r#"
apiVersion: network.stratus.dev/v1
kind: Network
metadata: {{name: net, namespace: {ns}}}
spec: {{}}
---
apiVersion: network.stratus.dev/v1
kind: Subnet
metadata: {{name: sn, namespace: {ns}}}
spec: {{network: net, cidr: 10.0.0.0/24, gatewayIP: 10.0.0.1}}
---
apiVersion: network.stratus.dev/v1
kind: SecurityGroup
metadata: {{name: default, namespace: {ns}}}
spec:
  rules:
  - {{direction: ingress, protocol: icmp{group}}}
  - {{direction: egress}}
"#
        )
    };
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
---{}---{}---
apiVersion: network.stratus.dev/v1
kind: Port
metadata: {{name: p1, namespace: {NS}}}
spec: {{network: net}}
---
apiVersion: network.stratus.dev/v1
kind: Port
metadata: {{name: p2, namespace: {NS}}}
spec: {{network: net}}
"#,
            network(NS, ", remoteGroup: default"),
            network(OTHER, "")
        ),
    )?;
    let mut guests = Vec::new();
    for (i, (port, node, guest)) in [("p1", &n1, &g1), ("p2", &n2, &g2)].into_iter().enumerate() {
        let device = format!("tp-e2e-{}", i + 1);
        let addr = plug_port(&api, NS, port, node, &device, guest, Some(1450))?;
        guests.push((guest.clone(), addr));
    }
    let (ip1, ip2) = (guests[0].1.clone(), guests[1].1.clone());
    // The other project's guests take the same addresses: guest 3 beside guest 1 with its
    // address, guest 4 beside guest 2 with its.
    for (port, addr) in [("q1", &ip1), ("q2", &ip2)] {
        api.kubectl_in(
            &["apply", "-f", "-"],
            &format!(
                "apiVersion: network.stratus.dev/v1\nkind: Port\nmetadata: {{name: {port}, namespace: {OTHER}}}\nspec: {{network: net, fixedIPs: [{{ipAddress: {addr}}}]}}\n"
            ),
        )?;
    }
    let mut others = Vec::new();
    for (i, (port, node, guest)) in [("q1", &n1, &g3), ("q2", &n2, &g4)].into_iter().enumerate() {
        let device = format!("tp-e2e-{}", i + 4);
        let addr = plug_port(&api, OTHER, port, node, &device, guest, Some(1450))?;
        others.push((guest.clone(), addr));
    }
    assert_eq!(others[0].1, ip1);
    assert_eq!(others[1].1, ip2);

    let ids = tempfile::tempdir()?;
    api.node_identities(&[&n1, &n2], ids.path())?;
    let agent = |i: usize| -> Result<Proc> {
        let n = &nodes[i];
        let kubeconfig = ids.path().join(format!("{}.kubeconfig", n.name));
        network_agent_on(&n.name, n.datapath, UNDERLAY[i], &kubeconfig, &n.state, &[])
    };
    let mut agents = [agent(0)?, agent(1)?];

    // The agents tell where their tunnels end, and wire the ports.
    for (node, want) in [(&n1, UNDERLAY[0]), (&n2, UNDERLAY[1])] {
        wait_until(T, "the node's hostIP", || {
            api.kubectl_ok(&["get", "hypervisor", node, "-o", "jsonpath={.status.hostIP}"])
                .ok()
                .filter(|ip| ip == want)
        })
        .with_context(logs)?;
    }
    for (ns, port) in [(NS, "p1"), (NS, "p2"), (OTHER, "q1"), (OTHER, "q2")] {
        wait_until(T, "the port to be Active", || {
            api.jsonpath(ns, "port", port, "{.status.phase}")
                .ok()
                .filter(|p| p == "Active")
        })
        .with_context(logs)?;
        let ready = api.jsonpath(
            ns,
            "port",
            port,
            "{.status.conditions[?(@.type==\"Ready\")].reason}",
        )?;
        assert_eq!(ready, "Wired", "{ns}/{port}");
    }

    // A port placed on node 1 whose device the hypervisor has not made says so.
    api.kubectl_in(
        &["apply", "-f", "-"],
        &format!(
            "apiVersion: network.stratus.dev/v1\nkind: Port\nmetadata: {{name: p3, namespace: {NS}}}\nspec: {{network: net}}\n"
        ),
    )?;
    patch_status(
        &api,
        "port",
        "p3",
        serde_json::json!({"hypervisor": n1, "interfaceName": "tp-e2e-3"}),
    )?;
    wait_until(T, "p3 to say why it is down", || {
        jsonpath(
            &api,
            "port",
            "p3",
            "{.status.phase}/{.status.conditions[?(@.type==\"Ready\")].reason}",
        )
        .ok()
        .filter(|s| s == "Down/DeviceMissing")
    })
    .with_context(logs)?;
    // Its device appears (the hypervisor made it): the port goes Active, and that is no
    // repair of anything.
    ip(&[
        "link",
        "add",
        "tp-e2e-3",
        "netns",
        &n1,
        "type",
        "veth",
        "peer",
        "name",
        "tp-e2e-3g",
        "netns",
        &n1,
    ])?;
    wait_until(T, "p3 to be Active", || {
        jsonpath(&api, "port", "p3", "{.status.phase}")
            .ok()
            .filter(|p| p == "Active")
    })
    .with_context(logs)?;
    assert_eq!(drift_repairs(&api), 0, "{}", logs());

    // DHCP gives each guest its IPAM address from its own network; the first project's
    // guests reach each other across VXLAN.
    let dir = tempfile::tempdir()?;
    for (guest, addr) in guests.iter().chain(&others) {
        let offered =
            wait_until(T, "a DHCP offer", || lease(guest, dir.path())).with_context(logs)?;
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
    wait_until(T, "guest 1 to reach guest 2", || {
        ping(&g1, &ip2).then_some(())
    })
    .with_context(logs)?;
    wait_until(T, "guest 2 to reach guest 1", || {
        ping(&g2, &ip1).then_some(())
    })
    .with_context(logs)?;

    // Same CIDR, same addresses, two projects: guest 3 (the other project's, with guest 1's
    // address) pinging guest 2's address reaches guest 4 across the tunnel, never guest 2,
    // which counts every echo from that address that arrives; guest 1's echoes are counted
    // there, so the count is no dead counter.
    count_pings_from(&g2, &[&ip1])?;
    count_pings_from(&g4, &[&ip1])?;
    wait_until(T, "guest 3 to reach its own network's guest 4", || {
        ping(&g3, &ip2).then_some(())
    })
    .with_context(logs)?;
    let echoes = 10;
    for _ in 0..echoes {
        assert!(ping(&g3, &ip2), "guest 3 to guest 4");
    }
    assert!(
        pings_counted(&g4, &ip1)? > echoes,
        "guest 4 counts guest 3's echoes"
    );
    assert_eq!(
        pings_counted(&g2, &ip1)?,
        0,
        "an echo of the other project's reached guest 2"
    );
    let mac4 = api.jsonpath(OTHER, "port", "q2", "{.status.macAddress}")?;
    let neighbour = netns_exec(&g3, &["ip", "neigh", "show", &ip2]).1;
    assert!(
        neighbour.to_lowercase().contains(&mac4.to_lowercase()),
        "guest 4 answered guest 3's ARP: {neighbour}"
    );
    assert!(ping(&g1, &ip2), "guest 1 to guest 2");
    assert!(
        pings_counted(&g2, &ip1)? > 0,
        "guest 2 counts guest 1's echoes"
    );

    // Drift on each node, by its datapath.
    let probe = || ping(&g1, &ip2) && ping(&g2, &ip1);
    for i in 0..2 {
        drift(&api, &nodes, i, &probe)?;
    }

    // A restarted agent changes nothing that is right (same devices or flows, same DHCP
    // server), and a ping running across the restart, 40 echoes 150 ms apart, loses none:
    // each node's in turn. An echo is lost when its reply never reaches guest 1's kernel; a
    // late one is no loss. (A userspace switch starved of CPU on a loaded host holds frames
    // for seconds, then lets them all go at once, and busybox ping's socket, its receive
    // buffer cut to about 14 KiB, drops such a burst of replies that did arrive: its own
    // count is no measure of the network.)
    for i in 0..2 {
        let node = &nodes[i];
        let dhcp = std::fs::read_dir(node.state.join("network/dhcp"))?
            .flatten()
            .map(|e| e.path())
            .collect::<Vec<_>>();
        assert_eq!(dhcp.len(), 2, "a DHCP server per network on {}", node.name);
        let pids = dhcp
            .iter()
            .map(|d| std::fs::read_to_string(d.join("pid")))
            .collect::<std::io::Result<Vec<_>>>()?;
        let before = node.fingerprint()?;
        let counted = echo_counts(&g1)?;
        let pinger = Command::new("ip")
            .args([
                "netns", "exec", &g1, "busybox", "ping", "-c", "40", "-i", "0.15", "-W", "3",
            ])
            .arg(&ip2)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()?;
        std::thread::sleep(Duration::from_millis(500));
        agents[i].terminate()?;
        agents[i] = agent(i)?;
        let out = pinger.wait_with_output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let echoes = || -> Result<(u64, u64)> {
            let (sent, received) = echo_counts(&g1)?;
            Ok((sent - counted.0, received - counted.1))
        };
        assert_eq!(echoes()?.0, 40, "guest 1 sent its echoes: {text}");
        // Replies still under way arrive within seconds; a lost one never does.
        wait_until(Duration::from_secs(10), "every echo's reply", || {
            echoes().ok().filter(|(s, r)| r >= s)
        })
        .with_context(|| {
            format!(
                "echo replies lost across {}'s agent's restart: (sent, received) {:?}; ping: \
                 {text}",
                node.name,
                echoes().ok()
            )
        })?;
        assert_eq!(
            echoes()?,
            (40, 40),
            "guest 1 was sent replies it never asked for"
        );
        eprintln!(
            "{datapaths:?}: across {}'s agent's restart guest 1 sent 40 echoes and received 40 \
             replies; busybox ping: {}",
            node.name,
            text.lines().rev().take(2).collect::<Vec<_>>().join("; ")
        );
        // Two resyncs of the restarted agent at least.
        std::thread::sleep(Duration::from_secs(3));
        assert!(agents[i].running(), "{}", node.log());
        assert_eq!(
            node.fingerprint()?,
            before,
            "a restart of {} changed it",
            node.name
        );
        let after = dhcp
            .iter()
            .map(|d| std::fs::read_to_string(d.join("pid")))
            .collect::<std::io::Result<Vec<_>>>()?;
        assert_eq!(after, pids, "a restart replaced a DHCP server");
    }

    // A security-group rule removed, then added back: the pings stop, then start again,
    // each way (each node's filter), within a second of the API's answer to the write.
    let group = |rules: &str| {
        format!(
            "apiVersion: network.stratus.dev/v1\nkind: SecurityGroup\nmetadata: {{name: default, namespace: {NS}}}\nspec:\n  rules:\n{rules}"
        )
    };
    let icmp = "  - {direction: ingress, protocol: icmp, remoteGroup: default}\n";
    let egress = "  - {direction: egress}\n";
    let pairs = [(g1.as_str(), ip2.as_str()), (g2.as_str(), ip1.as_str())];
    wait_until(T, "the guests to ping each other", || {
        pairs.iter().all(|(f, t)| ping(f, t)).then_some(())
    })?;
    // A running ping, as a user watches one: its connection must end with its rule.
    let stopped = unreached_after(&pairs, T, Duration::from_secs(2), || {
        api.kubectl_in(&["apply", "-f", "-"], &group(egress))
            .map(drop)
    })
    .with_context(logs)?;
    let started = reached_after(&pairs, T, || {
        api.kubectl_in(&["apply", "-f", "-"], &group(&format!("{icmp}{egress}")))
            .map(drop)
    })
    .with_context(logs)?;
    eprintln!(
        "{datapaths:?}: security-group change to effect, from the API's answer: removed \
         {stopped:?}, added {started:?} (guest 1 to 2, 2 to 1)"
    );
    for (what, took) in [("removed", &stopped), ("added", &started)] {
        for (t, (from, to)) in took.iter().zip(&pairs) {
            // What the agents (every converge's duration, every change they watched) and the
            // switches said, to tell a late agent from a late datapath.
            let context = || {
                let switches = nodes
                    .iter()
                    .filter_map(|n| {
                        Some(format!(
                            "{}: {}",
                            n.name,
                            n.switch.as_ref()?.daemon_logs(60)
                        ))
                    })
                    .collect::<Vec<_>>()
                    .join("\n");
                format!("{}\n{switches}", logs())
            };
            assert!(
                *t <= WITHIN,
                "{datapaths:?}: the rule {what}, {from} to {to} changed after {t:?}\n{}",
                context()
            );
        }
    }

    // The ports deleted: nothing of Stratus's is left on the nodes.
    kubectl(&api, &["delete", "port", "p1", "p2", "p3"])?;
    api.kubectl_ok(&["-n", OTHER, "delete", "port", "q1", "q2"])?;
    let mut servers = Vec::new();
    for node in &nodes {
        for e in std::fs::read_dir(node.state.join("network/dhcp"))?.flatten() {
            servers.push(e.file_name().to_string_lossy().into_owned());
        }
    }
    for node in &nodes {
        wait_until(T, "the node to be clean", || {
            node.clean().ok()?.then_some(())
        })
        .with_context(|| {
            let flows = node
                .switch
                .as_ref()
                .map(|s| s.ofctl("dump-flows", &[]).unwrap_or_default());
            format!("{}: {flows:?}\n{}", node.name, node.log())
        })?;
        let left: Vec<_> = std::fs::read_dir(node.state.join("network/dhcp"))?
            .flatten()
            .collect();
        assert!(left.is_empty(), "DHCP servers left: {left:?}");
    }
    let namespaces = ip(&["netns", "list"])?;
    for s in &servers {
        assert!(!namespaces.contains(s.as_str()), "{s} left: {namespaces}");
    }
    assert!(agents.iter_mut().all(Proc::running), "{}", logs());
    // In order: the agents, the switches, the namespaces, the state directories.
    drop(agents);
    drop(nodes);
    drop(host);
    drop(states);
    Ok(())
}

#[test]
fn two_kernel_nodes_wire_ports_keep_projects_apart_and_repair_drift() -> Result<()> {
    two_nodes("snet", [Datapath::Kernel, Datapath::Kernel])
}

#[test]
fn two_ovs_nodes_wire_ports_keep_projects_apart_and_repair_drift() -> Result<()> {
    two_nodes("snoo", [Datapath::Ovs, Datapath::Ovs])
}

#[test]
fn a_kernel_node_and_an_ovs_node_wire_ports_keep_projects_apart_and_repair_drift() -> Result<()> {
    two_nodes("snko", [Datapath::Kernel, Datapath::Ovs])
}
