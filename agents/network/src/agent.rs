//! The network agent's loop: caches of the API's objects (kube-runtime reflectors), and on
//! any change of them or every resync period, one [`converge`] of the node (desired state,
//! the host read back, [`plan`], each step through the drivers, the host read again to say
//! which ports are wired), then each port's status and, for repairs of drift, Events.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Debug;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::ObjectReference;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::{EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde_json::json;
use stratus_api_types::common::{ConditionType, Reason};
use stratus_api_types::compute::Hypervisor;
use stratus_api_types::network::{
    FloatingIP, FloatingIPPhase, NETWORK_AGENT_LEASE_NAMESPACE, Network, NetworkPhase,
    PHYSICAL_NETWORKS_ANNOTATION, Port, PortPhase, Router, SecurityGroup, Subnet,
    TUNNEL_IP_ANNOTATION,
};
use stratus_runtime::{Classify, Retry, Runtime};
use tokio::sync::Notify;

use crate::desired::{FloatingPlan, NodeConfig, PortKey, PortPlan, Snapshot, desired_all};
use crate::driver::{
    Attach, Dhcp, DhcpError, Firewall, FirewallError, IfName, Link, LinkError, LinkKind, Links,
    Name, Netns, Observed, Ruleset, conntrack,
};
use crate::plan::{
    Desired, NetnsContents, ObservedHost, Op, RouterContents, Step, is_derived, is_dhcp_name_of,
    is_router_name_of, plan_with,
};

/// The agent's name in Events and as field manager.
pub const MANAGER: &str = "stratus-network-agent";

/// The node's host APIs.
#[derive(Clone)]
pub struct Host {
    /// Links over netlink (or a fake).
    pub links: Arc<dyn Links>,
    /// The nft ruleset (or a fake).
    pub firewall: Arc<dyn Firewall>,
    /// DHCP servers (or a fake).
    pub dhcp: Arc<dyn Dhcp>,
}

/// A host call that failed.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// A link call.
    #[error("links")]
    Links(#[from] LinkError),
    /// The firewall.
    #[error("firewall")]
    Firewall(#[from] FirewallError),
    /// A DHCP server.
    #[error("DHCP")]
    Dhcp(#[from] DhcpError),
    /// A blocking task panicked (a bug).
    #[error("blocking task failed")]
    Join(#[from] tokio::task::JoinError),
}

impl Classify for SyncError {
    /// What the host refused as invalid is refused again; anything else may pass later.
    fn retry(&self) -> Retry {
        match self {
            SyncError::Links(LinkError::Invalid(_))
            | SyncError::Firewall(FirewallError::Invalid(_))
            | SyncError::Dhcp(DhcpError::Invalid(_))
            | SyncError::Join(_) => Retry::Never,
            _ => Retry::Backoff,
        }
    }

    fn reason(&self) -> &'static str {
        Reason::WiringFailed.as_str()
    }
}

/// Whether one of the node's ports is wired, as the host says after a converge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PortState {
    /// Its device is up on its network's bridge, the bridge's VXLAN device is there, and its
    /// filter is in place.
    Wired {
        /// The bridge.
        bridge: IfName,
        /// The port's device.
        device: IfName,
    },
    /// Not wired, and why.
    NotWired {
        /// CamelCase reason.
        reason: Reason,
        /// For people.
        message: String,
    },
}

/// Whether a Router or FloatingIP of the node is programmed, as the host says after a
/// converge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Programmed {
    /// In place.
    Yes {
        /// CamelCase reason.
        reason: Reason,
        /// For people.
        message: String,
    },
    /// Not (yet), and why.
    No {
        /// CamelCase reason.
        reason: Reason,
        /// For people.
        message: String,
    },
}

/// What one converge did.
#[derive(Debug)]
pub struct Report {
    /// The state aimed at.
    pub desired: Desired,
    /// [`Ruleset::observed`] of its ruleset, when it renders.
    pub firewall: Option<Observed>,
    /// The steps planned (all tried unless an earlier one of theirs failed).
    pub steps: Vec<Step>,
    /// The steps that failed, with the error.
    pub failures: Vec<(Step, String)>,
    /// Each of the node's ports.
    pub ports: BTreeMap<PortKey, PortState>,
    /// Each Router placed on the node, by namespace and name.
    pub routers: BTreeMap<PortKey, Programmed>,
    /// Each FloatingIP of those routers, by namespace and name.
    pub floating_ips: BTreeMap<PortKey, Programmed>,
    /// The host after the steps: read again, or (a change of the firewall alone, see
    /// [`converge_after`]) the last converge's reading with the firewall read again.
    pub observed: ObservedHost,
    /// The filter aimed at went in and was read back ([`forget_revoked`] may go on).
    pub firewall_in_place: bool,
}

impl Report {
    /// The devices of the ports it found wired.
    pub fn wired_devices(&self) -> BTreeSet<IfName> {
        self.ports
            .values()
            .filter_map(|p| match p {
                PortState::Wired { device, .. } => Some(device.clone()),
                PortState::NotWired { .. } => None,
            })
            .collect()
    }
}

/// Reads what the node has of what `desired` speaks of, and of what the agent made before.
///
/// # Errors
/// A driver could not read the host.
pub fn observe(host: &Host, desired: &Desired) -> Result<ObservedHost, SyncError> {
    observe_unless(host, desired, &AtomicBool::new(false)).map(Option::unwrap_or_default)
}

/// [`observe`], given up between two reads once `stop` is set: `None` then.
///
/// # Errors
/// A driver could not read the host.
pub fn observe_unless(
    host: &Host,
    desired: &Desired,
    stop: &AtomicBool,
) -> Result<Option<ObservedHost>, SyncError> {
    let stopped = || stop.load(Ordering::Relaxed);
    let ns = &desired.netns;
    let links: BTreeMap<IfName, Link> = host
        .links
        .links(ns)?
        .into_iter()
        .map(|l| (l.name.clone(), l))
        .collect();
    let mut fdb = BTreeMap::new();
    for l in links.values() {
        if matches!(l.kind, LinkKind::Vxlan(_)) && is_derived(&l.name, "vx") {
            fdb.insert(l.name.clone(), host.links.fdb(ns, &l.name)?);
        }
    }
    if stopped() {
        return Ok(None);
    }
    let mut dhcp = BTreeMap::new();
    for name in host.dhcp.list()? {
        if let Some(status) = host.dhcp.status(&name)? {
            dhcp.insert(name, status);
        }
    }
    if stopped() {
        return Ok(None);
    }
    let present = host.links.list_netns()?;
    let mut candidates: BTreeSet<_> = dhcp.keys().cloned().collect();
    candidates.extend(
        desired
            .networks
            .iter()
            .filter_map(|n| n.dhcp.as_ref().map(|d| d.spec.name.clone())),
    );
    // Namespaces of this node's DHCP servers whose server never started are found too.
    candidates.extend(
        present
            .iter()
            .filter(|n| is_dhcp_name_of(&desired.node, n))
            .cloned(),
    );
    let mut dhcp_netns = BTreeMap::new();
    for name in candidates.into_iter().filter(|n| present.contains(n)) {
        let inner = Netns::Named(name.clone());
        let mut contents = NetnsContents::default();
        for l in host.links.links(&inner)? {
            if l.kind == LinkKind::Veth {
                contents
                    .addresses
                    .insert(l.name.clone(), host.links.addresses(&inner, &l.name)?);
            }
            contents.links.insert(l.name.clone(), l);
        }
        dhcp_netns.insert(name, contents);
    }
    let mut routers = BTreeMap::new();
    let mut candidates: BTreeSet<Name> = desired.routers.iter().map(|r| r.name.clone()).collect();
    candidates.extend(
        present
            .iter()
            .filter(|n| is_router_name_of(&desired.node, n))
            .cloned(),
    );
    for name in candidates.into_iter().filter(|n| present.contains(n)) {
        if stopped() {
            return Ok(None);
        }
        let inner = Netns::Named(name.clone());
        let mut c = RouterContents::default();
        for l in host.links.links(&inner)? {
            if l.kind == LinkKind::Veth {
                c.addresses
                    .insert(l.name.clone(), host.links.addresses(&inner, &l.name)?);
            }
            c.links.insert(l.name.clone(), l);
        }
        c.routes = host.links.routes(&inner)?;
        c.forwarding = host.links.forwarding(&inner)?;
        c.nat = host.firewall.read_nat(&name)?;
        routers.insert(name, c);
    }
    if stopped() {
        return Ok(None);
    }
    Ok(Some(ObservedHost {
        links,
        fdb,
        firewall: host.firewall.read()?,
        dhcp,
        dhcp_netns,
        routers,
    }))
}

/// Carries out one step.
///
/// # Errors
/// The driver's.
pub fn execute(host: &Host, op: &Op) -> Result<(), SyncError> {
    let l = &host.links;
    match op {
        Op::ApplyFirewall(r) => host.firewall.apply(r)?,
        Op::UpdateFirewall(u) => host.firewall.update(u)?,
        Op::ClearFirewall => host.firewall.clear()?,
        Op::AddNetns(n) => l.add_netns(n)?,
        Op::DelNetns(n) => l.del_netns(n)?,
        Op::AddBridge(ns, n) => l.add_bridge(ns, n)?,
        Op::AddVxlan(ns, spec) => l.add_vxlan(ns, spec)?,
        Op::AddVlan(ns, spec) => l.add_vlan(ns, spec)?,
        Op::AddVeth(ns, spec) => l.add_veth(ns, spec)?,
        Op::DelLink(ns, n) => l.del_link(ns, n)?,
        Op::SetMaster(ns, n, m) => l.set_master(ns, n, m.as_ref())?,
        Op::AttachPorts(ns, bridge, links) => l.attach(ns, bridge, links)?,
        Op::SetUp(ns, n) => l.set_up(ns, n, true)?,
        Op::SetMtu(ns, n, mtu) => l.set_mtu(ns, n, *mtu)?,
        Op::AddAddress(ns, n, a) => l.add_address(ns, n, *a)?,
        Op::DelAddress(ns, n, a) => l.del_address(ns, n, *a)?,
        Op::SetFdb(ns, n, entries) => l.set_fdb(ns, n, entries)?,
        Op::EnsureDhcp(spec) => host.dhcp.ensure(spec)?,
        Op::RemoveDhcp(n) => host.dhcp.remove(n)?,
        Op::SetMac(ns, n, mac) => l.set_mac(ns, n, *mac)?,
        Op::AddRoute(ns, r) => l.add_route(ns, r)?,
        Op::DelRoute(ns, r) => l.del_route(ns, r)?,
        Op::SetForwarding(ns) => l.set_forwarding(ns, true)?,
        Op::ApplyNat(n, nat) => host.firewall.apply_nat(n, nat)?,
    }
    Ok(())
}

/// What a step did, for an Event.
pub fn describe(op: &Op) -> String {
    match op {
        Op::ApplyFirewall(_) => "applied the nft ruleset".into(),
        Op::UpdateFirewall(u) => {
            let (chains, elements) = u.delta.size();
            format!("applied the nft ruleset ({chains} chains, {elements} set elements changed)")
        }
        Op::ClearFirewall => "removed the nft tables".into(),
        Op::AddNetns(n) => format!("created namespace {n}"),
        Op::DelNetns(n) => format!("deleted namespace {n}"),
        Op::AddBridge(_, n) => format!("created bridge {n}"),
        Op::AddVxlan(_, s) => format!("created VXLAN device {} (VNI {})", s.name, s.vni),
        Op::AddVlan(_, s) => format!(
            "created VLAN sub-interface {} (VLAN {} on {})",
            s.name, s.id, s.parent
        ),
        Op::AddVeth(_, s) => format!("created veth {}", s.name),
        Op::DelLink(_, n) => format!("deleted {n}"),
        Op::SetMaster(_, n, Some(m)) => format!("put {n} on {m}"),
        Op::SetMaster(_, n, None) => format!("took {n} off its bridge"),
        Op::AttachPorts(_, bridge, links) => {
            // An Event names a few; a node of a thousand ports says how many.
            let names: Vec<&str> = links.iter().take(4).map(|a| a.name.as_str()).collect();
            if links.len() > names.len() {
                format!(
                    "put {} ports on {bridge} ({}, …)",
                    links.len(),
                    names.join(", ")
                )
            } else {
                format!("put {} on {bridge}", names.join(", "))
            }
        }
        Op::SetUp(_, n) => format!("set {n} up"),
        Op::SetMtu(_, n, mtu) => format!("set the MTU of {n} to {mtu}"),
        Op::AddAddress(_, n, a) => format!("added {a} to {n}"),
        Op::DelAddress(_, n, a) => format!("removed {a} from {n}"),
        Op::SetFdb(_, n, e) => format!("set the FDB of {n} ({} entries)", e.len()),
        Op::EnsureDhcp(s) => format!("started or reloaded DHCP server {}", s.name),
        Op::RemoveDhcp(n) => format!("stopped DHCP server {n}"),
        Op::SetMac(_, n, mac) => format!("set the MAC of {n} to {mac}"),
        Op::AddRoute(ns, r) => format!("added route {r} in {ns}"),
        Op::DelRoute(ns, r) => format!("removed route {r} in {ns}"),
        Op::SetForwarding(ns) => format!("turned on IPv4 forwarding in {ns}"),
        Op::ApplyNat(n, nat) => format!(
            "applied the NAT of {n} ({} floating addresses)",
            nat.floating.len()
        ),
    }
}

