//! Benchmarks of the Stratus API server against raw etcd, side by side in one run on one etcd.
//!
//! `stratus-bench api`   — creates/s and latency through the API vs raw etcd transactions.
//! `stratus-bench watch` — watch delivery latency to many watchers vs raw etcd watches.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use etcd_client::{Compare, CompareOp, EventType, Txn, TxnOp, WatchOptions};
use futures::TryStreamExt;
use serde_json::{Value, json};
use stratus_e2e::Etcd;

mod attach;
mod auth;
mod boot;
mod dashboard;
mod dashboard_stream;
mod guest_write;
mod list;
mod memory;
mod net;
mod object;
mod ovs;
mod sched;
mod storage;
mod tcg;

// The same allocator as the stratus binary.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(about = "Stratus benchmarks: the reference and Stratus, side by side in one run")]
struct Cli {
    #[command(subcommand)]
    what: What,
}

#[derive(Subcommand)]
enum What {
    /// Creates through the API vs raw etcd transactions.
    Api {
        /// Objects created per measurement.
        #[arg(long, default_value_t = 5000)]
        objects: usize,
        /// Concurrency levels.
        #[arg(long, value_delimiter = ',', default_value = "1,64")]
        concurrency: Vec<usize>,
        /// Rounds; each measures every path once, in rotated order.
        #[arg(long, default_value_t = 5)]
        rounds: usize,
        /// The paths to measure.
        #[arg(long, value_delimiter = ',', default_value = "raw,kube,h2,floor")]
        paths: Vec<CreatePath>,
        /// Gives etcd the first core and this process (load generator and API server) the
        /// second, as a deployment keeps etcd apart from its clients; by default all share
        /// both.
        #[arg(long)]
        etcd_own_core: bool,
        /// Runs etcd as `stratus up` does, over TLS with client certificates, for both the
        /// raw path and the API server.
        #[arg(long)]
        etcd_tls: bool,
    },
    /// Watch delivery latency to many watchers vs raw etcd watches.
    Watch {
        /// Concurrent watchers.
        #[arg(long, default_value_t = 100)]
        watchers: usize,
        /// Writes observed by every watcher.
        #[arg(long, default_value_t = 200)]
        events: usize,
    },
    /// The scheduler placing many servers onto many hypervisors (no agents) vs the bare etcd
    /// transactions of a placement.
    Sched {
        /// Servers to place.
        #[arg(long, default_value_t = 10000)]
        servers: usize,
        /// Hypervisors to place them on.
        #[arg(long, default_value_t = 1000)]
        hypervisors: usize,
    },
    /// The dashboard in headless Chromium vs kubectl, as the same project member: a
    /// project's servers listed and fully rendered vs `kubectl get servers`, a new server
    /// seen in the page vs by `kubectl get servers -w`, and a stream of status changes drawn
    /// by the page vs printed by `kubectl get servers -w`.
    Dashboard {
        /// Servers in the project.
        #[arg(long, default_value_t = 1000)]
        servers: usize,
        /// First renders measured (the median is reported).
        #[arg(long, default_value_t = 5)]
        rounds: usize,
        /// Servers created one at a time while the list is open.
        #[arg(long, default_value_t = 50)]
        changes: usize,
        /// Then, changes a second streamed to the listed servers' status while the list is
        /// open (0: none).
        #[arg(long, default_value_t = 100)]
        stream_rate: u32,
        /// For how many seconds.
        #[arg(long, default_value_t = 30)]
        stream_seconds: u64,
    },
    /// Volumes on `stratus up --storage`'s file pool (create → Available, delete → gone, a
    /// clone's data copy) vs the `qemu-img create`, `rm`, `qemu-img convert` and `dd` it wraps,
    /// on the same directory.
    Storage {
        /// Blank 1 GiB volumes made and deleted, one at a time.
        #[arg(long, default_value_t = 20)]
        volumes: usize,
        /// MiB of data in the volume that is cloned.
        #[arg(long, default_value_t = 512)]
        copy_mib: u64,
        /// Clones made (each alternating with the references).
        #[arg(long, default_value_t = 5)]
        rounds: usize,
    },
    /// A 1 GiB volume of the node's file pool hot-plugged into (and out of) a running TCG
    /// guest: Volume create → Available and Server `spec.volumes` → disk in the domain vs
    /// `qemu-img create` and `virsh attach-device`/`detach-device` of the same disk XML (needs
    /// root: it starts a libvirtd in namespaces of its own).
    StorageAttach {
        /// Volumes attached and detached (after one warm-up round) by each side.
        #[arg(long, default_value_t = 5)]
        rounds: usize,
        /// The volume on another node's pool, exported over NBD (a veth pair of its own).
        #[arg(long, conflicts_with = "lvm")]
        remote: bool,
        /// The node's pool an LVM volume group of the benchmark's own (on a loop device over a
        /// sparse file) instead of a directory; the reference `lvcreate`/`lvremove`.
        #[arg(long)]
        lvm: bool,
    },
    /// Sequential writes inside a running TCG guest to two volumes of file pools: the compute
    /// node's own (a local file) vs another node's over NBD with TLS (a veth pair of its own),
    /// alternating, in MiB/s (needs root: it starts a libvirtd in namespaces of its own).
    StorageWrite {
        /// MiB each write is (`dd bs=1M count=MIB` in the guest).
        #[arg(long, default_value_t = 256,
              value_parser = clap::value_parser!(u64).range(1..=guest_write::MAX_MIB))]
        mib: u64,
        /// Rounds counted (after one warm-up), each writing to both volumes.
        #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=1000))]
        rounds: u64,
        /// The NBD volume served in the clear (`--nbd-insecure` on both nodes), not over TLS.
        #[arg(long)]
        nbd_insecure: bool,
    },
    /// Apply → Running with libvirt's test driver (scheduler + compute agent) vs defining and
    /// starting the same domains through libvirt directly.
    Boot {
        /// Servers to create.
        #[arg(long, default_value_t = 1000)]
        servers: usize,
        /// Concurrent creates.
        #[arg(long, default_value_t = 50)]
        concurrency: usize,
        /// Compute agents (nodes), each on its own test driver.
        #[arg(long, default_value_t = 20)]
        nodes: usize,
    },
    /// A real TCG guest: apply → marker on its console vs `virsh create` of the same kind of
    /// domain (needs root: it starts a libvirtd in namespaces of its own).
    Tcg {
        /// Boots of each.
        #[arg(long, default_value_t = 5)]
        rounds: usize,
    },
    /// An unpaged LIST of many Flavors through the API vs raw etcd range reads of the same
    /// keys: time and this process's (the API server's) resident memory growth.
    List {
        /// Collection sizes, listed in turn (the Flavors of one size stay for the next).
        #[arg(long, value_delimiter = ',', default_value = "10000,50000,100000")]
        objects: Vec<usize>,
        /// LISTs of each kind per size (the median is reported).
        #[arg(long, default_value_t = 5)]
        rounds: usize,
    },
    /// A label-selected LIST matching 1% of many Flavors (answered by the watch cache) vs
    /// the unselected first page and raw etcd reads.
    ListSelected {
        /// Flavors.
        #[arg(long, default_value_t = 50000)]
        objects: usize,
        /// LISTs of each kind (the median is reported).
        #[arg(long, default_value_t = 20)]
        rounds: usize,
    },
    /// `stratus up`'s resident memory with many objects present (a third each of Flavors,
    /// Networks and Servers with user data), idle and with watch caches built (set
    /// `STRATUS_BIN` to the `stratus` binary).
    Memory {
        /// Objects.
        #[arg(long, default_value_t = 50000)]
        objects: usize,
    },
    /// What authentication and authorisation cost per request.
    Auth {
        /// GETs per measurement.
        #[arg(long, default_value_t = 3000)]
        requests: usize,
        /// Concurrency levels.
        #[arg(long, value_delimiter = ',', default_value = "1,16")]
        concurrency: Vec<usize>,
        /// Other users, each with a role assignment in the benchmark's project, as a cloud
        /// with many users has.
        #[arg(long, default_value_t = 1000)]
        other_users: usize,
        /// Instead of the table above: an authorised user's GET latency alone and while this
        /// many clients post wrong passwords in a loop, for each kind of burst.
        #[arg(long)]
        login_burst: Option<usize>,
        /// With `--login-burst`: milliseconds each client pauses after each answer (0: a
        /// closed loop, as fast as answers come).
        #[arg(long, default_value_t = 0)]
        login_burst_pause_ms: u64,
    },
    /// A security-group change with many rules on the node: API write → the rule live in the
    /// node's nftables (through the network agent) vs the same change with `nft` (needs
    /// root).
    NetSg {
        /// Ports on the node, each in its own security group.
        #[arg(long, default_value_t = 100)]
        ports: usize,
        /// Rules per group (ports × rules security-group rules in nftables).
        #[arg(long, default_value_t = 100)]
        rules: usize,
        /// Changes of each kind; each is a rule added and removed again (two measurements).
        #[arg(long, default_value_t = 100)]
        changes: usize,
        /// Blocks of changes, alternating which path goes first.
        #[arg(long, default_value_t = 2)]
        rounds: usize,
    },
    /// The network agent converging a fresh node of many ports vs `nft -f` + `ip -batch` and
    /// dnsmasq of the same state (needs root).
    NetConverge {
        /// Ports on the node.
        #[arg(long, default_value_t = 1000)]
        ports: usize,
        /// Convergences of each, alternating which goes first.
        #[arg(long, default_value_t = 3)]
        rounds: usize,
    },
    /// TCP throughput between guests on two nodes across the agents' overlay vs a hand-built
    /// bridge + VXLAN pair (needs root).
    NetTcp {
        /// Seconds per run.
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
        /// Runs of each, alternating which goes first.
        #[arg(long, default_value_t = 6)]
        rounds: usize,
        /// Networks on each of the agents' nodes, each with a port on both (the stream runs
        /// on the first); the reference keeps its one bridge.
        #[arg(long, default_value_t = 1)]
        networks: usize,
    },
    /// The network agent's Open vSwitch driver wiring a fresh node of many ports, and putting
    /// back every flow deleted, vs `ovs-vsctl`, `ovs-ofctl --bundle add-flows` and `nft -f` of
    /// the same state (needs root; starts a switch per side in namespaces of its own).
    NetOvs {
        /// Ports on the node.
        #[arg(long, default_value_t = 1000)]
        ports: usize,
        /// Runs of each, alternating which goes first.
        #[arg(long, default_value_t = 3)]
        rounds: usize,
    },
    /// A security-group change on a node of many rules: the agent's converge of one rule
    /// added and removed, on the Open vSwitch datapath vs the kernel's, in one run (needs
    /// root; starts a switch in a namespace of its own).
    NetOvsSg {
        /// Ports on the node, each in its own security group.
        #[arg(long, default_value_t = 100)]
        ports: usize,
        /// Rules per group.
        #[arg(long, default_value_t = 100)]
        rules: usize,
        /// Rules added (and removed again) on each datapath.
        #[arg(long, default_value_t = 10)]
        changes: usize,
    },
    /// TCP throughput between guests on two nodes across the overlay: the Open vSwitch
    /// datapath vs the kernel's, each wired by the agent's `converge()` and by hand, in one
    /// run (needs root; starts a switch per OVS node in namespaces of its own).
    NetOvsTcp {
        /// Seconds per run.
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
        /// Runs of each, rotating which goes first.
        #[arg(long, default_value_t = 4)]
        rounds: usize,
    },
    /// PUT and GET through a Swift proxy: Swift configured by hand (swift-ring-builder, the
    /// same servers and proxy pipeline) vs `stratus up --object-store` (the object agent's
    /// servers), both proxies validating Stratus tokens, measured interleaved over several
    /// rounds (4 KiB objects at concurrency 16); and each store's time to serving (needs root
    /// and Debian's swift packages; set `STRATUS_BIN` to the `stratus` binary).
    Object {
        /// 4 KiB objects per round and side.
        #[arg(long, default_value_t = 1000)]
        small: usize,
        /// Large objects per round and side.
        #[arg(long, default_value_t = 30)]
        large: usize,
        /// MiB per large object.
        #[arg(long, default_value_t = 8)]
        large_mib: usize,
        /// Concurrency of the large requests.
        #[arg(long, default_value_t = 4)]
        large_concurrency: usize,
        /// Rounds, alternating which side goes first.
        #[arg(long, default_value_t = 6)]
        rounds: usize,
    },
    /// Receives one TCP stream (`net-tcp`'s receiver, run inside a guest namespace).
    #[command(hide = true)]
    TcpSink {
        #[arg(long)]
        listen: std::net::SocketAddr,
    },
    /// Sends one TCP stream (`net-tcp`'s sender, run inside a guest namespace).
    #[command(hide = true)]
    TcpSource {
        #[arg(long)]
        to: std::net::SocketAddr,
        #[arg(long)]
        seconds: f64,
    },
}

