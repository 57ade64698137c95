//! Ports and networks a Server names, checked and claimed in the Server's own write.
//!
//! # Claims
//! A Port named in `spec.networks[i].port` is claimed for the Server in the transaction that
//! writes the Server: the Port is written with its
//! [`CLAIMED_BY`](stratus_api_types::ports::CLAIMED_BY) annotation (the Server's name and
//! uid), guarded by the Port's revision, so of many Servers naming one free Port at once
//! exactly one gets it and the others are answered 409 naming their field. The claim lives in
//! the Port object, so it goes with the Port: a Port deleted and made again under the same
//! name is free. A claim holds while its Server exists with that uid and still names the
//! Port; once the Server is deleted or drops the Port, the next Server's write takes it over
//! (guarded by the old holder's revision, or its absence), but not while the Port is still
//! bound (`status.boundTo`) to another Server that exists as the one it was bound to (the uid
//! its claim or controller reference records), deleting or not: that Server's guest may still
//! have the NIC, so the claim is 409 until the ports controller unbinds it. A Port bound to a
//! Server that is gone (its guest went before it: the compute agent's finalizer), or that was
//! made anew under its name, is claimed at once, guarded by that Server's absence or revision
//! as read; the ports controller then releases it and binds it to its new Server.
//!
//! A Port named before it exists is reserved under its name ([`reservation`]): one key per
//! Server, refused (409) while another Server holds one; the Port's create turns the
//! reservation into its claim (`admission/network.rs`). A reservation goes with the write that
//! drops the Port from the Server, or with the Server's delete.
//!
//! # Networks the project may not use
//! A Server attaches to an external Network (the cloud's uplink, `spec.external`), by a
//! `network` entry or by a Port on one, only when a cluster admin writes it: 403 naming the
//! field otherwise, as Nova's `network:attach_external_network`. A reservation records whether
//! a cluster admin wrote its Server: only such a reservation becomes the claim of a Port made
//! on an external Network (which only cluster admins and the controllers make). A Network of another project
//! cannot be named at all (a name, not `NAMESPACE/NAME`: the schema refuses it). A Network that
//! does not exist yet is waited for (the ports controller says so on the Server).

use std::collections::BTreeSet;

use serde_json::{Value, json};
use stratus_api_types::compute::ServerSpec;
use stratus_api_types::ports::{CLAIMED_BY, claim_value, parse_claim};

use super::conflict;
use crate::admission::network::{forbidden_field, is_external};
use crate::admission::{Change, Ctx, Subject};
use crate::base::error::{ApiError, ApiResult, Cause};
use crate::base::meta;
use crate::storage::keys;
use crate::storage::store::{Guard, Read, Stored};

/// The API group of Ports and Networks.
const NETWORK: &str = "network.stratus.dev";
/// The API group of Servers.
const COMPUTE: &str = "compute.stratus.dev";

/// The prefix of the reservations on Port name `port` in `ns`: one key per Server that named
/// it before it existed.
pub fn reservations(prefix: &str, ns: &str, port: &str) -> String {
    format!("{prefix}/_claims/network/port-names/{ns}/{port}/")
}

/// The reservation of Server `server_uid` on Port name `port` in `ns`.
pub fn reservation(prefix: &str, ns: &str, port: &str, server_uid: &str) -> String {
    format!("{}{server_uid}", reservations(prefix, ns, port))
}

/// The field of a reservation saying its Server was written by a cluster admin, so it may
/// take a Port on an external Network.
const EXTERNAL: &str = "mayAttachExternal";

/// Whether the Server that made reservation `r` may be attached to an external Network.
pub fn may_attach_external(r: &Value) -> bool {
    r.get(EXTERNAL).and_then(Value::as_bool) == Some(true)
}

/// The Server's `spec.networks` as typed (empty when it does not parse: the schema checked it).
fn entries(obj: &Value) -> Vec<stratus_api_types::compute::ServerNetwork> {
    serde_json::from_value::<ServerSpec>(obj.get("spec").cloned().unwrap_or(Value::Null))
        .map(|s| s.networks)
        .unwrap_or_default()
}

