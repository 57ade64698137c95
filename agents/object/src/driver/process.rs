//! The real [`Supervisor`]: processes started from one thread of the supervisor's own, which
//! lives as long as the supervisor, so that each child's parent-death signal (armed before it
//! runs its program) fires when the agent dies and not when some worker thread ends.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::fs::OpenOptions;
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::{DriverError, ProcessSpec, Supervisor};
use crate::plan::Seen;

/// How long a stopped process has after SIGTERM before SIGKILL.
const GRACE: Duration = Duration::from_secs(10);

enum Entry {
    Running(Child),
    Exited(String),
}

type Job = Box<dyn FnOnce(&mut BTreeMap<String, Entry>) + Send>;

/// Processes run by a thread of their own.
pub struct Processes {
    jobs: Mutex<Option<mpsc::Sender<Job>>>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Default for Processes {
    fn default() -> Self {
        Self::new()
    }
}

impl Processes {
    /// A supervisor with no process, and its thread.
    pub fn new() -> Self {
        let (tx, rx) = mpsc::channel::<Job>();
        let thread = std::thread::Builder::new()
            .name("swift-supervisor".into())
            .spawn(move || {
                let mut procs = BTreeMap::new();
                while let Ok(job) = rx.recv() {
                    job(&mut procs);
                }
                // The supervisor is dropped: its processes go with it.
                for (name, entry) in procs {
                    if let Entry::Running(child) = entry {
                        terminate(&name, child);
                    }
                }
            })
            .ok();
        Self {
            jobs: Mutex::new(Some(tx)),
            thread: Mutex::new(thread),
        }
    }

    /// Runs `f` on the supervisor's thread and returns what it returns.
    fn call<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut BTreeMap<String, Entry>) -> T + Send + 'static,
    ) -> Result<T, DriverError> {
        let (tx, rx) = mpsc::sync_channel(1);
        let job: Job = Box::new(move |procs| {
            let _ = tx.send(f(procs));
        });
        self.jobs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .as_ref()
            .ok_or(DriverError::Gone)?
            .send(job)
            .map_err(|_| DriverError::Gone)?;
        rx.recv().map_err(|_| DriverError::Gone)
    }
}

impl Drop for Processes {
    fn drop(&mut self) {
        // Closing the channel ends the thread, which stops every process first.
        self.jobs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(t) = self
            .thread
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
        {
            let _ = t.join();
        }
    }
}

/// SIGTERM, then SIGKILL if it has not exited within [`GRACE`]; reaped either way.
fn terminate(name: &str, mut child: Child) {
    if let Some(pid) = rustix::process::Pid::from_raw(child.id() as i32) {
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
    }
    let deadline = Instant::now() + GRACE;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    tracing::warn!(process = name, "did not stop on SIGTERM; killing it");
    let _ = child.kill();
    let _ = child.wait();
}

