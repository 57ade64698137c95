//! The node authorizer: what a node agent's identity (`system:node:NAME`) may read and write.
//!
//! As Kubernetes' Node authorizer, it walks a graph from the node: the Servers placed on it
//! (`status.hypervisor=NAME`, found through the placement claims the binding keeps per
//! hypervisor, so a decision costs what is placed on the node, not what is in the cloud), and
//! from them their flavors, images (with their kernel and ramdisk images) and keypairs; the
//! Ports placed on it, and from them their Networks, Subnets and SecurityGroups and the other
//! Ports of those Networks; the Routers placed on it (`status.node=NAME`) and the
//! FloatingIPs of those routers (`status.router`); every Hypervisor (read-only, as kubelets
//! read every Node: peers' tunnel addresses); its own Leases (every network agent's Lease
//! read-only: liveness and tunnel addresses) and StoragePools; the Volumes and
//! VolumeSnapshots placed on it (`status.node=NAME`), and the Images those volumes are made
//! from; the VolumeExports naming it (as the node served, `spec.node`, or the storage node
//! serving them, `spec.storageNode`, which alone writes their status); the Events it reports. Nothing else is readable or writable, so a compromised node can neither read other
//! tenants' objects nor touch another node's.
//!
//! Two steps, as in Kubernetes (authorizer, then the NodeRestriction admission): [`restrict`]
//! decides on the typed request alone before anything is read (which kinds and verbs a node may
//! use at all; reads are decided there, on the graph), and [`review`] decides a write on its
//! final objects (old and new, after a patch or apply is applied), inside the verb.

use std::sync::Arc;

use std::collections::BTreeSet;

use serde_json::{Value, json};
use stratus_api_types::compute::{HypervisorSpec, NODE_LEASE_NAMESPACE, TEARDOWN_FINALIZER};
use stratus_api_types::network::NETWORK_AGENT_LEASE_NAMESPACE;
use stratus_api_types::storage::{StoragePoolSpec, TEARDOWN_FINALIZER as STORAGE_TEARDOWN};

use crate::admission::binding::claims_prefix;
use crate::base::error::{ApiError, ApiResult};
use crate::base::meta;
use crate::policy::request::RequestInfo;
use crate::resource::registry::ResourceType;
use crate::resource::review::{Operation, Review};
use crate::resource::verbs::{Api, Params, Target};
use crate::storage::store::{Read, Stored};

/// Servers read in one request when a decision walks what is placed on a node (etcd refuses
/// transactions of more than 128 operations by default).
const READ_BATCH: usize = 64;

/// The stored event a request names, if there is one (events.k8s.io events are kept as core
/// events, with the same `reportingInstance`).
async fn stored_event(api: &Api, info: &RequestInfo) -> ApiResult<(String, Stored)> {
    let rt = api
        .registry
        .get("", "v1", "events")
        .ok_or_else(|| ApiError::internal("the Event kind is not served"))?;
    let t = Target {
        rt: Arc::clone(rt),
        namespace: Some(info.namespace.clone()),
        name: Some(info.name.clone()),
        subresource: None,
    };
    Ok((t.key(api), api.read(&t).await?))
}

/// Whether an event names `node` as its reporting instance.
fn reported_by(event: &Value, node: &str) -> bool {
    event.get("reportingInstance").and_then(Value::as_str) == Some(node)
}

/// Where an object records the node it is placed on.
fn placement_field(resource: &str) -> &'static str {
    match resource {
        "volumes" | "volumesnapshots" | "routers" => "/status/node",
        // A volume's export is the storage node's to serve and report.
        "volumeexports" => "/spec/storageNode",
        _ => "/status/hypervisor",
    }
}

/// Whether `obj` is placed on `node`.
fn placed_on(obj: &Value, resource: &str, node: &str) -> bool {
    obj.pointer(placement_field(resource))
        .and_then(Value::as_str)
        == Some(node)
}

/// The one finalizer a node adds and removes on objects of a type placed on it: the compute
/// agent's teardown finalizer on Servers, the storage agent's on Volumes and VolumeSnapshots.
/// Every other finalizer is another component's.
fn own_finalizer(group: &str, resource: &str) -> Option<&'static str> {
    match (group, resource) {
        ("compute.stratus.dev", "servers") => Some(TEARDOWN_FINALIZER),
        ("storage.stratus.dev", "volumes" | "volumesnapshots") => Some(STORAGE_TEARDOWN),
        _ => None,
    }
}

/// Whether two versions of an object differ in nothing but the node's own finalizer `own`
/// being added or removed (and the bookkeeping every write changes: resourceVersion,
/// managedFields): every other finalizer stays, in its order. The managedFields compared away
/// are the server's own recording: the ones a node sends are ignored
/// ([`Policy::keeps_managed_fields`](crate::resource::review::Policy::keeps_managed_fields)).
fn only_own_finalizer_differs(old: &Value, new: &Value, own: Option<&str>) -> bool {
    let strip = |v: &Value| {
        let mut v = v.clone();
        let mut others = Vec::new();
        if let Some(m) = v.get_mut("metadata").and_then(Value::as_object_mut) {
            if let Some(Value::Array(list)) = m.remove("finalizers") {
                others = list
                    .into_iter()
                    .filter(|f| own.is_none_or(|own| f.as_str() != Some(own)))
                    .collect();
            }
            for f in ["managedFields", "resourceVersion"] {
                m.remove(f);
            }
        }
        (v, others)
    };
    strip(old) == strip(new)
}

/// The status fields of a kind that a node writing its status must leave as they are: what
/// only the placement (`servers/binding`) or address management sets.
fn kept_status_fields(group: &str, resource: &str) -> &'static [&'static str] {
    match (group, resource) {
        ("network.stratus.dev", "ports") => &["macAddress", "fixedIPs", "hypervisor", "boundTo"],
        ("network.stratus.dev", "routers") => &[
            "node",
            "interfaces",
            "externalGatewayPort",
            "externalGatewayIPs",
        ],
        ("network.stratus.dev", "floatingips") => &["floatingIPAddress", "fixedIP", "router"],
        // `attachedTo` and `attachments` are the API server's (a Server's write) and the
        // attachments controller's, as is `attachedNode` (which node a volume is exported to).
        ("storage.stratus.dev", "volumes") => {
            &["pool", "node", "attachedTo", "attachedNode", "attachments"]
        }
        ("storage.stratus.dev", "volumesnapshots") => &["pool", "node", "sizeGiB"],
        _ => &[],
    }
}

