//! The node's packet filter as a typed model ([`Ruleset`]: conntrack zones per network,
//! security-group rules per port, remote groups as sets, anti-spoofing) rendered to nftables
//! objects of the `nftables` crate, and [`NftFirewall`], which makes Stratus's tables hold it
//! in one nft transaction (the batch in nft's own syntax, as `nft_text` writes it, run by
//! the nftables library in the agent's process ([`super::libnft`]) or by `nft -f -`, or JSON
//! to `nft -j -f -`) — writing only the chains and set elements that differ ([`Delta`]), or the tables
//! whole when they are absent — and reads them back for drift.
//!
//! Two tables, replaced together: `inet stratus` holds what needs conntrack (zones at raw
//! priority in prerouting; per-port chains reached from the forward chain), since stateful
//! matches work for bridged packets only in the `inet` family with br_netfilter; `bridge
//! stratus` holds the anti-spoofing checks, which need the bridge port a frame came in on
//! (with br_netfilter, `iifname` in `inet` hooks is the bridge itself, never the port).
//!
//! Allowed traffic `return`s from a port's chain and the base chain's policy accepts it, so
//! a packet between two ports of one node passes the sender's egress and the receiver's
//! ingress rules. The forward chain finds a port's ingress rules by destination MAC, so the
//! `bridge` table's forward chain drops IPv4 in a frame to a filtered port that is not
//! addressed to its MAC (broadcast, multicast, flooded), but for its network's DHCP replies.
//!
//! The `inet` input chain keeps the node's VXLAN port to its networks' peers: a VXLAN packet
//! is taken only from a node hosting ports of the network of its VNI. The encapsulated
//! packets themselves are not tracked (`notrack` at raw priority in prerouting and output):
//! conntrack would look up every one of them for nothing, since the frames they carry are
//! tracked in their network's zone once decapsulated.
//!
//! What is per port lives in lookups, not in rules per port: the forward chain finds a
//! port's chains through one verdict map a side (bridge and MAC → jump), and the `bridge`
//! table's checks are a few rules that look the frame's device up in named sets of the
//! filtered ports' devices, MACs, addresses and DHCP servers (one lookup of the device a
//! way sends a port's frames to the chain of checks: every packet of every guest passes
//! here, on both nodes of a flow, so each lookup a frame is spared counts). A node of 1,000 ports loads
//! its two chains each and set elements, a packet takes a hash lookup instead of a walk
//! past every other port's rules, and a port added or gone is elements added or removed.
//! What is per network is looked up too: a frame's zone by its bridge in one map, a VXLAN
//! packet's port, VNI and source in one set of every network's peers, a frame from the
//! overlay against the networks' own DHCP servers in one set — so a packet passes as many
//! rules on a node of hundreds of networks as on a node of one (rules per network, which
//! every packet walked, cut a stream to 0.4 of a one-network node's at 200 networks).

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::net::Ipv4Addr;
use std::process::Stdio;

use nftables::expr::{
    CT, Expression, Map, Meta, MetaKey, NamedExpression, Payload, PayloadBase, PayloadField,
    PayloadRaw, Prefix, Range, SetItem, Verdict,
};
use nftables::schema::{
    Chain, Element, FlushObject, NfCmd, NfListObject, NfObject, Nftables, Rule as NfRule, Set,
    SetType, SetTypeValue, Table,
};
use nftables::stmt::{JumpTarget, Mangle, Match, NAT, Operator, Statement, VerdictMap};
use nftables::types::{NfChainPolicy, NfChainType, NfFamily, NfHook};

use super::names::digest_hex;
use super::{Firewall, IfName, Ipv4Cidr, MacAddr, Name, Netns};
use super::{libnft, netns, nft_text};

/// The name of both of Stratus's tables.
pub const TABLE: &str = "stratus";

/// The `bridge` table's sets of filtered ports: their devices, each device with its MAC,
/// with each of its addresses, and with its network's DHCP server.
const PORT_DEV: &str = "port-dev";
const PORT_MAC: &str = "port-mac";
const PORT_IP: &str = "port-ip";
const PORT_DHCP: &str = "port-dhcp";

/// The `bridge` table's regular chains: the checks of a frame from a filtered port, and
/// what becomes of an IPv4 frame to a filtered port that is not for its MAC.
const FROM_PORT: &str = "from-port";
const TO_PORT_OTHER: &str = "to-port-other";

/// Failures of a [`Firewall`] call.
#[derive(Debug, thiserror::Error)]
pub enum FirewallError {
    /// The ruleset is not valid; nothing was changed.
    #[error("invalid ruleset: {0}")]
    Invalid(String),
    /// `nft` (or `sysctl`) failed.
    #[error("{what}: {stderr}")]
    Command {
        /// What was being done.
        what: String,
        /// What it said.
        stderr: String,
    },
    /// A program could not be run.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// `nft` printed JSON that is not what it documents.
    #[error("read nft output")]
    Json(#[source] serde_json::Error),
    /// A failure injected into a fake.
    #[error("injected failure of {0}")]
    Injected(&'static str),
}

/// Everything Stratus filters on one node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ruleset {
    /// One conntrack zone per network bridge, so overlapping tenant CIDRs never share
    /// connection state.
    pub zones: Vec<Zone>,
    /// The node's ports.
    pub ports: Vec<PortFilter>,
    /// Remote groups: the addresses of a security group's members.
    pub groups: Vec<RemoteGroup>,
    /// Networks whose DHCP server on this node serves this node's ports only.
    pub local_dhcp: Vec<LocalDhcp>,
    /// The node's VXLAN devices: each takes encapsulated frames only from the tunnel
    /// addresses of the nodes that host ports of its network; all other traffic to a VXLAN
    /// port is dropped, so no other host can put frames on a network's bridge.
    pub tunnels: Vec<Tunnel>,
}

/// Who may send VXLAN to one of the node's VXLAN devices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tunnel {
    /// The network's VNI (24 bits).
    pub vni: u32,
    /// The device's UDP port.
    pub port: u16,
    /// The tunnel addresses of the other nodes hosting ports of the network.
    pub peers: BTreeSet<Ipv4Addr>,
}

/// A network's DHCP server kept to its own node: every node runs one for its own ports (so
/// losing a node stops no other node's DHCP), all with the same address, and neither
/// DHCP messages nor traffic for that address cross the overlay (another node's server
/// would refuse this node's guests).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalDhcp {
    /// The network's VXLAN device (a port of its bridge).
    pub vxlan: IfName,
    /// The server's address.
    pub server: Ipv4Addr,
}

/// A network's conntrack zone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Zone {
    /// The network's bridge.
    pub bridge: IfName,
    /// The zone (1 to 65535).
    pub zone: u16,
}

/// One port's filter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortFilter {
    /// Names the port's chains (`<id>-in`, `<id>-out`); derive it from the Port's uid
    /// (`Name::derived("p", uid)`). Starts with a letter.
    pub id: Name,
    /// The bridge the port is on.
    pub bridge: IfName,
    /// The port's device on the bridge (a tap or the bridge end of a veth).
    pub device: IfName,
    /// The port's MAC.
    pub mac: MacAddr,
    /// The port's IPv4 addresses (and allowed address pairs).
    pub ips: BTreeSet<Ipv4Addr>,
    /// The address of its network's DHCP server: the only source of DHCP replies the port
    /// takes (`None`: it takes none).
    pub dhcp_server: Option<Ipv4Addr>,
    /// With port security off the port is neither filtered nor checked for spoofing.
    pub port_security: bool,
    /// What may reach the port (all else is dropped).
    pub ingress: Vec<Rule>,
    /// What the port may send (all else is dropped).
    pub egress: Vec<Rule>,
}

/// One security-group rule: traffic it matches is allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rule {
    /// The protocol.
    pub protocol: Protocol,
    /// The destination ports (TCP and UDP only).
    pub ports: Option<PortRange>,
    /// The other end: the source for ingress, the destination for egress.
    pub remote: Remote,
}

/// A rule's protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// Any.
    Any,
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
    /// ICMP.
    Icmp,
}

/// Destination ports `first..=last`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRange {
    /// The first port (at least 1).
    pub first: u16,
    /// The last port (at least `first`).
    pub last: u16,
}

/// A rule's other end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Remote {
    /// Anyone.
    Any,
    /// Addresses in a prefix.
    Cidr(Ipv4Cidr),
    /// The members of a [`RemoteGroup`], by name.
    Group(GroupRef),
}

/// A reference to a [`RemoteGroup`] by an index into [`Ruleset::groups`], so that rules stay
/// `Copy` and a dangling name cannot be written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupRef(pub usize);

/// A remote group's members, kept as an nft set so that membership changes touch no rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteGroup {
    /// The set's name; derive it from the SecurityGroup's uid (`Name::derived("g", uid)`).
    /// Starts with a letter.
    pub name: Name,
    /// The members' addresses.
    pub members: BTreeSet<Ipv4Addr>,
}

/// Stratus's tables as read from the kernel (or as a ruleset will look there): each chain's
/// rules by identity, in order, and each set's elements. Two equal digests mean the same
/// filtering.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Observed {
    /// `family/chain` → the identity (comment) of each rule in order; `""` for a rule
    /// Stratus did not write.
    pub chains: BTreeMap<String, Vec<String>>,
    /// `family/set` → its elements.
    pub sets: BTreeMap<String, BTreeSet<String>>,
}

/// What differs between the tables a ruleset makes and the tables the kernel holds, chain
/// by chain and set by set ([`Delta::between`] their [`Observed`] digests): what
/// [`Ruleset::render_update`] writes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Delta {
    /// `family/chain` of each chain to write whole (missing, or any rule differs).
    pub chains: BTreeSet<String>,
    /// `family/chain` of each chain to remove.
    pub del_chains: BTreeSet<String>,
    /// `family/set` of each set to create with its elements.
    pub new_sets: BTreeSet<String>,
    /// `family/set` of each set to remove.
    pub del_sets: BTreeSet<String>,
    /// `family/set` → (elements to add, elements to remove), for sets on both sides.
    pub elements: BTreeMap<String, (BTreeSet<String>, BTreeSet<String>)>,
}

impl Delta {
    /// What turns tables that read as `have` into tables that read as `want`.
    pub fn between(want: &Observed, have: &Observed) -> Self {
        let mut d = Delta::default();
        for (k, rules) in &want.chains {
            if have.chains.get(k) != Some(rules) {
                d.chains.insert(k.clone());
            }
        }
        for k in have.chains.keys() {
            if !want.chains.contains_key(k) {
                d.del_chains.insert(k.clone());
            }
        }
        for (k, elems) in &want.sets {
            match have.sets.get(k) {
                None => {
                    d.new_sets.insert(k.clone());
                }
                Some(had) if had != elems => {
                    let added = elems.difference(had).cloned().collect();
                    let removed = had.difference(elems).cloned().collect();
                    d.elements.insert(k.clone(), (added, removed));
                }
                Some(_) => {}
            }
        }
        for k in have.sets.keys() {
            if !want.sets.contains_key(k) {
                d.del_sets.insert(k.clone());
            }
        }
        d
    }

    /// Whether nothing differs.
    pub fn is_empty(&self) -> bool {
        self.chains.is_empty()
            && self.del_chains.is_empty()
            && self.new_sets.is_empty()
            && self.del_sets.is_empty()
            && self.elements.is_empty()
    }

