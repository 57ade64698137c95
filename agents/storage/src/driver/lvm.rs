//! Volumes as logical volumes of one LVM volume group, through the lvm2 commands and their
//! JSON reports.
//!
//! Without device-mapper in the kernel (detected from `/proc/misc`), lvm2 can only edit
//! metadata: every command runs with `--driverloaded n` (lvm2's switch for "no
//! device-mapper", which also skips udev), LVs are created inactive (`--activate n`) and
//! unzeroed by lvm2 (`--zero n`; the driver zeroes the whole LV itself), and allocated
//! `contiguous`, so that an LV is one run of extents on one PV. Its data is then the
//! region of that PV at `pe_start + first extent × extent size`, which a loop device
//! (`losetup --offset --sizelimit`) makes a block device; snapshots and clones are full
//! copies of the region. LVs of several segments (made outside Stratus) are refused. With
//! device-mapper, LVs are activated normally and their device is `/dev/VG/LV`; copy-on-write
//! (thin) snapshots are not used yet.
//!
//! A volume is built as `NAME.partial` and renamed (`lvrename`) once its data is complete.
//! Without device-mapper a volume grows into the free extents right after it, or else into a
//! copy (`NAME.grown`) swapped in for it by two renames that [`Backend::recover`] completes
//! or undoes after a crash. Grown in place, the loop devices over it are not set up again
//! but grow with it (their size limit raised through the loop driver's ioctl): a guest
//! holding one keeps it and sees the new size once told (libvirt's `blockresize`). Only
//! devices over exactly the length the volume had grow (that length is an LV tag from before
//! the `lvextend` until its devices grew, so recovery after a crash knows it too); one at the
//! same offset over another length, or detached while held (`AUTOCLEAR`), never does, and
//! recovery takes those over another length off the volume. No loop device outlives the extents it is over:
//! `losetup -d` only marks a device some process holds to go with its last holder, so such a
//! device of a volume being removed is fenced (its offset moved past the end of the PV: empty,
//! its holder reads and writes nothing) before the LV goes, and any device found over a new
//! volume's extents, or over free extents a volume grows into, is taken off them before they
//! are zeroed (one left by an older agent, or by hand). A volume
//! a guest holds is never moved ([`Backend::extend_held`]): its writes during the copy would
//! be lost, and it would go on writing to extents the volume no longer owns. So such a pool
//! grows a volume in use only when the space after it is free
//! ([`InUseGrowth::WhenSpaceFollows`]), which only the driver knows at the time: the API
//! lets the grow through, and the agent says why a volume waits to be detached.
//!
//! Without device-mapper the driver itself reads and writes a volume's extents by their
//! offset on the PV, so every verb that allocates, frees or reads extents (create, and with
//! it snapshot and clone and their copy; extend; delete; device; recover) holds the volume
//! group's one lock ([`Lvm::pool_lock`]) and reads the group's LVs only once it holds it: a
//! copy never reads extents that a concurrent delete freed and a concurrent create took,
//! and the free extents after a volume are not given to another one between their check,
//! their zeroing and the `lvextend`.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsStr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError, RwLock};

use serde::Deserialize;

use super::loopdev::{self, Region};
use super::{
    Backend, Capacity, DriverError, InUseGrowth, Observed, PARTIAL_SUFFIX, Source, VolName, cmd,
    data,
};

/// The logical volumes of one volume group.
#[derive(Debug, Clone)]
pub struct Lvm {
    vg: String,
    dm: bool,
    /// Held to read the group's LVs, and exclusively to swap a grown copy in for a volume,
    /// so that no reader sees the volume missing between the two renames.
    swap: Arc<RwLock<()>>,
    /// The volume group's lock, shared by every [`Lvm`] of the same group in this process.
    pool: Arc<Mutex<()>>,
}

/// Run (once, for the group it names) when a copy is about to read its source: lets a test
/// race another verb against the copy.
#[cfg(test)]
#[allow(clippy::type_complexity)]
pub(crate) static BEFORE_COPY: Mutex<Option<(String, Box<dyn FnOnce() + Send>)>> = Mutex::new(None);

/// The lock of volume group `vg`: one per group for the whole process.
fn group_lock(vg: &str) -> Arc<Mutex<()>> {
    static LOCKS: OnceLock<Mutex<HashMap<String, Arc<Mutex<()>>>>> = OnceLock::new();
    LOCKS
        .get_or_init(Mutex::default)
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .entry(vg.to_owned())
        .or_default()
        .clone()
}

/// The suffix of a volume's grown copy (complete once it has no [`PARTIAL_SUFFIX`]).
const GROWN: &str = ".grown";
/// The suffix a volume is renamed to while its grown copy takes its name.
const OLD: &str = ".old";

/// Whether the running kernel has device-mapper.
pub fn has_device_mapper() -> bool {
    std::fs::read_to_string("/proc/misc")
        .is_ok_and(|m| m.lines().any(|l| l.trim_end().ends_with(" device-mapper")))
}

/// Whether LV `name` is one of the pool's: a volume or snapshot, or a partial, grown or old
/// copy of one.
fn ours(name: &str) -> bool {
    let mut base = name;
    for extra in [PARTIAL_SUFFIX, GROWN, OLD] {
        base = base.strip_suffix(extra).unwrap_or(base);
    }
    VolName::parse(base).is_some()
}

