//! Servers get Ports end to end: a real cloud (etcd, API server, controllers) and one node's
//! compute agent on libvirt's test driver. A Server's network entry becomes a Port with an
//! address at once, the Port is placed on the Server's node bound to it, the domain libvirt
//! holds has the Port's MAC and tap device, the config drive carries the address, the Server's
//! `status.addresses` shows it, a Port another server holds is refused (409), and deleting the Server
//! deletes its Port (freeing its address) and releases the Port it was given. Then with
//! `stratus agent --roles compute,network`: the network agent wires the tap the Port names,
//! and a real TCG guest takes its Port's address by DHCP.

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::Value;
use stratus_agents::compute::driver::DomainDriver;
use stratus_agents::compute::driver::fake::{MemoryDisk, MemoryDisks};
use stratus_agents::compute::driver::libvirt::Libvirt;
use stratus_e2e::net::{Namespaces, lone_underlay};
use stratus_e2e::node::FileServer;
use stratus_e2e::{Cloud, ip, repo_root, wait_until};

const T: Duration = Duration::from_secs(90);
const NODE: &str = "ports-node";

fn get(cloud: &Cloud, kind: &str, name: &str) -> Option<Value> {
    let out = cloud
        .kubectl_ok(&["-n", "demo", "get", kind, name, "-o", "json"])
        .ok()?;
    serde_json::from_str(&out).ok()
}

fn condition<'a>(o: &'a Value, type_: &str) -> Option<&'a Value> {
    o["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
}

fn sha256(path: &std::path::Path) -> Result<String> {
    let out = Command::new("sha256sum").arg(path).output()?;
    String::from_utf8(out.stdout)?
        .split_whitespace()
        .next()
        .map(str::to_owned)
        .context("sha256sum printed nothing")
}

