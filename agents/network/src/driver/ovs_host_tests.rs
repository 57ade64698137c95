//! The Open vSwitch driver on a real switch, as root: `ovsdb-server` and `ovs-vswitchd` run
//! per simulated node inside its network namespace (userspace datapath), each with its files
//! in a directory the test makes. The [`Links`] conformance suite; then the agent's converge
//! on two OVS nodes joined by a veth underlay (192.0.2.0/24) carrying VXLAN between their
//! integration bridges: guests (namespaces plugged in by veths named as their Ports'
//! devices) take their leases from their node's dnsmasq and ping across the tunnel, another
//! project's network with the same CIDR stays apart, flows deleted and a tunnel port
//! removed by hand are repaired by the next converge, a restarted agent (its start and its
//! first converge) changes nothing on a right switch, security groups are enforced statefully (OVS conntrack) and spoofed sources
//! dropped, DHCP client packets included (a release from another guest's address never
//! reaches the DHCP server). Provider networks on a veth standing in for the nodes' physical
//! interface: vlan between two OVS nodes (tagged on the wire), flat between a kernel node
//! and an OVS node. A security-group rule removed ends the continuous ping it allowed on
//! either datapath, and only it. Everything the tests make is removed when they end, even
//! when they fail.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::sync::Arc;

use serde_json::json;
use stratus_api_types::network::Segmentation;

use super::conformance;
use super::dnsmasq::Dnsmasq;
use super::host_tests::{lease, ping, pings, root, run_in, unique};
use super::netlink::NetlinkLinks;
use super::nft::NftFirewall;
use super::ovs::{INTEGRATION_BRIDGE, OvsLinks, attach_underlay};
use super::ovs_daemon::{Ovs, OvsDaemon, OvsError};
use super::ovs_firewall::OvsFirewall;
use super::ovs_flows::{self, KIND_NETWORK, KIND_PORT};
use super::{Dhcp, Firewall, IfName, Links, Name, Netns, VethSpec};
use crate::agent::tests::{group, hypervisor, network, port, subnet};
use crate::agent::{Host, PortState, converge};
use crate::desired::{NodeConfig, PortKey, Snapshot};
use crate::host_tests::{
    count_from, count_pings_from, counted_from, guest, ifname, in_project, name, of_network,
    pings_counted, sh,
};
use crate::plan::is_dhcp_name_of;

/// Stops the switches, then each node's DHCP servers and namespaces, then deletes the
/// namespaces the test made, when dropped.
struct Cleanup {
    daemons: Vec<OvsDaemon>,
    dhcp: Vec<(Dnsmasq, String)>,
    namespaces: Vec<Name>,
    /// The switches' and DHCP servers' files, removed once they are stopped.
    _dir: Option<tempfile::TempDir>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for d in &self.daemons {
            if let Err(e) = d.stop() {
                eprintln!("cleanup: switch: {e}");
            }
        }
        let l = NetlinkLinks::new();
        for (d, node) in &self.dhcp {
            for name in d.list().unwrap_or_default() {
                if let Err(e) = d.remove(&name) {
                    eprintln!("cleanup: dhcp {name}: {e}");
                }
            }
            for ns in l.list_netns().unwrap_or_default() {
                if is_dhcp_name_of(node, &ns)
                    && let Err(e) = l.del_netns(&ns)
                {
                    eprintln!("cleanup: netns {ns}: {e}");
                }
            }
        }
        for n in &self.namespaces {
            if let Err(e) = l.del_netns(n) {
                eprintln!("cleanup: netns {n}: {e}");
            }
        }
    }
}

/// The switch of node namespace `ns` (made by the caller or the suite), its files in a
/// directory of its own; the guard stops it, deletes `ns` and the namespaces `also`, then
/// removes the directory.
fn lone_switch(ns: &Name, also: &[Name]) -> (OvsDaemon, Cleanup) {
    let dir = tempfile::tempdir().expect("dir");
    let daemon = OvsDaemon::new(Netns::Named(ns.clone()), dir.path().join("ovs"));
    let cleanup = Cleanup {
        daemons: vec![daemon.clone()],
        dhcp: vec![],
        namespaces: [ns.clone()]
            .into_iter()
            .chain(also.iter().cloned())
            .collect(),
        _dir: Some(dir),
    };
    (daemon, cleanup)
}

#[test]
fn ovs_links_pass_the_conformance_suite() {
    if !root() {
        return;
    }
    let prefix = unique();
    let a = name(format!("{prefix}-a"));
    let (daemon, _cleanup) = lone_switch(&a, &[name(format!("{prefix}-b"))]);
    let l = OvsLinks::with_daemon(Netns::Named(a), daemon.clone());
    conformance::links(&l, &prefix);
    assert!(
        !daemon.running(),
        "the node's switch stops with its namespace"
    );
}

