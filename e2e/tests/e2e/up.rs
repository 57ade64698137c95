//! `stratus up` as a user runs it: what it starts goes with it.

use std::time::Duration;

use anyhow::{Context, Result};
use stratus_e2e::{Cloud, files_ending, output_of, wait_until};

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

/// The object store of a `stratus up --object-store` on `ip`: its servers' allow-list (an
/// nftables table the object agent leaves on purpose, which `stratus up` takes away when it
/// stops) is taken away when this is dropped, should the cloud have died without stopping.
pub(super) struct ObjectStoreAllowList(pub(super) &'static str);

impl ObjectStoreAllowList {
    fn table(&self) -> String {
        format!("stratus_swift_{}", self.0.replace('.', "_"))
    }

    pub(super) fn present(&self) -> bool {
        std::process::Command::new("nft")
            .args(["list", "table", "inet", &self.table()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }
}

impl Drop for ObjectStoreAllowList {
    fn drop(&mut self) {
        if self.present() {
            let _ = std::process::Command::new("nft")
                .args(["delete", "table", "inet", &self.table()])
                .status();
        }
    }
}

/// `stratus up --object-store` on `ip`:`port`, once it shows the store.
pub(super) fn object_store_up(ip: &str, port: u16) -> Result<Cloud> {
    object_store_up_with(ip, port, &[])
}

/// [`object_store_up`] with `extra` arguments of `stratus up`.
pub(super) fn object_store_up_with(ip: &str, port: u16, extra: &[&str]) -> Result<Cloud> {
    let port_arg = port.to_string();
    let mut args = vec![
        "--object-store",
        "--object-store-ip",
        ip,
        "--object-store-port",
        &port_arg,
    ];
    args.extend_from_slice(extra);
    let cloud = Cloud::up_with(&args)?;
    wait_until(
        Duration::from_secs(300),
        "stratus up to show the object store",
        || {
            cloud
                .log()
                .contains(&format!(
                    "Object store (Swift API and S3): http://{ip}:{port}"
                ))
                .then_some(())
        },
    )
    .with_context(|| cloud.log())?;
    Ok(cloud)
}

/// A killed `stratus up --object-store` (no shutdown runs, as after a crash or the OOM killer)
/// leaves no process of its store running: the proxy, the servers, their daemons and rsync
/// each get SIGTERM when it dies.
#[test]
fn the_object_store_does_not_outlive_a_killed_stratus_up() -> Result<()> {
    let allow_list = ObjectStoreAllowList("127.0.87.2");
    let mut cloud = object_store_up(allow_list.0, stratus_e2e::free_port())?;
    let kids: Vec<(u32, String, char)> = children(cloud.proc.pid())
        .into_iter()
        .filter(|(_, comm, _)| comm == "python3" || comm == "rsync")
        .collect();
    anyhow::ensure!(kids.len() >= 5, "the store's processes: {kids:?}");
    cloud.proc.kill();
    let running = || -> Vec<(u32, String)> {
        kids.iter()
            .filter(
                |(pid, comm, _)| matches!(stat(*pid), Some((c, _, s)) if s != 'Z' && c == *comm),
            )
            .map(|(pid, comm, _)| (*pid, comm.clone()))
            .collect()
    };
    wait_until(
        Duration::from_secs(120),
        "the store's processes to stop",
        || running().is_empty().then_some(()),
    )
    .with_context(|| format!("still running: {:?}", running()))?;
    Ok(())
}

/// `stratus up --object-store` runs a one-node Swift as a newcomer uses it: a Stratus user's
/// Keystone login gets a token whose catalog names the proxy and the user's project's account;
/// with that token an object is put and read back through the proxy (and lands on the
/// store's device in the data directory), Swift's own client reads it with the user's
/// password, boto3 with an S3 key issued through the API; another project's user is refused.
/// Stopped, `stratus up` leaves none of its processes (proxy, servers, daemons, rsync) and
/// no allow-list behind.
#[test]
fn stratus_up_runs_an_object_store_with_stratus_identity() -> Result<()> {
    // An address of this test's own (the servers' ports and rsync's 873 are fixed).
    let allow_list = ObjectStoreAllowList("127.0.87.1");
    let ip = allow_list.0;
    let port = stratus_e2e::free_port();
    let mut cloud = object_store_up(ip, port)?;
    let t = Duration::from_secs(300);
    let proxy_log = || {
        std::fs::read_to_string(cloud.dir.path().join("object-proxy/proxy.log")).unwrap_or_default()
    };

    cloud.projects(&["store1", "store2"])?;
    let password = "object-store-pw-1";
    for (user, project) in [("olga", "store1"), ("otto", "store2")] {
        cloud.member(user, project, password)?;
    }
    let ca = cloud.dir.path().join("pki/ca.crt");
    let identity = format!("{}/identity/v3", cloud.url);
    // A Keystone password login scoped to the project: the token and the catalog's endpoint.
    let login = |user: &str, project: &str| -> Result<(String, String)> {
        let body = serde_json::json!({"auth": {
            "identity": {"methods": ["password"], "password": {"user": {"name": user, "domain": {"id": "default"}, "password": password}}},
            "scope": {"project": {"name": project, "domain": {"id": "default"}}},
        }});
        let out = output_of(
            std::process::Command::new("curl")
                .args(["-sS", "-i", "--fail", "--cacert"])
                .arg(&ca)
                .args(["-H", "Content-Type: application/json", "--data-binary"])
                .arg(body.to_string())
                .arg(format!("{identity}/auth/tokens")),
            "a Keystone login",
        )?;
        let text = String::from_utf8_lossy(&out).replace("\r\n", "\n");
        let (head, body) = text.split_once("\n\n").context("no body")?;
        let token = head
            .lines()
            .find_map(|l| {
                l.split_once(':')
                    .filter(|(k, _)| k.eq_ignore_ascii_case("x-subject-token"))
                    .map(|(_, v)| v.trim().to_string())
            })
            .context("no X-Subject-Token")?;
        let body: serde_json::Value = serde_json::from_str(body)?;
        let endpoint = body["token"]["catalog"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|s| s["type"] == "object-store")
            .flat_map(|s| s["endpoints"].as_array().into_iter().flatten())
            .find(|e| e["interface"] == "public")
            .and_then(|e| e["url"].as_str())
            .with_context(|| format!("no object-store endpoint in {body}"))?
            .to_string();
        Ok((token, endpoint))
    };
    let (token, account) = login("olga", "store1")?;
    let uid = cloud.kubectl_ok(&["get", "project", "store1", "-o", "jsonpath={.metadata.uid}"])?;
    anyhow::ensure!(
        account == format!("http://{ip}:{port}/v1/AUTH_{uid}"),
        "the catalog names {account}"
    );
    // curl with the token: a container, an object put, read back.
    let curl = |args: &[&str], token: &str| {
        let mut c = std::process::Command::new("curl");
        c.args(["-sS", "--fail", "-H", &format!("X-Auth-Token: {token}")])
            .args(args);
        c
    };
    let data = b"hello from the object store\n";
    let file = cloud.dir.path().join("hello.txt");
    std::fs::write(&file, data)?;
    output_of(
        &mut curl(&["-X", "PUT", &format!("{account}/bucket1")], &token),
        "PUT a container",
    )
    .with_context(proxy_log)?;
    output_of(
        curl(&["-T"], &token)
            .arg(&file)
            .arg(format!("{account}/bucket1/hello.txt")),
        "PUT an object",
    )
    .with_context(proxy_log)?;
    let got = output_of(
        &mut curl(&[&format!("{account}/bucket1/hello.txt")], &token),
        "GET the object",
    )?;
    anyhow::ensure!(got == data, "read back {:?}", String::from_utf8_lossy(&got));
    let stored = files_ending(&cloud.dir.path().join("object-devices/d1/objects"), "data");
    anyhow::ensure!(stored.len() == 1, "on the device: {stored:?}");

    // Swift's client, with olga's password, finds the account through the catalog.
    let swift = output_of(
        std::process::Command::new("swift")
            .args(["--auth-version", "3", "--os-auth-url", &identity])
            .arg("--os-cacert")
            .arg(&ca)
            .args(["--os-username", "olga", "--os-password", password])
            .args(["--os-project-name", "store1"])
            .args(["--os-user-domain-name", "Default"])
            .args(["--os-project-domain-name", "Default"])
            .args(["download", "bucket1", "hello.txt", "-o", "-"]),
        "swift download",
    )?;
    anyhow::ensure!(swift == data, "swift read {swift:?}");

    // Another project's user is refused on store1's account.
    let (otto, _) = login("otto", "store2")?;
    let code = output_of(
        std::process::Command::new("curl")
            .args(["-sS", "-o", "/dev/null", "-w", "%{http_code}"])
            .args(["-H", &format!("X-Auth-Token: {otto}")])
            .arg(format!("{account}/bucket1/hello.txt")),
        "GET as otto",
    )?;
    anyhow::ensure!(
        code == b"403",
        "otto got {:?}",
        String::from_utf8_lossy(&code)
    );

    // S3 with a key issued through the Stratus API: the container is the bucket (whose name
    // S3 wants 3 to 63 characters long).
    let made: serde_json::Value = serde_json::from_str(&cloud.kubectl_in(
        &["create", "-f", "-", "-o", "json"],
        "apiVersion: identity.stratus.dev/v1\nkind: S3Credential\nmetadata:\n  name: olga-s3\n  namespace: store1\nspec:\n  user: olga\n",
    )?)?;
    let key = |f: &str| made["status"][f].as_str().unwrap_or_default().to_string();
    let s3 = output_of(
        std::process::Command::new("/usr/bin/python3").args([
            "-c",
            "import sys, boto3\nfrom botocore.config import Config\n\
             s3 = boto3.client('s3', endpoint_url=sys.argv[1], aws_access_key_id=sys.argv[2], \
             aws_secret_access_key=sys.argv[3], region_name='us-east-1', \
             config=Config(s3={'addressing_style': 'path'}, signature_version='s3v4'))\n\
             sys.stdout.buffer.write(s3.get_object(Bucket='bucket1', Key='hello.txt')['Body'].read())",
            &format!("http://{ip}:{port}"),
            &key("accessKeyId"),
            &key("secretAccessKey"),
        ]),
        "boto3",
    )
    .with_context(proxy_log)?;
    anyhow::ensure!(s3 == data, "S3 read {s3:?}");

    // Stopped, nothing of the store is left: no process of stratus up's, no allow-list.
    let up = cloud.proc.pid();
    let kids = children(up);
    let swift_processes = kids.iter().filter(|(_, comm, _)| comm == "python3").count();
    // The proxy, the three servers and, their rings installed, their daemons.
    anyhow::ensure!(swift_processes >= 5, "children of stratus up: {kids:?}");
    anyhow::ensure!(
        kids.iter().any(|(_, comm, _)| comm == "rsync"),
        "no rsync among {kids:?}"
    );
    anyhow::ensure!(allow_list.present(), "no allow-list while the store runs");
    output_of(
        std::process::Command::new("kill").args(["-TERM", &up.to_string()]),
        "kill -TERM stratus up",
    )?;
    wait_until(t, "stratus up to stop", || {
        (!cloud.proc.running()).then_some(())
    })
    .with_context(|| cloud.log())?;
    let left = |kids: &[(u32, String, char)]| -> Vec<(u32, String)> {
        kids.iter()
            .filter(
                |(pid, comm, _)| matches!(stat(*pid), Some((c, _, s)) if s != 'Z' && c == *comm),
            )
            .map(|(pid, comm, _)| (*pid, comm.clone()))
            .collect()
    };
    let still = left(&kids);
    anyhow::ensure!(still.is_empty(), "left running: {still:?}\n{}", cloud.log());
    anyhow::ensure!(!allow_list.present(), "the allow-list outlived stratus up");
    Ok(())
}

/// The pid of the Swift proxy among `stratus up`'s children (`up`), if it runs.
fn proxy_pid(up: u32) -> Option<u32> {
    children(up).into_iter().find_map(|(pid, comm, state)| {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        (comm == "python3"
            && state != 'Z'
            && String::from_utf8_lossy(&cmdline).contains("swift-proxy-server"))
        .then_some(pid)
    })
}

/// The status code of a GET of `url` (curl), if it answered.
fn http_code(url: &str) -> Option<String> {
    let out = std::process::Command::new("curl")
        .args([
            "-sS",
            "-m",
            "10",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            url,
        ])
        .output()
        .ok()?;
    Some(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The proxy of `stratus up --object-store` killed (as the OOM killer would) is started again
/// by `stratus up`, which says so in its log, and serves again: its health check answers and
/// a request without a token is refused by Stratus identity.
#[test]
fn stratus_up_starts_its_object_proxy_again_when_it_dies() -> Result<()> {
    let allow_list = ObjectStoreAllowList("127.0.87.3");
    let ip = allow_list.0;
    let port = stratus_e2e::free_port();
    let cloud = object_store_up(ip, port)?;
    let t = Duration::from_secs(300);
    let up = cloud.proc.pid();
    let health = format!("http://{ip}:{port}/healthcheck");
    let account = format!("http://{ip}:{port}/v1/AUTH_nobody");
    anyhow::ensure!(
        http_code(&health).as_deref() == Some("200"),
        "the proxy's health"
    );
    let first = proxy_pid(up).with_context(|| format!("no proxy among {:?}", children(up)))?;
    output_of(
        std::process::Command::new("kill").args(["-KILL", &first.to_string()]),
        "kill -KILL the proxy",
    )?;
    let second = wait_until(t, "a new proxy", || proxy_pid(up).filter(|p| *p != first))
        .with_context(|| cloud.log())?;
    wait_until(t, "the new proxy to serve", || {
        (http_code(&health).as_deref() == Some("200")).then_some(())
    })
    .with_context(|| cloud.log())?;
    anyhow::ensure!(
        http_code(&account).as_deref() == Some("401"),
        "a request without a token: {:?}",
        http_code(&account)
    );
    anyhow::ensure!(proxy_pid(up) == Some(second), "the proxy restarted again");
    let log = cloud.log();
    anyhow::ensure!(
        log.contains("the Swift proxy exited; starting it again")
            && log.contains("the Swift proxy started again"),
        "stratus up's log:\n{log}"
    );
    drop(cloud);
    Ok(())
}
