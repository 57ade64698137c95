//! The suites every implementation of a network driver trait passes, so that a fake used in
//! a test behaves as the kernel and dnsmasq do: [`links`] for [`Links`], [`firewall`] for
//! [`Firewall`] and [`dhcp`] for [`Dhcp`] (each run against the fakes and, as root, against
//! the real implementations in namespaces the test makes). They panic on the first
//! guarantee broken.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use super::nft::{
    Delta, FloatingNat, GroupRef, LocalDhcp, PortFilter, PortRange, Protocol, Remote, RemoteGroup,
    Rule, Snat, Tunnel, Update, Zone,
};
use super::{
    Attach, Dhcp, DhcpError, DhcpSpec, FdbEntry, Firewall, FirewallError, IfName, Ipv4Cidr,
    LinkError, LinkKind, Links, MacAddr, Name, Nat, Netns, RouteSpec, Ruleset, StaticLease,
    VXLAN_PORT, VethSpec, VlanSpec, VxlanInfo, VxlanSpec,
};

fn ifname(s: &str) -> IfName {
    IfName::new(s).expect("interface name")
}

fn mac(s: &str) -> MacAddr {
    s.parse().expect("mac")
}

/// Checks every guarantee of [`Links`] in two namespaces it makes and deletes,
/// `<prefix>-a` and `<prefix>-b` (`prefix` names nothing else on the host).
pub fn links(l: &dyn Links, prefix: &str) {
    let a = Name::new(&format!("{prefix}-a")).expect("netns name");
    let b = Name::new(&format!("{prefix}-b")).expect("netns name");
    let (na, nb) = (Netns::Named(a.clone()), Netns::Named(b.clone()));
    let (br, vx, ve, vp) = (
        ifname("br-c"),
        ifname("vx-c"),
        ifname("ve-c"),
        ifname("vp-c"),
    );
    let missing = ifname("absent-c");

    // No namespace yet: every verb says so, but deleting it has nothing to do.
    assert!(matches!(l.links(&na), Err(LinkError::NoNetns(ref n)) if *n == na));
    assert!(matches!(l.add_bridge(&na, &br), Err(LinkError::NoNetns(_))));
    l.del_netns(&a).expect("delete of an absent namespace");
    for n in [&a, &b] {
        l.add_netns(n).expect("add netns");
        l.add_netns(n).expect("add of a present netns");
    }
    let present = l.list_netns().expect("list netns");
    assert!(present.contains(&a) && present.contains(&b));

    // A bridge: made once, down.
    l.add_bridge(&na, &br).expect("add bridge");
    l.add_bridge(&na, &br).expect("add of a present bridge");
    let got = l.link(&na, &br).expect("link").expect("bridge present");
    assert_eq!(
        (got.kind.clone(), got.up, got.master.clone()),
        (LinkKind::Bridge, false, None)
    );

    // A VXLAN device: made once; the same name with another identity is a conflict.
    let spec = VxlanSpec {
        name: vx.clone(),
        vni: 4242,
        local: Ipv4Addr::new(192, 0, 2, 1),
        port: VXLAN_PORT,
    };
    l.add_vxlan(&na, &spec).expect("add vxlan");
    l.add_vxlan(&na, &spec)
        .expect("add of a present, identical vxlan");
    let got = l.link(&na, &vx).expect("link").expect("vxlan present");
    assert_eq!(
        got.kind,
        LinkKind::Vxlan(VxlanInfo {
            vni: 4242,
            local: Some(Ipv4Addr::new(192, 0, 2, 1)),
            port: VXLAN_PORT,
            learning: false,
        })
    );
    let other_vni = VxlanSpec {
        vni: 4243,
        ..spec.clone()
    };
    assert!(matches!(
        l.add_vxlan(&na, &other_vni),
        Err(LinkError::Conflict { .. })
    ));
    let other_local = VxlanSpec {
        local: Ipv4Addr::new(192, 0, 2, 9),
        ..spec.clone()
    };
    assert!(matches!(
        l.add_vxlan(&na, &other_local),
        Err(LinkError::Conflict { .. })
    ));
    assert!(matches!(
        l.add_bridge(&na, &vx),
        Err(LinkError::Conflict { .. })
    ));
    let on_bridge = VxlanSpec {
        name: br.clone(),
        ..spec.clone()
    };
    assert!(matches!(
        l.add_vxlan(&na, &on_bridge),
        Err(LinkError::Conflict { .. })
    ));
    assert!(matches!(
        l.add_vxlan(
            &na,
            &VxlanSpec {
                name: ifname("vx-bad"),
                vni: 1 << 24,
                ..spec.clone()
            }
        ),
        Err(LinkError::Invalid(_))
    ));
    assert_eq!(l.link(&na, &ifname("vx-bad")).expect("link"), None);
    assert_eq!(
        l.link(&na, &vx).expect("link").map(|k| k.kind),
        Some(got.kind.clone()),
        "a refused create leaves the device alone"
    );

    // Master, up, MTU: set, set again, read back.
    l.set_master(&na, &vx, Some(&br)).expect("set master");
    l.set_master(&na, &vx, Some(&br))
        .expect("set the same master");
    assert_eq!(
        l.link(&na, &vx).expect("link").and_then(|k| k.master),
        Some(br.clone())
    );
    l.set_master(&na, &vx, None).expect("no master");
    assert_eq!(l.link(&na, &vx).expect("link").and_then(|k| k.master), None);
    l.set_master(&na, &vx, Some(&br)).expect("set master again");
    assert!(matches!(
        l.set_master(&na, &vx, Some(&missing)),
        Err(LinkError::NoLink { .. })
    ));
    l.set_mtu(&na, &vx, 1400).expect("set mtu");
    l.set_mtu(&na, &vx, 1400).expect("set the same mtu");
    assert_eq!(l.link(&na, &vx).expect("link").map(|k| k.mtu), Some(1400));
    assert!(matches!(l.set_mtu(&na, &vx, 0), Err(LinkError::Invalid(_))));
    l.set_up(&na, &br, true).expect("up");
    l.set_up(&na, &br, true).expect("up again");
    assert_eq!(l.link(&na, &br).expect("link").map(|k| k.up), Some(true));
    l.set_up(&na, &br, false).expect("down");
    assert_eq!(l.link(&na, &br).expect("link").map(|k| k.up), Some(false));

    // A veth pair across namespaces.
    let veth = VethSpec {
        name: ve.clone(),
        peer: vp.clone(),
        peer_netns: Some(nb.clone()),
    };
    l.add_veth(&na, &veth).expect("add veth");
    l.add_veth(&na, &veth).expect("add of a present veth");
    assert_eq!(
        l.link(&na, &ve).expect("link").map(|k| k.kind),
        Some(LinkKind::Veth)
    );
    assert_eq!(
        l.link(&nb, &vp).expect("link").map(|k| k.kind),
        Some(LinkKind::Veth)
    );
    assert_eq!(l.link(&na, &vp).expect("link"), None, "the peer moved");
    assert!(matches!(
        l.add_bridge(&na, &ve),
        Err(LinkError::Conflict { .. })
    ));
    let lo = l
        .link(&na, &ifname("lo"))
        .expect("link")
        .expect("a new namespace has its loopback");
    assert_eq!(lo.kind, LinkKind::Other(None));
    let names: BTreeSet<IfName> = l
        .links(&na)
        .expect("links")
        .into_iter()
        .map(|k| k.name)
        .collect();
    assert!(names.contains(&br) && names.contains(&vx) && names.contains(&ve));
    l.set_master(&na, &ve, Some(&br))
        .expect("veth on the bridge");

    // Addresses.
    let addr: Ipv4Cidr = "10.77.0.1/24".parse().expect("cidr");
    l.add_address(&nb, &vp, addr).expect("add address");
    l.add_address(&nb, &vp, addr)
        .expect("add of a present address");
    assert_eq!(
        l.addresses(&nb, &vp).expect("addresses"),
        BTreeSet::from([addr])
    );
    l.del_address(&nb, &vp, addr).expect("delete address");
    l.del_address(&nb, &vp, addr)
        .expect("delete of an absent address");
    assert_eq!(l.addresses(&nb, &vp).expect("addresses"), BTreeSet::new());

    // A MAC, routes through a gateway on a connected prefix, forwarding.
    let m = mac("02:00:00:00:aa:01");
    l.set_mac(&nb, &vp, m).expect("set mac");
    l.set_mac(&nb, &vp, m).expect("set the same mac");
    assert_eq!(l.link(&nb, &vp).expect("link").and_then(|k| k.mac), Some(m));
    l.set_up(&na, &ve, true).expect("up");
    l.set_up(&nb, &vp, true).expect("up");
    l.add_address(&nb, &vp, addr).expect("add address");
    let cidr = |s: &str| s.parse::<Ipv4Cidr>().expect("cidr");
    let gw = Ipv4Addr::new(10, 77, 0, 254);
    let default = RouteSpec::new(cidr("0.0.0.0/0"), gw);
    let other = RouteSpec::new(cidr("10.88.1.0/16"), gw);
    assert_eq!(other.destination, cidr("10.88.0.0/16"), "host bits cleared");
    assert_eq!(l.routes(&nb).expect("routes"), BTreeSet::new());
    l.add_route(&nb, &default).expect("add route");
    l.add_route(&nb, &default).expect("add of a present route");
    l.add_route(&nb, &other).expect("add route");
    assert_eq!(
        l.routes(&nb).expect("routes"),
        BTreeSet::from([default, other])
    );
    let unreachable = RouteSpec::new(cidr("10.99.0.0/16"), Ipv4Addr::new(192, 0, 2, 9));
    assert!(
        l.add_route(&nb, &unreachable).is_err(),
        "a gateway off-link"
    );
    l.del_route(&nb, &other).expect("delete route");
    l.del_route(&nb, &other).expect("delete of an absent route");
    assert_eq!(l.routes(&nb).expect("routes"), BTreeSet::from([default]));
    assert!(
        !l.forwarding(&nb).expect("forwarding"),
        "off in a new namespace"
    );
    l.set_forwarding(&nb, true).expect("forwarding on");
    assert!(l.forwarding(&nb).expect("forwarding"));
    l.set_forwarding(&nb, false).expect("forwarding off");
    assert!(!l.forwarding(&nb).expect("forwarding"));
    l.del_route(&nb, &default).expect("delete route");
    l.del_address(&nb, &vp, addr).expect("delete address");

    // FDB as a set: flood entries for two remotes plus per-MAC ones; then another set.
    let r1 = Ipv4Addr::new(192, 0, 2, 2);
    let r2 = Ipv4Addr::new(192, 0, 2, 3);
    let e = |m: MacAddr, remote| FdbEntry { mac: m, remote };
    let (m1, m2) = (mac("02:00:00:00:00:01"), mac("02:00:00:00:00:02"));
    assert_eq!(l.fdb(&na, &vx).expect("fdb"), BTreeSet::new());
    let first = BTreeSet::from([e(MacAddr::ZERO, r1), e(MacAddr::ZERO, r2), e(m1, r1)]);
    l.set_fdb(&na, &vx, &first).expect("set fdb");
    assert_eq!(l.fdb(&na, &vx).expect("fdb"), first);
    l.set_fdb(&na, &vx, &first).expect("set the same fdb");
    assert_eq!(l.fdb(&na, &vx).expect("fdb"), first);
    let second = BTreeSet::from([e(MacAddr::ZERO, r1), e(m1, r2), e(m2, r2)]);
    l.set_fdb(&na, &vx, &second).expect("change fdb");
    assert_eq!(
        l.fdb(&na, &vx).expect("fdb"),
        second,
        "a moved MAC, a new one, a gone remote"
    );
    l.set_fdb(&na, &vx, &BTreeSet::new()).expect("empty fdb");
    assert_eq!(l.fdb(&na, &vx).expect("fdb"), BTreeSet::new());

    // Many links attached in one call: each up on the bridge with its MTU; the same again
    // changes nothing; an absent link or bridge is named.
    let pairs = [("ve-c2", "vp-c2"), ("ve-c3", "vp-c3")];
    for (name, peer) in pairs {
        let spec = VethSpec {
            name: ifname(name),
            peer: ifname(peer),
            peer_netns: Some(nb.clone()),
        };
        l.add_veth(&na, &spec).expect("add veth");
    }
    let attach = [
        Attach {
            name: ifname("ve-c2"),
            mtu: Some(1400),
            master: true,
            up: true,
        },
        Attach {
            name: ifname("ve-c3"),
            mtu: None,
            master: true,
            up: true,
        },
    ];
    l.set_up(&na, &br, true).expect("bridge up");
    for _ in 0..2 {
        l.attach(&na, &br, &attach).expect("attach");
        for a in &attach {
            let got = l.link(&na, &a.name).expect("link").expect("veth present");
            assert_eq!(
                (got.master, got.up),
                (Some(br.clone()), true),
                "{} attached",
                a.name
            );
        }
        assert_eq!(
            l.link(&na, &ifname("ve-c2")).expect("link").map(|k| k.mtu),
            Some(1400)
        );
    }
    let absent = Attach {
        name: missing.clone(),
        mtu: None,
        master: true,
        up: true,
    };
    assert!(matches!(
        l.attach(&na, &br, &[absent]),
        Err(LinkError::NoLink { ref name, .. }) if *name == missing
    ));
    assert!(matches!(
        l.attach(&na, &missing, &attach[1..]),
        Err(LinkError::NoLink { .. })
    ));
    for (name, _) in pairs {
        l.del_link(&na, &ifname(name)).expect("delete veth");
    }
    l.set_up(&na, &br, false).expect("bridge down");

    // Absent links.
    assert_eq!(l.link(&na, &missing).expect("link"), None);
    l.del_link(&na, &missing).expect("delete of an absent link");
    assert!(matches!(
        l.set_up(&na, &missing, true),
        Err(LinkError::NoLink { .. })
    ));
    assert!(matches!(
        l.set_mtu(&na, &missing, 1500),
        Err(LinkError::NoLink { .. })
    ));
    assert!(matches!(
        l.addresses(&na, &missing),
        Err(LinkError::NoLink { .. })
    ));
    assert!(matches!(
        l.add_address(&na, &missing, addr),
        Err(LinkError::NoLink { .. })
    ));
    assert!(matches!(
        l.fdb(&na, &missing),
        Err(LinkError::NoLink { .. })
    ));
    assert!(matches!(
        l.set_fdb(&na, &missing, &BTreeSet::new()),
        Err(LinkError::NoLink { .. })
    ));

    // Deleting one end of a veth deletes both; deleting a bridge frees its ports.
    l.del_link(&na, &ve).expect("delete veth");
    assert_eq!(
        l.link(&nb, &vp).expect("link"),
        None,
        "the peer went with it"
    );
    l.del_link(&na, &br).expect("delete bridge");
    assert_eq!(l.link(&na, &vx).expect("link").and_then(|k| k.master), None);
    l.del_link(&na, &br).expect("delete again");

    for n in [&a, &b] {
        l.del_netns(n).expect("delete netns");
        l.del_netns(n).expect("delete of an absent netns");
    }
    let present = l.list_netns().expect("list netns");
    assert!(!present.contains(&a) && !present.contains(&b));
}

