//! The names and addresses the drivers accept, each a parsed type: interface and namespace
//! names checked against the kernel's rules (or derived from an object's uid), MAC addresses
//! and IPv4 prefixes. Nothing a user wrote reaches the kernel, nft or dnsmasq unchecked.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

/// A name that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// An interface name: 1 to 15 bytes of `[A-Za-z0-9_.-]`, not starting with `-` or `.`.
    #[error("invalid interface name {0:?}")]
    Interface(String),
    /// A namespace or server name: 1 to 63 bytes of `[a-z0-9-]`, not starting with `-`.
    #[error("invalid name {0:?}")]
    Name(String),
    /// A MAC address: six colon-separated hex bytes.
    #[error("invalid MAC address {0:?}")]
    Mac(String),
    /// An IPv4 prefix: `a.b.c.d/n`, n at most 32.
    #[error("invalid IPv4 prefix {0:?}")]
    Cidr(String),
}

/// The kernel's limit on interface names (IFNAMSIZ less the terminating NUL).
pub const IFNAME_MAX: usize = 15;

/// What a derived interface name is for; its two letters start the name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// A network's bridge (`br-…`).
    Bridge,
    /// A network's VXLAN device (`vx-…`).
    Vxlan,
    /// A vlan network's VLAN sub-interface of the node's physical interface (`vl-…`).
    Vlan,
    /// The bridge end of a veth pair (`ve-…`).
    Veth,
    /// The far end of a veth pair (`vp-…`).
    VethPeer,
    /// A guest's tap device (`tp-…`).
    Tap,
    /// A router's interface on one of its subnets, inside its namespace (`qr-…`).
    RouterPort,
    /// A router's interface on its external network, inside its namespace (`qg-…`).
    Gateway,
}

impl Role {
    fn prefix(self) -> &'static str {
        match self {
            Role::Bridge => "br",
            Role::Vxlan => "vx",
            Role::Vlan => "vl",
            Role::Veth => "ve",
            Role::VethPeer => "vp",
            Role::Tap => "tp",
            Role::RouterPort => "qr",
            Role::Gateway => "qg",
        }
    }
}

/// The first `n` hex digits of SHA-256 of `key`: names that stay the same for one object and
/// differ between objects (48 bits for interface names).
pub fn digest_hex(key: &str, n: usize) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, key.as_bytes());
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(64);
    for b in d.as_ref() {
        s.push(char::from(HEX[usize::from(b >> 4)]));
        s.push(char::from(HEX[usize::from(b & 0xf)]));
    }
    s.truncate(n);
    s
}

/// A network interface name the kernel accepts.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct IfName(String);

impl IfName {
    /// Checks `name` against the kernel's rules (and refuses `.` and `..`, `/`, `:`, spaces).
    pub fn new(name: &str) -> Result<Self, NameError> {
        let ok = !name.is_empty()
            && name.len() <= IFNAME_MAX
            && !name.starts_with(['-', '.'])
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
        if ok {
            Ok(Self(name.to_owned()))
        } else {
            Err(NameError::Interface(name.to_owned()))
        }
    }

    /// The name of the device playing `role` for the object with uid `key`: `br-` and the
    /// first 12 hex digits of its SHA-256 (15 bytes, whatever `key` holds).
    pub fn derived(role: Role, key: &str) -> Self {
        Self(format!("{}-{}", role.prefix(), digest_hex(key, 12)))
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for IfName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for IfName {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, NameError> {
        Self::new(s)
    }
}

/// A lower-case name of 1 to 63 bytes of `[a-z0-9-]`, not starting with `-`: network
/// namespaces (`ip netns` names), DHCP servers, host names in leases.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Name(String);

impl Name {
    /// Checks `name`.
    pub fn new(name: &str) -> Result<Self, NameError> {
        let ok = !name.is_empty()
            && name.len() <= 63
            && !name.starts_with('-')
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if ok {
            Ok(Self(name.to_owned()))
        } else {
            Err(NameError::Name(name.to_owned()))
        }
    }

    /// `prefix-` and the first 12 hex digits of SHA-256 of `key` (`prefix` is a constant of
    /// the caller's, checked like any name).
    pub fn derived(prefix: &str, key: &str) -> Result<Self, NameError> {
        Self::new(&format!("{prefix}-{}", digest_hex(key, 12)))
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for Name {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, NameError> {
        Self::new(s)
    }
}

/// Where a device lives: the host's own network namespace, or one made by `ip netns add`
/// (a file in `/run/netns`).
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Netns {
    /// The namespace the agent runs in.
    #[default]
    Host,
    /// A named namespace.
    Named(Name),
}

impl fmt::Display for Netns {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Netns::Host => f.write_str("(host)"),
            Netns::Named(n) => f.write_str(n.as_str()),
        }
    }
}

/// An Ethernet MAC address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// `00:00:00:00:00:00`: in a VXLAN device's FDB, the entry for broadcast, unknown
    /// unicast and multicast (each remote it names gets a copy).
    pub const ZERO: MacAddr = MacAddr([0; 6]);

    /// The bytes.
    pub fn octets(&self) -> [u8; 6] {
        self.0
    }

    /// Reads six bytes; `None` for any other length.
    pub fn from_slice(b: &[u8]) -> Option<Self> {
        <[u8; 6]>::try_from(b).ok().map(MacAddr)
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

impl FromStr for MacAddr {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, NameError> {
        let bad = || NameError::Mac(s.to_owned());
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for o in &mut out {
            let p = parts.next().ok_or_else(bad)?;
            if p.len() != 2 || !p.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(bad());
            }
            *o = u8::from_str_radix(p, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(MacAddr(out))
    }
}

/// An IPv4 address with a prefix length (`10.0.0.1/24`), as on an interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Ipv4Cidr {
    addr: Ipv4Addr,
    prefix: u8,
}

impl Ipv4Cidr {
    /// `addr/prefix`; `None` when `prefix` is over 32.
    pub fn new(addr: Ipv4Addr, prefix: u8) -> Option<Self> {
        (prefix <= 32).then_some(Self { addr, prefix })
    }

    /// The address.
    pub fn addr(&self) -> Ipv4Addr {
        self.addr
    }

    /// The prefix length.
    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// The netmask (`255.255.255.0` for /24).
    pub fn netmask(&self) -> Ipv4Addr {
        let bits = if self.prefix == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(self.prefix))
        };
        Ipv4Addr::from(bits)
    }

    /// The network address (host bits cleared).
    pub fn network(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) & u32::from(self.netmask()))
    }

    /// Whether `ip` is inside the prefix.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & u32::from(self.netmask()) == u32::from(self.network())
    }
}

