//! Loop devices over a region of a file or block device (`losetup --offset --sizelimit`),
//! found again by what they are over, never remembered: the kernel's list is the record.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::{DriverError, cmd};

/// A loop device as the kernel has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoopDevice {
    /// Its device node (`/dev/loopN`).
    pub name: PathBuf,
    /// What it is over (as the kernel recorded the path).
    pub backing: PathBuf,
    /// Where its data starts in the backing, in bytes.
    pub offset: u64,
    /// How much of the backing it covers (0: to the end).
    pub size_limit: u64,
    /// Detached while held (`LO_FLAGS_AUTOCLEAR`, what `losetup -d` sets on a busy device):
    /// it goes once its last holder closes it, and is never reused, grown or handed out.
    pub autoclear: bool,
}

/// A region of a file or block device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Region {
    /// The file or device.
    pub path: PathBuf,
    /// Where the region starts, in bytes.
    pub offset: u64,
    /// Its length, in bytes.
    pub len: u64,
}

impl Region {
    /// Whether `dev` is over exactly this region.
    pub fn is(&self, dev: &LoopDevice) -> bool {
        dev.offset == self.offset
            && dev.size_limit == self.len
            && same_file(&dev.backing, &self.path)
    }

    /// Whether `dev` is over any byte of this region.
    pub fn overlaps(&self, dev: &LoopDevice) -> bool {
        if !same_file(&dev.backing, &self.path) {
            return false;
        }
        let end = self.offset.saturating_add(self.len);
        let dev_end = if dev.size_limit == 0 {
            u64::MAX
        } else {
            dev.offset.saturating_add(dev.size_limit)
        };
        dev.offset < end && self.offset < dev_end
    }
}

/// Whether two paths name the same file (a device reached through a symlink is itself).
pub fn same_file(a: &Path, b: &Path) -> bool {
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

#[derive(Deserialize)]
struct Report {
    #[serde(default)]
    loopdevices: Vec<Entry>,
}

#[derive(Deserialize)]
struct Entry {
    name: PathBuf,
    #[serde(rename = "back-file")]
    back_file: Option<PathBuf>,
    #[serde(default)]
    offset: u64,
    #[serde(default)]
    sizelimit: u64,
    #[serde(default, deserialize_with = "flag")]
    autoclear: bool,
}

/// A losetup flag column: a JSON boolean, or `"0"`/`"1"` (older util-linux).
fn flag<'de, D: serde::Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Flag {
        Bool(bool),
        Number(u8),
        Text(String),
    }
    Ok(match Option::<Flag>::deserialize(d)? {
        None => false,
        Some(Flag::Bool(b)) => b,
        Some(Flag::Number(n)) => n != 0,
        Some(Flag::Text(t)) => t == "1",
    })
}

/// Parses `losetup --json --list` (an empty output: no loop devices).
fn parse(out: &[u8]) -> Result<Vec<LoopDevice>, DriverError> {
    if out.iter().all(u8::is_ascii_whitespace) {
        return Ok(Vec::new());
    }
    let report: Report =
        serde_json::from_slice(out).map_err(|e| DriverError::Report("losetup", e))?;
    Ok(report
        .loopdevices
        .into_iter()
        .filter_map(|e| {
            // The kernel appends " (deleted)" to a backing file removed since.
            let backing = e.back_file?;
            Some(LoopDevice {
                name: e.name,
                backing,
                offset: e.offset,
                size_limit: e.sizelimit,
                autoclear: e.autoclear,
            })
        })
        .collect())
}

/// Every loop device with a backing.
///
/// # Errors
/// losetup failed or its report did not parse.
pub fn list() -> Result<Vec<LoopDevice>, DriverError> {
    let out = cmd::run(
        "losetup",
        [
            "--json",
            "--list",
            "--output",
            "NAME,BACK-FILE,OFFSET,SIZELIMIT,AUTOCLEAR",
        ],
    )?;
    parse(&out)
}