/// A ruleset using every part of the model: two networks, two ports (one with port security
/// off), a remote group.
pub fn sample_ruleset() -> Ruleset {
    let port = |id: &str, dev: &str, m: &str, ip: [u8; 4]| PortFilter {
        id: Name::new(id).expect("id"),
        bridge: ifname("br-c1"),
        device: ifname(dev),
        mac: mac(m),
        ips: BTreeSet::from([Ipv4Addr::from(ip)]),
        dhcp_server: Some(Ipv4Addr::new(10, 0, 0, 254)),
        port_security: true,
        ingress: vec![
            Rule {
                protocol: Protocol::Icmp,
                ports: None,
                remote: Remote::Any,
            },
            Rule {
                protocol: Protocol::Tcp,
                ports: Some(PortRange {
                    first: 22,
                    last: 22,
                }),
                remote: Remote::Cidr("10.0.0.0/8".parse().expect("cidr")),
            },
            Rule {
                protocol: Protocol::Udp,
                ports: Some(PortRange {
                    first: 1000,
                    last: 2000,
                }),
                remote: Remote::Group(GroupRef(0)),
            },
        ],
        egress: vec![Rule {
            protocol: Protocol::Any,
            ports: None,
            remote: Remote::Any,
        }],
    };
    let mut open = port("p-open", "ve-c2", "02:00:00:00:00:02", [10, 0, 0, 3]);
    open.port_security = false;
    Ruleset {
        zones: vec![
            Zone {
                bridge: ifname("br-c1"),
                zone: 1,
            },
            Zone {
                bridge: ifname("br-c2"),
                zone: 2,
            },
        ],
        ports: vec![
            port("p-one", "ve-c1", "02:00:00:00:00:01", [10, 0, 0, 2]),
            open,
        ],
        groups: vec![RemoteGroup {
            name: Name::new("g-one").expect("name"),
            members: BTreeSet::from([Ipv4Addr::new(10, 0, 0, 2), Ipv4Addr::new(10, 0, 0, 3)]),
        }],
        local_dhcp: vec![LocalDhcp {
            vxlan: ifname("vx-c1"),
            server: Ipv4Addr::new(10, 0, 0, 254),
        }],
        tunnels: vec![Tunnel {
            vni: 5001,
            port: 4789,
            peers: BTreeSet::from([Ipv4Addr::new(192, 0, 2, 2)]),
        }],
    }
}

