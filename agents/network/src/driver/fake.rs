//! In-memory doubles of the network driver: [`FakeLinks`] for [`Links`], [`FakeFirewall`]
//! for [`Firewall`] and [`FakeDhcp`] for [`Dhcp`], each with failure injection (the next `n`
//! calls of a verb fail) and ways to change the "host" behind the driver's back (drift), for
//! tests of everything above the driver. They pass the same
//! [`conformance`](super::conformance) suites as the kernel and dnsmasq.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Mutex, MutexGuard, PoisonError};

use super::conntrack::{self, Connection, Keep};
use super::{
    Dhcp, DhcpError, DhcpSpec, DhcpStatus, FdbEntry, Firewall, FirewallError, IfName, Ipv4Cidr,
    Link, LinkError, LinkKind, Links, MacAddr, Name, Nat, Netns, Observed, RouteSpec, Ruleset,
    Update, VethSpec, VlanSpec, VxlanInfo, VxlanSpec,
};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Failures to inject, by verb (the trait method's name): each fails its next `n` calls.
#[derive(Debug, Default)]
pub struct Failures(Mutex<HashMap<&'static str, u32>>);

impl Failures {
    /// Makes the next `times` calls of `verb` fail.
    pub fn set(&self, verb: &'static str, times: u32) {
        lock(&self.0).insert(verb, times);
    }

    /// How many injected failures of `verb` are still to come.
    pub fn left(&self, verb: &'static str) -> u32 {
        lock(&self.0).get(verb).copied().unwrap_or(0)
    }

    /// Whether this call of `verb` fails (counting it down).
    fn take(&self, verb: &'static str) -> bool {
        match lock(&self.0).get_mut(verb) {
            Some(n) if *n > 0 => {
                *n -= 1;
                true
            }
            _ => false,
        }
    }
}

#[derive(Debug, Clone)]
struct FakeLink {
    link: Link,
    addresses: BTreeSet<Ipv4Cidr>,
    fdb: BTreeSet<FdbEntry>,
    /// A veth's other end.
    peer: Option<(Netns, IfName)>,
}

type Namespaces = BTreeMap<Netns, BTreeMap<IfName, FakeLink>>;

/// Links in memory: namespaces are maps of links, the host's always present.
#[derive(Debug)]
pub struct FakeLinks {
    state: Mutex<Namespaces>,
    /// Each namespace's routes and whether it forwards.
    routing: Mutex<BTreeMap<Netns, (BTreeSet<RouteSpec>, bool)>>,
    next_mac: Mutex<u32>,
    /// Failure injection, by [`Links`] method name.
    pub failures: Failures,
}

/// A new namespace's links: only its loopback, down (as the kernel makes it).
fn loopback() -> BTreeMap<IfName, FakeLink> {
    let lo = IfName::new("lo").expect("a valid constant name");
    let link = fresh(&lo, LinkKind::Other(None), 65536, MacAddr::ZERO);
    BTreeMap::from([(lo, link)])
}

impl Default for FakeLinks {
    fn default() -> Self {
        Self {
            state: Mutex::new(BTreeMap::from([(Netns::Host, loopback())])),
            routing: Mutex::new(BTreeMap::new()),
            next_mac: Mutex::new(1),
            failures: Failures::default(),
        }
    }
}

impl FakeLinks {
    /// An empty host.
    pub fn new() -> Self {
        Self::default()
    }

    /// Removes a link behind the driver's back (`ip link del`), with a veth's peer.
    pub fn remove_behind(&self, ns: &Netns, name: &IfName) {
        remove(&mut lock(&self.state), ns, name);
    }

    /// Removes an address behind the driver's back (`ip addr del`).
    pub fn del_address_behind(&self, ns: &Netns, name: &IfName, addr: Ipv4Cidr) {
        if let Some(l) = lock(&self.state).get_mut(ns).and_then(|m| m.get_mut(name)) {
            l.addresses.remove(&addr);
        }
    }

    /// Removes a route behind the driver's back (`ip route del`).
    pub fn del_route_behind(&self, ns: &Netns, route: &RouteSpec) {
        if let Some((routes, _)) = lock(&self.routing).get_mut(ns) {
            routes.remove(route);
        }
    }

    /// Replaces a device's FDB behind the driver's back (`bridge fdb del`).
    pub fn set_fdb_behind(&self, ns: &Netns, name: &IfName, fdb: BTreeSet<FdbEntry>) {
        if let Some(l) = lock(&self.state).get_mut(ns).and_then(|m| m.get_mut(name)) {
            l.fdb = fdb;
        }
    }

    fn mac(&self) -> MacAddr {
        let mut n = lock(&self.next_mac);
        *n += 1;
        let [_, a, b, c] = n.to_be_bytes();
        MacAddr([0x02, 0x5a, 0, a, b, c])
    }

    fn check(&self, verb: &'static str) -> Result<(), LinkError> {
        if self.failures.take(verb) {
            Err(LinkError::Injected(verb))
        } else {
            Ok(())
        }
    }

    /// Runs `f` on the links of `ns`.
    fn with<T>(
        &self,
        verb: &'static str,
        ns: &Netns,
        f: impl FnOnce(&mut BTreeMap<IfName, FakeLink>) -> Result<T, LinkError>,
    ) -> Result<T, LinkError> {
        self.check(verb)?;
        let mut state = lock(&self.state);
        let links = state
            .get_mut(ns)
            .ok_or_else(|| LinkError::NoNetns(ns.clone()))?;
        f(links)
    }

    fn create(
        &self,
        verb: &'static str,
        ns: &Netns,
        name: &IfName,
        kind: LinkKind,
        mtu: u32,
    ) -> Result<(), LinkError> {
        let mac = self.mac();
        self.with(verb, ns, |links| {
            if let Some(l) = links.get(name) {
                return if l.link.kind == kind {
                    Ok(())
                } else {
                    Err(conflict(ns, name, &l.link.kind))
                };
            }
            links.insert(name.clone(), fresh(name, kind, mtu, mac));
            Ok(())
        })
    }
}

fn fresh(name: &IfName, kind: LinkKind, mtu: u32, mac: MacAddr) -> FakeLink {
    FakeLink {
        link: Link {
            name: name.clone(),
            kind,
            mtu,
            up: false,
            master: None,
            mac: Some(mac),
        },
        addresses: BTreeSet::new(),
        fdb: BTreeSet::new(),
        peer: None,
    }
}

fn conflict(ns: &Netns, name: &IfName, found: &LinkKind) -> LinkError {
    LinkError::Conflict {
        netns: ns.clone(),
        name: name.clone(),
        found: format!("{found:?}"),
    }
}

fn no_link(ns: &Netns, name: &IfName) -> LinkError {
    LinkError::NoLink {
        netns: ns.clone(),
        name: name.clone(),
    }
}

/// Removes a link, its veth peer, and its place as a master.
fn remove(state: &mut Namespaces, ns: &Netns, name: &IfName) {
    let Some(l) = state.get_mut(ns).and_then(|m| m.remove(name)) else {
        return;
    };
    if let Some(links) = state.get_mut(ns) {
        for other in links.values_mut() {
            if other.link.master.as_ref() == Some(name) {
                other.link.master = None;
            }
        }
    }
    if let Some((pns, peer)) = l.peer
        && let Some(links) = state.get_mut(&pns)
    {
        links.remove(&peer);
    }
}

fn get<'a>(
    links: &'a mut BTreeMap<IfName, FakeLink>,
    ns: &Netns,
    name: &IfName,
) -> Result<&'a mut FakeLink, LinkError> {
    links.get_mut(name).ok_or_else(|| no_link(ns, name))
}

