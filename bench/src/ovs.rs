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
use stratus_network_agent::driver::ovs::{
    INTEGRATION_BRIDGE, OvsLinks, add_port_args, attach_underlay,
};
use stratus_network_agent::driver::ovs_daemon::{Ovs, OvsDaemon};
use stratus_network_agent::driver::ovs_firewall::OvsFirewall;
use stratus_network_agent::driver::{IfName, Name, Netns, ovs_flows};

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
    // Every interface up, as the agent leaves them (the taps too: an up port costs the
    // switch more to poll).
    let mut up = Vec::new();
    for (name, ofport, kind, options) in &m.interfaces {
        args.extend(add_port_args(
            name,
            std::iter::once(format!("ofport_request={ofport}"))
                .chain((!kind.is_empty()).then(|| format!("type={kind}")))
                .chain(options.iter().map(|o| format!("options:{o}"))),
        ));
        if kind.is_empty() || kind == "internal" {
            up.push(format!("link set {name} up\n"));
        }
    }
    let flows = dir.join(format!("{ns}.flows"));
    std::fs::write(&flows, m.flows.join("\n") + "\n")?;
    let rules = dir.join(format!("{ns}.nft"));
    std::fs::write(&rules, &m.ruleset)?;
    let links = dir.join(format!("{ns}.up"));
    std::fs::write(&links, up.concat())?;
    let t = Instant::now();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    ovs.vsctl(&args)?;
    run(None, "ip", &["-n", ns, "-batch", &links.to_string_lossy()])?;
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

// ---------------------------------------------------------------------------------------
// TCP across the overlay: the Open vSwitch datapath vs the kernel's, each wired by the
// agent and by hand.

/// The two guests' addresses and MACs, the network's VNI and MTU.
const TCP_IPS: [Ipv4Addr; 2] = [Ipv4Addr::new(10, 83, 0, 11), Ipv4Addr::new(10, 83, 0, 12)];
const TCP_MACS: [&str; 2] = ["02:5c:83:00:00:0b", "02:5c:83:00:00:0c"];
const TCP_VNI: u32 = 7102;
const TCP_MTU: u32 = 1450;

/// What carries the guests' traffic between the two nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Carrier {
    KernelByHand,
    KernelAgent,
    OvsByHand,
    OvsAgent,
}

impl Carrier {
    const ALL: [Carrier; 4] = [
        Carrier::KernelByHand,
        Carrier::KernelAgent,
        Carrier::OvsByHand,
        Carrier::OvsAgent,
    ];

    fn ovs(self) -> bool {
        matches!(self, Carrier::OvsByHand | Carrier::OvsAgent)
    }

    /// Its part of the namespaces' names.
    fn tag(self) -> &'static str {
        match self {
            Carrier::KernelByHand => "kh",
            Carrier::KernelAgent => "ka",
            Carrier::OvsByHand => "oh",
            Carrier::OvsAgent => "oa",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Carrier::KernelByHand => {
                "kernel by hand: bridge + VXLAN (nolearning, one flood entry), no filter"
            }
            Carrier::KernelAgent => {
                "kernel, the agent: `converge()` with NetlinkLinks + NftFirewall (bridge, VXLAN, FDB, nft filter with conntrack)"
            }
            Carrier::OvsByHand => {
                "OVS by hand: one netdev bridge, `NORMAL` (MAC learning), a VXLAN port, no filter"
            }
            Carrier::OvsAgent => {
                "OVS, the agent: `converge()` with OvsLinks + OvsFirewall (br-int pipeline, filter with OVS conntrack)"
            }
        }
    }
}

