//! The one way every subcommand finds its kubeconfig, as kubectl does: `--kubeconfig` when
//! given, else the files `$KUBECONFIG` lists (merged by kube-rs's rules), else `~/.kube/config`.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

/// The kubeconfig files a command reads, in precedence order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kubeconfig {
    files: Vec<PathBuf>,
    /// Whether a missing file is skipped (files found by looking, as kubectl skips them) or an
    /// error (a file the user named).
    skip_missing: bool,
}

impl Kubeconfig {
    /// Finds the files from the `--kubeconfig` flag (if any) and the environment.
    pub fn locate(flag: Option<&Path>) -> Result<Self> {
        Self::locate_in(
            flag,
            std::env::var_os("KUBECONFIG"),
            std::env::var_os("HOME"),
        )
    }

    /// One file, named by the caller.
    pub fn file(path: &Path) -> Self {
        Self {
            files: vec![path.to_path_buf()],
            skip_missing: false,
        }
    }

    fn locate_in(
        flag: Option<&Path>,
        kubeconfig: Option<OsString>,
        home: Option<OsString>,
    ) -> Result<Self> {
        if let Some(path) = flag {
            return Ok(Self::file(path));
        }
        let listed: Vec<PathBuf> = kubeconfig
            .iter()
            .flat_map(std::env::split_paths)
            .filter(|p| !p.as_os_str().is_empty())
            .collect();
        let files = if listed.is_empty() {
            match home {
                Some(home) => vec![PathBuf::from(home).join(".kube/config")],
                None => bail!("no kubeconfig: set KUBECONFIG or pass --kubeconfig"),
            }
        } else {
            listed
        };
        Ok(Self {
            files,
            skip_missing: true,
        })
    }

    /// The file new entries are written to, as kubectl chooses it: the first that exists
    /// (it wins every merge), else the last.
    pub fn primary(&self) -> &Path {
        let existing = self.files.iter().find(|p| p.exists());
        // `locate_in` and `file` never make an empty list.
        existing
            .or(self.files.last())
            .map_or(Path::new(""), PathBuf::as_path)
    }

    /// Reads and merges the files.
    pub fn read(&self) -> Result<kube::config::Kubeconfig> {
        let mut merged = kube::config::Kubeconfig::default();
        let mut read = 0;
        for path in &self.files {
            if self.skip_missing && !path.exists() {
                continue;
            }
            let next = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("read {}", path.display()))?;
            merged = merged
                .merge(next)
                .with_context(|| format!("merge {}", path.display()))?;
            read += 1;
        }
        if read == 0 {
            let names: Vec<String> = self.files.iter().map(|p| p.display().to_string()).collect();
            bail!(
                "no kubeconfig at {} (set KUBECONFIG or pass --kubeconfig)",
                names.join(", ")
            );
        }
        Ok(merged)
    }

    /// The client configuration of the current context.
    pub async fn config(&self) -> Result<kube::Config> {
        kube::Config::from_custom_kubeconfig(self.read()?, &Default::default())
            .await
            .context("load the kubeconfig")
    }

    /// A client for the current context.
    pub async fn client(&self) -> Result<kube::Client> {
        kube::Client::try_from(self.config().await?).context("build the API client")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_flag_wins_over_the_environment() -> Result<()> {
        let k = Kubeconfig::locate_in(
            Some(Path::new("/flag")),
            Some("/env".into()),
            Some("/home/u".into()),
        )?;
        assert_eq!(k.files, [PathBuf::from("/flag")]);
        Ok(())
    }

    #[test]
    fn kubeconfig_is_a_list_of_files_like_path() -> Result<()> {
        let k = Kubeconfig::locate_in(None, Some("/a::/b".into()), Some("/home/u".into()))?;
        assert_eq!(k.files, [PathBuf::from("/a"), PathBuf::from("/b")]);
        // Neither exists: kubectl would create the last.
        assert_eq!(k.primary(), Path::new("/b"));
        Ok(())
    }

    #[test]
    fn home_is_the_fallback_and_nothing_is_an_error() -> Result<()> {
        let k = Kubeconfig::locate_in(None, Some("".into()), Some("/home/u".into()))?;
        assert_eq!(k.files, [PathBuf::from("/home/u/.kube/config")]);
        assert!(Kubeconfig::locate_in(None, None, None).is_err());
        Ok(())
    }

    #[test]
    fn files_are_merged_first_one_winning() -> Result<()> {
        let dir = std::env::temp_dir().join(format!("stratus-kubeconfig-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let (a, b) = (dir.join("a"), dir.join("b"));
        let cluster = |name: &str, server: &str| {
            format!(
                "apiVersion: v1\nkind: Config\ncurrent-context: {name}\nclusters:\n- name: {name}\n  cluster:\n    server: {server}\ncontexts:\n- name: {name}\n  context:\n    cluster: {name}\n    user: {name}\n    namespace: ns-{name}\nusers:\n- name: {name}\n  user:\n    token: t-{name}\n"
            )
        };
        std::fs::write(&a, cluster("a", "https://127.0.0.1:1"))?;
        std::fs::write(&b, cluster("b", "https://127.0.0.1:2"))?;
        let both = std::env::join_paths([&a, &b])?;
        let k = Kubeconfig::locate_in(None, Some(both), None)?;
        let kc = k.read()?;
        assert_eq!(kc.current_context.as_deref(), Some("a"));
        assert_eq!(kc.clusters.len(), 2);
        // A listed file that is missing is skipped, as kubectl skips it; a named one is not.
        let gone = dir.join("gone");
        let with_gone = std::env::join_paths([&gone, &b])?;
        let k = Kubeconfig::locate_in(None, Some(with_gone), None)?;
        assert_eq!(k.read()?.current_context.as_deref(), Some("b"));
        assert_eq!(k.primary(), b);
        assert!(Kubeconfig::file(&gone).read().is_err());
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }
}
