//! Network IPAM at admission: a Network's VXLAN identifier, a Subnet's place on its Network
//! and a Port's MAC and fixed IPs are checked and claimed in the same etcd transaction as the
//! create that takes them, and recorded in the object's status at once (as kube-apiserver
//! allocates a Service's ClusterIP); deleting the object frees them in its delete's
//! transaction.
//!
//! # Claims
//! Each claim is one key outside every served resource ([`keys::vni_claim`],
//! [`keys::physical_network_claim`], [`keys::ip_claim`], [`keys::mac_claim`]), created with a
//! [`Guard::Absent`] in the transaction that creates its object, so no two objects ever hold
//! the same one. Addresses and MACs are claimed per Network uid (recorded on each Subnet and
//! Port in the [`NETWORK_UID`] annotation), so a re-created Network of the same name inherits
//! nothing.
//!
//! # Gateways
//! A Subnet's gateway is claimed for the Subnet at its create (the claim names the subnet, as
//! its `gateway`) and freed with its delete. A Port asking for it is refused (409 naming
//! `spec.fixedIPs[i].ipAddress`), as Neutron refuses it to any port but a router interface.
//! A Router's interface Port takes it from the claim its Subnet holds: a Port a cluster admin
//! or system identity (the routers controller) creates, controlled (`ownerReferences`) by a
//! Router of its namespace that has an interface on the subnet, as read in the create's
//! transaction. It holds a claim of its own ([`gateway_port_claim`]: one router interface per
//! subnet) and records the address in the [`ROUTER_GATEWAY`] annotation, which only this
//! admission sets; its delete frees that claim and leaves the Subnet's. A subnet's network and
//! broadcast addresses are no port's (422).
//!
//! # Servers' claims
//! A Port's create takes the reservation a Server made on its name before it existed
//! (`admission/attachments/ports.rs`) as its claim (the `CLAIMED_BY` annotation), in the same
//! transaction, unless the Port is on an external Network and no cluster admin wrote that
//! Server; no write to the Port sets, changes or drops that annotation after. A Port owned
//! (`ownerReferences`, controller or not) by a Server is the ports controller's to make alone:
//! a create or an update (a replace, either patch or an apply, decided on the object it
//! results in) that adds or changes a reference to a Server is 403 naming
//! `metadata.ownerReferences` for all but cluster admins and the controllers, as another
//! writer's would pass for the Server's own.
//!
//! # DHCP servers
//! A Subnet serving DHCP claims its DHCP server's address at its create, as Neutron's DHCP port
//! takes one: the first free address of its pools, recorded in `status.dhcpIP` (the claim names
//! the subnet, as its `DHCP server`) and freed with its delete. No Port gets it, asked for (409
//! naming the field) or allocated; every node's DHCP server for the subnet answers from it. A
//! Subnet whose pools have no free address for it is refused (409 on `spec.allocationPools`).
//! An update turning DHCP on for a Subnet that has no `status.dhcpIP` claims one the same way,
//! in the update's transaction (409 on `spec.enableDHCP` when none is free); turning it off
//! keeps the address, for the next time.
//!
//! # Allocation
//! An address is found without reading a subnet's claims whole: a few random probes each read
//! at most a few dozen claims from a random address of the pools on and take the first address
//! not among them; only when every probe lands in a full stretch is the pool read in order to
//! its end, which finds a free address or proves the pool exhausted (409). That read (pages
//! of claims at one revision, a subnet being at most a /16) happens only when the pool is
//! nearly full or exhausted. The transaction's guard settles races: the loser tries again.
//!
//! # Provider networks
//! Only cluster admins make flat or external Networks (403 otherwise), as Neutron keeps its
//! provider attributes to the operator, and only they (and the controllers) make Ports on an
//! external Network (403 naming `spec.network`), as Neutron's policy keeps tenants off it.
//!
//! # Ownership
//! A Subnet is owned (`ownerReferences`) by its Network as it is at the Subnet's create, so
//! the garbage collector deletes it with the Network.
//!
//! # In use
//! A Network or Subnet that Ports are on, or whose addresses FloatingIPs (of any project)
//! hold, is not deleted (409 naming them), as in Neutron, unless its Project is being
//! deleted; the delete holds the namespace's Ports and the network's address claims as it
//! read them, and a Port's or FloatingIP's create holds its Network and the Subnet its
//! addresses come from, so neither slips past the other.
//!
//! # Quota
//! Networks, Subnets and Ports count against quotas: their creates carry
//! [`quota::check`]'s guards in the same transaction. An update never grows what quota counts
//! (one per object), so updates carry none.
//!
//! # Not done here
//! IPv6 subnets are refused. `status.usedIPs` and `status.availableIPs` of a Subnet are left to
//! a controller. A Port whose Network was deleted with its Project, or before deletes were
//! checked, keeps its claims (under the gone Network's uid) until it is deleted.

use std::collections::{BTreeSet, HashSet};
use std::net::Ipv4Addr;

use futures::future::BoxFuture;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value, json};
use stratus_api_types::network::{NetworkSpec, PortSpec, Segmentation, SubnetSpec};
use stratus_api_types::ports::{CLAIMED_BY, claim_value};

use crate::admission::{Admission, Change, Ctx, Held, Subject, Written, quota};
use crate::base::error::{ApiError, ApiResult, Cause};
use crate::base::meta;
use crate::storage::keys;
use crate::storage::store::{Guard, Read, Stored, Write};

/// The API group of the network kinds.
pub const GROUP: &str = "network.stratus.dev";

/// The annotation on a Subnet or Port holding the uid of the Network it was admitted on (set
/// by the API server; a write cannot change it).
pub const NETWORK_UID: &str = "network.stratus.dev/network-uid";

/// The annotation on a Router's interface Port holding the subnet gateway address it took
/// (set by this admission alone; a write cannot add, change or drop it).
pub const ROUTER_GATEWAY: &str = "network.stratus.dev/router-gateway";

/// The key of the claim a Router's interface Port holds on its subnet's gateway address `ip`
/// of the Network of uid `network_uid` (the address itself stays claimed by the Subnet).
pub fn gateway_port_claim(prefix: &str, network_uid: &str, ip: Ipv4Addr) -> String {
    format!("{prefix}/_claims/network/{network_uid}/router-gateway/{ip}")
}

/// How many times a create is tried again when another write got in between.
pub(crate) const RETRIES: usize = 48;
/// Random probes for a free address before the pool is read in order.
const PROBES: usize = 4;
/// The claims one probe reads.
const WINDOW: i64 = 32;
/// The largest VXLAN network identifier (24 bits).
const VNI_MAX: u32 = 16_777_215;
/// The largest 802.1Q VLAN ID (4095 is reserved).
const VLAN_MAX: u16 = 4094;
/// The most allocation pools a Subnet may have.
const MAX_POOLS: usize = 64;
/// The largest subnet (the shortest prefix) accepted: 65,534 hosts, which bounds what reading
/// a nearly full pool in order costs.
const MIN_PREFIX: u8 = 16;
/// The smallest subnet accepted: network, gateway, one host and broadcast.
const MAX_PREFIX: u8 = 30;

/// IPAM at admission: registered for Networks, Subnets and Ports, before quota.
#[derive(Debug)]
pub struct Ipam;

impl Admission for Ipam {
    /// Allocation fills the rest at create (a Port starts `Down` with its addresses).
    fn initial_status(&self) -> Option<Value> {
        Some(json!({"phase": "Pending"}))
    }

    /// Refuses a status write that changes what allocation recorded (a Network's VNI, a
    /// Subnet's gateway, a Port's MAC and fixed IPs): the claims, and what agents program,
    /// follow those fields.
    fn check_status_write(&self, s: &Subject<'_>, old: &Value, new: &Value) -> ApiResult<()> {
        let fields: &[&str] = match s.kind {
            "Network" => &["vni", "segmentationID"],
            "Subnet" => &["gatewayIP", "dhcpIP"],
            "Port" => &["macAddress", "fixedIPs"],
            "FloatingIP" => &["floatingIPAddress"],
            _ => &[],
        };
        for field in fields {
            let p = format!("/status/{field}");
            if old.pointer(&p) != new.pointer(&p) {
                return Err(invalid(
                    s,
                    new,
                    vec![Cause::invalid(
                        format!("status.{field}"),
                        "Forbidden: set by address allocation when the object is created",
                    )],
                ));
            }
        }
        Ok(())
    }

