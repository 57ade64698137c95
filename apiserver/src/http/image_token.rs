//! `POST images/NAME/token`: a short-lived, read-only token of an Image's project for the
//! component that fetches the Image's `source.swift` object from the object store (the image
//! controller, or a node's agent filling its image cache), in the way of Kubernetes'
//! TokenRequest.
//!
//! # Guarantees
//! - Only a system identity (the controllers) or a node a Server or Volume placed on which is
//!   made from the Image (its own placement, read when asked; a public Image the node may
//!   merely read does not count) gets one; no user, no service.
//! - The token holds for [`TTL`] seconds (or fewer, asked as TokenRequest's
//!   `spec.expirationSeconds`) and is scoped to the Image's project, by the
//!   Project's uid; at the identity endpoints it validates only while the Image (same uid)
//!   and its Project (same uid, enabled) exist and it is not revoked
//!   (`DELETE /identity/v3/auth/tokens`), and then with the `reader` role alone, which
//!   the object store's `keystoneauth` maps to reading (`project_reader_roles`): it can
//!   neither write nor reach another project's account, and it is no credential for the API.
//! - The token is in the response body only: never in a URL, a header or a log.

use axum::http::{Method, StatusCode};
use axum::response::Response;
use serde_json::Value;
use stratus_api_types::identity::Role;
use stratus_api_types::image::{ImageToken, ImageTokenStatus};

use crate::base::error::{ApiError, ApiResult};
use crate::base::meta;
use crate::http::server::AppState;
use crate::policy::authn::{Caller, Principal};
use crate::policy::identity::{Claims, Scope, Verified};
use crate::policy::roles::Grant;
use crate::storage::keys;
use crate::storage::store::{Read, Stored};

const GROUP: &str = "image.stratus.dev";
/// How long a token holds, in seconds: long enough for one download of an image within the
/// cache's size limit, short enough that a leaked one is soon worthless.
pub const TTL: i64 = 600;
/// The user name of an image token: `system:image:<project>:<image>` (no User can be named
/// so, so the token never authenticates an API request).
const USER_PREFIX: &str = "system:image:";

/// Answers `…/namespaces/NS/images/NAME/token`; `None` for any other path.
pub(crate) async fn call(
    state: &AppState,
    method: &Method,
    segs: &[&str],
    bytes: &[u8],
    caller: &Caller,
) -> Option<ApiResult<Response>> {
    let [
        "apis",
        GROUP,
        "v1",
        "namespaces",
        ns,
        "images",
        name,
        "token",
    ] = segs
    else {
        return None;
    };
    Some(issue(state, method, ns, name, bytes, caller).await)
}

async fn issue(
    state: &AppState,
    method: &Method,
    ns: &str,
    name: &str,
    bytes: &[u8],
    caller: &Caller,
) -> ApiResult<Response> {
    if *method != Method::POST {
        return Err(ApiError::method_not_allowed(format!(
            "{method} is not allowed on images/{name}/token: a token is made with POST"
        )));
    }
    let ttl = lifetime(bytes)?;
    if !meta::is_dns1123_label(ns) {
        return Err(ApiError::bad_request(format!(
            "invalid namespace \"{ns}\": must be a DNS-1123 label"
        )));
    }
    if !meta::is_dns1123_subdomain(name) {
        return Err(ApiError::bad_request(format!(
            "invalid name \"{name}\": must be a DNS-1123 subdomain"
        )));
    }
    let image = allowed(state, caller, ns, name).await?;
    if image.pointer("/spec/source/swift").is_none() {
        return Err(ApiError::bad_request(format!(
            "images \"{name}\" has no spec.source.swift: only an image kept in the object store is fetched with a token"
        )));
    }
    let Some(base) = &state.config.object_store_url else {
        return Err(ApiError::unavailable(
            "this cloud has no object store (the API server's object store URL is not set)",
        ));
    };
    let (token, claims, account_url) = reader_token(state, ns, name, &image, base, ttl).await?;
    tracing::info!(caller = %caller.user, namespace = ns, image = name, "issued an image token");
    let body = ImageToken {
        api_version: format!("{GROUP}/v1"),
        kind: "ImageToken".into(),
        status: ImageTokenStatus {
            token,
            expiration_timestamp: jiff::Timestamp::from_second(claims.exp)
                .map(|t| t.to_string())
                .unwrap_or_default(),
            account_url,
        },
    };
    let value = serde_json::to_value(&body)
        .map_err(|e| ApiError::internal(format!("encode the token: {e}")))?;
    Ok(crate::http::response::json_response(
        StatusCode::CREATED,
        &value,
        &[],
    ))
}

