//! The conformance suite on the real host: an LVM volume group on a loop device over a file
//! the test creates (and removes, with every loop device it made), and a file pool in a
//! temporary directory. Needs root, lvm2, losetup, blkdiscard and qemu-img.

use std::path::{Path, PathBuf};

use super::conformance;
use super::file::FilePool;
use super::loopdev;
use super::lvm::Lvm;
use super::{Backend, Source, VolName, cmd};

const MIB: u64 = 1 << 20;

/// A volume group on a loop device over a sparse file, removed with everything over it on
/// drop.
pub struct TestVg {
    pub vg: String,
    pub file: PathBuf,
    pub pv: PathBuf,
}

impl TestVg {
    pub fn new(dir: &Path, vg: &str, size: u64) -> Self {
        let file = dir.join(format!("{vg}.img"));
        std::fs::File::create(&file)
            .and_then(|f| f.set_len(size))
            .expect("create the PV's file");
        let out = cmd::run(
            "losetup",
            ["--find".as_ref(), "--show".as_ref(), file.as_os_str()] as [&std::ffi::OsStr; 3],
        )
        .expect("attach the PV's file");
        let pv = PathBuf::from(String::from_utf8_lossy(&out).trim());
        let me = Self {
            vg: vg.into(),
            file,
            pv,
        };
        let dm = if super::lvm::has_device_mapper() {
            vec![]
        } else {
            vec!["--driverloaded", "n"]
        };
        let pv = me.pv.to_string_lossy().into_owned();
        cmd::run("pvcreate", dm.iter().copied().chain(["-y", &pv])).expect("pvcreate");
        cmd::run("vgcreate", dm.iter().copied().chain([vg, &pv])).expect("vgcreate");
        me
    }
}

impl Drop for TestVg {
    fn drop(&mut self) {
        let dm = if super::lvm::has_device_mapper() {
            vec![]
        } else {
            vec!["--driverloaded", "n"]
        };
        for dev in loopdev::list().unwrap_or_default() {
            if loopdev::same_file(&dev.backing, &self.pv) {
                let _ = loopdev::detach(&dev.name);
            }
        }
        let _ = cmd::run("vgremove", dm.iter().copied().chain(["-f", &self.vg]));
        let pv = self.pv.to_string_lossy().into_owned();
        let _ = cmd::run("pvremove", dm.iter().copied().chain(["-y", &pv]));
        let _ = loopdev::detach(&self.pv);
        let _ = std::fs::remove_file(&self.file);
    }
}

/// Loop devices over `pv` (the test's volume devices).
fn loops_over(pv: &Path) -> usize {
    loopdev::list()
        .expect("losetup")
        .iter()
        .filter(|d| loopdev::same_file(&d.backing, pv))
        .count()
}

#[test]
fn lvm_on_a_loop_device_passes() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let vg = TestVg::new(tmp.path(), "stratus-conf-lvm", 128 * MIB);
    let lvm = Lvm::new(&vg.vg).expect("a name");
    conformance::run_all(&lvm, 4 * MIB, tmp.path());
    assert_eq!(
        loops_over(&vg.pv),
        0,
        "a deleted volume's loop device is left"
    );
}