    /// A Network's VNI (and, for a flat one, its physical network); a Port's addresses and
    /// MAC on its Network; a Subnet's gateway address on its Network.
    fn attached_keys(&self, prefix: &str, obj: &Value) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(vni) = obj
            .pointer("/status/vni")
            .and_then(Value::as_u64)
            .and_then(|v| u32::try_from(v).ok())
        {
            out.push(keys::vni_claim(prefix, vni));
        }
        if obj.pointer("/spec/segmentation").and_then(Value::as_str) == Some("flat")
            && let Some(p) = obj.pointer("/spec/physicalNetwork").and_then(Value::as_str)
        {
            out.push(keys::physical_network_claim(prefix, p));
        }
        if obj.pointer("/spec/segmentation").and_then(Value::as_str) == Some("vlan")
            && let Some(p) = obj.pointer("/spec/physicalNetwork").and_then(Value::as_str)
            && let Some(id) = obj
                .pointer("/status/segmentationID")
                .and_then(Value::as_u64)
                .and_then(|v| u16::try_from(v).ok())
        {
            out.push(keys::vlan_claim(prefix, p, id));
        }
        if let Some(uid) = annotation(obj) {
            // A router interface's gateway address stays the Subnet's; the Port frees its own
            // claim on it.
            let gateway = router_gateway(obj);
            let ips = obj
                .pointer("/status/fixedIPs")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(|f| f.get("ipAddress").and_then(Value::as_str))
                .chain(
                    obj.pointer("/status/floatingIPAddress")
                        .and_then(Value::as_str),
                )
                .filter_map(|ip| ip.parse::<Ipv4Addr>().ok());
            out.extend(ips.map(|ip| match gateway {
                Some(g) if g == ip => gateway_port_claim(prefix, uid, ip),
                _ => keys::ip_claim(prefix, uid, ip),
            }));
            // A Subnet's gateway and DHCP server address, claimed for the Subnet at its create.
            for field in ["/status/gatewayIP", "/status/dhcpIP"] {
                if let Some(g) = obj
                    .pointer(field)
                    .and_then(Value::as_str)
                    .and_then(|g| g.parse::<Ipv4Addr>().ok())
                {
                    out.push(keys::ip_claim(prefix, uid, g));
                }
            }
            if let Some(mac) = obj.pointer("/status/macAddress").and_then(Value::as_str) {
                out.push(keys::mac_claim(prefix, uid, mac));
            }
        }
        out
    }

    /// A Network or Subnet with Ports on it stays (409), unless its Project is being deleted.
    fn check_delete<'a>(
        &'a self,
        ctx: Ctx<'a>,
        s: Subject<'a>,
        obj: &'a Value,
    ) -> Option<BoxFuture<'a, ApiResult<Vec<Held>>>> {
        match s.kind {
            "Network" | "Subnet" => Some(Box::pin(not_in_use(ctx, s, obj))),
            _ => None,
        }
    }

    /// Creates with their claims; updates refused where they would change what was claimed.
    fn write<'a>(
        &'a self,
        ctx: Ctx<'a>,
        s: Subject<'a>,
        w: Change<'a>,
    ) -> Option<BoxFuture<'a, ApiResult<Written>>> {
        let ns = s.namespace?;
        Some(match (s.kind, w.old) {
            ("Network", None) => Box::pin(create_network(ctx, s, ns, w)),
            ("Subnet", None) => Box::pin(create_subnet(ctx, s, ns, w)),
            ("Port", None) => Box::pin(create_port(ctx, s, ns, w)),
            ("FloatingIP", None) => Box::pin(super::router::create_floating_ip(ctx, s, ns, w)),
            (_, Some((old, rev))) => Box::pin(update(ctx, s, w, old, rev)),
            _ => return None,
        })
    }
}

/// The Network uid a Subnet, Port or FloatingIP records.
pub(crate) fn annotation(obj: &Value) -> Option<&str> {
    obj.pointer("/metadata/annotations")
        .and_then(|a| a.get(NETWORK_UID))
        .and_then(Value::as_str)
}

/// The gateway address a Router's interface Port took (its [`ROUTER_GATEWAY`] annotation).
fn router_gateway(obj: &Value) -> Option<Ipv4Addr> {
    obj.pointer("/metadata/annotations")
        .and_then(|a| a.get(ROUTER_GATEWAY))
        .and_then(Value::as_str)
        .and_then(|g| g.parse().ok())
}

pub(crate) fn name_of(obj: &Value) -> &str {
    meta::meta_str(obj, "name").unwrap_or_default()
}

/// 422 for the object.
pub(crate) fn invalid(s: &Subject<'_>, obj: &Value, causes: Vec<Cause>) -> ApiError {
    ApiError::invalid(s.kind, s.group, s.plural, name_of(obj), causes)
}

/// 422 for one field.
pub(crate) fn invalid_field(
    s: &Subject<'_>,
    obj: &Value,
    field: &str,
    message: String,
) -> ApiError {
    invalid(s, obj, vec![Cause::invalid(field, message)])
}

/// 422: a name the field gives does not exist.
pub(crate) fn not_found_field(
    s: &Subject<'_>,
    obj: &Value,
    field: &str,
    message: String,
) -> ApiError {
    invalid(
        s,
        obj,
        vec![Cause {
            reason: "FieldValueNotFound".into(),
            message,
            field: field.into(),
        }],
    )
}

/// 409 naming the field whose value is held by another object (or cannot be had).
pub(crate) fn conflict_field(
    s: &Subject<'_>,
    obj: &Value,
    field: &str,
    message: String,
) -> ApiError {
    let mut e = ApiError::conflict(
        s.group,
        s.plural,
        name_of(obj),
        format!("{field}: {message}"),
    );
    e.details.causes.push(Cause {
        reason: "FieldValueDuplicate".into(),
        message,
        field: field.into(),
    });
    e
}

/// 403 naming the field whose value the writer may not use.
pub(crate) fn forbidden_field(
    s: &Subject<'_>,
    obj: &Value,
    field: &str,
    message: String,
) -> ApiError {
    let mut e = ApiError::forbidden(format!(
        "{}.{} {:?} is forbidden: {field}: {message}",
        s.plural,
        s.group,
        name_of(obj)
    ))
    .about(s.group, s.plural, name_of(obj));
    e.details.causes.push(Cause {
        reason: "FieldValueForbidden".into(),
        message,
        field: field.into(),
    });
    e
}

/// Whether Network `net` (as stored) is external: the cloud's uplink, which only cluster
/// admins (and the controllers) attach anything to.
pub(crate) fn is_external(net: &Value) -> bool {
    net.pointer("/spec/external").and_then(Value::as_bool) == Some(true)
}

/// Who holds a claim, as its record says: `port NS/NAME`, `floatingip NS/NAME`, or
/// `subnet NS/NAME` for a gateway.
fn holder(claim: &Value) -> String {
    ["port", "floatingip", "subnet"]
        .iter()
        .find_map(|k| {
            let by = claim.get(*k).and_then(Value::as_str)?;
            Some(match claim.get("role").and_then(Value::as_str) {
                Some(role) => format!("{k} {by}, as its {role}"),
                None => format!("{k} {by}"),
            })
        })
        .unwrap_or_else(|| "another object".into())
}

/// 409: the retries ran out.
pub(crate) fn too_busy(s: &Subject<'_>, obj: &Value) -> ApiError {
    ApiError::conflict(
        s.group,
        s.plural,
        name_of(obj),
        "too many concurrent allocations on the network; retry",
    )
}

/// The object's spec as its typed form (the schema has already checked it).
pub(crate) fn spec<T: DeserializeOwned>(s: &Subject<'_>, obj: &Value) -> ApiResult<T> {
    serde_json::from_value(obj.get("spec").cloned().unwrap_or(Value::Null))
        .map_err(|e| invalid_field(s, obj, "spec", format!("Invalid value: {e}")))
}

/// A random number from the operating system's generator (a v4 uuid's random bytes).
fn random() -> u64 {
    let b = uuid::Uuid::new_v4().into_bytes();
    u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[9], b[10]])
}

/// `obj` with `status.field` set.
pub(crate) fn set_status(obj: &mut Value, fields: Map<String, Value>) {
    if !obj.get("status").is_some_and(Value::is_object) {
        obj["status"] = json!({});
    }
    if let Some(st) = obj.get_mut("status").and_then(Value::as_object_mut) {
        st.extend(fields);
    }
}

/// `obj` annotated with its Network's uid.
pub(crate) fn set_annotation(obj: &mut Value, uid: &str) {
    set_annotation_to(obj, NETWORK_UID, Some(uid));
}

/// `obj` with annotation `key` set to `value`, or without it (`None`).
fn set_annotation_to(obj: &mut Value, key: &str, value: Option<&str>) {
    let m = meta::meta_mut(obj);
    if value.is_none() && !m.get("annotations").is_some_and(Value::is_object) {
        return;
    }
    if !m.get("annotations").is_some_and(Value::is_object) {
        m.insert("annotations".into(), json!({}));
    }
    if let Some(a) = m.get_mut("annotations").and_then(Value::as_object_mut) {
        match value {
            Some(v) => {
                a.insert(key.into(), json!(v));
            }
            None => {
                a.remove(key);
            }
        }
    }
}

/// `obj` with one owner reference to its Network `name` of `uid`, in place of any other
/// reference to a Network: the garbage collector deletes a Subnet with its Network.
fn owned_by_network(obj: &Value, name: &str, uid: &str) -> Value {
    let mut obj = obj.clone();
    let mut refs: Vec<Value> = obj
        .pointer("/metadata/ownerReferences")
        .and_then(Value::as_array)
        .map(|r| {
            r.iter()
                .filter(|r| {
                    !(r.get("kind").and_then(Value::as_str) == Some("Network")
                        && r.get("apiVersion").and_then(Value::as_str)
                            == Some("network.stratus.dev/v1"))
                })
                .cloned()
                .collect()
        })
        .unwrap_or_default();
    refs.push(json!({
        "apiVersion": "network.stratus.dev/v1",
        "kind": "Network",
        "name": name,
        "uid": uid,
    }));
    meta::meta_mut(&mut obj).insert("ownerReferences".into(), Value::Array(refs));
    obj
}

/// The guards every create carries: the object is absent, its namespace's Project is as read,
/// and quota holds.
pub(crate) fn create_guards<'a>(
    key: &'a str,
    parent: Option<(&'a str, i64)>,
    quota: &'a [(String, i64)],
) -> Vec<Guard<'a>> {
    let mut g = vec![Guard::Absent(key)];
    g.extend(parent.map(|(k, rev)| Guard::Revision(k, rev)));
    g.extend(quota.iter().map(|(p, at)| Guard::Unchanged(p, *at)));
    g
}

/// What a create reads first, at one revision: whether the object exists, its Project's
/// revision, and `more`.
pub(crate) struct Snapshot {
    /// The revision everything was read at.
    pub(crate) revision: i64,
    exists: Option<i64>,
    parent: Option<i64>,
    pub(crate) more: Vec<Vec<(String, Stored)>>,
}

