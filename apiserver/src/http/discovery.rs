//! Discovery documents and the OpenAPI v2/v3 specs built from the kinds' schemas.

use serde_json::{Map, Value, json};

use crate::resource::registry::{Registry, ResourceType};
use crate::resource::schema::object_meta_schema;

const VERBS: [&str; 8] = [
    "create",
    "delete",
    "deletecollection",
    "get",
    "list",
    "patch",
    "update",
    "watch",
];

/// `/api`.
pub fn core_versions() -> Value {
    json!({"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []})
}

fn group_doc(group: &str, versions: &[String]) -> Value {
    let vs: Vec<Value> = versions
        .iter()
        .map(|v| json!({"groupVersion": format!("{group}/{v}"), "version": v}))
        .collect();
    json!({"kind": "APIGroup", "apiVersion": "v1", "name": group, "versions": vs, "preferredVersion": vs.first().cloned().unwrap_or(Value::Null)})
}

/// `/apis`.
pub fn groups(reg: &Registry) -> Value {
    let mut groups: Vec<Value> = reg
        .groups()
        .into_iter()
        .filter(|(g, _)| !g.is_empty())
        .map(|(g, vs)| group_doc(&g, &vs))
        .collect();
    groups.extend(
        REVIEWS
            .iter()
            .map(|r| group_doc(r.group, &["v1".to_string()])),
    );
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

/// `/apis/{group}`.
pub fn group(reg: &Registry, group: &str) -> Option<Value> {
    if let Some(r) = REVIEWS.iter().find(|r| r.group == group) {
        return Some(group_doc(r.group, &["v1".to_string()]));
    }
    reg.groups()
        .into_iter()
        .find(|(g, _)| g == group && !g.is_empty())
        .map(|(g, vs)| group_doc(&g, &vs))
}

/// A review the API answers beside the kinds (`route.rs`): a create-only, cluster-scoped
/// resource of a Kubernetes group, listed in discovery as kube-apiserver lists it, so that
/// `kubectl api-resources` names it.
struct Review {
    group: &'static str,
    plural: &'static str,
    singular: &'static str,
    kind: &'static str,
}

/// SelfSubjectAccessReview (`kubectl auth can-i`) and SelfSubjectReview (`kubectl auth whoami`).
const REVIEWS: [Review; 2] = [
    Review {
        group: "authorization.k8s.io",
        plural: "selfsubjectaccessreviews",
        singular: "selfsubjectaccessreview",
        kind: "SelfSubjectAccessReview",
    },
    Review {
        group: "authentication.k8s.io",
        plural: "selfsubjectreviews",
        singular: "selfsubjectreview",
        kind: "SelfSubjectReview",
    },
];

/// `/apis/{group}/{version}` or `/api/v1`.
pub fn resources(reg: &Registry, group: &str, version: &str) -> Option<Value> {
    if let Some(r) = REVIEWS.iter().find(|r| r.group == group) {
        return (version == "v1").then(|| {
            json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": format!("{}/v1", r.group), "resources": [
                {"name": r.plural, "singularName": r.singular, "namespaced": false, "kind": r.kind, "verbs": ["create"]},
            ]})
        });
    }
    let types: Vec<&std::sync::Arc<ResourceType>> = reg
        .all()
        .iter()
        .filter(|t| t.group == group && t.version == version)
        .collect();
    if types.is_empty() {
        return None;
    }
    let mut out = Vec::new();
    for t in types {
        let mut r = json!({
            "name": t.plural, "singularName": t.singular, "namespaced": t.namespaced, "kind": t.kind, "verbs": VERBS,
        });
        if !t.short_names.is_empty() {
            r["shortNames"] = json!(t.short_names);
        }
        if !t.categories.is_empty() {
            r["categories"] = json!(t.categories);
        }
        out.push(r);
        if t.status_subresource {
            out.push(json!({"name": format!("{}/status", t.plural), "singularName": "", "namespaced": t.namespaced, "kind": t.kind, "verbs": ["get", "patch", "update"]}));
        }
    }
    if group.is_empty() {
        out.push(json!({"name": "namespaces", "singularName": "namespace", "namespaced": false, "kind": "Namespace", "verbs": ["get", "list"], "shortNames": ["ns"]}));
    }
    let gv = if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    };
    Some(
        json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": out}),
    )
}

/// The OpenAPI definition name of a kind: `dev.stratus.compute.v1.Server`.
pub fn definition_name(t: &ResourceType) -> String {
    let group = if t.group.is_empty() {
        "io.k8s.api.core".to_string()
    } else {
        t.group.split('.').rev().collect::<Vec<_>>().join(".")
    };
    format!("{group}.{}.{}", t.version, t.kind)
}

fn gvk(t: &ResourceType) -> Value {
    json!([{"group": t.group, "version": t.version, "kind": t.kind}])
}

/// The full schema of an object as published (metadata spelled out).
fn published_schema(t: &ResourceType) -> Value {
    let mut s = t.schema.clone();
    if let Some(props) = s.get_mut("properties").and_then(Value::as_object_mut) {
        props.insert("metadata".into(), object_meta_schema());
    }
    s["x-kubernetes-group-version-kind"] = gvk(t);
    s
}

