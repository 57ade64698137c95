//! What authentication and authorisation cost per request: the same GET through an API server
//! that checks a user's token and roles, through the same server with a system token, and
//! through one with authentication disabled, all on one etcd in one run.

use anyhow::{Context, Result};
use serde_json::{Value, json};

use crate::{drive, ms, req, stack, stats};

/// A kube-rs client for the server at `addr` with `token`.
async fn client_for(
    addr: std::net::SocketAddr,
    ca: &std::path::Path,
    token: &str,
    dir: &std::path::Path,
    name: &str,
) -> Result<kube::Client> {
    let text = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: b\n  cluster:\n    server: https://{addr}\n    certificate-authority: {}\nusers:\n- name: u\n  user:\n    token: {token}\ncontexts:\n- name: u@b\n  context:\n    cluster: b\n    user: u\ncurrent-context: u@b\n",
        ca.display()
    );
    let path = dir.join(format!("kubeconfig-{name}"));
    std::fs::write(&path, text)?;
    let kc = kube::config::Kubeconfig::read_from(&path)?;
    Ok(kube::Client::try_from(
        kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?,
    )?)
}

/// Runs the benchmark and prints its table.
pub async fn bench(requests: usize, levels: &[usize], other_users: usize) -> Result<()> {
    let s = stack().await?;
    let dir = tempfile::tempdir()?;
    let mut open = stratus_apiserver::Config::new(vec![s.etcd.endpoint.clone()]);
    open.listen = "127.0.0.1:0".parse()?;
    open.tls = Some((s.cert.clone(), s.key.clone()));
    open.auth_disabled = true;
    let open = stratus_apiserver::start(open).await?;

    // A member of project "bench" with a password, and the object she reads.
    let admin = &s.client;
    let send = |method: &str, path: &str, body: Value| {
        req(
            method,
            path,
            "application/json",
            body.to_string().into_bytes(),
        )
    };
    admin.request::<Value>(send("POST", "/apis/identity.stratus.dev/v1/projects", json!({"apiVersion": "identity.stratus.dev/v1", "kind": "Project", "metadata": {"name": "bench"}, "spec": {}}))?).await?;
    admin.request::<Value>(send("POST", "/apis/identity.stratus.dev/v1/users", json!({"apiVersion": "identity.stratus.dev/v1", "kind": "User", "metadata": {"name": "alice"}, "spec": {"enabled": true}}))?).await?;
    admin
        .request::<Value>(send("POST", "/apis/identity.stratus.dev/v1/namespaces/bench/roleassignments", json!({"apiVersion": "identity.stratus.dev/v1", "kind": "RoleAssignment", "metadata": {"name": "alice"}, "spec": {"user": "alice", "role": "member"}}))?)
        .await?;
    admin
        .request::<Value>(send(
            "PUT",
            "/apis/identity.stratus.dev/v1/users/alice/password",
            json!({"password": "bench-password"}),
        )?)
        .await?;
    admin
        .request::<Value>(send("POST", "/apis/network.stratus.dev/v1/namespaces/bench/networks", json!({"apiVersion": "network.stratus.dev/v1", "kind": "Network", "metadata": {"name": "n1"}, "spec": {}}))?)
        .await?;
    // Many other users with a role each: what a request's authorisation must not read. The
    // users first: an assignment names a User that exists.
    for assignments in [false, true] {
        let cl = admin.clone();
        drive(other_users, 16, move |i| {
            let cl = cl.clone();
            let name = format!("user-{i}");
            let request = if assignments {
                send("POST", "/apis/identity.stratus.dev/v1/namespaces/bench/roleassignments", json!({"apiVersion": "identity.stratus.dev/v1", "kind": "RoleAssignment", "metadata": {"name": name}, "spec": {"user": name, "role": "reader"}}))
            } else {
                send("POST", "/apis/identity.stratus.dev/v1/users", json!({"apiVersion": "identity.stratus.dev/v1", "kind": "User", "metadata": {"name": name}, "spec": {"enabled": true}}))
            };
            async move {
                cl.request::<Value>(request?)
                    .await
                    .map(|_| ())
                    .context("create another user")
            }
        })
        .await?;
    }
    // Logging in needs no credentials; the admin client's token is simply not looked at.
    let token: Value = admin
        .request(send(
            "POST",
            "/apis/identity.stratus.dev/v1/tokens",
            json!({"user": "alice", "password": "bench-password", "expirationSeconds": 3600}),
        )?)
        .await?;
    let token = token["token"]
        .as_str()
        .context("no token in the login answer")?;

    let user = client_for(s.addr, &s.ca, token, dir.path(), "alice").await?;
    let unauth = client_for(open.local_addr, &s.ca, "ignored", dir.path(), "open").await?;
    const GET: &str = "/apis/network.stratus.dev/v1/namespaces/bench/networks/n1";
    println!("| concurrency | path | GETs/s | p50 ms | p99 ms |");
    println!("|---|---|---|---|---|");
    let mut summary = Vec::new();
    for &c in levels {
        let mut p50s = Vec::new();
        for (label, client) in [
            ("authentication disabled", &unauth),
            ("system token (token file)", admin),
            ("user token + role check", &user),
        ] {
            for (n, keep) in [(200, false), (requests, true)] {
                let cl = client.clone();
                let (lat, wall) = drive(n, c, move |_| {
                    let cl = cl.clone();
                    async move {
                        cl.request::<Value>(req("GET", GET, "application/json", vec![])?)
                            .await
                            .map(|_| ())
                            .context("GET")
                    }
                })
                .await?;
                if keep {
                    let st = stats(lat, wall);
                    println!(
                        "| {c} | {label} | {:.0} | {} | {} |",
                        st.per_sec,
                        ms(st.p50),
                        ms(st.p99)
                    );
                    p50s.push(st.p50);
                }
            }
        }
        let ms_of = |d: std::time::Duration| d.as_secs_f64() * 1000.0;
        summary.push(format!(
            "concurrency {c}: a user token and role check add {:+.2} ms at p50 over no authentication (a system token {:+.2} ms)",
            ms_of(p50s[2]) - ms_of(p50s[0]),
            ms_of(p50s[1]) - ms_of(p50s[0])
        ));
    }
    println!();
    for line in summary {
        println!("{line}");
    }
    Ok(())
}

