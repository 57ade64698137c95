//! `images/NAME/data`: an Image's data through the API, as Glance serves it. `PUT` uploads an
//! Image with `spec.source.upload` (streamed, hashed, bounded, inspected, then kept in the
//! object store under the image store's own account); `GET` streams an uploaded Image's data,
//! or an Image's `source.swift` object, from the object store.
//!
//! # Guarantees
//! - Only the API server holds a token of the image store's account ([`STORE_USER`], scoped to
//!   [`store_scope`]): it is made per request, sent to the object store in a header, never
//!   answered, logged or written; no tenant's token reaches that account, and no Project can
//!   have its id.
//! - An upload is for a caller who may update the Image (roles; no node, no service), of an
//!   Image with `spec.source.upload` that is not Active (or, from a system identity, the image
//!   controller, of one with `spec.source.url`: the data it downloaded and verified, kept
//!   alike so that nodes read it here rather than from the URL); one upload of an Image at a time
//!   (a claim in etcd that expires with its lease, so a crashed server's upload frees it):
//!   the second is 409. The body is `application/octet-stream`, at most the image size limit,
//!   read with a bound on each silence and on the whole; its SHA-256 must match `spec.sha256`
//!   when given; it is inspected as URL sources are (no backing file, data file or `json:`).
//!   Only then is it written to the object store and the status set, in one write, to Active
//!   with where it is, its checksum, size and format. A refused upload sets `Ready=False` and
//!   `Verified=False` with the reason, and nothing else.
//! - A download is for a caller who may read the Image (roles), a node a Server or Volume
//!   placed on which is made from it, or a system identity. It is read from the object store
//!   a chunk at a time on a blocking thread and handed on without one: a client that stops
//!   reading holds no thread, and is cut off (its connection closed) once a window of the
//!   transfer's minimum rate passes with too little read, or once its deadline passes
//!   (twice what its size takes at the minimum rate, at most 3 h).
//! - Uploads and downloads count against their own limit, not the in-flight ones, shared out
//!   by identity with places kept for nodes and system identities
//!   ([`crate::http::limits::Transfers`]); each must keep the minimum rate (an upload is
//!   answered 408 otherwise). What uploads stage on disk is bounded in all ([`StagingRoom`]),
//!   each holding room for the bytes it sent, not those it announced: past it, 429 while
//!   others hold the room, 507 for an upload that could never fit.
//! - The object of an upload is written only once the Image carries [`DATA_FINALIZER`]; the
//!   finalizer is removed (`DELETE images/NAME/data`, a system identity's, asked by the image
//!   controller) only once its deleted Image's object is gone from the object store, and
//!   never while an upload of the Image is under way. A deleted Image takes no upload.

use std::io::Read as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use stratus_api_types::common::{ConditionType, Reason};
use stratus_api_types::image::{
    DATA_FINALIZER, DiskFormat, Image, ImagePhase, ImageStatus, StoredObject, UPLOAD_CONTAINER,
};
use stratus_image_cache::store;
use stratus_image_cache::{Format, ImageError, ObjectSource, Unsafe};

use crate::base::error::{ApiError, ApiResult, Cause};
use crate::base::meta;
use crate::http::limits::{Cutoff, Pace};
use crate::http::server::AppState;
use crate::policy::authn::{Caller, Principal};
use crate::policy::identity::{Claims, Scope, Verified};
use crate::policy::request::RequestInfo;
use crate::policy::roles::Grant;
use crate::resource::outcome::Outcome;
use crate::resource::review::AllowAll;
use crate::resource::verbs::{Params, Target};
use crate::storage::keys;
use crate::storage::store::Guard;

const GROUP: &str = "image.stratus.dev";
/// The user of the image store's tokens (no User can be named so).
pub const STORE_USER: &str = "system:image-store";
/// The image store's project id, and so its account `AUTH_stratus-image-store`: no Project
/// has it (their uids are UUIDs the API server gives).
const STORE_PROJECT: &str = "stratus-image-store";
/// How long one of the image store's tokens holds, in seconds.
const STORE_TTL: i64 = 900;
/// The longest silence of an upload's client.
const STALL: Duration = Duration::from_secs(60);
/// The longest an upload may take, its client's sending and the object store's writing.
pub const UPLOAD_DEADLINE: Duration = Duration::from_secs(3 * 3600);
/// The field manager of the status an upload writes.
const MANAGER: &str = "stratus-image-upload";

/// The scope of the image store's tokens.
fn store_scope() -> Scope {
    Scope {
        name: STORE_USER.into(),
        uid: STORE_PROJECT.into(),
    }
}

/// What a token of the image store allows at the identity endpoints: `admin` of its account;
/// `None` for any other token.
pub(crate) fn grants(claims: &Claims) -> Option<Vec<Grant>> {
    (claims.user == STORE_USER && claims.project.as_ref() == Some(&store_scope())).then(|| {
        vec![Grant {
            namespace: Some(STORE_USER.into()),
            role: stratus_api_types::identity::Role::Admin,
        }]
    })
}

/// `(namespace, name)` of a `…/namespaces/NS/images/NAME/data` path.
pub(crate) fn target(path: &str) -> Option<(String, String)> {
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    match segs.as_slice() {
        [
            "apis",
            GROUP,
            "v1",
            "namespaces",
            ns,
            "images",
            name,
            "data",
        ] => Some((ns.to_string(), name.to_string())),
        _ => None,
    }
}

/// Whether a request is an upload, which is bounded by [`UPLOAD_DEADLINE`] rather than the
/// request timeout.
pub(crate) fn is_upload(method: &Method, path: &str) -> bool {
    *method == Method::PUT && target(path).is_some()
}

/// What `images/NAME/data` is asked with.
pub(crate) struct Request<'a> {
    pub(crate) method: &'a Method,
    pub(crate) headers: &'a HeaderMap,
    /// Closes the request's connection (a download whose client stopped reading).
    pub(crate) cutoff: Cutoff,
}

