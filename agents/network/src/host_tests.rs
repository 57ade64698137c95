//! The agent's converge on the real kernel, nft and dnsmasq, as root: two simulated nodes
//! (each a network namespace, joined by a veth underlay on 192.0.2.0/24) and two guests
//! (namespaces plugged into the nodes by veths named as their Ports' devices) on one
//! network (10.50.0.0/24). The ports get their addresses by DHCP and ping each other
//! across VXLAN; drift made by hand is repaired; a second converge changes nothing; another
//! project's network with the same CIDR on the same nodes stays apart; with the ports gone
//! nothing of Stratus's is left. Everything the test makes is removed when it
//! ends, even when it fails.

use std::net::Ipv4Addr;
use std::process::Command;
use std::sync::Arc;

use serde_json::json;
use stratus_api_types::common::Reason;

use crate::agent::tests::{group, hypervisor, network, port, subnet};
use crate::agent::{Host, PortState, converge};
use crate::desired::{NETWORK_UID, NodeConfig, PortKey, Snapshot};
use crate::driver::dnsmasq::Dnsmasq;
use crate::driver::host_tests::{lease, ping, pings, root, run_in, unique};
use crate::driver::netlink::NetlinkLinks;
use crate::driver::nft::NftFirewall;
use crate::driver::{Dhcp, IfName, LinkKind, Links, Name, Netns, Role, VethSpec};
use crate::plan::{is_derived, is_dhcp_name_of};

/// Removes, when dropped, each node's DHCP servers and namespaces, then the namespaces the
/// test made.
struct Cleanup {
    dhcp: Vec<(Dnsmasq, String)>,
    namespaces: Vec<Name>,
    _dirs: Vec<tempfile::TempDir>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let l = NetlinkLinks::new();
        for (d, node) in &self.dhcp {
            for name in d.list().unwrap_or_default() {
                if let Err(e) = d.remove(&name) {
                    eprintln!("cleanup: dhcp {name}: {e}");
                }
            }
            for ns in l.list_netns().unwrap_or_default() {
                if is_dhcp_name_of(node, &ns)
                    && let Err(e) = l.del_netns(&ns)
                {
                    eprintln!("cleanup: netns {ns}: {e}");
                }
            }
        }
        for n in &self.namespaces {
            if let Err(e) = l.del_netns(n) {
                eprintln!("cleanup: netns {n}: {e}");
            }
        }
    }
}

/// Nodes `a` and `b` with a DHCP server directory each (removed with the [`Cleanup`],
/// which also removes their servers and `namespaces`), and each node's [`Host`] of real
/// drivers.
fn two_hosts(a: &Name, b: &Name, namespaces: Vec<Name>) -> (Cleanup, Host, Host) {
    let (da, db) = (
        tempfile::tempdir().expect("dir"),
        tempfile::tempdir().expect("dir"),
    );
    let (dnsa, dnsb) = (
        Dnsmasq::new(da.path().join("dhcp")),
        Dnsmasq::new(db.path().join("dhcp")),
    );
    let host = |n: &Name, d: &Dnsmasq| Host {
        links: Arc::new(NetlinkLinks::new()),
        firewall: Arc::new(NftFirewall::new(Netns::Named(n.clone()))),
        dhcp: Arc::new(d.clone()),
    };
    let (ha, hb) = (host(a, &dnsa), host(b, &dnsb));
    let cleanup = Cleanup {
        dhcp: vec![(dnsa, a.to_string()), (dnsb, b.to_string())],
        namespaces,
        _dirs: vec![da, db],
    };
    (cleanup, ha, hb)
}

