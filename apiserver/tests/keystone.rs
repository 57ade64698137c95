//! The identity endpoints Swift's middleware calls (`/identity/v3`), over HTTP against a real
//! etcd: password logins scoped to a project, token validation for a service identity only,
//! revoked and expired tokens, S3 credentials (made by the server, seen only by their user,
//! their secret stored nowhere) and `s3tokens`' signature check, every input bounded, the
//! uncredentialed endpoints rate limited per source, an unknown access key answered as a wrong
//! signature, and a key of a deleted Project refused even while its index record stays.

#[allow(dead_code)]
mod common;

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::time::Duration;

use base64::Engine;
use ring::hmac;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use common::{Etcd, free_port};

const ADMIN: &str = "admin-token-0123456789";
const PROXY: &str = "proxy-token-0123456789";
const NODE: &str = "node-token-0123456789";
const PREFIX: &str = "/stratus";

/// A plain-HTTP API server (with an admin, a service and a node identity) over a new etcd.
struct Server {
    etcd: std::sync::Arc<Etcd>,
    server: stratus_apiserver::http::server::Server,
    addr: std::net::SocketAddr,
    store: stratus_apiserver::storage::store::Store,
    /// The API server's audit log.
    audit: std::path::PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.server.abort();
    }
}

async fn server() -> Server {
    server_with(|_| {}).await
}

/// [`server`], its configuration changed by `tune` first.
async fn server_with(tune: impl FnOnce(&mut stratus_apiserver::Config)) -> Server {
    let (etcd, store) = Etcd::start().await;
    serve(std::sync::Arc::new(etcd), store, "audit.log", tune).await
}

/// An API server over `etcd` (`store`), auditing to `audit` in its directory.
async fn serve(
    etcd: std::sync::Arc<Etcd>,
    store: stratus_apiserver::storage::store::Store,
    audit: &str,
    tune: impl FnOnce(&mut stratus_apiserver::Config),
) -> Server {
    let audit = etcd.dir().join(audit);
    let mut config = stratus_apiserver::Config::new(vec![etcd.endpoint().to_string()]);
    config.listen = ([127, 0, 0, 1], 0).into();
    config.prefix = PREFIX.into();
    config.tokens = HashMap::from([
        (ADMIN.to_string(), "admin".to_string()),
        (PROXY.to_string(), "system:service:object-proxy".to_string()),
        (NODE.to_string(), "system:node:n1".to_string()),
    ]);
    config.object_store_url = Some("http://127.0.0.1:8080".into());
    // Fast hashing threads: logins are what these tests do.
    config.login.hash_threads = 2;
    config.audit_log = Some(audit.clone());
    tune(&mut config);
    let server = stratus_apiserver::start(config)
        .await
        .expect("start the API server");
    let addr = server.local_addr;
    Server {
        etcd,
        server,
        addr,
        store,
        audit,
    }
}

impl Server {
    /// A second API server (a replica) on this one's etcd, tuned as `tune` says.
    async fn replica(&self, tune: impl FnOnce(&mut stratus_apiserver::Config)) -> Server {
        serve(
            std::sync::Arc::clone(&self.etcd),
            self.store.clone(),
            "audit-replica.log",
            tune,
        )
        .await
    }
}

/// An answer: status code, lower-case headers, body.
struct Answer {
    code: u16,
    headers: HashMap<String, String>,
    body: Value,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }
}

impl Server {
    /// One HTTP/1.1 request on its own connection.
    async fn call(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Answer {
        self.call_from(None, method, path, headers, body).await
    }

    /// [`Server::call`] from the source address `from` (a loopback one), if given.
    async fn call_from(
        &self,
        from: Option<std::net::Ipv4Addr>,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Answer {
        let socket = tokio::net::TcpSocket::new_v4().expect("a socket");
        if let Some(ip) = from {
            socket
                .bind(std::net::SocketAddr::from((ip, 0)))
                .expect("bind the source address");
        }
        let mut s = socket.connect(self.addr).await.expect("connect");
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nConnection: close\r\nContent-Length: {}\r\n",
            body.len()
        );
        // The address connected to, unless the caller names another host.
        if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
            req.push_str(&format!("Host: {}\r\n", self.addr));
        }
        if !body.is_empty()
            && !headers
                .iter()
                .any(|(k, _)| k.eq_ignore_ascii_case("content-type"))
        {
            req.push_str("Content-Type: application/json\r\n");
        }
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        s.write_all(req.as_bytes()).await.expect("send");
        // A refused body may be cut short: the answer is what counts.
        let _ = s.write_all(body).await;
        answer(&mut s).await
    }
}

/// The answer read off `s` until the server closes it.
async fn answer(s: &mut tokio::net::TcpStream) -> Answer {
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut raw))
        .await
        .expect("an answer within 30 s")
        .expect("read the answer");
    let text = String::from_utf8_lossy(&raw).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let code = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text}"));
    let headers: HashMap<String, String> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_lowercase(), v.trim().to_string()))
        .collect();
    let body = if headers.get("transfer-encoding").map(String::as_str) == Some("chunked") {
        dechunk(body)
    } else {
        body.to_string()
    };
    Answer {
        code,
        headers,
        body: serde_json::from_str(&body).unwrap_or(Value::Null),
    }
}

impl Server {
    /// A Stratus API call with a bearer token.
    async fn api(&self, token: &str, method: &str, path: &str, body: &Value) -> Answer {
        let auth = format!("Bearer {token}");
        let bytes = if body.is_null() {
            Vec::new()
        } else {
            body.to_string().into_bytes()
        };
        self.call(method, path, &[("Authorization", &auth)], &bytes)
            .await
    }

    /// An admin's call that must succeed.
    async fn admin(&self, method: &str, path: &str, body: Value) -> Value {
        let a = self.api(ADMIN, method, path, &body).await;
        assert!(a.code < 300, "{method} {path}: {} {}", a.code, a.body);
        a.body
    }

    /// Projects, users with passwords and member roles: `(user, project)` pairs.
    async fn setup(&self, projects: &[&str], members: &[(&str, &str)]) {
        for p in projects {
            self.admin(
                "POST",
                "/apis/identity.stratus.dev/v1/projects",
                json!({"apiVersion": "identity.stratus.dev/v1", "kind": "Project", "metadata": {"name": p}, "spec": {}}),
            )
            .await;
        }
        for (u, p) in members {
            if self
                .api(
                    ADMIN,
                    "GET",
                    &format!("/apis/identity.stratus.dev/v1/users/{u}"),
                    &Value::Null,
                )
                .await
                .code
                == 404
            {
                self.admin(
                    "POST",
                    "/apis/identity.stratus.dev/v1/users",
                    json!({"apiVersion": "identity.stratus.dev/v1", "kind": "User", "metadata": {"name": u}, "spec": {}}),
                )
                .await;
                self.admin(
                    "PUT",
                    &format!("/apis/identity.stratus.dev/v1/users/{u}/password"),
                    json!({"password": password(u)}),
                )
                .await;
            }
            self.admin(
                "POST",
                &format!("/apis/identity.stratus.dev/v1/namespaces/{p}/roleassignments"),
                json!({"apiVersion": "identity.stratus.dev/v1", "kind": "RoleAssignment",
                       "metadata": {"name": format!("{u}-member")}, "spec": {"user": u, "role": "member"}}),
            )
            .await;
        }
    }

    async fn project_uid(&self, p: &str) -> String {
        self.admin(
            "GET",
            &format!("/apis/identity.stratus.dev/v1/projects/{p}"),
            Value::Null,
        )
        .await["metadata"]["uid"]
            .as_str()
            .expect("a uid")
            .to_string()
    }

    /// A Keystone password login scoped to `project`.
    async fn login(&self, user: &str, pw: &str, project: &str) -> Answer {
        self.login_from(None, user, pw, project).await
    }

    /// [`Server::login`] from the source address `from`, if given.
    async fn login_from(
        &self,
        from: Option<std::net::Ipv4Addr>,
        user: &str,
        pw: &str,
        project: &str,
    ) -> Answer {
        let body = json!({"auth": {
            "identity": {"methods": ["password"], "password": {"user": {"name": user, "domain": {"name": "Default"}, "password": pw}}},
            "scope": {"project": {"name": project, "domain": {"name": "Default"}}},
        }});
        self.call_from(
            from,
            "POST",
            "/identity/v3/auth/tokens",
            &[],
            body.to_string().as_bytes(),
        )
        .await
    }

