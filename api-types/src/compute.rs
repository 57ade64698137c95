//! Group `compute.stratus.dev`: flavors, hypervisors, servers, keypairs and server groups
//! (Nova's job).

// kube's `printcolumn(...)`/`selectable` repeat keys by design; clippy reads that as duplicates.
#![allow(clippy::duplicated_attributes)]

use std::collections::BTreeMap;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{Condition, IP_PATTERN, LABEL_PATTERN, MAC_PATTERN, NAME_PATTERN, Time};

/// The finalizer the API server's binding puts on a Server it places on a node; that node's
/// compute agent removes it once the guest and its disks are gone from the host.
pub const TEARDOWN_FINALIZER: &str = "compute.stratus.dev/teardown";

/// Namespace of the nodes' heartbeat Leases (one per node, named after it), as in Kubernetes.
pub const NODE_LEASE_NAMESPACE: &str = "kube-node-lease";

/// A hardware template for Servers: vCPUs, RAM and disk sizes.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "compute.stratus.dev",
    version = "v1",
    kind = "Flavor",
    status = "FlavorStatus",
    derive = "PartialEq",
    shortname = "fl",
    category = "stratus",
    doc = "A flavor (Nova flavor): the vCPUs, RAM and disks a Server gets.",
    printcolumn(name = "VCPUs", type_ = "integer", json_path = ".spec.vcpus"),
    printcolumn(name = "RAM MiB", type_ = "integer", json_path = ".spec.ramMiB"),
    printcolumn(name = "Disk GiB", type_ = "integer", json_path = ".spec.diskGiB"),
    printcolumn(
        name = "Ephemeral GiB",
        type_ = "integer",
        json_path = ".spec.ephemeralGiB",
        priority = 1
    ),
    printcolumn(
        name = "Swap MiB",
        type_ = "integer",
        json_path = ".spec.swapMiB",
        priority = 1
    ),
    printcolumn(name = "Public", type_ = "boolean", json_path = ".spec.isPublic"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FlavorSpec {
    /// Number of virtual CPUs.
    #[schemars(range(min = 1, max = 1024))]
    pub vcpus: u32,
    /// Memory, in MiB.
    #[serde(rename = "ramMiB")]
    #[schemars(range(min = 16))]
    pub ram_mib: u64,
    /// Root disk size, in GiB. 0 means the root disk is as large as the image (Nova's
    /// behaviour for `disk=0` flavors); volume-backed servers ignore it.
    #[serde(rename = "diskGiB")]
    pub disk_gib: u64,
    /// Size of an extra, empty ephemeral disk, in GiB (0: none).
    #[serde(default, rename = "ephemeralGiB")]
    pub ephemeral_gib: u64,
    /// Size of a swap disk, in MiB (0: none).
    #[serde(default, rename = "swapMiB")]
    pub swap_mib: u64,
    /// Free-form key/value hints for scheduling and the hypervisor (Nova extra specs, e.g.
    /// `hw:cpu_policy: dedicated`, `aggregate_instance_extra_specs:ssd: "true"`).
    #[serde(default)]
    pub extra_specs: BTreeMap<String, String>,
    /// Whether every project may use this flavor. Non-public flavors are usable only by admins.
    #[serde(default = "crate::common::default_true")]
    pub is_public: bool,
    /// Free-form description.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 255))]
    pub description: Option<String>,
}

/// Lifecycle phase of a Flavor.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum FlavorPhase {
    /// The flavor can be used by new Servers.
    #[default]
    Active,
}

