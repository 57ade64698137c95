//! StoragePools at admission: a storage address (`status.storageAddress`, where a node
//! serves its volumes' NBD exports and where compute nodes' QEMU connects) is one node's, and
//! only in a storage network the operator granted.
//!
//! # Guarantees
//! - A pool's storage address is claimed (`{prefix}/_claims/storage-address/{ip}/{pool}`,
//!   naming the pool's node) in the transaction that records it or moves it, and freed in the
//!   one that moves it again or deletes the pool. The pools of one node share their address;
//!   a pool of another node recording an address held is refused 422
//!   (`FieldValueDuplicate` on `status.storageAddress`, naming the node holding it), also
//!   when the two are written at once (each write holds the address's claims unchanged
//!   since it read them). So a stolen storage node identity cannot record the address of
//!   another storage node and take its volumes' consumers.
//! - The address must be inside a range the operator granted (`stratus apiserver
//!   --storage-cidr`, by default the private networks 10.0.0.0/8, 172.16.0.0/12,
//!   192.168.0.0/16 and fc00::/7): 422 on `status.storageAddress` otherwise. Loopback,
//!   link-local and public addresses (the API server's, etcd's on loopback) are refused unless
//!   granted. The export's port, checked by every compute node against the cluster's export
//!   range, keeps a granted address's other services (etcd, the API server) out of reach.
//! - A node's pools share one address: written by the node (not by a cluster admin), a pool
//!   recording an address other than the one another pool of its node holds is 422 on
//!   `status.storageAddress`, also when the two are written at once (each write holds every
//!   address's claims unchanged since it read them). An operator moves a node's address one
//!   pool at a time. So a stolen storage node identity cannot squat on addresses meant for
//!   storage nodes to come, one pool per address.
//! - A node creates at most [`MAX_POOLS_PER_NODE`] pools for itself (403 past it), also when
//!   it creates many at once: each create writes a key of its own under its node's
//!   (`{prefix}/_claims/storage-node/{node}/{pool}`) and holds the others unchanged since it
//!   counted the node's pools.
//! - A write that keeps the address (every heartbeat) is written as any other when the pool
//!   holds its claim. One whose pool holds none (its address recorded before addresses were
//!   claimed), or whose claim names another node, claims it as a new address is claimed,
//!   checked as above, so the pool's next heartbeat repairs it, or is refused if another node
//!   holds the address or it is outside the granted networks.
//! - `spec.node` is immutable (422 on `spec.node`, as Kubernetes keeps a PersistentVolume's
//!   node affinity): a pool moves to another node by being deleted and created again, so a
//!   claim never names a node the pool is no longer on.

use std::net::IpAddr;

use futures::future::BoxFuture;
use serde_json::{Value, json};

use crate::admission::{Admission, Change, Ctx, Subject, Written, settle};
use crate::base::error::{ApiError, ApiResult, Cause};
use crate::storage::store::{Guard, Read, Stored, Write};

/// The field a pool records its storage address in.
const FIELD: &str = "status.storageAddress";
/// How many times a write is tried again when another pool's claim got in between.
const RETRIES: usize = 16;
/// How many StoragePools a node registers for itself (one per volume group or directory it
/// serves); an operator creates more.
pub const MAX_POOLS_PER_NODE: usize = 16;

/// An address as a number, and its width in bits.
fn bits(a: IpAddr) -> (u128, u8) {
    match a {
        IpAddr::V4(a) => (u128::from(u32::from(a)), 32),
        IpAddr::V6(a) => (u128::from(a), 128),
    }
}

/// A network an operator grants storage addresses in, `ADDRESS/PREFIX`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StorageCidr {
    net: IpAddr,
    prefix: u8,
}

impl StorageCidr {
    /// The private networks (RFC 1918, and IPv6 unique local addresses): what a storage
    /// network is unless the operator says which.
    pub fn private() -> Vec<Self> {
        ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7"]
            .iter()
            .filter_map(|c| c.parse().ok())
            .collect()
    }

    /// Whether `ip` is inside the network.
    pub fn contains(self, ip: IpAddr) -> bool {
        let ((net, width), (ip, other)) = (bits(self.net), bits(ip));
        if width != other {
            return false;
        }
        let host = u32::from(width - self.prefix);
        net.checked_shr(host).unwrap_or(0) == ip.checked_shr(host).unwrap_or(0)
    }
}

impl std::fmt::Display for StorageCidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.net, self.prefix)
    }
}

impl std::str::FromStr for StorageCidr {
    type Err = String;

