//! The web dashboard: its assets as the API server serves them (anonymously, under a strict
//! Content-Security-Policy), and the page in a real headless Chromium (Selenium) against a
//! real `stratus up`, logged in as a project member: lists that follow the API's watches,
//! the server detail, hostile text shown as text, the project switcher, a watch resumed
//! after the cloud restarts, and logging out.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use base64::Engine;
use serde_json::{Value, json};
use stratus_e2e::browser::{Browser, field_error, text_of};
use stratus_e2e::{Apiserver, Cloud, Etcd, repo_root, wait_until};

const POLICY: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'";

/// An HTTP answer through curl: status, headers (lower-case names) and body.
struct Answer {
    code: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// `METHOD url` through curl, trusting `ca`, with `token` and a JSON `body` when given.
fn curl(
    ca: &Path,
    method: &str,
    url: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> Result<Answer> {
    let dir = tempfile::tempdir()?;
    let head = dir.path().join("head");
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--path-as-is", "--max-time", "60", "--cacert"])
        .arg(ca)
        .args(["-X", method, "-D"])
        .arg(&head)
        .args(["-o", "-", "-w", "\n%{http_code}"]);
    if let Some(t) = token {
        cmd.arg("-H").arg(format!("Authorization: Bearer {t}"));
    }
    if let Some(b) = body {
        let file = dir.path().join("body");
        std::fs::write(&file, b)?;
        cmd.args(["-H", "Content-Type: application/json", "--data-binary"])
            .arg(format!("@{}", file.display()));
    }
    let out = cmd.arg(url).output().context("run curl")?;
    if !out.status.success() {
        bail!(
            "curl {method} {url}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').context("no status code")?;
    let headers = std::fs::read_to_string(&head)?
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Ok(Answer {
        code: code.trim().parse().context("status code")?,
        headers,
        body: body.to_string(),
    })
}

#[test]
fn assets_are_served_to_anyone_under_a_strict_policy_and_nothing_else_is() -> Result<()> {
    let etcd = Etcd::start()?;
    let api = Apiserver::start_on(&etcd)?;
    let ca = api
        .kubeconfig()
        .parent()
        .context("the API server's directory")?
        .join("pki/ca.crt");
    let get = |path: &str| curl(&ca, "GET", &format!("{}{path}", api.url), None, None);

    // Without any credential: the page and its scripts and styles, each with its type.
    for (path, content_type, says) in [
        (
            "/dashboard/",
            "text/html",
            "<script type=\"module\" src=\"app.js\">",
        ),
        ("/dashboard/index.html", "text/html", "id=\"login\""),
        ("/dashboard/app.js", "text/javascript", "import"),
        (
            "/dashboard/informer.js",
            "text/javascript",
            "allowWatchBookmarks",
        ),
        ("/dashboard/style.css", "text/css", "[hidden]"),
    ] {
        let a = get(path)?;
        assert_eq!(a.code, 200, "{path}: {}", a.body);
        assert!(
            a.header("content-type")
                .is_some_and(|t| t.starts_with(content_type)),
            "{path}: {:?}",
            a.header("content-type")
        );
        assert_eq!(a.header("content-security-policy"), Some(POLICY), "{path}");
        assert_eq!(
            a.header("x-content-type-options"),
            Some("nosniff"),
            "{path}"
        );
        assert!(a.body.contains(says), "{path} holds {says:?}");
    }
    // Only the listed assets: no other file, no way out of the folder, no writes.
    for path in [
        "/dashboard/nope.js",
        "/dashboard/../Cargo.toml",
        "/dashboard/%2e%2e/%2e%2e/etc/passwd",
        "/dashboard/src/lib.rs",
        "/dashboard/assets/app.js",
    ] {
        let a = get(path)?;
        assert_eq!(a.code, 404, "{path}: {}", a.body);
        assert_eq!(a.header("content-security-policy"), Some(POLICY), "{path}");
        let status: Value = serde_json::from_str(&a.body).context("a Status")?;
        assert_eq!(status["kind"], "Status", "{path}");
    }
    let post = curl(
        &ca,
        "POST",
        &format!("{}/dashboard/app.js", api.url),
        None,
        Some("{}"),
    )?;
    assert_eq!(post.code, 405, "{}", post.body);
    let bare = get("/dashboard")?;
    assert_eq!(bare.code, 308);
    assert_eq!(bare.header("location"), Some("/dashboard/"));
    // The API itself still wants credentials.
    let anonymous = get("/apis/compute.stratus.dev/v1/flavors")?;
    assert_eq!(anonymous.code, 401, "{}", anonymous.body);
    Ok(())
}

/// Sets `user`'s password as the cloud's system admin.
fn set_password(cloud: &Cloud, user: &str, password: &str) -> Result<()> {
    let set = curl(
        &cloud.dir.path().join("pki/ca.crt"),
        "PUT",
        &format!(
            "{}/apis/identity.stratus.dev/v1/users/{user}/password",
            cloud.url
        ),
        Some(&admin_token(cloud)?),
        Some(&json!({ "password": password }).to_string()),
    )?;
    assert_eq!(set.code, 200, "set {user}'s password: {}", set.body);
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

fn server(name: &str, namespace: &str, description: &str) -> String {
    format!(
        "apiVersion: compute.stratus.dev/v1\nkind: Server\nmetadata:\n  name: {name}\n  namespace: {namespace}\nspec:\n  flavor: dash.small\n  image: cirros\n  description: {}\n",
        serde_json::to_string(description).unwrap_or_default()
    )
}

fn event(name: &str, server: &str, reason: &str, message: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Event\nmetadata:\n  name: {name}\n  namespace: dash-a\ninvolvedObject:\n  apiVersion: compute.stratus.dev/v1\n  kind: Server\n  name: {server}\n  namespace: dash-a\nreason: {reason}\nmessage: {}\ntype: Normal\nsource:\n  component: e2e\nfirstTimestamp: \"2026-01-01T00:00:00Z\"\nlastTimestamp: \"2026-01-01T00:00:00Z\"\ncount: 1\n",
        serde_json::to_string(message).unwrap_or_default()
    )
}

/// What a user would type to attack the page, in a description (schema: at most 255 bytes).
const HOSTILE: &str =
    "<img src=x onerror=\"window.__xss=1\"><script>window.__xss=2</script>&lt;b&gt;";

#[test]
fn a_member_follows_servers_live_in_a_real_browser() -> Result<()> {
    let mut cloud = Cloud::up()?;
    let dashboard = format!("{}/dashboard/", cloud.url);
    wait_until(
        Duration::from_secs(30),
        "stratus up to print the dashboard's URL",
        || {
            cloud
                .log()
                .contains(&format!("Dashboard: {dashboard}"))
                .then_some(())
        },
    )?;
    cloud.projects(&["dash-a", "dash-b", "dash-c"])?;
    // Dana is a member of dash-a (her default project) and dash-b, and has no role in dash-c.
    cloud.kubectl_in(
        &["apply", "-f", "-"],
        "apiVersion: identity.stratus.dev/v1\nkind: User\nmetadata:\n  name: dana\nspec:\n  enabled: true\n  defaultProject: dash-a\n---\napiVersion: identity.stratus.dev/v1\nkind: RoleAssignment\nmetadata:\n  name: dana-member\n  namespace: dash-a\nspec:\n  user: dana\n  role: member\n---\napiVersion: identity.stratus.dev/v1\nkind: RoleAssignment\nmetadata:\n  name: dana-member\n  namespace: dash-b\nspec:\n  user: dana\n  role: member\n---\napiVersion: compute.stratus.dev/v1\nkind: Flavor\nmetadata:\n  name: dash.small\nspec:\n  vcpus: 1\n  ramMiB: 256\n  diskGiB: 1\n",
    )?;
    let password = "dana-Correct-Horse-4412";
    set_password(&cloud, "dana", password)?;
    // Who she is, as `kubectl auth whoami` asks the API (a SelfSubjectReview): her name and,
    // once her role assignments are in force, the projects she has a role in, not dash-c.
    let token = token_of(&cloud, "dana", password)?;
    let whoami = wait_until(
        Duration::from_secs(60),
        "dana's two projects in whoami",
        || {
            let out = cloud
                .kubectl_ok(&["--token", &token, "auth", "whoami", "-o", "json"])
                .ok()?;
            let review: Value = serde_json::from_str(&out).ok()?;
            (review["status"]["userInfo"]["extra"]["projects.stratus.dev/member-of"]
                == json!(["dash-a", "dash-b"]))
            .then_some(review)
        },
    )?;
    assert_eq!(whoami["kind"], "SelfSubjectReview", "{whoami}");
    assert_eq!(whoami["status"]["userInfo"]["username"], "dana", "{whoami}");
    let table = cloud.kubectl_ok(&["--token", &token, "auth", "whoami"])?;
    assert!(
        table
            .lines()
            .any(|l| l.split_whitespace().eq(["Username", "dana"])),
        "{table}"
    );
    // `kubectl api-resources` names the review whoami asks, as kube-apiserver's discovery does.
    let reviews = cloud.kubectl_ok(&[
        "api-resources",
        "--api-group=authentication.k8s.io",
        "-o",
        "wide",
    ])?;
    assert!(
        reviews.lines().any(|l| l.split_whitespace().eq([
            "selfsubjectreviews",
            "authentication.k8s.io/v1",
            "false",
            "SelfSubjectReview",
            "create"
        ])),
        "{reviews}"
    );
    // Another project's server, which Dana must never see.
    cloud.kubectl_in(
        &["apply", "-f", "-"],
        &server("secret-web", "dash-c", "not for dana"),
    )?;

    let artifacts = repo_root().join("target/e2e-artifacts/dashboard");
    let mut b = Browser::open_at(&cloud, &dashboard, &artifacts)?;

    // A wrong password: refused on the page, nothing shown.
    b.ok(json!({"cmd": "type", "css": "#login-user", "text": "dana"}))?;
    b.ok(json!({"cmd": "type", "css": "#login-password", "text": "not-her-password"}))?;
    b.ok(json!({"cmd": "click", "css": "#login button[type=submit]"}))?;
    b.until(
        "return document.querySelector('#login-error').textContent === 'Wrong user name or password.'",
        30,
        "the login to be refused",
    )?;
    assert_eq!(
        b.js("return document.querySelector('#app-view').hidden")?,
        true
    );

    b.log_in("dana", password)?;
    assert_eq!(
        b.js("return document.querySelector('#user').textContent")?,
        "dana"
    );
    assert_eq!(
        b.js("return document.querySelector('#project').value")?,
        "dash-a",
        "her default project is open"
    );
    assert_eq!(
        b.js("return [...document.querySelectorAll('#project option')].map((o) => o.value)")?,
        json!(["dash-a", "dash-b"]),
        "the switcher offers her two projects, not dash-c"
    );
    assert_eq!(
        b.js("return document.querySelectorAll('#list tbody tr').length")?,
        0
    );
    // A mark a reload would wipe.
    b.js("window.__stillThisPage = 'yes'; return true")?;

    // A server created with kubectl appears in the open list without a reload, through the
    // watch (the list was made once).
    cloud.kubectl_in(&["apply", "-f", "-"], &server("web-1", "dash-a", HOSTILE))?;
    let seen = b.row("web-1", None, 20)?;
    eprintln!(
        "web-1 appeared in the browser {} ms after kubectl returned",
        seen["ms"]
    );
    // The aim is within 1 s (the figure above is what this machine did); the bound asserted
    // is 5 s, for a loaded 2-core machine.
    let ms = seen["ms"].as_u64().context("the row's latency")?;
    assert!(ms <= 5000, "web-1 took {ms} ms to appear");
    assert_eq!(seen["cells"]["phase"], "Pending", "{seen}");
    assert_eq!(seen["cells"]["flavor"], "dash.small", "{seen}");
    assert_eq!(seen["cells"]["image"], "cirros", "{seen}");
    // Its phase and node change live when it is placed.
    cloud.place("dash-a", "web-1", "hv-dash")?;
    let placed = b.row("web-1", Some(("phase", "Scheduled")), 20)?;
    assert_eq!(placed["cells"]["node"], "hv-dash", "{placed}");
    assert_eq!(b.js("return window.__stillThisPage")?, "yes", "no reload");
    assert_eq!(
        b.js("return document.querySelector('#live').dataset.lists")?,
        "1",
        "one LIST, then the watch"
    );
    b.ok(json!({"cmd": "screenshot", "name": "servers"}))?;

    // The detail: the hostile description is text, nothing in it ran or became an element.
    b.ok(json!({"cmd": "click", "css": "#list tbody tr[data-name='web-1'] a"}))?;
    b.until(
        "const d = document.querySelector('#detail-fields dd[data-field=description]'); return d && d.textContent",
        20,
        "the server's detail",
    )?;
    assert_eq!(
        b.js(
            "return document.querySelector('#detail-fields dd[data-field=description]').textContent"
        )?,
        HOSTILE
    );
    assert_eq!(
        b.js("return document.querySelectorAll('main img, main script').length")?,
        0
    );
    assert_eq!(
        b.js("return window.__xss === undefined")?,
        true,
        "no script ran"
    );
    b.until(
        "return [...document.querySelectorAll('#conditions tbody tr')].some((r) => r.dataset.type === 'Scheduled' && r.children[1].textContent === 'True')",
        20,
        "the Scheduled condition",
    )?;
    // Events of this server arrive live; another server's do not.
    cloud.kubectl_in(
        &["create", "-f", "-"],
        &event("web-1.probe", "web-1", "Probed", "<b>looked at</b> by e2e"),
    )?;
    cloud.kubectl_in(
        &["create", "-f", "-"],
        &event("other.probe", "web-9", "Elsewhere", "not web-1's"),
    )?;
    b.until(
        "return [...document.querySelectorAll('#events tbody tr')].some((r) => r.dataset.reason === 'Probed' && r.querySelector('[data-col=message]').textContent === '<b>looked at</b> by e2e')",
        20,
        "web-1's event",
    )?;
    assert_eq!(
        b.js("return [...document.querySelectorAll('#events tbody tr')].map((r) => r.dataset.reason).includes('Elsewhere')")?,
        false
    );
    assert_eq!(
        b.js("return document.querySelectorAll('#events b').length")?,
        0
    );
    b.ok(json!({"cmd": "screenshot", "name": "server-detail"}))?;
    b.ok(json!({"cmd": "click", "css": "#detail-view a[href='#servers']"}))?;
    b.row("web-1", Some(("phase", "Scheduled")), 20)?;

    // The project's Events feed, as `kubectl get events` shows it: open, it gets a server's
    // failure from the scheduler through its watch, newest first, with the object it is about.
    b.ok(json!({"cmd": "click", "css": "#tabs a[data-view=events]"}))?;
    b.until(
        "return document.querySelector('#list-title').textContent === 'Events in dash-a' && document.querySelector('#live').dataset.state === 'live' && [...document.querySelectorAll('#list tbody tr')].some((r) => r.dataset.name === 'other.probe')",
        30,
        "dash-a's events",
    )?;
    cloud.kubectl_in(
        &["apply", "-f", "-"],
        &server("doomed", "dash-a", "its flavor does not exist")
            .replace("flavor: dash.small", "flavor: dash.none"),
    )?;
    let failed = b.until(
        "const r = [...document.querySelectorAll('#list tbody tr')].find((r) => r.querySelector('[data-col=object]').textContent === 'server/doomed'); if (!r) return null; const c = {}; for (const td of r.children) c[td.dataset.col] = td.textContent; return c",
        60,
        "the scheduler's Event about doomed",
    )?["value"]
        .take();
    assert_eq!(failed["type"], "Warning", "{failed}");
    assert_eq!(failed["reason"], "FailedScheduling", "{failed}");
    assert_eq!(
        failed["message"], "flavor \"dash.none\" not found",
        "the scheduler's reason reaches the page: {failed}"
    );
    // Newest first: doomed's Event above the probes recorded (with their fixed times) before.
    assert_eq!(
        b.js("const objects = [...document.querySelectorAll('#list tbody tr')].map((r) => r.querySelector('[data-col=object]').textContent + ' ' + r.dataset.name); const at = (s) => objects.findIndex((o) => o.startsWith(s)); return at('server/doomed') >= 0 && at('server/doomed') < at('server/web-1 web-1.probe') && at('server/doomed') < at('server/web-9 other.probe')")?,
        true,
        "the newest first"
    );
    assert_eq!(
        b.js("return document.querySelector('#live').dataset.lists")?,
        "1",
        "the feed is one LIST, then its watch"
    );
    // The same Events as kubectl lists them, and none of another project.
    wait_until(
        Duration::from_secs(30),
        "the feed to list what kubectl lists",
        || {
            let listed: Value = serde_json::from_str(
                &cloud
                    .kubectl_ok(&["-n", "dash-a", "get", "events", "-o", "json"])
                    .ok()?,
            )
            .ok()?;
            let mut want: Vec<String> = listed["items"]
                .as_array()?
                .iter()
                .filter_map(|e| e["metadata"]["name"].as_str().map(str::to_string))
                .collect();
            let mut shown: Vec<String> = serde_json::from_value(
                b.js("return [...document.querySelectorAll('#list tbody tr')].map((r) => r.dataset.name)")
                    .ok()?,
            )
            .ok()?;
            want.sort();
            shown.sort();
            (want == shown && shown.iter().any(|n| n == "web-1.probe")).then_some(())
        },
    )?;
    b.ok(json!({"cmd": "screenshot", "name": "events"}))?;
    // The object's name leads to its page.
    b.ok(json!({"cmd": "click", "css": "#list tbody tr td[data-col=object] a[href='#servers/doomed']"}))?;
    b.until(
        "return location.hash === '#servers/doomed' && document.querySelector('#detail-title').textContent === 'Server doomed'",
        20,
        "doomed's page",
    )?;
    b.ok(json!({"cmd": "click", "css": "#detail-view a[href='#servers']"}))?;
    b.row("web-1", Some(("phase", "Scheduled")), 20)?;

    // The switcher: a project without a role is refused, one with a role opens.
    b.ok(json!({"cmd": "type", "css": "#open-project-name", "text": "dash-c"}))?;
    b.ok(json!({"cmd": "click", "css": "#open-project button"}))?;
    b.until(
        "return document.querySelector('#error').textContent.includes('no role in a project \"dash-c\"')",
        20,
        "dash-c to be refused",
    )?;
    assert_eq!(
        b.js("return document.querySelector('#project').value")?,
        "dash-a"
    );
    cloud.kubectl_in(&["apply", "-f", "-"], &server("web-b", "dash-b", "in b"))?;
    b.ok(json!({"cmd": "type", "css": "#open-project-name", "text": "dash-b"}))?;
    b.ok(json!({"cmd": "click", "css": "#open-project button"}))?;
    b.row("web-b", None, 20)?;
    assert_eq!(
        b.js("return [...document.querySelectorAll('#list tbody tr')].map((r) => r.dataset.name)")?,
        json!(["web-b"]),
        "only dash-b's servers"
    );
    // Back and forth with the select.
    b.ok(json!({"cmd": "select", "css": "#project", "value": "dash-a"}))?;
    b.row("web-1", None, 20)?;
    b.ok(json!({"cmd": "select", "css": "#project", "value": "dash-b"}))?;
    b.row("web-b", None, 20)?;

    // The other lists follow their kinds too.
    b.ok(json!({"cmd": "click", "css": "#tabs a[data-view=keypairs]"}))?;
    b.until(
        "return document.querySelector('#list-title').textContent === 'Key pairs in dash-b' && document.querySelector('#live').dataset.state === 'live'",
        20,
        "the key pairs of dash-b",
    )?;
    cloud.kubectl_in(
        &["apply", "-f", "-"],
        "apiVersion: compute.stratus.dev/v1\nkind: Keypair\nmetadata:\n  name: dana-key\n  namespace: dash-b\nspec:\n  publicKey: ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGJ1c3RlZC10ZXN0LWtleS1mb3ItcGFnaW5n dana\n",
    )?;
    b.row("dana-key", None, 20)?;
    b.ok(json!({"cmd": "click", "css": "#tabs a[data-view=servers]"}))?;
    b.row("web-b", None, 20)?;

    // The cloud restarts: the page's watch resumes by itself and sees what happens next.
    cloud.restart()?;
    cloud.kubectl_in(&["apply", "-f", "-"], &server("web-b2", "dash-b", "after"))?;
    b.row("web-b2", None, 120)?;
    assert_eq!(b.js("return window.__stillThisPage")?, "yes", "no reload");
    b.until(
        "return document.querySelector('#live').dataset.state === 'live'",
        30,
        "the watch to be open again",
    )?;
    assert_eq!(
        b.js("return document.querySelector('#live').dataset.lists")?,
        "1",
        "the watch resumed from its resourceVersion: no second LIST"
    );

    // The browser offline (an open stream is not cut by that, so the cloud restarts too)
    // while servers change and etcd compacts their revisions: back online, the watch's
    // resourceVersion is gone (410), and one new LIST brings the page up to date.
    let lists = b.js("return document.querySelector('#live').dataset.lists")?;
    b.ok(json!({"cmd": "offline", "on": true}))?;
    cloud.restart()?;
    b.until(
        "return document.querySelector('#live').dataset.state === 'reconnecting'",
        60,
        "the watch to drop",
    )?;
    cloud.kubectl_in(
        &["apply", "-f", "-"],
        &server("web-b3", "dash-b", "offline"),
    )?;
    cloud.kubectl_ok(&["-n", "dash-b", "delete", "server", "web-b2", "--wait=false"])?;
    let status = cloud.etcdctl(&["endpoint", "status", "-w", "json"])?;
    let status: Value = serde_json::from_slice(&status.stdout).context("etcd's status")?;
    let revision = status[0]["Status"]["header"]["revision"]
        .as_i64()
        .context("etcd's revision")?;
    let compacted = cloud.etcdctl(&["compact", &revision.to_string()])?;
    assert!(compacted.status.success(), "{compacted:?}");
    b.ok(json!({"cmd": "offline", "on": false}))?;
    b.row("web-b3", None, 90)?;
    b.until(
        "return ![...document.querySelectorAll('#list tbody tr')].some((r) => r.dataset.name === 'web-b2') || null",
        30,
        "web-b2 to go (deleted while offline)",
    )?;
    let relisted = b.until(
        "const l = document.querySelector('#live'); return l.dataset.state === 'live' && l.dataset.lists",
        30,
        "the page to be live again",
    )?;
    assert_eq!(
        relisted["value"]
            .as_str()
            .and_then(|v| v.parse::<u64>().ok()),
        lists
            .as_str()
            .and_then(|v| v.parse::<u64>().ok())
            .map(|n| n + 1),
        "one new LIST after the 410"
    );
    assert_eq!(b.js("return window.__stillThisPage")?, "yes", "no reload");

    // Nothing of dash-c reached the page; the token is in no URL and no storage.
    assert_eq!(
        b.js("return document.documentElement.textContent.includes('secret-web')")?,
        false
    );
    assert_eq!(
        b.js("return localStorage.length + sessionStorage.length")?,
        0
    );
    assert_eq!(b.js("return document.cookie")?, "");
    let url = b.ok(json!({"cmd": "url"}))?["url"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert_eq!(url, format!("{dashboard}#servers"));
    assert_eq!(
        b.js("return performance.getEntriesByType('resource').map((e) => e.name).filter((n) => /token|bearer|eyJ/i.test(n.replace('/tokens', '')))")?,
        json!([]),
        "no request URL carries a token"
    );

    // Logging out forgets everything shown and returns to the login form.
    b.ok(json!({"cmd": "click", "css": "#logout"}))?;
    b.until(
        "return !document.querySelector('#login-view').hidden",
        20,
        "the login form after logging out",
    )?;
    assert_eq!(
        b.js("return document.querySelector('#app-view').hidden")?,
        true
    );
    assert_eq!(
        b.js("return document.querySelectorAll('#list tbody tr').length")?,
        0
    );
    assert_eq!(
        b.js("return document.querySelector('#user').textContent")?,
        ""
    );
    // The token was revoked with the API, not only forgotten by the page.
    b.until(
        "return performance.getEntriesByType('resource').some((e) => e.name.endsWith('/apis/identity.stratus.dev/v1/tokens/self') && e.responseStatus === 200)",
        20,
        "the token's revocation to be answered 200",
    )?;
    b.ok(json!({"cmd": "screenshot", "name": "logged-out"}))?;
    Ok(())
}

/// Waits until `kubectl get ARGS -o jsonpath=PATH` prints `want`.
fn wait_jsonpath(cloud: &Cloud, args: &[&str], path: &str, want: &str) -> Result<()> {
    let jsonpath = format!("jsonpath={path}");
    let mut all: Vec<&str> = vec!["get"];
    all.extend_from_slice(args);
    all.extend(["-o", &jsonpath]);
    wait_until(
        Duration::from_secs(60),
        &format!("{args:?} to have {path} = {want:?}"),
        || cloud.kubectl_ok(&all).ok().filter(|out| out.trim() == want),
    )?;
    Ok(())
}

/// A user's bearer token, as the page gets it: `POST /apis/identity.stratus.dev/v1/tokens`.
fn token_of(cloud: &Cloud, user: &str, password: &str) -> Result<String> {
    let issued = curl(
        &cloud.dir.path().join("pki/ca.crt"),
        "POST",
        &format!("{}/apis/identity.stratus.dev/v1/tokens", cloud.url),
        None,
        Some(&json!({ "user": user, "password": password }).to_string()),
    )?;
    assert_eq!(issued.code, 201, "{user}'s login: {}", issued.body);
    let issued: Value = serde_json::from_str(&issued.body)?;
    issued["token"]
        .as_str()
        .map(str::to_string)
        .context("no token issued")
}

const ACTORS: &str = "apiVersion: identity.stratus.dev/v1
kind: User
metadata:
  name: mia
spec:
  enabled: true
  defaultProject: dash-m
---
apiVersion: identity.stratus.dev/v1
kind: RoleAssignment
metadata:
  name: mia-member
  namespace: dash-m
spec:
  user: mia
  role: member
---
apiVersion: identity.stratus.dev/v1
kind: User
metadata:
  name: ops
spec:
  enabled: true
---
apiVersion: identity.stratus.dev/v1
kind: RoleAssignment
metadata:
  name: ops-admin
  namespace: dash-m
spec:
  user: ops
  role: admin
  clusterWide: true
---
apiVersion: compute.stratus.dev/v1
kind: Flavor
metadata:
  name: dash.small
spec:
  vcpus: 1
  ramMiB: 256
  diskGiB: 1
---
apiVersion: identity.stratus.dev/v1
kind: Quota
metadata:
  name: limits
  namespace: dash-m
spec:
  limits:
    servers: 5
    vcpus: 8
    volumes: 4
    volumeGiB: 10
";

/// A subnet of net-a and a server on net-a, for the topology.
const TOPOLOGY: &str = "apiVersion: network.stratus.dev/v1
kind: Subnet
metadata:
  name: sub-a
  namespace: dash-m
spec:
  network: net-a
  cidr: 10.77.0.0/24
---
apiVersion: compute.stratus.dev/v1
kind: Server
metadata:
  name: app-2
  namespace: dash-m
spec:
  flavor: dash.small
  image: cirros
  networks:
  - network: net-a
";

/// What the server form's manifest must read for app-1 (`user_data` a multiple of 3 bytes
/// long: its base64 has no `=` and is written bare).
fn app_manifest(user_data: &str) -> String {
    format!(
        "apiVersion: compute.stratus.dev/v1\nkind: Server\nmetadata:\n  name: app-1\n  namespace: dash-m\nspec:\n  flavor: dash.small\n  image: cirros\n  userData: {}\n  description: \"made in the browser: <b>bold</b>\"\n",
        base64::engine::general_purpose::STANDARD.encode(user_data)
    )
}

fn power_manifest(state: &str) -> String {
    format!(
        "apiVersion: compute.stratus.dev/v1\nkind: Server\nmetadata:\n  name: app-1\n  namespace: dash-m\nspec:\n  powerState: {state}\n"
    )
}

#[test]
fn a_member_acts_through_manifests_and_only_an_admin_sees_the_cloud() -> Result<()> {
    let cloud = Cloud::up()?;
    cloud.projects(&["dash-m"])?;
    cloud.kubectl_in(&["apply", "-f", "-"], ACTORS)?;
    let (mia, ops) = ("mia-Correct-Horse-7781", "ops-Correct-Horse-2290");
    set_password(&cloud, "mia", mia)?;
    set_password(&cloud, "ops", ops)?;
    let ca = cloud.dir.path().join("pki/ca.crt");
    // The API refuses Mia every admin list: the page only follows that answer.
    let mia_token = token_of(&cloud, "mia", mia)?;
    for path in [
        "/apis/compute.stratus.dev/v1/hypervisors",
        "/apis/storage.stratus.dev/v1/storagepools",
        "/apis/identity.stratus.dev/v1/projects",
        "/apis/identity.stratus.dev/v1/users",
        "/apis/identity.stratus.dev/v1/roleassignments",
    ] {
        let a = curl(
            &ca,
            "GET",
            &format!("{}{path}?limit=1", cloud.url),
            Some(&mia_token),
            None,
        )?;
        assert_eq!(a.code, 403, "{path}: {}", a.body);
    }

    let artifacts = repo_root().join("target/e2e-artifacts/dashboard");
    let mut b = Browser::open_at(&cloud, &format!("{}/dashboard/", cloud.url), &artifacts)?;
    b.log_in("mia", mia)?;

    // No admin tab for Mia, because the API refused her their lists; opened by its fragment,
    // a view shows the API's refusal and nothing else.
    b.until(
        "const tabs = [...document.querySelectorAll('#tabs a.admin')]; return tabs.length === 5 && tabs.every((a) => a.hidden && a.dataset.allowed === 'no')",
        60,
        "the admin tabs to stay hidden after the API's 403s",
    )?;
    b.js("location.hash = '#hypervisors'; return true")?;
    b.until(
        "return document.querySelector('#live').dataset.state === 'refused' && document.querySelector('#error').textContent.includes('forbidden')",
        30,
        "the hypervisors' list to be refused",
    )?;
    assert_eq!(
        b.js("return document.querySelectorAll('#list tbody tr').length")?,
        0
    );
    b.js("location.hash = '#servers'; return true")?;
    b.until(
        "return document.querySelector('#live').dataset.state === 'live'",
        60,
        "the servers list",
    )?;

    // The server form: what is typed is the manifest shown, and the API's refusals appear
    // next to the fields they name.
    b.ok(json!({"cmd": "click", "css": "#create-button"}))?;
    b.until(
        "return document.querySelector('form.create[data-form=server]') !== null",
        20,
        "the server form",
    )?;
    b.ok(json!({"cmd": "type", "css": "#f-server-name", "text": "Bad_Name"}))?;
    b.ok(json!({"cmd": "type", "css": "#f-server-flavor", "text": "dash.small"}))?;
    b.ok(json!({"cmd": "type", "css": "#f-server-image", "text": "cirros"}))?;
    let refused = b.refused_at("metadata.name")?;
    assert!(refused.contains("Bad_Name"), "{refused}");
    assert_eq!(
        text_of(&mut b, &field_error("spec.flavor"))?,
        "",
        "the flavor is not blamed for the name"
    );
    // A flavor that does not exist: the API names spec.flavor (the quota counts flavors).
    b.ok(json!({"cmd": "type", "css": "#f-server-name", "text": "app-1"}))?;
    b.ok(json!({"cmd": "type", "css": "#f-server-flavor", "text": "no-such-flavor"}))?;
    let refused = b.refused_at("spec.flavor")?;
    assert!(refused.contains("no-such-flavor"), "{refused}");
    assert_eq!(
        text_of(&mut b, &field_error("metadata.name"))?,
        "",
        "the name's error went with the name"
    );
    assert_eq!(
        cloud.kubectl_ok(&["-n", "dash-m", "get", "servers", "-o", "name"])?,
        "",
        "nothing was created by a refused form"
    );
    let user_data = "#cloud-config\nhostname: app-1\n";
    b.ok(json!({"cmd": "type", "css": "#f-server-flavor", "text": "dash.small"}))?;
    b.ok(json!({"cmd": "type", "css": "#f-server-userData", "text": user_data}))?;
    b.ok(json!({"cmd": "type", "css": "#f-server-description", "text": "made in the browser: <b>bold</b>"}))?;
    assert_eq!(
        text_of(&mut b, "#create-view pre.manifest")?,
        app_manifest(user_data),
        "the manifest shown before applying"
    );
    b.ok(json!({"cmd": "screenshot", "name": "create-server"}))?;
    b.ok(json!({"cmd": "click", "css": "form.create button.apply"}))?;
    // Created: the list shows it through its watch (no second LIST), and its phase live.
    let seen = b.row("app-1", None, 30)?;
    assert_eq!(seen["cells"]["phase"], "Pending", "{seen}");
    let stored: Value = serde_json::from_str(&cloud.kubectl_ok(&[
        "-n",
        "dash-m",
        "get",
        "server",
        "app-1",
        "-o",
        "json",
        "--show-managed-fields",
    ])?)?;
    assert_eq!(
        stored["spec"]["userData"],
        base64::engine::general_purpose::STANDARD.encode(user_data)
    );
    assert_eq!(
        stored["spec"]["description"],
        "made in the browser: <b>bold</b>"
    );
    assert!(
        stored["metadata"]["managedFields"]
            .as_array()
            .is_some_and(|m| m.iter().any(|f| f["manager"] == "stratus-dashboard")),
        "{stored}"
    );
    cloud.place("dash-m", "app-1", "hv-dash")?;
    let placed = b.row("app-1", Some(("phase", "Scheduled")), 30)?;
    assert_eq!(placed["cells"]["node"], "hv-dash", "{placed}");
    assert_eq!(
        b.js("return document.querySelector('#live').dataset.lists")?,
        "1",
        "the list was made once, the rest came through its watch"
    );

    // The detail: the server's console log as its node sends it (here the cloud's admin
    // writes it, as a system identity may), read every few seconds and shown as text.
    b.ok(json!({"cmd": "click", "css": "#list tbody tr[data-name='app-1'] a"}))?;
    b.until(
        "return document.querySelector('#console-note').textContent.startsWith('No console output yet') && document.querySelector('#console').hidden",
        30,
        "no console output yet",
    )?;
    let log = "Booting <script>window.__xss=4</script>\nweb-1 login: ";
    let put = curl(
        &ca,
        "PUT",
        &format!(
            "{}/apis/compute.stratus.dev/v1/namespaces/dash-m/servers/app-1/console",
            cloud.url
        ),
        Some(&admin_token(&cloud)?),
        Some(log),
    )?;
    assert_eq!(put.code, 200, "{}", put.body);
    b.until(
        &format!(
            "const c = document.querySelector('#console'); return !c.hidden && c.textContent === {}",
            json!(log)
        ),
        30,
        "the console log",
    )?;
    assert_eq!(
        b.js("return document.querySelectorAll('main script').length === 0 && window.__xss === undefined")?,
        true,
        "the log is text"
    );
    b.js("document.querySelector('#console').scrollIntoView(); return true")?;
    b.ok(json!({"cmd": "screenshot", "name": "server-console"}))?;

    // Stop, start and reboot: each shows its manifest, then applies it.
    for (action, want) in [("stop", "Stopped"), ("start", "Running")] {
        assert_eq!(b.action(action)?, power_manifest(want));
        b.confirm()?;
        wait_jsonpath(
            &cloud,
            &["-n", "dash-m", "server", "app-1"],
            "{.spec.powerState}",
            want,
        )?;
    }
    let reboot = b.action("reboot")?;
    assert!(reboot.contains("  rebootRequest: \""), "{reboot}");
    b.confirm()?;
    let rebooted: Value = serde_json::from_str(
        &cloud.kubectl_ok(&["-n", "dash-m", "get", "server", "app-1", "-o", "json"])?,
    )?;
    assert!(
        rebooted["spec"]["rebootRequest"]
            .as_str()
            .is_some_and(|r| !r.is_empty()),
        "{rebooted}"
    );
    assert_eq!(
        rebooted["spec"]["powerState"], "Running",
        "the reboot's apply keeps the start's field"
    );
    // Delete asks first, then deletes.
    assert_eq!(b.action("delete")?, "kubectl -n dash-m delete server app-1");
    assert!(
        cloud
            .kubectl_ok(&["-n", "dash-m", "get", "server", "app-1", "-o", "name"])?
            .contains("app-1"),
        "nothing is deleted before the confirmation"
    );
    b.confirm()?;
    wait_until(Duration::from_secs(60), "app-1 to be deleted", || {
        let out = cloud
            .kubectl(&[
                "-n",
                "dash-m",
                "get",
                "server",
                "app-1",
                "-o",
                "jsonpath={.metadata.deletionTimestamp}",
            ])
            .ok()?;
        (!out.status.success() || !out.stdout.is_empty()).then_some(())
    })?;

    // A network and a volume from their forms; a bad size is the size field's.
    b.open_form("network")?;
    b.ok(json!({"cmd": "type", "css": "#f-network-name", "text": "net-a"}))?;
    b.ok(json!({"cmd": "type", "css": "#f-network-description", "text": "from the page"}))?;
    assert_eq!(
        text_of(&mut b, "#create-view pre.manifest")?,
        "apiVersion: network.stratus.dev/v1\nkind: Network\nmetadata:\n  name: net-a\n  namespace: dash-m\nspec:\n  description: \"from the page\"\n"
    );
    b.ok(json!({"cmd": "click", "css": "form.create button.apply"}))?;
    b.row("net-a", None, 30)?;
    // A name already taken is the name's error (409 AlreadyExists), and nothing is changed.
    b.open_form("network")?;
    b.ok(json!({"cmd": "type", "css": "#f-network-name", "text": "net-a"}))?;
    b.ok(json!({"cmd": "type", "css": "#f-network-description", "text": "again"}))?;
    let taken = b.refused_at("metadata.name")?;
    assert!(taken.contains("already exists"), "{taken}");
    wait_jsonpath(
        &cloud,
        &["-n", "dash-m", "network", "net-a"],
        "{.spec.description}",
        "from the page",
    )?;
    b.open_form("volume")?;
    b.ok(json!({"cmd": "type", "css": "#f-volume-name", "text": "vol-a"}))?;
    b.ok(json!({"cmd": "type", "css": "#f-volume-sizeGiB", "text": "0"}))?;
    b.refused_at("spec.sizeGiB")?;
    b.ok(json!({"cmd": "type", "css": "#f-volume-sizeGiB", "text": "2"}))?;
    b.ok(json!({"cmd": "click", "css": "form.create button.apply"}))?;
    b.row("vol-a", None, 30)?;

    // The quota as usage bars, counted live.
    b.ok(json!({"cmd": "click", "css": "#tabs a[data-view=quota]"}))?;
    b.row("volumeGiB", Some(("usage", "2 / 10")), 60)?;
    b.row("volumes", Some(("usage", "1 / 4")), 60)?;
    assert_eq!(
        b.js("const m = document.querySelector('#list tbody tr[data-name=volumeGiB] meter'); return [m.value, m.max]")?,
        json!([2, 10])
    );
    b.ok(json!({"cmd": "screenshot", "name": "quota"}))?;

    // The topology: each server and router joined to its networks, drawn as they change.
    cloud.kubectl_in(&["apply", "-f", "-"], TOPOLOGY)?;
    b.ok(json!({"cmd": "click", "css": "#tabs a[data-view=topology]"}))?;
    b.until(
        "return document.querySelector(\"#topology g[data-link='server/app-2|net-a']\") !== null && document.querySelector(\"#topology g[data-network='net-a']\") !== null",
        60,
        "app-2 joined to net-a in the picture",
    )?;
    cloud.kubectl_in(
        &["apply", "-f", "-"],
        "apiVersion: network.stratus.dev/v1\nkind: Router\nmetadata:\n  name: r1\n  namespace: dash-m\nspec:\n  interfaces:\n  - subnet: sub-a\n",
    )?;
    b.until(
        "return document.querySelector(\"#topology g[data-link='router/r1|net-a']\") !== null",
        60,
        "r1 joined to net-a through sub-a, live",
    )?;
    assert_eq!(
        b.js("return [...new Set([...document.querySelectorAll('#topology *')].map((e) => e.localName))].sort()")?,
        json!(["circle", "g", "line", "rect", "text", "title"]),
        "the picture is drawn of shapes and text only"
    );
    b.ok(json!({"cmd": "screenshot", "name": "topology"}))?;

    // An admin sees the cloud: hypervisors with capacity bars that follow their status.
    b.ok(json!({"cmd": "click", "css": "#logout"}))?;
    b.until(
        "return !document.querySelector('#login-view').hidden && [...document.querySelectorAll('#tabs a.admin')].every((a) => a.hidden)",
        20,
        "the login form, admin tabs hidden",
    )?;
    b.log_in("ops", ops)?;
    b.until(
        "const tabs = [...document.querySelectorAll('#tabs a.admin')]; return tabs.length === 5 && tabs.every((a) => !a.hidden && a.dataset.allowed === 'yes')",
        60,
        "the admin tabs",
    )?;
    b.ok(json!({"cmd": "click", "css": "#tabs a[data-view=hypervisors]"}))?;
    // 64 vCPUs x 16, (256 GiB - 512 MiB reserved) x 1.5, 4096 GiB x 1: the API's defaults.
    let hv = b.row("hv-dash", Some(("vcpus", "0 / 1024")), 30)?;
    assert_eq!(hv["cells"]["ram"], "0 / 392448 MiB", "{hv}");
    assert_eq!(hv["cells"]["disk"], "0 / 4096 GiB", "{hv}");
    cloud.kubectl_ok(&[
        "patch",
        "hypervisor",
        "hv-dash",
        "--subresource=status",
        "--type",
        "merge",
        "-p",
        r#"{"status":{"allocated":{"vcpus":4,"ramMiB":1024,"diskGiB":20},"servers":2}}"#,
    ])?;
    let hv = b.row("hv-dash", Some(("vcpus", "4 / 1024")), 30)?;
    assert_eq!(hv["cells"]["ram"], "1024 / 392448 MiB", "{hv}");
    assert_eq!(hv["cells"]["servers"], "2", "{hv}");
    assert_eq!(
        b.js("const m = document.querySelector('#list tbody tr[data-name=hv-dash] td[data-col=vcpus] meter'); return [m.value, m.max]")?,
        json!([4, 1024])
    );
    b.ok(json!({"cmd": "screenshot", "name": "hypervisors"}))?;
    for (view, name) in [
        ("projects", "dash-m"),
        ("users", "mia"),
        ("roleassignments", "mia-member"),
    ] {
        b.ok(json!({"cmd": "click", "css": format!("#tabs a[data-view={view}]")}))?;
        b.row(name, None, 30)?;
    }
    let ra = b.row("ops-admin", None, 30)?;
    assert_eq!(ra["cells"]["project"], "(every project)", "{ra}");
    assert_eq!(ra["cells"]["role"], "admin", "{ra}");
    b.ok(json!({"cmd": "click", "css": "#tabs a[data-view=storagepools]"}))?;
    b.until(
        "return document.querySelector('#list-title').textContent === 'Storage pools' && document.querySelector('#live').dataset.state === 'live'",
        30,
        "the storage pools",
    )?;
    Ok(())
}

/// Who asks for a console, and with which token.
const CONSOLE: &str = "/apis/compute.stratus.dev/v1/namespaces/con-a/servers/web-1/console";

const CONSOLE_SETUP: &str = "apiVersion: compute.stratus.dev/v1
kind: Flavor
metadata:
  name: con.small
spec:
  vcpus: 1
  ramMiB: 256
  diskGiB: 1
---
apiVersion: compute.stratus.dev/v1
kind: Hypervisor
metadata:
  name: n1
spec: {}
---
apiVersion: identity.stratus.dev/v1
kind: User
metadata:
  name: mia
spec:
  enabled: true
---
apiVersion: identity.stratus.dev/v1
kind: User
metadata:
  name: rita
spec:
  enabled: true
---
apiVersion: identity.stratus.dev/v1
kind: User
metadata:
  name: bo
spec:
  enabled: true
---
apiVersion: identity.stratus.dev/v1
kind: RoleAssignment
metadata:
  name: mia-member
  namespace: con-a
spec:
  user: mia
  role: member
---
apiVersion: identity.stratus.dev/v1
kind: RoleAssignment
metadata:
  name: rita-reader
  namespace: con-a
spec:
  user: rita
  role: reader
---
apiVersion: identity.stratus.dev/v1
kind: RoleAssignment
metadata:
  name: bo-member
  namespace: con-b
spec:
  user: bo
  role: member
";

fn console_server() -> &'static str {
    "apiVersion: compute.stratus.dev/v1\nkind: Server\nmetadata:\n  name: web-1\n  namespace: con-a\nspec:\n  flavor: con.small\n  image: cirros\n"
}

#[test]
fn a_servers_console_is_written_by_its_node_and_read_by_its_projects_members() -> Result<()> {
    let etcd = Etcd::start()?;
    let mut api = Apiserver::start_on(&etcd)?;
    let nodes = tempfile::tempdir()?;
    api.node_identities(&["n1", "n2"], nodes.path())?;
    api.projects(&["con-a", "con-b"])?;
    api.kubectl_in(&["apply", "-f", "-"], CONSOLE_SETUP)?;
    api.kubectl_in(&["apply", "-f", "-"], console_server())?;
    api.kubectl_ok(&[
        "patch",
        "hypervisor",
        "n1",
        "--subresource=status",
        "--type",
        "merge",
        "-p",
        r#"{"status":{"capacity":{"vcpus":8,"ramMiB":8192,"diskGiB":100}}}"#,
    ])?;
    api.kubectl_in(
        &[
            "create",
            "--raw",
            "/apis/compute.stratus.dev/v1/namespaces/con-a/servers/web-1/binding",
            "-f",
            "-",
        ],
        &json!({"target": {"name": "n1"}}).to_string(),
    )?;
    let ca = api.ca_file();
    let admin = stratus_e2e::TEST_TOKEN;
    let call = |method: &str, token: &str, body: Option<&str>| {
        curl(
            &ca,
            method,
            &format!("{}{CONSOLE}", api.url),
            Some(token),
            body,
        )
    };
    let mut tokens = std::collections::HashMap::new();
    for user in ["mia", "rita", "bo"] {
        let password = format!("{user}-Correct-Horse-9133");
        let set = curl(
            &ca,
            "PUT",
            &format!(
                "{}/apis/identity.stratus.dev/v1/users/{user}/password",
                api.url
            ),
            Some(admin),
            Some(&json!({ "password": password }).to_string()),
        )?;
        assert_eq!(set.code, 200, "{}", set.body);
        let issued = wait_until(Duration::from_secs(30), "a login", || {
            let a = curl(
                &ca,
                "POST",
                &format!("{}/apis/identity.stratus.dev/v1/tokens", api.url),
                None,
                Some(&json!({ "user": user, "password": password }).to_string()),
            )
            .ok()?;
            (a.code == 201).then_some(a)
        })?;
        let issued: Value = serde_json::from_str(&issued.body)?;
        tokens.insert(
            user,
            issued["token"].as_str().context("a token")?.to_string(),
        );
    }
    let (n1, n2) = ("n1-token-0123456789abcdef", "n2-token-0123456789abcdef");

    // The node running the server writes its console; the log is whatever the guest printed.
    let log = "Booting <script>window.__xss=3</script>\r\nweb-1 login: ";
    let put = call("PUT", n1, Some(log))?;
    assert_eq!(put.code, 200, "{}", put.body);
    // Its project's member reads it back as text; kubectl's raw GET as the admin too.
    let read = wait_until(Duration::from_secs(30), "mia's read", || {
        call("GET", &tokens["mia"], None)
            .ok()
            .filter(|a| a.code == 200 && !a.body.is_empty())
    })?;
    assert_eq!(read.body, log);
    assert!(
        read.header("content-type")
            .is_some_and(|t| t.starts_with("text/plain")),
        "{:?}",
        read.header("content-type")
    );
    assert_eq!(read.header("x-content-type-options"), Some("nosniff"));
    assert_eq!(api.kubectl_ok(&["get", "--raw", CONSOLE])?, log);

    // Another node may not write it, nor any node read it; a reader, another project's
    // member and a member writing are refused: each a Status naming why.
    for (who, method, token, code, says) in [
        ("n2", "PUT", n2, 403, "not placed on it"),
        ("n1", "GET", n1, 403, "only writes"),
        (
            "rita (reader)",
            "GET",
            tokens["rita"].as_str(),
            403,
            "members",
        ),
        ("bo (con-b)", "GET", tokens["bo"].as_str(), 403, "members"),
        ("mia", "PUT", tokens["mia"].as_str(), 403, "only the node"),
    ] {
        let a = call(method, token, (method == "PUT").then_some("forged"))?;
        assert_eq!(a.code, code, "{who} {method}: {}", a.body);
        let status: Value = serde_json::from_str(&a.body).context("a Status")?;
        assert_eq!(status["kind"], "Status", "{who}");
        assert!(
            status["message"].as_str().is_some_and(|m| m.contains(says)),
            "{who}: {status}"
        );
    }
    // Bounded: more than 64 KiB is refused whole, the log kept as it was.
    let big = "x".repeat(64 * 1024 + 1);
    let a = call("PUT", n1, Some(&big))?;
    assert_eq!(a.code, 413, "{}", a.body);
    assert!(a.body.contains("65536"), "{}", a.body);
    assert_eq!(
        call("PUT", n1, Some(&big[1..]))?.code,
        200,
        "exactly 64 KiB"
    );
    assert_eq!(call("GET", &tokens["mia"], None)?.body.len(), 64 * 1024);
    // The compute agent's sender, as node n1, sends the log file it gives the guest
    // (STATE/servers/UID/console.log) for a server placed on n1.
    let server: stratus_api_types::compute::Server = serde_json::from_str(
        &api.kubectl_ok(&["-n", "con-a", "get", "server", "web-1", "-o", "json"])?,
    )?;
    let uid = server.metadata.uid.clone().context("web-1's uid")?;
    let state = tempfile::tempdir()?;
    let guest = state.path().join("servers").join(&uid);
    std::fs::create_dir_all(&guest)?;
    std::fs::write(
        guest.join("console.log"),
        "[    0.000000] Linux version\nweb-1 login: ",
    )?;
    let rt = tokio::runtime::Runtime::new()?;
    let agent = rt.block_on(async {
        let kc = kube::config::Kubeconfig::read_from(nodes.path().join("n1.kubeconfig"))?;
        let client = kube::Client::try_from(
            kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?,
        )?;
        let (reader, mut writer) = kube::runtime::reflector::store();
        writer.apply_watcher_event(&kube::runtime::watcher::Event::Apply(server));
        anyhow::Ok(tokio::spawn(stratus_agents::compute::console::run(
            client,
            reader,
            "n1".into(),
            state.path().to_path_buf(),
        )))
    })?;
    let sent = wait_until(Duration::from_secs(60), "the agent's console", || {
        call("GET", &tokens["mia"], None)
            .ok()
            .filter(|a| a.body.ends_with("web-1 login: "))
    });
    agent.abort();
    drop(rt);
    assert_eq!(sent?.body, "[    0.000000] Linux version\nweb-1 login: ");

    // Another verb, a bad name: 4xx Statuses.
    assert_eq!(call("DELETE", admin, None)?.code, 405);
    let bad = curl(
        &ca,
        "GET",
        &format!(
            "{}/apis/compute.stratus.dev/v1/namespaces/con-a/servers/Bad_Name/console",
            api.url
        ),
        Some(admin),
        None,
    )?;
    assert_eq!(bad.code, 400, "{}", bad.body);
    assert!(bad.body.contains("Bad_Name"), "{}", bad.body);

    // The console goes with its server: a new web-1 has none, and etcd keeps no console key.
    api.kubectl_ok(&["-n", "con-a", "delete", "server", "web-1", "--wait=false"])?;
    let _ = api.kubectl(&[
        "-n",
        "con-a",
        "patch",
        "server",
        "web-1",
        "--type",
        "merge",
        "-p",
        r#"{"metadata":{"finalizers":null}}"#,
    ])?;
    wait_until(Duration::from_secs(60), "web-1 to be gone", || {
        let a = call("GET", admin, None).ok()?;
        (a.code == 404).then_some(())
    })?;
    let keys = etcd.ctl(&["get", "", "--prefix", "--keys-only"])?;
    let keys = String::from_utf8_lossy(&keys.stdout);
    assert!(!keys.contains("_system/console/con-a/web-1"), "{keys}");
    api.kubectl_in(&["apply", "-f", "-"], console_server())?;
    let fresh = call("GET", &tokens["mia"], None)?;
    assert_eq!(
        (fresh.code, fresh.body.as_str()),
        (200, ""),
        "a new web-1 has no console"
    );
    Ok(())
}
