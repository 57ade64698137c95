//! The ports controller: a Server's `spec.networks` entries become Ports (one per entry that
//! names a network, created with an ownerReference to the Server, so the garbage collector
//! deletes it with the Server; an entry naming an existing Port uses it), placed where the
//! Server is placed (`status.hypervisor`, `status.boundTo`, `status.interfaceName` of each
//! Port, which the node's network agent wires), and the Server's `status.addresses` list their
//! fixed IPs. A Port bound to a Server that is gone, or that no longer names it, is released.
//! A Port an entry names is used only when it carries that Server's claim
//! ([`CLAIMED_BY`], written by the API server with the Server's write), so a Port made anew
//! under a name a Server still holds is not taken by it. A Port of an entry's created name is
//! used only when the Server controls it and it asks for the entry's network and addresses.
//!
//! Addresses are claimed by the Port's create (IPAM is an admission plug-in), so a Server's
//! addresses are known as soon as its Ports exist, before it is placed.

use std::sync::Arc;
use std::time::Duration;

use crate::cache::Shared;
use futures::StreamExt;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{Api, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use stratus_api_types::common::{Blocked, ConditionType, Reason};
use stratus_api_types::compute::{AddressType, Server, ServerAddress, ServerNetwork};
use stratus_api_types::network::{FixedIP, Port, PortSpec, PortStatus, Subnet};
use stratus_api_types::ports::{
    CLAIMED_BY, entry_port_name, parse_claim, server_port_names, tap_name,
};
use stratus_runtime::policy::{kube_retry, namespace_terminating};
use stratus_runtime::{Classify, Retry, Runtime};

/// The field manager of the ports controller's status writes (Servers and Ports).
const MANAGER: &str = "stratus-ports-controller";

/// How often a Server whose Ports cannot be made is looked at again (a change to its Ports
/// triggers a look at once).
const BLOCKED_RETRY: Duration = Duration::from_secs(30);

/// Why a reconcile failed, and whether retrying can help.
#[derive(Debug, thiserror::Error)]
pub enum PortsError {
    /// A request to the API server failed.
    #[error("request to the API server")]
    Api(#[source] kube::Error),
    /// An object without a namespace or uid (a bug elsewhere).
    #[error("object lacks a namespace or uid")]
    Incomplete,
}

impl Classify for PortsError {
    fn retry(&self) -> Retry {
        match self {
            Self::Api(e) => kube_retry(e),
            Self::Incomplete => Retry::Never,
        }
    }
}

impl From<kube::Error> for PortsError {
    fn from(e: kube::Error) -> Self {
        Self::Api(e)
    }
}

/// What one `spec.networks` entry needs, decided from the Server and the Port of its name.
#[derive(Debug, Clone, PartialEq)]
pub enum EntryPlan {
    /// Create this Port (owned by the Server).
    Create(Box<Port>),
    /// The Port exists and is the Server's to use.
    Use,
    /// The entry cannot be served until something changes.
    Blocked(Blocked),
}

/// The owner reference a Server's created Ports carry: the Server, as their controller, so
/// the garbage collector deletes them with it.
pub fn owner_reference(server: &Server) -> Option<OwnerReference> {
    Some(OwnerReference {
        api_version: Server::api_version(&()).into_owned(),
        kind: Server::kind(&()).into_owned(),
        name: server.metadata.name.clone()?,
        uid: server.metadata.uid.clone()?,
        controller: Some(true),
        block_owner_deletion: Some(true),
    })
}

/// The uid of the controller named in `port`'s owner references, if any.
fn controller_uid(port: &Port) -> Option<&str> {
    port.metadata
        .owner_references
        .iter()
        .flatten()
        .find(|o| o.controller == Some(true))
        .map(|o| o.uid.as_str())
}

/// The Server (name, uid) whose claim `port` carries ([`CLAIMED_BY`]).
fn claim_of(port: &Port) -> Option<(&str, &str)> {
    port.metadata
        .annotations
        .as_ref()?
        .get(CLAIMED_BY)
        .and_then(|v| parse_claim(v))
}

/// The Server `port` is bound to.
fn bound_to(port: &Port) -> Option<&str> {
    port.status.as_ref()?.bound_to.as_deref()
}

/// What entry `index` of `server`'s `spec.networks` needs, given `existing`, the Port of the
/// name it uses (see [`entry_port_name`]) if there is one.
pub fn plan_entry(
    server: &Server,
    index: usize,
    entry: &ServerNetwork,
    existing: Option<&Port>,
) -> EntryPlan {
    let server_name = server.name_any();
    let name = entry_port_name(&server_name, index, entry);
    let field = format!("spec.networks[{index}]");
    let bound_elsewhere = existing.and_then(|p| {
        p.status
            .as_ref()
            .and_then(|s| s.bound_to.as_deref())
            .filter(|b| *b != server_name)
    });
    if let Some(other) = bound_elsewhere {
        return EntryPlan::Blocked(Blocked::new(
            Reason::PortInUse,
            format!("{field}: port \"{name}\" is bound to server \"{other}\""),
        ));
    }
    let owned_elsewhere = existing
        .and_then(controller_uid)
        .is_some_and(|uid| Some(uid) != server.uid().as_deref());
    match (&entry.port, existing) {
        (Some(_), None) => EntryPlan::Blocked(Blocked::new(
            Reason::PortNotFound,
            format!("{field}: port \"{name}\" not found"),
        )),
        (Some(_), Some(_)) if owned_elsewhere => EntryPlan::Blocked(Blocked::new(
            Reason::PortInUse,
            format!("{field}: port \"{name}\" belongs to another server"),
        )),
        (Some(_), Some(p)) => match claim_of(p) {
            Some((_, uid)) if Some(uid) == server.uid().as_deref() => EntryPlan::Use,
            Some((other, _)) => EntryPlan::Blocked(Blocked::new(
                Reason::PortInUse,
                format!("{field}: port \"{name}\" is claimed by server \"{other}\""),
            )),
            // Bound before claims were recorded.
            None if bound_to(p) == Some(server_name.as_str()) => EntryPlan::Use,
            None => EntryPlan::Blocked(Blocked::new(
                Reason::PortRefused,
                format!(
                    "{field}: port \"{name}\" is not claimed by this server: it was made anew since the server named it; remove the entry and add it again to claim it"
                ),
            )),
        },
        (None, Some(p)) if controller_uid(p) != server.uid().as_deref() => {
            EntryPlan::Blocked(Blocked::new(
                Reason::PortInUse,
                format!(
                    "{field}: the port for this entry would be \"{name}\", and a port of that name that is not this server's exists"
                ),
            ))
        }
        // Controlled by this Server, yet asking for other than the entry does (anyone could
        // have written its ownerReference): not the entry's port.
        (None, Some(p)) if !made_for(p, entry) => EntryPlan::Blocked(Blocked::new(
            Reason::PortRefused,
            format!(
                "{field}: port \"{name}\" (on network \"{}\") does not ask for this entry's network and addresses; delete it so that the entry's port can be made",
                p.spec.network
            ),
        )),
        (None, Some(_)) => EntryPlan::Use,
        (None, None) => {
            let Some(network) = entry.network.clone() else {
                return EntryPlan::Blocked(Blocked::new(
                    Reason::PortRefused,
                    format!("{field}: names neither a network nor a port"),
                ));
            };
            let mut port = Port::new(
                &name,
                PortSpec {
                    network,
                    fixed_ips: entry_fixed_ips(entry),
                    mac_address: None,
                    security_groups: None,
                    port_security_enabled: None,
                    allowed_address_pairs: Vec::new(),
                    description: Some(format!("interface {index} of server {server_name}")),
                },
            );
            port.metadata.namespace = server.namespace();
            port.metadata.owner_references = owner_reference(server).map(|o| vec![o]);
            EntryPlan::Create(Box::new(port))
        }
    }
}

/// Whether `port` asks for what entry `entry` would have made it ask for: the entry's network
/// and addresses ([`entry_fixed_ips`]).
fn made_for(port: &Port, entry: &ServerNetwork) -> bool {
    entry.network.as_ref() == Some(&port.spec.network)
        && port.spec.fixed_ips == entry_fixed_ips(entry)
}

/// The addresses a created Port asks for: the entry's `fixedIP`, from its `subnet` when it
/// names one; a `subnet` alone asks for an address of that subnet; neither, one address of
/// each subnet of the network (no `fixedIPs`).
fn entry_fixed_ips(entry: &ServerNetwork) -> Vec<FixedIP> {
    if entry.fixed_ip.is_none() && entry.subnet.is_none() {
        return Vec::new();
    }
    vec![FixedIP {
        subnet: entry.subnet.clone(),
        ip_address: entry.fixed_ip.clone(),
    }]
}

/// Why entry `index`'s `subnet` cannot give the entry its address (`subnet`, the Subnet of
/// that name in the Server's namespace, as read now): it does not exist, or it is on another
/// network than the entry's. `None`: it serves, or the entry names no subnet.
pub fn subnet_refusal(
    index: usize,
    entry: &ServerNetwork,
    subnet: Option<&Subnet>,
) -> Option<Blocked> {
    let name = entry.subnet.as_deref()?;
    let network = entry.network.as_deref()?;
    let field = format!("spec.networks[{index}].subnet");
    match subnet {
        None => Some(Blocked::new(
            Reason::PortRefused,
            format!("{field}: subnet \"{name}\" not found"),
        )),
        Some(s) if s.spec.network != network => Some(Blocked::new(
            Reason::PortRefused,
            format!(
                "{field}: subnet \"{name}\" is on network \"{}\", not \"{network}\"",
                s.spec.network
            ),
        )),
        Some(_) => None,
    }
}

/// The status `port` has once placed with `server`: bound to it, on its hypervisor (none while
/// the Server is not placed), with its tap device named. Everything else is left as it is.
pub fn placed_status(port: &Port, server: &Server) -> PortStatus {
    let mut status = port.status.clone().unwrap_or_default();
    status.bound_to = Some(server.name_any());
    status.hypervisor = server.status.as_ref().and_then(|s| s.hypervisor.clone());
    status.interface_name = port.uid().map(|u| tap_name(&u));
    status
}

/// The status of a Port released from the Server it was bound to.
pub fn released_status(port: &Port) -> PortStatus {
    let mut status = port.status.clone().unwrap_or_default();
    status.bound_to = None;
    status.hypervisor = None;
    status.interface_name = None;
    status
}

/// Whether `port`, bound to a Server, is to be released: the Server (`server`, the one of its
/// `status.boundTo` name as read now) is gone or no longer names it.
pub fn stale(port: &Port, server: Option<&Server>) -> bool {
    let Some(bound) = port.status.as_ref().and_then(|s| s.bound_to.as_deref()) else {
        return false;
    };
    match server {
        None => true,
        Some(s) => s.name_any() != bound || !server_port_names(s).contains(&port.name_any()),
    }
}

/// The addresses of a Server whose Ports, in guest order, are `ports`: each fixed IP of each.
pub fn addresses(ports: &[Port]) -> Vec<ServerAddress> {
    ports
        .iter()
        .flat_map(|p| {
            let status = p.status.clone().unwrap_or_default();
            status.fixed_ips.into_iter().map(move |ip| ServerAddress {
                network: p.spec.network.clone(),
                port: Some(p.name_any()),
                ip: ip.ip_address,
                mac: status.mac_address.clone(),
                type_: AddressType::Fixed,
            })
        })
        .collect()
}

struct Ctx {
    client: Client,
    servers: Runtime<Server>,
    ports: Runtime<Port>,
}

async fn reconcile(server: Arc<Server>, ctx: Arc<Ctx>) -> Result<Action, PortsError> {
    let result = sync(&server, &ctx).await;
    ctx.servers.finish(&server, result).await
}

/// Makes and places the Ports of one Server, then reports its addresses.
async fn sync(server: &Server, ctx: &Ctx) -> Result<Action, PortsError> {
    if server.metadata.deletion_timestamp.is_some() {
        // Its created Ports go with it (garbage collection); the ones it named are released
        // once it is gone.
        return Ok(Action::await_change());
    }
    let current = server.status.clone().unwrap_or_default();
    if server.spec.networks.is_empty()
        && current.addresses.is_empty()
        && ConditionType::Allocated.find(&current.conditions).is_none()
    {
        // Nothing to make, and nothing said before to take back.
        return Ok(Action::await_change());
    }
    let ns = server.namespace().ok_or(PortsError::Incomplete)?;
    let api = Api::<Port>::namespaced(ctx.client.clone(), &ns);
    let gen_ = server.metadata.generation;
    let mut ports = Vec::new();
    let mut blocked = None;
    for (i, entry) in server.spec.networks.iter().enumerate() {
        let name = entry_port_name(&server.name_any(), i, entry);
        let existing = api.get_opt(&name).await?;
        let mut plan = plan_entry(server, i, entry, existing.as_ref());
        if matches!(plan, EntryPlan::Create(_))
            && let Some(subnet) = &entry.subnet
        {
            // Said on the Server with its own field, before a Port asks for it.
            let found = Api::<Subnet>::namespaced(ctx.client.clone(), &ns)
                .get_opt(subnet)
                .await?;
            if let Some(b) = subnet_refusal(i, entry, found.as_ref()) {
                plan = EntryPlan::Blocked(b);
            }
        }
        match plan {
            EntryPlan::Use => ports.extend(existing),
            EntryPlan::Create(port) => match api.create(&PostParams::default(), &port).await {
                Ok(p) => {
                    tracing::info!(server = %server.name_any(), port = %name, "created the server's port");
                    ports.push(p);
                }
                // Its namespace's Project is being deleted: no Port is made there any more,
                // and the Server goes with the namespace.
                Err(e) if namespace_terminating(&e) => {
                    tracing::debug!(server = %server.name_any(), port = %name, "not creating the server's port: its project is being deleted");
                    return Ok(Action::await_change());
                }
                // Refused for what it asks (a taken address, a missing network, no room):
                // said on the Server, tried again when something changes. A Port of that
                // name made meanwhile is no refusal: the next pass finds it.
                Err(kube::Error::Api(e))
                    if (400..500).contains(&e.code) && e.reason != "AlreadyExists" =>
                {
                    blocked = Some(Blocked::new(
                        Reason::PortRefused,
                        format!(
                            "spec.networks[{i}]: creating port \"{name}\" was refused: {}",
                            e.message
                        ),
                    ));
                    break;
                }
                Err(e) => return Err(e.into()),
            },
            EntryPlan::Blocked(b) => {
                blocked = Some(b);
                break;
            }
        }
    }
    let mut status = server.status.clone().unwrap_or_default();
    if let Some(b) = blocked {
        b.condition(ConditionType::Allocated)
            .set(&mut status.conditions, gen_);
        ctx.servers
            .write_status(server, &status)
            .await
            .map_err(PortsError::Api)?;
        return Ok(Action::requeue(BLOCKED_RETRY));
    }
    for port in &mut ports {
        let want = placed_status(port, server);
        if port.status.as_ref() != Some(&want) {
            ctx.ports
                .write_status(port, &want)
                .await
                .map_err(PortsError::Api)?;
            port.status = Some(want);
        }
    }
    status.addresses = addresses(&ports);
    let names: Vec<String> = ports.iter().map(ResourceExt::name_any).collect();
    let message = if names.is_empty() {
        "the server asks for no network".to_owned()
    } else {
        format!("ports: {}", names.join(", "))
    };
    ConditionType::Allocated
        .yes(Reason::PortsAllocated, message)
        .set(&mut status.conditions, gen_);
    ctx.servers
        .write_status(server, &status)
        .await
        .map_err(PortsError::Api)?;
    Ok(Action::await_change())
}

fn error_policy(server: Arc<Server>, e: &PortsError, ctx: Arc<Ctx>) -> Action {
    ctx.servers.error_policy(&server, e)
}

/// Releases a Port whose Server is gone or no longer names it.
async fn release(port: Arc<Port>, ctx: Arc<Ctx>) -> Result<Action, PortsError> {
    let result = release_inner(&port, &ctx).await;
    ctx.ports.finish(&port, result).await
}

async fn release_inner(port: &Port, ctx: &Ctx) -> Result<Action, PortsError> {
    let Some(bound) = port.status.as_ref().and_then(|s| s.bound_to.clone()) else {
        return Ok(Action::await_change());
    };
    let ns = port.namespace().ok_or(PortsError::Incomplete)?;
    // Read live: a cache that has not seen a new Server yet must not release its Port.
    let server = Api::<Server>::namespaced(ctx.client.clone(), &ns)
        .get_opt(&bound)
        .await?;
    if stale(port, server.as_ref()) {
        tracing::info!(port = %port.name_any(), server = %bound, "releasing a port its server no longer uses");
        ctx.ports
            .write_status(port, &released_status(port))
            .await
            .map_err(PortsError::Api)?;
    }
    Ok(Action::await_change())
}

fn release_error_policy(port: Arc<Port>, e: &PortsError, ctx: Arc<Ctx>) -> Action {
    ctx.ports.error_policy(&port, e)
}

/// The Servers in the store that use `port` (by name, in its namespace).
fn users(servers: &Store<Server>, port: &Port) -> Vec<ObjectRef<Server>> {
    let ns = port.namespace();
    let name = port.name_any();
    servers
        .state()
        .into_iter()
        .filter(|s| s.namespace() == ns && server_port_names(s).contains(&name))
        .map(|s| ObjectRef::from_obj(&*s))
        .collect()
}

/// Runs the ports controller until its watches end, reading Servers from the controllers'
/// shared cache.
pub async fn run(client: Client, servers: &Shared<Server>) {
    let ctx = Arc::new(Ctx {
        client: client.clone(),
        servers: Runtime::new(client.clone(), MANAGER),
        ports: Runtime::new(client.clone(), MANAGER),
    });
    let store = servers.store();
    let users_of = store.clone();
    let servers_controller = Controller::for_shared_stream(servers.touched(), store)
        .watches(
            Api::<Port>::all(client.clone()),
            watcher::Config::default(),
            move |port| users(&users_of, &port),
        )
        .run(reconcile, error_policy, Arc::clone(&ctx))
        .for_each(|_| async {});
    let ports = Controller::new(Api::<Port>::all(client.clone()), watcher::Config::default());
    let bound = ports.store();
    let ports = ports
        .watches_shared_stream(servers.touched(), move |server: Arc<Server>| {
            // A Server's change or deletion may release the Ports bound to it.
            let ns = server.namespace();
            let name = server.name_any();
            bound
                .state()
                .into_iter()
                .filter(|p| {
                    p.namespace() == ns
                        && p.status.as_ref().and_then(|s| s.bound_to.as_deref())
                            == Some(name.as_str())
                })
                .map(|p| ObjectRef::from_obj(&*p))
                .collect::<Vec<_>>()
        })
        .run(release, release_error_policy, ctx)
        .for_each(|_| async {});
    tokio::select! {
        () = servers_controller => {}
        () = ports => {}
    }
}
