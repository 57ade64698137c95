//! The typed request: what a request asks for, read once from its method, path and query.

/// What a request asks for, read from its method, path and query the way Kubernetes'
/// RequestInfo reads them.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RequestInfo {
    /// get, list, watch, create, update, patch, delete, deletecollection; for paths that name no
    /// resource, the lower-case HTTP method.
    pub verb: String,
    /// API group ("" for the core group); None for non-resource paths.
    pub group: Option<String>,
    /// API version.
    pub version: String,
    /// Resource (plural).
    pub resource: String,
    /// `status` and the like.
    pub subresource: String,
    /// Namespace (project).
    pub namespace: String,
    /// Object name.
    pub name: String,
}

impl RequestInfo {
    /// Reads a request.
    pub fn parse(method: &str, path: &str, watch: bool) -> Self {
        let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
        let (group, version, rest) = match segs.as_slice() {
            ["api", v, rest @ ..] if !rest.is_empty() => ("", *v, rest),
            ["apis", g, v, rest @ ..] if !rest.is_empty() => (*g, *v, rest),
            _ => {
                return Self {
                    verb: method.to_lowercase(),
                    ..Default::default()
                };
            }
        };
        let (namespace, rest): (&str, &[&str]) = match rest {
            ["namespaces", ns, tail @ ..] if !tail.is_empty() => (ns, tail),
            other => ("", other),
        };
        // (`/api/v1/namespaces/NAME` names the namespace itself: resource "namespaces".)
        let (resource, name, subresource) = match rest {
            [r] => (*r, "", ""),
            [r, n] => (*r, *n, ""),
            [r, n, s, ..] => (*r, *n, *s),
            [] => {
                return Self {
                    verb: method.to_lowercase(),
                    ..Default::default()
                };
            }
        };
        let verb = match (method, name.is_empty()) {
            ("GET", true) if watch => "watch",
            ("GET", true) => "list",
            ("GET", false) => "get",
            ("POST", _) => "create",
            ("PUT", _) => "update",
            ("PATCH", _) => "patch",
            ("DELETE", true) => "deletecollection",
            ("DELETE", false) => "delete",
            (m, _) => {
                return Self {
                    verb: m.to_lowercase(),
                    ..Default::default()
                };
            }
        };
        Self {
            verb: verb.into(),
            group: Some(group.into()),
            version: version.into(),
            resource: resource.into(),
            subresource: subresource.into(),
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_info_reads_verbs_and_objects() {
        let i = RequestInfo::parse(
            "GET",
            "/apis/compute.stratus.dev/v1/namespaces/demo/servers/web-1",
            false,
        );
        assert_eq!(
            (
                i.verb.as_str(),
                i.resource.as_str(),
                i.namespace.as_str(),
                i.name.as_str()
            ),
            ("get", "servers", "demo", "web-1")
        );
        let i = RequestInfo::parse(
            "GET",
            "/apis/compute.stratus.dev/v1/namespaces/demo/servers",
            true,
        );
        assert_eq!(i.verb, "watch");
        let i = RequestInfo::parse(
            "PATCH",
            "/apis/compute.stratus.dev/v1/namespaces/demo/servers/web-1/status",
            false,
        );
        assert_eq!(
            (i.verb.as_str(), i.subresource.as_str()),
            ("patch", "status")
        );
        let i = RequestInfo::parse("DELETE", "/apis/compute.stratus.dev/v1/flavors", false);
        assert_eq!(
            (i.verb.as_str(), i.namespace.as_str()),
            ("deletecollection", "")
        );
        let i = RequestInfo::parse("GET", "/api/v1/namespaces/demo", false);
        assert_eq!(
            (i.verb.as_str(), i.resource.as_str(), i.name.as_str()),
            ("get", "namespaces", "demo")
        );
        let i = RequestInfo::parse("GET", "/apis", false);
        assert_eq!((i.verb.as_str(), i.group.as_deref()), ("get", None));
    }
}