impl fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl FromStr for Ipv4Cidr {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, NameError> {
        let bad = || NameError::Cidr(s.to_owned());
        let (a, p) = s.split_once('/').ok_or_else(bad)?;
        let addr: Ipv4Addr = a.parse().map_err(|_| bad())?;
        if p.is_empty() || p.len() > 2 || !p.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        let prefix: u8 = p.parse().map_err(|_| bad())?;
        Self::new(addr, prefix).ok_or_else(bad)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_names_follow_the_kernel() {
        for good in ["eth0", "br-0123456789ab", "a", "x_y.z-1"] {
            assert!(IfName::new(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "sixteen-chars-xx",
            "-lead",
            ".",
            "..",
            "a/b",
            "a:b",
            "a b",
            "a;rm",
            "é",
            "a\n",
        ] {
            assert_eq!(IfName::new(bad), Err(NameError::Interface(bad.into())));
        }
    }

    #[test]
    fn derived_names_fit_and_differ() {
        let hostile = "x; rm -rf / $(reboot) \"' \n".repeat(20);
        for key in ["uid-1", "uid-2", hostile.as_str()] {
            let n = IfName::derived(Role::Bridge, key);
            assert_eq!(n.as_str().len(), IFNAME_MAX);
            assert!(n.as_str().starts_with("br-"));
            assert_eq!(IfName::new(n.as_str()).as_ref(), Ok(&n));
        }
        assert_ne!(
            IfName::derived(Role::Bridge, "uid-1"),
            IfName::derived(Role::Bridge, "uid-2")
        );
        assert_ne!(
            IfName::derived(Role::Bridge, "uid-1").as_str()[3..],
            IfName::derived(Role::Vxlan, "uid-2").as_str()[3..]
        );
        assert_eq!(
            IfName::derived(Role::Vxlan, "uid-1"),
            IfName::derived(Role::Vxlan, "uid-1")
        );
        assert!(Name::derived("dhcp", &hostile).is_ok());
        assert!(Name::derived("Bad Prefix", "k").is_err());
    }

    #[test]
    fn names_are_lower_case_words() {
        assert!(Name::new("stratus-test-1").is_ok());
        for bad in ["", "-a", "A", "a_b", "a.b", "a/b", &"a".repeat(64)] {
            assert!(Name::new(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn macs_parse_and_print() {
        let m: MacAddr = "02:AB:cd:00:01:ff".parse().expect("mac");
        assert_eq!(m.to_string(), "02:ab:cd:00:01:ff");
        for bad in [
            "",
            "02:ab:cd:00:01",
            "02:ab:cd:00:01:ff:00",
            "2:ab:cd:00:01:ff",
            "02:ab:cd:00:01:fg",
            "02-ab-cd-00-01-ff",
            "+2:ab:cd:00:01:ff",
        ] {
            assert!(bad.parse::<MacAddr>().is_err(), "{bad}");
        }
        assert_eq!(MacAddr::ZERO.to_string(), "00:00:00:00:00:00");
    }

    #[test]
    fn cidrs_parse_and_compute() {
        let c: Ipv4Cidr = "10.1.2.3/24".parse().expect("cidr");
        assert_eq!(c.network(), Ipv4Addr::new(10, 1, 2, 0));
        assert_eq!(c.netmask(), Ipv4Addr::new(255, 255, 255, 0));
        assert!(c.contains(Ipv4Addr::new(10, 1, 2, 200)));
        assert!(!c.contains(Ipv4Addr::new(10, 1, 3, 1)));
        let all: Ipv4Cidr = "0.0.0.0/0".parse().expect("cidr");
        assert!(all.contains(Ipv4Addr::new(192, 0, 2, 1)));
        for bad in [
            "10.0.0.1",
            "10.0.0.1/33",
            "10.0.0.1/",
            "10.0.0/8",
            "10.0.0.1/+8",
        ] {
            assert!(bad.parse::<Ipv4Cidr>().is_err(), "{bad}");
        }
    }
}
