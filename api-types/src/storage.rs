//! Group `storage.stratus.dev`: volumes, snapshots and the pools they live in (Cinder's job).

// kube's `printcolumn(...)`/`selectable` repeat keys by design; clippy reads that as duplicates.
#![allow(clippy::duplicated_attributes)]

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{Condition, LABEL_PATTERN, NAME_PATTERN, Time};

mod export;
pub use export::{
    ExportedVolume, VolumeExport, VolumeExportSpec, VolumeExportStatus, volume_export_name,
};

/// The finalizer the storage agent of a volume's (or snapshot's) node adds when it starts
/// working on it and removes once its data is gone.
pub const TEARDOWN_FINALIZER: &str = "storage.stratus.dev/teardown";

/// The annotation on a VolumeSnapshot holding the uid of the Volume it was taken of (set by
/// the API server at its create; a write cannot change it), so that a new Volume of the same
/// name owns none of the old one's snapshots.
pub const VOLUME_UID: &str = "storage.stratus.dev/volume-uid";

/// The label of a StoragePool naming the volume type (`spec.volumeType`) it serves.
pub const VOLUME_TYPE_LABEL: &str = "storage.stratus.dev/volume-type";

/// A block device that can be attached to a Server.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "storage.stratus.dev",
    version = "v1",
    kind = "Volume",
    namespaced,
    status = "VolumeStatus",
    derive = "PartialEq",
    shortname = "vol",
    category = "stratus",
    selectable = ".status.node",
    selectable = ".status.pool",
    selectable = ".status.attachedNode",
    doc = "A volume (Cinder volume): a persistent block device.",
    printcolumn(name = "Status", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Size GiB", type_ = "integer", json_path = ".spec.sizeGiB"),
    printcolumn(
        name = "Attached To",
        type_ = "string",
        json_path = ".status.attachments[*].server"
    ),
    printcolumn(
        name = "Multi-Attach",
        type_ = "boolean",
        json_path = ".spec.multiAttach",
        priority = 1
    ),
    printcolumn(
        name = "Bootable",
        type_ = "boolean",
        json_path = ".spec.bootable",
        priority = 1
    ),
    printcolumn(
        name = "Pool",
        type_ = "string",
        json_path = ".status.pool",
        priority = 1
    ),
    printcolumn(
        name = "Node",
        type_ = "string",
        json_path = ".status.node",
        priority = 1
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VolumeSpec {
    /// Size, in GiB. It can grow (the volume is extended) but never shrink.
    #[serde(rename = "sizeGiB")]
    #[schemars(range(min = 1, max = 65536))]
    pub size_gib: u64,
    /// Name of the StoragePool to create the volume in. Absent: chosen by the scheduler.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253), regex(pattern = NAME_PATTERN))]
    pub storage_pool: Option<String>,
    /// Volume type, matched against pools' capabilities (Cinder volume type).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253), regex(pattern = NAME_PATTERN))]
    pub volume_type: Option<String>,
    /// Availability zone to create the volume in. Absent: any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63), regex(pattern = LABEL_PATTERN))]
    pub availability_zone: Option<String>,
    /// Initial contents. Absent: zeroes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<VolumeSource>,
    /// Whether Servers may boot from the volume.
    #[serde(default)]
    pub bootable: bool,
    /// Whether several Servers of the project may hold the volume at once (at most 16,
    /// `MAX_ATTACHMENTS`), as Cinder's `multiattach` volume type: each guest sees it as a
    /// shareable disk, and keeping their writes apart (a cluster file system) is theirs.
    /// Set at create, or changed while no Server holds the volume.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub multi_attach: bool,
    /// Free-form description.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 255))]
    pub description: Option<String>,
}

/// The most Servers a multi-attach Volume is attached to at once.
pub const MAX_ATTACHMENTS: usize = 16;

/// Initial contents of a Volume: exactly one of the fields.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VolumeSource {
    /// Name of an Image to copy into the volume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253), regex(pattern = NAME_PATTERN))]
    pub image: Option<String>,
    /// Name of a VolumeSnapshot to restore.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253), regex(pattern = NAME_PATTERN))]
    pub snapshot: Option<String>,
    /// Name of a Volume to clone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253), regex(pattern = NAME_PATTERN))]
    pub volume: Option<String>,
}

impl VolumeSource {
    /// The sources given, as (field, name): exactly one for a valid source.
    pub fn given(&self) -> Vec<(&'static str, &str)> {
        [
            ("image", self.image.as_deref()),
            ("snapshot", self.snapshot.as_deref()),
            ("volume", self.volume.as_deref()),
        ]
        .into_iter()
        .filter_map(|(f, n)| Some((f, n?)))
        .collect()
    }
}

/// Lifecycle phase of a Volume.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum VolumePhase {
    /// Waiting for a pool.
    #[default]
    Pending,
    /// Being created (and filled from its source) in its pool.
    Creating,
    /// Ready, not attached.
    Available,
    /// Attached to a Server (`status.attachedTo`).
    InUse,
    /// Growing to a new `spec.sizeGiB`.
    Extending,
    /// Creation or an operation failed; see the conditions.
    Error,
    /// Being deleted.
    Deleting,
}

