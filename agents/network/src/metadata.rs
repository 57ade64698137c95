//! The metadata service at 169.254.169.254, as Nova's (OpenStack's `/openstack/latest/…`,
//! which cloud-init's OpenStack datasource reads, and EC2's `/latest/meta-data/` basics):
//! one listener per network served by DHCP on the node, inside that network's DHCP
//! namespace, reached by the guests through the host route the DHCP server hands out (option
//! 121, via its own address). The asking guest is identified by the network the listener
//! serves and the connection's source address, through the node's Port holding that
//! address to the Server it is bound to, never by anything the guest says (the node's
//! anti-spoofing rules keep a port to its own addresses); the Server and its Keypair are
//! read with the node's own credentials, which reach only the servers placed on the node.
//!
//! Only GET is answered; a connection carries one request, whose head is bounded in size
//! and must come within [`HEADER_TIME`], and lives at most [`REQUEST_TIME`]. A connection
//! from an address no port of the node holds is closed as soon as accepted; one address
//! holds at most [`PER_SOURCE`] connections at once and opens at most [`RATE`] a second, a
//! listener at most [`MAX_CONNECTIONS`]: past those a connection is closed unanswered, so
//! one guest cannot keep the others waiting. The node's Servers come from a watch
//! ([`Watched`]); Servers and Keypairs are remembered for [`CACHE_TIME`]: a guest asking in a
//! loop costs the API at most one read of its Keypair that long.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use base64::Engine;
use bytes::Bytes;
use futures::StreamExt;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode};
use kube::api::Api;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};
use stratus_api_types::compute::{Keypair, Server};
use stratus_api_types::network::{Network, Port};

use crate::desired::{Snapshot, of_network};
use crate::driver::{IfName, Ipv4Cidr, Links, Name, Netns, netns};
use crate::plan::{Desired, dhcp_name};

/// The link-local address guests ask.
pub const ADDRESS: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);

/// The port it listens on.
pub const PORT: u16 = 80;

/// How long one connection (its request and the answer) may take.
pub const REQUEST_TIME: Duration = Duration::from_secs(10);

/// How long the head of the request may take to come.
pub const HEADER_TIME: Duration = Duration::from_secs(2);

/// Connections one listener holds at once; more are closed unanswered.
pub const MAX_CONNECTIONS: usize = 32;

/// Connections one source address holds at once; more are closed unanswered.
pub const PER_SOURCE: usize = 4;

/// Connections one source address may open a second; more are closed unanswered.
pub const RATE: u32 = 20;

/// How long a Server or Keypair read is answered from memory.
pub const CACHE_TIME: Duration = Duration::from_secs(5);

/// A request head larger than this is refused (hyper's smallest buffer).
const MAX_HEAD: usize = 8192;

/// One of a server's interfaces on this node, for `network_data.json`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nic {
    /// The Port's name.
    pub port: String,
    /// The Port's uid.
    pub uid: String,
    /// Its MAC address.
    pub mac: String,
    /// Its network's MTU.
    pub mtu: u32,
    /// Its network's uid.
    pub network: String,
}

/// A Server asking, by project and name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Asker {
    /// The Server's (and its Port's) namespace.
    pub namespace: String,
    /// The Server's name (the Port's `status.boundTo`).
    pub server: String,
}

/// Who is behind each address of the node's ports, per network.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Index {
    /// By (network uid, source address): the server and the name of its port holding it.
    by_source: BTreeMap<(String, Ipv4Addr), (Asker, String)>,
    /// Each server's interfaces on the node, in name order.
    nics: BTreeMap<Asker, Vec<Nic>>,
}

impl Index {
    /// The server whose port on network `network` holds `ip`.
    pub fn asker(&self, network: &str, ip: Ipv4Addr) -> Option<&Asker> {
        self.holder(network, ip).map(|(a, _)| a)
    }

    /// The server and the name of its port on network `network` holding `ip`.
    fn holder(&self, network: &str, ip: Ipv4Addr) -> Option<&(Asker, String)> {
        self.by_source.get(&(network.to_owned(), ip))
    }

    /// The server's interfaces on the node.
    pub fn nics(&self, asker: &Asker) -> &[Nic] {
        self.nics.get(asker).map(Vec::as_slice).unwrap_or_default()
    }
}

/// Whether another port of the network may send from `ip`: one without port security holding
/// it (it may send from any address, so its own are not its word either), or one whose
/// allowed address pairs cover it (a pair not read as an IPv4 address or prefix covers all).
fn spoofable(snap: &Snapshot, net: &Network, owner: &Port, ip: Ipv4Addr) -> bool {
    snap.ports
        .iter()
        .filter(|p| of_network(&p.metadata, &p.spec.network, net))
        .any(|p| {
            let secured = p
                .spec
                .port_security_enabled
                .unwrap_or(net.spec.port_security_enabled);
            let holds = p.status.as_ref().is_some_and(|s| {
                s.fixed_ips
                    .iter()
                    .any(|f| f.ip_address.parse::<Ipv4Addr>() == Ok(ip))
            });
            let covers = p.metadata.uid != owner.metadata.uid
                && p.spec.allowed_address_pairs.iter().any(|pair| {
                    let cidr = match pair.ip_address.parse::<Ipv4Addr>() {
                        Ok(a) => Ipv4Cidr::new(a, 32),
                        Err(_) => pair.ip_address.parse::<Ipv4Cidr>().ok(),
                    };
                    cidr.is_none_or(|c| c.contains(ip))
                });
            (!secured && holds) || covers
        })
}

/// The index of the node's live ports bound to a server: each IPv4 fixed address on its
/// network (the Network of that name in the port's project, made in it) to the server, but
/// for the addresses another port may send from ([`spoofable`]), which nobody is answered at.
pub fn index(snap: &Snapshot, node: &str) -> Index {
    let mut out = Index::default();
    for p in &snap.ports {
        let Some(status) = &p.status else { continue };
        if p.metadata.deletion_timestamp.is_some() || status.hypervisor.as_deref() != Some(node) {
            continue;
        }
        let Some(server) = status.bound_to.clone() else {
            continue;
        };
        let Some(net) = snap
            .networks
            .iter()
            .find(|n| of_network(&p.metadata, &p.spec.network, n))
        else {
            continue;
        };
        let Some(network) = net.uid() else { continue };
        let asker = Asker {
            namespace: p.namespace().unwrap_or_default(),
            server,
        };
        for f in &status.fixed_ips {
            if let Ok(ip) = f.ip_address.parse::<Ipv4Addr>()
                && !spoofable(snap, net, p, ip)
            {
                out.by_source
                    .insert((network.clone(), ip), (asker.clone(), p.name_any()));
            }
        }
        out.nics.entry(asker).or_default().push(Nic {
            port: p.name_any(),
            uid: p.uid().unwrap_or_default(),
            mac: status.mac_address.clone().unwrap_or_default(),
            mtu: net.spec.mtu,
            network,
        });
    }
    for nics in out.nics.values_mut() {
        nics.sort_by(|a, b| a.port.cmp(&b.port));
    }
    out
}

