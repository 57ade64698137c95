//! Connection tracking state that outlives what allowed it: a floating address taken away
//! (its FloatingIP disassociated, moved to another port or deleted) keeps no established
//! connection to the guest it led to, as the translation was fixed when the connection began;
//! and a port whose security-group rules lose something keeps none of the connections only
//! the lost part allowed ([`revoked`]), since the filter accepts established traffic before
//! any rule. `conntrack -D` as an argument vector, in the router's or the node's namespace
//! (an Open vSwitch node's switch forgets its own: [`Connection`]). What a router
//! translated is read back from its NAT table when the agent starts ([`translated`]), so that
//! an address taken away while the agent was down is forgotten too.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::process::Command;

use super::netns;
use super::nft::{FloatingNat, GroupRef, Nat, PortFilter, Protocol, Remote, Rule, Ruleset, TABLE};
use super::{Ipv4Cidr, Name, Netns};

/// Why the connections could not be forgotten.
#[derive(Debug, thiserror::Error)]
pub enum ConntrackError {
    /// The program could not be run.
    #[error("run conntrack")]
    Run(#[source] std::io::Error),
    /// It failed.
    #[error("conntrack {what}: {stderr}")]
    Failed {
        /// Its arguments.
        what: String,
        /// What it said.
        stderr: String,
    },
}

/// Forgets every connection in `ns` to `ip` (inbound through a floating address) and every
/// one answered to it (outbound, translated to it). Idempotent: none is `Ok`.
pub fn flush_address(ns: &Netns, ip: Ipv4Addr) -> Result<(), ConntrackError> {
    for flag in ["--orig-dst", "--reply-dst"] {
        let ip = ip.to_string();
        delete(ns, &["-D".to_owned(), flag.to_owned(), ip])?;
    }
    Ok(())
}

/// `conntrack ARGS` (a deletion) in `ns`; nothing matched is no failure.
fn delete(ns: &Netns, args: &[String]) -> Result<(), ConntrackError> {
    let mut cmd = Command::new("conntrack");
    cmd.args(args);
    let out = netns::output(ns, cmd).map_err(ConntrackError::Run)?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    // It exits 1 when nothing matched, saying so.
    if !out.status.success() && !stderr.contains(" 0 flow entries have been deleted") {
        return Err(ConntrackError::Failed {
            what: args.join(" "),
            stderr: stderr.trim().to_owned(),
        });
    }
    Ok(())
}

/// Which end of its connections a port is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Direction {
    /// The connection was opened to the port (its ingress rules allowed it).
    Ingress,
    /// The port opened it (its egress rules allowed it).
    Egress,
}

/// Connections of one port's address in its network's conntrack zone to forget: those opened
/// in `direction` with the given protocol, destination port and other end, each `None`
/// meaning any. What a rule the port lost had allowed ([`revoked`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Forget {
    /// The network's conntrack zone.
    pub zone: u16,
    /// Which end the port is.
    pub direction: Direction,
    /// The port's address: the connection's original destination (ingress) or source
    /// (egress).
    pub address: Ipv4Addr,
    /// The IP protocol number (ICMP 1, TCP 6, UDP 17).
    pub protocol: Option<u8>,
    /// The original destination port (TCP and UDP only).
    pub port: Option<u16>,
    /// The other end: the original source (ingress) or destination (egress).
    pub remote: Option<Ipv4Cidr>,
}

/// A tracked connection by its original direction: as `ovs-appctl dpctl/dump-conntrack`
/// prints one of Open vSwitch's userspace tracker ([`Connection::parse_dump`]), or
/// `conntrack -L` one of the kernel's ([`Connection::parse_list`]). Each zone's are listed
/// once, matched in-process ([`Keep::stale`]) and the stale ones deleted by their whole
/// origin tuple (Open vSwitch 3.1 takes nothing else).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Connection {
    /// The IP protocol number.
    pub protocol: u8,
    /// The original source.
    pub src: Ipv4Addr,
    /// The original destination.
    pub dst: Ipv4Addr,
    /// TCP and UDP: the source and destination ports.
    pub ports: Option<(u16, u16)>,
    /// ICMP: the id, type and code.
    pub icmp: Option<(u16, u8, u8)>,
}

impl Connection {
    /// The IPv4 connections of a `dpctl/dump-conntrack` listing, one a line, such as
    /// `icmp,orig=(src=10.0.0.1,dst=10.0.0.2,id=7,type=8,code=0),reply=(…),zone=9`; a line
    /// it cannot read (IPv6, another protocol) is left out.
    pub fn parse_dump(text: &str) -> Vec<Connection> {
        text.lines().filter_map(Self::parse_line).collect()
    }

    /// The IPv4 connections of a `conntrack -L -f ipv4` listing, one a line, such as
    /// `icmp     1 29 src=10.0.0.1 dst=10.0.0.2 type=8 code=0 id=7 src=… zone=9 use=1` (the
    /// first `src`, `dst`, ports or ICMP fields are the original direction's); a line it
    /// cannot read is left out.
    pub fn parse_list(text: &str) -> Vec<Connection> {
        text.lines()
            .filter_map(|line| {
                let mut words = line.split_whitespace();
                let proto = words.next()?;
                let mut fields: BTreeMap<&str, &str> = BTreeMap::new();
                for (k, v) in words.filter_map(|w| w.split_once('=')) {
                    fields.entry(k).or_insert(v);
                }
                Self::from_fields(proto, &fields)
            })
            .collect()
    }

