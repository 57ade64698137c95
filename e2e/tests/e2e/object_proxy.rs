//! Swift's proxy with Stratus identity: Debian's account, container and object servers on one
//! directory device (rings from swift-ring-builder) and `swift-proxy-server` with
//! keystonemiddleware's `authtoken`, `s3api`, `s3token` and `keystoneauth` pointed at a
//! Stratus API server's `/identity/v3`, validating tokens as a service identity of its own.
//! python-swiftclient logs in with a Stratus user's password and PUTs, GETs, LISTs and DELETEs;
//! boto3 does the same with an S3 key issued through the Stratus API; another project's user,
//! a wrong S3 secret and a revoked token are refused. A project deleted on `stratus up` (its
//! controller emptying it) takes its S3 credentials and their index records out of etcd.
//! Needs Debian's swift-proxy, swift-account, swift-container, swift-object,
//! python3-keystonemiddleware, python3-swiftclient and python3-boto3 (scripts/setup.sh).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use serde_json::{Value, json};
use stratus_e2e::{Apiserver, Etcd, Proc, free_port, wait_until};

/// Generous: four Python servers start on a loaded machine.
const WAIT: Duration = Duration::from_secs(120);
/// The proxy's own identity in the API server's token file.
pub(super) const PROXY_TOKEN: &str = "e2e-object-proxy-token-0123456789";

/// The Swift servers of one node, and the proxy, each killed when dropped.
struct Swift {
    dir: tempfile::TempDir,
    procs: Vec<Proc>,
    proxy: u16,
}

impl Swift {
    /// Rings of one device (built by swift-ring-builder) and the four servers, the proxy's
    /// identity middleware pointed at `identity` (its CA `ca`).
    fn start(identity: &str, ca: &Path, proxy: u16) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let root = dir.path();
        std::fs::create_dir_all(root.join("devices/d1"))?;
        let ports = [
            ("account", free_port()),
            ("container", free_port()),
            ("object", free_port()),
        ];
        for (kind, port) in ports {
            let builder = root.join(format!("{kind}.builder"));
            let b = builder.to_str().context("path")?;
            for args in [
                vec![b, "create", "4", "1", "0"],
                vec![b, "add", &format!("r1z1-127.0.0.1:{port}/d1"), "100"],
                vec![b, "rebalance"],
            ] {
                let out = Command::new("swift-ring-builder").args(&args).output()?;
                // rebalance exits 1 with a warning on a one-device ring; the ring is written.
                ensure!(
                    out.status.code().is_some_and(|c| c <= 1),
                    "swift-ring-builder {}: {}",
                    args.join(" "),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            ensure!(
                root.join(format!("{kind}.ring.gz")).exists(),
                "no {kind} ring"
            );
            std::fs::write(
                root.join(format!("{kind}-server.conf")),
                format!(
                    "[DEFAULT]\nbind_ip = 127.0.0.1\nbind_port = {port}\nworkers = 0\nuser = root\n\
                     devices = {devices}\nmount_check = false\nswift_dir = {swift_dir}\n\
                     log_level = INFO\n\n\
                     [pipeline:main]\npipeline = {kind}-server\n\n\
                     [app:{kind}-server]\nuse = egg:swift#{kind}\n",
                    devices = root.join("devices").display(),
                    swift_dir = root.display(),
                ),
            )?;
        }
        std::fs::write(
            root.join("proxy-server.conf"),
            proxy_conf(proxy, root, identity, ca),
        )?;
        let mut swift = Self {
            procs: Vec::new(),
            proxy,
            dir,
        };
        for kind in ["account", "container", "object", "proxy"] {
            let root = swift.dir.path();
            let p = Proc::spawn(
                &format!("swift-{kind}-server"),
                Command::new("/usr/bin/python3")
                    .arg(format!("/usr/bin/swift-{kind}-server"))
                    .arg(root.join(format!("{kind}-server.conf"))),
                &root.join(format!("{kind}.log")),
            )?;
            swift.procs.push(p);
        }
        for (kind, port) in ports.iter().copied().chain([("proxy", proxy)]) {
            wait_until(WAIT, &format!("swift's {kind} server"), || {
                std::net::TcpStream::connect(("127.0.0.1", port)).ok()
            })
            .with_context(|| swift.logs())?;
        }
        Ok(swift)
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.proxy)
    }

