//! A backend for tests: each volume a plain file in a directory (so its device path can be
//! read and written like a real one), no lvm2 or qemu-img, and failures injected on demand:
//! a verb failing outright, or a create "killed" after its data is written and before the
//! rename that completes it.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::{
    Backend, Capacity, DriverError, Format, Observed, PARTIAL_SUFFIX, Source, VolName, io,
};

/// A verb of [`Backend`], for injected failures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Verb {
    /// [`Backend::capacity`].
    Capacity,
    /// [`Backend::recover`].
    Recover,
    /// [`Backend::list`].
    List,
    /// [`Backend::observe`].
    Observe,
    /// [`Backend::create`] (and so snapshots and clones).
    Create,
    /// [`Backend::extend`].
    Extend,
    /// [`Backend::delete`].
    Delete,
    /// [`Backend::device`].
    Device,
}

/// Volumes as files in a directory, with injected failures.
#[derive(Debug)]
pub struct FakeBackend {
    dir: PathBuf,
    total: u64,
    failures: Mutex<HashMap<Verb, u32>>,
    crashes: Mutex<u32>,
}

impl FakeBackend {
    /// A store of `total` bytes in `dir` (which must exist). Two fakes on one directory
    /// are the same store, as an agent started again finds its host.
    pub fn new(dir: &Path, total: u64) -> Self {
        Self {
            dir: dir.into(),
            total,
            failures: Mutex::default(),
            crashes: Mutex::default(),
        }
    }

    /// The next `n` calls of `verb` fail before doing anything.
    pub fn fail(&self, verb: Verb, n: u32) {
        self.failures
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(verb, n);
    }

    /// The next `n` creates stop after writing the data and before completing the volume,
    /// as a process killed there would (the partial volume is left behind).
    pub fn crash_creates(&self, n: u32) {
        *self
            .crashes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = n;
    }

    /// Whether anything but complete volumes is in the store.
    pub fn leftovers(&self) -> Vec<String> {
        std::fs::read_dir(&self.dir)
            .map(|l| {
                l.filter_map(Result::ok)
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| VolName::parse(n).is_none())
                    .collect()
            })
            .unwrap_or_default()
    }

    fn check(&self, verb: Verb) -> Result<(), DriverError> {
        let mut f = self
            .failures
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match f.get_mut(&verb) {
            Some(n) if *n > 0 => {
                *n -= 1;
                Err(DriverError::Injected(verb))
            }
            _ => Ok(()),
        }
    }

    fn crash(&self) -> bool {
        let mut c = self
            .crashes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let crash = *c > 0;
        *c = c.saturating_sub(1);
        crash
    }

    fn path(&self, name: &VolName) -> PathBuf {
        self.dir.join(name.as_str())
    }

    fn size(path: &Path) -> Result<Option<u64>, DriverError> {
        match std::fs::metadata(path) {
            Ok(m) => Ok(Some(m.len())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io("stat", path)(e)),
        }
    }

    fn used(&self) -> Result<u64, DriverError> {
        Ok(self.list_all()?.iter().map(|(_, o)| o.size).sum())
    }

    fn list_all(&self) -> Result<Vec<(VolName, Observed)>, DriverError> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(&self.dir).map_err(io("read", &self.dir))? {
            let e = e.map_err(io("read", &self.dir))?;
            if let Some(name) = e.file_name().to_str().and_then(VolName::parse)
                && let Some(size) = Self::size(&e.path())?
            {
                out.push((name, Observed { size }));
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }
}

fn remove(path: &Path) -> Result<(), DriverError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io("remove", path)(e)),
    }
}

impl Backend for FakeBackend {
    fn describe(&self) -> String {
        format!("fake:{}", self.dir.display())
    }

    fn capacity(&self) -> Result<Capacity, DriverError> {
        self.check(Verb::Capacity)?;
        Ok(Capacity {
            total: self.total,
            free: self.total.saturating_sub(self.used()?),
        })
    }

