//! `stratus up`'s resident memory (API server and controllers in one process) with many
//! objects present: Flavors, Networks and Servers with user data, written to its etcd
//! directly in bulk. Measured once they are written, after a restart (idle), and after a
//! selected LIST of each type has built its watch cache; with what one cached copy of each
//! kind costs in each form the caches hold it (measured in this process).

use std::io::Write as _;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use futures::{StreamExt, TryStreamExt};
use serde_json::Value;
use stratus_apiserver::storage::store::{Guard, Store};
use stratus_e2e::Cloud;

/// Puts per etcd transaction (etcd allows 128 operations in one).
const BATCH: usize = 100;
/// Bytes of each Server's user data (base64 of a cloud-init script of about 3 KiB).
const USER_DATA: usize = 4096;

/// A field of /proc/PID/status, in MiB.
fn status_mib(pid: &str, field: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|rest| {
            rest.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<f64>()
                .ok()
        })
        .unwrap_or(0.0)
        / 1024.0
}

/// Waits until `pid`'s RSS has moved less than 1 MiB over 5 s (at most `limit`): its value.
async fn settled(pid: &str, limit: Duration) -> f64 {
    let started = Instant::now();
    let mut last = status_mib(pid, "VmRSS:");
    loop {
        tokio::time::sleep(Duration::from_secs(5)).await;
        let now = status_mib(pid, "VmRSS:");
        if (now - last).abs() < 1.0 || started.elapsed() > limit {
            return now;
        }
        last = now;
    }
}

fn manifests(user_data: &str) -> String {
    format!(
        "apiVersion: identity.stratus.dev/v1
kind: Project
metadata:
  name: bench
spec: {{}}
---
apiVersion: compute.stratus.dev/v1
kind: Flavor
metadata:
  name: m-000000
  labels:
    share: rest
spec:
  vcpus: 2
  ramMiB: 2048
  diskGiB: 20
---
apiVersion: network.stratus.dev/v1
kind: Network
metadata:
  name: m-000000
  namespace: bench
  labels:
    share: rest
spec:
  mtu: 1450
  segmentation: vxlan
---
apiVersion: compute.stratus.dev/v1
kind: Server
metadata:
  name: m-000000
  namespace: bench
  labels:
    share: rest
spec:
  flavor: m-000000
  image: cirros
  userData: {user_data}
"
    )
}

/// The keys of the three kinds, by name (the API server's layout under `/stratus`).
fn keys() -> [(&'static str, String); 3] {
    [
        (
            "Flavor",
            "/stratus/compute.stratus.dev/flavors/".to_string(),
        ),
        (
            "Network",
            "/stratus/network.stratus.dev/networks/bench/".to_string(),
        ),
        (
            "Server",
            "/stratus/compute.stratus.dev/servers/bench/".to_string(),
        ),
    ]
}

fn name(i: usize) -> String {
    format!("m-{i:06}")
}

/// Writes objects `m-000001`… up to `n` of the kind under `prefix`: the stored template with
/// its name, uid and label changed (one in a hundred `share=one`).
async fn fill(store: &Store, prefix: &str, n: usize) -> Result<()> {
    let template = store
        .get(&format!("{prefix}{}", name(0)))
        .await?
        .with_context(|| format!("the template under {prefix} is stored"))?
        .value;
    let batches: Vec<Vec<usize>> = (1..n)
        .collect::<Vec<_>>()
        .chunks(BATCH)
        .map(<[usize]>::to_vec)
        .collect();
    futures::stream::iter(batches)
        .map(|batch| {
            let template = &template;
            async move {
                let objects: Vec<(String, Value)> = batch
                    .iter()
                    .map(|&i| {
                        let mut v = template.clone();
                        v["metadata"]["name"] = name(i).into();
                        v["metadata"]["uid"] = format!("00000000-0000-4000-8000-{i:012}").into();
                        v["metadata"]["labels"]["share"] =
                            if i % 100 == 1 { "one" } else { "rest" }.into();
                        (format!("{prefix}{}", name(i)), v)
                    })
                    .collect();
                let guards: Vec<Guard<'_>> =
                    objects.iter().map(|(k, _)| Guard::Absent(k)).collect();
                let puts: Vec<(&str, &Value)> =
                    objects.iter().map(|(k, v)| (k.as_str(), v)).collect();
                let written = store.write_many(&guards, &puts, &[]).await?;
                ensure!(written.is_some(), "an object of the batch already exists");
                Ok(())
            }
        })
        .buffer_unordered(8)
        .try_collect::<Vec<()>>()
        .await?;
    Ok(())
}

/// RSS growth of this process, in MiB, while it holds what `make` returns (meaningful with
/// `MIMALLOC_PURGE_DELAY=0`, so that memory freed before is not counted as reused).
fn held<T>(make: impl FnOnce() -> Result<T>) -> Result<(T, f64)> {
    let before = status_mib("self", "VmRSS:");
    let out = make()?;
    Ok((out, status_mib("self", "VmRSS:") - before))
}

/// Every value made into a `T` by `make` (decoded and slimmed), held as a reflector store
/// holds it: the RSS it takes.
fn decoded<T>(raw: &[Vec<u8>], make: impl Fn(&[u8]) -> Result<T>) -> Result<f64> {
    let (held_objects, mib) = held(|| {
        raw.iter()
            .map(|r| make(r).map(std::sync::Arc::new))
            .collect::<Result<Vec<_>>>()
    })?;
    ensure!(held_objects.len() == raw.len());
    Ok(mib)
}

/// What one cached copy of each kind's objects costs, by how it is held: the stored bytes
/// (what the watch cache keeps), and decoded: whole, slimmed as the controllers' shared
/// Server and Flavor caches slim them, metadata only (a `DynamicObject`, as the garbage
/// collector kept it before), and as the quota controller's and the garbage collector's
/// projections keep them.
async fn per_cache(store: &Store) -> Result<()> {
    use kube::api::DynamicObject;
    use stratus_api_types::compute::{Flavor, Server};
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        eprintln!("MIMALLOC_PURGE_DELAY is not set: the table below counts reused memory as none");
    }
    println!(
        "\n| one cache of | objects | stored JSON MiB | as stored bytes MiB | decoded, whole MiB | decoded, without managed fields (and user data) MiB | metadata only MiB | quota's counted form MiB | garbage collector's form MiB |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for (kind, prefix) in keys() {
        let page = store.list(&prefix, None, 0, 0).await?;
        let raw: Vec<Vec<u8>> = page
            .items
            .iter()
            .map(|(_, s)| serde_json::to_vec(&s.value))
            .collect::<Result<_, _>>()?;
        drop(page);
        let json_mib = raw.iter().map(Vec::len).sum::<usize>() as f64 / (1 << 20) as f64;
        let (bytes, as_bytes) = held(|| {
            Ok(raw
                .iter()
                .map(|r| bytes::Bytes::copy_from_slice(r))
                .collect::<Vec<_>>())
        })?;
        drop(bytes);
        let (whole, slimmed) = match kind {
            "Flavor" => (
                decoded(&raw, |r| Ok(serde_json::from_slice::<Flavor>(r)?))?,
                decoded(&raw, |r| {
                    let mut f: Flavor = serde_json::from_slice(r)?;
                    f.metadata.managed_fields = None;
                    Ok(f)
                })?,
            ),
            "Server" => (
                decoded(&raw, |r| Ok(serde_json::from_slice::<Server>(r)?))?,
                decoded(&raw, |r| {
                    let mut s: Server = serde_json::from_slice(r)?;
                    s.spec.user_data = None;
                    s.metadata.managed_fields = None;
                    Ok(s)
                })?,
            ),
            _ => (
                decoded(&raw, |r| Ok(serde_json::from_slice::<DynamicObject>(r)?))?,
                decoded(&raw, |r| {
                    let mut o: DynamicObject = serde_json::from_slice(r)?;
                    o.metadata.managed_fields = None;
                    Ok(o)
                })?,
            ),
        };
        let metadata = decoded(&raw, |r| {
            let mut o: DynamicObject = serde_json::from_slice(r)?;
            o.data = Value::Null;
            o.metadata.managed_fields = None;
            o.metadata.annotations = None;
            o.metadata.labels = None;
            Ok(o)
        })?;
        let counted = if kind == "Flavor" {
            "(not counted)".to_string()
        } else {
            format!(
                "{:.1}",
                decoded(&raw, |r| Ok(stratus_controllers::quota::cached(r)?))?
            )
        };
        let collected = decoded(&raw, |r| Ok(stratus_controllers::gc::cached(r)?))?;
        println!(
            "| {kind} | {} | {json_mib:.1} | {as_bytes:.1} | {whole:.1} | {slimmed:.1} | {metadata:.1} | {counted} | {collected:.1} |",
            raw.len()
        );
    }
    Ok(())
}

