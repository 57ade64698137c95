//! Several API servers on one etcd: consistent reads and watches, no lost updates, and killing
//! one loses nothing.

use std::time::Duration;

use anyhow::{Context, Result};
use futures::{Stream, TryStreamExt};
use kube::api::{Api, Patch, PatchParams, PostParams, WatchEvent, WatchParams};
use serde_json::json;
use stratus_api_types::compute::Flavor;
use stratus_e2e::{Apiserver, Etcd};

/// The next event of `stream` that is not a bookmark (the test API servers send one a second
/// on a quiet watch, so one may come first on a loaded machine).
async fn next_change(
    stream: &mut (impl Stream<Item = kube::Result<WatchEvent<Flavor>>> + Unpin),
) -> Result<WatchEvent<Flavor>> {
    loop {
        match tokio::time::timeout(Duration::from_secs(60), stream.try_next())
            .await??
            .context("watch ended")?
        {
            WatchEvent::Bookmark(_) => continue,
            event => return Ok(event),
        }
    }
}

fn flavor(name: &str, vcpus: u32) -> Result<Flavor> {
    Ok(serde_json::from_value(json!({
        "apiVersion": "compute.stratus.dev/v1", "kind": "Flavor", "metadata": {"name": name},
        "spec": {"vcpus": vcpus, "ramMiB": 256, "diskGiB": 1}
    }))?)
}

#[tokio::test]
async fn two_replicas_share_one_etcd() -> Result<()> {
    let etcd = Etcd::start()?;
    let mut a = Apiserver::start(&etcd.endpoint)?;
    let b = Apiserver::start(&etcd.endpoint)?;
    let api_a: Api<Flavor> = Api::all(a.client().await?);
    let api_b: Api<Flavor> = Api::all(b.client().await?);

    // A write through A is read back through B at once.
    let created = api_a
        .create(&PostParams::default(), &flavor("shared", 1)?)
        .await?;
    let read = api_b.get("shared").await?;
    assert_eq!(
        read.metadata.resource_version,
        created.metadata.resource_version
    );

    // A watch through B sees writes through A, in order.
    let rv = created
        .metadata
        .resource_version
        .clone()
        .unwrap_or_default();
    let mut stream = Box::pin(
        api_b
            .watch(&WatchParams::default().timeout(90), &rv)
            .await?,
    );
    api_a
        .patch(
            "shared",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"vcpus": 2}})),
        )
        .await?;
    match next_change(&mut stream).await? {
        WatchEvent::Modified(f) => assert_eq!(f.spec.vcpus, 2),
        other => panic!("unexpected event {other:?}"),
    }

    // Concurrent read-modify-write increments through both replicas: conflicts are 409s and
    // are retried; no increment is lost.
    let workers = 8;
    let per_worker = 5;
    let mut tasks = Vec::new();
    for w in 0..workers {
        let api = if w % 2 == 0 {
            api_a.clone()
        } else {
            api_b.clone()
        };
        tasks.push(tokio::spawn(async move {
            let mut conflicts = 0u32;
            for _ in 0..per_worker {
                loop {
                    let mut f = api.get("shared").await?;
                    f.spec.vcpus += 1;
                    match api.replace("shared", &PostParams::default(), &f).await {
                        Ok(_) => break,
                        Err(kube::Error::Api(e)) if e.code == 409 => conflicts += 1,
                        Err(e) => return Err(anyhow::Error::new(e)),
                    }
                }
            }
            Ok::<u32, anyhow::Error>(conflicts)
        }));
    }
    let mut conflicts = 0;
    for t in tasks {
        conflicts += t.await??;
    }
    assert_eq!(
        api_b.get("shared").await?.spec.vcpus,
        2 + workers * per_worker,
        "an update was lost"
    );
    assert!(
        conflicts > 0,
        "8 concurrent writers never conflicted: the test proves nothing"
    );

    // Kill A right after acknowledged writes: B has every one of them.
    for i in 0..20 {
        api_a
            .create(&PostParams::default(), &flavor(&format!("burst-{i}"), 1)?)
            .await?;
    }
    a.proc.kill();
    let names: Vec<String> = api_b
        .list(&Default::default())
        .await?
        .items
        .into_iter()
        .filter_map(|f| f.metadata.name)
        .collect();
    for i in 0..20 {
        assert!(
            names.contains(&format!("burst-{i}")),
            "burst-{i} lost when its API server died"
        );
    }
    // Writes go on through B; A comes back and a watch through it resumes from an old revision.
    let before = api_b
        .list(&Default::default())
        .await?
        .metadata
        .resource_version
        .unwrap_or_default();
    api_b
        .patch(
            "shared",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"vcpus": 99}})),
        )
        .await?;
    a.restart()?;
    let api_a: Api<Flavor> = Api::all(a.client().await?);
    let mut stream = Box::pin(
        api_a
            .watch(&WatchParams::default().timeout(90), &before)
            .await?,
    );
    match next_change(&mut stream).await? {
        WatchEvent::Modified(f) => assert_eq!(
            (f.metadata.name.as_deref(), f.spec.vcpus),
            (Some("shared"), 99)
        ),
        other => panic!("unexpected event {other:?}"),
    }
    let lists = (
        a.kubectl_ok(&["get", "flavors", "-o", "name"])?,
        b.kubectl_ok(&["get", "flavors", "-o", "name"])?,
    );
    assert_eq!(lists.0, lists.1, "replicas disagree");
    Ok(())
}

