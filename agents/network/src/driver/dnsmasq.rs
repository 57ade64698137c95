//! Static-lease DHCP with dnsmasq: one daemon per network, inside the namespace of the
//! interface it serves, given its leases in a hosts file that is written atomically and
//! reloaded with SIGHUP. The daemon outlives the agent; its pid file and command line let a
//! restarted agent find and adopt it.
//!
//! Per network, in `<state dir>/<name>/`: `hosts` (the leases), `loaded` (the digest of the
//! hosts file the daemon last read), `pid`, `leases` (dnsmasq's own) and `log`. dnsmasq
//! drops privileges to `nobody` and rereads `hosts` as that user, so the state directory
//! must be searchable by everyone (this module makes its own directories 0755 and files
//! 0644).

use std::collections::BTreeSet;
use std::fs;
use std::io::Write;
use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal, kill_process};

use super::names::digest_hex;
use super::netns;
use super::{Dhcp, IfName, Ipv4Cidr, MacAddr, Name, Netns, RouteSpec};

/// Failures of a [`Dhcp`] call.
#[derive(Debug, thiserror::Error)]
pub enum DhcpError {
    /// The spec is not valid; nothing was changed.
    #[error("invalid DHCP spec: {0}")]
    Invalid(String),
    /// A program failed.
    #[error("{what}: {stderr}")]
    Command {
        /// What was being done.
        what: String,
        /// What it said.
        stderr: String,
    },
    /// A file or process could not be handled.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A failure injected into a fake.
    #[error("injected failure of {0}")]
    Injected(&'static str),
}

/// One network's DHCP server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DhcpSpec {
    /// The server's name (derived from the network's uid).
    pub name: Name,
    /// The namespace of the interface it serves.
    pub netns: Netns,
    /// The interface (it must hold an address in `subnet`).
    pub interface: IfName,
    /// The subnet leases come from.
    pub subnet: Ipv4Cidr,
    /// The default gateway handed out; `None` hands out none.
    pub router: Option<Ipv4Addr>,
    /// Lease time in seconds (at least 120).
    pub lease_secs: u32,
    /// Classless static routes handed out (option 121; the default route through `router`
    /// goes with them, as a client given option 121 ignores option 3), each through a host
    /// of the subnet.
    pub routes: Vec<RouteSpec>,
    /// The leases: nothing else is handed out.
    pub leases: Vec<StaticLease>,
}

/// A MAC's fixed address.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct StaticLease {
    /// The client's MAC.
    pub mac: MacAddr,
    /// Its address.
    pub ip: Ipv4Addr,
    /// Its host name.
    pub hostname: Option<Name>,
}

/// A network's server as found on the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DhcpStatus {
    /// The daemon's pid, when it runs.
    pub pid: Option<u32>,
    /// The leases in its hosts file, sorted.
    pub leases: Vec<StaticLease>,
}

impl DhcpSpec {
    /// Checks the spec: lease time at least 120 s; every lease and the router inside the
    /// subnet and neither its network nor its broadcast address; no MAC or address twice.
    pub fn validate(&self) -> Result<(), DhcpError> {
        let bad = |m: String| Err(DhcpError::Invalid(m));
        if self.lease_secs < 120 {
            return bad(format!("lease time {} s is under 120 s", self.lease_secs));
        }
        if self.subnet.prefix() > 30 {
            return bad(format!("subnet {} has no room for hosts", self.subnet));
        }
        let broadcast =
            Ipv4Addr::from(u32::from(self.subnet.network()) | !u32::from(self.subnet.netmask()));
        let usable = |ip: Ipv4Addr| {
            self.subnet.contains(ip) && ip != self.subnet.network() && ip != broadcast
        };
        if let Some(r) = self.router
            && !usable(r)
        {
            return bad(format!("router {r} is not a host of {}", self.subnet));
        }
        if let Some(r) = self.routes.iter().find(|r| !usable(r.gateway)) {
            return bad(format!(
                "route {r} is not through a host of {}",
                self.subnet
            ));
        }
        let (mut macs, mut ips) = (BTreeSet::new(), BTreeSet::new());
        for l in &self.leases {
            if !usable(l.ip) {
                return bad(format!("lease {} is not a host of {}", l.ip, self.subnet));
            }
            if !macs.insert(l.mac) || !ips.insert(l.ip) {
                return bad(format!(
                    "lease {} {} repeats a MAC or an address",
                    l.mac, l.ip
                ));
            }
        }
        Ok(())
    }
}