pub(crate) async fn snapshot(
    ctx: Ctx<'_>,
    w: &Change<'_>,
    more: &[Read<'_>],
) -> ApiResult<Snapshot> {
    let mut reads = vec![Read::Presence(w.key)];
    reads.extend(w.parent.map(|(k, _)| Read::Presence(k)));
    reads.extend_from_slice(more);
    let (mut got, revision) = ctx.store.read_many(&reads).await.map_err(ApiError::from)?;
    let rest = got.split_off(1 + usize::from(w.parent.is_some()));
    let parent = w.parent.map(|_| {
        got.pop()
            .and_then(|mut v| v.pop())
            .map(|(_, s)| s.mod_revision)
    });
    let exists = got
        .pop()
        .and_then(|mut v| v.pop())
        .map(|(_, s)| s.mod_revision);
    Ok(Snapshot {
        revision,
        exists,
        parent: parent.flatten(),
        more: rest,
    })
}

impl Snapshot {
    /// What the create answers before anything else: the object exists, or its Project
    /// changed (or went) since the create checked it (the create checks it again).
    pub(crate) fn settled(&self, w: &Change<'_>) -> Option<Written> {
        if let Some(rev) = self.exists {
            return Some(Write::Conflict(rev).into());
        }
        if let Some((_, rev)) = w.parent
            && self.parent != Some(rev)
        {
            return Some(Write::Conflict(0).into());
        }
        None
    }

    /// The Project the create holds: as it was checked (and, once [`Self::settled`] passed,
    /// as this snapshot read it).
    pub(crate) fn parent<'a>(&self, w: &Change<'a>) -> Option<(&'a str, i64)> {
        w.parent
    }
}

async fn create_network(
    ctx: Ctx<'_>,
    s: Subject<'_>,
    ns: &str,
    w: Change<'_>,
) -> ApiResult<Written> {
    let spec: NetworkSpec = spec(&s, w.new)?;
    let physical = match (spec.segmentation, spec.physical_network.as_deref()) {
        (Segmentation::Flat, Some(p)) => Some(keys::physical_network_claim(ctx.prefix, p)),
        (Segmentation::Vlan, Some(_)) | (Segmentation::Vxlan, None) => None,
        (Segmentation::Flat | Segmentation::Vlan, None) => {
            return Err(invalid(
                &s,
                w.new,
                vec![Cause {
                    reason: "FieldValueRequired".into(),
                    message: "Required value: a flat or vlan network is bridged to a physical \
                              network"
                        .into(),
                    field: "spec.physicalNetwork".into(),
                }],
            ));
        }
        (Segmentation::Vxlan, Some(_)) => {
            return Err(invalid_field(
                &s,
                w.new,
                "spec.physicalNetwork",
                "Forbidden: only a flat or vlan network has a physical network".into(),
            ));
        }
    };
    if spec.segmentation != Segmentation::Vlan && spec.segmentation_id.is_some() {
        return Err(invalid_field(
            &s,
            w.new,
            "spec.segmentationID",
            "Forbidden: only a vlan network has a segmentation ID".into(),
        ));
    }
    provider_by_admin(&s, w.new, None)?;
    // A vlan network's tag: the one asked for, or one not claimed on its physical network.
    let vlan_on = (spec.segmentation == Segmentation::Vlan)
        .then(|| spec.physical_network.clone())
        .flatten();
    let vlan_prefix = vlan_on.as_deref().map(|p| {
        keys::vlan_claim(ctx.prefix, p, 0)
            .trim_end_matches("0000")
            .to_owned()
    });
    let requested_vlan = vlan_on
        .as_deref()
        .zip(spec.segmentation_id)
        .map(|(p, id)| keys::vlan_claim(ctx.prefix, p, id));
    let mut reads: Vec<Read<'_>> = physical.iter().map(|k| Read::Key(k)).collect();
    match (&requested_vlan, &vlan_prefix) {
        (Some(k), _) => reads.push(Read::Key(k)),
        (None, Some(p)) => reads.push(Read::Prefix(p)),
        (None, None) => {}
    }
    for _ in 0..RETRIES {
        let quota = quota::check(ctx, s, ns, w).await?;
        let snap = snapshot(ctx, &w, &reads).await?;
        if let Some(done) = snap.settled(&w) {
            return Ok(done);
        }
        let vlan = match vlan_on.as_deref() {
            None => None,
            Some(p) => Some(vlan_id(&s, w.new, p, spec.segmentation_id, &snap.more[0])?),
        };
        if let Some((_, held)) = physical
            .is_some()
            .then(|| snap.more.first().and_then(|v| v.first()))
            .flatten()
        {
            let by = held
                .value
                .get("network")
                .and_then(Value::as_str)
                .unwrap_or("another network");
            return Err(conflict_field(
                &s,
                w.new,
                "spec.physicalNetwork",
                format!(
                    "physical network {:?} is already used by flat network {by}",
                    spec.physical_network.as_deref().unwrap_or_default()
                ),
            ));
        }
        let claim = json!({
            "network": format!("{ns}/{}", name_of(w.new)),
            "uid": meta::meta_str(w.new, "uid").unwrap_or_default(),
        });
        let mut obj = w.new.clone();
        let vni = (spec.segmentation == Segmentation::Vxlan)
            .then(|| u32::try_from(random() % u64::from(VNI_MAX)).unwrap_or(0) + 1);
        let vni_key = vni.map(|v| keys::vni_claim(ctx.prefix, v));
        if let Some(v) = vni {
            set_status(&mut obj, Map::from_iter([("vni".into(), json!(v))]));
        }
        let vlan_key = vlan_on.as_deref().zip(vlan).map(|(p, id)| {
            set_status(
                &mut obj,
                Map::from_iter([("segmentationID".into(), json!(id))]),
            );
            keys::vlan_claim(ctx.prefix, p, id)
        });
        let mut guards = create_guards(w.key, snap.parent(&w), &quota);
        let mut puts = vec![(w.key, &obj)];
        for k in vni_key.iter().chain(&physical).chain(&vlan_key) {
            guards.push(Guard::Absent(k));
            puts.push((k, &claim));
        }
        if let Some(rev) = ctx
            .store
            .write_many(&guards, &puts, &[])
            .await
            .map_err(ApiError::from)?
        {
            return Ok(Written {
                write: Write::Done(rev),
                stored: Some(obj),
            });
        }
        // Another write got in between (a VNI taken, the quota's count moved): read again.
    }
    Err(too_busy(&s, w.new))
}

/// A vlan Network's VLAN ID on physical network `physical`: `requested` when no Network
/// holds it, else the lowest one free. `held`: the claims read (the requested one's key, or
/// every claim on `physical`).
///
/// # Errors
/// 409 naming `spec.segmentationID` when the requested ID is held, or when every ID is.
fn vlan_id(
    s: &Subject<'_>,
    new: &Value,
    physical: &str,
    requested: Option<u16>,
    held: &[(String, Stored)],
) -> ApiResult<u16> {
    let taken: BTreeSet<u16> = held
        .iter()
        .filter_map(|(k, _)| k.rsplit('/').next()?.parse().ok())
        .collect();
    if let Some(id) = requested {
        if let Some((_, by)) = held.first() {
            let by = by
                .value
                .get("network")
                .and_then(Value::as_str)
                .unwrap_or("another network");
            return Err(conflict_field(
                s,
                new,
                "spec.segmentationID",
                format!(
                    "VLAN {id} on physical network {physical:?} is already used by network {by}"
                ),
            ));
        }
        return Ok(id);
    }
    (1..=VLAN_MAX)
        .find(|id| !taken.contains(id))
        .ok_or_else(|| {
            conflict_field(
                s,
                new,
                "spec.segmentationID",
                format!("every VLAN ID on physical network {physical:?} is in use"),
            )
        })
}

/// Refuses a Network that is flat (bridged to a host interface) or external (the cloud's
/// uplink) unless a cluster admin writes it, as Neutron's provider attributes are the
/// operator's: a tenant's ports would otherwise sit on the host's own segment. `old`: the
/// stored Network, on an update (only what changes is checked).
///
/// # Errors
/// 403 naming the field.
fn provider_by_admin(s: &Subject<'_>, new: &Value, old: Option<&Value>) -> ApiResult<()> {
    if super::by_cluster_admin() {
        return Ok(());
    }
    let changed = |p: &str| old.is_none_or(|o| o.pointer(p) != new.pointer(p));
    let refuse = |field: &str, what: &str| {
        Err(ApiError::forbidden(format!(
            "{}.{} {:?} is forbidden: {field}: only cluster admins make {what} networks",
            s.plural,
            s.group,
            name_of(new)
        )))
    };
    if let Some(seg @ ("flat" | "vlan")) = new.pointer("/spec/segmentation").and_then(Value::as_str)
        && changed("/spec/segmentation")
    {
        return refuse("spec.segmentation", &format!("{seg} (provider)"));
    }
    if new.pointer("/spec/external").and_then(Value::as_bool) == Some(true)
        && changed("/spec/external")
    {
        return refuse("spec.external", "external");
    }
    Ok(())
}

/// An IPv4 address of a field, or why not.
pub(crate) fn ipv4(v: &str) -> Result<u32, String> {
    match v.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V4(a)) => Ok(u32::from(a)),
        Ok(std::net::IpAddr::V6(_)) => Err(format!(
            "Unsupported value: {v:?}: IPv6 is not supported yet"
        )),
        Err(_) => Err(format!("Invalid value: {v:?}: not an IP address")),
    }
}

pub(crate) fn show(a: u32) -> String {
    Ipv4Addr::from(a).to_string()
}

/// A Subnet's addresses as allocation sees them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The network address.
    pub network: u32,
    /// The prefix length.
    pub prefix: u8,
    /// The gateway address, if any.
    pub gateway: Option<u32>,
    /// Allocation pools, inclusive, sorted, disjoint.
    pub pools: Vec<(u32, u32)>,
}

impl Plan {
    /// The broadcast address.
    pub fn broadcast(&self) -> u32 {
        self.network | (u32::MAX >> self.prefix)
    }

    /// Whether `a` is inside the CIDR.
    pub fn contains(&self, a: u32) -> bool {
        a & !(u32::MAX >> self.prefix) == self.network
    }

    /// Whether two CIDRs share an address.
    pub fn overlaps(&self, other: &Plan) -> bool {
        self.network <= other.broadcast() && other.network <= self.broadcast()
    }

    /// The CIDR as written.
    pub fn cidr(&self) -> String {
        format!("{}/{}", show(self.network), self.prefix)
    }

    /// How many addresses the pools hold.
    pub fn size(&self) -> u64 {
        self.pools.iter().map(|(a, b)| u64::from(b - a) + 1).sum()
    }

