//! What one node should have ([`Desired`]: per network a bridge, a VXLAN device with its
//! FDB, the ports' devices on the bridge and a DHCP server; one firewall ruleset), what it
//! has ([`ObservedHost`]), and [`plan`]: the steps from one to the other, a pure diff (no
//! I/O), so that a host that is already right yields no step at all.

use std::collections::{BTreeMap, BTreeSet};

use crate::driver::names::{IFNAME_MAX, digest_hex};
use crate::driver::nft::{Delta, FirewallError};
use crate::driver::{
    Attach, DhcpSpec, DhcpStatus, FdbEntry, IfName, Ipv4Cidr, Link, LinkKind, MacAddr, Name, Nat,
    Netns, Observed, RouteSpec, Ruleset, Update, VethSpec, VlanSpec, VxlanInfo, VxlanSpec,
};

/// The prefix of DHCP servers' names, which also name their namespaces.
pub const DHCP_PREFIX: &str = "dhcp";

/// The prefix of routers' namespaces.
pub const ROUTER_PREFIX: &str = "qrouter";

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
    /// The routers placed on the node, each in a namespace of its own.
    pub routers: Vec<RouterWiring>,
}

/// How a network's bridge reaches the other nodes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Uplink {
    /// A VXLAN device (a tenant network).
    Vxlan(VxlanSpec),
    /// A physical interface of the node, mapped to the network's `physicalNetwork` (a flat
    /// provider network): enslaved to the bridge, never created or deleted by the agent.
    Physical(IfName),
    /// A VLAN sub-interface of the node's physical interface for the network's
    /// `physicalNetwork`, tagged with its `status.segmentationID` (a vlan provider network):
    /// created and deleted by the agent, the physical interface itself never touched.
    Vlan(VlanSpec),
}

impl Uplink {
    /// The uplink's device.
    pub fn name(&self) -> &IfName {
        match self {
            Uplink::Vxlan(v) => &v.name,
            Uplink::Physical(n) => n,
            Uplink::Vlan(v) => &v.name,
        }
    }
}

/// A router on the node: its namespace, one veth per router Port (the node end on the
/// port's network's bridge, the router end inside with the port's MAC and addresses),
/// IPv4 forwarding, its routes and its NAT table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouterWiring {
    /// Its namespace (see [`router_name`]).
    pub name: Name,
    /// Its interfaces, one per router Port.
    pub interfaces: Vec<RouterInterfaceWiring>,
    /// Routes through gateways: the default route via the external subnet's gateway and
    /// the router's static routes.
    pub routes: BTreeSet<RouteSpec>,
    /// Its address translation.
    pub nat: Nat,
}

/// One interface of a router.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouterInterfaceWiring {
    /// The bridge of the Port's network.
    pub bridge: IfName,
    /// The veth's node end, a port of `bridge`.
    pub veth: IfName,
    /// The veth's router end.
    pub inner: IfName,
    /// The Port's MAC (on `inner`).
    pub mac: MacAddr,
    /// The Port's addresses with their subnets' prefix lengths (and, on the gateway, the
    /// floating addresses as /32).
    pub addresses: BTreeSet<Ipv4Cidr>,
    /// The network's MTU.
    pub mtu: u32,
}

/// The inside of a router's namespace.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RouterContents {
    /// Its links, by name.
    pub links: BTreeMap<IfName, Link>,
    /// The addresses of each veth.
    pub addresses: BTreeMap<IfName, BTreeSet<Ipv4Cidr>>,
    /// Its routes through gateways.
    pub routes: BTreeSet<RouteSpec>,
    /// Whether it forwards IPv4.
    pub forwarding: bool,
    /// Its NAT table.
    pub nat: Option<Observed>,
}

/// One network on the node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkWiring {
    /// Its bridge.
    pub bridge: IfName,
    /// Its uplink (a port of the bridge).
    pub uplink: Uplink,
    /// The MTU of the VXLAN device and of every port device.
    pub mtu: u32,
    /// The VXLAN device's FDB: exactly the other nodes hosting ports of the network (empty
    /// for a physical uplink).
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
    /// The node's routers' namespaces present, with what is inside.
    pub routers: BTreeMap<Name, RouterContents>,
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
    /// The bridge of the network the step serves; `None` for the firewall, routers and
    /// clean-up.
    pub network: Option<IfName>,
    /// The namespace of the router the step serves.
    pub router: Option<Name>,
    /// What to do.
    pub op: Op,
}

/// The driver calls a [`Step`] makes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Replace the node's nft tables (absent, or a ruleset that does not render).
    ApplyFirewall(Ruleset),
    /// Change only the chains and set elements of the node's nft tables that differ.
    UpdateFirewall(Box<Update>),
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
    /// Create a VLAN sub-interface.
    AddVlan(Netns, VlanSpec),
    /// Create a veth pair.
    AddVeth(Netns, VethSpec),
    /// Delete a link.
    DelLink(Netns, IfName),
    /// Make a link a port of a bridge, or of none.
    SetMaster(Netns, IfName, Option<IfName>),
    /// Make links ports of a bridge, up, with their MTU ([`crate::driver::Links::attach`]).
    AttachPorts(Netns, IfName, Vec<Attach>),
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
    /// Set a link's hardware address.
    SetMac(Netns, IfName, MacAddr),
    /// Add a route through a gateway.
    AddRoute(Netns, RouteSpec),
    /// Remove a route through a gateway.
    DelRoute(Netns, RouteSpec),
    /// Turn IPv4 forwarding on.
    SetForwarding(Netns),
    /// Replace a router's NAT table.
    ApplyNat(Name, Nat),
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

