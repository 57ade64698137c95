//! Validation that needs no I/O and that JSON Schema cannot express: one-of rules, address
//! arithmetic (gateway inside CIDR, pools, host bits), ranges between two fields, duplicates.
//!
//! The API server runs [`validate`] after JSON-schema validation (and defaulting). It does not
//! repeat what the schema already checks (patterns, ranges, enums), except where it has to
//! parse a value anyway.

use std::collections::BTreeSet;
use std::net::IpAddr;

use base64::Engine as _;
use serde::de::DeserializeOwned;
use serde_json::Value;
use thiserror::Error;

use crate::compute::{
    FlavorSpec, HypervisorSpec, KeypairSpec, ServerGroupPolicy, ServerGroupSpec, ServerSpec,
};
use crate::identity::{ProjectSpec, QuotaSpec, RoleAssignmentSpec, S3CredentialSpec, UserSpec};
use crate::image::{ContainerFormat, DiskFormat, ImageSpec};
use crate::network::{
    EtherType, FloatingIPSpec, NetworkSpec, PortSpec, Protocol, Route, RouterSpec,
    SecurityGroupSpec, Segmentation, SubnetSpec,
};
use crate::object::{
    MAX_RING_SLOTS, ObjectNodeSpec, ObjectRingSpec, ObjectRingVersionSpec, RingType,
};
use crate::storage::{
    StorageBackend, StoragePoolSpec, VolumeExportSpec, VolumeSnapshotSpec, VolumeSpec,
};

/// One invalid field of an object, in the shape of a Kubernetes `StatusCause`.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{field}: {reason}{}", value.as_ref().map(|v| format!(" (value: {v:?})")).unwrap_or_default())]
pub struct FieldError {
    /// JSON path of the field at fault, e.g. `spec.gatewayIP` or `spec.rules[2].portRangeMax`.
    pub field: String,
    /// What is wrong, for a human.
    pub reason: String,
    /// The offending value, when there is a single one worth echoing back.
    pub value: Option<String>,
}

/// Checks `obj` (a whole object: `apiVersion`, `kind`, `metadata`, `spec`, ...) of the kind
/// `kind` in API group `group` (e.g. `"network.stratus.dev"`, `"Subnet"`).
///
/// The spec is decoded into its Rust type first, so unknown fields and type errors are
/// reported too: the CRD schemas cannot reject unknown fields, because kube-derive drops
/// `additionalProperties: false` to keep them structural. `status` is not checked: it is
/// written by Stratus, not by users.
///
/// # Errors
///
/// Every problem found, not only the first. An unknown group/kind is reported on `kind`.
pub fn validate(group: &str, kind: &str, obj: &Value) -> Result<(), Vec<FieldError>> {
    let mut errs = Errors::default();
    match (group, kind) {
        ("identity.stratus.dev", "Project") => spec::<ProjectSpec>(obj, &mut errs),
        ("identity.stratus.dev", "User") => spec::<UserSpec>(obj, &mut errs),
        ("identity.stratus.dev", "RoleAssignment") => spec::<RoleAssignmentSpec>(obj, &mut errs),
        ("identity.stratus.dev", "Quota") => spec::<QuotaSpec>(obj, &mut errs),
        ("identity.stratus.dev", "S3Credential") => spec::<S3CredentialSpec>(obj, &mut errs),
        ("compute.stratus.dev", "Flavor") => spec::<FlavorSpec>(obj, &mut errs),
        ("compute.stratus.dev", "Hypervisor") => spec::<HypervisorSpec>(obj, &mut errs),
        ("compute.stratus.dev", "Server") => spec::<ServerSpec>(obj, &mut errs),
        ("compute.stratus.dev", "Keypair") => spec::<KeypairSpec>(obj, &mut errs),
        ("compute.stratus.dev", "ServerGroup") => spec::<ServerGroupSpec>(obj, &mut errs),
        ("image.stratus.dev", "Image") => spec::<ImageSpec>(obj, &mut errs),
        ("network.stratus.dev", "Network") => spec::<NetworkSpec>(obj, &mut errs),
        ("network.stratus.dev", "Subnet") => spec::<SubnetSpec>(obj, &mut errs),
        ("network.stratus.dev", "Port") => spec::<PortSpec>(obj, &mut errs),
        ("network.stratus.dev", "Router") => spec::<RouterSpec>(obj, &mut errs),
        ("network.stratus.dev", "FloatingIP") => spec::<FloatingIPSpec>(obj, &mut errs),
        ("network.stratus.dev", "SecurityGroup") => spec::<SecurityGroupSpec>(obj, &mut errs),
        ("storage.stratus.dev", "Volume") => spec::<VolumeSpec>(obj, &mut errs),
        ("storage.stratus.dev", "VolumeSnapshot") => spec::<VolumeSnapshotSpec>(obj, &mut errs),
        ("storage.stratus.dev", "StoragePool") => spec::<StoragePoolSpec>(obj, &mut errs),
        ("storage.stratus.dev", "VolumeExport") => spec::<VolumeExportSpec>(obj, &mut errs),
        ("object.stratus.dev", "ObjectRing") => spec::<ObjectRingSpec>(obj, &mut errs),
        ("object.stratus.dev", "ObjectRingVersion") => {
            spec::<ObjectRingVersionSpec>(obj, &mut errs);
        }
        ("object.stratus.dev", "ObjectNode") => spec::<ObjectNodeSpec>(obj, &mut errs),
        _ => errs.push(
            "kind",
            format!("no Stratus kind {kind} in group {group}"),
            Some(kind),
        ),
    }
    if errs.0.is_empty() {
        Ok(())
    } else {
        Err(errs.0)
    }
}