    /// A scoped token of `user` in `project`.
    async fn token(&self, user: &str, project: &str) -> String {
        let a = self.login(user, &password(user), project).await;
        assert_eq!(a.code, 201, "login {user}: {}", a.body);
        a.header("x-subject-token")
            .expect("X-Subject-Token")
            .to_string()
    }

    /// `authtoken`'s validation of `subject` with `auth` as its credential.
    async fn validate(&self, auth: Option<&str>, subject: &str) -> Answer {
        let mut h = vec![("X-Subject-Token", subject)];
        if let Some(a) = auth {
            h.push(("X-Auth-Token", a));
        }
        self.call("GET", "/identity/v3/auth/tokens", &h, b"").await
    }

    /// Revokes `subject` with `auth` as the credential: the status code.
    async fn revoke(&self, auth: &str, subject: &str) -> u16 {
        let h = [("X-Auth-Token", auth), ("X-Subject-Token", subject)];
        self.call("DELETE", "/identity/v3/auth/tokens", &h, b"")
            .await
            .code
    }

    async fn s3tokens(&self, access: &str, string_to_sign: &str, signature: &str) -> Answer {
        let token = base64::engine::general_purpose::URL_SAFE.encode(string_to_sign);
        let body =
            json!({"credentials": {"access": access, "token": token, "signature": signature}});
        self.call(
            "POST",
            "/identity/v3/s3tokens",
            &[],
            body.to_string().as_bytes(),
        )
        .await
    }

    /// Every key and value stored under the prefix, as text.
    async fn everything_stored(&self) -> String {
        let keys = self
            .store
            .keys(&format!("{PREFIX}/"))
            .await
            .expect("read etcd");
        let mut all = String::new();
        for k in keys {
            all.push_str(&k);
            // The identity marker holds no JSON, and nothing.
            if let Ok(Some(s)) = self.store.get(&k).await {
                all.push_str(&s.value.to_string());
            }
            all.push('\n');
        }
        all
    }
}

/// A chunked body's content.
fn dechunk(mut rest: &str) -> String {
    let mut out = String::new();
    while let Some((size, after)) = rest.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || after.len() < n {
            break;
        }
        out.push_str(&after[..n]);
        rest = after[n..].trim_start_matches("\r\n");
    }
    out
}

fn password(user: &str) -> String {
    format!("{user}-password-1")
}

/// An AWS signature version 4 over `string_to_sign`, as boto3 makes it.
fn sign_v4(secret: &str, string_to_sign: &str) -> String {
    let scope = string_to_sign.lines().nth(2).expect("a scope line");
    let mut key = format!("AWS4{secret}").into_bytes();
    for part in scope.split('/') {
        key = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, &key), part.as_bytes())
            .as_ref()
            .to_vec();
    }
    hmac::sign(
        &hmac::Key::new(hmac::HMAC_SHA256, &key),
        string_to_sign.as_bytes(),
    )
    .as_ref()
    .iter()
    .map(|b| format!("{b:02x}"))
    .collect()
}

const STS: &str = "AWS4-HMAC-SHA256\n20261201T120000Z\n20261201/us-east-1/s3/aws4_request\n0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_project_is_throttled_as_a_wrong_password_and_links_name_the_server() {
    let s = server().await;
    s.setup(&["p1"], &[("alice", "p1"), ("bob", "p1")]).await;
    let login_by_id = |user: &'static str, pw: String, id: &'static str| {
        let body = json!({"auth": {
            "identity": {"methods": ["password"], "password": {"user": {"name": user, "domain": {"id": "default"}, "password": pw}}},
            "scope": {"project": {"id": id}},
        }});
        let s = &s;
        async move {
            s.call(
                "POST",
                "/identity/v3/auth/tokens",
                &[],
                body.to_string().as_bytes(),
            )
            .await
        }
    };
    // Wrong passwords with a project that is not there count as failed logins (the project
    // is looked up only after the throttle and the password check): alice is locked out.
    for _ in 0..6 {
        let a = login_by_id("alice", "wrong-password".into(), "no-such-project-uid").await;
        assert_eq!(a.code, 401, "{}", a.body);
    }
    assert_eq!(s.login("alice", &password("alice"), "p1").await.code, 401);
    // For the right password, an unknown project is a 401 as a wrong password is.
    let a = login_by_id("bob", password("bob"), "no-such-project-uid").await;
    assert_eq!(a.code, 401, "{}", a.body);
    assert_eq!(
        s.login("bob", &password("bob"), "no-such-project")
            .await
            .code,
        401
    );
    assert_eq!(s.login("bob", &password("bob"), "p1").await.code, 201);

    // Version links and WWW-Authenticate name the server's address, whatever Host says.
    let v = s
        .call("GET", "/identity/v3", &[("Host", "evil.example:80")], b"")
        .await;
    assert_eq!(v.code, 200);
    let href = v.body["version"]["links"][0]["href"]
        .as_str()
        .unwrap_or_default();
    assert!(!href.contains("evil"), "{href}");
    // (The address configured to listen on: this test's server listens on port 0.)
    let listen = format!("http://{}:", s.addr.ip());
    assert!(href.starts_with(&listen), "{href}");
    let r = s
        .call(
            "GET",
            "/identity/v3/auth/tokens",
            &[("Host", "evil.example:80")],
            b"",
        )
        .await;
    let challenge = r.header("www-authenticate").unwrap_or_default();
    assert!(
        challenge.starts_with(&format!("Keystone uri=\"{listen}")),
        "{} {challenge}",
        r.code
    );
    assert!(!challenge.contains("evil"), "{challenge}");

    // Logins through /identity are audited: who tried and how it ended, never the password.
    let audit = std::fs::read_to_string(&s.audit).expect("the audit log");
    let logins: Vec<Value> = audit
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|e| e["requestURI"] == "/identity/v3/auth/tokens")
        .collect();
    let results = |user: &str| -> Vec<String> {
        logins
            .iter()
            .filter(|e| e["annotations"]["authentication.stratus.dev/user"] == user)
            .filter_map(|e| e["annotations"]["authentication.stratus.dev/result"].as_str())
            .map(String::from)
            .collect()
    };
    let bob = results("bob");
    assert_eq!(bob.iter().filter(|r| *r == "success").count(), 1, "{bob:?}");
    assert_eq!(bob.iter().filter(|r| *r == "failure").count(), 2, "{bob:?}");
    assert!(results("alice").iter().any(|r| r == "failure"), "{audit}");
    for pw in [password("alice"), password("bob")] {
        assert!(!audit.contains(&pw), "a password in the audit log");
    }
}

/// A name that is no User locks out per source address exactly as a User's does, so trying a
/// locked-out name from a second address does not tell whether it is a User.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_made_up_name_locks_out_per_source_as_a_users_does() {
    let s = server_with(|c| c.login.lockout_failure_attempts = 2).await;
    s.setup(&["p1"], &[("alice", "p1")]).await;
    let first = Some(std::net::Ipv4Addr::new(127, 0, 0, 1));
    let second = Some(std::net::Ipv4Addr::new(127, 0, 0, 2));
    for user in ["alice", "nobody"] {
        for _ in 0..2 {
            let a = s.login_from(first, user, "wrong-password", "p1").await;
            assert_eq!(a.code, 401, "{}", a.body);
        }
    }
    for user in ["alice", "nobody"] {
        let a = s.login_from(second, user, "wrong-password", "p1").await;
        assert_eq!(a.code, 401, "{}", a.body);
    }
    let audit = std::fs::read_to_string(&s.audit).expect("the audit log");
    let last = |user: &str| -> String {
        audit
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|e| e["requestURI"] == "/identity/v3/auth/tokens")
            .filter(|e| e["annotations"]["authentication.stratus.dev/user"] == user)
            .filter_map(|e| {
                e["annotations"]["authentication.stratus.dev/result"]
                    .as_str()
                    .map(String::from)
            })
            .next_back()
            .unwrap_or_default()
    };
    // From the second address both were checked (a failure), neither refused as locked.
    assert_eq!(last("alice"), "failure", "{audit}");
    assert_eq!(last("nobody"), "failure", "{audit}");
}

