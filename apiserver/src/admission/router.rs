//! Routers and floating IPs at admission: a Router's spec checked against the Subnets and
//! Networks it names (each refusal a 422 naming the field), and a FloatingIP's address
//! allocated from its external Network in the create's transaction, as IPAM allocates a
//! Port's ([`super::network`]).
//!
//! # External networks
//! A Router's `spec.externalGateway.network` and a FloatingIP's `spec.floatingNetwork` name a
//! Network with `external: true` (which only cluster admins make): `NAME` in their own
//! namespace, or `NAMESPACE/NAME` for one the operator shares from another
//! ([`NETWORK_REF_PATTERN`](stratus_api_types::network::NETWORK_REF_PATTERN)). Any other
//! Network is refused (422), so no project reaches into another's tenant networks.
//!
//! # Floating IPs
//! The address is claimed on the external Network's uid (the FloatingIP records it in the
//! Network uid annotation, as a Port does), in the transaction that creates the FloatingIP,
//! and freed in its delete's: no two floating IPs or ports ever share one. No free address in
//! the network's subnets: 409 on `spec.floatingNetwork`. The address and the network are never
//! changed after.
//!
//! # Routers
//! Each interface names a Subnet of the router's namespace that has a gateway address (the
//! router's address on it), at most one per Network, their CIDRs disjoint and none on an
//! external Network (that is the gateway's job); a static route's next hop is a host address
//! of an attached subnet (not the router's own) or the gateway of the external network's (the
//! upstream router: any other address there may be another project's). A write that leaves the spec as it was
//! (a finalizer, a label) is not checked again: what it names may have gone since.

use std::net::Ipv4Addr;

use serde_json::{Map, Value, json};
use stratus_api_types::network::{FloatingIPSpec, RouterSpec, network_ref};

use super::network::{
    GROUP, Plan, RETRIES, conflict_field, create_guards, invalid, ipv4, not_found_field, pick,
    set_annotation, set_status, show, snapshot, spec, stored_plan, subnets_on, too_busy,
};
use crate::admission::{Admission, Change, Ctx, Subject, Written, quota};
use crate::base::error::{ApiError, ApiResult, Cause};
use crate::base::meta;
use crate::storage::keys;
use crate::storage::store::{Guard, Read, Stored, Write};
use futures::future::BoxFuture;

/// Router validation at admission: registered for Routers, before quota (whose write it
/// makes once the spec passes).
#[derive(Debug)]
pub struct Routers;

impl Admission for Routers {
    fn initial_status(&self) -> Option<Value> {
        Some(json!({"phase": "Pending"}))
    }

    fn write<'a>(
        &'a self,
        ctx: Ctx<'a>,
        s: Subject<'a>,
        w: Change<'a>,
    ) -> Option<BoxFuture<'a, ApiResult<Written>>> {
        let ns = s.namespace?;
        Some(Box::pin(async move {
            let changed = w
                .old
                .is_none_or(|(o, _)| o.get("spec") != w.new.get("spec"));
            if changed {
                check_router(ctx, &s, ns, w.new).await?;
            }
            match quota::Quota.write(ctx, s, w) {
                Some(write) => write.await,
                None => Err(ApiError::internal("routers are counted by quota")),
            }
        }))
    }
}

/// A Network a reference names, read as stored: `None` when it does not exist.
async fn read_network(
    ctx: Ctx<'_>,
    ns: &str,
    reference: &str,
) -> ApiResult<(String, Option<Stored>)> {
    let (net_ns, name) = network_ref(ns, reference);
    let key = keys::object(ctx.prefix, GROUP, "networks", Some(net_ns), name);
    let found = ctx.store.get(&key).await.map_err(ApiError::from)?;
    Ok((key, found))
}

