//! The web dashboard's assets at `/dashboard/`: served to anyone (they hold no data; the page
//! reads everything through the API with its user's token) under a strict
//! Content-Security-Policy.

use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::base::error::ApiError;

/// Where the dashboard is served.
pub const PATH: &str = "/dashboard/";

/// Whether `path` is the dashboard's.
pub fn is_dashboard(path: &str) -> bool {
    path == "/dashboard" || path.starts_with(PATH)
}

/// Answers a request for a dashboard path: an asset for GET and HEAD, a redirect from
/// `/dashboard` to `/dashboard/`, 404 for a name that is no asset, 405 for other methods.
/// Every answer carries the dashboard's security headers.
pub fn serve(method: &Method, path: &str) -> Response {
    let mut response = answer(method, path);
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(stratus_dashboard::CONTENT_SECURITY_POLICY),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(
        "cross-origin-opener-policy",
        HeaderValue::from_static("same-origin"),
    );
    // A new binary's assets are used at once: the browser checks before it reuses a copy.
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

fn answer(method: &Method, path: &str) -> Response {
    if method != Method::GET && method != Method::HEAD {
        let mut r = ApiError::method_not_allowed(format!(
            "{method} is not allowed on {path}: the dashboard's assets are read with GET"
        ))
        .into_response();
        r.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    let Some(name) = path.strip_prefix(PATH) else {
        return (
            StatusCode::PERMANENT_REDIRECT,
            [(header::LOCATION, HeaderValue::from_static(PATH))],
        )
            .into_response();
    };
    match stratus_dashboard::asset(name) {
        Some(asset) => {
            let body = if method == Method::HEAD {
                &[][..]
            } else {
                asset.body
            };
            let mut r = (StatusCode::OK, body).into_response();
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static(asset.content_type),
            );
            r.headers_mut()
                .insert(header::CONTENT_LENGTH, HeaderValue::from(asset.body.len()));
            r
        }
        None => ApiError::no_route(path).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    async fn body(r: Response) -> Vec<u8> {
        r.into_body()
            .collect()
            .await
            .expect("a body")
            .to_bytes()
            .to_vec()
    }

    fn header_of<'a>(r: &'a Response, name: &str) -> &'a str {
        r.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
    }

    #[tokio::test]
    async fn every_asset_is_served_with_its_type_and_the_strict_policy() {
        for asset in stratus_dashboard::ASSETS {
            let path = format!("{PATH}{}", asset.name);
            let r = serve(&Method::GET, &path);
            assert_eq!(r.status(), StatusCode::OK, "{path}");
            assert_eq!(header_of(&r, "content-type"), asset.content_type, "{path}");
            assert_eq!(
                header_of(&r, "content-security-policy"),
                stratus_dashboard::CONTENT_SECURITY_POLICY
            );
            assert_eq!(header_of(&r, "x-content-type-options"), "nosniff");
            assert_eq!(body(r).await, asset.body, "{path}");
        }
        let page = serve(&Method::GET, "/dashboard/index.html");
        assert_eq!(header_of(&page, "content-type"), "text/html; charset=utf-8");
        let head = serve(&Method::HEAD, "/dashboard/app.js");
        assert_eq!(head.status(), StatusCode::OK);
        assert!(body(head).await.is_empty());
    }

    #[tokio::test]
    async fn unknown_paths_are_404_and_writes_405_with_the_policy_too() {
        for path in [
            "/dashboard/nope.js",
            "/dashboard/../apis",
            "/dashboard/%2e%2e/apis",
            "/dashboard//app.js",
            "/dashboard/app.js/",
            "/dashboard/sub/app.js",
        ] {
            let r = serve(&Method::GET, path);
            assert_eq!(r.status(), StatusCode::NOT_FOUND, "{path}");
            assert_eq!(
                header_of(&r, "content-security-policy"),
                stratus_dashboard::CONTENT_SECURITY_POLICY,
                "{path}"
            );
            let status: serde_json::Value =
                serde_json::from_slice(&body(r).await).expect("a Status");
            assert_eq!(status["kind"], "Status");
            assert_eq!(status["code"], 404);
        }
        for method in [Method::POST, Method::PUT, Method::DELETE, Method::PATCH] {
            let r = serve(&method, "/dashboard/app.js");
            assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED, "{method}");
            assert_eq!(header_of(&r, "allow"), "GET, HEAD");
            assert_eq!(header_of(&r, "x-content-type-options"), "nosniff");
        }
        let r = serve(&Method::GET, "/dashboard");
        assert_eq!(r.status(), StatusCode::PERMANENT_REDIRECT);
        assert_eq!(header_of(&r, "location"), PATH);
        assert!(is_dashboard("/dashboard") && is_dashboard("/dashboard/x"));
        assert!(!is_dashboard("/dashboards") && !is_dashboard("/apis/dashboard/"));
    }
}
