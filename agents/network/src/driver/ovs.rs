//! The Open vSwitch datapath behind [`Links`]: [`OvsLinks`] keeps the agent's model of a
//! node (a bridge and a VXLAN device per network, their ports, the VXLAN devices' FDB) on
//! one OVS integration bridge, [`INTEGRATION_BRIDGE`] (userspace `netdev` datapath), and
//! drives the kernel through [`NetlinkLinks`] for everything else (namespaces, veths,
//! addresses, routes) and for the node's other namespaces.
//!
//! In the node's namespace:
//! - a network's bridge is an internal port of the integration bridge (a kernel device of
//!   that name whose OpenFlow port number is the network's local id);
//! - a port put on a network's bridge is a port of the integration bridge marked with that
//!   network;
//! - a VXLAN device is a record in the integration bridge's `external_ids` (VNI, local
//!   address, UDP port, MTU, up, bridge, FDB); its FDB's remotes become one VXLAN tunnel
//!   port per peer node (`options:key=flow`), made only while some network's FDB names that
//!   peer;
//! - a VLAN sub-interface is a record too (ID, physical interface), and a flat network's
//!   physical interface (one [`OvsLinks::with_physical`] names) put on its bridge is marked
//!   with that network: the physical interface is a port of the integration bridge, the
//!   uplink to the wire (tagged or untagged), while some network uses it;
//! - forwarding and isolation are OpenFlow flows ([`super::ovs_flows`]), written in one
//!   `--bundle` after every change and checked on every read: an object whose flows are not
//!   all installed (a flow deleted by hand, a switch restarted) reads as not in place (its
//!   port off the bridge, its bridge down, its FDB empty), so the agent's plan repairs it.
//!
//! Everything is stored in the switch's database or in the kernel; nothing is remembered
//! between calls. Commands are argument vectors.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::conntrack::{self, Connection, Keep};
use super::names::digest_hex;
use super::netlink::NetlinkLinks;
use super::netns;
use super::ovs_daemon::{Ovs, OvsDaemon, OvsError};
use super::ovs_flows::{
    self, Bundle, Flow, NetworkFlows, PortFilterSpec, Switch, TunnelFlows, VlanFlows,
};
use super::{
    Attach, FdbEntry, IfName, Ipv4Cidr, Link, LinkError, LinkKind, Links, MacAddr, Name, Netns,
    RouteSpec, VethSpec, VlanSpec, VxlanInfo, VxlanSpec,
};

/// The integration bridge every network's ports are on.
pub const INTEGRATION_BRIDGE: &str = "br-int";

/// The `external_ids` key marking what an interface is to the agent.
const ROLE: &str = "stratus-role";
/// The `external_ids` key naming the network bridge a port is on.
const NETWORK: &str = "stratus-network";
/// The prefix of the integration bridge's `external_ids` keys holding VXLAN devices.
const VXLAN_KEY: &str = "stratus-vxlan-";
/// The prefix of the keys holding VLAN sub-interfaces.
const VLAN_KEY: &str = "stratus-vlan-";

/// The integration bridge's `external_ids` key saying a firewall is applied.
const FIREWALL_KEY: &str = "stratus-fw";
/// The key holding the firewall's conntrack zones, by network bridge.
const ZONES_KEY: &str = "stratus-fw-zones";
/// The key holding the local DHCP servers' addresses, by VXLAN device.
const DHCP_KEY: &str = "stratus-fw-dhcp";
/// The prefix of the keys holding each filtered port's filter, by device.
const PORT_KEY: &str = "stratus-fw-port-";

/// The most bytes of values one `ovs-vsctl` call is given (the kernel limits one argument
/// to 128 KiB and all of them to a few MiB).
const VSCTL_BATCH_BYTES: usize = 256 * 1024;

/// The node's firewall as the switch's database keeps it (each port's filter under a key
/// of its own, so that no one value grows with the node).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FirewallState {
    /// Conntrack zones by network bridge.
    pub zones: BTreeMap<String, u16>,
    /// Local DHCP servers' addresses by VXLAN device.
    pub local_dhcp: BTreeMap<String, Ipv4Addr>,
    /// Filters by port device (ports with port security only).
    pub ports: BTreeMap<String, PortFilterSpec>,
}

impl FirewallState {
    /// Its `external_ids` keys and values.
    fn keys(&self) -> BTreeMap<String, String> {
        let mut out = BTreeMap::from([
            (FIREWALL_KEY.to_owned(), "1".to_owned()),
            (ZONES_KEY.to_owned(), json(&self.zones)),
            (DHCP_KEY.to_owned(), json(&self.local_dhcp)),
        ]);
        for (device, f) in &self.ports {
            out.insert(format!("{PORT_KEY}{device}"), json(f));
        }
        out
    }

    /// Read back from `external_ids`; `None` when no firewall is applied.
    fn parse(ext: &BTreeMap<String, String>) -> Option<Self> {
        ext.get(FIREWALL_KEY)?;
        let mut f = FirewallState {
            zones: ext
                .get(ZONES_KEY)
                .and_then(|v| serde_json::from_str(v).ok())
                .unwrap_or_default(),
            local_dhcp: ext
                .get(DHCP_KEY)
                .and_then(|v| serde_json::from_str(v).ok())
                .unwrap_or_default(),
            ports: BTreeMap::new(),
        };
        for (k, v) in ext {
            if let Some(device) = k.strip_prefix(PORT_KEY) {
                // A filter that does not parse filters everything: the port keeps an
                // empty filter rather than none.
                let spec = serde_json::from_str(v).unwrap_or_else(|_| PortFilterSpec {
                    mac: String::new(),
                    ips: BTreeSet::new(),
                    dhcp_server: None,
                    ingress: Vec::new(),
                    egress: Vec::new(),
                });
                f.ports.insert(device.to_owned(), spec);
            }
        }
        Some(f)
    }
}

/// `v` as JSON (maps of strings and the filter types always serialise).
fn json<T: Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_default()
}

/// The MTU of a VXLAN device made without one (the kernel's for a VXLAN device on a 1500
/// byte underlay).
const VXLAN_MTU: u32 = 1450;

fn ovs_err(e: OvsError) -> LinkError {
    LinkError::Io {
        what: "open vswitch".into(),
        source: std::io::Error::other(e.to_string()),
    }
}

/// A VXLAN device as the switch's database keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct VxlanRecord {
    vni: u32,
    local: Ipv4Addr,
    port: u16,
    mtu: u32,
    up: bool,
    master: Option<String>,
    fdb: Vec<(String, Ipv4Addr)>,
}

impl VxlanRecord {
    fn info(&self) -> VxlanInfo {
        VxlanInfo {
            vni: self.vni,
            local: Some(self.local),
            port: self.port,
            learning: false,
        }
    }

    fn entries(&self) -> BTreeSet<FdbEntry> {
        self.fdb
            .iter()
            .filter_map(|(m, remote)| {
                Some(FdbEntry {
                    mac: m.parse().ok()?,
                    remote: *remote,
                })
            })
            .collect()
    }
}

/// A VLAN sub-interface as the switch's database keeps it: no kernel device, a tag on its
/// physical interface, which is a port of the integration bridge while a network's VLAN
/// sub-interface on it is on the network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct VlanRecord {
    parent: String,
    id: u16,
    up: bool,
    master: Option<String>,
}

/// What an interface of the integration bridge is to the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Role {
    /// A network's bridge.
    Network,
    /// A port of the network bridge named.
    Port(String),
    /// A tunnel to a peer: (remote, local, UDP port).
    Tunnel(Ipv4Addr, Ipv4Addr, u16),
    /// A physical interface carrying vlan networks' tagged frames, and the untagged frames
    /// of the flat network (bridge name) named.
    Physical(Option<String>),
}

#[derive(Debug, Clone)]
struct Iface {
    role: Role,
    ofport: Option<u32>,
}

/// The switch as its database has it.
#[derive(Debug, Clone, Default)]
struct State {
    bridge: bool,
    ifaces: BTreeMap<String, Iface>,
    vxlans: BTreeMap<String, VxlanRecord>,
    vlans: BTreeMap<String, VlanRecord>,
    /// The integration bridge's `external_ids` keys of the firewall, as stored.
    firewall_keys: BTreeMap<String, String>,
    firewall: Option<FirewallState>,
}

/// OVSDB's JSON for a map column, as pairs of strings.
fn map(v: &Value) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    if let Some(pairs) = v.get(1).and_then(Value::as_array) {
        for p in pairs {
            if let (Some(k), Some(v)) = (
                p.get(0).and_then(Value::as_str),
                p.get(1).and_then(Value::as_str),
            ) {
                out.insert(k.to_owned(), v.to_owned());
            }
        }
    }
    out
}