/// A clone's copy is about to read its source when another thread deletes the source and
/// makes another volume (which takes the source's freed extents) and writes it: the
/// group's lock keeps them waiting until the copy is done, so the clone holds exactly the
/// source's data and the other volume its own.
#[test]
fn lvm_a_copy_never_reads_extents_freed_under_it() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let vg = TestVg::new(tmp.path(), "stratus-conf-race", 64 * MIB);
    let lvm = Lvm::new(&vg.vg).expect("a name");
    let unit = 4 * MIB;
    let len = usize::try_from(unit).expect("fits");
    let src = VolName::volume("race-src").expect("uid");
    let other = VolName::volume("race-other").expect("uid");
    let clone = VolName::volume("race-clone").expect("uid");
    let ours: Vec<u8> = (0..len).map(|i| (i % 251) as u8 | 1).collect();
    let theirs = vec![0xa5u8; len];
    lvm.create(&src, unit, Source::Empty).expect("create");
    conformance::write(&lvm, &src, 0, &ours);

    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let racer = std::sync::Arc::new(std::sync::Mutex::new(None));
    {
        let (lvm, src, other, theirs, racer) = (
            lvm.clone(),
            src.clone(),
            other.clone(),
            theirs.clone(),
            racer.clone(),
        );
        *super::lvm::BEFORE_COPY.lock().expect("hook") = Some((
            vg.vg.clone(),
            Box::new(move || {
                let handle = std::thread::spawn(move || {
                    lvm.delete(&src).expect("delete the source");
                    lvm.create(&other, unit, Source::Empty).expect("create");
                    conformance::write(&lvm, &other, 0, &theirs);
                    let _ = done_tx.send(());
                });
                // Long enough for the racer to finish, were it not held off.
                let _ = done_rx.recv_timeout(std::time::Duration::from_secs(5));
                *racer.lock().expect("racer") = Some(handle);
            }),
        ));
    }
    let copied = lvm.clone_volume(&src, &clone, unit);
    let handle = racer
        .lock()
        .expect("racer")
        .take()
        .expect("the copy ran the hook");
    handle.join().expect("the racer finished");
    assert_eq!(copied.expect("clone").size, unit);
    assert!(
        conformance::read(&lvm, &clone, 0, len) == ours,
        "the clone holds other data than its source's"
    );
    assert!(conformance::read(&lvm, &other, 0, len) == theirs);
    assert_eq!(lvm.observe(&src).expect("observe"), None);
    for n in [&clone, &other] {
        lvm.delete(n).expect("delete");
    }
}

#[test]
fn lvm_recovers_a_build_killed_midway_and_its_loop_device() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let vg = TestVg::new(tmp.path(), "stratus-conf-crash", 64 * MIB);
    let lvm = Lvm::new(&vg.vg).expect("a name");
    let dm = if super::lvm::has_device_mapper() {
        vec![]
    } else {
        vec!["--driverloaded", "n"]
    };
    let kept = VolName::volume("kept").expect("uid");
    lvm.create(&kept, 4 * MIB, Source::Empty).expect("create");
    conformance::write(&lvm, &kept, 0, b"precious");
    // What a process killed during a build leaves: the partial LV and a loop device over it.
    let partial = "volume-killed.partial";
    cmd::run(
        "lvcreate",
        dm.iter().copied().chain([
            "-an",
            "-Zn",
            "-Wn",
            "--alloc",
            "contiguous",
            "-y",
            "-L",
            "8m",
            "-n",
            partial,
            &vg.vg,
        ]),
    )
    .expect("lvcreate");
    let region_dev = {
        let offset = (1024 * 1024 + 4 * MIB).to_string();
        let size = (8 * MIB).to_string();
        let out = cmd::run(
            "losetup",
            [
                "--find",
                "--show",
                "--offset",
                &offset,
                "--sizelimit",
                &size,
                &vg.pv.to_string_lossy(),
            ],
        )
        .expect("losetup");
        PathBuf::from(String::from_utf8_lossy(&out).trim())
    };
    let before = loops_over(&vg.pv);
    let removed = lvm.recover().expect("recover");
    assert!(removed.iter().any(|r| r.ends_with(partial)), "{removed:?}");
    assert!(
        removed.iter().any(|r| Path::new(r) == region_dev),
        "{removed:?}"
    );
    assert_eq!(loops_over(&vg.pv), before - 1);
    assert_eq!(lvm.list().expect("list").len(), 1);
    assert_eq!(conformance::read(&lvm, &kept, 0, 8), b"precious");
    assert_eq!(lvm.recover().expect("again"), Vec::<String>::new());
    lvm.delete(&kept).expect("delete");
    assert_eq!(loops_over(&vg.pv), 0);
}

#[test]
fn lvm_reports_a_missing_volume_group() {
    let lvm = Lvm::new("stratus-conf-absent").expect("a name");
    assert!(matches!(
        lvm.capacity(),
        Err(super::DriverError::Unavailable(_))
    ));
}

