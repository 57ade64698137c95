//! Group `object.stratus.dev`: Swift rings (and later buckets).

// kube's `printcolumn(...)`/`selectable` repeat keys by design; clippy reads that as duplicates.
#![allow(clippy::duplicated_attributes)]

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{Condition, IPV4_PATTERN, NAME_PATTERN, Time};

/// A cluster hash fingerprint: v1, 16 lower-case hexadecimal digits (a fixed salt, what
/// agents before per-cluster salts show), or v2, `v2:` the first 8 hexadecimal digits of the
/// cluster's salt `:` 16 hexadecimal digits.
pub const HASH_FINGERPRINT_PATTERN: &str = "^([0-9a-f]{16}|v2:[0-9a-f]{8}:[0-9a-f]{16})$";

/// The version of a cluster hash fingerprint: 2 for `v2:…`, 1 otherwise. A v1 and a v2
/// fingerprint differ even for one hash, and cannot show it is one: nodes showing two
/// versions are taken to use two hashes.
pub fn hash_fingerprint_version(fingerprint: &str) -> u32 {
    if fingerprint.starts_with("v2:") { 2 } else { 1 }
}

/// A Swift ring: the devices of one ring type and how partitions map onto them.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "object.stratus.dev",
    version = "v1",
    kind = "ObjectRing",
    status = "ObjectRingStatus",
    derive = "PartialEq",
    shortname = "ring",
    category = "stratus",
    doc = "A Swift ring (account, container or object): devices and partition placement.",
    printcolumn(name = "Type", type_ = "string", json_path = ".spec.ringType"),
    printcolumn(name = "Replicas", type_ = "integer", json_path = ".spec.replicas"),
    printcolumn(name = "Part Power", type_ = "integer", json_path = ".spec.partPower"),
    printcolumn(name = "Version", type_ = "integer", json_path = ".status.version"),
    printcolumn(name = "Status", type_ = "string", json_path = ".status.phase"),
    printcolumn(
        name = "Balance",
        type_ = "number",
        json_path = ".status.balance",
        priority = 1
    ),
    printcolumn(
        name = "Rebalanced",
        type_ = "date",
        json_path = ".status.rebalancedAt",
        priority = 1
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ObjectRingSpec {
    /// Which ring this is.
    pub ring_type: RingType,
    /// For `object` rings: the storage policy index (`object-<n>.ring.gz`; 0 is
    /// `object.ring.gz`). Absent: 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_index: Option<u32>,
    /// The ring has 2^partPower partitions. Cannot be changed once built.
    #[schemars(range(min = 1, max = 32))]
    pub part_power: u8,
    /// Copies of each partition.
    #[schemars(range(min = 1, max = 10))]
    pub replicas: u8,
    /// Hours a partition stays put after it moved before it may move again
    /// (`swift-ring-builder ... min_part_hours`).
    #[serde(default = "default_min_part_hours")]
    #[schemars(range(max = 8760))]
    pub min_part_hours: u32,
    /// How far (a fraction: 0.1 is 10%) a device may be given partitions beyond its weight's
    /// share so that replicas spread across failure domains (`swift-ring-builder ...
    /// set_overload`). Absent: 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 100.0))]
    pub overload: Option<f64>,
    /// Staged change: while true, the controller builds the ring the spec describes on a copy
    /// and reports its effect in `status.proposed` (replicas that would move, balance,
    /// dispersion) without writing a new ring version. Set it back to false to apply.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub paused: bool,
    /// The devices partitions are placed on.
    #[serde(default)]
    #[schemars(length(max = 10000))]
    pub devices: Vec<RingDevice>,
}

/// Most replica slots (2^partPower × replicas) a ring may have: its ring file and builder
/// state (2 bytes a slot each, base64 in an [`ObjectRingVersion`]) then stay well inside the
/// API's object size limit. Part power 16 with 4 replicas, or 18 with 1.
pub const MAX_RING_SLOTS: u64 = 1 << 18;

fn default_min_part_hours() -> u32 {
    1
}

/// Type of a Swift ring.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum RingType {
    /// The account ring.
    Account,
    /// The container ring.
    Container,
    /// An object ring (one per storage policy).
    Object,
}

/// A disk in a Swift ring.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RingDevice {
    /// Region (failure domain above zones).
    #[serde(default = "default_region")]
    #[schemars(range(min = 1))]
    pub region: u32,
    /// Zone within the region.
    pub zone: u32,
    /// Address of the storage server.
    #[schemars(regex(pattern = IPV4_PATTERN), ipv4)]
    pub ip: String,
    /// Port of the account, container or object server.
    #[schemars(range(min = 1, max = 65535))]
    pub port: u16,
    /// Device directory name under the server's `devices` root (e.g. `sdb1`).
    #[schemars(length(min = 1, max = 64), regex(pattern = r"^[A-Za-z0-9_.-]+$"))]
    pub device: String,
    /// Relative share of partitions; 0 drains the device.
    #[schemars(range(min = 0.0))]
    pub weight: f64,
    /// Free-form note kept in the ring (`meta`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 255))]
    pub meta: Option<String>,
    /// The node (its ObjectNode's name) whose agent serves this device: only that node's
    /// report of it as failed drains it. A device naming no node is never drained by a report
    /// (an address is what a node says of itself; its name is what it authenticates as).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253), regex(pattern = NAME_PATTERN))]
    pub node: Option<String>,
}

