//! The scheduler at scale: Servers placed onto registered Hypervisors (no agents, no guests),
//! side by side with the bare etcd transactions a placement needs (the server's status and
//! its claim, compared on revisions) on the same etcd.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use etcd_client::{Compare, CompareOp, Txn, TxnOp};
use futures::TryStreamExt;
use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use kube::discovery::ApiResource;
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::{Value, json};

use crate::{drive, ms, stack, stats};

/// Registers `n` Ready hypervisors that each hold exactly `per` servers of the benchmark
/// flavor (1 vCPU, 512 MiB, 1 GiB; ratios 1.0, nothing reserved), so the whole run fits only
/// if nothing is overcommitted.
async fn hypervisors(client: &kube::Client, n: usize, per: u64) -> Result<()> {
    let api: Api<DynamicObject> = Api::all_with(
        client.clone(),
        &ApiResource::erase::<stratus_api_types::compute::Hypervisor>(&()),
    );
    let api = Arc::new(api);
    let now = jiff::Timestamp::now().to_string();
    drive(n, 32, move |i| {
        let (api, now) = (api.clone(), now.clone());
        async move {
            let name = format!("hv-{i:04}");
            let hv: DynamicObject = serde_json::from_value(json!({
                "apiVersion": "compute.stratus.dev/v1", "kind": "Hypervisor",
                "metadata": {"name": name},
                "spec": {"cpuAllocationRatio": 1.0, "ramAllocationRatio": 1.0, "diskAllocationRatio": 1.0,
                         "reservedHostMemoryMiB": 0, "hypervisorType": "test"},
            }))?;
            api.create(&PostParams::default(), &hv).await?;
            api.patch_status(
                &name,
                &PatchParams::default(),
                &Patch::Merge(json!({"status": {
                    "phase": "Ready",
                    "capacity": {"vcpus": per, "ramMiB": per * 512, "diskGiB": per},
                    "conditions": [{"type": "Ready", "status": "True", "reason": "Bench",
                                    "message": "", "lastTransitionTime": now}],
                }})),
            )
            .await?;
            Ok(())
        }
    })
    .await?;
    Ok(())
}

