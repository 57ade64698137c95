//! Routers and floating IPs, the API side, against a real API server, etcd and controllers
//! with no network agent: the test writes the network agents' Leases itself (as an admin), so
//! a Router is placed on a node with a fresh Lease and the external network's physical
//! network (declared in the Lease and granted by the operator on the node's Hypervisor;
//! declared alone, the Router says which node lacks the grant), gets its interface Port (the subnet's gateway address) and gateway Port (an
//! address of the external subnet), each placed on its node, moves when that node's Lease
//! expires, and gives every address back when deleted; a floating IP is associated with a
//! port's address through it; a node reads and writes only its own routers and their floating
//! IPs. Floating IPs created at once on a nearly full external subnet never share an address.

use std::collections::HashSet;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use kube::api::{Api, DynamicObject, PostParams};
use kube::discovery::ApiResource;
use serde_json::{Value, json};
use stratus_e2e::{Apiserver, Cloud, Etcd, wait_until, with_stdin};

/// Generous: controllers share two cores with every other test.
const T: Duration = Duration::from_secs(90);
const PREFIX: &str = "/stratus";
const AGENTS: &str = "stratus-network-agents";

fn get(cloud: &Cloud, ns: &str, kind: &str, name: &str) -> Option<Value> {
    let out = cloud
        .kubectl_ok(&["-n", ns, "get", kind, name, "-o", "json"])
        .ok()?;
    serde_json::from_str(&out).ok()
}

/// A network agent's Lease for `node`, renewed `ago` seconds ago for 20 seconds, on
/// physical network `physnet1`.
fn lease(node: &str, ago: i64) -> Result<String> {
    let renewed = jiff::Timestamp::now()
        .checked_sub(jiff::SignedDuration::from_secs(ago))?
        .strftime("%Y-%m-%dT%H:%M:%S.%6fZ")
        .to_string();
    Ok(format!(
        "apiVersion: coordination.k8s.io/v1\nkind: Lease\nmetadata:\n  name: {node}\n  namespace: {AGENTS}\n  annotations:\n    network.stratus.dev/tunnel-ip: 192.0.2.1\n    network.stratus.dev/physical-networks: physnet1\nspec:\n  holderIdentity: {node}\n  leaseDurationSeconds: 20\n  renewTime: \"{renewed}\"\n"
    ))
}