/// Waits for `f` to hold: up to 60 s, for a loaded machine (it holds within a second here).
fn wait(f: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !f() {
        assert!(std::time::Instant::now() < deadline, "timed out");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// `obj` as another object of the same name in project `ns` (its own uid).
pub(crate) fn in_project<K: kube::Resource + Clone>(obj: Arc<K>, ns: &str) -> Arc<K> {
    let mut o = (*obj).clone();
    let meta = o.meta_mut();
    meta.namespace = Some(ns.to_owned());
    meta.uid = meta.uid.as_ref().map(|u| format!("{ns}/{u}"));
    if let Some(u) = meta
        .annotations
        .as_mut()
        .and_then(|a| a.get_mut(NETWORK_UID))
    {
        *u = format!("{ns}/{u}");
    }
    Arc::new(o)
}

/// `obj` (a Port or Subnet) as made in the Network of `uid`.
pub(crate) fn of_network<K: kube::Resource + Clone>(obj: Arc<K>, uid: &str) -> Arc<K> {
    let mut o = (*obj).clone();
    o.meta_mut()
        .annotations
        .get_or_insert_default()
        .insert(NETWORK_UID.to_owned(), uid.to_owned());
    Arc::new(o)
}

pub(crate) fn ifname(s: &str) -> IfName {
    IfName::new(s).expect("ifname")
}

pub(crate) fn name(s: String) -> Name {
    Name::new(&s).expect("name")
}

pub(crate) fn sh(ns: &Name, args: &[&str]) {
    let (ok, out) = run_in(ns, args);
    assert!(ok, "{args:?}: {out}");
}

/// A guest namespace plugged into `node` by a veth: `device` on the node, `eth0` inside
/// (up, no address yet); the guest's MAC.
pub(crate) fn guest(l: &NetlinkLinks, node: &Netns, guest: &Name, device: &IfName) -> String {
    l.add_netns(guest).expect("guest netns");
    let g = Netns::Named(guest.clone());
    let eth0 = ifname("eth0");
    l.add_veth(
        node,
        &VethSpec {
            name: device.clone(),
            peer: eth0.clone(),
            peer_netns: Some(g.clone()),
        },
    )
    .expect("guest veth");
    l.set_mtu(&g, &eth0, 1450).expect("mtu");
    l.set_up(&g, &eth0, true).expect("up");
    l.set_up(&g, &ifname("lo"), true).expect("lo up");
    l.link(&g, &eth0)
        .expect("link")
        .and_then(|k| k.mac)
        .expect("mac")
        .to_string()
}

/// The underlay between nodes `a` and `b`: a veth, `underlay` in each, with 192.0.2.1/24 on
/// `a`'s end and 192.0.2.2/24 on `b`'s, both up.
fn underlay(l: &NetlinkLinks, a: &Netns, b: &Netns) {
    let underlay = ifname("underlay");
    l.add_veth(
        a,
        &VethSpec {
            name: underlay.clone(),
            peer: underlay.clone(),
            peer_netns: Some(b.clone()),
        },
    )
    .expect("underlay");
    for (ns, address) in [(a, "192.0.2.1/24"), (b, "192.0.2.2/24")] {
        l.add_address(ns, &underlay, address.parse().expect("cidr"))
            .expect("address");
        l.set_up(ns, &underlay, true).expect("up");
    }
}

#[test]
fn two_nodes_wire_their_ports_serve_dhcp_repair_drift_and_clean_up() {
    if !root() {
        return;
    }
    let prefix = unique();
    let l = NetlinkLinks::new();
    let (n1, n2) = (name(format!("{prefix}-n1")), name(format!("{prefix}-n2")));
    let (g1, g2) = (name(format!("{prefix}-g1")), name(format!("{prefix}-g2")));
    let (g3, g4) = (name(format!("{prefix}-g3")), name(format!("{prefix}-g4")));
    let (d1, d2) = (
        tempfile::tempdir().expect("dir"),
        tempfile::tempdir().expect("dir"),
    );
    let (dns1, dns2) = (
        Dnsmasq::new(d1.path().join("dhcp")),
        Dnsmasq::new(d2.path().join("dhcp")),
    );
    let _cleanup = Cleanup {
        dhcp: vec![
            (dns1.clone(), n1.to_string()),
            (dns2.clone(), n2.to_string()),
        ],
        namespaces: vec![
            n1.clone(),
            n2.clone(),
            g1.clone(),
            g2.clone(),
            g3.clone(),
            g4.clone(),
        ],
        _dirs: vec![],
    };
    let (ns1, ns2) = (Netns::Named(n1.clone()), Netns::Named(n2.clone()));
    for n in [&n1, &n2] {
        l.add_netns(n).expect("node netns");
    }
    underlay(&l, &ns1, &ns2);
    let (dev1, dev2) = (ifname("tp-guest1"), ifname("tp-guest2"));
    let mac1 = guest(&l, &ns1, &g1, &dev1);
    let mac2 = guest(&l, &ns2, &g2, &dev2);

    // The API's objects: the ports' addresses as IPAM gave them.
    let net_uid = format!("{prefix}-net");
    let mut snap = Snapshot {
        ports: vec![
            of_network(
                port(
                    "p1",
                    "net",
                    n1.as_str(),
                    &mac1,
                    "10.50.0.11",
                    Some("tp-guest1"),
                ),
                &net_uid,
            ),
            of_network(
                port(
                    "p2",
                    "net",
                    n2.as_str(),
                    &mac2,
                    "10.50.0.12",
                    Some("tp-guest2"),
                ),
                &net_uid,
            ),
        ],
        networks: vec![network("net", &net_uid, Some(5001))],
        subnets: vec![of_network(subnet("sn", "net", "10.50.0.0/24"), &net_uid)],
        hypervisors: vec![
            hypervisor(n1.as_str(), "192.0.2.1"),
            hypervisor(n2.as_str(), "192.0.2.2"),
        ],
        groups: vec![group(
            "default",
            json!([
                {"direction": "ingress", "protocol": "icmp", "remoteGroup": "default"},
                {"direction": "egress"},
            ]),
        )],
        ..Snapshot::default()
    };
    let host = |ns: &Netns, d: &Dnsmasq| Host {
        links: Arc::new(NetlinkLinks::new()),
        firewall: Arc::new(NftFirewall::new(ns.clone())),
        dhcp: Arc::new(d.clone()),
    };
    let (h1, h2) = (host(&ns1, &dns1), host(&ns2, &dns2));
    let cfg = |n: &Name| NodeConfig {
        node: n.to_string(),
        netns: Netns::Named(n.clone()),
        underlay: None,
        physical: Default::default(),
    };
    let (c1, c2) = (cfg(&n1), cfg(&n2));
    let key = |n: &str| PortKey {
        namespace: "demo".into(),
        name: n.into(),
    };

    for (h, c, p) in [(&h1, &c1, "p1"), (&h2, &c2, "p2")] {
        let r = converge(h, c, &snap).expect("converge");
        assert!(r.failures.is_empty(), "{:?}", r.failures);
        assert!(
            matches!(r.ports.get(&key(p)), Some(PortState::Wired { .. })),
            "{p}: {:?}",
            r.ports
        );
    }
    // Each guest takes its IPAM address from its node's DHCP server.
    let dir = tempfile::tempdir().expect("dir");
    assert_eq!(lease(&g1, dir.path()), Some(Ipv4Addr::new(10, 50, 0, 11)));
    assert_eq!(lease(&g2, dir.path()), Some(Ipv4Addr::new(10, 50, 0, 12)));
    sh(&g1, &["ip", "addr", "add", "10.50.0.11/24", "dev", "eth0"]);
    sh(&g2, &["ip", "addr", "add", "10.50.0.12/24", "dev", "eth0"]);
    let (ip1, ip2) = (Ipv4Addr::new(10, 50, 0, 11), Ipv4Addr::new(10, 50, 0, 12));
    assert!(pings(&g1, ip2, 5), "guest 1 reaches guest 2 across VXLAN");
    assert!(ping(&g2, ip1), "and back");

    // A restarted agent finds everything right and changes nothing.
    for (h, c) in [(&h1, &c1), (&h2, &c2)] {
        let r = converge(h, c, &snap).expect("converge");
        assert_eq!(r.steps, vec![]);
    }

    // Drift by hand on node 1: the VXLAN device, the nft tables, dnsmasq; on node 2 the
    // flood entry to node 1.
    let vx = IfName::derived(Role::Vxlan, &net_uid);
    sh(&n1, &["ip", "link", "del", vx.as_str()]);
    sh(&n1, &["nft", "delete", "table", "inet", "stratus"]);
    let server = dns1
        .list()
        .expect("list")
        .into_iter()
        .next()
        .expect("server");
    let pid = dns1
        .status(&server)
        .expect("status")
        .and_then(|s| s.pid)
        .expect("pid");
    let killed = Command::new("kill")
        .arg(pid.to_string())
        .status()
        .expect("kill");
    assert!(killed.success());
    wait(|| {
        dns1.status(&server)
            .ok()
            .flatten()
            .is_some_and(|s| s.pid.is_none())
    });
    sh(
        &n2,
        &[
            "bridge",
            "fdb",
            "del",
            "00:00:00:00:00:00",
            "dev",
            vx.as_str(),
            "dst",
            "192.0.2.1",
        ],
    );
    assert!(!ping(&g1, ip2), "the overlay is broken");
    for (h, c) in [(&h1, &c1), (&h2, &c2)] {
        let r = converge(h, c, &snap).expect("converge");
        assert!(!r.steps.is_empty(), "drift seen");
        assert!(r.failures.is_empty(), "{:?}", r.failures);
    }
    assert!(
        h1.firewall.read().expect("read").is_some(),
        "tables are back"
    );
    assert!(
        pings(&g1, ip2, 5),
        "repaired: guest 1 reaches guest 2 again"
    );
    assert_eq!(lease(&g1, dir.path()), Some(ip1), "DHCP serves again");
    for (h, c) in [(&h1, &c1), (&h2, &c2)] {
        assert_eq!(converge(h, c, &snap).expect("converge").steps, vec![]);
    }

    // Another project's network with the same CIDR on the same nodes, its guests holding
    // each other's addresses crosswise: guest 3 (on node 1, 10.50.0.12) looking for
    // 10.50.0.11 finds guest 4 across the overlay, never guest 1 on its own node.
    let (dev3, dev4) = (ifname("tp-guest3"), ifname("tp-guest4"));
    let mac3 = guest(&l, &ns1, &g3, &dev3);
    let mac4 = guest(&l, &ns2, &g4, &dev4);
    let net_b = format!("{prefix}-net-b");
    snap.networks
        .push(in_project(network("net", &net_b, Some(5002)), "other"));
    snap.subnets.push(in_project(
        of_network(subnet("sn", "net", "10.50.0.0/24"), &net_b),
        "other",
    ));
    snap.groups.push(in_project(
        group(
            "default",
            json!([
                {"direction": "ingress", "protocol": "icmp", "remoteGroup": "default"},
                {"direction": "egress"},
            ]),
        ),
        "other",
    ));
    snap.ports.push(in_project(
        of_network(
            port(
                "q3",
                "net",
                n1.as_str(),
                &mac3,
                "10.50.0.12",
                Some("tp-guest3"),
            ),
            &net_b,
        ),
        "other",
    ));
    snap.ports.push(in_project(
        of_network(
            port(
                "q4",
                "net",
                n2.as_str(),
                &mac4,
                "10.50.0.11",
                Some("tp-guest4"),
            ),
            &net_b,
        ),
        "other",
    ));
    for (h, c) in [(&h1, &c1), (&h2, &c2)] {
        let r = converge(h, c, &snap).expect("converge");
        assert!(r.failures.is_empty(), "{:?}", r.failures);
        assert_eq!(r.desired.networks.len(), 2);
    }
    assert_eq!(lease(&g3, dir.path()), Some(ip2), "its own network's DHCP");
    sh(&g3, &["ip", "addr", "add", "10.50.0.12/24", "dev", "eth0"]);
    sh(&g4, &["ip", "addr", "add", "10.50.0.11/24", "dev", "eth0"]);
    assert!(
        pings(&g3, ip1, 5),
        "guest 3 reaches its own network's 10.50.0.11"
    );
    let neighbour =
        |ns: &Name, addr: &str| run_in(ns, &["ip", "neigh", "show", addr]).1.to_lowercase();
    assert!(
        neighbour(&g3, "10.50.0.11").contains(&mac4),
        "guest 4 answered"
    );
    assert!(ping(&g1, ip2), "project 1 still works");
    assert!(
        neighbour(&g1, "10.50.0.12").contains(&mac2),
        "guest 2 answered"
    );

    // Security groups: without the ICMP rule, guest 2 is not reached; it still pings out.
    snap.groups[0] = group("default", json!([{"direction": "egress"}]));
    for (h, c) in [(&h1, &c1), (&h2, &c2)] {
        converge(h, c, &snap).expect("converge");
    }
    assert!(!ping(&g1, ip2), "ICMP in dropped");

    // The ports go: nothing of Stratus's is left on either node.
    snap.ports.clear();
    for (h, c, d, ns, n) in [(&h1, &c1, &dns1, &ns1, &n1), (&h2, &c2, &dns2, &ns2, &n2)] {
        let r = converge(h, c, &snap).expect("converge");
        assert!(r.failures.is_empty(), "{:?}", r.failures);
        let ours: Vec<String> = l
            .links(ns)
            .expect("links")
            .into_iter()
            .filter(|k| ["br", "vx", "ve"].iter().any(|p| is_derived(&k.name, p)))
            .map(|k| k.name.to_string())
            .collect();
        assert_eq!(ours, Vec::<String>::new());
        assert_eq!(h.firewall.read().expect("read"), None);
        assert!(d.list().expect("list").is_empty());
        assert!(
            !l.list_netns()
                .expect("netns")
                .iter()
                .any(|x| is_dhcp_name_of(n.as_str(), x))
        );
        assert_eq!(converge(h, c, &snap).expect("converge").steps, vec![]);
    }
}

/// `snap`'s objects with the nodes `n1` and `n2` renamed and every uid made unique to this
/// run (so that namespaces derived from them meet no other run's).
fn renamed(snap: &Snapshot, n1: &str, n2: &str, prefix: &str) -> Snapshot {
    fn each<K: serde::Serialize + serde::de::DeserializeOwned>(
        v: &[Arc<K>],
        f: &dyn Fn(String) -> String,
    ) -> Vec<Arc<K>> {
        v.iter()
            .map(|o| {
                let s = f(serde_json::to_string(&**o).expect("json"));
                Arc::new(serde_json::from_str(&s).expect("object"))
            })
            .collect()
    }
    let f = |s: String| {
        s.replace("\"n1\"", &format!("\"{n1}\""))
            .replace("\"n2\"", &format!("\"{n2}\""))
            .replace("\"uid-", &format!("\"{prefix}-uid-"))
    };
    Snapshot {
        ports: each(&snap.ports, &f),
        networks: each(&snap.networks, &f),
        subnets: each(&snap.subnets, &f),
        hypervisors: each(&snap.hypervisors, &f),
        groups: each(&snap.groups, &f),
        routers: each(&snap.routers, &f),
        floating_ips: each(&snap.floating_ips, &f),
        leases: each(&snap.leases, &f),
    }
}

/// Installs in `ns` an input counter of ICMP echo requests from each of `sources`.
pub(crate) fn count_pings_from(ns: &Name, sources: &[Ipv4Addr]) {
    count_from(
        ns,
        ("probe", "in", "input priority 0"),
        sources,
        &["icmp", "type", "echo-request"],
    );
}

/// Installs in `ns` table `table` (`ip`) with a chain `chain` at `hook` (as "input priority
/// 0") counting the packets from each of `sources` that match `matches` too (see
/// [`counted_from`]).
pub(crate) fn count_from(
    ns: &Name,
    (table, chain, hook): (&str, &str, &str),
    sources: &[Ipv4Addr],
    matches: &[&str],
) {
    sh(ns, &["nft", "add", "table", "ip", table]);
    let spec = format!("{{ type filter hook {hook} ; }}");
    sh(ns, &["nft", "add", "chain", "ip", table, chain, &spec]);
    for s in sources {
        let s = s.to_string();
        let mut args = vec!["nft", "add", "rule", "ip", table, chain, "ip", "saddr", &s];
        args.extend(matches);
        args.push("counter");
        sh(ns, &args);
    }
}

/// The echo requests counted from `source` (see [`count_pings_from`]).
pub(crate) fn pings_counted(ns: &Name, source: Ipv4Addr) -> u64 {
    counted_from(ns, "probe", "in", source)
}

/// The packets counted from `source` by the rule matching it in chain `chain` of the `ip`
/// table `table` in `ns`.
pub(crate) fn counted_from(ns: &Name, table: &str, chain: &str, source: Ipv4Addr) -> u64 {
    let (ok, out) = run_in(ns, &["nft", "list", "chain", "ip", table, chain]);
    assert!(ok, "{out}");
    let line = out
        .lines()
        .find(|l| l.contains(&format!("ip saddr {source} ")))
        .unwrap_or_else(|| panic!("no counter for {source}: {out}"));
    line.split("packets ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no packet count in {line}"))
}

#[test]
fn a_router_on_a_network_node_translates_floating_ips_and_snat_for_a_guest_on_another_node() {
    if !root() {
        return;
    }
    let prefix = unique();
    let l = NetlinkLinks::new();
    let (na, nb) = (name(format!("{prefix}-a")), name(format!("{prefix}-b")));
    let (g1, ext) = (name(format!("{prefix}-g1")), name(format!("{prefix}-ext")));
    let router_ns = crate::plan::router_name(nb.as_str(), &format!("{prefix}-uid-r1"));
    let (_cleanup, ha, hb) = two_hosts(
        &na,
        &nb,
        vec![
            na.clone(),
            nb.clone(),
            g1.clone(),
            ext.clone(),
            router_ns.clone(),
        ],
    );
    let (nsa, nsb) = (Netns::Named(na.clone()), Netns::Named(nb.clone()));
    for n in [&na, &nb, &ext] {
        l.add_netns(n).expect("netns");
    }
    // The underlay, and node b's physical interface into the external namespace.
    underlay(&l, &nsa, &nsb);
    let (physnet, eth0) = (ifname("physnet"), ifname("eth0"));
    let nse = Netns::Named(ext.clone());
    l.add_veth(
        &nsb,
        &VethSpec {
            name: physnet.clone(),
            peer: eth0.clone(),
            peer_netns: Some(nse.clone()),
        },
    )
    .expect("physical interface");
    l.set_up(&nsb, &physnet, true).expect("up");
    l.add_address(&nse, &eth0, "203.0.113.1/24".parse().expect("cidr"))
        .expect("address");
    l.set_up(&nse, &eth0, true).expect("up");
    l.set_up(&nse, &ifname("lo"), true).expect("up");

    // The guest of port p1 on node a, with its port's MAC and address.
    let dev = ifname("tp-p1");
    guest(&l, &nsa, &g1, &dev);
    let gns = Netns::Named(g1.clone());
    l.set_mac(&gns, &eth0, "02:00:00:00:00:01".parse().expect("mac"))
        .expect("mac");
    sh(&g1, &["ip", "addr", "add", "10.9.0.11/24", "dev", "eth0"]);
    sh(&g1, &["ip", "route", "add", "default", "via", "10.9.0.1"]);

    // Node a hosts the guest (a Hypervisor); node b only the router (its tunnel address
    // from its network agent's Lease).
    let mut base = crate::agent::tests::router_snapshot();
    base.ports
        .retain(|p| p.metadata.name.as_deref() != Some("p2"));
    base.hypervisors
        .retain(|h| h.metadata.name.as_deref() == Some("n1"));
    base.groups[0] = group(
        "default",
        json!([{"direction": "ingress", "protocol": "icmp"}, {"direction": "egress"}]),
    );
    base.leases.push(Arc::new(
        serde_json::from_value(json!({
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": "n2", "namespace": "stratus-network-agents",
                         "annotations": {"network.stratus.dev/tunnel-ip": "192.0.2.2"}},
            "spec": {"holderIdentity": "n2"},
        }))
        .expect("lease"),
    ));
    let move_router = |snap: &mut Snapshot, to: &str| {
        for r in snap.routers.iter_mut() {
            let mut x = (**r).clone();
            if let Some(st) = x.status.as_mut() {
                st.node = Some(to.to_owned());
            }
            *r = Arc::new(x);
        }
        for p in snap.ports.iter_mut() {
            if p.metadata
                .name
                .as_deref()
                .is_some_and(|n| n.starts_with("rp-"))
            {
                let mut q = (**p).clone();
                if let Some(st) = q.status.as_mut() {
                    st.hypervisor = Some(to.to_owned());
                }
                *p = Arc::new(q);
            }
        }
    };
    move_router(&mut base, "n2");
    let mut snap = renamed(&base, na.as_str(), nb.as_str(), &prefix);
    let ca = NodeConfig {
        node: na.to_string(),
        netns: nsa.clone(),
        underlay: None,
        physical: Default::default(),
    };
    let cb = NodeConfig {
        node: nb.to_string(),
        netns: nsb.clone(),
        underlay: Some(Ipv4Addr::new(192, 0, 2, 2)),
        physical: [("physnet1".to_owned(), physnet.clone())].into(),
    };
    let converge_both = |snap: &Snapshot| {
        for (h, c) in [(&ha, &ca), (&hb, &cb)] {
            let r = converge(h, c, snap).expect("converge");
            assert!(r.failures.is_empty(), "{}: {:?}", c.node, r.failures);
        }
    };
    converge_both(&snap);
    let rb = converge(&hb, &cb, &snap).expect("converge");
    assert_eq!(rb.steps, vec![], "a second converge changes nothing");
    let key = |ns: &str, n: &str| PortKey {
        namespace: ns.into(),
        name: n.into(),
    };
    assert!(
        matches!(
            rb.routers.get(&key("demo", "r1")),
            Some(crate::agent::Programmed::Yes { .. })
        ),
        "{:?}",
        rb.routers
    );
    assert!(matches!(
        rb.floating_ips.get(&key("demo", "f1")),
        Some(crate::agent::Programmed::Yes { .. })
    ));

    let (external, gw, fip) = (
        Ipv4Addr::new(203, 0, 113, 1),
        Ipv4Addr::new(203, 0, 113, 2),
        Ipv4Addr::new(203, 0, 113, 10),
    );
    count_pings_from(&ext, &[gw, fip, Ipv4Addr::new(10, 9, 0, 11)]);
    // The external side reaches the guest on its floating address (over VXLAN to node a),
    // and the guest reaches the external side as its floating address.
    assert!(pings(&ext, fip, 10), "the floating IP reaches the guest");
    assert!(
        pings(&g1, external, 10),
        "the guest reaches the external side"
    );
    assert!(
        pings_counted(&ext, fip) > 0,
        "seen from the floating address"
    );
    assert_eq!(pings_counted(&ext, Ipv4Addr::new(10, 9, 0, 11)), 0);

    // Someone on the external network (another tenant's router, say, through a static
    // route) sends to the guest's fixed address via the gateway: the router forwards none
    // of it inside, while the floating address still reaches the guest.
    let fixed = Ipv4Addr::new(10, 9, 0, 11);
    sh(
        &ext,
        &["ip", "route", "add", "10.9.0.0/24", "via", &gw.to_string()],
    );
    assert!(
        !pings(&ext, fixed, 3),
        "the fixed address is not reachable through the gateway"
    );
    assert!(
        pings(&ext, fip, 5),
        "the floating IP still reaches the guest"
    );

    // The NAT table deleted by hand: put back.
    sh(&router_ns, &["nft", "delete", "table", "ip", "stratus"]);
    let rb = converge(&hb, &cb, &snap).expect("converge");
    assert!(
        rb.steps
            .iter()
            .any(|s| matches!(s.op, crate::plan::Op::ApplyNat(..))),
        "{:?}",
        rb.steps
    );
    assert!(pings(&ext, fip, 5), "translated again");

    // The floating IP goes: unreachable from outside; the guest now leaves as the gateway.
    snap.floating_ips.clear();
    converge_both(&snap);
    assert!(
        !pings(&ext, fip, 2),
        "a removed floating IP reaches nothing"
    );
    assert!(pings(&g1, external, 5));
    assert!(pings_counted(&ext, gw) > 0, "SNAT to the gateway's address");
    assert_eq!(pings_counted(&ext, Ipv4Addr::new(10, 9, 0, 11)), 0);

    // The router moves to node a (which has no physical interface): node b keeps nothing
    // of it.
    move_router(&mut base, "n1");
    base.floating_ips.clear();
    let snap = renamed(&base, na.as_str(), nb.as_str(), &prefix);
    let rb = converge(&hb, &cb, &snap).expect("converge");
    assert!(rb.failures.is_empty(), "{:?}", rb.failures);
    assert!(!l.list_netns().expect("netns").contains(&router_ns));
    let left: Vec<String> = l
        .links(&nsb)
        .expect("links")
        .into_iter()
        .filter(|k| ["br", "vx", "ve"].iter().any(|p| is_derived(&k.name, p)))
        .map(|k| k.name.to_string())
        .collect();
    assert_eq!(left, Vec::<String>::new());
    assert!(
        l.link(&nsb, &physnet).expect("link").is_some(),
        "left alone"
    );
    wait(|| !ping(&g1, external));
}