/// The Servers holding the stored Volume `vol`: its `status.attachments`, or its
/// `status.attachedTo` alone (a status written before there were attachments).
fn attached_servers(vol: &Value) -> Vec<&str> {
    let listed: Vec<&str> = vol
        .pointer("/status/attachments")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|a| a.get("server").and_then(Value::as_str))
        .collect();
    if !listed.is_empty() {
        return listed;
    }
    vol.pointer("/status/attachedTo")
        .and_then(Value::as_str)
        .into_iter()
        .collect()
}

/// Why a node's write of its StoragePool changes the storage address recorded
/// (`status.storageAddress`), if it does: a node records an IP address once, and then keeps
/// it (a stolen node identity cannot point the compute nodes' NBD connections elsewhere); an
/// operator moves it.
fn moved_storage_address(old: Option<&Value>, new: Option<&Value>) -> Option<String> {
    fn address(v: Option<&Value>) -> Option<&Value> {
        v.and_then(|v| v.pointer("/status/storageAddress"))
            .filter(|a| !a.is_null())
    }
    let (was, now) = (address(old), address(new));
    match (was, now) {
        (Some(a), b) if b != Some(a) => Some(format!(
            "status.storageAddress: recorded as {a}; a node does not move or remove it (an operator does)"
        )),
        (None, Some(b))
            if b.as_str()
                .is_none_or(|b| b.parse::<std::net::IpAddr>().is_err()) =>
        {
            Some(format!("status.storageAddress: {b} is not an IP address"))
        }
        _ => None,
    }
}

/// Why a Hypervisor a node creates for itself is more than its registration, if it is: the
/// node declares where it is and what it runs (`spec.availabilityZone`, `spec.hypervisorType`,
/// as a kubelet declares its topology labels) and nothing an operator owns: every other spec
/// field at its default (allocation ratios, reservations, `disabled`), and no labels,
/// annotations, finalizers or owners.
fn beyond_registration(new: &Value) -> Option<String> {
    if let Some(why) = operator_metadata(new, "Hypervisor") {
        return Some(why);
    }
    let spec = new.get("spec").cloned().unwrap_or_else(|| json!({}));
    let Ok(declared) = serde_json::from_value::<HypervisorSpec>(spec) else {
        return Some("spec: not a Hypervisor's spec".into());
    };
    let registration = json!({
        "availabilityZone": declared.availability_zone,
        "hypervisorType": declared.hypervisor_type,
    });
    let Ok(defaults) = serde_json::from_value::<HypervisorSpec>(registration) else {
        return Some("spec: not a Hypervisor's spec".into());
    };
    if declared == defaults {
        return None;
    }
    let (got, want) = (
        serde_json::to_value(&declared).unwrap_or_default(),
        serde_json::to_value(&defaults).unwrap_or_default(),
    );
    let field = match (got.as_object(), want.as_object()) {
        (Some(g), Some(w)) => g
            .keys()
            .chain(w.keys())
            .find(|k| g.get(*k) != w.get(*k))
            .cloned()
            .unwrap_or_default(),
        _ => String::new(),
    };
    Some(format!(
        "spec.{field}: a node registers its Hypervisor with spec.availabilityZone and spec.hypervisorType alone; the rest of the spec is the operator's"
    ))
}

/// Why `new`, an object a node registers for itself (a `kind`), carries metadata that is the
/// operator's, if it does: labels (placement selects on them), annotations, finalizers or
/// owners.
fn operator_metadata(new: &Value, kind: &str) -> Option<String> {
    ["labels", "annotations", "finalizers", "ownerReferences"]
        .into_iter()
        .find(|field| {
            new.pointer(&format!("/metadata/{field}"))
                .is_some_and(|v| match v {
                    Value::Null => false,
                    Value::Object(m) => !m.is_empty(),
                    Value::Array(a) => !a.is_empty(),
                    _ => true,
                })
        })
        .map(|field| {
            format!(
                "metadata.{field}: a node registers its {kind} with none (they are the operator's)"
            )
        })
}

/// Why a StoragePool a node creates for itself is more than its registration, if it is: the
/// node declares its store (`spec.backend`, `spec.vgName` or `spec.path`) and nothing the
/// volume scheduler places by (labels, `availabilityZone`, `reservedPercentage`, `disabled`),
/// so a compromised node cannot make its pool attract other nodes' volumes.
fn beyond_pool_registration(new: &Value) -> Option<String> {
    if let Some(why) = operator_metadata(new, "StoragePool") {
        return Some(why);
    }
    let spec = new.get("spec").cloned().unwrap_or_else(|| json!({}));
    let Ok(declared) = serde_json::from_value::<StoragePoolSpec>(spec) else {
        return Some("spec: not a StoragePool's spec".into());
    };
    let field = if declared.availability_zone.is_some() {
        "availabilityZone"
    } else if declared.reserved_percentage != 0 {
        "reservedPercentage"
    } else if declared.over_subscription_ratio.is_some() {
        "overSubscriptionRatio"
    } else if declared.disabled {
        "disabled"
    } else {
        return None;
    };
    Some(format!(
        "spec.{field}: a node registers its StoragePool with spec.backend and its store alone; the rest of the spec is the operator's"
    ))
}

/// Whether a node's heartbeat Leases live in `ns`: its compute agent's in `kube-node-lease`,
/// its network agent's in the network agents' namespace.
fn heartbeat_namespace(ns: &str) -> bool {
    ns == NODE_LEASE_NAMESPACE || ns == NETWORK_AGENT_LEASE_NAMESPACE
}

/// The typed request's verbs that write.
fn writes(verb: &str) -> bool {
    matches!(
        verb,
        "create" | "update" | "patch" | "delete" | "deletecollection"
    )
}

