//! Network namespaces for the network agent's tests: nodes and guests as namespaces, the
//! underlay between nodes, a guest plugged in as a Port's device, a node's network agent, and
//! the removal of all of it (the agents' DHCP servers included) however a test ends.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result};

use crate::{Apiserver, Cloud, Proc, ip, netns_exec, stratus_bin};

/// The tunnel addresses [`underlay`] gives two nodes, on 192.0.2.0/24 (TEST-NET-1: nothing
/// of the host's is there).
pub const UNDERLAY: [&str; 2] = ["192.0.2.1", "192.0.2.2"];

/// Namespaces a test made, and the DHCP servers its network agents made (a dnsmasq and a
/// namespace each, listed in the agents' `<state>/network/dhcp`), removed when dropped:
/// the DHCP servers first, then the namespaces.
pub struct Namespaces {
    /// The namespaces, made by [`Namespaces::add`] or by the test (router namespaces, to be
    /// removed as well).
    pub namespaces: Vec<String>,
    /// The agents' DHCP state directories: one directory per server, named as its namespace.
    pub dhcp_dirs: Vec<PathBuf>,
}

impl Namespaces {
    /// Makes the namespaces `names`, to be removed with the DHCP servers listed under the
    /// agents' state directories `states`. Those already made are removed if one fails.
    pub fn add(names: &[&str], states: &[&Path]) -> Result<Self> {
        let made = Self {
            namespaces: names.iter().map(|n| (*n).to_owned()).collect(),
            dhcp_dirs: states.iter().map(|s| s.join("network/dhcp")).collect(),
        };
        for n in names {
            ip(&["netns", "add", n])?;
        }
        Ok(made)
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for dir in &self.dhcp_dirs {
            remove_dhcp_servers(dir);
        }
        for n in &self.namespaces {
            let _ = ip(&["netns", "del", n]);
        }
    }
}

/// Stops the DHCP servers a network agent lists in `dir` (its `<state>/network/dhcp`) and
/// removes their namespaces.
pub fn remove_dhcp_servers(dir: &Path) {
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if let Ok(pid) = std::fs::read_to_string(e.path().join("pid")) {
            let _ = Command::new("kill").arg(pid.trim()).status();
        }
        let _ = ip(&["netns", "del", &e.file_name().to_string_lossy()]);
    }
}

/// Joins node namespaces `n1` and `n2` by a veth pair, `underlay` in each, with the
/// addresses [`UNDERLAY`] (/24).
pub fn underlay(n1: &str, n2: &str) -> Result<()> {
    ip(&[
        "link", "add", "underlay", "netns", n1, "type", "veth", "peer", "name", "underlay",
        "netns", n2,
    ])?;
    for (n, a) in [(n1, UNDERLAY[0]), (n2, UNDERLAY[1])] {
        ip(&[
            "-n",
            n,
            "addr",
            "add",
            &format!("{a}/24"),
            "dev",
            "underlay",
        ])?;
        ip(&["-n", n, "link", "set", "underlay", "up"])?;
    }
    Ok(())
}

/// Gives the node namespace `ns` an underlay of its own: a veth pair in it (`underlay` and
/// `underlay-peer`, both up), `underlay` with `address` (`192.0.2.1/24`: an address of the
/// test's own).
pub fn lone_underlay(ns: &str, address: &str) -> Result<()> {
    ip(&[
        "-n",
        ns,
        "link",
        "add",
        "underlay",
        "type",
        "veth",
        "peer",
        "name",
        "underlay-peer",
    ])?;
    ip(&["-n", ns, "link", "set", "underlay-peer", "up"])?;
    ip(&["-n", ns, "addr", "add", address, "dev", "underlay"])?;
    ip(&["-n", ns, "link", "set", "underlay", "up"])?;
    Ok(())
}

/// What the compute side does for a Port of project `ns` on node namespace `node`: binds it
/// there with device `device` (its status `hypervisor` and `interfaceName`), and makes that
/// device, a veth whose other end is `eth0` of guest namespace `guest` with the Port's MAC
/// (and `mtu`, if given), up with the guest's loopback. The Port's first fixed address, as
/// IPAM gave it.
pub fn plug_port(
    api: &Apiserver,
    ns: &str,
    port: &str,
    node: &str,
    device: &str,
    guest: &str,
    mtu: Option<u32>,
) -> Result<String> {
    plug(
        |path| api.jsonpath(ns, "port", port, path),
        |status| api.patch_status(ns, "port", port, status).map(drop),
        port,
        [node, device, guest],
        mtu,
    )
}