impl Links for FakeLinks {
    /// Holds nothing back; fails when told to (`flush`).
    fn flush(&self) -> Result<(), LinkError> {
        self.check("flush")
    }

    fn add_netns(&self, name: &Name) -> Result<(), LinkError> {
        self.check("add_netns")?;
        lock(&self.state)
            .entry(Netns::Named(name.clone()))
            .or_insert_with(loopback);
        Ok(())
    }

    fn del_netns(&self, name: &Name) -> Result<(), LinkError> {
        self.check("del_netns")?;
        let mut state = lock(&self.state);
        let ns = Netns::Named(name.clone());
        let names: Vec<IfName> = state
            .get(&ns)
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default();
        for n in names {
            remove(&mut state, &ns, &n);
        }
        state.remove(&ns);
        lock(&self.routing).remove(&ns);
        Ok(())
    }

    fn list_netns(&self) -> Result<BTreeSet<Name>, LinkError> {
        self.check("list_netns")?;
        Ok(lock(&self.state)
            .keys()
            .filter_map(|n| match n {
                Netns::Named(n) => Some(n.clone()),
                Netns::Host => None,
            })
            .collect())
    }

    fn links(&self, ns: &Netns) -> Result<Vec<Link>, LinkError> {
        self.with("links", ns, |links| {
            Ok(links.values().map(|l| l.link.clone()).collect())
        })
    }

