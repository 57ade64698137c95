//! The real drivers on the real kernel, as root, in network namespaces each test makes and
//! removes (even when it fails): the conformance suites, then two "nodes" joined by a veth
//! underlay carrying a VXLAN overlay, with guests that ping each other through the node's
//! firewall and take a static lease from dnsmasq across the overlay. Only addresses the
//! tests choose, inside their own namespaces (10.50.0.0/24 on the overlay, 192.0.2.0/24 for
//! the underlay), are used.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

use super::conformance;
use super::dnsmasq::Dnsmasq;
use super::netlink::NetlinkLinks;
use super::nft::{NftFirewall, PortFilter, Protocol, Remote, Rule, Tunnel, Zone};
use super::{
    Dhcp, DhcpSpec, FdbEntry, Firewall, IfName, Ipv4Cidr, Links, MacAddr, Name, Netns, Ruleset,
    StaticLease, VXLAN_PORT, VethSpec, VxlanSpec,
};

pub(crate) fn root() -> bool {
    let root = rustix::process::geteuid().is_root();
    if !root {
        // CI runs as root: there, a test that would skip fails instead.
        assert!(
            std::env::var_os("CI").is_none(),
            "this test needs root, and CI must run it (CI is set)"
        );
        eprintln!("skipped: needs root (CI runs it as root)");
    }
    root
}

/// A prefix no other run uses: `stratus-test-<8 hex>`.
pub(crate) fn unique() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    let key = format!(
        "{nanos}-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    );
    format!("stratus-test-{}", super::names::digest_hex(&key, 8))
}

/// Deletes the namespaces it names and stops the DHCP servers it holds when dropped, then
/// removes its state directories (which hold the servers' pid files).
#[derive(Default)]
struct Cleanup {
    namespaces: Vec<Name>,
    dhcp: Vec<(Dnsmasq, Name)>,
    dirs: Vec<tempfile::TempDir>,
}

impl Cleanup {
    /// A state directory that outlives the DHCP servers using it.
    fn dir(&mut self) -> std::path::PathBuf {
        let d = tempfile::tempdir().expect("state dir");
        let path = d.path().to_owned();
        self.dirs.push(d);
        path
    }

    fn netns(&mut self, name: String) -> Name {
        let n = Name::new(&name).expect("netns name");
        self.namespaces.push(n.clone());
        n
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for (d, name) in &self.dhcp {
            if let Err(e) = d.remove(name) {
                eprintln!("cleanup: dhcp {name}: {e}");
            }
        }
        for n in &self.namespaces {
            if let Err(e) = NetlinkLinks::new().del_netns(n) {
                eprintln!("cleanup: netns {n}: {e}");
            }
        }
    }
}

fn ifname(s: &str) -> IfName {
    IfName::new(s).expect("interface name")
}

fn cidr(s: &str) -> Ipv4Cidr {
    s.parse().expect("cidr")
}

