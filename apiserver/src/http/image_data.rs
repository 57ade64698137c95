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
//!   Image with `spec.source.upload` that is not Active; one upload of an Image at a time
//!   (a claim in etcd that expires with its lease, so a crashed server's upload frees it):
//!   the second is 409. The body is `application/octet-stream`, at most the image size limit,
//!   read with a bound on each silence and on the whole; its SHA-256 must match `spec.sha256`
//!   when given; it is inspected as URL sources are (no backing file, data file or `json:`).
//!   Only then is it written to the object store and the status set, in one write, to Active
//!   with where it is, its checksum, size and format. A refused upload sets `Ready=False` and
//!   `Verified=False` with the reason, and nothing else.
//! - A download is for a caller who may read the Image (roles), a node a Server or Volume
//!   placed on which is made from it, or a system identity.

use std::io::Read as _;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use stratus_api_types::common::{ConditionType, Reason};
use stratus_api_types::image::{
    DiskFormat, Image, ImagePhase, ImageStatus, StoredObject, UPLOAD_CONTAINER,
};
use stratus_image_cache::store;
use stratus_image_cache::{Format, ImageError, ObjectSource, Unsafe};

use crate::base::error::{ApiError, ApiResult, Cause};
use crate::base::meta;
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

/// Answers `images/NAME/data`.
pub(crate) async fn serve(
    state: &AppState,
    method: &Method,
    (ns, name): (String, String),
    headers: &HeaderMap,
    body: Body,
    caller: &Caller,
) -> ApiResult<Response> {
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
        Method::GET => download(state, &ns, &name, caller).await,
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
    if image.spec.source.upload.is_none() {
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
    // One upload at a time: a claim that goes with its lease if this server does.
    let claim = format!("{}/_uploads/images/{uid}", state.api.prefix);
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
        receive(state, ns, name, &uid, &base, body, caller),
    )
    .await
    .unwrap_or_else(|_| {
        Err(ApiError::timeout(format!(
            "the upload did not complete within {} s",
            UPLOAD_DEADLINE.as_secs()
        )))
    })
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
    ns: &str,
    name: &str,
    uid: &str,
    base: &str,
    body: Body,
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

    let staged = match stage(body, limit, image.spec.sha256.as_deref()).await {
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
    // Nothing reaches the object store for an Image that is no longer this upload's.
    let (now, _) = read_image(state, ns, name).await?;
    still_open(&now, uid, name)?;

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
    let how = if image.spec.sha256.is_some() {
        "uploaded; the data matches spec.sha256"
    } else {
        "uploaded; the data's checksum is recorded"
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
    let rt = state
        .api
        .registry
        .get(GROUP, "v1", "images")
        .ok_or_else(|| ApiError::internal("images are not served"))?;
    let t = Target {
        rt: Arc::clone(rt),
        namespace: Some(ns.into()),
        name: Some(name.into()),
        subresource: Some("status".into()),
    };
    let status = serde_json::to_value(status)
        .map_err(|e| ApiError::internal(format!("encode an Image's status: {e}")))?;
    let patch = json!({
        "metadata": {"uid": uid, "resourceVersion": revision.to_string()},
        "status": status,
    });
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

/// An upload's data in a private temporary file.
struct Staged {
    file: tempfile::NamedTempFile,
    sha256: String,
    size: u64,
}

enum Staging {
    /// The client's fault, not the data's (it stalled, went away).
    Client(ApiError),
    /// The data is refused.
    Data(ImageError),
}

/// Reads `body` into a temporary file, hashing it, at most `limit` bytes with at most
/// [`STALL`] between its pieces; checks it against `expected`.
async fn stage(body: Body, limit: u64, expected: Option<&str>) -> Result<Staged, Staging> {
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
    loop {
        let frame = match tokio::time::timeout(STALL, body.frame()).await {
            Err(_) => {
                return Err(Staging::Client(ApiError::timeout(format!(
                    "the upload sent nothing for {} s",
                    STALL.as_secs()
                ))));
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
        size += data.len() as u64;
        if size > limit {
            return Err(Staging::Data(ImageError::TooLarge {
                url: "the upload".into(),
                limit,
            }));
        }
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
    Ok(Staged { file, sha256, size })
}

/// `GET images/NAME/data`.
async fn download(state: &AppState, ns: &str, name: &str, caller: &Caller) -> ApiResult<Response> {
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
        (s, Some(stored)) if s.upload.is_some() && status.phase == ImagePhase::Active => {
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
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<bytes::Bytes, std::io::Error>>(4);
    let (first_tx, first_rx) = tokio::sync::oneshot::channel();
    tokio::task::spawn_blocking(move || {
        let source = ObjectSource {
            account_url: &account,
            container: &container,
            object: &object,
            token: &token,
        };
        let (length, mut reader) = match store::get(&source) {
            Ok(opened) => opened,
            Err(e) => {
                let _ = first_tx.send(Err(e));
                return;
            }
        };
        if first_tx.send(Ok(length)).is_err() {
            return;
        }
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            match reader.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => {
                    if tx
                        .blocking_send(Ok(bytes::Bytes::copy_from_slice(&buf[..n])))
                        .is_err()
                    {
                        return;
                    }
                }
                Err(e) => {
                    let _ = tx.blocking_send(Err(e));
                    return;
                }
            }
        }
    });
    let length = match first_rx.await {
        Ok(Ok(length)) => length,
        Ok(Err(ImageError::ObjectStatus { code: 404, .. })) => {
            let mut e = ApiError::not_found(GROUP, "images", name);
            e.message = format!(
                "images \"{name}\" data: the object store has no such object (404) in its account"
            );
            return Err(e);
        }
        Ok(Err(e)) => {
            return Err(ApiError::unavailable(format!(
                "the object store did not answer the image's data: {}",
                stratus_error_chain(&e)
            )));
        }
        Err(_) => return Err(ApiError::internal("the image's reader stopped")),
    };
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