/// `stratus up` with `objects` objects (a third each of Flavors, Networks and Servers).
pub async fn bench(objects: usize) -> Result<()> {
    let mut cloud = Cloud::up()?;
    let pid = cloud.proc.pid().to_string();
    let empty = settled(&pid, Duration::from_secs(30)).await;
    let user_data = "QUFB".repeat(USER_DATA / 4);
    let mut kubectl = cloud.kubectl_cmd();
    let mut child = kubectl
        .args(["create", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()?;
    child
        .stdin
        .take()
        .context("kubectl's stdin")?
        .write_all(manifests(&user_data).as_bytes())?;
    ensure!(child.wait()?.success(), "kubectl create the templates");
    let store = Store::connect_with(&[cloud.etcd_endpoint()], Some(&cloud.etcd_tls())).await?;
    let per_kind = objects / 3;
    let started = Instant::now();
    for (_, prefix) in keys() {
        fill(&store, &prefix, per_kind).await?;
    }
    eprintln!(
        "{} objects written to etcd in {:?}",
        per_kind * 3,
        started.elapsed()
    );
    println!(
        "| `stratus up` with {} objects | RSS MiB | peak MiB |",
        per_kind * 3
    );
    println!("|---|---|---|");
    println!("| empty, idle | {empty:.1} | |");
    let written = settled(&pid, Duration::from_secs(600)).await;
    let written_peak = status_mib(&pid, "VmHWM:");
    println!(
        "| after the objects were written to etcd (the controllers saw them arrive) | {written:.1} | {written_peak:.1} |"
    );
    cloud.restart()?;
    let pid = cloud.proc.pid().to_string();
    let idle = settled(&pid, Duration::from_secs(600)).await;
    let idle_peak = status_mib(&pid, "VmHWM:");
    println!("| restarted, idle | {idle:.1} | {idle_peak:.1} |");
    // A selected LIST of each type builds its watch cache.
    let want = (1..per_kind).filter(|i| i % 100 == 1).count();
    for what in ["flavors", "networks", "servers"] {
        let out = cloud
            .kubectl_cmd()
            .args(["get", what, "-A", "-l", "share=one", "-o", "name"])
            .output()?;
        ensure!(out.status.success(), "kubectl get {what} -l share=one");
        let listed = String::from_utf8_lossy(&out.stdout).lines().count();
        ensure!(listed == want, "{what}: {listed} listed, not {want}");
    }
    let cached = settled(&pid, Duration::from_secs(120)).await;
    println!("| + a selected LIST of each kind (watch caches built) | {cached:.1} | |");
    per_cache(&store).await?;
    Ok(())
}