/// Makes the node what `snap` asks of it, and says which of its ports are wired.
///
/// Steps run in [`plan`]'s order. A failed firewall step stops everything after it (no port
/// goes on a bridge unfiltered); any other failed step stops the later steps of its
/// network only. Blocking: run it on the blocking pool.
///
/// # Errors
/// The host could not be read, before or after.
pub fn converge(host: &Host, cfg: &NodeConfig, snap: &Snapshot) -> Result<Report, SyncError> {
    converge_since(host, cfg, snap, None)
}

/// [`converge`], given the ruleset of an earlier converge and its digest
/// ([`Report::firewall`]): the chains of ports whose filter did not change are not rendered
/// again.
///
/// # Errors
/// The host could not be read, before or after.
pub fn converge_since(
    host: &Host,
    cfg: &NodeConfig,
    snap: &Snapshot,
    before: Option<(&Ruleset, &Observed)>,
) -> Result<Report, SyncError> {
    converge_after(host, cfg, snap, before, None)
}

/// [`converge_since`], given also what the last converge without failures aimed at and
/// its [`Report::observed`]: when the state aimed at differs from it in the firewall alone
/// (a security group or its rules changed), the host's links, DHCP servers and namespaces
/// are taken as that converge left them and only the firewall is read, planned and read
/// back. Drift of the rest is not seen then: the caller converges without `seen` on its
/// resync, which reads the whole host. Should the plan want any step beyond the firewall,
/// the host is read whole after all.
///
/// # Errors
/// The host could not be read, before or after.
pub fn converge_after(
    host: &Host,
    cfg: &NodeConfig,
    snap: &Snapshot,
    before: Option<(&Ruleset, &Observed)>,
    seen: Option<(&Desired, &ObservedHost)>,
) -> Result<Report, SyncError> {
    converge_unless(host, cfg, snap, before, seen, &AtomicBool::new(false))
        .map(|r| r.unwrap_or_else(|| unreachable!("nothing sets the stop")))
}

/// [`converge_after`], given up once `stop` is set while it still reads (the host, the
/// ruleset's digest): `None` then, and nothing on the host changed. Once its first step
/// runs, it runs to the end. The agent's resync reads the whole host; a change from the API
/// that comes meanwhile stops it, is converged first, and the resync runs after it.
///
/// # Errors
/// The host could not be read, before or after.
pub fn converge_unless(
    host: &Host,
    cfg: &NodeConfig,
    snap: &Snapshot,
    before: Option<(&Ruleset, &Observed)>,
    seen: Option<(&Desired, &ObservedHost)>,
    stop: &AtomicBool,
) -> Result<Option<Report>, SyncError> {
    let stopped = || stop.load(Ordering::Relaxed);
    let (desired, plans) = desired_all(cfg, snap);
    // The ruleset's digest, rendered once for the plan, the read-back and every port.
    let want = desired.firewall.as_ref().map(|r| r.observed_since(before));
    if stopped() {
        return Ok(None);
    }
    // One batch of link calls: the reads, the steps, the flush and the reads again.
    let _batch = Batch::begin(host.links.as_ref());
    let mut known = seen
        .filter(|(d, _)| firewall_alone(d, &desired))
        .map(|(_, o)| o);
    let mut observed = match known {
        Some(o) => ObservedHost {
            firewall: host.firewall.read()?,
            ..o.clone()
        },
        None => match observe_unless(host, &desired, stop)? {
            Some(o) => o,
            None => return Ok(None),
        },
    };
    let mut steps = plan_with(&desired, want.as_ref(), &observed);
    if known.is_some() && !steps.iter().all(|s| is_firewall(&s.op)) {
        known = None;
        observed = match observe_unless(host, &desired, stop)? {
            Some(o) => o,
            None => return Ok(None),
        };
        steps = plan_with(&desired, want.as_ref(), &observed);
    }
    if stopped() {
        return Ok(None);
    }
    let mut failures: Vec<(Step, String)> = Vec::new();
    let mut firewall_failed = None;
    let mut failed_networks: BTreeMap<IfName, String> = BTreeMap::new();
    let mut failed_routers: BTreeMap<Name, String> = BTreeMap::new();
    for step in &steps {
        if firewall_failed.is_some() {
            break;
        }
        if let Some(n) = &step.network
            && failed_networks.contains_key(n)
        {
            continue;
        }
        if let Some(r) = &step.router
            && failed_routers.contains_key(r)
        {
            continue;
        }
        if let Err(e) = execute(host, &step.op) {
            let msg = format!(
                "{}: {}",
                describe(&step.op),
                stratus_runtime::policy::chain(&e)
            );
            tracing::warn!(error = %msg, "step failed");
            match (&step.op, &step.network, &step.router) {
                (Op::ApplyFirewall(_) | Op::UpdateFirewall(_), _, _) => {
                    firewall_failed = Some(msg.clone());
                }
                (_, Some(n), _) => {
                    failed_networks.insert(n.clone(), msg.clone());
                }
                (_, _, Some(r)) => {
                    failed_routers.insert(r.clone(), msg.clone());
                }
                _ => {}
            }
            failures.push((step.clone(), msg));
        }
    }
    // What the steps held back (an Open vSwitch node's tunnels and flows); failed, no port
    // is known to be wired.
    if let Err(e) = host.links.flush() {
        let msg = format!(
            "write the changes held back: {}",
            stratus_runtime::policy::chain(&e)
        );
        tracing::warn!(error = %msg, "flush failed");
        if let Some(first) = steps.first() {
            failures.push((first.clone(), msg.clone()));
        }
        firewall_failed.get_or_insert(msg);
    }
    let after = if steps.is_empty() {
        observed
    } else if known.is_some() {
        ObservedHost {
            firewall: host.firewall.read()?,
            ..observed
        }
    } else {
        observe(host, &desired)?
    };
    // Whether the filter read back is the one aimed at: the same for every port.
    let firewall_ok: Result<(), String> = match (&want, &after.firewall) {
        (Some(Ok(w)), Some(have)) if w == have => Ok(()),
        (None, None) => Ok(()),
        _ => Err("the node's nft ruleset is not the one planned after the steps".to_owned()),
    };
    let mut ports = BTreeMap::new();
    for (key, p) in plans.ports {
        let state = match p {
            PortPlan::Blocked { reason, message } => PortState::NotWired { reason, message },
            PortPlan::Wire { bridge, device } => wired(&desired, &after, &bridge, &device, |n| {
                firewall_failed
                    .clone()
                    .or_else(|| failed_networks.get(n).cloned())
                    .or_else(|| firewall_ok.clone().err())
            }),
        };
        ports.insert(key, state);
    }
    // What is still to do for each router, read from the host after the steps.
    let left: BTreeSet<Name> = if steps.is_empty() {
        BTreeSet::new()
    } else {
        plan_with(&desired, want.as_ref(), &after)
            .into_iter()
            .filter_map(|s| s.router)
            .collect()
    };
    let mut routers = BTreeMap::new();
    let mut programmed: BTreeSet<Name> = BTreeSet::new();
    for (key, r) in plans.routers {
        let state = if let Some(m) = failed_routers.get(&r.netns) {
            Programmed::No {
                reason: Reason::WiringFailed,
                message: m.clone(),
            }
        } else if left.contains(&r.netns) {
            Programmed::No {
                reason: Reason::WiringFailed,
                message: format!("namespace {} is not as planned after the steps", r.netns),
            }
        } else if !r.pending.is_empty() {
            Programmed::No {
                reason: Reason::RouterPortPending,
                message: r.pending.join("; "),
            }
        } else {
            programmed.insert(r.netns.clone());
            Programmed::Yes {
                reason: Reason::Routed,
                message: format!("in namespace {} on node {}", r.netns, cfg.node),
            }
        };
        routers.insert(key, state);
    }
    let mut floating_ips = BTreeMap::new();
    for (key, f) in plans.floating_ips {
        let state = match f {
            FloatingPlan::Translate { router } if programmed.contains(&router) => Programmed::Yes {
                reason: Reason::Translated,
                message: format!("translated in namespace {router} on node {}", cfg.node),
            },
            FloatingPlan::Translate { router } => Programmed::No {
                reason: Reason::RouterNotReady,
                message: format!("its router (namespace {router}) is not programmed yet"),
            },
            FloatingPlan::Blocked { reason, message } => Programmed::No { reason, message },
        };
        floating_ips.insert(key, state);
    }
    let firewall_in_place = firewall_failed.is_none() && firewall_ok.is_ok();
    let firewall = match want {
        Some(Ok(w)) => Some(w),
        _ => None,
    };
    Ok(Some(Report {
        desired,
        firewall,
        steps,
        failures,
        ports,
        routers,
        floating_ips,
        observed: after,
        firewall_in_place,
    }))
}

/// Once a converge put its filter in place, forgets the tracked connections it no longer
/// allows (the filter accepts established traffic before any rule): those of the ports that
/// lost something since `enforced`, the last filter whose connections were forgotten, or of
/// every port when there is none (at start: the agent may have been down when rules went).
/// `enforced` moves on only once the filter read back is the one aimed at and every
/// connection to forget went, so a converge or a forgetting that failed is tried again from
/// the same filter by the next call.
///
/// # Errors
/// The tracker could not be listed or a connection deleted (every one is tried).
pub fn forget_revoked(
    host: &Host,
    report: &Report,
    enforced: &mut Option<Ruleset>,
) -> Result<(), FirewallError> {
    if !report.firewall_in_place {
        return Ok(());
    }
    let Some(new) = &report.desired.firewall else {
        *enforced = None;
        return Ok(());
    };
    if enforced.as_ref() == Some(new) {
        return Ok(());
    }
    let keep = conntrack::Keep::new(new, enforced.as_ref());
    if !keep.is_empty() {
        host.firewall.forget(&keep)?;
    }
    *enforced = Some(new.clone());
    Ok(())
}

/// Whether `want` differs from `had` in the firewall alone (both have one).
fn firewall_alone(had: &Desired, want: &Desired) -> bool {
    had.firewall.is_some()
        && want.firewall.is_some()
        && had.node == want.node
        && had.netns == want.netns
        && had.networks == want.networks
        && had.routers == want.routers
}

fn is_firewall(op: &Op) -> bool {
    matches!(
        op,
        Op::ApplyFirewall(_) | Op::UpdateFirewall(_) | Op::ClearFirewall
    )
}

/// A batch of link calls ([`Links::begin`]), ended when dropped (also on an early return).
struct Batch<'a>(&'a dyn Links);

impl<'a> Batch<'a> {
    fn begin(links: &'a dyn Links) -> Self {
        links.begin();
        Self(links)
    }
}

impl Drop for Batch<'_> {
    fn drop(&mut self) {
        self.0.end();
    }
}

/// Whether a port is wired on the host as read after the steps.
fn wired(
    desired: &Desired,
    after: &ObservedHost,
    bridge: &IfName,
    device: &IfName,
    failure: impl Fn(&IfName) -> Option<String>,
) -> PortState {
    if let Some(message) = failure(bridge) {
        return PortState::NotWired {
            reason: Reason::WiringFailed,
            message,
        };
    }
    let Some(dev) = after.links.get(device) else {
        return PortState::NotWired {
            reason: Reason::DeviceMissing,
            message: format!("waiting for the port's device {device} to appear on the node"),
        };
    };
    let uplink_ok = desired
        .networks
        .iter()
        .find(|n| n.bridge == *bridge)
        .and_then(|n| after.links.get(n.uplink.name()))
        .is_some_and(|v| v.up && v.master.as_ref() == Some(bridge));
    if dev.up && dev.master.as_ref() == Some(bridge) && uplink_ok {
        PortState::Wired {
            bridge: bridge.clone(),
            device: device.clone(),
        }
    } else {
        PortState::NotWired {
            reason: Reason::WiringFailed,
            message: format!("{device} is not up on bridge {bridge} with its filter in place"),
        }
    }
}

/// How the agent runs on its node.
#[derive(Debug, Clone)]
pub struct Config {
    /// The node.
    pub node: NodeConfig,
    /// How often the host is read back even without a change in the API (drift repair).
    pub resync: Duration,
}

/// How long a watch started for a port that came while the agent ran may take to list
/// before the node is converged without it (a watch the API refuses never lists; the rest
/// of the node must not wait on it forever). Until the agent's first converge there is no
/// such patience: a network already wired that the agent cannot read yet is left alone.
const LIST_PATIENCE: Duration = Duration::from_secs(15);

