//! The compute driver: what the agent asks of a hypervisor ([`DomainDriver`]: libvirt, or the
//! in-memory [`fake`]) and of the node's disks ([`Disks`]: qcow2 overlays and config drives on
//! the host, or in memory). Blocking calls; the agent runs them on tokio's blocking pool.
//! [`conformance`] holds the suite every implementation of each trait passes.

use std::path::PathBuf;

#[cfg(any(test, feature = "conformance"))]
pub mod conformance;
pub mod disk;
pub mod events;
pub mod fake;
pub mod libvirt;
pub mod qmp;
pub mod xml;

use std::path::Path;

use stratus_api_types::compute::HypervisorType;

pub use disk::{ConfigDrive, DiskError};

/// A guest as the agent wants it defined.
#[derive(Debug, Clone, PartialEq)]
pub struct DomainSpec {
    /// libvirt domain name (`stratus-<server uid>`).
    pub name: String,
    /// libvirt domain UUID (the Server's uid).
    pub uuid: String,
    /// Virtual CPUs.
    pub vcpus: u32,
    /// Memory in MiB.
    pub memory_mib: u64,
    /// Direct kernel boot, when the image has a kernel (and ramdisk).
    pub kernel: Option<KernelBoot>,
    /// Disks in guest order: the root disk first (`vda`), then the config drive.
    pub disks: Vec<DiskSpec>,
    /// Where the serial console is logged.
    pub console_log: PathBuf,
    /// Network interfaces in guest order: one per Port of the Server.
    pub interfaces: Vec<InterfaceSpec>,
    /// The Server the guest belongs to, recorded in the domain's metadata.
    pub owner: Owner,
}

/// Who fills in the checksums of what a guest sends: QEMU's virtio-net offers the guest its
/// checksum and segmentation offloads (the host, the default), or not (the guest itself).
///
/// On a node whose networks are Open vSwitch's userspace datapath (`--datapath ovs`) the
/// guest fills them in: that switch (3.1) reads a tap's frames with their virtio-net
/// header, and drops each one that leaves its checksum to the host on the way into a
/// VXLAN tunnel ("Tunneling packets with HW offload flags is not supported"), so a guest's
/// TCP to another node or through a router on another node would never arrive.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum TxChecksums {
    /// The guest leaves them to the host (virtio-net's `csum`, TSO and the rest on).
    #[default]
    Host,
    /// The guest computes them (`<driver><host csum='off' …/></driver>`).
    Guest,
}

/// One network interface of a guest: a Port, plugged in as a tap device on the host that the
/// node's network agent puts on its network's bridge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InterfaceSpec {
    /// The Port's MAC address (`aa:bb:cc:dd:ee:ff`).
    pub mac: String,
    /// The host's tap device (the Port's `status.interfaceName`), made by the hypervisor.
    pub tap: String,
    /// The network's MTU, when it is known.
    pub mtu: Option<u32>,
}

impl InterfaceSpec {
    /// Checks what the hypervisor is handed: a unicast MAC address of six colon-separated
    /// hex bytes, and a tap name the kernel accepts (1 to 15 bytes of `[A-Za-z0-9_.-]`, not
    /// starting with `-` or `.`).
    ///
    /// # Errors
    /// [`DriverError::InvalidSpec`] naming what is wrong.
    pub fn check(&self) -> Result<(), DriverError> {
        let bytes: Vec<&str> = self.mac.split(':').collect();
        let mac_ok = bytes.len() == 6
            && bytes
                .iter()
                .all(|b| b.len() == 2 && b.bytes().all(|c| c.is_ascii_hexdigit()))
            && u8::from_str_radix(bytes[0], 16).is_ok_and(|b| b & 1 == 0);
        if !mac_ok {
            return Err(DriverError::InvalidSpec(format!(
                "MAC address {:?} is not a unicast address of six hex bytes",
                self.mac
            )));
        }
        let tap_ok = !self.tap.is_empty()
            && self.tap.len() <= 15
            && !self.tap.starts_with(['-', '.'])
            && self
                .tap
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
        if !tap_ok {
            return Err(DriverError::InvalidSpec(format!(
                "tap device name {:?} is not an interface name",
                self.tap
            )));
        }
        Ok(())
    }
}

