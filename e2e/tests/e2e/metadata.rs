//! The metadata service against a real API server and a real network agent (running as its
//! node, `system:node:NAME`): a node namespace, and two guest namespaces plugged in as the
//! devices of two Ports of one Network (10.64.0.0/24), one Port bound to Server `web` placed
//! on the node (with a Keypair and user data), the other bound to none. The guests take
//! their leases from the agent's dnsmasq, which hands out the host route to 169.254.169.254
//! through the DHCP server's address (option 121); `web`'s guest reads its own metadata, user
//! data and public key, the other guest's connections are closed unanswered, and an address
//! the port does not hold is dropped by anti-spoofing before it reaches the service.
//!
//! There the guests are namespaces, with curl as the guest's client: what is tested is the
//! wire a guest uses (DHCP, the route, HTTP from the port's address). Then real TCG guests on
//! a simulated node running `stratus agent --roles compute,network`: two Servers on one
//! tenant Network, each with a Keypair of its own, take their leases with option 121, read
//! `meta_data.json` through the route it gave, and print on their consoles what they were
//! told: each its own uuid, name and public key, never the other's.
//!
//! The namespace-guest test runs on a kernel node and on an Open vSwitch node (`--datapath
//! ovs`: the DHCP namespace's veth and the guests' ports on `br-int`, anti-spoofing and
//! security groups in its flows), with the same assertions; the real-guest test on a kernel
//! node only.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::{Value, json};
use stratus_e2e::net::{
    Datapath, Namespaces, Switch, UNDERLAY, lone_underlay, network_agent_on, plug_port,
};
use stratus_e2e::node::{Guest, Node, NodeNetns};
use stratus_e2e::{Apiserver, Cloud, Etcd, ip, netns_exec, repo_root, wait_until};

const NS: &str = "mdemo";

/// Generous: the agent shares two cores with every other test.
const T: Duration = Duration::from_secs(90);

/// GET `path` of the metadata service from `ns` (from `source`, if given): the HTTP status
/// (0 when nothing answered) and the body.
fn get(ns: &str, path: &str, source: Option<&str>) -> (u16, String) {
    let url = format!("http://169.254.169.254{path}");
    let mut args = vec!["curl", "-s", "-m", "5", "-w", "\n%{http_code}"];
    if let Some(s) = source {
        args.extend(["--interface", s]);
    }
    args.push(&url);
    let (_, out) = netns_exec(ns, &args);
    let (body, code) = out.rsplit_once('\n').unwrap_or(("", &out));
    (code.trim().parse().unwrap_or_default(), body.to_owned())
}

/// A simulated node, its named network namespace and, on an OVS node, its switch. Dropped:
/// the agent is stopped first, so that it makes no DHCP server or switch again, then the
/// switch and the namespace's DHCP servers go (while the node's directory that lists them is
/// still there), then the node.
struct NetworkNode {
    _switch: Option<Switch>,
    _net: NodeNetns,
    node: Node,
}

impl Drop for NetworkNode {
    fn drop(&mut self) {
        self.node.kill_agent();
    }
}

/// Takes a lease in `ns` with busybox's udhcpc asking for option 121 and applying the
/// address and routes as a guest's client does; the routes it was given.
fn lease(ns: &str, dir: &Path) -> Result<String> {
    let script = dir.join("udhcpc.sh");
    let result = dir.join(format!("routes-{ns}"));
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\n[ \"$1\" = bound ] || exit 0\n\
             ip addr add \"$ip/$mask\" dev \"$interface\"\n\
             set -- $staticroutes\n\
             while [ $# -ge 2 ]; do ip route replace \"$1\" via \"$2\" dev \"$interface\"; shift 2; done\n\
             echo \"$staticroutes\" > '{}'\n",
            result.display()
        ),
    )?;
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    let script = script.to_string_lossy().into_owned();
    let args = [
        "busybox",
        "udhcpc",
        "-i",
        "eth0",
        "-n",
        "-q",
        "-f",
        "-t",
        "5",
        "-T",
        "1",
        "-O",
        "staticroutes",
        "-s",
        &script,
    ];
    wait_until(T, &format!("a lease in {ns}"), || {
        netns_exec(ns, &args);
        std::fs::read_to_string(&result).ok()
    })
    .map(|r| r.trim().to_owned())
}

/// A field of `kind` `name` in the project, by JSONPath.
fn field(api: &Apiserver, kind: &str, name: &str, path: &str) -> Result<String> {
    api.jsonpath(NS, kind, name, path)
}

/// Merge-patches the status of `kind` `name` in the project, as an admin.
fn status(api: &Apiserver, kind: &str, name: &str, status: Value) -> Result<String> {
    api.patch_status(NS, kind, name, status)
}