/// The room uploads are staged in: at most so many bytes at once, in all.
#[derive(Debug)]
pub(crate) struct StagingRoom {
    max: u64,
    used: Arc<AtomicU64>,
}

/// Bytes of the [`StagingRoom`] one upload holds, given back when dropped.
#[derive(Debug)]
struct Reservation {
    used: Arc<AtomicU64>,
    max: u64,
    held: u64,
}

impl StagingRoom {
    pub(crate) fn new(max: u64) -> Self {
        Self {
            max,
            used: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Room for one upload that says it sends `declared` bytes: none held yet, as it grows
    /// with the bytes that arrive ([`Reservation::grow_to`]), so that an upload holds no room
    /// for what it only announced.
    ///
    /// # Errors
    /// 507 when `declared` exceeds the whole room.
    fn admit(&self, declared: Option<u64>) -> ApiResult<Reservation> {
        let room = self.reserve(0)?;
        match declared {
            Some(bytes) if bytes > self.max => Err(room.too_large(bytes)),
            _ => Ok(room),
        }
    }

    /// Room for `bytes` of one upload.
    ///
    /// # Errors
    /// 507 when `bytes` exceed the whole room; 429 when others hold what is missing.
    fn reserve(&self, bytes: u64) -> ApiResult<Reservation> {
        let mut r = Reservation {
            used: Arc::clone(&self.used),
            max: self.max,
            held: 0,
        };
        r.grow_to(bytes)?;
        Ok(r)
    }
}

impl Reservation {
    /// 507: `bytes` do not fit in the whole room.
    fn too_large(&self, bytes: u64) -> ApiError {
        ApiError::insufficient_storage(format!(
            "the image data ({bytes} bytes) is larger than the room this server stages uploads in ({} bytes)",
            self.max
        ))
    }

    /// Holds room for `bytes` in all (more than held, or nothing).
    fn grow_to(&mut self, bytes: u64) -> ApiResult<()> {
        if bytes <= self.held {
            return Ok(());
        }
        if bytes > self.max {
            return Err(self.too_large(bytes));
        }
        let more = bytes - self.held;
        let max = self.max;
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(more).filter(|u| *u <= max)
            })
            .map_err(|_| {
                ApiError::too_many_requests(
                    format!(
                        "other uploads fill the room this server stages uploads in ({max} bytes): try again later"
                    ),
                    30,
                )
            })?;
        self.held = bytes;
        Ok(())
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.used.fetch_sub(self.held, Ordering::AcqRel);
    }
}

/// Answers `images/NAME/data`.
pub(crate) async fn serve(
    state: &AppState,
    request: &Request<'_>,
    (ns, name): (String, String),
    body: Body,
    caller: &Caller,
) -> ApiResult<Response> {
    let (method, headers) = (request.method, request.headers);
    if !meta::is_dns1123_label(&ns) {
        return Err(ApiError::bad_request(format!(
            "invalid namespace \"{ns}\": must be a DNS-1123 label"
        )));
    }
    if !meta::is_dns1123_subdomain(&name) {
        return Err(ApiError::bad_request(format!(
            "invalid name \"{name}\": must be a DNS-1123 subdomain"
        )));
    }
    match *method {
        Method::PUT => upload(state, &ns, &name, headers, body, caller).await,
        Method::GET => download(state, &ns, &name, caller, request.cutoff.clone()).await,
        Method::DELETE => remove(state, &ns, &name, caller).await,
        ref m => Err(ApiError::method_not_allowed(format!(
            "{m} is not allowed on images/{name}/data: PUT uploads, GET downloads"
        ))),
    }
}

fn info(verb: &str, ns: &str, name: &str) -> RequestInfo {
    RequestInfo {
        verb: verb.into(),
        group: Some(GROUP.into()),
        version: "v1".into(),
        resource: "images".into(),
        subresource: String::new(),
        namespace: ns.into(),
        name: name.into(),
    }
}

fn image_key(state: &AppState, ns: &str, name: &str) -> String {
    keys::object(&state.api.prefix, GROUP, "images", Some(ns), name)
}

/// The Image, with its revision.
async fn read_image(state: &AppState, ns: &str, name: &str) -> ApiResult<(Image, i64)> {
    let stored = state
        .api
        .store
        .get(&image_key(state, ns, name))
        .await
        .map_err(ApiError::from)?
        .ok_or_else(|| ApiError::not_found(GROUP, "images", name))?;
    let image: Image = serde_json::from_value(stored.value)
        .map_err(|e| ApiError::internal(format!("a stored Image does not decode: {e}")))?;
    Ok((image, stored.mod_revision))
}

/// The object store's URL, or 503.
fn object_store(state: &AppState) -> ApiResult<&str> {
    state.config.object_store_url.as_deref().ok_or_else(|| {
        ApiError::unavailable(
            "this cloud has no object store (the API server's --object-store-url is not set)",
        )
    })
}

/// A token of the image store's account, and the account's URL.
fn store_account(state: &AppState, base: &str) -> (String, String) {
    let (token, _) = state.identity.signer.issue_scoped(
        STORE_USER,
        &Verified {
            uid: STORE_PROJECT.into(),
            generation: 0,
        },
        STORE_TTL,
        Some(store_scope()),
    );
    (
        token,
        format!("{}/v1/AUTH_{STORE_PROJECT}", base.trim_end_matches('/')),
    )
}

fn field(path: &str, message: impl Into<String>) -> ApiError {
    let message = message.into();
    ApiError::bad_request_fields(
        format!("{path}: {message}"),
        vec![Cause::invalid(path, message)],
    )
}