#[test]
fn a_file_pool_passes() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("pool");
    std::fs::create_dir(&dir).expect("mkdir");
    let pool = FilePool::new(&dir).expect("absolute");
    conformance::run_all(&pool, MIB, tmp.path());
    // A partial file left by a killed build is removed, and only it.
    std::fs::write(dir.join("volume-x.raw.partial"), b"half").expect("write");
    std::fs::write(dir.join("operator-notes.txt"), b"mine").expect("write");
    assert_eq!(pool.recover().expect("recover").len(), 1);
    assert!(dir.join("operator-notes.txt").is_file());
    assert!(matches!(
        FilePool::new(&tmp.path().join("absent"))
            .expect("absolute")
            .capacity(),
        Err(super::DriverError::Unavailable(_))
    ));
}

/// A file `qemu-nbd` serves (and holds qemu's resize lock of, which `qemu-img resize` asks
/// for) grows while held, its data kept: a volume of a file pool exported over NBD grows.
#[test]
fn a_file_pool_grows_a_volume_qemu_nbd_holds() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let pool = FilePool::new(tmp.path()).expect("absolute");
    let v = VolName::volume("held").expect("a name");
    pool.create(&v, MIB, Source::Empty).expect("create");
    let path = pool.device(&v).expect("its file");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .and_then(|f| std::os::unix::fs::FileExt::write_all_at(&f, b"kept", MIB - 4))
        .expect("written");
    let socket = tmp.path().join("nbd.sock");
    let mut nbd = std::process::Command::new("qemu-nbd")
        .args(["--persistent", "--format=raw", "--socket"])
        .arg(&socket)
        .arg(&path)
        .spawn()
        .expect("qemu-nbd");
    let until = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !socket.exists() && std::time::Instant::now() < until {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let served = socket.exists();
    let locked = served.then(|| pool.extend(&v, 2 * MIB));
    let grown = served.then(|| pool.extend_held(&v, 3 * MIB));
    let _ = nbd.kill();
    let _ = nbd.wait();
    assert!(served, "qemu-nbd never served it");
    // qemu-img's resize takes the lock qemu-nbd holds: the plain grow is refused.
    assert!(
        locked.is_some_and(|l| l.is_err()),
        "resized under qemu-nbd's lock"
    );
    let grown = grown.expect("asked while served");
    assert_eq!(grown.expect("grown while held").size, 3 * MIB);
    assert_eq!(
        pool.extend_held(&v, MIB).expect("never shrinks").size,
        3 * MIB
    );
    let mut tail = [0u8; 4];
    std::os::unix::fs::FileExt::read_exact_at(
        &std::fs::File::open(&path).expect("open"),
        &mut tail,
        MIB - 4,
    )
    .expect("read");
    assert_eq!(&tail, b"kept");
    pool.delete(&v).expect("delete");
}

#[test]
fn lvm_finishes_or_undoes_a_swap_killed_midway() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let vg = TestVg::new(tmp.path(), "stratus-conf-swap", 64 * MIB);
    let lvm = Lvm::new(&vg.vg).expect("a name");
    let dm = if super::lvm::has_device_mapper() {
        vec![]
    } else {
        vec!["--driverloaded", "n"]
    };
    let rename = |from: &str, to: &str| {
        cmd::run(
            "lvrename",
            dm.iter().copied().chain([vg.vg.as_str(), from, to]),
        )
        .expect("lvrename");
    };
    // Killed between the two renames: the grown copy takes the volume's name.
    let a = VolName::volume("a").expect("uid");
    lvm.create(&a, 4 * MIB, Source::Empty).expect("create");
    conformance::write(&lvm, &a, 0, b"old data");
    let grown = VolName::volume("a-grown").expect("uid");
    lvm.clone_volume(&a, &grown, 8 * MIB).expect("copy");
    conformance::write(&lvm, &grown, 0, b"grown!!!");
    lvm.delete(&VolName::volume("none").expect("uid"))
        .expect("nothing");
    for dev in loopdev::list().expect("losetup") {
        if loopdev::same_file(&dev.backing, &vg.pv) {
            loopdev::detach(&dev.name).expect("detach");
        }
    }
    rename("volume-a", "volume-a.old");
    rename("volume-a-grown", "volume-a.grown");
    let done = lvm.recover().expect("recover");
    assert_eq!(done.len(), 2, "{done:?}");
    assert_eq!(
        lvm.observe(&a).expect("observe").map(|o| o.size),
        Some(8 * MIB)
    );
    assert_eq!(conformance::read(&lvm, &a, 0, 8), b"grown!!!");
    assert_eq!(lvm.list().expect("list").len(), 1);

    // Killed after the first rename, before the copy was complete: the volume comes back.
    lvm.delete(&a).expect("delete");
    lvm.create(&a, 4 * MIB, Source::Empty).expect("create");
    conformance::write(&lvm, &a, 0, b"kept");
    for dev in loopdev::list().expect("losetup") {
        if loopdev::same_file(&dev.backing, &vg.pv) {
            loopdev::detach(&dev.name).expect("detach");
        }
    }
    rename("volume-a", "volume-a.old");
    lvm.recover().expect("recover");
    assert_eq!(conformance::read(&lvm, &a, 0, 4), b"kept");
    lvm.delete(&a).expect("delete");
    assert!(lvm.list().expect("list").is_empty());
    assert_eq!(loops_over(&vg.pv), 0);
}

