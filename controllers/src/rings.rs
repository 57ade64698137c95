//! The ring controller: turns each ObjectRing's spec into ring versions with Swift's ring
//! builder ([`stratus_ring`]). Each version is an ObjectRingVersion (`RING-vN`, owned by the
//! ring, so it goes with it) holding Swift's ring file and the builder state the next
//! rebalance starts from; the ring's status names the current one and reports its balance,
//! dispersion, devices and the replicas the last step moved.
//!
//! A device change is applied in steps that respect `minPartHours`: a step moves what the
//! window allows, leaves the rest in `status.pendingMoves` and comes back when the partitions
//! it moved may move again. While `spec.paused` is true the spec is built on a copy only and
//! its effect shown in `status.proposed`. A spec that cannot be built (fewer weighted devices
//! than replicas, a changed partition power, a device moved to another zone) sets
//! `Invalid=True` and leaves the current version as it is.

use std::io::Read as _;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use futures::StreamExt;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{Api, ObjectMeta, Patch, PatchParams};
use kube::runtime::WatchStreamExt as _;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use stratus_api_types::common::{ConditionType, ConditionUpdate, Reason, Time};
use stratus_api_types::object::{DeviceState, ObjectNode, hash_fingerprint_version};
use stratus_api_types::object::{
    ObjectRing, ObjectRingPhase, ObjectRingSpec, ObjectRingStatus, ObjectRingVersion,
    ObjectRingVersionSpec, RingProposal,
};
use stratus_ring::{BuildError, Device, RingBuilder};
use stratus_runtime::policy::kube_retry;
use stratus_runtime::{Classify, Retry, Runtime};

/// The field manager of the ring controller's writes.
const MANAGER: &str = "stratus-ring-controller";
/// Largest decompressed builder state read back (a ring at the API's cap is under 1 MiB).
const MAX_STATE_BYTES: u64 = 8 << 20;

