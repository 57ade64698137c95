//! The Open vSwitch datapath's benchmark, beside its reference in the same run: the network
//! agent's converge (`stratus_network_agent::agent::converge` with `OvsLinks` and
//! `OvsFirewall`, as `stratus agent --datapath ovs` runs it) of a fresh node with many ports
//! vs the same switch wired by hand (one `ovs-vsctl` transaction, `ovs-ofctl --bundle
//! add-flows` of the same flows, `nft -f` of the same tunnel filter); and every flow deleted
//! and put back, by the agent's converge vs `ovs-ofctl --bundle add-flows`. Each side has a
//! fresh namespace with its own `ovsdb-server` and `ovs-vswitchd` (userspace datapath),
//! started before the clock runs; everything is removed at the end, also on error.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use serde_json::{Value, json};
use stratus_api_types::compute::Hypervisor;
use stratus_api_types::network::Port;
use stratus_network_agent::agent::{Host, PortState, converge};
use stratus_network_agent::desired::{NETWORK_UID, NodeConfig, Snapshot};
use stratus_network_agent::driver::dnsmasq::Dnsmasq;
use stratus_network_agent::driver::netlink::NetlinkLinks;
use stratus_network_agent::driver::nft::NftFirewall;
use stratus_network_agent::driver::ovs::{INTEGRATION_BRIDGE, OvsLinks};
use stratus_network_agent::driver::ovs_daemon::{Ovs, OvsDaemon};
use stratus_network_agent::driver::ovs_firewall::OvsFirewall;
use stratus_network_agent::driver::{Name, Netns, ovs_flows};

use crate::net::{load, median};

/// The node's tunnel address, and its one peer's (which has a port of the network, so the
/// node has a tunnel port).
const UNDERLAY: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
const PEER: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);

