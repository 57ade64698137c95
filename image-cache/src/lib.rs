//! An image cache: each Image's data downloaded once under an operator's URL policy, verified
//! by SHA-256 and inspected before anything boots from it (the image controller, and on every
//! node the guests).
//!
//! # Layout
//!
//! Entries belong to one Image, by its uid, so that knowing another image's digest gets
//! nobody its data: a second Image with the same bytes downloads them from its own URL.
//!
//! - `<uid>/<format>-sha256-<hex>`: the Image's data, named by its digest and the format it
//!   was inspected as. Files only get this name by an atomic rename after their digest was
//!   computed (and checked, when one was expected) and [`inspect`] passed them, so a hit is
//!   trusted without rehashing; refused data is removed, never renamed.
//! - `<uid>/<format>-url-<hex of sha256(url)>`: for Images without an expected checksum, the
//!   digest of what that URL served, so the next fetch of the same URL is a hit (until the
//!   entry is swept): pin images by checksum if their URL's contents may change. For an
//!   object of the cloud's object store the hashed name is `swift:<container>/<object>` (its
//!   account is always the Image's project's), so [`ImageCache::cached`] finds it without a
//!   token.
//! - `<uid>/.lock-<name>`: advisory locks (`flock`), one per entry, so concurrent fetches of
//!   one image (from threads or processes) download it once while other images proceed.
//! - `<uid>/.tmp-*`: downloads in progress, removed when they fail.
//! - `<uid>/.users/<user>`: who uses the Image's data (on a node, the uid of each Server whose
//!   guest is built from it), recorded by [`ImageCache::pin`] before a fetch.
//! - `<uid>/.lock`: taken shared by a pin, exclusively by [`ImageCache::sweep`], which removes
//!   an Image's entries once none of its users is left (a deleted Image's data goes when its
//!   last guest does). Entries never pinned (made by a fetch alone) are never swept.
//! - `.trash-<uid>`: an Image's entries being removed.

pub mod inspect;
pub mod policy;
pub mod store;

use std::fs::{File, OpenOptions, Permissions};
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ring::digest::{Context, SHA256};
use stratus_api_types::image::ImageSource;

pub use inspect::{Format, InspectError, Unsafe};
pub use policy::{AddressClass, HostRule, HostRuleError, Policy, Refusal};

/// Length of a SHA-256 digest in hex.
const SHA256_HEX_LEN: usize = 64;
/// Longest uid accepted as a directory name.
const MAX_UID_LEN: usize = 128;
/// Read buffer for copies and downloads.
const CHUNK: usize = 256 * 1024;
/// Time allowed to connect, and for the server to start answering.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest silence tolerated while a response streams in.
const READ_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest one request of a download may take, its body's reading included (as long as an
/// upload may take through the API server): a server that sends a byte a minute is cut off.
const DOWNLOAD_DEADLINE: Duration = Duration::from_secs(3 * 3600);

/// Failures fetching an image.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The URL does not parse.
    #[error("invalid image URL {url:?}")]
    InvalidUrl {
        /// The URL as given.
        url: String,
        /// Why it does not parse.
        #[source]
        source: url::ParseError,
    },
    /// The URL policy refuses the URL (or a redirect's).
    #[error("image URL {url} refused")]
    Refused {
        /// The URL refused (the first, or a redirect's target).
        url: String,
        /// Why.
        #[source]
        reason: Refusal,
    },
    /// A `file:` URL that names no local path (e.g. one with a remote host).
    #[error("file URL {0:?} names no local path")]
    NotALocalPath(String),
    /// The expected checksum is not a SHA-256 digest in hex.
    #[error("expected checksum {0:?} is not 64 hex digits")]
    InvalidChecksum(String),
    /// The Image uid is not usable as a directory name.
    #[error("image uid {0:?} is not 1-128 letters, digits and '-'")]
    InvalidUid(String),
    /// The image's digest is not the expected one; nothing was cached.
    #[error("checksum mismatch: expected sha256 {expected}, got {actual}")]
    ChecksumMismatch {
        /// The digest asked for.
        expected: String,
        /// The digest of what was fetched.
        actual: String,
    },
    /// The source has more bytes than the policy allows; what was fetched is removed.
    #[error("{url} has more than {limit} bytes")]
    TooLarge {
        /// The URL.
        url: String,
        /// The limit.
        limit: u64,
    },
    /// The data was inspected and refused; nothing was cached.
    #[error("image data refused")]
    Unsafe(#[source] Unsafe),
    /// The data could not be inspected.
    #[error("inspect the image data")]
    Inspect(#[source] InspectError),
    /// The object store answered a fetch of an object with an error status (401 or 403: the
    /// token does not read that account; 404: no such object).
    #[error("the object store answered {code} for {url}")]
    ObjectStatus {
        /// The object's URL.
        url: String,
        /// The HTTP status.
        code: u16,
    },
    /// A `source.swift` object's names do not make an object URL.
    #[error("object {container:?}/{object:?} under {account_url} is no object URL")]
    ObjectName {
        /// The account's URL.
        account_url: String,
        /// The container.
        container: String,
        /// The object.
        object: String,
    },
    /// The HTTP request failed (connection, TLS, status 4xx/5xx, timeout).
    #[error("download {url}")]
    Http {
        /// The URL.
        url: String,
        /// The cause.
        #[source]
        source: Box<ureq::Error>,
    },
    /// Reading the source (a local file, or the response body) failed.
    #[error("read {url}")]
    Read {
        /// The URL.
        url: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A cache file operation failed.
    #[error("{op} {}", path.display())]
    Io {
        /// The operation, e.g. `create`.
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

impl ImageError {
    /// Whether fetching again cannot help until the Image (or the operator's policy) changes:
    /// the data is wrong, refused or too large.
    pub fn is_final(&self) -> bool {
        matches!(
            self,
            Self::ChecksumMismatch { .. } | Self::TooLarge { .. } | Self::Unsafe(_)
        )
    }
}

impl From<inspect::Verdict> for ImageError {
    fn from(v: inspect::Verdict) -> Self {
        match v {
            inspect::Verdict::Unsafe(u) => Self::Unsafe(u),
            inspect::Verdict::Failed(e) => Self::Inspect(e),
        }
    }
}

fn io_error<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> ImageError + 'a {
    move |source| ImageError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

/// An Image to fetch.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    /// The Image's uid: its entries are its own.
    pub uid: &'a str,
    /// Where its data is.
    pub url: &'a str,
    /// Its expected SHA-256 (hex), if any.
    pub sha256: Option<&'a str>,
    /// The format it declares.
    pub format: Format,
}

/// An image in the cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedImage {
    /// The file (do not write to it: guests share it as a backing file).
    pub path: PathBuf,
    /// SHA-256 of its contents, lowercase hex.
    pub sha256: String,
    /// Size in bytes.
    pub size: u64,
}

/// The node's image cache in one directory.
#[derive(Debug)]
pub struct ImageCache {
    dir: PathBuf,
    policy: Policy,
}

/// An object of the cloud's own object store (an Image's `source.swift`), read with a
/// short-lived token of the Image's project. The account's URL comes from the API server, not
/// from a tenant, so the URL policy (which refuses the control plane's addresses) does not
/// apply; the size limit and inspection do.
#[derive(Clone, Copy)]
pub struct ObjectSource<'a> {
    /// The project's account: `<proxy>/v1/AUTH_<project>`.
    pub account_url: &'a str,
    /// The container.
    pub container: &'a str,
    /// The object's name (`/` separates pseudo-folders).
    pub object: &'a str,
    /// Sent as `X-Auth-Token`, never logged nor put in the URL.
    pub token: &'a str,
}

impl std::fmt::Debug for ObjectSource<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObjectSource")
            .field("account_url", &self.account_url)
            .field("container", &self.container)
            .field("object", &self.object)
            .finish_non_exhaustive()
    }
}

