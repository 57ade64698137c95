//! A Server's Volumes as its guest's disks: which of them this node can attach (claimed for
//! the server, made, and either placed on this node with their data where this node's own
//! StoragePool keeps it, or exported over NBD to this node by the storage agent of another),
//! and the pure [`plan`] that turns those and the disks the domain has into attach,
//! detach and resize steps.

use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use kube::api::Api;
use kube::{Client, ResourceExt};
use stratus_api_types::common::{ConditionType, Reason};
use stratus_api_types::storage::{
    PortRange, StorageBackend, StoragePool, StoragePoolSpec, Volume, VolumeExport, VolumePhase,
    volume_export_name,
};

use super::driver::xml::{nbd_path, virtio_disk_name};
use super::driver::{AttachedVolume, ROOT_DISK, VolumeDisk};

/// The most bytes of a serial virtio carries to the guest.
const SERIAL_LEN: usize = 20;

/// Guest disk names before the volumes': the root disk (`vda`) and the config drive (`vdb`).
const FIRST_VOLUME_DISK: usize = 2;

/// The longest uid the storage agent makes a volume's name from.
const MAX_UID: usize = 64;

/// A Volume this node can give the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ready {
    /// The Volume's name.
    pub volume: String,
    /// Its data on this node: the path its pool keeps it at, which `status.devicePath`
    /// must name (see [`data_path`]); or, for a volume of another node, its export to this
    /// node (`nbd://HOST:PORT/NAME`, see [`remote`]).
    pub path: PathBuf,
    /// The serial the guest sees.
    pub serial: String,
    /// Whether it is a multi-attach volume (`spec.multiAttach`): other guests may have it
    /// too, so it is a shareable disk.
    pub shareable: bool,
    /// The size the guest should see, in bytes: for a block device, what the storage agent
    /// provisioned (`status.sizeGiB`); for a raw file, the size asked (`spec.sizeGiB`),
    /// which QEMU's resize grows the file to while the guest holds it (as Nova extends a
    /// file-backed volume in use: the storage agent cannot resize a file QEMU has locked).
    pub bytes: u64,
    /// Why it is not plugged into a guest that lacks it yet, though made: it is growing (see
    /// [`growing`]). A disk of it already plugged in stays, and is resized as it grows.
    pub growing: Option<String>,
}

/// What this node accepts of a volume another node serves it over NBD.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NbdPolicy {
    /// The cluster's export ports (`stratus agent --export-ports`): no other port is
    /// connected to.
    pub ports: PortRange,
    /// Whether an export served without TLS is attached (`stratus agent --nbd-insecure`). By
    /// default only one served over TLS is: a volume's data then never crosses the storage
    /// network in the clear, and no other node reads it.
    pub insecure: bool,
}

impl From<PortRange> for NbdPolicy {
    /// Exports on `ports`, over TLS alone.
    fn from(ports: PortRange) -> Self {
        Self {
            ports,
            insecure: false,
        }
    }
}

/// Why volume `vol` (made, at `status.sizeGiB` `gib`) is growing, if it is: its size asked
/// (`spec.sizeGiB`) is above what its storage agent provisioned, or the agent is growing it
/// (phase `Extending`). A guest given it now would see it at its old size and then grow, or
/// (over NBD) be served the old size by an export made before the extend. Not when its agent
/// said, for the size asked now, that it grows only once detached (`Ready=False`,
/// `GrowsWhenDetached`): it is served at its size until then, and a server waiting for it
/// would wait for good (a boot volume is never detached from its server).
fn growing(vol: &Volume, gib: u64, phase: VolumePhase) -> Option<String> {
    let want = vol.spec.size_gib;
    let held = vol.status.as_ref().is_some_and(|st| {
        ConditionType::Ready.find(&st.conditions).is_some_and(|c| {
            c.reason == Reason::GrowsWhenDetached.as_str()
                && c.observed_generation.is_some()
                && c.observed_generation == vol.metadata.generation
        })
    });
    if held && phase != VolumePhase::Extending {
        return None;
    }
    (want > gib || phase == VolumePhase::Extending).then(|| {
        format!(
            "volume \"{}\" is growing from {gib} to {want} GiB: plugged in once its storage agent has grown it",
            vol.name_any()
        )
    })
}

/// Why a volume a Server names is not given to its guest now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotReady {
    /// Not yet (not placed, not made) or not now (phase `Error`): a disk of it already
    /// plugged in stays.
    Waiting(String),
    /// Its `status.devicePath` is not its data in this node's pool: never opened. A disk of
    /// it already plugged in (checked when it was) stays.
    Refused(String),
    /// Not attached to this server (released, or another's): a disk of it plugged in goes.
    Released(String),
}

/// The serial of the Volume of `uid`: its hex digits, as many as virtio carries.
pub fn serial(uid: &str) -> String {
    uid.chars()
        .filter(char::is_ascii_alphanumeric)
        .take(SERIAL_LEN)
        .collect()
}

/// The name the storage agent gives the data of the Volume of `uid` (`volume-<uid>`), if
/// `uid` is one it makes names from.
fn data_name(uid: &str) -> Option<String> {
    let ok = !uid.is_empty()
        && uid.len() <= MAX_UID
        && !uid.starts_with('-')
        && uid
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    ok.then(|| format!("volume-{uid}"))
}

/// Checks that `claimed` (a Volume's `status.devicePath`) is the data of the Volume of `uid`
/// in `pool` on `node`, as the storage agent makes it, and answers the path to open:
///
/// - a file pool: `<spec.path>/volume-<uid>.raw`, a regular file (not a symlink, not a
///   device) whose canonical path is in the pool's canonical directory;
/// - an LVM pool with device-mapper: `/dev/<vgName>/volume-<uid>`, a block device;
/// - an LVM pool without it: a loop device `/dev/loopN` over exactly the LV's extents (its
///   backing file a PV of the group, its offset and size limit the LV's region, as `lvs`,
///   `vgs` and `pvs` report them).
///
/// Anything else (another path, `..`, a host disk, a file outside the pool) is refused, so a
/// status written by a stolen node identity cannot hand the host's data to a guest.
///
/// # Errors
/// Why the path is refused.
pub fn data_path(
    pool: &StoragePoolSpec,
    node: &str,
    uid: &str,
    claimed: &str,
) -> Result<PathBuf, String> {
    if pool.node != node {
        return Err(format!(
            "its pool is on node {}, not this node ({node})",
            pool.node
        ));
    }
    let name = data_name(uid).ok_or_else(|| format!("its uid {uid:?} names no volume data"))?;
    let claimed = Path::new(claimed);
    match pool.backend {
        StorageBackend::File => {
            let dir = pool
                .path
                .as_deref()
                .map(Path::new)
                .filter(|d| d.is_absolute())
                .ok_or("its file pool names no absolute directory")?;
            file_path(dir, &format!("{name}.raw"), claimed)
        }
        StorageBackend::Lvm => {
            let vg = pool
                .vg_name
                .as_deref()
                .filter(|vg| {
                    !vg.is_empty()
                        && *vg != "."
                        && *vg != ".."
                        && !vg.starts_with('-')
                        && vg
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b"+_.-".contains(&b))
                })
                .ok_or("its LVM pool names no volume group")?;
            lvm_path(vg, &name, claimed)
        }
    }
}

/// A file pool's volume `file` in `dir`, which `claimed` must name.
fn file_path(dir: &Path, file: &str, claimed: &Path) -> Result<PathBuf, String> {
    let want = dir.join(file);
    if claimed != want {
        return Err(format!(
            "status.devicePath {} is not {}, its file in the pool",
            claimed.display(),
            want.display()
        ));
    }
    let meta = std::fs::symlink_metadata(&want).map_err(|e| format!("{}: {e}", want.display()))?;
    if !meta.file_type().is_file() {
        return Err(format!("{} is not a regular file", want.display()));
    }
    let inside = match (std::fs::canonicalize(dir), std::fs::canonicalize(&want)) {
        (Ok(d), Ok(f)) => f == d.join(file),
        _ => false,
    };
    if !inside {
        return Err(format!(
            "{} is not in the pool's directory {}",
            want.display(),
            dir.display()
        ));
    }
    Ok(want)
}