/// `node`'s network agent as the controllers see it: its Lease renewed every two seconds
/// until dropped, so that it stays fresh however long the test's steps take.
struct Renewing {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Renewing {
    /// Writes `node`'s fresh Lease, then keeps renewing it.
    fn start(cloud: &Cloud, node: &str) -> Result<Self> {
        cloud.kubectl_in(&["apply", "-f", "-"], &lease(node, 0)?)?;
        let stop = Arc::new(AtomicBool::new(false));
        let (kubeconfig, home) = (cloud.kubeconfig(), cloud.dir.path().to_path_buf());
        let (flag, node) = (stop.clone(), node.to_string());
        let thread = std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_secs(2));
                if let Ok(yaml) = lease(&node, 0) {
                    let mut cmd = Command::new("kubectl");
                    cmd.env("KUBECONFIG", &kubeconfig)
                        .env("HOME", &home)
                        .args(["apply", "-f", "-"]);
                    // A renewal lost to a busy server is made up by the next one.
                    let _ = with_stdin(cmd, &yaml);
                }
            }
        });
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Renewing {
    /// Stops renewing; once this returns the Lease is written no more.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// How many keys etcd holds under `prefix`.
fn keys_under(cloud: &Cloud, prefix: &str) -> Result<Vec<String>> {
    let out = cloud.etcdctl(&["get", prefix, "--prefix", "--keys-only"])?;
    anyhow::ensure!(
        out.status.success(),
        "etcdctl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(String::from)
        .collect())
}

const NETWORKS: &str = "\
apiVersion: network.stratus.dev/v1
kind: Network
metadata: {name: ext, namespace: ops}
spec: {external: true, segmentation: flat, physicalNetwork: physnet1}
---
apiVersion: network.stratus.dev/v1
kind: Subnet
metadata: {name: ext-v4, namespace: ops}
spec:
  network: ext
  cidr: 203.0.113.0/24
  gatewayIP: 203.0.113.1
  enableDHCP: false
  allocationPools: [{start: 203.0.113.10, end: 203.0.113.19}]
---
apiVersion: network.stratus.dev/v1
kind: Network
metadata: {name: net, namespace: demo}
spec: {}
---
apiVersion: network.stratus.dev/v1
kind: Subnet
metadata: {name: sub, namespace: demo}
spec: {network: net, cidr: 10.0.0.0/24}
---
apiVersion: network.stratus.dev/v1
kind: Port
metadata: {name: web, namespace: demo}
spec: {network: net}
";

#[test]
fn a_router_is_placed_with_its_ports_moves_with_its_node_and_gives_everything_back() -> Result<()> {
    let cloud = Cloud::up_with(&["--nodes", "rn-a,rn-b"])?;
    cloud.projects(&["demo", "ops"])?;
    cloud.kubectl_in(&["apply", "-f", "-"], NETWORKS)?;
    let ext_uid = cloud.kubectl_ok(&[
        "-n",
        "ops",
        "get",
        "network",
        "ext",
        "-o",
        "jsonpath={.metadata.uid}",
    ])?;
    let claims = format!("{PREFIX}/_claims/network/{}/ip/", ext_uid.trim());
    let before = keys_under(&cloud, &claims)?;
    // Node rn-a's agent is fresh, rn-b's expired long ago. Both declare physnet1; the
    // operator granted it to rn-b only (on its Hypervisor).
    let rn_a = Renewing::start(&cloud, "rn-a")?;
    cloud.kubectl_in(&["apply", "-f", "-"], &lease("rn-b", 600)?)?;
    cloud.kubectl_in(
        &["apply", "-f", "-"],
        "apiVersion: compute.stratus.dev/v1\nkind: Hypervisor\nmetadata: {name: rn-a}\nspec: {}\n---\napiVersion: compute.stratus.dev/v1\nkind: Hypervisor\nmetadata:\n  name: rn-b\n  annotations: {network.stratus.dev/physical-networks: physnet1}\nspec: {}\n",
    )?;
    cloud.kubectl_in(
        &["apply", "-f", "-"],
        "apiVersion: network.stratus.dev/v1\nkind: Router\nmetadata: {name: r, namespace: demo}\nspec:\n  interfaces: [{subnet: sub}]\n  externalGateway: {network: ops/ext}\n",
    )?;
    // rn-a declares physnet1 without a grant: r goes nowhere, and says why.
    let why = wait_until(T, "router r unschedulable, naming rn-a's missing grant", || {
        let r = get(&cloud, "demo", "router", "r")?;
        let c = r["status"]["conditions"]
            .as_array()?
            .iter()
            .find(|c| c["type"] == "Scheduled" && c["status"] == "False")?
            .clone();
        c["message"]
            .as_str()?
            .contains("node rn-a: it declares physical network \"physnet1\", which the operator has not granted it")
            .then_some(r)
    })
    .with_context(|| cloud.log())?;
    assert!(why["status"]["node"].is_null(), "{why}");
    // A node cannot grant itself a physical network.
    let out = cloud.kubectl_as(
        &cloud.dir.path().join("node-rn-a.kubeconfig"),
        &[
            "annotate",
            "hypervisor",
            "rn-a",
            "network.stratus.dev/physical-networks=physnet1",
        ],
    )?;
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && e.contains("orbidden"), "{e}");
    // The operator grants it.
    cloud.kubectl_ok(&[
        "annotate",
        "hypervisor",
        "rn-a",
        "network.stratus.dev/physical-networks=physnet1",
    ])?;
    let subnet_uid = cloud.kubectl_ok(&[
        "-n",
        "demo",
        "get",
        "subnet",
        "sub",
        "-o",
        "jsonpath={.metadata.uid}",
    ])?;
    let iface = format!("rif-{}", subnet_uid.trim());
    // Placed on rn-a with both ports, each placed there too.
    let placed = |node: &'static str| {
        let cloud = &cloud;
        let iface = iface.clone();
        move || {
            let r = get(cloud, "demo", "router", "r")?;
            let st = &r["status"];
            (st["node"] == node
                && st["interfaces"][0]["port"] == iface.as_str()
                && st["externalGatewayIPs"][0].is_string())
            .then_some(())?;
            let gw = st["externalGatewayPort"].as_str()?.split_once('/')?;
            let gw_port = get(cloud, gw.0, "port", gw.1)?;
            let if_port = get(cloud, "demo", "port", &iface)?;
            (gw_port["status"]["hypervisor"] == node && if_port["status"]["hypervisor"] == node)
                .then_some((r, if_port, gw_port))
        }
    };
    let (r, if_port, gw_port) =
        wait_until(T, "router r placed on rn-a with its ports", placed("rn-a"))
            .with_context(|| cloud.log())?;
    let st = &r["status"];
    assert_eq!(st["interfaces"][0]["subnet"], "sub");
    assert_eq!(st["interfaces"][0]["ipAddress"], "10.0.0.1", "{st}");
    assert_eq!(if_port["status"]["fixedIPs"][0]["ipAddress"], "10.0.0.1");
    assert_eq!(if_port["spec"]["portSecurityEnabled"], false);
    assert_eq!(gw_port["metadata"]["namespace"], "ops");
    let gw_ip = st["externalGatewayIPs"][0]
        .as_str()
        .context("a gateway IP")?;
    assert_eq!(gw_port["status"]["fixedIPs"][0]["ipAddress"], gw_ip);
    let n: u32 = gw_ip
        .strip_prefix("203.0.113.")
        .and_then(|n| n.parse().ok())
        .context("an external address")?;
    assert!((10..=19).contains(&n), "{gw_ip} outside the pool");
    let scheduled = st["conditions"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["type"] == "Scheduled"))
        .context("a Scheduled condition")?;
    assert_eq!(scheduled["status"], "True", "{scheduled}");

    // A floating IP for port web goes through r.
    cloud.kubectl_in(
        &["apply", "-f", "-"],
        "apiVersion: network.stratus.dev/v1\nkind: FloatingIP\nmetadata: {name: f, namespace: demo}\nspec: {floatingNetwork: ops/ext, port: web}\n",
    )?;
    let web_ip =
        get(&cloud, "demo", "port", "web").context("web")?["status"]["fixedIPs"][0]["ipAddress"]
            .clone();
    let f = wait_until(T, "floating IP f associated", || {
        let f = get(&cloud, "demo", "floatingip", "f")?;
        (f["status"]["router"] == "r").then_some(f)
    })?;
    assert_eq!(f["status"]["fixedIP"], web_ip);
    assert!(f["status"]["floatingIPAddress"].is_string(), "{f}");

    // The subnet stays while the router's interface is on it (Neutron's 409).
    let e = cloud.kubectl_err(&["-n", "demo", "delete", "subnet", "sub", "--wait=false"])?;
    assert!(e.contains("in use") && e.contains(&iface), "{e}");

    // Node attacks: rn-b holds nothing of r yet.
    let node_b = cloud.dir.path().join("node-rn-b.kubeconfig");
    let node_a = cloud.dir.path().join("node-rn-a.kubeconfig");
    for args in [
        vec!["-n", "demo", "get", "router", "r"],
        vec![
            "get",
            "routers",
            "-A",
            "--field-selector",
            "status.node=rn-a",
        ],
        vec!["-n", "demo", "get", "floatingip", "f"],
        vec![
            "-n",
            "demo",
            "patch",
            "router",
            "r",
            "--subresource",
            "status",
            "--type",
            "merge",
            "-p",
            r#"{"status":{"phase":"Active"}}"#,
        ],
        vec![
            "-n",
            "demo",
            "patch",
            "floatingip",
            "f",
            "--subresource",
            "status",
            "--type",
            "merge",
            "-p",
            r#"{"status":{"phase":"Active"}}"#,
        ],
        vec![
            "-n",
            AGENTS,
            "patch",
            "lease",
            "rn-a",
            "--type",
            "merge",
            "-p",
            r#"{"spec":{"holderIdentity":"rn-b"}}"#,
        ],
    ] {
        let out = cloud.kubectl_as(&node_b, &args)?;
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains("Forbidden"),
            "rn-b {args:?}: {err}"
        );
    }
    // rn-a reads its own router and its floating IP, and every agent's Lease.
    for args in [
        vec!["-n", "demo", "get", "router", "r"],
        vec!["-n", "demo", "get", "floatingip", "f"],
        vec!["-n", AGENTS, "get", "lease", "rn-b"],
    ] {
        let out = cloud.kubectl_as(&node_a, &args)?;
        assert!(
            out.status.success(),
            "rn-a {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // But cannot move the router, nor change what the floating IP is associated with (to
    // an address that is not web's, whatever IPAM gave web, so that the write changes it).
    let elsewhere = if web_ip == "10.0.0.99" {
        "10.0.0.98"
    } else {
        "10.0.0.99"
    };
    let moved_fip = json!({"status": {"fixedIP": elsewhere}}).to_string();
    for args in [
        vec![
            "-n",
            "demo",
            "patch",
            "router",
            "r",
            "--subresource",
            "status",
            "--type",
            "merge",
            "-p",
            r#"{"status":{"node":"rn-b"}}"#,
        ],
        vec![
            "-n",
            "demo",
            "patch",
            "floatingip",
            "f",
            "--subresource",
            "status",
            "--type",
            "merge",
            "-p",
            &moved_fip,
        ],
    ] {
        let out = cloud.kubectl_as(&node_a, &args)?;
        assert!(!out.status.success(), "rn-a {args:?}");
    }

    // rn-a's Lease expires while rn-b's agent comes back: r moves, with its ports.
    let _rn_b = Renewing::start(&cloud, "rn-b")?;
    drop(rn_a);
    cloud.kubectl_in(&["apply", "-f", "-"], &lease("rn-a", 600)?)?;
    let (moved, _, _) =
        wait_until(T, "router r moved to rn-b", placed("rn-b")).with_context(|| cloud.log())?;
    assert_eq!(
        moved["status"]["externalGatewayIPs"][0], gw_ip,
        "the router keeps its gateway address as it moves"
    );

    // Deleting the router deletes its ports (the gateway's in ops too) and frees their
    // addresses: only the floating IP's and the external gateway's claims stay.
    cloud.kubectl_ok(&["-n", "demo", "delete", "floatingip", "f"])?;
    cloud.kubectl_ok(&["-n", "demo", "delete", "router", "r", "--timeout=180s"])?;
    wait_until(T, "the router and its ports gone", || {
        let gone = get(&cloud, "demo", "router", "r").is_none()
            && get(&cloud, "demo", "port", &iface).is_none()
            && cloud
                .kubectl_ok(&["-n", "ops", "get", "ports", "-o", "name"])
                .is_ok_and(|o| o.trim().is_empty());
        gone.then_some(())
    })?;
    let after = keys_under(&cloud, &claims)?;
    assert_eq!(after, before, "every external address is back");
    // With its interface gone (and port web), the subnet may go.
    cloud.kubectl_ok(&["-n", "demo", "delete", "port", "web"])?;
    cloud.kubectl_ok(&["-n", "demo", "delete", "subnet", "sub", "--timeout=180s"])?;
    Ok(())
}

fn fips(client: kube::Client) -> Api<DynamicObject> {
    let ar = ApiResource {
        group: "network.stratus.dev".into(),
        version: "v1".into(),
        api_version: "network.stratus.dev/v1".into(),
        kind: "FloatingIP".into(),
        plural: "floatingips".into(),
    };
    Api::namespaced_with(client, "demo", &ar)
}

/// Creates FloatingIP `name` on `ops/ext`, again only while the server sheds load (429).
async fn create_fip(api: Api<DynamicObject>, name: String) -> Result<Result<Value, (u16, String)>> {
    let obj: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "network.stratus.dev/v1", "kind": "FloatingIP",
        "metadata": {"name": name}, "spec": {"floatingNetwork": "ops/ext"},
    }))?;
    for attempt in 0..400u64 {
        match api.create(&PostParams::default(), &obj).await {
            Ok(f) => return Ok(Ok(serde_json::to_value(f)?)),
            Err(kube::Error::Api(e)) if e.code == 429 => {
                tokio::time::sleep(Duration::from_millis(20 + attempt % 7 * 10)).await;
            }
            Err(kube::Error::Api(e)) => return Ok(Err((e.code, e.message))),
            Err(e) => return Err(e).context("create a floating IP"),
        }
    }
    bail!("floating IP {name}: the API server shed the create 400 times")
}

