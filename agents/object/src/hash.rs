//! The cluster's hash path prefix and suffix (Swift's `[swift-hash]`, which salts where every
//! account, container and object is placed), kept in a file only its owner reads
//! (`--swift-hash-file`) and written for the node's Swift processes as their `swift.conf`.
//!
//! # Guarantees
//! - The values are never logged nor put in an error: `Debug` shows neither, and a file
//!   whose values cannot be used is refused naming the key and the reason, not the value.
//! - A hash file is made at most once: an agent that finds none writes a new one whole (0600,
//!   64 random bytes as hexadecimal, and a random fingerprint salt of its own) under a
//!   temporary name and links it into place, so that agents started at once with one path all
//!   read the same values; afterwards it is only read.
//! - A hash file that is not a regular file of the agent's own user, or that another user may
//!   read or write, is refused (as ssh refuses such a key), and so is a guessable one (both
//!   values shorter than 16 characters, or Debian's `changeme`).
//! - `swift.conf` is written whole (temporary file, fsync, rename), mode 0640.

use std::io::{Read as _, Write as _};
use std::os::unix::fs::{MetadataExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use crate::ini::Ini;

/// The largest hash file read.
pub const MAX_FILE: u64 = 4096;
/// The longest value.
const MAX_VALUE: usize = 256;
/// The shortest the longer of the two values may be.
const MIN_SECRET: usize = 16;
/// Swift's keys.
const PREFIX_KEY: &str = "swift_hash_path_prefix";
const SUFFIX_KEY: &str = "swift_hash_path_suffix";
/// The cluster's fingerprint salt, Stratus's own key (never written to `swift.conf`).
const SALT_KEY: &str = "stratus_fingerprint_salt";
/// Hexadecimal digits of a fingerprint salt (16 random bytes).
const SALT_HEX: usize = 32;
/// Hexadecimal digits of a salt's id in a v2 fingerprint.
const SALT_ID_HEX: usize = 8;
/// The PBKDF2 salt of a v1 fingerprint (a hash file without [`SALT_KEY`]), and the label
/// a v2 fingerprint's salt starts with.
const FINGERPRINT_LABEL: &[u8] = b"stratus swift hash fingerprint v2";
/// Numbers this process's temporary hash files apart.
static TMP: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
/// PBKDF2 rounds of a fingerprint ([`SwiftHash::fingerprint`]): OWASP's figure for
/// PBKDF2-HMAC-SHA256 password storage.
pub const FINGERPRINT_ROUNDS: std::num::NonZeroU32 = match std::num::NonZeroU32::new(600_000) {
    Some(n) => n,
    None => panic!("rounds are not zero"),
};
/// Where Swift's programs read it (a fixed path in Swift 2.30).
pub const SWIFT_CONF: &str = "/etc/swift/swift.conf";

/// The hash path prefix and suffix, and the cluster's fingerprint salt.
#[derive(Clone, PartialEq, Eq)]
pub struct SwiftHash {
    prefix: String,
    suffix: String,
    /// [`SALT_HEX`] lower-case hexadecimal digits; `None` in a hash file made before salts
    /// (or by an operator without one): the fingerprint is then v1.
    salt: Option<String>,
}

impl std::fmt::Debug for SwiftHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SwiftHash { .. }")
    }
}

/// Why the hash file or `swift.conf` cannot be used; never holds a value.
#[derive(Debug, thiserror::Error)]
pub enum HashError {
    /// A file could not be read or written.
    #[error("{what} {}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The hash file may be read or changed by someone else.
    #[error("{}: {reason}", path.display())]
    Exposed {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The hash file's content cannot be used.
    #[error("{}: {reason}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Why (naming a line or a key, never a value).
        reason: String,
    },
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> HashError {
    let path = path.to_owned();
    move |source| HashError::Io { what, path, source }
}

/// Whether `v` may be a value: printable ASCII that Python's `ConfigParser` reads back as it
/// is (no blank, no interpolation, no comment or section character, no quote).
fn check_value(key: &str, v: &str) -> Result<(), String> {
    if v.len() > MAX_VALUE {
        return Err(format!("{key}: longer than {MAX_VALUE} characters"));
    }
    let ok = v.bytes().all(|b| {
        b.is_ascii_graphic() && !matches!(b, b'%' | b'#' | b';' | b'[' | b']' | b'"' | b'\'')
    });
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{key}: only printable ASCII without blanks, '%', '#', ';', brackets or quotes"
        ))
    }
}

