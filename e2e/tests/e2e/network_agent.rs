//! The network agent against a real API server: two nodes (network namespaces joined by a
//! veth underlay on 192.0.2.0/24, each with a `stratus agent --roles network`), two guests
//! (namespaces plugged in as the devices of two Ports of one Network, 10.60.0.0/24). The
//! agents report their tunnel addresses and wire the ports (which go Active; a port whose
//! device is not there is Down saying so until it appears, which is no repair); the guests
//! take their addresses by DHCP and ping each other across VXLAN; a VXLAN device, an FDB
//! entry and the nft table deleted by hand are back within seconds with Events; a restarted
//! agent changes nothing (a ping running across the restart loses no packet); a
//! security-group rule removed and added back takes effect at once; with the ports deleted
//! nothing of Stratus's is left on the nodes.
//!
//! Each agent runs as its node (`system:node:NAME`), so the node authorizer's rules for the
//! network role are what it reads and writes through.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};
use stratus_e2e::net::{
    Namespaces, UNDERLAY, agent_logs, links_of_kind, network_agent, ping, plug_port, underlay,
};
use stratus_e2e::{Apiserver, Etcd, Proc, ip, netns_exec, wait_until};

pub(super) const NS: &str = "netdemo";

/// Generous: the agents share two cores with every other test.
const T: Duration = Duration::from_secs(90);

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

