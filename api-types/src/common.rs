//! Types, patterns and condition names shared by every Stratus kind.

pub use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

macro_rules! ipv4 {
    () => {
        r"(25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])(\.(25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])){3}"
    };
}

// Deliberately loose: the schema only keeps out what is obviously not an IPv6 address;
// `validate` parses every address exactly.
macro_rules! ipv6 {
    () => {
        r"([0-9a-fA-F]{0,4}:){2,7}[0-9a-fA-F.]{0,15}"
    };
}

/// A reference to another object by name: a DNS-1123 subdomain (at most 253 characters).
pub const NAME_PATTERN: &str = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$";

/// Longest allowed object name (DNS-1123 subdomain).
pub const NAME_MAX_LENGTH: u32 = 253;

/// A DNS-1123 label, as used for host names (at most 63 characters).
pub const LABEL_PATTERN: &str = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$";

/// An IPv4 address in dotted-quad form.
pub const IPV4_PATTERN: &str = concat!("^", ipv4!(), "$");

/// An IPv4 or IPv6 address (the IPv6 part is loose; `validate` parses exactly).
pub const IP_PATTERN: &str = concat!("^(", ipv4!(), "|", ipv6!(), ")$");

/// An IPv4 or IPv6 network in CIDR notation (`10.0.0.0/24`, `2001:db8::/64`).
pub const CIDR_PATTERN: &str = concat!(
    "^(",
    ipv4!(),
    "/(3[0-2]|[12]?[0-9])|",
    ipv6!(),
    "/(12[0-8]|1[01][0-9]|[1-9]?[0-9]))$"
);

/// A unicast MAC address, lower case, colon separated.
pub const MAC_PATTERN: &str = r"^([0-9a-f]{2}:){5}[0-9a-f]{2}$";

/// A SHA-256 digest as 64 lower-case hexadecimal digits.
pub const SHA256_PATTERN: &str = r"^[a-f0-9]{64}$";

/// Condition types used across kinds (`status.conditions[].type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ConditionType {
    /// The object is fully realised and serving.
    Ready,
    /// A server or volume has been placed on a node.
    Scheduled,
    /// Addresses (IPs, MACs, VNIs) have been allocated.
    Allocated,
    /// The object's source (image download, snapshot copy) has been verified.
    Verified,
    /// The object is attached to (in use by) another object.
    Attached,
    /// A server's guest is not as Stratus made it, and its `driftPolicy` says to report that.
    Drifted,
    /// A server's guest was asked to shut down and has not finished yet.
    Stopping,
    /// A server's move to a new flavor.
    Resized,
    /// Whether the last reconcile got through: `False` (reason `ReconcileError`) when it
    /// failed in a way that retrying the same object cannot fix, with the error as message.
    Reconciled,
    /// A deleted project's namespace still holds objects (which ones, in the message).
    ContentRemaining,
    /// Objects of a deleted project wait for their finalizers (which ones, in the message).
    FinalizersRemaining,
    /// A floating IP is associated with a port's fixed address through a router.
    Associated,
    /// An object ring's replicas are still to move, held back by `minPartHours`.
    Rebalancing,
    /// An object ring's spec cannot be built; its current version stays.
    Invalid,
    /// Object nodes use another cluster hash (Swift's hash path prefix and suffix) than the
    /// ring's other nodes: they install none of its new versions.
    HashMismatch,
}

impl ConditionType {
    /// The name in `status.conditions[].type`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Ready => "Ready",
            Self::Scheduled => "Scheduled",
            Self::Allocated => "Allocated",
            Self::Verified => "Verified",
            Self::Attached => "Attached",
            Self::Drifted => "Drifted",
            Self::Stopping => "Stopping",
            Self::Resized => "Resized",
            Self::Reconciled => "Reconciled",
            Self::ContentRemaining => "ContentRemaining",
            Self::FinalizersRemaining => "FinalizersRemaining",
            Self::Associated => "Associated",
            Self::Rebalancing => "Rebalancing",
            Self::Invalid => "Invalid",
            Self::HashMismatch => "HashMismatch",
        }
    }

    /// This condition with status `True`, for `reason` (a [`Reason`]).
    pub fn yes(self, reason: impl AsReason, message: impl Into<String>) -> ConditionUpdate {
        ConditionUpdate::new(self, true, reason.as_reason(), message)
    }

    /// This condition with status `False`, for `reason` (a [`Reason`]).
    pub fn no(self, reason: impl AsReason, message: impl Into<String>) -> ConditionUpdate {
        ConditionUpdate::new(self, false, reason.as_reason(), message)
    }

    /// The condition of this type in `conditions`, if any.
    pub fn find(self, conditions: &[Condition]) -> Option<&Condition> {
        conditions.iter().find(|c| c.type_ == self.as_str())
    }

    /// Whether `conditions` hold this condition with status `True`.
    pub fn is_true(self, conditions: &[Condition]) -> bool {
        self.find(conditions).is_some_and(|c| c.status == "True")
    }
}