    /// Whether `a` may be a Port's address: inside the CIDR, neither its network nor its
    /// broadcast address.
    pub fn host(&self, a: u32) -> bool {
        self.contains(a) && a != self.network && a != self.broadcast()
    }
}

/// Checks a Subnet's spec: an IPv4 CIDR with its host bits zero, a gateway inside it and
/// outside the pools, pools inside it, each in order and none overlapping another.
///
/// # Errors
/// Every field at fault, with why.
pub fn plan(spec: &SubnetSpec) -> Result<Plan, Vec<Cause>> {
    let bad = |field: &str, m: String| vec![Cause::invalid(field, m)];
    let (addr, len) = spec
        .cidr
        .split_once('/')
        .ok_or_else(|| bad("spec.cidr", "Invalid value: not a CIDR".into()))?;
    let network = ipv4(addr).map_err(|m| bad("spec.cidr", m))?;
    let prefix: u8 = len.parse().ok().filter(|l| *l <= 32).ok_or_else(|| {
        bad(
            "spec.cidr",
            "Invalid value: a prefix length is 0 to 32".into(),
        )
    })?;
    if !(MIN_PREFIX..=MAX_PREFIX).contains(&prefix) {
        return Err(bad(
            "spec.cidr",
            format!(
                "Invalid value: {:?}: the prefix length must be /{MIN_PREFIX} to /{MAX_PREFIX}",
                spec.cidr
            ),
        ));
    }
    let mask = !(u32::MAX >> prefix);
    if network & !mask != 0 {
        return Err(bad(
            "spec.cidr",
            format!(
                "Invalid value: {:?}: the host bits must be zero (did you mean {}/{prefix}?)",
                spec.cidr,
                show(network & mask)
            ),
        ));
    }
    let mut plan = Plan {
        network,
        prefix,
        gateway: None,
        pools: Vec::new(),
    };
    let (first, last) = (network + 1, plan.broadcast() - 1);
    let mut causes = Vec::new();
    let range = plan.clone();
    let inside = |field: String, v: &str, causes: &mut Vec<Cause>| match ipv4(v) {
        Ok(a) if range.host(a) => Some(a),
        Ok(_) => {
            causes.push(Cause::invalid(
                field,
                format!(
                    "Invalid value: {v:?}: not a host address of {} ({} to {})",
                    spec.cidr,
                    show(first),
                    show(last)
                ),
            ));
            None
        }
        Err(m) => {
            causes.push(Cause::invalid(field, m));
            None
        }
    };
    plan.gateway = match (spec.disable_gateway, spec.gateway_ip.as_deref()) {
        (true, Some(_)) => {
            causes.push(Cause::invalid(
                "spec.gatewayIP",
                "Forbidden: disableGateway is set",
            ));
            None
        }
        (true, None) => None,
        (false, Some(g)) => inside("spec.gatewayIP".into(), g, &mut causes),
        (false, None) => Some(first),
    };
    if spec.allocation_pools.len() > MAX_POOLS {
        causes.push(Cause::invalid(
            "spec.allocationPools",
            format!(
                "Too many: {}: at most {MAX_POOLS}",
                spec.allocation_pools.len()
            ),
        ));
    } else if spec.allocation_pools.is_empty() {
        // Every host address but the gateway.
        plan.pools = match plan.gateway {
            Some(g) => [(first, g.wrapping_sub(1)), (g + 1, last)]
                .into_iter()
                .filter(|(a, b)| a <= b && *a >= first && *b <= last)
                .collect(),
            None => vec![(first, last)],
        };
    } else {
        let mut pools = Vec::new();
        for (i, p) in spec.allocation_pools.iter().enumerate() {
            let f = |end: &str| format!("spec.allocationPools[{i}].{end}");
            let start = inside(f("start"), &p.start, &mut causes);
            let end = inside(f("end"), &p.end, &mut causes);
            if let (Some(a), Some(b)) = (start, end) {
                if a > b {
                    causes.push(Cause::invalid(
                        f("end"),
                        format!("Invalid value: {:?}: before start {:?}", p.end, p.start),
                    ));
                } else {
                    pools.push((a, b, i));
                }
            }
        }
        pools.sort_unstable();
        for pair in pools.windows(2) {
            let ((_, b, i), (c, _, j)) = (pair[0], pair[1]);
            if c <= b {
                causes.push(Cause::invalid(
                    format!("spec.allocationPools[{j}]"),
                    format!("Invalid value: overlaps spec.allocationPools[{i}]"),
                ));
            }
        }
        if let Some(g) = plan.gateway
            && let Some((_, _, i)) = pools.iter().find(|(a, b, _)| (*a..=*b).contains(&g))
        {
            causes.push(Cause::invalid(
                "spec.gatewayIP",
                format!(
                    "Invalid value: {:?}: inside spec.allocationPools[{i}]; the gateway is never allocated to a port",
                    show(g)
                ),
            ));
        }
        plan.pools = pools.into_iter().map(|(a, b, _)| (a, b)).collect();
    }
    if causes.is_empty() {
        Ok(plan)
    } else {
        Err(causes)
    }
}

/// The Network a Subnet or Port names, read at its create: its uid and revision.
pub(crate) fn network_of<'a>(
    s: &Subject<'_>,
    obj: &Value,
    network: &str,
    read: Option<&'a (String, Stored)>,
) -> ApiResult<(&'a str, i64)> {
    let Some((_, net)) = read else {
        return Err(not_found_field(
            s,
            obj,
            "spec.network",
            format!("Not found: network {network:?} does not exist in this namespace"),
        ));
    };
    if net.value.pointer("/metadata/deletionTimestamp").is_some() {
        return Err(conflict_field(
            s,
            obj,
            "spec.network",
            format!("network {network:?} is being deleted"),
        ));
    }
    Ok((
        meta::meta_str(&net.value, "uid").unwrap_or_default(),
        net.mod_revision,
    ))
}

/// The Subnets of one Network among a namespace's: those naming it and admitted on its uid.
pub(crate) fn subnets_on<'a>(
    all: &'a [(String, Stored)],
    network: &'a str,
    uid: &'a str,
) -> impl Iterator<Item = (&'a str, &'a Value)> + 'a {
    all.iter()
        .map(|(_, s)| &s.value)
        .filter(move |v| {
            v.pointer("/spec/network").and_then(Value::as_str) == Some(network)
                && annotation(v) == Some(uid)
        })
        .map(|v| (name_of(v), v))
}

/// A stored Subnet's plan (`None` for one this admission would refuse now).
pub(crate) fn stored_plan(subnet: &Value) -> Option<Plan> {
    let spec: SubnetSpec = serde_json::from_value(subnet.get("spec")?.clone()).ok()?;
    plan(&spec).ok()
}

async fn create_subnet(
    ctx: Ctx<'_>,
    s: Subject<'_>,
    ns: &str,
    w: Change<'_>,
) -> ApiResult<Written> {
    let spec: SubnetSpec = spec(&s, w.new)?;
    let mine = plan(&spec).map_err(|c| invalid(&s, w.new, c))?;
    let net_key = keys::object(ctx.prefix, GROUP, "networks", Some(ns), &spec.network);
    let subnets = s.collection(ctx.prefix, ns);
    for _ in 0..RETRIES {
        let quota = quota::check(ctx, s, ns, w).await?;
        let snap = snapshot(ctx, &w, &[Read::Key(&net_key), Read::Prefix(&subnets)]).await?;
        if let Some(done) = snap.settled(&w) {
            return Ok(done);
        }
        let (uid, net_rev) = network_of(&s, w.new, &spec.network, snap.more[0].first())?;
        for (other, v) in subnets_on(&snap.more[1], &spec.network, uid) {
            if let Some(p) = stored_plan(v).filter(|p| p.overlaps(&mine)) {
                return Err(invalid_field(
                    &s,
                    w.new,
                    "spec.cidr",
                    format!(
                        "Invalid value: {:?}: overlaps subnet {other:?} ({}) of network {:?}",
                        spec.cidr,
                        p.cidr(),
                        spec.network
                    ),
                ));
            }
        }
        // The gateway is claimed for the Subnet, so no Port takes it; a Port that outlived an
        // earlier subnet of the range may hold it already.
        let gateway = mine
            .gateway
            .map(|g| keys::ip_claim(ctx.prefix, uid, Ipv4Addr::from(g)));
        if let Some(k) = &gateway
            && let Some(held) = ctx.store.get(k).await.map_err(ApiError::from)?
        {
            // Claimed after the subnets were read (an overlapping subnet created meanwhile,
            // which holds the same gateway): read again, and the overlap is what is refused.
            if held.mod_revision > snap.revision {
                continue;
            }
            return Err(conflict_field(
                &s,
                w.new,
                "spec.gatewayIP",
                format!(
                    "address {} is already in use on network {:?} (by {})",
                    mine.gateway.map(show).unwrap_or_default(),
                    spec.network,
                    holder(&held.value)
                ),
            ));
        }
        // The DHCP server's address, as Neutron's DHCP port takes one: the first free address
        // of the pools, claimed for the Subnet so that no Port takes it.
        let dhcp = if spec.enable_dhcp {
            match first_free(ctx, uid, &mine, &HashSet::new()).await? {
                Some(a) => Some(a),
                None => {
                    return Err(conflict_field(
                        &s,
                        w.new,
                        "spec.allocationPools",
                        format!(
                            "no free address for the subnet's DHCP server: all {} addresses of the allocation pools are allocated (set enableDHCP: false to serve none)",
                            mine.size()
                        ),
                    ));
                }
            }
        } else {
            None
        };
        let dhcp_key = dhcp.map(|a| keys::ip_claim(ctx.prefix, uid, Ipv4Addr::from(a)));
        let mut obj = owned_by_network(w.new, &spec.network, uid);
        set_annotation(&mut obj, uid);
        let mut status = Map::new();
        if let Some(g) = mine.gateway {
            status.insert("gatewayIP".into(), json!(show(g)));
        }
        if let Some(a) = dhcp {
            status.insert("dhcpIP".into(), json!(show(a)));
        }
        set_status(&mut obj, status);
        let mut guards = create_guards(w.key, snap.parent(&w), &quota);
        guards.push(Guard::Revision(&net_key, net_rev));
        // No Subnet of the namespace appeared or changed since they were read: two
        // overlapping creates cannot both pass.
        guards.push(Guard::Unchanged(&subnets, snap.revision));
        let claim = json!({
            "subnet": format!("{ns}/{}", name_of(w.new)),
            "uid": meta::meta_str(w.new, "uid").unwrap_or_default(),
            "role": "gateway",
        });
        let dhcp_claim = json!({
            "subnet": format!("{ns}/{}", name_of(w.new)),
            "uid": meta::meta_str(w.new, "uid").unwrap_or_default(),
            "role": "DHCP server",
        });
        let mut puts = vec![(w.key, &obj)];
        if let Some(k) = &gateway {
            guards.push(Guard::Absent(k));
            puts.push((k.as_str(), &claim));
        }
        // Taken by a Port meanwhile: the guard fails, and the create looks again.
        if let Some(k) = &dhcp_key {
            guards.push(Guard::Absent(k));
            puts.push((k.as_str(), &dhcp_claim));
        }
        if let Some(rev) = ctx
            .store
            .write_many(&guards, &puts, &[])
            .await
            .map_err(ApiError::from)?
        {
            return Ok(Written {
                write: Write::Done(rev),
                stored: Some(obj),
            });
        }
    }
    Err(too_busy(&s, w.new))
}