#[test]
fn a_servers_network_becomes_a_port_plugged_into_its_guest_and_goes_with_it() -> Result<()> {
    let cloud = Cloud::up_with(&["--nodes", NODE])?;
    cloud.projects(&["demo"])?;
    let dir = tempfile::tempdir()?;
    let image = dir.path().join("disk.img");
    std::fs::write(&image, vec![7u8; 1 << 20])?;
    let files = FileServer::serve(dir.path())?;
    let flavors = repo_root().join("examples/flavors.yaml");
    cloud.kubectl_ok(&["apply", "-f", flavors.to_str().unwrap_or_default()])?;
    cloud.kubectl_in(
        &["apply", "-f", "-"],
        &format!(
            "apiVersion: image.stratus.dev/v1\nkind: Image\nmetadata:\n  name: tiny\n  namespace: demo\nspec:\n  diskFormat: raw\n  containerFormat: bare\n  sha256: {}\n  source:\n    url: {}/disk.img\n",
            sha256(&image)?,
            files.url
        ),
    )?;
    cloud.kubectl_in(
        &["-n", "demo", "apply", "-f", "-"],
        "apiVersion: network.stratus.dev/v1\nkind: Network\nmetadata:\n  name: blue\nspec:\n  mtu: 1400\n---\n\
         apiVersion: network.stratus.dev/v1\nkind: Subnet\nmetadata:\n  name: blue-v4\nspec:\n  network: blue\n  cidr: 10.70.0.0/24\n---\n\
         apiVersion: network.stratus.dev/v1\nkind: Port\nmetadata:\n  name: mine\nspec:\n  network: blue\n",
    )?;

    // The node: the compute agent on libvirt's test driver, in this process, so that the test
    // reads back the domain libvirt holds.
    let rt = tokio::runtime::Runtime::new()?;
    let kubeconfig = cloud.dir.path().join(format!("node-{NODE}.kubeconfig"));
    let client = rt.block_on(async {
        let kc = kube::config::Kubeconfig::read_from(&kubeconfig)?;
        let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?;
        anyhow::Ok(kube::Client::try_from(cfg)?)
    })?;
    let libvirt = Arc::new(Libvirt::connect("test:///default")?);
    let disks = Arc::new(MemoryDisks::default());
    let state_dir = dir.path().join("state");
    std::fs::create_dir_all(&state_dir)?;
    let agent = rt.spawn(stratus_agents::compute::run_with(
        client,
        Arc::clone(&libvirt) as Arc<dyn DomainDriver>,
        Arc::clone(&disks) as _,
        stratus_agents::compute::Config {
            node: NODE.into(),
            state_dir: state_dir.clone(),
            zone: "nova".into(),
            heartbeat: Duration::from_secs(1),
            resync: Duration::from_secs(2),
            image_policy: stratus_image_cache::Policy {
                allow_hosts: vec![files.url.trim_start_matches("http://").parse()?],
                ..Default::default()
            },
            export_ports: Default::default(),
            nbd_insecure: false,
        },
    ));

    // One entry names a network (a Port is made for it), the other the Port made above.
    cloud.kubectl_in(
        &["apply", "-f", "-"],
        "apiVersion: compute.stratus.dev/v1\nkind: Server\nmetadata:\n  name: web\n  namespace: demo\nspec:\n  flavor: m1.nano\n  image: tiny\n  networks:\n  - network: blue\n  - port: mine\n",
    )?;
    let server = wait_until(T, "the server running with its ports", || {
        get(&cloud, "server", "web").filter(|s| s["status"]["phase"] == "Running")
    })
    .with_context(|| {
        format!(
            "server: {:?}\nports: {:?}",
            cloud.kubectl(&["-n", "demo", "get", "server", "web", "-o", "yaml"]),
            cloud.kubectl(&["-n", "demo", "get", "ports", "-o", "yaml"])
        )
    })?;
    let uid = server["metadata"]["uid"].as_str().unwrap_or_default();
    assert_eq!(server["status"]["hypervisor"], NODE);
    let allocated = condition(&server, "Allocated").context("an Allocated condition")?;
    assert_eq!(allocated["status"], "True", "{allocated}");

    // The Port made for the network entry: owned by the Server, with its address, placed.
    let made = get(&cloud, "port", "web-0").context("port web-0 was made")?;
    let owner = &made["metadata"]["ownerReferences"][0];
    assert_eq!(
        (&owner["kind"], &owner["uid"], &owner["controller"]),
        (
            &Value::from("Server"),
            &Value::from(uid),
            &Value::from(true)
        )
    );
    let ip = made["status"]["fixedIPs"][0]["ipAddress"]
        .as_str()
        .context("web-0 has an address")?
        .to_owned();
    assert!(ip.starts_with("10.70.0."), "{ip}");
    let given = get(&cloud, "port", "mine").context("port mine")?;
    assert!(
        given["metadata"]["ownerReferences"].is_null(),
        "a port the user made stays the user's"
    );
    let mut macs = Vec::new();
    let mut taps = Vec::new();
    for p in [&made, &given] {
        assert_eq!(p["status"]["hypervisor"], NODE, "{p}");
        assert_eq!(p["status"]["boundTo"], "web", "{p}");
        let tap = p["status"]["interfaceName"].as_str().context("a tap")?;
        let port_uid = p["metadata"]["uid"].as_str().unwrap_or_default();
        assert_eq!(tap, stratus_api_types::ports::tap_name(port_uid));
        assert!(tap.len() <= 15);
        taps.push(tap.to_owned());
        macs.push(
            p["status"]["macAddress"]
                .as_str()
                .context("a MAC")?
                .to_owned(),
        );
    }

    // The domain libvirt holds: one tap interface per Port, in the Server's order.
    let xml = libvirt
        .defined_xml(&format!("stratus-{uid}"))?
        .context("the domain is defined")?;
    let at = |needle: &str| {
        xml.find(needle)
            .unwrap_or_else(|| panic!("{needle} missing from {xml}"))
    };
    assert_eq!(
        xml.matches("<interface type='ethernet'>").count(),
        2,
        "{xml}"
    );
    assert!(
        at(&format!("<mac address='{}'/>", macs[0])) < at(&format!("<mac address='{}'/>", macs[1]))
    );
    for tap in &taps {
        at(&format!("<target dev='{tap}'/>"));
    }
    at("<mtu size='1400'/>");

    // The config drive names each interface by MAC, with its address.
    let drive = state_dir.join("servers").join(uid).join("config.iso");
    match disks.get(&drive) {
        Some(MemoryDisk::ConfigDrive {
            network_config: Some(net),
            ..
        }) => {
            assert_eq!(net["ethernets"]["eth0"]["match"]["macaddress"], macs[0]);
            assert_eq!(
                net["ethernets"]["eth0"]["addresses"],
                serde_json::json!([format!("{ip}/24")])
            );
            assert_eq!(net["ethernets"]["eth1"]["match"]["macaddress"], macs[1]);
        }
        other => panic!("config drive: {other:?}"),
    }

    // status.addresses: each port's fixed IP, with its network, port and MAC.
    let addresses = wait_until(T, "the server's addresses", || {
        get(&cloud, "server", "web")
            .map(|s| s["status"]["addresses"].clone())
            .filter(|a| a.as_array().is_some_and(|a| a.len() == 2))
    })?;
    assert_eq!(addresses[0]["network"], "blue");
    assert_eq!(addresses[0]["port"], "web-0");
    assert_eq!(addresses[0]["ip"], ip.as_str());
    assert_eq!(addresses[0]["mac"], macs[0].as_str());
    assert_eq!(addresses[0]["type"], "fixed");
    assert_eq!(addresses[1]["port"], "mine");
    assert_eq!(
        addresses[1]["ip"],
        given["status"]["fixedIPs"][0]["ipAddress"]
    );

    // A second server asking for the Port web holds is refused at once, naming the field
    // and the server that holds it; nothing is stored.
    let out = cloud.kubectl_in(
        &["apply", "-f", "-"],
        "apiVersion: compute.stratus.dev/v1\nkind: Server\nmetadata:\n  name: db\n  namespace: demo\nspec:\n  flavor: m1.nano\n  image: tiny\n  networks:\n  - port: mine\n",
    );
    let err = format!("{:#}", out.err().context("a port bound to web is refused")?);
    assert!(
        err.contains("spec.networks[0].port") && err.contains("\"web\""),
        "{err}"
    );
    assert!(get(&cloud, "server", "db").is_none());
    assert_eq!(
        get(&cloud, "port", "mine").map(|p| p["status"]["boundTo"].clone()),
        Some("web".into()),
        "the port stays web's"
    );

    // An address already taken, or a network that does not exist: the Port's create is
    // refused, and the Server says why, naming its entry.
    for (server, entry, says) in [
        (
            "taken",
            format!("network: blue\n    fixedIP: {ip}"),
            ip.clone(),
        ),
        (
            "nowhere",
            "network: missing".to_owned(),
            "missing".to_owned(),
        ),
    ] {
        cloud.kubectl_in(
            &["apply", "-f", "-"],
            &format!(
                "apiVersion: compute.stratus.dev/v1\nkind: Server\nmetadata:\n  name: {server}\n  namespace: demo\nspec:\n  flavor: m1.nano\n  image: tiny\n  networks:\n  - {entry}\n"
            ),
        )?;
        let s = wait_until(T, &format!("{server} told its port was refused"), || {
            get(&cloud, "server", server)
                .filter(|s| condition(s, "Allocated").is_some_and(|c| c["status"] == "False"))
        })?;
        let c = condition(&s, "Allocated").context("Allocated")?;
        let message = c["message"].as_str().unwrap_or_default();
        assert_eq!(c["reason"], "PortRefused", "{c}");
        assert!(
            message.contains("spec.networks[0]") && message.contains(&says),
            "{c}"
        );
        assert!(get(&cloud, "port", &format!("{server}-0")).is_none());
        cloud.kubectl_ok(&["-n", "demo", "delete", "server", server, "--timeout=180s"])?;
    }

    // Deleted: the guest goes, the Port made for it goes with it, the one it was given is
    // released, and the address is free for another Port.
    cloud.kubectl_ok(&["-n", "demo", "delete", "server", "web", "--timeout=180s"])?;
    assert_eq!(libvirt.defined_xml(&format!("stratus-{uid}"))?, None);
    wait_until(T, "port web-0 deleted with its server", || {
        get(&cloud, "port", "web-0").is_none().then_some(())
    })?;
    wait_until(T, "port mine released", || {
        get(&cloud, "port", "mine")
            .filter(|p| p["status"]["boundTo"].is_null() && p["status"]["hypervisor"].is_null())
    })?;
    cloud.kubectl_in(
        &["-n", "demo", "create", "-f", "-"],
        &format!(
            "apiVersion: network.stratus.dev/v1\nkind: Port\nmetadata:\n  name: again\nspec:\n  network: blue\n  fixedIPs:\n  - ipAddress: {ip}\n"
        ),
    )?;
    assert_eq!(
        get(&cloud, "port", "again").map(|p| p["status"]["fixedIPs"][0]["ipAddress"].clone()),
        Some(ip.as_str().into())
    );
    agent.abort();
    Ok(())
}