    fn parse_line(line: &str) -> Option<Connection> {
        let (proto, rest) = line.trim().split_once(',')?;
        let orig = rest.strip_prefix("orig=(")?.split_once(')')?.0;
        let fields: BTreeMap<&str, &str> =
            orig.split(',').filter_map(|f| f.split_once('=')).collect();
        Self::from_fields(proto, &fields)
    }

    fn from_fields(proto: &str, fields: &BTreeMap<&str, &str>) -> Option<Connection> {
        let get = |k: &str| fields.get(k).copied();
        let num = |k: &str| get(k)?.parse::<u16>().ok();
        let protocol = match proto {
            "icmp" => 1,
            "tcp" => 6,
            "udp" => 17,
            _ => return None,
        };
        Some(Connection {
            protocol,
            src: get("src")?.parse().ok()?,
            dst: get("dst")?.parse().ok()?,
            ports: (protocol != 1)
                .then(|| Some((num("sport")?, num("dport")?)))
                .flatten(),
            icmp: (protocol == 1)
                .then(|| {
                    let small = |k: &str| get(k)?.parse::<u8>().ok();
                    Some((num("id")?, small("type")?, small("code")?))
                })
                .flatten(),
        })
    }

    /// Its whole origin tuple, as `dpctl/flush-conntrack zone=N TUPLE` takes it.
    pub fn tuple(&self) -> String {
        let mut t = format!(
            "ct_nw_src={},ct_nw_dst={},ct_nw_proto={}",
            self.src, self.dst, self.protocol
        );
        if let Some((sport, dport)) = self.ports {
            t.push_str(&format!(",ct_tp_src={sport},ct_tp_dst={dport}"));
        }
        if let Some((id, kind, code)) = self.icmp {
            t.push_str(&format!(",icmp_id={id},icmp_type={kind},icmp_code={code}"));
        }
        t
    }
}

/// One thing a port's filter allows: connections opened in `direction` with a protocol,
/// destination ports and other end (each `None`: any).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Allow {
    direction: Direction,
    protocol: Option<u8>,
    ports: Option<(u16, u16)>,
    remote: Option<Ipv4Cidr>,
}

impl Allow {
    /// Whether everything `o` allows, this allows too.
    fn covers(&self, o: &Allow) -> bool {
        let protocol = match self.protocol {
            None => true,
            Some(p) => {
                o.protocol == Some(p)
                    && match self.ports {
                        None => true,
                        Some((a, b)) => o.ports.is_some_and(|(c, d)| a <= c && d <= b),
                    }
            }
        };
        let remote = match self.remote {
            None => true,
            Some(r) => o
                .remote
                .is_some_and(|q| q.prefix() >= r.prefix() && r.contains(q.network())),
        };
        self.direction == o.direction && protocol && remote
    }
}

/// What a port's filter in `rs` allows: each rule, a remote group's as one per member; with
/// port security off, everything.
fn allows(rs: &Ruleset, p: &PortFilter) -> Vec<Allow> {
    if !p.port_security {
        return [Direction::Ingress, Direction::Egress]
            .into_iter()
            .map(|direction| Allow {
                direction,
                protocol: None,
                ports: None,
                remote: None,
            })
            .collect();
    }
    let mut out = Vec::new();
    let sides = [
        (Direction::Ingress, &p.ingress),
        (Direction::Egress, &p.egress),
    ];
    for (direction, rules) in sides {
        for r in rules.iter() {
            let Rule {
                protocol,
                ports,
                remote,
            } = *r;
            let (protocol, ports) = match protocol {
                Protocol::Any => (None, None),
                Protocol::Icmp => (Some(1), None),
                Protocol::Tcp => (Some(6), ports.map(|p| (p.first, p.last))),
                Protocol::Udp => (Some(17), ports.map(|p| (p.first, p.last))),
            };
            let allow = |remote| Allow {
                direction,
                protocol,
                ports,
                remote,
            };
            match remote {
                Remote::Any => out.push(allow(None)),
                Remote::Cidr(c) => out.push(allow(Some(c))),
                Remote::Group(GroupRef(i)) => out.extend(
                    rs.groups
                        .get(i)
                        .into_iter()
                        .flat_map(|g| g.members.iter())
                        .filter_map(|m| Ipv4Cidr::new(*m, 32))
                        .map(|c| allow(Some(c))),
                ),
            }
        }
    }
    out
}

/// The connections to forget once the node's filter goes from `before` to `after`: for each
/// port in both whose filter in `after` no longer allows something `before` did (a rule
/// removed or narrowed, a remote group's member gone, the port's groups changed, port
/// security turned on), the connections of each of its addresses in its network's zone that
/// the lost rule matches, as Neutron's firewall drivers delete them. A rule still covered by
/// one of `after` (same side; any or the same protocol; a port range and remote prefix that
/// hold it) loses nothing.
///
/// The tracker is asked by protocol, the port's address, the other end and one destination
/// port: a lost rule of a port range forgets every connection of its protocol, side and
/// other end, some of which the rules in `after` may still allow. Those survive: the next packet of such a TCP connection is
/// picked up again mid-stream as a new one (the kernel's `nf_conntrack_tcp_loose`, on by
/// default, and Open vSwitch's userspace tracker alike), goes through the rules, which
/// accept it, and the connection is tracked again; a UDP or ICMP flow is a new one at its
/// next packet anyway. Neutron forgets as widely (it never names a destination port).
///
/// It is meant to run right after `after` is in place: run before, a packet allowed by the
/// old rules meanwhile would make its connection again.
pub fn revoked(before: &Ruleset, after: &Ruleset) -> Vec<Forget> {
    let previous: BTreeMap<&Name, &PortFilter> = before.ports.iter().map(|p| (&p.id, p)).collect();
    let mut out = BTreeSet::new();
    for p in after.ports.iter().filter(|p| p.port_security) {
        let Some(q) = previous.get(&p.id) else {
            continue;
        };
        let Some(zone) = after.zones.iter().find(|z| z.bridge == p.bridge) else {
            continue;
        };
        let now = allows(after, p);
        for lost in allows(before, q)
            .into_iter()
            .filter(|a| !now.iter().any(|n| n.covers(a)))
        {
            let port = lost.ports.filter(|(a, b)| a == b).map(|(a, _)| a);
            for address in &q.ips {
                out.insert(Forget {
                    zone: zone.zone,
                    direction: lost.direction,
                    address: *address,
                    protocol: lost.protocol,
                    port,
                    remote: lost.remote,
                });
            }
        }
    }
    out.into_iter().collect()
}