/// What a node may do before anything is read: reads are decided here on the graph (for a
/// read allowed by reading the object itself, that object and its key are returned, and the
/// request is answered with what was checked, not with a second read); writes are refused
/// unless they are of a kind and verb a node uses, and are then decided by [`review`] on the
/// objects they would store.
///
/// # Errors
/// 403 for a refused request; what reading the objects a decision needs fails with.
pub async fn restrict(
    api: &Api,
    info: &RequestInfo,
    params: &Params,
    node: &str,
) -> ApiResult<Option<(String, Stored)>> {
    let Some(group) = info.group.as_deref() else {
        // Discovery and OpenAPI.
        return Ok(None);
    };
    if matches!(info.verb.as_str(), "get" | "list" | "watch") {
        return node_may_read(api, info, params, node).await;
    }
    let verb = info.verb.as_str();
    let sub = info.subresource.as_str();
    if group == "compute.stratus.dev"
        && info.resource == "hypervisors"
        && matches!(verb, "delete" | "deletecollection")
    {
        return Err(ApiError::forbidden(format!(
            "node \"{node}\" cannot {verb} hypervisors: deleting a Hypervisor decommissions its node (its servers are evacuated), which an operator does"
        )));
    }
    let own_name = |allow_unnamed_create: bool| {
        info.name == node || (allow_unnamed_create && info.name.is_empty() && verb == "create")
    };
    let allowed = writes(verb)
        && verb != "deletecollection"
        && match (group, info.resource.as_str(), sub) {
            ("" | "events.k8s.io", "events", "") => matches!(verb, "create" | "update" | "patch"),
            ("coordination.k8s.io", "leases", "") => {
                heartbeat_namespace(&info.namespace) && own_name(true)
            }
            ("compute.stratus.dev", "hypervisors", "" | "status") => own_name(sub.is_empty()),
            ("object.stratus.dev", "objectnodes", "" | "status") => own_name(sub.is_empty()),
            ("storage.stratus.dev", "storagepools", "" | "status") => true,
            (_, _, "status") => matches!(verb, "update" | "patch"),
            // Releasing a finalizer of what is placed on the node (decided by `review`).
            (_, _, "") => matches!(verb, "update" | "patch"),
            _ => false,
        };
    if allowed && group == "network.stratus.dev" && info.resource == "floatingips" {
        // A floating IP is placed with its router: decided on the one stored now, whose
        // router `review` keeps.
        return floating_ip_of_node(api, &info.namespace, &info.name, node)
            .await
            .map(|_| None);
    }
    if allowed {
        Ok(None)
    } else {
        Err(ApiError::forbidden(format!(
            "node \"{node}\" cannot {verb} {}{}{}: a node writes only its own objects and the status of what is placed on it",
            info.resource,
            if sub.is_empty() {
                String::new()
            } else {
                format!("/{sub}")
            },
            if info.name.is_empty() {
                String::new()
            } else {
                format!(" \"{}\"", info.name)
            },
        )))
    }
}

/// Decides a node's write on its final objects: an event it reports (created, or changed and
/// still its own); its own Lease (in `kube-node-lease`, named after the node in the path and in
/// every object) and Hypervisor (created with what registration declares and nothing an
/// operator owns, its status written; never deleted); its ObjectNode (the same way); its StoragePools (`spec.node` naming it
/// before and after); the status of an object placed on it (placed there before and after,
/// and for a Port its addresses and binding kept); its own finalizer added to or removed from
/// an object placed on it (no other finalizer, nothing else).
///
/// # Errors
/// 403 naming why.
pub fn review(node: &str, r: &Review<'_>) -> ApiResult<()> {
    let t = r.target;
    let sub = t.subresource.as_deref().unwrap_or_default();
    let op = r.operation;
    let both = || r.old.into_iter().chain(r.new);
    let named_node = |v: &Value| meta::meta_str(v, "name") == Some(node);
    let path_names_node = t.name.as_deref().is_none_or(|n| n == node);
    let why: Option<String> = match (t.rt.group.as_str(), t.rt.plural.as_str()) {
        ("", "events") => match (op, r.old, r.new) {
            (Operation::Create, _, Some(new)) if reported_by(new, node) => None,
            (Operation::Update, Some(old), Some(new))
                if reported_by(old, node) && reported_by(new, node) =>
            {
                None
            }
            (Operation::Create | Operation::Update, ..) => {
                Some("a node writes only the events it reports (reportingInstance)".into())
            }
            _ => Some("a node does not delete events".into()),
        },
        ("coordination.k8s.io", "leases") => {
            let holder_ok = r.new.is_none_or(|n| {
                n.pointer("/spec/holderIdentity")
                    .and_then(Value::as_str)
                    .is_none_or(|h| h == node)
            });
            if !t.namespace.as_deref().is_some_and(heartbeat_namespace)
                || !path_names_node
                || !both().all(named_node)
                || !holder_ok
                || op == Operation::Connect
            {
                Some(format!(
                    "a node writes only its own Lease, named after it, in {NODE_LEASE_NAMESPACE} or {NETWORK_AGENT_LEASE_NAMESPACE}"
                ))
            } else {
                None
            }
        }
        ("compute.stratus.dev", "hypervisors") => {
            let beyond = match (op, r.new) {
                (Operation::Create, Some(new)) => beyond_registration(new),
                _ => None,
            };
            let spec_kept = match (op, sub, r.old, r.new) {
                (Operation::Update, "", Some(old), Some(new)) => {
                    only_own_finalizer_differs(old, new, None)
                }
                _ => true,
            };
            if !path_names_node || !both().all(named_node) || op == Operation::Connect {
                Some("a node writes only its own Hypervisor".into())
            } else if op == Operation::Delete {
                Some("deleting a Hypervisor decommissions its node (its servers are evacuated): an operator does it".into())
            } else if let Some(why) = beyond {
                Some(why)
            } else if !spec_kept {
                Some("a Hypervisor's spec and metadata are the operator's: its node writes only its status".into())
            } else {
                None
            }
        }
        // The object agent's ObjectNode: created with its address alone, then only its status.
        ("object.stratus.dev", "objectnodes") => {
            let kept = match (op, sub, r.old, r.new) {
                (Operation::Update, "", Some(old), Some(new)) => {
                    only_own_finalizer_differs(old, new, None)
                }
                _ => true,
            };
            if !path_names_node || !both().all(named_node) || op == Operation::Connect {
                Some("a node writes only its own ObjectNode".into())
            } else if op == Operation::Delete {
                Some("deleting an ObjectNode is the operator's".into())
            } else if let Some(why) = r
                .new
                .filter(|_| op == Operation::Create)
                .and_then(|n| operator_metadata(n, "ObjectNode"))
            {
                Some(why)
            } else if !kept {
                Some("an ObjectNode's spec and metadata are the operator's: its node writes only its status".into())
            } else {
                None
            }
        }
        ("storage.stratus.dev", "storagepools") => {
            let kept = match (op, sub, r.old, r.new) {
                (Operation::Update, "", Some(old), Some(new)) => {
                    only_own_finalizer_differs(old, new, None)
                }
                _ => true,
            };
            if op == Operation::Connect
                || !both().all(|v| v.pointer("/spec/node").and_then(Value::as_str) == Some(node))
            {
                Some("a node writes only the storage pools whose spec.node names it".into())
            } else if op == Operation::Delete {
                Some("deleting a StoragePool retires its volumes' home: an operator does it".into())
            } else if let Some(why) = r
                .new
                .filter(|_| op == Operation::Create)
                .and_then(beyond_pool_registration)
            {
                Some(why)
            } else if !kept {
                Some("a StoragePool's spec and metadata are the operator's: its node writes only its status".into())
            } else {
                moved_storage_address(r.old, r.new)
            }
        }
        ("network.stratus.dev", "floatingips") => match (op, sub, r.old, r.new) {
            // Its router's node (checked by `restrict` on the stored object) writes its
            // status, and keeps what the allocation and the association set.
            (Operation::Update, "status", Some(old), Some(new)) => {
                kept_status_fields("network.stratus.dev", "floatingips")
                    .iter()
                    .find(|f| {
                        let p = format!("/status/{f}");
                        old.pointer(&p) != new.pointer(&p)
                    })
                    .map(|f| {
                        format!(
                            "status.{f}: set by the allocation and the association, not by a node"
                        )
                    })
            }
            _ => Some("a node writes only the status of the floating IPs of its routers".into()),
        },
        (group, resource) => match (op, sub, r.old, r.new) {
            (Operation::Update, "status", Some(old), Some(new)) => {
                let changed = kept_status_fields(group, resource).iter().find(|f| {
                    let p = format!("/status/{f}");
                    old.pointer(&p) != new.pointer(&p)
                });
                if !placed_on(old, resource, node) || !placed_on(new, resource, node) {
                    Some(
                        "a node writes the status only of what is placed on it, and keeps it there"
                            .into(),
                    )
                } else {
                    changed.map(|f| {
                        format!(
                            "status.{f}: set by the placement and address management, not by a node"
                        )
                    })
                }
            }
            (Operation::Update, "", Some(old), Some(new)) => {
                let own = own_finalizer(group, resource);
                if !placed_on(old, resource, node) {
                    Some("it is not placed on this node".into())
                } else if !only_own_finalizer_differs(old, new, own) {
                    Some(match own {
                        Some(own) => format!(
                            "a node adds or removes only its own finalizer ({own}) on what is placed on it, and changes nothing else"
                        ),
                        None => "a node changes nothing of this kind but its status".into(),
                    })
                } else {
                    None
                }
            }
            _ => Some(
                "a node writes only its own objects and the status of what is placed on it".into(),
            ),
        },
    };
    match why {
        None => Ok(()),
        Some(why) => Err(ApiError::forbidden(format!(
            "node \"{node}\" cannot {} {}{}{}: {why}",
            match op {
                Operation::Create => "create",
                Operation::Update => "update",
                Operation::Delete => "delete",
                Operation::Connect => "connect to",
            },
            t.rt.plural,
            if sub.is_empty() {
                String::new()
            } else {
                format!("/{sub}")
            },
            match t.name.as_deref() {
                Some(n) => format!(" \"{n}\""),
                None => String::new(),
            },
        ))),
    }
}