    /// How many chains and set elements it writes or removes, for people.
    pub fn size(&self) -> (usize, usize) {
        let elements = self.elements.values().map(|(a, r)| a.len() + r.len()).sum();
        (self.chains.len() + self.del_chains.len(), elements)
    }

    /// `have` with this delta made, taking what it writes from `want`: what the kernel
    /// holds after a [`Ruleset::render_update`] of it.
    pub fn apply_to(&self, have: &Observed, want: &Observed) -> Observed {
        let mut o = have.clone();
        for k in &self.chains {
            o.chains
                .insert(k.clone(), want.chains.get(k).cloned().unwrap_or_default());
        }
        for k in &self.del_chains {
            o.chains.remove(k);
        }
        for k in &self.new_sets {
            o.sets
                .insert(k.clone(), want.sets.get(k).cloned().unwrap_or_default());
        }
        for (k, (added, removed)) in &self.elements {
            let set = o.sets.entry(k.clone()).or_default();
            set.retain(|e| !removed.contains(e));
            set.extend(added.iter().cloned());
        }
        for k in &self.del_sets {
            o.sets.remove(k);
        }
        o
    }
}

/// A change of the node's tables that [`Firewall::update`] makes in one transaction: the
/// ruleset aimed at, how it reads back, and what differs from the tables there now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Update {
    /// The ruleset aimed at.
    pub ruleset: Ruleset,
    /// [`Ruleset::observed`] of it.
    pub want: Observed,
    /// What to write.
    pub delta: Delta,
}

fn starts_with_letter(n: &Name) -> bool {
    n.as_str().starts_with(|c: char| c.is_ascii_lowercase())
}

impl Ruleset {
    /// Checks what the kernel would refuse or what would filter other than meant: zones 1 to
    /// 65535, one per bridge and bridge per zone; unique port ids and group names starting
    /// with a letter; a filtered port has an address; ports only on TCP and UDP rules, in
    /// order and not 0; group references inside [`Ruleset::groups`].
    pub fn validate(&self) -> Result<(), FirewallError> {
        let bad = |m: String| Err(FirewallError::Invalid(m));
        let mut bridges = BTreeSet::new();
        let mut zones = BTreeSet::new();
        for z in &self.zones {
            if z.zone == 0 {
                return bad(format!("zone 0 for {}", z.bridge));
            }
            if !bridges.insert(&z.bridge) || !zones.insert(z.zone) {
                return bad(format!(
                    "zone {} or bridge {} given twice",
                    z.zone, z.bridge
                ));
            }
        }
        for t in &self.tunnels {
            if t.vni == 0 || t.vni >= 1 << 24 || t.port == 0 {
                return bad(format!("VXLAN VNI {} or port {}", t.vni, t.port));
            }
        }
        let mut names = BTreeSet::new();
        for g in &self.groups {
            if !starts_with_letter(&g.name) || !names.insert(&g.name) {
                return bad(format!(
                    "group name {} repeated or not starting with a letter",
                    g.name
                ));
            }
        }
        let mut ids = BTreeSet::new();
        for p in &self.ports {
            if !starts_with_letter(&p.id) || p.id.as_str().len() > 40 || !ids.insert(&p.id) {
                return bad(format!(
                    "port id {} repeated, too long or not starting with a letter",
                    p.id
                ));
            }
            if p.port_security && p.ips.is_empty() {
                return bad(format!("port {} has no address", p.id));
            }
            for r in p.ingress.iter().chain(&p.egress) {
                if let Some(range) = r.ports {
                    if !matches!(r.protocol, Protocol::Tcp | Protocol::Udp) {
                        return bad(format!("port {}: ports on a {:?} rule", p.id, r.protocol));
                    }
                    if range.first == 0 || range.first > range.last {
                        return bad(format!(
                            "port {}: port range {}-{}",
                            p.id, range.first, range.last
                        ));
                    }
                }
                if let Remote::Group(GroupRef(i)) = r.remote
                    && i >= self.groups.len()
                {
                    return bad(format!("port {}: no remote group {i}", p.id));
                }
            }
        }
        Ok(())
    }