impl ObjectSource<'_> {
    /// The object's URL: the account's, then the container and each segment of the object's
    /// name percent-encoded as one path segment, so no name reaches another account.
    ///
    /// # Errors
    /// [`ImageError::ObjectName`] when the account URL does not parse, or a name is empty or
    /// has a `.` or `..` segment.
    pub fn url(&self) -> Result<url::Url, ImageError> {
        let bad = || ImageError::ObjectName {
            account_url: self.account_url.to_owned(),
            container: self.container.to_owned(),
            object: self.object.to_owned(),
        };
        let mut url = url::Url::parse(self.account_url).map_err(|_| bad())?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(bad());
        }
        let parts = std::iter::once(self.container).chain(self.object.split('/'));
        {
            let mut segments = url.path_segments_mut().map_err(|()| bad())?;
            segments.pop_if_empty();
            for part in parts {
                if part.is_empty() || part == "." || part == ".." {
                    return Err(bad());
                }
                segments.push(part);
            }
        }
        Ok(url)
    }
}

/// Where an image comes from.
enum Source {
    File(PathBuf),
    Http(url::Url),
    /// The cloud's object store, with a token.
    Object(url::Url, String),
}

/// A resolver that answers only the addresses the policy checked, so that what is connected
/// to is what was checked (no second DNS answer).
#[derive(Debug)]
struct Pinned(Vec<SocketAddr>);

impl ureq::unversioned::resolver::Resolver for Pinned {
    fn resolve(
        &self,
        _uri: &ureq::http::Uri,
        _config: &ureq::config::Config,
        _timeout: ureq::unversioned::transport::NextTimeout,
    ) -> Result<ureq::unversioned::resolver::ResolvedSocketAddrs, ureq::Error> {
        let mut out = self.empty();
        for addr in &self.0 {
            if out.try_push(*addr).is_err() {
                break;
            }
        }
        if out.is_empty() {
            return Err(ureq::Error::HostNotFound);
        }
        Ok(out)
    }
}

impl ImageCache {
    /// A cache in `dir` (created on the first fetch if missing) fetching under `policy`.
    pub fn new(dir: PathBuf, policy: Policy) -> Self {
        // qemu-img reads a name with a ':' before its first '/' as a protocol: keep paths
        // absolute.
        let dir = std::path::absolute(&dir).unwrap_or(dir);
        Self { dir, policy }
    }

    /// The cache directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The policy fetches follow.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// The Image's data, downloading and inspecting it unless cached for this Image.
    ///
    /// With `sha256`, the entry is keyed by that digest (another URL of the same Image serving
    /// those bytes is a hit) and a download must match it; without, by the URL.
    ///
    /// # Guarantees
    ///
    /// Only data that matched its checksum and passed [`inspect::inspect`] as the declared
    /// format is ever returned. Each hop of an HTTP download (redirects included) is checked
    /// by the [`Policy`] and connected to at the addresses checked. Concurrent fetches of the
    /// same entry, from threads or processes, download it once; the others wait and get the
    /// cached file. A failed, mismatching, too large or refused download leaves nothing
    /// behind. Blocking: run it on a blocking thread.
    ///
    /// # Errors
    ///
    /// [`ImageError::ChecksumMismatch`], [`ImageError::TooLarge`] and [`ImageError::Unsafe`]
    /// for data to refuse ([`ImageError::is_final`]); [`ImageError::Refused`] for URLs the
    /// policy refuses; the other variants for bad input, transport and file errors.
    pub fn fetch(&self, req: &Request<'_>) -> Result<CachedImage, ImageError> {
        let source = self.parse_source(req.url)?;
        self.fetch_from(req, &source, req.url)
    }

    /// The entry of Image `uid` with `source`, `sha256` and `format` that a fetch would answer
    /// without downloading, if there is one; nothing is fetched, so nothing is asked for (an
    /// object's token is needed only on a miss). Blocking.
    ///
    /// # Errors
    /// [`ImageError::InvalidUid`], [`ImageError::InvalidChecksum`]; file errors.
    pub fn cached(
        &self,
        uid: &str,
        source: &ImageSource,
        sha256: Option<&str>,
        format: Format,
    ) -> Result<Option<CachedImage>, ImageError> {
        let expected = sha256.map(normalise_checksum).transpose()?;
        check_uid(uid)?;
        let Some(index) = source_index(uid, source) else {
            return Ok(None);
        };
        lookup(
            &self.dir.join(uid),
            format,
            &entry_name(format, expected.as_deref(), &index),
        )
    }

    /// As [`fetch`](Self::fetch), for an object of the cloud's object store read with
    /// `object.token` (an Image's `source.swift`); `uid`, `sha256` and `format` as in a
    /// [`Request`]. The entry is keyed by the checksum, or else by the object's URL.
    ///
    /// # Guarantees
    /// As [`fetch`](Self::fetch)'s, but the URL policy is not consulted (the account URL is
    /// the operator's); the token goes in a header only.
    ///
    /// # Errors
    /// As [`fetch`](Self::fetch)'s; [`ImageError::ObjectStatus`] when the object store
    /// refuses the token or has no such object.
    pub fn fetch_object(
        &self,
        uid: &str,
        object: &ObjectSource<'_>,
        sha256: Option<&str>,
        format: Format,
    ) -> Result<CachedImage, ImageError> {
        let url = object.url()?;
        let req = Request {
            uid,
            url: url.as_str(),
            sha256,
            format,
        };
        let source = Source::Object(url.clone(), object.token.to_owned());
        self.fetch_from(
            &req,
            &source,
            &object_index(object.container, object.object),
        )
    }

    /// Fetches `req` from `source`; `index` names its entry when no checksum is expected.
    fn fetch_from(
        &self,
        req: &Request<'_>,
        source: &Source,
        index: &str,
    ) -> Result<CachedImage, ImageError> {
        self.fetch_opened(req, index, || self.open(req.url, source))
    }

    /// The data of Image `uid` read from what `open` answers (called only on a miss, e.g. a
    /// stream of `images/NAME/data` from the API server), cached under `index` as a URL's
    /// data is (or under `sha256`, which it must match); `url` names it in errors and logs.
    ///
    /// # Guarantees
    /// As [`fetch`](Self::fetch)'s: the size limit, the checksum and the inspection hold
    /// whatever `open` reads from.
    ///
    /// # Errors
    /// As [`fetch`](Self::fetch)'s, and what `open` answers.
    pub fn fetch_reader(
        &self,
        req: &Request<'_>,
        index: &str,
        open: impl FnOnce() -> Result<Box<dyn Read>, ImageError>,
    ) -> Result<CachedImage, ImageError> {
        self.fetch_opened(req, index, open)
    }

