//! Object storage: PUT and GET through a Swift proxy, side by side in one run, of (a) Swift
//! configured by hand (rings from `swift-ring-builder`, Debian's account, container and object
//! servers and a proxy with keystonemiddleware, as operators run Swift with Keystone) and (b)
//! `stratus up --object-store` (ObjectRings built by the ring controller and installed by the
//! object agent, which runs the same servers, and its proxy). Both proxies validate every
//! request's token afresh against the same identity, the API server's `/identity/v3`, as
//! the same service identity, so that what differs is how the servers and rings are run. Also how long each takes from nothing to serving, and from
//! the rings' apply to their ring files installed.
//!
//! Each side has a loopback address of its own that no test uses (the servers' ports are
//! fixed); the object agent's allow-list (an nftables table on its address alone) is taken
//! away at the end, as is every process started.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use stratus_e2e::{Cloud, Proc, output_of, wait_until};

/// The Stratus store's address (its servers, rsync and proxy).
const STRATUS_IP: &str = "127.0.201.2";
/// The hand-configured Swift's address.
const REFERENCE_IP: &str = "127.0.201.3";
/// Both proxies' port, each on its own address.
const PROXY_PORT: u16 = 8080;
/// Partition power and the one device, as `stratus up --object-store` has them.
const PART_POWER: &str = "9";
const DEVICE: &str = "d1";
/// The account, container and object servers' ports (the object agent's defaults).
const SERVERS: [(&str, u16); 3] = [("account", 6202), ("container", 6201), ("object", 6200)];
/// Python servers starting on a loaded 2-core machine.
const WAIT: Duration = Duration::from_secs(300);
/// The Stratus user's password, for this benchmark only.
const PASSWORD: &str = "bench-object-pw-1";

type Http = Client<HttpConnector, Full<Bytes>>;
/// The hand-configured Swift: its directory and processes, stopped when dropped.
struct Reference {
    dir: tempfile::TempDir,
    procs: Vec<Proc>,
}

impl Reference {
    fn log(&self) -> String {
        ["account", "container", "object", "proxy"]
            .iter()
            .map(|k| {
                let log = std::fs::read_to_string(self.dir.path().join(format!("{k}.log")))
                    .unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(20).collect();
                format!(
                    "--- {k}\n{}\n",
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                )
            })
            .collect()
    }
}