/// One reflector: its cache, whether it has listed, and its task (stopped when dropped).
struct Watch<K: Resource<DynamicType = ()> + 'static> {
    store: Store<K>,
    listed: Arc<AtomicBool>,
    started: Instant,
    task: tokio::task::AbortHandle,
}

impl<K: Resource<DynamicType = ()> + 'static> Drop for Watch<K> {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl<K> Watch<K>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    /// Starts a reflector of `api` with `cfg`; every change of it wakes `notify`.
    fn start(api: Api<K>, cfg: watcher::Config, notify: Arc<Notify>) -> Self {
        let (store, writer) = reflector::store();
        let listed = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&listed);
        let run =
            reflector::reflector(writer, watcher(api, cfg).default_backoff()).for_each(move |ev| {
                match ev {
                    Ok(watcher::Event::InitDone) => flag.store(true, Ordering::Release),
                    Ok(watcher::Event::Apply(o) | watcher::Event::Delete(o)) => {
                        tracing::debug!(
                            kind = %K::kind(&()),
                            name = o.meta().name.as_deref().unwrap_or_default(),
                            version = o.meta().resource_version.as_deref().unwrap_or_default(),
                            "watched a change"
                        );
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::debug!(kind = %K::kind(&()), error = %e, "watch failed; retrying");
                    }
                }
                notify.notify_one();
                std::future::ready(())
            });
        Self {
            store,
            listed,
            started: Instant::now(),
            task: tokio::spawn(run).abort_handle(),
        }
    }

    fn listed(&self) -> bool {
        self.listed.load(Ordering::Acquire)
    }

    /// Listed, or (when `patient`) given up on.
    fn settled(&self, patient: bool) -> bool {
        self.listed() || (patient && self.started.elapsed() > LIST_PATIENCE)
    }

    /// Waits for the first list, saying so now and then (a watch the API refuses, or an
    /// API server out of reach, would otherwise be a silent hang).
    async fn until_listed(&self) {
        let mut waited = Duration::ZERO;
        while !self.listed() {
            tokio::time::sleep(Duration::from_millis(50)).await;
            waited += Duration::from_millis(50);
            if waited.as_millis().is_multiple_of(10_000) {
                tracing::warn!(kind = %K::kind(&()), ?waited, "still waiting for the first list");
            }
        }
    }
}

/// Watches of `K` in one project each, narrowed by one field selector (`spec.network=NAME`,
/// `metadata.name=NAME`), started and stopped as the node's ports need them: what the node
/// authorizer lets a node read, and no more than the node needs.
struct Watches<K: Resource<DynamicType = ()> + 'static> {
    field: &'static str,
    watches: BTreeMap<(String, String), Watch<K>>,
}

impl<K> Watches<K>
where
    K: Resource<DynamicType = (), Scope = kube::core::NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + Debug
        + Send
        + Sync
        + 'static,
{
    fn new(field: &'static str) -> Self {
        Self {
            field,
            watches: BTreeMap::new(),
        }
    }

    /// Keeps exactly the watches of `wanted` (project, value) running.
    fn set(&mut self, client: &Client, wanted: &BTreeSet<(String, String)>, notify: &Arc<Notify>) {
        self.watches.retain(|k, _| wanted.contains(k));
        for (ns, value) in wanted {
            if !self.watches.contains_key(&(ns.clone(), value.clone())) {
                let cfg = watcher::Config::default().fields(&format!("{}={value}", self.field));
                let w = Watch::start(Api::namespaced(client.clone(), ns), cfg, Arc::clone(notify));
                self.watches.insert((ns.clone(), value.clone()), w);
            }
        }
    }

    fn settled(&self, patient: bool) -> bool {
        self.watches.values().all(|w| w.settled(patient))
    }

    fn state(&self) -> Vec<Arc<K>> {
        self.watches
            .values()
            .flat_map(|w| w.store.state())
            .collect()
    }
}

/// (project, name) pairs: the networks or security groups a node's ports name.
type Named = BTreeSet<(String, String)>;

/// The (project, network) and (project, security group) pairs the ports of `node` name, in
/// either of the views of them: `local` (the node's own watch) and `networks` (its networks'
/// watches, which may deliver a port's change first, or last).
fn followed(local: &[Arc<Port>], networks: &[Arc<Port>], node: &str) -> (Named, Named) {
    let (mut nets, mut groups) = (Named::new(), Named::new());
    for p in local.iter().chain(networks) {
        if p.status.as_ref().and_then(|s| s.hypervisor.as_deref()) != Some(node) {
            continue;
        }
        let ns = p.namespace().unwrap_or_default();
        nets.insert((ns.clone(), p.spec.network.clone()));
        let named = p
            .spec
            .security_groups
            .clone()
            .unwrap_or_else(|| vec![crate::desired::DEFAULT_GROUP.to_owned()]);
        for g in named {
            groups.insert((ns.clone(), g));
        }
    }
    (nets, groups)
}

/// The node's view of the API: its own ports and every Hypervisor, watched all the time; per
/// network of its ports, that network, its subnets and its ports; per security group its
/// ports name, that group.
struct Caches {
    local: Watch<Port>,
    hypervisors: Watch<Hypervisor>,
    ports: Watches<Port>,
    networks: Watches<Network>,
    subnets: Watches<Subnet>,
    groups: Watches<SecurityGroup>,
    /// The Routers placed on the node.
    routers: Watch<Router>,
    /// The network agents' Leases (tunnel addresses).
    leases: Watch<Lease>,
    /// Per router of the node, the FloatingIPs naming it.
    floating_ips: Watches<FloatingIP>,
}

impl Caches {
    fn start(client: &Client, node: &str, notify: &Arc<Notify>) -> Self {
        Self {
            local: Watch::start(
                Api::all(client.clone()),
                watcher::Config::default().fields(&format!("status.hypervisor={node}")),
                Arc::clone(notify),
            ),
            hypervisors: Watch::start(
                Api::all(client.clone()),
                watcher::Config::default(),
                Arc::clone(notify),
            ),
            ports: Watches::new("spec.network"),
            networks: Watches::new("metadata.name"),
            subnets: Watches::new("spec.network"),
            groups: Watches::new("metadata.name"),
            routers: Watch::start(
                Api::all(client.clone()),
                watcher::Config::default().fields(&format!("status.node={node}")),
                Arc::clone(notify),
            ),
            leases: Watch::start(
                Api::namespaced(client.clone(), NETWORK_AGENT_LEASE_NAMESPACE),
                watcher::Config::default(),
                Arc::clone(notify),
            ),
            floating_ips: Watches::new("status.router"),
        }
    }

    /// Starts and stops the per-network and per-group watches for the node's ports now;
    /// whether every one of them has listed (or, when `patient`, been given up on).
    ///
    /// The node's ports are read from both watches that see them, its own and its networks'
    /// (whichever delivered a change first), as [`snapshot`](Self::snapshot) merges them: a
    /// port's new group seen first by its network's watch is waited for too, not read as a
    /// group that does not exist (which would unwire the port until its own watch caught up).
    fn follow(&mut self, client: &Client, node: &str, notify: &Arc<Notify>, patient: bool) -> bool {
        let (nets, groups) = followed(&self.local.store.state(), &self.ports.state(), node);
        let routers: BTreeSet<(String, String)> = self
            .routers
            .store
            .state()
            .iter()
            .filter(|r| r.status.as_ref().and_then(|s| s.node.as_deref()) == Some(node))
            .map(|r| (r.namespace().unwrap_or_default(), r.name_any()))
            .collect();
        self.ports.set(client, &nets, notify);
        self.networks.set(client, &nets, notify);
        self.subnets.set(client, &nets, notify);
        self.groups.set(client, &groups, notify);
        self.floating_ips.set(client, &routers, notify);
        // Routers and Leases are waited for a while even on the first converge (an API
        // server that refuses them must not keep the node's ports from being wired).
        self.ports.settled(patient)
            && self.networks.settled(patient)
            && self.subnets.settled(patient)
            && self.groups.settled(patient)
            && self.floating_ips.settled(patient)
            && self.routers.settled(true)
            && self.leases.settled(true)
    }

    fn snapshot(&self) -> Snapshot {
        let mut ports: BTreeMap<PortKey, Arc<Port>> = BTreeMap::new();
        for p in self
            .local
            .store
            .state()
            .into_iter()
            .chain(self.ports.state())
        {
            ports.insert(PortKey::of(&p), p);
        }
        Snapshot {
            ports: ports.into_values().collect(),
            networks: self.networks.state(),
            subnets: self.subnets.state(),
            hypervisors: self.hypervisors.store.state(),
            groups: self.groups.state(),
            routers: self.routers.store.state(),
            floating_ips: self.floating_ips.state(),
            leases: self.leases.store.state(),
        }
    }
}

/// How often the network agent renews its Lease.
pub const LEASE_RENEW: Duration = Duration::from_secs(5);

/// How long a network agent's Lease lasts unrenewed.
pub const LEASE_DURATION: Duration = Duration::from_secs(20);

/// Renews the node's network-agent Lease (creating it the first time), with its tunnel
/// address and physical networks.
async fn beat(
    client: &Client,
    node: &str,
    tunnel: Option<Ipv4Addr>,
    physical: &[String],
) -> Result<(), kube::Error> {
    let api: Api<Lease> = Api::namespaced(client.clone(), NETWORK_AGENT_LEASE_NAMESPACE);
    let mut annotations = serde_json::Map::new();
    if let Some(ip) = tunnel {
        annotations.insert(TUNNEL_IP_ANNOTATION.into(), json!(ip.to_string()));
    }
    annotations.insert(
        PHYSICAL_NETWORKS_ANNOTATION.into(),
        json!(physical.join(",")),
    );
    let lease = json!({
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {
            "name": node,
            "namespace": NETWORK_AGENT_LEASE_NAMESPACE,
            "annotations": annotations,
        },
        "spec": {
            "holderIdentity": node,
            "leaseDurationSeconds": LEASE_DURATION.as_secs(),
            "renewTime": k8s_openapi::jiff::Timestamp::now().to_string(),
        },
    });
    api.patch(
        node,
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(lease),
    )
    .await?;
    Ok(())
}