    /// The data of Image `uid` with `source` on a miss of [`cached`](Self::cached): read from
    /// `served` (the API server's stream of `images/NAME/data`, for an uploaded image or an
    /// object of the object store) when given, else fetched from the source's URL.
    ///
    /// # Errors
    /// As [`fetch`](Self::fetch)'s.
    pub fn fetch_source<R: Read + 'static>(
        &self,
        uid: &str,
        source: &ImageSource,
        sha256: Option<&str>,
        format: Format,
        served: Option<(String, R)>,
    ) -> Result<CachedImage, ImageError> {
        let url = source.url.as_deref().unwrap_or_default();
        match served {
            Some((label, data)) => {
                let index = source_index(uid, source).unwrap_or_default();
                let req = Request {
                    uid,
                    url: &label,
                    sha256,
                    format,
                };
                self.fetch_opened(&req, &index, || Ok(Box::new(data)))
            }
            None => self.fetch(&Request {
                uid,
                url,
                sha256,
                format,
            }),
        }
    }

    fn fetch_opened(
        &self,
        req: &Request<'_>,
        index: &str,
        open: impl FnOnce() -> Result<Box<dyn Read>, ImageError>,
    ) -> Result<CachedImage, ImageError> {
        let expected = req.sha256.map(normalise_checksum).transpose()?;
        check_uid(req.uid)?;
        let dir = self.dir.join(req.uid);
        let key = entry_name(req.format, expected.as_deref(), index);
        if let Some(hit) = lookup(&dir, req.format, &key)? {
            return Ok(hit);
        }

        std::fs::create_dir_all(&dir).map_err(io_error("create", &dir))?;
        let _lock = lock(&dir, &key)?;
        // Whoever held the lock before us may have fetched it.
        if let Some(hit) = lookup(&dir, req.format, &key)? {
            return Ok(hit);
        }
        tracing::info!(url = req.url, uid = req.uid, "downloading image");
        let image = self.download(&dir, req, open()?, expected.as_deref())?;
        if expected.is_none() {
            write_index(&dir, &key, &image.sha256)?;
        }
        sync_dir(&dir)?;
        Ok(image)
    }

    /// Records that `user` (a uid, e.g. a Server's) uses the data of Image `uid`, so that
    /// [`sweep`](Self::sweep) keeps it while `user` is in use. Call it before the fetch whose
    /// data the user will use.
    ///
    /// # Guarantees
    ///
    /// Once this returns, the Image's entries (present or fetched later) stay until a sweep
    /// finds `user` no longer in use; a sweep racing with it either finishes removing the
    /// entries first (the pin then starts them anew) or keeps them. Blocking.
    ///
    /// # Errors
    ///
    /// [`ImageError::InvalidUid`] for a uid or user that is not a name; file errors.
    pub fn pin(&self, uid: &str, user: &str) -> Result<(), ImageError> {
        check_uid(uid)?;
        check_uid(user)?;
        let dir = self.dir.join(uid);
        let users = dir.join(USERS);
        std::fs::create_dir_all(&users).map_err(io_error("create", &users))?;
        let guard = dir_lock(&dir)?;
        guard.lock_shared().map_err(io_error("lock", &dir))?;
        // A sweep may have moved the entries away while this waited: start them anew.
        std::fs::create_dir_all(&users).map_err(io_error("create", &users))?;
        let pin = users.join(user);
        File::create(&pin).map_err(io_error("create", &pin))?;
        Ok(())
    }

    /// Removes the entries of every Image none of whose users (see [`pin`](Self::pin)) is
    /// `in_use` any more, and the pins of users no longer in use; answers the uids of the
    /// Images removed.
    ///
    /// # Guarantees
    ///
    /// An Image with a user in use, a fetch under way, or a pin being made is kept whole;
    /// one never pinned is kept. Removal is a rename out of the way and then a delete, so a
    /// fetch after it starts afresh. Blocking.
    ///
    /// # Errors
    ///
    /// File errors; what was removed before one stays removed.
    pub fn sweep(&self, in_use: impl Fn(&str) -> bool) -> Result<Vec<String>, ImageError> {
        let list = match std::fs::read_dir(&self.dir) {
            Ok(list) => list,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_error("read", &self.dir)(e)),
        };
        let mut removed = Vec::new();
        for entry in list {
            let entry = entry.map_err(io_error("read", &self.dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(TRASH) {
                // Left by a sweep that stopped half-way.
                remove_tree(&entry.path())?;
                continue;
            }
            if check_uid(&name).is_err() || !entry.path().is_dir() {
                continue;
            }
            if self.release(&name, &in_use)? {
                removed.push(name);
            }
        }
        Ok(removed)
    }

    /// Drops the pins of Image `uid` whose users are not in use, then its entries if no pin
    /// is left and no fetch holds one; whether they were removed.
    fn release(&self, uid: &str, in_use: &impl Fn(&str) -> bool) -> Result<bool, ImageError> {
        let dir = self.dir.join(uid);
        let users = dir.join(USERS);
        if !users.is_dir() {
            return Ok(false);
        }
        let guard = dir_lock(&dir)?;
        if !try_lock(&guard, &dir)? {
            // A pin is being made.
            return Ok(false);
        }
        let mut left = 0;
        for pin in std::fs::read_dir(&users).map_err(io_error("read", &users))? {
            let pin = pin.map_err(io_error("read", &users))?;
            if in_use(&pin.file_name().to_string_lossy()) {
                left += 1;
            } else {
                let path = pin.path();
                match std::fs::remove_file(&path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(io_error("remove", &path)(e)),
                }
            }
        }
        if left > 0 {
            return Ok(false);
        }
        // A fetch under way holds its entry's lock.
        let mut held = Vec::new();
        for entry in std::fs::read_dir(&dir).map_err(io_error("read", &dir))? {
            let entry = entry.map_err(io_error("read", &dir))?;
            if !entry.file_name().to_string_lossy().starts_with(".lock-") {
                continue;
            }
            let path = entry.path();
            let file = File::open(&path).map_err(io_error("open", &path))?;
            if !try_lock(&file, &path)? {
                return Ok(false);
            }
            held.push(file);
        }
        let trash = self.dir.join(format!("{TRASH}{uid}"));
        remove_tree(&trash)?;
        std::fs::rename(&dir, &trash).map_err(io_error("move away", &dir))?;
        drop(held);
        drop(guard);
        remove_tree(&trash)?;
        tracing::info!(uid, "removed the cached data of an image no guest uses");
        Ok(true)
    }

    fn parse_source(&self, raw: &str) -> Result<Source, ImageError> {
        let url = url::Url::parse(raw).map_err(|source| ImageError::InvalidUrl {
            url: raw.to_owned(),
            source,
        })?;
        match url.scheme() {
            "file" if self.policy.allow_file => url
                .to_file_path()
                .map(Source::File)
                .map_err(|()| ImageError::NotALocalPath(raw.to_owned())),
            "http" | "https" => Ok(Source::Http(url)),
            other => Err(ImageError::Refused {
                url: raw.to_owned(),
                reason: Refusal::Scheme(other.to_owned()),
            }),
        }
    }

    /// The body at `url`, following redirects, each hop checked by the policy.
    fn open_http(&self, url: &url::Url) -> Result<Box<dyn Read>, ImageError> {
        let mut current = url.clone();
        let mut redirects = 0;
        loop {
            let refused = |at: &url::Url, reason| ImageError::Refused {
                url: at.to_string(),
                reason,
            };
            let checked = self
                .policy
                .check_http(&current)
                .map_err(|r| refused(&current, r))?;
            let response = agent(checked.addrs)
                .get(current.as_str())
                .call()
                .map_err(|e| ImageError::Http {
                    url: current.to_string(),
                    source: Box::new(e),
                })?;
            if response.status().is_redirection() {
                if redirects >= self.policy.max_redirects {
                    return Err(refused(
                        &current,
                        Refusal::TooManyRedirects(self.policy.max_redirects),
                    ));
                }
                redirects += 1;
                let next = response
                    .headers()
                    .get("location")
                    .and_then(|l| l.to_str().ok())
                    .and_then(|l| current.join(l).ok())
                    .ok_or_else(|| refused(&current, Refusal::BadRedirect))?;
                tracing::debug!(from = %current, to = %next, "image download redirected");
                current = next;
                continue;
            }
            return self.body(&current, response);
        }
    }

    /// A response's body, refused early when its declared length is over the limit.
    fn body(
        &self,
        url: &url::Url,
        response: ureq::http::Response<ureq::Body>,
    ) -> Result<Box<dyn Read>, ImageError> {
        let length = response
            .headers()
            .get("content-length")
            .and_then(|l| l.to_str().ok())
            .and_then(|l| l.parse::<u64>().ok());
        if length.is_some_and(|l| l > self.policy.max_bytes) {
            return Err(ImageError::TooLarge {
                url: url.to_string(),
                limit: self.policy.max_bytes,
            });
        }
        Ok(Box::new(response.into_body().into_reader()))
    }

    /// The body of the object at `url` of the cloud's object store, read with `token`; no
    /// redirect is followed.
    fn open_object(&self, url: &url::Url, token: &str) -> Result<Box<dyn Read>, ImageError> {
        let response = store::agent()
            .get(url.as_str())
            .header("x-auth-token", token)
            .call()
            .map_err(|e| ImageError::Http {
                url: url.to_string(),
                source: Box::new(e),
            })?;
        let code = response.status().as_u16();
        if code != 200 {
            return Err(ImageError::ObjectStatus {
                url: url.to_string(),
                code,
            });
        }
        self.body(url, response)
    }

    /// The data at `source` (named `url`).
    fn open(&self, url: &str, source: &Source) -> Result<Box<dyn Read>, ImageError> {
        Ok(match source {
            Source::File(path) => {
                Box::new(File::open(path).map_err(|source| ImageError::Read {
                    url: url.to_owned(),
                    source,
                })?)
            }
            Source::Http(parsed) => self.open_http(parsed)?,
            Source::Object(parsed, token) => self.open_object(parsed, token)?,
        })
    }

    /// Streams the source into a temporary file while hashing it, checks the digest, inspects
    /// the data and renames the file to its content name.
    fn download(
        &self,
        dir: &Path,
        req: &Request<'_>,
        mut reader: Box<dyn Read>,
        expected: Option<&str>,
    ) -> Result<CachedImage, ImageError> {
        let url = req.url;

        let mut tmp = tempfile::Builder::new()
            .prefix(".tmp-")
            .tempfile_in(dir)
            .map_err(io_error("create a temporary file in", dir))?;
        let tmp_path = tmp.path().to_owned();
        // `tmp` is removed when dropped, on every early return below.
        let (actual, size) = copy_hashing(
            &mut reader,
            tmp.as_file_mut(),
            url,
            &tmp_path,
            self.policy.max_bytes,
        )?;
        if let Some(expected) = expected
            && expected != actual
        {
            return Err(ImageError::ChecksumMismatch {
                expected: expected.to_owned(),
                actual,
            });
        }
        let file = tmp.as_file();
        file.sync_all().map_err(io_error("sync", tmp.path()))?;
        inspect::inspect(&tmp_path, req.format, self.policy.max_virtual_size)?;
        // A tenant's private image is nobody else's to read. QEMU reads it as root (the node's
        // libvirtd runs QEMU as root, scripts/libvirtd.sh); a node that runs QEMU as another
        // user relies on libvirt's DAC labelling of the pinned backing store.
        file.set_permissions(Permissions::from_mode(0o600))
            .map_err(io_error("chmod", tmp.path()))?;
        let path = dir.join(content_name(req.format, &actual));
        tmp.persist(&path).map_err(|e| ImageError::Io {
            op: "move into place",
            path: path.clone(),
            source: e.error,
        })?;
        Ok(CachedImage {
            path,
            sha256: actual,
            size,
        })
    }
}