fn list_schema(t: &ResourceType, item_ref: &str) -> Value {
    json!({
        "type": "object",
        "description": format!("A list of {}.", t.plural),
        "required": ["items"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object", "properties": {"resourceVersion": {"type": "string"}, "continue": {"type": "string"}}},
            "items": {"type": "array", "items": {"$ref": item_ref}},
        },
        "x-kubernetes-group-version-kind": [{"group": t.group, "version": t.version, "kind": format!("{}List", t.kind)}],
    })
}

fn param(name: &str, kind: &str, desc: &str) -> Value {
    json!({"name": name, "in": "query", "description": desc, "schema": {"type": kind}, "uniqueItems": true})
}

fn write_params() -> Vec<Value> {
    vec![
        param(
            "dryRun",
            "string",
            "When present, indicates that modifications should not be persisted. Valid value: All.",
        ),
        param(
            "fieldManager",
            "string",
            "The name of the actor making the change.",
        ),
        param(
            "fieldValidation",
            "string",
            "How to treat unknown and duplicate fields: Ignore, Warn or Strict (the default).",
        ),
    ]
}

fn op(
    t: &ResourceType,
    action: &str,
    desc: &str,
    params: Vec<Value>,
    body: Option<(&str, Vec<&str>)>,
    resp_ref: &str,
) -> Value {
    let mut o = json!({
        "description": desc,
        "operationId": format!("{action}{}", t.kind),
        "tags": [t.group],
        "parameters": params,
        "responses": {"200": {"description": "OK", "content": {"application/json": {"schema": {"$ref": resp_ref}}}}},
        "x-kubernetes-action": action,
        "x-kubernetes-group-version-kind": {"group": t.group, "version": t.version, "kind": t.kind},
    });
    if let Some((schema_ref, types)) = body {
        let mut content = Map::new();
        for ty in types {
            content.insert(ty.to_string(), json!({"schema": {"$ref": schema_ref}}));
        }
        o["requestBody"] = json!({"content": content, "required": true});
    }
    o
}

/// `/openapi/v3/apis/{group}/{version}` (or `/openapi/v3/api/v1`).
pub fn openapi_v3(reg: &Registry, group: &str, version: &str) -> Option<Value> {
    let types: Vec<&std::sync::Arc<ResourceType>> = reg
        .all()
        .iter()
        .filter(|t| t.group == group && t.version == version)
        .collect();
    if types.is_empty() {
        return None;
    }
    let mut schemas = Map::new();
    let mut paths = Map::new();
    for t in types {
        let def = definition_name(t);
        let item_ref = format!("#/components/schemas/{def}");
        schemas.insert(def.clone(), published_schema(t));
        schemas.insert(format!("{def}List"), list_schema(t, &item_ref));
        let list_ref = format!("#/components/schemas/{def}List");
        let base = if t.group.is_empty() {
            format!("/api/{}", t.version)
        } else {
            format!("/apis/{}/{}", t.group, t.version)
        };
        let scoped = if t.namespaced {
            format!("{base}/namespaces/{{namespace}}/{}", t.plural)
        } else {
            format!("{base}/{}", t.plural)
        };
        let mut path_params = vec![];
        if t.namespaced {
            path_params.push(json!({"name": "namespace", "in": "path", "required": true, "schema": {"type": "string"}}));
        }
        let mut coll = json!({
            "get": op(t, "list", &format!("list or watch objects of kind {}", t.kind), vec![
                param("labelSelector", "string", "A selector to restrict the list of returned objects by their labels."),
                param("fieldSelector", "string", "A selector to restrict the list of returned objects by their fields."),
                param("limit", "integer", "Maximum number of objects to return."),
                param("continue", "string", "The continue token of the previous page."),
                param("resourceVersion", "string", "Where to start a watch."),
                param("watch", "boolean", "Watch for changes."),
                param("allowWatchBookmarks", "boolean", "Send BOOKMARK events."),
                param("timeoutSeconds", "integer", "How long the call lasts."),
            ], None, &list_ref),
            "post": op(t, "post", &format!("create a {}", t.kind), write_params(), Some((&item_ref, vec!["application/json", "application/yaml"])), &item_ref),
            "delete": op(t, "deletecollection", &format!("delete a collection of {}", t.kind), vec![param("labelSelector", "string", "Which objects to delete."), param("dryRun", "string", "Valid value: All.")], None, &list_ref),
        });
        coll["parameters"] = json!(path_params.clone());
        paths.insert(scoped.clone(), coll);
        let mut item_params = path_params.clone();
        item_params.push(
            json!({"name": "name", "in": "path", "required": true, "schema": {"type": "string"}}),
        );
        let mut patch_params = write_params();
        patch_params.push(param(
            "force",
            "boolean",
            "Force apply: take ownership of conflicting fields.",
        ));
        let patch_types = vec![
            "application/json-patch+json",
            "application/merge-patch+json",
            "application/apply-patch+yaml",
        ];
        for (suffix, what) in [
            ("", t.kind.clone()),
            ("/status", format!("status of a {}", t.kind)),
        ] {
            if suffix == "/status" && !t.status_subresource {
                continue;
            }
            let mut item = json!({
                "get": op(t, "get", &format!("read the {what}"), vec![], None, &item_ref),
                "put": op(t, "put", &format!("replace the {what}"), write_params(), Some((&item_ref, vec!["application/json", "application/yaml"])), &item_ref),
                "patch": op(t, "patch", &format!("partially update the {what}"), patch_params.clone(), Some((&item_ref, patch_types.clone())), &item_ref),
            });
            if suffix.is_empty() {
                item["delete"] = op(
                    t,
                    "delete",
                    &format!("delete a {}", t.kind),
                    vec![
                        param("dryRun", "string", "Valid value: All."),
                        param(
                            "propagationPolicy",
                            "string",
                            "Orphan, Background or Foreground.",
                        ),
                        param(
                            "gracePeriodSeconds",
                            "integer",
                            "Ignored: Stratus objects have no grace period.",
                        ),
                    ],
                    None,
                    &item_ref,
                );
            }
            item["parameters"] = json!(item_params.clone());
            paths.insert(format!("{scoped}/{{name}}{suffix}"), item);
        }
    }
    Some(json!({
        "openapi": "3.0.0",
        "info": {"title": "Stratus", "version": env!("CARGO_PKG_VERSION")},
        "paths": paths,
        "components": {"schemas": schemas},
    }))
}