/// Checks a decoded spec, pushing one [`FieldError`] per problem.
trait Check {
    fn check(&self, errs: &mut Errors);
}

#[derive(Default)]
struct Errors(Vec<FieldError>);

impl Errors {
    fn push(&mut self, field: impl Into<String>, reason: impl Into<String>, value: Option<&str>) {
        self.0.push(FieldError {
            field: field.into(),
            reason: reason.into(),
            value: value.map(str::to_owned),
        });
    }
}

fn spec<T: DeserializeOwned + Check>(obj: &Value, errs: &mut Errors) {
    let Some(spec) = obj.get("spec") else {
        errs.push("spec", "required", None);
        return;
    };
    match T::deserialize(spec) {
        Ok(spec) => spec.check(errs),
        Err(e) => errs.push("spec", e.to_string(), None),
    }
}

// ---------------------------------------------------------------------------------------------
// Address helpers.

/// An IP network: address plus prefix length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    fn parse(s: &str) -> Result<Self, String> {
        let (addr, prefix) = s
            .split_once('/')
            .ok_or_else(|| "not in CIDR notation (address/prefix)".to_owned())?;
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("{addr:?} is not an IP address"))?;
        let prefix: u8 = prefix
            .parse()
            .map_err(|_| format!("{prefix:?} is not a prefix length"))?;
        if prefix > bits(addr) {
            return Err(format!(
                "prefix length {prefix} exceeds {} for this address family",
                bits(addr)
            ));
        }
        Ok(Cidr { addr, prefix })
    }

    fn mask(&self) -> u128 {
        let bits = bits(self.addr);
        if self.prefix == 0 {
            0
        } else {
            (u128::MAX << (bits - self.prefix)) & full_mask(bits)
        }
    }

    fn network(&self) -> u128 {
        to_u128(self.addr) & self.mask()
    }

    fn broadcast(&self) -> u128 {
        self.network() | (!self.mask() & full_mask(bits(self.addr)))
    }

    fn host_bits_zero(&self) -> bool {
        to_u128(self.addr) == self.network()
    }

    fn contains(&self, ip: IpAddr) -> bool {
        ip.is_ipv4() == self.addr.is_ipv4() && to_u128(ip) & self.mask() == self.network()
    }
}

fn bits(ip: IpAddr) -> u8 {
    if ip.is_ipv4() { 32 } else { 128 }
}

fn full_mask(bits: u8) -> u128 {
    if bits == 128 {
        u128::MAX
    } else {
        (1u128 << bits) - 1
    }
}

fn to_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u128::from(u32::from(v4)),
        IpAddr::V6(v6) => u128::from(v6),
    }
}

