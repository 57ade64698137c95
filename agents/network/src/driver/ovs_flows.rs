//! The OpenFlow pipeline of a node's integration bridge, as a pure function from the
//! switch's wiring ([`Switch`]: networks, their local ports and tunnels) to flows
//! ([`render`]), each carrying the cookie of the object it serves, and the one atomic
//! bundle that makes the installed flows the rendered ones ([`Bundle::between`]).
//!
//! # The pipeline (one bridge)
//!
//! Every network has a local id (the OpenFlow port number of its internal port, so two
//! networks never share one) carried in `reg6`; `reg5` is the local port a frame came in
//! on, `reg7` is 1 for frames that came from a tunnel, `reg4` the local port to deliver to.
//!
//! | table | what |
//! |---|---|
//! | 0 | classify: a local port's frames get its network and go to 10; a tunnel's frames with a VNI of a network whose peers include that tunnel's node get that network and go to 20, as do a physical interface's frames tagged with a vlan network's ID (the tag stripped) and its untagged frames for the flat network on it; anything else is dropped |
//! | 10 | egress filter (a firewall's flows go here); by default on to 20 |
//! | 11 | a filtered port's egress after conntrack: its rules commit new connections; established and related ones pass (one pair of flows for every port); the rest is dropped |
//! | 20 | forward: DHCP from a tunnel is dropped (each node serves its own ports); a known remote MAC (l2population) goes to its node's tunnel with the VNI; broadcast and multicast are flooded; other frames look up the MACs learned from local ports (25) and go to 26 |
//! | 25 | MACs learned from local ports (by `learn()`, cookie [`LEARNED`]) |
//! | 26 | unknown unicast is flooded, a learned one goes to 30 |
//! | 30 | deliver to `reg4` if it is a port of the frame's network, else drop |
//! | 31 | a filtered port's ingress after conntrack, as 11, delivering to `reg4` |
//!
//! Flooding goes to every local port of the network (through table 30) and, for frames from
//! a local port only (split horizon), to each tunnel of the network's flood list.
//!
//! One bridge rather than Neutron's integration and tunnel bridges: a node's flows change in
//! one OpenFlow bundle, which is per bridge, so no packet ever sees half of a change; and the
//! userspace datapath pays for every patch-port hop.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use super::names::{IfName, MacAddr, digest_hex};

/// The kind byte (a cookie's top 8 bits) of the flows every node has.
pub const KIND_BASE: u8 = 0x51;
/// The kind byte of a network's flows.
pub const KIND_NETWORK: u8 = 0x52;
/// The kind byte of a local port's flows.
pub const KIND_PORT: u8 = 0x53;
/// The cookie of flows learned by `learn()` (never written or removed by a reconcile).
pub const LEARNED: u64 = 0x5f00_0000_0000_0000;

/// Whether a cookie is one [`render`] makes (the flows a reconcile owns).
pub fn owned(cookie: u64) -> bool {
    matches!((cookie >> 56) as u8, KIND_BASE | KIND_NETWORK | KIND_PORT)
}

/// How long a learned MAC lasts without traffic from it.
pub const LEARN_IDLE_SECS: u32 = 300;

/// A network on the node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkFlows {
    /// Its bridge's name in the driver's model.
    pub name: IfName,
    /// Its local id (its internal port's OpenFlow port number).
    pub id: u32,
    /// Its local ports' OpenFlow port numbers.
    pub ports: BTreeSet<u32>,
    /// Its overlay: absent, or down, carries nothing.
    pub tunnel: Option<TunnelFlows>,
    /// Its conntrack zone.
    pub zone: u16,
    /// The filters of its ports with port security, by OpenFlow port number.
    pub filters: BTreeMap<u32, PortFilterSpec>,
    /// The address of its DHCP server on this node, which no frame from a tunnel reaches.
    pub local_dhcp: Option<Ipv4Addr>,
    /// Its VLAN on a physical interface (a vlan provider network), as Neutron's OVS agent
    /// has it on its physical bridge: frames leave tagged, frames of the tag arrive with it
    /// stripped and are then what a tunnel's are (`reg7=1`: never flooded back out).
    pub vlan: Option<VlanFlows>,
    /// The physical interface (OpenFlow port number) of a flat provider network: its
    /// untagged frames are the network's, from outside (`reg7=1`), as a VLAN's tagged ones.
    pub flat: Option<u32>,
}

