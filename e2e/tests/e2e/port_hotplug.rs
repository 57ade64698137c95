//! Port hot-plug on a running server (`openstack server add port` / `remove port`): a real
//! TCG guest on a simulated node (its libvirtd, QEMU and `stratus agent --roles
//! compute,network` in a namespace of their own). A Port added to the running Server's
//! `spec.networks` is plugged in live and into the definition with the Port's MAC, the network
//! agent wires its tap, and the guest's kernel finds a new network device without a restart;
//! an interface unplugged behind the agent's back comes back, one plugged in that no Port
//! names goes; the Port taken out of the spec is unplugged live and from the definition, its
//! tap is gone and the Port no longer names the server. A stale concurrent edit is a 409.
//! The guest runs DHCP on every NIC it has, at boot and as one is plugged in: each takes its
//! Port's address from the node's DHCP server, the hot-plugged one too, and again when it
//! comes back after being unplugged behind the agent's back.

use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::Value;
use stratus_agents::compute::driver::{InterfaceSpec, xml};
use stratus_e2e::node::{Guest, Node};
use stratus_e2e::{Cloud, ip, repo_root, wait_until};

/// Generous: guests run under TCG on a loaded 2-core machine.
const T: Duration = Duration::from_secs(180);

/// How the guest's kernel announces a network controller it finds on the PCI bus (virtio-net
/// is class 0x020000), at boot and when one is plugged in.
const NIC_FOUND: &str = "class 0x020000";

fn get(cloud: &Cloud, kind: &str, name: &str) -> Option<Value> {
    let out = cloud
        .kubectl_ok(&["-n", "demo", "get", kind, name, "-o", "json"])
        .ok()?;
    serde_json::from_str(&out).ok()
}

/// The reasons of the Events recorded on server `name`.
fn event_reasons(cloud: &Cloud, name: &str) -> Vec<String> {
    let selector = format!("involvedObject.name={name},involvedObject.kind=Server");
    cloud
        .kubectl_ok(&[
            "-n",
            "demo",
            "get",
            "events",
            "--field-selector",
            &selector,
            "-o",
            "json",
        ])
        .ok()
        .and_then(|o| serde_json::from_str::<Value>(&o).ok())
        .and_then(|v| v["items"].as_array().cloned())
        .unwrap_or_default()
        .iter()
        .filter_map(|e| e["reason"].as_str().map(str::to_owned))
        .collect()
}

/// How many leases of address `ip` the guest announced on its console
/// (`STRATUS-GUEST-DHCP <iface> <ip>`, one a lease taken).
fn leases(console: &str, ip: &str) -> usize {
    console
        .lines()
        .filter(|l| {
            let mut words = l.split_whitespace();
            words.next() == Some("STRATUS-GUEST-DHCP") && words.nth(1) == Some(ip)
        })
        .count()
}

