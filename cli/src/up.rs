//! `stratus up`: a whole single-node cloud (etcd, API server, controllers and, with
//! `--compute`, the node's compute, network and storage agents; with `--storage`, its storage
//! agent alone; with `--object-store`, a one-node Swift with its proxy) in one process tree.

mod object_store;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::json;
use tokio::process::{Child, Command};

/// Options of `stratus up`.
#[derive(Debug, clap::Args)]
pub struct UpArgs {
    /// Where etcd's data, the PKI, the token file and the kubeconfig live.
    #[arg(long, default_value = ".stratus")]
    pub data_dir: PathBuf,
    /// Address the API server listens on.
    #[arg(long, default_value = "127.0.0.1:6443")]
    pub listen: SocketAddr,
    /// etcd's client port on 127.0.0.1.
    #[arg(long, default_value_t = 2379)]
    pub etcd_client_port: u16,
    /// etcd's peer port on 127.0.0.1.
    #[arg(long, default_value_t = 2380)]
    pub etcd_peer_port: u16,
    /// How much history etcd keeps (its `--auto-compaction-retention` in periodic mode): a
    /// watch or continue token older than this answers 410 Gone and the client lists anew.
    /// kube-apiserver compacts every 5 minutes.
    #[arg(long, default_value = "5m")]
    pub etcd_auto_compaction_retention: String,
    /// Seconds between watch bookmarks.
    #[arg(long, default_value_t = 60)]
    pub bookmark_seconds: u64,
    /// Run this host's compute agent with this libvirt URI (`qemu:///system`, or
    /// `test:///default` for a cloud whose guests are not real).
    #[arg(long)]
    pub compute: Option<String>,
    /// The name of this host's node, with `--compute` or `--storage`.
    #[arg(long, default_value = "node-1")]
    pub node_name: String,
    /// Run this host's storage agent (without `--compute` too) with one file pool,
    /// `NODE-files`, in `DATA_DIR/volumes`; `--compute` runs it unless `--no-storage`.
    #[arg(long, conflicts_with = "no_storage")]
    pub storage: bool,
    /// With `--compute`, run no storage agent.
    #[arg(long)]
    pub no_storage: bool,
    /// With `--compute`, the address this node's VXLAN traffic leaves from. `stratus up` is
    /// one node, whose tenant networks reach no other node (its VXLAN devices have no peer),
    /// so 127.0.0.1 serves; give the host's address to let nodes started elsewhere join.
    #[arg(long, default_value = "127.0.0.1")]
    pub underlay_ip: std::net::Ipv4Addr,
    /// With `--compute`, the network namespace (`ip netns` name) the node's bridges, VXLAN
    /// devices, nftables table and DHCP servers go in; by default the host's own.
    #[arg(long)]
    pub network_namespace: Option<String>,
    /// Issue node identities (`system:node:NAME`, with `DIR/node-NAME.kubeconfig`) for agents
    /// run elsewhere, comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub nodes: Vec<String>,
    /// What the image controller and this host's compute agent may fetch (etcd's and the API
    /// server's addresses are always refused).
    #[command(flatten)]
    pub images: crate::image_policy::ImagePolicyArgs,
    /// The API server's limits and login throttling.
    #[command(flatten)]
    pub serving: crate::serving::ServingArgs,
    /// The one-node object store.
    #[command(flatten)]
    pub object_store: object_store::ObjectStoreArgs,
}

/// The etcd child process.
struct Etcd {
    child: Child,
}

