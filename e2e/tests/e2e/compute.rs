//! Compute end to end: the scheduler, the binding's capacity claims and the compute agents,
//! first with libvirt's test driver (placement and bad input, no guests), then with real QEMU
//! guests on two simulated nodes.

use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::Value;
use stratus_e2e::node::{FileServer, Guest, Node};
use stratus_e2e::{Cloud, Proc, stratus_bin, wait_until};

/// Generous: TCG guests and the controllers share two cores with every other test.
const T: Duration = Duration::from_secs(180);

fn server(name: &str, flavor: &str, image: &str, extra: &str) -> String {
    format!(
        "---\napiVersion: compute.stratus.dev/v1\nkind: Server\nmetadata:\n  name: {name}\n  namespace: demo\nspec:\n  flavor: {flavor}\n  image: {image}\n{extra}"
    )
}

fn json(cloud: &Cloud, args: &[&str]) -> Result<Value> {
    let mut a = args.to_vec();
    a.extend(["-o", "json"]);
    Ok(serde_json::from_str(&cloud.kubectl_ok(&a)?)?)
}

/// The server's status once `pred` holds for it.
fn wait_server(
    cloud: &Cloud,
    name: &str,
    what: &str,
    pred: impl Fn(&Value) -> bool,
) -> Result<Value> {
    wait_until(T, what, || {
        json(cloud, &["-n", "demo", "get", "server", name])
            .ok()
            .filter(|s| pred(s))
    })
    .with_context(|| {
        format!(
            "server {name}: {}",
            cloud
                .kubectl_ok(&["-n", "demo", "get", "server", name, "-o", "yaml"])
                .unwrap_or_default()
        )
    })
}

fn condition<'a>(s: &'a Value, type_: &str) -> Option<&'a Value> {
    s["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
}

/// Waits until `kubectl get events` in `demo` lists one with `reason` about `name`.
fn wait_event(cloud: &Cloud, reason: &str, name: &str) -> Result<String> {
    wait_until(T, &format!("a {reason} event for {name}"), || {
        cloud
            .kubectl_ok(&["-n", "demo", "get", "events"])
            .ok()
            .filter(|e| e.lines().any(|l| l.contains(reason) && l.contains(name)))
    })
}

fn test_agent(cloud: &Cloud, node: &str, dir: &std::path::Path) -> Result<Proc> {
    Proc::spawn(
        &format!("agent of {node}"),
        Command::new(stratus_bin())
            .args(["agent", "--node", node, "--libvirt-uri", "test:///default"])
            .args(["--heartbeat-seconds", "2"])
            // The test's images are served from loopback.
            .arg("--image-url-allow-loopback")
            .arg("--kubeconfig")
            .arg(cloud.dir.path().join(format!("node-{node}.kubeconfig")))
            .arg("--state-dir")
            .arg(dir.join(node)),
        &dir.join(format!("{node}.log")),
    )
}