/// The audited results of `user`'s Keystone logins in the audit log at `path`, once there are
/// `n` (waiting up to 30 s for the log to be written).
async fn results(path: &std::path::Path, user: &str, n: usize) -> Vec<String> {
    let read = || -> Vec<String> {
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|e| e["requestURI"] == "/identity/v3/auth/tokens")
            .filter(|e| e["annotations"]["authentication.stratus.dev/user"] == user)
            .filter_map(|e| {
                e["annotations"]["authentication.stratus.dev/result"]
                    .as_str()
                    .map(String::from)
            })
            .collect()
    };
    for _ in 0..300 {
        let r = read();
        if r.len() >= n {
            return r;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    read()
}

/// Two API servers on one etcd: a made-up name's failures are counted for both, so it is
/// locked out after as many tries in all as a User (and as on one server), not that many on
/// each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_made_up_name_locks_out_over_every_replica_as_a_users_does() {
    let a = server_with(|c| c.login.lockout_failure_attempts = 3).await;
    let b = a
        .replica(|c| {
            c.login.lockout_failure_attempts = 3;
            c.login.hash_threads = 2;
        })
        .await;
    a.setup(&["p1"], &[("alice", "p1")]).await;
    let from = Some(std::net::Ipv4Addr::new(127, 0, 0, 1));
    for user in ["alice", "nobody"] {
        // Three failures in all, alternating A, B, A; then B and A refuse at once.
        for s in [&a, &b, &a, &b, &a] {
            let got = s.login_from(from, user, "wrong-password", "p1").await;
            assert_eq!(got.code, 401, "{}", got.body);
        }
        let on_a = results(&a.audit, user, 3).await;
        let on_b = results(&b.audit, user, 2).await;
        assert_eq!(on_a, ["failure", "failure", "locked"], "{user} on A");
        assert_eq!(on_b, ["failure", "locked"], "{user} on B");
    }
    // Many made-up names share few counts in etcd, however many are tried.
    let keys = a
        .store
        .keys(&format!("{PREFIX}/_system/logins/made-up/"))
        .await
        .expect("keys");
    assert!(
        (1..=2).contains(&keys.len()),
        "one count per replica for one name: {keys:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_scoped_to_a_project_is_validated_for_the_proxy_only() {
    let s = server().await;
    s.setup(
        &["p1", "p2"],
        &[("alice", "p1"), ("carol", "p1"), ("carol", "p2")],
    )
    .await;
    let p1 = s.project_uid("p1").await;

    // Discovery, as keystoneauth reads it.
    let v = s.call("GET", "/identity/v3", &[], b"").await;
    assert_eq!(v.code, 200);
    assert_eq!(v.body["version"]["id"], "v3.14");

    let a = s.login("alice", &password("alice"), "p1").await;
    assert_eq!(a.code, 201, "{}", a.body);
    let token = a
        .header("x-subject-token")
        .expect("X-Subject-Token")
        .to_string();
    assert!(
        !a.body.to_string().contains(&token),
        "the token is in the header only"
    );
    let t = &a.body["token"];
    assert_eq!(t["project"]["id"], json!(p1));
    assert_eq!(t["project"]["name"], "p1");
    assert_eq!(t["user"]["name"], "alice");
    assert_eq!(
        t["roles"],
        json!([{"id": "member", "name": "member"}, {"id": "reader", "name": "reader"}])
    );
    assert_eq!(
        t["catalog"][0]["endpoints"][0]["url"],
        json!(format!("http://127.0.0.1:8080/v1/AUTH_{p1}"))
    );

    // Only the service identity validates; the answer names the project and roles.
    let ok = s.validate(Some(PROXY), &token).await;
    assert_eq!(ok.code, 200, "{}", ok.body);
    assert_eq!(ok.body["token"]["project"]["id"], json!(p1));
    assert_eq!(ok.body["token"]["roles"][0]["name"], "member");
    assert_eq!(ok.header("x-subject-token"), Some(token.as_str()));
    for (who, code) in [
        (Some(ADMIN), 403),
        (Some(NODE), 403),
        (Some(token.as_str()), 403),
        (Some("nope"), 401),
        (None, 401),
    ] {
        let r = s.validate(who, &token).await;
        assert_eq!(r.code, code, "validated with {who:?}: {}", r.body);
        assert!(
            r.body["error"]["message"].is_string(),
            "Keystone's error member"
        );
        assert_eq!(r.body["kind"], "Status");
    }
    // The service identity makes no API request.
    assert_eq!(
        s.api(
            PROXY,
            "GET",
            "/apis/compute.stratus.dev/v1/namespaces/p1/servers",
            &Value::Null
        )
        .await
        .code,
        403
    );

    // Forged, tampered, oversized subject tokens: not found.
    let tampered = format!("{}x", &token[..token.len() - 1]);
    let huge = "a".repeat(10_000);
    for bad in ["st1.forged.sig", tampered.as_str(), huge.as_str()] {
        assert_eq!(s.validate(Some(PROXY), bad).await.code, 404);
    }

    // Wrong password, no role in the project, no such project, another domain: 401 alike.
    assert_eq!(s.login("alice", "wrong-password", "p1").await.code, 401);
    assert_eq!(s.login("alice", &password("alice"), "p2").await.code, 401);
    assert_eq!(s.login("alice", &password("alice"), "nope").await.code, 401);
    let other_domain = json!({"auth": {"identity": {"methods": ["password"], "password": {"user": {"name": "alice", "domain": {"id": "other"}, "password": password("alice")}}}}});
    assert_eq!(
        s.call(
            "POST",
            "/identity/v3/auth/tokens",
            &[],
            other_domain.to_string().as_bytes()
        )
        .await
        .code,
        401
    );

    // A scoped token acts in its project only, on the Stratus API too.
    let carol = s.token("carol", "p1").await;
    let list = |ns: &'static str| format!("/apis/compute.stratus.dev/v1/namespaces/{ns}/servers");
    assert_eq!(
        s.api(&carol, "GET", &list("p1"), &Value::Null).await.code,
        200
    );
    assert_eq!(
        s.api(&carol, "GET", &list("p2"), &Value::Null).await.code,
        403
    );

    // Revoked (by its holder): refused from then on.
    assert_eq!(s.revoke(&token, &token).await, 204);
    assert_eq!(s.validate(Some(PROXY), &token).await.code, 404);

    // Another user cannot revoke it.
    let alice = s.token("alice", "p1").await;
    assert_eq!(s.revoke(&carol, &alice).await, 403);
    assert_eq!(s.validate(Some(PROXY), &alice).await.code, 200);

    // A role taken away: the token no longer reaches the project.
    s.admin(
        "DELETE",
        "/apis/identity.stratus.dev/v1/namespaces/p1/roleassignments/alice-member",
        Value::Null,
    )
    .await;
    assert_eq!(s.validate(Some(PROXY), &alice).await.code, 404);

    // Expired: a Stratus token of one second.
    let short = s
        .call(
            "POST",
            "/apis/identity.stratus.dev/v1/tokens",
            &[],
            json!({"user": "carol", "password": password("carol"), "expirationSeconds": 1})
                .to_string()
                .as_bytes(),
        )
        .await;
    assert_eq!(short.code, 201);
    let short = short.body["token"].as_str().expect("a token").to_string();
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_eq!(s.validate(Some(PROXY), &short).await.code, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_logins_are_4xx_naming_the_field_and_bodies_are_bounded() {
    let s = server().await;
    let s = &s;
    let post =
        |body: Vec<u8>| async move { s.call("POST", "/identity/v3/auth/tokens", &[], &body).await };
    for (body, field) in [
        (
            json!({"auth": {"identity": {"methods": ["token"], "token": {"id": "x"}}}}),
            "auth.identity.methods",
        ),
        (
            json!({"auth": {"identity": {"methods": ["password"]}}}),
            "auth.identity.password",
        ),
        (
            json!({"auth": {"identity": {"methods": ["password"], "password": {"user": {"password": "x"}}}}}),
            "auth.identity.password.user.name",
        ),
        (
            json!({"auth": {"identity": {"methods": ["password"], "password": {"user": {"name": "a", "password": "x".repeat(5000)}}}}}),
            "auth.identity.password.user.password",
        ),
        (json!({"nothing": 1}), "auth"),
    ] {
        let a = post(body.to_string().into_bytes()).await;
        assert_eq!(a.code, 400, "{body}: {}", a.body);
        assert_eq!(a.body["details"]["causes"][0]["field"], field, "{}", a.body);
    }
    let huge = post(vec![b' '; 200 * 1024]).await;
    assert_eq!(huge.code, 413);
    let s3 = s
        .call(
            "POST",
            "/identity/v3/s3tokens",
            &[],
            &vec![b' '; 200 * 1024],
        )
        .await;
    assert_eq!(s3.code, 413);
    assert_eq!(
        s.call("GET", "/identity/v3/nothing", &[], b"").await.code,
        404
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_credentials_are_their_users_and_sign_for_their_project() {
    let s = server().await;
    s.setup(
        &["p1", "p2"],
        &[("alice", "p1"), ("dave", "p1"), ("bob", "p2")],
    )
    .await;
    let p1 = s.project_uid("p1").await;
    let alice = s.token("alice", "p1").await;
    let dave = s.token("dave", "p1").await;
    let bob = s.token("bob", "p2").await;
    let path = "/apis/identity.stratus.dev/v1/namespaces/p1/s3credentials";
    let cred = |user: &str| json!({"apiVersion": "identity.stratus.dev/v1", "kind": "S3Credential", "metadata": {"name": format!("{user}-key")}, "spec": {"user": user}});

    // Made for oneself only, in a project one has a role in.
    let r = s.api(&alice, "POST", path, &cred("dave")).await;
    assert_eq!(r.code, 403, "{}", r.body);
    let r = s.api(&bob, "POST", path, &cred("bob")).await;
    assert_eq!(r.code, 403, "{}", r.body);
    let made = s.api(&alice, "POST", path, &cred("alice")).await;
    assert_eq!(made.code, 201, "{}", made.body);
    let access = made.body["status"]["accessKeyId"]
        .as_str()
        .expect("an access key")
        .to_string();
    let secret = made.body["status"]["secretAccessKey"]
        .as_str()
        .expect("the secret, once")
        .to_string();
    assert_eq!(made.body["metadata"]["ownerReferences"][0]["name"], "alice");

    // The secret is shown once and stored nowhere.
    let read = s
        .api(&alice, "GET", &format!("{path}/alice-key"), &Value::Null)
        .await;
    assert_eq!(read.code, 200);
    assert!(
        read.body["status"].get("secretAccessKey").is_none(),
        "{}",
        read.body
    );
    assert!(
        !s.everything_stored().await.contains(&secret),
        "the secret is in etcd"
    );

    // Seen by its user only (and the project's admins).
    assert_eq!(
        s.api(&dave, "GET", &format!("{path}/alice-key"), &Value::Null)
            .await
            .code,
        403
    );
    assert_eq!(s.api(&dave, "GET", path, &Value::Null).await.code, 403);
    let mine = s
        .api(
            &alice,
            "GET",
            &format!("{path}?fieldSelector=spec.user%3Dalice"),
            &Value::Null,
        )
        .await;
    assert_eq!(mine.code, 200, "{}", mine.body);
    assert_eq!(mine.body["items"].as_array().map(Vec::len), Some(1));
    assert_eq!(
        s.api(
            &dave,
            "GET",
            &format!("{path}?fieldSelector=spec.user%3Dalice"),
            &Value::Null
        )
        .await
        .code,
        403
    );
    assert_eq!(
        s.api(&dave, "DELETE", &format!("{path}/alice-key"), &Value::Null)
            .await
            .code,
        403
    );
    let all = s.admin("GET", path, Value::Null).await;
    assert_eq!(all["items"].as_array().map(Vec::len), Some(1));

    // Its user never changes, nor what the server made.
    let moved = s
        .admin("GET", &format!("{path}/alice-key"), Value::Null)
        .await;
    let mut to_dave = moved.clone();
    to_dave["spec"]["user"] = json!("dave");
    let r = s
        .api(ADMIN, "PUT", &format!("{path}/alice-key"), &to_dave)
        .await;
    assert_eq!(r.code, 422, "{}", r.body);
    assert_eq!(r.body["details"]["causes"][0]["field"], "spec.user");

    // s3tokens: the right signature gives the user, the project (Swift's AUTH_<uid>) and roles.
    let ok = s.s3tokens(&access, STS, &sign_v4(&secret, STS)).await;
    assert_eq!(ok.code, 200, "{}", ok.body);
    assert_eq!(ok.body["token"]["project"]["id"], json!(p1));
    assert_eq!(ok.body["token"]["user"]["name"], "alice");
    assert_eq!(ok.body["token"]["roles"][0]["name"], "member");
    assert_eq!(
        s.s3tokens(&access, STS, &sign_v4("not-the-secret", STS))
            .await
            .code,
        401
    );
    assert_eq!(
        s.s3tokens(
            "0123456789abcdef0123456789abcdef",
            STS,
            &sign_v4(&secret, STS)
        )
        .await
        .code,
        401
    );
    assert_eq!(
        s.s3tokens("../../passwords/alice", STS, &sign_v4(&secret, STS))
            .await
            .code,
        401
    );
    assert_eq!(s.s3tokens(&"a".repeat(100), STS, "x").await.code, 400);
    let v2 = "GET\n\n\nTue, 01 Dec 2026 12:00:00 +0000\n/bucket/key";
    let v2_sig = base64::engine::general_purpose::STANDARD.encode(
        hmac::sign(
            &hmac::Key::new(hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, secret.as_bytes()),
            v2.as_bytes(),
        )
        .as_ref(),
    );
    assert_eq!(s.s3tokens(&access, v2, &v2_sig).await.code, 200);

    // Deleted: the key stops working, and its index goes with it.
    s.api(&alice, "DELETE", &format!("{path}/alice-key"), &Value::Null)
        .await;
    assert_eq!(
        s.s3tokens(&access, STS, &sign_v4(&secret, STS)).await.code,
        401
    );
    assert!(
        !s.everything_stored().await.contains(&access),
        "the access key's index stayed"
    );
    // No secret, token or password in the audit log (tokens travel in headers only).
    let audit = std::fs::read_to_string(&s.audit).expect("the audit log");
    assert!(audit.contains("s3credentials"), "nothing audited");
    for secret in [secret.as_str(), alice.as_str(), &password("alice")] {
        assert!(!audit.contains(secret), "a secret in the audit log");
    }
}

/// An S3 credential `name` of `user` in `project`: its access key and secret.
async fn s3_key(s: &Server, user: &str, project: &str, name: &str) -> (String, String) {
    let token = s.token(user, project).await;
    let made = s
        .api(
            &token,
            "POST",
            &format!("/apis/identity.stratus.dev/v1/namespaces/{project}/s3credentials"),
            &json!({"apiVersion": "identity.stratus.dev/v1", "kind": "S3Credential",
                    "metadata": {"name": name}, "spec": {"user": user}}),
        )
        .await;
    assert_eq!(made.code, 201, "{}", made.body);
    let field = |f: &str| {
        made.body["status"][f]
            .as_str()
            .expect("made by the server")
            .to_string()
    };
    (field("accessKeyId"), field("secretAccessKey"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3tokens_and_logins_are_rate_limited_per_source_address() {
    let s = server_with(|c| {
        c.identity_rate = stratus_apiserver::http::keystone::SourceRate {
            per_second: 0.5,
            burst: 3,
        };
    })
    .await;
    let unknown = "0123456789abcdef0123456789abcdef";
    for i in 0..3 {
        let a = s.s3tokens(unknown, STS, "00").await;
        assert_eq!(a.code, 401, "request {i} within the burst: {}", a.body);
    }
    let over = s.s3tokens(unknown, STS, "00").await;
    assert_eq!(over.code, 429, "{}", over.body);
    let after: u64 = over
        .header("retry-after")
        .and_then(|r| r.parse().ok())
        .expect("Retry-After in seconds");
    assert!((1..=2).contains(&after), "Retry-After: {after}");
    assert_eq!(over.body["kind"], "Status");
    assert_eq!(over.body["details"]["retryAfterSeconds"], json!(after));
    // Password logins from the same address share the limit, and are audited as throttled.
    let login = s.login("nobody", "x", "p1").await;
    assert_eq!(login.code, 429, "{}", login.body);
    assert!(login.header("retry-after").is_some());
    // Once Retry-After has passed, the address is answered again.
    tokio::time::sleep(Duration::from_secs(after)).await;
    assert_eq!(s.s3tokens(unknown, STS, "00").await.code, 401);
    let audit = std::fs::read_to_string(&s.audit).expect("the audit log");
    assert!(
        audit.contains("\"authentication.stratus.dev/result\":\"throttled\""),
        "{audit}"
    );

    // The limit is per source address: a server with the default limit answers a burst of
    // a hundred from one address.
    let s = server().await;
    for _ in 0..100 {
        assert_eq!(s.s3tokens(unknown, STS, "00").await.code, 401);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_access_key_is_answered_as_a_wrong_signature() {
    let s = server().await;
    s.setup(&["p1"], &[("alice", "p1")]).await;
    let (access, secret) = s3_key(&s, "alice", "p1", "alice-key").await;
    assert_eq!(
        s.s3tokens(&access, STS, &sign_v4(&secret, STS)).await.code,
        200
    );
    let wrong = s
        .s3tokens(&access, STS, &sign_v4("not-the-secret", STS))
        .await;
    let unknown = s
        .s3tokens(
            "0123456789abcdef0123456789abcdef",
            STS,
            &sign_v4(&secret, STS),
        )
        .await;
    let malformed = s.s3tokens("not/a/key", STS, &sign_v4(&secret, STS)).await;
    for other in [&unknown, &malformed] {
        assert_eq!(wrong.code, 401);
        assert_eq!(other.code, wrong.code);
        assert_eq!(other.body, wrong.body, "the bodies tell the cases apart");
        assert_eq!(
            other.header("www-authenticate"),
            wrong.header("www-authenticate")
        );
    }
    // A deleted credential's key is unknown alike.
    s.admin(
        "DELETE",
        "/apis/identity.stratus.dev/v1/namespaces/p1/s3credentials/alice-key",
        Value::Null,
    )
    .await;
    let deleted = s.s3tokens(&access, STS, &sign_v4(&secret, STS)).await;
    assert_eq!((deleted.code, &deleted.body), (401, &wrong.body));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_projects_s3_key_signs_for_nobody_even_through_its_index() {
    let s = server().await;
    s.setup(&["p1"], &[("alice", "p1")]).await;
    let (access, secret) = s3_key(&s, "alice", "p1", "alice-key").await;
    let signature = sign_v4(&secret, STS);
    let check = || s.s3tokens(&access, STS, &signature);
    assert_eq!(check().await.code, 200);
    let index = format!("{PREFIX}/_system/s3credentials/{access}");

    // The project's deletion begins (no controller here empties it): the key is refused at once.
    s.admin(
        "DELETE",
        "/apis/identity.stratus.dev/v1/projects/p1",
        Value::Null,
    )
    .await;
    assert_eq!(check().await.code, 401, "a terminating project's key");

    // Its finalizer taken away by hand, the Project goes with its namespace still full: the
    // credential and its index record are left behind, and sign for nothing.
    let project = s
        .admin(
            "GET",
            "/apis/identity.stratus.dev/v1/projects/p1",
            Value::Null,
        )
        .await;
    let mut forced = project.clone();
    forced["metadata"]["finalizers"] = json!([]);
    s.admin("PUT", "/apis/identity.stratus.dev/v1/projects/p1", forced)
        .await;
    assert_eq!(
        s.api(
            ADMIN,
            "GET",
            "/apis/identity.stratus.dev/v1/projects/p1",
            &Value::Null
        )
        .await
        .code,
        404
    );
    assert!(
        s.store.get(&index).await.expect("read etcd").is_some(),
        "the index record is what this test is about"
    );
    assert_eq!(check().await.code, 401, "a deleted project's key");

    // A new project of the same name, alice a member again: the old key is still nobody's.
    s.setup(&["p1"], &[]).await;
    s.admin(
        "POST",
        "/apis/identity.stratus.dev/v1/namespaces/p1/roleassignments",
        json!({"apiVersion": "identity.stratus.dev/v1", "kind": "RoleAssignment",
               "metadata": {"name": "alice-member-again"}, "spec": {"user": "alice", "role": "member"}}),
    )
    .await;
    assert_eq!(check().await.code, 401, "the old key in a new project p1");
    let (access2, secret2) = s3_key(&s, "alice", "p1", "alice-key-2").await;
    let fresh = s.s3tokens(&access2, STS, &sign_v4(&secret2, STS)).await;
    assert_eq!(fresh.code, 200, "{}", fresh.body);
    assert_eq!(
        fresh.body["token"]["project"]["id"],
        json!(s.project_uid("p1").await)
    );
}

/// An Image of project `ns` named `name` with `source`, `public` or not, made by the admin.
async fn image(s: &Server, ns: &str, name: &str, source: Value, public: bool) -> Value {
    let visibility = if public { "public" } else { "private" };
    s.admin(
        "POST",
        &format!("/apis/image.stratus.dev/v1/namespaces/{ns}/images"),
        json!({"apiVersion": "image.stratus.dev/v1", "kind": "Image", "metadata": {"name": name},
               "spec": {"diskFormat": "raw", "source": source, "visibility": visibility}}),
    )
    .await
}

// ---------------------------------------------------------------------------------------------
// images/NAME/data

/// `PUT images/NAME/data` of `ns` as `who` with `body` sent as `content_type`.
async fn put_data(
    s: &Server,
    who: &str,
    ns: &str,
    name: &str,
    content_type: &str,
    body: &[u8],
) -> Answer {
    let path = format!("/apis/image.stratus.dev/v1/namespaces/{ns}/images/{name}/data");
    let auth = format!("Bearer {who}");
    let headers = [
        ("Authorization", auth.as_str()),
        ("Content-Type", content_type),
    ];
    s.call("PUT", &path, &headers, body).await
}

/// `GET images/NAME/data` of `ns` as `who`.
async fn get_data(s: &Server, who: &str, ns: &str, name: &str) -> Answer {
    let path = format!("/apis/image.stratus.dev/v1/namespaces/{ns}/images/{name}/data");
    s.api(who, "GET", &path, &Value::Null).await
}

/// A connection with an upload's head sent (`length` bytes announced, or chunked without) and
/// no body yet.
async fn start_upload(
    s: &Server,
    who: &str,
    ns: &str,
    name: &str,
    length: Option<usize>,
) -> tokio::net::TcpStream {
    let mut c = tokio::net::TcpStream::connect(s.addr)
        .await
        .expect("connect");
    let framing = match length {
        Some(n) => format!("Content-Length: {n}"),
        None => "Transfer-Encoding: chunked".to_string(),
    };
    let head = format!(
        "PUT /apis/image.stratus.dev/v1/namespaces/{ns}/images/{name}/data HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nAuthorization: Bearer {who}\r\nContent-Type: application/octet-stream\r\n{framing}\r\n\r\n",
        s.addr
    );
    c.write_all(head.as_bytes()).await.expect("send the head");
    c
}

/// The Image `ns/name` as the admin reads it.
async fn read_image(s: &Server, ns: &str, name: &str) -> Value {
    s.admin(
        "GET",
        &format!("/apis/image.stratus.dev/v1/namespaces/{ns}/images/{name}"),
        Value::Null,
    )
    .await
}

/// The reason of the Image's condition `kind`.
fn reason(image: &Value, kind: &str) -> Value {
    image["status"]["conditions"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["type"] == kind))
        .map(|c| c["reason"].clone())
        .unwrap_or(Value::Null)
}

/// The upload Image `name` of p1 made (see [`upload_image`]) and `data` put to it by `who`:
/// the answer, and the Image as it is then.
async fn upload_new(
    s: &Server,
    who: &str,
    name: &str,
    format: &str,
    extra: Value,
    data: &[u8],
) -> (Answer, Value) {
    upload_image(s, "p1", name, format, extra).await;
    let r = put_data(s, who, "p1", name, "application/octet-stream", data).await;
    (r, read_image(s, "p1", name).await)
}

/// `r` is refused with `code` and a message that says `says`.
fn assert_refused(r: &Answer, code: u16, says: &str) {
    assert_eq!(r.code, code, "{}", r.body);
    assert!(
        r.body["message"].as_str().is_some_and(|m| m.contains(says)),
        "{}",
        r.body
    );
}

/// An Image of `ns` taking its data by upload, in `format`, with `extra` spec fields.
async fn upload_image(s: &Server, ns: &str, name: &str, format: &str, extra: Value) {
    let mut spec = json!({"diskFormat": format, "source": {"upload": {}}});
    if let (Some(spec), Some(extra)) = (spec.as_object_mut(), extra.as_object()) {
        spec.extend(extra.clone());
    }
    s.admin(
        "POST",
        &format!("/apis/image.stratus.dev/v1/namespaces/{ns}/images"),
        json!({"apiVersion": "image.stratus.dev/v1", "kind": "Image", "metadata": {"name": name},
               "spec": spec}),
    )
    .await;
}

/// Image data goes in only through a member who may update the Image, as octet-stream, for an
/// Image with `source.upload`; it comes out only to who may read it (a node: only for what is
/// placed on it); an Image of another source is neither uploaded to nor served here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_data_is_uploaded_and_read_only_by_whoever_may() {
    let s = server().await;
    s.setup(&["p1", "p2"], &[("alice", "p1"), ("bob", "p2")])
        .await;
    upload_image(&s, "p1", "up", "raw", json!({})).await;
    image(
        &s,
        "p1",
        "web",
        json!({"url": "https://example.org/d.raw"}),
        false,
    )
    .await;
    let (alice, bob) = (s.token("alice", "p1").await, s.token("bob", "p2").await);
    let data = vec![7u8; 4096];
    let octets = "application/octet-stream";

    // Another project's member, a node and the proxy's service identity upload nothing.
    for who in [bob.as_str(), NODE, PROXY] {
        let r = put_data(&s, who, "p1", "up", octets, &data).await;
        assert_eq!(r.code, 403, "{who}: {}", r.body);
    }
    // Data is octets: a JSON body is refused before anything is read.
    let r = put_data(&s, &alice, "p1", "up", "application/json", b"{}").await;
    assert_eq!(r.code, 415, "{}", r.body);
    // An Image of a URL is not uploaded to, and says which field.
    let r = put_data(&s, &alice, "p1", "web", octets, &data).await;
    assert_eq!(r.code, 400, "{}", r.body);
    assert_eq!(r.body["details"]["causes"][0]["field"], "spec.source");
    // No such Image.
    let r = put_data(&s, &alice, "p1", "nope", octets, &data).await;
    assert_eq!(r.code, 404, "{}", r.body);
    // Nothing was recorded by any of them.
    let up = read_image(&s, "p1", "up").await;
    assert_eq!(up["status"]["phase"], Value::Null, "{}", up["status"]);

    // Reading: not before it is Active; never another project's member or a node with
    // nothing placed on it; never an Image of a URL.
    let r = get_data(&s, &alice, "p1", "up").await;
    assert_eq!(r.code, 409, "{}", r.body);
    for who in [bob.as_str(), NODE] {
        let r = get_data(&s, who, "p1", "up").await;
        assert_eq!(r.code, 403, "{who}: {}", r.body);
    }
    let r = get_data(&s, &alice, "p1", "web").await;
    assert_eq!(r.code, 400, "{}", r.body);
    assert_eq!(r.body["details"]["causes"][0]["field"], "spec.source");
    // An image's data goes with the image, removed for it by the system alone.
    let r = s
        .api(
            &alice,
            "DELETE",
            "/apis/image.stratus.dev/v1/namespaces/p1/images/up/data",
            &Value::Null,
        )
        .await;
    assert_eq!(r.code, 403, "{}", r.body);
}

/// Data that is too large, is not what the Image declares, names a backing file or does not
/// match `spec.sha256` is refused with a 4xx naming why, and the Image says so in its
/// conditions with no size, checksum or location recorded; good data the object store does
/// not take leaves the Image waiting for an upload. Each such refusal leaves the Image open
/// to the next upload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_image_data_is_refused_and_recorded_as_refused() {
    // An object store that is not there: the data's checks come first.
    let s = server_with(|c| {
        c.image_max_bytes = 512 * 1024;
        c.object_store_url = Some(format!("http://127.0.0.1:{}", free_port()));
    })
    .await;
    s.setup(&["p1"], &[("alice", "p1")]).await;
    let alice = s.token("alice", "p1").await;
    let octets = "application/octet-stream";
    let unrecorded = |image: &Value| {
        let st = &image["status"];
        assert_eq!(st["sha256"], Value::Null, "{st}");
        assert_eq!(st["sizeBytes"], Value::Null, "{st}");
        assert_eq!(st["stored"], Value::Null, "{st}");
        assert_ne!(st["phase"], "Active", "{st}");
    };

    // Too large, said up front: refused before the body is read.
    upload_image(&s, "p1", "big", "raw", json!({})).await;
    let r = put_data(&s, &alice, "p1", "big", octets, &vec![0u8; 512 * 1024 + 1]).await;
    assert_eq!(r.code, 413, "{}", r.body);
    // Too large, found while streaming (chunked, no length): cut, refused, recorded.
    let mut c = start_upload(&s, &alice, "p1", "big", None).await;
    let chunk = vec![1u8; 128 * 1024];
    for _ in 0..5 {
        let mut piece = format!("{:x}\r\n", chunk.len()).into_bytes();
        piece.extend_from_slice(&chunk);
        piece.extend_from_slice(b"\r\n");
        if c.write_all(&piece).await.is_err() {
            break;
        }
    }
    let _ = c.write_all(b"0\r\n\r\n").await;
    let r = answer(&mut c).await;
    assert_eq!(r.code, 413, "{}", r.body);
    let big = read_image(&s, "p1", "big").await;
    assert_eq!(
        reason(&big, "Verified"),
        "DownloadTooLarge",
        "{}",
        big["status"]
    );
    unrecorded(&big);

    // A qcow2 naming a backing file.
    let dir = tempfile::tempdir().expect("temp dir");
    let backed = dir.path().join("backed.qcow2");
    let ok = Command::new("qemu-img")
        .args(["create", "-f", "qcow2", "-b", "/etc/hostname", "-F", "raw"])
        .arg(&backed)
        .arg("1M")
        .stdout(Stdio::null())
        .status()
        .expect("run qemu-img");
    assert!(ok.success());
    let bytes = std::fs::read(&backed).expect("read the image");
    let (r, backed) = upload_new(&s, &alice, "backed", "qcow2", json!({}), &bytes).await;
    assert_refused(&r, 400, "backing");
    assert_eq!(
        reason(&backed, "Verified"),
        "BackingFile",
        "{}",
        backed["status"]
    );
    unrecorded(&backed);

    // Raw bytes for an Image declared qcow2.
    let (r, wrong) = upload_new(&s, &alice, "wrong", "qcow2", json!({}), &vec![0u8; 4096]).await;
    assert_eq!(r.code, 400, "{}", r.body);
    assert!(
        matches!(
            reason(&wrong, "Verified").as_str(),
            Some("FormatMismatch" | "Unreadable")
        ),
        "{}",
        wrong["status"]
    );
    unrecorded(&wrong);

    // Data that is not what spec.sha256 says.
    let (r, pinned) = upload_new(
        &s,
        &alice,
        "pinned",
        "raw",
        json!({"sha256": "0".repeat(64)}),
        &vec![0u8; 4096],
    )
    .await;
    assert_eq!(r.code, 400, "{}", r.body);
    assert_eq!(
        reason(&pinned, "Verified"),
        "ChecksumMismatch",
        "{}",
        pinned["status"]
    );
    unrecorded(&pinned);

    // Good data the object store does not take: 503, and the Image waits for its data.
    let (r, good) = upload_new(&s, &alice, "good", "raw", json!({}), &vec![0u8; 4096]).await;
    assert_eq!(r.code, 503, "{}", r.body);
    assert_eq!(
        reason(&good, "Ready"),
        "AwaitingUpload",
        "{}",
        good["status"]
    );
    unrecorded(&good);
    // The refused ones can be uploaded again (refused again here, not held).
    let r = put_data(&s, &alice, "p1", "big", octets, &vec![0u8; 4096]).await;
    assert_eq!(r.code, 503, "{}", r.body);
}

/// One upload of an Image at a time: while one streams, a second is 409 and the Image shows
/// `Uploading`; once it ends, the next may start. An Active Image's data never changes (409).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_upload_of_an_image_is_a_conflict() {
    let (s, alice) = unstored().await;
    let octets = "application/octet-stream";
    upload_image(&s, "p1", "disk", "raw", json!({})).await;
    let data = vec![3u8; 8192];
    let mut first = upload_under_way(&s, &alice, "p1", "disk", &data).await;
    let uploading = read_image(&s, "p1", "disk").await;
    assert_eq!(reason(&uploading, "Ready"), "Uploading");
    let second = put_data(&s, &alice, "p1", "disk", octets, &data).await;
    assert_refused(&second, 409, "under way");
    // The first ends (the object store is not there: 503), and frees the image.
    first.write_all(&data[1024..]).await.expect("send the rest");
    assert_eq!(answer(&mut first).await.code, 503);
    let next = put_data(&s, &alice, "p1", "disk", octets, &data).await;
    assert_eq!(next.code, 503, "{}", next.body);

    // An Active image (as an upload leaves it) takes no new data.
    let path = "/apis/image.stratus.dev/v1/namespaces/p1/images/disk/status";
    let r = merge_patch(&s, path, json!({"status": {"phase": "Active"}})).await;
    assert_eq!(r.code, 200, "{}", r.body);
    let again = put_data(&s, &alice, "p1", "disk", octets, &data).await;
    assert_refused(&again, 409, "Active");
}

/// A merge patch of `path` by the admin.
async fn merge_patch(s: &Server, path: &str, body: Value) -> Answer {
    let auth = format!("Bearer {ADMIN}");
    let headers = [
        ("Authorization", auth.as_str()),
        ("Content-Type", "application/merge-patch+json"),
    ];
    s.call("PATCH", path, &headers, body.to_string().as_bytes())
        .await
}

/// An API server whose object store is not there, with project p1 and its member alice
/// (whose token comes with it).
async fn unstored() -> (Server, String) {
    unstored_with(|_| {}).await
}

/// [`unstored`], its configuration changed by `tune` first.
async fn unstored_with(tune: impl FnOnce(&mut stratus_apiserver::Config)) -> (Server, String) {
    let s = server_with(|c| {
        c.object_store_url = Some(format!("http://127.0.0.1:{}", free_port()));
        tune(c);
    })
    .await;
    s.setup(&["p1"], &[("alice", "p1")]).await;
    let alice = s.token("alice", "p1").await;
    (s, alice)
}

/// An upload under way until its Image shows `Uploading`: its head and the first KiB of
/// `data` sent.
async fn upload_under_way(
    s: &Server,
    who: &str,
    ns: &str,
    name: &str,
    data: &[u8],
) -> tokio::net::TcpStream {
    let mut c = start_upload(s, who, ns, name, Some(data.len())).await;
    c.write_all(&data[..1024]).await.expect("send a part");
    for _ in 0..600 {
        if read_image(s, ns, name).await["status"]["phase"] == "Uploading" {
            return c;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the upload of {ns}/{name} did not start within 30 s");
}

/// An upload whose Image goes Active while it streams writes nothing of its own (409): the
/// Active status stays as it was written; an upload whose Image is deleted and made anew
/// under its name while it streams (409) leaves the new Image untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_never_overwrites_an_active_or_recreated_image() {
    let (s, alice) = unstored().await;
    let data = vec![5u8; 8192];

    upload_image(&s, "p1", "disk", "raw", json!({})).await;
    let mut c = upload_under_way(&s, &alice, "p1", "disk", &data).await;
    let active = json!({"phase": "Active", "sizeBytes": 1234, "sha256": "a".repeat(64),
                        "stored": {"container": "elsewhere", "object": "kept"}});
    let r = merge_patch(
        &s,
        "/apis/image.stratus.dev/v1/namespaces/p1/images/disk/status",
        json!({ "status": active }),
    )
    .await;
    assert_eq!(r.code, 200, "{}", r.body);
    c.write_all(&data[1024..]).await.expect("send the rest");
    let r = answer(&mut c).await;
    assert_eq!(r.code, 409, "{}", r.body);
    let disk = read_image(&s, "p1", "disk").await;
    for f in ["phase", "sizeBytes", "sha256", "stored"] {
        assert_eq!(disk["status"][f], active[f], "{}", disk["status"]);
    }

    upload_image(&s, "p1", "again", "raw", json!({})).await;
    let mut c = upload_under_way(&s, &alice, "p1", "again", &data).await;
    let path = "/apis/image.stratus.dev/v1/namespaces/p1/images/again";
    let old = read_image(&s, "p1", "again").await["metadata"]["uid"].clone();
    s.admin("DELETE", path, Value::Null).await;
    upload_image(&s, "p1", "again", "raw", json!({})).await;
    let fresh = read_image(&s, "p1", "again").await;
    assert_ne!(fresh["metadata"]["uid"], old, "{fresh}");
    c.write_all(&data[1024..]).await.expect("send the rest");
    let r = answer(&mut c).await;
    assert_eq!(r.code, 409, "{}", r.body);
    let now = read_image(&s, "p1", "again").await;
    assert_eq!(now["status"], fresh["status"], "{now}");
    assert_eq!(
        now["metadata"]["resourceVersion"], fresh["metadata"]["resourceVersion"],
        "{now}"
    );
}

/// How many leases `s`'s etcd holds.
async fn leases(s: &Server) -> usize {
    let mut c = etcd_client::Client::connect([s.etcd.endpoint()], None)
        .await
        .expect("connect to etcd");
    c.leases().await.expect("list the leases").leases().len()
}

/// Waits (at most 30 s) until `s`'s etcd holds at most `most` leases.
async fn leases_at_most(s: &Server, most: usize) {
    let mut n = 0;
    for _ in 0..300 {
        n = leases(s).await;
        if n <= most {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("etcd holds {n} leases, more than {most}");
}

/// An upload's lease in etcd ends with it: uploads refused while another holds the Image
/// leave no lease behind, and the one that held it leaves none once it ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_uploads_leave_no_lease_behind() {
    let (s, alice) = unstored().await;
    upload_image(&s, "p1", "disk", "raw", json!({})).await;
    let data = vec![9u8; 8192];
    let before = leases(&s).await;

    let mut held = upload_under_way(&s, &alice, "p1", "disk", &data).await;
    for _ in 0..5 {
        let r = put_data(&s, &alice, "p1", "disk", "application/octet-stream", &data).await;
        assert_eq!(r.code, 409, "{}", r.body);
    }
    leases_at_most(&s, before + 1).await;
    held.write_all(&data[1024..]).await.expect("send the rest");
    assert_eq!(answer(&mut held).await.code, 503);
    leases_at_most(&s, before).await;
}

/// Image uploads and downloads have places of their own: a slow upload holds none of the
/// writes' (a create goes through with one mutating place), and past the transfers' limit
/// another upload is 429 with Retry-After. An upload slower than the minimum rate is cut off
/// with 408 within a couple of windows, not after the minute of silence an upload may keep,
/// and its place is free again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_transfers_have_their_own_places_and_a_minimum_rate() {
    let window = Duration::from_secs(4);
    let (s, alice) = unstored_with(|c| {
        c.limits.max_mutating_requests_inflight = 1;
        c.limits.max_image_transfers = 1;
        c.limits.image_min_rate = stratus_apiserver::http::limits::MinRate {
            bytes_per_second: 64 * 1024,
            window,
        };
    })
    .await;
    upload_image(&s, "p1", "slow", "raw", json!({})).await;
    upload_image(&s, "p1", "other", "raw", json!({})).await;
    let data = vec![1u8; 512 * 1024];
    let started = std::time::Instant::now();
    let mut slow = upload_under_way(&s, &alice, "p1", "slow", &data).await;

    // The only mutating place is free for writes.
    let r = s
        .api(
            ADMIN,
            "POST",
            "/apis/image.stratus.dev/v1/namespaces/p1/images",
            &json!({"apiVersion": "image.stratus.dev/v1", "kind": "Image", "metadata": {"name": "made"},
                    "spec": {"diskFormat": "raw", "source": {"upload": {}}}}),
        )
        .await;
    assert_eq!(r.code, 201, "{}", r.body);
    // The only transfer place is not.
    let r = put_data(&s, &alice, "p1", "other", "application/octet-stream", &data).await;
    assert_eq!(r.code, 429, "{}", r.body);
    assert!(r.header("retry-after").is_some(), "{:?}", r.headers);

    // 1 KiB in a window that needs 256: cut off.
    let r = answer(&mut slow).await;
    assert_refused(&r, 408, "too slow");
    let took = started.elapsed();
    assert!(took < window * 4, "cut off after {took:?}");
    let image = read_image(&s, "p1", "slow").await;
    assert_eq!(
        reason(&image, "Ready"),
        "AwaitingUpload",
        "{}",
        image["status"]
    );
    // Its place is free: the next upload is served (and meets the missing object store).
    let r = put_data(&s, &alice, "p1", "other", "application/octet-stream", &data).await;
    assert_eq!(r.code, 503, "{}", r.body);
}

/// No user holds more than a quarter of the transfer places: past its share, a user's next
/// upload is 429 naming the limit, while a system identity's is still served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_holds_at_most_its_share_of_the_transfers() {
    let (s, alice) = unstored_with(|c| c.limits.max_image_transfers = 8).await;
    for name in ["a", "b", "c", "d"] {
        upload_image(&s, "p1", name, "raw", json!({})).await;
    }
    let data = vec![3u8; 8 * 1024];
    let _a = upload_under_way(&s, &alice, "p1", "a", &data).await;
    let _b = upload_under_way(&s, &alice, "p1", "b", &data).await;
    let r = put_data(&s, &alice, "p1", "c", "application/octet-stream", &data).await;
    assert_refused(&r, 429, "at most 2 per user");
    assert!(r.header("retry-after").is_some(), "{:?}", r.headers);
    // Served past the transfer places (and meets the missing object store).
    let r = put_data(&s, ADMIN, "p1", "d", "application/octet-stream", &data).await;
    assert_eq!(r.code, 503, "{}", r.body);
}

/// What uploads stage on disk is bounded in all: an upload that could never fit is 507 before
/// anything is read; one whose bytes do not fit beside those of another under way is 429 with
/// Retry-After, and fits once the other is done: an upload holds room for the bytes it sent,
/// not for those it announced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn staged_uploads_are_bounded_in_all() {
    let (s, alice) = unstored_with(|c| c.image_staging_max_bytes = 64 * 1024).await;
    let octets = "application/octet-stream";
    for name in ["a", "b", "huge"] {
        upload_image(&s, "p1", name, "raw", json!({})).await;
    }
    let r = put_data(&s, &alice, "p1", "huge", octets, &vec![0u8; 65 * 1024]).await;
    assert_eq!(r.code, 507, "{}", r.body);
    let huge = read_image(&s, "p1", "huge").await;
    assert_eq!(huge["status"]["phase"], Value::Null, "{}", huge["status"]);

    let data = vec![2u8; 40 * 1024];
    let mut a = upload_under_way(&s, &alice, "p1", "a", &data).await;
    // The whole room, beside a's first KiB.
    let r = put_data(&s, &alice, "p1", "b", octets, &vec![2u8; 64 * 1024]).await;
    assert_eq!(r.code, 429, "{}", r.body);
    assert!(r.header("retry-after").is_some(), "{:?}", r.headers);
    a.write_all(&data[1024..]).await.expect("send the rest");
    assert_eq!(answer(&mut a).await.code, 503);
    // The room is given back: b is staged (and meets the missing object store).
    let r = put_data(&s, &alice, "p1", "b", octets, &data).await;
    assert_eq!(r.code, 503, "{}", r.body);
}

/// Once Active, what an Image's data is cannot change: its source, format and checksum are
/// 422 naming the field; its visibility may change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_active_images_data_fields_are_immutable() {
    let (s, _) = unstored().await;
    upload_image(&s, "p1", "disk", "raw", json!({})).await;
    let path = "/apis/image.stratus.dev/v1/namespaces/p1/images/disk";
    // Before it is Active, the format may still be corrected.
    let r = merge_patch(&s, path, json!({"spec": {"diskFormat": "qcow2"}})).await;
    assert_eq!(r.code, 200, "{}", r.body);
    let r = merge_patch(
        &s,
        &format!("{path}/status"),
        json!({"status": {"phase": "Active"}}),
    )
    .await;
    assert_eq!(r.code, 200, "{}", r.body);
    for (spec, field) in [
        (json!({"diskFormat": "raw"}), "spec.diskFormat"),
        (json!({"sha256": "a".repeat(64)}), "spec.sha256"),
        (
            json!({"source": {"upload": null, "url": "https://example.org/d.raw"}}),
            "spec.source",
        ),
        (json!({"containerFormat": "aki"}), "spec.containerFormat"),
    ] {
        let r = merge_patch(&s, path, json!({ "spec": spec })).await;
        assert_eq!(r.code, 422, "{spec}: {}", r.body);
        assert_eq!(r.body["details"]["causes"][0]["field"], field, "{}", r.body);
    }
    let r = merge_patch(&s, path, json!({"spec": {"visibility": "public"}})).await;
    assert_eq!(r.code, 200, "{}", r.body);
    let disk = read_image(&s, "p1", "disk").await;
    assert_eq!(disk["spec"]["diskFormat"], "qcow2", "{}", disk["spec"]);
}

/// The data of a deleted Image is removed for it by the system alone, never while the Image
/// lives or an upload is under way, and its finalizer stays until the object store has
/// removed it; a deleting Image takes no upload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_images_data_finalizer_stays_until_its_data_is_removed() {
    let (s, alice) = unstored().await;
    let octets = "application/octet-stream";
    upload_image(&s, "p1", "disk", "raw", json!({})).await;
    let path = "/apis/image.stratus.dev/v1/namespaces/p1/images/disk";
    let data_path = format!("{path}/data");
    let mut disk = read_image(&s, "p1", "disk").await;
    disk["metadata"]["finalizers"] = json!(["image.stratus.dev/stored-data"]);
    s.admin("PUT", path, disk).await;

    // A live Image's data is not removed.
    let r = s.api(ADMIN, "DELETE", &data_path, &Value::Null).await;
    assert_eq!(r.code, 409, "{}", r.body);

    // While an upload is under way, not even a deleting Image's.
    let data = vec![4u8; 8192];
    let mut c = upload_under_way(&s, &alice, "p1", "disk", &data).await;
    s.admin("DELETE", path, Value::Null).await;
    let r = s.api(ADMIN, "DELETE", &data_path, &Value::Null).await;
    assert_refused(&r, 409, "upload");
    // That upload ends refused (the image is going), and no new one starts.
    c.write_all(&data[1024..]).await.expect("send the rest");
    assert_eq!(answer(&mut c).await.code, 409);
    let r = put_data(&s, &alice, "p1", "disk", octets, &data).await;
    assert_eq!(r.code, 409, "{}", r.body);

    // The object store is not there: the finalizer stays, and the Image with it.
    let r = s.api(ADMIN, "DELETE", &data_path, &Value::Null).await;
    assert_eq!(r.code, 503, "{}", r.body);
    let disk = read_image(&s, "p1", "disk").await;
    assert_eq!(
        disk["metadata"]["finalizers"],
        json!(["image.stratus.dev/stored-data"]),
        "{disk}"
    );
}
