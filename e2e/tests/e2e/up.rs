//! `stratus up` as a user runs it: what it starts goes with it.

use std::time::Duration;

use anyhow::{Context, Result};
use stratus_e2e::{Cloud, wait_until};

/// The (pid, command name, state) of every process whose parent is `parent`.
fn children(parent: u32) -> Vec<(u32, String, char)> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| {
            let (comm, ppid, state) = stat(pid)?;
            (ppid == parent).then_some((pid, comm, state))
        })
        .collect()
}

/// A process's command name, parent and state, from `/proc/PID/stat`; `None` once it is gone.
fn stat(pid: u32) -> Option<(String, u32, char)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // `PID (COMM) STATE PPID ...`: COMM may hold spaces and parentheses, so split at the last ')'.
    let (head, rest) = s.rsplit_once(')')?;
    let comm = head.split_once('(')?.1.to_string();
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some((comm, ppid, state))
}

#[test]
fn etcd_does_not_outlive_a_killed_stratus_up() -> Result<()> {
    let mut cloud = Cloud::up()?;
    let up = cloud.proc.pid();
    let (etcd, _, _) = children(up)
        .into_iter()
        .find(|(_, comm, _)| comm == "etcd")
        .with_context(|| format!("no etcd among the children of stratus up ({up})"))?;
    // As a crash (or the OOM killer) would: no shutdown runs.
    cloud.proc.kill();
    wait_until(
        Duration::from_secs(10),
        "the etcd of a killed stratus up to stop",
        || match stat(etcd) {
            None | Some((_, _, 'Z')) => Some(()),
            Some(_) => None,
        },
    )?;
    Ok(())
}

/// A network namespace, deleted when dropped.
struct Netns(String);

impl Netns {
    fn add(name: &str) -> Result<Self> {
        let ok = std::process::Command::new("ip")
            .args(["netns", "add", name])
            .status()?
            .success();
        anyhow::ensure!(ok, "ip netns add {name}");
        Ok(Self(name.to_string()))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "delete", &self.0])
            .status();
    }
}

/// `stratus up --compute` runs the node's network agent with its compute agent (here wiring a
/// namespace of the test's, so the host is left alone): it renews the node's network-agent
/// Lease.
#[test]
fn stratus_up_with_compute_runs_the_network_agent_too() -> Result<()> {
    let ns = Netns::add(&format!("stratus-up-{}", std::process::id()))?;
    let cloud = Cloud::up_with(&["--compute", "test:///default", "--network-namespace", &ns.0])?;
    let t = Duration::from_secs(60);
    let holder = wait_until(t, "the network agent's Lease of node-1", || {
        cloud
            .kubectl_ok(&[
                "-n",
                "stratus-network-agents",
                "get",
                "lease",
                "node-1",
                "-o",
                "jsonpath={.spec.holderIdentity}",
            ])
            .ok()
            .filter(|h| !h.is_empty())
    })
    .with_context(|| cloud.log())?;
    anyhow::ensure!(holder.contains("node-1"), "lease held by {holder}");
    // Stopped before the namespace goes.
    drop(cloud);
    Ok(())
}
