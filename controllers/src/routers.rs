//! The routers controller: each Router is placed on a node whose network agent's Lease (in
//! [`NETWORK_AGENT_LEASE_NAMESPACE`]) is fresh and that has the external network's physical
//! network, fewest routers first, and moved when that Lease expires (as this controller's
//! clock judges it: see [`Agent::of`]); it gets a Port per
//! interface (in its namespace, controlled by it, taking the subnet's gateway address) and a
//! Port on its external network (in that network's namespace, its address allocated as any
//! port's), each placed on the router's node (`status.hypervisor`); `status.node`,
//! `status.interfaces`, `status.externalGatewayPort` and `status.externalGatewayIPs` say what
//! it got, its `Scheduled` condition where it runs or why nowhere.
//!
//! A physical network counts on a node only when its agent declares it (its Lease's
//! [`PHYSICAL_NETWORKS_ANNOTATION`]) and the operator granted it: the same annotation on the
//! node's Hypervisor, which the node cannot write (see the node authorizer). A node that
//! declares a physical network it was not granted gets no router for it, and a router that
//! finds no node says which nodes declared it without a grant.
//!
//! A Router's finalizer deletes its Ports (the gateway Port lives in another namespace, out of
//! the garbage collector's reach) before it goes, so deleting a Router gives every address
//! back. The network agent trusts only `status.interfaces[].port` and
//! `status.externalGatewayPort` (written here) to know a Port is a router's.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource, ResourceExt};
use stratus_api_types::common::{Blocked, ConditionType, Reason};
use stratus_api_types::compute::Hypervisor;
use stratus_api_types::network::{
    FixedIP, NETWORK_AGENT_LEASE_NAMESPACE, Network, PHYSICAL_NETWORKS_ANNOTATION, Port, PortSpec,
    Router, RouterInterfaceStatus, Segmentation, Subnet, network_ref,
};
use stratus_runtime::finalizer::{self, Stage};
use stratus_runtime::policy::kube_retry;
use stratus_runtime::{Classify, Retry, Runtime};

/// The field manager of the statuses this controller writes (Routers and their Ports).
const MANAGER: &str = "stratus-routers-controller";

/// The finalizer that deletes a Router's Ports before it goes.
pub const FINALIZER: &str = "network.stratus.dev/router-ports";

/// How often every router is looked at again: a Lease that stops being renewed sends no event.
const RESYNC: Duration = Duration::from_secs(5);

/// The longest a Lease is believed after its renewal, whatever its `leaseDurationSeconds`
/// says (Kubernetes' node monitor grace period): the node writes that number itself.
pub const MAX_LEASE_DURATION: jiff::SignedDuration = jiff::SignedDuration::from_secs(40);

/// How far ahead of this controller's clock a Lease's `renewTime` may be (clock skew) and
/// still be believed.
pub const MAX_CLOCK_SKEW: jiff::SignedDuration = jiff::SignedDuration::from_secs(5);

/// Why a reconcile failed, and whether retrying can help.
#[derive(Debug, thiserror::Error)]
pub enum RoutersError {
    /// A request to the API server failed.
    #[error("request to the API server")]
    Api(#[source] kube::Error),
    /// An object without a namespace or uid (a bug elsewhere).
    #[error("object lacks a namespace or uid")]
    Incomplete,
}

impl Classify for RoutersError {
    fn retry(&self) -> Retry {
        match self {
            Self::Api(e) => kube_retry(e),
            Self::Incomplete => Retry::Never,
        }
    }
}

impl From<kube::Error> for RoutersError {
    fn from(e: kube::Error) -> Self {
        Self::Api(e)
    }
}

/// How this controller judges a network agent's Lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Freshness {
    /// Renewed within its duration (at most [`MAX_LEASE_DURATION`]) before now.
    Fresh,
    /// Not renewed within it, or never (no `renewTime` or `leaseDurationSeconds`).
    Expired,
    /// Its `renewTime` is this many seconds ahead of this controller's clock, past
    /// [`MAX_CLOCK_SKEW`]: a clock gone wrong or a forged Lease, not believed.
    Ahead(i64),
}

/// A network agent as its Lease shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Agent {
    /// The node's name.
    pub node: String,
    /// Whether its Lease is believed fresh, and why not.
    pub freshness: Freshness,
    /// The physical networks it says it has an interface on.
    pub physical_networks: Vec<String>,
    /// The physical networks the operator granted it (on its Hypervisor).
    pub granted: Vec<String>,
}

/// The physical networks an annotation lists (comma-separated; blanks ignored).
fn physical_networks(annotations: &BTreeMap<String, String>) -> Vec<String> {
    annotations
        .get(PHYSICAL_NETWORKS_ANNOTATION)
        .map(|v| {
            v.split(',')
                .map(str::trim)
                .filter(|p| !p.is_empty())
                .map(String::from)
                .collect()
        })
        .unwrap_or_default()
}