/// The namespace of the router with uid `uid` on `node`: `qrouter-`, 8 hex digits of the
/// node's name's SHA-256, `-`, 12 of the router's uid's (a router moved to another node of a
/// shared host never meets its old namespace).
pub fn router_name(node: &str, uid: &str) -> Name {
    let name = format!("{}{}", router_prefix(node), digest_hex(uid, 12));
    Name::new(&name).unwrap_or_else(|_| unreachable!("hex digits and dashes form a name"))
}

fn router_prefix(node: &str) -> String {
    format!("{ROUTER_PREFIX}-{}-", digest_hex(node, 8))
}

/// Whether `name` is one [`router_name`] gives for `node`.
pub fn is_router_name_of(node: &str, name: &Name) -> bool {
    name.as_str()
        .strip_prefix(&router_prefix(node))
        .is_some_and(|h| h.len() == 12 && h.bytes().all(|b| b.is_ascii_hexdigit()))
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
    router: Option<Name>,
}

impl Plan {
    fn push(&mut self, op: Op) {
        self.steps.push(Step {
            network: self.network.clone(),
            router: self.router.clone(),
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
    let want = desired.firewall.as_ref().map(Ruleset::observed);
    plan_with(desired, want.as_ref(), observed)
}

/// [`plan`], given [`Ruleset::observed`] of `desired.firewall` (rendering a ruleset of
/// thousands of rules is the costliest part of a plan; a converge does it once).
///
/// The firewall's step writes only what differs ([`Op::UpdateFirewall`]: the chains whose
/// rules differ, the set elements that differ) when the tables are there, and replaces
/// them whole ([`Op::ApplyFirewall`]) when they are absent or the ruleset does not render.
pub fn plan_with(
    desired: &Desired,
    want: Option<&Result<Observed, FirewallError>>,
    observed: &ObservedHost,
) -> Vec<Step> {
    let ns = &desired.netns;
    let mut p = Plan {
        steps: Vec::new(),
        network: None,
        router: None,
    };
    if let Some(r) = &desired.firewall {
        // A ruleset that cannot render is applied anyway, so that the driver's refusal is
        // what the ports report.
        match (want, &observed.firewall) {
            (Some(Ok(w)), Some(have)) if w == have => {}
            (Some(Ok(w)), Some(have)) => p.push(Op::UpdateFirewall(Box::new(Update {
                ruleset: r.clone(),
                want: w.clone(),
                delta: Delta::between(w, have),
            }))),
            _ => p.push(Op::ApplyFirewall(r.clone())),
        }
    }

    let mut wanted_links: BTreeSet<&IfName> = BTreeSet::new();
    let mut wanted_dhcp: BTreeSet<&Name> = BTreeSet::new();
    for n in &desired.networks {
        p.network = Some(n.bridge.clone());
        wanted_links.insert(&n.bridge);
        wanted_links.insert(n.uplink.name());

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

        match &n.uplink {
            Uplink::Vxlan(spec) => {
                let vxlan = match observed.links.get(&spec.name) {
                    Some(l) if l.kind == vxlan_info(spec) => Some(l),
                    Some(_) => {
                        p.push(Op::DelLink(ns.clone(), spec.name.clone()));
                        None
                    }
                    None => None,
                };
                if vxlan.is_none() {
                    p.push(Op::AddVxlan(ns.clone(), spec.clone()));
                }
                p.attributes(ns, &spec.name, vxlan, Some(n.mtu), Some(&n.bridge));
                let fdb = vxlan.and_then(|_| observed.fdb.get(&spec.name));
                if fdb.map_or(!n.fdb.is_empty(), |f| *f != n.fdb) {
                    p.push(Op::SetFdb(ns.clone(), spec.name.clone(), n.fdb.clone()));
                }
            }
            // The operator's interface: put on the bridge and up, its MTU left alone; an
            // absent one gets no step (the network's ports then say it is missing).
            Uplink::Physical(iface) => {
                if let Some(l) = observed.links.get(iface) {
                    p.attributes(ns, iface, Some(l), None, Some(&n.bridge));
                }
            }
            // Made on the operator's interface (one of another VLAN ID made anew), which is
            // set up and otherwise left alone; its MTU is the interface's. No interface, no
            // step (the ports say it is missing).
            Uplink::Vlan(spec) => {
                if let Some(parent) = observed.links.get(&spec.parent) {
                    // Tagged frames pass only an interface that is up.
                    p.attributes(ns, &spec.parent, Some(parent), None, None);
                    let vlan = match observed.links.get(&spec.name) {
                        Some(l) if l.kind == LinkKind::Vlan(spec.id) => Some(l),
                        Some(_) => {
                            p.push(Op::DelLink(ns.clone(), spec.name.clone()));
                            None
                        }
                        None => None,
                    };
                    if vlan.is_none() {
                        p.push(Op::AddVlan(ns.clone(), spec.clone()));
                    }
                    p.attributes(ns, &spec.name, vlan, None, Some(&n.bridge));
                }
            }
        }

        if let Some(d) = &n.dhcp {
            wanted_links.insert(&d.veth);
            wanted_dhcp.insert(&d.spec.name);
            dhcp(&mut p, ns, n, d, observed);
        }

        // Every port that needs anything in one step: a driver pays its fixed cost per
        // step (a switch reconfigured, its flows written) once for the network.
        let mut attach = Vec::new();
        for port in &n.ports {
            wanted_links.insert(port);
            if let Some(l) = observed.links.get(port) {
                let a = Attach {
                    name: port.clone(),
                    mtu: (l.mtu != n.mtu).then_some(n.mtu),
                    master: l.master.as_ref() != Some(&n.bridge),
                    up: !l.up,
                };
                if a.mtu.is_some() || a.master || a.up {
                    attach.push(a);
                }
            }
        }
        if !attach.is_empty() {
            p.push(Op::AttachPorts(ns.clone(), n.bridge.clone(), attach));
        }
    }

    p.network = None;
    let mut wanted_routers: BTreeSet<&Name> = BTreeSet::new();
    for r in &desired.routers {
        p.router = Some(r.name.clone());
        wanted_routers.insert(&r.name);
        for i in &r.interfaces {
            wanted_links.insert(&i.veth);
        }
        router(&mut p, ns, r, observed);
    }
    p.router = None;
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
    // Routers moved away or deleted: their namespace, with the veths into it.
    for name in observed.routers.keys() {
        if !wanted_routers.contains(name) && is_router_name_of(&desired.node, name) {
            p.push(Op::DelNetns(name.clone()));
        }
    }
    // Left-over links: VXLAN devices, VLAN sub-interfaces and veths before the bridges
    // they are on.
    for prefix in ["vx", "vl", "ve", "br"] {
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

/// The steps of one router: its namespace, loopback up, forwarding, per interface the veth
/// (made anew when either end is missing), its MAC, addresses and attributes (up last),
/// then the routes (once every address they go through is in place) and the NAT table.
fn router(p: &mut Plan, ns: &Netns, r: &RouterWiring, observed: &ObservedHost) {
    let inner_ns = Netns::Named(r.name.clone());
    let inside = observed.routers.get(&r.name);
    if inside.is_none() {
        p.push(Op::AddNetns(r.name.clone()));
    }
    if let Ok(lo) = IfName::new("lo")
        && inside.and_then(|i| i.links.get(&lo)).is_none_or(|l| !l.up)
    {
        p.push(Op::SetUp(inner_ns.clone(), lo));
    }
    // Before any interface comes up: a router that moved announces its addresses (the
    // driver turns on gratuitous ARP with forwarding).
    if inside.is_none_or(|c| !c.forwarding) {
        p.push(Op::SetForwarding(inner_ns.clone()));
    }
    // Routes through an address the kernel dropped are gone with it.
    let mut readd_routes = false;
    for i in &r.interfaces {
        let veth = observed
            .links
            .get(&i.veth)
            .filter(|l| l.kind == LinkKind::Veth);
        let peer = inside
            .and_then(|c| c.links.get(&i.inner))
            .filter(|l| l.kind == LinkKind::Veth);
        let fresh = veth.is_none() || peer.is_none();
        if fresh {
            if observed.links.contains_key(&i.veth) {
                p.push(Op::DelLink(ns.clone(), i.veth.clone()));
            }
            if inside.is_some_and(|c| c.links.contains_key(&i.inner)) {
                p.push(Op::DelLink(inner_ns.clone(), i.inner.clone()));
            }
            p.push(Op::AddVeth(
                ns.clone(),
                VethSpec {
                    name: i.veth.clone(),
                    peer: i.inner.clone(),
                    peer_netns: Some(inner_ns.clone()),
                },
            ));
        }
        let (veth, peer) = if fresh { (None, None) } else { (veth, peer) };
        p.attributes(ns, &i.veth, veth, Some(i.mtu), Some(&i.bridge));
        if peer.is_none_or(|l| l.mac != Some(i.mac)) {
            p.push(Op::SetMac(inner_ns.clone(), i.inner.clone(), i.mac));
        }
        let have = if fresh {
            BTreeSet::new()
        } else {
            inside
                .and_then(|c| c.addresses.get(&i.inner))
                .cloned()
                .unwrap_or_default()
        };
        for a in have.difference(&i.addresses) {
            p.push(Op::DelAddress(inner_ns.clone(), i.inner.clone(), *a));
        }
        for a in i.addresses.difference(&have) {
            readd_routes = true;
            p.push(Op::AddAddress(inner_ns.clone(), i.inner.clone(), *a));
        }
        // Up once addressed, so that its coming up announces its address.
        p.attributes(&inner_ns, &i.inner, peer, Some(i.mtu), None);
    }
    let have = inside.map(|c| c.routes.clone()).unwrap_or_default();
    for route in have.difference(&r.routes) {
        p.push(Op::DelRoute(inner_ns.clone(), *route));
    }
    for route in &r.routes {
        if readd_routes || !have.contains(route) {
            p.push(Op::AddRoute(inner_ns.clone(), *route));
        }
    }
    // A table that cannot render is applied anyway, so that the driver's refusal is what
    // the router reports.
    let want = r.nat.observed().ok();
    if inside.is_none_or(|c| c.nat.is_none() || c.nat != want) {
        p.push(Op::ApplyNat(r.name.clone(), r.nat.clone()));
    }
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

    fn vx(n: &NetworkWiring) -> &VxlanSpec {
        match &n.uplink {
            Uplink::Vxlan(v) => v,
            Uplink::Physical(_) | Uplink::Vlan(_) => panic!("a provider network"),
        }
    }

    fn node() -> Netns {
        Netns::Host
    }

    fn network(uid: &str, ports: &[&str], dhcp: bool) -> NetworkWiring {
        let bridge = IfName::derived(Role::Bridge, uid);
        let dname = dhcp_name("n1", uid);
        NetworkWiring {
            bridge: bridge.clone(),
            uplink: Uplink::Vxlan(VxlanSpec {
                name: IfName::derived(Role::Vxlan, uid),
                vni: 100,
                local: Ipv4Addr::new(192, 0, 2, 1),
                port: VXLAN_PORT,
            }),
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
                    routes: Vec::new(),
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
            routers: vec![],
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
        for r in &d.routers {
            let lo = ifname("lo");
            let mut c = RouterContents {
                links: BTreeMap::from([(
                    lo.clone(),
                    link(&lo, LinkKind::Other(None), 65536, None),
                )]),
                routes: r.routes.clone(),
                forwarding: true,
                nat: Some(r.nat.observed().expect("nat")),
                ..RouterContents::default()
            };
            for i in &r.interfaces {
                o.links.insert(
                    i.veth.clone(),
                    link(&i.veth, LinkKind::Veth, i.mtu, Some(&i.bridge)),
                );
                c.links.insert(
                    i.inner.clone(),
                    Link {
                        mac: Some(i.mac),
                        ..link(&i.inner, LinkKind::Veth, i.mtu, None)
                    },
                );
                c.addresses.insert(i.inner.clone(), i.addresses.clone());
            }
            o.routers.insert(r.name.clone(), c);
        }
        for n in &d.networks {
            o.links.insert(
                n.bridge.clone(),
                link(&n.bridge, LinkKind::Bridge, 1450, None),
            );
            match &n.uplink {
                Uplink::Vxlan(v) => {
                    o.links.insert(
                        v.name.clone(),
                        link(&v.name, vxlan_info(v), n.mtu, Some(&n.bridge)),
                    );
                    o.fdb.insert(v.name.clone(), n.fdb.clone());
                }
                Uplink::Physical(i) => {
                    o.links
                        .insert(i.clone(), link(i, LinkKind::Veth, 9000, Some(&n.bridge)));
                }
                Uplink::Vlan(v) => {
                    o.links.insert(
                        v.parent.clone(),
                        link(&v.parent, LinkKind::Veth, 9000, None),
                    );
                    o.links.insert(
                        v.name.clone(),
                        link(&v.name, LinkKind::Vlan(v.id), 9000, Some(&n.bridge)),
                    );
                }
            }
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
        let add_vxlan = pos(&Op::AddVxlan(ns.clone(), vx(&n).clone()));
        let enslave = pos(&Op::SetMaster(
            ns.clone(),
            vx(&n).name.clone(),
            Some(n.bridge.clone()),
        ));
        let fdb = pos(&Op::SetFdb(ns.clone(), vx(&n).name.clone(), n.fdb.clone()));
        // The tap: its MTU, its bridge and up, in the network's one step for its ports.
        let tap_on = pos(&Op::AttachPorts(
            ns.clone(),
            n.bridge.clone(),
            vec![Attach {
                name: tap.clone(),
                mtu: Some(1450),
                master: true,
                up: true,
            }],
        ));
        assert!(add_bridge < add_vxlan && add_vxlan < enslave && add_vxlan < fdb);
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
        let mut d = desired(vec![n.clone()]);
        if let Some(f) = d.firewall.as_mut() {
            f.groups.push(crate::driver::nft::RemoteGroup {
                name: Name::new("g-members").expect("name"),
                members: BTreeSet::from([Ipv4Addr::new(10, 0, 0, 3), Ipv4Addr::new(10, 0, 0, 4)]),
            });
        }
        let ns = node();
        let dh = n.dhcp.clone().expect("dhcp");
        let ruleset = d.firewall.clone().expect("ruleset");
        let want = ruleset.observed().expect("observed");
        assert!(
            want.sets.values().any(|s| !s.is_empty()),
            "the fixture has a remote group with members"
        );
        let update = |delta: Delta| {
            Op::UpdateFirewall(Box::new(Update {
                ruleset: ruleset.clone(),
                want: want.clone(),
                delta,
            }))
        };
        type Case = (&'static str, fn(&mut ObservedHost, &NetworkWiring), Vec<Op>);
        let cases: Vec<Case> = vec![
            (
                "VXLAN device deleted by hand",
                |o, n| {
                    o.links.remove(&vx(n).name);
                    o.fdb.remove(&vx(n).name);
                },
                vec![
                    Op::AddVxlan(node(), vx(&n).clone()),
                    Op::SetMtu(node(), vx(&n).name.clone(), 1450),
                    Op::SetMaster(node(), vx(&n).name.clone(), Some(n.bridge.clone())),
                    Op::SetUp(node(), vx(&n).name.clone()),
                    Op::SetFdb(node(), vx(&n).name.clone(), n.fdb.clone()),
                ],
            ),
            (
                "an FDB entry deleted",
                |o, n| {
                    o.fdb.insert(vx(n).name.clone(), BTreeSet::new());
                },
                vec![Op::SetFdb(node(), vx(&n).name.clone(), n.fdb.clone())],
            ),
            (
                "the nft tables deleted",
                |o, _| o.firewall = None,
                vec![Op::ApplyFirewall(d.firewall.clone().expect("ruleset"))],
            ),
            (
                "a rule of the forward chain deleted: that chain is written again, alone",
                |o, _| {
                    if let Some(f) = o.firewall.as_mut() {
                        f.chains.get_mut("inet/forward").and_then(Vec::pop);
                    }
                },
                vec![update(Delta {
                    chains: BTreeSet::from(["inet/forward".to_owned()]),
                    ..Delta::default()
                })],
            ),
            (
                "a member's address deleted from a remote group's set: that element is added",
                |o, _| {
                    if let Some(f) = o.firewall.as_mut() {
                        f.sets.values_mut().for_each(|s| {
                            s.pop_last();
                        });
                    }
                },
                vec![update(Delta {
                    elements: want
                        .sets
                        .iter()
                        .filter_map(|(k, v)| {
                            let last = v.last()?.clone();
                            Some((k.clone(), (BTreeSet::from([last]), BTreeSet::new())))
                        })
                        .collect(),
                    ..Delta::default()
                })],
            ),
            (
                "a chain of a port gone is left: it is removed, and nothing else written",
                |o, _| {
                    if let Some(f) = o.firewall.as_mut() {
                        f.chains
                            .insert("inet/p-gone-in".into(), vec!["0123456789abcdef".into()]);
                        f.sets.insert("inet/g-gone".into(), BTreeSet::new());
                    }
                },
                vec![update(Delta {
                    del_chains: BTreeSet::from(["inet/p-gone-in".to_owned()]),
                    del_sets: BTreeSet::from(["inet/g-gone".to_owned()]),
                    ..Delta::default()
                })],
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
                vec![Op::AttachPorts(
                    node(),
                    n.bridge.clone(),
                    vec![Attach {
                        name: ifname("tp-a1"),
                        mtu: None,
                        master: true,
                        up: true,
                    }],
                )],
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
                        ..vx(n).clone()
                    };
                    if let Some(l) = o.links.get_mut(&vx(n).name) {
                        l.kind = vxlan_info(&other);
                    }
                },
                vec![
                    Op::DelLink(node(), vx(&n).name.clone()),
                    Op::AddVxlan(node(), vx(&n).clone()),
                    Op::SetMtu(node(), vx(&n).name.clone(), 1450),
                    Op::SetMaster(node(), vx(&n).name.clone(), Some(n.bridge.clone())),
                    Op::SetUp(node(), vx(&n).name.clone()),
                    Op::SetFdb(node(), vx(&n).name.clone(), n.fdb.clone()),
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
            vec![Op::SetFdb(ns.clone(), vx(&n).name.clone(), n.fdb.clone())]
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
        let dh = old.dhcp.clone().expect("dhcp");
        for gone in [
            Op::RemoveDhcp(dh.spec.name.clone()),
            Op::DelNetns(dh.spec.name.clone()),
            Op::DelLink(ns.clone(), vx(&old).name.clone()),
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
        // The filter changes in place: the old port's chains go, the new one's come, the
        // jumps to them are rewritten; nothing else is written.
        match &ops[0] {
            Op::UpdateFirewall(u) => {
                let d = &u.delta;
                assert!(
                    d.del_chains.len() == 2
                        && d.del_chains
                            .iter()
                            .all(|c| c.ends_with("-in") || c.ends_with("-out")),
                    "{d:?}"
                );
                assert!(d.chains.contains("inet/forward"), "{d:?}");
                assert!(d.chains.iter().all(|c| !d.del_chains.contains(c)), "{d:?}");
            }
            other => panic!("{other:?}"),
        }
    }

    /// A router on `n`'s bridge (10.0.0.1/24) with a gateway on a flat network's bridge
    /// (203.0.113.2/24, default route via .1), one floating address and SNAT.
    fn router(n: &NetworkWiring, ext: &NetworkWiring) -> RouterWiring {
        let fip = Ipv4Addr::new(203, 0, 113, 10);
        RouterWiring {
            name: router_name("n1", "uid-router"),
            interfaces: vec![
                RouterInterfaceWiring {
                    bridge: n.bridge.clone(),
                    veth: IfName::derived(Role::Veth, "router/uid-qr"),
                    inner: IfName::derived(Role::RouterPort, "uid-qr"),
                    mac: "02:00:00:00:01:01".parse().expect("mac"),
                    addresses: BTreeSet::from(["10.0.0.1/24".parse().expect("cidr")]),
                    mtu: 1450,
                },
                RouterInterfaceWiring {
                    bridge: ext.bridge.clone(),
                    veth: IfName::derived(Role::Veth, "router/uid-qg"),
                    inner: IfName::derived(Role::Gateway, "uid-qg"),
                    mac: "02:00:00:00:01:02".parse().expect("mac"),
                    addresses: BTreeSet::from([
                        "203.0.113.2/24".parse().expect("cidr"),
                        Ipv4Cidr::new(fip, 32).expect("cidr"),
                    ]),
                    mtu: 1500,
                },
            ],
            routes: BTreeSet::from([RouteSpec::new(
                "0.0.0.0/0".parse().expect("cidr"),
                Ipv4Addr::new(203, 0, 113, 1),
            )]),
            nat: Nat {
                gateway: Some(IfName::derived(Role::Gateway, "uid-qg")),
                floating: vec![crate::driver::nft::FloatingNat {
                    floating: fip,
                    fixed: Ipv4Addr::new(10, 0, 0, 5),
                }],
                snat: vec![crate::driver::nft::Snat {
                    source: "10.0.0.0/24".parse().expect("cidr"),
                    to: Ipv4Addr::new(203, 0, 113, 2),
                }],
            },
        }
    }

    /// A flat network on `eth1`.
    fn flat(uid: &str) -> NetworkWiring {
        NetworkWiring {
            uplink: Uplink::Physical(ifname("eth1")),
            fdb: BTreeSet::new(),
            mtu: 1500,
            ..network(uid, &[], false)
        }
    }

    /// A vlan network on `eth1` with VLAN ID `id`.
    fn vlan(uid: &str, id: u16) -> NetworkWiring {
        NetworkWiring {
            uplink: Uplink::Vlan(VlanSpec {
                name: IfName::derived(Role::Vlan, uid),
                parent: ifname("eth1"),
                id,
            }),
            fdb: BTreeSet::new(),
            mtu: 1500,
            ..network(uid, &[], false)
        }
    }

    fn with_router() -> (Desired, RouterWiring) {
        let (n, ext) = (network("net-a", &["tp-a1"], true), flat("ext"));
        let r = router(&n, &ext);
        let mut d = desired(vec![n, ext]);
        d.routers = vec![r.clone()];
        (d, r)
    }

    #[test]
    fn a_router_is_built_in_order_and_a_right_one_needs_nothing() {
        let (d, r) = with_router();
        let mut o = right(&d);
        assert_eq!(plan(&d, &o), vec![], "a host that is right");
        o.routers.clear();
        for i in &r.interfaces {
            o.links.remove(&i.veth);
        }
        let steps = plan(&d, &o);
        assert!(
            steps.iter().all(|s| s.router.as_ref() == Some(&r.name)),
            "{steps:?}"
        );
        let all = ops(&steps);
        let pos = |op: &Op| all.iter().position(|o| o == op).expect("step present");
        let inner = Netns::Named(r.name.clone());
        let qr = &r.interfaces[0];
        let netns = pos(&Op::AddNetns(r.name.clone()));
        let veth = pos(&Op::AddVeth(
            node(),
            VethSpec {
                name: qr.veth.clone(),
                peer: qr.inner.clone(),
                peer_netns: Some(inner.clone()),
            },
        ));
        let on_bridge = pos(&Op::SetMaster(
            node(),
            qr.veth.clone(),
            Some(qr.bridge.clone()),
        ));
        let mac = pos(&Op::SetMac(inner.clone(), qr.inner.clone(), qr.mac));
        let up = pos(&Op::SetUp(inner.clone(), qr.inner.clone()));
        let gw = &r.interfaces[1];
        let fip = pos(&Op::AddAddress(
            inner.clone(),
            gw.inner.clone(),
            "203.0.113.10/32".parse().expect("cidr"),
        ));
        let route = pos(&Op::AddRoute(
            inner.clone(),
            *r.routes.first().expect("route"),
        ));
        let nat = pos(&Op::ApplyNat(r.name.clone(), r.nat.clone()));
        assert!(netns < veth && veth < on_bridge && veth < mac && mac < up);
        assert!(fip < route && route < nat);
        assert!(all.contains(&Op::SetForwarding(inner.clone())));
        let mut after = right(&d);
        after.routers.get_mut(&r.name).expect("router").nat = None;
        assert_eq!(
            ops(&plan(&d, &after)),
            vec![Op::ApplyNat(r.name.clone(), r.nat.clone())],
            "a NAT table deleted by hand is applied again, nothing else"
        );
    }

    #[test]
    fn router_drift_is_repaired_with_exactly_the_missing_steps() {
        let (d, r) = with_router();
        let inner = Netns::Named(r.name.clone());
        let gw = &r.interfaces[1];
        let fip: Ipv4Cidr = "203.0.113.10/32".parse().expect("cidr");
        type Drift = fn(&mut ObservedHost, &RouterWiring);
        let cases: Vec<(&str, Drift, Vec<Op>)> = vec![
            (
                "a floating address removed",
                |o, r| {
                    let c = o.routers.get_mut(&r.name).expect("router");
                    let fip: Ipv4Cidr = "203.0.113.10/32".parse().expect("cidr");
                    c.addresses
                        .get_mut(&r.interfaces[1].inner)
                        .expect("addresses")
                        .remove(&fip);
                },
                vec![
                    Op::AddAddress(inner.clone(), gw.inner.clone(), fip),
                    Op::AddRoute(inner.clone(), *r.routes.first().expect("route")),
                ],
            ),
            (
                "forwarding turned off",
                |o, r| o.routers.get_mut(&r.name).expect("router").forwarding = false,
                vec![Op::SetForwarding(inner.clone())],
            ),
            (
                "the forward filter's drop rule deleted",
                |o, r| {
                    let c = o.routers.get_mut(&r.name).expect("router");
                    let table = c.nat.as_mut().expect("table");
                    table.chains.get_mut("ip/forward").expect("chain").pop();
                },
                vec![Op::ApplyNat(r.name.clone(), r.nat.clone())],
            ),
            (
                "the forward filter deleted",
                |o, r| {
                    let c = o.routers.get_mut(&r.name).expect("router");
                    let table = c.nat.as_mut().expect("table");
                    table.chains.remove("ip/forward");
                },
                vec![Op::ApplyNat(r.name.clone(), r.nat.clone())],
            ),
            (
                "the default route removed, another added",
                |o, r| {
                    let c = o.routers.get_mut(&r.name).expect("router");
                    c.routes = BTreeSet::from([RouteSpec::new(
                        "10.9.0.0/16".parse().expect("cidr"),
                        Ipv4Addr::new(10, 0, 0, 9),
                    )]);
                },
                vec![
                    Op::DelRoute(
                        inner.clone(),
                        RouteSpec::new(
                            "10.9.0.0/16".parse().expect("cidr"),
                            Ipv4Addr::new(10, 0, 0, 9),
                        ),
                    ),
                    Op::AddRoute(inner.clone(), *r.routes.first().expect("route")),
                ],
            ),
        ];
        for (what, drift, want) in cases {
            let mut o = right(&d);
            drift(&mut o, &r);
            assert_eq!(ops(&plan(&d, &o)), want, "{what}");
        }
        // The router's veth deleted by hand: made again, with everything on it.
        let mut o = right(&d);
        o.links.remove(&gw.veth);
        o.routers
            .get_mut(&r.name)
            .expect("router")
            .links
            .remove(&gw.inner);
        let ops = ops(&plan(&d, &o));
        assert!(ops.contains(&Op::AddAddress(inner.clone(), gw.inner.clone(), fip)));
        assert!(ops.contains(&Op::SetMac(inner.clone(), gw.inner.clone(), gw.mac)));
        assert!(ops.contains(&Op::AddRoute(inner, *r.routes.first().expect("route"))));
    }

    #[test]
    fn a_router_moved_away_leaves_no_namespace_and_another_nodes_is_left_alone() {
        let (d, r) = with_router();
        let mut o = right(&d);
        let other = router_name("n2", "uid-router");
        o.routers.insert(other.clone(), RouterContents::default());
        let mut gone = d.clone();
        gone.routers.clear();
        let ops = ops(&plan(&gone, &o));
        assert!(ops.contains(&Op::DelNetns(r.name.clone())), "{ops:?}");
        for i in &r.interfaces {
            assert!(
                ops.contains(&Op::DelLink(node(), i.veth.clone())),
                "{ops:?}"
            );
        }
        assert!(!ops.contains(&Op::DelNetns(other)));
        assert!(is_router_name_of("n1", &r.name) && !is_router_name_of("n2", &r.name));
    }

    #[test]
    fn a_flat_network_enslaves_its_physical_interface_and_never_creates_or_deletes_it() {
        let ext = flat("ext");
        let d = desired(vec![ext.clone()]);
        let mut o = right(&d);
        // The operator's interface is there, on no bridge.
        let eth1 = ifname("eth1");
        o.links
            .insert(eth1.clone(), link(&eth1, LinkKind::Veth, 1500, None));
        assert_eq!(
            ops(&plan(&d, &o)),
            vec![Op::SetMaster(
                node(),
                eth1.clone(),
                Some(ext.bridge.clone())
            )]
        );
        // Absent: no step makes it.
        o.links.remove(&eth1);
        assert_eq!(plan(&d, &o), vec![]);
        // The network gone: its bridge is deleted, the interface is not.
        let mut o = right(&d);
        o.links.insert(
            eth1.clone(),
            link(&eth1, LinkKind::Veth, 1500, Some(&ext.bridge)),
        );
        let ops = ops(&plan(&desired(vec![]), &o));
        assert!(ops.contains(&Op::DelLink(node(), ext.bridge.clone())));
        assert!(
            !ops.iter()
                .any(|op| matches!(op, Op::DelLink(_, n) if *n == eth1))
        );
    }

    #[test]
    fn a_vlan_network_makes_its_sub_interface_on_the_physical_one_and_repairs_it() {
        let n = vlan("net-v", 100);
        let Uplink::Vlan(spec) = n.uplink.clone() else {
            unreachable!()
        };
        let d = desired(vec![n.clone()]);
        let eth1 = ifname("eth1");
        let down_eth1 = |o: &mut ObservedHost| {
            o.links.insert(
                eth1.clone(),
                Link {
                    up: false,
                    ..link(&eth1, LinkKind::Veth, 1500, None)
                },
            );
        };
        // (what the host has, the uplink steps wanted)
        type Case = (&'static str, fn(&mut ObservedHost), Vec<Op>);
        let make = vec![
            Op::AddVlan(node(), spec.clone()),
            Op::SetMaster(node(), spec.name.clone(), Some(n.bridge.clone())),
            Op::SetUp(node(), spec.name.clone()),
        ];
        let cases: Vec<Case> = vec![
            ("right", |_| {}, vec![]),
            (
                "deleted by hand",
                |o| {
                    o.links.retain(|k, _| !is_derived(k, "vl"));
                },
                make.clone(),
            ),
            (
                "another VLAN ID under its name",
                |o| {
                    for l in o.links.values_mut() {
                        if is_derived(&l.name, "vl") {
                            l.kind = LinkKind::Vlan(200);
                        }
                    }
                },
                [vec![Op::DelLink(node(), spec.name.clone())], make.clone()].concat(),
            ),
            (
                "taken off the bridge",
                |o| {
                    for l in o.links.values_mut() {
                        if is_derived(&l.name, "vl") {
                            l.master = None;
                        }
                    }
                },
                vec![Op::SetMaster(
                    node(),
                    spec.name.clone(),
                    Some(n.bridge.clone()),
                )],
            ),
            (
                "no physical interface: nothing made",
                |o| {
                    o.links
                        .retain(|k, _| k.as_str() != "eth1" && !is_derived(k, "vl"));
                },
                vec![],
            ),
        ];
        for (what, change, want) in cases {
            let mut o = right(&d);
            change(&mut o);
            assert_eq!(ops(&plan(&d, &o)), want, "{what}");
        }
        // A physical interface that is down is set up, and otherwise left alone.
        let mut o = right(&d);
        down_eth1(&mut o);
        assert_eq!(ops(&plan(&d, &o)), vec![Op::SetUp(node(), eth1.clone())]);
        // The network gone: its sub-interface is deleted, the physical interface is not.
        let gone = ops(&plan(&desired(vec![]), &right(&d)));
        assert!(
            gone.contains(&Op::DelLink(node(), spec.name.clone())),
            "{gone:?}"
        );
        assert!(
            !gone
                .iter()
                .any(|op| matches!(op, Op::DelLink(_, l) if *l == eth1)),
            "{gone:?}"
        );
        // Two networks of two VLANs on one interface: one sub-interface each.
        let m = vlan("net-w", 200);
        let d2 = desired(vec![n.clone(), m.clone()]);
        let mut o = right(&d2);
        o.links.retain(|k, _| !is_derived(k, "vl"));
        let adds: Vec<Op> = ops(&plan(&d2, &o))
            .into_iter()
            .filter(|op| matches!(op, Op::AddVlan(..)))
            .collect();
        assert_eq!(adds.len(), 2, "{adds:?}");
        assert_ne!(m.uplink.name(), n.uplink.name());
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
                Op::DelLink(node(), vx(&n).name.clone()),
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
    fn a_networks_ports_are_attached_in_one_step_naming_only_what_differs() {
        let names: Vec<String> = (0..50).map(|i| format!("tp-{i}")).collect();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let n = network("net-a", &refs, false);
        let d = desired(vec![n.clone()]);
        let mut o = right(&d);
        // Every port off its bridge (a switch that lost its flows reads so), one also down,
        // another with the wrong MTU too.
        for l in o.links.values_mut() {
            if l.kind == LinkKind::Tun {
                l.master = None;
            }
        }
        if let Some(l) = o.links.get_mut(&ifname("tp-7")) {
            l.up = false;
        }
        if let Some(l) = o.links.get_mut(&ifname("tp-9")) {
            l.mtu = 1500;
        }
        let steps = plan(&d, &o);
        assert_eq!(steps.len(), 1, "{steps:?}");
        let Op::AttachPorts(ns, bridge, attach) = &steps[0].op else {
            panic!("{steps:?}");
        };
        assert_eq!((ns, bridge), (&node(), &n.bridge));
        assert_eq!(attach.len(), 50);
        for a in attach {
            let want = Attach {
                name: a.name.clone(),
                mtu: (a.name.as_str() == "tp-9").then_some(1450),
                master: true,
                up: a.name.as_str() == "tp-7",
            };
            assert_eq!(*a, want);
        }
        // Only the one that is down: the step names it alone.
        let mut o = right(&d);
        if let Some(l) = o.links.get_mut(&ifname("tp-3")) {
            l.up = false;
        }
        assert_eq!(
            ops(&plan(&d, &o)),
            vec![Op::AttachPorts(
                node(),
                n.bridge.clone(),
                vec![Attach {
                    name: ifname("tp-3"),
                    mtu: None,
                    master: false,
                    up: true,
                }]
            )]
        );
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