/// Checks every guarantee of [`Firewall`] (on a host, in a namespace nothing else filters
/// in).
pub fn firewall(f: &dyn Firewall) {
    f.clear().expect("clear of absent tables");
    assert_eq!(f.read().expect("read"), None);

    let first = sample_ruleset();
    f.apply(&first).expect("apply");
    let want = first.observed().expect("observed");
    assert_eq!(f.read().expect("read"), Some(want.clone()));
    assert!(
        want.chains
            .values()
            .all(|rules| rules.iter().all(|r| !r.is_empty()))
    );
    f.apply(&first).expect("apply again");
    assert_eq!(f.read().expect("read"), Some(want.clone()));

    // A member leaves the group, a rule goes: only the set and one chain differ.
    let mut second = first.clone();
    second.groups[0].members.remove(&Ipv4Addr::new(10, 0, 0, 3));
    second.ports[0].ingress.remove(0);
    f.apply(&second).expect("apply a change");
    let want2 = second.observed().expect("observed");
    assert_ne!(want, want2);
    assert_eq!(f.read().expect("read"), Some(want2.clone()));

    // The same changes as an update of only what differs, on the tables as read.
    f.apply(&first).expect("apply");
    let update = |f: &dyn Firewall, to: &Ruleset| {
        let have = f.read().expect("read").expect("tables");
        let want = to.observed().expect("observed");
        let delta = Delta::between(&want, &have);
        f.update(&Update {
            ruleset: to.clone(),
            want: want.clone(),
            delta: delta.clone(),
        })
        .expect("update");
        assert_eq!(f.read().expect("read"), Some(want), "after {delta:?}");
        delta
    };
    let d = update(f, &second);
    assert_eq!(
        d.chains,
        BTreeSet::from(["inet/p-one-in".to_owned()]),
        "{d:?}"
    );
    assert_eq!(d.elements.len(), 1, "{d:?}");
    assert!(d.del_chains.is_empty() && d.new_sets.is_empty() && d.del_sets.is_empty());
    // A port and its group go, a new port with a new group comes: chains and sets are
    // made and removed in the same transaction as the jumps to them.
    let mut third = second.clone();
    third.ports[0].id = Name::new("p-three").expect("id");
    third.groups[0].name = Name::new("g-three").expect("name");
    let d = update(f, &third);
    assert!(d.del_chains.contains("inet/p-one-in") && d.chains.contains("inet/p-three-in"));
    assert!(d.del_sets.contains("inet/g-one") && d.new_sets.contains("inet/g-three"));
    // And back.
    update(f, &second);
    assert_eq!(f.read().expect("read"), Some(want2.clone()));

    // Refused rulesets change nothing.
    let mut bad = second.clone();
    bad.ports[0].ingress[0].ports = Some(PortRange {
        first: 30,
        last: 20,
    });
    assert!(matches!(f.apply(&bad), Err(FirewallError::Invalid(_))));
    let mut bad = second.clone();
    bad.ports[0].ingress.push(Rule {
        protocol: Protocol::Icmp,
        ports: Some(PortRange { first: 1, last: 1 }),
        remote: Remote::Any,
    });
    assert!(matches!(f.apply(&bad), Err(FirewallError::Invalid(_))));
    let mut bad = second.clone();
    bad.ports[0].ingress[0].remote = Remote::Group(GroupRef(7));
    assert!(matches!(f.apply(&bad), Err(FirewallError::Invalid(_))));
    let mut bad = second.clone();
    bad.zones[1].zone = 1;
    assert!(matches!(f.apply(&bad), Err(FirewallError::Invalid(_))));
    assert_eq!(f.read().expect("read"), Some(want2));

    // An empty ruleset still leaves the tables, empty of ports.
    f.apply(&Ruleset::default()).expect("apply empty");
    assert!(f.read().expect("read").is_some());

    f.clear().expect("clear");
    assert_eq!(f.read().expect("read"), None);
    f.clear().expect("clear again");
}

