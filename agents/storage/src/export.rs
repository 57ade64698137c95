//! A volume's data served over NBD to another node a Server of it is on: one `qemu-nbd` per
//! export (per VolumeExport object: one volume, one consuming node), bound to this node's
//! storage address on a port of its own, under a random name, and
//! an nftables table (`inet stratus_nbd_<address>`, one per storage address so that several agents on
//! one host keep their own) that lets only that node's address reach the port.
//!
//! # Ports
//! Export ports come from a range of their own ([`PortRange`], `--export-ports`, by default
//! 10809-10999: NBD's port and up), outside the kernel's ephemeral range, so no outgoing
//! connection of the host is ever given an export's port as its source port. A port is chosen
//! against the exports recorded and checked free by binding it on the storage address; the
//! table's rules match that address, so agents serving other addresses on one host use the
//! same ports without touching each other's connections.
//!
//! # Why this is enough, and what it is not
//! The NBD protocol lets a client list a server's exports, so the random name keeps no one out
//! by itself: the packet filter does. A port answers only the consuming node's address (its
//! Hypervisor's `status.hostIp`); any other address, another tenant's node included, has its
//! packets dropped before `qemu-nbd` sees them. `qemu-nbd` serves as many clients at a time
//! (`--shared`) as the volume has servers on the consuming node: one for a plain volume, so
//! once that node's QEMU is connected no second client is served even from an address that
//! got through. A multi-attach volume's export over TLS serves up to 16 clients from the
//! start (only the consuming node's certificate gets a session, and a server joining there
//! never makes the export again, which would cut the disks of the guests already using it);
//! in the clear, one per server of it there (`status.attachments[].node`): a new server there
//! makes the export again with one more (its guests' disks are cut while it restarts), one
//! leaving keeps it as it is until the export is made anew.
//!
//! # TLS
//! With the node's NBD certificates (`stratus agent --nbd-tls-dir`, issued by `stratus pki
//! nbd-node` from the cloud's NBD CA), `qemu-nbd` serves TLS alone, checks the client's
//! certificate against that CA (`verify-peer=on`) and serves only the client whose
//! certificate's DN is the attaching node's ([`nbd_node_dn`], an `authz-simple` object): another
//! node, even from the allowed address, reads nothing, and the data is encrypted on the
//! storage network. Without them (`--nbd-insecure`) the traffic crosses it in the clear.
//!
//! # Growth
//! An NBD export keeps the size `qemu-nbd` opened the volume with, and QEMU's NBD client the
//! size it connected with. A volume grown while exported is served anew at its size by a
//! second `qemu-nbd` on a port and under a name of its own ([`Exports::ensure`]; its record
//! `export-<VolumeExport name>@<port>.json`), which the VolumeExport's status then names, to
//! twice the clients (the consuming node's QEMU holds two connections to it for a moment while
//! it moves its disk there). The earlier export is served until no TCP connection to its port
//! is left ([`Exports::end_left`]): the guests moved, or are off (they connect to the new one
//! when they start).
//!
//! # Restart
//! Each export is recorded in `<state>/exports/export-<VolumeExport name>.json` before its
//! process is trusted; the `qemu-nbd` processes outlive the agent (a guest keeps its disk
//! while the agent restarts), and a restarted agent adopts those whose `/proc/<pid>/cmdline`
//! is still the recorded command, makes the others again on the same port and name (as the
//! VolumeExport's status says), and rewrites the table. A record of an agent that kept one
//! export per volume (`volume-<uid>.json`) is ended when it is found: the VolumeExport that
//! replaces it is served anew.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::io::Write;
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nftables::schema::Nftables;
use serde::{Deserialize, Serialize};
use stratus_api_types::storage::nbd_node_dn;
use stratus_runtime::allowlist::AllowList;

/// The table holding the exports' rules of the agent serving on `host`.
pub fn table_name(host: IpAddr) -> String {
    format!("stratus_nbd_{}", host.to_string().replace(['.', ':'], "_"))
}

pub use stratus_api_types::storage::PortRange;

/// The first port of `range` that no export in `used` holds and `free` finds free.
fn pick(range: PortRange, used: &BTreeSet<u16>, mut free: impl FnMut(u16) -> bool) -> Option<u16> {
    (range.first()..=range.last()).find(|p| !used.contains(p) && free(*p))
}

/// The kernel's ephemeral port range in this network namespace
/// (`net.ipv4.ip_local_port_range`), if it can be read.
pub fn ephemeral_ports() -> Option<(u16, u16)> {
    let s = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    let mut it = s.split_whitespace().map(|p| p.parse::<u16>().ok());
    Some((it.next()??, it.next()??))
}

/// How long a new `qemu-nbd` has to start listening.
const START: Duration = Duration::from_secs(10);
/// How much of a failed `qemu-nbd`'s log an error keeps.
const LOG_KEEP: usize = 2048;

/// Why an export could not be made or ended.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// The agent has no storage address to serve exports on.
    #[error(
        "this node has no storage address (stratus agent --storage-address) to export volumes on"
    )]
    NoAddress,
    /// A file of the export's state.
    #[error("{0}")]
    State(String),
    /// The node to export to has a name no certificate is issued for.
    #[error("cannot export to node {0:?}: not a node name")]
    Node(String),
    /// `qemu-nbd` could not be started, or stopped at once.
    #[error("qemu-nbd: {0}")]
    Serve(String),
    /// `nft` refused the table.
    #[error("nft: {0}")]
    Filter(String),
    /// The node's pool records no storage address yet (its heartbeat records the agent's).
    #[error("storage pool {0} records no storage address (status.storageAddress) yet")]
    Unrecorded(String),
    /// The node's pool records another storage address than the agent serves on.
    #[error(
        "storage pool {pool} records {recorded} as this node's storage address (status.storageAddress), and the agent serves on {serving}: an operator moves the recorded address, or the agent is started with --storage-address {recorded}"
    )]
    Moved {
        /// The pool.
        pool: String,
        /// What it records.
        recorded: String,
        /// What the agent serves on.
        serving: IpAddr,
    },
    /// Every port of the export range is held, by this node's exports or other programs.
    #[error(
        "no free export port on {host} in {range} (stratus agent --export-ports): {exports} of them serve this node's exports, the others are taken by other programs"
    )]
    NoPort {
        /// The storage address.
        host: IpAddr,
        /// The range.
        range: PortRange,
        /// How many exports of this node hold ports of it.
        exports: usize,
    },
}

/// Where an export is served, as its VolumeExport's status tells it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Served {
    /// The storage address.
    pub host: String,
    /// The port.
    pub port: u16,
    /// The export's name.
    pub name: String,
    /// Whether it is served over TLS.
    pub tls: bool,
}

