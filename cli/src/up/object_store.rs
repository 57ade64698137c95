//! `stratus up --object-store`: a one-node object store, as devstack's Swift services run one:
//! an account, a container and an object ring of one replica on one device (a directory in
//! the data directory), the node's object agent running Swift's servers on them, and a Swift
//! proxy (Swift API and S3) on loopback whose keystonemiddleware takes Stratus tokens and S3
//! credentials from the API server's `/identity/v3`.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use kube::api::{Api, Patch, PatchParams};
use stratus_api_types::object::{ObjectRing, ObjectRingSpec, RingDevice, RingType};
use stratus_object_agent::config::{DeviceName, KINDS, Ports, RSYNC_PORT, kind_name};
use stratus_object_agent::ini::Ini;

/// The proxy's identity in the token file: it validates users' tokens and nothing else.
pub const PROXY_IDENTITY: &str = "system:service:object-proxy";
/// The one device.
const DEVICE: &str = "d1";
/// Partitions 2^9, as devstack's `SWIFT_PARTITION_POWER_SIZE`.
const PART_POWER: u8 = 9;
/// The field manager the rings are applied under.
const MANAGER: &str = "stratus-up";
/// How long the rings may take to be built and installed, and the proxy to answer (Python
/// servers starting on a loaded machine).
const READY: Duration = Duration::from_secs(240);

/// Options of `stratus up`'s object store.
#[derive(Debug, Clone, clap::Args)]
pub struct ObjectStoreArgs {
    /// Run a one-node object store: Swift's account, container and object servers (the
    /// object role, on this node) on one device, a directory in DATA_DIR/object-devices, with
    /// rings of one replica, and a Swift proxy serving the Swift API and S3 with Stratus
    /// tokens and S3 credentials.
    #[arg(long)]
    pub object_store: bool,
    /// With --object-store, the loopback address its servers and proxy listen on.
    #[arg(long, value_name = "IP", default_value = "127.0.0.1")]
    pub object_store_ip: Ipv4Addr,
    /// With --object-store, the Swift proxy's port (the Swift API and S3).
    #[arg(long, value_name = "PORT", default_value_t = 8080)]
    pub object_store_port: u16,
}

impl ObjectStoreArgs {
    /// Refuses what the one-node store cannot be: its servers have no authentication of their
    /// own, so they stay on loopback.
    ///
    /// # Errors
    /// An address that is not a loopback address.
    pub fn check(&self) -> Result<()> {
        ensure!(
            self.object_store_ip.is_loopback(),
            "--object-store-ip {}: must be a loopback address (127.0.0.0/8); an object store \
             across hosts is run by `stratus agent --roles object` on each node",
            self.object_store_ip
        );
        let p = Ports::default();
        ensure!(
            ![p.account, p.container, p.object, RSYNC_PORT].contains(&self.object_store_port),
            "--object-store-port {}: the account, container and object servers and rsync use \
             6200-6202 and 873",
            self.object_store_port
        );
        Ok(())
    }

    /// The proxy's URL, as the identity catalog names it.
    pub fn url(&self) -> String {
        format!("http://{}:{}", self.object_store_ip, self.object_store_port)
    }

    /// The object role's options: one device, `DATA_DIR/object-devices/d1` (made here), a
    /// plain directory; connections from 127.0.0.1 (where every connection on loopback
    /// comes from, the proxy's included) admitted by the servers' allow-list.
    ///
    /// # Errors
    /// The device directory cannot be made.
    pub fn object_args(&self, dir: &Path) -> Result<crate::agent::ObjectArgs> {
        let devices = std::path::absolute(dir.join("object-devices"))
            .context("resolve the object devices directory")?;
        let device = devices.join(DEVICE);
        std::fs::create_dir_all(&device).with_context(|| format!("create {}", device.display()))?;
        let ports = Ports::default();
        // Options the role gains keep their defaults (the cluster's hash file: the agent's own).
        #[allow(clippy::needless_update)]
        Ok(crate::agent::ObjectArgs {
            object_ip: Some(self.object_store_ip),
            object_devices_dir: devices,
            object_devices: vec![DeviceName::new(DEVICE).map_err(anyhow::Error::msg)?],
            object_unmounted_devices: true,
            account_port: ports.account,
            container_port: ports.container,
            object_port: ports.object,
            object_replication_interval: 30,
            swift_user: "root".into(),
            object_heartbeat_seconds: 10,
            object_proxies: vec![Ipv4Addr::LOCALHOST],
            ..Default::default()
        })
    }

