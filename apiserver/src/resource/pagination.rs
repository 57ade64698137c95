//! Continue tokens of paginated lists: made by one list, accepted only by the same list.
//!
//! The token is kube-apiserver's shape (base64 of JSON `{v, rv, start}`, `start` relative to
//! the list's key prefix) with one more field, `list`: a digest of the list's key prefix
//! (resource type and namespace) and its selectors. A token therefore continues only the list
//! that made it, from a key inside that list's range: it cannot move a list to another
//! namespace or type, nor to a key outside its prefix. It is not secret or signed: what it can
//! reach is what the same list without a token would show. Its revision is checked by the read
//! itself (410 Gone when compacted).

use base64::Engine;

use crate::base::error::{ApiError, ApiResult};

/// The token format's version (kube-apiserver's `v`).
const VERSION: &str = "stratus.dev/v1";

/// One list a token may continue: its key prefix and its selectors as the client wrote them.
#[derive(Debug, Clone)]
pub struct ListScope {
    prefix: String,
    digest: String,
}

impl ListScope {
    /// The list of keys under `prefix` with these `labelSelector` and `fieldSelector` texts.
    pub fn new(prefix: &str, labels: Option<&str>, fields: Option<&str>) -> Self {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        for part in [Some(prefix), labels, fields] {
            // Length-prefixed, so no two different triples hash the same input.
            let part = part.unwrap_or("");
            ctx.update(&(part.len() as u64).to_be_bytes());
            ctx.update(part.as_bytes());
        }
        let digest =
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&ctx.finish().as_ref()[..16]);
        Self {
            prefix: prefix.to_string(),
            digest,
        }
    }
}

/// Where a continued list resumes.
#[derive(Debug, PartialEq, Eq)]
pub struct Continue {
    /// The first key (absolute) the next page may hold; always under the list's prefix.
    pub start: String,
    /// The revision every page of the list is read at.
    pub rv: i64,
}

#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Token {
    v: String,
    rv: i64,
    start: String,
    list: String,
}

/// The token continuing `scope` at key `start` (absolute, under the scope's prefix) and
/// revision `rv`.
pub fn encode(scope: &ListScope, start: &str, rv: i64) -> String {
    let token = Token {
        v: VERSION.into(),
        rv,
        start: start
            .strip_prefix(scope.prefix.as_str())
            .unwrap_or(start)
            .to_string(),
        list: scope.digest.clone(),
    };
    // A struct of strings and an integer always serializes.
    let raw = serde_json::to_vec(&token).unwrap_or_default();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw)
}

