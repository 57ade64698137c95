//! The node's Swift allow-list: an nftables table that lets only the rings' nodes and the
//! configured proxies reach the account, container and object servers and the rsync daemon,
//! which have no authentication of their own.

use std::borrow::Cow;
use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};

use nftables::expr::{CT, Expression, NamedExpression, Payload, PayloadField};
use nftables::schema::{Chain, NfCmd, NfListObject, NfObject, Nftables, Rule, Table};
use nftables::stmt::{Match, Operator, Statement};
use nftables::types::{NfChainPolicy, NfChainType, NfFamily, NfHook};
use stratus_api_types::object::ObjectRing;

use crate::config::{KINDS, NodeConfig, RSYNC_PORT};

/// `nft` refused the table, or could not be run.
#[derive(Debug, thiserror::Error)]
#[error("nft: {0}")]
pub struct FilterError(String);

/// The table of the node whose servers listen on `ip` (one per address, so that several
/// nodes on one host each keep their own).
pub fn table_name(ip: Ipv4Addr) -> String {
    format!("stratus_swift_{}", ip.to_string().replace('.', "_"))
}

/// Who may reach the servers: every device address of every ring (the nodes that replicate
/// to this one), the node itself and `proxies`.
pub fn peers(rings: &[ObjectRing], own: Ipv4Addr, proxies: &[Ipv4Addr]) -> BTreeSet<Ipv4Addr> {
    rings
        .iter()
        .flat_map(|r| r.spec.devices.iter())
        .filter_map(|d| d.ip.parse().ok())
        .chain([own])
        .chain(proxies.iter().copied())
        .collect()
}

/// The table: to `config.ip` on the servers' ports, `peers` are accepted and everything else
/// dropped. One transaction that makes it empty (add, delete, add) and fills it.
pub fn render(config: &NodeConfig, peers: &BTreeSet<Ipv4Addr>) -> Nftables<'static> {
    let name = table_name(config.ip);
    let table = || {
        NfListObject::Table(Table {
            family: NfFamily::INet,
            name: Cow::Owned(name.clone()),
            handle: None,
        })
    };
    let add = |o| NfObject::CmdObject(NfCmd::Add(o));
    let mut out = vec![
        add(table()),
        NfObject::CmdObject(NfCmd::Delete(table())),
        add(table()),
        add(NfListObject::Chain(Chain {
            family: NfFamily::INet,
            table: Cow::Owned(name.clone()),
            name: "input".into(),
            _type: Some(NfChainType::Filter),
            hook: Some(NfHook::Input),
            prio: Some(-10),
            policy: Some(NfChainPolicy::Accept),
            ..Chain::default()
        })),
    ];
    let payload = |protocol: &'static str, field: &'static str| {
        Expression::Named(NamedExpression::Payload(Payload::PayloadField(
            PayloadField {
                protocol: protocol.into(),
                field: field.into(),
            },
        )))
    };
    let eq = |left, right| {
        Statement::Match(Match {
            left,
            right,
            op: Operator::EQ,
        })
    };
    let address = |a: Ipv4Addr| Expression::String(Cow::Owned(a.to_string()));
    let ports = KINDS
        .into_iter()
        .map(|k| config.ports.of(k))
        .chain([RSYNC_PORT]);
    for port in ports {
        let to_server = [
            eq(payload("ip", "daddr"), address(config.ip)),
            eq(payload("tcp", "dport"), Expression::Number(u32::from(port))),
        ];
        let mut rules: Vec<Vec<Statement>> = peers
            .iter()
            .map(|p| {
                let mut r = to_server.to_vec();
                r.extend([
                    eq(payload("ip", "saddr"), address(*p)),
                    Statement::Accept(None),
                ]);
                r
            })
            .collect();
        // Only connections made to the servers are dropped: a server's port may also be the
        // source port of one of this host's own connections, whose replies must pass.
        let mut drop = vec![eq(
            Expression::Named(NamedExpression::CT(CT {
                key: "direction".into(),
                family: None,
                dir: None,
            })),
            Expression::String(Cow::Borrowed("original")),
        )];
        drop.extend(to_server.iter().cloned());
        drop.push(Statement::Drop(None));
        rules.push(drop);
        for expr in rules {
            out.push(add(NfListObject::Rule(Rule {
                family: NfFamily::INet,
                table: Cow::Owned(name.clone()),
                chain: "input".into(),
                expr: Cow::Owned(expr),
                handle: None,
                index: None,
                comment: None,
            })));
        }
    }
    Nftables {
        objects: Cow::Owned(out),
    }
}

