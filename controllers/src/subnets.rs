//! The subnets controller: each Subnet's `status.usedIPs` and `status.availableIPs`, counted
//! from what holds its addresses, as Neutron's IP availability counts them: its gateway and
//! DHCP server addresses (claimed for it by IPAM at its create), the fixed IPs the Ports of its
//! Network hold on it, and the addresses FloatingIPs of its Network hold in its CIDR.
//!
//! Ports and FloatingIPs belong to the Network whose uid they carry (the
//! `network.stratus.dev/network-uid` annotation IPAM sets), as the claims do, so a Network made
//! again under an old name counts nothing of the old one's. The counts follow the objects that
//! hold the claims (IPAM writes a Port's addresses in the transaction that claims them), so they
//! are exact once the controller has seen every change.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::sync::Arc;

use futures::StreamExt;
use kube::api::Api;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use stratus_api_types::network::{FloatingIP, Port, Subnet};
use stratus_runtime::policy::kube_retry;
use stratus_runtime::{Classify, Retry, Runtime};

/// The field manager of the subnets controller's status writes.
const MANAGER: &str = "stratus-subnets-controller";

/// The annotation IPAM sets on Subnets, Ports and FloatingIPs: the uid of their Network.
const NETWORK_UID: &str = "network.stratus.dev/network-uid";

/// Why a reconcile failed, and whether retrying can help.
#[derive(Debug, thiserror::Error)]
pub enum SubnetsError {
    /// A request to the API server failed.
    #[error("request to the API server")]
    Api(#[source] kube::Error),
}

impl Classify for SubnetsError {
    fn retry(&self) -> Retry {
        match self {
            Self::Api(e) => kube_retry(e),
        }
    }
}

/// How many of a subnet's addresses are held, and how many of its pools' are free.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    /// Addresses of the subnet held (gateway, DHCP server, ports, floating IPs).
    pub used: u64,
    /// Addresses of the allocation pools no one holds.
    pub available: u64,
}

fn network_uid(meta: &kube::api::ObjectMeta) -> Option<&str> {
    meta.annotations
        .as_ref()
        .and_then(|a| a.get(NETWORK_UID))
        .map(String::as_str)
}

/// The subnet's CIDR as (network address, broadcast address), IPv4 only.
fn range(subnet: &Subnet) -> Option<(u32, u32)> {
    let (addr, prefix) = subnet.spec.cidr.split_once('/')?;
    let addr: Ipv4Addr = addr.parse().ok()?;
    let prefix: u32 = prefix.parse().ok().filter(|p| *p <= 32)?;
    let mask = u32::MAX.checked_shl(32 - prefix).unwrap_or(0);
    let net = u32::from(addr) & mask;
    Some((net, net | !mask))
}

/// The allocation pools as inclusive ranges: the spec's, or every host address but the
/// gateway's.
fn pools(subnet: &Subnet, (net, broadcast): (u32, u32), gateway: Option<u32>) -> Vec<(u32, u32)> {
    if !subnet.spec.allocation_pools.is_empty() {
        return subnet
            .spec
            .allocation_pools
            .iter()
            .filter_map(|p| {
                let a = u32::from(p.start.parse::<Ipv4Addr>().ok()?);
                let b = u32::from(p.end.parse::<Ipv4Addr>().ok()?);
                (a <= b).then_some((a, b))
            })
            .collect();
    }
    if broadcast <= net + 1 {
        return Vec::new();
    }
    let (first, last) = (net + 1, broadcast - 1);
    match gateway.filter(|g| (first..=last).contains(g)) {
        Some(g) => [(first, g.wrapping_sub(1)), (g + 1, last)]
            .into_iter()
            .filter(|(a, b)| a <= b && *a >= first && *b <= last)
            .collect(),
        None => vec![(first, last)],
    }
}

fn addr(s: &str) -> Option<u32> {
    s.parse::<Ipv4Addr>().ok().map(u32::from)
}