    /// The rings of the store (`account`, `container`, `object`: one replica on the node's one
    /// device), applied under `stratus-up`'s field manager, so a restart with another address
    /// moves them.
    ///
    /// # Errors
    /// The API server refuses them.
    pub async fn apply_rings(&self, client: kube::Client, node: &str) -> Result<()> {
        let rings: Api<ObjectRing> = Api::all(client);
        let ports = Ports::default();
        for kind in KINDS {
            let name = kind_name(kind);
            let ring = ObjectRing::new(name, self.ring_spec(kind, node, ports.of(kind)));
            rings
                .patch(
                    name,
                    &PatchParams::apply(MANAGER).force(),
                    &Patch::Apply(&ring),
                )
                .await
                .with_context(|| format!("apply the {name} ring"))?;
        }
        Ok(())
    }

    fn ring_spec(&self, kind: RingType, node: &str, port: u16) -> ObjectRingSpec {
        ObjectRingSpec {
            ring_type: kind,
            policy_index: None,
            part_power: PART_POWER,
            replicas: 1,
            min_part_hours: 1,
            overload: None,
            paused: false,
            devices: vec![RingDevice {
                region: 1,
                zone: 1,
                ip: self.object_store_ip.to_string(),
                port,
                device: DEVICE.into(),
                weight: 100.0,
                meta: None,
                node: Some(node.into()),
            }],
        }
    }
}

/// Where the object agent of `stratus up` (state directory `state_dir`) installs the rings.
pub fn swift_dir(state_dir: &Path) -> Result<PathBuf> {
    Ok(std::path::absolute(state_dir)
        .context("resolve the agent's state directory")?
        .join("object")
        .join("swift"))
}

