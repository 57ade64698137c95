//! The web dashboard: its assets as the API server serves them (anonymously, under a strict
//! Content-Security-Policy), and the page in a real headless Chromium (Selenium) against a
//! real `stratus up`, logged in as a project member: lists that follow the API's watches,
//! the server detail, hostile text shown as text, the project switcher, a watch resumed
//! after the cloud restarts, and logging out.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{Receiver, channel};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use base64::Engine;
use serde_json::{Value, json};
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

/// Headless Chromium, worked by `e2e/python/dashboard.py` one command at a time.
struct Browser {
    child: Child,
    stdin: ChildStdin,
    answers: Receiver<String>,
    _profile: tempfile::TempDir,
}

impl Browser {
    /// Starts Chromium trusting only the API server's key (`cert`, PEM).
    fn start(cert: &Path, artifacts: &Path) -> Result<Self> {
        let profile = tempfile::tempdir()?;
        let mut child = Command::new("/usr/bin/python3")
            .arg(repo_root().join("e2e/python/dashboard.py"))
            .arg("--spki-hash")
            .arg(spki_hash(cert)?)
            .arg("--artifacts")
            .arg(artifacts)
            .arg("--profile")
            .arg(profile.path())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("run e2e/python/dashboard.py")?;
        let stdin = child.stdin.take().context("stdin")?;
        let stdout = child.stdout.take().context("stdout")?;
        let (tx, answers) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let mut b = Self {
            child,
            stdin,
            answers,
            _profile: profile,
        };
        let ready = b.answer(Duration::from_secs(120))?;
        if ready["ok"] != true {
            bail!("the browser did not start: {ready}");
        }
        Ok(b)
    }

    fn answer(&mut self, within: Duration) -> Result<Value> {
        let line = self
            .answers
            .recv_timeout(within)
            .with_context(|| format!("no answer from the browser within {within:?}"))?;
        serde_json::from_str(&line).with_context(|| format!("the browser's answer {line:?}"))
    }

    /// Sends one command; its answer (bounded by the command's own timeout, plus a minute).
    fn send(&mut self, cmd: Value) -> Result<Value> {
        writeln!(self.stdin, "{cmd}")?;
        self.stdin.flush()?;
        let within = Duration::from_secs(cmd["timeout"].as_u64().unwrap_or(30) + 60);
        self.answer(within)
    }

    /// Sends one command that must succeed.
    fn ok(&mut self, cmd: Value) -> Result<Value> {
        let a = self.send(cmd.clone())?;
        if a["ok"] != true {
            let _ = self.send(json!({"cmd": "screenshot", "name": "failed"}));
            bail!("browser command {cmd} failed: {a}");
        }
        Ok(a)
    }

    /// Runs a script in the page; its value.
    fn js(&mut self, script: &str) -> Result<Value> {
        Ok(self.ok(json!({"cmd": "js", "js": script}))?["value"].take())
    }

    /// Waits (up to `timeout` s) until the script returns something other than null or false.
    fn until(&mut self, script: &str, timeout: u64, what: &str) -> Result<Value> {
        let a = self.send(json!({"cmd": "wait_js", "js": script, "timeout": timeout}))?;
        if a["ok"] != true {
            let _ = self.send(json!({"cmd": "screenshot", "name": "failed"}));
            bail!("timed out after {timeout} s waiting for {what}: {a}");
        }
        Ok(a)
    }

    /// Waits until the list shows row `name` with `col` reading `value` (any row when `col`
    /// is None); the answer, with `ms` and `cells`.
    fn row(&mut self, name: &str, col: Option<(&str, &str)>, timeout: u64) -> Result<Value> {
        let (c, v) = col.unzip();
        let a = self.send(
            json!({"cmd": "wait_row", "name": name, "col": c, "value": v, "timeout": timeout}),
        )?;
        if a["ok"] != true {
            let _ = self.send(json!({"cmd": "screenshot", "name": "failed"}));
            bail!("timed out after {timeout} s waiting for the row {name} with {col:?}: {a}");
        }
        Ok(a)
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = writeln!(self.stdin, "{}", json!({"cmd": "quit"}));
        let _ = self.stdin.flush();
        for _ in 0..200 {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The base64 SHA-256 of a certificate's public key, as Chromium's
/// `--ignore-certificate-errors-spki-list` takes it.
fn spki_hash(cert: &Path) -> Result<String> {
    let dir = tempfile::tempdir()?;
    let (public, der) = (dir.path().join("key.pem"), dir.path().join("key.der"));
    let run = |args: &[&std::ffi::OsStr]| -> Result<Vec<u8>> {
        let out = Command::new("openssl").args(args).output()?;
        if !out.status.success() {
            bail!("openssl: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(out.stdout)
    };
    let os = |s: &'static str| std::ffi::OsStr::new(s);
    run(&[
        os("x509"),
        os("-in"),
        cert.as_os_str(),
        os("-pubkey"),
        os("-noout"),
        os("-out"),
        public.as_os_str(),
    ])?;
    run(&[
        os("pkey"),
        os("-pubin"),
        os("-in"),
        public.as_os_str(),
        os("-outform"),
        os("der"),
        os("-out"),
        der.as_os_str(),
    ])?;
    let digest = run(&[os("dgst"), os("-sha256"), os("-binary"), der.as_os_str()])?;
    Ok(base64::engine::general_purpose::STANDARD.encode(digest))
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
    let ca = cloud.dir.path().join("pki/ca.crt");
    let set = curl(
        &ca,
        "PUT",
        &format!(
            "{}/apis/identity.stratus.dev/v1/users/dana/password",
            cloud.url
        ),
        Some(&admin_token(&cloud)?),
        Some(&json!({ "password": password }).to_string()),
    )?;
    assert_eq!(set.code, 200, "set dana's password: {}", set.body);
    // Another project's server, which Dana must never see.
    cloud.kubectl_in(
        &["apply", "-f", "-"],
        &server("secret-web", "dash-c", "not for dana"),
    )?;

    let artifacts = repo_root().join("target/e2e-artifacts/dashboard");
    let mut b = Browser::start(&cloud.dir.path().join("pki/apiserver.crt"), &artifacts)?;
    b.ok(json!({"cmd": "open", "url": dashboard}))?;
    b.until(
        "return document.querySelector('#login-user') !== null",
        30,
        "the login form",
    )?;

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

    b.ok(json!({"cmd": "type", "css": "#login-user", "text": "dana"}))?;
    b.ok(json!({"cmd": "type", "css": "#login-password", "text": password}))?;
    b.ok(json!({"cmd": "click", "css": "#login button[type=submit]"}))?;
    b.until(
        "return document.querySelector('#live').dataset.state === 'live'",
        60,
        "the servers of dash-a to be listed and watched",
    )?;
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
