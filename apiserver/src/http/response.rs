//! Verb outcomes and API errors as HTTP responses.

use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures::{StreamExt, stream};
use serde_json::Value;

use crate::base::error::ApiError;
use crate::base::meta;
use crate::resource::outcome::{Item, List, Outcome};

/// A JSON response with `Warning` headers.
pub fn json_response(code: StatusCode, v: &Value, warnings: &[String]) -> Response {
    let mut resp = (code, meta::to_json(v)).into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    for w in warnings {
        let text = format!("299 - {}", serde_json::Value::String(w.clone()));
        if let Ok(v) = HeaderValue::from_str(&text) {
            h.append(header::WARNING, v);
        }
    }
    resp
}

/// The `Accept` header, or `application/json`.
pub fn accept(headers: &HeaderMap) -> &str {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json")
}

impl IntoResponse for Outcome {
    fn into_response(self) -> Response {
        match self {
            Outcome::Json {
                code,
                body,
                warnings,
            } => json_response(
                StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                &body,
                &warnings,
            ),
            Outcome::List(list) => list_response(list),
            Outcome::Watch(events) => {
                let mut resp = Response::new(Body::from_stream(events));
                *resp.status_mut() = StatusCode::OK;
                resp.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                );
                resp
            }
        }
    }
}

/// A collection as JSON, written as its pages come: the head's members, `"items":[`, each
/// page's items, `]}`. An error after the first byte aborts the body (the client sees a
/// broken transfer, never a short list).
fn list_response(list: List) -> Response {
    let List { head, field, pages } = list;
    let mut open = meta::to_json(&Value::Object(head));
    open.pop(); // the closing brace
    if open.len() > 1 {
        open.push(b',');
    }
    open.extend(meta::to_json(&Value::String(field.to_string())));
    open.extend(b":[");
    let mut first = true;
    let items = pages.map(move |page| match page {
        Ok(items) => {
            let mut buf = Vec::with_capacity(items.len() * 512);
            for item in &items {
                if !first {
                    buf.push(b',');
                }
                first = false;
                match item {
                    // Encoding a `Value` cannot fail: its map keys are strings.
                    Item::Value(v) => {
                        let _ = serde_json::to_writer(&mut buf, v);
                    }
                    Item::Json(bytes) => buf.extend_from_slice(bytes),
                }
            }
            Ok(Bytes::from(buf))
        }
        Err(e) => {
            tracing::error!(code = e.code, reason = e.reason, message = %e.message, "list failed after its first page");
            Err(std::io::Error::other(e.message))
        }
    });
    let body = stream::once(async move { Ok::<_, std::io::Error>(Bytes::from(open)) })
        .chain(items)
        .chain(stream::once(async { Ok(Bytes::from_static(b"]}")) }));
    let mut resp = Response::new(Body::from_stream(body));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let code = StatusCode::from_u16(self.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        if code.is_server_error() {
            tracing::error!(code = self.code, reason = self.reason, message = %self.message, "request failed");
        }
        let body = self.status().to_string();
        let mut resp = (code, body).into_response();
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if let Some(r) = self.details.retry_after
            && let Ok(v) = HeaderValue::from_str(&r.to_string())
        {
            resp.headers_mut().insert(header::RETRY_AFTER, v);
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use serde_json::json;

    fn list(pages: Vec<Result<Vec<Item>, ApiError>>) -> List {
        let Value::Object(head) = json!({"kind": "FlavorList", "apiVersion": "compute.stratus.dev/v1", "metadata": {"resourceVersion": "7"}})
        else {
            unreachable!()
        };
        List {
            head,
            field: "items",
            pages: stream::iter(pages).boxed(),
        }
    }

    #[tokio::test]
    async fn a_streamed_list_is_one_json_document() {
        let pages = vec![
            Ok(vec![
                Item::Value(json!({"n": 1})),
                Item::Json(br#"{"n":2}"#.to_vec()),
            ]),
            Ok(vec![]),
            Ok(vec![Item::Value(json!({"n": 3}))]),
        ];
        let resp = Outcome::List(list(pages)).into_response();
        assert_eq!(resp.status(), StatusCode::OK);
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        let doc: Value = serde_json::from_slice(&body).expect("JSON");
        assert_eq!(doc["kind"], "FlavorList");
        assert_eq!(doc["metadata"]["resourceVersion"], "7");
        assert_eq!(doc["items"], json!([{"n": 1}, {"n": 2}, {"n": 3}]));
        let empty = Outcome::List(list(Vec::new())).into_response();
        let body = empty.into_body().collect().await.expect("body").to_bytes();
        let doc: Value = serde_json::from_slice(&body).expect("JSON");
        assert_eq!(doc["items"], json!([]));
    }

    #[tokio::test]
    async fn a_failure_after_the_first_page_breaks_the_body() {
        let pages = vec![
            Ok(vec![Item::Value(json!({"n": 1}))]),
            Err(ApiError::gone("compacted")),
            Ok(vec![Item::Value(json!({"n": 2}))]),
        ];
        let resp = Outcome::List(list(pages)).into_response();
        assert!(resp.into_body().collect().await.is_err());
    }
}
