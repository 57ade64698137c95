//! An nftables allow-list of a node's own TCP servers: one `inet` table per served address
//! (so that several agents on one host each keep their own), whose input chain accepts the
//! named sources on each guarded port and drops every other connection made to it.
//!
//! # Guarantees
//! - The ruleset is one transaction that adds the table, deletes it and adds it again before
//!   filling it, so no rule of an earlier version survives, whatever the table held.
//! - Only connections made to a guarded port are dropped (`ct direction original`): the same
//!   port number can be the source port of one of this host's own outgoing connections,
//!   whose replies must pass.
//! - Every rule names the guarded address as well as the port: another agent of this host
//!   serving another address on the same port is not touched.

use std::borrow::Cow;
use std::net::{IpAddr, SocketAddr};

use nftables::expr::{CT, Expression, NamedExpression, Payload, PayloadField};
use nftables::schema::{Chain, NfCmd, NfListObject, NfObject, Nftables, Rule, Table};
use nftables::stmt::{Match, Operator, Statement};
use nftables::types::{NfChainPolicy, NfChainType, NfFamily, NfHook};

/// The chain's name in the table.
const CHAIN: &str = "input";

/// The input hook's priority: before the host's own filter tables (priority 0).
const PRIORITY: i32 = -10;

/// An allow-list table being built.
#[derive(Debug, Clone)]
pub struct AllowList {
    table: String,
    objects: Vec<NfObject<'static>>,
}

impl AllowList {
    /// The table `table`, emptied, with its input chain (policy accept) and no rule yet.
    pub fn new(table: &str) -> Self {
        let name = || Cow::Owned(table.to_owned());
        let t = || {
            NfListObject::Table(Table {
                family: NfFamily::INet,
                name: name(),
                handle: None,
            })
        };
        let chain = NfListObject::Chain(Chain {
            family: NfFamily::INet,
            table: name(),
            name: CHAIN.into(),
            _type: Some(NfChainType::Filter),
            hook: Some(NfHook::Input),
            prio: Some(PRIORITY),
            policy: Some(NfChainPolicy::Accept),
            ..Chain::default()
        });
        Self {
            table: table.to_owned(),
            objects: vec![
                NfObject::CmdObject(NfCmd::Add(t())),
                NfObject::CmdObject(NfCmd::Delete(t())),
                NfObject::CmdObject(NfCmd::Add(t())),
                NfObject::CmdObject(NfCmd::Add(chain)),
            ],
        }
    }

    /// Lets `sources`, and no other address, make connections to `to` (TCP): one accept rule
    /// per source, then one rule dropping the rest. `comment` goes on each of these rules.
    pub fn guard(
        &mut self,
        to: SocketAddr,
        sources: impl IntoIterator<Item = IpAddr>,
        comment: Option<&str>,
    ) -> &mut Self {
        let to_server = [
            eq(payload(family(to.ip()), "daddr"), address(to.ip())),
            eq(
                payload("tcp", "dport"),
                Expression::Number(u32::from(to.port())),
            ),
        ];
        let mut rules: Vec<Vec<Statement<'static>>> = sources
            .into_iter()
            .map(|s| {
                let mut r = to_server.to_vec();
                r.extend([
                    eq(payload(family(s), "saddr"), address(s)),
                    Statement::Accept(None),
                ]);
                r
            })
            .collect();
        let mut drop = vec![eq(
            Expression::Named(NamedExpression::CT(CT {
                key: "direction".into(),
                family: None,
                dir: None,
            })),
            Expression::String(Cow::Borrowed("original")),
        )];
        drop.extend(to_server);
        drop.push(Statement::Drop(None));
        rules.push(drop);
        for expr in rules {
            self.objects
                .push(NfObject::CmdObject(NfCmd::Add(NfListObject::Rule(Rule {
                    family: NfFamily::INet,
                    table: Cow::Owned(self.table.clone()),
                    chain: CHAIN.into(),
                    expr: Cow::Owned(expr),
                    handle: None,
                    index: None,
                    comment: comment.map(|c| Cow::Owned(c.to_owned())),
                }))));
        }
        self
    }

    /// The ruleset, for `nftables::helper::apply_ruleset`.
    pub fn ruleset(&self) -> Nftables<'static> {
        Nftables {
            objects: Cow::Owned(self.objects.clone()),
        }
    }
}

/// The command deleting table `table` (an agent that stops serving its address).
pub fn deletion(table: &str) -> Nftables<'static> {
    Nftables {
        objects: Cow::Owned(vec![NfObject::CmdObject(NfCmd::Delete(
            NfListObject::Table(Table {
                family: NfFamily::INet,
                name: Cow::Owned(table.to_owned()),
                handle: None,
            }),
        ))]),
    }
}

fn family(a: IpAddr) -> &'static str {
    if a.is_ipv4() { "ip" } else { "ip6" }
}

fn payload(protocol: &'static str, field: &'static str) -> Expression<'static> {
    Expression::Named(NamedExpression::Payload(Payload::PayloadField(
        PayloadField {
            protocol: protocol.into(),
            field: field.into(),
        },
    )))
}