/// Latency summary.
struct Stats {
    per_sec: f64,
    p50: Duration,
    p99: Duration,
}

fn stats(mut lat: Vec<Duration>, wall: Duration) -> Stats {
    lat.sort();
    let pick = |q: f64| {
        lat.get(((lat.len() as f64 * q) as usize).min(lat.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    };
    Stats {
        per_sec: lat.len() as f64 / wall.as_secs_f64(),
        p50: pick(0.50),
        p99: pick(0.99),
    }
}

/// CPU time (user + system) a process has used so far.
fn cpu(pid: &str) -> Duration {
    cpu_fields(pid, 11..=12)
}

/// The sum of `fields` of /proc/PID/stat, counted from `state` (after "(comm)"), in clock
/// ticks (100 per second): 11 and 12 are utime and stime, 13 and 14 its reaped children's.
fn cpu_fields(pid: &str, fields: std::ops::RangeInclusive<usize>) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    let ticks: u64 = fields
        .filter_map(|i| rest.get(i).and_then(|f| f.parse::<u64>().ok()))
        .sum();
    Duration::from_millis(ticks * 10)
}

/// CPU used by etcd and by this process (load generator and, for the API path, the server).
struct Cpu {
    etcd: String,
    at: (Duration, Duration),
}

impl Cpu {
    fn start(etcd_pid: u32) -> Self {
        let etcd = etcd_pid.to_string();
        let at = (cpu(&etcd), cpu("self"));
        Self { etcd, at }
    }

    /// Microseconds of CPU per operation: (etcd, this process).
    fn per_op(&self, ops: usize) -> (f64, f64) {
        let per = |d: Duration| d.as_secs_f64() * 1e6 / ops.max(1) as f64;
        (
            per(cpu(&self.etcd).saturating_sub(self.at.0)),
            per(cpu("self").saturating_sub(self.at.1)),
        )
    }
}

fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1000.0)
}

