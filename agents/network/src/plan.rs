//! What one node should have ([`Desired`]: per network a bridge, a VXLAN device with its
//! FDB, the ports' devices on the bridge and a DHCP server; one firewall ruleset), what it
//! has ([`ObservedHost`]), and [`plan`]: the steps from one to the other, a pure diff (no
//! I/O), so that a host that is already right yields no step at all.

use std::collections::{BTreeMap, BTreeSet};

use crate::driver::names::{IFNAME_MAX, digest_hex};
use crate::driver::{
    DhcpSpec, DhcpStatus, FdbEntry, IfName, Ipv4Cidr, Link, LinkKind, Name, Netns, Observed,
    Ruleset, VethSpec, VxlanInfo, VxlanSpec,
};

/// The prefix of DHCP servers' names, which also name their namespaces.
pub const DHCP_PREFIX: &str = "dhcp";

/// Everything the node should have.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Desired {
    /// The node's name.
    pub node: String,
    /// Where the node's bridges and VXLAN devices live (the host's own namespace, or a
    /// simulated node's).
    pub netns: Netns,
    /// The networks that have a port on the node, by bridge name.
    pub networks: Vec<NetworkWiring>,
    /// The node's ruleset; `None` when no network is on the node (the tables are removed).
    pub firewall: Option<Ruleset>,
}

/// One network on the node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkWiring {
    /// Its bridge.
    pub bridge: IfName,
    /// Its VXLAN device (a port of the bridge).
    pub vxlan: VxlanSpec,
    /// The MTU of the VXLAN device and of every port device.
    pub mtu: u32,
    /// The VXLAN device's FDB: exactly the other nodes hosting ports of the network.
    pub fdb: BTreeSet<FdbEntry>,
    /// The devices of the network's ports on this node (taps), to be ports of the bridge.
    pub ports: BTreeSet<IfName>,
    /// Its DHCP server, when it has a subnet with DHCP.
    pub dhcp: Option<DhcpWiring>,
}

/// A network's DHCP server on this node: dnsmasq in a namespace of its own (named as the
/// server), reached through a veth whose node end is a port of the bridge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DhcpWiring {
    /// The veth's node end.
    pub veth: IfName,
    /// The server's address on the veth's other end (`spec.interface`).
    pub address: Ipv4Cidr,
    /// The server; `spec.name` names the namespace too, `spec.netns` is that namespace.
    pub spec: DhcpSpec,
}

/// What the node has, read from the host.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ObservedHost {
    /// The links in [`Desired::netns`], by name.
    pub links: BTreeMap<IfName, Link>,
    /// The FDB of each Stratus VXLAN device present.
    pub fdb: BTreeMap<IfName, BTreeSet<FdbEntry>>,
    /// Stratus's nft tables.
    pub firewall: Option<Observed>,
    /// The DHCP servers this node's agent has (running or not).
    pub dhcp: BTreeMap<Name, DhcpStatus>,
    /// The DHCP servers' namespaces present, with what is inside.
    pub dhcp_netns: BTreeMap<Name, NetnsContents>,
}

/// The inside of a DHCP server's namespace.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NetnsContents {
    /// Its links, by name.
    pub links: BTreeMap<IfName, Link>,
    /// The addresses of each link.
    pub addresses: BTreeMap<IfName, BTreeSet<Ipv4Cidr>>,
}

/// One change to the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// The bridge of the network the step serves; `None` for the firewall and clean-up.
    pub network: Option<IfName>,
    /// What to do.
    pub op: Op,
}

/// The driver calls a [`Step`] makes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Replace the node's nft tables.
    ApplyFirewall(Ruleset),
    /// Remove the node's nft tables.
    ClearFirewall,
    /// Create a namespace.
    AddNetns(Name),
    /// Delete a namespace and everything in it.
    DelNetns(Name),
    /// Create a bridge.
    AddBridge(Netns, IfName),
    /// Create a VXLAN device.
    AddVxlan(Netns, VxlanSpec),
    /// Create a veth pair.
    AddVeth(Netns, VethSpec),
    /// Delete a link.
    DelLink(Netns, IfName),
    /// Make a link a port of a bridge, or of none.
    SetMaster(Netns, IfName, Option<IfName>),
    /// Set a link up.
    SetUp(Netns, IfName),
    /// Set a link's MTU.
    SetMtu(Netns, IfName, u32),
    /// Add an address.
    AddAddress(Netns, IfName, Ipv4Cidr),
    /// Remove an address.
    DelAddress(Netns, IfName, Ipv4Cidr),
    /// Make a VXLAN device's FDB exactly these entries.
    SetFdb(Netns, IfName, BTreeSet<FdbEntry>),
    /// Make a DHCP server serve its spec.
    EnsureDhcp(DhcpSpec),
    /// Stop a DHCP server and forget it.
    RemoveDhcp(Name),
}