/// An update of a Subnet turning DHCP on: its DHCP server's address claimed as at create (the
/// first free address of its pools), with the update, in one transaction guarded by the
/// Subnet's revision (a concurrent writer gets 409).
async fn enable_dhcp(
    ctx: Ctx<'_>,
    s: &Subject<'_>,
    w: &Change<'_>,
    mut new: Value,
    mine: &Plan,
    rev: i64,
) -> ApiResult<Written> {
    let Some(uid) = annotation(&new).map(str::to_owned) else {
        return Err(invalid_field(
            s,
            w.new,
            "spec.enableDHCP",
            "Invalid value: the subnet records no network to claim an address on".into(),
        ));
    };
    let claim = json!({
        "subnet": format!("{}/{}", s.namespace.unwrap_or_default(), name_of(&new)),
        "uid": meta::meta_str(&new, "uid").unwrap_or_default(),
        "role": "DHCP server",
    });
    for _ in 0..RETRIES {
        let Some(a) = first_free(ctx, &uid, mine, &HashSet::new()).await? else {
            return Err(conflict_field(
                s,
                w.new,
                "spec.enableDHCP",
                format!(
                    "no free address for the subnet's DHCP server: all {} addresses of the allocation pools are allocated",
                    mine.size()
                ),
            ));
        };
        let key = keys::ip_claim(ctx.prefix, &uid, Ipv4Addr::from(a));
        set_status(
            &mut new,
            Map::from_iter([("dhcpIP".into(), json!(show(a)))]),
        );
        let guards = [Guard::Revision(w.key, rev), Guard::Absent(&key)];
        let puts = [(w.key, &new), (key.as_str(), &claim)];
        if let Some(done) = ctx
            .store
            .write_many(&guards, &puts, &[])
            .await
            .map_err(ApiError::from)?
        {
            return Ok(Written {
                write: Write::Done(done),
                stored: Some(new),
            });
        }
        // The Subnet changed meanwhile (a conflict), or a Port took the address (look again).
        let now = ctx.store.get(w.key).await.map_err(ApiError::from)?;
        match now.map(|n| n.mod_revision) {
            Some(r) if r == rev => {}
            other => {
                return Ok(Written {
                    write: Write::Conflict(other.unwrap_or(0)),
                    stored: None,
                });
            }
        }
    }
    Err(too_busy(s, w.new))
}

/// One address a Port asks for, resolved against its Network's Subnets.
struct Wanted<'a> {
    /// The field the address comes from (`spec.fixedIPs[i]`, or `spec.fixedIPs` for the
    /// address taken from each subnet when none is asked for).
    field: String,
    subnet: &'a str,
    plan: Plan,
    /// The address asked for; `None`: allocate one.
    ip: Option<u32>,
}

/// A MAC address asked for, lower case, if it can be a port's: unicast and not zero.
fn mac(v: &str) -> Result<String, String> {
    let octets: Vec<u8> = v
        .split(':')
        .map(|o| u8::from_str_radix(o, 16))
        .collect::<Result<_, _>>()
        .map_err(|_| format!("Invalid value: {v:?}: not a MAC address"))?;
    match octets.as_slice() {
        [first, ..] if octets.len() == 6 && first & 1 == 0 && octets.iter().any(|o| *o != 0) => {
            Ok(v.to_ascii_lowercase())
        }
        _ if octets.len() == 6 => Err(format!(
            "Invalid value: {v:?}: a port's MAC address is unicast and not zero"
        )),
        _ => Err(format!("Invalid value: {v:?}: not a MAC address")),
    }
}

/// A random locally administered unicast MAC in Neutron's `fa:16:3e` range.
fn random_mac() -> String {
    let r = random();
    format!(
        "fa:16:3e:{:02x}:{:02x}:{:02x}",
        (r >> 16) & 0xff,
        (r >> 8) & 0xff,
        r & 0xff
    )
}

fn ip_of(key: &str) -> Option<u32> {
    let hex = key.rsplit('/').next()?;
    u32::from_str_radix(hex, 16).ok()
}

/// A free address of `plan`'s pools on the Network `uid`, none of `avoid`; `None` when the
/// pools are exhausted. See the module's documentation.
pub(crate) async fn pick(
    ctx: Ctx<'_>,
    uid: &str,
    plan: &Plan,
    avoid: &HashSet<u32>,
) -> ApiResult<Option<u32>> {
    let total = plan.size();
    if total == 0 {
        return Ok(None);
    }
    let prefix = keys::ip_claims(ctx.prefix, uid);
    let key = |a: u32| keys::ip_claim(ctx.prefix, uid, Ipv4Addr::from(a));
    for _ in 0..PROBES {
        // A random address of the pools, and the end of its pool.
        let mut r = random() % total;
        let Some((from, end)) = plan.pools.iter().find_map(|(a, b)| {
            let n = u64::from(b - a) + 1;
            if r < n {
                Some((a + u32::try_from(r).unwrap_or(0), *b))
            } else {
                r -= n;
                None
            }
        }) else {
            break;
        };
        let page = ctx
            .store
            .list(&prefix, Some(&key(from)), 0, WINDOW)
            .await
            .map_err(ApiError::from)?;
        let taken: HashSet<u32> = page.items.iter().filter_map(|(k, _)| ip_of(k)).collect();
        // Past the last claim read, nothing is known unless the read reached the end.
        let known = if page.more {
            taken.iter().copied().max().unwrap_or(end).min(end)
        } else {
            end
        };
        if let Some(a) = (from..=known).find(|a| !taken.contains(a) && !avoid.contains(a)) {
            return Ok(Some(a));
        }
    }
    // Every probe landed in a full stretch: read each pool in order.
    first_free(ctx, uid, plan, avoid).await
}

/// The first free address of `plan`'s pools on the Network `uid` in order, none of `avoid`;
/// `None` when the pools are exhausted. Reads the pools' claims in order, in pages.
pub(crate) async fn first_free(
    ctx: Ctx<'_>,
    uid: &str,
    plan: &Plan,
    avoid: &HashSet<u32>,
) -> ApiResult<Option<u32>> {
    let prefix = keys::ip_claims(ctx.prefix, uid);
    let key = |a: u32| keys::ip_claim(ctx.prefix, uid, Ipv4Addr::from(a));
    for (start, end) in &plan.pools {
        let mut scan = ctx.store.scan(&prefix, Some(&key(*start)), 0, 0);
        let mut next = u64::from(*start);
        let end = u64::from(*end);
        let free = |from: u64, to: u64| {
            (from..to)
                .filter_map(|a| u32::try_from(a).ok())
                .find(|a| !avoid.contains(a))
        };
        'pages: while let Some(page) = scan.next_raw().await.map_err(ApiError::from)? {
            for kv in page {
                let Some(a) = ip_of(&String::from_utf8_lossy(&kv.key)).map(u64::from) else {
                    continue;
                };
                if a > end {
                    break 'pages;
                }
                if let Some(f) = free(next, a) {
                    return Ok(Some(f));
                }
                next = next.max(a + 1);
            }
        }
        if let Some(f) = free(next, end + 1) {
            return Ok(Some(f));
        }
    }
    Ok(None)
}