/// Observed state of a Flavor.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FlavorStatus {
    /// Lifecycle phase.
    #[serde(default)]
    pub phase: FlavorPhase,
    /// Latest observations of the flavor's state.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// The `metadata.generation` this status was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// A compute node that runs Servers. Its name is the node name its agent registers with.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "compute.stratus.dev",
    version = "v1",
    kind = "Hypervisor",
    status = "HypervisorStatus",
    derive = "PartialEq",
    shortname = "hv",
    category = "stratus",
    selectable = ".spec.availabilityZone",
    doc = "A hypervisor (Nova compute node): a node that runs Servers.",
    printcolumn(name = "Zone", type_ = "string", json_path = ".spec.availabilityZone"),
    printcolumn(name = "Type", type_ = "string", json_path = ".spec.hypervisorType"),
    printcolumn(name = "Status", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Disabled", type_ = "boolean", json_path = ".spec.disabled"),
    printcolumn(
        name = "VCPUs",
        type_ = "integer",
        json_path = ".status.capacity.vcpus",
        priority = 1
    ),
    printcolumn(
        name = "Used VCPUs",
        type_ = "integer",
        json_path = ".status.allocated.vcpus",
        priority = 1
    ),
    printcolumn(
        name = "RAM MiB",
        type_ = "integer",
        json_path = ".status.capacity.ramMiB",
        priority = 1
    ),
    printcolumn(
        name = "Used RAM MiB",
        type_ = "integer",
        json_path = ".status.allocated.ramMiB",
        priority = 1
    ),
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
pub struct HypervisorSpec {
    /// Availability zone the node belongs to.
    #[serde(default = "default_availability_zone")]
    #[schemars(length(min = 1, max = 63), regex(pattern = LABEL_PATTERN))]
    pub availability_zone: String,
    /// Virtualisation driver.
    #[serde(default)]
    pub hypervisor_type: HypervisorType,
    /// Virtual CPUs schedulable per physical CPU (Nova `cpu_allocation_ratio`).
    #[serde(default = "default_cpu_ratio")]
    #[schemars(range(min = 0.01, max = 1000.0))]
    pub cpu_allocation_ratio: f64,
    /// RAM schedulable per byte of physical RAM (Nova `ram_allocation_ratio`).
    #[serde(default = "default_ram_ratio")]
    #[schemars(range(min = 0.01, max = 1000.0))]
    pub ram_allocation_ratio: f64,
    /// Disk schedulable per byte of local disk (Nova `disk_allocation_ratio`).
    #[serde(default = "default_disk_ratio")]
    #[schemars(range(min = 0.01, max = 1000.0))]
    pub disk_allocation_ratio: f64,
    /// Physical CPUs kept for the host itself, not offered to Servers.
    #[serde(default, rename = "reservedHostCPUs")]
    pub reserved_host_cpus: u32,
    /// Memory kept for the host itself, in MiB (Nova `reserved_host_memory_mb`).
    #[serde(default = "default_reserved_memory", rename = "reservedHostMemoryMiB")]
    pub reserved_host_memory_mib: u64,
    /// Local disk kept for the host itself, in GiB.
    #[serde(default, rename = "reservedHostDiskGiB")]
    pub reserved_host_disk_gib: u64,
    /// A disabled hypervisor keeps running its Servers but the scheduler places no new ones
    /// on it (`openstack compute service set --disable`).
    #[serde(default)]
    pub disabled: bool,
    /// Why the hypervisor is disabled, for other operators.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 255))]
    pub disabled_reason: Option<String>,
}

fn default_availability_zone() -> String {
    "nova".to_owned()
}

fn default_cpu_ratio() -> f64 {
    16.0
}

fn default_ram_ratio() -> f64 {
    1.5
}

fn default_disk_ratio() -> f64 {
    1.0
}

fn default_reserved_memory() -> u64 {
    512
}

/// Virtualisation driver of a Hypervisor.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum HypervisorType {
    /// libvirt with QEMU (KVM when available, TCG otherwise).
    #[default]
    Qemu,
    /// libvirt's `test:///` driver: no guests run; for scale tests only.
    Test,
}

/// An amount of compute resources.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct ComputeResources {
    /// Virtual CPUs.
    pub vcpus: u64,
    /// Memory, in MiB.
    #[serde(rename = "ramMiB")]
    pub ram_mib: u64,
    /// Local disk, in GiB.
    #[serde(rename = "diskGiB")]
    pub disk_gib: u64,
}

/// Lifecycle phase of a Hypervisor.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum HypervisorPhase {
    /// The agent has not reported yet.
    #[default]
    Pending,
    /// The agent reports and the hypervisor can run Servers.
    Ready,
    /// The agent's heartbeat is overdue or the hypervisor reports a fault.
    NotReady,
}

/// Observed state of a Hypervisor, written by its agent and the scheduler.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HypervisorStatus {
    /// Lifecycle phase.
    #[serde(default)]
    pub phase: HypervisorPhase,
    /// Schedulable resources: physical resources minus the reserved ones, times the
    /// allocation ratios.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity: Option<ComputeResources>,
    /// Resources claimed by the Servers placed here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocated: Option<ComputeResources>,
    /// Number of Servers placed here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub servers: Option<u32>,
    /// Address other nodes reach this hypervisor at (VXLAN tunnel endpoint, migration).
    #[serde(default, rename = "hostIP", skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = IP_PATTERN))]
    pub host_ip: Option<String>,
    /// Version of the hypervisor software (e.g. `libvirt 9.0.0, QEMU 7.2.0`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hypervisor_version: Option<String>,
    /// When the agent last reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_heartbeat_time: Option<Time>,
    /// Latest observations of the hypervisor's state (`Ready`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// The `metadata.generation` this status was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