impl SwiftHash {
    /// Reads Swift's own form (what `swift.conf` holds): an optional `[swift-hash]` line, then
    /// `swift_hash_path_prefix = VALUE` and/or `swift_hash_path_suffix = VALUE`, and
    /// optionally Stratus's `stratus_fingerprint_salt = HEX` (32 lower-case hexadecimal
    /// digits, the same on every node); blank lines and `#` or `;` comments are skipped.
    ///
    /// # Errors
    /// Why it cannot be used (naming the line or key, never a value).
    pub fn parse(text: &str) -> Result<Self, String> {
        let (mut prefix, mut suffix, mut salt) = (None, None, None);
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with(['#', ';']) || line == "[swift-hash]" {
                continue;
            }
            let Some((key, value)) = line.split_once('=') else {
                return Err(format!(
                    "line {}: neither [swift-hash] nor KEY = VALUE",
                    n + 1
                ));
            };
            let (key, value) = (key.trim(), value.trim());
            let slot = match key {
                PREFIX_KEY => &mut prefix,
                SUFFIX_KEY => &mut suffix,
                SALT_KEY => &mut salt,
                _ => {
                    return Err(format!(
                        "line {}: only {PREFIX_KEY}, {SUFFIX_KEY} and {SALT_KEY} may be set",
                        n + 1
                    ));
                }
            };
            if slot.is_some() {
                return Err(format!("{key} is set twice"));
            }
            check_value(key, value)?;
            if key == SALT_KEY
                && (value.len() != SALT_HEX
                    || !value
                        .bytes()
                        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
            {
                return Err(format!(
                    "{SALT_KEY}: must be {SALT_HEX} lower-case hexadecimal digits"
                ));
            }
            *slot = Some(value.to_owned());
        }
        let hash = Self {
            prefix: prefix.unwrap_or_default(),
            suffix: suffix.unwrap_or_default(),
            salt,
        };
        let longer = hash.prefix.len().max(hash.suffix.len());
        if longer < MIN_SECRET
            || [&hash.prefix, &hash.suffix]
                .iter()
                .any(|v| *v == "changeme")
        {
            return Err(format!(
                "guessable: {PREFIX_KEY} or {SUFFIX_KEY} must have at least {MIN_SECRET} \
                 random characters (and neither be Debian's placeholder)"
            ));
        }
        Ok(hash)
    }

    /// New random values: 32 bytes of the kernel's randomness each, as hexadecimal, and a
    /// fingerprint salt of 16.
    ///
    /// # Errors
    /// No randomness could be read.
    pub fn generate() -> std::io::Result<Self> {
        let mut bytes = [0u8; 64 + SALT_HEX / 2];
        std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
        let (p, rest) = bytes.split_at(32);
        let (s, salt) = rest.split_at(32);
        Ok(Self {
            prefix: hex(p),
            suffix: hex(s),
            salt: Some(hex(salt)),
        })
    }