/// A tmpfs of `size` bytes mounted on `dir` (made), unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: u64) -> Self {
        std::fs::create_dir_all(dir).expect("mkdir");
        let opts = format!("size={size}");
        cmd::run(
            "mount",
            [
                "-t",
                "tmpfs",
                "-o",
                &opts,
                "stratus-capacity",
                &dir.to_string_lossy(),
            ],
        )
        .expect("mount a tmpfs");
        Self(dir.into())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = cmd::run("umount", [self.0.as_os_str()]);
    }
}

/// Writes `len` bytes of data (not a hole) at the start of `path` (made if absent, never
/// truncated).
fn fill(path: &Path, len: u64) {
    let buf = vec![0x5a_u8; MIB as usize];
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .expect("open");
    for _ in 0..len / MIB {
        std::io::Write::write_all(&mut f, &buf).expect("write");
    }
    f.sync_all().expect("sync");
}

/// A file pool's capacity is what its files take plus what is free: another user's file on
/// the same filesystem lowers it, the pool's own volume (sparse or written) does not.
#[test]
fn a_file_pools_capacity_leaves_out_what_others_use() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let fs = Tmpfs::mount(&tmp.path().join("fs"), 64 * MIB);
    let dir = fs.0.join("pool");
    std::fs::create_dir(&dir).expect("mkdir");
    let pool = FilePool::new(&dir).expect("absolute");
    let empty = pool.capacity().expect("capacity");
    assert!(
        empty.total > 60 * MIB && empty.total <= 64 * MIB && empty.total == empty.free,
        "{empty:?}"
    );
    // Someone else's 16 MiB on the same filesystem: not the pool's to give.
    fill(&fs.0.join("other-users-data"), 16 * MIB);
    let shared = pool.capacity().expect("capacity");
    assert_eq!(shared.total, empty.total - 16 * MIB, "{shared:?}");
    // The pool's own volume, 8 MiB written of 16: counted in, free goes down by what it holds.
    let v = VolName::volume("cap-1").expect("name");
    pool.create(&v, 16 * MIB, Source::Empty).expect("create");
    fill(&pool.device(&v).expect("device"), 8 * MIB);
    let used = pool.capacity().expect("capacity");
    assert_eq!(used.total, shared.total, "{used:?}");
    assert_eq!(used.free, shared.free - 8 * MIB, "{used:?}");
    pool.delete(&v).expect("delete");
    assert_eq!(pool.capacity().expect("capacity"), shared);
}

