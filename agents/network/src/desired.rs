//! The node's [`Desired`] state from the API's objects (Ports placed on the node, their
//! Networks, Subnets and SecurityGroups, and the Hypervisors that are the other VXLAN tunnel
//! endpoints), and for each of the node's ports whether it can be wired and if not why.
//! Pure: every name and address is parsed into the drivers' types here, and what does not
//! parse keeps its port from being wired (with the reason) rather than reaching the host.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::sync::Arc;

use k8s_openapi::api::coordination::v1::Lease;
use kube::ResourceExt;
use stratus_api_types::common::Reason;
use stratus_api_types::compute::Hypervisor;
use stratus_api_types::network::{
    Direction, EtherType, FloatingIP, NETWORK_AGENT_LEASE_NAMESPACE, Network, Port,
    Protocol as ApiProtocol, Router, SecurityGroup, SecurityGroupRule, Segmentation, Subnet,
    TUNNEL_IP_ANNOTATION,
};

use crate::driver::names::digest_hex;
use crate::driver::nft::{
    FloatingNat, GroupRef, LocalDhcp, PortFilter, PortRange, Protocol, Remote, RemoteGroup, Rule,
    Snat, Tunnel, Zone,
};
use crate::driver::{
    DhcpSpec, FdbEntry, IfName, Ipv4Cidr, MacAddr, Name, Nat, Netns, Role, RouteSpec, Ruleset,
    StaticLease, VXLAN_PORT, VlanSpec, VxlanSpec,
};
use crate::plan::{
    Desired, DhcpWiring, NetworkWiring, RouterInterfaceWiring, RouterWiring, Uplink, dhcp_name,
    router_name,
};

/// The security group a port without `spec.securityGroups` is in.
pub const DEFAULT_GROUP: &str = "default";

/// How long a DHCP lease lasts.
pub const LEASE_SECS: u32 = 3600;

/// Who this node is, as far as its networks go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeConfig {
    /// The node's name (`Port.status.hypervisor` of the ports placed on it).
    pub node: String,
    /// Where its bridges and VXLAN devices live.
    pub netns: Netns,
    /// The address its VXLAN devices send from; `None` takes the node's Hypervisor's
    /// `status.hostIP`.
    pub underlay: Option<Ipv4Addr>,
    /// Its interfaces for flat provider networks, by physical network name.
    pub physical: BTreeMap<String, IfName>,
}

/// The objects the node's desired state is made of, as the agent's caches hold them.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Every Port the agent sees (its own and the other ports of its networks).
    pub ports: Vec<Arc<Port>>,
    /// Networks.
    pub networks: Vec<Arc<Network>>,
    /// Subnets.
    pub subnets: Vec<Arc<Subnet>>,
    /// Hypervisors (the other nodes' tunnel endpoints).
    pub hypervisors: Vec<Arc<Hypervisor>>,
    /// Security groups.
    pub groups: Vec<Arc<SecurityGroup>>,
    /// The Routers placed on the node.
    pub routers: Vec<Arc<Router>>,
    /// The FloatingIPs of those routers.
    pub floating_ips: Vec<Arc<FloatingIP>>,
    /// The network agents' Leases (their tunnel addresses).
    pub leases: Vec<Arc<Lease>>,
}

/// A Port by namespace and name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortKey {
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
}

impl PortKey {
    /// The key of `port`.
    pub fn of(port: &Port) -> Self {
        Self {
            namespace: port.namespace().unwrap_or_default(),
            name: port.name_any(),
        }
    }
}

/// What becomes of one of the node's ports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PortPlan {
    /// Its device goes on `bridge`.
    Wire {
        /// Its network's bridge.
        bridge: IfName,
        /// Its device (a tap the hypervisor makes).
        device: IfName,
    },
    /// It cannot be wired yet, or at all.
    Blocked {
        /// CamelCase, for its `Ready` condition.
        reason: Reason,
        /// What is missing, for people.
        message: String,
    },
}

/// The device of `port` on its node: `status.interfaceName` when set, else `tp-` and 12 hex
/// digits of its uid's SHA-256 (15 bytes, the kernel's limit).
///
/// # Errors
/// `status.interfaceName` is not a name the kernel accepts.
pub fn port_device(port: &Port) -> Result<IfName, String> {
    match port
        .status
        .as_ref()
        .and_then(|s| s.interface_name.as_deref())
    {
        Some(n) => IfName::new(n).map_err(|e| e.to_string()),
        None => Ok(IfName::derived(
            Role::Tap,
            port.uid().as_deref().unwrap_or_default(),
        )),
    }
}

/// The annotation in which the API server records the uid of the Network a Port or Subnet
/// was made in.
pub const NETWORK_UID: &str = "network.stratus.dev/network-uid";

/// Whether an object with metadata `meta` naming `network` in its `spec.network` is of
/// `net`: same namespace and name, and made in this Network,
/// not in an earlier one of the same name (its addresses are claimed in that one's IPAM).
/// An object without the annotation is taken by name.
pub(crate) fn of_network(meta: &kube::api::ObjectMeta, network: &str, net: &Network) -> bool {
    let uid = meta.annotations.as_ref().and_then(|a| a.get(NETWORK_UID));
    meta.namespace == net.metadata.namespace
        && network == net.name_any()
        && uid.is_none_or(|u| Some(u) == net.metadata.uid.as_ref())
}

fn live(port: &Port) -> bool {
    port.metadata.deletion_timestamp.is_none()
}

fn node_of(port: &Port) -> Option<&str> {
    port.status.as_ref().and_then(|s| s.hypervisor.as_deref())
}

/// The port's security groups: `spec.securityGroups`, or `default` when unset.
fn groups_of(port: &Port) -> Vec<String> {
    port.spec
        .security_groups
        .clone()
        .unwrap_or_else(|| vec![DEFAULT_GROUP.to_owned()])
}

/// The IPv4 fixed addresses in the port's status, with their subnets.
fn fixed_ips(port: &Port) -> Result<Vec<(String, Ipv4Addr)>, String> {
    let mut out = Vec::new();
    for f in port.status.iter().flat_map(|s| s.fixed_ips.iter()) {
        if f.ip_address.contains(':') {
            continue;
        }
        let ip = f
            .ip_address
            .parse()
            .map_err(|_| format!("status.fixedIPs: {:?} is not an address", f.ip_address))?;
        out.push((f.subnet.clone(), ip));
    }
    Ok(out)
}

/// A port of this node that can be wired.
struct LocalPort {
    key: PortKey,
    id: Name,
    network: Arc<Network>,
    device: IfName,
    mac: MacAddr,
    ips: Vec<(String, Ipv4Addr)>,
    security: bool,
    groups: Vec<String>,
    pairs: BTreeSet<Ipv4Addr>,
    /// A router's port: its device is the node end of a veth into the router's namespace,
    /// and it is neither filtered nor served by DHCP.
    router: bool,
}