/// One logical volume as lvs reports it.
#[derive(Debug, Clone)]
struct Lv {
    size: u64,
    /// The length in bytes it had before a grow in place whose loop devices may not have
    /// grown yet (its [`GROWING`] tag).
    growing_from: Option<u64>,
    /// Its segments: the PV, the first extent and the extent count of each.
    segments: Vec<(PathBuf, u64, u64)>,
    /// Where its first segment's PV has its first extent and the group's extent size, when
    /// the listing said (without device-mapper: [`Lvm::lvs`] reads them with the LVs).
    place: Option<Place>,
}

/// A PV's first extent offset and the group's extent size, in bytes.
#[derive(Debug, Clone, Copy)]
struct Place {
    pe_start: u64,
    extent: u64,
}

#[derive(Deserialize)]
struct Report<T> {
    report: Vec<T>,
}

#[derive(Deserialize)]
struct SegReport {
    #[serde(default)]
    seg: Vec<SegRow>,
}

#[derive(Deserialize)]
struct SegRow {
    lv_name: String,
    lv_size: String,
    seg_pe_ranges: String,
    #[serde(default)]
    lv_tags: String,
}

/// The tag prefix of an LV grown in place whose loop devices may not have grown with it,
/// followed by the length in bytes it had before: only devices over exactly that length are
/// its own to grow (any other one at its offset, e.g. one lazily detached from a volume
/// deleted before it, is detached instead).
const GROWING: &str = "stratus-growing-from-";

/// The length a [`GROWING`] tag of `tags` (lvs's comma-separated `lv_tags`) records.
fn growing_from(tags: &str) -> Option<u64> {
    tags.split(',')
        .find_map(|t| t.strip_prefix(GROWING)?.parse().ok())
}

#[derive(Deserialize)]
struct VgReport {
    #[serde(default)]
    vg: Vec<VgRow>,
}

#[derive(Deserialize)]
struct VgRow {
    vg_size: String,
    vg_free: String,
}

#[derive(Deserialize)]
struct PvReport {
    #[serde(default)]
    pv: Vec<PvRow>,
}

#[derive(Deserialize)]
struct PvRow {
    pv_name: PathBuf,
    pe_start: String,
    vg_name: String,
    vg_extent_size: String,
}

#[derive(Deserialize)]
struct PvSegReport {
    #[serde(default)]
    pvseg: Vec<PvSegRow>,
}

/// One run of extents of a PV, and the LV it belongs to (none: free).
#[derive(Deserialize)]
struct PvSegRow {
    pv_name: PathBuf,
    pe_start: String,
    pvseg_start: String,
    pvseg_size: String,
    vg_name: String,
    #[serde(default)]
    vg_uuid: String,
    vg_extent_size: String,
    lv_name: String,
    lv_size: String,
    #[serde(default)]
    lv_tags: String,
}

fn number(what: &'static str, s: &str) -> Result<u64, DriverError> {
    s.trim().parse().map_err(|_| {
        DriverError::Unsupported(format!("lvm reported {what} {s:?}, not a number of bytes"))
    })
}

fn rows<T: for<'de> Deserialize<'de>>(
    what: &'static str,
    out: &[u8],
) -> Result<Vec<T>, DriverError> {
    let r: Report<T> = serde_json::from_slice(out).map_err(|e| DriverError::Report(what, e))?;
    Ok(r.report)
}

/// `PV:FIRST-LAST` of one segment; anything else (several ranges: striped or mirrored) is
/// `None`.
fn pe_range(s: &str) -> Option<(PathBuf, u64, u64)> {
    let s = s.trim();
    if s.contains(' ') {
        return None;
    }
    let (pv, range) = s.rsplit_once(':')?;
    let (first, last) = range.split_once('-')?;
    let (first, last): (u64, u64) = (first.parse().ok()?, last.parse().ok()?);
    Some((PathBuf::from(pv), first, last.checked_sub(first)? + 1))
}

impl Lvm {
    /// The volume group `vg` (which must exist when verbs are called, not now).
    ///
    /// # Errors
    /// [`DriverError::Invalid`] for a name lvm2 does not allow.
    pub fn new(vg: &str) -> Result<Self, DriverError> {
        Self::with_device_mapper(vg, has_device_mapper())
    }