/// What the filter in place allows each port whose connections are to be looked through,
/// by zone: every port with port security at start (nothing is known of the filter before),
/// afterwards the ports that lost something since the last filter whose connections were
/// looked through ([`revoked`]). A tracked connection of such a port (its address the
/// original destination, or source) that its allows no longer cover is stale
/// ([`Keep::stale`]); DHCP (UDP to port 67 or 68), which the filter passes whatever the rules,
/// never is. Each zone's connections are listed once and matched in-process ([`prune`]),
/// so the cost is that of the zone's connections, whatever the number of rules or remote
/// group members lost.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Keep {
    zones: BTreeMap<u16, BTreeMap<Ipv4Addr, Vec<Allow>>>,
}

impl Keep {
    /// What to look through once `after` is in place, `before` the last filter whose
    /// connections were (`None`: at start, or never yet).
    pub fn new(after: &Ruleset, before: Option<&Ruleset>) -> Keep {
        let lost: Option<BTreeSet<(u16, Ipv4Addr)>> = before.map(|b| {
            revoked(b, after)
                .iter()
                .map(|f| (f.zone, f.address))
                .collect()
        });
        let mut zones: BTreeMap<u16, BTreeMap<Ipv4Addr, Vec<Allow>>> = BTreeMap::new();
        for p in after.ports.iter().filter(|p| p.port_security) {
            let Some(zone) = after.zones.iter().find(|z| z.bridge == p.bridge) else {
                continue;
            };
            let now = allows(after, p);
            for ip in &p.ips {
                if lost.as_ref().is_none_or(|l| l.contains(&(zone.zone, *ip))) {
                    zones.entry(zone.zone).or_default().insert(*ip, now.clone());
                }
            }
        }
        Keep { zones }
    }

    /// Nothing to look through.
    pub fn is_empty(&self) -> bool {
        self.zones.is_empty()
    }

    /// The zones to list.
    pub fn zones(&self) -> impl Iterator<Item = u16> + '_ {
        self.zones.keys().copied()
    }

    /// Whether `c`, tracked in `zone`, is one the filter in place no longer allows.
    pub fn stale(&self, zone: u16, c: &Connection) -> bool {
        let Some(ports) = self.zones.get(&zone) else {
            return false;
        };
        if c.protocol == 17 && matches!(c.ports, Some((_, 67 | 68))) {
            return false;
        }
        let lost = |mine: Ipv4Addr, direction, theirs: Ipv4Addr| {
            ports.get(&mine).is_some_and(|now| {
                let point = Allow {
                    direction,
                    protocol: Some(c.protocol),
                    ports: c.ports.map(|(_, d)| (d, d)),
                    remote: Ipv4Cidr::new(theirs, 32),
                };
                !now.iter().any(|a| a.covers(&point))
            })
        };
        lost(c.dst, Direction::Ingress, c.src) || lost(c.src, Direction::Egress, c.dst)
    }
}

/// Deletes the stale connections of each zone `keep` names: `list` reads a zone once,
/// `delete` removes one connection. Every zone and connection is tried whatever failed
/// before it; the failures are said together (the first few, and how many).
///
/// # Errors
/// A zone could not be listed or a connection deleted.
pub fn prune<E: std::fmt::Display>(
    keep: &Keep,
    mut list: impl FnMut(u16) -> Result<Vec<Connection>, E>,
    mut delete: impl FnMut(u16, &Connection) -> Result<(), E>,
) -> Result<(), String> {
    let mut errors = Vec::new();
    for zone in keep.zones() {
        match list(zone) {
            Err(e) => errors.push(format!("list zone {zone}: {e}")),
            Ok(cs) => {
                for c in cs.iter().filter(|c| keep.stale(zone, c)) {
                    if let Err(e) = delete(zone, c) {
                        errors.push(format!("delete {} in zone {zone}: {e}", c.tuple()));
                    }
                }
            }
        }
    }
    match errors.len() {
        0 => Ok(()),
        n if n <= 3 => Err(errors.join("; ")),
        n => Err(format!("{}; and {} more", errors[..3].join("; "), n - 3)),
    }
}

/// [`prune`] on the kernel's tracker in `ns` (the node's namespace): `conntrack -L` once per
/// zone, `conntrack -D` of each stale connection's origin tuple.
///
/// # Errors
/// A zone could not be listed or a connection deleted.
pub fn prune_kernel(ns: &Netns, keep: &Keep) -> Result<(), String> {
    let list = |zone: u16| -> Result<Vec<Connection>, ConntrackError> {
        let mut cmd = Command::new("conntrack");
        cmd.args(["-L", "-f", "ipv4", "-w", &zone.to_string()]);
        let out = netns::output(ns, cmd).map_err(ConntrackError::Run)?;
        if !out.status.success() {
            return Err(ConntrackError::Failed {
                what: format!("-L -w {zone}"),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            });
        }
        Ok(Connection::parse_list(&String::from_utf8_lossy(
            &out.stdout,
        )))
    };
    let delete = |zone: u16, c: &Connection| delete(ns, &c.conntrack_delete(zone));
    prune(keep, list, delete)
}