#[test]
fn one_node_running_compute_and_network_wires_the_tap_its_server_port_names() -> Result<()> {
    let node = format!("sp-{}", std::process::id());
    let cloud = Cloud::up_with(&["--nodes", &node])?;
    cloud.projects(&["demo"])?;
    let dir = tempfile::tempdir()?;
    let image = dir.path().join("disk.img");
    std::fs::write(&image, vec![7u8; 1 << 20])?;
    let files = FileServer::serve(dir.path())?;
    let flavors = repo_root().join("examples/flavors.yaml");
    cloud.kubectl_ok(&["apply", "-f", flavors.to_str().unwrap_or_default()])?;
    cloud.kubectl_in(
        &["apply", "-f", "-"],
        &format!(
            "apiVersion: image.stratus.dev/v1\nkind: Image\nmetadata:\n  name: tiny\n  namespace: demo\nspec:\n  diskFormat: raw\n  containerFormat: bare\n  sha256: {}\n  source:\n    url: {}/disk.img\n",
            sha256(&image)?,
            files.url
        ),
    )?;
    // The group applied here edits the controllers' `default` once it is there.
    cloud.default_group_made("demo")?;
    cloud.kubectl_in(
        &["-n", "demo", "apply", "-f", "-"],
        "apiVersion: network.stratus.dev/v1\nkind: Network\nmetadata:\n  name: blue\nspec: {}\n---\n\
         apiVersion: network.stratus.dev/v1\nkind: Subnet\nmetadata:\n  name: blue-v4\nspec:\n  network: blue\n  cidr: 10.71.0.0/24\n---\n\
         apiVersion: network.stratus.dev/v1\nkind: SecurityGroup\nmetadata:\n  name: default\nspec:\n  rules:\n  - {direction: egress}\n",
    )?;

    // The node's kernel side lives in a namespace of its own, with a tunnel address.
    let state = dir.path().join("node");
    let _netns = Namespaces::add(&[&node], &[&state])?;
    lone_underlay(&node, "192.0.2.1/24")?;
    let mut agent = stratus_e2e::Proc::spawn(
        &format!("agent of {node}"),
        Command::new(stratus_e2e::stratus_bin())
            .args(["agent", "--node", &node, "--roles", "compute,network"])
            .args([
                "--libvirt-uri",
                "test:///default",
                "--heartbeat-seconds",
                "2",
            ])
            .arg("--image-url-allow-loopback")
            .arg("--kubeconfig")
            .arg(cloud.dir.path().join(format!("node-{node}.kubeconfig")))
            .arg("--state-dir")
            .arg(&state)
            .args(["--network-namespace", &node, "--underlay-ip", "192.0.2.1"])
            .args(["--network-resync-seconds", "1"]),
        &dir.path().join("agent.log"),
    )?;
    let log = || std::fs::read_to_string(dir.path().join("agent.log")).unwrap_or_default();

    cloud.kubectl_in(
        &["apply", "-f", "-"],
        "apiVersion: compute.stratus.dev/v1\nkind: Server\nmetadata:\n  name: web\n  namespace: demo\nspec:\n  flavor: m1.nano\n  image: tiny\n  networks:\n  - network: blue\n",
    )?;
    wait_until(T, "the server running", || {
        get(&cloud, "server", "web").filter(|s| s["status"]["phase"] == "Running")
    })
    .with_context(log)?;
    let port = get(&cloud, "port", "web-0").context("port web-0")?;
    assert_eq!(port["status"]["hypervisor"], node.as_str());
    let tap = port["status"]["interfaceName"]
        .as_str()
        .context("a tap name")?
        .to_owned();

    // The test driver runs no QEMU, so nothing made the tap: the network agent says which
    // device it waits for.
    let waiting = wait_until(T, "the port Down for its missing tap", || {
        get(&cloud, "port", "web-0")
            .filter(|p| condition(p, "Ready").is_some_and(|c| c["reason"] == "DeviceMissing"))
    })
    .with_context(log)?;
    let c = condition(&waiting, "Ready").context("Ready")?;
    assert!(
        c["message"].as_str().unwrap_or_default().contains(&tap),
        "{c}"
    );
    // What QEMU's libvirt does for the interface: the tap, by the name the port gives.
    ip(&["-n", &node, "tuntap", "add", "dev", &tap, "mode", "tap"])?;
    wait_until(T, "the port Active once its tap exists", || {
        get(&cloud, "port", "web-0").filter(|p| {
            p["status"]["phase"] == "Active"
                && condition(p, "Ready").is_some_and(|c| c["reason"] == "Wired")
        })
    })
    .with_context(log)?;
    let link = ip(&["-n", &node, "-d", "link", "show", "dev", &tap])?;
    assert!(link.contains("master br-"), "{link}");

    // Deleted with its server: the port goes, and the node unwires it (the tap leaves the
    // bridge, which goes).
    cloud.kubectl_ok(&["-n", "demo", "delete", "server", "web", "--timeout=180s"])?;
    wait_until(T, "port web-0 deleted with its server", || {
        get(&cloud, "port", "web-0").is_none().then_some(())
    })?;
    wait_until(T, "no bridge left on the node", || {
        ip(&["-n", &node, "-o", "link", "show", "type", "bridge"])
            .ok()
            .filter(|l| l.trim().is_empty())
    })
    .with_context(log)?;
    agent.terminate()?;
    Ok(())
}

