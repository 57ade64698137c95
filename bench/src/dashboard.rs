//! The dashboard in a real browser (headless Chromium) vs kubectl, on one `stratus apiserver`
//! in one run, logged in as the same project member: a project's servers listed and rendered
//! (the page's LIST and first full render vs `kubectl get servers`, a whole process as a user
//! runs it), and a change seen (a write until its row is in the page vs until a running
//! `kubectl get servers -w` prints it).

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use stratus_e2e::browser::Browser;
use stratus_e2e::{Proc, STARTUP, TEST_TOKEN, stratus_bin, wait_until};

use crate::{drive, ms, req};

const PROJECT: &str = "bench";
const USER: &str = "alice";
const PASSWORD: &str = "bench-Correct-Horse-5521";

/// The loopback address the benchmark's etcd and API server listen on, with fixed ports
/// below the ephemeral range: no test binds it, so the benchmark can run beside a test suite
/// without taking a port a test chose.
const HOST: &str = "127.0.201.17";
const ETCD_CLIENT: u16 = 12379;
const ETCD_PEER: u16 = 12380;
const API_PORT: u16 = 16443;

/// etcd and one `stratus apiserver` on [`HOST`], in a temporary directory; both stopped and
/// the directory removed when dropped.
struct Stack {
    _api: Proc,
    _etcd: Proc,
    dir: tempfile::TempDir,
    url: String,
}

impl Stack {
    fn start() -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let (client, peer) = (
            format!("http://{HOST}:{ETCD_CLIENT}"),
            format!("http://{HOST}:{ETCD_PEER}"),
        );
        let etcd = Proc::spawn(
            "etcd",
            Command::new("etcd")
                .arg("--data-dir")
                .arg(dir.path().join("etcd"))
                .args(["--listen-client-urls", &client])
                .args(["--advertise-client-urls", &client])
                .args(["--listen-peer-urls", &peer])
                .args(["--initial-advertise-peer-urls", &peer])
                .args(["--initial-cluster", &format!("default={peer}")]),
            &dir.path().join("etcd.log"),
        )?;
        wait_until(STARTUP, "etcd to answer", || {
            Command::new("etcdctl")
                .args(["--endpoints", &client, "endpoint", "health"])
                .output()
                .ok()
                .filter(|o| o.status.success())
        })?;
        std::fs::write(
            dir.path().join("tokens.csv"),
            format!("{TEST_TOKEN},admin\n"),
        )?;
        let pki =
            stratus_apiserver::http::tls::ensure_pki(&dir.path().join("pki"), &[HOST.to_string()])?;
        let url = format!("https://{HOST}:{API_PORT}");
        std::fs::write(
            dir.path().join("kubeconfig"),
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: s\n  cluster:\n    server: {url}\n    certificate-authority: {}\nusers:\n- name: admin\n  user:\n    token: {TEST_TOKEN}\ncontexts:\n- name: admin@s\n  context:\n    cluster: s\n    user: admin\ncurrent-context: admin@s\n",
                pki.ca_cert.display()
            ),
        )?;
        let api = Proc::spawn(
            "stratus apiserver",
            Command::new(stratus_bin())
                .arg("apiserver")
                .args(["--etcd-endpoints", &client])
                .args(["--listen", &format!("{HOST}:{API_PORT}")])
                .args(["--bookmark-seconds", "1"])
                .arg("--token-file")
                .arg(dir.path().join("tokens.csv"))
                .arg("--tls-cert")
                .arg(&pki.server_cert)
                .arg("--tls-key")
                .arg(&pki.server_key),
            &dir.path().join("apiserver.log"),
        )?;
        let stack = Self {
            _api: api,
            _etcd: etcd,
            dir,
            url,
        };
        wait_until(STARTUP, "the API server to be ready", || {
            Command::new("kubectl")
                .env("KUBECONFIG", stack.kubeconfig())
                .args(["get", "--raw", "/readyz"])
                .output()
                .ok()
                .filter(|o| o.status.success())
        })?;
        Ok(stack)
    }

    fn kubeconfig(&self) -> std::path::PathBuf {
        self.dir.path().join("kubeconfig")
    }

    fn pki(&self, file: &str) -> std::path::PathBuf {
        self.dir.path().join("pki").join(file)
    }
}

