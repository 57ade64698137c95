//! The Keystone v3 subset Swift's standard middleware asks of an identity service, served at
//! `/identity`: version discovery, password logins scoped to a project (`POST
//! /identity/v3/auth/tokens`, so `swift --os-auth-url` works), token validation for
//! keystonemiddleware's `authtoken` (`GET /identity/v3/auth/tokens` with a service identity's
//! `X-Auth-Token` and the user's `X-Subject-Token`), revoking one's token, and `s3tokens`
//! (`POST /identity/v3/s3tokens`), the signature check Swift's `s3token` delegates.
//!
//! A project's Keystone id is its Project's uid (Swift's account `AUTH_<uid>`); Stratus roles
//! are Keystone's implied roles (`admin` ⊃ `member` ⊃ `reader`), so `keystoneauth`'s
//! `operator_roles = admin, member` makes admins and members operators of their project's
//! account. Tokens are Stratus tokens (a scoped one acts in its project only, on every API).
//!
//! # Guarantees
//! - Only a service identity (`system:service:NAME` in the token file) validates tokens; no
//!   user, node or administrator token does, and a service identity makes no other request.
//! - Tokens are read from headers only and never logged; bodies, tokens and every field are
//!   bounded before anything is decoded or looked up.
//! - Answers are Kubernetes `Status` objects that also carry Keystone's `error` member.
//! - The two endpoints that take no credential of their caller (password logins and
//!   `s3tokens`, which Swift's `s3token` calls with none) are rate limited per source address
//!   ([`SourceLimit`]): past the limit they answer 429 with `Retry-After`, before the body is
//!   read or anything is looked up.
//! - `s3tokens` costs the same and answers the same (401, one body) whether the access key
//!   exists or not: an unknown key's signature is checked against a secret derived as a real
//!   one is, after the same reads, so neither the answer nor its time tells which keys exist.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Instant;

use axum::body::Body;
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use ring::hmac;
use serde::Deserialize;
use serde_json::{Value, json};
use stratus_api_types::identity::Role;

use crate::admission::credentials;
use crate::base::error::{ApiError, ApiResult, Cause};
use crate::http::login::Attempt;
use crate::http::server::AppState;
use crate::policy::authn::SERVICE_PREFIX;
use crate::policy::identity::{Claims, Scope};
use crate::policy::roles::Grant;
use crate::storage::keys;
use crate::storage::store::Read;

/// Where the identity endpoints are mounted.
pub const ROOT: &str = "/identity";
/// The longest token read from a header.
pub const MAX_TOKEN: usize = 4096;
/// The largest request body read.
pub const MAX_BODY: usize = 64 * 1024;
/// How long a token issued here holds, in seconds.
const TTL: i64 = 3600;
/// The longest name, id or password field read from a login.
const MAX_FIELD: usize = 4096;
/// The largest S3 string to sign read (its base64 form is bounded by the body).
const MAX_SIGNATURE: usize = 256;
/// Keystone's one domain here.
const DOMAIN: &str = "default";
const DOMAIN_NAME: &str = "Default";

/// How many requests one source may make to the uncredentialed identity endpoints.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SourceRate {
    /// Requests a second one source bucket (an IPv4 address, an IPv6 /64) may make
    /// sustained; 0: no limit.
    pub per_second: f64,
    /// Requests it may make at once after a quiet time.
    pub burst: u32,
}

impl Default for SourceRate {
    /// 100 a second with bursts of 200: far above what one client logs in, and what a Swift
    /// proxy serving S3 at a few hundred requests a second asks, yet a bound on what one
    /// address makes the API server read from etcd.
    fn default() -> Self {
        Self {
            per_second: 100.0,
            burst: 200,
        }
    }
}

/// The most source buckets remembered; past it, full ones are forgotten first, then the
/// fullest.
const SOURCES: usize = 100_000;

/// A token bucket per source bucket, in this replica's memory (each replica bounds what it is
/// asked; the failed-login counts shared over replicas stay in [`crate::policy::logins`]).
#[derive(Debug)]
pub struct SourceLimit {
    rate: SourceRate,
    buckets: Mutex<HashMap<IpAddr, (f64, Instant)>>,
    /// The Swift proxies' addresses, whose `s3tokens` calls are not limited per source.
    proxies: Vec<IpAddr>,
}

impl SourceLimit {
    /// A limit of `rate` with every bucket full.
    pub fn new(rate: SourceRate) -> Self {
        Self {
            rate,
            buckets: Mutex::default(),
            proxies: Vec::new(),
        }
    }

