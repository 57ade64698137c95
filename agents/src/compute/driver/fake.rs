//! In-memory doubles of the compute driver: [`FakeDomains`] for [`DomainDriver`] and
//! [`MemoryDisks`] for [`Disks`], each with failure injection, for tests of everything above
//! the driver without a host. They pass the same [`conformance`](super::conformance) suites
//! as libvirt and the host's disks.
//!
//! `MemoryDisks` also serves nodes on libvirt's `test:///` driver (scale runs), whose
//! domains never open a disk.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use stratus_api_types::compute::HypervisorType;

use super::libvirt::NAME_PREFIX;
use super::{
    AttachedInterface, AttachedVolume, ConfigDrive, DiskError, DiskFormat, DiskInfo, Disks,
    DomainDriver, DomainInfo, DomainSpec, DomainState, DriverError, InterfaceSpec, NodeInfo,
    ROOT_DISK, VolumeDisk,
};

/// The verbs of [`DomainDriver`] and [`Disks`], to name the one a failure is injected into.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Verb {
    /// [`DomainDriver::list`].
    List,
    /// [`DomainDriver::lookup`].
    Lookup,
    /// [`DomainDriver::define`].
    Define,
    /// [`DomainDriver::start`].
    Start,
    /// [`DomainDriver::shutdown`].
    Shutdown,
    /// [`DomainDriver::destroy`].
    Destroy,
    /// [`DomainDriver::undefine`].
    Undefine,
    /// [`DomainDriver::reboot`] and [`DomainDriver::reset`].
    Reboot,
    /// [`DomainDriver::attach_volume`], [`DomainDriver::detach_volume`] and
    /// [`DomainDriver::resize_volume`].
    Volume,
    /// [`DomainDriver::attach_interface`] and [`DomainDriver::detach_interface`].
    Interface,
    /// [`Disks::root_disk`].
    RootDisk,
    /// [`Disks::config_drive`].
    ConfigDrive,
    /// [`Disks::remove_dir`].
    RemoveDir,
}

/// Failures to inject: each verb fails its next `n` calls.
#[derive(Debug, Default)]
struct Failures(Mutex<HashMap<Verb, u32>>);

impl Failures {
    fn set(&self, verb: Verb, times: u32) {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(verb, times);
    }

    fn left(&self, verb: Verb) -> u32 {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&verb)
            .copied()
            .unwrap_or(0)
    }

    /// Whether this call of `verb` fails (counting it down).
    fn take(&self, verb: Verb) -> bool {
        let mut m = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match m.get_mut(&verb) {
            Some(n) if *n > 0 => {
                *n -= 1;
                true
            }
            _ => false,
        }
    }
}

#[derive(Debug, Clone)]
struct Domain {
    spec: DomainSpec,
    state: DomainState,
    /// Volumes attached, with the size the guest sees (the file's size at attach, for a path
    /// that is a file; 0 otherwise) until a resize.
    volumes: Vec<AttachedVolume>,
    /// Network interfaces, in guest order (the guest and its definition alike).
    interfaces: Vec<AttachedInterface>,
    /// The size the running guest sees of its root disk, once told by a resize or a move.
    root_capacity: Option<u64>,
}

fn attached(nic: &InterfaceSpec) -> AttachedInterface {
    AttachedInterface {
        mac: nic.mac.to_ascii_lowercase(),
        tap: Some(nic.tap.clone()),
        mtu: nic.mtu,
    }
}

/// A hypervisor in memory: domains are records, power verbs change their state at once (a
/// guest that always obeys ACPI), and every change is announced to subscribers.
#[derive(Debug)]
pub struct FakeDomains {
    node: NodeInfo,
    domains: Mutex<BTreeMap<String, Domain>>,
    subscribers: Mutex<Vec<tokio::sync::mpsc::UnboundedSender<String>>>,
    failures: Failures,
}

impl Default for FakeDomains {
    fn default() -> Self {
        Self::new(NodeInfo {
            cpus: 8,
            memory_mib: 16384,
            hypervisor_version: "FAKE 1.0.0 (memory)".into(),
        })
    }
}

impl FakeDomains {
    /// A fake hypervisor offering `node`.
    pub fn new(node: NodeInfo) -> Self {
        Self {
            node,
            domains: Mutex::default(),
            subscribers: Mutex::default(),
            failures: Failures::default(),
        }
    }

    /// Makes the next `times` calls of `verb` fail with [`DriverError::Libvirt`].
    pub fn fail(&self, verb: Verb, times: u32) {
        self.failures.set(verb, times);
    }