/// Checks every interface of `spec` ([`InterfaceSpec::check`]) and that no two share a tap
/// device or a MAC address.
///
/// # Errors
/// [`DriverError::InvalidSpec`] naming what is wrong.
pub fn check_interfaces(spec: &DomainSpec) -> Result<(), DriverError> {
    for (i, nic) in spec.interfaces.iter().enumerate() {
        nic.check()?;
        let earlier = &spec.interfaces[..i];
        if earlier.iter().any(|e| e.tap == nic.tap) {
            return Err(DriverError::InvalidSpec(format!(
                "tap device {} is used twice",
                nic.tap
            )));
        }
        if earlier.iter().any(|e| e.mac.eq_ignore_ascii_case(&nic.mac)) {
            return Err(DriverError::InvalidSpec(format!(
                "MAC address {} is used twice",
                nic.mac
            )));
        }
    }
    Ok(())
}

/// Kernel, initramfs and command line for direct kernel boot.
#[derive(Debug, Clone, PartialEq)]
pub struct KernelBoot {
    /// The kernel file.
    pub kernel: PathBuf,
    /// The initramfs file.
    pub initrd: Option<PathBuf>,
    /// The kernel command line.
    pub cmdline: String,
}

/// One disk of a guest.
#[derive(Debug, Clone, PartialEq)]
pub struct DiskSpec {
    /// The file on the host.
    pub path: PathBuf,
    /// Its format.
    pub format: DiskFormat,
    /// Read-only (the config drive).
    pub readonly: bool,
    /// The image this disk is an overlay of, written into the domain XML so that QEMU
    /// follows no backing chain named in the disk's own metadata; `None`: the disk stands
    /// alone (and the XML says so).
    pub backing: Option<Backing>,
}

/// The base image under an overlay disk.
#[derive(Debug, Clone, PartialEq)]
pub struct Backing {
    /// The base image file (self-contained: checked when it was cached).
    pub path: PathBuf,
    /// Its format.
    pub format: DiskFormat,
}

/// Formats of disk files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskFormat {
    /// qcow2.
    Qcow2,
    /// raw (also ISO images).
    Raw,
}

/// A Volume attached to a guest as a virtio disk after its root disk and config drive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeDisk {
    /// The volume's data on this node (its `status.devicePath`): a block device under
    /// `/dev/` (`<disk type='block'>`) or a raw file (`<disk type='file'>`); or the NBD
    /// export of a volume of another node, `nbd://HOST:PORT/NAME` (`<disk type='network'>`,
    /// see [`xml::nbd_path`]).
    pub path: PathBuf,
    /// The guest disk name asked for (`vdc`, …); the guest names disks in the order their
    /// devices appear, so the serial, not this, is what identifies the volume inside it.
    pub target: String,
    /// What the guest sees as the disk's serial (`/dev/disk/by-id/virtio-<serial>`): the
    /// Volume's uid, cut to the 20 bytes virtio carries.
    pub serial: String,
    /// Whether other guests may have the volume too (a multi-attach volume): written as
    /// `<shareable/>` with `cache='none'`, so that QEMU takes no exclusive lock of it
    /// (`share-rw`) and caches none of its data in this host's page cache.
    pub shareable: bool,
}

/// A disk attached to a domain other than its root disk and config drive, as read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttachedVolume {
    /// Its guest disk name (`vdc`, …).
    pub target: String,
    /// Its data on the host.
    pub path: PathBuf,
    /// Its serial, when it has one.
    pub serial: Option<String>,
    /// The size the guest sees, in bytes, when the domain runs (`None` while it is off).
    pub capacity: Option<u64>,
}

/// A network interface of a domain, as read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttachedInterface {
    /// Its MAC address, as libvirt writes it (lower-case).
    pub mac: String,
    /// Its host device (`<target dev=…>`), when one is named.
    pub tap: Option<String>,
    /// Its MTU, when one is set.
    pub mtu: Option<u32>,
}

impl AttachedInterface {
    /// Whether this is the interface `nic` asks for: the same MAC (in any case) and tap
    /// device. (The MTU is the network's, fixed while the guest runs.)
    pub fn is(&self, nic: &InterfaceSpec) -> bool {
        self.mac.eq_ignore_ascii_case(&nic.mac) && self.tap.as_deref() == Some(nic.tap.as_str())
    }
}

/// The Server a domain belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    /// Namespace (project).
    pub namespace: String,
    /// Name.
    pub name: String,
    /// uid.
    pub uid: String,
}

/// State of a domain, as libvirt reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DomainState {
    /// Running (or blocked, idle: the guest is up).
    Running,
    /// Paused by the hypervisor.
    Paused,
    /// Being shut down.
    ShuttingDown,
    /// Shut off (defined, not running).
    Shutoff,
    /// Crashed.
    Crashed,
    /// Anything else libvirt reports.
    Other,
}