/// A router's NAT with a gateway, two floating addresses and SNAT of two subnets.
pub fn sample_nat() -> Nat {
    let ip = |s: &str| s.parse::<Ipv4Addr>().expect("ip");
    Nat {
        gateway: Some(ifname("qg-c")),
        floating: vec![
            FloatingNat {
                floating: ip("203.0.113.10"),
                fixed: ip("10.0.0.5"),
            },
            FloatingNat {
                floating: ip("203.0.113.11"),
                fixed: ip("10.0.1.5"),
            },
        ],
        snat: vec![
            Snat {
                source: "10.0.0.0/24".parse().expect("cidr"),
                to: ip("203.0.113.2"),
            },
            Snat {
                source: "10.0.1.0/24".parse().expect("cidr"),
                to: ip("203.0.113.2"),
            },
        ],
    }
}

/// Checks the NAT guarantees of [`Firewall`] in a namespace `<prefix>-r` it makes with `l`
/// and deletes.
pub fn nat(f: &dyn Firewall, l: &dyn Links, prefix: &str) {
    let name = Name::new(&format!("{prefix}-r")).expect("netns name");
    l.add_netns(&name).expect("add netns");
    assert_eq!(f.read_nat(&name).expect("read"), None);
    let first = sample_nat();
    f.apply_nat(&name, &first).expect("apply");
    let want = first.observed().expect("observed");
    assert_eq!(f.read_nat(&name).expect("read"), Some(want.clone()));
    f.apply_nat(&name, &first).expect("apply again");
    assert_eq!(f.read_nat(&name).expect("read"), Some(want.clone()));

    // A floating address goes, SNAT is turned off: the table says so.
    let mut second = first.clone();
    second.floating.remove(1);
    second.snat.clear();
    f.apply_nat(&name, &second).expect("apply a change");
    let want2 = second.observed().expect("observed");
    assert_ne!(want, want2);
    assert_eq!(f.read_nat(&name).expect("read"), Some(want2.clone()));

    // One fixed address behind two floating ones is refused and changes nothing.
    let mut bad = first.clone();
    bad.floating[1].fixed = bad.floating[0].fixed;
    assert!(matches!(
        f.apply_nat(&name, &bad),
        Err(FirewallError::Invalid(_))
    ));
    assert_eq!(f.read_nat(&name).expect("read"), Some(want2));

    // Without a gateway the table holds no rule.
    f.apply_nat(&name, &Nat::default()).expect("apply empty");
    let empty = f.read_nat(&name).expect("read").expect("table");
    assert!(empty.chains.values().all(Vec::is_empty), "{empty:?}");
    l.del_netns(&name).expect("delete netns");
}

