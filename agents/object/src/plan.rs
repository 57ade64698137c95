//! What the agent does next, decided with no I/O: which Swift processes the node runs (the
//! servers always, each ring type's daemons once its ring is installed), which of them to
//! start, restart or stop, which ring file each ObjectRing's current version goes to, and
//! a device's health from what was found on it.

use std::collections::{BTreeMap, BTreeSet};

use stratus_api_types::object::{
    DeviceState, ObjectDeviceStatus, ObjectNodePhase, ObjectProcessStatus, ObjectRing, RingType,
};

use crate::config::{KINDS, RSYNC, daemons, kind_name};

/// The program names the node runs when the rings of `installed` types are in place: every
/// server and the rsync daemon (through which the account and container replicators recreate
/// a database a node lacks), and the daemons of the types whose ring is installed (a
/// replicator without its ring would exit at once).
pub fn wanted(installed: &BTreeSet<&'static str>) -> Vec<String> {
    let mut out = vec![RSYNC.to_owned()];
    for kind in KINDS {
        let name = kind_name(kind);
        out.push(format!("swift-{name}-server"));
        if installed.contains(name) {
            out.extend(daemons(kind).iter().map(|d| format!("swift-{name}-{d}")));
        }
    }
    out
}

/// What the supervisor last saw of a process it started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seen {
    /// It runs.
    Running,
    /// It exited (how).
    Exited(String),
}

/// The next action for one process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Wanted and not running (never started, or its start failed and its backoff passed):
    /// start it.
    Start(String),
    /// It exited and no restart is scheduled yet: report it and schedule one.
    Crashed(String),
    /// It exited; its restart waits until this time (ms).
    Wait(String, u64),
    /// It exited and its backoff passed: start it again.
    Restart(String),
    /// It is no longer wanted: stop it.
    Stop(String),
}

/// The steps for the `wanted` processes when the supervisor sees `seen`, restarts are
/// scheduled at `restart_at` (ms) and it is `now` (ms). A running wanted process gets no step.
pub fn plan(
    wanted: &[String],
    seen: &BTreeMap<String, Seen>,
    restart_at: &BTreeMap<String, u64>,
    now: u64,
) -> Vec<Step> {
    let mut steps = Vec::new();
    for name in wanted {
        match (seen.get(name), restart_at.get(name)) {
            // A start that failed waits as a crash does.
            (None, Some(&at)) if at > now => steps.push(Step::Wait(name.clone(), at)),
            (None, _) => steps.push(Step::Start(name.clone())),
            (Some(Seen::Running), _) => {}
            (Some(Seen::Exited(_)), None) => steps.push(Step::Crashed(name.clone())),
            (Some(Seen::Exited(_)), Some(&at)) if at > now => {
                steps.push(Step::Wait(name.clone(), at));
            }
            (Some(Seen::Exited(_)), Some(_)) => steps.push(Step::Restart(name.clone())),
        }
    }
    for name in seen.keys() {
        if !wanted.contains(name) {
            steps.push(Step::Stop(name.clone()));
        }
    }
    steps
}

/// The ring file an ObjectRing is installed as: `account.ring.gz`, `container.ring.gz`,
/// `object.ring.gz` (policy 0) or `object-N.ring.gz`.
pub fn ring_file(ring: &ObjectRing) -> String {
    match (ring.spec.ring_type, ring.spec.policy_index.unwrap_or(0)) {
        (RingType::Object, n) if n > 0 => format!("object-{n}.ring.gz"),
        (kind, _) => format!("{}.ring.gz", kind_name(kind)),
    }
}

/// The version of a ring to install.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    /// The ObjectRing.
    pub ring: String,
    /// Its ObjectRingVersion.
    pub version_name: String,
    /// The version.
    pub version: u64,
}

/// The cluster hash fingerprint `ring`'s nodes mostly report (`status.hashFingerprint`), when
/// it is not `own` (this node's): a node hashing names otherwise than the ring's other nodes
/// would put and look for every replica where they do not. A fingerprint of another version
/// than `own`'s is foreign too: the node's hash file is not the one its ring's nodes have
/// (an agent never rewrites an existing file), so nothing shows the hashes are alike.
pub fn foreign_hash<'a>(ring: &'a ObjectRing, own: &str) -> Option<&'a str> {
    ring.status
        .as_ref()?
        .hash_fingerprint
        .as_deref()
        .filter(|f| *f != own)
}