/// Why `network` (as `reference` names it from namespace `ns`) cannot be an external gateway
/// or floating network. A network of another namespace that is missing and one that is there
/// but not external get the same answer: a tenant learns nothing of another project's private
/// networks, not even whether one of that name exists.
fn not_external(ns: &str, reference: &str, network: Option<&Stored>) -> Option<Cause> {
    let external = network
        .is_some_and(|n| n.value.pointer("/spec/external").and_then(Value::as_bool) == Some(true));
    if external {
        return None;
    }
    let (net_ns, _) = network_ref(ns, reference);
    if net_ns != ns {
        return Some(Cause {
            reason: "FieldValueNotFound".into(),
            message: format!("Not found: there is no external network {reference:?}"),
            field: String::new(),
        });
    }
    match network {
        None => Some(Cause {
            reason: "FieldValueNotFound".into(),
            message: format!("Not found: network {reference:?} does not exist"),
            field: String::new(),
        }),
        Some(_) => Some(Cause::invalid(
            "",
            format!(
                "Invalid value: {reference:?}: network {reference:?} is not external (spec.external); only an external network gives routers gateways and floating IPs"
            ),
        )),
    }
}

/// A CIDR's network address and prefix length, or why not.
fn cidr(v: &str) -> Result<(u32, u8), String> {
    let (addr, len) = v
        .split_once('/')
        .ok_or_else(|| format!("Invalid value: {v:?}: not a CIDR"))?;
    let a = ipv4(addr)?;
    let len: u8 = len
        .parse()
        .ok()
        .filter(|l| *l <= 32)
        .ok_or_else(|| format!("Invalid value: {v:?}: a prefix length is 0 to 32"))?;
    let mask = u32::MAX.checked_shl(u32::from(32 - len)).unwrap_or(0);
    if a & !mask != 0 {
        return Err(format!(
            "Invalid value: {v:?}: the host bits must be zero (did you mean {}/{len}?)",
            show(a & mask)
        ));
    }
    Ok((a, len))
}