    /// `ADDRESS/PREFIX`, its host bits zero.
    fn from_str(s: &str) -> Result<Self, String> {
        let (a, p) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?}: expected ADDRESS/PREFIX"))?;
        let net: IpAddr = a
            .parse()
            .map_err(|_| format!("{s:?}: {a:?} is not an IP address"))?;
        let max = if net.is_ipv4() { 32 } else { 128 };
        let prefix = p
            .parse::<u8>()
            .ok()
            .filter(|p| *p <= max)
            .ok_or_else(|| format!("{s:?}: {p:?} is not a prefix length of 0 to {max}"))?;
        let host = u32::from(max - prefix);
        let host_mask = u128::MAX.checked_shr(128 - host).unwrap_or(0);
        if bits(net).0 & host_mask != 0 {
            return Err(format!("{s:?}: its host bits are not zero"));
        }
        Ok(Self { net, prefix })
    }
}

/// Every storage address's claims.
fn all_claims(prefix: &str) -> String {
    format!("{prefix}/_claims/storage-address/")
}

/// The claims of the storage address `ip` (one per pool recording it).
fn claims_of(prefix: &str, ip: IpAddr) -> String {
    format!("{}{ip}/", all_claims(prefix))
}

/// The claim pool `pool` holds on the storage address `ip`.
pub fn claim_key(prefix: &str, ip: IpAddr, pool: &str) -> String {
    format!("{}{pool}", claims_of(prefix, ip))
}

/// The keys of node `node`'s pools, one per pool created since they are kept
/// (`{prefix}/_claims/storage-node/{node}/{pool}`): each create writes its own and holds the
/// others unchanged, so two creates of one node's pools at once see each other.
fn pools_of(prefix: &str, node: &str) -> String {
    format!("{prefix}/_claims/storage-node/{node}/")
}

/// The storage address a pool records, when it is an IP address (in one spelling).
fn address(obj: &Value) -> Option<IpAddr> {
    obj.pointer("/status/storageAddress")
        .and_then(Value::as_str)?
        .parse()
        .ok()
}

/// The storage address a pool records, as written.
fn recorded(obj: &Value) -> Option<&Value> {
    obj.pointer("/status/storageAddress")
        .filter(|a| !a.is_null())
}

fn name_of(obj: &Value) -> &str {
    crate::base::meta::meta_str(obj, "name").unwrap_or_default()
}

fn node_of(obj: &Value) -> &str {
    obj.pointer("/spec/node")
        .and_then(Value::as_str)
        .unwrap_or_default()
}

/// The node a claim names.
fn holder(claim: &Value) -> &str {
    claim
        .get("node")
        .and_then(Value::as_str)
        .unwrap_or_default()
}

/// Admission of StoragePools: registered for `storage.stratus.dev` StoragePools.
#[derive(Debug)]
pub struct StoragePools;

impl Admission for StoragePools {
    /// The claim of its storage address, and its key among its node's pools.
    fn attached_keys(&self, prefix: &str, obj: &Value) -> Vec<String> {
        let pool = name_of(obj);
        address(obj)
            .map(|ip| claim_key(prefix, ip, pool))
            .into_iter()
            .chain(std::iter::once(format!(
                "{}{pool}",
                pools_of(prefix, node_of(obj))
            )))
            .collect()
    }

    fn write<'a>(
        &'a self,
        ctx: Ctx<'a>,
        s: Subject<'a>,
        w: Change<'a>,
    ) -> Option<BoxFuture<'a, ApiResult<Written>>> {
        if let Some((old, _)) = w.old
            && old.pointer("/spec/node") != w.new.pointer("/spec/node")
        {
            let e = refuse(
                &s,
                w.new,
                "spec.node",
                "FieldValueInvalid",
                format!(
                    "Invalid value: {}: field is immutable (the node holding a pool's volumes; delete the pool and create it for the new node)",
                    w.new.pointer("/spec/node").unwrap_or(&Value::Null)
                ),
            );
            return Some(Box::pin(async move { Err(e) }));
        }
        // An update of a pool that records no address has nothing to claim.
        if let Some((old, _)) = w.old
            && recorded(old).is_none()
            && recorded(w.new).is_none()
        {
            return None;
        }
        Some(Box::pin(write_pool(ctx, s, w)))
    }
}

/// 422 on `field`.
fn refuse(s: &Subject<'_>, obj: &Value, field: &str, reason: &str, message: String) -> ApiError {
    ApiError::invalid(
        s.kind,
        s.group,
        s.plural,
        name_of(obj),
        vec![Cause {
            reason: reason.into(),
            message,
            field: field.into(),
        }],
    )
}