/// [`plug_port`] in a whole cloud (`stratus up`), as its admin: the Port `port` of project
/// `ns` bound on node namespace `node` to device `device`, the other end `eth0` of guest
/// namespace `guest`. The Port's first fixed address.
pub fn plug_cloud_port(
    cloud: &Cloud,
    ns: &str,
    port: &str,
    node: &str,
    device: &str,
    guest: &str,
) -> Result<String> {
    let get = |path: &str| {
        cloud.kubectl_ok(&[
            "-n",
            ns,
            "get",
            "port",
            port,
            "-o",
            &format!("jsonpath={path}"),
        ])
    };
    let patch = |status: serde_json::Value| {
        let body = serde_json::json!({ "status": status }).to_string();
        cloud
            .kubectl_ok(&[
                "-n",
                ns,
                "patch",
                "port",
                port,
                "--subresource=status",
                "--type=merge",
                "-p",
                &body,
            ])
            .map(drop)
    };
    plug(get, patch, port, [node, device, guest], None)
}

/// What [`plug_port`] does, reading the Port's fields with `jsonpath` and writing its status
/// with `patch_status`; `[node, device, guest]`.
fn plug(
    jsonpath: impl Fn(&str) -> Result<String>,
    patch_status: impl FnOnce(serde_json::Value) -> Result<()>,
    port: &str,
    [node, device, guest]: [&str; 3],
    mtu: Option<u32>,
) -> Result<String> {
    let mac = jsonpath("{.status.macAddress}")?;
    let addr = jsonpath("{.status.fixedIPs[0].ipAddress}")?;
    anyhow::ensure!(
        !mac.is_empty() && !addr.is_empty(),
        "IPAM gave {port} {mac:?} {addr:?}"
    );
    patch_status(serde_json::json!({"hypervisor": node, "interfaceName": device}))?;
    ip(&[
        "link", "add", device, "netns", node, "type", "veth", "peer", "name", "eth0", "netns",
        guest,
    ])?;
    let mtu = mtu.map(|m| m.to_string());
    let mut eth0 = vec!["-n", guest, "link", "set", "eth0", "address", &mac];
    if let Some(m) = &mtu {
        eth0.extend(["mtu", m]);
    }
    eth0.push("up");
    ip(&eth0)?;
    ip(&["-n", guest, "link", "set", "lo", "up"])?;
    Ok(addr)
}

/// The network agent of node `node`, in the namespace of the same name, as the node
/// (`kubeconfig`, e.g. from [`Apiserver::node_identities`]), its state in `state` and its log
/// in `state/agent.log`, resyncing every second, with `args` (its tunnel: `--underlay-ip
/// ADDRESS` or `--tunnel-interface NAME`, and any other).
pub fn network_agent(node: &str, kubeconfig: &Path, state: &Path, args: &[&str]) -> Result<Proc> {
    Proc::spawn(
        &format!("network agent of {node}"),
        Command::new(stratus_bin())
            .args(["agent", "--roles", "network", "--node", node])
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .arg("--state-dir")
            .arg(state)
            .args(["--network-namespace", node, "--network-resync-seconds", "1"])
            // Every converge's duration and every change watched, for a failure's context.
            .env("STRATUS_LOG", "info,stratus_network_agent=debug")
            .args(args),
        &state.join("agent.log"),
    )
}

/// The logs of the agents whose state directories are `states`, for a test that fails.
pub fn agent_logs(states: &[&Path]) -> String {
    states
        .iter()
        .map(|s| std::fs::read_to_string(s.join("agent.log")).unwrap_or_default())
        .collect::<Vec<_>>()
        .join("\n----\n")
}

/// Whether one ping from namespace `from` to `to` is answered within a second.
pub fn ping(from: &str, to: &str) -> bool {
    netns_exec(from, &["busybox", "ping", "-c", "1", "-W", "1", to]).0
}

/// The names of the links of `kind` (`vxlan`, `bridge`, …) in namespace `ns`.
pub fn links_of_kind(ns: &str, kind: &str) -> Result<Vec<String>> {
    let out = ip(&["-n", ns, "-j", "link", "show", "type", kind])?;
    let v: serde_json::Value = serde_json::from_str(&out).context("ip's JSON")?;
    Ok(v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|l| l.get("ifname")?.as_str().map(str::to_owned))
        .collect())
}