    /// As [`Lvm::new`], saying whether device-mapper is there.
    ///
    /// # Errors
    /// As [`Lvm::new`].
    pub fn with_device_mapper(vg: &str, dm: bool) -> Result<Self, DriverError> {
        let ok = !vg.is_empty()
            && vg.len() <= 127
            && !vg.starts_with('-')
            && vg != "."
            && vg != ".."
            && vg
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"+_.-".contains(&b));
        if !ok {
            return Err(DriverError::Invalid(format!(
                "{vg:?} is not a volume group name"
            )));
        }
        Ok(Self {
            vg: vg.into(),
            dm,
            swap: Arc::default(),
            pool: group_lock(vg),
        })
    }

    /// Holds the volume group's lock: no other verb of this process allocates, frees or
    /// reads extents of the group by their offset until it is dropped.
    fn pool_lock(&self) -> MutexGuard<'_, ()> {
        self.pool.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The volume group.
    pub fn vg(&self) -> &str {
        &self.vg
    }

    /// Runs an lvm2 command with `args` after the options every call takes.
    fn lvm<'a>(
        &self,
        program: &'static str,
        args: impl IntoIterator<Item = &'a OsStr>,
    ) -> Result<Vec<u8>, DriverError> {
        let mut all: Vec<&OsStr> = Vec::new();
        if !self.dm {
            all.extend(["--driverloaded", "n"].map(OsStr::new));
        }
        all.extend(args);
        cmd::run(program, all).map_err(|e| self.classify(e))
    }

    /// What lvm2's complaints mean.
    fn classify(&self, e: DriverError) -> DriverError {
        let DriverError::Command { source, .. } = &e else {
            return e;
        };
        let said = source.stderr();
        if said.contains(&format!("Volume group \"{}\" not found", self.vg)) {
            DriverError::Unavailable(format!("no volume group {}", self.vg))
        } else if said.contains("Insufficient") {
            DriverError::NoSpace(format!(
                "volume group {}: {}",
                self.vg,
                said.lines().last().unwrap_or_default().trim()
            ))
        } else {
            e
        }
    }

    /// Every LV of the group. Without device-mapper, read from the PVs' segments in one
    /// report that also gives each LV's place on its PV ([`Lv::place`]), so that finding its
    /// region takes no other call: each lvm2 command costs some 50 ms on these machines
    /// (most of it tearing down its asynchronous I/O), and a create finds two regions.
    fn lvs(&self) -> Result<BTreeMap<String, Lv>, DriverError> {
        let _read = self.swap.read().unwrap_or_else(PoisonError::into_inner);
        if !self.dm {
            return self.pv_segments();
        }
        let out = self.lvm(
            "lvs",
            [
                "--reportformat",
                "json",
                "--units",
                "b",
                "--nosuffix",
                "--segments",
                "-o",
                "lv_name,lv_size,seg_pe_ranges,lv_tags",
                &self.vg,
            ]
            .map(OsStr::new),
        )?;
        let mut lvs: BTreeMap<String, Lv> = BTreeMap::new();
        for report in rows::<SegReport>("lvs", &out)? {
            for row in report.seg {
                let size = number("lv_size", &row.lv_size)?;
                let lv = lvs.entry(row.lv_name).or_insert(Lv {
                    size,
                    growing_from: growing_from(&row.lv_tags),
                    segments: Vec::new(),
                    place: None,
                });
                match pe_range(&row.seg_pe_ranges) {
                    Some(seg) => lv.segments.push(seg),
                    // Striped or mirrored: several PVs at once, no single region.
                    None => lv
                        .segments
                        .extend([(PathBuf::new(), 0, 0), (PathBuf::new(), 0, 0)]),
                }
            }
        }
        Ok(lvs)
    }

    /// The group's LVs from `pvs --segments`: each run of extents of a PV of the group with
    /// the LV it belongs to, its PV's first extent offset and the extent size. An LV of
    /// several runs (on one PV or several) has a segment for each; hidden LVs (`[name]`,
    /// which `lvs` does not list either) and free runs are left out.
    fn pv_segments(&self) -> Result<BTreeMap<String, Lv>, DriverError> {
        let out = self.lvm(
            "pvs",
            [
                "--reportformat",
                "json",
                "--units",
                "b",
                "--nosuffix",
                "--segments",
                "-o",
                "pv_name,pe_start,pvseg_start,pvseg_size,vg_name,vg_uuid,vg_extent_size,lv_name,lv_size,lv_tags",
            ]
            .map(OsStr::new),
        )?;
        self.segments_of(&out)
    }

    /// The group's LVs in a `pvs --segments` report `out` (see [`Lvm::pv_segments`]). The
    /// report lists every volume group of the host: two of the group's name (a copy of its
    /// disk attached, say) would mix another group's LVs and extents with its own, which
    /// `lvs` refuses by name too.
    fn segments_of(&self, out: &[u8]) -> Result<BTreeMap<String, Lv>, DriverError> {
        let mut uuid: Option<String> = None;
        let mut lvs: BTreeMap<String, Lv> = BTreeMap::new();
        for row in rows::<PvSegReport>("pvs", out)?
            .into_iter()
            .flat_map(|r| r.pvseg)
        {
            if row.vg_name != self.vg {
                continue;
            }
            match &uuid {
                Some(u) if *u != row.vg_uuid => {
                    return Err(DriverError::Unavailable(format!(
                        "several volume groups are named {} ({u} and {}): rename all but one (vgrename by UUID)",
                        self.vg, row.vg_uuid
                    )));
                }
                Some(_) => {}
                None => uuid = Some(row.vg_uuid.clone()),
            }
            if row.lv_name.is_empty() || row.lv_name.starts_with('[') {
                continue;
            }
            let place = Place {
                pe_start: number("pe_start", &row.pe_start)?,
                extent: number("vg_extent_size", &row.vg_extent_size)?,
            };
            let segment = (
                row.pv_name,
                number("pvseg_start", &row.pvseg_start)?,
                number("pvseg_size", &row.pvseg_size)?,
            );
            let lv = lvs.entry(row.lv_name).or_insert(Lv {
                size: number("lv_size", &row.lv_size)?,
                growing_from: growing_from(&row.lv_tags),
                segments: Vec::new(),
                place: Some(place),
            });
            lv.segments.push(segment);
        }
        Ok(lvs)
    }

    /// The group's extent size and each of its PVs' first extent offset.
    fn layout(&self) -> Result<(u64, BTreeMap<PathBuf, u64>), DriverError> {
        let out = self.lvm(
            "pvs",
            [
                "--reportformat",
                "json",
                "--units",
                "b",
                "--nosuffix",
                "-o",
                "pv_name,pe_start,vg_name,vg_extent_size",
            ]
            .map(OsStr::new),
        )?;
        let mut extent = None;
        let mut starts = BTreeMap::new();
        for pv in rows::<PvReport>("pvs", &out)?
            .into_iter()
            .flat_map(|r| r.pv)
        {
            if pv.vg_name == self.vg {
                extent = Some(number("vg_extent_size", &pv.vg_extent_size)?);
                starts.insert(pv.pv_name, number("pe_start", &pv.pe_start)?);
            }
        }
        let extent = extent
            .ok_or_else(|| DriverError::Unavailable(format!("no volume group {}", self.vg)))?;
        Ok((extent, starts))
    }

    /// Where `name`'s data is: a region of its PV (without device-mapper) or its active LV.
    fn region(&self, name: &str, lv: &Lv) -> Result<Region, DriverError> {
        if self.dm {
            self.lvm(
                "lvchange",
                ["-ay".as_ref(), OsStr::new(&format!("{}/{name}", self.vg))],
            )?;
            return Ok(Region {
                path: PathBuf::from("/dev").join(&self.vg).join(name),
                offset: 0,
                len: lv.size,
            });
        }
        let [(pv, first, count)] = lv.segments.as_slice() else {
            return Err(DriverError::Unsupported(format!(
                "logical volume {}/{name} has {} segments; without device-mapper only one contiguous segment can be used",
                self.vg,
                lv.segments.len()
            )));
        };
        let place = match lv.place {
            Some(p) => p,
            None => {
                let (extent, starts) = self.layout()?;
                let pe_start = starts.get(pv).copied().ok_or_else(|| {
                    DriverError::Unsupported(format!("{} is not a PV of {}", pv.display(), self.vg))
                })?;
                Place { pe_start, extent }
            }
        };
        // The region is the LV's data only if its one run of extents is all of it: an LV
        // with a segment on no PV (`zero`, `error`, thin) is listed with that run alone, and
        // its size would reach into the extents after it.
        if count.checked_mul(place.extent) != Some(lv.size) {
            return Err(DriverError::Unsupported(format!(
                "logical volume {}/{name} is {} bytes and its extents on {} hold {}; without device-mapper only an LV of one contiguous segment can be used",
                self.vg,
                lv.size,
                pv.display(),
                count.saturating_mul(place.extent)
            )));
        }
        Ok(Region {
            path: pv.clone(),
            offset: place.pe_start + first * place.extent,
            len: lv.size,
        })
    }

    /// Removes LV `name` and every loop device over it (answered). A missing one is `Ok`.
    /// A device some process still holds is fenced rather than left over the extents (they
    /// are free for the next volume once the LV goes); one that cannot be keeps the LV.
    fn remove(&self, name: &str, lv: Option<&Lv>) -> Result<Vec<PathBuf>, DriverError> {
        let Some(lv) = lv else {
            return Ok(Vec::new());
        };
        let mut detached = Vec::new();
        if !self.dm && lv.segments.len() == 1 {
            detached = loopdev::release_overlapping(&self.region(name, lv)?)?;
        }
        self.lvm(
            "lvremove",
            ["-y".as_ref(), OsStr::new(&format!("{}/{name}", self.vg))],
        )?;
        Ok(detached)
    }

    /// Builds `partial` of `size` bytes from `source` (already checked to exist and fit), and
    /// renames it to its volume's name; returns the volume as made.
    fn build(
        &self,
        partial: &str,
        size: u64,
        source: Source<'_>,
        lvs: &BTreeMap<String, Lv>,
    ) -> Result<Observed, DriverError> {
        let size_arg = format!("{size}b");
        let mut args: Vec<&OsStr> = [
            "--activate",
            "n",
            "--zero",
            "n",
            "--wipesignatures",
            "n",
            "--alloc",
            "contiguous",
            "-y",
            "-L",
        ]
        .map(OsStr::new)
        .to_vec();
        args.extend([
            OsStr::new(&size_arg),
            OsStr::new("-n"),
            OsStr::new(partial),
            OsStr::new(&self.vg),
        ]);
        self.lvm("lvcreate", args)?;
        let lv = self
            .lvs()?
            .remove(partial)
            .ok_or_else(|| DriverError::NotFound(format!("{}/{partial}", self.vg)))?;
        let region = self.region(partial, &lv)?;
        // The extents were free: a device still over them (left by an older agent, or by
        // hand) is not this volume's, and its holder must reach none of it.
        if !self.dm {
            loopdev::release_overlapping(&region)?;
        }
        // The extents may hold a deleted volume's data: none of it may show.
        data::zero(&region)?;
        match source {
            Source::Empty => {}
            Source::Copy(from) => {
                #[cfg(test)]
                {
                    let mut hook = BEFORE_COPY.lock().unwrap_or_else(PoisonError::into_inner);
                    if hook.as_ref().is_some_and(|(vg, _)| *vg == self.vg)
                        && let Some((_, run)) = hook.take()
                    {
                        drop(hook);
                        run();
                    }
                }
                let src = lvs
                    .get(from.as_str())
                    .ok_or_else(|| DriverError::NotFound(from.to_string()))?;
                let src_region = self.region(from.as_str(), src)?;
                // What was written through the source's device reaches its PV first.
                if !self.dm {
                    for dev in loopdev::list()?.iter().filter(|d| src_region.is(d)) {
                        data::flush(&dev.name)?;
                    }
                }
                data::copy(&src_region, &region, src.size)?;
            }
            Source::Image { path, format } => {
                let dev = self.device_of(&region)?;
                data::convert_onto(path, format, &dev)?;
            }
        }
        self.lvm(
            "lvrename",
            [
                self.vg.as_str(),
                partial,
                partial.trim_end_matches(PARTIAL_SUFFIX),
            ]
            .map(OsStr::new),
        )?;
        // Its size as listed once made (a rename changes nothing else): no listing more.
        Ok(Observed { size: lv.size })
    }

    /// The block device over `region`.
    fn device_of(&self, region: &Region) -> Result<PathBuf, DriverError> {
        if self.dm {
            return Ok(region.path.clone());
        }
        loopdev::attach(region)
    }
}