/// `virsh VERB DOMAIN FILE --live --config` with `element` (a device's XML) in the file: a
/// change made behind the agent's back.
fn virsh_device(node: &Node, verb: &str, domain: &str, element: &str) -> Result<()> {
    let file = tempfile::NamedTempFile::new()?;
    std::fs::write(file.path(), element)?;
    let path = file.path().to_str().context("a UTF-8 path")?;
    let out = node.virsh(&[verb, domain, path, "--live", "--config"])?;
    anyhow::ensure!(
        out.status.success(),
        "virsh {verb}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

#[test]
fn a_port_added_to_a_running_server_is_plugged_in_live_and_out_again() -> Result<()> {
    let guest = Guest::serve()?;
    let name = format!("hp-{}", std::process::id());
    let mut node = Node::start(&name)?;
    let cloud = Cloud::up_with(&["--nodes", &name])?;
    cloud.projects(&["demo"])?;
    let flavors = repo_root().join("examples/flavors.yaml");
    cloud.kubectl_ok(&["apply", "-f", flavors.to_str().unwrap_or_default()])?;
    // The tiny guest with the kernel's messages on the console: it names the PCI devices it
    // finds, at boot and when one is plugged in.
    let images = guest
        .images_yaml("demo")?
        .replace("console=ttyS0 quiet", "console=ttyS0 loglevel=7");
    cloud.kubectl_in(&["apply", "-f", "-"], &images)?;
    // The group applied here edits the controllers' `default` once it is there.
    cloud.default_group_made("demo")?;
    cloud.kubectl_in(
        &["-n", "demo", "apply", "-f", "-"],
        "apiVersion: network.stratus.dev/v1\nkind: Network\nmetadata:\n  name: blue\nspec: {}\n---\n\
         apiVersion: network.stratus.dev/v1\nkind: Subnet\nmetadata:\n  name: blue-v4\nspec:\n  network: blue\n  cidr: 10.76.0.0/24\n---\n\
         apiVersion: network.stratus.dev/v1\nkind: Network\nmetadata:\n  name: green\nspec: {}\n---\n\
         apiVersion: network.stratus.dev/v1\nkind: Subnet\nmetadata:\n  name: green-v4\nspec:\n  network: green\n  cidr: 10.77.0.0/24\n---\n\
         apiVersion: network.stratus.dev/v1\nkind: Port\nmetadata:\n  name: extra\nspec:\n  network: green\n---\n\
         apiVersion: network.stratus.dev/v1\nkind: SecurityGroup\nmetadata:\n  name: default\nspec:\n  rules:\n  - {direction: egress}\n",
    )?;

    // The node's namespace (libvirtd's, where QEMU's taps appear), named for the network
    // agent, with a tunnel address of the test's own.
    let _netns = node.netns("192.0.2.1/24")?;
    // Long resync: what the test sees of drift is repaired on libvirt's device events.
    node.start_compute_network_agent(&cloud, "192.0.2.1", &["--resync-seconds", "600"])?;
    let log = |node: &Node, uid: &str| {
        let alive = node
            .agent
            .as_ref()
            .is_some_and(|a| std::path::Path::new(&format!("/proc/{}", a.pid())).exists());
        format!(
            "console:\n{}\nagent (running: {alive}):\n{}\nlinks:\n{}\ninterfaces:\n{}",
            node.console(uid),
            node.agent_log(),
            ip(&["-n", &name, "-d", "link"]).unwrap_or_default(),
            node.virsh(&["domiflist", &format!("stratus-{uid}")])
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default(),
        )
    };

    cloud.kubectl_in(
        &["apply", "-f", "-"],
        "apiVersion: compute.stratus.dev/v1\nkind: Server\nmetadata:\n  name: web\n  namespace: demo\nspec:\n  flavor: m1.nano\n  image: tiny\n  networks:\n  - network: blue\n",
    )?;
    let server = wait_until(T, "the guest running", || {
        get(&cloud, "server", "web").filter(|s| s["status"]["phase"] == "Running")
    })
    .with_context(|| node.agent_log())?;
    let uid = server["metadata"]["uid"]
        .as_str()
        .context("a uid")?
        .to_owned();
    let domain = format!("stratus-{uid}");
    let first = get(&cloud, "port", "web-0").context("port web-0")?;
    wait_until(T, "the guest booted", || {
        node.console(&uid)
            .contains("STRATUS-GUEST-READY hostname=web")
            .then_some(())
    })
    .with_context(|| log(&node, &uid))?;
    let nics_at_boot = node.console(&uid).matches(NIC_FOUND).count();
    assert_eq!(nics_at_boot, 1, "{}", node.console(&uid));
    // The NIC it booted with takes web-0's address by DHCP.
    let address = |port: &Value| {
        port["status"]["fixedIPs"][0]["ipAddress"]
            .as_str()
            .map(str::to_owned)
            .context("the port's address")
    };
    let first_ip = address(&first)?;
    wait_until(T, "the guest's lease on the NIC it booted with", || {
        (leases(&node.console(&uid), &first_ip) >= 1).then_some(())
    })
    .with_context(|| log(&node, &uid))?;

    let extra = get(&cloud, "port", "extra").context("port extra")?;
    let extra_ip = address(&extra)?;
    let mac = extra["status"]["macAddress"]
        .as_str()
        .context("a MAC")?
        .to_owned();
    let tap = stratus_api_types::ports::tap_name(extra["metadata"]["uid"].as_str().unwrap_or(""));
    let xml = |live: bool| -> String {
        let args: &[&str] = if live {
            &["dumpxml", &domain]
        } else {
            &["dumpxml", "--inactive", &domain]
        };
        node.virsh(args)
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    };
    let has_mac = |text: &str, mac: &str| text.contains(&format!("<mac address='{mac}'/>"));

    // Two edits of one version: the one that comes second is a 409, and changes nothing.
    let mut stale: Value = serde_json::from_str(
        &cloud.kubectl_ok(&["-n", "demo", "get", "server", "web", "-o", "json"])?,
    )?;
    if let Some(n) = stale["spec"]["networks"].as_array_mut() {
        n.push(serde_json::json!({"port": "extra"}));
    }
    cloud.kubectl_ok(&["-n", "demo", "annotate", "server", "web", "edited=first"])?;
    let out = cloud.kubectl_in(&["replace", "-f", "-"], &stale.to_string());
    let err = format!("{:#}", out.err().context("a stale edit is refused")?);
    assert!(
        err.contains("Conflict") || err.contains("modified"),
        "{err}"
    );
    assert!(get(&cloud, "port", "extra").is_some_and(|p| p["status"]["boundTo"].is_null()));

    // `openstack server add port web extra`: the Port joins the running server's networks.
    cloud.kubectl_ok(&[
        "-n",
        "demo",
        "patch",
        "server",
        "web",
        "--type=json",
        "-p",
        r#"[{"op": "add", "path": "/spec/networks/-", "value": {"port": "extra"}}]"#,
    ])?;
    wait_until(T, "port extra bound to web on the node and wired", || {
        get(&cloud, "port", "extra").filter(|p| {
            p["status"]["boundTo"] == "web"
                && p["status"]["hypervisor"] == name.as_str()
                && p["status"]["phase"] == "Active"
        })
    })
    .with_context(|| log(&node, &uid))?;
    // Plugged into the running guest and into its definition, with the Port's MAC and tap.
    let live = xml(true);
    assert!(has_mac(&live, &mac), "{live}");
    assert!(live.contains(&format!("<target dev='{tap}'/>")), "{live}");
    assert!(has_mac(&xml(false), &mac), "{}", xml(false));
    let link = ip(&["-n", &name, "-d", "link", "show", "dev", &tap])?;
    assert!(link.contains("master br-"), "{link}");
    // The guest's kernel found a second network device, and it was not restarted for it.
    wait_until(T, "the guest's kernel finding the new NIC", || {
        (node.console(&uid).matches(NIC_FOUND).count() == nics_at_boot + 1).then_some(())
    })
    .with_context(|| log(&node, &uid))?;
    assert_eq!(
        node.console(&uid).matches("STRATUS-GUEST-READY").count(),
        1,
        "{}",
        node.console(&uid)
    );
    // The guest runs DHCP on the new NIC too, and takes the Port's address.
    wait_until(T, "the guest's lease on the hot-plugged NIC", || {
        (leases(&node.console(&uid), &extra_ip) >= 1).then_some(())
    })
    .with_context(|| log(&node, &uid))?;
    wait_until(T, "web's addresses naming both ports", || {
        get(&cloud, "server", "web").filter(|s| {
            s["status"]["addresses"]
                .as_array()
                .is_some_and(|a| a.iter().any(|x| x["port"] == "extra"))
        })
    })?;
    assert!(event_reasons(&cloud, "web").contains(&"InterfaceAttached".to_string()));

    // Drift: unplugged behind the agent's back, it is plugged in again (the guest's kernel
    // finds it a third time).
    virsh_device(
        &node,
        "detach-device",
        &domain,
        &xml::interface_by_mac_xml(&mac),
    )?;
    wait_until(T, "the interface plugged in again", || {
        (node.console(&uid).matches(NIC_FOUND).count() >= nics_at_boot + 2
            && has_mac(&xml(true), &mac)
            && has_mac(&xml(false), &mac))
        .then_some(())
    })
    .with_context(|| log(&node, &uid))?;
    // The NIC back in the guest takes its address again.
    wait_until(T, "the guest's lease on the NIC plugged in again", || {
        (leases(&node.console(&uid), &extra_ip) >= 2).then_some(())
    })
    .with_context(|| log(&node, &uid))?;

    // Drift: one plugged in that no Port names is unplugged.
    let stranger = "52:54:00:5e:aa:01";
    let element = xml::interface_xml(&InterfaceSpec {
        mac: stranger.into(),
        tap: "tapstranger01".into(),
        mtu: None,
    });
    virsh_device(&node, "attach-device", &domain, &element)?;
    wait_until(T, "the stranger interface unplugged", || {
        let (live, defined) = (xml(true), xml(false));
        (!has_mac(&live, stranger) && !has_mac(&defined, stranger) && has_mac(&live, &mac))
            .then_some(())
    })
    .with_context(|| log(&node, &uid))?;
    assert!(event_reasons(&cloud, "web").contains(&"InterfaceDetached".to_string()));

    // `openstack server remove port web extra`: unplugged live and from the definition, its
    // tap gone, the Port no longer the server's; the first port stays as it was.
    cloud.kubectl_ok(&[
        "-n",
        "demo",
        "patch",
        "server",
        "web",
        "--type=json",
        "-p",
        r#"[{"op": "test", "path": "/spec/networks/1/port", "value": "extra"}, {"op": "remove", "path": "/spec/networks/1"}]"#,
    ])?;
    wait_until(T, "port extra released", || {
        get(&cloud, "port", "extra")
            .filter(|p| p["status"]["boundTo"].is_null() && p["status"]["hypervisor"].is_null())
    })?;
    wait_until(T, "the interface unplugged and its tap gone", || {
        let gone = ip(&["-n", &name, "link", "show", "dev", &tap]).is_err();
        (gone && !has_mac(&xml(true), &mac) && !has_mac(&xml(false), &mac)).then_some(())
    })
    .with_context(|| log(&node, &uid))?;
    assert!(has_mac(
        &xml(true),
        first["status"]["macAddress"].as_str().unwrap_or("?")
    ));
    let server = wait_until(T, "web observed without the port", || {
        get(&cloud, "server", "web").filter(|s| {
            s["status"]["observedGeneration"] == s["metadata"]["generation"]
                && s["status"]["addresses"]
                    .as_array()
                    .is_some_and(|a| a.len() == 1)
        })
    })?;
    assert_eq!(server["status"]["phase"], "Running");
    assert_eq!(
        node.console(&uid).matches("STRATUS-GUEST-READY").count(),
        1,
        "never restarted: {}",
        node.console(&uid)
    );

    cloud.kubectl_ok(&["-n", "demo", "delete", "server", "web", "--timeout=180s"])?;
    wait_until(T, "no bridge left on the node", || {
        ip(&["-n", &name, "-o", "link", "show", "type", "bridge"])
            .ok()
            .filter(|l| l.trim().is_empty())
    })
    .with_context(|| node.agent_log())?;
    Ok(())
}