/// A node's network datapath: `stratus agent --datapath kernel|ovs`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Datapath {
    /// Linux bridges, VXLAN devices and nftables.
    Kernel,
    /// Open vSwitch (the agent starts its own userspace switch under its state directory).
    Ovs,
}

impl Datapath {
    /// Its name, as `--datapath` takes it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Kernel => "kernel",
            Self::Ovs => "ovs",
        }
    }
}

/// The network agent of node `node` as [`network_agent`] starts it, on datapath `datapath`,
/// its tunnel on the node's `underlay` interface: a kernel node's by `--underlay-ip
/// ADDRESS` (its address there), an OVS node's by `--tunnel-interface underlay` (put on its
/// switch's underlay bridge, which the userspace datapath sends VXLAN from); with `args`.
pub fn network_agent_on(
    node: &str,
    datapath: Datapath,
    underlay_ip: &str,
    kubeconfig: &Path,
    state: &Path,
    args: &[&str],
) -> Result<Proc> {
    let tunnel = match datapath {
        Datapath::Kernel => ["--underlay-ip", underlay_ip],
        Datapath::Ovs => ["--tunnel-interface", "underlay"],
    };
    network_agent(
        node,
        kubeconfig,
        state,
        &[&["--datapath", datapath.name()][..], &tunnel[..], args].concat(),
    )
}

/// Makes a kernel node's `underlay` veth fill in the UDP checksums of its VXLAN packets
/// (`ethtool -K underlay tx off`): a NIC fills them in, a veth hands them on unfilled, and
/// an OVS peer's userspace datapath drops such packets.
pub fn checksum_underlay(node: &str) -> Result<()> {
    let (ok, out) = netns_exec(node, &["ethtool", "-K", "underlay", "tx", "off"]);
    anyhow::ensure!(ok, "ethtool -K underlay tx off in {node}: {out}");
    Ok(())
}

/// The cookie kinds (a cookie's top byte) of a network's and a port's flows on an OVS
/// node's integration bridge, and of what `learn()` adds (no object's).
pub const KIND_NETWORK: u64 = 0x52;
/// See [`KIND_NETWORK`].
pub const KIND_PORT: u64 = 0x53;
/// See [`KIND_NETWORK`].
pub const LEARNED: u64 = 0x5f;

/// An OVS node's switch: its tools pointed at the daemons its agent started under its state
/// directory, which are stopped when this is dropped (drop it after the agents, before the
/// namespaces go).
pub struct Switch {
    /// The switch's files (`STATE/network/ovs`).
    pub dir: PathBuf,
}

impl Switch {
    /// The switch of the agent whose state directory is `state`.
    pub fn of_state(state: &Path) -> Self {
        Self {
            dir: state.join("network/ovs"),
        }
    }