/// Commands on the switch's control socket answer as `ovs-appctl` prints them, a failed
/// one says why as `ovs-appctl` does (the "no such connection" that forgetting a connection
/// already gone relies on), and a socket nobody serves is an error, not a hang.
#[test]
fn the_switchs_control_socket_answers_as_ovs_appctl_does() {
    if !root() {
        return;
    }
    let a = name(format!("{}-a", unique()));
    let (daemon, _cleanup) = lone_switch(&a, &[]);
    NetlinkLinks::new().add_netns(&a).expect("netns");
    // The switch started with its bridge (so that the userspace datapath, whose connections
    // dpctl reads, exists), as the agent's first read of it does.
    let links = OvsLinks::with_daemon(Netns::Named(a.clone()), daemon.clone());
    assert_eq!(links.firewall().expect("switch"), None);
    let ctl = daemon.ovs().rundir().join("ovs-vswitchd.ctl");
    let appctl = |args: &[&str]| {
        let out = std::process::Command::new("ovs-appctl")
            .arg("-t")
            .arg(&ctl)
            .args(args)
            .output()
            .expect("ovs-appctl");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    for args in [
        &["version"][..],
        &["dpctl/dump-conntrack", "zone=7"],
        &["dpctl/dump-flows"],
    ] {
        let (ok, printed, _) = appctl(args);
        assert!(ok, "ovs-appctl {args:?}");
        assert_eq!(
            daemon.ovs().appctl(args).expect("answer"),
            printed,
            "{args:?}"
        );
    }
    let gone = [
        "dpctl/flush-conntrack",
        "zone=7",
        "ct_nw_src=10.9.9.9,ct_nw_dst=10.9.9.8,ct_nw_proto=1,icmp_id=7,icmp_type=8,icmp_code=0",
    ];
    let (ok, _, said) = appctl(&gone);
    assert!(
        !ok && said.contains("(No such file or directory)"),
        "{said}"
    );
    match daemon.ovs().appctl(&gone) {
        Err(OvsError::Command { stderr, .. }) => {
            assert!(
                said.contains(&stderr),
                "{stderr:?} is not what ovs-appctl said: {said}"
            );
            assert!(stderr.contains("(No such file or directory)"), "{stderr}");
        }
        other => panic!("flushing a connection that is not there: {other:?}"),
    }
    match daemon.ovs().appctl(&["no-such-command"]) {
        Err(OvsError::Command { stderr, .. }) => {
            assert!(stderr.contains("is not a valid command"), "{stderr}");
        }
        other => panic!("an unknown command: {other:?}"),
    }
    // The database on its socket: what `ovs-vsctl` lists, and a refused transaction is an
    // error that says why.
    let rows = daemon
        .ovs()
        .transact(vec![
            json!({"op": "select", "table": "Bridge", "where": [], "columns": ["name"]}),
        ])
        .expect("select");
    assert_eq!(rows[0]["rows"], json!([{"name": INTEGRATION_BRIDGE}]));
    match daemon.ovs().transact(vec![
        json!({"op": "select", "table": "NoSuchTable", "where": []}),
    ]) {
        Err(OvsError::Command { stderr, .. }) => {
            assert!(stderr.contains("NoSuchTable"), "{stderr}")
        }
        other => panic!("a select of a table that is not there: {other:?}"),
    }
    // A socket file left by a daemon that is gone.
    let stale = daemon.ovs().rundir().join("stale.ctl");
    drop(std::os::unix::net::UnixListener::bind(&stale).expect("bind"));
    assert!(matches!(
        super::ovs_daemon::unixctl(&stale, "version", &[]),
        Err(OvsError::Io { .. })
    ));
}

/// The flows of the switch, cookies and all, without counters.
fn flows(ovs: &Ovs) -> String {
    ovs.ofctl(&["--no-stats"], "dump-flows", INTEGRATION_BRIDGE, &[], None)
        .expect("dump-flows")
}

/// What a write to the switch's database would change: its interfaces (a port re-created
/// is a new row, maybe on a new OpenFlow port) and its reconfiguration count (`next_cfg`,
/// raised by every change `ovs-vswitchd` is made to apply).
fn database(ovs: &Ovs) -> (BTreeSet<String>, String) {
    let ifaces = ovs
        .vsctl_no_wait(&[
            "--format=csv",
            "--no-headings",
            "--columns=_uuid,name,ofport",
            "list",
            "Interface",
        ])
        .expect("list Interface");
    let next_cfg = ovs
        .vsctl_no_wait(&["get", "Open_vSwitch", ".", "next_cfg"])
        .expect("next_cfg");
    (
        ifaces.lines().map(str::to_owned).collect(),
        next_cfg.trim().to_owned(),
    )
}

/// How many objects of `kind` have flows on the switch.
fn objects(ovs: &Ovs, kind: u8) -> usize {
    ovs_flows::installed(&flows(ovs))
        .keys()
        .filter(|c| (*c >> 56) as u8 == kind)
        .count()
}

/// The integration bridge's tunnel ports.
fn tunnels(ovs: &Ovs) -> BTreeSet<String> {
    ovs.vsctl(&["list-ports", INTEGRATION_BRIDGE])
        .expect("list-ports")
        .lines()
        .filter(|p| p.starts_with("vt-"))
        .map(str::to_owned)
        .collect()
}

/// What carries a simulated node's networks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Datapath {
    Kernel,
    Ovs,
}

/// Two nodes and four guests, each guest a namespace plugged into its node by a veth named
/// as its Port's device (guests 1 and 3 on node 1), the nodes joined by a veth underlay
/// (192.0.2.1 and .2); the API's objects of one network (10.50.0.0/24, VNI 5001) with a port
/// of guest 1 (10.50.0.11) and one of guest 2 (10.50.0.12) in project `demo`.
struct Rig {
    l: NetlinkLinks,
    nodes: [Name; 2],
    guests: [Name; 4],
    switches: [Option<OvsDaemon>; 2],
    hosts: [Host; 2],
    configs: [NodeConfig; 2],
    snap: Snapshot,
    macs: [String; 2],
    _cleanup: Cleanup,
}

/// The drivers of a node: Open vSwitch with `switch`, else the kernel's.
fn host(ns: &Netns, switch: Option<&OvsDaemon>, dns: &Dnsmasq) -> Host {
    let nft = NftFirewall::new(ns.clone());
    let (links, firewall): (Arc<dyn Links>, Arc<dyn Firewall>) = match switch {
        Some(d) => {
            let links =
                Arc::new(OvsLinks::with_daemon(ns.clone(), d.clone()).with_physical([phys()]));
            (
                Arc::clone(&links) as Arc<dyn Links>,
                Arc::new(OvsFirewall::new(nft, links)),
            )
        }
        None => (Arc::new(NetlinkLinks::new()), Arc::new(nft)),
    };
    Host {
        links,
        firewall,
        dhcp: Arc::new(dns.clone()),
    }
}

/// The nodes' physical interface, of physical network `physnet1` (on [`on_the_wire`]).
fn phys() -> IfName {
    ifname("phys")
}

/// Joins the rig's two nodes by a veth `phys` standing in for their physical interface,
/// maps `physnet1` to it on both, and makes the network a provider network of
/// `segmentation` on it (with VLAN ID `vlan`).
fn on_the_wire(rig: &mut Rig, segmentation: Segmentation, vlan: Option<u16>) {
    let [ns1, ns2] = rig.nodes.clone().map(Netns::Named);
    rig.l
        .add_veth(
            &ns1,
            &VethSpec {
                name: phys(),
                peer: phys(),
                peer_netns: Some(ns2),
            },
        )
        .expect("physical link");
    for c in &mut rig.configs {
        c.physical = [("physnet1".to_owned(), phys())].into();
    }
    let mut n = (*rig.snap.networks[0]).clone();
    n.spec.segmentation = segmentation;
    n.spec.physical_network = Some("physnet1".into());
    n.status
        .get_or_insert_with(Default::default)
        .segmentation_id = vlan;
    rig.snap.networks = vec![Arc::new(n)];
}