/// Which ring version goes to each ring file: each ObjectRing's current version
/// (`status.ringVersion`), but none of a ring whose nodes use another cluster hash than this
/// node's fingerprint `own` ([`foreign_hash`]; the node keeps what it has). Two rings for
/// one file are a conflict: neither is installed (the node keeps what it has) and the
/// message says which.
pub fn ring_sources(rings: &[ObjectRing], own: &str) -> (BTreeMap<String, Source>, Vec<String>) {
    let mut by_file: BTreeMap<String, Vec<Source>> = BTreeMap::new();
    for r in rings {
        if r.metadata.deletion_timestamp.is_some() || foreign_hash(r, own).is_some() {
            continue;
        }
        let Some(status) = &r.status else { continue };
        let (Some(version_name), Some(version)) = (&status.ring_version, status.version) else {
            continue;
        };
        by_file.entry(ring_file(r)).or_default().push(Source {
            ring: r.metadata.name.clone().unwrap_or_default(),
            version_name: version_name.clone(),
            version,
        });
    }
    let mut out = BTreeMap::new();
    let mut conflicts = Vec::new();
    for (file, mut sources) in by_file {
        if sources.len() == 1 {
            if let Some(s) = sources.pop() {
                out.insert(file, s);
            }
        } else {
            let names: Vec<_> = sources.iter().map(|s| s.ring.as_str()).collect();
            conflicts.push(format!(
                "rings {} are all {file}: none is installed",
                names.join(", ")
            ));
        }
    }
    (out, conflicts)
}

/// What was found on a device directory.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Probe {
    /// It exists and is a directory.
    pub present: bool,
    /// A filesystem is mounted on it.
    pub mounted: bool,
    /// A file could be created, written, synced and removed on it (the error otherwise).
    pub write_error: Option<String>,
    /// Its filesystem's size and the bytes available, when they could be read.
    pub space: Option<(u64, u64)>,
}

/// A device's reported state: failed when it is missing, not mounted while mounts are
/// checked, or not writable. Free space is reported, never judged.
pub fn device_status(name: &str, probe: &Probe, mount_check: bool) -> ObjectDeviceStatus {
    let failure = if !probe.present {
        Some("the device directory is missing".to_owned())
    } else if mount_check && !probe.mounted {
        Some("no filesystem is mounted on the device directory".to_owned())
    } else {
        probe
            .write_error
            .as_ref()
            .map(|e| format!("the device cannot be written: {e}"))
    };
    ObjectDeviceStatus {
        name: name.to_owned(),
        state: if failure.is_some() {
            DeviceState::Failed
        } else {
            DeviceState::Healthy
        },
        mounted: probe.mounted,
        writable: probe.present && probe.write_error.is_none(),
        capacity_bytes: probe.space.map(|s| s.0),
        available_bytes: probe.space.map(|s| s.1),
        message: failure,
    }
}