/// The DHCP namespaces of `desired` that get a listener, with their network's uid.
pub fn wanted(snap: &Snapshot, desired: &Desired) -> BTreeMap<Name, String> {
    let served: Vec<&Name> = desired
        .networks
        .iter()
        .filter_map(|n| n.dhcp.as_ref().map(|d| &d.spec.name))
        .collect();
    snap.networks
        .iter()
        .filter_map(|n| n.uid())
        .map(|uid| (dhcp_name(&desired.node, &uid), uid))
        .filter(|(name, _)| served.contains(&name))
        .collect()
}

/// The server's guest host name: `spec.hostname`, else the first label of its name (as the
/// config drive's `local-hostname`).
fn hostname(server: &Server) -> String {
    server.spec.hostname.clone().unwrap_or_else(|| {
        server
            .name_any()
            .split('.')
            .next()
            .unwrap_or("server")
            .to_owned()
    })
}

/// `meta_data.json`: what cloud-init's OpenStack datasource reads (uuid, name, hostname,
/// project, availability zone, public keys).
pub fn meta_data(server: &Server, keypair: Option<&Keypair>) -> Value {
    let (mut public_keys, mut keys) = (serde_json::Map::new(), Vec::new());
    if let Some(k) = keypair {
        public_keys.insert(k.name_any(), json!(k.spec.public_key));
        keys.push(json!({"name": k.name_any(), "type": "ssh", "data": k.spec.public_key}));
    }
    json!({
        "uuid": server.uid().unwrap_or_default(),
        "name": server.name_any(),
        "hostname": hostname(server),
        "project_id": server.namespace().unwrap_or_default(),
        "availability_zone": server.spec.availability_zone,
        "launch_index": 0,
        "public_keys": public_keys,
        "keys": keys,
        "meta": {},
        "devices": [],
    })
}

/// `network_data.json`: one link per interface, each configured by DHCP.
pub fn network_data(nics: &[Nic]) -> Value {
    let link = |n: &Nic| format!("tap{}", n.uid.chars().take(11).collect::<String>());
    let links: Vec<Value> = nics
        .iter()
        .map(|n| {
            json!({
                "id": link(n),
                "type": "phy",
                "ethernet_mac_address": n.mac,
                "mtu": n.mtu,
                "vif_id": n.uid,
            })
        })
        .collect();
    let networks: Vec<Value> = nics
        .iter()
        .enumerate()
        .map(|(i, n)| {
            json!({
                "id": format!("network{i}"),
                "type": "ipv4_dhcp",
                "link": link(n),
                "network_id": n.network,
            })
        })
        .collect();
    json!({"links": links, "networks": networks, "services": []})
}

/// The server's user data, decoded; `None` when it has none or it is not base64 (the
/// compute agent refuses to boot such a server).
pub fn user_data(server: &Server) -> Option<Vec<u8>> {
    let b64 = server.spec.user_data.as_deref()?;
    let clean: String = b64.chars().filter(|c| !c.is_whitespace()).collect();
    base64::engine::general_purpose::STANDARD.decode(clean).ok()
}

/// An answer: status, content type and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// The HTTP status.
    pub status: StatusCode,
    /// Its `Content-Type`.
    pub content_type: &'static str,
    /// The body.
    pub body: Vec<u8>,
}

impl Answer {
    fn text(status: StatusCode, body: &str) -> Self {
        Self {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.as_bytes().to_vec(),
        }
    }

    fn ok(body: &str) -> Self {
        Self::text(StatusCode::OK, body)
    }

    fn json(v: &Value) -> Self {
        Self {
            status: StatusCode::OK,
            content_type: "application/json",
            body: serde_json::to_vec_pretty(v).unwrap_or_default(),
        }
    }

    fn not_found() -> Self {
        Self::text(StatusCode::NOT_FOUND, "404 Not Found\n")
    }
}

/// What the service knows of the asking guest.
#[derive(Debug, Clone, Copy)]
pub struct Guest<'a> {
    /// Its Server.
    pub server: &'a Server,
    /// Its Keypair, if it names one that exists.
    pub keypair: Option<&'a Keypair>,
    /// Its interfaces on the node.
    pub nics: &'a [Nic],
    /// The address it asked from.
    pub ip: Ipv4Addr,
}

/// The answer to GET `path` for `guest`. Pure.
pub fn answer(path: &str, guest: &Guest<'_>) -> Answer {
    let path = path.split(['?', '#']).next().unwrap_or_default();
    let key = guest.keypair.map(|k| k.spec.public_key.as_str());
    match path {
        "/" => Answer::ok("latest\n"),
        "/openstack" | "/openstack/" => Answer::ok("latest\n"),
        "/openstack/latest" | "/openstack/latest/" => {
            let mut files = String::from("meta_data.json\nnetwork_data.json\nvendor_data.json\n");
            if user_data(guest.server).is_some() {
                files.push_str("user_data\n");
            }
            Answer::ok(&files)
        }
        "/openstack/latest/meta_data.json" => Answer::json(&meta_data(guest.server, guest.keypair)),
        "/openstack/latest/network_data.json" => Answer::json(&network_data(guest.nics)),
        "/openstack/latest/vendor_data.json" => Answer::json(&json!({})),
        "/openstack/latest/user_data" | "/latest/user-data" | "/latest/user-data/" => {
            match user_data(guest.server) {
                Some(body) => Answer {
                    status: StatusCode::OK,
                    content_type: "application/octet-stream",
                    body,
                },
                None => Answer::not_found(),
            }
        }
        "/latest" | "/latest/" => Answer::ok("meta-data/\nuser-data\n"),
        "/latest/meta-data" | "/latest/meta-data/" => {
            let mut files = String::from("hostname\ninstance-id\nlocal-hostname\nlocal-ipv4\n");
            if key.is_some() {
                files.push_str("public-keys/\n");
            }
            Answer::ok(&files)
        }
        "/latest/meta-data/instance-id" => Answer::ok(&guest.server.uid().unwrap_or_default()),
        "/latest/meta-data/hostname" | "/latest/meta-data/local-hostname" => {
            Answer::ok(&hostname(guest.server))
        }
        "/latest/meta-data/local-ipv4" => Answer::ok(&guest.ip.to_string()),
        "/latest/meta-data/public-keys" | "/latest/meta-data/public-keys/" => match guest.keypair {
            Some(k) => Answer::ok(&format!("0={}\n", k.name_any())),
            None => Answer::not_found(),
        },
        "/latest/meta-data/public-keys/0" | "/latest/meta-data/public-keys/0/" => match key {
            Some(_) => Answer::ok("openssh-key\n"),
            None => Answer::not_found(),
        },
        "/latest/meta-data/public-keys/0/openssh-key" => match key {
            Some(k) => Answer::ok(&format!("{k}\n")),
            None => Answer::not_found(),
        },
        _ => Answer::not_found(),
    }
}

/// Why the API could not be read.
#[derive(Debug, thiserror::Error)]
#[error("read {what}")]
pub struct SourceError {
    what: String,
    #[source]
    source: kube::Error,
}

/// Where Servers and Keypairs are read: the API with the node's credentials, or a fixture.
pub trait Source: Send + Sync + 'static {
    /// The Server, `None` when absent.
    fn server(
        &self,
        namespace: &str,
        name: &str,
    ) -> impl Future<Output = Result<Option<Server>, SourceError>> + Send;
    /// The Keypair, `None` when absent.
    fn keypair(
        &self,
        namespace: &str,
        name: &str,
    ) -> impl Future<Output = Result<Option<Keypair>, SourceError>> + Send;
}