/// Why a reconcile failed, and whether retrying can help.
#[derive(Debug, thiserror::Error)]
pub enum RingsError {
    /// A request to the API server failed.
    #[error("request to the API server")]
    Api(#[source] kube::Error),
    /// The ObjectRingVersion the status names is missing or unreadable.
    #[error("ring version {name}: {reason}")]
    Version { name: String, reason: String },
    /// The builder task panicked (a bug).
    #[error("ring builder task failed")]
    Join(#[from] tokio::task::JoinError),
}

impl Classify for RingsError {
    fn retry(&self) -> Retry {
        match self {
            Self::Api(e) => kube_retry(e),
            Self::Version { .. } | Self::Join(_) => Retry::Never,
        }
    }
}

/// What a reconcile decided for a ring.
#[derive(Debug)]
pub(crate) enum Decision {
    /// The spec cannot be built: reason and message; nothing else changes.
    Invalid(Reason, String),
    /// Paused: what applying the spec would do.
    Proposed(RingProposal),
    /// Write the builder as the next version.
    Build {
        builder: Box<RingBuilder>,
        moved: u64,
        pending: u64,
        /// Seconds until the pending replicas may move.
        wait: u64,
    },
    /// The current version is the spec's; `pending` replicas wait `wait` seconds.
    Current { pending: u64, wait: u64 },
}

/// Applies `spec` to `current` (a new builder when there is none): devices added, removed
/// (absent from the spec) and re-weighted, replicas, overload and `minPartHours` set.
///
/// # Errors
/// `(field, message)` for a spec the builder cannot take.
pub(crate) fn apply_spec(
    spec: &ObjectRingSpec,
    current: Option<RingBuilder>,
) -> Result<RingBuilder, (String, String)> {
    let err = |field: &str, e: BuildError| (field.to_string(), e.to_string());
    let mut b = match current {
        Some(b) => {
            if b.part_power() != spec.part_power {
                return Err((
                    "spec.partPower".into(),
                    format!(
                        "cannot change once built (the ring has partition power {})",
                        b.part_power()
                    ),
                ));
            }
            b
        }
        None => RingBuilder::new(
            spec.part_power,
            f64::from(spec.replicas),
            spec.min_part_hours,
        )
        .map_err(|e| err("spec.partPower", e))?,
    };
    if (b.replicas() - f64::from(spec.replicas)).abs() > f64::EPSILON {
        b.set_replicas(f64::from(spec.replicas))
            .map_err(|e| err("spec.replicas", e))?;
    }
    b.set_overload(spec.overload.unwrap_or(0.0))
        .map_err(|e| err("spec.overload", e))?;
    b.set_min_part_hours(spec.min_part_hours);
    let wanted = |d: &Device| {
        spec.devices
            .iter()
            .position(|s| s.ip == d.ip && s.port == d.port && s.device == d.device)
    };
    let live: Vec<(u16, Device)> = b
        .devices()
        .filter(|(id, _)| !b.is_removing(*id))
        .map(|(id, d)| (id, d.clone()))
        .collect();
    for (id, dev) in &live {
        match wanted(dev) {
            None => b.remove_device(*id).map_err(|e| err("spec.devices", e))?,
            Some(i) => {
                let s = &spec.devices[i];
                if s.region != dev.region || s.zone != dev.zone {
                    return Err((
                        format!("spec.devices[{i}]"),
                        format!(
                            "device {}:{}/{} is in region {} zone {} in the ring: a device cannot move; remove it, then add it again",
                            dev.ip, dev.port, dev.device, dev.region, dev.zone
                        ),
                    ));
                }
                if (s.weight - dev.weight).abs() > f64::EPSILON {
                    b.set_weight(*id, s.weight)
                        .map_err(|e| err(&format!("spec.devices[{i}].weight"), e))?;
                }
            }
        }
    }
    for (i, s) in spec.devices.iter().enumerate() {
        if live
            .iter()
            .any(|(_, d)| s.ip == d.ip && s.port == d.port && s.device == d.device)
        {
            continue;
        }
        let mut dev = Device::new(
            s.region,
            s.zone,
            s.ip.clone(),
            s.port,
            s.device.clone(),
            s.weight,
        );
        dev.meta = s.meta.clone().unwrap_or_default();
        b.add_device(dev)
            .map_err(|e| err(&format!("spec.devices[{i}]"), e))?;
    }
    Ok(b)
}

/// Replicas held above what the replica plan gives each device: the least that is still to
/// move to reach the balanced ring (0 before the first build).
pub(crate) fn pending_moves(b: &RingBuilder) -> Result<u64, BuildError> {
    if b.assignment().is_empty() {
        return Ok(0);
    }
    let mut held = std::collections::BTreeMap::<u16, u64>::new();
    for &dev in b.assignment().iter().flatten() {
        *held.entry(dev).or_default() += 1;
    }
    let planned = b.planned_parts()?;
    let mut pending: u64 = planned
        .iter()
        .map(|(id, want)| {
            held.get(id)
                .copied()
                .unwrap_or(0)
                .saturating_sub(*want as u64)
        })
        .sum();
    // Replicas on devices being removed (not in the plan) move too.
    pending += held
        .iter()
        .filter(|(id, _)| b.is_removing(**id))
        .map(|(_, n)| *n)
        .sum::<u64>();
    Ok(pending)
}

/// Decides what to do for a ring whose current builder is `current` (from its current
/// version), at `now` (Unix seconds).
pub(crate) fn decide(spec: &ObjectRingSpec, current: Option<RingBuilder>, now: u64) -> Decision {
    let first = current.is_none();
    let mut b = match apply_spec(spec, current) {
        Ok(b) => b,
        Err((field, message)) => {
            return Decision::Invalid(Reason::InvalidSpec, format!("{field}: {message}"));
        }
    };
    let pending_before = match pending_moves(&b) {
        Ok(n) => n,
        Err(e) => return Decision::Invalid(Reason::CannotBuild, e.to_string()),
    };
    let wait_before = if pending_before > 0 {
        b.min_part_seconds_left(now)
    } else {
        0
    };
    let changed = first || b.devices_changed();
    if spec.paused {
        let mut copy = b.clone();
        return match copy.rebalance(now, copy.version()) {
            Ok(r) => Decision::Proposed(RingProposal {
                moves: r.moved as u64,
                pending_moves: pending_moves(&copy).unwrap_or(0),
                balance: r.balance,
                dispersion: r.dispersion,
                devices: copy.devices().count() as u32,
                generation: None,
            }),
            Err(e) => Decision::Invalid(Reason::CannotBuild, e.to_string()),
        };
    }
    if !changed && (pending_before == 0 || wait_before > 0) {
        return Decision::Current {
            pending: pending_before,
            wait: wait_before,
        };
    }
    let seed = b.version();
    match b.rebalance(now, seed) {
        Ok(r) if r.moved == 0 && r.removed_devices == 0 && !changed => {
            // Nothing the window or the topology allows moved: stay on the current version.
            Decision::Current {
                pending: pending_moves(&b).unwrap_or(0),
                wait: 0,
            }
        }
        Ok(r) => {
            let pending = pending_moves(&b).unwrap_or(0);
            let wait = if pending > 0 {
                b.min_part_seconds_left(now)
            } else {
                0
            };
            Decision::Build {
                builder: Box::new(b),
                moved: r.moved as u64,
                pending,
                wait,
            }
        }
        Err(e) => Decision::Invalid(Reason::CannotBuild, e.to_string()),
    }
}

/// `spec` with weight 0 for each device an ObjectNode reports failed, so that the ring builds
/// its replicas elsewhere; and those devices, as `IP/DEVICE`, for `status.drainedDevices`. A
/// device reported healthy again has its weight.
///
/// A report counts only for the devices whose `node` names the reporting ObjectNode (its name
/// is its node's, which a node cannot choose) and whose `ip` is that ObjectNode's `spec.ip`:
/// the address alone is what a node says of itself, and would let any node drain any other's.
pub(crate) fn drain_failed(
    spec: &ObjectRingSpec,
    nodes: &[Arc<ObjectNode>],
) -> (ObjectRingSpec, Vec<String>) {
    let failed: std::collections::BTreeSet<(&str, &str, &str)> = nodes
        .iter()
        .flat_map(|n| {
            let name = n.metadata.name.as_deref().unwrap_or_default();
            n.status
                .iter()
                .flat_map(|s| s.devices.iter())
                .filter(|d| d.state == DeviceState::Failed)
                .map(move |d| (name, n.spec.ip.as_str(), d.name.as_str()))
        })
        .collect();
    let mut spec = spec.clone();
    let mut drained = Vec::new();
    for d in &mut spec.devices {
        let Some(node) = d.node.as_deref() else {
            continue;
        };
        if failed.contains(&(node, d.ip.as_str(), d.device.as_str())) {
            d.weight = 0.0;
            let name = format!("{}/{}", d.ip, d.device);
            if !drained.contains(&name) {
                drained.push(name);
            }
        }
    }
    (spec, drained)
}

/// What a ring's nodes report of the cluster hash ([`hash_verdict`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct HashVerdict {
    /// The fingerprint most of the ring's nodes report (on a tie, that of the node
    /// registered first).
    pub reference: Option<String>,
    /// The nodes that report another fingerprint, sorted.
    pub differ: Vec<String>,
    /// Those of `differ` whose fingerprint is of another version than `reference`, sorted.
    pub other_version: Vec<String>,
}

/// The cluster hash fingerprint most of the ring's nodes report, and the nodes that report
/// another. A ring's nodes are the ObjectNodes its devices name (`node`) at the device's
/// `ip`, as for [`drain_failed`]; a node that reports no fingerprint yet has no say. A
/// fingerprint of another version than the reference's is another fingerprint: an agent
/// never rewrites an existing hash file, so a node showing another version was given
/// another file (a fresh one of its own, or one without the cluster's salt).
pub(crate) fn hash_verdict(spec: &ObjectRingSpec, nodes: &[Arc<ObjectNode>]) -> HashVerdict {
    let named = |n: &ObjectNode| {
        spec.devices.iter().any(|d| {
            d.node.as_deref() == n.metadata.name.as_deref() && d.node.is_some() && d.ip == n.spec.ip
        })
    };
    let mut ours: Vec<(&ObjectNode, &str)> = nodes
        .iter()
        .filter(|n| named(n))
        .filter_map(|n| Some((&**n, n.status.as_ref()?.hash_fingerprint.as_deref()?)))
        .collect();
    // First registered first; then by name, for creations within one second.
    ours.sort_by(|(a, _), (b, _)| {
        let key = |n: &ObjectNode| {
            (
                n.metadata.creation_timestamp.clone().map(|t| t.0),
                n.metadata.name.clone(),
            )
        };
        key(a).cmp(&key(b))
    });
    let mut counts = std::collections::BTreeMap::<&str, usize>::new();
    for (_, f) in &ours {
        *counts.entry(f).or_default() += 1;
    }
    let most = counts.values().copied().max().unwrap_or(0);
    let Some(reference) = ours
        .iter()
        .map(|(_, f)| *f)
        .find(|f| counts.get(f) == Some(&most))
    else {
        return HashVerdict::default();
    };
    let names = |keep: &dyn Fn(&str) -> bool| {
        let mut names: Vec<String> = ours
            .iter()
            .filter(|(_, f)| keep(f))
            .filter_map(|(n, _)| n.metadata.name.clone())
            .collect();
        names.sort();
        names
    };
    let version = hash_fingerprint_version(reference);
    HashVerdict {
        reference: Some(reference.to_owned()),
        differ: names(&|f| f != reference),
        other_version: names(&|f| hash_fingerprint_version(f) != version),
    }
}

/// The failed devices an ObjectNode reports (what [`drain_failed`] reads of it).
fn failed_devices(node: &ObjectNode) -> Vec<String> {
    node.status
        .iter()
        .flat_map(|s| s.devices.iter())
        .filter(|d| d.state == DeviceState::Failed)
        .map(|d| format!("{}/{}", node.spec.ip, d.name))
        .collect()
}

#[cfg(test)]
mod drain_tests {
    use stratus_api_types::object::{
        ObjectDeviceStatus, ObjectNodeSpec, ObjectNodeStatus, RingDevice, RingType,
    };