fn rig(kinds: [Datapath; 2]) -> Rig {
    let prefix = unique();
    let l = NetlinkLinks::new();
    let (n1, n2) = (name(format!("{prefix}-n1")), name(format!("{prefix}-n2")));
    let (g1, g2) = (name(format!("{prefix}-g1")), name(format!("{prefix}-g2")));
    let (g3, g4) = (name(format!("{prefix}-g3")), name(format!("{prefix}-g4")));
    let dir = tempfile::tempdir().expect("dir");
    let (ns1, ns2) = (Netns::Named(n1.clone()), Netns::Named(n2.clone()));
    let switch = |ns: &Netns, kind: Datapath, d: &str| {
        (kind == Datapath::Ovs).then(|| OvsDaemon::new(ns.clone(), dir.path().join(d)))
    };
    let (d1, d2) = (
        switch(&ns1, kinds[0], "ovs1"),
        switch(&ns2, kinds[1], "ovs2"),
    );
    let (dns1, dns2) = (
        Dnsmasq::new(dir.path().join("dhcp1")),
        Dnsmasq::new(dir.path().join("dhcp2")),
    );
    let mut cleanup = Cleanup {
        daemons: d1.iter().chain(&d2).cloned().collect(),
        dhcp: vec![
            (dns1.clone(), n1.to_string()),
            (dns2.clone(), n2.to_string()),
        ],
        namespaces: vec![
            n1.clone(),
            n2.clone(),
            g1.clone(),
            g2.clone(),
            g3.clone(),
            g4.clone(),
        ],
        _dir: None,
    };
    for n in [&n1, &n2] {
        l.add_netns(n).expect("node netns");
    }
    let underlay = ifname("underlay");
    l.add_veth(
        &ns1,
        &VethSpec {
            name: underlay.clone(),
            peer: underlay.clone(),
            peer_netns: Some(ns2.clone()),
        },
    )
    .expect("underlay");
    for (ns, d, a) in [(&ns1, &d1, "192.0.2.1/24"), (&ns2, &d2, "192.0.2.2/24")] {
        l.add_address(ns, &underlay, a.parse().expect("cidr"))
            .expect("address");
        match d {
            Some(d) => {
                d.start().expect("start the node's switch");
                let got = attach_underlay(&d.ovs(), ns, &underlay).expect("underlay bridge");
                assert_eq!(got.to_string(), a);
                attach_underlay(&d.ovs(), ns, &underlay).expect("again: nothing to do");
            }
            // A NIC fills in the UDP checksums the kernel leaves to it; a veth hands them
            // on unfilled, and OVS's userspace datapath drops such VXLAN packets.
            None => {
                l.set_up(ns, &underlay, true).expect("up");
                let Netns::Named(n) = ns else {
                    unreachable!("a node's namespace")
                };
                sh(n, &["ethtool", "-K", "underlay", "tx", "off"]);
            }
        }
    }
    let (dev1, dev2) = (ifname("tp-guest1"), ifname("tp-guest2"));
    let mac1 = guest(&l, &ns1, &g1, &dev1);
    let mac2 = guest(&l, &ns2, &g2, &dev2);

    let net_uid = format!("{prefix}-net");
    let snap = Snapshot {
        ports: vec![
            of_network(
                port(
                    "p1",
                    "net",
                    n1.as_str(),
                    &mac1,
                    "10.50.0.11",
                    Some("tp-guest1"),
                ),
                &net_uid,
            ),
            of_network(
                port(
                    "p2",
                    "net",
                    n2.as_str(),
                    &mac2,
                    "10.50.0.12",
                    Some("tp-guest2"),
                ),
                &net_uid,
            ),
        ],
        networks: vec![network("net", &net_uid, Some(5001))],
        subnets: vec![of_network(subnet("sn", "net", "10.50.0.0/24"), &net_uid)],
        hypervisors: vec![
            hypervisor(n1.as_str(), "192.0.2.1"),
            hypervisor(n2.as_str(), "192.0.2.2"),
        ],
        groups: vec![group(
            "default",
            json!([
                {"direction": "ingress", "protocol": "icmp", "remoteGroup": "default"},
                {"direction": "egress"},
            ]),
        )],
        ..Snapshot::default()
    };
    let (h1, h2) = (
        host(&ns1, d1.as_ref(), &dns1),
        host(&ns2, d2.as_ref(), &dns2),
    );
    let cfg = |n: &Name| NodeConfig {
        node: n.to_string(),
        netns: Netns::Named(n.clone()),
        underlay: None,
        physical: Default::default(),
    };
    let (c1, c2) = (cfg(&n1), cfg(&n2));
    cleanup._dir = Some(dir);
    Rig {
        l,
        nodes: [n1, n2],
        guests: [g1, g2, g3, g4],
        switches: [d1, d2],
        hosts: [h1, h2],
        configs: [c1, c2],
        snap,
        macs: [mac1, mac2],
        _cleanup: cleanup,
    }
}