/// `PUT images/NAME/data`.
async fn upload(
    state: &AppState,
    ns: &str,
    name: &str,
    headers: &HeaderMap,
    body: Body,
    caller: &Caller,
) -> ApiResult<Response> {
    if let Principal::Node(node) = caller.principal() {
        return Err(ApiError::forbidden(format!(
            "node \"{node}\" cannot upload images \"{name}\": image data is uploaded by users"
        )));
    }
    crate::policy::authorize(
        &state.api,
        &info("update", ns, name),
        &Params::default(),
        caller,
    )
    .await?;
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if content_type.split(';').next().map(str::trim) != Some("application/octet-stream") {
        return Err(ApiError::unsupported_media_type(&format!(
            "{content_type}: image data is sent as application/octet-stream"
        )));
    }
    let limit = state.config.image_max_bytes;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|l| l > limit) {
        return Err(too_large(limit));
    }
    let base = object_store(state)?.to_owned();
    let (image, _) = read_image(state, ns, name).await?;
    if image.metadata.deletion_timestamp.is_some() {
        return Err(deleting(name));
    }
    // The image controller stores a URL source's data it downloaded and verified.
    let stores_url =
        image.spec.source.url.is_some() && matches!(caller.principal(), Principal::System(_));
    if image.spec.source.upload.is_none() && !stores_url {
        return Err(field(
            "spec.source",
            format!(
                "images \"{name}\" takes its data from its source; only an image with spec.source.upload is uploaded"
            ),
        ));
    }
    let status = image.status.clone().unwrap_or_default();
    if status.phase == ImagePhase::Active {
        return Err(ApiError::conflict(
            GROUP,
            "images",
            name,
            "the image is Active and its data cannot change: upload to a new Image",
        ));
    }
    let uid = image
        .metadata
        .uid
        .clone()
        .ok_or_else(|| ApiError::internal("a stored Image has no uid"))?;
    // What it says it sends must fit; room is held as its bytes arrive.
    let room = state.staging.admit(declared)?;
    // One upload at a time: a claim that goes with its lease if this server does.
    let claim = upload_claim(state, &uid);
    let store = &state.api.store;
    let lease = store
        .grant_lease(UPLOAD_DEADLINE.as_secs() as i64 + 60)
        .await
        .map_err(ApiError::from)?;
    // Ended on every way out of here, a dropped request's too.
    let _lease = Lease(store.clone(), lease);
    let owner = json!({"by": caller.user});
    let claimed = store
        .write_leased(&[Guard::Absent(&claim)], &[(&claim, &owner, lease)])
        .await
        .map_err(ApiError::from)?;
    if claimed.is_none() {
        return Err(ApiError::conflict(
            GROUP,
            "images",
            name,
            "another upload of this image is under way",
        ));
    }
    tokio::time::timeout(
        UPLOAD_DEADLINE,
        receive(state, (ns, name, &uid), &base, body, room, caller),
    )
    .await
    .unwrap_or_else(|_| {
        Err(ApiError::timeout(format!(
            "the upload did not complete within {} s",
            UPLOAD_DEADLINE.as_secs()
        )))
    })
}

/// The key of the claim an upload of the Image whose uid is `uid` holds.
fn upload_claim(state: &AppState, uid: &str) -> String {
    format!("{}/_uploads/images/{uid}", state.api.prefix)
}

fn deleting(name: &str) -> ApiError {
    ApiError::conflict(
        GROUP,
        "images",
        name,
        "the image is being deleted and takes no data",
    )
}

/// An upload's lease, ended (and so its claim released) when dropped, rather than left to
/// expire hours later.
struct Lease(crate::storage::store::Store, i64);

impl Drop for Lease {
    fn drop(&mut self) {
        let (store, id) = (self.0.clone(), self.1);
        tokio::spawn(async move {
            if let Err(e) = store.revoke_lease(id).await {
                tracing::warn!(error = %e, lease = id, "end an image upload's lease (it expires by itself)");
            }
        });
    }
}

fn too_large(limit: u64) -> ApiError {
    let mut e = ApiError::too_large(usize::try_from(limit).unwrap_or(usize::MAX));
    e.message = format!("the image data is larger than this cloud's limit of {limit} bytes");
    e
}

/// Why an upload was refused, for the Image's conditions (`None`: not the data's fault, so
/// the status is left as it was).
fn refusal(e: &ImageError) -> Option<Reason> {
    match e {
        ImageError::ChecksumMismatch { .. } => Some(Reason::ChecksumMismatch),
        ImageError::TooLarge { .. } => Some(Reason::DownloadTooLarge),
        ImageError::Unsafe(u) => Some(match u {
            Unsafe::BackingFile(_) => Reason::BackingFile,
            Unsafe::DataFile(_) => Reason::DataFile,
            Unsafe::Protocol(_) => Reason::ProtocolFileName,
            Unsafe::FormatMismatch { .. } => Reason::FormatMismatch,
            Unsafe::VirtualSizeTooLarge { .. } => Reason::VirtualSizeTooLarge,
            Unsafe::Unreadable { .. } => Reason::Unreadable,
        }),
        _ => None,
    }
}

fn cache_format(format: DiskFormat) -> Format {
    match format {
        DiskFormat::Qcow2 => Format::Qcow2,
        DiskFormat::Raw => Format::Raw,
        DiskFormat::Iso => Format::Iso,
        DiskFormat::Aki => Format::Kernel,
        DiskFormat::Ari => Format::Ramdisk,
    }
}

