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
        Duration::from_secs(60),
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
    let t = Duration::from_secs(180);
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
    let dhcp = std::fs::read_link(cloud.dir.path().join("network-dhcp"))?;
    // Stopped before the namespace goes.
    drop(cloud);
    // The cloud's (empty) directory for its DHCP servers under /run/stratus.
    if let Some(run) = dhcp.parent() {
        std::fs::remove_dir_all(run)?;
    }
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

/// Removes, when dropped, the DHCP namespaces and dnsmasq processes a node's network agent
/// left in its state directory (`dir`, known once the cloud is up), and the node namespace's
/// name. Declared before the cloud, so it runs after the cloud (and its agent) stopped.
struct NodeNetwork {
    name: String,
    dhcp_dir: Option<std::path::PathBuf>,
}

impl Drop for NodeNetwork {
    fn drop(&mut self) {
        for e in self
            .dhcp_dir
            .iter()
            .filter_map(|d| std::fs::read_dir(d).ok())
            .flatten()
            .flatten()
        {
            if let Ok(pid) = std::fs::read_to_string(e.path().join("pid")) {
                let _ = std::process::Command::new("kill").arg(pid.trim()).status();
            }
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", &e.file_name().to_string_lossy()])
                .output();
        }
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
        // The cloud's directory under /run/stratus, made for its DHCP servers.
        if let Some(run) = self.dhcp_dir.as_deref().and_then(std::path::Path::parent) {
            let _ = std::fs::remove_dir_all(run);
        }
    }
}

fn get_json(cloud: &Cloud, kind: &str, name: &str) -> Option<serde_json::Value> {
    let out = cloud
        .kubectl_ok(&["-n", "demo", "get", kind, name, "-o", "json"])
        .ok()?;
    serde_json::from_str(&out).ok()
}

/// The demo as the README's first command runs it: `stratus up --compute` (one node running
/// the compute and network roles, its VXLAN underlay the default 127.0.0.1) with the
/// examples' project, flavors, network and tiny guest applied; the guest `tiny-1` boots on the
/// example network and takes its Port's address by DHCP, and `kubectl get server -o wide`
/// shows it. The node is a libvirtd in a network namespace of its own (named for the agent
/// with `--network-namespace`), so the host is left alone.
#[test]
fn the_demo_guest_takes_its_address_on_the_example_network_by_dhcp() -> Result<()> {
    let guest = stratus_e2e::node::Guest::serve()?;
    let name = format!("stratus-demo-{}", std::process::id());
    let node = stratus_e2e::node::Node::start(&name)?;
    let pid = std::fs::read_to_string(node.dir.path().join("libvirtd.pid"))?;
    let mut net = NodeNetwork {
        name: name.clone(),
        dhcp_dir: None,
    };
    let ok = std::process::Command::new("ip")
        .args(["netns", "attach", &name, pid.trim()])
        .status()?
        .success();
    anyhow::ensure!(ok, "ip netns attach {name}");
    let cloud = Cloud::up_with(&["--compute", &node.uri(), "--network-namespace", &name])?;
    // `stratus up` links the node's DHCP directory (outside its private data directory) there
    // as it starts the agents.
    let link = cloud.dir.path().join("network-dhcp");
    net.dhcp_dir = Some(wait_until(
        Duration::from_secs(90),
        "the DHCP directory's link",
        || std::fs::read_link(&link).ok(),
    )?);
    let examples = stratus_e2e::repo_root().join("examples");
    for file in ["demo-project.yaml", "flavors.yaml", "network.yaml"] {
        let path = examples.join(file);
        cloud.kubectl_ok(&["apply", "-f", path.to_str().unwrap_or_default()])?;
    }
    // The demo's key (examples/server.yaml, whose other servers' images are on the internet).
    let server_yaml = std::fs::read_to_string(examples.join("server.yaml"))?;
    let keypair = server_yaml
        .split("\n---\n")
        .find(|doc| doc.contains("kind: Keypair"))
        .context("examples/server.yaml has a Keypair")?;
    cloud.kubectl_in(&["apply", "-f", "-"], keypair)?;
    // The tiny guest's Images name the demo's file server; the test serves the same files.
    let tiny = std::fs::read_to_string(examples.join("tiny-guest.yaml"))?
        .replace("http://127.0.0.1:8099", &guest.url);
    cloud.kubectl_in(&["apply", "-f", "-"], &tiny)?;

    let t = Duration::from_secs(240);
    let log = || {
        let objects = cloud
            .kubectl_ok(&["-n", "demo", "get", "servers,ports,subnets", "-o", "yaml"])
            .unwrap_or_default();
        format!("{}\nobjects:\n{objects}", cloud.log())
    };
    let server = wait_until(t, "tiny-1 running", || {
        get_json(&cloud, "server", "tiny-1").filter(|s| s["status"]["phase"] == "Running")
    })
    .with_context(log)?;
    let address = server["status"]["addresses"][0]["ip"]
        .as_str()
        .context("tiny-1 has an address in status.addresses")?
        .to_owned();
    assert_eq!(server["status"]["addresses"][0]["network"], "private");
    assert!(address.starts_with("10.0.0."), "{address}");
    let wide = cloud.kubectl_ok(&["-n", "demo", "get", "server", "tiny-1", "-o", "wide"])?;
    assert!(wide.contains(&address), "{wide}");
    let uid = server["metadata"]["uid"].as_str().unwrap_or_default();
    let console = || {
        std::fs::read_to_string(
            cloud
                .dir
                .path()
                .join(format!("compute/servers/{uid}/console.log")),
        )
        .unwrap_or_default()
        .replace('\r', "")
    };
    // The guest's DHCP client got the address IPAM gave its Port, from the node's DHCP
    // server, through the tap libvirt made and the network agent bridged.
    let want = format!("STRATUS-GUEST-DHCP eth0 {address}\n");
    wait_until(t, "tiny-1's DHCP lease", || {
        console().contains(&want).then_some(())
    })
    .with_context(|| {
        // What the node holds, to see where the DHCP exchange stops.
        let run = |args: &[&str]| {
            std::process::Command::new(args[0])
                .args(&args[1..])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default()
        };
        let mut dhcp = String::new();
        for e in net
            .dhcp_dir
            .iter()
            .filter_map(|d| std::fs::read_dir(d).ok())
            .flatten()
            .flatten()
        {
            let ns = e.file_name().to_string_lossy().into_owned();
            dhcp.push_str(&format!(
                "{ns}: {}\n",
                run(&["ip", "-n", &ns, "-br", "addr"])
            ));
            for f in std::fs::read_dir(e.path()).into_iter().flatten().flatten() {
                dhcp.push_str(&format!(
                    "{}:\n{}\n",
                    f.path().display(),
                    std::fs::read_to_string(f.path()).unwrap_or_default()
                ));
            }
        }
        format!(
            "console:\n{}\nlinks:\n{}\nnft:\n{}\ndhcp:\n{dhcp}\n{}",
            console(),
            run(&["ip", "-n", &name, "-d", "-br", "link"]),
            run(&["ip", "netns", "exec", &name, "nft", "list", "ruleset"]),
            log()
        )
    })?;
    drop(cloud);
    drop(node);
    drop(net);
    Ok(())
}