/// Runs `swift-ring-builder` with `args`; rebalance exits 1 with a warning on a ring of one
/// device, and writes the ring.
fn ring_builder(args: &[&str]) -> Result<()> {
    let out = Command::new("swift-ring-builder")
        .args(args)
        .output()
        .context("run swift-ring-builder (Debian's swift package)")?;
    ensure!(
        out.status.code().is_some_and(|c| c <= 1),
        "swift-ring-builder {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

fn server_conf(root: &Path, kind: &str, port: u16) -> String {
    format!(
        "[DEFAULT]\nbind_ip = {REFERENCE_IP}\nbind_port = {port}\nworkers = 0\nuser = root\n\
         devices = {devices}\nmount_check = false\nswift_dir = {swift_dir}\n\
         log_name = {kind}-server\n\n\
         [pipeline:main]\npipeline = healthcheck {kind}-server\n\n\
         [app:{kind}-server]\nuse = egg:swift#{kind}\n\n\
         [filter:healthcheck]\nuse = egg:swift#healthcheck\n",
        devices = root.join("devices").display(),
        swift_dir = root.display(),
    )
}

/// Where the reference proxy's keystonemiddleware validates tokens: the Stratus API
/// server's identity, as the same service identity as `stratus up`'s proxy.
struct Identity {
    /// `https://HOST:PORT/identity/v3`.
    url: String,
    /// The API server's CA certificate.
    ca: std::path::PathBuf,
    /// The proxies' service token.
    token: String,
}

/// The proxy as `stratus up --object-store` writes it: keystonemiddleware's `authtoken`
/// (every token validated afresh, `token_cache_time = -1`), `s3api`, `s3token` and
/// `keystoneauth` with the same roles, against `identity`.
fn proxy_conf(root: &Path, identity: &Identity) -> String {
    stratus_e2e::swift_proxy_conf(
        REFERENCE_IP,
        PROXY_PORT,
        root,
        &identity.url,
        &identity.ca,
        &identity.token,
    )
}

/// The identity `stratus up`'s proxy uses: its token from the cloud's token file.
fn proxy_identity(cloud: &Cloud) -> Result<Identity> {
    let tokens = std::fs::read_to_string(cloud.dir.path().join("tokens.csv"))?;
    let token = tokens
        .lines()
        .find_map(|l| {
            l.split_once(',')
                .filter(|(_, user)| *user == "system:service:object-proxy")
                .map(|(t, _)| t.to_string())
        })
        .context("no object proxy identity in tokens.csv")?;
    Ok(Identity {
        url: format!("{}/identity/v3", cloud.url),
        ca: cloud.dir.path().join("pki/ca.crt"),
        token,
    })
}

/// Whether `ip:port` answers Swift's healthcheck.
fn healthy(ip: &str, port: u16) -> bool {
    Command::new("curl")
        .args(["-sf", "-m", "5", "--noproxy", "*"])
        .arg(format!("http://{ip}:{port}/healthcheck"))
        .output()
        .is_ok_and(|o| o.status.success() && o.stdout == b"OK")
}

/// Builds the reference's three rings and starts its servers and proxy (validating tokens
/// with `identity`): the time the rings took, and the time from the rings to every server
/// and the proxy answering.
fn start_reference(identity: &Identity) -> Result<(Reference, Duration, Duration)> {
    let dir = tempfile::tempdir()?;
    let root = dir.path().to_path_buf();
    std::fs::create_dir_all(root.join("devices").join(DEVICE))?;
    let t = Instant::now();
    for (kind, port) in SERVERS {
        let builder = root.join(format!("{kind}.builder"));
        let b = builder.to_str().context("a UTF-8 path")?;
        ring_builder(&[b, "create", PART_POWER, "1", "1"])?;
        ring_builder(&[
            b,
            "add",
            &format!("r1z1-{REFERENCE_IP}:{port}/{DEVICE}"),
            "100",
        ])?;
        ring_builder(&[b, "rebalance"])?;
        ensure!(
            root.join(format!("{kind}.ring.gz")).is_file(),
            "swift-ring-builder wrote no {kind} ring"
        );
    }
    let rings = t.elapsed();
    let t = Instant::now();
    let mut reference = Reference {
        dir,
        procs: Vec::new(),
    };
    for (kind, port) in SERVERS {
        std::fs::write(
            root.join(format!("{kind}-server.conf")),
            server_conf(&root, kind, port),
        )?;
    }
    std::fs::write(root.join("proxy-server.conf"), proxy_conf(&root, identity))?;
    for kind in ["account", "container", "object", "proxy"] {
        reference.procs.push(Proc::spawn(
            &format!("swift-{kind}-server"),
            Command::new("/usr/bin/python3")
                .arg(format!("/usr/bin/swift-{kind}-server"))
                .arg(root.join(format!("{kind}-server.conf")))
                .arg("--verbose"),
            &root.join(format!("{kind}.log")),
        )?);
    }
    for (kind, port) in SERVERS.into_iter().chain([("proxy", PROXY_PORT)]) {
        wait_until(WAIT, &format!("the reference's {kind} server"), || {
            healthy(REFERENCE_IP, port).then_some(())
        })
        .with_context(|| reference.log())?;
    }
    Ok((reference, rings, t.elapsed()))
}

/// `stratus up --object-store` on the Stratus address; the servers' allow-list (an nftables
/// table on that address, which `stratus up` removes when it stops) is taken away when this
/// is dropped, should the cloud have died without stopping.
struct Store {
    cloud: Option<Cloud>,
}

impl Store {
    fn cloud(&self) -> &Cloud {
        self.cloud.as_ref().expect("the cloud runs until dropped")
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        drop(self.cloud.take());
        let table = format!("stratus_swift_{}", STRATUS_IP.replace('.', "_"));
        let present = Command::new("nft")
            .args(["list", "table", "inet", &table])
            .output()
            .is_ok_and(|o| o.status.success());
        if present {
            let _ = Command::new("nft")
                .args(["delete", "table", "inet", &table])
                .status();
        }
    }
}

/// Starts the Stratus store: the time to the API server answering and to the store serving.
fn start_stratus() -> Result<(Store, Duration, Duration)> {
    let t = Instant::now();
    let cloud = Cloud::up_with(&[
        "--object-store",
        "--object-store-ip",
        STRATUS_IP,
        "--object-store-port",
        &PROXY_PORT.to_string(),
    ])?;
    let api = t.elapsed();
    let store = Store { cloud: Some(cloud) };
    let line = format!("Object store (Swift API and S3): http://{STRATUS_IP}:{PROXY_PORT}");
    wait_until(WAIT, "stratus up to show the object store", || {
        store.cloud().log().contains(&line).then_some(())
    })
    .with_context(|| store.cloud().log())?;
    Ok((store, api, t.elapsed()))
}

/// A UTC timestamp at the start of a log line (colours taken away).
fn log_time(line: &str) -> Option<jiff::Timestamp> {
    let mut plain = String::new();
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            plain.push(c);
        }
    }
    plain.split_whitespace().next()?.parse().ok()
}