    /// The same limit, but `s3tokens` calls from `proxies` are not limited per source: a
    /// Swift proxy makes one for every S3 request of every client, so one client over the
    /// limit would deny S3 to all (limit S3 clients at the proxy, e.g. its `ratelimit`).
    #[must_use]
    pub fn with_proxies(mut self, proxies: Vec<IpAddr>) -> Self {
        self.proxies = proxies;
        self
    }

    /// Takes one `s3tokens` call of `source` (none from a Swift proxy).
    fn take_s3(&self, source: Option<IpAddr>, now: Instant) -> Result<(), u32> {
        if source.is_some_and(|s| self.proxies.contains(&s)) {
            return Ok(());
        }
        self.take(source, now)
    }

    /// Takes one request of `source` at `now`.
    ///
    /// # Errors
    /// The seconds (at least 1) after which one more is allowed, when it is over the limit.
    pub fn take(&self, source: Option<IpAddr>, now: Instant) -> Result<(), u32> {
        let SourceRate { per_second, burst } = self.rate;
        let Some(ip) = source.map(crate::policy::logins::bucket) else {
            return Ok(());
        };
        if per_second <= 0.0 || !per_second.is_finite() {
            return Ok(());
        }
        let burst = f64::from(burst.max(1));
        let Ok(mut buckets) = self.buckets.lock() else {
            return Ok(());
        };
        let refill = |(tokens, at): (f64, Instant)| {
            (tokens + now.saturating_duration_since(at).as_secs_f64() * per_second).min(burst)
        };
        if !buckets.contains_key(&ip) {
            // Full buckets are worth nothing; past them, the fullest go first, so that a
            // flood from many sources never refills the one that is being limited.
            crate::policy::bounded::make_room(
                &mut buckets,
                SOURCES,
                |b| refill(*b) >= burst,
                |b| std::cmp::Reverse((refill(*b) * 1000.0) as u64),
            );
        }
        let b = buckets.entry(ip).or_insert((burst, now));
        let tokens = refill(*b);
        if tokens < 1.0 {
            *b = (tokens, now);
            let wait = ((1.0 - tokens) / per_second).ceil();
            return Err((wait as u32).max(1));
        }
        *b = (tokens - 1.0, now);
        Ok(())
    }

    /// 429 past the limit.
    fn admit(&self, source: Option<IpAddr>) -> ApiResult<()> {
        too_many(self.take(source, Instant::now()))
    }

    /// 429 past the limit, for an `s3tokens` call.
    fn admit_s3(&self, source: Option<IpAddr>) -> ApiResult<()> {
        too_many(self.take_s3(source, Instant::now()))
    }
}

fn too_many(taken: Result<(), u32>) -> ApiResult<()> {
    taken.map_err(|after| {
        ApiError::too_many_requests(
            "too many identity requests from this address; retry later",
            after,
        )
    })
}

/// Whether `path` is one of the identity endpoints.
pub fn is_identity(path: &str) -> bool {
    path == ROOT || path.starts_with("/identity/")
}

/// Answers a request under [`ROOT`], with how a login ended for the audit log (a login only).
pub(crate) async fn serve(
    state: &AppState,
    parts: &Parts,
    body: Body,
    source: Option<IpAddr>,
) -> (Response, Option<Attempt>) {
    let mut attempt = None;
    let path = parts.uri.path().trim_end_matches('/');
    let rest = path.strip_prefix(ROOT).unwrap_or_default();
    let answer = match (&parts.method, rest) {
        (&Method::GET, "") => Ok(versions(state)),
        (&Method::GET, "/v3") => Ok(json_ok(
            StatusCode::OK,
            &json!({ "version": version(state) }),
        )),
        (&Method::POST, "/v3/auth/tokens") => {
            let attempt = attempt.insert(Attempt {
                user: String::new(),
                result: "invalid",
            });
            if let Err(e) = state.identity_limit.admit(source) {
                attempt.result = "throttled";
                Err(e)
            } else {
                match read(body).await {
                    Ok(bytes) => login(state, &bytes, source, attempt).await,
                    Err(e) => Err(e),
                }
            }
        }
        (&Method::GET | &Method::HEAD, "/v3/auth/tokens") => validate(state, &parts.headers).await,
        (&Method::DELETE, "/v3/auth/tokens") => revoke(state, &parts.headers).await,
        (&Method::POST, "/v3/s3tokens") => match state.identity_limit.admit_s3(source) {
            Ok(()) => match read(body).await {
                Ok(bytes) => s3tokens(state, &bytes).await,
                Err(e) => Err(e),
            },
            Err(e) => Err(e),
        },
        _ => Err(ApiError::no_route(path)),
    };
    let response = answer.unwrap_or_else(|e| error(state, e));
    tracing::debug!(method = %parts.method, path, code = response.status().as_u16(), "identity request");
    (response, attempt)
}