/// What a node may read, on the graph from the node. Servers carry their users' `userData`
/// (often secrets), so a node sees only the ones placed on it, as a kubelet sees only its pods:
/// a list or watch must select `status.hypervisor=NODE`, a get must name one placed there. A
/// Flavor by name when a server placed on the node asks for it (or runs it, before a resize);
/// a Keypair by name when a server of its project placed on the node uses it; a private Image
/// when a server of its project placed on the node boots from it (or from an image whose
/// kernel or ramdisk it is); public images, and lists selecting `spec.visibility=public`.
///
/// The network agent's graph, per project: the Ports placed on the node (a list or watch
/// selecting `status.hypervisor=NODE`, as for servers); the Networks those ports are on, and
/// in them every Port (by name, or listed in the project with `spec.network=NAME`: their
/// nodes and addresses make the VXLAN forwarding entries and the remote security groups; a
/// node carrying a network sees its addresses on the wire anyway, and ports hold no secrets,
/// so whole objects are answered) and every Subnet (by name, or `spec.network=NAME`); the
/// SecurityGroups those ports name (`default` for a port naming none). A Network, Subnet or
/// SecurityGroup may also be watched alone, with `metadata.name=NAME` in its project.
///
/// The storage agent's graph: its StoragePools (`spec.node=NODE`; any pool by name,
/// read-only, for the storage address a remote volume's export is checked against), the Volumes and
/// VolumeSnapshots placed on it (`status.node=NODE`; the source a volume is made from is on
/// the same pool), and a private Image a volume placed on it is made from.
///
/// The Routers placed on the node (a list or watch selecting `status.node=NODE`, or one by
/// name), whose Ports are placed with them (so their Networks and Subnets, an external one in
/// another project included, are in the ports' graph above); the FloatingIPs of those routers
/// (by name, or listed in the router's project selecting `status.router=NAME`).
///
/// Every ObjectRing and ObjectRingVersion (read-only) and its own ObjectNode, for the object
/// agent. Every Hypervisor (read-only), its own Lease, every network agent's Lease (read-only), the
/// Events it reported (by name). Nothing else: no identity objects, no other node's objects,
/// no networks without a port on the node, no namespaces.
async fn node_may_read(
    api: &Api,
    info: &RequestInfo,
    params: &Params,
    node: &str,
) -> ApiResult<Option<(String, Stored)>> {
    let deny = |why: &str| {
        ApiError::forbidden(format!(
            "node \"{node}\" cannot {} {}{}: {why}",
            info.verb,
            info.resource,
            if info.name.is_empty() {
                String::new()
            } else {
                format!(" \"{}\"", info.name)
            }
        ))
    };
    let group = info.group.as_deref().unwrap_or_default();
    let named = !info.name.is_empty();
    let selects = |field: &str, value: &str| {
        let wanted = [format!("{field}={value}"), format!("{field}=={value}")];
        params.get("fieldSelector").is_some_and(|f| {
            f.split(',')
                .any(|term| wanted.iter().any(|w| w == term.trim()))
        })
    };
    // The value a list or watch selects `field` equal to, if it does.
    let selected = |field: &str| {
        params.get("fieldSelector").and_then(|f| {
            f.split(',').find_map(|term| {
                let (k, v) = term.trim().split_once('=')?;
                let v = v.strip_prefix('=').unwrap_or(v);
                (k == field && !k.ends_with('!')).then_some(v)
            })
        })
    };
    // The one object of a project a request asks for: by name, or a list or watch selecting
    // `metadata.name`.
    let one = if named {
        Some(info.name.as_str())
    } else if info.namespace.is_empty() {
        None
    } else {
        selected("metadata.name")
    };
    let kind = |g: &str, k: &str| {
        api.registry
            .by_kind(g, k)
            .ok_or_else(|| ApiError::internal(format!("the {k} kind is not served")))
    };
    let servers = || kind("compute.stratus.dev", "Server");
    // The named object of the request's type, read once: the answer when it is allowed.
    let read_named = |rt: &Arc<ResourceType>| {
        let t = Target {
            rt: Arc::clone(rt),
            namespace: (!info.namespace.is_empty()).then(|| info.namespace.clone()),
            name: Some(info.name.clone()),
            subresource: None,
        };
        async move {
            match api.read(&t).await {
                Ok(s) => Ok(Some((t.key(api), s))),
                // Absent: the request answers 404 itself.
                Err(e) if e.code == 404 => Ok(None),
                Err(e) => Err(e),
            }
        }
    };
    // A read of one object allowed when `ok` holds for it.
    let check_named = |rt: &'static str, g: &'static str, ok: fn(&Value, &str) -> bool| {
        let why = format!("it is not related to node {node}");
        async move {
            match read_named(kind(g, rt)?).await? {
                Some((key, s)) if ok(&s.value, node) => Ok(Some((key, s))),
                Some(_) => Err(deny(&why)),
                None => Ok(None),
            }
        }
    };
    match (group, info.resource.as_str()) {
        ("" | "events.k8s.io", "events") => {
            // Events name other projects' objects and what happened to them: a node reads back
            // only one it reported itself, by name.
            let denied = || deny("a node reads only the events it reported, by name");
            if !named {
                return Err(denied());
            }
            match stored_event(api, info).await {
                Ok((key, e)) if reported_by(&e.value, node) => Ok(Some((key, e))),
                Ok(_) => Err(denied()),
                Err(e) if e.code == 404 => Ok(None),
                Err(e) => Err(e),
            }
        }
        ("coordination.k8s.io", "leases") => {
            if named && info.name == node && info.namespace == NODE_LEASE_NAMESPACE {
                Ok(None)
            } else if info.namespace == NETWORK_AGENT_LEASE_NAMESPACE {
                // Every network agent's (liveness, tunnel address, physical networks): what
                // l2population and router placement need, and nothing of any tenant's.
                Ok(None)
            } else {
                Err(deny(&format!(
                    "a node reads only its own Lease, by name, in {NODE_LEASE_NAMESPACE}, and the network agents' Leases in {NETWORK_AGENT_LEASE_NAMESPACE}"
                )))
            }
        }
        // Every node's (read-only), as kubelets read every Node: the network agent finds its
        // peers' tunnel addresses there. A Hypervisor holds nothing of any tenant's.
        ("compute.stratus.dev", "hypervisors") => Ok(None),
        // The object agent installs every ring (each Swift node holds them all): the rings
        // and their versions name devices and addresses, nothing of any tenant's.
        ("object.stratus.dev", "objectrings" | "objectringversions") => Ok(None),
        ("object.stratus.dev", "objectnodes") if named && info.name == node => Ok(None),
        ("compute.stratus.dev", "servers") if !named => {
            if selects("status.hypervisor", node) {
                Ok(None)
            } else {
                Err(deny(&format!(
                    "a node lists only the servers placed on it (fieldSelector status.hypervisor={node})"
                )))
            }
        }
        ("compute.stratus.dev", "servers") => {
            check_named("Server", "compute.stratus.dev", |s, node| {
                placed_on(s, "servers", node)
            })
            .await
        }
        ("compute.stratus.dev", "flavors") if named => {
            let used = mine(api, servers()?, None, node).await?.iter().any(|s| {
                spec_str(s, "flavor") == Some(info.name.as_str())
                    || s.pointer("/status/flavor").and_then(Value::as_str)
                        == Some(info.name.as_str())
            });
            if used {
                Ok(None)
            } else {
                Err(deny("no server placed on this node uses it"))
            }
        }
        ("compute.stratus.dev", "keypairs") if named => {
            let used = mine(api, servers()?, Some(&info.namespace), node)
                .await?
                .iter()
                .any(|s| spec_str(s, "keypair") == Some(info.name.as_str()));
            if used {
                Ok(None)
            } else {
                Err(deny("no server placed on this node uses it"))
            }
        }
        ("image.stratus.dev", "images") if !named => {
            if selects("spec.visibility", "public") {
                Ok(None)
            } else {
                Err(deny(
                    "a node lists only public images (fieldSelector spec.visibility=public)",
                ))
            }
        }
        ("image.stratus.dev", "images") => {
            let Some(image) = read_image(api, &info.namespace, &info.name).await? else {
                // Absent: the request answers 404 itself.
                return Ok(None);
            };
            if spec_str(&image, "visibility") == Some("public") {
                return Ok(None);
            }
            if Box::pin(image_placed(api, &info.namespace, &info.name, &image, node)).await? {
                return Ok(None);
            }
            Err(deny(
                "no server placed on this node boots from it, and no volume placed on it is made from it",
            ))
        }
        ("network.stratus.dev", "ports") if !named => {
            if selects("status.hypervisor", node) {
                return Ok(None);
            }
            if let Some(network) = selected("spec.network")
                && !info.namespace.is_empty()
                && ports_graph(api, &info.namespace, node)
                    .await?
                    .networks
                    .contains(network)
            {
                return Ok(None);
            }
            Err(deny(&format!(
                "a node lists only the ports placed on it (fieldSelector status.hypervisor={node}), or in a project the ports of a network one of them is on (fieldSelector spec.network=NAME)"
            )))
        }
        ("network.stratus.dev", "ports") => {
            let rt = kind("network.stratus.dev", "Port")?;
            let Some((key, port)) = read_named(rt).await? else {
                return Ok(None);
            };
            let related = placed_on(&port.value, "ports", node)
                || match spec_str(&port.value, "network") {
                    Some(network) => ports_graph(api, &info.namespace, node)
                        .await?
                        .networks
                        .contains(network),
                    None => false,
                };
            if related {
                Ok(Some((key, port)))
            } else {
                Err(deny("it is on no network a port placed on this node is on"))
            }
        }
        ("network.stratus.dev", "networks") => match one {
            Some(name)
                if ports_graph(api, &info.namespace, node)
                    .await?
                    .networks
                    .contains(name) =>
            {
                Ok(None)
            }
            Some(_) => Err(deny("no port placed on this node is on it")),
            None => Err(deny(
                "a node reads only the networks of the ports placed on it, by name in their project",
            )),
        },
        ("network.stratus.dev", "subnets") if one.is_some() => {
            let rt = kind("network.stratus.dev", "Subnet")?;
            let t = Target {
                rt: Arc::clone(rt),
                namespace: Some(info.namespace.clone()),
                name: one.map(String::from),
                subresource: None,
            };
            let subnet = match api.read(&t).await {
                Ok(s) => s,
                // Absent: the request answers 404 (or an empty list) itself.
                Err(e) if e.code == 404 => return Ok(None),
                Err(e) => return Err(e),
            };
            let related = match spec_str(&subnet.value, "network") {
                Some(network) => ports_graph(api, &info.namespace, node)
                    .await?
                    .networks
                    .contains(network),
                None => false,
            };
            match (related, named) {
                (true, true) => Ok(Some((t.key(api), subnet))),
                (true, false) => Ok(None),
                (false, _) => Err(deny("it is on no network a port placed on this node is on")),
            }
        }
        ("network.stratus.dev", "subnets") => match selected("spec.network") {
            Some(network)
                if !info.namespace.is_empty()
                    && ports_graph(api, &info.namespace, node)
                        .await?
                        .networks
                        .contains(network) =>
            {
                Ok(None)
            }
            _ => Err(deny(
                "a node lists only the subnets of a network a port placed on it is on (fieldSelector spec.network=NAME, in its project)",
            )),
        },
        ("network.stratus.dev", "securitygroups") => match one {
            Some(name)
                if ports_graph(api, &info.namespace, node)
                    .await?
                    .groups
                    .contains(name) =>
            {
                Ok(None)
            }
            Some(_) => Err(deny("no port placed on this node is in it")),
            None => Err(deny(
                "a node reads only the security groups of the ports placed on it, by name in their project",
            )),
        },
        ("network.stratus.dev", "routers") if !named => {
            if selects("status.node", node) {
                Ok(None)
            } else {
                Err(deny(&format!(
                    "a node lists only the routers placed on it (fieldSelector status.node={node})"
                )))
            }
        }
        ("network.stratus.dev", "routers") => {
            check_named("Router", "network.stratus.dev", |r, node| {
                placed_on(r, "routers", node)
            })
            .await
        }
        ("network.stratus.dev", "floatingips") if !named => match selected("status.router") {
            Some(router)
                if !info.namespace.is_empty()
                    && router_of_node(api, &info.namespace, router, node).await? =>
            {
                Ok(None)
            }
            _ => Err(deny(
                "a node lists only the floating IPs of a router placed on it (fieldSelector status.router=NAME, in its project)",
            )),
        },
        ("network.stratus.dev", "floatingips") => {
            floating_ip_of_node(api, &info.namespace, &info.name, node).await
        }
        ("storage.stratus.dev", "storagepools") if !named => {
            if selects("spec.node", node) {
                Ok(None)
            } else {
                Err(deny(&format!(
                    "a node lists only its own storage pools (fieldSelector spec.node={node})"
                )))
            }
        }
        // Any pool by name, as every Hypervisor: a compute node checks a remote volume's
        // export against the address its pool's node recorded (`status.storageAddress`).
        ("storage.stratus.dev", "storagepools") => {
            check_named("StoragePool", "storage.stratus.dev", |_, _| true).await
        }
        // The volumes placed on it, and those attached to it (a compute node's servers' volumes
        // of other nodes, whose exports it waits for).
        ("storage.stratus.dev", "volumes") if !named => {
            if selects("status.node", node) || selects("status.attachedNode", node) {
                Ok(None)
            } else {
                Err(deny(&format!(
                    "a node lists only the volumes placed on it (fieldSelector status.node={node}) or attached to it (status.attachedNode={node})"
                )))
            }
        }
        ("storage.stratus.dev", "volumes") => {
            let Some((key, vol)) = read_named(kind("storage.stratus.dev", "Volume")?).await? else {
                return Ok(None);
            };
            // The compute agent reads a volume attached to a server placed on the node (any
            // of a multi-attach volume's servers).
            let holders = attached_servers(&vol.value);
            let related = placed_on(&vol.value, "volumes", node)
                || (!holders.is_empty()
                    && mine(api, servers()?, Some(&info.namespace), node)
                        .await?
                        .iter()
                        .any(|s| meta::meta_str(s, "name").is_some_and(|n| holders.contains(&n))));
            if related {
                Ok(Some((key, vol)))
            } else {
                Err(deny(
                    "it is neither placed on this node nor attached to a server placed on it",
                ))
            }
        }
        // A volume's exports: the node served reads those naming it (`spec.node`), the storage
        // node those it serves (`spec.storageNode`); where another node is served is neither's.
        ("storage.stratus.dev", "volumeexports") if !named => {
            if selects("spec.node", node) || selects("spec.storageNode", node) {
                Ok(None)
            } else {
                Err(deny(&format!(
                    "a node lists only the volume exports to it (fieldSelector spec.node={node}) or served by it (spec.storageNode={node})"
                )))
            }
        }
        ("storage.stratus.dev", "volumeexports") => {
            check_named("VolumeExport", "storage.stratus.dev", |x, node| {
                [
                    x.pointer("/spec/node").and_then(Value::as_str),
                    x.pointer("/spec/storageNode").and_then(Value::as_str),
                ]
                .contains(&Some(node))
            })
            .await
        }
        ("storage.stratus.dev", "volumesnapshots") if !named => {
            if selects("status.node", node) {
                Ok(None)
            } else {
                Err(deny(&format!(
                    "a node lists only the volume snapshots placed on it (fieldSelector status.node={node})"
                )))
            }
        }
        ("storage.stratus.dev", "volumesnapshots") => {
            check_named("VolumeSnapshot", "storage.stratus.dev", |v, node| {
                placed_on(v, "volumesnapshots", node)
            })
            .await
        }
        _ => Err(deny("it is not related to anything placed on this node")),
    }
}