    /// The nft batch that replaces Stratus's tables by this ruleset.
    pub fn render(&self) -> Result<Nftables<'static>, FirewallError> {
        self.validate()?;
        let mut out = Vec::new();
        replace_table(&mut out, NfFamily::INet);
        let (inet_sets, bridge_sets): (Vec<_>, Vec<_>) = self
            .sets()
            .into_iter()
            .partition(|set| set.family == NfFamily::INet);
        for set in inet_sets {
            out.push(add(NfListObject::Set(Box::new(set))));
        }
        let (inet, bridge): (Vec<_>, Vec<_>) = self
            .all_chains()
            .into_iter()
            .partition(|(family, _, _)| *family == NfFamily::INet);
        // Every chain before any rule: a jump needs its target to exist.
        for (_, chain, _) in &inet {
            out.push(add(NfListObject::Chain(chain.clone())));
        }
        for (family, chain, rules) in inet {
            for expr in rules {
                out.push(add(NfListObject::Rule(rule(family, &chain.name, expr))));
            }
        }
        replace_table(&mut out, NfFamily::Bridge);
        for set in bridge_sets {
            out.push(add(NfListObject::Set(Box::new(set))));
        }
        for (_, chain, _) in &bridge {
            out.push(add(NfListObject::Chain(chain.clone())));
        }
        for (_, chain, rules) in bridge {
            for expr in rules {
                out.push(add(NfListObject::Rule(rule(
                    NfFamily::Bridge,
                    &chain.name,
                    expr,
                ))));
            }
        }
        Ok(Nftables {
            objects: Cow::Owned(out),
        })
    }

    /// The nft batch that turns tables holding what [`Delta::between`] compared against into
    /// this ruleset, in one transaction: only the chains `delta` names are written (created
    /// when missing, flushed and filled), removed chains are flushed and deleted once the
    /// jumps to them are gone, and remote groups' sets change element by element.
    ///
    /// It makes no table: against a table gone since the comparison (a flushed ruleset) the
    /// kernel refuses the whole batch, rather than a table being made of only the chains
    /// that differed, without the base chains that filter.
    pub fn render_update(&self, delta: &Delta) -> Result<Nftables<'static>, FirewallError> {
        self.validate()?;
        let mut out = Vec::new();
        let sets = self.sets();
        for set in &sets {
            if delta.new_sets.contains(&key(set.family, &set.name)) {
                out.push(add(NfListObject::Set(Box::new(set.clone()))));
            }
        }
        // Each element as written, by its text in the digest.
        let written: BTreeMap<String, &Expression<'static>> = sets
            .iter()
            .flat_map(|set| set.elem.iter().flat_map(|e| e.iter()))
            .map(|e| (element_text(e), e))
            .collect();
        let chains: Vec<_> = self
            .chains_where(&|k| delta.chains.contains(k))
            .into_iter()
            .filter(|(family, chain, _)| delta.chains.contains(&key(*family, &chain.name)))
            .collect();
        // Every chain before any rule: a jump needs its target to exist.
        for (_, chain, _) in &chains {
            out.push(add(NfListObject::Chain(chain.clone())));
            out.push(NfObject::CmdObject(NfCmd::Flush(FlushObject::Chain(
                chain.clone(),
            ))));
        }
        for (family, chain, rules) in chains {
            for expr in rules {
                out.push(add(NfListObject::Rule(rule(family, &chain.name, expr))));
            }
        }
        for (set, (added, removed)) in &delta.elements {
            let Some((family, name)) = split_key(set) else {
                continue;
            };
            let element = |items: &BTreeSet<String>| {
                NfListObject::Element(Element {
                    family,
                    table: TABLE.into(),
                    name: name.to_owned().into(),
                    elem: Cow::Owned(
                        items
                            .iter()
                            .map(|e| match written.get(e) {
                                Some(x) => (*x).clone(),
                                None => element_of(e),
                            })
                            .collect(),
                    ),
                })
            };
            if !removed.is_empty() {
                out.push(NfObject::CmdObject(NfCmd::Delete(element(removed))));
            }
            if !added.is_empty() {
                out.push(add(element(added)));
            }
        }
        for chain in &delta.del_chains {
            let Some((family, name)) = split_key(chain) else {
                continue;
            };
            let c = Chain {
                family,
                table: TABLE.into(),
                name: name.to_owned().into(),
                ..Chain::default()
            };
            out.push(NfObject::CmdObject(NfCmd::Flush(FlushObject::Chain(
                c.clone(),
            ))));
            out.push(NfObject::CmdObject(NfCmd::Delete(NfListObject::Chain(c))));
        }
        for set in &delta.del_sets {
            let Some((family, name)) = split_key(set) else {
                continue;
            };
            out.push(NfObject::CmdObject(NfCmd::Delete(NfListObject::Set(
                Box::new(Set {
                    family,
                    table: TABLE.into(),
                    name: name.to_owned().into(),
                    set_type: SetTypeValue::Single(SetType::Ipv4Addr),
                    ..Set::default()
                }),
            ))));
        }
        Ok(Nftables {
            objects: Cow::Owned(out),
        })
    }

    /// The named sets of both tables, with their elements: each remote group's members
    /// (`inet`), and for the `bridge` table's checks of filtered ports, their devices
    /// (`port-dev`), each device with its MAC (`port-mac`), with each of its addresses
    /// (`port-ip`) and with its network's DHCP server (`port-dhcp`). A port added or gone is
    /// elements added or removed: the bridge chains' rules are the same for every port.
    pub(super) fn sets(&self) -> Vec<Set<'static>> {
        let named = |family, name: &str, set_type, elems: Vec<Expression<'static>>| Set {
            family,
            table: TABLE.into(),
            name: name.to_owned().into(),
            set_type,
            elem: (!elems.is_empty()).then_some(Cow::Owned(elems)),
            ..Set::default()
        };
        let mut out: Vec<Set<'static>> = self
            .groups
            .iter()
            .map(|g| {
                named(
                    NfFamily::INet,
                    g.name.as_str(),
                    SetTypeValue::Single(SetType::Ipv4Addr),
                    g.members.iter().map(|a| s(a.to_string())).collect(),
                )
            })
            .collect();
        let filtered: Vec<&PortFilter> = self.ports.iter().filter(|p| p.port_security).collect();
        let pair = |dev: &IfName, v: String| {
            Expression::Named(NamedExpression::Concat(vec![s(dev.as_str()), s(v)]))
        };
        let by_dev =
            |kind: SetType| SetTypeValue::Concatenated(Cow::Owned(vec![SetType::Ifname, kind]));
        out.push(named(
            NfFamily::Bridge,
            PORT_DEV,
            SetTypeValue::Single(SetType::Ifname),
            filtered.iter().map(|p| s(p.device.as_str())).collect(),
        ));
        out.push(named(
            NfFamily::Bridge,
            PORT_MAC,
            by_dev(SetType::EtherAddr),
            filtered
                .iter()
                .map(|p| pair(&p.device, p.mac.to_string()))
                .collect(),
        ));
        out.push(named(
            NfFamily::Bridge,
            PORT_IP,
            by_dev(SetType::Ipv4Addr),
            filtered
                .iter()
                .flat_map(|p| p.ips.iter().map(|a| pair(&p.device, a.to_string())))
                .collect(),
        ));
        out.push(named(
            NfFamily::Bridge,
            PORT_DHCP,
            by_dev(SetType::Ipv4Addr),
            filtered
                .iter()
                .filter_map(|p| Some(pair(&p.device, p.dhcp_server?.to_string())))
                .collect(),
        ));
        out
    }

    /// Every chain of both tables with its rules' statements: the `inet` table's, then the
    /// `bridge` table's.
    fn all_chains(&self) -> Vec<(NfFamily, Chain<'static>, Vec<Vec<Statement<'static>>>)> {
        self.chains_where(&|_| true)
    }

    /// [`Ruleset::all_chains`] but the ports' chains whose key `wanted` refuses, which are
    /// not built at all: a change of one port's filter on a node of 100 ports of 100 rules
    /// builds that port's chains, not the 20,000 rules of all of them.
    fn chains_where(
        &self,
        wanted: &dyn Fn(&str) -> bool,
    ) -> Vec<(NfFamily, Chain<'static>, Vec<Vec<Statement<'static>>>)> {
        let mut all = self.chains(wanted);
        for (chain, rules) in self
            .bridge_chain()
            .into_iter()
            .chain(self.bridge_out_chain())
        {
            all.push((NfFamily::Bridge, chain, rules));
        }
        all
    }

    /// How this ruleset reads back from the kernel.
    pub fn observed(&self) -> Result<Observed, FirewallError> {
        Ok(digest(&self.render()?))
    }

    /// [`Ruleset::observed`], taking the chains of each port whose filter is the same as in
    /// `before` (whose digest was `digest`) from that digest instead of rendering them
    /// again: a change of one group's rules or of one port renders those ports' chains and
    /// the node-wide ones only.
    pub fn observed_since(
        &self,
        before: Option<(&Ruleset, &Observed)>,
    ) -> Result<Observed, FirewallError> {
        self.validate()?;
        let mut kept: BTreeMap<String, Vec<String>> = BTreeMap::new();
        if let Some((old, digest)) = before {
            let names = |rs: &Ruleset, p: &PortFilter| -> Vec<Name> {
                p.ingress
                    .iter()
                    .chain(&p.egress)
                    .filter_map(|r| match r.remote {
                        Remote::Group(GroupRef(i)) => rs.groups.get(i).map(|g| g.name.clone()),
                        _ => None,
                    })
                    .collect()
            };
            let previous: BTreeMap<&Name, &PortFilter> =
                old.ports.iter().map(|p| (&p.id, p)).collect();
            for p in self.ports.iter().filter(|p| p.port_security) {
                if previous
                    .get(&p.id)
                    .is_some_and(|q| *q == p && names(old, q) == names(self, p))
                {
                    for side in ["in", "out"] {
                        let k = key(NfFamily::INet, &format!("{}-{side}", p.id));
                        if let Some(rules) = digest.chains.get(&k) {
                            kept.insert(k, rules.clone());
                        }
                    }
                }
            }
        }
        let mut o = Observed::default();
        for set in self.sets() {
            o.sets.insert(
                key(set.family, &set.name),
                set.elem
                    .iter()
                    .flat_map(|e| e.iter())
                    .map(element_text)
                    .collect(),
            );
        }
        for (family, chain, rules) in self.chains_where(&|k| !kept.contains_key(k)) {
            let k = key(family, &chain.name);
            let ids = rules.iter().map(|r| rule_id(r)).collect();
            o.chains.insert(k, ids);
        }
        o.chains.extend(kept);
        Ok(o)
    }

    /// The `inet` table's chains with their rules' statements, but the ports' chains whose
    /// key `wanted` refuses.
    fn chains(
        &self,
        wanted: &dyn Fn(&str) -> bool,
    ) -> Vec<(NfFamily, Chain<'static>, Vec<Vec<Statement<'static>>>)> {
        let mut pre = Vec::new();
        if !self.zones.is_empty() {
            // One lookup of the bridge a frame came in on, however many networks the node
            // has: every packet of every guest passes here, and so does every packet of the
            // underlay (a miss ends the rule, and the rules below follow). Accepted here
            // (this chain only): what follows is for the node's own traffic.
            let zones = self
                .zones
                .iter()
                .map(|z| {
                    SetItem::Mapping(s(z.bridge.as_str()), Expression::Number(u32::from(z.zone)))
                })
                .collect();
            pre.push(vec![
                Statement::Mangle(Mangle {
                    key: ct("zone"),
                    value: Expression::Named(NamedExpression::Map(Box::new(Map {
                        key: meta(MetaKey::Iifname),
                        data: Expression::Named(NamedExpression::Set(zones)),
                    }))),
                }),
                Statement::Accept(None),
            ]);
        }
        // The overlay's encapsulated packets are not tracked: nothing stateful matches them
        // (the input chain checks their source and VNI), and the frames they carry are
        // tracked in their network's zone once decapsulated. Guests' packets never reach
        // these rules (they came in on a bridge, above).
        let tunnel_ports: BTreeSet<u16> = self.tunnels.iter().map(|t| t.port).collect();
        let notrack = |port: u16| {
            vec![
                eq(payload("udp", "dport"), Expression::Number(u32::from(port))),
                Statement::Notrack,
            ]
        };
        pre.extend(tunnel_ports.iter().map(|p| notrack(*p)));
        let output: Vec<_> = tunnel_ports.iter().map(|p| notrack(*p)).collect();
        let mut fwd = vec![
            vec![
                Statement::Match(Match {
                    left: ct("state"),
                    right: Expression::List(vec![s("established"), s("related")]),
                    op: Operator::IN,
                }),
                Statement::Accept(None),
            ],
            vec![
                Statement::Match(Match {
                    left: ct("state"),
                    right: Expression::List(vec![s("invalid")]),
                    op: Operator::IN,
                }),
                Statement::Drop(None),
            ],
        ];
        // A packet from a port (bridge and source MAC) jumps to its egress chain, then one
        // to a port (bridge and destination MAC) to its ingress chain: one lookup each in
        // a verdict map, however many ports the node has.
        let filtered: Vec<&PortFilter> = self.ports.iter().filter(|p| p.port_security).collect();
        if !filtered.is_empty() {
            for (iface, mac, side) in [
                (MetaKey::Iifname, "saddr", "out"),
                (MetaKey::Oifname, "daddr", "in"),
            ] {
                let jumps = filtered
                    .iter()
                    .map(|p| {
                        SetItem::Mapping(
                            Expression::Named(NamedExpression::Concat(vec![
                                s(p.bridge.as_str()),
                                s(p.mac.to_string()),
                            ])),
                            Expression::Verdict(Verdict::Jump(JumpTarget {
                                target: format!("{}-{side}", p.id).into(),
                            })),
                        )
                    })
                    .collect();
                fwd.push(vec![Statement::VerdictMap(VerdictMap {
                    key: Expression::Named(NamedExpression::Concat(vec![
                        meta(iface),
                        payload("ether", mac),
                    ])),
                    data: Expression::Named(NamedExpression::Set(jumps)),
                })]);
            }
        }
        let mut port_chains = Vec::new();
        for p in &filtered {
            let (inn, out) = (format!("{}-in", p.id), format!("{}-out", p.id));
            let (want_in, want_out) = (
                wanted(&key(NfFamily::INet, &inn)),
                wanted(&key(NfFamily::INet, &out)),
            );
            let dhcp = |sport: u32, dport: u32| {
                vec![
                    eq(payload("udp", "sport"), Expression::Number(sport)),
                    eq(payload("udp", "dport"), Expression::Number(dport)),
                    Statement::Return(None),
                ]
            };
            // DHCP replies only from the network's server.
            let mut in_rules = Vec::new();
            if let Some(server) = p.dhcp_server {
                let mut r = vec![eq(payload("ip", "saddr"), s(server.to_string()))];
                r.extend(dhcp(67, 68));
                in_rules.push(r);
            }
            if want_in {
                in_rules.extend(p.ingress.iter().map(|r| self.statements(r, "saddr")));
                in_rules.push(vec![Statement::Drop(None)]);
                port_chains.push((NfFamily::INet, regular(&inn), in_rules));
            }
            if !want_out {
                continue;
            }
            // DHCP out only to the broadcast address or the network's server: a client port
            // to anywhere else is no DHCP and gets no pass around the groups. A rule each,
            // not an anonymous set of the two (a kernel object per port).
            let servers = std::iter::once(Ipv4Addr::BROADCAST).chain(p.dhcp_server);
            let mut out_rules: Vec<_> = servers
                .map(|to| {
                    let mut r = vec![eq(payload("ip", "daddr"), s(to.to_string()))];
                    r.extend(dhcp(68, 67));
                    r
                })
                .collect();
            out_rules.extend(p.egress.iter().map(|r| self.statements(r, "daddr")));
            out_rules.push(vec![Statement::Drop(None)]);
            port_chains.push((NfFamily::INet, regular(&out), out_rules));
        }
        let mut input = Vec::new();
        // Port, VNI and source of every network's peers in one anonymous set: one lookup a
        // packet of the underlay, however many networks the node has.
        let peers: Vec<SetItem<'static>> = self
            .tunnels
            .iter()
            .flat_map(|t| {
                t.peers.iter().map(|peer| {
                    SetItem::Element(Expression::Named(NamedExpression::Concat(vec![
                        Expression::Number(u32::from(t.port)),
                        Expression::Number(t.vni),
                        s(peer.to_string()),
                    ])))
                })
            })
            .collect();
        if !peers.is_empty() {
            input.push(vec![
                eq(
                    Expression::Named(NamedExpression::Concat(vec![
                        payload("udp", "dport"),
                        // The VNI: bytes 4 to 6 of the VXLAN header after the 8-byte UDP
                        // header.
                        Expression::Named(NamedExpression::Payload(Payload::PayloadRaw(
                            PayloadRaw {
                                base: PayloadBase::TH,
                                offset: 96,
                                len: 24,
                            },
                        ))),
                        payload("ip", "saddr"),
                    ])),
                    Expression::Named(NamedExpression::Set(peers)),
                ),
                Statement::Accept(None),
            ]);
        }
        for port in &tunnel_ports {
            input.push(vec![
                eq(
                    payload("udp", "dport"),
                    Expression::Number(u32::from(*port)),
                ),
                Statement::Drop(None),
            ]);
        }
        let mut all = vec![
            (
                NfFamily::INet,
                base(NfFamily::INet, "prerouting", NfHook::Prerouting, -300),
                pre,
            ),
            (
                NfFamily::INet,
                base(NfFamily::INet, "output", NfHook::Output, -300),
                output,
            ),
            (
                NfFamily::INet,
                base(NfFamily::INet, "input", NfHook::Input, 0),
                input,
            ),
            (
                NfFamily::INet,
                base(NfFamily::INet, "forward", NfHook::Forward, 0),
                fwd,
            ),
        ];
        all.extend(port_chains);
        all
    }

    /// A rule's matches, `remote_field` being `saddr` (ingress) or `daddr` (egress).
    fn statements(&self, r: &Rule, remote_field: &'static str) -> Vec<Statement<'static>> {
        // Rules are IPv4: without this, a rule with no address would match IPv6 too.
        let mut st = vec![eq(meta(MetaKey::Nfproto), s("ipv4"))];
        match r.remote {
            Remote::Any => {}
            Remote::Cidr(c) => st.push(eq(
                payload("ip", remote_field),
                Expression::Named(NamedExpression::Prefix(Prefix {
                    addr: Box::new(s(c.network().to_string())),
                    len: u32::from(c.prefix()),
                })),
            )),
            Remote::Group(GroupRef(i)) => {
                if let Some(g) = self.groups.get(i) {
                    st.push(eq(payload("ip", remote_field), s(format!("@{}", g.name))));
                }
            }
        }
        let proto = match r.protocol {
            Protocol::Any => None,
            Protocol::Tcp => Some("tcp"),
            Protocol::Udp => Some("udp"),
            Protocol::Icmp => Some("icmp"),
        };
        if let Some(proto) = proto {
            st.push(eq(meta(MetaKey::L4proto), s(proto)));
        }
        if let (Some(range), Some(proto @ ("tcp" | "udp"))) = (r.ports, proto) {
            let right = if range.first == range.last {
                Expression::Number(u32::from(range.first))
            } else {
                Expression::Range(Box::new(Range {
                    range: [
                        Expression::Number(u32::from(range.first)),
                        Expression::Number(u32::from(range.last)),
                    ],
                }))
            };
            st.push(eq(payload(proto, "dport"), right));
        }
        st.push(Statement::Return(None));
        st
    }

    /// The `bridge` table's chains for what comes in: per filtered port, frames in from its
    /// device carry its MAC and are IPv4 or ARP only (no IPv6, no VLAN tags: IPv6 has no
    /// addresses of Stratus's yet), its IPv4 and ARP packets carry its addresses (or 0.0.0.0
    /// for DHCP and ARP probes), and it sends no DHCP server replies; per local DHCP
    /// server, nothing of DHCP or for the server's address comes in from the overlay.
    ///
    /// A frame's device is looked up in the filtered ports' devices once, by the base
    /// chain's jump to [`FROM_PORT`], whose checks then need no such lookup each; a frame
    /// that passes them is accepted there (the overlay's rules below match no port's
    /// device), so a guest's frame takes two set lookups, not eight.
    fn bridge_chain(&self) -> Vec<(Chain<'static>, Vec<Vec<Statement<'static>>>)> {
        let mut rules = Vec::new();
        let mut chains = Vec::new();
        if self.ports.iter().any(|p| p.port_security) {
            // Each check looks the frame's port up in the sets of `sets()`: a rule per
            // check, not per port and check.
            let of_dev = |field: Expression<'static>| {
                Expression::Named(NamedExpression::Concat(vec![meta(MetaKey::Iifname), field]))
            };
            let set = |name: &str| s(format!("@{name}"));
            let checks = vec![
                vec![
                    ne(of_dev(payload("ether", "saddr")), set(PORT_MAC)),
                    Statement::Drop(None),
                ],
                vec![
                    ne(payload("ether", "type"), s("ip")),
                    ne(payload("ether", "type"), s("arp")),
                    Statement::Drop(None),
                ],
                vec![
                    eq(payload("ether", "type"), s("ip")),
                    eq(payload("udp", "sport"), Expression::Number(67)),
                    Statement::Drop(None),
                ],
                vec![
                    eq(payload("ether", "type"), s("ip")),
                    eq(payload("ip", "saddr"), s("0.0.0.0")),
                    eq(payload("udp", "dport"), Expression::Number(67)),
                    Statement::Accept(None),
                ],
                vec![
                    eq(payload("ether", "type"), s("ip")),
                    ne(of_dev(payload("ip", "saddr")), set(PORT_IP)),
                    Statement::Drop(None),
                ],
                vec![
                    eq(payload("ether", "type"), s("arp")),
                    ne(payload("arp", "saddr ip"), s("0.0.0.0")),
                    ne(of_dev(payload("arp", "saddr ip")), set(PORT_IP)),
                    Statement::Drop(None),
                ],
                vec![Statement::Accept(None)],
            ];
            chains.push((bridge_regular(FROM_PORT), checks));
            rules.push(vec![
                eq(meta(MetaKey::Iifname), set(PORT_DEV)),
                Statement::Jump(JumpTarget {
                    target: FROM_PORT.into(),
                }),
            ]);
        }
        if !self.local_dhcp.is_empty() {
            // Three rules for all networks with a DHCP server of their own on this node,
            // each one lookup: every frame from the overlay passes them.
            let devices = one_or_set(self.local_dhcp.iter().map(|d| d.vxlan.to_string()));
            rules.push(vec![
                eq(meta(MetaKey::Iifname), devices),
                eq(payload("ether", "type"), s("ip")),
                eq(
                    payload("udp", "dport"),
                    Expression::Named(NamedExpression::Set(vec![
                        SetItem::Element(Expression::Number(67)),
                        SetItem::Element(Expression::Number(68)),
                    ])),
                ),
                Statement::Drop(None),
            ]);
            let servers = || {
                Expression::Named(NamedExpression::Set(
                    self.local_dhcp
                        .iter()
                        .map(|d| {
                            SetItem::Element(Expression::Named(NamedExpression::Concat(vec![
                                s(d.vxlan.as_str()),
                                s(d.server.to_string()),
                            ])))
                        })
                        .collect(),
                ))
            };
            for (ether_type, field) in [
                ("ip", payload("ip", "daddr")),
                ("arp", payload("arp", "daddr ip")),
            ] {
                rules.push(vec![
                    eq(payload("ether", "type"), s(ether_type)),
                    eq(
                        Expression::Named(NamedExpression::Concat(vec![
                            meta(MetaKey::Iifname),
                            field,
                        ])),
                        servers(),
                    ),
                    Statement::Drop(None),
                ]);
            }
        }
        chains.push((
            base(NfFamily::Bridge, "ports", NfHook::Prerouting, -200),
            rules,
        ));
        chains
    }

    /// The `bridge` table's chains for what goes out of a port: an IPv4 frame to a filtered
    /// port's device is addressed to its MAC, or is a DHCP reply of its network's server.
    /// The `inet` forward chain sends a frame to a port's ingress rules by its destination
    /// MAC; a broadcast or multicast frame (or one flooded from another MAC) would pass
    /// them by, so it is dropped here. One rule of the base chain finds such a frame (a
    /// frame to a port's own MAC takes one lookup of its device and one of its MAC) and
    /// sends it to [`TO_PORT_OTHER`], which lets the DHCP reply through and drops the rest.
    fn bridge_out_chain(&self) -> Vec<(Chain<'static>, Vec<Vec<Statement<'static>>>)> {
        let mut rules = Vec::new();
        let mut chains = Vec::new();
        if self.ports.iter().any(|p| p.port_security) {
            let of_dev = |field: Expression<'static>| {
                Expression::Named(NamedExpression::Concat(vec![meta(MetaKey::Oifname), field]))
            };
            chains.push((
                bridge_regular(TO_PORT_OTHER),
                vec![
                    vec![
                        eq(of_dev(payload("ip", "saddr")), s(format!("@{PORT_DHCP}"))),
                        eq(payload("udp", "sport"), Expression::Number(67)),
                        eq(payload("udp", "dport"), Expression::Number(68)),
                        Statement::Accept(None),
                    ],
                    vec![Statement::Drop(None)],
                ],
            ));
            rules.push(vec![
                eq(meta(MetaKey::Oifname), s(format!("@{PORT_DEV}"))),
                eq(payload("ether", "type"), s("ip")),
                ne(of_dev(payload("ether", "daddr")), s(format!("@{PORT_MAC}"))),
                Statement::Jump(JumpTarget {
                    target: TO_PORT_OTHER.into(),
                }),
            ]);
        }
        chains.push((
            base(NfFamily::Bridge, "to-ports", NfHook::Forward, 0),
            rules,
        ));
        chains
    }
}

