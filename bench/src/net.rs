//! The networking benchmarks, each beside its reference in the same run: a security-group
//! change through the API until it is live in the node's nftables vs the same change made
//! with `nft`; the network agent converging a fresh node of many ports vs `nft -f` and
//! `ip -batch` of the same state; TCP across the agent's overlay vs a hand-built bridge and
//! VXLAN pair. The agents are the `stratus-network-agent` library with its real drivers
//! (netlink, `nft`, dnsmasq) on network namespaces the benchmark makes and removes.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use stratus_api_types::compute::Hypervisor;
use stratus_api_types::network::{Network, Port, SecurityGroup, Subnet};
use stratus_network_agent::driver::dnsmasq::Dnsmasq;
use stratus_network_agent::driver::netlink::NetlinkLinks;
use stratus_network_agent::driver::nft::NftFirewall;
use stratus_network_agent::driver::{LinkKind, Links, Name, Netns, netns};

use crate::{drive, ms, stack};

/// The project the benchmarks' objects live in.
const NS: &str = "netbench";

// ---------------------------------------------------------------------------------------
// Host helpers.

/// Runs `ip` with `args`; its standard output.
fn ip(args: &[&str]) -> Result<String> {
    let out = Command::new("ip").args(args).output().context("run ip")?;
    ensure!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `ip [-n NS] -batch FILE` with `lines` as the file.
fn ip_batch(netns: Option<&str>, lines: &str, dir: &Path) -> Result<()> {
    let file = dir.join("ip.batch");
    std::fs::write(&file, lines)?;
    let mut cmd = Command::new("ip");
    if let Some(n) = netns {
        cmd.args(["-n", n]);
    }
    let out = cmd
        .arg("-batch")
        .arg(&file)
        .output()
        .context("run ip -batch")?;
    ensure!(
        out.status.success(),
        "ip -batch: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// Runs `program args` inside namespace `ns` (`ip netns exec`, as the agent's drivers do);
/// its standard output.
fn exec_in(ns: &str, program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, program])
        .args(args)
        .output()
        .with_context(|| format!("run {program} in {ns}"))?;
    ensure!(
        out.status.success(),
        "{program} {args:?} in {ns}: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn named(ns: &str) -> Result<Netns> {
    Ok(Netns::Named(Name::new(ns)?))
}

/// Everything a benchmark made on the host, removed when dropped (also on error): DHCP
/// servers (found by their pid files under `dhcp_dirs`, each in a namespace named as its
/// directory), child processes, then namespaces (which takes their links and nft tables).
#[derive(Default)]
struct Cleanup {
    namespaces: Vec<String>,
    dhcp_dirs: Vec<PathBuf>,
    children: Vec<Child>,
    /// Nodes whose agents may have made DHCP namespaces (found by name, also those whose
    /// server never started).
    nodes: Vec<String>,
}

impl Cleanup {
    fn netns(&mut self, name: &str) -> Result<()> {
        ip(&["netns", "add", name])?;
        self.namespaces.push(name.to_owned());
        ip(&["-n", name, "link", "set", "lo", "up"])?;
        Ok(())
    }

    /// Stops the DHCP servers under `dir` and deletes their namespaces.
    fn stop_dhcp(dir: &Path) {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            if let Ok(pid) = std::fs::read_to_string(e.path().join("pid")) {
                let _ = Command::new("kill").arg(pid.trim()).status();
            }
            let _ = ip(&["netns", "del", &e.file_name().to_string_lossy()]);
            let _ = std::fs::remove_dir_all(e.path());
        }
    }

    /// Deletes the DHCP namespaces the agent of `node` names as its own.
    fn drop_dhcp_netns(node: &str) {
        let list = ip(&["netns", "list"]).unwrap_or_default();
        for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
            if Name::new(name).is_ok_and(|n| stratus_network_agent::plan::is_dhcp_name_of(node, &n))
            {
                let _ = ip(&["netns", "del", name]);
            }
        }
    }

    /// Deletes one namespace now.
    fn drop_netns(&mut self, name: &str) {
        let _ = ip(&["netns", "del", name]);
        self.namespaces.retain(|n| n != name);
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for dir in &self.dhcp_dirs {
            Self::stop_dhcp(dir);
        }
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        for n in &self.namespaces {
            let _ = ip(&["netns", "del", n]);
        }
        for node in &self.nodes {
            Self::drop_dhcp_netns(node);
        }
    }
}

/// The network agent of one node, in this process, with its real drivers; stopped when
/// dropped.
struct Agent(tokio::task::JoinHandle<()>);

impl Agent {
    fn start(
        client: &kube::Client,
        node: &str,
        ns: &str,
        underlay: Ipv4Addr,
        dhcp_dir: &Path,
        resync: Duration,
    ) -> Result<Self> {
        let netns = named(ns)?;
        let host = stratus_network_agent::Host {
            links: Arc::new(NetlinkLinks::new()),
            firewall: Arc::new(NftFirewall::new(netns.clone())),
            dhcp: Arc::new(Dnsmasq::new(dhcp_dir)),
        };
        let config = stratus_network_agent::Config {
            node: stratus_network_agent::desired::NodeConfig {
                node: node.to_owned(),
                netns,
                underlay: Some(underlay),
                physical: Default::default(),
            },
            resync,
        };
        Ok(Self(tokio::spawn(stratus_network_agent::run(
            client.clone(),
            host,
            config,
        ))))
    }