/// Observed state of a Volume.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VolumeStatus {
    /// Lifecycle phase.
    #[serde(default)]
    pub phase: VolumePhase,
    /// Name of the StoragePool holding the volume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    /// Node holding the volume's data (the pool's node).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Size actually provisioned, in GiB; less than `spec.sizeGiB` while extending.
    #[serde(default, rename = "sizeGiB", skip_serializing_if = "Option::is_none")]
    pub size_gib: Option<u64>,
    /// Path of the block device on `node` (e.g. `/dev/stratus/volume-<uid>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_path: Option<String>,
    /// Name of the Server the volume is attached to: the first of `attachments`, kept for
    /// clients that know one attachment only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attached_to: Option<String>,
    /// Every Server the volume is attached to, in the order they took it (one at most unless
    /// `spec.multiAttach`), with the node each is placed on: written by the API server in the
    /// Server's own transaction and by the attachments controller.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["server"]))]
    pub attachments: Vec<VolumeAttachment>,
    /// The node the Server it is attached to (`attachedTo`, the first of `attachments`) is
    /// placed on, once it is (written by the attachments controller). Each node other than
    /// `node` holding a Server of it is served its data over NBD by a cluster-scoped
    /// [`VolumeExport`], which only that node, the storage node and operators read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253), regex(pattern = NAME_PATTERN))]
    pub attached_node: Option<String>,
    /// `status.export` of a Volume stored before exports were [`VolumeExport`]s: read and
    /// dropped (never written, never in the schema), so such a Volume still decodes; its
    /// storage agent's next status write takes it out of the stored object.
    #[serde(default, rename = "export", skip_serializing)]
    #[schemars(skip)]
    pub dropped_export: Option<serde::de::IgnoredAny>,
    /// The Image the volume was filled from (`spec.source.image` as its storage agent found
    /// it then), by uid: a Server booting from the volume boots this image's kernel, never
    /// one of an image published under that name since.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_image: Option<ImageRef>,
    /// The kernel image (`spec.kernelImage`) of the source image when the volume was filled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel_image: Option<ImageRef>,
    /// The ramdisk image (`spec.ramdiskImage`) of the source image when the volume was filled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ramdisk_image: Option<ImageRef>,
    /// Latest observations of the volume's state (`Scheduled`, `Ready`, `Attached`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// The `metadata.generation` this status was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

impl VolumeStatus {
    /// The Servers holding the volume: `attachments`, or `attachedTo` alone for a status
    /// written before there were `attachments`.
    pub fn attached_servers(&self) -> Vec<&str> {
        if self.attachments.is_empty() {
            self.attached_to.as_deref().into_iter().collect()
        } else {
            self.attachments.iter().map(|a| a.server.as_str()).collect()
        }
    }

    /// Whether Server `server` holds the volume.
    pub fn is_attached_to(&self, server: &str) -> bool {
        self.attached_servers().contains(&server)
    }
}

/// One Server a Volume is attached to.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VolumeAttachment {
    /// The Server's name (in the volume's namespace).
    #[schemars(length(min = 1, max = 253), regex(pattern = NAME_PATTERN))]
    pub server: String,
    /// The node the Server is placed on, once it is (written by the attachments controller).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253), regex(pattern = NAME_PATTERN))]
    pub node: Option<String>,
}

/// The subject DN of node `node`'s NBD certificate (its CN `system:node:NAME`, as a node's
/// identity is spelled to the API), as QEMU spells a client's DN in an `authz-simple`
/// identity: the only client a storage agent serves a [`VolumeExport`] to `node` to.
pub fn nbd_node_dn(node: &str) -> String {
    format!("CN=system:node:{node}")
}

/// The TCP ports volume exports are served on, `FIRST-LAST` (both included): the same range
/// on every node of a cluster (`stratus agent --export-ports`). Storage agents serve exports
/// on them alone, and compute agents connect to no other port (so a VolumeExport's status
/// cannot aim a node's QEMU at another service of the storage address).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRange {
    first: u16,
    last: u16,
}