impl std::fmt::Display for ConditionType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

macro_rules! reasons {
    ($($(#[doc = $doc:literal])+ $name:ident $(= $text:literal)?,)*) => {
        /// Why a condition is as it is (`status.conditions[].reason`): every reason a Stratus
        /// controller or agent writes. Serialized as its CamelCase name ([`Reason::as_str`]).
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
        pub enum Reason {
            $($(#[doc = $doc])+ $(#[serde(rename = $text)])? $name,)*
        }

        impl Reason {
            /// Every reason.
            pub const ALL: &[Reason] = &[$(Self::$name),*];

            /// The name in `status.conditions[].reason`.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $(Self::$name => reasons!(@text $name $($text)?),)*
                }
            }
        }
    };
    (@text $name:ident $text:literal) => { $text };
    (@text $name:ident) => { stringify!($name) };
}

reasons! {
    /// `Reconciled=True`: the last reconcile got through (written only to clear a failure).
    Reconciled,
    /// `Reconciled=False`: the last reconcile failed in a way retrying cannot fix.
    ReconcileError,
    /// A project's `ContentRemaining=False`: its namespace is empty.
    ContentDeleted,
    /// A project's `ContentRemaining=True`: objects remain in its namespace.
    SomeResourcesRemain,
    /// A project's `FinalizersRemaining=False`.
    ContentHasNoFinalizers,
    /// A project's `FinalizersRemaining=True`: objects in it wait for finalizers.
    SomeFinalizersRemain,
    /// An image's `Verified=True`: its data was checked.
    Verified,
    /// An image's `Ready=True`: servers can boot from it.
    Active,
    /// An image's data does not match `spec.sha256`.
    ChecksumMismatch,
    /// An image's data is larger than the cloud's limit.
    DownloadTooLarge,
    /// An image's data names a backing file.
    BackingFile,
    /// An image's data names an external data file.
    DataFile,
    /// An image's data names a `json:` or other protocol file name.
    ProtocolFileName,
    /// An image's data is not in its declared format.
    FormatMismatch,
    /// An image's virtual size is over the limit.
    VirtualSizeTooLarge,
    /// An image's data cannot be read as its format.
    Unreadable,
    /// An image's URL is refused by the cloud's URL policy.
    UrlRefused = "URLRefused",
    /// An image's data could not be inspected.
    InspectionFailed,
    /// An image's download failed (it is tried again).
    DownloadFailed,
    /// The object store refused an image's token for its `source.swift` object (403).
    SourceForbidden,
    /// An image's `source.swift` object is not in its project's account (404).
    SourceNotFound,
    /// An image's `Ready=False`: its data is being uploaded (`PUT images/NAME/data`).
    Uploading,
    /// An image's `Ready=False`: it waits for its data to be uploaded.
    AwaitingUpload,
    /// An image's data, downloaded and verified, could not be stored in the cloud's object
    /// store (it is tried again).
    StoreFailed,
    /// A hypervisor's `Ready=True`: its agent runs and heartbeats.
    AgentReady,
    /// A hypervisor's `Ready=False`: its heartbeat Lease expired.
    HeartbeatLost,
    /// A server's `Ready=False`: its hypervisor was lost and its evacuation policy is Manual.
    HypervisorLost,
    /// A server's or volume's `Scheduled=True`: its binding placed it on a hypervisor or pool.
    Bound,
    /// A server's `Scheduled=False`: taken off its lost hypervisor, waiting to be placed again.
    Evacuating,
    /// A server's `Scheduled=False`: no hypervisor can take it now.
    Unschedulable,
    /// A server's flavor does not exist.
    FlavorNotFound,
    /// A server's server group does not exist.
    ServerGroupNotFound,
    /// A server's `Resized=False`: its hypervisor has no room for the new flavor.
    InsufficientCapacity,
    /// A server's `Resized=False`: the scheduler has not claimed the new flavor yet.
    AwaitingCapacity,
    /// A server's `Resized=True`.
    Resized,
    /// A server's image does not exist.
    ImageNotFound,
    /// A server's image name matches more than one image.
    ImageAmbiguous,
    /// A server's image data does not match its checksum.
    ImageChecksumMismatch,
    /// A server's image data is refused by inspection.
    ImageRefused,
    /// A server's image data is larger than the cloud's limit.
    ImageTooLarge,
    /// A server's image URL is refused by the cloud's URL policy.
    ImageUrlRefused = "ImageURLRefused",
    /// A server's image could not be downloaded.
    ImageDownloadFailed,
    /// A server's image cannot be booted (e.g. it is a kernel or ramdisk image).
    ImageNotBootable,
    /// A server asks for networks this node cannot wire yet.
    NetworkingUnavailable,
    /// Every Port a server's `spec.networks` asks for exists, with its addresses.
    PortsAllocated,
    /// A Port a server's `spec.networks` names does not exist.
    PortNotFound,
    /// A Port a server's `spec.networks` names is bound to, or owned by, another server.
    PortInUse,
    /// The API refused to create a server's Port (its message says why).
    PortRefused,
    /// A server's Port is not yet placed on its node with its addresses.
    PortNotPlaced,
    /// A server asks for volumes this node cannot attach yet.
    VolumesUnavailable,
    /// A volume's `status.devicePath` is not that volume's data in its pool on this node: the
    /// compute agent refuses to give it to the guest.
    VolumeRefused,
    /// A server asks to boot from a volume, which this node cannot do yet.
    BootVolumeUnsupported,
    /// A volume's `Scheduled=False`: no storage pool can take it now.
    NoPoolAvailable,
    /// A volume's `Ready=False`: it asks for more than it has while a server holds it, and
    /// its pool cannot grow a volume in use; it is served at its size meanwhile (guests are
    /// given it as it is) and grows once detached.
    GrowsWhenDetached,
    /// A volume's `Scheduled=False`: the snapshot or volume it is made from is missing or not
    /// placed yet.
    SourceNotReady,
    /// A server's flavor has a smaller disk than its image needs.
    FlavorDiskTooSmall,
    /// A server's flavor has less memory than its image needs.
    FlavorMemoryTooSmall,
    /// A server's keypair does not exist.
    KeypairNotFound,
    /// A server's user data cannot be used.
    InvalidUserData,
    /// A server's `Ready=False` while its disks and guest are prepared.
    Building,
    /// A server's `Ready=True`: the guest runs.
    Running,
    /// A server's guest is stopped as asked (`Ready=False`, `Stopping=False`).
    Stopped,
    /// A server's `Ready=False`: the guest is not running.
    NotRunning,
    /// A server's `Drifted=False`: the guest is as the Server asks.
    InSync,
    /// A server's `Drifted=True`: its domain is gone from the hypervisor.
    DomainMissing,
    /// A server's `Drifted=True`: its guest was shut off outside Stratus.
    PoweredOff,
    /// A server's `Ready=False`: it drifted and its policy is to report it.
    Drifted,
    /// A server's `Stopping=True`: the guest was asked to shut down.
    ShutdownRequested,
    /// A network port's `Ready=True`: its device is on its network's bridge, filtered.
    Wired,
    /// A network port's `Ready=False`: the node failed to wire it (it is tried again).
    WiringFailed,
    /// A network port's `Ready=False`: its device (the guest's tap) is not on the node yet.
    DeviceMissing,
    /// A network port's network does not exist.
    NetworkNotFound,
    /// A network port's network was deleted (one of that name now is another Network).
    NetworkGone,
    /// A network port's network has a segmentation the node cannot wire.
    SegmentationUnsupported,
    /// A network port's network has no VNI yet.
    VniPending = "VNIPending",
    /// A network port's node has no tunnel address.
    NoUnderlayAddress,
    /// A network port has no MAC address yet.
    MacAddressPending = "MACAddressPending",
    /// A network port's MAC address does not parse.
    InvalidMacAddress = "InvalidMACAddress",
    /// A network port's device name is not one the node may attach.
    InvalidInterfaceName,
    /// A network port's fixed address does not parse.
    InvalidAddress,
    /// A network port with port security has no IPv4 address yet.
    AddressPending,
    /// A network port's security group does not exist.
    SecurityGroupNotFound,
    /// A network port's uid gives no name the firewall accepts.
    InvalidName,
    /// A router's `Ready=False`: a subnet it has an interface on does not exist.
    SubnetNotFound,
    /// A router's or floating IP's external network does not exist or is not external.
    ExternalNetworkNotFound,
    /// A floating IP's `Associated=True`: NATed to its port's fixed address by a router.
    Associated,
    /// A floating IP's `Associated=False`: it names no port.
    Unassociated,
    /// A floating IP's `Associated=False`: its fixed address is not one of its port's.
    FixedIPNotFound,
    /// A floating IP's `Associated=False`: no router joins its port's subnet to its network.
    NoRouter,
    /// A network port's flat network names a physical network the node has no interface for.
    PhysicalNetworkUnmapped,
    /// A router's `Ready=True`: its namespace, interfaces, routes and NAT are in place on its
    /// node.
    Routed,
    /// A router's `Ready=False`: one of its Ports is not on its node or cannot be wired yet.
    RouterPortPending,
    /// A floating IP's `Ready=True`: its router's node translates it.
    Translated,
    /// A floating IP's `Ready=False`: its router is not programmed on its node yet.
    RouterNotReady,
    /// An object ring's `Ready=True`: its current version is built from the spec.
    Built,
    /// An object ring's `Invalid=False`: its spec can be built.
    Valid,
    /// An object ring's `Invalid=True`: a field of its spec is refused (the message names it).
    InvalidSpec,
    /// An object ring's `Invalid=True`: the ring builder cannot build its spec.
    CannotBuild,
    /// An object ring's `Rebalancing=False`: `spec.paused`, its change only proposed.
    Paused,
    /// An object ring's `Rebalancing=True`: replicas wait for `minPartHours` to move.
    MinPartHours,
    /// An object ring's `Rebalancing=False`: replicas above the plan cannot move in its
    /// topology.
    Settled,
    /// An object ring's `Rebalancing=False`: every replica is where the plan puts it.
    Balanced,
    /// `HashMismatch=False`: every node reports the same cluster hash fingerprint.
    HashesAgree,
    /// `HashMismatch=True`: a node's cluster hash fingerprint is not its ring's.
    HashDiffers,
    /// `HashMismatch=True`: a node's cluster hash fingerprint is of another version than its
    /// ring's (a hash file without the cluster's fingerprint salt, or with one the ring's
    /// nodes lack): the hashes cannot be shown alike, so they are taken to differ.
    HashFingerprintVersion,
}

impl Reason {
    /// The reason named `s`, if it is one.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.iter().copied().find(|r| r.as_str() == s)
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why an object cannot progress now, until something else changes: the reason and message
/// of the condition that says so (a scheduler's `Scheduled=False`, an agent's `Ready=False`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blocked {
    /// The condition's reason.
    pub reason: Reason,
    /// What stops it, for people.
    pub message: String,
}

impl Blocked {
    /// Blocked for `reason`, as `message` explains.
    pub fn new(reason: Reason, message: impl Into<String>) -> Self {
        Self {
            reason,
            message: message.into(),
        }
    }

    /// The condition `type_` set to `False` for this.
    pub fn condition(&self, type_: ConditionType) -> ConditionUpdate {
        type_.no(self.reason, self.message.clone())
    }
}

/// What a condition builder takes as its reason: a [`Reason`] (or, while a crate's reasons
/// are not in [`Reason`] yet, a CamelCase `&'static str`).
pub trait AsReason {
    /// The name in `status.conditions[].reason`.
    fn as_reason(&self) -> &'static str;
}

impl AsReason for Reason {
    fn as_reason(&self) -> &'static str {
        self.as_str()
    }
}

impl AsReason for &'static str {
    fn as_reason(&self) -> &'static str {
        self
    }
}