/// Checks every guarantee of [`Dhcp`] with `spec` (its interface exists and holds an address
/// in its subnet, which has room for hosts .10 to .12).
pub fn dhcp(d: &dyn Dhcp, spec: &DhcpSpec) {
    let name = &spec.name;
    d.remove(name).expect("remove of an absent server");
    assert_eq!(d.status(name).expect("status"), None);

    let host = |n: u8| Ipv4Addr::from(u32::from(spec.subnet.network()) + u32::from(n));
    let lease = |n: u8| StaticLease {
        mac: MacAddr([0x02, 0, 0, 0, 0, n]),
        ip: host(n),
        hostname: Some(Name::new(&format!("host-{n}")).expect("name")),
    };
    let first = DhcpSpec {
        leases: vec![lease(11), lease(10)],
        ..spec.clone()
    };
    d.ensure(&first).expect("ensure");
    let st = d.status(name).expect("status").expect("server");
    let pid = st.pid.expect("running");
    assert_eq!(st.leases, vec![lease(10), lease(11)]);
    assert!(d.list().expect("list").contains(name));

    d.ensure(&first).expect("ensure again");
    assert_eq!(
        d.status(name).expect("status").and_then(|s| s.pid),
        Some(pid),
        "left alone"
    );

    let second = DhcpSpec {
        leases: vec![lease(10), lease(12)],
        ..first.clone()
    };
    d.ensure(&second).expect("new leases");
    let st = d.status(name).expect("status").expect("server");
    assert_eq!(st.pid, Some(pid), "reloaded in place");
    assert_eq!(st.leases, vec![lease(10), lease(12)]);

    let third = DhcpSpec {
        lease_secs: second.lease_secs + 60,
        ..second.clone()
    };
    d.ensure(&third).expect("new configuration");
    let st = d.status(name).expect("status").expect("server");
    let restarted = st.pid.expect("running");
    assert_ne!(restarted, pid, "restarted");

    let bad = DhcpSpec {
        leases: vec![StaticLease {
            ip: Ipv4Addr::new(203, 0, 113, 1),
            ..lease(10)
        }],
        ..third.clone()
    };
    assert!(matches!(d.ensure(&bad), Err(DhcpError::Invalid(_))));
    let st = d.status(name).expect("status").expect("server");
    assert_eq!(
        (st.pid, st.leases),
        (Some(restarted), vec![lease(10), lease(12)])
    );

    d.remove(name).expect("remove");
    assert_eq!(d.status(name).expect("status"), None);
    assert!(!d.list().expect("list").contains(name));
    d.remove(name).expect("remove again");
}

