//! An etcd of a test's own (the `etcd` binary must be installed), its data and log in a
//! temporary directory, killed and removed when dropped.
//!
//! Its ports come from `stratus-test-ports` (outside the kernel's ephemeral range), held until
//! just before etcd starts. Should another test take one all the same, etcd exits on "address
//! already in use" and is started again on other ports; an etcd that answers is checked to be
//! this one (by its member name) before it is used.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use stratus_apiserver::storage::store::Store;
/// A loopback port on which nothing listens (for a server that should not be there).
#[allow(unused_imports)]
pub use stratus_test_ports::free_port;
use stratus_test_ports::reserve_port;

/// How long an etcd may take to answer: generous, as tests share two cores.
const STARTUP: Duration = Duration::from_secs(40);
/// How many times etcd is started on new ports when its ports were taken meanwhile.
const ATTEMPTS: usize = 5;

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
