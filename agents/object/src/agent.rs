//! The object agent's loop: the node's ObjectNode registered; each ObjectRing's current
//! version installed as its ring file; the Swift servers and daemons kept running ([`plan`]
//! decides, the [`Supervisor`] acts), a crashed one restarted with capped exponential
//! backoff and an Event; and, every heartbeat, the devices' health, the processes, the rings
//! installed and replication progress written to the ObjectNode's status.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use backon::{BackoffBuilder as _, ExponentialBackoff, ExponentialBuilder};
use base64::Engine as _;
use futures::StreamExt as _;
use kube::api::{Api, PostParams};
use kube::runtime::events::{EventType, Recorder, Reporter};
use kube::runtime::{WatchStreamExt as _, reflector, watcher};
use kube::{Client, Resource as _};
use stratus_api_types::common::{ConditionType, Reason, Time, set_condition};
use stratus_api_types::object::{
    InstalledRing, ObjectNode, ObjectNodePhase, ObjectNodeSpec, ObjectNodeStatus,
    ObjectProcessStatus, ObjectRing, ObjectRingVersion,
};
use stratus_runtime::{Runtime, blocking};

use crate::config::{ConfigError, KINDS, NodeConfig, kind_name};
use crate::driver::{DriverError, ProcessSpec, Supervisor, disk};
use crate::filter;
use crate::plan::{self, Seen, Source, Step};
use crate::recon;

/// The agent's name in Events and as field manager.
pub const MANAGER: &str = "stratus-object-agent";

/// Largest ring file installed (the API's ObjectRingVersion holds at most 1 MB of base64).
const MAX_RING_BYTES: usize = 1 << 20;

/// A process that ran this long before it exited restarts after the shortest delay again.
const STABLE: Duration = Duration::from_secs(60);

/// How the agent runs Swift on its node.
#[derive(Debug, Clone)]
pub struct Config {
    /// The node and its devices.
    pub node: NodeConfig,
    /// How often the ObjectNode's status is written.
    pub heartbeat: Duration,
    /// How often the processes and rings are checked.
    pub tick: Duration,
    /// The Python that runs Swift's programs (Debian's: `/usr/bin/python3`).
    pub python: PathBuf,
    /// Where Swift's programs are (`/usr/bin`).
    pub bin_dir: PathBuf,
    /// The first and the longest delay before a crashed process starts again.
    pub restart_delay: (Duration, Duration),
    /// The proxies' addresses: with the rings' nodes, the only sources the servers' ports
    /// accept (Swift's storage servers have no authentication of their own).
    pub proxies: Vec<std::net::Ipv4Addr>,
}

