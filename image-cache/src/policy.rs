//! The operator's policy for image URLs and image data (as Glance's import filtering): which
//! schemes, hosts, ports and addresses may be fetched from, and how much may be fetched.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, ToSocketAddrs};
use std::str::FromStr;

/// Redirects followed for one download, by default.
pub const DEFAULT_MAX_REDIRECTS: u32 = 3;
/// Bytes one download may bring, by default (8 GiB).
pub const DEFAULT_MAX_BYTES: u64 = 8 << 30;
/// Largest virtual disk size an image may declare, by default (2 TiB).
pub const DEFAULT_MAX_VIRTUAL_SIZE: u64 = 2 << 40;

/// What may be fetched, from where, and how much.
///
/// By default: `http` and `https` on any port, to any address but loopback, link-local,
/// private (RFC 1918, CGNAT, unique local IPv6), unspecified, multicast and the control
/// plane's own addresses; at most
/// [`DEFAULT_MAX_REDIRECTS`] redirects (each hop checked like the first URL) and
/// [`DEFAULT_MAX_BYTES`] bytes; images of at most [`DEFAULT_MAX_VIRTUAL_SIZE`] virtual bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// Allow `file:` URLs (local paths on the fetching host).
    pub allow_file: bool,
    /// Hosts (optionally with a port) fetched from whatever they resolve to: loopback,
    /// link-local or a control-plane host. A control-plane socket address stays refused.
    pub allow_hosts: Vec<HostRule>,
    /// Ports URLs may name; empty: any.
    pub allow_ports: Vec<u16>,
    /// Allow loopback addresses (`127.0.0.0/8`, `::1`).
    pub allow_loopback: bool,
    /// Allow link-local addresses (`169.254.0.0/16`, where cloud metadata services live, and
    /// `fe80::/10`).
    pub allow_link_local: bool,
    /// Allow private addresses (`10.0.0.0/8`, `172.16.0.0/12`, `192.168.0.0/16`, CGNAT's
    /// `100.64.0.0/10`, unique local `fc00::/7`): where a cloud's own networks and services
    /// usually live, so refused unless the operator opens them.
    pub allow_private: bool,
    /// The control plane's addresses (API servers, etcd). These exact socket addresses are
    /// always refused (an unspecified IP stands for every address with its port); other ports
    /// of their hosts unless named in `allow_hosts` or of an allowed class (loopback with
    /// `allow_loopback`).
    pub control_plane: Vec<SocketAddr>,
    /// Redirects followed for one download.
    pub max_redirects: u32,
    /// Bytes one download may bring; a larger one is cut and removed.
    pub max_bytes: u64,
    /// Largest virtual size (bytes) an image's disk may have.
    pub max_virtual_size: u64,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            allow_file: false,
            allow_hosts: Vec::new(),
            allow_ports: Vec::new(),
            allow_loopback: false,
            allow_link_local: false,
            allow_private: false,
            control_plane: Vec::new(),
            max_redirects: DEFAULT_MAX_REDIRECTS,
            max_bytes: DEFAULT_MAX_BYTES,
            max_virtual_size: DEFAULT_MAX_VIRTUAL_SIZE,
        }
    }
}

/// A host, with or without a port, as given to `--image-url-allow-hosts`: `images.example`,
/// `127.0.0.1:8099`, `[::1]:8080`, `::1`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostRule {
    /// Host name (lowercase) or IP address (IPv6 without brackets).
    pub host: String,
    /// The only port it applies to; `None`: every port.
    pub port: Option<u16>,
}

/// A host rule that does not parse.
#[derive(Debug, thiserror::Error)]
#[error("invalid host {input:?}: {why}")]
pub struct HostRuleError {
    /// The text given.
    pub input: String,
    /// What is wrong with it.
    pub why: &'static str,
}