/// What holds `subnet`'s addresses among `ports` and `fips` (all of them; only those of its
/// Network count), and what is left of its pools. `None` for a subnet this controller cannot
/// count (not IPv4, or not admitted by IPAM).
pub fn usage(subnet: &Subnet, ports: &[Arc<Port>], fips: &[Arc<FloatingIP>]) -> Option<Usage> {
    let uid = network_uid(&subnet.metadata)?;
    let (net, broadcast) = range(subnet)?;
    let name = subnet.name_any();
    let ns = subnet.namespace();
    let status = subnet.status.as_ref();
    let gateway = status.and_then(|s| s.gateway_ip.as_deref()).and_then(addr);
    let dhcp = status.and_then(|s| s.dhcp_ip.as_deref()).and_then(addr);
    let mut held: BTreeSet<u32> = gateway.into_iter().chain(dhcp).collect();
    for p in ports {
        if p.namespace() != ns || network_uid(&p.metadata) != Some(uid) {
            continue;
        }
        let fixed = p.status.iter().flat_map(|s| &s.fixed_ips);
        held.extend(
            fixed
                .filter(|f| f.subnet == name)
                .filter_map(|f| addr(&f.ip_address)),
        );
    }
    for f in fips {
        if network_uid(&f.metadata) != Some(uid) {
            continue;
        }
        held.extend(
            f.status
                .as_ref()
                .and_then(|s| s.floating_ip_address.as_deref())
                .and_then(addr),
        );
    }
    held.retain(|a| (net..=broadcast).contains(a));
    let pools = pools(subnet, (net, broadcast), gateway);
    let in_pools = |a: &u32| pools.iter().any(|(s, e)| (s..=e).contains(&a));
    let size: u64 = pools.iter().map(|(a, b)| u64::from(b - a) + 1).sum();
    let taken = held.iter().filter(|a| in_pools(a)).count() as u64;
    Some(Usage {
        used: held.len() as u64,
        available: size.saturating_sub(taken),
    })
}

struct Ctx {
    runtime: Runtime<Subnet>,
    ports: Store<Port>,
    fips: Store<FloatingIP>,
}

async fn reconcile(subnet: Arc<Subnet>, ctx: Arc<Ctx>) -> Result<Action, SubnetsError> {
    let result = sync(&subnet, &ctx).await;
    ctx.runtime.finish(&subnet, result).await
}

async fn sync(subnet: &Subnet, ctx: &Ctx) -> Result<Action, SubnetsError> {
    if subnet.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    // Counted only from complete lists: a partial one would report addresses as free.
    stratus_runtime::store_ready(&ctx.ports).await;
    stratus_runtime::store_ready(&ctx.fips).await;
    let Some(u) = usage(subnet, &ctx.ports.state(), &ctx.fips.state()) else {
        return Ok(Action::await_change());
    };
    let mut status = subnet.status.clone().unwrap_or_default();
    if status.used_ips == Some(u.used) && status.available_ips == Some(u.available) {
        return Ok(Action::await_change());
    }
    status.used_ips = Some(u.used);
    status.available_ips = Some(u.available);
    ctx.runtime
        .write_status(subnet, &status)
        .await
        .map_err(SubnetsError::Api)?;
    Ok(Action::await_change())
}

fn error_policy(subnet: Arc<Subnet>, e: &SubnetsError, ctx: Arc<Ctx>) -> Action {
    ctx.runtime.error_policy(&subnet, e)
}

/// The Subnets of `store` on the Network of uid `uid`.
fn of_network(store: &Store<Subnet>, uid: Option<&str>) -> Vec<ObjectRef<Subnet>> {
    let Some(uid) = uid else {
        return Vec::new();
    };
    store
        .state()
        .into_iter()
        .filter(|s| network_uid(&s.metadata) == Some(uid))
        .map(|s| ObjectRef::from_obj(&*s))
        .collect()
}