fn blocked(reason: Reason, message: impl Into<String>) -> PortPlan {
    PortPlan::Blocked {
        reason,
        message: message.into(),
    }
}

/// The node end of the veth of router port `uid`.
pub fn router_port_device(uid: &str) -> IfName {
    IfName::derived(Role::Veth, &format!("router/{uid}"))
}

/// Checks what wiring `port` needs; its plan if it cannot be wired. `router`: the port is
/// one of a router placed on this node (as that Router's status says).
fn local_port(
    port: &Port,
    snap: &Snapshot,
    cfg: &NodeConfig,
    underlay: Option<Ipv4Addr>,
    router: bool,
) -> Result<LocalPort, PortPlan> {
    let ns = port.namespace().unwrap_or_default();
    let key = PortKey::of(port);
    let network = snap
        .networks
        .iter()
        .find(|n| n.namespace().as_deref() == Some(&ns) && n.name_any() == port.spec.network)
        .ok_or_else(|| {
            blocked(
                Reason::NetworkNotFound,
                format!("network {} does not exist", port.spec.network),
            )
        })?;
    if !of_network(&port.metadata, &port.spec.network, network) {
        return Err(blocked(
            Reason::NetworkGone,
            format!(
                "the network {} this port was made in was deleted; network {0} of today is \
                 another one (delete the port and create it again)",
                port.spec.network
            ),
        ));
    }
    if network.uid().is_none() {
        return Err(blocked(
            Reason::VniPending,
            format!("network {} has no uid yet", port.spec.network),
        ));
    }
    match network.spec.segmentation {
        Segmentation::Vxlan => {
            if network.status.as_ref().and_then(|s| s.vni).is_none() {
                return Err(blocked(
                    Reason::VniPending,
                    format!("network {} has no VNI yet", port.spec.network),
                ));
            }
            if underlay.is_none() {
                return Err(blocked(
                    Reason::NoUnderlayAddress,
                    "the node has no tunnel address (no --underlay-ip and no Hypervisor \
                     status.hostIP)",
                ));
            }
        }
        Segmentation::Flat => {
            physical_interface(cfg, network)?;
        }
        Segmentation::Vlan => {
            physical_interface(cfg, network)?;
            if vlan_id(network).is_none() {
                return Err(blocked(
                    Reason::VniPending,
                    format!("network {} has no VLAN ID yet", port.spec.network),
                ));
            }
        }
    }
    let mac: MacAddr = port
        .status
        .as_ref()
        .and_then(|s| s.mac_address.as_deref())
        .ok_or_else(|| blocked(Reason::MacAddressPending, "the port has no MAC address yet"))?
        .parse()
        .map_err(|e| blocked(Reason::InvalidMacAddress, format!("status.macAddress: {e}")))?;
    let uid = port.uid().unwrap_or_default();
    let device = if router {
        router_port_device(&uid)
    } else {
        let device = port_device(port).map_err(|e| {
            blocked(
                Reason::InvalidInterfaceName,
                format!("status.interfaceName: {e}"),
            )
        })?;
        // A port's device is attached to a bridge: never one of the agent's own devices,
        // a physical uplink or the loopback.
        if device.as_str() == "lo"
            || ["br", "vx", "vl", "ve", "vp"]
                .iter()
                .any(|p| crate::plan::is_derived(&device, p))
            || cfg.physical.values().any(|i| *i == device)
        {
            return Err(blocked(
                Reason::InvalidInterfaceName,
                format!("status.interfaceName: {device} is not a port's device"),
            ));
        }
        device
    };
    let ips = fixed_ips(port).map_err(|e| blocked(Reason::InvalidAddress, e))?;
    let security = !router
        && port
            .spec
            .port_security_enabled
            .unwrap_or(network.spec.port_security_enabled);
    let groups = if security { groups_of(port) } else { vec![] };
    if security {
        if ips.is_empty() {
            return Err(blocked(
                Reason::AddressPending,
                "the port has no IPv4 address yet (port security filters by address)",
            ));
        }
        for g in &groups {
            let found = snap
                .groups
                .iter()
                .any(|s| s.namespace().as_deref() == Some(&ns) && s.name_any() == *g);
            if !found {
                return Err(blocked(
                    Reason::SecurityGroupNotFound,
                    format!("security group {g} does not exist"),
                ));
            }
        }
    }
    if router && ips.is_empty() {
        return Err(blocked(
            Reason::AddressPending,
            "the router's port has no IPv4 address yet",
        ));
    }
    // Only single IPv4 addresses can be allowed as sources; wider pairs are left out (the
    // filter stays narrower than asked, never wider).
    let pairs = port
        .spec
        .allowed_address_pairs
        .iter()
        .filter_map(|p| {
            let a = p.ip_address.strip_suffix("/32").unwrap_or(&p.ip_address);
            a.parse::<Ipv4Addr>().ok()
        })
        .collect();
    let id = Name::derived("p", &uid).map_err(|e| blocked(Reason::InvalidName, e.to_string()))?;
    Ok(LocalPort {
        key,
        id,
        network: Arc::clone(network),
        device,
        mac,
        ips,
        security,
        groups,
        pairs,
        router,
    })
}

/// A vlan network's VLAN ID (`status.segmentationID`), when it has a valid one.
fn vlan_id(network: &Network) -> Option<u16> {
    let id = network.status.as_ref()?.segmentation_id?;
    (1..=4094).contains(&id).then_some(id)
}

/// The node's interface for a provider (flat or vlan) network's physical network.
fn physical_interface(cfg: &NodeConfig, network: &Network) -> Result<IfName, PortPlan> {
    let name = network.spec.physical_network.as_deref().unwrap_or_default();
    cfg.physical.get(name).cloned().ok_or_else(|| {
        blocked(
            Reason::PhysicalNetworkUnmapped,
            format!(
                "network {} is bridged to physical network {name:?}, which this node has no \
                 interface for (--physical-interface {name}=IFACE)",
                network.name_any()
            ),
        )
    })
}

/// What becomes of one of the node's routers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouterPlan {
    /// Its namespace on the node.
    pub netns: Name,
    /// What of it cannot be programmed yet, for people (empty: all of it can).
    pub pending: Vec<String>,
}

/// What becomes of a FloatingIP of one of the node's routers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FloatingPlan {
    /// Translated by the router in namespace `router`.
    Translate {
        /// The router's namespace.
        router: Name,
    },
    /// Not translated, and why.
    Blocked {
        /// CamelCase, for its `Ready` condition.
        reason: Reason,
        /// For people.
        message: String,
    },
}