impl FromStr for HostRule {
    type Err = HostRuleError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |why| HostRuleError {
            input: s.to_owned(),
            why,
        };
        let port = |p: &str| p.parse::<u16>().map_err(|_| err("the port is not 0-65535"));
        let (host, port) = if let Some(rest) = s.strip_prefix('[') {
            let (host, after) = rest.split_once(']').ok_or(err("no closing ']'"))?;
            match after {
                "" => (host, None),
                _ => match after.strip_prefix(':') {
                    Some(p) => (host, Some(port(p)?)),
                    None => return Err(err("only ':PORT' may follow ']'")),
                },
            }
        } else if s.matches(':').count() > 1 {
            // A bare IPv6 address.
            (s, None)
        } else {
            match s.split_once(':') {
                Some((h, p)) => (h, Some(port(p)?)),
                None => (s, None),
            }
        };
        if host.is_empty() {
            return Err(err("empty host"));
        }
        if host.contains(':') && host.parse::<IpAddr>().is_err() {
            return Err(err("not an IPv6 address"));
        }
        if !host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._:".contains(&b))
        {
            return Err(err("a host is letters, digits, '-', '.', or an IP address"));
        }
        Ok(Self {
            host: host.to_ascii_lowercase(),
            port,
        })
    }
}

impl fmt::Display for HostRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.host.contains(':'), self.port) {
            (true, Some(p)) => write!(f, "[{}]:{p}", self.host),
            (false, Some(p)) => write!(f, "{}:{p}", self.host),
            (_, None) => f.write_str(&self.host),
        }
    }
}

/// Why the policy refuses a URL.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// A scheme other than `http`/`https` (or `file` where allowed).
    #[error("scheme {0:?} is not allowed")]
    Scheme(String),
    /// A URL without a host.
    #[error("the URL names no host")]
    NoHost,
    /// A port not in the allowed list.
    #[error("port {0} is not allowed")]
    Port(u16),
    /// The host resolves to nothing.
    #[error("host {host:?} does not resolve: {why}")]
    Unresolved {
        /// The host.
        host: String,
        /// The resolver's answer.
        why: String,
    },
    /// The host resolves to an address of a refused class.
    #[error("host {host:?} resolves to {addr}, a {class} address")]
    Address {
        /// The host.
        host: String,
        /// The refused address.
        addr: IpAddr,
        /// What kind of address it is.
        class: AddressClass,
    },
    /// More redirects than allowed.
    #[error("more than {0} redirects")]
    TooManyRedirects(u32),
    /// A redirect without a usable `Location`.
    #[error("a redirect with no valid Location")]
    BadRedirect,
}

/// Classes of addresses refused by default.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddressClass {
    /// `127.0.0.0/8`, `::1`.
    Loopback,
    /// `169.254.0.0/16`, `fe80::/10`.
    LinkLocal,
    /// `10.0.0.0/8`, `172.16.0.0/12`, `192.168.0.0/16`, `100.64.0.0/10`, `fc00::/7`, the
    /// deprecated site-local `fec0::/10`, and the local-use NAT64 prefix `64:ff9b:1::/48`.
    Private,
    /// Special-purpose ranges no image is served from: `192.0.0.0/24`, `198.18.0.0/15`,
    /// `240.0.0.0/4`, the discard prefix `100::/64` and Teredo tunnels `2001::/32`.
    Reserved,
    /// `0.0.0.0/8`, `::`: on Linux these reach the host itself.
    Unspecified,
    /// Multicast and broadcast.
    Multicast,
    /// One of the control plane's addresses.
    ControlPlane,
}

impl fmt::Display for AddressClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Loopback => "loopback",
            Self::LinkLocal => "link-local",
            Self::Private => "private",
            Self::Reserved => "reserved",
            Self::Unspecified => "unspecified",
            Self::Multicast => "multicast",
            Self::ControlPlane => "control-plane",
        })
    }
}