    fn logs(&self) -> String {
        ["account", "container", "object", "proxy"]
            .iter()
            .map(|k| {
                let log = std::fs::read_to_string(self.dir.path().join(format!("{k}.log")))
                    .unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(40).collect();
                format!(
                    "--- {k}\n{}\n",
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                )
            })
            .collect()
    }

    /// An object's path in the device (every object file under it).
    fn object_files(&self) -> Vec<PathBuf> {
        let mut out = Vec::new();
        let mut stack = vec![self.dir.path().join("devices/d1/objects")];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                let p = e.path();
                if p.is_dir() {
                    stack.push(p);
                } else if p.extension().is_some_and(|x| x == "data") {
                    out.push(p);
                }
            }
        }
        out
    }
}

/// A Swift proxy's configuration on 127.0.0.1:`port`, its rings in `swift_dir`, with
/// keystonemiddleware's `authtoken`, `s3api`, `s3token` and `keystoneauth` pointed at the
/// Stratus identity at `identity` (its CA `ca`), as the proxy's own service identity.
pub(super) fn proxy_conf(port: u16, swift_dir: &Path, identity: &str, ca: &Path) -> String {
    stratus_e2e::swift_proxy_conf("127.0.0.1", port, swift_dir, identity, ca, PROXY_TOKEN)
}

/// Runs a command; its output, or an error with its stderr.
pub(super) fn run(cmd: &mut Command, what: &str) -> Result<Output> {
    let out = cmd.output().with_context(|| format!("run {what}"))?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out)
}

/// python-swiftclient's `swift` command, logged in as `user` of `project` with a password.
fn swift_cli(api: &Apiserver, user: &str, project: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new("swift");
    cmd.args(["--auth-version", "3"])
        .args(["--os-auth-url", &format!("{}/identity/v3", api.url)])
        .args(["--os-username", user, "--os-password", &password(user)])
        .args(["--os-project-name", project])
        .args(["--os-user-domain-name", "Default"])
        .args(["--os-project-domain-name", "Default"])
        .arg("--os-cacert")
        .arg(api.ca_file())
        .args(args);
    cmd
}

fn password(user: &str) -> String {
    format!("{user}-object-pw-1")
}

/// Makes a User with a password and a member role in `project`.
fn user(api: &Apiserver, name: &str, project: &str) -> Result<()> {
    member(|args, stdin| api.kubectl_in(args, stdin), name, project)
}

/// Makes a User `name` with its password ([`password`]) and a member role in `project`,
/// through `kubectl_in` (kubectl with standard input, of an API server or a cloud).
pub(super) fn member(
    kubectl_in: impl Fn(&[&str], &str) -> Result<String>,
    name: &str,
    project: &str,
) -> Result<()> {
    kubectl_in(
        &["apply", "-f", "-"],
        &format!(
            "apiVersion: identity.stratus.dev/v1\nkind: User\nmetadata:\n  name: {name}\nspec: {{}}\n---\n\
             apiVersion: identity.stratus.dev/v1\nkind: RoleAssignment\nmetadata:\n  name: {name}-member\n  namespace: {project}\nspec:\n  user: {name}\n  role: member\n"
        ),
    )?;
    kubectl_in(
        &[
            "replace",
            "--raw",
            &format!("/apis/identity.stratus.dev/v1/users/{name}/password"),
            "-f",
            "-",
        ],
        &json!({"password": password(name)}).to_string(),
    )?;
    Ok(())
}

/// A token of `user` scoped to `project`, from a Keystone password login (curl).
fn keystone_token(api: &Apiserver, user: &str, project: &str) -> Result<String> {
    keystone_login(&api.url, &api.ca_file(), user, project)
}