fn parse_error(detail: impl Into<String>) -> LinkError {
    ovs_err(OvsError::Parse {
        what: "the switch's database".into(),
        detail: detail.into(),
    })
}

/// The rows of one table of `ovs-vsctl --format=json list` output.
#[cfg(test)]
fn rows(line: &str) -> Result<Vec<Vec<Value>>, LinkError> {
    let v: Value = serde_json::from_str(line).map_err(|e| parse_error(e.to_string()))?;
    let data = v
        .get("data")
        .and_then(Value::as_array)
        .ok_or_else(|| parse_error("no data"))?;
    Ok(data.iter().filter_map(|r| r.as_array().cloned()).collect())
}

/// The columns of the database that the switch's state is read from, per table.
const IFACE_COLUMNS: [&str; 4] = ["name", "ofport", "options", "external_ids"];
/// See [`IFACE_COLUMNS`].
const BRIDGE_COLUMNS: [&str; 2] = ["name", "external_ids"];

/// The rows of a `select` operation's result, each its `columns` in that order.
fn selected(result: &Value, columns: &[&str]) -> Result<Vec<Vec<Value>>, LinkError> {
    let rows = result
        .get("rows")
        .and_then(Value::as_array)
        .ok_or_else(|| parse_error("no rows"))?;
    Ok(rows
        .iter()
        .map(|r| {
            columns
                .iter()
                .map(|c| r.get(*c).cloned().unwrap_or(Value::Null))
                .collect()
        })
        .collect())
}

impl State {
    /// From `ovs-vsctl --format=json` listing [`IFACE_COLUMNS`] of `Interface`, then
    /// [`BRIDGE_COLUMNS`] of `Bridge`.
    #[cfg(test)]
    fn parse(out: &str) -> Result<Self, LinkError> {
        let mut lines = out.lines().filter(|l| !l.trim().is_empty());
        let (Some(ifaces), Some(bridges)) = (lines.next(), lines.next()) else {
            return Err(parse_error("expected two tables"));
        };
        Self::of_rows(rows(ifaces)?, rows(bridges)?)
    }

    /// From the rows of `Interface` ([`IFACE_COLUMNS`]) and `Bridge` ([`BRIDGE_COLUMNS`]),
    /// values in OVSDB's JSON (a map as `["map", [[k, v], …]]`, an empty optional value as
    /// `["set", []]`).
    fn of_rows(ifaces: Vec<Vec<Value>>, bridges: Vec<Vec<Value>>) -> Result<Self, LinkError> {
        let mut s = State::default();
        for r in ifaces {
            let [name, ofport, options, ext] = r.as_slice() else {
                return Err(parse_error("interface row"));
            };
            let Some(name) = name.as_str() else { continue };
            let ext = map(ext);
            let options = map(options);
            let role = match ext.get(ROLE).map(String::as_str) {
                Some("network") => Role::Network,
                Some("physical") => Role::Physical(ext.get(NETWORK).cloned()),
                Some("port") => match ext.get(NETWORK) {
                    Some(n) => Role::Port(n.clone()),
                    None => continue,
                },
                Some("tunnel") => {
                    let ip = |k: &str| options.get(k).and_then(|v| v.parse().ok());
                    let (Some(remote), Some(local)) = (ip("remote_ip"), ip("local_ip")) else {
                        continue;
                    };
                    let port = options
                        .get("dst_port")
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(super::VXLAN_PORT);
                    Role::Tunnel(remote, local, port)
                }
                _ => continue,
            };
            let ofport = ofport
                .as_i64()
                .and_then(|p| u32::try_from(p).ok())
                .filter(|p| *p > 0 && *p < 0xff00);
            s.ifaces.insert(name.to_owned(), Iface { role, ofport });
        }
        for r in bridges {
            let [name, ext] = r.as_slice() else {
                return Err(parse_error("bridge row"));
            };
            if name.as_str() != Some(INTEGRATION_BRIDGE) {
                continue;
            }
            s.bridge = true;
            let ext = map(ext);
            s.firewall_keys = ext
                .iter()
                .filter(|(k, _)| k.starts_with(FIREWALL_KEY))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            s.firewall = FirewallState::parse(&s.firewall_keys);
            for (k, v) in ext {
                if let Some(vx) = k.strip_prefix(VXLAN_KEY)
                    && let Ok(rec) = serde_json::from_str::<VxlanRecord>(&v)
                {
                    s.vxlans.insert(vx.to_owned(), rec);
                }
                if let Some(vl) = k.strip_prefix(VLAN_KEY)
                    && let Ok(rec) = serde_json::from_str::<VlanRecord>(&v)
                {
                    s.vlans.insert(vl.to_owned(), rec);
                }
            }
        }
        Ok(s)
    }

    fn is_network(&self, name: &str) -> bool {
        self.ifaces
            .get(name)
            .is_some_and(|i| i.role == Role::Network)
    }

    /// The tunnel port to `remote` from `local` on `port`, if made.
    fn tunnel(&self, remote: Ipv4Addr, local: Ipv4Addr, port: u16) -> Option<u32> {
        self.ifaces
            .values()
            .find(|i| i.role == Role::Tunnel(remote, local, port))
            .and_then(|i| i.ofport)
    }

    /// The tunnels the VXLAN devices on a network bridge need.
    fn needed_tunnels(&self) -> BTreeSet<(Ipv4Addr, Ipv4Addr, u16)> {
        self.vxlans
            .values()
            .filter(|v| v.master.as_deref().is_some_and(|m| self.is_network(m)))
            .flat_map(|v| {
                v.entries()
                    .into_iter()
                    .map(move |e| (e.remote, v.local, v.port))
            })
            .collect()
    }

    /// The physical interfaces the VLAN sub-interfaces on a network bridge and the flat
    /// networks need on the switch.
    fn needed_physicals(&self) -> BTreeSet<String> {
        self.vlans
            .values()
            .filter(|v| v.master.as_deref().is_some_and(|m| self.is_network(m)))
            .map(|v| v.parent.clone())
            .chain(self.flat_uplinks().map(|(name, _)| name.clone()))
            .collect()
    }

    /// The physical interfaces carrying a flat network, with its bridge.
    fn flat_uplinks(&self) -> impl Iterator<Item = (&String, &String)> {
        self.ifaces.iter().filter_map(|(name, i)| match &i.role {
            Role::Physical(Some(net)) if self.is_network(net) => Some((name, net)),
            _ => None,
        })
    }

    /// Whether `name` is a device of the switch's model only (a VXLAN device or a VLAN
    /// sub-interface).
    fn is_record(&self, name: &str) -> bool {
        self.vxlans.contains_key(name) || self.vlans.contains_key(name)
    }

    /// What the flows are made from.
    fn switch(&self) -> Switch {
        let mut networks = Vec::new();
        for (name, i) in &self.ifaces {
            let (Role::Network, Some(id), Ok(ifname)) = (&i.role, i.ofport, IfName::new(name))
            else {
                continue;
            };
            let mut ports = BTreeSet::new();
            let mut filters = BTreeMap::new();
            for (device, p) in &self.ifaces {
                let (true, Some(ofport)) = (p.role == Role::Port(name.clone()), p.ofport) else {
                    continue;
                };
                ports.insert(ofport);
                if let Some(f) = self.firewall.as_ref().and_then(|f| f.ports.get(device)) {
                    filters.insert(ofport, f.clone());
                }
            }
            let fw = self.firewall.as_ref();
            let zone = fw
                .and_then(|f| f.zones.get(name))
                .copied()
                .unwrap_or_else(|| u16::try_from(id).unwrap_or(u16::MAX));
            // Keyed by the network's uplink: its VXLAN device, its VLAN sub-interface or its
            // flat network's physical interface.
            let on_network = |master: &Option<String>| master.as_deref() == Some(name.as_str());
            let flat = self.flat_uplinks().find(|(_, net)| *net == name);
            let local_dhcp = self
                .vxlans
                .iter()
                .filter(|(_, v)| on_network(&v.master))
                .map(|(n, _)| n)
                .chain(
                    self.vlans
                        .iter()
                        .filter(|(_, v)| on_network(&v.master))
                        .map(|(n, _)| n),
                )
                .chain(flat.map(|(n, _)| n))
                .find_map(|up| fw.and_then(|f| f.local_dhcp.get(up)).copied());
            let tunnel = self
                .vxlans
                .values()
                .find(|v| v.master.as_deref() == Some(name.as_str()))
                .map(|v| {
                    let mut t = TunnelFlows {
                        vni: v.vni,
                        flood: BTreeSet::new(),
                        macs: BTreeMap::new(),
                    };
                    for e in v.entries() {
                        let Some(p) = self.tunnel(e.remote, v.local, v.port) else {
                            continue;
                        };
                        if e.mac == MacAddr::ZERO {
                            t.flood.insert(p);
                        } else {
                            t.macs.insert(e.mac, p);
                        }
                    }
                    t
                });
            let vlan = self
                .vlans
                .values()
                .filter(|v| v.master.as_deref() == Some(name.as_str()))
                .find_map(|v| {
                    let i = self.ifaces.get(&v.parent)?;
                    matches!(i.role, Role::Physical(_)).then_some(VlanFlows {
                        id: v.id,
                        port: i.ofport?,
                    })
                });
            networks.push(NetworkFlows {
                name: ifname,
                id,
                ports,
                tunnel,
                zone,
                filters,
                local_dhcp,
                vlan,
                flat: flat.and_then(|(phys, _)| self.ifaces.get(phys)?.ofport),
            });
        }
        Switch { networks }
    }
}