/// Checks that pool `new` may claim the storage address `ip` given every claim of a storage
/// address (`claims`): inside a granted network, held by no pool of another node, and, written
/// by its node (`by_node`), the only address that node holds.
fn may_claim(
    ctx: Ctx<'_>,
    s: &Subject<'_>,
    new: &Value,
    ip: IpAddr,
    claims: &[(String, Stored)],
    by_node: bool,
) -> ApiResult<()> {
    if !ctx.storage_ranges.iter().any(|c| c.contains(ip)) {
        let granted: Vec<String> = ctx.storage_ranges.iter().map(ToString::to_string).collect();
        return Err(refuse(
            s,
            new,
            FIELD,
            "FieldValueInvalid",
            format!(
                "Invalid value: \"{ip}\": not in a storage network the operator granted (stratus apiserver --storage-cidr: {})",
                if granted.is_empty() {
                    "none".to_owned()
                } else {
                    granted.join(", ")
                }
            ),
        ));
    }
    let (pool, node, all) = (name_of(new), node_of(new), all_claims(ctx.prefix));
    for (k, c) in claims {
        let Some((their_ip, their_pool)) = k.strip_prefix(&all).and_then(|r| r.split_once('/'))
        else {
            continue;
        };
        // Its own claims: the one it moves from, or one naming a node it no longer has.
        if their_pool == pool {
            continue;
        }
        let theirs = holder(&c.value);
        let same = their_ip.parse::<IpAddr>().ok() == Some(ip);
        if same && theirs != node {
            return Err(refuse(
                s,
                new,
                FIELD,
                "FieldValueDuplicate",
                format!(
                    "Duplicate value: \"{ip}\" is the storage address of node \"{theirs}\" (storage pool \"{their_pool}\"): one address, one node"
                ),
            ));
        }
        if !same && theirs == node && by_node {
            return Err(refuse(
                s,
                new,
                FIELD,
                "FieldValueInvalid",
                format!(
                    "Invalid value: \"{ip}\": node \"{node}\" has the storage address {their_ip} (storage pool \"{their_pool}\"): a node's pools share one address, which an operator moves"
                ),
            ));
        }
    }
    Ok(())
}

