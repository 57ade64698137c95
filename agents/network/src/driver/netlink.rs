//! [`Links`] over rtnetlink: one netlink connection per network namespace, opened inside it
//! (on a thread that joined it, see [`netns`](super::netns)) the first time a call names it
//! and kept for every later call while the namespace is the same one; each call drives the
//! connection on its own thread while it sends its requests through the namespace's handle,
//! and a port's link changes are one request each, many in flight at once. Namespaces
//! themselves are made and removed with `ip netns`, whose bind-mount layout other tools (and
//! `ip netns exec`) expect.

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use futures::{StreamExt, TryStreamExt};
use rtnetlink::packet_core::{
    NLM_F_ACK, NLM_F_APPEND, NLM_F_CREATE, NLM_F_REPLACE, NLM_F_REQUEST, NetlinkMessage,
    NetlinkPayload,
};
use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage};
use rtnetlink::packet_route::link::{
    InfoData, InfoKind, InfoVeth, InfoVlan, InfoVxlan, LinkAttribute, LinkFlags, LinkInfo,
    LinkMessage,
};
use rtnetlink::packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute, RouteHeader, RouteMessage};
use rtnetlink::packet_route::{AddressFamily, RouteNetlinkMessage};
use rtnetlink::{
    Handle, LinkBridge, LinkMessageBuilder, LinkUnspec, LinkVeth, LinkVlan, LinkVxlan,
    RouteMessageBuilder,
};

use super::netns::{self, EnterError};
use super::{
    Attach, FdbEntry, IfName, Ipv4Cidr, Link, LinkError, LinkKind, Links, MacAddr, Name, Netns,
    RouteSpec, VethSpec, VlanSpec, VxlanInfo, VxlanSpec,
};

const ENOENT: i32 = 2;
const ENODEV: i32 = 19;
const EEXIST: i32 = 17;
const EADDRNOTAVAIL: i32 = 99;
const ESRCH: i32 = 3;
const EOPNOTSUPP: i32 = 95;

/// Link changes [`NetlinkLinks::attach`] keeps unanswered at once on one connection: enough
/// to keep the kernel busy, few enough that their answers fit the socket's receive buffer.
const PIPELINE: usize = 128;

/// A main-table IPv4 route through a gateway, as [`RouteSpec`]; `None` for any other.
fn route_of(m: &RouteMessage) -> Option<RouteSpec> {
    if m.header.address_family != AddressFamily::Inet {
        return None;
    }
    let table = m
        .attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(m.header.table));
    if table != u32::from(RouteHeader::RT_TABLE_MAIN) {
        return None;
    }
    let mut destination = Ipv4Addr::UNSPECIFIED;
    let mut gateway = None;
    for a in &m.attributes {
        match a {
            RouteAttribute::Destination(RouteAddress::Inet(d)) => destination = *d,
            RouteAttribute::Gateway(RouteAddress::Inet(g)) => gateway = Some(*g),
            _ => {}
        }
    }
    let prefix = Ipv4Cidr::new(destination, m.header.destination_prefix_length)?;
    Some(RouteSpec::new(prefix, gateway?))
}

fn route_message(r: &RouteSpec) -> RouteMessage {
    RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(r.destination.network(), r.destination.prefix())
        .gateway(r.gateway)
        .build()
}

/// The IPv4 forwarding switch of the namespace the calling thread is in.
const IP_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";

/// Gratuitous ARP when an interface comes up, for every interface of the namespace.
const ARP_NOTIFY: &str = "/proc/sys/net/ipv4/conf/all/arp_notify";

/// The kernel's links, through rtnetlink.
#[derive(Debug, Default, Clone)]
pub struct NetlinkLinks {
    connections: Arc<Mutex<HashMap<Netns, Arc<Mutex<Connection>>>>>,
}

/// One namespace's netlink connection. Its I/O is driven by the thread of each call, beside
/// the call's requests, on a current-thread runtime of its own: a request and its answer
/// cost a few system calls on that thread and no hand-off to another (a node of 1,000 ports
/// sends 3,000 of them in one converge, as `ip -batch` does on one socket).
struct Connection {
    handle: Handle,
    /// The namespace it was opened in (see [`netns::identity`]).
    identity: Option<(u64, u64)>,
    /// The connection's socket I/O (`rtnetlink::Connection`); ends when the socket fails.
    io: Pin<Box<dyn Future<Output = ()> + Send>>,
    /// Whether `io` has ended: the connection is opened again.
    closed: bool,
    /// The runtime the socket is registered with; it has no thread of its own.
    runtime: Option<tokio::runtime::Runtime>,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("identity", &self.identity)
            .field("closed", &self.closed)
            .finish_non_exhaustive()
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        // The socket first (it deregisters from the runtime), then the runtime, without
        // waiting: this may run on an async runtime's worker.
        self.io = Box::pin(std::future::pending());
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

impl NetlinkLinks {
    /// The driver.
    pub fn new() -> Self {
        Self::default()
    }