/// Everything [`desired_all`] decides besides the node's [`Desired`] state.
#[derive(Debug, Clone, Default)]
pub struct Plans {
    /// Each of the node's ports (router ports among them).
    pub ports: BTreeMap<PortKey, PortPlan>,
    /// Each Router placed on the node, by namespace and name.
    pub routers: BTreeMap<PortKey, RouterPlan>,
    /// Each FloatingIP whose router is placed on the node, by namespace and name.
    pub floating_ips: BTreeMap<PortKey, FloatingPlan>,
}

/// The node's desired state and the plan for each of its ports (those whose
/// `status.hypervisor` is this node and that are not being deleted).
pub fn desired(cfg: &NodeConfig, snap: &Snapshot) -> (Desired, BTreeMap<PortKey, PortPlan>) {
    let (d, plans) = desired_all(cfg, snap);
    (d, plans.ports)
}

/// The Routers placed on this node (by their `status.node`), live and with a uid.
fn local_routers<'a>(cfg: &NodeConfig, snap: &'a Snapshot) -> Vec<&'a Arc<Router>> {
    snap.routers
        .iter()
        .filter(|r| {
            r.metadata.deletion_timestamp.is_none()
                && r.uid().is_some()
                && r.status.as_ref().and_then(|s| s.node.as_deref()) == Some(cfg.node.as_str())
        })
        .collect()
}

/// The router's Ports as its status names them (written by the system's controller, never
/// by the tenant): its interfaces' ports, then its gateway's.
fn router_ports(r: &Router) -> (Vec<(String, PortKey)>, Option<PortKey>) {
    let ns = r.namespace().unwrap_or_default();
    let Some(st) = r.status.as_ref() else {
        return (vec![], None);
    };
    let ifaces = st
        .interfaces
        .iter()
        .filter_map(|i| {
            Some((
                i.subnet.clone(),
                PortKey {
                    namespace: ns.clone(),
                    name: i.port.clone()?,
                },
            ))
        })
        .collect();
    let gateway = st.external_gateway_port.as_deref().map(|g| {
        let (pns, name) = g.split_once('/').unwrap_or((&ns, g));
        PortKey {
            namespace: pns.to_owned(),
            name: name.to_owned(),
        }
    });
    (ifaces, gateway)
}

/// The node's desired state (its networks, firewall and routers) and what becomes of each
/// of its ports, routers and floating IPs.
pub fn desired_all(cfg: &NodeConfig, snap: &Snapshot) -> (Desired, Plans) {
    let underlay = cfg.underlay.or_else(|| {
        snap.hypervisors
            .iter()
            .find(|h| h.name_any() == cfg.node)
            .and_then(|h| h.status.as_ref()?.host_ip.as_deref()?.parse().ok())
    });
    let routers = local_routers(cfg, snap);
    let mut router_keys: BTreeSet<PortKey> = BTreeSet::new();
    for r in &routers {
        let (ifaces, gw) = router_ports(r);
        router_keys.extend(ifaces.into_iter().map(|(_, k)| k));
        router_keys.extend(gw);
    }
    let mut plans = Plans::default();
    // By network uid: the network and its ports on this node.
    let mut by_network: BTreeMap<String, (Arc<Network>, Vec<LocalPort>)> = BTreeMap::new();
    for port in &snap.ports {
        if !live(port) || node_of(port) != Some(cfg.node.as_str()) {
            continue;
        }
        let is_router = router_keys.contains(&PortKey::of(port));
        match local_port(port, snap, cfg, underlay, is_router) {
            Ok(lp) => {
                let uid = lp.network.uid().unwrap_or_default();
                by_network
                    .entry(uid)
                    .or_insert_with(|| (Arc::clone(&lp.network), Vec::new()))
                    .1
                    .push(lp);
            }
            Err(plan) => {
                plans.ports.insert(PortKey::of(port), plan);
            }
        }
    }

    let mut networks = Vec::new();
    let mut groups = Groups::default();
    let mut filters = Vec::new();
    let mut zones = Vec::new();
    let mut used_zones = BTreeSet::new();
    let mut local_dhcp = Vec::new();
    let mut tunnels = Vec::new();
    // The router ports wired, with their network's bridge and MTU.
    let mut wired_router_ports: BTreeMap<PortKey, (LocalPort, IfName, u32)> = BTreeMap::new();
    let mut by_vni: Vec<_> = by_network.into_iter().collect();
    by_vni.sort_by_key(|(_, (n, _))| n.status.as_ref().and_then(|s| s.vni));
    for (uid, (net, ports)) in by_vni {
        let ns = net.namespace().unwrap_or_default();
        let vni = net.status.as_ref().and_then(|s| s.vni).unwrap_or_default();
        let bridge = IfName::derived(Role::Bridge, &uid);
        let zone_key = match net.spec.segmentation {
            Segmentation::Vxlan => vni,
            // A flat network has no VNI: a zone from its uid (above the 24-bit VNIs' range
            // modulo the zone space is not possible, so collisions are resolved by
            // `zone_for`).
            Segmentation::Flat | Segmentation::Vlan => {
                u32::from_str_radix(&digest_hex(&uid, 4), 16).unwrap_or(1)
            }
        };
        zones.push(Zone {
            bridge: bridge.clone(),
            zone: zone_for(zone_key, &mut used_zones),
        });
        let (guests, router_ports): (Vec<LocalPort>, Vec<LocalPort>) =
            ports.into_iter().partition(|p| !p.router);
        // DHCP serves guests; a network with only a router's ports here needs no server.
        let dhcp = if guests.is_empty() {
            None
        } else {
            dhcp_for(cfg, snap, &net, &uid, &guests)
        };
        let server = dhcp.as_ref().map(|d| d.address.addr());
        let (uplink, fdb) = match net.spec.segmentation {
            Segmentation::Vxlan => {
                let vxlan = IfName::derived(Role::Vxlan, &uid);
                let fdb = fdb(cfg, snap, &net);
                tunnels.push(Tunnel {
                    vni,
                    port: VXLAN_PORT,
                    peers: fdb.iter().map(|e| e.remote).collect(),
                });
                let spec = VxlanSpec {
                    name: vxlan,
                    vni,
                    local: underlay.unwrap_or(Ipv4Addr::UNSPECIFIED),
                    port: VXLAN_PORT,
                };
                (Uplink::Vxlan(spec), fdb)
            }
            Segmentation::Flat => {
                let Ok(iface) = physical_interface(cfg, &net) else {
                    continue;
                };
                (Uplink::Physical(iface), BTreeSet::new())
            }
            Segmentation::Vlan => {
                let (Ok(parent), Some(id)) = (physical_interface(cfg, &net), vlan_id(&net)) else {
                    continue;
                };
                let spec = VlanSpec {
                    name: IfName::derived(Role::Vlan, &uid),
                    parent,
                    id,
                };
                (Uplink::Vlan(spec), BTreeSet::new())
            }
        };
        if let Some(d) = &dhcp {
            local_dhcp.push(LocalDhcp {
                vxlan: uplink.name().clone(),
                server: d.address.addr(),
            });
        }
        for p in guests.iter().chain(&router_ports) {
            plans.ports.insert(
                p.key.clone(),
                PortPlan::Wire {
                    bridge: bridge.clone(),
                    device: p.device.clone(),
                },
            );
        }
        for p in &guests {
            filters.push(filter(p, &bridge, server, snap, &mut groups, &ns));
        }
        networks.push(NetworkWiring {
            bridge: bridge.clone(),
            uplink,
            mtu: net.spec.mtu,
            fdb,
            ports: guests.iter().map(|p| p.device.clone()).collect(),
            dhcp,
        });
        for p in router_ports {
            wired_router_ports.insert(p.key.clone(), (p, bridge.clone(), net.spec.mtu));
        }
    }
    networks.sort_by(|a, b| a.bridge.cmp(&b.bridge));
    let mut router_wirings = Vec::new();
    for r in routers {
        let (wiring, plan) = router_wiring(
            cfg,
            snap,
            r,
            &wired_router_ports,
            &plans.ports,
            &mut plans.floating_ips,
        );
        let key = PortKey {
            namespace: r.namespace().unwrap_or_default(),
            name: r.name_any(),
        };
        plans.routers.insert(key, plan);
        router_wirings.push(wiring);
    }
    router_wirings.sort_by(|a, b| a.name.cmp(&b.name));
    let firewall = (!networks.is_empty()).then_some(Ruleset {
        zones,
        ports: filters,
        groups: groups.sets,
        local_dhcp,
        tunnels,
    });
    (
        Desired {
            node: cfg.node.clone(),
            netns: cfg.netns.clone(),
            networks,
            firewall,
            routers: router_wirings,
        },
        plans,
    )
}