/// Waits until the object agent has installed the three rings in `swift_dir`.
///
/// # Errors
/// They are not there within [`READY`].
pub async fn wait_for_rings(swift_dir: &Path) -> Result<()> {
    let files: Vec<PathBuf> = KINDS
        .into_iter()
        .map(|k| swift_dir.join(format!("{}.ring.gz", kind_name(k))))
        .collect();
    let deadline = tokio::time::Instant::now() + READY;
    while tokio::time::Instant::now() < deadline {
        if files.iter().all(|f| f.is_file()) {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    bail!(
        "the object store's rings were not installed in {} within {} s (see `kubectl get \
         objectrings,objectnodes`)",
        swift_dir.display(),
        READY.as_secs()
    )
}

/// Where the identity the proxy asks is, and how it proves who it is.
pub struct Identity<'a> {
    /// `https://HOST:PORT/identity/v3`.
    pub url: String,
    /// The API server's CA certificate.
    pub ca: &'a Path,
    /// The proxy's token ([`PROXY_IDENTITY`]'s).
    pub token: &'a str,
}

/// The proxy's configuration: Swift's proxy with keystonemiddleware's `authtoken`, `s3api`,
/// `s3token` and `keystoneauth` against Stratus identity (every validation asked afresh, so a
/// revoked token stops at once), written through [`Ini`], which refuses a value that could
/// break out of its line.
fn proxy_conf(args: &ObjectStoreArgs, swift_dir: &Path, identity: &Identity<'_>) -> Result<String> {
    let path = |p: &Path| {
        p.to_str()
            .map(str::to_owned)
            .with_context(|| format!("{} is not UTF-8", p.display()))
    };
    let mut ini = Ini::new();
    ini.section("DEFAULT")?
        .set("bind_ip", args.object_store_ip)?
        .set("bind_port", args.object_store_port)?
        // One process, which `stratus up` stops: no forked workers.
        .set("workers", 0)?
        .set("user", "root")?
        .set("swift_dir", path(swift_dir)?)?
        .set("log_name", "proxy-server")?;
    ini.section("pipeline:main")?.set(
        "pipeline",
        "catch_errors healthcheck proxy-logging authtoken s3api s3token keystoneauth slo \
         proxy-logging proxy-server",
    )?;
    ini.section("app:proxy-server")?
        .set("use", "egg:swift#proxy")?
        .set("account_autocreate", "true")?;
    for (filter, egg) in [
        ("catch_errors", "catch_errors"),
        ("healthcheck", "healthcheck"),
        ("proxy-logging", "proxy_logging"),
        ("s3api", "s3api"),
        // S3's multipart uploads are static large objects.
        ("slo", "slo"),
    ] {
        ini.section(&format!("filter:{filter}"))?
            .set("use", format!("egg:swift#{egg}"))?;
    }
    ini.section("filter:authtoken")?
        .set(
            "paste.filter_factory",
            "keystonemiddleware.auth_token:filter_factory",
        )?
        .set("www_authenticate_uri", &identity.url)?
        .set("auth_type", "admin_token")?
        .set("endpoint", &identity.url)?
        .set("token", identity.token)?
        .set("cafile", path(identity.ca)?)?
        .set("delay_auth_decision", "True")?
        .set("token_cache_time", -1)?
        .set("include_service_catalog", "False")?;
    ini.section("filter:s3token")?
        .set("use", "egg:swift#s3token")?
        .set("auth_uri", &identity.url)?
        .set("certfile", path(identity.ca)?)?
        .set("reseller_prefix", "AUTH_")?;
    ini.section("filter:keystoneauth")?
        .set("use", "egg:swift#keystoneauth")?
        .set("reseller_prefix", "AUTH_")?
        .set("operator_roles", "admin, member")?
        .set("project_reader_roles", "reader")?
        .set("allow_names_in_acls", "false")?;
    Ok(ini.finish())
}

/// The name the proxy is supervised under.
const PROXY: &str = "swift-proxy-server";
/// The first and the longest delay before a proxy that exited starts again.
const RESTART_DELAY: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(60));
/// A proxy that ran this long before it exited restarts after the shortest delay again.
const STABLE: Duration = Duration::from_secs(60);

/// The Swift proxy's process, run by a supervisor thread of its own (the object agent's), so
/// that its parent-death signal fires when `stratus up` ends and not when some worker thread
/// does, whichever task starts it again.
pub struct Proxy {
    processes: stratus_object_agent::driver::process::Processes,
    spec: stratus_object_agent::driver::ProcessSpec,
    /// Delays before the next starts, while it keeps exiting.
    delays: Option<Box<dyn Iterator<Item = Duration> + Send>>,
    started: tokio::time::Instant,
    restarts: u32,
}

