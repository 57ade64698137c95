//! An etcd of a test's own (the `etcd` binary must be installed), its data and log in a
//! temporary directory, killed and removed when dropped; and the loopback ports it listens on.
//!
//! Ports come from [`TEST_PORTS`] less the kernel's ephemeral range
//! (`/proc/sys/net/ipv4/ip_local_port_range`), so that no connection another test makes is
//! given one of them. Each is bound before it is handed out (one in use is passed over) and
//! held until just before etcd starts; a process starts at a random place in the range and
//! moves on by one port per port it takes, so concurrent test binaries and the tests of one
//! binary rarely pick the same. When they do all the same, etcd exits on "address already in
//! use" and is started again on other ports; an etcd that answers is checked to be this one
//! (by its member name) before it is used.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use stratus_apiserver::storage::store::Store;

/// Where the tests' ports are taken from: below the kernel's usual ephemeral range
/// (32768-60999) and clear of the ports Stratus itself listens on.
const TEST_PORTS: std::ops::Range<u16> = 20000..30000;
/// How long an etcd may take to answer: generous, as tests share two cores.
const STARTUP: Duration = Duration::from_secs(40);
/// How many times etcd is started on new ports when its ports were taken meanwhile.
const ATTEMPTS: usize = 5;

/// The ports of [`TEST_PORTS`] outside the kernel's ephemeral range (all of them, should that
/// range cover them all: binding first and retrying still keep tests apart).
fn candidates() -> &'static [u16] {
    static PORTS: OnceLock<Vec<u16>> = OnceLock::new();
    PORTS.get_or_init(|| {
        let ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
            .ok()
            .and_then(|s| {
                let mut it = s.split_whitespace().map(|n| n.parse::<u16>().ok());
                Some((it.next()??, it.next()??))
            });
        let outside: Vec<u16> = TEST_PORTS
            .filter(|p| ephemeral.is_none_or(|(lo, hi)| *p < lo || *p > hi))
            .collect();
        if outside.is_empty() {
            TEST_PORTS.collect()
        } else {
            outside
        }
    })
}

/// A loopback port of [`candidates`] bound now, held by the listener answered with it.
pub fn reserve_port() -> (u16, TcpListener) {
    static NEXT: OnceLock<AtomicU32> = OnceLock::new();
    let next = NEXT.get_or_init(|| {
        // A random start (std's hasher keys are random per process) with the pid mixed in.
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u32(std::process::id());
        AtomicU32::new(h.finish() as u32)
    });
    let ports = candidates();
    for _ in 0..ports.len() {
        let port = ports[next.fetch_add(1, Ordering::Relaxed) as usize % ports.len()];
        if let Ok(l) = TcpListener::bind(("127.0.0.1", port)) {
            return (port, l);
        }
    }
    panic!("every port of {TEST_PORTS:?} outside the ephemeral range is in use");
}

/// A loopback port outside the ephemeral range on which nothing listens (bound and released).
pub fn free_port() -> u16 {
    reserve_port().0
}

/// A running etcd; killed, and its data removed, when dropped.
pub struct Etcd {
    child: Child,
    endpoint: String,
    dir: tempfile::TempDir,
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Etcd {
    /// Starts an etcd and connects to it, once it answers (within 40 s).
    pub async fn start() -> (Etcd, Store) {
        for attempt in 1..=ATTEMPTS {
            match Self::launch().await {
                Ok(started) => return started,
                Err(log) if attempt < ATTEMPTS && log.contains("address already in use") => {}
                Err(log) => panic!("etcd did not start:\n{log}"),
            }
        }
        unreachable!("the last attempt panics or returns")
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The temporary directory holding etcd's data (in `data`) and log (`etcd.log`), removed
    /// with it; other files of the test may go there too.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// One start: the etcd and its store, or etcd's log when it exited or did not answer.
    async fn launch() -> Result<(Etcd, Store), String> {
        static STARTED: AtomicU32 = AtomicU32::new(0);
        let dir = tempfile::tempdir().expect("temp dir");
        let name = format!(
            "test-{}-{}",
            std::process::id(),
            STARTED.fetch_add(1, Ordering::Relaxed)
        );
        let (client, client_held) = reserve_port();
        let (peer, peer_held) = reserve_port();
        let endpoint = format!("http://127.0.0.1:{client}");
        let peer = format!("http://127.0.0.1:{peer}");
        let log_path = dir.path().join("etcd.log");
        let log = std::fs::File::create(&log_path).expect("etcd's log");
        let mut cmd = Command::new("etcd");
        cmd.args(["--name", &name])
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .args(["--listen-client-urls", &endpoint])
            .args(["--advertise-client-urls", &endpoint])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("{name}={peer}")])
            .stdout(Stdio::null())
            .stderr(log);
        drop((client_held, peer_held));
        let child = cmd.spawn().expect("start etcd (is it installed?)");
        let mut etcd = Etcd {
            child,
            endpoint,
            dir,
        };
        let read_log = || std::fs::read_to_string(&log_path).unwrap_or_default();
        let started = Instant::now();
        while started.elapsed() < STARTUP {
            if let Ok(Some(status)) = etcd.child.try_wait() {
                return Err(format!("etcd exited ({status}):\n{}", read_log()));
            }
            if etcd.is_ours(&name).await
                && let Ok(s) = Store::connect(std::slice::from_ref(&etcd.endpoint)).await
                && s.revision().await.is_ok()
            {
                return Ok((etcd, s));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err(format!(
            "etcd did not answer within {STARTUP:?}:\n{}",
            read_log()
        ))
    }

    /// Whether the etcd answering on the endpoint is the member named `name` (and not
    /// another test's that took the port first).
    async fn is_ours(&self, name: &str) -> bool {
        let ask = async {
            let mut c = etcd_client::Client::connect([self.endpoint.as_str()], None).await?;
            c.member_list().await
        };
        tokio::time::timeout(Duration::from_secs(2), ask)
            .await
            .is_ok_and(|r| r.is_ok_and(|r| r.members().iter().any(|m| m.name() == name)))
    }
}