async fn read(body: Body) -> ApiResult<bytes::Bytes> {
    use http_body_util::BodyExt;
    let limited = http_body_util::Limited::new(body, MAX_BODY);
    limited
        .collect()
        .await
        .map(http_body_util::Collected::to_bytes)
        .map_err(|_| ApiError::too_large(MAX_BODY))
}

fn json_ok(code: StatusCode, v: &Value) -> Response {
    crate::http::response::json_response(code, v, &[])
}

/// A `Status` carrying Keystone's `error` member too; a 401 says where to authenticate, a
/// 429 or 503 when to retry.
fn error(state: &AppState, e: ApiError) -> Response {
    let mut body = e.status();
    body["error"] = json!({"code": e.code, "title": e.reason, "message": e.message});
    let code = StatusCode::from_u16(e.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut r = json_ok(code, &body);
    if let Some(after) = e.details.retry_after {
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(after));
    }
    if code == StatusCode::UNAUTHORIZED
        && let Ok(v) = HeaderValue::from_str(&format!("Keystone uri=\"{}/v3\"", base_url(state)))
    {
        r.headers_mut().insert(header::WWW_AUTHENTICATE, v);
    }
    r
}

/// The identity endpoints' URL at the address the server listens on (never the client's Host
/// header, which a client could point anywhere).
fn base_url(state: &AppState) -> String {
    let scheme = if state.config.tls.is_some() {
        "https"
    } else {
        "http"
    };
    format!("{scheme}://{}{ROOT}", state.config.listen)
}

fn version(state: &AppState) -> Value {
    json!({
        "id": "v3.14",
        "status": "stable",
        "updated": "2020-04-07T00:00:00Z",
        "links": [{"rel": "self", "href": format!("{}/v3/", base_url(state))}],
        "media-types": [{"base": "application/json", "type": "application/vnd.openstack.identity-v3+json"}],
    })
}

fn versions(state: &AppState) -> Response {
    json_ok(
        StatusCode::OK,
        &json!({"versions": {"values": [version(state)]}}),
    )
}

/// A field the client got wrong: 400 naming it.
fn bad(field: &str, message: &str) -> ApiError {
    ApiError::bad_request_fields(
        format!("{field}: {message}"),
        vec![Cause::invalid(field, message)],
    )
}

fn bounded<'a>(field: &str, v: &'a str, max: usize) -> ApiResult<&'a str> {
    if v.is_empty() {
        return Err(bad(field, "Required value"));
    }
    if v.len() > max {
        return Err(bad(field, &format!("must be at most {max} bytes")));
    }
    Ok(v)
}

/// A domain named in a request: only Keystone's default one exists here.
#[derive(Debug, Default, Deserialize)]
struct Domain {
    id: Option<String>,
    name: Option<String>,
}

impl Domain {
    fn is_default(&self) -> bool {
        self.id.as_deref().is_none_or(|i| i == DOMAIN)
            && self
                .name
                .as_deref()
                .is_none_or(|n| n.eq_ignore_ascii_case(DOMAIN_NAME))
    }
}

#[derive(Debug, Deserialize)]
struct LoginRequest {
    auth: Auth,
}

#[derive(Debug, Deserialize)]
struct Auth {
    identity: Identity,
    scope: Option<ScopeRequest>,
}

#[derive(Debug, Deserialize)]
struct Identity {
    methods: Vec<String>,
    password: Option<PasswordMethod>,
}

#[derive(Debug, Deserialize)]
struct PasswordMethod {
    user: UserRequest,
}

#[derive(Debug, Deserialize)]
struct UserRequest {
    name: Option<String>,
    domain: Option<Domain>,
    password: String,
}

#[derive(Debug, Deserialize)]
struct ScopeRequest {
    project: Option<ProjectRequest>,
}

#[derive(Debug, Deserialize)]
struct ProjectRequest {
    name: Option<String>,
    id: Option<String>,
    domain: Option<Domain>,
}