    fn link(&self, ns: &Netns, name: &IfName) -> Result<Option<Link>, LinkError> {
        self.with("link", ns, |links| {
            Ok(links.get(name).map(|l| l.link.clone()))
        })
    }

    fn add_bridge(&self, ns: &Netns, name: &IfName) -> Result<(), LinkError> {
        self.create("add_bridge", ns, name, LinkKind::Bridge, 1500)
    }

    fn add_vxlan(&self, ns: &Netns, spec: &VxlanSpec) -> Result<(), LinkError> {
        if spec.vni == 0 || spec.vni >= 1 << 24 || spec.port == 0 {
            return Err(LinkError::Invalid(format!(
                "VNI {} port {}",
                spec.vni, spec.port
            )));
        }
        let kind = LinkKind::Vxlan(VxlanInfo {
            vni: spec.vni,
            local: Some(spec.local),
            port: spec.port,
            learning: false,
        });
        self.create("add_vxlan", ns, &spec.name, kind, 1450)
    }

    fn add_vlan(&self, ns: &Netns, spec: &VlanSpec) -> Result<(), LinkError> {
        if !(1..=4094).contains(&spec.id) {
            return Err(LinkError::Invalid(format!("VLAN ID {}", spec.id)));
        }
        if self.link(ns, &spec.parent)?.is_none() {
            return Err(LinkError::NoLink {
                netns: ns.clone(),
                name: spec.parent.clone(),
            });
        }
        self.create("add_vlan", ns, &spec.name, LinkKind::Vlan(spec.id), 1500)
    }

    fn add_veth(&self, ns: &Netns, spec: &VethSpec) -> Result<(), LinkError> {
        self.check("add_veth")?;
        let (m1, m2) = (self.mac(), self.mac());
        let mut state = lock(&self.state);
        let peer_ns = spec.peer_netns.clone().unwrap_or_else(|| ns.clone());
        let links = state
            .get(ns)
            .ok_or_else(|| LinkError::NoNetns(ns.clone()))?;
        if let Some(l) = links.get(&spec.name) {
            return if l.link.kind == LinkKind::Veth {
                Ok(())
            } else {
                Err(conflict(ns, &spec.name, &l.link.kind))
            };
        }
        let peers = state
            .get(&peer_ns)
            .ok_or_else(|| LinkError::NoNetns(peer_ns.clone()))?;
        if let Some(l) = peers.get(&spec.peer) {
            return Err(conflict(&peer_ns, &spec.peer, &l.link.kind));
        }
        let mut a = fresh(&spec.name, LinkKind::Veth, 1500, m1);
        a.peer = Some((peer_ns.clone(), spec.peer.clone()));
        let mut b = fresh(&spec.peer, LinkKind::Veth, 1500, m2);
        b.peer = Some((ns.clone(), spec.name.clone()));
        if let Some(links) = state.get_mut(ns) {
            links.insert(spec.name.clone(), a);
        }
        if let Some(links) = state.get_mut(&peer_ns) {
            links.insert(spec.peer.clone(), b);
        }
        Ok(())
    }

    fn del_link(&self, ns: &Netns, name: &IfName) -> Result<(), LinkError> {
        self.check("del_link")?;
        let mut state = lock(&self.state);
        if !state.contains_key(ns) {
            return Err(LinkError::NoNetns(ns.clone()));
        }
        remove(&mut state, ns, name);
        Ok(())
    }

    fn set_master(
        &self,
        ns: &Netns,
        name: &IfName,
        master: Option<&IfName>,
    ) -> Result<(), LinkError> {
        self.with("set_master", ns, |links| {
            if let Some(m) = master {
                get(links, ns, m)?;
            }
            get(links, ns, name)?.link.master = master.cloned();
            Ok(())
        })
    }