/// The effect of applying a paused ObjectRing's spec, computed on a copy of the ring.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RingProposal {
    // Every field has a default (none is required in the schema): a status write that drops
    // the proposal removes its fields one by one.
    /// Replicas the first step would move.
    #[serde(default)]
    pub moves: u64,
    /// Replicas that would wait for `minPartHours` after that step.
    #[serde(default)]
    pub pending_moves: u64,
    /// Balance after the step, in percent.
    #[serde(default)]
    pub balance: f64,
    /// Dispersion after the step, in percent.
    #[serde(default)]
    pub dispersion: f64,
    /// Devices the ring would have.
    #[serde(default)]
    pub devices: u32,
    /// The `metadata.generation` this proposal is for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<i64>,
}

/// One built version of an ObjectRing: its Swift ring file and the builder state the next
/// rebalance starts from. Written by the ring controller, owned by its ObjectRing (deleted
/// with it); named `RING-vVERSION`.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "object.stratus.dev",
    version = "v1",
    kind = "ObjectRingVersion",
    status = "ObjectRingVersionStatus",
    derive = "PartialEq",
    shortname = "ringver",
    category = "stratus",
    doc = "A built version of an ObjectRing: Swift's ring file and the builder state.",
    printcolumn(name = "Ring", type_ = "string", json_path = ".spec.ring"),
    printcolumn(name = "Version", type_ = "integer", json_path = ".spec.version"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ObjectRingVersionSpec {
    /// The ObjectRing this is a version of.
    #[schemars(length(min = 1, max = 253))]
    pub ring: String,
    /// The ring's version (also in the ring file).
    pub version: u64,
    /// Swift's ring file (format 1, gzip), base64: what `swift.common.ring.Ring` loads as
    /// `<type>.ring.gz`.
    #[schemars(length(max = 1_000_000))]
    pub ring_file: String,
    /// The ring builder's state (JSON, gzip, base64) the next rebalance starts from.
    #[schemars(length(max = 1_000_000))]
    pub builder_state: String,
}

/// Observed state of an ObjectRingVersion.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ObjectRingVersionStatus {
    /// Nodes whose object agent installed this ring file.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 10000))]
    pub installed_on: Vec<String>,
}

fn default_region() -> u32 {
    1
}

/// Lifecycle phase of an ObjectRing.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum ObjectRingPhase {
    /// Not built yet.
    #[default]
    Pending,
    /// Being (re)balanced.
    Building,
    /// Built; `status.version` is current for the spec.
    Ready,
    /// Building failed (e.g. fewer devices than replicas); see the conditions.
    Error,
}

/// Observed state of an ObjectRing.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ObjectRingStatus {
    /// Lifecycle phase.
    #[serde(default)]
    pub phase: ObjectRingPhase,
    /// Version of the last built ring file; increases with every rebalance.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
    /// When the ring was last rebalanced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rebalanced_at: Option<Time>,
    /// Balance after the last rebalance, in percent (0 is perfect), as
    /// `swift-ring-builder` reports it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balance: Option<f64>,
    /// Number of devices in the built ring.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub devices: Option<u32>,
    /// Dispersion after the last rebalance, in percent: the share of replicas placed on a
    /// failure domain that already holds as many of the partition's replicas as an even
    /// spread allows (0 is perfect), as `swift-ring-builder` reports it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dispersion: Option<f64>,
    /// Replicas the last step moved to another device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub moved: Option<u64>,
    /// Replicas still to move to reach the balanced ring, held back because they moved less
    /// than `minPartHours` ago; the controller takes the next step when the window allows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending_moves: Option<u64>,
    /// When the next step may move the pending replicas.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_step_at: Option<Time>,
    /// The ObjectRingVersion holding the current ring file and builder state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ring_version: Option<String>,
    /// While `spec.paused`: what applying the spec would do (absent, or empty, otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proposed: Option<RingProposal>,
    /// Devices built with weight 0 (`IP/DEVICE`) whatever their spec weight: their node's
    /// object agent reports them failed (its ObjectNode's `status.devices`), so their
    /// replicas move to healthy devices. A device reported healthy again gets its weight back.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 10000))]
    pub drained_devices: Vec<String>,
    /// The cluster hash fingerprint most of the ring's ObjectNodes report (on a tie, that of
    /// the node registered first), of the newest fingerprint version any of them reports: a
    /// node whose fingerprint of that version differs installs none of the ring's versions
    /// until it uses the cluster's hash.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = HASH_FINGERPRINT_PATTERN))]
    pub hash_fingerprint: Option<String>,
    /// The ring's ObjectNodes whose cluster hash fingerprint differs from `hashFingerprint`
    /// (nodes reporting an older fingerprint version are not compared).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 1000))]
    pub hash_mismatch: Vec<String>,
    /// Latest observations of the ring's state.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// The `metadata.generation` this status was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// One object storage node: where its Swift servers listen. Registered by the node's object
