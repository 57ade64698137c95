//! Real TCG guests on two simulated nodes, across VXLAN, on either datapath: each node is a
//! libvirtd in a network namespace of its own (named as the node), the two joined by a veth
//! underlay the test builds (192.0.2.0/24), each running `stratus agent --roles
//! compute,network` (with `--datapath ovs` where asked, which starts the node's own
//! `ovsdb-server` and `ovs-vswitchd`) against one `stratus up` cloud, in an availability zone
//! named as the node so that each Server lands where the test says.
//!
//! Project `rg-one` has Servers `a` (node 1) and `b` (node 2) on Network `net`
//! (10.0.0.0/24), and a namespace "probe" plugged in on node 1 as the device of Port `probe`;
//! project `rg-two` has a Network of the same 10.0.0.0/24 and Server `c` on node 2 holding
//! `b`'s address. Asserted: each guest's DHCP lease is its Port's IPAM address; `a` and `b`
//! ping each other from their shells (markers on their consoles); `c` reaches its own DHCP
//! server but neither `a` nor the probe, and the probe's ingress counter of `c`'s MAC stays
//! at zero while the same counter of `a`'s MAC counts `a`'s pings (so the zero is not the
//! counter's); the ICMP rule of `rg-one`'s group removed stops the probe's running ping to
//! `b` (one ICMP id) within a second of the API write, and added back lets it through within
//! a second.
//!
//! One test per pair of datapaths: kernel + kernel, OVS + OVS, kernel + OVS.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams};
use serde_json::{Value, json};
use stratus_e2e::net::{
    ContinuousPing, Datapath, Namespaces, Switch, UNDERLAY, checksum_underlay, plug_cloud_port,
    underlay,
};
use stratus_e2e::node::{Guest, Node, NodeNetns};
use stratus_e2e::{Cloud, netns_exec, repo_root, wait_until};

const P1: &str = "rg-one";
const P2: &str = "rg-two";
/// A TCG guest's boot and its first lease, on two cores shared with other tests.
const BOOT: Duration = Duration::from_secs(300);
/// The bound the issue names for a security-group change, from the API write to the effect.
const AT_ONCE: Duration = Duration::from_secs(1);

/// The nodes and what runs in their namespaces, dropped in order: the agents (so that they
/// make nothing again), the switches, the probe's namespace, the nodes' namespaces with their
/// DHCP servers, the nodes (guests, libvirtd).
struct Rig {
    switches: Vec<Switch>,
    probe: Option<Namespaces>,
    nets: Vec<NodeNetns>,
    nodes: Vec<Node>,
}

impl Drop for Rig {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            n.kill_agent();
        }
    }
}

impl Rig {
    fn logs(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("agent of {}:\n{}", n.name, n.agent_log()))
            .collect::<Vec<_>>()
            .join("\n----\n")
    }
}

/// The rule the test removes and adds back: ICMP in from the subnet (and so from the other
/// project's guests too, were they to cross: their isolation is the network's, not this
/// group's).
const ICMP_IN: &str = "  - {direction: ingress, protocol: icmp, remoteIPPrefix: 10.0.0.0/24}\n";

/// A project's network, subnet and `default` group (all egress, [`ICMP_IN`]).
fn project_yaml() -> String {
    format!(
        "apiVersion: network.stratus.dev/v1\nkind: Network\nmetadata: {{name: net}}\nspec: {{}}\n---\n\
         apiVersion: network.stratus.dev/v1\nkind: Subnet\nmetadata: {{name: sn}}\n\
         spec: {{network: net, cidr: 10.0.0.0/24, gatewayIP: 10.0.0.1}}\n---\n{}",
        group_yaml(ICMP_IN)
    )
}

fn group_yaml(icmp: &str) -> String {
    format!(
        "apiVersion: network.stratus.dev/v1\nkind: SecurityGroup\nmetadata: {{name: default}}\nspec:\n  rules:\n  - {{direction: egress}}\n{icmp}"
    )
}

fn server_yaml(name: &str, zone: &str, fixed_ip: Option<&str>) -> String {
    let fixed = fixed_ip
        .map(|ip| format!(", fixedIP: \"{ip}\""))
        .unwrap_or_default();
    format!(
        "apiVersion: compute.stratus.dev/v1\nkind: Server\nmetadata: {{name: {name}}}\n\
         spec: {{flavor: m1.nano, image: tiny, availabilityZone: {zone}, networks: [{{network: net{fixed}}}]}}\n"
    )
}

fn get(cloud: &Cloud, ns: &str, kind: &str, name: &str) -> Option<Value> {
    let out = cloud
        .kubectl_ok(&["-n", ns, "get", kind, name, "-o", "json"])
        .ok()?;
    serde_json::from_str(&out).ok()
}

