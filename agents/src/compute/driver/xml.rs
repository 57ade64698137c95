//! libvirt domain XML for a [`DomainSpec`], and the Stratus metadata element read back from it.
//!
//! Everything is written through quick-xml's writer, so names, paths and the kernel command line
//! (all of which come from users or images) are escaped by the library, never spliced in by hand.
//!
//! Every disk's backing chain is spelled out (`<backingStore>`), ending in an empty
//! `<backingStore/>`, so that libvirt and QEMU never take a chain from an image's metadata.

use std::borrow::Cow;
use std::io;
use std::path::Path;

use quick_xml::Writer;
use quick_xml::events::{BytesText, Event};
use quick_xml::reader::Reader;

use super::{
    AttachedInterface, AttachedVolume, Backing, DiskFormat, DomainSpec, InterfaceSpec, Owner,
    TxChecksums, VolumeDisk,
};

/// XML namespace of the Stratus metadata element in a domain's `<metadata>`.
pub const METADATA_NS: &str = "https://stratus.dev/xmlns/libvirt/server/v1";

/// Prefix bound to [`METADATA_NS`] in the XML Stratus writes.
pub const METADATA_PREFIX: &str = "stratus";

/// Local name of the Stratus metadata element.
const METADATA_ELEMENT: &str = "server";

/// The element's qualified name and namespace declaration, spelled out to match
/// [`METADATA_PREFIX`] (a test checks they agree).
const METADATA_QNAME: &str = "stratus:server";
const METADATA_XMLNS: &str = "xmlns:stratus";

/// Which libvirt domain type to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DomainKind {
    /// QEMU with hardware acceleration (`<domain type='kvm'>`, host CPU passed through).
    Kvm,
    /// QEMU with software emulation, TCG (`<domain type='qemu'>`).
    Qemu,
    /// libvirt's in-process `test:///` driver (`<domain type='test'>`).
    Test,
}

impl DomainKind {
    /// The value of `<domain type=…>`.
    pub fn domain_type(self) -> &'static str {
        match self {
            DomainKind::Kvm => "kvm",
            DomainKind::Qemu => "qemu",
            DomainKind::Test => "test",
        }
    }

    /// How the hypervisor version string names the accelerator.
    pub fn accelerator(self) -> &'static str {
        match self {
            DomainKind::Kvm => "KVM",
            DomainKind::Qemu => "TCG",
            DomainKind::Test => "test",
        }
    }
}