impl Connection {
    /// `conntrack -D …` arguments deleting exactly this connection in `zone`.
    pub fn conntrack_delete(&self, zone: u16) -> Vec<String> {
        let name = match self.protocol {
            1 => "icmp".to_owned(),
            6 => "tcp".to_owned(),
            17 => "udp".to_owned(),
            p => p.to_string(),
        };
        let mut a: Vec<String> = vec![
            "-D".into(),
            "-f".into(),
            "ipv4".into(),
            "-w".into(),
            zone.to_string(),
            "-p".into(),
            name,
            "-s".into(),
            self.src.to_string(),
            "-d".into(),
            self.dst.to_string(),
        ];
        if let Some((sport, dport)) = self.ports {
            a.extend(["--sport".into(), sport.to_string()]);
            a.extend(["--dport".into(), dport.to_string()]);
        }
        if let Some((id, kind, code)) = self.icmp {
            a.extend(["--icmp-type".into(), kind.to_string()]);
            a.extend(["--icmp-code".into(), code.to_string()]);
            a.extend(["--icmp-id".into(), id.to_string()]);
        }
        a
    }
}

/// The floating addresses each router namespace translates.
pub fn floating<'a>(
    routers: impl IntoIterator<Item = (&'a Name, &'a Nat)>,
) -> BTreeMap<Name, BTreeSet<FloatingNat>> {
    routers
        .into_iter()
        .map(|(name, nat)| (name.clone(), nat.floating.iter().copied().collect()))
        .collect()
}

/// The floating addresses the NAT of each router namespace of `routers` translates now (its
/// table's `ip daddr FLOATING dnat to FIXED` rules); a namespace or table not there
/// translates none.
pub fn translated(
    routers: impl IntoIterator<Item = Name>,
) -> BTreeMap<Name, BTreeSet<FloatingNat>> {
    routers
        .into_iter()
        .map(|name| {
            let mut cmd = Command::new("nft");
            cmd.args(["-j", "list", "chain", "ip", TABLE, "prerouting"]);
            let out = netns::output(&Netns::Named(name.clone()), cmd);
            let found = match out {
                Ok(o) if o.status.success() => serde_json::from_slice(&o.stdout)
                    .map(|v| parse_translated(&v))
                    .unwrap_or_default(),
                _ => BTreeSet::new(),
            };
            (name, found)
        })
        .collect()
}

/// The floating addresses in `nft -j list chain` output: each rule matching only `ip daddr`
/// to one address and translating it by `dnat to` one address.
fn parse_translated(v: &serde_json::Value) -> BTreeSet<FloatingNat> {
    let rules = v
        .get("nftables")
        .and_then(|n| n.as_array())
        .into_iter()
        .flatten()
        .filter_map(|i| i.get("rule")?.get("expr")?.as_array());
    rules
        .filter_map(|expr| {
            let addr = |v: Option<&serde_json::Value>| v?.as_str()?.parse::<Ipv4Addr>().ok();
            let (mut floating, mut fixed) = (None, None);
            for e in expr {
                if let Some(m) = e.get("match")
                    && m.pointer("/left/payload/field").and_then(|f| f.as_str()) == Some("daddr")
                {
                    floating = addr(m.get("right"));
                } else if let Some(d) = e.get("dnat") {
                    fixed = addr(d.get("addr"));
                }
            }
            Some(FloatingNat {
                floating: floating?,
                fixed: fixed?,
            })
        })
        .collect()
}