/// Parses an IP address, reporting an error on `field` if it is not one.
fn ip(errs: &mut Errors, field: &str, s: &str) -> Option<IpAddr> {
    match s.parse() {
        Ok(ip) => Some(ip),
        Err(_) => {
            errs.push(field, "not a valid IP address", Some(s));
            None
        }
    }
}

/// Parses a CIDR whose host bits must be zero, reporting errors on `field`.
fn network_cidr(errs: &mut Errors, field: &str, s: &str) -> Option<Cidr> {
    match Cidr::parse(s) {
        Ok(c) if c.host_bits_zero() => Some(c),
        Ok(c) => {
            errs.push(
                field,
                format!(
                    "host bits must be zero (the network is {}/{})",
                    from_u128(c.network(), c.addr),
                    c.prefix
                ),
                Some(s),
            );
            None
        }
        Err(reason) => {
            errs.push(field, reason, Some(s));
            None
        }
    }
}

fn from_u128(n: u128, family: IpAddr) -> IpAddr {
    match family {
        IpAddr::V4(_) => IpAddr::V4(u32::try_from(n).unwrap_or_default().into()),
        IpAddr::V6(_) => IpAddr::V6(n.into()),
    }
}

fn family(ip: IpAddr) -> &'static str {
    if ip.is_ipv4() { "IPv4" } else { "IPv6" }
}

fn names_unique<'a>(errs: &mut Errors, field: &str, names: impl IntoIterator<Item = &'a str>) {
    let mut seen = BTreeSet::new();
    for (i, name) in names.into_iter().enumerate() {
        if !seen.insert(name) {
            errs.push(format!("{field}[{i}]"), "duplicate entry", Some(name));
        }
    }
}

fn routes(errs: &mut Errors, field: &str, routes: &[Route]) {
    let mut seen = BTreeSet::new();
    for (i, r) in routes.iter().enumerate() {
        let dest = network_cidr(errs, &format!("{field}[{i}].destination"), &r.destination);
        let hop = ip(errs, &format!("{field}[{i}].nexthop"), &r.nexthop);
        if let (Some(dest), Some(hop)) = (dest, hop)
            && dest.addr.is_ipv4() != hop.is_ipv4()
        {
            errs.push(
                format!("{field}[{i}].nexthop"),
                format!(
                    "{} next hop for an {} destination",
                    family(hop),
                    family(dest.addr)
                ),
                Some(&r.nexthop),
            );
        }
        if !seen.insert(r.destination.as_str()) {
            errs.push(
                format!("{field}[{i}].destination"),
                "duplicate route destination",
                Some(&r.destination),
            );
        }
    }
}

fn count_set<const N: usize>(fields: [bool; N]) -> usize {
    fields.into_iter().filter(|set| *set).count()
}

// ---------------------------------------------------------------------------------------------
// identity

impl Check for ProjectSpec {
    fn check(&self, _errs: &mut Errors) {}
}

impl Check for UserSpec {
    fn check(&self, errs: &mut Errors) {
        if let Some(email) = &self.email {
            let valid = email.split_once('@').is_some_and(|(local, domain)| {
                !local.is_empty() && !domain.is_empty() && !domain.contains('@')
            });
            if !valid {
                errs.push("spec.email", "not an email address", Some(email));
            }
        }
    }
}

impl Check for RoleAssignmentSpec {
    fn check(&self, _errs: &mut Errors) {}
}

impl Check for QuotaSpec {
    fn check(&self, _errs: &mut Errors) {}
}

impl Check for S3CredentialSpec {
    fn check(&self, _errs: &mut Errors) {}
}

// ---------------------------------------------------------------------------------------------
// compute

impl Check for FlavorSpec {
    fn check(&self, errs: &mut Errors) {
        // Nova's limits on extra spec keys and values.
        for (key, value) in &self.extra_specs {
            if key.is_empty() || key.len() > 255 {
                errs.push(
                    "spec.extraSpecs",
                    "keys must be 1 to 255 characters",
                    Some(key),
                );
            }
            if value.len() > 255 {
                errs.push(
                    format!("spec.extraSpecs[{key}]"),
                    "values must be at most 255 characters",
                    None,
                );
            }
        }
    }
}

impl Check for HypervisorSpec {
    fn check(&self, errs: &mut Errors) {
        if !self.disabled && self.disabled_reason.is_some() {
            errs.push(
                "spec.disabledReason",
                "only allowed when spec.disabled is true",
                self.disabled_reason.as_deref(),
            );
        }
    }
}

