//! The network driver: what the agent asks of the node's kernel and daemons, each behind a
//! trait with a real implementation and an in-memory fake that pass one
//! [`conformance`] suite: [`Links`] (namespaces, bridges, VXLAN, veth, addresses, FDB over
//! rtnetlink: [`netlink::NetlinkLinks`]; or the networks on an Open vSwitch integration
//! bridge: [`ovs::OvsLinks`]), [`Firewall`] (the node's nftables ruleset:
//! [`nft::NftFirewall`]) and [`Dhcp`] (static-lease DHCP servers: [`dnsmasq::Dnsmasq`]).
//! Blocking calls; the agent runs them on tokio's blocking pool.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

#[cfg(any(test, feature = "conformance"))]
pub mod conformance;
pub mod conntrack;
pub mod dnsmasq;
pub mod fake;
pub mod libnft;
pub mod names;
pub mod netlink;
pub mod netns;
pub mod nft;
mod nft_text;
pub mod ovs;
pub mod ovs_daemon;
pub mod ovs_firewall;
pub mod ovs_flows;

#[cfg(test)]
pub(crate) mod host_tests;
#[cfg(test)]
mod ovs_host_tests;

pub use dnsmasq::{DhcpError, DhcpSpec, DhcpStatus, StaticLease};
pub use names::{IfName, Ipv4Cidr, MacAddr, Name, NameError, Netns, Role};
pub use nft::{Delta, FirewallError, Nat, Observed, Ruleset, Update};

/// The UDP port of VXLAN (IANA).
pub const VXLAN_PORT: u16 = 4789;

/// What kind of device a link is, with what identifies it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkKind {
    /// A Linux bridge.
    Bridge,
    /// A VXLAN device.
    Vxlan(VxlanInfo),
    /// A VLAN sub-interface (802.1Q) with its VLAN ID.
    Vlan(u16),
    /// One end of a veth pair.
    Veth,
    /// A tun/tap device.
    Tun,
    /// Any other kind (`None` for devices without one, such as `lo`).
    Other(Option<String>),
}

/// A VXLAN device's identity, as the kernel reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VxlanInfo {
    /// The VXLAN network identifier.
    pub vni: u32,
    /// The underlay address it sends from.
    pub local: Option<Ipv4Addr>,
    /// The UDP destination port.
    pub port: u16,
    /// Whether it learns remote MACs from traffic (Stratus's never do).
    pub learning: bool,
}

/// A link as the kernel has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    /// Its name.
    pub name: IfName,
    /// Its kind.
    pub kind: LinkKind,
    /// Its MTU.
    pub mtu: u32,
    /// Administratively up.
    pub up: bool,
    /// The bridge it is a port of.
    pub master: Option<IfName>,
    /// Its hardware address.
    pub mac: Option<MacAddr>,
}

/// A VXLAN device to create: no learning, attached to nothing yet (see [`Links::set_master`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VxlanSpec {
    /// Its name.
    pub name: IfName,
    /// The VXLAN network identifier (24 bits).
    pub vni: u32,
    /// The node's underlay address.
    pub local: Ipv4Addr,
    /// The UDP destination port, [`VXLAN_PORT`] unless a test needs another.
    pub port: u16,
}

/// A VLAN sub-interface to create: frames it sends leave `parent` tagged with `id` (802.1Q),
/// and frames `parent` receives with that tag arrive on it. Down, attached to nothing yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VlanSpec {
    /// Its name.
    pub name: IfName,
    /// The interface it is a sub-interface of (in the same namespace).
    pub parent: IfName,
    /// The VLAN ID (1-4094).
    pub id: u16,
}

/// A veth pair to create: `name` in the namespace the call names, `peer` in `peer_netns`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VethSpec {
    /// The end that stays.
    pub name: IfName,
    /// The other end.
    pub peer: IfName,
    /// Where the other end goes; `None` keeps it beside `name`.
    pub peer_netns: Option<Netns>,
}

/// A link to make a port of a bridge, up, with what of it differs now (see
/// [`Links::attach`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attach {
    /// The link.
    pub name: IfName,
    /// The MTU to set, when it differs.
    pub mtu: Option<u32>,
    /// Whether it is on another bridge or none.
    pub master: bool,
    /// Whether it is down.
    pub up: bool,
}

/// A static FDB entry of a VXLAN device: frames for `mac` go to the VTEP at `remote`.
/// With [`MacAddr::ZERO`], broadcast, unknown unicast and multicast frames go to `remote`
/// (one entry per remote: head-end replication).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FdbEntry {
    /// The destination MAC.
    pub mac: MacAddr,
    /// The remote VTEP's underlay address.
    pub remote: Ipv4Addr,
}