/// A guest of the test: its Server's uid, node, Port and the Port's MAC and address.
struct Vm {
    name: &'static str,
    uid: String,
    node: usize,
    ip: String,
    mac: String,
}

impl Vm {
    fn domain(&self) -> String {
        format!("stratus-{}", self.uid)
    }
}

/// Waits for Server `name` of `ns` on node `node` to run, and reads its Port.
fn running(cloud: &Cloud, rig: &Rig, ns: &str, name: &'static str, node: usize) -> Result<Vm> {
    let s = wait_until(BOOT, &format!("{name} running"), || {
        get(cloud, ns, "server", name).filter(|v| v["status"]["phase"] == "Running")
    })
    .with_context(|| rig.logs())?;
    ensure!(
        s["status"]["hypervisor"] == rig.nodes[node].name.as_str(),
        "{name} on {} not {}",
        s["status"]["hypervisor"],
        rig.nodes[node].name
    );
    let port = s["status"]["addresses"][0]["port"]
        .as_str()
        .context("a port")?;
    let p = get(cloud, ns, "port", port).context("the port")?;
    Ok(Vm {
        name,
        uid: s["metadata"]["uid"].as_str().context("uid")?.to_owned(),
        node,
        ip: p["status"]["fixedIPs"][0]["ipAddress"]
            .as_str()
            .context("an address")?
            .to_owned(),
        mac: p["status"]["macAddress"]
            .as_str()
            .context("a MAC")?
            .to_owned(),
    })
}

/// The frames from `mac` that reached the probe's `eth0`, as its own netdev ingress counter
/// (table `rgcount`, in the probe's namespace) counts them.
fn frames_from(probe: &str, mac: &str) -> Result<u64> {
    let (ok, out) = netns_exec(probe, &["nft", "-j", "list", "table", "netdev", "rgcount"]);
    ensure!(ok, "nft list: {out}");
    let v: Value = serde_json::from_str(&out)?;
    for item in v["nftables"].as_array().into_iter().flatten() {
        let rule = &item["rule"];
        if rule["comment"] == mac {
            for e in rule["expr"].as_array().into_iter().flatten() {
                if let Some(n) = e["counter"]["packets"].as_u64() {
                    return Ok(n);
                }
            }
        }
    }
    bail!("no counter of {mac}: {out}")
}

/// Writes the rules of project [`P1`]'s `default` group in one merge patch, straight to the
/// API (no kubectl to start): what a test times a change from.
struct GroupWriter {
    rt: tokio::runtime::Runtime,
    api: Api<DynamicObject>,
}

impl GroupWriter {
    fn new(cloud: &Cloud) -> Result<Self> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let api = rt.block_on(async {
            let client = cloud.client().await?;
            let gvk = GroupVersionKind::gvk("network.stratus.dev", "v1", "SecurityGroup");
            let resource = ApiResource::from_gvk_with_plural(&gvk, "securitygroups");
            let api = Api::<DynamicObject>::namespaced_with(client, P1, &resource);
            // The connection made before anything is timed.
            api.get("default").await?;
            anyhow::Ok(api)
        })?;
        Ok(Self { rt, api })
    }

    /// All egress, and ICMP in from the subnet if `icmp_in` ([`ICMP_IN`]).
    fn write(&self, icmp_in: bool) -> Result<()> {
        let mut rules = vec![json!({"direction": "egress"})];
        if icmp_in {
            rules.push(
                json!({"direction": "ingress", "protocol": "icmp", "remoteIPPrefix": "10.0.0.0/24"}),
            );
        }
        let patch = Patch::Merge(json!({"spec": {"rules": rules}}));
        self.rt
            .block_on(self.api.patch("default", &PatchParams::default(), &patch))?;
        Ok(())
    }
}

