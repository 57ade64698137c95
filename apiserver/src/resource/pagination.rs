//! Which state of a collection a LIST shows ([`ReadAt`], from `resourceVersion` and
//! `resourceVersionMatch`), and continue tokens of paginated lists: made by one list,
//! accepted only by the same list.
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

/// Which state of the collection a LIST shows, from its `resourceVersion`,
/// `resourceVersionMatch`, `limit` and `continue`, as Kubernetes reads them (its API concepts
/// page, "Semantics for get and list"; a continued list reads at its token's revision).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadAt {
    /// No `resourceVersion` (or a continued list): the most recent state, etcd's current
    /// revision (or the token's).
    MostRecent,
    /// `resourceVersion=0`: any state, however old (the watch cache's).
    Any,
    /// A state at least as new as this revision: the watch cache's once it has reached it,
    /// else etcd's current one (504 when etcd has not reached it either).
    NotOlderThan(i64),
    /// Exactly this revision, read from etcd (410 once compacted).
    Exact(i64),
}

impl ReadAt {
    /// Reads the LIST parameters (`limit` as given, 0 when absent).
    ///
    /// # Errors
    /// 400 naming the parameter for a `resourceVersion` that is not a non-negative integer, a
    /// `resourceVersionMatch` other than `Exact` or `NotOlderThan`, one without a
    /// `resourceVersion` or with a continue token, `Exact` with `resourceVersion=0`, and a
    /// non-zero `resourceVersion` with a continue token.
    pub fn parse(
        resource_version: Option<&str>,
        matching: Option<&str>,
        continued: bool,
        limit: i64,
    ) -> ApiResult<Self> {
        let bad = |m: String| Err(ApiError::bad_request(m));
        let rv = match resource_version.filter(|v| !v.is_empty()) {
            None => None,
            Some(v) => match v.parse::<i64>() {
                Ok(n) if n >= 0 => Some(n),
                _ => {
                    return bad(format!(
                        "resourceVersion: Invalid value: \"{v}\": must be a non-negative integer (an etcd revision)"
                    ));
                }
            },
        };
        match matching.filter(|m| !m.is_empty()) {
            Some(m) if m != "Exact" && m != "NotOlderThan" => bad(format!(
                "resourceVersionMatch: Unsupported value: \"{m}\": supported values: \"Exact\", \"NotOlderThan\""
            )),
            Some(m) if rv.is_none() => bad(format!(
                "resourceVersionMatch: Forbidden: resourceVersionMatch \"{m}\" is forbidden unless resourceVersion is provided"
            )),
            Some(m) if continued => bad(format!(
                "resourceVersionMatch: Forbidden: resourceVersionMatch \"{m}\" is forbidden when continue is provided"
            )),
            Some("Exact") if rv == Some(0) => bad(
                "resourceVersionMatch: Forbidden: resourceVersionMatch \"Exact\" is forbidden for resourceVersion \"0\""
                    .into(),
            ),
            Some("Exact") => Ok(Self::Exact(rv.unwrap_or(0))),
            _ => match rv {
                None => Ok(Self::MostRecent),
                // A continued list reads at its token's revision, whatever else it asks.
                Some(0) if continued => Ok(Self::MostRecent),
                Some(0) => Ok(Self::Any),
                Some(n) if continued => bad(format!(
                    "resourceVersion: Forbidden: resourceVersion \"{n}\" is not allowed when using continue (the token holds the revision)"
                )),
                // Kubernetes' legacy rule: a first page of a given revision is that revision.
                Some(n) if limit > 0 && matching.is_none_or(str::is_empty) => Ok(Self::Exact(n)),
                Some(n) => Ok(Self::NotOlderThan(n)),
            },
        }
    }

    /// The revision etcd is to be read at (0: its current one).
    pub fn etcd_revision(self) -> i64 {
        match self {
            Self::Exact(n) => n,
            Self::MostRecent | Self::Any | Self::NotOlderThan(_) => 0,
        }
    }