/// Makes `cmd`'s process get SIGTERM when the thread that forks it ends (the supervisor's
/// thread, which ends only with the agent).
#[allow(unsafe_code)]
fn stop_with_parent(cmd: &mut Command) {
    let parent = rustix::process::getpid();
    // SAFETY: the closure runs in the forked child before exec, where only async-signal-safe
    // work is allowed: two system calls (prctl, getppid) through rustix's raw syscall
    // backend, no allocation (its error is an errno). Checking the parent after prctl closes
    // the race of a parent that died before the signal was armed.
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

/// Makes `cmd`'s process see `swift_conf` at Swift's fixed path ([`crate::hash::SWIFT_CONF`])
/// and nothing else of the host changed: it runs in a mount namespace of its own (made
/// private, so nothing propagates back to the host's), with the file bound over Swift's.
/// Several nodes, or clusters, on one host so each read their own hash and policies. Needs
/// root (`CAP_SYS_ADMIN`), as the servers' `user` setting does.
///
/// # Errors
/// `swift_conf` or Swift's own file (which Debian's `swift` package installs, and which the
/// binding needs as its mount point) is missing, or a path holds a NUL byte.
#[allow(unsafe_code)]
pub fn bind_swift_conf(cmd: &mut Command, swift_conf: &Path) -> std::io::Result<()> {
    use rustix::mount::{MountPropagationFlags, mount_bind, mount_change};
    let target = Path::new(crate::hash::SWIFT_CONF);
    for p in [swift_conf, target] {
        if !p.is_file() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!(
                    "{} is not there (Swift's is installed by Debian's swift package)",
                    p.display()
                ),
            ));
        }
    }
    let source = CString::new(swift_conf.as_os_str().as_bytes())?;
    let target = CString::new(target.as_os_str().as_bytes())?;
    // SAFETY: the closure runs in the forked child before exec, where only async-signal-safe
    // work is allowed: three system calls (unshare, two mounts) through rustix's raw syscall
    // backend on C strings made before the fork, no allocation (an error is an errno).
    // Unsharing the mount namespace affects only this single-threaded child, about to exec.
    unsafe {
        cmd.pre_exec(move || {
            rustix::thread::unshare_unsafe(rustix::thread::UnshareFlags::NEWNS)?;
            mount_change(
                c"/",
                MountPropagationFlags::REC | MountPropagationFlags::PRIVATE,
            )?;
            mount_bind(source.as_c_str(), target.as_c_str())?;
            Ok(())
        });
    }
    Ok(())
}

fn spawn(spec: &ProcessSpec) -> Result<Child, DriverError> {
    let what = || format!("start {} ({})", spec.name, spec.program.display());
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&spec.log)
        .map_err(|e| DriverError::io(format!("open {}", spec.log.display()), e))?;
    let err = log.try_clone().map_err(|e| DriverError::io(what(), e))?;
    let mut cmd = Command::new(&spec.program);
    cmd.args(&spec.args)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(err)
        // Its own process group: a signal to the agent's terminal group is the agent's to
        // handle, not each server's.
        .process_group(0);
    stop_with_parent(&mut cmd);
    if let Some(conf) = &spec.swift_conf {
        bind_swift_conf(&mut cmd, conf).map_err(|e| DriverError::io(what(), e))?;
    }
    cmd.spawn().map_err(|e| DriverError::io(what(), e))
}

impl Supervisor for Processes {
    fn start(&self, spec: &ProcessSpec) -> Result<(), DriverError> {
        let spec = spec.clone();
        self.call(move |procs| {
            if let Some(Entry::Running(child)) = procs.get_mut(&spec.name)
                && matches!(child.try_wait(), Ok(None))
            {
                return Ok(());
            }
            procs.remove(&spec.name);
            let child = spawn(&spec)?;
            tracing::info!(process = %spec.name, pid = child.id(), "started");
            procs.insert(spec.name.clone(), Entry::Running(child));
            Ok(())
        })?
    }

    fn observe(&self) -> BTreeMap<String, Seen> {
        self.call(|procs| {
            procs
                .iter_mut()
                .map(|(name, entry)| {
                    if let Entry::Running(child) = entry {
                        match child.try_wait() {
                            Ok(None) => return (name.clone(), Seen::Running),
                            Ok(Some(status)) => *entry = Entry::Exited(status.to_string()),
                            Err(e) => *entry = Entry::Exited(format!("cannot be waited for: {e}")),
                        }
                    }
                    let how = match entry {
                        Entry::Exited(how) => how.clone(),
                        Entry::Running(_) => String::new(),
                    };
                    (name.clone(), Seen::Exited(how))
                })
                .collect()
        })
        .unwrap_or_default()
    }

    fn stop(&self, name: &str) -> Result<(), DriverError> {
        let name = name.to_owned();
        self.call(move |procs| {
            if let Some(Entry::Running(child)) = procs.remove(&name) {
                terminate(&name, child);
                tracing::info!(process = %name, "stopped");
            }
        })
    }
}