/// `POST /identity/v3/auth/tokens` with the password method: a token (in `X-Subject-Token`)
/// scoped to the project asked for, throttled and locked out as every login is.
async fn login(
    state: &AppState,
    bytes: &[u8],
    source: Option<IpAddr>,
    attempt: &mut Attempt,
) -> ApiResult<Response> {
    let req: LoginRequest = serde_json::from_slice(bytes)
        .map_err(|e| bad("auth", &format!("not a password login: {e}")))?;
    let auth = req.auth;
    if auth.identity.methods.iter().any(|m| m != "password") || auth.identity.methods.is_empty() {
        return Err(bad(
            "auth.identity.methods",
            "Unsupported value: only [\"password\"] is supported",
        ));
    }
    let pw = auth
        .identity
        .password
        .ok_or_else(|| bad("auth.identity.password", "Required value"))?;
    let user = bounded(
        "auth.identity.password.user.name",
        pw.user.name.as_deref().unwrap_or_default(),
        253,
    )?;
    let password = bounded(
        "auth.identity.password.user.password",
        &pw.user.password,
        MAX_FIELD,
    )?;
    attempt.user = user.to_string();
    if !pw.user.domain.unwrap_or_default().is_default() {
        return Err(ApiError::unauthorized());
    }
    let asked = auth.scope.and_then(|s| s.project);
    let project = asked.as_ref().map(ProjectRef::of).transpose()?;
    // The project is looked up only once the password is right, so an unknown one costs what a
    // wrong password costs and is answered alike (no etcd read before the throttle).
    let scope = async || match &project {
        Some(p) => project_scope(state, p).await.map(Some),
        None => Ok(None),
    };
    let (token, claims) =
        crate::http::login::password_login(state, user, password, TTL, scope, source, attempt)
            .await?;
    let body = token_body(state, &claims, None).await?;
    let mut r = json_ok(StatusCode::CREATED, &body);
    if let Ok(v) = HeaderValue::from_str(&token) {
        r.headers_mut().insert("x-subject-token", v);
    }
    Ok(r)
}

/// The project a login asks for, checked for its form only.
enum ProjectRef<'a> {
    /// Not in the default domain: no project can match.
    Elsewhere,
    Name(&'a str),
    Id(&'a str),
}

impl<'a> ProjectRef<'a> {
    fn of(p: &'a ProjectRequest) -> ApiResult<Self> {
        if !p.domain.as_ref().is_none_or(Domain::is_default) {
            return Ok(Self::Elsewhere);
        }
        match (&p.name, &p.id) {
            (Some(name), _) => Ok(Self::Name(bounded("auth.scope.project.name", name, 63)?)),
            (None, Some(id)) => Ok(Self::Id(bounded("auth.scope.project.id", id, 64)?)),
            (None, None) => Err(bad("auth.scope.project", "Required value: name or id")),
        }
    }
}

/// The project a login asks for, by name or id (its uid); one that does not exist, or is in
/// another domain, is a 401 as a wrong password is.
async fn project_scope(state: &AppState, p: &ProjectRef<'_>) -> ApiResult<Scope> {
    let prefix = &state.api.prefix;
    let found = match *p {
        ProjectRef::Elsewhere => None,
        ProjectRef::Name(name) => {
            let key = keys::object(prefix, "identity.stratus.dev", "projects", None, name);
            state
                .api
                .store
                .get(&key)
                .await
                .map_err(ApiError::from)?
                .map(|s| s.value)
        }
        ProjectRef::Id(id) => {
            let all = keys::collection(prefix, "identity.stratus.dev", "projects", None);
            let (read, _) = state
                .api
                .store
                .read_many(&[Read::Prefix(&all)])
                .await
                .map_err(ApiError::from)?;
            read.into_iter()
                .flatten()
                .map(|(_, s)| s.value)
                .find(|v| crate::base::meta::meta_str(v, "uid") == Some(id))
        }
    };
    let project = found.ok_or_else(ApiError::unauthorized)?;
    let meta = |f| crate::base::meta::meta_str(&project, f).map(String::from);
    match (meta("name"), meta("uid")) {
        (Some(name), Some(uid)) => Ok(Scope { name, uid }),
        _ => Err(ApiError::unauthorized()),
    }
}

/// A header's value, bounded.
fn header_token<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|t| !t.is_empty() && t.len() <= MAX_TOKEN)
}

/// The caller of a validation must be a service identity.
fn service(state: &AppState, headers: &HeaderMap) -> ApiResult<()> {
    let token = header_token(headers, "x-auth-token").ok_or_else(ApiError::unauthorized)?;
    match state.config.tokens.get(token) {
        Some(user) if user.starts_with(SERVICE_PREFIX) => Ok(()),
        Some(_) => Err(ApiError::forbidden(
            "only a service identity (system:service:NAME) validates tokens",
        )),
        None if state.identity.signer.verify(token).is_some() => Err(ApiError::forbidden(
            "only a service identity (system:service:NAME) validates tokens",
        )),
        None => Err(ApiError::unauthorized()),
    }
}

