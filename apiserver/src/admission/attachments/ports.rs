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
//! bound (`status.boundTo`) to another Server: that Server's guest may still have the NIC, so
//! the claim is 409 until the ports controller unbinds it.
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
/// being deleted, no other Server controls it (a Port made for another Server's entry), and it
/// is not bound to another Server (`status.boundTo`): that Server's guest may still have its
/// NIC, so two guests would share one MAC and address until the ports controller unbinds it.
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
    if let Some(other) = port.pointer("/status/boundTo").and_then(Value::as_str)
        && other != name_of(obj)
    {
        return Err(conflict(
            s,
            obj,
            field,
            format!(
                "port {name:?} is bound to server {other:?}; it can be named once it is unbound"
            ),
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
                let network = p.value.pointer("/spec/network").and_then(Value::as_str);
                let holder_key = holder(&p.value, uid)
                    .map(|(h, _)| keys::object(ctx.prefix, COMPUTE, "servers", Some(ns), h));
                next.push((field, name, key, p, network, holder_key));
            }
        }
    }
    let net_keys: Vec<Option<String>> = next
        .iter()
        .map(|(.., n, _)| n.map(|n| keys::object(ctx.prefix, NETWORK, "networks", Some(ns), n)))
        .collect();
    let reads: Vec<Read<'_>> = net_keys
        .iter()
        .flatten()
        .chain(next.iter().filter_map(|(.., h)| h.as_ref()))
        .map(|k| Read::Key(k))
        .collect();
    let (got, _) = ctx.store.read_many(&reads).await.map_err(ApiError::from)?;
    let mut got = got.into_iter();
    let nets: Vec<Option<Stored>> = net_keys
        .iter()
        .map(|k| {
            k.as_ref()
                .and_then(|_| got.next()?.into_iter().next().map(|(_, v)| v))
        })
        .collect();
    for ((field, name, key, p, network, holder_key), net) in next.into_iter().zip(nets) {
        usable_network(
            s,
            w.new,
            field,
            network.unwrap_or_default(),
            net.as_ref().map(|n| &n.value),
        )?;
        if let Some(hk) = holder_key {
            let h = got
                .next()
                .and_then(|v| v.into_iter().next())
                .map(|(_, v)| v);
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
            // The holder is gone, is another of its name, or dropped the Port: held as read.
            match h {
                Some(h) => out.revisions.push((hk, h.mod_revision)),
                None => out.absent.push(hk),
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
        // Bound to another server (its guest may still have the NIC) until it is unbound.
        let bound = |to: &str| json!({"status": {"boundTo": to}});
        let e = port_usable(&s, &server, f, "mine", &bound("db")).expect_err("bound to db");
        assert_eq!((e.code, e.details.causes[0].field.as_str()), (409, f));
        assert!(e.message.contains("\"db\""), "{}", e.message);
        assert!(port_usable(&s, &server, f, "mine", &bound("web")).is_ok());
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