/// A router's address translation and forward filter, in the `ip stratus` table of its
/// namespace: each floating address DNATed to its fixed address (whatever interface it comes
/// in on) and the fixed address SNATed to it when leaving by the gateway; then, with SNAT on,
/// the router's subnets SNATed to the gateway's address when leaving by the gateway.
///
/// The forward chain lets nothing that enters by the gateway go further inside (to the
/// router's subnets or anything routed behind them) unless it is addressed to a floating
/// address (`ct status dnat`) or answers a connection made from inside (`ct state
/// established,related`): the external network is shared by every tenant, and another
/// tenant's router can route to this one's gateway address, so the fixed addresses behind
/// it must not be reachable from there.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Nat {
    /// The router's interface on the external network; `None`: no gateway, no rule.
    pub gateway: Option<IfName>,
    /// Floating addresses, one per fixed address.
    pub floating: Vec<FloatingNat>,
    /// Sources translated to an address of the gateway's when leaving by it.
    pub snat: Vec<Snat>,
}

/// One floating address and the fixed address behind it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct FloatingNat {
    /// The address on the external network.
    pub floating: Ipv4Addr,
    /// The port's address on a subnet of the router.
    pub fixed: Ipv4Addr,
}

/// Sources in `source` leave the gateway as `to`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Snat {
    /// A subnet of the router.
    pub source: Ipv4Cidr,
    /// The gateway's address.
    pub to: Ipv4Addr,
}

impl Nat {
    /// Checks that no floating or fixed address is given twice (one would shadow the other).
    pub fn validate(&self) -> Result<(), FirewallError> {
        let mut floating = BTreeSet::new();
        let mut fixed = BTreeSet::new();
        for f in &self.floating {
            if !floating.insert(f.floating) || !fixed.insert(f.fixed) {
                return Err(FirewallError::Invalid(format!(
                    "floating address {} or fixed address {} given twice",
                    f.floating, f.fixed
                )));
            }
        }
        Ok(())
    }

    /// The nft batch that replaces a router namespace's NAT table by this one.
    pub fn render(&self) -> Result<Nftables<'static>, FirewallError> {
        self.validate()?;
        let mut out = Vec::new();
        replace_table(&mut out, NfFamily::IP);
        let mut pre = Vec::new();
        let mut post = Vec::new();
        let mut fwd = Vec::new();
        if let Some(gw) = &self.gateway {
            let oif = || eq(meta(MetaKey::Oifname), s(gw.as_str()));
            let iif = || eq(meta(MetaKey::Iifname), s(gw.as_str()));
            fwd.push(vec![
                iif(),
                Statement::Match(Match {
                    left: ct("state"),
                    right: Expression::List(vec![s("established"), s("related")]),
                    op: Operator::IN,
                }),
                Statement::Accept(None),
            ]);
            fwd.push(vec![
                iif(),
                Statement::Match(Match {
                    left: ct("status"),
                    right: s("dnat"),
                    op: Operator::IN,
                }),
                Statement::Accept(None),
            ]);
            fwd.push(vec![
                iif(),
                ne(meta(MetaKey::Oifname), s(gw.as_str())),
                Statement::Drop(None),
            ]);
            for f in &self.floating {
                pre.push(vec![
                    eq(payload("ip", "daddr"), s(f.floating.to_string())),
                    Statement::DNAT(Some(nat_to(f.fixed))),
                ]);
                post.push(vec![
                    oif(),
                    eq(payload("ip", "saddr"), s(f.fixed.to_string())),
                    Statement::SNAT(Some(nat_to(f.floating))),
                ]);
            }
            for n in &self.snat {
                post.push(vec![
                    oif(),
                    eq(
                        payload("ip", "saddr"),
                        Expression::Named(NamedExpression::Prefix(Prefix {
                            addr: Box::new(s(n.source.network().to_string())),
                            len: u32::from(n.source.prefix()),
                        })),
                    ),
                    Statement::SNAT(Some(nat_to(n.to))),
                ]);
            }
        }
        for (name, hook, prio, rules) in [
            ("prerouting", NfHook::Prerouting, -100, pre),
            ("postrouting", NfHook::Postrouting, 100, post),
        ] {
            let chain = Chain {
                _type: Some(NfChainType::NAT),
                ..base(NfFamily::IP, name, hook, prio)
            };
            out.push(add(NfListObject::Chain(chain)));
            for expr in rules {
                out.push(add(NfListObject::Rule(rule(NfFamily::IP, name, expr))));
            }
        }
        out.push(add(NfListObject::Chain(base(
            NfFamily::IP,
            "forward",
            NfHook::Forward,
            0,
        ))));
        for expr in fwd {
            out.push(add(NfListObject::Rule(rule(NfFamily::IP, "forward", expr))));
        }
        Ok(Nftables {
            objects: Cow::Owned(out),
        })
    }

    /// What the table looks like once applied, as [`Firewall::read_nat`] reads it.
    pub fn observed(&self) -> Result<Observed, FirewallError> {
        Ok(digest(&self.render()?))
    }
}