/// The name of the tunnel port to `remote` from `local` on UDP `port`.
fn tunnel_name(remote: Ipv4Addr, local: Ipv4Addr, port: u16) -> String {
    format!("vt-{}", digest_hex(&format!("{remote}/{local}/{port}"), 12))
}

/// What of the switch's objects is not all installed.
#[derive(Debug, Default)]
struct Health {
    /// The node's base flows are incomplete: every network reads as down.
    base: bool,
    /// Networks (bridge names) whose flows are incomplete.
    networks: BTreeSet<String>,
    /// Ports (OpenFlow port numbers) whose flows are incomplete.
    ports: BTreeSet<u32>,
}

/// What a batch ([`Links::begin`] to [`Links::end`]) knows of the switch.
#[derive(Debug, Default)]
struct Batch {
    /// The database as last read in the batch; dropped by every write to it.
    state: Option<Arc<State>>,
    /// The owned flows installed, as last dumped in the batch or as its bundle left them.
    flows: Option<Arc<BTreeMap<u64, usize>>>,
    /// A change waits for its tunnels and flows until the flush.
    pending: bool,
    /// Ports to put on the switch (`ovs-vsctl` commands), held back until the next write
    /// to the switch or the flush, so that they share its transaction: one reconfiguration
    /// of the switch for a network's ports and its tunnels.
    ports: Vec<Vec<String>>,
    /// The flows rendered from the state they were rendered from (kept alive, so that its
    /// address names it).
    rendered: Option<(Arc<State>, Arc<Vec<Flow>>)>,
}

/// The node's links with its networks on Open vSwitch. See the module's documentation.
pub struct OvsLinks {
    kernel: NetlinkLinks,
    ovs: Ovs,
    netns: Netns,
    daemon: Option<OvsDaemon>,
    /// The node's physical interfaces (of its physical networks): a flat network's is put
    /// on the switch as an uplink, not as a port.
    physical: BTreeSet<String>,
    lock: Mutex<()>,
    batch: Mutex<Option<Batch>>,
}

impl OvsLinks {
    /// The networks of the node in `netns` on the switch `ovs` drives (one already running,
    /// such as the system's).
    pub fn new(netns: Netns, ovs: Ovs) -> Self {
        Self {
            kernel: NetlinkLinks::new(),
            ovs,
            netns,
            daemon: None,
            physical: BTreeSet::new(),
            lock: Mutex::new(()),
            batch: Mutex::new(None),
        }
    }

    /// The networks of the node in `netns` on a switch of its own: `daemon` is started
    /// whenever it is found not running (so a crashed switch comes back, its flows
    /// rewritten by the next reconcile) and stopped when the node's namespace is deleted.
    pub fn with_daemon(netns: Netns, daemon: OvsDaemon) -> Self {
        Self {
            ovs: daemon.ovs(),
            daemon: Some(daemon),
            ..Self::new(netns, Ovs::system())
        }
    }

    /// With `ifaces` as the node's physical interfaces: the flat networks bridged to one
    /// carry its untagged frames from and to the wire (never flooded back to it, no DHCP
    /// from it, the node's DHCP server out of its reach), as a VLAN carries its tag's.
    #[must_use]
    pub fn with_physical(mut self, ifaces: impl IntoIterator<Item = IfName>) -> Self {
        self.physical = ifaces.into_iter().map(|i| i.to_string()).collect();
        self
    }

    /// Deletes the stale connections `keep` names ([`conntrack::prune`]) in the switch's
    /// connection tracker (the userspace datapath's): each zone's are listed once and the
    /// stale ones flushed by their origin tuple; every one is tried.
    ///
    /// # Errors
    /// `ovs-appctl` failed.
    pub fn forget(&self, keep: &Keep) -> Result<(), LinkError> {
        let list = |zone: u16| -> Result<Vec<Connection>, OvsError> {
            let dump = self
                .ovs
                .appctl(&["dpctl/dump-conntrack", &format!("zone={zone}")])?;
            Ok(Connection::parse_dump(&dump))
        };
        let delete = |zone: u16, c: &Connection| -> Result<(), OvsError> {
            match self
                .ovs
                .appctl(&["dpctl/flush-conntrack", &format!("zone={zone}"), &c.tuple()])
            {
                // Gone since the listing (it says so with ENOENT).
                Err(OvsError::Command { stderr, .. })
                    if stderr.contains("(No such file or directory)") =>
                {
                    Ok(())
                }
                r => r.map(|_| ()),
            }
        };
        conntrack::prune(keep, list, delete).map_err(|what| LinkError::Io {
            source: std::io::Error::other(what.clone()),
            what: format!("forget connections: {what}"),
        })
    }

    fn mine(&self, ns: &Netns) -> bool {
        *ns == self.netns
    }

    /// Makes sure the switch runs and has its integration bridge, and reads it.
    fn state(&self, ns: &Netns) -> Result<Arc<State>, LinkError> {
        if !netns::exists(ns) {
            return Err(LinkError::NoNetns(ns.clone()));
        }
        if let Some(d) = &self.daemon
            && !d.running()
        {
            d.start().map_err(ovs_err)?;
        }
        let s = self.read()?;
        if s.bridge {
            return Ok(s);
        }
        self.write(&[
            "--may-exist",
            "add-br",
            INTEGRATION_BRIDGE,
            "--",
            "set",
            "Bridge",
            INTEGRATION_BRIDGE,
            "datapath_type=netdev",
            "fail_mode=secure",
        ])
        .map_err(ovs_err)?;
        let s = self.read()?;
        self.sync(&s)?;
        Ok(s)
    }

    /// `f` of the batch under way, if one is.
    fn in_batch<T>(&self, f: impl FnOnce(&mut Batch) -> T) -> Option<T> {
        self.batch
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_mut()
            .map(f)
    }

    /// `ovs-vsctl ARGS`, waiting for `ovs-vswitchd`: a change, which a batch's reads see.
    /// Ports a batch holds back go first, in the same transaction when they fit in one
    /// call with `args`.
    fn write(&self, args: &[&str]) -> Result<String, OvsError> {
        let held = self.take_held();
        let size: usize = held.iter().flatten().map(String::len).sum::<usize>()
            + args.iter().map(|a| a.len()).sum::<usize>();
        if held.is_empty() || size > VSCTL_BATCH_BYTES {
            self.write_all(held)?;
            if args.is_empty() {
                return Ok(String::new());
            }
            return self.ovs.vsctl(args);
        }
        let mut all: Vec<&str> = held.iter().flatten().map(String::as_str).collect();
        if args.first().is_some_and(|a| *a != "--") {
            all.push("--");
        }
        all.extend(args);
        self.ovs.vsctl(&all)
    }

    /// `ovs-vsctl --no-wait ARGS`: a change to the database only (after the ports a batch
    /// holds back, which are waited for).
    fn write_no_wait(&self, args: &[&str]) -> Result<String, OvsError> {
        let held = self.take_held();
        self.write_all(held)?;
        self.ovs.vsctl_no_wait(args)
    }

    /// The ports a batch holds back (`ovs-vsctl` commands, each starting with `--`), taken
    /// from it; the batch's reads are out of date from here on.
    fn take_held(&self) -> Vec<Vec<String>> {
        self.in_batch(|b| {
            b.state = None;
            std::mem::take(&mut b.ports)
        })
        .unwrap_or_default()
    }

    /// `commands` in calls of bounded size, waiting for the switch.
    fn write_all(&self, commands: Vec<Vec<String>>) -> Result<(), OvsError> {
        for b in batched(commands) {
            let args: Vec<&str> = b.iter().map(String::as_str).collect();
            self.ovs.vsctl(&args)?;
        }
        Ok(())
    }