/// `get` of one object with the node's credentials; one the node may not read (a server
/// moved to another node since its port was read, a keypair no server of the node names) is
/// as absent.
async fn read<K>(client: &Client, namespace: &str, name: &str) -> Result<Option<K>, SourceError>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned,
{
    match Api::<K>::namespaced(client.clone(), namespace)
        .get_opt(name)
        .await
    {
        Ok(o) => Ok(o),
        Err(kube::Error::Api(e)) if e.code == 403 => Ok(None),
        Err(source) => Err(SourceError {
            what: format!("{} {namespace}/{name}", K::kind(&())),
            source,
        }),
    }
}

impl Source for Client {
    async fn server(&self, namespace: &str, name: &str) -> Result<Option<Server>, SourceError> {
        read(self, namespace, name).await
    }

    async fn keypair(&self, namespace: &str, name: &str) -> Result<Option<Keypair>, SourceError> {
        read(self, namespace, name).await
    }
}

/// The mutex's value, even if a thread panicked holding it.
fn locked<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

/// Objects read, with when; errors are not kept.
type Memo<K> = Mutex<BTreeMap<(String, String), (Instant, Option<K>)>>;

/// A [`Source`] whose answers are kept for [`CACHE_TIME`].
struct Cached<S> {
    inner: S,
    servers: Memo<Server>,
    keypairs: Memo<Keypair>,
}

impl<S> Cached<S> {
    fn new(inner: S) -> Self {
        Self {
            inner,
            servers: Mutex::default(),
            keypairs: Mutex::default(),
        }
    }
}

/// The object kept in `memo` under (`namespace`, `name`) if read within [`CACHE_TIME`], else
/// `read`'s answer, kept.
async fn remembered<K: Clone, F>(
    memo: &Memo<K>,
    namespace: &str,
    name: &str,
    read: F,
) -> Result<Option<K>, SourceError>
where
    F: Future<Output = Result<Option<K>, SourceError>>,
{
    let key = (namespace.to_owned(), name.to_owned());
    if let Some((at, o)) = locked(memo).get(&key)
        && at.elapsed() < CACHE_TIME
    {
        return Ok(o.clone());
    }
    let o = read.await?;
    let mut m = locked(memo);
    m.retain(|_, (at, _)| at.elapsed() < CACHE_TIME);
    m.insert(key, (Instant::now(), o.clone()));
    Ok(o)
}

impl<S: Source> Source for Cached<S> {
    async fn server(&self, namespace: &str, name: &str) -> Result<Option<Server>, SourceError> {
        let read = self.inner.server(namespace, name);
        remembered(&self.servers, namespace, name, read).await
    }

    async fn keypair(&self, namespace: &str, name: &str) -> Result<Option<Keypair>, SourceError> {
        let read = self.inner.keypair(namespace, name);
        remembered(&self.keypairs, namespace, name, read).await
    }
}

/// What each source address is using: connections open, and those opened this second.
#[derive(Default)]
struct Usage {
    open: usize,
    since: Option<Instant>,
    opened: u32,
}

/// The connections of each source address.
#[derive(Default)]
struct Limits(Mutex<BTreeMap<Ipv4Addr, Usage>>);

/// A connection counted against its source; uncounted when dropped.
struct Ticket {
    limits: Arc<Limits>,
    ip: Ipv4Addr,
}

impl Limits {
    /// A ticket for one more connection from `ip`, unless it holds [`PER_SOURCE`] or opened
    /// [`RATE`] this second.
    fn admit(self: &Arc<Self>, ip: Ipv4Addr) -> Option<Ticket> {
        let mut all = locked(&self.0);
        let u = all.entry(ip).or_default();
        if u.since
            .is_none_or(|s| s.elapsed() >= Duration::from_secs(1))
        {
            u.since = Some(Instant::now());
            u.opened = 0;
        }
        if u.open >= PER_SOURCE || u.opened >= RATE {
            return None;
        }
        u.open += 1;
        u.opened += 1;
        Some(Ticket {
            limits: Arc::clone(self),
            ip,
        })
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut all = locked(&self.limits.0);
        if let Some(u) = all.get_mut(&self.ip) {
            u.open = u.open.saturating_sub(1);
        }
        all.retain(|_, u| {
            u.open > 0
                || u.since
                    .is_some_and(|s| s.elapsed() < Duration::from_secs(1))
        });
    }
}

/// The node's Servers from a watch of those placed on it (`status.hypervisor=NODE`, as the
/// node may read them), so that answering costs no API call; Keypairs, which a node cannot
/// watch, read by name. A Server is read from the API only until the watch has listed.
pub struct Watched {
    client: Client,
    servers: Store<Server>,
    task: tokio::task::AbortHandle,
}