impl Etcd {
    /// Starts etcd serving clients and peers over TLS only, each required to present a
    /// certificate of etcd's own CA, and compacting history older than `retention`.
    async fn start(
        dir: &Path,
        pki: &stratus_apiserver::http::tls::EtcdPki,
        client_port: u16,
        peer_port: u16,
        retention: &str,
    ) -> Result<(Self, String)> {
        let data = dir.join("etcd");
        private_dir(&data)?;
        let client = format!("https://127.0.0.1:{client_port}");
        let peer = format!("https://127.0.0.1:{peer_port}");
        let log = std::fs::File::create(dir.join("etcd.log")).context("create etcd.log")?;
        let mut cmd = Command::new("etcd");
        cmd.arg("--name")
            .arg("stratus")
            .arg("--data-dir")
            .arg(&data)
            .arg("--listen-client-urls")
            .arg(&client)
            .arg("--advertise-client-urls")
            .arg(&client)
            .arg("--cert-file")
            .arg(&pki.server_cert)
            .arg("--key-file")
            .arg(&pki.server_key)
            .arg("--trusted-ca-file")
            .arg(&pki.ca_cert)
            .arg("--client-cert-auth")
            .arg("--listen-peer-urls")
            .arg(&peer)
            .arg("--initial-advertise-peer-urls")
            .arg(&peer)
            .arg("--initial-cluster")
            .arg(format!("stratus={peer}"))
            .arg("--peer-cert-file")
            .arg(&pki.peer_cert)
            .arg("--peer-key-file")
            .arg(&pki.peer_key)
            .arg("--peer-trusted-ca-file")
            .arg(&pki.ca_cert)
            .arg("--peer-client-cert-auth")
            .arg("--auto-compaction-mode")
            .arg("periodic")
            .arg("--auto-compaction-retention")
            .arg(retention)
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .kill_on_drop(true);
        stop_with_parent(&mut cmd);
        let child = cmd
            .spawn()
            .context("start etcd (is etcd-server installed and on PATH?)")?;
        Ok((Self { child }, client))
    }

    async fn stop(mut self) {
        if let Some(pid) = self.child.id() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(pid.to_string())
                .status()
                .await;
            if tokio::time::timeout(Duration::from_secs(10), self.child.wait())
                .await
                .is_ok()
            {
                return;
            }
        }
        let _ = self.child.kill().await;
    }
}

/// Makes the process `cmd` starts receive SIGTERM when `stratus up` dies, however it dies
/// (SIGKILL included, when no shutdown runs), so that it never outlives the cloud it belongs to.
///
/// The kernel sends the parent-death signal when the *thread* that forked the child ends, not
/// the process: a child must be spawned from a thread that lives as long as `stratus up`. etcd
/// is, by [`run`] on the main thread (the future `#[tokio::main]` blocks on, never a worker
/// or a blocking-pool thread, which may end while the process lives).
#[allow(unsafe_code)]
pub(crate) fn stop_with_parent(cmd: &mut Command) {
    let parent = rustix::process::getpid();
    // SAFETY: the closure runs in the forked child before exec, where only async-signal-safe
    // work is allowed: it makes two system calls (prctl, getppid) through rustix's raw
    // syscall backend and allocates nothing (its error is an errno). Checking the parent after
    // prctl closes the race of a parent that died before the signal was armed.
    unsafe {
        cmd.pre_exec(move || {
            rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::TERM))?;
            if rustix::process::getppid() != Some(parent) {
                return Err(rustix::io::Errno::SRCH.into());
            }
            Ok(())
        });
    }
}