/// Renews the Lease every [`LEASE_RENEW`] with the latest tunnel address `tunnel` holds.
async fn heartbeat(
    client: Client,
    node: String,
    physical: Vec<String>,
    tunnel: tokio::sync::watch::Receiver<Option<Ipv4Addr>>,
) {
    let mut tick = tokio::time::interval(LEASE_RENEW);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tick.tick().await;
        let ip = *tunnel.borrow();
        match beat(&client, &node, ip, &physical).await {
            Ok(()) => failing = false,
            Err(e) if !failing => {
                failing = true;
                tracing::warn!(error = %e, "cannot renew the network agent's Lease");
            }
            Err(e) => tracing::debug!(error = %e, "cannot renew the network agent's Lease"),
        }
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Runs the network agent until it is dropped: watches the node's Ports and every
/// Hypervisor, and per network of its ports that Network, its Subnets and Ports, and the
/// SecurityGroups its ports name (all a node may read); converges the node on every change
/// and every `config.resync`; writes the node's ports' status; records repairs of drift as
/// Events; and, given an underlay address, reports it as the node's Hypervisor's
/// `status.hostIP` (when that Hypervisor exists) so that other nodes reach it.
pub async fn run(client: Client, host: Host, config: Config) {
    let notify = Arc::new(Notify::new());
    let node = config.node.node.clone();
    let (tunnel_tx, tunnel_rx) = tokio::sync::watch::channel(config.node.underlay);
    let _heartbeat = AbortOnDrop(
        tokio::spawn(heartbeat(
            client.clone(),
            node.clone(),
            config.node.physical.keys().cloned().collect(),
            tunnel_rx,
        ))
        .abort_handle(),
    );
    let mut caches = Caches::start(&client, &node, &notify);
    // An empty cache would read as "nothing on this node" and tear everything down.
    caches.local.until_listed().await;
    caches.hypervisors.until_listed().await;
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: MANAGER.into(),
            instance: Some(node.clone()),
        },
    );
    let runtime: Runtime<Port> = Runtime::new(client.clone(), MANAGER);
    let routers_rt: Runtime<Router> = Runtime::new(client.clone(), MANAGER);
    let floating_rt: Runtime<FloatingIP> = Runtime::new(client.clone(), MANAGER);
    let mut tick = tokio::time::interval(config.resync);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut converged: Option<Desired> = None;
    // The last ruleset aimed at and its digest, so that the next converge renders only the
    // chains of ports whose filter changed.
    let mut digest: Option<(Ruleset, Observed)> = None;
    // The last filter whose connections were forgotten (see `forget_revoked`): not the one
    // aimed at, which a failed converge or forgetting would have skipped past.
    let mut enforced: Option<Ruleset> = None;
    // What the last converge without failures aimed at and the host it left: a change of
    // the firewall alone reads only the firewall (the resync reads the whole host).
    let mut seen: Option<(Desired, ObservedHost)> = None;
    let mut wired: BTreeSet<IfName> = BTreeSet::new();
    let mut first = true;
    let mut converged_once = false;
    let servers = crate::metadata::Watched::new(client.clone(), &node);
    let mut metadata = crate::metadata::Service::new(servers, node.clone());
    // The floating addresses each router translated when the node was last converged whole;
    // at start, what the routers' tables translate (the agent may have been down when some
    // were taken away).
    let mut floating = None;
    // A resync that gave way to a change from the API (see below) runs right after that
    // change's converge; after four in a row it runs to the end whatever comes meanwhile, so
    // that a stream of changes does not put drift repair off for ever.
    let mut give_way = GiveWay::default();
    loop {
        let mut resync = first;
        if !first {
            if give_way.resync_now() {
                resync = true;
            } else {
                // No settling delay: changes that come during a converge wake one more
                // converge, which takes them all.
                tokio::select! {
                    () = notify.notified() => {}
                    _ = tick.tick() => resync = true,
                }
            }
        }
        first = false;
        give_way.start(resync);
        // After a restart the node is converged only once every network's watch has listed:
        // a network read as absent would have its wiring torn down.
        if !caches.follow(&client, &node, &notify, converged_once) {
            continue;
        }
        converged_once = true;
        let snap = caches.snapshot();
        // Who holds each address, as read now: a port re-bound or an address reused is
        // answered for its new holder before the wiring catches up.
        metadata.set_index(crate::metadata::index(&snap, &node));
        if floating.is_none() {
            let routers: Vec<Name> = snap
                .routers
                .iter()
                .filter_map(|r| r.uid())
                .map(|u| crate::plan::router_name(&node, &u))
                .collect();
            floating = stratus_runtime::blocking(move || conntrack::translated(routers))
                .await
                .ok();
        }
        let (h, cfg, s) = (host.clone(), config.node.clone(), snap.clone());
        let before = digest.take();
        // A resync reads the whole host; what the last converge left is kept should it
        // give way to a change.
        let last = if resync { None } else { seen.take() };
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = Arc::clone(&stop);
        let span = tracing::info_span!("converge", node = %node, resync);
        let began = std::time::Instant::now();
        let mut enf = enforced.take();
        let mut job = tokio::task::spawn_blocking(move || {
            let _g = span.enter();
            let r = converge_unless(
                &h,
                &cfg,
                &s,
                before.as_ref().map(|(r, o)| (r, o)),
                last.as_ref().map(|(d, o)| (d, o)),
                &stop2,
            );
            // With the new filter in place, the connections it no longer allows go.
            let forgot = match &r {
                Ok(Some(report)) => forget_revoked(&h, report, &mut enf)
                    .map_err(|e| stratus_runtime::policy::chain(&e)),
                _ => Ok(()),
            };
            ((r, forgot, enf), before, last)
        });
        // A change from the API that comes while a resync reads the host does not wait
        // for it: the resync stops, the change's converge (which reads only the firewall
        // when that is all it changed) runs first, and the resync after it.
        let done = if give_way.may_yield(resync, seen.is_some()) {
            tokio::select! {
                done = &mut job => done,
                () = notify.notified() => {
                    // A change from the API: the resync gives way if it still reads. The
                    // wake-up is kept for the loop either way.
                    stop.store(true, Ordering::Relaxed);
                    notify.notify_one();
                    (&mut job).await
                }
            }
        } else {
            job.await
        };
        let ((result, forgot, enf), before, last) = match done {
            Ok(d) => d,
            Err(e) => {
                let e = SyncError::from(e);
                tracing::warn!(error = %stratus_runtime::policy::chain(&e), "cannot converge the node");
                continue;
            }
        };
        enforced = enf;
        if let Err(msg) = forgot {
            // Tried again from the same filter until every connection went.
            tracing::warn!(error = %msg, "cannot forget the connections the filter no longer allows");
            let n = Arc::clone(&notify);
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs(1)).await;
                n.notify_one();
            });
        }
        let mut report = match result {
            Ok(Some(r)) => r,
            Ok(None) => {
                tracing::debug!("the resync gave way to a change");
                digest = before;
                seen = last.or(seen);
                give_way.gave_way();
                continue;
            }
            Err(e) => {
                tracing::warn!(error = %stratus_runtime::policy::chain(&e), "cannot converge the node");
                continue;
            }
        };
        give_way.done(resync);
        tracing::debug!(resync, took = ?began.elapsed(), steps = report.steps.len(), "converge ended");
        if !report.steps.is_empty() {
            tracing::info!(
                steps = report.steps.len(),
                failed = report.failures.len(),
                "converged the node"
            );
        }
        // The same aim as the last time everything was right: what changed is the host.
        if converged.as_ref() == Some(&report.desired) && !report.steps.is_empty() {
            repaired(&recorder, &config, &snap, &report, &wired).await;
        }
        converged = report.failures.is_empty().then(|| report.desired.clone());
        seen = report
            .failures
            .is_empty()
            .then(|| (report.desired.clone(), std::mem::take(&mut report.observed)));
        digest = report.desired.firewall.clone().zip(report.firewall.clone());
        wired = report.wired_devices();
        write_statuses(&runtime, &config, &snap, &report).await;
        write_router_statuses(&routers_rt, &floating_rt, &snap, &report).await;
        if report.failures.is_empty() {
            let now = conntrack::floating(report.desired.routers.iter().map(|r| (&r.name, &r.nat)));
            let released = conntrack::released(&floating.take().unwrap_or_default(), &now);
            floating = Some(now);
            let _ = stratus_runtime::blocking(move || {
                for (router, ip) in released {
                    if let Err(e) = conntrack::flush_address(&Netns::Named(router), ip) {
                        tracing::warn!(error = %stratus_runtime::policy::chain(&e), %ip, "cannot forget a floating address's connections");
                    }
                }
            })
            .await;
        }
        let listeners = crate::metadata::wanted(&snap, &report.desired);
        metadata.sync(Arc::clone(&host.links), &listeners).await;
        let tunnel = config
            .node
            .underlay
            .or_else(|| crate::desired::tunnel_address(&snap, &node));
        tunnel_tx.send_if_modified(|t| {
            let changed = *t != tunnel;
            *t = tunnel;
            changed
        });
        if let Some(ip) = config.node.underlay {
            report_host_ip(&client, &node, ip, &snap).await;
        }
    }
}

/// When the agent's resync runs and whether it may give way to a change from the API: a
/// resync that gave way runs right after that change's converge (without waiting for a
/// wake-up); after [`GiveWay::CAP`] in a row it runs to the end whatever comes meanwhile, so
/// that a stream of changes does not put drift repair off for ever.
#[derive(Debug, Default)]
struct GiveWay {
    /// A resync gave way and is still to run.
    due: bool,
    /// The converge just ended was a resync that gave way (the change runs first).
    just: bool,
    /// Resyncs given way in a row.
    yielded: u32,
}

impl GiveWay {
    const CAP: u32 = 4;

    /// Whether the next converge is the resync put off, run without waiting.
    fn resync_now(&self) -> bool {
        self.due && !self.just
    }

    /// A converge (a resync or not) starts.
    fn start(&mut self, resync: bool) {
        self.just = false;
        if resync {
            self.due = false;
        }
    }

    /// Whether this converge may give way to a change that comes while it reads the host
    /// (a resync with a last host reading to fall back on).
    fn may_yield(&self, resync: bool, seen: bool) -> bool {
        resync && seen && self.yielded < Self::CAP
    }

    /// The resync gave way.
    fn gave_way(&mut self) {
        self.due = true;
        self.just = true;
        self.yielded += 1;
    }

    /// A converge ended with a report.
    fn done(&mut self, resync: bool) {
        if resync {
            self.yielded = 0;
        }
    }
}

/// The reference of the Network whose bridge is `bridge`.
fn network_ref(snap: &Snapshot, bridge: &IfName) -> Option<ObjectReference> {
    snap.networks
        .iter()
        .find(|n| {
            n.uid()
                .is_some_and(|u| IfName::derived(crate::driver::Role::Bridge, &u) == *bridge)
        })
        .map(|n| n.object_ref(&()))
}

/// Events for drift repaired: on each Network whose devices were repaired, and on every
/// network of the node when the firewall was.
/// A port's device that was not wired before (a guest's tap that just appeared) is
/// attached for the first time, not repaired.
async fn repaired(
    recorder: &Recorder,
    config: &Config,
    snap: &Snapshot,
    report: &Report,
    wired_before: &BTreeSet<IfName>,
) {
    let ports: BTreeSet<&IfName> = report
        .desired
        .networks
        .iter()
        .flat_map(|n| n.ports.iter())
        .collect();
    let first_time = |n: &IfName| ports.contains(n) && !wired_before.contains(n);
    // What a step repaired, if anything: of the ports it attached, those wired before.
    let repair = |op: &Op| match op {
        Op::SetMaster(_, n, _) | Op::SetUp(_, n) | Op::SetMtu(_, n, _) if first_time(n) => None,
        Op::AttachPorts(ns, bridge, links) => {
            let again: Vec<Attach> = links
                .iter()
                .filter(|a| !first_time(&a.name))
                .cloned()
                .collect();
            (!again.is_empty())
                .then(|| describe(&Op::AttachPorts(ns.clone(), bridge.clone(), again)))
        }
        op => Some(describe(op)),
    };
    // By network and by what was repaired: Events of one kind about one network from one
    // node are counted as one series, so each kind is an action of its own.
    let mut notes: BTreeMap<(IfName, &'static str), Vec<String>> = BTreeMap::new();
    let mut router_notes: BTreeMap<Name, Vec<String>> = BTreeMap::new();
    for s in &report.steps {
        let Some(what) = repair(&s.op) else {
            continue;
        };
        let action = repair_action(&s.op);
        if let Some(r) = &s.router {
            router_notes.entry(r.clone()).or_default().push(what);
            continue;
        }
        match &s.network {
            Some(b) => notes.entry((b.clone(), action)).or_default().push(what),
            None if matches!(s.op, Op::ApplyFirewall(_) | Op::UpdateFirewall(_)) => {
                for n in &report.desired.networks {
                    notes
                        .entry((n.bridge.clone(), action))
                        .or_default()
                        .push(what.clone());
                }
            }
            None => {}
        }
    }
    for ((bridge, action), what) in notes {
        let Some(reference) = network_ref(snap, &bridge) else {
            continue;
        };
        let note = format!(
            "node {} found its wiring changed behind its back and repaired it: {}",
            config.node.node,
            what.join("; ")
        );
        tracing::warn!(%bridge, %note, "repaired drift");
        stratus_runtime::events::publish(
            recorder,
            &reference,
            EventType::Warning,
            action,
            "DriftRepaired",
            note,
        )
        .await;
    }
    repaired_routers(recorder, config, snap, router_notes).await;
}

/// Events for a router's namespace repaired, on the Router.
async fn repaired_routers(
    recorder: &Recorder,
    config: &Config,
    snap: &Snapshot,
    notes: BTreeMap<Name, Vec<String>>,
) {
    for (netns, what) in notes {
        let Some(router) = snap.routers.iter().find(|r| {
            r.uid()
                .is_some_and(|u| crate::plan::router_name(&config.node.node, &u) == netns)
        }) else {
            continue;
        };
        let note = format!(
            "node {} found router namespace {netns} changed behind its back and repaired it: {}",
            config.node.node,
            what.join("; ")
        );
        tracing::warn!(%netns, %note, "repaired drift");
        stratus_runtime::events::publish(
            recorder,
            &router.object_ref(&()),
            EventType::Warning,
            "RepairRouter",
            "DriftRepaired",
            note,
        )
        .await;
    }
}

/// The Event action of a repair: what kind of thing was put back.
fn repair_action(op: &Op) -> &'static str {
    match op {
        Op::ApplyFirewall(_) | Op::UpdateFirewall(_) | Op::ClearFirewall => "RepairFirewall",
        Op::SetFdb(..) => "RepairFDB",
        Op::EnsureDhcp(_) | Op::RemoveDhcp(_) => "RepairDHCP",
        _ => "RepairLinks",
    }
}

/// Each of the node's ports: `Active` with `Ready=True` once wired, else `Down` with
/// `Ready=False` saying why. Only what changed is written.
async fn write_statuses(
    runtime: &Runtime<Port>,
    config: &Config,
    snap: &Snapshot,
    report: &Report,
) {
    for port in &snap.ports {
        let Some(state) = report.ports.get(&PortKey::of(port)) else {
            continue;
        };
        let mut status = port.status.clone().unwrap_or_default();
        let update = match state {
            PortState::Wired { bridge, .. } => {
                status.phase = PortPhase::Active;
                ConditionType::Ready.yes(
                    Reason::Wired,
                    format!("on bridge {bridge} of node {}", config.node.node),
                )
            }
            PortState::NotWired { reason, message } => {
                status.phase = PortPhase::Down;
                ConditionType::Ready.no(*reason, message.clone())
            }
        };
        update.set(&mut status.conditions, port.metadata.generation);
        if let Err(e) = runtime.write_status(port, &status).await {
            tracing::warn!(port = %port.name_any(), error = %e, "cannot write the port's status");
        }
    }
}