async fn create_port(ctx: Ctx<'_>, s: Subject<'_>, ns: &str, w: Change<'_>) -> ApiResult<Written> {
    let spec: PortSpec = spec(&s, w.new)?;
    let asked_mac = match spec.mac_address.as_deref() {
        Some(m) => Some(mac(m).map_err(|e| invalid_field(&s, w.new, "spec.macAddress", e))?),
        None => None,
    };
    // The addresses asked for, checked alone first.
    let mut asked: Vec<Option<u32>> = Vec::new();
    let mut causes = Vec::new();
    for (i, f) in spec.fixed_ips.iter().enumerate() {
        let field = format!("spec.fixedIPs[{i}]");
        match (&f.subnet, &f.ip_address) {
            (None, None) => causes.push(Cause {
                reason: "FieldValueRequired".into(),
                message: "Required value: a subnet, an ipAddress, or both".into(),
                field,
            }),
            (_, Some(ip)) => match ipv4(ip) {
                Ok(a) if asked.contains(&Some(a)) => causes.push(Cause {
                    reason: "FieldValueDuplicate".into(),
                    message: format!("Duplicate value: {ip:?}"),
                    field: format!("{field}.ipAddress"),
                }),
                Ok(a) => asked.push(Some(a)),
                Err(m) => causes.push(Cause::invalid(format!("{field}.ipAddress"), m)),
            },
            (Some(_), None) => asked.push(None),
        }
    }
    if !causes.is_empty() {
        return Err(invalid(&s, w.new, causes));
    }
    owned_by_servers_from_controllers(&s, w.new, None)?;
    // A Port made for a Server's entry (controlled by it) is that Server's alone.
    let made_for_server = server_owners(w.new)
        .iter()
        .any(|r| r.get("controller").and_then(Value::as_bool) == Some(true));
    let net_key = keys::object(ctx.prefix, GROUP, "networks", Some(ns), &spec.network);
    let subnets = keys::collection(ctx.prefix, GROUP, "subnets", Some(ns));
    // A Router's interface Port, made by a trusted identity, may take its subnet's gateway.
    let router = router_owner(w.new).filter(|_| super::by_cluster_admin());
    let router_key =
        router.map(|(name, _)| keys::object(ctx.prefix, GROUP, "routers", Some(ns), name));
    // Servers that named this Port before it existed: the one holding the name gets the claim.
    let reserved = super::attachments::reservations(ctx.prefix, ns, name_of(w.new));
    let mut reads = vec![
        Read::Key(&net_key),
        Read::Prefix(&subnets),
        Read::Prefix(&reserved),
    ];
    reads.extend(router_key.as_deref().map(Read::Key));
    for _ in 0..RETRIES {
        let quota = quota::check(ctx, s, ns, w).await?;
        let snap = snapshot(ctx, &w, &reads).await?;
        if let Some(done) = snap.settled(&w) {
            return Ok(done);
        }
        let (uid, net_rev) = network_of(&s, w.new, &spec.network, snap.more[0].first())?;
        // The cloud's uplink is the operator's, as Neutron's policy keeps it from tenants.
        let external = snap.more[0]
            .first()
            .is_some_and(|(_, n)| is_external(&n.value));
        if external && !super::by_cluster_admin() {
            return Err(forbidden_field(
                &s,
                w.new,
                "spec.network",
                format!(
                    "network {:?} is external (spec.external); only cluster admins make ports on external networks",
                    spec.network
                ),
            ));
        }
        let all = &snap.more[1];
        let on_network: Vec<(&str, Plan)> = subnets_on(all, &spec.network, uid)
            .filter_map(|(n, v)| stored_plan(v).map(|p| (n, p)))
            .collect();
        // The subnets whose gateway this Port may take: those its Router, as stored now (the
        // same uid, not being deleted), has an interface on.
        let owner = router.zip(snap.more.get(3).and_then(|r| r.first()));
        let interfaces: Vec<&str> = owner
            .filter(|((_, uid), (_, r))| {
                meta::meta_str(&r.value, "uid") == Some(*uid)
                    && r.value.pointer("/metadata/deletionTimestamp").is_none()
            })
            .and_then(|(_, (_, r))| r.value.pointer("/spec/interfaces")?.as_array())
            .into_iter()
            .flatten()
            .filter_map(|i| i.get("subnet")?.as_str())
            .collect();
        let wanted = resolve(&s, w.new, &spec, &asked, all, &on_network, &interfaces)?;
        // The gateway address this Port takes as a Router's interface, if it does.
        let gateway = wanted
            .iter()
            .find(|x| x.ip.is_some() && x.ip == x.plan.gateway)
            .and_then(|x| x.ip);
        let claim_key = |a: u32| match gateway {
            Some(g) if g == a => gateway_port_claim(ctx.prefix, uid, Ipv4Addr::from(a)),
            _ => keys::ip_claim(ctx.prefix, uid, Ipv4Addr::from(a)),
        };
        // Addresses and a MAC asked for by value: taken is 409 naming the field.
        let mut asked_claims: Vec<(String, String, String)> = wanted
            .iter()
            .filter_map(|x| {
                x.ip.map(|a| {
                    (
                        claim_key(a),
                        format!("{}.ipAddress", x.field),
                        format!("address {}", show(a)),
                    )
                })
            })
            .collect();
        if let Some(m) = asked_mac.as_deref() {
            asked_claims.push((
                keys::mac_claim(ctx.prefix, uid, m),
                "spec.macAddress".into(),
                format!("MAC address {m}"),
            ));
        }
        if !asked_claims.is_empty() {
            let reads: Vec<Read<'_>> = asked_claims.iter().map(|(k, _, _)| Read::Key(k)).collect();
            let (held, _) = ctx.store.read_many(&reads).await.map_err(ApiError::from)?;
            for ((_, field, what), h) in asked_claims.iter().zip(&held) {
                if let Some((_, c)) = h.first() {
                    return Err(conflict_field(
                        &s,
                        w.new,
                        field,
                        format!(
                            "{what} is already in use on network {:?} (by {})",
                            spec.network,
                            holder(&c.value)
                        ),
                    ));
                }
            }
        }
        // Addresses to allocate.
        let mut chosen: HashSet<u32> = wanted.iter().filter_map(|x| x.ip).collect();
        let mut fixed = Vec::new();
        for x in &wanted {
            let a = match x.ip {
                Some(a) => a,
                None => match pick(ctx, uid, &x.plan, &chosen).await? {
                    Some(a) => a,
                    None => {
                        return Err(conflict_field(
                            &s,
                            w.new,
                            &x.field,
                            format!(
                                "subnet {:?} ({}) has no free address: all {} of its allocation pools are allocated",
                                x.subnet,
                                x.plan.cidr(),
                                x.plan.size()
                            ),
                        ));
                    }
                },
            };
            chosen.insert(a);
            fixed.push((x.subnet, a));
        }
        let mac = asked_mac.clone().unwrap_or_else(random_mac);
        let mut obj = w.new.clone();
        set_annotation(&mut obj, uid);
        // Set here alone: what a create asks for is dropped.
        let taken = gateway.map(show);
        set_annotation_to(&mut obj, ROUTER_GATEWAY, taken.as_deref());
        // A reservation becomes the claim only if its Server may use this Port's network:
        // on an external one, only a Server a cluster admin wrote.
        let reservation = snap
            .more
            .get(2)
            .and_then(|r| r.first())
            .filter(|_| !made_for_server)
            .filter(|(_, r)| !external || super::attachments::may_attach_external(&r.value));
        let claim = reservation.and_then(|(_, r)| {
            Some(claim_value(
                r.value.get("server")?.as_str()?,
                r.value.get("uid")?.as_str()?,
            ))
        });
        set_annotation_to(&mut obj, CLAIMED_BY, claim.as_deref());
        set_status(
            &mut obj,
            Map::from_iter([
                ("phase".into(), json!("Down")),
                ("macAddress".into(), json!(mac)),
                (
                    "fixedIPs".into(),
                    json!(
                        fixed
                            .iter()
                            .map(|(sn, a)| json!({"subnet": sn, "ipAddress": show(*a)}))
                            .collect::<Vec<_>>()
                    ),
                ),
            ]),
        );
        let holder = json!({
            "port": format!("{ns}/{}", name_of(w.new)),
            "uid": meta::meta_str(w.new, "uid").unwrap_or_default(),
        });
        let claims: Vec<String> = fixed
            .iter()
            .map(|(_, a)| claim_key(*a))
            .chain(std::iter::once(keys::mac_claim(ctx.prefix, uid, &mac)))
            .collect();
        let mut guards = create_guards(w.key, snap.parent(&w), &quota);
        guards.push(Guard::Revision(&net_key, net_rev));
        // The subnets the addresses come from are as read (not deleted meanwhile).
        guards.extend(
            all.iter()
                .filter(|(_, sn)| {
                    annotation(&sn.value) == Some(uid)
                        && fixed.iter().any(|(n, _)| *n == name_of(&sn.value))
                })
                .map(|(k, sn)| Guard::Revision(k, sn.mod_revision)),
        );
        guards.extend(claims.iter().map(|k| Guard::Absent(k)));
        // No Server named it meanwhile; the reservation taken becomes the claim.
        guards.push(Guard::Unchanged(&reserved, snap.revision));
        let taken_reservation: Vec<&str> =
            reservation.map(|(k, _)| k.as_str()).into_iter().collect();
        // The Router whose interface takes a gateway is as read.
        if gateway.is_some()
            && let (Some(k), Some((_, (_, r)))) = (router_key.as_deref(), owner)
        {
            guards.push(Guard::Revision(k, r.mod_revision));
        }
        let mut puts = vec![(w.key, &obj)];
        puts.extend(claims.iter().map(|k| (k.as_str(), &holder)));
        if let Some(rev) = ctx
            .store
            .write_many(&guards, &puts, &taken_reservation)
            .await
            .map_err(ApiError::from)?
        {
            return Ok(Written {
                write: Write::Done(rev),
                stored: Some(obj),
            });
        }
        // An address or MAC went to another port meanwhile, or the network, project or quota
        // count moved: read again.
    }
    Err(too_busy(&s, w.new))
}