    /// `ns`'s connection: the one kept while it is the same namespace and its socket works,
    /// else a new one opened inside it.
    fn connection(&self, ns: &Netns) -> Result<Arc<Mutex<Connection>>, LinkError> {
        let identity = netns::identity(ns);
        let mut conns = self.connections.lock().unwrap_or_else(|e| e.into_inner());
        if identity.is_none() {
            conns.remove(ns);
            return Err(LinkError::NoNetns(ns.clone()));
        }
        if let Some(c) = conns.get(ns) {
            // Busy (locked by a call) means open and working.
            let usable = match c.try_lock() {
                Ok(g) => g.identity == identity && !g.closed,
                Err(std::sync::TryLockError::WouldBlock) => true,
                Err(std::sync::TryLockError::Poisoned(_)) => false,
            };
            if usable {
                return Ok(Arc::clone(c));
            }
        }
        conns.remove(ns);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .map_err(io("start a netlink runtime"))?;
        let rt = runtime.handle().clone();
        // The socket is made inside the namespace (it stays there) and registered with the
        // connection's runtime.
        let opened = netns::run_in(ns, move || {
            let _entered = rt.enter();
            let (conn, handle, _) = rtnetlink::new_connection()?;
            Ok::<_, std::io::Error>((handle, conn))
        });
        let (handle, conn) = match opened {
            Ok(r) => r.map_err(io("open a netlink socket"))?,
            Err(EnterError::Missing(ns)) => return Err(LinkError::NoNetns(ns)),
            Err(EnterError::Enter { netns, source }) => {
                return Err(LinkError::Io {
                    what: format!("enter network namespace {netns}"),
                    source,
                });
            }
            Err(EnterError::Thread(m)) => {
                return Err(LinkError::Io {
                    what: format!("namespace worker thread: {m}"),
                    source: std::io::Error::other(m),
                });
            }
        };
        let c = Arc::new(Mutex::new(Connection {
            handle,
            identity,
            io: Box::pin(conn),
            closed: false,
            runtime: Some(runtime),
        }));
        conns.insert(ns.clone(), Arc::clone(&c));
        Ok(c)
    }

    /// Runs `work` with the netlink handle of `ns`, blocking the calling thread (which must
    /// not be one of an async runtime's workers) until it is done; the thread drives the
    /// connection's I/O meanwhile. Calls in one namespace take turns.
    fn exec<T, F, Fut>(&self, ns: &Netns, work: F) -> Result<T, LinkError>
    where
        F: FnOnce(Handle) -> Fut,
        Fut: Future<Output = Result<T, LinkError>>,
    {
        let slot = self.connection(ns)?;
        let mut guard = slot.lock().unwrap_or_else(|e| e.into_inner());
        let c = &mut *guard;
        let Some(rt) = c.runtime.as_ref() else {
            c.closed = true;
            return Err(closed());
        };
        let work = work(c.handle.clone());
        let io = c.io.as_mut();
        let out = rt.block_on(async move {
            tokio::select! {
                biased;
                r = work => Some(r),
                () = io => None,
            }
        });
        out.unwrap_or_else(|| {
            c.closed = true;
            Err(closed())
        })
    }

    /// Forgets the connection of a namespace that goes.
    fn forget(&self, ns: &Netns) {
        self.connections
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(ns);
    }
}

/// The errno of a netlink error answer.
fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.code.map(|c| -c.get()),
        _ => None,
    }
}

fn nl(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> LinkError {
    let what = what.into();
    move |source| LinkError::Netlink { what, source }
}

/// A namespace's netlink socket failed; the next call opens another.
fn closed() -> LinkError {
    LinkError::Io {
        what: "netlink connection".into(),
        source: std::io::Error::other("the netlink socket closed"),
    }
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> LinkError {
    let what = what.into();
    move |source| LinkError::Io { what, source }
}

/// One link's message, by name; `None` when absent.
async fn find(h: &Handle, name: &IfName) -> Result<Option<LinkMessage>, LinkError> {
    let mut s = h.link().get().match_name(name.as_str()).execute();
    match s.try_next().await {
        Ok(m) => Ok(m),
        Err(e) if errno(&e) == Some(ENODEV) => Ok(None),
        Err(e) => Err(nl(format!("get link {name}"))(e)),
    }
}

async fn require(h: &Handle, ns: &Netns, name: &IfName) -> Result<LinkMessage, LinkError> {
    find(h, name).await?.ok_or_else(|| LinkError::NoLink {
        netns: ns.clone(),
        name: name.clone(),
    })
}

async fn dump(h: &Handle) -> Result<Vec<LinkMessage>, LinkError> {
    h.link()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(nl("list links"))
}

fn name_of(m: &LinkMessage) -> Option<&str> {
    m.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.as_str()),
        _ => None,
    })
}