impl Agent {
    /// The agent a Lease describes, as of `now` (this controller's clock), granted the
    /// physical networks its node's Hypervisor (`hypervisor`, if any) lists.
    ///
    /// # Guarantees
    /// Both numbers that make a Lease fresh are written by its node, so neither is taken on
    /// its word: the duration honoured is at most [`MAX_LEASE_DURATION`], and a `renewTime`
    /// more than [`MAX_CLOCK_SKEW`] ahead of `now` is not fresh at all. An agent that stops
    /// renewing is expired at most `MAX_CLOCK_SKEW + MAX_LEASE_DURATION` after its last
    /// renewal, whatever it wrote.
    pub fn of(lease: &Lease, hypervisor: Option<&Hypervisor>, now: jiff::Timestamp) -> Self {
        let renewal = lease
            .spec
            .as_ref()
            .and_then(|s| Some((s.renew_time.as_ref()?.0, s.lease_duration_seconds?)));
        let freshness = match renewal {
            None => Freshness::Expired,
            Some((renewed, _)) if renewed.duration_since(now) > MAX_CLOCK_SKEW => {
                Freshness::Ahead(renewed.duration_since(now).as_secs())
            }
            Some((renewed, seconds)) => {
                let honoured = jiff::SignedDuration::from_secs(i64::from(seconds.max(0)))
                    .min(MAX_LEASE_DURATION);
                if renewed.checked_add(honoured).is_ok_and(|until| until > now) {
                    Freshness::Fresh
                } else {
                    Freshness::Expired
                }
            }
        };
        Self {
            node: lease.name_any(),
            freshness,
            physical_networks: physical_networks(lease.annotations()),
            granted: hypervisor
                .map(|h| physical_networks(h.annotations()))
                .unwrap_or_default(),
        }
    }

    /// Whether its Lease is believed fresh.
    pub fn fresh(&self) -> bool {
        self.freshness == Freshness::Fresh
    }

    /// Why a router needing `physical` cannot run here; `None` when it can.
    fn unfit(&self, physical: Option<&str>) -> Option<String> {
        match self.freshness {
            Freshness::Expired => Some("its network agent's Lease expired".into()),
            Freshness::Ahead(s) => Some(format!(
                "its network agent's Lease says it was renewed {s} s ahead of this controller's \
                 clock, which is not believed"
            )),
            Freshness::Fresh => physical.and_then(|p| {
                if !self.physical_networks.iter().any(|n| n == p) {
                    Some(format!("it has no physical network {p:?}"))
                } else if !self.granted.iter().any(|n| n == p) {
                    Some(format!(
                        "it declares physical network {p:?}, which the operator has not granted \
                         it (annotation {PHYSICAL_NETWORKS_ANNOTATION} on Hypervisor {})",
                        self.node
                    ))
                } else {
                    None
                }
            }),
        }
    }

    /// Whether it is fresh and declares `physical` without the operator's grant.
    fn ungranted(&self, physical: &str) -> bool {
        self.fresh()
            && self.physical_networks.iter().any(|n| n == physical)
            && !self.granted.iter().any(|n| n == physical)
    }
}

/// Why node `node` cannot take a router needing `physical`; `None` when it can.
fn unfit(node: &str, physical: Option<&str>, agents: &[Agent]) -> Option<String> {
    match agents.iter().find(|a| a.node == node) {
        Some(a) => a.unfit(physical),
        None => Some("its network agent has no Lease".into()),
    }
}

/// The message of a router's `Scheduled` condition once it is on `node`, having been on
/// `current`: a move says why it left.
pub fn placed_message(
    node: &str,
    current: Option<&str>,
    physical: Option<&str>,
    agents: &[Agent],
) -> String {
    match current.filter(|c| *c != node) {
        Some(c) => {
            let why = unfit(c, physical, agents).unwrap_or_else(|| "it was lost".into());
            format!("on node {node}, moved from node {c}: {why}")
        }
        None => format!("on node {node}"),
    }
}

/// Where a router runs: its node while that node's agent is fresh and has `physical` (the
/// external network's physical network, for a flat one); else the fresh agent with
/// `physical` hosting the fewest routers (`load`: routers per node), by name among equals.
///
/// # Errors
/// Why no node can take it.
pub fn place(
    current: Option<&str>,
    physical: Option<&str>,
    agents: &[Agent],
    load: &BTreeMap<String, usize>,
) -> Result<String, Blocked> {
    let fits = |a: &&Agent| a.unfit(physical).is_none();
    let candidates: Vec<&Agent> = agents.iter().filter(fits).collect();
    if let Some(c) = current.filter(|c| candidates.iter().any(|a| a.node == *c)) {
        return Ok(c.to_string());
    }
    candidates
        .iter()
        .min_by_key(|a| (load.get(&a.node).copied().unwrap_or(0), a.node.clone()))
        .map(|a| a.node.clone())
        .ok_or_else(|| {
            let what = match physical {
                Some(p) => {
                    format!("no network agent with a fresh Lease has physical network {p:?}")
                }
                None => "no network agent has a fresh Lease".to_string(),
            };
            let lost = current
                .map(|c| {
                    let why = unfit(c, physical, agents).unwrap_or_default();
                    format!(" (node {c} was lost: {why})")
                })
                .unwrap_or_default();
            // Lease that claim a renewal in the future, and nodes that declare the physical
            // network without a grant, are named: an operator has a clock, a node or a grant
            // to look at.
            let ahead: Vec<String> = agents
                .iter()
                .filter(|a| {
                    (matches!(a.freshness, Freshness::Ahead(_))
                        || physical.is_some_and(|p| a.ungranted(p)))
                        && Some(a.node.as_str()) != current
                })
                .filter_map(|a| {
                    a.unfit(physical)
                        .map(|why| format!("node {}: {why}", a.node))
                })
                .collect();
            let ahead = if ahead.is_empty() {
                String::new()
            } else {
                format!("; {}", ahead.join("; "))
            };
            Blocked::new(Reason::Unschedulable, format!("{what}{lost}{ahead}"))
        })
}

