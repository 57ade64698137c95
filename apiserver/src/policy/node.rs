//! The node authorizer: what a node agent's identity may read and write, decided from the typed
//! request, the decoded body and the stored objects it touches.

use std::sync::Arc;

use crate::base::error::{ApiError, ApiResult};
use crate::policy::request::RequestInfo;
use crate::resource::registry::ResourceType;
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
fn reported_by(event: &serde_json::Value, node: &str) -> bool {
    event
        .get("reportingInstance")
        .and_then(serde_json::Value::as_str)
        == Some(node)
}

/// Where an object records the node it is placed on.
fn placement_field(resource: &str) -> &'static str {
    match resource {
        "volumes" => "/status/node",
        _ => "/status/hypervisor",
    }
}

/// What a node agent's identity (`system:node:NAME` in the token file) may do: read, record
/// events and heartbeats, write its own Hypervisor and StoragePools, and write the status of
/// objects placed on its node — nothing else, so a compromised node cannot touch another's.
/// For a read allowed by reading the object itself, that object and its key: the request is
/// answered with what was checked, not with a second read.
pub async fn restrict(
    api: &Api,
    info: &RequestInfo,
    params: &Params,
    bytes: &[u8],
    node: &str,
) -> ApiResult<Option<(String, Stored)>> {
    let Some(group) = info.group.as_deref() else {
        return Ok(None);
    };
    if matches!(info.verb.as_str(), "get" | "list" | "watch") {
        return node_may_read(api, info, params, node).await;
    }
    let body = crate::base::body::decode(bytes, false)
        .map(|d| d.value)
        .unwrap_or(serde_json::Value::Null);
    let deny = || {
        ApiError::forbidden(format!(
            "node \"{node}\" cannot {} {} \"{}\": a node writes only its own objects and the status of what is placed on it",
            info.verb, info.resource, info.name
        ))
    };
    // A body (object, merge patch or JSON patch) leaves `pointer` absent or naming this node.
    let ours = |v: &serde_json::Value, pointer: &str| match v.as_array() {
        Some(ops) => ops.iter().all(|op| {
            op.get("path").and_then(serde_json::Value::as_str) != Some(pointer)
                || op.get("value").and_then(serde_json::Value::as_str) == Some(node)
        }),
        None => v.pointer(pointer).is_none_or(|x| x.as_str() == Some(node)),
    };
    let existing = || async {
        let rt = api
            .registry
            .get(group, &info.version, &info.resource)
            .ok_or_else(deny)?;
        let t = Target {
            rt: Arc::clone(rt),
            namespace: (!info.namespace.is_empty()).then(|| info.namespace.clone()),
            name: Some(info.name.clone()),
            subresource: None,
        };
        match api.read(&t).await {
            Ok(s) => Ok(Some(s.value)),
            Err(e) if e.code == 404 => Ok(None),
            Err(e) => Err(e),
        }
    };
    let allowed = match (group, info.resource.as_str()) {
        // Events it reports itself: the body, and for a change the stored event too, name
        // this node as the reporting instance.
        ("" | "events.k8s.io", "events") => match info.verb.as_str() {
            "create" => reported_by(&body, node),
            "update" | "patch" => {
                ours(&body, "/reportingInstance")
                    && match stored_event(api, info).await {
                        Ok((_, e)) => reported_by(&e.value, node),
                        Err(e) if e.code == 404 => false,
                        Err(e) => return Err(e),
                    }
            }
            _ => false,
        },
        ("coordination.k8s.io", "leases") => {
            info.name == node
                || body
                    .pointer("/metadata/name")
                    .and_then(serde_json::Value::as_str)
                    == Some(node)
        }
        ("compute.stratus.dev", "hypervisors") => {
            let name = if info.name.is_empty() {
                body.pointer("/metadata/name")
                    .and_then(serde_json::Value::as_str)
                    .unwrap_or_default()
            } else {
                info.name.as_str()
            };
            name == node && info.verb != "deletecollection"
        }
        ("storage.stratus.dev", "storagepools") => {
            let current = if info.name.is_empty() {
                None
            } else {
                existing().await?
            };
            ours(&body, "/spec/node")
                && current.as_ref().is_none_or(|c| ours(c, "/spec/node"))
                && info.verb != "deletecollection"
        }
        (_, resource)
            if info.subresource == "status" && matches!(info.verb.as_str(), "update" | "patch") =>
        {
            let placed = placement_field(resource);
            let current = existing().await?;
            current.is_some_and(|c| {
                c.pointer(placed).and_then(serde_json::Value::as_str) == Some(node)
            }) && ours(&body, placed)
        }
        // Finalizers of what is placed on the node (the agent releases an object once its
        // host resources are gone): a patch touching nothing but metadata.finalizers (a JSON
        // patch, or a merge patch that may carry a resourceVersion precondition).
        (_, resource) if info.subresource.is_empty() && info.verb == "patch" => {
            let placed = placement_field(resource);
            let json_patch = body.as_array().is_some_and(|ops| {
                ops.iter().all(|op| {
                    op.get("path")
                        .and_then(serde_json::Value::as_str)
                        .is_some_and(|p| {
                            p == "/metadata/finalizers" || p.starts_with("/metadata/finalizers/")
                        })
                })
            });
            let merge_patch = body.as_object().is_some_and(|o| {
                o.len() == 1
                    && o.get("metadata")
                        .and_then(serde_json::Value::as_object)
                        .is_some_and(|m| {
                            m.keys()
                                .all(|k| k == "finalizers" || k == "resourceVersion")
                        })
            });
            let only_finalizers = json_patch || merge_patch;
            only_finalizers
                && existing().await?.is_some_and(|c| {
                    c.pointer(placed).and_then(serde_json::Value::as_str) == Some(node)
                })
        }
        _ => false,
    };
    if allowed { Ok(None) } else { Err(deny()) }
}