/// Refuses the delete of a Network or Subnet that Ports are on (409 naming them), as Neutron
/// refuses to delete a network or subnet in use: the Ports would keep addresses of what is
/// gone. Admitted without a look: a delete in a Project being deleted (the project
/// controller empties its namespace in no particular order), a Subnet whose Network is gone
/// or going (the garbage collector collecting it), an object admitted before IPAM recorded
/// its Network's uid. What was read holds until the delete is written: no Port of the
/// namespace may change meanwhile (a Port's create, in turn, holds its Network and Subnets).
async fn not_in_use(ctx: Ctx<'_>, s: Subject<'_>, obj: &Value) -> ApiResult<Vec<Held>> {
    let Some(ns) = s.namespace else {
        return Ok(Vec::new());
    };
    let name = name_of(obj);
    let (uid, network) = match s.kind {
        "Network" => (meta::meta_str(obj, "uid"), Some(name)),
        _ => (
            annotation(obj),
            obj.pointer("/spec/network").and_then(Value::as_str),
        ),
    };
    let (Some(uid), Some(network)) = (uid, network) else {
        return Ok(Vec::new());
    };
    let project = keys::object(ctx.prefix, "identity.stratus.dev", "projects", None, ns);
    let ports = keys::collection(ctx.prefix, GROUP, "ports", Some(ns));
    let net_key = keys::object(ctx.prefix, GROUP, "networks", Some(ns), network);
    // Floating IPs of any project hold addresses of an external network.
    let claims = keys::ip_claims(ctx.prefix, uid);
    let (got, revision) = ctx
        .store
        .read_many(&[
            Read::Key(&project),
            Read::Key(&net_key),
            Read::Prefix(&ports),
            Read::Prefix(&claims),
        ])
        .await
        .map_err(ApiError::from)?;
    let going = |v: &Value| v.pointer("/metadata/deletionTimestamp").is_some();
    if got[0].first().is_none_or(|(_, p)| going(&p.value)) {
        return Ok(Vec::new());
    }
    if s.kind == "Subnet"
        && got[1]
            .first()
            .is_none_or(|(_, n)| going(&n.value) || meta::meta_str(&n.value, "uid") != Some(uid))
    {
        return Ok(Vec::new());
    }
    let on_it = |p: &Value| {
        annotation(p) == Some(uid)
            && match s.kind {
                "Network" => p.pointer("/spec/network").and_then(Value::as_str) == Some(name),
                _ => p
                    .pointer("/status/fixedIPs")
                    .and_then(Value::as_array)
                    .is_some_and(|f| {
                        f.iter()
                            .any(|f| f.get("subnet").and_then(Value::as_str) == Some(name))
                    }),
            }
    };
    let mut users: Vec<&str> = got[2]
        .iter()
        .map(|(_, p)| &p.value)
        .filter(|p| on_it(p))
        .map(name_of)
        .collect();
    let subnet = (s.kind == "Subnet").then(|| stored_plan(obj)).flatten();
    let floating: Vec<String> = got[3]
        .iter()
        .filter(|(k, _)| {
            s.kind == "Network"
                || ip_of(k).is_some_and(|a| subnet.as_ref().is_some_and(|p| p.contains(a)))
        })
        .filter_map(|(_, c)| c.value.get("floatingip").and_then(Value::as_str))
        .map(|f| format!("floating IP {f}"))
        .collect();
    users.extend(floating.iter().map(String::as_str));
    if users.is_empty() {
        return Ok(vec![
            Held {
                prefix: ports,
                revision,
            },
            Held {
                prefix: claims,
                revision,
            },
        ]);
    }
    let shown = users.iter().take(5).copied().collect::<Vec<_>>().join(", ");
    let more = match users.len() {
        n if n > 5 => format!(" and {} more", n - 5),
        _ => String::new(),
    };
    Err(ApiError::conflict(
        s.group,
        s.plural,
        name,
        format!(
            "{} {name:?} is in use by {} port(s) or floating IP(s) ({shown}{more}); delete them first",
            s.kind.to_ascii_lowercase(),
            users.len()
        ),
    ))
}

/// The owner references of `port` that name a Server.
fn server_owners(port: &Value) -> Vec<&Value> {
    port.pointer("/metadata/ownerReferences")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter(|r| r.get("kind").and_then(Value::as_str) == Some("Server"))
        .collect()
}

/// Refuses a Port's create or update (`old`: the stored Port) that adds, changes or removes an
/// owner reference naming a Server, unless a cluster admin or the controllers write it: a Port
/// controlled by a Server is that Server's alone and only the ports controller makes one
/// (another writer's would pass for the Server's own), any reference to a Server hands the
/// Port to the garbage collector with it, and a reference taken off a Port made for a Server
/// (which carries no claim until it is bound) would let another Server claim it. Decided on the
/// object as written, whatever the verb.
///
/// # Errors
/// 403 naming `metadata.ownerReferences`.
fn owned_by_servers_from_controllers(
    s: &Subject<'_>,
    new: &Value,
    old: Option<&Value>,
) -> ApiResult<()> {
    let before = old.map(server_owners).unwrap_or_default();
    let after = server_owners(new);
    let added = after.iter().any(|r| !before.contains(r));
    let removed = before.iter().any(|r| !after.contains(r));
    if (added || removed) && !super::by_cluster_admin() {
        let why = if added {
            "only the ports controller makes a port owned by a server"
        } else {
            "only the ports controller takes a server's owner reference off a port"
        };
        return Err(forbidden_field(
            s,
            new,
            "metadata.ownerReferences",
            why.into(),
        ));
    }
    Ok(())
}

/// The Router (name, uid) a Port's controller owner reference names, if it names one.
fn router_owner(port: &Value) -> Option<(&str, &str)> {
    port.pointer("/metadata/ownerReferences")?
        .as_array()?
        .iter()
        .find(|o| {
            o.get("controller").and_then(Value::as_bool) == Some(true)
                && o.get("kind").and_then(Value::as_str) == Some("Router")
                && o.get("apiVersion").and_then(Value::as_str) == Some("network.stratus.dev/v1")
        })
        .and_then(|o| Some((o.get("name")?.as_str()?, o.get("uid")?.as_str()?)))
}

/// The addresses a Port asks for, against the Subnets of its Network (`on_network`) and of
/// its namespace (`all`, to say which network an address or subnet is on instead).
/// `interfaces`: the subnets whose gateway address the Port may take, as its Router's
/// interface on them (one at most).
fn resolve<'a>(
    s: &Subject<'_>,
    obj: &Value,
    spec: &'a PortSpec,
    asked: &[Option<u32>],
    all: &'a [(String, Stored)],
    on_network: &[(&'a str, Plan)],
    interfaces: &[&str],
) -> ApiResult<Vec<Wanted<'a>>> {
    if spec.fixed_ips.is_empty() {
        return Ok(on_network
            .iter()
            .map(|(n, p)| Wanted {
                field: "spec.fixedIPs".into(),
                subnet: n,
                plan: p.clone(),
                ip: None,
            })
            .collect());
    }
    let elsewhere = |pick: &dyn Fn(&Value) -> bool| {
        all.iter()
            .map(|(_, s)| &s.value)
            .find(|v| pick(v))
            .map(|v| {
                (
                    name_of(v),
                    v.pointer("/spec/network")
                        .and_then(Value::as_str)
                        .unwrap_or_default(),
                )
            })
    };
    let mut out = Vec::new();
    let mut causes = Vec::new();
    for (i, (f, ip)) in spec.fixed_ips.iter().zip(asked).enumerate() {
        let field = format!("spec.fixedIPs[{i}]");
        let found = match f.subnet.as_deref() {
            Some(name) => match on_network.iter().find(|(n, _)| *n == name) {
                Some(x) => Some(x),
                None => {
                    let message = match elsewhere(&|v: &Value| name_of(v) == name) {
                        Some((_, other)) if other != spec.network => format!(
                            "Invalid value: {name:?}: subnet {name:?} is on network {other:?}, not {:?}",
                            spec.network
                        ),
                        Some(_) => format!(
                            "Invalid value: {name:?}: subnet {name:?} does not belong to this network {:?}",
                            spec.network
                        ),
                        None => format!("Not found: subnet {name:?} does not exist"),
                    };
                    causes.push(Cause::invalid(format!("{field}.subnet"), message));
                    continue;
                }
            },
            None => None,
        };
        match (found, ip) {
            (Some((n, p)), None) => out.push(Wanted {
                field,
                subnet: n,
                plan: p.clone(),
                ip: None,
            }),
            (Some((n, p)), Some(a)) if p.host(*a) => out.push(Wanted {
                field,
                subnet: n,
                plan: p.clone(),
                ip: Some(*a),
            }),
            (Some((n, p)), Some(a)) => {
                causes.push(Cause::invalid(
                    format!("{field}.ipAddress"),
                    not_host(n, p, *a),
                ));
            }
            (None, Some(a)) => match on_network.iter().find(|(_, p)| p.contains(*a)) {
                Some((n, p)) if p.host(*a) => out.push(Wanted {
                    field,
                    subnet: n,
                    plan: p.clone(),
                    ip: Some(*a),
                }),
                Some((n, p)) => causes.push(Cause::invalid(
                    format!("{field}.ipAddress"),
                    not_host(n, p, *a),
                )),
                None => {
                    let on_other = elsewhere(&|v: &Value| {
                        v.pointer("/spec/network").and_then(Value::as_str) != Some(&spec.network)
                            && stored_plan(v).is_some_and(|p| p.contains(*a))
                    });
                    let message = match on_other {
                        Some((sn, net)) => format!(
                            "Invalid value: {:?}: in subnet {sn:?} of network {net:?}, not of network {:?}",
                            show(*a),
                            spec.network
                        ),
                        None => format!(
                            "Invalid value: {:?}: not a host address of any subnet of network {:?}",
                            show(*a),
                            spec.network
                        ),
                    };
                    causes.push(Cause::invalid(format!("{field}.ipAddress"), message));
                }
            },
            (None, None) => {}
        }
    }
    if !causes.is_empty() {
        return Err(invalid(s, obj, causes));
    }
    // The gateway is the router's: a Port that is not a router interface never takes it, as
    // in Neutron. A router interface takes one, from the claim its Subnet holds (see
    // `create_subnet`).
    let gateways: Vec<&Wanted<'_>> = out
        .iter()
        .filter(|x| x.ip.is_some() && x.ip == x.plan.gateway)
        .collect();
    let refused = match gateways.as_slice() {
        [x] if interfaces.contains(&x.subnet) => None,
        [x, ..] => Some(x),
        [] => None,
    };
    if let Some(x) = refused {
        return Err(conflict_field(
            s,
            obj,
            &format!("{}.ipAddress", x.field),
            format!(
                "address {} is the subnet's gateway address (subnet {:?}); only a router interface takes it",
                x.ip.map(show).unwrap_or_default(),
                x.subnet
            ),
        ));
    }
    Ok(out)
}

/// Why `a`, inside subnet `n`'s CIDR, is no port's address (the network or broadcast address).
fn not_host(n: &str, p: &Plan, a: u32) -> String {
    let what = if a == p.network {
        "the network address of"
    } else if a == p.broadcast() {
        "the broadcast address of"
    } else {
        "not a host address of"
    };
    format!(
        "Invalid value: {:?}: {what} subnet {n:?} ({}), never a port's",
        show(a),
        p.cidr()
    )
}