/// A Flavor body of realistic size, the same bytes for both paths.
fn flavor(name: &str) -> Value {
    json!({
        "apiVersion": "compute.stratus.dev/v1", "kind": "Flavor",
        "metadata": {"name": name, "labels": {"bench": "true"}},
        "spec": {"vcpus": 2, "ramMiB": 2048, "diskGiB": 20, "description": "benchmark flavor", "extraSpecs": {"hw:cpu_policy": "shared"}}
    })
}

/// Runs `n` operations `op(i)` on `c` concurrent tasks; returns each operation's latency and
/// the wall time.
async fn drive<F, Fut>(n: usize, c: usize, op: F) -> Result<(Vec<Duration>, Duration)>
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<()>> + Send,
{
    let next = Arc::new(AtomicUsize::new(0));
    let op = Arc::new(op);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..c {
        let (next, op) = (next.clone(), op.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return Ok::<_, anyhow::Error>(lat);
                }
                let t = Instant::now();
                op(i).await?;
                lat.push(t.elapsed());
            }
        }));
    }
    let mut all = Vec::with_capacity(n);
    for t in tasks {
        all.extend(t.await??);
    }
    Ok((all, start.elapsed()))
}

struct Stack {
    ca: std::path::PathBuf,
    cert: std::path::PathBuf,
    key: std::path::PathBuf,
    addr: std::net::SocketAddr,
    etcd: Etcd,
    _server: stratus_apiserver::Server,
    client: kube::Client,
    h2: H2,
    _dir: tempfile::TempDir,
}