async fn wait_for_etcd(
    endpoint: &str,
    tls: &stratus_apiserver::storage::etcd::EtcdTls,
    child: &mut Child,
) -> Result<()> {
    for _ in 0..100 {
        if let Some(status) = child.try_wait()? {
            bail!("etcd exited at start-up with {status}; see etcd.log in the data directory");
        }
        if let Ok(store) = stratus_apiserver::storage::store::Store::connect_with(
            &[endpoint.to_string()],
            Some(tls),
        )
        .await
            && store.revision().await.is_ok()
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("etcd did not become ready at {endpoint} within 10 s")
}

fn random_token() -> String {
    format!("{}{}", uuid_hex(), uuid_hex())
}

fn uuid_hex() -> String {
    // 122 random bits from the OS generator.
    uuid::Uuid::new_v4().simple().to_string()
}

/// The bootstrap administrator (break-glass, like kubeadm's admin.conf) and the controllers'
/// service identity, both in the token file.
const ADMIN_IDENTITY: &str = "system:admin";
const CONTROLLERS_IDENTITY: &str = "system:stratus-controllers";

/// The token-file token of every identity in `identities`, made once and kept in the data
/// directory (tokens already there are kept).
fn ensure_tokens(dir: &Path, identities: &[String]) -> Result<(PathBuf, Vec<String>)> {
    let path = dir.join("tokens.csv");
    let existing = stratus_apiserver::http::server::read_token_file(&path).unwrap_or_default();
    let mut changed = false;
    let tokens: Vec<String> = identities
        .iter()
        .map(|identity| {
            existing
                .iter()
                .find(|(_, user)| *user == identity)
                .map(|(token, _)| token.clone())
                .unwrap_or_else(|| {
                    changed = true;
                    random_token()
                })
        })
        .collect();
    if changed {
        let mut text = String::from("# token,user\n");
        for (identity, token) in identities.iter().zip(&tokens) {
            text.push_str(&format!("{token},{identity}\n"));
        }
        write_private(&path, &text)?;
    }
    Ok((path, tokens))
}

/// Makes the `admin` User (a cluster-wide admin) on the first start, with a random password
/// written to `DIR/admin-password`, so people log in as a user of the cloud (`stratus login`)
/// rather than with the bootstrap token.
async fn ensure_admin_user(kubeconfig: &Path, dir: &Path) -> Result<()> {
    use kube::api::{Api, PostParams};
    use stratus_api_types::identity::{RoleAssignment, User};
    let client = crate::kubeconfig::Kubeconfig::file(kubeconfig)
        .client()
        .await?;
    let users: Api<User> = Api::all(client.clone());
    if users
        .get_opt("admin")
        .await
        .context("read user admin")?
        .is_some()
    {
        return Ok(());
    }
    let user: User = serde_json::from_value(json!({
        "apiVersion": "identity.stratus.dev/v1", "kind": "User",
        "metadata": {"name": "admin"},
        "spec": {"displayName": "Cloud administrator", "enabled": true},
    }))?;
    users
        .create(&PostParams::default(), &user)
        .await
        .context("create user admin")?;
    let grants: Api<RoleAssignment> = Api::namespaced(client.clone(), "stratus-system");
    let grant: RoleAssignment = serde_json::from_value(json!({
        "apiVersion": "identity.stratus.dev/v1", "kind": "RoleAssignment",
        "metadata": {"name": "admin-cluster-admin"},
        "spec": {"user": "admin", "role": "admin", "clusterWide": true},
    }))?;
    match grants.create(&PostParams::default(), &grant).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 409 => {}
        Err(e) => return Err(anyhow::Error::new(e).context("assign the admin role")),
    }
    let password = random_token();
    let body = serde_json::to_vec(&json!({ "password": password }))?;
    let req = http::Request::put("/apis/identity.stratus.dev/v1/users/admin/password")
        .header("content-type", "application/json")
        .body(body)
        .context("build the password request")?;
    client
        .request::<serde_json::Value>(req)
        .await
        .context("set the admin password")?;
    write_private(&dir.join("admin-password"), &format!("{password}\n"))?;
    tracing::info!(
        file = %dir.join("admin-password").display(),
        "created user admin (cluster admin); its password is in the file"
    );
    Ok(())
}

/// Makes `dir` (and its parents) if missing, readable by this user only (0700): it holds
/// etcd's data (the token signing key, password hashes), the PKI and the tokens. An existing
/// directory is made 0700 too.
fn private_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("create {}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("make {} private", dir.display()))
}

fn write_private(path: &Path, data: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("write {}", path.display()))?;
    f.write_all(data.as_bytes())
        .with_context(|| format!("write {}", path.display()))
}

/// Writes a kubeconfig for `server` with the CA and a bearer token.
pub fn write_kubeconfig(
    path: &Path,
    server: &str,
    ca_pem: &[u8],
    token: &str,
    user: &str,
) -> Result<()> {
    use base64::Engine;
    let ca = base64::engine::general_purpose::STANDARD.encode(ca_pem);
    let cfg = json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "stratus", "cluster": {"server": server, "certificate-authority-data": ca}}],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [{"name": format!("{user}@stratus"), "context": {"cluster": "stratus", "user": user, "namespace": "default"}}],
        "current-context": format!("{user}@stratus"),
    });
    let yaml = serde_saphyr::to_string(&cfg).context("render kubeconfig")?;
    write_private(path, &yaml)
}

/// The node's file pool, `NODE-files`, in `DIR/volumes` (made private, as the rest of `DIR`).
fn file_pool(dir: &Path, node: &str) -> Result<stratus_storage_agent::pool::PoolConfig> {
    let volumes =
        std::path::absolute(dir.join("volumes")).context("resolve the volumes directory")?;
    private_dir(&volumes)?;
    let spec = format!("{node}-files=file:{}", volumes.display());
    spec.parse()
        .map_err(|e: String| anyhow::anyhow!(e))
        .with_context(|| format!("the file pool {spec:?}"))
}

