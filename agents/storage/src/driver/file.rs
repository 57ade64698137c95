//! Volumes as sparse raw files in one directory, made and changed with qemu-img.
//!
//! Raw, so that a volume's file is its device (read and written as it is, attached to a
//! guest as a raw disk, reached by a loop device if need be); copies are sparse
//! (`qemu-img convert`). A volume is built as `NAME.raw.partial` and renamed once its data
//! is complete; the directory is synced after each rename and removal.

use std::ffi::OsStr;
use std::fs::File;
use std::path::{Path, PathBuf};

use super::{Backend, Capacity, DriverError, Format, Observed, PARTIAL_SUFFIX, Source, VolName};
use super::{cmd, data, io};

/// The extension of a volume's file.
const EXT: &str = ".raw";

/// Raw files in a directory.
#[derive(Debug, Clone)]
pub struct FilePool {
    dir: PathBuf,
}

impl FilePool {
    /// The pool in `dir` (an absolute path; it must exist when verbs are called).
    ///
    /// # Errors
    /// [`DriverError::Invalid`] for a relative path or one qemu-img could take for a
    /// protocol.
    pub fn new(dir: &Path) -> Result<Self, DriverError> {
        if !dir.is_absolute() || dir.as_os_str().as_encoded_bytes().contains(&0) {
            return Err(DriverError::Invalid(format!(
                "{} is not an absolute directory",
                dir.display()
            )));
        }
        Ok(Self { dir: dir.into() })
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, name: &VolName) -> PathBuf {
        self.dir.join(format!("{name}{EXT}"))
    }

    fn partial(&self, name: &VolName) -> PathBuf {
        self.dir.join(format!("{name}{EXT}{PARTIAL_SUFFIX}"))
    }

    fn check_dir(&self) -> Result<(), DriverError> {
        if self.dir.is_dir() {
            Ok(())
        } else {
            Err(DriverError::Unavailable(format!(
                "no directory {}",
                self.dir.display()
            )))
        }
    }

    fn sync_dir(&self) -> Result<(), DriverError> {
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io("sync", &self.dir))
    }

    /// Grows `name` to `size` bytes with `how` (given its path) when it is smaller; never
    /// shrinks it.
    fn grow(
        &self,
        name: &VolName,
        size: u64,
        how: impl FnOnce(&Path) -> Result<(), DriverError>,
    ) -> Result<Observed, DriverError> {
        let have = self
            .observe(name)?
            .ok_or_else(|| DriverError::NotFound(name.to_string()))?;
        if have.size >= size {
            return Ok(have);
        }
        how(&self.path(name))?;
        self.observe(name)?
            .ok_or_else(|| DriverError::NotFound(name.to_string()))
    }

    fn size_of(path: &Path) -> Result<Option<u64>, DriverError> {
        match std::fs::metadata(path) {
            Ok(m) => Ok(Some(m.len())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io("stat", path)(e)),
        }
    }

    fn remove(path: &Path) -> Result<(), DriverError> {
        match std::fs::remove_file(path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io("remove", path)(e)),
        }
    }

    fn build(&self, partial: &Path, size: u64, source: Source<'_>) -> Result<(), DriverError> {
        match source {
            Source::Empty => {
                qemu_img(["create", "-q", "-f", "raw"], partial, Some(size))?;
            }
            Source::Image { path, format } => {
                convert(path, format, partial)?;
                qemu_img(["resize", "-q", "-f", "raw"], partial, Some(size))?;
            }
            Source::Copy(from) => {
                convert(&self.path(from), Format::Raw, partial)?;
                qemu_img(["resize", "-q", "-f", "raw"], partial, Some(size))?;
            }
        }
        data::flush(partial)
    }
}

/// `qemu-img VERB... PATH [SIZE]`.
fn qemu_img<const N: usize>(
    verb: [&str; N],
    path: &Path,
    size: Option<u64>,
) -> Result<(), DriverError> {
    let size = size.map(|s| s.to_string());
    let mut args: Vec<&OsStr> = verb.iter().map(OsStr::new).collect();
    args.push(path.as_os_str());
    if let Some(s) = &size {
        args.push(OsStr::new(s));
    }
    cmd::run("qemu-img", args).map(drop)
}

/// A new raw file `to` holding the disk of `from` (sparse).
fn convert(from: &Path, format: Format, to: &Path) -> Result<(), DriverError> {
    cmd::run(
        "qemu-img",
        [
            "convert".as_ref(),
            "-f".as_ref(),
            format.qemu_format().as_ref(),
            "-O".as_ref(),
            "raw".as_ref(),
            from.as_os_str(),
            to.as_os_str(),
        ] as [&OsStr; 7],
    )
    .map(drop)
}

impl Backend for FilePool {
    fn describe(&self) -> String {
        format!("file:{}", self.dir.display())
    }

