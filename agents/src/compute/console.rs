//! The guests' serial console logs as the API serves them (`servers/NAME/console`): every few
//! seconds, the last [`MAX_BYTES`] of the log of each Server placed on this node is sent
//! when it changed, paced per Server ([`Pace`]: a few sends at once, then one a minute), so a
//! guest that never stops printing costs etcd one write a minute, not one every tick. The file read is the one this agent gives the guest
//! (`STATE_DIR/servers/UID/console.log`), never a path read from the API.

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kube::runtime::reflector::Store;
use kube::{Client, ResourceExt};
use stratus_api_types::compute::Server;

/// The most console bytes sent per Server (the API keeps no more).
pub const MAX_BYTES: u64 = 64 * 1024;
/// How often the logs are looked at.
const EVERY: Duration = Duration::from_secs(5);
/// The sends one Server's log may make at once (a boot's output reaches the API as it comes).
const BURST: f64 = 6.0;
/// How often one Server's log may be sent once its burst is spent.
const SUSTAINED: Duration = Duration::from_secs(60);

/// A token bucket per Server: [`BURST`] sends at once, refilled by one every [`SUSTAINED`].
#[derive(Debug, Default)]
pub struct Pace {
    buckets: HashMap<String, (f64, Instant)>,
}

impl Pace {
    /// Takes one send of the log of the server `uid` at `now`; false when it must wait.
    pub fn take(&mut self, uid: &str, now: Instant) -> bool {
        let (tokens, at) = self.buckets.entry(uid.to_owned()).or_insert((BURST, now));
        let refilled = (*tokens
            + now.saturating_duration_since(*at).as_secs_f64() / SUSTAINED.as_secs_f64())
        .min(BURST);
        *at = now;
        *tokens = refilled;
        if refilled < 1.0 {
            return false;
        }
        *tokens -= 1.0;
        true
    }

    /// Forgets the servers `keep` does not keep.
    pub fn retain(&mut self, keep: impl Fn(&str) -> bool) {
        self.buckets.retain(|uid, _| keep(uid));
    }
}

/// A digest of a log, to know whether it changed without keeping it.
fn digest(data: &[u8]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    data.hash(&mut h);
    h.finish()
}

/// The last `max` bytes of the file at `path` (all of it when shorter); `None` when there is
/// no such file. Reads at most `max` bytes whatever the file's size.
///
/// # Errors
/// The file exists but cannot be read.
pub fn tail(path: &Path, max: u64) -> std::io::Result<Option<Vec<u8>>> {
    let mut f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let len = f.metadata()?.len();
    f.seek(SeekFrom::Start(len.saturating_sub(max)))?;
    let mut out = Vec::new();
    f.take(max).read_to_end(&mut out)?;
    Ok(Some(out))
}

/// A console to send: where the Server is in the API, and its log file on this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Log {
    /// The Server's uid (the log's directory).
    pub uid: String,
    /// Its project.
    pub namespace: String,
    /// Its name.
    pub name: String,
    /// Its log file.
    pub path: PathBuf,
}

/// The consoles of `servers` placed on `node`, their files under `state_dir` as the agent
/// lays them out; a Server whose uid is not a plain name (it names the directory) is left out.
pub fn logs(servers: &[std::sync::Arc<Server>], node: &str, state_dir: &Path) -> Vec<Log> {
    servers
        .iter()
        .filter(|s| {
            s.status.as_ref().and_then(|st| st.hypervisor.as_deref()) == Some(node)
                && s.metadata.deletion_timestamp.is_none()
        })
        .filter_map(|s| {
            let uid = s.uid()?;
            let plain = !uid.is_empty()
                && uid.len() <= 64
                && uid.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
            plain.then(|| Log {
                path: state_dir.join("servers").join(&uid).join("console.log"),
                namespace: s.namespace().unwrap_or_default(),
                name: s.name_any(),
                uid,
            })
        })
        .collect()
}