/// Writes the pool `new` with what it holds, in one transaction: its node's pool key when it
/// is created (by its node: at most [`MAX_POOLS_PER_NODE`] of them), and the claim of the
/// address it records when it records a new one, or one it holds no claim on (a pool whose
/// address was recorded before addresses were claimed: its next heartbeat claims it), checked
/// by [`may_claim`]; the claim of an address it no longer records goes.
async fn write_pool(ctx: Ctx<'_>, s: Subject<'_>, w: Change<'_>) -> ApiResult<Written> {
    let (key, old, new) = (w.key, w.old, w.new);
    let object_guard = match old {
        Some((_, rev)) => Guard::Revision(key, rev),
        None => Guard::Absent(key),
    };
    let (pool, node) = (name_of(new), node_of(new));
    let ip = match recorded(new) {
        None => None,
        Some(given) => Some(address(new).ok_or_else(|| {
            refuse(
                &s,
                new,
                FIELD,
                "FieldValueInvalid",
                format!("Invalid value: {given}: not an IP address"),
            )
        })?),
    };
    let old_ip = old.and_then(|(o, _)| address(o));
    let claim = ip.map(|ip| claim_key(ctx.prefix, ip, pool));
    // A heartbeat of a pool holding its address's claim is written as any other: only a write
    // of this pool (held at its revision) moves or frees that claim.
    if let (Some(c), Some(_)) = (&claim, old)
        && old_ip == ip
        && ctx
            .store
            .get(c)
            .await
            .map_err(ApiError::from)?
            .is_some_and(|c| holder(&c.value) == node)
    {
        return settle(ctx, key, &[object_guard], &[(key, new)], &[]).await;
    }
    let by_node = !super::by_cluster_admin();
    let creating = old.is_none();
    let (all, mine) = (all_claims(ctx.prefix), pools_of(ctx.prefix, node));
    let (pools, own) = (s.collection(ctx.prefix, ""), format!("{mine}{pool}"));
    let old_claim = old_ip
        .filter(|o| Some(*o) != ip)
        .map(|o| claim_key(ctx.prefix, o, pool));
    let record = json!({ "node": node });
    // A round is lost to another write of a claim or, for a create, of another pool of its
    // node: a node's creates lose at most as many rounds as it may have pools.
    for _ in 0..RETRIES + MAX_POOLS_PER_NODE {
        let mut reads = vec![Read::Prefix(&all)];
        if creating {
            reads.extend([Read::Prefix(&mine), Read::Prefix(&pools)]);
        }
        let (got, at) = ctx.store.read_many(&reads).await.map_err(ApiError::from)?;
        let mut guards = vec![object_guard];
        guards.extend(w.parent.map(|(p, rev)| Guard::Revision(p, rev)));
        let mut puts = vec![(key, new)];
        if creating {
            let held = got.get(2).map_or(0, |all| {
                all.iter()
                    .filter(|(_, p)| node_of(&p.value) == node)
                    .count()
            });
            if by_node && held >= MAX_POOLS_PER_NODE {
                return Err(ApiError::forbidden(format!(
                    "node \"{node}\" cannot create storage pool \"{pool}\": it has {held} storage pools, as many as a node registers ({MAX_POOLS_PER_NODE}); an operator creates more"
                )));
            }
            puts.push((&own, &record));
            guards.push(Guard::Unchanged(&mine, at));
        }
        if let (Some(ip), Some(claim)) = (ip, &claim) {
            may_claim(
                ctx,
                &s,
                new,
                ip,
                got.first().map_or(&[], Vec::as_slice),
                by_node,
            )?;
            puts.push((claim, &record));
            guards.push(Guard::Unchanged(&all, at));
        }
        let deletes: Vec<&str> = old_claim.as_deref().into_iter().collect();
        let written = settle(ctx, key, &guards, &puts, &deletes).await?;
        // The pool changed (the writer's 409), or a claim did (read again).
        match written.write {
            Write::Conflict(rev) if rev == old.map_or(0, |(_, read)| read) => {}
            _ => return Ok(written),
        }
    }
    Err(ApiError::conflict(
        s.group,
        s.plural,
        name_of(new),
        "too many concurrent writes of storage pools; retry",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_storage_network_holds_its_addresses_only() {
        let c = |s: &str| s.parse::<StorageCidr>().expect(s);
        let ip = |s: &str| s.parse::<IpAddr>().expect(s);
        assert!(c("10.251.15.0/30").contains(ip("10.251.15.1")));
        assert!(c("10.251.15.0/30").contains(ip("10.251.15.3")));
        assert!(!c("10.251.15.0/30").contains(ip("10.251.15.4")));
        assert!(c("0.0.0.0/0").contains(ip("127.0.0.1")));
        assert!(!c("0.0.0.0/0").contains(ip("::1")), "another family");
        assert!(c("fc00::/7").contains(ip("fd00::2")));
        assert!(!c("fc00::/7").contains(ip("fe80::1")));
        assert!(c("127.0.0.1/32").contains(ip("127.0.0.1")));
        for bad in [
            "10.0.0.1/8",
            "10.0.0.0",
            "10.0.0.0/33",
            "x/8",
            "fd00::1/7",
            "::/129",
        ] {
            assert!(bad.parse::<StorageCidr>().is_err(), "{bad:?} accepted");
        }
        let private = StorageCidr::private();
        let granted = |a: &str| private.iter().any(|c| c.contains(ip(a)));
        for yes in [
            "10.251.15.1",
            "172.16.0.1",
            "172.31.255.254",
            "192.168.1.1",
            "fd00::1",
        ] {
            assert!(granted(yes), "{yes}");
        }
        for no in [
            "127.0.0.1",
            "169.254.169.254",
            "8.8.8.8",
            "172.32.0.1",
            "::1",
            "fe80::1",
            "0.0.0.0",
        ] {
            assert!(!granted(no), "{no}");
        }
        assert_eq!(c("10.0.0.0/8").to_string(), "10.0.0.0/8");
    }

    #[test]
    fn a_pool_holds_the_claim_of_its_address_in_one_spelling_and_its_key_among_its_nodes() {
        let p = json!({"metadata": {"name": "files"}, "spec": {"node": "n1"},
                       "status": {"storageAddress": "fd00:0::1"}});
        assert_eq!(
            StoragePools.attached_keys("/r", &p),
            [
                "/r/_claims/storage-address/fd00::1/files",
                "/r/_claims/storage-node/n1/files"
            ]
        );
        assert_eq!(
            StoragePools.attached_keys(
                "/r",
                &json!({"metadata": {"name": "files"}, "spec": {"node": "n1"}})
            ),
            ["/r/_claims/storage-node/n1/files"]
        );
    }
}