/// The class of `ip` if the policy refuses it by default. An IPv6 address that carries an
/// IPv4 one a translator or tunnel reaches (IPv4-mapped `::ffff:0:0/96`, IPv4-compatible
/// `::/96`, NAT64 `64:ff9b::/96`, 6to4 `2002::/16`) is of the class of the IPv4 address.
fn refused_class(ip: IpAddr) -> Option<AddressClass> {
    match ip.to_canonical() {
        IpAddr::V4(v4) => {
            let [a, b, c, _] = v4.octets();
            if a == 0 {
                Some(AddressClass::Unspecified)
            } else if v4.is_loopback() {
                Some(AddressClass::Loopback)
            } else if v4.is_link_local() {
                Some(AddressClass::LinkLocal)
            } else if v4.is_multicast() || v4 == Ipv4Addr::BROADCAST {
                Some(AddressClass::Multicast)
            } else if v4.is_private() || is_shared(v4) {
                Some(AddressClass::Private)
            } else if (a, b, c) == (192, 0, 0) || (a == 198 && b & 0xfe == 18) || a >= 240 {
                Some(AddressClass::Reserved)
            } else {
                None
            }
        }
        IpAddr::V6(v6) => {
            let s = v6.segments();
            if let Some(v4) = embedded_ipv4(v6) {
                refused_class(IpAddr::V4(v4))
            } else if v6.is_unspecified() {
                Some(AddressClass::Unspecified)
            } else if v6.is_loopback() {
                Some(AddressClass::Loopback)
            } else if v6.is_unicast_link_local() {
                Some(AddressClass::LinkLocal)
            } else if v6.is_multicast() {
                Some(AddressClass::Multicast)
            } else if v6.is_unique_local() || s[0] & 0xffc0 == 0xfec0 || s[..3] == [0x64, 0xff9b, 1]
            {
                Some(AddressClass::Private)
            } else if s[..4] == [0x100, 0, 0, 0] || s[..2] == [0x2001, 0] {
                Some(AddressClass::Reserved)
            } else {
                None
            }
        }
    }
}

/// The IPv4 address an IPv6 one carries for a translator or tunnel to reach: IPv4-compatible
/// `::a.b.c.d` (not `::` nor `::1`), NAT64's well-known `64:ff9b::a.b.c.d`, 6to4's
/// `2002:AABB:CCDD::/48`. IPv4-mapped addresses are mapped by [`IpAddr::to_canonical`].
fn embedded_ipv4(v6: Ipv6Addr) -> Option<Ipv4Addr> {
    let (s, o) = (v6.segments(), v6.octets());
    let low = Ipv4Addr::new(o[12], o[13], o[14], o[15]);
    let compatible = s[..6] == [0; 6] && !(s[6] == 0 && s[7] <= 1);
    if compatible || s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        Some(low)
    } else if s[0] == 0x2002 {
        Some(Ipv4Addr::new(o[2], o[3], o[4], o[5]))
    } else {
        None
    }
}

/// Whether `ip` is in `100.64.0.0/10`, the carrier-grade NAT range (RFC 6598).
fn is_shared(ip: Ipv4Addr) -> bool {
    let [a, b, ..] = ip.octets();
    a == 100 && (b & 0xc0) == 64
}

/// A URL that passed the policy, with the addresses to connect to (and only those).
#[derive(Debug, Clone)]
pub(crate) struct Checked {
    pub addrs: Vec<SocketAddr>,
}

impl Policy {
    /// Checks an `http`/`https` URL and resolves its host once.
    ///
    /// # Errors
    ///
    /// The [`Refusal`] that applies first: scheme, port, then each resolved address.
    pub(crate) fn check_http(&self, url: &url::Url) -> Result<Checked, Refusal> {
        if !matches!(url.scheme(), "http" | "https") {
            return Err(Refusal::Scheme(url.scheme().to_owned()));
        }
        let host = match url.host() {
            Some(url::Host::Domain(d)) => d.to_ascii_lowercase(),
            Some(url::Host::Ipv4(ip)) => ip.to_string(),
            Some(url::Host::Ipv6(ip)) => ip.to_string(),
            None => return Err(Refusal::NoHost),
        };
        let port = url.port_or_known_default().ok_or(Refusal::NoHost)?;
        let named = self
            .allow_hosts
            .iter()
            .any(|r| r.host == host && r.port.is_none_or(|p| p == port));
        if !named && !self.allow_ports.is_empty() && !self.allow_ports.contains(&port) {
            return Err(Refusal::Port(port));
        }
        let addrs: Vec<SocketAddr> = match url.host() {
            Some(url::Host::Ipv4(ip)) => vec![SocketAddr::new(ip.into(), port)],
            Some(url::Host::Ipv6(ip)) => vec![SocketAddr::new(ip.into(), port)],
            _ => (host.as_str(), port)
                .to_socket_addrs()
                .map_err(|e| Refusal::Unresolved {
                    host: host.clone(),
                    why: e.to_string(),
                })?
                .collect(),
        };
        if addrs.is_empty() {
            return Err(Refusal::Unresolved {
                host,
                why: "no addresses".into(),
            });
        }
        // Every address must pass: a name that also points somewhere refused is refused.
        for addr in &addrs {
            self.check_addr(&host, named, *addr)?;
        }
        Ok(Checked { addrs })
    }