    /// Whether a batch holds ports back.
    fn holds_ports(&self) -> bool {
        self.in_batch(|b| !b.ports.is_empty()).unwrap_or(false)
    }

    /// The flows `s` renders; in a batch rendered once per state read or written.
    fn render(&self, s: &Arc<State>) -> Arc<Vec<Flow>> {
        if let Some(f) = self
            .in_batch(|b| {
                b.rendered
                    .as_ref()
                    .filter(|(of, _)| Arc::ptr_eq(of, s))
                    .map(|(_, f)| Arc::clone(f))
            })
            .flatten()
        {
            return f;
        }
        let f = Arc::new(ovs_flows::render(&s.switch()));
        self.in_batch(|b| b.rendered = Some((Arc::clone(s), Arc::clone(&f))));
        f
    }

    /// The switch's database: read now, or in a batch as last read (nothing was written
    /// since).
    fn read(&self) -> Result<Arc<State>, LinkError> {
        if let Some(s) = self.in_batch(|b| b.state.clone()).flatten() {
            return Ok(s);
        }
        let held = self.take_held();
        self.write_all(held).map_err(ovs_err)?;
        let s = Arc::new(self.read_now()?);
        self.in_batch(|b| b.state = Some(Arc::clone(&s)));
        Ok(s)
    }

    /// The database read on its socket (no process per read: the agent reads it every
    /// converge).
    fn read_now(&self) -> Result<State, LinkError> {
        let select = |table: &str, columns: &[&str]| serde_json::json!({"op": "select", "table": table, "where": [], "columns": columns});
        let results = self
            .ovs
            .transact(vec![
                select("Interface", &IFACE_COLUMNS),
                select("Bridge", &BRIDGE_COLUMNS),
            ])
            .map_err(ovs_err)?;
        State::of_rows(
            selected(&results[0], &IFACE_COLUMNS)?,
            selected(&results[1], &BRIDGE_COLUMNS)?,
        )
    }

    /// The owned flows installed: dumped now, or in a batch as last dumped or written.
    fn dump(&self) -> Result<Arc<BTreeMap<u64, usize>>, LinkError> {
        if let Some(f) = self.in_batch(|b| b.flows.clone()).flatten() {
            return Ok(f);
        }
        let out = self
            .ovs
            .ofctl(&["--no-stats"], "dump-flows", INTEGRATION_BRIDGE, &[], None)
            .map_err(ovs_err)?;
        let f = Arc::new(ovs_flows::installed(&out));
        self.in_batch(|b| b.flows = Some(Arc::clone(&f)));
        Ok(f)
    }

    /// Which objects' flows are incomplete.
    fn health(&self, s: &Arc<State>) -> Result<Health, LinkError> {
        let want = self.render(s);
        let broken = ovs_flows::broken(&want, &*self.dump()?);
        let mut h = Health::default();
        let networks = if broken.is_empty() {
            Vec::new()
        } else {
            s.switch().networks
        };
        for f in want.iter().filter(|f| broken.contains(&f.cookie)) {
            match (f.cookie >> 56) as u8 {
                ovs_flows::KIND_BASE => h.base = true,
                ovs_flows::KIND_PORT => {
                    if let Some(p) = port_of(&f.text) {
                        h.ports.insert(p);
                    }
                }
                _ => {
                    if let Some(n) = networks
                        .iter()
                        .find(|n| f.text.contains(&format!("reg6={},", n.id)))
                    {
                        h.networks.insert(n.name.to_string());
                    }
                }
            }
        }
        Ok(h)
    }

    /// Makes the tunnel ports those the VXLAN devices need, then the flows those `s`
    /// renders, in one bundle; in a batch, once at its flush.
    fn sync(&self, s: &Arc<State>) -> Result<(), LinkError> {
        if self.in_batch(|b| b.pending = true).is_some() {
            return Ok(());
        }
        self.write_switch(s)
    }

    /// [`sync`](Self::sync) of the switch as read now.
    fn resync(&self) -> Result<(), LinkError> {
        let s = self.read()?;
        self.sync(&s)
    }

    fn write_switch(&self, s: &Arc<State>) -> Result<(), LinkError> {
        let needed = s.needed_tunnels();
        let mut args: Vec<String> = Vec::new();
        for (name, i) in &s.ifaces {
            if let Role::Tunnel(r, l, p) = i.role
                && (!needed.contains(&(r, l, p)) || *name != tunnel_name(r, l, p))
            {
                args.extend(
                    ["--", "--if-exists", "del-port", INTEGRATION_BRIDGE, name].map(String::from),
                );
            }
        }
        let physicals = s.needed_physicals();
        for (name, i) in &s.ifaces {
            if matches!(i.role, Role::Physical(_)) && !physicals.contains(name) {
                args.extend(
                    ["--", "--if-exists", "del-port", INTEGRATION_BRIDGE, name].map(String::from),
                );
            }
        }
        for name in physicals.iter().filter(|p| {
            s.ifaces
                .get(*p)
                .is_none_or(|i| !matches!(i.role, Role::Physical(_)))
        }) {
            args.extend(physical_args(name, None));
        }
        for &(r, l, p) in &needed {
            let name = tunnel_name(r, l, p);
            if s.ifaces
                .get(&name)
                .is_some_and(|i| i.role == Role::Tunnel(r, l, p))
            {
                continue;
            }
            args.extend(add_port_args(
                &name,
                [
                    "type=vxlan".to_owned(),
                    "options:key=flow".to_owned(),
                    format!("options:remote_ip={r}"),
                    format!("options:local_ip={l}"),
                    format!("options:dst_port={p}"),
                    format!("external_ids:{ROLE}=tunnel"),
                ],
            ));
        }
        let fresh;
        let s = if args.is_empty() && !self.holds_ports() {
            s
        } else {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            self.write(&args).map_err(ovs_err)?;
            fresh = self.read()?;
            &fresh
        };
        let want = self.render(s);
        let bundle = Bundle::between(&want, &*self.dump()?);
        if !bundle.is_empty() {
            self.in_batch(|b| b.flows = None);
            self.ovs
                .ofctl(
                    &["--bundle"],
                    "add-flows",
                    INTEGRATION_BRIDGE,
                    &["-"],
                    Some(&bundle.text()),
                )
                .map_err(ovs_err)?;
            // The bundle is atomic: the owned flows are now exactly the wanted ones.
            self.in_batch(|b| b.flows = Some(Arc::new(ovs_flows::counts(&want))));
        }
        Ok(())
    }

    fn write_vxlan(&self, name: &str, rec: &VxlanRecord) -> Result<(), LinkError> {
        self.write_record(VXLAN_KEY, name, Some(rec))
    }

    /// Changes a VXLAN device's record, then the switch.
    fn change_vxlan(
        &self,
        ns: &Netns,
        name: &IfName,
        change: impl FnOnce(&mut VxlanRecord),
    ) -> Result<bool, LinkError> {
        self.change_record(ns, name, VXLAN_KEY, |s| &s.vxlans, change)
    }

    /// Changes a VLAN sub-interface's record, then the switch.
    fn change_vlan(
        &self,
        ns: &Netns,
        name: &IfName,
        change: impl FnOnce(&mut VlanRecord),
    ) -> Result<bool, LinkError> {
        self.change_record(ns, name, VLAN_KEY, |s| &s.vlans, change)
    }

    /// Changes the record `name` of the kind `records` picks (stored under `prefix`), then
    /// the switch; `false` when there is no such record.
    fn change_record<T: Clone + PartialEq + Serialize>(
        &self,
        ns: &Netns,
        name: &IfName,
        prefix: &str,
        records: impl FnOnce(&State) -> &BTreeMap<String, T>,
        change: impl FnOnce(&mut T),
    ) -> Result<bool, LinkError> {
        let s = self.state(ns)?;
        let Some(mut rec) = records(&s).get(name.as_str()).cloned() else {
            return Ok(false);
        };
        let before = rec.clone();
        change(&mut rec);
        if rec != before {
            self.write_record(prefix, name.as_str(), Some(&rec))?;
            self.resync()?;
        }
        Ok(true)
    }

    /// Writes (or with `None` removes) the record `name` under `prefix`.
    fn write_record<T: Serialize>(
        &self,
        prefix: &str,
        name: &str,
        rec: Option<&T>,
    ) -> Result<(), LinkError> {
        let key = format!("{prefix}{name}");
        let mut args = vec!["br-set-external-id", INTEGRATION_BRIDGE, &key];
        let json = rec
            .map(serde_json::to_string)
            .transpose()
            .map_err(|e| LinkError::Invalid(e.to_string()))?;
        args.extend(json.as_deref());
        self.write_no_wait(&args).map_err(ovs_err)?;
        Ok(())
    }