    /// Stops the agent and waits for a converge it had under way on the blocking pool (which
    /// an abort does not end) to finish: until this process uses under a tenth of a core
    /// for a second, at most three minutes.
    async fn stop(self) {
        self.0.abort();
        let deadline = Instant::now() + Duration::from_secs(180);
        while Instant::now() < deadline {
            let before = crate::cpu("self");
            tokio::time::sleep(Duration::from_secs(1)).await;
            if crate::cpu("self").saturating_sub(before) < Duration::from_millis(100) {
                break;
            }
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Reads the nf_tables generation of one namespace over netlink (`NFT_MSG_GETGEN`): every
/// committed nft transaction raises it, so a change of it says a batch is live in the
/// kernel. One small request and answer; no listing of the ruleset.
struct Generation(rtnetlink::sys::Socket);

impl Generation {
    fn open(ns: &str) -> Result<Self> {
        Ok(Self(socket_in(
            ns,
            rtnetlink::sys::protocols::NETLINK_NETFILTER,
        )?))
    }

    fn read(&self) -> Result<u32> {
        // nlmsghdr (len, type = NFNL_SUBSYS_NFTABLES << 8 | NFT_MSG_GETGEN, NLM_F_REQUEST,
        // seq, pid) and nfgenmsg (AF_UNSPEC, version 0, res_id 0).
        let mut req = Vec::with_capacity(20);
        req.extend_from_slice(&20u32.to_ne_bytes());
        req.extend_from_slice(&((10u16 << 8) | 16).to_ne_bytes());
        req.extend_from_slice(&1u16.to_ne_bytes());
        req.extend_from_slice(&[0; 8]);
        req.extend_from_slice(&[0; 4]);
        self.0.send(&req, 0)?;
        let (buf, _) = self.0.recv_from_full()?;
        // NFT_MSG_NEWGEN's attributes after the 16-byte header and 4-byte nfgenmsg;
        // NFTA_GEN_ID (1) is a big-endian u32.
        match attribute(&buf, 20, 1) {
            Some(&[a, b, c, d, ..]) => Ok(u32::from_be_bytes([a, b, c, d])),
            _ => bail!("no generation in the kernel's answer ({} bytes)", buf.len()),
        }
    }

    /// Polls every `every` until the generation differs from `from`; the new one.
    fn changed_from(&self, from: u32, every: Duration, limit: Duration) -> Result<u32> {
        let deadline = Instant::now() + limit;
        loop {
            let g = self.read()?;
            if g != from {
                return Ok(g);
            }
            ensure!(Instant::now() < deadline, "no nft change within {limit:?}");
            std::thread::sleep(every);
        }
    }
}

/// One link of a namespace read by name over rtnetlink (`RTM_GETLINK` with `IFLA_IFNAME`):
/// one small request and answer, where a listing of every link takes the kernel's RTNL
/// lock, which the agent's link changes wait for, for as long as it dumps 1,000 links.
struct LinkProbe(rtnetlink::sys::Socket);

impl LinkProbe {
    fn open(ns: &str) -> Result<Self> {
        Ok(Self(socket_in(
            ns,
            rtnetlink::sys::protocols::NETLINK_ROUTE,
        )?))
    }

    /// Whether link `name` is up and has a master (is on a bridge).
    fn up_on_a_bridge(&self, name: &str) -> Result<bool> {
        // IFLA_IFNAME (3): the name and its NUL, padded to 4 bytes.
        let attr_len = 4 + name.len() + 1;
        let len = 16 + 16 + attr_len.div_ceil(4) * 4;
        let mut req = Vec::with_capacity(len);
        // nlmsghdr: len, RTM_GETLINK (18), NLM_F_REQUEST, seq, pid.
        req.extend_from_slice(&u32::try_from(len)?.to_ne_bytes());
        req.extend_from_slice(&18u16.to_ne_bytes());
        req.extend_from_slice(&1u16.to_ne_bytes());
        req.extend_from_slice(&[0; 8]);
        // ifinfomsg: family, type, index, flags, change: all 0.
        req.extend_from_slice(&[0; 16]);
        req.extend_from_slice(&u16::try_from(attr_len)?.to_ne_bytes());
        req.extend_from_slice(&3u16.to_ne_bytes());
        req.extend_from_slice(name.as_bytes());
        req.resize(len, 0);
        self.0.send(&req, 0)?;
        let (buf, _) = self.0.recv_from_full()?;
        // RTM_NEWLINK (16) answers; anything else (an error: no such link) is "no".
        if buf.len() < 32 || u16::from_ne_bytes([buf[4], buf[5]]) != 16 {
            return Ok(false);
        }
        // IFF_UP is bit 0 of ifinfomsg's flags; IFLA_MASTER (10) says it has a master.
        let up = u32::from_ne_bytes([buf[24], buf[25], buf[26], buf[27]]) & 1 == 1;
        Ok(up && attribute(&buf, 32, 10).is_some())
    }
}

/// A netlink socket of `protocol` in namespace `ns`.
fn socket_in(ns: &str, protocol: isize) -> Result<rtnetlink::sys::Socket> {
    Ok(netns::run_in(&named(ns)?, move || {
        rtnetlink::sys::Socket::new(protocol)
    })??)
}

/// The payload of the first netlink attribute of type `kind` in `buf` from offset `at`.
fn attribute(buf: &[u8], mut at: usize, kind: u16) -> Option<&[u8]> {
    while at + 4 <= buf.len() {
        let len = usize::from(u16::from_ne_bytes([buf[at], buf[at + 1]]));
        let k = u16::from_ne_bytes([buf[at + 2], buf[at + 3]]) & 0x3fff;
        if len < 4 || at + len > buf.len() {
            return None;
        }
        if k == kind {
            return Some(&buf[at + 4..at + len]);
        }
        at += (len + 3) & !3;
    }
    None
}

/// Percentile `q` of sorted `v`.
pub(crate) fn pct(v: &[Duration], q: f64) -> Duration {
    v.get(((v.len() as f64 * q) as usize).min(v.len().saturating_sub(1)))
        .copied()
        .unwrap_or_default()
}

pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

pub(crate) fn load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

// ---------------------------------------------------------------------------------------
// API objects.

struct Apis {
    nets: Api<Network>,
    subnets: Api<Subnet>,
    ports: Api<Port>,
    groups: Api<SecurityGroup>,
    hvs: Api<Hypervisor>,
}

impl Apis {
    fn new(client: &kube::Client) -> Self {
        Self {
            nets: Api::namespaced(client.clone(), NS),
            subnets: Api::namespaced(client.clone(), NS),
            ports: Api::namespaced(client.clone(), NS),
            groups: Api::namespaced(client.clone(), NS),
            hvs: Api::all(client.clone()),
        }
    }
}

/// The project, one VXLAN network `net` with subnet `cidr` (gateway `.1`), ready for ports.
async fn network(client: &kube::Client, cidr: &str, gateway: &str) -> Result<Apis> {
    let req = crate::req(
        "POST",
        "/apis/identity.stratus.dev/v1/projects",
        "application/json",
        json!({"apiVersion": "identity.stratus.dev/v1", "kind": "Project", "metadata": {"name": NS}, "spec": {}}).to_string().into_bytes(),
    )?;
    client.request::<Value>(req).await?;
    let a = Apis::new(client);
    let pp = PostParams::default();
    a.nets
        .create(&pp, &serde_json::from_value(json!({"apiVersion": "network.stratus.dev/v1", "kind": "Network", "metadata": {"name": "net"}, "spec": {}}))?)
        .await?;
    a.subnets
        .create(&pp, &serde_json::from_value(json!({"apiVersion": "network.stratus.dev/v1", "kind": "Subnet", "metadata": {"name": "sn"}, "spec": {"network": "net", "cidr": cidr, "gatewayIP": gateway}}))?)
        .await?;
    let n = a.nets.get("net").await?;
    if n.status.as_ref().and_then(|s| s.vni).is_none() {
        a.nets
            .patch_status(
                "net",
                &PatchParams::default(),
                &Patch::Merge(json!({"status": {"vni": 7001}})),
            )
            .await?;
    }
    Ok(a)
}

/// Creates port `name` in `groups`, placed on `node` with device `device`; its MAC and
/// address (IPAM's, or `mac`/`addr` where IPAM left them out).
async fn port(
    a: &Apis,
    name: &str,
    groups: &[&str],
    node: &str,
    device: &str,
    fallback: (String, Ipv4Addr),
) -> Result<(String, Ipv4Addr)> {
    port_on(a, ("net", "sn"), name, groups, node, device, fallback).await
}

/// [`port`] on network and subnet `on`.
async fn port_on(
    a: &Apis,
    on: (&str, &str),
    name: &str,
    groups: &[&str],
    node: &str,
    device: &str,
    fallback: (String, Ipv4Addr),
) -> Result<(String, Ipv4Addr)> {
    let (net, subnet) = on;
    let p = a
        .ports
        .create(&PostParams::default(), &serde_json::from_value(json!({"apiVersion": "network.stratus.dev/v1", "kind": "Port", "metadata": {"name": name}, "spec": {"network": net, "securityGroups": groups}}))?)
        .await
        .with_context(|| format!("create port {name}"))?;
    let st = p.status.unwrap_or_default();
    let mut status = json!({"hypervisor": node, "interfaceName": device});
    let mac = match st.mac_address {
        Some(m) => m,
        None => {
            status["macAddress"] = json!(fallback.0);
            fallback.0.clone()
        }
    };
    let addr = match st.fixed_ips.first() {
        Some(f) => f.ip_address.parse()?,
        None => {
            status["fixedIPs"] = json!([{"subnet": subnet, "ipAddress": fallback.1.to_string()}]);
            fallback.1
        }
    };
    a.ports
        .patch_status(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": status})),
        )
        .await
        .with_context(|| format!("place port {name}"))?;
    Ok((mac, addr))
}

/// Until every port in the project is `Active`.
async fn all_active(a: &Apis, n: usize, limit: Duration) -> Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        let list = a.ports.list(&Default::default()).await?;
        let active = list
            .items
            .iter()
            .filter(|p| {
                p.status
                    .as_ref()
                    .is_some_and(|s| format!("{:?}", s.phase) == "Active")
            })
            .count();
        if active >= n {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "only {active} of {n} ports Active after {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The number of rules in namespace `ns`'s nftables.
fn nft_rules(ns: &str) -> Result<usize> {
    let v: Value = serde_json::from_str(&exec_in(ns, "nft", &["-j", "list", "ruleset"])?)?;
    Ok(v["nftables"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|o| o.get("rule").is_some())
        .count())
}

/// The rules of chain `chain` of `inet stratus` in `ns`.
fn chain_rules(ns: &str, chain: &str) -> Result<usize> {
    let v: Value = serde_json::from_str(&exec_in(
        ns,
        "nft",
        &["-j", "list", "chain", "inet", "stratus", chain],
    )?)?;
    Ok(v["nftables"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|o| o.get("rule").is_some())
        .count())
}

fn mac_of(i: usize) -> String {
    format!(
        "02:5b:{:02x}:{:02x}:{:02x}:01",
        (i >> 16) & 0xff,
        (i >> 8) & 0xff,
        i & 0xff
    )
}

// ---------------------------------------------------------------------------------------
// 1. A security-group change with many rules present.

/// One group's rules: `rules` TCP ports, each from its own /32.
pub(crate) fn group_rules(g: usize, rules: usize) -> Vec<Value> {
    (0..rules)
        .map(|j| {
            json!({"direction": "ingress", "protocol": "tcp", "portRangeMin": 1000 + j, "portRangeMax": 1000 + j,
                   "remoteIPPrefix": format!("10.{}.{}.{}/32", 100 + g / 250, g % 250, j % 250 + 1)})
        })
        .collect()
}

/// Security-group change → live in the kernel, through the API and the agent vs `nft`.
pub async fn sg(ports: usize, rules: usize, changes: usize, rounds: usize) -> Result<()> {
    let s = stack().await?;
    let tag = std::process::id();
    let node = format!("nb{tag}-sg");
    let dir = tempfile::tempdir()?;
    let dhcp_dir = dir.path().join("dhcp");
    let mut host = Cleanup::default();
    host.dhcp_dirs = vec![dhcp_dir.clone()];
    host.nodes = vec![node.clone()];
    host.netns(&node)?;
    let a = network(&s.client, "10.80.0.0/16", "10.80.0.1").await?;
    let pp = PostParams::default();
    for g in 0..ports {
        a.groups
            .create(&pp, &serde_json::from_value(json!({"apiVersion": "network.stratus.dev/v1", "kind": "SecurityGroup", "metadata": {"name": format!("g{g}")}, "spec": {"rules": group_rules(g, rules)}}))?)
            .await
            .with_context(|| format!("create group g{g}"))?;
    }
    let mut batch = String::new();
    for i in 0..ports {
        batch.push_str(&format!("tuntap add dev tb{i} mode tap\n"));
    }
    ip_batch(Some(&node), &batch, dir.path())?;
    let mut chains = Vec::new();
    for i in 0..ports {
        let fallback = (
            mac_of(i),
            Ipv4Addr::new(10, 80, (i / 250) as u8, (i % 250 + 2) as u8),
        );
        port(
            &a,
            &format!("p{i}"),
            &[&format!("g{i}")],
            &node,
            &format!("tb{i}"),
            fallback,
        )
        .await?;
        let uid = a
            .ports
            .get(&format!("p{i}"))
            .await?
            .metadata
            .uid
            .unwrap_or_default();
        chains.push(format!("{}-in", Name::derived("p", &uid)?));
    }
    let resync = Duration::from_secs(2);
    let underlay = Ipv4Addr::new(192, 0, 2, 1);
    let mut agent = Some(Agent::start(
        &s.client, &node, &node, underlay, &dhcp_dir, resync,
    )?);
    all_active(&a, ports, Duration::from_secs(600)).await?;
    let total = nft_rules(&node)?;
    eprintln!("{ports} ports, {rules} rules per port's group: {total} nft rules on the node");
    let gen_ = Arc::new(Generation::open(&node)?);
    // The rules of a port's ingress chain: its group's and the agent's own (DHCP, drop).
    let base = chain_rules(&node, &chains[0])?;

    let per_round = changes.div_ceil(rounds.max(1));
    let (mut api_lat, mut raw_lat) = (Vec::new(), Vec::new());
    let mut done = 0;
    for round in 0..rounds {
        let n = per_round.min(changes - done);
        let api_first = round % 2 == 0;
        for phase in 0..2 {
            if (phase == 0) == api_first {
                let ag = match agent.take() {
                    Some(ag) => ag,
                    None => {
                        let ag =
                            Agent::start(&s.client, &node, &node, underlay, &dhcp_dir, resync)?;
                        // Restarted on a node that is already right: let it list and converge.
                        tokio::time::sleep(Duration::from_secs(5)).await;
                        ag
                    }
                };
                for k in done..done + n {
                    let g = k % ports;
                    for add in [true, false] {
                        let patch = if add {
                            json!([{"op": "add", "path": "/spec/rules/-", "value":
                                {"direction": "ingress", "protocol": "tcp", "portRangeMin": 40000 + k % 20000, "portRangeMax": 40000 + k % 20000, "remoteIPPrefix": "203.0.113.0/24"}}])
                        } else {
                            json!([{"op": "remove", "path": format!("/spec/rules/{rules}")}])
                        };
                        let want = base + usize::from(add);
                        let chain = chains[g].clone();
                        let (g2, node2) = (gen_.clone(), node.clone());
                        let before = g2.read()?;
                        let t = Instant::now();
                        let req = crate::req(
                            "PATCH",
                            &format!(
                                "/apis/network.stratus.dev/v1/namespaces/{NS}/securitygroups/g{g}"
                            ),
                            "application/json-patch+json",
                            patch.to_string().into_bytes(),
                        )?;
                        s.client.request::<Value>(req).await?;
                        let d = tokio::task::spawn_blocking(move || {
                            live(&g2, before, t, &node2, &chain, want)
                        })
                        .await??;
                        eprintln!(
                            "change {k} ({}): {} ms through the API",
                            if add { "add" } else { "remove" },
                            ms(d)
                        );
                        api_lat.push(d);
                    }
                }
                ag.stop().await;
            } else {
                for k in done..done + n {
                    let g = k % ports;
                    let (g2, node2, chain) = (gen_.clone(), node.clone(), chains[g].clone());
                    let (d_add, d_del) = tokio::task::spawn_blocking(move || {
                        raw_change(&g2, &node2, &chain, k, base)
                    })
                    .await??;
                    raw_lat.push(d_add);
                    raw_lat.push(d_del);
                }
            }
        }
        done += n;
    }
    let total_after = nft_rules(&node)?;
    drop(agent);
    api_lat.sort();
    raw_lat.sort();
    println!(
        "| {ports} ports × {rules} rules ({total} nft rules) | changes | p50 (ms) | p99 (ms) | max (ms) |"
    );
    println!("|---|---|---|---|---|");
    for (label, v) in [
        (
            "raw: `nft -f` of the rule insert / `nft delete rule` (ip netns exec)",
            &raw_lat,
        ),
        (
            "Stratus: JSON patch of the SecurityGroup → agent → live in the kernel",
            &api_lat,
        ),
    ] {
        println!(
            "| {label} | {} | {} | {} | {} |",
            v.len(),
            ms(pct(v, 0.5)),
            ms(pct(v, 0.99)),
            ms(v.last().copied().unwrap_or_default())
        );
    }
    println!();
    println!(
        "p50 Stratus/raw: {:.1}x; p99 Stratus/raw: {:.1}x; nft rules before/after: {total}/{total_after}; load average at the end: {}",
        pct(&api_lat, 0.5).as_secs_f64() / pct(&raw_lat, 0.5).as_secs_f64(),
        pct(&api_lat, 0.99).as_secs_f64() / pct(&raw_lat, 0.99).as_secs_f64(),
        load()
    );
    ensure!(
        total_after == total,
        "the benchmark left the ruleset changed"
    );
    Ok(())
}

/// Waits until the nft generation moves past `before` with chain `chain` holding `want`
/// rules; the time since `t` at the generation change that made it so. The probe reads
/// the generation (one netlink request) every 200 µs; the chain is listed only after a
/// change, outside the time reported for it.
fn live(
    g: &Generation,
    mut before: u32,
    t: Instant,
    ns: &str,
    chain: &str,
    want: usize,
) -> Result<Duration> {
    loop {
        before = g.changed_from(before, Duration::from_micros(200), Duration::from_secs(60))?;
        let at = t.elapsed();
        if chain_rules(ns, chain)? == want {
            return Ok(at);
        }
    }
}

/// The same change by hand: one rule inserted into the port's chain by `nft -f`, then
/// deleted by its handle; each timed to its generation change.
fn raw_change(
    g: &Generation,
    ns: &str,
    chain: &str,
    k: usize,
    base: usize,
) -> Result<(Duration, Duration)> {
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("change.nft");
    std::fs::write(
        &file,
        format!(
            "insert rule inet stratus {chain} meta nfproto ipv4 ip saddr 203.0.113.0/24 tcp dport {} return\n",
            40000 + k % 20000
        ),
    )?;
    let file = file.to_string_lossy().into_owned();
    let before = g.read()?;
    let t = Instant::now();
    let out = exec_in(ns, "nft", &["--echo", "--handle", "-f", &file])?;
    g.changed_from(before, Duration::from_micros(200), Duration::from_secs(60))?;
    let d_add = t.elapsed();
    ensure!(
        chain_rules(ns, chain)? == base + 1,
        "the raw rule is not in {chain}"
    );
    let handle: String = out
        .split("# handle ")
        .nth(1)
        .map(|h| h.chars().take_while(char::is_ascii_digit).collect())
        .filter(|h: &String| !h.is_empty())
        .with_context(|| format!("no handle in nft's echo: {out}"))?;
    let before = g.read()?;
    let t = Instant::now();
    exec_in(
        ns,
        "nft",
        &[
            "delete", "rule", "inet", "stratus", chain, "handle", &handle,
        ],
    )?;
    g.changed_from(before, Duration::from_micros(200), Duration::from_secs(60))?;
    let d_del = t.elapsed();
    ensure!(
        chain_rules(ns, chain)? == base,
        "the raw rule is still in {chain}"
    );
    Ok((d_add, d_del))
}

// ---------------------------------------------------------------------------------------
// 2. Convergence of a fresh node with many ports.

/// Makes `ports` taps `tc0…` in namespace `ns`.
fn taps(ns: &str, ports: usize, dir: &Path) -> Result<()> {
    let mut batch = String::new();
    for i in 0..ports {
        batch.push_str(&format!("tuntap add dev tc{i} mode tap\n"));
    }
    ip_batch(Some(ns), &batch, dir)
}

/// What the agent made in a node, read back to hand-write the same state.
struct Made {
    bridge: String,
    vxlan: String,
    vni: u32,
    mtu: u32,
    veth: String,
    peer: String,
    /// Every IPv4 address of the DHCP server's interface (`ADDR/LEN`), as the agent gave them.
    dhcp_addrs: Vec<String>,
    ruleset: String,
    hosts: String,
    dhcp_args: Vec<String>,
}

/// Whether node `ns` has what the agent makes for `ports` taps: all on one bridge and up,
/// the bridge's VXLAN device, the nft table, the DHCP server running.
/// `firewall_at` and `taps_at` are set to `since.elapsed()` the first time the generation
/// is seen moved and every tap is seen wired.
fn converged(
    links: &NetlinkLinks,
    ns: &Netns,
    ports: usize,
    dhcp_dir: &Path,
    firewall: (&Generation, u32),
    (since, firewall_at, taps_at): (Instant, &mut Option<Duration>, &mut Option<Duration>),
) -> Result<bool> {
    if firewall.0.read()? == firewall.1 {
        return Ok(false);
    }
    firewall_at.get_or_insert_with(|| since.elapsed());
    let all = links.links(ns)?;
    let bridge = all.iter().find(|l| l.kind == LinkKind::Bridge && l.up);
    let Some(bridge) = bridge else {
        return Ok(false);
    };
    let on =
        |l: &&stratus_network_agent::driver::Link| l.up && l.master.as_ref() == Some(&bridge.name);
    let taps = all
        .iter()
        .filter(|l| l.name.as_str().starts_with("tc") && on(l))
        .count();
    let vxlan = all
        .iter()
        .any(|l| matches!(l.kind, LinkKind::Vxlan(_)) && on(&l));
    if taps < ports || !vxlan {
        return Ok(false);
    }
    taps_at.get_or_insert_with(|| since.elapsed());
    // The DHCP server: a pid file naming a live process.
    let dhcp = std::fs::read_dir(dhcp_dir)
        .into_iter()
        .flatten()
        .flatten()
        .any(|e| {
            std::fs::read_to_string(e.path().join("pid"))
                .is_ok_and(|p| Path::new(&format!("/proc/{}", p.trim())).exists())
        });
    Ok(dhcp)
}

/// Agent convergence of a fresh node with many ports vs `nft -f` + `ip -batch` of the same
/// state.
pub async fn converge(ports: usize, rounds: usize) -> Result<()> {
    let s = stack().await?;
    let tag = std::process::id();
    let node = format!("nb{tag}-node");
    let dir = tempfile::tempdir()?;
    let mut host = Cleanup::default();
    host.nodes = vec![node.clone()];
    let a = network(&s.client, "10.81.0.0/16", "10.81.0.1").await?;
    a.groups
        .create(&PostParams::default(), &serde_json::from_value(json!({"apiVersion": "network.stratus.dev/v1", "kind": "SecurityGroup", "metadata": {"name": "default"},
            "spec": {"rules": [{"direction": "ingress", "protocol": "icmp", "remoteGroup": "default"},
                               {"direction": "ingress", "protocol": "tcp", "portRangeMin": 22, "portRangeMax": 22},
                               {"direction": "egress"}]}}))?)
        .await?;
    let t = Instant::now();
    let a = Arc::new(a);
    let (a2, node2) = (a.clone(), node.clone());
    drive(ports, 16, move |i| {
        let (a, node) = (a2.clone(), node2.clone());
        async move {
            let fallback = (
                mac_of(i),
                Ipv4Addr::new(10, 81, (i / 250) as u8, (i % 250 + 2) as u8),
            );
            port(
                &a,
                &format!("p{i}"),
                &["default"],
                &node,
                &format!("tc{i}"),
                fallback,
            )
            .await?;
            Ok(())
        }
    })
    .await?;
    eprintln!(
        "{ports} ports created and placed in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let underlay = Ipv4Addr::new(192, 0, 2, 1);
    let links = Arc::new(NetlinkLinks::new());
    let mut made: Option<Made> = None;
    let (mut agent_t, mut raw_t) = (Vec::new(), Vec::new());
    let mut counts = (0, 0);
    for round in 0..rounds {
        // The agent goes first in even rounds (and in the first: the reference copies it).
        let order = if round % 2 == 0 {
            [true, false]
        } else {
            [false, true]
        };
        for agent_turn in order {
            let ns = format!("nb{tag}-c{round}{}", if agent_turn { "a" } else { "r" });
            host.netns(&ns)?;
            taps(&ns, ports, dir.path())?;
            if agent_turn {
                let dhcp_dir = dir.path().join(format!("dhcp-{round}"));
                host.dhcp_dirs.push(dhcp_dir.clone());
                let gen_ = Generation::open(&ns)?;
                let g0 = gen_.read()?;
                let t = Instant::now();
                let ag = Agent::start(
                    &s.client,
                    &node,
                    &ns,
                    underlay,
                    &dhcp_dir,
                    Duration::from_secs(2),
                )?;
                let (l2, n2, d2) = (links.clone(), named(&ns)?, dhcp_dir.clone());
                let probe = LinkProbe::open(&ns)?;
                let last = (0..ports)
                    .map(|i| format!("tc{i}"))
                    .max()
                    .unwrap_or_default();
                let (took, firewall_at, taps_at) =
                    tokio::task::spawn_blocking(move || -> Result<_> {
                        let deadline = Instant::now() + Duration::from_secs(600);
                        let (mut firewall_at, mut taps_at) = (None, None);
                        loop {
                            // The namespace's links are listed (a dump) only once the nft
                            // tables are live and the probe finds the tap the agent wires
                            // last (its plan takes them in name order) on a bridge and up.
                            let ready = gen_.read()? != g0 && {
                                firewall_at.get_or_insert_with(|| t.elapsed());
                                probe.up_on_a_bridge(&last)?
                            };
                            let milestones = (t, &mut firewall_at, &mut taps_at);
                            if ready && converged(&l2, &n2, ports, &d2, (&gen_, g0), milestones)? {
                                return Ok((
                                    t.elapsed(),
                                    firewall_at.unwrap_or_default(),
                                    taps_at.unwrap_or_default(),
                                ));
                            }
                            ensure!(
                                Instant::now() < deadline,
                                "the node did not converge in 600 s"
                            );
                            std::thread::sleep(Duration::from_millis(20));
                        }
                    })
                    .await??;
                agent_t.push(took.as_secs_f64());
                eprintln!(
                    "round {round}: agent converged {ports} ports in {:.2} s: its nft tables seen live at {:.2} s, every tap on the bridge at {:.2} s (load {})",
                    took.as_secs_f64(),
                    firewall_at.as_secs_f64(),
                    taps_at.as_secs_f64(),
                    load()
                );
                ag.stop().await;
                counts.0 = nft_rules(&ns)?;
                if made.is_none() {
                    made = Some(read_made(&ns, &dhcp_dir)?);
                }
                Cleanup::stop_dhcp(&dhcp_dir);
                Cleanup::drop_dhcp_netns(&node);
            } else {
                let m = made
                    .as_ref()
                    .context("the reference copies the agent's first run")?;
                let took = reference(m, &ns, ports, dir.path(), &mut host, round)?;
                raw_t.push(took.as_secs_f64());
                eprintln!(
                    "round {round}: nft -f + ip -batch + dnsmasq in {:.2} s (load {})",
                    took.as_secs_f64(),
                    load()
                );
                counts.1 = nft_rules(&ns)?;
                let dh = format!("nb{tag}-rd{round}");
                if let Ok(pid) =
                    std::fs::read_to_string(dir.path().join(format!("ref-{round}")).join("pid"))
                {
                    let _ = Command::new("kill").arg(pid.trim()).status();
                }
                host.drop_netns(&dh);
            }
            host.drop_netns(&ns);
        }
    }
    let (am, rm) = (median(agent_t.clone()), median(raw_t.clone()));
    println!("| {ports} ports on a fresh node | rounds | median (s) | each (s) |");
    println!("|---|---|---|---|");
    let each = |v: &[f64]| {
        v.iter()
            .map(|x| format!("{x:.2}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!(
        "| raw: `nft -f` + `ip -batch` + dnsmasq ({} nft rules) | {} | {rm:.2} | {} |",
        counts.1,
        raw_t.len(),
        each(&raw_t)
    );
    println!(
        "| Stratus: agent start → all ports wired, filter and DHCP in the kernel ({} nft rules) | {} | {am:.2} | {} |",
        counts.0,
        agent_t.len(),
        each(&agent_t)
    );
    println!();
    println!(
        "Stratus/raw (medians): {:.2}x; median of each round's ratio: {:.2}x; load average at the end: {}",
        am / rm,
        median(agent_t.iter().zip(&raw_t).map(|(a, r)| a / r).collect()),
        load()
    );
    Ok(())
}

/// Reads back what the agent made in `ns` (names, VNI, MTU, the ruleset as `nft list`
/// prints it, the DHCP server's hosts file and arguments).
fn read_made(ns: &str, dhcp_dir: &Path) -> Result<Made> {
    let links: Value = serde_json::from_str(&ip(&["-n", ns, "-d", "-j", "link", "show"])?)?;
    let links = links.as_array().context("ip -j link")?;
    let by_kind = |k: &str| {
        links.iter().find(|l| {
            l["linkinfo"]["info_kind"].as_str() == Some(k)
                && !l["ifname"].as_str().unwrap_or("").starts_with("tc")
        })
    };
    let bridge = by_kind("bridge").context("no bridge")?;
    let vxlan = by_kind("vxlan").context("no vxlan")?;
    let veth = by_kind("veth").context("no DHCP veth")?;
    let server = std::fs::read_dir(dhcp_dir)?
        .flatten()
        .next()
        .context("no DHCP server")?;
    let pid = std::fs::read_to_string(server.path().join("pid"))?;
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", pid.trim()))?;
    let args: Vec<String> = cmdline
        .split(|b| *b == 0)
        .skip(1)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    let inner = server.file_name().to_string_lossy().into_owned();
    let peer_links: Value = serde_json::from_str(&ip(&["-n", &inner, "-j", "addr", "show"])?)?;
    let peer = peer_links
        .as_array()
        .into_iter()
        .flatten()
        .find(|l| l["ifname"].as_str() != Some("lo"))
        .context("no DHCP interface")?;
    let dhcp_addrs: Vec<String> = peer["addr_info"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|a| a["family"].as_str() == Some("inet"))
        .map(|a| {
            format!(
                "{}/{}",
                a["local"].as_str().unwrap_or_default(),
                a["prefixlen"]
            )
        })
        .collect();
    ensure!(!dhcp_addrs.is_empty(), "no address on the DHCP interface");
    Ok(Made {
        bridge: bridge["ifname"].as_str().unwrap_or_default().to_owned(),
        vxlan: vxlan["ifname"].as_str().unwrap_or_default().to_owned(),
        vni: vxlan["linkinfo"]["info_data"]["id"]
            .as_u64()
            .unwrap_or_default() as u32,
        mtu: vxlan["mtu"].as_u64().unwrap_or(1450) as u32,
        veth: veth["ifname"].as_str().unwrap_or_default().to_owned(),
        peer: peer["ifname"].as_str().unwrap_or_default().to_owned(),
        dhcp_addrs,
        ruleset: exec_in(ns, "nft", &["list", "ruleset"])?,
        hosts: std::fs::read_to_string(server.path().join("hosts"))?,
        dhcp_args: args,
    })
}

/// The agent's state written by hand into fresh namespace `ns`: `nft -f` of its ruleset,
/// `ip -batch` of its links, a DHCP namespace with dnsmasq serving the same hosts file. The
/// time from the first command to dnsmasq's parent returning (the daemon is up).
fn reference(
    m: &Made,
    ns: &str,
    ports: usize,
    dir: &Path,
    host: &mut Cleanup,
    round: usize,
) -> Result<Duration> {
    let tag = std::process::id();
    let dh = format!("nb{tag}-rd{round}");
    let state = dir.join(format!("ref-{round}"));
    std::fs::create_dir_all(&state)?;
    let nft_file = state.join("ruleset.nft");
    let mut batch = format!(
        "link add {b} mtu {mtu} type bridge\nlink add {vx} mtu {mtu} type vxlan id {vni} local 192.0.2.1 dstport 4789 nolearning\nlink set {vx} master {b} up\nlink set {b} up\n",
        b = m.bridge,
        vx = m.vxlan,
        vni = m.vni,
        mtu = m.mtu
    );
    for i in 0..ports {
        batch.push_str(&format!(
            "link set tc{i} mtu {} master {} up\n",
            m.mtu, m.bridge
        ));
    }
    batch.push_str(&format!(
        "link add {v} mtu {mtu} master {b} up type veth peer name {p} mtu {mtu} netns {dh}\n",
        v = m.veth,
        p = m.peer,
        b = m.bridge,
        mtu = m.mtu
    ));
    let mut inner: String = m
        .dhcp_addrs
        .iter()
        .map(|a| format!("addr add {a} dev {}\n", m.peer))
        .collect();
    inner.push_str(&format!("link set {} up\n", m.peer));
    let hosts = state.join("hosts");
    let file = |f: &str| state.join(f).to_string_lossy().into_owned();
    let args: Vec<String> = m
        .dhcp_args
        .iter()
        .map(|a| {
            let key = a.split('=').next().unwrap_or_default();
            match key {
                "--dhcp-hostsfile" => format!("{key}={}", file("hosts")),
                "--dhcp-leasefile" => format!("{key}={}", file("leases")),
                "--pid-file" => format!("{key}={}", file("pid")),
                "--log-facility" => format!("{key}={}", file("log")),
                _ => a.clone(),
            }
        })
        .collect();
    let t = Instant::now();
    std::fs::write(&nft_file, &m.ruleset)?;
    exec_in(
        ns,
        "sysctl",
        &["-qw", "net.bridge.bridge-nf-call-iptables=1"],
    )?;
    exec_in(ns, "nft", &["-f", &nft_file.to_string_lossy()])?;
    host.netns(&dh)?;
    ip_batch(Some(ns), &batch, &state)?;
    ip_batch(Some(&dh), &inner, &state)?;
    std::fs::write(&hosts, &m.hosts)?;
    exec_in(&dh, "ethtool", &["-K", &m.peer, "tx", "off"])?;
    exec_in(
        &dh,
        "dnsmasq",
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    )?;
    let took = t.elapsed();
    ensure!(
        Path::new(&format!(
            "/proc/{}",
            std::fs::read_to_string(state.join("pid"))?.trim()
        ))
        .exists(),
        "the reference's dnsmasq is not running"
    );
    Ok(took)
}

// ---------------------------------------------------------------------------------------
// 3. TCP across the overlay.

/// The hidden `tcp-sink`: accepts one connection on `listen`, prints `ready` once
/// listening, reads to EOF, and prints `BYTES SECONDS` (first byte to EOF).
pub fn tcp_sink(listen: SocketAddr) -> Result<()> {
    let l = TcpListener::bind(listen)?;
    println!("ready");
    std::io::stdout().flush()?;
    let (mut c, _) = l.accept()?;
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    let mut first = None;
    loop {
        let n = c.read(&mut buf)?;
        if n == 0 {
            break;
        }
        first.get_or_insert_with(Instant::now);
        total += n as u64;
    }
    let secs = first.map(|f| f.elapsed().as_secs_f64()).unwrap_or(0.0);
    println!("{total} {secs}");
    Ok(())
}

/// The hidden `tcp-source`: connects to `to` and writes as fast as it can for `seconds`.
pub fn tcp_source(to: SocketAddr, seconds: f64) -> Result<()> {
    let mut c = TcpStream::connect_timeout(&to, Duration::from_secs(5))?;
    let buf = vec![0x5au8; 128 * 1024];
    let t = Instant::now();
    while t.elapsed().as_secs_f64() < seconds {
        c.write_all(&buf)?;
    }
    c.shutdown(std::net::Shutdown::Write)?;
    Ok(())
}

/// The CPUs the source and the sink are pinned to (`taskset -c`), the same for both sides
/// of every run, so that a run's figure does not depend on where the scheduler put them:
/// one CPU each where there are two or more.
pub(crate) fn tcp_cpus() -> (String, String) {
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    if cpus >= 2 {
        ("0".into(), "1".into())
    } else {
        ("0".into(), "0".into())
    }
}

/// One measurement: a sink in `dst` on `addr`, a source in `src` for `seconds`, each
/// pinned to its CPU of [`tcp_cpus`]; Gbit/s.
pub(crate) fn tcp_once(src: &str, dst: &str, addr: Ipv4Addr, seconds: f64) -> Result<f64> {
    let exe = std::env::current_exe()?;
    let exe = exe.to_string_lossy().into_owned();
    let listen = format!("{addr}:5201");
    let (source_cpu, sink_cpu) = tcp_cpus();
    let mut sink = Command::new("ip")
        .args([
            "netns", "exec", dst, "taskset", "-c", &sink_cpu, &exe, "tcp-sink", "--listen", &listen,
        ])
        .stdout(Stdio::piped())
        .spawn()
        .context("start the sink")?;
    let result = (|| -> Result<f64> {
        let mut out = BufReader::new(sink.stdout.take().context("sink stdout")?);
        let mut line = String::new();
        out.read_line(&mut line)?;
        ensure!(line.trim() == "ready", "sink said {line:?}");
        exec_in(
            src,
            "taskset",
            &[
                "-c",
                &source_cpu,
                &exe,
                "tcp-source",
                "--to",
                &listen,
                "--seconds",
                &seconds.to_string(),
            ],
        )?;
        line.clear();
        out.read_line(&mut line)?;
        let mut f = line.split_whitespace();
        let bytes: f64 = f.next().context("bytes")?.parse()?;
        let secs: f64 = f.next().context("seconds")?.parse()?;
        ensure!(secs > 0.0, "nothing received");
        Ok(bytes * 8.0 / secs / 1e9)
    })();
    if result.is_err() {
        let _ = sink.kill();
    }
    let _ = sink.wait();
    result
}

/// Two nodes joined by a veth underlay (192.0.2.1 and .2 on `underlay`), a guest namespace
/// per node whose `eth0` is the peer of `device` in its node.
fn two_nodes(
    host: &mut Cleanup,
    n: [&str; 2],
    g: [&str; 2],
    device: &str,
    macs: [&str; 2],
    mtu: u32,
) -> Result<()> {
    for x in n.iter().chain(g.iter()) {
        host.netns(x)?;
    }
    ip(&[
        "link", "add", "underlay", "netns", n[0], "type", "veth", "peer", "name", "underlay",
        "netns", n[1],
    ])?;
    for (i, node) in n.iter().enumerate() {
        ip(&[
            "-n",
            node,
            "addr",
            "add",
            &format!("192.0.2.{}/24", i + 1),
            "dev",
            "underlay",
        ])?;
        ip(&["-n", node, "link", "set", "underlay", "up"])?;
        ip(&[
            "link", "add", device, "netns", node, "type", "veth", "peer", "name", "eth0", "netns",
            g[i],
        ])?;
        ip(&[
            "-n",
            g[i],
            "link",
            "set",
            "eth0",
            "address",
            macs[i],
            "mtu",
            &mtu.to_string(),
            "up",
        ])?;
    }
    Ok(())
}

/// Networks `net-1` to `net-{n}` beside `net`, each with a port on both nodes `nodes` (the
/// port's device one end of a veth pair the node keeps both ends of): what a node that
/// hosts many projects carries, every network its own bridge, VXLAN device, zone, peers
/// and DHCP server.
async fn other_networks(a: &Apis, nodes: &[String; 2], n: usize) -> Result<()> {
    let pp = PostParams::default();
    for i in 1..=n {
        let (net, sn) = (format!("net-{i}"), format!("sn-{i}"));
        let cidr = format!("10.{}.{}.0/24", 100 + i / 250, i % 250);
        let gateway = format!("10.{}.{}.1", 100 + i / 250, i % 250);
        a.nets
            .create(&pp, &serde_json::from_value(json!({"apiVersion": "network.stratus.dev/v1", "kind": "Network", "metadata": {"name": net}, "spec": {}}))?)
            .await?;
        a.subnets
            .create(&pp, &serde_json::from_value(json!({"apiVersion": "network.stratus.dev/v1", "kind": "Subnet", "metadata": {"name": sn}, "spec": {"network": net, "cidr": cidr, "gatewayIP": gateway}}))?)
            .await?;
        if a.nets.get(&net).await?.status.and_then(|s| s.vni).is_none() {
            a.nets
                .patch_status(
                    &net,
                    &PatchParams::default(),
                    &Patch::Merge(json!({"status": {"vni": 7001 + i}})),
                )
                .await?;
        }
        for (j, node) in nodes.iter().enumerate() {
            let device = format!("xa{i}");
            ip(&[
                "-n",
                node,
                "link",
                "add",
                &device,
                "type",
                "veth",
                "peer",
                "name",
                &format!("xb{i}"),
            ])?;
            let addr = Ipv4Addr::new(10, (100 + i / 250) as u8, (i % 250) as u8, 11 + j as u8);
            port_on(
                a,
                (&net, &sn),
                &format!("x{i}-{j}"),
                &["default"],
                node,
                &device,
                (
                    format!("fa:16:3e:{:02x}:{:02x}:{:02x}", j, i / 256, i % 256),
                    addr,
                ),
            )
            .await?;
        }
    }
    Ok(())
}

/// TCP throughput between guests on two nodes across the agent's overlay vs a hand-built
/// bridge + VXLAN pair; the agents' nodes carry `networks - 1` other networks.
pub async fn tcp(seconds: f64, rounds: usize, networks: usize) -> Result<()> {
    let s = stack().await?;
    let tag = std::process::id();
    let n = [format!("nb{tag}-t1"), format!("nb{tag}-t2")];
    let g = [format!("nb{tag}-tg1"), format!("nb{tag}-tg2")];
    let rn = [format!("nb{tag}-r1"), format!("nb{tag}-r2")];
    let rg = [format!("nb{tag}-rg1"), format!("nb{tag}-rg2")];
    let fln = [format!("nb{tag}-f1"), format!("nb{tag}-f2")];
    let flg = [format!("nb{tag}-fg1"), format!("nb{tag}-fg2")];
    let dir = tempfile::tempdir()?;
    let dhcp = [dir.path().join("dhcp1"), dir.path().join("dhcp2")];
    let mut host = Cleanup::default();
    host.dhcp_dirs = dhcp.to_vec();
    host.nodes = n.to_vec();
    let a = network(&s.client, "10.82.0.0/24", "10.82.0.1").await?;
    a.groups
        .create(&PostParams::default(), &serde_json::from_value(json!({"apiVersion": "network.stratus.dev/v1", "kind": "SecurityGroup", "metadata": {"name": "default"},
            "spec": {"rules": [{"direction": "ingress", "protocol": "tcp", "portRangeMin": 5201, "portRangeMax": 5201}, {"direction": "egress"}]}}))?)
        .await?;
    for node in &n {
        a.hvs
            .create(&PostParams::default(), &serde_json::from_value(json!({"apiVersion": "compute.stratus.dev/v1", "kind": "Hypervisor", "metadata": {"name": node}, "spec": {"hypervisorType": "qemu"}}))?)
            .await?;
    }
    let mut addrs = Vec::new();
    let mut macs = Vec::new();
    for (i, node) in n.iter().enumerate() {
        let (mac, addr) = port(
            &a,
            &format!("p{i}"),
            &["default"],
            node,
            "tport",
            (mac_of(i), Ipv4Addr::new(10, 82, 0, 11 + i as u8)),
        )
        .await?;
        macs.push(mac);
        addrs.push(addr);
    }
    let mtu = a.nets.get("net").await?.spec.mtu;
    // The agents' side.
    two_nodes(
        &mut host,
        [&n[0], &n[1]],
        [&g[0], &g[1]],
        "tport",
        [&macs[0], &macs[1]],
        mtu,
    )?;
    other_networks(&a, &n, networks.saturating_sub(1)).await?;
    let _agents = [
        Agent::start(
            &s.client,
            &n[0],
            &n[0],
            Ipv4Addr::new(192, 0, 2, 1),
            &dhcp[0],
            Duration::from_secs(2),
        )?,
        Agent::start(
            &s.client,
            &n[1],
            &n[1],
            Ipv4Addr::new(192, 0, 2, 2),
            &dhcp[1],
            Duration::from_secs(2),
        )?,
    ];
    all_active(&a, 2 * networks.max(1), Duration::from_secs(300)).await?;
    // The references: the same namespaces and devices, a bridge and VXLAN device by hand;
    // the second pair also carries the least filter that is stateful on both nodes.
    for (nodes, guests, filter) in [(&rn, &rg, false), (&fln, &flg, true)] {
        two_nodes(
            &mut host,
            [&nodes[0], &nodes[1]],
            [&guests[0], &guests[1]],
            "tport",
            [&macs[0], &macs[1]],
            mtu,
        )?;
        hand_built_overlay(nodes, mtu, filter, dir.path())?;
    }
    for (i, guest) in g.iter().chain(&rg).chain(&flg).enumerate() {
        ip(&[
            "-n",
            guest,
            "addr",
            "add",
            &format!("{}/24", addrs[i % 2]),
            "dev",
            "eth0",
        ])?;
    }
    let setups = [
        (
            "raw: hand-built bridge + VXLAN (nolearning, one flood entry), no filter".to_owned(),
            &rg,
        ),
        (
            format!(
                "stateful floor: the same by hand + `nft -f` of only what a stateful filter needs on each node ({FLOOR_WHAT})"
            ),
            &flg,
        ),
        (
            format!(
                "Stratus: two agents' bridges, VXLAN, FDB and nft filter (conntrack zones, port chains{})",
                if networks > 1 {
                    format!("; {networks} networks with a port each on both nodes")
                } else {
                    String::new()
                }
            ),
            &g,
        ),
    ];
    // Every path carries a short run before the measured ones (ARP, conntrack, FDB learnt).
    let deadline = Instant::now() + Duration::from_secs(60);
    for (_, [src, dst]) in &setups {
        loop {
            match tcp_once(src, dst, addrs[1], 0.5) {
                Ok(_) => break,
                Err(e) if Instant::now() < deadline => {
                    eprintln!("not yet through {src} → {dst}: {e:#}");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }
    // Each round runs the setups in another order (rotated), so that none is always first
    // or last when the machine's load drifts.
    let mut runs: Vec<Vec<f64>> = vec![Vec::new(); setups.len()];
    for round in 0..rounds {
        for k in 0..setups.len() {
            let at = (k + round) % setups.len();
            let [src, dst] = setups[at].1.clone();
            let to = addrs[1];
            let gbps =
                tokio::task::spawn_blocking(move || tcp_once(&src, &dst, to, seconds)).await??;
            eprintln!(
                "round {round}: {} {gbps:.2} Gbit/s (load {})",
                setups[at].0.split(':').next().unwrap_or_default(),
                load()
            );
            runs[at].push(gbps);
        }
    }
    let each = |v: &[f64]| {
        v.iter()
            .map(|x| format!("{x:.2}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    // The spread: the middle half of the runs (first to third quartile) and min–max.
    let spread = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        if v.is_empty() {
            return "- | -".to_owned();
        }
        let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
        format!(
            "{:.2}–{:.2} | {:.2}–{:.2}",
            at(0.25),
            at(0.75),
            v[0],
            v[v.len() - 1]
        )
    };
    let (source_cpu, sink_cpu) = tcp_cpus();
    println!(
        "| TCP, one stream, {seconds} s per run, MTU {mtu}, source on CPU {source_cpu}, sink on CPU {sink_cpu} | runs | median (Gbit/s) | middle half | min–max | each |"
    );
    println!("|---|---|---|---|---|---|");
    for ((label, _), v) in setups.iter().zip(&runs) {
        println!(
            "| {label} | {} | {:.2} | {} | {} |",
            v.len(),
            median(v.clone()),
            spread(v),
            each(v)
        );
    }
    println!();
    let (raw, floor, ours) = (&runs[0], &runs[1], &runs[2]);
    for (what, a, b) in [
        ("Stratus/raw", ours, raw),
        ("floor/raw", floor, raw),
        ("Stratus/floor", ours, floor),
    ] {
        let ratios: Vec<f64> = a.iter().zip(b).map(|(x, y)| x / y).collect();
        println!(
            "{what} (medians): {:.3}x; each round's ratio: median {:.3}x, middle half {}",
            median(a.clone()) / median(b.clone()),
            median(ratios.clone()),
            spread(&ratios).split(" | ").next().unwrap_or_default(),
        );
    }
    println!("load average at the end: {}", load());
    Ok(())
}

/// What the stateful floor's filter holds, for the report.
const FLOOR_WHAT: &str = "a conntrack zone by bridge, the underlay's VXLAN untracked, `ct state established,related accept` and `ct state invalid drop` first in forward";

/// The least filter that is stateful on a node of the hand-built overlay, as the agent's
/// would be without its per-port rules and anti-spoofing: the frames of the bridge in a
/// conntrack zone (raw priority, as the agent's), the underlay's VXLAN packets untracked,
/// and replies accepted by their connection's state.
const FLOOR_RULESET: &str = "table inet floor {
  chain prerouting {
    type filter hook prerouting priority raw; policy accept;
    iifname \"br0\" ct zone set 1 accept
    udp dport 4789 notrack
  }
  chain output {
    type filter hook output priority raw; policy accept;
    udp dport 4789 notrack
  }
  chain forward {
    type filter hook forward priority filter; policy accept;
    ct state established,related accept
    ct state invalid drop
  }
}
";

/// A bridge `br0` and VXLAN device `vx0` on each of the two `nodes` of [`two_nodes`], by
/// hand, with one flood entry to the other node; with `filter`, [`FLOOR_RULESET`] on both.
fn hand_built_overlay(nodes: &[String; 2], mtu: u32, filter: bool, dir: &Path) -> Result<()> {
    for (i, node) in nodes.iter().enumerate() {
        let peer = format!("192.0.2.{}", 2 - i);
        ip_batch(
            Some(node),
            &format!(
                "link add br0 mtu {mtu} type bridge\nlink add vx0 mtu {mtu} type vxlan id 7001 local 192.0.2.{} dstport 4789 nolearning\nlink set vx0 master br0 up\nlink set tport mtu {mtu} master br0 up\nlink set br0 up\n",
                i + 1
            ),
            dir,
        )?;
        let out = Command::new("bridge")
            .args([
                "-n",
                node,
                "fdb",
                "append",
                "00:00:00:00:00:00",
                "dev",
                "vx0",
                "dst",
                &peer,
            ])
            .output()
            .context("run bridge")?;
        ensure!(
            out.status.success(),
            "bridge fdb append: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        if filter {
            let file = dir.join(format!("floor-{i}.nft"));
            std::fs::write(&file, FLOOR_RULESET)?;
            exec_in(node, "nft", &["-f", &file.to_string_lossy()])?;
        }
    }
    Ok(())
}
