//! Who is asking and what they may do: authentication, roles, the node authorizer.

pub mod authn;
pub mod identity;
pub mod node;
pub mod request;
pub mod roles;

use crate::base::error::ApiResult;
use crate::resource::verbs::{Api, Params};
use crate::storage::store::Stored;
use authn::Caller;
use request::RequestInfo;

/// Refuses what the caller may not do, before anything is read or written: a node's identity
/// by the node authorizer, a user by its roles; other system identities may do anything. For
/// a node's read allowed by reading the object itself, that object and its key.
///
/// # Errors
/// 403 for a refused request; what reading the objects a decision needs fails with.
pub async fn authorize(
    api: &Api,
    info: &RequestInfo,
    params: &Params,
    bytes: &[u8],
    caller: &Caller,
) -> ApiResult<Option<(String, Stored)>> {
    if let Some(node) = caller
        .user
        .strip_prefix("system:node:")
        .filter(|_| caller.system)
    {
        return node::restrict(api, info, params, bytes, node).await;
    }
    if !caller.system {
        roles::authorize_request(&api.registry, info, bytes, caller)?;
    }
    Ok(None)
}