    fn set_up(&self, ns: &Netns, name: &IfName, up: bool) -> Result<(), LinkError> {
        self.with("set_up", ns, |links| {
            get(links, ns, name)?.link.up = up;
            Ok(())
        })
    }

    fn set_mtu(&self, ns: &Netns, name: &IfName, mtu: u32) -> Result<(), LinkError> {
        if mtu == 0 {
            return Err(LinkError::Invalid("MTU 0".into()));
        }
        self.with("set_mtu", ns, |links| {
            get(links, ns, name)?.link.mtu = mtu;
            Ok(())
        })
    }

    fn addresses(&self, ns: &Netns, name: &IfName) -> Result<BTreeSet<Ipv4Cidr>, LinkError> {
        self.with("addresses", ns, |links| {
            Ok(get(links, ns, name)?.addresses.clone())
        })
    }

    fn add_address(&self, ns: &Netns, name: &IfName, addr: Ipv4Cidr) -> Result<(), LinkError> {
        self.with("add_address", ns, |links| {
            get(links, ns, name)?.addresses.insert(addr);
            Ok(())
        })
    }

    fn del_address(&self, ns: &Netns, name: &IfName, addr: Ipv4Cidr) -> Result<(), LinkError> {
        self.with("del_address", ns, |links| {
            get(links, ns, name)?.addresses.remove(&addr);
            Ok(())
        })
    }

    fn fdb(&self, ns: &Netns, vxlan: &IfName) -> Result<BTreeSet<FdbEntry>, LinkError> {
        self.with("fdb", ns, |links| Ok(get(links, ns, vxlan)?.fdb.clone()))
    }

    fn set_fdb(
        &self,
        ns: &Netns,
        vxlan: &IfName,
        entries: &BTreeSet<FdbEntry>,
    ) -> Result<(), LinkError> {
        self.with("set_fdb", ns, |links| {
            get(links, ns, vxlan)?.fdb = entries.clone();
            Ok(())
        })
    }

    fn set_mac(&self, ns: &Netns, name: &IfName, mac: MacAddr) -> Result<(), LinkError> {
        self.with("set_mac", ns, |links| {
            get(links, ns, name)?.link.mac = Some(mac);
            Ok(())
        })
    }

    fn routes(&self, ns: &Netns) -> Result<BTreeSet<RouteSpec>, LinkError> {
        self.with("routes", ns, |_| Ok(()))?;
        Ok(lock(&self.routing)
            .get(ns)
            .map(|(r, _)| r.clone())
            .unwrap_or_default())
    }

    /// As the kernel: the gateway must be on a prefix of an address of a link that is up.
    fn add_route(&self, ns: &Netns, route: &RouteSpec) -> Result<(), LinkError> {
        let reachable = self.with("add_route", ns, |links| {
            Ok(links
                .values()
                .any(|l| l.link.up && l.addresses.iter().any(|a| a.contains(route.gateway))))
        })?;
        if !reachable {
            return Err(LinkError::Invalid(format!(
                "route {route}: the gateway is on no connected prefix"
            )));
        }
        lock(&self.routing)
            .entry(ns.clone())
            .or_default()
            .0
            .insert(*route);
        Ok(())
    }

    fn del_route(&self, ns: &Netns, route: &RouteSpec) -> Result<(), LinkError> {
        self.with("del_route", ns, |_| Ok(()))?;
        if let Some((routes, _)) = lock(&self.routing).get_mut(ns) {
            routes.remove(route);
        }
        Ok(())
    }

    fn forwarding(&self, ns: &Netns) -> Result<bool, LinkError> {
        self.with("forwarding", ns, |_| Ok(()))?;
        Ok(lock(&self.routing).get(ns).is_some_and(|(_, f)| *f))
    }

    fn set_forwarding(&self, ns: &Netns, on: bool) -> Result<(), LinkError> {
        self.with("set_forwarding", ns, |_| Ok(()))?;
        lock(&self.routing).entry(ns.clone()).or_default().1 = on;
        Ok(())
    }
}