    use super::*;

    fn node(name: &str, ip: &str, devices: &[(&str, DeviceState)]) -> Arc<ObjectNode> {
        let mut n = ObjectNode::new(name, ObjectNodeSpec { ip: ip.into() });
        n.status = Some(ObjectNodeStatus {
            devices: devices
                .iter()
                .map(|(name, state)| ObjectDeviceStatus {
                    name: (*name).into(),
                    state: *state,
                    ..ObjectDeviceStatus::default()
                })
                .collect(),
            ..ObjectNodeStatus::default()
        });
        Arc::new(n)
    }

    fn dev(node: Option<&str>, ip: &str, device: &str) -> RingDevice {
        RingDevice {
            region: 1,
            zone: 1,
            ip: ip.into(),
            port: 6200,
            device: device.into(),
            weight: 100.0,
            meta: None,
            node: node.map(Into::into),
        }
    }

    fn spec(devices: Vec<RingDevice>) -> ObjectRingSpec {
        ObjectRingSpec {
            ring_type: RingType::Object,
            policy_index: None,
            part_power: 4,
            replicas: 1,
            min_part_hours: 1,
            overload: None,
            paused: false,
            devices,
        }
    }

    #[test]
    fn a_device_its_node_reports_failed_is_built_with_weight_zero() {
        let spec = spec(vec![
            dev(Some("n1"), "10.0.0.1", "d1"),
            dev(Some("n1"), "10.0.0.1", "d2"),
            dev(Some("n2"), "10.0.0.2", "d1"),
        ]);
        let nodes = [
            node(
                "n1",
                "10.0.0.1",
                &[("d1", DeviceState::Failed), ("d2", DeviceState::Healthy)],
            ),
            // Another node's d1 failing says nothing of 10.0.0.2's d1.
            node("n3", "10.0.0.3", &[("d1", DeviceState::Failed)]),
        ];
        let (drained, names) = drain_failed(&spec, &nodes);
        let weights: Vec<f64> = drained.devices.iter().map(|d| d.weight).collect();
        assert_eq!(weights, [0.0, 100.0, 100.0]);
        assert_eq!(names, ["10.0.0.1/d1"]);
        assert_eq!(failed_devices(&nodes[0]), ["10.0.0.1/d1"]);
        // Healthy again: the spec's weights.
        let (back, names) = drain_failed(&spec, &[node("n1", "10.0.0.1", &[])]);
        assert_eq!(back, spec);
        assert!(names.is_empty());
    }