/// Checks a Router's spec against what its namespace holds now (see the module's
/// documentation).
///
/// # Errors
/// 422 naming every field at fault.
async fn check_router(ctx: Ctx<'_>, s: &Subject<'_>, ns: &str, obj: &Value) -> ApiResult<()> {
    let spec: RouterSpec = spec(s, obj)?;
    let subnets_prefix = keys::collection(ctx.prefix, GROUP, "subnets", Some(ns));
    let networks_prefix = keys::collection(ctx.prefix, GROUP, "networks", Some(ns));
    let (got, _) = ctx
        .store
        .read_many(&[
            Read::Prefix(&subnets_prefix),
            Read::Prefix(&networks_prefix),
        ])
        .await
        .map_err(ApiError::from)?;
    let (subnets, networks) = (&got[0], &got[1]);
    let network_named = |name: &str| {
        networks
            .iter()
            .map(|(_, n)| &n.value)
            .find(|n| meta::meta_str(n, "name") == Some(name))
    };
    let mut causes = Vec::new();
    // Each interface: (index, subnet, network, plan).
    let mut attached: Vec<(usize, &str, &str, Plan)> = Vec::new();
    for (i, iface) in spec.interfaces.iter().enumerate() {
        let field = format!("spec.interfaces[{i}].subnet");
        let name = iface.subnet.as_str();
        let Some(subnet) = subnets
            .iter()
            .map(|(_, v)| &v.value)
            .find(|v| meta::meta_str(v, "name") == Some(name))
        else {
            causes.push(Cause {
                reason: "FieldValueNotFound".into(),
                message: format!("Not found: subnet {name:?} does not exist in this namespace"),
                field,
            });
            continue;
        };
        if let Some((j, ..)) = attached.iter().find(|(_, n, ..)| *n == name) {
            causes.push(Cause {
                reason: "FieldValueDuplicate".into(),
                message: format!("Duplicate value: {name:?} is spec.interfaces[{j}] already"),
                field,
            });
            continue;
        }
        let Some(plan) = stored_plan(subnet) else {
            causes.push(Cause::invalid(
                field,
                format!("Invalid value: {name:?}: subnet {name:?} is not one a router can use"),
            ));
            continue;
        };
        let network = subnet
            .pointer("/spec/network")
            .and_then(Value::as_str)
            .unwrap_or_default();
        if plan.gateway.is_none() {
            causes.push(Cause::invalid(
                field,
                format!(
                    "Invalid value: {name:?}: subnet {name:?} has no gateway address (disableGateway), which a router interface takes"
                ),
            ));
            continue;
        }
        if network_named(network)
            .is_some_and(|n| n.pointer("/spec/external").and_then(Value::as_bool) == Some(true))
        {
            causes.push(Cause::invalid(
                field,
                format!(
                    "Invalid value: {name:?}: subnet {name:?} is on external network {network:?}; a router reaches an external network through spec.externalGateway"
                ),
            ));
            continue;
        }
        if let Some((j, other, ..)) = attached.iter().find(|(_, _, n, _)| *n == network) {
            causes.push(Cause::invalid(
                field,
                format!(
                    "Invalid value: {name:?}: on network {network:?}, as subnet {other:?} of spec.interfaces[{j}]; a router has one interface per network"
                ),
            ));
            continue;
        }
        if let Some((j, other, _, p)) = attached.iter().find(|(.., p)| p.overlaps(&plan)) {
            causes.push(Cause::invalid(
                field,
                format!(
                    "Invalid value: {name:?}: its CIDR {} overlaps {} of subnet {other:?} (spec.interfaces[{j}])",
                    plan.cidr(),
                    p.cidr()
                ),
            ));
            continue;
        }
        attached.push((i, name, network, plan));
    }
    // The external network, and its subnets' plans (a route's next hop may be on them).
    let mut external: Vec<Plan> = Vec::new();
    if let Some(gw) = &spec.external_gateway {
        let (_, found) = read_network(ctx, ns, &gw.network).await?;
        match not_external(ns, &gw.network, found.as_ref()) {
            Some(mut c) => {
                c.field = "spec.externalGateway.network".into();
                causes.push(c);
            }
            None => {
                let (net_ns, name) = network_ref(ns, &gw.network);
                let uid = found
                    .as_ref()
                    .and_then(|n| meta::meta_str(&n.value, "uid"))
                    .unwrap_or_default();
                let prefix = keys::collection(ctx.prefix, GROUP, "subnets", Some(net_ns));
                let page = ctx
                    .store
                    .list(&prefix, None, 0, 0)
                    .await
                    .map_err(ApiError::from)?;
                external = subnets_on(&page.items, name, uid)
                    .filter_map(|(_, v)| stored_plan(v))
                    .collect();
                if let Some(p) = external
                    .iter()
                    .find(|e| attached.iter().any(|(.., a)| a.overlaps(e)))
                {
                    causes.push(Cause::invalid(
                        "spec.externalGateway.network",
                        format!(
                            "Invalid value: {:?}: its subnet {} overlaps a subnet the router has an interface on",
                            gw.network,
                            p.cidr()
                        ),
                    ));
                }
            }
        }
    }
    for (i, route) in spec.routes.iter().enumerate() {
        if let Err(m) = cidr(&route.destination) {
            causes.push(Cause::invalid(format!("spec.routes[{i}].destination"), m));
        }
        let internal: Vec<&Plan> = attached.iter().map(|(.., p)| p).collect();
        match ipv4(&route.nexthop).and_then(|a| nexthop(a, &internal, &external)) {
            Ok(()) => {}
            Err(m) => causes.push(Cause::invalid(format!("spec.routes[{i}].nexthop"), m)),
        }
    }
    if causes.is_empty() {
        Ok(())
    } else {
        Err(invalid(s, obj, causes))
    }
}

/// Whether a static route may go through `a`, given the router's interfaces' subnets and its
/// external network's: a host address of an interface's subnet other than the router's own
/// (its gateway address there), or the gateway of an external subnet (the upstream router).
/// Any other address on the external network may be another project's router or guest: a
/// route through it would send this project's traffic, from the router's gateway address,
/// into what is not its own.
fn nexthop(a: u32, internal: &[&Plan], external: &[Plan]) -> Result<(), String> {
    if internal.iter().any(|p| p.host(a) && p.gateway != Some(a))
        || external.iter().any(|p| p.gateway == Some(a))
    {
        return Ok(());
    }
    let shown = show(a);
    if let Some(p) = external.iter().find(|p| p.contains(a)) {
        return Err(match p.gateway {
            Some(g) => format!(
                "Invalid value: {shown:?}: on the external network {} a next hop can only be its gateway {} (the upstream router), not another address there",
                p.cidr(),
                show(g)
            ),
            None => format!(
                "Invalid value: {shown:?}: the external network's subnet {} has no gateway, so no route goes through it",
                p.cidr()
            ),
        });
    }
    Err(format!(
        "Invalid value: {shown:?}: not a host address of any subnet the router is attached to (other than its own address)"
    ))
}

