//! Connection tracking state of a router's namespace: a floating address taken away (its
//! FloatingIP disassociated, moved to another port or deleted) keeps no established
//! connection to the guest it led to, as the translation was fixed when the connection began.
//! `conntrack -D` as an argument vector, in the router's namespace. What a router translated
//! is read back from its NAT table when the agent starts ([`translated`]), so that an address
//! taken away while the agent was down is forgotten too.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::process::Command;

use super::netns;
use super::nft::{FloatingNat, Nat, TABLE};
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
        let mut cmd = Command::new("conntrack");
        cmd.args(["-D", flag, &ip]);
        let out = netns::output(ns, cmd).map_err(ConntrackError::Run)?;
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
    use crate::driver::Firewall;
    use crate::driver::Links;
    use crate::driver::host_tests::{root, run_in, unique};
    use crate::driver::netlink::NetlinkLinks;
    use crate::driver::nft::NftFirewall;

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
    fn what_a_router_translates_is_read_back_from_its_table() {
        if !root() {
            return;
        }
        let ns = Name::new(&unique()).expect("name");
        let absent = Name::new(&unique()).expect("name");
        NetlinkLinks::new().add_netns(&ns).expect("netns");
        let _gone = Gone(ns.clone());
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