/// A node's network agent; `underlay` is `--underlay-ip ADDRESS` or `--tunnel-interface
/// NAME`.
fn agent(node: &str, underlay: [&str; 2], state: &Path, kubeconfigs: &Path) -> Result<Proc> {
    let kubeconfig = kubeconfigs.join(format!("{node}.kubeconfig"));
    network_agent(node, &kubeconfig, state, &underlay)
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

fn ifindex(ns: &str, name: &str) -> Result<u64> {
    let out = ip(&["-n", ns, "-j", "link", "show", name])?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    v.get(0)
        .and_then(|l| l.get("ifindex")?.as_u64())
        .context("ifindex")
}

#[test]
fn two_network_agents_wire_ports_across_vxlan_and_repair_drift() -> Result<()> {
    let etcd = Etcd::start()?;
    let mut api = Apiserver::start_on(&etcd)?;
    api.projects(&[NS])?;
    let tag = std::process::id();
    let (n1, n2) = (format!("snet-{tag}-n1"), format!("snet-{tag}-n2"));
    let (g1, g2) = (format!("snet-{tag}-g1"), format!("snet-{tag}-g2"));
    let (s1, s2) = (tempfile::tempdir()?, tempfile::tempdir()?);
    let _host = Namespaces::add(&[&n1, &n2, &g1, &g2], &[s1.path(), s2.path()])?;
    underlay(&n1, &n2)?;

    // The cloud's objects (IPAM gives the VNI, MACs and addresses); the ports' placement is
    // written as the compute side would.
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
spec: {{network: net, cidr: 10.60.0.0/24, gatewayIP: 10.60.0.1}}
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
    let mut guests = Vec::new();
    for (i, (port, node, guest)) in [("p1", &n1, &g1), ("p2", &n2, &g2)].into_iter().enumerate() {
        let device = format!("tp-e2e-{}", i + 1);
        let addr = plug_port(&api, NS, port, node, &device, guest, Some(1450))?;
        guests.push((guest.clone(), addr));
    }

    let ids = tempfile::tempdir()?;
    api.node_identities(&[&n1, &n2], ids.path())?;
    let n1_underlay = ["--underlay-ip", UNDERLAY[0]];
    let mut a1 = agent(&n1, n1_underlay, s1.path(), ids.path())?;
    // Node 2 finds its address on its underlay interface.
    let _a2 = agent(
        &n2,
        ["--tunnel-interface", "underlay"],
        s2.path(),
        ids.path(),
    )?;

    // The agents tell where their tunnels end, and wire the ports.
    for (node, want) in [(&n1, UNDERLAY[0]), (&n2, UNDERLAY[1])] {
        wait_until(T, "the node's hostIP", || {
            api.kubectl_ok(&["get", "hypervisor", node, "-o", "jsonpath={.status.hostIP}"])
                .ok()
                .filter(|ip| ip == want)
        })?;
    }
    for port in ["p1", "p2"] {
        wait_until(T, "the port to be Active", || {
            jsonpath(&api, "port", port, "{.status.phase}")
                .ok()
                .filter(|p| p == "Active")
        })
        .with_context(|| agent_logs(&[s1.path(), s2.path()]))?;
        let ready = jsonpath(
            &api,
            "port",
            port,
            "{.status.conditions[?(@.type==\"Ready\")].reason}",
        )?;
        assert_eq!(ready, "Wired");
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
    })?;
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
    })?;
    let events = kubectl(&api, &["get", "events", "-o", "json"])?;
    assert!(!events.contains("DriftRepaired"), "{events}");

    // DHCP gives each guest its IPAM address; they reach each other across VXLAN.
    let dir = tempfile::tempdir()?;
    for (guest, addr) in &guests {
        let offered = wait_until(T, "a DHCP offer", || lease(guest, dir.path()))?;
        assert_eq!(&offered, addr);
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
    wait_until(T, "guest 1 to reach guest 2", || {
        ping(&g1, &ip2).then_some(())
    })?;
    wait_until(T, "guest 2 to reach guest 1", || {
        ping(&g2, &ip1).then_some(())
    })?;

    // Drift: node 1's VXLAN device deleted by hand is back within seconds, with an Event.
    let vx = links_of_kind(&n1, "vxlan")?;
    assert_eq!(vx.len(), 1, "{vx:?}");
    ip(&["-n", &n1, "link", "del", &vx[0]])?;
    wait_until(T, "the VXLAN device to be back", || {
        (links_of_kind(&n1, "vxlan").ok()? == vx).then_some(())
    })?;
    wait_until(T, "the overlay to work again", || {
        ping(&g1, &ip2).then_some(())
    })?;
    // Node 2's flood entry to node 1 and node 1's nft table, deleted by hand, are back too.
    let flood_to_n1 = format!("00:00:00:00:00:00 dst {}", UNDERLAY[0]);
    let fdb = || {
        Command::new("ip")
            .args(["netns", "exec", &n2, "bridge", "fdb", "show", "dev", &vx[0]])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).contains(&flood_to_n1))
            .unwrap_or(false)
    };
    assert!(fdb());
    assert!(exec(
        &n2,
        &[
            "bridge",
            "fdb",
            "del",
            "00:00:00:00:00:00",
            "dev",
            &vx[0],
            "dst",
            UNDERLAY[0]
        ]
    ));
    assert!(exec(&n1, &["nft", "delete", "table", "inet", "stratus"]));
    wait_until(T, "the FDB entry and nft table to be back", || {
        (fdb() && exec(&n1, &["nft", "list", "table", "inet", "stratus"])).then_some(())
    })?;
    wait_until(T, "an Event of each repair", || {
        kubectl(&api, &["get", "events", "-o", "json"])
            .ok()
            .filter(|e| {
                e.contains("DriftRepaired")
                    && e.contains("created VXLAN device")
                    && e.contains("set the FDB of")
                    && e.contains("applied the nft ruleset")
            })
    })
    .with_context(|| {
        // What there is, and what the agents did, for a run that fails here.
        format!(
            "events: {}\nagent logs:\n{}",
            kubectl(&api, &["get", "events", "-o", "json"]).unwrap_or_default(),
            agent_logs(&[s1.path(), s2.path()])
        )
    })?;
    wait_until(T, "the overlay to work", || ping(&g1, &ip2).then_some(()))?;

    // A restarted agent changes nothing that is right: same device, same DHCP server.
    let before = ifindex(&n1, &vx[0])?;
    let dhcp = std::fs::read_dir(s1.path().join("network/dhcp"))?
        .flatten()
        .next()
        .context("a DHCP server of node 1")?
        .path();
    let pid = std::fs::read_to_string(dhcp.join("pid"))?;
    // A ping runs across the restart: 60 echoes 100 ms apart, none may be lost.
    let pinger = Command::new("ip")
        .args([
            "netns", "exec", &g1, "busybox", "ping", "-c", "60", "-i", "0.1", "-W", "2",
        ])
        .arg(&ip2)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    std::thread::sleep(Duration::from_millis(500));
    a1.terminate()?;
    let mut a1 = agent(&n1, n1_underlay, s1.path(), ids.path())?;
    let out = pinger.wait_with_output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("60 packets transmitted, 60 packets received"),
        "packets lost across the agent's restart: {text}"
    );
    assert!(a1.running());
    assert_eq!(ifindex(&n1, &vx[0])?, before);
    assert_eq!(std::fs::read_to_string(dhcp.join("pid"))?, pid);

    // A security-group rule removed, then added back, takes effect on the node at once.
    let group = |rules: &str| {
        format!(
            "apiVersion: network.stratus.dev/v1\nkind: SecurityGroup\nmetadata: {{name: default, namespace: {NS}}}\nspec:\n  rules:\n{rules}"
        )
    };
    // At once: the agent's one-second resync, plus kubectl and ping on a loaded machine.
    let at_once = Duration::from_secs(30);
    let icmp = "  - {direction: ingress, protocol: icmp, remoteGroup: default}\n";
    let egress = "  - {direction: egress}\n";
    let t = std::time::Instant::now();
    api.kubectl_in(&["apply", "-f", "-"], &group(egress))?;
    wait_until(at_once, "ICMP to be dropped", || {
        (!ping(&g1, &ip2)).then_some(())
    })?;
    let dropped = t.elapsed();
    let t = std::time::Instant::now();
    api.kubectl_in(&["apply", "-f", "-"], &group(&format!("{icmp}{egress}")))?;
    wait_until(at_once, "ICMP to be allowed", || {
        ping(&g1, &ip2).then_some(())
    })?;
    let allowed = t.elapsed();
    eprintln!(
        "security-group change to effect (with kubectl and ping): removed {dropped:?}, added {allowed:?}"
    );

    // The ports deleted: nothing of Stratus's is left on the nodes.
    let mut servers = Vec::new();
    for dir in [s1.path(), s2.path()] {
        for e in std::fs::read_dir(dir.join("network/dhcp"))?.flatten() {
            servers.push(e.file_name().to_string_lossy().into_owned());
        }
    }
    assert_eq!(servers.len(), 2, "one DHCP server per node");
    kubectl(&api, &["delete", "port", "p1", "p2", "p3"])?;
    for node in [&n1, &n2] {
        wait_until(T, "the node to be clean", || {
            let clean = links_of_kind(node, "vxlan").ok()?.is_empty()
                && links_of_kind(node, "bridge").ok()?.is_empty()
                && !exec(node, &["nft", "list", "table", "inet", "stratus"]);
            clean.then_some(())
        })?;
    }
    for dir in [s1.path(), s2.path()] {
        let left: Vec<_> = std::fs::read_dir(dir.join("network/dhcp"))?
            .flatten()
            .collect();
        assert!(left.is_empty(), "DHCP servers left: {left:?}");
    }
    let namespaces = ip(&["netns", "list"])?;
    for s in &servers {
        assert!(!namespaces.contains(s.as_str()), "{s} left: {namespaces}");
    }
    Ok(())
}