impl PortRange {
    /// NBD's own port (10809) and up, below every kernel's ephemeral range.
    pub const DEFAULT: Self = Self {
        first: 10809,
        last: 10999,
    };

    /// `first` to `last`, both included.
    ///
    /// # Errors
    /// An empty range, or one reaching below 1024 (ports other services are given).
    pub fn new(first: u16, last: u16) -> Result<Self, String> {
        if first < 1024 {
            return Err(format!(
                "{first}-{last}: export ports start at 1024 or above"
            ));
        }
        if first > last {
            return Err(format!("{first}-{last}: the first port is above the last"));
        }
        Ok(Self { first, last })
    }

    /// The first port of the range.
    pub fn first(self) -> u16 {
        self.first
    }

    /// The last port of the range.
    pub fn last(self) -> u16 {
        self.last
    }

    /// Whether `port` is in the range.
    pub fn contains(self, port: u16) -> bool {
        (self.first..=self.last).contains(&port)
    }

    /// Why the range shares ports with the kernel's ephemeral range `ephemeral` (its first
    /// and last port), if it does: a port of both could be an outgoing connection's source
    /// port, and an export's filter would then see that connection's replies.
    pub fn overlaps(self, ephemeral: (u16, u16)) -> Option<String> {
        let (lo, hi) = ephemeral;
        (self.first <= hi && lo <= self.last).then(|| {
            format!(
                "export ports {self} overlap the kernel's ephemeral ports {lo}-{hi} (net.ipv4.ip_local_port_range): choose a range outside it"
            )
        })
    }
}

impl Default for PortRange {
    fn default() -> Self {
        Self::DEFAULT
    }
}

impl std::fmt::Display for PortRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.first, self.last)
    }
}

impl std::str::FromStr for PortRange {
    type Err = String;

    /// `FIRST-LAST`.
    fn from_str(s: &str) -> Result<Self, String> {
        let (a, b) = s
            .split_once('-')
            .ok_or_else(|| format!("{s:?}: expected FIRST-LAST"))?;
        let port = |p: &str| {
            p.parse::<u16>()
                .map_err(|_| format!("{s:?}: {p:?} is not a port"))
        };
        Self::new(port(a)?, port(b)?)
    }
}

/// One Image, exactly: where it is, its name and its uid (a new image of that name is not it).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ImageRef {
    /// The Image's namespace (a public image may be in another project's).
    #[schemars(length(min = 1, max = 63), regex(pattern = LABEL_PATTERN))]
    pub namespace: String,
    /// The Image's name.
    #[schemars(length(min = 1, max = 253), regex(pattern = NAME_PATTERN))]
    pub name: String,
    /// The Image's `metadata.uid`.
    #[schemars(length(min = 1, max = 64))]
    pub uid: String,
}