/// The [`Observed`] digest of the tables a batch makes.
fn digest(batch: &Nftables<'static>) -> Observed {
    let mut o = Observed::default();
    for obj in batch.objects.iter() {
        match obj {
            NfObject::CmdObject(NfCmd::Add(NfListObject::Chain(c))) => {
                o.chains.insert(key(c.family, &c.name), Vec::new());
            }
            NfObject::CmdObject(NfCmd::Add(NfListObject::Rule(r))) => {
                if let Some(rules) = o.chains.get_mut(&key(r.family, &r.chain)) {
                    rules.push(r.comment.as_deref().unwrap_or_default().to_owned());
                }
            }
            NfObject::CmdObject(NfCmd::Add(NfListObject::Set(set))) => {
                let elems = set
                    .elem
                    .iter()
                    .flat_map(|e| e.iter())
                    .map(element_text)
                    .collect();
                o.sets.insert(key(set.family, &set.name), elems);
            }
            _ => {}
        }
    }
    o
}

fn nat_to(addr: Ipv4Addr) -> NAT<'static> {
    NAT {
        addr: Some(s(addr.to_string())),
        family: None,
        port: None,
        flags: None,
    }
}

fn key(family: NfFamily, name: &str) -> String {
    let f = match family {
        NfFamily::INet => "inet",
        NfFamily::Bridge => "bridge",
        NfFamily::IP => "ip",
        _ => "other",
    };
    format!("{f}/{name}")
}

/// The family and name of a `family/name` key.
fn split_key(k: &str) -> Option<(NfFamily, &str)> {
    let (f, name) = k.split_once('/')?;
    let family = match f {
        "inet" => NfFamily::INet,
        "bridge" => NfFamily::Bridge,
        "ip" => NfFamily::IP,
        _ => return None,
    };
    Some((family, name))
}

fn add(o: NfListObject<'static>) -> NfObject<'static> {
    NfObject::CmdObject(NfCmd::Add(o))
}

fn table(family: NfFamily) -> NfListObject<'static> {
    NfListObject::Table(Table {
        family,
        name: TABLE.into(),
        handle: None,
    })
}

/// `add table; delete table; add table`: the table exists, empty, whatever was there.
fn replace_table(out: &mut Vec<NfObject<'static>>, family: NfFamily) {
    out.push(add(table(family)));
    out.push(NfObject::CmdObject(NfCmd::Delete(table(family))));
    out.push(add(table(family)));
}

fn base(family: NfFamily, name: &str, hook: NfHook, prio: i32) -> Chain<'static> {
    Chain {
        family,
        table: TABLE.into(),
        name: name.to_owned().into(),
        _type: Some(NfChainType::Filter),
        hook: Some(hook),
        prio: Some(prio),
        policy: Some(NfChainPolicy::Accept),
        ..Chain::default()
    }
}

fn regular(name: &str) -> Chain<'static> {
    Chain {
        family: NfFamily::INet,
        table: TABLE.into(),
        name: name.to_owned().into(),
        ..Chain::default()
    }
}

/// A chain of the `bridge` table without a hook, reached by a jump.
fn bridge_regular(name: &str) -> Chain<'static> {
    Chain {
        family: NfFamily::Bridge,
        ..regular(name)
    }
}

/// The identity of a rule: the digest of its statements, its comment in the kernel.
fn rule_id(expr: &[Statement<'static>]) -> String {
    digest_hex(&serde_json::to_string(expr).unwrap_or_default(), 16)
}

/// A rule whose comment is the digest of its statements: its identity when read back.
fn rule(family: NfFamily, chain: &str, expr: Vec<Statement<'static>>) -> NfRule<'static> {
    let id = rule_id(&expr);
    NfRule {
        family,
        table: TABLE.into(),
        chain: chain.to_owned().into(),
        expr: Cow::Owned(expr),
        handle: None,
        index: None,
        comment: Some(id.into()),
    }
}

/// A set element as the digest (and `nft -j list`) writes it: a value as itself, anything
/// else (a concatenation) as its JSON.
fn element_text(e: &Expression<'static>) -> String {
    match e {
        Expression::String(v) => v.to_string(),
        other => serde_json::to_string(other).unwrap_or_default(),
    }
}

/// The element that [`element_text`] wrote as `text` (read back from the kernel, to be
/// removed): a concatenation of values or a value.
fn element_of(text: &str) -> Expression<'static> {
    let parts = serde_json::from_str::<serde_json::Value>(text)
        .ok()
        .and_then(|v| {
            v.get("concat")?
                .as_array()?
                .iter()
                .map(|p| p.as_str().map(s))
                .collect::<Option<Vec<_>>>()
        });
    match parts {
        Some(parts) => Expression::Named(NamedExpression::Concat(parts)),
        None => s(text),
    }
}

fn s(v: impl Into<String>) -> Expression<'static> {
    Expression::String(Cow::Owned(v.into()))
}

fn meta(key: MetaKey) -> Expression<'static> {
    Expression::Named(NamedExpression::Meta(Meta { key }))
}

fn ct(key: &'static str) -> Expression<'static> {
    Expression::Named(NamedExpression::CT(CT {
        key: key.into(),
        family: None,
        dir: None,
    }))
}

fn payload(protocol: &'static str, field: &'static str) -> Expression<'static> {
    Expression::Named(NamedExpression::Payload(Payload::PayloadField(
        PayloadField {
            protocol: protocol.into(),
            field: field.into(),
        },
    )))
}

fn eq(left: Expression<'static>, right: Expression<'static>) -> Statement<'static> {
    Statement::Match(Match {
        left,
        right,
        op: Operator::EQ,
    })
}

fn ne(left: Expression<'static>, right: Expression<'static>) -> Statement<'static> {
    Statement::Match(Match {
        left,
        right,
        op: Operator::NEQ,
    })
}

/// One value as itself, several as an anonymous set (which the kernel makes and binds per
/// rule: far costlier to load than a value).
fn one_or_set(values: impl IntoIterator<Item = String>) -> Expression<'static> {
    let mut items: Vec<SetItem<'static>> =
        values.into_iter().map(|v| SetItem::Element(s(v))).collect();
    if items.len() == 1
        && let Some(SetItem::Element(one)) = items.pop()
    {
        return one;
    }
    Expression::Named(NamedExpression::Set(items))
}

/// The kernel's nftables through `nft -j`, in one network namespace (the node's own in
/// production, a test's namespace in tests).
///
/// What it last wrote or read is kept with the nf_tables generation the kernel had then
/// (`NFT_MSG_GETGEN`, one small netlink request that lists nothing): every committed
/// transaction in the namespace raises the generation, so while it has not moved the
/// tables are what was kept, and `read` lists them only once it has (a change by hand is
/// read, whoever made it).
#[derive(Debug, Clone)]
pub struct NftFirewall {
    netns: Netns,
    state: std::sync::Arc<std::sync::Mutex<State>>,
}

/// The generation socket and what the tables held at a generation.
#[derive(Debug, Default)]
struct State {
    socket: Option<Generation>,
    known: Option<(u32, Option<Observed>)>,
    /// The generation the last `read` answered for: an update's delta was taken from the
    /// tables as they were then, and holds only while nothing has been committed since.
    read_at: Option<u32>,
    /// The nftables library's context in the namespace, while it is the same namespace.
    session: Option<libnft::Session>,
}

/// A NETLINK_NETFILTER socket in one namespace, for its nf_tables generation.
#[derive(Debug)]
struct Generation {
    socket: rtnetlink::sys::Socket,
    /// The namespace it was opened in (a namespace deleted and made again is another).
    identity: Option<(u64, u64)>,
}

impl Generation {
    fn open(ns: &Netns) -> Result<Self, FirewallError> {
        let io = |source| FirewallError::Io {
            what: format!("open a netfilter socket in {ns}"),
            source,
        };
        let identity = netns::identity(ns);
        let socket = netns::run_in(ns, || {
            rtnetlink::sys::Socket::new(rtnetlink::sys::protocols::NETLINK_NETFILTER)
        })
        .map_err(|e| io(std::io::Error::other(e.to_string())))?
        .map_err(io)?;
        Ok(Self { socket, identity })
    }

    fn read(&self) -> Result<u32, FirewallError> {
        let io = |source| FirewallError::Io {
            what: "read the nf_tables generation".into(),
            source,
        };
        // nlmsghdr (len 20, type NFNL_SUBSYS_NFTABLES << 8 | NFT_MSG_GETGEN, NLM_F_REQUEST,
        // seq, pid) and nfgenmsg (AF_UNSPEC, version 0, res_id 0).
        let mut req = Vec::with_capacity(20);
        req.extend_from_slice(&20u32.to_ne_bytes());
        req.extend_from_slice(&((10u16 << 8) | 16).to_ne_bytes());
        req.extend_from_slice(&1u16.to_ne_bytes());
        req.extend_from_slice(&[0; 12]);
        self.socket.send(&req, 0).map_err(io)?;
        let (buf, _) = self.socket.recv_from_full().map_err(io)?;
        // NFT_MSG_NEWGEN's attributes follow the 16-byte header and the 4-byte nfgenmsg;
        // NFTA_GEN_ID (1) is a big-endian u32.
        let mut at = 20;
        while at + 8 <= buf.len() {
            let len = usize::from(u16::from_ne_bytes([buf[at], buf[at + 1]]));
            let kind = u16::from_ne_bytes([buf[at + 2], buf[at + 3]]) & 0x3fff;
            if len < 4 {
                break;
            }
            if kind == 1 && len >= 8 {
                return Ok(u32::from_be_bytes([
                    buf[at + 4],
                    buf[at + 5],
                    buf[at + 6],
                    buf[at + 7],
                ]));
            }
            at += (len + 3) & !3;
        }
        Err(io(std::io::Error::other(format!(
            "no generation in the kernel's answer ({} bytes)",
            buf.len()
        ))))
    }
}

impl NftFirewall {
    /// The firewall of `netns`.
    pub fn new(netns: Netns) -> Self {
        Self {
            netns,
            state: Default::default(),
        }
    }