/// Each Router placed on the node: `Active` with `Ready=True` once its namespace is
/// programmed, else `Pending` (`Error` when a step failed) with `Ready=False` saying why; each
/// FloatingIP of those routers: `Active` with `Ready=True` once translated, else `Down`.
async fn write_router_statuses(
    routers: &Runtime<Router>,
    floating: &Runtime<FloatingIP>,
    snap: &Snapshot,
    report: &Report,
) {
    let key = |ns: Option<String>, name: String| PortKey {
        namespace: ns.unwrap_or_default(),
        name,
    };
    for r in &snap.routers {
        let Some(state) = report.routers.get(&key(r.namespace(), r.name_any())) else {
            continue;
        };
        let mut status = r.status.clone().unwrap_or_default();
        let update = match state {
            Programmed::Yes { reason, message } => {
                status.phase = NetworkPhase::Active;
                ConditionType::Ready.yes(*reason, message.clone())
            }
            Programmed::No { reason, message } => {
                status.phase = if *reason == Reason::WiringFailed {
                    NetworkPhase::Error
                } else {
                    NetworkPhase::Pending
                };
                ConditionType::Ready.no(*reason, message.clone())
            }
        };
        update.set(&mut status.conditions, r.metadata.generation);
        if let Err(e) = routers.write_status(r, &status).await {
            tracing::warn!(router = %r.name_any(), error = %e, "cannot write the router's status");
        }
    }
    for f in &snap.floating_ips {
        let Some(state) = report.floating_ips.get(&key(f.namespace(), f.name_any())) else {
            continue;
        };
        let mut status = f.status.clone().unwrap_or_default();
        let update = match state {
            Programmed::Yes { reason, message } => {
                status.phase = FloatingIPPhase::Active;
                ConditionType::Ready.yes(*reason, message.clone())
            }
            Programmed::No { reason, message } => {
                status.phase = FloatingIPPhase::Down;
                ConditionType::Ready.no(*reason, message.clone())
            }
        };
        update.set(&mut status.conditions, f.metadata.generation);
        if let Err(e) = floating.write_status(f, &status).await {
            tracing::warn!(floating_ip = %f.name_any(), error = %e, "cannot write the floating IP's status");
        }
    }
}

