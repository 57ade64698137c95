//! An image cache: each image downloaded once, verified by SHA-256, shared by its users (the
//! image controller, and on every node the guests).
//!
//! # Layout
//!
//! - `sha256-<hex>`: an image, named by the digest of its contents. Files only get this name
//!   by an atomic rename after their digest was computed (and checked, when one was expected),
//!   so a hit is trusted without rehashing.
//! - `url-<hex of sha256(url)>`: for images fetched without an expected checksum, the digest of
//!   what that URL served, so the next fetch of the same URL is a hit. Such images are cached
//!   for good: pin images by checksum if their URL's contents may change.
//! - `.lock-<name>`: advisory locks (`flock`), one per entry, so concurrent fetches of one image
//!   (from threads or processes) download it once while other images proceed.
//! - `.tmp-*`: downloads in progress, removed when they fail.

use std::fs::{File, OpenOptions, Permissions};
use std::io::{self, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ring::digest::{Context, SHA256};

/// Length of a SHA-256 digest in hex.
const SHA256_HEX_LEN: usize = 64;
/// Read buffer for copies and downloads.
const CHUNK: usize = 256 * 1024;
/// Time allowed to connect, and for the server to start answering.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest silence tolerated while a response streams in; no limit on the whole download.
const READ_TIMEOUT: Duration = Duration::from_secs(60);

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
    /// Neither `file`, `http` nor `https`.
    #[error("unsupported image URL scheme {0:?} (file, http and https are supported)")]
    UnsupportedScheme(String),
    /// A `file:` URL that names no local path (e.g. one with a remote host).
    #[error("file URL {0:?} names no local path")]
    NotALocalPath(String),
    /// The expected checksum is not a SHA-256 digest in hex.
    #[error("expected checksum {0:?} is not 64 hex digits")]
    InvalidChecksum(String),
    /// The image's digest is not the expected one; nothing was cached.
    #[error("checksum mismatch: expected sha256 {expected}, got {actual}")]
    ChecksumMismatch {
        /// The digest asked for.
        expected: String,
        /// The digest of what was fetched.
        actual: String,
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

fn io_error<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> ImageError + 'a {
    move |source| ImageError::Io {
        op,
        path: path.to_owned(),
        source,
    }
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
    http: ureq::Agent,
}

/// Where an image comes from.
enum Source {
    File(PathBuf),
    Http,
}

impl ImageCache {
    /// A cache in `dir`, which is created on the first fetch if missing.
    pub fn new(dir: PathBuf) -> Self {
        let http = ureq::Agent::config_builder()
            .timeout_connect(Some(CONNECT_TIMEOUT))
            .timeout_recv_response(Some(CONNECT_TIMEOUT))
            .timeout_per_read(Some(READ_TIMEOUT))
            .user_agent(concat!("stratus-agent/", env!("CARGO_PKG_VERSION")))
            .build()
            .new_agent();
        Self { dir, http }
    }

    /// The cache directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The image at `url` (`file://`, `http://` or `https://`), downloading it unless cached.
    ///
    /// With `sha256`, the cache is keyed by that digest (any URL serving those bytes is a hit)
    /// and a download must match it; without, by the URL.
    ///
    /// # Guarantees
    ///
    /// Concurrent fetches of the same entry, from threads or processes, download it once; the
    /// others wait and get the cached file. A failed or mismatching download leaves nothing
    /// behind. Blocking: run it on a blocking thread.
    ///
    /// # Errors
    ///
    /// [`ImageError::ChecksumMismatch`] when the bytes are not the expected ones; the other
    /// variants for bad input, transport and file errors.
    pub fn fetch(&self, url: &str, sha256: Option<&str>) -> Result<CachedImage, ImageError> {
        let source = parse_source(url)?;
        let expected = sha256.map(normalise_checksum).transpose()?;
        let key = match &expected {
            Some(digest) => content_name(digest),
            None => url_index_name(url),
        };
        if let Some(hit) = self.lookup(&key)? {
            return Ok(hit);
        }

        std::fs::create_dir_all(&self.dir).map_err(io_error("create", &self.dir))?;
        let _lock = self.lock(&key)?;
        // Whoever held the lock before us may have fetched it.
        if let Some(hit) = self.lookup(&key)? {
            return Ok(hit);
        }
        tracing::info!(url, "downloading image");
        let image = self.download(url, &source, expected.as_deref())?;
        if expected.is_none() {
            self.write_index(&key, &image.sha256)?;
        }
        sync_dir(&self.dir)?;
        Ok(image)
    }

    /// The cached image under `key` (a content or URL index name), if present.
    fn lookup(&self, key: &str) -> Result<Option<CachedImage>, ImageError> {
        let digest = match key.strip_prefix("sha256-") {
            Some(digest) => digest.to_owned(),
            None => {
                let index = self.dir.join(key);
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
        let path = self.dir.join(content_name(&digest));
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

    /// Holds the entry's lock until dropped.
    fn lock(&self, key: &str) -> Result<File, ImageError> {
        let path = self.dir.join(format!(".lock-{key}"));
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io_error("open", &path))?;
        file.lock().map_err(io_error("lock", &path))?;
        Ok(file)
    }

    /// Streams `url` into a temporary file while hashing it, checks the digest and renames the
    /// file to its content name.
    fn download(
        &self,
        url: &str,
        source: &Source,
        expected: Option<&str>,
    ) -> Result<CachedImage, ImageError> {
        let mut reader: Box<dyn Read> = match source {
            Source::File(path) => {
                Box::new(File::open(path).map_err(|source| ImageError::Read {
                    url: url.to_owned(),
                    source,
                })?)
            }
            Source::Http => {
                let response = self.http.get(url).call().map_err(|e| ImageError::Http {
                    url: url.to_owned(),
                    source: Box::new(e),
                })?;
                Box::new(response.into_body().into_reader())
            }
        };

        let mut tmp = tempfile::Builder::new()
            .prefix(".tmp-")
            .tempfile_in(&self.dir)
            .map_err(io_error("create a temporary file in", &self.dir))?;
        let tmp_path = tmp.path().to_owned();
        let (actual, size) = copy_hashing(&mut reader, tmp.as_file_mut(), url, &tmp_path)?;
        if let Some(expected) = expected
            && expected != actual
        {
            // `tmp` is removed when dropped.
            return Err(ImageError::ChecksumMismatch {
                expected: expected.to_owned(),
                actual,
            });
        }
        let file = tmp.as_file();
        file.sync_all().map_err(io_error("sync", tmp.path()))?;
        // Backing files are read by QEMU, which runs as another user; images are not secrets.
        file.set_permissions(Permissions::from_mode(0o644))
            .map_err(io_error("chmod", tmp.path()))?;
        let path = self.dir.join(content_name(&actual));
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

    /// Records that the URL behind `key` served `digest`.
    fn write_index(&self, key: &str, digest: &str) -> Result<(), ImageError> {
        let path = self.dir.join(key);
        let mut tmp = tempfile::Builder::new()
            .prefix(".tmp-")
            .tempfile_in(&self.dir)
            .map_err(io_error("create a temporary file in", &self.dir))?;
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
}

fn parse_source(raw: &str) -> Result<Source, ImageError> {
    let url = url::Url::parse(raw).map_err(|source| ImageError::InvalidUrl {
        url: raw.to_owned(),
        source,
    })?;
    match url.scheme() {
        "file" => url
            .to_file_path()
            .map(Source::File)
            .map_err(|()| ImageError::NotALocalPath(raw.to_owned())),
        "http" | "https" => Ok(Source::Http),
        other => Err(ImageError::UnsupportedScheme(other.to_owned())),
    }
}

/// The digest in lowercase, if it is 64 hex digits; it becomes part of a file name.
fn normalise_checksum(digest: &str) -> Result<String, ImageError> {
    if digest.len() == SHA256_HEX_LEN && digest.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(digest.to_ascii_lowercase())
    } else {
        Err(ImageError::InvalidChecksum(digest.to_owned()))
    }
}

fn content_name(digest: &str) -> String {
    format!("sha256-{digest}")
}

fn url_index_name(url: &str) -> String {
    format!(
        "url-{}",
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

/// Copies `reader` into `out`, returning the SHA-256 (hex) and length of what passed.
fn copy_hashing(
    reader: &mut dyn Read,
    out: &mut File,
    url: &str,
    out_path: &Path,
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
        let chunk = &buf[..n];
        context.update(chunk);
        out.write_all(chunk).map_err(io_error("write", out_path))?;
        size += n as u64;
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

    fn sha256_hex(data: &[u8]) -> String {
        hex(ring::digest::digest(&SHA256, data).as_ref())
    }

    fn file_url(path: &Path) -> String {
        url::Url::from_file_path(path)
            .expect("absolute path")
            .to_string()
    }

    /// Files in the cache directory that are not lock files.
    fn entries(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .expect("read dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .filter(|n| !n.starts_with(".lock-"))
            .collect();
        names.sort();
        names
    }

    /// A one-file HTTP server on 127.0.0.1: `/image` is `BODY`, anything else 404.
    /// Returns its base URL and a count of `/image` requests.
    fn serve() -> (String, Arc<AtomicUsize>) {
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
                let path = request_line.split_whitespace().nth(1).unwrap_or("");
                let (status, body): (&str, &[u8]) = if path == "/image" {
                    counter.fetch_add(1, Ordering::SeqCst);
                    // Slow enough that concurrent fetches overlap.
                    std::thread::sleep(Duration::from_millis(200));
                    ("200 OK", BODY)
                } else {
                    ("404 Not Found", b"no such image\n")
                };
                let head = format!(
                    "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = stream.write_all(head.as_bytes());
                let _ = stream.write_all(body);
            }
        });
        (format!("http://{addr}"), hits)
    }

    #[test]
    fn file_url_is_copied_once_and_then_a_hit() {
        let src_dir = tempfile::tempdir().expect("tempdir");
        let src = src_dir.path().join("my image (1).qcow2");
        std::fs::write(&src, BODY).expect("write source");
        let cache_dir = tempfile::tempdir().expect("tempdir");
        let cache = ImageCache::new(cache_dir.path().join("images"));
        let url = file_url(&src);
        let digest = sha256_hex(BODY);

        let first = cache.fetch(&url, Some(&digest)).expect("fetch");
        assert_eq!(first.sha256, digest);
        assert_eq!(first.size, BODY.len() as u64);
        assert_eq!(std::fs::read(&first.path).expect("read cached"), BODY);
        assert_eq!(first.path, cache.dir().join(format!("sha256-{digest}")));

        // The source is gone: only a cache hit can answer now.
        std::fs::remove_file(&src).expect("remove source");
        let again = cache
            .fetch(&url, Some(&digest.to_ascii_uppercase()))
            .expect("cache hit");
        assert_eq!(again, first);
        // Keyed by content: another URL with the same checksum is a hit too.
        let elsewhere = cache
            .fetch("https://images.invalid/other.qcow2", Some(&digest))
            .expect("hit by checksum");
        assert_eq!(elsewhere, first);
        assert_eq!(entries(cache.dir()), [format!("sha256-{digest}")]);
    }

    #[test]
    fn fetch_without_checksum_is_keyed_by_url() {
        let src_dir = tempfile::tempdir().expect("tempdir");
        let src = src_dir.path().join("image.raw");
        std::fs::write(&src, BODY).expect("write source");
        let cache_dir = tempfile::tempdir().expect("tempdir");
        let cache = ImageCache::new(cache_dir.path().to_owned());
        let url = file_url(&src);

        let first = cache.fetch(&url, None).expect("fetch");
        assert_eq!(first.sha256, sha256_hex(BODY));
        std::fs::remove_file(&src).expect("remove source");
        assert_eq!(cache.fetch(&url, None).expect("cache hit"), first);
        assert_eq!(entries(cache.dir()).len(), 2, "content and URL index");
    }

    #[test]
    fn checksum_mismatch_leaves_nothing_cached() {
        let src_dir = tempfile::tempdir().expect("tempdir");
        let src = src_dir.path().join("image.qcow2");
        std::fs::write(&src, BODY).expect("write source");
        let cache_dir = tempfile::tempdir().expect("tempdir");
        let cache = ImageCache::new(cache_dir.path().to_owned());
        let wrong = "0".repeat(64);

        match cache.fetch(&file_url(&src), Some(&wrong)) {
            Err(ImageError::ChecksumMismatch { expected, actual }) => {
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
    fn bad_input_is_rejected_before_any_io() {
        let cache_dir = tempfile::tempdir().expect("tempdir");
        let cache = ImageCache::new(cache_dir.path().join("never-created"));
        assert!(matches!(
            cache.fetch("file:///x", Some("../../etc/passwd")),
            Err(ImageError::InvalidChecksum(_))
        ));
        assert!(matches!(
            cache.fetch("file:///x", Some(&"g".repeat(64))),
            Err(ImageError::InvalidChecksum(_))
        ));
        assert!(matches!(
            cache.fetch("ftp://host/x", None),
            Err(ImageError::UnsupportedScheme(s)) if s == "ftp"
        ));
        assert!(matches!(
            cache.fetch("not a url", None),
            Err(ImageError::InvalidUrl { .. })
        ));
        assert!(matches!(
            cache.fetch("file://otherhost/x", None),
            Err(ImageError::NotALocalPath(_))
        ));
        assert!(!cache.dir().exists());
    }

    #[test]
    fn http_download_verifies_and_caches() {
        let (base, hits) = serve();
        let cache_dir = tempfile::tempdir().expect("tempdir");
        let cache = ImageCache::new(cache_dir.path().to_owned());
        let url = format!("{base}/image");
        let digest = sha256_hex(BODY);

        let first = cache.fetch(&url, Some(&digest)).expect("download");
        assert_eq!(first.size, BODY.len() as u64);
        assert_eq!(std::fs::read(&first.path).expect("read"), BODY);
        assert_eq!(hits.load(Ordering::SeqCst), 1);
        assert_eq!(cache.fetch(&url, Some(&digest)).expect("hit"), first);
        assert_eq!(
            hits.load(Ordering::SeqCst),
            1,
            "second fetch must not download"
        );

        let missing = cache.fetch(&format!("{base}/missing"), None);
        assert!(
            matches!(&missing, Err(ImageError::Http { source, .. })
                if matches!(**source, ureq::Error::StatusCode(404))),
            "{missing:?}"
        );
        assert_eq!(entries(cache.dir()), [format!("sha256-{digest}")]);
    }

    #[test]
    fn concurrent_fetches_download_once() {
        let (base, hits) = serve();
        let cache_dir = tempfile::tempdir().expect("tempdir");
        let cache = Arc::new(ImageCache::new(cache_dir.path().to_owned()));
        let url = format!("{base}/image");

        let results: Vec<CachedImage> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..4)
                .map(|_| s.spawn(|| cache.fetch(&url, None)))
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
}