#[test]
fn a_guest_reads_its_own_metadata_and_no_one_elses() -> Result<()> {
    reads_its_own("md", Datapath::Kernel)
}

#[test]
fn a_guest_reads_its_own_metadata_and_no_one_elses_on_ovs() -> Result<()> {
    reads_its_own("mdo", Datapath::Ovs)
}

/// The test on a node of `datapath`, its namespaces named after `prefix`.
fn reads_its_own(prefix: &str, datapath: Datapath) -> Result<()> {
    let etcd = Etcd::start()?;
    let mut api = Apiserver::start_on(&etcd)?;
    api.projects(&[NS])?;
    let tag = std::process::id();
    let node = format!("{prefix}-{tag}-n1");
    let (g1, g2) = (format!("{prefix}-{tag}-g1"), format!("{prefix}-{tag}-g2"));
    let state = tempfile::tempdir()?;
    let _host = Namespaces::add(&[&node, &g1, &g2], &[state.path()])?;
    // An OVS node's switch, stopped after the agent and before the namespaces go.
    let _switch = (datapath == Datapath::Ovs).then(|| Switch::of_state(state.path()));
    lone_underlay(&node, &format!("{}/24", UNDERLAY[0]))?;

    let key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBn0cLb3k3Cg4Qm0metadata e2e";
    api.kubectl_in(
        &["apply", "-f", "-"],
        &format!(
            r#"
apiVersion: compute.stratus.dev/v1
kind: Hypervisor
metadata: {{name: {node}}}
spec: {{hypervisorType: qemu}}
---
apiVersion: compute.stratus.dev/v1
kind: Keypair
metadata: {{name: mykey, namespace: {NS}}}
spec: {{publicKey: "{key}"}}
---
apiVersion: compute.stratus.dev/v1
kind: Server
metadata: {{name: web, namespace: {NS}}}
spec: {{flavor: m1.nano, image: tiny, keypair: mykey, userData: I2Nsb3VkLWNvbmZpZwpob3N0bmFtZTogd2ViCg==}}
---
apiVersion: network.stratus.dev/v1
kind: Network
metadata: {{name: net, namespace: {NS}}}
spec: {{}}
---
apiVersion: network.stratus.dev/v1
kind: Subnet
metadata: {{name: sn, namespace: {NS}}}
spec: {{network: net, cidr: 10.64.0.0/24, gatewayIP: 10.64.0.1}}
---
apiVersion: network.stratus.dev/v1
kind: SecurityGroup
metadata: {{name: default, namespace: {NS}}}
spec:
  rules:
  - {{direction: egress}}
---
apiVersion: network.stratus.dev/v1
kind: Port
metadata: {{name: web-0, namespace: {NS}}}
spec: {{network: net, fixedIPs: [{{ipAddress: 10.64.0.11}}]}}
---
apiVersion: network.stratus.dev/v1
kind: Port
metadata: {{name: stray, namespace: {NS}}}
spec: {{network: net, fixedIPs: [{{ipAddress: 10.64.0.12}}]}}
"#
        ),
    )?;
    // What the scheduler and the compute agent would write: web placed on the node, its
    // port bound to it there with the device the hypervisor made.
    let flavors = repo_root().join("examples/flavors.yaml");
    api.kubectl_ok(&["apply", "-f", flavors.to_str().unwrap_or_default()])?;
    api.kubectl_ok(&[
        "patch",
        "hypervisor",
        &node,
        "--subresource=status",
        "--type=merge",
        "-p",
        r#"{"status":{"capacity":{"vcpus":8,"ramMiB":8192,"diskGiB":64}}}"#,
    ])?;
    api.kubectl_in(
        &[
            "create",
            "--raw",
            &format!("/apis/compute.stratus.dev/v1/namespaces/{NS}/servers/web/binding"),
            "-f",
            "-",
        ],
        &json!({"target": {"name": node}}).to_string(),
    )?;
    let uid = field(&api, "server", "web", "{.metadata.uid}")?;
    // What the ports controller would write: web's addresses name its port.
    status(
        &api,
        "server",
        "web",
        json!({"addresses": [{"network": "net", "port": "web-0", "ip": "10.64.0.11"}]}),
    )?;
    for (i, (port, guest, bound)) in [("web-0", &g1, Some("web")), ("stray", &g2, None)]
        .into_iter()
        .enumerate()
    {
        status(&api, "port", port, json!({ "boundTo": bound }))?;
        plug_port(
            &api,
            NS,
            port,
            &node,
            &format!("tp-md-{}", i + 1),
            guest,
            None,
        )?;
    }

    // The agent, as its node.
    let ids = tempfile::tempdir()?;
    api.node_identities(&[&node], ids.path())?;
    let kubeconfig = ids.path().join(format!("{node}.kubeconfig"));
    let _agent = network_agent_on(&node, datapath, UNDERLAY[0], &kubeconfig, state.path(), &[])?;
    let log = || std::fs::read_to_string(state.path().join("agent.log")).unwrap_or_default();
    for port in ["web-0", "stray"] {
        wait_until(T, &format!("{port} Active"), || {
            field(&api, "port", port, "{.status.phase}")
                .ok()
                .filter(|p| p == "Active")
        })
        .with_context(log)?;
    }
    let dhcp_ip = field(&api, "subnet", "sn", "{.status.dhcpIP}")?;

    // Each guest's lease carries the route to the metadata address through the DHCP server.
    for g in [&g1, &g2] {
        let routes = lease(g, state.path()).with_context(log)?;
        assert!(
            routes.starts_with(&format!("169.254.169.254/32 {dhcp_ip}")),
            "{routes}"
        );
    }

    // web's guest reads web's metadata (the listener may come a converge after DHCP).
    let (code, body) = wait_until(T, "web's metadata", || {
        Some(get(&g1, "/openstack/latest/meta_data.json", None)).filter(|(c, _)| *c == 200)
    })
    .with_context(log)?;
    let md: Value = serde_json::from_str(&body).with_context(|| format!("{code} {body}"))?;
    assert_eq!(md["uuid"], uid.as_str(), "{md}");
    assert_eq!(
        (&md["name"], &md["hostname"]),
        (&json!("web"), &json!("web"))
    );
    assert_eq!(md["project_id"], NS);
    assert_eq!(md["public_keys"]["mykey"], key);
    assert_eq!(
        get(&g1, "/openstack/latest/user_data", None),
        (200, "#cloud-config\nhostname: web\n".to_owned())
    );
    assert_eq!(
        get(&g1, "/latest/meta-data/public-keys/0/openssh-key", None),
        (200, format!("{key}\n"))
    );
    assert_eq!(
        get(&g1, "/latest/meta-data/local-ipv4", None),
        (200, "10.64.0.11".to_owned())
    );
    // A port bound to no server: closed unanswered.
    let (code, body) = get(&g2, "/openstack/latest/meta_data.json", None);
    assert_eq!(code, 0, "{body}");
    // An address the port does not hold never reaches the service: anti-spoofing drops it.
    ip(&["-n", &g1, "addr", "add", "10.64.0.99/24", "dev", "eth0"])?;
    let (code, body) = get(&g1, "/openstack/latest/meta_data.json", Some("10.64.0.99"));
    assert_eq!(code, 0, "{body}");

    // The port unbound from web (as when it is detached): it asks for no one any more.
    status(&api, "port", "web-0", json!({"boundTo": null}))?;
    wait_until(T, "no answer once web's port is unbound", || {
        Some(get(&g1, "/openstack/latest/meta_data.json", None)).filter(|(c, _)| *c == 0)
    })?;
    Ok(())
}