/// Streams the body into a private temporary file while hashing it, checks and inspects it,
/// writes it to the object store and records it: the upload once claimed.
async fn receive(
    state: &AppState,
    (ns, name, uid): (&str, &str, &str),
    base: &str,
    body: Body,
    room: Reservation,
    caller: &Caller,
) -> ApiResult<Response> {
    let limit = state.config.image_max_bytes;
    // Read again now the claim is held: the Image may have gone Active, or been deleted and
    // made anew under its name, since `upload` looked.
    let (image, _) = read_image(state, ns, name).await?;
    still_open(&image, uid, name)?;
    let format = cache_format(image.spec.disk_format);
    let mut status = ImageStatus {
        phase: ImagePhase::Uploading,
        ..image.status.clone().unwrap_or_default()
    };
    let generation = image.metadata.generation;
    ConditionType::Ready
        .no(
            Reason::Uploading,
            format!("data being uploaded by {}", caller.user),
        )
        .set(&mut status.conditions, generation);
    write_status(state, ns, name, uid, &status).await?;
    tracing::info!(caller = %caller.user, namespace = ns, image = name, "image upload started");

    let bounds = Bounds {
        limit,
        rate: state.config.limits.image_min_rate,
    };
    let staged = match stage(body, bounds, room, image.spec.sha256.as_deref()).await {
        Ok(s) => s,
        Err(Staging::Client(e)) => {
            restore(state, ns, name, uid, &image, None).await;
            return Err(e);
        }
        Err(Staging::Data(e)) => return Err(refused(state, ns, name, uid, &image, &e).await),
    };
    let path = staged.file.path().to_owned();
    let max_virtual = state.config.image_max_virtual_size;
    let inspected = tokio::task::spawn_blocking(move || {
        stratus_image_cache::inspect::inspect(&path, format, max_virtual)
    })
    .await
    .map_err(|e| ApiError::internal(format!("the inspection failed: {e}")))?;
    if let Err(v) = inspected {
        let e = ImageError::from(v);
        return Err(refused(state, ns, name, uid, &image, &e).await);
    }
    // Nothing reaches the object store for an Image that is no longer this upload's, nor
    // before the Image holds the finalizer that removes it with the Image.
    hold_data(state, ns, name, uid).await?;

    let (token, account) = store_account(state, base);
    let object = uid.to_owned();
    let file = staged.file;
    let put = tokio::task::spawn_blocking(move || {
        let source = ObjectSource {
            account_url: &account,
            container: UPLOAD_CONTAINER,
            object: &object,
            token: &token,
        };
        store::make_container(&source)?;
        store::put(&source, file.as_file())
    })
    .await
    .map_err(|e| ApiError::internal(format!("the write to the object store failed: {e}")))?;
    if let Err(e) = put {
        restore(state, ns, name, uid, &image, None).await;
        tracing::warn!(error = %stratus_error_chain(&e), namespace = ns, image = name, "image upload: the object store refused the data");
        return Err(ApiError::unavailable(format!(
            "the object store did not take the data: {}",
            stratus_error_chain(&e)
        )));
    }

    let mut done = status.clone();
    done.phase = ImagePhase::Active;
    done.size_bytes = Some(staged.size);
    done.sha256 = Some(staged.sha256);
    done.format = Some(image.spec.disk_format);
    done.stored = Some(StoredObject {
        container: UPLOAD_CONTAINER.into(),
        object: uid.into(),
    });
    done.observed_generation = generation;
    let how = match (image.spec.source.url.is_some(), image.spec.sha256.is_some()) {
        (false, true) => "uploaded; the data matches spec.sha256",
        (false, false) => "uploaded; the data's checksum is recorded",
        (true, true) => "downloaded from spec.source.url and stored; the data matches spec.sha256",
        (true, false) => {
            "downloaded from spec.source.url and stored; the data's checksum is recorded"
        }
    };
    ConditionType::Verified
        .yes(
            Reason::Verified,
            format!("{how}; inspected: a self-contained {format} image"),
        )
        .set(&mut done.conditions, generation);
    ConditionType::Ready
        .yes(Reason::Active, "servers can boot from it")
        .set(&mut done.conditions, generation);
    let written = write_status(state, ns, name, uid, &done).await?;
    tracing::info!(caller = %caller.user, namespace = ns, image = name, size = staged.size, "image uploaded");
    Ok(written.into_response())
}

fn stratus_error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push_str(": ");
        out.push_str(&s.to_string());
        cur = s.source();
    }
    out
}

/// Records a refusal of the data in the Image's conditions, and answers it.
async fn refused(
    state: &AppState,
    ns: &str,
    name: &str,
    uid: &str,
    image: &Image,
    e: &ImageError,
) -> ApiError {
    let message = stratus_error_chain(e);
    restore(
        state,
        ns,
        name,
        uid,
        image,
        refusal(e).map(|r| (r, message.clone())),
    )
    .await;
    match e {
        ImageError::TooLarge { limit, .. } => too_large(*limit),
        _ => ApiError::bad_request_fields(
            format!("the image data is refused: {message}"),
            vec![Cause::invalid("data", message)],
        ),
    }
}

/// Puts the Image's status back as it was before the upload, with `Ready` and `Verified`
/// False for `why` when the data was refused.
async fn restore(
    state: &AppState,
    ns: &str,
    name: &str,
    uid: &str,
    image: &Image,
    why: Option<(Reason, String)>,
) {
    let mut status = image.status.clone().unwrap_or_default();
    let generation = image.metadata.generation;
    match why {
        Some((reason, message)) => {
            status.phase = ImagePhase::Error;
            ConditionType::Verified
                .no(reason, format!("the uploaded data is refused: {message}"))
                .set(&mut status.conditions, generation);
            ConditionType::Ready
                .no(
                    reason,
                    "upload image data that passes (PUT images/NAME/data)",
                )
                .set(&mut status.conditions, generation);
        }
        None => {
            ConditionType::Ready
                .no(
                    Reason::AwaitingUpload,
                    "the last upload did not complete: upload the data (PUT images/NAME/data)",
                )
                .set(&mut status.conditions, generation);
        }
    }
    if let Err(e) = write_status(state, ns, name, uid, &status).await {
        tracing::warn!(error = %e.message, namespace = ns, image = name, "record a failed image upload");
    }
}