/// An HTTP client that connects only to `addrs`, follows no redirect itself and ignores proxy
/// settings (a proxy would resolve names the policy never saw).
fn agent(addrs: Vec<SocketAddr>) -> ureq::Agent {
    let config = ureq::Agent::config_builder()
        .timeout_connect(Some(CONNECT_TIMEOUT))
        .timeout_recv_response(Some(CONNECT_TIMEOUT))
        .timeout_per_read(Some(READ_TIMEOUT))
        .timeout_global(Some(DOWNLOAD_DEADLINE))
        .max_redirects(0)
        .proxy(None)
        .user_agent(concat!("stratus/", env!("CARGO_PKG_VERSION")))
        .build();
    ureq::Agent::with_parts(
        config,
        ureq::unversioned::transport::DefaultConnector::new(),
        Pinned(addrs),
    )
}

/// The cached image under `key` (a content or URL index name) in `dir`, if present.
fn lookup(dir: &Path, format: Format, key: &str) -> Result<Option<CachedImage>, ImageError> {
    let content_prefix = format!("{}-sha256-", format.name());
    let digest = match key.strip_prefix(&content_prefix) {
        Some(digest) => digest.to_owned(),
        None => {
            let index = dir.join(key);
            match std::fs::read_to_string(&index) {
                Ok(text) => match normalise_checksum(text.trim()) {
                    Ok(digest) => digest,
                    // Not written by us; fetch again and overwrite it.
                    Err(_) => return Ok(None),
                },
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(io_error("read", &index)(e)),
            }
        }
    };
    let path = dir.join(content_name(format, &digest));
    match std::fs::metadata(&path) {
        Ok(meta) if meta.is_file() => Ok(Some(CachedImage {
            path,
            sha256: digest,
            size: meta.len(),
        })),
        Ok(_) => Ok(None),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_error("stat", &path)(e)),
    }
}

/// The directory of an Image's pins (see [`ImageCache::pin`]).
const USERS: &str = ".users";
/// The prefix of an Image's entries being removed.
const TRASH: &str = ".trash-";

/// Refuses a uid that is not usable as a directory name.
fn check_uid(uid: &str) -> Result<(), ImageError> {
    if uid.is_empty()
        || uid.len() > MAX_UID_LEN
        || !uid.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    {
        return Err(ImageError::InvalidUid(uid.to_owned()));
    }
    Ok(())
}

/// The lock file of an Image's pins (not locked yet).
fn dir_lock(dir: &Path) -> Result<File, ImageError> {
    let path = dir.join(".lock");
    OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(io_error("open", &path))
}

/// Takes `file`'s exclusive lock if nobody holds it; whether it did.
fn try_lock(file: &File, path: &Path) -> Result<bool, ImageError> {
    match file.try_lock() {
        Ok(()) => Ok(true),
        Err(std::fs::TryLockError::WouldBlock) => Ok(false),
        Err(std::fs::TryLockError::Error(e)) => Err(io_error("lock", path)(e)),
    }
}

/// Removes a directory tree; an absent one is removed already.
fn remove_tree(path: &Path) -> Result<(), ImageError> {
    match std::fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_error("remove", path)(e)),
    }
}

/// Holds the entry's lock until dropped.
fn lock(dir: &Path, key: &str) -> Result<File, ImageError> {
    let path = dir.join(format!(".lock-{key}"));
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(io_error("open", &path))?;
    file.lock().map_err(io_error("lock", &path))?;
    Ok(file)
}

/// Records that the URL behind `key` served `digest`.
fn write_index(dir: &Path, key: &str, digest: &str) -> Result<(), ImageError> {
    let path = dir.join(key);
    let mut tmp = tempfile::Builder::new()
        .prefix(".tmp-")
        .tempfile_in(dir)
        .map_err(io_error("create a temporary file in", dir))?;
    tmp.write_all(digest.as_bytes())
        .and_then(|()| tmp.as_file().sync_all())
        .map_err(io_error("write", tmp.path()))?;
    tmp.persist(&path).map_err(|e| ImageError::Io {
        op: "move into place",
        path: path.clone(),
        source: e.error,
    })?;
    Ok(())
}

/// The digest in lowercase, if it is 64 hex digits; it becomes part of a file name.
fn normalise_checksum(digest: &str) -> Result<String, ImageError> {
    if digest.len() == SHA256_HEX_LEN && digest.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(digest.to_ascii_lowercase())
    } else {
        Err(ImageError::InvalidChecksum(digest.to_owned()))
    }
}

fn content_name(format: Format, digest: &str) -> String {
    format!("{}-sha256-{digest}", format.name())
}

