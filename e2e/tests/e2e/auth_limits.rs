//! The API server's limits and login rules against a real `stratus up`, driven with curl,
//! kubectl, openssl and raw sockets: slow clients are cut off, failed logins lock a user out
//! (and are audited without their passwords), password changes, deleted users, disabled
//! projects, private flavors, and what only cluster admins write.

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use stratus_e2e::{Cloud, wait_until};

/// An HTTP answer: status code and body.
struct Answer {
    code: u16,
    body: String,
}

/// `METHOD path` with a JSON `body`, through curl with `token` (None: no credentials).
fn curl(
    cloud: &Cloud,
    token: Option<&str>,
    method: &str,
    path: &str,
    body: &str,
) -> Result<Answer> {
    curl_as(cloud, token, method, path, "application/json", body)
}

fn curl_as(
    cloud: &Cloud,
    token: Option<&str>,
    method: &str,
    path: &str,
    content_type: &str,
    body: &str,
) -> Result<Answer> {
    let file = tempfile::NamedTempFile::new()?;
    std::fs::write(file.path(), body)?;
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--max-time", "60", "--cacert"])
        .arg(cloud.dir.path().join("pki/ca.crt"))
        .args(["-X", method])
        .args(["-H", &format!("Content-Type: {content_type}")]);
    if let Some(t) = token {
        cmd.arg("-H").arg(format!("Authorization: Bearer {t}"));
    }
    if !body.is_empty() {
        cmd.arg("--data-binary")
            .arg(format!("@{}", file.path().display()));
    }
    let out = cmd
        .args(["-w", "\n%{http_code}"])
        .arg(format!("{}{path}", cloud.url))
        .output()
        .context("run curl")?;
    if !out.status.success() {
        bail!(
            "curl {method} {path}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').context("no status code")?;
    Ok(Answer {
        code: code.trim().parse().context("status code")?,
        body: body.to_string(),
    })
}

/// Asserts `answer` has `code` and its body mentions `says`.
fn expect(what: &str, answer: &Answer, code: u16, says: &str) -> Result<()> {
    if answer.code != code || !answer.body.contains(says) {
        bail!(
            "{what}: answered {} (wanted {code} saying {says:?}): {}",
            answer.code,
            answer.body
        );
    }
    Ok(())
}

/// The token-file token of the cloud's system admin.
fn admin_token(cloud: &Cloud) -> Result<String> {
    let text = std::fs::read_to_string(cloud.dir.path().join("tokens.csv"))?;
    text.lines()
        .filter_map(|l| l.split_once(','))
        .find(|(_, u)| u.trim() == "system:admin")
        .map(|(t, _)| t.trim().to_string())
        .context("no token for system:admin")
}

/// Creates user `name` (and, when `role` is given, that role in `project`) with password
/// `password`.
fn user(cloud: &Cloud, name: &str, role: Option<(&str, &str)>, password: &str) -> Result<()> {
    cloud.kubectl_in(
        &["apply", "-f", "-"],
        &format!("apiVersion: identity.stratus.dev/v1\nkind: User\nmetadata:\n  name: {name}\nspec:\n  enabled: true\n"),
    )?;
    if let Some((role, project)) = role {
        cloud.kubectl_in(
            &["apply", "-f", "-"],
            &format!("apiVersion: identity.stratus.dev/v1\nkind: RoleAssignment\nmetadata:\n  name: {name}-{role}\n  namespace: {project}\nspec:\n  user: {name}\n  role: {role}\n"),
        )?;
    }
    let set = curl(
        cloud,
        Some(&admin_token(cloud)?),
        "PUT",
        &format!("/apis/identity.stratus.dev/v1/users/{name}/password"),
        &json!({ "password": password }).to_string(),
    )?;
    expect(&format!("set {name}'s password"), &set, 200, "")
}

const TOKENS: &str = "/apis/identity.stratus.dev/v1/tokens";

/// Logs in as `name`: the token, or the refusal's status code.
fn login(cloud: &Cloud, name: &str, password: &str) -> Result<Result<String, u16>> {
    let a = curl(
        cloud,
        None,
        "POST",
        TOKENS,
        &json!({"user": name, "password": password}).to_string(),
    )?;
    if a.code != 201 {
        return Ok(Err(a.code));
    }
    let v: Value = serde_json::from_str(&a.body)?;
    Ok(Ok(v["token"].as_str().context("no token")?.to_string()))
}

fn logged_in(cloud: &Cloud, name: &str, password: &str) -> Result<String> {
    login(cloud, name, password)?.map_err(|code| anyhow::anyhow!("login of {name}: {code}"))
}

/// `GET path` with `token`: its status code.
fn get(cloud: &Cloud, token: &str, path: &str) -> Result<u16> {
    Ok(curl(cloud, Some(token), "GET", path, "")?.code)
}

/// The port of the cloud's API server.
fn port(cloud: &Cloud) -> Result<u16> {
    cloud
        .url
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .context("no port in the cloud's URL")
}

/// The header-read and TLS-handshake timeouts the test's server is given: long enough that
/// a request answered within [`AT_ONCE`] was not held up by the slow clients, however loaded
/// the machine.
const SLOW_TIMEOUT: Duration = Duration::from_secs(10);

/// Within this, a request is answered at once.
const AT_ONCE: Duration = Duration::from_secs(5);

/// A slow client is cut off before this: well under the idle timeout (90 s) a server without
/// the header and handshake timeouts would wait, and well over what a loaded machine adds to
/// them.
const CUT_OFF: Duration = Duration::from_secs(40);

/// When the test stops waiting for a slow client to be cut off.
const GIVE_UP: Duration = Duration::from_secs(60);

#[test]
fn slow_clients_are_cut_off_and_others_served() -> Result<()> {
    let timeout = SLOW_TIMEOUT.as_secs().to_string();
    let cloud = Cloud::up_with(&[
        "--header-read-timeout-seconds",
        &timeout,
        "--tls-handshake-timeout-seconds",
        &timeout,
    ])?;
    let port = port(&cloud)?;

    // A client that opens a connection and never starts TLS: closed after the handshake
    // timeout.
    let mut silent = std::net::TcpStream::connect(("127.0.0.1", port))?;
    silent.set_read_timeout(Some(GIVE_UP))?;
    let opened = Instant::now();
    // (Read on a thread of its own: when it is closed, whatever the rest takes meanwhile.)
    let silent = std::thread::spawn(move || {
        let mut buf = [0u8; 16];
        let read = silent.read(&mut buf);
        (read, opened.elapsed())
    });

    // A client that completes TLS and sends a request's head a header line at a time, never
    // ending it.
    let mut slow = Command::new("openssl")
        .args(["s_client", "-quiet", "-connect"])
        .arg(format!("127.0.0.1:{port}"))
        .arg("-CAfile")
        .arg(cloud.dir.path().join("pki/ca.crt"))
        .args(["-alpn", "http/1.1"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("run openssl s_client")?;
    let started = Instant::now();
    let mut head = slow.stdin.take().context("stdin")?;
    let mut slow_out = slow.stdout.take().context("stdout")?;
    // When the server closes it (s_client exits then), or None after `GIVE_UP`.
    let slow = std::thread::spawn(move || {
        let ended = loop {
            if let Ok(Some(_)) = slow.try_wait() {
                break Some(started.elapsed());
            }
            if started.elapsed() > GIVE_UP {
                let _ = slow.kill();
                break None;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut out = String::new();
        let _ = slow_out.read_to_string(&mut out);
        (ended, out)
    });
    let dripping = std::thread::spawn(move || {
        let _ = head.write_all(b"GET /readyz HTTP/1.1\r\nHost: stratus\r\n");
        for i in 0.. {
            if started.elapsed() > GIVE_UP {
                return;
            }
            std::thread::sleep(Duration::from_millis(250));
            if head
                .write_all(format!("X-Slow-{i}: {}\r\n", "a".repeat(8)).as_bytes())
                .and_then(|()| head.flush())
                .is_err()
            {
                return;
            }
        }
    });

    // Meanwhile, others are served at once, again and again.
    let token = admin_token(&cloud)?;
    for _ in 0..5 {
        let t = Instant::now();
        assert_eq!(
            get(&cloud, &token, "/apis/compute.stratus.dev/v1/flavors")?,
            200
        );
        assert!(t.elapsed() < AT_ONCE, "{:?}", t.elapsed());
        std::thread::sleep(Duration::from_millis(200));
    }

    // The slow client is closed after about the header timeout (from when its connection
    // opened), not at the idle timeout (90 s).
    let (ended, out) = slow
        .join()
        .map_err(|_| anyhow::anyhow!("the slow client's thread panicked"))?;
    let ended =
        ended.with_context(|| format!("the slow client was not cut off within {GIVE_UP:?}"))?;
    assert!(
        ended >= SLOW_TIMEOUT - Duration::from_secs(1) && ended < CUT_OFF,
        "cut off after {ended:?}"
    );
    assert!(
        !out.contains("HTTP/1.1 200"),
        "the slow request was answered: {out}"
    );
    let _ = dripping.join();

    let (read, closed) = silent
        .join()
        .map_err(|_| anyhow::anyhow!("the silent client's thread panicked"))?;
    assert!(
        matches!(read, Ok(0))
            || read
                .as_ref()
                .is_err_and(|e| e.kind() != std::io::ErrorKind::WouldBlock
                    && e.kind() != std::io::ErrorKind::TimedOut),
        "the silent connection: {read:?} after {closed:?}"
    );
    assert!(
        closed >= SLOW_TIMEOUT - Duration::from_secs(1) && closed < CUT_OFF,
        "the silent connection closed after {closed:?}"
    );

    // And the server still answers.
    assert_eq!(get(&cloud, &token, "/readyz")?, 200);
    Ok(())
}

/// The audit log's login events for `user`: each one's result annotation.
fn login_events(cloud: &Cloud, user: &str) -> Result<Vec<(String, u64)>> {
    let text = std::fs::read_to_string(cloud.dir.path().join("audit.log"))?;
    let mut out = Vec::new();
    for line in text.lines() {
        let ev: Value = serde_json::from_str(line).with_context(|| format!("not JSON: {line}"))?;
        let a = &ev["annotations"];
        if ev["requestURI"] == TOKENS && a["authentication.stratus.dev/user"] == user {
            out.push((
                a["authentication.stratus.dev/result"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                ev["responseStatus"]["code"].as_u64().unwrap_or_default(),
            ));
        }
    }
    Ok(out)
}

#[test]
fn failed_logins_lock_a_user_out_and_every_login_is_audited() -> Result<()> {
    let cloud = Cloud::up_with(&[
        "--lockout-failure-attempts",
        "3",
        "--lockout-duration-seconds",
        "20",
    ])?;
    cloud.projects(&["p"])?;
    let password = "Lou-Correct-Horse-7731";
    user(&cloud, "lou", Some(("member", "p")), password)?;
    let wrong = ["wrong-pw-alpha-1", "wrong-pw-bravo-2", "wrong-pw-charlie-3"];
    for w in wrong {
        assert_eq!(login(&cloud, "lou", w)?, Err(401), "{w}");
    }
    let last_failure = Instant::now();
    // Locked: even the right password is refused, with the same 401.
    assert_eq!(login(&cloud, "lou", password)?, Err(401), "locked out");
    // Another user is not locked out.
    user(&cloud, "other", None, "other-user-pw-99")?;
    logged_in(&cloud, "other", "other-user-pw-99")?;
    // Until the lockout ends (20 s after the last failure, long enough for the attempts
    // above on a loaded machine; the locked attempt does not extend it).
    let wait = Duration::from_millis(20500).saturating_sub(last_failure.elapsed());
    std::thread::sleep(wait);
    let token = logged_in(&cloud, "lou", password)?;
    assert_eq!(
        get(
            &cloud,
            &token,
            "/apis/network.stratus.dev/v1/namespaces/p/networks"
        )?,
        200
    );

    // Every attempt is in the audit log, with its result, and no password anywhere.
    let events = wait_until(
        Duration::from_secs(60),
        "the logins in the audit log",
        || login_events(&cloud, "lou").ok().filter(|e| e.len() >= 5),
    )?;
    let want: Vec<(String, u64)> = [
        ("failure", 401),
        ("failure", 401),
        ("failure", 401),
        ("locked", 401),
        ("success", 201),
    ]
    .iter()
    .map(|(r, c)| (r.to_string(), *c))
    .collect();
    assert_eq!(events, want);
    let log = std::fs::read_to_string(cloud.dir.path().join("audit.log"))?;
    for secret in wrong.iter().chain([&password, &"other-user-pw-99"]) {
        assert!(!log.contains(secret), "the audit log holds {secret:?}");
    }
    assert!(!log.contains(&token), "the audit log holds a token");
    Ok(())
}

#[test]
fn changing_a_password_needs_the_current_one_and_revokes_other_tokens() -> Result<()> {
    let cloud = Cloud::up()?;
    cloud.projects(&["p"])?;
    user(&cloud, "pam", Some(("member", "p")), "pam-first-password")?;
    let here = logged_in(&cloud, "pam", "pam-first-password")?;
    let there = logged_in(&cloud, "pam", "pam-first-password")?;
    const NETS: &str = "/apis/network.stratus.dev/v1/namespaces/p/networks";
    assert_eq!(get(&cloud, &there, NETS)?, 200);
    let path = "/apis/identity.stratus.dev/v1/users/pam/password";

    // Without the current password, or with a wrong one: refused, nothing changed.
    let a = curl(
        &cloud,
        Some(&here),
        "PUT",
        path,
        &json!({"password": "pam-stolen-password"}).to_string(),
    )?;
    expect("no current password", &a, 422, "currentPassword")?;
    let a = curl(
        &cloud,
        Some(&here),
        "PUT",
        path,
        &json!({"password": "pam-stolen-password", "currentPassword": "a-guess"}).to_string(),
    )?;
    expect("a wrong current password", &a, 422, "currentPassword")?;
    assert_eq!(login(&cloud, "pam", "pam-stolen-password")?, Err(401));
    assert_eq!(
        get(&cloud, &there, NETS)?,
        200,
        "the other token still works"
    );

    // With it: changed, and the other token stops working at once; this one goes on.
    let a = curl(
        &cloud,
        Some(&here),
        "PUT",
        path,
        &json!({"password": "pam-second-password", "currentPassword": "pam-first-password"})
            .to_string(),
    )?;
    expect("with the current password", &a, 200, "")?;
    assert_eq!(get(&cloud, &there, NETS)?, 401, "the other token");
    assert_eq!(get(&cloud, &here, NETS)?, 200, "the token that changed it");
    assert_eq!(login(&cloud, "pam", "pam-first-password")?, Err(401));
    logged_in(&cloud, "pam", "pam-second-password")?;
    Ok(())
}

#[test]
fn a_deleted_users_password_tokens_and_roles_do_not_pass_to_a_namesake() -> Result<()> {
    let cloud = Cloud::up()?;
    cloud.projects(&["p"])?;
    user(&cloud, "dee", Some(("admin", "p")), "dee-old-password")?;
    let old = logged_in(&cloud, "dee", "dee-old-password")?;
    const NETS: &str = "/apis/network.stratus.dev/v1/namespaces/p/networks";
    assert_eq!(get(&cloud, &old, NETS)?, 200);

    cloud.kubectl_ok(&["delete", "user", "dee"])?;
    assert_eq!(get(&cloud, &old, NETS)?, 401, "the deleted user's token");
    assert_eq!(login(&cloud, "dee", "dee-old-password")?, Err(401));
    // A new user of the same name, made at once (before anything is collected).
    cloud.kubectl_in(
        &["apply", "-f", "-"],
        "apiVersion: identity.stratus.dev/v1\nkind: User\nmetadata:\n  name: dee\nspec:\n  enabled: true\n",
    )?;
    assert_eq!(
        login(&cloud, "dee", "dee-old-password")?,
        Err(401),
        "the old password for the new user"
    );
    assert_eq!(
        get(&cloud, &old, NETS)?,
        401,
        "the old token for the new user"
    );
    let set = curl(
        &cloud,
        Some(&admin_token(&cloud)?),
        "PUT",
        "/apis/identity.stratus.dev/v1/users/dee/password",
        &json!({"password": "dee-new-password"}).to_string(),
    )?;
    expect("set the new dee's password", &set, 200, "")?;
    let new = logged_in(&cloud, "dee", "dee-new-password")?;
    // The old assignment grants the new user nothing, whether or not it is collected yet.
    assert_eq!(
        get(&cloud, &new, NETS)?,
        403,
        "the new user in the old user's project"
    );
    // And it goes with its user.
    wait_until(
        Duration::from_secs(90),
        "the old assignment to be collected",
        || {
            cloud
                .kubectl(&["-n", "p", "get", "roleassignment", "dee-admin"])
                .ok()
                .filter(|o| !o.status.success())
        },
    )?;
    assert_eq!(get(&cloud, &new, NETS)?, 403);
    assert_eq!(get(&cloud, &old, NETS)?, 401);
    Ok(())
}

#[test]
fn a_disabled_project_grants_nothing_until_enabled() -> Result<()> {
    let cloud = Cloud::up()?;
    cloud.projects(&["dp", "live"])?;
    user(&cloud, "mia", Some(("member", "dp")), "mia-password-1")?;
    cloud.kubectl_in(
        &["apply", "-f", "-"],
        "apiVersion: identity.stratus.dev/v1\nkind: RoleAssignment\nmetadata:\n  name: mia-member\n  namespace: live\nspec:\n  user: mia\n  role: member\n",
    )?;
    let mia = logged_in(&cloud, "mia", "mia-password-1")?;
    let nets = |p: &str| format!("/apis/network.stratus.dev/v1/namespaces/{p}/networks");
    assert_eq!(get(&cloud, &mia, &nets("dp"))?, 200);
    let enable = |on: bool| {
        cloud.kubectl_ok(&[
            "patch",
            "project",
            "dp",
            "--type",
            "merge",
            "-p",
            &json!({"spec": {"enabled": on}}).to_string(),
        ])
    };
    enable(false)?;
    assert_eq!(get(&cloud, &mia, &nets("dp"))?, 403, "a disabled project");
    let a = curl(
        &cloud,
        Some(&mia),
        "POST",
        &nets("dp"),
        &json!({"apiVersion": "network.stratus.dev/v1", "kind": "Network", "metadata": {"name": "n"}, "spec": {}}).to_string(),
    )?;
    expect("a create in a disabled project", &a, 403, "Forbidden")?;
    // Her other project is unaffected.
    assert_eq!(get(&cloud, &mia, &nets("live"))?, 200);
    enable(true)?;
    assert_eq!(get(&cloud, &mia, &nets("dp"))?, 200, "enabled again");
    Ok(())
}

fn server(name: &str, flavor: &str) -> String {
    json!({
        "apiVersion": "compute.stratus.dev/v1", "kind": "Server",
        "metadata": {"name": name, "namespace": "p"},
        "spec": {"flavor": flavor, "image": "cirros"},
    })
    .to_string()
}

const SERVERS: &str = "/apis/compute.stratus.dev/v1/namespaces/p/servers";

#[test]
fn a_private_flavor_is_for_cluster_admins_servers_only() -> Result<()> {
    let cloud = Cloud::up()?;
    cloud.projects(&["p"])?;
    user(&cloud, "fay", Some(("member", "p")), "fay-password-1")?;
    let fay = logged_in(&cloud, "fay", "fay-password-1")?;
    cloud.kubectl_in(
        &["apply", "-f", "-"],
        "apiVersion: compute.stratus.dev/v1\nkind: Flavor\nmetadata:\n  name: secret.large\nspec:\n  vcpus: 8\n  ramMiB: 16384\n  diskGiB: 80\n  isPublic: false\n---\napiVersion: compute.stratus.dev/v1\nkind: Flavor\nmetadata:\n  name: open.small\nspec:\n  vcpus: 1\n  ramMiB: 512\n  diskGiB: 1\n",
    )?;
    let a = curl(
        &cloud,
        Some(&fay),
        "POST",
        SERVERS,
        &server("s1", "secret.large"),
    )?;
    expect(
        "a member's server of a private flavor",
        &a,
        422,
        "spec.flavor",
    )?;
    cloud.kubectl_err(&["-n", "p", "get", "server", "s1"])?;
    // Nor by changing a server's flavor to it.
    let a = curl(
        &cloud,
        Some(&fay),
        "POST",
        SERVERS,
        &server("s2", "open.small"),
    )?;
    expect("a member's server of a public flavor", &a, 201, "")?;
    let a = curl_as(
        &cloud,
        Some(&fay),
        "PATCH",
        &format!("{SERVERS}/s2"),
        "application/merge-patch+json",
        r#"{"spec":{"flavor":"secret.large"}}"#,
    )?;
    expect(
        "a member's change to a private flavor",
        &a,
        422,
        "spec.flavor",
    )?;
    // A cluster admin's server may use it.
    let a = curl(
        &cloud,
        Some(&admin_token(&cloud)?),
        "POST",
        SERVERS,
        &server("s1", "secret.large"),
    )?;
    expect("an admin's server of a private flavor", &a, 201, "")?;
    let flavor = cloud.kubectl_ok(&[
        "-n",
        "p",
        "get",
        "server",
        "s2",
        "-o",
        "jsonpath={.spec.flavor}",
    ])?;
    assert_eq!(flavor, "open.small");
    Ok(())
}

#[test]
fn quotas_status_and_binding_are_cluster_admins_to_write() -> Result<()> {
    let cloud = Cloud::up()?;
    cloud.projects(&["p"])?;
    user(&cloud, "pat", Some(("admin", "p")), "pat-password-1")?;
    let pat = logged_in(&cloud, "pat", "pat-password-1")?;
    cloud.kubectl_in(
        &["apply", "-f", "-"],
        "apiVersion: compute.stratus.dev/v1\nkind: Flavor\nmetadata:\n  name: one\nspec:\n  vcpus: 1\n  ramMiB: 512\n  diskGiB: 1\n---\napiVersion: identity.stratus.dev/v1\nkind: Quota\nmetadata:\n  name: default\n  namespace: p\nspec:\n  limits:\n    vcpus: 2\n",
    )?;
    let a = curl(&cloud, Some(&pat), "POST", SERVERS, &server("s1", "one"))?;
    expect("the project admin's server", &a, 201, "")?;
    let read = |args: &[&str]| -> Result<Value> {
        let mut all = args.to_vec();
        all.extend(["-o", "json"]);
        Ok(serde_json::from_str(&cloud.kubectl_ok(&all)?)?)
    };
    let quota = || read(&["-n", "p", "get", "quota", "default"]);
    let before = quota()?["spec"].clone();
    let s1 =
        || -> Result<Value> { Ok(read(&["-n", "p", "get", "server", "s1"])?["status"].clone()) };

    const QUOTAS: &str = "/apis/identity.stratus.dev/v1/namespaces/p/quotas";
    // A new quota, and every way of editing the existing one.
    let a = curl(
        &cloud,
        Some(&pat),
        "POST",
        QUOTAS,
        &json!({"apiVersion": "identity.stratus.dev/v1", "kind": "Quota", "metadata": {"name": "more", "namespace": "p"}, "spec": {"limits": {"vcpus": 1000}}}).to_string(),
    )?;
    expect("a project admin's new quota", &a, 403, "Forbidden")?;
    let a = curl_as(
        &cloud,
        Some(&pat),
        "PATCH",
        &format!("{QUOTAS}/default"),
        "application/merge-patch+json",
        r#"{"spec":{"limits":{"vcpus":1000}}}"#,
    )?;
    expect("a project admin's quota patch", &a, 403, "Forbidden")?;
    let mut whole = quota()?;
    whole["spec"]["limits"]["vcpus"] = json!(1000);
    let a = curl(
        &cloud,
        Some(&pat),
        "PUT",
        &format!("{QUOTAS}/default"),
        &whole.to_string(),
    )?;
    expect("a project admin's quota replace", &a, 403, "Forbidden")?;
    let a = curl(
        &cloud,
        Some(&pat),
        "DELETE",
        &format!("{QUOTAS}/default"),
        "",
    )?;
    expect("a project admin's quota delete", &a, 403, "Forbidden")?;
    assert_eq!(quota()?["spec"], before, "the quota unchanged");
    cloud.kubectl_err(&["-n", "p", "get", "quota", "more"])?;
    // Under the quota, a server's flavor must exist.
    let a = curl(
        &cloud,
        Some(&pat),
        "POST",
        SERVERS,
        &server("s9", "no-such-flavor"),
    )?;
    expect(
        "a server of an unknown flavor under a quota",
        &a,
        422,
        "spec.flavor",
    )?;

    // A server's status and binding.
    let status_before = s1()?;
    let a = curl_as(
        &cloud,
        Some(&pat),
        "PATCH",
        &format!("{SERVERS}/s1/status"),
        "application/merge-patch+json",
        r#"{"status":{"phase":"Running"}}"#,
    )?;
    expect("a project admin's status patch", &a, 403, "Forbidden")?;
    let mut whole = read(&["-n", "p", "get", "server", "s1"])?;
    whole["status"]["phase"] = json!("Running");
    let a = curl(
        &cloud,
        Some(&pat),
        "PUT",
        &format!("{SERVERS}/s1/status"),
        &whole.to_string(),
    )?;
    expect("a project admin's status replace", &a, 403, "Forbidden")?;
    let a = curl(
        &cloud,
        Some(&pat),
        "POST",
        &format!("{SERVERS}/s1/binding"),
        &json!({"target": {"name": "chosen-node"}}).to_string(),
    )?;
    expect("a project admin's binding", &a, 403, "Forbidden")?;
    let status_after = s1()?;
    assert_ne!(status_after["hypervisor"], "chosen-node", "{status_after}");
    assert_ne!(status_after["phase"], "Running", "{status_after}");
    // (Only the controllers may have changed it meanwhile: no hypervisor is Ready, so it
    // stays unplaced.)
    assert_eq!(status_before["hypervisor"], status_after["hypervisor"]);
    // The cluster admin may.
    cloud.place("p", "s1", "chosen-node")?;
    assert_eq!(s1()?["hypervisor"], "chosen-node");
    Ok(())
}