impl Backend for Lvm {
    fn describe(&self) -> String {
        format!("lvm:{}", self.vg)
    }

    fn grows_in_use(&self) -> InUseGrowth {
        if self.dm {
            InUseGrowth::Always
        } else {
            InUseGrowth::WhenSpaceFollows
        }
    }

    /// The group's free extents plus the pool's own LVs (partial and grown copies included);
    /// LVs others made in the same group are not the pool's. The LVs are listed before the
    /// free space is read, so a create in between understates, never overstates, it.
    fn capacity(&self) -> Result<Capacity, DriverError> {
        let used: u64 = self
            .lvs()?
            .iter()
            .filter(|(name, _)| ours(name))
            .map(|(_, lv)| lv.size)
            .fold(0, u64::saturating_add);
        let out = self.lvm(
            "vgs",
            [
                "--reportformat",
                "json",
                "--units",
                "b",
                "--nosuffix",
                "-o",
                "vg_size,vg_free",
                &self.vg,
            ]
            .map(OsStr::new),
        )?;
        let vg = rows::<VgReport>("vgs", &out)?
            .into_iter()
            .flat_map(|r| r.vg)
            .next()
            .ok_or_else(|| DriverError::Unavailable(format!("no volume group {}", self.vg)))?;
        // The group's size bounds it (and checks the report).
        let size = number("vg_size", &vg.vg_size)?;
        let free = number("vg_free", &vg.vg_free)?;
        Ok(Capacity {
            total: used.saturating_add(free).min(size),
            free,
        })
    }