/// The loop device over exactly `region`, attached if there is none (one detached while held
/// is not: it goes with its holder). Idempotent.
///
/// # Errors
/// losetup failed.
pub fn attach(region: &Region) -> Result<PathBuf, DriverError> {
    if let Some(dev) = list()?.into_iter().find(|d| !d.autoclear && region.is(d)) {
        return Ok(dev.name);
    }
    let out = cmd::run(
        "losetup",
        [
            "--find".as_ref(),
            "--show".as_ref(),
            "--offset".as_ref(),
            region.offset.to_string().as_ref(),
            "--sizelimit".as_ref(),
            region.len.to_string().as_ref(),
            region.path.as_os_str(),
        ] as [&std::ffi::OsStr; 7],
    )?;
    Ok(PathBuf::from(String::from_utf8_lossy(&out).trim()))
}

/// Whether `dev` is to grow to `region` when the region was `was` bytes long: it starts where
/// the region does, covers exactly what the region covered (a device over less is not the
/// volume's: a lazily detached one of a volume deleted before, whose extents it shares), and
/// is not detached.
fn grows(dev: &LoopDevice, region: &Region, was: u64) -> bool {
    !dev.autoclear
        && dev.offset == region.offset
        && dev.size_limit > 0
        && dev.size_limit == was
        && was < region.len
        && same_file(&dev.backing, &region.path)
}

/// Grows every loop device over exactly the `was` bytes `region` started with (set up over a
/// volume before it grew) to the whole region, in place: a guest holding one keeps it and
/// finds the new size. Devices over any other length, or detached while held, are left as
/// they are. Answers the devices grown. Idempotent.
///
/// # Errors
/// losetup failed, or a device could not be resized.
pub fn grow_over(region: &Region, was: u64) -> Result<Vec<PathBuf>, DriverError> {
    let mut grown = Vec::new();
    for dev in list()?.into_iter().filter(|d| grows(d, region, was)) {
        set_size_limit(&dev, region.len)?;
        grown.push(dev.name);
    }
    Ok(grown)
}

/// Whether the status of an open loop device (`info`) is over what `listed` (as the list
/// found it) is over, with `backing` the (device, inode) of its backing file: what is resized
/// is the device that was checked, not one detached and set up again over something else
/// in between.
fn same_device(info: &ioctl::LoopInfo64, listed: &LoopDevice, backing: (u64, u64)) -> bool {
    over_the_same(info, listed, backing) && info.lo_flags & ioctl::LO_FLAGS_AUTOCLEAR == 0
}

/// Whether the status of an open loop device (`info`) is over what `listed` is over, detached
/// while held or not.
fn over_the_same(info: &ioctl::LoopInfo64, listed: &LoopDevice, backing: (u64, u64)) -> bool {
    info.lo_offset == listed.offset
        && info.lo_sizelimit == listed.size_limit
        && (info.lo_device, info.lo_inode) == backing
}

/// Sets the size limit of bound loop device `dev` (as [`list`] found it) to `len` bytes; the
/// kernel makes it the device's size at once (and tells its holders), with no detach.
///
/// # Errors
/// `dev` cannot be opened; it is no longer over what it was listed over (its offset, size
/// limit or backing file changed, or it was detached: [`DriverError::Unavailable`], nothing
/// changed, a later pass lists it again); or the kernel refused (it retries a few times while pages of the device are
/// dirtied under it).
pub fn set_size_limit(dev: &LoopDevice, len: u64) -> Result<(), DriverError> {
    use std::os::unix::fs::MetadataExt;
    let name = dev.name.as_path();
    let fd = std::fs::OpenOptions::new()
        .read(true)
        .open(name)
        .map_err(super::io("open", name))?;
    let mut info =
        ioctl::status(&fd).map_err(|e| super::io("read the status of", name)(e.into()))?;
    let backing = std::fs::metadata(&dev.backing).map_err(super::io("stat", &dev.backing))?;
    if !same_device(&info, dev, (backing.dev(), backing.ino())) {
        return Err(DriverError::Unavailable(format!(
            "{} is no longer over {} bytes of {} at {}: not resized",
            name.display(),
            dev.size_limit,
            dev.backing.display(),
            dev.offset
        )));
    }
    info.lo_sizelimit = len;
    set_status(&fd, info).map_err(|e| super::io("set the size limit of", name)(e.into()))
}