/// A token of `user` (password [`password`]) scoped to `project`, from a Keystone password
/// login (curl) to the API server at `url` (its CA `ca`).
pub(super) fn keystone_login(url: &str, ca: &Path, user: &str, project: &str) -> Result<String> {
    let body = json!({"auth": {
        "identity": {"methods": ["password"], "password": {"user": {"name": user, "domain": {"id": "default"}, "password": password(user)}}},
        "scope": {"project": {"name": project, "domain": {"id": "default"}}},
    }});
    let out = run(
        Command::new("curl")
            .args(["-sS", "-i", "--fail", "--cacert"])
            .arg(ca)
            .args(["-H", "Content-Type: application/json", "--data-binary"])
            .arg(body.to_string())
            .arg(format!("{url}/identity/v3/auth/tokens")),
        "curl a Keystone login",
    )?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| {
            l.split_once(':')
                .filter(|(k, _)| k.eq_ignore_ascii_case("x-subject-token"))
                .map(|(_, v)| v.trim().to_string())
        })
        .context("no X-Subject-Token")
}

/// The status code of a Swift API call with `token` (curl).
pub(super) fn swift_status(method: &str, url: &str, token: &str) -> Result<u16> {
    let out = run(
        Command::new("curl")
            .args(["-sS", "-o", "/dev/null", "-w", "%{http_code}", "-X", method])
            .args(["-H", &format!("X-Auth-Token: {token}")])
            .arg(url),
        "curl the Swift proxy",
    )?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().parse()?)
}

/// boto3 against the proxy with an S3 key. `all`: a bucket made, an object put, read, listed
/// and deleted, the bucket deleted, printing what it read and listed as JSON; `list`: the
/// buckets listed, printing "ok" or the error code.
const BOTO: &str = r#"
import sys, json, boto3, botocore
from botocore.config import Config
mode, url, access, secret = sys.argv[1:5]
s3 = boto3.client("s3", endpoint_url=url, aws_access_key_id=access, aws_secret_access_key=secret,
                  region_name="us-east-1",
                  config=Config(s3={"addressing_style": "path"}, signature_version="s3v4",
                                retries={"max_attempts": 1}))
if mode == "list":
    try:
        s3.list_buckets()
        print("ok")
    except botocore.exceptions.ClientError as e:
        print(e.response["Error"]["Code"])
    sys.exit(0)
s3.create_bucket(Bucket="bucket1")
s3.put_object(Bucket="bucket1", Key="hello.txt", Body=b"hello from s3")
got = s3.get_object(Bucket="bucket1", Key="hello.txt")["Body"].read().decode()
listed = [o["Key"] for o in s3.list_objects_v2(Bucket="bucket1").get("Contents", [])]
s3.delete_object(Bucket="bucket1", Key="hello.txt")
after = [o["Key"] for o in s3.list_objects_v2(Bucket="bucket1").get("Contents", [])]
s3.delete_bucket(Bucket="bucket1")
print(json.dumps({"got": got, "listed": listed, "after": after}))
"#;