/// Whether Router `name` of namespace `ns` is placed on `node`.
async fn router_of_node(api: &Api, ns: &str, name: &str, node: &str) -> ApiResult<bool> {
    let rt = api
        .registry
        .by_kind("network.stratus.dev", "Router")
        .ok_or_else(|| ApiError::internal("the Router kind is not served"))?;
    let t = Target {
        rt: Arc::clone(rt),
        namespace: Some(ns.to_string()),
        name: Some(name.to_string()),
        subresource: None,
    };
    match api.read(&t).await {
        Ok(r) => Ok(placed_on(&r.value, "routers", node)),
        Err(e) if e.code == 404 => Ok(false),
        Err(e) => Err(e),
    }
}

/// FloatingIP `name` of namespace `ns` with its key, when its router (`status.router`) is
/// placed on `node`; `None` when there is no such FloatingIP (the request answers 404).
///
/// # Errors
/// 403 when its router is not on the node (or it has none).
async fn floating_ip_of_node(
    api: &Api,
    ns: &str,
    name: &str,
    node: &str,
) -> ApiResult<Option<(String, Stored)>> {
    let rt = api
        .registry
        .by_kind("network.stratus.dev", "FloatingIP")
        .ok_or_else(|| ApiError::internal("the FloatingIP kind is not served"))?;
    let t = Target {
        rt: Arc::clone(rt),
        namespace: Some(ns.to_string()),
        name: Some(name.to_string()),
        subresource: None,
    };
    let fip = match api.read(&t).await {
        Ok(f) => f,
        Err(e) if e.code == 404 => return Ok(None),
        Err(e) => return Err(e),
    };
    let router = fip.value.pointer("/status/router").and_then(Value::as_str);
    match router {
        Some(r) if router_of_node(api, ns, r, node).await? => Ok(Some((t.key(api), fip))),
        _ => Err(ApiError::forbidden(format!(
            "node \"{node}\" cannot access floatingips \"{name}\": its router is not placed on this node"
        ))),
    }
}