    fn recover(&self) -> Result<Vec<String>, DriverError> {
        let _pool = self.pool_lock();
        let mut removed = self.finish_swaps()?;
        let lvs = self.lvs()?;
        for (name, lv) in &lvs {
            let base = name
                .strip_suffix(PARTIAL_SUFFIX)
                .map(|b| b.strip_suffix(GROWN).unwrap_or(b));
            if base.is_some_and(|base| VolName::parse(base).is_some()) {
                let detached = self.remove(name, Some(lv))?;
                removed.push(format!("{}/{name}", self.vg));
                removed.extend(detached.iter().map(|d| d.display().to_string()));
            }
        }
        if self.dm {
            return Ok(removed);
        }
        // Loop devices over a region of one of the group's PVs that no LV of the group has
        // now: left by a volume deleted, or a build interrupted, before they were detached;
        // one still held is fenced.
        let (_, starts) = self.layout()?;
        let mut regions = Vec::new();
        for (name, lv) in self.lvs()? {
            if lv.segments.len() == 1 {
                // One with no region (not all of it on its run of extents) is no volume of
                // the pool's, and is passed over as one of several segments is.
                let Ok(region) = self.region(&name, &lv) else {
                    continue;
                };
                // A volume grown in place before its devices were: a guest may hold one.
                // Only the devices over the length it had are its own; the sweep below
                // detaches any other.
                self.grown_over(&name, &lv, &region)?;
                regions.push(region);
            }
        }
        for dev in loopdev::list()? {
            let on_pv = starts.keys().any(|pv| loopdev::same_file(&dev.backing, pv));
            if on_pv && dev.size_limit > 0 && !regions.iter().any(|r| r.is(&dev)) {
                loopdev::release(&dev)?;
                removed.push(dev.name.display().to_string());
            }
        }
        Ok(removed)
    }

    fn list(&self) -> Result<Vec<(VolName, Observed)>, DriverError> {
        Ok(self
            .lvs()?
            .into_iter()
            .filter_map(|(name, lv)| Some((VolName::parse(&name)?, Observed { size: lv.size })))
            .collect())
    }

    fn observe(&self, name: &VolName) -> Result<Option<Observed>, DriverError> {
        Ok(self
            .lvs()?
            .get(name.as_str())
            .map(|lv| Observed { size: lv.size }))
    }