#[tokio::test]
async fn twenty_floating_ips_at_once_on_ten_free_addresses_get_ten_and_no_address_twice()
-> Result<()> {
    let etcd = Etcd::start()?;
    let api = Apiserver::start_on(&etcd)?;
    api.projects(&["demo", "ops"])?;
    api.kubectl_in(&["apply", "-f", "-"], NETWORKS)?;
    let client = fips(api.client().await?);
    let tasks: Vec<_> = (0..20)
        .map(|i| tokio::spawn(create_fip(client.clone(), format!("f{i}"))))
        .collect();
    let (mut ok, mut refused) = (Vec::new(), Vec::new());
    for t in tasks {
        match t.await?? {
            Ok(f) => ok.push(f),
            Err(e) => refused.push(e),
        }
    }
    assert_eq!(ok.len(), 10, "refusals: {refused:?}");
    for (code, message) in &refused {
        assert_eq!(*code, 409, "{message}");
        assert!(
            message.contains("spec.floatingNetwork") && message.contains("no free address"),
            "{message}"
        );
    }
    let addresses: HashSet<&str> = ok
        .iter()
        .filter_map(|f| f["status"]["floatingIPAddress"].as_str())
        .collect();
    assert_eq!(addresses.len(), 10, "no address twice: {addresses:?}");
    // A floating IP from a network that is not external: 422 on spec.floatingNetwork.
    let out = api.kubectl_in(
        &["apply", "-f", "-"],
        "apiVersion: network.stratus.dev/v1\nkind: FloatingIP\nmetadata: {name: bad, namespace: demo}\nspec: {floatingNetwork: net}\n",
    );
    let e = format!("{:?}", out.err().context("refused")?);
    assert!(
        e.contains("spec.floatingNetwork") && e.contains("not external"),
        "{e}"
    );
    Ok(())
}