/// `spec.FIELD` of `v` as a string.
fn spec_str<'a>(v: &'a Value, field: &str) -> Option<&'a str> {
    v.get("spec")?.get(field)?.as_str()
}

/// The Image `name` of project `ns`, if there is one.
///
/// # Errors
/// 503 when etcd is unreachable.
async fn read_image(api: &Api, ns: &str, name: &str) -> ApiResult<Option<Value>> {
    let images = api
        .registry
        .by_kind("image.stratus.dev", "Image")
        .ok_or_else(|| ApiError::internal("the Image kind is not served"))?;
    let t = Target {
        rt: Arc::clone(images),
        namespace: Some(ns.to_string()),
        name: Some(name.to_string()),
        subresource: None,
    };
    match api.read(&t).await {
        Ok(s) => Ok(Some(s.value)),
        Err(e) if e.code == 404 => Ok(None),
        Err(e) => Err(e),
    }
}

/// Whether the Image `name` of project `ns` (its stored object `image`) is one a Server or
/// Volume placed on `node` is made from: a volume's source (or that image's kernel or ramdisk
/// image), a server's boot image (or its kernel or ramdisk image), or an image its boot volume
/// recorded (by uid). Its visibility does not count: this is the node's own placement.
///
/// # Errors
/// 503 when etcd is unreachable.
pub(crate) async fn image_placed(
    api: &Api,
    ns: &str,
    name: &str,
    image: &Value,
    node: &str,
) -> ApiResult<bool> {
    // The storage agent fills a volume placed on the node from its image, and records
    // that image's kernel and ramdisk images.
    let sources: BTreeSet<String> = volumes_on(api, ns, node)
        .await?
        .iter()
        .filter_map(|v| v.pointer("/spec/source/image")?.as_str())
        .map(str::to_string)
        .collect();
    if sources.contains(name) {
        return Ok(true);
    }
    for source in &sources {
        if let Some(b) = read_image(api, ns, source).await?
            && (spec_str(&b, "kernelImage") == Some(name)
                || spec_str(&b, "ramdiskImage") == Some(name))
        {
            return Ok(true);
        }
    }
    let uid = meta::meta_str(image, "uid");
    let servers = api
        .registry
        .by_kind("compute.stratus.dev", "Server")
        .ok_or_else(|| ApiError::internal("the Server kind is not served"))?;
    for server in mine(api, servers, Some(ns), node).await? {
        match boot_image(api, ns, &server).await? {
            None => {}
            Some(Boot::Image(boot)) => {
                if boot == name {
                    return Ok(true);
                }
                if let Some(b) = read_image(api, ns, &boot).await?
                    && (spec_str(&b, "kernelImage") == Some(name)
                        || spec_str(&b, "ramdiskImage") == Some(name))
                {
                    return Ok(true);
                }
            }
            // A boot volume's images are the ones it recorded, by uid: an image
            // published under one of their names since is not among them.
            Some(Boot::Volume(uids)) if uid.is_some_and(|u| uids.iter().any(|r| r == u)) => {
                return Ok(true);
            }
            Some(Boot::Volume(_)) => {}
        }
    }
    Ok(false)
}

