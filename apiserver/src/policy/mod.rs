//! Who is asking and what they may do: authentication, roles, the node authorizer.
//!
//! Two steps: [`authorize`] on the typed request before anything is read or written (the cheap
//! verb- and resource-level checks, and a node's reads on its graph), then [`Decider`], the
//! [`Policy`] every write runs inside its verb on the final objects (old and new, after a patch
//! or apply is applied), whatever the request's content type. Nothing decides on body text.

pub mod authn;
pub mod bounded;
pub mod credentials;
pub mod identity;
pub mod logins;
pub mod node;
pub mod request;
pub mod roles;

use crate::base::error::ApiResult;
use crate::resource::review::{Policy, Review};
use crate::resource::verbs::{Api, Params};
use crate::storage::store::Stored;
use authn::{Caller, Principal};
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
    caller: &Caller,
) -> ApiResult<Option<(String, Stored)>> {
    match caller.principal() {
        Principal::System(_) => Ok(None),
        Principal::Node(node) => node::restrict(api, info, params, node).await,
        Principal::User(_) => {
            roles::authorize_request(&api.registry, info, caller)?;
            credentials::restrict_read(api, info, params, caller).await
        }
        Principal::Service(_) => Err(credentials::service_refused(caller)),
    }
}

/// The policy a caller's writes pass on their final objects: a node's by the node authorizer
/// ([`node::review`]), a user's by its roles ([`roles::review`]); a system identity's pass.
#[derive(Debug, Clone, Copy)]
pub struct Decider<'a> {
    caller: &'a Caller,
}

impl<'a> Decider<'a> {
    /// The policy of `caller`'s writes.
    pub fn new(caller: &'a Caller) -> Self {
        Self { caller }
    }
}

impl Policy for Decider<'_> {
    fn review(&self, r: &Review<'_>) -> ApiResult<()> {
        match self.caller.principal() {
            Principal::System(_) => Ok(()),
            Principal::Node(node) => node::review(node, r),
            Principal::User(_) => roles::review(self.caller, r),
            Principal::Service(_) => Err(credentials::service_refused(self.caller)),
        }
    }

    /// A node's updates leave managedFields to the server: what it sends is ignored.
    fn keeps_managed_fields(&self) -> bool {
        matches!(self.caller.principal(), Principal::Node(_))
    }
}
