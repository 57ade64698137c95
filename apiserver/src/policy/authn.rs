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

/// Who a caller is, for deciding what it may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Principal<'a> {
    /// A system identity from the token file (the administrator, the controllers): trusted
    /// with everything.
    System(&'a str),
    /// A node agent's identity from the token file (`system:node:NAME`): confined to what is
    /// related to what is placed on node NAME.
    Node(&'a str),
    /// A user with a token this cluster issued: what its role assignments allow.
    User(&'a str),
    /// A service's identity from the token file (`system:service:NAME`, an object store
    /// proxy): no API request is allowed; it may only validate users' tokens at the identity
    /// endpoints Swift's middleware calls (`/identity/v3`).
    Service(&'a str),
}

/// The token-file user name prefix of node identities.
pub const NODE_PREFIX: &str = "system:node:";

/// The token-file user name prefix of service identities.
pub const SERVICE_PREFIX: &str = "system:service:";

impl Caller {
    /// Who the caller is.
    pub fn principal(&self) -> Principal<'_> {
        match (self.system, self.user.strip_prefix(NODE_PREFIX)) {
            (true, Some(node)) => Principal::Node(node),
            (true, None) => match self.user.strip_prefix(SERVICE_PREFIX) {
                Some(service) => Principal::Service(service),
                None => Principal::System(&self.user),
            },
            (false, _) => Principal::User(&self.user),
        }
    }

    /// The node a node identity acts for.
    pub fn node(&self) -> Option<&str> {
        match self.principal() {
            Principal::Node(n) => Some(n),
            _ => None,
        }
    }

    /// Whether the caller may do anything anywhere: a system identity that is not a node's,
    /// or a user with a cluster-wide admin assignment. Never a node.
    pub fn cluster_admin(&self) -> bool {
        match self.principal() {
            Principal::System(_) => true,
            Principal::Node(_) | Principal::Service(_) => false,
            Principal::User(_) => self
                .grants
                .iter()
                .any(|g| g.namespace.is_none() && g.role == Role::Admin),
        }
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
    // A token scoped to a project (an identity login's) acts in that project only.
    let grants = match &claims.project {
        Some(scope) => id
            .scoped(grants, scope)
            .await?
            .ok_or_else(ApiError::unauthorized)?,
        None => grants,
    };
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

#[cfg(test)]
mod tests {
    use super::*;

    fn caller(user: &str, system: bool, grants: Vec<Grant>) -> Caller {
        Caller {
            user: user.into(),
            user_agent: "test".into(),
            system,
            grants,
            claims: None,
        }
    }

    #[test]
    fn nodes_are_never_cluster_admins() {
        let node = caller("system:node:a", true, Vec::new());
        assert_eq!(node.principal(), Principal::Node("a"));
        assert!(!node.cluster_admin());
        assert!(caller("system:admin", true, Vec::new()).cluster_admin());
        // A user cannot be named like a node to become one: only the token file makes nodes.
        let user = caller("system:node:a", false, Vec::new());
        assert_eq!(user.principal(), Principal::User("system:node:a"));
        assert!(!user.cluster_admin());
        let proxy = caller("system:service:object-proxy", true, Vec::new());
        assert_eq!(proxy.principal(), Principal::Service("object-proxy"));
        assert!(!proxy.cluster_admin(), "a service is no admin");
        let user = caller("system:service:x", false, Vec::new());
        assert_eq!(user.principal(), Principal::User("system:service:x"));
        let admin = caller(
            "root",
            false,
            vec![Grant {
                namespace: None,
                role: Role::Admin,
            }],
        );
        assert!(admin.cluster_admin());
    }
}