/// Failures reading the Stratus metadata element back.
#[derive(Debug, thiserror::Error)]
pub enum MetadataError {
    /// The text is not well-formed XML.
    #[error("malformed metadata XML")]
    Xml(#[source] quick_xml::Error),
    /// An attribute could not be read.
    #[error("malformed metadata attribute")]
    Attribute(#[source] quick_xml::events::attributes::AttrError),
    /// The root element is not `<server>`.
    #[error("metadata element is <{0}>, not <server>")]
    WrongElement(String),
    /// A required attribute is absent.
    #[error("metadata element lacks attribute {0:?}")]
    MissingAttribute(&'static str),
    /// No element at all.
    #[error("metadata holds no element")]
    Empty,
}

/// The domain XML libvirt should define for `spec`.
///
/// Paths that are not UTF-8 are written lossily; callers that take paths from outside should
/// reject those first (the libvirt driver's `define` does).
pub fn domain_xml(spec: &DomainSpec, kind: DomainKind) -> String {
    domain_xml_with(spec, kind, TxChecksums::Host)
}

/// [`domain_xml`], its interfaces' checksums filled in by `tx`.
pub fn domain_xml_with(spec: &DomainSpec, kind: DomainKind, tx: TxChecksums) -> String {
    let mut writer = Writer::new_with_indent(Vec::new(), b' ', 2);
    // Writing into a Vec<u8> has no I/O that could fail.
    write_domain(&mut writer, spec, kind, tx).expect("writing XML into a Vec<u8> cannot fail");
    // Every piece written came from a &str, so the buffer is UTF-8.
    String::from_utf8_lossy(&writer.into_inner()).into_owned()
}

/// libvirt's name for a virtio disk at `index` in guest order: `vda`…`vdz`, `vdaa`, ….
pub fn virtio_disk_name(index: usize) -> String {
    let mut letters = Vec::new();
    let mut n = index;
    loop {
        // n % 26 < 26, so the cast cannot truncate.
        letters.push(b'a' + (n % 26) as u8);
        if n < 26 {
            break;
        }
        n = n / 26 - 1;
    }
    letters.reverse();
    let mut name = String::from("vd");
    name.extend(letters.into_iter().map(char::from));
    name
}

/// Reads the [`Owner`] from the metadata element libvirt returns for [`METADATA_NS`].
///
/// libvirt hands the element back without its prefix (`<server namespace=… name=… uid=…/>`);
/// the prefixed form Stratus wrote is accepted as well.
pub fn parse_owner_metadata(xml: &str) -> Result<Owner, MetadataError> {
    let mut reader = Reader::from_str(xml);
    loop {
        let event = reader.read_event().map_err(MetadataError::Xml)?;
        let start = match event {
            Event::Start(start) | Event::Empty(start) => start,
            Event::Eof => return Err(MetadataError::Empty),
            _ => continue,
        };
        let local = start.local_name();
        if local.as_ref() != METADATA_ELEMENT {
            return Err(MetadataError::WrongElement(local.as_ref().to_owned()));
        }
        let (mut namespace, mut name, mut uid) = (None, None, None);
        for attr in start.attributes() {
            let attr = attr.map_err(MetadataError::Attribute)?;
            let value = attr
                .normalized_value(quick_xml::XmlVersion::Implicit1_0)
                .map_err(MetadataError::Xml)?
                .into_owned();
            match attr.key.local_name().as_ref() {
                "namespace" => namespace = Some(value),
                "name" => name = Some(value),
                "uid" => uid = Some(value),
                _ => {}
            }
        }
        return Ok(Owner {
            namespace: namespace.ok_or(MetadataError::MissingAttribute("namespace"))?,
            name: name.ok_or(MetadataError::MissingAttribute("name"))?,
            uid: uid.ok_or(MetadataError::MissingAttribute("uid"))?,
        });
    }
}

/// The metadata element on its own, as `virDomainSetMetadata` would take it.
pub fn owner_metadata_xml(owner: &Owner) -> String {
    let mut writer = Writer::new(Vec::new());
    write_owner(&mut writer, owner).expect("writing XML into a Vec<u8> cannot fail");
    String::from_utf8_lossy(&writer.into_inner()).into_owned()
}

fn path_text(path: &Path) -> Cow<'_, str> {
    path.to_string_lossy()
}

fn write_owner<W: io::Write>(w: &mut Writer<W>, owner: &Owner) -> io::Result<()> {
    w.create_element(METADATA_QNAME)
        .with_attribute((METADATA_XMLNS, METADATA_NS))
        .with_attribute(("namespace", owner.namespace.as_str()))
        .with_attribute(("name", owner.name.as_str()))
        .with_attribute(("uid", owner.uid.as_str()))
        .write_empty()?;
    Ok(())
}

fn text_element<W: io::Write>(w: &mut Writer<W>, name: &str, text: &str) -> io::Result<()> {
    w.create_element(name)
        .write_text_content(BytesText::new(text))?;
    Ok(())
}

fn write_domain<W: io::Write>(
    w: &mut Writer<W>,
    spec: &DomainSpec,
    kind: DomainKind,
    tx: TxChecksums,
) -> io::Result<()> {
    w.create_element("domain")
        .with_attribute(("type", kind.domain_type()))
        .write_inner_content(|w| {
            text_element(w, "name", &spec.name)?;
            text_element(w, "uuid", &spec.uuid)?;
            w.create_element("metadata")
                .write_inner_content(|w| write_owner(w, &spec.owner))?;
            w.create_element("memory")
                .with_attribute(("unit", "MiB"))
                .write_text_content(BytesText::new(&spec.memory_mib.to_string()))?;
            text_element(w, "vcpu", &spec.vcpus.to_string())?;
            write_os(w, spec, kind)?;
            w.create_element("features").write_inner_content(|w| {
                w.create_element("acpi").write_empty()?;
                Ok(())
            })?;
            match kind {
                // Without this KVM guests get the lowest-common-denominator qemu64 model.
                DomainKind::Kvm => {
                    w.create_element("cpu")
                        .with_attribute(("mode", "host-passthrough"))
                        .write_empty()?;
                }
                // qemu64 lacks x86-64-v2, which current distribution kernels require.
                DomainKind::Qemu => {
                    w.create_element("cpu")
                        .with_attribute(("mode", "maximum"))
                        .write_empty()?;
                }
                DomainKind::Test => {}
            }
            w.create_element("clock")
                .with_attribute(("offset", "utc"))
                .write_empty()?;
            text_element(w, "on_poweroff", "destroy")?;
            text_element(w, "on_reboot", "restart")?;
            text_element(w, "on_crash", "destroy")?;
            write_devices(w, spec, kind, tx)
        })?;
    Ok(())
}

fn write_os<W: io::Write>(
    w: &mut Writer<W>,
    spec: &DomainSpec,
    kind: DomainKind,
) -> io::Result<()> {
    w.create_element("os").write_inner_content(|w| {
        let ty = w.create_element("type").with_attribute(("arch", "x86_64"));
        // The test driver takes any machine string; keep its XML free of QEMU specifics.
        let ty = match kind {
            DomainKind::Kvm | DomainKind::Qemu => ty.with_attribute(("machine", "q35")),
            DomainKind::Test => ty,
        };
        ty.write_text_content(BytesText::new("hvm"))?;
        match &spec.kernel {
            Some(boot) => {
                text_element(w, "kernel", &path_text(&boot.kernel))?;
                if let Some(initrd) = &boot.initrd {
                    text_element(w, "initrd", &path_text(initrd))?;
                }
                text_element(w, "cmdline", &boot.cmdline)?;
            }
            None => {
                w.create_element("boot")
                    .with_attribute(("dev", "hd"))
                    .write_empty()?;
            }
        }
        Ok(())
    })?;
    Ok(())
}

fn format_name(format: DiskFormat) -> &'static str {
    match format {
        DiskFormat::Qcow2 => "qcow2",
        DiskFormat::Raw => "raw",
    }
}

/// The disk's chain: its base image (itself standing alone), or nothing.
fn write_backing<W: io::Write>(w: &mut Writer<W>, backing: Option<&Backing>) -> io::Result<()> {
    match backing {
        Some(base) => {
            w.create_element("backingStore")
                .with_attribute(("type", "file"))
                .write_inner_content(|w| {
                    w.create_element("format")
                        .with_attribute(("type", format_name(base.format)))
                        .write_empty()?;
                    w.create_element("source")
                        .with_attribute(("file", path_text(&base.path).as_ref()))
                        .write_empty()?;
                    w.create_element("backingStore").write_empty()?;
                    Ok(())
                })?;
        }
        None => {
            w.create_element("backingStore").write_empty()?;
        }
    }
    Ok(())
}

/// A Port as a tap device the hypervisor makes (`<target dev=…/>`, libvirt's default
/// `managed` creates it) and the node's network agent puts on its network's bridge; virtio,
/// with no option ROM (iPXE is of no use to a guest booted from disk or kernel); with
/// [`TxChecksums::Guest`], none of virtio-net's offloads of what the guest sends (the
/// segmentation ones need the checksum one).
fn write_interface<W: io::Write>(
    w: &mut Writer<W>,
    nic: &InterfaceSpec,
    tx: TxChecksums,
) -> io::Result<()> {
    w.create_element("interface")
        .with_attribute(("type", "ethernet"))
        .write_inner_content(|w| {
            w.create_element("mac")
                .with_attribute(("address", nic.mac.as_str()))
                .write_empty()?;
            w.create_element("target")
                .with_attribute(("dev", nic.tap.as_str()))
                .write_empty()?;
            w.create_element("model")
                .with_attribute(("type", "virtio"))
                .write_empty()?;
            if tx == TxChecksums::Guest {
                w.create_element("driver").write_inner_content(|w| {
                    let mut host = w.create_element("host");
                    for offload in ["csum", "gso", "tso4", "tso6", "ecn", "ufo"] {
                        host = host.with_attribute((offload, "off"));
                    }
                    host.write_empty()?;
                    Ok(())
                })?;
            }
            if let Some(mtu) = nic.mtu {
                w.create_element("mtu")
                    .with_attribute(("size", mtu.to_string().as_str()))
                    .write_empty()?;
            }
            w.create_element("rom")
                .with_attribute(("enabled", "no"))
                .write_empty()?;
            Ok(())
        })?;
    Ok(())
}

/// The `<interface>` element of a Port on its own, as libvirt's attach-device takes it (the
/// same element the domain is defined with).
pub fn interface_xml(nic: &InterfaceSpec) -> String {
    interface_xml_with(nic, TxChecksums::Host)
}

/// [`interface_xml`], its checksums filled in by `tx`.
pub fn interface_xml_with(nic: &InterfaceSpec, tx: TxChecksums) -> String {
    let mut writer = Writer::new_with_indent(Vec::new(), b' ', 2);
    write_interface(&mut writer, nic, tx).expect("writing XML into a Vec<u8> cannot fail");
    String::from_utf8_lossy(&writer.into_inner()).into_owned()
}

/// The `<interface>` element that names the interface of MAC `mac` to libvirt's
/// detach-device (which finds a network interface by its MAC).
pub fn interface_by_mac_xml(mac: &str) -> String {
    let mut writer = Writer::new_with_indent(Vec::new(), b' ', 2);
    writer
        .create_element("interface")
        .with_attribute(("type", "ethernet"))
        .write_inner_content(|w| {
            w.create_element("mac")
                .with_attribute(("address", mac))
                .write_empty()?;
            Ok(())
        })
        .expect("writing XML into a Vec<u8> cannot fail");
    String::from_utf8_lossy(&writer.into_inner()).into_owned()
}

/// The network interfaces of a domain's XML (as libvirt writes it back), in document order:
/// every `<interface>` with a MAC address, whatever its type.
///
/// # Errors
/// [`MetadataError::Xml`] or [`MetadataError::Attribute`] for XML that does not parse.
pub fn attached_interfaces(xml: &str) -> Result<Vec<AttachedInterface>, MetadataError> {
    let mut reader = Reader::from_str(xml);
    let mut out = Vec::new();
    let mut current: Option<AttachedInterface> = None;
    let mut depth = 0usize;
    loop {
        match reader.read_event().map_err(MetadataError::Xml)? {
            Event::Start(e) if current.is_none() && e.local_name().as_ref() == "interface" => {
                current = Some(AttachedInterface {
                    mac: String::new(),
                    tap: None,
                    mtu: None,
                });
                depth = 0;
            }
            Event::Start(_) if current.is_some() => depth += 1,
            Event::Empty(e) if depth == 0 => {
                if let Some(nic) = current.as_mut() {
                    match e.local_name().as_ref() {
                        "mac" => nic.mac = attribute(&e, "address")?.unwrap_or_default(),
                        "target" => nic.tap = attribute(&e, "dev")?,
                        "mtu" => nic.mtu = attribute(&e, "size")?.and_then(|s| s.parse().ok()),
                        _ => {}
                    }
                }
            }
            Event::End(e) if depth == 0 && e.local_name().as_ref() == "interface" => {
                if let Some(nic) = current.take().filter(|n| !n.mac.is_empty()) {
                    out.push(nic);
                }
            }
            Event::End(_) if current.is_some() => depth = depth.saturating_sub(1),
            Event::Eof => return Ok(out),
            _ => {}
        }
    }
}

/// Whether `path` names a host block device (under `/dev/`: a volume's logical volume or
/// loop device) rather than a file: such a disk is `<disk type='block'>` with
/// `<source dev=…>`, as QEMU's `file` driver refuses a block device.
fn is_block_device(path: &Path) -> bool {
    path.starts_with("/dev/")
}

/// The scheme of a volume disk's path that names an NBD export of another node.
const NBD_SCHEME: &str = "nbd://";
/// The same, for an export served over TLS.
const NBD_TLS_SCHEME: &str = "nbd+tls://";

/// The path a volume disk served over NBD goes by: `nbd://HOST:PORT/NAME` (an IPv6 host in
/// brackets), or `nbd+tls://…` over TLS, written into the domain as `<disk type='network'>`
/// (with `tls='yes'`: QEMU then presents the node's certificate from libvirtd's
/// `nbd_tls_x509_cert_dir`, and checks the server's).
pub fn nbd_path(host: std::net::IpAddr, port: u16, name: &str, tls: bool) -> std::path::PathBuf {
    let host = match host {
        std::net::IpAddr::V4(a) => a.to_string(),
        std::net::IpAddr::V6(a) => format!("[{a}]"),
    };
    let scheme = if tls { NBD_TLS_SCHEME } else { NBD_SCHEME };
    format!("{scheme}{host}:{port}/{name}").into()
}

/// The host, port, export name and TLS of an [`nbd_path`].
fn parse_nbd(path: &Path) -> Option<(String, String, String, bool)> {
    let path = path.to_str()?;
    let (rest, tls) = match path.strip_prefix(NBD_TLS_SCHEME) {
        Some(rest) => (rest, true),
        None => (path.strip_prefix(NBD_SCHEME)?, false),
    };
    let (hostport, name) = rest.split_once('/')?;
    let (host, port) = hostport.rsplit_once(':')?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    Some((host.to_owned(), port.to_owned(), name.to_owned(), tls))
}

/// The disk's type attribute and the `<source>` attribute naming `path`.
fn source_of(path: &Path) -> (&'static str, &'static str) {
    if is_block_device(path) {
        ("block", "dev")
    } else {
        ("file", "file")
    }
}

/// The `<disk>` element of a Volume attached to a guest, on its own, as libvirt's
/// attach-device and detach-device take it: raw, no backing chain, its serial the guest's `/dev/disk/by-id/virtio-<serial>`.
pub fn volume_disk_xml(disk: &VolumeDisk) -> String {
    let mut writer = Writer::new_with_indent(Vec::new(), b' ', 2);
    write_volume_disk(&mut writer, disk).expect("writing XML into a Vec<u8> cannot fail");
    String::from_utf8_lossy(&writer.into_inner()).into_owned()
}

/// The `type` of the `<disk>` whose data is at `path`: an NBD export of another node
/// ([`nbd_path`]), a block device or a file.
fn disk_type(path: &Path) -> &'static str {
    match parse_nbd(path) {
        Some(_) => "network",
        None => source_of(path).0,
    }
}

