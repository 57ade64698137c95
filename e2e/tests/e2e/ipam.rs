//! IPAM against real etcd: a Port's address and MAC are claimed in its create's transaction,
//! so a race for a pool never hands out an address twice nor more than the pool holds, and a
//! deleted Port gives its address back; bad networking input is refused naming its field.

use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use kube::api::{Api, DeleteParams, DynamicObject, PostParams};
use kube::discovery::ApiResource;
use serde_json::{Value, json};
use stratus_e2e::{Apiserver, Cloud, Etcd, wait_until, with_stdin};

/// The key prefix the API server keeps objects and claims under.
const PREFIX: &str = "/stratus";

fn ports(client: kube::Client) -> Api<DynamicObject> {
    let ar = ApiResource {
        group: "network.stratus.dev".into(),
        version: "v1".into(),
        api_version: "network.stratus.dev/v1".into(),
        kind: "Port".into(),
        plural: "ports".into(),
    };
    Api::namespaced_with(client, "demo", &ar)
}

/// Creates Port `name` on network `blue`, sending it again only while the API server sheds load
/// (429, as every client does); the stored Port, or the refusal's code and message.
async fn create_port(
    api: Api<DynamicObject>,
    name: String,
) -> Result<Result<Value, (u16, String)>> {
    let obj: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "network.stratus.dev/v1", "kind": "Port",
        "metadata": {"name": name}, "spec": {"network": "blue"},
    }))?;
    for attempt in 0..400u64 {
        match api.create(&PostParams::default(), &obj).await {
            Ok(p) => return Ok(Ok(serde_json::to_value(p)?)),
            Err(kube::Error::Api(e)) if e.code == 429 => {
                tokio::time::sleep(Duration::from_millis(20 + attempt % 7 * 10)).await;
            }
            Err(kube::Error::Api(e)) => return Ok(Err((e.code, e.message))),
            Err(e) => return Err(e).context("create a port"),
        }
    }
    bail!("port {name}: the API server shed the create 400 times")
}

/// Creates `names` all at once; the stored Ports and the refusals.
async fn create_all(
    api: &Api<DynamicObject>,
    names: impl Iterator<Item = String>,
) -> Result<(Vec<Value>, Vec<(u16, String)>)> {
    let tasks: Vec<_> = names
        .map(|n| tokio::spawn(create_port(api.clone(), n)))
        .collect();
    let (mut ok, mut refused) = (Vec::new(), Vec::new());
    for t in tasks {
        match t.await?? {
            Ok(p) => ok.push(p),
            Err(e) => refused.push(e),
        }
    }
    Ok((ok, refused))
}

/// Deletes every Port in `names` at once (again while the server sheds load).
async fn delete_all(api: &Api<DynamicObject>, names: Vec<String>) -> Result<()> {
    let tasks: Vec<_> = names
        .into_iter()
        .map(|n| {
            let api = api.clone();
            tokio::spawn(async move {
                for attempt in 0..400u64 {
                    match api.delete(&n, &DeleteParams::default()).await {
                        Ok(_) => return Ok(()),
                        Err(kube::Error::Api(e)) if e.code == 429 => {
                            tokio::time::sleep(Duration::from_millis(20 + attempt % 7 * 10)).await;
                        }
                        Err(e) => return Err(anyhow::Error::from(e).context(format!("delete {n}"))),
                    }
                }
                bail!("delete {n}: shed 400 times")
            })
        })
        .collect();
    for t in tasks {
        t.await??;
    }
    Ok(())
}