/// The objects the agents of nodes `n` see: one network (VNI [`TCP_VNI`], no DHCP) with a
/// port on each node (device `tport`), in a group allowing TCP 5201 in and all out.
fn tcp_snapshot(n: &[String; 2]) -> Result<Snapshot> {
    let net_uid = "ovstcp-net";
    let meta = |name: &str| {
        json!({"name": name, "namespace": "ovstcp", "uid": format!("ovstcp-{name}"),
               "annotations": {NETWORK_UID: net_uid}})
    };
    let mut ports = Vec::new();
    let mut hypervisors = Vec::new();
    for i in 0..2 {
        ports.push(Arc::new(serde_json::from_value(json!({
            "apiVersion": "network.stratus.dev/v1", "kind": "Port", "metadata": meta(&format!("p{i}")),
            "spec": {"network": "net", "securityGroups": ["default"]},
            "status": {"phase": "Pending", "hypervisor": n[i], "macAddress": TCP_MACS[i],
                       "interfaceName": "tport",
                       "fixedIPs": [{"subnet": "sn", "ipAddress": TCP_IPS[i].to_string()}]},
        }))?));
        hypervisors.push(Arc::new(serde_json::from_value(json!({
            "apiVersion": "compute.stratus.dev/v1", "kind": "Hypervisor",
            "metadata": {"name": n[i], "uid": format!("ovstcp-hv{i}")},
            "spec": {"hypervisorType": "qemu"},
            "status": {"hostIP": format!("192.0.2.{}", i + 1)},
        }))?));
    }
    Ok(Snapshot {
        ports,
        hypervisors,
        networks: vec![Arc::new(serde_json::from_value(json!({
            "apiVersion": "network.stratus.dev/v1", "kind": "Network",
            "metadata": {"name": "net", "namespace": "ovstcp", "uid": net_uid},
            "spec": {"mtu": TCP_MTU}, "status": {"phase": "Active", "vni": TCP_VNI},
        }))?)],
        subnets: vec![Arc::new(serde_json::from_value(json!({
            "apiVersion": "network.stratus.dev/v1", "kind": "Subnet", "metadata": meta("sn"),
            "spec": {"network": "net", "cidr": "10.83.0.0/24", "gatewayIP": "10.83.0.1", "enableDHCP": false},
        }))?)],
        groups: vec![Arc::new(serde_json::from_value(json!({
            "apiVersion": "network.stratus.dev/v1", "kind": "SecurityGroup",
            "metadata": {"name": "default", "namespace": "ovstcp", "uid": "ovstcp-sg"},
            "spec": {"rules": [
                {"direction": "ingress", "protocol": "tcp", "portRangeMin": 5201, "portRangeMax": 5201},
                {"direction": "egress"},
            ]},
        }))?)],
        ..Snapshot::default()
    })
}