/// A domain on the hypervisor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainInfo {
    /// libvirt domain name.
    pub name: String,
    /// libvirt domain UUID.
    pub uuid: String,
    /// Current state.
    pub state: DomainState,
    /// The Server recorded in its metadata; `None` for a domain Stratus did not create.
    pub owner: Option<Owner>,
}

/// What the node offers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    /// Logical CPUs.
    pub cpus: u32,
    /// Memory in MiB.
    pub memory_mib: u64,
    /// Hypervisor name and version, e.g. `QEMU 7.2.0 (TCG)`.
    pub hypervisor_version: String,
}

/// Failures of a hypervisor call.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    /// libvirt refused or failed the call.
    #[error("libvirt: {0}")]
    Libvirt(String),
    /// The domain does not exist.
    #[error("no domain {0}")]
    NoDomain(String),
    /// The call needs a running domain and this one is off.
    #[error("domain {0} is not running")]
    NotRunning(String),
    /// The call needs a stopped domain and this one is running.
    #[error("domain {0} is running")]
    Active(String),
    /// The spec cannot be turned into a domain definition.
    #[error("invalid domain spec: {0}")]
    InvalidSpec(String),
}

/// The guest name of a domain's root disk (its first).
pub const ROOT_DISK: &str = "vda";

/// A hypervisor's domains: libvirt (QEMU or the `test:///` driver), or [`fake::FakeDomains`].
///
/// # Guarantees (every implementation; [`conformance::domain_driver`] checks them)
///
/// Verbs whose goal already holds succeed: `start` of a running domain, `shutdown` and
/// `destroy` of a stopped one, `undefine` of a missing one are `Ok(())`. `undefine` of a
/// running domain is [`DriverError::Active`]; `reboot` and `reset` of a stopped one are
/// [`DriverError::NotRunning`]; every other verb on a missing domain is
/// [`DriverError::NoDomain`] (`lookup` says `Ok(None)`). Only names starting with `stratus-`
/// are defined ([`DriverError::InvalidSpec`] otherwise) or listed, and only with interfaces
/// that pass [`check_interfaces`] ([`DriverError::InvalidSpec`] otherwise).
pub trait DomainDriver: Send + Sync + 'static {
    /// The hypervisor type the node registers as: what this driver really runs.
    fn hypervisor_type(&self) -> HypervisorType;
    /// What the node offers.
    fn node_info(&self) -> Result<NodeInfo, DriverError>;
    /// Every domain (defined or running) whose name starts with `stratus-`.
    fn list(&self) -> Result<Vec<DomainInfo>, DriverError>;
    /// One domain by name.
    fn lookup(&self, name: &str) -> Result<Option<DomainInfo>, DriverError>;
    /// Defines (or redefines) a persistent domain; does not start it.
    fn define(&self, spec: &DomainSpec) -> Result<(), DriverError>;
    /// Starts a defined domain.
    fn start(&self, name: &str) -> Result<(), DriverError>;
    /// Asks the guest to shut down (ACPI power button).
    fn shutdown(&self, name: &str) -> Result<(), DriverError>;
    /// Powers the domain off at once.
    fn destroy(&self, name: &str) -> Result<(), DriverError>;
    /// Removes the domain's definition (it must not be running).
    fn undefine(&self, name: &str) -> Result<(), DriverError>;
    /// Asks the guest to reboot (ACPI).
    fn reboot(&self, name: &str) -> Result<(), DriverError>;
    /// Resets the domain (power cycle without asking the guest).
    fn reset(&self, name: &str) -> Result<(), DriverError>;
    /// Where the domain's definition (not the running guest) has its root disk (`vda`) read
    /// its data: a file, or an NBD export (see [`crate::compute::volumes`]); `None` for a
    /// definition without one.
    fn defined_root(&self, name: &str) -> Result<Option<std::path::PathBuf>, DriverError>;
    /// The volumes attached to a domain (every disk but `vda` and `vdb`): as the running
    /// guest has them, with the size it sees; as defined, for a domain that is off.
    fn volumes(&self, name: &str) -> Result<Vec<AttachedVolume>, DriverError>;
    /// The domain's root disk (`vda`), as [`DomainDriver::volumes`] tells a volume: where
    /// the running guest reads it (the export its disk was moved to, for one moved by
    /// [`DomainDriver::move_volume`]) and the size it sees; as defined, for a domain that is
    /// off. `None` for a domain without one.
    fn root_volume(&self, name: &str) -> Result<Option<AttachedVolume>, DriverError>;
    /// Attaches a volume: to the definition, and to the running guest when it runs (hot-plug).
    /// A disk of the same path already attached is `Ok(())`.
    fn attach_volume(&self, name: &str, disk: &VolumeDisk) -> Result<(), DriverError>;
    /// Detaches the disk at guest name `target`: from the definition, and from the running
    /// guest (an unplug request the guest completes; [`DomainDriver::volumes`] shows it until
    /// then). A target with no disk is `Ok(())`.
    fn detach_volume(&self, name: &str, target: &str) -> Result<(), DriverError>;
    /// Tells the running guest that the disk at `target` is now `bytes` long (after its
    /// volume grew). [`DriverError::NotRunning`] for a domain that is off.
    fn resize_volume(&self, name: &str, target: &str, bytes: u64) -> Result<(), DriverError>;
    /// Moves the running guest's NBD disk at `disk.target` to the export `disk.path` names
    /// (its volume served anew by its storage node, at the size it grew to: an export keeps
    /// the size it opened with) and tells the guest the new size; the domain's definition
    /// then names that export. A move cut short is finished; one done is `Ok(())`.
    /// [`DriverError::NotRunning`] for a domain that is off.
    fn move_volume(&self, name: &str, disk: &VolumeDisk) -> Result<(), DriverError>;
    /// The network interfaces of a domain, in guest order: as the running guest has them; as
    /// defined, for a domain that is off.
    fn interfaces(&self, name: &str) -> Result<Vec<AttachedInterface>, DriverError>;
    /// Attaches interface `nic` (checked with [`InterfaceSpec::check`]): to the definition,
    /// and to the running guest when it runs (hot-plug), each where no interface of its MAC
    /// is yet, so an interface already there is `Ok(())`.
    fn attach_interface(&self, name: &str, nic: &InterfaceSpec) -> Result<(), DriverError>;
    /// Detaches the interface of MAC `mac` (in any case): from the definition, and from the
    /// running guest (an unplug request the guest completes; [`DomainDriver::interfaces`]
    /// shows it until then). A MAC with no interface is `Ok(())`.
    fn detach_interface(&self, name: &str, mac: &str) -> Result<(), DriverError>;
    /// From now on, sends the name of every domain whose lifecycle changes (defined,
    /// started, stopped, crashed, undefined …) or that gains or loses a device while it runs
    /// (a hot-plug, an unplug completed, one done behind Stratus's back) to `tx`, until the
    /// driver is dropped.
    fn subscribe(&self, tx: tokio::sync::mpsc::UnboundedSender<String>) -> Result<(), DriverError>;
}