    /// Checks that a list read at `revision` is as new as asked.
    ///
    /// # Errors
    /// 504 (Kubernetes' "Too large resource version") when `revision` is older than a
    /// `NotOlderThan` revision: etcd has not reached it.
    pub fn check(self, revision: i64) -> ApiResult<()> {
        match self {
            Self::NotOlderThan(n) if revision < n => Err(ApiError::timeout(format!(
                "Too large resource version: {n}, current: {revision}"
            ))),
            _ => Ok(()),
        }
    }
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

    fn read(rv: Option<&str>, m: Option<&str>, continued: bool, limit: i64) -> ApiResult<ReadAt> {
        ReadAt::parse(rv, m, continued, limit)
    }

    #[test]
    fn a_list_reads_at_the_revision_kubernetes_reads_it_at() {
        use ReadAt::*;
        let ok = |rv, m, continued, limit| read(rv, m, continued, limit).expect("valid");
        assert_eq!(ok(None, None, false, 0), MostRecent);
        assert_eq!(ok(None, None, true, 500), MostRecent);
        assert_eq!(ok(Some(""), None, false, 0), MostRecent);
        assert_eq!(ok(Some("0"), None, false, 0), Any);
        assert_eq!(ok(Some("0"), None, false, 500), Any);
        assert_eq!(ok(Some("0"), Some("NotOlderThan"), false, 0), Any);
        // rv=0 with a token: the token's revision.
        assert_eq!(ok(Some("0"), None, true, 500), MostRecent);
        assert_eq!(ok(Some("42"), None, false, 0), NotOlderThan(42));
        assert_eq!(ok(Some("42"), None, false, 500), Exact(42));
        assert_eq!(
            ok(Some("42"), Some("NotOlderThan"), false, 500),
            NotOlderThan(42)
        );
        assert_eq!(ok(Some("42"), Some("Exact"), false, 0), Exact(42));
        assert_eq!(ok(Some("42"), Some("Exact"), false, 500), Exact(42));
        assert_eq!(Exact(42).etcd_revision(), 42);
        assert_eq!(NotOlderThan(42).etcd_revision(), 0);
        assert!(NotOlderThan(42).check(42).is_ok());
        assert_eq!(NotOlderThan(42).check(41).expect_err("too new").code, 504);
        assert!(Exact(42).check(1).is_ok());
    }

    #[test]
    fn bad_combinations_are_400_naming_the_parameter() {
        for (rv, m, continued, says) in [
            (
                Some("abc"),
                None,
                false,
                "resourceVersion: Invalid value: \"abc\"",
            ),
            (Some("-3"), None, false, "resourceVersion: Invalid value"),
            (
                Some("1.5"),
                Some("Exact"),
                false,
                "resourceVersion: Invalid value",
            ),
            (
                None,
                Some("Exact"),
                false,
                "unless resourceVersion is provided",
            ),
            (
                None,
                Some("NotOlderThan"),
                false,
                "unless resourceVersion is provided",
            ),
            (
                Some("0"),
                Some("Exact"),
                false,
                "forbidden for resourceVersion \"0\"",
            ),
            (
                Some("7"),
                Some("Exact"),
                true,
                "forbidden when continue is provided",
            ),
            (
                Some("7"),
                Some("NotOlderThan"),
                true,
                "forbidden when continue is provided",
            ),
            (
                Some("7"),
                Some("exact"),
                false,
                "resourceVersionMatch: Unsupported value",
            ),
            (Some("7"), None, true, "resourceVersion: Forbidden"),
        ] {
            let e = read(rv, m, continued, 500).expect_err("refused");
            assert_eq!(e.code, 400, "{rv:?} {m:?}");
            assert!(e.message.contains(says), "{rv:?} {m:?}: {}", e.message);
        }
    }
}
