//! The [`DomainDriver`] over libvirt: QEMU (KVM or TCG) on a node, or the `test:///` driver.
//!
//! # Idempotence
//!
//! The agent retries after crashes and races with guests that power themselves off, so verbs
//! whose goal already holds succeed instead of failing:
//!
//! - [`start`](DomainDriver::start) of a running domain, [`shutdown`](DomainDriver::shutdown) and
//!   [`destroy`](DomainDriver::destroy) of a stopped one are `Ok(())`. The state is read *after*
//!   libvirt refuses the call, so a guest that stops between our look and the call is covered.
//! - [`undefine`](DomainDriver::undefine) of a domain that does not exist is `Ok(())`; of a running
//!   one it is [`DriverError::Active`] (libvirt would quietly turn it into a transient domain
//!   that vanishes at power-off, which is never what the agent means).
//! - [`reboot`](DomainDriver::reboot) and [`reset`](DomainDriver::reset) of a stopped domain are
//!   [`DriverError::NotRunning`]: nothing sensible can stand in for them.
//! - Every verb but `undefine` on a missing domain is [`DriverError::NoDomain`];
//!   [`lookup`](DomainDriver::lookup) says `Ok(None)`.

use std::path::Path;

use virt::connect::Connect;
use virt::domain::{Domain, DomainState as VirtState};
use virt::error::ErrorNumber;
use virt::sys;

use super::events;
use super::qmp;
use super::xml::{self, DomainKind, METADATA_NS};
use super::{
    AttachedInterface, AttachedVolume, DomainDriver, DomainInfo, DomainSpec, DomainState,
    DriverError, InterfaceSpec, NodeInfo, TxChecksums, VolumeDisk,
};
use stratus_api_types::compute::HypervisorType;

/// Names of the domains Stratus manages start with this.
pub const NAME_PREFIX: &str = "stratus-";

/// A connection to libvirt.
///
/// `virt::connect::Connect` is `Send + Sync` (libvirt connections are thread-safe), so one
/// `Libvirt` is shared by the agent's blocking tasks without a lock.
#[derive(Debug)]
pub struct Libvirt {
    conn: Connect,
    kind: DomainKind,
    tx_checksums: TxChecksums,
    events: std::sync::Mutex<Vec<events::Subscription>>,
}

impl Libvirt {
    /// Opens `uri` (`qemu:///system`, `test:///default`, …) and works out which domain type the
    /// node can run: `test` for the test driver, else KVM when libvirt offers it *and* the host
    /// really has hardware virtualisation, else QEMU's TCG.
    ///
    /// libvirt alone is not trusted for KVM: it reports KVM as soon as `/dev/kvm` opens and QEMU
    /// can create a VM there, which also holds for paravirtual stand-ins (e.g. PVM's `kvm_pvm`)
    /// that cannot run ordinary guests. For a local URI the CPU must also advertise `vmx` or
    /// `svm` in `/proc/cpuinfo`; for a remote URI libvirt's answer is all there is.
    ///
    /// # Errors
    ///
    /// [`DriverError::Libvirt`] when the connection cannot be opened.
    pub fn connect(uri: &str) -> Result<Self, DriverError> {
        let conn = open(uri)?;
        let kind = detect_kind(&conn);
        tracing::info!(uri, kind = ?kind, "connected to libvirt");
        Ok(Self {
            conn,
            kind,
            tx_checksums: TxChecksums::default(),
            events: std::sync::Mutex::default(),
        })
    }

    /// Opens `uri` and uses `kind` without probing, for operators who know better than the probe
    /// and for tests.
    ///
    /// # Errors
    ///
    /// [`DriverError::Libvirt`] when the connection cannot be opened.
    pub fn connect_as(uri: &str, kind: DomainKind) -> Result<Self, DriverError> {
        Ok(Self {
            conn: open(uri)?,
            kind,
            tx_checksums: TxChecksums::default(),
            events: std::sync::Mutex::default(),
        })
    }

    /// Who fills in the checksums of what the guests defined or given an interface from now
    /// on send ([`TxChecksums`]: the guests themselves on an Open vSwitch node).
    pub fn with_tx_checksums(mut self, tx: TxChecksums) -> Self {
        self.tx_checksums = tx;
        self
    }

    /// The domain type this connection defines.
    pub fn kind(&self) -> DomainKind {
        self.kind
    }

    /// The definition libvirt holds for domain `name` (its XML, as libvirt writes it back),
    /// or `None` when there is no such domain.
    ///
    /// # Errors
    /// [`DriverError::Libvirt`] when libvirt fails the call.
    pub fn defined_xml(&self, name: &str) -> Result<Option<String>, DriverError> {
        match self.domain(name)? {
            Some(d) => d
                .xml_desc(sys::VIR_DOMAIN_XML_INACTIVE)
                .map(Some)
                .map_err(libvirt),
            None => Ok(None),
        }
    }

    /// The domain called `name`, or `None`.
    fn domain(&self, name: &str) -> Result<Option<Domain>, DriverError> {
        match self.conn.lookup_domain_by_name(name) {
            Ok(domain) => Ok(Some(domain)),
            Err(e) if is(&e, ErrorNumber::NoDomain) => Ok(None),
            Err(e) => Err(libvirt(e)),
        }
    }

    /// The domain called `name`, or [`DriverError::NoDomain`].
    fn require(&self, name: &str) -> Result<Domain, DriverError> {
        self.domain(name)?
            .ok_or_else(|| DriverError::NoDomain(name.to_owned()))
    }

    /// Our view of `domain`; [`DriverError::NoDomain`] if it vanished meanwhile.
    fn describe(&self, domain: &Domain, name: &str) -> Result<DomainInfo, DriverError> {
        let gone = |e: virt::error::Error| {
            if is(&e, ErrorNumber::NoDomain) {
                DriverError::NoDomain(name.to_owned())
            } else {
                libvirt(e)
            }
        };
        let uuid = domain.uuid_string().map_err(gone)?;
        // `Domain::state` drops libvirt's error; `info` reports it.
        let state = map_state(domain.info().map_err(gone)?.state);
        let owner = match domain.metadata(
            sys::VIR_DOMAIN_METADATA_ELEMENT as i32,
            Some(METADATA_NS),
            0,
        ) {
            Ok(text) => match xml::parse_owner_metadata(&text) {
                Ok(owner) => Some(owner),
                Err(error) => {
                    tracing::warn!(domain = name, %error, "unreadable Stratus metadata");
                    None
                }
            },
            Err(e) if is(&e, ErrorNumber::NoDomainMetadata) => None,
            Err(e) => return Err(gone(e)),
        };
        Ok(DomainInfo {
            name: name.to_owned(),
            uuid,
            state,
            owner,
        })
    }