/// The Servers placed on `node`: of namespace `ns`, or of every namespace. Found through the
/// placement claims the binding keeps under the hypervisor's name (written in the same
/// transaction as the placement), so this reads what is placed on the node and nothing else.
async fn mine(
    api: &Api,
    servers: &ResourceType,
    ns: Option<&str>,
    node: &str,
) -> ApiResult<Vec<Value>> {
    let claims = claims_prefix(&api.prefix, node);
    let under = match ns {
        Some(ns) => format!("{claims}{ns}/"),
        None => claims.clone(),
    };
    let keys: Vec<String> = api
        .store
        .keys(&under)
        .await
        .map_err(ApiError::from)?
        .iter()
        .filter_map(|k| k.strip_prefix(&claims)?.split_once('/'))
        .map(|(ns, name)| servers.key(&api.prefix, Some(ns), name))
        .collect();
    let mut placed = Vec::with_capacity(keys.len());
    for batch in keys.chunks(READ_BATCH) {
        let reads: Vec<Read<'_>> = batch.iter().map(|k| Read::Key(k)).collect();
        let (found, _) = api.store.read_many(&reads).await.map_err(ApiError::from)?;
        placed.extend(
            found
                .into_iter()
                .flatten()
                .map(|(_, s)| s.value)
                .filter(|s| placed_on(s, "servers", node)),
        );
    }
    Ok(placed)
}

/// The images a server boots.
enum Boot {
    /// `spec.image`, by name (with its kernel and ramdisk images).
    Image(String),
    /// The uids of the images its boot volume recorded when it was filled
    /// (`status.sourceImage`, `kernelImage`, `ramdiskImage`).
    Volume(Vec<String>),
}

