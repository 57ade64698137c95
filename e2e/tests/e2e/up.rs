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

/// The files of the node's file pool of a `stratus up` in `dir`.
fn pool_files(dir: &std::path::Path) -> Vec<String> {
    std::fs::read_dir(dir.join("volumes"))
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// `stratus up --storage` serves a file pool in its data directory, so the example Volume a
/// newcomer applies is placed there and made (Available, its file in `DATA_DIR/volumes`), and
/// deleting it removes the file.
#[test]
fn stratus_up_with_storage_makes_the_example_volume() -> Result<()> {
    let cloud = Cloud::up_with(&["--storage"])?;
    cloud.projects(&["demo"])?;
    let t = Duration::from_secs(240);
    let capacity = wait_until(t, "the node's file pool to be Ready", || {
        cloud
            .kubectl_ok(&[
                "get",
                "storagepool",
                "node-1-files",
                "-o",
                "jsonpath={.status.phase} {.status.capacityGiB} {.spec.node}",
            ])
            .ok()
            .filter(|s| s.starts_with("Ready "))
    })
    .with_context(|| cloud.log())?;
    anyhow::ensure!(capacity.ends_with(" node-1"), "pool: {capacity}");
    let example = stratus_e2e::repo_root().join("examples/storage.yaml");
    let applied = wait_until(t, "examples/storage.yaml to apply", || {
        cloud
            .kubectl_ok(&["apply", "-f", example.to_str().unwrap_or_default()])
            .ok()
    })?;
    anyhow::ensure!(
        applied.contains("volume.storage.stratus.dev/scratch"),
        "{applied}"
    );
    let get = || {
        cloud
            .kubectl_ok(&[
                "-n",
                "demo",
                "get",
                "volume",
                "scratch",
                "-o",
                "jsonpath={.status.phase} {.status.pool}",
            ])
            .unwrap_or_default()
    };
    wait_until(t, "the example volume to be Available", || {
        (get() == "Available node-1-files").then_some(())
    })
    .with_context(|| format!("volume: {}\n{}", get(), cloud.log()))?;
    let files = pool_files(cloud.dir.path());
    anyhow::ensure!(files.len() == 1, "the pool's files: {files:?}");
    cloud.kubectl_ok(&["-n", "demo", "delete", "volume", "scratch", "--wait=false"])?;
    wait_until(t, "the volume's file to be removed", || {
        pool_files(cloud.dir.path()).is_empty().then_some(())
    })
    .with_context(|| format!("left: {:?}", pool_files(cloud.dir.path())))?;
    Ok(())
}
