//! An in-memory [`Supervisor`] for tests of the agent's logic: it records what was started
//! and stopped, and a test makes a process exit or a start fail.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;

use super::{DriverError, ProcessSpec, Supervisor};
use crate::plan::Seen;

/// Processes that exist only in memory.
#[derive(Debug, Default)]
pub struct FakeSupervisor {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    procs: BTreeMap<String, Seen>,
    starts: Vec<String>,
    failing: BTreeSet<String>,
}

impl FakeSupervisor {
    /// No process.
    pub fn new() -> Self {
        Self::default()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Makes `name` exit with `how`.
    pub fn crash(&self, name: &str, how: &str) {
        if let Some(p) = self.state().procs.get_mut(name) {
            *p = Seen::Exited(how.into());
        }
    }

    /// Makes every start of `name` fail.
    pub fn fail_starts(&self, name: &str) {
        self.state().failing.insert(name.into());
    }

    /// Every start, in order.
    pub fn starts(&self) -> Vec<String> {
        self.state().starts.clone()
    }
}

impl Supervisor for FakeSupervisor {
    fn start(&self, spec: &ProcessSpec) -> Result<(), DriverError> {
        let mut s = self.state();
        if s.procs.get(&spec.name) == Some(&Seen::Running) {
            return Ok(());
        }
        if s.failing.contains(&spec.name) {
            s.procs.remove(&spec.name);
            return Err(DriverError::io(
                format!("start {}", spec.name),
                std::io::Error::from(std::io::ErrorKind::NotFound),
            ));
        }
        s.starts.push(spec.name.clone());
        s.procs.insert(spec.name.clone(), Seen::Running);
        Ok(())
    }

    fn observe(&self) -> BTreeMap<String, Seen> {
        self.state().procs.clone()
    }

    fn stop(&self, name: &str) -> Result<(), DriverError> {
        self.state().procs.remove(name);
        Ok(())
    }
}
