//! Entering network namespaces: work runs on a thread of its own that joins the namespace
//! (through its `/run/netns` file, with setns) and ends with the work, so no other thread of
//! the agent ever changes namespace; commands are argument vectors started from such a thread
//! ([`output`]), so they run in the namespace without `ip netns exec` before them.
//!
//! rustix wraps setns(2) in a safe function (it owns the file descriptor's lifetime and the
//! call has no memory effects), so this module needs no `unsafe`.

use std::fs::File;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::Command;

use rustix::thread::{LinkNameSpaceType, move_into_link_name_space};

use super::names::{Name, Netns};

/// Where `ip netns` keeps its namespaces.
pub const NETNS_DIR: &str = "/run/netns";

/// The file of a named namespace.
pub fn path(name: &Name) -> PathBuf {
    Path::new(NETNS_DIR).join(name.as_str())
}

/// Whether `ns` exists (the host's always does).
pub fn exists(ns: &Netns) -> bool {
    match ns {
        Netns::Host => true,
        Netns::Named(n) => path(n).exists(),
    }
}

/// Which namespace `ns` is now (the device and inode of its file), `None` when it does not
/// exist: a namespace deleted and made again under the same name is another one.
pub fn identity(ns: &Netns) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let file = match ns {
        Netns::Host => PathBuf::from("/proc/self/ns/net"),
        Netns::Named(n) => path(n),
    };
    std::fs::metadata(file).ok().map(|m| (m.dev(), m.ino()))
}

/// Why work could not run in a namespace.
#[derive(Debug, thiserror::Error)]
pub enum EnterError {
    /// The namespace's file is absent.
    #[error("no network namespace {0}")]
    Missing(Netns),
    /// Opening or joining it failed.
    #[error("enter network namespace {netns}")]
    Enter {
        /// Which.
        netns: Netns,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The thread could not be started, or panicked.
    #[error("namespace worker thread: {0}")]
    Thread(String),
}

/// Runs `work` on a new thread inside `ns` and returns what it returns.
pub fn run_in<T, F>(ns: &Netns, work: F) -> Result<T, EnterError>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let file = match ns {
        Netns::Host => None,
        Netns::Named(n) => match File::open(path(n)) {
            Ok(f) => Some(f),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(EnterError::Missing(ns.clone()));
            }
            Err(source) => {
                return Err(EnterError::Enter {
                    netns: ns.clone(),
                    source,
                });
            }
        },
    };
    let netns = ns.clone();
    let handle = std::thread::Builder::new()
        .name("netns".into())
        .spawn(move || {
            if let Some(f) = file {
                move_into_link_name_space(f.as_fd(), Some(LinkNameSpaceType::Network)).map_err(
                    |e| EnterError::Enter {
                        netns,
                        source: e.into(),
                    },
                )?;
            }
            Ok(work())
        })
        .map_err(|e| EnterError::Thread(e.to_string()))?;
    handle
        .join()
        .map_err(|_| EnterError::Thread("panicked".into()))?
}

/// `program` to run in `ns`: itself for the host, under `ip netns exec` for a named one.
pub fn command(ns: &Netns, program: &str) -> Command {
    match ns {
        Netns::Host => Command::new(program),
        Netns::Named(n) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", n.as_str(), program]);
            c
        }
    }
}

/// Runs `work` in `ns` ([`run_in`], on the calling thread for the host's namespace), a
/// failure to enter it being an I/O error (`NotFound` when the namespace is absent).
///
/// # Errors
/// The namespace could not be entered, or `work`'s.
pub fn run_io<T, F>(ns: &Netns, work: F) -> std::io::Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> std::io::Result<T> + Send + 'static,
{
    match ns {
        Netns::Host => work(),
        Netns::Named(_) => run_in(ns, work)
            .map_err(|e| {
                let kind = match e {
                    EnterError::Missing(_) => std::io::ErrorKind::NotFound,
                    _ => std::io::ErrorKind::Other,
                };
                std::io::Error::new(kind, e.to_string())
            })
            .and_then(|r| r),
    }
}

/// Runs `cmd` in `ns` to its end, started from a thread inside the namespace (a process
/// inherits its starter's network namespace): no `ip netns exec`, which is a process more
/// and sets up a mount namespace, before each command. Its output, as [`Command::output`].
///
/// # Errors
/// The namespace could not be entered (`NotFound` when it is absent), or the program run.
pub fn output(ns: &Netns, mut cmd: Command) -> std::io::Result<std::process::Output> {
    run_io(ns, move || cmd.output())
}
