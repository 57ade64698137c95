//! The node authorizer: what a node agent's identity (`system:node:NAME`) may read and write.
//!
//! As Kubernetes' Node authorizer, it walks a graph from the node: the Servers placed on it
//! (`status.hypervisor=NAME`), and from them their flavors, images (with their kernel and
//! ramdisk images) and keypairs; its own Hypervisor, Lease and StoragePools; the Volumes placed
//! on it; the Events it reports. Nothing else is readable or writable, so a compromised node
//! can neither read other tenants' objects nor touch another node's.
//!
//! Two steps, as in Kubernetes (authorizer, then the NodeRestriction admission): [`restrict`]
//! decides on the typed request alone before anything is read (which kinds and verbs a node may
//! use at all; reads are decided there, on the graph), and [`review`] decides a write on its
//! final objects (old and new, after a patch or apply is applied), inside the verb.

use std::sync::Arc;

use serde_json::Value;
use stratus_api_types::compute::NODE_LEASE_NAMESPACE;

use crate::base::error::{ApiError, ApiResult};
use crate::base::meta;
use crate::policy::request::RequestInfo;
use crate::resource::registry::ResourceType;
use crate::resource::review::{Operation, Review};
use crate::resource::verbs::{Api, Params, Target};
use crate::storage::store::Stored;

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
        "volumes" => "/status/node",
        _ => "/status/hypervisor",
    }
}

/// Whether `obj` is placed on `node`.
fn placed_on(obj: &Value, resource: &str, node: &str) -> bool {
    obj.pointer(placement_field(resource))
        .and_then(Value::as_str)
        == Some(node)
}