/// The `<source>` of a disk whose data is at `path` (of [`disk_type`]).
fn write_source<W: io::Write>(w: &mut Writer<W>, path: &Path) -> io::Result<()> {
    match parse_nbd(path) {
        Some((host, port, name, tls)) => {
            let mut source = w
                .create_element("source")
                .with_attribute(("protocol", "nbd"))
                .with_attribute(("name", name.as_str()));
            if tls {
                source = source.with_attribute(("tls", "yes"));
            }
            source.write_inner_content(|w| {
                w.create_element("host")
                    .with_attribute(("name", host.as_str()))
                    .with_attribute(("port", port.as_str()))
                    .write_empty()?;
                Ok(())
            })?;
        }
        None => {
            w.create_element("source")
                .with_attribute((source_of(path).1, path_text(path).as_ref()))
                .write_empty()?;
        }
    }
    Ok(())
}

fn write_volume_disk<W: io::Write>(w: &mut Writer<W>, disk: &VolumeDisk) -> io::Result<()> {
    w.create_element("disk")
        .with_attribute(("type", disk_type(&disk.path)))
        .with_attribute(("device", "disk"))
        .write_inner_content(|w| {
            let mut driver = w
                .create_element("driver")
                .with_attribute(("name", "qemu"))
                .with_attribute(("type", "raw"));
            if disk.shareable {
                // Other guests write it too: nothing of it is kept in this host's page cache
                // (libvirt asks this of a shareable disk).
                driver = driver.with_attribute(("cache", "none"));
            }
            driver.write_empty()?;
            write_source(w, &disk.path)?;
            w.create_element("backingStore").write_empty()?;
            w.create_element("target")
                .with_attribute(("dev", disk.target.as_str()))
                .with_attribute(("bus", "virtio"))
                .write_empty()?;
            // A root disk has none (as the domain is defined with it).
            if !disk.serial.is_empty() {
                text_element(w, "serial", &disk.serial)?;
            }
            if disk.shareable {
                w.create_element("shareable").write_empty()?;
            }
            Ok(())
        })?;
    Ok(())
}

/// The value of element `e`'s attribute `name`, if it has one.
fn attribute(
    e: &quick_xml::events::BytesStart<'_>,
    name: &str,
) -> Result<Option<String>, MetadataError> {
    for attr in e.attributes() {
        let attr = attr.map_err(MetadataError::Attribute)?;
        if attr.key.local_name().as_ref() == name {
            let value = attr
                .normalized_value(quick_xml::XmlVersion::Implicit1_0)
                .map_err(MetadataError::Xml)?;
            return Ok(Some(value.into_owned()));
        }
    }
    Ok(None)
}