/// A route through a gateway in a namespace's main table (IPv4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RouteSpec {
    /// Where to: its address is the network's (host bits clear).
    pub destination: Ipv4Cidr,
    /// The next hop, on a directly connected prefix.
    pub gateway: Ipv4Addr,
}

impl RouteSpec {
    /// The route to `destination` (its host bits cleared) via `gateway`.
    pub fn new(destination: Ipv4Cidr, gateway: Ipv4Addr) -> Self {
        let network =
            Ipv4Cidr::new(destination.network(), destination.prefix()).unwrap_or(destination);
        Self {
            destination: network,
            gateway,
        }
    }
}

impl std::fmt::Display for RouteSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} via {}", self.destination, self.gateway)
    }
}

/// Failures of a [`Links`] call.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The namespace does not exist.
    #[error("no network namespace {0}")]
    NoNetns(Netns),
    /// The link does not exist.
    #[error("no link {name} in {netns}")]
    NoLink {
        /// Where it was looked for.
        netns: Netns,
        /// Its name.
        name: IfName,
    },
    /// A link of that name exists and is not what was asked for.
    #[error("link {name} in {netns} exists and differs: {found}")]
    Conflict {
        /// Where.
        netns: Netns,
        /// Its name.
        name: IfName,
        /// What it is instead.
        found: String,
    },
    /// The request is not valid whatever the host has (a VNI over 24 bits, MTU 0).
    #[error("invalid request: {0}")]
    Invalid(String),
    /// The kernel refused or failed a netlink request.
    #[error("netlink: {what}")]
    Netlink {
        /// What was being done.
        what: String,
        /// The kernel's answer.
        #[source]
        source: rtnetlink::Error,
    },
    /// A system call or command failed.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A failure injected into a fake.
    #[error("injected failure of {0}")]
    Injected(&'static str),
}