impl Proxy {
    /// Writes the proxy's configuration in `DATA_DIR/object-proxy` (readable by its owner
    /// only: it holds the proxy's token) and starts `swift-proxy-server` on it, with the
    /// node's `swift.conf` (the cluster's hash path prefix and suffix, as its servers read
    /// it: a proxy hashing paths otherwise than they do would misplace every name).
    ///
    /// # Errors
    /// A value the configuration cannot hold, a file that cannot be written, or a proxy that
    /// cannot be started.
    pub fn start(
        args: &ObjectStoreArgs,
        dir: &Path,
        swift_dir: &Path,
        identity: &Identity<'_>,
    ) -> Result<Self> {
        let own = dir.join("object-proxy");
        super::private_dir(&own)?;
        let own = std::path::absolute(&own).context("resolve the proxy's directory")?;
        let conf = own.join("proxy-server.conf");
        super::write_private(&conf, &proxy_conf(args, swift_dir, identity)?)?;
        let spec = stratus_object_agent::driver::ProcessSpec {
            name: PROXY.into(),
            program: "/usr/bin/python3".into(),
            // Logs to standard error (the log file) as well as syslog.
            args: vec![
                "/usr/bin/swift-proxy-server".into(),
                conf.into_os_string(),
                "--verbose".into(),
            ],
            log: own.join("proxy.log"),
            swift_conf: Some(swift_dir.join("swift.conf")),
        };
        let proxy = Self {
            processes: stratus_object_agent::driver::process::Processes::new(),
            spec,
            delays: None,
            started: tokio::time::Instant::now(),
            restarts: 0,
        };
        proxy.spawn()?;
        Ok(proxy)
    }

    fn spawn(&self) -> Result<()> {
        use stratus_object_agent::driver::Supervisor as _;
        self.processes
            .start(&self.spec)
            .context("start swift-proxy-server (is Debian's swift-proxy installed?)")
    }

    /// How the proxy exited, if it did.
    fn exited(&self) -> Option<String> {
        use stratus_object_agent::driver::Supervisor as _;
        match self.processes.observe().remove(PROXY) {
            Some(stratus_object_agent::plan::Seen::Exited(how)) => Some(how),
            _ => None,
        }
    }