/// Two nodes carried by `c` (namespaces joined by a veth underlay, 192.0.2.1 and .2; on
/// Open vSwitch the underlay on the switch's `br-phy`, as the agent's nodes have it), each
/// with a guest namespace whose `eth0` (the port's MAC and address, MTU [`TCP_MTU`]) is the
/// peer of device `tport` on its node; wired. The guests' namespaces, and the agents' drivers
/// (which must live while the nodes are measured).
fn tcp_pair(
    host: &mut Cleanup,
    prefix: &str,
    c: Carrier,
    dir: &Path,
) -> Result<([String; 2], Vec<Host>)> {
    let n = [1, 2].map(|i| format!("{prefix}-{}n{i}", c.tag()));
    let g = [1, 2].map(|i| format!("{prefix}-{}g{i}", c.tag()));
    for x in n.iter().chain(&g) {
        run(None, "ip", &["netns", "add", x])?;
        host.namespaces.push(x.clone());
        run(None, "ip", &["-n", x, "link", "set", "lo", "up"])?;
    }
    run(
        None,
        "ip",
        &[
            "link", "add", "underlay", "netns", &n[0], "type", "veth", "peer", "name", "underlay",
            "netns", &n[1],
        ],
    )?;
    let mtu = TCP_MTU.to_string();
    for i in 0..2 {
        let local = format!("192.0.2.{}", i + 1);
        run(
            None,
            "ip",
            &[
                "-n",
                &n[i],
                "addr",
                "add",
                &format!("{local}/24"),
                "dev",
                "underlay",
            ],
        )?;
        run(None, "ip", &["-n", &n[i], "link", "set", "underlay", "up"])?;
        run(
            None,
            "ip",
            &[
                "link", "add", "tport", "netns", &n[i], "type", "veth", "peer", "name", "eth0",
                "netns", &g[i],
            ],
        )?;
        let ip_ = format!("{}/24", TCP_IPS[i]);
        run(
            None,
            "ip",
            &[
                "-n",
                &g[i],
                "link",
                "set",
                "eth0",
                "address",
                TCP_MACS[i],
                "mtu",
                &mtu,
                "up",
            ],
        )?;
        run(
            None,
            "ip",
            &["-n", &g[i], "addr", "add", &ip_, "dev", "eth0"],
        )?;
        // The userspace datapath reads frames from its ports without the kernel's checksum
        // offload state, so a guest whose checksums are left to offload sends TCP that the
        // other side drops: on OVS a guest's veth computes them (as the tests' guests and
        // DHCP servers do).
        if c.ovs() {
            run(Some(g[i].as_str()), "ethtool", &["-K", "eth0", "tx", "off"])?;
        }
    }
    let mut hosts = Vec::new();
    for i in 0..2 {
        let netns = Netns::Named(Name::new(&n[i])?);
        let (local, peer) = (format!("192.0.2.{}", i + 1), format!("192.0.2.{}", 2 - i));
        let daemon = if c.ovs() {
            let d = OvsDaemon::new(netns.clone(), dir.join(format!("{}-ovs", n[i])));
            host.daemons.push(d.clone());
            d.start().context("start the node's switch")?;
            attach_underlay(&d.ovs(), &netns, &IfName::new("underlay")?)?;
            Some(d)
        } else {
            None
        };
        match (c, &daemon) {
            (Carrier::KernelByHand, _) => {
                let ns = Some(n[i].as_str());
                run(
                    ns,
                    "ip",
                    &["link", "add", "br0", "mtu", &mtu, "type", "bridge"],
                )?;
                run(
                    ns,
                    "ip",
                    &[
                        "link",
                        "add",
                        "vx0",
                        "mtu",
                        &mtu,
                        "type",
                        "vxlan",
                        "id",
                        &TCP_VNI.to_string(),
                        "local",
                        &local,
                        "dstport",
                        "4789",
                        "nolearning",
                    ],
                )?;
                run(ns, "ip", &["link", "set", "vx0", "master", "br0", "up"])?;
                run(
                    ns,
                    "ip",
                    &["link", "set", "tport", "mtu", &mtu, "master", "br0", "up"],
                )?;
                run(ns, "ip", &["link", "set", "br0", "up"])?;
                run(
                    ns,
                    "bridge",
                    &[
                        "fdb",
                        "append",
                        "00:00:00:00:00:00",
                        "dev",
                        "vx0",
                        "dst",
                        &peer,
                    ],
                )?;
            }
            (Carrier::OvsByHand, Some(d)) => {
                d.ovs().vsctl(&[
                    "add-br",
                    "br0",
                    "--",
                    "set",
                    "Bridge",
                    "br0",
                    "datapath_type=netdev",
                    "--",
                    "add-port",
                    "br0",
                    "tport",
                    "--",
                    "add-port",
                    "br0",
                    "vx0",
                    "--",
                    "set",
                    "Interface",
                    "vx0",
                    "type=vxlan",
                    &format!("options:remote_ip={peer}"),
                    &format!("options:local_ip={local}"),
                    &format!("options:key={TCP_VNI}"),
                ])?;
                run(
                    Some(n[i].as_str()),
                    "ip",
                    &["link", "set", "tport", "mtu", &mtu, "up"],
                )?;
            }
            (Carrier::KernelAgent | Carrier::OvsAgent, _) => {
                let h = match &daemon {
                    Some(d) => self::host(&netns, d, &dir.join(format!("{}-dhcp", n[i]))),
                    None => Host {
                        links: Arc::new(NetlinkLinks::new()),
                        firewall: Arc::new(NftFirewall::new(netns.clone())),
                        dhcp: Arc::new(Dnsmasq::new(dir.join(format!("{}-dhcp", n[i])))),
                    },
                };
                let cfg = NodeConfig {
                    node: n[i].clone(),
                    netns,
                    underlay: Some(local.parse()?),
                    physical: Default::default(),
                };
                agent_converge(&h, &cfg, &tcp_snapshot(&n)?, 1)?;
                hosts.push(h);
            }
            (Carrier::OvsByHand, None) => unreachable!("an OVS node has its switch"),
        }
    }
    Ok((g, hosts))
}