    /// How many injected failures of `verb` are still to come.
    pub fn failures_left(&self, verb: Verb) -> u32 {
        self.failures.left(verb)
    }

    /// What a domain was last defined as.
    pub fn spec(&self, name: &str) -> Option<DomainSpec> {
        self.lock().get(name).map(|d| d.spec.clone())
    }

    /// Changes a domain's state behind the driver's back (a guest that crashes or powers
    /// itself off, an operator's `virsh destroy`), announcing it as libvirt would.
    pub fn set_state(&self, name: &str, state: DomainState) {
        if let Some(d) = self.lock().get_mut(name) {
            d.state = state;
        }
        self.announce(name);
    }

    /// Plugs an interface into a domain behind the driver's back (`virsh attach-interface`).
    pub fn plug(&self, name: &str, nic: AttachedInterface) {
        if let Some(d) = self.lock().get_mut(name) {
            d.interfaces.push(nic);
        }
        self.announce(name);
    }

    /// Unplugs the interface of MAC `mac` behind the driver's back (`virsh
    /// detach-interface`).
    pub fn unplug(&self, name: &str, mac: &str) {
        if let Some(d) = self.lock().get_mut(name) {
            d.interfaces.retain(|i| !i.mac.eq_ignore_ascii_case(mac));
        }
        self.announce(name);
    }

