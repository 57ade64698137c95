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
//! Each agent runs as its node (`system:node:NAME`), through the node authorizer.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};
use stratus_e2e::net::{
    Namespaces, UNDERLAY, agent_logs as logs, network_agent, ping, plug_port, underlay,
};
use stratus_e2e::{Apiserver, Etcd, Proc, ip, netns_exec, stratus_bin, wait_until};

const NS: &str = "rtrdemo";
const EXT_NS: &str = "rtrext";
const EXTERNAL: &str = "203.0.113.1";

/// Generous: the agents and controllers share two cores with every other test.
const T: Duration = Duration::from_secs(90);

fn kubectl(api: &Apiserver, ns: &str, args: &[&str]) -> Result<String> {
    let mut full = vec!["-n", ns];
    full.extend_from_slice(args);
    api.kubectl_ok(&full)
}

/// A node's network agent, tunnel at `underlay`, with `physnet` as its interface for
/// physnet1.
fn agent(node: &str, underlay: &str, state: &Path, kubeconfigs: &Path) -> Result<Proc> {
    let kubeconfig = kubeconfigs.join(format!("{node}.kubeconfig"));
    let args = [
        "--underlay-ip",
        underlay,
        "--physical-interface",
        "physnet1=physnet",
    ];
    network_agent(node, &kubeconfig, state, &args)
}

/// Counts, in namespace `ns`, the ICMP echo requests that arrive from each of `sources`.
fn count_pings_from(ns: &str, sources: &[&str]) -> Result<()> {
    let run = |args: &[&str]| -> Result<()> {
        let (ok, out) = netns_exec(ns, args);
        anyhow::ensure!(ok, "{args:?}: {out}");
        Ok(())
    };
    run(&["nft", "add", "table", "ip", "probe"])?;
    run(&[
        "nft",
        "add",
        "chain",
        "ip",
        "probe",
        "in",
        "{ type filter hook input priority 0 ; }",
    ])?;
    for s in sources {
        run(&[
            "nft",
            "add",
            "rule",
            "ip",
            "probe",
            "in",
            "ip",
            "saddr",
            s,
            "icmp",
            "type",
            "echo-request",
            "counter",
        ])?;
    }
    Ok(())
}

/// The echo requests counted from `source` so far.
fn pings_counted(ns: &str, source: &str) -> Result<u64> {
    let (ok, out) = netns_exec(ns, &["nft", "list", "chain", "ip", "probe", "in"]);
    anyhow::ensure!(ok, "{out}");
    let line = out
        .lines()
        .find(|l| l.contains(&format!("ip saddr {source} ")))
        .with_context(|| format!("no counter for {source}: {out}"))?;
    line.split("packets ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("no packet count in {line}"))
}

/// The router namespaces (`qrouter-…`) holding a link with MAC `mac`.
fn router_namespaces(mac: &str) -> Vec<String> {
    let list = ip(&["netns", "list"]).unwrap_or_default();
    list.lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with("qrouter-"))
        .filter(|n| {
            ip(&["-n", n, "-j", "link", "show"])
                .ok()
                .and_then(|o| serde_json::from_str::<serde_json::Value>(&o).ok())
                .and_then(|v| v.as_array().cloned())
                .into_iter()
                .flatten()
                .any(|l| l.get("address").and_then(|a| a.as_str()) == Some(mac))
        })
        .map(str::to_owned)
        .collect()
}

#[test]
fn a_floating_ip_reaches_a_guest_through_a_router_that_moves_when_its_node_dies() -> Result<()> {
    let etcd = Etcd::start()?;
    let mut api = Apiserver::start_on(&etcd)?;
    api.projects(&[NS, EXT_NS])?;
    let tag = std::process::id();
    let (n1, n2) = (format!("srtr-{tag}-n1"), format!("srtr-{tag}-n2"));
    let (guest, ext) = (format!("srtr-{tag}-g"), format!("srtr-{tag}-x"));
    let (s1, s2) = (tempfile::tempdir()?, tempfile::tempdir()?);
    let mut host = Namespaces::add(&[&n1, &n2, &guest, &ext], &[s1.path(), s2.path()])?;
    underlay(&n1, &n2)?;
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
    let mut a1 = agent(&n1, UNDERLAY[0], s1.path(), ids.path())?;
    let mut a2 = agent(&n2, UNDERLAY[1], s2.path(), ids.path())?;
    let states = [s1.path(), s2.path()];

    // The controller places the router on a node with a fresh Lease and physnet1; that
    // node's agent programs it.
    let node = wait_until(T, "the router to be placed", || {
        api.jsonpath(NS, "router", "r1", "{.status.node}")
            .ok()
            .filter(|n| !n.is_empty())
    })
    .with_context(|| logs(&states))?;
    let (other, guest_agent_state) = if node == n1 {
        (n2.clone(), s2.path())
    } else {
        (n1.clone(), s1.path())
    };
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
    let first = router_namespaces(&gateway_mac);
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
    let (dead_underlay, dead_state) = if node == n1 {
        a1.kill();
        (UNDERLAY[0], s1.path())
    } else {
        a2.kill();
        (UNDERLAY[1], s2.path())
    };
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
    let now = router_namespaces(&gateway_mac);
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
    let back = agent(&node, dead_underlay, dead_state, ids.path())?;
    if node == n1 {
        a1 = back;
    } else {
        a2 = back;
    }
    wait_until(T, "the stale router namespace removed", || {
        let left = router_namespaces(&gateway_mac);
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
    drop((a1, a2));
    drop(controllers);
    Ok(())
}