/// Runs a program in a namespace; whether it succeeded, and its output.
pub(crate) fn run_in(ns: &Name, args: &[&str]) -> (bool, String) {
    let out = Command::new("ip")
        .args(["netns", "exec", ns.as_str()])
        .args(args)
        .output()
        .expect("run ip netns exec");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

pub(crate) fn ping(from: &Name, to: Ipv4Addr) -> bool {
    run_in(
        from,
        &["busybox", "ping", "-c", "1", "-W", "1", &to.to_string()],
    )
    .0
}

/// Pings until one answer, at most `tries` times (the first may wait for ARP).
pub(crate) fn pings(from: &Name, to: Ipv4Addr, tries: u32) -> bool {
    (0..tries).any(|_| ping(from, to))
}

#[test]
fn netlink_links_pass_the_conformance_suite() {
    if !root() {
        return;
    }
    let prefix = unique();
    let mut c = Cleanup::default();
    c.netns(format!("{prefix}-a"));
    c.netns(format!("{prefix}-b"));
    conformance::links(&NetlinkLinks::new(), &prefix);
}

#[test]
fn nft_firewall_passes_the_conformance_suite() {
    if !root() {
        return;
    }
    let mut c = Cleanup::default();
    let ns = c.netns(unique());
    NetlinkLinks::new().add_netns(&ns).expect("add netns");
    conformance::firewall(&NftFirewall::new(Netns::Named(ns)));
}

/// Each rule of Stratus's tables in `ns` as (chain, handle).
fn rule_handles(ns: &Name) -> BTreeSet<(String, u64)> {
    let (ok, out) = run_in(ns, &["nft", "-j", "-a", "list", "ruleset"]);
    assert!(ok, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("nft json");
    v["nftables"]
        .as_array()
        .expect("nftables")
        .iter()
        .filter_map(|o| {
            let r = o.get("rule")?;
            Some((
                format!("{}/{}", r["family"].as_str()?, r["chain"].as_str()?),
                r["handle"].as_u64()?,
            ))
        })
        .collect()
}

/// A new namespace (removed with `c`) and the nft driver of it.
fn firewall_in_new_netns(c: &mut Cleanup) -> (Name, NftFirewall) {
    let ns = c.netns(unique());
    NetlinkLinks::new().add_netns(&ns).expect("add netns");
    let f = NftFirewall::new(Netns::Named(ns.clone()));
    (ns, f)
}

/// `rs` with one more port like its first, of id `id`, on device `ve-c3` with two addresses.
fn with_port_c3(rs: &Ruleset, id: &str) -> Ruleset {
    let mut out = rs.clone();
    let mut new = out.ports[0].clone();
    new.id = Name::new(id).expect("id");
    new.device = ifname("ve-c3");
    new.mac = "02:00:00:00:00:03".parse().expect("mac");
    new.ips = BTreeSet::from([Ipv4Addr::new(10, 0, 0, 4), Ipv4Addr::new(10, 0, 0, 5)]);
    out.ports.push(new);
    out
}

/// `nft -j list ruleset` of `ns` without rule and object handles.
fn listing(ns: &Name) -> serde_json::Value {
    let (ok, out) = run_in(ns, &["nft", "-j", "list", "ruleset"]);
    assert!(ok, "{out}");
    let mut v: serde_json::Value = serde_json::from_str(&out).expect("nft json");
    for o in v["nftables"].as_array_mut().expect("nftables") {
        for inner in o.as_object_mut().into_iter().flat_map(|m| m.values_mut()) {
            if let Some(m) = inner.as_object_mut() {
                m.remove("handle");
            }
        }
    }
    v
}

/// Loads `input` with `nft ARGS -f FILE` in `ns`.
fn load(ns: &Name, dir: &Path, args: &[&str], input: &[u8]) {
    let file = dir.join(format!("batch-{}", ns.as_str()));
    std::fs::write(&file, input).expect("write batch");
    let path = file.to_string_lossy().into_owned();
    let mut all = vec!["nft"];
    all.extend(args);
    all.push(&path);
    let (ok, out) = run_in(ns, &all);
    assert!(
        ok,
        "nft {args:?} -f of {}: {out}",
        String::from_utf8_lossy(input)
    );
}

#[test]
fn a_batch_written_as_nft_text_makes_in_the_kernel_what_its_json_makes() {
    if !root() {
        return;
    }
    let mut c = Cleanup::default();
    let dir = c.dir();
    let (by_json, _) = firewall_in_new_netns(&mut c);
    let (by_text, _) = firewall_in_new_netns(&mut c);
    let mut rs = conformance::sample_ruleset();
    // Two peers are an anonymous set; one is a value.
    rs.tunnels[0].peers.insert(Ipv4Addr::new(192, 0, 2, 3));
    let mut grown = with_port_c3(&rs, "p-two");
    grown.groups[0].members.remove(&Ipv4Addr::new(10, 0, 0, 3));
    grown.groups[0].members.insert(Ipv4Addr::new(10, 0, 0, 4));
    let delta = super::Delta::between(
        &grown.observed().expect("observed"),
        &rs.observed().expect("observed"),
    );
    let nat_ns = [&by_json, &by_text].map(|_| c.netns(unique()));
    for n in &nat_ns {
        NetlinkLinks::new().add_netns(n).expect("add netns");
    }
    let batches = [
        (
            rs.render().expect("render"),
            [&by_json, &by_text],
            Vec::new(),
        ),
        (
            grown.render_update(&delta).expect("update"),
            [&by_json, &by_text],
            grown.sets(),
        ),
        (
            conformance::sample_nat().render().expect("nat"),
            [&nat_ns[0], &nat_ns[1]],
            Vec::new(),
        ),
    ];
    for (batch, [json_ns, text_ns], sets) in batches {
        let text = super::nft_text::write(&batch, &sets).expect("written as text");
        load(
            json_ns,
            &dir,
            &["-j", "-f"],
            &super::nft::to_json(&batch).expect("json"),
        );
        load(text_ns, &dir, &["-f"], text.as_bytes());
        assert_eq!(listing(json_ns), listing(text_ns), "{text}");
    }
}

#[test]
fn an_nft_update_rewrites_only_what_differs_and_a_change_by_hand_is_read() {
    if !root() {
        return;
    }
    let mut c = Cleanup::default();
    let (ns, f) = firewall_in_new_netns(&mut c);
    let first = conformance::sample_ruleset();
    f.apply(&first).expect("apply");
    let before = rule_handles(&ns);
    // One rule of one port goes and a member leaves the remote group.
    let mut second = first.clone();
    second.ports[0].ingress.remove(0);
    second.groups[0].members.remove(&Ipv4Addr::new(10, 0, 0, 3));
    let have = f.read().expect("read").expect("tables");
    let want = second.observed().expect("observed");
    let delta = super::Delta::between(&want, &have);
    f.update(&super::Update {
        ruleset: second.clone(),
        want: want.clone(),
        delta,
    })
    .expect("update");
    let after = rule_handles(&ns);
    // Every rule outside the port's ingress chain is the same rule (same handle): nothing
    // but that chain was written.
    let untouched = |h: &BTreeSet<(String, u64)>| -> BTreeSet<(String, u64)> {
        h.iter()
            .filter(|(c, _)| c != "inet/p-one-in")
            .cloned()
            .collect()
    };
    assert_eq!(untouched(&before), untouched(&after));
    let (ok, set) = run_in(&ns, &["nft", "list", "set", "inet", "stratus", "g-one"]);
    assert!(
        ok && set.contains("10.0.0.2") && !set.contains("10.0.0.3"),
        "{set}"
    );
    assert_eq!(f.read().expect("read"), Some(want.clone()));

    // Changed by hand behind the driver's back: read sees it (the kept digest is not
    // trusted once the nf_tables generation moved).
    let (ok, out) = run_in(
        &ns,
        &[
            "nft",
            "delete",
            "element",
            "inet",
            "stratus",
            "g-one",
            "{ 10.0.0.2 }",
        ],
    );
    assert!(ok, "{out}");
    let read = f.read().expect("read").expect("tables");
    assert!(read.sets["inet/g-one"].is_empty(), "{read:?}");
    let (ok, out) = run_in(&ns, &["nft", "delete", "table", "inet", "stratus"]);
    assert!(ok, "{out}");
    let read = f.read().expect("read").expect("the bridge table is left");
    assert!(
        read.chains.keys().all(|k| k.starts_with("bridge/")),
        "{read:?}"
    );
    // Repaired by an update: the missing table, chains, rules and set come back.
    f.update(&super::Update {
        ruleset: second.clone(),
        want: want.clone(),
        delta: super::Delta::between(&want, &read),
    })
    .expect("repair");
    // As a driver with nothing kept reads the kernel.
    let fresh = NftFirewall::new(Netns::Named(ns.clone()));
    assert_eq!(fresh.read().expect("read"), Some(want));
    f.clear().expect("clear");
    assert_eq!(f.read().expect("read"), None);
    // Read from the kernel, not from what was kept: a listing after the driver cleared.
    let (ok, out) = run_in(&ns, &["nft", "list", "tables"]);
    assert!(ok && !out.contains("stratus"), "{out}");
}

#[test]
fn a_port_added_and_removed_is_set_elements_and_its_own_chains_in_the_kernel() {
    if !root() {
        return;
    }
    let mut c = Cleanup::default();
    let (ns, f) = firewall_in_new_netns(&mut c);
    let first = conformance::sample_ruleset();
    let second = with_port_c3(&first, "p-new");
    f.apply(&first).expect("apply");
    let before = rule_handles(&ns);
    // Written as an update and read back from the kernel: nothing but the new port's
    // chains and the forward chain got new rules (the whole ruleset written again would
    // give every rule a new handle).
    let step = |from: &Ruleset, to: &Ruleset| {
        let have = f.read().expect("read").expect("tables");
        assert_eq!(have, from.observed().expect("observed"));
        let want = to.observed().expect("observed");
        f.update(&super::Update {
            ruleset: to.clone(),
            want: want.clone(),
            delta: super::Delta::between(&want, &have),
        })
        .expect("update");
        let fresh = NftFirewall::new(Netns::Named(ns.clone()));
        assert_eq!(fresh.read().expect("read"), Some(want));
    };
    step(&first, &second);
    let kept = |h: &BTreeSet<(String, u64)>| -> BTreeSet<(String, u64)> {
        h.iter()
            .filter(|(c, _)| c != "inet/forward" && !c.starts_with("inet/p-new"))
            .cloned()
            .collect()
    };
    let added = rule_handles(&ns);
    assert_eq!(kept(&before), kept(&added));
    let (ok, set) = run_in(&ns, &["nft", "list", "set", "bridge", "stratus", "port-ip"]);
    assert!(
        ok && set.contains("\"ve-c3\" . 10.0.0.4") && set.contains("\"ve-c3\" . 10.0.0.5"),
        "{set}"
    );
    // Removed again: its elements go as the kernel listed them, in an update.
    step(&second, &first);
    assert_eq!(kept(&before), kept(&rule_handles(&ns)));
    for set in ["port-dev", "port-mac", "port-ip", "port-dhcp"] {
        let (ok, out) = run_in(&ns, &["nft", "list", "set", "bridge", "stratus", set]);
        assert!(
            ok && !out.contains("ve-c3") && out.contains("ve-c1"),
            "{set}: {out}"
        );
    }
    f.clear().expect("clear");
}

#[test]
fn an_nft_update_after_the_ruleset_was_flushed_behind_it_restores_the_whole_ruleset() {
    if !root() {
        return;
    }
    let mut c = Cleanup::default();
    let (ns, f) = firewall_in_new_netns(&mut c);
    let first = conformance::sample_ruleset();
    f.apply(&first).expect("apply");
    // One port's rule from a remote group goes: its chain then names nothing the flush
    // removes, so the kernel takes the one-chain batch whole.
    let mut second = first.clone();
    second.ports[0]
        .ingress
        .retain(|r| !matches!(r.remote, Remote::Group(_)));
    let want = second.observed().expect("observed");
    let full = |f: &NftFirewall| {
        // As a driver with nothing kept reads the kernel.
        let fresh = NftFirewall::new(Netns::Named(ns.clone()));
        assert_eq!(fresh.read().expect("read"), Some(want.clone()));
        // And the driver itself keeps no digest the kernel does not hold.
        assert_eq!(f.read().expect("read"), Some(want.clone()));
        let (ok, out) = run_in(&ns, &["nft", "list", "chain", "inet", "stratus", "forward"]);
        assert!(ok && out.contains("hook forward"), "{out}");
    };

    // Observed, then the ruleset flushed (`systemctl restart nftables`), then the update of
    // what differed when observed: one chain.
    let have = f.read().expect("read").expect("tables");
    let delta = super::Delta::between(&want, &have);
    assert_eq!(delta.chains.len(), 1, "{delta:?}");
    let (ok, out) = run_in(&ns, &["nft", "flush", "ruleset"]);
    assert!(ok, "{out}");
    f.update(&super::Update {
        ruleset: second.clone(),
        want: want.clone(),
        delta: delta.clone(),
    })
    .expect("update");
    full(&f);

    // The table deleted after the read was checked (the batch runs against a table gone):
    // a driver whose read was current writes the one-chain delta to a missing table, which
    // the kernel refuses, and the whole ruleset is written instead.
    f.apply(&first).expect("apply");
    let (ok, out) = run_in(&ns, &["nft", "delete", "table", "inet", "stratus"]);
    assert!(ok, "{out}");
    let late = NftFirewall::new(Netns::Named(ns.clone()));
    late.read()
        .expect("read")
        .expect("the bridge table is left");
    late.update(&super::Update {
        ruleset: second.clone(),
        want: want.clone(),
        delta,
    })
    .expect("update");
    full(&late);
    f.clear().expect("clear");
}

/// A batch through the nftables library commits in the namespace the session was opened in,
/// all or nothing: a refused batch says why in nft's words and leaves nothing of itself.
#[test]
fn the_nftables_library_commits_a_batch_whole_in_its_namespace_or_nothing() {
    if !root() {
        return;
    }
    assert!(
        super::libnft::available(),
        "libnftables.so.1 (Debian's libnftables1, which nftables depends on) is not loadable"
    );
    let mut c = Cleanup::default();
    let (ns, _) = firewall_in_new_netns(&mut c);
    let host_tables = || {
        let out = Command::new("nft")
            .args(["list", "tables"])
            .output()
            .expect("nft list tables");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    // A table name no other run uses (`stratus-test-` and hex).
    let marker = format!("t{}", unique().trim_start_matches("stratus-test-"));
    let (first, second, refused) = {
        let marker = marker.clone();
        super::netns::run_in(&Netns::Named(ns.clone()), move || {
            let mut s = super::libnft::Session::open().expect("a library session");
            let first = s.run(
                format!("add table inet {marker}\nadd chain inet {marker} c\nadd rule inet {marker} c counter accept\n")
                    .as_bytes(),
            );
            // The same session, a second batch.
            let second = s.run(format!("add rule inet {marker} c drop\n").as_bytes());
            let refused = s.run(
                format!("add table inet {marker}x\nadd rule inet {marker}x nochain accept\n")
                    .as_bytes(),
            );
            (first, second, refused)
        })
        .expect("run in the namespace")
    };
    first.expect("first batch");
    second.expect("second batch");
    let why = refused
        .expect_err("a rule into a chain that does not exist")
        .0;
    assert!(why.contains("Could not process rule"), "{why}");
    let (ok, listed) = run_in(&ns, &["nft", "list", "tables"]);
    assert!(ok, "{listed}");
    assert!(
        listed.contains(&format!("table inet {marker}\n")),
        "{listed}"
    );
    assert!(
        !listed.contains(&format!("{marker}x")),
        "half a refused batch: {listed}"
    );
    let (ok, rules) = run_in(&ns, &["nft", "list", "chain", "inet", &marker, "c"]);
    assert!(
        ok && rules.contains("accept") && rules.contains("drop"),
        "{rules}"
    );
    assert!(
        !host_tables().contains(&marker),
        "the batch reached the host's namespace"
    );
}

/// The driver's library session follows its namespace: deleted and made again under the
/// same name, the next batch lands in the new one.
#[test]
fn the_nft_driver_writes_into_a_namespace_made_again_under_its_name() {
    if !root() {
        return;
    }
    let mut c = Cleanup::default();
    let (ns, f) = firewall_in_new_netns(&mut c);
    let rs = conformance::sample_ruleset();
    f.apply(&rs).expect("apply");
    let l = NetlinkLinks::new();
    l.del_netns(&ns).expect("del netns");
    l.add_netns(&ns).expect("add netns again");
    f.apply(&rs).expect("apply in the new namespace");
    let (ok, out) = run_in(&ns, &["nft", "list", "chain", "inet", "stratus", "forward"]);
    assert!(ok && out.contains("hook forward"), "{out}");
    f.clear().expect("clear");
}

#[test]
fn nft_router_nat_passes_the_conformance_suite() {
    if !root() {
        return;
    }
    let prefix = unique();
    let mut c = Cleanup::default();
    c.netns(format!("{prefix}-r"));
    conformance::nat(
        &NftFirewall::new(Netns::Host),
        &NetlinkLinks::new(),
        &prefix,
    );
}

#[test]
fn dnsmasq_passes_the_conformance_suite_and_is_adopted() {
    if !root() {
        return;
    }
    let l = NetlinkLinks::new();
    let mut c = Cleanup::default();
    let name = unique();
    let ns = c.netns(name.clone());
    let net = Netns::Named(ns.clone());
    l.add_netns(&ns).expect("add netns");
    let (d0, d1) = (ifname("dh0"), ifname("dh1"));
    l.add_veth(
        &net,
        &VethSpec {
            name: d0.clone(),
            peer: d1.clone(),
            peer_netns: None,
        },
    )
    .expect("veth");
    for i in [&d0, &d1] {
        l.set_up(&net, i, true).expect("up");
    }
    l.add_address(&net, &d0, cidr("10.50.0.2/24"))
        .expect("address");
    let state = c.dir();
    let d = Dnsmasq::new(state.join("dhcp"));
    let server = Name::new("net-conformance").expect("name");
    c.dhcp.push((d.clone(), server.clone()));
    let spec = DhcpSpec {
        name: server.clone(),
        netns: net,
        interface: d0,
        subnet: cidr("10.50.0.0/24"),
        router: Some(Ipv4Addr::new(10, 50, 0, 1)),
        lease_secs: 600,
        routes: Vec::new(),
        leases: vec![],
    };
    conformance::dhcp(&d, &spec);

    // A new driver over the same files (an agent restarted) adopts the running daemon.
    d.ensure(&spec).expect("ensure");
    let pid = d.status(&server).expect("status").and_then(|s| s.pid);
    assert!(pid.is_some());
    let again = Dnsmasq::new(state.join("dhcp"));
    again.ensure(&spec).expect("ensure after restart");
    assert_eq!(
        again.status(&server).expect("status").and_then(|s| s.pid),
        pid
    );
}

/// One simulated node: a namespace with the underlay end, a bridge and a VXLAN device.
struct Node {
    ns: Netns,
    bridge: IfName,
    vxlan: IfName,
    underlay: Ipv4Addr,
}

fn node(l: &dyn Links, name: Name, underlay: Ipv4Addr) -> Node {
    let ns = Netns::Named(name.clone());
    let bridge = IfName::derived(super::Role::Bridge, "network-uid-1");
    let vxlan = IfName::derived(super::Role::Vxlan, "network-uid-1");
    l.add_bridge(&ns, &bridge).expect("bridge");
    l.add_vxlan(
        &ns,
        &VxlanSpec {
            name: vxlan.clone(),
            vni: 5001,
            local: underlay,
            port: VXLAN_PORT,
        },
    )
    .expect("vxlan");
    l.set_master(&ns, &vxlan, Some(&bridge))
        .expect("vxlan on bridge");
    for i in [&bridge, &vxlan] {
        l.set_up(&ns, i, true).expect("up");
    }
    Node {
        ns,
        bridge,
        vxlan,
        underlay,
    }
}

/// A namespace plugged into `node`'s bridge by a veth (`port` on the bridge, `eth0` inside),
/// with `addr` if given; its MAC.
fn plug(l: &dyn Links, node: &Node, guest: &Name, port: &IfName, addr: Option<&str>) -> MacAddr {
    let g = Netns::Named(guest.clone());
    let eth0 = ifname("eth0");
    l.add_netns(guest).expect("guest netns");
    l.add_veth(
        &node.ns,
        &VethSpec {
            name: port.clone(),
            peer: eth0.clone(),
            peer_netns: Some(g.clone()),
        },
    )
    .expect("guest veth");
    l.set_master(&node.ns, port, Some(&node.bridge))
        .expect("port on bridge");
    l.set_up(&node.ns, port, true).expect("port up");
    l.set_mtu(&g, &eth0, 1450).expect("guest mtu");
    l.set_up(&g, &eth0, true).expect("guest up");
    l.set_up(&g, &ifname("lo"), true).expect("lo up");
    if let Some(a) = addr {
        l.add_address(&g, &eth0, cidr(a)).expect("guest address");
    }
    l.link(&g, &eth0)
        .expect("link")
        .and_then(|k| k.mac)
        .expect("guest mac")
}

fn port_filter(node: &Node, port: &IfName, mac: MacAddr, ip: Ipv4Addr, icmp: bool) -> PortFilter {
    let mut ingress = vec![Rule {
        protocol: Protocol::Tcp,
        ports: Some(super::nft::PortRange {
            first: 22,
            last: 22,
        }),
        remote: Remote::Any,
    }];
    if icmp {
        ingress.push(Rule {
            protocol: Protocol::Icmp,
            ports: None,
            remote: Remote::Cidr(cidr("10.50.0.0/24")),
        });
    }
    PortFilter {
        id: Name::derived("p", port.as_str()).expect("id"),
        bridge: node.bridge.clone(),
        device: port.clone(),
        mac,
        ips: BTreeSet::from([ip]),
        dhcp_server: None,
        port_security: true,
        ingress,
        egress: vec![Rule {
            protocol: Protocol::Any,
            ports: None,
            remote: Remote::Any,
        }],
    }
}

#[test]
fn guests_on_two_nodes_talk_over_vxlan_through_the_firewall_and_get_dhcp_leases() {
    if !root() {
        return;
    }
    let l = NetlinkLinks::new();
    let prefix = unique();
    let mut c = Cleanup::default();
    let n1 = c.netns(format!("{prefix}-n1"));
    let n2 = c.netns(format!("{prefix}-n2"));
    let g1 = c.netns(format!("{prefix}-g1"));
    let g2 = c.netns(format!("{prefix}-g2"));
    let dh = c.netns(format!("{prefix}-dh"));
    let client = c.netns(format!("{prefix}-cl"));

    // The underlay: one veth between the two nodes, 192.0.2.0/24.
    for n in [&n1, &n2] {
        l.add_netns(n).expect("node netns");
    }
    let (ns1, ns2) = (Netns::Named(n1.clone()), Netns::Named(n2.clone()));
    let (u1, u2) = (ifname("underlay"), ifname("underlay"));
    l.add_veth(
        &ns1,
        &VethSpec {
            name: u1.clone(),
            peer: u2.clone(),
            peer_netns: Some(ns2.clone()),
        },
    )
    .expect("underlay veth");
    l.add_address(&ns1, &u1, cidr("192.0.2.1/24"))
        .expect("underlay address");
    l.add_address(&ns2, &u2, cidr("192.0.2.2/24"))
        .expect("underlay address");
    l.set_up(&ns1, &u1, true).expect("up");
    l.set_up(&ns2, &u2, true).expect("up");

    let node1 = node(&l, n1.clone(), Ipv4Addr::new(192, 0, 2, 1));
    let node2 = node(&l, n2.clone(), Ipv4Addr::new(192, 0, 2, 2));
    let (p1, p2) = (ifname("ve-g1"), ifname("ve-g2"));
    let mac1 = plug(&l, &node1, &g1, &p1, Some("10.50.0.11/24"));
    let mac2 = plug(&l, &node2, &g2, &p2, Some("10.50.0.12/24"));
    let (ip1, ip2) = (Ipv4Addr::new(10, 50, 0, 11), Ipv4Addr::new(10, 50, 0, 12));

    // Without FDB entries nothing crosses (no learning, no multicast).
    assert!(!ping(&g1, ip2), "no FDB, no overlay");

    // Flood to the other node, and each remote guest's MAC to its node.
    let fdb = |other: &Node, macs: &[MacAddr]| {
        let mut set = BTreeSet::from([FdbEntry {
            mac: MacAddr::ZERO,
            remote: other.underlay,
        }]);
        set.extend(macs.iter().map(|m| FdbEntry {
            mac: *m,
            remote: other.underlay,
        }));
        set
    };
    l.set_fdb(&node1.ns, &node1.vxlan, &fdb(&node2, &[mac2]))
        .expect("fdb 1");
    l.set_fdb(&node2.ns, &node2.vxlan, &fdb(&node1, &[mac1]))
        .expect("fdb 2");
    assert!(pings(&g1, ip2, 5), "guest 1 reaches guest 2 across VXLAN");
    assert!(ping(&g2, ip1), "and back");

    // Drift: the FDB emptied by hand is seen, and put back.
    let want = l.fdb(&node1.ns, &node1.vxlan).expect("fdb");
    assert!(
        run_in(
            &n1,
            &[
                "bridge",
                "fdb",
                "del",
                "00:00:00:00:00:00",
                "dev",
                node1.vxlan.as_str(),
                "dst",
                "192.0.2.2"
            ]
        )
        .0
    );
    assert_ne!(l.fdb(&node1.ns, &node1.vxlan).expect("fdb"), want);
    l.set_fdb(&node1.ns, &node1.vxlan, &want).expect("repair");
    assert_eq!(l.fdb(&node1.ns, &node1.vxlan).expect("fdb"), want);

    // Security groups on both nodes: ICMP allowed in, then not, then again.
    let fw1 = NftFirewall::new(node1.ns.clone());
    let fw2 = NftFirewall::new(node2.ns.clone());
    let rules = |node: &Node, port: &IfName, mac, ip, icmp| Ruleset {
        zones: vec![Zone {
            bridge: node.bridge.clone(),
            zone: 7,
        }],
        ports: vec![port_filter(node, port, mac, ip, icmp)],
        groups: vec![],
        local_dhcp: vec![],
        tunnels: vec![],
    };
    fw1.apply(&rules(&node1, &p1, mac1, ip1, true))
        .expect("firewall 1");
    fw2.apply(&rules(&node2, &p2, mac2, ip2, true))
        .expect("firewall 2");
    assert!(pings(&g1, ip2, 3), "ICMP allowed");
    fw2.apply(&rules(&node2, &p2, mac2, ip2, false))
        .expect("drop ICMP");
    assert!(!ping(&g1, ip2), "ICMP to guest 2 dropped");
    assert!(
        ping(&g2, ip1),
        "guest 2 still pings out: the reply belongs to its connection"
    );
    fw2.apply(&rules(&node2, &p2, mac2, ip2, true))
        .expect("allow ICMP");
    assert!(pings(&g1, ip2, 3), "ICMP allowed again");
    assert_eq!(
        fw2.read().expect("read"),
        Some(
            rules(&node2, &p2, mac2, ip2, true)
                .observed()
                .expect("observed")
        )
    );

    // Anti-spoofing: guest 1 sending from an address that is not its own gets nowhere.
    let (ok, out) = run_in(&g1, &["ip", "addr", "add", "10.50.0.99/24", "dev", "eth0"]);
    assert!(ok, "{out}");
    assert!(
        !run_in(
            &g1,
            &[
                "busybox",
                "ping",
                "-c",
                "1",
                "-W",
                "1",
                "-I",
                "10.50.0.99",
                "10.50.0.12"
            ]
        )
        .0,
        "spoofed source dropped"
    );
    assert!(ping(&g1, ip2), "its own address still works");

    // Drift in nft: a table deleted by hand reads as gone.
    assert!(run_in(&n2, &["nft", "delete", "table", "bridge", "stratus"]).0);
    assert_ne!(
        fw2.read().expect("read"),
        Some(
            rules(&node2, &p2, mac2, ip2, true)
                .observed()
                .expect("observed")
        )
    );

    // DHCP: dnsmasq on node 2 (in its own namespace on the bridge), a client on node 1.
    let dh_port = ifname("ve-dh");
    plug(&l, &node2, &dh, &dh_port, Some("10.50.0.2/24"));
    let client_port = ifname("ve-cl");
    let client_mac = plug(&l, &node1, &client, &client_port, None);
    let state = c.dir();
    let d = Dnsmasq::new(state.join("dhcp"));
    let server = Name::new("net-1").expect("name");
    c.dhcp.push((d.clone(), server.clone()));
    let mut spec = DhcpSpec {
        name: server.clone(),
        netns: Netns::Named(dh.clone()),
        interface: ifname("eth0"),
        subnet: cidr("10.50.0.0/24"),
        router: None,
        lease_secs: 600,
        routes: Vec::new(),
        leases: vec![StaticLease {
            mac: client_mac,
            ip: Ipv4Addr::new(10, 50, 0, 30),
            hostname: Some(Name::new("client").expect("name")),
        }],
    };
    d.ensure(&spec).expect("dhcp");
    assert_eq!(lease(&client, &state), Some(Ipv4Addr::new(10, 50, 0, 30)));

    // A changed lease is served after a reload, by the same process.
    let pid = d.status(&server).expect("status").and_then(|s| s.pid);
    spec.leases[0].ip = Ipv4Addr::new(10, 50, 0, 31);
    d.ensure(&spec).expect("dhcp reload");
    assert_eq!(d.status(&server).expect("status").and_then(|s| s.pid), pid);
    assert_eq!(lease(&client, &state), Some(Ipv4Addr::new(10, 50, 0, 31)));
}

/// Runs busybox's DHCP client once in `ns`; the address it was offered.
pub(crate) fn lease(ns: &Name, dir: &Path) -> Option<Ipv4Addr> {
    let script = dir.join("udhcpc.sh");
    let result = dir.join("lease");
    let _ = std::fs::remove_file(&result);
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\n[ \"$1\" = bound ] && echo \"$ip\" > '{}'\nexit 0\n",
            result.display()
        ),
    )
    .expect("write script");
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod script");
    let (ok, out) = run_in(
        ns,
        &[
            "busybox",
            "udhcpc",
            "-i",
            "eth0",
            "-n",
            "-q",
            "-f",
            // Twenty discovers a second apart: a loaded machine's dnsmasq may answer late.
            "-t",
            "20",
            "-T",
            "1",
            "-s",
            &script.to_string_lossy(),
        ],
    );
    if !ok {
        eprintln!("udhcpc: {out}");
    }
    std::fs::read_to_string(&result).ok()?.trim().parse().ok()
}

/// `node`'s ruleset with `ports` filtered, and VXLAN taken only as `tunnels` say.
fn ruleset(node: &Node, ports: Vec<PortFilter>, tunnels: Vec<Tunnel>) -> Ruleset {
    Ruleset {
        zones: vec![Zone {
            bridge: node.bridge.clone(),
            zone: 7,
        }],
        ports,
        groups: vec![],
        local_dhcp: vec![],
        tunnels,
    }
}

#[test]
fn a_guest_reaches_no_port_past_its_ingress_rules_sends_no_ipv6_and_answers_no_dhcp() {
    if !root() {
        return;
    }
    let l = NetlinkLinks::new();
    let prefix = unique();
    let mut c = Cleanup::default();
    let n1 = c.netns(format!("{prefix}-n1"));
    let g1 = c.netns(format!("{prefix}-g1"));
    let g2 = c.netns(format!("{prefix}-g2"));
    let dh = c.netns(format!("{prefix}-dh"));
    let client = c.netns(format!("{prefix}-cl"));
    l.add_netns(&n1).expect("node netns");
    let node1 = node(&l, n1.clone(), Ipv4Addr::new(192, 0, 2, 1));
    let (p1, p2, pc) = (ifname("ve-g1"), ifname("ve-g2"), ifname("ve-cl"));
    let mac1 = plug(&l, &node1, &g1, &p1, Some("10.50.0.11/24"));
    let mac2 = plug(&l, &node1, &g2, &p2, Some("10.50.0.12/24"));
    plug(&l, &node1, &dh, &ifname("ve-dh"), Some("10.50.0.2/24"));
    let client_mac = plug(&l, &node1, &client, &pc, None);
    let (ip1, ip2) = (Ipv4Addr::new(10, 50, 0, 11), Ipv4Addr::new(10, 50, 0, 12));
    let server = Ipv4Addr::new(10, 50, 0, 2);
    let fw = NftFirewall::new(node1.ns.clone());
    // Guest 1 takes ICMP from the subnet, guest 2 only TCP 22; both send anything.
    let filters = |secure1: bool, secure2: bool, secure_client: bool| {
        let mut f1 = port_filter(&node1, &p1, mac1, ip1, true);
        let mut f2 = port_filter(&node1, &p2, mac2, ip2, false);
        let mut fc = port_filter(&node1, &pc, client_mac, Ipv4Addr::new(10, 50, 0, 30), true);
        for (f, on) in [
            (&mut f1, secure1),
            (&mut f2, secure2),
            (&mut fc, secure_client),
        ] {
            f.dhcp_server = Some(server);
            f.port_security = on;
        }
        ruleset(&node1, vec![f1, f2, fc], vec![])
    };

    fw.apply(&filters(true, true, true)).expect("firewall");
    assert!(pings(&g2, ip1, 3), "guest 2 pings guest 1");
    assert!(!ping(&g1, ip2), "guest 2 takes no ICMP");

    // A unicast IPv4 packet in a broadcast frame: delivered to a port without security,
    // dropped before a filtered port whose ingress rules do not allow it.
    let (ok, out) = run_in(
        &g1,
        &[
            "ip",
            "neigh",
            "replace",
            "10.50.0.12",
            "lladdr",
            "ff:ff:ff:ff:ff:ff",
            "dev",
            "eth0",
            "nud",
            "permanent",
        ],
    );
    assert!(ok, "{out}");
    fw.apply(&filters(true, false, true)).expect("firewall");
    assert!(
        pings(&g1, ip2, 3),
        "the broadcast frame reaches an open port"
    );
    fw.apply(&filters(true, true, true)).expect("firewall");
    assert!(
        !ping(&g1, ip2),
        "the broadcast frame does not pass guest 2's ingress rules by"
    );
    assert!(run_in(&g1, &["ip", "neigh", "del", "10.50.0.12", "dev", "eth0"]).0);

    // IPv6 (which has no Stratus addresses to check) does not leave a filtered port.
    for (g, a) in [(&g1, "fd00::11/64"), (&g2, "fd00::12/64")] {
        let (ok, out) = run_in(g, &["ip", "-6", "addr", "add", a, "dev", "eth0", "nodad"]);
        assert!(ok, "{out}");
    }
    let ping6 = || {
        (0..3).any(|_| {
            run_in(
                &g1,
                &["busybox", "ping", "-6", "-c", "1", "-W", "1", "fd00::12"],
            )
            .0
        })
    };
    fw.apply(&filters(false, false, true)).expect("firewall");
    assert!(ping6(), "IPv6 between open ports");
    fw.apply(&filters(true, false, true)).expect("firewall");
    assert!(!ping6(), "no IPv6 from a filtered port");

    // A DHCP server in guest 1: its offers reach the client only with port security off.
    let state = c.dir();
    let d = Dnsmasq::new(state.join("dhcp"));
    let spec = |name: &str, ns: &Name, ip: [u8; 4]| DhcpSpec {
        name: Name::new(name).expect("name"),
        netns: Netns::Named(ns.clone()),
        interface: ifname("eth0"),
        subnet: cidr("10.50.0.0/24"),
        router: None,
        lease_secs: 600,
        routes: Vec::new(),
        leases: vec![StaticLease {
            mac: client_mac,
            ip: Ipv4Addr::from(ip),
            hostname: None,
        }],
    };
    c.dhcp.push((d.clone(), Name::new("rogue").expect("name")));
    d.ensure(&spec("rogue", &g1, [10, 50, 0, 66]))
        .expect("rogue dhcp");
    fw.apply(&filters(false, true, false)).expect("firewall");
    assert_eq!(
        lease(&client, &state),
        Some(Ipv4Addr::new(10, 50, 0, 66)),
        "without port security the guest's server answers"
    );
    fw.apply(&filters(true, true, false)).expect("firewall");
    assert_eq!(
        lease(&client, &state),
        None,
        "a DHCP server behind a filtered port is not heard"
    );
    fw.apply(&filters(false, true, true)).expect("firewall");
    assert_eq!(
        lease(&client, &state),
        None,
        "a filtered port takes DHCP replies from its network's server only"
    );
    fw.apply(&filters(true, true, true)).expect("firewall");
    // The network's server is still heard, the guest's server still running.
    c.dhcp.push((d.clone(), Name::new("net-1").expect("name")));
    d.ensure(&spec("net-1", &dh, [10, 50, 0, 30]))
        .expect("dhcp");
    assert_eq!(lease(&client, &state), Some(Ipv4Addr::new(10, 50, 0, 30)));
}

#[test]
fn vxlan_is_taken_only_from_the_networks_peers() {
    if !root() {
        return;
    }
    let l = NetlinkLinks::new();
    let prefix = unique();
    let mut c = Cleanup::default();
    let n2 = c.netns(format!("{prefix}-n2"));
    let n3 = c.netns(format!("{prefix}-n3"));
    let g2 = c.netns(format!("{prefix}-g2"));
    let g3 = c.netns(format!("{prefix}-g3"));
    for n in [&n2, &n3] {
        l.add_netns(n).expect("node netns");
    }
    // Node 3 is any host on node 2's underlay.
    let (ns2, ns3) = (Netns::Named(n2.clone()), Netns::Named(n3.clone()));
    let u = ifname("underlay");
    l.add_veth(
        &ns2,
        &VethSpec {
            name: u.clone(),
            peer: u.clone(),
            peer_netns: Some(ns3.clone()),
        },
    )
    .expect("underlay veth");
    l.add_address(&ns2, &u, cidr("192.0.2.2/24"))
        .expect("underlay address");
    l.add_address(&ns3, &u, cidr("192.0.2.3/24"))
        .expect("underlay address");
    l.set_up(&ns2, &u, true).expect("up");
    l.set_up(&ns3, &u, true).expect("up");
    let node2 = node(&l, n2.clone(), Ipv4Addr::new(192, 0, 2, 2));
    let node3 = node(&l, n3.clone(), Ipv4Addr::new(192, 0, 2, 3));
    plug(&l, &node2, &g2, &ifname("ve-g2"), Some("10.50.0.12/24"));
    plug(&l, &node3, &g3, &ifname("ve-g3"), Some("10.50.0.66/24"));
    // Both flood to each other: only the firewall stands between them.
    let flood = |remote: [u8; 4]| {
        BTreeSet::from([FdbEntry {
            mac: MacAddr::ZERO,
            remote: Ipv4Addr::from(remote),
        }])
    };
    l.set_fdb(&node2.ns, &node2.vxlan, &flood([192, 0, 2, 3]))
        .expect("fdb");
    l.set_fdb(&node3.ns, &node3.vxlan, &flood([192, 0, 2, 2]))
        .expect("fdb");
    let g2_ip = Ipv4Addr::new(10, 50, 0, 12);
    assert!(pings(&g3, g2_ip, 5), "unfiltered, node 3's frames arrive");

    let fw = NftFirewall::new(node2.ns.clone());
    let tunnel = |vni: u32, peers: &[[u8; 4]]| Tunnel {
        vni,
        port: VXLAN_PORT,
        peers: peers.iter().map(|p| Ipv4Addr::from(*p)).collect(),
    };
    fw.apply(&ruleset(
        &node2,
        vec![],
        vec![tunnel(5001, &[[192, 0, 2, 1]])],
    ))
    .expect("firewall");
    assert!(!ping(&g3, g2_ip), "a host that is no peer is not heard");
    fw.apply(&ruleset(
        &node2,
        vec![],
        vec![
            tunnel(5001, &[[192, 0, 2, 1]]),
            tunnel(5002, &[[192, 0, 2, 3]]),
        ],
    ))
    .expect("firewall");
    assert!(
        !ping(&g3, g2_ip),
        "a peer of another network is not heard on this one"
    );
    fw.apply(&ruleset(
        &node2,
        vec![],
        vec![tunnel(5001, &[[192, 0, 2, 1], [192, 0, 2, 3]])],
    ))
    .expect("firewall");
    assert!(pings(&g3, g2_ip, 3), "a peer of the network is heard");
}

/// A namespace deleted behind the driver's back is let go once the driver lists the
/// namespaces: the kept netlink connection no longer holds it (and the devices in it)
/// alive, so a veth into it goes with it, as without the driver.
#[test]
fn a_namespace_deleted_by_hand_is_not_held_alive_by_the_drivers_connection() {
    if !root() {
        return;
    }
    let prefix = unique();
    let mut c = Cleanup::default();
    let (a, x) = (
        c.netns(format!("{prefix}-a")),
        c.netns(format!("{prefix}-x")),
    );
    let l = NetlinkLinks::new();
    l.add_netns(&a).expect("netns a");
    l.add_netns(&x).expect("netns x");
    let (na, nx) = (Netns::Named(a.clone()), Netns::Named(x.clone()));
    l.add_veth(
        &na,
        &VethSpec {
            name: ifname("vz-a"),
            peer: ifname("vz-x"),
            peer_netns: Some(nx.clone()),
        },
    )
    .expect("veth");
    assert!(l.link(&nx, &ifname("vz-x")).expect("link").is_some());
    let out = Command::new("ip")
        .args(["netns", "del", x.as_str()])
        .output()
        .expect("ip netns del");
    assert!(out.status.success());
    assert!(!l.list_netns().expect("list").contains(&x));
    // (Generous: the kernel tears the namespace down in the background, slower when loaded.)
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while l.link(&na, &ifname("vz-a")).expect("link").is_some() {
        assert!(
            std::time::Instant::now() < deadline,
            "the veth into the deleted namespace is still there"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}