/// Whether the upload holding the claim of the Image whose uid is `uid` may still write
/// `image` (409 when it went Active or is another Image of the same name).
fn still_open(image: &Image, uid: &str, name: &str) -> ApiResult<()> {
    if image.metadata.uid.as_deref() != Some(uid) {
        return Err(ApiError::conflict(
            GROUP,
            "images",
            name,
            "the image was deleted during the upload (one of its name now is another image)",
        ));
    }
    if image.metadata.deletion_timestamp.is_some() {
        return Err(deleting(name));
    }
    if image
        .status
        .as_ref()
        .is_some_and(|s| s.phase == ImagePhase::Active)
    {
        return Err(ApiError::conflict(
            GROUP,
            "images",
            name,
            "the image went Active during the upload and its data cannot change",
        ));
    }
    Ok(())
}

/// Puts [`DATA_FINALIZER`] on the Image whose uid is `uid` while it is open to this upload
/// (at its `resourceVersion`, tried again when another writer changed it first).
async fn hold_data(state: &AppState, ns: &str, name: &str, uid: &str) -> ApiResult<()> {
    for _ in 0..STATUS_RETRIES {
        let (image, revision) = read_image(state, ns, name).await?;
        still_open(&image, uid, name)?;
        let mut finalizers = image.metadata.finalizers.clone().unwrap_or_default();
        if finalizers.iter().any(|f| f == DATA_FINALIZER) {
            return Ok(());
        }
        finalizers.push(DATA_FINALIZER.into());
        match patch_finalizers(state, ns, name, uid, revision, &finalizers).await {
            Err(e) if e.code == 409 && e.details.causes.is_empty() => continue,
            other => return other.map(|_| ()),
        }
    }
    Err(ApiError::conflict(
        GROUP,
        "images",
        name,
        "the image kept changing while the upload marked it as holding data",
    ))
}

/// Writes `finalizers` as the Image's, at `revision` of the Image whose uid is `uid`.
async fn patch_finalizers(
    state: &AppState,
    ns: &str,
    name: &str,
    uid: &str,
    revision: i64,
    finalizers: &[String],
) -> ApiResult<Outcome> {
    let patch = json!({
        "metadata": {"uid": uid, "resourceVersion": revision.to_string(), "finalizers": finalizers},
    });
    patch_image(state, ns, name, None, &patch).await
}

/// `DELETE images/NAME/data`: a deleted Image's object removed from the object store, then
/// its [`DATA_FINALIZER`]; for a system identity (the image controller) only.
async fn remove(state: &AppState, ns: &str, name: &str, caller: &Caller) -> ApiResult<Response> {
    if !matches!(caller.principal(), Principal::System(_)) {
        return Err(ApiError::forbidden(format!(
            "{} cannot delete images \"{name}\" data: it goes with its image (delete the image)",
            caller.user
        )));
    }
    let base = object_store(state)?.to_owned();
    for _ in 0..STATUS_RETRIES {
        let (image, revision) = read_image(state, ns, name).await?;
        let finalizers = image.metadata.finalizers.clone().unwrap_or_default();
        if !finalizers.iter().any(|f| f == DATA_FINALIZER) {
            return Ok(StatusCode::NO_CONTENT.into_response());
        }
        if image.metadata.deletion_timestamp.is_none() {
            return Err(ApiError::conflict(
                GROUP,
                "images",
                name,
                "the image is not being deleted: its data goes with it",
            ));
        }
        let uid = image
            .metadata
            .uid
            .clone()
            .ok_or_else(|| ApiError::internal("a stored Image has no uid"))?;
        if state
            .api
            .store
            .get(&upload_claim(state, &uid))
            .await
            .map_err(ApiError::from)?
            .is_some()
        {
            return Err(ApiError::conflict(
                GROUP,
                "images",
                name,
                "an upload of the image is under way: its data is removed once it ends",
            ));
        }
        // Where the upload writes, whether or not its status says it wrote.
        let (token, account) = store_account(state, &base);
        let object = uid.clone();
        let gone = tokio::task::spawn_blocking(move || {
            store::delete(&ObjectSource {
                account_url: &account,
                container: UPLOAD_CONTAINER,
                object: &object,
                token: &token,
            })
        })
        .await
        .map_err(|e| ApiError::internal(format!("the delete in the object store failed: {e}")))?;
        if let Err(e) = gone {
            return Err(ApiError::unavailable(format!(
                "the object store did not delete the image's data: {}",
                stratus_error_chain(&e)
            )));
        }
        tracing::info!(caller = %caller.user, namespace = ns, image = name, "deleted image's data removed from the object store");
        let rest: Vec<String> = finalizers
            .into_iter()
            .filter(|f| f != DATA_FINALIZER)
            .collect();
        match patch_finalizers(state, ns, name, &uid, revision, &rest).await {
            Err(e) if e.code == 409 && e.details.causes.is_empty() => continue,
            Err(e) if e.code == 404 => return Ok(StatusCode::NO_CONTENT.into_response()),
            Err(e) => return Err(e),
            Ok(_) => return Ok(StatusCode::NO_CONTENT.into_response()),
        }
    }
    Err(ApiError::conflict(
        GROUP,
        "images",
        name,
        "the image kept changing while its data was removed",
    ))
}

/// How many times a status write is tried again when another writer changed the Image first.
const STATUS_RETRIES: usize = 8;

/// Writes the Image's whole status under the upload's field manager, only while the Image is
/// the one whose uid is `uid` and not Active: each try reads it, checks that and writes with
/// its `resourceVersion` as precondition, so nothing written in between is overwritten.
async fn write_status(
    state: &AppState,
    ns: &str,
    name: &str,
    uid: &str,
    status: &ImageStatus,
) -> ApiResult<Outcome> {
    for _ in 0..STATUS_RETRIES {
        let (image, revision) = read_image(state, ns, name).await?;
        still_open(&image, uid, name)?;
        match patch_status(state, ns, name, uid, revision, status).await {
            Err(e) if e.code == 409 && e.details.causes.is_empty() => continue,
            other => return other,
        }
    }
    Err(ApiError::conflict(
        GROUP,
        "images",
        name,
        "the image kept changing during the upload's status write",
    ))
}