/// An LVM pool's capacity is its own LVs plus the group's free extents: an LV another user
/// made in the group is not the pool's.
#[test]
fn an_lvm_pools_capacity_leaves_out_other_lvs() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let vg = TestVg::new(tmp.path(), "stratus-conf-cap", 64 * MIB);
    let lvm = Lvm::new(&vg.vg).expect("a name");
    let empty = lvm.capacity().expect("capacity");
    assert_eq!(empty.total, empty.free, "{empty:?}");
    let mut args = vec![];
    if !super::lvm::has_device_mapper() {
        args.extend(["--driverloaded", "n"]);
    }
    args.extend([
        "--activate",
        "n",
        "--zero",
        "n",
        "--wipesignatures",
        "n",
        "-y",
        "-L",
        "8m",
        "-n",
        "someone-elses",
        &vg.vg,
    ]);
    cmd::run("lvcreate", args).expect("lvcreate");
    let shared = lvm.capacity().expect("capacity");
    assert_eq!(shared.total, empty.total - 8 * MIB, "{shared:?}");
    let v = VolName::volume("cap-2").expect("name");
    lvm.create(&v, 16 * MIB, Source::Empty).expect("create");
    let used = lvm.capacity().expect("capacity");
    assert_eq!(used.total, shared.total, "{used:?}");
    assert_eq!(used.free, shared.free - 16 * MIB, "{used:?}");
    lvm.delete(&v).expect("delete");
}

/// The size of the block device open as `f`.
fn size_of(f: &mut std::fs::File) -> u64 {
    std::io::Seek::seek(f, std::io::SeekFrom::End(0)).expect("seek to the end")
}

/// A volume a guest holds (its device open, as QEMU keeps it) grows in place over the free
/// extents after it: the same device, at the new size for its holder, its data kept and
/// the new part zeroed (the freed extents held another volume's data). With the space after
/// it taken, it is not moved under its holder: nothing changes until it is let go.
#[test]
fn lvm_grows_a_held_volume_in_place_and_its_device_with_it() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let vg = TestVg::new(tmp.path(), "stratus-conf-held", 64 * MIB);
    let lvm = Lvm::new(&vg.vg).expect("a name");
    let dm = super::lvm::has_device_mapper();
    assert_eq!(
        lvm.grows_in_use(),
        if dm {
            super::InUseGrowth::Always
        } else {
            super::InUseGrowth::WhenSpaceFollows
        }
    );
    let a = VolName::volume("held-a").expect("uid");
    let b = VolName::volume("held-b").expect("uid");
    lvm.create(&a, 4 * MIB, Source::Empty).expect("create");
    conformance::write(&lvm, &a, 0, b"guest data");
    // The extents after it held another volume's data, and are free again.
    lvm.create(&b, 4 * MIB, Source::Empty).expect("create");
    conformance::write(&lvm, &b, 0, &vec![0xa5; 4096]);
    lvm.delete(&b).expect("delete");

    let dev = lvm.device(&a).expect("device");
    let mut held = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&dev)
        .expect("open the volume's device");
    assert_eq!(size_of(&mut held), 4 * MIB);
    let grown = lvm.extend_held(&a, 8 * MIB).expect("grown in place");
    assert_eq!(grown.size, 8 * MIB);
    assert_eq!(lvm.device(&a).expect("device"), dev, "the same device");
    assert_eq!(size_of(&mut held), 8 * MIB, "its holder sees the new size");
    assert_eq!(conformance::read(&lvm, &a, 0, 10), b"guest data");
    assert!(
        conformance::read(&lvm, &a, 4 * MIB, 4096)
            .iter()
            .all(|&x| x == 0),
        "the grown part shows another volume's old data"
    );
    // Its holder writes past the old end: it lands in the volume.
    std::os::unix::fs::FileExt::write_all_at(&held, b"past the old end", 6 * MIB).expect("write");
    held.sync_all().expect("sync");
    assert_eq!(
        conformance::read(&lvm, &a, 6 * MIB, 16),
        b"past the old end"
    );
    // Again: idempotent.
    assert_eq!(lvm.extend_held(&a, 8 * MIB).expect("again").size, 8 * MIB);

    if !dm {
        // The space after it taken: a held volume is not moved.
        lvm.create(&b, 4 * MIB, Source::Empty).expect("create");
        let err = lvm
            .extend_held(&a, 16 * MIB)
            .expect_err("cannot grow in place");
        assert!(
            matches!(err, super::DriverError::NotInPlace(_)) && !err.is_final(),
            "{err:?}"
        );
        assert!(err.to_string().contains("not free"), "{err}");
        assert_eq!(
            lvm.observe(&a).expect("observe").map(|o| o.size),
            Some(8 * MIB)
        );
        assert_eq!(lvm.device(&a).expect("device"), dev);
        assert_eq!(size_of(&mut held), 8 * MIB);
        // Let go, it moves.
        drop(held);
        assert_eq!(lvm.extend(&a, 16 * MIB).expect("moved").size, 16 * MIB);
        assert_eq!(conformance::read(&lvm, &a, 0, 10), b"guest data");
        assert_eq!(
            conformance::read(&lvm, &a, 6 * MIB, 16),
            b"past the old end"
        );
        lvm.delete(&b).expect("delete");
    }
    lvm.delete(&a).expect("delete");
    assert_eq!(loops_over(&vg.pv), 0);
}