    /// The error for a refused power verb: [`DriverError::NotRunning`] if the domain is off.
    fn refused(&self, domain: &Domain, name: &str, e: virt::error::Error) -> DriverError {
        match domain.is_active() {
            Ok(false) => DriverError::NotRunning(name.to_owned()),
            _ => libvirt(e),
        }
    }

    /// `Ok` if `domain` is off after libvirt refused to stop it.
    fn stopped_anyway(&self, domain: &Domain, e: virt::error::Error) -> Result<(), DriverError> {
        match domain.is_active() {
            Ok(false) => Ok(()),
            Err(gone) if is(&gone, ErrorNumber::NoDomain) => Ok(()),
            _ => Err(libvirt(e)),
        }
    }

    /// Undefine also what libvirt keeps beside the definition; leftover saved state, snapshot
    /// or checkpoint metadata would make a plain undefine fail. The test driver rejects the
    /// checkpoint and NVRAM flags.
    fn undefine_flags(&self) -> u32 {
        let common =
            sys::VIR_DOMAIN_UNDEFINE_MANAGED_SAVE | sys::VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA;
        match self.kind {
            DomainKind::Test => common,
            DomainKind::Kvm | DomainKind::Qemu => {
                common
                    | sys::VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
                    | sys::VIR_DOMAIN_UNDEFINE_NVRAM
            }
        }
    }

    /// Makes the definition of the running `domain` (a persistent one) name `disk` at its
    /// target, once its guest reads it ([`DomainDriver::move_volume`]): started again, it
    /// connects to the export served now, not to the one its storage node ended.
    fn define_moved(
        &self,
        domain: &Domain,
        name: &str,
        disk: &VolumeDisk,
    ) -> Result<(), DriverError> {
        if !domain.is_persistent().map_err(libvirt)? {
            return Ok(());
        }
        let text = domain
            .xml_desc(sys::VIR_DOMAIN_XML_INACTIVE)
            .map_err(libvirt)?;
        let defined = xml::all_disks(&text)
            .map_err(|e| DriverError::Libvirt(format!("domain {name}'s XML: {e}")))?
            .into_iter()
            .find(|v| v.target == disk.target);
        let element = xml::volume_disk_xml(disk);
        match defined {
            Some(v) if v.path == disk.path => Ok(()),
            // The defined disk is given its new source in place: it keeps its PCI address,
            // so the guest finds its disks in the same order at its next boot (the root disk
            // first).
            Some(_) => domain
                .update_device_flags(&element, sys::VIR_DOMAIN_AFFECT_CONFIG)
                .map_err(libvirt),
            None => domain
                .attach_device_flags(&element, sys::VIR_DOMAIN_AFFECT_CONFIG)
                .map_err(libvirt),
        }
    }

    /// Domain `name`, whether it runs, and its XML: as it runs, or as defined when it is off.
    fn xml_now(&self, name: &str) -> Result<(Domain, bool, String), DriverError> {
        let domain = self.require(name)?;
        let running = domain.is_active().map_err(libvirt)?;
        let flags = if running {
            0
        } else {
            sys::VIR_DOMAIN_XML_INACTIVE
        };
        let text = domain.xml_desc(flags).map_err(libvirt)?;
        Ok((domain, running, text))
    }

    /// Where a device change goes: the definition, and the running guest when it runs.
    fn device_flags(&self, domain: &Domain) -> Result<u32, DriverError> {
        let running = domain.is_active().map_err(libvirt)?;
        Ok(sys::VIR_DOMAIN_AFFECT_CONFIG
            | if running {
                sys::VIR_DOMAIN_AFFECT_LIVE
            } else {
                0
            })
    }

    /// The interfaces of `domain` as it runs (`live`) or as it is defined.
    fn interfaces_of(
        &self,
        domain: &Domain,
        name: &str,
        live: bool,
    ) -> Result<Vec<AttachedInterface>, DriverError> {
        let flags = if live {
            0
        } else {
            sys::VIR_DOMAIN_XML_INACTIVE
        };
        let text = domain.xml_desc(flags).map_err(libvirt)?;
        xml::attached_interfaces(&text)
            .map_err(|e| DriverError::Libvirt(format!("domain {name}'s XML: {e}")))
    }

    /// The views of `domain` a device change goes to, one at a time: the running guest (when
    /// it runs), then the definition. Each is changed on its own, so that a guest and a
    /// definition that differ (a device unplugged from one behind Stratus's back) are each
    /// brought to the goal.
    fn device_views(&self, domain: &Domain) -> Result<Vec<(u32, bool)>, DriverError> {
        let mut views = Vec::new();
        if domain.is_active().map_err(libvirt)? {
            views.push((sys::VIR_DOMAIN_AFFECT_LIVE, true));
        }
        views.push((sys::VIR_DOMAIN_AFFECT_CONFIG, false));
        Ok(views)
    }

    /// The ACPI flag for shutdown; the test driver rejects any flag there.
    fn acpi_flag(&self) -> u32 {
        match self.kind {
            DomainKind::Test => 0,
            DomainKind::Kvm | DomainKind::Qemu => sys::VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN,
        }
    }
}

impl DomainDriver for Libvirt {
    fn hypervisor_type(&self) -> HypervisorType {
        match self.kind {
            DomainKind::Test => HypervisorType::Test,
            DomainKind::Kvm | DomainKind::Qemu => HypervisorType::Qemu,
        }
    }

