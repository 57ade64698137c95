//! Serving: the listener, TLS, one request's path from its bytes to its response, metrics and
//! audit around it.

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

use crate::base::error::ApiError;
use crate::http::response::json_response;
use crate::http::route;
use crate::policy::authn::{Authenticator, authenticate};
use crate::policy::request::RequestInfo;
use crate::resource::registry::Registry;
use crate::resource::verbs::{Api, Params};
use crate::storage::store::Store;

/// API server settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// etcd client URLs (`https://` with [`Config::etcd_tls`], `http://` without).
    pub etcd_endpoints: Vec<String>,
    /// etcd's CA and this server's client certificate, for etcd over TLS.
    pub etcd_tls: Option<crate::storage::etcd::EtcdTls>,
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
    /// Connections, requests in flight, watches and timeouts.
    pub limits: crate::http::limits::Limits,
    /// Failed-login lockout and throttling, and the password hashing threads.
    pub login: crate::policy::identity::LoginPolicy,
    /// The Swift proxy's URL (`http://HOST:PORT`), named in identity tokens' service catalog
    /// (`/identity/v3`); none: the catalog is empty.
    pub object_store_url: Option<String>,
    /// Requests per source address to the identity endpoints that take no credential
    /// (Keystone password logins and `s3tokens`).
    pub identity_rate: crate::http::keystone::SourceRate,
    /// The Swift proxies' addresses: their `s3tokens` calls (one per S3 request of any
    /// client) are not limited per source.
    pub identity_proxies: Vec<std::net::IpAddr>,
    /// The largest image upload (`PUT images/NAME/data`), in bytes: the image URL policy's
    /// download limit.
    pub image_max_bytes: u64,
    /// The largest virtual disk size an uploaded image may describe, in bytes.
    pub image_max_virtual_size: u64,
    /// The most bytes of image uploads staged on this server's disk at once (each upload is
    /// kept whole until it is inspected and stored): 429 past it while others are staged, 507
    /// for an upload that could never fit.
    pub image_staging_max_bytes: u64,
    /// The networks a StoragePool's storage address may be in (by default the private
    /// networks; see [`crate::admission::pools`]).
    pub storage_ranges: Vec<crate::admission::pools::StorageCidr>,
}

