//! Open vSwitch's daemons and command-line tools for one node: [`OvsDaemon`] starts
//! `ovsdb-server` and `ovs-vswitchd` inside the node's network namespace with a database,
//! sockets, pid files and logs of their own in one directory (so several simulated nodes
//! share a host), adopts the ones a previous agent left running, and stops them; [`Ovs`]
//! runs `ovs-vsctl` and `ovs-ofctl` against one such switch (or the system's) as argument
//! vectors, and speaks JSON-RPC on its sockets for what the agent does on every converge
//! (reading the database, writing the firewall's keys, `ovs-appctl`'s commands), so that
//! those cost no process each.
//!
//! Bridges are made with the userspace `netdev` datapath, which needs no kernel module.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::names::Netns;
use super::netns;

/// The database schema Debian's `openvswitch-common` installs.
pub const SCHEMA: &str = "/usr/share/openvswitch/vswitch.ovsschema";

/// The system switch's run directory (its database socket and bridges' management sockets).
pub const SYSTEM_RUNDIR: &str = "/var/run/openvswitch";

/// How long one `ovs-vsctl` call may wait for the database and `ovs-vswitchd`.
const VSCTL_TIMEOUT_SECS: u32 = 30;

/// The switch setting that makes the userspace datapath take checksums left to a NIC
/// (virtio-net's offload, through a tap or veth) as good.
const USERSPACE_TSO: &str = "other_config:userspace-tso-enable=true";

/// How long [`OvsDaemon::stop`] waits for a daemon to exit before it is killed.
const STOP_WAIT: Duration = Duration::from_secs(10);