impl Check for KeypairSpec {
    fn check(&self, errs: &mut Errors) {
        let mut parts = self.public_key.split_ascii_whitespace();
        let (Some(key_type), Some(blob)) = (parts.next(), parts.next()) else {
            errs.push(
                "spec.publicKey",
                "expected \"<type> <base64 key> [comment]\"",
                None,
            );
            return;
        };
        let Ok(blob) = base64::engine::general_purpose::STANDARD.decode(blob) else {
            errs.push("spec.publicKey", "the key is not valid base64", None);
            return;
        };
        // The blob starts with the key type as an SSH string: u32 length, then the bytes.
        let embedded = blob
            .get(..4)
            .and_then(|len| <[u8; 4]>::try_from(len).ok())
            .map(|len| u32::from_be_bytes(len) as usize)
            .and_then(|len| blob.get(4..4 + len));
        if embedded != Some(key_type.as_bytes()) {
            errs.push(
                "spec.publicKey",
                format!("the key data is not an {key_type} key"),
                None,
            );
        }
    }
}

impl Check for ServerGroupSpec {
    fn check(&self, errs: &mut Errors) {
        if self.max_server_per_host.is_some() && self.policy != ServerGroupPolicy::AntiAffinity {
            errs.push(
                "spec.maxServerPerHost",
                "only allowed with policy anti-affinity",
                None,
            );
        }
    }
}

