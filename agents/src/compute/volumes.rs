//! A Server's Volumes as its guest's disks: which of them this node can attach (claimed for
//! the server, placed on this node, made), and the pure [`plan`] that turns those and the
//! disks the domain has into attach, detach and resize steps.

use std::path::PathBuf;

use kube::api::Api;
use kube::{Client, ResourceExt};
use stratus_api_types::storage::{Volume, VolumePhase};

use super::driver::xml::virtio_disk_name;
use super::driver::{AttachedVolume, VolumeDisk};

/// The most bytes of a serial virtio carries to the guest.
const SERIAL_LEN: usize = 20;

/// Guest disk names before the volumes': the root disk (`vda`) and the config drive (`vdb`).
const FIRST_VOLUME_DISK: usize = 2;

/// A Volume this node can give the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ready {
    /// The Volume's name.
    pub volume: String,
    /// Its data on this node (`status.devicePath`).
    pub path: PathBuf,
    /// The serial the guest sees.
    pub serial: String,
    /// The size the guest should see, in bytes: for a block device, what the storage agent
    /// provisioned (`status.sizeGiB`); for a raw file, the size asked (`spec.sizeGiB`),
    /// which QEMU's resize grows the file to while the guest holds it (as Nova extends a
    /// file-backed volume in use: the storage agent cannot resize a file QEMU has locked).
    pub bytes: u64,
}

/// The serial of the Volume of `uid`: its hex digits, as many as virtio carries.
pub fn serial(uid: &str) -> String {
    uid.chars()
        .filter(char::is_ascii_alphanumeric)
        .take(SERIAL_LEN)
        .collect()
}

/// Whether `vol` can be given to Server `server`'s guest on `node`: claimed for the server
/// (`status.attachedTo`, written by the API server in the Server's own transaction), placed
/// on this node, made (a device path and a size). `Err` says why not yet.
pub fn ready(vol: &Volume, server: &str, node: &str) -> Result<Ready, String> {
    let name = vol.name_any();
    let st = vol.status.clone().unwrap_or_default();
    if st.attached_to.as_deref() != Some(server) {
        return Err(format!(
            "volume \"{name}\" is not attached to this server yet"
        ));
    }
    match st.node.as_deref() {
        None => {
            return Err(format!(
                "volume \"{name}\" is not placed on a storage pool yet"
            ));
        }
        Some(n) if n != node => {
            return Err(format!(
                "volume \"{name}\" is on node {n}; this node ({node}) attaches only the volumes of its own pools"
            ));
        }
        Some(_) => {}
    }
    let made = matches!(
        st.phase,
        VolumePhase::Available | VolumePhase::InUse | VolumePhase::Extending
    );
    let (Some(path), Some(gib), true) = (st.device_path, st.size_gib, made) else {
        return Err(format!("volume \"{name}\" is {:?}, not made yet", st.phase));
    };
    let uid = vol.uid().unwrap_or_default();
    let path = PathBuf::from(path);
    let gib = if path.starts_with("/dev/") {
        gib
    } else {
        gib.max(vol.spec.size_gib)
    };
    Ok(Ready {
        volume: name,
        path,
        serial: serial(&uid),
        bytes: gib << 30,
    })
}

/// What the volumes of a Server resolve to on this node.
#[derive(Debug, Default)]
pub struct Resolved {
    /// Those the guest can have now, in `spec.volumes` order.
    pub ready: Vec<Ready>,
    /// Why each of the others cannot be had yet.
    pub waiting: Vec<String>,
}

/// Reads the Volumes `names` of namespace `ns` for Server `server`'s guest on `node`. A
/// Volume the node may not read yet (the authorizer lets a node read a volume once it is
/// attached to a server placed there) waits as a missing one does.
///
/// # Errors
/// A failed request.
pub async fn resolve(
    client: &Client,
    ns: &str,
    server: &str,
    node: &str,
    names: &[String],
) -> Result<Resolved, kube::Error> {
    let api = Api::<Volume>::namespaced(client.clone(), ns);
    let mut out = Resolved::default();
    for name in names {
        let vol = match api.get_opt(name).await {
            Ok(v) => v,
            Err(kube::Error::Api(e)) if e.code == 403 => None,
            Err(e) => return Err(e),
        };
        match vol.map(|v| ready(&v, server, node)) {
            Some(Ok(r)) => out.ready.push(r),
            Some(Err(why)) => out.waiting.push(why),
            None => out.waiting.push(format!(
                "volume \"{name}\" is not readable by this node yet"
            )),
        }
    }
    Ok(out)
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
}

