//! Routing: Kubernetes-style paths to discovery, identity calls and the verbs of a resource.

use std::sync::Arc;

use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::base::error::{ApiError, ApiResult};
use crate::http::discovery;
use crate::http::response::{accept, json_response};
use crate::http::server::AppState;
use crate::policy::Decider;
use crate::policy::authn::{Caller, Principal};
use crate::policy::request::RequestInfo;
use crate::resource::outcome::Outcome;
use crate::resource::table::Rendering;
use crate::resource::verbs::{Params, Target};
use crate::storage::store::Stored;

/// Identity endpoints beside the resources: logout and password changes.
async fn identity_call(
    state: &AppState,
    method: &Method,
    segs: &[&str],
    bytes: &[u8],
    caller: &Caller,
) -> Option<ApiResult<Response>> {
    match (method, segs) {
        (&Method::DELETE, ["apis", "identity.stratus.dev", "v1", "tokens", "self"]) => Some(
            async {
                let claims = caller
                    .claims
                    .as_ref()
                    .ok_or_else(|| ApiError::bad_request("only an issued token can be revoked"))?;
                state.identity.revoke(claims).await?;
                Ok(Outcome::success().into_response())
            }
            .await,
        ),
        (
            &Method::POST,
            [
                "apis",
                "authorization.k8s.io",
                "v1",
                "selfsubjectaccessreviews",
            ],
        ) => Some(
            async {
                let mut review = if crate::http::protobuf::is_protobuf(bytes) {
                    crate::http::protobuf::self_subject_access_review(bytes).ok_or_else(|| {
                        ApiError::bad_request("the protobuf body is not a SelfSubjectAccessReview")
                    })?
                } else {
                    crate::base::body::decode(bytes, false)?.value
                };
                if !review.is_object() {
                    return Err(ApiError::bad_request(
                        "the request body must be a SelfSubjectAccessReview object",
                    ));
                }
                let (allowed, reason) = match review.pointer("/spec/resourceAttributes") {
                    Some(ra) if !matches!(caller.principal(), Principal::System(_)) => {
                        let field = |k: &str| {
                            ra.get(k)
                                .and_then(serde_json::Value::as_str)
                                .unwrap_or_default()
                                .to_string()
                        };
                        let info = crate::policy::request::RequestInfo {
                            verb: field("verb"),
                            group: Some(field("group")),
                            version: if field("version").is_empty() {
                                "v1".into()
                            } else {
                                field("version")
                            },
                            resource: field("resource"),
                            subresource: field("subresource"),
                            namespace: field("namespace"),
                            name: field("name"),
                        };
                        let namespaced = state.api.registry.all().iter().any(|t| {
                            t.group == field("group") && t.plural == info.resource && t.namespaced
                        });
                        let decided = match caller.node() {
                            Some(node) => crate::policy::node::restrict(
                                &state.api,
                                &info,
                                &Params::default(),
                                node,
                            )
                            .await
                            .map(|_| "allowed by the node authorizer (a write is then decided on its objects)"),
                            None => crate::policy::roles::authorize(
                                &caller.user,
                                &caller.grants,
                                &info,
                                namespaced,
                            )
                            .map(|()| "allowed by a role assignment"),
                        };
                        match decided {
                            Ok(why) => (true, why.to_string()),
                            Err(e) if e.code == 403 => (false, e.message),
                            Err(e) => return Err(e),
                        }
                    }
                    // Non-resource paths are open to every authenticated user; system identities may do anything.
                    _ => (
                        true,
                        if caller.system {
                            "system identity".into()
                        } else {
                            "non-resource request".into()
                        },
                    ),
                };
                review["status"] = json!({"allowed": allowed, "reason": reason});
                Ok(json_response(StatusCode::CREATED, &review, &[]))
            }
            .await,
        ),
        (
            &Method::POST,
            [
                "apis",
                "authentication.k8s.io",
                "v1",
                "selfsubjectreviews",
            ],
        ) => Some(crate::http::whoami::review(bytes, caller)),
        (
            &Method::PUT,
            [
                "apis",
                "identity.stratus.dev",
                "v1",
                "users",
                name,
                "password",
            ],
        ) => Some(
            crate::http::login::change_password(state, name, bytes, caller).await,
        ),
        _ => None,
    }
}