fn guests_across_two_nodes(variant: &str, datapaths: [Datapath; 2]) -> Result<()> {
    let started = Instant::now();
    let guest = Guest::serve()?;
    let tag = format!("rg{}{variant}", std::process::id() % 100_000);
    let names = [format!("{tag}-1"), format!("{tag}-2")];
    let mut rig = Rig {
        switches: Vec::new(),
        probe: None,
        nets: Vec::new(),
        nodes: Vec::new(),
    };
    for n in &names {
        rig.nodes.push(Node::start(n)?);
    }
    let cloud = Cloud::up_with(&["--nodes", &names.join(",")])?;
    cloud.projects(&[P1, P2])?;
    for node in &rig.nodes {
        rig.nets.push(node.named_netns()?);
    }
    underlay(&names[0], &names[1])?;
    if datapaths.contains(&Datapath::Ovs) {
        for (n, d) in names.iter().zip(datapaths) {
            if d == Datapath::Kernel {
                checksum_underlay(n)?;
            }
        }
    }
    for (i, node) in rig.nodes.iter_mut().enumerate() {
        let mut extra = vec!["--zone", &names[i], "--datapath", datapaths[i].name()];
        if datapaths[i] == Datapath::Ovs {
            rig.switches
                .push(Switch::of_state(&node.dir.path().join("state")));
            // Put on the switch's underlay bridge, which the userspace datapath sends VXLAN
            // from.
            extra.extend(["--tunnel-interface", "underlay"]);
        }
        // The network role's resync at its default, as a node runs it.
        node.start_compute_network_agent_resyncing(&cloud, UNDERLAY[i], 2, &extra)?;
    }

    // The guest with a shell on its console; both projects' networks and groups.
    let flavors = repo_root().join("examples/flavors.yaml");
    cloud.kubectl_ok(&["apply", "-f", flavors.to_str().unwrap_or_default()])?;
    // no_timer_check: a TCG guest starved of the CPU can miss the kernel's check of its
    // timer interrupt and panic ("IO-APIC + timer doesn't work").
    let images = guest.images_yaml(P1)?.replace(
        "console=ttyS0 quiet",
        "console=ttyS0 quiet no_timer_check stratus.shell",
    );
    cloud.kubectl_in(&["apply", "-f", "-"], &images)?;
    for p in [P1, P2] {
        cloud.default_group_made(p)?;
        cloud.kubectl_in(&["-n", p, "apply", "-f", "-"], &project_yaml())?;
    }
    cloud.kubectl_in(
        &["-n", P1, "apply", "-f", "-"],
        &[
            server_yaml("a", &names[0], None),
            server_yaml("b", &names[1], None),
            "apiVersion: network.stratus.dev/v1\nkind: Port\nmetadata: {name: probe}\nspec: {network: net}\n".into(),
        ]
        .join("---\n"),
    )?;
    // c holds b's address, in the other project: b's Port is made as b is, with its address.
    let b_ip = wait_until(BOOT, "b's address", || {
        get(&cloud, P1, "server", "b")?["status"]["addresses"][0]["ip"]
            .as_str()
            .map(str::to_owned)
    })?;
    cloud.kubectl_in(
        &["-n", P2, "apply", "-f", "-"],
        &server_yaml("c", &names[1], Some(&b_ip)),
    )?;

    // The probe on node 1, with a counter of the frames from each guest's MAC.
    let probe = format!("{tag}-probe");
    rig.probe = Some(Namespaces::add(&[&probe], &[])?);
    let probe_ip = plug_cloud_port(&cloud, P1, "probe", &names[0], "rgprobe", &probe)?;
    let (ok, out) = netns_exec(
        &probe,
        &[
            "ip",
            "addr",
            "add",
            &format!("{probe_ip}/24"),
            "dev",
            "eth0",
        ],
    );
    ensure!(ok, "{out}");

    let a = running(&cloud, &rig, P1, "a", 0)?;
    let b = running(&cloud, &rig, P1, "b", 1)?;
    let c = running(&cloud, &rig, P2, "c", 1)?;
    assert_eq!(c.ip, b.ip, "c holds b's address");
    let count = format!(
        "table netdev rgcount {{\n chain in {{\n  type filter hook ingress device eth0 priority 0;\n  ether saddr {} counter comment \"{}\"\n  ether saddr {} counter comment \"{}\"\n }}\n}}\n",
        a.mac, a.mac, c.mac, c.mac
    );
    let rules = rig.nodes[0].dir.path().join("rgcount.nft");
    std::fs::write(&rules, count)?;
    let (ok, out) = netns_exec(&probe, &["nft", "-f", &rules.to_string_lossy()]);
    ensure!(ok, "nft -f: {out}");

    // Each guest's lease is its Port's address.
    for vm in [&a, &b, &c] {
        let node = &rig.nodes[vm.node];
        let line = format!("STRATUS-GUEST-DHCP eth0 {}\n", vm.ip);
        wait_until(BOOT, &format!("{}'s lease", vm.name), || {
            // The whole line: a console read while the guest writes it ends mid-line.
            let console = node.console(&vm.uid);
            let line_done = console
                .split_once("STRATUS-GUEST-DHCP ")
                .is_some_and(|(_, rest)| rest.contains('\n'));
            line_done.then_some(console)
        })
        .with_context(|| format!("console:\n{}\n{}", node.console(&vm.uid), rig.logs()))
        .and_then(|console| {
            ensure!(console.contains(&line), "{}: {console}", vm.name);
            Ok(())
        })?;
    }
    let booted = started.elapsed();

    // a and b ping each other across VXLAN, from their shells.
    for (from, to) in [(&a, &b), (&b, &a)] {
        let marker = format!("RG-{}-TO-{}", from.name, to.name);
        rig.nodes[from.node]
            .type_until(
                &from.uid,
                &from.domain(),
                &format!(
                    "ping -c 3 -W 2 {} >/dev/null && echo {marker}-$((40+2))",
                    to.ip
                ),
                &format!("{marker}-42"),
                5,
            )
            .with_context(|| rig.logs())?;
    }

    // a reaches the probe: the counter of a's MAC counts.
    rig.nodes[0].type_until(
        &a.uid,
        &a.domain(),
        &format!("ping -c 3 -W 2 {probe_ip} >/dev/null && echo RG-a-TO-probe-$((40+2))"),
        "RG-a-TO-probe-42",
        5,
    )?;
    ensure!(
        frames_from(&probe, &a.mac)? > 0,
        "the probe counted none of a's frames"
    );

    // c, with b's address in the other project, reaches its own DHCP server, but neither a
    // nor the probe: no frame of c's reaches the probe.
    let c_dhcp = get(&cloud, P2, "subnet", "sn")
        .and_then(|s| s["status"]["dhcpIP"].as_str().map(str::to_owned))
        .context("rg-two's DHCP address")?;
    ensure!(
        c_dhcp != probe_ip && c_dhcp != a.ip,
        "rg-two's DHCP server holds an address the test pings as rg-one's: {c_dhcp}"
    );
    let c_node = &rig.nodes[c.node];
    c_node.type_until(
        &c.uid,
        &c.domain(),
        &format!("ping -c 3 -W 2 {c_dhcp} >/dev/null && echo RG-c-OWN-$((40+2))"),
        "RG-c-OWN-42",
        5,
    )?;
    c_node.type_until(
        &c.uid,
        &c.domain(),
        &format!(
            "ping -c 5 -W 1 {probe_ip} >/dev/null || ping -c 5 -W 1 {} >/dev/null || echo RG-c-APART-$((40+2))",
            a.ip
        ),
        "RG-c-APART-42",
        2,
    )?;
    assert_eq!(frames_from(&probe, &c.mac)?, 0, "a frame of c's crossed");

    // The probe pings b without pause, one ICMP id throughout (one connection, as a user's
    // ping): the ICMP rule removed stops it within a second of the write (the connection the
    // rule allowed is forgotten), added back lets it through within a second. Timed from
    // just before the write's request to the arrival of the (last, first) reply.
    let writer = GroupWriter::new(&cloud)?;
    let t0 = Instant::now();
    let pings = ContinuousPing::start(&probe, &b.ip, BOOT + Duration::from_secs(60))?;
    let waited = wait_until(BOOT, "the probe's pings to b", || {
        pings.replies_after(t0).first().copied()
    });
    let removed = Instant::now();
    let result = waited.and_then(|_| writer.write(false));
    std::thread::sleep(AT_ONCE + Duration::from_secs(3));
    let added = Instant::now();
    let result = result.and_then(|()| writer.write(true)).and_then(|()| {
        wait_until(
            Duration::from_secs(30),
            "the probe's pings to b again",
            || pings.replies_after(added).first().copied(),
        )
    });
    // The last reply that arrived after the removal's write.
    let stopped = pings
        .replies_after(removed)
        .into_iter()
        .filter(|t| *t < added)
        .map(|t| t.duration_since(removed))
        .max();
    drop(pings);
    let first = result.with_context(|| rig.logs())?;
    let resumed = first.duration_since(added);
    eprintln!(
        "{variant}: guests booted with leases in {booted:?}; ICMP rule removed: last echo answered {stopped:?} after the write; added: first answered {resumed:?} after"
    );
    ensure!(
        stopped.is_none_or(|s| s <= AT_ONCE),
        "an echo was answered {stopped:?} after the rule's removal was written\n{}",
        rig.logs()
    );
    ensure!(
        resumed <= AT_ONCE,
        "the first echo answered once the rule was written back ended {resumed:?} after\n{}",
        rig.logs()
    );
    eprintln!("{variant}: whole test {:?}", started.elapsed());
    drop(rig);
    Ok(())
}

#[test]
fn kernel_and_kernel() -> Result<()> {
    guests_across_two_nodes("kk", [Datapath::Kernel, Datapath::Kernel])
}

#[test]
fn ovs_and_ovs() -> Result<()> {
    guests_across_two_nodes("oo", [Datapath::Ovs, Datapath::Ovs])
}

#[test]
fn kernel_and_ovs() -> Result<()> {
    guests_across_two_nodes("ko", [Datapath::Kernel, Datapath::Ovs])
}
