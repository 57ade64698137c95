//! Running the host's storage commands (lvm2, losetup, blkdiscard, qemu-img) as argument
//! vectors, never through a shell, with their output bounded in errors.

use std::ffi::OsStr;
use std::process::{Command, Stdio};

/// How much of a failed command's stderr an error keeps.
const STDERR_KEEP: usize = 2048;

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// It could not be started.
    #[error("cannot start it")]
    Spawn(#[source] std::io::Error),
    /// It exited unsuccessfully.
    #[error("{status}: {stderr}")]
    Exit {
        /// How it exited.
        status: std::process::ExitStatus,
        /// The end of what it wrote on stderr.
        stderr: String,
    },
}

impl CommandError {
    /// What the command said on stderr (empty if it did not run).
    pub fn stderr(&self) -> &str {
        match self {
            Self::Exit { stderr, .. } => stderr,
            Self::Spawn(_) => "",
        }
    }
}

/// Runs `program` with `args` (no shell, stdin closed) and answers its stdout.
///
/// # Errors
/// [`super::DriverError::Command`] when it cannot start or exits unsuccessfully.
pub fn run<I, S>(program: &'static str, args: I) -> Result<Vec<u8>, super::DriverError>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let out = Command::new(program)
        .args(args)
        // lvm2 complains about every descriptor it inherits; tokio's are none of its business.
        .env("LVM_SUPPRESS_FD_WARNINGS", "1")
        .env("LC_ALL", "C")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| super::DriverError::Command {
            program,
            source: CommandError::Spawn(e),
        })?;
    if out.status.success() {
        return Ok(out.stdout);
    }
    let text = String::from_utf8_lossy(&out.stderr);
    let text = text.trim();
    let start = text.len().saturating_sub(STDERR_KEEP);
    let start = (start..=text.len())
        .find(|i| text.is_char_boundary(*i))
        .unwrap_or(text.len());
    Err(super::DriverError::Command {
        program,
        source: CommandError::Exit {
            status: out.status,
            stderr: text[start..].to_owned(),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::driver::DriverError;

    #[test]
    fn arguments_are_never_read_by_a_shell() {
        let out = run("echo", ["$(id)", "; true", "a b"]).expect("echo");
        assert_eq!(String::from_utf8_lossy(&out), "$(id) ; true a b\n");
    }

    #[test]
    fn a_failure_keeps_the_end_of_stderr() {
        let long = "/x".repeat(1500);
        let Err(DriverError::Command { program, source }) =
            run("ls", [format!("/nonexistent{long}")])
        else {
            panic!("ls of a missing file succeeded");
        };
        assert_eq!(program, "ls");
        assert!(source.stderr().len() <= STDERR_KEEP);
        assert!(source.stderr().contains("No such file"));
    }
}