    /// The last `lines` lines of each of the switch's daemons' logs (what they said of
    /// stalls: "Unreasonably long … poll interval", revalidator warnings), for a failure's
    /// context.
    pub fn daemon_logs(&self, lines: usize) -> String {
        ["ovs-vswitchd", "ovsdb-server"]
            .iter()
            .map(|d| {
                let text =
                    std::fs::read_to_string(self.dir.join(format!("{d}.log"))).unwrap_or_default();
                let all: Vec<&str> = text.lines().collect();
                let tail = all[all.len().saturating_sub(lines)..].join("\n");
                format!("{d}.log (last {lines} lines):\n{tail}")
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Runs `ovs-vsctl` on this switch's database; its output.
    pub fn vsctl(&self, args: &[&str]) -> Result<String> {
        let out = Command::new("ovs-vsctl")
            .arg(format!("--db=unix:{}", self.dir.join("db.sock").display()))
            .arg("--timeout=30")
            .args(args)
            .output()
            .context("run ovs-vsctl")?;
        if !out.status.success() {
            anyhow::bail!(
                "ovs-vsctl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs `ovs-ofctl COMMAND` on the integration bridge; its output.
    pub fn ofctl(&self, command: &str, args: &[&str]) -> Result<String> {
        let out = Command::new("ovs-ofctl")
            .args(["-O", "OpenFlow15", command])
            .arg(format!("unix:{}", self.dir.join("br-int.mgmt").display()))
            .args(args)
            .output()
            .context("run ovs-ofctl")?;
        if !out.status.success() {
            anyhow::bail!(
                "ovs-ofctl {command} {args:?}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The integration bridge's flows the agent owns (everything but learned MACs), without
    /// counters.
    pub fn owned_flows(&self) -> Result<BTreeSet<String>> {
        Ok(self
            .ofctl("dump-flows", &["--no-stats"])?
            .lines()
            .filter(|l| flow_cookie(l).is_some_and(|c| c >> 56 != LEARNED && c != 0))
            .map(str::to_owned)
            .collect())
    }

    /// How many distinct objects of `kind` ([`KIND_NETWORK`], [`KIND_PORT`]) have flows.
    pub fn objects(&self, kind: u64) -> Result<usize> {
        Ok(self
            .ofctl("dump-flows", &["--no-stats"])?
            .lines()
            .filter_map(flow_cookie)
            .filter(|c| c >> 56 == kind)
            .collect::<BTreeSet<_>>()
            .len())
    }

    /// The integration bridge's ports.
    pub fn ports(&self) -> Result<BTreeSet<String>> {
        Ok(self
            .vsctl(&["list-ports", "br-int"])?
            .lines()
            .map(str::to_owned)
            .collect())
    }

    /// The tunnel ports (VXLAN interfaces) of the integration bridge.
    pub fn tunnels(&self) -> Result<BTreeSet<String>> {
        let out = self.vsctl(&[
            "--format=csv",
            "--no-headings",
            "--columns=name",
            "find",
            "Interface",
            "type=vxlan",
        ])?;
        Ok(out
            .lines()
            .map(|l| l.trim_matches('"').to_owned())
            .collect())
    }

    /// The pid a daemon's pid file names, while that process is the daemon.
    pub fn pid(&self, daemon: &str) -> Option<String> {
        let pid = std::fs::read_to_string(self.dir.join(format!("{daemon}.pid"))).ok()?;
        let pid = pid.trim().to_owned();
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
        (comm.trim() == daemon).then_some(pid)
    }
}

impl Drop for Switch {
    fn drop(&mut self) {
        for daemon in ["ovs-vswitchd", "ovsdb-server"] {
            let Some(pid) = self.pid(daemon) else {
                continue;
            };
            let _ = Command::new("kill").arg(&pid).status();
            let stopped = crate::wait_until(std::time::Duration::from_secs(10), daemon, || {
                self.pid(daemon).is_none().then_some(())
            });
            if stopped.is_err() {
                let _ = Command::new("kill").args(["-KILL", &pid]).status();
            }
        }
    }
}

/// The cookie of one line of `ovs-ofctl dump-flows`.
pub fn flow_cookie(line: &str) -> Option<u64> {
    let hex = line.trim().strip_prefix("cookie=0x")?;
    let hex = hex.split(',').next()?;
    u64::from_str_radix(hex, 16).ok()
}

/// Counts, in namespace `ns`, the ICMP echo requests that arrive from each of `sources`
/// (an nft table `ip probe` of the namespace's own, read by [`pings_counted`]).
pub fn count_pings_from(ns: &str, sources: &[&str]) -> Result<()> {
    let run = |args: &[&str]| -> Result<()> {
        let (ok, out) = netns_exec(ns, args);
        anyhow::ensure!(ok, "{args:?}: {out}");
        Ok(())
    };
    run(&["nft", "add", "table", "ip", "probe"])?;
    run(&[
        "nft",
        "add",
        "chain",
        "ip",
        "probe",
        "in",
        "{ type filter hook input priority 0 ; }",
    ])?;
    for s in sources {
        run(&[
            "nft",
            "add",
            "rule",
            "ip",
            "probe",
            "in",
            "ip",
            "saddr",
            s,
            "icmp",
            "type",
            "echo-request",
            "counter",
        ])?;
    }
    Ok(())
}

/// The echo requests [`count_pings_from`] counted in `ns` from `source` so far.
pub fn pings_counted(ns: &str, source: &str) -> Result<u64> {
    let (ok, out) = netns_exec(ns, &["nft", "list", "chain", "ip", "probe", "in"]);
    anyhow::ensure!(ok, "{out}");
    let line = out
        .lines()
        .find(|l| l.contains(&format!("ip saddr {source} ")))
        .with_context(|| format!("no counter for {source}: {out}"))?;
    line.split("packets ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("no packet count in {line}"))
}

/// A ping running from namespace `from` to `to`, an echo every 50 ms, all of one ICMP id: one
/// connection to conntrack, as a user's `ping` is (a filter must end it when the rule that
/// allowed it goes, not only refuse new ones). Each reply is timed as it arrives. Stopped
/// when dropped, or after `limit`.
pub struct ContinuousPing {
    child: std::process::Child,
    replies: std::sync::Arc<std::sync::Mutex<Vec<std::time::Instant>>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl ContinuousPing {
    /// Starts pinging.
    pub fn start(from: &str, to: &str, limit: std::time::Duration) -> Result<Self> {
        use std::io::BufRead;
        let secs = limit.as_secs().max(1).to_string();
        let mut child = Command::new("ip")
            .args([
                "netns", "exec", from, "busybox", "ping", "-i", "0.05", "-W", "1", "-w", &secs, to,
            ])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .context("run ping")?;
        let out = child.stdout.take().context("ping's output")?;
        let replies = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = std::sync::Arc::clone(&replies);
        let reader = std::thread::spawn(move || {
            for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                if line.contains("bytes from") {
                    let now = std::time::Instant::now();
                    seen.lock().unwrap_or_else(|e| e.into_inner()).push(now);
                }
            }
        });
        Ok(Self {
            child,
            replies,
            reader: Some(reader),
        })
    }

    /// When each reply arrived after `since`, in order.
    pub fn replies_after(&self, since: std::time::Instant) -> Vec<std::time::Instant> {
        let all = self.replies.lock().unwrap_or_else(|e| e.into_inner());
        all.iter().copied().filter(|t| *t > since).collect()
    }
}

impl Drop for ContinuousPing {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }
}

/// How long after an API write each `(from, to)` of `pairs` first gets through: per pair a
/// [`ContinuousPing`] started before `write` (which returns once the API answered it, the
/// instant measured from), its first reply after it timed as it arrives. Fails after
/// `limit`.
pub fn reached_after(
    pairs: &[(&str, &str)],
    limit: std::time::Duration,
    write: impl FnOnce() -> Result<()>,
) -> Result<Vec<std::time::Duration>> {
    let pingers = start_pings(pairs, limit)?;
    // Let the pingers start sending before the write.
    std::thread::sleep(std::time::Duration::from_millis(300));
    write()?;
    let since = std::time::Instant::now();
    per_pair(&pingers, pairs, limit, "reach", |p| {
        p.replies_after(since)
            .first()
            .map(|t| t.duration_since(since))
    })
}

/// A [`ContinuousPing`] per pair, each stopped after twice `limit` at the latest.
fn start_pings(pairs: &[(&str, &str)], limit: std::time::Duration) -> Result<Vec<ContinuousPing>> {
    pairs
        .iter()
        .map(|(from, to)| ContinuousPing::start(from, to, limit + limit))
        .collect()
}

/// Per pair, what `measure` says of its ping once it says something; each pair fails after
/// `limit` as "`from` to `what` `to`".
fn per_pair<T>(
    pingers: &[ContinuousPing],
    pairs: &[(&str, &str)],
    limit: std::time::Duration,
    what: &str,
    measure: impl Fn(&ContinuousPing) -> Option<T>,
) -> Result<Vec<T>> {
    pingers
        .iter()
        .zip(pairs)
        .map(|(p, (from, to))| {
            crate::wait_until(limit, &format!("{from} to {what} {to}"), || measure(p))
        })
        .collect()
}

/// How long after an API write each `(from, to)` of `pairs` stops getting through, as a
/// user's running ping sees it: per pair a [`ContinuousPing`], answered before `write`
/// (which returns once the API answered it, the instant measured from); once `quiet` has
/// passed without a reply, when its last reply after the write arrived (zero: none did).
/// Fails after `limit`.
pub fn unreached_after(
    pairs: &[(&str, &str)],
    limit: std::time::Duration,
    quiet: std::time::Duration,
    write: impl FnOnce() -> Result<()>,
) -> Result<Vec<std::time::Duration>> {
    let start = std::time::Instant::now();
    let pingers = start_pings(pairs, limit)?;
    per_pair(&pingers, pairs, limit, "reach (before the write)", |p| {
        p.replies_after(start).first().map(drop)
    })?;
    write()?;
    let since = std::time::Instant::now();
    per_pair(&pingers, pairs, limit, "stop reaching", |p| {
        let last = p.replies_after(since).last().copied();
        (last.unwrap_or(since).elapsed() >= quiet)
            .then(|| last.map_or(std::time::Duration::ZERO, |t| t.duration_since(since)))
    })
}

/// The external side of a routed test: in namespace `ext` a bridge `br-ext` with `address`
/// (`203.0.113.1/24`: an address of the test's own), and per node namespace of `nodes` a
/// veth pair, `physnet` in the node (what its agent's `--physical-interface PHYSNET=physnet`
/// names) and `e-nI` on the bridge (I from 1), all up. Each `e-nI` fills in the checksums
/// of what it sends (`ethtool -K e-nI tx off`), as the wire hands a node only whole frames: a
/// veth hands them on unfilled, and an OVS node's userspace datapath drops a frame left so
/// on its way into a tunnel.
pub fn external_bridge(ext: &str, nodes: &[&str], address: &str) -> Result<()> {
    ip(&["-n", ext, "link", "add", "br-ext", "type", "bridge"])?;
    ip(&["-n", ext, "addr", "add", address, "dev", "br-ext"])?;
    ip(&["-n", ext, "link", "set", "br-ext", "up"])?;
    ip(&["-n", ext, "link", "set", "lo", "up"])?;
    for (i, n) in nodes.iter().enumerate() {
        let end = format!("e-n{}", i + 1);
        ip(&[
            "link", "add", "physnet", "netns", n, "type", "veth", "peer", "name", &end, "netns",
            ext,
        ])?;
        ip(&["-n", ext, "link", "set", &end, "master", "br-ext", "up"])?;
        ip(&["-n", n, "link", "set", "physnet", "up"])?;
        let (ok, out) = netns_exec(ext, &["ethtool", "-K", &end, "tx", "off"]);
        anyhow::ensure!(ok, "ethtool -K {end} tx off in {ext}: {out}");
    }
    Ok(())
}

/// The namespaces whose names start with `prefix` (`qrouter-`: the routers') that hold a
/// link with MAC `mac` (a router's gateway port's): where a router runs, and where it ran on
/// a node that died.
pub fn namespaces_with_mac(prefix: &str, mac: &str) -> Vec<String> {
    let list = ip(&["netns", "list"]).unwrap_or_default();
    list.lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(prefix))
        .filter(|n| {
            ip(&["-n", n, "-j", "link", "show"])
                .ok()
                .and_then(|o| serde_json::from_str::<serde_json::Value>(&o).ok())
                .and_then(|v| v.as_array().cloned())
                .into_iter()
                .flatten()
                .any(|l| l.get("address").and_then(|a| a.as_str()) == Some(mac))
        })
        .map(str::to_owned)
        .collect()
}

/// The source of the reply to one ping from namespace `from` to `to` answered within two
/// seconds, as busybox's ping prints it (`64 bytes from ADDRESS: …`); `None` unanswered.
pub fn ping_reply_source(from: &str, to: &str) -> Option<String> {
    let (ok, out) = netns_exec(from, &["busybox", "ping", "-c", "1", "-W", "2", to]);
    if !ok {
        return None;
    }
    out.lines()
        .find_map(|l| l.split_once(" bytes from ")?.1.split(':').next())
        .map(str::to_owned)
}

/// An admin's flat external Network `ext` in project `ns` on physical network `physnet`,
/// with Subnet `ext-sn` of 203.0.113.0/24 (gateway 203.0.113.1, no DHCP, floating and
/// gateway addresses from .10 to .50): what a routed test's Routers and FloatingIPs name as
/// `NS/ext`.
pub fn external_network_yaml(ns: &str, physnet: &str) -> String {
    format!(
        r#"
apiVersion: network.stratus.dev/v1
kind: Network
metadata: {{name: ext, namespace: {ns}}}
spec: {{external: true, segmentation: flat, physicalNetwork: {physnet}, mtu: 1500}}
---
apiVersion: network.stratus.dev/v1
kind: Subnet
metadata: {{name: ext-sn, namespace: {ns}}}
spec:
  network: ext
  cidr: 203.0.113.0/24
  gatewayIP: 203.0.113.1
  enableDHCP: false
  allocationPools: [{{start: 203.0.113.10, end: 203.0.113.50}}]
"#
    )
}