    /// Runs `nft` with `args`, `stdin` on its standard input; its standard output.
    fn nft(
        &self,
        args: &[&str],
        stdin: Option<&[u8]>,
        what: &str,
    ) -> Result<Vec<u8>, FirewallError> {
        nft_in(&self.netns, args, stdin, what)
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The namespace's nf_tables generation, through a socket kept open while the
    /// namespace is the same one.
    fn generation(&self, st: &mut State) -> Result<u32, FirewallError> {
        let current = netns::identity(&self.netns);
        if st
            .socket
            .as_ref()
            .is_none_or(|g| g.identity != current || current.is_none())
        {
            st.socket = None;
            st.known = None;
            st.read_at = None;
            st.session = None;
            st.socket = Some(Generation::open(&self.netns)?);
        }
        match st.socket.as_ref().map(Generation::read) {
            Some(Ok(g)) => Ok(g),
            Some(Err(e)) => {
                st.socket = None;
                Err(e)
            }
            None => Err(FirewallError::Io {
                what: "read the nf_tables generation".into(),
                source: std::io::Error::other("no socket"),
            }),
        }
    }

    /// Runs one `nft -f -` batch and keeps `after` as what the tables hold when the
    /// batch was the only transaction committed meanwhile.
    fn commit(
        &self,
        batch: &Nftables<'static>,
        what: &str,
        after: Option<Observed>,
    ) -> Result<(), FirewallError> {
        let (input, args) = encode(batch, &[])?;
        let mut st = self.state();
        let before = self.generation(&mut st).ok();
        st.known = None;
        st.read_at = None;
        self.batch(&mut st, args, &input, what)?;
        let now = self.generation(&mut st).ok();
        if let (Some(b), Some(n)) = (before, now)
            && n == b.wrapping_add(1)
        {
            st.known = Some((n, after));
        }
        Ok(())
    }

    /// Runs one batch (`input`, which `args` tell `nft` how to read) as one transaction:
    /// through the nftables library in the agent's process when the batch is nft's text and
    /// the host has the library ([`libnft`]), its context kept open in the namespace from one
    /// batch to the next; else as an `nft` process.
    fn batch(
        &self,
        st: &mut State,
        args: &[&str],
        input: &[u8],
        what: &str,
    ) -> Result<(), FirewallError> {
        if args != ["-f", "-"] || !libnft::available() {
            return self.nft(args, Some(input), what).map(|_| ());
        }
        let session = st.session.take();
        let owned = input.to_vec();
        let ran = netns::run_io(&self.netns, move || {
            Ok(session.or_else(libnft::Session::open).map(|mut s| {
                let r = s.run(&owned);
                (s, r)
            }))
        })
        .map_err(|source| FirewallError::Io {
            what: what.to_owned(),
            source,
        })?;
        match ran {
            Some((session, r)) => {
                st.session = Some(session);
                r.map(|_| ())
                    .map_err(|libnft::Refused(stderr)| FirewallError::Command {
                        what: what.to_owned(),
                        stderr,
                    })
            }
            None => self.nft(args, Some(input), what).map(|_| ()),
        }
    }

    /// Bridged IPv4 must pass the `inet` hooks for security groups to see it: turns on
    /// `net.bridge.bridge-nf-call-iptables` in the namespace, by its file under
    /// `/proc/sys/net` opened from a thread inside the namespace (that directory is the
    /// namespace of whoever opens it), left alone when it is on already: no `sysctl` under
    /// `ip netns exec` (two processes and a mount namespace) before each whole ruleset.
    fn bridge_netfilter(&self) -> Result<(), FirewallError> {
        const PATH: &str = "/proc/sys/net/bridge/bridge-nf-call-iptables";
        let set = || -> std::io::Result<()> {
            if std::fs::read(PATH)?.trim_ascii() == b"1" {
                return Ok(());
            }
            std::fs::write(PATH, b"1")
        };
        netns::run_io(&self.netns, set).map_err(|source| FirewallError::Io {
            what: "enable br_netfilter for IPv4 (is the br_netfilter module loaded?)".into(),
            source,
        })
    }
}

/// A batch as `nft` reads it, with the arguments that make it read that: nft's own syntax
/// ([`nft_text`]), which it parses in about half the time of the same batch as JSON (a node
/// of 1,000 ports loads some 8,000 rules at once), or JSON when the text writer does not
/// know something in the batch; `sets` gives the types of the sets it adds elements to.
fn encode(
    batch: &Nftables<'static>,
    sets: &[Set<'static>],
) -> Result<(Vec<u8>, &'static [&'static str]), FirewallError> {
    match nft_text::write(batch, sets) {
        Ok(text) => Ok((text.into_bytes(), &["-f", "-"])),
        Err(why) => {
            tracing::debug!(reason = %why.0, "nft batch written as JSON");
            Ok((to_json(batch)?, &["-j", "-f", "-"]))
        }
    }
}

/// A batch as `nft -j` reads it. The `nftables` crate writes the `notrack` statement as the
/// string `"notrack"`, which `nft` refuses (every statement is an object): it is written
/// `{"notrack": null}` here. Statements are the elements of a rule's `expr` array, and no
/// other statement is a string there.
pub(super) fn to_json(batch: &Nftables<'static>) -> Result<Vec<u8>, FirewallError> {
    let mut out = b"{\"nftables\":[".to_vec();
    for (i, obj) in batch.objects.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        let untracks = matches!(obj, NfObject::CmdObject(NfCmd::Add(NfListObject::Rule(r)))
            if r.expr.iter().any(|st| matches!(st, Statement::Notrack)));
        if !untracks {
            serde_json::to_writer(&mut out, obj).map_err(FirewallError::Json)?;
            continue;
        }
        let mut v = serde_json::to_value(obj).map_err(FirewallError::Json)?;
        let expr = v
            .pointer_mut("/add/rule/expr")
            .and_then(|e| e.as_array_mut());
        for st in expr.into_iter().flatten() {
            if st.as_str() == Some("notrack") {
                *st = serde_json::json!({"notrack": null});
            }
        }
        serde_json::to_writer(&mut out, &v).map_err(FirewallError::Json)?;
    }
    out.extend_from_slice(b"]}");
    Ok(out)
}