    /// Makes the node's firewall `firewall` (or none), then the flows: every filtered port's
    /// filter is written with the rest of its flows, in the same bundle.
    ///
    /// # Errors
    /// The switch refused.
    pub fn set_firewall(&self, firewall: Option<&FirewallState>) -> Result<(), LinkError> {
        let _g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        // Ports held back are written first, so that the state read here has them.
        if self.holds_ports() {
            let held = self.take_held();
            self.write_all(held).map_err(ovs_err)?;
        }
        let s = self.state(&self.netns)?;
        let want = firewall.map(FirewallState::keys).unwrap_or_default();
        // The keys that change or go are deleted and the changed ones inserted again, in one
        // transaction on the database's socket: a firewall is never read half written.
        let stale: Vec<&String> = s
            .firewall_keys
            .iter()
            .filter(|(k, v)| want.get(*k) != Some(*v))
            .map(|(k, _)| k)
            .collect();
        let fresh: Vec<[&String; 2]> = want
            .iter()
            .filter(|(k, v)| s.firewall_keys.get(*k) != Some(*v))
            .map(|(k, v)| [k, v])
            .collect();
        if !stale.is_empty() || !fresh.is_empty() {
            let op = serde_json::json!({
                "op": "mutate",
                "table": "Bridge",
                "where": [["name", "==", INTEGRATION_BRIDGE]],
                "mutations": [
                    ["external_ids", "delete", ["set", stale]],
                    ["external_ids", "insert", ["map", fresh]],
                ],
            });
            let done = self.ovs.transact(vec![op]).map_err(ovs_err)?;
            if done[0].get("count").and_then(Value::as_u64) != Some(1) {
                return Err(ovs_err(OvsError::Command {
                    what: "write the firewall".into(),
                    stderr: format!("no bridge {INTEGRATION_BRIDGE}"),
                }));
            }
        }
        // The switch as just written: only the firewall's keys changed (no second read of a
        // database that holds every port's filter).
        let mut written = State::clone(&s);
        written.firewall = firewall.cloned();
        written.firewall_keys = want;
        let written = Arc::new(written);
        self.in_batch(|b| b.state = Some(Arc::clone(&written)));
        self.sync(&written)
    }

    /// The firewall the switch's database holds, if one is applied.
    ///
    /// # Errors
    /// The switch could not be read.
    pub fn firewall(&self) -> Result<Option<FirewallState>, LinkError> {
        let _g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        Ok(self.state(&self.netns)?.firewall.clone())
    }

    /// Puts `name` on the integration bridge (if it is not) with its interface's columns
    /// set to `columns` (`key=value`, as `ovs-vsctl set` takes them), in one transaction.
    fn add_port(&self, name: &IfName, columns: &[String]) -> Result<(), LinkError> {
        let args = add_port_args(name.as_str(), columns.iter().cloned());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.write(&args).map_err(ovs_err)?;
        Ok(())
    }

    fn no_link(&self, ns: &Netns, name: &IfName) -> LinkError {
        LinkError::NoLink {
            netns: ns.clone(),
            name: name.clone(),
        }
    }

    /// `Ok` when nothing in the node's model is named `name` (no VXLAN or VLAN record of
    /// the switch's, no network, no kernel device), else the conflict naming what is.
    fn free(&self, s: &State, ns: &Netns, name: &IfName) -> Result<(), LinkError> {
        let found = if let Some(r) = s.vxlans.get(name.as_str()) {
            format!("{:?}", LinkKind::Vxlan(r.info()))
        } else if let Some(r) = s.vlans.get(name.as_str()) {
            format!("{:?} on {}", LinkKind::Vlan(r.id), r.parent)
        } else if s.is_network(name.as_str()) {
            format!("{:?}", LinkKind::Bridge)
        } else if let Some(l) = self.kernel.link(ns, name)? {
            format!("{:?}", l.kind)
        } else {
            return Ok(());
        };
        Err(LinkError::Conflict {
            netns: ns.clone(),
            name: name.clone(),
            found,
        })
    }

    /// The node's links: the kernel's, with the switch's view laid over them.
    fn overlay(&self, ns: &Netns) -> Result<Vec<Link>, LinkError> {
        let kernel = self.kernel.links(ns)?;
        let s = self.state(ns)?;
        let h = self.health(&s)?;
        let mut out = Vec::with_capacity(kernel.len() + s.vxlans.len());
        for mut l in kernel {
            match s.ifaces.get(l.name.as_str()) {
                Some(Iface {
                    role: Role::Network,
                    ..
                }) => {
                    l.kind = LinkKind::Bridge;
                    l.master = None;
                    l.up = l.up && !h.base && !h.networks.contains(l.name.as_str());
                }
                Some(Iface {
                    role: Role::Port(net),
                    ofport,
                }) => {
                    let in_place =
                        s.is_network(net) && ofport.is_some_and(|p| !h.ports.contains(&p));
                    l.master = if in_place {
                        IfName::new(net).ok()
                    } else {
                        None
                    };
                }
                // A flat network's uplink, while its network's flows are in place.
                Some(Iface {
                    role: Role::Physical(Some(net)),
                    ..
                }) if s.is_network(net) && !h.base && !h.networks.contains(net) => {
                    l.master = IfName::new(net).ok();
                }
                _ => {}
            }
            out.push(l);
        }
        for (name, rec) in &s.vlans {
            let Ok(name) = IfName::new(name) else {
                continue;
            };
            // Tagging and stripping are the network's flows.
            let master = rec
                .master
                .as_deref()
                .filter(|m| s.is_network(m) && !h.base && !h.networks.contains(*m))
                .and_then(|m| IfName::new(m).ok());
            let mtu = out
                .iter()
                .find(|l| l.name.as_str() == rec.parent)
                .map_or(1500, |l| l.mtu);
            out.push(Link {
                name,
                kind: LinkKind::Vlan(rec.id),
                mtu,
                up: rec.up,
                master,
                mac: None,
            });
        }
        for (name, rec) in &s.vxlans {
            let Ok(name) = IfName::new(name) else {
                continue;
            };
            out.push(Link {
                name,
                kind: LinkKind::Vxlan(rec.info()),
                mtu: rec.mtu,
                up: rec.up,
                master: rec
                    .master
                    .as_deref()
                    .filter(|m| s.is_network(m))
                    .and_then(|m| IfName::new(m).ok()),
                mac: None,
            });
        }
        Ok(out)
    }
}

/// The bridge that carries the node's tunnels in the userspace datapath.
pub const UNDERLAY_BRIDGE: &str = "br-phy";

/// Puts the node's tunnel interface `iface` (in `ns`) on the switch's underlay bridge
/// [`UNDERLAY_BRIDGE`] and moves its IPv4 addresses to that bridge's own device, which is
/// what the userspace datapath sends VXLAN from (it routes and resolves tunnel peers through
/// an OVS bridge, never through the kernel's stack). Idempotent: an interface already there
/// is left as it is. Returns the underlay address.
///
/// # Errors
/// The switch or the kernel refused; `iface` has no IPv4 address and the bridge none.
pub fn attach_underlay(ovs: &Ovs, ns: &Netns, iface: &IfName) -> Result<Ipv4Cidr, LinkError> {
    let kernel = NetlinkLinks::new();
    let bridge = IfName::new(UNDERLAY_BRIDGE).map_err(|e| LinkError::Invalid(e.to_string()))?;
    ovs.vsctl(&[
        "--may-exist",
        "add-br",
        UNDERLAY_BRIDGE,
        "--",
        "set",
        "Bridge",
        UNDERLAY_BRIDGE,
        "datapath_type=netdev",
        "--",
        "--may-exist",
        "add-port",
        UNDERLAY_BRIDGE,
        iface.as_str(),
    ])
    .map_err(ovs_err)?;
    for a in kernel.addresses(ns, iface)? {
        kernel.add_address(ns, &bridge, a)?;
        kernel.del_address(ns, iface, a)?;
    }
    kernel.set_up(ns, iface, true)?;
    kernel.set_up(ns, &bridge, true)?;
    kernel
        .addresses(ns, &bridge)?
        .into_iter()
        .next()
        .ok_or_else(|| LinkError::Invalid(format!("{iface} has no IPv4 address")))
}