/// One status write of [`write_status`], at `revision` of the Image whose uid is `uid`.
async fn patch_status(
    state: &AppState,
    ns: &str,
    name: &str,
    uid: &str,
    revision: i64,
    status: &ImageStatus,
) -> ApiResult<Outcome> {
    let status = serde_json::to_value(status)
        .map_err(|e| ApiError::internal(format!("encode an Image's status: {e}")))?;
    let patch = json!({
        "metadata": {"uid": uid, "resourceVersion": revision.to_string()},
        "status": status,
    });
    patch_image(state, ns, name, Some("status"), &patch).await
}

/// A merge patch of the Image (or its `subresource`) under the upload's field manager.
async fn patch_image(
    state: &AppState,
    ns: &str,
    name: &str,
    subresource: Option<&str>,
    patch: &serde_json::Value,
) -> ApiResult<Outcome> {
    let rt = state
        .api
        .registry
        .get(GROUP, "v1", "images")
        .ok_or_else(|| ApiError::internal("images are not served"))?;
    let t = Target {
        rt: Arc::clone(rt),
        namespace: Some(ns.into()),
        name: Some(name.into()),
        subresource: subresource.map(Into::into),
    };
    let params = Params::parse(Some(&format!("fieldManager={MANAGER}")))?;
    state
        .api
        .patch(
            &t,
            patch.to_string().as_bytes(),
            "application/merge-patch+json",
            &params,
            "stratus-apiserver",
            &AllowAll,
        )
        .await
}

/// An upload's data in a private temporary file, and the room it holds.
struct Staged {
    file: tempfile::NamedTempFile,
    sha256: String,
    size: u64,
    _room: Reservation,
}

enum Staging {
    /// The client's fault, not the data's (it stalled, was too slow, went away), or no room.
    Client(ApiError),
    /// The data is refused.
    Data(ImageError),
}

/// How much an upload may send, and how slowly.
#[derive(Debug, Clone, Copy)]
struct Bounds {
    limit: u64,
    rate: crate::http::limits::MinRate,
}

/// Reads `body` into a temporary file, hashing it, at most `bounds.limit` bytes at no less
/// than `bounds.rate` and with at most [`STALL`] between its pieces, in `room` grown as it
/// comes; checks it against `expected`.
async fn stage(
    body: Body,
    bounds: Bounds,
    mut room: Reservation,
    expected: Option<&str>,
) -> Result<Staged, Staging> {
    use http_body_util::BodyExt;
    use tokio::io::AsyncWriteExt;
    let internal = |what: &str, e: std::io::Error| {
        Staging::Client(ApiError::internal(format!("{what} the upload's file: {e}")))
    };
    let file = tempfile::Builder::new()
        .prefix("stratus-upload-")
        .tempfile()
        .map_err(|e| internal("create", e))?;
    let mut out = tokio::fs::File::from_std(file.reopen().map_err(|e| internal("open", e))?);
    let mut hash = ring::digest::Context::new(&ring::digest::SHA256);
    let mut size = 0u64;
    let mut body = body;
    let mut pace = Pace::new(bounds.rate, Instant::now());
    let mut last = Instant::now();
    let too_slow = |e: crate::http::limits::TooSlow| {
        Staging::Client(ApiError::request_timeout(format!(
            "the upload was too slow and is cut off: {e}"
        )))
    };
    loop {
        let until = pace.deadline().min(last + STALL);
        let frame = match tokio::time::timeout_at(until.into(), body.frame()).await {
            Err(_) => {
                let now = Instant::now();
                pace.check(now).map_err(too_slow)?;
                if now >= last + STALL {
                    return Err(Staging::Client(ApiError::request_timeout(format!(
                        "the upload sent nothing for {} s",
                        STALL.as_secs()
                    ))));
                }
                continue;
            }
            Ok(None) => break,
            Ok(Some(Err(e))) => {
                return Err(Staging::Client(ApiError::bad_request(format!(
                    "the upload's body ended early: {e}"
                ))));
            }
            Ok(Some(Ok(frame))) => frame,
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        last = Instant::now();
        pace.moved(data.len() as u64, last).map_err(too_slow)?;
        size += data.len() as u64;
        if size > bounds.limit {
            return Err(Staging::Data(ImageError::TooLarge {
                url: "the upload".into(),
                limit: bounds.limit,
            }));
        }
        room.grow_to(size).map_err(Staging::Client)?;
        hash.update(&data);
        out.write_all(&data)
            .await
            .map_err(|e| internal("write", e))?;
    }
    out.flush().await.map_err(|e| internal("write", e))?;
    out.sync_all().await.map_err(|e| internal("sync", e))?;
    let sha256: String = hash
        .finish()
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    if let Some(expected) = expected
        && !expected.eq_ignore_ascii_case(&sha256)
    {
        return Err(Staging::Data(ImageError::ChecksumMismatch {
            expected: expected.to_ascii_lowercase(),
            actual: sha256,
        }));
    }
    Ok(Staged {
        file,
        sha256,
        size,
        _room: room,
    })
}

/// Chunks of a download read ahead of its client.
const CHUNKS: usize = 4;
/// The largest chunk read from the object store at once.
const CHUNK: usize = 256 * 1024;

/// The longest a download may take, whatever its size.
const DOWNLOAD_DEADLINE: Duration = UPLOAD_DEADLINE;

/// How long a download of `length` bytes may take in all: twice what the minimum `rate`
/// needs for them, and a window, within [`DOWNLOAD_DEADLINE`] (all of it when the length is
/// not known or no minimum is set). A client reading just above the minimum rate holds its
/// transfer place no longer than that.
fn download_deadline(length: Option<u64>, rate: crate::http::limits::MinRate) -> Duration {
    match length {
        Some(l) if rate.bytes_per_second > 0 => {
            Duration::from_secs((l / rate.bytes_per_second).saturating_mul(2))
                .saturating_add(rate.window)
                .min(DOWNLOAD_DEADLINE)
        }
        _ => DOWNLOAD_DEADLINE,
    }
}

/// Why a download was cut off.
#[derive(Debug)]
enum Cut {
    /// A window in which the client took too little.
    Slow(crate::http::limits::TooSlow),
    /// Its deadline passed.
    Deadline(Duration),
}

impl std::fmt::Display for Cut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Slow(slow) => write!(f, "its client reads too slowly: {slow}"),
            Self::Deadline(d) => write!(f, "it did not end within {} s", d.as_secs()),
        }
    }
}