/// A network's VLAN on a physical interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VlanFlows {
    /// The VLAN ID (1-4094).
    pub id: u16,
    /// The physical interface's OpenFlow port number.
    pub port: u32,
}

/// A port's filter: anti-spoofing, and stateful security-group rules (OVS conntrack in the
/// network's zone).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortFilterSpec {
    /// The only source MAC it may send from.
    pub mac: String,
    /// The only source addresses it may send from (ARP and IPv4).
    pub ips: BTreeSet<Ipv4Addr>,
    /// The only source of DHCP replies it takes.
    pub dhcp_server: Option<Ipv4Addr>,
    /// What may reach it (all else is dropped).
    pub ingress: Vec<RuleSpec>,
    /// What it may send (all else is dropped).
    pub egress: Vec<RuleSpec>,
}

/// A rule's protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    /// Any IPv4.
    Any,
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
    /// ICMP.
    Icmp,
}

/// One allowed kind of traffic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSpec {
    /// The protocol.
    pub protocol: Proto,
    /// Destination ports `first..=last` (TCP and UDP).
    pub ports: Option<(u16, u16)>,
    /// The other end's prefixes (source for ingress, destination for egress); `None` is
    /// anyone, an empty list no one.
    pub remotes: Option<Vec<(Ipv4Addr, u8)>>,
}

/// `first..=last` as value/mask pairs OpenFlow matches (`tp_dst=V/M`).
pub fn port_masks(first: u16, last: u16) -> Vec<(u16, u16)> {
    let (mut start, end) = (u32::from(first), u32::from(last));
    let mut out = Vec::new();
    while start <= end {
        let mut size = 1u32;
        while start % (size * 2) == 0 && size * 2 <= 0x1_0000 && start + size * 2 - 1 <= end {
            size *= 2;
        }
        let mask = !(size - 1) & 0xffff;
        out.push((
            u16::try_from(start).unwrap_or(u16::MAX),
            u16::try_from(mask).unwrap_or(0),
        ));
        start += size;
    }
    out
}

/// The matches of one rule, `remote` naming the other end's field (`nw_src`, `nw_dst`).
fn rule_matches(r: &RuleSpec, remote: &str) -> Vec<String> {
    let proto = match r.protocol {
        Proto::Any => "ip",
        Proto::Tcp => "tcp",
        Proto::Udp => "udp",
        Proto::Icmp => "icmp",
    };
    let ports: Vec<String> = match (r.protocol, r.ports) {
        (Proto::Tcp | Proto::Udp, Some((a, b))) => port_masks(a, b)
            .into_iter()
            .map(|(v, m)| format!(",tp_dst={v:#x}/{m:#x}"))
            .collect(),
        _ => vec![String::new()],
    };
    let remotes: Vec<String> = match &r.remotes {
        None => vec![String::new()],
        Some(list) => list
            .iter()
            .map(|(ip, len)| format!(",{remote}={ip}/{len}"))
            .collect(),
    };
    let mut out = Vec::new();
    for p in &ports {
        for m in &remotes {
            out.push(format!("{proto}{p}{m}"));
        }
    }
    out
}