    /// Removes a domain behind the driver's back (`virsh undefine`).
    pub fn remove(&self, name: &str) {
        self.lock().remove(name);
        self.announce(name);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Domain>> {
        self.domains
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn announce(&self, name: &str) {
        self.subscribers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .retain(|tx| tx.send(name.to_owned()).is_ok());
    }

    fn injected(&self, verb: Verb) -> Result<(), DriverError> {
        if self.failures.take(verb) {
            Err(DriverError::Libvirt(format!(
                "injected failure of {verb:?}"
            )))
        } else {
            Ok(())
        }
    }

    /// Changes the state of a running domain for a power verb: `Err(NotRunning)` if it is off.
    fn power(&self, verb: Verb, name: &str, to: Option<DomainState>) -> Result<(), DriverError> {
        self.injected(verb)?;
        {
            let mut domains = self.lock();
            let d = domains
                .get_mut(name)
                .ok_or_else(|| DriverError::NoDomain(name.to_owned()))?;
            if d.state != DomainState::Running {
                return match to {
                    // Already where a stop would take it.
                    Some(DomainState::Shutoff) => Ok(()),
                    _ => Err(DriverError::NotRunning(name.to_owned())),
                };
            }
            if let Some(to) = to {
                d.state = to;
            }
        }
        self.announce(name);
        Ok(())
    }

    fn info(name: &str, d: &Domain) -> DomainInfo {
        DomainInfo {
            name: name.to_owned(),
            uuid: d.spec.uuid.clone(),
            state: d.state,
            owner: Some(d.spec.owner.clone()),
        }
    }
}

impl FakeDomains {
    /// Changes the disk at `target` of running domain `name` with `change`.
    fn running_disk(
        &self,
        name: &str,
        target: &str,
        change: impl FnOnce(&mut AttachedVolume),
    ) -> Result<(), DriverError> {
        self.injected(Verb::Volume)?;
        let mut domains = self.lock();
        let d = domains
            .get_mut(name)
            .ok_or_else(|| DriverError::NoDomain(name.to_owned()))?;
        if d.state != DomainState::Running {
            return Err(DriverError::NotRunning(name.to_owned()));
        }
        if target == ROOT_DISK {
            // The root disk is the definition's first: changed there, as libvirt's
            // definition follows a move.
            let root = d
                .spec
                .disks
                .first_mut()
                .ok_or_else(|| DriverError::Libvirt(format!("no disk {target}")))?;
            let mut v = AttachedVolume {
                target: ROOT_DISK.into(),
                path: root.path.clone(),
                serial: None,
                capacity: d.root_capacity,
            };
            change(&mut v);
            root.path = v.path;
            d.root_capacity = v.capacity;
            return Ok(());
        }
        let v = d
            .volumes
            .iter_mut()
            .find(|v| v.target == target)
            .ok_or_else(|| DriverError::Libvirt(format!("no disk {target}")))?;
        change(v);
        Ok(())
    }
}

impl DomainDriver for FakeDomains {
    fn hypervisor_type(&self) -> HypervisorType {
        HypervisorType::Test
    }

    fn node_info(&self) -> Result<NodeInfo, DriverError> {
        Ok(self.node.clone())
    }

    fn list(&self) -> Result<Vec<DomainInfo>, DriverError> {
        self.injected(Verb::List)?;
        Ok(self
            .lock()
            .iter()
            .map(|(name, d)| Self::info(name, d))
            .collect())
    }

    fn lookup(&self, name: &str) -> Result<Option<DomainInfo>, DriverError> {
        self.injected(Verb::Lookup)?;
        if name.contains('\0') {
            return Err(DriverError::Libvirt("name contains a NUL byte".into()));
        }
        Ok(self.lock().get(name).map(|d| Self::info(name, d)))
    }

    fn define(&self, spec: &DomainSpec) -> Result<(), DriverError> {
        self.injected(Verb::Define)?;
        if !spec.name.starts_with(NAME_PREFIX) {
            return Err(DriverError::InvalidSpec(format!(
                "domain name {:?} does not start with {NAME_PREFIX:?}",
                spec.name
            )));
        }
        super::check_interfaces(spec)?;
        // A definition replaces the old one whole, volumes attached to it included.
        self.lock()
            .entry(spec.name.clone())
            .and_modify(|d| {
                d.spec = spec.clone();
                d.volumes.clear();
                d.interfaces = spec.interfaces.iter().map(attached).collect();
                d.root_capacity = None;
            })
            .or_insert_with(|| Domain {
                spec: spec.clone(),
                state: DomainState::Shutoff,
                volumes: Vec::new(),
                interfaces: spec.interfaces.iter().map(attached).collect(),
                root_capacity: None,
            });
        self.announce(&spec.name);
        Ok(())
    }

    fn start(&self, name: &str) -> Result<(), DriverError> {
        self.injected(Verb::Start)?;
        {
            let mut domains = self.lock();
            let d = domains
                .get_mut(name)
                .ok_or_else(|| DriverError::NoDomain(name.to_owned()))?;
            if d.state == DomainState::Running {
                return Ok(());
            }
            d.state = DomainState::Running;
        }
        self.announce(name);
        Ok(())
    }

    fn shutdown(&self, name: &str) -> Result<(), DriverError> {
        self.power(Verb::Shutdown, name, Some(DomainState::Shutoff))
    }

    fn destroy(&self, name: &str) -> Result<(), DriverError> {
        self.power(Verb::Destroy, name, Some(DomainState::Shutoff))
    }

    fn undefine(&self, name: &str) -> Result<(), DriverError> {
        self.injected(Verb::Undefine)?;
        {
            let mut domains = self.lock();
            match domains.get(name) {
                None => return Ok(()),
                Some(d) if d.state == DomainState::Running => {
                    return Err(DriverError::Active(name.to_owned()));
                }
                Some(_) => {
                    domains.remove(name);
                }
            }
        }
        self.announce(name);
        Ok(())
    }

    fn reboot(&self, name: &str) -> Result<(), DriverError> {
        self.power(Verb::Reboot, name, None)
    }

    fn reset(&self, name: &str) -> Result<(), DriverError> {
        self.power(Verb::Reboot, name, None)
    }

    fn defined_root(&self, name: &str) -> Result<Option<std::path::PathBuf>, DriverError> {
        let domains = self.lock();
        let d = domains
            .get(name)
            .ok_or_else(|| DriverError::NoDomain(name.to_owned()))?;
        Ok(d.spec.disks.first().map(|r| r.path.clone()))
    }

    fn volumes(&self, name: &str) -> Result<Vec<AttachedVolume>, DriverError> {
        let domains = self.lock();
        let d = domains
            .get(name)
            .ok_or_else(|| DriverError::NoDomain(name.to_owned()))?;
        let running = d.state == DomainState::Running;
        Ok(d.volumes
            .iter()
            .map(|v| AttachedVolume {
                capacity: v.capacity.filter(|_| running),
                ..v.clone()
            })
            .collect())
    }

    fn root_volume(&self, name: &str) -> Result<Option<AttachedVolume>, DriverError> {
        let domains = self.lock();
        let d = domains
            .get(name)
            .ok_or_else(|| DriverError::NoDomain(name.to_owned()))?;
        let running = d.state == DomainState::Running;
        Ok(d.spec.disks.first().map(|r| AttachedVolume {
            target: ROOT_DISK.into(),
            path: r.path.clone(),
            serial: None,
            capacity: d.root_capacity.filter(|_| running),
        }))
    }

    fn attach_volume(&self, name: &str, disk: &VolumeDisk) -> Result<(), DriverError> {
        self.injected(Verb::Volume)?;
        let mut domains = self.lock();
        let d = domains
            .get_mut(name)
            .ok_or_else(|| DriverError::NoDomain(name.to_owned()))?;
        if d.volumes.iter().any(|v| v.path == disk.path) {
            return Ok(());
        }
        if d.volumes.iter().any(|v| v.target == disk.target) {
            return Err(DriverError::Libvirt(format!(
                "target {} already exists",
                disk.target
            )));
        }
        d.volumes.push(AttachedVolume {
            target: disk.target.clone(),
            path: disk.path.clone(),
            serial: Some(disk.serial.clone()),
            capacity: Some(std::fs::metadata(&disk.path).map_or(0, |m| m.len())),
        });
        Ok(())
    }

    fn detach_volume(&self, name: &str, target: &str) -> Result<(), DriverError> {
        self.injected(Verb::Volume)?;
        let mut domains = self.lock();
        let d = domains
            .get_mut(name)
            .ok_or_else(|| DriverError::NoDomain(name.to_owned()))?;
        d.volumes.retain(|v| v.target != target);
        Ok(())
    }

    fn resize_volume(&self, name: &str, target: &str, bytes: u64) -> Result<(), DriverError> {
        self.running_disk(name, target, |v| v.capacity = Some(bytes))
    }

    fn move_volume(&self, name: &str, disk: &VolumeDisk) -> Result<(), DriverError> {
        self.running_disk(name, &disk.target, |v| v.path = disk.path.clone())
    }

    fn interfaces(&self, name: &str) -> Result<Vec<AttachedInterface>, DriverError> {
        self.lock()
            .get(name)
            .map(|d| d.interfaces.clone())
            .ok_or_else(|| DriverError::NoDomain(name.to_owned()))
    }

    fn attach_interface(&self, name: &str, nic: &InterfaceSpec) -> Result<(), DriverError> {
        self.injected(Verb::Interface)?;
        nic.check()?;
        let mut domains = self.lock();
        let d = domains
            .get_mut(name)
            .ok_or_else(|| DriverError::NoDomain(name.to_owned()))?;
        if !d
            .interfaces
            .iter()
            .any(|i| i.mac.eq_ignore_ascii_case(&nic.mac))
        {
            d.interfaces.push(attached(nic));
        }
        Ok(())
    }

    fn detach_interface(&self, name: &str, mac: &str) -> Result<(), DriverError> {
        self.injected(Verb::Interface)?;
        let mut domains = self.lock();
        let d = domains
            .get_mut(name)
            .ok_or_else(|| DriverError::NoDomain(name.to_owned()))?;
        d.interfaces.retain(|i| !i.mac.eq_ignore_ascii_case(mac));
        Ok(())
    }

    fn subscribe(&self, tx: tokio::sync::mpsc::UnboundedSender<String>) -> Result<(), DriverError> {
        self.subscribers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(tx);
        Ok(())
    }
}

/// One disk in memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemoryDisk {
    /// A root disk: an overlay of `base`.
    Root {
        /// The image it layers over.
        base: PathBuf,
        /// Its size in GiB.
        size_gib: u64,
        /// Which overlay this is: a fresh one gets a new number, so a test sees whether the
        /// guest's data was kept.
        generation: u64,
    },
    /// A config drive.
    ConfigDrive {
        /// Its `instance-id`.
        instance_id: String,
        /// Its `local-hostname`.
        hostname: String,
        /// Its SSH keys.
        public_keys: Vec<String>,
        /// Its user data.
        user_data: Option<Vec<u8>>,
        /// Its `network-config`.
        network_config: Option<serde_json::Value>,
    },
}

/// Disks in memory, keyed by path.
#[derive(Debug, Default)]
pub struct MemoryDisks {
    disks: Mutex<BTreeMap<PathBuf, MemoryDisk>>,
    made: std::sync::atomic::AtomicU64,
    failures: Failures,
}

impl MemoryDisks {
    /// Makes the next `times` calls of `verb` fail.
    pub fn fail(&self, verb: Verb, times: u32) {
        self.failures.set(verb, times);
    }