/// Sets the node's Hypervisor's `status.hostIP` to its underlay address, when it differs.
async fn report_host_ip(client: &Client, node: &str, ip: Ipv4Addr, snap: &Snapshot) {
    let Some(hv) = snap.hypervisors.iter().find(|h| h.name_any() == node) else {
        return;
    };
    let want = ip.to_string();
    if hv.status.as_ref().and_then(|s| s.host_ip.as_deref()) == Some(want.as_str()) {
        return;
    }
    let api: Api<Hypervisor> = Api::all(client.clone());
    let pp = PatchParams {
        field_manager: Some(MANAGER.into()),
        ..Default::default()
    };
    if let Err(e) = api
        .patch_status(
            node,
            &pp,
            &Patch::Merge(json!({"status": {"hostIP": want}})),
        )
        .await
    {
        tracing::warn!(error = %e, "cannot report the node's tunnel address");
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::collections::BTreeSet;
    use std::net::Ipv4Addr;
    use std::sync::Arc;

    use serde_json::json;
    use stratus_api_types::compute::Hypervisor;
    use stratus_api_types::network::{FloatingIP, Network, Port, Router, SecurityGroup, Subnet};

    use super::*;
    use crate::desired::{NETWORK_UID, NodeConfig, Snapshot};
    use crate::driver::fake::{FakeDhcp, FakeFirewall, FakeLinks};
    use crate::driver::nft::Remote;
    use crate::driver::{FdbEntry, MacAddr, Role, VethSpec, VxlanInfo};

    pub(crate) fn network(name: &str, uid: &str, vni: Option<u32>) -> Arc<Network> {
        let mut status = json!({"phase": "Active"});
        if let Some(v) = vni {
            status["vni"] = json!(v);
        }
        Arc::new(
            serde_json::from_value(json!({
                "apiVersion": "network.stratus.dev/v1", "kind": "Network",
                "metadata": {"name": name, "namespace": "demo", "uid": uid},
                "spec": {},
                "status": status,
            }))
            .expect("network"),
        )
    }

    pub(crate) fn subnet(name: &str, network: &str, cidr: &str) -> Arc<Subnet> {
        Arc::new(
            serde_json::from_value(json!({
                "apiVersion": "network.stratus.dev/v1", "kind": "Subnet",
                "metadata": {
                    "name": name, "namespace": "demo", "uid": format!("uid-{name}"),
                    "annotations": {NETWORK_UID: format!("uid-{network}")},
                },
                "spec": {"network": network, "cidr": cidr, "gatewayIP": "10.9.0.1"},
            }))
            .expect("subnet"),
        )
    }

    /// A port of `network` placed on `node` with one address in subnet `sn`.
    pub(crate) fn port(
        name: &str,
        network: &str,
        node: &str,
        mac: &str,
        ip: &str,
        device: Option<&str>,
    ) -> Arc<Port> {
        let mut status = json!({
            "phase": "Pending", "hypervisor": node,
            "fixedIPs": [{"subnet": "sn", "ipAddress": ip}],
        });
        if !mac.is_empty() {
            status["macAddress"] = json!(mac);
        }
        if let Some(d) = device {
            status["interfaceName"] = json!(d);
        }
        Arc::new(
            serde_json::from_value(json!({
                "apiVersion": "network.stratus.dev/v1", "kind": "Port",
                "metadata": {
                    "name": name, "namespace": "demo", "uid": format!("uid-{name}"),
                    "annotations": {NETWORK_UID: format!("uid-{network}")},
                },
                "spec": {"network": network},
                "status": status,
            }))
            .expect("port"),
        )
    }

    /// A port's new security group, seen first by its network's watch while the node's own
    /// still holds the port as it was, is followed (its watch started and waited for)
    /// before the node is converged: not read as a group that does not exist, which
    /// unwired the port until the node's own watch caught up.
    #[test]
    fn a_group_a_port_names_in_either_view_of_it_is_followed() {
        let before = port("p", "net", "n1", "", "10.0.0.5", None);
        let mut after = Port::clone(&before);
        after.spec.security_groups = Some(vec!["quiet".into(), "clients".into()]);
        let elsewhere = port("q", "net", "n2", "", "10.0.0.6", None);
        let (nets, groups) =
            super::followed(&[Arc::clone(&before)], &[Arc::new(after), elsewhere], "n1");
        let pair = |a: &str, b: &str| (a.to_owned(), b.to_owned());
        assert_eq!(nets, [pair("demo", "net")].into());
        assert_eq!(
            groups,
            [
                pair("demo", "clients"),
                pair("demo", "default"),
                pair("demo", "quiet")
            ]
            .into(),
            "the group named by either view, and the default the other names"
        );
        // The other way round (the node's own watch first): the same.
        let mut first = Port::clone(&before);
        first.spec.security_groups = Some(vec!["clients".into()]);
        let (_, groups) = super::followed(&[Arc::new(first)], &[before], "n1");
        assert!(groups.contains(&pair("demo", "clients")));
        assert!(groups.contains(&pair("demo", "default")));
    }

    pub(crate) fn hypervisor(name: &str, ip: &str) -> Arc<Hypervisor> {
        Arc::new(
            serde_json::from_value(json!({
                "apiVersion": "compute.stratus.dev/v1", "kind": "Hypervisor",
                "metadata": {"name": name, "uid": format!("uid-{name}")},
                "spec": {"hypervisorType": "qemu"},
                "status": {"hostIP": ip},
            }))
            .expect("hypervisor"),
        )
    }

    pub(crate) fn group(name: &str, rules: serde_json::Value) -> Arc<SecurityGroup> {
        Arc::new(
            serde_json::from_value(json!({
                "apiVersion": "network.stratus.dev/v1", "kind": "SecurityGroup",
                "metadata": {"name": name, "namespace": "demo", "uid": format!("uid-sg-{name}")},
                "spec": {"rules": rules},
            }))
            .expect("group"),
        )
    }

    /// Network `net` (VNI 5001, DHCP on 10.9.0.0/24); port `p1` on node n1 (device tp-p1)
    /// and `p2` on n2 (192.0.2.2); a default group allowing ICMP in from the group.
    pub(crate) fn snapshot() -> Snapshot {
        Snapshot {
            ports: vec![
                port(
                    "p1",
                    "net",
                    "n1",
                    "02:00:00:00:00:01",
                    "10.9.0.11",
                    Some("tp-p1"),
                ),
                port("p2", "net", "n2", "02:00:00:00:00:02", "10.9.0.12", None),
            ],
            networks: vec![network("net", "uid-net", Some(5001))],
            subnets: vec![subnet("sn", "net", "10.9.0.0/24")],
            hypervisors: vec![hypervisor("n1", "192.0.2.1"), hypervisor("n2", "192.0.2.2")],
            groups: vec![group(
                "default",
                json!([
                    {"direction": "ingress", "protocol": "icmp", "remoteGroup": "default"},
                    {"direction": "egress"},
                ]),
            )],
            ..Snapshot::default()
        }
    }

    pub(crate) fn config() -> NodeConfig {
        NodeConfig {
            node: "n1".into(),
            netns: Netns::Host,
            underlay: None,
            physical: BTreeMap::new(),
        }
    }

    struct Fakes {
        links: Arc<FakeLinks>,
        firewall: Arc<FakeFirewall>,
        dhcp: Arc<FakeDhcp>,
        host: Host,
    }

    fn fakes() -> Fakes {
        let links = Arc::new(FakeLinks::new());
        let firewall = Arc::new(FakeFirewall::new());
        let dhcp = Arc::new(FakeDhcp::new());
        let host = Host {
            links: Arc::clone(&links) as Arc<dyn Links>,
            firewall: Arc::clone(&firewall) as Arc<dyn Firewall>,
            dhcp: Arc::clone(&dhcp) as Arc<dyn Dhcp>,
        };
        Fakes {
            links,
            firewall,
            dhcp,
            host,
        }
    }

    fn ifname(s: &str) -> IfName {
        IfName::new(s).expect("ifname")
    }

    /// What the hypervisor does: the port's device appears.
    fn plug(links: &FakeLinks, device: &str) {
        links
            .add_veth(
                &Netns::Host,
                &VethSpec {
                    name: ifname(device),
                    peer: ifname(&format!("{device}-g")),
                    peer_netns: None,
                },
            )
            .expect("device");
    }

    fn key(name: &str) -> PortKey {
        PortKey {
            namespace: "demo".into(),
            name: name.into(),
        }
    }

    fn state(r: &Report, name: &str) -> PortState {
        r.ports.get(&key(name)).cloned().expect("port state")
    }

    fn not_wired(r: &Report, name: &str) -> Reason {
        match state(r, name) {
            PortState::NotWired { reason, .. } => reason,
            s => panic!("{name} is {s:?}"),
        }
    }

    #[test]
    fn a_port_is_wired_and_a_second_converge_changes_nothing() {
        let f = fakes();
        plug(&f.links, "tp-p1");
        let r = converge(&f.host, &config(), &snapshot()).expect("converge");
        assert!(r.failures.is_empty(), "{:?}", r.failures);
        let bridge = IfName::derived(Role::Bridge, "uid-net");
        assert_eq!(
            state(&r, "p1"),
            PortState::Wired {
                bridge: bridge.clone(),
                device: ifname("tp-p1"),
            }
        );
        assert!(!r.ports.contains_key(&key("p2")), "p2 is another node's");

        let ns = Netns::Host;
        let vx = IfName::derived(Role::Vxlan, "uid-net");
        let vxlan = f.links.link(&ns, &vx).expect("link").expect("vxlan");
        assert_eq!(
            vxlan.kind,
            LinkKind::Vxlan(VxlanInfo {
                vni: 5001,
                local: Some(Ipv4Addr::new(192, 0, 2, 1)),
                port: 4789,
                learning: false,
            })
        );
        assert_eq!(vxlan.master.as_ref(), Some(&bridge));
        let n2 = Ipv4Addr::new(192, 0, 2, 2);
        assert_eq!(
            f.links.fdb(&ns, &vx).expect("fdb"),
            BTreeSet::from([
                FdbEntry {
                    mac: MacAddr::ZERO,
                    remote: n2
                },
                FdbEntry {
                    mac: "02:00:00:00:00:02".parse().expect("mac"),
                    remote: n2
                },
            ])
        );
        let tap = f
            .links
            .link(&ns, &ifname("tp-p1"))
            .expect("link")
            .expect("tap");
        assert!(tap.up && tap.master.as_ref() == Some(&bridge) && tap.mtu == 1450);

        // The filter: p1's MAC and address, ICMP in from the default group's members.
        let ruleset = r.desired.firewall.clone().expect("ruleset");
        assert_eq!(ruleset.ports.len(), 1);
        let p = &ruleset.ports[0];
        assert_eq!(p.ips, BTreeSet::from([Ipv4Addr::new(10, 9, 0, 11)]));
        assert!(p.port_security);
        assert_eq!(ruleset.groups.len(), 1);
        assert_eq!(
            ruleset.groups[0].members,
            BTreeSet::from([Ipv4Addr::new(10, 9, 0, 11), Ipv4Addr::new(10, 9, 0, 12)])
        );
        assert!(matches!(p.ingress[0].remote, Remote::Group(_)));
        assert_eq!(
            f.firewall.read().expect("read"),
            Some(ruleset.observed().expect("observed"))
        );

        // DHCP: only the local port's lease, from the highest free address.
        let servers = f.dhcp.list().expect("list");
        assert_eq!(servers.len(), 1);
        let name = servers.first().expect("server");
        let st = f.dhcp.status(name).expect("status").expect("server");
        assert!(st.pid.is_some());
        assert_eq!(st.leases.len(), 1);
        assert_eq!(st.leases[0].ip, Ipv4Addr::new(10, 9, 0, 11));
        let inner = Netns::Named(name.clone());
        let peer = IfName::derived(Role::VethPeer, "n1/uid-net");
        assert_eq!(
            f.links.addresses(&inner, &peer).expect("addresses"),
            BTreeSet::from(["10.9.0.254/24".parse().expect("cidr")])
        );

        // A restart (a second agent on the same host) changes nothing.
        let applied = f.firewall.applied();
        let again = converge(&f.host, &config(), &snapshot()).expect("converge");
        assert_eq!(again.steps, vec![]);
        assert_eq!(f.firewall.applied(), applied);
        assert_eq!(f.dhcp.reloads(), 0);
    }

    /// The converge loop's state across converges, as `run` keeps it: the digest moves on
    /// to whatever was aimed at, `enforced` only through `forget_revoked`.
    #[derive(Default)]
    struct Loop {
        digest: Option<(Ruleset, Observed)>,
        enforced: Option<Ruleset>,
    }

    impl Loop {
        fn converge(&mut self, f: &Fakes, snap: &Snapshot) -> (Report, Result<(), FirewallError>) {
            let before = self.digest.take();
            let r = converge_since(
                &f.host,
                &config(),
                snap,
                before.as_ref().map(|(r, o)| (r, o)),
            );
            let Ok(r) = r else {
                // `run` logs it and goes on: the digest is gone, `enforced` stays.
                panic!("converge: {r:?}");
            };
            let forgot = forget_revoked(&f.host, &r, &mut self.enforced);
            self.digest = r.desired.firewall.clone().zip(r.firewall.clone());
            (r, forgot)
        }
    }

    /// A rule removed: the connections only it allowed are forgotten once the new filter is
    /// in place, also when that took a converge that failed first, when the first try to
    /// forget failed, and at start (the agent may have been down when the rule went).
    #[test]
    fn a_removed_rule_forgets_its_connections_once_in_place_whatever_failed_before() {
        use crate::driver::conntrack::Connection;
        let f = fakes();
        plug(&f.links, "tp-p1");
        let mut snap = snapshot();
        let zone = desired_all(&config(), &snap)
            .0
            .firewall
            .expect("a filter")
            .zones[0]
            .zone;
        let c = |protocol: u8, src: [u8; 4], dst: [u8; 4]| Connection {
            protocol,
            src: src.into(),
            dst: dst.into(),
            ports: (protocol != 1).then_some((40000, 80)),
            icmp: (protocol == 1).then_some((7, 8, 0)),
        };
        // A ping from p2 (a member: allowed), one from an address no rule allows (it came
        // while the agent was down, before the rule went), and p1's own web request.
        let ping = c(1, [10, 9, 0, 12], [10, 9, 0, 11]);
        let stranger = c(1, [10, 9, 0, 99], [10, 9, 0, 11]);
        let web = c(6, [10, 9, 0, 11], [192, 0, 2, 80]);
        for x in [ping, stranger, web] {
            f.firewall.track(zone, x);
        }
        let mut l = Loop::default();
        // At start: the zone is listed once and what no rule allows goes.
        let (r, forgot) = l.converge(&f, &snap);
        assert!(r.failures.is_empty(), "{:?}", r.failures);
        forgot.expect("forget");
        assert_eq!(f.firewall.tracked(zone), vec![ping, web]);
        assert_eq!(f.firewall.commands().len(), 2, "one listing, one deletion");
        l.converge(&f, &snap).1.expect("forget");
        assert_eq!(f.firewall.commands(), Vec::<String>::new());

        // ICMP in removed; the new filter fails to go in: nothing is forgotten.
        snap.groups[0] = group("default", json!([{"direction": "egress"}]));
        f.firewall.failures.set("update", 1);
        f.firewall.failures.set("apply", 1);
        let (r, forgot) = l.converge(&f, &snap);
        assert!(!r.failures.is_empty());
        forgot.expect("nothing tried");
        assert_eq!(f.firewall.tracked(zone), vec![ping, web]);
        // The retry puts it in, though the digest is already the new filter's; the first
        // deletion fails and is tried again by the next converge, which changes nothing else.
        f.firewall.failures.set("forget_delete", 1);
        let (r, forgot) = l.converge(&f, &snap);
        assert!(r.failures.is_empty(), "{:?}", r.failures);
        assert!(forgot.is_err());
        assert_eq!(f.firewall.tracked(zone), vec![ping, web]);
        let (r, forgot) = l.converge(&f, &snap);
        assert_eq!(r.steps, vec![]);
        forgot.expect("forget");
        assert_eq!(f.firewall.tracked(zone), vec![web]);
        f.firewall.commands();
        l.converge(&f, &snap).1.expect("forget");
        assert_eq!(f.firewall.commands(), Vec::<String>::new());
    }

    /// Network `net` as a vlan network on physnet1 with VLAN ID `id`.
    fn vlan_network(id: Option<u16>) -> Arc<Network> {
        let mut n = (*network("net", "uid-net", None)).clone();
        n.spec.segmentation = stratus_api_types::network::Segmentation::Vlan;
        n.spec.physical_network = Some("physnet1".into());
        n.status
            .get_or_insert_with(Default::default)
            .segmentation_id = id;
        Arc::new(n)
    }

    #[test]
    fn a_vlan_network_is_wired_through_a_sub_interface_made_again_when_deleted() {
        let f = fakes();
        plug(&f.links, "tp-p1");
        plug(&f.links, "eth1");
        let cfg = NodeConfig {
            physical: BTreeMap::from([("physnet1".to_owned(), ifname("eth1"))]),
            ..config()
        };
        let mut snap = snapshot();
        // No VLAN ID yet: nothing wired.
        snap.networks = vec![vlan_network(None)];
        let r = converge(&f.host, &cfg, &snap).expect("converge");
        assert_eq!(not_wired(&r, "p1"), Reason::VniPending);
        snap.networks = vec![vlan_network(Some(100))];
        let r = converge(&f.host, &cfg, &snap).expect("converge");
        let bridge = IfName::derived(Role::Bridge, "uid-net");
        let vl = IfName::derived(Role::Vlan, "uid-net");
        assert!(matches!(state(&r, "p1"), PortState::Wired { .. }));
        let got = f
            .links
            .link(&Netns::Host, &vl)
            .expect("link")
            .expect("vlan");
        assert_eq!(
            (got.kind, got.up, got.master),
            (LinkKind::Vlan(100), true, Some(bridge.clone()))
        );
        // The physical interface is no port of the bridge, and no VXLAN device is made.
        let eth1 = f.links.link(&Netns::Host, &ifname("eth1")).expect("link");
        assert_eq!(eth1.and_then(|l| l.master), None);
        let links = f.links.links(&Netns::Host).expect("links");
        assert!(!links.iter().any(|l| matches!(l.kind, LinkKind::Vxlan(_))));
        // A second converge changes nothing; one after the sub-interface was deleted by
        // hand makes it again.
        assert!(
            converge(&f.host, &cfg, &snap)
                .expect("converge")
                .steps
                .is_empty()
        );
        f.links.del_link(&Netns::Host, &vl).expect("delete by hand");
        let r = converge(&f.host, &cfg, &snap).expect("converge");
        assert!(
            r.steps
                .iter()
                .any(|s| matches!(&s.op, Op::AddVlan(_, v) if v.name == vl && v.id == 100))
        );
        assert!(matches!(state(&r, "p1"), PortState::Wired { .. }));
        // The network gone from the node: the sub-interface goes, the interface stays.
        let r = converge(&f.host, &cfg, &Snapshot::default()).expect("converge");
        assert!(r.desired.networks.is_empty());
        assert_eq!(f.links.link(&Netns::Host, &vl).expect("link"), None);
        assert!(
            f.links
                .link(&Netns::Host, &ifname("eth1"))
                .expect("link")
                .is_some()
        );
    }

    #[test]
    fn a_port_whose_device_is_not_there_yet_waits_for_it() {
        let f = fakes();
        let r = converge(&f.host, &config(), &snapshot()).expect("converge");
        assert_eq!(not_wired(&r, "p1"), Reason::DeviceMissing);
        plug(&f.links, "tp-p1");
        let r = converge(&f.host, &config(), &snapshot()).expect("converge");
        assert!(matches!(state(&r, "p1"), PortState::Wired { .. }));
    }

    #[test]
    fn a_port_that_cannot_be_wired_says_why_and_touches_nothing() {
        type Break = fn(&mut Snapshot);
        let cases: Vec<(Reason, Break)> = vec![
            (Reason::VniPending, |s| {
                s.networks = vec![network("net", "uid-net", None)];
            }),
            (Reason::NetworkNotFound, |s| s.networks.clear()),
            // A vlan network on a physical network this node has no interface for.
            (Reason::PhysicalNetworkUnmapped, |s| {
                s.networks = vec![vlan_network(Some(100))];
            }),
            (Reason::SecurityGroupNotFound, |s| s.groups.clear()),
            (Reason::NoUnderlayAddress, |s| {
                s.hypervisors.retain(|h| h.name_any() != "n1");
            }),
            (Reason::MacAddressPending, |s| {
                s.ports[0] = port("p1", "net", "n1", "", "10.9.0.11", Some("tp-p1"));
            }),
            (Reason::InvalidInterfaceName, |s| {
                s.ports[0] = port(
                    "p1",
                    "net",
                    "n1",
                    "02:00:00:00:00:01",
                    "10.9.0.11",
                    Some("x; rm -rf /"),
                );
            }),
        ];
        for (reason, break_it) in cases {
            let f = fakes();
            plug(&f.links, "tp-p1");
            let mut snap = snapshot();
            break_it(&mut snap);
            let r = converge(&f.host, &config(), &snap).expect("converge");
            assert_eq!(not_wired(&r, "p1"), reason);
            // Nothing but the hypervisor's device is on the host.
            let links = f.links.links(&Netns::Host).expect("links");
            assert!(
                links
                    .iter()
                    .all(|l| l.name.as_str().starts_with("tp-p1") || l.name.as_str() == "lo"),
                "{reason}: {links:?}"
            );
            assert_eq!(f.firewall.read().expect("read"), None, "{reason}");
            assert!(f.dhcp.list().expect("list").is_empty(), "{reason}");
        }
    }

    #[test]
    fn drift_behind_the_agents_back_is_repaired() {
        let f = fakes();
        plug(&f.links, "tp-p1");
        let snap = snapshot();
        let first = converge(&f.host, &config(), &snap).expect("converge");
        let ns = Netns::Host;
        let vx = IfName::derived(Role::Vxlan, "uid-net");
        let fdb = f.links.fdb(&ns, &vx).expect("fdb");

        f.links.set_fdb_behind(&ns, &vx, BTreeSet::new());
        let r = converge(&f.host, &config(), &snap).expect("converge");
        assert_eq!(r.steps.len(), 1);
        assert_eq!(f.links.fdb(&ns, &vx).expect("fdb"), fdb);

        f.links.remove_behind(&ns, &vx);
        f.firewall.tamper(None);
        let name = f
            .dhcp
            .list()
            .expect("list")
            .into_iter()
            .next()
            .expect("server");
        f.dhcp.kill(&name);
        let r = converge(&f.host, &config(), &snap).expect("converge");
        assert!(r.failures.is_empty(), "{:?}", r.failures);
        assert!(matches!(state(&r, "p1"), PortState::Wired { .. }));
        assert_eq!(f.links.fdb(&ns, &vx).expect("fdb"), fdb);
        assert_eq!(
            f.firewall.read().expect("read"),
            Some(
                first
                    .desired
                    .firewall
                    .as_ref()
                    .expect("ruleset")
                    .observed()
                    .expect("observed")
            )
        );
        assert!(
            f.dhcp
                .status(&name)
                .expect("status")
                .is_some_and(|s| s.pid.is_some())
        );
        assert_eq!(
            converge(&f.host, &config(), &snap).expect("converge").steps,
            vec![]
        );
    }

    /// Stopped while it reads the host (a change comes between two reads), a resync gives
    /// up before any step: nothing changed, and the change's converge finds the drift still
    /// to repair.
    #[test]
    fn a_resync_stopped_in_the_middle_of_its_reads_gives_up_before_any_step() {
        let f = fakes();
        plug(&f.links, "tp-p1");
        let snap = snapshot();
        let first = converge(&f.host, &config(), &snap).expect("converge");
        assert!(first.failures.is_empty(), "{:?}", first.failures);
        let ns = Netns::Host;
        let vx = IfName::derived(Role::Vxlan, "uid-net");
        f.links.remove_behind(&ns, &vx);
        let applied = f.firewall.applied();
        // The change comes while the DHCP servers are listed, after the links were read.
        let stop = Arc::new(AtomicBool::new(false));
        let (s2, listed) = (Arc::clone(&stop), Arc::new(AtomicBool::new(false)));
        let l2 = Arc::clone(&listed);
        f.dhcp.on_list(move || {
            l2.store(true, Ordering::Relaxed);
            s2.store(true, Ordering::Relaxed);
        });
        let r = converge_unless(&f.host, &config(), &snap, None, None, &stop).expect("converge");
        assert!(r.is_none(), "{r:?}");
        assert!(listed.load(Ordering::Relaxed), "stopped only once it read");
        assert_eq!(f.links.link(&ns, &vx).expect("link"), None);
        assert_eq!(f.firewall.applied(), applied);
        f.dhcp.on_list(|| {});
        stop.store(false, Ordering::Relaxed);
        let r = converge_unless(&f.host, &config(), &snap, None, None, &stop)
            .expect("converge")
            .expect("not stopped");
        assert!(r.steps.iter().any(|s| matches!(s.op, Op::AddVxlan(..))));
    }

    /// Under a stream of changes, each arriving while the resync reads, the resync gives
    /// way four times in a row, each time running right after the change's converge, and
    /// the fifth runs to the end; then it may give way again.
    #[test]
    fn a_resync_gives_way_four_times_in_a_row_then_runs_to_the_end() {
        let mut g = GiveWay::default();
        // The timer's resync, with a last reading to fall back on.
        let mut log = Vec::new();
        let mut resync = true;
        for _ in 0..12 {
            g.start(resync);
            if g.may_yield(resync, true) {
                // A change came while it read: it gave way.
                g.gave_way();
                log.push("yield");
            } else {
                g.done(resync);
                log.push(if resync { "resync" } else { "change" });
            }
            // Next: the resync put off runs at once, else a change's wake-up.
            resync = g.resync_now();
            if log.len() >= 10 {
                break;
            }
        }
        assert_eq!(
            log,
            [
                "yield", "change", "yield", "change", "yield", "change", "yield", "change",
                "resync", "change"
            ]
        );
        // Ran to the end: the next resync may give way again.
        assert!(g.may_yield(true, true));
        // Without a last reading (after a failure) it never gives way.
        assert!(!g.may_yield(true, false));
    }

    #[test]
    fn a_change_of_the_firewall_alone_reads_only_the_firewall_and_the_resync_reads_the_rest() {
        let f = fakes();
        plug(&f.links, "tp-p1");
        let snap = snapshot();
        let first = converge(&f.host, &config(), &snap).expect("converge");
        assert!(first.failures.is_empty(), "{:?}", first.failures);
        let seen = (first.desired.clone(), first.observed.clone());
        let ns = Netns::Host;
        let vx = IfName::derived(Role::Vxlan, "uid-net");
        // Drift the firewall-only converge does not look for.
        f.links.remove_behind(&ns, &vx);

        let mut changed = snapshot();
        changed.groups = vec![group(
            "default",
            json!([
                {"direction": "ingress", "protocol": "tcp", "portRangeMin": 22, "portRangeMax": 22},
                {"direction": "egress"},
            ]),
        )];
        let r = converge_after(&f.host, &config(), &changed, None, Some((&seen.0, &seen.1)))
            .expect("converge");
        assert!(r.failures.is_empty(), "{:?}", r.failures);
        assert!(
            !r.steps.is_empty() && r.steps.iter().all(|s| is_firewall(&s.op)),
            "{:?}",
            r.steps
        );
        let want = r
            .desired
            .firewall
            .as_ref()
            .expect("ruleset")
            .observed()
            .expect("observed");
        assert_ne!(Some(&want), first.firewall.as_ref(), "the rules changed");
        assert_eq!(f.firewall.read().expect("read"), Some(want));
        assert_eq!(
            f.links.link(&ns, &vx).expect("link"),
            None,
            "links not read"
        );
        assert!(matches!(state(&r, "p1"), PortState::Wired { .. }));

        // The resync reads the whole host and repairs the drift.
        let r = converge_after(&f.host, &config(), &changed, None, None).expect("converge");
        assert!(
            r.steps.iter().any(|s| matches!(s.op, Op::AddVxlan(..))),
            "{:?}",
            r.steps
        );
        assert!(f.links.link(&ns, &vx).expect("link").is_some());

        // A change of more than the firewall (another port on the node) reads the host.
        f.links.remove_behind(&ns, &vx);
        let seen = (r.desired.clone(), r.observed.clone());
        plug(&f.links, "tp-p3");
        let mut more = changed.clone();
        more.ports.push(port(
            "p3",
            "net",
            "n1",
            "02:00:00:00:00:03",
            "10.9.0.13",
            Some("tp-p3"),
        ));
        let r = converge_after(&f.host, &config(), &more, None, Some((&seen.0, &seen.1)))
            .expect("converge");
        assert!(r.failures.is_empty(), "{:?}", r.failures);
        assert!(
            r.steps.iter().any(|s| matches!(s.op, Op::AddVxlan(..))),
            "{:?}",
            r.steps
        );
        assert!(matches!(state(&r, "p3"), PortState::Wired { .. }));
    }

    #[test]
    fn a_failed_firewall_keeps_the_port_off_the_bridge_until_it_passes() {
        let f = fakes();
        plug(&f.links, "tp-p1");
        f.firewall.failures.set("apply", 1);
        let r = converge(&f.host, &config(), &snapshot()).expect("converge");
        assert_eq!(not_wired(&r, "p1"), Reason::WiringFailed);
        let tap = f.links.link(&Netns::Host, &ifname("tp-p1")).expect("link");
        assert_eq!(tap.and_then(|t| t.master), None, "no port unfiltered");

        let r = converge(&f.host, &config(), &snapshot()).expect("converge");
        assert!(matches!(state(&r, "p1"), PortState::Wired { .. }));
    }

    #[test]
    fn a_failed_flush_leaves_no_port_reported_wired_and_is_retried() {
        let f = fakes();
        plug(&f.links, "tp-p1");
        f.links.failures.set("flush", 1);
        let r = converge(&f.host, &config(), &snapshot()).expect("converge");
        assert_eq!(not_wired(&r, "p1"), Reason::WiringFailed);
        assert_eq!(r.failures.len(), 1);
        assert!(r.failures[0].1.contains("flush"), "{:?}", r.failures);
        let r = converge(&f.host, &config(), &snapshot()).expect("converge");
        assert!(matches!(state(&r, "p1"), PortState::Wired { .. }));
        assert!(r.failures.is_empty(), "{:?}", r.failures);
    }

    #[test]
    fn a_failed_link_step_is_reported_and_retried() {
        let f = fakes();
        plug(&f.links, "tp-p1");
        f.links.failures.set("add_vxlan", 1);
        let r = converge(&f.host, &config(), &snapshot()).expect("converge");
        assert_eq!(not_wired(&r, "p1"), Reason::WiringFailed);
        assert_eq!(r.failures.len(), 1);
        let r = converge(&f.host, &config(), &snapshot()).expect("converge");
        assert!(matches!(state(&r, "p1"), PortState::Wired { .. }));
        // A host that cannot even be read is an error of the whole converge.
        f.links.failures.set("links", 1);
        assert!(converge(&f.host, &config(), &snapshot()).is_err());
    }

    #[test]
    fn everything_deleted_leaves_nothing_behind() {
        let f = fakes();
        plug(&f.links, "tp-p1");
        converge(&f.host, &config(), &snapshot()).expect("converge");
        let mut snap = snapshot();
        snap.ports.clear();
        let r = converge(&f.host, &config(), &snap).expect("converge");
        assert!(r.failures.is_empty(), "{:?}", r.failures);
        let left: Vec<String> = f
            .links
            .links(&Netns::Host)
            .expect("links")
            .into_iter()
            .map(|l| l.name.to_string())
            .collect();
        assert_eq!(
            left,
            vec!["lo", "tp-p1", "tp-p1-g"],
            "only the hypervisor's device"
        );
        assert_eq!(f.firewall.read().expect("read"), None);
        assert!(f.dhcp.list().expect("list").is_empty());
        assert!(f.links.list_netns().expect("netns").is_empty());
        assert_eq!(
            converge(&f.host, &config(), &snap).expect("converge").steps,
            vec![]
        );
    }

    /// `snapshot()` plus router `r1` of project demo on n1: an interface on `sn` (port
    /// `rp-in`, 10.9.0.1) and a gateway on the flat external network `ext` of project admin
    /// (port `admin/rp-gw`, 203.0.113.2, gateway .1), SNAT on; FloatingIP `f1`
    /// (203.0.113.10 → p1's 10.9.0.11).
    pub(crate) fn router_snapshot() -> Snapshot {
        let mut snap = snapshot();
        let obj = |v: serde_json::Value| v;
        snap.networks.push(Arc::new(
            serde_json::from_value(obj(json!({
                "apiVersion": "network.stratus.dev/v1", "kind": "Network",
                "metadata": {"name": "ext", "namespace": "admin", "uid": "uid-ext"},
                "spec": {"external": true, "segmentation": "flat",
                         "physicalNetwork": "physnet1", "mtu": 1500},
                "status": {"phase": "Active"},
            })))
            .expect("network"),
        ));
        snap.subnets.push(Arc::new(
            serde_json::from_value(json!({
                "apiVersion": "network.stratus.dev/v1", "kind": "Subnet",
                "metadata": {"name": "ext-sn", "namespace": "admin", "uid": "uid-ext-sn",
                             "annotations": {NETWORK_UID: "uid-ext"}},
                "spec": {"network": "ext", "cidr": "203.0.113.0/24",
                         "gatewayIP": "203.0.113.1", "enableDHCP": false},
            }))
            .expect("subnet"),
        ));
        snap.ports.push(port(
            "rp-in",
            "net",
            "n1",
            "02:00:00:00:0a:01",
            "10.9.0.1",
            None,
        ));
        snap.ports.push(Arc::new(
            serde_json::from_value(json!({
                "apiVersion": "network.stratus.dev/v1", "kind": "Port",
                "metadata": {"name": "rp-gw", "namespace": "admin", "uid": "uid-rp-gw",
                             "annotations": {NETWORK_UID: "uid-ext"}},
                "spec": {"network": "ext", "portSecurityEnabled": false},
                "status": {"phase": "Pending", "hypervisor": "n1",
                           "macAddress": "02:00:00:00:0a:02",
                           "fixedIPs": [{"subnet": "ext-sn", "ipAddress": "203.0.113.2"}]},
            }))
            .expect("port"),
        ));
        snap.routers.push(Arc::new(
            serde_json::from_value(json!({
                "apiVersion": "network.stratus.dev/v1", "kind": "Router",
                "metadata": {"name": "r1", "namespace": "demo", "uid": "uid-r1"},
                "spec": {"externalGateway": {"network": "admin/ext"},
                         "interfaces": [{"subnet": "sn"}]},
                "status": {"node": "n1", "externalGatewayPort": "admin/rp-gw",
                           "externalGatewayIPs": ["203.0.113.2"],
                           "interfaces": [{"subnet": "sn", "ipAddress": "10.9.0.1",
                                           "port": "rp-in"}]},
            }))
            .expect("router"),
        ));
        snap.floating_ips
            .push(floating("f1", "203.0.113.10", "10.9.0.11"));
        snap
    }

    pub(crate) fn floating(name: &str, floating: &str, fixed: &str) -> Arc<FloatingIP> {
        Arc::new(
            serde_json::from_value(json!({
                "apiVersion": "network.stratus.dev/v1", "kind": "FloatingIP",
                "metadata": {"name": name, "namespace": "demo", "uid": format!("uid-{name}")},
                "spec": {"floatingNetwork": "admin/ext", "port": "p1"},
                "status": {"phase": "Down", "floatingIPAddress": floating,
                           "fixedIP": fixed, "router": "r1"},
            }))
            .expect("floating ip"),
        )
    }

    fn router_config() -> NodeConfig {
        NodeConfig {
            physical: BTreeMap::from([("physnet1".to_owned(), ifname("eth1"))]),
            ..config()
        }
    }

    fn router_key(name: &str) -> PortKey {
        key(name)
    }

    #[test]
    fn a_router_is_programmed_with_its_floating_ip_and_a_second_converge_changes_nothing() {
        let f = fakes();
        plug(&f.links, "tp-p1");
        plug(&f.links, "eth1");
        let snap = router_snapshot();
        let r = converge(&f.host, &router_config(), &snap).expect("converge");
        assert!(r.failures.is_empty(), "{:?}", r.failures);
        assert!(
            matches!(
                r.routers.get(&router_key("r1")),
                Some(Programmed::Yes {
                    reason: Reason::Routed,
                    ..
                })
            ),
            "{:?}",
            r.routers
        );
        assert!(
            matches!(
                r.floating_ips.get(&key("f1")),
                Some(Programmed::Yes {
                    reason: Reason::Translated,
                    ..
                })
            ),
            "{:?}",
            r.floating_ips
        );
        assert!(matches!(state(&r, "rp-in"), PortState::Wired { .. }));
        let gw_key = PortKey {
            namespace: "admin".into(),
            name: "rp-gw".into(),
        };
        assert!(matches!(
            r.ports.get(&gw_key),
            Some(PortState::Wired { .. })
        ));

        let name = crate::plan::router_name("n1", "uid-r1");
        let inner = Netns::Named(name.clone());
        assert!(f.links.list_netns().expect("netns").contains(&name));
        let links = f.links.links(&inner).expect("links");
        let by_mac = |m: &str| {
            let mac: MacAddr = m.parse().expect("mac");
            links
                .iter()
                .find(|l| l.mac == Some(mac))
                .cloned()
                .expect("link with the port's MAC")
        };
        let (qr, qg) = (by_mac("02:00:00:00:0a:01"), by_mac("02:00:00:00:0a:02"));
        assert!(qr.name.as_str().starts_with("qr-") && qr.up && qr.mtu == 1450);
        assert!(qg.name.as_str().starts_with("qg-") && qg.up && qg.mtu == 1500);
        let cidr = |s: &str| s.parse::<crate::driver::Ipv4Cidr>().expect("cidr");
        assert_eq!(
            f.links.addresses(&inner, &qr.name).expect("addresses"),
            BTreeSet::from([cidr("10.9.0.1/24")])
        );
        assert_eq!(
            f.links.addresses(&inner, &qg.name).expect("addresses"),
            BTreeSet::from([cidr("203.0.113.2/24"), cidr("203.0.113.10/32")])
        );
        assert_eq!(
            f.links.routes(&inner).expect("routes"),
            BTreeSet::from([crate::driver::RouteSpec::new(
                cidr("0.0.0.0/0"),
                Ipv4Addr::new(203, 0, 113, 1)
            )])
        );
        assert!(f.links.forwarding(&inner).expect("forwarding"));
        let want = crate::driver::Nat {
            gateway: Some(qg.name.clone()),
            floating: vec![crate::driver::nft::FloatingNat {
                floating: Ipv4Addr::new(203, 0, 113, 10),
                fixed: Ipv4Addr::new(10, 9, 0, 11),
            }],
            snat: vec![crate::driver::nft::Snat {
                source: cidr("10.9.0.0/24"),
                to: Ipv4Addr::new(203, 0, 113, 2),
            }],
        };
        assert_eq!(
            f.firewall.read_nat(&name).expect("nat"),
            Some(want.observed().expect("observed"))
        );
        // The physical interface is the external network's uplink; the router ports are
        // veths on their networks' bridges, unfiltered.
        let eth1 = f
            .links
            .link(&Netns::Host, &ifname("eth1"))
            .expect("link")
            .expect("eth1");
        assert_eq!(eth1.master, Some(IfName::derived(Role::Bridge, "uid-ext")));
        let fw = r.desired.firewall.clone().expect("ruleset");
        assert_eq!(fw.ports.len(), 1, "the guest's filter only");
        // The external network with no guest has no DHCP server; the tenant's one has.
        assert_eq!(f.dhcp.list().expect("list").len(), 1);

        let again = converge(&f.host, &router_config(), &snap).expect("converge");
        assert_eq!(again.steps, vec![], "a restart changes nothing");
    }

    #[test]
    fn a_route_through_another_address_of_the_external_network_is_not_programmed() {
        let f = fakes();
        plug(&f.links, "tp-p1");
        plug(&f.links, "eth1");
        let mut snap = router_snapshot();
        let mut r1: Router = (*snap.routers[0]).clone();
        r1.spec.routes = serde_json::from_value(json!([
            {"destination": "10.20.0.0/24", "nexthop": "203.0.113.7"},
            {"destination": "198.51.100.0/24", "nexthop": "203.0.113.1"},
        ]))
        .expect("routes");
        snap.routers[0] = Arc::new(r1);
        let r = converge(&f.host, &router_config(), &snap).expect("converge");
        let cidr = |s: &str| s.parse::<crate::driver::Ipv4Cidr>().expect("cidr");
        let inner = Netns::Named(crate::plan::router_name("n1", "uid-r1"));
        let routes = f.links.routes(&inner).expect("routes");
        assert!(routes.contains(&crate::driver::RouteSpec::new(
            cidr("198.51.100.0/24"),
            Ipv4Addr::new(203, 0, 113, 1)
        )));
        assert!(
            !routes.iter().any(|r| r.destination == cidr("10.20.0.0/24")),
            "{routes:?}"
        );
        assert!(
            matches!(r.routers.get(&router_key("r1")), Some(Programmed::No { message, .. }) if message.contains("203.0.113.7")),
            "{:?}",
            r.routers
        );
    }

    #[test]
    fn router_drift_is_repaired_and_snat_and_floating_ips_follow_the_api() {
        let f = fakes();
        plug(&f.links, "tp-p1");
        plug(&f.links, "eth1");
        let mut snap = router_snapshot();
        converge(&f.host, &router_config(), &snap).expect("converge");
        let name = crate::plan::router_name("n1", "uid-r1");
        let inner = Netns::Named(name.clone());
        let qg = f
            .links
            .links(&inner)
            .expect("links")
            .into_iter()
            .find(|l| l.name.as_str().starts_with("qg-"))
            .expect("gateway");
        let fip: crate::driver::Ipv4Cidr = "203.0.113.10/32".parse().expect("cidr");
        f.links.del_address_behind(&inner, &qg.name, fip);
        f.firewall.tamper_nat(&name, None);
        let r = converge(&f.host, &router_config(), &snap).expect("converge");
        assert!(r.failures.is_empty(), "{:?}", r.failures);
        assert!(
            r.steps.iter().all(|s| s.router.as_ref() == Some(&name)),
            "{:?}",
            r.steps
        );
        assert!(
            f.links
                .addresses(&inner, &qg.name)
                .expect("addresses")
                .contains(&fip)
        );
        assert!(f.firewall.read_nat(&name).expect("nat").is_some());
        assert_eq!(
            converge(&f.host, &router_config(), &snap)
                .expect("converge")
                .steps,
            vec![]
        );

        // The forward filter's drop of what comes in by the gateway deleted by hand: the
        // table is applied again, whole.
        let whole = f.firewall.read_nat(&name).expect("nat").expect("table");
        let mut holed = whole.clone();
        holed
            .chains
            .get_mut("ip/forward")
            .expect("forward chain")
            .pop()
            .expect("a drop rule");
        f.firewall.tamper_nat(&name, Some(holed));
        let r = converge(&f.host, &router_config(), &snap).expect("converge");
        assert!(
            r.steps
                .iter()
                .any(|s| matches!(s.op, crate::plan::Op::ApplyNat(..))),
            "{:?}",
            r.steps
        );
        assert_eq!(f.firewall.read_nat(&name).expect("nat"), Some(whole));

        // The floating IP goes: its address and its rules with it. SNAT off: no SNAT rule.
        snap.floating_ips.clear();
        let mut r1: Router = (*snap.routers[0]).clone();
        if let Some(g) = r1.spec.external_gateway.as_mut() {
            g.enable_snat = false;
        }
        snap.routers[0] = Arc::new(r1);
        let r = converge(&f.host, &router_config(), &snap).expect("converge");
        assert!(r.failures.is_empty(), "{:?}", r.failures);
        assert!(
            !f.links
                .addresses(&inner, &qg.name)
                .expect("addresses")
                .contains(&fip)
        );
        let want = crate::driver::Nat {
            gateway: Some(qg.name.clone()),
            ..Default::default()
        };
        assert_eq!(
            f.firewall.read_nat(&name).expect("nat"),
            Some(want.observed().expect("observed"))
        );

        // A floating IP whose fixed address is on none of the router's subnets is refused,
        // and the router stays programmed.
        snap.floating_ips
            .push(floating("f2", "203.0.113.11", "192.168.7.7"));
        let r = converge(&f.host, &router_config(), &snap).expect("converge");
        assert!(matches!(
            r.routers.get(&key("r1")),
            Some(Programmed::Yes { .. })
        ));
        assert!(
            matches!(r.floating_ips.get(&key("f2")), Some(Programmed::No { reason: Reason::RouterNotReady, message }) if message.contains("192.168.7.7")),
            "{:?}",
            r.floating_ips
        );
    }

    #[test]
    fn a_router_moved_away_leaves_nothing_behind() {
        let f = fakes();
        plug(&f.links, "tp-p1");
        plug(&f.links, "eth1");
        let mut snap = router_snapshot();
        converge(&f.host, &router_config(), &snap).expect("converge");
        // The routers controller moves it, and its ports, to n2.
        let mut r1: Router = (*snap.routers[0]).clone();
        if let Some(st) = r1.status.as_mut() {
            st.node = Some("n2".into());
        }
        snap.routers[0] = Arc::new(r1);
        for p in snap.ports.iter_mut() {
            if p.name_any().starts_with("rp-") {
                let mut q: Port = (**p).clone();
                if let Some(st) = q.status.as_mut() {
                    st.hypervisor = Some("n2".into());
                }
                *p = Arc::new(q);
            }
        }
        let r = converge(&f.host, &router_config(), &snap).expect("converge");
        assert!(r.failures.is_empty(), "{:?}", r.failures);
        assert!(r.routers.is_empty() && r.floating_ips.is_empty());
        let names: Vec<_> = f.links.list_netns().expect("netns").into_iter().collect();
        assert!(
            names.iter().all(|n| !n.as_str().starts_with("qrouter-")),
            "{names:?}"
        );
        let left: Vec<String> = f
            .links
            .links(&Netns::Host)
            .expect("links")
            .into_iter()
            .map(|l| l.name.to_string())
            .filter(|n| n.starts_with("ve-") || n.starts_with("br-"))
            .collect();
        // The tenant network's bridge and DHCP veth stay (p1 is still here); the external
        // network's bridge and both router veths are gone.
        assert_eq!(left.len(), 2, "{left:?}");
        let eth1 = f
            .links
            .link(&Netns::Host, &ifname("eth1"))
            .expect("link")
            .expect("eth1");
        assert_eq!(
            eth1.master, None,
            "the physical interface is left, off any bridge"
        );
    }

    #[test]
    fn a_router_port_not_on_the_node_and_a_flat_network_without_interface_say_why() {
        let f = fakes();
        plug(&f.links, "tp-p1");
        let snap = router_snapshot();
        // No --physical-interface for physnet1.
        let r = converge(&f.host, &config(), &snap).expect("converge");
        let gw_key = PortKey {
            namespace: "admin".into(),
            name: "rp-gw".into(),
        };
        assert!(
            matches!(
                r.ports.get(&gw_key),
                Some(PortState::NotWired {
                    reason: Reason::PhysicalNetworkUnmapped,
                    ..
                })
            ),
            "{:?}",
            r.ports.get(&gw_key)
        );
        match r.routers.get(&key("r1")) {
            Some(Programmed::No {
                reason: Reason::RouterPortPending,
                message,
            }) => {
                assert!(
                    message.contains("admin/rp-gw") && message.contains("physnet1"),
                    "{message}"
                );
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            r.floating_ips.get(&key("f1")),
            Some(Programmed::No { .. })
        ));
        // The interface on the tenant subnet is programmed all the same.
        assert!(matches!(state(&r, "rp-in"), PortState::Wired { .. }));
    }

    #[test]
    fn port_security_off_and_address_pairs_shape_the_filter() {
        let mut snap = snapshot();
        let mut p: Port = (*snap.ports[0]).clone();
        p.spec.allowed_address_pairs = serde_json::from_value(json!([
            {"ipAddress": "10.9.0.100"}, {"ipAddress": "10.9.0.0/24"}
        ]))
        .expect("pairs");
        snap.ports[0] = Arc::new(p.clone());
        let (d, _) = crate::desired::desired(&config(), &snap);
        let f = &d.firewall.expect("ruleset").ports[0];
        assert_eq!(
            f.ips,
            BTreeSet::from([Ipv4Addr::new(10, 9, 0, 11), Ipv4Addr::new(10, 9, 0, 100)]),
            "a single address is allowed, a whole prefix is not"
        );

        p.spec.port_security_enabled = Some(false);
        snap.ports[0] = Arc::new(p);
        snap.groups.clear();
        let (d, plans) = crate::desired::desired(&config(), &snap);
        assert!(matches!(plans.get(&key("p1")), Some(PortPlan::Wire { .. })));
        assert!(!d.firewall.expect("ruleset").ports[0].port_security);
    }
}