#[test]
fn two_ovs_nodes_carry_a_network_over_vxlan_keep_networks_apart_and_repair_drift() {
    if !root() {
        return;
    }
    let Rig {
        l,
        nodes: [n1, n2],
        guests: [g1, g2, g3, g4],
        switches: [d1, d2],
        hosts: [h1, h2],
        configs: [c1, c2],
        mut snap,
        macs: [_, mac2],
        _cleanup,
    } = rig([Datapath::Ovs, Datapath::Ovs]);
    let (d1, d2) = (d1.expect("switch"), d2.expect("switch"));
    let (ns1, ns2) = (Netns::Named(n1.clone()), Netns::Named(n2.clone()));
    let dns = |n: usize| _cleanup.dhcp[n].0.clone();
    let (dns1, dns2) = (dns(0), dns(1));
    let key = |n: &str| PortKey {
        namespace: "demo".into(),
        name: n.into(),
    };
    for (h, c, p) in [(&h1, &c1, "p1"), (&h2, &c2, "p2")] {
        let r = converge(h, c, &snap).expect("converge");
        assert!(r.failures.is_empty(), "{:?}", r.failures);
        assert!(
            matches!(r.ports.get(&key(p)), Some(PortState::Wired { .. })),
            "{p}: {:?}",
            r.ports
        );
    }
    // One tunnel port on each node, to the other; each port on the integration bridge.
    for d in [&d1, &d2] {
        assert_eq!(tunnels(&d.ovs()).len(), 1);
        // The guest's port and the DHCP server's.
        assert_eq!(objects(&d.ovs(), KIND_PORT), 2);
        assert_eq!(objects(&d.ovs(), KIND_NETWORK), 1);
    }
    let leases = tempfile::tempdir().expect("dir");
    assert_eq!(
        lease(&g1, leases.path()),
        Some(Ipv4Addr::new(10, 50, 0, 11))
    );
    assert_eq!(
        lease(&g2, leases.path()),
        Some(Ipv4Addr::new(10, 50, 0, 12))
    );
    sh(&g1, &["ip", "addr", "add", "10.50.0.11/24", "dev", "eth0"]);
    sh(&g2, &["ip", "addr", "add", "10.50.0.12/24", "dev", "eth0"]);
    let (ip1, ip2) = (Ipv4Addr::new(10, 50, 0, 11), Ipv4Addr::new(10, 50, 0, 12));
    assert!(pings(&g1, ip2, 10), "guest 1 reaches guest 2 across VXLAN");
    assert!(ping(&g2, ip1), "and back");

    // A restarted agent finds everything right and changes nothing: its start (the switch
    // it left running adopted, its tunnel interface put on the underlay bridge again) and
    // its first converge with new drivers leave every flow, every interface and the
    // switch's reconfiguration count as they were.
    let state = || [&d1, &d2].map(|d| (flows(&d.ovs()), database(&d.ovs())));
    let before = state();
    for (ns, d, dns, c) in [(&ns1, &d1, &dns1, &c1), (&ns2, &d2, &dns2, &c2)] {
        d.start().expect("adopt the switch");
        attach_underlay(&d.ovs(), ns, &ifname("underlay")).expect("underlay bridge");
        let r = converge(&host(ns, Some(d), dns), c, &snap).expect("converge");
        assert_eq!(r.steps, vec![]);
    }
    assert_eq!(state(), before);

    // Drift by hand: node 1 loses its delivery flows, node 2 its tunnel port.
    d1.ovs()
        .ofctl(&[], "del-flows", INTEGRATION_BRIDGE, &["table=30"], None)
        .expect("del-flows");
    let tunnel = tunnels(&d2.ovs()).into_iter().next().expect("tunnel");
    d2.ovs()
        .vsctl(&["del-port", INTEGRATION_BRIDGE, &tunnel])
        .expect("del-port");
    assert!(!ping(&g1, ip2), "the overlay is broken");
    for (h, c) in [(&h1, &c1), (&h2, &c2)] {
        let r = converge(h, c, &snap).expect("converge");
        assert!(!r.steps.is_empty(), "drift seen");
        assert!(r.failures.is_empty(), "{:?}", r.failures);
    }
    assert_eq!(tunnels(&d2.ovs()), BTreeSet::from([tunnel]));
    assert!(
        pings(&g1, ip2, 10),
        "repaired: guest 1 reaches guest 2 again"
    );
    for (h, c) in [(&h1, &c1), (&h2, &c2)] {
        assert_eq!(converge(h, c, &snap).expect("converge").steps, vec![]);
    }

    // A switch restarted (its flows gone, its database kept) is rewired by the next converge.
    d1.stop().expect("stop switch 1");
    let r = converge(&h1, &c1, &snap).expect("converge");
    assert!(r.failures.is_empty(), "{:?}", r.failures);
    assert!(d1.running());
    assert!(pings(&g1, ip2, 10), "node 1 forwards again");

    // Another project's network with the same CIDR and VNI-less overlap on the same nodes,
    // its guests holding each other's addresses crosswise: guest 3 (node 1, 10.50.0.12)
    // looking for 10.50.0.11 finds guest 4 across the tunnel, never guest 1 beside it.
    let (dev3, dev4) = (ifname("tp-guest3"), ifname("tp-guest4"));
    let mac3 = guest(&l, &ns1, &g3, &dev3);
    let mac4 = guest(&l, &ns2, &g4, &dev4);
    let net_b = format!("{n1}-net-b");
    snap.networks
        .push(in_project(network("net", &net_b, Some(5002)), "other"));
    snap.subnets.push(in_project(
        of_network(subnet("sn", "net", "10.50.0.0/24"), &net_b),
        "other",
    ));
    snap.groups.push(in_project(
        group(
            "default",
            json!([{"direction": "ingress", "protocol": "icmp"}, {"direction": "egress"}]),
        ),
        "other",
    ));
    for (p, node, mac, ip, dev) in [
        ("q3", &n1, &mac3, "10.50.0.12", "tp-guest3"),
        ("q4", &n2, &mac4, "10.50.0.11", "tp-guest4"),
    ] {
        snap.ports.push(in_project(
            of_network(port(p, "net", node.as_str(), mac, ip, Some(dev)), &net_b),
            "other",
        ));
    }
    for (h, c) in [(&h1, &c1), (&h2, &c2)] {
        let r = converge(h, c, &snap).expect("converge");
        assert!(r.failures.is_empty(), "{:?}", r.failures);
        assert_eq!(r.desired.networks.len(), 2);
    }
    for d in [&d1, &d2] {
        assert_eq!(tunnels(&d.ovs()).len(), 1, "one tunnel per peer, shared");
    }
    assert_eq!(
        lease(&g3, leases.path()),
        Some(ip2),
        "its own network's DHCP"
    );
    sh(&g3, &["ip", "addr", "add", "10.50.0.12/24", "dev", "eth0"]);
    sh(&g4, &["ip", "addr", "add", "10.50.0.11/24", "dev", "eth0"]);
    assert!(
        pings(&g3, ip1, 10),
        "guest 3 reaches its own network's 10.50.0.11"
    );
    let neighbour =
        |ns: &Name, addr: &str| run_in(ns, &["ip", "neigh", "show", addr]).1.to_lowercase();
    assert!(
        neighbour(&g3, "10.50.0.11").contains(&mac4),
        "guest 4 answered"
    );
    // Anti-spoofing: guest 4 sending from an address not its own reaches no one (guest 3
    // takes ICMP from anyone and counts what arrives, so only the source check keeps it
    // out).
    let spoof = Ipv4Addr::new(10, 50, 0, 99);
    count_pings_from(&g3, &[spoof, ip1]);
    sh(&g4, &["ip", "addr", "add", "10.50.0.99/24", "dev", "eth0"]);
    let spoofed = run_in(
        &g4,
        &[
            "busybox",
            "ping",
            "-c",
            "2",
            "-W",
            "1",
            "-I",
            "10.50.0.99",
            &ip2.to_string(),
        ],
    );
    assert!(!spoofed.0, "a spoofed source was answered: {}", spoofed.1);
    assert_eq!(
        pings_counted(&g3, spoof),
        0,
        "nothing from the spoofed source arrived"
    );
    assert!(pings(&g4, ip2, 5), "its own address still works");
    assert!(pings_counted(&g3, ip1) > 0, "and is counted");
    assert!(ping(&g1, ip2), "project 1 still works");
    assert!(
        neighbour(&g1, "10.50.0.12").contains(&mac2),
        "guest 2 answered"
    );

    // Security groups: without the ICMP rule, guest 2 is not reached; it still pings out.
    snap.groups[0] = group("default", json!([{"direction": "egress"}]));
    for (h, c) in [(&h1, &c1), (&h2, &c2)] {
        let r = converge(h, c, &snap).expect("converge");
        assert!(r.failures.is_empty(), "{:?}", r.failures);
    }
    assert!(!ping(&g1, ip2), "ICMP in dropped");
    // The DHCP server's namespace is no port: it answers, and the answer is let in as
    // part of a connection guest 2 opened.
    let server = Ipv4Addr::new(10, 50, 0, 254);
    assert!(pings(&g2, server, 5), "guest 2 still pings out");

    // The ports go: no network, port or tunnel of Stratus's is left on either switch.
    snap.ports.clear();
    for (h, c, d) in [(&h1, &c1, &d1), (&h2, &c2, &d2)] {
        let r = converge(h, c, &snap).expect("converge");
        assert!(r.failures.is_empty(), "{:?}", r.failures);
        let ovs = d.ovs();
        assert_eq!(
            (objects(&ovs, KIND_NETWORK), objects(&ovs, KIND_PORT)),
            (0, 0)
        );
        assert_eq!(tunnels(&ovs), BTreeSet::new());
        let ports = ovs
            .vsctl(&["list-ports", INTEGRATION_BRIDGE])
            .expect("list-ports");
        assert_eq!(ports.trim(), "", "nothing on the integration bridge");
        assert_eq!(converge(h, c, &snap).expect("converge").steps, vec![]);
    }
}