fn address(a: IpAddr) -> Expression<'static> {
    Expression::String(Cow::Owned(a.to_string()))
}

fn eq(left: Expression<'static>, right: Expression<'static>) -> Statement<'static> {
    Statement::Match(Match {
        left,
        right,
        op: Operator::EQ,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(list: &AllowList) -> Vec<Rule<'static>> {
        list.ruleset()
            .objects
            .iter()
            .filter_map(|o| match o {
                NfObject::CmdObject(NfCmd::Add(NfListObject::Rule(r))) => Some(r.clone()),
                _ => None,
            })
            .collect()
    }

    fn field(protocol: &'static str, field: &'static str, value: &str) -> Statement<'static> {
        eq(
            payload(protocol, field),
            Expression::String(Cow::Owned(value.to_owned())),
        )
    }

    fn port(p: u32) -> Statement<'static> {
        eq(payload("tcp", "dport"), Expression::Number(p))
    }

    fn inbound() -> Statement<'static> {
        eq(
            Expression::Named(NamedExpression::CT(CT {
                key: "direction".into(),
                family: None,
                dir: None,
            })),
            Expression::String(Cow::Borrowed("original")),
        )
    }

    fn rule(expr: Vec<Statement<'static>>, comment: Option<&str>) -> Rule<'static> {
        Rule {
            family: NfFamily::INet,
            table: "t".into(),
            chain: "input".into(),
            expr: Cow::Owned(expr),
            handle: None,
            index: None,
            comment: comment.map(|c| Cow::Owned(c.to_owned())),
        }
    }

    #[test]
    fn the_table_is_emptied_before_its_chain_is_made() {
        let objects = AllowList::new("t").ruleset().objects.into_owned();
        let table = || {
            NfListObject::Table(Table {
                family: NfFamily::INet,
                name: "t".into(),
                handle: None,
            })
        };
        assert_eq!(
            objects,
            [
                NfObject::CmdObject(NfCmd::Add(table())),
                NfObject::CmdObject(NfCmd::Delete(table())),
                NfObject::CmdObject(NfCmd::Add(table())),
                NfObject::CmdObject(NfCmd::Add(NfListObject::Chain(Chain {
                    family: NfFamily::INet,
                    table: "t".into(),
                    name: "input".into(),
                    _type: Some(NfChainType::Filter),
                    hook: Some(NfHook::Input),
                    prio: Some(-10),
                    policy: Some(NfChainPolicy::Accept),
                    ..Chain::default()
                }))),
            ]
        );
    }

    #[test]
    fn each_source_is_accepted_and_other_connections_to_the_port_dropped() {
        let mut list = AllowList::new("t");
        let to: SocketAddr = "10.0.0.1:6200".parse().expect("an address");
        let sources: [IpAddr; 2] = [[10, 0, 0, 5].into(), [10, 0, 0, 6].into()];
        list.guard(to, sources, None);
        let to_server = || [field("ip", "daddr", "10.0.0.1"), port(6200)];
        let accept = |source: &str| {
            let mut e = to_server().to_vec();
            e.extend([field("ip", "saddr", source), Statement::Accept(None)]);
            rule(e, None)
        };
        let mut drop = vec![inbound()];
        drop.extend(to_server());
        drop.push(Statement::Drop(None));
        assert_eq!(
            rules(&list),
            [accept("10.0.0.5"), accept("10.0.0.6"), rule(drop, None)]
        );
    }

    #[test]
    fn guards_follow_each_other_with_their_families_and_comments() {
        let mut list = AllowList::new("t");
        list.guard(
            "[fd00::1]:10809".parse().expect("an address"),
            ["fd00::2".parse().expect("an address")],
            Some("volume-a"),
        )
        .guard(
            "10.0.0.1:873".parse().expect("an address"),
            [],
            Some("volume-b"),
        );
        let v6 = || [field("ip6", "daddr", "fd00::1"), port(10809)];
        let mut accept = v6().to_vec();
        accept.extend([field("ip6", "saddr", "fd00::2"), Statement::Accept(None)]);
        let mut drop6 = vec![inbound()];
        drop6.extend(v6());
        drop6.push(Statement::Drop(None));
        // No source: every connection made to the port is dropped.
        let drop4 = vec![
            inbound(),
            field("ip", "daddr", "10.0.0.1"),
            port(873),
            Statement::Drop(None),
        ];
        assert_eq!(
            rules(&list),
            [
                rule(accept, Some("volume-a")),
                rule(drop6, Some("volume-a")),
                rule(drop4, Some("volume-b")),
            ]
        );
    }

    #[test]
    fn a_deletion_names_the_inet_table() {
        assert_eq!(
            deletion("t").objects.into_owned(),
            [NfObject::CmdObject(NfCmd::Delete(NfListObject::Table(
                Table {
                    family: NfFamily::INet,
                    name: "t".into(),
                    handle: None,
                }
            )))]
        );
    }
}