/// The flows of a port with a filter: egress (tables 10, 11) and ingress (30, 31).
fn filter_flows(p: u32, id: u32, zone: u16, f: &PortFilterSpec) -> Vec<String> {
    let mut t = Vec::new();
    if let Ok(mac) = f.mac.parse::<MacAddr>() {
        for ip in &f.ips {
            t.push(format!(
                "table=10,priority=100,reg5={p},dl_src={mac},arp,arp_sha={mac},arp_spa={ip} \
                 actions=resubmit(,20)"
            ));
            t.push(format!(
                "table=10,priority=90,reg5={p},dl_src={mac},ip,nw_src={ip} \
                 actions=ct(table=11,zone={zone})"
            ));
        }
        // DHCP before the port has its address (from 0.0.0.0) or renewing from one of its
        // own, to the broadcast address or its network's server only: a client port from a
        // spoofed source or to another address is no DHCP and gets no pass around the
        // groups.
        let sources = std::iter::once(Ipv4Addr::UNSPECIFIED).chain(f.ips.iter().copied());
        for src in sources {
            for dst in std::iter::once(Ipv4Addr::BROADCAST).chain(f.dhcp_server) {
                t.push(format!(
                    "table=10,priority=100,reg5={p},dl_src={mac},udp,nw_src={src},\
                     nw_dst={dst},tp_src=68,tp_dst=67 actions=resubmit(,20)"
                ));
            }
        }
    }
    t.push(format!("table=10,priority=80,reg5={p} actions=drop"));
    // Established and related traffic, and the drop of what no rule allows, are the base
    // flows of tables 11 and 31, shared by every port: only the rules are the port's.
    for r in &f.egress {
        for m in rule_matches(r, "nw_dst") {
            t.push(format!(
                "table=11,priority=50,reg5={p},ct_state=+new-inv+trk,{m} \
                 actions=ct(commit,zone={zone}),resubmit(,20)"
            ));
        }
    }
    t.push(format!(
        "table=30,priority=200,reg6={id},reg4={p},arp actions=output:{p}"
    ));
    if let Some(server) = f.dhcp_server {
        t.push(format!(
            "table=30,priority=200,reg6={id},reg4={p},udp,nw_src={server},tp_src=67,tp_dst=68 \
             actions=output:{p}"
        ));
    }
    t.push(format!(
        "table=30,priority=190,reg6={id},reg4={p},ip actions=ct(table=31,zone={zone})"
    ));
    t.push(format!(
        "table=30,priority=100,reg6={id},reg4={p} actions=drop"
    ));
    for r in &f.ingress {
        for m in rule_matches(r, "nw_src") {
            t.push(format!(
                "table=31,priority=50,reg4={p},ct_state=+new-inv+trk,{m} \
                 actions=ct(commit,zone={zone}),output:{p}"
            ));
        }
    }
    t
}

/// A network's overlay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TunnelFlows {
    /// The VNI.
    pub vni: u32,
    /// Where broadcast, multicast and unknown unicast go: the tunnels (OpenFlow port
    /// numbers) to the nodes hosting the network; frames from them are accepted.
    pub flood: BTreeSet<u32>,
    /// Known remote MACs and the tunnel to their node.
    pub macs: BTreeMap<MacAddr, u32>,
}

/// What the flows are made from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Switch {
    /// The networks.
    pub networks: Vec<NetworkFlows>,
}

/// One flow: its cookie and its `ovs-ofctl` text without the cookie.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Flow {
    /// The object it serves, and a digest of all that object's flows.
    pub cookie: u64,
    /// `table=…,priority=…,MATCH actions=…`.
    pub text: String,
}

/// The flows of one object: kind, a 24-bit digest of its name and a 32-bit digest of its
/// flows, so that a change of any of them changes the cookie and the old one is stale.
fn object(kind: u8, name: &str, texts: Vec<String>) -> Vec<Flow> {
    let key = u64::from_str_radix(&digest_hex(name, 6), 16).unwrap_or_default();
    let content = u64::from_str_radix(&digest_hex(&texts.join("\n"), 8), 16).unwrap_or_default();
    let cookie = (u64::from(kind) << 56) | (key << 32) | content;
    texts
        .into_iter()
        .map(|text| Flow { cookie, text })
        .collect()
}

/// The actions that deliver to each local port of a network (through table 30).
fn to_locals(ports: &BTreeSet<u32>) -> String {
    ports
        .iter()
        .map(|p| format!("load:{p}->NXM_NX_REG4[],resubmit(,30)"))
        .collect::<Vec<_>>()
        .join(",")
}

/// The actions that send to each tunnel of a network with its VNI.
fn to_tunnels(t: &TunnelFlows) -> String {
    let mut s = format!("set_field:{}->tun_id", t.vni);
    for p in &t.flood {
        let _ = write!(s, ",output:{p}");
    }
    s
}

fn join(parts: &[String]) -> String {
    let parts: Vec<&str> = parts
        .iter()
        .map(String::as_str)
        .filter(|p| !p.is_empty())
        .collect();
    if parts.is_empty() {
        "drop".into()
    } else {
        parts.join(",")
    }
}