/// The agent dies after the LV grew and before its device did: its next start grows the
/// device a guest may hold, rather than dropping it as stale.
#[test]
fn lvm_recovery_grows_a_device_left_at_the_old_size() {
    if super::lvm::has_device_mapper() {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let vg = TestVg::new(tmp.path(), "stratus-conf-regrow", 64 * MIB);
    let lvm = Lvm::new(&vg.vg).expect("a name");
    let a = VolName::volume("regrow").expect("uid");
    lvm.create(&a, 4 * MIB, Source::Empty).expect("create");
    let dev = lvm.device(&a).expect("device");
    let mut held = std::fs::File::open(&dev).expect("open");
    interrupted_grow(&vg.vg, &a, 4 * MIB, "8m");
    assert_eq!(size_of(&mut held), 4 * MIB);
    let done = lvm.recover().expect("recover");
    assert!(done.is_empty(), "nothing removed: {done:?}");
    assert_eq!(size_of(&mut held), 8 * MIB);
    assert_eq!(lvm.device(&a).expect("device"), dev);
    assert_eq!(tags(&vg.vg, &a), "", "the tag goes once its devices grew");
    drop(held);
    lvm.delete(&a).expect("delete");
    assert_eq!(loops_over(&vg.pv), 0);
}

/// What a grow in place of LV `name` of `vg` from `from` bytes to `to` (an lvextend size)
/// leaves when the process dies before the devices grew: the tag the driver records first,
/// then the lvextend.
fn interrupted_grow(vg: &str, name: &VolName, from: u64, to: &str) {
    let lv = format!("{vg}/{name}");
    let tag = format!("stratus-growing-from-{from}");
    cmd::run("lvchange", ["--driverloaded", "n", "--addtag", &tag, &lv])
        .expect("lvchange --addtag");
    cmd::run(
        "lvextend",
        [
            "--driverloaded",
            "n",
            "--alloc",
            "contiguous",
            "-L",
            to,
            &lv,
        ],
    )
    .expect("lvextend");
}

/// The tags of LV `name` of `vg`.
fn tags(vg: &str, name: &VolName) -> String {
    let out = cmd::run(
        "lvs",
        [
            "--driverloaded",
            "n",
            "--noheadings",
            "-o",
            "lv_tags",
            &format!("{vg}/{name}"),
        ],
    )
    .expect("lvs");
    String::from_utf8_lossy(&out).trim().to_owned()
}

/// The loop device `dev` as the kernel lists it (`None`: gone).
fn listed(dev: &Path) -> Option<loopdev::LoopDevice> {
    loopdev::list()
        .expect("losetup")
        .into_iter()
        .find(|d| d.name == dev)
}

/// A volume's device detached by hand while held stays, lazily detached (AUTOCLEAR), over the
/// volume's extents at the length it had. Growing the volume in place, and recovering after
/// a grow interrupted, grow its own device alone: never the detached one (its holder would
/// see the grown part, and go on using it after the volume is gone), nor another device at
/// its offset over another length; recovery takes both, over another length than the
/// volume's by then, off it.
#[test]
fn lvm_grows_only_its_own_devices_never_a_stale_one_at_the_same_offset() {
    if super::lvm::has_device_mapper() {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let vg = TestVg::new(tmp.path(), "stratus-conf-stale", 64 * MIB);
    let lvm = Lvm::new(&vg.vg).expect("a name");
    // A 4 MiB volume whose device a process holds, detached by hand.
    let new = VolName::volume("stale-new").expect("uid");
    lvm.create(&new, 4 * MIB, Source::Empty).expect("create");
    let stale = lvm.device(&new).expect("device");
    let mut stale_holder = std::fs::File::open(&stale).expect("hold the device");
    loopdev::detach(&stale).expect("losetup -d");
    let left = listed(&stale).expect("held, it stays");
    assert!(left.autoclear, "{left:?}");

    let dev = lvm.device(&new).expect("device");
    assert_ne!(dev, stale, "a detached device is not handed out again");
    let own = listed(&dev).expect("listed");
    assert_eq!(own.offset, left.offset, "over the same extents");
    let mut held = std::fs::File::open(&dev).expect("hold the new volume's device");
    // Another device at its offset over another length (not the volume's).
    let out = cmd::run(
        "losetup",
        [
            "--find",
            "--show",
            "--offset",
            &own.offset.to_string(),
            "--sizelimit",
            &(2 * MIB).to_string(),
            &own.backing.to_string_lossy(),
        ],
    )
    .expect("losetup");
    let other = PathBuf::from(String::from_utf8_lossy(&out).trim());

    lvm.extend_held(&new, 8 * MIB).expect("grown in place");
    assert_eq!(size_of(&mut held), 8 * MIB, "its own device grows");
    assert_eq!(
        size_of(&mut stale_holder),
        4 * MIB,
        "the stale one does not"
    );
    assert_eq!(listed(&other).expect("left").size_limit, 2 * MIB);
    assert_eq!(tags(&vg.vg, &new), "");

    // Interrupted after the lvextend: recovery grows its device from the length recorded.
    interrupted_grow(&vg.vg, &new, 8 * MIB, "12m");
    let removed = lvm.recover().expect("recover");
    assert_eq!(size_of(&mut held), 12 * MIB, "its own device grows");
    assert_eq!(
        size_of(&mut stale_holder),
        0,
        "the stale one does not, and is taken off the volume"
    );
    assert!(listed(&other).is_none(), "detached: {removed:?}");
    assert!(
        removed.contains(&other.display().to_string()),
        "{removed:?}"
    );
    assert_eq!(tags(&vg.vg, &new), "");

    drop(held);
    drop(stale_holder);
    lvm.delete(&new).expect("delete");
    // The stale device goes with its last holder (the kernel may take a moment).
    let gone = (0..50).any(|_| {
        std::thread::sleep(std::time::Duration::from_millis(100));
        loops_over(&vg.pv) == 0
    });
    assert!(gone, "{:?}", loopdev::list());
}

/// A loop device is resized only while it is over what it was listed over: a listing gone
/// stale (the device detached and set up again over another offset, length or file) is
/// refused, the device left as it is.
#[test]
fn a_loop_device_is_resized_only_while_over_what_was_listed() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (a, b) = (tmp.path().join("a.img"), tmp.path().join("b.img"));
    for f in [&a, &b] {
        std::fs::File::create(f)
            .and_then(|f| f.set_len(8 * MIB))
            .expect("a backing file");
    }
    let region = loopdev::Region {
        path: a.clone(),
        offset: MIB,
        len: 2 * MIB,
    };
    let name = loopdev::attach(&region).expect("attach");
    let dev = listed(&name).expect("listed");
    let size = || {
        std::fs::File::open(&name)
            .map(|mut f| size_of(&mut f))
            .expect("open")
    };
    let stale = [
        loopdev::LoopDevice {
            offset: 0,
            ..dev.clone()
        },
        loopdev::LoopDevice {
            size_limit: MIB,
            ..dev.clone()
        },
        loopdev::LoopDevice {
            backing: b.clone(),
            ..dev.clone()
        },
    ];
    for listed in &stale {
        let e = loopdev::set_size_limit(listed, 4 * MIB).expect_err("a stale listing");
        assert!(e.to_string().contains("no longer over"), "{e}");
        assert_eq!(size(), 2 * MIB, "{listed:?}");
    }
    loopdev::set_size_limit(&dev, 4 * MIB).expect("as listed");
    assert_eq!(size(), 4 * MIB);
    loopdev::detach(&name).expect("detach");
}

/// Bytes `len` at `offset` of `file`, read from the file itself (what reached the disk).
fn on_disk(file: &Path, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0; len];
    std::os::unix::fs::FileExt::read_exact_at(
        &std::fs::File::open(file).expect("open the PV's file"),
        &mut buf,
        offset,
    )
    .expect("read the PV's file");
    buf
}