#[test]
fn scheduler_and_agents_with_the_test_driver() -> Result<()> {
    let guest = Guest::serve()?;
    let cloud = Cloud::up_with(&["--nodes", "node-a,node-b"])?;
    cloud.projects(&["demo"])?;
    let dir = tempfile::tempdir()?;
    let mut agents = [
        ("node-a", test_agent(&cloud, "node-a", dir.path())?),
        ("node-b", test_agent(&cloud, "node-b", dir.path())?),
    ];
    wait_until(T, "both hypervisors Ready", || {
        let out = cloud.kubectl_ok(&["get", "hypervisors"]).ok()?;
        (out.lines()
            .filter(|l| l.contains("Ready") && !l.contains("NotReady"))
            .count()
            == 2)
            .then_some(())
    })?;
    let examples = stratus_e2e::repo_root().join("examples/flavors.yaml");
    cloud.kubectl_ok(&["apply", "-f", examples.to_str().unwrap_or_default()])?;
    cloud.kubectl_in(&["apply", "-f", "-"], &guest.images_yaml("demo")?)?;

    // Anti-affinity: two members on two nodes.
    let group = "---\napiVersion: compute.stratus.dev/v1\nkind: ServerGroup\nmetadata:\n  name: apart\n  namespace: demo\nspec:\n  policy: anti-affinity\n";
    let members = format!(
        "{group}{}{}",
        server("one", "m1.nano", "tiny", "  serverGroup: apart\n"),
        server("two", "m1.nano", "tiny", "  serverGroup: apart\n")
    );
    cloud.kubectl_in(&["apply", "-f", "-"], &members)?;
    let mut nodes = Vec::new();
    for n in ["one", "two"] {
        let s = wait_server(&cloud, n, "a running member", |s| {
            s["status"]["phase"] == "Running"
        })?;
        nodes.push(
            s["status"]["hypervisor"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
        );
        assert_eq!(s["status"]["powerState"], "Running");
        assert_eq!(
            condition(&s, "Scheduled").map(|c| c["status"].clone()),
            Some("True".into())
        );
        assert!(
            s["metadata"]["finalizers"]
                .to_string()
                .contains("compute.stratus.dev/teardown")
        );
    }
    nodes.sort();
    assert_eq!(nodes, ["node-a", "node-b"], "anti-affinity broken");
    // Another project boots demo's public image: the agent finds it through the one list of
    // images a node may make (public ones), then reads its kernel and ramdisk.
    cloud.projects(&["other"])?;
    cloud.kubectl_in(
        &["apply", "-f", "-"],
        &server("elsewhere", "m1.nano", "tiny", "").replace("namespace: demo", "namespace: other"),
    )?;
    wait_until(
        T,
        "a server booted from another project's public image",
        || {
            json(&cloud, &["-n", "other", "get", "server", "elsewhere"])
                .ok()
                .filter(|s| s["status"]["phase"] == "Running")
        },
    )?;
    cloud.kubectl_ok(&[
        "-n",
        "other",
        "delete",
        "server",
        "elsewhere",
        "--timeout=180s",
    ])?;
    // A third member has nowhere to go.
    cloud.kubectl_in(
        &["apply", "-f", "-"],
        &server("three", "m1.nano", "tiny", "  serverGroup: apart\n"),
    )?;
    let s = wait_server(&cloud, "three", "the third member to wait", |s| {
        condition(s, "Scheduled").is_some_and(|c| c["status"] == "False")
    })?;
    assert_eq!(s["status"]["phase"], "Pending");
    assert_eq!(
        condition(&s, "Scheduled").map(|c| c["message"].clone()),
        Some("0/2 hypervisors are available: 2 hosting the anti-affinity group's members".into())
    );

    // Bad input: too big for any node, unknown flavor, unknown image, a corrupt image.
    let huge = "---\napiVersion: compute.stratus.dev/v1\nkind: Flavor\nmetadata:\n  name: huge\nspec:\n  vcpus: 1\n  ramMiB: 100000000\n  diskGiB: 1\n";
    cloud.kubectl_in(&["apply", "-f", "-"], huge)?;
    let bad_image = format!(
        "---\napiVersion: image.stratus.dev/v1\nkind: Image\nmetadata:\n  name: corrupt\n  namespace: demo\nspec:\n  diskFormat: qcow2\n  source:\n    url: {}/disk.qcow2\n  sha256: {}\n",
        guest.url,
        "ab".repeat(32)
    );
    cloud.kubectl_in(&["apply", "-f", "-"], &bad_image)?;
    let needy = format!(
        "---\napiVersion: image.stratus.dev/v1\nkind: Image\nmetadata:\n  name: needy\n  namespace: demo\nspec:\n  diskFormat: qcow2\n  minRamMiB: 4096\n  source:\n    url: {}/disk.qcow2\n",
        guest.url
    );
    cloud.kubectl_in(&["apply", "-f", "-"], &needy)?;
    // A qcow2 whose metadata names a host file as its backing file (CVE-2024-32498's class),
    // and an image on the API server's own address.
    let files_dir = dir.path().join("files");
    std::fs::create_dir_all(&files_dir)?;
    let out = Command::new("qemu-img")
        .args([
            "create",
            "-q",
            "-f",
            "qcow2",
            "-F",
            "raw",
            "-b",
            "/etc/passwd",
        ])
        .arg(files_dir.join("backed.qcow2"))
        .arg("16M")
        .output()?;
    anyhow::ensure!(out.status.success(), "qemu-img create: {out:?}");
    let files = FileServer::serve(&files_dir)?;
    let hostile = format!(
        "---\napiVersion: image.stratus.dev/v1\nkind: Image\nmetadata:\n  name: backed\n  namespace: demo\nspec:\n  diskFormat: qcow2\n  source:\n    url: {}/backed.qcow2\n---\napiVersion: image.stratus.dev/v1\nkind: Image\nmetadata:\n  name: inside\n  namespace: demo\nspec:\n  diskFormat: raw\n  source:\n    url: {}/version\n",
        files.url, cloud.url
    );
    cloud.kubectl_in(&["apply", "-f", "-"], &hostile)?;
    // Two public images of one name in two other projects: a name that resolves to neither.
    cloud.projects(&["twin-a", "twin-b"])?;
    for ns in ["twin-a", "twin-b"] {
        cloud.kubectl_in(
            &["apply", "-f", "-"],
            &format!(
                "apiVersion: image.stratus.dev/v1\nkind: Image\nmetadata:\n  name: twin\n  namespace: {ns}\nspec:\n  diskFormat: raw\n  visibility: public\n  source:\n    url: {}/backed.qcow2\n",
                files.url
            ),
        )?;
    }
    cloud.kubectl_in(
        &["apply", "-f", "-"],
        &[
            server("twin", "m1.nano", "twin", ""),
            server("big", "huge", "tiny", ""),
            server("noflavor", "m9.nothing", "tiny", ""),
            server("noimage", "m1.nano", "no-such-image", ""),
            server("badsum", "m1.nano", "corrupt", ""),
            server("small", "m1.nano", "needy", ""),
            server("backdoor", "m1.nano", "backed", ""),
        ]
        .concat(),
    )?;
    // The image controller verified the data and reports it.
    let tiny = wait_until(T, "image tiny Active", || {
        json(&cloud, &["-n", "demo", "get", "image", "tiny"])
            .ok()
            .filter(|i| i["status"]["phase"] == "Active")
    })?;
    assert_eq!(
        tiny["status"]["sha256"],
        guest.sha256("disk.qcow2")?.as_str()
    );
    assert!(
        tiny["status"]["sizeBytes"].as_u64().unwrap_or(0) > 0,
        "{tiny}"
    );
    let corrupt = wait_until(T, "image corrupt in Error", || {
        json(&cloud, &["-n", "demo", "get", "image", "corrupt"])
            .ok()
            .filter(|i| i["status"]["phase"] == "Error")
    })?;
    assert_eq!(
        condition(&corrupt, "Verified").map(|c| c["reason"].clone()),
        Some("ChecksumMismatch".into())
    );
    // Refused by inspection: Error, with the reason and the file it names.
    let backed = wait_until(T, "image backed in Error", || {
        json(&cloud, &["-n", "demo", "get", "image", "backed"])
            .ok()
            .filter(|i| i["status"]["phase"] == "Error")
    })?;
    let verified = condition(&backed, "Verified").context("a Verified condition")?;
    assert_eq!(
        (verified["status"].clone(), verified["reason"].clone()),
        ("False".into(), "BackingFile".into()),
        "{backed}"
    );
    assert_eq!(
        verified["message"],
        "the image data is refused: it has a backing file (\"/etc/passwd\")"
    );
    // The control plane is no image source, though loopback is allowed here.
    let inside = wait_until(T, "image inside in Error", || {
        json(&cloud, &["-n", "demo", "get", "image", "inside"])
            .ok()
            .filter(|i| i["status"]["phase"] == "Error")
    })?;
    let verified = condition(&inside, "Verified").context("a Verified condition")?;
    assert_eq!(verified["reason"], "URLRefused", "{inside}");
    assert!(
        verified["message"]
            .as_str()
            .is_some_and(|m| m.contains("a control-plane address")),
        "{inside}"
    );
    let s = wait_server(&cloud, "big", "the huge server to wait", |s| {
        condition(s, "Scheduled").is_some_and(|c| c["status"] == "False")
    })?;
    assert_eq!(
        condition(&s, "Scheduled").map(|c| c["message"].clone()),
        Some("0/2 hypervisors are available: 2 insufficient ram".into())
    );
    let s = wait_server(&cloud, "noflavor", "the flavorless server to wait", |s| {
        condition(s, "Scheduled").is_some_and(|c| c["status"] == "False")
    })?;
    assert_eq!(
        condition(&s, "Scheduled").map(|c| c["reason"].clone()),
        Some("FlavorNotFound".into())
    );
    for (name, reason) in [
        ("noimage", "ImageNotFound"),
        ("badsum", "ImageChecksumMismatch"),
        ("small", "FlavorMemoryTooSmall"),
        ("backdoor", "ImageRefused"),
        ("twin", "ImageAmbiguous"),
    ] {
        let s = wait_server(&cloud, name, "an image error", |s| {
            s["status"]["phase"] == "Error"
        })?;
        assert_eq!(
            condition(&s, "Ready").map(|c| c["reason"].clone()),
            Some(reason.into()),
            "{name}"
        );
        // Nothing was made on the host for it.
        assert!(s["status"]["instanceName"].is_null(), "{s}");
    }
    let s = json(&cloud, &["-n", "demo", "get", "server", "backdoor"])?;
    assert_eq!(
        condition(&s, "Ready").map(|c| c["message"].clone()),
        Some(
            "image \"backed\": the image data is refused: it has a backing file (\"/etc/passwd\")"
                .into()
        )
    );
    let events = cloud.kubectl_ok(&["-n", "demo", "get", "events"])?;
    assert!(events.contains("ImageChecksumMismatch"), "{events}");
    assert!(events.contains("ImageRefused"), "{events}");
    assert!(events.contains("FailedScheduling"), "{events}");

    // Placement goes through the binding, which never overcommits, even for the admin; and
    // no status write can move a server.
    let err = cloud
        .kubectl_in(
            &[
                "create",
                "--raw",
                "/apis/compute.stratus.dev/v1/namespaces/demo/servers/big/binding",
                "-f",
                "-",
            ],
            r#"{"target": {"name": "node-a"}}"#,
        )
        .map(|_| ())
        .err();
    assert!(
        err.is_some_and(|e| e.to_string().contains("insufficient ram")),
        "an overcommitting binding was accepted"
    );
    // To the node `one` is not on (anti-affinity put it on either): a write of the node it
    // is on would change nothing, and succeed.
    let one = json(&cloud, &["-n", "demo", "get", "server", "one"])?;
    let elsewhere = if one["status"]["hypervisor"] == "node-b" {
        "node-a"
    } else {
        "node-b"
    };
    let err = cloud.kubectl_err(&[
        "-n",
        "demo",
        "patch",
        "server",
        "one",
        "--subresource",
        "status",
        "--type",
        "merge",
        "-p",
        &format!(r#"{{"status":{{"hypervisor":"{elsewhere}"}}}}"#),
    ])?;
    assert!(err.contains("status.hypervisor"), "{err}");

    // Stop, start, delete.
    cloud.kubectl_ok(&[
        "-n",
        "demo",
        "patch",
        "server",
        "one",
        "--type",
        "merge",
        "-p",
        r#"{"spec":{"powerState":"Stopped"}}"#,
    ])?;
    wait_server(&cloud, "one", "one to stop", |s| {
        s["status"]["phase"] == "Stopped" && s["status"]["powerState"] == "Shutdown"
    })?;
    cloud.kubectl_ok(&[
        "-n",
        "demo",
        "patch",
        "server",
        "one",
        "--type",
        "merge",
        "-p",
        r#"{"spec":{"powerState":"Running"}}"#,
    ])?;
    wait_server(&cloud, "one", "one to run again", |s| {
        s["status"]["phase"] == "Running"
    })?;
    cloud.kubectl_ok(&["-n", "demo", "delete", "server", "one", "--timeout=180s"])?;
    // Its place freed, the waiting member gets it.
    wait_server(&cloud, "three", "the third member to be placed", |s| {
        s["status"]["phase"] == "Running"
    })?;
    let hvs = json(&cloud, &["get", "hypervisors"])?;
    for hv in hvs["items"].as_array().into_iter().flatten() {
        assert!(
            hv["status"]["capacity"]["ramMiB"].as_u64().unwrap_or(0) > 0,
            "{hv}"
        );
    }

    // Evacuation: a node whose heartbeat stops goes NotReady; its servers with
    // evacuationPolicy Evacuate are rebuilt on another node, the others marked Error.
    let together = "---\napiVersion: compute.stratus.dev/v1\nkind: ServerGroup\nmetadata:\n  name: together\n  namespace: demo\nspec:\n  policy: soft-affinity\n";
    cloud.kubectl_in(
        &["apply", "-f", "-"],
        &format!(
            "{together}{}",
            server(
                "evac",
                "m1.nano",
                "tiny",
                "  serverGroup: together\n  evacuationPolicy: Evacuate\n"
            )
        ),
    )?;
    let evac = wait_server(&cloud, "evac", "evac running", |s| {
        s["status"]["phase"] == "Running"
    })?;
    let lost = evac["status"]["hypervisor"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    cloud.kubectl_in(
        &["apply", "-f", "-"],
        &server("manual", "m1.nano", "tiny", "  serverGroup: together\n"),
    )?;
    let manual = wait_server(&cloud, "manual", "manual running", |s| {
        s["status"]["phase"] == "Running"
    })?;
    assert_eq!(
        manual["status"]["hypervisor"],
        lost.as_str(),
        "soft affinity ignored"
    );
    for (node, agent) in agents.iter_mut() {
        if *node == lost {
            agent.kill();
        }
    }
    wait_until(T, "the lost node to be NotReady", || {
        json(&cloud, &["get", "hypervisor", &lost])
            .ok()
            .filter(|h| h["status"]["phase"] == "NotReady")
    })
    .with_context(|| {
        let log = cloud.log();
        let tail: Vec<&str> = log
            .lines()
            .rev()
            .filter(|l| {
                (l.contains("node lifecycle") && l.contains(lost.as_str()))
                    || l.contains("WARN")
                    || l.contains("ERROR")
            })
            .take(150)
            .collect();
        format!(
            "hypervisor: {}\nlease: {}\nlast lines of stratus up:\n{}",
            cloud
                .kubectl_ok(&["get", "hypervisor", &lost, "-o", "yaml"])
                .unwrap_or_default(),
            cloud
                .kubectl_ok(&["-n", "kube-node-lease", "get", "lease", &lost, "-o", "yaml"])
                .unwrap_or_default(),
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        )
    })?;
    let moved = wait_server(&cloud, "evac", "evac rebuilt elsewhere", |s| {
        s["status"]["phase"] == "Running" && s["status"]["hypervisor"] != lost.as_str()
    })?;
    assert!(moved["status"]["hypervisor"].is_string());
    let stuck = wait_server(&cloud, "manual", "manual marked Error", |s| {
        s["status"]["phase"] == "Error"
    })?;
    assert_eq!(
        condition(&stuck, "Ready").map(|c| c["reason"].clone()),
        Some("HypervisorLost".into())
    );
    assert_eq!(stuck["status"]["hypervisor"], lost.as_str());
    // The operator's request (`nova evacuate`): rebuilt on a live hypervisor.
    let out = cloud
        .stratus_cmd()
        .args(["evacuate", "-n", "demo", "manual"])
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_server(&cloud, "manual", "manual rebuilt elsewhere", |s| {
        s["status"]["phase"] == "Running" && s["status"]["hypervisor"] != lost.as_str()
    })?;
    Ok(())
}

fn uid(s: &Value) -> String {
    s["metadata"]["uid"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// Waits for a line on a guest's serial console.
fn wait_console(node: &Node, uid: &str, what: &str, pred: impl Fn(&str) -> bool) -> Result<()> {
    wait_until(T, what, || pred(&node.console(uid)).then_some(()))
        .with_context(|| format!("console of {uid}:\n{}", node.console(uid)))
}

#[test]
fn real_guests_on_two_simulated_nodes() -> Result<()> {
    let guest = Guest::serve()?;
    let mut a = Node::start("node-a")?;
    let mut b = Node::start("node-b")?;
    let cloud = Cloud::up_with(&["--nodes", "node-a,node-b"])?;
    cloud.projects(&["demo"])?;
    a.start_agent(&cloud)?;
    b.start_agent(&cloud)?;
    let examples = stratus_e2e::repo_root().join("examples/flavors.yaml");
    cloud.kubectl_ok(&["apply", "-f", examples.to_str().unwrap_or_default()])?;
    cloud.kubectl_in(&["apply", "-f", "-"], &guest.images_yaml("demo")?)?;
    // Watch the servers the whole time, as a dashboard would.
    let watch_log = cloud.dir.path().join("watch.log");
    let mut watch = Proc::spawn(
        "kubectl get servers -w",
        cloud.kubectl_cmd().args([
            "-n",
            "demo",
            "get",
            "servers",
            "-w",
            "--output-watch-events",
        ]),
        &watch_log,
    )?;

    // User data with every XML and shell metacharacter reaches the guest untouched.
    let user_data = base64_of("#!/bin/sh\necho '<tag attr=\"x\">&amp; $(reboot) `id`; rm -rf /'\n");
    let group = "---\napiVersion: compute.stratus.dev/v1\nkind: ServerGroup\nmetadata:\n  name: apart\n  namespace: demo\nspec:\n  policy: anti-affinity\n";
    let key = "---\napiVersion: compute.stratus.dev/v1\nkind: Keypair\nmetadata:\n  name: k1\n  namespace: demo\nspec:\n  publicKey: ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGJ1c3RlZC10ZXN0LWtleS1mb3ItcGFnaW5n e2e@stratus\n";
    cloud.kubectl_in(
        &["apply", "-f", "-"],
        &format!(
            "{group}{key}{}{}",
            server(
                "alpha",
                "m1.nano",
                "tiny",
                &format!("  serverGroup: apart\n  keypair: k1\n  userData: {user_data}\n"),
            ),
            server(
                "beta",
                "m1.nano",
                "tiny",
                "  serverGroup: apart\n  hostname: beta-host\n"
            ),
        ),
    )?;
    let mut placed = Vec::new();
    for (name, host) in [("alpha", "alpha"), ("beta", "beta-host")] {
        let s = wait_server(&cloud, name, "a running guest", |s| {
            s["status"]["phase"] == "Running"
        })?;
        let node = if s["status"]["hypervisor"] == "node-a" {
            &a
        } else {
            &b
        };
        wait_console(node, &uid(&s), "the guest's marker", |c| {
            c.contains(&format!(
                "STRATUS-GUEST-READY hostname={host} instance-id={}",
                uid(&s)
            ))
        })?;
        placed.push(
            s["status"]["hypervisor"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
        );
    }
    placed.sort();
    assert_eq!(placed, ["node-a", "node-b"], "anti-affinity broken");
    let alpha = json(&cloud, &["-n", "demo", "get", "server", "alpha"])?;
    let (node, other) = if alpha["status"]["hypervisor"] == "node-a" {
        (&mut a, &mut b)
    } else {
        (&mut b, &mut a)
    };
    let alpha_uid = uid(&alpha);
    assert_eq!(node.domains()?, [format!("stratus-{alpha_uid}")]);
    // The console log, through the CLI (on the node, where the log is).
    let out = cloud
        .stratus_cmd()
        .args([
            "console",
            "-n",
            "demo",
            "alpha",
            "--wait-for",
            "STRATUS-GUEST-READY",
        ])
        .output()?;
    let console = String::from_utf8_lossy(&out.stdout);
    assert!(
        console.contains("STRATUS-GUEST-READY hostname=alpha"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The keypair's key reached the guest through the config drive.
    assert!(console.contains("STRATUS-GUEST-KEYS count=1"), "{console}");
    let _ = other;

    // Stop (ACPI, the guest powers off), start, reboot.
    let patch = |spec: &str| -> Result<()> {
        cloud.kubectl_ok(&[
            "-n", "demo", "patch", "server", "alpha", "--type", "merge", "-p", spec,
        ])?;
        Ok(())
    };
    patch(r#"{"spec":{"powerState":"Stopped"}}"#)?;
    wait_server(&cloud, "alpha", "alpha to stop", |s| {
        s["status"]["phase"] == "Stopped"
    })?;
    assert!(node.console(&alpha_uid).contains("STRATUS-GUEST-POWEROFF"));
    patch(r#"{"spec":{"powerState":"Running"}}"#)?;
    wait_server(&cloud, "alpha", "alpha to run again", |s| {
        s["status"]["phase"] == "Running"
    })?;
    let boots = |n: &Node| n.console(&alpha_uid).matches("STRATUS-GUEST-READY").count();
    wait_until(T, "the second boot", || (boots(node) >= 2).then_some(()))?;
    patch(r#"{"spec":{"rebootRequest":"r1","rebootType":"Hard"}}"#)?;
    wait_until(T, "the reboot", || (boots(node) >= 3).then_some(()))?;
    wait_server(&cloud, "alpha", "the reboot recorded", |s| {
        s["status"]["lastRebootRequest"] == "r1"
    })?;

    // Drift: the domain destroyed and undefined behind Stratus's back comes back.
    let dom = format!("stratus-{alpha_uid}");
    // (Undefined first: a destroyed but still defined domain would just be started again.)
    node.virsh(&["undefine", &dom])?;
    node.virsh(&["destroy", &dom])?;
    wait_until(T, "the domain to be recreated", || {
        node.domains()
            .ok()
            .filter(|d| d.len() == 1 && d[0] == dom)
            .map(|_| ())
    })?;
    wait_event(&cloud, "Recreated", "alpha")?;
    // (The agents resync only every 300 s here: what repaired it was libvirt's event.)

    // With driftPolicy Report, a guest powered off behind Stratus's back is reported and left
    // as it is; setting the policy back to Recreate repairs it.
    patch(r#"{"spec":{"driftPolicy":"Report"}}"#)?;
    wait_server(&cloud, "alpha", "the agent to see the policy", |s| {
        s["status"]["observedGeneration"] == s["metadata"]["generation"]
            && s["status"]["phase"] == "Running"
    })?;
    node.virsh(&["destroy", &dom])?;
    let drifted = |s: &Value, status: &str| {
        s["status"]["conditions"].as_array().is_some_and(|c| {
            c.iter()
                .any(|c| c["type"] == "Drifted" && c["status"] == status)
        })
    };
    let s = wait_server(&cloud, "alpha", "the drift to be reported", |s| {
        s["status"]["phase"] == "Error" && drifted(s, "True")
    })?;
    let reason = |t: &str| condition(&s, t).map(|c| c["reason"].clone());
    assert_eq!(reason("Drifted"), Some("PoweredOff".into()), "{s}");
    assert_eq!(reason("Ready"), Some("Drifted".into()), "{s}");
    let state = node.virsh(&["domstate", &dom])?;
    assert_eq!(
        String::from_utf8_lossy(&state.stdout).trim(),
        "shut off",
        "the Report policy must leave the guest as it was found"
    );
    wait_event(&cloud, "DriftDetected", "alpha")?;
    let before = boots(node);
    patch(r#"{"spec":{"driftPolicy":"Recreate"}}"#)?;
    wait_server(&cloud, "alpha", "the repair", |s| {
        s["status"]["phase"] == "Running" && drifted(s, "False")
    })?;
    wait_until(T, "a boot after the repair", || {
        (boots(node) > before).then_some(())
    })?;

    // Resize (cold: the new size is claimed on the hypervisor, then the guest restarts with
    // it) and rebuild (the root disk recreated from another image).
    cloud.kubectl_in(
        &["apply", "-f", "-"],
        "apiVersion: compute.stratus.dev/v1\nkind: Flavor\nmetadata:\n  name: t.bigger\nspec:\n  vcpus: 1\n  ramMiB: 512\n  diskGiB: 2\n",
    )?;
    patch(r#"{"spec":{"flavor":"t.bigger"}}"#)?;
    let s = wait_server(&cloud, "alpha", "the resize", |s| {
        s["status"]["flavor"] == "t.bigger" && s["status"]["phase"] == "Running"
    })?;
    assert_eq!(s["status"]["allocated"]["ramMiB"], 512);
    let xml = node.virsh(&["dumpxml", &dom])?;
    let xml = String::from_utf8_lossy(&xml.stdout).into_owned();
    assert!(xml.contains("<memory unit='KiB'>524288</memory>"), "{xml}");
    // The root disk grew with the flavor's.
    let info = Command::new("qemu-img")
        .args(["info", "-U", "--output=json"])
        .arg(
            node.dir
                .path()
                .join("state/servers")
                .join(&alpha_uid)
                .join("root.qcow2"),
        )
        .output()?;
    let info: Value = serde_json::from_slice(&info.stdout)?;
    assert_eq!(info["virtual-size"], 2u64 << 30, "{info}");
    let before = boots(node);
    let tiny2 = guest
        .images_yaml("demo")?
        .replace("name: tiny\n", "name: tiny-again\n");
    cloud.kubectl_in(&["apply", "-f", "-"], &tiny2)?;
    patch(r#"{"spec":{"image":"tiny-again"}}"#)?;
    wait_server(&cloud, "alpha", "the rebuild", |s| {
        s["status"]["image"] == "tiny-again" && s["status"]["phase"] == "Running"
    })?;
    wait_until(T, "a boot of the rebuilt disk", || {
        (boots(node) > before).then_some(())
    })?;

    // Killing the agent mid-create: exactly one domain per server after it restarts.
    cloud.kubectl_in(
        &["apply", "-f", "-"],
        &server("gamma", "m1.nano", "tiny", ""),
    )?;
    let gamma = wait_server(&cloud, "gamma", "gamma placed", |s| {
        s["status"]["hypervisor"].is_string()
    })?;
    let gnode = if gamma["status"]["hypervisor"] == "node-a" {
        &mut a
    } else {
        &mut b
    };
    wait_until(T, "the build to start", || {
        (gnode.agent_log().contains("gamma")).then_some(())
    })?;
    gnode.kill_agent();
    gnode.start_agent(&cloud)?;
    wait_server(&cloud, "gamma", "gamma running", |s| {
        s["status"]["phase"] == "Running"
    })?;
    let gdom = format!("stratus-{}", uid(&gamma));
    assert_eq!(
        gnode.domains()?.iter().filter(|d| **d == gdom).count(),
        1,
        "not exactly one domain"
    );

    // Delete: domain and disks gone, the object released.
    cloud.kubectl_ok(&["-n", "demo", "delete", "server", "gamma", "--timeout=180s"])?;
    assert!(!gnode.domains()?.contains(&gdom));
    assert!(
        !gnode
            .dir
            .path()
            .join("state/servers")
            .join(uid(&gamma))
            .exists()
    );

    watch.terminate().ok();
    let seen = std::fs::read_to_string(&watch_log)?;
    for phase in ["Pending", "Running", "Stopped"] {
        assert!(
            seen.contains(phase),
            "the watch never showed {phase}:\n{seen}"
        );
    }
    assert!(seen.contains("DELETED"), "{seen}");
    Ok(())
}

fn base64_of(s: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(s)
}