/// Checks [`Links::add_vlan`] in a namespace it makes and deletes, `<prefix>-v`: a VLAN
/// sub-interface of a bridge standing in for the physical interface, made once, down, with
/// its ID; the same name with another ID, or of another kind, is a conflict; an ID out of
/// 1-4094 is invalid; an absent parent is named; deleting it leaves the parent.
pub fn vlans(l: &dyn Links, prefix: &str) {
    let n = Name::new(&format!("{prefix}-v")).expect("netns name");
    let ns = Netns::Named(n.clone());
    let (parent, vl) = (ifname("phys-c"), ifname("vl-c"));
    l.add_netns(&n).expect("add netns");
    l.add_bridge(&ns, &parent).expect("add parent");
    let spec = VlanSpec {
        name: vl.clone(),
        parent: parent.clone(),
        id: 100,
    };
    l.add_vlan(&ns, &spec).expect("add vlan");
    l.add_vlan(&ns, &spec)
        .expect("add of a present, identical vlan");
    let got = l.link(&ns, &vl).expect("link").expect("vlan present");
    assert_eq!((got.kind, got.up), (LinkKind::Vlan(100), false));
    let other = VlanSpec {
        id: 200,
        ..spec.clone()
    };
    assert!(matches!(
        l.add_vlan(&ns, &other),
        Err(LinkError::Conflict { .. })
    ));
    assert!(matches!(
        l.add_bridge(&ns, &vl),
        Err(LinkError::Conflict { .. })
    ));
    for id in [0, 4095] {
        let bad = VlanSpec {
            name: ifname("vl-bad"),
            id,
            ..spec.clone()
        };
        assert!(matches!(l.add_vlan(&ns, &bad), Err(LinkError::Invalid(_))));
    }
    let orphan = VlanSpec {
        name: ifname("vl-orphan"),
        parent: ifname("absent-c"),
        id: 100,
    };
    assert!(matches!(
        l.add_vlan(&ns, &orphan),
        Err(LinkError::NoLink { ref name, .. }) if name.as_str() == "absent-c"
    ));
    assert_eq!(l.link(&ns, &orphan.name).expect("link"), None);
    l.del_link(&ns, &vl).expect("delete vlan");
    assert_eq!(l.link(&ns, &vl).expect("link"), None);
    assert!(l.link(&ns, &parent).expect("link").is_some());
    l.del_netns(&n).expect("delete netns");
}