    fn with_hash(name: &str, ip: &str, fingerprint: Option<&str>, created: i64) -> Arc<ObjectNode> {
        let mut n = (*node(name, ip, &[])).clone();
        if let Some(s) = n.status.as_mut() {
            s.hash_fingerprint = fingerprint.map(Into::into);
        }
        n.metadata.creation_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            k8s_openapi::jiff::Timestamp::from_second(1_800_000_000 + created).expect("time"),
        ));
        Arc::new(n)
    }

    #[test]
    fn nodes_of_another_cluster_hash_than_most_of_the_rings_are_named() {
        let spec = spec(vec![
            dev(Some("n1"), "10.0.0.1", "d1"),
            dev(Some("n2"), "10.0.0.2", "d1"),
            dev(Some("n3"), "10.0.0.3", "d1"),
            dev(Some("n3"), "10.0.0.3", "d2"),
        ]);
        let (a, b) = ("aaaaaaaaaaaaaaaa", "bbbbbbbbbbbbbbbb");
        // Two against one: the one is named, whichever registered first.
        let HashVerdict {
            reference: hash,
            differ,
            ..
        } = hash_verdict(
            &spec,
            &[
                with_hash("n1", "10.0.0.1", Some(b), 0),
                with_hash("n2", "10.0.0.2", Some(a), 1),
                with_hash("n3", "10.0.0.3", Some(a), 2),
            ],
        );
        assert_eq!((hash.as_deref(), differ), (Some(a), vec!["n1".to_owned()]));
        // A tie: the node registered first has it; nodes without a report have no say.
        let HashVerdict {
            reference: hash,
            differ,
            ..
        } = hash_verdict(
            &spec,
            &[
                with_hash("n2", "10.0.0.2", Some(a), 5),
                with_hash("n1", "10.0.0.1", Some(b), 3),
                with_hash("n3", "10.0.0.3", None, 0),
            ],
        );
        assert_eq!((hash.as_deref(), differ), (Some(b), vec!["n2".to_owned()]));
        // Nodes the ring does not name, or at another address than its device's, have no say.
        let HashVerdict {
            reference: hash,
            differ,
            ..
        } = hash_verdict(
            &spec,
            &[
                with_hash("n1", "10.0.0.1", Some(a), 9),
                with_hash("other", "10.0.0.9", Some(b), 0),
                with_hash("n2", "10.0.0.7", Some(b), 1),
            ],
        );
        assert_eq!((hash.as_deref(), differ), (Some(a), Vec::<String>::new()));
        // Agreeing nodes: no one is named; no report yet: no verdict.
        let HashVerdict {
            reference: hash,
            differ,
            ..
        } = hash_verdict(
            &spec,
            &[
                with_hash("n1", "10.0.0.1", Some(a), 0),
                with_hash("n2", "10.0.0.2", Some(a), 1),
            ],
        );
        assert_eq!((hash.as_deref(), differ.len()), (Some(a), 0));
        assert_eq!(hash_verdict(&spec, &[]), HashVerdict::default());
    }

    #[test]
    fn a_node_of_another_fingerprint_version_is_named() {
        let spec = spec(vec![
            dev(Some("n1"), "10.0.0.1", "d1"),
            dev(Some("n2"), "10.0.0.2", "d1"),
            dev(Some("n3"), "10.0.0.3", "d1"),
        ]);
        let v1 = "aaaaaaaaaaaaaaaa";
        let (v2, other_v2) = (
            "v2:0123abcd:bbbbbbbbbbbbbbbb",
            "v2:0123abcd:cccccccccccccccc",
        );
        // A v1 cluster and a node started with a fresh hash file of its own (v2, salted): it
        // is named for its version, whichever registered first, and is not the reference.
        for created in [(0, 1, 2), (1, 2, 0)] {
            let v = hash_verdict(
                &spec,
                &[
                    with_hash("n1", "10.0.0.1", Some(v1), created.0),
                    with_hash("n2", "10.0.0.2", Some(v1), created.1),
                    with_hash("n3", "10.0.0.3", Some(v2), created.2),
                ],
            );
            assert_eq!(
                v,
                HashVerdict {
                    reference: Some(v1.into()),
                    differ: vec!["n3".into()],
                    other_version: vec!["n3".into()],
                }
            );
        }
        // A v2 cluster and a node reporting v1: named the same way.
        let v = hash_verdict(
            &spec,
            &[
                with_hash("n1", "10.0.0.1", Some(v1), 0),
                with_hash("n2", "10.0.0.2", Some(v2), 1),
                with_hash("n3", "10.0.0.3", Some(v2), 2),
            ],
        );
        assert_eq!(
            (v.reference.as_deref(), v.differ, v.other_version),
            (Some(v2), vec!["n1".to_owned()], vec!["n1".to_owned()])
        );
        // Among v2 fingerprints, a different one is named for its hash, not its version.
        let v = hash_verdict(
            &spec,
            &[
                with_hash("n1", "10.0.0.1", Some(v1), 0),
                with_hash("n2", "10.0.0.2", Some(v2), 1),
                with_hash("n3", "10.0.0.3", Some(other_v2), 2),
            ],
        );
        assert_eq!(
            (v.reference.as_deref(), v.differ, v.other_version),
            (
                Some(v1),
                vec!["n2".to_owned(), "n3".to_owned()],
                vec!["n2".to_owned(), "n3".to_owned()]
            )
        );
        let v = hash_verdict(
            &spec,
            &[
                with_hash("n1", "10.0.0.1", Some(v2), 0),
                with_hash("n2", "10.0.0.2", Some(v2), 1),
                with_hash("n3", "10.0.0.3", Some(other_v2), 2),
            ],
        );
        assert_eq!(
            (v.differ, v.other_version),
            (vec!["n3".to_owned()], Vec::<String>::new())
        );
    }

    #[test]
    fn a_node_claiming_another_nodes_address_drains_nothing_of_it() {
        let spec = spec(vec![
            dev(Some("victim"), "10.0.0.1", "d1"),
            dev(Some("victim"), "10.0.0.1", "d2"),
            // Named by address only: no report drains it.
            dev(None, "10.0.0.1", "d3"),
        ]);
        let all_failed = [
            ("d1", DeviceState::Failed),
            ("d2", DeviceState::Failed),
            ("d3", DeviceState::Failed),
        ];
        let evil = node("evil", "10.0.0.1", &all_failed);
        let victim = node("victim", "10.0.0.1", &[]);
        let (drained, names) = drain_failed(&spec, &[victim.clone(), evil]);
        assert_eq!(drained, spec);
        assert!(names.is_empty());
        // The victim itself reporting them drains its own named devices, not d3.
        let victim = node("victim", "10.0.0.1", &all_failed);
        let (drained, names) = drain_failed(&spec, &[victim]);
        let weights: Vec<f64> = drained.devices.iter().map(|d| d.weight).collect();
        assert_eq!(weights, [0.0, 0.0, 100.0]);
        assert_eq!(names, ["10.0.0.1/d1", "10.0.0.1/d2"]);
        // The right name at another address is not the device either.
        let moved = node("victim", "10.0.0.9", &all_failed);
        assert!(drain_failed(&spec, &[moved]).1.is_empty());
    }
}