/// The node's links: network namespaces, and in each, bridges, VXLAN devices, veth pairs,
/// their addresses and the VXLAN devices' FDB. [`netlink::NetlinkLinks`] (rtnetlink) or
/// [`fake::FakeLinks`].
///
/// # Guarantees (every implementation; [`conformance::links`] checks them)
///
/// - Every verb whose goal already holds succeeds and changes nothing: `add_netns` of a
///   present namespace, `add_bridge`/`add_vxlan`/`add_veth` of a present link with the same
///   identity (kind; VNI, local address, port, no learning; the veth's kind), `del_*` of an
///   absent one, `set_*` to the current value, `add_address` of a present address,
///   `set_fdb` to the current set.
/// - Creating a link whose name is taken by one with another identity is
///   [`LinkError::Conflict`] and leaves it alone; mutable attributes (MTU, master, up) are
///   never a conflict and are only changed by their own verbs.
/// - In a namespace that does not exist every verb but `del_netns` is
///   [`LinkError::NoNetns`]; every verb naming an absent link but `link` (which says
///   `Ok(None)`) and `del_link` is [`LinkError::NoLink`].
/// - Reads say what the kernel has now (nothing is remembered between calls), so they show
///   drift made behind the driver's back; only within a batch ([`Links::begin`]) may a read
///   be answered from what the batch read or wrote before.
/// - `set_fdb` makes a VXLAN device's static remote entries exactly the given set: missing
///   ones are added, others removed, the rest untouched (no gap in forwarding).
/// - `routes` lists the namespace's IPv4 routes through a gateway in its main table (the
///   connected routes its addresses make are not listed); `add_route` of a gateway no
///   address of the namespace reaches is refused; both route verbs are idempotent.
/// - `set_forwarding` sets the namespace's `net.ipv4.ip_forward`, which `forwarding` reads
///   (turned on, it also has interfaces announce their address by gratuitous ARP when they
///   come up).
pub trait Links: Send + Sync + 'static {
    /// Creates a named network namespace (as `ip netns add`).
    fn add_netns(&self, name: &Name) -> Result<(), LinkError>;
    /// Deletes a named namespace and every link in it (as `ip netns del`).
    fn del_netns(&self, name: &Name) -> Result<(), LinkError>;
    /// The named namespaces present.
    fn list_netns(&self) -> Result<BTreeSet<Name>, LinkError>;
    /// Every link in `ns`.
    fn links(&self, ns: &Netns) -> Result<Vec<Link>, LinkError>;
    /// One link.
    fn link(&self, ns: &Netns, name: &IfName) -> Result<Option<Link>, LinkError>;
    /// Creates a bridge (down).
    fn add_bridge(&self, ns: &Netns, name: &IfName) -> Result<(), LinkError>;
    /// Creates a VXLAN device (down, no learning).
    fn add_vxlan(&self, ns: &Netns, spec: &VxlanSpec) -> Result<(), LinkError>;
    /// Creates a VLAN sub-interface of an existing link (down). Idempotent: one of that name
    /// with the same VLAN ID is `Ok`; anything else of that name is a conflict. A driver
    /// without VLAN sub-interfaces refuses it as invalid.
    fn add_vlan(&self, ns: &Netns, spec: &VlanSpec) -> Result<(), LinkError> {
        let _ = ns;
        Err(LinkError::Invalid(format!(
            "VLAN sub-interface {}: not supported by this datapath",
            spec.name
        )))
    }
    /// Creates a veth pair (both ends down), the peer in its namespace.
    fn add_veth(&self, ns: &Netns, spec: &VethSpec) -> Result<(), LinkError>;
    /// Deletes a link (a veth's peer goes with it).
    fn del_link(&self, ns: &Netns, name: &IfName) -> Result<(), LinkError>;
    /// Makes `name` a port of the bridge `master`, or of none.
    fn set_master(
        &self,
        ns: &Netns,
        name: &IfName,
        master: Option<&IfName>,
    ) -> Result<(), LinkError>;
    /// Starts a batch of calls (a converge: its reads, its steps, its reads again), which
    /// ends with [`end`](Self::end). Until then a driver may answer a read from what it
    /// read or wrote earlier in the batch, and hold back work its changes share (an Open
    /// vSwitch driver writes its tunnels and flows once) until [`flush`](Self::flush).
    /// Outside a batch every read is the host's now. By default, nothing.
    fn begin(&self) {}
    /// Does what the batch held back; a change held back that fails fails here.
    fn flush(&self) -> Result<(), LinkError> {
        Ok(())
    }
    /// Ends the batch (what is still held back is dropped: the next converge finds it
    /// missing).
    fn end(&self) {}
    /// Makes each of `links` a port of the bridge `bridge`, up, with its MTU: for each, in
    /// order, `set_mtu` (when [`Attach::mtu`] says), `set_master` (when [`Attach::master`])
    /// and `set_up` (when [`Attach::up`]), as those verbs would, stopping at the first
    /// failure. One call for many links, so that a driver whose every change has a fixed
    /// cost (a switch reconfigured, flows written) pays it once for all of them; a link
    /// already as asked is left alone.
    fn attach(&self, ns: &Netns, bridge: &IfName, links: &[Attach]) -> Result<(), LinkError> {
        attach_each(self, ns, bridge, links)
    }
    /// Sets the link administratively up or down.
    fn set_up(&self, ns: &Netns, name: &IfName, up: bool) -> Result<(), LinkError>;
    /// Sets the MTU.
    fn set_mtu(&self, ns: &Netns, name: &IfName, mtu: u32) -> Result<(), LinkError>;
    /// The link's IPv4 addresses.
    fn addresses(&self, ns: &Netns, name: &IfName) -> Result<BTreeSet<Ipv4Cidr>, LinkError>;
    /// Adds an IPv4 address.
    fn add_address(&self, ns: &Netns, name: &IfName, addr: Ipv4Cidr) -> Result<(), LinkError>;
    /// Removes an IPv4 address.
    fn del_address(&self, ns: &Netns, name: &IfName, addr: Ipv4Cidr) -> Result<(), LinkError>;
    /// A VXLAN device's static entries that name a remote VTEP.
    fn fdb(&self, ns: &Netns, vxlan: &IfName) -> Result<BTreeSet<FdbEntry>, LinkError>;
    /// Makes those entries exactly `entries`.
    fn set_fdb(
        &self,
        ns: &Netns,
        vxlan: &IfName,
        entries: &BTreeSet<FdbEntry>,
    ) -> Result<(), LinkError>;
    /// Sets a link's hardware address.
    fn set_mac(&self, ns: &Netns, name: &IfName, mac: MacAddr) -> Result<(), LinkError>;
    /// The namespace's IPv4 routes through a gateway (main table).
    fn routes(&self, ns: &Netns) -> Result<BTreeSet<RouteSpec>, LinkError>;
    /// Adds a route through a gateway.
    fn add_route(&self, ns: &Netns, route: &RouteSpec) -> Result<(), LinkError>;
    /// Removes a route through a gateway.
    fn del_route(&self, ns: &Netns, route: &RouteSpec) -> Result<(), LinkError>;
    /// Whether the namespace forwards IPv4 (`net.ipv4.ip_forward`).
    fn forwarding(&self, ns: &Netns) -> Result<bool, LinkError>;
    /// Turns IPv4 forwarding in the namespace on or off.
    fn set_forwarding(&self, ns: &Netns, on: bool) -> Result<(), LinkError>;
}