/// The name of a Router's interface Port on the Subnet of uid `subnet_uid`: one per subnet
/// (it holds the subnet's gateway address).
pub fn interface_port_name(subnet_uid: &str) -> String {
    format!("rif-{subnet_uid}")
}

/// The name of the gateway Port of the Router of uid `router_uid`.
pub fn gateway_port_name(router_uid: &str) -> String {
    format!("rgw-{router_uid}")
}

/// The description of the gateway Port of Router `name` of namespace `ns`, made on an
/// external network in `net_ns`: it names the router only within its own project. The
/// external network's project (and whoever reads its Ports, such as the router's node) learns
/// no other project's names; the Port's name holds the router's uid, which tells nothing.
pub fn gateway_description(ns: &str, name: &str, net_ns: &str) -> String {
    if ns == net_ns {
        format!("gateway of router {name}")
    } else {
        "gateway of a router of another project".into()
    }
}

/// The owner reference a Router's interface Ports carry.
pub fn owner_reference(router: &Router) -> Option<OwnerReference> {
    Some(OwnerReference {
        api_version: Router::api_version(&()).into_owned(),
        kind: Router::kind(&()).into_owned(),
        name: router.metadata.name.clone()?,
        uid: router.metadata.uid.clone()?,
        controller: Some(true),
        block_owner_deletion: Some(true),
    })
}

/// Whether `port` is controlled by the Router of uid `uid`.
fn owned_by(port: &Port, uid: &str) -> bool {
    port.owner_references()
        .iter()
        .any(|o| o.controller == Some(true) && o.kind == "Router" && o.uid == uid)
}

/// A router Port on `network` taking `fixed` (none: allocated), with port security off (a
/// router forwards for other addresses).
pub fn router_port(name: &str, ns: &str, network: &str, fixed: Vec<FixedIP>, what: String) -> Port {
    let mut port = Port::new(
        name,
        PortSpec {
            network: network.to_string(),
            fixed_ips: fixed,
            mac_address: None,
            security_groups: Some(Vec::new()),
            port_security_enabled: Some(false),
            allowed_address_pairs: Vec::new(),
            description: Some(what),
        },
    );
    port.metadata.namespace = Some(ns.to_string());
    port
}

struct Ctx {
    client: Client,
    routers: Runtime<Router>,
    ports: Runtime<Port>,
    leases: Store<Lease>,
    /// The Hypervisors, whose annotations are the operator's physical network grants.
    hypervisors: Store<Hypervisor>,
    store: Store<Router>,
}

async fn reconcile(router: Arc<Router>, ctx: Arc<Ctx>) -> Result<Action, RoutersError> {
    let result = match finalizer::stage(&*router, FINALIZER) {
        Stage::Adopt => finalizer::add(&ctx.client, &*router, FINALIZER)
            .await
            .map(|()| Action::await_change())
            .map_err(RoutersError::Api),
        Stage::Live => sync(&router, &ctx).await,
        Stage::Cleanup => cleanup(&router, &ctx).await,
        Stage::Gone => Ok(Action::await_change()),
    };
    ctx.routers.finish(&router, result).await
}

fn error_policy(router: Arc<Router>, e: &RoutersError, ctx: Arc<Ctx>) -> Action {
    ctx.routers.error_policy(&router, e)
}

/// What one interface needs, or why it cannot be made now.
enum Interface {
    Ready(Box<Port>, RouterInterfaceStatus),
    Blocked(Blocked),
}