/// Whether `name` is one the agent derives for `prefix` (`br`, `vx`, `ve`): the prefix, a
/// dash and 12 lower-case hex digits. Only such links are ever deleted as left over.
pub fn is_derived(name: &IfName, prefix: &str) -> bool {
    let s = name.as_str();
    s.len() == IFNAME_MAX
        && s.strip_prefix(prefix)
            .and_then(|r| r.strip_prefix('-'))
            .is_some_and(|h| {
                h.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
            })
}

/// The DHCP server (and namespace) of the network with uid `uid` on `node`: `dhcp-`, 8 hex
/// digits of the node's name's SHA-256, `-`, 12 of the network's uid's, so that each node's
/// agent tells its own namespaces from other nodes' on a shared host.
pub fn dhcp_name(node: &str, uid: &str) -> Name {
    let name = format!("{}{}", dhcp_prefix(node), digest_hex(uid, 12));
    Name::new(&name).unwrap_or_else(|_| unreachable!("hex digits and dashes form a name"))
}

fn dhcp_prefix(node: &str) -> String {
    format!("{DHCP_PREFIX}-{}-", digest_hex(node, 8))
}

/// Whether `name` is one [`dhcp_name`] gives for `node`.
pub fn is_dhcp_name_of(node: &str, name: &Name) -> bool {
    name.as_str()
        .strip_prefix(&dhcp_prefix(node))
        .is_some_and(|h| h.len() == 12 && h.bytes().all(|b| b.is_ascii_hexdigit()))
}

struct Plan {
    steps: Vec<Step>,
    network: Option<IfName>,
}

impl Plan {
    fn push(&mut self, op: Op) {
        self.steps.push(Step {
            network: self.network.clone(),
            op,
        });
    }

    /// Up, MTU and master of a link that exists (or `None`: was just created, so all three).
    fn attributes(
        &mut self,
        ns: &Netns,
        name: &IfName,
        have: Option<&Link>,
        mtu: Option<u32>,
        master: Option<&IfName>,
    ) {
        if let Some(mtu) = mtu
            && have.is_none_or(|l| l.mtu != mtu)
        {
            self.push(Op::SetMtu(ns.clone(), name.clone(), mtu));
        }
        if let Some(m) = master
            && have.is_none_or(|l| l.master.as_ref() != Some(m))
        {
            self.push(Op::SetMaster(ns.clone(), name.clone(), Some(m.clone())));
        }
        if have.is_none_or(|l| !l.up) {
            self.push(Op::SetUp(ns.clone(), name.clone()));
        }
    }
}

fn vxlan_info(spec: &VxlanSpec) -> LinkKind {
    LinkKind::Vxlan(VxlanInfo {
        vni: spec.vni,
        local: Some(spec.local),
        port: spec.port,
        learning: false,
    })
}