/// A failed Open vSwitch command or daemon.
#[derive(Debug, thiserror::Error)]
pub enum OvsError {
    /// A program could not be run, or a file of the switch not be read or written.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A program ran and failed.
    #[error("{what}: {stderr}")]
    Command {
        /// What was being done.
        what: String,
        /// What it said.
        stderr: String,
    },
    /// A program's output was not what it documents.
    #[error("unexpected output of {what}: {detail}")]
    Parse {
        /// Which command.
        what: String,
        /// What was wrong.
        detail: String,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> OvsError {
    let what = what.into();
    move |source| OvsError::Io { what, source }
}

/// Runs `cmd` (feeding it `stdin`) and returns its standard output.
fn run(mut cmd: Command, what: &str, stdin: Option<&str>) -> Result<String, OvsError> {
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(io(format!("run {what}")))?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes())
            .map_err(io(format!("write to {what}")))?;
    }
    let out = child
        .wait_with_output()
        .map_err(io(format!("wait for {what}")))?;
    if !out.status.success() {
        return Err(OvsError::Command {
            what: what.to_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    String::from_utf8(out.stdout).map_err(|e| OvsError::Parse {
        what: what.to_owned(),
        detail: e.to_string(),
    })
}

/// How long one command on a daemon's control socket may take.
const UNIXCTL_TIMEOUT: Duration = Duration::from_secs(30);

/// One JSON-RPC request `method` with `params` on the unix socket `path` (a daemon's control
/// socket, or the database's), as OVS's own tools send it: the reply's `result`, or its
/// `error` as `Command` (what the tools say on failure).
///
/// # Errors
/// The socket could not be reached or did not answer within [`UNIXCTL_TIMEOUT`], the
/// daemon said the request failed (`Command`), or its reply was not JSON-RPC.
fn json_rpc(
    path: &Path,
    method: &str,
    params: serde_json::Value,
) -> Result<serde_json::Value, OvsError> {
    use std::os::unix::net::UnixStream;
    let what = format!("{method} on {}", path.display());
    let json_err = |doing: &str| {
        let f = io(format!("{doing} {what}"));
        move |e: serde_json::Error| f(std::io::Error::from(e))
    };
    let mut stream = UnixStream::connect(path).map_err(io(format!("connect for {what}")))?;
    stream
        .set_read_timeout(Some(UNIXCTL_TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(UNIXCTL_TIMEOUT)))
        .map_err(io(format!("time out {what}")))?;
    let request = serde_json::json!({"method": method, "params": params, "id": 0});
    serde_json::to_writer(&mut stream, &request).map_err(json_err("send"))?;
    let mut reply: serde_json::Value =
        serde_json::Deserializer::from_reader(std::io::BufReader::new(&stream))
            .into_iter()
            .next()
            .unwrap_or_else(|| {
                Err(serde_json::Error::io(
                    std::io::ErrorKind::UnexpectedEof.into(),
                ))
            })
            .map_err(json_err("read the reply to"))?;
    match reply.get("error") {
        Some(e) if !e.is_null() => Err(OvsError::Command {
            what,
            stderr: e
                .as_str()
                .map_or_else(|| e.to_string(), str::to_owned)
                .trim()
                .to_owned(),
        }),
        _ => match reply.get_mut("result") {
            Some(r) => Ok(r.take()),
            None => Err(OvsError::Parse {
                what,
                detail: format!("not a JSON-RPC reply: {reply}"),
            }),
        },
    }
}

/// Command `method` with `params` on the control socket `ctl` of an OVS daemon, as
/// `ovs-appctl` sends it: what `ovs-appctl` prints, or on failure (`Command`) what it says.
///
/// # Errors
/// See [`json_rpc`]; a result that is not text is `Parse`.
pub fn unixctl(ctl: &Path, method: &str, params: &[&str]) -> Result<String, OvsError> {
    match json_rpc(ctl, method, serde_json::json!(params))? {
        serde_json::Value::String(r) => Ok(r),
        other => Err(OvsError::Parse {
            what: format!("{method} on {}", ctl.display()),
            detail: format!("a result that is not text: {other}"),
        }),
    }
}

/// The command-line tools of one switch: its database socket and the directory holding its
/// bridges' management sockets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ovs {
    rundir: PathBuf,
}

impl Ovs {
    /// The switch whose sockets are in `rundir` (`db.sock`, `<bridge>.mgmt`).
    pub fn new(rundir: impl Into<PathBuf>) -> Self {
        Self {
            rundir: rundir.into(),
        }
    }

    /// The system's switch (started by the `openvswitch-switch` service).
    pub fn system() -> Self {
        Self::new(SYSTEM_RUNDIR)
    }

    /// Its run directory.
    pub fn rundir(&self) -> &Path {
        &self.rundir
    }

    /// The operations `ops` (OVSDB's `select`, `mutate`, …) on its `Open_vSwitch` database
    /// in one transaction over the database's socket, as `ovs-vsctl --no-wait` makes them
    /// (no process per call): each operation's result, in order.
    ///
    /// # Errors
    /// The database could not be reached, refused the transaction (`Command`, with its
    /// error and details), or answered what is not a transaction's result.
    pub fn transact(
        &self,
        ops: Vec<serde_json::Value>,
    ) -> Result<Vec<serde_json::Value>, OvsError> {
        let sock = self.rundir.join("db.sock");
        let n = ops.len();
        let mut params = vec![serde_json::json!("Open_vSwitch")];
        params.extend(ops);
        let what = format!("transact on {}", sock.display());
        let results = match json_rpc(&sock, "transact", serde_json::Value::Array(params))? {
            serde_json::Value::Array(r) => r,
            other => {
                return Err(OvsError::Parse {
                    what,
                    detail: format!("not a transaction's result: {other}"),
                });
            }
        };
        // A failed operation is an object with `error` among the results (and the ones
        // after it are left out or null); the transaction then changed nothing.
        if let Some(e) = results.iter().find_map(|r| r.get("error")) {
            let details = results
                .iter()
                .find_map(|r| r.get("details").and_then(serde_json::Value::as_str))
                .unwrap_or_default();
            return Err(OvsError::Command {
                what,
                stderr: format!("{}: {details}", e.as_str().unwrap_or_default()),
            });
        }
        if results.len() < n {
            return Err(OvsError::Parse {
                what,
                detail: format!("{} results for {n} operations", results.len()),
            });
        }
        Ok(results)
    }

    /// Whether its database answers.
    pub fn answers(&self) -> bool {
        self.rundir.join("db.sock").exists() && self.vsctl_no_wait(&["show"]).is_ok()
    }

    fn vsctl_command(&self, wait: bool) -> Command {
        let mut c = Command::new("ovs-vsctl");
        c.arg(format!(
            "--db=unix:{}",
            self.rundir.join("db.sock").display()
        ))
        .arg(format!("--timeout={VSCTL_TIMEOUT_SECS}"))
        .env("OVS_RUNDIR", &self.rundir);
        if !wait {
            c.arg("--no-wait");
        }
        c
    }

    /// `ovs-vsctl ARGS`, waiting until `ovs-vswitchd` has applied the change.
    ///
    /// # Errors
    /// It could not run, or failed.
    pub fn vsctl(&self, args: &[&str]) -> Result<String, OvsError> {
        let mut c = self.vsctl_command(true);
        c.args(args);
        run(c, "ovs-vsctl", None)
    }

    /// `ovs-vsctl --no-wait ARGS`: a database change only.
    ///
    /// # Errors
    /// It could not run, or failed.
    pub fn vsctl_no_wait(&self, args: &[&str]) -> Result<String, OvsError> {
        let mut c = self.vsctl_command(false);
        c.args(args);
        run(c, "ovs-vsctl", None)
    }

    /// What `ovs-appctl -t <ovs-vswitchd's control socket> ARGS` prints. A switch of
    /// Stratus's own ([`OvsDaemon`]) has its socket in the run directory and is asked on it
    /// directly ([`unixctl`]: no process per call, which the agent's forgetting of
    /// connections makes one per connection); the system's, whose socket its pid file
    /// names, through `ovs-appctl`.
    ///
    /// # Errors
    /// It could not run, or failed.
    pub fn appctl(&self, args: &[&str]) -> Result<String, OvsError> {
        let ctl = self.rundir.join("ovs-vswitchd.ctl");
        if ctl.exists()
            && let Some((method, params)) = args.split_first()
        {
            return unixctl(&ctl, method, params);
        }
        let mut c = Command::new("ovs-appctl");
        c.env("OVS_RUNDIR", &self.rundir)
            .args(["-t", "ovs-vswitchd"])
            .args(args);
        run(c, "ovs-appctl", None)
    }

    /// `ovs-ofctl -O OpenFlow15 COMMAND <bridge's management socket> ARGS`, with `stdin`
    /// given for a `-` argument.
    ///
    /// # Errors
    /// It could not run, or failed.
    pub fn ofctl(
        &self,
        options: &[&str],
        command: &str,
        bridge: &str,
        args: &[&str],
        stdin: Option<&str>,
    ) -> Result<String, OvsError> {
        let mut c = Command::new("ovs-ofctl");
        c.env("OVS_RUNDIR", &self.rundir)
            .args(["-O", "OpenFlow15"])
            .args(options)
            .arg(command)
            .arg(format!(
                "unix:{}",
                self.rundir.join(format!("{bridge}.mgmt")).display()
            ))
            .args(args);
        run(c, &format!("ovs-ofctl {command}"), stdin)
    }
}

/// `ovsdb-server` and `ovs-vswitchd` of one node, run inside its network namespace with
/// every file in one directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OvsDaemon {
    netns: Netns,
    dir: PathBuf,
}

/// The two daemons, in the order they start.
const DAEMONS: [&str; 2] = ["ovsdb-server", "ovs-vswitchd"];

impl OvsDaemon {
    /// The switch of namespace `netns`, its files in `dir`.
    pub fn new(netns: Netns, dir: impl Into<PathBuf>) -> Self {
        Self {
            netns,
            dir: dir.into(),
        }
    }