/// Whose password the clients of one measurement get wrong.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Names {
    /// One existing user's (locked out after the first failures).
    OneUser,
    /// A user name of each client's own.
    PerClient,
    /// A new unknown name on every attempt: no lockout ever applies.
    New,
    /// No login at all: the clients `GET /readyz` in the same loop (a control: what the same
    /// number of requests costs when none is a login).
    Readyz,
}

/// What the clients of one measurement send, and the login policy of the API server they
/// send it to.
#[derive(Clone, Copy)]
struct Burst {
    label: &'static str,
    names: Names,
    /// Whether failed logins are throttled per source address (the default); without it the
    /// clients are as if each came from addresses of its own.
    per_address: bool,
}

const BURSTS: [Burst; 6] = [
    Burst {
        label: "one user (locked out), default policy",
        names: Names::OneUser,
        per_address: true,
    },
    Burst {
        label: "one name per client, default policy",
        names: Names::PerClient,
        per_address: true,
    },
    Burst {
        label: "one user (locked out), no per-address limit",
        names: Names::OneUser,
        per_address: false,
    },
    Burst {
        label: "one name per client (locked out), no per-address limit",
        names: Names::PerClient,
        per_address: false,
    },
    Burst {
        label: "a new unknown name each attempt, no per-address limit",
        names: Names::New,
        per_address: false,
    },
    Burst {
        label: "control: GET /readyz in the same loop, no login",
        names: Names::Readyz,
        per_address: true,
    },
];

/// An HTTPS client of its own (HTTP/1.1, so a connection of its own): one wrong-password
/// client.
fn own_client(
    ca: &std::path::Path,
) -> Result<
    hyper_util::client::legacy::Client<
        hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
        http_body_util::Full<bytes::Bytes>,
    >,
> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut std::io::BufReader::new(std::fs::File::open(ca)?)) {
        roots.add(cert?)?;
    }
    let tls = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
    http.set_nodelay(true);
    http.enforce_http(false);
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only()
        .enable_http1()
        .wrap_connector(http);
    Ok(
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build(https),
    )
}

/// Rounds of each kind of burst: the GETs alone and in the burst are measured by turns.
const ROUNDS: usize = 5;