impl Hypervisor {
    /// Whether its agent reports it `Ready` (and its heartbeat has not expired): the only
    /// hypervisors new servers are placed on.
    pub fn is_ready(&self) -> bool {
        self.status
            .as_ref()
            .is_some_and(|s| crate::common::ConditionType::Ready.is_true(&s.conditions))
    }
}

/// An SSH public key injected into Servers that name it.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "compute.stratus.dev",
    version = "v1",
    kind = "Keypair",
    namespaced,
    status = "KeypairStatus",
    derive = "PartialEq",
    shortname = "kp",
    category = "stratus",
    doc = "A keypair (Nova keypair): an SSH public key for Servers.",
    printcolumn(
        name = "Fingerprint",
        type_ = "string",
        json_path = ".status.fingerprint"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KeypairSpec {
    /// The public key in OpenSSH `authorized_keys` form: `<type> <base64> [comment]`.
    #[schemars(
        length(min = 16, max = 16384),
        regex(
            pattern = r"^(ssh-rsa|ssh-ed25519|ssh-dss|ecdsa-sha2-nistp(256|384|521)|sk-ssh-ed25519@openssh\.com|sk-ecdsa-sha2-nistp256@openssh\.com) [A-Za-z0-9+/]+={0,3}( [^\n]*)?$"
        )
    )]
    pub public_key: String,
}

/// Lifecycle phase of a Keypair.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum KeypairPhase {
    /// Not yet processed.
    #[default]
    Pending,
    /// The key is usable.
    Active,
}

/// Observed state of a Keypair.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KeypairStatus {
    /// Lifecycle phase.
    #[serde(default)]
    pub phase: KeypairPhase,
    /// OpenSSH fingerprint of the key (`SHA256:...`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<String>,
    /// Latest observations of the keypair's state.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// The `metadata.generation` this status was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// A placement policy shared by the Servers that name this group.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "compute.stratus.dev",
    version = "v1",
    kind = "ServerGroup",
    namespaced,
    status = "ServerGroupStatus",
    derive = "PartialEq",
    shortname = "srvg",
    category = "stratus",
    doc = "A server group (Nova server group): (anti-)affinity between Servers.",
    printcolumn(name = "Policy", type_ = "string", json_path = ".spec.policy"),
    printcolumn(
        name = "Members",
        type_ = "string",
        json_path = ".status.members[*]",
        priority = 1
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServerGroupSpec {
    /// How the scheduler places the group's Servers relative to each other.
    pub policy: ServerGroupPolicy,
    /// For `anti-affinity` only: how many of the group's Servers may share one hypervisor
    /// (Nova's `max_server_per_host` rule). Absent: 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_server_per_host: Option<u32>,
}

/// Placement policy of a ServerGroup.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum ServerGroupPolicy {
    /// All members on the same hypervisor; scheduling fails if that is impossible.
    Affinity,
    /// Members on different hypervisors; scheduling fails if that is impossible.
    AntiAffinity,
    /// Same hypervisor when possible.
    SoftAffinity,
    /// Different hypervisors when possible.
    SoftAntiAffinity,
}

/// Lifecycle phase of a ServerGroup.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum ServerGroupPhase {
    /// The group can take members.
    #[default]
    Active,
}