/// Sets the status of the loop device open as `fd`, a few times while the kernel refuses
/// because pages of the device were dirtied under it.
fn set_status(fd: &std::fs::File, info: ioctl::LoopInfo64) -> rustix::io::Result<()> {
    let mut tries = 0;
    loop {
        match ioctl::set_status(fd, info) {
            Err(e) if e == rustix::io::Errno::AGAIN && tries < 10 => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            done => return done,
        }
    }
}

/// Where a fenced device starts: past the end of any file or device (the largest offset the
/// kernel takes, kept block-aligned), so that it is empty.
const FENCED: u64 = i64::MAX as u64 & !4095;

/// Takes loop device `dev` (as [`list`] found it) off what it is over, so that nothing
/// reaches that region through it any more: detached, and, when it is still there (a busy
/// device is only marked to go with its last holder, `AUTOCLEAR`), fenced: its offset set
/// past the end of its backing and its size limit dropped, so that it is empty and its
/// holders read and write nothing (their I/O fails). A device gone meanwhile, or set up over
/// something else since it was listed, is left alone. Idempotent.
///
/// # Errors
/// losetup failed, or a held device could not be fenced: it may still be over the region,
/// which must then be neither freed nor reused.
pub fn release(dev: &LoopDevice) -> Result<(), DriverError> {
    use std::os::unix::fs::MetadataExt;
    detach(&dev.name)?;
    if !list()?
        .iter()
        .any(|d| d.name == dev.name && d.offset == dev.offset)
    {
        return Ok(());
    }
    let name = dev.name.as_path();
    let fd = match std::fs::OpenOptions::new().read(true).open(name) {
        Ok(fd) => fd,
        // Gone since it was listed.
        Err(e) if e.raw_os_error() == Some(rustix::io::Errno::NXIO.raw_os_error()) => {
            return Ok(());
        }
        Err(e) => return Err(super::io("open", name)(e)),
    };
    let mut info = match ioctl::status(&fd) {
        Ok(info) => info,
        Err(e) if e == rustix::io::Errno::NXIO => return Ok(()),
        Err(e) => return Err(super::io("read the status of", name)(e.into())),
    };
    let backing = std::fs::metadata(&dev.backing).map_err(super::io("stat", &dev.backing))?;
    if !over_the_same(&info, dev, (backing.dev(), backing.ino())) {
        return Ok(());
    }
    info.lo_offset = FENCED;
    info.lo_sizelimit = 0;
    match set_status(&fd, info) {
        Ok(()) => Ok(()),
        Err(e) if e == rustix::io::Errno::NXIO => Ok(()),
        Err(e) => Err(super::io("fence", name)(e.into())),
    }
}

/// The loop driver's status ioctls (`LOOP_GET_STATUS64`, `LOOP_SET_STATUS64`): losetup can
/// set a device's capacity from its backing file's size, never a new size limit.
#[allow(unsafe_code)]
mod ioctl {
    use std::os::fd::AsFd;

    use rustix::ioctl::{Getter, Setter, ioctl};

    /// `struct loop_info64` of `<linux/loop.h>`.
    #[repr(C)]
    #[derive(Clone, Copy)]
    pub struct LoopInfo64 {
        pub lo_device: u64,
        pub lo_inode: u64,
        pub lo_rdevice: u64,
        pub lo_offset: u64,
        pub lo_sizelimit: u64,
        pub lo_number: u32,
        pub lo_encrypt_type: u32,
        pub lo_encrypt_key_size: u32,
        pub lo_flags: u32,
        pub lo_file_name: [u8; 64],
        pub lo_crypt_name: [u8; 64],
        pub lo_encrypt_key: [u8; 32],
        pub lo_init: [u64; 2],
    }