/// Runs `nft` with `args` in `ns`, `stdin` fed to it.
fn nft_in(
    ns: &Netns,
    args: &[&str],
    stdin: Option<&[u8]>,
    what: &str,
) -> Result<Vec<u8>, FirewallError> {
    let io = |source| FirewallError::Io {
        what: what.to_owned(),
        source,
    };
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    let stdin = stdin.map(<[u8]>::to_vec);
    // Started from a thread inside the namespace, `nft` runs there: no `ip netns exec` (a
    // process more, which also sets up a mount namespace) before each batch.
    let run = move || -> std::io::Result<std::process::Output> {
        let mut child = std::process::Command::new("nft")
            .args(&args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        if let (Some(data), Some(mut pipe)) = (stdin, child.stdin.take()) {
            pipe.write_all(&data)?;
        }
        child.wait_with_output()
    };
    let out = netns::run_io(ns, run).map_err(io)?;
    if !out.status.success() {
        return Err(FirewallError::Command {
            what: what.to_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(out.stdout)
}

impl Firewall for NftFirewall {
    /// One `nft -f -` transaction: both tables made empty (add, delete, add) and filled.
    /// Also turns on `net.bridge.bridge-nf-call-iptables` in the namespace.
    fn apply(&self, ruleset: &Ruleset) -> Result<(), FirewallError> {
        let batch = ruleset.render()?;
        self.bridge_netfilter()?;
        self.commit(&batch, "apply nft ruleset", Some(digest(&batch)))
    }

    /// One `nft -f -` transaction of [`Ruleset::render_update`]: the chains that differ,
    /// the set elements that differ, nothing else.
    ///
    /// The delta holds only for the tables as the last `read` found them. When anything was
    /// committed in the namespace since (a flushed ruleset, a table deleted by hand), or the
    /// kernel refuses the batch (a table gone between that check and the batch), the whole
    /// ruleset is written instead ([`Firewall::apply`]). What is kept afterwards is kept only
    /// when this batch was the one transaction committed meanwhile; otherwise the next read
    /// lists the tables and the next update repairs them.
    fn update(&self, update: &Update) -> Result<(), FirewallError> {
        let batch = update.ruleset.render_update(&update.delta)?;
        let (input, args) = encode(&batch, &update.ruleset.sets())?;
        let mut st = self.state();
        let read_at = st.read_at.take();
        let before = self.generation(&mut st).ok();
        st.known = None;
        if before.is_none() || before != read_at {
            drop(st);
            tracing::info!(netns = %self.netns, "nft tables changed since they were read; writing the whole ruleset");
            return self.apply(&update.ruleset);
        }
        if let Err(e) = self.batch(&mut st, args, &input, "update nft ruleset") {
            drop(st);
            tracing::info!(netns = %self.netns, error = %e, "nft update refused; writing the whole ruleset");
            return self.apply(&update.ruleset);
        }
        let now = self.generation(&mut st).ok();
        if let (Some(b), Some(n)) = (before, now)
            && n == b.wrapping_add(1)
        {
            st.known = Some((n, Some(update.want.clone())));
        }
        Ok(())
    }

    /// What the tables held at the last write or read, while the generation has not moved;
    /// else `nft -j list ruleset`, Stratus's two tables picked out.
    fn read(&self) -> Result<Option<Observed>, FirewallError> {
        let mut st = self.state();
        let generation = self.generation(&mut st).ok();
        st.read_at = generation;
        if let (Some(g), Some((k, o))) = (generation, &st.known)
            && g == *k
        {
            return Ok(o.clone());
        }
        let out = self.nft(&["-j", "list", "ruleset"], None, "list nft ruleset")?;
        let v: serde_json::Value = serde_json::from_slice(&out).map_err(FirewallError::Json)?;
        let observed = parse_observed(&v);
        // Read after the generation: a change since then moves it past `g`, so what was
        // kept is read again next time.
        st.known = generation.map(|g| (g, observed.clone()));
        Ok(observed)
    }

    /// One transaction deleting both tables (each added first, so absence is no error).
    fn clear(&self) -> Result<(), FirewallError> {
        let mut out = Vec::new();
        for family in [NfFamily::INet, NfFamily::Bridge] {
            out.push(add(table(family)));
            out.push(NfObject::CmdObject(NfCmd::Delete(table(family))));
        }
        let batch = Nftables {
            objects: Cow::Owned(out),
        };
        self.commit(&batch, "delete nft tables", None)
    }

    fn apply_nat(&self, netns: &Name, nat: &Nat) -> Result<(), FirewallError> {
        let (input, args) = encode(&nat.render()?, &[])?;
        let ns = Netns::Named(netns.clone());
        nft_in(&ns, args, Some(&input), "apply a router's NAT")?;
        Ok(())
    }

    fn read_nat(&self, netns: &Name) -> Result<Option<Observed>, FirewallError> {
        let ns = Netns::Named(netns.clone());
        let out = nft_in(&ns, &["-j", "list", "ruleset"], None, "list a router's NAT")?;
        let v: serde_json::Value = serde_json::from_slice(&out).map_err(FirewallError::Json)?;
        Ok(parse_tables(&v, &["ip"]))
    }

    /// `conntrack -L` once per zone in the node's namespace, `conntrack -D` of each stale
    /// connection ([`conntrack::prune_kernel`](super::conntrack::prune_kernel)).
    fn forget(&self, keep: &super::conntrack::Keep) -> Result<(), FirewallError> {
        super::conntrack::prune_kernel(&self.netns, keep).map_err(|stderr| FirewallError::Command {
            what: "forget the connections the filter no longer allows".into(),
            stderr,
        })
    }
}

/// Stratus's tables in `nft -j list ruleset` output; `None` when neither is there.
pub fn parse_observed(v: &serde_json::Value) -> Option<Observed> {
    parse_tables(v, &["inet", "bridge"])
}

/// Stratus's tables of the given families in `nft -j list ruleset` output.
fn parse_tables(v: &serde_json::Value, families: &[&str]) -> Option<Observed> {
    let ours = |o: &serde_json::Value| {
        let family = o.get("family")?.as_str()?;
        let table = o.get("table").or_else(|| o.get("name"))?.as_str()?;
        (table == TABLE && families.contains(&family)).then_some(family.to_owned())
    };
    let mut found = false;
    let mut o = Observed::default();
    for item in v.get("nftables")?.as_array()? {
        if let Some(t) = item.get("table") {
            found |= ours(t).is_some();
        } else if let Some(c) = item.get("chain") {
            if let (Some(f), Some(n)) = (ours(c), c.get("name").and_then(|n| n.as_str())) {
                o.chains.entry(format!("{f}/{n}")).or_default();
            }
        } else if let Some(r) = item.get("rule") {
            if let (Some(f), Some(n)) = (ours(r), r.get("chain").and_then(|n| n.as_str())) {
                let comment = r
                    .get("comment")
                    .and_then(|c| c.as_str())
                    .unwrap_or_default();
                o.chains
                    .entry(format!("{f}/{n}"))
                    .or_default()
                    .push(comment.to_owned());
            }
        } else if let Some(s) = item.get("set")
            && let (Some(f), Some(n)) = (ours(s), s.get("name").and_then(|n| n.as_str()))
        {
            let elems = match s.get("elem") {
                Some(serde_json::Value::Array(a)) => a
                    .iter()
                    .map(|e| {
                        e.as_str()
                            .map(str::to_owned)
                            .unwrap_or_else(|| e.to_string())
                    })
                    .collect(),
                _ => BTreeSet::new(),
            };
            o.sets.insert(format!("{f}/{n}"), elems);
        }
    }
    found.then_some(o)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::driver::conformance::sample_ruleset;

    /// The rules of `family/chain` of the rendered batch, each as its statements' JSON.
    fn rules(rs: &Ruleset, family: NfFamily, chain: &str) -> Vec<String> {
        rs.render()
            .expect("render")
            .objects
            .iter()
            .filter_map(|o| match o {
                NfObject::CmdObject(NfCmd::Add(NfListObject::Rule(r)))
                    if r.family == family && r.chain == chain =>
                {
                    Some(serde_json::to_string(&r.expr).expect("json"))
                }
                _ => None,
            })
            .collect()
    }

    fn with_all(rule: &str, parts: &[&str]) -> bool {
        parts.iter().all(|p| rule.contains(p))
    }

    /// The elements of the `bridge` table's set `name`, as the digest writes them.
    fn elements(rs: &Ruleset, name: &str) -> BTreeSet<String> {
        rs.observed().expect("observed").sets[&format!("bridge/{name}")].clone()
    }

    /// A concatenation of a device and a value, as [`elements`] gives it.
    /// Whether the base chain `chain` of the `bridge` table sends a filtered port's frames
    /// to `target` by one lookup of their device.
    fn jumps_for_ports(rs: &Ruleset, chain: &str, target: &str) -> bool {
        rules(rs, NfFamily::Bridge, chain).iter().any(|r| {
            with_all(
                r,
                &[
                    r#""right":"@port-dev""#,
                    &format!(r#"{{"jump":{{"target":"{target}"}}}}"#),
                ],
            )
        })
    }

    fn of_dev(dev: &str, v: &str) -> String {
        format!(r#"{{"concat":["{dev}","{v}"]}}"#)
    }

    #[test]
    fn a_digest_taken_from_the_one_before_is_the_digest_rendered() {
        let first = sample_ruleset();
        let d1 = first.observed().expect("observed");
        assert_eq!(first.observed_since(None).expect("digest"), d1);
        assert_eq!(
            first.observed_since(Some((&first, &d1))).expect("digest"),
            d1
        );
        // One port's rule changes, a member leaves, and the group is renamed: every chain
        // that names it is rendered again, as a full render gives.
        let mut second = first.clone();
        second.ports[0].ingress.remove(0);
        second.groups[0].members.remove(&Ipv4Addr::new(10, 0, 0, 3));
        let d2 = second.observed().expect("observed");
        assert_ne!(d1, d2);
        assert_eq!(
            second.observed_since(Some((&first, &d1))).expect("digest"),
            d2
        );
        let mut third = second.clone();
        third.groups[0].name = Name::new("g-other").expect("name");
        let d3 = third.observed().expect("observed");
        assert_eq!(
            third.observed_since(Some((&second, &d2))).expect("digest"),
            d3
        );
        // A stale digest is taken only for ports whose filter is unchanged.
        let mut bogus = d2.clone();
        bogus
            .chains
            .insert("inet/p-one-in".into(), vec!["stale".into()]);
        assert_eq!(
            second
                .observed_since(Some((&first, &bogus)))
                .expect("digest"),
            d2
        );
    }

    #[test]
    fn every_security_group_rule_matches_ipv4_only() {
        let rs = sample_ruleset();
        for chain in ["p-one-in", "p-one-out"] {
            let all = rules(&rs, NfFamily::INet, chain);
            let sg: Vec<&String> = all
                .iter()
                .filter(|r| !r.contains("\"sport\"") && !r.contains("\"drop\""))
                .collect();
            assert!(!sg.is_empty(), "{chain}");
            for r in sg {
                assert!(
                    r.contains(
                        r#"{"match":{"left":{"meta":{"key":"nfproto"}},"right":"ipv4","op":"=="}}"#
                    ),
                    "{chain}: {r}"
                );
            }
        }
    }

    #[test]
    fn a_port_takes_dhcp_replies_from_its_server_only_and_sends_none() {
        let mut rs = sample_ruleset();
        let inn = rules(&rs, NfFamily::INet, "p-one-in");
        let dhcp: Vec<&String> = inn.iter().filter(|r| r.contains("\"sport\"")).collect();
        assert_eq!(dhcp.len(), 1, "{inn:?}");
        assert!(with_all(dhcp[0], &["10.0.0.254", "67", "68", "return"]));
        rs.ports[0].dhcp_server = None;
        let inn = rules(&rs, NfFamily::INet, "p-one-in");
        assert!(!inn.iter().any(|r| r.contains("\"sport\"")), "{inn:?}");
        assert!(jumps_for_ports(&rs, "ports", "from-port"));
        let from_port = rules(&rs, NfFamily::Bridge, "from-port");
        assert!(
            from_port
                .iter()
                .any(|r| with_all(r, &[r#""field":"sport"}},"right":67,"op":"=="}"#, "drop"]))
        );
        assert!(elements(&rs, "port-dev").contains("ve-c1"));
    }

    #[test]
    fn a_port_passes_dhcp_requests_only_to_broadcast_or_its_server() {
        let mut rs = sample_ruleset();
        let out = rules(&rs, NfFamily::INet, "p-one-out");
        let dhcp: Vec<&String> = out.iter().filter(|r| r.contains("\"sport\"")).collect();
        assert_eq!(dhcp.len(), 2, "{out:?}");
        for (r, to) in dhcp.iter().zip(["255.255.255.255", "10.0.0.254"]) {
            assert!(with_all(r, &["daddr", to, "68", "67", "return"]), "{r}");
        }
        assert!(!dhcp.iter().any(|r| r.contains(r#""set""#)), "{dhcp:?}");
        rs.ports[0].dhcp_server = None;
        let out = rules(&rs, NfFamily::INet, "p-one-out");
        let dhcp: Vec<&String> = out.iter().filter(|r| r.contains("\"sport\"")).collect();
        assert_eq!(dhcp.len(), 1, "{out:?}");
        assert!(with_all(dhcp[0], &["daddr", "255.255.255.255", "return"]));
        assert!(!dhcp[0].contains("10.0.0.254"), "{}", dhcp[0]);
    }

    #[test]
    fn a_filtered_port_sends_ipv4_and_arp_only() {
        let rs = sample_ruleset();
        assert!(jumps_for_ports(&rs, "ports", "from-port"));
        let from_port = rules(&rs, NfFamily::Bridge, "from-port");
        let only = r#"[{"match":{"left":{"payload":{"protocol":"ether","field":"type"}},"right":"ip","op":"!="}},{"match":{"left":{"payload":{"protocol":"ether","field":"type"}},"right":"arp","op":"!="}},{"drop":null}]"#;
        assert!(from_port.iter().any(|r| r == only), "{from_port:?}");
        // What passes every check is accepted there, past the overlay's rules.
        assert_eq!(
            from_port.last().map(String::as_str),
            Some(r#"[{"accept":null}]"#)
        );
        assert!(elements(&rs, "port-dev").contains("ve-c1"));
        assert!(
            !from_port.iter().any(|r| r.contains(r#""ve-c2""#))
                && !elements(&rs, "port-dev").contains("ve-c2"),
            "no checks for a port without port security"
        );
        // A node without a filtered port has no such rule.
        let mut open = rs.clone();
        open.ports.retain(|p| !p.port_security);
        assert!(
            rules(&open, NfFamily::Bridge, "ports")
                .iter()
                .all(|r| !r.contains("@port-dev"))
        );
        assert!(rules(&open, NfFamily::Bridge, "from-port").is_empty());
    }

    #[test]
    fn ipv4_to_a_filtered_port_is_for_its_mac_or_a_reply_of_its_dhcp_server() {
        let rs = sample_ruleset();
        let to_ports = rules(&rs, NfFamily::Bridge, "to-ports");
        assert_eq!(to_ports.len(), 1, "{to_ports:?}");
        let to_other_mac = r#"{"match":{"left":{"concat":[{"meta":{"key":"oifname"}},{"payload":{"protocol":"ether","field":"daddr"}}]},"right":"@port-mac","op":"!="}}"#;
        assert!(with_all(
            &to_ports[0],
            &[
                r#""right":"@port-dev""#,
                r#""right":"ip""#,
                to_other_mac,
                r#"{"jump":{"target":"to-port-other"}}"#
            ]
        ));
        let out = rules(&rs, NfFamily::Bridge, "to-port-other");
        assert_eq!(out.len(), 2, "{out:?}");
        assert!(with_all(
            &out[0],
            &[
                r#"{"match":{"left":{"concat":[{"meta":{"key":"oifname"}},{"payload":{"protocol":"ip","field":"saddr"}}]},"right":"@port-dhcp","op":"=="}}"#,
                "accept"
            ]
        ));
        assert_eq!(out[1], r#"[{"drop":null}]"#);
        // The open port is in none of the sets.
        assert_eq!(
            elements(&rs, "port-mac"),
            BTreeSet::from([of_dev("ve-c1", "02:00:00:00:00:01")])
        );
        assert_eq!(
            elements(&rs, "port-dhcp"),
            BTreeSet::from([of_dev("ve-c1", "10.0.0.254")])
        );
    }

    /// The rules of the router table's `chain`, each as its statements' JSON.
    fn nat_rules(nat: &Nat, chain: &str) -> Vec<String> {
        nat.render()
            .expect("render")
            .objects
            .iter()
            .filter_map(|o| match o {
                NfObject::CmdObject(NfCmd::Add(NfListObject::Rule(r))) if r.chain == chain => {
                    Some(serde_json::to_string(&r.expr).expect("json"))
                }
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_router_forwards_in_from_its_gateway_only_floating_ips_and_replies() {
        let nat = crate::driver::conformance::sample_nat();
        let fwd = nat_rules(&nat, "forward");
        let from_gw = r#"{"match":{"left":{"meta":{"key":"iifname"}},"right":"qg-c","op":"=="}}"#;
        assert_eq!(fwd.len(), 3, "{fwd:?}");
        assert!(
            fwd.iter().all(|r| r.starts_with(&format!("[{from_gw}"))),
            "{fwd:?}"
        );
        assert!(with_all(
            &fwd[0],
            &[r#""right":["established","related"],"op":"in""#, "accept"]
        ));
        assert!(with_all(
            &fwd[1],
            &[
                r#"{"left":{"ct":{"key":"status"}},"right":"dnat","op":"in"}"#,
                "accept"
            ]
        ));
        assert!(with_all(
            &fwd[2],
            &[
                r#"{"left":{"meta":{"key":"oifname"}},"right":"qg-c","op":"!="}"#,
                "drop"
            ]
        ));
        // The chain is there, empty, without a gateway: nothing comes in from outside.
        let none = Nat {
            gateway: None,
            ..nat.clone()
        };
        assert!(nat_rules(&none, "forward").is_empty());
        assert!(
            none.observed()
                .expect("observed")
                .chains
                .contains_key("ip/forward")
        );
        // SNAT and floating addresses do not change the filter.
        let bare = Nat {
            floating: vec![],
            snat: vec![],
            ..nat
        };
        assert_eq!(nat_rules(&bare, "forward"), fwd);
    }

    #[test]
    fn the_overlays_packets_are_not_tracked_and_the_guests_are_in_their_zone() {
        let mut rs = sample_ruleset();
        let pre = rules(&rs, NfFamily::INet, "prerouting");
        let zones = rs.zones.len();
        assert!(zones > 0);
        // Each bridge's frames get their zone, by one lookup of the bridge, and leave the
        // chain before any notrack.
        assert!(with_all(
            &pre[0],
            &[
                r#""zone""#,
                r#"{"map":{"key":{"meta":{"key":"iifname"}}"#,
                "accept"
            ]
        ));
        for z in &rs.zones {
            let entry = format!(r#"["{}",{}]"#, z.bridge.as_str(), z.zone);
            assert!(pre[0].contains(&entry), "{entry} in {}", pre[0]);
        }
        assert!(!pre[0].contains("notrack"));
        let notrack = r#""right":4789,"op":"=="}},"notrack"]"#;
        assert_eq!(pre.len(), 2, "{pre:?}");
        assert!(pre[1].contains(notrack), "{pre:?}");
        let out = rules(&rs, NfFamily::INet, "output");
        assert_eq!(out.len(), 1);
        assert!(out[0].contains(notrack), "{out:?}");
        // What nft is given: the statement as an object.
        let json = String::from_utf8(to_json(&rs.render().expect("render")).expect("json"))
            .expect("utf-8");
        assert!(json.contains(r#"{"notrack":null}"#));
        assert!(!json.contains(r#""notrack"]"#));
        let v: serde_json::Value = serde_json::from_str(&json).expect("valid JSON");
        let batch = rs.render().expect("render");
        assert_eq!(
            v["nftables"].as_array().map(Vec::len),
            Some(batch.objects.len())
        );
        // No tunnel, nothing untracked: the batch as the crate writes it.
        rs.tunnels.clear();
        let batch = rs.render().expect("render");
        assert_eq!(
            to_json(&batch).expect("json"),
            serde_json::to_vec(&batch).expect("json")
        );
        assert!(rules(&rs, NfFamily::INet, "output").is_empty());
        assert!(
            !rules(&rs, NfFamily::INet, "prerouting")
                .iter()
                .any(|r| r.contains("notrack"))
        );
    }

    #[test]
    fn a_ports_addresses_are_elements_of_one_set_for_all_ports() {
        let mut rs = sample_ruleset();
        // The rules that drop what comes from addresses not the port's own.
        let spoof = |rs: &Ruleset| -> Vec<String> {
            rules(rs, NfFamily::Bridge, "from-port")
                .into_iter()
                .filter(|r| r.contains("drop") && r.contains("@port-ip"))
                .collect()
        };
        let one = spoof(&rs);
        assert_eq!(one.len(), 2, "{one:?}");
        assert!(one[0].contains(r#"{"protocol":"ip","field":"saddr"}"#));
        assert!(
            one[1].contains(r#"{"protocol":"arp","field":"saddr ip"}"#)
                && one[1].contains(r#""right":"0.0.0.0","op":"!="}"#),
            "{one:?}"
        );
        assert!(!one.iter().any(|r| r.contains(r#""set""#)), "{one:?}");
        let ip = rs.ports[0].ips.iter().next().copied().expect("an address");
        assert_eq!(
            elements(&rs, "port-ip"),
            BTreeSet::from([of_dev("ve-c1", &ip.to_string())])
        );
        rs.ports[0].ips.insert(Ipv4Addr::new(10, 0, 0, 99));
        assert_eq!(spoof(&rs), one, "the rules are the same");
        assert_eq!(
            elements(&rs, "port-ip"),
            BTreeSet::from([
                of_dev("ve-c1", &ip.to_string()),
                of_dev("ve-c1", "10.0.0.99")
            ])
        );
    }

    #[test]
    fn a_port_added_is_its_two_chains_the_forward_chain_and_set_elements() {
        let before = sample_ruleset();
        let mut after = before.clone();
        let mut new = after.ports[0].clone();
        new.id = Name::new("p-new").expect("id");
        new.device = IfName::new("ve-c3").expect("ifname");
        new.mac = "02:00:00:00:00:03".parse().expect("mac");
        new.ips = BTreeSet::from([Ipv4Addr::new(10, 0, 0, 4)]);
        after.ports.push(new);
        let d = Delta::between(
            &after.observed().expect("observed"),
            &before.observed().expect("observed"),
        );
        assert_eq!(
            d.chains,
            BTreeSet::from([
                "inet/forward".to_owned(),
                "inet/p-new-in".to_owned(),
                "inet/p-new-out".to_owned()
            ]),
            "{d:?}"
        );
        assert!(d.del_chains.is_empty() && d.new_sets.is_empty() && d.del_sets.is_empty());
        let added = |set: &str| d.elements[&format!("bridge/{set}")].0.clone();
        assert_eq!(added("port-dev"), BTreeSet::from(["ve-c3".to_owned()]));
        assert_eq!(
            added("port-mac"),
            BTreeSet::from([of_dev("ve-c3", "02:00:00:00:00:03")])
        );
        assert_eq!(
            added("port-ip"),
            BTreeSet::from([of_dev("ve-c3", "10.0.0.4")])
        );
        assert_eq!(
            added("port-dhcp"),
            BTreeSet::from([of_dev("ve-c3", "10.0.0.254")])
        );
        // The forward chain finds each port's chains through one verdict map a side.
        let fwd = rules(&after, NfFamily::INet, "forward");
        let maps: Vec<&String> = fwd.iter().filter(|r| r.contains("vmap")).collect();
        assert_eq!(maps.len(), 2, "{fwd:?}");
        for (map, (iface, mac, side)) in maps
            .iter()
            .zip([("iifname", "saddr", "out"), ("oifname", "daddr", "in")])
        {
            let targets = [
                format!(r#""target":"p-new-{side}""#),
                format!(r#""target":"p-one-{side}""#),
            ];
            assert!(
                with_all(map, &[iface, mac, &targets[0], &targets[1]]),
                "{map}"
            );
        }
        assert!(!fwd.iter().any(|r| r.contains("p-open")), "{fwd:?}");
        // The update batch writes those three chains and adds the elements, no more.
        let batch = after.render_update(&d).expect("render");
        let json = String::from_utf8(to_json(&batch).expect("json")).expect("utf-8");
        assert!(
            !json.contains(r#""name":"p-one-in""#) && !json.contains(r#""chain":"p-one-in""#),
            "{json}"
        );
        assert!(
            json.contains(r#"{"concat":["ve-c3","02:00:00:00:00:03"]}"#),
            "{json}"
        );
        // Taken away again: the elements go, named as the kernel lists them.
        let back = Delta::between(
            &before.observed().expect("observed"),
            &after.observed().expect("observed"),
        );
        let batch = before.render_update(&back).expect("render");
        let json = String::from_utf8(to_json(&batch).expect("json")).expect("utf-8");
        assert!(
            json.contains(r#"{"delete":{"element":{"family":"bridge","table":"stratus","name":"port-mac","elem":[{"concat":["ve-c3","02:00:00:00:00:03"]}]}}}"#),
            "{json}"
        );
    }

    #[test]
    fn vxlan_is_accepted_from_each_networks_peers_and_dropped_otherwise() {
        let mut rs = sample_ruleset();
        rs.tunnels.push(Tunnel {
            vni: 5002,
            port: 4789,
            peers: BTreeSet::new(),
        });
        let input = rules(&rs, NfFamily::INet, "input");
        assert_eq!(input.len(), 2, "{input:?}");
        // Port, VNI and source looked up together; a network without peers adds nothing.
        assert!(
            with_all(
                &input[0],
                &[
                    r#"{"concat":[{"payload":{"protocol":"udp","field":"dport"}},{"payload":{"base":"th","offset":96,"len":24}},{"payload":{"protocol":"ip","field":"saddr"}}]}"#,
                    r#""right":{"set":[{"concat":[4789,5001,"192.0.2.2"]}]}"#,
                    "accept"
                ]
            ),
            "{}",
            input[0]
        );
        assert!(with_all(&input[1], &[r#""right":4789"#, "drop"]));
        assert!(!input[1].contains("saddr"));
        rs.tunnels.clear();
        assert!(rules(&rs, NfFamily::INet, "input").is_empty());
        for vni in [0, 1 << 24] {
            rs.tunnels = vec![Tunnel {
                vni,
                port: 4789,
                peers: BTreeSet::new(),
            }];
            assert!(
                matches!(rs.render(), Err(FirewallError::Invalid(_))),
                "{vni}"
            );
        }
    }

    /// Every packet of every guest, and of the underlay, passes the zone, VXLAN and overlay
    /// DHCP checks: a node of many networks must not make each packet walk a rule per
    /// network (200 networks of linear rules cut a stream to 0.4 of a node of one).
    #[test]
    fn a_packet_passes_as_many_rules_on_a_node_of_two_hundred_networks_as_of_one() {
        let one = sample_ruleset();
        let mut many = one.clone();
        for n in 0..200u16 {
            many.zones.push(Zone {
                bridge: IfName::new(&format!("br-n{n}")).expect("name"),
                zone: 1000 + n,
            });
            many.tunnels.push(Tunnel {
                vni: 9000 + u32::from(n),
                port: 4789,
                peers: [Ipv4Addr::new(192, 0, 2, 10), Ipv4Addr::new(192, 0, 2, 11)].into(),
            });
            many.local_dhcp.push(LocalDhcp {
                vxlan: IfName::new(&format!("vx-n{n}")).expect("name"),
                server: Ipv4Addr::new(10, 1, (n % 250) as u8, 2),
            });
        }
        for (family, chain) in [
            (NfFamily::INet, "prerouting"),
            (NfFamily::INet, "input"),
            (NfFamily::INet, "output"),
            (NfFamily::Bridge, "ports"),
        ] {
            assert_eq!(
                rules(&many, family, chain).len(),
                rules(&one, family, chain).len(),
                "{chain}"
            );
        }
        // And what they look up holds every network.
        let ports = rules(&many, NfFamily::Bridge, "ports").join("\n");
        assert!(
            ports.contains(r#"{"concat":["vx-n199","10.1.199.2"]}"#),
            "{ports}"
        );
        let input = rules(&many, NfFamily::INet, "input").join("\n");
        assert!(input.contains(r#"{"concat":[4789,9199,"192.0.2.11"]}"#));
    }
}