    /// The tools to drive it.
    pub fn ovs(&self) -> Ovs {
        Ovs::new(&self.dir)
    }

    fn pidfile(&self, daemon: &str) -> PathBuf {
        self.dir.join(format!("{daemon}.pid"))
    }

    /// The pid of `daemon` when it runs (its pid file names a live process of that program).
    fn pid(&self, daemon: &str) -> Option<i32> {
        let text = std::fs::read_to_string(self.pidfile(daemon)).ok()?;
        let pid: i32 = text.trim().parse().ok()?;
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
        // comm is cut to 15 bytes: "ovsdb-server", "ovs-vswitchd" both fit.
        (comm.trim() == daemon).then_some(pid)
    }

    /// Whether both daemons run.
    pub fn running(&self) -> bool {
        DAEMONS.iter().all(|d| self.pid(d).is_some())
    }

    /// Starts whichever of the two daemons does not run (creating the database the first
    /// time); both running is success with nothing done, so an agent restarted adopts the
    /// switch it left. Returns once `ovs-vswitchd` has read the database.
    ///
    /// # Errors
    /// The directory, the database or a daemon could not be made or started.
    pub fn start(&self) -> Result<(), OvsError> {
        std::fs::create_dir_all(&self.dir).map_err(io(format!(
            "create the switch's directory {}",
            self.dir.display()
        )))?;
        let db = self.dir.join("conf.db");
        if !db.exists() {
            let mut c = Command::new("ovsdb-tool");
            c.arg("create").arg(&db).arg(SCHEMA);
            run(c, "ovsdb-tool create", None)?;
        }
        let sock = format!("unix:{}", self.dir.join("db.sock").display());
        if self.pid("ovsdb-server").is_none() {
            let mut c = netns::command(&self.netns, "ovsdb-server");
            c.envs(self.env())
                .arg(&db)
                .arg(format!("--remote=p{sock}"))
                .args(self.daemon_args("ovsdb-server"));
            run(c, "start ovsdb-server", None)?;
            self.ovs().vsctl_no_wait(&["init"])?;
        }
        if self.pid("ovs-vswitchd").is_none() {
            // Read before ovs-vswitchd opens a port (it takes effect only at its start):
            // with it, the datapath reads the virtio-net header of the frames a guest's tap
            // or a veth hands on, so a TCP segment whose checksum is left to a NIC
            // ("partial") counts as good instead of invalid to the tracker of the security
            // groups, and the header goes with it to the port that sends it on.
            self.ovs()
                .vsctl_no_wait(&["set", "Open_vSwitch", ".", USERSPACE_TSO])?;
            let mut c = netns::command(&self.netns, "ovs-vswitchd");
            c.envs(self.env())
                .arg(&sock)
                .args(self.daemon_args("ovs-vswitchd"));
            run(c, "start ovs-vswitchd", None)?;
        }
        // A change acknowledged by ovs-vswitchd: it has read the database.
        self.ovs().vsctl(&["init"])?;
        Ok(())
    }