#[test]
fn a_real_guest_takes_its_ports_address_by_dhcp() -> Result<()> {
    let guest = stratus_e2e::node::Guest::serve()?;
    let name = format!("spg-{}", std::process::id());
    let mut node = stratus_e2e::node::Node::start(&name)?;
    let cloud = Cloud::up_with(&["--nodes", &name])?;
    cloud.projects(&["demo"])?;
    let flavors = repo_root().join("examples/flavors.yaml");
    cloud.kubectl_ok(&["apply", "-f", flavors.to_str().unwrap_or_default()])?;
    cloud.kubectl_in(&["apply", "-f", "-"], &guest.images_yaml("demo")?)?;
    // The group applied here edits the controllers' `default` once it is there.
    cloud.default_group_made("demo")?;
    cloud.kubectl_in(
        &["-n", "demo", "apply", "-f", "-"],
        "apiVersion: network.stratus.dev/v1\nkind: Network\nmetadata:\n  name: blue\nspec: {}\n---\n\
         apiVersion: network.stratus.dev/v1\nkind: Subnet\nmetadata:\n  name: blue-v4\nspec:\n  network: blue\n  cidr: 10.72.0.0/24\n---\n\
         apiVersion: network.stratus.dev/v1\nkind: SecurityGroup\nmetadata:\n  name: default\nspec:\n  rules:\n  - {direction: egress}\n",
    )?;

    // The node's namespace (libvirtd's, where QEMU's taps appear), named for the network
    // agent, with a tunnel address.
    let _netns = node.netns("192.0.2.1/24")?;
    node.start_compute_network_agent(&cloud, "192.0.2.1", &[])?;

    cloud.kubectl_in(
        &["apply", "-f", "-"],
        "apiVersion: compute.stratus.dev/v1\nkind: Server\nmetadata:\n  name: web\n  namespace: demo\nspec:\n  flavor: m1.nano\n  image: tiny\n  networks:\n  - network: blue\n",
    )?;
    let server = wait_until(T, "the guest running", || {
        get(&cloud, "server", "web").filter(|s| s["status"]["phase"] == "Running")
    })
    .with_context(|| node.agent_log())?;
    let uid = server["metadata"]["uid"].as_str().unwrap_or_default();
    let port = get(&cloud, "port", "web-0").context("port web-0")?;
    let address = port["status"]["fixedIPs"][0]["ipAddress"]
        .as_str()
        .context("an address")?
        .to_owned();
    wait_until(T, "the port Active on the node", || {
        get(&cloud, "port", "web-0").filter(|p| p["status"]["phase"] == "Active")
    })
    .with_context(|| node.agent_log())?;
    // The guest's DHCP client got the address IPAM gave its port, from the node's DHCP
    // server, through the tap libvirt made and the network agent bridged.
    let want = format!("STRATUS-GUEST-DHCP eth0 {address}\n");
    wait_until(Duration::from_secs(120), "the guest's DHCP lease", || {
        node.console(uid).contains(&want).then_some(())
    })
    .with_context(|| {
        format!(
            "console:\n{}\nagent:\n{}",
            node.console(uid),
            node.agent_log()
        )
    })?;

    cloud.kubectl_ok(&["-n", "demo", "delete", "server", "web", "--timeout=180s"])?;
    wait_until(T, "port web-0 deleted with its server", || {
        get(&cloud, "port", "web-0").is_none().then_some(())
    })?;
    wait_until(T, "no bridge left on the node", || {
        ip(&["-n", &name, "-o", "link", "show", "type", "bridge"])
            .ok()
            .filter(|l| l.trim().is_empty())
    })
    .with_context(|| node.agent_log())?;
    Ok(())
}