/// Makes taps `tc0`…`tc{n-1}` in `ns` (what the hypervisor does for a guest's ports).
fn taps(ns: &Name, n: usize) {
    for i in 0..n {
        sh(
            ns,
            &[
                "ip",
                "tuntap",
                "add",
                "dev",
                &format!("tc{i}"),
                "mode",
                "tap",
            ],
        );
    }
}

/// Stops the node's DHCP servers and deletes their namespaces, as a node that is gone.
fn forget_dhcp(l: &NetlinkLinks, d: &Dnsmasq, node: &str) {
    for name in d.list().expect("dhcp list") {
        d.remove(&name).expect("dhcp remove");
    }
    for ns in l.list_netns().expect("netns") {
        if is_dhcp_name_of(node, &ns) {
            l.del_netns(&ns).expect("del dhcp netns");
        }
    }
}

/// The benchmark's restart of a node with many ports: its ports already `Active` in the
/// API from an earlier run, the node's namespace made anew (same name, then another), its
/// DHCP server gone; an agent whose drivers knew the old namespace, and then a new agent,
/// each wire every port in one converge, and a second converge changes nothing.
#[test]
fn an_agent_started_again_on_a_fresh_node_wires_every_port_at_once() {
    if !root() {
        return;
    }
    const PORTS: usize = 40;
    let prefix = unique();
    let l = NetlinkLinks::new();
    let (a, b) = (name(format!("{prefix}-a")), name(format!("{prefix}-b")));
    let node = format!("{prefix}-node");
    let (d1, d2) = (
        tempfile::tempdir().expect("dir"),
        tempfile::tempdir().expect("dir"),
    );
    let (dns1, dns2) = (
        Dnsmasq::new(d1.path().join("dhcp")),
        Dnsmasq::new(d2.path().join("dhcp")),
    );
    let _cleanup = Cleanup {
        dhcp: vec![(dns1.clone(), node.clone()), (dns2.clone(), node.clone())],
        namespaces: vec![a.clone(), b.clone()],
        _dirs: vec![],
    };
    let net_uid = format!("{prefix}-net");
    let ports = (0..PORTS)
        .map(|i| {
            let p = of_network(
                port(
                    &format!("p{i}"),
                    "net",
                    &node,
                    &format!("02:00:00:00:01:{i:02x}"),
                    &format!("10.50.0.{}", i + 10),
                    Some(&format!("tc{i}")),
                ),
                &net_uid,
            );
            // Wired by the agent of the run before.
            let mut q = (*p).clone();
            if let Some(s) = q.status.as_mut() {
                s.phase = stratus_api_types::network::PortPhase::Active;
            }
            Arc::new(q)
        })
        .collect();
    let snap = Snapshot {
        ports,
        networks: vec![network("net", &net_uid, Some(5001))],
        subnets: vec![of_network(subnet("sn", "net", "10.50.0.0/24"), &net_uid)],
        hypervisors: vec![hypervisor(&node, "192.0.2.1")],
        groups: vec![group(
            "default",
            json!([
                {"direction": "ingress", "protocol": "icmp", "remoteGroup": "default"},
                {"direction": "ingress", "protocol": "tcp", "portRangeMin": 22, "portRangeMax": 22},
                {"direction": "egress"},
            ]),
        )],
        ..Snapshot::default()
    };
    let cfg = |ns: &Name| NodeConfig {
        node: node.clone(),
        netns: Netns::Named(ns.clone()),
        underlay: Some(Ipv4Addr::new(192, 0, 2, 1)),
        physical: Default::default(),
    };
    let host = |ns: &Name, d: &Dnsmasq| Host {
        links: Arc::new(NetlinkLinks::new()),
        firewall: Arc::new(NftFirewall::new(Netns::Named(ns.clone()))),
        dhcp: Arc::new(d.clone()),
    };
    let all_wired = |ns: &Name, h: &Host, label: &str| {
        let r = converge(h, &cfg(ns), &snap).expect("converge");
        assert!(r.failures.is_empty(), "{label}: {:?}", r.failures);
        let wired = r
            .ports
            .values()
            .filter(|s| matches!(s, PortState::Wired { .. }))
            .count();
        assert_eq!(wired, PORTS, "{label}: {:?}", r.ports);
        let links = l.links(&Netns::Named(ns.clone())).expect("links");
        let on_bridge = links
            .iter()
            .filter(|k| k.name.as_str().starts_with("tc") && k.up && k.master.is_some())
            .count();
        assert_eq!(on_bridge, PORTS, "{label}");
        let again = converge(h, &cfg(ns), &snap).expect("converge");
        assert_eq!(again.steps, vec![], "{label}: nothing left to do");
    };

    l.add_netns(&a).expect("netns");
    taps(&a, PORTS);
    let h1 = host(&a, &dns1);
    all_wired(&a, &h1, "first start");

    // The node's namespace is made again under the same name; the same drivers (their
    // netlink connection and nf_tables socket were opened in the old one) wire it.
    forget_dhcp(&l, &dns1, &node);
    l.del_netns(&a).expect("del netns");
    l.add_netns(&a).expect("netns again");
    taps(&a, PORTS);
    all_wired(&a, &h1, "same drivers, namespace made again");

    // A new agent for the same node in another fresh namespace, with a state directory of
    // its own; the old namespace and DHCP server gone.
    forget_dhcp(&l, &dns1, &node);
    l.del_netns(&a).expect("del netns");
    l.add_netns(&b).expect("netns");
    taps(&b, PORTS);
    all_wired(&b, &host(&b, &dns2), "new agent, new namespace");
}