    fn recover(&self) -> Result<Vec<String>, DriverError> {
        self.check(Verb::Recover)?;
        let mut removed = Vec::new();
        for e in std::fs::read_dir(&self.dir).map_err(io("read", &self.dir))? {
            let e = e.map_err(io("read", &self.dir))?;
            let name = e.file_name().to_string_lossy().into_owned();
            if name
                .strip_suffix(PARTIAL_SUFFIX)
                .and_then(VolName::parse)
                .is_some()
            {
                remove(&e.path())?;
                removed.push(name);
            }
        }
        Ok(removed)
    }

    fn list(&self) -> Result<Vec<(VolName, Observed)>, DriverError> {
        self.check(Verb::List)?;
        self.list_all()
    }

    fn observe(&self, name: &VolName) -> Result<Option<Observed>, DriverError> {
        self.check(Verb::Observe)?;
        Ok(Self::size(&self.path(name))?.map(|size| Observed { size }))
    }

    fn create(
        &self,
        name: &VolName,
        size: u64,
        source: Source<'_>,
    ) -> Result<Observed, DriverError> {
        self.check(Verb::Create)?;
        if let Some(size) = Self::size(&self.path(name))? {
            return Ok(Observed { size });
        }
        let data = match source {
            Source::Empty => Vec::new(),
            Source::Copy(from) => std::fs::read(self.path(from))
                .map_err(|_| DriverError::NotFound(from.to_string()))?,
            Source::Image { path, format } => {
                if format != Format::Raw {
                    return Err(DriverError::Invalid(format!(
                        "the fake reads raw images only, not {format}"
                    )));
                }
                let mut data = Vec::new();
                File::open(path)
                    .and_then(|mut f| f.read_to_end(&mut data))
                    .map_err(io("read", path))?;
                data
            }
        };
        if data.len() as u64 > size {
            return Err(DriverError::Invalid(format!(
                "the source is {} bytes, larger than {size}",
                data.len()
            )));
        }
        if size > self.total.saturating_sub(self.used()?) {
            return Err(DriverError::NoSpace(format!("{size} bytes")));
        }
        let partial = self.dir.join(format!("{name}{PARTIAL_SUFFIX}"));
        let f = File::create(&partial).map_err(io("create", &partial))?;
        f.set_len(size).map_err(io("size", &partial))?;
        std::os::unix::fs::FileExt::write_all_at(&f, &data, 0).map_err(io("write", &partial))?;
        if self.crash() {
            return Err(DriverError::Injected(Verb::Create));
        }
        std::fs::rename(&partial, self.path(name)).map_err(io("rename", &partial))?;
        Ok(Observed { size })
    }

    fn extend(&self, name: &VolName, size: u64) -> Result<Observed, DriverError> {
        self.check(Verb::Extend)?;
        let path = self.path(name);
        let have = Self::size(&path)?.ok_or_else(|| DriverError::NotFound(name.to_string()))?;
        if have >= size {
            return Ok(Observed { size: have });
        }
        if size - have > self.total.saturating_sub(self.used()?) {
            return Err(DriverError::NoSpace(format!("{size} bytes")));
        }
        OpenOptions::new()
            .write(true)
            .open(&path)
            .and_then(|f| f.set_len(size))
            .map_err(io("resize", &path))?;
        Ok(Observed { size })
    }

    fn delete(&self, name: &VolName) -> Result<(), DriverError> {
        self.check(Verb::Delete)?;
        remove(&self.dir.join(format!("{name}{PARTIAL_SUFFIX}")))?;
        remove(&self.path(name))
    }

    fn device(&self, name: &VolName) -> Result<PathBuf, DriverError> {
        self.check(Verb::Device)?;
        let path = self.path(name);
        match Self::size(&path)? {
            Some(_) => Ok(path),
            None => Err(DriverError::NotFound(name.to_string())),
        }
    }
}