fn master_of(m: &LinkMessage) -> Option<u32> {
    m.attributes.iter().find_map(|a| match a {
        LinkAttribute::Controller(i) => Some(*i),
        _ => None,
    })
}

fn kind_of(m: &LinkMessage) -> LinkKind {
    let infos = m.attributes.iter().find_map(|a| match a {
        LinkAttribute::LinkInfo(i) => Some(i),
        _ => None,
    });
    let Some(infos) = infos else {
        return LinkKind::Other(None);
    };
    let kind = infos.iter().find_map(|i| match i {
        LinkInfo::Kind(k) => Some(k),
        _ => None,
    });
    match kind {
        Some(InfoKind::Bridge) => LinkKind::Bridge,
        Some(InfoKind::Veth) => LinkKind::Veth,
        Some(InfoKind::Tun) => LinkKind::Tun,
        Some(InfoKind::Vxlan) => {
            let mut info = VxlanInfo {
                vni: 0,
                local: None,
                port: 0,
                learning: true,
            };
            for i in infos {
                if let LinkInfo::Data(InfoData::Vxlan(attrs)) = i {
                    for a in attrs {
                        match a {
                            InfoVxlan::Id(v) => info.vni = *v,
                            InfoVxlan::Local(ip) => info.local = Some(*ip),
                            InfoVxlan::Port(p) => info.port = *p,
                            InfoVxlan::Learning(l) => info.learning = *l,
                            _ => {}
                        }
                    }
                }
            }
            LinkKind::Vxlan(info)
        }
        Some(InfoKind::Vlan) => LinkKind::Vlan(
            infos
                .iter()
                .filter_map(|i| match i {
                    LinkInfo::Data(InfoData::Vlan(attrs)) => Some(attrs),
                    _ => None,
                })
                .flatten()
                .find_map(|a| match a {
                    InfoVlan::Id(id) => Some(*id),
                    _ => None,
                })
                .unwrap_or(0),
        ),
        Some(other) => LinkKind::Other(Some(other.to_string())),
        None => LinkKind::Other(None),
    }
}

fn to_link(m: &LinkMessage, names: &HashMap<u32, String>) -> Option<Link> {
    let name = IfName::new(name_of(m)?).ok()?;
    Some(Link {
        name,
        kind: kind_of(m),
        mtu: m
            .attributes
            .iter()
            .find_map(|a| match a {
                LinkAttribute::Mtu(v) => Some(*v),
                _ => None,
            })
            .unwrap_or(0),
        up: m.header.flags.contains(LinkFlags::Up),
        master: master_of(m)
            .and_then(|i| names.get(&i))
            .and_then(|n| IfName::new(n).ok()),
        mac: m.attributes.iter().find_map(|a| match a {
            LinkAttribute::Address(b) => MacAddr::from_slice(b),
            _ => None,
        }),
    })
}

async fn names(h: &Handle) -> Result<HashMap<u32, String>, LinkError> {
    Ok(dump(h)
        .await?
        .iter()
        .filter_map(|m| Some((m.header.index, name_of(m)?.to_owned())))
        .collect())
}

/// Creates a link unless one of that name exists; `same` says whether an existing one is
/// what was asked for.
async fn create(
    h: &Handle,
    ns: &Netns,
    name: &IfName,
    msg: LinkMessage,
    same: impl Fn(&LinkKind) -> bool,
) -> Result<(), LinkError> {
    let check = |m: &LinkMessage| {
        let kind = kind_of(m);
        if same(&kind) {
            Ok(())
        } else {
            Err(LinkError::Conflict {
                netns: ns.clone(),
                name: name.clone(),
                found: format!("{kind:?}"),
            })
        }
    };
    if let Some(m) = find(h, name).await? {
        return check(&m);
    }
    match h.link().add(msg).execute().await {
        Ok(()) => Ok(()),
        // Made by someone else since the lookup: judge what is there now.
        Err(e) if errno(&e) == Some(EEXIST) => match find(h, name).await? {
            Some(m) => check(&m),
            None => Err(nl(format!("create link {name}"))(e)),
        },
        Err(e) => Err(nl(format!("create link {name}"))(e)),
    }
}

async fn change(h: &Handle, what: String, msg: LinkMessage) -> Result<(), LinkError> {
    h.link().change(msg).execute().await.map_err(nl(what))
}