    fn create(
        &self,
        name: &VolName,
        size: u64,
        source: Source<'_>,
    ) -> Result<Observed, DriverError> {
        // Held through the copy: the source's extents are its own until it is done.
        let _pool = self.pool_lock();
        let lvs = self.lvs()?;
        if let Some(lv) = lvs.get(name.as_str()) {
            return Ok(Observed { size: lv.size });
        }
        match source {
            Source::Empty => {}
            Source::Copy(from) => {
                let src = lvs
                    .get(from.as_str())
                    .ok_or_else(|| DriverError::NotFound(from.to_string()))?;
                if src.size > size {
                    return Err(DriverError::Invalid(format!(
                        "{from} is {} bytes, larger than {size}",
                        src.size
                    )));
                }
            }
            Source::Image { path, format } => {
                data::check_fits(path, format, size)?;
            }
        }
        let partial = format!("{name}{PARTIAL_SUFFIX}");
        self.remove(&partial, lvs.get(&partial))?;
        self.build(&partial, size, source, &lvs).inspect_err(|_| {
            let left = self.lvs().ok().and_then(|mut l| l.remove(&partial));
            if let Err(clean) = self.remove(&partial, left.as_ref()) {
                tracing::warn!(volume = %name, error = %clean, "cannot remove a partial volume; the next start removes it");
            }
        })
    }

    fn extend(&self, name: &VolName, size: u64) -> Result<Observed, DriverError> {
        self.grow(name, size, true)
    }

    fn extend_held(&self, name: &VolName, size: u64) -> Result<Observed, DriverError> {
        self.grow(name, size, false)
    }

    fn delete(&self, name: &VolName) -> Result<(), DriverError> {
        let _pool = self.pool_lock();
        let lvs = self.lvs()?;
        for extra in [PARTIAL_SUFFIX, GROWN, OLD] {
            let left = format!("{name}{extra}");
            self.remove(&left, lvs.get(&left))?;
        }
        let grown = format!("{name}{GROWN}{PARTIAL_SUFFIX}");
        self.remove(&grown, lvs.get(&grown))?;
        self.remove(name.as_str(), lvs.get(name.as_str())).map(drop)
    }

    fn device(&self, name: &VolName) -> Result<PathBuf, DriverError> {
        // The loop device is set up over the volume's extents, not freed ones.
        let _pool = self.pool_lock();
        let lv = self
            .lvs()?
            .remove(name.as_str())
            .ok_or_else(|| DriverError::NotFound(name.to_string()))?;
        let region = self.region(name.as_str(), &lv)?;
        self.device_of(&region)
    }
}

impl Lvm {
    /// Grows `name` to `size` bytes ([`Backend::extend`]); without device-mapper, by a copy
    /// when the extents after it are taken only if `may_move` (else
    /// [`DriverError::NotInPlace`], nothing changed).
    fn grow(&self, name: &VolName, size: u64, may_move: bool) -> Result<Observed, DriverError> {
        // Held from the check that the extents after the volume are free to the lvextend
        // that gives them to it, and through a grown copy.
        let _pool = self.pool_lock();
        let lv = self
            .lvs()?
            .remove(name.as_str())
            .ok_or_else(|| DriverError::NotFound(name.to_string()))?;
        if lv.size >= size {
            if !self.dm && lv.segments.len() == 1 {
                // Grown before its devices were (the process died in between).
                let region = self.region(name.as_str(), &lv)?;
                self.grown_over(name.as_str(), &lv, &region)?;
            }
            return Ok(Observed { size: lv.size });
        }
        let old = self.region(name.as_str(), &lv)?;
        if !self.dm {
            // An earlier grow's devices first (the process died before they grew): one tag
            // at a time.
            self.grown_over(name.as_str(), &lv, &old)?;
            // The extents after the LV are zeroed while free (so a crash after the lvextend
            // shows no old data); the devices over the LV then grow over them.
            let (extent, _) = self.layout()?;
            let grow = (size - old.len).div_ceil(extent) * extent;
            if !self.free_after(&lv, grow / extent)? {
                if !may_move {
                    return Err(DriverError::NotInPlace(format!(
                        "the {} MiB after {name} in volume group {} are not free, and a volume a guest holds is not moved",
                        grow >> 20,
                        self.vg
                    )));
                }
                // The space after it is taken: a grown copy takes its place.
                return self.relocate(name, &old, size);
            }
            let tail = Region {
                path: old.path.clone(),
                offset: old.offset + old.len,
                len: grow,
            };
            // As a new volume's extents: no stale device may reach them once they are its.
            loopdev::release_overlapping(&tail)?;
            data::zero(&tail)?;
            // Recorded before the LV grows: a process dying after the lvextend leaves what
            // its devices are to grow from (none of another length is grown).
            self.tag(name.as_str(), "--addtag", old.len)?;
        }
        let size_arg = format!("{size}b");
        self.lvm(
            "lvextend",
            [
                OsStr::new("--alloc"),
                OsStr::new("contiguous"),
                OsStr::new("-L"),
                OsStr::new(&size_arg),
                OsStr::new(&format!("{}/{name}", self.vg)),
            ],
        )?;
        let lv = self
            .lvs()?
            .remove(name.as_str())
            .ok_or_else(|| DriverError::NotFound(name.to_string()))?;
        let now = self.region(name.as_str(), &lv)?;
        if self.dm {
            data::zero(&Region {
                offset: old.len,
                len: now.len - old.len,
                ..now
            })?;
        } else {
            self.grown_over(name.as_str(), &lv, &now)?;
        }
        Ok(Observed { size: lv.size })
    }

