//! Authentication: who sent a request, from its bearer token.

use std::collections::HashMap;

use stratus_api_types::identity::Role;

use crate::base::error::{ApiError, ApiResult};
use crate::policy::identity::{Claims, Identity};
use crate::policy::roles::Grant;

/// Who is asking, after authentication.
#[derive(Debug, Clone)]
pub struct Caller {
    /// The user name recorded in audit and managedFields.
    pub user: String,
    /// The default field manager (from the user agent), when the request names none.
    pub user_agent: String,
    /// A system identity from the API server's token file: allowed everything.
    pub system: bool,
    /// The caller's role assignments (users with issued tokens).
    pub grants: Vec<Grant>,
    /// The token's claims (users with issued tokens).
    pub claims: Option<Claims>,
}

impl Caller {
    /// Whether the caller may do anything anywhere.
    pub fn cluster_admin(&self) -> bool {
        self.system
            || self
                .grants
                .iter()
                .any(|g| g.namespace.is_none() && g.role == Role::Admin)
    }
}

/// Who sent the request: a system identity from the token file, or a user with a token this
/// cluster issued that is neither expired nor revoked, whose user exists and is enabled.
/// `authorization` and `user_agent` are the request's headers of those names.
///
/// # Errors
/// 401 without a valid token; what reading the token's user and grants fails with.
pub async fn authenticate(
    authn: &Authenticator<'_>,
    authorization: Option<&str>,
    user_agent: Option<&str>,
) -> ApiResult<Caller> {
    let user_agent = user_agent.unwrap_or("unknown").to_string();
    if authn.disabled {
        return Ok(Caller {
            user: "unauthenticated".into(),
            user_agent,
            system: true,
            grants: Vec::new(),
            claims: None,
        });
    }
    let token = authorization
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .ok_or_else(ApiError::unauthorized)?;
    if let Some(user) = authn.tokens.get(token) {
        return Ok(Caller {
            user: user.clone(),
            user_agent,
            system: true,
            grants: Vec::new(),
            claims: None,
        });
    }
    let id = authn.identity;
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

/// What authentication checks tokens against.
#[derive(Debug, Clone, Copy)]
pub struct Authenticator<'a> {
    /// System identities' bearer tokens and the user each one authenticates.
    pub tokens: &'a HashMap<String, String>,
    /// Issued tokens: signatures, revocations, users and grants.
    pub identity: &'a Identity,
    /// Every request is a system administrator's, without looking at credentials.
    pub disabled: bool,
}