/// Changes link `name` of `ns` in one request, addressed by its name (`RTM_NEWLINK`
/// without create: the kernel finds the device by name and answers `ENODEV` when it is
/// absent), instead of a lookup and then a change: a node of 1,000 ports wires each port in
/// three requests.
async fn change_named(
    h: &Handle,
    ns: &Netns,
    name: &IfName,
    what: String,
    build: impl FnOnce(LinkMessageBuilder<LinkUnspec>) -> LinkMessageBuilder<LinkUnspec>,
) -> Result<(), LinkError> {
    let msg = build(LinkUnspec::new_with_name(name.as_str())).build();
    match h.link().change(msg).execute().await {
        Ok(()) => Ok(()),
        Err(e) if errno(&e) == Some(ENODEV) => Err(LinkError::NoLink {
            netns: ns.clone(),
            name: name.clone(),
        }),
        Err(e) => Err(nl(what)(e)),
    }
}

fn v4(m: &AddressMessage) -> Option<Ipv4Cidr> {
    if m.header.family != AddressFamily::Inet {
        return None;
    }
    let ip = m.attributes.iter().find_map(|a| match a {
        AddressAttribute::Local(IpAddr::V4(ip)) => Some(*ip),
        _ => None,
    });
    let ip = ip.or_else(|| {
        m.attributes.iter().find_map(|a| match a {
            AddressAttribute::Address(IpAddr::V4(ip)) => Some(*ip),
            _ => None,
        })
    })?;
    Ipv4Cidr::new(ip, m.header.prefix_len)
}

async fn addresses_of(h: &Handle, index: u32) -> Result<Vec<AddressMessage>, LinkError> {
    let all: Vec<AddressMessage> = h
        .address()
        .get()
        .set_link_index_filter(index)
        .execute()
        .try_collect()
        .await
        .map_err(nl("list addresses"))?;
    Ok(all
        .into_iter()
        .filter(|m| m.header.index == index)
        .collect())
}

fn fdb_entry(m: &NeighbourMessage, index: u32) -> Option<FdbEntry> {
    if m.header.ifindex != index {
        return None;
    }
    let mac = m.attributes.iter().find_map(|a| match a {
        NeighbourAttribute::LinkLayerAddress(b) => MacAddr::from_slice(b),
        _ => None,
    })?;
    let remote = m.attributes.iter().find_map(|a| match a {
        // Bridge-family answers carry the address as raw bytes.
        NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) => Some(*ip),
        NeighbourAttribute::Destination(NeighbourAddress::Other(b)) => {
            <[u8; 4]>::try_from(b.as_slice()).ok().map(Ipv4Addr::from)
        }
        _ => None,
    })?;
    Some(FdbEntry { mac, remote })
}

async fn fdb_of(h: &Handle, index: u32) -> Result<BTreeSet<FdbEntry>, LinkError> {
    let all: Vec<NeighbourMessage> = h
        .neighbours()
        .get()
        .set_address_family(AddressFamily::Bridge)
        .execute()
        .try_collect()
        .await
        .map_err(nl("list fdb"))?;
    Ok(all.iter().filter_map(|m| fdb_entry(m, index)).collect())
}

fn fdb_message(index: u32, e: &FdbEntry) -> NeighbourMessage {
    let mut m = NeighbourMessage::default();
    m.header.family = AddressFamily::Bridge;
    m.header.ifindex = index;
    m.header.state = NeighbourState::Permanent;
    m.header.flags = NeighbourFlags::Own;
    m.attributes.push(NeighbourAttribute::LinkLayerAddress(
        e.mac.octets().to_vec(),
    ));
    m.attributes
        .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(
            e.remote,
        )));
    m
}

/// Sends a new FDB entry with explicit flags: the zero MAC is appended to (one remote more),
/// a unicast MAC's remote replaced in place.
async fn fdb_add(h: &Handle, index: u32, e: &FdbEntry, flags: u16) -> Result<(), LinkError> {
    let mut req = NetlinkMessage::from(RouteNetlinkMessage::NewNeighbour(fdb_message(index, e)));
    req.header.flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | flags;
    let what = format!("add fdb entry {} dst {}", e.mac, e.remote);
    let mut h = h.clone();
    let mut resp = h.request(req).map_err(nl(what.clone()))?;
    while let Some(msg) = resp.next().await {
        if let NetlinkPayload::Error(err) = msg.payload
            && err.code.is_some()
        {
            return Err(nl(what)(rtnetlink::Error::NetlinkError(err)));
        }
    }
    Ok(())
}

fn vxlan_valid(spec: &VxlanSpec) -> Result<(), LinkError> {
    if spec.vni == 0 || spec.vni >= 1 << 24 {
        return Err(LinkError::Invalid(format!(
            "VNI {} is not 1..2^24",
            spec.vni
        )));
    }
    if spec.port == 0 {
        return Err(LinkError::Invalid("VXLAN port 0".into()));
    }
    Ok(())
}

