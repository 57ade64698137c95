//! The metadata service against a real API server and a real network agent (running as its
//! node, `system:node:NAME`): a node namespace, and two guest namespaces plugged in as the
//! devices of two Ports of one Network (10.64.0.0/24), one Port bound to Server `web` placed
//! on the node (with a Keypair and user data), the other bound to none. The guests take
//! their leases from the agent's dnsmasq, which hands out the host route to 169.254.169.254
//! through the DHCP server's address (option 121); `web`'s guest reads its own metadata, user
//! data and public key, the other guest's connections are closed unanswered, and an address
//! the port does not hold is dropped by anti-spoofing before it reaches the service.
//!
//! The guests are namespaces, not QEMU guests: what is tested is the wire a guest uses (DHCP,
//! the route, HTTP from the port's address), with curl as the guest's client.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::{Value, json};
use stratus_e2e::{Apiserver, Etcd, Proc, ip, netns_exec, stratus_bin, wait_until};

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

/// Namespaces, and the agent's DHCP servers and their namespaces, removed when dropped.
struct Host {
    namespaces: Vec<String>,
    dhcp_dir: std::path::PathBuf,
}

impl Drop for Host {
    fn drop(&mut self) {
        for e in std::fs::read_dir(&self.dhcp_dir)
            .into_iter()
            .flatten()
            .flatten()
        {
            if let Ok(pid) = std::fs::read_to_string(e.path().join("pid")) {
                let _ = Command::new("kill").arg(pid.trim()).status();
            }
            let _ = ip(&["netns", "del", &e.file_name().to_string_lossy()]);
        }
        for n in &self.namespaces {
            let _ = ip(&["netns", "del", n]);
        }
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
    api.kubectl_ok(&[
        "-n",
        NS,
        "get",
        kind,
        name,
        "-o",
        &format!("jsonpath={path}"),
    ])
}

/// Merge-patches the status of `kind` `name` in the project, as an admin.
fn status(api: &Apiserver, kind: &str, name: &str, status: Value) -> Result<String> {
    api.kubectl_ok(&[
        "-n",
        NS,
        "patch",
        kind,
        name,
        "--subresource=status",
        "--type=merge",
        "-p",
        &json!({ "status": status }).to_string(),
    ])
}

#[test]
fn a_guest_reads_its_own_metadata_and_no_one_elses() -> Result<()> {
    let etcd = Etcd::start()?;
    let mut api = Apiserver::start_on(&etcd)?;
    api.projects(&[NS])?;
    let tag = std::process::id();
    let node = format!("md-{tag}-n1");
    let (g1, g2) = (format!("md-{tag}-g1"), format!("md-{tag}-g2"));
    let state = tempfile::tempdir()?;
    let _host = Host {
        namespaces: vec![node.clone(), g1.clone(), g2.clone()],
        dhcp_dir: state.path().join("network/dhcp"),
    };
    for n in [&node, &g1, &g2] {
        ip(&["netns", "add", n])?;
    }
    ip(&[
        "-n",
        &node,
        "link",
        "add",
        "underlay",
        "type",
        "veth",
        "peer",
        "name",
        "underlay-peer",
    ])?;
    ip(&["-n", &node, "link", "set", "underlay-peer", "up"])?;
    ip(&[
        "-n",
        &node,
        "addr",
        "add",
        "192.0.2.1/24",
        "dev",
        "underlay",
    ])?;
    ip(&["-n", &node, "link", "set", "underlay", "up"])?;

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
    let flavors = stratus_e2e::repo_root().join("examples/flavors.yaml");
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
        let device = format!("tp-md-{}", i + 1);
        status(
            &api,
            "port",
            port,
            json!({"hypervisor": node, "interfaceName": device, "boundTo": bound}),
        )?;
        let mac = field(&api, "port", port, "{.status.macAddress}")?;
        ip(&[
            "link", "add", &device, "netns", &node, "type", "veth", "peer", "name", "eth0",
            "netns", guest,
        ])?;
        ip(&["-n", guest, "link", "set", "eth0", "address", &mac, "up"])?;
        ip(&["-n", guest, "link", "set", "lo", "up"])?;
    }

    // The agent, as its node.
    let admin = api.kubeconfig();
    let tokens = admin.with_file_name("tokens.csv");
    let token = format!("{node}-token-0123456789abcdef");
    let mut text = std::fs::read_to_string(&tokens)?;
    text.push_str(&format!("{token},system:node:{node}\n"));
    std::fs::write(&tokens, text)?;
    let kubeconfig = state.path().join("node.kubeconfig");
    std::fs::write(
        &kubeconfig,
        std::fs::read_to_string(&admin)?.replace(stratus_e2e::TEST_TOKEN, &token),
    )?;
    api.restart()?;
    let _agent = Proc::spawn(
        "network agent",
        Command::new(stratus_bin())
            .args(["agent", "--roles", "network", "--node", &node])
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .arg("--state-dir")
            .arg(state.path())
            .args([
                "--network-namespace",
                &node,
                "--network-resync-seconds",
                "1",
            ])
            .args(["--underlay-ip", "192.0.2.1"]),
        &state.path().join("agent.log"),
    )?;
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