/// A `reader` token of the Image's project (Image `ns/name`, stored as `image`) holding `ttl`
/// seconds, its claims, and the project's account under the object store at `base`.
///
/// # Errors
/// 403 when `ns` is no enabled Project; 503 when etcd is unreachable.
async fn reader_token(
    state: &AppState,
    ns: &str,
    name: &str,
    image: &Value,
    base: &str,
    ttl: i64,
) -> ApiResult<(String, Claims, String)> {
    let api = &state.api;
    let image_uid = meta::meta_str(image, "uid").unwrap_or_default().to_string();
    let project = api
        .store
        .get(&keys::object(
            &api.prefix,
            "identity.stratus.dev",
            "projects",
            None,
            ns,
        ))
        .await
        .map_err(ApiError::from)?
        .map(|p| p.value)
        .filter(|p| p.pointer("/spec/enabled").and_then(Value::as_bool) != Some(false))
        .ok_or_else(|| {
            ApiError::forbidden(format!(
                "namespace \"{ns}\" is no enabled Project: only a project has an account in the object store"
            ))
        })?;
    let scope = Scope {
        name: ns.to_string(),
        uid: meta::meta_str(&project, "uid")
            .unwrap_or_default()
            .to_string(),
    };
    let verified = Verified {
        uid: image_uid,
        generation: 0,
    };
    let user = format!("{USER_PREFIX}{ns}:{name}");
    let account = format!("{}/v1/AUTH_{}", base.trim_end_matches('/'), scope.uid);
    let (token, claims) = state
        .identity
        .signer
        .issue_scoped(&user, &verified, ttl, Some(scope));
    Ok((token, claims, account))
}

/// A short-lived `reader` token of the project of Image `image` (in `ns`) and the project's
/// account, for the API server itself to read the Image's `source.swift` object with
/// (`images/NAME/data`); it never leaves the API server.
///
/// # Errors
/// As [`reader_token`]'s.
pub(crate) async fn project_reader(
    state: &AppState,
    ns: &str,
    image: &stratus_api_types::image::Image,
) -> ApiResult<(String, String)> {
    let base = state.config.object_store_url.as_deref().unwrap_or_default();
    let name = image.metadata.name.as_deref().unwrap_or_default();
    let value = serde_json::to_value(image)
        .map_err(|e| ApiError::internal(format!("encode an Image: {e}")))?;
    let (token, _, account) = reader_token(state, ns, name, &value, base, TTL).await?;
    Ok((token, account))
}

/// The seconds the token asked for holds: `spec.expirationSeconds` of the body, 1 to [`TTL`],
/// or [`TTL`] (an empty body, or one without it).
fn lifetime(bytes: &[u8]) -> ApiResult<i64> {
    const FIELD: &str = "spec.expirationSeconds";
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(TTL);
    }
    let body: Value = serde_json::from_slice(bytes)
        .map_err(|e| ApiError::bad_request(format!("the body is not JSON: {e}")))?;
    if !body.is_object() {
        return Err(ApiError::bad_request(
            "the body must be an object (an ImageToken request)",
        ));
    }
    match body.pointer("/spec/expirationSeconds") {
        None | Some(Value::Null) => Ok(TTL),
        Some(v) => match v.as_i64() {
            Some(n) if (1..=TTL).contains(&n) => Ok(n),
            _ => Err(ApiError::bad_request_fields(
                format!("{FIELD}: must be an integer from 1 to {TTL}"),
                vec![crate::base::error::Cause::invalid(
                    FIELD,
                    format!("must be an integer from 1 to {TTL}"),
                )],
            )),
        },
    }
}