/// The Port of interface `i` (on subnet `name`), created if absent.
async fn interface(
    router: &Router,
    ns: &str,
    i: usize,
    name: &str,
    ctx: &Ctx,
) -> Result<Interface, RoutersError> {
    let uid = router.uid().ok_or(RoutersError::Incomplete)?;
    let field = format!("spec.interfaces[{i}]");
    let Some(subnet) = Api::<Subnet>::namespaced(ctx.client.clone(), ns)
        .get_opt(name)
        .await?
    else {
        return Ok(Interface::Blocked(Blocked::new(
            Reason::SubnetNotFound,
            format!("{field}: subnet {name:?} does not exist"),
        )));
    };
    let gateway = subnet.status.as_ref().and_then(|s| s.gateway_ip.clone());
    let (Some(gateway), Some(subnet_uid)) = (gateway, subnet.uid()) else {
        return Ok(Interface::Blocked(Blocked::new(
            Reason::SubnetNotFound,
            format!("{field}: subnet {name:?} has no gateway address"),
        )));
    };
    let port_name = interface_port_name(&subnet_uid);
    let api = Api::<Port>::namespaced(ctx.client.clone(), ns);
    let port = match api.get_opt(&port_name).await? {
        Some(p) if owned_by(&p, &uid) => p,
        Some(_) => {
            return Ok(Interface::Blocked(Blocked::new(
                Reason::PortInUse,
                format!("{field}: subnet {name:?}'s gateway is another router's interface"),
            )));
        }
        None => {
            let mut port = router_port(
                &port_name,
                ns,
                &subnet.spec.network,
                vec![FixedIP {
                    subnet: Some(name.to_string()),
                    ip_address: Some(gateway.clone()),
                }],
                format!("interface of router {} on subnet {name}", router.name_any()),
            );
            port.metadata.owner_references = owner_reference(router).map(|o| vec![o]);
            match api.create(&PostParams::default(), &port).await {
                Ok(p) => {
                    tracing::info!(router = %router.name_any(), port = %port_name, "created the router's interface");
                    p
                }
                Err(kube::Error::Api(e))
                    if (400..500).contains(&e.code) && e.reason != "AlreadyExists" =>
                {
                    return Ok(Interface::Blocked(Blocked::new(
                        Reason::PortRefused,
                        format!(
                            "{field}: creating port {port_name:?} was refused: {}",
                            e.message
                        ),
                    )));
                }
                Err(e) => return Err(e.into()),
            }
        }
    };
    let status = RouterInterfaceStatus {
        subnet: name.to_string(),
        ip_address: gateway,
        port: Some(port_name),
    };
    Ok(Interface::Ready(Box::new(port), status))
}

/// The external network a Router's gateway is on (its namespace and Network), if it has one
/// that exists.
async fn external_network(
    router: &Router,
    ns: &str,
    ctx: &Ctx,
) -> Result<Option<(String, Network)>, RoutersError> {
    let Some(gw) = &router.spec.external_gateway else {
        return Ok(None);
    };
    let (net_ns, name) = network_ref(ns, &gw.network);
    let net = Api::<Network>::namespaced(ctx.client.clone(), net_ns)
        .get_opt(name)
        .await?;
    Ok(net.map(|n| (net_ns.to_string(), n)))
}

