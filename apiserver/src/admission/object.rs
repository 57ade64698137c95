//! Object storage nodes at admission: one address, one ObjectNode. Swift's rings name a
//! server by its address, so two nodes claiming one would each take the other's partitions.
//!
//! # Guarantees
//! - An ObjectNode's `spec.ip` is claimed (`{prefix}/_claims/object/ip/{ip}`, naming the node)
//!   in the transaction that creates the node or changes its address, and freed in the one
//!   that deletes it or changes it again: of two nodes written at once with one address, one
//!   is refused 422 naming `spec.ip` and the node that holds it.
//! - An ObjectRing's device naming a node (`node`) at an address another ObjectNode holds is
//!   refused 422 naming `spec.devices[i].ip`; devices of one ring at one address naming two
//!   nodes are refused by the schema's checks (`api-types`).

use futures::future::BoxFuture;
use serde_json::{Value, json};

use crate::admission::{Admission, Change, Ctx, Subject, Written, settle};
use crate::base::error::{ApiError, ApiResult, Cause};
use crate::storage::store::{Guard, Write};

/// The claim key of the address `ip`.
pub fn claim_key(prefix: &str, ip: &str) -> String {
    format!("{prefix}/_claims/object/ip/{ip}")
}

/// The address an ObjectNode claims, in one spelling (`127.0.0.1`, whatever the zeros).
fn node_ip(obj: &Value) -> Option<String> {
    let ip = obj.pointer("/spec/ip").and_then(Value::as_str)?;
    Some(
        ip.parse::<std::net::Ipv4Addr>()
            .map_or_else(|_| ip.to_owned(), |a| a.to_string()),
    )
}

fn name_of(obj: &Value) -> &str {
    crate::base::meta::meta_str(obj, "name").unwrap_or_default()
}

/// Admission of ObjectNodes: registered for `object.stratus.dev` ObjectNodes.
#[derive(Debug)]
pub struct ObjectNodes;

/// Admission of ObjectRings: registered for `object.stratus.dev` ObjectRings.
#[derive(Debug)]
pub struct ObjectRings;

fn taken(s: &Subject<'_>, obj: &Value, field: &str, ip: &str, holder: &str) -> ApiError {
    ApiError::invalid(
        s.kind,
        s.group,
        s.plural,
        name_of(obj),
        vec![Cause {
            reason: "FieldValueDuplicate".into(),
            message: format!(
                "Duplicate value: \"{ip}\" is the address of ObjectNode \"{holder}\" (one address, one node)"
            ),
            field: field.into(),
        }],
    )
}

/// The node holding the claim of `ip`, if any.
async fn holder(ctx: Ctx<'_>, ip: &str) -> ApiResult<Option<(String, i64)>> {
    Ok(ctx
        .store
        .get(&claim_key(ctx.prefix, ip))
        .await
        .map_err(ApiError::from)?
        .map(|c| {
            let node = c
                .value
                .get("node")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned();
            (node, c.mod_revision)
        }))
}

impl Admission for ObjectNodes {
    /// The claim of its address.
    fn attached_keys(&self, prefix: &str, obj: &Value) -> Vec<String> {
        node_ip(obj)
            .map(|ip| vec![claim_key(prefix, &ip)])
            .unwrap_or_default()
    }

    fn write<'a>(
        &'a self,
        ctx: Ctx<'a>,
        s: Subject<'a>,
        w: Change<'a>,
    ) -> Option<BoxFuture<'a, ApiResult<Written>>> {
        // An update that keeps the address (a status report) is written as any other.
        if let Some((old, _)) = w.old
            && node_ip(old) == node_ip(w.new)
        {
            return None;
        }
        Some(Box::pin(write_node(ctx, s, w)))
    }
}