#[test]
fn a_servers_ports_have_addresses_before_placement_and_move_with_it() -> Result<()> {
    let cloud = Cloud::up()?;
    cloud.projects(&["demo"])?;
    let flavors = repo_root().join("examples/flavors.yaml");
    cloud.kubectl_ok(&["apply", "-f", flavors.to_str().unwrap_or_default()])?;
    cloud.kubectl_in(
        &["-n", "demo", "apply", "-f", "-"],
        "apiVersion: network.stratus.dev/v1\nkind: Network\nmetadata:\n  name: blue\nspec: {}\n---\n\
         apiVersion: network.stratus.dev/v1\nkind: Subnet\nmetadata:\n  name: blue-v4\nspec:\n  network: blue\n  cidr: 10.73.0.0/24\n---\n\
         apiVersion: compute.stratus.dev/v1\nkind: Server\nmetadata:\n  name: web\nspec:\n  flavor: m1.nano\n  image: tiny\n  networks:\n  - network: blue\n",
    )?;
    // No hypervisor yet, so not placed: the address is there already, and so is the Server's
    // list of it; the Port is bound to the Server but on no node.
    let port = wait_until(T, "the server's port, before placement", || {
        get(&cloud, "port", "web-0").filter(|p| p["status"]["boundTo"] == "web")
    })?;
    assert!(port["status"]["hypervisor"].is_null(), "{port}");
    let ip = port["status"]["fixedIPs"][0]["ipAddress"].clone();
    assert!(
        ip.as_str().is_some_and(|a| a.starts_with("10.73.0.")),
        "{ip}"
    );
    wait_until(T, "the server's address before placement", || {
        get(&cloud, "server", "web").filter(|s| s["status"]["addresses"][0]["ip"] == ip)
    })?;
    let on = |node: Option<&str>| {
        let want = node.map_or(Value::Null, Value::from);
        wait_until(T, &format!("port web-0 on {node:?}"), || {
            get(&cloud, "port", "web-0")
                .filter(|p| p["status"]["hypervisor"] == want && p["status"]["boundTo"] == "web")
        })
    };
    // Placed, taken off (as an evacuation does), placed elsewhere: the Port follows.
    cloud.place("demo", "web", "node-x")?;
    on(Some("node-x"))?;
    let binding = "/apis/compute.stratus.dev/v1/namespaces/demo/servers/web/binding";
    cloud.kubectl_ok(&["delete", "--raw", binding])?;
    on(None)?;
    cloud.place("demo", "web", "node-y")?;
    let moved = on(Some("node-y"))?;
    // Its address and MAC stay what they were.
    assert_eq!(moved["status"]["fixedIPs"][0]["ipAddress"], ip);
    assert_eq!(moved["status"]["macAddress"], port["status"]["macAddress"]);
    Ok(())
}