/// A point-in-time copy of a Volume.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "storage.stratus.dev",
    version = "v1",
    kind = "VolumeSnapshot",
    namespaced,
    status = "VolumeSnapshotStatus",
    derive = "PartialEq",
    shortname = "snap",
    category = "stratus",
    selectable = ".spec.volume",
    selectable = ".status.node",
    doc = "A volume snapshot (Cinder snapshot): a point-in-time copy of a Volume.",
    printcolumn(name = "Status", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Volume", type_ = "string", json_path = ".spec.volume"),
    printcolumn(name = "Size GiB", type_ = "integer", json_path = ".status.sizeGiB"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VolumeSnapshotSpec {
    /// Name of the Volume to snapshot.
    #[schemars(length(min = 1, max = 253), regex(pattern = NAME_PATTERN))]
    pub volume: String,
    /// Snapshot the volume even while it is attached (the copy is then only crash-consistent),
    /// as Cinder's `--force`.
    #[serde(default)]
    pub force: bool,
    /// Free-form description.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 255))]
    pub description: Option<String>,
}

/// Lifecycle phase of a VolumeSnapshot.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum VolumeSnapshotPhase {
    /// Waiting for its volume.
    #[default]
    Pending,
    /// The copy is being made.
    Creating,
    /// Ready to restore from.
    Available,
    /// The copy failed; see the conditions.
    Error,
    /// Being deleted.
    Deleting,
}

/// Observed state of a VolumeSnapshot.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VolumeSnapshotStatus {
    /// Lifecycle phase.
    #[serde(default)]
    pub phase: VolumeSnapshotPhase,
    /// Size of the snapshotted volume at snapshot time, in GiB.
    #[serde(default, rename = "sizeGiB", skip_serializing_if = "Option::is_none")]
    pub size_gib: Option<u64>,
    /// Name of the StoragePool holding the snapshot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    /// Node holding the snapshot's data.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// When the copy was taken.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_at: Option<Time>,
    /// Latest observations of the snapshot's state.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// The `metadata.generation` this status was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// Space on one node where Volumes are created.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "storage.stratus.dev",
    version = "v1",
    kind = "StoragePool",
    status = "StoragePoolStatus",
    derive = "PartialEq",
    shortname = "sp",
    category = "stratus",
    selectable = ".spec.node",
    doc = "A storage pool (Cinder backend): where Volumes are created on one node.",
    printcolumn(name = "Backend", type_ = "string", json_path = ".spec.backend"),
    printcolumn(name = "Node", type_ = "string", json_path = ".spec.node"),
    printcolumn(name = "Status", type_ = "string", json_path = ".status.phase"),
    printcolumn(
        name = "Capacity GiB",
        type_ = "integer",
        json_path = ".status.capacityGiB"
    ),
    printcolumn(
        name = "Allocated GiB",
        type_ = "integer",
        json_path = ".status.allocatedGiB",
        priority = 1
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StoragePoolSpec {
    /// How volumes are stored.
    pub backend: StorageBackend,
    /// Name of the node (its storage agent) holding the pool.
    #[schemars(length(min = 1, max = 253), regex(pattern = NAME_PATTERN))]
    pub node: String,
    /// For `lvm`: the LVM volume group volumes are created in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 127),
        regex(pattern = r"^[A-Za-z0-9+_.][A-Za-z0-9+_.-]*$")
    )]
    pub vg_name: Option<String>,
    /// For `file`: the absolute directory volume files are created in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 2, max = 4096), regex(pattern = r"^/[^\x00]*$"))]
    pub path: Option<String>,
    /// Availability zone of the pool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63), regex(pattern = LABEL_PATTERN))]
    pub availability_zone: Option<String>,
    /// Percentage of the capacity never allocated (Cinder `reserved_percentage`).
    #[serde(default)]
    #[schemars(range(max = 100))]
    pub reserved_percentage: u32,
    /// How many times the capacity (less the reserved part) volumes and snapshots may claim
    /// in all (Cinder `max_over_subscription_ratio`): above 1 for a pool whose volumes are
    /// sparse and seldom full. Absent: 1, never more than the capacity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1.0, max = 100.0))]
    pub over_subscription_ratio: Option<f64>,
    /// A disabled pool keeps its volumes but gets no new ones.
    #[serde(default)]
    pub disabled: bool,
}

impl StoragePool {
    /// The GiB its volumes and snapshots may claim in all: the capacity its agent reported,
    /// less `spec.reservedPercentage` of it (Cinder's `reserved_percentage`); `None` until a
    /// capacity is reported.
    pub fn allocatable_gib(&self) -> Option<u64> {
        let capacity = u128::from(self.status.as_ref()?.capacity_gib?);
        let kept = 100 - u128::from(self.spec.reserved_percentage.min(100));
        // The ratio in hundredths, so that the arithmetic stays in integers; a ratio out of
        // its range (an object written before it was checked) counts as the nearest bound.
        let ratio = self
            .spec
            .over_subscription_ratio
            .filter(|r| r.is_finite())
            .map_or(100, |r| (r.clamp(1.0, 100.0) * 100.0).round() as u128);
        Some(u64::try_from(capacity * kept * ratio / 10_000).unwrap_or(u64::MAX))
    }

    /// Whether its agent reports it Ready (`status.phase`).
    pub fn is_ready(&self) -> bool {
        self.status
            .as_ref()
            .is_some_and(|s| s.phase == StoragePoolPhase::Ready)
    }
}

/// How a StoragePool stores volumes.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum StorageBackend {
    /// Logical volumes in an LVM volume group (`vgName`).
    Lvm,
    /// Sparse files in a directory (`path`).
    File,
}

/// Lifecycle phase of a StoragePool.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum StoragePoolPhase {
    /// The node's agent has not reported yet.
    #[default]
    Pending,
    /// The pool can take volumes.
    Ready,
    /// The agent's report is overdue or the backing store is missing.
    NotReady,
}