/// The flows of `w`, every object's together, sorted.
pub fn render(w: &Switch) -> Vec<Flow> {
    let mut flows = object(
        KIND_BASE,
        "base",
        vec![
            "table=0,priority=0 actions=drop".into(),
            "table=10,priority=0 actions=resubmit(,20)".into(),
            // Tables 11 and 31 are reached only from a filtered port's flows (its egress
            // and its ingress through conntrack): what a connection it allowed carries
            // passes, to where the frame was going (reg4 for ingress); nothing else does.
            "table=11,priority=100,ct_state=-new+est-inv+trk actions=resubmit(,20)".into(),
            "table=11,priority=100,ct_state=-new+rel-inv+trk actions=resubmit(,20)".into(),
            "table=11,priority=0 actions=drop".into(),
            "table=31,priority=100,ct_state=-new+est-inv+trk actions=output:NXM_NX_REG4[]".into(),
            "table=31,priority=100,ct_state=-new+rel-inv+trk actions=output:NXM_NX_REG4[]".into(),
            "table=31,priority=0 actions=drop".into(),
            // Each node's own DHCP server serves its ports: none from across a tunnel.
            "table=20,priority=200,reg7=1,udp,tp_dst=67 actions=drop".into(),
            "table=20,priority=200,reg7=1,udp,tp_dst=68 actions=drop".into(),
            "table=20,priority=0 actions=drop".into(),
            "table=25,priority=0 actions=drop".into(),
            "table=26,priority=1 actions=resubmit(,30)".into(),
            "table=30,priority=0 actions=drop".into(),
        ],
    );
    let learn = format!(
        "learn(table=25,idle_timeout={LEARN_IDLE_SECS},priority=10,cookie={LEARNED:#x},\
         NXM_NX_REG6[],NXM_OF_ETH_DST[]=NXM_OF_ETH_SRC[],load:NXM_NX_REG5[]->NXM_NX_REG4[])"
    );
    for n in &w.networks {
        let id = n.id;
        for p in &n.ports {
            // Untagged frames only: OVS matches `ip`/`arp` through an 802.1Q header, so a
            // guest's tagged frame would pass its filter and leave tagged, on a VLAN network
            // under a second tag (VLAN hopping). A tagged frame from a port is dropped, as the
            // kernel datapath's bridge drops it.
            let mut texts = vec![format!(
                "table=0,priority=100,in_port={p},vlan_tci=0x0000/0x1fff \
                 actions=load:{id}->NXM_NX_REG6[],load:{p}->NXM_NX_REG5[],resubmit(,10)"
            )];
            match n.filters.get(p) {
                Some(f) => texts.extend(filter_flows(*p, id, n.zone, f)),
                None => texts.push(format!(
                    "table=30,priority=100,reg6={id},reg4={p} actions=output:{p}"
                )),
            }
            flows.extend(object(KIND_PORT, &format!("{}/{p}", n.name), texts));
        }
        let locals = to_locals(&n.ports);
        let mut tunnels = n.tunnel.as_ref().map(to_tunnels).unwrap_or_default();
        if let Some(p) = n.flat {
            tunnels = join(&[tunnels, format!("output:{p}")]);
        }
        // Tagged last: nothing is output after the tag is pushed.
        if let Some(v) = n.vlan {
            let tag = format!(
                "push_vlan:0x8100,set_field:{}->vlan_vid,output:{}",
                0x1000 | u32::from(v.id),
                v.port
            );
            tunnels = join(&[tunnels, tag]);
        }
        let bum = "dl_dst=01:00:00:00:00:00/01:00:00:00:00:00";
        let mut texts = vec![
            format!(
                "table=20,priority=50,reg6={id},reg7=0,{bum} actions={}",
                join(&[learn.clone(), locals.clone(), tunnels.clone()])
            ),
            format!(
                "table=20,priority=50,reg6={id},reg7=1,{bum} actions={}",
                join(std::slice::from_ref(&locals))
            ),
            format!(
                "table=20,priority=10,reg6={id},reg7=0 \
                 actions={learn},resubmit(,25),resubmit(,26)"
            ),
            format!("table=20,priority=10,reg6={id},reg7=1 actions=resubmit(,25),resubmit(,26)"),
            format!(
                "table=26,priority=10,reg6={id},reg7=0,reg4=0 actions={}",
                join(&[locals.clone(), tunnels])
            ),
            format!(
                "table=26,priority=10,reg6={id},reg7=1,reg4=0 actions={}",
                join(&[locals])
            ),
        ];
        if let Some(server) = n.local_dhcp {
            texts.push(format!(
                "table=20,priority=200,reg6={id},reg7=1,arp,arp_tpa={server} actions=drop"
            ));
            texts.push(format!(
                "table=20,priority=200,reg6={id},reg7=1,ip,nw_dst={server} actions=drop"
            ));
        }
        if let Some(v) = n.vlan {
            texts.push(format!(
                "table=0,priority=100,in_port={},dl_vlan={} \
                 actions=pop_vlan,load:{id}->NXM_NX_REG6[],load:1->NXM_NX_REG7[],resubmit(,20)",
                v.port, v.id
            ));
        }
        if let Some(p) = n.flat {
            texts.push(format!(
                "table=0,priority=100,in_port={p},vlan_tci=0x0000/0x1fff \
                 actions=load:{id}->NXM_NX_REG6[],load:1->NXM_NX_REG7[],resubmit(,20)"
            ));
        }
        if let Some(t) = &n.tunnel {
            for p in &t.flood {
                texts.push(format!(
                    "table=0,priority=100,in_port={p},tun_id={} \
                     actions=load:{id}->NXM_NX_REG6[],load:1->NXM_NX_REG7[],resubmit(,20)",
                    t.vni
                ));
            }
            for (mac, p) in &t.macs {
                texts.push(format!(
                    "table=20,priority=100,reg6={id},reg7=0,dl_dst={mac} \
                     actions=set_field:{}->tun_id,output:{p}",
                    t.vni
                ));
            }
        }
        flows.extend(object(KIND_NETWORK, n.name.as_str(), texts));
    }
    flows.sort();
    flows
}

