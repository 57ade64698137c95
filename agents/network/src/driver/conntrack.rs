//! Connection tracking state of a router's namespace: a floating address taken away (its
//! FloatingIP disassociated, moved to another port or deleted) keeps no established
//! connection to the guest it led to, as the translation was fixed when the connection began.
//! `conntrack -D` as an argument vector, in the router's namespace.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use super::netns;
use super::nft::{FloatingNat, Nat};
use super::{Name, Netns};

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
        let out = netns::command(ns, "conntrack")
            .args(["-D", flag, &ip])
            .output()
            .map_err(ConntrackError::Run)?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        // It exits 1 when nothing matched, saying so.
        if !out.status.success() && !stderr.contains(" 0 flow entries have been deleted") {
            return Err(ConntrackError::Failed {
                what: format!("-D {flag} {ip}"),
                stderr: stderr.trim().to_owned(),
            });
        }
    }
    Ok(())
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
    use super::*;
    use crate::driver::Links;
    use crate::driver::host_tests::{root, run_in, unique};
    use crate::driver::netlink::NetlinkLinks;

    struct Gone(Name);

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
    fn the_connections_of_a_floating_address_are_forgotten_and_no_other() {
        if !root() {
            return;
        }
        let ns = Name::new(&unique()).expect("name");
        NetlinkLinks::new().add_netns(&ns).expect("netns");
        let _gone = Gone(ns.clone());
        let insert = |args: &[&str]| {
            let mut all = vec!["conntrack", "-I", "-p", "udp", "--timeout", "300"];
            all.extend(args);
            let (ok, out) = run_in(&ns, &all);
            assert!(ok, "{out}");
        };
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