/// Creates a FloatingIP with an address of its external network, claimed in the same
/// transaction (see the module's documentation).
pub(crate) async fn create_floating_ip(
    ctx: Ctx<'_>,
    s: Subject<'_>,
    ns: &str,
    w: Change<'_>,
) -> ApiResult<Written> {
    let spec: FloatingIPSpec = spec(&s, w.new)?;
    let field = "spec.floatingNetwork";
    let (net_ns, net_name) = network_ref(ns, &spec.floating_network);
    let net_key = keys::object(ctx.prefix, GROUP, "networks", Some(net_ns), net_name);
    let subnets = keys::collection(ctx.prefix, GROUP, "subnets", Some(net_ns));
    for _ in 0..RETRIES {
        let quota = quota::check(ctx, s, ns, w).await?;
        let snap = snapshot(ctx, &w, &[Read::Key(&net_key), Read::Prefix(&subnets)]).await?;
        if let Some(done) = snap.settled(&w) {
            return Ok(done);
        }
        let read = snap.more[0].first();
        if let Some(mut c) = not_external(ns, &spec.floating_network, read.map(|(_, n)| n)) {
            c.field = field.into();
            return Err(invalid(&s, w.new, vec![c]));
        }
        let Some((_, net)) = read else {
            return Err(not_found_field(&s, w.new, field, "Not found".into()));
        };
        if net.value.pointer("/metadata/deletionTimestamp").is_some() {
            return Err(conflict_field(
                &s,
                w.new,
                field,
                format!("network {:?} is being deleted", spec.floating_network),
            ));
        }
        let (uid, net_rev) = (
            meta::meta_str(&net.value, "uid").unwrap_or_default(),
            net.mod_revision,
        );
        let on_network: Vec<(&str, Plan, &(String, Stored))> = snap.more[1]
            .iter()
            .filter(|(_, v)| {
                v.value.pointer("/spec/network").and_then(Value::as_str) == Some(net_name)
                    && super::network::annotation(&v.value) == Some(uid)
            })
            .filter_map(|kv| {
                let p = stored_plan(&kv.1.value)?;
                Some((super::network::name_of(&kv.1.value), p, kv))
            })
            .collect();
        let mut chosen = None;
        for (name, plan, kv) in &on_network {
            if let Some(a) = pick(ctx, uid, plan, &Default::default()).await? {
                chosen = Some((*name, a, *kv));
                break;
            }
        }
        let Some((_, address, (subnet_key, subnet))) = chosen else {
            let size: u64 = on_network.iter().map(|(_, p, _)| p.size()).sum();
            return Err(conflict_field(
                &s,
                w.new,
                field,
                format!(
                    "network {:?} has no free address for a floating IP: all {size} addresses of its subnets' allocation pools are allocated",
                    spec.floating_network
                ),
            ));
        };
        let mut obj = w.new.clone();
        set_annotation(&mut obj, uid);
        set_status(
            &mut obj,
            Map::from_iter([
                ("phase".into(), json!("Down")),
                ("floatingIPAddress".into(), json!(show(address))),
            ]),
        );
        let claim = keys::ip_claim(ctx.prefix, uid, Ipv4Addr::from(address));
        let holder = json!({
            "floatingip": format!("{ns}/{}", super::network::name_of(w.new)),
            "uid": meta::meta_str(w.new, "uid").unwrap_or_default(),
        });
        let mut guards = create_guards(w.key, snap.parent(&w), &quota);
        guards.push(Guard::Revision(&net_key, net_rev));
        guards.push(Guard::Revision(subnet_key, subnet.mod_revision));
        guards.push(Guard::Absent(&claim));
        if let Some(rev) = ctx
            .store
            .write_many(&guards, &[(w.key, &obj), (&claim, &holder)], &[])
            .await
            .map_err(ApiError::from)?
        {
            return Ok(Written {
                write: Write::Done(rev),
                stored: Some(obj),
            });
        }
        // The address went to another object meanwhile, or the network, project or quota
        // count moved: read again.
    }
    Err(too_busy(&s, w.new))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_route_destination_is_a_cidr_with_its_host_bits_zero() {
        assert_eq!(cidr("0.0.0.0/0"), Ok((0, 0)));
        assert_eq!(cidr("10.1.0.0/16"), Ok((0x0a01_0000, 16)));
        assert!(cidr("10.1.0.1/16").is_err_and(|m| m.contains("10.1.0.0/16")));
        assert!(cidr("10.1.0.0").is_err());
        assert!(cidr("10.1.0.0/33").is_err());
        assert!(cidr("fd00::/64").is_err_and(|m| m.contains("IPv6")));
    }

    #[test]
    fn a_route_goes_through_a_neighbour_inside_or_the_upstream_router_only() {
        let ip = |v: &str| ipv4(v).expect("address");
        let inside = Plan {
            network: ip("10.0.0.0"),
            prefix: 24,
            gateway: Some(ip("10.0.0.1")),
            pools: vec![],
        };
        let outside = Plan {
            network: ip("203.0.113.0"),
            prefix: 24,
            gateway: Some(ip("203.0.113.1")),
            pools: vec![],
        };
        let cases = [
            ("10.0.0.9", Ok(())),
            ("203.0.113.1", Ok(())),
            ("10.0.0.1", Err("not a host address")),
            ("10.0.0.255", Err("not a host address")),
            ("192.168.0.1", Err("not a host address")),
            ("203.0.113.7", Err("only be its gateway 203.0.113.1")),
            ("203.0.113.0", Err("only be its gateway 203.0.113.1")),
        ];
        for (hop, want) in cases {
            let got = nexthop(ip(hop), &[&inside], std::slice::from_ref(&outside));
            match (want, got) {
                (Ok(()), Ok(())) => {}
                (Err(w), Err(m)) => assert!(m.contains(w) && m.contains(hop), "{hop}: {m}"),
                (w, g) => panic!("{hop}: want {w:?}, got {g:?}"),
            }
        }
        let no_gateway = Plan {
            gateway: None,
            ..outside
        };
        let m = nexthop(ip("203.0.113.1"), &[], &[no_gateway]).expect_err("refused");
        assert!(m.contains("has no gateway"), "{m}");
    }

    #[test]
    fn only_an_external_network_serves_gateways_and_floating_ips() {
        let stored = |external: bool| Stored {
            value: json!({"spec": {"external": external}}),
            mod_revision: 1,
        };
        assert!(not_external("demo", "ext", Some(&stored(true))).is_none());
        assert!(not_external("demo", "ops/ext", Some(&stored(true))).is_none());
        let c = not_external("demo", "n", Some(&stored(false))).expect("refused");
        assert_eq!(c.reason, "FieldValueInvalid");
        assert!(c.message.contains("not external"), "{}", c.message);
        let c = not_external("demo", "n", None).expect("refused");
        assert_eq!(c.reason, "FieldValueNotFound");
        // Another project's network: missing or private, the same answer.
        let missing = not_external("demo", "acme/secret", None).expect("refused");
        let private = not_external("demo", "acme/secret", Some(&stored(false))).expect("refused");
        assert_eq!(missing, private);
        assert_eq!(missing.reason, "FieldValueNotFound");
        assert!(
            !private.message.contains("not external"),
            "{}",
            private.message
        );
        // Naming one's own namespace in full is one's own network.
        let own = not_external("demo", "demo/n", Some(&stored(false))).expect("refused");
        assert_eq!(own.reason, "FieldValueInvalid");
    }
}