    #[cfg(test)]
    impl LoopInfo64 {
        /// All fields zero.
        pub fn zeroed() -> Self {
            Self {
                lo_device: 0,
                lo_inode: 0,
                lo_rdevice: 0,
                lo_offset: 0,
                lo_sizelimit: 0,
                lo_number: 0,
                lo_encrypt_type: 0,
                lo_encrypt_key_size: 0,
                lo_flags: 0,
                lo_file_name: [0; 64],
                lo_crypt_name: [0; 64],
                lo_encrypt_key: [0; 32],
                lo_init: [0; 2],
            }
        }
    }

    /// `LO_FLAGS_AUTOCLEAR`: detached, gone once its last holder closes it.
    pub const LO_FLAGS_AUTOCLEAR: u32 = 4;

    const LOOP_SET_STATUS64: rustix::ioctl::Opcode = 0x4C04;
    const LOOP_GET_STATUS64: rustix::ioctl::Opcode = 0x4C05;

    /// The status of the loop device open as `fd`.
    pub fn status(fd: impl AsFd) -> rustix::io::Result<LoopInfo64> {
        // SAFETY: LOOP_GET_STATUS64 writes one `struct loop_info64`, which `LoopInfo64`
        // lays out exactly (232 bytes, checked by a test), into the buffer Getter owns.
        unsafe { ioctl(fd, Getter::<LOOP_GET_STATUS64, LoopInfo64>::new()) }
    }

    /// Sets the status of the loop device open as `fd` to `info` (as read, with changes).
    pub fn set_status(fd: impl AsFd, info: LoopInfo64) -> rustix::io::Result<()> {
        // SAFETY: LOOP_SET_STATUS64 reads one `struct loop_info64` from the pointer Setter
        // passes to its owned copy of `info`, and keeps no reference to it.
        unsafe { ioctl(fd, Setter::<LOOP_SET_STATUS64, LoopInfo64>::new(info)) }
    }

    #[cfg(test)]
    #[test]
    fn the_status_is_the_kernels_size() {
        assert_eq!(std::mem::size_of::<LoopInfo64>(), 232);
        assert_eq!(std::mem::offset_of!(LoopInfo64, lo_sizelimit), 32);
        assert_eq!(std::mem::offset_of!(LoopInfo64, lo_file_name), 56);
    }
}

/// Takes every loop device over any byte of `region` off it ([`release`]); answers them.
/// Once it returns, nothing reaches the region through a loop device. Idempotent.
///
/// # Errors
/// As [`release`]: a device may then still be over the region.
pub fn release_overlapping(region: &Region) -> Result<Vec<PathBuf>, DriverError> {
    let mut gone = Vec::new();
    for dev in list()?.into_iter().filter(|d| region.overlaps(d)) {
        release(&dev)?;
        gone.push(dev.name);
    }
    Ok(gone)
}