/// The prefix length of subnet `name` of `net` (in the network's namespace).
fn subnet_of<'a>(snap: &'a Snapshot, net: &Network, name: &str) -> Option<(&'a Subnet, Ipv4Cidr)> {
    let s = snap
        .subnets
        .iter()
        .find(|s| s.name_any() == name && of_network(&s.metadata, &s.spec.network, net))?;
    let cidr: Ipv4Cidr = s.spec.cidr.parse().ok()?;
    Some((s, Ipv4Cidr::new(cidr.network(), cidr.prefix())?))
}

/// The gateway address of a subnet, if it has one inside its CIDR.
fn gateway_of(subnet: &Subnet, cidr: Ipv4Cidr) -> Option<Ipv4Addr> {
    if subnet.spec.disable_gateway {
        return None;
    }
    subnet
        .status
        .as_ref()
        .and_then(|s| s.gateway_ip.as_deref())
        .or(subnet.spec.gateway_ip.as_deref())
        .and_then(|g| g.parse().ok())
        .filter(|g| cidr.contains(*g))
}

/// A router port's addresses, each with its subnet's prefix length; the subnets found.
fn port_addresses(snap: &Snapshot, p: &LocalPort) -> Vec<(Ipv4Cidr, Ipv4Cidr, Option<Ipv4Addr>)> {
    p.ips
        .iter()
        .filter_map(|(subnet, ip)| {
            let (s, cidr) = subnet_of(snap, &p.network, subnet)?;
            cidr.contains(*ip)
                .then(|| (Ipv4Cidr::new(*ip, cidr.prefix()), cidr, gateway_of(s, cidr)))
                .and_then(|(a, c, g)| Some((a?, c, g)))
        })
        .collect()
}