    /// Adds (`--addtag`) or removes (`--deltag`) the [`GROWING`] tag of LV `name` recording
    /// `from` bytes.
    fn tag(&self, name: &str, op: &str, from: u64) -> Result<(), DriverError> {
        self.lvm(
            "lvchange",
            [
                OsStr::new(op),
                OsStr::new(&format!("{GROWING}{from}")),
                OsStr::new(&format!("{}/{name}", self.vg)),
            ],
        )
        .map(drop)
    }

    /// Grows the loop devices over LV `name` (`lv`, its data at `region`) that are over the
    /// length its [`GROWING`] tag records to the whole region, then drops the tag. An LV
    /// without the tag has no device to grow.
    fn grown_over(&self, name: &str, lv: &Lv, region: &Region) -> Result<(), DriverError> {
        let Some(from) = lv.growing_from else {
            return Ok(());
        };
        loopdev::grow_over(region, from)?;
        self.tag(name, "--deltag", from)
    }

    /// Grows `name` (whose data is at `old`) to `size` bytes by a copy: built complete as
    /// `NAME.grown` (from `NAME.grown.partial`), then swapped in (`NAME` → `NAME.old`,
    /// `NAME.grown` → `NAME`, `NAME.old` removed). A process killed at any point leaves
    /// what [`Lvm::finish_swaps`] completes or undoes, never a volume without its data.
    /// Writes to the volume during the copy would be lost: it is grown so only while no
    /// server holds it.
    fn relocate(&self, name: &VolName, old: &Region, size: u64) -> Result<Observed, DriverError> {
        let grown = format!("{name}{GROWN}");
        let partial = format!("{grown}{PARTIAL_SUFFIX}");
        let lvs = self.lvs()?;
        self.remove(&partial, lvs.get(&partial))?;
        // A grown copy an earlier try left may be older than the volume's data.
        self.remove(&grown, lvs.get(&grown))?;
        if let Err(e) = self.build(&partial, size, Source::Copy(name), &lvs) {
            let left = self.lvs().ok().and_then(|mut l| l.remove(&partial));
            if let Err(clean) = self.remove(&partial, left.as_ref()) {
                tracing::warn!(volume = %name, error = %clean, "cannot remove a partial copy; the next start removes it");
            }
            return Err(e);
        }
        loopdev::release_overlapping(old)?;
        let aside = format!("{name}{OLD}");
        {
            let _swap = self.swap.write().unwrap_or_else(PoisonError::into_inner);
            self.lvm(
                "lvrename",
                [self.vg.as_str(), name.as_str(), &aside].map(OsStr::new),
            )?;
            self.lvm(
                "lvrename",
                [self.vg.as_str(), &grown, name.as_str()].map(OsStr::new),
            )?;
        }
        let lvs = self.lvs()?;
        self.remove(&aside, lvs.get(&aside))?;
        lvs.get(name.as_str())
            .map(|lv| Observed { size: lv.size })
            .ok_or_else(|| DriverError::NotFound(name.to_string()))
    }

    /// Completes or undoes the swaps of grown copies a killed process left: with `NAME`
    /// there, `NAME.old` and `NAME.grown` are removed; without it, a complete `NAME.grown`
    /// takes its name (and `NAME.old` goes), else `NAME.old` takes its name back.
    fn finish_swaps(&self) -> Result<Vec<String>, DriverError> {
        let lvs = self.lvs()?;
        let mut done = Vec::new();
        for name in lvs.keys() {
            let Some(base) = name
                .strip_suffix(OLD)
                .filter(|b| VolName::parse(b).is_some())
            else {
                continue;
            };
            if lvs.contains_key(base) {
                continue;
            }
            let grown = format!("{base}{GROWN}");
            let back = if lvs.contains_key(&grown) {
                &grown
            } else {
                name
            };
            self.lvm(
                "lvrename",
                [self.vg.as_str(), back.as_str(), base].map(OsStr::new),
            )?;
            done.push(format!("{}/{back} renamed {base}", self.vg));
        }
        let lvs = self.lvs()?;
        for (name, lv) in &lvs {
            let base = name
                .strip_suffix(OLD)
                .or_else(|| name.strip_suffix(GROWN))
                .filter(|b| VolName::parse(b).is_some());
            if let Some(base) = base
                && lvs.contains_key(base)
            {
                self.remove(name, Some(lv))?;
                done.push(format!("{}/{name}", self.vg));
            }
        }
        Ok(done)
    }

