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
