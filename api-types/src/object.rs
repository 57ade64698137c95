//! Group `object.stratus.dev`: Swift rings (and later buckets).

// kube's `printcolumn(...)`/`selectable` repeat keys by design; clippy reads that as duplicates.
#![allow(clippy::duplicated_attributes)]

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{Condition, IPV4_PATTERN, Time};

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
    /// The devices partitions are placed on.
    #[serde(default)]
    #[schemars(length(max = 10000))]
    pub devices: Vec<RingDevice>,
}

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
    /// Latest observations of the ring's state.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// The `metadata.generation` this status was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}
