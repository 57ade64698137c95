//! Network namespaces for the network agent's tests: nodes and guests as namespaces, the
//! underlay between nodes, a guest plugged in as a Port's device, a node's network agent, and
//! the removal of all of it (the agents' DHCP servers included) however a test ends.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result};

use crate::{Apiserver, Proc, ip, netns_exec, stratus_bin};

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
    let mac = api.jsonpath(ns, "port", port, "{.status.macAddress}")?;
    let addr = api.jsonpath(ns, "port", port, "{.status.fixedIPs[0].ipAddress}")?;
    anyhow::ensure!(
        !mac.is_empty() && !addr.is_empty(),
        "IPAM gave {port} {mac:?} {addr:?}"
    );
    api.patch_status(
        ns,
        "port",
        port,
        serde_json::json!({"hypervisor": node, "interfaceName": device}),
    )?;
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