/// Answers an authenticated request: `info` is its path, read once.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn route(
    state: &AppState,
    method: &Method,
    path: &str,
    info: &RequestInfo,
    headers: &HeaderMap,
    params: &Params,
    bytes: &[u8],
    caller: &Caller,
) -> ApiResult<Response> {
    let reg = &state.api.registry;
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    if let Some(r) = identity_call(state, method, &segs, bytes, caller).await {
        return r;
    }
    if let Some(r) = crate::http::console::call(state, method, &segs, bytes, caller).await {
        return r;
    }
    let read = crate::policy::authorize(&state.api, info, params, caller).await?;
    let ok = |v: serde_json::Value| Ok(json_response(StatusCode::OK, &v, &[]));
    let none = || ApiError::no_route(path);
    let get_only = |m: &Method| {
        if m == Method::GET {
            Ok(())
        } else {
            Err(ApiError::method_not_allowed(format!(
                "{m} is not allowed on {path}"
            )))
        }
    };
    match segs.as_slice() {
        ["metrics"] => {
            get_only(method)?;
            // As kube-apiserver's: for system identities (not nodes) and cluster-wide roles.
            let system = matches!(caller.principal(), Principal::System(_));
            if !(system || caller.grants.iter().any(|g| g.namespace.is_none())) {
                return Err(ApiError::forbidden(format!(
                    "User \"{}\" cannot get path \"/metrics\": it needs a cluster-wide role",
                    caller.user
                )));
            }
            return Ok((
                [(header::CONTENT_TYPE, crate::http::metrics::CONTENT_TYPE)],
                state.metrics.encode(),
            )
                .into_response());
        }
        ["api"] => {
            get_only(method)?;
            return ok(discovery::core_versions());
        }
        ["apis"] => {
            get_only(method)?;
            return ok(discovery::groups(reg));
        }
        ["api", v] => {
            get_only(method)?;
            return ok(discovery::resources(reg, "", v).ok_or_else(none)?);
        }
        ["apis", g] => {
            get_only(method)?;
            return ok(discovery::group(reg, g).ok_or_else(none)?);
        }
        ["apis", g, v] => {
            get_only(method)?;
            return ok(discovery::resources(reg, g, v).ok_or_else(none)?);
        }
        ["openapi", "v2"] => {
            get_only(method)?;
            return ok(discovery::openapi_v2(reg));
        }
        ["openapi", "v3"] => {
            get_only(method)?;
            return ok(discovery::openapi_v3_index(reg));
        }
        ["openapi", "v3", "api", v] => {
            get_only(method)?;
            return ok(discovery::openapi_v3(reg, "", v).ok_or_else(none)?);
        }
        ["openapi", "v3", "apis", g, v] => {
            get_only(method)?;
            return ok(discovery::openapi_v3(reg, g, v).ok_or_else(none)?);
        }
        _ => {}
    }
    // Namespaces are read-only views of Projects (and the system namespaces): a project's
    // objects live in the namespace named after it.
    match segs.as_slice() {
        ["api", "v1", "namespaces"] => {
            get_only(method)?;
            let items = state.api.namespaces().await?;
            return ok(
                json!({"kind": "NamespaceList", "apiVersion": "v1", "metadata": {}, "items": items}),
            );
        }
        ["api", "v1", "namespaces", ns] => {
            get_only(method)?;
            return match state.api.namespace(ns).await? {
                Some(n) => ok(n),
                None => Err(ApiError::not_found("", "namespaces", ns)),
            };
        }
        _ => {}
    }
    let (group, version, rest) = match segs.as_slice() {
        ["api", v, rest @ ..] => ("", *v, rest),
        ["apis", g, v, rest @ ..] => (*g, *v, rest),
        _ => return Err(none()),
    };
    let (namespace, rest) = match rest {
        ["namespaces", ns, plural, tail @ ..] => (Some(ns.to_string()), {
            let mut r = vec![*plural];
            r.extend_from_slice(tail);
            r
        }),
        other => (None, other.to_vec()),
    };
    let (plural, name, sub) = match rest.as_slice() {
        [plural] => (*plural, None, None),
        [plural, name] => (*plural, Some(name.to_string()), None),
        [plural, name, sub] => (*plural, Some(name.to_string()), Some(sub.to_string())),
        _ => return Err(none()),
    };
    let rt = reg.get(group, version, plural).ok_or_else(none)?;
    if namespace.is_some() && !rt.namespaced {
        return Err(none());
    }
    if let Some(s) = &sub
        && !(s == "status" && rt.status_subresource)
        && !(s == "binding"
            && (crate::admission::binding::is_server(&rt.group, &rt.kind)
                || crate::admission::storage::is_volume(&rt.group, &rt.kind)))
    {
        return Err(none());
    }
    if let Some(ns) = &namespace
        && !crate::base::meta::is_dns1123_label(ns)
    {
        return Err(ApiError::bad_request(format!(
            "invalid namespace \"{ns}\": must be a DNS-1123 label"
        )));
    }
    if rt.namespaced && namespace.is_none() && name.is_some() {
        return Err(none());
    }
    let t = Target {
        rt: Arc::clone(rt),
        namespace,
        name,
        subresource: sub,
    };
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json");
    match t.rt.view {
        Some(view) => {
            serve_view(
                state,
                view,
                t,
                method,
                path,
                headers,
                params,
                bytes,
                content_type,
                caller,
                read,
            )
            .await
        }
        None => dispatch(
            state,
            &t,
            method,
            path,
            headers,
            params,
            bytes,
            content_type,
            caller,
            read,
        )
        .await
        .map(IntoResponse::into_response),
    }
}