/// What a process holding the loop device of a volume deleted under it can still do to the
/// volume that takes its extents next: it writes at its start and reads its size.
fn stale_holder_against_the_next_volume(
    lvm: &Lvm,
    vg: &TestVg,
    holder: &mut std::fs::File,
    offset: u64,
    next: &VolName,
) {
    lvm.create(next, 4 * MIB, Source::Empty).expect("create");
    let dev = lvm.device(next).expect("device");
    assert_eq!(
        listed(&dev).expect("listed").offset,
        offset,
        "the next volume took the deleted one's extents"
    );
    conformance::write(lvm, next, 0, b"the next tenant!");
    // Whatever the holder writes and flushes (refused, as it reaches nothing) never lands in
    // the next volume.
    let _ = std::os::unix::fs::FileExt::write_all_at(&*holder, b"a stale holder!!", 0);
    let _ = holder.sync_all();
    assert_eq!(on_disk(&vg.pv, offset, 16), b"the next tenant!");
    assert_eq!(conformance::read(lvm, next, 0, 16), b"the next tenant!");
    assert_eq!(
        size_of(holder),
        0,
        "the deleted volume's device still reaches {} MiB of the PV",
        size_of(holder) >> 20
    );
}

/// A volume deleted while a process still holds its loop device (`losetup -d` then only marks
/// a busy device to go with its last holder) leaves no device over its extents: the holder
/// reaches none of the volume that takes them next. A device an older agent left so over
/// free extents is taken off them before a new volume uses them.
#[test]
fn lvm_a_deleted_volumes_held_device_never_reaches_the_next_volume() {
    if super::lvm::has_device_mapper() {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let vg = TestVg::new(tmp.path(), "stratus-conf-fence", 64 * MIB);
    let lvm = Lvm::new(&vg.vg).expect("a name");
    let open = |dev: &Path| {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(dev)
            .expect("hold the device")
    };

    // Deleted through the driver while held.
    let old = VolName::volume("fence-old").expect("uid");
    lvm.create(&old, 4 * MIB, Source::Empty).expect("create");
    let dev = lvm.device(&old).expect("device");
    let offset = listed(&dev).expect("listed").offset;
    let mut holder = open(&dev);
    lvm.delete(&old).expect("delete");
    assert!(lvm.observe(&old).expect("observe").is_none());
    let next = VolName::volume("fence-next").expect("uid");
    stale_holder_against_the_next_volume(&lvm, &vg, &mut holder, offset, &next);
    drop(holder);
    lvm.delete(&next).expect("delete");

    // Left by an older agent: detached while held, its LV removed, the device still over the
    // free extents.
    let older = VolName::volume("fence-older").expect("uid");
    lvm.create(&older, 4 * MIB, Source::Empty).expect("create");
    let dev = lvm.device(&older).expect("device");
    let offset = listed(&dev).expect("listed").offset;
    let mut holder = open(&dev);
    loopdev::detach(&dev).expect("losetup -d");
    assert!(listed(&dev).expect("held, it stays").autoclear);
    cmd::run(
        "lvremove",
        ["--driverloaded", "n", "-y", &format!("{}/{older}", vg.vg)],
    )
    .expect("lvremove");
    let after = VolName::volume("fence-after").expect("uid");
    stale_holder_against_the_next_volume(&lvm, &vg, &mut holder, offset, &after);
    drop(holder);
    lvm.delete(&after).expect("delete");
    let gone = (0..50).any(|_| {
        std::thread::sleep(std::time::Duration::from_millis(100));
        loops_over(&vg.pv) == 0
    });
    assert!(gone, "{:?}", loopdev::list());
}
