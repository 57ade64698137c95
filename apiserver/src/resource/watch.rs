//! Watch streams: etcd watch events turned into Kubernetes watch events, with bookmarks and
//! `410 Gone` for compacted revisions.

use std::time::Duration;

use bytes::Bytes;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::base::error::{ApiError, ApiResult};
use crate::resource::outcome::Outcome;
use crate::resource::table::{self, Rendering};
use crate::resource::verbs::{Api, Params, Selectors, Target};
use crate::storage::hub::{Change, Item, Subscription};

/// How long a watch lasts when the client does not say (`timeoutSeconds`).
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1800);

struct Encoder {
    rendering: Rendering,
    include: String,
    target: Target,
}

impl Encoder {
    fn event(&self, type_: &str, obj: &Value) -> Bytes {
        let rendered;
        let object = match self.rendering {
            Rendering::Full => obj,
            Rendering::Metadata => {
                rendered = table::partial(obj);
                &rendered
            }
            Rendering::Table => {
                rendered = table::table(
                    &self.target.rt,
                    std::slice::from_ref(obj),
                    json!({}),
                    &self.include,
                    true,
                );
                &rendered
            }
        };
        line(type_, object)
    }

    /// An event from a shared change: the object's JSON is encoded once for every watcher.
    fn shared(&self, type_: &str, obj: &Value, json: Option<Bytes>) -> Bytes {
        match (self.rendering, json) {
            (Rendering::Full, Some(json)) => {
                let mut line = Vec::with_capacity(json.len() + 32);
                line.extend_from_slice(b"{\"type\":\"");
                line.extend_from_slice(type_.as_bytes());
                line.extend_from_slice(b"\",\"object\":");
                line.extend_from_slice(&json);
                line.extend_from_slice(b"}\n");
                Bytes::from(line)
            }
            _ => self.event(type_, obj),
        }
    }

    /// The ADDED event of an object of the initial state; a cached object is sent as stored
    /// (its `resourceVersion` spliced in) when the whole object is wanted. `None` for a cached
    /// value that does not decode.
    fn initial(&self, obj: Initial) -> Option<Bytes> {
        match obj {
            Initial::Object(obj) => Some(self.event("ADDED", &obj)),
            Initial::Stored(rev, stored) => {
                let spliced = (self.rendering == Rendering::Full)
                    .then(|| crate::base::encoded::with_rv(&stored, rev))
                    .flatten();
                match spliced {
                    Some(json) => Some(self.shared("ADDED", &Value::Null, Some(json.into()))),
                    None => {
                        let obj = serde_json::from_slice(&stored).ok()?;
                        Some(self.event("ADDED", &crate::base::meta::with_rv(obj, rev)))
                    }
                }
            }
        }
    }

    fn bookmark(&self, rev: i64, initial_end: bool) -> Bytes {
        let mut meta = json!({"resourceVersion": rev.to_string()});
        if initial_end {
            meta["annotations"] = json!({"k8s.io/initial-events-end": "true"});
        }
        let object = json!({"kind": self.target.rt.kind, "apiVersion": self.target.rt.api_version(), "metadata": meta});
        line("BOOKMARK", &object)
    }

    fn error(e: &ApiError) -> Bytes {
        line("ERROR", &e.status())
    }
}

/// An object of a watch's initial state.
enum Initial {
    /// Read from etcd.
    Object(Value),
    /// From the watch cache: its `resourceVersion` and its value as stored.
    Stored(i64, Bytes),
}

/// One watch event as a line of newline-delimited JSON.
fn line(type_: &str, object: &Value) -> Bytes {
    #[derive(serde::Serialize)]
    struct Event<'a> {
        #[serde(rename = "type")]
        type_: &'a str,
        object: &'a Value,
    }
    // Encoding borrowed values cannot fail: map keys are strings.
    let mut out = serde_json::to_vec(&Event { type_, object }).unwrap_or_default();
    out.push(b'\n');
    Bytes::from(out)
}