/// Whether a StoragePool grows a volume while a server holds it (`status.growsInUse`), so
/// that the guest sees the new size at once.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum InUseGrowth {
    /// Always: its volumes keep their device as they grow (a file, an LV with
    /// device-mapper). The extend is at once.
    Always,
    /// When the space right after the volume is free: without device-mapper an LV is one
    /// run of extents reached through a loop device, which grows in place over the free
    /// extents that follow it, and nowhere else while a guest holds it. Only the pool's agent
    /// knows what follows a volume, so the API accepts the grow; one that cannot grow in place
    /// says so (`Ready=False`, `GrowsWhenDetached`) and grows once detached.
    WhenSpaceFollows,
    /// Never: an attached volume is grown only once detached, so the API refuses to grow it
    /// while attached (422 on `spec.sizeGiB`).
    Never,
}

/// Observed state of a StoragePool.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StoragePoolStatus {
    /// Lifecycle phase.
    #[serde(default)]
    pub phase: StoragePoolPhase,
    /// Total size of the backing store, in GiB.
    #[serde(
        default,
        rename = "capacityGiB",
        skip_serializing_if = "Option::is_none"
    )]
    pub capacity_gib: Option<u64>,
    /// Space claimed by volumes and snapshots, in GiB.
    #[serde(
        default,
        rename = "allocatedGiB",
        skip_serializing_if = "Option::is_none"
    )]
    pub allocated_gib: Option<u64>,
    /// Number of volumes in the pool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volumes: Option<u32>,
    /// The address the pool's node serves volume exports at (its agent's
    /// `--storage-address`): recorded by the node once and then kept (only an operator moves
    /// it). A Volume of the pool is exported at this address and no other (a
    /// VolumeExport's `status.host`), and compute nodes connect to no other.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 2, max = 45))]
    pub storage_address: Option<String>,
    /// Whether the pool grows a volume a server holds, as its agent reports it. Absent (an
    /// agent that does not report it): a grow of an attached volume is accepted, and the
    /// agent grows it when it can.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grows_in_use: Option<InUseGrowth>,
    /// When the agent last reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_heartbeat_time: Option<Time>,
    /// Latest observations of the pool's state (`Ready`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// The `metadata.generation` this status was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(capacity: Option<u64>, reserved: u32) -> StoragePool {
        let mut p = StoragePool::new(
            "p",
            StoragePoolSpec {
                backend: StorageBackend::Lvm,
                node: "n1".into(),
                vg_name: Some("vg".into()),
                path: None,
                availability_zone: None,
                reserved_percentage: reserved,
                over_subscription_ratio: None,
                disabled: false,
            },
        );
        p.status = Some(StoragePoolStatus {
            capacity_gib: capacity,
            ..Default::default()
        });
        p
    }

    #[test]
    fn a_pool_keeps_its_reserved_percentage() {
        assert_eq!(pool(Some(10), 0).allocatable_gib(), Some(10));
        assert_eq!(pool(Some(100), 15).allocatable_gib(), Some(85));
        assert_eq!(pool(Some(9), 50).allocatable_gib(), Some(4), "rounded down");
        assert_eq!(pool(Some(u64::MAX), 0).allocatable_gib(), Some(u64::MAX));
        assert_eq!(pool(None, 0).allocatable_gib(), None, "not reported yet");
    }

    #[test]
    fn a_pool_over_subscribes_by_its_ratio_after_the_reserve() {
        let with = |capacity, reserved, ratio| {
            let mut p = pool(Some(capacity), reserved);
            p.spec.over_subscription_ratio = ratio;
            p.allocatable_gib()
        };
        assert_eq!(with(10, 0, None), Some(10), "absent: 1");
        assert_eq!(with(10, 0, Some(1.0)), Some(10));
        assert_eq!(with(10, 0, Some(2.5)), Some(25));
        assert_eq!(with(100, 20, Some(1.5)), Some(120), "the reserve first");
        assert_eq!(with(10, 100, Some(20.0)), Some(0), "all reserved");
        assert_eq!(with(3, 0, Some(1.01)), Some(3), "rounded down");
        assert_eq!(with(10, 0, Some(0.5)), Some(10), "never below 1");
        assert_eq!(with(10, 0, Some(f64::NAN)), Some(10));
        assert_eq!(with(u64::MAX, 0, Some(100.0)), Some(u64::MAX), "saturates");
    }

    #[test]
    fn a_volume_source_names_what_it_gives() {
        let s = VolumeSource {
            image: Some("cirros".into()),
            snapshot: None,
            volume: Some("v".into()),
        };
        assert_eq!(s.given(), vec![("image", "cirros"), ("volume", "v")]);
    }
}
