//! The HTTP(S) front: routing of Kubernetes-style paths, authentication, serving.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use tokio::net::TcpListener;

use crate::base::error::{ApiError, ApiResult};
use crate::http::discovery;
use crate::resource::registry::Registry;
use crate::resource::verbs::{Api, Caller, Params, Target, json_response};
use crate::storage::store::Store;

/// API server settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// etcd client URLs.
    pub etcd_endpoints: Vec<String>,
    /// Key prefix of every object in etcd.
    pub prefix: String,
    /// Address to listen on.
    pub listen: SocketAddr,
    /// PEM certificate chain and key; plain HTTP when absent (tests of the HTTP layer only).
    pub tls: Option<(PathBuf, PathBuf)>,
    /// Bearer tokens and the user each one authenticates.
    pub tokens: HashMap<String, String>,
    /// How often watches that asked for bookmarks get one.
    pub bookmark_interval: Duration,
    /// Largest request body accepted.
    pub max_body_bytes: usize,
    /// Where to append the audit log (JSON lines); none when absent.
    pub audit_log: Option<PathBuf>,
    /// Treat every request as a system administrator's, without looking at credentials. Only
    /// for measuring what authentication costs (the benchmark); no command line sets it.
    pub auth_disabled: bool,
}

impl Config {
    /// Defaults for everything but the etcd endpoints.
    pub fn new(etcd_endpoints: Vec<String>) -> Self {
        Self {
            etcd_endpoints,
            prefix: "/stratus".into(),
            listen: SocketAddr::from(([127, 0, 0, 1], 6443)),
            tls: None,
            tokens: HashMap::new(),
            bookmark_interval: Duration::from_secs(60),
            max_body_bytes: 1024 * 1024,
            audit_log: None,
            auth_disabled: false,
        }
    }
}

/// Reads a token file: one `token,user` per line (`#` comments allowed).
pub fn read_token_file(path: &std::path::Path) -> std::io::Result<HashMap<String, String>> {
    let text = std::fs::read_to_string(path)?;
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| {
            l.split_once(',')
                .map(|(t, u)| (t.trim().to_string(), u.trim().to_string()))
        })
        .collect())
}

struct AppState {
    api: Api,
    config: Config,
    audit: Option<crate::http::audit::AuditLog>,
    identity: crate::policy::identity::Identity,
    metrics: crate::http::metrics::Metrics,
}

/// The router of every API path.
fn router(state: Arc<AppState>) -> Router {
    Router::new().fallback(handle).with_state(state)
}

