//! The audit log: one `audit.k8s.io/v1` Event per request, as JSON lines — who did what to
//! which object, when, and with what outcome. Logins are recorded with annotations saying
//! whose login it was and how it ended; no password or token is ever written. The file is
//! created mode 0600.

use std::io::Write;
use std::path::Path;

use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::policy::request::RequestInfo;

/// One finished request, as the audit log records it.
#[derive(Debug)]
pub struct Record<'a> {
    /// The request.
    pub info: &'a RequestInfo,
    /// Authenticated user; None when authentication failed.
    pub user: Option<&'a str>,
    /// The request URI (path and query).
    pub uri: &'a str,
    /// Client address.
    pub source: Option<std::net::IpAddr>,
    /// User-Agent.
    pub user_agent: &'a str,
    /// HTTP status code answered.
    pub code: u16,
    /// When the request arrived (RFC 3339, microseconds).
    pub received: &'a str,
    /// `annotations` of the event (a login's user and result).
    pub annotations: &'a [(&'a str, &'a str)],
}

impl Record<'_> {
    fn to_json(&self) -> Value {
        let mut ev = json!({
            "kind": "Event",
            "apiVersion": "audit.k8s.io/v1",
            "level": "Metadata",
            "auditID": uuid::Uuid::new_v4().to_string(),
            "stage": "ResponseComplete",
            "requestURI": self.uri,
            "verb": self.info.verb,
            "user": {"username": self.user.unwrap_or("system:anonymous")},
            "sourceIPs": self.source.map(|s| vec![s.to_string()]).unwrap_or_default(),
            "userAgent": self.user_agent,
            "responseStatus": {"metadata": {}, "code": self.code},
            "requestReceivedTimestamp": self.received,
            "stageTimestamp": crate::base::meta::now_micro(),
        });
        if let Some(group) = &self.info.group {
            let mut r = json!({"resource": self.info.resource, "apiGroup": group, "apiVersion": self.info.version});
            for (k, v) in [
                ("namespace", &self.info.namespace),
                ("name", &self.info.name),
                ("subresource", &self.info.subresource),
            ] {
                if !v.is_empty() {
                    r[k] = json!(v);
                }
            }
            ev["objectRef"] = r;
        }
        if !self.annotations.is_empty() {
            ev["annotations"] = self
                .annotations
                .iter()
                .map(|(k, v)| ((*k).to_string(), json!(v)))
                .collect::<serde_json::Map<_, _>>()
                .into();
        }
        ev
    }
}

/// Records waiting for the writer thread; past it, records are dropped (and counted) rather
/// than held in memory without bound or making requests wait for the disk.
const QUEUE: usize = 16 * 1024;

/// A handle that appends records to the log from a background thread.
#[derive(Debug, Clone)]
pub struct AuditLog {
    tx: mpsc::Sender<Vec<u8>>,
    dropped: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl AuditLog {
    /// Opens (appends to) the log file.
    ///
    /// # Errors
    /// When the file cannot be opened.
    pub fn open(path: &Path) -> std::io::Result<Self> {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)?;
        // A log made before (or by another program) may be readable by others: not any more.
        file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        let (tx, mut rx) = mpsc::channel::<Vec<u8>>(QUEUE);
        std::thread::Builder::new()
            .name("audit".into())
            .spawn(move || {
                let mut out = std::io::BufWriter::new(file);
                while let Some(line) = rx.blocking_recv() {
                    let mut ok = out.write_all(&line).is_ok();
                    // Write out every record that is already queued, then flush once.
                    while let Ok(more) = rx.try_recv() {
                        ok &= out.write_all(&more).is_ok();
                    }
                    if !(ok && out.flush().is_ok()) {
                        tracing::error!("cannot write the audit log");
                    }
                }
            })?;
        Ok(Self {
            tx,
            dropped: std::sync::Arc::default(),
        })
    }

    /// Records a finished request; when the writer is that far behind, the record is dropped
    /// and counted.
    pub fn record(&self, r: &Record<'_>) {
        use std::sync::atomic::Ordering;
        let mut line = r.to_json().to_string().into_bytes();
        line.push(b'\n');
        if self.tx.try_send(line).is_err() {
            let n = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            if n.is_power_of_two() {
                tracing::error!(dropped = n, "the audit log is behind; records were dropped");
            }
        }
    }
}