/// An LVM pool's volume `name` of group `vg`, which `claimed` must be the device of.
fn lvm_path(vg: &str, name: &str, claimed: &Path) -> Result<PathBuf, String> {
    let active = Path::new("/dev").join(vg).join(name);
    let block = |p: &Path| std::fs::metadata(p).is_ok_and(|m| m.file_type().is_block_device());
    if claimed == active {
        return if block(&active) {
            Ok(active)
        } else {
            Err(format!("{} is not a block device", active.display()))
        };
    }
    let Some(n) = claimed
        .to_str()
        .and_then(|s| s.strip_prefix("/dev/loop"))
        .filter(|n| !n.is_empty() && n.len() <= 10 && n.bytes().all(|b| b.is_ascii_digit()))
    else {
        return Err(format!(
            "status.devicePath {} is neither {} nor a loop device",
            claimed.display(),
            active.display()
        ));
    };
    let is_link = std::fs::symlink_metadata(claimed).is_ok_and(|m| m.file_type().is_symlink());
    if is_link || !block(claimed) {
        return Err(format!("{} is not a block device", claimed.display()));
    }
    let sys = PathBuf::from(format!("/sys/block/loop{n}/loop"));
    let read = |f: &str| {
        std::fs::read_to_string(sys.join(f))
            .map(|s| s.trim_end_matches('\n').to_owned())
            .map_err(|e| format!("{} has no backing: {e}", claimed.display()))
    };
    let number = |f: &str| -> Result<u64, String> {
        read(f)?
            .trim()
            .parse()
            .map_err(|_| format!("{}: its {f} is not a number", claimed.display()))
    };
    let backing = PathBuf::from(read("backing_file")?);
    let (offset, limit) = (number("offset")?, number("sizelimit")?);
    let region = lv_region(vg, name)?;
    let same = |a: &Path, b: &Path| match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    };
    if same(&backing, &region.0) && offset == region.1 && limit == region.2 {
        Ok(claimed.to_owned())
    } else {
        Err(format!(
            "{} is over {} at {offset} for {limit} bytes, not the extents of {vg}/{name} ({} at {} for {} bytes)",
            claimed.display(),
            backing.display(),
            region.0.display(),
            region.1,
            region.2
        ))
    }
}