/// Observed state of a ServerGroup.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServerGroupStatus {
    /// Lifecycle phase.
    #[serde(default)]
    pub phase: ServerGroupPhase,
    /// Names of the Servers in the group.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub members: Vec<String>,
    /// Latest observations of the group's state.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// The `metadata.generation` this status was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// A virtual machine.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "compute.stratus.dev",
    version = "v1",
    kind = "Server",
    namespaced,
    status = "ServerStatus",
    derive = "PartialEq",
    shortname = "srv",
    category = "stratus",
    selectable = ".spec.flavor",
    selectable = ".status.hypervisor",
    doc = "A server (Nova server): a virtual machine.",
    printcolumn(name = "Status", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Flavor", type_ = "string", json_path = ".spec.flavor"),
    printcolumn(name = "Image", type_ = "string", json_path = ".spec.image"),
    printcolumn(name = "Node", type_ = "string", json_path = ".status.hypervisor"),
    printcolumn(
        name = "Addresses",
        type_ = "string",
        json_path = ".status.addresses[*].ip"
    ),
    printcolumn(
        name = "Power",
        type_ = "string",
        json_path = ".status.powerState",
        priority = 1
    ),
    printcolumn(
        name = "Boot Volume",
        type_ = "string",
        json_path = ".spec.bootVolume",
        priority = 1
    ),
    printcolumn(
        name = "Zone",
        type_ = "string",
        json_path = ".spec.availabilityZone",
        priority = 1
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServerSpec {
    /// Name of the Flavor. Changing it resizes the server (it is restarted).
    #[schemars(length(min = 1, max = 253), regex(pattern = NAME_PATTERN))]
    pub flavor: String,
    /// Name of the Image to boot from (an Image in this namespace, or a public one). Exactly
    /// one of `image` and `bootVolume`. Changing it rebuilds the server: its root disk is
    /// recreated from the new image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253), regex(pattern = NAME_PATTERN))]
    pub image: Option<String>,
    /// Name of a bootable Volume to boot from, instead of an image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253), regex(pattern = NAME_PATTERN))]
    pub boot_volume: Option<String>,
    /// Network interfaces, in guest order. Empty: no network.
    #[serde(default)]
    #[schemars(length(max = 16))]
    pub networks: Vec<ServerNetwork>,
    /// Extra Volumes attached to the server, in guest order after the root disk.
    #[serde(default)]
    #[schemars(length(max = 26))]
    pub volumes: Vec<ServerVolume>,
    /// Name of the Keypair whose public key is injected for the default user.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253), regex(pattern = NAME_PATTERN))]
    pub keypair: Option<String>,
    /// cloud-init user data, base64-encoded (as in Nova; at most 65535 characters encoded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(max = 65535),
        regex(pattern = r"^[A-Za-z0-9+/\r\n]*={0,2}[\r\n]*$"),
        extend("format" = "byte")
    )]
    pub user_data: Option<String>,
    /// Guest host name. Absent: the object name, if it is a valid host name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63), regex(pattern = LABEL_PATTERN))]
    pub hostname: Option<String>,
    /// Availability zone to place the server in. Absent: any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63), regex(pattern = LABEL_PATTERN))]
    pub availability_zone: Option<String>,
    /// Name of the ServerGroup whose placement policy applies to this server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253), regex(pattern = NAME_PATTERN))]
    pub server_group: Option<String>,
    /// Desired power state (`openstack server start` / `stop`).
    #[serde(default)]
    pub power_state: PowerState,
    /// Reboot token: setting it to a new value requests one reboot, like the annotation
    /// `kubectl rollout restart` sets (a timestamp is a good value). The server reboots
    /// when this differs from `status.lastRebootRequest`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub reboot_request: Option<String>,
    /// How a requested reboot is done.
    #[serde(default)]
    pub reboot_type: RebootType,
    /// What happens when the server's hypervisor is lost.
    #[serde(default)]
    pub evacuation_policy: EvacuationPolicy,
    /// What the node's agent does when the guest changes behind Stratus's back (its domain
    /// destroyed, undefined or powered off outside Stratus).
    #[serde(default)]
    pub drift_policy: DriftPolicy,
    /// Free-form description.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 255))]
    pub description: Option<String>,
}

/// One network interface of a Server: exactly one of `network` and `port`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServerNetwork {
    /// Name of a Network: a Port is created on it for the server (and deleted with it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253), regex(pattern = NAME_PATTERN))]
    pub network: Option<String>,
    /// Name of an existing, unbound Port to use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253), regex(pattern = NAME_PATTERN))]
    pub port: Option<String>,
    /// With `network`: the address to request on it. Absent: allocated.
    #[serde(default, rename = "fixedIP", skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = IP_PATTERN))]
    pub fixed_ip: Option<String>,
    /// With `network`: the Subnet of that network the address comes from (`fixedIP`, if
    /// given, must be in it). Absent: one address from each subnet of the network.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253), regex(pattern = NAME_PATTERN))]
    pub subnet: Option<String>,
}

/// A Volume attached to a Server.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServerVolume {
    /// Name of the Volume.
    #[schemars(length(min = 1, max = 253), regex(pattern = NAME_PATTERN))]
    pub volume: String,
}