/// Hands `reader`'s data to `tx` a chunk at a time: each read on a blocking thread (bounded by
/// the object store client's read timeout), each hand-off awaited without one, so a client
/// that stops reading holds no thread. Ends at the data's end, on a read error (sent on), or
/// when the client is gone.
///
/// # Errors
/// A window of `rate` in which the client took too little, or `deadline` passed.
async fn relay(
    mut reader: Box<dyn std::io::Read + Send>,
    tx: tokio::sync::mpsc::Sender<Result<bytes::Bytes, std::io::Error>>,
    rate: crate::http::limits::MinRate,
    deadline: Duration,
) -> Result<(), Cut> {
    use tokio::sync::mpsc::error::SendTimeoutError;
    let started = Instant::now();
    let until = started + deadline;
    let mut pace = Pace::new(rate, started);
    loop {
        if Instant::now() >= until {
            return Err(Cut::Deadline(deadline));
        }
        let read = tokio::task::spawn_blocking(move || {
            let mut buf = vec![0u8; CHUNK];
            let n = reader.read(&mut buf);
            (
                reader,
                n.map(|n| {
                    buf.truncate(n);
                    bytes::Bytes::from(buf)
                }),
            )
        })
        .await;
        let Ok((back, chunk)) = read else {
            return Ok(());
        };
        reader = back;
        let mut item = match chunk {
            Ok(chunk) if chunk.is_empty() => return Ok(()),
            Ok(chunk) => Ok(chunk),
            Err(e) => {
                let _ = tx.send(Err(e)).await;
                return Ok(());
            }
        };
        let n = item.as_ref().map_or(0, |c| c.len() as u64);
        loop {
            let wait = pace
                .deadline()
                .min(until)
                .saturating_duration_since(Instant::now());
            match tx.send_timeout(item, wait).await {
                Ok(()) => break,
                Err(SendTimeoutError::Closed(_)) => return Ok(()),
                Err(SendTimeoutError::Timeout(back)) => {
                    let now = Instant::now();
                    pace.check(now).map_err(Cut::Slow)?;
                    if now >= until {
                        return Err(Cut::Deadline(deadline));
                    }
                    item = back;
                }
            }
        }
        pace.moved(n, Instant::now()).map_err(Cut::Slow)?;
    }
}