/// The steps that make the host `observed` into `desired`, in order: the firewall first (no
/// port is ever on a bridge before its filter is in place), then each network's bridge,
/// VXLAN device, FDB, DHCP server and port devices, then what is left over (stray bridge
/// ports, links and DHCP servers of networks no longer on the node), and the firewall's
/// removal last.
///
/// # Guarantees
/// - An `observed` that matches `desired` gives no step; so does the host after the steps
///   given were all carried out.
/// - Only links with names the agent derives (see [`is_derived`]) and DHCP servers the
///   node's agent started are deleted; a port's device is never deleted, only attached
///   or detached.
/// - A port device that is absent gets no step (it is the hypervisor's to create).
pub fn plan(desired: &Desired, observed: &ObservedHost) -> Vec<Step> {
    let ns = &desired.netns;
    let mut p = Plan {
        steps: Vec::new(),
        network: None,
    };
    if let Some(r) = &desired.firewall {
        // A ruleset that cannot render is applied anyway, so that the driver's refusal is
        // what the ports report.
        if r.observed().ok().as_ref() != observed.firewall.as_ref() || observed.firewall.is_none() {
            p.push(Op::ApplyFirewall(r.clone()));
        }
    }

    let mut wanted_links: BTreeSet<&IfName> = BTreeSet::new();
    let mut wanted_dhcp: BTreeSet<&Name> = BTreeSet::new();
    for n in &desired.networks {
        p.network = Some(n.bridge.clone());
        wanted_links.insert(&n.bridge);
        wanted_links.insert(&n.vxlan.name);

        let bridge = observed.links.get(&n.bridge);
        let bridge = match bridge {
            Some(l) if l.kind == LinkKind::Bridge => Some(l),
            Some(_) => {
                p.push(Op::DelLink(ns.clone(), n.bridge.clone()));
                None
            }
            None => None,
        };
        if bridge.is_none() {
            p.push(Op::AddBridge(ns.clone(), n.bridge.clone()));
        }
        p.attributes(ns, &n.bridge, bridge, None, None);

        let vxlan = match observed.links.get(&n.vxlan.name) {
            Some(l) if l.kind == vxlan_info(&n.vxlan) => Some(l),
            Some(_) => {
                p.push(Op::DelLink(ns.clone(), n.vxlan.name.clone()));
                None
            }
            None => None,
        };
        if vxlan.is_none() {
            p.push(Op::AddVxlan(ns.clone(), n.vxlan.clone()));
        }
        p.attributes(ns, &n.vxlan.name, vxlan, Some(n.mtu), Some(&n.bridge));
        let fdb = vxlan.and_then(|_| observed.fdb.get(&n.vxlan.name));
        if fdb.map_or(!n.fdb.is_empty(), |f| *f != n.fdb) {
            p.push(Op::SetFdb(ns.clone(), n.vxlan.name.clone(), n.fdb.clone()));
        }

        if let Some(d) = &n.dhcp {
            wanted_links.insert(&d.veth);
            wanted_dhcp.insert(&d.spec.name);
            dhcp(&mut p, ns, n, d, observed);
        }

        for port in &n.ports {
            wanted_links.insert(port);
            if let Some(l) = observed.links.get(port) {
                p.attributes(ns, port, Some(l), Some(n.mtu), Some(&n.bridge));
            }
        }
    }

    p.network = None;
    // Ports of a wanted bridge that belong to no network's wiring any more.
    let bridges: BTreeSet<&IfName> = desired.networks.iter().map(|n| &n.bridge).collect();
    for l in observed.links.values() {
        if let Some(m) = &l.master
            && bridges.contains(m)
            && !wanted_links.contains(&l.name)
        {
            p.push(Op::SetMaster(ns.clone(), l.name.clone(), None));
        }
    }
    // Left-over DHCP servers, then their namespaces (the veth's node end goes with them).
    for name in observed.dhcp.keys() {
        if !wanted_dhcp.contains(name) {
            p.push(Op::RemoveDhcp(name.clone()));
        }
    }
    for name in observed.dhcp_netns.keys() {
        if !wanted_dhcp.contains(name) {
            p.push(Op::DelNetns(name.clone()));
        }
    }
    // Left-over links: VXLAN devices and veths before the bridges they are on.
    for prefix in ["vx", "ve", "br"] {
        for name in observed.links.keys() {
            if is_derived(name, prefix) && !wanted_links.contains(name) {
                p.push(Op::DelLink(ns.clone(), name.clone()));
            }
        }
    }
    if desired.firewall.is_none() && observed.firewall.is_some() {
        p.push(Op::ClearFirewall);
    }
    p.steps
}