/// How many flows of each owned cookie are installed, from `ovs-ofctl dump-flows` output.
pub fn installed(dump: &str) -> BTreeMap<u64, usize> {
    let mut out = BTreeMap::new();
    for line in dump.lines() {
        let Some(rest) = line.trim_start().strip_prefix("cookie=0x") else {
            continue;
        };
        let hex: String = rest.chars().take_while(char::is_ascii_hexdigit).collect();
        if let Ok(c) = u64::from_str_radix(&hex, 16)
            && owned(c)
        {
            *out.entry(c).or_default() += 1;
        }
    }
    out
}

/// How many flows of each cookie `flows` has.
pub fn counts(flows: &[Flow]) -> BTreeMap<u64, usize> {
    let mut counts: BTreeMap<u64, usize> = BTreeMap::new();
    for f in flows {
        *counts.entry(f.cookie).or_default() += 1;
    }
    counts
}

/// Which objects' flows are not all installed (their cookies), given the rendered flows and
/// the installed counts.
pub fn broken(want: &[Flow], have: &BTreeMap<u64, usize>) -> BTreeSet<u64> {
    counts(want)
        .into_iter()
        .filter(|(c, n)| have.get(c) != Some(n))
        .map(|(c, _)| c)
        .collect()
}

/// The flow mods that make the installed flows the wanted ones, for `ovs-ofctl --bundle
/// add-flows`: stale cookies deleted, then every flow of an object that is missing or
/// incomplete added (an add replaces a flow of the same match and priority).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Bundle {
    /// Cookies whose flows all go.
    pub delete: BTreeSet<u64>,
    /// Flows to add.
    pub add: Vec<Flow>,
}

impl Bundle {
    /// The bundle from `have` to `want`.
    pub fn between(want: &[Flow], have: &BTreeMap<u64, usize>) -> Self {
        let wanted: BTreeSet<u64> = want.iter().map(|f| f.cookie).collect();
        let broken = broken(want, have);
        Self {
            delete: have
                .keys()
                .filter(|c| !wanted.contains(c))
                .copied()
                .collect(),
            add: want
                .iter()
                .filter(|f| broken.contains(&f.cookie))
                .cloned()
                .collect(),
        }
    }

    /// Whether it changes nothing.
    pub fn is_empty(&self) -> bool {
        self.delete.is_empty() && self.add.is_empty()
    }