/// Reads a token given to `scope`.
///
/// # Errors
/// 400 when the token is malformed, of another version, made by another list (another type,
/// namespace or selectors), or names no key or no revision.
pub fn decode(token: &str, scope: &ListScope) -> ApiResult<Continue> {
    let bad = |why: &str| {
        ApiError::bad_request(format!(
            "continue key is not valid: {why}; start a new list without the continue parameter"
        ))
    };
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token)
        .map_err(|_| bad("the token is malformed"))?;
    let t: Token = serde_json::from_slice(&raw).map_err(|_| bad("the token is malformed"))?;
    if t.v != VERSION {
        return Err(bad("the token is of another version"));
    }
    if t.list != scope.digest {
        return Err(bad(
            "the token is for another list (type, namespace or selectors)",
        ));
    }
    if t.rv <= 0 {
        return Err(bad("the token has no revision"));
    }
    if t.start.is_empty() || t.start.starts_with('/') {
        return Err(bad("the token has no key in this list"));
    }
    Ok(Continue {
        start: format!("{}{}", scope.prefix, t.start),
        rv: t.rv,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const SERVERS_DEMO: &str = "/stratus/compute.stratus.dev/servers/demo/";

    fn scope() -> ListScope {
        ListScope::new(SERVERS_DEMO, Some("tier=web"), None)
    }

    fn forged(v: serde_json::Value) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    }

    fn refused(token: &str, scope: &ListScope) -> String {
        let e = decode(token, scope).expect_err("refused");
        assert_eq!(e.code, 400, "{e:?}");
        e.message
    }

    #[test]
    fn a_token_continues_its_own_list() {
        let key = format!("{SERVERS_DEMO}b\0");
        let token = encode(&scope(), &key, 42);
        assert_eq!(
            decode(&token, &scope()).expect("decodes"),
            Continue { start: key, rv: 42 }
        );
    }

    #[test]
    fn the_key_is_stored_relative_to_the_prefix() {
        let token = encode(&scope(), &format!("{SERVERS_DEMO}b\0"), 42);
        let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(token)
            .expect("base64");
        let v: serde_json::Value = serde_json::from_slice(&raw).expect("json");
        assert_eq!(v["start"], "b\0");
        assert_eq!(v["rv"], 42);
    }

    #[test]
    fn a_token_of_another_namespace_is_refused() {
        let other = ListScope::new(
            "/stratus/compute.stratus.dev/servers/other/",
            Some("tier=web"),
            None,
        );
        let token = encode(&other, "/stratus/compute.stratus.dev/servers/other/a\0", 7);
        assert!(refused(&token, &scope()).contains("another list"));
    }

    #[test]
    fn a_token_of_another_type_or_scope_is_refused() {
        for prefix in [
            "/stratus/compute.stratus.dev/keypairs/demo/",
            "/stratus/compute.stratus.dev/servers/",
            "/stratus/identity.stratus.dev/users/",
        ] {
            let other = ListScope::new(prefix, Some("tier=web"), None);
            let token = encode(&other, &format!("{prefix}a\0"), 7);
            assert!(
                refused(&token, &scope()).contains("another list"),
                "{prefix}"
            );
        }
    }

    #[test]
    fn a_token_of_other_selectors_is_refused() {
        for other in [
            ListScope::new(SERVERS_DEMO, None, None),
            ListScope::new(SERVERS_DEMO, Some("tier=db"), None),
            ListScope::new(SERVERS_DEMO, Some("tier=web"), Some("metadata.name=a")),
            // The parts are delimited: moving text from one selector to another changes it.
            ListScope::new(SERVERS_DEMO, None, Some("tier=web")),
        ] {
            let token = encode(&other, &format!("{SERVERS_DEMO}a\0"), 7);
            assert!(refused(&token, &scope()).contains("another list"));
        }
    }

    #[test]
    fn a_forged_key_cannot_leave_the_prefix() {
        // An absolute key, as older tokens carried, or a key naming another namespace.
        let digest = scope().digest;
        for start in [
            "/stratus/compute.stratus.dev/servers/other/a",
            "/stratus/identity.stratus.dev/users/admin",
            "",
        ] {
            let token = forged(json!({"v": VERSION, "rv": 7, "start": start, "list": digest}));
            assert!(refused(&token, &scope()).contains("no key"), "{start:?}");
        }
        // A relative key always stays under the list's own prefix.
        let token = forged(json!({"v": VERSION, "rv": 7, "start": "../other/a", "list": digest}));
        let c = decode(&token, &scope()).expect("decodes");
        assert!(c.start.starts_with(SERVERS_DEMO));
    }

    #[test]
    fn malformed_tokens_are_400() {
        let digest = scope().digest;
        for token in [
            "!!!".to_string(),
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode("not json"),
            forged(json!({"start": "a", "rv": 7})),
            forged(json!({"v": VERSION, "rv": "7", "start": "a", "list": digest})),
            forged(json!({"v": VERSION, "rv": 7, "start": "a", "list": digest, "x": 1})),
        ] {
            assert!(refused(&token, &scope()).contains("malformed"), "{token}");
        }
        let token = forged(json!({"v": "meta.k8s.io/v1", "rv": 7, "start": "a", "list": digest}));
        assert!(refused(&token, &scope()).contains("version"));
        for rv in [0, -1] {
            let token = forged(json!({"v": VERSION, "rv": rv, "start": "a", "list": digest}));
            assert!(refused(&token, &scope()).contains("no revision"));
        }
    }
}