impl Links for NetlinkLinks {
    /// `ip netns add`; a present namespace is left as it is.
    fn add_netns(&self, name: &Name) -> Result<(), LinkError> {
        if netns::path(name).exists() {
            return Ok(());
        }
        run(
            &["netns", "add", name.as_str()],
            &format!("add netns {name}"),
        )
    }

    /// `ip netns del`; an absent namespace is `Ok`.
    fn del_netns(&self, name: &Name) -> Result<(), LinkError> {
        self.forget(&Netns::Named(name.clone()));
        if !netns::path(name).exists() {
            return Ok(());
        }
        run(
            &["netns", "del", name.as_str()],
            &format!("delete netns {name}"),
        )
    }

    /// The files in `/run/netns` whose names are valid [`Name`]s. Connections kept for
    /// namespaces that are gone (or made again) are dropped here: a socket holds its
    /// namespace, and the devices in it, alive.
    fn list_netns(&self) -> Result<BTreeSet<Name>, LinkError> {
        self.connections
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|ns, c| match c.try_lock() {
                Ok(c) => netns::identity(ns) == c.identity,
                Err(_) => true,
            });
        let dir = match std::fs::read_dir(netns::NETNS_DIR) {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeSet::new()),
            Err(e) => return Err(io("list network namespaces")(e)),
        };
        let mut out = BTreeSet::new();
        for entry in dir {
            let entry = entry.map_err(io("list network namespaces"))?;
            if let Some(n) = entry.file_name().to_str().and_then(|s| Name::new(s).ok()) {
                out.insert(n);
            }
        }
        Ok(out)
    }

    /// Links whose names are not valid [`IfName`]s are left out.
    fn links(&self, ns: &Netns) -> Result<Vec<Link>, LinkError> {
        self.exec(ns, move |h| async move {
            let all = dump(&h).await?;
            let names: HashMap<u32, String> = all
                .iter()
                .filter_map(|m| Some((m.header.index, name_of(m)?.to_owned())))
                .collect();
            Ok(all.iter().filter_map(|m| to_link(m, &names)).collect())
        })
    }

    fn link(&self, ns: &Netns, name: &IfName) -> Result<Option<Link>, LinkError> {
        let name = name.clone();
        self.exec(ns, move |h| async move {
            let Some(m) = find(&h, &name).await? else {
                return Ok(None);
            };
            let names = match master_of(&m) {
                Some(_) => names(&h).await?,
                None => HashMap::new(),
            };
            Ok(to_link(&m, &names))
        })
    }

    /// Idempotent: a bridge of that name is `Ok`; another kind is a conflict.
    fn add_bridge(&self, ns: &Netns, name: &IfName) -> Result<(), LinkError> {
        let (ns2, name) = (ns.clone(), name.clone());
        self.exec(ns, move |h| async move {
            let msg = LinkBridge::new(name.as_str()).down().build();
            create(&h, &ns2, &name, msg, |k| *k == LinkKind::Bridge).await
        })
    }

    /// Idempotent: a VXLAN device with the same VNI, local address and port and no learning
    /// is `Ok`; anything else of that name is a conflict.
    fn add_vxlan(&self, ns: &Netns, spec: &VxlanSpec) -> Result<(), LinkError> {
        vxlan_valid(spec)?;
        let (ns2, spec) = (ns.clone(), spec.clone());
        self.exec(ns, move |h| async move {
            let msg = LinkVxlan::new(spec.name.as_str(), spec.vni)
                .local(spec.local)
                .port(spec.port)
                .learning(false)
                .down()
                .build();
            let want = VxlanInfo {
                vni: spec.vni,
                local: Some(spec.local),
                port: spec.port,
                learning: false,
            };
            create(&h, &ns2, &spec.name, msg, |k| *k == LinkKind::Vxlan(want)).await
        })
    }

    /// Idempotent: a VLAN sub-interface of that name with the same ID is `Ok`; anything else
    /// of that name is a conflict; an absent parent is [`LinkError::NoLink`].
    fn add_vlan(&self, ns: &Netns, spec: &VlanSpec) -> Result<(), LinkError> {
        if !(1..=4094).contains(&spec.id) {
            return Err(LinkError::Invalid(format!("VLAN ID {}", spec.id)));
        }
        let (ns2, spec) = (ns.clone(), spec.clone());
        self.exec(ns, move |h| async move {
            let parent = require(&h, &ns2, &spec.parent).await?.header.index;
            let msg = LinkVlan::new(spec.name.as_str(), parent, spec.id)
                .down()
                .build();
            create(&h, &ns2, &spec.name, msg, |k| *k == LinkKind::Vlan(spec.id))
                .await
                .map_err(|e| match e {
                    LinkError::Netlink { what, source } if errno(&source) == Some(EOPNOTSUPP) => {
                        LinkError::Netlink {
                            what: format!(
                                "{what}: this kernel has no 802.1Q VLAN support \
                                 (CONFIG_VLAN_8021Q)"
                            ),
                            source,
                        }
                    }
                    e => e,
                })
        })
    }

    /// Idempotent: a veth of that name is `Ok` (where its peer is is not checked); another
    /// kind is a conflict. Both ends are made in one request, the peer directly in its
    /// namespace; a peer name taken there is a conflict.
    fn add_veth(&self, ns: &Netns, spec: &VethSpec) -> Result<(), LinkError> {
        let peer_ns = match &spec.peer_netns {
            Some(p) if p != ns => {
                let path = match p {
                    Netns::Named(n) => netns::path(n),
                    Netns::Host => "/proc/self/ns/net".into(),
                };
                match File::open(&path) {
                    Ok(f) => Some(f),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        return Err(LinkError::NoNetns(p.clone()));
                    }
                    Err(e) => return Err(io(format!("open network namespace {p}"))(e)),
                }
            }
            _ => None,
        };
        let (ns2, spec) = (ns.clone(), spec.clone());
        self.exec(ns, move |h| async move {
            let mut peer = LinkMessageBuilder::<LinkUnspec>::new().name(spec.peer.as_str());
            if let Some(f) = &peer_ns {
                peer = peer.setns_by_fd(f.as_raw_fd());
            }
            let msg = LinkVeth::new(spec.name.as_str(), spec.peer.as_str())
                .set_info_data(InfoData::Veth(InfoVeth::Peer(peer.build())))
                .down()
                .build();
            let out = create(&h, &ns2, &spec.name, msg, |k| *k == LinkKind::Veth).await;
            drop(peer_ns);
            out
        })
    }

    /// Idempotent: an absent link is `Ok`.
    fn del_link(&self, ns: &Netns, name: &IfName) -> Result<(), LinkError> {
        let name = name.clone();
        self.exec(ns, move |h| async move {
            let Some(m) = find(&h, &name).await? else {
                return Ok(());
            };
            match h.link().del(m.header.index).execute().await {
                Ok(()) => Ok(()),
                Err(e) if errno(&e) == Some(ENODEV) => Ok(()),
                Err(e) => Err(nl(format!("delete link {name}"))(e)),
            }
        })
    }

    /// Idempotent: the kernel changes nothing when the link already has that master. One
    /// lookup of the bridge and one change by name.
    fn set_master(
        &self,
        ns: &Netns,
        name: &IfName,
        master: Option<&IfName>,
    ) -> Result<(), LinkError> {
        let (ns2, name, master) = (ns.clone(), name.clone(), master.cloned());
        self.exec(ns, move |h| async move {
            let want = match &master {
                Some(b) => Some(require(&h, &ns2, b).await?.header.index),
                None => None,
            };
            change_named(
                &h,
                &ns2,
                &name,
                format!("set master of {name}"),
                |m| match want {
                    Some(i) => m.controller(i),
                    None => m.nocontroller(),
                },
            )
            .await
        })
    }

    /// One `RTM_NEWLINK` per link, by name, carrying its MTU, master and up together, all
    /// sent on the namespace's connection without waiting for each answer (as `ip -batch`
    /// streams its lines), at most [`PIPELINE`] unanswered at once: a node of 1,000 ports is
    /// wired in 1,000 requests and one bridge lookup instead of 3,000 round trips. The first
    /// failure in `links`' order is returned; requests already sent by then may have been
    /// made, none is sent after it.
    fn attach(&self, ns: &Netns, bridge: &IfName, links: &[Attach]) -> Result<(), LinkError> {
        if let Some(a) = links.iter().find(|a| a.mtu == Some(0)) {
            return Err(LinkError::Invalid(format!("MTU 0 for {}", a.name)));
        }
        let todo: Vec<Attach> = links
            .iter()
            .filter(|a| a.mtu.is_some() || a.master || a.up)
            .cloned()
            .collect();
        if todo.is_empty() {
            return Ok(());
        }
        let (ns2, bridge) = (ns.clone(), bridge.clone());
        self.exec(ns, move |h| async move {
            let master = match todo.iter().any(|a| a.master) {
                true => Some(require(&h, &ns2, &bridge).await?.header.index),
                false => None,
            };
            let (h, ns2, bridge) = (&h, &ns2, &bridge);
            futures::stream::iter(todo.iter().map(|a| async move {
                change_named(
                    h,
                    ns2,
                    &a.name,
                    format!("attach {} to {bridge}", a.name),
                    |m| {
                        let m = match a.mtu {
                            Some(mtu) => m.mtu(mtu),
                            None => m,
                        };
                        let m = match master.filter(|_| a.master) {
                            Some(i) => m.controller(i),
                            None => m,
                        };
                        if a.up { m.up() } else { m }
                    },
                )
                .await
            }))
            .buffered(PIPELINE)
            .try_collect::<Vec<()>>()
            .await
            .map(|_| ())
        })
    }

    /// Idempotent: setting a link up that is up changes nothing. One change by name.
    fn set_up(&self, ns: &Netns, name: &IfName, up: bool) -> Result<(), LinkError> {
        let (ns2, name) = (ns.clone(), name.clone());
        self.exec(ns, move |h| async move {
            change_named(&h, &ns2, &name, format!("set {name} up={up}"), |m| {
                if up { m.up() } else { m.down() }
            })
            .await
        })
    }

    /// Idempotent: setting the current MTU is `Ok`. MTU 0 is invalid. One change by name.
    fn set_mtu(&self, ns: &Netns, name: &IfName, mtu: u32) -> Result<(), LinkError> {
        if mtu == 0 {
            return Err(LinkError::Invalid("MTU 0".into()));
        }
        let (ns2, name) = (ns.clone(), name.clone());
        self.exec(ns, move |h| async move {
            change_named(&h, &ns2, &name, format!("set mtu of {name}"), |m| {
                m.mtu(mtu)
            })
            .await
        })
    }

    fn addresses(&self, ns: &Netns, name: &IfName) -> Result<BTreeSet<Ipv4Cidr>, LinkError> {
        let (ns2, name) = (ns.clone(), name.clone());
        self.exec(ns, move |h| async move {
            let m = require(&h, &ns2, &name).await?;
            Ok(addresses_of(&h, m.header.index)
                .await?
                .iter()
                .filter_map(v4)
                .collect())
        })
    }

    /// Idempotent: a present address (same prefix length) is `Ok`.
    fn add_address(&self, ns: &Netns, name: &IfName, addr: Ipv4Cidr) -> Result<(), LinkError> {
        let (ns2, name) = (ns.clone(), name.clone());
        self.exec(ns, move |h| async move {
            let m = require(&h, &ns2, &name).await?;
            let index = m.header.index;
            if addresses_of(&h, index)
                .await?
                .iter()
                .any(|a| v4(a) == Some(addr))
            {
                return Ok(());
            }
            match h
                .address()
                .add(index, IpAddr::V4(addr.addr()), addr.prefix())
                .execute()
                .await
            {
                Ok(()) => Ok(()),
                Err(e) if errno(&e) == Some(EEXIST) => Ok(()),
                Err(e) => Err(nl(format!("add address {addr} to {name}"))(e)),
            }
        })
    }

    /// Idempotent: an absent address is `Ok`.
    fn del_address(&self, ns: &Netns, name: &IfName, addr: Ipv4Cidr) -> Result<(), LinkError> {
        let (ns2, name) = (ns.clone(), name.clone());
        self.exec(ns, move |h| async move {
            let m = require(&h, &ns2, &name).await?;
            for a in addresses_of(&h, m.header.index).await? {
                if v4(&a) == Some(addr) {
                    match h.address().del(a).execute().await {
                        Ok(()) => {}
                        Err(e) if errno(&e) == Some(EADDRNOTAVAIL) => {}
                        Err(e) => return Err(nl(format!("delete address {addr} of {name}"))(e)),
                    }
                }
            }
            Ok(())
        })
    }

    fn fdb(&self, ns: &Netns, vxlan: &IfName) -> Result<BTreeSet<FdbEntry>, LinkError> {
        let (ns2, vxlan) = (ns.clone(), vxlan.clone());
        self.exec(ns, move |h| async move {
            let m = require(&h, &ns2, &vxlan).await?;
            fdb_of(&h, m.header.index).await
        })
    }

    /// Idempotent: adds what is missing first (a unicast MAC that moved has its remote
    /// replaced in place), then removes what is not asked for; entries already right are not
    /// touched.
    fn set_fdb(
        &self,
        ns: &Netns,
        vxlan: &IfName,
        entries: &BTreeSet<FdbEntry>,
    ) -> Result<(), LinkError> {
        let (ns2, vxlan, want) = (ns.clone(), vxlan.clone(), entries.clone());
        self.exec(ns, move |h| async move {
            let index = require(&h, &ns2, &vxlan).await?.header.index;
            let have = fdb_of(&h, index).await?;
            for e in want.difference(&have) {
                let flags = if e.mac == MacAddr::ZERO {
                    NLM_F_APPEND
                } else if have.iter().any(|o| o.mac == e.mac) {
                    NLM_F_REPLACE
                } else {
                    0
                };
                fdb_add(&h, index, e, flags).await?;
            }
            for e in fdb_of(&h, index).await?.difference(&want) {
                match h.neighbours().del(fdb_message(index, e)).execute().await {
                    Ok(()) => {}
                    Err(err) if errno(&err) == Some(ENOENT) => {}
                    Err(err) => {
                        return Err(nl(format!("delete fdb entry {} dst {}", e.mac, e.remote))(
                            err,
                        ));
                    }
                }
            }
            Ok(())
        })
    }

    /// Idempotent: nothing is sent when the link has that address already.
    fn set_mac(&self, ns: &Netns, name: &IfName, mac: MacAddr) -> Result<(), LinkError> {
        let (ns2, name) = (ns.clone(), name.clone());
        self.exec(ns, move |h| async move {
            let m = require(&h, &ns2, &name).await?;
            let have = m.attributes.iter().find_map(|a| match a {
                LinkAttribute::Address(b) => MacAddr::from_slice(b),
                _ => None,
            });
            if have == Some(mac) {
                return Ok(());
            }
            let msg = LinkUnspec::new_with_index(m.header.index)
                .address(mac.octets().to_vec())
                .build();
            change(&h, format!("set the MAC of {name}"), msg).await
        })
    }

    fn routes(&self, ns: &Netns) -> Result<BTreeSet<RouteSpec>, LinkError> {
        self.exec(ns, move |h| async move {
            let all: Vec<RouteMessage> = h
                .route()
                .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
                .execute()
                .try_collect()
                .await
                .map_err(nl("list routes"))?;
            Ok(all.iter().filter_map(route_of).collect())
        })
    }

    /// Idempotent: a present route is `Ok`.
    fn add_route(&self, ns: &Netns, route: &RouteSpec) -> Result<(), LinkError> {
        let route = *route;
        self.exec(ns, move |h| async move {
            match h.route().add(route_message(&route)).execute().await {
                Ok(()) => Ok(()),
                Err(e) if errno(&e) == Some(EEXIST) => Ok(()),
                Err(e) => Err(nl(format!("add route {route}"))(e)),
            }
        })
    }

    /// Idempotent: an absent route is `Ok`.
    fn del_route(&self, ns: &Netns, route: &RouteSpec) -> Result<(), LinkError> {
        let route = *route;
        self.exec(ns, move |h| async move {
            match h.route().del(route_message(&route)).execute().await {
                Ok(()) => Ok(()),
                Err(e) if matches!(errno(&e), Some(ESRCH | ENOENT)) => Ok(()),
                Err(e) => Err(nl(format!("delete route {route}"))(e)),
            }
        })
    }

    fn forwarding(&self, ns: &Netns) -> Result<bool, LinkError> {
        Self::ip_forward(ns, None)
    }

    fn set_forwarding(&self, ns: &Netns, on: bool) -> Result<(), LinkError> {
        Self::ip_forward(ns, Some(on)).map(|_| ())
    }
}