/// The disks of a domain's XML (as libvirt writes it back) other than its root disk and
/// config drive (`vda`, `vdb`): the volumes attached to it, in document order.
///
/// # Errors
/// [`MetadataError::Xml`] or [`MetadataError::Attribute`] for XML that does not parse.
pub fn attached_volumes(xml: &str) -> Result<Vec<AttachedVolume>, MetadataError> {
    let mut all = disks(xml)?;
    all.retain(|d| d.target != super::ROOT_DISK && d.target != "vdb");
    Ok(all)
}

/// Where the root disk (`vda`) of a domain's XML reads its data: a file, or an NBD export as
/// [`nbd_path`] spells it.
///
/// # Errors
/// As [`attached_volumes`].
pub fn root_source(xml: &str) -> Result<Option<std::path::PathBuf>, MetadataError> {
    Ok(disks(xml)?
        .into_iter()
        .find(|d| d.target == super::ROOT_DISK)
        .map(|d| d.path))
}

/// Every disk of a domain's XML, the root disk and the config drive too, as
/// [`attached_volumes`] reads a volume's.
///
/// # Errors
/// As [`attached_volumes`].
pub fn all_disks(xml: &str) -> Result<Vec<AttachedVolume>, MetadataError> {
    disks(xml)
}

/// The root disk (`vda`) of a domain's XML, as [`attached_volumes`] reads a volume's disk.
///
/// # Errors
/// As [`attached_volumes`].
pub fn root_disk(xml: &str) -> Result<Option<AttachedVolume>, MetadataError> {
    Ok(disks(xml)?
        .into_iter()
        .find(|d| d.target == super::ROOT_DISK))
}

/// Every disk of a domain's XML with a target and a source, in document order.
fn disks(xml: &str) -> Result<Vec<AttachedVolume>, MetadataError> {
    let mut reader = Reader::from_str(xml);
    let mut out = Vec::new();
    let mut in_disk = false;
    let (mut target, mut source, mut serial) = (None, None, None);
    // An NBD disk's source: its export name and TLS, then its host's name and port.
    let (mut nbd_name, mut nbd_host, mut nbd_tls) = (None, None, false);
    let mut in_backing = false;
    let mut in_serial = false;
    loop {
        match reader.read_event().map_err(MetadataError::Xml)? {
            Event::Start(e) | Event::Empty(e) if e.local_name().as_ref() == "disk" => {
                in_disk = true;
                (target, source, serial) = (None, None, None);
                (nbd_name, nbd_host, nbd_tls) = (None, None, false);
            }
            Event::Start(e) if in_disk && e.local_name().as_ref() == "backingStore" => {
                in_backing = true;
            }
            Event::End(e) if e.local_name().as_ref() == "backingStore" => in_backing = false,
            Event::Start(e) | Event::Empty(e)
                if in_disk
                    && !in_backing
                    && nbd_host.is_none()
                    && e.local_name().as_ref() == "host" =>
            {
                nbd_host = attribute(&e, "name")?.zip(attribute(&e, "port")?);
            }
            Event::Start(e) if in_disk && e.local_name().as_ref() == "serial" => {
                in_serial = true;
                serial = Some(String::new());
            }
            // The text comes in pieces, split at each character or entity reference.
            Event::Text(t) if in_serial => {
                if let Some(s) = serial.as_mut() {
                    s.push_str(&t.xml10_content());
                }
            }
            Event::GeneralRef(r) if in_serial => {
                let c = match r.resolve_char_ref().map_err(MetadataError::Xml)? {
                    Some(c) => c.to_string(),
                    None => quick_xml::escape::resolve_predefined_entity(&r)
                        .unwrap_or_default()
                        .to_string(),
                };
                if let Some(s) = serial.as_mut() {
                    s.push_str(&c);
                }
            }
            Event::End(e) if e.local_name().as_ref() == "serial" => in_serial = false,
            Event::Start(e) | Event::Empty(e)
                if in_disk && matches!(e.local_name().as_ref(), "target" | "source") =>
            {
                // Only the disk's own <source>, not one inside its <backingStore>.
                let is_target = e.local_name().as_ref() == "target";
                for attr in e.attributes() {
                    let attr = attr.map_err(MetadataError::Attribute)?;
                    let value = attr
                        .normalized_value(quick_xml::XmlVersion::Implicit1_0)
                        .map_err(MetadataError::Xml)?
                        .into_owned();
                    match (is_target, attr.key.local_name().as_ref()) {
                        (true, "dev") => target = Some(value),
                        (false, "file" | "dev") if source.is_none() => {
                            source = Some(std::path::PathBuf::from(value));
                        }
                        (false, "name") if !in_backing && nbd_name.is_none() => {
                            nbd_name = Some(value);
                        }
                        (false, "tls") if !in_backing => nbd_tls = value == "yes",
                        _ => {}
                    }
                }
            }
            Event::End(e) if e.local_name().as_ref() == "disk" => {
                in_disk = false;
                let nbd = match (nbd_name.take(), nbd_host.take()) {
                    (Some(name), Some((host, port))) => {
                        let host = host.parse().ok();
                        let port = port.parse().ok();
                        host.zip(port).map(|(h, p)| nbd_path(h, p, &name, nbd_tls))
                    }
                    _ => None,
                };
                if let (Some(t), Some(path)) = (target.take(), source.take().or(nbd)) {
                    out.push(AttachedVolume {
                        target: t,
                        path,
                        serial: serial.take(),
                        capacity: None,
                    });
                }
            }
            Event::Eof => return Ok(out),
            _ => {}
        }
    }
}

/// Empty PCIe root ports a q35 guest gets for volumes plugged in while it runs (q35 has no
/// hot-pluggable bus of its own; libvirt gives each device present at define a port).
pub const SPARE_ROOT_PORTS: usize = 8;

