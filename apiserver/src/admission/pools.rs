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
//! - A write that keeps the address (every heartbeat) is written as any other.

use std::net::IpAddr;

use futures::future::BoxFuture;
use serde_json::{Value, json};

use crate::admission::{Admission, Change, Ctx, Subject, Written};
use crate::base::error::{ApiError, ApiResult, Cause};
use crate::storage::store::{Guard, Read, Write};

/// The field a pool records its storage address in.
const FIELD: &str = "status.storageAddress";
/// How many times a write is tried again when another pool's claim got in between.
const RETRIES: usize = 16;

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

/// The claims of the storage address `ip` (one per pool recording it).
fn claims_of(prefix: &str, ip: IpAddr) -> String {
    format!("{prefix}/_claims/storage-address/{ip}/")
}

/// The claim pool `pool` holds on the storage address `ip`.
pub fn claim_key(prefix: &str, ip: IpAddr, pool: &str) -> String {
    format!("{}{pool}", claims_of(prefix, ip))
}

/// The storage address a pool records, when it is an IP address (in one spelling).
fn address(obj: &Value) -> Option<IpAddr> {
    obj.pointer("/status/storageAddress")
        .and_then(Value::as_str)?
        .parse()
        .ok()
}

fn name_of(obj: &Value) -> &str {
    crate::base::meta::meta_str(obj, "name").unwrap_or_default()
}

fn node_of(obj: &Value) -> &str {
    obj.pointer("/spec/node")
        .and_then(Value::as_str)
        .unwrap_or_default()
}

/// Admission of StoragePools: registered for `storage.stratus.dev` StoragePools.
#[derive(Debug)]
pub struct StoragePools;

impl Admission for StoragePools {
    /// The claim of its storage address.
    fn attached_keys(&self, prefix: &str, obj: &Value) -> Vec<String> {
        address(obj)
            .map(|ip| vec![claim_key(prefix, ip, name_of(obj))])
            .unwrap_or_default()
    }

    fn write<'a>(
        &'a self,
        ctx: Ctx<'a>,
        s: Subject<'a>,
        w: Change<'a>,
    ) -> Option<BoxFuture<'a, ApiResult<Written>>> {
        let recorded = |v: &Value| v.pointer("/status/storageAddress").cloned();
        // A write that keeps the address (a heartbeat) is written as any other.
        if let Some((old, _)) = w.old
            && recorded(old) == recorded(w.new)
        {
            return None;
        }
        if w.old.is_none() && recorded(w.new).is_none() {
            return None;
        }
        Some(Box::pin(write_pool(ctx, s, w)))
    }
}

/// 422 on the storage address.
fn refuse(s: &Subject<'_>, obj: &Value, reason: &str, message: String) -> ApiError {
    ApiError::invalid(
        s.kind,
        s.group,
        s.plural,
        name_of(obj),
        vec![Cause {
            reason: reason.into(),
            message,
            field: FIELD.into(),
        }],
    )
}

/// Checks the address `new` records against the granted ranges and the other nodes' claims,
/// and writes the pool with its claim (and without its old one) in one transaction.
async fn write_pool(ctx: Ctx<'_>, s: Subject<'_>, w: Change<'_>) -> ApiResult<Written> {
    let Change { key, old, new, .. } = w;
    let object_guard = match old {
        Some((_, rev)) => Guard::Revision(key, rev),
        None => Guard::Absent(key),
    };
    let pool = name_of(new);
    let old_claim = old
        .and_then(|(o, _)| address(o))
        .map(|ip| claim_key(ctx.prefix, ip, pool));
    let deletes: Vec<&str> = old_claim.as_deref().into_iter().collect();
    let Some(given) = new
        .pointer("/status/storageAddress")
        .filter(|a| !a.is_null())
    else {
        // Taken out (an operator): its claim goes with it.
        return settle(ctx, key, &[object_guard], &[(key, new)], &deletes).await;
    };
    let Some(ip) = address(new) else {
        return Err(refuse(
            &s,
            new,
            "FieldValueInvalid",
            format!("Invalid value: {given}: not an IP address"),
        ));
    };
    if !ctx.storage_ranges.iter().any(|c| c.contains(ip)) {
        let granted: Vec<String> = ctx.storage_ranges.iter().map(ToString::to_string).collect();
        return Err(refuse(
            &s,
            new,
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
    let node = node_of(new);
    let prefix = claims_of(ctx.prefix, ip);
    let claim = claim_key(ctx.prefix, ip, pool);
    let record = json!({ "node": node });
    for _ in 0..RETRIES {
        let (got, at) = ctx
            .store
            .read_many(&[Read::Prefix(&prefix)])
            .await
            .map_err(ApiError::from)?;
        let holder = got.iter().flatten().find_map(|(k, c)| {
            let theirs = c.value.get("node").and_then(Value::as_str).unwrap_or("");
            (theirs != node).then(|| {
                let their_pool = k.rsplit('/').next().unwrap_or_default();
                (theirs.to_owned(), their_pool.to_owned())
            })
        });
        if let Some((theirs, their_pool)) = holder {
            return Err(refuse(
                &s,
                new,
                "FieldValueDuplicate",
                format!(
                    "Duplicate value: \"{ip}\" is the storage address of node \"{theirs}\" (storage pool \"{their_pool}\"): one address, one node"
                ),
            ));
        }
        let guards = [object_guard, Guard::Unchanged(&prefix, at)];
        let deletes: Vec<&str> = deletes.iter().copied().filter(|d| *d != claim).collect();
        if let Some(rev) = ctx
            .store
            .write_many(&guards, &[(key, new), (&claim, &record)], &deletes)
            .await
            .map_err(ApiError::from)?
        {
            return Ok(Write::Done(rev).into());
        }
        // The pool changed (the writer's 409), or a claim of the address did (read again).
        let current = ctx.store.get(key).await.map_err(ApiError::from)?;
        let same = match (old, &current) {
            (Some((_, rev)), Some(c)) => c.mod_revision == rev,
            (None, None) => true,
            _ => false,
        };
        if !same {
            return Ok(Write::Conflict(current.map_or(0, |c| c.mod_revision)).into());
        }
    }
    Err(ApiError::conflict(
        s.group,
        s.plural,
        name_of(new),
        "too many concurrent writes of this storage address; retry",
    ))
}

/// One guarded transaction: done, or the object's conflict.
async fn settle(
    ctx: Ctx<'_>,
    key: &str,
    guards: &[Guard<'_>],
    puts: &[(&str, &Value)],
    deletes: &[&str],
) -> ApiResult<Written> {
    if let Some(rev) = ctx
        .store
        .write_many(guards, puts, deletes)
        .await
        .map_err(ApiError::from)?
    {
        return Ok(Write::Done(rev).into());
    }
    let current = ctx.store.get(key).await.map_err(ApiError::from)?;
    Ok(Write::Conflict(current.map_or(0, |c| c.mod_revision)).into())
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
    fn a_pool_holds_the_claim_of_its_address_in_one_spelling() {
        let p = json!({"metadata": {"name": "files"}, "spec": {"node": "n1"},
                       "status": {"storageAddress": "fd00:0::1"}});
        assert_eq!(
            StoragePools.attached_keys("/r", &p),
            ["/r/_claims/storage-address/fd00::1/files"]
        );
        assert!(
            StoragePools
                .attached_keys("/r", &json!({"metadata": {"name": "files"}}))
                .is_empty()
        );
    }
}