impl Check for ServerSpec {
    fn check(&self, errs: &mut Errors) {
        match (&self.image, &self.boot_volume) {
            (Some(_), None) | (None, Some(_)) => {}
            (None, None) => errs.push(
                "spec.image",
                "one of image and bootVolume is required",
                None,
            ),
            (Some(_), Some(_)) => errs.push(
                "spec.bootVolume",
                "only one of image and bootVolume may be given",
                None,
            ),
        }
        let mut ports = BTreeSet::new();
        for (i, n) in self.networks.iter().enumerate() {
            let field = format!("spec.networks[{i}]");
            match (&n.network, &n.port) {
                (Some(_), None) => {}
                (None, Some(port)) => {
                    if !ports.insert(port.as_str()) {
                        errs.push(format!("{field}.port"), "port used twice", Some(port));
                    }
                    if n.fixed_ip.is_some() {
                        errs.push(
                            format!("{field}.fixedIP"),
                            "only allowed with network (set addresses on the Port instead)",
                            n.fixed_ip.as_deref(),
                        );
                    }
                    if n.subnet.is_some() {
                        errs.push(
                            format!("{field}.subnet"),
                            "only allowed with network (set addresses on the Port instead)",
                            n.subnet.as_deref(),
                        );
                    }
                }
                (None, None) => errs.push(&field, "one of network and port is required", None),
                (Some(_), Some(_)) => errs.push(
                    format!("{field}.port"),
                    "only one of network and port may be given",
                    None,
                ),
            }
            if let Some(fixed) = &n.fixed_ip {
                ip(errs, &format!("{field}.fixedIP"), fixed);
            }
        }
        names_unique(
            errs,
            "spec.volumes",
            self.volumes.iter().map(|v| v.volume.as_str()),
        );
        if let Some(boot) = &self.boot_volume {
            for (i, v) in self.volumes.iter().enumerate() {
                if &v.volume == boot {
                    errs.push(
                        format!("spec.volumes[{i}].volume"),
                        "the boot volume cannot also be attached as a data volume",
                        Some(boot),
                    );
                }
            }
        }
        if let Some(data) = &self.user_data {
            let compact: String = data.chars().filter(|c| !c.is_ascii_whitespace()).collect();
            if base64::engine::general_purpose::STANDARD
                .decode(compact)
                .is_err()
            {
                errs.push("spec.userData", "not valid base64", None);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// image

impl Check for ImageSpec {
    fn check(&self, errs: &mut Errors) {
        let role = match self.disk_format {
            DiskFormat::Aki => Some(ContainerFormat::Aki),
            DiskFormat::Ari => Some(ContainerFormat::Ari),
            DiskFormat::Qcow2 | DiskFormat::Raw | DiskFormat::Iso => None,
        };
        let expected = role.unwrap_or(ContainerFormat::Bare);
        if self.container_format != expected {
            let name = match expected {
                ContainerFormat::Bare => "bare",
                ContainerFormat::Aki => "aki",
                ContainerFormat::Ari => "ari",
            };
            errs.push(
                "spec.containerFormat",
                format!("must be {name} for this diskFormat"),
                None,
            );
        }
        if role.is_some() {
            for (field, set) in [
                ("spec.kernelImage", self.kernel_image.is_some()),
                ("spec.ramdiskImage", self.ramdisk_image.is_some()),
                ("spec.kernelCmdline", self.kernel_cmdline.is_some()),
            ] {
                if set {
                    errs.push(field, "not allowed on a kernel or ramdisk image", None);
                }
            }
        } else if self.kernel_image.is_none() {
            if self.ramdisk_image.is_some() {
                errs.push("spec.ramdiskImage", "requires kernelImage", None);
            }
            if self.kernel_cmdline.is_some() {
                errs.push("spec.kernelCmdline", "requires kernelImage", None);
            }
        }
        for key in self.properties.keys() {
            if key.is_empty() || key.len() > 255 {
                errs.push(
                    "spec.properties",
                    "keys must be 1 to 255 characters",
                    Some(key),
                );
            }
        }
        let given = [
            self.source.url.is_some(),
            self.source.swift.is_some(),
            self.source.upload.is_some(),
        ]
        .into_iter()
        .filter(|g| *g)
        .count();
        match given {
            0 => errs.push(
                "spec.source",
                "required: exactly one of url, swift and upload",
                None,
            ),
            1 => {}
            _ => errs.push(
                "spec.source",
                "give exactly one of url, swift and upload, not several",
                None,
            ),
        }
        if let Some(swift) = &self.source.swift {
            for (field, reason) in swift.problems() {
                errs.push(format!("spec.source.swift.{field}"), reason, None);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// network

impl Check for NetworkSpec {
    fn check(&self, errs: &mut Errors) {
        match (self.segmentation, &self.physical_network) {
            (Segmentation::Flat | Segmentation::Vlan, None) => errs.push(
                "spec.physicalNetwork",
                "required when segmentation is flat or vlan",
                None,
            ),
            (Segmentation::Vxlan, Some(p)) => errs.push(
                "spec.physicalNetwork",
                "only allowed when segmentation is flat or vlan",
                Some(p),
            ),
            _ => {}
        }
        if let (Some(id), false) = (
            self.segmentation_id,
            self.segmentation == Segmentation::Vlan,
        ) {
            errs.push(
                "spec.segmentationID",
                "only allowed when segmentation is vlan",
                Some(&id.to_string()),
            );
        }
    }
}

impl Check for SubnetSpec {
    fn check(&self, errs: &mut Errors) {
        let Some(cidr) = network_cidr(errs, "spec.cidr", &self.cidr) else {
            return;
        };
        let v4 = cidr.addr.is_ipv4();
        // Addresses a host cannot use: for IPv4 the network and broadcast addresses (except
        // on /31 and /32 point-to-point links), for IPv6 the subnet-router anycast address.
        let reserved = |ip: IpAddr| {
            let n = to_u128(ip);
            if v4 {
                cidr.prefix < 31 && (n == cidr.network() || n == cidr.broadcast())
            } else {
                n == cidr.network()
            }
        };
        let in_subnet = |errs: &mut Errors, field: &str, s: &str| -> Option<IpAddr> {
            let addr = ip(errs, field, s)?;
            if !cidr.contains(addr) {
                errs.push(field, format!("not inside cidr {}", self.cidr), Some(s));
                return None;
            }
            if reserved(addr) {
                errs.push(
                    field,
                    "is the network or broadcast address of the cidr",
                    Some(s),
                );
                return None;
            }
            Some(addr)
        };

        let gateway = match (&self.gateway_ip, self.disable_gateway) {
            (Some(g), true) => {
                errs.push(
                    "spec.gatewayIP",
                    "not allowed when disableGateway is true",
                    Some(g),
                );
                None
            }
            (Some(g), false) => in_subnet(errs, "spec.gatewayIP", g),
            (None, _) => None,
        };

        let mut pools: Vec<(usize, u128, u128)> = Vec::new();
        for (i, pool) in self.allocation_pools.iter().enumerate() {
            let start = in_subnet(
                errs,
                &format!("spec.allocationPools[{i}].start"),
                &pool.start,
            );
            let end = in_subnet(errs, &format!("spec.allocationPools[{i}].end"), &pool.end);
            let (Some(start), Some(end)) = (start, end) else {
                continue;
            };
            let (s, e) = (to_u128(start), to_u128(end));
            if s > e {
                errs.push(
                    format!("spec.allocationPools[{i}].end"),
                    format!("before start {}", pool.start),
                    Some(&pool.end),
                );
                continue;
            }
            if let Some(g) = gateway
                && (s..=e).contains(&to_u128(g))
            {
                errs.push(
                    format!("spec.allocationPools[{i}]"),
                    "contains the gateway address",
                    self.gateway_ip.as_deref(),
                );
            }
            for &(j, os, oe) in &pools {
                if s <= oe && os <= e {
                    errs.push(
                        format!("spec.allocationPools[{i}]"),
                        format!("overlaps allocationPools[{j}]"),
                        None,
                    );
                }
            }
            pools.push((i, s, e));
        }

        let mut seen = BTreeSet::new();
        for (i, ns) in self.dns_nameservers.iter().enumerate() {
            ip(errs, &format!("spec.dnsNameservers[{i}]"), ns);
            if !seen.insert(ns.as_str()) {
                errs.push(
                    format!("spec.dnsNameservers[{i}]"),
                    "duplicate entry",
                    Some(ns),
                );
            }
        }

        routes(errs, "spec.hostRoutes", &self.host_routes);
        for (i, r) in self.host_routes.iter().enumerate() {
            if let Ok(dest) = Cidr::parse(&r.destination)
                && dest.addr.is_ipv4() != v4
            {
                errs.push(
                    format!("spec.hostRoutes[{i}].destination"),
                    format!("not an {} network like the cidr", family(cidr.addr)),
                    Some(&r.destination),
                );
            }
        }
    }
}

impl Check for PortSpec {
    fn check(&self, errs: &mut Errors) {
        let mut addrs = BTreeSet::new();
        for (i, f) in self.fixed_ips.iter().enumerate() {
            let field = format!("spec.fixedIPs[{i}]");
            if f.subnet.is_none() && f.ip_address.is_none() {
                errs.push(&field, "one of subnet and ipAddress is required", None);
            }
            if let Some(a) = &f.ip_address
                && let Some(addr) = ip(errs, &format!("{field}.ipAddress"), a)
                && !addrs.insert(addr)
            {
                errs.push(format!("{field}.ipAddress"), "duplicate address", Some(a));
            }
        }
        if let Some(mac) = &self.mac_address {
            check_mac(errs, "spec.macAddress", mac);
        }
        if let Some(groups) = &self.security_groups {
            names_unique(
                errs,
                "spec.securityGroups",
                groups.iter().map(String::as_str),
            );
        }
        if self.port_security_enabled == Some(false) {
            if self.security_groups.as_ref().is_some_and(|g| !g.is_empty()) {
                errs.push(
                    "spec.securityGroups",
                    "not allowed when portSecurityEnabled is false",
                    None,
                );
            }
            if !self.allowed_address_pairs.is_empty() {
                errs.push(
                    "spec.allowedAddressPairs",
                    "not allowed when portSecurityEnabled is false",
                    None,
                );
            }
        }
        for (i, pair) in self.allowed_address_pairs.iter().enumerate() {
            let field = format!("spec.allowedAddressPairs[{i}]");
            if pair.ip_address.contains('/') {
                if let Err(reason) = Cidr::parse(&pair.ip_address) {
                    errs.push(format!("{field}.ipAddress"), reason, Some(&pair.ip_address));
                }
            } else {
                ip(errs, &format!("{field}.ipAddress"), &pair.ip_address);
            }
            if let Some(mac) = &pair.mac_address {
                check_mac(errs, &format!("{field}.macAddress"), mac);
            }
        }
    }
}

fn check_mac(errs: &mut Errors, field: &str, mac: &str) {
    let octets: Vec<Option<u8>> = mac
        .split(':')
        .map(|o| u8::from_str_radix(o, 16).ok())
        .collect();
    match octets.as_slice() {
        [Some(first), rest @ ..] if rest.len() == 5 && rest.iter().all(Option::is_some) => {
            if first & 1 == 1 {
                errs.push(
                    field,
                    "a multicast MAC address cannot be assigned",
                    Some(mac),
                );
            } else if *first == 0 && rest.iter().all(|o| *o == Some(0)) {
                errs.push(
                    field,
                    "the all-zero MAC address cannot be assigned",
                    Some(mac),
                );
            }
        }
        _ => errs.push(field, "not a MAC address", Some(mac)),
    }
}

impl Check for RouterSpec {
    fn check(&self, errs: &mut Errors) {
        names_unique(
            errs,
            "spec.interfaces",
            self.interfaces.iter().map(|i| i.subnet.as_str()),
        );
        routes(errs, "spec.routes", &self.routes);
    }
}

impl Check for FloatingIPSpec {
    fn check(&self, errs: &mut Errors) {
        if let Some(fixed) = &self.fixed_ip {
            if self.port.is_none() {
                errs.push("spec.fixedIP", "requires port", Some(fixed));
            }
            ip(errs, "spec.fixedIP", fixed);
        }
    }
}

impl Check for SecurityGroupSpec {
    fn check(&self, errs: &mut Errors) {
        let mut seen = Vec::new();
        for (i, rule) in self.rules.iter().enumerate() {
            let field = format!("spec.rules[{i}]");
            let ports = matches!(rule.protocol, Protocol::Tcp | Protocol::Udp);
            match (rule.port_range_min, rule.port_range_max) {
                (Some(_), _) | (_, Some(_)) if !ports => errs.push(
                    format!("{field}.portRangeMin"),
                    "port ranges need protocol tcp or udp",
                    None,
                ),
                (None, Some(_)) => errs.push(
                    format!("{field}.portRangeMin"),
                    "required with portRangeMax",
                    None,
                ),
                (Some(min), Some(max)) if min > max => errs.push(
                    format!("{field}.portRangeMax"),
                    format!("less than portRangeMin {min}"),
                    Some(&max.to_string()),
                ),
                _ => {}
            }
            if rule.protocol != Protocol::Icmp
                && (rule.icmp_type.is_some() || rule.icmp_code.is_some())
            {
                errs.push(
                    format!("{field}.icmpType"),
                    "ICMP type and code need protocol icmp",
                    None,
                );
            } else if rule.icmp_code.is_some() && rule.icmp_type.is_none() {
                errs.push(format!("{field}.icmpType"), "required with icmpCode", None);
            }
            if rule.remote_ip_prefix.is_some() && rule.remote_group.is_some() {
                errs.push(
                    format!("{field}.remoteGroup"),
                    "only one of remoteIPPrefix and remoteGroup may be given",
                    None,
                );
            }
            if let Some(prefix) = &rule.remote_ip_prefix
                && let Some(cidr) = network_cidr(errs, &format!("{field}.remoteIPPrefix"), prefix)
            {
                let want_v4 = rule.ethertype == EtherType::IPv4;
                if cidr.addr.is_ipv4() != want_v4 {
                    errs.push(
                        format!("{field}.remoteIPPrefix"),
                        format!("not an {} prefix like the ethertype", family(cidr.addr)),
                        Some(prefix),
                    );
                }
            }
            // Rules that differ only in their description are the same rule (Neutron refuses
            // them with 409).
            let key = (
                rule.direction,
                rule.ethertype,
                rule.protocol,
                rule.port_range_min,
                rule.port_range_max,
                rule.icmp_type,
                rule.icmp_code,
                rule.remote_ip_prefix.as_deref(),
                rule.remote_group.as_deref(),
            );
            if let Some((j, _)) = seen.iter().find(|(_, k)| *k == key) {
                errs.push(field, format!("duplicate of rules[{j}]"), None);
            } else {
                seen.push((i, key));
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// storage

impl Check for VolumeSpec {
    fn check(&self, errs: &mut Errors) {
        if let Some(source) = &self.source {
            let set = count_set([
                source.image.is_some(),
                source.snapshot.is_some(),
                source.volume.is_some(),
            ]);
            if set != 1 {
                errs.push(
                    "spec.source",
                    "exactly one of image, snapshot and volume is required",
                    None,
                );
            }
        }
    }
}

impl Check for VolumeSnapshotSpec {
    fn check(&self, _errs: &mut Errors) {}
}

impl Check for VolumeExportSpec {
    fn check(&self, errs: &mut Errors) {
        if self.node == self.storage_node {
            errs.push(
                "spec.node",
                "must be another node than spec.storageNode: a volume's own node reads its data directly",
                Some(&self.node),
            );
        }
    }
}

impl Check for StoragePoolSpec {
    fn check(&self, errs: &mut Errors) {
        match self.backend {
            StorageBackend::Lvm => {
                if self.vg_name.is_none() {
                    errs.push("spec.vgName", "required for backend lvm", None);
                }
                if let Some(p) = &self.path {
                    errs.push("spec.path", "only allowed for backend file", Some(p));
                }
            }
            StorageBackend::File => {
                if let Some(vg) = &self.vg_name {
                    errs.push("spec.vgName", "only allowed for backend lvm", Some(vg));
                }
                match &self.path {
                    None => errs.push("spec.path", "required for backend file", None),
                    Some(p) if !p.starts_with('/') => {
                        errs.push("spec.path", "must be an absolute path", Some(p))
                    }
                    Some(p) if p.split('/').any(|c| c == "..") => {
                        errs.push("spec.path", "must not contain ..", Some(p))
                    }
                    Some(_) => {}
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// object

impl Check for ObjectRingVersionSpec {
    fn check(&self, _errs: &mut Errors) {}
}

impl Check for ObjectNodeSpec {
    fn check(&self, _errs: &mut Errors) {}
}

impl Check for ObjectRingSpec {
    fn check(&self, errs: &mut Errors) {
        if self.policy_index.is_some() && self.ring_type != RingType::Object {
            errs.push("spec.policyIndex", "only allowed for object rings", None);
        }
        // 2^partPower × replicas replica slots, each 2 bytes in the ring file and the
        // builder state: bounded so a ring version fits in one API object.
        let slots = 1u64
            .checked_shl(u32::from(self.part_power))
            .unwrap_or(u64::MAX)
            .saturating_mul(u64::from(self.replicas));
        if self.part_power > 32 || slots > MAX_RING_SLOTS {
            errs.push(
                "spec.partPower",
                format!(
                    "2^partPower × replicas must be at most {MAX_RING_SLOTS} (a ring version is kept in one API object)"
                ),
                Some(&self.part_power.to_string()),
            );
        }
        if let Some(o) = self.overload
            && !(o.is_finite() && (0.0..=100.0).contains(&o))
        {
            errs.push(
                "spec.overload",
                "must be a number from 0 to 100",
                Some(&o.to_string()),
            );
        }
        let mut seen = BTreeSet::new();
        // One address is one node: Swift names a server by its address.
        let mut nodes: std::collections::BTreeMap<&str, &str> = std::collections::BTreeMap::new();
        for (i, d) in self.devices.iter().enumerate() {
            let field = format!("spec.devices[{i}]");
            if let Some(node) = d.node.as_deref()
                && let Some(other) = nodes.insert(d.ip.as_str(), node)
                && other != node
            {
                errs.push(
                    format!("{field}.node"),
                    format!(
                        "address {} is node {other:?}'s in another device: one address, one node",
                        d.ip
                    ),
                    Some(node),
                );
            }
            match d.ip.parse::<IpAddr>() {
                Ok(IpAddr::V4(_)) => {}
                _ => errs.push(format!("{field}.ip"), "not an IPv4 address", Some(&d.ip)),
            }
            if !d.weight.is_finite() || d.weight < 0.0 {
                errs.push(
                    format!("{field}.weight"),
                    "must be a finite number >= 0",
                    Some(&d.weight.to_string()),
                );
            }
            if !seen.insert((d.ip.as_str(), d.port, d.device.as_str())) {
                errs.push(
                    field,
                    "duplicate device (same ip, port and device)",
                    Some(&format!("{}:{}/{}", d.ip, d.port, d.device)),
                );
            }
        }
    }
}

#[cfg(test)]
mod tests;