/// The name of an Image's entry: its content's, by the expected digest, or else the index
/// of `index` (its URL, or [`object_index`]).
fn entry_name(format: Format, expected: Option<&str>, index: &str) -> String {
    match expected {
        Some(digest) => content_name(format, digest),
        None => url_index_name(format, index),
    }
}

/// The name the data of Image `uid` with `source` is indexed under when it has no expected
/// checksum: its URL, its object (see [`object_index`]), or for an uploaded image its uid
/// (such an Image is fetched with the checksum its upload recorded, so this is a fallback).
pub fn source_index(uid: &str, source: &ImageSource) -> Option<String> {
    match (&source.swift, &source.url, &source.upload) {
        (Some(swift), _, _) => Some(object_index(&swift.container, &swift.object)),
        (None, Some(url), _) => Some(url.clone()),
        (None, None, Some(_)) => Some(format!("upload:{uid}")),
        (None, None, None) => None,
    }
}

/// What names an object of the object store in the index: not its URL, which holds the
/// account URL the token came with, so that a hit is found before any token is asked for.
fn object_index(container: &str, object: &str) -> String {
    format!("swift:{container}/{object}")
}

fn url_index_name(format: Format, url: &str) -> String {
    format!(
        "{}-url-{}",
        format.name(),
        hex(ring::digest::digest(&SHA256, url.as_bytes()).as_ref())
    )
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    out
}

/// Copies at most `limit` bytes of `reader` into `out`, returning the SHA-256 (hex) and
/// length of what passed.
fn copy_hashing(
    reader: &mut dyn Read,
    out: &mut File,
    url: &str,
    out_path: &Path,
    limit: u64,
) -> Result<(String, u64), ImageError> {
    let mut context = Context::new(&SHA256);
    let mut buf = vec![0u8; CHUNK];
    let mut size: u64 = 0;
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(source) => {
                return Err(ImageError::Read {
                    url: url.to_owned(),
                    source,
                });
            }
        };
        size += n as u64;
        if size > limit {
            return Err(ImageError::TooLarge {
                url: url.to_owned(),
                limit,
            });
        }
        let chunk = &buf[..n];
        context.update(chunk);
        out.write_all(chunk).map_err(io_error("write", out_path))?;
    }
    Ok((hex(context.finish().as_ref()), size))
}

fn sync_dir(dir: &Path) -> Result<(), ImageError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_error("sync", dir))
}

#[cfg(test)]
mod tests {
    use std::io::{BufRead, BufReader};
    use std::net::TcpListener;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    const BODY: &[u8] = b"not really a disk image, but bytes are bytes\n\0\x01\x02";
    const UID: &str = "5b1c9f51-9d0e-4a53-9a34-0f6b1d2c3e4f";
    const OTHER_UID: &str = "0d7e2a4c-1111-4a53-9a34-0f6b1d2c3e4f";

    fn sha256_hex(data: &[u8]) -> String {
        hex(ring::digest::digest(&SHA256, data).as_ref())
    }

    fn file_url(path: &Path) -> String {
        url::Url::from_file_path(path)
            .expect("absolute path")
            .to_string()
    }