/// A router's wiring on this node from what its status names and the router ports wired.
fn router_wiring(
    cfg: &NodeConfig,
    snap: &Snapshot,
    r: &Router,
    wired: &BTreeMap<PortKey, (LocalPort, IfName, u32)>,
    port_plans: &BTreeMap<PortKey, PortPlan>,
    floating: &mut BTreeMap<PortKey, FloatingPlan>,
) -> (RouterWiring, RouterPlan) {
    let name = router_name(&cfg.node, &r.uid().unwrap_or_default());
    let fip_key = |f: &FloatingIP| PortKey {
        namespace: f.namespace().unwrap_or_default(),
        name: f.name_any(),
    };
    let fip_blocked = |message: String| FloatingPlan::Blocked {
        reason: Reason::RouterNotReady,
        message,
    };
    let mut pending = Vec::new();
    let (ifaces, gateway) = router_ports(r);
    let missing = |key: &PortKey, pending: &mut Vec<String>| {
        let why = match port_plans.get(key) {
            Some(PortPlan::Blocked { message, .. }) => message.clone(),
            _ => "not placed on this node".to_owned(),
        };
        pending.push(format!("port {}/{}: {why}", key.namespace, key.name));
    };
    let mut interfaces = Vec::new();
    let mut internal: Vec<Ipv4Cidr> = Vec::new();
    for (_, key) in &ifaces {
        let Some((p, bridge, mtu)) = wired.get(key) else {
            missing(key, &mut pending);
            continue;
        };
        let addrs = port_addresses(snap, p);
        if addrs.is_empty() {
            pending.push(format!("port {}: no address in a known subnet", key.name));
            continue;
        }
        internal.extend(addrs.iter().map(|(_, c, _)| *c));
        interfaces.push(RouterInterfaceWiring {
            bridge: bridge.clone(),
            veth: p.device.clone(),
            inner: IfName::derived(Role::RouterPort, &format!("{}", p.id)),
            mac: p.mac,
            addresses: addrs.iter().map(|(a, _, _)| *a).collect(),
            mtu: *mtu,
        });
    }
    let mut routes = BTreeSet::new();
    let mut nat = Nat::default();
    // The external subnets and their gateways (the upstream routers).
    let mut upstream: Vec<(Ipv4Cidr, Option<Ipv4Addr>)> = Vec::new();
    if gateway.is_none()
        || !wired.contains_key(gateway.as_ref().unwrap_or(&PortKey {
            namespace: String::new(),
            name: String::new(),
        }))
    {
        for f in floating_of(snap, r) {
            floating.insert(
                fip_key(f),
                fip_blocked("its router has no external gateway on its node yet".into()),
            );
        }
    }
    if let Some(key) = &gateway {
        match wired.get(key) {
            None => missing(key, &mut pending),
            Some((p, bridge, mtu)) => {
                let addrs = port_addresses(snap, p);
                let inner = IfName::derived(Role::Gateway, &format!("{}", p.id));
                // Named even without an address: its forward filter keeps the outside out.
                nat.gateway = Some(inner.clone());
                if let Some((gw_addr, _, via)) = addrs.first().copied() {
                    if let Some(via) = via {
                        routes.insert(RouteSpec::new(
                            Ipv4Cidr::new(Ipv4Addr::UNSPECIFIED, 0).unwrap_or(gw_addr),
                            via,
                        ));
                    }
                    let snat = r
                        .spec
                        .external_gateway
                        .as_ref()
                        .is_none_or(|g| g.enable_snat);
                    if snat {
                        let mut sources: Vec<Ipv4Cidr> = internal.clone();
                        sources.sort();
                        sources.dedup();
                        nat.snat = sources
                            .into_iter()
                            .map(|source| Snat {
                                source,
                                to: gw_addr.addr(),
                            })
                            .collect();
                    }
                } else {
                    pending.push(format!(
                        "gateway port {}: no address in a known subnet",
                        key.name
                    ));
                }
                let externals: Vec<Ipv4Cidr> = addrs.iter().map(|(_, c, _)| *c).collect();
                upstream = addrs.iter().map(|(_, c, via)| (*c, *via)).collect();
                let mut addresses: BTreeSet<Ipv4Cidr> = addrs.iter().map(|(a, _, _)| *a).collect();
                for f in floating_of(snap, r) {
                    let plan = match translation(f, &externals, &internal) {
                        Ok((floating, fixed))
                            if nat
                                .floating
                                .iter()
                                .any(|n| n.floating == floating || n.fixed == fixed) =>
                        {
                            fip_blocked(format!(
                                "another floating IP of the router translates {floating} or \
                                 {fixed}"
                            ))
                        }
                        Ok((floating, fixed)) => {
                            nat.floating.push(FloatingNat { floating, fixed });
                            addresses.extend(Ipv4Cidr::new(floating, 32));
                            FloatingPlan::Translate {
                                router: name.clone(),
                            }
                        }
                        Err(e) => fip_blocked(e),
                    };
                    floating.insert(fip_key(f), plan);
                }
                nat.floating.sort();
                interfaces.push(RouterInterfaceWiring {
                    bridge: bridge.clone(),
                    veth: p.device.clone(),
                    inner,
                    mac: p.mac,
                    addresses,
                    mtu: *mtu,
                });
            }
        }
    }
    // Static routes through a next hop on one of the router's prefixes; others cannot be
    // added (the kernel refuses an unreachable next hop).
    let onlink: Vec<Ipv4Cidr> = interfaces
        .iter()
        .flat_map(|i| i.addresses.iter().filter(|a| a.prefix() < 32).copied())
        .collect();
    for route in &r.spec.routes {
        let (Ok(dest), Ok(hop)) = (
            route.destination.parse::<Ipv4Cidr>(),
            route.nexthop.parse::<Ipv4Addr>(),
        ) else {
            continue;
        };
        // On the external network only its gateway is ours to route through: any other
        // address there may be another project's router (admission refuses it too, but not
        // in a Router stored before it did).
        if let Some((c, _)) = upstream
            .iter()
            .find(|(c, via)| c.contains(hop) && *via != Some(hop))
        {
            pending.push(format!(
                "route to {} via {hop}: on the external network {c} a next hop can only be \
                 its gateway",
                route.destination
            ));
        } else if onlink.iter().any(|c| c.contains(hop)) {
            routes.insert(RouteSpec::new(dest, hop));
        } else {
            pending.push(format!(
                "route to {} via {hop}: the next hop is on none of the router's subnets",
                route.destination
            ));
        }
    }
    (
        RouterWiring {
            name: name.clone(),
            interfaces,
            routes,
            nat,
        },
        RouterPlan {
            netns: name,
            pending,
        },
    )
}

/// The live FloatingIPs whose status names `r` as their router.
fn floating_of<'a>(snap: &'a Snapshot, r: &'a Router) -> impl Iterator<Item = &'a FloatingIP> {
    let ns = r.namespace();
    let name = r.name_any();
    snap.floating_ips.iter().map(|f| &**f).filter(move |f| {
        f.metadata.deletion_timestamp.is_none()
            && f.namespace() == ns
            && f.status.as_ref().and_then(|s| s.router.as_deref()) == Some(name.as_str())
    })
}

/// A FloatingIP's translation: its floating address (on one of the router's external
/// prefixes) and its fixed address (on one of its internal ones), or why not.
fn translation(
    f: &FloatingIP,
    externals: &[Ipv4Cidr],
    internals: &[Ipv4Cidr],
) -> Result<(Ipv4Addr, Ipv4Addr), String> {
    let st = f.status.as_ref();
    let floating: Ipv4Addr = st
        .and_then(|s| s.floating_ip_address.as_deref())
        .ok_or("no floating address allocated yet")?
        .parse()
        .map_err(|_| "status.floatingIPAddress is not an IPv4 address")?;
    let fixed: Ipv4Addr = st
        .and_then(|s| s.fixed_ip.as_deref())
        .ok_or("no fixed address associated yet")?
        .parse()
        .map_err(|_| "status.fixedIP is not an IPv4 address")?;
    if !externals.iter().any(|c| c.contains(floating)) {
        return Err(format!(
            "floating address {floating} is on none of the router's external subnets"
        ));
    }
    if !internals.iter().any(|c| c.contains(fixed)) {
        return Err(format!(
            "fixed address {fixed} is on none of the router's subnets"
        ));
    }
    Ok((floating, fixed))
}

/// A conntrack zone for a network: from its VNI, the next free one if taken.
fn zone_for(vni: u32, used: &mut BTreeSet<u16>) -> u16 {
    let mut z = u16::try_from((vni.saturating_sub(1)) % 65535 + 1).unwrap_or(1);
    while !used.insert(z) {
        z = if z == u16::MAX { 1 } else { z + 1 };
    }
    z
}

/// The tunnel address of `node`: its network agent's Lease's, else its Hypervisor's
/// `status.hostIP` (a compute node whose agent predates the Lease).
pub fn tunnel_address(snap: &Snapshot, node: &str) -> Option<Ipv4Addr> {
    snap.leases
        .iter()
        .find(|l| {
            l.metadata.namespace.as_deref() == Some(NETWORK_AGENT_LEASE_NAMESPACE)
                && l.metadata.name.as_deref() == Some(node)
        })
        .and_then(|l| {
            l.metadata
                .annotations
                .as_ref()?
                .get(TUNNEL_IP_ANNOTATION)?
                .parse()
                .ok()
        })
        .or_else(|| {
            snap.hypervisors
                .iter()
                .find(|h| h.name_any() == node)
                .and_then(|h| h.status.as_ref()?.host_ip.as_deref()?.parse().ok())
        })
}