    /// What tells two clusters' hashes apart and nothing of the values, for the node's
    /// status: the first 16 hexadecimal digits (64 bits) of PBKDF2-HMAC-SHA256 keyed with both
    /// values (each after its length), in [`FINGERPRINT_ROUNDS`] rounds, over a salt:
    /// - v2 (`v2:SALTID:HEX`), for a hash file with a fingerprint salt: the salt is a label of
    ///   its own followed by the cluster's random salt, whose first 8 hexadecimal digits are
    ///   `SALTID`;
    /// - v1 (`HEX` alone, what agents before salts show), for a hash file without one: the
    ///   label alone, the same in every cluster.
    ///
    /// Fingerprints of two versions differ even for one hash ([`stratus_api_types::object::
    /// hash_fingerprint_version`]), and nodes showing two versions are taken to use two
    /// hashes: an agent never rewrites an existing file, so a node of another version than
    /// its ring's others was given another file.
    ///
    /// # Guarantees
    /// Two nodes show the same fingerprint exactly when their values and salts are the same
    /// (save a 2^-64 chance). Whoever reads it (cluster admins and nodes) can check a guess
    /// of the values offline only by computing it: [`FINGERPRINT_ROUNDS`] HMAC-SHA256s (2.4
    /// million SHA-256 blocks) per guess, with no shortcut PBKDF2 is known to have, so
    /// finding values of `k` bits of entropy takes 2^(k-1) such computations on average; the
    /// 64 bits shown pin no value of more entropy than that. Values Stratus made are 256
    /// random bits each, beyond any search; an operator's own (at least 16 characters) are as
    /// safe as they are unguessable. A v2 salt is the cluster's own, so a table of guesses
    /// serves one cluster only; a v1 fingerprint's fixed salt lets one table serve every
    /// cluster still on v1.
    pub fn fingerprint(&self) -> String {
        let mut key = Vec::with_capacity(16 + self.prefix.len() + self.suffix.len());
        for v in [&self.prefix, &self.suffix] {
            key.extend_from_slice(&(v.len() as u64).to_be_bytes());
            key.extend_from_slice(v.as_bytes());
        }
        let mut salt = FINGERPRINT_LABEL.to_vec();
        if let Some(own) = &self.salt {
            salt.push(0);
            salt.extend_from_slice(own.as_bytes());
        }
        let mut out = [0u8; 8];
        ring::pbkdf2::derive(
            ring::pbkdf2::PBKDF2_HMAC_SHA256,
            FINGERPRINT_ROUNDS,
            &salt,
            &key,
            &mut out,
        );
        match &self.salt {
            Some(own) => format!("v2:{}:{}", &own[..SALT_ID_HEX], hex(&out)),
            None => hex(&out),
        }
    }

    /// The hash file's text.
    fn file_text(&self) -> String {
        let mut text = format!(
            "[swift-hash]\n{PREFIX_KEY} = {}\n{SUFFIX_KEY} = {}\n",
            self.prefix, self.suffix
        );
        if let Some(salt) = &self.salt {
            text.push_str(&format!("{SALT_KEY} = {salt}\n"));
        }
        text
    }

    /// `swift.conf`: these values (not the fingerprint salt, which is Stratus's) and the one
    /// storage policy (Swift's default, `Policy-0`).
    ///
    /// # Errors
    /// A value the ini writer refuses (none that [`SwiftHash::parse`] accepts).
    pub fn swift_conf(&self) -> Result<String, String> {
        let mut ini = Ini::new();
        let refused = |_| "a hash value cannot be written to swift.conf".to_owned();
        ini.section("swift-hash")
            .and_then(|i| i.set(PREFIX_KEY, &self.prefix))
            .and_then(|i| i.set(SUFFIX_KEY, &self.suffix))
            .and_then(|i| i.section("storage-policy:0"))
            .and_then(|i| i.set("name", "Policy-0"))
            .and_then(|i| i.set("default", "yes"))
            .map_err(refused)?;
        Ok(ini.finish())
    }