/// Whether two versions of an object differ in nothing but `metadata.finalizers` (and the
/// bookkeeping every write changes: resourceVersion, managedFields).
fn only_finalizers_differ(old: &Value, new: &Value) -> bool {
    let strip = |v: &Value| {
        let mut v = v.clone();
        if let Some(m) = v.get_mut("metadata").and_then(Value::as_object_mut) {
            for f in ["finalizers", "managedFields", "resourceVersion"] {
                m.remove(f);
            }
        }
        v
    };
    strip(old) == strip(new)
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
    let own_name = |allow_unnamed_create: bool| {
        info.name == node || (allow_unnamed_create && info.name.is_empty() && verb == "create")
    };
    let allowed = writes(verb)
        && verb != "deletecollection"
        && match (group, info.resource.as_str(), sub) {
            ("" | "events.k8s.io", "events", "") => matches!(verb, "create" | "update" | "patch"),
            ("coordination.k8s.io", "leases", "") => {
                info.namespace == NODE_LEASE_NAMESPACE && own_name(true)
            }
            ("compute.stratus.dev", "hypervisors", "" | "status") => own_name(sub.is_empty()),
            ("storage.stratus.dev", "storagepools", "" | "status") => true,
            (_, _, "status") => matches!(verb, "update" | "patch"),
            // Releasing a finalizer of what is placed on the node (decided by `review`).
            (_, _, "") => matches!(verb, "update" | "patch"),
            _ => false,
        };
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
/// every object) and Hypervisor (created, its status written, a finalizer released, deleted);
/// its StoragePools (`spec.node` naming it before and after); the status of an object placed
/// on it (placed there before and after); a finalizer released on an object placed on it.
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
    let why: Option<&str> = match (t.rt.group.as_str(), t.rt.plural.as_str()) {
        ("", "events") => match (op, r.old, r.new) {
            (Operation::Create, _, Some(new)) if reported_by(new, node) => None,
            (Operation::Update, Some(old), Some(new))
                if reported_by(old, node) && reported_by(new, node) =>
            {
                None
            }
            (Operation::Create | Operation::Update, ..) => {
                Some("a node writes only the events it reports (reportingInstance)")
            }
            _ => Some("a node does not delete events"),
        },
        ("coordination.k8s.io", "leases") => {
            let holder_ok = r.new.is_none_or(|n| {
                n.pointer("/spec/holderIdentity")
                    .and_then(Value::as_str)
                    .is_none_or(|h| h == node)
            });
            if t.namespace.as_deref() != Some(NODE_LEASE_NAMESPACE)
                || !path_names_node
                || !both().all(named_node)
                || !holder_ok
                || op == Operation::Connect
            {
                Some("a node writes only its own Lease, named after it, in kube-node-lease")
            } else {
                None
            }
        }
        ("compute.stratus.dev", "hypervisors") => {
            let spec_kept = match (op, sub, r.old, r.new) {
                (Operation::Update, "", Some(old), Some(new)) => only_finalizers_differ(old, new),
                _ => true,
            };
            if !path_names_node || !both().all(named_node) || op == Operation::Connect {
                Some("a node writes only its own Hypervisor")
            } else if !spec_kept {
                Some("a Hypervisor's spec is the operator's: its node writes only its status")
            } else {
                None
            }
        }
        ("storage.stratus.dev", "storagepools") => {
            if op == Operation::Connect
                || !both().all(|v| v.pointer("/spec/node").and_then(Value::as_str) == Some(node))
            {
                Some("a node writes only the storage pools whose spec.node names it")
            } else {
                None
            }
        }
        (_, resource) => match (op, sub, r.old, r.new) {
            (Operation::Update, "status", Some(old), Some(new)) => {
                if placed_on(old, resource, node) && placed_on(new, resource, node) {
                    None
                } else {
                    Some(
                        "a node writes the status only of what is placed on it, and keeps it there",
                    )
                }
            }
            (Operation::Update, "", Some(old), Some(new)) => {
                if !placed_on(old, resource, node) {
                    Some("it is not placed on this node")
                } else if !only_finalizers_differ(old, new) {
                    Some("a node changes nothing but the finalizers of what is placed on it")
                } else {
                    None
                }
            }
            _ => Some("a node writes only its own objects and the status of what is placed on it"),
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
/// kernel or ramdisk it is); public images, and lists selecting `spec.visibility=public`. Its
/// own Hypervisor and Lease, its StoragePools, the Volumes placed on it, the Events it
/// reported (by name). Nothing else: no identity objects, no other node's objects, no
/// networks, no namespaces.
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
            } else {
                Err(deny(
                    "a node reads only its own Lease, by name, in kube-node-lease",
                ))
            }
        }
        ("compute.stratus.dev", "hypervisors") => {
            if (named && info.name == node) || (!named && selects("metadata.name", node)) {
                Ok(None)
            } else {
                Err(deny(&format!(
                    "a node reads only its own Hypervisor (by name, or fieldSelector metadata.name={node})"
                )))
            }
        }
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
            let images = kind("image.stratus.dev", "Image")?;
            let read = |name: &str| {
                let t = Target {
                    rt: Arc::clone(images),
                    namespace: Some(info.namespace.clone()),
                    name: Some(name.to_string()),
                    subresource: None,
                };
                async move {
                    match api.read(&t).await {
                        Ok(s) => Ok(Some(s.value)),
                        Err(e) if e.code == 404 => Ok(None),
                        Err(e) => Err(e),
                    }
                }
            };
            let Some(image) = read(&info.name).await? else {
                // Absent: the request answers 404 itself.
                return Ok(None);
            };
            if spec_str(&image, "visibility") == Some("public") {
                return Ok(None);
            }
            for server in mine(api, servers()?, Some(&info.namespace), node).await? {
                let Some(boot) = spec_str(&server, "image") else {
                    continue;
                };
                if boot == info.name {
                    return Ok(None);
                }
                if let Some(b) = read(boot).await?
                    && (spec_str(&b, "kernelImage") == Some(info.name.as_str())
                        || spec_str(&b, "ramdiskImage") == Some(info.name.as_str()))
                {
                    return Ok(None);
                }
            }
            Err(deny("no server placed on this node boots from it"))
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
        ("storage.stratus.dev", "storagepools") => {
            check_named("StoragePool", "storage.stratus.dev", |p, node| {
                p.pointer("/spec/node").and_then(Value::as_str) == Some(node)
            })
            .await
        }
        ("storage.stratus.dev", "volumes") if !named => {
            if selects("status.node", node) {
                Ok(None)
            } else {
                Err(deny(&format!(
                    "a node lists only the volumes placed on it (fieldSelector status.node={node})"
                )))
            }
        }
        ("storage.stratus.dev", "volumes") => {
            check_named("Volume", "storage.stratus.dev", |v, node| {
                placed_on(v, "volumes", node)
            })
            .await
        }
        _ => Err(deny("it is not related to anything placed on this node")),
    }
}

/// `spec.FIELD` of `v` as a string.
fn spec_str<'a>(v: &'a Value, field: &str) -> Option<&'a str> {
    v.get("spec")?.get(field)?.as_str()
}

/// The Servers placed on `node`: of namespace `ns`, or of every namespace.
async fn mine(
    api: &Api,
    servers: &ResourceType,
    ns: Option<&str>,
    node: &str,
) -> ApiResult<Vec<Value>> {
    let prefix = servers.key_prefix(&api.prefix, ns);
    let page = api
        .store
        .list(&prefix, None, 0, 0)
        .await
        .map_err(ApiError::from)?;
    Ok(page
        .items
        .into_iter()
        .map(|(_, s)| s.value)
        .filter(|s| placed_on(s, "servers", node))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn finalizers_alone_may_differ() {
        let old = json!({"metadata": {"name": "a", "finalizers": ["x"], "resourceVersion": "3"}, "spec": {"a": 1}});
        let released = json!({"metadata": {"name": "a", "finalizers": [], "managedFields": []}, "spec": {"a": 1}});
        assert!(only_finalizers_differ(&old, &released));
        let changed = json!({"metadata": {"name": "a", "finalizers": []}, "spec": {"a": 2}});
        assert!(!only_finalizers_differ(&old, &changed));
        let labelled = json!({"metadata": {"name": "a", "finalizers": ["x"], "labels": {"l": "v"}}, "spec": {"a": 1}});
        assert!(!only_finalizers_differ(&old, &labelled));
    }
}