    fn node_info(&self) -> Result<NodeInfo, DriverError> {
        let node = self.conn.node_info().map_err(libvirt)?;
        let driver = self.conn.driver_type().map_err(libvirt)?;
        let version = self.conn.hyp_version().map_err(libvirt)?;
        Ok(NodeInfo {
            cpus: node.cpus,
            memory_mib: node.memory / 1024,
            hypervisor_version: format!(
                "{driver} {} ({})",
                version_string(version),
                self.kind.accelerator()
            ),
        })
    }

    fn list(&self) -> Result<Vec<DomainInfo>, DriverError> {
        let mut out = Vec::new();
        for domain in self.conn.list_all_domains(0).map_err(libvirt)? {
            let name = domain.name().map_err(libvirt)?;
            if !name.starts_with(NAME_PREFIX) {
                continue;
            }
            match self.describe(&domain, &name) {
                Ok(info) => out.push(info),
                // Undefined between the listing and now.
                Err(DriverError::NoDomain(_)) => {}
                Err(e) => return Err(e),
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    fn lookup(&self, name: &str) -> Result<Option<DomainInfo>, DriverError> {
        let Some(domain) = self.domain(name)? else {
            return Ok(None);
        };
        match self.describe(&domain, name) {
            Ok(info) => Ok(Some(info)),
            Err(DriverError::NoDomain(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn define(&self, spec: &DomainSpec) -> Result<(), DriverError> {
        validate(spec)?;
        let xml = xml::domain_xml_with(spec, self.kind, self.tx_checksums);
        self.conn.define_domain_xml(&xml).map_err(libvirt)?;
        Ok(())
    }

    fn start(&self, name: &str) -> Result<(), DriverError> {
        let domain = self.require(name)?;
        match domain.create() {
            Ok(_) => Ok(()),
            Err(e) => match domain.is_active() {
                Ok(true) => Ok(()),
                _ => Err(libvirt(e)),
            },
        }
    }

    fn shutdown(&self, name: &str) -> Result<(), DriverError> {
        let domain = self.require(name)?;
        match domain.shutdown_flags(self.acpi_flag()) {
            Ok(()) => Ok(()),
            Err(e) => self.stopped_anyway(&domain, e),
        }
    }

    fn destroy(&self, name: &str) -> Result<(), DriverError> {
        let domain = self.require(name)?;
        match domain.destroy() {
            Ok(()) => Ok(()),
            Err(e) => self.stopped_anyway(&domain, e),
        }
    }

    fn undefine(&self, name: &str) -> Result<(), DriverError> {
        let Some(domain) = self.domain(name)? else {
            return Ok(());
        };
        match domain.is_active() {
            Ok(true) => return Err(DriverError::Active(name.to_owned())),
            Ok(false) => {}
            Err(e) if is(&e, ErrorNumber::NoDomain) => return Ok(()),
            Err(e) => return Err(libvirt(e)),
        }
        match domain.undefine_flags(self.undefine_flags()) {
            Ok(()) => Ok(()),
            Err(e) if is(&e, ErrorNumber::NoDomain) => Ok(()),
            Err(e) => Err(libvirt(e)),
        }
    }

    fn reboot(&self, name: &str) -> Result<(), DriverError> {
        let domain = self.require(name)?;
        domain
            .reboot(sys::VIR_DOMAIN_REBOOT_ACPI_POWER_BTN)
            .map_err(|e| self.refused(&domain, name, e))
    }

    fn reset(&self, name: &str) -> Result<(), DriverError> {
        let domain = self.require(name)?;
        domain.reset().map_err(|e| self.refused(&domain, name, e))
    }

    fn defined_root(&self, name: &str) -> Result<Option<std::path::PathBuf>, DriverError> {
        let domain = self.require(name)?;
        let text = domain
            .xml_desc(sys::VIR_DOMAIN_XML_INACTIVE)
            .map_err(libvirt)?;
        xml::root_source(&text)
            .map_err(|e| DriverError::Libvirt(format!("domain {name}'s XML: {e}")))
    }

    fn volumes(&self, name: &str) -> Result<Vec<AttachedVolume>, DriverError> {
        let (domain, running, text) = self.xml_now(name)?;
        let mut volumes = xml::attached_volumes(&text)
            .map_err(|e| DriverError::Libvirt(format!("domain {name}'s XML: {e}")))?;
        if running {
            for v in &mut volumes {
                // A disk being unplugged may be gone by now: its size is then unknown.
                v.capacity = domain.block_info(&v.target, 0).ok().map(|b| b.capacity);
            }
            moved_exports(&domain, &text, &mut volumes);
        }
        Ok(volumes)
    }

    fn root_volume(&self, name: &str) -> Result<Option<AttachedVolume>, DriverError> {
        let (domain, running, text) = self.xml_now(name)?;
        let Some(mut root) = xml::root_disk(&text)
            .map_err(|e| DriverError::Libvirt(format!("domain {name}'s XML: {e}")))?
        else {
            return Ok(None);
        };
        if running {
            root.capacity = domain.block_info(&root.target, 0).ok().map(|b| b.capacity);
            moved_exports(&domain, &text, std::slice::from_mut(&mut root));
        }
        Ok(Some(root))
    }

    fn attach_volume(&self, name: &str, disk: &VolumeDisk) -> Result<(), DriverError> {
        if self.volumes(name)?.iter().any(|v| v.path == disk.path) {
            return Ok(());
        }
        let domain = self.require(name)?;
        let flags = self.device_flags(&domain)?;
        domain
            .attach_device_flags(&xml::volume_disk_xml(disk), flags)
            .map_err(libvirt)
    }

    fn detach_volume(&self, name: &str, target: &str) -> Result<(), DriverError> {
        let domain = self.require(name)?;
        let flags = self.device_flags(&domain)?;
        // What is detached is the disk as libvirt holds it (live, or as defined): the live one
        // first, then what the definition still holds.
        for (flags, inactive) in [
            (flags & sys::VIR_DOMAIN_AFFECT_LIVE, false),
            (sys::VIR_DOMAIN_AFFECT_CONFIG, true),
        ] {
            if flags == 0 {
                continue;
            }
            let text = domain
                .xml_desc(if inactive {
                    sys::VIR_DOMAIN_XML_INACTIVE
                } else {
                    0
                })
                .map_err(libvirt)?;
            let found = xml::attached_volumes(&text)
                .map_err(|e| DriverError::Libvirt(format!("domain {name}'s XML: {e}")))?
                .into_iter()
                .find(|v| v.target == target);
            let Some(v) = found else { continue };
            let disk = VolumeDisk {
                path: v.path,
                target: v.target,
                serial: v.serial.unwrap_or_default(),
                // libvirt finds the disk to unplug by its target alone.
                shareable: false,
            };
            domain
                .detach_device_flags(&xml::volume_disk_xml(&disk), flags)
                .map_err(libvirt)?;
        }
        Ok(())
    }

    fn resize_volume(&self, name: &str, target: &str, bytes: u64) -> Result<(), DriverError> {
        let domain = self.require(name)?;
        if !domain
            .is_active()
            .map_err(|e| self.refused(&domain, name, e))?
        {
            return Err(DriverError::NotRunning(name.to_owned()));
        }
        domain
            .block_resize(target, bytes, sys::VIR_DOMAIN_BLOCK_RESIZE_BYTES)
            .map_err(|e| self.refused(&domain, name, e))
    }

    fn move_volume(&self, name: &str, disk: &VolumeDisk) -> Result<(), DriverError> {
        let domain = self.require(name)?;
        if !domain
            .is_active()
            .map_err(|e| self.refused(&domain, name, e))?
        {
            return Err(DriverError::NotRunning(name.to_owned()));
        }
        let target = &disk.target;
        let (Some(host), Some(want), Some(tls)) = (
            disk.path
                .to_str()
                .and_then(|p| p.split_once("://"))
                .and_then(|(_, rest)| rest.rsplit_once(':'))
                .map(|(h, _)| h.trim_start_matches('[').trim_end_matches(']').to_owned()),
            nbd_export(&disk.path),
            disk.path.to_str().map(|p| p.starts_with("nbd+tls://")),
        ) else {
            return Err(DriverError::Libvirt(format!(
                "{} is no NBD export to move the disk at {target} to",
                disk.path.display()
            )));
        };
        let live = domain.xml_desc(0).map_err(libvirt)?;
        let index = qmp::disk_index(&live, target).ok_or_else(|| {
            DriverError::Libvirt(format!(
                "domain {name} has no disk at {target} with a source index"
            ))
        })?;
        let monitor = |cmd: serde_json::Value| -> Result<serde_json::Value, DriverError> {
            let reply = domain
                .qemu_monitor_command(&cmd.to_string(), 0)
                .map_err(libvirt)?;
            qmp::returned(&reply).map_err(|e| {
                DriverError::Libvirt(format!("domain {name}'s QEMU: {}: {e}", cmd["execute"]))
            })
        };
        let format = qmp::format(index);
        // At most the steps of one move, from wherever one was cut short.
        for _ in 0..8 {
            let named = monitor(
                serde_json::json!({"execute": "query-named-block-nodes", "arguments": {"flat": true}}),
            )?;
            let graph = monitor(serde_json::json!({"execute": "x-debug-query-block-graph"}))?;
            let seen = qmp::seen(&named, &graph, &format);
            let entry = named
                .as_array()
                .and_then(|a| a.iter().find(|n| n["node-name"] == format.as_str()))
                .cloned()
                .unwrap_or_default();
            let act = qmp::next(&seen, index, &want)
                .map_err(|e| DriverError::Libvirt(format!("domain {name}: {e}")))?;
            tracing::info!(
                domain = name,
                target,
                ?act,
                "moving a disk to its grown export"
            );
            match act {
                qmp::Act::Add(node) => {
                    let creds = if tls {
                        let objects = monitor(
                            serde_json::json!({"execute": "qom-list", "arguments": {"path": "/objects"}}),
                        )?;
                        let storage = qmp::storage(index);
                        Some(qmp::tls_object(&objects, &storage).ok_or_else(|| {
                            DriverError::Libvirt(format!(
                                "domain {name}'s QEMU has no TLS credentials of {storage}"
                            ))
                        })?)
                    } else {
                        None
                    };
                    monitor(qmp::add_command(
                        &node,
                        &host,
                        &want,
                        creds.as_deref(),
                        &entry["cache"],
                    ))?;
                }
                qmp::Act::Reopen(node) => {
                    monitor(qmp::reopen_command(&format, &node, &entry))?;
                }
                qmp::Act::Delete(node) => {
                    monitor(
                        serde_json::json!({"execute": "blockdev-del", "arguments": {"node-name": node}}),
                    )?;
                }
                qmp::Act::Leave(bytes, node) => {
                    monitor(
                        serde_json::json!({"execute": "block_resize", "arguments": {"node-name": format, "size": bytes}}),
                    )?;
                    monitor(
                        serde_json::json!({"execute": "blockdev-del", "arguments": {"node-name": node}}),
                    )?;
                }
                qmp::Act::Resize(bytes) => {
                    monitor(
                        serde_json::json!({"execute": "block_resize", "arguments": {"node-name": format, "size": bytes}}),
                    )?;
                }
                qmp::Act::Done => return self.define_moved(&domain, name, disk),
            }
        }
        Err(DriverError::Libvirt(format!(
            "domain {name}: the disk at {target} did not settle on its new export"
        )))
    }

    fn interfaces(&self, name: &str) -> Result<Vec<AttachedInterface>, DriverError> {
        let domain = self.require(name)?;
        let running = domain.is_active().map_err(libvirt)?;
        self.interfaces_of(&domain, name, running)
    }

    fn attach_interface(&self, name: &str, nic: &InterfaceSpec) -> Result<(), DriverError> {
        nic.check()?;
        let domain = self.require(name)?;
        let element = xml::interface_xml_with(nic, self.tx_checksums);
        for (flags, live) in self.device_views(&domain)? {
            let there = self.interfaces_of(&domain, name, live)?;
            if there.iter().any(|i| i.mac.eq_ignore_ascii_case(&nic.mac)) {
                continue;
            }
            domain
                .attach_device_flags(&element, flags)
                .map_err(libvirt)?;
        }
        Ok(())
    }

    fn detach_interface(&self, name: &str, mac: &str) -> Result<(), DriverError> {
        let domain = self.require(name)?;
        for (flags, live) in self.device_views(&domain)? {
            let there = self.interfaces_of(&domain, name, live)?;
            // libvirt finds the interface by the MAC it writes back, so that spelling is used.
            let Some(found) = there.iter().find(|i| i.mac.eq_ignore_ascii_case(mac)) else {
                continue;
            };
            if let Err(e) =
                domain.detach_device_flags(&xml::interface_by_mac_xml(&found.mac), flags)
            {
                // The guest may have completed an unplug asked for earlier meanwhile.
                let gone = live
                    && !self
                        .interfaces_of(&domain, name, true)?
                        .iter()
                        .any(|i| i.mac == found.mac);
                if !gone {
                    return Err(libvirt(e));
                }
            }
        }
        Ok(())
    }

    fn subscribe(&self, tx: tokio::sync::mpsc::UnboundedSender<String>) -> Result<(), DriverError> {
        let sub = events::subscribe(&self.conn, tx).map_err(libvirt)?;
        self.events
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(sub);
        Ok(())
    }
}

fn open(uri: &str) -> Result<Connect, DriverError> {
    // The virt crate unwraps the CString it builds from the URI.
    if uri.contains('\0') {
        return Err(DriverError::Libvirt(
            "connection URI contains a NUL byte".into(),
        ));
    }
    // libvirt's default handler prints every error to stderr, including the expected ones
    // (a lookup of a missing domain); ours come back as values.
    virt::error::clear_error_callback();
    // Before the connection: only then does it deliver domain events.
    events::ensure_event_loop();
    Connect::open(Some(uri)).map_err(libvirt)
}

/// The (port, export name) of an NBD disk's path (`nbd[+tls]://HOST:PORT/NAME`).
fn nbd_export(path: &Path) -> Option<(u16, String)> {
    let p = path.to_str()?;
    if !p.starts_with("nbd://") && !p.starts_with("nbd+tls://") {
        return None;
    }
    let (_, rest) = p.split_once("://")?;
    let (hostport, name) = rest.split_once('/')?;
    let (_, port) = hostport.rsplit_once(':')?;
    Some((port.parse().ok()?, name.to_owned()))
}

/// Gives each NBD disk of the running `domain` (its live XML `live`) the export its QEMU
/// reads: another than the live XML names once the disk was moved to its volume's grown
/// export ([`DomainDriver::move_volume`]; libvirt is not told, the definition is rewritten).
/// A move not finished (its temporary node still there, or the definition not rewritten
/// yet), or a monitor that does not answer, leaves the live XML's: the move is taken up
/// again.
fn moved_exports(domain: &Domain, live: &str, volumes: &mut [AttachedVolume]) {
    // Only a disk whose definition names another export than the live XML was moved (the
    // move rewrites the definition last): QEMU's monitor is asked of no other (libvirt
    // marks a domain whose monitor is used directly as tainted).
    let defined = domain
        .xml_desc(sys::VIR_DOMAIN_XML_INACTIVE)
        .ok()
        .and_then(|x| xml::all_disks(&x).ok())
        .unwrap_or_default();
    let moved = |v: &AttachedVolume| {
        nbd_export(&v.path).is_some()
            && defined
                .iter()
                .any(|d| d.target == v.target && d.path != v.path)
    };
    if !volumes.iter().any(moved) {
        return;
    }
    let cmd = r#"{"execute":"query-named-block-nodes","arguments":{"flat":true}}"#;
    let Some(named) = domain
        .qemu_monitor_command(cmd, 0)
        .ok()
        .and_then(|r| qmp::returned(&r).ok())
    else {
        return;
    };
    for v in volumes.iter_mut() {
        if !moved(v) {
            continue;
        }
        let Some(index) = qmp::disk_index(live, &v.target) else {
            continue;
        };
        let (format, moving) = (qmp::format(index), qmp::moving(index));
        let nodes = named.as_array().map(Vec::as_slice).unwrap_or_default();
        if nodes.iter().any(|n| n["node-name"] == moving.as_str()) {
            // A move cut short: the disk is told as the XML names it, so that the move is
            // taken up again and finished.
            continue;
        }
        let reads = nodes
            .iter()
            .find(|n| n["node-name"] == format.as_str())
            .and_then(|n| n["file"].as_str())
            .and_then(qmp::export_of);
        if let Some(path) = reads.and_then(|e| qmp::moved_path(&v.path, &e)) {
            v.path = path;
        }
    }
}

fn libvirt(e: virt::error::Error) -> DriverError {
    DriverError::Libvirt(e.message().to_owned())
}

fn is(e: &virt::error::Error, code: ErrorNumber) -> bool {
    e.code().is(code)
}

fn map_state(state: virt::domain::DomainStateEnum) -> DomainState {
    match state.unwrap_or(VirtState::NoState) {
        VirtState::Running | VirtState::Blocked => DomainState::Running,
        VirtState::Paused => DomainState::Paused,
        VirtState::Shutdown => DomainState::ShuttingDown,
        VirtState::Shutoff => DomainState::Shutoff,
        VirtState::Crashed => DomainState::Crashed,
        VirtState::NoState | VirtState::PMSuspended => DomainState::Other,
    }
}

/// `major.minor.micro` from libvirt's `major * 1_000_000 + minor * 1_000 + micro`.
fn version_string(version: u32) -> String {
    format!(
        "{}.{}.{}",
        version / 1_000_000,
        version / 1_000 % 1_000,
        version % 1_000
    )
}

/// Rejects specs the XML could not carry faithfully.
fn validate(spec: &DomainSpec) -> Result<(), DriverError> {
    if !spec.name.starts_with(NAME_PREFIX) {
        return Err(DriverError::InvalidSpec(format!(
            "domain name {:?} does not start with {NAME_PREFIX:?}",
            spec.name
        )));
    }
    super::check_interfaces(spec)?;
    let mut paths: Vec<&Path> = vec![&spec.console_log];
    if let Some(boot) = &spec.kernel {
        paths.push(&boot.kernel);
        paths.extend(boot.initrd.as_deref());
    }
    paths.extend(spec.disks.iter().map(|d| d.path.as_path()));
    for path in paths {
        if path.to_str().is_none() {
            return Err(DriverError::InvalidSpec(format!(
                "path {} is not UTF-8",
                path.display()
            )));
        }
    }
    Ok(())
}

/// Picks the domain type for `conn`; see [`Libvirt::connect`].
fn detect_kind(conn: &Connect) -> DomainKind {
    let driver = conn.driver_type().unwrap_or_default();
    if driver.eq_ignore_ascii_case("test") {
        return DomainKind::Test;
    }
    let libvirt_offers_kvm = conn
        .domain_capabilities(None, Some("x86_64"), None, Some("kvm"), 0)
        .is_ok();
    let local = conn.uri().map(|uri| is_local_uri(&uri)).unwrap_or(true);
    let host_check = local.then(host_has_kvm);
    let kind = choose_kind(libvirt_offers_kvm, host_check);
    if libvirt_offers_kvm && kind == DomainKind::Qemu {
        tracing::warn!(
            "libvirt offers KVM but the CPU advertises no vmx/svm; using TCG (software emulation)"
        );
    }
    kind
}

/// KVM only when libvirt offers it and, where we can look, the host agrees.
fn choose_kind(libvirt_offers_kvm: bool, host_check: Option<bool>) -> DomainKind {
    if libvirt_offers_kvm && host_check.unwrap_or(true) {
        DomainKind::Kvm
    } else {
        DomainKind::Qemu
    }
}

/// Whether a libvirt URI names this host (no host part, or `localhost`).
fn is_local_uri(uri: &str) -> bool {
    match url::Url::parse(uri) {
        Ok(url) => match url.host_str() {
            None | Some("") | Some("localhost") => true,
            Some(_) => false,
        },
        Err(_) => true,
    }
}

/// Whether this host can run hardware-accelerated guests: `/dev/kvm` exists and the CPU
/// advertises VT-x or AMD-V.
fn host_has_kvm() -> bool {
    Path::new("/dev/kvm").exists()
        && std::fs::read_to_string("/proc/cpuinfo").is_ok_and(|text| cpu_has_hw_virt(&text))
}

/// Whether `/proc/cpuinfo` text lists `vmx` or `svm` among the CPU flags.
fn cpu_has_hw_virt(cpuinfo: &str) -> bool {
    cpuinfo
        .lines()
        .filter_map(|line| line.split_once(':'))
        .filter(|(key, _)| key.trim() == "flags")
        .any(|(_, flags)| flags.split_whitespace().any(|f| f == "vmx" || f == "svm"))
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;
    use crate::compute::driver::{Backing, DiskFormat, DiskSpec, KernelBoot, Owner};

    const TEST_URI: &str = "test:///default";

    /// A name and UUID no other test (or earlier run in this process) uses.
    ///
    /// `test:///default` is one in-memory hypervisor shared by every connection in the process.
    fn unique(prefix: &str) -> (String, String) {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        (
            format!("{prefix}{pid}-{n}"),
            format!("{pid:08x}-{:04x}-4000-8000-{nanos:08x}{n:04x}", n & 0xffff),
        )
    }

    fn spec(name: &str, uuid: &str) -> DomainSpec {
        DomainSpec {
            name: name.to_owned(),
            uuid: uuid.to_owned(),
            vcpus: 1,
            memory_mib: 128,
            kernel: Some(KernelBoot {
                kernel: PathBuf::from("/var/lib/stratus/images/vmlinuz"),
                initrd: None,
                cmdline: "console=ttyS0 <&>".into(),
            }),
            disks: vec![DiskSpec {
                path: PathBuf::from("/var/lib/stratus/servers/root.qcow2"),
                format: DiskFormat::Qcow2,
                readonly: false,
                backing: None,
            }],
            console_log: PathBuf::from("/var/log/stratus/console.log"),
            interfaces: Vec::new(),
            owner: Owner {
                namespace: "team-a&b".into(),
                name: "web<1>".into(),
                uid: uuid.to_owned(),
            },
        }
    }

    #[test]
    fn libvirt_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync + 'static>() {}
        assert_send_sync::<Connect>();
        assert_send_sync::<Libvirt>();
    }

    #[test]
    fn the_test_driver_passes_the_domain_driver_suite() {
        let lv = Libvirt::connect(TEST_URI).expect("connect");
        assert_eq!(lv.kind(), DomainKind::Test);
        assert_eq!(lv.hypervisor_type(), HypervisorType::Test);
        let (name, uuid) = unique(NAME_PREFIX);
        super::super::conformance::domain_driver(&lv, &spec(&name, &uuid));
    }

    #[test]
    fn a_domain_is_defined_with_its_ports_as_tap_interfaces() {
        let lv = Libvirt::connect(TEST_URI).expect("connect");
        let (name, uuid) = unique(NAME_PREFIX);
        let mut spec = spec(&name, &uuid);
        spec.interfaces = vec![super::super::InterfaceSpec {
            mac: "fa:16:3e:0a:0b:0c".into(),
            tap: "tap0f9e2c1a77b".into(),
            mtu: Some(1450),
        }];
        lv.define(&spec).expect("define");
        let xml = lv.defined_xml(&name).expect("read").expect("defined");
        assert!(xml.contains("<interface type='ethernet'>"), "{xml}");
        assert!(xml.contains("<mac address='fa:16:3e:0a:0b:0c'/>"), "{xml}");
        assert!(xml.contains("<target dev='tap0f9e2c1a77b'/>"), "{xml}");
        assert!(xml.contains("<model type='virtio'/>"), "{xml}");
        lv.undefine(&name).expect("undefine");
        assert_eq!(lv.defined_xml(&name).expect("read"), None);
    }

    #[test]
    fn lifecycle_events_name_the_domain() {
        use tokio::sync::mpsc::error::TryRecvError;
        let lv = Libvirt::connect(TEST_URI).expect("connect");
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        lv.subscribe(tx).expect("subscribe");
        let (name, uuid) = unique(NAME_PREFIX);
        lv.define(&spec(&name, &uuid)).expect("define");
        lv.start(&name).expect("start");
        lv.destroy(&name).expect("destroy");
        lv.undefine(&name).expect("undefine");
        // Other tests share the driver: count only this domain's events.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let mut ours = 0;
        while ours < 4 && std::time::Instant::now() < deadline {
            match rx.try_recv() {
                Ok(n) if n == name => ours += 1,
                Ok(_) => {}
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(10)),
            }
        }
        assert_eq!(ours, 4, "defined, started, stopped, undefined");
        // Dropping the connection ends the subscription and frees its sender.
        drop(lv);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match rx.try_recv() {
                Err(TryRecvError::Disconnected) => break,
                _ if std::time::Instant::now() > deadline => panic!("the sender was never freed"),
                _ => std::thread::sleep(std::time::Duration::from_millis(10)),
            }
        }
    }

    #[test]
    fn a_nul_in_a_name_is_an_error_not_a_crash() {
        let lv = Libvirt::connect(TEST_URI).expect("connect");
        assert!(matches!(
            lv.lookup("stratus-\0nul"),
            Err(DriverError::Libvirt(_))
        ));
    }

    #[test]
    fn list_skips_foreign_domains_and_tolerates_missing_metadata() {
        let lv = Libvirt::connect(TEST_URI).expect("connect");
        let (foreign, foreign_uuid) = unique("other-");
        let foreign_spec = spec(&foreign, &foreign_uuid);
        lv.conn
            .define_domain_xml(&xml::domain_xml(&foreign_spec, DomainKind::Test))
            .expect("define foreign");
        assert!(matches!(
            lv.define(&foreign_spec),
            Err(DriverError::InvalidSpec(_))
        ));

        let (bare, bare_uuid) = unique(NAME_PREFIX);
        let without_metadata = xml::domain_xml(&spec(&bare, &bare_uuid), DomainKind::Test)
            .lines()
            .filter(|l| !l.contains("metadata") && !l.contains("stratus:server"))
            .collect::<Vec<_>>()
            .join("\n");
        lv.conn
            .define_domain_xml(&without_metadata)
            .expect("define without metadata");

        let listed = lv.list().expect("list");
        assert!(!listed.iter().any(|d| d.name == foreign));
        let bare_info = listed.iter().find(|d| d.name == bare).expect("bare listed");
        assert_eq!(bare_info.owner, None);

        lv.undefine(&bare).expect("undefine bare");
        lv.conn
            .lookup_domain_by_name(&foreign)
            .and_then(|d| d.undefine())
            .expect("undefine foreign");
    }

    #[test]
    fn node_info_of_the_test_driver() {
        let lv = Libvirt::connect(TEST_URI).expect("connect");
        let node = lv.node_info().expect("node info");
        assert!(node.cpus > 0);
        assert!(node.memory_mib > 0);
        assert!(
            node.hypervisor_version.starts_with("TEST ")
                && node.hypervisor_version.ends_with(" (test)"),
            "{}",
            node.hypervisor_version
        );
    }

    #[test]
    fn bad_uris_are_errors() {
        assert!(matches!(
            Libvirt::connect("test:///\0"),
            Err(DriverError::Libvirt(_))
        ));
        assert!(matches!(
            Libvirt::connect("nosuchdriver:///x"),
            Err(DriverError::Libvirt(_))
        ));
    }

    #[test]
    fn kvm_needs_libvirt_and_the_cpu_to_agree() {
        assert_eq!(choose_kind(true, Some(true)), DomainKind::Kvm);
        assert_eq!(choose_kind(true, Some(false)), DomainKind::Qemu);
        assert_eq!(choose_kind(true, None), DomainKind::Kvm);
        assert_eq!(choose_kind(false, Some(true)), DomainKind::Qemu);
        assert_eq!(choose_kind(false, None), DomainKind::Qemu);
    }

    #[test]
    fn cpu_flags() {
        let pvm =
            "processor\t: 0\nflags\t\t: fpu vme sse2 pni hypervisor avx2\nbugs\t\t: vmx_ept\n";
        assert!(!cpu_has_hw_virt(pvm));
        assert!(cpu_has_hw_virt("flags\t\t: fpu vmx sse2\n"));
        assert!(cpu_has_hw_virt("flags : fpu svm\n"));
        assert!(!cpu_has_hw_virt("flags : fpu vmxx svm_lock\n"));
        assert!(!cpu_has_hw_virt(""));
    }

    #[test]
    fn uri_locality() {
        assert!(is_local_uri("qemu:///system"));
        assert!(is_local_uri("qemu+unix:///system"));
        assert!(is_local_uri("qemu://localhost/system"));
        assert!(!is_local_uri("qemu+ssh://node7/system"));
        assert!(!is_local_uri("qemu+tls://10.0.0.7/system"));
    }

    #[test]
    fn versions() {
        assert_eq!(version_string(7_002_022), "7.2.22");
        assert_eq!(version_string(2), "0.0.2");
    }

    /// The real QEMU driver, in-process (`qemu:///embed`, no daemon): the probe must agree with
    /// the host, and libvirt's QEMU driver must accept the XML we write. Starting a guest needs
    /// virtlogd for the console log, so that is left to e2e.
    #[test]
    fn qemu_embed_detects_the_accelerator_and_accepts_our_xml() {
        // scripts/setup.sh installs QEMU; without it this test fails rather than skips.
        assert!(
            Path::new("/usr/bin/qemu-system-x86_64").exists(),
            "qemu-system-x86_64 is not installed (run scripts/setup.sh)"
        );
        // The embedded driver runs inside this process and needs an event loop here.
        static EVENT_LOOP: std::sync::Once = std::sync::Once::new();
        EVENT_LOOP.call_once(|| {
            virt::event::event_register_default_impl().expect("register event loop");
            std::thread::spawn(|| while virt::event::event_run_default_impl().is_ok() {});
        });
        let root = tempfile::tempdir().expect("tempdir");
        // QEMU runs as root, as scripts/libvirtd.sh and the e2e nodes have it. Under another
        // user libvirt's QEMU driver finds no access to a root-only /dev/kvm, takes every
        // capabilities probe made with KVM for outdated and probes again at each call (a
        // few hundred QEMU starts, minutes, for this test).
        let etc = root.path().join("etc");
        std::fs::create_dir_all(&etc).expect("create the embed root's etc");
        std::fs::write(etc.join("qemu.conf"), "user = \"root\"\ngroup = \"root\"\n")
            .expect("write qemu.conf");
        let caps = root.path().join("cache/qemu/capabilities");
        let kept = kept_qemu_capabilities();
        copy_xml_files(&kept, &caps);
        let mut uri = url::Url::parse("qemu:///embed").expect("static URI");
        uri.query_pairs_mut()
            .append_pair("root", &root.path().to_string_lossy());
        let lv = Libvirt::connect(uri.as_str()).expect("connect embed");
        let expected = if host_has_kvm() {
            DomainKind::Kvm
        } else {
            DomainKind::Qemu
        };
        let offers_kvm = lv
            .conn
            .domain_capabilities(None, Some("x86_64"), None, Some("kvm"), 0)
            .is_ok();
        eprintln!(
            "libvirt offers KVM: {offers_kvm}; host has VT-x/AMD-V: {}; chose {:?}",
            host_has_kvm(),
            lv.kind()
        );
        assert_eq!(lv.kind(), expected);
        let node = lv.node_info().expect("node info");
        assert!(
            node.hypervisor_version.starts_with("QEMU "),
            "{}",
            node.hypervisor_version
        );

        let (name, uuid) = unique(NAME_PREFIX);
        let mut spec = spec(&name, &uuid);
        let root_disk = root.path().join("root.qcow2");
        let base = root.path().join("base.raw");
        let config = root.path().join("config.iso");
        std::fs::write(&config, [0u8; 4096]).expect("write config drive stand-in");
        std::fs::write(&base, vec![0u8; 1 << 20]).expect("write base image");
        // The overlay's own metadata names a host file as its backing file; the XML's pinned
        // chain is what libvirt must keep.
        let status = std::process::Command::new("qemu-img")
            .args([
                "create",
                "-q",
                "-f",
                "qcow2",
                "-u",
                "-F",
                "raw",
                "-b",
                "/etc/passwd",
            ])
            .arg(&root_disk)
            .arg("64M")
            .status()
            .expect("run qemu-img");
        assert!(status.success());
        spec.disks = vec![
            DiskSpec {
                path: root_disk,
                format: DiskFormat::Qcow2,
                readonly: false,
                backing: Some(Backing {
                    path: base.clone(),
                    format: DiskFormat::Raw,
                }),
            },
            DiskSpec {
                path: config,
                format: DiskFormat::Raw,
                readonly: true,
                backing: None,
            },
        ];
        spec.kernel = None;
        spec.console_log = root.path().join("console.log");
        lv.define(&spec).expect("QEMU driver accepts our XML");
        let defined = lv
            .conn
            .lookup_domain_by_name(&name)
            .and_then(|d| d.xml_desc(0))
            .expect("the defined domain's XML");
        let chains: Vec<&str> = defined
            .split("<backingStore")
            .skip(1)
            .map(|s| s.split('>').next().unwrap_or_default())
            .collect();
        // libvirt keeps the chain we pinned: the base under the overlay, nothing under the
        // base, nothing under the config drive.
        assert_eq!(chains, [" type='file'", "/", "/"], "{defined}");
        assert!(
            defined.contains(&format!("<source file='{}'/>", base.display())),
            "{defined}"
        );
        assert!(!defined.contains("/etc/passwd"), "{defined}");
        let info = lv.lookup(&name).expect("lookup").expect("defined");
        assert_eq!(info.state, DomainState::Shutoff);
        assert_eq!(info.owner, Some(spec.owner.clone()));
        lv.undefine(&name).expect("undefine");
        assert_eq!(lv.lookup(&name).expect("lookup"), None);
        // libvirt's QEMU driver takes our volume disks (the test driver has no device verbs),
        // a raw file and a block device alike.
        let volume = root.path().join("volume-x");
        std::fs::write(&volume, vec![0u8; 1 << 20]).expect("write volume");
        super::super::conformance::volumes(&lv, &spec, &volume);
        super::super::conformance::volumes(&lv, &spec, Path::new("/dev/null"));
        // ... and our interfaces, one plugged into the definition and taken out again.
        super::super::conformance::interfaces(&lv, &spec);
        copy_xml_files(&caps, &kept);
    }

    /// Where the QEMU capabilities that libvirt probed in an earlier run are kept: beside this
    /// test binary (`target/<profile>/`), one folder a user. A probe starts QEMU twice per
    /// emulator (seconds each here); libvirt checks every cached file itself (QEMU's and its
    /// own build, /dev/kvm, the host CPU and kernel) and probes again when one is out of date,
    /// so a kept file is at worst a probe that was needed anyway.
    fn kept_qemu_capabilities() -> PathBuf {
        use std::os::unix::fs::MetadataExt;
        let uid = std::fs::metadata("/proc/self")
            .expect("stat /proc/self")
            .uid();
        let exe = std::env::current_exe().expect("this test binary's path");
        let profile = exe
            .parent()
            .and_then(Path::parent)
            .expect("a test binary lives in target/<profile>/deps");
        profile.join(format!("qemu-embed-capabilities-{uid}"))
    }

    /// Copies the `.xml` files of `from` (if it exists) into `to`, each through a temporary
    /// file and a rename, so that a run reading `to` at the same time sees whole files only.
    fn copy_xml_files(from: &Path, to: &Path) {
        let Ok(entries) = std::fs::read_dir(from) else {
            return;
        };
        std::fs::create_dir_all(to).expect("create the capabilities folder");
        for entry in entries {
            let path = entry.expect("read the capabilities folder").path();
            let Some(name) = path
                .file_name()
                .filter(|_| path.extension() == Some("xml".as_ref()))
            else {
                continue;
            };
            let partial = to.join(format!(
                ".{}.{}",
                name.to_string_lossy(),
                std::process::id()
            ));
            std::fs::copy(&path, &partial).expect("copy cached capabilities");
            std::fs::rename(&partial, to.join(name)).expect("rename cached capabilities");
        }
    }
}