/// One export, as recorded.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Record {
    /// The VolumeExport served (its name): the export's key. Empty in a record of an agent
    /// that kept one export per volume.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub export: String,
    /// The volume's uid.
    pub volume: String,
    /// Its data on this node.
    pub device: PathBuf,
    /// The node it is exported to.
    pub node: String,
    /// That node's address: the only one let through.
    pub peer: IpAddr,
    /// The address served on.
    pub host: IpAddr,
    /// The port served on.
    pub port: u16,
    /// The export's name.
    pub name: String,
    /// The `qemu-nbd` serving it.
    pub pid: u32,
    /// How many clients it serves at once: 1, or for a multi-attach volume one per server
    /// of the node (`--shared`).
    #[serde(default = "one_client", skip_serializing_if = "is_one_client")]
    pub clients: u16,
    /// The directory of this node's NBD certificates, when served over TLS to `node`'s
    /// certificate alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<PathBuf>,
    /// The volume's size when its `qemu-nbd` started, in bytes: what the export serves (an NBD
    /// export keeps the size it opened with). 0 in a record of an agent that did not record
    /// it: such an export is never grown.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub size: u64,
    /// Whether it is an export made for the volume grown (its port in its key, see
    /// [`Record::key`]): the VolumeExport's earlier exports are served until the consuming
    /// node's QEMU leaves them.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub grown: bool,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

fn one_client() -> u16 {
    1
}

fn is_one_client(n: &u16) -> bool {
    *n == 1
}

impl Record {
    /// The name of its files: the VolumeExport's name for its first export, with `@<port>`
    /// for one made as the volume grew (a VolumeExport's name has no `@`).
    pub fn key(&self) -> String {
        if self.grown {
            format!("{}@{}", self.export, self.port)
        } else {
            self.export.clone()
        }
    }

    /// What its VolumeExport's status says of it.
    pub fn status(&self) -> Served {
        Served {
            host: self.host.to_string(),
            port: self.port,
            name: self.name.clone(),
            tls: self.tls.is_some(),
        }
    }

    /// Whether this export serves what is asked: `device` to `node` at `peer`, with `tls`,
    /// to at least `clients` at once. One serving more clients than asked is kept: making it
    /// again to serve fewer would cut the disks of the guests connected.
    pub fn serves(
        &self,
        device: &Path,
        node: &str,
        peer: IpAddr,
        clients: u16,
        tls: Option<&Path>,
    ) -> bool {
        self.device == device
            && self.node == node
            && self.peer == peer
            && self.clients >= clients
            && self.tls.as_deref() == tls
    }

    /// The `qemu-nbd` command serving it: raw, `clients` at a time, until stopped.
    pub fn argv(&self, pid_file: &Path) -> Vec<OsString> {
        let mut a: Vec<OsString> = [
            "qemu-nbd".to_string(),
            "--persistent".into(),
            format!("--shared={}", self.clients.max(1)),
            "--format=raw".into(),
            format!("--bind={}", self.host),
            format!("--port={}", self.port),
            format!("--export-name={}", self.name),
        ]
        .into_iter()
        .map(OsString::from)
        .collect();
        if let Some(dir) = &self.tls {
            a.extend(tls_args(dir, &self.node));
        }
        let mut pid = OsString::from("--pid-file=");
        pid.push(pid_file);
        a.push(pid);
        a.push(self.device.clone().into_os_string());
        a
    }
}

/// `value` as a QEMU option value: a comma, which would end it and start another option, is
/// doubled.
fn qemu_opt(value: &std::ffi::OsStr) -> OsString {
    use std::os::unix::ffi::{OsStrExt, OsStringExt};
    let mut out = Vec::with_capacity(value.len());
    for &b in value.as_bytes() {
        out.push(b);
        if b == b',' {
            out.push(b',');
        }
    }
    OsString::from_vec(out)
}

/// The `qemu-nbd` arguments serving TLS alone with the certificates in `dir` (QEMU's names:
/// `ca-cert.pem`, `server-cert.pem`, `server-key.pem`), to a client whose certificate the CA
/// signed and whose DN is node `node`'s.
fn tls_args(dir: &Path, node: &str) -> Vec<OsString> {
    let mut creds = OsString::from("tls-creds-x509,id=nbd-tls,endpoint=server,verify-peer=on,dir=");
    creds.push(qemu_opt(dir.as_os_str()));
    let mut authz = OsString::from("authz-simple,id=nbd-authz,identity=");
    authz.push(qemu_opt(nbd_node_dn(node).as_ref()));
    vec![
        "--object".into(),
        creds,
        "--object".into(),
        authz,
        "--tls-creds=nbd-tls".into(),
        "--tls-authz=nbd-authz".into(),
    ]
}

/// Whether `node` is a node name (a DNS subdomain: lower-case letters, digits, `-`, `.`), as
/// every certificate of the NBD CA names one: nothing in it needs escaping in a DN or a QEMU
/// option.
fn is_node_name(node: &str) -> bool {
    !node.is_empty()
        && node.len() <= 253
        && node
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
}

/// Why `dir` cannot serve exports over TLS: a file `qemu-nbd` reads from it is missing.
///
/// # Errors
/// The first file missing.
pub fn check_tls_dir(dir: &Path) -> Result<(), String> {
    for f in ["ca-cert.pem", "server-cert.pem", "server-key.pem"] {
        let p = dir.join(f);
        if !p.is_file() {
            return Err(format!(
                "{}: missing (a node's NBD certificates are issued by stratus pki nbd-node)",
                p.display()
            ));
        }
    }
    Ok(())
}

/// Whether a process's `/proc/<pid>/cmdline` (NUL-separated) is `argv`.
pub fn same_command(cmdline: &[u8], argv: &[OsString]) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let got: Vec<&[u8]> = cmdline
        .strip_suffix(b"\0")
        .unwrap_or(cmdline)
        .split(|b| *b == 0)
        .collect();
    got.len() == argv.len() && got.iter().zip(argv).all(|(g, a)| *g == a.as_bytes())
}

/// The table letting each export's peer, and no other address, reach its port at the storage
/// address (the port on the node's other addresses is closed; another agent of this host
/// serving another address may use the same port).
pub fn render(table_name: &str, records: &[&Record]) -> Nftables<'static> {
    let mut table = AllowList::new(table_name);
    for r in records {
        let comment = format!("export-{}", r.export);
        table.guard(SocketAddr::new(r.host, r.port), [r.peer], Some(&comment));
    }
    table.ruleset()
}

/// An export this agent serves.
struct Live {
    record: Record,
    /// The process, when this agent started it (an adopted one is not its child).
    child: Option<Child>,
}