/// Sends the consoles of the servers placed on `node` until dropped.
pub async fn run(client: Client, servers: Store<Server>, node: String, state_dir: PathBuf) {
    // A digest of what was last sent, by uid: a log is sent again only once it changed.
    let mut sent: HashMap<String, u64> = HashMap::new();
    let mut pace = Pace::default();
    let mut tick = tokio::time::interval(EVERY);
    loop {
        tick.tick().await;
        let logs = logs(&servers.state(), &node, &state_dir);
        sent.retain(|uid, _| logs.iter().any(|l| &l.uid == uid));
        pace.retain(|uid| logs.iter().any(|l| l.uid == uid));
        for log in logs {
            let path = log.path.clone();
            let data = match tokio::task::spawn_blocking(move || tail(&path, MAX_BYTES)).await {
                Ok(Ok(Some(data))) => data,
                Ok(Ok(None)) => continue,
                Ok(Err(e)) => {
                    tracing::debug!(server = %log.name, error = %e, "cannot read the console log");
                    continue;
                }
                Err(e) => {
                    tracing::debug!(error = %e, "console read task failed");
                    continue;
                }
            };
            let changed = digest(&data);
            if sent.get(&log.uid) == Some(&changed) || !pace.take(&log.uid, Instant::now()) {
                continue;
            }
            // A PUT of the raw bytes to `servers/NAME/console` (the API reads them as they are).
            let request = kube::core::Request::new(format!(
                "/apis/compute.stratus.dev/v1/namespaces/{}/servers",
                log.namespace
            ))
            .replace(
                &format!("{}/console", log.name),
                &kube::api::PostParams::default(),
                data.clone(),
            );
            match request {
                Ok(r) => match client.request_text(r).await {
                    Ok(_) => {
                        sent.insert(log.uid, changed);
                    }
                    // A conflict (the server changed meanwhile) or an API down: the next tick
                    // sends it again.
                    Err(e) => {
                        tracing::debug!(server = %log.name, error = %e, "cannot send the console log");
                    }
                },
                Err(e) => tracing::debug!(error = %e, "console request"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn a_log_that_keeps_changing_is_sent_a_few_times_then_once_a_minute() {
        let mut pace = Pace::default();
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        // A boot's output: every 5 s tick for the first half minute, six go at once.
        let sent = (0..6).filter(|i| pace.take("a", at(i * 5))).count();
        assert_eq!(sent, 6);
        // Then one a minute, however often it changes.
        let sent = (6..30).filter(|i| pace.take("a", at(i * 5))).count();
        assert_eq!(sent, 2, "two minutes of ticks after the burst");
        // Another server has its own; a quiet hour refills the burst and no more.
        assert!(pace.take("b", at(150)));
        assert_eq!((0..10).filter(|_| pace.take("a", at(3750))).count(), 6);
        pace.retain(|uid| uid == "b");
        assert!(pace.take("a", at(3750)), "a forgotten server starts afresh");
    }

    #[test]
    fn the_tail_is_bounded_and_a_missing_log_is_none() {
        let dir = tempfile::tempdir().expect("a directory");
        let path = dir.path().join("console.log");
        assert_eq!(tail(&path, 8).expect("read"), None);
        std::fs::write(&path, b"boot\n").expect("write");
        assert_eq!(tail(&path, 8).expect("read"), Some(b"boot\n".to_vec()));
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .expect("open");
        f.write_all(b"login: ").expect("append");
        assert_eq!(tail(&path, 8).expect("read"), Some(b"\nlogin: ".to_vec()));
    }

    fn server(name: &str, uid: &str, node: Option<&str>) -> std::sync::Arc<Server> {
        let mut s: Server = serde_json::from_value(serde_json::json!({
            "apiVersion": "compute.stratus.dev/v1", "kind": "Server",
            "metadata": {"name": name, "namespace": "demo", "uid": uid},
            "spec": {"flavor": "small", "image": "cirros"},
        }))
        .expect("a server");
        if let Some(n) = node {
            s.status = Some(
                serde_json::from_value(serde_json::json!({"hypervisor": n})).expect("a status"),
            );
        }
        std::sync::Arc::new(s)
    }

    #[test]
    fn only_this_nodes_servers_with_plain_uids_are_read_from_the_agents_own_files() {
        let servers = [
            server("web-1", "0b1c-22", Some("n1")),
            server("web-2", "0b1c-23", Some("n2")),
            server("web-3", "0b1c-24", None),
            server("evil", "../../etc", Some("n1")),
        ];
        let logs = logs(&servers, "n1", Path::new("/state"));
        assert_eq!(
            logs,
            vec![Log {
                uid: "0b1c-22".into(),
                namespace: "demo".into(),
                name: "web-1".into(),
                path: PathBuf::from("/state/servers/0b1c-22/console.log"),
            }]
        );
    }
}
