//! Watch streams: etcd watch events turned into Kubernetes watch events, with bookmarks and
//! `410 Gone` for compacted revisions.

use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::Response;
use bytes::Bytes;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::api::{Api, Params, Selectors, Target, accept, with_rv};
use crate::error::{ApiError, ApiResult};
use crate::store::Store;
use crate::table::{self, Rendering};

/// How long a watch lasts when the client does not say (`timeoutSeconds`).
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1800);

struct Encoder {
    rendering: Rendering,
    include: String,
    target: Target,
}

impl Encoder {
    fn event(&self, type_: &str, obj: &Value) -> Bytes {
        let object = match self.rendering {
            Rendering::Full => obj.clone(),
            Rendering::Metadata => table::partial(obj),
            Rendering::Table => table::table(
                &self.target.rt,
                std::slice::from_ref(obj),
                json!({}),
                &self.include,
                true,
            ),
        };
        let mut line = json!({"type": type_, "object": object}).to_string();
        line.push('\n');
        Bytes::from(line)
    }

    fn bookmark(&self, rev: i64, initial_end: bool) -> Bytes {
        let mut meta = json!({"resourceVersion": rev.to_string()});
        if initial_end {
            meta["annotations"] = json!({"k8s.io/initial-events-end": "true"});
        }
        let object = json!({"kind": self.target.rt.kind, "apiVersion": self.target.rt.api_version(), "metadata": meta});
        let mut line = json!({"type": "BOOKMARK", "object": object}).to_string();
        line.push('\n');
        Bytes::from(line)
    }

    fn error(e: &ApiError) -> Bytes {
        let mut line = json!({"type": "ERROR", "object": e.status()}).to_string();
        line.push('\n');
        Bytes::from(line)
    }
}

/// `GET ...?watch=true`: streams changes as newline-delimited JSON watch events.
pub async fn watch(
    api: &Api,
    t: &Target,
    headers: &HeaderMap,
    p: &Params,
    bookmark_every: Duration,
) -> ApiResult<Response> {
    let sel = Selectors::parse(&t.rt, p)?;
    let rendering = Rendering::from_accept(accept(headers));
    let bookmarks = p.flag("allowWatchBookmarks");
    let send_initial = p.flag("sendInitialEvents");
    let timeout = p
        .get("timeoutSeconds")
        .map(|v| {
            v.parse::<u64>().map_err(|_| {
                ApiError::bad_request(format!("timeoutSeconds: invalid value \"{v}\""))
            })
        })
        .transpose()?
        .map(Duration::from_secs)
        .unwrap_or(DEFAULT_TIMEOUT);
    let rv = match p.get("resourceVersion") {
        None | Some("0") => None,
        Some(v) => Some(
            v.parse::<i64>()
                .map_err(|_| ApiError::bad_request(format!("invalid resourceVersion \"{v}\"")))?,
        ),
    };
    if send_initial && !bookmarks {
        return Err(ApiError::bad_request(
            "sendInitialEvents requires allowWatchBookmarks=true",
        ));
    }
    let enc = Encoder {
        rendering,
        include: p.get("includeObject").unwrap_or("Metadata").to_string(),
        target: t.clone(),
    };

    // The initial state, when asked for or when no revision is given.
    let mut initial = Vec::new();
    let start = match rv {
        Some(rv) if !send_initial => rv + 1,
        _ => {
            let mut lp = p.clone();
            lp.remove_paging();
            let (items, rev, _) = api.list_items(t, &lp).await?;
            initial = items;
            rev + 1
        }
    };
    let prefix = t.rt.key_prefix(&api.prefix, t.namespace.as_deref());
    let (tx, rx) = mpsc::channel::<Result<Bytes, std::convert::Infallible>>(256);
    let store = api.store.clone();
    tokio::spawn(async move {
        for obj in &initial {
            if tx.send(Ok(enc.event("ADDED", obj))).await.is_err() {
                return;
            }
        }
        if send_initial && tx.send(Ok(enc.bookmark(start - 1, true))).await.is_err() {
            return;
        }
        stream(
            store,
            prefix,
            start,
            sel,
            enc,
            tx,
            bookmarks.then_some(bookmark_every),
            timeout,
        )
        .await;
    });
    let body = Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx));
    let mut resp = Response::new(body);
    *resp.status_mut() = StatusCode::OK;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Ok(resp)
}

#[allow(clippy::too_many_arguments)]
async fn stream(
    store: Store,
    prefix: String,
    start: i64,
    sel: Selectors,
    enc: Encoder,
    tx: mpsc::Sender<Result<Bytes, std::convert::Infallible>>,
    bookmark_every: Option<Duration>,
    timeout: Duration,
) {
    let mut ws = match store.watch(&prefix, start).await {
        Ok(ws) => ws,
        Err(e) => {
            let _ = tx.send(Ok(Encoder::error(&crate::api::store_err(e)))).await;
            return;
        }
    };
    let deadline = tokio::time::sleep(timeout);
    tokio::pin!(deadline);
    let mut tick = tokio::time::interval(bookmark_every.unwrap_or(Duration::from_secs(3600)));
    tick.tick().await;
    loop {
        tokio::select! {
            msg = ws.message() => {
                let resp = match msg {
                    Ok(Some(r)) => r,
                    Ok(None) => return,
                    Err(e) => {
                        let _ = tx.send(Ok(Encoder::error(&crate::api::store_err(e.into())))).await;
                        return;
                    }
                };
                if resp.canceled() {
                    let err = if resp.compact_revision() > 0 {
                        ApiError::gone(format!("too old resource version: {} ({})", start - 1, resp.compact_revision()))
                    } else {
                        ApiError::unavailable(format!("watch canceled by the store: {}", resp.cancel_reason()))
                    };
                    let _ = tx.send(Ok(Encoder::error(&err))).await;
                    return;
                }
                if resp.events().is_empty() {
                    if !resp.created() && bookmark_every.is_some() {
                        let rev = resp.header().map(|h| h.revision()).unwrap_or(0);
                        if rev >= start - 1 && tx.send(Ok(enc.bookmark(rev, false))).await.is_err() {
                            return;
                        }
                    }
                    continue;
                }
                for ev in resp.events() {
                    if let Some(line) = translate(ev, &sel, &enc)
                        && tx.send(Ok(line)).await.is_err() {
                            return;
                        }
                }
            }
            _ = tick.tick(), if bookmark_every.is_some() => {
                if ws.request_progress().await.is_err() {
                    return;
                }
            }
            () = &mut deadline => return,
            () = tx.closed() => return,
        }
    }
}

fn translate(ev: &etcd_client::Event, sel: &Selectors, enc: &Encoder) -> Option<Bytes> {
    let decode = |kv: &etcd_client::KeyValue, rev: i64| {
        Store::decode(kv.key(), kv.value(), kv.mod_revision())
            .ok()
            .map(|s| with_rv(s.value, rev))
    };
    let kv = ev.kv()?;
    let rev = kv.mod_revision();
    let old = ev.prev_kv().and_then(|p| decode(p, rev));
    let was = old.as_ref().is_some_and(|o| sel.matches(o));
    match ev.event_type() {
        etcd_client::EventType::Delete => old.filter(|_| was).map(|o| enc.event("DELETED", &o)),
        etcd_client::EventType::Put => {
            let new = decode(kv, rev)?;
            let is = sel.matches(&new);
            match (was, is) {
                (true, true) => Some(enc.event("MODIFIED", &new)),
                (false, true) => Some(enc.event("ADDED", &new)),
                (true, false) => Some(enc.event("DELETED", &new)),
                (false, false) => None,
            }
        }
    }
}
