//! Routers and floating IPs end to end: two network nodes (namespaces joined by a veth
//! underlay on 192.0.2.0/24, each with `stratus agent --roles network --physical-interface
//! physnet1=physnet`), an "external" namespace whose bridge joins both nodes' `physnet`
//! interfaces (203.0.113.1/24), an admin's flat external Network on physnet1, a tenant
//! Network with a guest (a namespace plugged in as its Port's device) on one node and a
//! Router placed by the routers controller on the other. The guest reaches the external
//! side SNATed to the router's gateway address; a FloatingIP reaches the guest from outside
//! and is what the guest leaves as; a deleted FloatingIP reaches nothing; when the router's
//! node dies (its agent killed, its router namespace gone) the router moves to the other
//! node and the floating IP reaches the guest again.
//!
//! It runs on each pairing of datapaths that matters: both nodes on the kernel datapath, the
//! router's first node on Open vSwitch with the guest's on the kernel one (the router then
//! moves to the guest's node), and both on Open vSwitch (each OVS node's agent starts its own
//! userspace switch, on whose integration bridge the router's ports and the external
//! `physnet` go). The router's first node is the one whose agent starts first; the guest's
//! node's agent starts once the router is placed.
//!
//! Each agent runs as its node (`system:node:NAME`), through the node authorizer.

use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};
use stratus_e2e::net::{
    Datapath, Namespaces, Switch, UNDERLAY, agent_logs as logs, checksum_underlay,
    count_pings_from, namespaces_with_mac, network_agent_on, ping, pings_counted, plug_port,
    underlay,
};
use stratus_e2e::{Apiserver, Etcd, Proc, ip, stratus_bin, wait_until};

const NS: &str = "rtrdemo";
const EXT_NS: &str = "rtrext";
const EXTERNAL: &str = "203.0.113.1";

/// Generous: the agents and controllers share two cores with every other test.
const T: Duration = Duration::from_secs(120);

fn kubectl(api: &Apiserver, ns: &str, args: &[&str]) -> Result<String> {
    let mut full = vec!["-n", ns];
    full.extend_from_slice(args);
    api.kubectl_ok(&full)
}

#[test]
fn a_floating_ip_reaches_a_guest_through_a_router_that_moves_when_its_node_dies() -> Result<()> {
    routed("srtr", [Datapath::Kernel, Datapath::Kernel])
}

#[test]
fn a_router_on_an_ovs_node_serves_a_guest_on_a_kernel_node_and_moves_to_it() -> Result<()> {
    routed("srok", [Datapath::Ovs, Datapath::Kernel])
}

#[test]
fn a_router_serves_a_guest_and_moves_between_ovs_nodes() -> Result<()> {
    routed("sroo", [Datapath::Ovs, Datapath::Ovs])
}