/// The hosts file for `leases`: one `mac,ip[,hostname]` line each, sorted. Every field is a
/// parsed type, so no line can carry another option.
pub fn hosts_file(leases: &[StaticLease]) -> String {
    let mut sorted: Vec<&StaticLease> = leases.iter().collect();
    sorted.sort();
    let mut out = String::new();
    for l in sorted {
        out.push_str(&l.mac.to_string());
        out.push(',');
        out.push_str(&l.ip.to_string());
        if let Some(h) = &l.hostname {
            out.push(',');
            out.push_str(h.as_str());
        }
        out.push('\n');
    }
    out
}

/// Reads a hosts file back; lines that are not `mac,ip[,hostname]` are left out.
pub fn parse_hosts(text: &str) -> Vec<StaticLease> {
    let mut out: Vec<StaticLease> = text
        .lines()
        .filter_map(|line| {
            let mut f = line.split(',');
            let mac = f.next()?.parse().ok()?;
            let ip = f.next()?.parse().ok()?;
            let hostname = match f.next() {
                Some(h) => Some(Name::new(h).ok()?),
                None => None,
            };
            f.next()
                .is_none()
                .then_some(StaticLease { mac, ip, hostname })
        })
        .collect();
    out.sort();
    out
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> DhcpError {
    let what = what.into();
    move |source| DhcpError::Io { what, source }
}

/// dnsmasq on the host.
#[derive(Debug, Clone)]
pub struct Dnsmasq {
    dir: PathBuf,
}

impl Dnsmasq {
    /// Servers whose files live under `state_dir` (made as needed).
    pub fn new(state_dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: state_dir.into(),
        }
    }

    fn dir(&self, name: &Name) -> PathBuf {
        self.dir.join(name.as_str())
    }

    /// dnsmasq's arguments for `spec`: DHCP only (no DNS, no /etc files), on one interface,
    /// static leases only, daemonised with a pid file.
    pub fn args(&self, spec: &DhcpSpec) -> Vec<String> {
        let dir = self.dir(&spec.name);
        let file = |f: &str| dir.join(f).to_string_lossy().into_owned();
        let router = match spec.router {
            Some(r) => format!("--dhcp-option=option:router,{r}"),
            None => "--dhcp-option=option:router".to_owned(),
        };
        let mut args = vec![
            "--conf-file=/dev/null".to_owned(),
            "--no-hosts".to_owned(),
            "--no-resolv".to_owned(),
            "--port=0".to_owned(),
            format!("--interface={}", spec.interface),
            "--except-interface=lo".to_owned(),
            "--bind-interfaces".to_owned(),
            format!(
                "--dhcp-range={},static,{},{}",
                spec.subnet.network(),
                spec.subnet.netmask(),
                spec.lease_secs
            ),
            router,
            format!("--dhcp-hostsfile={}", file("hosts")),
            format!("--dhcp-leasefile={}", file("leases")),
            format!("--pid-file={}", file("pid")),
            format!("--log-facility={}", file("log")),
        ];
        args.extend(routes_arg(spec));
        args
    }
    /// The daemon serving `name` (its pid and arguments), if one runs: the pid file names a
    /// live process whose command line is dnsmasq's with this server's pid file.
    fn running(&self, name: &Name) -> Option<(u32, Vec<String>)> {
        let dir = self.dir(name);
        let pid: u32 = fs::read_to_string(dir.join("pid"))
            .ok()?
            .trim()
            .parse()
            .ok()?;
        let cmdline = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let mut argv = cmdline
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned());
        let program = argv.next()?;
        let args: Vec<String> = argv.collect();
        let ours = format!("--pid-file={}", dir.join("pid").to_string_lossy());
        (Path::new(&program).file_name()? == "dnsmasq" && args.contains(&ours))
            .then_some((pid, args))
    }

    fn start(&self, spec: &DhcpSpec, args: &[String]) -> Result<(), DhcpError> {
        let dir = self.dir(&spec.name);
        // Replies with a bad checksum are dropped by clients when the veth offloads it.
        let mut ethtool = Command::new("ethtool");
        ethtool.args(["-K", spec.interface.as_str(), "tx", "off"]);
        let out = netns::output(&spec.netns, ethtool).map_err(io("run ethtool"))?;
        if !out.status.success() {
            return Err(DhcpError::Command {
                what: format!("turn tx offload off on {}", spec.interface),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            });
        }
        match fs::remove_file(dir.join("pid")) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io("remove stale pid file")(e)),
        }
        // dnsmasq forks; the parent exits once the daemon is up, with its error if not.
        let mut dnsmasq = Command::new("dnsmasq");
        dnsmasq.args(args);
        let out = netns::output(&spec.netns, dnsmasq).map_err(io("run dnsmasq"))?;
        if !out.status.success() {
            return Err(DhcpError::Command {
                what: format!("start dnsmasq for {}", spec.name),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            });
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.running(&spec.name).is_none() {
            if Instant::now() > deadline {
                return Err(DhcpError::Command {
                    what: format!("start dnsmasq for {}", spec.name),
                    stderr: "no running daemon after 5 s".into(),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// SIGTERM, then SIGKILL after 3 s.
    fn stop(&self, name: &Name, pid: u32) -> Result<(), DhcpError> {
        let Some(p) = i32::try_from(pid).ok().and_then(Pid::from_raw) else {
            return Ok(());
        };
        let signal = |s: Signal| match kill_process(p, s) {
            Ok(()) => Ok(()),
            Err(rustix::io::Errno::SRCH) => Ok(()),
            Err(e) => Err(io(format!("signal dnsmasq {pid}"))(e.into())),
        };
        signal(Signal::TERM)?;
        let deadline = Instant::now() + Duration::from_secs(3);
        while self.running(name).is_some() {
            if Instant::now() > deadline {
                signal(Signal::KILL)?;
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }
}

/// dnsmasq's option 121 for `spec.routes`, then the default route through `spec.router`
/// (`None` without routes).
fn routes_arg(spec: &DhcpSpec) -> Option<String> {
    if spec.routes.is_empty() {
        return None;
    }
    let mut arg = "--dhcp-option=option:classless-static-route".to_owned();
    let default = spec
        .router
        .and_then(|r| Some(RouteSpec::new(Ipv4Cidr::new(Ipv4Addr::UNSPECIFIED, 0)?, r)));
    for r in spec.routes.iter().chain(&default) {
        arg.push_str(&format!(",{},{}", r.destination, r.gateway));
    }
    Some(arg)
}

/// Writes `contents` to `path` in one step (a temporary file renamed over it), mode 0644.
fn write_atomic(dir: &Path, path: &Path, contents: &[u8]) -> Result<(), DhcpError> {
    let what = format!("write {}", path.display());
    let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(io(what.clone()))?;
    tmp.write_all(contents).map_err(io(what.clone()))?;
    tmp.as_file()
        .set_permissions(fs::Permissions::from_mode(0o644))
        .map_err(io(what.clone()))?;
    tmp.persist(path).map_err(|e| io(what)(e.error))?;
    Ok(())
}

impl Dhcp for Dnsmasq {
    /// Idempotent: with the daemon running on the same arguments and the hosts file it last
    /// read unchanged, nothing happens. Changed leases are written atomically and the daemon
    /// is sent SIGHUP (same pid); changed arguments restart it (new pid).
    fn ensure(&self, spec: &DhcpSpec) -> Result<(), DhcpError> {
        spec.validate()?;
        let dir = self.dir(&spec.name);
        fs::create_dir_all(&dir).map_err(io(format!("create {}", dir.display())))?;
        for d in [self.dir.as_path(), dir.as_path()] {
            fs::set_permissions(d, fs::Permissions::from_mode(0o755))
                .map_err(io(format!("open up {}", d.display())))?;
        }
        let hosts = hosts_file(&spec.leases);
        let digest = digest_hex(&hosts, 16);
        let hosts_path = dir.join("hosts");
        if fs::read_to_string(&hosts_path).ok().as_deref() != Some(hosts.as_str()) {
            write_atomic(&dir, &hosts_path, hosts.as_bytes())?;
        }
        let loaded = fs::read_to_string(dir.join("loaded")).unwrap_or_default();
        let args = self.args(spec);
        match self.running(&spec.name) {
            Some((pid, running)) if running == args => {
                if loaded.trim() != digest {
                    let p = i32::try_from(pid).ok().and_then(Pid::from_raw);
                    if let Some(p) = p {
                        kill_process(p, Signal::HUP)
                            .map_err(|e| io(format!("reload dnsmasq {pid}"))(e.into()))?;
                    }
                }
            }
            Some((pid, _)) => {
                self.stop(&spec.name, pid)?;
                self.start(spec, &args)?;
            }
            None => self.start(spec, &args)?,
        }
        if loaded.trim() != digest {
            write_atomic(&dir, &dir.join("loaded"), digest.as_bytes())?;
        }
        Ok(())
    }

    fn status(&self, name: &Name) -> Result<Option<DhcpStatus>, DhcpError> {
        let dir = self.dir(name);
        if !dir.is_dir() {
            return Ok(None);
        }
        let hosts = match fs::read_to_string(dir.join("hosts")) {
            Ok(h) => h,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(io("read hosts file")(e)),
        };
        Ok(Some(DhcpStatus {
            pid: self.running(name).map(|(p, _)| p),
            leases: parse_hosts(&hosts),
        }))
    }

    fn list(&self) -> Result<BTreeSet<Name>, DhcpError> {
        let entries = match fs::read_dir(&self.dir) {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeSet::new()),
            Err(e) => return Err(io("list DHCP servers")(e)),
        };
        let mut out = BTreeSet::new();
        for e in entries {
            let e = e.map_err(io("list DHCP servers"))?;
            if e.path().is_dir()
                && let Some(n) = e.file_name().to_str().and_then(|s| Name::new(s).ok())
            {
                out.insert(n);
            }
        }
        Ok(out)
    }

    /// Idempotent: an absent server is `Ok`.
    fn remove(&self, name: &Name) -> Result<(), DhcpError> {
        if let Some((pid, _)) = self.running(name) {
            self.stop(name, pid)?;
        }
        match fs::remove_dir_all(self.dir(name)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io("remove DHCP server files")(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(mac: &str, ip: [u8; 4], host: Option<&str>) -> StaticLease {
        StaticLease {
            mac: mac.parse().expect("mac"),
            ip: Ipv4Addr::from(ip),
            hostname: host.map(|h| Name::new(h).expect("name")),
        }
    }

    #[test]
    fn hosts_file_round_trips_sorted() {
        let leases = vec![
            lease("02:00:00:00:00:02", [10, 0, 0, 3], None),
            lease("02:00:00:00:00:01", [10, 0, 0, 2], Some("vm-1")),
        ];
        let text = hosts_file(&leases);
        assert_eq!(
            text,
            "02:00:00:00:00:01,10.0.0.2,vm-1\n02:00:00:00:00:02,10.0.0.3\n"
        );
        let mut sorted = leases.clone();
        sorted.sort();
        assert_eq!(parse_hosts(&text), sorted);
        assert_eq!(
            parse_hosts("junk\n02:00:00:00:00:01,10.0.0.2,a,extra\n"),
            vec![]
        );
    }

    #[test]
    fn specs_are_checked() {
        let spec = DhcpSpec {
            name: Name::new("net-1").expect("name"),
            netns: Netns::Host,
            interface: IfName::new("eth0").expect("if"),
            subnet: "10.0.0.0/24".parse().expect("cidr"),
            router: Some(Ipv4Addr::new(10, 0, 0, 1)),
            lease_secs: 3600,
            routes: Vec::new(),
            leases: vec![lease("02:00:00:00:00:01", [10, 0, 0, 2], None)],
        };
        assert!(spec.validate().is_ok());
        let broken = [
            DhcpSpec {
                lease_secs: 10,
                ..spec.clone()
            },
            DhcpSpec {
                router: Some(Ipv4Addr::new(10, 0, 1, 1)),
                ..spec.clone()
            },
            DhcpSpec {
                leases: vec![lease("02:00:00:00:00:01", [10, 0, 1, 2], None)],
                ..spec.clone()
            },
            DhcpSpec {
                leases: vec![lease("02:00:00:00:00:01", [10, 0, 0, 255], None)],
                ..spec.clone()
            },
            DhcpSpec {
                leases: vec![lease("02:00:00:00:00:01", [10, 0, 0, 0], None)],
                ..spec.clone()
            },
            DhcpSpec {
                leases: vec![
                    lease("02:00:00:00:00:01", [10, 0, 0, 2], None),
                    lease("02:00:00:00:00:01", [10, 0, 0, 3], None),
                ],
                ..spec.clone()
            },
            DhcpSpec {
                leases: vec![
                    lease("02:00:00:00:00:01", [10, 0, 0, 2], None),
                    lease("02:00:00:00:00:02", [10, 0, 0, 2], None),
                ],
                ..spec.clone()
            },
            DhcpSpec {
                routes: vec![RouteSpec::new(
                    "169.254.169.254/32".parse().expect("cidr"),
                    Ipv4Addr::new(10, 0, 1, 2),
                )],
                ..spec.clone()
            },
        ];
        for b in broken {
            assert!(matches!(b.validate(), Err(DhcpError::Invalid(_))), "{b:?}");
        }
    }

    #[test]
    fn arguments_carry_no_user_text_but_parsed_types() {
        let d = Dnsmasq::new("/run/stratus/dhcp");
        let spec = DhcpSpec {
            name: Name::new("net-1").expect("name"),
            netns: Netns::Host,
            interface: IfName::new("vp-1").expect("if"),
            subnet: "10.0.0.7/24".parse().expect("cidr"),
            router: None,
            lease_secs: 600,
            routes: Vec::new(),
            leases: vec![],
        };
        let args = d.args(&spec);
        assert!(args.contains(&"--dhcp-range=10.0.0.0,static,255.255.255.0,600".to_owned()));
        assert!(args.contains(&"--dhcp-option=option:router".to_owned()));
        assert!(args.contains(&"--pid-file=/run/stratus/dhcp/net-1/pid".to_owned()));
        assert!(args.iter().all(|a| a.starts_with("--")));
        assert!(!args.iter().any(|a| a.contains("classless")));
    }

    /// Option 121 carries the routes and then the default route, which a client given
    /// option 121 takes from there only.
    #[test]
    fn routes_go_out_as_option_121_with_the_default_route() {
        let d = Dnsmasq::new("/run/stratus/dhcp");
        let mut spec = DhcpSpec {
            name: Name::new("net-1").expect("name"),
            netns: Netns::Host,
            interface: IfName::new("vp-1").expect("if"),
            subnet: "10.0.0.0/24".parse().expect("cidr"),
            router: Some(Ipv4Addr::new(10, 0, 0, 1)),
            lease_secs: 600,
            routes: vec![RouteSpec::new(
                "169.254.169.254/32".parse().expect("cidr"),
                Ipv4Addr::new(10, 0, 0, 2),
            )],
            leases: vec![],
        };
        assert!(spec.validate().is_ok());
        let want = "--dhcp-option=option:classless-static-route,169.254.169.254/32,10.0.0.2,0.0.0.0/0,10.0.0.1";
        assert!(
            d.args(&spec).contains(&want.to_owned()),
            "{:?}",
            d.args(&spec)
        );
        spec.router = None;
        let want = "--dhcp-option=option:classless-static-route,169.254.169.254/32,10.0.0.2";
        assert!(
            d.args(&spec).contains(&want.to_owned()),
            "{:?}",
            d.args(&spec)
        );
    }
}