/// The Server `name` in the project, as JSON.
fn server(cloud: &Cloud, name: &str) -> Option<Value> {
    let out = cloud
        .kubectl_ok(&["-n", NS, "get", "server", name, "-o", "json"])
        .ok()?;
    serde_json::from_str(&out).ok()
}

#[test]
fn real_guests_print_the_metadata_they_read_each_their_own() -> Result<()> {
    real_guests_read_their_own("mdg", Datapath::Kernel)
}

/// On OVS the guest's TCP reaches the DHCP namespace's veth through the switch, whose
/// connection tracking takes it as good, with nothing set in the guest (its NIC, defined
/// with no checksum offload on an OVS node, fills in its own checksums; the reply from the
/// veth leaves them to the switch, which reads them from its virtio-net header).
#[test]
fn real_guests_print_the_metadata_they_read_each_their_own_on_ovs() -> Result<()> {
    real_guests_read_their_own("mdgo", Datapath::Ovs)
}

/// The real-guest test on a node of `datapath` named after `prefix`.
fn real_guests_read_their_own(prefix: &str, datapath: Datapath) -> Result<()> {
    let guest = Guest::serve()?;
    let name = format!("{prefix}-{}", std::process::id());
    let node = Node::start(&name)?;
    let cloud = Cloud::up_with(&["--nodes", &name])?;
    cloud.projects(&[NS])?;
    // The group applied below edits the controllers' `default` once it is there.
    cloud.default_group_made(NS)?;
    let flavors = repo_root().join("examples/flavors.yaml");
    cloud.kubectl_ok(&["apply", "-f", flavors.to_str().unwrap_or_default()])?;
    cloud.kubectl_in(&["apply", "-f", "-"], &guest.images_yaml(NS)?)?;
    let keys = [
        (
            "webkey",
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIE7lgKJV2y1kDKnzKNiF3cXeqj0OcEXiLdmJaAga9+6Y web@e2e",
        ),
        (
            "dbkey",
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAINxEXTSzYv/iwq47g2A1XVi8B+zkXayw8vC1JeOqWl1Q db@e2e",
        ),
    ];
    cloud.kubectl_in(
        &["-n", NS, "apply", "-f", "-"],
        &format!(
            r#"
apiVersion: network.stratus.dev/v1
kind: Network
metadata: {{name: blue}}
spec: {{}}
---
apiVersion: network.stratus.dev/v1
kind: Subnet
metadata: {{name: blue-v4}}
spec: {{network: blue, cidr: 10.76.0.0/24}}
---
apiVersion: network.stratus.dev/v1
kind: SecurityGroup
metadata: {{name: default}}
spec:
  rules:
  - {{direction: egress}}
---
apiVersion: compute.stratus.dev/v1
kind: Keypair
metadata: {{name: {k0}}}
spec: {{publicKey: "{v0}"}}
---
apiVersion: compute.stratus.dev/v1
kind: Keypair
metadata: {{name: {k1}}}
spec: {{publicKey: "{v1}"}}
"#,
            k0 = keys[0].0,
            v0 = keys[0].1,
            k1 = keys[1].0,
            v1 = keys[1].1,
        ),
    )?;

    // The node's namespace (libvirtd's, where QEMU's taps appear), named for the network
    // agent, with a tunnel address; the agent with the compute and network roles.
    let net = node.netns(&format!("{}/24", UNDERLAY[0]))?;
    let switch = (datapath == Datapath::Ovs).then(|| Switch::of_state(&node.state_dir()));
    let mut rig = NetworkNode {
        _switch: switch,
        _net: net,
        node,
    };
    rig.node
        .start_compute_network_agent(&cloud, UNDERLAY[0], &["--datapath", datapath.name()])?;
    let node = &rig.node;

    let servers = ["web", "db"];
    for (server, (key, _)) in servers.iter().zip(keys) {
        cloud.kubectl_in(
            &["-n", NS, "apply", "-f", "-"],
            &format!(
                "apiVersion: compute.stratus.dev/v1\nkind: Server\nmetadata:\n  name: {server}\nspec:\n  flavor: m1.nano\n  image: tiny\n  keypair: {key}\n  networks:\n  - network: blue\n"
            ),
        )?;
    }
    let mut uids = Vec::new();
    for s in servers {
        let running = wait_until(T, &format!("{s} running"), || {
            server(&cloud, s).filter(|v| v["status"]["phase"] == "Running")
        })
        .with_context(|| node.agent_log())?;
        uids.push(
            running["metadata"]["uid"]
                .as_str()
                .context("a uid")?
                .to_owned(),
        );
    }

    // Each guest's DHCP client asked for option 121 and installed the route to the metadata
    // address it carries; the guest then read meta_data.json and printed what it says. A TCG
    // guest on a loaded machine is slow to boot: the wait is long, and ends on the lines.
    for (i, s) in servers.iter().enumerate() {
        let (uid, (key_name, key)) = (&uids[i], keys[i]);
        let (other_uid, (_, other_key)) = (&uids[1 - i], keys[1 - i]);
        let told = format!("STRATUS-GUEST-METADATA uuid={uid} name={s} hostname={s}\n");
        let key_line = format!("STRATUS-GUEST-METADATA-KEY {key_name} {key}\n");
        let console = wait_until(Duration::from_secs(240), &format!("{s}'s metadata"), || {
            // Done once the guest has given up or printed a whole key line, whose ever.
            let c = node.console(uid);
            let done = c.contains("STRATUS-GUEST-METADATA none")
                || c.split_inclusive('\n')
                    .any(|l| l.contains("STRATUS-GUEST-METADATA-KEY ") && l.ends_with('\n'));
            done.then_some(c)
        })
        .with_context(|| {
            format!(
                "console:\n{}\nagent:\n{}",
                node.console(uid),
                node.agent_log()
            )
        })?;
        assert!(console.contains(&told), "{console}");
        assert!(console.contains(&key_line), "{console}");
        assert!(!console.contains(other_uid.as_str()), "{console}");
        assert!(!console.contains(other_key), "{console}");
    }
    drop(rig);
    Ok(())
}