fn server(name: &str) -> Value {
    json!({"apiVersion": "compute.stratus.dev/v1", "kind": "Server",
        "metadata": {"name": name, "namespace": PROJECT},
        "spec": {"flavor": "bench.small", "image": "cirros", "description": "listed by the dashboard benchmark"}})
}

pub(crate) fn epoch_ms() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
}

pub(crate) fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v.get(v.len() / 2).copied().unwrap_or_default()
}

pub(crate) fn p99(mut v: Vec<Duration>) -> Duration {
    v.sort();
    let i = ((v.len() as f64 * 0.99).ceil() as usize).clamp(1, v.len().max(1)) - 1;
    v.get(i).copied().unwrap_or_default()
}

/// A kube-rs client from a kubeconfig file.
async fn client(kubeconfig: &std::path::Path) -> Result<kube::Client> {
    let kc = kube::config::Kubeconfig::read_from(kubeconfig)?;
    Ok(kube::Client::try_from(
        kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?,
    )?)
}

/// Runs the benchmark and prints its tables.
pub async fn bench(
    servers: usize,
    rounds: usize,
    changes: usize,
    stream_rate: u32,
    stream_seconds: u64,
) -> Result<()> {
    let api = Stack::start()?;
    let dir = tempfile::tempdir()?;
    let admin = client(&api.kubeconfig()).await?;
    let send = |method: &str, path: &str, body: Value| {
        req(
            method,
            path,
            "application/json",
            body.to_string().into_bytes(),
        )
    };
    for (path, body) in [
        (
            "/apis/identity.stratus.dev/v1/projects".to_string(),
            json!({"apiVersion": "identity.stratus.dev/v1", "kind": "Project", "metadata": {"name": PROJECT}, "spec": {}}),
        ),
        (
            "/apis/identity.stratus.dev/v1/users".to_string(),
            json!({"apiVersion": "identity.stratus.dev/v1", "kind": "User", "metadata": {"name": USER}, "spec": {"enabled": true, "defaultProject": PROJECT}}),
        ),
        (
            format!("/apis/identity.stratus.dev/v1/namespaces/{PROJECT}/roleassignments"),
            json!({"apiVersion": "identity.stratus.dev/v1", "kind": "RoleAssignment", "metadata": {"name": USER}, "spec": {"user": USER, "role": "member"}}),
        ),
        (
            "/apis/compute.stratus.dev/v1/flavors".to_string(),
            json!({"apiVersion": "compute.stratus.dev/v1", "kind": "Flavor", "metadata": {"name": "bench.small"}, "spec": {"vcpus": 1, "ramMiB": 256, "diskGiB": 1}}),
        ),
    ] {
        admin.request::<Value>(send("POST", &path, body)?).await?;
    }
    admin
        .request::<Value>(send(
            "PUT",
            &format!("/apis/identity.stratus.dev/v1/users/{USER}/password"),
            json!({ "password": PASSWORD }),
        )?)
        .await?;
    let servers_path = format!("/apis/compute.stratus.dev/v1/namespaces/{PROJECT}/servers");
    let cl = admin.clone();
    let path = servers_path.clone();
    drive(servers, 16, move |i| {
        let (cl, path) = (cl.clone(), path.clone());
        async move {
            cl.request::<Value>(req(
                "POST",
                &path,
                "application/json",
                server(&format!("srv-{i:05}")).to_string().into_bytes(),
            )?)
            .await
            .map(|_| ())
            .context("create a server")
        }
    })
    .await?;

    // kubectl as the same member, with a discovery cache of its own (warm after its first run,
    // as a user's is).
    let issued: Value = admin
        .request(send(
            "POST",
            "/apis/identity.stratus.dev/v1/tokens",
            json!({"user": USER, "password": PASSWORD, "expirationSeconds": 3600}),
        )?)
        .await?;
    let token = issued["token"].as_str().context("no token")?;
    let ca = api.pki("ca.crt");
    let kubeconfig = dir.path().join("alice.kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: s\n  cluster:\n    server: {}\n    certificate-authority: {}\nusers:\n- name: u\n  user:\n    token: {token}\ncontexts:\n- name: u@s\n  context:\n    cluster: s\n    user: u\n    namespace: {PROJECT}\ncurrent-context: u@s\n",
            api.url,
            ca.display()
        ),
    )?;
    let kubectl = |args: &[&str]| {
        let mut c = Command::new("kubectl");
        c.env("KUBECONFIG", &kubeconfig)
            .env("HOME", dir.path())
            .args(args);
        c
    };

    let cert = api.pki("apiserver.crt");
    let url = format!("{}/dashboard/", api.url);
    let artifacts = dir.path().join("artifacts");
    let n = servers;
    // The browser is driven by blocking calls: off the runtime's workers.
    let mut b = tokio::task::block_in_place(|| -> Result<Browser> {
        let mut b = Browser::start(&cert, &artifacts)?;
        b.ok(json!({"cmd": "open", "url": url}))?;
        b.until(
            "return document.querySelector('#login-user') !== null",
            60,
            "the login form",
        )?;
        b.log_in(USER, PASSWORD)?;
        b.until(
            &format!("return document.querySelectorAll('#list tbody tr').length === {n}"),
            120,
            "every server listed",
        )?;
        Ok(b)
    })?;

    println!(
        "First render of {n} servers of one project (each round: the page switches from another view to the servers list, which is one LIST then one WATCH; kubectl is a whole `kubectl get servers` process, as a user types it):"
    );
    println!();
    println!(
        "| round | dashboard: LIST + full render ms | kubectl get servers ms | kubectl -o json ms |"
    );
    println!("|---|---|---|---|");
    let (mut page, mut table, mut raw) = (Vec::new(), Vec::new(), Vec::new());
    for round in 1..=rounds {
        let shown = tokio::task::block_in_place(|| -> Result<Duration> {
            b.js("location.hash = '#keypairs'; return true")?;
            b.until(
                "return document.querySelector('#list-title').textContent.startsWith('Key pairs') && document.querySelector('#live').dataset.state === 'live'",
                60,
                "another view",
            )?;
            b.js(&format!(
                "window.__t1 = null; const t0 = performance.now(); location.hash = '#servers'; \
                 const check = () => {{ if (document.querySelectorAll('#list tbody tr').length === {n}) {{ window.__t1 = performance.now() - t0; }} else {{ requestAnimationFrame(check); }} }}; \
                 requestAnimationFrame(check); return true"
            ))?;
            let t = b.until("return window.__t1", 120, "the servers rendered")?["value"]
                .as_f64()
                .context("the render time")?;
            Ok(Duration::from_secs_f64(t / 1000.0))
        })?;
        let timed = |args: &[&str]| -> Result<Duration> {
            let start = Instant::now();
            let out = kubectl(args).output()?;
            let took = start.elapsed();
            if !out.status.success() {
                bail!("kubectl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
            }
            let lines = String::from_utf8_lossy(&out.stdout).lines().count();
            if args.contains(&"json") {
                if !String::from_utf8_lossy(&out.stdout).contains(&format!("srv-{:05}", n - 1)) {
                    bail!("kubectl's JSON lacks the last server");
                }
            } else if lines != n + 1 {
                bail!("kubectl printed {lines} lines for {n} servers");
            }
            Ok(took)
        };
        let t = timed(&["get", "servers"])?;
        let j = timed(&["get", "servers", "-o", "json"])?;
        println!("| {round} | {} | {} | {} |", ms(shown), ms(t), ms(j));
        page.push(shown);
        table.push(t);
        raw.push(j);
    }
    let (page, table, raw) = (median(page), median(table), median(raw));
    println!("| median | {} | {} | {} |", ms(page), ms(table), ms(raw));
    println!();
    println!(
        "Dashboard / kubectl get servers: {:.2}×; dashboard / kubectl -o json: {:.2}×",
        page.as_secs_f64() / table.as_secs_f64(),
        page.as_secs_f64() / raw.as_secs_f64()
    );

    // A change seen: a `kubectl get servers -w` runs beside the page; each write (a new
    // server, POSTed from this process) is timed from just before it is sent until its row
    // is in the page's DOM, and until kubectl prints its line.
    let mut watch = kubectl(&["get", "servers", "-w", "--no-headers", "-o", "name"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("run kubectl get -w")?;
    let seen: Arc<Mutex<Vec<(String, f64)>>> = Arc::default();
    {
        let seen = Arc::clone(&seen);
        let out = watch.stdout.take().context("kubectl's stdout")?;
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if let Ok(mut s) = seen.lock() {
                    s.push((line.trim().to_string(), epoch_ms()));
                }
            }
        });
    }
    // kubectl's first answer (its LIST) printed: it is watching.
    tokio::task::block_in_place(|| {
        wait_until(Duration::from_secs(60), "kubectl -w to list", || {
            let s = seen.lock().ok()?;
            (s.len() >= n).then_some(())
        })
    })?;
    let (mut page_lag, mut kubectl_lag) = (Vec::new(), Vec::new());
    for i in 0..changes {
        let name = format!("new-{i:04}");
        tokio::task::block_in_place(|| {
            b.js(&format!(
                "window.__seen = null; const check = () => {{ if (document.querySelector('#list tbody tr[data-name=\"{name}\"]')) {{ window.__seen = performance.timeOrigin + performance.now(); }} else {{ requestAnimationFrame(check); }} }}; requestAnimationFrame(check); return true"
            ))
        })?;
        let sent = epoch_ms();
        admin
            .request::<Value>(req(
                "POST",
                &servers_path,
                "application/json",
                server(&name).to_string().into_bytes(),
            )?)
            .await?;
        let in_page = tokio::task::block_in_place(|| {
            b.until("return window.__seen", 60, "the new row")
        })?["value"]
            .as_f64()
            .context("when the row was seen")?;
        let printed = tokio::task::block_in_place(|| {
            wait_until(Duration::from_secs(60), "kubectl -w to print it", || {
                let s = seen.lock().ok()?;
                s.iter()
                    .find(|(l, _)| l.ends_with(&format!("/{name}")))
                    .map(|(_, t)| *t)
            })
        })?;
        page_lag.push(Duration::from_secs_f64((in_page - sent).max(0.0) / 1000.0));
        kubectl_lag.push(Duration::from_secs_f64((printed - sent).max(0.0) / 1000.0));
    }
    let _ = watch.kill();
    let _ = watch.wait();
    println!();
    println!(
        "A change seen, {changes} new servers one at a time while {n} are listed (from just before the POST):"
    );
    println!();
    println!("| seen by | p50 ms | p99 ms |");
    println!("|---|---|---|");
    println!(
        "| dashboard (row in the page's DOM) | {} | {} |",
        ms(median(page_lag.clone())),
        ms(p99(page_lag.clone()))
    );
    println!(
        "| kubectl get servers -w (line printed) | {} | {} |",
        ms(median(kubectl_lag.clone())),
        ms(p99(kubectl_lag.clone()))
    );
    println!();
    println!(
        "Dashboard / kubectl -w (p50): {:.2}×",
        median(page_lag).as_secs_f64() / median(kubectl_lag).as_secs_f64().max(1e-9)
    );
    if stream_rate > 0 && stream_seconds > 0 {
        crate::dashboard_stream::run(
            crate::dashboard_stream::Stream {
                servers_path: &servers_path,
                servers: n,
                rate: stream_rate,
                seconds: stream_seconds,
            },
            &mut b,
            &admin,
            kubectl,
        )
        .await?;
    }
    tokio::task::block_in_place(|| drop(b));
    Ok(())
}