/// Who sent the request: a system identity from the token file, or a user with a token this
/// cluster issued that is neither expired nor revoked, whose user exists and is enabled.
async fn authenticate(state: &AppState, req: &axum::http::request::Parts) -> ApiResult<Caller> {
    if state.config.auth_disabled {
        let user_agent = req
            .headers
            .get(header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("unknown")
            .to_string();
        return Ok(Caller {
            user: "unauthenticated".into(),
            user_agent,
            system: true,
            grants: Vec::new(),
            claims: None,
        });
    }
    let token = req
        .headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .ok_or_else(ApiError::unauthorized)?;
    let user_agent = req
        .headers
        .get(header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("unknown")
        .to_string();
    if let Some(user) = state.config.tokens.get(token) {
        return Ok(Caller {
            user: user.clone(),
            user_agent,
            system: true,
            grants: Vec::new(),
            claims: None,
        });
    }
    let id = &state.identity;
    let claims = id.signer.verify(token).ok_or_else(ApiError::unauthorized)?;
    let grants = id
        .token_grants(&claims)
        .await?
        .ok_or_else(ApiError::unauthorized)?;
    Ok(Caller {
        user: claims.user.clone(),
        user_agent,
        system: false,
        grants,
        claims: Some(claims),
    })
}

/// The most of a refused request's body read (and dropped) to keep its connection usable.
const DRAIN_BYTES: usize = 256 * 1024;
/// How long a refused request's body is waited for.
const DRAIN_TIME: Duration = Duration::from_secs(1);

/// Reads and drops a body until its end or past `max` bytes.
async fn drain(mut body: Body, max: usize) {
    use http_body_util::BodyExt;
    let mut total = 0usize;
    while total <= max {
        match body.frame().await {
            Some(Ok(frame)) => total += frame.data_ref().map_or(0, bytes::Bytes::len),
            _ => break,
        }
    }
}

/// Reads a request body of at most `limit` bytes. A longer one is read on (and dropped, up to
/// 16 times the limit) before the 413 goes out, so the client gets to read the answer instead
/// of a connection reset mid-upload.
async fn read_body(mut body: Body, limit: usize) -> Result<bytes::Bytes, ()> {
    use http_body_util::BodyExt;
    let mut buf = Vec::new();
    let mut total = 0usize;
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else { return Err(()) };
        if let Ok(data) = frame.into_data() {
            total += data.len();
            if total <= limit {
                buf.extend_from_slice(&data);
            } else if total > limit.saturating_mul(16) {
                break;
            }
        }
    }
    if total > limit {
        Err(())
    } else {
        Ok(bytes::Bytes::from(buf))
    }
}

/// `POST .../tokens`: a token for a user and password (no other authentication needed).
async fn issue_token(state: &AppState, bytes: &[u8]) -> ApiResult<Response> {
    let req = crate::base::body::decode(bytes, false)?.value;
    let user = req
        .get("user")
        .and_then(serde_json::Value::as_str)
        .unwrap_or_default();
    let password = req
        .get("password")
        .and_then(serde_json::Value::as_str)
        .unwrap_or_default();
    let ttl = req
        .get("expirationSeconds")
        .and_then(serde_json::Value::as_i64)
        .unwrap_or(3600);
    if !(1..=86_400).contains(&ttl) {
        return Err(ApiError::bad_request(
            "expirationSeconds: must be between 1 and 86400",
        ));
    }
    let id = &state.identity;
    // The same answer for an unknown user, a wrong password and a disabled user.
    let ok = id.check_password(user, password).await?;
    let (token, claims) = id.signer.issue(user, ttl);
    if !ok || id.token_grants(&claims).await?.is_none() {
        return Err(ApiError::unauthorized());
    }
    let expires = jiff::Timestamp::from_second(claims.exp)
        .map(|t| t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string())
        .unwrap_or_default();
    Ok(json_response(
        StatusCode::CREATED,
        &json!({
            "apiVersion": "identity.stratus.dev/v1", "kind": "Token", "user": user, "token": token, "expiresAt": expires,
        }),
        &[],
    ))
}

/// A `Status` of success, for calls that return no object.
fn success() -> Response {
    json_response(
        StatusCode::OK,
        &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success"}),
        &[],
    )
}

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
                Ok(success())
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
                    Some(ra) if !caller.system => {
                        let field = |k: &str| {
                            ra.get(k)
                                .and_then(serde_json::Value::as_str)
                                .unwrap_or_default()
                                .to_string()
                        };
                        let info = crate::http::audit::RequestInfo {
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
                        match crate::policy::identity::authorize(
                            &caller.user,
                            &caller.grants,
                            &info,
                            namespaced,
                        ) {
                            Ok(()) => (true, "allowed by a role assignment".to_string()),
                            Err(e) => (false, e.message),
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
            async {
                if !(caller.cluster_admin() || caller.user == *name) {
                    return Err(ApiError::forbidden(format!(
                        "User \"{}\" cannot set the password of another user",
                        caller.user
                    )));
                }
                let body = crate::base::body::decode(bytes, false)?.value;
                let password = body
                    .get("password")
                    .and_then(serde_json::Value::as_str)
                    .ok_or_else(|| ApiError::bad_request("password: required"))?;
                state.identity.set_password(name, password).await?;
                Ok(success())
            }
            .await,
        ),
        _ => None,
    }
}

async fn handle(State(state): State<Arc<AppState>>, req: Request) -> Response {
    // Only the audit log needs the arrival time.
    let received = state.audit.as_ref().map(|_| crate::base::meta::now_micro());
    let (parts, body) = req.into_parts();
    let path = parts.uri.path().to_string();
    let method = parts.method.clone();
    match path.as_str() {
        "/healthz" | "/livez" => return (StatusCode::OK, "ok").into_response(),
        "/readyz" => {
            return match state.api.store.revision().await {
                Ok(_) => (StatusCode::OK, "ok").into_response(),
                Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "etcd not ready").into_response(),
            };
        }
        "/version" => {
            return json_response(
                StatusCode::OK,
                &json!({
                    "major": "1", "minor": "32", "gitVersion": concat!("v1.32.0-stratus.", env!("CARGO_PKG_VERSION")),
                    "gitCommit": "", "gitTreeState": "clean", "buildDate": "", "goVersion": "", "compiler": "rustc", "platform": "linux/amd64",
                }),
                &[],
            );
        }
        _ => {}
    }
    if method == Method::POST && path == "/apis/identity.stratus.dev/v1/tokens" {
        let response = match read_body(body, 64 * 1024).await {
            Ok(bytes) => issue_token(&state, &bytes).await,
            Err(_) => Err(ApiError::too_large(64 * 1024)),
        };
        return response.unwrap_or_else(IntoResponse::into_response);
    }
    let started = std::time::Instant::now();
    let _busy = state
        .metrics
        .start(!matches!(method, Method::GET | Method::HEAD));
    let caller = authenticate(&state, &parts).await;
    let params = Params::parse(parts.uri.query());
    let response = match (&caller, &params) {
        (Ok(caller), Ok(params)) => match read_body(body, state.config.max_body_bytes).await {
            Ok(bytes) => {
                route(
                    &state,
                    &method,
                    &path,
                    &parts.headers,
                    params,
                    &bytes,
                    caller,
                )
                .await
            }
            Err(_) => Err(ApiError::too_large(state.config.max_body_bytes)),
        },
        (Err(e), _) | (_, Err(e)) => {
            // Read a small body before refusing: HTTP/1.1 can carry the client's next request
            // on this connection only once this one's body is off it (hyper closes the
            // connection otherwise, as Go's servers do past 256 KiB).
            let _ = tokio::time::timeout(DRAIN_TIME, drain(body, DRAIN_BYTES)).await;
            Err(e.clone())
        }
    };
    let mut response = response.unwrap_or_else(IntoResponse::into_response);
    let code = response.status().as_u16();
    let watch = params.as_ref().is_ok_and(|p| p.flag("watch"));
    let info = crate::http::audit::RequestInfo::parse(method.as_str(), &path, watch);
    let counted = crate::http::metrics::Metrics::request(
        &state.api.registry,
        &info,
        method.as_str(),
        parts
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or(""),
    );
    state.metrics.answered(&counted, code, started.elapsed());
    if counted.verb == "WATCH" && response.status().is_success() {
        // Counted as open until the stream ends or the client goes.
        let open = state.metrics.watching(&counted);
        let body = std::mem::replace(response.body_mut(), Body::empty());
        let stream = futures::StreamExt::map(body.into_data_stream(), move |chunk| {
            let _ = &open;
            chunk
        });
        *response.body_mut() = Body::from_stream(stream);
    }
    let user = caller.as_ref().ok().map(|c| c.user.as_str());
    tracing::debug!(user, %method, %path, query = parts.uri.query().unwrap_or(""), code, "request");
    if let (Some(audit), Some(received)) = (&state.audit, &received) {
        let uri = parts
            .uri
            .path_and_query()
            .map_or(path.as_str(), |pq| pq.as_str());
        let user_agent = parts
            .headers
            .get(header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let source = parts.extensions.get::<SocketAddr>().map(|a| a.ip());
        audit.record(&crate::http::audit::Record {
            info: &info,
            user,
            uri,
            source,
            user_agent,
            code,
            received,
        });
    }
    response
}

async fn route(
    state: &AppState,
    method: &Method,
    path: &str,
    headers: &axum::http::HeaderMap,
    params: &Params,
    bytes: &[u8],
    caller: &Caller,
) -> ApiResult<Response> {
    let reg = &state.api.registry;
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    if let Some(r) = identity_call(state, method, &segs, bytes, caller).await {
        return r;
    }
    let read = if let Some(node) = caller
        .user
        .strip_prefix("system:node:")
        .filter(|_| caller.system)
    {
        restrict_node(state, method, path, params, bytes, node).await?
    } else {
        if !caller.system {
            authorize(state, method, path, params, bytes, caller)?;
        }
        None
    };
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
            let node = caller.user.starts_with("system:node:");
            if !(caller.system && !node || caller.grants.iter().any(|g| g.namespace.is_none())) {
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
        && !(s == "binding" && crate::admission::binding::has_binding(rt))
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
        None => {
            dispatch(
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
        }
    }
}

/// The stored event a request names, if there is one (events.k8s.io events are kept as core
/// events, with the same `reportingInstance`).
async fn stored_event(
    state: &AppState,
    info: &crate::http::audit::RequestInfo,
) -> ApiResult<(String, crate::storage::store::Stored)> {
    let rt = state
        .api
        .registry
        .get("", "v1", "events")
        .ok_or_else(|| ApiError::internal("the Event kind is not served"))?;
    let t = Target {
        rt: Arc::clone(rt),
        namespace: Some(info.namespace.clone()),
        name: Some(info.name.clone()),
        subresource: None,
    };
    Ok((t.key(&state.api), state.api.read(&t).await?))
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
async fn restrict_node(
    state: &AppState,
    method: &Method,
    path: &str,
    params: &Params,
    bytes: &[u8],
    node: &str,
) -> ApiResult<Option<(String, crate::storage::store::Stored)>> {
    let info = crate::http::audit::RequestInfo::parse(method.as_str(), path, params.flag("watch"));
    let Some(group) = info.group.as_deref() else {
        return Ok(None);
    };
    if matches!(info.verb.as_str(), "get" | "list" | "watch") {
        return node_may_read(state, &info, params, node).await;
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
        let rt = state
            .api
            .registry
            .get(group, &info.version, &info.resource)
            .ok_or_else(deny)?;
        let t = Target {
            rt: Arc::clone(rt),
            namespace: (!info.namespace.is_empty()).then(|| info.namespace.clone()),
            name: Some(info.name.clone()),
            subresource: None,
        };
        match state.api.read(&t).await {
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
                    && match stored_event(state, &info).await {
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
    state: &AppState,
    info: &crate::http::audit::RequestInfo,
    params: &Params,
    node: &str,
) -> ApiResult<Option<(String, crate::storage::store::Stored)>> {
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
        return match stored_event(state, info).await {
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
        state
            .api
            .registry
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
            match state.api.read(&t).await {
                Ok(s) if on_node(&s.value) => Ok(Some((t.key(&state.api), s))),
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
            let used = mine(state, servers()?, &info.namespace, node)
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
            let images = state
                .api
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
                    match state.api.read(&t).await {
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
            for server in mine(state, servers()?, &info.namespace, node).await? {
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
    state: &AppState,
    servers: &crate::resource::registry::ResourceType,
    ns: &str,
    node: &str,
) -> ApiResult<Vec<serde_json::Value>> {
    let prefix = servers.key_prefix(&state.api.prefix, Some(ns));
    let page = state
        .api
        .store
        .list(&prefix, None, 0, 0)
        .await
        .map_err(crate::resource::verbs::store_err)?;
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

/// Refuses what the caller's roles do not allow, before anything is read or written.
fn authorize(
    state: &AppState,
    method: &Method,
    path: &str,
    params: &Params,
    bytes: &[u8],
    caller: &Caller,
) -> ApiResult<()> {
    let info = crate::http::audit::RequestInfo::parse(method.as_str(), path, params.flag("watch"));
    let Some(group) = info.group.as_deref() else {
        return Ok(());
    };
    let namespaced = state
        .api
        .registry
        .get(group, &info.version, &info.resource)
        .is_some_and(|rt| rt.namespaced);
    crate::policy::identity::authorize(&caller.user, &caller.grants, &info, namespaced)?;
    // Only a cluster admin hands out cluster-wide roles.
    if info.resource == "roleassignments"
        && matches!(info.verb.as_str(), "create" | "update" | "patch")
        && !caller.cluster_admin()
    {
        let asks = crate::base::body::decode(bytes, crate::base::body::is_yaml("application/json"))
            .is_ok_and(|d| {
                d.value
                    .pointer("/spec/clusterWide")
                    .and_then(serde_json::Value::as_bool)
                    == Some(true)
            })
            || String::from_utf8_lossy(bytes).contains("clusterWide");
        if asks {
            return Err(ApiError::forbidden(format!(
                "User \"{}\" cannot grant cluster-wide roles",
                caller.user
            )));
        }
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn dispatch(
    state: &AppState,
    t: &Target,
    method: &Method,
    path: &str,
    headers: &axum::http::HeaderMap,
    params: &Params,
    bytes: &[u8],
    content_type: &str,
    caller: &Caller,
    read: Option<(String, crate::storage::store::Stored)>,
) -> ApiResult<Response> {
    let api = &state.api;
    match (method, t.name.is_some()) {
        (&Method::GET, false) if params.flag("watch") => {
            crate::resource::watch::watch(api, t, headers, params, state.config.bookmark_interval)
                .await
        }
        (&Method::GET, false) => api.list(t, headers, params).await,
        (&Method::POST, true) if t.subresource.as_deref() == Some("binding") => {
            api.bind(t, bytes, content_type).await
        }
        (&Method::DELETE, true) if t.subresource.as_deref() == Some("binding") => {
            api.unbind(t).await
        }
        (_, true) if t.subresource.as_deref() == Some("binding") => Err(
            ApiError::method_not_allowed(format!("{method} is not allowed on {path}")),
        ),
        (&Method::GET, true) => {
            // What authorising the request read already, when it is this object.
            let read = read.filter(|(key, _)| *key == t.key(api)).map(|(_, s)| s);
            api.get(t, headers, params, read).await
        }
        (&Method::POST, false) if t.namespace.is_some() || !t.rt.namespaced => {
            api.create(t, bytes, content_type, params, caller).await
        }
        (&Method::PUT, true) => api.update(t, bytes, content_type, params, caller).await,
        (&Method::PATCH, true) => api.patch(t, bytes, content_type, params, caller).await,
        (&Method::DELETE, true) if t.subresource.is_none() => api.delete(t, bytes, params).await,
        (&Method::DELETE, false) => api.delete_collection(t, bytes, params).await,
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
    headers: &axum::http::HeaderMap,
    params: &Params,
    bytes: &[u8],
    content_type: &str,
    caller: &Caller,
    read: Option<(String, crate::storage::store::Stored)>,
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
    let resp = dispatch(
        state, &bt, method, path, headers, &params, &body, ct, caller, read,
    )
    .await?;
    let (mut parts, body) = resp.into_parts();
    parts.headers.remove(header::CONTENT_LENGTH);
    if params.flag("watch") && method == Method::GET {
        return Ok(Response::from_parts(parts, view.watch_body(body)));
    }
    let raw = axum::body::to_bytes(body, usize::MAX)
        .await
        .map_err(|e| ApiError::internal(format!("read a response body: {e}")))?;
    let out = match serde_json::from_slice::<serde_json::Value>(&raw) {
        Ok(v) => view.response(v).to_string().into_bytes(),
        Err(_) => raw.to_vec(),
    };
    Ok(Response::from_parts(parts, Body::from(out)))
}

/// A running API server.
pub struct Server {
    /// The address it listens on (useful with port 0).
    pub local_addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    /// Stops serving.
    pub fn abort(&self) {
        self.task.abort();
    }

    /// Waits until the server stops.
    pub async fn join(self) {
        let _ = self.task.await;
    }
}

/// Errors starting the server.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The kinds could not be loaded.
    #[error("load resource kinds")]
    Registry(#[from] crate::resource::registry::RegistryError),
    /// etcd is unreachable.
    #[error("connect to etcd")]
    Store(#[from] crate::storage::store::StoreError),
    /// The listen address is taken or not allowed.
    #[error("listen on {0}")]
    Listen(SocketAddr, #[source] std::io::Error),
    /// The TLS files are missing or invalid.
    #[error("load TLS certificate and key")]
    Tls(#[source] std::io::Error),
    /// The audit log cannot be opened.
    #[error("open the audit log")]
    Audit(#[source] std::io::Error),
}

/// Starts serving; returns once the listener is bound.
pub async fn start(config: Config) -> Result<Server, StartError> {
    let registry = Arc::new(Registry::stratus()?);
    let metrics = crate::http::metrics::Metrics::default();
    let store = Store::connect(&config.etcd_endpoints)
        .await?
        .with_marker(
            crate::policy::identity::marker_key(&config.prefix),
            crate::policy::identity::marked_prefixes(&config.prefix),
        )
        .with_latency(metrics.etcd.clone(), &config.prefix);
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|e| StartError::Listen(config.listen, e))?;
    let local_addr = listener
        .local_addr()
        .map_err(|e| StartError::Listen(config.listen, e))?;
    let tls = match &config.tls {
        Some((cert, key)) => Some(crate::http::tls::acceptor(cert, key).map_err(StartError::Tls)?),
        None => None,
    };
    let hub = Arc::new(crate::storage::hub::Hub::new(
        store.clone(),
        config.bookmark_interval,
    ));
    let system_namespaces =
        Arc::new(crate::resource::verbs::load_system_namespaces(&store, &config.prefix).await?);
    let api = Api {
        system_namespaces,
        store,
        registry,
        prefix: config.prefix.clone(),
        hub,
        placement_locks: Arc::default(),
    };
    let audit = match &config.audit_log {
        Some(path) => Some(crate::http::audit::AuditLog::open(path).map_err(StartError::Audit)?),
        None => None,
    };
    let identity =
        crate::policy::identity::Identity::load(api.store.clone(), &config.prefix).await?;
    let state = Arc::new(AppState {
        api,
        config,
        audit,
        identity,
        metrics,
    });
    // apiserver_storage_objects, every minute while the server is up.
    let counted = Arc::downgrade(&state);
    tokio::spawn(async move {
        while let Some(s) = counted.upgrade() {
            s.metrics
                .count_objects(&s.api.store, &s.api.registry, &s.config.prefix)
                .await;
            drop(s);
            tokio::time::sleep(crate::http::metrics::COUNT_EVERY).await;
        }
    });
    let app = router(state);
    let task = tokio::spawn(async move {
        loop {
            let (sock, peer) = match listener.accept().await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = sock.set_nodelay(true);
            let app = app.clone();
            let tls = tls.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(
                    move |mut req: hyper::Request<hyper::body::Incoming>| {
                        req.extensions_mut().insert(peer);
                        let app = app.clone();
                        async move {
                            use tower::ServiceExt;
                            app.oneshot(req.map(Body::new)).await
                        }
                    },
                );
                let builder = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                );
                let result = match tls {
                    Some(acceptor) => match acceptor.accept(sock).await {
                        Ok(stream) => {
                            builder
                                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                                .await
                        }
                        Err(e) => {
                            tracing::debug!(error = %e, "TLS handshake failed");
                            return;
                        }
                    },
                    None => {
                        builder
                            .serve_connection(hyper_util::rt::TokioIo::new(sock), service)
                            .await
                    }
                };
                if let Err(e) = result {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
            });
        }
    });
    Ok(Server { local_addr, task })
}
