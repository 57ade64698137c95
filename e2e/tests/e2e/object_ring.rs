//! ObjectRings built by the ring controller of `stratus up`: the example ring is built into
//! an ObjectRingVersion whose ring file Swift's own `Ring` loads with the same devices per
//! partition; a paused change shows its effect in `status.proposed` and builds nothing; a
//! removed device makes version 2, moving little more than that device's replicas; a spec that
//! cannot be built keeps the current version; a ring too large for one object is refused.
//! Needs Debian's `python3-swift` (scripts/setup.sh installs it).

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use base64::Engine as _;
use stratus_api_types::object::{ObjectRing, ObjectRingVersion, RingProposal};
use stratus_e2e::{Cloud, repo_root, wait_until};
use stratus_ring::RingData;

/// Generous: the controller builds within a second, but a loaded machine is slow.
const WAIT: Duration = Duration::from_secs(120);

fn get(cloud: &Cloud, kind: &str, name: &str) -> Option<serde_json::Value> {
    let out = cloud.kubectl(&["get", kind, name, "-o", "json"]).ok()?;
    if !out.status.success() {
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
}

fn ring(cloud: &Cloud) -> Option<ObjectRing> {
    serde_json::from_value(get(cloud, "objectring", "object-1")?).ok()
}

/// The ring file of version `name`, and the ObjectRingVersion.
fn ring_file(cloud: &Cloud, name: &str) -> Result<(RingData, Vec<u8>, ObjectRingVersion)> {
    let v: ObjectRingVersion = serde_json::from_value(
        get(cloud, "objectringversion", name).with_context(|| format!("no {name}"))?,
    )?;
    let bytes = base64::engine::general_purpose::STANDARD.decode(&v.spec.ring_file)?;
    let data = RingData::read_v1(bytes.as_slice())?;
    Ok((data, bytes, v))
}

/// Swift's `Ring` loading the file: the device ids of each partition.
fn swift_part_nodes(path: &Path) -> Result<Vec<Vec<u16>>> {
    let out = Command::new("/usr/bin/python3")
        .arg("-c")
        .arg(
            "import sys, json\n\
             from swift.common.ring import Ring\n\
             r = Ring(sys.argv[1])\n\
             print(json.dumps([[d['id'] for d in r.get_part_nodes(p)] for p in range(r.partition_count)]))",
        )
        .arg(path)
        .output()?;
    ensure!(
        out.status.success(),
        "python3 (python3-swift): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// Our assignment by partition (replica → partition → device turned around).
fn by_partition(data: &RingData) -> Vec<Vec<u16>> {
    (0..data.parts())
        .map(|p| {
            data.replica2part2dev
                .iter()
                .filter_map(|row| row.get(p).copied())
                .collect()
        })
        .collect()
}

fn condition(r: &ObjectRing, type_: &str) -> Option<(String, String)> {
    r.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status.clone(), c.reason.clone()))
}

#[test]
fn an_object_ring_is_built_into_a_ring_file_swift_loads_and_changes_move_few_replicas() -> Result<()>
{
    let cloud = Cloud::up()?;
    let example = repo_root().join("examples/object-ring.yaml");
    cloud.kubectl_ok(&["apply", "-f", example.to_str().unwrap_or_default()])?;

    // Version 1: balanced, fully dispersed over 3 zones, every device in the file.
    let r = wait_until(WAIT, "object-1 at version 1", || {
        ring(&cloud).filter(|r| r.status.as_ref().and_then(|s| s.version) == Some(1))
    })
    .with_context(|| cloud.log())?;
    let s = r.status.clone().unwrap_or_default();
    assert_eq!(s.ring_version.as_deref(), Some("object-1-v1"));
    assert_eq!(s.devices, Some(4));
    assert_eq!(s.moved, Some(3 * 1024));
    assert_eq!(s.pending_moves, Some(0));
    let balance = s.balance.context("no balance")?;
    assert!((0.0..100.0).contains(&balance), "balance {balance}");
    assert_eq!(s.dispersion, Some(0.0), "three replicas in three zones");
    assert_eq!(
        condition(&r, "Ready"),
        Some(("True".into(), "Built".into()))
    );
    assert_eq!(
        condition(&r, "Invalid"),
        Some(("False".into(), "Valid".into()))
    );
    let table = cloud.kubectl_ok(&["get", "ring", "object-1"])?;
    assert!(table.contains("Ready"), "{table}");

    // Swift loads the ring file with the same devices per partition.
    let (v1, bytes, obj) = ring_file(&cloud, "object-1-v1")?;
    let owner = &obj.metadata.owner_references.clone().unwrap_or_default()[0];
    assert_eq!(owner.kind, "ObjectRing");
    assert_eq!(Some(&owner.uid), r.metadata.uid.as_ref());
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("object-1.ring.gz");
    std::fs::write(&path, &bytes)?;
    let ours = by_partition(&v1);
    assert_eq!(swift_part_nodes(&path)?, ours);
    let sdc1 = v1
        .devs
        .iter()
        .flatten()
        .find(|d| d.device == "sdc1")
        .context("sdc1 in the ring")?
        .id;
    let held = ours.iter().flatten().filter(|&&d| d == sdc1).count() as u64;
    assert!(held > 0);

    // Staged: paused, the removal of sdc1 is shown, not built.
    let three = r#"[{"zone":1,"ip":"127.0.0.1","port":6200,"device":"sdb1","weight":100},
                    {"zone":2,"ip":"127.0.0.2","port":6200,"device":"sdb1","weight":100},
                    {"zone":3,"ip":"127.0.0.3","port":6200,"device":"sdb1","weight":100}]"#;
    let patch = format!(r#"{{"spec":{{"paused":true,"devices":{three}}}}}"#);
    cloud.kubectl_ok(&["patch", "ring", "object-1", "--type", "merge", "-p", &patch])?;
    let r = wait_until(WAIT, "a proposal for the removal", || {
        ring(&cloud).filter(|r| r.status.as_ref().is_some_and(|s| s.proposed.is_some()))
    })
    .with_context(|| cloud.log())?;
    let p = r
        .status
        .clone()
        .unwrap_or_default()
        .proposed
        .context("proposed")?;
    assert!(
        p.moves >= held && p.moves as f64 <= held as f64 * 1.05,
        "proposed {} moves, sdc1 held {held}",
        p.moves
    );
    assert_eq!(p.devices, 3);
    assert_eq!(p.dispersion, 0.0);
    assert_eq!(r.status.as_ref().and_then(|s| s.version), Some(1));
    assert_eq!(
        condition(&r, "Rebalancing"),
        Some(("False".into(), "Paused".into()))
    );
    let none = cloud.kubectl(&["get", "objectringversion", "object-1-v2"])?;
    assert!(!none.status.success(), "a paused ring built version 2");

    // Applied: version 2 moves sdc1's replicas and little more (the minimum + 5%), and no
    // partition is left on it.
    cloud.kubectl_ok(&[
        "patch",
        "ring",
        "object-1",
        "--type",
        "merge",
        "-p",
        r#"{"spec":{"paused":false}}"#,
    ])?;
    let r = wait_until(WAIT, "object-1 at version 2", || {
        ring(&cloud).filter(|r| r.status.as_ref().and_then(|s| s.version) == Some(2))
    })
    .with_context(|| cloud.log())?;
    let s = r.status.clone().unwrap_or_default();
    let moved = s.moved.context("moved")?;
    assert!(
        moved >= held && moved as f64 <= held as f64 * 1.05,
        "moved {moved}, sdc1 held {held}"
    );
    assert_eq!(s.devices, Some(3));
    // The proposal is gone (a status apply that drops it may leave it empty).
    assert!(
        s.proposed
            .as_ref()
            .is_none_or(|p| *p == RingProposal::default()),
        "{:?}",
        s.proposed
    );
    let (v2, bytes, _) = ring_file(&cloud, "object-1-v2")?;
    std::fs::write(&path, &bytes)?;
    let ours2 = by_partition(&v2);
    assert_eq!(swift_part_nodes(&path)?, ours2);
    assert!(ours2.iter().flatten().all(|&d| d != sdc1));
    let changed: usize = ours
        .iter()
        .zip(&ours2)
        .map(|(a, b)| a.iter().zip(b).filter(|(x, y)| x != y).count())
        .sum();
    assert_eq!(changed as u64, moved);

    // Fewer devices than replicas: Invalid, and version 2 stays.
    let one = r#"{"spec":{"devices":[{"zone":1,"ip":"127.0.0.1","port":6200,"device":"sdb1","weight":100}]}}"#;
    cloud.kubectl_ok(&["patch", "ring", "object-1", "--type", "merge", "-p", one])?;
    let r = wait_until(WAIT, "object-1 invalid", || {
        ring(&cloud).filter(|r| condition(r, "Invalid").is_some_and(|c| c.0 == "True"))
    })
    .with_context(|| cloud.log())?;
    let s = r.status.clone().unwrap_or_default();
    assert_eq!(s.version, Some(2));
    assert_eq!(s.ring_version.as_deref(), Some("object-1-v2"));
    assert_eq!(condition(&r, "Ready").map(|c| c.0), Some("False".into()));
    ring_file(&cloud, "object-1-v2")?;

    // A ring whose file would not fit in one API object is refused, naming the field.
    let err = cloud.kubectl_err(&[
        "patch",
        "ring",
        "object-1",
        "--type",
        "merge",
        "-p",
        r#"{"spec":{"partPower":20}}"#,
    ])?;
    assert!(err.contains("spec.partPower"), "{err}");

    // Deleted, its versions go with it.
    cloud.kubectl_ok(&["delete", "ring", "object-1"])?;
    wait_until(WAIT, "the ring's versions to be gone", || {
        let out = cloud
            .kubectl_ok(&["get", "objectringversions", "-o", "name"])
            .ok()?;
        out.trim().is_empty().then_some(())
    })
    .with_context(|| cloud.log())?;
    Ok(())
}