/// The Images `server` (of project `ns`) boots from: its `spec.image`, or the images its boot
/// volume recorded (whose kernel and ramdisk the compute agent boots it with).
async fn boot_image(api: &Api, ns: &str, server: &Value) -> ApiResult<Option<Boot>> {
    if let Some(image) = spec_str(server, "image") {
        return Ok(Some(Boot::Image(image.to_string())));
    }
    let Some(volume) = spec_str(server, "bootVolume") else {
        return Ok(None);
    };
    let rt = api
        .registry
        .by_kind("storage.stratus.dev", "Volume")
        .ok_or_else(|| ApiError::internal("the Volume kind is not served"))?;
    let t = Target {
        rt: Arc::clone(rt),
        namespace: Some(ns.to_string()),
        name: Some(volume.to_string()),
        subresource: None,
    };
    match api.read(&t).await {
        // Only while the volume is the server's: a volume of that name made since is not.
        Ok(v)
            if meta::meta_str(server, "name")
                .is_some_and(|n| attached_servers(&v.value).contains(&n)) =>
        {
            let uids = ["sourceImage", "kernelImage", "ramdiskImage"]
                .iter()
                .filter_map(|f| v.value.pointer(&format!("/status/{f}/uid"))?.as_str())
                .map(str::to_string)
                .collect();
            Ok(Some(Boot::Volume(uids)))
        }
        Ok(_) => Ok(None),
        Err(e) if e.code == 404 => Ok(None),
        Err(e) => Err(e),
    }
}

/// The Volumes of project `ns` placed on `node` (one read of the project's volumes).
async fn volumes_on(api: &Api, ns: &str, node: &str) -> ApiResult<Vec<Value>> {
    let volumes = api
        .registry
        .by_kind("storage.stratus.dev", "Volume")
        .ok_or_else(|| ApiError::internal("the Volume kind is not served"))?;
    let page = api
        .store
        .list(&volumes.key_prefix(&api.prefix, Some(ns)), None, 0, 0)
        .await
        .map_err(ApiError::from)?;
    Ok(page
        .items
        .into_iter()
        .map(|(_, v)| v.value)
        .filter(|v| placed_on(v, "volumes", node))
        .collect())
}

/// What the Ports of one project placed on a node lead to.
#[derive(Debug, Default)]
struct PortsGraph {
    /// The networks they are on.
    networks: BTreeSet<String>,
    /// The security groups they name (`default` for a port naming none).
    groups: BTreeSet<String>,
}

/// The graph of the Ports of project `ns` placed on `node` (one read of the project's ports).
async fn ports_graph(api: &Api, ns: &str, node: &str) -> ApiResult<PortsGraph> {
    let ports = api
        .registry
        .by_kind("network.stratus.dev", "Port")
        .ok_or_else(|| ApiError::internal("the Port kind is not served"))?;
    let page = api
        .store
        .list(&ports.key_prefix(&api.prefix, Some(ns)), None, 0, 0)
        .await
        .map_err(ApiError::from)?;
    let mut graph = PortsGraph::default();
    for (_, port) in page.items {
        let port = port.value;
        if !placed_on(&port, "ports", node) {
            continue;
        }
        if let Some(n) = spec_str(&port, "network") {
            graph.networks.insert(n.to_string());
        }
        match port
            .pointer("/spec/securityGroups")
            .and_then(Value::as_array)
        {
            Some(groups) => graph
                .groups
                .extend(groups.iter().filter_map(Value::as_str).map(String::from)),
            None => {
                graph.groups.insert("default".into());
            }
        }
    }
    Ok(graph)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn only_the_nodes_own_finalizer_may_change() {
        let own = Some(TEARDOWN_FINALIZER);
        let old = json!({"metadata": {"name": "a", "finalizers": ["x", TEARDOWN_FINALIZER], "resourceVersion": "3"}, "spec": {"a": 1}});
        let released = json!({"metadata": {"name": "a", "finalizers": ["x"], "managedFields": []}, "spec": {"a": 1}});
        assert!(only_own_finalizer_differs(&old, &released, own));
        assert!(
            only_own_finalizer_differs(&released, &old, own),
            "added back"
        );
        let others_removed = json!({"metadata": {"name": "a", "finalizers": [TEARDOWN_FINALIZER]}, "spec": {"a": 1}});
        assert!(!only_own_finalizer_differs(&old, &others_removed, own));
        let others_added = json!({"metadata": {"name": "a", "finalizers": ["x", "y", TEARDOWN_FINALIZER]}, "spec": {"a": 1}});
        assert!(!only_own_finalizer_differs(&old, &others_added, own));
        assert!(
            !only_own_finalizer_differs(&old, &released, None),
            "a kind the node has no finalizer of"
        );
        let changed = json!({"metadata": {"name": "a", "finalizers": ["x"]}, "spec": {"a": 2}});
        assert!(!only_own_finalizer_differs(&old, &changed, own));
        let labelled = json!({"metadata": {"name": "a", "finalizers": ["x"], "labels": {"l": "v"}}, "spec": {"a": 1}});
        assert!(!only_own_finalizer_differs(&old, &labelled, own));
    }

    #[test]
    fn registration_declares_zone_and_type_alone() {
        let hv = |spec: Value| json!({"metadata": {"name": "n1"}, "spec": spec});
        assert_eq!(
            beyond_registration(&hv(
                json!({"availabilityZone": "az2", "hypervisorType": "qemu"})
            )),
            None
        );
        assert_eq!(beyond_registration(&hv(json!({}))), None);
        // Defaults spelled out are still the defaults.
        assert_eq!(
            beyond_registration(&hv(json!({"cpuAllocationRatio": 16.0, "disabled": false}))),
            None
        );
        for (spec, field) in [
            (
                json!({"cpuAllocationRatio": 64.0}),
                "spec.cpuAllocationRatio",
            ),
            (
                json!({"ramAllocationRatio": 10.0}),
                "spec.ramAllocationRatio",
            ),
            (
                json!({"reservedHostMemoryMiB": 0}),
                "spec.reservedHostMemoryMiB",
            ),
            (json!({"disabled": true}), "spec.disabled"),
        ] {
            let why = beyond_registration(&hv(spec.clone())).expect("refused");
            assert!(why.starts_with(field), "{spec}: {why}");
        }
        let mut labelled = hv(json!({}));
        labelled["metadata"]["labels"] = json!({"tier": "secure"});
        assert!(
            beyond_registration(&labelled)
                .expect("refused")
                .starts_with("metadata.labels")
        );
    }
}