    /// The disk at `path`.
    pub fn get(&self, path: &Path) -> Option<MemoryDisk> {
        self.lock().get(path).cloned()
    }

    /// Every disk's path.
    pub fn paths(&self) -> Vec<PathBuf> {
        self.lock().keys().cloned().collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<PathBuf, MemoryDisk>> {
        self.disks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn injected(&self, verb: Verb, path: &Path) -> Result<(), DiskError> {
        if self.failures.take(verb) {
            Err(DiskError::Io {
                op: "write",
                path: path.to_owned(),
                source: std::io::Error::other(format!("injected failure of {verb:?}")),
            })
        } else {
            Ok(())
        }
    }
}

impl Disks for MemoryDisks {
    fn root_disk(
        &self,
        base: &Path,
        _base_format: DiskFormat,
        path: &Path,
        size_gib: u64,
        fresh: bool,
    ) -> Result<(), DiskError> {
        self.injected(Verb::RootDisk, path)?;
        let mut disks = self.lock();
        match disks.get_mut(path) {
            Some(MemoryDisk::Root { size_gib: s, .. }) if !fresh => {
                *s = (*s).max(size_gib);
            }
            _ => {
                let generation = self.made.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                disks.insert(
                    path.to_owned(),
                    MemoryDisk::Root {
                        base: base.to_owned(),
                        size_gib,
                        generation,
                    },
                );
            }
        }
        Ok(())
    }

    fn config_drive(&self, path: &Path, drive: &ConfigDrive) -> Result<(), DiskError> {
        self.injected(Verb::ConfigDrive, path)?;
        self.lock().insert(
            path.to_owned(),
            MemoryDisk::ConfigDrive {
                instance_id: drive.instance_id.to_owned(),
                hostname: drive.hostname.to_owned(),
                public_keys: drive.public_keys.to_vec(),
                user_data: drive.user_data.map(<[u8]>::to_vec),
                network_config: drive.network_config.cloned(),
            },
        );
        Ok(())
    }

    fn inspect(&self, path: &Path) -> Result<Option<DiskInfo>, DiskError> {
        Ok(self.lock().get(path).map(|d| match d {
            MemoryDisk::Root { base, size_gib, .. } => DiskInfo {
                virtual_size: size_gib << 30,
                backing: Some(base.clone()),
            },
            MemoryDisk::ConfigDrive { .. } => DiskInfo {
                virtual_size: 0,
                backing: None,
            },
        }))
    }

    fn remove_dir(&self, dir: &Path) -> Result<(), DiskError> {
        self.injected(Verb::RemoveDir, dir)?;
        self.lock().retain(|p, _| !p.starts_with(dir));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::conformance;
    use super::*;

    #[test]
    fn fake_domains_pass_the_domain_driver_suite() {
        let d = FakeDomains::default();
        let dir = Path::new("/nonexistent/fake");
        conformance::domain_driver(
            &d,
            &conformance::spec(
                "stratus-fake-1",
                "0b2f0c4e-0000-4000-8000-000000000001",
                dir,
            ),
        );
    }

    #[test]
    fn fake_domains_pass_the_volumes_suite() {
        let d = FakeDomains::default();
        let dir = Path::new("/nonexistent/fake");
        conformance::volumes(
            &d,
            &conformance::spec(
                "stratus-fake-2",
                "0b2f0c4e-0000-4000-8000-000000000002",
                dir,
            ),
            &dir.join("volume-x"),
        );
    }

    #[test]
    fn fake_domains_pass_the_interfaces_suite() {
        let d = FakeDomains::default();
        conformance::interfaces(
            &d,
            &conformance::spec(
                "stratus-fake-3",
                "0b2f0c4e-0000-4000-8000-000000000003",
                Path::new("/nonexistent/fake"),
            ),
        );
    }

    #[test]
    fn memory_disks_pass_the_disks_suite() {
        let d = MemoryDisks::default();
        conformance::disks(
            &d,
            Path::new("/images/base.img"),
            DiskFormat::Raw,
            Path::new("/state/servers"),
        );
    }

    #[test]
    fn injected_failures_fail_the_next_calls_only() {
        let d = FakeDomains::default();
        let spec = conformance::spec(
            "stratus-fake-2",
            "0b2f0c4e-0000-4000-8000-000000000002",
            Path::new("/x"),
        );
        d.fail(Verb::Define, 2);
        assert!(matches!(d.define(&spec), Err(DriverError::Libvirt(_))));
        assert!(matches!(d.define(&spec), Err(DriverError::Libvirt(_))));
        d.define(&spec).expect("the third define goes through");
        let disks = MemoryDisks::default();
        disks.fail(Verb::RootDisk, 1);
        let root = Path::new("/s/root.qcow2");
        assert!(
            disks
                .root_disk(Path::new("/b"), DiskFormat::Raw, root, 1, false)
                .is_err()
        );
        assert_eq!(disks.get(root), None, "a failed call leaves nothing");
        disks
            .root_disk(Path::new("/b"), DiskFormat::Raw, root, 1, false)
            .expect("then it works");
    }
}