/// A firewall in memory: the digest of the last ruleset applied.
#[derive(Debug, Default)]
pub struct FakeFirewall {
    tables: Mutex<Option<Observed>>,
    nat: Mutex<BTreeMap<Name, Observed>>,
    applied: Mutex<u64>,
    tracked: Mutex<BTreeMap<u16, Vec<Connection>>>,
    commands: Mutex<Vec<String>>,
    /// Failure injection, by [`Firewall`] method name.
    pub failures: Failures,
}

impl FakeFirewall {
    /// No tables.
    pub fn new() -> Self {
        Self::default()
    }

    /// How many times a ruleset was applied.
    pub fn applied(&self) -> u64 {
        *lock(&self.applied)
    }

    /// Tracks `c` in `zone`, as a packet the filter passed would.
    pub fn track(&self, zone: u16, c: Connection) {
        lock(&self.tracked).entry(zone).or_default().push(c);
    }

    /// The connections tracked in `zone`.
    pub fn tracked(&self, zone: u16) -> Vec<Connection> {
        lock(&self.tracked).get(&zone).cloned().unwrap_or_default()
    }

    /// The tracker commands `forget` ran (`list ZONE`, `delete ZONE TUPLE`), in order,
    /// since the last call.
    pub fn commands(&self) -> Vec<String> {
        std::mem::take(&mut *lock(&self.commands))
    }

    /// Changes a router's NAT table behind the driver's back (`None`: deleted).
    pub fn tamper_nat(&self, netns: &Name, table: Option<Observed>) {
        match table {
            Some(t) => lock(&self.nat).insert(netns.clone(), t),
            None => lock(&self.nat).remove(netns),
        };
    }

    /// Changes the tables behind the driver's back (`nft delete rule …`, `nft flush`).
    pub fn tamper(&self, tables: Option<Observed>) {
        *lock(&self.tables) = tables;
    }

    fn check(&self, verb: &'static str) -> Result<(), FirewallError> {
        if self.failures.take(verb) {
            Err(FirewallError::Injected(verb))
        } else {
            Ok(())
        }
    }
}

impl Firewall for FakeFirewall {
    fn apply(&self, ruleset: &Ruleset) -> Result<(), FirewallError> {
        self.check("apply")?;
        let observed = ruleset.observed()?;
        *lock(&self.tables) = Some(observed);
        *lock(&self.applied) += 1;
        Ok(())
    }

    /// Changes exactly what the delta names in the tables held now, as the kernel does;
    /// refused (nothing changed) without tables.
    fn update(&self, update: &Update) -> Result<(), FirewallError> {
        self.check("update")?;
        update.ruleset.validate()?;
        let mut tables = lock(&self.tables);
        let Some(have) = tables.as_ref() else {
            return Err(FirewallError::Command {
                what: "update nft ruleset".into(),
                stderr: "no such table".into(),
            });
        };
        let after = update.delta.apply_to(have, &update.want);
        *tables = Some(after);
        *lock(&self.applied) += 1;
        Ok(())
    }

    fn read(&self) -> Result<Option<Observed>, FirewallError> {
        self.check("read")?;
        Ok(lock(&self.tables).clone())
    }

    fn clear(&self) -> Result<(), FirewallError> {
        self.check("clear")?;
        *lock(&self.tables) = None;
        Ok(())
    }

    fn apply_nat(&self, netns: &Name, nat: &Nat) -> Result<(), FirewallError> {
        self.check("apply_nat")?;
        let observed = nat.observed()?;
        lock(&self.nat).insert(netns.clone(), observed);
        *lock(&self.applied) += 1;
        Ok(())
    }

    fn read_nat(&self, netns: &Name) -> Result<Option<Observed>, FirewallError> {
        self.check("read_nat")?;
        Ok(lock(&self.nat).get(netns).cloned())
    }

    /// Lists each zone once and deletes its stale connections, as the drivers do; a
    /// `forget_delete` failure fails one deletion and the others still run.
    fn forget(&self, keep: &Keep) -> Result<(), FirewallError> {
        self.check("forget")?;
        let list = |zone: u16| -> Result<Vec<Connection>, FirewallError> {
            lock(&self.commands).push(format!("list {zone}"));
            Ok(self.tracked(zone))
        };
        let delete = |zone: u16, c: &Connection| -> Result<(), FirewallError> {
            lock(&self.commands).push(format!("delete {zone} {}", c.tuple()));
            self.check("forget_delete")?;
            if let Some(cs) = lock(&self.tracked).get_mut(&zone) {
                cs.retain(|t| t != c);
            }
            Ok(())
        };
        conntrack::prune(keep, list, delete).map_err(|stderr| FirewallError::Command {
            what: "forget connections".into(),
            stderr,
        })
    }
}