/// The FDB of a network's VXLAN device: for each other node hosting one of its ports, the
/// flood entry and each of those ports' MACs, to that node's `status.hostIP`.
fn fdb(cfg: &NodeConfig, snap: &Snapshot, net: &Network) -> BTreeSet<FdbEntry> {
    let mut out = BTreeSet::new();
    for p in &snap.ports {
        let Some(node) = node_of(p) else { continue };
        if node == cfg.node || !live(p) || !of_network(&p.metadata, &p.spec.network, net) {
            continue;
        }
        let Some(remote) = tunnel_address(snap, node) else {
            tracing::debug!(%node, "no hostIP for a node hosting a port; no tunnel to it yet");
            continue;
        };
        out.insert(FdbEntry {
            mac: MacAddr::ZERO,
            remote,
        });
        if let Some(mac) = p
            .status
            .as_ref()
            .and_then(|s| s.mac_address.as_deref()?.parse().ok())
        {
            out.insert(FdbEntry { mac, remote });
        }
    }
    out
}

/// The network's DHCP server on this node: for its first subnet (by name) with DHCP and an
/// IPv4 CIDR, serving the local ports' addresses in it. The server's own address is the one
/// IPAM claimed for it (the Subnet's `status.dhcpIP`), so no port ever holds it; for a Subnet
/// stored before IPAM claimed one, the highest of the subnet that is neither the gateway nor
/// any port's.
fn dhcp_for(
    cfg: &NodeConfig,
    snap: &Snapshot,
    net: &Network,
    uid: &str,
    ports: &[LocalPort],
) -> Option<DhcpWiring> {
    let mut subnets: Vec<&Arc<Subnet>> = snap
        .subnets
        .iter()
        .filter(|s| {
            of_network(&s.metadata, &s.spec.network, net)
                && s.spec.enable_dhcp
                && s.spec.cidr.parse::<Ipv4Cidr>().is_ok()
        })
        .collect();
    subnets.sort_by_key(|s| s.name_any());
    let subnet = subnets.first()?;
    let cidr: Ipv4Cidr = subnet.spec.cidr.parse().ok()?;
    let cidr = Ipv4Cidr::new(cidr.network(), cidr.prefix())?;
    let gateway: Option<Ipv4Addr> = if subnet.spec.disable_gateway {
        None
    } else {
        subnet
            .status
            .as_ref()
            .and_then(|s| s.gateway_ip.as_deref())
            .or(subnet.spec.gateway_ip.as_deref())
            .and_then(|g| g.parse().ok())
            .filter(|g| cidr.contains(*g))
    };
    let taken: BTreeSet<Ipv4Addr> = snap
        .ports
        .iter()
        .filter(|p| of_network(&p.metadata, &p.spec.network, net))
        .flat_map(|p| fixed_ips(p).unwrap_or_default())
        .map(|(_, ip)| ip)
        .chain(gateway)
        .collect();
    let broadcast = u32::from(cidr.network()) | !u32::from(cidr.netmask());
    let first = u32::from(cidr.network()) + 1;
    let claimed = subnet
        .status
        .as_ref()
        .and_then(|s| s.dhcp_ip.as_deref())
        .and_then(|a| a.parse::<Ipv4Addr>().ok())
        .filter(|a| (first..broadcast).contains(&u32::from(*a)));
    let server = match claimed {
        Some(a) => a,
        None => (first..broadcast)
            .rev()
            .map(Ipv4Addr::from)
            .find(|a| !taken.contains(a))?,
    };
    let mut leases = Vec::new();
    let mut macs = BTreeSet::new();
    for p in ports {
        let ip = p
            .ips
            .iter()
            .find(|(s, ip)| *s == subnet.name_any() && cidr.contains(*ip));
        if let Some((_, ip)) = ip
            && macs.insert(p.mac)
        {
            leases.push(StaticLease {
                mac: p.mac,
                ip: *ip,
                hostname: None,
            });
        }
    }
    leases.sort();
    let key = format!("{}/{uid}", cfg.node);
    let name = dhcp_name(&cfg.node, uid);
    Some(DhcpWiring {
        veth: IfName::derived(Role::Veth, &key),
        address: Ipv4Cidr::new(server, cidr.prefix())?,
        spec: DhcpSpec {
            name: name.clone(),
            netns: Netns::Named(name),
            interface: IfName::derived(Role::VethPeer, &key),
            subnet: cidr,
            router: gateway,
            lease_secs: LEASE_SECS,
            // The metadata service listens in the server's namespace (Neutron's isolated
            // metadata).
            routes: Ipv4Cidr::new(crate::metadata::ADDRESS, 32)
                .map(|m| RouteSpec::new(m, server))
                .into_iter()
                .collect(),
            leases,
        },
    })
}

/// The remote groups rules refer to, one nft set each, made as rules need them.
#[derive(Default)]
struct Groups {
    sets: Vec<RemoteGroup>,
    index: BTreeMap<(String, String), usize>,
}

impl Groups {
    /// The set of group `name` in namespace `ns`: the IPv4 addresses of its member ports.
    fn get(&mut self, snap: &Snapshot, ns: &str, name: &str) -> Option<GroupRef> {
        let key = (ns.to_owned(), name.to_owned());
        if let Some(i) = self.index.get(&key) {
            return Some(GroupRef(*i));
        }
        let uid = snap
            .groups
            .iter()
            .find(|g| g.namespace().as_deref() == Some(ns) && g.name_any() == name)
            .and_then(|g| g.uid())
            .unwrap_or_else(|| format!("missing/{ns}/{name}"));
        let members = snap
            .ports
            .iter()
            .filter(|p| {
                live(p)
                    && p.namespace().as_deref() == Some(ns)
                    && groups_of(p).iter().any(|g| g == name)
            })
            .flat_map(|p| fixed_ips(p).unwrap_or_default())
            .map(|(_, ip)| ip)
            .collect();
        let set = RemoteGroup {
            name: Name::derived("g", &uid).ok()?,
            members,
        };
        self.sets.push(set);
        self.index.insert(key, self.sets.len() - 1);
        Some(GroupRef(self.sets.len() - 1))
    }
}

/// One security-group rule as an nft rule; `None` for what the filter cannot express
/// (IPv6, ICMP types, prefixes that are not IPv4), which is then not allowed.
fn rule(
    r: &SecurityGroupRule,
    snap: &Snapshot,
    groups: &mut Groups,
    ns: &str,
) -> Option<(Direction, Rule)> {
    if r.ethertype != EtherType::IPv4 || r.icmp_type.is_some() || r.icmp_code.is_some() {
        return None;
    }
    let protocol = match r.protocol {
        ApiProtocol::Any => Protocol::Any,
        ApiProtocol::Tcp => Protocol::Tcp,
        ApiProtocol::Udp => Protocol::Udp,
        ApiProtocol::Icmp => Protocol::Icmp,
    };
    let ports = match (r.port_range_min, r.port_range_max) {
        (None, None) => None,
        (min, max) => {
            let (first, last) = (min.or(max)?, max.or(min)?);
            if !matches!(protocol, Protocol::Tcp | Protocol::Udp) || first == 0 || first > last {
                return None;
            }
            Some(PortRange { first, last })
        }
    };
    let remote = match (&r.remote_group, &r.remote_ip_prefix) {
        (Some(g), _) => Remote::Group(groups.get(snap, ns, g)?),
        (None, Some(prefix)) => Remote::Cidr(prefix.parse().ok()?),
        (None, None) => Remote::Any,
    };
    Some((
        r.direction,
        Rule {
            protocol,
            ports,
            remote,
        },
    ))
}