/// A Server's network entry naming a subnet gets its address from that subnet; one naming a
/// subnet of another network is said on the Server under that field, and a subnet with a port
/// is refused at once.
#[test]
fn a_servers_network_entry_takes_its_address_from_the_subnet_it_names() -> Result<()> {
    let cloud = Cloud::up()?;
    cloud.projects(&["demo"])?;
    let flavors = repo_root().join("examples/flavors.yaml");
    cloud.kubectl_ok(&["apply", "-f", flavors.to_str().unwrap_or_default()])?;
    cloud.kubectl_in(
        &["-n", "demo", "apply", "-f", "-"],
        "apiVersion: network.stratus.dev/v1\nkind: Network\nmetadata:\n  name: blue\nspec: {}\n---\n\
         apiVersion: network.stratus.dev/v1\nkind: Subnet\nmetadata:\n  name: blue-a\nspec:\n  network: blue\n  cidr: 10.74.0.0/24\n---\n\
         apiVersion: network.stratus.dev/v1\nkind: Subnet\nmetadata:\n  name: blue-b\nspec:\n  network: blue\n  cidr: 10.74.1.0/24\n---\n\
         apiVersion: network.stratus.dev/v1\nkind: Network\nmetadata:\n  name: red\nspec: {}\n---\n\
         apiVersion: network.stratus.dev/v1\nkind: Subnet\nmetadata:\n  name: red-v4\nspec:\n  network: red\n  cidr: 10.75.0.0/24\n---\n\
         apiVersion: compute.stratus.dev/v1\nkind: Server\nmetadata:\n  name: web\nspec:\n  flavor: m1.nano\n  image: tiny\n  networks:\n  - network: blue\n    subnet: blue-b\n---\n\
         apiVersion: compute.stratus.dev/v1\nkind: Server\nmetadata:\n  name: astray\nspec:\n  flavor: m1.nano\n  image: tiny\n  networks:\n  - network: blue\n    subnet: red-v4\n",
    )?;
    // One address, from blue-b only (an entry without a subnet gets one of each).
    let port = wait_until(T, "web's port", || {
        get(&cloud, "port", "web-0").filter(|p| p["status"]["fixedIPs"].is_array())
    })?;
    let fixed = port["status"]["fixedIPs"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(fixed.len(), 1, "{port}");
    assert_eq!(fixed[0]["subnet"], "blue-b");
    assert!(
        fixed[0]["ipAddress"]
            .as_str()
            .is_some_and(|a| a.starts_with("10.74.1.")),
        "{port}"
    );
    // A subnet of another network: no port, and the Server says which field is wrong.
    let astray = wait_until(T, "astray's Allocated=False", || {
        get(&cloud, "server", "astray")
            .filter(|s| condition(s, "Allocated").is_some_and(|c| c["status"] == "False"))
    })?;
    let c = condition(&astray, "Allocated").cloned().unwrap_or_default();
    let message = c["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("spec.networks[0].subnet") && message.contains("\"red\""),
        "{c}"
    );
    assert!(get(&cloud, "port", "astray-0").is_none(), "no port made");
    // A subnet beside a port: 422 naming the field, nothing stored.
    let out = cloud.kubectl_in(
        &["-n", "demo", "create", "-f", "-"],
        "apiVersion: compute.stratus.dev/v1\nkind: Server\nmetadata:\n  name: both\nspec:\n  flavor: m1.nano\n  image: tiny\n  networks:\n  - port: web-0\n    subnet: blue-b\n",
    );
    let err = format!(
        "{:#}",
        out.err().context("a subnet with a port is refused")?
    );
    assert!(err.contains("spec.networks[0].subnet"), "{err}");
    assert!(get(&cloud, "server", "both").is_none());
    Ok(())
}