/// What a disk file is, as read back from where it lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskInfo {
    /// The size the guest sees, in bytes.
    pub virtual_size: u64,
    /// The image it is an overlay of, if any.
    pub backing: Option<std::path::PathBuf>,
}

/// The node's guest disks: a root disk layered over a cached image, and a config drive, per
/// guest, in the guest's own directory. [`disk::HostDisks`] (qemu-img, genisoimage) or
/// [`fake::MemoryDisks`].
///
/// # Guarantees (every implementation; [`conformance::disks`] checks them)
///
/// - `root_disk` of an absent path makes an overlay of `base` of at least `size_gib`; of a
///   present one grows it to `size_gib` and never shrinks it or loses what it holds, unless
///   `fresh` asks for a new overlay in its place. The parent directory is made as needed.
/// - `config_drive` replaces what was at its path in one step.
/// - `remove_dir` of an absent directory is `Ok(())`.
pub trait Disks: Send + Sync + 'static {
    /// Makes `path` the root disk over `base` (see the guarantees).
    fn root_disk(
        &self,
        base: &Path,
        base_format: DiskFormat,
        path: &Path,
        size_gib: u64,
        fresh: bool,
    ) -> Result<(), DiskError>;
    /// Writes `drive` as the config drive at `path`.
    fn config_drive(&self, path: &Path, drive: &ConfigDrive) -> Result<(), DiskError>;
    /// What is at `path`; `None` when nothing is.
    fn inspect(&self, path: &Path) -> Result<Option<DiskInfo>, DiskError>;
    /// Removes a guest's directory and every disk in it.
    fn remove_dir(&self, dir: &Path) -> Result<(), DiskError>;
}