/// From the rings' apply (the first ObjectRing write in the audit log) to the agent's last
/// "ring installed" (its log).
fn ring_apply_to_installed(cloud: &Cloud) -> Result<Duration> {
    let audit = std::fs::read_to_string(cloud.dir.path().join("audit.log"))?;
    let applied = audit
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|e| e["objectRef"]["resource"] == "objectrings" && e["verb"] == "patch")
        .filter_map(|e| e["requestReceivedTimestamp"].as_str()?.parse().ok())
        .min()
        .context("no ObjectRing apply in the audit log")?;
    let log = cloud.log();
    let installed: Vec<jiff::Timestamp> = log
        .lines()
        .filter(|l| l.contains("ring installed"))
        .filter_map(log_time)
        .collect();
    ensure!(
        installed.len() >= 3,
        "the agent logged {} ring installs",
        installed.len()
    );
    let last = installed.into_iter().max().unwrap_or(applied);
    Ok(Duration::try_from(last.duration_since(applied))?)
}

/// A Stratus user, member of Project `bench`, logged in through Keystone: the token and the
/// project's account URL on the proxy.
fn stratus_login(cloud: &Cloud) -> Result<(String, String)> {
    cloud.projects(&["bench"])?;
    cloud.kubectl_in(
        &["apply", "-f", "-"],
        "apiVersion: identity.stratus.dev/v1\nkind: User\nmetadata:\n  name: bencher\nspec: {}\n---\n\
         apiVersion: identity.stratus.dev/v1\nkind: RoleAssignment\nmetadata:\n  name: bencher-member\n  namespace: bench\nspec:\n  user: bencher\n  role: member\n",
    )?;
    cloud.kubectl_in(
        &[
            "replace",
            "--raw",
            "/apis/identity.stratus.dev/v1/users/bencher/password",
            "-f",
            "-",
        ],
        &serde_json::json!({ "password": PASSWORD }).to_string(),
    )?;
    let body = serde_json::json!({"auth": {
        "identity": {"methods": ["password"], "password": {"user": {"name": "bencher", "domain": {"id": "default"}, "password": PASSWORD}}},
        "scope": {"project": {"name": "bench", "domain": {"id": "default"}}},
    }});
    let out = output_of(
        Command::new("curl")
            .args(["-sS", "-i", "--fail", "--cacert"])
            .arg(cloud.dir.path().join("pki/ca.crt"))
            .args(["-H", "Content-Type: application/json", "--data-binary"])
            .arg(body.to_string())
            .arg(format!("{}/identity/v3/auth/tokens", cloud.url)),
        "a Keystone login",
    )?;
    let token = String::from_utf8_lossy(&out)
        .lines()
        .find_map(|l| {
            l.split_once(':')
                .filter(|(k, _)| k.eq_ignore_ascii_case("x-subject-token"))
                .map(|(_, v)| v.trim().to_string())
        })
        .context("no X-Subject-Token")?;
    let uid = cloud.kubectl_ok(&["get", "project", "bench", "-o", "jsonpath={.metadata.uid}"])?;
    Ok((
        token,
        format!("http://{STRATUS_IP}:{PROXY_PORT}/v1/AUTH_{}", uid.trim()),
    ))
}

/// One side's proxy: where its account is and the token it takes.
#[derive(Clone)]
struct Side {
    label: &'static str,
    http: Http,
    account: Arc<str>,
    token: Arc<str>,
}