/// A port's filter: its MAC and addresses (and allowed pairs), and its groups' rules.
fn filter(
    p: &LocalPort,
    bridge: &IfName,
    dhcp_server: Option<Ipv4Addr>,
    snap: &Snapshot,
    groups: &mut Groups,
    ns: &str,
) -> PortFilter {
    let (mut ingress, mut egress) = (Vec::new(), Vec::new());
    for g in &p.groups {
        let Some(sg) = snap
            .groups
            .iter()
            .find(|s| s.namespace().as_deref() == Some(ns) && s.name_any() == *g)
        else {
            continue;
        };
        for r in &sg.spec.rules {
            let Some((dir, rule)) = rule(r, snap, groups, ns) else {
                continue;
            };
            let list = match dir {
                Direction::Ingress => &mut ingress,
                Direction::Egress => &mut egress,
            };
            if !list.contains(&rule) {
                list.push(rule);
            }
        }
    }
    let mut ips: BTreeSet<Ipv4Addr> = p.ips.iter().map(|(_, ip)| *ip).collect();
    ips.extend(&p.pairs);
    PortFilter {
        id: p.id.clone(),
        bridge: bridge.clone(),
        device: p.device.clone(),
        mac: p.mac,
        ips,
        dhcp_server,
        port_security: p.security,
        ingress,
        egress,
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;
    use std::sync::Arc;

    use serde_json::json;

    use super::*;
    use crate::agent::tests::{config, hypervisor, network, port, snapshot, subnet};

    #[test]
    fn only_this_nodes_live_ports_in_its_project_are_wired() {
        let mut snap = snapshot();
        // Another project's port of a network of the same name, and one being deleted.
        let mut other: Port =
            (*port("p3", "net", "n1", "02:00:00:00:00:03", "10.9.0.13", None)).clone();
        other.metadata.namespace = Some("other".into());
        let mut gone: Port =
            (*port("p4", "net", "n1", "02:00:00:00:00:04", "10.9.0.14", None)).clone();
        gone.metadata.deletion_timestamp =
            serde_json::from_value(json!("2026-01-01T00:00:00Z")).ok();
        snap.ports.push(Arc::new(other));
        snap.ports.push(Arc::new(gone));
        let (d, plans) = desired(&config(), &snap);
        let keys: Vec<String> = plans
            .keys()
            .map(|k| format!("{}/{}", k.namespace, k.name))
            .collect();
        assert_eq!(keys, vec!["demo/p1", "other/p3"]);
        assert!(matches!(
            plans.values().nth(1),
            Some(PortPlan::Blocked {
                reason: Reason::NetworkNotFound,
                ..
            })
        ));
        assert_eq!(d.networks.len(), 1);
        assert_eq!(d.networks[0].ports.len(), 1);
        // The deleted port's address is no lease, and is not a group member.
        let fw = d.firewall.expect("ruleset");
        assert!(!fw.groups[0].members.contains(&Ipv4Addr::new(10, 9, 0, 14)));
    }

    #[test]
    fn the_fdb_names_exactly_the_other_nodes_with_ports_and_a_tunnel_address() {
        let mut snap = snapshot();
        snap.ports.push(port(
            "p5",
            "net",
            "n3",
            "02:00:00:00:00:05",
            "10.9.0.15",
            None,
        ));
        snap.ports.push(port(
            "p6",
            "net",
            "n4",
            "02:00:00:00:00:06",
            "10.9.0.16",
            None,
        ));
        snap.hypervisors.push(hypervisor("n3", "192.0.2.3"));
        // n4 has no Hypervisor yet: no tunnel to it; n5 hosts nothing of this network.
        snap.hypervisors.push(hypervisor("n5", "192.0.2.5"));
        let (d, _) = desired(&config(), &snap);
        let remotes: BTreeSet<Ipv4Addr> = d.networks[0].fdb.iter().map(|e| e.remote).collect();
        assert_eq!(
            remotes,
            BTreeSet::from([Ipv4Addr::new(192, 0, 2, 2), Ipv4Addr::new(192, 0, 2, 3)])
        );
        assert_eq!(
            d.networks[0].fdb.len(),
            4,
            "a flood entry and a MAC per remote port"
        );
        assert!(
            matches!(&d.networks[0].uplink, Uplink::Vxlan(v) if v.local == Ipv4Addr::new(192, 0, 2, 1))
        );
        let explicit = NodeConfig {
            underlay: Some(Ipv4Addr::new(198, 51, 100, 1)),
            ..config()
        };
        let (d, _) = desired(&explicit, &snap);
        assert!(
            matches!(&d.networks[0].uplink, Uplink::Vxlan(v) if v.local == Ipv4Addr::new(198, 51, 100, 1))
        );
    }

    #[test]
    fn the_dhcp_server_takes_the_highest_address_no_port_or_gateway_has() {
        let mut snap = snapshot();
        snap.ports.push(port(
            "p7",
            "net",
            "n2",
            "02:00:00:00:00:07",
            "10.9.0.254",
            None,
        ));
        let (d, _) = desired(&config(), &snap);
        let dh = d.networks[0].dhcp.as_ref().expect("dhcp");
        assert_eq!(dh.address, "10.9.0.253/24".parse().expect("cidr"));
        assert_eq!(dh.spec.router, Some(Ipv4Addr::new(10, 9, 0, 1)));
        assert_eq!(dh.spec.leases.len(), 1, "this node's port only");
        let fw = d.firewall.expect("ruleset");
        assert_eq!(fw.local_dhcp.len(), 1);
        assert_eq!(fw.local_dhcp[0].server, Ipv4Addr::new(10, 9, 0, 253));
    }

    #[test]
    fn the_dhcp_server_takes_the_address_ipam_claimed_for_it() {
        let mut snap = snapshot();
        let mut sn = (*snap.subnets[0]).clone();
        sn.status = Some(stratus_api_types::network::SubnetStatus {
            dhcp_ip: Some("10.9.0.2".into()),
            ..Default::default()
        });
        snap.subnets = vec![Arc::new(sn)];
        let (d, _) = desired(&config(), &snap);
        let dh = d.networks[0].dhcp.as_ref().expect("dhcp");
        assert_eq!(dh.address, "10.9.0.2/24".parse().expect("cidr"));
        let fw = d.firewall.expect("ruleset");
        assert_eq!(fw.local_dhcp[0].server, Ipv4Addr::new(10, 9, 0, 2));
    }

    #[test]
    fn conntrack_zones_differ_even_when_vnis_collide_modulo_the_zone_space() {
        let mut snap = snapshot();
        snap.networks
            .push(network("net2", "uid-net2", Some(5001 + 65535)));
        snap.ports.push(port(
            "p8",
            "net2",
            "n1",
            "02:00:00:00:00:08",
            "10.9.0.18",
            Some("tp-p8"),
        ));
        let (d, _) = desired(&config(), &snap);
        let zones: BTreeSet<u16> = d
            .firewall
            .expect("ruleset")
            .zones
            .iter()
            .map(|z| z.zone)
            .collect();
        assert_eq!(zones, BTreeSet::from([5001, 5002]));
    }

    #[test]
    fn ports_and_subnets_of_a_deleted_network_of_the_same_name_are_not_its() {
        let mut snap = snapshot();
        // `net` deleted and created again: a new uid; p1, p2 and `sn` are of the old one.
        snap.networks = vec![network("net", "uid-net-2", Some(5001))];
        let (d, plans) = desired(&config(), &snap);
        assert!(matches!(
            plans.values().next(),
            Some(PortPlan::Blocked {
                reason: Reason::NetworkGone,
                ..
            })
        ));
        assert!(d.networks.is_empty() && d.firewall.is_none());

        // A port and a subnet of the new network: the old ones are neither peers, nor
        // leases, nor addresses taken, nor the subnet served.
        let renew = |mut o: serde_json::Value| {
            o["metadata"]["annotations"][NETWORK_UID] = json!("uid-net-2");
            o
        };
        let p9 = renew(
            serde_json::to_value(&*port(
                "p9",
                "net",
                "n1",
                "02:00:00:00:00:09",
                "10.9.0.11",
                Some("tp-p9"),
            ))
            .expect("json"),
        );
        snap.ports
            .push(Arc::new(serde_json::from_value(p9).expect("port")));
        let (d, _) = desired(&config(), &snap);
        assert_eq!(d.networks.len(), 1);
        let n = &d.networks[0];
        assert_eq!(
            n.ports,
            BTreeSet::from([IfName::new("tp-p9").expect("name")])
        );
        assert!(
            n.fdb.is_empty(),
            "the old network's port on n2 is no peer: {:?}",
            n.fdb
        );
        assert!(n.dhcp.is_none(), "the old network's subnet is not served");
        let fw = d.firewall.expect("ruleset");
        assert!(fw.tunnels[0].peers.is_empty());
        let mut sn = serde_json::to_value(&*subnet("sn", "net", "10.9.0.0/24")).expect("json");
        sn = renew(sn);
        snap.subnets
            .push(Arc::new(serde_json::from_value(sn).expect("subnet")));
        let (d, _) = desired(&config(), &snap);
        let dh = d.networks[0].dhcp.as_ref().expect("dhcp");
        // The leases are the new port's only.
        assert_eq!(dh.spec.leases.len(), 1);
        assert_eq!(
            dh.spec.leases[0].mac,
            "02:00:00:00:00:09".parse().expect("mac")
        );
    }

    #[test]
    fn a_network_only_nodes_tunnel_address_comes_from_its_lease_before_any_hypervisor() {
        let lease = |node: &str, ip: &str| {
            Arc::new(
                serde_json::from_value::<Lease>(json!({
                    "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                    "metadata": {"name": node, "namespace": NETWORK_AGENT_LEASE_NAMESPACE,
                                 "annotations": {TUNNEL_IP_ANNOTATION: ip}},
                    "spec": {"holderIdentity": node},
                }))
                .expect("lease"),
            )
        };
        let mut snap = snapshot();
        // n3 runs the network role only (no Hypervisor); n2's Lease says another address
        // than its Hypervisor; a Lease in another namespace is nobody's.
        snap.ports.push(port(
            "p5",
            "net",
            "n3",
            "02:00:00:00:00:05",
            "10.9.0.15",
            None,
        ));
        snap.leases.push(lease("n3", "198.51.100.3"));
        snap.leases.push(lease("n2", "198.51.100.2"));
        let mut elsewhere: Lease = (*lease("n4", "198.51.100.4")).clone();
        elsewhere.metadata.namespace = Some("kube-node-lease".into());
        snap.leases.push(Arc::new(elsewhere));
        snap.ports.push(port(
            "p6",
            "net",
            "n4",
            "02:00:00:00:00:06",
            "10.9.0.16",
            None,
        ));
        let (d, _) = desired(&config(), &snap);
        let remotes: BTreeSet<Ipv4Addr> = d.networks[0].fdb.iter().map(|e| e.remote).collect();
        assert_eq!(
            remotes,
            BTreeSet::from([
                Ipv4Addr::new(198, 51, 100, 2),
                Ipv4Addr::new(198, 51, 100, 3)
            ])
        );
    }

    #[test]
    fn vxlan_is_taken_from_exactly_the_nodes_in_the_fdb() {
        let mut snap = snapshot();
        snap.ports.push(port(
            "p5",
            "net",
            "n3",
            "02:00:00:00:00:05",
            "10.9.0.15",
            None,
        ));
        snap.hypervisors.push(hypervisor("n3", "192.0.2.3"));
        snap.hypervisors.push(hypervisor("n5", "192.0.2.5"));
        let (d, _) = desired(&config(), &snap);
        let fw = d.firewall.expect("ruleset");
        assert_eq!(fw.tunnels.len(), 1);
        assert_eq!(fw.tunnels[0].vni, 5001);
        assert_eq!(fw.tunnels[0].port, VXLAN_PORT);
        assert_eq!(
            fw.tunnels[0].peers,
            BTreeSet::from([Ipv4Addr::new(192, 0, 2, 2), Ipv4Addr::new(192, 0, 2, 3)])
        );
        // Each port's filter takes DHCP replies from its network's server.
        assert_eq!(fw.ports[0].dhcp_server, Some(Ipv4Addr::new(10, 9, 0, 254)));
    }

    #[test]
    fn a_device_name_of_the_agents_own_is_refused() {
        for bad in ["lo", IfName::derived(Role::Bridge, "uid-net").as_str()] {
            let mut snap = snapshot();
            snap.ports[0] = port(
                "p1",
                "net",
                "n1",
                "02:00:00:00:00:01",
                "10.9.0.11",
                Some(bad),
            );
            let (_, plans) = desired(&config(), &snap);
            assert!(
                matches!(
                    plans.values().next(),
                    Some(PortPlan::Blocked {
                        reason: Reason::InvalidInterfaceName,
                        ..
                    })
                ),
                "{bad}"
            );
        }
    }
}