/// The existing Ports a Server names, with the field naming each: `spec.networks[i].port`.
pub(super) fn ports_of(obj: &Value) -> Vec<(String, String)> {
    entries(obj)
        .into_iter()
        .enumerate()
        .filter_map(|(i, n)| Some((format!("spec.networks[{i}].port"), n.port?)))
        .collect()
}

/// The Networks a Server's entries name, with the field naming each:
/// `spec.networks[i].network`.
fn networks_of(obj: &Value) -> Vec<(String, String)> {
    entries(obj)
        .into_iter()
        .enumerate()
        .filter_map(|(i, n)| Some((format!("spec.networks[{i}].network"), n.network?)))
        .collect()
}

/// What `new` names that `old` (the stored Server, on an update) did not.
fn added(
    of: fn(&Value) -> Vec<(String, String)>,
    old: Option<&Value>,
    new: &Value,
) -> Vec<(String, String)> {
    let before: BTreeSet<String> = old
        .map(of)
        .unwrap_or_default()
        .into_iter()
        .map(|(_, n)| n)
        .collect();
    of(new)
        .into_iter()
        .filter(|(_, n)| !before.contains(n))
        .collect()
}

/// The Ports `old` named that `new` does not.
fn dropped(old: Option<&Value>, new: &Value) -> Vec<String> {
    let now: BTreeSet<String> = ports_of(new).into_iter().map(|(_, n)| n).collect();
    old.map(ports_of)
        .unwrap_or_default()
        .into_iter()
        .map(|(_, n)| n)
        .filter(|n| !now.contains(n))
        .collect()
}

/// Whether a Server's write adds or drops a Port, or adds a Network.
pub(super) fn touches(w: &Change<'_>) -> bool {
    let old = w.old.map(|(o, _)| o);
    !added(ports_of, old, w.new).is_empty()
        || !dropped(old, w.new).is_empty()
        || !added(networks_of, old, w.new).is_empty()
}

/// The keys a Server holds outside its own: its reservations.
pub(super) fn attached_keys(prefix: &str, obj: &Value) -> Vec<String> {
    let (Some(ns), Some(uid)) = (meta::meta_str(obj, "namespace"), meta::meta_str(obj, "uid"))
    else {
        return Vec::new();
    };
    ports_of(obj)
        .into_iter()
        .map(|(_, p)| reservation(prefix, ns, &p, uid))
        .collect()
}

/// What a Server's write does to the Ports it names, with the conditions it holds under.
#[derive(Debug, Default)]
pub(super) struct PortWrites {
    /// Keys that must be at these revisions.
    revisions: Vec<(String, i64)>,
    /// Keys that must be absent.
    absent: Vec<String>,
    /// Prefixes under which nothing may appear after the revision.
    unchanged: Vec<(String, i64)>,
    /// Keys written (claimed Ports, reservations).
    pub puts: Vec<(String, Value)>,
    /// Keys deleted (reservations of dropped Ports).
    pub deletes: Vec<String>,
}

impl PortWrites {
    /// Whether the write holds `key` at a revision.
    fn held(&self, key: &str) -> bool {
        self.revisions.iter().any(|(k, _)| k == key)
    }

    /// The guards the write carries.
    pub fn guards(&self) -> impl Iterator<Item = Guard<'_>> {
        self.revisions
            .iter()
            .map(|(k, r)| Guard::Revision(k, *r))
            .chain(self.absent.iter().map(|k| Guard::Absent(k)))
            .chain(self.unchanged.iter().map(|(k, r)| Guard::Unchanged(k, *r)))
    }
}

fn name_of(obj: &Value) -> &str {
    meta::meta_str(obj, "name").unwrap_or_default()
}

/// Refuses an external Network to all but cluster admins.
fn usable_network(
    s: &Subject<'_>,
    obj: &Value,
    field: &str,
    name: &str,
    network: Option<&Value>,
) -> ApiResult<()> {
    if network.is_some_and(is_external) && !crate::admission::by_cluster_admin() {
        return Err(forbidden_field(
            s,
            obj,
            field,
            format!(
                "network {name:?} is external (spec.external); only cluster admins attach servers to external networks"
            ),
        ));
    }
    Ok(())
}