impl Side {
    /// A request to `path` under the account; its status and body.
    async fn call(&self, method: http::Method, path: &str, body: Bytes) -> Result<(u16, Bytes)> {
        let req = http::Request::builder()
            .method(method)
            .uri(format!("{}/{path}", self.account))
            .header("X-Auth-Token", &*self.token)
            .body(Full::new(body))?;
        let resp = self.http.request(req).await?;
        let status = resp.status().as_u16();
        Ok((status, resp.into_body().collect().await?.to_bytes()))
    }

    /// Makes container `bench`; every measured object goes into it.
    async fn container(&self) -> Result<()> {
        let (code, body) = self.call(http::Method::PUT, "bench", Bytes::new()).await?;
        ensure!(
            code == 201 || code == 202,
            "{}: PUT container: {code} {}",
            self.label,
            String::from_utf8_lossy(&body)
        );
        Ok(())
    }
}

/// One figure of one side over the rounds: each request's latency, the wall time and the CPU
/// used (proxy, servers, Stratus daemons, `stratus up`).
type Pooled = (Vec<Duration>, Duration, [Duration; 4]);

/// The client's concurrency for the 4 KiB objects, as the issue asks.
const CONCURRENCY: usize = 16;

/// One measured stage: `n` objects of `size` bytes at concurrency `c`.
#[derive(Clone, Copy)]
struct Stage {
    what: &'static str,
    prefix: &'static str,
    n: usize,
    c: usize,
    size: usize,
}

/// PUTs, GETs (each length checked) or DELETEs the objects `bench/{prefix}-{i}` for `i` below
/// `n`, at concurrency `c`: each request's latency and the wall time.
async fn run_op(
    side: &Side,
    op: Op,
    prefix: &str,
    n: usize,
    c: usize,
    size: usize,
) -> Result<(Vec<Duration>, Duration)> {
    let data = match op {
        Op::Put => Bytes::from((0..size).map(|i| (i % 251) as u8).collect::<Vec<_>>()),
        Op::Get | Op::Delete => Bytes::new(),
    };
    let (side, prefix) = (side.clone(), prefix.to_string());
    crate::drive(n, c, move |i| {
        let (side, path, data) = (side.clone(), format!("bench/{prefix}-{i}"), data.clone());
        async move {
            let (code, body) = side.call(op.method(), &path, data).await?;
            let ok = match op {
                Op::Put => code == 201,
                Op::Get => code == 200 && body.len() == size,
                // Gone already (a retried round) is as good.
                Op::Delete => code == 204 || code == 404,
            };
            ensure!(
                ok,
                "{}: {:?} {path}: {code}, {} bytes",
                side.label,
                op,
                body.len()
            );
            Ok(())
        }
    })
    .await
}

#[derive(Clone, Copy, Debug)]
enum Op {
    Put,
    Get,
    Delete,
}

impl Op {
    fn method(self) -> http::Method {
        match self {
            Op::Put => http::Method::PUT,
            Op::Get => http::Method::GET,
            Op::Delete => http::Method::DELETE,
        }
    }
}

/// What the processes measured use of the CPU, by kind.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Role {
    /// The side's `swift-proxy-server`.
    Proxy,
    /// Its account, container and object servers.
    Servers,
    /// Its replicators, updaters, auditors, reaper and rsync (the Stratus node's alone).
    Daemons,
}

/// CPU time so far of each side's Swift processes (those whose command line names the side's
/// directory, `dirs[side]`) by role, and of `stratus up` (`api`: the API server, which
/// validates both proxies' tokens, and the node's agents).
struct CpuSample {
    roles: BTreeMap<(usize, Role), Duration>,
    api: Duration,
}

fn sample_cpu(dirs: &[String; 2], api: u32) -> CpuSample {
    let mut roles = BTreeMap::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|p| p.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        let Some(side) = dirs.iter().position(|d| cmdline.contains(d.as_str())) else {
            continue;
        };
        // Swift's programs and rsync; not etcd or `stratus up`, which name the cloud's
        // directory too.
        let role = if !cmdline.contains("/usr/bin/swift-") && !cmdline.contains("rsync --daemon") {
            continue;
        } else if cmdline.contains("swift-proxy-server") {
            Role::Proxy
        } else if ["account", "container", "object"]
            .iter()
            .any(|k| cmdline.contains(&format!("swift-{k}-server ")))
        {
            Role::Servers
        } else {
            Role::Daemons
        };
        *roles.entry((side, role)).or_default() += crate::cpu_fields(pid, 11..=14);
    }
    CpuSample {
        roles,
        api: crate::cpu_fields(&api.to_string(), 11..=14),
    }
}