    /// The values at `path`, made there first if there is no file (`true` then).
    ///
    /// # Errors
    /// The file cannot be read or made, is exposed to other users, or holds no usable values.
    pub fn load_or_create(path: &Path) -> Result<(Self, bool), HashError> {
        match Self::load(path) {
            Err(HashError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {}
            other => return other.map(|h| (h, false)),
        }
        let dir = path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).map_err(io("create the directory of", path))?;
        let hash = Self::generate().map_err(io("read randomness for", path))?;
        let tmp = dir.join(format!(
            ".{}.{}.{}.tmp",
            path.file_name()
                .map_or_else(|| "swift-hash".into(), |n| n.to_string_lossy().into_owned()),
            std::process::id(),
            TMP.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let _ = std::fs::remove_file(&tmp);
        let written = write_new(&tmp, 0o600, &hash.file_text()).map_err(io("write", &tmp));
        // Linked, not renamed: an agent that made one meanwhile keeps its own, and this one
        // reads it.
        let linked = written.and_then(|()| match std::fs::hard_link(&tmp, path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(io("link", path)(e)),
        });
        let _ = std::fs::remove_file(&tmp);
        if linked? {
            Ok((hash, true))
        } else {
            Self::load(path).map(|h| (h, false))
        }
    }

    /// The values of the hash file at `path`.
    ///
    /// # Errors
    /// As [`SwiftHash::load_or_create`]; a missing file is an I/O error of kind `NotFound`.
    pub fn load(path: &Path) -> Result<Self, HashError> {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
            .open(path)
            .map_err(io("open", path))?;
        let meta = f.metadata().map_err(io("read", path))?;
        let exposed = |reason: String| HashError::Exposed {
            path: path.to_owned(),
            reason,
        };
        if !meta.is_file() {
            return Err(exposed("not a regular file".into()));
        }
        if meta.uid() != rustix::process::geteuid().as_raw() {
            return Err(exposed(format!(
                "owned by uid {}, not by the agent's user",
                meta.uid()
            )));
        }
        if meta.mode() & 0o077 != 0 {
            return Err(exposed(format!(
                "mode {:o}: other users may read or change it (chmod 600 it)",
                meta.mode() & 0o777
            )));
        }
        if meta.len() > MAX_FILE {
            return Err(HashError::Invalid {
                path: path.to_owned(),
                reason: format!("larger than {MAX_FILE} bytes"),
            });
        }
        let mut text = String::new();
        f.take(MAX_FILE)
            .read_to_string(&mut text)
            .map_err(io("read", path))?;
        Self::parse(&text).map_err(|reason| HashError::Invalid {
            path: path.to_owned(),
            reason,
        })
    }

    /// Writes `swift.conf` at `path` whole, mode 0640.
    ///
    /// # Errors
    /// It cannot be written.
    pub fn write_swift_conf(&self, path: &Path) -> Result<(), HashError> {
        let text = self.swift_conf().map_err(|reason| HashError::Invalid {
            path: path.to_owned(),
            reason,
        })?;
        let tmp = path.with_extension("conf.tmp");
        let _ = std::fs::remove_file(&tmp);
        let written = write_new(&tmp, 0o640, &text).and_then(|()| std::fs::rename(&tmp, path));
        if written.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        written.map_err(io("write", path))
    }
}

/// Writes `text` to a new file at `path` of `mode` (whatever the umask), synced.
fn write_new(path: &Path, mode: u32, text: &str) -> std::io::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)?;
    f.set_permissions(std::fs::Permissions::from_mode(mode))?;
    f.write_all(text.as_bytes())?;
    f.sync_all()
}