/// Writes `table` with `nft`.
///
/// # Errors
/// `nft` cannot be run or refuses it.
pub fn apply(table: &Nftables<'_>) -> Result<(), FilterError> {
    nftables::helper::apply_ruleset(table).map_err(|e| FilterError(e.to_string()))
}

/// Takes the node's table away (the agent stops serving on `ip`).
///
/// # Errors
/// `nft` cannot be run or refuses it.
pub fn remove(ip: Ipv4Addr) -> Result<(), FilterError> {
    let out = Command::new("nft")
        .args(["delete", "table", "inet", &table_name(ip)])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| FilterError(format!("cannot start it: {e}")))?;
    if !out.status.success() {
        return Err(FilterError(
            String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_peers_reach_the_servers_ports_on_the_node_address() {
        let config = crate::config::tests::config();
        let peers: BTreeSet<Ipv4Addr> = [Ipv4Addr::new(10, 0, 0, 5)].into();
        let json = serde_json::to_value(render(&config, &peers)).expect("json");
        let rules: Vec<String> = json["nftables"]
            .as_array()
            .expect("objects")
            .iter()
            .filter_map(|o| o["add"].get("rule"))
            .map(|r| {
                r["expr"]
                    .as_array()
                    .expect("statements")
                    .iter()
                    .map(|s| match s.get("match") {
                        Some(m) => m["right"].to_string().replace('"', ""),
                        None => s
                            .as_object()
                            .and_then(|o| o.keys().next().cloned())
                            .unwrap_or_default(),
                    })
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .collect();
        assert_eq!(
            rules,
            [
                "127.0.0.2 6202 10.0.0.5 accept",
                "original 127.0.0.2 6202 drop",
                "127.0.0.2 6201 10.0.0.5 accept",
                "original 127.0.0.2 6201 drop",
                "127.0.0.2 6200 10.0.0.5 accept",
                "original 127.0.0.2 6200 drop",
                "127.0.0.2 873 10.0.0.5 accept",
                "original 127.0.0.2 873 drop",
            ]
        );
        assert_eq!(table_name(config.ip), "stratus_swift_127_0_0_2");
    }

    /// Whether a TCP connection from `from` to `to` is accepted within two seconds (a dropped
    /// SYN is not).
    async fn connects(from: Ipv4Addr, to: std::net::SocketAddrV4) -> bool {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket
            .bind(std::net::SocketAddrV4::new(from, 0).into())
            .expect("bind");
        let connect = socket.connect(to.into());
        matches!(
            tokio::time::timeout(std::time::Duration::from_secs(2), connect).await,
            Ok(Ok(_))
        )
    }

    /// Host test (root, nft): a source the table does not name is dropped, a peer is not.
    #[tokio::test]
    async fn the_table_drops_a_source_that_is_no_peer() {
        let listener = std::net::TcpListener::bind("127.0.79.1:0").expect("listen");
        let port = listener.local_addr().expect("address").port();
        let mut config = crate::config::tests::config();
        config.ip = Ipv4Addr::new(127, 0, 79, 1);
        config.ports.object = port;
        // A connection of this host from the node's address whose source port is also a
        // server's port: the replies to it are no connection made to the server.
        let elsewhere = std::net::TcpListener::bind("127.0.79.4:0").expect("listen");
        let client = tokio::net::TcpSocket::new_v4().expect("socket");
        client
            .bind(std::net::SocketAddrV4::new(config.ip, 0).into())
            .expect("bind");
        config.ports.account = client.local_addr().expect("address").port();
        let peer = Ipv4Addr::new(127, 0, 79, 2);
        apply(&render(&config, &[peer].into())).expect("apply");
        let to = std::net::SocketAddrV4::new(config.ip, port);
        let stranger = connects(Ipv4Addr::new(127, 0, 79, 3), to).await;
        let from_peer = connects(peer, to).await;
        let own = tokio::time::timeout(
            std::time::Duration::from_secs(2),
            client.connect(elsewhere.local_addr().expect("address")),
        )
        .await;
        remove(config.ip).expect("remove");
        assert!(
            !stranger,
            "a source that is no peer reached the object server's port"
        );
        assert!(from_peer, "the peer was refused");
        assert!(
            matches!(own, Ok(Ok(_))),
            "a reply to the node's own connection was dropped"
        );
        // Without the table the stranger gets through: it was the table that dropped it.
        assert!(connects(Ipv4Addr::new(127, 0, 79, 3), to).await);
    }
}