/// The steps of one network's DHCP server: its namespace, the veth into it, the server's
/// address, and the server (restarted when its interface was made anew).
fn dhcp(p: &mut Plan, ns: &Netns, n: &NetworkWiring, d: &DhcpWiring, observed: &ObservedHost) {
    let name = &d.spec.name;
    let inner = Netns::Named(name.clone());
    let peer = &d.spec.interface;
    let inside = observed.dhcp_netns.get(name);
    if inside.is_none() {
        p.push(Op::AddNetns(name.clone()));
    }
    let veth = observed
        .links
        .get(&d.veth)
        .filter(|l| l.kind == LinkKind::Veth);
    let peer_link = inside
        .and_then(|i| i.links.get(peer))
        .filter(|l| l.kind == LinkKind::Veth);
    let fresh = veth.is_none() || peer_link.is_none();
    if fresh {
        if observed.links.contains_key(&d.veth) {
            p.push(Op::DelLink(ns.clone(), d.veth.clone()));
        }
        if inside.is_some_and(|i| i.links.contains_key(peer)) {
            p.push(Op::DelLink(inner.clone(), peer.clone()));
        }
        p.push(Op::AddVeth(
            ns.clone(),
            VethSpec {
                name: d.veth.clone(),
                peer: peer.clone(),
                peer_netns: Some(inner.clone()),
            },
        ));
    }
    let (veth, peer_link) = if fresh {
        (None, None)
    } else {
        (veth, peer_link)
    };
    p.attributes(ns, &d.veth, veth, Some(n.mtu), Some(&n.bridge));
    p.attributes(&inner, peer, peer_link, Some(n.mtu), None);
    let lo = IfName::new("lo").ok();
    if let Some(lo) = lo {
        let have = inside.and_then(|i| i.links.get(&lo));
        if have.is_none_or(|l| !l.up) {
            p.push(Op::SetUp(inner.clone(), lo));
        }
    }
    let addresses = if fresh {
        BTreeSet::new()
    } else {
        inside
            .and_then(|i| i.addresses.get(peer))
            .cloned()
            .unwrap_or_default()
    };
    for a in &addresses {
        if *a != d.address {
            p.push(Op::DelAddress(inner.clone(), peer.clone(), *a));
        }
    }
    if !addresses.contains(&d.address) {
        p.push(Op::AddAddress(inner.clone(), peer.clone(), d.address));
    }
    let mut leases = d.spec.leases.clone();
    leases.sort();
    let serving = observed.dhcp.get(name);
    let changed_address = addresses.len() != 1 || !addresses.contains(&d.address);
    if serving.is_some_and(|s| s.pid.is_some()) && (fresh || changed_address) {
        // Its socket is bound to the interface that was replaced, or to another address.
        p.push(Op::RemoveDhcp(name.clone()));
        p.push(Op::EnsureDhcp(d.spec.clone()));
    } else if serving.is_none_or(|s| s.pid.is_none() || s.leases != leases) {
        p.push(Op::EnsureDhcp(d.spec.clone()));
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::driver::nft::{PortFilter, Zone};
    use crate::driver::{MacAddr, Role, StaticLease, VXLAN_PORT};

    fn ifname(s: &str) -> IfName {
        IfName::new(s).expect("ifname")
    }

    fn node() -> Netns {
        Netns::Host
    }

    fn network(uid: &str, ports: &[&str], dhcp: bool) -> NetworkWiring {
        let bridge = IfName::derived(Role::Bridge, uid);
        let dname = dhcp_name("n1", uid);
        NetworkWiring {
            bridge: bridge.clone(),
            vxlan: VxlanSpec {
                name: IfName::derived(Role::Vxlan, uid),
                vni: 100,
                local: Ipv4Addr::new(192, 0, 2, 1),
                port: VXLAN_PORT,
            },
            mtu: 1450,
            fdb: BTreeSet::from([FdbEntry {
                mac: MacAddr::ZERO,
                remote: Ipv4Addr::new(192, 0, 2, 2),
            }]),
            ports: ports.iter().map(|p| ifname(p)).collect(),
            dhcp: dhcp.then(|| DhcpWiring {
                veth: IfName::derived(Role::Veth, uid),
                address: "10.0.0.254/24".parse().expect("cidr"),
                spec: DhcpSpec {
                    name: dname.clone(),
                    netns: Netns::Named(dname),
                    interface: IfName::derived(Role::VethPeer, uid),
                    subnet: "10.0.0.0/24".parse().expect("cidr"),
                    router: Some(Ipv4Addr::new(10, 0, 0, 1)),
                    lease_secs: 3600,
                    leases: vec![StaticLease {
                        mac: "02:00:00:00:00:01".parse().expect("mac"),
                        ip: Ipv4Addr::new(10, 0, 0, 5),
                        hostname: None,
                    }],
                },
            }),
        }
    }

    fn ruleset(n: &NetworkWiring) -> Ruleset {
        Ruleset {
            zones: vec![Zone {
                bridge: n.bridge.clone(),
                zone: 100,
            }],
            ports: n
                .ports
                .iter()
                .map(|p| PortFilter {
                    id: Name::derived("p", p.as_str()).expect("id"),
                    bridge: n.bridge.clone(),
                    device: p.clone(),
                    mac: "02:00:00:00:00:01".parse().expect("mac"),
                    ips: BTreeSet::from([Ipv4Addr::new(10, 0, 0, 5)]),
                    dhcp_server: None,
                    port_security: true,
                    ingress: vec![],
                    egress: vec![],
                })
                .collect(),
            groups: vec![],
            local_dhcp: vec![],
            tunnels: vec![],
        }
    }

    fn desired(networks: Vec<NetworkWiring>) -> Desired {
        let firewall = (!networks.is_empty()).then(|| Ruleset {
            zones: networks
                .iter()
                .zip(1..)
                .map(|(n, zone)| Zone {
                    bridge: n.bridge.clone(),
                    zone,
                })
                .collect(),
            ports: networks.iter().flat_map(|n| ruleset(n).ports).collect(),
            groups: vec![],
            local_dhcp: vec![],
            tunnels: vec![],
        });
        Desired {
            node: "n1".into(),
            netns: node(),
            networks,
            firewall,
        }
    }

    fn link(name: &IfName, kind: LinkKind, mtu: u32, master: Option<&IfName>) -> Link {
        Link {
            name: name.clone(),
            kind,
            mtu,
            up: true,
            master: master.cloned(),
            mac: None,
        }
    }

    /// The host exactly as `d` wants it, with a tap for every port.
    fn right(d: &Desired) -> ObservedHost {
        let mut o = ObservedHost {
            firewall: d.firewall.as_ref().map(|r| r.observed().expect("observed")),
            ..ObservedHost::default()
        };
        for n in &d.networks {
            o.links.insert(
                n.bridge.clone(),
                link(&n.bridge, LinkKind::Bridge, 1450, None),
            );
            o.links.insert(
                n.vxlan.name.clone(),
                link(&n.vxlan.name, vxlan_info(&n.vxlan), n.mtu, Some(&n.bridge)),
            );
            o.fdb.insert(n.vxlan.name.clone(), n.fdb.clone());
            for p in &n.ports {
                o.links
                    .insert(p.clone(), link(p, LinkKind::Tun, n.mtu, Some(&n.bridge)));
            }
            if let Some(dh) = &n.dhcp {
                o.links.insert(
                    dh.veth.clone(),
                    link(&dh.veth, LinkKind::Veth, n.mtu, Some(&n.bridge)),
                );
                let lo = ifname("lo");
                let peer = &dh.spec.interface;
                o.dhcp_netns.insert(
                    dh.spec.name.clone(),
                    NetnsContents {
                        links: BTreeMap::from([
                            (lo.clone(), link(&lo, LinkKind::Other(None), 65536, None)),
                            (peer.clone(), link(peer, LinkKind::Veth, n.mtu, None)),
                        ]),
                        addresses: BTreeMap::from([(peer.clone(), BTreeSet::from([dh.address]))]),
                    },
                );
                let mut leases = dh.spec.leases.clone();
                leases.sort();
                o.dhcp.insert(
                    dh.spec.name.clone(),
                    DhcpStatus {
                        pid: Some(42),
                        leases,
                    },
                );
            }
        }
        o
    }

    fn ops(steps: &[Step]) -> Vec<Op> {
        steps.iter().map(|s| s.op.clone()).collect()
    }

    #[test]
    fn a_host_that_is_right_needs_nothing() {
        for d in [
            desired(vec![]),
            desired(vec![network("net-a", &["tp-a1", "tp-a2"], true)]),
            desired(vec![
                network("net-a", &["tp-a1"], true),
                network("net-b", &["tp-b1"], false),
            ]),
        ] {
            assert_eq!(plan(&d, &right(&d)), vec![], "{d:?}");
        }
    }

    #[test]
    fn an_empty_host_is_built_firewall_first() {
        let n = network("net-a", &["tp-a1"], true);
        let d = desired(vec![n.clone()]);
        let mut o = ObservedHost::default();
        // The tap exists (libvirt made it), on no bridge, down.
        let tap = ifname("tp-a1");
        o.links.insert(
            tap.clone(),
            Link {
                up: false,
                ..link(&tap, LinkKind::Tun, 1500, None)
            },
        );
        let steps = plan(&d, &o);
        let ops = ops(&steps);
        assert!(matches!(ops[0], Op::ApplyFirewall(_)), "{ops:?}");
        let pos = |op: &Op| ops.iter().position(|o| o == op).expect("step present");
        let ns = node();
        let add_bridge = pos(&Op::AddBridge(ns.clone(), n.bridge.clone()));
        let add_vxlan = pos(&Op::AddVxlan(ns.clone(), n.vxlan.clone()));
        let enslave = pos(&Op::SetMaster(
            ns.clone(),
            n.vxlan.name.clone(),
            Some(n.bridge.clone()),
        ));
        let fdb = pos(&Op::SetFdb(ns.clone(), n.vxlan.name.clone(), n.fdb.clone()));
        let tap_on = pos(&Op::SetMaster(
            ns.clone(),
            tap.clone(),
            Some(n.bridge.clone()),
        ));
        assert!(add_bridge < add_vxlan && add_vxlan < enslave && add_vxlan < fdb);
        assert!(ops.contains(&Op::SetUp(ns.clone(), tap.clone())));
        assert!(ops.contains(&Op::SetMtu(ns.clone(), tap.clone(), 1450)));
        let dh = n.dhcp.as_ref().expect("dhcp");
        let netns = pos(&Op::AddNetns(dh.spec.name.clone()));
        let inner = Netns::Named(dh.spec.name.clone());
        let addr = pos(&Op::AddAddress(
            inner.clone(),
            dh.spec.interface.clone(),
            dh.address,
        ));
        let serve = pos(&Op::EnsureDhcp(dh.spec.clone()));
        assert!(netns < addr && addr < serve);
        assert!(tap_on > 0);
        // No step names another network, and each step names this one's bridge but the
        // firewall's.
        assert!(
            steps[1..]
                .iter()
                .all(|s| s.network.as_ref() == Some(&n.bridge))
        );
        // Carried out, nothing is left to do.
        let after = right(&d);
        assert_eq!(plan(&d, &after), vec![]);
    }

    #[test]
    fn drift_is_repaired_by_exactly_the_missing_pieces() {
        let n = network("net-a", &["tp-a1"], true);
        let d = desired(vec![n.clone()]);
        let ns = node();
        let dh = n.dhcp.clone().expect("dhcp");
        type Case = (&'static str, fn(&mut ObservedHost, &NetworkWiring), Vec<Op>);
        let cases: Vec<Case> = vec![
            (
                "VXLAN device deleted by hand",
                |o, n| {
                    o.links.remove(&n.vxlan.name);
                    o.fdb.remove(&n.vxlan.name);
                },
                vec![
                    Op::AddVxlan(node(), n.vxlan.clone()),
                    Op::SetMtu(node(), n.vxlan.name.clone(), 1450),
                    Op::SetMaster(node(), n.vxlan.name.clone(), Some(n.bridge.clone())),
                    Op::SetUp(node(), n.vxlan.name.clone()),
                    Op::SetFdb(node(), n.vxlan.name.clone(), n.fdb.clone()),
                ],
            ),
            (
                "an FDB entry deleted",
                |o, n| {
                    o.fdb.insert(n.vxlan.name.clone(), BTreeSet::new());
                },
                vec![Op::SetFdb(node(), n.vxlan.name.clone(), n.fdb.clone())],
            ),
            (
                "the nft tables deleted",
                |o, _| o.firewall = None,
                vec![Op::ApplyFirewall(d.firewall.clone().expect("ruleset"))],
            ),
            (
                "a rule deleted",
                |o, _| {
                    if let Some(f) = o.firewall.as_mut() {
                        for rules in f.chains.values_mut() {
                            rules.pop();
                        }
                    }
                },
                vec![Op::ApplyFirewall(d.firewall.clone().expect("ruleset"))],
            ),
            (
                "dnsmasq killed",
                |o, n| {
                    let name = &n.dhcp.as_ref().expect("dhcp").spec.name;
                    if let Some(s) = o.dhcp.get_mut(name) {
                        s.pid = None;
                    }
                },
                vec![Op::EnsureDhcp(dh.spec.clone())],
            ),
            (
                "a tap taken off the bridge and set down",
                |o, _| {
                    if let Some(l) = o.links.get_mut(&ifname("tp-a1")) {
                        l.master = None;
                        l.up = false;
                    }
                },
                vec![
                    Op::SetMaster(node(), ifname("tp-a1"), Some(n.bridge.clone())),
                    Op::SetUp(node(), ifname("tp-a1")),
                ],
            ),
            (
                "the bridge set down",
                |o, n| {
                    if let Some(l) = o.links.get_mut(&n.bridge) {
                        l.up = false;
                    }
                },
                vec![Op::SetUp(node(), n.bridge.clone())],
            ),
            (
                "a VXLAN device of another VNI in its place",
                |o, n| {
                    let other = VxlanSpec {
                        vni: 7,
                        ..n.vxlan.clone()
                    };
                    if let Some(l) = o.links.get_mut(&n.vxlan.name) {
                        l.kind = vxlan_info(&other);
                    }
                },
                vec![
                    Op::DelLink(node(), n.vxlan.name.clone()),
                    Op::AddVxlan(node(), n.vxlan.clone()),
                    Op::SetMtu(node(), n.vxlan.name.clone(), 1450),
                    Op::SetMaster(node(), n.vxlan.name.clone(), Some(n.bridge.clone())),
                    Op::SetUp(node(), n.vxlan.name.clone()),
                    Op::SetFdb(node(), n.vxlan.name.clone(), n.fdb.clone()),
                ],
            ),
            (
                "the DHCP namespace's veth deleted: the server restarts on the new one",
                |o, n| {
                    let dh = n.dhcp.as_ref().expect("dhcp");
                    o.links.remove(&dh.veth);
                    if let Some(i) = o.dhcp_netns.get_mut(&dh.spec.name) {
                        i.links.remove(&dh.spec.interface);
                        i.addresses.clear();
                    }
                },
                {
                    let inner = Netns::Named(dh.spec.name.clone());
                    vec![
                        Op::AddVeth(
                            node(),
                            VethSpec {
                                name: dh.veth.clone(),
                                peer: dh.spec.interface.clone(),
                                peer_netns: Some(inner.clone()),
                            },
                        ),
                        Op::SetMtu(node(), dh.veth.clone(), 1450),
                        Op::SetMaster(node(), dh.veth.clone(), Some(n.bridge.clone())),
                        Op::SetUp(node(), dh.veth.clone()),
                        Op::SetMtu(inner.clone(), dh.spec.interface.clone(), 1450),
                        Op::SetUp(inner.clone(), dh.spec.interface.clone()),
                        Op::AddAddress(inner, dh.spec.interface.clone(), dh.address),
                        Op::RemoveDhcp(dh.spec.name.clone()),
                        Op::EnsureDhcp(dh.spec.clone()),
                    ]
                },
            ),
        ];
        for (what, break_it, want) in cases {
            let mut o = right(&d);
            break_it(&mut o, &n);
            assert_eq!(ops(&plan(&d, &o)), want, "{what}");
        }
        let _ = ns;
    }

    #[test]
    fn changes_in_the_api_become_the_smallest_change() {
        let before = desired(vec![network("net-a", &["tp-a1"], true)]);
        let o = right(&before);
        let ns = node();

        // A remote node joins: only the FDB changes.
        let mut n = network("net-a", &["tp-a1"], true);
        n.fdb.insert(FdbEntry {
            mac: MacAddr::ZERO,
            remote: Ipv4Addr::new(192, 0, 2, 3),
        });
        let d = desired(vec![n.clone()]);
        assert_eq!(
            ops(&plan(&d, &o)),
            vec![Op::SetFdb(ns.clone(), n.vxlan.name.clone(), n.fdb.clone())]
        );

        // A lease changes: the server is told (same process, the driver reloads it).
        let mut n = network("net-a", &["tp-a1"], true);
        let dh = n.dhcp.as_mut().expect("dhcp");
        dh.spec.leases[0].ip = Ipv4Addr::new(10, 0, 0, 6);
        let spec = dh.spec.clone();
        let d = desired(vec![n]);
        assert_eq!(ops(&plan(&d, &o)), vec![Op::EnsureDhcp(spec)]);

        // The port leaves and another network's arrives: the old network goes entirely, its
        // tap is left alone (not ours), the new one is built.
        let d = desired(vec![network("net-b", &["tp-b1"], false)]);
        let old = network("net-a", &["tp-a1"], true);
        let ops = ops(&plan(&d, &o));
        let dh = old.dhcp.expect("dhcp");
        for gone in [
            Op::RemoveDhcp(dh.spec.name.clone()),
            Op::DelNetns(dh.spec.name.clone()),
            Op::DelLink(ns.clone(), old.vxlan.name.clone()),
            Op::DelLink(ns.clone(), dh.veth.clone()),
            Op::DelLink(ns.clone(), old.bridge.clone()),
        ] {
            assert!(ops.contains(&gone), "{gone:?} in {ops:?}");
        }
        assert!(
            !ops.iter()
                .any(|o| matches!(o, Op::DelLink(_, n) if n.as_str() == "tp-a1")),
            "{ops:?}"
        );
        assert!(matches!(ops[0], Op::ApplyFirewall(_)));
    }

    #[test]
    fn everything_deleted_leaves_nothing_and_touches_nothing_else() {
        let d = desired(vec![network("net-a", &["tp-a1"], true)]);
        let mut o = right(&d);
        // Links Stratus did not make, even ones that look alike, stay.
        for other in ["eth0", "br-0", "br-notours12345", "vxlan0", "tp-a1"] {
            let name = ifname(other);
            o.links
                .entry(name.clone())
                .or_insert_with(|| link(&name, LinkKind::Bridge, 1500, None));
        }
        let n = network("net-a", &["tp-a1"], true);
        let dh = n.dhcp.clone().expect("dhcp");
        let ops = ops(&plan(&desired(vec![]), &o));
        assert_eq!(
            ops,
            vec![
                Op::RemoveDhcp(dh.spec.name.clone()),
                Op::DelNetns(dh.spec.name.clone()),
                Op::DelLink(node(), n.vxlan.name.clone()),
                Op::DelLink(node(), dh.veth.clone()),
                Op::DelLink(node(), n.bridge.clone()),
                Op::ClearFirewall,
            ]
        );
    }

    #[test]
    fn a_missing_port_device_is_waited_for_and_strays_are_detached() {
        let n = network("net-a", &["tp-a1", "tp-a2"], false);
        let d = desired(vec![n.clone()]);
        let mut o = right(&d);
        o.links.remove(&ifname("tp-a2"));
        let stray = ifname("tp-old");
        o.links.insert(
            stray.clone(),
            link(&stray, LinkKind::Tun, 1450, Some(&n.bridge)),
        );
        assert_eq!(ops(&plan(&d, &o)), vec![Op::SetMaster(node(), stray, None)]);
    }

    #[test]
    fn derived_names_are_recognised_exactly() {
        assert!(is_derived(&IfName::derived(Role::Bridge, "x"), "br"));
        assert!(is_derived(&IfName::derived(Role::Vxlan, "x"), "vx"));
        assert!(!is_derived(&IfName::derived(Role::Vxlan, "x"), "br"));
        for other in [
            "br-0",
            "br-0123456789aB",
            "br_0123456789ab",
            "br-0123456789ag",
        ] {
            assert!(!is_derived(&ifname(other), "br"), "{other}");
        }
        assert!(is_dhcp_name_of("n1", &dhcp_name("n1", "x")));
        assert!(!is_dhcp_name_of("n2", &dhcp_name("n1", "x")));
        assert!(!is_dhcp_name_of("n1", &Name::new("dhcp-1").expect("name")));
    }
}
