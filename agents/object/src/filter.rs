//! The node's Swift allow-list: an nftables table that lets only the rings' nodes and the
//! configured proxies reach the account, container and object servers and the rsync daemon,
//! which have no authentication of their own.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use nftables::schema::Nftables;
use stratus_api_types::object::ObjectRing;
use stratus_runtime::allowlist::{self, AllowList};

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
/// dropped.
pub fn render(config: &NodeConfig, peers: &BTreeSet<Ipv4Addr>) -> Nftables<'static> {
    let mut table = AllowList::new(&table_name(config.ip));
    let ports = KINDS
        .into_iter()
        .map(|k| config.ports.of(k))
        .chain([RSYNC_PORT]);
    for port in ports {
        let to = SocketAddr::from((config.ip, port));
        table.guard(to, peers.iter().map(|p| IpAddr::V4(*p)), None);
    }
    table.ruleset()
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
    apply(&allowlist::deletion(&table_name(ip)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_peers_reach_the_servers_ports_on_the_node_address() {
        let config = crate::config::tests::config();
        let peer = Ipv4Addr::new(10, 0, 0, 5);
        let mut want = AllowList::new("stratus_swift_127_0_0_2");
        // The account, container and object servers, then rsync.
        for port in [6202, 6201, 6200, 873] {
            want.guard(SocketAddr::from((config.ip, port)), [peer.into()], None);
        }
        assert_eq!(render(&config, &[peer].into()), want.ruleset());
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