/// What a token allows is remembered by each replica between requests, yet a change made
/// through one replica (a role assignment removed, the user disabled, the token revoked)
/// holds on the other from its very next request.
#[test]
fn a_change_to_a_users_access_through_one_replica_holds_at_once_on_the_other() -> Result<()> {
    let etcd = Etcd::start()?;
    let a = Apiserver::start(&etcd.endpoint)?;
    let b = Apiserver::start(&etcd.endpoint)?;
    a.projects(&["p"])?;
    let user = "apiVersion: identity.stratus.dev/v1\nkind: User\nmetadata:\n  name: una\nspec:\n  enabled: true\n";
    let role = "apiVersion: identity.stratus.dev/v1\nkind: RoleAssignment\nmetadata:\n  name: una-member\n  namespace: p\nspec:\n  user: una\n  role: member\n";
    a.kubectl_in(&["apply", "-f", "-"], user)?;
    a.kubectl_in(&["apply", "-f", "-"], role)?;
    let dir = tempfile::tempdir()?;
    let password = dir.path().join("password.json");
    std::fs::write(&password, json!({"password": "una-secret-pw"}).to_string())?;
    a.kubectl_ok(&[
        "replace",
        "--raw",
        "/apis/identity.stratus.dev/v1/users/una/password",
        "-f",
        &password.to_string_lossy(),
    ])?;
    let login = dir.path().join("login.json");
    std::fs::write(
        &login,
        json!({"user": "una", "password": "una-secret-pw"}).to_string(),
    )?;
    let answer: serde_json::Value = serde_json::from_str(&a.kubectl_ok(&[
        "create",
        "--raw",
        "/apis/identity.stratus.dev/v1/tokens",
        "-f",
        &login.to_string_lossy(),
    ])?)?;
    let token = answer["token"].as_str().context("no token")?.to_string();
    // Una's requests through B; the first of each pair reads her access, the second may
    // reuse it.
    let as_una = |args: &[&str]| {
        let mut all = vec!["--token", token.as_str()];
        all.extend_from_slice(args);
        b.kubectl(&all)
    };
    let allowed = |what: &str| -> Result<()> {
        for _ in 0..2 {
            let out = as_una(&["-n", "p", "get", "networks"])?;
            anyhow::ensure!(
                out.status.success(),
                "{what}: refused: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    };
    let refused = |what: &str, reason: &str| -> Result<()> {
        let out = as_una(&["-n", "p", "get", "networks"])?;
        let err = String::from_utf8_lossy(&out.stderr);
        anyhow::ensure!(
            !out.status.success() && err.contains(reason),
            "{what}: expected {reason}, got {}{err}",
            String::from_utf8_lossy(&out.stdout)
        );
        Ok(())
    };
    allowed("a member")?;
    a.kubectl_ok(&["-n", "p", "delete", "roleassignment", "una-member"])?;
    refused("her role assignment removed", "Forbidden")?;
    a.kubectl_in(&["apply", "-f", "-"], role)?;
    allowed("her role assignment back")?;
    let enable = |on: bool| {
        let patch = json!({"spec": {"enabled": on}}).to_string();
        a.kubectl_ok(&["patch", "user", "una", "--type", "merge", "-p", &patch])
    };
    enable(false)?;
    refused("disabled", "Unauthorized")?;
    enable(true)?;
    allowed("enabled again")?;
    // Her token revoked through A (logout).
    a.kubectl_ok(&[
        "--token",
        &token,
        "delete",
        "--raw",
        "/apis/identity.stratus.dev/v1/tokens/self",
    ])?;
    refused("her token revoked", "Unauthorized")?;
    Ok(())
}

/// `METHOD path` with a JSON body through `client` (whose admin token a login ignores): the
/// status code and the answer.
async fn send(
    client: &kube::Client,
    method: &str,
    path: &str,
    body: &serde_json::Value,
) -> Result<(u16, serde_json::Value)> {
    let req = http::Request::builder()
        .method(method)
        .uri(path)
        .header("Content-Type", "application/json")
        .body(serde_json::to_vec(body)?)?;
    let resp = client.send(req.map(kube::client::Body::from)).await?;
    let code = resp.status().as_u16();
    let bytes = http_body_util::BodyExt::collect(resp.into_body())
        .await?
        .to_bytes();
    Ok((code, serde_json::from_slice(&bytes).unwrap_or_default()))
}

/// Creates User `name` with `password`.
async fn user(client: &kube::Client, name: &str, password: &str) -> Result<()> {
    let u = json!({"apiVersion": "identity.stratus.dev/v1", "kind": "User",
        "metadata": {"name": name}, "spec": {"enabled": true}});
    let (code, answer) = send(client, "POST", "/apis/identity.stratus.dev/v1/users", &u).await?;
    anyhow::ensure!(code == 201, "create user {name}: {code} {answer}");
    let path = format!("/apis/identity.stratus.dev/v1/users/{name}/password");
    let (code, answer) = send(client, "PUT", &path, &json!({"password": password})).await?;
    anyhow::ensure!(code == 200, "set {name}'s password: {code} {answer}");
    Ok(())
}

/// `POST .../tokens` through curl (kube's client retries a 429): the status code and the
/// answer.
fn curl_login(replica: &Apiserver, user: &str, password: &str) -> Result<(u16, serde_json::Value)> {
    let ca = replica
        .kubeconfig()
        .parent()
        .context("the replica's directory")?
        .join("pki/ca.crt");
    let out = std::process::Command::new("curl")
        .args(["-sS", "--max-time", "120", "--cacert"])
        .arg(ca)
        .args([
            "-X",
            "POST",
            "-H",
            "Content-Type: application/json",
            "--data-binary",
        ])
        .arg(json!({"user": user, "password": password}).to_string())
        .args(["-w", "\n%{http_code}"])
        .arg(format!(
            "{}/apis/identity.stratus.dev/v1/tokens",
            replica.url
        ))
        .output()
        .context("run curl")?;
    anyhow::ensure!(
        out.status.success(),
        "curl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').context("no status code")?;
    Ok((
        code.trim().parse()?,
        serde_json::from_str(body).unwrap_or_default(),
    ))
}

/// The lockout and the source address's throttle hold over every replica: failures on A
/// count on B (3 failures in a row lock a user out, 6 in an hour from one address are
/// throttled: few, as each wrong password is a slow hash in a test build).
#[tokio::test]
async fn failed_logins_through_one_replica_lock_the_user_out_through_another() -> Result<()> {
    let etcd = Etcd::start()?;
    let flags = [
        "--lockout-failure-attempts",
        "3",
        "--login-source-failures",
        "6",
        "--login-source-window-seconds",
        "3600",
    ];
    let a = Apiserver::start_with_flags(&etcd.endpoint, &flags)?;
    let b = Apiserver::start_with_flags(&etcd.endpoint, &flags)?;
    let ca = a.client().await?;
    let password = "Lou-Correct-Horse-7731";
    user(&ca, "lou", password).await?;
    user(&ca, "max", "Max-Battery-Staple-42").await?;
    assert_eq!(curl_login(&b, "lou", password)?.0, 201, "lou logs in on B");

    // Three wrong passwords through A.
    for i in 0..3 {
        assert_eq!(curl_login(&a, "lou", &format!("wrong-{i}"))?.0, 401);
    }
    // Through B, lou is locked out: even the right password is refused, with the same 401.
    assert_eq!(curl_login(&b, "lou", password)?.0, 401, "locked out on B");
    assert_eq!(
        curl_login(&b, "max", "Max-Battery-Staple-42")?.0,
        201,
        "another user is not locked out"
    );

    // Made-up names (no User: the argon2 worst case) count against the address on every
    // replica: 3 failures so far, 3 more alternating between B and A make 6.
    for (i, replica) in [&b, &a, &b].into_iter().enumerate() {
        assert_eq!(curl_login(replica, &format!("ghost-{i}"), "guess")?.0, 401);
    }
    for replica in [&a, &b] {
        let (code, answer) = curl_login(replica, "max", "Max-Battery-Staple-42")?;
        assert_eq!(code, 429, "throttled on both replicas: {answer}");
        assert_eq!(answer["reason"], "TooManyRequests", "{answer}");
    }
    Ok(())
}
