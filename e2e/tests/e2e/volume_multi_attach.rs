//! A multi-attach volume held by two real guests at once: one simulated node runs the compute
//! agent (its own libvirtd, real TCG guests) and the storage agent (a file pool). The volume
//! (`spec.multiAttach`, a partition table the test wrote) is attached to two servers; both
//! guests' kernels read its partitions, both domains have it as a shareable, uncached disk,
//! and the volume lists both servers. One guest writes a marker to it and syncs; the other
//! reads the marker back from its own disk. Detached from one, the other keeps it; deleting
//! it is refused until no server holds it.

use std::os::unix::fs::FileExt;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use serde_json::Value;
use stratus_e2e::{Cloud, wait_until};

use super::volume_attach::{
    OneNode, blklist, partition_scans, partition_table, server_yaml, volume_yaml,
};

const NS: &str = "mavols";
const NODE: &str = "vma";
/// Generous: builds and TCG guests of other tests share two cores.
const WAIT: Duration = Duration::from_secs(300);

/// `kind/name` in the test's project, once `pred` holds of it.
fn until(cloud: &Cloud, kind: &str, name: &str, pred: impl Fn(&Value) -> bool) -> Result<Value> {
    let get = || -> Option<Value> {
        let out = cloud
            .kubectl_ok(&["-n", NS, "get", kind, name, "-o", "json"])
            .ok()?;
        serde_json::from_str(&out).ok()
    };
    wait_until(WAIT, &format!("{kind} {name}"), || {
        get().filter(|v| pred(v))
    })
    .with_context(|| {
        let now = cloud.kubectl_ok(&["-n", NS, "get", kind, name, "-o", "yaml"]);
        format!("{kind} {name}: {}", now.unwrap_or_default())
    })
}

/// The servers of the volume's `status.attachments`.
fn attachments(vol: &Value) -> Vec<&str> {
    vol["status"]["attachments"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|a| a["server"].as_str())
        .collect()
}

#[test]
fn a_multi_attach_volume_is_shared_by_two_real_guests() -> Result<()> {
    // The test guest with a shell on its console.
    let one = OneNode::start(NODE, NS, " stratus.shell")?;
    let (cloud, node) = (&one.cloud, &one.node);
    let apply = |yaml: &str| cloud.kubectl_in(&["-n", NS, "apply", "-f", "-"], yaml);

    apply(&volume_yaml("shared", "  multiAttach: true\n"))?;
    let vol = until(cloud, "volume", "shared", |v| {
        v["status"]["phase"] == "Available" && v["status"]["devicePath"].is_string()
    })?;
    let path = vol["status"]["devicePath"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)?
        .write_all_at(&partition_table(), 0)?;

    let both = ["ma1", "ma2"];
    for s in both {
        apply(&server_yaml(
            s,
            "  image: tiny\n  volumes:\n  - volume: shared\n",
        ))?;
    }
    let mut domains = Vec::new();
    for s in both {
        let server = until(cloud, "server", s, |v| v["status"]["phase"] == "Running")?;
        let uid = server["metadata"]["uid"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        domains.push((uid.clone(), format!("stratus-{uid}")));
    }
    // Both guests' kernels read its partitions; both domains hold it, shareable and uncached.
    for (uid, dom) in &domains {
        wait_until(WAIT, "the partitions on the console", || {
            (partition_scans(&node.console(uid)) >= 1).then_some(())
        })
        .with_context(|| format!("console of {uid}:\n{}", node.console(uid)))?;
        ensure!(
            blklist(node, dom)?.contains(&("vdc".into(), path.clone())),
            "{dom}: {:?}",
            blklist(node, dom)
        );
        let xml = String::from_utf8_lossy(&node.virsh(&["dumpxml", dom])?.stdout).into_owned();
        let disk = xml
            .split("<disk ")
            .find(|d| d.contains(&path))
            .context("the volume's disk")?;
        ensure!(
            disk.contains("<shareable/>") && disk.contains("cache='none'"),
            "{dom}: {disk}"
        );
    }
    let vol = until(cloud, "volume", "shared", |v| {
        v["status"]["phase"] == "InUse"
    })?;
    assert_eq!(attachments(&vol), both, "{vol}");
    assert_eq!(vol["status"]["attachedTo"], "ma1", "{vol}");
    let table = cloud.kubectl_ok(&["-n", NS, "get", "volume", "shared"])?;
    ensure!(table.contains("ma1") && table.contains("ma2"), "{table}");

    // One guest writes and syncs; the other reads it from its own disk, past its page cache.
    let (w_uid, w_dom) = &domains[0];
    let (r_uid, r_dom) = &domains[1];
    node.type_until(
        w_uid,
        w_dom,
        "echo STRATUS-SHARED-DATA | dd of=/dev/vdc bs=512 seek=2048 conv=fsync && echo SHARED-WRITE-$((40+2))",
        "SHARED-WRITE-42",
        10,
    )?;
    let mut data = [0u8; 20];
    std::fs::File::open(&path)?.read_exact_at(&mut data, 1 << 20)?;
    ensure!(
        &data == b"STRATUS-SHARED-DATA\n",
        "the write is not in the volume: {:?}",
        String::from_utf8_lossy(&data)
    );
    // The marker read is printed with its dashes turned to spaces, so that nothing echoed of
    // the command itself is it.
    node.type_until(
        r_uid,
        r_dom,
        "echo 3 >/proc/sys/vm/drop_caches 2>/dev/null; dd if=/dev/vdc bs=512 skip=2048 count=1 2>/dev/null | head -c 19 | tr - ' '; echo; echo SHARED-READ-$((40+2))",
        "STRATUS SHARED DATA",
        10,
    )?;

    // Detached from ma1: ma2 keeps it.
    cloud.kubectl_ok(&[
        "-n",
        NS,
        "patch",
        "server",
        "ma1",
        "--type=json",
        "-p",
        r#"[{"op":"remove","path":"/spec/volumes"}]"#,
    ])?;
    wait_until(WAIT, "vdc unplugged from ma1", || {
        blklist(node, &domains[0].1)
            .ok()
            .filter(|l| !l.iter().any(|(_, s)| *s == path))
            .map(|_| ())
    })
    .with_context(|| format!("agent log:\n{}", node.agent_log()))?;
    let vol = until(cloud, "volume", "shared", |v| attachments(v) == ["ma2"])?;
    assert_eq!(vol["status"]["attachedTo"], "ma2", "{vol}");
    assert_eq!(vol["status"]["phase"], "InUse", "{vol}");
    ensure!(blklist(node, &domains[1].1)?.contains(&("vdc".into(), path.clone())));
    let err = cloud.kubectl_err(&["-n", NS, "delete", "volume", "shared", "--wait=false"])?;
    ensure!(err.contains("attached"), "{err}");

    // Both servers gone: the volume is free, and goes.
    cloud.kubectl_ok(&[
        "-n",
        NS,
        "delete",
        "server",
        "ma1",
        "ma2",
        "--wait=true",
        "--timeout=300s",
    ])?;
    until(cloud, "volume", "shared", |v| {
        v["status"].get("attachedTo").is_none() && attachments(v).is_empty()
    })?;
    cloud.kubectl_ok(&[
        "-n",
        NS,
        "delete",
        "volume",
        "shared",
        "--wait=true",
        "--timeout=300s",
    ])?;
    ensure!(node.domains()?.is_empty(), "{:?}", node.domains());
    Ok(())
}