/// `GET images/NAME/data`.
async fn download(
    state: &AppState,
    ns: &str,
    name: &str,
    caller: &Caller,
    cutoff: Cutoff,
) -> ApiResult<Response> {
    match caller.principal() {
        Principal::System(_) => {}
        Principal::Node(node) => {
            let (image, _) = read_image(state, ns, name).await?;
            let value = serde_json::to_value(&image)
                .map_err(|e| ApiError::internal(format!("encode an Image: {e}")))?;
            if !crate::policy::node::image_placed(&state.api, ns, name, &value, node).await? {
                return Err(ApiError::forbidden(format!(
                    "node \"{node}\" cannot get images \"{name}\" data in project \"{ns}\": no server or volume placed on it is made from it"
                )));
            }
        }
        Principal::User(_) | Principal::Service(_) => {
            crate::policy::authorize(
                &state.api,
                &info("get", ns, name),
                &Params::default(),
                caller,
            )
            .await?;
        }
    }
    let base = object_store(state)?.to_owned();
    let (image, _) = read_image(state, ns, name).await?;
    let status = image.status.clone().unwrap_or_default();
    let (token, account, container, object) = match (&image.spec.source, &status.stored) {
        // Uploaded, or a URL source's data the image controller stored.
        (s, Some(stored))
            if (s.upload.is_some() || s.url.is_some()) && status.phase == ImagePhase::Active =>
        {
            let (token, account) = store_account(state, &base);
            (
                token,
                account,
                stored.container.clone(),
                stored.object.clone(),
            )
        }
        (s, _) if s.upload.is_some() => {
            return Err(ApiError::conflict(
                GROUP,
                "images",
                name,
                "the image has no data yet: it is not Active",
            ));
        }
        (s, _) => match &s.swift {
            Some(swift) => {
                let (token, account) =
                    crate::http::image_token::project_reader(state, ns, &image).await?;
                (
                    token,
                    account,
                    swift.container.clone(),
                    swift.object.clone(),
                )
            }
            None => {
                return Err(field(
                    "spec.source",
                    format!(
                        "images \"{name}\" is fetched from its spec.source.url, not served here"
                    ),
                ));
            }
        },
    };
    let opened = tokio::task::spawn_blocking(move || {
        store::get(&ObjectSource {
            account_url: &account,
            container: &container,
            object: &object,
            token: &token,
        })
        .map(|(length, reader)| (length, Box::new(reader) as Box<dyn std::io::Read + Send>))
    })
    .await
    .map_err(|e| ApiError::internal(format!("the image's reader stopped: {e}")))?;
    let (length, reader) = match opened {
        Ok(opened) => opened,
        Err(ImageError::ObjectStatus { code: 404, .. }) => {
            let mut e = ApiError::not_found(GROUP, "images", name);
            e.message = format!(
                "images \"{name}\" data: the object store has no such object (404) in its account"
            );
            return Err(e);
        }
        Err(e) => {
            return Err(ApiError::unavailable(format!(
                "the object store did not answer the image's data: {}",
                stratus_error_chain(&e)
            )));
        }
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<bytes::Bytes, std::io::Error>>(CHUNKS);
    let rate = state.config.limits.image_min_rate;
    let deadline = download_deadline(length, rate);
    let image = format!("{ns}/{name}");
    tokio::spawn(async move {
        if let Err(cut) = relay(reader, tx, rate, deadline).await {
            tracing::info!(image, %cut, "image download cut off");
            cutoff.cut();
        }
    });
    let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
    let mut response = Response::new(Body::from_stream(stream));
    *response.status_mut() = StatusCode::OK;
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        axum::http::HeaderValue::from_static("application/octet-stream"),
    );
    if let Some(l) = length {
        h.insert(header::CONTENT_LENGTH, axum::http::HeaderValue::from(l));
    }
    if let Some(sum) = &status.sha256
        && let Ok(v) = axum::http::HeaderValue::from_str(sum)
    {
        h.insert("x-image-sha256", v);
    }
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reader of the object store that never ends.
    struct Endless;

    impl std::io::Read for Endless {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            buf.fill(7);
            Ok(buf.len())
        }
    }

    /// A download whose client stops reading is given up after a window with too little
    /// read, holding no thread meanwhile; one whose client reads on is not.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_download_whose_client_stops_reading_is_given_up() {
        let rate = crate::http::limits::MinRate {
            bytes_per_second: 1024 * 1024,
            window: Duration::from_millis(300),
        };
        let (tx, mut rx) = tokio::sync::mpsc::channel(CHUNKS);
        let started = Instant::now();
        let relayed = tokio::spawn(relay(Box::new(Endless), tx, rate, DOWNLOAD_DEADLINE));
        // The client reads for a while, then stops.
        let until = Instant::now() + Duration::from_millis(700);
        while Instant::now() < until {
            rx.recv().await.expect("a chunk").expect("data");
        }
        let slow = tokio::time::timeout(Duration::from_secs(10), relayed)
            .await
            .expect("given up in time")
            .expect("the relay ran")
            .expect_err("too slow");
        let Cut::Slow(slow) = slow else {
            panic!("cut off for {slow}, not for reading too slowly");
        };
        assert_eq!(slow.moved, 0, "{slow}");
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{:?}",
            started.elapsed()
        );
    }

    /// A client reading above the minimum rate is cut off once its deadline passes.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_download_ends_at_its_deadline_however_its_client_reads() {
        let rate = crate::http::limits::MinRate {
            bytes_per_second: 1024,
            window: Duration::from_millis(300),
        };
        let (tx, mut rx) = tokio::sync::mpsc::channel(CHUNKS);
        let started = Instant::now();
        let relayed = tokio::spawn(relay(
            Box::new(Endless),
            tx,
            rate,
            Duration::from_millis(800),
        ));
        // The client reads on (well above the minimum) until the relay gives up.
        while let Some(chunk) = rx.recv().await {
            chunk.expect("data");
        }
        let cut = relayed.await.expect("the relay ran").expect_err("cut off");
        assert!(matches!(cut, Cut::Deadline(_)), "{cut}");
        let took = started.elapsed();
        assert!(took < Duration::from_secs(3), "{took:?}");
    }

    #[test]
    fn a_downloads_deadline_follows_its_size_within_bounds() {
        let rate = crate::http::limits::MinRate {
            bytes_per_second: 32 * 1024,
            window: Duration::from_secs(60),
        };
        // 32 MiB: 1024 s at the minimum rate, given twice that and a window.
        assert_eq!(
            download_deadline(Some(32 << 20), rate),
            Duration::from_secs(2 * 1024 + 60)
        );
        // 8 GiB (73 h at the minimum rate) or an unknown length: at most the cap.
        assert_eq!(download_deadline(Some(8 << 30), rate), DOWNLOAD_DEADLINE);
        assert_eq!(download_deadline(None, rate), DOWNLOAD_DEADLINE);
        assert_eq!(download_deadline(Some(0), rate), rate.window);
    }

    /// An upload holds room only for the bytes it sent, not for those it announced.
    #[test]
    fn staging_room_is_held_as_bytes_arrive() {
        let room = StagingRoom::new(100);
        let mut a = room.admit(Some(100)).expect("fits");
        let mut b = room.admit(Some(100)).expect("announcing holds nothing");
        a.grow_to(60).expect("a's bytes");
        assert_eq!(b.grow_to(50).expect_err("a holds 60").code, 429);
        b.grow_to(40).expect("what is left");
        assert_eq!(room.admit(Some(101)).expect_err("too large").code, 507);
        drop(a);
        b.grow_to(100).expect("a gave its room back");
    }

    #[test]
    fn only_the_data_path_of_an_image_is_its_data() {
        assert_eq!(
            target("/apis/image.stratus.dev/v1/namespaces/p1/images/disk/data"),
            Some(("p1".into(), "disk".into()))
        );
        for other in [
            "/apis/image.stratus.dev/v1/namespaces/p1/images/disk",
            "/apis/image.stratus.dev/v1/namespaces/p1/images/disk/status",
            "/apis/image.stratus.dev/v1/namespaces/p1/volumes/disk/data",
            "/apis/image.stratus.dev/v1/images/disk/data",
        ] {
            assert_eq!(target(other), None, "{other}");
        }
    }

    #[test]
    fn only_the_store_token_is_granted_the_store_account() {
        let claims = |user: &str, scope: Option<Scope>| Claims {
            user: user.into(),
            jti: "j".into(),
            exp: 0,
            uid: String::new(),
            generation: 0,
            project: scope,
        };
        assert!(grants(&claims(STORE_USER, Some(store_scope()))).is_some());
        assert!(grants(&claims(STORE_USER, None)).is_none());
        let other = Scope {
            name: "p1".into(),
            uid: STORE_PROJECT.into(),
        };
        assert!(grants(&claims(STORE_USER, Some(other))).is_none());
        assert!(grants(&claims("alice", Some(store_scope()))).is_none());
    }
}