    fn raw<'a>(uid: &'a str, url: &'a str, sha256: Option<&'a str>) -> Request<'a> {
        Request {
            uid,
            url,
            sha256,
            format: Format::Raw,
        }
    }

    /// A policy for tests that fetch local files and serve HTTP on loopback.
    fn local() -> Policy {
        Policy {
            allow_file: true,
            allow_loopback: true,
            ..Policy::default()
        }
    }

    /// Files under the cache directory (relative paths) that are not lock files.
    fn entries(dir: &Path) -> Vec<String> {
        let mut names = Vec::new();
        let mut todo = vec![dir.to_path_buf()];
        while let Some(d) = todo.pop() {
            let Ok(list) = std::fs::read_dir(&d) else {
                continue;
            };
            for e in list {
                let e = e.expect("entry");
                if e.file_type().expect("type").is_dir() {
                    todo.push(e.path());
                } else if !e.file_name().to_string_lossy().starts_with(".lock-") {
                    let rel = e.path().strip_prefix(dir).expect("inside").to_owned();
                    names.push(rel.to_string_lossy().into_owned());
                }
            }
        }
        names.sort();
        names
    }

    /// A small HTTP server on 127.0.0.1: `/image` is `BODY`; `/hop/N` redirects to
    /// `/hop/N-1` and `/hop/0` to `/image`; `/away` redirects to `away`; `/big` streams 1 MiB
    /// without a length; anything else is 404. Returns its base URL and a count of requests.
    fn serve(away: Option<String>) -> (String, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("address");
        let hits = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&hits);
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let mut request_line = String::new();
                let mut reader = BufReader::new(match stream.try_clone() {
                    Ok(s) => s,
                    Err(_) => continue,
                });
                if reader.read_line(&mut request_line).is_err() {
                    continue;
                }
                // Drain the headers.
                let mut line = String::new();
                while reader.read_line(&mut line).is_ok_and(|n| n > 2) {
                    line.clear();
                }
                counter.fetch_add(1, Ordering::SeqCst);
                let path = request_line.split_whitespace().nth(1).unwrap_or("");
                let redirect = |to: &str| {
                    format!(
                        "HTTP/1.1 302 Found\r\nLocation: {to}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                    )
                };
                let (head, body): (String, Vec<u8>) = if path == "/image" {
                    // Slow enough that concurrent fetches overlap.
                    std::thread::sleep(Duration::from_millis(200));
                    (
                        format!(
                            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                            BODY.len()
                        ),
                        BODY.to_vec(),
                    )
                } else if let Some(n) = path.strip_prefix("/hop/") {
                    match n.parse::<u32>() {
                        Ok(0) => (redirect("/image"), Vec::new()),
                        Ok(n) => (redirect(&format!("/hop/{}", n - 1)), Vec::new()),
                        Err(_) => (redirect("/image"), Vec::new()),
                    }
                } else if path == "/away" && away.is_some() {
                    (redirect(away.as_deref().unwrap_or_default()), Vec::new())
                } else if path == "/big" {
                    (
                        "HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n".to_owned(),
                        vec![0u8; 1 << 20],
                    )
                } else {
                    (
                        "HTTP/1.1 404 Not Found\r\nContent-Length: 14\r\nConnection: close\r\n\r\n"
                            .to_owned(),
                        b"no such image\n".to_vec(),
                    )
                };
                let _ = stream.write_all(head.as_bytes());
                let _ = stream.write_all(&body);
            }
        });
        (format!("http://{addr}"), hits)
    }

    #[test]
    fn file_url_is_copied_once_and_then_a_hit() {
        let src_dir = tempfile::tempdir().expect("tempdir");
        let src = src_dir.path().join("my image (1).raw");
        std::fs::write(&src, BODY).expect("write source");
        let cache_dir = tempfile::tempdir().expect("tempdir");
        let cache = ImageCache::new(cache_dir.path().join("images"), local());
        let url = file_url(&src);
        let digest = sha256_hex(BODY);

        let first = cache.fetch(&raw(UID, &url, Some(&digest))).expect("fetch");
        assert_eq!(first.sha256, digest);
        assert_eq!(first.size, BODY.len() as u64);
        assert_eq!(std::fs::read(&first.path).expect("read cached"), BODY);
        assert_eq!(
            first.path,
            cache.dir().join(UID).join(format!("raw-sha256-{digest}"))
        );
        let mode = std::fs::metadata(&first.path)
            .expect("stat")
            .permissions()
            .mode();
        assert_eq!(
            mode & 0o777,
            0o600,
            "a cached image is readable by its owner only"
        );

        // The source is gone: only a cache hit can answer now.
        std::fs::remove_file(&src).expect("remove source");
        let upper = digest.to_ascii_uppercase();
        let again = cache
            .fetch(&raw(UID, &url, Some(&upper)))
            .expect("cache hit");
        assert_eq!(again, first);
        assert_eq!(entries(cache.dir()), [format!("{UID}/raw-sha256-{digest}")]);
    }

    #[test]
    fn an_image_is_swept_once_none_of_its_users_is_left() {
        let src_dir = tempfile::tempdir().expect("tempdir");
        let src = src_dir.path().join("image.raw");
        std::fs::write(&src, BODY).expect("write source");
        let cache_dir = tempfile::tempdir().expect("tempdir");
        let cache = ImageCache::new(cache_dir.path().join("images"), local());
        let url = file_url(&src);
        let digest = sha256_hex(BODY);
        assert_eq!(cache.sweep(|_| false).expect("sweep"), Vec::<String>::new());

        // Image UID used by servers s1 and s2; image OTHER_UID fetched but never pinned.
        cache.pin(UID, "s1").expect("pin");
        cache.pin(UID, "s2").expect("pin");
        let used = cache.fetch(&raw(UID, &url, Some(&digest))).expect("fetch");
        let unpinned = cache
            .fetch(&raw(OTHER_UID, &url, Some(&digest)))
            .expect("fetch");
        assert!(cache.sweep(|u| u == "s2").expect("sweep").is_empty());
        assert!(used.path.is_file(), "s2 still uses it");
        assert!(
            !cache.dir().join(UID).join(".users/s1").exists(),
            "s1's pin went"
        );

        // A fetch under way (holding its entry's lock) keeps it too.
        let busy = lock(&cache.dir().join(UID), "raw-sha256-x").expect("lock");
        assert!(cache.sweep(|_| false).expect("sweep").is_empty());
        assert!(used.path.is_file());
        drop(busy);

        assert_eq!(cache.sweep(|_| false).expect("sweep"), [UID]);
        assert!(!cache.dir().join(UID).exists(), "its entries are gone");
        assert!(unpinned.path.is_file(), "never pinned: kept");
        let left: Vec<String> = std::fs::read_dir(cache.dir())
            .expect("read")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(left, [OTHER_UID], "no trash left behind");

        // Used again: fetched afresh.
        std::fs::remove_file(&src).expect("remove source");
        cache.pin(UID, "s3").expect("pin");
        assert!(
            cache.fetch(&raw(UID, &url, Some(&digest))).is_err(),
            "not cached"
        );
        for bad in ["", "../x", "a/b"] {
            assert!(matches!(
                cache.pin(UID, bad),
                Err(ImageError::InvalidUid(_))
            ));
        }
    }

    #[test]
    fn knowing_a_digest_gets_nobody_another_images_data() {
        let src_dir = tempfile::tempdir().expect("tempdir");
        let src = src_dir.path().join("private.raw");
        std::fs::write(&src, BODY).expect("write source");
        let cache_dir = tempfile::tempdir().expect("tempdir");
        let cache = ImageCache::new(cache_dir.path().to_owned(), local());
        let digest = sha256_hex(BODY);
        cache
            .fetch(&raw(UID, &file_url(&src), Some(&digest)))
            .expect("the owner's fetch");

        // Another Image with the same digest and a URL that serves something else.
        let (base, hits) = serve(None);
        let other_url = format!("{base}/missing");
        let got = cache.fetch(&raw(OTHER_UID, &other_url, Some(&digest)));
        assert!(
            matches!(&got, Err(ImageError::Http { source, .. })
                if matches!(**source, ureq::Error::StatusCode(404))),
            "{got:?}"
        );
        assert_eq!(
            hits.load(Ordering::SeqCst),
            1,
            "it had to fetch its own URL"
        );
        // The same bytes from its own URL: fetched and verified again, not shared.
        let own = src_dir.path().join("copy.raw");
        std::fs::write(&own, BODY).expect("write copy");
        let second = cache
            .fetch(&raw(OTHER_UID, &file_url(&own), Some(&digest)))
            .expect("its own fetch");
        assert_eq!(
            second.path,
            cache
                .dir()
                .join(OTHER_UID)
                .join(format!("raw-sha256-{digest}"))
        );
        // The same Image declared as another format is inspected again.
        std::fs::remove_file(&own).expect("remove copy");
        let as_kernel = cache.fetch(&Request {
            format: Format::Kernel,
            ..raw(OTHER_UID, &file_url(&own), Some(&digest))
        });
        assert!(
            matches!(as_kernel, Err(ImageError::Read { .. })),
            "{as_kernel:?}"
        );
    }

    #[test]
    fn fetch_without_checksum_is_keyed_by_url() {
        let src_dir = tempfile::tempdir().expect("tempdir");
        let src = src_dir.path().join("image.raw");
        std::fs::write(&src, BODY).expect("write source");
        let cache_dir = tempfile::tempdir().expect("tempdir");
        let cache = ImageCache::new(cache_dir.path().to_owned(), local());
        let url = file_url(&src);

        let first = cache.fetch(&raw(UID, &url, None)).expect("fetch");
        assert_eq!(first.sha256, sha256_hex(BODY));
        std::fs::remove_file(&src).expect("remove source");
        assert_eq!(
            cache.fetch(&raw(UID, &url, None)).expect("cache hit"),
            first
        );
        assert_eq!(entries(cache.dir()).len(), 2, "content and URL index");
        // Another Image of the same URL does not get it.
        assert!(matches!(
            cache.fetch(&raw(OTHER_UID, &url, None)),
            Err(ImageError::Read { .. })
        ));
    }

    #[test]
    fn checksum_mismatch_leaves_nothing_cached() {
        let src_dir = tempfile::tempdir().expect("tempdir");
        let src = src_dir.path().join("image.raw");
        std::fs::write(&src, BODY).expect("write source");
        let cache_dir = tempfile::tempdir().expect("tempdir");
        let cache = ImageCache::new(cache_dir.path().to_owned(), local());
        let wrong = "0".repeat(64);

        match cache.fetch(&raw(UID, &file_url(&src), Some(&wrong))) {
            Err(e @ ImageError::ChecksumMismatch { .. }) => {
                assert!(e.is_final());
                let ImageError::ChecksumMismatch { expected, actual } = e else {
                    unreachable!()
                };
                assert_eq!(expected, wrong);
                assert_eq!(actual, sha256_hex(BODY));
            }
            other => panic!("expected a mismatch, got {other:?}"),
        }
        assert!(
            entries(cache.dir()).is_empty(),
            "{:?}",
            entries(cache.dir())
        );
    }

    #[test]
    fn hostile_data_is_refused_and_never_cached() {
        let src_dir = tempfile::tempdir().expect("tempdir");
        let src = src_dir.path().join("hostile.qcow2");
        let out = std::process::Command::new("qemu-img")
            .args([
                "create",
                "-q",
                "-f",
                "qcow2",
                "-F",
                "raw",
                "-b",
                "/etc/passwd",
            ])
            .arg(&src)
            .arg("1M")
            .output()
            .expect("run qemu-img");
        assert!(out.status.success(), "{out:?}");
        let cache_dir = tempfile::tempdir().expect("tempdir");
        let cache = ImageCache::new(cache_dir.path().to_owned(), local());
        let url = file_url(&src);
        for _ in 0..2 {
            let got = cache.fetch(&Request {
                format: Format::Qcow2,
                ..raw(UID, &url, None)
            });
            match got {
                Err(ref e @ ImageError::Unsafe(Unsafe::BackingFile(ref name))) => {
                    assert_eq!(name, "/etc/passwd");
                    assert!(e.is_final());
                }
                other => panic!("expected a refusal, got {other:?}"),
            }
            assert!(
                entries(cache.dir()).is_empty(),
                "{:?}",
                entries(cache.dir())
            );
        }
        // A qcow2 kernel is refused too.
        let kernel = cache.fetch(&Request {
            format: Format::Kernel,
            ..raw(UID, &url, None)
        });
        assert!(
            matches!(&kernel, Err(ImageError::Unsafe(Unsafe::FormatMismatch { found, .. })) if found == "qcow2"),
            "{kernel:?}"
        );
    }

    #[test]
    fn bad_input_is_rejected_before_any_io() {
        let cache_dir = tempfile::tempdir().expect("tempdir");
        let cache = ImageCache::new(cache_dir.path().join("never-created"), local());
        assert!(matches!(
            cache.fetch(&raw(UID, "file:///x", Some("../../etc/passwd"))),
            Err(ImageError::InvalidChecksum(_))
        ));
        assert!(matches!(
            cache.fetch(&raw(UID, "file:///x", Some(&"g".repeat(64)))),
            Err(ImageError::InvalidChecksum(_))
        ));
        for uid in ["", "../x", "a/b", &"a".repeat(129)] {
            assert!(
                matches!(
                    cache.fetch(&raw(uid, "file:///x", None)),
                    Err(ImageError::InvalidUid(_))
                ),
                "{uid:?}"
            );
        }
        assert!(matches!(
            cache.fetch(&raw(UID, "ftp://host/x", None)),
            Err(ImageError::Refused { reason: Refusal::Scheme(s), .. }) if s == "ftp"
        ));
        assert!(matches!(
            cache.fetch(&raw(UID, "not a url", None)),
            Err(ImageError::InvalidUrl { .. })
        ));
        assert!(matches!(
            cache.fetch(&raw(UID, "file://otherhost/x", None)),
            Err(ImageError::NotALocalPath(_))
        ));
        // file: URLs only where the operator allows them.
        let strict = ImageCache::new(cache_dir.path().join("never-created"), Policy::default());
        assert!(matches!(
            strict.fetch(&raw(UID, "file:///etc/passwd", None)),
            Err(ImageError::Refused { reason: Refusal::Scheme(s), .. }) if s == "file"
        ));
        assert!(!cache.dir().exists());
    }

    #[test]
    fn http_download_verifies_and_caches() {
        let (base, hits) = serve(None);
        let cache_dir = tempfile::tempdir().expect("tempdir");
        let cache = ImageCache::new(cache_dir.path().to_owned(), local());
        let url = format!("{base}/image");
        let digest = sha256_hex(BODY);

        let first = cache
            .fetch(&raw(UID, &url, Some(&digest)))
            .expect("download");
        assert_eq!(first.size, BODY.len() as u64);
        assert_eq!(std::fs::read(&first.path).expect("read"), BODY);
        assert_eq!(hits.load(Ordering::SeqCst), 1);
        assert_eq!(
            cache.fetch(&raw(UID, &url, Some(&digest))).expect("hit"),
            first
        );
        assert_eq!(
            hits.load(Ordering::SeqCst),
            1,
            "second fetch must not download"
        );

        let missing_url = format!("{base}/missing");
        let missing = cache.fetch(&raw(UID, &missing_url, None));
        assert!(
            matches!(&missing, Err(ImageError::Http { source, .. })
                if matches!(**source, ureq::Error::StatusCode(404))),
            "{missing:?}"
        );
        assert_eq!(entries(cache.dir()), [format!("{UID}/raw-sha256-{digest}")]);
    }

    #[test]
    fn loopback_is_refused_by_default_and_allowed_by_the_operator() {
        let (base, hits) = serve(None);
        let url = format!("{base}/image");
        let cache_dir = tempfile::tempdir().expect("tempdir");
        let strict = ImageCache::new(cache_dir.path().to_owned(), Policy::default());
        let got = strict.fetch(&raw(UID, &url, None));
        assert!(
            matches!(
                &got,
                Err(ImageError::Refused {
                    reason: Refusal::Address {
                        class: AddressClass::Loopback,
                        ..
                    },
                    ..
                })
            ),
            "{got:?}"
        );
        assert_eq!(hits.load(Ordering::SeqCst), 0, "nothing was requested");

        let host = base.trim_start_matches("http://");
        let named = ImageCache::new(
            cache_dir.path().to_owned(),
            Policy {
                allow_hosts: vec![host.parse().expect("host rule")],
                ..Policy::default()
            },
        );
        named.fetch(&raw(UID, &url, None)).expect("the named host");
        assert_eq!(hits.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn every_redirect_hop_is_checked() {
        // The target: loopback too, on another port the policy does not name.
        let (target, target_hits) = serve(None);
        let (base, hits) = serve(Some(format!("{target}/image")));
        let host = base.trim_start_matches("http://");
        let policy = Policy {
            allow_hosts: vec![host.parse().expect("host rule")],
            ..Policy::default()
        };
        let cache_dir = tempfile::tempdir().expect("tempdir");
        let cache = ImageCache::new(cache_dir.path().to_owned(), policy);
        let away = format!("{base}/away");
        let got = cache.fetch(&raw(UID, &away, None));
        match &got {
            Err(ImageError::Refused {
                url,
                reason:
                    Refusal::Address {
                        class: AddressClass::Loopback,
                        ..
                    },
            }) => {
                assert_eq!(url, &format!("{target}/image"));
            }
            other => panic!("expected the redirect refused, got {other:?}"),
        }
        assert_eq!(hits.load(Ordering::SeqCst), 1);
        assert_eq!(
            target_hits.load(Ordering::SeqCst),
            0,
            "the target was never asked"
        );

        // Redirects within the limit are followed; one more is refused.
        let three = format!("{base}/hop/2");
        let image = cache
            .fetch(&raw(UID, &three, None))
            .expect("three redirects");
        assert_eq!(image.sha256, sha256_hex(BODY));
        let four = format!("{base}/hop/3");
        assert!(matches!(
            cache.fetch(&raw(UID, &four, None)),
            Err(ImageError::Refused {
                reason: Refusal::TooManyRedirects(3),
                ..
            })
        ));
    }

    #[test]
    fn a_too_large_download_is_cut_and_removed() {
        let (base, _) = serve(None);
        let cache_dir = tempfile::tempdir().expect("tempdir");
        let policy = Policy {
            max_bytes: 64 * 1024,
            ..local()
        };
        let cache = ImageCache::new(cache_dir.path().to_owned(), policy);
        // No Content-Length: cut while streaming.
        let big = format!("{base}/big");
        let got = cache.fetch(&raw(UID, &big, None));
        assert!(
            matches!(&got, Err(e @ ImageError::TooLarge { limit: 65536, .. }) if e.is_final()),
            "{got:?}"
        );
        assert!(
            entries(cache.dir()).is_empty(),
            "{:?}",
            entries(cache.dir())
        );
        // A Content-Length over the limit is refused before the body is read.
        let small = ImageCache::new(
            cache_dir.path().to_owned(),
            Policy {
                max_bytes: 10,
                ..local()
            },
        );
        let image = format!("{base}/image");
        assert!(matches!(
            small.fetch(&raw(UID, &image, None)),
            Err(ImageError::TooLarge { limit: 10, .. })
        ));
        // A local file over the limit is cut too.
        let src_dir = tempfile::tempdir().expect("tempdir");
        let src = src_dir.path().join("big.raw");
        std::fs::write(&src, vec![1u8; 65537]).expect("write");
        assert!(matches!(
            cache.fetch(&raw(UID, &file_url(&src), None)),
            Err(ImageError::TooLarge { .. })
        ));
        assert!(
            entries(cache.dir()).is_empty(),
            "{:?}",
            entries(cache.dir())
        );
    }

    #[test]
    fn concurrent_fetches_download_once() {
        let (base, hits) = serve(None);
        let cache_dir = tempfile::tempdir().expect("tempdir");
        let cache = Arc::new(ImageCache::new(cache_dir.path().to_owned(), local()));
        let url = format!("{base}/image");

        let results: Vec<CachedImage> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..4)
                .map(|_| s.spawn(|| cache.fetch(&raw(UID, &url, None))))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("thread").expect("fetch"))
                .collect()
        });
        assert!(results.iter().all(|r| *r == results[0]));
        assert_eq!(results[0].sha256, sha256_hex(BODY));
        assert_eq!(hits.load(Ordering::SeqCst), 1);
        assert_eq!(entries(cache.dir()).len(), 2, "content and URL index");
    }

    /// An object store on 127.0.0.1 with one object, `/v1/AUTH_p/images/a%20b/disk.raw`
    /// (`BODY`), read with token `good`; another token is 403, another path 404. Returns its
    /// account URL and the request lines it saw (with the token header, if any, appended).
    fn object_store() -> (String, Arc<std::sync::Mutex<Vec<String>>>) {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("address");
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let log = Arc::clone(&seen);
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let Ok(clone) = stream.try_clone() else {
                    continue;
                };
                let mut reader = BufReader::new(clone);
                let mut request_line = String::new();
                if reader.read_line(&mut request_line).is_err() {
                    continue;
                }
                let mut token = None;
                let mut line = String::new();
                while reader.read_line(&mut line).is_ok_and(|n| n > 2) {
                    if let Some((k, v)) = line.split_once(':')
                        && k.eq_ignore_ascii_case("x-auth-token")
                    {
                        token = Some(v.trim().to_owned());
                    }
                    line.clear();
                }
                let path = request_line
                    .split_whitespace()
                    .nth(1)
                    .unwrap_or("")
                    .to_owned();
                log.lock().expect("log").push(format!("{path} {token:?}"));
                let (status, body): (&str, &[u8]) = match (path.as_str(), token.as_deref()) {
                    (_, t) if t != Some("good") => ("403 Forbidden", b""),
                    ("/v1/AUTH_p/images/a%20b/disk.raw", _) => ("200 OK", BODY),
                    _ => ("404 Not Found", b""),
                };
                let head = format!(
                    "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = stream.write_all(head.as_bytes());
                let _ = stream.write_all(body);
            }
        });
        (format!("http://{addr}/v1/AUTH_p"), seen)
    }

    #[test]
    fn an_object_is_read_with_its_token_in_a_header_and_checked_as_a_url_is() {
        let (account, seen) = object_store();
        let cache_dir = tempfile::tempdir().expect("tempdir");
        // The default policy refuses loopback URLs: the object store's address is the
        // operator's, not a tenant's, and is not checked by it.
        let cache = ImageCache::new(cache_dir.path().to_owned(), Policy::default());
        let object = |container, object, token| ObjectSource {
            account_url: &account,
            container,
            object,
            token,
        };
        let sum = sha256_hex(BODY);
        let got = cache
            .fetch_object(
                UID,
                &object("images", "a b/disk.raw", "good"),
                Some(&sum),
                Format::Raw,
            )
            .expect("fetch");
        assert_eq!(std::fs::read(&got.path).expect("read"), BODY);
        // A wrong token and a missing object say which.
        let refused = cache
            .fetch_object(
                OTHER_UID,
                &object("images", "a b/disk.raw", "bad"),
                None,
                Format::Raw,
            )
            .expect_err("a wrong token");
        assert!(
            matches!(refused, ImageError::ObjectStatus { code: 403, .. }),
            "{refused:?}"
        );
        let missing = cache
            .fetch_object(
                OTHER_UID,
                &object("images", "nothing", "good"),
                None,
                Format::Raw,
            )
            .expect_err("no such object");
        assert!(
            matches!(missing, ImageError::ObjectStatus { code: 404, .. }),
            "{missing:?}"
        );
        // A checksum that does not match leaves nothing.
        let wrong = cache
            .fetch_object(
                OTHER_UID,
                &object("images", "a b/disk.raw", "good"),
                Some(&"0".repeat(64)),
                Format::Raw,
            )
            .expect_err("wrong checksum");
        assert!(
            matches!(wrong, ImageError::ChecksumMismatch { .. }),
            "{wrong:?}"
        );
        assert!(
            !cache
                .dir()
                .join(OTHER_UID)
                .read_dir()
                .is_ok_and(|mut d| d.any(|e| {
                    e.is_ok_and(|e| e.file_name().to_string_lossy().starts_with("raw-sha256"))
                }))
        );
        // The token went in the header only, never in a URL.
        let seen = seen.lock().expect("log").clone();
        assert!(
            seen.iter()
                .all(|l| !l.split(' ').next().unwrap_or("").contains("good"))
        );
        assert!(seen[0].ends_with("Some(\"good\")"), "{seen:?}");
        // A name cannot climb out of its container, or its account.
        for (c, o) in [
            ("..", "x"),
            ("images", "../../AUTH_q/c/o"),
            ("images", "a//b"),
        ] {
            let e = object(c, o, "good").url().expect_err("refused");
            assert!(matches!(e, ImageError::ObjectName { .. }), "{e:?}");
        }
        let url = object("a?b", "c#d/%2e%2e", "good").url().expect("escaped");
        assert_eq!(url.path(), "/v1/AUTH_p/a%3Fb/c%23d/%252e%252e");
    }

    #[test]
    fn a_cached_object_is_found_without_its_token_or_the_object_store() {
        let (account, seen) = object_store();
        let cache_dir = tempfile::tempdir().expect("tempdir");
        let cache = ImageCache::new(cache_dir.path().to_owned(), Policy::default());
        let source = |object: &str| ImageSource {
            url: None,
            swift: Some(stratus_api_types::image::SwiftObject {
                container: "images".into(),
                object: object.into(),
            }),
            upload: None,
        };
        let disk = source("a b/disk.raw");
        let sum = sha256_hex(BODY);
        for expected in [None, Some(sum.as_str())] {
            let miss = cache.cached(UID, &disk, expected, Format::Raw);
            assert_eq!(miss.expect("a lookup"), None, "nothing fetched yet");
        }
        let got = cache
            .fetch_object(
                UID,
                &ObjectSource {
                    account_url: &account,
                    container: "images",
                    object: "a b/disk.raw",
                    token: "good",
                },
                None,
                Format::Raw,
            )
            .expect("fetch");
        // Found by the Image's source alone (with or without its checksum), as the fetch
        // would answer it, and the object store is not asked again.
        for expected in [None, Some(sum.as_str())] {
            let hit = cache.cached(UID, &disk, expected, Format::Raw);
            assert_eq!(hit.expect("a lookup").as_ref(), Some(&got));
        }
        assert_eq!(seen.lock().expect("log").len(), 1);
        // Another object, another Image, another format or checksum: a miss.
        let misses = [
            cache.cached(UID, &source("disk.raw"), None, Format::Raw),
            cache.cached(OTHER_UID, &disk, None, Format::Raw),
            cache.cached(UID, &disk, None, Format::Qcow2),
            cache.cached(UID, &disk, Some(&"0".repeat(64)), Format::Raw),
        ];
        for miss in misses {
            assert_eq!(miss.expect("a lookup"), None);
        }
    }

    #[test]
    fn an_object_over_the_size_limit_is_refused() {
        let (account, _) = object_store();
        let cache_dir = tempfile::tempdir().expect("tempdir");
        let policy = Policy {
            max_bytes: 8,
            ..Policy::default()
        };
        let cache = ImageCache::new(cache_dir.path().to_owned(), policy);
        let source = ObjectSource {
            account_url: &account,
            container: "images",
            object: "a b/disk.raw",
            token: "good",
        };
        let e = cache
            .fetch_object(UID, &source, None, Format::Raw)
            .expect_err("too large");
        assert!(matches!(e, ImageError::TooLarge { limit: 8, .. }), "{e:?}");
        assert!(
            entries(cache.dir()).is_empty(),
            "{:?}",
            entries(cache.dir())
        );
    }
}
