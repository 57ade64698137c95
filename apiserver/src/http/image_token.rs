//! The image tokens: a short-lived, read-only token of an Image's project that the API server
//! makes for itself to read the Image's `source.swift` object from the object store
//! (`images/NAME/data`), and what such a token allows at the identity endpoints.
//!
//! # Guarantees
//! - A token holds for [`TTL`] seconds and is scoped to the Image's project, by the Project's
//!   uid; at the identity endpoints it validates only while the Image (same uid) and its
//!   Project (same uid, enabled) exist and it is not revoked (`DELETE
//!   /identity/v3/auth/tokens`), and then with the `reader` role alone, which the object
//!   store's `keystoneauth` maps to reading (`project_reader_roles`): it can neither write nor
//!   reach another project's account, and it is no credential for the API.
//! - The token never leaves the API server: it is sent to the object store in a header only,
//!   never answered, logged or written.

use serde_json::Value;
use stratus_api_types::identity::Role;

use crate::base::error::{ApiError, ApiResult};
use crate::base::meta;
use crate::http::server::AppState;
use crate::policy::identity::{Claims, Scope, Verified};
use crate::policy::roles::Grant;
use crate::storage::keys;
use crate::storage::store::{Read, Stored};

const GROUP: &str = "image.stratus.dev";
/// How long a token holds, in seconds: long enough for one read of an image within the size
/// limit, short enough that a leaked one is soon worthless.
pub const TTL: i64 = 600;
/// The user name of an image token: `system:image:<project>:<image>` (no User can be named
/// so, so the token never authenticates an API request).
const USER_PREFIX: &str = "system:image:";

/// A `reader` token of the Image's project (Image `ns/name`, stored as `image`) holding `ttl`
/// seconds, and the project's account under the object store at `base`.
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
) -> ApiResult<(String, String)> {
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
    let (token, _) = state
        .identity
        .signer
        .issue_scoped(&user, &verified, ttl, Some(scope));
    Ok((token, account))
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
    reader_token(state, ns, name, &value, base, TTL).await
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