#[test]
fn netlink_links_pass_the_vlan_conformance_suite() {
    if !root() {
        return;
    }
    let prefix = unique();
    let _cleanup = Cleanup {
        dhcp: vec![],
        namespaces: vec![name(format!("{prefix}-v"))],
        _dirs: vec![],
    };
    let l = NetlinkLinks::new();
    if kernel_has_vlans(&l, &prefix) {
        crate::driver::conformance::vlans(&l, &prefix);
    }
}

/// Whether this kernel makes VLAN sub-interfaces (CONFIG_VLAN_8021Q), tried in a namespace
/// `<prefix>-v` made and deleted here. Without it, the refusal says so by name.
fn kernel_has_vlans(l: &NetlinkLinks, prefix: &str) -> bool {
    let n = name(format!("{prefix}-v"));
    let ns = Netns::Named(n.clone());
    l.add_netns(&n).expect("netns");
    l.add_bridge(&ns, &ifname("probe")).expect("bridge");
    let made = l.add_vlan(
        &ns,
        &crate::driver::VlanSpec {
            name: ifname("probe.100"),
            parent: ifname("probe"),
            id: 100,
        },
    );
    l.del_netns(&n).expect("delete netns");
    match made {
        Ok(()) => true,
        Err(e) => {
            let msg = stratus_runtime::policy::chain(&e);
            assert!(msg.contains("no 802.1Q VLAN support"), "{msg}");
            false
        }
    }
}