impl NetlinkLinks {
    /// Reads or writes `net.ipv4.ip_forward` from a thread inside `ns` (`/proc/sys/net` is
    /// the namespace of the thread that opens it).
    fn ip_forward(ns: &Netns, set: Option<bool>) -> Result<bool, LinkError> {
        let r = netns::run_in(ns, move || -> Result<bool, LinkError> {
            if let Some(on) = set {
                std::fs::write(IP_FORWARD, if on { "1\n" } else { "0\n" })
                    .map_err(io("set net.ipv4.ip_forward"))?;
                // A router announces its addresses when an interface comes up (a router
                // moved to this node takes over its MACs at once, without waiting for
                // bridges and neighbours to age the old place out).
                if on {
                    std::fs::write(ARP_NOTIFY, "1\n").map_err(io("set arp_notify"))?;
                }
            }
            let v = std::fs::read_to_string(IP_FORWARD).map_err(io("read net.ipv4.ip_forward"))?;
            Ok(v.trim() == "1")
        });
        match r {
            Ok(r) => r,
            Err(EnterError::Missing(ns)) => Err(LinkError::NoNetns(ns)),
            Err(e) => Err(LinkError::Io {
                what: "enter a network namespace".into(),
                source: std::io::Error::other(e.to_string()),
            }),
        }
    }
}

/// Runs `ip` with `args`; a failure carries its stderr.
fn run(args: &[&str], what: &str) -> Result<(), LinkError> {
    let out = std::process::Command::new("ip")
        .args(args)
        .output()
        .map_err(io(what))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(LinkError::Io {
            what: what.to_owned(),
            source: std::io::Error::other(String::from_utf8_lossy(&out.stderr).trim().to_owned()),
        })
    }
}