#[allow(clippy::too_many_arguments)]
async fn dispatch(
    state: &AppState,
    t: &Target,
    method: &Method,
    path: &str,
    headers: &HeaderMap,
    params: &Params,
    bytes: &[u8],
    content_type: &str,
    caller: &Caller,
    read: Option<(String, Stored)>,
) -> ApiResult<Outcome> {
    let api = &state.api;
    let rendering = || Rendering::from_accept(accept(headers));
    let user_agent = caller.user_agent.as_str();
    // Every write is decided on its final objects, inside the verb.
    let policy = &Decider::new(caller);
    match (method, t.name.is_some()) {
        (&Method::GET, false) if params.flag("watch") => {
            crate::resource::watch::watch(
                api,
                t,
                rendering(),
                params,
                state.config.bookmark_interval,
            )
            .await
        }
        (&Method::GET, false) => api.list(t, rendering(), params).await,
        (&Method::POST, true) if t.subresource.as_deref() == Some("binding") => {
            api.bind(t, bytes, content_type, policy).await
        }
        (&Method::DELETE, true) if t.subresource.as_deref() == Some("binding") => {
            api.unbind(t, policy).await
        }
        (_, true) if t.subresource.as_deref() == Some("binding") => Err(
            ApiError::method_not_allowed(format!("{method} is not allowed on {path}")),
        ),
        (&Method::GET, true) => {
            // What authorising the request read already, when it is this object.
            let read = read.filter(|(key, _)| *key == t.key(api)).map(|(_, s)| s);
            api.get(t, rendering(), params, read).await
        }
        (&Method::POST, false) if t.namespace.is_some() || !t.rt.namespaced => {
            api.create(t, bytes, content_type, params, user_agent, policy)
                .await
        }
        (&Method::PUT, true) => {
            api.update(t, bytes, content_type, params, user_agent, policy)
                .await
        }
        (&Method::PATCH, true) => {
            api.patch(t, bytes, content_type, params, user_agent, policy)
                .await
        }
        (&Method::DELETE, true) if t.subresource.is_none() => {
            api.delete(t, bytes, params, policy).await
        }
        (&Method::DELETE, false) => api.delete_collection(t, bytes, params, policy).await,
        (m, _) => Err(ApiError::method_not_allowed(format!(
            "{m} is not allowed on {path}"
        ))),
    }
}

/// Serves a view type: the request is translated to its backing type, served as usual, and
/// the answer translated back.
#[allow(clippy::too_many_arguments)]
async fn serve_view(
    state: &AppState,
    view: crate::resource::view::View,
    t: Target,
    method: &Method,
    path: &str,
    headers: &HeaderMap,
    params: &Params,
    bytes: &[u8],
    content_type: &str,
    caller: &Caller,
    read: Option<(String, Stored)>,
) -> ApiResult<Response> {
    let (group, version) = match view.backing_api_version.split_once('/') {
        Some((g, v)) => (g, v),
        None => ("", view.backing_api_version),
    };
    let backing = state
        .api
        .registry
        .get(group, version, &t.rt.plural)
        .ok_or_else(|| ApiError::internal(format!("no backing type for {}", t.rt.plural)))?;
    let bt = Target {
        rt: Arc::clone(backing),
        ..t
    };
    let params = params.map_field_selector(|f| view.backing_path(f));
    let ct = content_type.split(';').next().unwrap_or("").trim();
    let body: Vec<u8> = if bytes.iter().all(u8::is_ascii_whitespace) || method == Method::DELETE {
        bytes.to_vec()
    } else {
        let decoded = crate::base::body::decode(bytes, crate::base::body::is_yaml(content_type))?;
        if let Some(dup) = decoded.duplicates.first() {
            return Err(ApiError::bad_request(format!(
                "strict decoding error: duplicate field \"{dup}\""
            )));
        }
        let v = if ct == "application/json-patch+json" {
            view.json_patch_to_backing(decoded.value)
        } else {
            view.to_backing(decoded.value)
        };
        v.to_string().into_bytes()
    };
    let ct = match ct {
        "application/apply-patch+yaml" => "application/apply-patch+json",
        "application/yaml" => "application/json",
        other => other,
    };
    let outcome = dispatch(
        state, &bt, method, path, headers, &params, &body, ct, caller, read,
    )
    .await?;
    let watch = params.flag("watch") && method == Method::GET;
    Ok(match outcome {
        Outcome::Watch(events) => Outcome::Watch(view.watch_events(events)),
        Outcome::List(list) => Outcome::List(view.list(list)),
        // A named GET with `watch`: answered as dispatched (as it always was).
        json @ Outcome::Json { .. } if watch => json,
        Outcome::Json {
            code,
            body,
            warnings,
        } => Outcome::Json {
            code,
            body: view.response(body),
            warnings,
        },
    }
    .into_response())
}