#[test]
fn a_network_spans_a_kernel_node_and_an_ovs_node() {
    if !root() {
        return;
    }
    let Rig {
        l: _,
        nodes: [n1, n2],
        guests: [g1, g2, ..],
        switches: [_, d2],
        hosts: [h1, h2],
        configs: [c1, c2],
        snap,
        macs: _,
        _cleanup,
    } = rig([Datapath::Kernel, Datapath::Ovs]);
    for (h, c) in [(&h1, &c1), (&h2, &c2)] {
        let r = converge(h, c, &snap).expect("converge");
        assert!(r.failures.is_empty(), "{:?}", r.failures);
    }
    let d2 = d2.expect("switch");
    assert_eq!(
        tunnels(&d2.ovs()).len(),
        1,
        "the OVS node tunnels to the kernel node"
    );
    let (ip1, ip2) = leases(&g1, &g2);
    assert!(
        pings(&g1, ip2, 10),
        "the kernel node's guest reaches the OVS node's ({n1} to {n2})"
    );
    assert!(ping(&g2, ip1), "and back");
    for (h, c) in [(&h1, &c1), (&h2, &c2)] {
        assert_eq!(converge(h, c, &snap).expect("converge").steps, vec![]);
    }
}

/// Guest 1 (on the kernel node) and guest 2 (on the OVS node) take their leases from their
/// own nodes' DHCP servers and their addresses; those addresses.
fn leases(g1: &Name, g2: &Name) -> (Ipv4Addr, Ipv4Addr) {
    let dir = tempfile::tempdir().expect("dir");
    let (ip1, ip2) = (Ipv4Addr::new(10, 50, 0, 11), Ipv4Addr::new(10, 50, 0, 12));
    assert_eq!(lease(g1, dir.path()), Some(ip1), "the kernel node's DHCP");
    assert_eq!(lease(g2, dir.path()), Some(ip2), "the OVS node's DHCP");
    sh(g1, &["ip", "addr", "add", "10.50.0.11/24", "dev", "eth0"]);
    sh(g2, &["ip", "addr", "add", "10.50.0.12/24", "dev", "eth0"]);
    (ip1, ip2)
}

/// Installs in `ns` a counter (before routing) of UDP to port 67 from each of `sources`,
/// and returns a reader of the count from one of them.
fn count_dhcp_from(ns: &Name, sources: &[Ipv4Addr]) -> impl Fn(Ipv4Addr) -> u64 + use<> {
    count_from(
        ns,
        ("dhcpprobe", "pre", "prerouting priority -300"),
        sources,
        &["udp", "dport", "67"],
    );
    let ns = ns.clone();
    move |source| counted_from(&ns, "dhcpprobe", "pre", source)
}

/// Sends from `ns` one UDP datagram from `src` port 68 to each of `dsts` port 67, as a
/// DHCP client's release or inform would go.
fn send_dhcp_client(ns: &Name, src: Ipv4Addr, dsts: &[Ipv4Addr]) {
    let script = "import socket, sys\n\
                  s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
                  s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)\n\
                  s.bind((sys.argv[1], 68))\n\
                  for d in sys.argv[2:]:\n    s.sendto(b'release', (d, 67))\n";
    let src = src.to_string();
    let dsts: Vec<String> = dsts.iter().map(Ipv4Addr::to_string).collect();
    let mut args = vec!["python3", "-c", script, &src];
    args.extend(dsts.iter().map(String::as_str));
    let (ok, out) = run_in(ns, &args);
    assert!(ok, "send: {out}");
}