/// The latency of an authorised user's `GET` alone and while `clients` tasks post wrong
/// passwords in a loop (pausing `pause_ms` after each answer; 0: none), for each kind of
/// burst, each on a fresh API server (fresh lockouts and per-address counts) on one etcd:
/// [`ROUNDS`] measurements alone and as many in the burst, by turns, `requests` GETs in all
/// for each.
pub async fn login_burst(requests: usize, clients: usize, pause_ms: u64) -> Result<()> {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    let s = stack().await?;
    let dir = tempfile::tempdir()?;
    let admin = &s.client;
    let send = |method: &str, path: &str, body: Value| {
        req(
            method,
            path,
            "application/json",
            body.to_string().into_bytes(),
        )
    };
    admin.request::<Value>(send("POST", "/apis/identity.stratus.dev/v1/projects", json!({"apiVersion": "identity.stratus.dev/v1", "kind": "Project", "metadata": {"name": "bench"}, "spec": {}}))?).await?;
    for name in ["alice", "victim"] {
        admin.request::<Value>(send("POST", "/apis/identity.stratus.dev/v1/users", json!({"apiVersion": "identity.stratus.dev/v1", "kind": "User", "metadata": {"name": name}, "spec": {"enabled": true}}))?).await?;
        admin
            .request::<Value>(send("POST", "/apis/identity.stratus.dev/v1/namespaces/bench/roleassignments", json!({"apiVersion": "identity.stratus.dev/v1", "kind": "RoleAssignment", "metadata": {"name": name}, "spec": {"user": name, "role": "member"}}))?)
            .await?;
        admin
            .request::<Value>(send(
                "PUT",
                &format!("/apis/identity.stratus.dev/v1/users/{name}/password"),
                json!({"password": format!("{name}-bench-password")}),
            )?)
            .await?;
    }
    admin
        .request::<Value>(send("POST", "/apis/network.stratus.dev/v1/namespaces/bench/networks", json!({"apiVersion": "network.stratus.dev/v1", "kind": "Network", "metadata": {"name": "n1"}, "spec": {}}))?)
        .await?;
    let token: Value = admin
        .request(send(
            "POST",
            "/apis/identity.stratus.dev/v1/tokens",
            json!({"user": "alice", "password": "alice-bench-password", "expirationSeconds": 3600}),
        )?)
        .await?;
    let token = token["token"]
        .as_str()
        .context("no token in the login answer")?
        .to_string();
    let policy = stratus_apiserver::policy::identity::LoginPolicy::default();
    println!(
        "Login policy: lockout after {} failures, {} failures per address per {} s, {} hashing thread(s), a queue of {}; {clients} wrong-password clients (each pausing {pause_ms} ms after each answer), {requests} GETs of one Network by a member (one client, one at a time) alone and as many in the burst, by turns in {ROUNDS} rounds.",
        policy.lockout_failure_attempts,
        policy.source_failure_attempts,
        policy.source_window.as_secs(),
        policy.hash_threads,
        policy.hash_queue,
    );
    println!();
    println!(
        "| {clients} clients in a loop | GET p50 ms alone | p99 alone | p50 in burst | p99 in burst | p99 ratio | requests/s of the burst | 401 (200 for /readyz) | 429 |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    const GET: &str = "/apis/network.stratus.dev/v1/namespaces/bench/networks/n1";
    const TOKENS: &str = "/apis/identity.stratus.dev/v1/tokens";
    let mut ratios = Vec::new();
    let tls = s.etcd.client_tls();
    let store = stratus_apiserver::storage::store::Store::connect_with(
        std::slice::from_ref(&s.etcd.endpoint),
        tls.as_ref(),
    )
    .await?;
    for (k, burst) in BURSTS.iter().enumerate() {
        // Failed logins are counted in etcd for every replica: each burst starts with none
        // (no lockout or per-address count left by the one before).
        let counts = store.keys("/stratus/_system/logins/").await?;
        let forget: Vec<&str> = counts.iter().map(String::as_str).collect();
        for chunk in forget.chunks(64) {
            store.write_many(&[], &[], chunk).await?;
        }
        let mut cfg = stratus_apiserver::Config::new(vec![s.etcd.endpoint.clone()]);
        cfg.etcd_tls = s.etcd.client_tls();
        cfg.listen = "127.0.0.1:0".parse()?;
        cfg.tls = Some((s.cert.clone(), s.key.clone()));
        if !burst.per_address {
            cfg.login.source_failure_attempts = 0;
        }
        let server = stratus_apiserver::start(cfg).await?;
        let addr = server.local_addr;
        let user = client_for(addr, &s.ca, &token, dir.path(), &format!("alice-{k}")).await?;
        let measure = |n: usize| {
            let cl = user.clone();
            drive(n, 1, move |_| {
                let cl = cl.clone();
                async move {
                    cl.request::<Value>(req("GET", GET, "application/json", vec![])?)
                        .await
                        .map(|_| ())
                        .context("GET")
                }
            })
        };
        measure(200).await?;
        // Alone and in the burst by turns, ROUNDS times each, so that what else the machine
        // runs meanwhile weighs on both alike.
        let per_round = requests.div_ceil(ROUNDS);
        let (mut lat_alone, mut wall_alone) = (Vec::new(), std::time::Duration::ZERO);
        let (mut lat_burst, mut wall_burst) = (Vec::new(), std::time::Duration::ZERO);
        let counts = Arc::new([
            AtomicUsize::new(0),
            AtomicUsize::new(0),
            AtomicUsize::new(0),
        ]);
        let attempts = Arc::new(AtomicUsize::new(0));
        let (mut during, mut burst_time) = (0, std::time::Duration::ZERO);
        for _ in 0..ROUNDS {
            let (lat, wall) = measure(per_round).await?;
            lat_alone.extend(lat);
            wall_alone += wall;

            let stop = Arc::new(AtomicBool::new(false));
            let mut tasks = Vec::new();
            for c in 0..clients {
                let (stop, counts, attempts) = (stop.clone(), counts.clone(), attempts.clone());
                let client = own_client(&s.ca)?;
                let burst = *burst;
                tasks.push(tokio::spawn(async move {
                    while !stop.load(Ordering::Relaxed) {
                        let n = attempts.fetch_add(1, Ordering::Relaxed);
                        let name = match burst.names {
                            Names::OneUser => "victim".to_string(),
                            Names::PerClient => format!("burst-{k}-{c}"),
                            Names::New => format!("burst-{k}-{n}"),
                            Names::Readyz => String::new(),
                        };
                        let request = if burst.names == Names::Readyz {
                            http::Request::builder()
                                .uri(format!("https://{addr}/readyz"))
                                .body(http_body_util::Full::new(bytes::Bytes::new()))?
                        } else {
                            let body =
                                json!({"user": name, "password": "not-the-password"}).to_string();
                            http::Request::builder()
                                .method("POST")
                                .uri(format!("https://{addr}{TOKENS}"))
                                .header("Content-Type", "application/json")
                                .body(http_body_util::Full::new(bytes::Bytes::from(body)))?
                        };
                        let answer = client.request(request).await?;
                        let slot = match answer.status().as_u16() {
                            401 => 0,
                            429 => 1,
                            200 if burst.names == Names::Readyz => 0,
                            _ => 2,
                        };
                        counts[slot].fetch_add(1, Ordering::Relaxed);
                        http_body_util::BodyExt::collect(answer.into_body()).await?;
                        if pause_ms > 0 {
                            tokio::time::sleep(std::time::Duration::from_millis(pause_ms)).await;
                        }
                    }
                    Ok::<_, anyhow::Error>(())
                }));
            }
            // The burst under way (the first failures, lockouts and per-address counts
            // included).
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            let started = std::time::Instant::now();
            let before = attempts.load(Ordering::Relaxed);
            let (lat, wall) = measure(per_round).await?;
            during += attempts.load(Ordering::Relaxed) - before;
            burst_time += started.elapsed();
            lat_burst.extend(lat);
            wall_burst += wall;
            // Every client's last login answered: nothing of the burst is left queued when
            // the next round measures alone.
            stop.store(true, Ordering::Relaxed);
            for t in tasks {
                t.await??;
            }
        }
        let rate = during as f64 / burst_time.as_secs_f64();
        let alone = stats(lat_alone, wall_alone);
        let inburst = stats(lat_burst, wall_burst);
        let ratio = inburst.p99.as_secs_f64() / alone.p99.as_secs_f64().max(1e-9);
        let [unauthorized, throttled, other] = counts.as_ref();
        anyhow::ensure!(
            other.load(Ordering::Relaxed) == 0,
            "{}: a request answered other than 401 or 429 (200 for /readyz)",
            burst.label
        );
        println!(
            "| {} | {} | {} | {} | {} | {ratio:.2}× | {rate:.0} | {} | {} |",
            burst.label,
            ms(alone.p50),
            ms(alone.p99),
            ms(inburst.p50),
            ms(inburst.p99),
            unauthorized.load(Ordering::Relaxed),
            throttled.load(Ordering::Relaxed),
        );
        ratios.push((burst.label, ratio));
    }
    println!();
    for (label, ratio) in ratios {
        let verdict = if ratio <= 2.0 { "within" } else { "NOT within" };
        println!("{label}: GET p99 in the burst is {ratio:.2}× alone ({verdict} the goal of 2×)");
    }
    Ok(())
}