async fn write_node(ctx: Ctx<'_>, s: Subject<'_>, w: Change<'_>) -> ApiResult<Written> {
    let Change { key, old, new, .. } = w;
    let Some(ip) = node_ip(new) else {
        // The schema requires it; nothing to claim.
        let write = match old {
            Some((_, rev)) => ctx.store.write_guarded(key, new, Some(rev), &[], None),
            None => ctx.store.write_guarded(key, new, None, &[], None),
        }
        .await
        .map_err(ApiError::from)?;
        return Ok(write.into());
    };
    let claim = claim_key(ctx.prefix, &ip);
    let record = json!({ "node": name_of(new) });
    let old_claim = old
        .and_then(|(o, _)| node_ip(o))
        .map(|ip| claim_key(ctx.prefix, &ip));
    let guards = [
        match old {
            Some((_, rev)) => Guard::Revision(key, rev),
            None => Guard::Absent(key),
        },
        Guard::Absent(&claim),
    ];
    let deletes: Vec<&str> = old_claim.as_deref().into_iter().collect();
    let written = settle(
        ctx,
        key,
        &guards,
        &[(key, new), (&claim, &record)],
        &deletes,
    )
    .await?;
    // Which guard failed: the address's holder is named; the object's own change is a 409.
    if let Write::Conflict(_) = written.write
        && let Some((node, _)) = holder(ctx, &ip).await?
    {
        return Err(taken(&s, new, "spec.ip", &ip, &node));
    }
    Ok(written)
}

impl Admission for ObjectRings {
    fn write<'a>(
        &'a self,
        ctx: Ctx<'a>,
        s: Subject<'a>,
        w: Change<'a>,
    ) -> Option<BoxFuture<'a, ApiResult<Written>>> {
        // A write that keeps the devices (the ring controller's status) is written as any
        // other: only the operator's devices are checked.
        if let Some((old, _)) = w.old
            && old.pointer("/spec/devices") == w.new.pointer("/spec/devices")
        {
            return None;
        }
        Some(Box::pin(write_ring(ctx, s, w)))
    }
}

/// A ring whose devices name their nodes at the addresses those nodes hold, written with
/// the claims it read unchanged.
async fn write_ring(ctx: Ctx<'_>, s: Subject<'_>, w: Change<'_>) -> ApiResult<Written> {
    let Change { key, old, new, .. } = w;
    let devices = new
        .pointer("/spec/devices")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    let mut read: Vec<(String, Option<i64>)> = Vec::new();
    for (i, d) in devices.iter().enumerate() {
        let (Some(node), Some(ip)) = (
            d.get("node").and_then(Value::as_str),
            d.get("ip").and_then(Value::as_str),
        ) else {
            continue;
        };
        let claim = claim_key(ctx.prefix, ip);
        if read.iter().any(|(k, _)| *k == claim) {
            continue;
        }
        let held = holder(ctx, ip).await?;
        if let Some((holder, _)) = &held
            && holder != node
        {
            return Err(taken(&s, new, &format!("spec.devices[{i}].ip"), ip, holder));
        }
        read.push((claim, held.map(|(_, rev)| rev)));
    }
    let mut guards = vec![match old {
        Some((_, rev)) => Guard::Revision(key, rev),
        None => Guard::Absent(key),
    }];
    guards.extend(read.iter().map(|(k, rev)| match rev {
        Some(rev) => Guard::Revision(k, *rev),
        None => Guard::Absent(k),
    }));
    // The ring changed, or a claim it read did: either way the client retries and is
    // checked again.
    settle(ctx, key, &guards, &[(key, new)], &[]).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_claims_its_address_in_one_spelling() {
        let n = json!({"metadata": {"name": "o1"}, "spec": {"ip": "127.0.0.2"}});
        assert_eq!(
            ObjectNodes.attached_keys("/r", &n),
            ["/r/_claims/object/ip/127.0.0.2"]
        );
        assert!(
            ObjectNodes
                .attached_keys("/r", &json!({"spec": {}}))
                .is_empty()
        );
    }
}