    /// Whether the `count` extents right after `lv`'s (on its PV) are free.
    fn free_after(&self, lv: &Lv, count: u64) -> Result<bool, DriverError> {
        let [(pv, first, len)] = lv.segments.as_slice() else {
            return Ok(false);
        };
        let next = first + len;
        let out = self.lvm(
            "pvs",
            [
                "--reportformat",
                "json",
                "--segments",
                "-o",
                "pv_name,pvseg_start,pvseg_size,lv_name",
            ]
            .map(OsStr::new),
        )?;
        #[derive(Deserialize)]
        struct R {
            #[serde(default)]
            pvseg: Vec<Row>,
        }
        #[derive(Deserialize)]
        struct Row {
            pv_name: PathBuf,
            pvseg_start: String,
            pvseg_size: String,
            lv_name: String,
        }
        Ok(rows::<R>("pvs", &out)?
            .into_iter()
            .flat_map(|r| r.pvseg)
            .any(|r| {
                r.pv_name == *pv
                    && r.lv_name.is_empty()
                    && r.pvseg_start.trim().parse::<u64>().ok() == Some(next)
                    && r.pvseg_size.trim().parse::<u64>().is_ok_and(|n| n >= count)
            }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_are_single_runs_of_extents() {
        assert_eq!(
            pe_range("/dev/loop0:2-4"),
            Some(("/dev/loop0".into(), 2, 3))
        );
        assert_eq!(pe_range("/dev/sdb1:0-0"), Some(("/dev/sdb1".into(), 0, 1)));
        assert_eq!(pe_range("/dev/a:0-1 /dev/b:0-1"), None);
        assert_eq!(pe_range("/dev/a:4-1"), None);
        assert_eq!(pe_range(""), None);
    }

    /// One row of a `pvs --segments` report as [`Lvm::pv_segments`] asks for it (4 MiB
    /// extents, the PV's first extent at 1 MiB).
    fn pvseg(
        pv: &str,
        vg: &str,
        uuid: &str,
        start: u64,
        count: u64,
        lv: &str,
        size: u64,
    ) -> String {
        format!(
            r#"{{"pv_name":"{pv}","pe_start":"1048576","pvseg_start":"{start}","pvseg_size":"{count}","vg_name":"{vg}","vg_uuid":"{uuid}","vg_extent_size":"4194304","lv_name":"{lv}","lv_size":"{size}","lv_tags":""}}"#
        )
    }

    fn report(rows: &[String]) -> Vec<u8> {
        format!(r#"{{"report":[{{"pvseg":[{}]}}]}}"#, rows.join(",")).into_bytes()
    }

    const MIB4: u64 = 4 << 20;

    #[test]
    fn a_volumes_region_is_exactly_its_extents_on_its_own_pv() {
        let lvm = Lvm::with_device_mapper("pool", false).expect("name");
        let lvs = lvm
            .segments_of(&report(&[
                pvseg("/dev/loop1", "pool", "U1", 0, 2, "volume-a", 2 * MIB4),
                pvseg("/dev/loop1", "pool", "U1", 2, 3, "", 0),
                pvseg("/dev/loop1", "pool", "U1", 5, 1, "[lvol0_pmspare]", MIB4),
                // Another group: its LV of the same name and its PV are not the pool's.
                pvseg("/dev/loop2", "other", "U2", 7, 2, "volume-a", 2 * MIB4),
                pvseg("/dev/loop2", "other", "U2", 9, 1, "volume-b", MIB4),
                // An LV of two runs, and one with a segment on no PV (a `zero` one): its
                // run on the PV is not all of it.
                pvseg("/dev/loop1", "pool", "U1", 6, 1, "volume-c", 2 * MIB4),
                pvseg("/dev/loop1", "pool", "U1", 8, 1, "volume-c", 2 * MIB4),
                pvseg("/dev/loop1", "pool", "U1", 10, 1, "volume-d", 3 * MIB4),
            ]))
            .expect("report");
        assert_eq!(
            lvs.keys().collect::<Vec<_>>(),
            ["volume-a", "volume-c", "volume-d"]
        );
        let region = lvm.region("volume-a", &lvs["volume-a"]).expect("region");
        assert_eq!(region.path, PathBuf::from("/dev/loop1"));
        assert_eq!((region.offset, region.len), (1 << 20, 2 * MIB4));
        for refused in ["volume-c", "volume-d"] {
            let e = lvm.region(refused, &lvs[refused]).expect_err(refused);
            assert!(matches!(e, DriverError::Unsupported(_)), "{refused}: {e}");
        }
    }

    #[test]
    fn two_volume_groups_of_the_pools_name_are_refused() {
        let lvm = Lvm::with_device_mapper("pool", false).expect("name");
        // A copy of the pool's disk attached: the same group name, another UUID.
        let e = lvm
            .segments_of(&report(&[
                pvseg("/dev/loop1", "pool", "U1", 0, 2, "volume-a", 2 * MIB4),
                pvseg("/dev/loop3", "pool", "U3", 0, 2, "volume-b", 2 * MIB4),
            ]))
            .expect_err("two groups of one name");
        assert!(
            matches!(&e, DriverError::Unavailable(m) if m.contains("several volume groups are named pool")),
            "{e}"
        );
    }

    #[test]
    fn only_the_pools_own_lvs_count_in_its_capacity() {
        for mine in [
            "volume-0b5e",
            "snap-1",
            "volume-0b5e.partial",
            "volume-0b5e.grown",
            "volume-0b5e.grown.partial",
            "volume-0b5e.old",
        ] {
            assert!(ours(mine), "{mine}");
        }
        for theirs in [
            "root",
            "swap",
            "lvol0",
            "volume-",
            "other-0b5e.partial",
            "data.old",
        ] {
            assert!(!ours(theirs), "{theirs}");
        }
    }

    #[test]
    fn volume_group_names_are_checked() {
        assert!(Lvm::new("stratus-vg0").is_ok());
        for bad in ["", "-x", "a b", "a/b", "..", "$(id)", &"v".repeat(128)] {
            assert!(Lvm::new(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn device_mapper_is_detected_from_the_kernel() {
        // Whatever the kernel has, the answer agrees with /proc/misc.
        let misc = std::fs::read_to_string("/proc/misc").unwrap_or_default();
        assert_eq!(has_device_mapper(), misc.contains("device-mapper"));
    }
}