fn token_not_found() -> ApiError {
    ApiError::not_found("identity.stratus.dev", "tokens", "").about(
        "identity.stratus.dev",
        "tokens",
        "subject",
    )
}

/// The subject token's claims and its grants now (in its project, for a scoped one); 404 for a
/// token that is forged, expired, revoked, of a changed or disabled user, or whose project
/// is gone or no longer grants its user a role.
async fn subject(state: &AppState, headers: &HeaderMap) -> ApiResult<(Claims, Vec<Grant>)> {
    let token = header_token(headers, "x-subject-token").ok_or_else(token_not_found)?;
    let id = &state.identity;
    let claims = id.signer.verify(token).ok_or_else(token_not_found)?;
    // An image fetcher's token: `reader` in its Image's project while the Image exists.
    // The API server's own token of the image store's account.
    if let Some(grants) = crate::http::image_data::grants(&claims) {
        return Ok((claims, grants));
    }
    if let Some(grants) = crate::http::image_token::grants(state, &claims).await? {
        return Ok((claims, grants.ok_or_else(token_not_found)?));
    }
    let grants = id
        .token_grants(&claims)
        .await?
        .ok_or_else(token_not_found)?;
    let grants = match &claims.project {
        Some(scope) => id
            .scoped(grants, scope)
            .await?
            .ok_or_else(token_not_found)?,
        None => grants,
    };
    Ok((claims, grants))
}

/// `GET /identity/v3/auth/tokens`: what `authtoken` asks about a user's token.
async fn validate(state: &AppState, headers: &HeaderMap) -> ApiResult<Response> {
    service(state, headers)?;
    let (claims, grants) = subject(state, headers).await?;
    let body = token_body(state, &claims, Some(&grants)).await?;
    let mut r = json_ok(StatusCode::OK, &body);
    if let Some(v) = headers.get("x-subject-token") {
        r.headers_mut().insert("x-subject-token", v.clone());
    }
    Ok(r)
}

/// `DELETE /identity/v3/auth/tokens`: a user revokes their own token (`X-Auth-Token` and
/// `X-Subject-Token` the same), or a service identity any.
async fn revoke(state: &AppState, headers: &HeaderMap) -> ApiResult<Response> {
    let own = header_token(headers, "x-auth-token").is_some()
        && header_token(headers, "x-auth-token") == header_token(headers, "x-subject-token");
    if !own {
        service(state, headers)?;
    }
    let (claims, _) = subject(state, headers).await?;
    state.identity.revoke(&claims).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Keystone's names of a Stratus role and the roles it implies.
fn role_names(role: Role) -> &'static [&'static str] {
    match role {
        Role::Admin => &["admin", "member", "reader"],
        Role::Member => &["member", "reader"],
        Role::Reader => &["reader"],
    }
}

fn roles_json(grants: &[Grant]) -> Value {
    let mut names: Vec<&str> = grants
        .iter()
        .flat_map(|g| role_names(g.role))
        .copied()
        .collect();
    names.sort_unstable();
    names.dedup();
    Value::Array(
        names
            .into_iter()
            .map(|n| json!({"id": n, "name": n}))
            .collect(),
    )
}

fn timestamp(unix: i64) -> String {
    jiff::Timestamp::from_second(unix)
        .map(|t| t.strftime("%Y-%m-%dT%H:%M:%S.000000Z").to_string())
        .unwrap_or_default()
}

/// The catalog: the object store's endpoints for the project, when the proxy's URL is known.
fn catalog(state: &AppState, project_uid: Option<&str>) -> Value {
    let (Some(url), Some(uid)) = (&state.config.object_store_url, project_uid) else {
        return json!([]);
    };
    let url = format!("{url}/v1/AUTH_{uid}");
    let endpoints: Vec<Value> = ["public", "internal", "admin"]
        .iter()
        .map(|i| {
            json!({"id": format!("object-store-{i}"), "interface": i, "url": url, "region": "RegionOne", "region_id": "RegionOne"})
        })
        .collect();
    json!([{"id": "object-store", "type": "object-store", "name": "swift", "endpoints": endpoints}])
}

