//! Apply → Running with libvirt's test driver: servers created through the API, placed by the
//! scheduler and built by compute agents (images checked against the node's cache, domain
//! defined and started; a test-driver node makes no disks, since no guest runs), side by side
//! with the same domains defined and started straight through libvirt (the agent's own
//! driver) at the same concurrency.

use std::collections::HashMap;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures::TryStreamExt;
use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use kube::discovery::ApiResource;
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::{Value, json};
use stratus_agents::compute::driver::libvirt::Libvirt;
use stratus_agents::compute::driver::{DiskFormat, DiskSpec, DomainSpec, Owner};
use stratus_api_types::compute::{Hypervisor, Server};

use crate::{Stats, drive, ms, stack, stats};

/// When the watch first saw each server placed and running.
#[derive(Clone, Default)]
struct Seen {
    bound: Arc<Mutex<HashMap<String, Instant>>>,
    running: Arc<Mutex<HashMap<String, Instant>>>,
    changed: Arc<tokio::sync::Notify>,
}

impl Seen {
    fn observe(&self, o: &DynamicObject) {
        let name = o.metadata.name.clone().unwrap_or_default();
        if o.data.pointer("/status/hypervisor").is_some()
            && let Ok(mut b) = self.bound.lock()
        {
            b.entry(name.clone()).or_insert_with(Instant::now);
        }
        if o.data.pointer("/status/phase").and_then(Value::as_str) == Some("Running")
            && let Ok(mut r) = self.running.lock()
        {
            r.entry(name).or_insert_with(Instant::now);
            self.changed.notify_waiters();
        }
    }

    fn is_running(&self, name: &str) -> bool {
        self.running.lock().is_ok_and(|r| r.contains_key(name))
    }

    /// Until `name` is seen running.
    async fn running(&self, name: &str) {
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.is_running(name) {
                return;
            }
            notified.await;
        }
    }
}

/// One phase's figures: create → Running, create → placed, placed → Running.
struct PhaseStats {
    all: Stats,
    placed: Stats,
    built: Stats,
}