#[derive(Debug, Clone)]
struct Server {
    spec: DhcpSpec,
    pid: Option<u32>,
}

/// DHCP servers in memory: a "process" is a pid, restarted when the spec changes other than
/// in its leases.
pub struct FakeDhcp {
    servers: Mutex<BTreeMap<Name, Server>>,
    next_pid: Mutex<u32>,
    reloads: Mutex<u64>,
    on_list: Mutex<Option<ListHook>>,
    /// Failure injection, by [`Dhcp`] method name.
    pub failures: Failures,
}

/// What runs at each [`FakeDhcp`] `list`, as something else happens while the host is read.
type ListHook = Box<dyn Fn() + Send + Sync>;

impl std::fmt::Debug for FakeDhcp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeDhcp")
            .field("servers", &self.servers)
            .field("reloads", &self.reloads)
            .finish_non_exhaustive()
    }
}

impl Default for FakeDhcp {
    fn default() -> Self {
        Self {
            servers: Mutex::default(),
            next_pid: Mutex::new(1000),
            reloads: Mutex::default(),
            on_list: Mutex::default(),
            failures: Failures::default(),
        }
    }
}

impl FakeDhcp {
    /// No servers.
    pub fn new() -> Self {
        Self::default()
    }

    /// Kills a server's process behind the driver's back (a crash, `kill`).
    pub fn kill(&self, name: &Name) {
        if let Some(s) = lock(&self.servers).get_mut(name) {
            s.pid = None;
        }
    }

    /// Runs `hook` at each `list` from now on (the servers are listed while the host is
    /// read).
    pub fn on_list(&self, hook: impl Fn() + Send + Sync + 'static) {
        *lock(&self.on_list) = Some(Box::new(hook));
    }

    /// How many times a running server was told to reload.
    pub fn reloads(&self) -> u64 {
        *lock(&self.reloads)
    }

    fn pid(&self) -> u32 {
        let mut n = lock(&self.next_pid);
        *n += 1;
        *n
    }
}

impl Dhcp for FakeDhcp {
    fn ensure(&self, spec: &DhcpSpec) -> Result<(), DhcpError> {
        if self.failures.take("ensure") {
            return Err(DhcpError::Injected("ensure"));
        }
        spec.validate()?;
        let fresh = self.pid();
        let mut servers = lock(&self.servers);
        let server = servers.entry(spec.name.clone()).or_insert_with(|| Server {
            spec: spec.clone(),
            pid: None,
        });
        let same_config = DhcpSpec {
            leases: spec.leases.clone(),
            ..server.spec.clone()
        } == *spec;
        match server.pid {
            Some(_) if same_config => {
                if server.spec.leases != spec.leases {
                    *lock(&self.reloads) += 1;
                }
            }
            _ => server.pid = Some(fresh),
        }
        server.spec = spec.clone();
        Ok(())
    }

    fn status(&self, name: &Name) -> Result<Option<DhcpStatus>, DhcpError> {
        if self.failures.take("status") {
            return Err(DhcpError::Injected("status"));
        }
        Ok(lock(&self.servers).get(name).map(|s| {
            let mut leases = s.spec.leases.clone();
            leases.sort();
            DhcpStatus { pid: s.pid, leases }
        }))
    }

    fn list(&self) -> Result<BTreeSet<Name>, DhcpError> {
        if let Some(hook) = lock(&self.on_list).as_ref() {
            hook();
        }
        if self.failures.take("list") {
            return Err(DhcpError::Injected("list"));
        }
        Ok(lock(&self.servers).keys().cloned().collect())
    }

    fn remove(&self, name: &Name) -> Result<(), DhcpError> {
        if self.failures.take("remove") {
            return Err(DhcpError::Injected("remove"));
        }
        lock(&self.servers).remove(name);
        Ok(())
    }
}
