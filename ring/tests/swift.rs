//! The ring builder against OpenStack Swift's own: the same topologies built with
//! `swift-ring-builder` (create, add, rebalance, then a device removed or re-weighted) and with
//! ours, compared on balance, dispersion and replicas moved; and Swift's `Ring` loads the ring
//! file we write with the assignment we made. Needs Debian's `swift` and `python3-swift`
//! (scripts/setup.sh installs them).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use stratus_ring::{Device, RingBuilder, RingData};

const PYTHON: &str = "/usr/bin/python3";
const T0: u64 = 1_800_000_000;
const HOUR: u64 = 3600;
/// Swift prints and we compare at this precision (percent).
const EPS: f64 = 1e-6;

fn swift_ring_builder() -> PathBuf {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|dir| dir.join("swift-ring-builder"))
        .find(|p| p.is_file())
        .expect("swift-ring-builder is installed (Debian package swift; scripts/setup.sh)")
}

/// Runs `swift-ring-builder <builder> args…`; exit 0 (done) or 1 (done, with a warning)
/// are accepted, 2 (error) fails the test.
fn srb(dir: &Path, args: &[&str]) -> String {
    let out = Command::new(PYTHON)
        .arg(swift_ring_builder())
        .arg(dir.join("object.builder"))
        .args(args)
        .output()
        .expect("run swift-ring-builder");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        matches!(out.status.code(), Some(0 | 1)),
        "swift-ring-builder {args:?}: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn python(script: &str, args: &[&Path]) -> String {
    let out = Command::new(PYTHON)
        .arg("-c")
        .arg(script)
        .args(args)
        .output()
        .expect("run python3");
    assert!(
        out.status.success(),
        "python3: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Balance and dispersion as Swift's builder reports them (the numbers
/// `swift-ring-builder` prints, unrounded).
fn swift_report(dir: &Path) -> (f64, f64) {
    let out = python(
        "import sys\n\
         from swift.common.ring import RingBuilder\n\
         b = RingBuilder.load(sys.argv[1])\n\
         print(repr(b.get_balance()), repr(b.dispersion))",
        &[&dir.join("object.builder")],
    );
    let v: Vec<f64> = out
        .split_whitespace()
        .map(|x| x.parse().expect("a number"))
        .collect();
    (v[0], v[1])
}

/// Swift's ring file, read with our reader.
fn swift_ring(dir: &Path) -> RingData {
    let file = std::fs::File::open(dir.join("object.ring.gz")).expect("open Swift's ring");
    RingData::read_v1(file).expect("our reader reads Swift's ring file")
}

/// The device ids Swift's `Ring` gives for every partition of a ring file.
fn swift_part_nodes(path: &Path) -> Vec<Vec<u16>> {
    let out = python(
        "import sys, json\n\
         from swift.common.ring import Ring\n\
         r = Ring(sys.argv[1])\n\
         print(json.dumps([[d['id'] for d in r.get_part_nodes(p)] for p in range(r.partition_count)]))",
        &[path],
    );
    serde_json::from_str(&out).expect("JSON from python")
}

fn slots_changed(a: &[Vec<u16>], b: &[Vec<u16>]) -> usize {
    a.iter()
        .zip(b)
        .map(|(x, y)| x.iter().zip(y).filter(|(p, q)| p != q).count())
        .sum()
}

/// A lower bound on the replica slots a rebalance toward the plan must change: every
/// replica a device holds above its planned share leaves it; and a device below its share
/// that can take fewer partitions from those devices than it lacks (it already holds the
/// others) must be given the rest from devices that are not above theirs, one more move each.
fn least_moves(b: &RingBuilder) -> usize {
    let planned: BTreeMap<u16, usize> = b.planned_parts().expect("a plan").into_iter().collect();
    let mut held: BTreeMap<u16, usize> = BTreeMap::new();
    for &d in b.assignment().iter().flatten() {
        *held.entry(d).or_default() += 1;
    }
    let over: BTreeSet<u16> = planned
        .iter()
        .filter(|(id, n)| held.get(id).copied().unwrap_or(0) > **n)
        .map(|(id, _)| *id)
        .collect();
    let mut least: usize = over.iter().map(|id| held[id] - planned[id]).sum();
    let parts = b.assignment().first().map_or(0, Vec::len);
    let on = |part: usize| -> Vec<u16> {
        b.assignment()
            .iter()
            .filter_map(|r| r.get(part).copied())
            .collect()
    };
    for (&id, &want) in &planned {
        let lacks = want.saturating_sub(held.get(&id).copied().unwrap_or(0));
        if lacks == 0 {
            continue;
        }
        let takeable = (0..parts)
            .filter(|&p| {
                let devs = on(p);
                !devs.contains(&id) && devs.iter().any(|d| over.contains(d))
            })
            .count();
        least += lacks.saturating_sub(takeable);
    }
    least
}

enum Change {
    Remove(u16),
    Weight(u16, f64),
    Add(Device),
}

struct Scenario {
    name: &'static str,
    part_power: u8,
    replicas: u8,
    overload: f64,
    devices: Vec<Device>,
    changes: Vec<Change>,
}

fn dev(region: u32, zone: u32, host: u32, name: &str, weight: f64) -> Device {
    Device::new(
        region,
        zone,
        format!("127.0.{zone}.{host}"),
        6200 + region as u16,
        name,
        weight,
    )
}

fn add_args(d: &Device) -> Vec<String> {
    vec![
        "add".into(),
        "--region".into(),
        d.region.to_string(),
        "--zone".into(),
        d.zone.to_string(),
        "--ip".into(),
        d.ip.clone(),
        "--port".into(),
        d.port.to_string(),
        "--device".into(),
        d.device.clone(),
        "--weight".into(),
        d.weight.to_string(),
    ]
}

struct Step {
    balance: f64,
    dispersion: f64,
    moved: usize,
    least: usize,
}

/// Builds the scenario with both builders, step by step, checking at each step that our
/// numbers on Swift's assignment are Swift's, and returns (ours, Swift's) per step.
fn run(s: &Scenario) -> Vec<(Step, Step)> {
    let dir = tempfile::tempdir().expect("temp dir");
    let dir = dir.path();
    srb(
        dir,
        &[
            "create",
            &s.part_power.to_string(),
            &s.replicas.to_string(),
            "1",
        ],
    );
    srb(dir, &["set_overload", &s.overload.to_string()]);
    let mut ours = RingBuilder::new(s.part_power, f64::from(s.replicas), 1).expect("builder");
    ours.set_overload(s.overload).expect("overload");
    for d in &s.devices {
        let args = add_args(d);
        srb(dir, &args.iter().map(String::as_str).collect::<Vec<_>>());
        ours.add_device(d.clone()).expect("add device");
    }
    let mut steps = Vec::new();
    let mut now = T0;
    for (i, change) in std::iter::once(None)
        .chain(s.changes.iter().map(Some))
        .enumerate()
    {
        match change {
            None => {}
            Some(Change::Remove(id)) => {
                srb(dir, &["remove", &format!("d{id}")]);
                ours.remove_device(*id).expect("remove");
            }
            Some(Change::Weight(id, w)) => {
                srb(dir, &["set_weight", &format!("d{id}"), &w.to_string()]);
                ours.set_weight(*id, *w).expect("set weight");
            }
            Some(Change::Add(d)) => {
                let args = add_args(d);
                srb(dir, &args.iter().map(String::as_str).collect::<Vec<_>>());
                ours.add_device(d.clone()).expect("add");
            }
        }
        // Each change comes after min_part_hours, so both builders may move any partition.
        srb(dir, &["pretend_min_part_hours_passed"]);
        now += 2 * HOUR;
        let swift_before = if i == 0 { None } else { Some(swift_ring(dir)) };
        let ours_before = ours.assignment().to_vec();
        let our_least = if i == 0 { 0 } else { least_moves(&ours) };
        let done = ours.rebalance(now, 7 + i as u64).expect("our rebalance");
        srb(dir, &["rebalance", "--seed", &(7 + i).to_string()]);
        let (swift_balance, swift_dispersion) = swift_report(dir);
        let swift_after = swift_ring(dir);

        // Our balance and dispersion, computed on Swift's assignment, are Swift's.
        let mirror = RingBuilder::from_ring(&swift_after, 1).expect("Swift's ring in our builder");
        assert!(
            (mirror.balance() - swift_balance).abs() < EPS,
            "{} step {i}: balance of Swift's ring: ours {} Swift {swift_balance}",
            s.name,
            mirror.balance()
        );
        assert!(
            (mirror.dispersion() - swift_dispersion).abs() < EPS,
            "{} step {i}: dispersion of Swift's ring: ours {} Swift {swift_dispersion}",
            s.name,
            mirror.dispersion()
        );
        assert!((done.balance - ours.balance()).abs() < EPS);
        assert!((done.dispersion - ours.dispersion()).abs() < EPS);
        if i > 0 {
            assert_eq!(done.moved, slots_changed(&ours_before, ours.assignment()));
        }

        let swift_moved = match &swift_before {
            Some(before) => slots_changed(&before.replica2part2dev, &swift_after.replica2part2dev),
            None => swift_after.replica2part2dev.iter().map(Vec::len).sum(),
        };
        let swift_least = match &swift_before {
            Some(_) => our_least,
            None => 0,
        };
        steps.push((
            Step {
                balance: done.balance,
                dispersion: done.dispersion,
                moved: done.moved,
                least: our_least,
            },
            Step {
                balance: swift_balance,
                dispersion: swift_dispersion,
                moved: swift_moved,
                least: swift_least,
            },
        ));

        // Swift's Ring loads our file and finds our devices for every partition.
        let path = dir.join(format!("ours-{i}.ring.gz"));
        let ring = ours.ring().expect("a built ring");
        ring.write_v1(std::fs::File::create(&path).expect("create ring file"))
            .expect("write ring file");
        let nodes = swift_part_nodes(&path);
        assert_eq!(nodes.len(), ours.parts());
        for (part, nodes) in nodes.iter().enumerate() {
            let mine: Vec<u16> = ours
                .assignment()
                .iter()
                .filter_map(|r| r.get(part).copied())
                .collect();
            assert_eq!(nodes, &mine, "{} step {i}: partition {part}", s.name);
        }
    }
    steps
}

fn check(s: &Scenario) {
    let steps = run(s);
    for (i, (ours, swift)) in steps.iter().enumerate() {
        eprintln!(
            "{} step {i}: ours balance {:.3} dispersion {:.3} moved {} (least {}); \
             swift balance {:.3} dispersion {:.3} moved {}",
            s.name,
            ours.balance,
            ours.dispersion,
            ours.moved,
            ours.least,
            swift.balance,
            swift.dispersion,
            swift.moved
        );
        assert!(
            ours.balance <= swift.balance + 0.01,
            "{} step {i}: balance {} worse than Swift's {}",
            s.name,
            ours.balance,
            swift.balance
        );
        assert!(
            ours.dispersion <= swift.dispersion + 0.01,
            "{} step {i}: dispersion {} worse than Swift's {}",
            s.name,
            ours.dispersion,
            swift.dispersion
        );
        if i > 0 {
            let bound = (ours.least as f64 * 1.05).ceil() as usize;
            assert!(
                ours.moved <= bound,
                "{} step {i}: moved {} replicas, the least is {} (bound {bound})",
                s.name,
                ours.moved,
                ours.least
            );
        }
    }
}

/// 1 region, 3 zones, 2 hosts each with one device: remove one, then re-weight one.
#[test]
fn one_region_three_zones_six_devices() {
    check(&Scenario {
        name: "r1z3d6",
        part_power: 10,
        replicas: 3,
        overload: 0.0,
        devices: (1..=3)
            .flat_map(|z| (1..=2).map(move |h| dev(1, z, h, "sdb", 100.0)))
            .collect(),
        changes: vec![Change::Remove(5), Change::Weight(0, 150.0)],
    });
}

/// 2 regions (two zones and one zone), a device added to the smaller region, then one
/// re-weighted.
#[test]
fn two_regions() {
    check(&Scenario {
        name: "r2",
        part_power: 10,
        replicas: 3,
        overload: 0.1,
        devices: vec![
            dev(1, 1, 1, "sdb", 100.0),
            dev(1, 1, 1, "sdc", 100.0),
            dev(1, 2, 1, "sdb", 100.0),
            dev(1, 2, 1, "sdc", 100.0),
            dev(2, 3, 1, "sdb", 100.0),
            dev(2, 3, 1, "sdc", 100.0),
        ],
        changes: vec![
            Change::Add(dev(2, 3, 2, "sdb", 100.0)),
            Change::Weight(2, 50.0),
        ],
    });
}

/// Uneven weights over 4 zones: one device drained to weight 0, then removed.
#[test]
fn uneven_weights() {
    check(&Scenario {
        name: "uneven",
        part_power: 11,
        replicas: 3,
        overload: 0.0,
        devices: vec![
            dev(1, 1, 1, "sdb", 100.0),
            dev(1, 1, 2, "sdb", 300.0),
            dev(1, 2, 1, "sdb", 200.0),
            dev(1, 2, 1, "sdc", 50.0),
            dev(1, 3, 1, "sdb", 400.0),
            dev(1, 4, 1, "sdb", 150.0),
            dev(1, 4, 2, "sdb", 150.0),
        ],
        changes: vec![
            Change::Weight(1, 0.0),
            Change::Remove(1),
            Change::Weight(4, 250.0),
        ],
    });
}

/// Two replicas on three zones with one host each and several devices per host.
#[test]
fn two_replicas_several_devices_per_host() {
    check(&Scenario {
        name: "rep2",
        part_power: 9,
        replicas: 2,
        overload: 0.0,
        devices: (1..=3)
            .flat_map(|z| ["sdb", "sdc", "sdd"].map(|n| dev(1, z, 1, n, 100.0)))
            .collect(),
        changes: vec![Change::Remove(4), Change::Add(dev(1, 2, 1, "sde", 200.0))],
    });
}