#[test]
fn a_guest_cannot_pass_dhcp_client_packets_from_another_guests_address() {
    if !root() {
        return;
    }
    let Rig {
        l,
        nodes: [n1, n2],
        guests: [g1, g2, ..],
        switches: _,
        hosts: [h1, h2],
        configs: [c1, c2],
        snap,
        macs: _,
        _cleanup,
    } = rig([Datapath::Ovs, Datapath::Ovs]);
    for (h, c) in [(&h1, &c1), (&h2, &c2)] {
        let r = converge(h, c, &snap).expect("converge");
        assert!(r.failures.is_empty(), "{:?}", r.failures);
    }
    let leases = tempfile::tempdir().expect("dir");
    let (ip1, ip2) = (Ipv4Addr::new(10, 50, 0, 11), Ipv4Addr::new(10, 50, 0, 12));
    assert_eq!(lease(&g1, leases.path()), Some(ip1), "DHCP still works");
    assert_eq!(lease(&g2, leases.path()), Some(ip2));
    sh(&g1, &["ip", "addr", "add", "10.50.0.11/24", "dev", "eth0"]);
    let server = Ipv4Addr::new(10, 50, 0, 254);
    assert!(pings(&g1, server, 10), "guest 1 reaches its DHCP server");
    // The server's MAC, pinned, so that no ARP (from either address) decides the outcome.
    let (_, neigh) = run_in(&g1, &["ip", "neigh", "show", "10.50.0.254"]);
    let mac = neigh
        .split_whitespace()
        .skip_while(|w| *w != "lladdr")
        .nth(1)
        .unwrap_or_else(|| panic!("no neighbour entry: {neigh}"))
        .to_owned();
    sh(
        &g1,
        &[
            "ip",
            "neigh",
            "replace",
            "10.50.0.254",
            "lladdr",
            &mac,
            "dev",
            "eth0",
            "nud",
            "permanent",
        ],
    );
    let dhcp_ns = l
        .list_netns()
        .expect("netns")
        .into_iter()
        .find(|ns| is_dhcp_name_of(n1.as_str(), ns))
        .unwrap_or_else(|| panic!("no DHCP namespace of {n1} ({n2})"));
    let counted = count_dhcp_from(&dhcp_ns, &[ip1, ip2]);
    // Guest 1 takes guest 2's address as well and sends a release from it, to the server
    // and broadcast; and one from its own address.
    sh(&g1, &["ip", "addr", "add", "10.50.0.12/32", "dev", "eth0"]);
    let broadcast = Ipv4Addr::BROADCAST;
    for _ in 0..3 {
        send_dhcp_client(&g1, ip2, &[server, broadcast]);
        send_dhcp_client(&g1, ip1, &[server]);
    }
    assert!(counted(ip1) > 0, "a release from its own address arrives");
    assert_eq!(counted(ip2), 0, "nothing from the spoofed address arrived");
}

#[test]
fn ovs_links_pass_the_vlan_conformance_suite() {
    if !root() {
        return;
    }
    let prefix = unique();
    let v = name(format!("{prefix}-v"));
    let (daemon, _cleanup) = lone_switch(&v, &[]);
    conformance::vlans(&OvsLinks::with_daemon(Netns::Named(v), daemon), &prefix);
}

/// A vlan provider network on two OVS nodes joined by a veth standing in for their physical
/// interface (the switch tags and strips, as Neutron's OVS agent does on its physical bridge;
/// no kernel 802.1Q is needed): the guests reach each other, every frame between them
/// crosses the wire tagged with the network's VLAN ID (the strip flow of that tag counts
/// them), a right node gets no step, and with the network gone the physical interface
/// leaves the switch and is left on the node.
#[test]
fn a_vlan_network_spans_two_ovs_nodes_tagged_on_a_physical_link() {
    if !root() {
        return;
    }
    let mut rig = rig([Datapath::Ovs, Datapath::Ovs]);
    on_the_wire(&mut rig, Segmentation::Vlan, Some(100));
    let Rig {
        l,
        nodes: [n1, n2],
        guests: [g1, g2, ..],
        switches: [d1, d2],
        hosts: [h1, h2],
        configs: [c1, c2],
        snap,
        macs: _,
        _cleanup,
    } = rig;
    let (ns1, ns2) = (Netns::Named(n1.clone()), Netns::Named(n2.clone()));
    let phys = phys();
    for (h, c) in [(&h1, &c1), (&h2, &c2)] {
        let r = converge(h, c, &snap).expect("converge");
        assert!(r.failures.is_empty(), "{:?}", r.failures);
        assert!(
            r.ports
                .values()
                .any(|p| matches!(p, PortState::Wired { .. })),
            "{:?}",
            r.ports
        );
    }
    let (d1, d2) = (d1.expect("switch"), d2.expect("switch"));
    for d in [&d1, &d2] {
        assert!(tunnels(&d.ovs()).is_empty(), "no tunnel for a vlan network");
        let ports = d
            .ovs()
            .vsctl(&["list-ports", INTEGRATION_BRIDGE])
            .expect("list-ports");
        assert!(ports.lines().any(|p| p == "phys"), "{ports}");
    }
    sh(&g1, &["ip", "addr", "add", "10.50.0.11/24", "dev", "eth0"]);
    sh(&g2, &["ip", "addr", "add", "10.50.0.12/24", "dev", "eth0"]);
    let (ip1, ip2) = (Ipv4Addr::new(10, 50, 0, 11), Ipv4Addr::new(10, 50, 0, 12));
    assert!(pings(&g1, ip2, 10), "VLAN 100 across the nodes");
    assert!(ping(&g2, ip1), "and back");
    // Node 2's strip flow for tag 100 counted the frames node 1 sent: they were tagged.
    let count = 10;
    let stripped = || -> u64 {
        let out = d2
            .ovs()
            .ofctl(
                &[],
                "dump-flows",
                INTEGRATION_BRIDGE,
                &["table=0,dl_vlan=100"],
                None,
            )
            .expect("dump-flows");
        out.lines()
            .filter_map(|l| l.split("n_packets=").nth(1))
            .filter_map(|r| r.split(',').next()?.parse::<u64>().ok())
            .sum()
    };
    let before = stripped();
    for _ in 0..count {
        assert!(ping(&g1, ip2));
    }
    // The switch adds its datapath's counts to its flows' every second or so.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let mut after = stripped();
    while after - before < count && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(200));
        after = stripped();
    }
    assert!(after - before >= count, "{before} → {after}");
    for (h, c) in [(&h1, &c1), (&h2, &c2)] {
        assert_eq!(converge(h, c, &snap).expect("converge").steps, vec![]);
    }

    // Gone: the physical interface leaves the switch and stays on the node.
    for (h, c) in [(&h1, &c1), (&h2, &c2)] {
        let r = converge(h, c, &Snapshot::default()).expect("converge");
        assert!(r.failures.is_empty(), "{:?}", r.failures);
    }
    for (d, ns) in [(&d1, &ns1), (&d2, &ns2)] {
        let ports = d
            .ovs()
            .vsctl(&["list-ports", INTEGRATION_BRIDGE])
            .expect("list-ports");
        assert!(!ports.lines().any(|p| p == "phys"), "{ports}");
        assert!(l.link(ns, &phys).expect("link").is_some(), "left alone");
    }
}