impl Config {
    /// Defaults for everything but the etcd endpoints.
    pub fn new(etcd_endpoints: Vec<String>) -> Self {
        Self {
            etcd_endpoints,
            etcd_tls: None,
            prefix: "/stratus".into(),
            listen: SocketAddr::from(([127, 0, 0, 1], 6443)),
            tls: None,
            tokens: HashMap::new(),
            bookmark_interval: Duration::from_secs(60),
            max_body_bytes: 1024 * 1024,
            audit_log: None,
            auth_disabled: false,
            limits: crate::http::limits::Limits::default(),
            login: crate::policy::identity::LoginPolicy::default(),
            object_store_url: None,
            identity_rate: crate::http::keystone::SourceRate::default(),
            identity_proxies: Vec::new(),
            storage_ranges: crate::admission::pools::StorageCidr::private(),
            image_max_bytes: stratus_image_cache::policy::DEFAULT_MAX_BYTES,
            image_max_virtual_size: stratus_image_cache::policy::DEFAULT_MAX_VIRTUAL_SIZE,
            image_staging_max_bytes: 2 * stratus_image_cache::policy::DEFAULT_MAX_BYTES,
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

pub(crate) struct AppState {
    pub(crate) api: Api,
    pub(crate) config: Config,
    audit: Option<crate::http::audit::AuditLog>,
    pub(crate) identity: crate::policy::identity::Identity,
    pub(crate) metrics: crate::http::metrics::Metrics,
    inflight: crate::http::limits::Inflight,
    watches: crate::http::limits::Watches,
    /// The room uploads are staged in.
    pub(crate) staging: crate::http::image_data::StagingRoom,
    pub(crate) identity_limit: crate::http::keystone::SourceLimit,
}

/// The router of every API path.
fn router(state: Arc<AppState>) -> Router {
    hardened(Router::new().fallback(handle).with_state(state))
}

/// Every answer (API objects, Statuses, discovery, the dashboard's assets) says
/// `X-Content-Type-Options: nosniff`, so no browser reads a JSON body holding a user's text
/// as a script or a page.
fn hardened(router: Router) -> Router {
    router.layer(axum::middleware::map_response(
        |mut response: Response| async move {
            response.headers_mut().insert(
                axum::http::header::X_CONTENT_TYPE_OPTIONS,
                axum::http::HeaderValue::from_static("nosniff"),
            );
            response
        },
    ))
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
        // The dashboard's assets hold no data: anyone may read them. A body sent along is
        // read and dropped first, as for any refused request.
        p if crate::http::dashboard::is_dashboard(p) => {
            let _ = tokio::time::timeout(DRAIN_TIME, drain(body, DRAIN_BYTES)).await;
            return crate::http::dashboard::serve(&method, p);
        }
        _ => {}
    }
    // The one reading of the path every later step (limits, authorization, metrics, audit)
    // uses.
    let params = Params::parse(parts.uri.query());
    let watch = params.as_ref().is_ok_and(|p| p.flag("watch"));
    let info = RequestInfo::parse(method.as_str(), &path, watch);
    if info.verb == "watch" {
        return serve(state, parts, body, params, info, received).await;
    }
    // Watches are long-running: neither counted in flight nor given a deadline. Image data
    // transfers have places of their own, so that slow ones hold no other request's: taken
    // once the caller is known ([`serve`]), as they are shared out by identity.
    let transfer = crate::http::image_data::target(&path).is_some();
    let place = if transfer {
        None
    } else {
        match state
            .inflight
            .admit(!matches!(method, Method::GET | Method::HEAD))
        {
            Ok(p) => Some(p),
            Err(e) => return e.into_response(),
        }
    };
    let listing = info.verb == "list";
    // An image upload bounds its own time (each silence, and the whole).
    let timeout = if crate::http::image_data::is_upload(&method, &path) {
        crate::http::image_data::UPLOAD_DEADLINE + Duration::from_secs(60)
    } else {
        state.config.limits.request_timeout
    };
    // A write that failed on the server's side (a deadline, the store) may have been stored
    // all the same: no Retry-After invites a client to send it again, as kube-apiserver's
    // timeout answers none. A retried create would meet its own object (409), and one with
    // `generateName` would make a second.
    let writing = !matches!(method, Method::GET | Method::HEAD);
    let serving = serve(Arc::clone(&state), parts, body, params, info, received);
    let response = match tokio::time::timeout(timeout, serving).await {
        // A LIST (or an image's data) streams its answer after the handler has returned: it
        // stays in flight until its last byte is sent, as in kube-apiserver.
        Ok(mut response) if listing && response.status().is_success() => {
            let body = std::mem::replace(response.body_mut(), Body::empty());
            *response.body_mut() = Body::new(crate::http::limits::Holding::new(body, place));
            response
        }
        Ok(response) => response,
        Err(_) => ApiError::timeout(format!(
            "the request did not complete within {}s",
            timeout.as_secs()
        ))
        .into_response(),
    };
    outcome_unknown(writing, response)
}

/// `response` without its `Retry-After` when it answers a `writing` request with a server
/// error: whether the write was stored is not known, so it is not to be sent blindly again.
fn outcome_unknown(writing: bool, mut response: Response) -> Response {
    if writing && response.status().is_server_error() {
        response
            .headers_mut()
            .remove(axum::http::header::RETRY_AFTER);
    }
    response
}

/// Serves a request within its limits: `params` and `info` are its query and path, read once.
async fn serve(
    state: Arc<AppState>,
    parts: axum::http::request::Parts,
    body: Body,
    params: Result<Params, ApiError>,
    info: RequestInfo,
    received: Option<String>,
) -> Response {
    let path = parts.uri.path().to_string();
    let method = parts.method.clone();
    let source = parts.extensions.get::<SocketAddr>().map(|a| a.ip());
    let identity = crate::http::keystone::is_identity(&path);
    // Logins, Stratus's own and Keystone's, are audited with who tried and how it ended.
    if identity || (method == Method::POST && path == "/apis/identity.stratus.dev/v1/tokens") {
        let (response, attempt) = if identity {
            match crate::http::keystone::serve(&state, &parts, body, source).await {
                (response, Some(attempt)) => (response, attempt),
                (response, None) => return response,
            }
        } else {
            match read_body(body, 64 * 1024).await {
                Ok(bytes) => crate::http::login::issue_token(&state, &bytes, source).await,
                Err(_) => (
                    ApiError::too_large(64 * 1024).into_response(),
                    crate::http::login::Attempt {
                        user: String::new(),
                        result: "invalid",
                    },
                ),
            }
        };
        if let (Some(audit), Some(received)) = (&state.audit, &received) {
            let user = (attempt.result == "success").then_some(attempt.user.as_str());
            audit.record(&crate::http::audit::Record {
                info: &info,
                user,
                uri: &path,
                source,
                user_agent: parts
                    .headers
                    .get(header::USER_AGENT)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or(""),
                code: response.status().as_u16(),
                received,
                annotations: &[
                    ("authentication.stratus.dev/user", &attempt.user),
                    ("authentication.stratus.dev/result", attempt.result),
                ],
            });
        }
        return response;
    }
    let started = std::time::Instant::now();
    let _busy = state
        .metrics
        .start(!matches!(method, Method::GET | Method::HEAD));
    let header = |name| parts.headers.get(name).and_then(|v| v.to_str().ok());
    let authenticator = Authenticator {
        tokens: &state.config.tokens,
        identity: &state.identity,
        disabled: state.config.auth_disabled,
    };
    let caller = authenticate(
        &authenticator,
        header(header::AUTHORIZATION),
        header(header::USER_AGENT),
    )
    .await;
    let watch_slot = match (&caller, info.verb.as_str()) {
        (Ok(c), "watch") => match state
            .watches
            .open(&c.user, state.config.limits.watches_for(c))
        {
            Ok(slot) => Some(slot),
            Err(e) => return e.into_response(),
        },
        _ => None,
    };
    let data = crate::http::image_data::target(&path);
    let response = match (&caller, &params) {
        // An image's data streams; it is not read into memory as a request body.
        (Ok(caller), Ok(_)) if data.is_some() => {
            let target = data.unwrap_or_default();
            let cutoff = parts
                .extensions
                .get::<crate::http::limits::Cutoff>()
                .cloned()
                .unwrap_or_default();
            let request = crate::http::image_data::Request {
                method: &method,
                headers: &parts.headers,
                cutoff,
            };
            // Nodes' and system identities' transfers have places kept for them.
            let trusted = matches!(
                caller.principal(),
                crate::policy::authn::Principal::Node(_)
                    | crate::policy::authn::Principal::System(_)
            );
            match state.inflight.admit_transfer(&caller.user, trusted) {
                Err(e) => Err(e),
                // Held until the data's last byte is sent.
                Ok(place) => crate::http::image_data::serve(&state, &request, target, body, caller)
                    .await
                    .map(|mut response| {
                        let body = std::mem::replace(response.body_mut(), Body::empty());
                        *response.body_mut() =
                            Body::new(crate::http::limits::Holding::new(body, place));
                        response
                    }),
            }
        }
        (Ok(caller), Ok(params)) => match read_body(body, state.config.max_body_bytes).await {
            Ok(bytes) => {
                // Admission's view of who is asking (a non-public flavor is a cluster admin's).
                crate::admission::CLUSTER_ADMIN
                    .scope(
                        caller.cluster_admin(),
                        route::route(
                            &state,
                            &method,
                            &path,
                            &info,
                            &parts.headers,
                            params,
                            &bytes,
                            caller,
                        ),
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
        // Counted as open (and against its user's watches) until the stream ends or the
        // client goes.
        let open = (state.metrics.watching(&counted), watch_slot);
        let body = std::mem::replace(response.body_mut(), Body::empty());
        *response.body_mut() = Body::new(crate::http::limits::Holding::new(body, open));
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
        audit.record(&crate::http::audit::Record {
            info: &info,
            user,
            uri,
            source,
            user_agent,
            code,
            received,
            annotations: &[],
        });
    }
    response
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
    let store = Store::connect_with(&config.etcd_endpoints, config.etcd_tls.as_ref())
        .await?
        .with_marker(
            crate::storage::keys::marker_key(&config.prefix),
            crate::storage::keys::marked_prefixes(&config.prefix),
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
    let api = Api::open(store, registry, &config.prefix, config.bookmark_interval)
        .await?
        .with_storage_ranges(config.storage_ranges.clone());
    let audit = match &config.audit_log {
        Some(path) => Some(crate::http::audit::AuditLog::open(path).map_err(StartError::Audit)?),
        None => None,
    };
    let identity =
        crate::policy::identity::Identity::load(api.store.clone(), &config.prefix, &config.login)
            .await?;
    let state = Arc::new(AppState {
        inflight: crate::http::limits::Inflight::new(
            config.limits.max_requests_inflight,
            config.limits.max_mutating_requests_inflight,
            config.limits.max_image_transfers,
        ),
        staging: crate::http::image_data::StagingRoom::new(config.image_staging_max_bytes),
        watches: crate::http::limits::Watches::default(),
        identity_limit: crate::http::keystone::SourceLimit::new(config.identity_rate)
            .with_proxies(config.identity_proxies.clone()),
        api,
        config,
        audit,
        identity,
        metrics,
    });
    // S3 keys made before their index record named their Project's uid, bound once if they
    // can be (see `bind_unbound`).
    let (store, prefix) = (state.api.store.clone(), state.config.prefix.clone());
    tokio::spawn(async move {
        match crate::admission::credentials::bind_unbound(&store, &prefix).await {
            Ok(done) => {
                for who in &done.bound {
                    tracing::info!(credential = %who, "S3 credential bound to its Project's uid");
                }
                for (who, why) in &done.left {
                    tracing::warn!(credential = %who, why, "S3 credential left unbound: refused");
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot bind old S3 credentials to their Projects")
            }
        }
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
    let limits = state.config.limits.clone();
    let app = router(state);
    let connections = Arc::new(tokio::sync::Semaphore::new(limits.max_connections.max(1)));
    let task = tokio::spawn(async move {
        loop {
            // Past the limit, connections wait in the kernel's backlog, not in this process.
            let Ok(place) = Arc::clone(&connections).acquire_owned().await else {
                return;
            };
            let (sock, peer) = match listener.accept().await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = sock.set_nodelay(true);
            tokio::spawn(serve_connection(
                sock,
                peer,
                app.clone(),
                tls.clone(),
                limits.clone(),
                place,
            ));
        }
    });
    Ok(Server { local_addr, task })
}

/// The streams one HTTP/2 connection may carry at once: twice the watches one identity may
/// hold (at least 400).
fn h2_streams(limits: &crate::http::limits::Limits) -> u32 {
    let watches = limits.max_watches_per_node.max(limits.max_watches_per_user);
    u32::try_from(watches.saturating_mul(2).max(400)).unwrap_or(u32::MAX)
}

/// Serves one connection until it ends, its client has been idle or slow for too long, or its
/// TLS handshake takes too long; `_place` is its place among the open connections.
async fn serve_connection(
    sock: tokio::net::TcpStream,
    peer: SocketAddr,
    app: Router,
    tls: Option<tokio_rustls::TlsAcceptor>,
    limits: crate::http::limits::Limits,
    _place: tokio::sync::OwnedSemaphorePermit,
) {
    use crate::http::limits::{Activity, Cutoff, Holding, Watched};
    let activity = Activity::new();
    let sock = Watched::new(sock, Arc::clone(&activity));
    let requests = Arc::clone(&activity);
    let cutoff = Cutoff::default();
    let cut = cutoff.clone();
    let service =
        hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
            req.extensions_mut().insert(peer);
            req.extensions_mut().insert(cut.clone());
            let app = app.clone();
            // In flight (the connection is not idle) until the response's body is done.
            let busy = requests.begin();
            async move {
                use tower::ServiceExt;
                let response = app.oneshot(req.map(Body::new)).await;
                response.map(|r| r.map(|b| Body::new(Holding::new(b, busy))))
            }
        });
    let mut builder =
        hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
    // Over HTTP/2 every request and watch of an agent shares one connection: room for all
    // the watches one identity may hold and as many requests again besides, so a node's
    // status writes and Lease renewals never wait behind its watches (hyper's default is
    // 200 streams a connection).
    builder.http2().max_concurrent_streams(h2_streams(&limits));
    let watchdog = |headers_count: bool| {
        let activity = Arc::clone(&activity);
        let (header_read, idle) = (limits.header_read_timeout, limits.idle_timeout);
        async move {
            let tick = (header_read.min(idle) / 4)
                .clamp(Duration::from_millis(50), Duration::from_secs(1));
            loop {
                tokio::time::sleep(tick).await;
                if let Some(why) =
                    activity.expired(std::time::Instant::now(), header_read, idle, headers_count)
                {
                    return why;
                }
            }
        }
    };
    let result = match tls {
        Some(acceptor) => {
            let stream =
                match tokio::time::timeout(limits.tls_handshake_timeout, acceptor.accept(sock))
                    .await
                {
                    Ok(Ok(stream)) => stream,
                    Ok(Err(e)) => {
                        tracing::debug!(error = %e, %peer, "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(%peer, "TLS handshake timed out");
                        return;
                    }
                };
            // Over HTTP/2, bytes without a request are pings and settings.
            let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2".as_slice());
            let conn = builder.serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            tokio::select! {
                r = conn => r,
                why = watchdog(!h2) => {
                    tracing::debug!(?why, %peer, "closing the connection");
                    return;
                }
                () = cutoff.cut_off() => {
                    tracing::debug!(%peer, "closing the connection: its transfer stalled");
                    return;
                }
            }
        }
        None => {
            let conn = builder.serve_connection(hyper_util::rt::TokioIo::new(sock), service);
            tokio::select! {
                r = conn => r,
                why = watchdog(true) => {
                    tracing::debug!(?why, %peer, "closing the connection");
                    return;
                }
                () = cutoff.cut_off() => {
                    tracing::debug!(%peer, "closing the connection: its transfer stalled");
                    return;
                }
            }
        }
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "connection ended with an error");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whatever the handler answers (an object, a Status, a streamed list), the answer says
    /// nosniff.
    #[tokio::test]
    async fn every_answer_says_nosniff() {
        use tower::ServiceExt;
        let app =
            hardened(Router::new().fallback(|| async { ApiError::unauthorized().into_response() }));
        let r = app
            .oneshot(
                axum::http::Request::get("/api/v1/namespaces")
                    .body(Body::empty())
                    .expect("request"),
            )
            .await
            .expect("answer");
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(
            r.headers()
                .get("x-content-type-options")
                .and_then(|v| v.to_str().ok()),
            Some("nosniff")
        );
    }

    /// A write that failed on the server's side carries no Retry-After (client-go would send
    /// it again); a read, and a write refused before it was served (429), keep theirs.
    #[test]
    fn a_failed_write_does_not_invite_a_retry() {
        let retry = |writing: bool, e: ApiError| {
            outcome_unknown(writing, e.into_response())
                .headers()
                .contains_key(axum::http::header::RETRY_AFTER)
        };
        assert!(!retry(true, ApiError::timeout("deadline")));
        assert!(!retry(true, ApiError::unavailable("etcd")));
        assert!(retry(false, ApiError::timeout("deadline")));
        assert!(retry(false, ApiError::unavailable("etcd")));
        assert!(retry(true, ApiError::too_many_requests("busy", 1)));
    }
}