/// The packets `device` in `ns` has received (`ip -s -j link`).
fn rx_packets(ns: &Name, device: &IfName) -> u64 {
    let (ok, out) = run_in(
        ns,
        &["ip", "-s", "-j", "link", "show", "dev", device.as_str()],
    );
    assert!(ok, "{out}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).expect("ip -j output");
    v[0]["stats64"]["rx"]["packets"]
        .as_u64()
        .expect("rx packets")
}

/// Two vlan networks (IDs 100 and 200, both 10.9.0.0/24, in two projects) on physical
/// network physnet1, which is a veth pair `phys` between two nodes; a guest of each network
/// on each node, with its port's MAC and address. Guests of one VLAN ping each other, those
/// of the other VLAN are not reached; the frames cross `phys` tagged (the receiving node's
/// sub-interface of the VLAN counts them, the other VLAN's does not); a sub-interface
/// deleted by hand is made again; with the networks gone no sub-interface is left and
/// `phys` is. On a kernel without 802.1Q (CONFIG_VLAN_8021Q unset) every port says so
/// instead (WiringFailed) and no sub-interface is made.
#[test]
fn vlan_networks_on_a_physical_link_carry_their_tags_and_stay_apart() {
    if !root() {
        return;
    }
    let prefix = unique();
    let l = NetlinkLinks::new();
    let (na, nb) = (name(format!("{prefix}-a")), name(format!("{prefix}-b")));
    let guests: Vec<Name> = ["a1", "b1", "a2", "b2"]
        .iter()
        .map(|g| name(format!("{prefix}-{g}")))
        .collect();
    let (_cleanup, ha, hb) = two_hosts(
        &na,
        &nb,
        [na.clone(), nb.clone(), name(format!("{prefix}-v"))]
            .into_iter()
            .chain(guests.iter().cloned())
            .collect(),
    );
    let (nsa, nsb) = (Netns::Named(na.clone()), Netns::Named(nb.clone()));
    for n in [&na, &nb] {
        l.add_netns(n).expect("netns");
    }
    // The physical link: `phys` on each node, up, no address.
    let phys = ifname("phys");
    l.add_veth(
        &nsa,
        &VethSpec {
            name: phys.clone(),
            peer: phys.clone(),
            peer_netns: Some(nsb.clone()),
        },
    )
    .expect("physical link");
    for ns in [&nsa, &nsb] {
        l.set_up(ns, &phys, true).expect("up");
    }

    // (guest, node, port, device, MAC, address, project)
    let plan = [
        (
            &guests[0],
            &nsa,
            "pa1",
            "tp-pa1",
            "02:00:00:00:01:01",
            "10.9.0.11",
            "demo",
        ),
        (
            &guests[1],
            &nsb,
            "pb1",
            "tp-pb1",
            "02:00:00:00:01:02",
            "10.9.0.12",
            "demo",
        ),
        (
            &guests[2],
            &nsa,
            "pa2",
            "tp-pa2",
            "02:00:00:00:02:01",
            "10.9.0.14",
            "other",
        ),
        (
            &guests[3],
            &nsb,
            "pb2",
            "tp-pb2",
            "02:00:00:00:02:02",
            "10.9.0.13",
            "other",
        ),
    ];
    let mut base = crate::agent::tests::snapshot();
    let vlan = |id: u16| {
        let mut n = (*network("net", &format!("uid-net{id}"), None)).clone();
        n.spec.segmentation = stratus_api_types::network::Segmentation::Vlan;
        n.spec.physical_network = Some("physnet1".into());
        n.spec.mtu = 1450;
        n.status
            .get_or_insert_with(Default::default)
            .segmentation_id = Some(id);
        Arc::new(n)
    };
    base.networks = vec![vlan(100), in_project(vlan(200), "other")];
    base.subnets = vec![
        of_network(subnet("sn", "net", "10.9.0.0/24"), "uid-net100"),
        in_project(
            of_network(subnet("sn", "net", "10.9.0.0/24"), "uid-net200"),
            "other",
        ),
    ];
    base.groups
        .push(in_project(base.groups[0].clone(), "other"));
    base.ports = plan
        .iter()
        .map(|(_, ns, p, dev, mac, ip, project)| {
            let node = if *ns == &nsa { "n1" } else { "n2" };
            let id = if *project == "demo" { 100 } else { 200 };
            let port = of_network(
                port(p, "net", node, mac, ip, Some(dev)),
                &format!("uid-net{id}"),
            );
            if *project == "demo" {
                port
            } else {
                in_project(port, project)
            }
        })
        .collect();
    let snap = renamed(&base, na.as_str(), nb.as_str(), &prefix);
    let eth0 = ifname("eth0");
    for (g, ns, _, dev, mac, ip, _) in &plan {
        guest(&l, ns, g, &ifname(dev));
        // No IPv6 chatter: the only traffic is the test's.
        sh(g, &["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"]);
        l.set_mac(
            &Netns::Named((*g).clone()),
            &eth0,
            mac.parse().expect("mac"),
        )
        .expect("mac");
        sh(
            g,
            &["ip", "addr", "add", &format!("{ip}/24"), "dev", "eth0"],
        );
    }

    let cfg = |n: &Name, ns: &Netns| NodeConfig {
        node: n.to_string(),
        netns: ns.clone(),
        underlay: None,
        physical: [("physnet1".to_owned(), phys.clone())].into(),
    };
    let (ca, cb) = (cfg(&na, &nsa), cfg(&nb, &nsb));
    if !kernel_has_vlans(&l, &prefix) {
        // A kernel without 802.1Q: each port says why it is not wired, and no sub-interface
        // is left half-made.
        for (h, c) in [(&ha, &ca), (&hb, &cb)] {
            let r = converge(h, c, &snap).expect("converge");
            for p in snap.ports.iter().filter(|p| {
                p.status.as_ref().and_then(|s| s.hypervisor.as_deref()) == Some(&c.node)
            }) {
                match r.ports.get(&PortKey::of(p)) {
                    Some(PortState::NotWired { reason, message }) => {
                        assert_eq!(*reason, Reason::WiringFailed);
                        assert!(message.contains("no 802.1Q VLAN support"), "{message}");
                    }
                    s => panic!("{s:?}"),
                }
            }
            let links = l.links(&c.netns).expect("links");
            assert!(
                !links.iter().any(|k| is_derived(&k.name, "vl")),
                "{links:?}"
            );
        }
        return;
    }
    let converge_both = |snap: &Snapshot| {
        for (h, c) in [(&ha, &ca), (&hb, &cb)] {
            let r = converge(h, c, snap).expect("converge");
            assert!(r.failures.is_empty(), "{}: {:?}", c.node, r.failures);
            for p in &snap.ports {
                if p.status.as_ref().and_then(|s| s.hypervisor.as_deref()) == Some(&c.node) {
                    assert!(
                        matches!(r.ports.get(&PortKey::of(p)), Some(PortState::Wired { .. })),
                        "{:?}",
                        r.ports.get(&PortKey::of(p))
                    );
                }
            }
        }
    };
    converge_both(&snap);
    for (h, c) in [(&ha, &ca), (&hb, &cb)] {
        assert_eq!(converge(h, c, &snap).expect("converge").steps, vec![]);
    }
    let sub = |id: u16| {
        let uid = snap
            .networks
            .iter()
            .find(|n| n.status.as_ref().and_then(|s| s.segmentation_id) == Some(id))
            .and_then(|n| n.metadata.uid.clone())
            .expect("network");
        IfName::derived(Role::Vlan, &uid)
    };
    let (vl100, vl200) = (sub(100), sub(200));
    for ns in [&nsa, &nsb] {
        for (vl, id) in [(&vl100, 100), (&vl200, 200)] {
            let link = l.link(ns, vl).expect("link").expect("sub-interface");
            assert_eq!((link.kind, link.up), (LinkKind::Vlan(id), true));
        }
        assert_eq!(
            l.link(ns, &phys).expect("link").and_then(|k| k.master),
            None,
            "the physical interface is on no bridge"
        );
    }

    let ip = |s: &str| -> Ipv4Addr { s.parse().expect("ip") };
    // Same VLAN: reached; the other VLAN's guest with an address of the same subnet: not.
    assert!(
        pings(&guests[0], ip("10.9.0.12"), 10),
        "VLAN 100 across nodes"
    );
    assert!(
        pings(&guests[2], ip("10.9.0.13"), 10),
        "VLAN 200 across nodes"
    );
    assert!(!pings(&guests[0], ip("10.9.0.13"), 3), "VLAN 100 to 200");
    assert!(!pings(&guests[2], ip("10.9.0.12"), 3), "VLAN 200 to 100");
    assert!(
        !pings(&guests[0], ip("10.9.0.14"), 3),
        "VLAN 100 to 200 on one node"
    );

    // Tagged on the wire: node b's sub-interface of VLAN 100 receives each echo request
    // and reply's frames, VLAN 200's none of them.
    let (before100, before200) = (rx_packets(&nb, &vl100), rx_packets(&nb, &vl200));
    let count = 20;
    for _ in 0..count {
        assert!(ping(&guests[0], ip("10.9.0.12")));
    }
    let (after100, after200) = (rx_packets(&nb, &vl100), rx_packets(&nb, &vl200));
    assert!(after100 - before100 >= count, "{before100} → {after100}");
    assert!(after200 - before200 < count, "{before200} → {after200}");

    // Deleted by hand: made again.
    l.del_link(&nsa, &vl100).expect("delete by hand");
    assert!(!pings(&guests[0], ip("10.9.0.12"), 2));
    let r = converge(&ha, &ca, &snap).expect("converge");
    assert!(
        r.steps.iter().any(
            |s| matches!(&s.op, crate::plan::Op::AddVlan(_, v) if v.name == vl100 && v.id == 100)
        ),
        "{:?}",
        r.steps
    );
    assert!(pings(&guests[0], ip("10.9.0.12"), 10), "repaired");

    // The networks gone: no sub-interface or bridge left; the physical link stays.
    converge_both(&Snapshot::default());
    for ns in [&nsa, &nsb] {
        let left: Vec<String> = l
            .links(ns)
            .expect("links")
            .into_iter()
            .filter(|k| {
                ["br", "vx", "vl", "ve"]
                    .iter()
                    .any(|p| is_derived(&k.name, p))
            })
            .map(|k| k.name.to_string())
            .collect();
        assert_eq!(left, Vec::<String>::new());
        assert!(l.link(ns, &phys).expect("link").is_some(), "left alone");
    }
}