/// What a node may read. Servers carry their users' `userData` (often secrets), so a node sees
/// only the ones placed on it, as a kubelet sees only its pods: a list or watch must select
/// `status.hypervisor=NODE`, a get must name one placed there. A Keypair is readable only by a
/// node running a server of its project that uses it; a private Image only by one running a
/// server of its project booted from it (or from an image whose kernel or ramdisk it is),
/// and lists of images must select `spec.visibility=public`. The rest (flavors,
/// hypervisors, leases, events, …) is readable.
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
    if matches!(group, "" | "events.k8s.io") && info.resource == "events" {
        // Events name other projects' objects and what happened to them: a node reads back
        // only one it reported itself, by name.
        let denied = || deny("a node reads only the events it reported, by name");
        if info.name.is_empty() {
            return Err(denied());
        }
        return match stored_event(api, info).await {
            Ok((key, e)) if reported_by(&e.value, node) => Ok(Some((key, e))),
            Ok(_) => Err(denied()),
            // Absent: the request answers 404 itself.
            Err(e) if e.code == 404 => Ok(None),
            Err(e) => Err(e),
        };
    }
    if group != "compute.stratus.dev" && group != "image.stratus.dev" {
        return Ok(None);
    }
    let selects = |field: &str, value: &str| {
        let wanted = [format!("{field}={value}"), format!("{field}=={value}")];
        params.get("fieldSelector").is_some_and(|f| {
            f.split(',')
                .any(|term| wanted.iter().any(|w| w == term.trim()))
        })
    };
    let servers = || {
        api.registry
            .by_kind("compute.stratus.dev", "Server")
            .ok_or_else(|| ApiError::internal("the Server kind is not served"))
    };
    let on_node = |s: &serde_json::Value| {
        s.pointer(placement_field("servers"))
            .and_then(serde_json::Value::as_str)
            == Some(node)
    };
    match info.resource.as_str() {
        "servers" if info.name.is_empty() => {
            if selects("status.hypervisor", node) {
                Ok(None)
            } else {
                Err(deny(&format!(
                    "a node lists only the servers placed on it (fieldSelector status.hypervisor={node})"
                )))
            }
        }
        "servers" => {
            let t = Target {
                rt: Arc::clone(servers()?),
                namespace: Some(info.namespace.clone()),
                name: Some(info.name.clone()),
                subresource: None,
            };
            match api.read(&t).await {
                Ok(s) if on_node(&s.value) => Ok(Some((t.key(api), s))),
                Ok(_) => Err(deny("it is not placed on this node")),
                // Absent: the request answers 404 itself.
                Err(e) if e.code == 404 => Ok(None),
                Err(e) => Err(e),
            }
        }
        "keypairs" if info.name.is_empty() => Err(deny(
            "a node reads only the keypairs its servers use, by name",
        )),
        "keypairs" => {
            let used = mine(api, servers()?, &info.namespace, node)
                .await?
                .iter()
                .any(|s| spec_str(s, "keypair") == Some(info.name.as_str()));
            if used {
                Ok(None)
            } else {
                Err(deny("no server placed on this node uses it"))
            }
        }
        "images" if info.name.is_empty() => {
            if selects("spec.visibility", "public") {
                Ok(None)
            } else {
                Err(deny(
                    "a node lists only public images (fieldSelector spec.visibility=public)",
                ))
            }
        }
        "images" => {
            let images = api
                .registry
                .by_kind("image.stratus.dev", "Image")
                .ok_or_else(|| ApiError::internal("the Image kind is not served"))?;
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
            for server in mine(api, servers()?, &info.namespace, node).await? {
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
        _ => Ok(None),
    }
}

/// `spec.FIELD` of `v` as a string.
fn spec_str<'a>(v: &'a serde_json::Value, field: &str) -> Option<&'a str> {
    v.get("spec")?.get(field)?.as_str()
}

/// The Servers of namespace `ns` placed on `node`.
async fn mine(
    api: &Api,
    servers: &ResourceType,
    ns: &str,
    node: &str,
) -> ApiResult<Vec<serde_json::Value>> {
    let prefix = servers.key_prefix(&api.prefix, Some(ns));
    let page = api
        .store
        .list(&prefix, None, 0, 0)
        .await
        .map_err(ApiError::from)?;
    Ok(page
        .items
        .into_iter()
        .map(|(_, s)| s.value)
        .filter(|s| {
            s.pointer(placement_field("servers"))
                .and_then(serde_json::Value::as_str)
                == Some(node)
        })
        .collect())
}