/// Runs the subnets controller until its watches end.
pub async fn run(client: Client) {
    let controller = Controller::new(
        Api::<Subnet>::all(client.clone()),
        watcher::Config::default(),
    );
    let subnets = controller.store();
    let (ports, port_writer) = reflector::store();
    let port_stream = watcher(Api::<Port>::all(client.clone()), watcher::Config::default())
        .default_backoff()
        .reflect(port_writer)
        .touched_objects();
    let (fips, fip_writer) = reflector::store();
    let fip_stream = watcher(
        Api::<FloatingIP>::all(client.clone()),
        watcher::Config::default(),
    )
    .default_backoff()
    .reflect(fip_writer)
    .touched_objects();
    let ctx = Arc::new(Ctx {
        runtime: Runtime::new(client, MANAGER),
        ports,
        fips,
    });
    let (for_ports, for_fips) = (subnets.clone(), subnets);
    controller
        // A port's create, delete or addresses change its network's subnets' counts.
        .watches_stream(port_stream, move |p: Port| {
            of_network(&for_ports, network_uid(&p.metadata))
        })
        .watches_stream(fip_stream, move |f: FloatingIP| {
            of_network(&for_fips, network_uid(&f.metadata))
        })
        .run(reconcile, error_policy, ctx)
        .for_each(|_| async {})
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn subnet(spec: serde_json::Value, status: serde_json::Value) -> Subnet {
        serde_json::from_value(json!({
            "apiVersion": "network.stratus.dev/v1", "kind": "Subnet",
            "metadata": {"name": "s", "namespace": "demo",
                         "annotations": {NETWORK_UID: "net-1"}},
            "spec": spec, "status": status,
        }))
        .expect("a subnet")
    }

    fn port(ns: &str, uid: &str, ips: &[(&str, &str)]) -> Arc<Port> {
        let fixed: Vec<_> = ips
            .iter()
            .map(|(s, ip)| json!({"subnet": s, "ipAddress": ip}))
            .collect();
        Arc::new(
            serde_json::from_value(json!({
                "apiVersion": "network.stratus.dev/v1", "kind": "Port",
                "metadata": {"name": "p", "namespace": ns, "annotations": {NETWORK_UID: uid}},
                "spec": {"network": "n"},
                "status": {"fixedIPs": fixed},
            }))
            .expect("a port"),
        )
    }

    fn fip(uid: &str, ip: &str) -> Arc<FloatingIP> {
        Arc::new(
            serde_json::from_value(json!({
                "apiVersion": "network.stratus.dev/v1", "kind": "FloatingIP",
                "metadata": {"name": "f", "namespace": "other", "annotations": {NETWORK_UID: uid}},
                "spec": {"floatingNetwork": "ops/ext"},
                "status": {"floatingIPAddress": ip},
            }))
            .expect("a floating IP"),
        )
    }

    #[test]
    fn a_subnet_counts_its_gateway_dhcp_server_ports_and_floating_ips() {
        let s = subnet(
            json!({"network": "n", "cidr": "10.0.0.0/24",
                   "allocationPools": [{"start": "10.0.0.10", "end": "10.0.0.19"}]}),
            json!({"gatewayIP": "10.0.0.1", "dhcpIP": "10.0.0.10"}),
        );
        let ports = [
            port("demo", "net-1", &[("s", "10.0.0.11"), ("t", "10.1.0.5")]),
            // The router interface holds the gateway: counted once.
            port("demo", "net-1", &[("s", "10.0.0.1")]),
            // Another network's port (same CIDR), and one of another namespace: not this one's.
            port("demo", "net-2", &[("s", "10.0.0.12")]),
            port("else", "net-1", &[("s", "10.0.0.13")]),
        ];
        let fips = [fip("net-1", "10.0.0.15"), fip("net-2", "10.0.0.16")];
        assert_eq!(
            usage(&s, &ports, &fips),
            Some(Usage {
                used: 4,
                available: 7
            }),
            "gateway, DHCP server, one port's address and one floating IP; 10 in the pool, 3 held"
        );
        assert_eq!(
            usage(&s, &[], &[]),
            Some(Usage {
                used: 2,
                available: 9
            })
        );
    }

    #[test]
    fn without_pools_every_host_address_but_the_gateway_is_the_pool() {
        let s = subnet(
            json!({"network": "n", "cidr": "10.0.0.0/29", "enableDHCP": false}),
            json!({"gatewayIP": "10.0.0.1"}),
        );
        // 6 host addresses, the gateway's not in the pool.
        assert_eq!(
            usage(&s, &[port("demo", "net-1", &[("s", "10.0.0.3")])], &[]),
            Some(Usage {
                used: 2,
                available: 4
            })
        );
        let middle = subnet(
            json!({"network": "n", "cidr": "10.0.0.0/29", "gatewayIP": "10.0.0.4"}),
            json!({"gatewayIP": "10.0.0.4", "dhcpIP": "10.0.0.1"}),
        );
        assert_eq!(
            usage(&middle, &[], &[]),
            Some(Usage {
                used: 2,
                available: 4
            })
        );
    }

    #[test]
    fn a_subnet_ipam_did_not_admit_or_not_ipv4_is_not_counted() {
        let mut s = subnet(json!({"network": "n", "cidr": "10.0.0.0/24"}), json!({}));
        s.metadata.annotations = None;
        assert_eq!(usage(&s, &[], &[]), None);
        let v6 = subnet(json!({"network": "n", "cidr": "fd00::/64"}), json!({}));
        assert_eq!(usage(&v6, &[], &[]), None);
    }
}