/// [`Links::attach`] verb by verb: for each of `links`, in order, `set_mtu`, `set_master`
/// and `set_up` as it asks, stopping at the first failure. What `attach` does by default,
/// and what a batching driver does with links it cannot batch.
pub fn attach_each<L: Links + ?Sized>(
    l: &L,
    ns: &Netns,
    bridge: &IfName,
    links: &[Attach],
) -> Result<(), LinkError> {
    for a in links {
        if let Some(mtu) = a.mtu {
            l.set_mtu(ns, &a.name, mtu)?;
        }
        if a.master {
            l.set_master(ns, &a.name, Some(bridge))?;
        }
        if a.up {
            l.set_up(ns, &a.name, true)?;
        }
    }
    Ok(())
}

/// The node's packet filter: one ruleset (security groups, anti-spoofing, conntrack zones)
/// that replaces the one before as a whole. [`nft::NftFirewall`] or [`fake::FakeFirewall`].
///
/// # Guarantees (every implementation; [`conformance::firewall`] checks them)
///
/// - `apply` replaces whatever Stratus's tables held by `ruleset` in one transaction:
///   packets see the old ruleset or the new one, never a mix or none; applying the same
///   ruleset again changes nothing. A ruleset that fails [`Ruleset::validate`] is
///   [`FirewallError::Invalid`] and leaves the kernel as it was.
/// - `update` makes the tables `update.ruleset` in one transaction that writes only what
///   `update.delta` names (the chains that differ, the set elements that differ), given
///   tables that read as the `have` the delta was computed from; the tables then read as
///   `update.want`. Packets see the old tables or the new ones, never a mix.
/// - `read` says what the kernel has now as an [`Observed`] digest (chains, the identity of
///   each rule, set elements), equal to [`Ruleset::observed`] of the last ruleset applied
///   unless someone changed the tables since; `None` when the tables are absent.
/// - `clear` removes the tables; of absent tables it is `Ok(())`.
/// - `apply_nat` replaces a router namespace's NAT table ([`Nat`]) in one transaction, as
///   `apply` does the node's; `read_nat` reads it back as [`Nat::observed`] digests it
///   (`None` when absent). A router's table goes with its namespace.
/// - `forget` lists each zone a [`conntrack::Keep`] names once in the datapath's connection
///   tracker and deletes the connections the filter no longer allows (established traffic
///   is accepted before any rule, so a connection a removed rule allowed lives on until it
///   is forgotten); every one is tried whatever failed before, none to delete is `Ok(())`.
pub trait Firewall: Send + Sync + 'static {
    /// Replaces the node's tables by `ruleset`.
    fn apply(&self, ruleset: &Ruleset) -> Result<(), FirewallError>;
    /// Changes only what differs in the node's tables.
    fn update(&self, update: &Update) -> Result<(), FirewallError>;
    /// What the kernel has.
    fn read(&self) -> Result<Option<Observed>, FirewallError>;
    /// Removes the tables.
    fn clear(&self) -> Result<(), FirewallError>;
    /// Replaces the NAT table of the router namespace `netns` by `nat`.
    fn apply_nat(&self, netns: &Name, nat: &Nat) -> Result<(), FirewallError>;
    /// The NAT table of the router namespace `netns`.
    fn read_nat(&self, netns: &Name) -> Result<Option<Observed>, FirewallError>;
    /// Forgets the tracked connections of the ports `keep` names that it no longer allows.
    fn forget(&self, keep: &conntrack::Keep) -> Result<(), FirewallError>;
}

/// DHCP servers handing out static leases only, one per network: [`dnsmasq::Dnsmasq`] or
/// [`fake::FakeDhcp`].
///
/// # Guarantees (every implementation; [`conformance::dhcp`] checks them)
///
/// - `ensure` leaves one server running for `spec.name` serving exactly `spec`: it starts one
///   if none runs (adopting one a previous agent started), reloads the running one in place
///   (same process) when only the leases changed, restarts it when anything else changed,
///   and does nothing when all is as asked. A spec that fails [`DhcpSpec::validate`] is
///   [`DhcpError::Invalid`] and changes nothing.
/// - `status` says whether the server runs (its pid) and the leases it serves, read from the
///   host; `None` when the network has no server.
/// - `remove` stops the server and removes its files; of an absent one it is `Ok(())`.
pub trait Dhcp: Send + Sync + 'static {
    /// Makes the network's server serve `spec`.
    fn ensure(&self, spec: &DhcpSpec) -> Result<(), DhcpError>;
    /// The network's server, if any.
    fn status(&self, name: &Name) -> Result<Option<DhcpStatus>, DhcpError>;
    /// The networks that have a server (running or not).
    fn list(&self) -> Result<BTreeSet<Name>, DhcpError>;
    /// Stops and forgets the network's server.
    fn remove(&self, name: &Name) -> Result<(), DhcpError>;
}