/// Whether the Server `obj` may name `port` (the Port `name` at `field`) at all: it is not
/// being deleted, and no other Server controls it (a Port made for another Server's entry).
/// Whether it is bound to another Server is [`bound_elsewhere`]'s, checked against that
/// Server as it is now.
pub(super) fn port_usable(
    s: &Subject<'_>,
    obj: &Value,
    field: &str,
    name: &str,
    port: &Value,
) -> ApiResult<()> {
    if port.pointer("/metadata/deletionTimestamp").is_some() {
        return Err(conflict(
            s,
            obj,
            field,
            format!("port {name:?} is being deleted"),
        ));
    }
    let uid = meta::meta_str(obj, "uid");
    let controller = port
        .pointer("/metadata/ownerReferences")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .find(|r| r.get("controller").and_then(Value::as_bool) == Some(true));
    if let Some(c) = controller
        && c.get("kind").and_then(Value::as_str) == Some("Server")
        && c.get("uid").and_then(Value::as_str) != uid
    {
        let other = c.get("name").and_then(Value::as_str).unwrap_or_default();
        return Err(conflict(
            s,
            obj,
            field,
            format!("port {name:?} was made for server {other:?} and goes with it"),
        ));
    }
    Ok(())
}

/// The Server `port` is bound to (`status.boundTo`) when it is not `server`: its name, and the
/// uid it was bound as when the Port records it (its claim, or its controller reference, of
/// that name).
fn bound_elsewhere<'a>(port: &'a Value, server: &str) -> Option<(&'a str, Option<&'a str>)> {
    let bound = port
        .pointer("/status/boundTo")
        .and_then(Value::as_str)
        .filter(|b| *b != server)?;
    let claimed = port
        .pointer("/metadata/annotations")
        .and_then(|a| a.get(CLAIMED_BY))
        .and_then(Value::as_str)
        .and_then(parse_claim)
        .filter(|(n, _)| *n == bound)
        .map(|(_, u)| u);
    let controlled = || {
        port.pointer("/metadata/ownerReferences")?
            .as_array()?
            .iter()
            .find(|r| {
                r.get("controller").and_then(Value::as_bool) == Some(true)
                    && r.get("kind").and_then(Value::as_str) == Some("Server")
                    && r.get("name").and_then(Value::as_str) == Some(bound)
            })?
            .get("uid")?
            .as_str()
    };
    Some((bound, claimed.or_else(controlled)))
}

/// Whether a Port bound to Server `uid` (when known) may still be in that Server's guest,
/// `live` being the Server of its name as stored now: it exists and is the one it was bound
/// to (being deleted or not: its guest is torn down before it goes). A Server that is gone,
/// or was made anew under the name, holds the NIC of no guest.
fn still_bound(live: Option<&Stored>, uid: Option<&str>) -> bool {
    live.is_some_and(|l| uid.is_none() || meta::meta_str(&l.value, "uid") == uid)
}

/// The Server (name, uid), live or not, whose claim `port` carries, when not the Server of uid
/// `uid`. (A Port bound to another Server without a claim is refused by [`port_usable`].)
fn holder<'a>(port: &'a Value, uid: &str) -> Option<(&'a str, &'a str)> {
    port.pointer("/metadata/annotations")
        .and_then(|a| a.get(CLAIMED_BY))
        .and_then(Value::as_str)
        .and_then(parse_claim)
        .filter(|(_, u)| *u != uid)
}

/// Whether Server `holder` (as stored now, if it exists) still holds Port `port` it claimed
/// as uid `uid`.
fn holds(holder: Option<&Stored>, uid: &str, port: &str) -> bool {
    holder.is_some_and(|h| {
        meta::meta_str(&h.value, "uid") == Some(uid)
            && ports_of(&h.value).iter().any(|(_, p)| p == port)
    })
}

/// `port` with its claim for Server `server` of uid `uid`.
fn claimed(port: &Value, server: &str, uid: &str) -> Value {
    let mut p = port.clone();
    let m = meta::meta_mut(&mut p);
    if !m.get("annotations").is_some_and(Value::is_object) {
        m.insert("annotations".into(), json!({}));
    }
    if let Some(a) = m.get_mut("annotations").and_then(Value::as_object_mut) {
        a.insert(CLAIMED_BY.into(), json!(claim_value(server, uid)));
    }
    p
}

