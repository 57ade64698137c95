//! The node's firewall on the Open vSwitch datapath: [`OvsFirewall`] writes each port's
//! anti-spoofing and security-group filter as OpenFlow flows with conntrack (`ct()`, one zone
//! per network, as Neutron's openvswitch firewall driver does) through [`OvsLinks`], where
//! they are part of the port's own flows (so a port is never on the bridge without its
//! filter), and keeps the nft part that still applies on such a node: the tunnel input filter
//! on the underlay and the routers' NAT, through [`NftFirewall`].
//!
//! Remote groups are one flow per member address in each rule that names the group, not
//! conjunctive flows (`conjunction(id, k/2)`), and this is a choice: a port's filter is one
//! object of the pipeline with one cookie, written or replaced whole in the converge's one
//! bundle, so a port is never seen with half a filter and a reconcile can tell exactly which
//! port's flows are stale. Conjunctive flows would share each group's member flows between
//! the ports of a network (one flow per member, not members × rules × ports), but then a
//! port's filter would be its own flows plus flows of other objects whose conjunction ids it
//! depends on, and every change to a group's use (a rule added to one port) would change
//! flows other ports rely on. What a membership change costs here is measured beside the
//! kernel's nft sets (`stratus-bench net-ovs-sg`); its flows are rewritten for the ports
//! whose rules name the group, atomically with everything else the converge changes.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::nft::{NftFirewall, Protocol, Remote, Rule};
use super::ovs::{FirewallState, OvsLinks};
use super::ovs_flows::{PortFilterSpec, Proto, RuleSpec};
use super::{Firewall, FirewallError, LinkError, Name, Nat, Observed, Ruleset, Update};

/// The node's filter on Open vSwitch ports, and nft for the rest.
pub struct OvsFirewall {
    nft: NftFirewall,
    links: Arc<OvsLinks>,
}

impl OvsFirewall {
    /// The firewall of the node whose switch `links` drives, `nft` holding its kernel part.
    pub fn new(nft: NftFirewall, links: Arc<OvsLinks>) -> Self {
        Self { nft, links }
    }
}

fn switch_err(e: LinkError) -> FirewallError {
    FirewallError::Io {
        what: "write the port filters to open vswitch".into(),
        source: std::io::Error::other(e.to_string()),
    }
}

fn rule(r: &Rule, groups: &[super::nft::RemoteGroup]) -> RuleSpec {
    RuleSpec {
        protocol: match r.protocol {
            Protocol::Any => Proto::Any,
            Protocol::Tcp => Proto::Tcp,
            Protocol::Udp => Proto::Udp,
            Protocol::Icmp => Proto::Icmp,
        },
        ports: r.ports.map(|p| (p.first, p.last)),
        remotes: match r.remote {
            Remote::Any => None,
            Remote::Cidr(c) => Some(vec![(c.network(), c.prefix())]),
            // A group that is not there allows no one (validate refuses it anyway).
            Remote::Group(g) => Some(
                groups
                    .get(g.0)
                    .map(|g| g.members.iter().map(|ip| (*ip, 32)).collect())
                    .unwrap_or_default(),
            ),
        },
    }
}

/// What of `ruleset` the switch enforces.
pub fn firewall_state(ruleset: &Ruleset) -> FirewallState {
    FirewallState {
        zones: ruleset
            .zones
            .iter()
            .map(|z| (z.bridge.to_string(), z.zone))
            .collect(),
        local_dhcp: ruleset
            .local_dhcp
            .iter()
            .map(|d| (d.vxlan.to_string(), d.server))
            .collect(),
        ports: ruleset
            .ports
            .iter()
            .filter(|p| p.port_security)
            .map(|p| {
                let spec = PortFilterSpec {
                    mac: p.mac.to_string(),
                    ips: p.ips.clone(),
                    dhcp_server: p.dhcp_server,
                    ingress: p.ingress.iter().map(|r| rule(r, &ruleset.groups)).collect(),
                    egress: p.egress.iter().map(|r| rule(r, &ruleset.groups)).collect(),
                };
                (p.device.to_string(), spec)
            })
            .collect::<BTreeMap<_, _>>(),
    }
}

impl Firewall for OvsFirewall {
    /// The switch's filters first, then nft: a failure between the two leaves nft's old
    /// tables, which read as a difference, so the next reconcile applies both again.
    fn apply(&self, ruleset: &Ruleset) -> Result<(), FirewallError> {
        ruleset.validate()?;
        self.links
            .set_firewall(Some(&firewall_state(ruleset)))
            .map_err(switch_err)?;
        self.nft.apply(ruleset)
    }

    fn update(&self, update: &Update) -> Result<(), FirewallError> {
        update.ruleset.validate()?;
        self.links
            .set_firewall(Some(&firewall_state(&update.ruleset)))
            .map_err(switch_err)?;
        self.nft.update(update)
    }

    /// nft's tables, when the switch holds a firewall too (else `None`, so that it is
    /// applied whole).
    fn read(&self) -> Result<Option<Observed>, FirewallError> {
        if self.links.firewall().map_err(switch_err)?.is_none() {
            return Ok(None);
        }
        self.nft.read()
    }

    fn clear(&self) -> Result<(), FirewallError> {
        self.links.set_firewall(None).map_err(switch_err)?;
        self.nft.clear()
    }

    fn apply_nat(&self, netns: &Name, nat: &Nat) -> Result<(), FirewallError> {
        self.nft.apply_nat(netns, nat)
    }

    fn read_nat(&self, netns: &Name) -> Result<Option<Observed>, FirewallError> {
        self.nft.read_nat(netns)
    }

    /// The switch's tracker holds the ports' connections (the kernel's sees none of them):
    /// [`OvsLinks::forget`].
    fn forget(&self, keep: &super::conntrack::Keep) -> Result<(), FirewallError> {
        self.links.forget(keep).map_err(switch_err)
    }
}