/// `commands` (each `--` and its arguments) cut into `ovs-vsctl` calls of at most
/// [`VSCTL_BATCH_BYTES`] each (one command may go over it alone).
fn batched(commands: impl IntoIterator<Item = Vec<String>>) -> Vec<Vec<String>> {
    let mut batches: Vec<Vec<String>> = Vec::new();
    let mut size = 0;
    for args in commands {
        let n: usize = args.iter().map(String::len).sum();
        match batches.last_mut() {
            Some(b) if size + n <= VSCTL_BATCH_BYTES => {
                size += n;
                b.extend(args);
            }
            _ => {
                size = n;
                batches.push(args);
            }
        }
    }
    batches
}

/// The `ovs-vsctl` commands that put `name` on the integration bridge (if it is not) as a
/// port of the network `bridge`, one transaction's part.
fn port_args(name: &IfName, bridge: &IfName) -> Vec<String> {
    add_port_args(
        name.as_str(),
        [
            format!("external_ids:{ROLE}=port"),
            format!("external_ids:{NETWORK}={bridge}"),
        ],
    )
}

/// The `ovs-vsctl` commands that put the physical interface `name` on the integration
/// bridge (if it is not) as an uplink, and of the flat network `flat` if given.
fn physical_args(name: &str, flat: Option<&str>) -> Vec<String> {
    add_port_args(
        name,
        std::iter::once(format!("external_ids:{ROLE}=physical"))
            .chain(flat.map(|b| format!("external_ids:{NETWORK}={b}"))),
    )
}

/// The `ovs-vsctl` commands that put the interface `name` on the integration bridge (if it
/// is not) with its `columns` set (`key=value`, as `ovs-vsctl set Interface` takes them), one
/// transaction's part.
pub fn add_port_args(name: &str, columns: impl IntoIterator<Item = String>) -> Vec<String> {
    let mut args: Vec<String> = [
        "--",
        "--may-exist",
        "add-port",
        INTEGRATION_BRIDGE,
        name,
        "--",
        "set",
        "Interface",
        name,
    ]
    .map(String::from)
    .to_vec();
    args.extend(columns);
    args
}

/// The `ovs-vsctl` commands that make the physical interface `name` the uplink of the flat
/// network `bridge`, or of none (the switch then keeps it only while a vlan network needs
/// it).
fn flat_args(name: &str, bridge: Option<&str>) -> Vec<String> {
    match bridge {
        Some(_) => physical_args(name, bridge),
        None => [
            "--",
            "--if-exists",
            "remove",
            "Interface",
            name,
            "external_ids",
            NETWORK,
        ]
        .map(String::from)
        .to_vec(),
    }
}

/// The OpenFlow port a port object's flows are about (`in_port=N` of its first flow).
fn port_of(text: &str) -> Option<u32> {
    let rest = text
        .split("in_port=")
        .nth(1)
        .or_else(|| text.split("reg4=").nth(1))?;
    rest.split([' ', ',']).next()?.parse().ok()
}

impl Links for OvsLinks {
    fn add_netns(&self, name: &Name) -> Result<(), LinkError> {
        self.kernel.add_netns(name)
    }

    fn del_netns(&self, name: &Name) -> Result<(), LinkError> {
        if self.netns == Netns::Named(name.clone())
            && let Some(d) = &self.daemon
        {
            d.stop().map_err(ovs_err)?;
        }
        self.kernel.del_netns(name)
    }

    fn list_netns(&self) -> Result<BTreeSet<Name>, LinkError> {
        self.kernel.list_netns()
    }

    fn links(&self, ns: &Netns) -> Result<Vec<Link>, LinkError> {
        if !self.mine(ns) {
            return self.kernel.links(ns);
        }
        let _g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        self.overlay(ns)
    }

    fn link(&self, ns: &Netns, name: &IfName) -> Result<Option<Link>, LinkError> {
        if !self.mine(ns) {
            return self.kernel.link(ns, name);
        }
        Ok(self.links(ns)?.into_iter().find(|l| l.name == *name))
    }

    fn add_bridge(&self, ns: &Netns, name: &IfName) -> Result<(), LinkError> {
        if !self.mine(ns) {
            return self.kernel.add_bridge(ns, name);
        }
        let _g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        let s = self.state(ns)?;
        if s.is_network(name.as_str()) {
            return Ok(());
        }
        self.free(&s, ns, name)?;
        self.add_port(
            name,
            &[
                "type=internal".into(),
                format!("external_ids:{ROLE}=network"),
            ],
        )?;
        // A bridge is made down, as the kernel makes one.
        self.kernel.set_up(ns, name, false)?;
        self.resync()
    }

    fn add_vxlan(&self, ns: &Netns, spec: &VxlanSpec) -> Result<(), LinkError> {
        if !self.mine(ns) {
            return self.kernel.add_vxlan(ns, spec);
        }
        if spec.vni >= 1 << 24 {
            return Err(LinkError::Invalid(format!(
                "VNI {} does not fit 24 bits",
                spec.vni
            )));
        }
        let _g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        let s = self.state(ns)?;
        let name = &spec.name;
        let want = VxlanInfo {
            vni: spec.vni,
            local: Some(spec.local),
            port: spec.port,
            learning: false,
        };
        if s.vxlans
            .get(name.as_str())
            .is_some_and(|r| r.info() == want)
        {
            return Ok(());
        }
        self.free(&s, ns, name)?;
        self.write_vxlan(
            name.as_str(),
            &VxlanRecord {
                vni: spec.vni,
                local: spec.local,
                port: spec.port,
                mtu: VXLAN_MTU,
                up: false,
                master: None,
                fdb: Vec::new(),
            },
        )
    }

    /// A record of the switch's (no kernel device: the switch tags and strips), on a
    /// physical interface that must exist.
    fn add_vlan(&self, ns: &Netns, spec: &VlanSpec) -> Result<(), LinkError> {
        if !self.mine(ns) {
            return self.kernel.add_vlan(ns, spec);
        }
        if !(1..=4094).contains(&spec.id) {
            return Err(LinkError::Invalid(format!(
                "VLAN ID {} is not in 1-4094",
                spec.id
            )));
        }
        let _g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        let s = self.state(ns)?;
        let name = &spec.name;
        if s.vlans
            .get(name.as_str())
            .is_some_and(|r| r.id == spec.id && r.parent == spec.parent.as_str())
        {
            return Ok(());
        }
        self.free(&s, ns, name)?;
        if self.kernel.link(ns, &spec.parent)?.is_none() {
            return Err(self.no_link(ns, &spec.parent));
        }
        self.write_record(
            VLAN_KEY,
            name.as_str(),
            Some(&VlanRecord {
                parent: spec.parent.to_string(),
                id: spec.id,
                up: false,
                master: None,
            }),
        )
    }

    fn add_veth(&self, ns: &Netns, spec: &VethSpec) -> Result<(), LinkError> {
        self.kernel.add_veth(ns, spec)
    }

    fn del_link(&self, ns: &Netns, name: &IfName) -> Result<(), LinkError> {
        if !self.mine(ns) {
            return self.kernel.del_link(ns, name);
        }
        let _g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        let s = self.state(ns)?;
        for (prefix, present) in [
            (VXLAN_KEY, s.vxlans.contains_key(name.as_str())),
            (VLAN_KEY, s.vlans.contains_key(name.as_str())),
        ] {
            if present {
                self.write_record::<()>(prefix, name.as_str(), None)?;
                return self.resync();
            }
        }
        if s.is_network(name.as_str()) {
            // Its ports leave the switch (their devices stay, on no bridge), and VXLAN
            // devices on it are on none.
            let mut args: Vec<String> = Vec::new();
            for (port, i) in &s.ifaces {
                if i.role == Role::Port(name.to_string()) || port == name.as_str() {
                    args.extend(
                        ["--", "--if-exists", "del-port", INTEGRATION_BRIDGE, port]
                            .map(String::from),
                    );
                }
                if i.role == Role::Physical(Some(name.to_string())) {
                    args.extend(flat_args(port, None));
                }
            }
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            self.write(&args).map_err(ovs_err)?;
            for (vx, rec) in &s.vxlans {
                if rec.master.as_deref() == Some(name.as_str()) {
                    self.write_vxlan(
                        vx,
                        &VxlanRecord {
                            master: None,
                            ..rec.clone()
                        },
                    )?;
                }
            }
            for (vl, rec) in &s.vlans {
                if rec.master.as_deref() == Some(name.as_str()) {
                    let rec = VlanRecord {
                        master: None,
                        ..rec.clone()
                    };
                    self.write_record(VLAN_KEY, vl, Some(&rec))?;
                }
            }
            return self.resync();
        }
        if s.ifaces.contains_key(name.as_str()) {
            self.write(&["--if-exists", "del-port", INTEGRATION_BRIDGE, name.as_str()])
                .map_err(ovs_err)?;
            self.resync()?;
        }
        self.kernel.del_link(ns, name)
    }