/// The Image a caller may get a token for: the controllers every Image; a node only one a
/// Server or Volume placed on it is made from (its own placement, read now: that it may read
/// a public Image is not enough, for the token reads the project's whole account); nobody
/// else (refused before the Image is read, so its existence is not told).
///
/// # Errors
/// 403 for a caller that may not; 404 for no such Image; 503 when etcd is unreachable.
async fn allowed(state: &AppState, caller: &Caller, ns: &str, name: &str) -> ApiResult<Value> {
    let node = match caller.principal() {
        Principal::System(_) => None,
        Principal::Node(node) => Some(node),
        Principal::User(user) => {
            return Err(ApiError::forbidden(format!(
                "User \"{user}\" cannot get a token for images \"{name}\": image tokens are for the components that fetch images; a user logs in to the object store with their own"
            )));
        }
        Principal::Service(_) => return Err(crate::policy::credentials::service_refused(caller)),
    };
    let api = &state.api;
    let image = api
        .store
        .get(&keys::object(&api.prefix, GROUP, "images", Some(ns), name))
        .await
        .map_err(ApiError::from)?
        .ok_or_else(|| ApiError::not_found(GROUP, "images", name))?
        .value;
    match node {
        Some(node) if !crate::policy::node::image_placed(api, ns, name, &image, node).await? => {
            Err(ApiError::forbidden(format!(
                "node \"{node}\" cannot get a token for images \"{name}\" in project \"{ns}\": no server or volume placed on it is made from it"
            )))
        }
        _ => Ok(image),
    }
}

/// What an image token allows at the identity endpoints: `reader` in its project, while it is
/// not revoked (`DELETE /v3/auth/tokens`) and its Image (by uid) and Project (by uid,
/// enabled) exist, all read at one revision. `None` when `claims` are no image token's;
/// `Some(None)` for an image token that no longer holds.
///
/// # Errors
/// 503 when etcd is unreachable.
pub(crate) async fn grants(
    state: &AppState,
    claims: &Claims,
) -> ApiResult<Option<Option<Vec<Grant>>>> {
    let Some(rest) = claims.user.strip_prefix(USER_PREFIX) else {
        return Ok(None);
    };
    let Some(((ns, name), scope)) = rest.split_once(':').zip(claims.project.as_ref()) else {
        return Ok(Some(None));
    };
    if scope.name != ns {
        return Ok(Some(None));
    }
    let api = &state.api;
    let revoked = state.identity.revoked_key(&claims.jti);
    let image = keys::object(&api.prefix, GROUP, "images", Some(ns), name);
    let project = keys::object(&api.prefix, "identity.stratus.dev", "projects", None, ns);
    let (read, _) = api
        .store
        .read_many(&[
            Read::Presence(&revoked),
            Read::Key(&image),
            Read::Key(&project),
        ])
        .await
        .map_err(ApiError::from)?;
    let [revoked, image, project] = <[Vec<_>; 3]>::try_from(read)
        .map_err(|_| ApiError::internal("etcd answered a read of three with another count"))?;
    let uid_is = |found: &[(String, Stored)], uid: &str| {
        found
            .first()
            .is_some_and(|(_, o)| meta::meta_str(&o.value, "uid") == Some(uid))
    };
    let holds = revoked.is_empty()
        && uid_is(&image, &claims.uid)
        && uid_is(&project, &scope.uid)
        && project.first().is_some_and(|(_, p)| {
            p.value.pointer("/spec/enabled").and_then(Value::as_bool) != Some(false)
        });
    Ok(Some(holds.then(|| {
        vec![Grant {
            namespace: Some(ns.to_string()),
            role: Role::Reader,
        }]
    })))
}
