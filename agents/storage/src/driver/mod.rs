//! The storage driver: what the agent asks of a pool's backing store, behind one trait
//! ([`Backend`]) with real implementations ([`lvm::Lvm`]: logical volumes of a volume group;
//! [`file::FilePool`]: raw files in a directory), an in-memory fake with failure injection
//! ([`fake::FakeBackend`]), and one [`conformance`] suite every one of them passes.
//! Blocking calls; the agent runs them on tokio's blocking pool.
//!
//! Every verb is idempotent, and crash-safe: a volume is built under a temporary name and
//! renamed to its own name only once its data is complete, so a process killed mid-call
//! leaves either nothing, a partial volume that [`Backend::recover`] removes, or the
//! complete volume.

use std::fmt::Debug;
use std::path::{Path, PathBuf};

pub mod cmd;
#[cfg(any(test, feature = "conformance"))]
pub mod conformance;
pub mod data;
pub mod fake;
pub mod file;
#[cfg(test)]
mod host_tests;
pub mod loopdev;
pub mod lvm;

pub use stratus_api_types::storage::InUseGrowth;
pub use stratus_image_cache::Format;

/// The longest uid a name is made from.
const MAX_UID: usize = 64;

/// The name of a volume or snapshot in a backing store: `volume-<uid>` or
/// `snap-<uid>` (lvm2 reserves names starting with `snapshot`), made from the object's uid (never from a name a user chose), so that it
/// is safe as an LV name, a file name and a command argument, and a new object with an old
/// name inherits nothing.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VolName(String);

impl VolName {
    /// The name of the Volume whose uid is `uid`.
    ///
    /// # Errors
    /// [`DriverError::Invalid`] unless `uid` is 1 to 64 lowercase letters, digits and `-`.
    pub fn volume(uid: &str) -> Result<Self, DriverError> {
        Self::of("volume", uid)
    }

    /// The name of the VolumeSnapshot whose uid is `uid` (as [`VolName::volume`]).
    ///
    /// # Errors
    /// As [`VolName::volume`].
    pub fn snapshot(uid: &str) -> Result<Self, DriverError> {
        Self::of("snap", uid)
    }

    fn of(kind: &str, uid: &str) -> Result<Self, DriverError> {
        let ok = !uid.is_empty()
            && uid.len() <= MAX_UID
            && !uid.starts_with('-')
            && uid
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !ok {
            return Err(DriverError::Invalid(format!(
                "{uid:?} is not a uid a {kind} name can be made from"
            )));
        }
        Ok(Self(format!("{kind}-{uid}")))
    }

    /// A name read back from a backing store, if it is one of ours.
    pub fn parse(s: &str) -> Option<Self> {
        let (kind, uid) = s.split_once('-')?;
        match kind {
            "volume" => Self::volume(uid).ok(),
            "snap" => Self::snapshot(uid).ok(),
            _ => None,
        }
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for VolName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The suffix of a volume being built: never a name [`VolName::parse`] accepts.
pub const PARTIAL_SUFFIX: &str = ".partial";

/// What a new volume starts with.
#[derive(Debug, Clone, Copy)]
pub enum Source<'a> {
    /// Zeroes.
    Empty,
    /// The data of an image file (already inspected by the image cache) in `format`.
    Image {
        /// The cached image.
        path: &'a Path,
        /// Its format.
        format: Format,
    },
    /// A copy of another volume or snapshot of the same store.
    Copy(&'a VolName),
}

/// A complete volume as the store has it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Observed {
    /// Its size, in bytes.
    pub size: u64,
}

/// The size of a store, in bytes, as far as the pool may use it: what its own volumes and
/// snapshots take (partial builds included) and what is free, never what other users of the
/// same volume group or filesystem hold (their LVs, their files, a filesystem's blocks kept
/// for root).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capacity {
    /// What the pool's volumes take plus what is free: `used + free`.
    pub total: u64,
    /// What is not used by anyone.
    pub free: u64,
}