/// `GET ...?watch=true`: streams changes as newline-delimited JSON watch events.
pub async fn watch(
    api: &Api,
    t: &Target,
    rendering: Rendering,
    p: &Params,
    bookmark_every: Duration,
) -> ApiResult<Outcome> {
    let sel = Selectors::parse(&t.rt, p)?;
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
    // Changes since `rv` in a namespace whose Project was created after it would replay the
    // objects of an earlier Project of that name.
    if let Some(rv) = rv.filter(|_| !send_initial) {
        api.check_epoch(t, rv).await?;
    }
    let enc = Encoder {
        rendering,
        include: p.get("includeObject").unwrap_or("Metadata").to_string(),
        target: t.clone(),
    };

    // The initial state, when asked for or when no revision is given: from the watch cache
    // (at etcd's current revision or later, or any state for `resourceVersion=0`), else
    // from etcd.
    let mut initial = Vec::new();
    let start = match rv {
        Some(rv) if !send_initial => rv + 1,
        _ => {
            let lp = p.for_initial_state();
            match api.list_cached(t, &lp, &sel, 0, true).await? {
                Some((page, _)) => {
                    initial = page
                        .items
                        .into_iter()
                        .map(|(rev, stored)| Initial::Stored(rev, stored))
                        .collect();
                    page.revision + 1
                }
                None => {
                    let (items, rev, _) = api.list_items(t, &lp).await?;
                    initial = items.into_iter().map(Initial::Object).collect();
                    rev + 1
                }
            }
        }
    };
    let prefix = t.rt.key_prefix(&api.prefix, t.namespace.as_deref());
    let type_prefix = t.rt.key_prefix(&api.prefix, None);
    let sub = api
        .hub
        .subscribe(&type_prefix, start)
        .await
        .map_err(ApiError::from)?;
    let (tx, rx) = mpsc::channel::<Result<Bytes, std::convert::Infallible>>(256);
    let w = Watcher {
        prefix,
        start,
        sel,
        enc,
        tx,
        bookmarks,
        bookmark_every,
        timeout,
    };
    tokio::spawn(async move {
        for obj in initial {
            let Some(line) = w.enc.initial(obj) else {
                continue;
            };
            if !w.send(line).await {
                return;
            }
        }
        if send_initial && !w.send(w.enc.bookmark(start - 1, true)).await {
            return;
        }
        w.serve(sub).await;
    });
    Ok(Outcome::Watch(Box::pin(
        tokio_stream::wrappers::ReceiverStream::new(rx),
    )))
}

/// One client watch being served.
struct Watcher {
    /// Keys this watch covers (a namespace's, or the whole type's).
    prefix: String,
    start: i64,
    sel: Selectors,
    enc: Encoder,
    tx: mpsc::Sender<Result<Bytes, std::convert::Infallible>>,
    bookmarks: bool,
    bookmark_every: Duration,
    timeout: Duration,
}

impl Watcher {
    fn gone(&self, compacted: i64) -> ApiError {
        ApiError::gone(format!(
            "too old resource version: {} ({compacted})",
            self.start - 1
        ))
    }

    async fn send(&self, b: Bytes) -> bool {
        self.tx.send(Ok(b)).await.is_ok()
    }

    /// The watch event a change makes for this watcher, if any: selector transitions turn
    /// into ADDED / DELETED as Kubernetes reports them.
    fn change(&self, c: &Change) -> Option<Bytes> {
        if c.rev < self.start || !c.key.starts_with(&self.prefix) {
            return None;
        }
        let was = c.old.as_ref().is_some_and(|o| self.sel.matches(o));
        match &c.new {
            None => c
                .old
                .as_ref()
                .filter(|_| was)
                .map(|o| self.enc.shared("DELETED", o, c.json(false))),
            Some(new) => {
                let type_ = match (was, self.sel.matches(new)) {
                    (true, true) => "MODIFIED",
                    (false, true) => "ADDED",
                    (true, false) => "DELETED",
                    (false, false) => return None,
                };
                Some(self.enc.shared(type_, new, c.json(true)))
            }
        }
    }

    /// Serves the watch from a feed of the type (shared, or private to this watch).
    async fn serve(self, sub: Subscription) {
        let Subscription { past, gone, mut rx } = sub;
        if let Some(compacted) = gone {
            self.send(Encoder::error(&self.gone(compacted))).await;
            return;
        }
        for c in past {
            if let Some(line) = self.change(&c)
                && !self.send(line).await
            {
                return;
            }
        }
        let deadline = tokio::time::sleep(self.timeout);
        tokio::pin!(deadline);
        let mut last_bookmark = tokio::time::Instant::now();
        loop {
            tokio::select! {
                item = rx.recv() => match item {
                    Ok(Item::Change(c)) => {
                        if let Some(line) = self.change(&c)
                            && !self.send(line).await
                        {
                            return;
                        }
                    }
                    Ok(Item::Gone(compacted)) => {
                        self.send(Encoder::error(&self.gone(compacted))).await;
                        return;
                    }
                    Ok(Item::Progress(rev)) => {
                        if self.bookmarks
                            && rev >= self.start - 1
                            && last_bookmark.elapsed() >= self.bookmark_every / 2
                        {
                            last_bookmark = tokio::time::Instant::now();
                            if !self.send(self.enc.bookmark(rev, false)).await {
                                return;
                            }
                        }
                    }
                    // Fell too far behind, or the feed ended: end the stream; the client
                    // watches again from the last revision it saw.
                    Err(_) => return,
                },
                () = &mut deadline => return,
                () = self.tx.closed() => return,
            }
        }
    }
}