/// A client speaking HTTP/2 over one TLS connection, as kubectl and client-go do (kube-rs
/// speaks HTTP/1.1 with a connection per concurrent request).
#[derive(Clone)]
struct H2 {
    client: hyper_util::client::legacy::Client<
        hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
        http_body_util::Full<bytes::Bytes>,
    >,
    base: String,
}

impl H2 {
    fn new(base: String, ca: &std::path::Path) -> Result<Self> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls_pemfile::certs(&mut std::io::BufReader::new(std::fs::File::open(ca)?)) {
            roots.add(cert?)?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        // Go's net/http (kubectl, client-go) sets TCP_NODELAY; without it HTTP/2 frames wait
        // on Nagle's algorithm for 40 ms.
        let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
        http.set_nodelay(true);
        http.enforce_http(false);
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_only()
            .enable_http2()
            .wrap_connector(http);
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .http2_only(true)
                .build(https);
        Ok(Self { client, base })
    }

    async fn post(&self, path: &str, body: Vec<u8>) -> Result<()> {
        let body = self.send(http::Method::POST, path, body).await?;
        let _: Value = serde_json::from_slice(&body)?;
        Ok(())
    }

    /// Opens a streaming `GET` (a watch) as one more stream of the shared connection.
    async fn stream(&self, path: &str) -> Result<hyper::body::Incoming> {
        let req = http::Request::builder()
            .uri(format!("{}{path}", self.base))
            .header("Authorization", "Bearer bench-token")
            .body(http_body_util::Full::new(bytes::Bytes::new()))?;
        let resp = self.client.request(req).await?;
        anyhow::ensure!(resp.status().is_success(), "GET {path}: {}", resp.status());
        Ok(resp.into_body())
    }

    /// Sends a request; the body of a successful answer.
    async fn send(&self, method: http::Method, path: &str, body: Vec<u8>) -> Result<bytes::Bytes> {
        let req = http::Request::builder()
            .method(method.clone())
            .uri(format!("{}{path}", self.base))
            .header("Authorization", "Bearer bench-token")
            .header("Content-Type", "application/json")
            .body(http_body_util::Full::new(bytes::Bytes::from(body)))?;
        let resp = self.client.request(req).await?;
        let status = resp.status();
        let body = http_body_util::BodyExt::collect(resp.into_body())
            .await?
            .to_bytes();
        anyhow::ensure!(
            status.is_success(),
            "{method} {path}: {status}: {}",
            String::from_utf8_lossy(&body)
        );
        Ok(body)
    }
}

async fn stack() -> Result<Stack> {
    stack_with(false).await
}

/// An etcd (over TLS with client certificates with `etcd_tls`) and an API server on it.
async fn stack_with(etcd_tls: bool) -> Result<Stack> {
    let etcd = if etcd_tls {
        Etcd::start_tls()?
    } else {
        Etcd::start()?
    };
    let dir = tempfile::tempdir()?;
    let pki =
        stratus_apiserver::http::tls::ensure_pki(&dir.path().join("pki"), &["127.0.0.1".into()])?;
    let mut cfg = stratus_apiserver::Config::new(vec![etcd.endpoint.clone()]);
    cfg.etcd_tls = etcd.client_tls();
    cfg.listen = "127.0.0.1:0".parse()?;
    cfg.tls = Some((pki.server_cert.clone(), pki.server_key.clone()));
    cfg.tokens = [("bench-token".to_string(), "admin".to_string())].into();
    // The benchmarks' agents all run as this one identity: a node's watches for many (each
    // network of its ports, its subnets and ports) and as many for every node of the run.
    cfg.limits.max_watches_per_user = 100_000;
    let server = stratus_apiserver::start(cfg).await?;
    let kubeconfig = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: b\n  cluster:\n    server: https://{}\n    certificate-authority: {}\nusers:\n- name: a\n  user:\n    token: bench-token\ncontexts:\n- name: a@b\n  context:\n    cluster: b\n    user: a\ncurrent-context: a@b\n",
        server.local_addr,
        pki.ca_cert.display()
    );
    let path = dir.path().join("kubeconfig");
    std::fs::write(&path, kubeconfig)?;
    let kc = kube::config::Kubeconfig::read_from(&path)?;
    let client = stratus_runtime::client::client(
        kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?,
    )?;
    let h2 = H2::new(format!("https://{}", server.local_addr), &pki.ca_cert)?;
    Ok(Stack {
        ca: pki.ca_cert.clone(),
        cert: pki.server_cert.clone(),
        key: pki.server_key.clone(),
        addr: server.local_addr,
        etcd,
        _server: server,
        client,
        h2,
        _dir: dir,
    })
}

const FLAVORS: &str = "/apis/compute.stratus.dev/v1/flavors";