/// `/openapi/v3`: the index of per-group-version documents.
pub fn openapi_v3_index(reg: &Registry) -> Value {
    let mut paths = Map::new();
    for (g, vs) in reg.groups() {
        for v in vs {
            let (key, url) = if g.is_empty() {
                (format!("api/{v}"), format!("/openapi/v3/api/{v}"))
            } else {
                (format!("apis/{g}/{v}"), format!("/openapi/v3/apis/{g}/{v}"))
            };
            let hash = openapi_v3(reg, &g, &v)
                .map(|d| short_hash(&d.to_string()))
                .unwrap_or_default();
            paths.insert(
                key,
                json!({"serverRelativeURL": format!("{url}?hash={hash}")}),
            );
        }
    }
    json!({"paths": paths})
}

fn short_hash(s: &str) -> String {
    // FNV-1a: a stable cache-busting tag, not a security measure.
    let mut h: u64 = 0xcbf29ce484222325;
    for b in s.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x100000001b3);
    }
    format!("{h:016X}")
}

/// `/openapi/v2`: every kind's schema as Swagger 2.0 definitions.
pub fn openapi_v2(reg: &Registry) -> Value {
    let mut defs = Map::new();
    for t in reg.all() {
        let def = definition_name(t);
        defs.insert(def.clone(), to_swagger(&published_schema(t)));
        defs.insert(
            format!("{def}List"),
            to_swagger(&list_schema(t, &format!("#/definitions/{def}"))),
        );
    }
    json!({"swagger": "2.0", "info": {"title": "Stratus", "version": env!("CARGO_PKG_VERSION")}, "paths": {}, "definitions": defs})
}

fn to_swagger(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(k, _)| {
                    k.as_str() != "nullable" && k.as_str() != "anyOf" && k.as_str() != "oneOf"
                })
                .map(|(k, v)| {
                    (
                        k.clone(),
                        if k == "enum" || k == "required" {
                            v.clone()
                        } else {
                            to_swagger(v)
                        },
                    )
                })
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(to_swagger).collect()),
        other => other.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `kubectl api-resources` reads `/apis`, then each group version's resource list: each
    /// review is found that way, as the one create-only, cluster-scoped resource of its group.
    #[test]
    fn the_reviews_are_discovered_as_kubectl_walks_discovery() {
        let reg = Registry::stratus().expect("the registry");
        let all = groups(&reg);
        for (group, plural, kind) in [
            (
                "authorization.k8s.io",
                "selfsubjectaccessreviews",
                "SelfSubjectAccessReview",
            ),
            (
                "authentication.k8s.io",
                "selfsubjectreviews",
                "SelfSubjectReview",
            ),
        ] {
            let listed = all["groups"]
                .as_array()
                .expect("groups")
                .iter()
                .find(|g| g["name"] == group)
                .unwrap_or_else(|| panic!("{group} in /apis: {all}"));
            assert_eq!(
                listed["preferredVersion"]["groupVersion"],
                format!("{group}/v1")
            );
            assert_eq!(group_doc_of(&reg, group), *listed);
            let list = resources(&reg, group, "v1").expect("its resource list");
            assert_eq!(list["groupVersion"], format!("{group}/v1"));
            assert_eq!(
                list["resources"],
                json!([{"name": plural, "singularName": plural.trim_end_matches('s'), "namespaced": false, "kind": kind, "verbs": ["create"]}])
            );
            assert_eq!(resources(&reg, group, "v1beta1"), None, "{group}");
        }
    }

    fn group_doc_of(reg: &Registry, group: &str) -> Value {
        super::group(reg, group).expect("the group")
    }
}