/// A flat provider network across a kernel node and an OVS node on a veth standing in for
/// their physical interface: on the OVS node `phys` is the network's uplink on the switch
/// (untagged, its frames from outside: no DHCP or DHCP server reached from the wire), on the
/// kernel node a port of the network's bridge. Each guest takes its lease from its own node
/// and they ping each other; a right node gets no step; the uplink's flows deleted by hand
/// are repaired by the next converge; with the network gone `phys` leaves both bridges and
/// stays on the nodes.
#[test]
fn a_flat_network_spans_a_kernel_node_and_an_ovs_node_on_a_physical_link() {
    if !root() {
        return;
    }
    let mut rig = rig([Datapath::Kernel, Datapath::Ovs]);
    on_the_wire(&mut rig, Segmentation::Flat, None);
    let Rig {
        l,
        nodes: [n1, n2],
        guests: [g1, g2, ..],
        switches: [_, d2],
        hosts: [h1, h2],
        configs: [c1, c2],
        snap,
        macs: _,
        _cleanup,
    } = rig;
    let (ns1, ns2) = (Netns::Named(n1.clone()), Netns::Named(n2.clone()));
    let d2 = d2.expect("switch");
    for (h, c) in [(&h1, &c1), (&h2, &c2)] {
        let r = converge(h, c, &snap).expect("converge");
        assert!(r.failures.is_empty(), "{:?}", r.failures);
    }
    let uplink = || {
        d2.ovs()
            .ofctl(
                &["--no-stats"],
                "dump-flows",
                INTEGRATION_BRIDGE,
                &["table=0,in_port=phys"],
                None,
            )
            .expect("dump-flows")
            .lines()
            .filter(|f| f.contains("vlan_tci=0x0000/0x1fff") && f.contains("reg7"))
            .count()
    };
    assert_eq!(
        uplink(),
        1,
        "phys's untagged frames are the network's, from outside"
    );
    assert!(
        tunnels(&d2.ovs()).is_empty(),
        "no tunnel for a flat network"
    );
    let (ip1, ip2) = leases(&g1, &g2);
    assert!(pings(&g1, ip2, 10), "flat across the nodes");
    assert!(ping(&g2, ip1), "and back");
    for (h, c) in [(&h1, &c1), (&h2, &c2)] {
        assert_eq!(converge(h, c, &snap).expect("converge").steps, vec![]);
    }
    // The uplink's flow deleted by hand: the next converge puts it back.
    d2.ovs()
        .ofctl(
            &[],
            "del-flows",
            INTEGRATION_BRIDGE,
            &["table=0,in_port=phys"],
            None,
        )
        .expect("del-flows");
    assert_eq!(uplink(), 0);
    let r = converge(&h2, &c2, &snap).expect("converge");
    assert!(
        r.failures.is_empty() && !r.steps.is_empty(),
        "{:?} {:?}",
        r.failures,
        r.steps
    );
    assert_eq!(uplink(), 1);
    assert!(pings(&g1, ip2, 10), "flat again");

    // Gone: phys leaves both bridges and stays on the nodes.
    for (h, c) in [(&h1, &c1), (&h2, &c2)] {
        let r = converge(h, c, &Snapshot::default()).expect("converge");
        assert!(r.failures.is_empty(), "{:?}", r.failures);
    }
    let ports = d2
        .ovs()
        .vsctl(&["list-ports", INTEGRATION_BRIDGE])
        .expect("list-ports");
    assert!(!ports.lines().any(|p| p == "phys"), "{ports}");
    for ns in [&ns1, &ns2] {
        let link = l.link(ns, &phys()).expect("link").expect("left alone");
        assert_eq!(link.master, None, "{ns}");
    }
}

/// Remote groups on OVS: guest 1's group lets ICMP in from its own members only. Guest 2
/// moved to another group is no member and its pings go unanswered after one converge;
/// moved back, they are answered again (each port's filter lists the group's members, so a
/// membership change rewrites the filters of the ports whose rules name the group, in the
/// converge's one bundle).
#[test]
fn a_remote_groups_membership_change_takes_effect_on_ovs() {
    if !root() {
        return;
    }
    let Rig {
        l: _,
        nodes: _,
        guests: [g1, g2, ..],
        switches: _,
        hosts: [h1, h2],
        configs: [c1, c2],
        mut snap,
        macs: _,
        _cleanup,
    } = rig([Datapath::Ovs, Datapath::Ovs]);
    snap.groups
        .push(group("other", json!([{"direction": "egress"}])));
    let converge_both = |snap: &Snapshot| {
        for (h, c) in [(&h1, &c1), (&h2, &c2)] {
            let r = converge(h, c, snap).expect("converge");
            assert!(r.failures.is_empty(), "{:?}", r.failures);
        }
    };
    converge_both(&snap);
    sh(&g1, &["ip", "addr", "add", "10.50.0.11/24", "dev", "eth0"]);
    sh(&g2, &["ip", "addr", "add", "10.50.0.12/24", "dev", "eth0"]);
    let ip1 = Ipv4Addr::new(10, 50, 0, 11);
    assert!(pings(&g2, ip1, 10), "a member of guest 1's group");
    let member = snap.ports[1].clone();
    let mut moved = (*member).clone();
    moved.spec.security_groups = Some(vec!["other".into()]);
    snap.ports[1] = Arc::new(moved);
    converge_both(&snap);
    assert!(!pings(&g2, ip1, 3), "no member any more");
    snap.ports[1] = member;
    converge_both(&snap);
    assert!(pings(&g2, ip1, 10), "a member again");
}