fn write_devices<W: io::Write>(
    w: &mut Writer<W>,
    spec: &DomainSpec,
    kind: DomainKind,
    tx: TxChecksums,
) -> io::Result<()> {
    w.create_element("devices").write_inner_content(|w| {
        if kind != DomainKind::Test {
            w.create_element("controller")
                .with_attribute(("type", "pci"))
                .with_attribute(("index", "0"))
                .with_attribute(("model", "pcie-root"))
                .write_empty()?;
            for _ in 0..SPARE_ROOT_PORTS {
                w.create_element("controller")
                    .with_attribute(("type", "pci"))
                    .with_attribute(("model", "pcie-root-port"))
                    .write_empty()?;
            }
        }
        for (index, disk) in spec.disks.iter().enumerate() {
            let target = virtio_disk_name(index);
            // A boot volume of another node's pool is its NBD export.
            w.create_element("disk")
                .with_attribute(("type", disk_type(&disk.path)))
                .with_attribute(("device", "disk"))
                .write_inner_content(|w| {
                    w.create_element("driver")
                        .with_attribute(("name", "qemu"))
                        .with_attribute(("type", format_name(disk.format)))
                        .write_empty()?;
                    write_source(w, &disk.path)?;
                    write_backing(w, disk.backing.as_ref())?;
                    w.create_element("target")
                        .with_attribute(("dev", target.as_str()))
                        .with_attribute(("bus", "virtio"))
                        .write_empty()?;
                    if disk.readonly {
                        w.create_element("readonly").write_empty()?;
                    }
                    Ok(())
                })?;
        }
        for nic in &spec.interfaces {
            write_interface(w, nic, tx)?;
        }
        let log = path_text(&spec.console_log);
        w.create_element("serial")
            .with_attribute(("type", "pty"))
            .write_inner_content(|w| {
                w.create_element("log")
                    .with_attribute(("file", log.as_ref()))
                    .with_attribute(("append", "on"))
                    .write_empty()?;
                w.create_element("target")
                    .with_attribute(("port", "0"))
                    .write_empty()?;
                Ok(())
            })?;
        w.create_element("console")
            .with_attribute(("type", "pty"))
            .write_inner_content(|w| {
                w.create_element("target")
                    .with_attribute(("type", "serial"))
                    .with_attribute(("port", "0"))
                    .write_empty()?;
                Ok(())
            })?;
        w.create_element("memballoon")
            .with_attribute(("model", "none"))
            .write_empty()?;
        Ok(())
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use quick_xml::events::Event;
    use quick_xml::reader::Reader;

    use super::*;
    use crate::compute::driver::{DiskSpec, KernelBoot};

    const HOSTILE: &str = "a<b>c&d'e\"f]]>g&amp;\tline\nnext";

    fn spec() -> DomainSpec {
        DomainSpec {
            name: format!("stratus-{HOSTILE}"),
            uuid: "5b1c9f51-9d0e-4a53-9a34-0f6b1d2c3e4f".into(),
            vcpus: 2,
            memory_mib: 512,
            kernel: Some(KernelBoot {
                kernel: PathBuf::from("/var/lib/stratus/images/k<1>&'\"/vmlinuz"),
                initrd: Some(PathBuf::from("/var/lib/stratus/images/initrd&.img")),
                cmdline: format!("console=ttyS0 root=/dev/vda1 {HOSTILE}"),
            }),
            disks: vec![
                DiskSpec {
                    path: PathBuf::from("/var/lib/stratus/servers/x/root<&>.qcow2"),
                    format: DiskFormat::Qcow2,
                    readonly: false,
                    backing: Some(Backing {
                        path: PathBuf::from("/var/lib/stratus/images/u/raw-sha256-<'&\">"),
                        format: DiskFormat::Raw,
                    }),
                },
                DiskSpec {
                    path: PathBuf::from("/var/lib/stratus/servers/x/config'\".iso"),
                    format: DiskFormat::Raw,
                    readonly: true,
                    backing: None,
                },
            ],
            console_log: PathBuf::from("/var/log/stratus/console \"<&>\".log"),
            interfaces: Vec::new(),
            owner: Owner {
                namespace: format!("ns-{HOSTILE}"),
                name: format!("name-{HOSTILE}"),
                uid: "5b1c9f51-9d0e-4a53-9a34-0f6b1d2c3e4f".into(),
            },
        }
    }

    /// One element as the test sees it: its path from the root, attributes and text.
    #[derive(Debug, Default)]
    struct Node {
        path: String,
        attrs: Vec<(String, String)>,
        text: String,
        empty: bool,
    }

    impl Node {
        fn attr(&self, key: &str) -> Option<&str> {
            self.attrs
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.as_str())
        }
    }

    /// Parses the document into a flat list of elements, failing on anything malformed.
    fn parse(xml: &str) -> Vec<Node> {
        let mut reader = Reader::from_str(xml);
        let mut stack: Vec<String> = Vec::new();
        let mut open: Vec<usize> = Vec::new();
        let mut nodes: Vec<Node> = Vec::new();
        loop {
            match reader.read_event().expect("well-formed XML") {
                ev @ (Event::Start(_) | Event::Empty(_)) => {
                    let (start, empty) = match ev {
                        Event::Start(s) => (s, false),
                        Event::Empty(s) => (s, true),
                        _ => unreachable!(),
                    };
                    let name = start.name().as_ref().to_owned();
                    stack.push(name);
                    let attrs = start
                        .attributes()
                        .map(|a| {
                            let a = a.expect("attribute");
                            let key = a.key.as_ref().to_owned();
                            let value = a
                                .normalized_value(quick_xml::XmlVersion::Implicit1_0)
                                .expect("attribute value")
                                .into_owned();
                            (key, value)
                        })
                        .collect();
                    nodes.push(Node {
                        path: stack.join("/"),
                        attrs,
                        text: String::new(),
                        empty,
                    });
                    if empty {
                        stack.pop();
                    } else {
                        open.push(nodes.len() - 1);
                    }
                }
                Event::End(_) => {
                    stack.pop();
                    open.pop();
                }
                Event::Text(t) => {
                    if let Some(&i) = open.last() {
                        nodes[i].text.push_str(&t.xml10_content());
                    }
                }
                Event::GeneralRef(r) => {
                    let i = *open.last().expect("reference inside an element");
                    match r.resolve_char_ref().expect("char ref") {
                        Some(c) => nodes[i].text.push(c),
                        None => nodes[i].text.push_str(
                            quick_xml::escape::resolve_predefined_entity(&r)
                                .expect("predefined entity"),
                        ),
                    }
                }
                Event::Eof => break,
                _ => {}
            }
        }
        assert!(stack.is_empty(), "unbalanced document");
        nodes
    }

    fn one<'a>(nodes: &'a [Node], path: &str) -> &'a Node {
        let found: Vec<&Node> = nodes.iter().filter(|n| n.path == path).collect();
        assert_eq!(found.len(), 1, "{path}: {found:?}");
        found[0]
    }

    #[test]
    fn hostile_values_are_escaped_and_round_trip() {
        let spec = spec();
        let xml = domain_xml(&spec, DomainKind::Qemu);
        // Nothing user-derived appears raw: the metacharacters only occur escaped.
        assert!(!xml.contains(HOSTILE), "{xml}");
        assert!(!xml.contains("a<b>"), "{xml}");
        assert!(xml.contains("a&lt;b&gt;c&amp;d"), "{xml}");

        let nodes = parse(&xml);
        let domain = one(&nodes, "domain");
        assert_eq!(domain.attr("type"), Some("qemu"));
        assert_eq!(one(&nodes, "domain/name").text, spec.name);
        assert_eq!(one(&nodes, "domain/uuid").text, spec.uuid);
        let meta = one(&nodes, "domain/metadata/stratus:server");
        assert_eq!(meta.attr("xmlns:stratus"), Some(METADATA_NS));
        assert_eq!(meta.attr("namespace"), Some(spec.owner.namespace.as_str()));
        assert_eq!(meta.attr("name"), Some(spec.owner.name.as_str()));
        assert_eq!(meta.attr("uid"), Some(spec.owner.uid.as_str()));
        let boot = spec.kernel.as_ref().expect("kernel");
        assert_eq!(one(&nodes, "domain/os/cmdline").text, boot.cmdline);
        assert_eq!(
            one(&nodes, "domain/os/kernel").text,
            boot.kernel.to_str().expect("utf-8")
        );
        let sources: Vec<&str> = nodes
            .iter()
            .filter(|n| n.path == "domain/devices/disk/source")
            .filter_map(|n| n.attr("file"))
            .collect();
        let expected: Vec<&str> = spec
            .disks
            .iter()
            .map(|d| d.path.to_str().expect("utf-8"))
            .collect();
        assert_eq!(sources, expected);
        assert_eq!(
            one(&nodes, "domain/devices/disk/backingStore/source").attr("file"),
            Some("/var/lib/stratus/images/u/raw-sha256-<'&\">")
        );
        assert_eq!(
            one(&nodes, "domain/devices/serial/log").attr("file"),
            spec.console_log.to_str()
        );
    }

    #[test]
    fn every_disk_chain_is_pinned_and_ends() {
        for kind in [DomainKind::Qemu, DomainKind::Kvm, DomainKind::Test] {
            let nodes = parse(&domain_xml(&spec(), kind));
            let chain: Vec<(&str, Option<&str>, bool)> = nodes
                .iter()
                .filter(|n| n.path.starts_with("domain/devices/disk/backingStore"))
                .map(|n| (n.path.as_str(), n.attr("type").or(n.attr("file")), n.empty))
                .collect();
            assert_eq!(
                chain,
                [
                    // The root overlay: its base, named here, and nothing under the base.
                    ("domain/devices/disk/backingStore", Some("file"), false),
                    ("domain/devices/disk/backingStore/format", Some("raw"), true),
                    (
                        "domain/devices/disk/backingStore/source",
                        Some("/var/lib/stratus/images/u/raw-sha256-<'&\">"),
                        true
                    ),
                    ("domain/devices/disk/backingStore/backingStore", None, true),
                    // The config drive stands alone.
                    ("domain/devices/disk/backingStore", None, true),
                ],
                "{kind:?}"
            );
            // Each disk has exactly one chain, right after its source.
            let disks = nodes
                .iter()
                .filter(|n| n.path == "domain/devices/disk")
                .count();
            let tops = nodes
                .iter()
                .filter(|n| n.path == "domain/devices/disk/backingStore")
                .count();
            assert_eq!((disks, tops), (2, 2));
            let no_attrs = nodes
                .iter()
                .filter(|n| n.path == "domain/devices/disk/backingStore" && n.empty)
                .all(|n| n.attrs.is_empty());
            assert!(no_attrs, "an empty <backingStore/> has no attributes");
        }
    }

    #[test]
    fn metadata_names_agree() {
        assert_eq!(
            METADATA_QNAME,
            [METADATA_PREFIX, METADATA_ELEMENT].join(":")
        );
        assert_eq!(METADATA_XMLNS, ["xmlns", METADATA_PREFIX].join(":"));
    }

    #[test]
    fn metadata_parses_back_from_what_we_write() {
        let owner = spec().owner;
        let xml = owner_metadata_xml(&owner);
        assert_eq!(parse_owner_metadata(&xml).expect("parse"), owner);
    }

    #[test]
    fn metadata_parses_libvirts_unprefixed_form() {
        let xml = r#"<server namespace="a&amp;b" name="n&lt;1&gt;" uid="u&quot;"/>"#;
        let owner = parse_owner_metadata(xml).expect("parse");
        assert_eq!(
            owner,
            Owner {
                namespace: "a&b".into(),
                name: "n<1>".into(),
                uid: "u\"".into()
            }
        );
        assert!(matches!(
            parse_owner_metadata(r#"<other name="x"/>"#),
            Err(MetadataError::WrongElement(e)) if e == "other"
        ));
        assert!(matches!(
            parse_owner_metadata(r#"<server name="x" uid="u"/>"#),
            Err(MetadataError::MissingAttribute("namespace"))
        ));
        assert!(matches!(
            parse_owner_metadata(""),
            Err(MetadataError::Empty)
        ));
        assert!(parse_owner_metadata("<server namespace='x").is_err());
    }

    #[test]
    fn shape_of_a_qemu_domain() {
        let mut spec = spec();
        spec.kernel = None;
        let nodes = parse(&domain_xml(&spec, DomainKind::Kvm));
        assert_eq!(one(&nodes, "domain").attr("type"), Some("kvm"));
        let memory = one(&nodes, "domain/memory");
        assert_eq!(
            (memory.attr("unit"), memory.text.as_str()),
            (Some("MiB"), "512")
        );
        assert_eq!(one(&nodes, "domain/vcpu").text, "2");
        let ty = one(&nodes, "domain/os/type");
        assert_eq!(ty.text, "hvm");
        assert_eq!(ty.attr("arch"), Some("x86_64"));
        assert_eq!(ty.attr("machine"), Some("q35"));
        assert_eq!(one(&nodes, "domain/os/boot").attr("dev"), Some("hd"));
        assert!(!nodes.iter().any(|n| n.path == "domain/os/kernel"));
        assert!(one(&nodes, "domain/features/acpi").empty);
        assert_eq!(
            one(&nodes, "domain/cpu").attr("mode"),
            Some("host-passthrough")
        );
        assert_eq!(one(&nodes, "domain/on_poweroff").text, "destroy");
        assert_eq!(one(&nodes, "domain/on_reboot").text, "restart");
        assert_eq!(one(&nodes, "domain/on_crash").text, "destroy");

        let targets: Vec<_> = nodes
            .iter()
            .filter(|n| n.path == "domain/devices/disk/target")
            .map(|n| (n.attr("dev"), n.attr("bus")))
            .collect();
        assert_eq!(
            targets,
            vec![(Some("vda"), Some("virtio")), (Some("vdb"), Some("virtio"))]
        );
        let drivers: Vec<_> = nodes
            .iter()
            .filter(|n| n.path == "domain/devices/disk/driver")
            .map(|n| (n.attr("name"), n.attr("type")))
            .collect();
        assert_eq!(
            drivers,
            vec![(Some("qemu"), Some("qcow2")), (Some("qemu"), Some("raw"))]
        );
        assert_eq!(
            nodes
                .iter()
                .filter(|n| n.path == "domain/devices/disk/readonly")
                .count(),
            1
        );
        assert_eq!(
            one(&nodes, "domain/devices/serial").attr("type"),
            Some("pty")
        );
        assert_eq!(
            one(&nodes, "domain/devices/serial/log").attr("append"),
            Some("on")
        );
        assert_eq!(
            one(&nodes, "domain/devices/console").attr("type"),
            Some("pty")
        );
        assert_eq!(
            one(&nodes, "domain/devices/memballoon").attr("model"),
            Some("none")
        );
        assert!(!nodes.iter().any(|n| n.path == "domain/devices/graphics"));
    }

    #[test]
    fn each_port_is_a_virtio_tap_interface_in_guest_order() {
        let mut spec = spec();
        spec.interfaces = vec![
            InterfaceSpec {
                mac: "fa:16:3e:00:00:01".into(),
                tap: "tap0f9e2c1a77b".into(),
                mtu: Some(1450),
            },
            InterfaceSpec {
                mac: "fa:16:3e:00:00:02".into(),
                tap: "tap1a2b3c4d5e6".into(),
                mtu: None,
            },
        ];
        let nodes = parse(&domain_xml(&spec, DomainKind::Qemu));
        let of = |path: &str, attr: &str| -> Vec<Option<String>> {
            nodes
                .iter()
                .filter(|n| n.path == path)
                .map(|n| n.attr(attr).map(str::to_owned))
                .collect()
        };
        assert_eq!(
            of("domain/devices/interface", "type"),
            [Some("ethernet".into()), Some("ethernet".into())]
        );
        assert_eq!(
            of("domain/devices/interface/mac", "address"),
            [
                Some("fa:16:3e:00:00:01".into()),
                Some("fa:16:3e:00:00:02".into())
            ]
        );
        assert_eq!(
            of("domain/devices/interface/target", "dev"),
            [Some("tap0f9e2c1a77b".into()), Some("tap1a2b3c4d5e6".into())]
        );
        // The hypervisor makes the tap: the target is not marked as made by someone else.
        assert_eq!(
            of("domain/devices/interface/target", "managed"),
            [None, None]
        );
        assert_eq!(
            of("domain/devices/interface/model", "type"),
            [Some("virtio".into()), Some("virtio".into())]
        );
        assert_eq!(
            of("domain/devices/interface/mtu", "size"),
            [Some("1450".into())]
        );
        assert_eq!(
            of("domain/devices/interface/rom", "enabled"),
            [Some("no".into()), Some("no".into())]
        );
    }

    #[test]
    fn guests_that_fill_in_their_checksums_are_offered_no_offload_of_what_they_send() {
        let mut spec = spec();
        let nic = InterfaceSpec {
            mac: "fa:16:3e:00:00:01".into(),
            tap: "tap0f9e2c1a77b".into(),
            mtu: Some(1450),
        };
        spec.interfaces = vec![nic.clone()];
        let offloads = ["csum", "gso", "tso4", "tso6", "ecn", "ufo"];
        for nodes in [
            parse(&domain_xml_with(
                &spec,
                DomainKind::Qemu,
                TxChecksums::Guest,
            )),
            // Hot-plugged, the same.
            parse(&interface_xml_with(&nic, TxChecksums::Guest))
                .into_iter()
                .map(|mut n| {
                    n.path = format!("domain/devices/{}", n.path);
                    n
                })
                .collect(),
        ] {
            let host = one(&nodes, "domain/devices/interface/driver/host");
            for o in offloads {
                assert_eq!(host.attr(o), Some("off"), "{o}");
            }
            // What the guest receives keeps its offloads.
            assert!(
                !nodes
                    .iter()
                    .any(|n| n.path == "domain/devices/interface/driver/guest")
            );
        }
        // By default the host fills them in: no driver element at all.
        for xml in [
            domain_xml(&spec, DomainKind::Qemu),
            domain_xml_with(&spec, DomainKind::Qemu, TxChecksums::Host),
            interface_xml(&nic),
        ] {
            assert!(
                !parse(&xml)
                    .iter()
                    .any(|n| n.path.ends_with("interface/driver")),
                "{xml}"
            );
        }
    }

    #[test]
    fn interfaces_read_back_as_written_and_as_libvirt_writes_them() {
        let mut spec = spec();
        let nics = [
            InterfaceSpec {
                mac: "fa:16:3e:00:00:01".into(),
                tap: "tap0f9e2c1a77b".into(),
                mtu: Some(1450),
            },
            InterfaceSpec {
                mac: "fa:16:3e:00:00:02".into(),
                tap: "tap1a2b3c4d5e6".into(),
                mtu: None,
            },
        ];
        spec.interfaces = nics.to_vec();
        let got = attached_interfaces(&domain_xml(&spec, DomainKind::Qemu)).expect("parse");
        assert_eq!(got.len(), 2);
        assert!(
            got.iter()
                .zip(&nics)
                .all(|(g, n)| g.is(n) && g.mtu == n.mtu)
        );
        // One element on its own, as attach-device takes it, reads back the same.
        let alone = attached_interfaces(&interface_xml(&nics[0])).expect("parse");
        assert!(alone.len() == 1 && alone[0].is(&nics[0]), "{alone:?}");
        // libvirt's live XML: an alias, an address and a model inside, an interface of
        // another type (no tap named), and one without a MAC, which is not listed.
        let live = "<domain><devices>\
            <interface type='ethernet'><mac address='fa:16:3e:00:00:01'/>\
              <target dev='tap0f9e2c1a77b' managed='yes'/><model type='virtio'/>\
              <mtu size='1450'/><alias name='net0'/><rom enabled='no'/>\
              <address type='pci' domain='0x0000' bus='0x01' slot='0x00' function='0x0'/>\
            </interface>\
            <interface type='network'><mac address='52:54:00:aa:bb:cc'/>\
              <source network='default'><extra/></source></interface>\
            <interface type='user'></interface>\
            </devices></domain>";
        let got = attached_interfaces(live).expect("parse");
        assert_eq!(
            got,
            [
                AttachedInterface {
                    mac: "fa:16:3e:00:00:01".into(),
                    tap: Some("tap0f9e2c1a77b".into()),
                    mtu: Some(1450),
                },
                AttachedInterface {
                    mac: "52:54:00:aa:bb:cc".into(),
                    tap: None,
                    mtu: None,
                },
            ]
        );
        // Detach names the interface by its MAC alone.
        let by_mac = parse(&interface_by_mac_xml("fa:16:3e:00:00:01"));
        assert_eq!(
            one(&by_mac, "interface/mac").attr("address"),
            Some("fa:16:3e:00:00:01")
        );
        assert!(attached_interfaces("<domain><devices><interface").is_err());
    }

    #[test]
    fn test_driver_domains_have_no_qemu_specifics() {
        let nodes = parse(&domain_xml(&spec(), DomainKind::Test));
        assert_eq!(one(&nodes, "domain").attr("type"), Some("test"));
        assert_eq!(one(&nodes, "domain/os/type").attr("machine"), None);
        assert!(!nodes.iter().any(|n| n.path == "domain/cpu"));
        let tcg = parse(&domain_xml(&spec(), DomainKind::Qemu));
        assert_eq!(one(&tcg, "domain/cpu").attr("mode"), Some("maximum"));
    }

    #[test]
    fn a_volume_disk_is_escaped_and_reads_back() {
        let file = VolumeDisk {
            path: PathBuf::from(format!("/var/lib/stratus/pool/{HOSTILE}")),
            target: "vdc".into(),
            serial: format!("s{HOSTILE}"),
            shareable: false,
        };
        let xml = volume_disk_xml(&file);
        assert!(!xml.contains(HOSTILE), "{xml}");
        let nodes = parse(&xml);
        assert_eq!(one(&nodes, "disk").attr("type"), Some("file"));
        assert_eq!(one(&nodes, "disk/source").attr("file"), file.path.to_str());
        assert_eq!(one(&nodes, "disk/driver").attr("type"), Some("raw"));
        assert!(one(&nodes, "disk/backingStore").empty);
        assert_eq!(one(&nodes, "disk/target").attr("dev"), Some("vdc"));
        assert_eq!(one(&nodes, "disk/serial").text, file.serial);
        // A logical volume or loop device is a block disk.
        assert_eq!(one(&nodes, "disk/driver").attr("cache"), None);
        assert!(!nodes.iter().any(|n| n.path == "disk/shareable"));
        let block = VolumeDisk {
            path: PathBuf::from("/dev/loop7"),
            target: "vdd".into(),
            serial: "abc".into(),
            shareable: false,
        };
        let nodes = parse(&volume_disk_xml(&block));
        assert_eq!(one(&nodes, "disk").attr("type"), Some("block"));
        assert_eq!(one(&nodes, "disk/source").attr("dev"), Some("/dev/loop7"));
        // A multi-attach volume: shareable, uncached.
        let shared = VolumeDisk {
            shareable: true,
            ..block.clone()
        };
        let nodes = parse(&volume_disk_xml(&shared));
        assert!(one(&nodes, "disk/shareable").empty);
        assert_eq!(one(&nodes, "disk/driver").attr("cache"), Some("none"));
        assert_eq!(one(&nodes, "disk/driver").attr("type"), Some("raw"));
        // Read back from a domain holding both, after its root disk and config drive.
        let mut domain = spec();
        domain.disks[0].path = PathBuf::from("/dev/loop3");
        domain.disks[0].backing = None;
        let whole = domain_xml(&domain, DomainKind::Qemu);
        let devices_end = whole.rfind("</devices>").expect("devices");
        let with_volumes = format!(
            "{}{}{}{}",
            &whole[..devices_end],
            volume_disk_xml(&file),
            volume_disk_xml(&block),
            &whole[devices_end..]
        );
        let got = attached_volumes(&with_volumes).expect("parse");
        assert_eq!(
            got,
            [
                AttachedVolume {
                    target: "vdc".into(),
                    path: file.path.clone(),
                    serial: Some(file.serial.clone()),
                    capacity: None,
                },
                AttachedVolume {
                    target: "vdd".into(),
                    path: block.path.clone(),
                    serial: Some("abc".into()),
                    capacity: None,
                },
            ]
        );
        // A root disk that is a block device (a boot volume) is written as one.
        let nodes = parse(&whole);
        let disks: Vec<_> = nodes
            .iter()
            .filter(|n| n.path == "domain/devices/disk")
            .map(|n| n.attr("type"))
            .collect();
        assert_eq!(disks, [Some("block"), Some("file")]);
        assert!(attached_volumes("<domain><devices><disk").is_err());
    }

    #[test]
    fn a_volume_of_another_node_is_a_network_disk_over_nbd() {
        for (host, port, tls, text) in [
            ("10.0.0.1", 40123, false, "nbd://10.0.0.1:40123/5b1fe0"),
            ("fd00::1", 10809, false, "nbd://[fd00::1]:10809/5b1fe0"),
            ("10.0.0.1", 10809, true, "nbd+tls://10.0.0.1:10809/5b1fe0"),
        ] {
            let path = nbd_path(host.parse().expect("an address"), port, "5b1fe0", tls);
            assert_eq!(path, PathBuf::from(text));
            let disk = VolumeDisk {
                path: path.clone(),
                target: "vdc".into(),
                serial: "abc".into(),
                shareable: false,
            };
            let xml = volume_disk_xml(&disk);
            let nodes = parse(&xml);
            assert_eq!(one(&nodes, "disk").attr("type"), Some("network"));
            assert_eq!(one(&nodes, "disk/source").attr("protocol"), Some("nbd"));
            assert_eq!(one(&nodes, "disk/source").attr("name"), Some("5b1fe0"));
            assert_eq!(
                one(&nodes, "disk/source").attr("tls"),
                tls.then_some("yes"),
                "{xml}"
            );
            assert_eq!(one(&nodes, "disk/source/host").attr("name"), Some(host));
            assert_eq!(
                one(&nodes, "disk/source/host").attr("port"),
                Some(port.to_string().as_str())
            );
            assert_eq!(one(&nodes, "disk/driver").attr("type"), Some("raw"));
            // Read back as libvirt writes it (a backing store, an index), as the same path.
            let back = xml.replace(
                "<backingStore/>",
                "<backingStore type='network' index='1'><source protocol='nbd' name='other'><host name='192.0.2.9' port='1'/></source></backingStore>",
            );
            let got = attached_volumes(&format!("<domain><devices>{back}</devices></domain>"))
                .expect("parse");
            assert_eq!(
                got,
                [AttachedVolume {
                    target: "vdc".into(),
                    path: path.clone(),
                    serial: Some("abc".into()),
                    capacity: None,
                }]
            );
            // A boot volume of another node is the root disk over NBD, as a volume is.
            let mut domain = spec();
            domain.disks[0].path = path.clone();
            domain.disks[0].format = DiskFormat::Raw;
            domain.disks[0].backing = None;
            let whole = domain_xml(&domain, DomainKind::Qemu);
            // Read back as the root disk's source (what a start checks), never as a volume.
            assert_eq!(root_source(&whole).expect("parse"), Some(path));
            assert!(attached_volumes(&whole).expect("parse").is_empty());
            let nodes = parse(&whole);
            let root = |p: &str| {
                nodes
                    .iter()
                    .find(|n| n.path == format!("domain/devices/disk{p}"))
                    .expect("the root disk")
            };
            assert_eq!(root("").attr("type"), Some("network"));
            assert_eq!(root("/source").attr("protocol"), Some("nbd"));
            assert_eq!(root("/source").attr("name"), Some("5b1fe0"));
            assert_eq!(root("/source").attr("tls"), tls.then_some("yes"));
            assert_eq!(root("/source").attr("file"), None);
            assert_eq!(root("/source/host").attr("name"), Some(host));
            assert_eq!(root("/target").attr("dev"), Some("vda"));
        }
    }

    #[test]
    fn a_qemu_guest_has_spare_root_ports_for_hot_plug() {
        let nodes = parse(&domain_xml(&spec(), DomainKind::Qemu));
        let models: Vec<_> = nodes
            .iter()
            .filter(|n| n.path == "domain/devices/controller")
            .map(|n| n.attr("model"))
            .collect();
        assert_eq!(models[0], Some("pcie-root"));
        assert_eq!(models.len(), 1 + SPARE_ROOT_PORTS);
        let test = parse(&domain_xml(&spec(), DomainKind::Test));
        assert!(!test.iter().any(|n| n.path == "domain/devices/controller"));
    }

    #[test]
    fn disk_names_continue_past_z() {
        let names: Vec<String> = [0, 1, 25, 26, 27, 51, 52, 701, 702]
            .into_iter()
            .map(virtio_disk_name)
            .collect();
        assert_eq!(
            names,
            [
                "vda", "vdb", "vdz", "vdaa", "vdab", "vdaz", "vdba", "vdzz", "vdaaa"
            ]
        );
    }
}