/// A Keystone v3 token body for `claims`; `grants` its grants now (read afresh when None).
async fn token_body(
    state: &AppState,
    claims: &Claims,
    grants: Option<&[Grant]>,
) -> ApiResult<Value> {
    let read;
    let grants = match grants {
        Some(g) => g,
        None => {
            let g = state
                .identity
                .token_grants(claims)
                .await?
                .ok_or_else(ApiError::unauthorized)?;
            read = match &claims.project {
                Some(scope) => state
                    .identity
                    .scoped(g, scope)
                    .await?
                    .ok_or_else(ApiError::unauthorized)?,
                None => g,
            };
            &read
        }
    };
    let issued = claims.exp - TTL;
    let mut token = json!({
        "methods": ["password"],
        "audit_ids": [claims.jti],
        "expires_at": timestamp(claims.exp),
        "issued_at": timestamp(issued),
        "user": {
            "id": claims.uid, "name": claims.user,
            "domain": {"id": DOMAIN, "name": DOMAIN_NAME}, "password_expires_at": null,
        },
        "is_domain": false,
    });
    if let Some(scope) = &claims.project {
        token["project"] = json!({
            "id": scope.uid, "name": scope.name, "domain": {"id": DOMAIN, "name": DOMAIN_NAME},
        });
        token["roles"] = roles_json(grants);
        token["catalog"] = catalog(state, Some(&scope.uid));
    }
    Ok(json!({ "token": token }))
}

#[derive(Debug, Deserialize)]
struct S3Request {
    credentials: S3Credentials,
}

#[derive(Debug, Deserialize)]
struct S3Credentials {
    access: String,
    token: String,
    signature: String,
}

/// Whether `signature` is `secret`'s over `string_to_sign`: AWS signature version 4 when the
/// string says `AWS4-HMAC-SHA256` (the signing key derived from its credential scope line),
/// else version 2 (base64 HMAC-SHA1).
pub fn signature_matches(secret: &str, string_to_sign: &[u8], signature: &str) -> bool {
    if let Some(rest) = string_to_sign.strip_prefix(b"AWS4-HMAC-SHA256\n") {
        let mut lines = rest.split(|b| *b == b'\n');
        let (_, Some(scope)) = (lines.next(), lines.next()) else {
            return false;
        };
        let Ok(scope) = std::str::from_utf8(scope) else {
            return false;
        };
        let parts: Vec<&str> = scope.split('/').collect();
        let [date, region, service, "aws4_request"] = parts.as_slice() else {
            return false;
        };
        let mut key = format!("AWS4{secret}").into_bytes();
        for part in [*date, *region, *service, "aws4_request"] {
            key = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, &key), part.as_bytes())
                .as_ref()
                .to_vec();
        }
        let Some(want) = unhex(signature) else {
            return false;
        };
        hmac::verify(
            &hmac::Key::new(hmac::HMAC_SHA256, &key),
            string_to_sign,
            &want,
        )
        .is_ok()
    } else {
        let Ok(want) = base64::engine::general_purpose::STANDARD.decode(signature) else {
            return false;
        };
        hmac::verify(
            &hmac::Key::new(hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, secret.as_bytes()),
            string_to_sign,
            &want,
        )
        .is_ok()
    }
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

fn s3_refused() -> ApiError {
    ApiError::unauthorized()
}