fn boto(mode: &str, swift: &Swift, access: &str, secret: &str) -> Result<String> {
    let out = run(
        Command::new("/usr/bin/python3").args(["-c", BOTO, mode, &swift.url(), access, secret]),
        "boto3",
    )?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

#[test]
fn swift_and_s3_with_stratus_identity() -> Result<()> {
    let etcd = Etcd::start()?;
    let proxy = free_port();
    let object_store = format!("http://127.0.0.1:{proxy}");
    let mut api =
        Apiserver::start_with_flags(&etcd.endpoint, &["--object-store-url", &object_store])?;
    api.add_token(PROXY_TOKEN, "system:service:object-proxy")?;
    api.projects(&["op1", "op2"])?;
    user(&api, "olive", "op1")?;
    user(&api, "oscar", "op2")?;
    let p1 = api.kubectl_ok(&["get", "project", "op1", "-o", "jsonpath={.metadata.uid}"])?;
    let swift = Swift::start(&format!("{}/identity/v3", api.url), &api.ca_file(), proxy)?;
    let ctx = |what: &str| format!("{what}\n{}", swift.logs());

    // python-swiftclient with olive's password: the catalog leads it to AUTH_<op1's uid>.
    let file = swift.dir.path().join("hello.txt");
    std::fs::write(&file, "hello from swift")?;
    let stat = run(
        &mut swift_cli(&api, "olive", "op1", &["stat"]),
        "swift stat",
    )
    .with_context(|| ctx("swift stat"))?;
    let stat = String::from_utf8_lossy(&stat.stdout).to_string();
    ensure!(
        stat.contains(&format!("AUTH_{p1}")),
        "not op1's account: {stat}"
    );
    run(
        swift_cli(&api, "olive", "op1", &["upload", "c1", "hello.txt"])
            .current_dir(swift.dir.path()),
        "swift upload",
    )
    .with_context(|| ctx("swift upload"))?;
    ensure!(!swift.object_files().is_empty(), "no object on the device");
    let listed = run(
        &mut swift_cli(&api, "olive", "op1", &["list", "c1"]),
        "swift list",
    )?;
    ensure!(
        String::from_utf8_lossy(&listed.stdout).trim() == "hello.txt",
        "listed {listed:?}"
    );
    let got = run(
        &mut swift_cli(
            &api,
            "olive",
            "op1",
            &["download", "c1", "hello.txt", "-o", "-"],
        ),
        "swift download",
    )?;
    ensure!(
        got.stdout == b"hello from swift",
        "downloaded {:?}",
        got.stdout
    );

    // Another project's user is refused on op1's account, with its own token and password.
    let account = format!("{}/v1/AUTH_{p1}", swift.url());
    let oscar = keystone_token(&api, "oscar", "op2")?;
    ensure!(
        swift_status("GET", &format!("{account}/c1"), &oscar)? == 403,
        "oscar read op1's container"
    );
    ensure!(
        swift_status("GET", &format!("{account}/c1/hello.txt"), &oscar)? == 403,
        "oscar read op1's object"
    );
    ensure!(
        swift_status("DELETE", &format!("{account}/c1/hello.txt"), &oscar)? == 403,
        "oscar deleted op1's object"
    );
    let refused = swift_cli(
        &api,
        "oscar",
        "op2",
        &["--os-storage-url", &account, "list", "c1"],
    )
    .output()?;
    ensure!(
        !refused.status.success(),
        "oscar listed op1's container with swift"
    );
    // Nor can oscar log in to op1.
    ensure!(
        keystone_token(&api, "oscar", "op1").is_err(),
        "oscar got a token for op1"
    );
    ensure!(
        swift_status("GET", &format!("{account}/c1"), "st1.forged.token")? == 401,
        "a forged token"
    );

    // A revoked token stops working at once (the proxy caches no validation here).
    let olive = keystone_token(&api, "olive", "op1")?;
    ensure!(
        swift_status("GET", &format!("{account}/c1"), &olive)? == 200,
        "olive's token"
    );
    run(
        Command::new("curl")
            .args(["-sS", "--fail", "-X", "DELETE", "--cacert"])
            .arg(api.ca_file())
            .args([
                "-H",
                &format!("X-Auth-Token: {olive}"),
                "-H",
                &format!("X-Subject-Token: {olive}"),
            ])
            .arg(format!("{}/identity/v3/auth/tokens", api.url)),
        "revoke olive's token",
    )?;
    ensure!(
        swift_status("GET", &format!("{account}/c1"), &olive)? == 401,
        "a revoked token"
    );

    run(
        &mut swift_cli(&api, "olive", "op1", &["delete", "c1", "hello.txt"]),
        "swift delete",
    )?;
    let listed = run(
        &mut swift_cli(&api, "olive", "op1", &["list", "c1"]),
        "swift list",
    )?;
    ensure!(
        listed.stdout.iter().all(u8::is_ascii_whitespace),
        "still listed: {listed:?}"
    );

    // boto3 with an S3 key issued through the Stratus API.
    let made = api.kubectl_in(
        &["create", "-f", "-", "-o", "json"],
        "apiVersion: identity.stratus.dev/v1\nkind: S3Credential\nmetadata:\n  name: olive-s3\n  namespace: op1\nspec:\n  user: olive\n",
    )?;
    let made: Value = serde_json::from_str(&made)?;
    let access = made["status"]["accessKeyId"]
        .as_str()
        .context("no access key")?
        .to_string();
    let secret = made["status"]["secretAccessKey"]
        .as_str()
        .context("no secret")?
        .to_string();
    let seen = api.kubectl_ok(&["get", "s3credential", "-n", "op1", "olive-s3", "-o", "json"])?;
    ensure!(!seen.contains(&secret), "the secret was shown again");
    let did: Value = serde_json::from_str(
        &boto("all", &swift, &access, &secret).with_context(|| ctx("boto3"))?,
    )?;
    ensure!(
        did == json!({"got": "hello from s3", "listed": ["hello.txt"], "after": []}),
        "boto3 saw {did}"
    );
    ensure!(
        boto("list", &swift, &access, "wrong-secret")? != "ok",
        "a wrong secret listed buckets"
    );
    ensure!(
        boto("list", &swift, &access, &secret)? == "ok",
        "the key lists buckets"
    );
    // Deleting the credential revokes the key.
    api.kubectl_ok(&["delete", "s3credential", "-n", "op1", "olive-s3"])?;
    ensure!(
        boto("list", &swift, &access, &secret)? != "ok",
        "a deleted key listed buckets"
    );
    drop(swift);
    Ok(())
}

/// Every key etcd holds whose name or value mentions `needle`.
fn etcd_mentions(cloud: &stratus_e2e::Cloud, needle: &str) -> Result<Vec<String>> {
    let out = cloud.etcdctl(&["get", "", "--prefix"])?;
    ensure!(
        out.status.success(),
        "etcdctl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(needle))
        .map(String::from)
        .collect())
}

#[test]
fn a_deleted_projects_s3_keys_go_with_it() -> Result<()> {
    let cloud = stratus_e2e::Cloud::up()?;
    cloud.kubectl_in(
        &["apply", "-f", "-"],
        "apiVersion: identity.stratus.dev/v1\nkind: Project\nmetadata:\n  name: s3gone\nspec: {}\n---\n\
         apiVersion: identity.stratus.dev/v1\nkind: User\nmetadata:\n  name: gail\nspec: {}\n---\n\
         apiVersion: identity.stratus.dev/v1\nkind: RoleAssignment\nmetadata:\n  name: gail-member\n  namespace: s3gone\nspec:\n  user: gail\n  role: member\n",
    )?;
    let made = wait_until(WAIT, "an S3 credential in the new project", || {
        cloud
            .kubectl_in(
                &["create", "-f", "-", "-o", "json"],
                "apiVersion: identity.stratus.dev/v1\nkind: S3Credential\nmetadata:\n  name: gail-s3\n  namespace: s3gone\nspec:\n  user: gail\n",
            )
            .ok()
    })?;
    let made: Value = serde_json::from_str(&made)?;
    let access = made["status"]["accessKeyId"]
        .as_str()
        .context("no access key")?
        .to_string();
    // The credential and its index record, as etcd holds them.
    let before = etcd_mentions(&cloud, &access)?;
    ensure!(
        before.iter().any(|k| k.contains("_system/s3credentials")),
        "no index record: {before:?}"
    );

    // The project's deletion (the project controller's cleanup) takes both away.
    cloud.kubectl_ok(&["delete", "project", "s3gone", "--wait=false"])?;
    wait_until(WAIT, "project s3gone gone", || {
        cloud
            .kubectl(&["get", "project", "s3gone"])
            .ok()
            .filter(|o| String::from_utf8_lossy(&o.stderr).contains("NotFound"))
    })?;
    let after = etcd_mentions(&cloud, &access)?;
    ensure!(after.is_empty(), "left in etcd: {after:?}");
    Ok(())
}
