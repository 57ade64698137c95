//! How a Server's `spec.networks` entries name their Ports, and how a Port's host device is
//! named: one rule shared by the ports controller (which creates and places the Ports) and the
//! compute agent (which plugs them into the guest).

use crate::compute::{Server, ServerNetwork};

/// The longest object name (a DNS subdomain).
pub const NAME_MAX: usize = 253;

/// The kernel's limit on interface names (IFNAMSIZ less the terminating NUL).
pub const IFNAME_MAX: usize = 15;

/// The prefix of a port's tap device name.
pub const TAP_PREFIX: &str = "tap";

/// The Port created for entry `index` of server `server`'s `spec.networks`:
/// `<server>-<index>`, the server's name cut short (and its cut end trimmed of `-` and `.`)
/// when the whole would pass [`NAME_MAX`].
pub fn created_port_name(server: &str, index: usize) -> String {
    let suffix = format!("-{index}");
    let room = NAME_MAX - suffix.len();
    let mut base = server;
    if base.len() > room {
        // Object names are ASCII, so any byte offset is a char boundary; be safe anyway.
        let mut cut = room;
        while !base.is_char_boundary(cut) {
            cut -= 1;
        }
        base = base[..cut].trim_end_matches(['-', '.']);
    }
    format!("{base}{suffix}")
}

/// The annotation on a Port that a Server claimed: `SERVER/UID`, the Server's name and uid.
/// Written by the API server alone, in the transaction of the Server's write that names the
/// Port (or of the Port's create, for a Port a Server named before it existed), so two Servers
/// never both hold one Port, and a Port made anew under an old name carries no claim. A claim
/// whose Server is gone, is another of the same name, or no longer names the Port holds nothing.
pub const CLAIMED_BY: &str = "network.stratus.dev/claimed-by";

/// The Server name and uid of a [`CLAIMED_BY`] value.
pub fn parse_claim(value: &str) -> Option<(&str, &str)> {
    value
        .split_once('/')
        .filter(|(name, uid)| !name.is_empty() && !uid.is_empty())
}

/// The [`CLAIMED_BY`] value naming Server `name` of uid `uid`.
pub fn claim_value(name: &str, uid: &str) -> String {
    format!("{name}/{uid}")
}

/// The Port entry `index` of a server's `spec.networks` uses: the one it names (`port`), or
/// the one created for it ([`created_port_name`]).
pub fn entry_port_name(server: &str, index: usize, entry: &ServerNetwork) -> String {
    match &entry.port {
        Some(p) => p.clone(),
        None => created_port_name(server, index),
    }
}

/// The Ports of `server`, in guest order (one per `spec.networks` entry).
pub fn server_port_names(server: &Server) -> Vec<String> {
    let name = server.metadata.name.as_deref().unwrap_or_default();
    server
        .spec
        .networks
        .iter()
        .enumerate()
        .map(|(i, e)| entry_port_name(name, i, e))
        .collect()
}

/// The tap device of the Port with uid `uid`: `tap` and the first 11 hex digits of the uid
/// (14 bytes, within [`IFNAME_MAX`]), so it is known as soon as the Port exists and is the same
/// on every node it is ever placed on.
pub fn tap_name(uid: &str) -> String {
    let hex: String = uid
        .chars()
        .filter(char::is_ascii_hexdigit)
        .map(|c| c.to_ascii_lowercase())
        .take(IFNAME_MAX - TAP_PREFIX.len() - 1)
        .collect();
    format!("{TAP_PREFIX}{hex}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_ports_are_named_after_their_server_and_entry() {
        assert_eq!(created_port_name("web", 0), "web-0");
        assert_eq!(created_port_name("web-1", 12), "web-1-12");
        let long = format!("{}.{}", "a".repeat(200), "b".repeat(52));
        let n = created_port_name(&long, 3);
        assert!(n.len() <= NAME_MAX, "{}", n.len());
        assert!(n.ends_with("b-3"));
        // A cut that ends in a separator is trimmed, so the name stays a DNS subdomain.
        let dotted = format!("{}.{}", "a".repeat(250), "b".repeat(2));
        assert_eq!(
            created_port_name(&dotted, 0),
            format!("{}-0", "a".repeat(250))
        );
    }

    #[test]
    fn an_entry_naming_a_port_uses_it() {
        let e = ServerNetwork {
            network: None,
            port: Some("mine".into()),
            fixed_ip: None,
            subnet: None,
        };
        assert_eq!(entry_port_name("web", 0, &e), "mine");
        let e = ServerNetwork {
            network: Some("private".into()),
            port: None,
            fixed_ip: None,
            subnet: None,
        };
        assert_eq!(entry_port_name("web", 2, &e), "web-2");
    }

    #[test]
    fn a_claim_names_its_server_and_uid() {
        let v = claim_value("web", "0f9e2c1a-77b3");
        assert_eq!(parse_claim(&v), Some(("web", "0f9e2c1a-77b3")));
        assert_eq!(parse_claim("web"), None);
        assert_eq!(parse_claim("/uid"), None);
        assert_eq!(parse_claim("web/"), None);
    }

    #[test]
    fn tap_names_fit_the_kernel_and_follow_the_uid() {
        let t = tap_name("0f9E2c1a-77b3-4d2e-9a41-5e3c7d1b2a90");
        assert_eq!(t, "tap0f9e2c1a77b");
        assert!(t.len() <= IFNAME_MAX);
        assert_ne!(t, tap_name("1f9e2c1a-77b3-4d2e-9a41-5e3c7d1b2a90"));
        // Whatever a uid holds, only hex digits reach the name.
        assert_eq!(tap_name("x/;$(rm)-ab"), "tapab");
    }
}