impl Watched {
    /// Starts the watch of `node`'s Servers.
    pub fn new(client: Client, node: &str) -> Self {
        let (servers, writer) = reflector::store();
        let cfg = watcher::Config::default().fields(&format!("status.hypervisor={node}"));
        let events = watcher(Api::<Server>::all(client.clone()), cfg).default_backoff();
        let task = tokio::spawn(reflector::reflector(writer, events).for_each(|_| async {}));
        Self {
            client,
            servers,
            task: task.abort_handle(),
        }
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Source for Watched {
    async fn server(&self, namespace: &str, name: &str) -> Result<Option<Server>, SourceError> {
        let listed = futures::FutureExt::now_or_never(self.servers.wait_until_ready());
        if matches!(listed, Some(Ok(()))) {
            let key = reflector::ObjectRef::new(name).within(namespace);
            return Ok(self.servers.get(&key).map(|s| (*s).clone()));
        }
        read(&self.client, namespace, name).await
    }

    async fn keypair(&self, namespace: &str, name: &str) -> Result<Option<Keypair>, SourceError> {
        read(&self.client, namespace, name).await
    }
}

/// What every listener of the node shares.
struct Shared<S> {
    source: Cached<S>,
    node: String,
    index: RwLock<Arc<Index>>,
    limits: Arc<Limits>,
}

impl<S> Shared<S> {
    fn new(source: S, node: impl Into<String>) -> Self {
        Self {
            source: Cached::new(source),
            node: node.into(),
            index: RwLock::new(Arc::new(Index::default())),
            limits: Arc::default(),
        }
    }

    fn index(&self) -> Arc<Index> {
        match self.index.read() {
            Ok(i) => Arc::clone(&i),
            Err(p) => Arc::clone(&p.into_inner()),
        }
    }

    /// A ticket for a connection from `peer` on network `network`: none for an address no
    /// port of the node holds there, or one over its limits.
    fn admit(&self, network: &str, peer: SocketAddr) -> Option<Ticket> {
        let SocketAddr::V4(peer) = peer else {
            return None;
        };
        self.index().holder(network, *peer.ip())?;
        self.limits.admit(*peer.ip())
    }
}

/// The answer to one request on the listener of network `network` from `peer`.
async fn respond<S: Source>(
    shared: &Shared<S>,
    network: &str,
    peer: SocketAddr,
    method: &Method,
    path: &str,
) -> Answer {
    if method != Method::GET {
        return Answer::text(StatusCode::METHOD_NOT_ALLOWED, "405 Method Not Allowed\n");
    }
    let SocketAddr::V4(peer) = peer else {
        return Answer::not_found();
    };
    let ip = *peer.ip();
    let index = shared.index();
    let Some((asker, port)) = index.holder(network, ip) else {
        tracing::debug!(%ip, "metadata asked from an address no port of the node holds");
        return Answer::not_found();
    };
    let unavailable = |e: SourceError| {
        tracing::warn!(error = %stratus_runtime::policy::chain(&e), "cannot answer the metadata service");
        Answer::text(StatusCode::SERVICE_UNAVAILABLE, "503 Service Unavailable\n")
    };
    let server = match shared.source.server(&asker.namespace, &asker.server).await {
        Ok(Some(s)) => s,
        Ok(None) => return Answer::not_found(),
        Err(e) => return unavailable(e),
    };
    // The port was read before the server: a server moved away since, or whose addresses
    // no longer name this port with this address (the port re-bound, the address reused),
    // is not answered.
    let placed = server.status.as_ref().and_then(|s| s.hypervisor.as_deref());
    let holds = server.status.as_ref().is_some_and(|s| {
        s.addresses
            .iter()
            .any(|a| a.port.as_deref() == Some(port.as_str()) && a.ip.parse::<Ipv4Addr>() == Ok(ip))
    });
    if placed != Some(shared.node.as_str()) || !holds {
        return Answer::not_found();
    }
    let keypair = match &server.spec.keypair {
        Some(k) => match shared.source.keypair(&asker.namespace, k).await {
            Ok(kp) => kp,
            Err(e) => return unavailable(e),
        },
        None => None,
    };
    answer(
        path,
        &Guest {
            server: &server,
            keypair: keypair.as_ref(),
            nics: index.nics(asker),
            ip,
        },
    )
}

/// Serves one connection: one request, within [`REQUEST_TIME`].
async fn connection<S: Source>(
    shared: Arc<Shared<S>>,
    network: Arc<str>,
    sock: tokio::net::TcpStream,
    peer: SocketAddr,
) {
    let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
        let (shared, network) = (Arc::clone(&shared), Arc::clone(&network));
        async move {
            let a = respond(&shared, &network, peer, req.method(), req.uri().path()).await;
            let mut r = Response::new(Full::new(Bytes::from(a.body)));
            *r.status_mut() = a.status;
            r.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static(a.content_type),
            );
            Ok::<_, Infallible>(r)
        }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_TIME)
        .keep_alive(false)
        .max_buf_size(MAX_HEAD)
        .serve_connection(hyper_util::rt::TokioIo::new(sock), service);
    match tokio::time::timeout(REQUEST_TIME, conn).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::debug!(error = %e, %peer, "metadata connection failed"),
        Err(_) => tracing::debug!(%peer, "metadata connection timed out"),
    }
}

/// Accepts connections on `listener` for network `network` until aborted.
async fn serve<S: Source>(
    shared: Arc<Shared<S>>,
    network: Arc<str>,
    listener: tokio::net::TcpListener,
) {
    let places = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (sock, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(error = %e, "metadata accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Some(ticket) = shared.admit(&network, peer) else {
            tracing::debug!(%peer, "metadata connection refused");
            continue;
        };
        let Ok(place) = Arc::clone(&places).try_acquire_owned() else {
            tracing::debug!(%peer, "metadata connection refused: the listener is full");
            continue;
        };
        let (shared, network) = (Arc::clone(&shared), Arc::clone(&network));
        tokio::spawn(async move {
            connection(shared, network, sock, peer).await;
            drop((place, ticket));
        });
    }
}