/// The floating addresses `before` translated that `after` no longer translates to the same
/// fixed address, in the routers still there (a router's namespace that went took its
/// connections with it).
pub fn released(
    before: &BTreeMap<Name, BTreeSet<FloatingNat>>,
    after: &BTreeMap<Name, BTreeSet<FloatingNat>>,
) -> Vec<(Name, Ipv4Addr)> {
    let mut out = Vec::new();
    for (name, was) in before {
        let Some(now) = after.get(name) else { continue };
        let gone: BTreeSet<Ipv4Addr> = was.difference(now).map(|f| f.floating).collect();
        out.extend(gone.into_iter().map(|ip| (name.clone(), ip)));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::driver::nft::{PortRange, RemoteGroup, Zone};
    use crate::driver::{IfName, MacAddr};

    fn cidr(s: &str) -> Ipv4Cidr {
        s.parse().expect("cidr")
    }

    pub(super) fn rule(protocol: Protocol, ports: Option<(u16, u16)>, remote: Remote) -> Rule {
        Rule {
            protocol,
            ports: ports.map(|(first, last)| PortRange { first, last }),
            remote,
        }
    }

    pub(super) fn icmp_subnet() -> Rule {
        rule(Protocol::Icmp, None, Remote::Cidr(cidr("10.0.0.0/24")))
    }

    pub(super) fn ssh() -> Rule {
        rule(Protocol::Tcp, Some((22, 22)), Remote::Any)
    }

    pub(super) const ALL: Rule = Rule {
        protocol: Protocol::Any,
        ports: None,
        remote: Remote::Any,
    };

    /// One port (10.0.0.5, zone 9) with these rules, and group 0 of `members`.
    pub(super) fn rs(ingress: Vec<Rule>, egress: Vec<Rule>, members: &[[u8; 4]]) -> Ruleset {
        let bridge = IfName::new("brq1").expect("name");
        Ruleset {
            zones: vec![Zone {
                bridge: bridge.clone(),
                zone: 9,
            }],
            ports: vec![PortFilter {
                id: Name::new("p1").expect("name"),
                bridge,
                device: IfName::new("tap1").expect("name"),
                mac: MacAddr::ZERO,
                ips: BTreeSet::from([Ipv4Addr::new(10, 0, 0, 5)]),
                dhcp_server: None,
                port_security: true,
                ingress,
                egress,
            }],
            groups: vec![RemoteGroup {
                name: Name::new("g1").expect("name"),
                members: members.iter().map(|m| Ipv4Addr::from(*m)).collect(),
            }],
            local_dhcp: vec![],
            tunnels: vec![],
        }
    }

    fn forget(
        direction: Direction,
        protocol: Option<u8>,
        port: Option<u16>,
        remote: Option<&str>,
    ) -> Forget {
        Forget {
            zone: 9,
            direction,
            address: Ipv4Addr::new(10, 0, 0, 5),
            protocol,
            port,
            remote: remote.map(cidr),
        }
    }

    #[test]
    fn a_removed_rule_forgets_its_protocol_port_and_remote_and_nothing_else() {
        let before = rs(vec![ssh(), icmp_subnet()], vec![ALL], &[]);
        let after = rs(vec![ssh()], vec![ALL], &[]);
        let gone = revoked(&before, &after);
        assert_eq!(
            gone,
            vec![forget(
                Direction::Ingress,
                Some(1),
                None,
                Some("10.0.0.0/24")
            )]
        );
        // The SSH rule gone: TCP to port 22 from anyone.
        let ssh = revoked(&before, &rs(vec![icmp_subnet()], vec![ALL], &[]));
        assert_eq!(
            ssh,
            vec![forget(Direction::Ingress, Some(6), Some(22), None)]
        );
        // Nothing changed, or only added: nothing forgotten.
        assert!(revoked(&before, &before).is_empty());
        assert!(revoked(&after, &before).is_empty());
    }

    #[test]
    fn a_rule_still_covered_by_another_forgets_nothing_and_a_narrowed_one_forgets_its_range() {
        let wide = rule(Protocol::Tcp, Some((1000, 2000)), Remote::Any);
        let before = rs(vec![ssh(), wide], vec![ALL], &[]);
        // SSH removed while all TCP from anyone is allowed: nothing to forget.
        let all_tcp = rule(Protocol::Tcp, None, Remote::Any);
        assert!(revoked(&before, &rs(vec![all_tcp], vec![ALL], &[])).is_empty());
        // The range narrowed: every TCP connection to the port is forgotten (no range in the
        // tracker's filter); SSH stays.
        let narrow = rule(Protocol::Tcp, Some((1000, 1001)), Remote::Any);
        assert_eq!(
            revoked(&before, &rs(vec![ssh(), narrow], vec![ALL], &[])),
            vec![forget(Direction::Ingress, Some(6), None, None)]
        );
        // A remote prefix narrowed.
        let from_net = |c: &str| rule(Protocol::Icmp, None, Remote::Cidr(cidr(c)));
        let b = rs(vec![from_net("10.0.0.0/16")], vec![ALL], &[]);
        assert!(revoked(&b, &rs(vec![from_net("10.0.0.0/8")], vec![ALL], &[])).is_empty());
        assert_eq!(
            revoked(&b, &rs(vec![from_net("10.0.1.0/24")], vec![ALL], &[])),
            vec![forget(
                Direction::Ingress,
                Some(1),
                None,
                Some("10.0.0.0/16")
            )]
        );
        // Egress narrowed to TCP: the rest of what the port opened goes, by its source.
        let tcp_out = rule(Protocol::Tcp, None, Remote::Any);
        let gone = revoked(&b, &rs(vec![from_net("10.0.0.0/16")], vec![tcp_out], &[]));
        assert_eq!(gone, vec![forget(Direction::Egress, None, None, None)]);
    }

    #[test]
    fn the_switchs_connections_are_read_matched_and_named_by_their_whole_origin_tuple() {
        let dump = "\
icmp,orig=(src=10.0.0.7,dst=10.0.0.5,id=4660,type=8,code=0),reply=(src=10.0.0.5,dst=10.0.0.7,id=4660,type=0,code=0),zone=9
tcp,orig=(src=10.0.0.7,dst=10.0.0.5,sport=40000,dport=22),reply=(src=10.0.0.5,dst=10.0.0.7,sport=22,dport=40000),zone=9,protoinfo=(state=ESTABLISHED)
udp,orig=(src=10.0.0.5,dst=10.0.1.1,sport=5353,dport=53),reply=(src=10.0.1.1,dst=10.0.0.5,sport=53,dport=5353),zone=9
icmpv6,orig=(src=fd00::1,dst=fd00::2,id=1,type=128,code=0),reply=(src=fd00::2,dst=fd00::1,id=1,type=129,code=0),zone=9
";
        let conns = Connection::parse_dump(dump);
        assert_eq!(conns.len(), 3, "{conns:?}");
        assert_eq!(
            conns[0].tuple(),
            "ct_nw_src=10.0.0.7,ct_nw_dst=10.0.0.5,ct_nw_proto=1,icmp_id=4660,icmp_type=8,icmp_code=0"
        );
        assert_eq!(
            conns[1].tuple(),
            "ct_nw_src=10.0.0.7,ct_nw_dst=10.0.0.5,ct_nw_proto=6,ct_tp_src=40000,ct_tp_dst=22"
        );
        // What the filter no longer allows 10.0.0.5 is stale: ICMP in from the subnet, SSH
        // in, or everything out.
        let before = rs(vec![icmp_subnet(), ssh()], vec![ALL], &[]);
        let stale = |after: &Ruleset| {
            let keep = Keep::new(after, Some(&before));
            conns.iter().map(|c| keep.stale(9, c)).collect::<Vec<_>>()
        };
        assert_eq!(
            stale(&rs(vec![ssh()], vec![ALL], &[])),
            [true, false, false]
        );
        assert_eq!(
            stale(&rs(vec![icmp_subnet()], vec![ALL], &[])),
            [false, true, false]
        );
        assert_eq!(
            stale(&rs(vec![icmp_subnet(), ssh()], vec![], &[])),
            [false, false, true]
        );
        // Another zone's are none of its business.
        let keep = Keep::new(&rs(vec![], vec![], &[]), Some(&before));
        assert!(!conns.iter().any(|c| keep.stale(10, c)));
    }

    #[test]
    fn a_remote_groups_member_gone_forgets_its_connections_only() {
        let from_group = rule(Protocol::Any, None, Remote::Group(GroupRef(0)));
        let before = rs(vec![from_group], vec![ALL], &[[10, 0, 0, 7], [10, 0, 0, 8]]);
        let after = rs(vec![from_group], vec![ALL], &[[10, 0, 0, 8]]);
        let gone = revoked(&before, &after);
        assert_eq!(
            gone,
            vec![forget(Direction::Ingress, None, None, Some("10.0.0.7/32"))]
        );
        // A member that joins forgets nothing.
        assert!(revoked(&after, &before).is_empty());
    }

    fn conn(protocol: u8, src: [u8; 4], dst: [u8; 4], dport: u16) -> Connection {
        Connection {
            protocol,
            src: Ipv4Addr::from(src),
            dst: Ipv4Addr::from(dst),
            ports: (protocol != 1).then_some((40000, dport)),
            icmp: (protocol == 1).then_some((7, 8, 0)),
        }
    }

    #[test]
    fn a_remote_group_rule_lost_by_many_ports_lists_each_zone_once_and_deletes_only_the_stale() {
        // 50 ports in one zone, a remote group of 1,000 members: the rule removed used to
        // be 50,000 deletions; now it is one listing and one deletion per stale connection.
        let members: Vec<[u8; 4]> = (0..1000u16)
            .map(|i| [10, 1, (i >> 8) as u8, (i & 0xff) as u8])
            .collect();
        let from_group = rule(Protocol::Any, None, Remote::Group(GroupRef(0)));
        let many = |ingress: Vec<Rule>| {
            let mut r = rs(ingress, vec![ALL], &members);
            let p = r.ports[0].clone();
            r.ports = (0..50u8)
                .map(|i| PortFilter {
                    id: Name::new(&format!("p{i}")).expect("name"),
                    ips: BTreeSet::from([Ipv4Addr::new(10, 0, 1, i)]),
                    ..p.clone()
                })
                .collect();
            r
        };
        let (before, after) = (many(vec![from_group, ssh()]), many(vec![ssh()]));
        assert_eq!(revoked(&before, &after).len(), 50 * 1000);
        let keep = Keep::new(&after, Some(&before));
        // Tracked: a ping from a member to each of 10 ports (stale), SSH from a member
        // (still allowed), DHCP, and a connection of an address no port has.
        let mut tracked: Vec<Connection> = (0..10u8)
            .map(|i| conn(1, [10, 1, 0, i], [10, 0, 1, i], 0))
            .collect();
        tracked.push(conn(6, [10, 1, 0, 1], [10, 0, 1, 3], 22));
        tracked.push(conn(17, [10, 0, 1, 4], [255, 255, 255, 255], 67));
        tracked.push(conn(1, [10, 1, 0, 1], [10, 0, 9, 9], 0));
        let commands = std::cell::RefCell::new(Vec::new());
        let run = prune(
            &keep,
            |zone| -> Result<_, String> {
                commands.borrow_mut().push(format!("list {zone}"));
                Ok(tracked.clone())
            },
            |zone, c| {
                commands
                    .borrow_mut()
                    .push(format!("delete {zone} {} {}", c.src, c.dst));
                Ok(())
            },
        );
        assert_eq!(run, Ok(()));
        let mut want = vec!["list 9".to_owned()];
        want.extend((0..10).map(|i| format!("delete 9 10.1.0.{i} 10.0.1.{i}")));
        assert_eq!(commands.into_inner(), want);
        // At start every port's connections are looked through, still one listing a zone.
        assert_eq!(Keep::new(&after, None).zones().collect::<Vec<_>>(), [9]);
        // Nothing lost: nothing to list.
        assert!(Keep::new(&after, Some(&after)).is_empty());
    }

    #[test]
    fn every_stale_connection_is_tried_whatever_failed_before_and_all_failures_are_said() {
        let before = rs(vec![icmp_subnet()], vec![ALL], &[]);
        let after = rs(vec![], vec![ALL], &[]);
        let keep = Keep::new(&after, Some(&before));
        let tracked: Vec<Connection> = (1..=5u8)
            .map(|i| conn(1, [10, 0, 0, i + 10], [10, 0, 0, 5], 0))
            .collect();
        let mut tried = 0;
        let r = prune(
            &keep,
            |_| -> Result<_, String> { Ok(tracked.clone()) },
            |_, c| {
                tried += 1;
                if c.src.octets()[3] % 2 == 1 {
                    Err("busy".to_owned())
                } else {
                    Ok(())
                }
            },
        );
        assert_eq!(tried, 5);
        let e = r.expect_err("three failed");
        assert!(e.contains("10.0.0.11") && e.contains("10.0.0.15"), "{e}");
    }

    #[test]
    fn the_kernels_listing_is_read_by_its_original_direction() {
        let text = "tcp      6 99 ESTABLISHED src=10.0.0.1 dst=10.0.0.2 sport=1000 dport=22 [UNREPLIED] src=10.0.0.2 dst=10.0.0.1 sport=22 dport=1000 [ASSURED] mark=0 zone=7 use=1\n\
            icmp     1 99 src=10.0.0.1 dst=10.0.0.2 type=8 code=0 id=5 [UNREPLIED] src=10.0.0.2 dst=10.0.0.1 type=0 code=0 id=5 mark=0 zone=7 use=1\n";
        let cs = Connection::parse_list(text);
        assert_eq!(
            cs,
            vec![
                Connection {
                    protocol: 6,
                    src: Ipv4Addr::new(10, 0, 0, 1),
                    dst: Ipv4Addr::new(10, 0, 0, 2),
                    ports: Some((1000, 22)),
                    icmp: None,
                },
                Connection {
                    protocol: 1,
                    src: Ipv4Addr::new(10, 0, 0, 1),
                    dst: Ipv4Addr::new(10, 0, 0, 2),
                    ports: None,
                    icmp: Some((5, 8, 0)),
                },
            ]
        );
        assert_eq!(
            cs[1].conntrack_delete(7).join(" "),
            "-D -f ipv4 -w 7 -p icmp -s 10.0.0.1 -d 10.0.0.2 --icmp-type 8 --icmp-code 0 --icmp-id 5"
        );
    }

    #[test]
    fn port_security_turned_on_forgets_what_the_rules_do_not_allow_and_a_new_or_gone_port_nothing()
    {
        let mut open = rs(vec![], vec![], &[]);
        open.ports[0].port_security = false;
        let filtered = rs(vec![ssh()], vec![ALL], &[]);
        assert_eq!(
            revoked(&open, &filtered),
            vec![forget(Direction::Ingress, None, None, None)]
        );
        // Turned off: nothing (it allows everything).
        assert!(revoked(&filtered, &open).is_empty());
        // A port that was not there before, or is gone now: nothing of it.
        let mut other = rs(vec![], vec![], &[]);
        other.ports[0].id = Name::new("p2").expect("name");
        assert!(revoked(&other, &filtered).is_empty());
        assert!(revoked(&filtered, &Ruleset::default()).is_empty());
    }

    fn f(floating: [u8; 4], fixed: [u8; 4]) -> FloatingNat {
        FloatingNat {
            floating: Ipv4Addr::from(floating),
            fixed: Ipv4Addr::from(fixed),
        }
    }

    #[test]
    fn a_floating_address_removed_or_moved_is_released_where_its_router_stays() {
        let (r1, r2) = (
            Name::new("qrouter-a").expect("name"),
            Name::new("qrouter-b").expect("name"),
        );
        let before = BTreeMap::from([
            (
                r1.clone(),
                BTreeSet::from([
                    f([203, 0, 113, 10], [10, 0, 0, 5]),
                    f([203, 0, 113, 11], [10, 0, 0, 6]),
                    f([203, 0, 113, 12], [10, 0, 0, 7]),
                ]),
            ),
            (
                r2.clone(),
                BTreeSet::from([f([203, 0, 113, 20], [10, 0, 0, 5])]),
            ),
        ]);
        // .10 stays, .11 goes, .12 now leads to another port; router b went.
        let after = BTreeMap::from([(
            r1.clone(),
            BTreeSet::from([
                f([203, 0, 113, 10], [10, 0, 0, 5]),
                f([203, 0, 113, 12], [10, 0, 0, 8]),
            ]),
        )]);
        assert_eq!(
            released(&before, &after),
            vec![
                (r1.clone(), Ipv4Addr::new(203, 0, 113, 11)),
                (r1.clone(), Ipv4Addr::new(203, 0, 113, 12)),
            ]
        );
        assert!(released(&after, &after).is_empty());
        assert!(released(&BTreeMap::new(), &after).is_empty());
    }
}

/// On the real kernel, as root, in a namespace of its own.
#[cfg(test)]
mod host_tests {
    use super::tests::{ALL, icmp_subnet, rs, rule, ssh};
    use super::*;
    use crate::driver::Firewall;
    use crate::driver::Links;
    use crate::driver::host_tests::{root, run_in, unique};
    use crate::driver::netlink::NetlinkLinks;
    use crate::driver::nft::NftFirewall;

    /// A namespace of the test's own, removed when this is dropped.
    struct Gone(Name);

    impl Gone {
        fn made() -> Self {
            let ns = Name::new(&unique()).expect("name");
            NetlinkLinks::new().add_netns(&ns).expect("netns");
            Gone(ns)
        }
    }

    /// Puts a connection in `ns`'s tracker for five minutes: `conntrack -I` with `args`.
    fn insert(ns: &Name, args: &[&str]) {
        let all = [&["conntrack", "-I", "--timeout", "300"], args].concat();
        let (ok, out) = run_in(ns, &all);
        assert!(ok, "{out}");
    }

    impl Drop for Gone {
        fn drop(&mut self) {
            if let Err(e) = NetlinkLinks::new().del_netns(&self.0) {
                eprintln!("cleanup: netns {}: {e}", self.0);
            }
        }
    }

    /// The namespace's connections, one a line.
    fn connections(ns: &Name) -> String {
        let (ok, out) = run_in(ns, &["conntrack", "-L"]);
        assert!(ok, "{out}");
        out
    }

    #[test]
    fn what_the_filter_no_longer_allows_is_forgotten_in_its_zone_and_nothing_else() {
        if !root() {
            return;
        }
        let gone = Gone::made();
        let ns = gone.0.clone();
        let insert = |args: &[&str]| insert(&ns, args);
        let icmp = |src: &str, zone: &str| {
            insert(&[
                "-p",
                "icmp",
                "-s",
                src,
                "-d",
                "10.0.0.5",
                "--icmp-type",
                "8",
                "--icmp-code",
                "0",
                "--icmp-id",
                "7",
                "-w",
                zone,
            ]);
        };
        let tcp = |dport: &str| {
            insert(&[
                "-p",
                "tcp",
                "-s",
                "10.0.0.7",
                "-d",
                "10.0.0.5",
                "--sport",
                "40000",
                "--dport",
                dport,
                "--state",
                "ESTABLISHED",
                "-w",
                "9",
            ]);
        };
        // ICMP in from the subnet and from outside it, and in another zone; TCP to 22 and 80.
        icmp("10.0.0.7", "9");
        icmp("10.1.0.7", "9");
        icmp("10.0.0.7", "10");
        tcp("22");
        tcp("80");
        let netns = Netns::Named(ns.clone());
        // ICMP from the subnet and SSH lost; TCP 80 still allowed.
        let web = rule(Protocol::Tcp, Some((80, 80)), Remote::Any);
        let before = rs(vec![icmp_subnet(), ssh(), web], vec![ALL], &[]);
        let after = rs(vec![web], vec![ALL], &[]);
        let keep = Keep::new(&after, Some(&before));
        prune_kernel(&netns, &keep).expect("forget");
        let left = connections(&ns);
        let lines: Vec<&str> = left.lines().filter(|l| l.contains("src=")).collect();
        assert_eq!(lines.len(), 2, "{left}");
        assert!(
            lines
                .iter()
                .any(|l| l.contains("src=10.0.0.7") && l.contains("zone=10")),
            "{left}"
        );
        assert!(lines.iter().any(|l| l.contains("dport=80")), "{left}");
        // Nothing left to forget is not a failure.
        prune_kernel(&netns, &keep).expect("forget again");
    }

    #[test]
    fn what_a_router_translates_is_read_back_from_its_table() {
        if !root() {
            return;
        }
        let gone = Gone::made();
        let ns = gone.0.clone();
        let absent = Name::new(&unique()).expect("name");
        // No table yet, no namespace: nothing translated.
        let read = || translated([ns.clone(), absent.clone()]);
        let none = BTreeMap::from([
            (ns.clone(), BTreeSet::new()),
            (absent.clone(), BTreeSet::new()),
        ]);
        assert_eq!(read(), none);
        let nat = crate::driver::conformance::sample_nat();
        let fw = NftFirewall::new(Netns::Host);
        fw.apply_nat(&ns, &nat).expect("nat");
        let want: BTreeSet<FloatingNat> = nat.floating.iter().copied().collect();
        assert_eq!(want.len(), 2);
        assert_eq!(
            read(),
            BTreeMap::from([(ns.clone(), want), (absent.clone(), BTreeSet::new())])
        );
        // One taken away (as by an agent that is not running to flush it).
        let one = Nat {
            floating: nat.floating[..1].to_vec(),
            ..nat.clone()
        };
        fw.apply_nat(&ns, &one).expect("nat");
        let now = translated([ns.clone()]);
        assert_eq!(now[&ns], one.floating.iter().copied().collect());
        // What the restarted agent compares with its first converge: the other is released.
        let before = BTreeMap::from([(ns.clone(), nat.floating.iter().copied().collect())]);
        assert_eq!(
            released(&before, &now),
            vec![(ns.clone(), nat.floating[1].floating)]
        );
    }

    #[test]
    fn the_connections_of_a_floating_address_are_forgotten_and_no_other() {
        if !root() {
            return;
        }
        let gone = Gone::made();
        let ns = gone.0.clone();
        let insert = |args: &[&str]| insert(&ns, &[&["-p", "udp"], args].concat());
        // In through floating 203.0.113.10; out of its guest, translated to it; another
        // floating address's.
        insert(&[
            "-s",
            "198.51.100.7",
            "-d",
            "203.0.113.10",
            "--sport",
            "1000",
            "--dport",
            "53",
        ]);
        insert(&[
            "-s",
            "10.0.0.5",
            "-d",
            "198.51.100.7",
            "--sport",
            "2000",
            "--dport",
            "53",
            "-r",
            "198.51.100.7",
            "-q",
            "203.0.113.10",
            "--reply-port-src",
            "53",
            "--reply-port-dst",
            "2000",
        ]);
        insert(&[
            "-s",
            "198.51.100.7",
            "-d",
            "203.0.113.11",
            "--sport",
            "1000",
            "--dport",
            "53",
        ]);
        assert_eq!(
            connections(&ns)
                .lines()
                .filter(|l| l.contains("203.0.113.10"))
                .count(),
            2
        );

        let netns = Netns::Named(ns.clone());
        flush_address(&netns, Ipv4Addr::new(203, 0, 113, 10)).expect("flush");
        let left = connections(&ns);
        assert!(!left.contains("203.0.113.10"), "{left}");
        assert!(left.contains("dst=203.0.113.11"), "{left}");
        // Nothing left to forget is not a failure.
        flush_address(&netns, Ipv4Addr::new(203, 0, 113, 10)).expect("flush again");
    }
}