/// A continuous ping (one ICMP id) from guest 1 to guest 2 and a TCP connection between
/// them run; the group's ICMP rule is removed: the ping goes unanswered within a second of
/// the converge that removes it (its connection forgotten on guest 2's node, not left to
/// the tracker's 30 s), while the TCP connection, which a rule still allows, keeps working.
fn a_removed_rule_ends_the_ping_it_allowed_and_no_other_connection(kinds: [Datapath; 2]) {
    use std::io::{BufRead, BufReader, Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::time::{Duration, Instant};

    let Rig {
        guests: [g1, g2, ..],
        hosts: [h1, h2],
        configs: [c1, c2],
        mut snap,
        _cleanup,
        ..
    } = rig(kinds);
    let rules_with = |icmp: bool, tcp: (u16, u16)| {
        let mut r = vec![
            json!({"direction": "ingress", "protocol": "tcp", "portRangeMin": tcp.0, "portRangeMax": tcp.1}),
            json!({"direction": "egress"}),
        ];
        if icmp {
            r.push(json!({"direction": "ingress", "protocol": "icmp", "remoteGroup": "default"}));
        }
        group("default", serde_json::Value::Array(r))
    };
    let rules = |icmp: bool| rules_with(icmp, (5000, 5000));
    snap.groups[0] = rules(true);
    // Each node converges from what its last converge left and forgets what its filter no
    // longer allows, as the agent's loop does.
    let mut before = [None, None];
    let mut enforced = [None, None];
    let mut converge_both = |snap: &Snapshot| {
        for (i, (h, c)) in [(&h1, &c1), (&h2, &c2)].into_iter().enumerate() {
            let last: &Option<(super::Ruleset, super::Observed)> = &before[i];
            let r = crate::agent::converge_since(h, c, snap, last.as_ref().map(|(r, o)| (r, o)))
                .expect("converge");
            assert!(r.failures.is_empty(), "{:?}", r.failures);
            crate::agent::forget_revoked(h, &r, &mut enforced[i]).expect("forget");
            before[i] = r.desired.firewall.clone().zip(r.firewall.clone());
        }
    };
    converge_both(&snap);
    sh(&g1, &["ip", "addr", "add", "10.50.0.11/24", "dev", "eth0"]);
    sh(&g2, &["ip", "addr", "add", "10.50.0.12/24", "dev", "eth0"]);
    // A veth hands TCP on with its checksum left to a NIC, which the userspace datapath's
    // tracker takes as invalid: the guests fill it in, as a NIC would.
    for g in [&g1, &g2] {
        sh(g, &["ethtool", "-K", "eth0", "tx", "off"]);
    }
    let ip2 = Ipv4Addr::new(10, 50, 0, 12);
    assert!(pings(&g1, ip2, 10), "guest 1 pings guest 2");

    // The TCP connection: guest 2 listens, guest 1 connects (sockets stay in the namespace
    // they were made in).
    let listener = super::netns::run_io(&Netns::Named(g2.clone()), || {
        TcpListener::bind("0.0.0.0:5000")
    })
    .expect("listen in guest 2");
    let mut client = super::netns::run_io(&Netns::Named(g1.clone()), move || {
        TcpStream::connect_timeout(&(ip2, 5000).into(), Duration::from_secs(10))
    })
    .expect("connect from guest 1");
    let (mut server, _) = listener.accept().expect("accept");
    for s in [&client, &server] {
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
    }
    let mut exchange = |n: u8| -> std::io::Result<()> {
        let mut b = [0u8; 1];
        client.write_all(&[n])?;
        server.read_exact(&mut b)?;
        server.write_all(&b)?;
        client.read_exact(&mut b)?;
        assert_eq!(b, [n]);
        Ok(())
    };
    exchange(1).expect("TCP between the guests");

    // The continuous ping: every answer's arrival, as it comes.
    let mut pinger = std::process::Command::new("ip")
        .args(["netns", "exec", g1.as_str()])
        .args(["busybox", "ping", "-i", "0.1", &ip2.to_string()])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("start ping");
    let stdout = pinger.stdout.take().expect("ping's output");
    let answers = Arc::new(std::sync::Mutex::new(Vec::<Instant>::new()));
    let seen = Arc::clone(&answers);
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if line.contains("bytes from") {
                seen.lock().expect("answers").push(Instant::now());
            }
        }
    });
    let count = || answers.lock().expect("answers").len();
    let deadline = Instant::now() + Duration::from_secs(30);
    while count() < 10 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(count() >= 10, "the ping is answered ({} answers)", count());

    // The ICMP rule goes.
    snap.groups[0] = rules(false);
    let written = Instant::now();
    converge_both(&snap);
    let converged = written.elapsed();
    std::thread::sleep(Duration::from_secs(3));
    let late: Vec<Duration> = answers
        .lock()
        .expect("answers")
        .iter()
        .filter(|t| **t > written)
        .map(|t| t.duration_since(written))
        .collect();
    // Stop the ping (ours) before asserting, so that a failure leaves nothing running.
    let _ = pinger.kill();
    let _ = pinger.wait();
    let _ = reader.join();
    eprintln!("converged in {converged:?}; answers after the change at {late:?}");
    assert!(
        late.iter().all(|d| *d < Duration::from_secs(1)),
        "the ping is answered after the rule went: {late:?} after the change"
    );
    assert!(!ping(&g1, ip2), "a new ping is not answered either");
    exchange(2).expect("the TCP connection still allowed keeps working");

    // A port range widened and narrowed again to the connection's port: still allowed, it
    // is kept (only what the rules no longer cover goes) and goes on.
    snap.groups[0] = rules_with(false, (4000, 6000));
    converge_both(&snap);
    exchange(3).expect("TCP under the wider range");
    snap.groups[0] = rules(false);
    converge_both(&snap);
    exchange(4).expect("the TCP connection still allowed goes on");
}

#[test]
fn a_removed_rule_ends_the_ping_it_allowed_on_the_kernel_datapath() {
    if !root() {
        return;
    }
    a_removed_rule_ends_the_ping_it_allowed_and_no_other_connection([
        Datapath::Kernel,
        Datapath::Kernel,
    ]);
}

#[test]
fn a_removed_rule_ends_the_ping_it_allowed_on_the_ovs_datapath() {
    if !root() {
        return;
    }
    a_removed_rule_ends_the_ping_it_allowed_and_no_other_connection([Datapath::Ovs, Datapath::Ovs]);
}