/// Lower-case hexadecimal.
fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).expect("metadata").mode() & 0o777
    }

    #[test]
    fn a_hash_file_is_made_once_private_and_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("keys").join("swift-hash");
        let (made, created) = SwiftHash::load_or_create(&path).expect("made");
        assert!(created);
        assert_eq!(mode(&path), 0o600);
        assert_eq!(made.prefix.len(), 64);
        assert_ne!(made.prefix, made.suffix);
        // Kept: a second start (another node given the same file) reads the same values.
        let (again, created) = SwiftHash::load_or_create(&path).expect("read");
        assert!(!created);
        assert_eq!(again, made);
        // No temporary file is left beside it.
        let names: Vec<_> = std::fs::read_dir(path.parent().expect("dir"))
            .expect("list")
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(names, ["swift-hash"]);
        // Another path: other values.
        let (other, _) = SwiftHash::load_or_create(&dir.path().join("other")).expect("made");
        assert_ne!(other, made);
    }

    #[test]
    fn agents_starting_at_once_share_one_hash() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("swift-hash");
        let all: Vec<(SwiftHash, bool)> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|_| s.spawn(|| SwiftHash::load_or_create(&path).expect("hash")))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("thread"))
                .collect()
        });
        assert!(all.iter().all(|(h, _)| *h == all[0].0));
        assert!(all.iter().filter(|(_, created)| *created).count() <= 1);
    }

    #[test]
    fn an_exposed_or_guessable_hash_file_is_refused_without_its_values() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("swift-hash");
        let secret = "0123456789abcdef0123456789abcdef";
        std::fs::write(
            &path,
            format!("# ours\n[swift-hash]\nswift_hash_path_suffix = {secret}\n"),
        )
        .expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let e = SwiftHash::load(&path).expect_err("world-readable");
        assert!(matches!(e, HashError::Exposed { .. }), "{e}");
        assert!(e.to_string().contains("chmod 600"), "{e}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        let ok = SwiftHash::load(&path).expect("a suffix alone is Swift's minimum");
        assert_eq!((ok.prefix.as_str(), ok.suffix.as_str()), ("", secret));
        assert_eq!(format!("{ok:?}"), "SwiftHash { .. }");
        // A link is not followed.
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&path, &link).expect("symlink");
        assert!(SwiftHash::load(&link).is_err());

        for bad in [
            "swift_hash_path_suffix = changeme\nswift_hash_path_prefix = short\n".to_owned(),
            format!("swift_hash_path_prefix = {secret}\nswift_hash_path_prefix = {secret}\n"),
            format!("swift_hash_path_prefix = {secret}%(here)s\n"),
            format!("swift_hash_path_prefix = {secret} x\n"),
            format!("user = {secret}\n"),
            format!("{secret}\n"),
            format!("[DEFAULT]\nswift_hash_path_prefix = {secret}\n"),
            format!("swift_hash_path_prefix = {}\n", "a".repeat(300)),
        ] {
            let e = SwiftHash::parse(&bad).expect_err(&bad);
            assert!(!e.contains(secret), "{e}");
        }
    }

    #[test]
    fn the_fingerprint_tells_hashes_apart_and_shows_neither_value() {
        let a = SwiftHash {
            prefix: "p".repeat(20),
            suffix: "s".repeat(20),
            salt: None,
        };
        let f = a.fingerprint();
        assert_eq!(f.len(), 16);
        assert!(
            f.bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        );
        assert_eq!(
            f,
            a.clone().fingerprint(),
            "the same hash, the same fingerprint"
        );
        // Known value (Python's hashlib.pbkdf2_hmac("sha256", len+prefix+len+suffix,
        // label, 600000)[:8], computed apart): a check of a guess costs every round, and a
        // change of the function would split every cluster's nodes.
        assert_eq!(f, "8f9a2a4c49d7c060");
        // Either value changed, or moved between them, changes it.
        let other = |prefix: &str, suffix: &str| {
            SwiftHash {
                prefix: prefix.into(),
                suffix: suffix.into(),
                salt: None,
            }
            .fingerprint()
        };
        assert_ne!(other(&"p".repeat(20), &"s".repeat(21)), f);
        assert_ne!(other(&"p".repeat(21), &"s".repeat(20)), f);
        assert_ne!(
            other(&format!("{}{}", "p".repeat(20), "s"), &"s".repeat(19)),
            f,
            "lengths keep the values apart"
        );
        assert!(!f.contains("pppp") && !f.contains("ssss"));
        let made = SwiftHash::generate().expect("random");
        assert!(!made.prefix.contains(&made.fingerprint()));
        assert!(!made.suffix.contains(&made.fingerprint()));
    }

    #[test]
    fn a_salted_fingerprint_is_v2_names_its_salt_and_differs_per_cluster() {
        let salted = |salt: &str| SwiftHash {
            prefix: "p".repeat(20),
            suffix: "s".repeat(20),
            salt: Some(salt.into()),
        };
        let salt = "0123456789abcdef0123456789abcdef";
        let f = salted(salt).fingerprint();
        // Known value (Python's hashlib.pbkdf2_hmac("sha256", len+prefix+len+suffix,
        // label + b"\0" + salt, 600000)[:8], computed apart).
        assert_eq!(f, "v2:01234567:50ec5e4690f880ef");
        assert!(
            regex_lite_match(&f),
            "{f} matches the API's fingerprint pattern"
        );
        assert_eq!(stratus_api_types::object::hash_fingerprint_version(&f), 2);
        // The same values under another cluster's salt: another fingerprint, and not the v1
        // one (a table of guesses made for one salt serves no other).
        let other = salted("fedcba9876543210fedcba9876543210").fingerprint();
        assert_ne!(other, f);
        assert_ne!(&other[12..], &f[12..]);
        let v1 = SwiftHash {
            salt: None,
            ..salted(salt)
        }
        .fingerprint();
        assert_eq!(v1, "8f9a2a4c49d7c060");
        assert_eq!(stratus_api_types::object::hash_fingerprint_version(&v1), 1);
        assert!(regex_lite_match(&v1));
    }

    /// Whether `f` has the form `HASH_FINGERPRINT_PATTERN` describes.
    fn regex_lite_match(f: &str) -> bool {
        let hex = |s: &str, n: usize| {
            s.len() == n
                && s.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        };
        match f
            .strip_prefix("v2:")
            .map(|r| r.split(':').collect::<Vec<_>>())
        {
            Some(parts) => parts.len() == 2 && hex(parts[0], 8) && hex(parts[1], 16),
            None => hex(f, 16),
        }
    }

    #[test]
    fn a_new_hash_file_has_a_salt_and_an_old_one_reads_without() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("swift-hash");
        let (made, _) = SwiftHash::load_or_create(&path).expect("made");
        let salt = made.salt.clone().expect("a new file is salted");
        assert_eq!(salt.len(), SALT_HEX);
        let text = std::fs::read_to_string(&path).expect("read");
        assert!(text.contains(&format!("{SALT_KEY} = {salt}\n")), "{text}");
        assert_eq!(SwiftHash::load(&path).expect("read back"), made);
        assert!(
            made.fingerprint()
                .starts_with(&format!("v2:{}:", &salt[..8]))
        );
        // Two clusters' new files: two salts.
        let (other, _) = SwiftHash::load_or_create(&dir.path().join("other")).expect("made");
        assert_ne!(other.salt, made.salt);
        // A file of before salts (or an operator's) reads, and keeps its v1 fingerprint.
        let secret = "0123456789abcdef0123456789abcdef";
        let old = SwiftHash::parse(&format!(
            "[swift-hash]\nswift_hash_path_prefix = {secret}\nswift_hash_path_suffix = {secret}\n"
        ))
        .expect("old");
        assert_eq!(old.salt, None);
        assert_eq!(old.fingerprint().len(), 16);
        // A salt that is not 32 lower-case hexadecimal digits is refused, naming the key.
        for bad in ["0123", "0123456789ABCDEF0123456789ABCDEF", &"g".repeat(32)] {
            let e = SwiftHash::parse(&format!(
                "swift_hash_path_prefix = {secret}\n{SALT_KEY} = {bad}\n"
            ))
            .expect_err(bad);
            assert!(e.contains(SALT_KEY), "{e}");
        }
    }

    #[test]
    fn swift_conf_holds_the_values_and_the_default_policy_and_is_0640() {
        let dir = tempfile::tempdir().expect("tempdir");
        let hash = SwiftHash {
            prefix: "p".repeat(20),
            suffix: "s".repeat(20),
            salt: Some("0123456789abcdef0123456789abcdef".into()),
        };
        let path = dir.path().join("swift.conf");
        std::fs::write(&path, "old").expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        hash.write_swift_conf(&path).expect("written");
        assert_eq!(mode(&path), 0o640);
        assert_eq!(
            std::fs::read_to_string(&path).expect("read"),
            format!(
                "[swift-hash]\nswift_hash_path_prefix = {}\nswift_hash_path_suffix = {}\n\n\
                 [storage-policy:0]\nname = Policy-0\ndefault = yes\n",
                hash.prefix, hash.suffix
            )
        );
        // What swift.conf says reads back as the same values (the salt is not Swift's).
        let text = std::fs::read_to_string(&path).expect("read");
        let section = text.split("\n\n").next().expect("section");
        let read = SwiftHash::parse(section).expect("parse");
        assert_eq!((&read.prefix, &read.suffix), (&hash.prefix, &hash.suffix));
        assert!(!text.contains(SALT_KEY));
    }
}