/// The ObjectRingVersion name of `ring`'s version `version`.
pub fn version_name(ring: &str, version: u64) -> String {
    format!("{ring}-v{version}")
}

/// Swift's gzipped ring file of `b`.
fn ring_file(b: &RingBuilder) -> Vec<u8> {
    let mut out = Vec::new();
    if let Some(ring) = b.ring() {
        // Writing to a Vec cannot fail.
        let _ = ring.write_v1(&mut out);
    }
    out
}

/// The builder state as stored: JSON, gzip, base64.
fn encode_state(b: &RingBuilder) -> String {
    let json = serde_json::to_vec(b).unwrap_or_default();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    let _ = std::io::Write::write_all(&mut gz, &json);
    BASE64.encode(gz.finish().unwrap_or_default())
}

/// Reads a stored builder state back.
pub(crate) fn decode_state(text: &str) -> Result<RingBuilder, String> {
    let gz = BASE64.decode(text).map_err(|e| format!("base64: {e}"))?;
    let mut json = Vec::new();
    flate2::read::GzDecoder::new(gz.as_slice())
        .take(MAX_STATE_BYTES)
        .read_to_end(&mut json)
        .map_err(|e| format!("gzip: {e}"))?;
    serde_json::from_slice(&json).map_err(|e| format!("state: {e}"))
}