impl Live {
    /// Whether its `qemu-nbd` still runs as recorded.
    fn alive(&mut self, pid_file: &Path) -> bool {
        if let Some(c) = self.child.as_mut()
            && !matches!(c.try_wait(), Ok(None))
        {
            return false;
        }
        std::fs::read(format!("/proc/{}/cmdline", self.record.pid))
            .is_ok_and(|c| same_command(&c, &self.record.argv(pid_file)))
    }

    /// Stops its `qemu-nbd` (SIGTERM, then SIGKILL), waiting for it to go.
    fn stop(&mut self, pid_file: &Path) {
        if !self.alive(pid_file) {
            if let Some(c) = self.child.as_mut() {
                let _ = c.wait();
            }
            return;
        }
        let pid = rustix::process::Pid::from_raw(i32::try_from(self.record.pid).unwrap_or(0));
        for signal in [rustix::process::Signal::TERM, rustix::process::Signal::KILL] {
            if let Some(pid) = pid {
                let _ = rustix::process::kill_process(pid, signal);
            }
            let until = Instant::now() + Duration::from_secs(5);
            while Instant::now() < until {
                let gone = match self.child.as_mut() {
                    Some(c) => !matches!(c.try_wait(), Ok(None)),
                    None => !Path::new(&format!("/proc/{}", self.record.pid)).exists(),
                };
                if gone {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// Makes `dir` (the exports' records, pid files and logs: export names and ports) a
/// directory only its owner reads.
fn private_dir(dir: &Path) -> Result<(), ExportError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let fail = |e: std::io::Error| ExportError::State(format!("{}: {e}", dir.display()));
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(fail)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(fail)
}

/// Opens `path` anew (truncated) for writing, readable by its owner alone.
fn private_open(path: &Path) -> Result<std::fs::File, ExportError> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let fail = |e: std::io::Error| ExportError::State(format!("{}: {e}", path.display()));
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(fail)?;
    // A file left by an older run keeps its mode through `open`.
    file.set_permissions(std::fs::Permissions::from_mode(0o600))
        .map_err(fail)?;
    Ok(file)
}

/// Writes `bytes` to `path`, readable by its owner alone.
fn private_file(path: &Path, bytes: &[u8]) -> Result<(), ExportError> {
    private_open(path)?
        .write_all(bytes)
        .map_err(|e| ExportError::State(format!("{}: {e}", path.display())))
}

/// The exports of this node.
pub struct Exports {
    address: Option<IpAddr>,
    tls: Option<PathBuf>,
    ports: PortRange,
    dir: PathBuf,
    live: Mutex<BTreeMap<String, Live>>,
}

impl Exports {
    /// Exports served on `address` (none: volumes are not exported) on ports of `ports`, with
    /// their records in `dir`.
    pub fn new(address: Option<IpAddr>, ports: PortRange, dir: PathBuf) -> Self {
        Self {
            address,
            tls: None,
            ports,
            dir,
            live: Mutex::new(BTreeMap::new()),
        }
    }

    /// Whether exports are served over TLS.
    #[must_use]
    pub fn tls(&self) -> bool {
        self.tls.is_some()
    }

    /// Exports served over TLS with the certificates in `dir` (see [`check_tls_dir`]), each to
    /// its node's certificate alone; none: in the clear.
    #[must_use]
    pub fn with_tls(mut self, dir: Option<PathBuf>) -> Self {
        self.tls = dir;
        self
    }

    /// The address exports are served on.
    pub fn address(&self) -> Option<IpAddr> {
        self.address
    }

    fn path(&self, export: &str, ext: &str) -> PathBuf {
        self.dir.join(format!("export-{export}.{ext}"))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Live>> {
        self.live
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Takes back the exports a previous run recorded whose `qemu-nbd` still runs as recorded;
    /// forgets the others (their volumes' reconciles make them again). Writes the table.
    ///
    /// # Errors
    /// The records' directory or the table cannot be written.
    pub fn adopt(&self) -> Result<usize, ExportError> {
        private_dir(&self.dir)?;
        let entries = std::fs::read_dir(&self.dir)
            .map_err(|e| ExportError::State(format!("{}: {e}", self.dir.display())))?;
        let mut live = self.lock();
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().and_then(|e| e.to_str()) != Some("json") {
                continue;
            }
            let record = std::fs::read(&path)
                .ok()
                .and_then(|b| serde_json::from_slice::<Record>(&b).ok());
            let Some(record) = record else {
                let _ = std::fs::remove_file(&path);
                continue;
            };
            let key = record.key();
            if record.export.is_empty() || path != self.path(&key, "json") {
                // An export of an older agent (one per volume), or a file not of this name:
                // its process ends, its VolumeExport is served anew.
                let pid_file = path.with_extension("pid");
                let mut l = Live {
                    record,
                    child: None,
                };
                l.stop(&pid_file);
                for ext in ["json", "pid", "log"] {
                    let _ = std::fs::remove_file(path.with_extension(ext));
                }
                continue;
            }
            let pid_file = self.path(&key, "pid");
            let mut l = Live {
                record,
                child: None,
            };
            if l.alive(&pid_file) {
                tracing::info!(export = %l.record.export, pid = l.record.pid, "export adopted");
                live.insert(key, l);
            } else {
                let _ = std::fs::remove_file(&path);
            }
        }
        let n = live.len();
        self.write_table(&live)?;
        Ok(n)
    }

    /// The exports served, each as (VolumeExport name, volume uid).
    pub fn served(&self) -> Vec<(String, String)> {
        let served: BTreeSet<(String, String)> = self
            .lock()
            .values()
            .map(|l| (l.record.export.clone(), l.record.volume.clone()))
            .collect();
        served.into_iter().collect()
    }

    /// Whether export `export` runs.
    pub fn runs(&self, export: &str) -> bool {
        self.lock().values().any(|l| l.record.export == export)
    }

    /// Serves export `export` (a VolumeExport's name): `device` (the data of the volume of uid
    /// `volume`, `size` bytes) to `node` at `peer`, to `clients` of it at once (its servers
    /// there, for a multi-attach volume): the running export if it is that one at that size;
    /// beside it, a new one (twice the clients, so that a guest's QEMU can hold both while it
    /// moves to it) when the volume grew past the size it serves (an NBD export keeps the
    /// size it opened with; the earlier one is served until [`Exports::end_left`] finds it
    /// left); else a new one, on the port and under the name of `was` (what the
    /// VolumeExport's status recorded, after a restart) when it was on this address on a port
    /// of the range, else on the range's first port that no export holds and that binds,
    /// under a new random name. A newest export whose `qemu-nbd` died or serves otherwise is
    /// made again alone: an earlier one a client still holds (a guest not yet moved off it)
    /// is kept beside it for [`Exports::end_left`].
    ///
    /// # Errors
    /// No storage address, no free port in the range, a `qemu-nbd` that does not start, a
    /// table `nft` refuses.
    #[allow(clippy::too_many_arguments)]
    pub fn ensure(
        &self,
        export: &str,
        volume: &str,
        device: &Path,
        node: &str,
        peer: IpAddr,
        clients: u16,
        size: u64,
        was: Option<&Served>,
    ) -> Result<Served, ExportError> {
        let host = self.address.ok_or(ExportError::NoAddress)?;
        if !is_node_name(node) {
            return Err(ExportError::Node(node.to_owned()));
        }
        let mut live = self.lock();
        let keys = group(&live, export);
        let mut grown = false;
        if let Some(current) = keys.last() {
            let pid_file = self.path(current, "pid");
            if let Some(l) = live.get_mut(current)
                && l.record
                    .serves(device, node, peer, clients, self.tls.as_deref())
                && l.alive(&pid_file)
            {
                if l.record.size == 0 || size <= l.record.size {
                    return Ok(l.record.status());
                }
                grown = true;
            } else {
                // Only the newest is made again: an earlier one a guest still reads (it has
                // not moved off it yet) is kept, for `end_left` to end once left.
                if let Some(mut l) = live.remove(current) {
                    l.stop(&pid_file);
                }
                for key in &keys[..keys.len() - 1] {
                    let held = live
                        .get(key)
                        .is_some_and(|l| connected(l.record.host, l.record.port));
                    if held {
                        grown = true;
                    } else if let Some(mut l) = live.remove(key) {
                        l.stop(&self.path(key, "pid"));
                    }
                }
                self.write_table(&live)?;
            }
        }
        // The port and name recorded, when that export was on this address, its port is still
        // one of the range and no export kept holds it (an export made anew; one beside a
        // running one is new).
        let reuse = was.filter(|w| {
            w.host == host.to_string()
                && self.ports.contains(w.port)
                && !live.values().any(|l| l.record.port == w.port)
        });
        let (port, name) = match reuse {
            Some(w) => (w.port, w.name.clone()),
            None => {
                let used: BTreeSet<u16> = live.values().map(|l| l.record.port).collect();
                let port = pick(self.ports, &used, |p| TcpListener::bind((host, p)).is_ok())
                    .ok_or(ExportError::NoPort {
                        host,
                        range: self.ports,
                        exports: used.iter().filter(|p| self.ports.contains(**p)).count(),
                    })?;
                (port, uuid::Uuid::new_v4().simple().to_string())
            }
        };
        let mut record = Record {
            export: export.to_owned(),
            volume: volume.to_owned(),
            device: device.to_owned(),
            node: node.to_owned(),
            peer,
            host,
            port,
            name,
            pid: 0,
            clients: if grown {
                clients.saturating_mul(2)
            } else {
                clients
            },
            tls: self.tls.clone(),
            size,
            grown,
        };
        let key = record.key();
        let pid_file = self.path(&key, "pid");
        // The filter first: the port is never open to everyone, not even while it starts.
        let mut pending = Live {
            record: record.clone(),
            child: None,
        };
        live.insert(key.clone(), pending);
        self.write_table(&live)?;
        live.remove(&key);
        let child = match self.spawn(&record, &pid_file) {
            Ok(c) => c,
            Err(e) => {
                let _ = self.write_table(&live);
                return Err(e);
            }
        };
        record.pid = child.id();
        pending = Live {
            record,
            child: Some(child),
        };
        let state = self.path(&key, "json");
        let bytes = serde_json::to_vec(&pending.record).unwrap_or_default();
        if let Err(e) = private_file(&state, &bytes) {
            // Unrecorded, it would outlive a restart unknown: it ends, and its rule goes.
            pending.stop(&pid_file);
            let _ = self.write_table(&live);
            return Err(e);
        }
        let status = pending.record.status();
        tracing::info!(export, volume, node, %peer, port, size, grown, "volume exported");
        live.insert(key, pending);
        self.write_table(&live)?;
        Ok(status)
    }

    /// Ends the earlier exports of export `export` (those made before its volume grew) that
    /// no client holds any more (no TCP connection to their port is open or opening): the
    /// consuming node's QEMU moved to the one serving the volume's size, or its guest is off
    /// and connects to that one when it starts. How many are still held.
    ///
    /// # Errors
    /// The table cannot be written.
    pub fn end_left(&self, export: &str) -> Result<usize, ExportError> {
        let mut live = self.lock();
        let keys = group(&live, export);
        let Some((_, earlier)) = keys.split_last() else {
            return Ok(0);
        };
        let (mut held, mut ended) = (0, false);
        for key in earlier {
            let Some(l) = live.get(key) else { continue };
            if connected(l.record.host, l.record.port) {
                held += 1;
                continue;
            }
            if let Some(mut l) = live.remove(key) {
                l.stop(&self.path(key, "pid"));
                for ext in ["json", "pid", "log"] {
                    let _ = std::fs::remove_file(self.path(key, ext));
                }
                tracing::info!(
                    export,
                    port = l.record.port,
                    "earlier export ended: its client left it"
                );
                ended = true;
            }
        }
        if ended {
            self.write_table(&live)?;
        }
        Ok(held)
    }

    /// Starts `qemu-nbd` for `record` and waits for it to listen (its pid file is written once
    /// it does).
    fn spawn(&self, record: &Record, pid_file: &Path) -> Result<Child, ExportError> {
        let _ = std::fs::remove_file(pid_file);
        let log_path = self.path(&record.key(), "log");
        private_dir(&self.dir)?;
        let log = private_open(&log_path)?;
        let argv = record.argv(pid_file);
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            // Its own process group: a signal to the agent's group (a terminal's ^C) leaves
            // the guests' disks served.
            .process_group(0);
        let mut child = cmd
            .spawn()
            .map_err(|e| ExportError::Serve(format!("cannot start it: {e}")))?;
        let until = Instant::now() + START;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                let said = std::fs::read(&log_path).unwrap_or_default();
                let said = String::from_utf8_lossy(&said[said.len().saturating_sub(LOG_KEEP)..])
                    .trim()
                    .to_owned();
                return Err(ExportError::Serve(format!("{status}: {said}")));
            }
            if std::fs::metadata(pid_file).is_ok_and(|m| m.len() > 0) {
                return Ok(child);
            }
            if Instant::now() > until {
                let _ = child.kill();
                let _ = child.wait();
                return Err(ExportError::Serve(format!(
                    "not listening on {}:{} after {START:?}",
                    record.host, record.port
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Ends export `export` (every `qemu-nbd` of it), if it runs: its ports are closed before
    /// its records go.
    ///
    /// # Errors
    /// The table cannot be written.
    pub fn stop(&self, export: &str) -> Result<bool, ExportError> {
        let mut live = self.lock();
        let keys = group(&live, export);
        let mut volume = None;
        for key in &keys {
            let Some(mut l) = live.remove(key) else {
                continue;
            };
            l.stop(&self.path(key, "pid"));
            for ext in ["json", "pid", "log"] {
                let _ = std::fs::remove_file(self.path(key, ext));
            }
            volume = Some(l.record.volume);
        }
        let Some(volume) = volume else {
            return Ok(false);
        };
        self.write_table(&live)?;
        tracing::info!(export, %volume, "export ended");
        Ok(true)
    }

    /// Ends every export of the volume of uid `volume` (its data is going, or no longer
    /// served by this node).
    ///
    /// # Errors
    /// The table cannot be written.
    pub fn stop_volume(&self, volume: &str) -> Result<usize, ExportError> {
        let mut n = 0;
        for (export, v) in self.served() {
            if v == volume && self.stop(&export)? {
                n += 1;
            }
        }
        Ok(n)
    }

    /// Writes the table again (an operator's `nft flush ruleset` took it away).
    ///
    /// # Errors
    /// `nft` refused it.
    pub fn refresh(&self) -> Result<(), ExportError> {
        let live = self.lock();
        self.write_table(&live)
    }

    fn write_table(&self, live: &BTreeMap<String, Live>) -> Result<(), ExportError> {
        let records: Vec<&Record> = live.values().map(|l| &l.record).collect();
        let Some(host) = self.address.or_else(|| records.first().map(|r| r.host)) else {
            return Ok(());
        };
        install(&render(&table_name(host), &records))
    }
}

/// The keys of export `export`'s processes in `live`: its first, and those made as its volume
/// grew, by the size they serve (the one serving the volume's size last).
fn group(live: &BTreeMap<String, Live>, export: &str) -> Vec<String> {
    let mut keys: Vec<(u64, u16, &String)> = live
        .iter()
        .filter(|(_, l)| l.record.export == export)
        .map(|(k, l)| (l.record.size, u16::from(l.record.grown), k))
        .collect();
    keys.sort();
    keys.into_iter().map(|(_, _, k)| k.clone()).collect()
}

/// Whether a TCP connection to `host`:`port` is open or opening in this network namespace
/// (`/proc/net/tcp`, `/proc/net/tcp6`): an export's client still holds it. Unreadable tables
/// count as held (an export is never ended on a guess).
fn connected(host: IpAddr, port: u16) -> bool {
    let table = match host {
        IpAddr::V4(_) => "/proc/net/tcp",
        IpAddr::V6(_) => "/proc/net/tcp6",
    };
    match std::fs::read_to_string(table) {
        Ok(text) => holds(&text, host, port),
        Err(_) => true,
    }
}

/// Whether the kernel's TCP table `text` (the format of `/proc/net/tcp{,6}`) has a connection
/// established or being established (`01`, `03`) whose local end is `host`:`port`.
fn holds(text: &str, host: IpAddr, port: u16) -> bool {
    text.lines().skip(1).any(|line| {
        let mut fields = line.split_whitespace().skip(1);
        let (Some(local), Some(_remote), Some(state)) =
            (fields.next(), fields.next(), fields.next())
        else {
            return false;
        };
        matches!(state, "01" | "03") && local_end(local) == Some((host, port))
    })
}

/// A `/proc/net/tcp{,6}` address (`0100007F:2A3A`: the address's 32-bit words in this host's
/// byte order, in hex, then the port).
fn local_end(field: &str) -> Option<(IpAddr, u16)> {
    let (addr, port) = field.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let word = |i: usize| -> Option<[u8; 4]> {
        let hex = addr.get(i * 8..i * 8 + 8)?;
        Some(u32::from_str_radix(hex, 16).ok()?.to_ne_bytes())
    };
    let ip = match addr.len() {
        8 => IpAddr::from(word(0)?),
        32 => {
            let mut b = [0u8; 16];
            for i in 0..4 {
                b[i * 4..i * 4 + 4].copy_from_slice(&word(i)?);
            }
            IpAddr::from(b)
        }
        _ => return None,
    };
    Some((ip, port))
}

/// Writes `table` with `nft`.
fn install(table: &Nftables<'_>) -> Result<(), ExportError> {
    nftables::helper::apply_ruleset(table).map_err(|e| ExportError::Filter(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> Record {
        Record {
            export: "0f9e2c1a.node-b".into(),
            volume: "0f9e2c1a".into(),
            device: "/srv/pool/volume-0f9e2c1a.raw".into(),
            node: "node-b".into(),
            peer: "10.0.0.2".parse().expect("an address"),
            host: "10.0.0.1".parse().expect("an address"),
            port: 40123,
            name: "5b1f".into(),
            pid: 7,
            clients: 1,
            tls: None,
            size: 0,
            grown: false,
        }
    }

    #[test]
    fn a_multi_attach_export_serves_its_clients_and_reads_back_as_recorded() {
        let shared = Record {
            clients: 16,
            ..record()
        };
        let argv = shared.argv(Path::new("/p"));
        assert!(argv.iter().any(|a| a == "--shared=16"), "{argv:?}");
        let text = serde_json::to_string(&shared).expect("json");
        assert_eq!(serde_json::from_str::<Record>(&text).ok(), Some(shared));
        // A record of an older agent (no clients) is one client's.
        let text = serde_json::to_string(&record()).expect("json");
        assert!(!text.contains("clients"), "{text}");
        assert_eq!(
            serde_json::from_str::<Record>(&text)
                .map(|r| r.clients)
                .ok(),
            Some(1)
        );
    }

    #[test]
    fn an_export_is_made_again_only_for_more_clients() {
        let two = Record {
            clients: 2,
            ..record()
        };
        let (device, peer) = (two.device.clone(), two.peer);
        let asks = |clients: u16| two.serves(&device, "node-b", peer, clients, None);
        assert!(asks(2));
        assert!(asks(1), "a server there left: the others keep their disk");
        assert!(!asks(3), "a third server there: served anew to three");
        assert!(
            !two.serves(&device, "node-c", peer, 1, None),
            "another node"
        );
        assert!(
            !two.serves(&device, "node-b", peer, 1, Some(Path::new("/tls"))),
            "TLS asked"
        );
    }

    #[test]
    fn qemu_nbd_serves_one_client_raw_on_the_storage_address() {
        let argv = record().argv(Path::new("/state/volume-0f9e2c1a.pid"));
        let argv: Vec<&str> = argv.iter().filter_map(|a| a.to_str()).collect();
        assert_eq!(
            argv,
            [
                "qemu-nbd",
                "--persistent",
                "--shared=1",
                "--format=raw",
                "--bind=10.0.0.1",
                "--port=40123",
                "--export-name=5b1f",
                "--pid-file=/state/volume-0f9e2c1a.pid",
                "/srv/pool/volume-0f9e2c1a.raw",
            ]
        );
    }

    #[test]
    fn over_tls_qemu_nbd_serves_the_attaching_nodes_certificate_alone() {
        let mut r = record();
        r.tls = Some("/etc/stratus/nbd,x".into());
        let argv = r.argv(Path::new("/p"));
        let argv: Vec<&str> = argv.iter().filter_map(|a| a.to_str()).collect();
        assert_eq!(
            argv[7..13],
            [
                "--object",
                "tls-creds-x509,id=nbd-tls,endpoint=server,verify-peer=on,dir=/etc/stratus/nbd,,x",
                "--object",
                "authz-simple,id=nbd-authz,identity=CN=system:node:node-b",
                "--tls-creds=nbd-tls",
                "--tls-authz=nbd-authz",
            ]
        );
        assert_eq!(argv.last(), Some(&"/srv/pool/volume-0f9e2c1a.raw"));
        assert!(r.status().tls && !record().status().tls);
        // A name that could carry QEMU options never reaches one: refused, and escaped anyway.
        for bad in ["n1,identity=CN=x", "N1", "", "n 1", "a=b"] {
            assert!(!is_node_name(bad), "{bad:?}");
        }
        assert!(is_node_name("node-b.rack1"));
        r.node = "n,id=x".into();
        let argv = r.argv(Path::new("/p"));
        assert_eq!(
            argv[10].to_str(),
            Some("authz-simple,id=nbd-authz,identity=CN=system:node:n,,id=x")
        );
        // A record written before TLS reads back as in the clear.
        let old = r#"{"volume":"v","device":"/d","node":"n","peer":"10.0.0.2","host":"10.0.0.1","port":1,"name":"x","pid":1}"#;
        let old: Record = serde_json::from_str(old).expect("an older record");
        assert_eq!(old.tls, None);
    }

    #[test]
    fn a_tls_directory_without_the_servers_files_is_refused() {
        let tmp = tempfile::tempdir().expect("a directory");
        let e = check_tls_dir(tmp.path()).expect_err("empty");
        assert!(
            e.contains("ca-cert.pem") && e.contains("stratus pki nbd-node"),
            "{e}"
        );
        for f in ["ca-cert.pem", "server-cert.pem"] {
            std::fs::write(tmp.path().join(f), b"x").expect("written");
        }
        let e = check_tls_dir(tmp.path()).expect_err("no key");
        assert!(e.contains("server-key.pem"), "{e}");
        std::fs::write(tmp.path().join("server-key.pem"), b"x").expect("written");
        check_tls_dir(tmp.path()).expect("complete");
    }

    #[test]
    fn only_the_recorded_command_is_adopted() {
        let argv = record().argv(Path::new("/p"));
        let line = |a: &[&str]| a.join("\0").into_bytes();
        let mut ok: Vec<&str> = argv.iter().filter_map(|a| a.to_str()).collect();
        assert!(same_command(&line(&ok), &argv));
        assert!(same_command(&[line(&ok), b"\0".to_vec()].concat(), &argv));
        ok.pop();
        assert!(!same_command(&line(&ok), &argv), "another device");
        assert!(!same_command(b"sleep\x00100", &argv));
        assert!(!same_command(b"", &argv));
    }

    #[test]
    fn only_the_peer_reaches_an_export_port() {
        let mut v6 = record();
        v6.export = "second".into();
        v6.peer = "fd00::2".parse().expect("an address");
        v6.host = "fd00::1".parse().expect("an address");
        v6.port = 40124;
        let mut want = AllowList::new("t");
        want.guard(
            "10.0.0.1:40123".parse().expect("an address"),
            ["10.0.0.2".parse().expect("an address")],
            Some("export-0f9e2c1a.node-b"),
        )
        .guard(
            "[fd00::1]:40124".parse().expect("an address"),
            ["fd00::2".parse().expect("an address")],
            Some("export-second"),
        );
        assert_eq!(render("t", &[&record(), &v6]), want.ruleset());
    }

    #[test]
    fn records_and_logs_are_the_owners_alone() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().expect("a directory");
        let dir = tmp.path().join("exports");
        std::fs::create_dir(&dir).expect("made");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("opened");
        private_dir(&dir).expect("made private");
        let mode = |p: &Path| std::fs::metadata(p).expect("there").permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700, "an older open directory is closed");
        let file = dir.join("volume-u1.json");
        std::fs::write(&file, b"old").expect("written");
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).expect("opened");
        private_file(&file, b"{}").expect("written");
        assert_eq!(mode(&file), 0o600, "an older readable file is closed");
        assert_eq!(std::fs::read(&file).expect("read"), b"{}");
        let fresh = dir.join("volume-u2.log");
        private_open(&fresh).expect("made");
        assert_eq!(mode(&fresh), 0o600);
    }

    #[test]
    fn export_ports_are_a_range_of_their_own() {
        let r: PortRange = "10809-10999".parse().expect("a range");
        assert_eq!(r, PortRange::DEFAULT);
        assert_eq!(PortRange::default().to_string(), "10809-10999");
        assert!(r.contains(10809) && r.contains(10999));
        assert!(!r.contains(10808) && !r.contains(11000));
        for bad in [
            "10999-10809",
            "80-90",
            "10809",
            "a-b",
            "10809-70000",
            "-1-5",
        ] {
            assert!(bad.parse::<PortRange>().is_err(), "{bad:?} accepted");
        }
        // The kernel's ephemeral range is refused, in part or whole.
        assert_eq!(r.overlaps((32768, 60999)), None);
        let e = PortRange::new(32000, 33000)
            .expect("a range")
            .overlaps((32768, 60999))
            .expect("an overlap");
        assert!(
            e.contains("32000-33000") && e.contains("32768-60999"),
            "{e}"
        );
        assert!(r.overlaps((10999, 20000)).is_some());
        assert!(r.overlaps((1024, 10809)).is_some());
    }

    #[test]
    fn a_port_is_one_no_export_holds_and_that_binds() {
        let r = PortRange::new(5000, 5003).expect("a range");
        let used = BTreeSet::from([5000, 5002]);
        assert_eq!(pick(r, &used, |_| true), Some(5001));
        assert_eq!(pick(r, &used, |p| p != 5001), Some(5003), "5001 is taken");
        assert_eq!(pick(r, &used, |p| p == 5000), None, "held by an export");
        assert_eq!(pick(r, &BTreeSet::new(), |_| false), None);
        let mut asked = Vec::new();
        pick(r, &used, |p| {
            asked.push(p);
            false
        });
        assert_eq!(
            asked,
            [5001, 5003],
            "an export's port is never bound to check it"
        );
    }

    #[test]
    fn a_connection_holds_an_export_only_while_open_to_its_own_address_and_port() {
        // /proc/net/tcp as Linux writes it on this (little-endian) host: 10.0.0.1:10810
        // listening, one connection to it established, one closing, one to another address.
        let v4 = "  sl  local_address rem_address   st tx_queue rx_queue\n\
            0: 0100000A:2A3A 00000000:0000 0A 00000000:00000000\n\
            1: 0100000A:2A3A 0200000A:B1C2 01 00000000:00000000\n\
            2: 0100000A:2A3B 0200000A:B1C3 08 00000000:00000000\n\
            3: 0500000A:2A3C 0200000A:B1C4 01 00000000:00000000\n";
        let at = |a: &str, p: u16| holds(v4, a.parse().expect("an address"), p);
        if cfg!(target_endian = "little") {
            assert!(at("10.0.0.1", 10810), "an established connection");
            assert!(!at("10.0.0.1", 10811), "a client that left (CLOSE_WAIT)");
            assert!(!at("10.0.0.1", 10812), "that port on another address");
            assert!(at("10.0.0.5", 10812));
        }
        assert!(!at("10.0.0.1", 10813), "nothing there");
        assert_eq!(local_end("zz:1"), None);
        assert_eq!(local_end("0100000A"), None);
        assert_eq!(
            local_end("000000000000000000000000000000001:0050"),
            None,
            "33 digits are no address"
        );
        if cfg!(target_endian = "little") {
            assert_eq!(
                local_end("00000000000000000000000001000000:0050"),
                Some(("::1".parse().expect("an address"), 80))
            );
        }
    }

    #[test]
    fn a_grown_export_has_a_name_of_its_own_and_reads_back_as_recorded() {
        let first = Record {
            size: 1 << 30,
            ..record()
        };
        assert_eq!(first.key(), "0f9e2c1a.node-b");
        let grown = Record {
            size: 2 << 30,
            grown: true,
            port: 40124,
            clients: 2,
            ..record()
        };
        assert_eq!(grown.key(), "0f9e2c1a.node-b@40124");
        let text = serde_json::to_string(&grown).expect("json");
        assert_eq!(serde_json::from_str::<Record>(&text).ok(), Some(grown));
        // A record of an agent that did not record sizes is never grown.
        let text = serde_json::to_string(&record()).expect("json");
        assert!(!text.contains("size") && !text.contains("grown"), "{text}");
    }

    #[test]
    fn an_export_is_told_as_its_status() {
        let s = record().status();
        assert_eq!(
            (s.host.as_str(), s.port, s.name.as_str(), s.tls),
            ("10.0.0.1", 40123, "5b1f", false)
        );
    }
}

/// The table on the real host (root, `nft`): connections made to an export's port from any
/// address but its peer's are dropped, and this host's own outgoing connections whose source
/// port happens to be an export's port keep working (their replies are addressed to it).
#[cfg(test)]
mod host_tests {
    use std::io::Write;
    use std::net::{Ipv4Addr, SocketAddr, TcpListener};
    use std::time::Duration;

    use tokio::io::AsyncReadExt;

    use super::{Record, install, render};

    const HOST: Ipv4Addr = Ipv4Addr::LOCALHOST;
    const PEER: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
    const OTHER: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 3);

    /// Removes the test's table however the test ends.
    struct Table(String);

    impl Drop for Table {
        fn drop(&mut self) {
            let _ = std::process::Command::new("nft")
                .args(["delete", "table", "inet", &self.0])
                .status();
        }
    }

    fn export(volume: &str, port: u16) -> Record {
        Record {
            export: volume.into(),
            volume: volume.into(),
            device: "/dev/null".into(),
            node: "peer".into(),
            peer: PEER.into(),
            host: HOST.into(),
            port,
            name: volume.into(),
            pid: 0,
            clients: 1,
            tls: None,
            size: 0,
            grown: false,
        }
    }

    /// A socket of `from` bound before connecting, so its port is known first.
    fn bound(from: Ipv4Addr) -> tokio::net::TcpSocket {
        let s = tokio::net::TcpSocket::new_v4().expect("a socket");
        s.bind(SocketAddr::from((from, 0))).expect("bind");
        s
    }

    fn port(s: &tokio::net::TcpSocket) -> u16 {
        s.local_addr().expect("an address").port()
    }

    /// Connects `s` to `to` and reads the byte the server sends; `None` when nothing answered
    /// within the time (the packets were dropped).
    fn exchange(s: tokio::net::TcpSocket, to: &TcpListener) -> Option<u8> {
        let to = to.local_addr().expect("an address");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        rt.block_on(async {
            let limit = Duration::from_secs(3);
            let mut stream = tokio::time::timeout(limit, s.connect(to))
                .await
                .ok()?
                .ok()?;
            let mut b = [0u8];
            tokio::time::timeout(limit, stream.read_exact(&mut b))
                .await
                .ok()?
                .ok()?;
            Some(b[0])
        })
    }

    fn serve(l: &TcpListener) {
        let l = l.try_clone().expect("listener");
        std::thread::spawn(move || {
            for mut c in l.incoming().flatten() {
                let _ = c.write_all(b"!");
            }
        });
    }

    #[test]
    fn an_export_port_is_closed_to_all_but_its_peer_and_not_to_this_hosts_replies() {
        let table = Table(format!("stratus_nbd_test_{}", std::process::id()));
        let exported = TcpListener::bind((HOST, 0)).expect("the export's listener");
        let elsewhere = TcpListener::bind((HOST, 0)).expect("another server");
        serve(&exported);
        serve(&elsewhere);
        // A client of this host whose source port is also an export's port.
        let client = bound(HOST);
        let records = [
            export("a", exported.local_addr().expect("addr").port()),
            export("b", port(&client)),
        ];
        install(&render(&table.0, &records.iter().collect::<Vec<_>>())).expect("nft");

        assert_eq!(
            exchange(client, &elsewhere),
            Some(b'!'),
            "a reply to this host's own connection was dropped"
        );
        assert_eq!(
            exchange(bound(PEER), &exported),
            Some(b'!'),
            "the peer is kept out"
        );
        assert_eq!(
            exchange(bound(OTHER), &exported),
            None,
            "another address reached the export"
        );
    }

    /// Ends the test's exports, then removes their table, however the test ends.
    struct Served<'a>(&'a super::Exports, &'a [&'a str], String);

    impl Drop for Served<'_> {
        fn drop(&mut self) {
            for v in self.1 {
                let _ = self.0.stop(v);
            }
            drop(Table(std::mem::take(&mut self.2)));
        }
    }

    /// A test's directory with a 1 MiB volume in it, and the exports on `storage` with ports
    /// `first`-`last` (an address and ports of that test alone: the table drops
    /// connections to them only).
    fn exports_of(
        storage: Ipv4Addr,
        (first, last): (u16, u16),
    ) -> (tempfile::TempDir, std::path::PathBuf, super::Exports) {
        let dir = tempfile::tempdir().expect("a directory");
        let device = dir.path().join("volume.raw");
        std::fs::write(&device, vec![0u8; 1 << 20]).expect("a volume");
        let range = super::PortRange::new(first, last).expect("a range");
        let exports = super::Exports::new(Some(storage.into()), range, dir.path().join("exports"));
        (dir, device, exports)
    }

    #[test]
    fn exports_take_free_ports_of_their_range_and_say_when_none_is_left() {
        use super::ExportError;
        const STORAGE: Ipv4Addr = Ipv4Addr::new(127, 88, 15, 1);
        const NODE: Ipv4Addr = Ipv4Addr::new(127, 88, 15, 2);
        let (_dir, device, exports) = exports_of(STORAGE, (10901, 10902));
        let _served = Served(&exports, &["a", "b"], super::table_name(STORAGE.into()));
        // Another program holds the range's first port.
        let other = TcpListener::bind((STORAGE, 10901)).expect("the first port is free");
        let a = exports
            .ensure("a", "v", &device, "n2", NODE.into(), 1, 1 << 20, None)
            .expect("exported");
        assert_eq!((a.host.as_str(), a.port), ("127.88.15.1", 10902));
        let none = exports
            .ensure("b", "v", &device, "n3", NODE.into(), 1, 1 << 20, None)
            .expect_err("no port left");
        assert!(
            matches!(none, ExportError::NoPort { exports: 1, .. }),
            "{none:?}"
        );
        assert!(none.to_string().contains("10901-10902"), "{none}");
        drop(other);
        let b = exports
            .ensure("b", "v", &device, "n3", NODE.into(), 1, 1 << 20, None)
            .expect("exported once the port is freed");
        assert_eq!(b.port, 10901);
        // A recorded export outside the range is not made again on its old port.
        assert!(exports.stop("b").expect("ended"));
        let mut was = b.clone();
        was.port = 40000;
        let again = exports
            .ensure("b", "v", &device, "n3", NODE.into(), 1, 1 << 20, Some(&was))
            .expect("exported");
        assert_eq!(again.port, 10901);
        // One volume served to two nodes: two exports, each to its node, ended together.
        assert_eq!(
            exports.served(),
            [("a".to_string(), "v".to_string()), ("b".into(), "v".into())]
        );
        assert_eq!(exports.stop_volume("v").expect("ended"), 2);
        assert!(exports.served().is_empty());
    }

    #[test]
    fn a_grown_volume_gets_a_second_export_and_the_first_ends_once_left() {
        use super::Exports;
        use std::net::TcpStream;
        const STORAGE: Ipv4Addr = Ipv4Addr::new(127, 88, 16, 1);
        const NODE: Ipv4Addr = Ipv4Addr::new(127, 88, 16, 2);
        let (dir, device, exports) = exports_of(STORAGE, (10903, 10905));
        let range = super::PortRange::new(10903, 10905).expect("a range");
        let _served = Served(&exports, &["g"], super::table_name(STORAGE.into()));
        let first = exports
            .ensure("g", "v", &device, "n2", NODE.into(), 1, 1 << 20, None)
            .expect("exported");
        // The consuming node's QEMU holds it.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        let client: TcpStream = rt.block_on(async {
            let to = SocketAddr::from((STORAGE, first.port));
            tokio::time::timeout(Duration::from_secs(3), bound(NODE).connect(to))
                .await
                .expect("the peer reaches the export")
                .expect("connected")
                .into_std()
                .expect("a socket")
        });
        std::fs::OpenOptions::new()
            .write(true)
            .open(&device)
            .and_then(|f| f.set_len(2 << 20))
            .expect("grown");
        let grown = exports
            .ensure("g", "v", &device, "n2", NODE.into(), 1, 2 << 20, None)
            .expect("exported at its new size");
        assert_ne!(
            (grown.port, &grown.name),
            (first.port, &first.name),
            "a new export beside the first"
        );
        // Asked again at 2 MiB (as its status records it), by this agent or one started again.
        let at_2mib = |e: &Exports| {
            e.ensure(
                "g",
                "v",
                &device,
                "n2",
                NODE.into(),
                1,
                2 << 20,
                Some(&grown),
            )
            .expect("exported")
        };
        let again = at_2mib(&exports);
        assert_eq!(again, grown, "served as it is");
        assert_eq!(exports.end_left("g").expect("checked"), 1, "still held");
        // The grown export's qemu-nbd dies: it alone is served again; the first, which the
        // guest still reads, stays.
        let port = format!("--port={}", grown.port);
        let pids: Vec<String> = std::fs::read_dir(dir.path().join("exports"))
            .expect("the records")
            .flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "pid"))
            .filter_map(|e| std::fs::read_to_string(e.path()).ok())
            .map(|p| p.trim().to_owned())
            .filter(|p| {
                std::fs::read(format!("/proc/{p}/cmdline"))
                    .is_ok_and(|c| c.split(|b| *b == 0).any(|a| a == port.as_bytes()))
            })
            .collect();
        assert_eq!(pids.len(), 1, "one qemu-nbd serves the grown export");
        let killed = std::process::Command::new("kill")
            .args(["-KILL", &pids[0]])
            .status()
            .expect("kill");
        assert!(killed.success());
        let served_again = at_2mib(&exports);
        assert_eq!(served_again.port, grown.port, "on its port again");
        assert_eq!(
            exports.end_left("g").expect("checked"),
            1,
            "the first export is still served"
        );
        let records = || {
            std::fs::read_dir(dir.path().join("exports"))
                .expect("the records")
                .flatten()
                .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
                .count()
        };
        assert_eq!(records(), 2);
        // Adopted as they are by an agent started again.
        let restarted = Exports::new(Some(STORAGE.into()), range, dir.path().join("exports"));
        assert_eq!(restarted.adopt().expect("adopted"), 2);
        let kept = at_2mib(&restarted);
        assert_eq!(kept, grown, "the grown export is the one served");
        drop(client);
        let until = std::time::Instant::now() + Duration::from_secs(10);
        while exports.end_left("g").expect("checked") > 0 {
            assert!(
                std::time::Instant::now() < until,
                "the first export is never left"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        assert_eq!(records(), 1, "the first export's record is gone");
        assert!(exports.runs("g"));
        assert_eq!(exports.served(), [("g".to_string(), "v".to_string())]);
        assert!(exports.stop("g").expect("ended"));
        assert_eq!(records(), 0);
    }
}