/// The address and MAC a stored Port was given.
fn given(p: &Value) -> (String, String) {
    (
        p["status"]["fixedIPs"][0]["ipAddress"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
        p["status"]["macAddress"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
    )
}

/// How many keys etcd holds under `prefix` (a range answer's `count` is of the whole range).
fn keys_under(etcd: &Etcd, prefix: &str) -> Result<u64> {
    count(etcd.ctl(&["get", prefix, "--prefix", "--limit", "1", "-w", "json"])?)
}

/// The key count of `etcdctl get -w json`.
fn count(out: std::process::Output) -> Result<u64> {
    anyhow::ensure!(
        out.status.success(),
        "etcdctl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout)?;
    Ok(v["count"].as_u64().unwrap_or(0))
}

/// `kubectl create` of `obj` in namespace demo, expected to be refused by the server (kubectl
/// reports a 422 as "is invalid", other refusals as "Error from server"): its stderr, which
/// must name `field`.
fn refused(api: &Apiserver, obj: &Value, field: &str) -> Result<String> {
    let mut cmd = Command::new("kubectl");
    let home = api.kubeconfig();
    cmd.env("KUBECONFIG", &home)
        .env("HOME", home.parent().context("kubeconfig's folder")?)
        .args(["-n", "demo", "create", "-f", "-"]);
    let out = with_stdin(cmd, &obj.to_string())?;
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    anyhow::ensure!(!out.status.success(), "accepted: {obj}");
    anyhow::ensure!(
        (err.contains("Error from server") || err.contains("is invalid")) && err.contains(field),
        "the refusal of {obj} does not name {field}: {err}"
    );
    Ok(err)
}

#[tokio::test]
async fn five_hundred_ports_at_once_on_a_pool_of_250_get_250_addresses_and_all_come_back()
-> Result<()> {
    let etcd = Etcd::start()?;
    let api = Apiserver::start_on(&etcd)?;
    api.projects(&["demo"])?;
    api.kubectl_in(
        &["-n", "demo", "apply", "-f", "-"],
        "apiVersion: network.stratus.dev/v1\nkind: Network\nmetadata:\n  name: blue\nspec: {}\n---\n\
         apiVersion: network.stratus.dev/v1\nkind: Subnet\nmetadata:\n  name: s\nspec:\n  network: blue\n  cidr: 10.20.0.0/24\n  enableDHCP: false\n  allocationPools:\n  - start: 10.20.0.2\n    end: 10.20.0.251\n",
    )?;
    let uid = api.kubectl_ok(&[
        "-n",
        "demo",
        "get",
        "network",
        "blue",
        "-o",
        "jsonpath={.metadata.uid}",
    ])?;
    let claims = format!("{PREFIX}/_claims/network/{}/", uid.trim());
    let api_ports = ports(api.client().await?);
    let pool = u32::from(Ipv4Addr::new(10, 20, 0, 2))..=u32::from(Ipv4Addr::new(10, 20, 0, 251));

    let (ok, refused) = create_all(&api_ports, (0..500).map(|i| format!("p{i}"))).await?;
    assert_eq!(
        ok.len(),
        250,
        "refusals: {:?}",
        &refused[..refused.len().min(5)]
    );
    assert_eq!(refused.len(), 250);
    for (code, message) in &refused {
        assert_eq!(*code, 409, "{message}");
        assert!(
            message.contains("no free address") && message.contains("spec.fixedIPs"),
            "{message}"
        );
    }
    let mut addresses = HashSet::new();
    let mut macs = HashSet::new();
    for p in &ok {
        let (ip, mac) = given(p);
        let a: Ipv4Addr = ip.parse().with_context(|| format!("an address in {p}"))?;
        assert!(pool.contains(&u32::from(a)), "{a} outside the pool");
        assert!(mac.starts_with("fa:16:3e:"), "{mac}");
        addresses.insert(ip);
        macs.insert(mac);
        assert_eq!(p["status"]["phase"], "Down");
    }
    assert_eq!(
        (addresses.len(), macs.len()),
        (250, 250),
        "no address or MAC twice"
    );
    // What etcd holds: one claim per address and per MAC, and the subnet's gateway's.
    assert_eq!(keys_under(&etcd, &format!("{claims}ip/"))?, 251);
    assert_eq!(keys_under(&etcd, &format!("{claims}mac/"))?, 250);
    // kubectl shows a Port's address as soon as it exists.
    let one = ok[0]["metadata"]["name"].as_str().context("a name")?;
    let table = api.kubectl_ok(&["-n", "demo", "get", "port", one])?;
    assert!(table.contains(&given(&ok[0]).0), "{table}");

    let names: Vec<String> = ok
        .iter()
        .filter_map(|p| p["metadata"]["name"].as_str().map(String::from))
        .collect();
    delete_all(&api_ports, names).await?;
    assert_eq!(
        keys_under(&etcd, &claims)?,
        1,
        "every claim went with its port; the gateway stays its subnet's"
    );

    let (again, refused) = create_all(&api_ports, (0..250).map(|i| format!("q{i}"))).await?;
    assert!(refused.is_empty(), "{:?}", &refused[..refused.len().min(5)]);
    let back: HashSet<String> = again.iter().map(|p| given(p).0).collect();
    assert_eq!(back.len(), 250, "all 250 addresses allocated again");
    match create_port(api_ports.clone(), "one-more".into()).await? {
        Err((409, m)) if m.contains("no free address") => {}
        other => bail!("a 251st port: {other:?}"),
    }
    Ok(())
}

#[tokio::test]
async fn bad_networking_input_is_refused_naming_the_field_and_writes_nothing() -> Result<()> {
    let etcd = Etcd::start()?;
    let api = Apiserver::start_on(&etcd)?;
    api.projects(&["demo"])?;
    let net = |name: &str, spec: Value| {
        json!({"apiVersion": "network.stratus.dev/v1", "kind": "Network",
               "metadata": {"name": name}, "spec": spec})
    };
    let subnet = |name: &str, spec: Value| {
        json!({"apiVersion": "network.stratus.dev/v1", "kind": "Subnet",
               "metadata": {"name": name}, "spec": spec})
    };
    let port = |name: &str, spec: Value| {
        json!({"apiVersion": "network.stratus.dev/v1", "kind": "Port",
               "metadata": {"name": name}, "spec": spec})
    };
    let create =
        |obj: Value| api.kubectl_in(&["-n", "demo", "create", "-f", "-"], &obj.to_string());
    create(net("n", json!({})))?;
    create(net("m", json!({})))?;
    create(subnet("s", json!({"network": "n", "cidr": "10.30.0.0/24"})))?;
    create(subnet("o", json!({"network": "m", "cidr": "10.40.0.0/24"})))?;
    create(port(
        "a",
        json!({"network": "n", "fixedIPs": [{"ipAddress": "10.30.0.5"}]}),
    ))?;
    let state = || -> Result<String> {
        api.kubectl_ok(&["-n", "demo", "get", "networks,subnets,ports", "-o", "name"])
    };
    let before = state()?;
    let claims_before = keys_under(&etcd, &format!("{PREFIX}/_claims/"))?;

    let err = refused(
        &api,
        &subnet("t", json!({"network": "n", "cidr": "10.30.0.128/25"})),
        "spec.cidr",
    )?;
    assert!(err.contains("overlaps subnet \"s\""), "{err}");
    refused(
        &api,
        &subnet(
            "t",
            json!({"network": "n", "cidr": "10.31.0.0/24", "gatewayIP": "10.99.0.1"}),
        ),
        "spec.gatewayIP",
    )?;
    refused(
        &api,
        &subnet("t", json!({"network": "n", "cidr": "10.31.0.7/24"})),
        "spec.cidr",
    )?;
    refused(
        &api,
        &subnet("t", json!({"network": "gone", "cidr": "10.31.0.0/24"})),
        "spec.network",
    )?;
    let err = refused(
        &api,
        &port(
            "b",
            json!({"network": "n", "fixedIPs": [{"ipAddress": "10.30.0.5"}]}),
        ),
        "spec.fixedIPs[0].ipAddress",
    )?;
    assert!(
        err.contains("Conflict") && err.contains("already in use"),
        "{err}"
    );
    let err = refused(
        &api,
        &port(
            "b",
            json!({"network": "n", "fixedIPs": [{"ipAddress": "10.30.0.1"}]}),
        ),
        "spec.fixedIPs[0].ipAddress",
    )?;
    assert!(
        err.contains("Conflict") && err.contains("the subnet's gateway address"),
        "{err}"
    );
    let err = refused(
        &api,
        &port(
            "b",
            json!({"network": "n", "fixedIPs": [{"ipAddress": "10.30.0.255"}]}),
        ),
        "spec.fixedIPs[0].ipAddress",
    )?;
    assert!(err.contains("the broadcast address of subnet"), "{err}");
    refused(
        &api,
        &port(
            "b",
            json!({"network": "n", "fixedIPs": [{"ipAddress": "10.50.0.5"}]}),
        ),
        "spec.fixedIPs[0].ipAddress",
    )?;
    let err = refused(
        &api,
        &port(
            "b",
            json!({"network": "n", "fixedIPs": [{"ipAddress": "10.40.0.5"}]}),
        ),
        "spec.fixedIPs[0].ipAddress",
    )?;
    assert!(err.contains("of network \"m\""), "{err}");
    refused(
        &api,
        &port("b", json!({"network": "n", "fixedIPs": [{"subnet": "o"}]})),
        "spec.fixedIPs[0].subnet",
    )?;
    refused(
        &api,
        &net("f", json!({"segmentation": "flat"})),
        "spec.physicalNetwork",
    )?;
    // Names with shell metacharacters never reach a claim, a key or a host.
    refused(
        &api,
        &port("b;reboot", json!({"network": "n"})),
        "metadata.name",
    )?;
    refused(
        &api,
        &port("b", json!({"network": "n$(reboot)"})),
        "spec.network",
    )?;
    refused(
        &api,
        &port(
            "b",
            json!({"network": "n", "fixedIPs": [{"subnet": "s`id`"}]}),
        ),
        "spec.fixedIPs[0].subnet",
    )?;
    refused(
        &api,
        &subnet("t", json!({"network": "n|sh", "cidr": "10.31.0.0/24"})),
        "spec.network",
    )?;
    refused(
        &api,
        &net(
            "f",
            json!({"segmentation": "flat", "physicalNetwork": "eth0;reboot"}),
        ),
        "spec.physicalNetwork",
    )?;
    refused(
        &api,
        &port(
            "b",
            json!({"network": "n", "macAddress": "fa:16:3e:00:00:0$"}),
        ),
        "spec.macAddress",
    )?;

    assert_eq!(state()?, before, "a refused create wrote an object");
    assert_eq!(
        keys_under(&etcd, &format!("{PREFIX}/_claims/"))?,
        claims_before,
        "a refused create left a claim"
    );
    Ok(())
}

#[test]
fn a_network_with_a_port_stays_and_once_the_port_goes_its_vni_goes_at_once_and_its_subnet_with_it()
-> Result<()> {
    let cloud = Cloud::up()?;
    cloud.projects(&["demo"])?;
    let yaml = "apiVersion: network.stratus.dev/v1\nkind: Network\nmetadata:\n  name: blue\nspec: {}\n---\n\
        apiVersion: network.stratus.dev/v1\nkind: Subnet\nmetadata:\n  name: s\nspec:\n  network: blue\n  cidr: 10.60.0.0/24\n---\n\
        apiVersion: network.stratus.dev/v1\nkind: Port\nmetadata:\n  name: p\nspec:\n  network: blue\n";
    cloud.kubectl_in(&["-n", "demo", "create", "-f", "-"], yaml)?;
    let got = cloud.kubectl_ok(&[
        "-n",
        "demo",
        "get",
        "network/blue",
        "port/p",
        "-o",
        "jsonpath={.items[0].metadata.uid} {.items[0].status.vni} {.items[1].status.fixedIPs[0].ipAddress}",
    ])?;
    let [uid, vni, ip] = got.split(' ').collect::<Vec<_>>()[..] else {
        bail!("uid, VNI and address: {got:?}")
    };
    assert!(ip.starts_with("10.60.0."), "{got}");
    let keys = |prefix: &str| {
        count(cloud.etcdctl(&["get", prefix, "--prefix", "--limit", "1", "-w", "json"])?)
    };
    let vni_key = format!("{PREFIX}/_claims/network/vni/{:08}", vni.parse::<u32>()?);
    let claims = format!("{PREFIX}/_claims/network/{uid}/");
    assert_eq!(
        (keys(&vni_key)?, keys(&claims)?),
        (1, 4),
        "the VNI; the subnet's gateway and DHCP server address; the port's address and MAC"
    );

    let refused = cloud.kubectl(&["-n", "demo", "delete", "network", "blue"])?;
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && err.contains("in use by 1 port(s) or floating IP(s) (p)"),
        "{err}"
    );
    assert_eq!(keys(&vni_key)?, 1, "the network stays");
    cloud.kubectl_ok(&["-n", "demo", "delete", "port", "p"])?;
    assert_eq!(
        keys(&claims)?,
        2,
        "the port's claims go in its delete; the subnet's stay"
    );
    cloud.kubectl_ok(&["-n", "demo", "delete", "network", "blue"])?;
    assert_eq!(keys(&vni_key)?, 0, "the VNI goes in the network's delete");
    wait_until(
        Duration::from_secs(90),
        "the subnet to be collected with its network",
        || {
            cloud
                .kubectl_ok(&["-n", "demo", "get", "subnets", "-o", "name"])
                .ok()
                .filter(|o| o.trim().is_empty())
        },
    )?;
    assert_eq!(
        keys(&claims)?,
        0,
        "the subnet's gateway and DHCP server address went with the subnet"
    );

    // A project being deleted takes its networks with their ports, in whatever order.
    cloud.projects(&["other"])?;
    wait_until(
        Duration::from_secs(90),
        "the project's cleanup finalizer",
        || {
            cloud
                .kubectl_ok(&[
                    "get",
                    "project",
                    "other",
                    "-o",
                    "jsonpath={.metadata.finalizers}",
                ])
                .ok()
                .filter(|f| f.contains("project-cleanup"))
        },
    )?;
    cloud.kubectl_in(&["-n", "other", "create", "-f", "-"], yaml)?;
    let uid = cloud.kubectl_ok(&[
        "-n",
        "other",
        "get",
        "network",
        "blue",
        "-o",
        "jsonpath={.metadata.uid}",
    ])?;
    let claims = format!("{PREFIX}/_claims/network/{}/", uid.trim());
    assert_eq!(
        keys(&claims)?,
        4,
        "the gateway and DHCP server address; the port's address and MAC"
    );
    cloud.kubectl_ok(&["delete", "project", "other", "--wait=false"])?;
    wait_until(Duration::from_secs(90), "the project to go", || {
        let out = cloud.kubectl(&["get", "project", "other"]).ok()?;
        (!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("not found"))
            .then_some(())
    })?;
    assert_eq!(keys(&claims)?, 0, "no claim outlives the project");
    Ok(())
}

/// A Subnet's DHCP server address is claimed at its create, so no Port gets it; the subnets
/// controller keeps `status.usedIPs` and `status.availableIPs` as Ports come and go.
#[test]
fn a_subnet_counts_its_addresses_and_its_dhcp_servers_is_no_ports() -> Result<()> {
    let cloud = Cloud::up()?;
    cloud.projects(&["demo"])?;
    cloud.kubectl_in(
        &["-n", "demo", "create", "-f", "-"],
        "apiVersion: network.stratus.dev/v1\nkind: Network\nmetadata:\n  name: blue\nspec: {}\n---\n\
         apiVersion: network.stratus.dev/v1\nkind: Subnet\nmetadata:\n  name: s\nspec:\n  network: blue\n  cidr: 10.61.0.0/24\n  allocationPools:\n  - start: 10.61.0.10\n    end: 10.61.0.19\n",
    )?;
    let counts = |want: (u64, u64)| {
        wait_until(
            Duration::from_secs(60),
            &format!("subnet s used/available {want:?}"),
            || {
                let got = cloud
                    .kubectl_ok(&[
                        "-n",
                        "demo",
                        "get",
                        "subnet",
                        "s",
                        "-o",
                        "jsonpath={.status.usedIPs} {.status.availableIPs}",
                    ])
                    .ok()?;
                (got == format!("{} {}", want.0, want.1)).then_some(())
            },
        )
        .with_context(|| cloud.log())
    };
    let dhcp = cloud.kubectl_ok(&[
        "-n",
        "demo",
        "get",
        "subnet",
        "s",
        "-o",
        "jsonpath={.status.dhcpIP}",
    ])?;
    assert_eq!(dhcp, "10.61.0.10", "the first address of the pool");
    // The gateway and the DHCP server; 9 of the pool's 10 left.
    counts((2, 9))?;
    let port = |name: &str, ip: Option<&str>| {
        let fixed = ip.map_or(String::new(), |ip| {
            format!("  fixedIPs:\n  - ipAddress: {ip}\n")
        });
        format!(
            "apiVersion: network.stratus.dev/v1\nkind: Port\nmetadata:\n  name: {name}\nspec:\n  network: blue\n{fixed}"
        )
    };
    let taken = cloud.kubectl_in(
        &["-n", "demo", "create", "-f", "-"],
        &port("asks", Some(&dhcp)),
    );
    let err = format!(
        "{:#}",
        taken.err().context("a port asking for the DHCP address")?
    );
    assert!(
        err.contains("spec.fixedIPs[0].ipAddress") && err.contains("DHCP server"),
        "{err}"
    );
    for i in 0..3 {
        cloud.kubectl_in(
            &["-n", "demo", "create", "-f", "-"],
            &port(&format!("p{i}"), None),
        )?;
    }
    counts((5, 6))?;
    cloud.kubectl_ok(&["-n", "demo", "delete", "port", "p0"])?;
    counts((4, 7))?;
    Ok(())
}