/// The ObjectRingVersion for `b` as `ring`'s version `version`.
pub(crate) fn version_object(
    ring: &ObjectRing,
    version: u64,
    b: &RingBuilder,
) -> ObjectRingVersion {
    let name = ring.name_any();
    let owner = OwnerReference {
        api_version: ObjectRing::api_version(&()).into_owned(),
        kind: ObjectRing::kind(&()).into_owned(),
        name: name.clone(),
        uid: ring.metadata.uid.clone().unwrap_or_default(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    };
    ObjectRingVersion {
        metadata: ObjectMeta {
            name: Some(version_name(&name, version)),
            owner_references: Some(vec![owner]),
            ..ObjectMeta::default()
        },
        spec: ObjectRingVersionSpec {
            ring: name,
            version,
            ring_file: BASE64.encode(ring_file(b)),
            builder_state: encode_state(b),
        },
        status: None,
    }
}

struct Ctx {
    runtime: Runtime<ObjectRing>,
    versions: Api<ObjectRingVersion>,
    /// The ObjectNodes, whose failed devices are drained.
    nodes: Store<ObjectNode>,
}

async fn reconcile(ring: Arc<ObjectRing>, ctx: Arc<Ctx>) -> Result<Action, RingsError> {
    let result = step(&ring, &ctx).await;
    ctx.runtime.finish(&ring, result).await
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn time(secs: u64) -> Time {
    Time(
        k8s_openapi::jiff::Timestamp::from_second(i64::try_from(secs).unwrap_or(0))
            .unwrap_or_default(),
    )
}

/// The requeue for `wait` seconds of `minPartHours` left (a second after the window).
fn after(wait: u64) -> Action {
    if wait > 0 {
        Action::requeue(Duration::from_secs(wait + 1))
    } else {
        Action::await_change()
    }
}

async fn step(ring: &ObjectRing, ctx: &Ctx) -> Result<Action, RingsError> {
    if ring.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let generation = ring.metadata.generation;
    let current = ring.status.clone().unwrap_or_default();
    let builder = match (&current.ring_version, current.version) {
        (Some(name), Some(_)) => {
            let v = ctx
                .versions
                .get_opt(name)
                .await
                .map_err(RingsError::Api)?
                .ok_or_else(|| RingsError::Version {
                    name: name.clone(),
                    reason: "not found".into(),
                })?;
            let state = v.spec.builder_state;
            let b = stratus_runtime::blocking(move || decode_state(&state))
                .await?
                .map_err(|reason| RingsError::Version {
                    name: name.clone(),
                    reason,
                })?;
            Some(b)
        }
        _ => None,
    };
    let (spec, drained) = drain_failed(&ring.spec, &ctx.nodes.state());
    let HashVerdict {
        reference: hash,
        differ: mismatch,
        other_version,
    } = hash_verdict(&ring.spec, &ctx.nodes.state());
    let now = unix_now();
    let decision = stratus_runtime::blocking(move || decide(&spec, builder, now)).await?;
    let mut status = current.clone();
    status.observed_generation = generation;
    status.drained_devices = drained;
    let hash_condition = if mismatch.is_empty() {
        ConditionType::HashMismatch.no(Reason::HashesAgree, "")
    } else {
        let (reason, version) = if other_version.is_empty() {
            (Reason::HashDiffers, String::new())
        } else {
            (
                Reason::HashFingerprintVersion,
                format!(
                    "; {} show a fingerprint of another version (their hash file is not \
                     the cluster's)",
                    other_version.join(", ")
                ),
            )
        };
        ConditionType::HashMismatch.yes(
            reason,
            format!(
                "ObjectNodes {} use another cluster hash than the ring's other nodes ({}){version}: \
                 they install none of its versions until given the cluster's hash file",
                mismatch.join(", "),
                hash.as_deref().unwrap_or_default()
            ),
        )
    };
    status.hash_fingerprint = hash;
    status.hash_mismatch = mismatch;
    let (mut conditions, next) = match decision {
        Decision::Invalid(reason, message) => {
            status.phase = ObjectRingPhase::Error;
            status.proposed = None;
            let ready = if status.version.is_some() {
                "the spec cannot be built; the current version stays"
            } else {
                "the spec cannot be built"
            };
            let conditions = vec![
                ConditionType::Invalid.yes(reason, message),
                ConditionType::Ready.no(reason, ready),
            ];
            (conditions, Action::await_change())
        }
        Decision::Proposed(mut p) => {
            p.generation = generation;
            status.proposed = Some(p);
            let conditions = vec![
                ConditionType::Invalid.no(Reason::Valid, ""),
                ConditionType::Rebalancing.no(
                    Reason::Paused,
                    "spec.paused: the change is shown in status.proposed, not applied",
                ),
            ];
            (conditions, Action::await_change())
        }
        Decision::Current { pending, wait } => {
            let ready = status
                .version
                .is_some()
                .then(|| ConditionType::Ready.yes(Reason::Built, ""));
            on_version(&mut status, ready, pending, now, wait)
        }
        Decision::Build {
            builder,
            moved,
            pending,
            wait,
        } => {
            let version = current.version.unwrap_or(0) + 1;
            let obj = {
                let ring = ring.clone();
                stratus_runtime::blocking(move || version_object(&ring, version, &builder)).await?
            };
            let name = obj.name_any();
            // Applied, not created: a version written before a failed status write is
            // written again the same way.
            ctx.versions
                .patch(
                    &name,
                    &PatchParams::apply(MANAGER).force(),
                    &Patch::Apply(&obj),
                )
                .await
                .map_err(RingsError::Api)?;
            let b =
                decode_state(&obj.spec.builder_state).map_err(|reason| RingsError::Version {
                    name: name.clone(),
                    reason,
                })?;
            status.version = Some(version);
            status.ring_version = Some(name.clone());
            status.rebalanced_at = Some(time(now));
            status.balance = Some(round(b.balance()));
            status.dispersion = Some(round(b.dispersion()));
            status.devices = Some(b.devices().count() as u32);
            status.moved = Some(moved);
            let ready = ConditionType::Ready.yes(
                Reason::Built,
                format!("version {version} in ObjectRingVersion {name}"),
            );
            // Older versions than the previous one go (a node may still be installing it).
            if version > 2 {
                let old = version_name(&ring.name_any(), version - 2);
                match ctx.versions.delete(&old, &Default::default()).await {
                    Ok(_) => {}
                    Err(kube::Error::Api(s)) if s.code == 404 => {}
                    Err(e) => return Err(RingsError::Api(e)),
                }
            }
            on_version(&mut status, Some(ready), pending, now, wait)
        }
    };
    conditions.push(hash_condition);
    for c in &conditions {
        c.set_at(&mut status.conditions, generation, time(now));
    }
    ctx.runtime
        .write_status(ring, &status)
        .await
        .map_err(RingsError::Api)?;
    Ok(next)
}

/// The status of a ring on a version, kept or just built (`ready` says which, when there is
/// one): its spec valid, nothing proposed, and `pending` replicas waiting `wait` seconds from
/// `now`. The conditions to set, and when to look again.
fn on_version(
    status: &mut ObjectRingStatus,
    ready: Option<ConditionUpdate>,
    pending: u64,
    now: u64,
    wait: u64,
) -> (Vec<ConditionUpdate>, Action) {
    if ready.is_some() {
        status.phase = ObjectRingPhase::Ready;
    }
    status.proposed = None;
    status.pending_moves = Some(pending);
    status.next_step_at = (wait > 0).then(|| time(now + wait));
    let mut conditions: Vec<ConditionUpdate> = ready.into_iter().collect();
    conditions.push(ConditionType::Invalid.no(Reason::Valid, ""));
    conditions.push(rebalancing(pending, wait));
    (conditions, after(wait))
}

/// `Rebalancing` for `pending` replicas that wait `wait` seconds.
fn rebalancing(pending: u64, wait: u64) -> ConditionUpdate {
    if pending > 0 && wait > 0 {
        ConditionType::Rebalancing.yes(
            Reason::MinPartHours,
            format!("{pending} replicas move in a later step, in {wait} s (minPartHours)"),
        )
    } else if pending > 0 {
        ConditionType::Rebalancing.no(
            Reason::Settled,
            format!("{pending} replicas above the plan cannot move in this topology"),
        )
    } else {
        ConditionType::Rebalancing.no(Reason::Balanced, "")
    }
}

/// Percent to 4 decimals (what status shows).
fn round(x: f64) -> f64 {
    (x * 10_000.0).round() / 10_000.0
}

fn error_policy(ring: Arc<ObjectRing>, e: &RingsError, ctx: Arc<Ctx>) -> Action {
    ctx.runtime.error_policy(&ring, e)
}

/// Runs the ring controller until its watch ends.
pub async fn run(client: Client) {
    let (nodes, writer) = reflector::store::<ObjectNode>();
    // Every ring is looked at again when a node's failed devices or its cluster hash
    // fingerprint change (not at each of its heartbeats).
    let mut seen = std::collections::HashMap::<String, (Vec<String>, Option<String>)>::new();
    let node_changes = reflector::reflector(
        writer,
        watcher(
            Api::<ObjectNode>::all(client.clone()),
            watcher::Config::default(),
        ),
    )
    .default_backoff()
    .touched_objects()
    .filter(move |n| {
        let changed = match n {
            Ok(n) => {
                let now = (
                    failed_devices(n),
                    n.status.as_ref().and_then(|s| s.hash_fingerprint.clone()),
                );
                seen.insert(n.name_any(), now.clone()).unwrap_or_default() != now
            }
            Err(_) => false,
        };
        std::future::ready(changed)
    });
    let ctx = Arc::new(Ctx {
        runtime: Runtime::new(client.clone(), MANAGER),
        versions: Api::all(client.clone()),
        nodes,
    });
    let controller = Controller::new(
        Api::<ObjectRing>::all(client.clone()),
        watcher::Config::default(),
    );
    let rings = controller.store();
    controller
        .owns(
            Api::<ObjectRingVersion>::all(client),
            watcher::Config::default(),
        )
        .watches_stream(node_changes, move |_: ObjectNode| {
            rings
                .state()
                .iter()
                .map(|r| ObjectRef::from_obj(&**r))
                .collect::<Vec<_>>()
        })
        .run(reconcile, error_policy, ctx)
        .for_each(|_| async {})
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use stratus_api_types::object::{RingDevice, RingType};

    const T0: u64 = 1_800_000_000;
    const HOUR: u64 = 3600;

    fn dev(zone: u32, ip: &str, device: &str, weight: f64) -> RingDevice {
        RingDevice {
            region: 1,
            zone,
            ip: ip.into(),
            port: 6200,
            device: device.into(),
            weight,
            meta: None,
            node: None,
        }
    }

    /// Part power 8, 3 replicas, 3 zones of 2 devices.
    fn spec() -> ObjectRingSpec {
        ObjectRingSpec {
            ring_type: RingType::Object,
            policy_index: None,
            part_power: 8,
            replicas: 3,
            min_part_hours: 1,
            overload: None,
            paused: false,
            devices: (1..=3)
                .flat_map(|z| {
                    let ip = format!("127.0.0.{z}");
                    [dev(z, &ip, "sdb", 100.0), dev(z, &ip, "sdc", 100.0)]
                })
                .collect(),
        }
    }

    fn built(d: Decision) -> (RingBuilder, u64, u64, u64) {
        match d {
            Decision::Build {
                builder,
                moved,
                pending,
                wait,
            } => (*builder, moved, pending, wait),
            other => panic!("expected a new version, got {other:?}"),
        }
    }

    /// Replica slots that differ between two assignments.
    fn changed(a: &RingBuilder, b: &RingBuilder) -> usize {
        a.assignment()
            .iter()
            .zip(b.assignment())
            .map(|(x, y)| x.iter().zip(y).filter(|(p, q)| p != q).count())
            .sum()
    }

    #[test]
    fn a_new_ring_is_built_balanced_with_every_replica_placed() {
        let (b, moved, pending, wait) = built(decide(&spec(), None, T0));
        assert_eq!(moved, 3 * 256);
        assert_eq!((pending, wait), (0, 0));
        assert!(b.balance() < 1.0, "balance {}", b.balance());
        assert_eq!(b.dispersion(), 0.0);
        assert_eq!(b.devices().count(), 6);
        // Stored and read back, it is the same builder.
        let back = decode_state(&encode_state(&b)).expect("state");
        assert_eq!(back, b);
    }

    #[test]
    fn an_unchanged_spec_writes_no_new_version() {
        let (b, ..) = built(decide(&spec(), None, T0));
        match decide(&spec(), Some(b), T0 + 10 * HOUR) {
            Decision::Current {
                pending: 0,
                wait: 0,
            } => {}
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_removed_device_moves_only_its_replicas() {
        let (b, ..) = built(decide(&spec(), None, T0));
        let mut s = spec();
        s.devices.remove(0);
        let (b2, moved, pending, _) = built(decide(&s, Some(b.clone()), T0 + 2 * HOUR));
        let held = b.assignment().iter().flatten().filter(|&&d| d == 0).count() as u64;
        assert!(
            moved >= held && moved as f64 <= held as f64 * 1.05,
            "moved {moved}, held {held}"
        );
        assert_eq!(pending, 0);
        assert_eq!(b2.devices().count(), 5);
        assert!(b2.assignment().iter().flatten().all(|&d| d != 0));
        assert_eq!(changed(&b, &b2) as u64, moved);
    }

    #[test]
    fn an_added_device_takes_its_share_over_steps_that_respect_min_part_hours() {
        let (b, ..) = built(decide(&spec(), None, T0));
        let mut s = spec();
        s.devices.push(dev(1, "127.0.0.1", "sdd", 100.0));
        // Within the hour after the first build nothing may move: the added device is in
        // the ring but gets partitions only once the window passes.
        let (b2, moved, pending, wait) = built(decide(&s, Some(b.clone()), T0 + 60));
        assert_eq!(moved, 0, "nothing moves within minPartHours");
        assert!(pending > 0);
        assert!(wait > 0 && wait <= HOUR, "wait {wait}");
        // In the window, an unchanged spec waits.
        match decide(&s, Some(b2.clone()), T0 + 120) {
            Decision::Current {
                pending: p,
                wait: w,
            } => {
                assert_eq!(p, pending);
                assert!(w > 0);
            }
            other => panic!("{other:?}"),
        }
        // After it, the next step moves the replicas.
        let (b3, moved, pending3, _) = built(decide(&s, Some(b2), T0 + 2 * HOUR));
        assert!(
            moved > 0 && moved <= pending + pending / 20 + 1,
            "moved {moved}, pending {pending}"
        );
        assert!(pending3 < pending);
        let on_new = b3
            .assignment()
            .iter()
            .flatten()
            .filter(|&&d| d == 6)
            .count();
        assert!(on_new > 0);
    }

    #[test]
    fn a_reweighted_device_gives_up_partitions() {
        let (b, ..) = built(decide(&spec(), None, T0));
        let before = b.assignment().iter().flatten().filter(|&&d| d == 0).count();
        let mut s = spec();
        s.devices[0].weight = 50.0;
        let (b2, moved, _, _) = built(decide(&s, Some(b), T0 + 2 * HOUR));
        let after = b2
            .assignment()
            .iter()
            .flatten()
            .filter(|&&d| d == 0)
            .count();
        assert!(after < before, "{after} < {before}");
        assert!(moved > 0);
    }

    #[test]
    fn an_invalid_spec_is_refused_and_builds_nothing() {
        let mut s = spec();
        s.devices.truncate(2);
        match decide(&s, None, T0) {
            Decision::Invalid(reason, msg) => {
                assert_eq!(reason, Reason::CannotBuild);
                assert!(msg.contains("3 replicas"), "{msg}");
            }
            other => panic!("{other:?}"),
        }
        let (b, ..) = built(decide(&spec(), None, T0));
        let mut s = spec();
        s.part_power = 9;
        match decide(&s, Some(b.clone()), T0) {
            Decision::Invalid(_, msg) => assert!(msg.starts_with("spec.partPower"), "{msg}"),
            other => panic!("{other:?}"),
        }
        let mut s = spec();
        s.devices[1].zone = 2;
        match decide(&s, Some(b.clone()), T0) {
            Decision::Invalid(_, msg) => assert!(msg.starts_with("spec.devices[1]"), "{msg}"),
            other => panic!("{other:?}"),
        }
        let mut s = spec();
        for d in &mut s.devices {
            d.weight = 0.0;
        }
        assert!(matches!(decide(&s, Some(b), T0), Decision::Invalid(..)));
    }

    #[test]
    fn a_paused_spec_shows_its_effect_without_building() {
        let (b, ..) = built(decide(&spec(), None, T0));
        let mut s = spec();
        s.devices.remove(0);
        s.paused = true;
        let held = b.assignment().iter().flatten().filter(|&&d| d == 0).count() as u64;
        match decide(&s, Some(b.clone()), T0 + 2 * HOUR) {
            Decision::Proposed(p) => {
                assert!(p.moves >= held && p.moves as f64 <= held as f64 * 1.05);
                assert_eq!(p.devices, 5);
                assert_eq!(p.pending_moves, 0);
                assert!(p.balance < 5.0, "{}", p.balance);
            }
            other => panic!("{other:?}"),
        }
        // Unpaused, the same change builds the same ring the proposal described.
        s.paused = false;
        let (_, moved, ..) = built(decide(&s, Some(b), T0 + 2 * HOUR));
        assert!(moved >= held);
    }

    #[test]
    fn a_version_object_is_owned_by_its_ring_and_holds_a_loadable_ring_file() {
        let (b, ..) = built(decide(&spec(), None, T0));
        let mut ring = ObjectRing::new("object", spec());
        ring.metadata.uid = Some("u1".into());
        let v = version_object(&ring, 1, &b);
        assert_eq!(v.metadata.name.as_deref(), Some("object-v1"));
        let owner = &v.metadata.owner_references.as_ref().expect("owner")[0];
        assert_eq!(
            (owner.kind.as_str(), owner.uid.as_str()),
            ("ObjectRing", "u1")
        );
        let file = BASE64.decode(&v.spec.ring_file).expect("base64");
        let data = stratus_ring::RingData::read_v1(file.as_slice()).expect("ring file");
        assert_eq!(data.replica2part2dev, b.assignment());
    }

    #[test]
    fn the_largest_allowed_ring_fits_in_one_api_object() {
        // 2^16 partitions × 4 replicas on 48 devices: the ring file and the builder state.
        let mut s = spec();
        s.part_power = 16;
        s.replicas = 4;
        s.devices = (0..48)
            .map(|i| {
                dev(
                    1 + i % 4,
                    &format!("127.0.1.{}", i / 4 + 1),
                    &format!("d{i}"),
                    100.0,
                )
            })
            .collect();
        let (b, ..) = built(decide(&s, None, T0));
        let ring = ObjectRing::new("big", s);
        let v = version_object(&ring, 1, &b);
        let size = serde_json::to_vec(&v).expect("json").len();
        assert!(size < 1_200_000, "{size} bytes");
    }
}