/// The agent's failure to start.
#[derive(Debug, thiserror::Error)]
pub enum ObjectError {
    /// The configuration cannot be written.
    #[error("server configuration")]
    Config(#[from] ConfigError),
    /// A file or directory of the agent's.
    #[error("{0}")]
    Driver(#[from] DriverError),
    /// The API server.
    #[error("request to the API server")]
    Api(#[from] kube::Error),
    /// A blocking task panicked (a bug).
    #[error("blocking task failed")]
    Join(#[from] tokio::task::JoinError),
    /// The servers' allow-list cannot be written: they are not started unguarded.
    #[error("the Swift servers' allow-list")]
    Filter(#[from] crate::filter::FilterError),
    /// The cluster's hash file, or the node's `swift.conf`.
    #[error("the Swift hash path prefix and suffix")]
    Hash(#[from] crate::hash::HashError),
}

/// A process's restart bookkeeping.
#[derive(Default)]
struct Track {
    restarts: u32,
    started: Option<Instant>,
    restart_at: Option<u64>,
    backoff: Option<ExponentialBackoff>,
    last_exit: Option<String>,
}

struct Agent {
    config: Config,
    supervisor: Arc<dyn Supervisor>,
    recorder: Recorder,
    nodes: Api<ObjectNode>,
    versions: Api<ObjectRingVersion>,
    status: Runtime<ObjectNode>,
    epoch: Instant,
    tracks: BTreeMap<String, Track>,
    /// Ring file → what was installed there, and its bytes.
    installed: BTreeMap<String, (Source, Vec<u8>)>,
    ring_problems: Vec<String>,
    /// The cluster hash's fingerprint, as the node reports it.
    fingerprint: String,
    /// The rings whose nodes use another cluster hash (name, their fingerprint), whose
    /// versions the node does not install.
    foreign: Vec<(String, String)>,
}

/// Writes the servers' configuration files (`swift.conf` from the cluster's hash file, made
/// first if there is none) and makes the agent's directories; the cluster hash's fingerprint
/// ([`crate::hash::SwiftHash::fingerprint`]).
///
/// # Errors
/// A value the configuration cannot hold, a directory that cannot be written, or a hash file
/// that cannot be used.
pub fn prepare(config: &NodeConfig) -> Result<String, ObjectError> {
    config.check()?;
    for dir in [
        config.state_dir.clone(),
        config.swift_dir(),
        config.recon_dir(),
        config.log_dir(),
    ] {
        std::fs::create_dir_all(&dir)
            .map_err(|e| DriverError::io(format!("create {}", dir.display()), e))?;
    }
    for kind in KINDS {
        let text = config.server_conf(kind)?;
        let path = config.conf_path(kind);
        std::fs::write(&path, text)
            .map_err(|e| DriverError::io(format!("write {}", path.display()), e))?;
    }
    let path = config.rsyncd_path();
    std::fs::write(&path, config.rsyncd_conf()?)
        .map_err(|e| DriverError::io(format!("write {}", path.display()), e))?;
    let (hash, created) = crate::hash::SwiftHash::load_or_create(&config.hash_file)?;
    hash.write_swift_conf(&config.swift_conf_path())?;
    // Where, never what.
    let fingerprint = hash.fingerprint();
    tracing::info!(file = %config.hash_file.display(), created, %fingerprint, "swift hash path prefix and suffix ready");
    Ok(fingerprint)
}

/// The process the node runs as `name` (`swift-object-replicator`, `rsync`).
pub fn process_spec(config: &Config, name: &str) -> ProcessSpec {
    if name == crate::config::RSYNC {
        return ProcessSpec {
            name: name.to_owned(),
            program: config.bin_dir.join(name),
            args: vec![
                "--daemon".into(),
                "--no-detach".into(),
                "--config".into(),
                config.node.rsyncd_path().into_os_string(),
            ],
            log: config.node.log_dir().join("rsync.log"),
            swift_conf: None,
        };
    }
    let kind = KINDS
        .into_iter()
        .find(|k| name.starts_with(&format!("swift-{}-", kind_name(*k))))
        .unwrap_or(stratus_api_types::object::RingType::Object);
    ProcessSpec {
        name: name.to_owned(),
        program: config.python.clone(),
        args: vec![
            config.bin_dir.join(name).into_os_string(),
            config.node.conf_path(kind).into_os_string(),
            // Log to standard error (the log file) as well as syslog.
            "--verbose".into(),
        ],
        log: config.node.log_dir().join(format!("{name}.log")),
        swift_conf: Some(config.node.swift_conf_path()),
    }
}

fn now_time() -> Time {
    Time(jiff::Timestamp::now())
}

impl Agent {
    fn new(
        client: Client,
        config: Config,
        supervisor: Arc<dyn Supervisor>,
        fingerprint: String,
    ) -> Self {
        Self {
            recorder: Recorder::new(
                client.clone(),
                Reporter {
                    controller: MANAGER.into(),
                    instance: Some(config.node.node.clone()),
                },
            ),
            nodes: Api::all(client.clone()),
            versions: Api::all(client.clone()),
            status: Runtime::new(client, MANAGER),
            epoch: Instant::now(),
            tracks: BTreeMap::new(),
            installed: BTreeMap::new(),
            ring_problems: Vec::new(),
            fingerprint,
            foreign: Vec::new(),
            supervisor,
            config,
        }
    }

    fn ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn node_ref(&self) -> k8s_openapi::api::core::v1::ObjectReference {
        let mut node = ObjectNode::new(
            &self.config.node.node,
            ObjectNodeSpec {
                ip: self.config.node.ip.to_string(),
            },
        );
        node.metadata.name = Some(self.config.node.node.clone());
        node.object_ref(&())
    }

    async fn event(&self, type_: EventType, reason: &str, note: String) {
        stratus_runtime::events::publish(
            &self.recorder,
            &self.node_ref(),
            type_,
            "Supervise",
            reason,
            note,
        )
        .await;
    }

    /// Creates the node's ObjectNode if it has none.
    async fn register(&self) -> Result<ObjectNode, kube::Error> {
        let name = &self.config.node.node;
        if let Some(n) = self.nodes.get_opt(name).await? {
            return Ok(n);
        }
        let node = ObjectNode::new(
            name,
            ObjectNodeSpec {
                ip: self.config.node.ip.to_string(),
            },
        );
        match self.nodes.create(&PostParams::default(), &node).await {
            Ok(n) => Ok(n),
            Err(kube::Error::Api(s)) if s.code == 409 => self.nodes.get(name).await,
            Err(e) => Err(e),
        }
    }

    /// Installs each ring's current version that is not in place yet.
    async fn install_rings(&mut self, rings: &[ObjectRing]) {
        self.check_hash(rings).await;
        let (sources, mut problems) = plan::ring_sources(rings, &self.fingerprint);
        let dir = self.config.node.swift_dir();
        for (file, source) in sources {
            let on_disk = std::fs::read(dir.join(&file)).ok();
            if let Some((had, bytes)) = self.installed.get(&file)
                && had == &source
                && on_disk.as_ref() == Some(bytes)
            {
                continue;
            }
            let bytes = match self.fetch(&source).await {
                Ok(b) => b,
                Err(why) => {
                    problems.push(format!("{}: {why}", source.version_name));
                    continue;
                }
            };
            let (d, f, b) = (dir.clone(), file.clone(), bytes.clone());
            match blocking(move || disk::install(&d, &f, &b)).await {
                Ok(Ok(changed)) => {
                    if changed {
                        tracing::info!(ring = %source.ring, version = source.version, %file, "ring installed");
                        self.event(
                            EventType::Normal,
                            "RingInstalled",
                            format!("{file}: {} version {}", source.ring, source.version),
                        )
                        .await;
                    }
                    self.installed.insert(file, (source, bytes));
                }
                Ok(Err(e)) => problems.push(stratus_runtime::policy::chain(&e)),
                Err(e) => problems.push(e.to_string()),
            }
        }
        self.ring_problems = problems;
    }

    async fn fetch(&self, source: &Source) -> Result<Vec<u8>, String> {
        let v = self
            .versions
            .get(&source.version_name)
            .await
            .map_err(|e| stratus_runtime::policy::chain(&e))?;
        if v.spec.ring != source.ring || v.spec.version != source.version {
            return Err(format!(
                "is {} version {}, not {} version {}",
                v.spec.ring, v.spec.version, source.ring, source.version
            ));
        }
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(v.spec.ring_file.as_bytes())
            .map_err(|e| format!("ringFile: {e}"))?;
        if bytes.len() > MAX_RING_BYTES || !bytes.starts_with(&[0x1f, 0x8b]) {
            return Err("ringFile: not a gzipped ring file of at most 1 MiB".into());
        }
        Ok(bytes)
    }

    /// Notes the rings whose nodes use another cluster hash than this node's, with a Warning
    /// Event when that changes to some.
    async fn check_hash(&mut self, rings: &[ObjectRing]) {
        let foreign: Vec<(String, String)> = rings
            .iter()
            .filter_map(|r| {
                plan::foreign_hash(r, &self.fingerprint)
                    .map(|f| (r.metadata.name.clone().unwrap_or_default(), f.to_owned()))
            })
            .collect();
        if foreign == self.foreign {
            return;
        }
        self.foreign = foreign;
        if let Some(message) = self.hash_message() {
            tracing::warn!(%message, "another cluster hash");
            self.event(EventType::Warning, "HashMismatch", message)
                .await;
        } else {
            tracing::info!("the rings' nodes use this node's cluster hash");
        }
    }

    /// Whether some ring's nodes show a fingerprint of another version than this node's.
    fn foreign_version(&self) -> bool {
        use stratus_api_types::object::hash_fingerprint_version as version;
        let own = version(&self.fingerprint);
        self.foreign.iter().any(|(_, f)| version(f) != own)
    }

    /// What the HashMismatch condition says while some ring's nodes use another hash.
    fn hash_message(&self) -> Option<String> {
        if self.foreign.is_empty() {
            return None;
        }
        let rings: Vec<String> = self
            .foreign
            .iter()
            .map(|(r, f)| format!("{r} ({f})"))
            .collect();
        Some(format!(
            "the cluster hash of this node (fingerprint {}) is not its rings' nodes': {}; none \
             of their versions is installed until the node is given the cluster's hash file",
            self.fingerprint,
            rings.join(", ")
        ))
    }

    /// The ring types whose ring is installed.
    fn installed_kinds(&self) -> BTreeSet<&'static str> {
        KINDS
            .into_iter()
            .map(kind_name)
            .filter(|k| {
                self.installed.keys().any(|f| {
                    f.strip_suffix(".ring.gz")
                        .is_some_and(|s| s == *k || s.starts_with(&format!("{k}-")))
                })
            })
            .collect()
    }

    /// Starts, restarts and stops processes as [`plan::plan`] says.
    async fn supervise(&mut self) {
        let wanted = plan::wanted(&self.installed_kinds());
        let sup = Arc::clone(&self.supervisor);
        let seen = blocking(move || sup.observe()).await.unwrap_or_default();
        let restart_at: BTreeMap<String, u64> = self
            .tracks
            .iter()
            .filter_map(|(n, t)| t.restart_at.map(|at| (n.clone(), at)))
            .collect();
        for step in plan::plan(&wanted, &seen, &restart_at, self.ms()) {
            match step {
                Step::Start(name) | Step::Restart(name) => self.start(&name).await,
                Step::Crashed(name) => {
                    let how = match seen.get(&name) {
                        Some(Seen::Exited(how)) => how.clone(),
                        _ => String::new(),
                    };
                    self.crashed(&name, how).await;
                }
                Step::Wait(..) => {}
                Step::Stop(name) => {
                    let sup = Arc::clone(&self.supervisor);
                    let n = name.clone();
                    if let Ok(Err(e)) = blocking(move || sup.stop(&n)).await {
                        tracing::warn!(process = %name, error = %e, "cannot stop");
                    }
                    self.tracks.remove(&name);
                }
            }
        }
    }

    async fn start(&mut self, name: &str) {
        let spec = process_spec(&self.config, name);
        let sup = Arc::clone(&self.supervisor);
        let result = blocking(move || sup.start(&spec)).await;
        let now = self.ms();
        let track = self.tracks.entry(name.to_owned()).or_default();
        match result {
            Ok(Ok(())) => {
                track.started = Some(Instant::now());
                track.restart_at = None;
            }
            Ok(Err(e)) => {
                let why = stratus_runtime::policy::chain(&e);
                tracing::warn!(process = name, error = %why, "cannot start");
                track.last_exit = Some(why);
                // Retried after the next delay, as a crash would be.
                let delay = next_delay(track, self.config.restart_delay);
                track.restart_at = Some(now + delay.as_millis() as u64);
            }
            Err(e) => tracing::warn!(process = name, error = %e, "cannot start"),
        }
    }

    async fn crashed(&mut self, name: &str, how: String) {
        let now = self.ms();
        let restart_delay = self.config.restart_delay;
        let track = self.tracks.entry(name.to_owned()).or_default();
        if track.started.is_some_and(|s| s.elapsed() >= STABLE) {
            track.backoff = None;
        }
        let delay = next_delay(track, restart_delay);
        track.restart_at = Some(now + delay.as_millis() as u64);
        track.restarts += 1;
        track.last_exit = Some(format!("exited ({how})"));
        let restarts = track.restarts;
        tracing::warn!(process = name, exit = %how, delay_ms = delay.as_millis() as u64, "exited; restarting");
        self.event(
            EventType::Warning,
            "ProcessExited",
            format!(
                "{name} exited ({how}); starting it again in {:.1} s (restart {restarts})",
                delay.as_secs_f64()
            ),
        )
        .await;
    }

    /// The ObjectNode's status now.
    async fn observe(&self, generation: Option<i64>, old: &ObjectNodeStatus) -> ObjectNodeStatus {
        let cfg = self.config.node.clone();
        let (devices, replication) = blocking(move || {
            let devices: Vec<_> = cfg
                .devices
                .iter()
                .map(|d| {
                    let probe = disk::probe(&cfg.devices_dir.join(d.as_str()));
                    plan::device_status(d.as_str(), &probe, cfg.mount_check)
                })
                .collect();
            let replication: Vec<_> = KINDS
                .into_iter()
                .filter_map(|k| {
                    let file = cfg.recon_dir().join(format!("{}.recon", kind_name(k)));
                    recon::parse(k, &std::fs::read_to_string(file).ok()?)
                })
                .collect();
            (devices, replication)
        })
        .await
        .unwrap_or_default();
        let sup = Arc::clone(&self.supervisor);
        let seen = blocking(move || sup.observe()).await.unwrap_or_default();
        let processes: Vec<_> = plan::wanted(&self.installed_kinds())
            .into_iter()
            .map(|name| {
                let track = self.tracks.get(&name);
                ObjectProcessStatus {
                    running: seen.get(&name) == Some(&Seen::Running),
                    restarts: track.map_or(0, |t| t.restarts),
                    message: track.and_then(|t| t.last_exit.clone()),
                    name,
                }
            })
            .collect();
        let rings = self
            .installed
            .iter()
            .map(|(file, (s, _))| InstalledRing {
                ring: s.ring.clone(),
                file: file.clone(),
                version: s.version,
            })
            .collect();
        let phase = plan::phase(&devices, &processes);
        let mut status = ObjectNodeStatus {
            phase,
            devices,
            processes,
            rings,
            replication,
            last_heartbeat_time: Some(now_time()),
            hash_fingerprint: Some(self.fingerprint.clone()),
            conditions: old.conditions.clone(),
            observed_generation: generation,
        };
        let (ready, reason, message) = match phase {
            ObjectNodePhase::Ready if self.ring_problems.is_empty() => {
                (true, "Serving", String::new())
            }
            ObjectNodePhase::Ready => (true, "Serving", self.ring_problems.join("; ")),
            _ => {
                let mut why: Vec<String> = status
                    .devices
                    .iter()
                    .filter_map(|d| {
                        d.message
                            .as_ref()
                            .map(|m| format!("device {}: {m}", d.name))
                    })
                    .collect();
                why.extend(
                    status
                        .processes
                        .iter()
                        .filter(|p| !p.running)
                        .map(|p| format!("{} is not running", p.name)),
                );
                why.extend(self.ring_problems.iter().cloned());
                (false, "Degraded", why.join("; "))
            }
        };
        set_condition(
            &mut status.conditions,
            "Ready",
            ready,
            reason,
            &message,
            generation,
            now_time(),
        );
        let hash = self.hash_message();
        let kind = ConditionType::HashMismatch.as_str();
        let (mismatch, reason) = match hash {
            Some(_) if self.foreign_version() => (true, Reason::HashFingerprintVersion.as_str()),
            Some(_) => (true, Reason::HashDiffers.as_str()),
            None => (false, Reason::HashesAgree.as_str()),
        };
        set_condition(
            &mut status.conditions,
            kind,
            mismatch,
            reason,
            hash.as_deref().unwrap_or_default(),
            generation,
            now_time(),
        );
        status
    }

    async fn report(&self) -> Result<(), kube::Error> {
        let node = self.register().await?;
        let old = node.status.clone().unwrap_or_default();
        if node.spec.ip != self.config.node.ip.to_string() {
            tracing::warn!(spec = %node.spec.ip, flag = %self.config.node.ip, "the ObjectNode names another address than the agent serves on");
        }
        let status = self.observe(node.metadata.generation, &old).await;
        self.status.write_status(&node, &status).await?;
        Ok(())
    }
}

/// The delays between the starts of a process that keeps exiting: `first`, doubling up to
/// `cap`, without end.
pub fn restart_delays((first, cap): (Duration, Duration)) -> ExponentialBackoff {
    ExponentialBuilder::default()
        .with_min_delay(first)
        .with_max_delay(cap)
        .with_factor(2.0)
        .without_max_times()
        .build()
}

/// The delay before `track`'s next start, from its backoff (a new one after a stable run).
fn next_delay(track: &mut Track, (first, cap): (Duration, Duration)) -> Duration {
    let backoff = track
        .backoff
        .get_or_insert_with(|| restart_delays((first, cap)));
    backoff.next().unwrap_or(cap)
}

/// Runs the node's object storage until the future is dropped (its processes stop with the
/// supervisor when the agent ends).
///
/// # Errors
/// The configuration cannot be written.
pub async fn run(
    client: Client,
    config: Config,
    supervisor: Arc<dyn Supervisor>,
) -> Result<(), ObjectError> {
    let node_config = config.node.clone();
    let fingerprint = blocking(move || prepare(&node_config)).await??;
    // Before any server listens, only the node itself and the proxies may reach them.
    let mut allowed = filter::peers(&[], config.node.ip, &config.proxies);
    let table = filter::render(&config.node, &allowed);
    blocking(move || filter::apply(&table)).await??;
    let (store, writer) = reflector::store::<ObjectRing>();
    let rings = reflector(
        writer,
        watcher(
            Api::<ObjectRing>::all(client.clone()),
            watcher::Config::default(),
        ),
    )
    .default_backoff()
    .touched_objects()
    .for_each(|_| async {});
    tokio::spawn(rings);
    let ready = Arc::new(std::sync::atomic::AtomicBool::new(false));
    {
        let (store, ready) = (store.clone(), Arc::clone(&ready));
        tokio::spawn(async move {
            stratus_runtime::store_ready(&store).await;
            ready.store(true, std::sync::atomic::Ordering::Release);
        });
    }
    let mut agent = Agent::new(client, config, supervisor, fingerprint);
    let mut tick = tokio::time::interval(agent.config.tick);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_report: Option<Instant> = None;
    loop {
        tick.tick().await;
        // Rings are installed only from a complete list, never from a cache still filling.
        if ready.load(std::sync::atomic::Ordering::Acquire) {
            let rings: Vec<ObjectRing> = store.state().iter().map(|r| (**r).clone()).collect();
            agent.install_rings(&rings).await;
            let peers = filter::peers(&rings, agent.config.node.ip, &agent.config.proxies);
            if peers != allowed {
                let table = filter::render(&agent.config.node, &peers);
                match blocking(move || filter::apply(&table)).await {
                    Ok(Ok(())) => allowed = peers,
                    Ok(Err(e)) => {
                        tracing::warn!(error = %stratus_runtime::policy::chain(&e), "cannot update the Swift servers' allow-list")
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot update the Swift servers' allow-list")
                    }
                }
            }
        }
        agent.supervise().await;
        if last_report.is_none_or(|t| t.elapsed() >= agent.config.heartbeat) {
            match agent.report().await {
                Ok(()) => last_report = Some(Instant::now()),
                Err(e) => {
                    tracing::warn!(error = %stratus_runtime::policy::chain(&e), "cannot report the node's status")
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::driver::fake::FakeSupervisor;

    /// An agent over `sup` whose API server cannot be reached (its Events are dropped).
    fn agent(sup: Arc<FakeSupervisor>) -> Agent {
        let url = "http://127.0.0.1:9".parse().expect("url");
        let client = Client::try_from(kube::Config::new(url)).expect("client");
        Agent::new(
            client,
            Config {
                node: crate::config::tests::config(),
                heartbeat: Duration::from_secs(10),
                tick: Duration::from_secs(1),
                python: "/usr/bin/python3".into(),
                bin_dir: "/usr/bin".into(),
                restart_delay: (Duration::from_secs(30), Duration::from_secs(300)),
                proxies: Vec::new(),
            },
            sup,
            "0123456789abcdef".into(),
        )
    }

    /// Moves the agent's clock `secs` on (its restarts are scheduled on it).
    fn later(a: &mut Agent, secs: u64) {
        a.epoch = a
            .epoch
            .checked_sub(Duration::from_secs(secs))
            .expect("an earlier instant");
    }

    fn count(starts: &[String], name: &str) -> usize {
        starts.iter().filter(|s| *s == name).count()
    }

    /// An object ring at version 1 whose nodes mostly report `fingerprint`.
    fn ring_of_hash(fingerprint: &str) -> ObjectRing {
        let mut r = crate::plan::tests::ring(
            "object",
            stratus_api_types::object::RingType::Object,
            None,
            Some(1),
        );
        if let Some(s) = r.status.as_mut() {
            s.hash_fingerprint = Some(fingerprint.into());
        }
        r
    }

    #[tokio::test]
    async fn a_node_of_another_cluster_hash_says_so_and_installs_none_of_the_rings() {
        let sup = Arc::new(FakeSupervisor::new());
        let mut a = agent(sup);
        a.install_rings(&[ring_of_hash("fedcba9876543210")]).await;
        assert!(
            a.installed.is_empty(),
            "a foreign hash's ring was installed"
        );
        // Not fetched either: the ring is not the node's problem but its hash is.
        assert!(a.ring_problems.is_empty(), "{:?}", a.ring_problems);
        let status = a.observe(Some(1), &ObjectNodeStatus::default()).await;
        assert_eq!(status.hash_fingerprint.as_deref(), Some("0123456789abcdef"));
        let c = ConditionType::HashMismatch
            .find(&status.conditions)
            .expect("HashMismatch");
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("True", "HashDiffers")
        );
        assert!(
            c.message.contains("0123456789abcdef")
                && c.message.contains("object (fedcba9876543210)"),
            "{}",
            c.message
        );

        // Given the cluster's hash (the ring's nodes' fingerprint is its own): the ring is
        // fetched again (here the API server cannot be reached) and the condition clears.
        a.install_rings(&[ring_of_hash("0123456789abcdef")]).await;
        assert!(a.foreign.is_empty());
        assert_eq!(a.ring_problems.len(), 1, "{:?}", a.ring_problems);
        let status = a.observe(Some(1), &status).await;
        assert!(!ConditionType::HashMismatch.is_true(&status.conditions));
    }

    #[tokio::test]
    async fn a_node_of_another_fingerprint_version_installs_none_of_the_rings() {
        let sup = Arc::new(FakeSupervisor::new());
        let mut a = agent(sup);
        // This node shows v1; its ring's nodes show v2 (a hash file with the cluster's salt).
        a.install_rings(&[ring_of_hash("v2:0123abcd:0123456789abcdef")])
            .await;
        assert!(
            a.installed.is_empty(),
            "a ring of another version was installed"
        );
        let status = a.observe(Some(1), &ObjectNodeStatus::default()).await;
        let c = ConditionType::HashMismatch
            .find(&status.conditions)
            .expect("HashMismatch");
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("True", "HashFingerprintVersion")
        );
    }

    #[tokio::test]
    async fn a_crashed_server_restarts_after_its_backoff_and_daemons_follow_their_ring() {
        let sup = Arc::new(FakeSupervisor::new());
        let mut a = agent(Arc::clone(&sup));
        a.supervise().await;
        assert_eq!(sup.observe().len(), 4, "the three servers and rsync");

        sup.crash("swift-object-server", "signal: 9 (SIGKILL)");
        a.supervise().await;
        // Not at once: after its delay.
        a.supervise().await;
        assert_eq!(count(&sup.starts(), "swift-object-server"), 1);
        later(&mut a, 31);
        a.supervise().await;
        assert_eq!(count(&sup.starts(), "swift-object-server"), 2);
        let t = &a.tracks["swift-object-server"];
        assert_eq!(t.restarts, 1);
        assert!(
            t.last_exit
                .as_deref()
                .is_some_and(|m| m.contains("SIGKILL"))
        );

        // The object ring installed: its daemons start; gone: they stop.
        let source = Source {
            ring: "object".into(),
            version_name: "object-v1".into(),
            version: 1,
        };
        a.installed
            .insert("object.ring.gz".into(), (source, b"ring".to_vec()));
        a.supervise().await;
        let running = sup.observe();
        assert!(running.contains_key("swift-object-replicator"));
        assert!(running.contains_key("swift-object-auditor"));
        assert!(!running.contains_key("swift-account-replicator"));
        a.installed.clear();
        a.supervise().await;
        assert_eq!(sup.observe().len(), 4);

        // A program that cannot start is tried again after its delay, not at every tick.
        sup.crash("swift-account-server", "exit status: 1");
        sup.fail_starts("swift-account-server");
        a.supervise().await;
        later(&mut a, 31);
        a.supervise().await;
        let retry = a.tracks["swift-account-server"].restart_at;
        a.supervise().await;
        a.supervise().await;
        assert!(!sup.observe().contains_key("swift-account-server"));
        // The next attempt is the backoff's second delay (60 s) away, and stays scheduled.
        assert!(retry.is_some_and(|at| at >= a.ms() + 50_000), "{retry:?}");
        assert_eq!(a.tracks["swift-account-server"].restart_at, retry);
    }
}
