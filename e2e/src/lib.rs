//! Helpers for end-to-end tests: a real etcd, the real `stratus` binary, the real kubectl.

pub mod browser;
pub mod net;
pub mod node;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// How long a process the tests start (etcd, `stratus up`, an API server, libvirtd) may take
/// to answer: generous, as every test shares two cores with the others.
pub const STARTUP: Duration = Duration::from_secs(90);

/// A free TCP port on 127.0.0.1, outside the kernel's ephemeral range (bound and released).
pub use stratus_test_ports::free_port;

/// The `stratus` binary built with the tests (`STRATUS_BIN` overrides).
pub fn stratus_bin() -> PathBuf {
    if let Ok(p) = std::env::var("STRATUS_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("test executable path");
    // target/debug/deps/<test> → target/debug/stratus
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target directory");
    dir.join("stratus")
}

/// Polls `f` until it returns `Some`, or fails after `timeout`.
pub fn wait_until<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> Result<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if start.elapsed() > timeout {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A child process killed when dropped.
pub struct Proc {
    child: Child,
    /// What it is, for messages.
    pub name: String,
}

impl Proc {
    /// Starts a command with its output going to `log`.
    pub fn spawn(name: &str, cmd: &mut Command, log: &Path) -> Result<Self> {
        let out =
            std::fs::File::create(log).with_context(|| format!("create {}", log.display()))?;
        let err = out.try_clone()?;
        let child = cmd
            .stdout(out)
            .stderr(err)
            .stdin(Stdio::null())
            .spawn()
            .with_context(|| {
                format!("start {name} (is it built? `cargo build --workspace --bins`)")
            })?;
        Ok(Self {
            child,
            name: name.to_string(),
        })
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether it is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Sends SIGTERM and waits for the exit.
    pub fn terminate(&mut self) -> Result<std::process::ExitStatus> {
        Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status()?;
        let start = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait()? {
                return Ok(s);
            }
            if start.elapsed() > Duration::from_secs(20) {
                self.child.kill()?;
                bail!("{} did not stop within 20 s of SIGTERM", self.name);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kills it at once (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    /// SIGTERM first, so that it stops what it started itself (`stratus up` its etcd, its
    /// Swift servers and their allow-list); SIGKILL if it is still running 10 s later (on two
    /// cores shared by parallel tests, a clean stop of `stratus up --object-store` can take
    /// more than 3 s).
    fn drop(&mut self) {
        if self.running() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(self.child.id().to_string())
                .status();
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(10) {
                if !self.running() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        self.kill();
    }
}

/// A single-member etcd in a temporary directory.
pub struct Etcd {
    /// Client URL.
    pub endpoint: String,
    tls: Option<stratus_apiserver::http::tls::EtcdPki>,
    _proc: Proc,
    _dir: tempfile::TempDir,
}

/// etcdctl's arguments for an etcd over TLS: its CA and a client certificate.
fn etcdctl_tls(tls: &stratus_apiserver::storage::etcd::EtcdTls) -> Vec<std::ffi::OsString> {
    let mut args = vec!["--cacert".into(), tls.ca_file.clone().into_os_string()];
    if let Some((cert, key)) = &tls.client {
        args.extend([
            "--cert".into(),
            cert.clone().into_os_string(),
            "--key".into(),
            key.clone().into_os_string(),
        ]);
    }
    args
}

impl Etcd {
    /// Starts etcd in the clear and waits until it answers.
    pub fn start() -> Result<Self> {
        Self::launch(false)
    }

    /// Starts etcd as `stratus up` does: TLS for clients and peers, each required to present a
    /// certificate of etcd's CA (made in the temporary directory).
    pub fn start_tls() -> Result<Self> {
        Self::launch(true)
    }

    fn launch(tls: bool) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let (client, peer) = (free_port(), free_port());
        let scheme = if tls { "https" } else { "http" };
        let endpoint = format!("{scheme}://127.0.0.1:{client}");
        let peer_url = format!("{scheme}://127.0.0.1:{peer}");
        let mut cmd = Command::new("etcd");
        cmd.arg("--data-dir")
            .arg(dir.path().join("data"))
            .args([
                "--listen-client-urls",
                &endpoint,
                "--advertise-client-urls",
                &endpoint,
            ])
            .args([
                "--listen-peer-urls",
                &peer_url,
                "--initial-advertise-peer-urls",
                &peer_url,
            ])
            .args(["--initial-cluster", &format!("default={peer_url}")]);
        let pki = if tls {
            let pki = stratus_apiserver::http::tls::ensure_etcd_pki(&dir.path().join("pki"))?;
            cmd.arg("--cert-file")
                .arg(&pki.server_cert)
                .arg("--key-file")
                .arg(&pki.server_key)
                .arg("--trusted-ca-file")
                .arg(&pki.ca_cert)
                .arg("--client-cert-auth")
                .arg("--peer-cert-file")
                .arg(&pki.peer_cert)
                .arg("--peer-key-file")
                .arg(&pki.peer_key)
                .arg("--peer-trusted-ca-file")
                .arg(&pki.ca_cert)
                .arg("--peer-client-cert-auth");
            Some(pki)
        } else {
            None
        };
        let proc = Proc::spawn("etcd", &mut cmd, &dir.path().join("etcd.log"))?;
        let etcd = Self {
            endpoint,
            tls: pki,
            _proc: proc,
            _dir: dir,
        };
        wait_until(STARTUP, "etcd to answer", || {
            etcd.ctl(&["endpoint", "health"])
                .ok()
                .filter(|o| o.status.success())
        })?;
        Ok(etcd)
    }

    /// How a client reaches this etcd over TLS (its CA and a client certificate); none when
    /// it serves in the clear.
    pub fn client_tls(&self) -> Option<stratus_apiserver::storage::etcd::EtcdTls> {
        self.tls.as_ref().map(|p| p.client_tls())
    }

    /// The etcd process id.
    pub fn pid(&self) -> u32 {
        self._proc.pid()
    }

    /// Runs etcdctl against this etcd (with a client certificate when it serves TLS).
    pub fn ctl(&self, args: &[&str]) -> Result<Output> {
        let tls = self
            .client_tls()
            .map(|t| etcdctl_tls(&t))
            .unwrap_or_default();
        Ok(Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .args(["--endpoints", &self.endpoint])
            .args(tls)
            .args(args)
            .output()?)
    }
}

/// A whole cloud started with `stratus up` in a temporary data directory.
pub struct Cloud {
    /// The data directory (kubeconfig, PKI, etcd data).
    pub dir: tempfile::TempDir,
    /// The `stratus up` process.
    pub proc: Proc,
    /// `https://127.0.0.1:PORT`.
    pub url: String,
    ports: (u16, u16, u16),
    extra: Vec<String>,
}

impl Cloud {
    /// Runs `stratus up` and waits until the API server answers.
    pub fn up() -> Result<Self> {
        Self::up_with(&[])
    }

    /// Runs `stratus up` with extra arguments (kept across restarts) and waits until the API
    /// server answers.
    pub fn up_with(extra: &[&str]) -> Result<Self> {
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let mut attempt = 0;
        loop {
            attempt += 1;
            let dir = tempfile::tempdir()?;
            // Free now, but another test may take a port before `stratus up` binds it: a
            // start that fails on its ports is tried again with new ones.
            let ports = (free_port(), free_port(), free_port());
            let proc = Self::spawn(dir.path(), ports, &extra)?;
            let mut cloud = Self {
                url: format!("https://127.0.0.1:{}", ports.0),
                dir,
                proc,
                ports,
                extra: extra.clone(),
            };
            match cloud.wait_ready() {
                Ok(()) => return Ok(cloud),
                Err(e)
                    if attempt < 3 && {
                        let log = cloud.log();
                        log.contains("etcd exited at start-up") || log.contains("in use")
                    } =>
                {
                    eprintln!("stratus up did not start on its ports, trying others: {e:#}");
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn spawn(dir: &Path, ports: (u16, u16, u16), extra: &[String]) -> Result<Proc> {
        Proc::spawn(
            "stratus up",
            Command::new(stratus_bin())
                .arg("up")
                .arg("--data-dir")
                .arg(dir)
                .args(["--listen", &format!("127.0.0.1:{}", ports.0)])
                .args([
                    "--etcd-client-port",
                    &ports.1.to_string(),
                    "--etcd-peer-port",
                    &ports.2.to_string(),
                ])
                .args(["--bookmark-seconds", "1"])
                // Tests serve their images from loopback (`node::FileServer`, `node::Guest`);
                // the cloud's own API server and etcd stay refused.
                .arg("--image-url-allow-loopback")
                .args(extra)
                // The node lifecycle controller's every look, for the evacuation tests.
                .env("STRATUS_LOG", "info,stratus_controllers::nodes=trace"),
            &dir.join("stratus.log"),
        )
    }

    /// Creates the Projects `names` (objects can only be created in a Project's namespace).
    pub fn projects(&self, names: &[&str]) -> Result<()> {
        self.kubectl_in(&["apply", "-f", "-"], &projects_yaml(names))?;
        Ok(())
    }

    /// Issues node `node`'s NBD certificate from the cloud's NBD CA into `out` (`stratus pki
    /// nbd-node`): a storage node's names its storage `address`; a compute node's goes where
    /// its libvirtd reads it ([`node::Node::nbd_tls_dir`]).
    pub fn nbd_certificate(&self, node: &str, address: Option<&str>, out: &Path) -> Result<()> {
        let mut pki = Command::new(stratus_bin());
        pki.args(["pki", "nbd-node", node, "--ca-dir"])
            .arg(self.dir.path().join("pki/nbd"))
            .arg("--out")
            .arg(out);
        if let Some(a) = address {
            pki.args(["--address", a]);
        }
        let done = pki.output().context("run stratus pki nbd-node")?;
        if !done.status.success() {
            bail!(
                "stratus pki nbd-node {node}: {}",
                String::from_utf8_lossy(&done.stderr)
            );
        }
        Ok(())
    }

    /// Waits for the `default` SecurityGroup the controllers make in project `ns`. A test that
    /// edits it applies its version after this: applied before, kubectl's create races with
    /// the controllers' and one of them gets 409 AlreadyExists.
    pub fn default_group_made(&self, ns: &str) -> Result<()> {
        wait_until(
            Duration::from_secs(90),
            &format!("the default SecurityGroup of {ns}"),
            || {
                self.kubectl(&["-n", ns, "get", "securitygroup", "default"])
                    .ok()
                    .filter(|o| o.status.success())
            },
        )?;
        Ok(())
    }

    /// Places a Server on hypervisor `node` through the binding subresource, as the scheduler
    /// does, making the Hypervisor (with room, but not Ready, so the scheduler itself leaves
    /// it alone) if it is absent. The Server's flavor must exist.
    pub fn place(&self, namespace: &str, server: &str, node: &str) -> Result<()> {
        if !self.kubectl(&["get", "hypervisor", node])?.status.success() {
            self.kubectl_in(
                &["create", "-f", "-"],
                &format!("apiVersion: compute.stratus.dev/v1\nkind: Hypervisor\nmetadata:\n  name: {node}\nspec: {{}}\n"),
            )?;
            self.kubectl_ok(&[
                "patch",
                "hypervisor",
                node,
                "--subresource=status",
                "--type",
                "merge",
                "-p",
                r#"{"status":{"capacity":{"vcpus":64,"ramMiB":262144,"diskGiB":4096}}}"#,
            ])?;
        }
        self.kubectl_in(
            &[
                "create",
                "--raw",
                &format!(
                    "/apis/compute.stratus.dev/v1/namespaces/{namespace}/servers/{server}/binding"
                ),
                "-f",
                "-",
            ],
            &serde_json::json!({"target": {"name": node}}).to_string(),
        )?;
        Ok(())
    }

    /// Adds a system identity to the API server's token file (`token` authenticates as
    /// `user`, e.g. `system:node:node-1`) and restarts the cloud so that it is read.
    pub fn add_token(&mut self, token: &str, user: &str) -> Result<()> {
        append_token(&self.dir.path().join("tokens.csv"), token, user)?;
        self.restart()
    }

    /// Stops `stratus up` with SIGTERM and starts it again on the same data directory.
    pub fn restart(&mut self) -> Result<()> {
        let status = self.proc.terminate()?;
        if !status.success() {
            bail!("stratus up exited with {status} on SIGTERM");
        }
        self.proc = Self::spawn(self.dir.path(), self.ports, &self.extra)?;
        self.wait_ready()
    }

    fn wait_ready(&mut self) -> Result<()> {
        let kubeconfig = self.kubeconfig();
        let (dir, proc) = (self.dir.path(), &mut self.proc);
        // Ready, or exited (a port taken meanwhile): no use waiting longer for that.
        let ready = wait_until(STARTUP, "the API server to be ready", || {
            if !proc.running() {
                return Some(false);
            }
            if !kubeconfig.exists() {
                return None;
            }
            Command::new("kubectl")
                .env("KUBECONFIG", &kubeconfig)
                .env("HOME", dir)
                .args(["get", "--raw", "/readyz"])
                .output()
                .ok()
                .filter(|o| o.status.success())
                .map(|_| true)
        })
        .with_context(|| format!("stratus log:\n{}", self.log()))?;
        if !ready {
            bail!("stratus up exited at start-up; its log:\n{}", self.log());
        }
        Ok(())
    }

    /// The etcd client URL `stratus up` started (TLS; see [`Cloud::etcd_tls`]).
    pub fn etcd_endpoint(&self) -> String {
        format!("https://127.0.0.1:{}", self.ports.1)
    }

    /// etcd's CA and the API server's client certificate, which `stratus up` made in
    /// `DIR/pki/etcd`: what any direct reader of this cloud's etcd needs.
    pub fn etcd_tls(&self) -> stratus_apiserver::storage::etcd::EtcdTls {
        let dir = self.dir.path().join("pki").join("etcd");
        stratus_apiserver::storage::etcd::EtcdTls {
            ca_file: dir.join("ca.crt"),
            client: Some((
                dir.join("apiserver-etcd-client.crt"),
                dir.join("apiserver-etcd-client.key"),
            )),
        }
    }

    /// Runs etcdctl against this cloud's etcd with the client certificate.
    pub fn etcdctl(&self, args: &[&str]) -> Result<Output> {
        Ok(Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .args(["--endpoints", &self.etcd_endpoint()])
            .args(etcdctl_tls(&self.etcd_tls()))
            .args(args)
            .output()?)
    }

    /// A kube-rs client with the admin kubeconfig.
    pub async fn client(&self) -> Result<kube::Client> {
        let kc = kube::config::Kubeconfig::read_from(self.kubeconfig())?;
        let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?;
        Ok(kube::Client::try_from(cfg)?)
    }

    /// A kubeconfig for this cloud with another bearer token (None: an unknown one, as an
    /// anonymous client), written beside the admin's; returns its path.
    pub fn kubeconfig_with(&self, name: &str, token: Option<&str>) -> Result<PathBuf> {
        let admin = kube::config::Kubeconfig::read_from(self.kubeconfig())?;
        let ca = admin
            .clusters
            .first()
            .and_then(|c| c.cluster.as_ref())
            .and_then(|c| c.certificate_authority_data.clone())
            .context("no CA in the admin kubeconfig")?;
        // Without any credential kubectl would prompt for a user name; a token the server does
        // not know makes an anonymous client.
        let token = token.unwrap_or("anonymous");
        let user = format!("users:\n- name: {name}\n  user:\n    token: {token}\n");
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: stratus\n  cluster:\n    server: {}\n    certificate-authority-data: {ca}\n{user}contexts:\n- name: {name}\n  context:\n    cluster: stratus\n    user: {name}\ncurrent-context: {name}\n",
            self.url
        );
        let path = self.dir.path().join(format!("kubeconfig-{name}"));
        std::fs::write(&path, text)?;
        Ok(path)
    }

    /// Runs kubectl with another kubeconfig.
    pub fn kubectl_as(&self, kubeconfig: &Path, args: &[&str]) -> Result<Output> {
        Ok(Command::new("kubectl")
            .env("KUBECONFIG", kubeconfig)
            .env("HOME", self.dir.path())
            .args(args)
            .output()?)
    }

    /// The admin kubeconfig.
    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.path().join("kubeconfig")
    }

    /// The `stratus up` log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stratus.log")).unwrap_or_default()
    }

    /// A kubectl command with this cloud's kubeconfig.
    pub fn kubectl_cmd(&self) -> Command {
        let mut c = Command::new("kubectl");
        c.env("KUBECONFIG", self.kubeconfig())
            .env("HOME", self.dir.path());
        c
    }

    /// A `stratus` client command with this cloud's kubeconfig.
    pub fn stratus_cmd(&self) -> Command {
        let mut c = Command::new(stratus_bin());
        c.env("KUBECONFIG", self.kubeconfig());
        c
    }

    /// Runs kubectl.
    pub fn kubectl(&self, args: &[&str]) -> Result<Output> {
        Ok(self.kubectl_cmd().args(args).output()?)
    }

    /// Runs kubectl with `stdin` and expects success; returns stdout.
    pub fn kubectl_in(&self, args: &[&str], stdin: &str) -> Result<String> {
        let mut cmd = self.kubectl_cmd();
        cmd.args(args);
        ok(args, with_stdin(cmd, stdin)?)
    }

    /// Runs kubectl and expects success; returns stdout.
    pub fn kubectl_ok(&self, args: &[&str]) -> Result<String> {
        ok(args, self.kubectl(args)?)
    }

    /// The token of a Keystone password login of `user` scoped to `project` at this cloud's
    /// identity endpoints (as Swift's clients log in).
    pub fn keystone_token(&self, user: &str, password: &str, project: &str) -> Result<String> {
        let body = serde_json::json!({"auth": {
            "identity": {"methods": ["password"], "password": {"user": {"name": user, "domain": {"id": "default"}, "password": password}}},
            "scope": {"project": {"name": project, "domain": {"id": "default"}}},
        }});
        let head = output_of(
            Command::new("curl")
                .args(["-sS", "--fail", "-o", "/dev/null", "-D", "-", "--cacert"])
                .arg(self.dir.path().join("pki/ca.crt"))
                .args(["-H", "Content-Type: application/json", "--data-binary"])
                .arg(body.to_string())
                .arg(format!("{}/identity/v3/auth/tokens", self.url)),
            "a Keystone login",
        )?;
        String::from_utf8_lossy(&head)
            .lines()
            .find_map(|l| {
                l.split_once(':')
                    .filter(|(k, _)| k.eq_ignore_ascii_case("x-subject-token"))
                    .map(|(_, v)| v.trim().to_string())
            })
            .context("no X-Subject-Token")
    }

    /// Makes the User `user`, a member of project `project`, with `password`.
    pub fn member(&self, user: &str, project: &str, password: &str) -> Result<()> {
        self.kubectl_in(
            &["apply", "-f", "-"],
            &format!(
                "apiVersion: identity.stratus.dev/v1\nkind: User\nmetadata:\n  name: {user}\nspec: {{}}\n---\n\
                 apiVersion: identity.stratus.dev/v1\nkind: RoleAssignment\nmetadata:\n  name: {user}-member\n  namespace: {project}\nspec:\n  user: {user}\n  role: member\n"
            ),
        )?;
        self.kubectl_in(
            &[
                "replace",
                "--raw",
                &format!("/apis/identity.stratus.dev/v1/users/{user}/password"),
                "-f",
                "-",
            ],
            &serde_json::json!({ "password": password }).to_string(),
        )?;
        Ok(())
    }

    /// Runs kubectl and expects failure; returns stderr.
    pub fn kubectl_err(&self, args: &[&str]) -> Result<String> {
        let out = self.kubectl(args)?;
        if out.status.success() {
            bail!(
                "kubectl {} succeeded but should have failed:\n{}",
                args.join(" "),
                String::from_utf8_lossy(&out.stdout)
            );
        }
        Ok(String::from_utf8_lossy(&out.stderr).into_owned())
    }

    /// The current resourceVersion of a collection (a read, so it shows whether etcd changed).
    pub fn list_rv(&self, path: &str) -> Result<String> {
        let v: serde_json::Value =
            serde_json::from_str(&self.kubectl_ok(&["get", "--raw", path])?)?;
        Ok(v["metadata"]["resourceVersion"]
            .as_str()
            .unwrap_or_default()
            .to_string())
    }
}

fn ok(args: &[&str], out: Output) -> Result<String> {
    if !out.status.success() {
        bail!(
            "kubectl {} failed ({}):\n{}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `ip ARGS`: what it printed, or an error with what it said.
pub fn ip(args: &[&str]) -> Result<String> {
    let out = Command::new("ip").args(args).output().context("run ip")?;
    if !out.status.success() {
        bail!(
            "ip {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `args` inside network namespace `ns`: whether it succeeded, and what it printed.
pub fn netns_exec(ns: &str, args: &[&str]) -> (bool, String) {
    match Command::new("ip")
        .args(["netns", "exec", ns])
        .args(args)
        .output()
    {
        Ok(o) => (
            o.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ),
        ),
        Err(e) => (false, e.to_string()),
    }
}

/// The repository's root (for `examples/`).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repo root")
        .to_path_buf()
}

/// One `stratus apiserver` process (HTTPS on loopback, certificate from Stratus' own PKI code)
/// against a given etcd.
pub struct Apiserver {
    /// The process.
    pub proc: Proc,
    /// `https://127.0.0.1:PORT`.
    pub url: String,
    dir: tempfile::TempDir,
    endpoint: String,
    etcd_tls: Option<stratus_apiserver::storage::etcd::EtcdTls>,
    port: u16,
    /// More `stratus apiserver` flags, kept for a restart.
    flags: Vec<String>,
}

/// The token every test API server accepts for the admin user.
pub const TEST_TOKEN: &str = "e2e-admin-token-0123456789abcdef";

impl Apiserver {
    /// Starts an API server on a free port and waits until it is ready.
    pub fn start(etcd_endpoint: &str) -> Result<Self> {
        Self::start_with(etcd_endpoint, None)
    }

    /// Starts an API server on `etcd`, over TLS with a client certificate when `etcd` serves
    /// TLS (`--etcd-cafile`, `--etcd-certfile`, `--etcd-keyfile`).
    pub fn start_on(etcd: &Etcd) -> Result<Self> {
        Self::start_with(&etcd.endpoint, etcd.client_tls())
    }

    /// Starts an API server as [`Apiserver::start`] does, with more `stratus apiserver` flags
    /// (`--login-source-failures 10`).
    pub fn start_with_flags(etcd_endpoint: &str, flags: &[&str]) -> Result<Self> {
        Self::start_flagged(etcd_endpoint, None, flags)
    }

    fn start_with(
        etcd_endpoint: &str,
        etcd_tls: Option<stratus_apiserver::storage::etcd::EtcdTls>,
    ) -> Result<Self> {
        Self::start_flagged(etcd_endpoint, etcd_tls, &[])
    }

    fn start_flagged(
        etcd_endpoint: &str,
        etcd_tls: Option<stratus_apiserver::storage::etcd::EtcdTls>,
        flags: &[&str],
    ) -> Result<Self> {
        let flags: Vec<String> = flags.iter().map(|f| (*f).to_string()).collect();
        let dir = tempfile::tempdir()?;
        std::fs::write(
            dir.path().join("tokens.csv"),
            format!("{TEST_TOKEN},admin\n"),
        )?;
        let pki = stratus_apiserver::http::tls::ensure_pki(
            &dir.path().join("pki"),
            &["127.0.0.1".to_string()],
        )?;
        let ca = pki.ca_cert.display();
        let port = free_port();
        let kubeconfig = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: s\n  cluster:\n    server: https://127.0.0.1:{port}\n    certificate-authority: {ca}\nusers:\n- name: admin\n  user:\n    token: {TEST_TOKEN}\ncontexts:\n- name: admin@s\n  context:\n    cluster: s\n    user: admin\ncurrent-context: admin@s\n"
        );
        std::fs::write(dir.path().join("kubeconfig"), kubeconfig)?;
        let proc = Self::spawn(dir.path(), etcd_endpoint, etcd_tls.as_ref(), port, &flags)?;
        let s = Self {
            proc,
            url: format!("https://127.0.0.1:{port}"),
            dir,
            endpoint: etcd_endpoint.to_string(),
            etcd_tls,
            port,
            flags,
        };
        s.wait_ready()?;
        Ok(s)
    }

    fn spawn(
        dir: &Path,
        endpoint: &str,
        etcd_tls: Option<&stratus_apiserver::storage::etcd::EtcdTls>,
        port: u16,
        flags: &[String],
    ) -> Result<Proc> {
        let mut tls: Vec<std::ffi::OsString> = Vec::new();
        if let Some(t) = etcd_tls {
            tls.extend(["--etcd-cafile".into(), t.ca_file.clone().into_os_string()]);
            if let Some((cert, key)) = &t.client {
                tls.extend([
                    "--etcd-certfile".into(),
                    cert.clone().into_os_string(),
                    "--etcd-keyfile".into(),
                    key.clone().into_os_string(),
                ]);
            }
        }
        Proc::spawn(
            "stratus apiserver",
            Command::new(stratus_bin())
                .arg("apiserver")
                .args(tls)
                .args([
                    "--etcd-endpoints",
                    endpoint,
                    "--listen",
                    &format!("127.0.0.1:{port}"),
                    "--bookmark-seconds",
                    "1",
                ])
                .arg("--token-file")
                .arg(dir.join("tokens.csv"))
                .arg("--tls-cert")
                .arg(dir.join("pki/apiserver.crt"))
                .arg("--tls-key")
                .arg(dir.join("pki/apiserver.key"))
                .args(flags),
            &dir.join("apiserver.log"),
        )
    }

    /// Creates the Projects `names` (objects can only be created in a Project's namespace).
    pub fn projects(&self, names: &[&str]) -> Result<()> {
        self.kubectl_in(&["apply", "-f", "-"], &projects_yaml(names))?;
        Ok(())
    }

    /// Gives each of `nodes` its identity (`system:node:NAME`, a token of its own) and a
    /// kubeconfig for it, `NAME.kubeconfig` in `dir`; restarts to read the tokens.
    pub fn node_identities(&mut self, nodes: &[&str], dir: &Path) -> Result<()> {
        let admin = self.kubeconfig();
        let tokens = self.dir.path().join("tokens.csv");
        let mut text = std::fs::read_to_string(&tokens)?;
        let kubeconfig = std::fs::read_to_string(&admin)?;
        for node in nodes {
            let token = format!("{node}-token-0123456789abcdef");
            text.push_str(&format!("{token},system:node:{node}\n"));
            std::fs::write(
                dir.join(format!("{node}.kubeconfig")),
                kubeconfig.replace(TEST_TOKEN, &token),
            )?;
        }
        std::fs::write(&tokens, text)?;
        self.restart()
    }

    /// Starts it again (same port) after a kill.
    pub fn restart(&mut self) -> Result<()> {
        self.proc.kill();
        self.proc = Self::spawn(
            self.dir.path(),
            &self.endpoint,
            self.etcd_tls.as_ref(),
            self.port,
            &self.flags,
        )?;
        self.wait_ready()
    }

    fn wait_ready(&self) -> Result<()> {
        wait_until(STARTUP, "the API server to be ready", || {
            self.kubectl(&["get", "--raw", "/readyz"])
                .ok()
                .filter(|o| o.status.success())
        })
        .map(|_| ())
    }

    /// Its admin kubeconfig.
    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.path().join("kubeconfig")
    }

    /// Adds a system identity to its token file (`token` authenticates as `user`, e.g.
    /// `system:service:object-proxy`) and restarts it so that the file is read again.
    pub fn add_token(&mut self, token: &str, user: &str) -> Result<()> {
        append_token(&self.dir.path().join("tokens.csv"), token, user)?;
        self.restart()
    }

    /// The CA certificate its serving certificate chains to.
    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("pki/ca.crt")
    }

    /// Runs kubectl against this replica.
    pub fn kubectl(&self, args: &[&str]) -> Result<Output> {
        Ok(Command::new("kubectl")
            .env("KUBECONFIG", self.dir.path().join("kubeconfig"))
            .env("HOME", self.dir.path())
            .args(args)
            .output()?)
    }

    /// Runs kubectl and expects success.
    pub fn kubectl_ok(&self, args: &[&str]) -> Result<String> {
        ok(args, self.kubectl(args)?)
    }

    /// Runs kubectl with `stdin` as its input and expects success.
    pub fn kubectl_in(&self, args: &[&str], stdin: &str) -> Result<String> {
        let mut cmd = Command::new("kubectl");
        cmd.env("KUBECONFIG", self.kubeconfig())
            .env("HOME", self.dir.path())
            .args(args);
        ok(args, with_stdin(cmd, stdin)?)
    }

    /// A field of `kind` `name` in namespace `ns`, by JSONPath (empty when it is unset).
    pub fn jsonpath(&self, ns: &str, kind: &str, name: &str, path: &str) -> Result<String> {
        let path = format!("jsonpath={path}");
        self.kubectl_ok(&["-n", ns, "get", kind, name, "-o", &path])
    }

    /// Merge-patches the status of `kind` `name` in namespace `ns`, as an admin (what a
    /// controller or agent that the test stands in for would write).
    pub fn patch_status(
        &self,
        ns: &str,
        kind: &str,
        name: &str,
        status: serde_json::Value,
    ) -> Result<String> {
        let body = serde_json::json!({ "status": status }).to_string();
        let patch = ["patch", kind, name, "--subresource=status", "--type=merge"];
        self.kubectl_ok(&[&["-n", ns][..], &patch[..], &["-p", &body][..]].concat())
    }

    /// A kube-rs client for this replica.
    pub async fn client(&self) -> Result<kube::Client> {
        let kc = kube::config::Kubeconfig::read_from(self.dir.path().join("kubeconfig"))?;
        let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?;
        Ok(kube::Client::try_from(cfg)?)
    }
}

/// Appends a `token,user` line to a token file.
fn append_token(tokens: &Path, token: &str, user: &str) -> Result<()> {
    let mut text = std::fs::read_to_string(tokens)?;
    text.push_str(&format!("{token},{user}\n"));
    std::fs::write(tokens, text)?;
    Ok(())
}

/// A YAML stream of Projects named `names`.
pub fn projects_yaml(names: &[&str]) -> String {
    names
        .iter()
        .map(|n| {
            format!("---\napiVersion: identity.stratus.dev/v1\nkind: Project\nmetadata:\n  name: {n}\nspec: {{}}\n")
        })
        .collect()
}

/// Runs `cmd` with `stdin` written to its standard input.
pub fn with_stdin(mut cmd: Command, stdin: &str) -> Result<Output> {
    use std::io::Write;
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(stdin.as_bytes())?;
    Ok(child.wait_with_output()?)
}

/// Runs `cmd`; its standard output, or an error naming `what` with everything it printed.
pub fn output_of(cmd: &mut Command, what: &str) -> Result<Vec<u8>> {
    let out = cmd.output().with_context(|| format!("run {what}"))?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out.stdout)
}

/// The files under `dir` (at any depth) whose names end in `.ext`, such as the `.data` files
/// of the objects on a Swift device.
pub fn files_ending(dir: &Path, ext: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == ext) {
                out.push(p);
            }
        }
    }
    out
}

/// A Swift proxy's configuration as `stratus up --object-store` writes it: on `ip`:`port`, its
/// rings in `swift_dir`, with keystonemiddleware's `authtoken` (every token validated afresh),
/// `s3api`, `s3token` and `keystoneauth` against the Stratus identity at `identity`
/// (`https://HOST:PORT/identity/v3`, its CA `ca`), as the service identity of `token`.
pub fn swift_proxy_conf(
    ip: &str,
    port: u16,
    swift_dir: &Path,
    identity: &str,
    ca: &Path,
    token: &str,
) -> String {
    format!(
        "[DEFAULT]\nbind_ip = {ip}\nbind_port = {port}\nworkers = 0\nuser = root\n\
         swift_dir = {swift_dir}\nlog_name = proxy-server\nlog_level = INFO\n\n\
         [pipeline:main]\npipeline = catch_errors healthcheck proxy-logging authtoken s3api s3token keystoneauth slo proxy-logging proxy-server\n\n\
         [app:proxy-server]\nuse = egg:swift#proxy\naccount_autocreate = true\n\n\
         [filter:catch_errors]\nuse = egg:swift#catch_errors\n\n\
         [filter:healthcheck]\nuse = egg:swift#healthcheck\n\n\
         [filter:proxy-logging]\nuse = egg:swift#proxy_logging\n\n\
         [filter:s3api]\nuse = egg:swift#s3api\n\n\
         [filter:slo]\nuse = egg:swift#slo\n\n\
         [filter:authtoken]\npaste.filter_factory = keystonemiddleware.auth_token:filter_factory\n\
         www_authenticate_uri = {identity}\nauth_type = admin_token\nendpoint = {identity}\n\
         token = {token}\ncafile = {ca}\ndelay_auth_decision = True\n\
         token_cache_time = -1\ninclude_service_catalog = False\n\n\
         [filter:s3token]\nuse = egg:swift#s3token\nauth_uri = {identity}\ncertfile = {ca}\n\
         reseller_prefix = AUTH_\n\n\
         [filter:keystoneauth]\nuse = egg:swift#keystoneauth\nreseller_prefix = AUTH_\n\
         operator_roles = admin, member\nproject_reader_roles = reader\n\
         allow_names_in_acls = false\n",
        swift_dir = swift_dir.display(),
        ca = ca.display(),
    )
}

/// Merge patches to objects of one kind in one namespace of a [`Cloud`], sent straight to the
/// API as its admin (no kubectl to start, the connection made beforehand): what a test times
/// an effect from.
pub struct MergePatcher {
    rt: tokio::runtime::Runtime,
    api: kube::Api<kube::api::DynamicObject>,
}

impl MergePatcher {
    /// For `kind` (`plural`) of API group `group`, version v1, in namespace `ns`; connected by
    /// reading `name`, which must exist.
    pub fn new(
        cloud: &Cloud,
        group: &str,
        kind: &str,
        plural: &str,
        ns: &str,
        name: &str,
    ) -> Result<Self> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let api = rt.block_on(async {
            let client = cloud.client().await?;
            let gvk = kube::api::GroupVersionKind::gvk(group, "v1", kind);
            let resource = kube::api::ApiResource::from_gvk_with_plural(&gvk, plural);
            let api = kube::Api::namespaced_with(client, ns, &resource);
            api.get(name).await?;
            anyhow::Ok(api)
        })?;
        Ok(Self { rt, api })
    }

    /// Merge-patches `name` with `patch`, returning once the API answered.
    pub fn patch(&self, name: &str, patch: serde_json::Value) -> Result<()> {
        let patch = kube::api::Patch::Merge(patch);
        self.rt.block_on(
            self.api
                .patch(name, &kube::api::PatchParams::default(), &patch),
        )?;
        Ok(())
    }
}