/// agent (named after the node) and reported on by it: its devices' health, its servers and
/// daemons, the rings it installed and replication progress.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "object.stratus.dev",
    version = "v1",
    kind = "ObjectNode",
    status = "ObjectNodeStatus",
    derive = "PartialEq",
    shortname = "onode",
    category = "stratus",
    doc = "An object storage node: its Swift servers, devices and rings, as its agent reports them.",
    printcolumn(name = "IP", type_ = "string", json_path = ".spec.ip"),
    printcolumn(name = "Status", type_ = "string", json_path = ".status.phase"),
    printcolumn(
        name = "Heartbeat",
        type_ = "date",
        json_path = ".status.lastHeartbeatTime",
        priority = 1
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ObjectNodeSpec {
    /// The address the node's account, container and object servers listen on (the `ip`
    /// of its devices in the rings).
    #[schemars(regex(pattern = IPV4_PATTERN), ipv4)]
    pub ip: String,
}

/// Lifecycle phase of an ObjectNode.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum ObjectNodePhase {
    /// Its agent has not reported yet.
    #[default]
    Pending,
    /// Every device is healthy and every server and daemon runs.
    Ready,
    /// A device failed, or a server or daemon is not running (see the entries).
    Degraded,
}

/// Health of one device directory.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum DeviceState {
    /// Present, mounted (when mounts are checked) and writable.
    #[default]
    Healthy,
    /// Missing, not mounted or not writable: the ring controller drains it.
    Failed,
}

/// One device of an object node, as its agent last found it.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ObjectDeviceStatus {
    /// The device's directory name under the servers' `devices` root (a ring device's
    /// `device`).
    #[schemars(length(min = 1, max = 64))]
    pub name: String,
    /// Healthy or Failed.
    #[serde(default)]
    pub state: DeviceState,
    /// Whether a filesystem is mounted on it.
    #[serde(default)]
    pub mounted: bool,
    /// Whether a file could be written and synced on it.
    #[serde(default)]
    pub writable: bool,
    /// Size of its filesystem, in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity_bytes: Option<u64>,
    /// Bytes available to the servers on its filesystem.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub available_bytes: Option<u64>,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub message: Option<String>,
}

/// One Swift server or daemon the agent supervises.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ObjectProcessStatus {
    /// Its program (`swift-object-server`, `swift-object-replicator`, ...).
    #[schemars(length(min = 1, max = 64))]
    pub name: String,
    /// Whether it runs.
    #[serde(default)]
    pub running: bool,
    /// Times the agent started it again after it exited.
    #[serde(default)]
    pub restarts: u32,
    /// How it last exited, or what it waits for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub message: Option<String>,
}

/// A ring file an object node installed.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct InstalledRing {
    /// The ObjectRing.
    #[schemars(length(min = 1, max = 253))]
    pub ring: String,
    /// The file in the servers' `swift_dir` (`object.ring.gz`, ...).
    #[schemars(length(min = 1, max = 64))]
    pub file: String,
    /// The ring version installed.
    pub version: u64,
}

/// Replication progress of one server type on a node (Swift's recon cache).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ReplicationStatus {
    /// Whose replicator: account, container or object.
    pub ring_type: RingType,
    /// When its last complete pass ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_pass: Option<Time>,
    /// How long that pass took, in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pass_seconds: Option<f64>,
    /// Partitions (objects) or databases (accounts, containers) the pass tried.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempted: Option<u64>,
    /// Of those, how many failed to replicate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failures: Option<u64>,
}

/// Observed state of an ObjectNode, written by its object agent.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ObjectNodeStatus {
    /// Lifecycle phase.
    #[serde(default)]
    pub phase: ObjectNodePhase,
    /// Its devices.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub devices: Vec<ObjectDeviceStatus>,
    /// Its Swift servers and daemons.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub processes: Vec<ObjectProcessStatus>,
    /// The ring files it installed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["file"]))]
    pub rings: Vec<InstalledRing>,
    /// Replication progress per server type.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 3))]
    pub replication: Vec<ReplicationStatus>,
    /// A fingerprint of the cluster hash (Swift's hash path prefix and suffix) the node's
    /// servers use: the first 16 hexadecimal digits of PBKDF2-HMAC-SHA256 keyed with them
    /// (600,000 rounds), never the values; `v2:SALTID:HEX` when salted with the cluster's own
    /// salt, the bare digits (v1) when salted with a fixed label.
    /// Every node of a cluster must show the same; a v1 and a v2 fingerprint differ (the
    /// node of the other version is named and installs no ring).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = HASH_FINGERPRINT_PATTERN))]
    pub hash_fingerprint: Option<String>,
    /// When the agent last reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_heartbeat_time: Option<Time>,
    /// Latest observations of the node's state.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// The `metadata.generation` this status was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}