/// Checks the Ports and Networks a Server's write adds and decides its claims, reading what
/// it needs now; what was read is held by the guards of the answer.
///
/// # Errors
/// 409 naming the field of a Port another Server holds (or that is going); 403 naming the
/// field of an external Network; 422 for a Port named twice.
pub(super) async fn plan(
    ctx: Ctx<'_>,
    s: &Subject<'_>,
    ns: &str,
    w: &Change<'_>,
) -> ApiResult<PortWrites> {
    let server = name_of(w.new);
    let uid = meta::meta_str(w.new, "uid").unwrap_or_default();
    let old = w.old.map(|(o, _)| o);
    let mut out = PortWrites::default();
    let mut seen = BTreeSet::new();
    for (field, p) in ports_of(w.new) {
        if !seen.insert(p.clone()) {
            return Err(ApiError::invalid(
                s.kind,
                s.group,
                s.plural,
                server,
                vec![Cause {
                    reason: "FieldValueDuplicate".into(),
                    message: format!("Duplicate value: port {p:?} is named by another entry"),
                    field,
                }],
            ));
        }
    }
    out.deletes = dropped(old, w.new)
        .iter()
        .map(|p| reservation(ctx.prefix, ns, p, uid))
        .collect();
    let ports = added(ports_of, old, w.new);
    let networks = added(networks_of, old, w.new);
    let port_keys: Vec<String> = ports
        .iter()
        .map(|(_, p)| keys::object(ctx.prefix, NETWORK, "ports", Some(ns), p))
        .collect();
    let held: Vec<String> = ports
        .iter()
        .map(|(_, p)| reservations(ctx.prefix, ns, p))
        .collect();
    let net_keys: Vec<String> = networks
        .iter()
        .map(|(_, n)| keys::object(ctx.prefix, NETWORK, "networks", Some(ns), n))
        .collect();
    let reads: Vec<Read<'_>> = port_keys
        .iter()
        .map(|k| Read::Key(k))
        .chain(held.iter().map(|k| Read::Prefix(k)))
        .chain(net_keys.iter().map(|k| Read::Key(k)))
        .collect();
    let (got, revision) = ctx.store.read_many(&reads).await.map_err(ApiError::from)?;
    let (found, rest) = got.split_at(ports.len());
    let (reserved, nets) = rest.split_at(ports.len());
    for ((field, name), net) in networks.iter().zip(nets) {
        usable_network(s, w.new, field, name, net.first().map(|(_, n)| &n.value))?;
    }
    // What the Ports found lead to read next: their Networks, and the Servers holding them.
    let mut next = Vec::new();
    for ((((field, name), key), found), reserved) in
        ports.iter().zip(&port_keys).zip(found).zip(reserved)
    {
        match found.first() {
            None => {
                let own = reservation(ctx.prefix, ns, name, uid);
                if let Some((_, r)) = reserved.iter().find(|(k, _)| *k != own) {
                    let by = r
                        .value
                        .get("server")
                        .and_then(Value::as_str)
                        .unwrap_or_default();
                    return Err(conflict(
                        s,
                        w.new,
                        field,
                        format!(
                            "port {name:?} does not exist yet and server {by:?} already names it"
                        ),
                    ));
                }
                out.absent.push(key.clone());
                out.unchanged
                    .push((reservations(ctx.prefix, ns, name), revision));
                let admin = crate::admission::by_cluster_admin();
                out.puts
                    .push((own, json!({"server": server, "uid": uid, EXTERNAL: admin})));
            }
            Some((_, p)) => {
                port_usable(s, w.new, field, name, &p.value)?;
                next.push((field, name, key, p));
            }
        }
    }
    // What the Ports found lead to, read at one revision: their Networks, the Servers
    // holding their claims and the Servers they are bound to.
    let server_key = |n: &str| keys::object(ctx.prefix, COMPUTE, "servers", Some(ns), n);
    let net_keys: Vec<Option<String>> = next
        .iter()
        .map(|(.., p)| {
            p.value
                .pointer("/spec/network")
                .and_then(Value::as_str)
                .map(|n| keys::object(ctx.prefix, NETWORK, "networks", Some(ns), n))
        })
        .collect();
    let holder_keys: Vec<Option<String>> = next
        .iter()
        .map(|(.., p)| holder(&p.value, uid).map(|(h, _)| server_key(h)))
        .collect();
    let bound_keys: Vec<Option<String>> = next
        .iter()
        .map(|(.., p)| bound_elsewhere(&p.value, server).map(|(b, _)| server_key(b)))
        .collect();
    let reads: Vec<Read<'_>> = net_keys
        .iter()
        .chain(&holder_keys)
        .chain(&bound_keys)
        .flatten()
        .map(|k| Read::Key(k))
        .collect();
    let (got, _) = ctx.store.read_many(&reads).await.map_err(ApiError::from)?;
    let mut got = got.into_iter();
    let mut found = |keys: &[Option<String>]| -> Vec<Option<Stored>> {
        keys.iter()
            .map(|k| {
                k.as_ref()
                    .and_then(|_| got.next()?.into_iter().next().map(|(_, v)| v))
            })
            .collect()
    };
    let (nets, holders, bound) = (found(&net_keys), found(&holder_keys), found(&bound_keys));
    let read = nets.into_iter().zip(holder_keys).zip(holders);
    for (((field, name, key, p), ((net, hk), h)), (bk, b)) in next
        .into_iter()
        .zip(read)
        .zip(bound_keys.into_iter().zip(bound))
    {
        let network = p.value.pointer("/spec/network").and_then(Value::as_str);
        usable_network(
            s,
            w.new,
            field,
            network.unwrap_or_default(),
            net.as_ref().map(|n| &n.value),
        )?;
        if let Some((other, bound_uid)) = bound_elsewhere(&p.value, server)
            && still_bound(b.as_ref(), bound_uid)
        {
            // That Server's guest may still have the NIC: two guests would share one MAC and
            // address until the ports controller unbinds it.
            return Err(conflict(
                s,
                w.new,
                field,
                format!(
                    "port {name:?} is bound to server {other:?}; it can be named once it is unbound"
                ),
            ));
        }
        if let Some((by, by_uid)) = holder(&p.value, uid)
            && holds(h.as_ref(), by_uid, name)
        {
            return Err(conflict(
                s,
                w.new,
                field,
                format!(
                    "port {name:?} is claimed by server {by:?}; remove it from that server first"
                ),
            ));
        }
        // The holder and the Server it is bound to are gone, are others of their names, or
        // dropped the Port: held as read.
        for (k, v) in [(hk, h), (bk, b)] {
            let Some(k) = k.filter(|k| !out.absent.contains(k) && !out.held(k)) else {
                continue;
            };
            match v {
                Some(v) => out.revisions.push((k, v.mod_revision)),
                None => out.absent.push(k),
            }
        }
        out.revisions.push((key.clone(), p.mod_revision));
        out.puts.push((key.clone(), claimed(&p.value, server, uid)));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::super::tests::subject;
    use super::*;

    #[test]
    fn a_servers_ports_and_networks_are_named_by_their_fields() {
        let server = json!({"metadata": {"name": "web"},
                            "spec": {"flavor": "m1", "networks": [{"network": "blue"}, {"port": "mine"}]}});
        assert_eq!(
            ports_of(&server),
            [("spec.networks[1].port".to_string(), "mine".to_string())]
        );
        assert_eq!(
            networks_of(&server),
            [("spec.networks[0].network".to_string(), "blue".to_string())]
        );
        let old =
            json!({"spec": {"flavor": "m1", "networks": [{"port": "gone"}, {"port": "mine"}]}});
        assert_eq!(added(ports_of, Some(&old), &server), []);
        assert_eq!(dropped(Some(&old), &server), ["gone"]);
    }

    #[test]
    fn a_port_is_usable_unless_going_or_made_for_another_server() {
        let server = json!({"metadata": {"name": "web", "uid": "u-web"}});
        let s = subject();
        let f = "spec.networks[1].port";
        let free = json!({"spec": {"network": "blue"}});
        assert!(port_usable(&s, &server, f, "mine", &free).is_ok());
        let going = json!({"metadata": {"deletionTimestamp": "2026-01-01T00:00:00Z"}});
        let e = port_usable(&s, &server, f, "mine", &going).expect_err("going");
        assert_eq!((e.code, e.details.causes[0].field.as_str()), (409, f));
        let made = |uid: &str| {
            json!({"metadata": {"ownerReferences": [
                {"apiVersion": "compute.stratus.dev/v1", "kind": "Server", "name": "db",
                 "uid": uid, "controller": true}]}})
        };
        let e = port_usable(&s, &server, f, "db-0", &made("u-db")).expect_err("db's");
        assert_eq!((e.code, e.details.causes[0].field.as_str()), (409, f));
        assert!(e.message.contains("\"db\""), "{}", e.message);
        assert!(port_usable(&s, &server, f, "web-0", &made("u-web")).is_ok());
    }

    #[test]
    fn a_port_is_bound_elsewhere_while_the_server_it_was_bound_to_exists() {
        // Bound to another server: its uid as the port's claim or controller records it.
        let bound = |to: &str, meta: Value| json!({"metadata": meta, "status": {"boundTo": to}});
        assert_eq!(bound_elsewhere(&bound("web", json!({})), "web"), None);
        assert_eq!(
            bound_elsewhere(&bound("db", json!({})), "web"),
            Some(("db", None))
        );
        let claimed = json!({"annotations": {CLAIMED_BY: "db/u-db"}});
        assert_eq!(
            bound_elsewhere(&bound("db", claimed.clone()), "web"),
            Some(("db", Some("u-db")))
        );
        assert_eq!(
            bound_elsewhere(&bound("cache", claimed), "web"),
            Some(("cache", None)),
            "a claim of another name says nothing of the bound server"
        );
        let made = json!({"ownerReferences": [{"apiVersion": "compute.stratus.dev/v1",
            "kind": "Server", "name": "db", "uid": "u-db", "controller": true}]});
        assert_eq!(
            bound_elsewhere(&bound("db", made), "web"),
            Some(("db", Some("u-db")))
        );
        // Still bound while that server exists as the one bound (deleting or not); not once
        // it is gone or made anew under its name.
        let live = |uid: &str| Stored {
            value: json!({"metadata": {"name": "db", "uid": uid}}),
            mod_revision: 3,
        };
        assert!(still_bound(Some(&live("u-db")), Some("u-db")));
        assert!(still_bound(Some(&live("u-other")), None), "uid unknown");
        assert!(!still_bound(Some(&live("u-db2")), Some("u-db")));
        assert!(!still_bound(None, Some("u-db")));
        assert!(!still_bound(None, None));
    }

    #[test]
    fn a_claim_is_held_by_its_server_while_it_names_the_port() {
        let port = json!({"metadata": {"annotations": {CLAIMED_BY: "db/u-db"}}});
        assert_eq!(holder(&port, "u-web"), Some(("db", "u-db")));
        assert_eq!(holder(&port, "u-db"), None);
        let stored = |uid: &str, ports: Value| Stored {
            value: json!({"metadata": {"name": "db", "uid": uid},
                          "spec": {"flavor": "m1", "networks": ports}}),
            mod_revision: 7,
        };
        let naming = stored("u-db", json!([{"port": "mine"}]));
        assert!(holds(Some(&naming), "u-db", "mine"));
        // Gone, made anew under its name, or no longer naming the port: held by nobody.
        assert!(!holds(None, "u-db", "mine"));
        assert!(!holds(
            Some(&stored("u-db2", json!([{"port": "mine"}]))),
            "u-db",
            "mine"
        ));
        assert!(!holds(Some(&stored("u-db", json!([]))), "u-db", "mine"));
    }

    #[test]
    fn a_claimed_port_records_its_server() {
        let p = json!({"metadata": {"name": "mine", "annotations": {"a": "b"}}, "spec": {}});
        let c = claimed(&p, "web", "u-web");
        assert_eq!(c["metadata"]["annotations"][CLAIMED_BY], "web/u-web");
        assert_eq!(c["metadata"]["annotations"]["a"], "b");
        let bare = json!({"metadata": {"name": "mine"}});
        assert_eq!(
            claimed(&bare, "web", "u")["metadata"]["annotations"][CLAIMED_BY],
            "web/u"
        );
    }
}