/// Places a Router, makes its Ports, places them with it, and reports it all in its status.
async fn sync(router: &Router, ctx: &Ctx) -> Result<Action, RoutersError> {
    let ns = router.namespace().ok_or(RoutersError::Incomplete)?;
    let uid = router.uid().ok_or(RoutersError::Incomplete)?;
    let gen_ = router.metadata.generation;
    let mut status = router.status.clone().unwrap_or_default();
    let mut blocked: Option<Blocked> = None;
    // The external network, and the physical network the router's node needs.
    let external = external_network(router, &ns, ctx).await?;
    if let (Some(gw), None) = (&router.spec.external_gateway, &external) {
        blocked = Some(Blocked::new(
            Reason::ExternalNetworkNotFound,
            format!(
                "spec.externalGateway.network: network {:?} does not exist",
                gw.network
            ),
        ));
    }
    let physical = external.as_ref().and_then(|(_, n)| {
        (n.spec.segmentation == Segmentation::Flat)
            .then(|| n.spec.physical_network.clone())
            .flatten()
    });
    // Placement.
    stratus_runtime::store_ready(&ctx.leases).await;
    let now = jiff::Timestamp::now();
    stratus_runtime::store_ready(&ctx.hypervisors).await;
    let agents: Vec<Agent> = ctx
        .leases
        .state()
        .iter()
        .map(|l| {
            let hv = ctx
                .hypervisors
                .get(&ObjectRef::<Hypervisor>::new(&l.name_any()));
            Agent::of(l, hv.as_deref(), now)
        })
        .collect();
    let mut load = BTreeMap::new();
    for r in ctx.store.state() {
        if r.uid() != router.uid()
            && let Some(n) = r.status.as_ref().and_then(|s| s.node.clone())
        {
            *load.entry(n).or_insert(0) += 1;
        }
    }
    let current = status.node.clone();
    let node = match place(current.as_deref(), physical.as_deref(), &agents, &load) {
        Ok(n) => {
            let message = placed_message(&n, current.as_deref(), physical.as_deref(), &agents);
            if current.as_deref() != Some(n.as_str()) {
                tracing::info!(router = %router.name_any(), node = %n, from = ?current, %message, "placing the router");
            }
            ConditionType::Scheduled
                .yes(Reason::Bound, message)
                .set(&mut status.conditions, gen_);
            Some(n)
        }
        Err(b) => {
            b.condition(ConditionType::Scheduled)
                .set(&mut status.conditions, gen_);
            None
        }
    };
    status.node = node.clone();
    // Interfaces.
    let mut ports: Vec<Port> = Vec::new();
    let mut interfaces = Vec::new();
    for (i, iface) in router.spec.interfaces.iter().enumerate() {
        match interface(router, &ns, i, &iface.subnet, ctx).await? {
            Interface::Ready(p, s) => {
                ports.push(*p);
                interfaces.push(s);
            }
            Interface::Blocked(b) => {
                blocked.get_or_insert(b);
            }
        }
    }
    // Interfaces no longer asked for go.
    let api = Api::<Port>::namespaced(ctx.client.clone(), &ns);
    for p in api.list(&ListParams::default()).await? {
        let wanted = interfaces
            .iter()
            .any(|s| s.port.as_deref() == Some(p.name_any().as_str()));
        if owned_by(&p, &uid) && !wanted && p.metadata.deletion_timestamp.is_none() {
            tracing::info!(router = %router.name_any(), port = %p.name_any(), "deleting an interface the router no longer has");
            delete_port(&api, &p.name_any()).await?;
        }
    }
    status.interfaces = interfaces;
    // The gateway Port, on the external network in its namespace.
    let gw_name = gateway_port_name(&uid);
    let old_gw = status.external_gateway_port.clone();
    match &external {
        Some((net_ns, net)) => {
            let gw_api = Api::<Port>::namespaced(ctx.client.clone(), net_ns);
            let port = match gw_api.get_opt(&gw_name).await? {
                Some(p) => Some(p),
                None => {
                    let port = router_port(
                        &gw_name,
                        net_ns,
                        &net.name_any(),
                        Vec::new(),
                        gateway_description(&ns, &router.name_any(), net_ns),
                    );
                    match gw_api.create(&PostParams::default(), &port).await {
                        Ok(p) => {
                            tracing::info!(router = %router.name_any(), port = %gw_name, "created the router's gateway port");
                            Some(p)
                        }
                        Err(kube::Error::Api(e))
                            if (400..500).contains(&e.code) && e.reason != "AlreadyExists" =>
                        {
                            blocked.get_or_insert(Blocked::new(
                                Reason::PortRefused,
                                format!(
                                    "spec.externalGateway: creating port {net_ns}/{gw_name} was refused: {}",
                                    e.message
                                ),
                            ));
                            None
                        }
                        Err(e) => return Err(e.into()),
                    }
                }
            };
            status.external_gateway_port = port.as_ref().map(|_| format!("{net_ns}/{gw_name}"));
            status.external_gateway_ips = port
                .as_ref()
                .and_then(|p| p.status.as_ref())
                .map(|s| s.fixed_ips.iter().map(|f| f.ip_address.clone()).collect())
                .unwrap_or_default();
            ports.extend(port);
        }
        None => {
            status.external_gateway_port = None;
            status.external_gateway_ips = Vec::new();
        }
    }
    if let Some(old) = old_gw.filter(|o| Some(o) != status.external_gateway_port.as_ref())
        && let Some((old_ns, old_name)) = old.split_once('/')
    {
        tracing::info!(router = %router.name_any(), port = %old, "deleting the router's former gateway port");
        delete_port(&Api::namespaced(ctx.client.clone(), old_ns), old_name).await?;
    }
    // Every router Port is placed with the router.
    for port in &ports {
        let mut want = port.status.clone().unwrap_or_default();
        want.hypervisor = node.clone();
        if port.status.as_ref() != Some(&want) {
            ctx.ports.write_status(port, &want).await?;
        }
    }
    match &blocked {
        Some(b) => b.condition(ConditionType::Allocated),
        None => ConditionType::Allocated.yes(
            Reason::PortsAllocated,
            format!(
                "{} interface(s){}",
                status.interfaces.len(),
                match &status.external_gateway_port {
                    Some(p) => format!(", gateway port {p}"),
                    None => String::new(),
                }
            ),
        ),
    }
    .set(&mut status.conditions, gen_);
    status.observed_generation = gen_;
    ctx.routers.write_status(router, &status).await?;
    Ok(Action::requeue(RESYNC))
}

