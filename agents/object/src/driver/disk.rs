//! The node's disks as the agent touches them: a device directory probed (present, mounted,
//! writable, its filesystem's space) and a ring file installed atomically.

use std::fs::OpenOptions;
use std::io::Write as _;
use std::path::Path;

use super::DriverError;
use crate::plan::Probe;

/// The file written and removed on a device to see that it takes writes.
const PROBE_FILE: &str = ".stratus-probe";

/// What `dir` is now. Never fails: what cannot be read is reported as such.
pub fn probe(dir: &Path) -> Probe {
    let Ok(meta) = std::fs::metadata(dir) else {
        return Probe::default();
    };
    if !meta.is_dir() {
        return Probe::default();
    }
    // As Swift's `ismount`: a mount point is on another device than its parent, or is its
    // parent (the root).
    let mounted = match (rustix::fs::stat(dir), rustix::fs::stat(dir.join(".."))) {
        (Ok(a), Ok(p)) => a.st_dev != p.st_dev || a.st_ino == p.st_ino,
        _ => false,
    };
    let write_error = write_probe(&dir.join(PROBE_FILE))
        .err()
        .map(|e| e.to_string());
    let space = rustix::fs::statvfs(dir).ok().map(|s| {
        (
            s.f_blocks.saturating_mul(s.f_frsize),
            s.f_bavail.saturating_mul(s.f_frsize),
        )
    });
    Probe {
        present: true,
        mounted,
        write_error,
        space,
    }
}

fn write_probe(path: &Path) -> std::io::Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)?;
    f.write_all(b"stratus")?;
    f.sync_all()?;
    drop(f);
    std::fs::remove_file(path)
}

/// Installs `bytes` as `dir/file` so that a reader sees the old file or the new one whole:
/// written to a temporary file in the same directory, synced, renamed over the old one, the
/// directory synced. Idempotent: a file that already holds `bytes` is left alone (`false`).
///
/// # Errors
/// The directory cannot be written.
pub fn install(dir: &Path, file: &str, bytes: &[u8]) -> Result<bool, DriverError> {
    let target = dir.join(file);
    if std::fs::read(&target).is_ok_and(|old| old == bytes) {
        return Ok(false);
    }
    let what = |verb: &str| format!("{verb} ring file {}", target.display());
    std::fs::create_dir_all(dir)
        .map_err(|e| DriverError::io(what("create the directory of"), e))?;
    let tmp = dir.join(format!(".{file}.tmp"));
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)
        .map_err(|e| DriverError::io(what("write"), e))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(|e| DriverError::io(what("write"), e))?;
    drop(f);
    std::fs::rename(&tmp, &target).map_err(|e| DriverError::io(what("rename into place"), e))?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| DriverError::io(what("sync the directory of"), e))?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ring_is_installed_whole_and_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let swift = dir.path().join("swift");
        assert!(install(&swift, "object.ring.gz", b"v1").expect("install"));
        assert!(!install(&swift, "object.ring.gz", b"v1").expect("again"));
        assert!(install(&swift, "object.ring.gz", b"v2").expect("v2"));
        assert_eq!(
            std::fs::read(swift.join("object.ring.gz")).expect("read"),
            b"v2"
        );
        let names: Vec<_> = std::fs::read_dir(&swift)
            .expect("list")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, ["object.ring.gz"], "no temporary file is left");
    }

    #[test]
    fn a_directory_is_probed_and_a_missing_one_is_not_present() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = probe(dir.path());
        assert!(p.present);
        assert_eq!(p.write_error, None);
        assert!(p.space.is_some_and(|(total, _)| total > 0));
        assert!(!dir.path().join(PROBE_FILE).exists());
        assert_eq!(probe(&dir.path().join("absent")), Probe::default());
        let file = dir.path().join("file");
        std::fs::write(&file, b"x").expect("write");
        assert!(!probe(&file).present);
        // /proc is a mount point, and takes no file.
        let proc = probe(Path::new("/proc"));
        assert!(proc.mounted && proc.write_error.is_some(), "{proc:?}");
    }
}