    /// Waits until the proxy accepts connections.
    ///
    /// # Errors
    /// It exited, or did not listen within [`READY`].
    pub async fn wait_ready(&mut self, args: &ObjectStoreArgs) -> Result<()> {
        let addr = (args.object_store_ip, args.object_store_port);
        let deadline = tokio::time::Instant::now() + READY;
        while tokio::time::Instant::now() < deadline {
            if let Some(how) = self.exited() {
                bail!(
                    "the Swift proxy exited at start-up ({how}); see {}",
                    self.spec.log.display()
                );
            }
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        bail!(
            "the Swift proxy did not listen on {}:{} within {} s; see {}",
            addr.0,
            addr.1,
            READY.as_secs(),
            self.spec.log.display()
        )
    }

    /// Keeps the proxy running until `until` completes: a proxy that exits is started again
    /// after a delay that doubles from 1 s to 60 s while it keeps exiting (and is 1 s again
    /// after a run of a minute), each exit and start in `stratus up`'s log.
    pub async fn supervise(&mut self, until: impl std::future::Future<Output = ()>) {
        tokio::pin!(until);
        loop {
            let how = loop {
                tokio::select! {
                    () = &mut until => return,
                    () = tokio::time::sleep(Duration::from_millis(500)) => {}
                }
                if let Some(how) = self.exited() {
                    break how;
                }
            };
            if self.started.elapsed() >= STABLE {
                self.delays = None;
            }
            loop {
                let delay = self
                    .delays
                    .get_or_insert_with(|| {
                        Box::new(stratus_object_agent::agent::restart_delays(RESTART_DELAY))
                    })
                    .next()
                    .unwrap_or(RESTART_DELAY.1);
                self.restarts += 1;
                tracing::warn!(
                    exit = %how,
                    delay_ms = delay.as_millis() as u64,
                    restart = self.restarts,
                    log = %self.spec.log.display(),
                    "the Swift proxy exited; starting it again"
                );
                tokio::select! {
                    () = &mut until => return,
                    () = tokio::time::sleep(delay) => {}
                }
                match self.spawn() {
                    Ok(()) => {
                        self.started = tokio::time::Instant::now();
                        tracing::info!(restart = self.restarts, "the Swift proxy started again");
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(error = format!("{e:#}"), "cannot start the Swift proxy")
                    }
                }
            }
        }
    }

    /// SIGTERM, then SIGKILL after 10 s (the supervisor's thread waits).
    pub async fn stop(self) {
        let Self { processes, .. } = self;
        let _ = tokio::task::spawn_blocking(move || drop(processes)).await;
    }
}

/// Takes away the servers' allow-list (the object agent's nftables table on the store's
/// address), which outlives the agent on purpose; one already gone is fine.
pub fn remove_allow_list(args: &ObjectStoreArgs) {
    let table = stratus_object_agent::filter::table_name(args.object_store_ip);
    let present = std::process::Command::new("nft")
        .args(["list", "table", "inet", &table])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if present && let Err(e) = stratus_object_agent::filter::remove(args.object_store_ip) {
        tracing::warn!(error = %e, %table, "cannot remove the object servers' allow-list");
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        store: ObjectStoreArgs,
    }

    fn parse(args: &[&str]) -> ObjectStoreArgs {
        let mut all = vec!["up", "--object-store"];
        all.extend(args);
        Cli::try_parse_from(all).expect("parses").store
    }

    #[test]
    fn the_store_stays_on_loopback_off_the_servers_ports() {
        assert!(parse(&[]).check().is_ok());
        assert_eq!(parse(&[]).url(), "http://127.0.0.1:8080");
        assert!(parse(&["--object-store-ip", "127.0.9.1"]).check().is_ok());
        let e = parse(&["--object-store-ip", "10.0.0.1"])
            .check()
            .expect_err("not loopback");
        assert!(e.to_string().contains("--object-store-ip"), "{e}");
        assert!(parse(&["--object-store-port", "6201"]).check().is_err());
    }

    #[test]
    fn the_proxy_validates_tokens_with_stratus_identity_and_refuses_bad_values() {
        let args = parse(&[
            "--object-store-ip",
            "127.0.9.1",
            "--object-store-port",
            "18080",
        ]);
        let ca = PathBuf::from("/data/pki/ca.crt");
        let identity = Identity {
            url: "https://127.0.0.1:6443/identity/v3".into(),
            ca: &ca,
            token: "t0ken",
        };
        let text = proxy_conf(&args, Path::new("/data/swift"), &identity).expect("conf");
        for line in [
            "[DEFAULT]\nbind_ip = 127.0.9.1\nbind_port = 18080\nworkers = 0\n",
            "swift_dir = /data/swift\n",
            "pipeline = catch_errors healthcheck proxy-logging authtoken s3api s3token keystoneauth slo proxy-logging proxy-server\n",
            "endpoint = https://127.0.0.1:6443/identity/v3\ntoken = t0ken\ncafile = /data/pki/ca.crt\n",
            "token_cache_time = -1\n",
            "[filter:s3token]\nuse = egg:swift#s3token\nauth_uri = https://127.0.0.1:6443/identity/v3\n",
            "operator_roles = admin, member\nproject_reader_roles = reader\nallow_names_in_acls = false\n",
        ] {
            assert!(text.contains(line), "{line:?} not in\n{text}");
        }
        let bad = Identity {
            url: identity.url.clone(),
            ca: &ca,
            token: "t\n[filter:keystoneauth]",
        };
        assert!(proxy_conf(&args, Path::new("/data/swift"), &bad).is_err());
        assert!(proxy_conf(&args, Path::new("/data/%(here)s"), &identity).is_err());
    }

    #[test]
    fn the_rings_hold_one_replica_on_the_one_device_of_the_node() {
        let args = parse(&["--object-store-ip", "127.0.9.1"]);
        let spec = args.ring_spec(RingType::Container, "node-1", 6201);
        assert_eq!(spec.replicas, 1);
        assert_eq!(spec.devices.len(), 1);
        let d = &spec.devices[0];
        assert_eq!(
            (d.ip.as_str(), d.port, d.device.as_str(), d.node.as_deref()),
            ("127.0.9.1", 6201, "d1", Some("node-1"))
        );
    }
}