    fn set_master(
        &self,
        ns: &Netns,
        name: &IfName,
        master: Option<&IfName>,
    ) -> Result<(), LinkError> {
        if !self.mine(ns) {
            return self.kernel.set_master(ns, name, master);
        }
        let _g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        let s = self.state(ns)?;
        if let Some(m) = master
            && !s.is_network(m.as_str())
        {
            return Err(self.no_link(ns, m));
        }
        if s.vxlans.contains_key(name.as_str()) {
            let master = master.map(ToString::to_string);
            self.change_vxlan(ns, name, |r| r.master = master)?;
            return Ok(());
        }
        if s.vlans.contains_key(name.as_str()) {
            let master = master.map(ToString::to_string);
            self.change_vlan(ns, name, |r| r.master = master)?;
            return Ok(());
        }
        if s.is_network(name.as_str()) {
            return Err(LinkError::Invalid(format!(
                "{name} is a bridge and cannot be a port of one"
            )));
        }
        if self.kernel.link(ns, name)?.is_none() {
            return Err(self.no_link(ns, name));
        }
        if self.physical.contains(name.as_str()) {
            let flat = match s.ifaces.get(name.as_str()) {
                Some(Iface {
                    role: Role::Physical(net),
                    ofport: Some(_),
                }) => net.as_deref(),
                _ => None,
            };
            if flat == master.map(IfName::as_str) {
                // Only its flows missing, if anything.
                return self.sync(&s);
            }
            let args = flat_args(name.as_str(), master.map(IfName::as_str));
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            self.write(&args).map_err(ovs_err)?;
            return self.resync();
        }
        match master {
            // Already a port of that network (its flows missing, as after a restarted switch
            // or a del-flows by hand): only the flows are written, from what was just read,
            // without a switch reconfiguration that changes nothing.
            Some(m)
                if s.ifaces
                    .get(name.as_str())
                    .is_some_and(|i| i.ofport.is_some() && i.role == Role::Port(m.to_string())) =>
            {
                return self.sync(&s);
            }
            Some(m) => {
                let args = port_args(name, m);
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                self.write(&args).map_err(ovs_err)?;
            }
            None => {
                if !s.ifaces.contains_key(name.as_str()) {
                    return Ok(());
                }
                self.write(&["--if-exists", "del-port", INTEGRATION_BRIDGE, name.as_str()])
                    .map_err(ovs_err)?;
            }
        }
        self.resync()
    }

    /// Reads of the switch are answered from what the batch read or wrote, and the
    /// tunnels and flows its changes need are written once, at [`Links::flush`].
    fn begin(&self) {
        let mut b = self.batch.lock().unwrap_or_else(|e| e.into_inner());
        if b.is_none() {
            *b = Some(Batch::default());
        }
    }

    fn flush(&self) -> Result<(), LinkError> {
        let _g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        if self.in_batch(|b| std::mem::take(&mut b.pending)) == Some(true) {
            self.write_switch(&self.read()?)?;
        }
        Ok(())
    }