/// Failures of a [`Backend`] call.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    /// What was asked can never be done (a bad name, a shrink, an image larger than its
    /// volume): retrying cannot help.
    #[error("{0}")]
    Invalid(String),
    /// The source of a copy does not exist.
    #[error("{0} does not exist")]
    NotFound(String),
    /// The store has no room (or no contiguous room) for it.
    #[error("no room: {0}")]
    NoSpace(String),
    /// The store is not usable (its volume group or directory is missing).
    #[error("the store is unavailable: {0}")]
    Unavailable(String),
    /// A volume a guest holds cannot grow where it is (the space after it is taken), and
    /// moving it would lose the guest's writes: it grows once detached.
    #[error("cannot grow in place: {0}")]
    NotInPlace(String),
    /// The store holds something the driver cannot use (a logical volume of several
    /// segments without device-mapper).
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// A command failed.
    #[error("{program} failed")]
    Command {
        /// The program run.
        program: &'static str,
        /// Why.
        #[source]
        source: cmd::CommandError,
    },
    /// A file operation failed.
    #[error("{op} {path}")]
    Io {
        /// What was done.
        op: &'static str,
        /// On what.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A command's report did not parse.
    #[error("cannot read the report of {0}")]
    Report(&'static str, #[source] serde_json::Error),
    /// A failure injected by the fake.
    #[error("injected failure of {0:?}")]
    Injected(fake::Verb),
}

impl DriverError {
    /// Whether retrying the same call may succeed.
    pub fn is_final(&self) -> bool {
        matches!(self, Self::Invalid(_) | Self::Unsupported(_))
    }
}

/// An I/O error's mapper for `op` on `path`.
pub(crate) fn io(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> DriverError {
    let path = path.to_owned();
    move |source| DriverError::Io { op, path, source }
}

/// One pool's backing store.
///
/// # Guarantees
/// Every verb is idempotent: called again after it succeeded, or after the process died
/// during it, it converges on the same result. A volume's name is taken (by [`Backend::list`]
/// and [`Backend::observe`]) only once its data is complete; what an interrupted call left
/// is removed by [`Backend::recover`] or by the next call for that name. A volume is never
/// created by any verb but [`Backend::create`]: one removed behind the driver's back stays
/// missing.
pub trait Backend: Send + Sync + Debug {
    /// What the store is, for messages (`lvm:VG`, `file:DIR`).
    fn describe(&self) -> String;

    /// The store's size.
    ///
    /// # Errors
    /// [`DriverError::Unavailable`] when the store is missing.
    fn capacity(&self) -> Result<Capacity, DriverError>;

    /// Removes what interrupted calls left: partial volumes and their devices (loop
    /// devices of regions no complete volume has). Answers what was removed. Idempotent;
    /// call it before anything else when the agent starts.
    ///
    /// # Errors
    /// The store could not be read or something could not be removed (tried again later).
    fn recover(&self) -> Result<Vec<String>, DriverError>;

    /// The complete volumes and snapshots, with their sizes.
    ///
    /// # Errors
    /// The store could not be read.
    fn list(&self) -> Result<Vec<(VolName, Observed)>, DriverError>;

    /// The complete volume `name`, if it exists.
    ///
    /// # Errors
    /// The store could not be read, or holds `name` in a shape the driver cannot use.
    fn observe(&self, name: &VolName) -> Result<Option<Observed>, DriverError>;

    /// Creates `name` of `size` bytes (rounded up to the store's unit) from `source`; its
    /// data is complete when this returns. Idempotent: an existing complete `name` is
    /// answered as it is (whatever its size: [`Backend::extend`] grows it), a partial one is
    /// built again from the start.
    ///
    /// # Errors
    /// [`DriverError::NotFound`] for a missing copy source; [`DriverError::Invalid`] for a
    /// source larger than `size`; [`DriverError::NoSpace`]; command and file errors. Nothing
    /// of `name` is left when it fails (or, if the process dies, only a partial volume).
    fn create(
        &self,
        name: &VolName,
        size: u64,
        source: Source<'_>,
    ) -> Result<Observed, DriverError>;

    /// A snapshot `snapshot` of `volume`: a full copy of its data (without device-mapper
    /// there are no copy-on-write snapshots), of its size. Idempotent as [`Backend::create`].
    ///
    /// # Errors
    /// As [`Backend::create`].
    fn snapshot(&self, volume: &VolName, snapshot: &VolName) -> Result<Observed, DriverError> {
        let Some(v) = self.observe(volume)? else {
            // An existing snapshot is complete whatever happened to its volume since.
            return match self.observe(snapshot)? {
                Some(s) => Ok(s),
                None => Err(DriverError::NotFound(volume.to_string())),
            };
        };
        self.create(snapshot, v.size, Source::Copy(volume))
    }

    /// A new volume `target` of `size` bytes holding the data of `source` (a volume or
    /// snapshot), zeroes past it. Idempotent as [`Backend::create`].
    ///
    /// # Errors
    /// As [`Backend::create`].
    fn clone_volume(
        &self,
        source: &VolName,
        target: &VolName,
        size: u64,
    ) -> Result<Observed, DriverError> {
        self.create(target, size, Source::Copy(source))
    }

    /// Grows `name` to `size` bytes, keeping its data (zeroes past it). Idempotent: a volume
    /// already that large or larger is left as it is (never shrunk).
    ///
    /// # Errors
    /// [`DriverError::NotFound`] when `name` does not exist; [`DriverError::NoSpace`].
    fn extend(&self, name: &VolName, size: u64) -> Result<Observed, DriverError>;

    /// Grows `name` to `size` bytes while a guest holds its device: as [`Backend::extend`],
    /// keeping the device the guest has (at its new size), or refusing.
    ///
    /// # Errors
    /// As [`Backend::extend`]; [`DriverError::NotInPlace`] when it can grow only by moving
    /// (nothing changed then).
    fn extend_held(&self, name: &VolName, size: u64) -> Result<Observed, DriverError> {
        self.extend(name, size)
    }

    /// Whether a volume grows while a guest holds its device ([`Backend::extend_held`]): a
    /// file, or an active LV, keeps its path as it grows. Without device-mapper an LV is
    /// reached through a loop device over its extents, which grows with it only over the
    /// free extents right after it; elsewhere its grown data is a copy that a guest holding
    /// the old device would not see (and would go on writing to extents the volume no longer
    /// owns).
    fn grows_in_use(&self) -> InUseGrowth {
        InUseGrowth::Always
    }

    /// Removes `name` and its data (and its device). Idempotent: a missing one is `Ok`.
    ///
    /// # Errors
    /// Command and file errors.
    fn delete(&self, name: &VolName) -> Result<(), DriverError>;

    /// The path through which `name`'s data is read and written as a block device or file
    /// (set up if needed: a loop device for an LV without device-mapper). Idempotent: the same
    /// path while the volume is unchanged.
    ///
    /// # Errors
    /// [`DriverError::NotFound`] when `name` does not exist.
    fn device(&self, name: &VolName) -> Result<PathBuf, DriverError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_made_from_uids_only() {
        let v = VolName::volume("0b5e-77aa").expect("a uid");
        assert_eq!(v.as_str(), "volume-0b5e-77aa");
        assert_eq!(VolName::parse("volume-0b5e-77aa"), Some(v));
        assert_eq!(
            VolName::parse("snap-1").map(|s| s.to_string()),
            Some("snap-1".into())
        );
        assert_eq!(VolName::parse("snapshot-1"), None);
        for bad in [
            "",
            "-x",
            "a;rm -rf",
            "../x",
            "A",
            "a b",
            "a/b",
            "x.partial",
            "$(id)",
            &"a".repeat(65),
        ] {
            assert!(VolName::volume(bad).is_err(), "{bad:?} accepted");
        }
        for bad in ["volume-", "volume-x.partial", "other-x", "volume", "lvol0"] {
            assert_eq!(VolName::parse(bad), None, "{bad:?} parsed");
        }
    }
}