fn row(c: usize, label: &str, st: &Stats, cpu: (f64, f64)) {
    println!(
        "| {c} | {label} | {:.0} | {} | {} | {:.0} | {:.0} |",
        st.per_sec,
        ms(st.p50),
        ms(st.p99),
        cpu.0,
        cpu.1
    );
}

fn req(method: &str, path: &str, ct: &str, body: Vec<u8>) -> Result<http::Request<Vec<u8>>> {
    Ok(http::Request::builder()
        .method(method)
        .uri(path)
        .header("Content-Type", ct)
        .body(body)?)
}

/// A way of creating objects that the `api` benchmark measures.
#[derive(Clone, Copy, PartialEq, Eq, Debug, clap::ValueEnum)]
enum CreatePath {
    /// Raw etcd transactions through the official gRPC client (the reference).
    Raw,
    /// `POST` through the API with kube-rs (HTTP/1.1).
    Kube,
    /// `POST` through the API with a plain HTTP/2 client, as kubectl and client-go.
    H2,
    /// Not a create: `GET /healthz` with the HTTP/2 client, which the API server answers
    /// without touching etcd. What the load generator, TLS and HTTP/2 cost on their own.
    Floor,
}

impl CreatePath {
    fn label(self) -> &'static str {
        match self {
            Self::Raw => "raw etcd txn",
            Self::Kube => "Stratus API, kube-rs (HTTP/1.1)",
            Self::H2 => "Stratus API, HTTP/2 (as kubectl)",
            Self::Floor => "transport floor: HTTP/2 GET /healthz (no etcd)",
        }
    }
}

/// One measurement of `n` creates at concurrency `c` along `path`; `tag` keeps names unique.
/// The raw path writes `stored` (an object as the API server stored it) under each new name.
async fn creates(
    s: &Stack,
    etcd: &etcd_client::Client,
    stored: &Value,
    path: CreatePath,
    tag: &str,
    n: usize,
    c: usize,
) -> Result<(Vec<Duration>, Duration)> {
    let tag = format!("{tag}-{}", format!("{path:?}").to_lowercase());
    match path {
        CreatePath::Raw => {
            let e = etcd.clone();
            let stored = stored.clone();
            drive(n, c, move |i| {
                let mut kv = e.kv_client();
                let name = format!("{tag}-{i}");
                let key = format!("/bench/raw/{name}");
                let mut object = stored.clone();
                object["metadata"]["name"] = Value::String(name);
                let value = serde_json::to_vec(&object);
                async move {
                    let value = value?;
                    let txn = Txn::new()
                        .when([Compare::create_revision(key.as_str(), CompareOp::Equal, 0)])
                        .and_then([TxnOp::put(key.as_str(), value, None)])
                        .or_else([TxnOp::get(key.as_str(), None)]);
                    let r = kv.txn(txn).await?;
                    anyhow::ensure!(r.succeeded(), "raw create of {key} found it existing");
                    Ok(())
                }
            })
            .await
        }
        CreatePath::Kube => {
            let cl = s.client.clone();
            drive(n, c, move |i| {
                let cl = cl.clone();
                let body = flavor(&format!("{tag}-{i}")).to_string().into_bytes();
                async move {
                    cl.request::<Value>(req("POST", FLAVORS, "application/json", body)?)
                        .await
                        .context("create through the API")?;
                    Ok(())
                }
            })
            .await
        }
        CreatePath::H2 => {
            let h2 = s.h2.clone();
            drive(n, c, move |i| {
                let h2 = h2.clone();
                let body = flavor(&format!("{tag}-{i}")).to_string().into_bytes();
                async move { h2.post(FLAVORS, body).await }
            })
            .await
        }
        CreatePath::Floor => {
            let h2 = s.h2.clone();
            drive(n, c, move |_| {
                let h2 = h2.clone();
                async move {
                    h2.send(http::Method::GET, "/healthz", Vec::new()).await?;
                    Ok(())
                }
            })
            .await
        }
    }
}

/// What the measurements of one path add up to over the rounds.
#[derive(Default)]
struct Tally {
    /// Every create's latency.
    lat: Vec<Duration>,
    /// Total wall time.
    wall: Duration,
    /// Total CPU µs per create: etcd, this process.
    cpu: (f64, f64),
    /// Creates/s of each round.
    per_round: Vec<f64>,
}

/// The etcd key under which the API server (prefix `/stratus`) keeps the Flavor `name`.
fn flavor_key(name: &str) -> String {
    format!("/stratus/compute.stratus.dev/flavors/{name}")
}

/// A Flavor created through the API, as the API server stored it in etcd: the request's
/// fields plus uid, creationTimestamp, generation and managedFields. The raw path writes it,
/// so that etcd does the same work on both paths.
async fn stored_flavor(s: &Stack, etcd: &etcd_client::Client, name: &str) -> Result<Value> {
    let body = flavor(name).to_string().into_bytes();
    s.client
        .request::<Value>(req("POST", FLAVORS, "application/json", body)?)
        .await?;
    let got = etcd.kv_client().get(flavor_key(name), None).await?;
    let kv = got
        .kvs()
        .first()
        .with_context(|| format!("the Flavor {name} is not in etcd"))?;
    Ok(serde_json::from_slice(kv.value())?)
}