/// Creates `n` servers named `{prefix}-…`, `c` at a time; with `wait`, each creator waits
/// until its server runs before creating the next.
async fn phase(
    api: &Api<DynamicObject>,
    seen: &Seen,
    prefix: &str,
    n: usize,
    c: usize,
    wait: bool,
) -> Result<PhaseStats> {
    let created: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let start = Instant::now();
    let (api2, created2, seen2, prefix2) = (
        Arc::new(api.clone()),
        created.clone(),
        seen.clone(),
        prefix.to_string(),
    );
    drive(n, c, move |i| {
        let (api, created, seen) = (api2.clone(), created2.clone(), seen2.clone());
        let name = format!("{prefix2}-{i:05}");
        async move {
            let o: DynamicObject = serde_json::from_value(json!({
                "apiVersion": "compute.stratus.dev/v1", "kind": "Server",
                "metadata": {"name": name},
                "spec": {"flavor": "b1", "image": "tiny"},
            }))?;
            let t = Instant::now();
            api.create(&PostParams::default(), &o).await?;
            if let Ok(mut c) = created.lock() {
                c.insert(name.clone(), t);
            }
            if wait {
                tokio::time::timeout(Duration::from_secs(120), seen.running(&name))
                    .await
                    .with_context(|| format!("{name} never ran"))?;
            }
            Ok(())
        }
    })
    .await?;
    let created = created.lock().map(|c| c.clone()).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(600);
    while !created.keys().all(|n| seen.is_running(n)) {
        if Instant::now() > deadline {
            bail!("not every {prefix}- server reached Running");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let wall = start.elapsed();
    let since = |times: &Arc<Mutex<HashMap<String, Instant>>>, from: &HashMap<String, Instant>| {
        let times = times.lock().map(|t| t.clone()).unwrap_or_default();
        from.iter()
            .filter_map(|(n, c)| times.get(n).map(|t| t.saturating_duration_since(*c)))
            .collect::<Vec<_>>()
    };
    let placed_at: HashMap<String, Instant> = seen
        .bound
        .lock()
        .map(|b| {
            b.iter()
                .filter(|(n, _)| created.contains_key(*n))
                .map(|(n, t)| (n.clone(), *t))
                .collect()
        })
        .unwrap_or_default();
    Ok(PhaseStats {
        all: stats(since(&seen.running, &created), wall),
        placed: stats(since(&seen.bound, &created), wall),
        built: stats(since(&seen.running, &placed_at), wall),
    })
}

fn servers_api(client: &kube::Client) -> Api<DynamicObject> {
    Api::namespaced_with(client.clone(), "bench", &ApiResource::erase::<Server>(&()))
}

/// The reference: `n` domains defined and started through libvirt directly, `c` at a time.
async fn reference(dir: &std::path::Path, n: usize, c: usize) -> Result<(f64, Vec<Duration>)> {
    let hv: Arc<dyn stratus_agents::compute::driver::DomainDriver> =
        Arc::new(Libvirt::connect("test:///default")?);
    let dir = dir.to_path_buf();
    let (lat, wall) = drive(n, c, move |i| {
        let (hv, dir) = (hv.clone(), dir.clone());
        async move {
            tokio::task::spawn_blocking(move || {
                let uid = format!("00000000-0000-4000-8000-{i:012}");
                let spec = DomainSpec {
                    name: format!("stratus-{uid}"),
                    uuid: uid.clone(),
                    vcpus: 1,
                    memory_mib: 64,
                    kernel: None,
                    disks: vec![DiskSpec {
                        path: dir.join("disk.qcow2"),
                        format: DiskFormat::Qcow2,
                        readonly: false,
                        backing: None,
                    }],
                    console_log: dir.join(format!("{i}.log")),
                    interfaces: Vec::new(),
                    owner: Owner {
                        namespace: "ref".into(),
                        name: format!("ref-{i}"),
                        uid,
                    },
                };
                hv.define(&spec)?;
                hv.start(&spec.name)?;
                anyhow::Ok(())
            })
            .await??;
            Ok(())
        }
    })
    .await?;
    Ok((n as f64 / wall.as_secs_f64(), lat))
}

/// `stratus-bench boot`.
pub async fn bench(servers: usize, concurrency: usize, nodes: usize) -> Result<()> {
    let s = stack().await?;
    let files = tempfile::tempdir()?;
    let status = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(files.path().join("disk.qcow2"))
        .arg("1M")
        .status()?;
    anyhow::ensure!(status.success(), "qemu-img create");
    let port = stratus_e2e::free_port();
    let mut http = Command::new("/usr/bin/python3")
        .args([
            "-m",
            "http.server",
            "--bind",
            "127.0.0.1",
            &port.to_string(),
        ])
        .arg("--directory")
        .arg(files.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .context("start the image file server")?;
    let post = |path: &str, body: Value| {
        let (client, path) = (s.client.clone(), path.to_string());
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
    post("/apis/compute.stratus.dev/v1/flavors", json!({"apiVersion": "compute.stratus.dev/v1", "kind": "Flavor", "metadata": {"name": "b1"}, "spec": {"vcpus": 1, "ramMiB": 64, "diskGiB": 1}})).await?;
    post("/apis/image.stratus.dev/v1/namespaces/bench/images", json!({"apiVersion": "image.stratus.dev/v1", "kind": "Image", "metadata": {"name": "tiny"}, "spec": {"diskFormat": "qcow2", "source": {"url": format!("http://127.0.0.1:{port}/disk.qcow2")}}})).await?;

    // The reference first, on its own: the same driver, the same domain shape.
    let (ref_rate, ref_lat) = reference(files.path(), servers, concurrency).await?;

    // Stratus: the scheduler and `nodes` compute agents in this process, each on a test
    // driver of its own (a `test:///FILE` URI is private to its connection).
    let state = tempfile::tempdir()?;
    let scheduler = tokio::spawn(stratus_controllers::scheduler::run(
        s.client.clone(),
        stratus_controllers::scheduler::Weigher::Spread,
    ));
    let mut agents = Vec::new();
    for n in 0..nodes {
        let node = format!("bench-node-{n:02}");
        let dir = state.path().join(&node);
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("node.xml"), "<node/>")?;
        let uri = format!("test://{}", dir.join("node.xml").display());
        let driver: Arc<dyn stratus_agents::compute::driver::DomainDriver> =
            Arc::new(Libvirt::connect(&uri)?);
        agents.push(tokio::spawn(stratus_agents::compute::run(
            s.client.clone(),
            driver,
            stratus_agents::compute::Config {
                node,
                state_dir: dir,
                zone: "nova".into(),
                heartbeat: Duration::from_secs(10),
                resync: Duration::from_secs(10),
                // The image file server of this run, on loopback.
                image_policy: stratus_image_cache::Policy {
                    allow_hosts: vec![format!("127.0.0.1:{port}").parse()?],
                    ..Default::default()
                },
                export_ports: Default::default(),
                nbd_insecure: false,
            },
        )));
    }
    let hvs: Api<DynamicObject> =
        Api::all_with(s.client.clone(), &ApiResource::erase::<Hypervisor>(&()));
    for n in 0..nodes {
        let node = format!("bench-node-{n:02}");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let hv = hvs.get_opt(&node).await?;
            if hv.is_some_and(|h| h.data.pointer("/status/capacity").is_some()) {
                break;
            }
            if Instant::now() > deadline {
                bail!("agent {node} did not register its hypervisor");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // The operator's knob: the test driver's host is small, the run is large.
        hvs.patch(
            &node,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"cpuAllocationRatio": 1000.0, "ramAllocationRatio": 1000.0, "diskAllocationRatio": 1000.0}})),
        )
        .await?;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    let api = servers_api(&s.client);
    let seen = Seen::default();
    let watch = {
        let seen = seen.clone();
        let stream = watcher(api.clone(), watcher::Config::default()).applied_objects();
        tokio::spawn(async move {
            let mut stream = Box::pin(stream);
            while let Ok(Some(o)) = stream.try_next().await {
                seen.observe(&o);
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Warm-up, not measured (as the reference reads a local disk): each node downloads the
    // image into its cache once, on its first servers.
    phase(&api, &seen, "w", nodes * 3, concurrency, false).await?;
    // As a user runs `kubectl apply` then `kubectl wait --for=jsonpath=.status.phase=Running`:
    // `concurrency` of them at a time, each applying its next server once its last one runs.
    let closed = phase(&api, &seen, "c", servers, concurrency, true).await?;
    // A burst: every server created as fast as `concurrency` creators go, then all waited for.
    let burst = phase(&api, &seen, "b", servers, concurrency, false).await?;
    watch.abort();
    for a in agents {
        a.abort();
    }
    scheduler.abort();
    let _ = http.kill();
    let rf = stats(ref_lat, Duration::from_secs(1));
    println!(
        "| {servers} servers at c={concurrency}, {nodes} nodes | per second | p50 (ms) | p99 (ms) |"
    );
    println!("|---|---|---|---|");
    println!(
        "| reference: define + start through libvirt (test driver) | {ref_rate:.0} | {} | {} |",
        ms(rf.p50),
        ms(rf.p99)
    );
    for (what, st) in [
        (
            format!(
                "Stratus, each of {concurrency} clients applies a server and waits until it runs, then the next: create → scheduler → agent → Running seen by a watch"
            ),
            &closed,
        ),
        (
            format!(
                "Stratus, burst: all {servers} created at once ({concurrency} creates in flight), then waited for"
            ),
            &burst,
        ),
    ] {
        println!(
            "| {what} | {:.0} | {} | {} |",
            st.all.per_sec,
            ms(st.all.p50),
            ms(st.all.p99)
        );
    }
    for (what, st) in [("closed loop", &closed), ("burst", &burst)] {
        eprintln!(
            "{what}: create → placed p50 {} p99 {}; placed → Running p50 {} p99 {}",
            ms(st.placed.p50),
            ms(st.placed.p99),
            ms(st.built.p50),
            ms(st.built.p99)
        );
    }
    Ok(())
}