    /// Its text, one flow mod a line.
    pub fn text(&self) -> String {
        let mut s = String::new();
        for c in &self.delete {
            let _ = writeln!(s, "delete cookie={c:#x}/-1");
        }
        for f in &self.add {
            let _ = writeln!(s, "add cookie={:#x},{}", f.cookie, f.text);
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(name: &str, id: u32, ports: &[u32], flood: &[u32]) -> NetworkFlows {
        NetworkFlows {
            name: IfName::new(name).expect("name"),
            id,
            ports: ports.iter().copied().collect(),
            tunnel: Some(TunnelFlows {
                vni: 5001,
                flood: flood.iter().copied().collect(),
                macs: BTreeMap::from([("02:00:00:00:00:09".parse().expect("mac"), flood[0])]),
            }),
            zone: 1,
            filters: BTreeMap::new(),
            local_dhcp: None,
            vlan: None,
            flat: None,
        }
    }

    fn dump(flows: &[Flow]) -> String {
        flows
            .iter()
            .map(|f| format!(" cookie={:#x}, duration=1s, {}\n", f.cookie, f.text))
            .collect()
    }

    #[test]
    fn a_switch_with_every_flow_needs_no_bundle() {
        let w = Switch {
            networks: vec![net("br-a", 7, &[3, 4], &[1, 2])],
        };
        let flows = render(&w);
        let have = installed(&dump(&flows));
        assert!(Bundle::between(&flows, &have).is_empty());
        assert_eq!(render(&w), flows, "rendering is deterministic");
    }

    #[test]
    fn each_object_has_one_cookie_of_its_kind() {
        let w = Switch {
            networks: vec![net("br-a", 7, &[3, 4], &[1]), net("br-b", 8, &[5], &[1])],
        };
        let flows = render(&w);
        let cookies: BTreeSet<u64> = flows.iter().map(|f| f.cookie).collect();
        // base, two networks, three ports.
        assert_eq!(cookies.len(), 6);
        assert!(cookies.iter().all(|c| owned(*c)));
        assert!(!owned(LEARNED) && !owned(0));
        // Both networks share tunnel 1 and VNI 5001 here, yet classify by their own id.
        assert!(
            flows
                .iter()
                .any(|f| f.text.contains("load:7->NXM_NX_REG6[]"))
        );
        assert!(
            flows
                .iter()
                .any(|f| f.text.contains("load:8->NXM_NX_REG6[]"))
        );
    }

    #[test]
    fn a_deleted_flow_brings_back_its_object_only() {
        let w = Switch {
            networks: vec![net("br-a", 7, &[3, 4], &[1, 2])],
        };
        let flows = render(&w);
        let gone = flows
            .iter()
            .position(|f| f.text.starts_with("table=30") && f.text.contains("reg4=3"))
            .expect("the delivery flow of port 3");
        let mut rest = flows.clone();
        let removed = rest.remove(gone);
        let b = Bundle::between(&flows, &installed(&dump(&rest)));
        assert!(b.delete.is_empty());
        assert!(b.add.iter().all(|f| f.cookie == removed.cookie));
        assert_eq!(b.add.len(), 2, "the port's two flows");
        assert!(b.text().contains(&removed.text));
    }

    #[test]
    fn a_change_deletes_the_stale_cookie_and_adds_the_new_one_in_one_bundle() {
        let before = render(&Switch {
            networks: vec![net("br-a", 7, &[3, 4], &[1, 2]), net("br-b", 8, &[5], &[1])],
        });
        // Port 4 leaves, node 2 leaves br-a's flood list, br-b goes.
        let after = render(&Switch {
            networks: vec![net("br-a", 7, &[3], &[1])],
        });
        let b = Bundle::between(&after, &installed(&dump(&before)));
        let old: BTreeSet<u64> = before.iter().map(|f| f.cookie).collect();
        let new: BTreeSet<u64> = after.iter().map(|f| f.cookie).collect();
        assert_eq!(b.delete, old.difference(&new).copied().collect());
        assert!(b.add.iter().all(|f| !old.contains(&f.cookie)));
        let text = b.text();
        let first_add = text.find("\nadd ").unwrap_or(0);
        assert!(
            text.rfind("delete ").is_none_or(|d| d < first_add),
            "deletes come first: {text}"
        );
        // Port 3's flows and the base flows are untouched.
        assert!(b.add.iter().all(|f| !f.text.contains("reg4=3 actions")));
    }

    #[test]
    fn foreign_and_learned_flows_are_left_alone() {
        let flows = render(&Switch::default());
        let mut text = dump(&flows);
        text.push_str(" cookie=0x5f00000000000000, table=25, priority=10,reg6=0x7 actions=x\n");
        text.push_str(" priority=0 actions=NORMAL\n");
        text.push_str(" cookie=0x1234, table=3, actions=drop\n");
        assert!(Bundle::between(&flows, &installed(&text)).is_empty());
    }

    #[test]
    fn port_ranges_become_masks_covering_exactly_the_range() {
        for (a, b) in [
            (22, 22),
            (1000, 2000),
            (1, 65535),
            (0, 65535),
            (65535, 65535),
            (8, 15),
        ] {
            let masks = port_masks(a, b);
            let covered: Vec<u32> = (0..=65535u32)
                .filter(|p| masks.iter().any(|(v, m)| (*p as u16) & m == *v))
                .collect();
            let want: Vec<u32> = (u32::from(a)..=u32::from(b)).collect();
            assert_eq!(covered, want, "{a}-{b}: {masks:?}");
        }
        assert_eq!(port_masks(22, 22), vec![(22, 0xffff)]);
        assert_eq!(port_masks(0, 65535), vec![(0, 0)]);
    }

    #[test]
    fn a_filtered_port_is_checked_both_ways_and_its_filter_is_its_own_object() {
        let filter = PortFilterSpec {
            mac: "02:00:00:00:00:01".into(),
            ips: BTreeSet::from([Ipv4Addr::new(10, 0, 0, 5)]),
            dhcp_server: Some(Ipv4Addr::new(10, 0, 0, 254)),
            ingress: vec![RuleSpec {
                protocol: Proto::Tcp,
                ports: Some((22, 22)),
                remotes: Some(vec![(Ipv4Addr::new(10, 0, 0, 0), 24)]),
            }],
            egress: vec![RuleSpec {
                protocol: Proto::Any,
                ports: None,
                remotes: None,
            }],
        };
        let mut n = net("br-a", 7, &[3, 4], &[1]);
        n.zone = 9;
        let plain = render(&Switch {
            networks: vec![n.clone()],
        });
        n.filters.insert(3, filter.clone());
        let filtered = render(&Switch {
            networks: vec![n.clone()],
        });
        let texts: Vec<&str> = filtered.iter().map(|f| f.text.as_str()).collect();
        let has = |s: &str| texts.iter().any(|t| t.contains(s));
        assert!(has(
            "reg5=3,dl_src=02:00:00:00:00:01,ip,nw_src=10.0.0.5 actions=ct(table=11,zone=9)"
        ));
        assert!(has(
            "reg5=3,dl_src=02:00:00:00:00:01,arp,arp_sha=02:00:00:00:00:01,arp_spa=10.0.0.5"
        ));
        assert!(
            has("table=10,priority=80,reg5=3 actions=drop"),
            "anything else it sends"
        );
        assert!(has(
            "reg4=3,ct_state=+new-inv+trk,tcp,tp_dst=0x16/0xffff,nw_src=10.0.0.0/24"
        ));
        assert!(has("table=30,priority=100,reg6=7,reg4=3 actions=drop"));
        assert!(has(
            "nw_src=10.0.0.254,tp_src=67,tp_dst=68 actions=output:3"
        ));
        assert!(!has("reg4=3 actions=output:3"), "no unfiltered delivery");
        assert!(
            has("reg6=7,reg4=4 actions=output:4"),
            "port 4 has no filter"
        );
        // Established and related traffic passes by flows every filtered port shares: a
        // port's filter is its rules, not one more flow per connection state.
        let port3: Vec<&Flow> = filtered
            .iter()
            .filter(|f| (f.cookie >> 56) as u8 == KIND_PORT && f.text.contains("=3"))
            .collect();
        assert!(port3.iter().all(|f| !f.text.contains("ct_state=-new")));
        assert!(has(
            "table=31,priority=100,ct_state=-new+est-inv+trk actions=output:NXM_NX_REG4[]"
        ));
        assert!(has(
            "table=11,priority=100,ct_state=-new+est-inv+trk actions=resubmit(,20)"
        ));
        // Only port 3's object changed.
        let b = Bundle::between(&filtered, &installed(&dump(&plain)));
        assert_eq!(b.delete.len(), 1);
        assert!(b.add.iter().all(|f| f.text.contains("=3")), "{b:?}");
        // An empty remote list allows no one.
        n.filters.get_mut(&3).expect("filter").ingress[0].remotes = Some(vec![]);
        let none = render(&Switch { networks: vec![n] });
        assert!(!none.iter().any(|f| f.text.contains("tp_dst=0x16")));
    }

    #[test]
    fn a_vlan_networks_frames_leave_tagged_last_and_arrive_untagged_as_from_outside() {
        let mut n = net("br-a", 7, &[3], &[1]);
        n.tunnel = None;
        n.vlan = Some(VlanFlows { id: 100, port: 9 });
        let flows = render(&Switch { networks: vec![n] });
        let texts: Vec<&str> = flows.iter().map(|f| f.text.as_str()).collect();
        assert!(texts.contains(
            &"table=0,priority=100,in_port=9,dl_vlan=100 \
              actions=pop_vlan,load:7->NXM_NX_REG6[],load:1->NXM_NX_REG7[],resubmit(,20)"
        ));
        let tag = "push_vlan:0x8100,set_field:4196->vlan_vid,output:9";
        // Flooded from a local port (broadcast, unknown unicast): out tagged, after the
        // local copies; never from the VLAN back to it.
        let out: Vec<&&str> = texts.iter().filter(|t| t.contains(tag)).collect();
        assert_eq!(out.len(), 2, "{out:?}");
        for t in out {
            assert!(t.contains("reg7=0") && t.ends_with(tag), "{t}");
        }
        assert!(
            !texts
                .iter()
                .any(|t| t.contains("reg7=1") && t.contains("output:9"))
        );
    }

    #[test]
    fn a_flat_networks_frames_leave_untagged_before_any_tag_and_arrive_as_from_outside() {
        let mut n = net("br-a", 7, &[3], &[1]);
        n.tunnel = None;
        n.flat = Some(8);
        n.vlan = Some(VlanFlows { id: 100, port: 8 });
        n.local_dhcp = Some(Ipv4Addr::new(10, 0, 0, 2));
        let flows = render(&Switch { networks: vec![n] });
        let texts: Vec<&str> = flows.iter().map(|f| f.text.as_str()).collect();
        // Untagged frames from the wire are the network's, from outside; tagged ones of the
        // VLAN are too (one interface may carry both), and other tags are nobody's.
        assert!(texts.contains(
            &"table=0,priority=100,in_port=8,vlan_tci=0x0000/0x1fff \
              actions=load:7->NXM_NX_REG6[],load:1->NXM_NX_REG7[],resubmit(,20)"
        ));
        assert!(texts.iter().any(|t| t.contains("in_port=8,dl_vlan=100 ")));
        // Flooded from a local port: out untagged, then tagged.
        let out: Vec<&&str> = texts.iter().filter(|t| t.contains("output:8")).collect();
        assert_eq!(out.len(), 2, "{out:?}");
        for t in out {
            assert!(t.contains("reg7=0"), "never from the wire back to it: {t}");
            let (untagged, tagged) = (t.find(",output:8,push_vlan"), t.find("push_vlan"));
            assert!(untagged.is_some() && untagged < tagged, "{t}");
        }
        // No frame from the wire reaches this node's DHCP server.
        assert!(
            texts
                .contains(&"table=20,priority=200,reg6=7,reg7=1,arp,arp_tpa=10.0.0.2 actions=drop")
        );
    }

    #[test]
    fn a_ports_frames_enter_only_untagged() {
        let mut n = net("br-a", 7, &[3], &[1]);
        n.vlan = Some(VlanFlows { id: 100, port: 9 });
        let flows = render(&Switch { networks: vec![n] });
        let entries: Vec<&str> = flows
            .iter()
            .map(|f| f.text.as_str())
            .filter(|t| t.starts_with("table=0,priority=100,in_port=3"))
            .collect();
        assert_eq!(entries.len(), 1, "{entries:?}");
        assert!(
            entries[0].contains(",vlan_tci=0x0000/0x1fff "),
            "a tagged frame from a port must not be classified: {}",
            entries[0]
        );
        // Everything else from the port falls to the table's drop.
        assert!(
            flows
                .iter()
                .any(|f| f.text == "table=0,priority=0 actions=drop")
        );
    }

    #[test]
    fn tunnel_frames_are_never_flooded_back_to_tunnels() {
        let flows = render(&Switch {
            networks: vec![net("br-a", 7, &[3], &[1, 2])],
        });
        for f in flows.iter().filter(|f| f.text.contains("reg7=1")) {
            assert!(
                !f.text.contains("output:1") && !f.text.contains("output:2"),
                "{f:?}"
            );
        }
        // Only tunnels of the flood list are accepted, with the network's VNI.
        let accepted: Vec<&Flow> = flows
            .iter()
            .filter(|f| f.text.contains("tun_id=5001 "))
            .collect();
        assert_eq!(accepted.len(), 2);
    }
}