/// The node's phase: Ready when every device is healthy and every process runs.
pub fn phase(devices: &[ObjectDeviceStatus], processes: &[ObjectProcessStatus]) -> ObjectNodePhase {
    if devices.iter().all(|d| d.state == DeviceState::Healthy)
        && processes.iter().all(|p| p.running)
    {
        ObjectNodePhase::Ready
    } else {
        ObjectNodePhase::Degraded
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use stratus_api_types::object::{ObjectRingSpec, ObjectRingStatus};

    use super::*;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn servers_always_run_and_daemons_once_their_ring_is_installed() {
        assert_eq!(
            wanted(&BTreeSet::new()),
            names(&[
                "rsync",
                "swift-account-server",
                "swift-container-server",
                "swift-object-server"
            ])
        );
        let w = wanted(&["object"].into());
        assert!(w.contains(&"swift-object-replicator".to_owned()));
        assert!(w.contains(&"swift-object-updater".to_owned()));
        assert!(w.contains(&"swift-object-auditor".to_owned()));
        assert!(!w.iter().any(|n| n.starts_with("swift-account-r")));
        assert_eq!(wanted(&["account", "container", "object"].into()).len(), 13);
    }

    #[test]
    fn every_case_has_its_step() {
        let w = names(&["a", "b", "c", "d", "e", "f"]);
        let seen: BTreeMap<String, Seen> = [
            ("b", Seen::Running),
            ("c", Seen::Exited("status 1".into())),
            ("d", Seen::Exited("signal 9".into())),
            ("e", Seen::Exited("status 0".into())),
            ("x", Seen::Running),
            ("y", Seen::Exited("status 1".into())),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        // f's start failed; it waits for its backoff.
        let at: BTreeMap<String, u64> = [
            ("d".to_owned(), 5_000),
            ("e".to_owned(), 1_000),
            ("f".to_owned(), 3_000),
        ]
        .into();
        assert_eq!(
            plan(&w, &seen, &at, 2_000),
            vec![
                Step::Start("a".into()),
                Step::Crashed("c".into()),
                Step::Wait("d".into(), 5_000),
                Step::Restart("e".into()),
                Step::Wait("f".into(), 3_000),
                Step::Stop("x".into()),
                Step::Stop("y".into()),
            ]
        );
        // A node that runs what it wants gets no step.
        let all: BTreeMap<String, Seen> = w.iter().map(|n| (n.clone(), Seen::Running)).collect();
        assert!(plan(&w, &all, &BTreeMap::new(), 0).is_empty());
    }

    /// A ring `name` of `kind` (policy `policy`) built to `version`, named `NAME-vVERSION`.
    pub(crate) fn ring(
        name: &str,
        kind: RingType,
        policy: Option<u32>,
        version: Option<u64>,
    ) -> ObjectRing {
        let mut r = ObjectRing::new(
            name,
            ObjectRingSpec {
                ring_type: kind,
                policy_index: policy,
                part_power: 4,
                replicas: 1,
                min_part_hours: 1,
                overload: None,
                paused: false,
                devices: vec![],
            },
        );
        r.status = version.map(|v| ObjectRingStatus {
            version: Some(v),
            ring_version: Some(format!("{name}-v{v}")),
            ..ObjectRingStatus::default()
        });
        r
    }

    /// This node's cluster hash fingerprint in the tests.
    const OWN: &str = "0123456789abcdef";

    #[test]
    fn each_ring_goes_to_its_file_but_two_for_one_file_or_of_another_hash_to_none() {
        assert_eq!(
            ring_file(&ring("a", RingType::Account, None, None)),
            "account.ring.gz"
        );
        assert_eq!(
            ring_file(&ring("o", RingType::Object, Some(0), None)),
            "object.ring.gz"
        );
        assert_eq!(
            ring_file(&ring("o", RingType::Object, Some(2), None)),
            "object-2.ring.gz"
        );
        let mut foreign = ring("foreign", RingType::Container, None, Some(2));
        if let Some(s) = foreign.status.as_mut() {
            s.hash_fingerprint = Some("00000000000000ff".into());
        }
        let mut ours = ring("obj", RingType::Object, None, Some(3));
        if let Some(s) = ours.status.as_mut() {
            s.hash_fingerprint = Some(OWN.into());
        }
        let (files, conflicts) = ring_sources(
            &[
                ours,
                ring("unbuilt", RingType::Container, None, None),
                ring("acc1", RingType::Account, None, Some(1)),
                ring("acc2", RingType::Account, None, Some(1)),
                // Its nodes use another cluster hash: not installed.
                foreign.clone(),
            ],
            OWN,
        );
        assert_eq!(foreign_hash(&foreign, OWN), Some("00000000000000ff"));
        assert_eq!(
            foreign_hash(&foreign, "00000000000000ff"),
            None,
            "a node of the ring's hash installs it"
        );
        assert_eq!(
            ring_sources(&[foreign.clone()], "00000000000000ff").0.len(),
            1,
            "installed where the hash agrees"
        );
        // A v1 cluster and a node started with a fresh hash file of its own (v2): it
        // installs none of the ring's versions; nor does a v1 node of a v2 ring.
        let own_v2 = "v2:0123abcd:0123456789abcdef";
        assert_eq!(foreign_hash(&foreign, own_v2), Some("00000000000000ff"));
        assert!(ring_sources(&[foreign.clone()], own_v2).0.is_empty());
        let mut foreign_v2 = foreign.clone();
        if let Some(s) = foreign_v2.status.as_mut() {
            s.hash_fingerprint = Some("v2:0123abcd:00000000000000ff".into());
        }
        assert_eq!(
            foreign_hash(&foreign_v2, "00000000000000ff"),
            Some("v2:0123abcd:00000000000000ff")
        );
        assert!(
            ring_sources(&[foreign_v2.clone()], "00000000000000ff")
                .0
                .is_empty()
        );
        assert_eq!(
            foreign_hash(&foreign_v2, own_v2),
            Some("v2:0123abcd:00000000000000ff"),
            "two v2 fingerprints are compared"
        );
        assert_eq!(
            files,
            [(
                "object.ring.gz".to_owned(),
                Source {
                    ring: "obj".into(),
                    version_name: "obj-v3".into(),
                    version: 3
                }
            )]
            .into()
        );
        assert_eq!(conflicts.len(), 1);
        assert!(conflicts[0].contains("acc1, acc2"), "{}", conflicts[0]);
    }

    #[test]
    fn a_device_fails_when_missing_unmounted_under_mount_check_or_unwritable() {
        let healthy = Probe {
            present: true,
            mounted: false,
            write_error: None,
            space: Some((100, 40)),
        };
        let cases = [
            (healthy.clone(), false, DeviceState::Healthy),
            (healthy.clone(), true, DeviceState::Failed),
            (
                Probe {
                    mounted: true,
                    ..healthy.clone()
                },
                true,
                DeviceState::Healthy,
            ),
            (Probe::default(), false, DeviceState::Failed),
            (
                Probe {
                    write_error: Some("read-only file system".into()),
                    ..healthy.clone()
                },
                false,
                DeviceState::Failed,
            ),
            // Full is reported, not failed.
            (
                Probe {
                    space: Some((100, 0)),
                    ..healthy.clone()
                },
                false,
                DeviceState::Healthy,
            ),
        ];
        for (probe, mount_check, want) in cases {
            let s = device_status("d1", &probe, mount_check);
            assert_eq!(s.state, want, "{probe:?} mount_check={mount_check}");
            assert_eq!(s.message.is_some(), want == DeviceState::Failed);
        }
        let s = device_status("d1", &healthy, false);
        assert_eq!((s.capacity_bytes, s.available_bytes), (Some(100), Some(40)));
        assert!(s.writable);
    }
}