/// Why a listener could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    /// The namespace's loopback could not be given the address.
    #[error("add {ADDRESS} to the loopback of {netns}")]
    Address {
        /// Where.
        netns: Name,
        /// Why.
        #[source]
        source: crate::driver::LinkError,
    },
    /// The namespace could not be entered.
    #[error(transparent)]
    Enter(#[from] netns::EnterError),
    /// The socket could not be opened.
    #[error("listen on {ADDRESS}:{PORT} in {netns}")]
    Bind {
        /// Where.
        netns: Name,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Gives `ns`'s loopback [`ADDRESS`] (idempotent) and opens a listening socket on it inside
/// `ns` (on a thread of its own that joins the namespace). Blocking.
pub fn listen(links: &dyn Links, ns: &Name) -> Result<std::net::TcpListener, ListenError> {
    let inner = Netns::Named(ns.clone());
    let lo = IfName::new("lo").unwrap_or_else(|_| unreachable!("lo is a valid name"));
    let address = Ipv4Cidr::new(ADDRESS, 32).unwrap_or_else(|| unreachable!("a /32 is valid"));
    let failed = |source| ListenError::Address {
        netns: ns.clone(),
        source,
    };
    links.set_up(&inner, &lo, true).map_err(failed)?;
    links.add_address(&inner, &lo, address).map_err(failed)?;
    let bound = netns::run_in(&inner, || {
        let l = std::net::TcpListener::bind((ADDRESS, PORT))?;
        l.set_nonblocking(true)?;
        Ok::<_, std::io::Error>(l)
    })?;
    bound.map_err(|source| ListenError::Bind {
        netns: ns.clone(),
        source,
    })
}

/// A listener's task, stopped when dropped.
struct Listener {
    /// The namespace it was opened in (a namespace made anew under the name is another).
    identity: (u64, u64),
    task: tokio::task::AbortHandle,
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The node's metadata listeners, one per DHCP namespace that should have one.
pub struct Service<S> {
    shared: Arc<Shared<S>>,
    listeners: BTreeMap<Name, Listener>,
}

impl<S: Source> Service<S> {
    /// No listener yet; Servers and Keypairs are read from `source`.
    pub fn new(source: S, node: impl Into<String>) -> Self {
        Self {
            shared: Arc::new(Shared::new(source, node)),
            listeners: BTreeMap::new(),
        }
    }

    /// The DHCP namespaces that have a listener.
    pub fn listening(&self) -> Vec<Name> {
        self.listeners.keys().cloned().collect()
    }

    /// Answers by `index` from now on.
    pub fn set_index(&self, index: Index) {
        let index = Arc::new(index);
        match self.shared.index.write() {
            Ok(mut i) => *i = index,
            Err(p) => *p.into_inner() = index,
        }
    }

    /// Makes the listeners those of `wanted` (DHCP namespace → network uid): opens one in
    /// each namespace present without a live one (or whose namespace was made anew), and
    /// stops the rest. A namespace not there yet is tried again on the next call.
    pub async fn sync(&mut self, links: Arc<dyn Links>, wanted: &BTreeMap<Name, String>) {
        self.listeners.retain(|name, l| {
            wanted.contains_key(name)
                && !l.task.is_finished()
                && netns::identity(&Netns::Named(name.clone())) == Some(l.identity)
        });
        for (name, network) in wanted {
            if self.listeners.contains_key(name) {
                continue;
            }
            let Some(identity) = netns::identity(&Netns::Named(name.clone())) else {
                continue;
            };
            let (l, n) = (Arc::clone(&links), name.clone());
            let opened = stratus_runtime::blocking(move || listen(l.as_ref(), &n)).await;
            let std = match opened {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::warn!(error = %stratus_runtime::policy::chain(&e), "cannot open the metadata service");
                    continue;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot open the metadata service");
                    continue;
                }
            };
            let listener = match tokio::net::TcpListener::from_std(std) {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(error = %e, netns = %name, "cannot open the metadata service");
                    continue;
                }
            };
            let task = tokio::spawn(serve(
                Arc::clone(&self.shared),
                Arc::from(network.as_str()),
                listener,
            ))
            .abort_handle();
            tracing::info!(netns = %name, "metadata service listening");
            self.listeners
                .insert(name.clone(), Listener { identity, task });
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::agent::tests::{config, port, snapshot};
    use crate::desired::desired_all;
    use crate::driver::RouteSpec;
    use stratus_api_types::network::Port;

    /// Server `name` on `node`, whose port `{name}-0` holds `ip`.
    pub(super) fn server(name: &str, node: &str, keypair: Option<&str>, ip: &str) -> Server {
        serde_json::from_value(json!({
            "apiVersion": "compute.stratus.dev/v1", "kind": "Server",
            "metadata": {"name": name, "namespace": "demo", "uid": format!("uid-{name}")},
            "spec": {
                "flavor": "m1.nano", "image": "tiny", "keypair": keypair,
                // "#cloud-config\n"
                "userData": "I2Nsb3VkLWNvbmZpZwo=",
            },
            "status": {"phase": "Running", "hypervisor": node, "addresses": [
                {"network": "net", "port": format!("{name}-0"), "ip": ip},
            ]},
        }))
        .expect("server")
    }

    pub(super) fn keypair(name: &str) -> Keypair {
        serde_json::from_value(json!({
            "apiVersion": "compute.stratus.dev/v1", "kind": "Keypair",
            "metadata": {"name": name, "namespace": "demo"},
            "spec": {"publicKey": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIA me@example"},
        }))
        .expect("keypair")
    }

    /// Port `name` of `snapshot()`'s network on `node`, bound to `server`.
    fn bound(name: &str, node: &str, ip: &str, server: Option<&str>) -> Arc<Port> {
        let mut p = (*port(name, "net", node, "02:00:00:00:00:0a", ip, None)).clone();
        if let Some(s) = p.status.as_mut() {
            s.bound_to = server.map(str::to_owned);
        }
        Arc::new(p)
    }

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().expect("ip")
    }

    #[test]
    fn the_index_names_the_server_behind_each_address_of_the_nodes_own_ports() {
        let mut snap = snapshot();
        let mut deleting = (*bound("gone", "n1", "10.9.0.14", Some("old"))).clone();
        deleting.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
            ));
        snap.ports = vec![
            bound("web-0", "n1", "10.9.0.11", Some("web")),
            bound("db-0", "n2", "10.9.0.12", Some("db")),
            bound("free", "n1", "10.9.0.13", None),
            Arc::new(deleting),
        ];
        let i = index(&snap, "n1");
        let web = Asker {
            namespace: "demo".into(),
            server: "web".into(),
        };
        assert_eq!(i.asker("uid-net", ip("10.9.0.11")), Some(&web));
        // Another node's port, an unbound one, one being deleted, an address on another
        // network: nobody.
        for a in ["10.9.0.12", "10.9.0.13", "10.9.0.14", "10.9.0.99"] {
            assert_eq!(i.asker("uid-net", ip(a)), None, "{a}");
        }
        assert_eq!(i.asker("uid-other", ip("10.9.0.11")), None);
        let nics = i.nics(&web);
        assert_eq!(nics.len(), 1);
        assert_eq!(
            (nics[0].port.as_str(), nics[0].network.as_str()),
            ("web-0", "uid-net")
        );
    }

    #[test]
    fn each_network_served_by_dhcp_gets_a_listener_and_its_guests_a_route_to_it() {
        let (desired, _) = desired_all(&config(), &snapshot());
        let w = wanted(&snapshot(), &desired);
        let dhcp = desired.networks[0].dhcp.as_ref().expect("dhcp");
        assert_eq!(
            w.into_iter().collect::<Vec<_>>(),
            vec![(dhcp.spec.name.clone(), "uid-net".to_owned())]
        );
        // The DHCP server hands out the route to the metadata address through itself.
        let to = Ipv4Cidr::new(ADDRESS, 32).expect("cidr");
        assert_eq!(
            dhcp.spec.routes,
            vec![RouteSpec::new(to, dhcp.address.addr())]
        );
        assert!(dhcp.spec.validate().is_ok());
    }

    #[test]
    fn the_documents_say_who_the_guest_is() {
        let s = server("web", "n1", Some("mykey"), "10.9.0.11");
        let k = keypair("mykey");
        let nics = vec![Nic {
            port: "web-0".into(),
            uid: "0123456789abcdef".into(),
            mac: "02:00:00:00:00:0a".into(),
            mtu: 1450,
            network: "uid-net".into(),
        }];
        let guest = Guest {
            server: &s,
            keypair: Some(&k),
            nics: &nics,
            ip: ip("10.9.0.11"),
        };
        let get = |path: &str| answer(path, &guest);
        let md = get("/openstack/latest/meta_data.json");
        assert_eq!(md.status, StatusCode::OK);
        assert_eq!(md.content_type, "application/json");
        let md: Value = serde_json::from_slice(&md.body).expect("json");
        assert_eq!(md["uuid"], "uid-web");
        assert_eq!(md["name"], "web");
        assert_eq!(md["hostname"], "web");
        assert_eq!(md["project_id"], "demo");
        assert_eq!(md["public_keys"]["mykey"], k.spec.public_key);
        assert_eq!(md["keys"][0]["data"], k.spec.public_key);
        let ud = get("/openstack/latest/user_data");
        assert_eq!(
            (ud.status, ud.body.as_slice()),
            (StatusCode::OK, b"#cloud-config\n".as_slice())
        );
        let nd: Value =
            serde_json::from_slice(&get("/openstack/latest/network_data.json").body).expect("json");
        assert_eq!(nd["links"][0]["ethernet_mac_address"], "02:00:00:00:00:0a");
        assert_eq!(nd["links"][0]["mtu"], 1450);
        assert_eq!(nd["networks"][0]["type"], "ipv4_dhcp");
        assert_eq!(nd["networks"][0]["link"], nd["links"][0]["id"]);
        // EC2's basics.
        assert_eq!(get("/latest/meta-data/instance-id").body, b"uid-web");
        assert_eq!(get("/latest/meta-data/local-ipv4").body, b"10.9.0.11");
        assert_eq!(
            get("/latest/meta-data/public-keys/0/openssh-key").body,
            format!("{}\n", k.spec.public_key).into_bytes()
        );
        assert_eq!(get("/latest/user-data").body, b"#cloud-config\n");
        assert_eq!(
            get("/openstack/latest/meta_data.json?x=1").status,
            StatusCode::OK
        );
        for path in [
            "/openstack/2012-08-10/x",
            "/../etc/passwd",
            "/latest/meta-data/iam/",
        ] {
            assert_eq!(get(path).status, StatusCode::NOT_FOUND, "{path}");
        }
        // Without user data or a keypair those are not found.
        let mut bare = server("web", "n1", None, "10.9.0.11");
        bare.spec.user_data = None;
        let guest = Guest {
            server: &bare,
            keypair: None,
            ..guest
        };
        for path in [
            "/openstack/latest/user_data",
            "/latest/user-data",
            "/latest/meta-data/public-keys/0/openssh-key",
        ] {
            assert_eq!(answer(path, &guest).status, StatusCode::NOT_FOUND, "{path}");
        }
        let md: Value =
            serde_json::from_slice(&answer("/openstack/latest/meta_data.json", &guest).body)
                .expect("json");
        assert_eq!(md["public_keys"], json!({}));
    }

    #[test]
    fn no_address_another_port_may_send_from_is_answered() {
        let mut snap = snapshot();
        let mut open = (*bound("open-0", "n1", "10.9.0.12", Some("open"))).clone();
        open.spec.port_security_enabled = Some(false);
        let pair = |p: &mut Port, a: &str| {
            p.spec
                .allowed_address_pairs
                .push(serde_json::from_value(json!({"ipAddress": a})).expect("pair"));
        };
        // On another node, allowed to send from web's address.
        let mut vip = (*bound("vip-0", "n2", "10.9.0.20", Some("vip"))).clone();
        pair(&mut vip, "10.9.0.11");
        // A prefix covering db's; a pair of a port's own address takes nothing from it.
        let mut wide = (*bound("wide-0", "n2", "10.9.0.21", Some("wide"))).clone();
        pair(&mut wide, "10.9.0.12/30");
        let mut own = (*bound("own-0", "n1", "10.9.0.17", Some("own"))).clone();
        pair(&mut own, "10.9.0.17");
        snap.ports = vec![
            bound("web-0", "n1", "10.9.0.11", Some("web")),
            Arc::new(open),
            bound("db-0", "n1", "10.9.0.13", Some("db")),
            bound("app-0", "n1", "10.9.0.16", Some("app")),
            Arc::new(vip),
            Arc::new(wide),
            Arc::new(own),
        ];
        let i = index(&snap, "n1");
        for a in ["10.9.0.11", "10.9.0.12", "10.9.0.13"] {
            assert_eq!(i.asker("uid-net", ip(a)), None, "{a}");
        }
        for (a, server) in [("10.9.0.16", "app"), ("10.9.0.17", "own")] {
            assert_eq!(
                i.asker("uid-net", ip(a)).map(|s| s.server.as_str()),
                Some(server),
                "{a}"
            );
        }
        // With port security back on and the pairs gone, every address is answered.
        for p in &mut snap.ports {
            let p = Arc::make_mut(p);
            p.spec.port_security_enabled = None;
            p.spec.allowed_address_pairs.clear();
        }
        let i = index(&snap, "n1");
        for a in ["10.9.0.11", "10.9.0.12", "10.9.0.13"] {
            assert!(i.asker("uid-net", ip(a)).is_some(), "{a}");
        }
    }

    /// The shared state of node n1 answering from `servers` by the index of `ports`.
    fn shared_of(servers: Vec<Server>, ports: Vec<Arc<Port>>) -> Shared<Fixture> {
        let mut snap = snapshot();
        snap.ports = ports;
        let shared = Shared::new(
            Fixture {
                servers,
                keypairs: vec![keypair("mykey")],
                ..Fixture::default()
            },
            "n1",
        );
        *shared.index.write().expect("lock") = Arc::new(index(&snap, "n1"));
        shared
    }

    #[tokio::test]
    async fn a_server_that_no_longer_names_the_port_and_its_address_is_not_answered() {
        let path = "/openstack/latest/meta_data.json";
        let from = SocketAddr::from((ip("10.9.0.11"), 40000));
        // The index still has web-0 at .11 for web; the server now says otherwise.
        for (port, at) in [("web-1", "10.9.0.11"), ("web-0", "10.9.0.30")] {
            let mut s = server("web", "n1", None, at);
            if let Some(st) = s.status.as_mut() {
                st.addresses[0].port = Some(port.into());
            }
            let shared = shared_of(
                vec![s],
                vec![bound("web-0", "n1", "10.9.0.11", Some("web"))],
            );
            let got = respond(&shared, "uid-net", from, &Method::GET, path).await;
            assert_eq!(got.status, StatusCode::NOT_FOUND, "{port} {at}");
        }
        let shared = shared_of(
            vec![server("web", "n1", None, "10.9.0.11")],
            vec![bound("web-0", "n1", "10.9.0.11", Some("web"))],
        );
        let got = respond(&shared, "uid-net", from, &Method::GET, path).await;
        assert_eq!(got.status, StatusCode::OK);
    }

    #[tokio::test]
    async fn a_guest_asking_in_a_loop_costs_one_read_of_its_server_and_keypair() {
        let shared = shared_of(
            vec![server("web", "n1", Some("mykey"), "10.9.0.11")],
            vec![bound("web-0", "n1", "10.9.0.11", Some("web"))],
        );
        let from = SocketAddr::from((ip("10.9.0.11"), 40000));
        for _ in 0..100 {
            let got = respond(
                &shared,
                "uid-net",
                from,
                &Method::GET,
                "/openstack/latest/meta_data.json",
            )
            .await;
            assert_eq!(got.status, StatusCode::OK);
        }
        // One server read and one keypair read (twice each at most, should reading them
        // have taken over CACHE_TIME).
        let reads = *shared.source.inner.reads.lock().expect("lock");
        assert!((2..=4).contains(&reads), "{reads} reads");
    }

    #[test]
    fn one_source_holds_at_most_its_share_of_connections() {
        let limits = Arc::new(Limits::default());
        let (a, b) = (ip("10.9.0.11"), ip("10.9.0.12"));
        let mut held: Vec<Ticket> = (0..PER_SOURCE)
            .map(|_| limits.admit(a).expect("admitted"))
            .collect();
        assert!(limits.admit(a).is_none());
        assert!(limits.admit(b).is_some(), "another source is admitted");
        held.pop();
        assert!(
            limits.admit(a).is_some(),
            "a connection ended frees its place"
        );
        drop(held);
        // At most RATE a second.
        let opened = (0..10 * RATE)
            .take_while(|_| limits.admit(a).is_some())
            .count();
        assert!(opened < 10 * RATE as usize, "{opened} opened");
    }

    /// A connection to `to` from `from` (a loopback address).
    async fn connect(from: &str, to: SocketAddr) -> tokio::net::TcpStream {
        let sock = tokio::net::TcpSocket::new_v4().expect("socket");
        sock.bind(SocketAddr::from((ip(from), 0))).expect("bind");
        sock.connect(to).await.expect("connect")
    }

    /// Whether the server closed `c` within `within`, having sent nothing.
    async fn closed(c: &mut tokio::net::TcpStream, within: Duration) -> bool {
        use tokio::io::AsyncReadExt;
        let mut buf = [0u8; 64];
        matches!(
            tokio::time::timeout(within, c.read(&mut buf)).await,
            Ok(Ok(0) | Err(_))
        )
    }

    #[tokio::test]
    async fn idle_connections_of_one_guest_keep_no_other_guest_waiting() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        // Guests at 127.0.0.2 and .3 (loopback addresses stand in for the network's).
        let shared = Arc::new(shared_of(
            vec![
                server("web", "n1", None, "127.0.0.2"),
                server("db", "n1", None, "127.0.0.3"),
            ],
            vec![
                bound("web-0", "n1", "127.0.0.2", Some("web")),
                bound("db-0", "n1", "127.0.0.3", Some("db")),
            ],
        ));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("listen");
        let to = listener.local_addr().expect("address");
        let task = tokio::spawn(serve(Arc::clone(&shared), Arc::from("uid-net"), listener));
        // web opens MAX_CONNECTIONS and says nothing; a stranger's connection is closed.
        let mut idle = Vec::new();
        for _ in 0..MAX_CONNECTIONS {
            idle.push(connect("127.0.0.2", to).await);
        }
        let mut stranger = connect("127.0.0.9", to).await;
        assert!(closed(&mut stranger, Duration::from_secs(5)).await);
        // db is answered at once.
        let mut c = connect("127.0.0.3", to).await;
        c.write_all(b"GET /latest/meta-data/instance-id HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .expect("write");
        let mut out = String::new();
        tokio::time::timeout(Duration::from_secs(5), c.read_to_string(&mut out))
            .await
            .expect("answered within 5 s")
            .expect("read");
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
        assert!(out.ends_with("uid-db"), "{out}");
        // web's connections past its share were closed at once, the rest once no request
        // head came within HEADER_TIME.
        for c in &mut idle {
            assert!(closed(c, HEADER_TIME + Duration::from_secs(10)).await);
        }
        task.abort();
    }

    /// Servers and Keypairs from memory; counts the reads.
    #[derive(Default)]
    pub(super) struct Fixture {
        pub(super) servers: Vec<Server>,
        pub(super) keypairs: Vec<Keypair>,
        pub(super) reads: Mutex<u32>,
    }

    impl Source for Fixture {
        async fn server(&self, namespace: &str, name: &str) -> Result<Option<Server>, SourceError> {
            *self.reads.lock().expect("lock") += 1;
            Ok(self
                .servers
                .iter()
                .find(|s| s.namespace().as_deref() == Some(namespace) && s.name_any() == name)
                .cloned())
        }

        async fn keypair(
            &self,
            namespace: &str,
            name: &str,
        ) -> Result<Option<Keypair>, SourceError> {
            *self.reads.lock().expect("lock") += 1;
            Ok(self
                .keypairs
                .iter()
                .find(|k| k.namespace().as_deref() == Some(namespace) && k.name_any() == name)
                .cloned())
        }
    }

    #[tokio::test]
    async fn only_a_get_from_a_port_of_a_server_placed_here_is_answered() {
        let mut snap = snapshot();
        snap.ports = vec![
            bound("web-0", "n1", "10.9.0.11", Some("web")),
            bound("moved-0", "n1", "10.9.0.12", Some("moved")),
        ];
        let shared = Shared::new(
            Fixture {
                servers: vec![
                    server("web", "n1", Some("mykey"), "10.9.0.11"),
                    // Its port still says n1, the server is on n2 now.
                    server("moved", "n2", None, "10.9.0.12"),
                ],
                keypairs: vec![keypair("mykey")],
                ..Fixture::default()
            },
            "n1",
        );
        *shared.index.write().expect("lock") = Arc::new(index(&snap, "n1"));
        let path = "/openstack/latest/meta_data.json";
        let from = |a: &str| SocketAddr::from((ip(a), 40000));
        let ok = respond(&shared, "uid-net", from("10.9.0.11"), &Method::GET, path).await;
        assert_eq!(ok.status, StatusCode::OK);
        let md: Value = serde_json::from_slice(&ok.body).expect("json");
        assert_eq!(md["uuid"], "uid-web");
        let reads = *shared.source.inner.reads.lock().expect("lock");
        for (network, a, method, want) in [
            (
                "uid-net",
                "10.9.0.11",
                Method::POST,
                StatusCode::METHOD_NOT_ALLOWED,
            ),
            ("uid-net", "10.9.0.99", Method::GET, StatusCode::NOT_FOUND),
            ("uid-other", "10.9.0.11", Method::GET, StatusCode::NOT_FOUND),
        ] {
            let got = respond(&shared, network, from(a), &method, path).await;
            assert_eq!(got.status, want, "{network} {a} {method}");
        }
        // None of those reached the API.
        assert_eq!(*shared.source.inner.reads.lock().expect("lock"), reads);
        let moved = respond(&shared, "uid-net", from("10.9.0.12"), &Method::GET, path).await;
        assert_eq!(moved.status, StatusCode::NOT_FOUND);
    }
}

/// The listener on the real kernel, as root: a DHCP namespace (dnsmasq handing out the route
/// to the metadata address through itself) and two guest namespaces on one bridge.
#[cfg(test)]
mod host_tests {
    use std::path::Path;

    use super::tests::{Fixture, keypair, server};
    use super::*;
    use crate::driver::dnsmasq::Dnsmasq;
    use crate::driver::host_tests::{root, run_in, unique};
    use crate::driver::netlink::NetlinkLinks;
    use crate::driver::{Dhcp, DhcpSpec, MacAddr, RouteSpec, StaticLease, VethSpec};

    /// Stops the DHCP server and deletes the namespaces when dropped.
    struct Cleanup {
        dhcp: Option<(Dnsmasq, Name)>,
        namespaces: Vec<Name>,
    }

    impl Drop for Cleanup {
        fn drop(&mut self) {
            if let Some((d, name)) = &self.dhcp
                && let Err(e) = d.remove(name)
            {
                eprintln!("cleanup: dhcp {name}: {e}");
            }
            for n in &self.namespaces {
                if let Err(e) = NetlinkLinks::new().del_netns(n) {
                    eprintln!("cleanup: netns {n}: {e}");
                }
            }
        }
    }

    /// Runs busybox's DHCP client once in `ns`, asking for option 121, applying the address
    /// and the routes as the test guest does; the routes it was given.
    fn lease_with_routes(ns: &Name, dir: &Path) -> String {
        let script = dir.join("udhcpc.sh");
        let result = dir.join("routes");
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\n[ \"$1\" = bound ] || exit 0\n\
                 ip addr add \"$ip/$mask\" dev \"$interface\"\n\
                 set -- $staticroutes\n\
                 while [ $# -ge 2 ]; do ip route replace \"$1\" via \"$2\" dev \"$interface\"; shift 2; done\n\
                 echo \"$staticroutes\" > '{}'\n",
                result.display()
            ),
        )
        .expect("write script");
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .expect("chmod script");
        let (ok, out) = run_in(
            ns,
            &[
                "busybox",
                "udhcpc",
                "-i",
                "eth0",
                "-n",
                "-q",
                "-f",
                "-t",
                "5",
                "-T",
                "1",
                "-O",
                "staticroutes",
                "-s",
            ]
            .into_iter()
            .chain([script.to_str().expect("path")])
            .collect::<Vec<_>>(),
        );
        assert!(ok, "udhcpc: {out}");
        std::fs::read_to_string(&result)
            .expect("routes")
            .trim()
            .to_owned()
    }

    /// GET `path` of the metadata service from a socket of namespace `ns`: the status code
    /// and the body.
    fn get(ns: &Name, path: &str) -> (u16, String) {
        use std::io::{Read, Write};
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: {ADDRESS}\r\nConnection: close\r\n\r\n");
        let answer = netns::run_in(&Netns::Named(ns.clone()), move || {
            let to = SocketAddr::from((ADDRESS, PORT));
            let mut s = std::net::TcpStream::connect_timeout(&to, Duration::from_secs(5))?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            s.write_all(request.as_bytes())?;
            let mut out = String::new();
            s.read_to_string(&mut out)?;
            Ok::<_, std::io::Error>(out)
        })
        .expect("enter namespace")
        .unwrap_or_else(|e| format!("HTTP/1.1 000 {e}\r\n\r\n"));
        let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
        let status = head
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or_default();
        (status, body.to_owned())
    }

    #[test]
    fn a_guest_gets_its_servers_metadata_and_another_address_nothing() {
        if !root() {
            return;
        }
        let u = unique();
        let l = NetlinkLinks::new();
        let name = |s: &str| Name::new(&format!("{u}-{s}")).expect("name");
        let (dh, g1, g2) = (name("dh"), name("g1"), name("g2"));
        // Made before the cleanup, so dropped after it: dnsmasq is stopped by the pid file
        // kept here.
        let state = tempfile::tempdir().expect("dir");
        let mut c = Cleanup {
            dhcp: None,
            namespaces: vec![],
        };
        let ifn = |s: &str| IfName::new(s).expect("ifname");
        let inner = Netns::Named(dh.clone());
        for n in [&dh, &g1, &g2] {
            l.add_netns(n).expect("netns");
            c.namespaces.push(n.clone());
        }
        l.add_bridge(&inner, &ifn("br")).expect("bridge");
        l.set_up(&inner, &ifn("br"), true).expect("up");
        for (g, port) in [(&g1, "p1"), (&g2, "p2")] {
            let spec = VethSpec {
                name: ifn(port),
                peer: ifn("eth0"),
                peer_netns: Some(Netns::Named(g.clone())),
            };
            l.add_veth(&inner, &spec).expect("veth");
            l.set_master(&inner, &ifn(port), Some(&ifn("br")))
                .expect("master");
            l.set_up(&inner, &ifn(port), true).expect("up");
            l.set_up(&Netns::Named(g.clone()), &ifn("eth0"), true)
                .expect("up");
        }
        let server_ip = Ipv4Addr::new(10, 61, 0, 2);
        let cidr = |a: Ipv4Addr, p| Ipv4Cidr::new(a, p).expect("cidr");
        l.add_address(&inner, &ifn("br"), cidr(server_ip, 24))
            .expect("address");
        let g1_mac: MacAddr = l
            .link(&Netns::Named(g1.clone()), &ifn("eth0"))
            .expect("link")
            .and_then(|k| k.mac)
            .expect("mac");

        // The DHCP server of the namespace hands g1 its address and the route.
        let d = Dnsmasq::new(state.path().join("dhcp"));
        let spec = DhcpSpec {
            name: dh.clone(),
            netns: inner.clone(),
            interface: ifn("br"),
            subnet: cidr(Ipv4Addr::new(10, 61, 0, 0), 24),
            router: None,
            lease_secs: 600,
            routes: vec![RouteSpec::new(cidr(ADDRESS, 32), server_ip)],
            leases: vec![StaticLease {
                mac: g1_mac,
                ip: Ipv4Addr::new(10, 61, 0, 5),
                hostname: None,
            }],
        };
        c.dhcp = Some((d.clone(), dh.clone()));
        d.ensure(&spec).expect("dnsmasq");
        let routes = lease_with_routes(&g1, state.path());
        assert_eq!(routes, format!("{ADDRESS}/32 {server_ip}"));
        // g2 holds an address no port of the node has, with the same route.
        let g2ns = Netns::Named(g2.clone());
        l.add_address(&g2ns, &ifn("eth0"), cidr(Ipv4Addr::new(10, 61, 0, 6), 24))
            .expect("address");
        l.add_route(&g2ns, &RouteSpec::new(cidr(ADDRESS, 32), server_ip))
            .expect("route");

        // The node's port at 10.61.0.5 is server web's.
        let mut snap = crate::agent::tests::snapshot();
        let mut p = (*crate::agent::tests::port(
            "web-0",
            "net",
            "n1",
            "02:00:00:00:00:0a",
            "10.61.0.5",
            None,
        ))
        .clone();
        if let Some(s) = p.status.as_mut() {
            s.bound_to = Some("web".into());
        }
        snap.ports = vec![Arc::new(p)];
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let mut service = Service::new(
                Fixture {
                    servers: vec![server("web", "n1", Some("mykey"), "10.61.0.5")],
                    keypairs: vec![keypair("mykey")],
                    ..Fixture::default()
                },
                "n1",
            );
            service.set_index(index(&snap, "n1"));
            let links: Arc<dyn Links> = Arc::new(NetlinkLinks::new());
            let wanted = BTreeMap::from([(dh.clone(), "uid-net".to_owned())]);
            service.sync(Arc::clone(&links), &wanted).await;
            assert_eq!(service.listening(), vec![dh.clone()]);

            let (g1c, g2c) = (g1.clone(), g2.clone());
            let (md, other, ud) = tokio::task::spawn_blocking(move || {
                (
                    get(&g1c, "/openstack/latest/meta_data.json"),
                    get(&g2c, "/openstack/latest/meta_data.json"),
                    get(&g1c, "/openstack/latest/user_data"),
                )
            })
            .await
            .expect("join");
            assert_eq!(md.0, 200, "{md:?}");
            let md: Value = serde_json::from_str(&md.1).expect("json");
            assert_eq!(md["uuid"], "uid-web");
            assert_eq!(md["public_keys"]["mykey"], keypair("mykey").spec.public_key);
            assert_eq!(ud, (200, "#cloud-config\n".to_owned()));
            // An address no port of the node holds: closed unanswered.
            assert_eq!(other.0, 0, "{other:?}");

            let fetch = |ns: &Name| {
                let ns = ns.clone();
                tokio::task::spawn_blocking(move || get(&ns, "/openstack/latest/meta_data.json"))
            };
            // Not wanted any more: stopped.
            service.sync(Arc::clone(&links), &BTreeMap::new()).await;
            assert!(service.listening().is_empty());
            let after = fetch(&g1).await.expect("join");
            assert_eq!(after.0, 0, "no listener: {after:?}");
            // Wanted again, and a second sync keeps the listener it opened.
            service.sync(Arc::clone(&links), &wanted).await;
            service.sync(Arc::clone(&links), &wanted).await;
            assert_eq!(fetch(&g1).await.expect("join").0, 200);
            // The namespace deleted and made anew (drift repaired): a listener in the new one.
            let (l2, dh2) = (Arc::clone(&links), dh.clone());
            tokio::task::spawn_blocking(move || {
                l2.del_netns(&dh2).expect("del");
                l2.add_netns(&dh2).expect("add");
            })
            .await
            .expect("join");
            service.sync(Arc::clone(&links), &wanted).await;
            assert_eq!(service.listening(), vec![dh.clone()]);
            let (l2, inner2) = (Arc::clone(&links), inner.clone());
            let on_lo = tokio::task::spawn_blocking(move || {
                l2.addresses(&inner2, &IfName::new("lo").expect("lo"))
                    .expect("addresses")
            })
            .await
            .expect("join");
            assert!(on_lo.contains(&cidr(ADDRESS, 32)), "{on_lo:?}");
            drop(service);
        });
    }
}