/// A condition to set: its type, status, reason and message (from [`ConditionType::yes`] or
/// [`ConditionType::no`]); [`ConditionUpdate::set`] writes it into a status's conditions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConditionUpdate {
    /// The condition's type.
    pub type_: ConditionType,
    /// `True` or `False`.
    pub status: bool,
    /// The CamelCase reason (a [`Reason`]'s name).
    pub reason: &'static str,
    /// What a person reads.
    pub message: String,
}

impl ConditionUpdate {
    fn new(
        type_: ConditionType,
        status: bool,
        reason: &'static str,
        message: impl Into<String>,
    ) -> Self {
        Self {
            type_,
            status,
            reason,
            message: message.into(),
        }
    }

    /// Sets this condition in `conditions` for the object's `generation`, now. Returns
    /// whether anything changed (see [`set_condition`]).
    pub fn set(&self, conditions: &mut Vec<Condition>, generation: Option<i64>) -> bool {
        self.set_at(conditions, generation, Time(jiff_now()))
    }

    /// As [`ConditionUpdate::set`], at the time `now`.
    pub fn set_at(
        &self,
        conditions: &mut Vec<Condition>,
        generation: Option<i64>,
        now: Time,
    ) -> bool {
        set_condition(
            conditions,
            self.type_.as_str(),
            self.status,
            self.reason,
            &self.message,
            generation,
            now,
        )
    }
}