impl CpuSample {
    /// CPU used since `before` by `side`'s `role`, the Stratus daemons and `stratus up`.
    fn since(&self, before: &CpuSample, side: usize) -> [Duration; 4] {
        let of = |s: &CpuSample, k| s.roles.get(&k).copied().unwrap_or_default();
        let d = |k| of(self, k).saturating_sub(of(before, k));
        [
            d((side, Role::Proxy)),
            d((side, Role::Servers)),
            d((1, Role::Daemons)),
            self.api.saturating_sub(before.api),
        ]
    }
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// `stratus-bench object`: both stores started (Stratus first, whose identity the reference's
/// proxy uses too), then `rounds` rounds. A round measures, for 4 KiB objects (`small`, at
/// concurrency [`CONCURRENCY`]) and then `large_mib` MiB objects (`large`, at
/// `large_concurrency`), the PUTs on one side then the other, then the GETs likewise, the
/// side that goes first alternating from round to round (A/B, B/A), so that the two
/// measurements of one figure are minutes apart at most; then it deletes that round's
/// objects (unmeasured), so the devices hold one round's objects at most.
pub async fn bench(
    small: usize,
    large: usize,
    large_mib: usize,
    large_concurrency: usize,
    rounds: usize,
) -> Result<()> {
    if rounds == 0 || small == 0 || large == 0 || large_mib == 0 || large_concurrency == 0 {
        bail!("--rounds, --small, --large, --large-mib and --large-concurrency must be at least 1");
    }
    ensure!(
        large_mib <= 64,
        "--large-mib {large_mib}: at most 64 (the devices hold a round's objects)"
    );
    println!("load average at the start: {}", crate::net::load());
    let (store, api_ready, store_ready) = start_stratus()?;
    let (reference, ref_rings, ref_serving) = start_reference(&proxy_identity(store.cloud())?)?;
    let ring_install = ring_apply_to_installed(store.cloud())?;

    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let http: Http = Client::builder(hyper_util::rt::TokioExecutor::new()).build(connector);
    let (stratus_token, stratus_account) = stratus_login(store.cloud())?;
    // The same user's token, on the same project's account, at the reference's proxy.
    let reference_account = stratus_account.replacen(
        &format!("http://{STRATUS_IP}:"),
        &format!("http://{REFERENCE_IP}:"),
        1,
    );
    let sides = [
        Side {
            label: "reference: Swift by hand",
            http: http.clone(),
            account: reference_account.into(),
            token: stratus_token.clone().into(),
        },
        Side {
            label: "Stratus: object agent's servers",
            http,
            account: stratus_account.into(),
            token: stratus_token.into(),
        },
    ];
    for s in &sides {
        // The project's account is made on its first write, unmeasured.
        let started = Instant::now();
        loop {
            match s.container().await {
                Ok(()) => break,
                Err(_) if started.elapsed() < WAIT => {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => {
                    return Err(e).with_context(|| {
                        format!(
                            "{}\n--- stratus up\n{}",
                            reference.log(),
                            store.cloud().log()
                        )
                    });
                }
            }
        }
        for op in [Op::Put, Op::Get, Op::Delete] {
            run_op(s, op, "warm", 20, 4, 4096).await?;
        }
    }

    let dirs = [
        reference.dir.path().display().to_string(),
        store.cloud().dir.path().display().to_string(),
    ];
    let api_pid = store.cloud().proc.pid();
    let stages = [
        Stage {
            what: "4 KiB",
            prefix: "small",
            n: small,
            c: CONCURRENCY,
            size: 4096,
        },
        Stage {
            what: "large",
            prefix: "large",
            n: large,
            c: large_concurrency,
            size: large_mib << 20,
        },
    ];
    let figures: Vec<(Stage, Op)> = stages
        .iter()
        .flat_map(|s| [(*s, Op::Put), (*s, Op::Get)])
        .collect();
    // (figure, side) → latencies, wall time and CPU (proxy, servers, Stratus daemons,
    // stratus up), pooled over the rounds; and each round's ops/s.
    let mut pooled: Vec<[Pooled; 2]> = (0..figures.len()).map(|_| Default::default()).collect();
    let mut per_round: Vec<[Vec<f64>; 2]> = vec![Default::default(); figures.len()];
    for r in 0..rounds {
        let order = if r % 2 == 0 { [0, 1] } else { [1, 0] };
        for (k, (stage, op)) in figures.iter().enumerate() {
            for s in order {
                let prefix = format!("{}-{r}", stage.prefix);
                let before = sample_cpu(&dirs, api_pid);
                let (lat, wall) =
                    run_op(&sides[s], *op, &prefix, stage.n, stage.c, stage.size).await?;
                let used = sample_cpu(&dirs, api_pid).since(&before, s);
                per_round[k][s].push(lat.len() as f64 / wall.as_secs_f64().max(1e-9));
                let p = &mut pooled[k][s];
                p.0.extend(lat);
                p.1 += wall;
                for (total, d) in p.2.iter_mut().zip(used) {
                    *total += d;
                }
            }
        }
        for stage in &stages {
            for side in &sides {
                let prefix = format!("{}-{r}", stage.prefix);
                run_op(side, Op::Delete, &prefix, stage.n, CONCURRENCY, 0).await?;
            }
        }
        println!(
            "round {}: {} first; load average {}",
            r + 1,
            if order[0] == 0 {
                "reference"
            } else {
                "Stratus"
            },
            crate::net::load()
        );
    }

    println!("load average at the end: {}", crate::net::load());
    println!();
    println!(
        "| {rounds} rounds, interleaved | objects | concurrency | ops/s | MiB/s | p50 ms | p99 ms | CPU ms per request: proxy | servers | Stratus node's daemons | API server (tokens) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    let name = |stage: &Stage| {
        if stage.prefix == "small" {
            stage.what.to_string()
        } else {
            format!("{large_mib} MiB")
        }
    };
    for (s, side) in sides.iter().enumerate() {
        for (k, (stage, op)) in figures.iter().enumerate() {
            let (lat, wall, used) = pooled[k][s].clone();
            let n = lat.len().max(1) as f64;
            let st = crate::stats(lat, wall);
            let per = |d: Duration| format!("{:.1}", d.as_secs_f64() * 1e3 / n);
            println!(
                "| {} {op:?} {} | {} | {} | {:.0} | {:.1} | {} | {} | {} | {} | {} | {} |",
                side.label,
                name(stage),
                stage.n * rounds,
                stage.c,
                st.per_sec,
                st.per_sec * stage.size as f64 / (1u64 << 20) as f64,
                crate::ms(st.p50),
                crate::ms(st.p99),
                per(used[0]),
                per(used[1]),
                per(used[2]),
                per(used[3]),
            );
        }
    }
    println!();
    for (k, (stage, op)) in figures.iter().enumerate() {
        let ratios: Vec<f64> = per_round[k][1]
            .iter()
            .zip(&per_round[k][0])
            .map(|(s, r)| s / r.max(1e-9))
            .collect();
        let m = median(&ratios);
        let (lo, hi) = ratios.iter().fold((f64::INFINITY, 0.0f64), |(lo, hi), r| {
            (lo.min(*r), hi.max(*r))
        });
        let shown: Vec<String> = ratios.iter().map(|r| format!("{r:.2}")).collect();
        println!(
            "{} {op:?}: Stratus/reference = {m:.2}x median of {rounds} rounds (spread {lo:.2}-{hi:.2}; rounds: {}); goal >= 0.95x {}",
            name(stage),
            shown.join(", "),
            if m >= 0.95 { "met" } else { "missed" },
        );
    }
    println!();
    println!(
        "reference: three rings by swift-ring-builder (create, add, rebalance) {:.2} s; servers and proxy started → answering {:.2} s; together {:.2} s",
        ref_rings.as_secs_f64(),
        ref_serving.as_secs_f64(),
        (ref_rings + ref_serving).as_secs_f64(),
    );
    println!(
        "Stratus: three ObjectRings applied → built and installed by the agent {:.2} s; `stratus up --object-store` started → API ready {:.2} s → store serving (rings, servers, proxy) {:.2} s",
        ring_install.as_secs_f64(),
        api_ready.as_secs_f64(),
        store_ready.as_secs_f64(),
    );
    drop(store);
    drop(reference);
    Ok(())
}