/// Runs `program args` (in namespace `ns`, when given); its standard output.
fn run(ns: Option<&str>, program: &str, args: &[&str]) -> Result<String> {
    let mut c = match ns {
        Some(n) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", n, program]);
            c
        }
        None => Command::new(program),
    };
    let out = c
        .args(args)
        .output()
        .with_context(|| format!("run {program}"))?;
    ensure!(
        out.status.success(),
        "{program} {}: {}",
        args.join(" ").chars().take(200).collect::<String>(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Namespaces and switches the benchmark made, stopped and removed when dropped.
#[derive(Default)]
struct Cleanup {
    daemons: Vec<OvsDaemon>,
    namespaces: Vec<String>,
}

impl Cleanup {
    /// A fresh node: namespace `ns` with taps `tc0…` and its own switch, started.
    fn node(&mut self, ns: &str, ports: usize, dir: &Path) -> Result<(Netns, OvsDaemon)> {
        let netns = self.netns(ns, ports, dir)?;
        let daemon = OvsDaemon::new(netns.clone(), dir.join(format!("{ns}-ovs")));
        self.daemons.push(daemon.clone());
        daemon.start().context("start the node's switch")?;
        Ok((netns, daemon))
    }

    /// A fresh namespace `ns` with taps `tc0…` (a kernel node).
    fn netns(&mut self, ns: &str, ports: usize, dir: &Path) -> Result<Netns> {
        run(None, "ip", &["netns", "add", ns])?;
        self.namespaces.push(ns.to_owned());
        let batch: String = (0..ports)
            .map(|i| format!("tuntap add dev tc{i} mode tap\n"))
            .chain(std::iter::once("link set lo up\n".to_owned()))
            .collect();
        let file = dir.join(format!("{ns}.batch"));
        std::fs::write(&file, batch)?;
        run(None, "ip", &["-n", ns, "-batch", &file.to_string_lossy()])?;
        Ok(Netns::Named(Name::new(ns)?))
    }

    /// Stops the node's switch and deletes its namespace now.
    fn drop_node(&mut self, ns: &str) {
        if let Some(i) = self
            .daemons
            .iter()
            .position(|d| d.ovs().rundir().ends_with(format!("{ns}-ovs")))
        {
            let d = self.daemons.remove(i);
            if let Err(e) = d.stop() {
                eprintln!("stop the switch of {ns}: {e}");
            }
        }
        let _ = run(None, "ip", &["netns", "del", ns]);
        self.namespaces.retain(|n| n != ns);
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for d in &self.daemons {
            if let Err(e) = d.stop() {
                eprintln!("stop a switch: {e}");
            }
        }
        for n in &self.namespaces {
            let _ = run(None, "ip", &["netns", "del", n]);
        }
    }
}

/// What the API would hand the agent of node `node`: one network (VNI 7101, no DHCP, so
/// that both sides wire the switch alone) with `ports` ports on the node (devices `tc0…`)
/// and one on a peer node, in a group allowing ICMP and SSH in and everything out.
fn snapshot(node: &str, ports: usize) -> Result<Snapshot> {
    let net_uid = "ovsbench-net";
    let meta = |name: &str| {
        json!({"name": name, "namespace": "ovsbench", "uid": format!("ovsbench-{name}"),
               "annotations": {NETWORK_UID: net_uid}})
    };
    let port = |name: &str, host: &str, i: usize, device: Option<String>| -> Result<Arc<Port>> {
        let mut status = json!({
            "phase": "Pending", "hypervisor": host,
            "macAddress": format!("02:5c:{:02x}:{:02x}:{:02x}:01", (i >> 16) & 0xff, (i >> 8) & 0xff, i & 0xff),
            "fixedIPs": [{"subnet": "sn", "ipAddress": Ipv4Addr::new(10, 82, (i / 250) as u8, (i % 250 + 2) as u8).to_string()}],
        });
        if let Some(d) = device {
            status["interfaceName"] = json!(d);
        }
        Ok(Arc::new(serde_json::from_value(
            json!({"apiVersion": "network.stratus.dev/v1", "kind": "Port", "metadata": meta(name),
                      "spec": {"network": "net", "securityGroups": ["default"]}, "status": status}),
        )?))
    };
    let mut all = Vec::with_capacity(ports + 1);
    for i in 0..ports {
        all.push(port(&format!("p{i}"), node, i, Some(format!("tc{i}")))?);
    }
    all.push(port("peer", "peer", ports, None)?);
    let hypervisor = |name: &str, ip: Ipv4Addr| -> Result<Arc<Hypervisor>> {
        Ok(Arc::new(serde_json::from_value(
            json!({"apiVersion": "compute.stratus.dev/v1", "kind": "Hypervisor",
                      "metadata": {"name": name, "uid": format!("ovsbench-hv-{name}")},
                      "spec": {"hypervisorType": "qemu"}, "status": {"hostIP": ip.to_string()}}),
        )?))
    };
    Ok(Snapshot {
        ports: all,
        networks: vec![Arc::new(serde_json::from_value(json!({
            "apiVersion": "network.stratus.dev/v1", "kind": "Network",
            "metadata": {"name": "net", "namespace": "ovsbench", "uid": net_uid},
            "spec": {}, "status": {"phase": "Active", "vni": 7101},
        }))?)],
        subnets: vec![Arc::new(serde_json::from_value(json!({
            "apiVersion": "network.stratus.dev/v1", "kind": "Subnet", "metadata": meta("sn"),
            "spec": {"network": "net", "cidr": "10.82.0.0/16", "gatewayIP": "10.82.0.1", "enableDHCP": false},
        }))?)],
        hypervisors: vec![hypervisor(node, UNDERLAY)?, hypervisor("peer", PEER)?],
        groups: vec![Arc::new(serde_json::from_value(json!({
            "apiVersion": "network.stratus.dev/v1", "kind": "SecurityGroup",
            "metadata": {"name": "default", "namespace": "ovsbench", "uid": "ovsbench-sg"},
            "spec": {"rules": [
                {"direction": "ingress", "protocol": "icmp"},
                {"direction": "ingress", "protocol": "tcp", "portRangeMin": 22, "portRangeMax": 22},
                {"direction": "egress"},
            ]},
        }))?)],
        ..Snapshot::default()
    })
}

/// The agent's drivers for the node in `netns` on switch `daemon`.
fn host(netns: &Netns, daemon: &OvsDaemon, dir: &Path) -> Host {
    let links = Arc::new(OvsLinks::with_daemon(netns.clone(), daemon.clone()));
    Host {
        links: Arc::clone(&links) as _,
        firewall: Arc::new(OvsFirewall::new(NftFirewall::new(netns.clone()), links)),
        dhcp: Arc::new(Dnsmasq::new(dir.join("dhcp"))),
    }
}

/// The integration bridge's flows that a reconcile owns, as `dump-flows --no-stats` prints
/// them (which `add-flows` reads back).
fn owned_flows(ovs: &Ovs) -> Result<Vec<String>> {
    let out = ovs.ofctl(&["--no-stats"], "dump-flows", INTEGRATION_BRIDGE, &[], None)?;
    Ok(out
        .lines()
        .filter(|l| {
            let hex = l.trim().strip_prefix("cookie=0x").unwrap_or_default();
            let hex = hex.split(',').next().unwrap_or_default();
            u64::from_str_radix(hex, 16).is_ok_and(ovs_flows::owned)
        })
        .map(|l| l.trim().to_owned())
        .collect())
}

/// What the agent made on its switch, read back to wire the same by hand.
struct Made {
    /// Each interface of the integration bridge with its OpenFlow port number, type and
    /// options (`key=value`).
    interfaces: Vec<(String, u32, String, Vec<String>)>,
    flows: Vec<String>,
    ruleset: String,
}

fn read_made(ns: &str, ovs: &Ovs) -> Result<Made> {
    let out = ovs.vsctl(&[
        "--format=json",
        "--columns=name,ofport,type,options",
        "list",
        "Interface",
    ])?;
    let v: Value = serde_json::from_str(&out)?;
    let mut interfaces = Vec::new();
    for row in v["data"].as_array().context("ovs-vsctl list")? {
        let name = row[0].as_str().unwrap_or_default().to_owned();
        let ofport = row[1].as_u64().unwrap_or_default() as u32;
        let kind = row[2].as_str().unwrap_or_default().to_owned();
        let options: BTreeMap<String, String> = row[3][1]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| Some((p[0].as_str()?.to_owned(), p[1].as_str()?.to_owned())))
            .collect();
        // The bridge's own port is made with the bridge.
        if name != INTEGRATION_BRIDGE {
            let options = options.iter().map(|(k, v)| format!("{k}={v}")).collect();
            interfaces.push((name, ofport, kind, options));
        }
    }
    Ok(Made {
        interfaces,
        flows: owned_flows(ovs)?,
        ruleset: run(Some(ns), "nft", &["list", "ruleset"])?,
    })
}

/// The agent's wiring by hand on a fresh switch: one `ovs-vsctl` transaction (the bridge,
/// every interface at the agent's port number), the network's internal port up, `ovs-ofctl
/// --bundle add-flows` of the agent's flows, `nft -f` of its ruleset. The whole time, and
/// that of `add-flows` alone.
fn reference(m: &Made, ns: &str, ovs: &Ovs, dir: &Path) -> Result<(Duration, Duration)> {
    let mut args: Vec<String> = [
        "add-br",
        INTEGRATION_BRIDGE,
        "--",
        "set",
        "Bridge",
        INTEGRATION_BRIDGE,
        "datapath_type=netdev",
        "fail_mode=secure",
    ]
    .map(String::from)
    .to_vec();
    let mut internal = Vec::new();
    for (name, ofport, kind, options) in &m.interfaces {
        args.extend(
            [
                "--",
                "add-port",
                INTEGRATION_BRIDGE,
                name,
                "--",
                "set",
                "Interface",
                name,
            ]
            .map(String::from),
        );
        args.push(format!("ofport_request={ofport}"));
        if !kind.is_empty() {
            args.push(format!("type={kind}"));
        }
        if kind == "internal" {
            internal.push(name.clone());
        }
        args.extend(options.iter().map(|o| format!("options:{o}")));
    }
    let flows = dir.join(format!("{ns}.flows"));
    std::fs::write(&flows, m.flows.join("\n") + "\n")?;
    let rules = dir.join(format!("{ns}.nft"));
    std::fs::write(&rules, &m.ruleset)?;
    let t = Instant::now();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    ovs.vsctl(&args)?;
    for name in &internal {
        run(None, "ip", &["-n", ns, "link", "set", name, "up"])?;
    }
    let f = Instant::now();
    ovs.ofctl(
        &["--bundle"],
        "add-flows",
        INTEGRATION_BRIDGE,
        &[&flows.to_string_lossy()],
        None,
    )?;
    let flows_took = f.elapsed();
    run(Some(ns), "nft", &["-f", &rules.to_string_lossy()])?;
    Ok((t.elapsed(), flows_took))
}

/// `converge()` of node `netns`; how long it took, after checking every port is wired.
fn agent_converge(h: &Host, cfg: &NodeConfig, snap: &Snapshot, ports: usize) -> Result<Duration> {
    let t = Instant::now();
    let r = converge(h, cfg, snap).context("converge")?;
    let took = t.elapsed();
    ensure!(r.failures.is_empty(), "failed steps: {:?}", r.failures);
    let wired = r
        .ports
        .values()
        .filter(|p| matches!(p, PortState::Wired { .. }))
        .count();
    ensure!(wired == ports, "{wired} of {ports} ports wired");
    Ok(took)
}

fn each(v: &[f64]) -> String {
    v.iter()
        .map(|x| format!("{x:.2}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// One row: what, rounds, median and each.
fn row(what: &str, v: &[f64]) {
    println!(
        "| {what} | {} | {:.2} | {} |",
        v.len(),
        median(v.to_vec()),
        each(v)
    );
}

/// A fresh node of `ports` ports wired by the agent's OVS driver vs by hand; then every flow
/// deleted and put back by each.
pub fn converge_ports(ports: usize, rounds: usize) -> Result<()> {
    let tag = std::process::id();
    let node = format!("ob{tag}-node");
    let dir = tempfile::tempdir()?;
    let mut host_ = Cleanup::default();
    let snap = snapshot(&node, ports)?;
    let mut made: Option<Made> = None;
    let (mut agent_t, mut raw_t, mut agent_flows_t, mut raw_flows_t) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        // The agent goes first in even rounds (and in the first: the reference copies it).
        let order = if round % 2 == 0 {
            [true, false]
        } else {
            [false, true]
        };
        for agent_turn in order {
            let ns = format!("ob{tag}-{round}{}", if agent_turn { "a" } else { "r" });
            let (netns, daemon) = host_.node(&ns, ports, dir.path())?;
            let ovs = daemon.ovs();
            if agent_turn {
                let h = host(&netns, &daemon, dir.path());
                let cfg = NodeConfig {
                    node: node.clone(),
                    netns: netns.clone(),
                    underlay: Some(UNDERLAY),
                    physical: Default::default(),
                };
                let took = agent_converge(&h, &cfg, &snap, ports)?;
                let flows = owned_flows(&ovs)?.len();
                agent_t.push(took.as_secs_f64());
                // Every flow gone (as a restarted switch has none): the next converge
                // puts them back.
                ovs.ofctl(&[], "del-flows", INTEGRATION_BRIDGE, &[], None)?;
                let again = agent_converge(&h, &cfg, &snap, ports)?;
                ensure!(
                    owned_flows(&ovs)?.len() == flows,
                    "the flows put back differ in number"
                );
                agent_flows_t.push(again.as_secs_f64());
                eprintln!(
                    "round {round}: agent converged {ports} ports ({flows} flows) in {:.2} s, put every flow back in {:.2} s (load {})",
                    took.as_secs_f64(),
                    again.as_secs_f64(),
                    load()
                );
                if made.is_none() {
                    made = Some(read_made(&ns, &ovs)?);
                }
            } else {
                let m = made
                    .as_ref()
                    .context("the reference copies the agent's first run")?;
                let (took, flows_took) = reference(m, &ns, &ovs, dir.path())?;
                ensure!(
                    owned_flows(&ovs)?.len() == m.flows.len(),
                    "the reference's flows differ in number"
                );
                // The same again into an empty table.
                ovs.ofctl(&[], "del-flows", INTEGRATION_BRIDGE, &[], None)?;
                let file = dir.path().join(format!("{ns}.flows"));
                let t = Instant::now();
                ovs.ofctl(
                    &["--bundle"],
                    "add-flows",
                    INTEGRATION_BRIDGE,
                    &[&file.to_string_lossy()],
                    None,
                )?;
                let again = t.elapsed();
                raw_t.push(took.as_secs_f64());
                raw_flows_t.push(again.as_secs_f64());
                eprintln!(
                    "round {round}: by hand in {:.2} s (add-flows {:.2} s), every flow back in {:.2} s (load {})",
                    took.as_secs_f64(),
                    flows_took.as_secs_f64(),
                    again.as_secs_f64(),
                    load()
                );
            }
            host_.drop_node(&ns);
        }
    }
    let m = made.context("no agent run")?;
    let ifaces = m.interfaces.len();
    let flows = m.flows.len();
    println!(
        "| {ports} ports on a fresh OVS node ({ifaces} interfaces, {flows} flows) | rounds | median (s) | each (s) |"
    );
    println!("|---|---|---|---|");
    row(
        "by hand: one `ovs-vsctl` transaction + `ovs-ofctl --bundle add-flows` + `nft -f`",
        &raw_t,
    );
    row(
        "Stratus: the agent's `converge()` with OvsLinks + OvsFirewall",
        &agent_t,
    );
    row(
        "by hand: every flow put back, `ovs-ofctl --bundle add-flows`",
        &raw_flows_t,
    );
    row(
        "Stratus: every flow put back, the agent's `converge()`",
        &agent_flows_t,
    );
    println!();
    println!(
        "Stratus/by hand (medians): wiring {:.2}x, flows put back {:.2}x; load average at the end: {}",
        median(agent_t) / median(raw_t),
        median(agent_flows_t) / median(raw_flows_t),
        load()
    );
    Ok(())
}

/// [`snapshot`] with each port in a group of its own (`g0…`) of `rules` rules
/// ([`crate::net::group_rules`], as `net-sg` has them): `ports × rules` rules on the node.
fn sg_snapshot(node: &str, ports: usize, rules: usize) -> Result<Snapshot> {
    let mut snap = snapshot(node, ports)?;
    let base = snap.groups[0].clone();
    snap.groups = (0..ports)
        .map(|g| {
            let mut group = (*base).clone();
            group.metadata.name = Some(format!("g{g}"));
            group.metadata.uid = Some(format!("ovsbench-sg{g}"));
            group.spec.rules =
                serde_json::from_value(Value::Array(crate::net::group_rules(g, rules)))?;
            Ok(Arc::new(group))
        })
        .collect::<Result<_>>()?;
    for (i, p) in snap.ports.iter_mut().take(ports).enumerate() {
        let mut port = (**p).clone();
        port.spec.security_groups = Some(vec![format!("g{i}")]);
        *p = Arc::new(port);
    }
    Ok(snap)
}

/// A security-group change on a node of `ports` ports whose groups hold `rules` rules each:
/// one rule added to one port's group, then removed, each timed as the agent's `converge()`
/// from the Snapshot with the change to the node enforcing it, on the Open vSwitch datapath
/// (OvsLinks + OvsFirewall: the port's filter flows rewritten in one bundle) and on the
/// kernel's (NetlinkLinks + NftFirewall: the port's chains in one nft transaction), in the
/// same run, alternating which goes first.
pub fn sg_change(ports: usize, rules: usize, changes: usize) -> Result<()> {
    let tag = std::process::id();
    let node = format!("ob{tag}-node");
    let dir = tempfile::tempdir()?;
    let mut host_ = Cleanup::default();
    let snap = sg_snapshot(&node, ports, rules)?;
    let mut hosts = Vec::new();
    for ovs in [true, false] {
        let ns = format!("ob{tag}-sg{}", if ovs { "o" } else { "k" });
        let (netns, h) = if ovs {
            let (netns, daemon) = host_.node(&ns, ports, dir.path())?;
            let h = host(&netns, &daemon, dir.path());
            (netns, h)
        } else {
            let netns = host_.netns(&ns, ports, dir.path())?;
            let h = Host {
                links: Arc::new(NetlinkLinks::new()),
                firewall: Arc::new(NftFirewall::new(netns.clone())),
                dhcp: Arc::new(Dnsmasq::new(dir.path().join("dhcp-k"))),
            };
            (netns, h)
        };
        let cfg = NodeConfig {
            node: node.clone(),
            netns,
            underlay: Some(UNDERLAY),
            physical: Default::default(),
        };
        let t = agent_converge(&h, &cfg, &snap, ports)?;
        eprintln!(
            "{} node: {ports} ports × {rules} rules wired in {:.2} s (load {})",
            if ovs { "OVS" } else { "kernel" },
            t.as_secs_f64(),
            load()
        );
        hosts.push((ovs, h, cfg));
    }
    let (mut on_ovs, mut on_kernel) = (Vec::new(), Vec::new());
    for k in 0..changes {
        let g = k % ports;
        let mut changed = snap.clone();
        let mut group = (*changed.groups[g]).clone();
        group.spec.rules.push(serde_json::from_value(json!(
            {"direction": "ingress", "protocol": "tcp", "portRangeMin": 40000 + k, "portRangeMax": 40000 + k, "remoteIPPrefix": "203.0.113.0/24"}
        ))?);
        changed.groups[g] = Arc::new(group);
        if k % 2 == 1 {
            hosts.reverse();
        }
        for (ovs, h, cfg) in &hosts {
            for s in [&changed, &snap] {
                let took = agent_converge(h, cfg, s, ports)?;
                if *ovs { &mut on_ovs } else { &mut on_kernel }.push(took);
            }
        }
    }
    on_ovs.sort();
    on_kernel.sort();
    println!(
        "| {ports} ports × {rules} rules ({} security-group rules) | changes | p50 (ms) | max (ms) |",
        ports * rules
    );
    println!("|---|---|---|---|");
    for (label, v) in [
        (
            "kernel datapath: `converge()` with NetlinkLinks + NftFirewall",
            &on_kernel,
        ),
        (
            "OVS datapath: `converge()` with OvsLinks + OvsFirewall",
            &on_ovs,
        ),
    ] {
        println!(
            "| {label} | {} | {} | {} |",
            v.len(),
            crate::ms(crate::net::pct(v, 0.5)),
            crate::ms(v.last().copied().unwrap_or_default())
        );
    }
    println!();
    println!(
        "p50 OVS/kernel: {:.1}x; load average at the end: {}",
        crate::net::pct(&on_ovs, 0.5).as_secs_f64()
            / crate::net::pct(&on_kernel, 0.5).as_secs_f64(),
        load()
    );
    Ok(())
}