/// Desired power state of a Server.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum PowerState {
    /// The guest runs.
    #[default]
    Running,
    /// The guest is shut down (ACPI shutdown, then forced off); its disks and addresses are kept.
    Stopped,
}

/// How a Server is rebooted when `rebootRequest` changes.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum RebootType {
    /// ACPI reboot request to the guest, forced after a timeout.
    #[default]
    Soft,
    /// Power cycle without asking the guest.
    Hard,
}

/// What Stratus does with a Server whose hypervisor is lost (NotReady past a grace period).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum EvacuationPolicy {
    /// Leave the server on its hypervisor in phase Error until an operator acts.
    #[default]
    Manual,
    /// Rebuild the server on another hypervisor (`nova evacuate`). A server booted from an
    /// image loses its root disk's contents; one booted from a volume keeps them.
    Evacuate,
}

/// What the agent does when a Server's guest drifts from what Stratus made: its domain gone
/// from the hypervisor, or shut off while the Server should run.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum DriftPolicy {
    /// Put it back: define the domain again (same disks) or start it, with a Warning Event.
    #[default]
    Recreate,
    /// Leave it as found for an operator to look at: phase Error, condition `Drifted`, a
    /// Warning Event. Setting the policy back to `Recreate` repairs it.
    Report,
}

/// Observed power state of a Server's guest.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum ObservedPowerState {
    /// The guest is running.
    Running,
    /// The guest is paused by the hypervisor.
    Paused,
    /// The guest is shut off.
    Shutdown,
    /// The guest crashed.
    Crashed,
    /// No guest exists on the hypervisor.
    NoState,
}

/// Lifecycle phase of a Server.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum ServerPhase {
    /// Waiting for the scheduler.
    #[default]
    Pending,
    /// Placed on a hypervisor (`status.hypervisor`), not yet being built.
    Scheduled,
    /// The hypervisor's agent is preparing disks, ports and the guest.
    Building,
    /// The guest runs.
    Running,
    /// The guest is shut down as requested.
    Stopped,
    /// A requested reboot is in progress.
    Rebooting,
    /// Moving to a new flavor.
    Resizing,
    /// Recreating the root disk from a new image.
    Rebuilding,
    /// Being rebuilt on another hypervisor after its own was lost.
    Evacuating,
    /// Being deleted; its disks and ports are being released.
    Deleting,
    /// Something failed; see the conditions.
    Error,
}

/// Kind of address in a Server's `status.addresses`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum AddressType {
    /// An address on the port itself.
    #[default]
    Fixed,
    /// A FloatingIP NATed to a fixed address.
    Floating,
}

/// One address of a Server.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServerAddress {
    /// Name of the Network.
    pub network: String,
    /// Name of the Port carrying the address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<String>,
    /// The IP address.
    #[schemars(regex(pattern = IP_PATTERN))]
    pub ip: String,
    /// MAC address of the interface.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = MAC_PATTERN))]
    pub mac: Option<String>,
    /// Fixed or floating.
    #[serde(default, rename = "type")]
    pub type_: AddressType,
}

/// Where to read a Server's console.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServerConsole {
    /// Path of the serial console log on the hypervisor.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_path: Option<String>,
    /// URL of an interactive console, when one is offered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
}

/// Observed state of a Server.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServerStatus {
    /// Lifecycle phase.
    #[serde(default)]
    pub phase: ServerPhase,
    /// Name of the Hypervisor the scheduler placed the server on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hypervisor: Option<String>,
    /// Resources claimed on the hypervisor (from the flavor at placement time).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocated: Option<ComputeResources>,
    /// Flavor the server currently runs with; differs from `spec.flavor` during a resize.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flavor: Option<String>,
    /// Image the root disk was built from; differs from `spec.image` during a rebuild.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Addresses of the server's interfaces.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<ServerAddress>,
    /// Observed power state of the guest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub power_state: Option<ObservedPowerState>,
    /// The `spec.rebootRequest` last acted upon.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_reboot_request: Option<String>,
    /// Name of the guest on the hypervisor (libvirt domain name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_name: Option<String>,
    /// Where to read the console.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub console: Option<ServerConsole>,
    /// When the guest was last started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub launched_at: Option<Time>,
    /// Latest observations of the server's state (`Scheduled`, `Ready`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// The `metadata.generation` this status was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}