fn jiff_now() -> k8s_openapi::jiff::Timestamp {
    k8s_openapi::jiff::Timestamp::now()
}

pub(crate) fn default_true() -> bool {
    true
}

/// Sets the condition `type_` in `conditions` (adding it if absent). `lastTransitionTime`
/// moves to `now` only when the status changes, as the Kubernetes conventions ask. Returns
/// whether anything changed.
pub fn set_condition(
    conditions: &mut Vec<Condition>,
    type_: &str,
    status: bool,
    reason: &str,
    message: &str,
    generation: Option<i64>,
    now: Time,
) -> bool {
    let status = if status { "True" } else { "False" };
    match conditions.iter_mut().find(|c| c.type_ == type_) {
        Some(c) => {
            let before = c.clone();
            if c.status != status {
                c.last_transition_time = now;
            }
            c.status = status.into();
            c.reason = reason.into();
            c.message = message.into();
            c.observed_generation = generation;
            *c != before
        }
        None => {
            conditions.push(Condition {
                type_: type_.into(),
                status: status.into(),
                reason: reason.into(),
                message: message.into(),
                observed_generation: generation,
                last_transition_time: now,
            });
            true
        }
    }
}

#[cfg(test)]
mod condition_tests {
    use super::*;

    #[test]
    fn reasons_are_written_as_their_camel_case_names() {
        for r in Reason::ALL {
            let json = serde_json::to_value(r).expect("serializes");
            assert_eq!(json, r.as_str(), "{r:?}");
            assert_eq!(serde_json::from_value::<Reason>(json).ok(), Some(*r));
            assert_eq!(Reason::parse(r.as_str()), Some(*r));
            assert!(r.as_str().starts_with(|c: char| c.is_ascii_uppercase()));
        }
        assert_eq!(Reason::UrlRefused.as_str(), "URLRefused");
        let mut names: Vec<&str> = Reason::ALL.iter().map(|r| r.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), Reason::ALL.len(), "each reason once");
    }

    #[test]
    fn the_builder_writes_the_reasons_name() {
        let mut c = Vec::new();
        ConditionType::Ready
            .no(Reason::HeartbeatLost, "no heartbeat")
            .set_at(&mut c, Some(2), at("2026-01-01T00:00:00Z"));
        assert_eq!(
            (
                c[0].type_.as_str(),
                c[0].status.as_str(),
                c[0].reason.as_str()
            ),
            ("Ready", "False", "HeartbeatLost")
        );
        assert_eq!(c[0].observed_generation, Some(2));
    }

    fn at(s: &str) -> Time {
        Time(s.parse().expect("a timestamp"))
    }

    #[test]
    fn transition_time_moves_only_when_the_status_does() {
        let mut c = Vec::new();
        assert!(set_condition(
            &mut c,
            "Ready",
            false,
            "Building",
            "",
            Some(1),
            at("2026-01-01T00:00:00Z")
        ));
        assert!(set_condition(
            &mut c,
            "Ready",
            false,
            "Building",
            "disks",
            Some(1),
            at("2026-01-01T00:01:00Z")
        ));
        assert_eq!(c[0].last_transition_time, at("2026-01-01T00:00:00Z"));
        assert!(!set_condition(
            &mut c,
            "Ready",
            false,
            "Building",
            "disks",
            Some(1),
            at("2026-01-01T00:02:00Z")
        ));
        assert!(set_condition(
            &mut c,
            "Ready",
            true,
            "Running",
            "",
            Some(1),
            at("2026-01-01T00:03:00Z")
        ));
        assert_eq!(c[0].last_transition_time, at("2026-01-01T00:03:00Z"));
        assert_eq!(c.len(), 1);
    }
}