#[cfg(test)]
mod tests {
    use super::super::fake::{FakeDhcp, FakeFirewall, FakeLinks};
    use super::*;

    #[test]
    fn fake_links_pass() {
        links(&FakeLinks::new(), "conformance");
    }

    #[test]
    fn fake_vlans_pass() {
        vlans(&FakeLinks::new(), "conformance");
    }

    #[test]
    fn fake_nat_passes() {
        nat(&FakeFirewall::new(), &FakeLinks::new(), "fake");
    }

    #[test]
    fn fake_firewall_passes() {
        firewall(&FakeFirewall::new());
    }

    #[test]
    fn fake_dhcp_passes() {
        dhcp(
            &FakeDhcp::new(),
            &DhcpSpec {
                name: Name::new("net-c").expect("name"),
                netns: Netns::Host,
                interface: ifname("eth0"),
                subnet: "10.0.0.0/24".parse().expect("cidr"),
                router: Some(Ipv4Addr::new(10, 0, 0, 1)),
                lease_secs: 600,
                routes: Vec::new(),
                leases: vec![],
            },
        );
    }

    #[test]
    fn fakes_fail_on_demand() {
        let l = FakeLinks::new();
        l.failures.set("add_bridge", 1);
        assert!(matches!(
            l.add_bridge(&Netns::Host, &ifname("br-x")),
            Err(LinkError::Injected("add_bridge"))
        ));
        assert_eq!(l.failures.left("add_bridge"), 0);
        l.add_bridge(&Netns::Host, &ifname("br-x"))
            .expect("second try");
        let f = FakeFirewall::new();
        f.failures.set("apply", 2);
        assert!(f.apply(&Ruleset::default()).is_err());
        assert!(f.apply(&Ruleset::default()).is_err());
        f.apply(&Ruleset::default()).expect("third try");
        let d = FakeDhcp::new();
        d.failures.set("status", 1);
        assert!(d.status(&Name::new("n").expect("name")).is_err());
    }
}