/// TCP throughput, one stream from guest 1 to guest 2 across the overlay, on the kernel's
/// datapath and on Open vSwitch's (userspace `netdev`), each wired by the agent and by hand,
/// all four side by side in one run, rotating which goes first each round.
pub fn tcp(seconds: f64, rounds: usize) -> Result<()> {
    let prefix = format!("ot{}", std::process::id());
    let dir = tempfile::tempdir()?;
    let mut host_ = Cleanup::default();
    let mut pairs = Vec::new();
    for c in Carrier::ALL {
        let t = Instant::now();
        let (g, hosts) =
            tcp_pair(&mut host_, &prefix, c, dir.path()).with_context(|| format!("wire {c:?}"))?;
        eprintln!("{c:?}: wired in {:.2} s", t.elapsed().as_secs_f64());
        pairs.push((c, g, hosts));
    }
    // Each path carries a short run before the measured ones (ARP, conntrack, MACs learnt).
    for (c, g, _) in &pairs {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            match crate::net::tcp_once(&g[0], &g[1], TCP_IPS[1], 0.5) {
                Ok(_) => break,
                Err(e) if Instant::now() < deadline => {
                    eprintln!("{c:?}: not through yet: {e:#}");
                    std::thread::sleep(Duration::from_secs(1));
                }
                Err(e) => return Err(e.context(format!("{c:?}: no TCP through in 90 s"))),
            }
        }
    }
    let mut results: BTreeMap<usize, Vec<f64>> = BTreeMap::new();
    for round in 0..rounds {
        for k in 0..pairs.len() {
            let i = (k + round) % pairs.len();
            let (c, g, _) = &pairs[i];
            let gbps = crate::net::tcp_once(&g[0], &g[1], TCP_IPS[1], seconds)?;
            eprintln!("round {round}: {c:?} {gbps:.3} Gbit/s (load {})", load());
            results.entry(i).or_default().push(gbps);
        }
    }
    let (source_cpu, sink_cpu) = crate::net::tcp_cpus();
    println!(
        "| TCP, one stream, {seconds} s per run, MTU {TCP_MTU}, source on CPU {source_cpu}, sink on CPU {sink_cpu} | runs | median (Gbit/s) | min–max | each |"
    );
    println!("|---|---|---|---|---|");
    let mut medians = BTreeMap::new();
    for (i, (c, _, _)) in pairs.iter().enumerate() {
        let v = results.remove(&i).unwrap_or_default();
        let m = median(v.clone());
        let (lo, hi) = v
            .iter()
            .fold((f64::MAX, 0.0f64), |(lo, hi), x| (lo.min(*x), hi.max(*x)));
        println!(
            "| {} | {} | {m:.3} | {lo:.3}–{hi:.3} | {} |",
            c.label(),
            v.len(),
            each(&v)
        );
        medians.insert(c.tag(), m);
    }
    let r = |a: &str, b: &str| medians[a] / medians[b];
    println!();
    println!(
        "medians: OVS/kernel, the agents {:.3}x, by hand {:.3}x; the agent/by hand, kernel {:.3}x, OVS {:.3}x; load average at the end: {}",
        r("oa", "ka"),
        r("oh", "kh"),
        r("ka", "kh"),
        r("oa", "oh"),
        load()
    );
    Ok(())
}