/// Creates through each path at each concurrency, in `rounds` rounds. Each round measures
/// every path once, in an order rotated from round to round, so that no path always runs
/// first (on the smallest database) or last.
/// Moves every thread of process `pid` onto CPU `cpu` (threads it starts later inherit it).
fn pin(pid: u32, cpu: usize) -> Result<()> {
    let out = std::process::Command::new("taskset")
        .args([
            "--all-tasks",
            "--pid",
            "--cpu-list",
            &cpu.to_string(),
            &pid.to_string(),
        ])
        .output()
        .context("run taskset (util-linux)")?;
    anyhow::ensure!(
        out.status.success(),
        "taskset of {pid} onto CPU {cpu}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// The official gRPC client on `etcd`, with its client certificate when it serves TLS.
async fn raw_etcd(etcd: &Etcd) -> Result<etcd_client::Client> {
    let opts = match etcd.client_tls() {
        Some(tls) => {
            let mut t = etcd_client::TlsOptions::new().ca_certificate(
                etcd_client::Certificate::from_pem(std::fs::read(&tls.ca_file)?),
            );
            if let Some((cert, key)) = &tls.client {
                t = t.identity(etcd_client::Identity::from_pem(
                    std::fs::read(cert)?,
                    std::fs::read(key)?,
                ));
            }
            Some(etcd_client::ConnectOptions::new().with_tls(t))
        }
        None => None,
    };
    Ok(etcd_client::Client::connect([etcd.endpoint.as_str()], opts).await?)
}

async fn bench_api(
    objects: usize,
    levels: &[usize],
    rounds: usize,
    paths: &[CreatePath],
    etcd_own_core: bool,
    etcd_tls: bool,
) -> Result<()> {
    let s = stack_with(etcd_tls).await?;
    if etcd_own_core {
        pin(s.etcd.pid(), 0)?;
        pin(std::process::id(), 1)?;
    }
    let etcd = raw_etcd(&s.etcd).await?;
    println!(
        "| concurrency | path | creates/s | p50 ms | p99 ms | etcd CPU µs/create | client (+ API server) CPU µs/create |"
    );
    println!("|---|---|---|---|---|---|---|");
    let mut summary = Vec::new();
    let stored = stored_flavor(&s, &etcd, "template").await?;
    for &c in levels {
        for &path in paths {
            creates(&s, &etcd, &stored, path, &format!("warm-{c}"), 200, c).await?;
        }
        let mut tally: Vec<Tally> = paths.iter().map(|_| Tally::default()).collect();
        for round in 0..rounds.max(1) {
            for k in 0..paths.len() {
                let at = (k + round) % paths.len();
                let cpu = Cpu::start(s.etcd.pid());
                let (lat, wall) = creates(
                    &s,
                    &etcd,
                    &stored,
                    paths[at],
                    &format!("r{round}-c{c}"),
                    objects,
                    c,
                )
                .await?;
                let (e, p) = cpu.per_op(objects);
                let t = &mut tally[at];
                t.per_round.push(objects as f64 / wall.as_secs_f64());
                t.lat.extend(lat);
                t.wall += wall;
                t.cpu = (t.cpu.0 + e, t.cpu.1 + p);
            }
        }
        let n = rounds.max(1) as f64;
        let mut rows = Vec::new();
        for (&path, t) in paths.iter().zip(tally) {
            let st = stats(t.lat, t.wall);
            row(c, path.label(), &st, (t.cpu.0 / n, t.cpu.1 / n));
            rows.push((path, st, t.per_round));
        }
        if let Some((_, raw, raw_rounds)) = rows.iter().find(|r| r.0 == CreatePath::Raw) {
            for (path, st, per_round) in rows
                .iter()
                .filter(|r| matches!(r.0, CreatePath::Kube | CreatePath::H2))
            {
                let each: Vec<String> = per_round
                    .iter()
                    .zip(raw_rounds)
                    .map(|(a, r)| format!("{:.2}", a / r))
                    .collect();
                summary.push(format!(
                    "concurrency {c}, {}: API/raw throughput = {:.2}x (rounds: {}); p50 overhead = {:+.2} ms",
                    path.label(),
                    st.per_sec / raw.per_sec,
                    each.join(", "),
                    (st.p50.as_secs_f64() - raw.p50.as_secs_f64()) * 1000.0,
                ));
            }
        }
    }
    println!();
    for line in summary {
        println!("{line}");
    }
    Ok(())
}

/// How the watch benchmark's writer changes the watched object, and how its watches reach
/// the API server.
#[derive(Clone, Copy)]
struct WatchWay {
    write: WatchWrite,
    /// Every watch a stream of one HTTP/2 connection, not a connection each.
    multiplexed: bool,
    label: &'static str,
}

/// How the watch benchmark's writer changes the watched object.
#[derive(Clone, Copy)]
enum WatchWrite {
    /// An etcd `put` of the stored object: the same write the raw watchers see, so the
    /// difference is the API server's watch delivery alone.
    Etcd,
    /// A JSON merge `PATCH` through the API: adds the write's own trip through the API server
    /// (a read and a transaction) to every event.
    Patch,
}

/// The stored Flavor `template` with `metadata.annotations.seq` set to `seq`, encoded.
fn with_seq(template: &Value, seq: usize) -> Result<Vec<u8>> {
    let mut object = template.clone();
    object["metadata"]["annotations"] = json!({"seq": seq.to_string()});
    Ok(serde_json::to_vec(&object)?)
}

/// The `seq` annotation of a Flavor.
fn seq_of(object: &Value) -> usize {
    object["metadata"]["annotations"]["seq"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or(usize::MAX)
}

async fn bench_watch(watchers: usize, events: usize) -> Result<()> {
    let s = stack().await?;
    let etcd = raw_etcd(&s.etcd).await?;
    // The watched object, created through the API; its stored form is what every write
    // (raw or Stratus) puts, and what every watcher decodes.
    let template = stored_flavor(&s, &etcd, "watched").await?;
    println!("| path | watchers | events delivered | p50 ms | p99 ms |");
    println!("|---|---|---|---|---|");

    // Raw etcd watches, decoding each object as a client would.
    let sent: Arc<Mutex<Vec<Option<Instant>>>> = Arc::new(Mutex::new(vec![None; events]));
    let got: Arc<Mutex<Vec<(usize, Instant)>>> = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for _ in 0..watchers {
        let mut w = etcd.watch_client();
        let got = got.clone();
        let mut stream = w
            .watch("/bench/w/", Some(WatchOptions::new().with_prefix()))
            .await?;
        tasks.push(tokio::spawn(async move {
            let mut n = 0;
            while n < events {
                let Some(resp) = stream.message().await? else {
                    break;
                };
                for ev in resp.events() {
                    if ev.event_type() == EventType::Put
                        && let Some(kv) = ev.kv()
                    {
                        let object: Value = serde_json::from_slice(kv.value())?;
                        got.lock()
                            .map_err(|_| anyhow::anyhow!("lock"))?
                            .push((seq_of(&object), Instant::now()));
                        n += 1;
                    }
                }
            }
            Ok::<_, anyhow::Error>(())
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut kv = etcd.kv_client();
    for i in 0..events {
        let value = with_seq(&template, i)?;
        if let Ok(mut v) = sent.lock() {
            v[i] = Some(Instant::now());
        }
        kv.put("/bench/w/obj", value, None).await?;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(60), t).await???;
    }
    let raw = report("raw etcd watch", watchers, &sent, &got)?;

    // Watches through the API, written both ways.
    let mut lines = Vec::new();
    for way in [
        WatchWay {
            write: WatchWrite::Etcd,
            multiplexed: false,
            label: "Stratus API watch (writes: etcd put)",
        },
        WatchWay {
            write: WatchWrite::Etcd,
            multiplexed: true,
            label: "Stratus API watch, streams of one HTTP/2 connection (writes: etcd put)",
        },
        WatchWay {
            write: WatchWrite::Patch,
            multiplexed: false,
            label: "Stratus API watch (writes: PATCH through the API)",
        },
    ] {
        let label = way.label;
        let p99 = api_watch(&s, &etcd, &template, watchers, events, way).await?;
        lines.push(format!(
            "watch p99 API/raw, {label}: {:.2}x",
            p99.as_secs_f64() / raw.as_secs_f64()
        ));
    }
    println!();
    for line in lines {
        println!("{line}");
    }
    Ok(())
}

/// `watchers` kube-rs watches of the watched Flavor through the API (a connection each, as
/// separate clients have) while `events` writes change it; the p99 delivery latency.
async fn api_watch(
    s: &Stack,
    etcd: &etcd_client::Client,
    template: &Value,
    watchers: usize,
    events: usize,
    way: WatchWay,
) -> Result<Duration> {
    let WatchWay {
        write,
        multiplexed,
        label,
    } = way;
    let current: Value = s
        .client
        .request(req("GET", &format!("{FLAVORS}/watched"), "", vec![])?)
        .await?;
    let rv = current["metadata"]["resourceVersion"]
        .as_str()
        .unwrap_or("0")
        .to_string();
    let sent: Arc<Mutex<Vec<Option<Instant>>>> = Arc::new(Mutex::new(vec![None; events]));
    let got: Arc<Mutex<Vec<(usize, Instant)>>> = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for _ in 0..watchers {
        let path = format!(
            "{FLAVORS}?watch=true&resourceVersion={rv}&fieldSelector=metadata.name%3Dwatched&timeoutSeconds=120"
        );
        let got = got.clone();
        if multiplexed {
            let mut body = s.h2.stream(&path).await?;
            tasks.push(tokio::spawn(async move {
                use http_body_util::BodyExt;
                let mut buf: Vec<u8> = Vec::new();
                let mut n = 0;
                while n < events {
                    let Some(frame) = body.frame().await else {
                        break;
                    };
                    let Ok(data) = frame?.into_data() else {
                        continue;
                    };
                    buf.extend_from_slice(&data);
                    while let Some(end) = buf.iter().position(|b| *b == b'\n') {
                        let line: Vec<u8> = buf.drain(..=end).collect();
                        let ev: Value = serde_json::from_slice(&line)?;
                        if ev["type"] == "MODIFIED" {
                            got.lock()
                                .map_err(|_| anyhow::anyhow!("lock"))?
                                .push((seq_of(&ev["object"]), Instant::now()));
                            n += 1;
                        }
                    }
                }
                Ok::<_, anyhow::Error>(())
            }));
            continue;
        }
        let stream = s
            .client
            .request_events::<Value>(req("GET", &path, "application/json", vec![])?)
            .await?;
        tasks.push(tokio::spawn(async move {
            let mut stream = std::pin::pin!(stream);
            let mut n = 0;
            while n < events {
                let Some(ev) = stream.try_next().await? else {
                    break;
                };
                if let kube::core::WatchEvent::Modified(o) = ev {
                    got.lock()
                        .map_err(|_| anyhow::anyhow!("lock"))?
                        .push((seq_of(&o), Instant::now()));
                    n += 1;
                }
            }
            Ok::<_, anyhow::Error>(())
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut kv = etcd.kv_client();
    for i in 0..events {
        match write {
            WatchWrite::Etcd => {
                let value = with_seq(template, i)?;
                if let Ok(mut v) = sent.lock() {
                    v[i] = Some(Instant::now());
                }
                kv.put(flavor_key("watched"), value, None).await?;
            }
            WatchWrite::Patch => {
                let patch = json!({"metadata": {"annotations": {"seq": i.to_string()}}})
                    .to_string()
                    .into_bytes();
                if let Ok(mut v) = sent.lock() {
                    v[i] = Some(Instant::now());
                }
                s.client
                    .request::<Value>(req(
                        "PATCH",
                        &format!("{FLAVORS}/watched"),
                        "application/merge-patch+json",
                        patch,
                    )?)
                    .await?;
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(60), t).await???;
    }
    report(label, watchers, &sent, &got)
}

fn report(
    label: &str,
    watchers: usize,
    sent: &Mutex<Vec<Option<Instant>>>,
    got: &Mutex<Vec<(usize, Instant)>>,
) -> Result<Duration> {
    let sent = sent.lock().map_err(|_| anyhow::anyhow!("lock"))?;
    let got = got.lock().map_err(|_| anyhow::anyhow!("lock"))?;
    let lat: Vec<Duration> = got
        .iter()
        .filter_map(|(seq, at)| {
            sent.get(*seq)
                .copied()
                .flatten()
                .map(|t| at.saturating_duration_since(t))
        })
        .collect();
    let n = lat.len();
    let st = stats(lat, Duration::from_secs(1));
    println!(
        "| {label} | {watchers} | {n} | {} | {} |",
        ms(st.p50),
        ms(st.p99)
    );
    Ok(st.p99)
}

#[tokio::main]
async fn main() -> Result<()> {
    match Cli::parse().what {
        What::Api {
            objects,
            concurrency,
            rounds,
            paths,
            etcd_own_core,
            etcd_tls,
        } => {
            bench_api(
                objects,
                &concurrency,
                rounds,
                &paths,
                etcd_own_core,
                etcd_tls,
            )
            .await
        }
        What::Watch { watchers, events } => bench_watch(watchers, events).await,
        What::Sched {
            servers,
            hypervisors,
        } => sched::bench(servers, hypervisors).await,
        What::Dashboard {
            servers,
            rounds,
            changes,
            stream_rate,
            stream_seconds,
        } => dashboard::bench(servers, rounds, changes, stream_rate, stream_seconds).await,
        What::Storage {
            volumes,
            copy_mib,
            rounds,
        } => storage::bench(volumes, copy_mib, rounds).await,
        What::StorageAttach {
            rounds,
            remote,
            lvm,
        } => attach::bench(rounds, remote, lvm).await,
        What::StorageWrite {
            mib,
            rounds,
            nbd_insecure,
        } => guest_write::bench(mib, rounds, nbd_insecure).await,
        What::Boot {
            servers,
            concurrency,
            nodes,
        } => boot::bench(servers, concurrency, nodes).await,
        What::Tcg { rounds } => tcg::bench(rounds).await,
        What::List { objects, rounds } => list::bench(&objects, rounds).await,
        What::ListSelected { objects, rounds } => list::selected(objects, rounds).await,
        What::Memory { objects } => memory::bench(objects).await,
        What::Auth {
            requests,
            login_burst: Some(clients),
            login_burst_pause_ms,
            ..
        } => auth::login_burst(requests, clients, login_burst_pause_ms).await,
        What::Auth {
            requests,
            concurrency,
            other_users,
            login_burst: None,
            ..
        } => auth::bench(requests, &concurrency, other_users).await,
        What::NetSg {
            ports,
            rules,
            changes,
            rounds,
        } => net::sg(ports, rules, changes, rounds).await,
        What::NetConverge { ports, rounds } => net::converge(ports, rounds).await,
        What::NetTcp {
            seconds,
            rounds,
            networks,
        } => net::tcp(seconds, rounds, networks).await,
        What::NetOvs { ports, rounds } => {
            tokio::task::spawn_blocking(move || ovs::converge_ports(ports, rounds)).await?
        }
        What::NetOvsSg {
            ports,
            rules,
            changes,
        } => tokio::task::spawn_blocking(move || ovs::sg_change(ports, rules, changes)).await?,
        What::NetOvsTcp { seconds, rounds } => {
            tokio::task::spawn_blocking(move || ovs::tcp(seconds, rounds)).await?
        }
        What::Object {
            small,
            large,
            large_mib,
            large_concurrency,
            rounds,
        } => object::bench(small, large, large_mib, large_concurrency, rounds).await,
        What::TcpSink { listen } => net::tcp_sink(listen),
        What::TcpSource { to, seconds } => net::tcp_source(to, seconds),
    }
}