/// Deletes a Port (gone already is done).
async fn delete_port(api: &Api<Port>, name: &str) -> Result<(), RoutersError> {
    match api.delete(name, &DeleteParams::default()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// A deleted Router's Ports go, then its finalizer.
async fn cleanup(router: &Router, ctx: &Ctx) -> Result<Action, RoutersError> {
    let ns = router.namespace().ok_or(RoutersError::Incomplete)?;
    let uid = router.uid().ok_or(RoutersError::Incomplete)?;
    let mut left = Vec::new();
    let api = Api::<Port>::namespaced(ctx.client.clone(), &ns);
    for p in api.list(&ListParams::default()).await? {
        if owned_by(&p, &uid) {
            delete_port(&api, &p.name_any()).await?;
            left.push(format!("{ns}/{}", p.name_any()));
        }
    }
    // The gateway Port, wherever the status or the spec puts it.
    let mut gateways: Vec<(String, String)> = router
        .status
        .as_ref()
        .and_then(|s| s.external_gateway_port.as_deref())
        .and_then(|p| p.split_once('/'))
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .into_iter()
        .collect();
    if let Some(gw) = &router.spec.external_gateway {
        let (net_ns, _) = network_ref(&ns, &gw.network);
        gateways.push((net_ns.to_string(), gateway_port_name(&uid)));
    }
    for (gw_ns, name) in gateways {
        let api = Api::<Port>::namespaced(ctx.client.clone(), &gw_ns);
        if api.get_opt(&name).await?.is_some() {
            delete_port(&api, &name).await?;
            left.push(format!("{gw_ns}/{name}"));
        }
    }
    if left.is_empty() {
        finalizer::release(&ctx.client, router, FINALIZER).await?;
        tracing::info!(router = %router.name_any(), "the router's ports are gone");
        return Ok(Action::await_change());
    }
    tracing::info!(router = %router.name_any(), ports = ?left, "deleting the router's ports");
    Ok(Action::requeue(Duration::from_secs(1)))
}

/// The routers a change to `node`'s agent or grants may move: those on it, which may have to
/// leave, and those on no node yet, which may now fit there.
fn on_or_waiting(store: &Store<Router>, node: &str) -> Vec<ObjectRef<Router>> {
    store
        .state()
        .into_iter()
        .filter(|r| {
            let on = r.status.as_ref().and_then(|s| s.node.as_deref());
            on.is_none() || on == Some(node)
        })
        .map(|r| ObjectRef::from_obj(&*r))
        .collect()
}

/// Runs the routers controller until its watches end.
pub async fn run(client: Client) {
    let (leases, lease_writer) = reflector::store();
    let lease_stream = watcher(
        Api::<Lease>::namespaced(client.clone(), NETWORK_AGENT_LEASE_NAMESPACE),
        watcher::Config::default(),
    )
    .default_backoff()
    .reflect(lease_writer)
    .applied_objects();
    let (hypervisors, hypervisor_writer) = reflector::store();
    let hypervisor_stream = watcher(
        Api::<Hypervisor>::all(client.clone()),
        watcher::Config::default(),
    )
    .default_backoff()
    .reflect(hypervisor_writer)
    .applied_objects();
    let controller = Controller::new(
        Api::<Router>::all(client.clone()),
        watcher::Config::default(),
    );
    let store = controller.store();
    let ctx = Arc::new(Ctx {
        client: client.clone(),
        routers: Runtime::new(client.clone(), MANAGER),
        ports: Runtime::new(client.clone(), MANAGER),
        leases,
        hypervisors,
        store: store.clone(),
    });
    let by_node = store.clone();
    let by_grant = store.clone();
    let all = store.clone();
    controller
        // An agent's Lease changing (appearing, renewed, its annotations) may move routers
        // off or onto it; an unplaced router may find a node.
        .watches_stream(lease_stream, move |l: Lease| {
            on_or_waiting(&by_node, &l.name_any())
        })
        // A node's grants changing (its Hypervisor's annotation) may move routers off it or
        // let an unplaced one onto it.
        .watches_stream(hypervisor_stream, move |h: Hypervisor| {
            on_or_waiting(&by_grant, &h.name_any())
        })
        // A router's Port changing (its address allocated, deleted by hand).
        .owns(Api::<Port>::all(client.clone()), watcher::Config::default())
        // A Subnet appearing lets a router waiting for it make its interface.
        .watches(
            Api::<Subnet>::all(client),
            watcher::Config::default(),
            move |s| {
                let ns = s.namespace();
                let name = s.name_any();
                all.state()
                    .into_iter()
                    .filter(|r| {
                        r.namespace() == ns && r.spec.interfaces.iter().any(|i| i.subnet == name)
                    })
                    .map(|r| ObjectRef::from_obj(&*r))
                    .collect::<Vec<_>>()
            },
        )
        .run(reconcile, error_policy, ctx)
        .for_each(|_| async {})
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agent(node: &str, fresh: bool, physical: &[&str]) -> Agent {
        Agent {
            node: node.into(),
            freshness: if fresh {
                Freshness::Fresh
            } else {
                Freshness::Expired
            },
            physical_networks: physical.iter().map(|p| p.to_string()).collect(),
            granted: physical.iter().map(|p| p.to_string()).collect(),
        }
    }

    #[test]
    fn a_physical_network_counts_only_when_declared_and_granted() {
        let mut claims = agent("a", true, &["physnet1"]);
        claims.granted.clear();
        let mut granted_only = agent("g", true, &[]);
        granted_only.granted = vec!["physnet1".into()];
        let agents = [claims.clone(), granted_only.clone()];
        let load = BTreeMap::new();
        // A node that declares a physical network it was not granted gets no router for it,
        // nor does one granted a network its agent does not declare; the condition names
        // the node and the network.
        let b = place(None, Some("physnet1"), &agents, &load).expect_err("nowhere");
        assert!(
            b.message.contains(
                "node a: it declares physical network \"physnet1\", which the operator has not \
                 granted it"
            ),
            "{}",
            b.message
        );
        assert!(!b.message.contains("node g"), "{}", b.message);
        // A router on a node whose grant was taken away moves to one granted it.
        let agents = [claims, agent("b", true, &["physnet1"])];
        assert_eq!(
            place(Some("a"), Some("physnet1"), &agents, &load).as_deref(),
            Ok("b")
        );
        assert!(
            placed_message("b", Some("a"), Some("physnet1"), &agents)
                .contains("moved from node a: it declares physical network \"physnet1\"")
        );
        // Routers needing no physical network are placed whatever the grants.
        assert_eq!(
            place(None, None, &[granted_only], &load).as_deref(),
            Ok("g")
        );
    }

    #[test]
    fn a_router_stays_on_its_node_while_that_agent_is_fresh() {
        let agents = [agent("a", true, &[]), agent("b", true, &[])];
        let load = BTreeMap::from([("a".to_string(), 5)]);
        assert_eq!(place(Some("a"), None, &agents, &load).as_deref(), Ok("a"));
    }

    #[test]
    fn a_router_goes_to_the_least_loaded_fresh_agent_with_its_physical_network() {
        let agents = [
            agent("a", true, &["physnet1"]),
            agent("b", true, &["physnet1"]),
            agent("c", true, &[]),
            agent("d", false, &["physnet1"]),
        ];
        let load = BTreeMap::from([("a".to_string(), 2), ("b".to_string(), 1)]);
        assert_eq!(
            place(None, Some("physnet1"), &agents, &load).as_deref(),
            Ok("b")
        );
        assert_eq!(place(None, None, &agents, &load).as_deref(), Ok("c"));
        // Its node's Lease expired: moved.
        assert_eq!(
            place(Some("d"), Some("physnet1"), &agents, &load).as_deref(),
            Ok("b")
        );
        // Its node lacks the physical network (the Lease changed): moved.
        assert_eq!(
            place(Some("c"), Some("physnet1"), &agents, &load).as_deref(),
            Ok("b")
        );
        // Equal load: by name.
        assert_eq!(
            place(None, Some("physnet1"), &agents, &BTreeMap::new()).as_deref(),
            Ok("a")
        );
    }

    #[test]
    fn no_fresh_agent_says_why() {
        let agents = [agent("a", false, &["physnet1"]), agent("b", true, &[])];
        let b = place(Some("a"), Some("physnet1"), &agents, &BTreeMap::new()).expect_err("none");
        assert_eq!(b.reason, Reason::Unschedulable);
        assert!(
            b.message.contains("physnet1")
                && b.message
                    .contains("node a was lost: its network agent's Lease expired"),
            "{}",
            b.message
        );
        // Moved off a node that lacks the physical network now: the condition says so.
        let agents = [agent("a", true, &[]), agent("b", true, &["physnet1"])];
        assert_eq!(
            placed_message("b", Some("a"), Some("physnet1"), &agents),
            "on node b, moved from node a: it has no physical network \"physnet1\""
        );
        assert_eq!(
            placed_message("b", Some("gone"), None, &agents),
            "on node b, moved from node gone: its network agent has no Lease"
        );
        let b = place(None, None, &[], &BTreeMap::new()).expect_err("none");
        assert!(b.message.contains("no network agent"), "{}", b.message);
    }

    /// A Lease of node `a` renewed `renewed` seconds before `now` (after it when negative),
    /// for `duration` seconds; `None`: without that field.
    fn lease(now: jiff::Timestamp, renewed: Option<i64>, duration: Option<i32>) -> Lease {
        use k8s_openapi::api::coordination::v1::LeaseSpec;
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
        let mut l = Lease {
            spec: Some(LeaseSpec {
                holder_identity: Some("a".into()),
                lease_duration_seconds: duration,
                renew_time: renewed.map(|ago| {
                    MicroTime(
                        now.checked_sub(jiff::SignedDuration::from_secs(ago))
                            .expect("time"),
                    )
                }),
                ..LeaseSpec::default()
            }),
            ..Lease::default()
        };
        l.metadata.name = Some("a".into());
        l.metadata.annotations = Some(
            [(
                PHYSICAL_NETWORKS_ANNOTATION.to_string(),
                "physnet1, ext2,".to_string(),
            )]
            .into(),
        );
        l
    }

    #[test]
    fn the_grant_is_the_hypervisors_annotation() {
        let now = jiff::Timestamp::now();
        let mut hv = Hypervisor::new(
            "a",
            serde_json::from_value(serde_json::json!({})).expect("spec"),
        );
        hv.metadata.annotations = Some(
            [(
                PHYSICAL_NETWORKS_ANNOTATION.to_string(),
                "physnet1".to_string(),
            )]
            .into(),
        );
        let a = Agent::of(&lease(now, Some(0), Some(20)), Some(&hv), now);
        assert_eq!(a.granted, ["physnet1"]);
        assert_eq!(a.unfit(Some("physnet1")), None);
        assert!(
            a.unfit(Some("ext2"))
                .is_some_and(|w| w.contains("not granted"))
        );
    }

    #[test]
    fn a_lease_is_fresh_by_this_controllers_clock_not_by_what_the_node_wrote() {
        let now = jiff::Timestamp::now();
        let year = 365 * 24 * 3600;
        let cases: &[(&str, Option<i64>, Option<i32>, Freshness)] = &[
            (
                "renewed within its duration",
                Some(3),
                Some(10),
                Freshness::Fresh,
            ),
            (
                "renewed longer ago than it",
                Some(11),
                Some(10),
                Freshness::Expired,
            ),
            ("the agent's own 20 s", Some(19), Some(20), Freshness::Fresh),
            (
                "a huge duration, within the cap",
                Some(39),
                Some(i32::MAX),
                Freshness::Fresh,
            ),
            (
                "a huge duration, past the cap",
                Some(41),
                Some(i32::MAX),
                Freshness::Expired,
            ),
            (
                "a huge duration, a year ago",
                Some(year),
                Some(i32::MAX),
                Freshness::Expired,
            ),
            ("a negative duration", Some(0), Some(-5), Freshness::Expired),
            ("no duration", Some(0), None, Freshness::Expired),
            ("no renewal", None, Some(10), Freshness::Expired),
            (
                "a little ahead (clock skew)",
                Some(-4),
                Some(10),
                Freshness::Fresh,
            ),
            (
                "an hour ahead",
                Some(-3600),
                Some(10),
                Freshness::Ahead(3600),
            ),
            (
                "years ahead",
                Some(-10 * year),
                Some(10),
                Freshness::Ahead(10 * year),
            ),
        ];
        for (what, renewed, duration, want) in cases {
            let a = Agent::of(&lease(now, *renewed, *duration), None, now);
            assert_eq!(a.freshness, *want, "{what}");
            assert_eq!(a.fresh(), *want == Freshness::Fresh, "{what}");
            assert_eq!(a.physical_networks, ["physnet1", "ext2"]);
            assert!(a.granted.is_empty(), "{what}: no Hypervisor, no grant");
        }
        assert_eq!(
            Agent::of(&Lease::default(), None, now).freshness,
            Freshness::Expired
        );
        // A node that stopped renewing is expired by the cap and the skew at the latest,
        // whatever it wrote last.
        let last = lease(now, Some(0), Some(i32::MAX));
        let later = now
            .checked_add(MAX_LEASE_DURATION + MAX_CLOCK_SKEW)
            .expect("time");
        assert!(!Agent::of(&last, None, later).fresh());
        let forged = lease(now, Some(-10 * year), Some(i32::MAX));
        assert!(!Agent::of(&forged, None, now).fresh());
        assert!(!Agent::of(&forged, None, later).fresh());
    }

    #[test]
    fn a_lease_renewed_in_the_future_attracts_no_router_and_the_condition_says_so() {
        let mut ahead = agent("a", true, &["physnet1"]);
        ahead.freshness = Freshness::Ahead(3600);
        let honest = agent("b", true, &["physnet1"]);
        // Even with nothing on it, the forged node is passed over; its router moves.
        let load = BTreeMap::from([("b".to_string(), 9)]);
        let agents = [ahead.clone(), honest];
        assert_eq!(
            place(None, Some("physnet1"), &agents, &load).as_deref(),
            Ok("b")
        );
        assert_eq!(
            place(Some("a"), Some("physnet1"), &agents, &load).as_deref(),
            Ok("b")
        );
        let m = placed_message("b", Some("a"), Some("physnet1"), &agents);
        assert!(
            m.starts_with("on node b, moved from node a:") && m.contains("3600 s ahead"),
            "{m}"
        );
        assert_eq!(placed_message("b", Some("b"), None, &agents), "on node b");
        assert_eq!(placed_message("b", None, None, &agents), "on node b");
        // Alone, it is named in the refusal.
        let b =
            place(None, Some("physnet1"), &[ahead.clone()], &BTreeMap::new()).expect_err("none");
        assert_eq!(b.reason, Reason::Unschedulable);
        assert!(
            b.message.contains("node a:") && b.message.contains("not believed"),
            "{}",
            b.message
        );
        let b = place(Some("a"), None, &[ahead], &BTreeMap::new()).expect_err("none");
        assert!(
            b.message.contains("node a was lost:") && b.message.contains("3600 s ahead"),
            "{}",
            b.message
        );
    }

    #[test]
    fn a_gateway_port_names_its_router_only_in_the_routers_own_project() {
        assert_eq!(
            gateway_description("demo", "r1", "demo"),
            "gateway of router r1"
        );
        let other = gateway_description("acme-secret", "payroll-router", "ops");
        assert!(
            !other.contains("acme-secret") && !other.contains("payroll-router"),
            "{other}"
        );
    }

    #[test]
    fn router_ports_are_named_after_what_they_hold_and_skip_port_security() {
        assert_eq!(interface_port_name("u-1"), "rif-u-1");
        assert_eq!(gateway_port_name("u-2"), "rgw-u-2");
        let p = router_port("rgw-u", "ops", "ext", Vec::new(), "gateway".into());
        assert_eq!(p.spec.port_security_enabled, Some(false));
        assert_eq!(p.spec.security_groups, Some(Vec::new()));
        assert_eq!(p.metadata.namespace.as_deref(), Some("ops"));
    }
}