/// `POST /identity/v3/s3tokens`: whether an S3 request was signed with the secret of the
/// access key it names; the key's user, project and roles when it was.
async fn s3tokens(state: &AppState, bytes: &[u8]) -> ApiResult<Response> {
    let req: S3Request = serde_json::from_slice(bytes)
        .map_err(|e| bad("credentials", &format!("not an S3 credential check: {e}")))?;
    let c = req.credentials;
    let access = bounded("credentials.access", &c.access, credentials::MAX_ACCESS_KEY)?;
    if !access.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return Err(s3_refused());
    }
    bounded("credentials.signature", &c.signature, MAX_SIGNATURE)?;
    bounded("credentials.token", &c.token, MAX_BODY)?;
    let string_to_sign = base64::engine::general_purpose::URL_SAFE
        .decode(c.token.trim())
        .or_else(|_| base64::engine::general_purpose::STANDARD.decode(c.token.trim()))
        .map_err(|_| {
            bad(
                "credentials.token",
                "must be the base64 of the string to sign",
            )
        })?;
    let api = &state.api;
    // Every key, known or not, costs the same three reads and one signature check: an unknown
    // key reads a credential that cannot exist and is checked against a secret derived for
    // no credential, so that neither the answer nor its time says which keys exist.
    let record = api
        .store
        .get(&credentials::index_key(&api.prefix, access))
        .await
        .map_err(ApiError::from)?
        .map(|r| r.value);
    let field = |k: &str| {
        record
            .as_ref()
            .and_then(|r| r.get(k))
            .and_then(Value::as_str)
            .unwrap_or_default()
    };
    let (namespace, name, uid) = (field("namespace"), field("name"), field("uid"));
    let key = keys::object(
        &api.prefix,
        "identity.stratus.dev",
        "s3credentials",
        Some(namespace),
        name,
    );
    let obj = api
        .store
        .get(&key)
        .await
        .map_err(ApiError::from)?
        .map(|o| o.value);
    let derive = credentials::derivation_key(&api.store, &api.prefix).await?;
    let obj = obj.filter(|o| {
        !uid.is_empty()
            && crate::base::meta::meta_str(o, "uid") == Some(uid)
            && credentials::access_key(o) == Some(access)
            && o.pointer("/metadata/deletionTimestamp").is_none()
    });
    let signed_by = obj.as_ref().map_or(credentials::NO_CREDENTIAL, |_| uid);
    let signed = signature_matches(
        &credentials::secret(&derive, access, signed_by),
        &string_to_sign,
        &c.signature,
    );
    let (Some(obj), true) = (obj, signed) else {
        return Err(s3_refused());
    };
    let user = obj
        .pointer("/spec/user")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let user_uid = obj
        .pointer("/metadata/ownerReferences")
        .and_then(Value::as_array)
        .and_then(|refs| {
            refs.iter()
                .find(|r| r.get("kind").and_then(Value::as_str) == Some("User"))
        })
        .and_then(|r| r.get("uid").and_then(Value::as_str))
        .unwrap_or_default();
    let grants = state
        .identity
        .user_grants(user, user_uid)
        .await?
        .ok_or_else(s3_refused)?;
    let project_key = keys::object(
        &api.prefix,
        "identity.stratus.dev",
        "projects",
        None,
        namespace,
    );
    // The project the credential was made in, and not one made since under its name: the
    // index names the project's uid; a project being deleted signs for nobody.
    let project_uid = api
        .store
        .get(&project_key)
        .await
        .map_err(ApiError::from)?
        .filter(|p| p.value.pointer("/metadata/deletionTimestamp").is_none())
        .and_then(|p| crate::base::meta::meta_str(&p.value, "uid").map(String::from))
        .filter(|p| !p.is_empty() && p == field(credentials::PROJECT_UID))
        .ok_or_else(s3_refused)?;
    let claims = Claims {
        user: user.to_string(),
        jti: uid.to_string(),
        exp: jiff::Timestamp::now().as_second() + TTL,
        uid: user_uid.to_string(),
        generation: 0,
        project: Some(Scope {
            name: namespace.to_string(),
            uid: project_uid,
        }),
    };
    let grants = state
        .identity
        .scoped(grants, claims.project.as_ref().ok_or_else(s3_refused)?)
        .await?
        .ok_or_else(s3_refused)?;
    let mut body = token_body(state, &claims, Some(&grants)).await?;
    body["token"]["methods"] = json!(["ec2credential"]);
    Ok(json_ok(StatusCode::OK, &body))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// AWS's published examples of both signature versions.
    #[test]
    fn aws_signatures_of_both_versions_verify() {
        let v2 = b"GET\n\n\nTue, 27 Mar 2007 19:36:42 +0000\n/johnsmith/photos/puppy.jpg";
        let secret = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY";
        assert!(signature_matches(
            secret,
            v2,
            "bWq2s1WEIj+Ydj0vQ697zp+IXMU="
        ));
        assert!(!signature_matches(
            secret,
            v2,
            "bWq2s1WEIj+Ydj0vQ697zp+IXMV="
        ));
        assert!(!signature_matches(
            "other",
            v2,
            "bWq2s1WEIj+Ydj0vQ697zp+IXMU="
        ));
        let v4 = b"AWS4-HMAC-SHA256\n20150830T123600Z\n20150830/us-east-1/iam/aws4_request\nf536975d06c0309214f805bb90ccff089219ecd68b2577efef23edd43b7e1a59";
        let secret = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY";
        let sig = "5d672d79c15b13162d9279b0855cfba6789a8edb4c82c400e06b5924a6f2b5d7";
        assert!(signature_matches(secret, v4, sig));
        assert!(!signature_matches(secret, v4, &sig.replace('5', "6")));
        assert!(!signature_matches("wrong", v4, sig));
        assert!(!signature_matches(secret, v4, "zz"), "not hexadecimal");
        assert!(!signature_matches(
            secret,
            b"AWS4-HMAC-SHA256\n20150830T123600Z\nnot-a-scope\nx",
            sig
        ));
    }

    #[test]
    fn each_source_has_its_burst_and_refills_at_its_rate() {
        use std::time::Duration;
        let limit = SourceLimit::new(SourceRate {
            per_second: 2.0,
            burst: 3,
        });
        let t0 = Instant::now();
        let a = Some(IpAddr::from([10, 0, 0, 1]));
        let b = Some(IpAddr::from([10, 0, 0, 2]));
        for _ in 0..3 {
            assert_eq!(limit.take(a, t0), Ok(()));
        }
        assert_eq!(limit.take(a, t0), Err(1), "over the burst");
        assert_eq!(limit.take(b, t0), Ok(()), "another address has its own");
        // Half a second gives one more request at two a second, and no second one.
        let later = t0 + Duration::from_millis(500);
        assert_eq!(limit.take(a, later), Ok(()));
        assert_eq!(limit.take(a, later), Err(1));
        // Addresses of one IPv6 /64 share one bucket.
        let v6 = |last: u16| Some(IpAddr::from([0x2001, 0xdb8, 0, 1, 0, 0, 0, last]));
        for i in 0..3 {
            assert_eq!(limit.take(v6(i), t0), Ok(()));
        }
        assert!(limit.take(v6(99), t0).is_err());
        // A slow rate says how long to wait; no rate, or no known source, is no limit.
        let slow = SourceLimit::new(SourceRate {
            per_second: 0.1,
            burst: 1,
        });
        assert_eq!(slow.take(a, t0), Ok(()));
        assert_eq!(slow.take(a, t0), Err(10));
        let off = SourceLimit::new(SourceRate {
            per_second: 0.0,
            burst: 1,
        });
        assert!((0..10).all(|_| off.take(a, t0).is_ok()));
        assert!((0..10).all(|_| slow.take(None, t0).is_ok()));
    }

    #[test]
    fn a_flood_from_many_sources_does_not_refill_a_limited_one() {
        let limit = SourceLimit::new(SourceRate {
            per_second: 0.001,
            burst: 3,
        });
        let t0 = Instant::now();
        let a = Some(IpAddr::from([10, 0, 0, 1]));
        assert!((0..3).all(|_| limit.take(a, t0).is_ok()));
        assert!(limit.take(a, t0).is_err());
        // As many other sources as the map holds, each taking one request (an attacker with
        // many addresses); the map is trimmed, not cleared.
        for i in 0..SOURCES as u32 {
            assert_eq!(
                limit.take(
                    Some(IpAddr::from(std::net::Ipv4Addr::from(0x0b00_0000 + i))),
                    t0
                ),
                Ok(())
            );
        }
        assert!(
            limit.take(a, t0).is_err(),
            "the limited source got a fresh bucket"
        );
        assert!(limit.buckets.lock().map(|b| b.len()).unwrap_or(0) <= SOURCES);
    }

    #[test]
    fn a_swift_proxys_s3tokens_calls_are_not_limited_but_its_logins_are() {
        let proxy = Some(IpAddr::from([10, 0, 0, 9]));
        let client = Some(IpAddr::from([10, 0, 0, 1]));
        let limit = SourceLimit::new(SourceRate {
            per_second: 1.0,
            burst: 2,
        })
        .with_proxies(vec![IpAddr::from([10, 0, 0, 9])]);
        let t0 = Instant::now();
        assert!(
            (0..50).all(|_| limit.take_s3(proxy, t0).is_ok()),
            "one S3 client's burst through the proxy would deny S3 to every client"
        );
        assert!((0..2).all(|_| limit.take_s3(client, t0).is_ok()));
        assert!(
            limit.take_s3(client, t0).is_err(),
            "a direct caller is limited"
        );
        assert!((0..2).all(|_| limit.take(proxy, t0).is_ok()));
        assert!(limit.take(proxy, t0).is_err(), "logins from it are limited");
    }

    #[test]
    fn roles_are_keystones_implied_roles() {
        let g = |role| Grant {
            namespace: Some("p".into()),
            role,
        };
        assert_eq!(
            roles_json(&[g(Role::Member), g(Role::Reader)]),
            json!([{"id": "member", "name": "member"}, {"id": "reader", "name": "reader"}])
        );
        assert_eq!(
            roles_json(&[g(Role::Admin)]).as_array().map(Vec::len),
            Some(3)
        );
        assert_eq!(roles_json(&[]), json!([]));
    }

    #[test]
    fn only_the_default_domain_exists() {
        assert!(Domain::default().is_default());
        let d = |id: Option<&str>, name: Option<&str>| Domain {
            id: id.map(String::from),
            name: name.map(String::from),
        };
        assert!(d(Some("default"), Some("Default")).is_default());
        assert!(!d(Some("other"), None).is_default());
        assert!(!d(None, Some("Other")).is_default());
    }
}