/// Where the node's DHCP servers keep their files: outside the private data directory, which
/// dnsmasq (rereading its hosts file as `nobody`) cannot search, in `/run/stratus/up-HASH/dhcp`
/// (HASH of the data directory's absolute path, so clouds side by side keep apart), with a
/// link to it at `DIR/network-dhcp`.
fn dhcp_dir(dir: &Path) -> Result<PathBuf> {
    let abs = std::path::absolute(dir).context("resolve the data directory")?;
    // FNV-1a: stable across builds, so a restarted cloud finds its DHCP servers again.
    let hash = abs
        .as_os_str()
        .as_encoded_bytes()
        .iter()
        .fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
        });
    let run = PathBuf::from("/run/stratus").join(format!("up-{hash:016x}"));
    let dhcp = run.join("dhcp");
    std::fs::create_dir_all(&dhcp).with_context(|| format!("create {}", dhcp.display()))?;
    let link = dir.join("network-dhcp");
    if std::fs::read_link(&link).ok().as_deref() != Some(dhcp.as_path()) {
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&dhcp, &link)
            .with_context(|| format!("link {} to {}", link.display(), dhcp.display()))?;
    }
    Ok(dhcp)
}

/// Runs the cloud until Ctrl-C or SIGTERM.
pub async fn run(args: UpArgs) -> Result<()> {
    // Signals that arrive while starting are kept and acted on once everything is up.
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("install SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("install SIGINT handler")?;
    let dir = &args.data_dir;
    private_dir(dir)?;
    let storage = args.storage || (args.compute.is_some() && !args.no_storage);
    let file_pool = storage
        .then(|| file_pool(dir, &args.node_name))
        .transpose()?;
    let etcd_pki = stratus_apiserver::http::tls::ensure_etcd_pki(&dir.join("pki").join("etcd"))
        .context("make etcd's CA and certificates")?;
    let etcd_tls = etcd_pki.client_tls();
    let (mut etcd, endpoint) = Etcd::start(
        dir,
        &etcd_pki,
        args.etcd_client_port,
        args.etcd_peer_port,
        &args.etcd_auto_compaction_retention,
    )
    .await?;
    if let Err(e) = wait_for_etcd(&endpoint, &etcd_tls, &mut etcd.child).await {
        etcd.stop().await;
        return Err(e);
    }
    tracing::info!(%endpoint, "etcd ready");

    let host = args.listen.ip().to_string();
    let pki = stratus_apiserver::http::tls::ensure_pki(
        &dir.join("pki"),
        &[host.clone(), "localhost".into(), "127.0.0.1".into()],
    )
    .context("make the CA and serving certificate")?;
    // The NBD CA, its key kept (0600) for `stratus pki nbd-node` to issue each node's
    // certificate for volume exports.
    stratus_apiserver::http::nbd_pki::ensure_ca(&dir.join("pki").join("nbd"))
        .context("make the NBD CA")?;
    let mut nodes = args.nodes.clone();
    let objects = &args.object_store;
    if objects.object_store {
        objects.check()?;
    }
    if (args.compute.is_some() || storage || objects.object_store)
        && !nodes.contains(&args.node_name)
    {
        nodes.insert(0, args.node_name.clone());
    }
    for n in &nodes {
        if !stratus_apiserver::base::meta::is_dns1123_label(n) {
            bail!("node name {n:?} is not a DNS-1123 label");
        }
    }
    let mut identities = vec![ADMIN_IDENTITY.to_string(), CONTROLLERS_IDENTITY.to_string()];
    identities.extend(nodes.iter().map(|n| format!("system:node:{n}")));
    // The Swift proxy's, last: it validates tokens and makes no other request.
    if objects.object_store {
        identities.push(object_store::PROXY_IDENTITY.to_string());
    }
    let (token_file, tokens) = ensure_tokens(dir, &identities)?;
    let (token, controllers_token) = (tokens[0].clone(), tokens[1].clone());
    let mut config = stratus_apiserver::Config::new(vec![endpoint]);
    config.etcd_tls = Some(etcd_tls);
    config.listen = args.listen;
    config.tls = Some((pki.server_cert.clone(), pki.server_key.clone()));
    config.tokens =
        stratus_apiserver::http::server::read_token_file(&token_file).context("read tokens.csv")?;
    config.bookmark_interval = Duration::from_secs(args.bookmark_seconds.max(1));
    config.audit_log = Some(dir.join("audit.log"));
    args.serving.apply(&mut config);
    // An uploaded image is held to the limits a downloaded one is.
    config.image_max_bytes = args.images.image_max_download_mib << 20;
    config.image_max_virtual_size = args.images.image_max_virtual_size_gib << 30;
    if objects.object_store && config.object_store_url.is_none() {
        // Tokens' catalogs lead Swift's clients to their project's account on the proxy.
        config.object_store_url = Some(objects.url());
    }
    if objects.object_store {
        // The proxy calls the API server over loopback: its s3tokens calls carry every S3
        // client's requests and are not limited as one source.
        config
            .identity_proxies
            .push(std::net::Ipv4Addr::LOCALHOST.into());
    }
    let server = match stratus_apiserver::start(config).await {
        Ok(s) => s,
        Err(e) => {
            etcd.stop().await;
            return Err(anyhow::Error::new(e).context("start the API server"));
        }
    };
    let url = format!("https://{}", server.local_addr);
    let kubeconfig = dir.join("kubeconfig");
    let ca = std::fs::read(&pki.ca_cert).context("read the CA certificate")?;
    write_kubeconfig(&kubeconfig, &url, &ca, &token, ADMIN_IDENTITY)?;
    let controllers_kubeconfig = dir.join("controllers.kubeconfig");
    write_kubeconfig(
        &controllers_kubeconfig,
        &url,
        &ca,
        &controllers_token,
        CONTROLLERS_IDENTITY,
    )?;
    for (n, token) in nodes.iter().zip(&tokens[2..]) {
        write_kubeconfig(
            &dir.join(format!("node-{n}.kubeconfig")),
            &url,
            &ca,
            token,
            &format!("system:node:{n}"),
        )?;
    }
    tracing::info!(%url, kubeconfig = %kubeconfig.display(), "API server ready");
    if let Err(e) = ensure_admin_user(&kubeconfig, dir).await {
        server.abort();
        etcd.stop().await;
        return Err(e);
    }

    let mut images = args.images.clone();
    images.image_url_deny_addresses.extend([
        server.local_addr,
        SocketAddr::from(([127, 0, 0, 1], args.etcd_client_port)),
        SocketAddr::from(([127, 0, 0, 1], args.etcd_peer_port)),
    ]);
    let controllers = tokio::spawn(crate::controllers::run_with_kubeconfig(
        controllers_kubeconfig,
        dir.join("images"),
        images.clone(),
        // With an object store, URL sources' data is kept there, as uploads' is.
        objects.object_store,
    ));
    let mut roles = Vec::new();
    if args.compute.is_some() {
        // One node: its guests' networks are served here, by the network role.
        roles.extend([crate::agent::Role::Compute, crate::agent::Role::Network]);
    }
    let mut object_args = crate::agent::ObjectArgs::default();
    if objects.object_store {
        roles.push(crate::agent::Role::Object);
        object_args = objects.object_args(dir)?;
    }
    let mut storage_args = crate::agent::StorageArgs::default();
    if let Some(pool) = file_pool {
        roles.push(crate::agent::Role::Storage);
        storage_args.storage_pools = vec![pool];
        storage_args.storage_heartbeat_seconds = 5;
    }
    // The network role's DHCP servers' files, where dnsmasq can read them.
    let dhcp = match args.compute {
        Some(_) => Some(dhcp_dir(dir)?),
        None => None,
    };
    let agent = (!roles.is_empty()).then(|| {
        tokio::spawn(crate::agent::run(crate::agent::AgentArgs {
            node: args.node_name.clone(),
            roles,
            kubeconfig: Some(dir.join(format!("node-{}.kubeconfig", args.node_name))),
            libvirt_uri: args.compute.clone().unwrap_or_default(),
            state_dir: dir.join("compute"),
            zone: "nova".into(),
            heartbeat_seconds: 10,
            resync_seconds: 10,
            images,
            network: crate::agent::NetworkArgs {
                underlay_ip: Some(args.underlay_ip),
                network_namespace: args.network_namespace.clone(),
                network_resync_seconds: 2,
                dhcp_dir: dhcp.clone(),
                ..Default::default()
            },
            storage: storage_args,
            object: object_args,
        }))
    });
    // The object store's proxy, once the rings are installed (run by a supervisor thread of its
    // own, so that it gets its parent-death signal only when `stratus up` ends).
    let mut proxy = None;
    if objects.object_store {
        let start = async {
            let client = crate::kubeconfig::Kubeconfig::file(&kubeconfig)
                .client()
                .await?;
            objects.apply_rings(client, &args.node_name).await?;
            let swift_dir = object_store::swift_dir(&dir.join("compute"))?;
            object_store::wait_for_rings(&swift_dir).await?;
            let ca = std::path::absolute(&pki.ca_cert).context("resolve the CA's path")?;
            let identity = object_store::Identity {
                url: format!("{url}/identity/v3"),
                ca: &ca,
                token: tokens.last().map(String::as_str).unwrap_or_default(),
            };
            let mut p = object_store::Proxy::start(objects, dir, &swift_dir, &identity)?;
            let ready = p.wait_ready(objects).await;
            proxy = Some(p);
            ready
        };
        let started = tokio::select! {
            r = start => Some(r),
            _ = int.recv() => None,
            _ = term.recv() => None,
        };
        match started {
            Some(Ok(())) => {}
            Some(Err(e)) => {
                stop(agent, controllers, server, etcd, proxy, objects).await;
                return Err(e.context("start the object store"));
            }
            None => {
                tracing::info!("stopped while starting");
                stop(agent, controllers, server, etcd, proxy, objects).await;
                return Ok(());
            }
        }
    }
    eprintln!("Stratus is up: export KUBECONFIG={}", kubeconfig.display());
    eprintln!("Dashboard: {url}/dashboard/ (log in with a Stratus user's name and password)");
    if nodes.iter().any(|n| *n != args.node_name) {
        // A volume of one node reaches another's guests over NBD, with TLS by default.
        eprintln!(
            "Node certificates for volumes served to other nodes (NBD over TLS): stratus pki nbd-node NAME [--address STORAGE-IP] --ca-dir {} --out DIR",
            dir.join("pki").join("nbd").display()
        );
    }
    if objects.object_store {
        eprintln!(
            "Object store (Swift API and S3): {} (identity: {url}/identity/v3)",
            objects.url()
        );
    }

    let signal = async {
        tokio::select! {
            _ = int.recv() => tracing::info!("interrupted"),
            _ = term.recv() => tracing::info!("terminated"),
        }
    };
    // The proxy is started again whenever it exits, until then.
    match proxy.as_mut() {
        Some(p) => p.supervise(signal).await,
        None => signal.await,
    }
    stop(agent, controllers, server, etcd, proxy, objects).await;
    tracing::info!("stopped");
    Ok(())
}

/// Stops what `stratus up` started: the Swift proxy, the node's agents (the Swift servers and
/// daemons stop with the object agent's supervisor) and the servers' allow-list, the
/// controllers, the API server and etcd.
async fn stop(
    agent: Option<tokio::task::JoinHandle<Result<()>>>,
    controllers: tokio::task::JoinHandle<Result<()>>,
    server: stratus_apiserver::Server,
    etcd: Etcd,
    proxy: Option<object_store::Proxy>,
    objects: &object_store::ObjectStoreArgs,
) {
    if let Some(p) = proxy {
        p.stop().await;
    }
    if let Some(a) = agent {
        a.abort();
        // Done once the agents' futures are dropped, with the processes they own.
        let _ = tokio::time::timeout(Duration::from_secs(60), a).await;
    }
    if objects.object_store {
        object_store::remove_allow_list(objects);
    }
    controllers.abort();
    server.abort();
    etcd.stop().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_directories_are_private_even_when_they_existed() -> Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let tmp =
            std::env::temp_dir().join(format!("stratus-private-dir-{}", uuid::Uuid::new_v4()));
        let fresh = tmp.join("a/b");
        private_dir(&fresh)?;
        let mode =
            |p: &Path| -> Result<u32> { Ok(std::fs::metadata(p)?.permissions().mode() & 0o777) };
        assert_eq!(mode(&fresh)?, 0o700);
        let old = tmp.join("old");
        std::fs::create_dir(&old)?;
        std::fs::set_permissions(&old, std::fs::Permissions::from_mode(0o755))?;
        private_dir(&old)?;
        assert_eq!(mode(&old)?, 0o700);
        std::fs::remove_dir_all(&tmp)?;
        Ok(())
    }
}