    /// What the pool's files occupy on disk (sparse: their allocated blocks) plus what the
    /// filesystem has free for an unprivileged writer; other files on the same filesystem,
    /// and the blocks it keeps for root, are not the pool's. The files are measured before
    /// the free space, so a write in between understates, never overstates, the capacity.
    fn capacity(&self) -> Result<Capacity, DriverError> {
        use std::os::unix::fs::MetadataExt;
        self.check_dir()?;
        let mut used: u64 = 0;
        for entry in std::fs::read_dir(&self.dir).map_err(io("read", &self.dir))? {
            let entry = entry.map_err(io("read", &self.dir))?;
            let name = entry.file_name();
            let Some(base) = name.to_str().and_then(|n| {
                let n = n.strip_suffix(PARTIAL_SUFFIX).unwrap_or(n);
                n.strip_suffix(EXT)
            }) else {
                continue;
            };
            if VolName::parse(base).is_none() {
                continue;
            }
            match entry.metadata() {
                Ok(m) if m.is_file() => used = used.saturating_add(m.blocks().saturating_mul(512)),
                Ok(_) => {}
                // Removed since the directory was read.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io("stat", &entry.path())(e)),
            }
        }
        let st = rustix::fs::statvfs(&self.dir).map_err(|e| io("measure", &self.dir)(e.into()))?;
        let free = st.f_bavail.saturating_mul(st.f_frsize);
        Ok(Capacity {
            total: used.saturating_add(free),
            free,
        })
    }

    fn recover(&self) -> Result<Vec<String>, DriverError> {
        self.check_dir()?;
        let mut removed = Vec::new();
        for entry in std::fs::read_dir(&self.dir).map_err(io("read", &self.dir))? {
            let entry = entry.map_err(io("read", &self.dir))?;
            let name = entry.file_name();
            let Some(base) = name
                .to_str()
                .and_then(|n| n.strip_suffix(PARTIAL_SUFFIX))
                .and_then(|n| n.strip_suffix(EXT))
            else {
                continue;
            };
            if VolName::parse(base).is_some() {
                Self::remove(&entry.path())?;
                removed.push(entry.path().display().to_string());
            }
        }
        if !removed.is_empty() {
            self.sync_dir()?;
        }
        Ok(removed)
    }

    fn list(&self) -> Result<Vec<(VolName, Observed)>, DriverError> {
        self.check_dir()?;
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&self.dir).map_err(io("read", &self.dir))? {
            let entry = entry.map_err(io("read", &self.dir))?;
            let Some(name) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.strip_suffix(EXT))
                .and_then(VolName::parse)
            else {
                continue;
            };
            if let Some(size) = Self::size_of(&entry.path())? {
                out.push((name, Observed { size }));
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    fn observe(&self, name: &VolName) -> Result<Option<Observed>, DriverError> {
        self.check_dir()?;
        Ok(Self::size_of(&self.path(name))?.map(|size| Observed { size }))
    }

    fn create(
        &self,
        name: &VolName,
        size: u64,
        source: Source<'_>,
    ) -> Result<Observed, DriverError> {
        if let Some(o) = self.observe(name)? {
            return Ok(o);
        }
        match source {
            Source::Empty => {}
            Source::Image { path, format } => {
                data::check_fits(path, format, size)?;
            }
            Source::Copy(from) => {
                let have = Self::size_of(&self.path(from))?
                    .ok_or_else(|| DriverError::NotFound(from.to_string()))?;
                if have > size {
                    return Err(DriverError::Invalid(format!(
                        "{from} is {have} bytes, larger than {size}"
                    )));
                }
            }
        }
        let cap = self.capacity()?;
        if source_is_empty(source) && size > cap.total {
            return Err(DriverError::NoSpace(format!(
                "{size} bytes is more than the file system of {} holds",
                self.dir.display()
            )));
        }
        let partial = self.partial(name);
        Self::remove(&partial)?;
        if let Err(e) = self.build(&partial, size, source) {
            if let Err(clean) = Self::remove(&partial) {
                tracing::warn!(volume = %name, error = %clean, "cannot remove a partial volume; the next start removes it");
            }
            // A source deleted between the check above and the copy's opening it: the copy
            // failed because the source is gone, which is what the caller is told.
            if let Source::Copy(from) = source
                && Self::size_of(&self.path(from))?.is_none()
            {
                return Err(DriverError::NotFound(from.to_string()));
            }
            return Err(e);
        }
        let path = self.path(name);
        std::fs::rename(&partial, &path).map_err(io("rename", &partial))?;
        self.sync_dir()?;
        self.observe(name)?
            .ok_or_else(|| DriverError::NotFound(name.to_string()))
    }

    fn extend(&self, name: &VolName, size: u64) -> Result<Observed, DriverError> {
        self.grow(name, size, |path| {
            qemu_img(["resize", "-q", "-f", "raw"], path, Some(size))
        })
    }

    /// Grows the raw file as `qemu-img resize` of a raw file does (sparse, its data kept),
    /// without the resize lock `qemu-img` asks for: the QEMU or `qemu-nbd` that holds the
    /// file open (and that lock) sees the file grow, and tells its guest or serves the new
    /// size anew.
    fn extend_held(&self, name: &VolName, size: u64) -> Result<Observed, DriverError> {
        self.grow(name, size, |path| {
            let file = std::fs::OpenOptions::new()
                .write(true)
                .open(path)
                .map_err(io("open", path))?;
            file.set_len(size).map_err(io("grow", path))?;
            file.sync_all().map_err(io("sync", path))
        })
    }

    fn delete(&self, name: &VolName) -> Result<(), DriverError> {
        Self::remove(&self.partial(name))?;
        Self::remove(&self.path(name))?;
        if self.dir.is_dir() {
            self.sync_dir()?;
        }
        Ok(())
    }

    fn device(&self, name: &VolName) -> Result<PathBuf, DriverError> {
        let path = self.path(name);
        match Self::size_of(&path)? {
            Some(_) => Ok(path),
            None => Err(DriverError::NotFound(name.to_string())),
        }
    }
}

fn source_is_empty(s: Source<'_>) -> bool {
    matches!(s, Source::Empty)
}