    fn check_addr(&self, host: &str, named: bool, addr: SocketAddr) -> Result<(), Refusal> {
        let ip = addr.ip().to_canonical();
        let refuse = |class| {
            Err(Refusal::Address {
                host: host.to_owned(),
                addr: ip,
                class,
            })
        };
        let control_socket = self.control_plane.iter().any(|c| {
            c.port() == addr.port() && (c.ip().is_unspecified() || c.ip().to_canonical() == ip)
        });
        if control_socket {
            return refuse(AddressClass::ControlPlane);
        }
        if named {
            return Ok(());
        }
        let class = refused_class(ip);
        let allowed = match class {
            Some(AddressClass::Loopback) => self.allow_loopback,
            Some(AddressClass::LinkLocal) => self.allow_link_local,
            Some(AddressClass::Private) => self.allow_private,
            _ => false,
        };
        if allowed {
            return Ok(());
        }
        if self
            .control_plane
            .iter()
            .any(|c| c.ip().to_canonical() == ip)
        {
            return refuse(AddressClass::ControlPlane);
        }
        match class {
            Some(class) => refuse(class),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(s: &str) -> url::Url {
        url::Url::parse(s).expect("test URL")
    }

    fn refused(policy: &Policy, s: &str) -> Refusal {
        match policy.check_http(&url(s)) {
            Err(r) => r,
            Ok(c) => panic!("{s} passed: {c:?}"),
        }
    }

    #[test]
    fn host_rules_parse() {
        let rule = |s: &str| s.parse::<HostRule>().expect(s);
        assert_eq!(
            rule("127.0.0.1:8099"),
            HostRule {
                host: "127.0.0.1".into(),
                port: Some(8099)
            }
        );
        assert_eq!(rule("Images.Example").host, "images.example");
        assert_eq!(rule("Images.Example").port, None);
        assert_eq!(rule("[::1]:80").host, "::1");
        assert_eq!(rule("[::1]:80").port, Some(80));
        assert_eq!(rule("::1").port, None);
        assert_eq!(rule("[::1]:80").to_string(), "[::1]:80");
        assert_eq!(rule("127.0.0.1:8099").to_string(), "127.0.0.1:8099");
        for bad in [
            "", ":80", "h:99999", "h:x", "[::1", "[::1]x", "a b", "a/b:1", "1:2:zz",
        ] {
            assert!(bad.parse::<HostRule>().is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn refused_addresses_by_default() {
        let p = Policy::default();
        for (u, class) in [
            ("http://127.0.0.1/x", AddressClass::Loopback),
            ("http://127.9.9.9:8080/x", AddressClass::Loopback),
            ("http://[::1]/x", AddressClass::Loopback),
            ("http://[::ffff:127.0.0.1]/x", AddressClass::Loopback),
            ("http://169.254.169.254/latest", AddressClass::LinkLocal),
            ("http://[fe80::1]/x", AddressClass::LinkLocal),
            ("http://0.0.0.0/x", AddressClass::Unspecified),
            ("http://0.1.2.3/x", AddressClass::Unspecified),
            ("http://[::]/x", AddressClass::Unspecified),
            ("http://224.0.0.1/x", AddressClass::Multicast),
            ("http://255.255.255.255/x", AddressClass::Multicast),
            // Decimal and short forms are the same addresses to the URL parser.
            ("http://2130706433/x", AddressClass::Loopback),
            ("http://127.1/x", AddressClass::Loopback),
            ("http://localhost/x", AddressClass::Loopback),
        ] {
            match refused(&p, u) {
                Refusal::Address { class: c, .. } => assert_eq!(c, class, "{u}"),
                other => panic!("{u}: {other:?}"),
            }
        }
        assert_eq!(
            refused(&p, "ftp://example.com/x"),
            Refusal::Scheme("ftp".into())
        );
        assert_eq!(
            refused(&p, "file:///etc/passwd"),
            Refusal::Scheme("file".into())
        );
        assert!(p.check_http(&url("http://192.0.2.10:8080/x")).is_ok());
        assert!(p.check_http(&url("https://[2001:db8::1]/x")).is_ok());
    }

    #[test]
    fn private_ranges_are_refused_unless_allowed() {
        let p = Policy::default();
        let private = [
            "https://10.1.2.3/x",
            "http://10.255.255.255/x",
            "http://172.16.0.1/x",
            "http://172.31.255.254/x",
            "http://192.168.1.1:8080/x",
            "http://100.64.0.1/x",
            "http://100.127.255.254/x",
            "http://[fc00::1]/x",
            "http://[fd12:3456:789a::1]/x",
            // The same addresses spelled as IPv4-mapped IPv6, or in decimal.
            "http://[::ffff:10.0.0.1]/x",
            "http://167772161/x",
        ];
        for u in private {
            match refused(&p, u) {
                Refusal::Address { class, .. } => assert_eq!(class, AddressClass::Private, "{u}"),
                other => panic!("{u}: {other:?}"),
            }
        }
        // Their neighbours are public.
        for u in [
            "http://172.32.0.1/x",
            "http://172.15.255.255/x",
            "http://100.128.0.1/x",
            "http://100.63.255.255/x",
            "http://192.169.0.1/x",
            "http://11.0.0.1/x",
            "http://[fe00::1]/x",
        ] {
            assert!(p.check_http(&url(u)).is_ok(), "{u}");
        }
        let allowed = Policy {
            allow_private: true,
            ..Policy::default()
        };
        for u in private {
            assert!(allowed.check_http(&url(u)).is_ok(), "{u}");
        }
        // Allowing private ranges opens neither loopback nor link-local, nor the control plane.
        assert!(allowed.check_http(&url("http://127.0.0.1/x")).is_err());
        assert!(
            allowed
                .check_http(&url("http://169.254.169.254/x"))
                .is_err()
        );
        let with_etcd = Policy {
            control_plane: vec!["10.0.0.5:2379".parse().expect("addr")],
            ..allowed.clone()
        };
        assert!(matches!(
            refused(&with_etcd, "http://10.0.0.5:2379/v3/kv/range"),
            Refusal::Address {
                class: AddressClass::ControlPlane,
                ..
            }
        ));
        // A host named by the operator is fetched from whatever private address it has.
        let mirror = Policy {
            allow_hosts: vec!["10.0.0.7:8080".parse().expect("rule")],
            ..Policy::default()
        };
        assert!(mirror.check_http(&url("http://10.0.0.7:8080/x")).is_ok());
        assert!(mirror.check_http(&url("http://10.0.0.7:8081/x")).is_err());
    }

    /// IPv4 addresses behind IPv6 translation and tunnel prefixes are judged as the IPv4
    /// address; special-purpose ranges are refused.
    #[test]
    fn translated_and_special_purpose_addresses_are_refused() {
        let p = Policy::default();
        for (u, class) in [
            // NAT64, well-known prefix.
            ("http://[64:ff9b::7f00:1]/x", AddressClass::Loopback),
            ("http://[64:ff9b::10.0.0.1]/x", AddressClass::Private),
            (
                "http://[64:ff9b::169.254.169.254]/x",
                AddressClass::LinkLocal,
            ),
            // NAT64, local-use prefix: local by definition.
            ("http://[64:ff9b:1::c000:20a]/x", AddressClass::Private),
            ("http://[64:ff9b:1:ffff::1]/x", AddressClass::Private),
            // 6to4.
            ("http://[2002:7f00:1::1]/x", AddressClass::Loopback),
            ("http://[2002:a9fe:a9fe::]/x", AddressClass::LinkLocal),
            ("http://[2002:c0a8:101::1]/x", AddressClass::Private),
            // IPv4-compatible.
            ("http://[::127.0.0.1]/x", AddressClass::Loopback),
            ("http://[::10.1.2.3]/x", AddressClass::Private),
            ("http://[::0.0.0.2]/x", AddressClass::Unspecified),
            // Site-local.
            ("http://[fec0::1]/x", AddressClass::Private),
            ("http://[feff::1]/x", AddressClass::Private),
            // Teredo, discard.
            (
                "http://[2001:0:4136:e378:8000:63bf:3fff:fdd2]/x",
                AddressClass::Reserved,
            ),
            ("http://[100::1]/x", AddressClass::Reserved),
            // IPv4 special-purpose ranges.
            ("http://192.0.0.1/x", AddressClass::Reserved),
            ("http://192.0.0.255/x", AddressClass::Reserved),
            ("http://198.18.0.1/x", AddressClass::Reserved),
            ("http://198.19.255.254/x", AddressClass::Reserved),
            ("http://240.0.0.1/x", AddressClass::Reserved),
            ("http://254.255.255.255/x", AddressClass::Reserved),
            ("http://100.64.0.1/x", AddressClass::Private),
            ("http://0.0.0.1/x", AddressClass::Unspecified),
            ("http://239.255.255.250/x", AddressClass::Multicast),
            ("http://[ff02::1]/x", AddressClass::Multicast),
        ] {
            match refused(&p, u) {
                Refusal::Address { class: c, .. } => assert_eq!(c, class, "{u}"),
                other => panic!("{u}: {other:?}"),
            }
        }
        // Public IPv4 addresses behind the same prefixes, and the ranges' neighbours, pass.
        for u in [
            "http://[64:ff9b::c633:6401]/x",
            "http://[2002:c633:6401::1]/x",
            "http://[64:ff9b:2::1]/x",
            "http://192.0.1.1/x",
            "http://198.17.255.255/x",
            "http://198.20.0.1/x",
            "http://223.255.255.254/x",
            "http://[2001:1::1]/x",
            "http://[fe00::1]/x",
        ] {
            assert!(p.check_http(&url(u)).is_ok(), "{u}");
        }
        // An operator's allowance of private ranges opens none of the reserved ones.
        let allowed = Policy {
            allow_private: true,
            ..Policy::default()
        };
        assert!(
            allowed
                .check_http(&url("http://[64:ff9b::10.0.0.1]/x"))
                .is_ok()
        );
        assert!(allowed.check_http(&url("http://198.18.0.1/x")).is_err());
        assert!(
            allowed
                .check_http(&url("http://[64:ff9b::7f00:1]/x"))
                .is_err()
        );
    }

    #[test]
    fn operator_exceptions() {
        let loopback = Policy {
            allow_loopback: true,
            ..Policy::default()
        };
        assert!(loopback.check_http(&url("http://127.0.0.1:8099/x")).is_ok());
        assert!(
            loopback
                .check_http(&url("http://169.254.169.254/"))
                .is_err()
        );

        let one_port = Policy {
            allow_hosts: vec!["127.0.0.1:8099".parse().expect("rule")],
            ..Policy::default()
        };
        let checked = one_port
            .check_http(&url("http://127.0.0.1:8099/x"))
            .expect("the named host and port");
        assert_eq!(checked.addrs, ["127.0.0.1:8099".parse().expect("addr")]);
        assert!(matches!(
            refused(&one_port, "http://127.0.0.1:8098/x"),
            Refusal::Address {
                class: AddressClass::Loopback,
                ..
            }
        ));

        let ports = Policy {
            allow_ports: vec![80, 443],
            ..Policy::default()
        };
        assert!(ports.check_http(&url("http://192.0.2.1/x")).is_ok());
        assert_eq!(
            refused(&ports, "http://192.0.2.1:8080/x"),
            Refusal::Port(8080)
        );
    }

    #[test]
    fn the_control_plane_is_refused() {
        let p = Policy {
            allow_loopback: true,
            control_plane: vec![
                "127.0.0.1:6443".parse().expect("addr"),
                "192.0.2.7:2379".parse().expect("addr"),
                "0.0.0.0:2380".parse().expect("addr"),
            ],
            ..Policy::default()
        };
        for u in [
            "https://127.0.0.1:6443/api",
            "http://192.0.2.7:2379/v3/kv/range",
            // Another port of a control-plane host.
            "http://192.0.2.7:80/",
            // An unspecified control-plane address stands for every address with its port.
            "http://192.0.2.99:2380/",
        ] {
            assert!(
                matches!(
                    refused(&p, u),
                    Refusal::Address {
                        class: AddressClass::ControlPlane,
                        ..
                    }
                ),
                "{u}"
            );
        }
        // Loopback is allowed here, but not the API server's own port.
        assert!(
            Policy {
                allow_loopback: false,
                ..p.clone()
            }
            .check_http(&url("http://127.0.0.1:8099/x"))
            .is_err()
        );
        assert!(p.check_http(&url("http://127.0.0.1:8099/x")).is_ok());
        // Naming a control-plane host opens its other ports, never the control plane's own.
        let named = Policy {
            allow_hosts: vec!["192.0.2.7".parse().expect("rule")],
            ..p
        };
        assert!(named.check_http(&url("http://192.0.2.7:80/x")).is_ok());
        assert!(named.check_http(&url("http://192.0.2.7:2379/x")).is_err());
    }
}