/// Runs an lvm2 report command (argument vector, no device-mapper needed) and answers its
/// JSON rows of `kind`.
fn lvm_report(program: &str, args: &[&str], kind: &str) -> Result<Vec<serde_json::Value>, String> {
    let out = Command::new(program)
        .args([
            "--driverloaded",
            "n",
            "--reportformat",
            "json",
            "--units",
            "b",
            "--nosuffix",
        ])
        .args(args)
        .output()
        .map_err(|e| format!("{program}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{program}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    report_rows(&out.stdout, kind).ok_or_else(|| format!("{program}: its report does not parse"))
}

/// The rows of `kind` in an lvm2 JSON report.
fn report_rows(out: &[u8], kind: &str) -> Option<Vec<serde_json::Value>> {
    let v: serde_json::Value = serde_json::from_slice(out).ok()?;
    Some(
        v.get("report")?
            .as_array()?
            .iter()
            .filter_map(|r| r.get(kind)?.as_array().cloned())
            .flatten()
            .collect(),
    )
}

fn field_u64(row: &serde_json::Value, f: &str) -> Option<u64> {
    row.get(f)?.as_str()?.trim().parse().ok()
}

/// Where LV `vg/name`'s one segment is: its PV, the byte offset and the length.
fn lv_region(vg: &str, name: &str) -> Result<(PathBuf, u64, u64), String> {
    let lv = format!("{vg}/{name}");
    let segs = lvm_report(
        "lvs",
        &["--segments", "-o", "lv_name,lv_size,seg_pe_ranges", &lv],
        "seg",
    )?;
    let extent = lvm_report("vgs", &["-o", "vg_extent_size", vg], "vg")?
        .first()
        .and_then(|r| field_u64(r, "vg_extent_size"))
        .ok_or_else(|| format!("vgs: no extent size for {vg}"))?;
    let pvs = lvm_report("pvs", &["-o", "pv_name,pe_start,vg_name"], "pv")?;
    region_of(vg, &segs, extent, &pvs)
        .ok_or_else(|| format!("{lv} is not one run of extents on a PV of {vg}"))
}

/// The region (PV, offset, length) of an LV from its `lvs --segments` rows, the group's
/// extent size and the `pvs` rows: `None` unless it is one run of extents on a PV of `vg`.
fn region_of(
    vg: &str,
    segs: &[serde_json::Value],
    extent: u64,
    pvs: &[serde_json::Value],
) -> Option<(PathBuf, u64, u64)> {
    let [seg] = segs else { return None };
    let size = field_u64(seg, "lv_size")?;
    let ranges = seg.get("seg_pe_ranges")?.as_str()?.trim();
    let (pv, span) = ranges.rsplit_once(':')?;
    let (first, _) = span.split_once('-')?;
    let first: u64 = first.parse().ok()?;
    let start = pvs.iter().find_map(|p| {
        (p.get("pv_name")?.as_str()? == pv && p.get("vg_name")?.as_str()? == vg)
            .then(|| field_u64(p, "pe_start"))?
    })?;
    Some((
        PathBuf::from(pv),
        start.checked_add(first.checked_mul(extent)?)?,
        size,
    ))
}

/// Where volume `name` (of uid `uid`) of another node is served to `node`, from its
/// `status` and its export to this node (`export`, the VolumeExport the attachments controller
/// made for this node and the storage node's agent serves): at the storage address its pool's
/// node recorded (`recorded`, the pool's `status.storageAddress`), on a port, under a name of
/// the form the storage agent makes.
///
/// # Errors
/// Why it is not (yet) served to this node.
pub fn remote(
    name: &str,
    status: &stratus_api_types::storage::VolumeStatus,
    export: Option<&VolumeExport>,
    uid: &str,
    node: &str,
    recorded: Option<&str>,
) -> Result<PathBuf, String> {
    let on = status.node.as_deref().unwrap_or_default();
    let waiting = |why: &str| format!("volume \"{name}\" is on node {on}: {why}");
    let Some(x) = export.filter(|x| x.spec.node == node && x.spec.volume.uid == uid) else {
        return Err(waiting("not yet exported to this node"));
    };
    let Some((host, port, export_name, tls)) = x.served() else {
        let said = x
            .status
            .as_ref()
            .and_then(|s| stratus_api_types::common::ConditionType::Ready.find(&s.conditions))
            .filter(|c| c.status == "False")
            .map(|c| c.message.clone());
        return Err(waiting(&said.unwrap_or_else(|| {
            format!("waiting for node {on} to export it to this node")
        })));
    };
    let host: std::net::IpAddr = host
        .parse()
        .map_err(|_| waiting("its export's host is not an IP address"))?;
    // Never this node's own services, nor everyone's: another node's storage address is a
    // unicast address off this host.
    let local = match host {
        std::net::IpAddr::V4(a) => {
            a.is_loopback()
                || a.is_unspecified()
                || a.is_link_local()
                || a.is_multicast()
                || a.is_broadcast()
        }
        std::net::IpAddr::V6(a) => {
            a.is_loopback()
                || a.is_unspecified()
                || a.is_multicast()
                || a.is_unicast_link_local()
                || a.to_ipv4_mapped().is_some()
        }
    };
    if local {
        return Err(waiting(
            "its export's host is not another node's address (loopback, link-local, multicast or unspecified)",
        ));
    }
    // Only the address the storage node recorded for its pool, which it cannot move later:
    // a volume's status does not send this node's QEMU anywhere else.
    match recorded.and_then(|r| r.parse::<std::net::IpAddr>().ok()) {
        Some(a) if a == host => {}
        Some(a) => {
            return Err(waiting(&format!(
                "its export's host {host} is not {a}, the storage address its pool records"
            )));
        }
        None => {
            return Err(waiting(
                "its pool records no storage address (status.storageAddress) to connect to",
            ));
        }
    }
    let named = !export_name.is_empty()
        && export_name.len() <= 64
        && export_name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if !named || port == 0 {
        return Err(waiting(
            "its export names no port or no export of the form made",
        ));
    }
    Ok(nbd_path(host, port, export_name, tls))
}

/// Whether `vol` can be given to Server `server`'s guest on `node`: claimed for the server
/// (`status.attachedTo`, written by the API server in the Server's own transaction), placed
/// on this node, made (a device path and a size), and its device path its data in `pool`
/// (its `status.pool`, as this node reads it) on this node ([`data_path`]); or, placed on
/// another node, served to this one by `export` ([`remote`]).
///
/// # Errors
/// Why not (yet).
pub fn ready(
    vol: &Volume,
    server: &str,
    node: &str,
    pool: Option<&StoragePool>,
    export: Option<&VolumeExport>,
    nbd: impl Into<NbdPolicy>,
) -> Result<Ready, NotReady> {
    let nbd = nbd.into();
    let name = vol.name_any();
    let st = vol.status.clone().unwrap_or_default();
    if !st.is_attached_to(server) {
        return Err(NotReady::Released(format!(
            "volume \"{name}\" is not attached to this server"
        )));
    }
    if st.node.is_none() {
        return Err(NotReady::Waiting(format!(
            "volume \"{name}\" is not placed on a storage pool yet"
        )));
    }
    let made = matches!(
        st.phase,
        VolumePhase::Available | VolumePhase::InUse | VolumePhase::Extending
    );
    let (Some(claimed), Some(gib), true) = (st.device_path.clone(), st.size_gib, made) else {
        return Err(NotReady::Waiting(format!(
            "volume \"{name}\" is {:?}, not made yet",
            st.phase
        )));
    };
    let uid = vol.uid().unwrap_or_default();
    let growing = growing(vol, gib, st.phase);
    if st.node.as_deref() != Some(node) {
        // Served over NBD at the size it was exported with (what its agent provisioned).
        let mine = export.filter(|x| x.spec.node == node && x.spec.volume.uid == uid);
        if let Some((_, port, _, tls)) = mine.and_then(VolumeExport::served) {
            if !nbd.ports.contains(port) {
                // Whatever listens there (the storage node's etcd, its API server, its SSH)
                // is no export: this node's QEMU is never aimed at it.
                return Err(NotReady::Refused(format!(
                    "volume \"{name}\" is refused: its export's port {port} is outside the cluster's export ports {} (stratus agent --export-ports)",
                    nbd.ports
                )));
            }
            if !tls && !nbd.insecure {
                return Err(NotReady::Refused(format!(
                    "volume \"{name}\" is refused: its export is served without TLS, and this node attaches volumes of other nodes over TLS alone (their storage agents serve over TLS with --nbd-tls-dir; stratus agent --nbd-insecure on this node takes exports in the clear)"
                )));
            }
        }
        let recorded = pool
            .filter(|p| Some(p.name_any()) == st.pool)
            .and_then(|p| p.status.as_ref()?.storage_address.as_deref());
        let path = remote(&name, &st, mine, &uid, node, recorded).map_err(NotReady::Waiting)?;
        return Ok(Ready {
            volume: name,
            path,
            serial: serial(&uid),
            shareable: vol.spec.multi_attach,
            bytes: gib << 30,
            growing,
        });
    }
    let Some(pool) = pool.filter(|p| Some(p.name_any()) == st.pool) else {
        return Err(NotReady::Waiting(format!(
            "volume \"{name}\": its storage pool {:?} is not readable by this node",
            st.pool.unwrap_or_default()
        )));
    };
    let path = data_path(&pool.spec, node, &uid, &claimed)
        .map_err(|why| NotReady::Refused(format!("volume \"{name}\" is refused: {why}")))?;
    let gib = match pool.spec.backend {
        StorageBackend::Lvm => gib,
        StorageBackend::File => gib.max(vol.spec.size_gib),
    };
    Ok(Ready {
        volume: name,
        path,
        serial: serial(&uid),
        shareable: vol.spec.multi_attach,
        bytes: gib << 30,
        growing,
    })
}

/// What the volumes of a Server resolve to on this node.
#[derive(Debug, Default, Clone)]
pub struct Resolved {
    /// Those the guest can have now, in `spec.volumes` order.
    pub ready: Vec<Ready>,
    /// Why each of the others cannot be had yet.
    pub waiting: Vec<String>,
    /// Why each volume whose device path is refused is.
    pub refused: Vec<String>,
    /// The serials of named volumes held for this server but not ready: a disk of theirs
    /// stays plugged in.
    pub keep: Vec<String>,
    /// The serials of named volumes not attached to this server: a disk of theirs goes.
    pub released: Vec<String>,
    /// Whether a named volume could not be read: which disk is its is then unknown, so only
    /// a disk known to be another volume's goes.
    pub unknown: bool,
}

impl Resolved {
    /// Files `vol` (of uid `uid`) as [`ready`] judged it.
    fn add(&mut self, uid: &str, judged: Result<Ready, NotReady>) {
        match judged {
            Ok(r) => {
                self.waiting.extend(r.growing.clone());
                self.ready.push(r);
            }
            Err(NotReady::Waiting(why)) => {
                self.keep.push(serial(uid));
                self.waiting.push(why);
            }
            Err(NotReady::Refused(why)) => {
                self.keep.push(serial(uid));
                self.refused.push(why);
            }
            Err(NotReady::Released(why)) => {
                self.released.push(serial(uid));
                self.waiting.push(why);
            }
        }
    }

    /// Whether the attached disk `a` is to be unplugged: it is no ready volume's, and it is a
    /// released volume's, or it is no named volume's at all (when every one could be read).
    fn unplugs(&self, a: &AttachedVolume) -> bool {
        if self.ready.iter().any(|w| w.path == a.path) {
            return false;
        }
        let serial = a.serial.as_deref();
        let listed = |l: &[String]| serial.is_some_and(|s| l.iter().any(|x| x == s));
        if listed(&self.released) {
            return true;
        }
        !listed(&self.keep) && !self.unknown
    }

    /// Whether a domain with the disks `attached` holds nothing but ready volumes: no disk of
    /// a volume the spec dropped (nor one this node cannot tell is not such a disk) is left in
    /// it, so the generation can be observed and the dropped volumes released.
    pub fn holds_only_ready(&self, attached: &[AttachedVolume]) -> bool {
        attached
            .iter()
            .all(|a| self.ready.iter().any(|w| w.path == a.path))
    }
}

/// Reads the Volumes `names` of namespace `ns` for Server `server`'s guest on `node`, and
/// their StoragePools. A Volume the node may not read (the authorizer lets a node read a
/// volume once it is attached to a server placed there) waits as a missing one does, and
/// leaves every disk plugged in that could be its.
///
/// # Errors
/// A failed request.
pub async fn resolve(
    client: &Client,
    ns: &str,
    server: &str,
    node: &str,
    names: &[String],
    nbd: NbdPolicy,
) -> Result<Resolved, kube::Error> {
    let api = Api::<Volume>::namespaced(client.clone(), ns);
    let pools = Api::<StoragePool>::all(client.clone());
    let mut out = Resolved::default();
    for name in names {
        let vol = match api.get_opt(name).await {
            Ok(v) => v,
            Err(kube::Error::Api(e)) if e.code == 403 => None,
            Err(e) => return Err(e),
        };
        let Some(vol) = vol else {
            out.unknown = true;
            out.waiting.push(format!(
                "volume \"{name}\" is not readable by this node yet"
            ));
            continue;
        };
        let pool = match vol.status.as_ref().and_then(|s| s.pool.as_deref()) {
            Some(p) => match pools.get_opt(p).await {
                Ok(p) => p,
                Err(kube::Error::Api(e)) if e.code == 403 => None,
                Err(e) => return Err(e),
            },
            None => None,
        };
        let export = export_to(client, &vol, node).await?;
        let (server, node) = (server.to_owned(), node.to_owned());
        let uid = vol.uid().unwrap_or_default();
        // The path check reads the disk (and, for an LVM pool, lvm2's reports).
        let judged = stratus_runtime::blocking(move || {
            ready(&vol, &server, &node, pool.as_ref(), export.as_ref(), nbd)
        })
        .await
        .unwrap_or_else(|e| Err(NotReady::Waiting(format!("volume \"{name}\": {e}"))));
        out.add(&uid, judged);
    }
    Ok(out)
}

/// The VolumeExport serving `vol` to `node`, when its data is on another node and the export
/// is there (read by its name, the one the attachments controller gives the pair).
///
/// # Errors
/// The API server did not answer (a 403 or 404 is no export yet).
pub async fn export_to(
    client: &Client,
    vol: &Volume,
    node: &str,
) -> Result<Option<VolumeExport>, kube::Error> {
    let on = vol.status.as_ref().and_then(|s| s.node.as_deref());
    let (Some(on), Some(uid)) = (on, vol.uid()) else {
        return Ok(None);
    };
    if on == node {
        return Ok(None);
    }
    match Api::<VolumeExport>::all(client.clone())
        .get_opt(&volume_export_name(&uid, node))
        .await
    {
        Ok(x) => Ok(x),
        Err(kube::Error::Api(e)) if e.code == 403 => Ok(None),
        Err(e) => Err(e),
    }
}

/// One change to a guest's volumes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Plug this disk in.
    Attach(VolumeDisk),
    /// Unplug the disk at this guest name: no volume of the Server's is there any more.
    Detach(String),
    /// The volume at this guest name grew: tell the running guest its new size in bytes.
    Resize(String, u64),
    /// The running guest's NBD disk at this disk's guest name reads an earlier export of its
    /// volume: move it to this export (the volume grew, and its storage node serves it anew
    /// at its size, the earlier export until the guest leaves it).
    Move(VolumeDisk),
}

/// Whether `path` is a volume's export over NBD (see [`remote`]).
fn is_nbd(path: &Path) -> bool {
    path.to_str()
        .is_some_and(|p| p.starts_with("nbd://") || p.starts_with("nbd+tls://"))
}

/// The changes that bring a guest's `attached` disks to the volumes `resolved`: a disk is
/// detached only when it is a released volume's or no named volume's (never for a volume
/// that could not be read, is in error or whose path is refused: that is said on the
/// Server, the disk stays); every ready volume not attached is attached at the first guest
/// name free (not one a disk still being unplugged holds), unless it is growing; a running
/// guest that sees an attached volume smaller than it now is is told its size.
pub fn plan(resolved: &Resolved, attached: &[AttachedVolume], running: bool) -> Vec<Step> {
    // A running guest's NBD disk of a ready volume that reads another export of it (of the
    // same serial) than the one served now moves to that one, rather than being unplugged
    // and plugged in again: the guest keeps its disk.
    let moves: Vec<(&AttachedVolume, &Ready)> = attached
        .iter()
        .filter(|_| running)
        .filter(|a| is_nbd(&a.path) && !resolved.ready.iter().any(|w| w.path == a.path))
        .filter_map(|a| {
            let w = resolved
                .ready
                .iter()
                .find(|w| is_nbd(&w.path) && a.serial.as_deref() == Some(w.serial.as_str()))?;
            (!attached.iter().any(|b| b.path == w.path)).then_some((a, w))
        })
        .collect();
    let mut steps: Vec<Step> = attached
        .iter()
        .filter(|a| resolved.unplugs(a) && !moves.iter().any(|(m, _)| m.target == a.target))
        .map(|a| Step::Detach(a.target.clone()))
        .collect();
    for (a, w) in &moves {
        steps.push(Step::Move(VolumeDisk {
            path: w.path.clone(),
            target: a.target.clone(),
            serial: w.serial.clone(),
            shareable: w.shareable,
        }));
    }
    let mut used: Vec<String> = attached.iter().map(|a| a.target.clone()).collect();
    let mut next = FIRST_VOLUME_DISK;
    for w in &resolved.ready {
        match attached.iter().find(|a| a.path == w.path) {
            Some(a) => {
                // An NBD disk grows by a move to the export serving its new size: QEMU's NBD
                // client does not grow past the size its export was opened with.
                if running && !is_nbd(&a.path) && a.capacity.is_some_and(|c| c < w.bytes) {
                    steps.push(Step::Resize(a.target.clone(), w.bytes));
                }
            }
            // Moved to it (above).
            None if moves.iter().any(|(_, m)| m.path == w.path) => {}
            // Not given to the guest before it is grown (its waiting says why).
            None if w.growing.is_some() => {}
            None => {
                let target = loop {
                    let t = virtio_disk_name(next);
                    next += 1;
                    if !used.contains(&t) {
                        break t;
                    }
                };
                used.push(target.clone());
                steps.push(Step::Attach(VolumeDisk {
                    path: w.path.clone(),
                    target,
                    serial: w.serial.clone(),
                    shareable: w.shareable,
                }));
            }
        }
    }
    steps
}

/// The change that brings a running guest's root disk `root` to its boot volume `want` (as
/// it resolves now), if one does, as [`plan`] changes a volume's disk already plugged in: a
/// root disk read over NBD from another export than the one serving the volume now moves to
/// that one (the volume grew, and its storage node serves it anew at its size); a local one
/// the guest sees smaller than the volume is told its size, while the volume grows too (a
/// file QEMU holds is grown by QEMU's resize, which its storage agent waits for). A root disk
/// is never plugged in or out.
pub fn plan_root(want: &Ready, root: &AttachedVolume) -> Option<Step> {
    if is_nbd(&root.path) || is_nbd(&want.path) {
        return (is_nbd(&root.path) && is_nbd(&want.path) && root.path != want.path).then(|| {
            Step::Move(VolumeDisk {
                path: want.path.clone(),
                target: ROOT_DISK.into(),
                // As the domain is defined with it (the definition keeps this disk, and
                // a fresh one is not written while its path stays): no serial, and not
                // shareable, whatever the volume's multiAttach.
                serial: String::new(),
                shareable: false,
            })
        });
    }
    (root.path == want.path && root.capacity.is_some_and(|c| c < want.bytes))
        .then(|| Step::Resize(ROOT_DISK.into(), want.bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const UID: &str = "0f9e2c1a-77b4-4c1d-9a34-0f6b1d2c3e4f";

    /// The annotation a test volume carries its export in (see [`volume`]).
    const TEST_EXPORT: &str = "test.stratus.dev/export";

    /// A volume of `status`; its `export` (`{node, host, port, name, tls, conditions}`), if
    /// given, is the VolumeExport serving it to that node, which [`ready`] here hands on.
    fn volume(mut status: serde_json::Value) -> Volume {
        let export = status
            .as_object_mut()
            .and_then(|s| s.remove("export"))
            .filter(|e| !e.is_null());
        let mut v: Volume = serde_json::from_value(json!({
            "apiVersion": "storage.stratus.dev/v1", "kind": "Volume",
            "metadata": {"name": "data", "namespace": "demo", "uid": UID},
            "spec": {"sizeGiB": 1},
            "status": status,
        }))
        .expect("a volume");
        if let Some(e) = export {
            v.metadata.annotations = Some([(TEST_EXPORT.to_owned(), e.to_string())].into());
        }
        v
    }

    /// The VolumeExport a test volume carries (see [`volume`]).
    fn export_of(v: &Volume) -> Option<VolumeExport> {
        let e: serde_json::Value = serde_json::from_str(v.annotations().get(TEST_EXPORT)?).ok()?;
        let node = e["node"].as_str().unwrap_or_default();
        let mut status = json!({"host": e["host"], "port": e["port"], "exportName": e["name"],
                                "tls": e["tls"].as_bool().unwrap_or_default(),
                                "conditions": e.get("conditions").cloned().unwrap_or(json!([]))});
        let st = status.as_object_mut().expect("an object");
        st.retain(|_, v| !v.is_null());
        Some(
            serde_json::from_value(json!({
                "apiVersion": "storage.stratus.dev/v1", "kind": "VolumeExport",
                "metadata": {"name": volume_export_name(UID, node)},
                "spec": {"volume": {"namespace": "demo", "name": "data", "uid": UID},
                         "storageNode": "n2", "node": node},
                "status": status,
            }))
            .expect("an export"),
        )
    }

    /// [`super::ready`] with the export the test volume carries.
    fn ready(
        v: &Volume,
        server: &str,
        node: &str,
        pool: Option<&StoragePool>,
        nbd: impl Into<NbdPolicy>,
    ) -> Result<Ready, NotReady> {
        super::ready(v, server, node, pool, export_of(v).as_ref(), nbd)
    }

    fn pool(spec: serde_json::Value) -> StoragePool {
        serde_json::from_value(json!({
            "apiVersion": "storage.stratus.dev/v1", "kind": "StoragePool",
            "metadata": {"name": "p"},
            "spec": spec,
        }))
        .expect("a pool")
    }

    /// A file pool on node n1 in a new directory holding the volume's file.
    fn file_pool() -> (tempfile::TempDir, StoragePool, String) {
        let dir = tempfile::tempdir().expect("a directory");
        let file = dir.path().join(format!("volume-{UID}.raw"));
        std::fs::write(&file, b"data").expect("the volume's file");
        let p = pool(json!({"backend": "file", "node": "n1",
                            "path": dir.path().to_str().expect("utf-8")}));
        (dir, p, file.to_str().expect("utf-8").to_owned())
    }

    fn wanted(path: &str, gib: u64) -> Ready {
        Ready {
            volume: path.into(),
            path: path.into(),
            serial: format!("s{path}"),
            shareable: false,
            bytes: gib << 30,
            growing: None,
        }
    }

    fn ready_only(w: Vec<Ready>) -> Resolved {
        Resolved {
            ready: w,
            ..Resolved::default()
        }
    }

    fn attached(target: &str, path: &str, capacity: Option<u64>) -> AttachedVolume {
        AttachedVolume {
            target: target.into(),
            path: path.into(),
            serial: Some(format!("s{path}")),
            capacity,
        }
    }

    #[test]
    fn a_volume_is_given_only_once_claimed_placed_here_and_made() {
        let (_dir, p, path) = file_pool();
        let good = json!({"phase": "InUse", "node": "n1", "pool": "p", "sizeGiB": 2,
                          "devicePath": path, "attachedTo": "web"});
        let r = ready(
            &volume(good.clone()),
            "web",
            "n1",
            Some(&p),
            PortRange::DEFAULT,
        )
        .expect("ready");
        assert_eq!(r.path, PathBuf::from(&path));
        assert_eq!(r.bytes, 2 << 30);
        assert_eq!(r.serial, "0f9e2c1a77b44c1d9a34");
        // A file grows to the size asked (QEMU grows it).
        let mut asked = volume(good.clone());
        asked.spec.size_gib = 3;
        assert_eq!(
            ready(&asked, "web", "n1", Some(&p), PortRange::DEFAULT)
                .expect("ready")
                .bytes,
            3 << 30
        );
        let not = |status: serde_json::Value, pool: Option<&StoragePool>| {
            ready(&volume(status), "web", "n1", pool, PortRange::DEFAULT).expect_err("not ready")
        };
        let waits = |e: NotReady, what: &str| match e {
            NotReady::Waiting(m) => assert!(m.contains("\"data\"") && m.contains(what), "{m}"),
            other => panic!("{other:?}"),
        };
        let mut other = good.clone();
        other["attachedTo"] = "db".into();
        assert!(
            matches!(not(other, Some(&p)), NotReady::Released(m) if m.contains("not attached to this server"))
        );
        let mut elsewhere = good.clone();
        elsewhere["node"] = "n2".into();
        waits(
            not(elsewhere, Some(&p)),
            "on node n2: not yet exported to this node",
        );
        let mut creating = good.clone();
        creating["phase"] = "Creating".into();
        waits(not(creating, Some(&p)), "not made yet");
        let mut failed = good.clone();
        failed["phase"] = "Error".into();
        waits(not(failed, Some(&p)), "not made yet");
        let mut no_path = good.clone();
        no_path["devicePath"] = serde_json::Value::Null;
        waits(not(no_path, Some(&p)), "not made yet");
        waits(
            not(good.clone(), None),
            "storage pool \"p\" is not readable",
        );
        let mut other_pool = good;
        other_pool["pool"] = "q".into();
        waits(not(other_pool, Some(&p)), "storage pool \"q\"");
    }

    #[test]
    fn a_volume_of_another_node_is_given_only_as_its_export_to_this_node() {
        let export = json!({"node": "n1", "host": "10.0.0.2", "port": 10809, "name": "5b1fe0",
                            "tls": true});
        let good = json!({"phase": "InUse", "node": "n2", "pool": "p", "sizeGiB": 2,
                          "devicePath": "/dev/loop3", "attachedTo": "web",
                          "attachedNode": "n1", "export": export});
        // The other node's pool, with the address it recorded; no path of it is opened.
        let at = |address: &str| {
            let mut far = pool(json!({"backend": "lvm", "node": "n2", "vgName": "vg"}));
            far.status =
                Some(serde_json::from_value(json!({"storageAddress": address})).expect("a status"));
            far
        };
        let far = at("10.0.0.2");
        let r = ready(
            &volume(good.clone()),
            "web",
            "n1",
            Some(&far),
            PortRange::DEFAULT,
        )
        .expect("ready");
        assert_eq!(r.path, PathBuf::from("nbd+tls://10.0.0.2:10809/5b1fe0"));
        assert_eq!(r.bytes, 2 << 30);
        let waits_with =
            |status: serde_json::Value, pool: Option<&StoragePool>, what: &str| match ready(
                &volume(status),
                "web",
                "n1",
                pool,
                PortRange::DEFAULT,
            ) {
                Err(NotReady::Waiting(m)) => {
                    assert!(
                        m.contains("\"data\" is on node n2") && m.contains(what),
                        "{m}"
                    )
                }
                other => panic!("{other:?}"),
            };
        // Only at the address its pool records.
        waits_with(good.clone(), None, "records no storage address");
        waits_with(
            good.clone(),
            Some(&pool(
                json!({"backend": "lvm", "node": "n2", "vgName": "vg"}),
            )),
            "records no storage address",
        );
        waits_with(
            good.clone(),
            Some(&at("10.0.0.9")),
            "10.0.0.2 is not 10.0.0.9",
        );
        let waits = |status: serde_json::Value, what: &str| match ready(
            &volume(status),
            "web",
            "n1",
            Some(&far),
            PortRange::DEFAULT,
        ) {
            Err(NotReady::Waiting(m)) => {
                assert!(
                    m.contains("\"data\" is on node n2") && m.contains(what),
                    "{m}"
                )
            }
            other => panic!("{other:?}"),
        };
        let mut unexported = good.clone();
        unexported["export"] = serde_json::Value::Null;
        waits(unexported, "not yet exported to this node");
        // Its first server's node is another (a multi-attach volume): served here all the same.
        let mut shared = good.clone();
        shared["attachedNode"] = "n3".into();
        assert!(ready(&volume(shared), "web", "n1", Some(&far), PortRange::DEFAULT).is_ok());
        let mut for_another = good.clone();
        for_another["export"]["node"] = "n3".into();
        waits(for_another, "not yet exported to this node");
        let mut unserved = good.clone();
        unserved["export"] = json!({"node": "n1"});
        waits(unserved, "waiting for node n2 to export it");
        let mut failed = good.clone();
        failed["export"] = json!({"node": "n1", "conditions": [{"type": "Ready",
            "status": "False", "reason": "ExportFailed",
            "message": "cannot serve it to node n1: no address",
            "lastTransitionTime": "2026-01-01T00:00:00Z"}]});
        waits(failed, "cannot serve it to node n1: no address");
        for (field, bad) in [
            ("host", json!("storage.example")),
            ("host", json!("127.0.0.1")),
            ("host", json!("127.1.2.3")),
            ("host", json!("0.0.0.0")),
            ("host", json!("169.254.169.254")),
            ("host", json!("::1")),
            ("host", json!("::ffff:127.0.0.1")),
            ("host", json!("fe80::1")),
            ("host", json!("224.0.0.1")),
            ("name", json!("../x")),
            ("name", json!("A")),
        ] {
            let mut hostile = good.clone();
            hostile["export"][field] = bad;
            waits(hostile, "its export");
        }
        // Only on a port of the cluster's export range: not the storage node's etcd, API
        // server or SSH at its recorded address. Refused, said on the Server.
        let ranged = PortRange::new(10900, 10910).expect("a range");
        for (port, ports) in [
            (0, PortRange::DEFAULT),
            (2379, PortRange::DEFAULT),
            (6443, PortRange::DEFAULT),
            (22, PortRange::DEFAULT),
            (10808, PortRange::DEFAULT),
            (11000, PortRange::DEFAULT),
            (10809, ranged),
        ] {
            let mut elsewhere = good.clone();
            elsewhere["export"]["port"] = port.into();
            match ready(&volume(elsewhere), "web", "n1", Some(&far), ports) {
                Err(NotReady::Refused(m)) => assert!(
                    m.contains(&format!(
                        "port {port} is outside the cluster's export ports {ports}"
                    )),
                    "{m}"
                ),
                other => panic!("port {port}: {other:?}"),
            }
        }
        let mut in_range = good.clone();
        in_range["export"]["port"] = 10910.into();
        let r = ready(&volume(in_range), "web", "n1", Some(&far), ranged).expect("ready");
        assert_eq!(r.path, PathBuf::from("nbd+tls://10.0.0.2:10910/5b1fe0"));
        let mut creating = good;
        creating["phase"] = "Creating".into();
        match ready(&volume(creating), "web", "n1", None, PortRange::DEFAULT) {
            Err(NotReady::Waiting(m)) => assert!(m.contains("not made yet"), "{m}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_device_path_is_only_the_volumes_data_in_its_pool_on_this_node() {
        let (dir, p, path) = file_pool();
        assert_eq!(
            data_path(&p.spec, "n1", UID, &path),
            Ok(PathBuf::from(&path))
        );
        let outside = tempfile::tempdir().expect("a directory");
        let secret = outside.path().join("shadow");
        std::fs::write(&secret, b"root:x").expect("a file");
        let d = dir.path().to_str().expect("utf-8").to_owned();
        let refused = |claimed: &str, what: &str| {
            let e = data_path(&p.spec, "n1", UID, claimed).expect_err(claimed);
            assert!(e.contains(what), "{claimed}: {e}");
        };
        // What a stolen node identity could write: host disks, files, traversals.
        refused("/dev/sda", "is not");
        refused("/etc/shadow", "is not");
        refused("/dev/../etc/shadow", "is not");
        refused(&format!("{d}/../x/volume-{UID}.raw"), "is not");
        refused(&format!("{d}/volume-other.raw"), "is not");
        refused(secret.to_str().expect("utf-8"), "is not");
        // Another node's pool, a uid that names nothing.
        let mut on_n2 = p.spec.clone();
        on_n2.node = "n2".into();
        assert!(data_path(&on_n2, "n1", UID, &path).is_err_and(|e| e.contains("on node n2")));
        assert!(data_path(&p.spec, "n1", "../../etc", &path).is_err());
        // The volume's own name as a symlink out of the pool, or as a directory: refused.
        std::fs::remove_file(&path).expect("remove");
        std::os::unix::fs::symlink(&secret, &path).expect("a symlink");
        refused(&path, "not a regular file");
        std::fs::remove_file(&path).expect("remove");
        std::fs::create_dir(&path).expect("a directory");
        refused(&path, "not a regular file");
        std::fs::remove_dir(&path).expect("remove");
        refused(&path, "No such file");
        // The pool's directory reached through a symlink to elsewhere is still the pool: the
        // file is checked inside the directory the link leads to.
        let link = outside.path().join("pool-link");
        std::os::unix::fs::symlink(dir.path(), &link).expect("a symlink");
        std::fs::write(dir.path().join(format!("volume-{UID}.raw")), b"d").expect("file");
        let via = pool(json!({"backend": "file", "node": "n1",
                              "path": link.to_str().expect("utf-8")}));
        let claimed = link.join(format!("volume-{UID}.raw"));
        assert_eq!(
            data_path(&via.spec, "n1", UID, claimed.to_str().expect("utf-8")),
            Ok(claimed.clone())
        );
        // LVM: only the LV's device; a host disk, another path or a non-device is refused.
        let lvm = pool(json!({"backend": "lvm", "node": "n1", "vgName": "vg0"}));
        for claimed in [
            "/dev/sda",
            "/dev/vg0/../sda",
            "/dev/vg0/other",
            "/etc/shadow",
            "/dev/loop",
            "/dev/loop1/../sda",
            "/dev/loopx",
        ] {
            let e = data_path(&lvm.spec, "n1", UID, claimed).expect_err(claimed);
            assert!(e.contains("neither"), "{claimed}: {e}");
        }
        assert!(
            data_path(&lvm.spec, "n1", UID, &format!("/dev/vg0/volume-{UID}"))
                .is_err_and(|e| e.contains("not a block device"))
        );
        let dots = pool(json!({"backend": "lvm", "node": "n1", "vgName": ".."}));
        assert!(data_path(&dots.spec, "n1", UID, &format!("/dev/../volume-{UID}")).is_err());
    }

    #[test]
    fn a_loop_device_must_be_over_the_lvs_one_run_of_extents() {
        let segs = |ranges: &str| {
            vec![json!({"lv_name": "volume-x", "lv_size": "8388608", "seg_pe_ranges": ranges})]
        };
        let pvs = vec![
            json!({"pv_name": "/dev/loop0", "pe_start": "1048576", "vg_name": "vg0"}),
            json!({"pv_name": "/dev/sdb", "pe_start": "1048576", "vg_name": "other"}),
        ];
        assert_eq!(
            region_of("vg0", &segs("/dev/loop0:2-3"), 4 << 20, &pvs),
            Some(("/dev/loop0".into(), (1 << 20) + 2 * (4 << 20), 8 << 20))
        );
        // A PV of another group, several segments, no segment: no region.
        assert_eq!(region_of("vg0", &segs("/dev/sdb:2-3"), 4 << 20, &pvs), None);
        let two = [segs("/dev/loop0:2-2"), segs("/dev/loop0:5-5")].concat();
        assert_eq!(region_of("vg0", &two, 4 << 20, &pvs), None);
        assert_eq!(region_of("vg0", &[], 4 << 20, &pvs), None);
        let report = br#"{"report": [{"seg": [{"lv_name": "a"}]}]}"#;
        assert_eq!(report_rows(report, "seg").map(|r| r.len()), Some(1));
        assert_eq!(report_rows(b"not json", "seg"), None);
    }

    #[test]
    fn the_plan_attaches_detaches_and_resizes() {
        // Nothing attached: each wanted volume at the next guest name after vda, vdb.
        assert_eq!(
            plan(
                &ready_only(vec![wanted("/a", 1), wanted("/b", 1)]),
                &[],
                true
            ),
            [
                Step::Attach(VolumeDisk {
                    path: "/a".into(),
                    target: "vdc".into(),
                    serial: "s/a".into(),
                    shareable: false
                }),
                Step::Attach(VolumeDisk {
                    path: "/b".into(),
                    target: "vdd".into(),
                    serial: "s/b".into(),
                    shareable: false
                }),
            ]
        );
        // As asked: nothing to do.
        let both = [
            attached("vdc", "/a", Some(1 << 30)),
            attached("vdd", "/b", Some(1 << 30)),
        ];
        let ab = ready_only(vec![wanted("/a", 1), wanted("/b", 1)]);
        assert!(plan(&ab, &both, true).is_empty());
        assert!(ab.holds_only_ready(&both));
        // One removed from the spec: detached; a new one takes a name no disk holds, not the
        // one being unplugged.
        let bc = ready_only(vec![wanted("/b", 1), wanted("/c", 1)]);
        assert_eq!(
            plan(&bc, &both, true),
            [
                Step::Detach("vdc".into()),
                Step::Attach(VolumeDisk {
                    path: "/c".into(),
                    target: "vde".into(),
                    serial: "s/c".into(),
                    shareable: false
                }),
            ]
        );
        assert!(!bc.holds_only_ready(&both));
        // Grown: the running guest is told; a stopped one learns it at its next start.
        assert_eq!(
            plan(
                &ready_only(vec![wanted("/a", 2), wanted("/b", 1)]),
                &both,
                true
            ),
            [Step::Resize("vdc".into(), 2 << 30)]
        );
        let off = [attached("vdc", "/a", None)];
        assert!(plan(&ready_only(vec![wanted("/a", 2)]), &off, false).is_empty());
        // Never shrunk.
        assert!(
            plan(
                &ready_only(vec![wanted("/a", 1)]),
                &[attached("vdc", "/a", Some(2 << 30))],
                true
            )
            .is_empty()
        );
    }

    #[test]
    fn a_running_guests_nbd_disk_moves_to_its_volumes_grown_export() {
        let old = "nbd+tls://10.0.0.2:10809/first";
        let new = "nbd+tls://10.0.0.2:10810/grown";
        let grown = Ready {
            serial: "s1".into(),
            ..wanted(new, 2)
        };
        let on_old = AttachedVolume {
            serial: Some("s1".into()),
            ..attached("vdc", old, Some(1 << 30))
        };
        let moved = Step::Move(VolumeDisk {
            path: new.into(),
            target: "vdc".into(),
            serial: "s1".into(),
            shareable: false,
        });
        let r = ready_only(vec![grown.clone()]);
        assert_eq!(plan(&r, std::slice::from_ref(&on_old), true), [moved]);
        assert!(!r.holds_only_ready(std::slice::from_ref(&on_old)));
        // Grown before its export is: the disk waits for the export, never a resize QEMU's
        // NBD client refuses.
        let same = Ready {
            path: old.into(),
            ..grown.clone()
        };
        assert!(plan(&ready_only(vec![same]), std::slice::from_ref(&on_old), true).is_empty());
        // Moved: the guest reads the grown export at its size; nothing left to do.
        let on_new = AttachedVolume {
            path: new.into(),
            capacity: Some(2 << 30),
            ..on_old.clone()
        };
        assert!(plan(&r, std::slice::from_ref(&on_new), true).is_empty());
        // A guest that is off has its definition name the export served now.
        let off = AttachedVolume {
            capacity: None,
            ..on_old.clone()
        };
        let steps = plan(&r, &[off], false);
        assert_eq!(steps.len(), 2, "{steps:?}");
        assert_eq!(steps[0], Step::Detach("vdc".into()));
        assert!(matches!(&steps[1], Step::Attach(d) if d.path == std::path::Path::new(new)));
        // Another volume's export (another serial), or a local disk, is not moved.
        let stranger = AttachedVolume {
            serial: Some("s2".into()),
            ..on_old.clone()
        };
        assert!(
            plan(&r, &[stranger], true)
                .iter()
                .all(|s| !matches!(s, Step::Move(_)))
        );
        let local = AttachedVolume {
            path: "/dev/loop7".into(),
            ..on_old
        };
        assert!(
            plan(&r, &[local], true)
                .iter()
                .all(|s| !matches!(s, Step::Move(_)))
        );
    }

    #[test]
    fn a_running_guests_root_disk_follows_its_boot_volume_as_it_grows() {
        let old = "nbd+tls://10.0.0.2:10809/first";
        let new = "nbd+tls://10.0.0.2:10810/grown";
        let root = |path: &str, gib: u64| AttachedVolume {
            serial: None,
            ..attached(ROOT_DISK, path, Some(gib << 30))
        };
        // Over NBD: moved to the export serving the grown volume, without a serial (as the
        // root disk is defined).
        assert_eq!(
            plan_root(&wanted(new, 2), &root(old, 1)),
            Some(Step::Move(VolumeDisk {
                path: new.into(),
                target: ROOT_DISK.into(),
                serial: String::new(),
                shareable: false,
            }))
        );
        // A multi-attach boot volume's root disk too: defined as a fresh build defines it.
        let shared = Ready {
            shareable: true,
            ..wanted(new, 2)
        };
        assert!(
            matches!(plan_root(&shared, &root(old, 1)), Some(Step::Move(d)) if !d.shareable && d.serial.is_empty()),
            "{:?}",
            plan_root(&shared, &root(old, 1))
        );
        // Moved, or not grown yet: nothing.
        assert_eq!(plan_root(&wanted(new, 2), &root(new, 2)), None);
        assert_eq!(plan_root(&wanted(old, 1), &root(old, 1)), None);
        // Still growing on its storage node: served at its old size by the export the guest
        // reads, so nothing until the grown one is served.
        let growing = |path: &str| Ready {
            growing: Some("growing".into()),
            ..wanted(path, 2)
        };
        assert_eq!(plan_root(&growing(old), &root(old, 1)), None);
        // On this node: the guest is told the new size, while the volume is still growing
        // too (QEMU's resize grows a file it holds); never shrunk.
        for want in [wanted("/dev/loop3", 2), growing("/dev/loop3")] {
            assert_eq!(
                plan_root(&want, &root("/dev/loop3", 1)),
                Some(Step::Resize(ROOT_DISK.into(), 2 << 30))
            );
        }
        assert_eq!(
            plan_root(&wanted("/dev/loop3", 1), &root("/dev/loop3", 2)),
            None
        );
        // Size unknown (a guest whose disk cannot be asked): nothing.
        let unknown = AttachedVolume {
            capacity: None,
            ..root("/dev/loop3", 1)
        };
        assert_eq!(plan_root(&wanted("/dev/loop3", 2), &unknown), None);
        // A root disk on another path than the volume's (a local one against an export, or
        // another file) is never moved or resized here.
        assert_eq!(plan_root(&wanted(new, 2), &root("/dev/loop3", 1)), None);
        assert_eq!(plan_root(&wanted("/dev/loop3", 2), &root(old, 1)), None);
        assert_eq!(
            plan_root(&wanted("/dev/loop4", 2), &root("/dev/loop3", 1)),
            None
        );
    }

    #[test]
    fn a_read_refused_or_a_volume_in_error_unplugs_nothing() {
        let both = [
            attached("vdc", "/a", Some(1 << 30)),
            attached("vdd", "/b", Some(1 << 30)),
        ];
        // /b's volume went to phase Error (or its path is refused): said, its disk stays.
        let mut r = Resolved::default();
        r.add("x", Ok(wanted("/a", 1)));
        r.add("b", Err(NotReady::Waiting("volume \"b\" is Error".into())));
        r.keep = vec!["s/b".into()];
        assert!(plan(&r, &both, true).is_empty());
        assert!(!r.holds_only_ready(&both));
        let mut r = ready_only(vec![wanted("/a", 1)]);
        r.refused.push("refused".into());
        r.keep.push("s/b".into());
        assert!(plan(&r, &both, true).is_empty());
        // /b's volume could not be read (403): which disk is its is unknown, none goes.
        let mut r = ready_only(vec![wanted("/a", 1)]);
        r.unknown = true;
        assert!(plan(&r, &both, true).is_empty());
        // ... but a disk of a volume known to be released still goes.
        r.released.push("s/b".into());
        assert_eq!(plan(&r, &both, true), [Step::Detach("vdd".into())]);
        // Every volume read and /b no longer named: it goes.
        assert_eq!(
            plan(&ready_only(vec![wanted("/a", 1)]), &both, true),
            [Step::Detach("vdd".into())]
        );
        // The serial a Waiting or Refused volume is kept by is its uid's.
        let mut r = Resolved::default();
        r.add(UID, Err(NotReady::Refused("no".into())));
        assert_eq!(r.keep, [serial(UID)]);
        r.add(UID, Err(NotReady::Released("gone".into())));
        assert_eq!(r.released, [serial(UID)]);
    }

    /// The other node's pool, recording the address its exports are served at.
    fn far_pool() -> StoragePool {
        let mut far = pool(json!({"backend": "lvm", "node": "n2", "vgName": "vg"}));
        far.status =
            Some(serde_json::from_value(json!({"storageAddress": "10.0.0.2"})).expect("a status"));
        far
    }

    /// A volume of node n2 attached to web on n1 over NBD, at `gib` GiB, its export `tls` or not.
    fn exported(gib: u64, tls: bool) -> serde_json::Value {
        json!({"phase": "InUse", "node": "n2", "pool": "p", "sizeGiB": gib,
               "devicePath": "/dev/loop3", "attachedTo": "web", "attachedNode": "n1",
               "export": {"node": "n1", "host": "10.0.0.2", "port": 10809, "name": "5b1fe0",
                          "tls": tls}})
    }

    #[test]
    fn an_export_in_the_clear_is_attached_only_where_the_node_allows_it() {
        let far = far_pool();
        let judge = |tls: bool, nbd: NbdPolicy| {
            ready(&volume(exported(1, tls)), "web", "n1", Some(&far), nbd)
        };
        let (secure, insecure) = (
            NbdPolicy::from(PortRange::DEFAULT),
            NbdPolicy {
                ports: PortRange::DEFAULT,
                insecure: true,
            },
        );
        // By default, over TLS alone: one served in the clear is refused, said on the Server.
        match judge(false, secure) {
            Err(NotReady::Refused(m)) => assert!(
                m.contains("\"data\" is refused: its export is served without TLS")
                    && m.contains("--nbd-insecure"),
                "{m}"
            ),
            other => panic!("{other:?}"),
        }
        let tls = judge(true, secure).expect("ready").path;
        assert_eq!(tls, PathBuf::from("nbd+tls://10.0.0.2:10809/5b1fe0"));
        // With --nbd-insecure, either, each as it is served.
        let plain = judge(false, insecure).expect("ready").path;
        assert_eq!(plain, PathBuf::from("nbd://10.0.0.2:10809/5b1fe0"));
        assert_eq!(judge(true, insecure).map(|r| r.path), Ok(tls));
        // Refused, a disk of it already plugged in stays (a node restarted without
        // --nbd-insecure does not pull it from the guest); none is plugged in.
        let mut r = Resolved::default();
        r.add(UID, judge(false, secure));
        assert_eq!((r.keep.len(), r.refused.len()), (1, 1));
        let disk = AttachedVolume {
            target: "vdc".into(),
            path: plain,
            serial: Some(serial(UID)),
            capacity: Some(1 << 30),
        };
        assert!(plan(&r, &[disk], true).is_empty());
        assert!(plan(&r, &[], true).is_empty());
    }

    #[test]
    fn a_growing_volume_is_plugged_in_only_once_grown() {
        let (_dir, p, path) = file_pool();
        let local = |want: u64, gib: u64, phase: &str| {
            let status = json!({"phase": phase, "node": "n1", "pool": "p", "sizeGiB": gib,
                                "devicePath": path, "attachedTo": "web"});
            let mut v = volume(status);
            v.spec.size_gib = want;
            ready(&v, "web", "n1", Some(&p), PortRange::DEFAULT).expect("ready")
        };
        let far = far_pool();
        let remote = |want: u64, gib: u64| {
            let mut v = volume(exported(gib, true));
            v.spec.size_gib = want;
            ready(&v, "web", "n1", Some(&far), PortRange::DEFAULT).expect("ready")
        };
        assert_eq!(local(1, 1, "InUse").growing, None);
        assert_eq!(remote(1, 1).growing, None);
        // Extended while detached and attached at once: its agent has not grown it yet (or is
        // growing it). A guest given it now would see it grow, or be served the old size.
        for (r, grown_to) in [
            (local(2, 1, "InUse"), 2),
            (local(2, 1, "Extending"), 2),
            (local(2, 2, "Extending"), 2),
            (remote(2, 1), 1),
        ] {
            let why = r.growing.clone().expect("growing");
            assert!(
                why.contains("volume \"data\" is growing from") && why.contains("to 2 GiB"),
                "{why}"
            );
            let mut resolved = Resolved::default();
            resolved.add(UID, Ok(r.clone()));
            // Said on the Server, and not plugged into a guest that lacks it.
            assert_eq!(resolved.waiting, [why]);
            assert!(plan(&resolved, &[], true).is_empty(), "{r:?}");
            // A disk of it already plugged in stays; a file QEMU holds is grown by QEMU, a
            // device as far as its agent has grown it.
            let disk = AttachedVolume {
                target: "vdc".into(),
                path: r.path.clone(),
                serial: Some(serial(UID)),
                capacity: Some(1 << 30),
            };
            let resized: Vec<Step> = (grown_to > 1)
                .then(|| Step::Resize("vdc".into(), grown_to << 30))
                .into_iter()
                .collect();
            assert_eq!(plan(&resolved, &[disk], true), resized, "{r:?}");
        }
        // Grown: plugged in at its new size.
        for r in [local(2, 2, "InUse"), remote(2, 2)] {
            assert_eq!(r.growing, None);
            let mut resolved = Resolved::default();
            resolved.add(UID, Ok(r.clone()));
            assert!(resolved.waiting.is_empty());
            match plan(&resolved, &[], true).as_slice() {
                [Step::Attach(d)] => assert_eq!((&d.path, &d.target), (&r.path, &"vdc".into())),
                other => panic!("{other:?}"),
            }
            assert_eq!(r.bytes, 2 << 30);
        }
    }

    #[test]
    fn a_volume_that_grows_once_detached_is_given_at_its_size_meanwhile() {
        let (_dir, p, path) = file_pool();
        let held = |seen: i64, phase: &str| {
            let status = json!({"phase": phase, "node": "n1", "pool": "p", "sizeGiB": 1,
                                "devicePath": path, "attachedTo": "web",
                                "conditions": [{"type": "Ready", "status": "False",
                                    "reason": "GrowsWhenDetached", "message": "grows once detached",
                                    "observedGeneration": seen,
                                    "lastTransitionTime": "2026-01-01T00:00:00Z"}]});
            let mut v = volume(status);
            v.spec.size_gib = 2;
            v.metadata.generation = Some(2);
            ready(&v, "web", "n1", Some(&p), PortRange::DEFAULT).expect("ready")
        };
        // Its agent said, for the size asked now, that it grows once detached: a server
        // (booting from it, or rebuilt while holding it) is not kept waiting for good.
        let r = held(2, "InUse");
        assert_eq!(r.growing, None);
        let mut resolved = Resolved::default();
        resolved.add(UID, Ok(r.clone()));
        assert!(resolved.waiting.is_empty());
        assert!(matches!(
            plan(&resolved, &[], true).as_slice(),
            [Step::Attach(_)]
        ));
        // Said of an earlier size: not yet known, it waits.
        assert!(held(1, "InUse").growing.is_some());
        // Being grown: it waits.
        assert!(held(2, "Extending").growing.is_some());
    }
}