/// Stratus: creates `servers` Servers at concurrency 64 with the scheduler running; returns
/// (binds per second over the whole run, each server's create-to-bound latency, the count per
/// hypervisor).
async fn stratus_run(
    client: &kube::Client,
    servers: usize,
    prefix: &str,
    scheduler_first: bool,
) -> Result<(f64, Vec<Duration>, HashMap<String, u64>)> {
    let api: Api<DynamicObject> = Api::namespaced_with(
        client.clone(),
        "bench",
        &ApiResource::erase::<stratus_api_types::compute::Server>(&()),
    );
    let created: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let bound: Arc<Mutex<HashMap<String, (Instant, String)>>> = Arc::default();
    // Placements seen as they happen, as a dashboard would see them.
    let watch = {
        let bound = bound.clone();
        let mine = format!("{prefix}-");
        let stream = watcher(api.clone(), watcher::Config::default()).applied_objects();
        tokio::spawn(async move {
            let mut stream = Box::pin(stream);
            while let Ok(Some(s)) = stream.try_next().await {
                if let Some(hv) = s.data.pointer("/status/hypervisor").and_then(Value::as_str) {
                    let name = s.metadata.name.clone().unwrap_or_default();
                    if !name.starts_with(&mine) {
                        continue;
                    }
                    if let Ok(mut b) = bound.lock() {
                        b.entry(name).or_insert((Instant::now(), hv.to_string()));
                    }
                }
            }
        })
    };
    let spawn_scheduler = || {
        tokio::spawn(stratus_controllers::scheduler::run(
            client.clone(),
            stratus_controllers::scheduler::Weigher::Spread,
        ))
    };
    let mut scheduler = scheduler_first.then(spawn_scheduler);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut start = Instant::now();
    let (api2, created2) = (Arc::new(api.clone()), created.clone());
    let prefix = prefix.to_string();
    drive(servers, 64, move |i| {
        let (api, created, prefix) = (api2.clone(), created2.clone(), prefix.clone());
        async move {
            let name = format!("{prefix}-{i:05}");
            let s: DynamicObject = serde_json::from_value(json!({
                "apiVersion": "compute.stratus.dev/v1", "kind": "Server",
                "metadata": {"name": name},
                "spec": {"flavor": "b1", "image": "none"},
            }))?;
            let t = Instant::now();
            api.create(&PostParams::default(), &s).await?;
            if let Ok(mut c) = created.lock() {
                c.insert(name, t);
            }
            Ok(())
        }
    })
    .await?;
    if scheduler.is_none() {
        // Everything is created: from here on, only placement.
        start = Instant::now();
        scheduler = Some(spawn_scheduler());
    }
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let n = bound.lock().map(|b| b.len()).unwrap_or(0);
        if n >= servers {
            break;
        }
        if Instant::now() > deadline {
            bail!("only {n} of {servers} servers were placed");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    watch.abort();
    if let Some(s) = scheduler {
        s.abort();
    }
    let bound = bound.lock().map(|b| b.clone()).unwrap_or_default();
    let created = created.lock().map(|c| c.clone()).unwrap_or_default();
    let last = bound.values().map(|(t, _)| *t).max().unwrap_or(start);
    let rate = servers as f64 / last.duration_since(start).as_secs_f64();
    let lat = bound
        .iter()
        .filter_map(|(n, (t, _))| created.get(n).map(|c| t.saturating_duration_since(*c)))
        .collect();
    let mut per_hv: HashMap<String, u64> = HashMap::new();
    for (_, hv) in bound.values() {
        *per_hv.entry(hv.clone()).or_default() += 1;
    }
    Ok((rate, lat, per_hv))
}

/// The reference: the bare transactions of a placement on the same etcd (put the server,
/// compare-and-put its status with the claim beside it), at the same concurrency.
async fn raw_run(etcd: &str, servers: usize) -> Result<(f64, Vec<Duration>)> {
    let client = etcd_client::Client::connect([etcd], None).await?;
    let (lat, wall) = drive(servers, 64, move |i| {
        let mut kv = client.kv_client();
        async move {
            let key = format!("/raw/servers/s-{i:05}");
            let claim = format!("/raw/claims/hv-{:04}/s-{i:05}", i % 1000);
            let body = json!({"spec": {"flavor": "b1"}}).to_string();
            let put = kv
                .txn(
                    Txn::new()
                        .when([Compare::create_revision(key.as_str(), CompareOp::Equal, 0)])
                        .and_then([TxnOp::put(key.as_str(), body.as_str(), None)]),
                )
                .await?;
            let rev = put.header().map(|h| h.revision()).unwrap_or(0);
            let bound =
                json!({"spec": {"flavor": "b1"}, "status": {"hypervisor": "hv"}}).to_string();
            kv.txn(
                Txn::new()
                    .when([Compare::mod_revision(key.as_str(), CompareOp::Equal, rev)])
                    .and_then([
                        TxnOp::put(key.as_str(), bound.as_str(), None),
                        TxnOp::put(claim.as_str(), "{\"vcpus\":1}", None),
                    ]),
            )
            .await?;
            Ok(())
        }
    })
    .await?;
    Ok((servers as f64 / wall.as_secs_f64(), lat))
}

/// `stratus-bench sched`.
pub async fn bench(servers: usize, hvs: usize) -> Result<()> {
    let s = stack().await?;
    let per = (servers as u64).div_ceil(hvs as u64);
    let client = s.client.clone();
    let post = |path: &str, body: Value| {
        let (client, path) = (client.clone(), path.to_string());
        async move {
            let req = crate::req(
                "POST",
                &path,
                "application/json",
                body.to_string().into_bytes(),
            )?;
            client.request::<Value>(req).await?;
            anyhow::Ok(())
        }
    };
    post("/apis/identity.stratus.dev/v1/projects", json!({"apiVersion": "identity.stratus.dev/v1", "kind": "Project", "metadata": {"name": "bench"}, "spec": {}})).await?;
    post("/apis/compute.stratus.dev/v1/flavors", json!({"apiVersion": "compute.stratus.dev/v1", "kind": "Flavor", "metadata": {"name": "b1"}, "spec": {"vcpus": 1, "ramMiB": 512, "diskGiB": 1}})).await?;
    hypervisors(&s.client, hvs, per).await?;
    eprintln!("{hvs} hypervisors registered, {per} servers' room each");
    let (raw_rate, raw_lat) = raw_run(&s.etcd.endpoint, servers).await?;
    // Placement alone: every server created first, then the scheduler started (as
    // kube-scheduler's scheduler_perf measures), on half the hypervisors' room ...
    let half = servers / 2;
    let (rate, _, first) = stratus_run(&s.client, half, "pre", false).await?;
    // ... then creation and placement together, each server timed from its create to its
    // placement, filling the rest.
    let (rate_live, lat, second) = stratus_run(&s.client, servers - half, "live", true).await?;
    let mut per_hv = first;
    for (hv, n) in second {
        *per_hv.entry(hv).or_default() += n;
    }
    let over = per_hv.values().filter(|n| **n > per).count();
    let fullest = per_hv.values().max().copied().unwrap_or(0);
    let raw = stats(raw_lat, Duration::from_secs(1));
    let st = stats(lat, Duration::from_secs(1));
    println!("| | binds/s | p50 (ms) | p99 (ms) |");
    println!("|---|---|---|---|");
    println!(
        "| raw etcd: a placement's transactions (create, then status + claim), {servers} at c=64 | {raw_rate:.0} | {} | {} |",
        ms(raw.p50),
        ms(raw.p99)
    );
    println!("| Stratus: scheduler alone, {half} servers created beforehand | {rate:.0} | | |");
    println!(
        "| Stratus: {} servers created at c=64 while the scheduler runs; create → placement seen by a watch | {rate_live:.0} | {} | {} |",
        servers - half,
        ms(st.p50),
        ms(st.p99)
    );
    println!();
    println!(
        "{servers} servers onto {hvs} hypervisors of {per} servers' room each: {} hypervisors used, the fullest holds {fullest}, overcommitted hypervisors: {over}. Scheduler alone / raw: {:.2}x.",
        per_hv.len(),
        rate / raw_rate
    );
    if over > 0 {
        bail!("{over} hypervisors were overcommitted");
    }
    Ok(())
}