/// The changes that bring a guest's `attached` disks to the volumes `wanted`: every disk
/// whose data is no wanted volume's is detached; every wanted volume not attached is
/// attached at the first guest name free (not one a disk still being unplugged holds); a
/// running guest that sees an attached volume smaller than it now is is told its size.
pub fn plan(wanted: &[Ready], attached: &[AttachedVolume], running: bool) -> Vec<Step> {
    let mut steps: Vec<Step> = attached
        .iter()
        .filter(|a| !wanted.iter().any(|w| w.path == a.path))
        .map(|a| Step::Detach(a.target.clone()))
        .collect();
    let mut used: Vec<String> = attached.iter().map(|a| a.target.clone()).collect();
    let mut next = FIRST_VOLUME_DISK;
    for w in wanted {
        match attached.iter().find(|a| a.path == w.path) {
            Some(a) => {
                if running && a.capacity.is_some_and(|c| c < w.bytes) {
                    steps.push(Step::Resize(a.target.clone(), w.bytes));
                }
            }
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
                }));
            }
        }
    }
    steps
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn volume(status: serde_json::Value) -> Volume {
        serde_json::from_value(json!({
            "apiVersion": "storage.stratus.dev/v1", "kind": "Volume",
            "metadata": {"name": "data", "namespace": "demo",
                         "uid": "0f9e2c1a-77b4-4c1d-9a34-0f6b1d2c3e4f"},
            "spec": {"sizeGiB": 1},
            "status": status,
        }))
        .expect("a volume")
    }

    fn wanted(path: &str, gib: u64) -> Ready {
        Ready {
            volume: path.into(),
            path: path.into(),
            serial: "s".into(),
            bytes: gib << 30,
        }
    }

    fn attached(target: &str, path: &str, capacity: Option<u64>) -> AttachedVolume {
        AttachedVolume {
            target: target.into(),
            path: path.into(),
            serial: None,
            capacity,
        }
    }

    #[test]
    fn a_volume_is_given_only_once_claimed_placed_here_and_made() {
        let good = json!({"phase": "InUse", "node": "n1", "pool": "p", "sizeGiB": 2,
                          "devicePath": "/var/lib/stratus/pool/volume-x", "attachedTo": "web"});
        let r = ready(&volume(good.clone()), "web", "n1").expect("ready");
        assert_eq!(r.path, PathBuf::from("/var/lib/stratus/pool/volume-x"));
        assert_eq!(r.bytes, 2 << 30);
        // A file grows to the size asked (QEMU grows it); a block device to what is made.
        let mut asked = volume(good.clone());
        asked.spec.size_gib = 3;
        assert_eq!(ready(&asked, "web", "n1").expect("ready").bytes, 3 << 30);
        let mut lv = good.clone();
        lv["devicePath"] = "/dev/loop4".into();
        let mut lv = volume(lv);
        lv.spec.size_gib = 3;
        assert_eq!(ready(&lv, "web", "n1").expect("ready").bytes, 2 << 30);
        assert_eq!(r.serial, "0f9e2c1a77b44c1d9a34");
        let waits = |status: serde_json::Value, what: &str| {
            let e = ready(&volume(status), "web", "n1").expect_err("waits");
            assert!(e.contains("\"data\"") && e.contains(what), "{e}");
        };
        let mut other = good.clone();
        other["attachedTo"] = "db".into();
        waits(other, "not attached to this server");
        let mut elsewhere = good.clone();
        elsewhere["node"] = "n2".into();
        waits(elsewhere, "on node n2");
        let mut creating = good.clone();
        creating["phase"] = "Creating".into();
        waits(creating, "not made yet");
        let mut no_path = good;
        no_path["devicePath"] = serde_json::Value::Null;
        waits(no_path, "not made yet");
    }

    #[test]
    fn the_plan_attaches_detaches_and_resizes() {
        // Nothing attached: each wanted volume at the next guest name after vda, vdb.
        assert_eq!(
            plan(&[wanted("/a", 1), wanted("/b", 1)], &[], true),
            [
                Step::Attach(VolumeDisk {
                    path: "/a".into(),
                    target: "vdc".into(),
                    serial: "s".into()
                }),
                Step::Attach(VolumeDisk {
                    path: "/b".into(),
                    target: "vdd".into(),
                    serial: "s".into()
                }),
            ]
        );
        // As asked: nothing to do.
        let both = [
            attached("vdc", "/a", Some(1 << 30)),
            attached("vdd", "/b", Some(1 << 30)),
        ];
        assert!(plan(&[wanted("/a", 1), wanted("/b", 1)], &both, true).is_empty());
        // One removed from the spec: detached; a new one takes a name no disk holds, not the
        // one being unplugged.
        assert_eq!(
            plan(&[wanted("/b", 1), wanted("/c", 1)], &both, true),
            [
                Step::Detach("vdc".into()),
                Step::Attach(VolumeDisk {
                    path: "/c".into(),
                    target: "vde".into(),
                    serial: "s".into()
                }),
            ]
        );
        // Grown: the running guest is told; a stopped one learns it at its next start.
        assert_eq!(
            plan(&[wanted("/a", 2), wanted("/b", 1)], &both, true),
            [Step::Resize("vdc".into(), 2 << 30)]
        );
        let off = [attached("vdc", "/a", None)];
        assert!(plan(&[wanted("/a", 2)], &off, false).is_empty());
        // Never shrunk.
        assert!(
            plan(
                &[wanted("/a", 1)],
                &[attached("vdc", "/a", Some(2 << 30))],
                true
            )
            .is_empty()
        );
    }
}