/// The test on nodes of `datapaths` (the router's first node, the guest's), its namespaces
/// named after `prefix`.
fn routed(prefix: &str, datapaths: [Datapath; 2]) -> Result<()> {
    let etcd = Etcd::start()?;
    let mut api = Apiserver::start_on(&etcd)?;
    api.projects(&[NS, EXT_NS])?;
    let tag = std::process::id();
    let (n1, n2) = (format!("{prefix}-{tag}-n1"), format!("{prefix}-{tag}-n2"));
    let (guest, ext) = (format!("{prefix}-{tag}-g"), format!("{prefix}-{tag}-x"));
    let (s1, s2) = (tempfile::tempdir()?, tempfile::tempdir()?);
    let mut host = Namespaces::add(&[&n1, &n2, &guest, &ext], &[s1.path(), s2.path()])?;
    // The OVS nodes' switches, stopped after the agents and before the namespaces go.
    let _switches: Vec<Switch> = [s1.path(), s2.path()]
        .into_iter()
        .zip(datapaths)
        .filter(|(_, d)| *d == Datapath::Ovs)
        .map(|(s, _)| Switch::of_state(s))
        .collect();
    underlay(&n1, &n2)?;
    if datapaths.contains(&Datapath::Ovs) {
        for (n, d) in [&n1, &n2].into_iter().zip(datapaths) {
            if d == Datapath::Kernel {
                checksum_underlay(n)?;
            }
        }
    }
    // The external side: a bridge with an address, each node's `physnet` plugged into it.
    ip(&["-n", &ext, "link", "add", "br-ext", "type", "bridge"])?;
    ip(&["-n", &ext, "addr", "add", "203.0.113.1/24", "dev", "br-ext"])?;
    ip(&["-n", &ext, "link", "set", "br-ext", "up"])?;
    ip(&["-n", &ext, "link", "set", "lo", "up"])?;
    for (i, n) in [&n1, &n2].into_iter().enumerate() {
        let end = format!("e-n{}", i + 1);
        ip(&[
            "link", "add", "physnet", "netns", n, "type", "veth", "peer", "name", &end, "netns",
            &ext,
        ])?;
        ip(&["-n", &ext, "link", "set", &end, "master", "br-ext", "up"])?;
        ip(&["-n", n, "link", "set", "physnet", "up"])?;
    }

    let controllers = Proc::spawn(
        "stratus controllers",
        Command::new(stratus_bin())
            .arg("controllers")
            .arg("--kubeconfig")
            .arg(api.kubeconfig())
            .args(["--lease-seconds", "6"])
            .arg("--image-dir")
            .arg(s1.path().join("images")),
        &s1.path().join("controllers.log"),
    )?;

    // The project's default SecurityGroup is the controllers' to make: the one applied below
    // edits it once it is there (applied before, kubectl's create could race theirs).
    wait_until(T, "the project's default SecurityGroup", || {
        api.jsonpath(NS, "securitygroup", "default", "{.metadata.uid}")
            .ok()
            .filter(|uid| !uid.is_empty())
    })?;

    // The operator's external network (flat on physnet1; both nodes granted physnet1 on
    // their Hypervisors), a tenant network with a guest's port, and a router between them.
    api.kubectl_in(
        &["apply", "-f", "-"],
        &format!(
            r#"
apiVersion: compute.stratus.dev/v1
kind: Hypervisor
metadata:
  name: {n1}
  annotations: {{network.stratus.dev/physical-networks: physnet1}}
spec: {{hypervisorType: qemu}}
---
apiVersion: compute.stratus.dev/v1
kind: Hypervisor
metadata:
  name: {n2}
  annotations: {{network.stratus.dev/physical-networks: physnet1}}
spec: {{hypervisorType: qemu}}
---
apiVersion: network.stratus.dev/v1
kind: Network
metadata: {{name: ext, namespace: {EXT_NS}}}
spec: {{external: true, segmentation: flat, physicalNetwork: physnet1, mtu: 1500}}
---
apiVersion: network.stratus.dev/v1
kind: Subnet
metadata: {{name: ext-sn, namespace: {EXT_NS}}}
spec:
  network: ext
  cidr: 203.0.113.0/24
  gatewayIP: 203.0.113.1
  enableDHCP: false
  allocationPools: [{{start: 203.0.113.10, end: 203.0.113.50}}]
---
apiVersion: network.stratus.dev/v1
kind: Network
metadata: {{name: net, namespace: {NS}}}
spec: {{}}
---
apiVersion: network.stratus.dev/v1
kind: Subnet
metadata: {{name: sn, namespace: {NS}}}
spec: {{network: net, cidr: 10.70.0.0/24, gatewayIP: 10.70.0.1}}
---
apiVersion: network.stratus.dev/v1
kind: SecurityGroup
metadata: {{name: default, namespace: {NS}}}
spec:
  rules:
  - {{direction: ingress, protocol: icmp}}
  - {{direction: egress}}
---
apiVersion: network.stratus.dev/v1
kind: Port
metadata: {{name: p1, namespace: {NS}}}
spec: {{network: net}}
---
apiVersion: network.stratus.dev/v1
kind: Router
metadata: {{name: r1, namespace: {NS}}}
spec:
  externalGateway: {{network: {EXT_NS}/ext}}
  interfaces: [{{subnet: sn}}]
"#
        ),
    )?;

    let ids = tempfile::tempdir()?;
    api.node_identities(&[&n1, &n2], ids.path())?;
    // A node's network agent, with `physnet` as its interface for physnet1.
    let agent = |i: usize| {
        let (node, state) = [(&n1, s1.path()), (&n2, s2.path())][i];
        let kubeconfig = ids.path().join(format!("{node}.kubeconfig"));
        let args = ["--physical-interface", "physnet1=physnet"];
        network_agent_on(node, datapaths[i], UNDERLAY[i], &kubeconfig, state, &args)
    };
    let states = [s1.path(), s2.path()];

    // The controller places the router on a node with a fresh Lease and physnet1: node 1,
    // whose agent is the only one yet; that agent programs it.
    let a1 = agent(0)?;
    let node = wait_until(T, "the router to be placed", || {
        api.jsonpath(NS, "router", "r1", "{.status.node}")
            .ok()
            .filter(|n| !n.is_empty())
    })
    .with_context(|| logs(&states))?;
    assert_eq!(node, n1, "the only node with an agent");
    let a2 = agent(1)?;
    let mut agents = [a1, a2];
    let (other, guest_agent_state) = (n2.clone(), s2.path());
    wait_until(T, "the router to be Ready", || {
        api.jsonpath(
            NS,
            "router",
            "r1",
            "{.status.conditions[?(@.type==\"Ready\")].status}",
        )
        .ok()
        .filter(|s| s == "True")
    })
    .with_context(|| logs(&states))?;
    assert_eq!(
        api.jsonpath(NS, "router", "r1", "{.status.phase}")?,
        "Active"
    );
    let gateway_ip = api.jsonpath(NS, "router", "r1", "{.status.externalGatewayIPs[0]}")?;
    anyhow::ensure!(!gateway_ip.is_empty(), "the router has a gateway address");
    let gateway_port = api.jsonpath(NS, "router", "r1", "{.status.externalGatewayPort}")?;
    let (gw_ns, gw_name) = gateway_port
        .split_once('/')
        .with_context(|| format!("gateway port {gateway_port:?}"))?;
    let gateway_mac = api.jsonpath(gw_ns, "port", gw_name, "{.status.macAddress}")?;
    let first = namespaces_with_mac("qrouter-", &gateway_mac);
    anyhow::ensure!(first.len() == 1, "one router namespace: {first:?}");
    host.namespaces.extend(first.iter().cloned());

    // The guest on the other node (as the compute side would place it).
    let addr = plug_port(&api, NS, "p1", &other, "tp-rtr-1", &guest, Some(1450))?;
    ip(&[
        "-n",
        &guest,
        "addr",
        "add",
        &format!("{addr}/24"),
        "dev",
        "eth0",
    ])?;
    ip(&["-n", &guest, "route", "add", "default", "via", "10.70.0.1"])?;
    wait_until(T, "the guest's port to be Active", || {
        api.jsonpath(NS, "port", "p1", "{.status.phase}")
            .ok()
            .filter(|p| p == "Active")
    })
    .with_context(|| logs(&states))?;

    // Out through the router: the external side sees the gateway's address.
    count_pings_from(&ext, &[&gateway_ip, &addr])?;
    wait_until(T, "the guest to reach the outside", || {
        ping(&guest, EXTERNAL).then_some(())
    })
    .with_context(|| logs(&states))?;
    assert!(
        pings_counted(&ext, &gateway_ip)? > 0,
        "SNATed to {gateway_ip}"
    );
    assert_eq!(pings_counted(&ext, &addr)?, 0, "never the fixed address");

    // A floating IP: reached from outside, and what the guest leaves as.
    let fip_yaml = |name: &str| {
        format!(
            "apiVersion: network.stratus.dev/v1\nkind: FloatingIP\nmetadata: {{name: {name}, namespace: {NS}}}\nspec: {{floatingNetwork: {EXT_NS}/ext, port: p1}}\n"
        )
    };
    api.kubectl_in(&["apply", "-f", "-"], &fip_yaml("f1"))?;
    let fip = wait_until(T, "a floating address", || {
        api.jsonpath(NS, "floatingip", "f1", "{.status.floatingIPAddress}")
            .ok()
            .filter(|a| !a.is_empty())
    })?;
    wait_until(T, "the floating IP to be Active", || {
        api.jsonpath(NS, "floatingip", "f1", "{.status.phase}")
            .ok()
            .filter(|p| p == "Active")
    })
    .with_context(|| logs(&states))?;
    wait_until(T, "the floating IP to reach the guest", || {
        ping(&ext, &fip).then_some(())
    })
    .with_context(|| logs(&states))?;
    count_pings_from(&ext, &[&fip])?;
    wait_until(T, "the guest still reaches the outside", || {
        ping(&guest, EXTERNAL).then_some(())
    })?;
    assert!(pings_counted(&ext, &fip)? > 0, "the guest leaves as {fip}");
    assert_eq!(pings_counted(&ext, &addr)?, 0);

    // Deleted: the floating address reaches nothing.
    kubectl(&api, NS, &["delete", "floatingip", "f1"])?;
    wait_until(T, "the floating IP to stop", || {
        (!ping(&ext, &fip)).then_some(())
    })
    .with_context(|| logs(&states))?;
    wait_until(T, "SNAT to the gateway still works", || {
        ping(&guest, EXTERNAL).then_some(())
    })?;

    // Another floating IP, then the router's node dies: its agent is killed and it drops off
    // both networks (its underlay and physnet links down), its router namespace left as it
    // was, as on a node cut off rather than powered off. The controller moves the router;
    // the other node programs it.
    api.kubectl_in(&["apply", "-f", "-"], &fip_yaml("f2"))?;
    let fip = wait_until(T, "a floating address", || {
        api.jsonpath(NS, "floatingip", "f2", "{.status.floatingIPAddress}")
            .ok()
            .filter(|a| !a.is_empty())
    })?;
    wait_until(T, "the floating IP to reach the guest", || {
        ping(&ext, &fip).then_some(())
    })
    .with_context(|| logs(&states))?;
    agents[0].kill();
    for link in ["underlay", "physnet"] {
        ip(&["-n", &node, "link", "set", link, "down"])?;
    }
    wait_until(T, "no router, no floating IP", || {
        (!ping(&ext, &fip)).then_some(())
    })?;
    wait_until(Duration::from_secs(120), "the router to move", || {
        api.jsonpath(NS, "router", "r1", "{.status.node}")
            .ok()
            .filter(|n| *n == other)
    })
    .with_context(|| logs(&states))?;
    wait_until(T, "the floating IP to reach the guest again", || {
        ping(&ext, &fip).then_some(())
    })
    .with_context(|| logs(&[guest_agent_state]))?;
    wait_until(T, "the router's Ready to name its new node", || {
        api.jsonpath(
            NS,
            "router",
            "r1",
            "{.status.conditions[?(@.type==\"Ready\")].message}",
        )
        .ok()
        .filter(|m| m.contains(&other))
    })?;
    wait_until(T, "the guest reaches the outside again", || {
        ping(&guest, EXTERNAL).then_some(())
    })?;
    let now = namespaces_with_mac("qrouter-", &gateway_mac);
    host.namespaces.extend(now.iter().cloned());
    assert_eq!(
        now.len(),
        2,
        "the new node's router and the stale one: {now:?}"
    );
    assert!(now.contains(&first[0]), "{now:?}");

    // The dead node comes back (its links up, its agent started again) with the stale router
    // namespace, which holds the gateway's MAC and the floating address: its agent sees the
    // router placed on the other node and removes it, and the floating IP and SNAT go on
    // through the other node.
    for link in ["underlay", "physnet"] {
        ip(&["-n", &node, "link", "set", link, "up"])?;
    }
    agents[0] = agent(0)?;
    wait_until(T, "the stale router namespace removed", || {
        let left = namespaces_with_mac("qrouter-", &gateway_mac);
        (left.len() == 1 && !left.contains(&first[0])).then_some(())
    })
    .with_context(|| logs(&states))?;
    wait_until(
        T,
        "the floating IP reaches the guest through the new node",
        || ping(&ext, &fip).then_some(()),
    )
    .with_context(|| logs(&states))?;
    wait_until(
        T,
        "the guest reaches the outside through the new node",
        || ping(&guest, EXTERNAL).then_some(()),
    )?;
    assert_eq!(
        api.jsonpath(NS, "router", "r1", "{.status.node}")?,
        other,
        "the router stays where it moved"
    );
    drop(agents);
    drop(controllers);
    Ok(())
}