/// Keeps annotation `key`, which only admission sets, as `old` has it: restored in `new` when
/// the write dropped it (a replace), a cause (`why`) when it adds or changes it.
fn kept_annotation(
    new: &mut Value,
    old: &Value,
    asked: &Value,
    key: &str,
    why: &str,
    causes: &mut Vec<Cause>,
) {
    let of = |o: &Value| {
        o.pointer("/metadata/annotations")
            .and_then(|a| a.get(key))
            .cloned()
    };
    match (of(old), of(asked)) {
        (Some(a), None) => set_annotation_to(new, key, a.as_str()),
        (a, b) if a != b => {
            causes.push(Cause::invalid(format!("metadata.annotations[{key}]"), why))
        }
        _ => {}
    }
}

/// An update: what allocation claimed and the fields it follows stay as they are (422);
/// the annotation of the Network's uid, dropped by a replace, is kept.
async fn update(
    ctx: Ctx<'_>,
    s: Subject<'_>,
    w: Change<'_>,
    old: &Value,
    rev: i64,
) -> ApiResult<Written> {
    let immutable: &[&str] = match s.kind {
        "Network" => &[
            "/spec/segmentation",
            "/spec/physicalNetwork",
            "/spec/segmentationID",
        ],
        "Subnet" => &[
            "/spec/network",
            "/spec/cidr",
            "/spec/gatewayIP",
            "/spec/disableGateway",
        ],
        "Port" => &["/spec/network", "/spec/fixedIPs", "/spec/macAddress"],
        "FloatingIP" => &["/spec/floatingNetwork"],
        _ => &[],
    };
    let protected: &[&str] = match s.kind {
        "Network" => &["/status/vni"],
        "Subnet" => &["/status/gatewayIP", "/status/dhcpIP"],
        "Port" => &["/status/macAddress", "/status/fixedIPs"],
        "FloatingIP" => &["/status/floatingIPAddress"],
        _ => &[],
    };
    let mut causes = Vec::new();
    for p in immutable.iter().chain(protected) {
        if old.pointer(p) != w.new.pointer(p) {
            let field = p.trim_start_matches('/').replace('/', ".");
            let why = if p.starts_with("/status") {
                "Forbidden: set by address allocation when the object is created"
            } else {
                "Invalid value: field is immutable"
            };
            causes.push(Cause::invalid(field, why));
        }
    }
    let mut new = w.new.clone();
    match (annotation(old), annotation(w.new)) {
        (Some(a), Some(b)) if a != b => causes.push(Cause::invalid(
            format!("metadata.annotations[{NETWORK_UID}]"),
            "Invalid value: field is immutable",
        )),
        (Some(a), None) => set_annotation(&mut new, a),
        _ => {}
    }
    // What a router interface took is its create's, and a Server's claim that Server's
    // write's: never added, changed or dropped by a write to the Port.
    for (key, why) in [
        (
            ROUTER_GATEWAY,
            "Forbidden: set by address allocation when a router interface is created",
        ),
        (CLAIMED_BY, "Forbidden: set when a Server names the port"),
    ] {
        kept_annotation(&mut new, old, w.new, key, why, &mut causes);
    }
    if !causes.is_empty() {
        return Err(invalid(&s, w.new, causes));
    }
    match s.kind {
        "Network" => provider_by_admin(&s, &new, Some(old))?,
        "Port" => owned_by_servers_from_controllers(&s, &new, Some(old))?,
        _ => {}
    }
    if s.kind == "Subnet" && old.get("spec") != new.get("spec") {
        // Pools may change, within the same rules as at create.
        let spec: SubnetSpec = spec(&s, &new)?;
        let mine = plan(&spec).map_err(|c| invalid(&s, w.new, c))?;
        if spec.enable_dhcp && old.pointer("/status/dhcpIP").is_none() {
            return enable_dhcp(ctx, &s, &w, new, &mine, rev).await;
        }
    }
    let written = ctx
        .store
        .write_guarded(w.key, &new, Some(rev), &[], None)
        .await
        .map_err(ApiError::from)?;
    Ok(Written {
        write: written,
        stored: (&new != w.new).then_some(new),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subnet(cidr: &str, extra: Value) -> SubnetSpec {
        let mut v = json!({"network": "n", "cidr": cidr});
        if let (Some(o), Some(e)) = (v.as_object_mut(), extra.as_object()) {
            o.extend(e.clone());
        }
        serde_json::from_value(v).expect("a subnet spec")
    }

    fn a(s: &str) -> u32 {
        ipv4(s).expect("an address")
    }

    #[test]
    fn a_subnet_gets_its_gateway_and_pools_around_it() {
        let p = plan(&subnet("10.0.0.0/24", json!({}))).expect("valid");
        assert_eq!(p.gateway, Some(a("10.0.0.1")));
        assert_eq!(p.pools, vec![(a("10.0.0.2"), a("10.0.0.254"))]);
        assert_eq!(p.size(), 253);
        let p = plan(&subnet("10.0.0.0/24", json!({"gatewayIP": "10.0.0.100"}))).expect("valid");
        assert_eq!(
            p.pools,
            vec![
                (a("10.0.0.1"), a("10.0.0.99")),
                (a("10.0.0.101"), a("10.0.0.254"))
            ]
        );
        let p = plan(&subnet("10.0.0.0/30", json!({"disableGateway": true}))).expect("valid");
        assert_eq!((p.gateway, p.size()), (None, 2));
    }

    #[test]
    fn a_bad_subnet_names_each_field_at_fault() {
        let fields = |spec: SubnetSpec| -> Vec<String> {
            plan(&spec)
                .expect_err("refused")
                .into_iter()
                .map(|c| c.field)
                .collect()
        };
        assert_eq!(fields(subnet("10.0.0.1/24", json!({}))), ["spec.cidr"]);
        assert_eq!(fields(subnet("fd00::/64", json!({}))), ["spec.cidr"]);
        assert_eq!(fields(subnet("10.0.0.0/31", json!({}))), ["spec.cidr"]);
        assert_eq!(
            fields(subnet("10.0.0.0/24", json!({"gatewayIP": "10.0.1.1"}))),
            ["spec.gatewayIP"]
        );
        assert_eq!(
            fields(subnet(
                "10.0.0.0/24",
                json!({"allocationPools": [
                    {"start": "10.0.0.10", "end": "10.0.0.20"},
                    {"start": "10.0.0.20", "end": "10.0.0.30"},
                    {"start": "10.0.0.50", "end": "10.0.0.40"},
                    {"start": "10.0.0.60", "end": "10.0.1.5"},
                ]})
            )),
            [
                "spec.allocationPools[2].end",
                "spec.allocationPools[3].end",
                "spec.allocationPools[1]"
            ]
        );
        assert_eq!(
            fields(subnet(
                "10.0.0.0/24",
                json!({"gatewayIP": "10.0.0.15", "allocationPools": [
                    {"start": "10.0.0.10", "end": "10.0.0.20"},
                ]})
            )),
            ["spec.gatewayIP"]
        );
    }

    #[test]
    fn a_subnets_network_and_broadcast_addresses_are_named_as_such() {
        let p = plan(&subnet("10.0.0.0/24", json!({}))).expect("valid");
        assert!(!p.host(a("10.0.0.0")) && !p.host(a("10.0.0.255")) && p.host(a("10.0.0.1")));
        assert!(not_host("s", &p, a("10.0.0.0")).contains("the network address of subnet \"s\""));
        assert!(not_host("s", &p, a("10.0.0.255")).contains("the broadcast address of subnet"));
        assert!(not_host("s", &p, a("10.0.1.3")).contains("not a host address of subnet"));
    }

    #[test]
    fn cidrs_overlap_when_they_share_an_address() {
        let p = |c: &str| plan(&subnet(c, json!({}))).expect("valid");
        assert!(p("10.0.0.0/16").overlaps(&p("10.0.5.0/24")));
        assert!(!p("10.0.0.0/24").overlaps(&p("10.0.1.0/24")));
    }

    #[test]
    fn macs_are_unicast_and_allocated_locally_administered() {
        assert_eq!(mac("FA:16:3E:00:00:01").as_deref(), Ok("fa:16:3e:00:00:01"));
        assert!(mac("01:00:5e:00:00:01").is_err(), "multicast");
        assert!(mac("00:00:00:00:00:00").is_err());
        let m = random_mac();
        let first = u8::from_str_radix(&m[..2], 16).expect("hex");
        assert!(m.starts_with("fa:16:3e:") && first & 1 == 0 && first & 2 == 2);
        assert_eq!(mac(&m).as_deref(), Ok(m.as_str()));
    }

    #[test]
    fn a_ports_claims_go_with_it_and_a_networks_vni_with_it() {
        let port = json!({
            "metadata": {"name": "p", "annotations": {NETWORK_UID: "u1"}},
            "status": {"macAddress": "fa:16:3e:00:00:01",
                       "fixedIPs": [{"subnet": "s", "ipAddress": "10.0.0.5"}]},
        });
        assert_eq!(
            Ipam.attached_keys("/r", &port),
            vec![
                "/r/_claims/network/u1/ip/0a000005".to_string(),
                "/r/_claims/network/u1/mac/fa:16:3e:00:00:01".to_string(),
            ]
        );
        let subnet = json!({
            "metadata": {"name": "s", "annotations": {NETWORK_UID: "u1"}},
            "status": {"gatewayIP": "10.0.0.1"},
        });
        assert_eq!(
            Ipam.attached_keys("/r", &subnet),
            vec!["/r/_claims/network/u1/ip/0a000001".to_string()],
            "a subnet's gateway goes with it"
        );
        let net = json!({"spec": {"segmentation": "vxlan"}, "status": {"vni": 42}});
        assert_eq!(
            Ipam.attached_keys("/r", &net),
            vec!["/r/_claims/network/vni/00000042".to_string()]
        );
    }
}