    fn end(&self) {
        *self.batch.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// All the ports in one `ovs-vsctl` transaction (a few for thousands), then one read of
    /// the switch and one bundle: a converge of a thousand ports costs what one port's does.
    /// A VXLAN device or a network's bridge among `links` goes verb by verb.
    fn attach(&self, ns: &Netns, bridge: &IfName, links: &[Attach]) -> Result<(), LinkError> {
        if !self.mine(ns) {
            return self.kernel.attach(ns, bridge, links);
        }
        let guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        let s = self.state(ns)?;
        if links.iter().any(|a| {
            let n = a.name.as_str();
            s.is_record(n) || s.is_network(n) || self.physical.contains(n)
        }) {
            drop(guard);
            return super::attach_each(self, ns, bridge, links);
        }
        if links.iter().any(|a| a.master) && !s.is_network(bridge.as_str()) {
            return Err(self.no_link(ns, bridge));
        }
        let kernel: BTreeSet<IfName> = self.kernel.links(ns)?.into_iter().map(|l| l.name).collect();
        if let Some(a) = links.iter().find(|a| !kernel.contains(&a.name)) {
            return Err(self.no_link(ns, &a.name));
        }
        for a in links {
            if let Some(mtu) = a.mtu {
                if mtu == 0 {
                    return Err(LinkError::Invalid("MTU 0".into()));
                }
                self.kernel.set_mtu(ns, &a.name, mtu)?;
            }
        }
        // Ports already on the network (their flows missing) only get their flows back.
        let adds = links
            .iter()
            .filter(|a| {
                a.master
                    && !s.ifaces.get(a.name.as_str()).is_some_and(|i| {
                        i.ofport.is_some() && i.role == Role::Port(bridge.to_string())
                    })
            })
            .map(|a| port_args(&a.name, bridge));
        // In a batch they wait for the flush (or the next write), to share the
        // transaction that makes the tunnels: the switch is reconfigured once.
        let adds: Vec<Vec<String>> = adds.collect();
        if self.in_batch(|_| ()).is_some() {
            self.in_batch(|b| b.ports.extend(adds));
        } else {
            self.write_all(adds).map_err(ovs_err)?;
        }
        for a in links.iter().filter(|a| a.up) {
            self.kernel.set_up(ns, &a.name, true)?;
        }
        self.resync()
    }

    fn set_up(&self, ns: &Netns, name: &IfName, up: bool) -> Result<(), LinkError> {
        if !self.mine(ns) {
            return self.kernel.set_up(ns, name, up);
        }
        let _g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        if self.change_vxlan(ns, name, |r| r.up = up)?
            || self.change_vlan(ns, name, |r| r.up = up)?
        {
            return Ok(());
        }
        self.kernel.set_up(ns, name, up)?;
        // A network read as down may be one whose flows went: write them again.
        let s = self.read()?;
        if s.is_network(name.as_str()) {
            self.sync(&s)?;
        }
        Ok(())
    }

    fn set_mtu(&self, ns: &Netns, name: &IfName, mtu: u32) -> Result<(), LinkError> {
        if !self.mine(ns) {
            return self.kernel.set_mtu(ns, name, mtu);
        }
        if mtu == 0 {
            return Err(LinkError::Invalid("MTU 0".into()));
        }
        let _g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        // A VLAN sub-interface's MTU is its physical interface's.
        if self.change_vxlan(ns, name, |r| r.mtu = mtu)? || self.change_vlan(ns, name, |_| ())? {
            return Ok(());
        }
        self.kernel.set_mtu(ns, name, mtu)
    }

    fn addresses(&self, ns: &Netns, name: &IfName) -> Result<BTreeSet<Ipv4Cidr>, LinkError> {
        self.kernel.addresses(ns, name)
    }

    fn add_address(&self, ns: &Netns, name: &IfName, addr: Ipv4Cidr) -> Result<(), LinkError> {
        self.kernel.add_address(ns, name, addr)
    }

    fn del_address(&self, ns: &Netns, name: &IfName, addr: Ipv4Cidr) -> Result<(), LinkError> {
        self.kernel.del_address(ns, name, addr)
    }

    fn fdb(&self, ns: &Netns, vxlan: &IfName) -> Result<BTreeSet<FdbEntry>, LinkError> {
        if !self.mine(ns) {
            return self.kernel.fdb(ns, vxlan);
        }
        let _g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        let s = self.state(ns)?;
        let Some(rec) = s.vxlans.get(vxlan.as_str()) else {
            return Err(self.no_link(ns, vxlan));
        };
        let Some(master) = rec.master.as_deref().filter(|m| s.is_network(m)) else {
            return Ok(rec.entries());
        };
        // On a network: only what forwards (its tunnel made, its network's flows in place).
        let h = self.health(&s)?;
        if h.base || h.networks.contains(master) {
            return Ok(BTreeSet::new());
        }
        Ok(rec
            .entries()
            .into_iter()
            .filter(|e| s.tunnel(e.remote, rec.local, rec.port).is_some())
            .collect())
    }

    fn set_fdb(
        &self,
        ns: &Netns,
        vxlan: &IfName,
        entries: &BTreeSet<FdbEntry>,
    ) -> Result<(), LinkError> {
        if !self.mine(ns) {
            return self.kernel.set_fdb(ns, vxlan, entries);
        }
        let _g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        let fdb: Vec<(String, Ipv4Addr)> = entries
            .iter()
            .map(|e| (e.mac.to_string(), e.remote))
            .collect();
        if !self.change_vxlan(ns, vxlan, |r| r.fdb = fdb)? {
            return Err(self.no_link(ns, vxlan));
        }
        // The same entries may be asked again because a tunnel or a flow went: repair.
        self.resync()
    }

    fn set_mac(&self, ns: &Netns, name: &IfName, mac: MacAddr) -> Result<(), LinkError> {
        self.kernel.set_mac(ns, name, mac)
    }

    fn routes(&self, ns: &Netns) -> Result<BTreeSet<RouteSpec>, LinkError> {
        self.kernel.routes(ns)
    }

    fn add_route(&self, ns: &Netns, route: &RouteSpec) -> Result<(), LinkError> {
        self.kernel.add_route(ns, route)
    }

    fn del_route(&self, ns: &Netns, route: &RouteSpec) -> Result<(), LinkError> {
        self.kernel.del_route(ns, route)
    }

    fn forwarding(&self, ns: &Netns) -> Result<bool, LinkError> {
        self.kernel.forwarding(ns)
    }

    fn set_forwarding(&self, ns: &Netns, on: bool) -> Result<(), LinkError> {
        self.kernel.set_forwarding(ns, on)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_database_reads_as_networks_ports_tunnels_and_vxlan_devices() {
        let rec = VxlanRecord {
            vni: 5001,
            local: Ipv4Addr::new(192, 0, 2, 1),
            port: 4789,
            mtu: 1450,
            up: true,
            master: Some("br-a".into()),
            fdb: vec![("00:00:00:00:00:00".into(), Ipv4Addr::new(192, 0, 2, 2))],
        };
        let json = serde_json::to_string(&rec).expect("json");
        let ifaces = serde_json::json!({"data": [
            ["br-a", 5, ["map", []], ["map", [["stratus-role", "network"]]]],
            ["tp-1", 6, ["map", []], ["map", [["stratus-role", "port"], ["stratus-network", "br-a"]]]],
            ["tp-x", ["set", []], ["map", []], ["map", [["stratus-role", "port"], ["stratus-network", "br-a"]]]],
            [tunnel_name(Ipv4Addr::new(192, 0, 2, 2), Ipv4Addr::new(192, 0, 2, 1), 4789), 7,
             ["map", [["key", "flow"], ["local_ip", "192.0.2.1"], ["remote_ip", "192.0.2.2"], ["dst_port", "4789"]]],
             ["map", [["stratus-role", "tunnel"]]]],
            ["eth0", 1, ["map", []], ["map", []]],
        ], "headings": ["name", "ofport", "options", "external_ids"]});
        let bridges = serde_json::json!({"data": [
            ["br-int", ["map", [["stratus-vxlan-vx-a", json]]]],
        ], "headings": ["name", "external_ids"]});
        let s = State::parse(&format!("{ifaces}\n{bridges}\n")).expect("parse");
        assert!(s.bridge);
        assert!(s.is_network("br-a") && !s.is_network("tp-1"));
        assert!(!s.ifaces.contains_key("eth0"), "not the agent's");
        assert_eq!(s.vxlans.get("vx-a"), Some(&rec));
        let sw = s.switch();
        assert_eq!(sw.networks.len(), 1);
        let n = &sw.networks[0];
        assert_eq!(
            (n.id, n.ports.clone()),
            (5, BTreeSet::from([6])),
            "tp-x has no port yet"
        );
        let t = n.tunnel.as_ref().expect("tunnel");
        assert_eq!((t.vni, t.flood.clone()), (5001, BTreeSet::from([7])));
        assert_eq!(
            s.needed_tunnels(),
            BTreeSet::from([(
                Ipv4Addr::new(192, 0, 2, 2),
                Ipv4Addr::new(192, 0, 2, 1),
                4789
            )])
        );
    }

    #[test]
    fn a_vlan_network_keeps_its_dhcp_server_local_and_tags_on_its_physical_interface() {
        let vlan = serde_json::to_string(&VlanRecord {
            parent: "phys".into(),
            id: 617,
            up: true,
            master: Some("br-a".into()),
        })
        .expect("json");
        let fw = FirewallState {
            local_dhcp: BTreeMap::from([("vl-a".to_owned(), Ipv4Addr::new(10, 61, 0, 2))]),
            ..FirewallState::default()
        };
        let mut ext: Vec<(String, String)> = fw.keys().into_iter().collect();
        ext.push(("stratus-vlan-vl-a".into(), vlan));
        let ifaces = serde_json::json!({"data": [
            ["br-a", 5, ["map", []], ["map", [["stratus-role", "network"]]]],
            ["phys", 8, ["map", []], ["map", [["stratus-role", "physical"]]]],
        ], "headings": ["name", "ofport", "options", "external_ids"]});
        let bridges = serde_json::json!({"data": [["br-int", ["map", ext]]],
                                         "headings": ["name", "external_ids"]});
        let s = State::parse(&format!("{ifaces}\n{bridges}\n")).expect("parse");
        assert_eq!(s.needed_physicals(), BTreeSet::from(["phys".to_owned()]));
        let sw = s.switch();
        let n = &sw.networks[0];
        assert_eq!(n.vlan, Some(VlanFlows { id: 617, port: 8 }));
        assert_eq!(
            n.local_dhcp,
            Some(Ipv4Addr::new(10, 61, 0, 2)),
            "no frame from the wire reaches this node's DHCP server"
        );
    }

    #[test]
    fn a_flat_networks_physical_interface_is_its_uplink_not_a_port() {
        let fw = FirewallState {
            local_dhcp: BTreeMap::from([("phys".to_owned(), Ipv4Addr::new(10, 61, 0, 2))]),
            ..FirewallState::default()
        };
        let ext: Vec<(String, String)> = fw.keys().into_iter().collect();
        let ifaces = serde_json::json!({"data": [
            ["br-f", 5, ["map", []], ["map", [["stratus-role", "network"]]]],
            ["phys", 8, ["map", []],
             ["map", [["stratus-role", "physical"], ["stratus-network", "br-f"]]]],
            ["tp-1", 9, ["map", []], ["map", [["stratus-role", "port"], ["stratus-network", "br-f"]]]],
        ], "headings": ["name", "ofport", "options", "external_ids"]});
        let bridges = serde_json::json!({"data": [["br-int", ["map", ext]]],
                                         "headings": ["name", "external_ids"]});
        let s = State::parse(&format!("{ifaces}\n{bridges}\n")).expect("parse");
        assert_eq!(s.needed_physicals(), BTreeSet::from(["phys".to_owned()]));
        let n = &s.switch().networks[0];
        assert_eq!((n.flat, n.vlan), (Some(8), None));
        assert_eq!(n.ports, BTreeSet::from([9]), "the uplink is no port");
        assert_eq!(n.local_dhcp, Some(Ipv4Addr::new(10, 61, 0, 2)));
    }

    #[test]
    fn tunnel_names_fit_the_kernel_and_differ_per_peer() {
        let a = tunnel_name(
            Ipv4Addr::new(192, 0, 2, 2),
            Ipv4Addr::new(192, 0, 2, 1),
            4789,
        );
        let b = tunnel_name(
            Ipv4Addr::new(192, 0, 2, 3),
            Ipv4Addr::new(192, 0, 2, 1),
            4789,
        );
        assert_ne!(a, b);
        assert!(IfName::new(&a).is_ok() && a.len() == 15);
    }

    #[test]
    fn commands_are_cut_into_calls_of_bounded_size_in_order() {
        let port = |i: usize| {
            port_args(
                &IfName::new(&format!("tc{i}")).expect("name"),
                &IfName::new("br-a").expect("name"),
            )
        };
        let one: usize = port(0).iter().map(String::len).sum();
        let n = 3 * VSCTL_BATCH_BYTES / one;
        let batches = batched((0..n).map(port));
        assert!(
            batches.len() >= 3 && batches.len() <= 4,
            "{}",
            batches.len()
        );
        for b in &batches {
            assert!(b.iter().map(String::len).sum::<usize>() <= VSCTL_BATCH_BYTES);
            assert_eq!(b.first().map(String::as_str), Some("--"), "whole commands");
        }
        let all: Vec<String> = batches.into_iter().flatten().collect();
        assert_eq!(all, (0..n).flat_map(port).collect::<Vec<_>>());
        assert!(batched(Vec::<Vec<String>>::new()).is_empty());
    }

    #[test]
    fn a_port_flow_names_its_port() {
        assert_eq!(
            port_of("table=0,priority=100,in_port=12 actions=x"),
            Some(12)
        );
        assert_eq!(
            port_of("table=30,priority=100,reg6=3,reg4=9 actions=output:9"),
            Some(9)
        );
    }
}