/// Detaches `dev`. A device already detached is `Ok`.
///
/// # Errors
/// losetup failed.
pub fn detach(dev: &Path) -> Result<(), DriverError> {
    match cmd::run("losetup", ["--detach".as_ref(), dev.as_os_str()]) {
        Ok(_) => Ok(()),
        Err(DriverError::Command { source, .. })
            if source.stderr().contains("No such device")
                || source.stderr().contains("failed to use device") =>
        {
            Ok(())
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn losetup_reports_parse() {
        let out = br#"{
           "loopdevices": [
              {"name": "/dev/loop1", "back-file": "/dev/loop0", "offset": 8388608, "sizelimit": 12582912},
              {"name": "/dev/loop0", "back-file": "/tmp/pv.img", "offset": 0, "sizelimit": 0},
              {"name": "/dev/loop2", "back-file": null},
              {"name": "/dev/loop3", "back-file": "/tmp/pv.img", "offset": 0, "sizelimit": 4096, "autoclear": true},
              {"name": "/dev/loop4", "back-file": "/tmp/pv.img", "offset": 0, "sizelimit": 4096, "autoclear": "1"}
           ]
        }"#;
        let devs = parse(out).expect("parses");
        assert_eq!(devs.len(), 4);
        assert_eq!(devs[0].offset, 8_388_608);
        assert_eq!(devs[0].size_limit, 12_582_912);
        let cleared: Vec<bool> = devs.iter().map(|d| d.autoclear).collect();
        assert_eq!(cleared, [false, false, true, true]);
        assert!(parse(b"").expect("empty").is_empty());
    }

    fn dev(backing: &str, offset: u64, size_limit: u64) -> LoopDevice {
        LoopDevice {
            name: "/dev/loop9".into(),
            backing: backing.into(),
            offset,
            size_limit,
            autoclear: false,
        }
    }

    #[test]
    fn only_a_device_over_the_length_a_volume_had_grows_with_it() {
        let r = Region {
            path: "/nonexistent/pv".into(),
            offset: 100,
            len: 80,
        };
        assert!(grows(&dev("/nonexistent/pv", 100, 50), &r, 50));
        // Over another length: a stale device of an earlier volume at the same extents.
        assert!(!grows(&dev("/nonexistent/pv", 100, 40), &r, 50));
        assert!(!grows(&dev("/nonexistent/pv", 100, 0), &r, 0));
        assert!(!grows(&dev("/nonexistent/pv", 100, 80), &r, 80));
        assert!(!grows(&dev("/nonexistent/pv", 90, 50), &r, 50));
        assert!(!grows(&dev("/nonexistent/other", 100, 50), &r, 50));
        let detached = LoopDevice {
            autoclear: true,
            ..dev("/nonexistent/pv", 100, 50)
        };
        assert!(!grows(&detached, &r, 50));
    }

    #[test]
    fn a_device_is_resized_only_while_its_status_is_what_was_listed() {
        let info = ioctl::LoopInfo64 {
            lo_device: 7,
            lo_inode: 11,
            lo_offset: 100,
            lo_sizelimit: 50,
            ..ioctl::LoopInfo64::zeroed()
        };
        let listed = dev("/nonexistent/pv", 100, 50);
        assert!(same_device(&info, &listed, (7, 11)));
        assert!(!same_device(&info, &listed, (7, 12)), "another file");
        assert!(!same_device(&info, &listed, (8, 11)), "another file system");
        assert!(!same_device(&info, &dev("/nonexistent/pv", 0, 50), (7, 11)));
        assert!(!same_device(
            &info,
            &dev("/nonexistent/pv", 100, 49),
            (7, 11)
        ));
        let cleared = ioctl::LoopInfo64 {
            lo_flags: ioctl::LO_FLAGS_AUTOCLEAR,
            ..info
        };
        assert!(!same_device(&cleared, &listed, (7, 11)), "detached");
    }

    #[test]
    fn regions_overlap_only_on_the_same_backing() {
        let r = Region {
            path: "/nonexistent/pv".into(),
            offset: 100,
            len: 50,
        };
        assert!(r.is(&dev("/nonexistent/pv", 100, 50)));
        assert!(!r.is(&dev("/nonexistent/pv", 100, 49)));
        assert!(r.overlaps(&dev("/nonexistent/pv", 149, 10)));
        assert!(!r.overlaps(&dev("/nonexistent/pv", 150, 10)));
        assert!(!r.overlaps(&dev("/nonexistent/pv", 0, 100)));
        assert!(r.overlaps(&dev("/nonexistent/pv", 0, 0)));
        assert!(!r.overlaps(&dev("/nonexistent/other", 100, 50)));
    }
}
