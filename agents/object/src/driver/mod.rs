//! The host side of the object agent: a [`Supervisor`] starts, watches and stops the Swift
//! processes (the real one, [`process::Processes`], runs programs; [`fake::FakeSupervisor`]
//! only records), and [`disk`] probes device directories and installs ring files.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::PathBuf;

use crate::plan::Seen;

pub mod disk;
pub mod fake;
pub mod process;

#[cfg(test)]
mod host_tests;

/// A process to run: a program and its argument vector (never a shell line), its output
/// appended to `log`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessSpec {
    /// The name it is supervised under (unique on the node).
    pub name: String,
    /// The program.
    pub program: PathBuf,
    /// Its arguments.
    pub args: Vec<OsString>,
    /// Where its standard output and error go (appended).
    pub log: PathBuf,
    /// The node's `swift.conf`, which the process sees at Swift's fixed path
    /// ([`crate::hash::SWIFT_CONF`]) in a mount namespace of its own; none for a program
    /// that reads no `swift.conf`.
    pub swift_conf: Option<PathBuf>,
}

/// A supervisor's failure.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    /// A program could not be started, or a file written.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The supervisor's thread is gone (a bug).
    #[error("the process supervisor stopped")]
    Gone,
}

impl DriverError {
    /// `e` while doing `what`.
    pub fn io(what: impl Into<String>, e: std::io::Error) -> Self {
        Self::Io {
            what: what.into(),
            source: e,
        }
    }
}

/// Starts, watches and stops the node's processes.
///
/// # Guarantees
/// A process started lives at most as long as the supervisor (and the agent's process): the
/// real one arms each child's parent-death signal, so an agent killed by any signal leaves no
/// server behind.
pub trait Supervisor: Send + Sync {
    /// Starts `spec` under `spec.name`. Idempotent: a process of that name that runs is left
    /// as it is; one that exited is replaced.
    ///
    /// # Errors
    /// The program could not be started (it is then not running).
    fn start(&self, spec: &ProcessSpec) -> Result<(), DriverError>;

    /// Every process started and not stopped: running, or how it exited.
    fn observe(&self) -> BTreeMap<String, Seen>;

    /// Stops `name` (SIGTERM, then SIGKILL after a grace period) and forgets it. Idempotent:
    /// an unknown name is no error.
    ///
    /// # Errors
    /// The supervisor is gone.
    fn stop(&self, name: &str) -> Result<(), DriverError>;
}