    /// The environment both daemons run in: every directory of theirs is the switch's
    /// (the bridges' management sockets go to `OVS_RUNDIR`).
    fn env(&self) -> [(&'static str, &Path); 3] {
        [
            ("OVS_RUNDIR", &self.dir),
            ("OVS_LOGDIR", &self.dir),
            ("OVS_DBDIR", &self.dir),
        ]
    }

    /// The options both daemons take: detached, their pid file, control socket and log in
    /// the switch's directory.
    fn daemon_args(&self, daemon: &str) -> Vec<String> {
        vec![
            "--detach".into(),
            format!("--pidfile={}", self.pidfile(daemon).display()),
            format!(
                "--unixctl={}",
                self.dir.join(format!("{daemon}.ctl")).display()
            ),
            format!(
                "--log-file={}",
                self.dir.join(format!("{daemon}.log")).display()
            ),
        ]
    }

    /// Stops both daemons (`ovs-appctl exit`, then SIGTERM if one is still there after a
    /// while); of stopped ones it is `Ok(())`. The database stays, so a later
    /// [`start`](Self::start) has the same bridges and ports (flows are not kept: the
    /// agent's next reconcile writes them again).
    ///
    /// # Errors
    /// A daemon did not exit.
    pub fn stop(&self) -> Result<(), OvsError> {
        for daemon in DAEMONS.iter().rev() {
            let Some(pid) = self.pid(daemon) else {
                continue;
            };
            let mut c = Command::new("ovs-appctl");
            c.arg("-t")
                .arg(self.dir.join(format!("{daemon}.ctl")))
                .arg("exit");
            if run(c, "ovs-appctl exit", None).is_err() {
                terminate(pid);
            }
            if !self.exited(daemon) {
                terminate(pid);
                if !self.exited(daemon) {
                    return Err(OvsError::Command {
                        what: format!("stop {daemon}"),
                        stderr: format!("pid {pid} is still running"),
                    });
                }
            }
        }
        Ok(())
    }
}

impl OvsDaemon {
    /// Waits up to [`STOP_WAIT`] for `daemon` to be gone.
    fn exited(&self, daemon: &str) -> bool {
        let deadline = Instant::now() + STOP_WAIT;
        while self.pid(daemon).is_some() {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        true
    }
}

/// Sends SIGTERM to `pid` (gone already is fine).
fn terminate(pid: i32) {
    if let Some(pid) = rustix::process::Pid::from_raw(pid) {
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
    }
}
