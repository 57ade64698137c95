//! Headless Chromium on the dashboard, worked through `e2e/python/dashboard.py` (Debian's
//! `chromium`, `chromium-driver` and `python3-selenium`): the browser steps the dashboard's
//! tests and its benchmark share.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{Receiver, channel};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::{Cloud, repo_root};

/// Headless Chromium, worked by `e2e/python/dashboard.py` one command at a time.
pub struct Browser {
    child: Child,
    stdin: ChildStdin,
    answers: Receiver<String>,
    _profile: tempfile::TempDir,
}

impl Browser {
    /// Starts Chromium trusting only the API server's key (`cert`, PEM).
    pub fn start(cert: &Path, artifacts: &Path) -> Result<Self> {
        let profile = tempfile::tempdir()?;
        let mut child = Command::new("/usr/bin/python3")
            .arg(repo_root().join("e2e/python/dashboard.py"))
            .arg("--spki-hash")
            .arg(spki_hash(cert)?)
            .arg("--artifacts")
            .arg(artifacts)
            .arg("--profile")
            .arg(profile.path())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("run e2e/python/dashboard.py")?;
        let stdin = child.stdin.take().context("stdin")?;
        let stdout = child.stdout.take().context("stdout")?;
        let (tx, answers) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let mut b = Self {
            child,
            stdin,
            answers,
            _profile: profile,
        };
        let ready = b.answer(Duration::from_secs(120))?;
        if ready["ok"] != true {
            bail!("the browser did not start: {ready}");
        }
        Ok(b)
    }

    fn answer(&mut self, within: Duration) -> Result<Value> {
        let line = self
            .answers
            .recv_timeout(within)
            .with_context(|| format!("no answer from the browser within {within:?}"))?;
        serde_json::from_str(&line).with_context(|| format!("the browser's answer {line:?}"))
    }

    /// Sends one command; its answer (bounded by the command's own timeout, plus a minute).
    pub fn send(&mut self, cmd: Value) -> Result<Value> {
        writeln!(self.stdin, "{cmd}")?;
        self.stdin.flush()?;
        let within = Duration::from_secs(cmd["timeout"].as_u64().unwrap_or(30) + 60);
        self.answer(within)
    }

    /// Sends one command that must succeed.
    pub fn ok(&mut self, cmd: Value) -> Result<Value> {
        let a = self.send(cmd.clone())?;
        if a["ok"] != true {
            let _ = self.send(json!({"cmd": "screenshot", "name": "failed"}));
            bail!("browser command {cmd} failed: {a}");
        }
        Ok(a)
    }

    /// Runs a script in the page; its value.
    pub fn js(&mut self, script: &str) -> Result<Value> {
        Ok(self.ok(json!({"cmd": "js", "js": script}))?["value"].take())
    }

    /// Waits (up to `timeout` s) until the script returns something other than null or false.
    pub fn until(&mut self, script: &str, timeout: u64, what: &str) -> Result<Value> {
        let a = self.send(json!({"cmd": "wait_js", "js": script, "timeout": timeout}))?;
        if a["ok"] != true {
            let _ = self.send(json!({"cmd": "screenshot", "name": "failed"}));
            bail!("timed out after {timeout} s waiting for {what}: {a}");
        }
        Ok(a)
    }

    /// Starts the browser trusting `cloud`'s API server and opens `url` at its login form.
    pub fn open_at(cloud: &Cloud, url: &str, artifacts: &Path) -> Result<Self> {
        let mut b = Self::start(&cloud.dir.path().join("pki/apiserver.crt"), artifacts)?;
        b.ok(json!({"cmd": "open", "url": url}))?;
        b.until(
            "return document.querySelector('#login-user') !== null",
            30,
            "the login form",
        )?;
        Ok(b)
    }

    /// Applies the open create form, and waits until the API's refusal is written next to the
    /// field `path` names; that text.
    pub fn refused_at(&mut self, path: &str) -> Result<String> {
        self.ok(json!({"cmd": "click", "css": "form.create button.apply"}))?;
        let a = self.until(
            &format!(
                "return document.querySelector(\"{}\").textContent || null",
                field_error(path)
            ),
            30,
            &format!("the error of {path}"),
        )?;
        Ok(a["value"].as_str().unwrap_or_default().to_string())
    }

    /// Opens the create form `name` by its fragment.
    pub fn open_form(&mut self, name: &str) -> Result<()> {
        self.js(&format!("location.hash = '#create/{name}'; return true"))?;
        self.until(
            &format!("return document.querySelector('form.create[data-form={name}]') !== null"),
            20,
            &format!("the {name} form"),
        )?;
        Ok(())
    }

    /// Opens the server action `action`'s panel; the manifest (or command) it shows.
    pub fn action(&mut self, action: &str) -> Result<String> {
        self.ok(json!({"cmd": "click", "css": format!("#actions button[data-action={action}]")}))?;
        self.until(
            &format!("const p = document.querySelector('#action-panel'); return p.dataset.action === '{action}' && !p.hidden"),
            20,
            &format!("the {action} panel"),
        )?;
        Ok(text_of(self, "#action-panel pre.manifest")?
            .as_str()
            .unwrap_or_default()
            .to_string())
    }

    /// Confirms the open action panel and waits until the API accepted it (the panel closes).
    pub fn confirm(&mut self) -> Result<()> {
        self.ok(json!({"cmd": "click", "css": "#action-panel button.confirm"}))?;
        self.until(
            "return document.querySelector('#action-panel').hidden",
            30,
            "the action to be applied",
        )?;
        Ok(())
    }

    /// Logs in on the open page as `user` and waits until its first list is live.
    pub fn log_in(&mut self, user: &str, password: &str) -> Result<()> {
        self.ok(json!({"cmd": "type", "css": "#login-user", "text": user}))?;
        self.ok(json!({"cmd": "type", "css": "#login-password", "text": password}))?;
        self.ok(json!({"cmd": "click", "css": "#login button[type=submit]"}))?;
        self.until(
            "return document.querySelector('#live').dataset.state === 'live'",
            60,
            &format!("{user}'s first list to be listed and watched"),
        )?;
        Ok(())
    }

    /// Waits until the list shows row `name` with `col` reading `value` (any row when `col`
    /// is None); the answer, with `ms` and `cells`.
    pub fn row(&mut self, name: &str, col: Option<(&str, &str)>, timeout: u64) -> Result<Value> {
        let (c, v) = col.unzip();
        let a = self.send(
            json!({"cmd": "wait_row", "name": name, "col": c, "value": v, "timeout": timeout}),
        )?;
        if a["ok"] != true {
            let _ = self.send(json!({"cmd": "screenshot", "name": "failed"}));
            bail!("timed out after {timeout} s waiting for the row {name} with {col:?}: {a}");
        }
        Ok(a)
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = writeln!(self.stdin, "{}", json!({"cmd": "quit"}));
        let _ = self.stdin.flush();
        for _ in 0..200 {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The base64 SHA-256 of a certificate's public key, as Chromium's
/// `--ignore-certificate-errors-spki-list` takes it.
pub fn spki_hash(cert: &Path) -> Result<String> {
    let dir = tempfile::tempdir()?;
    let (public, der) = (dir.path().join("key.pem"), dir.path().join("key.der"));
    let run = |args: &[&std::ffi::OsStr]| -> Result<Vec<u8>> {
        let out = Command::new("openssl").args(args).output()?;
        if !out.status.success() {
            bail!("openssl: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(out.stdout)
    };
    let os = |s: &'static str| std::ffi::OsStr::new(s);
    run(&[
        os("x509"),
        os("-in"),
        cert.as_os_str(),
        os("-pubkey"),
        os("-noout"),
        os("-out"),
        public.as_os_str(),
    ])?;
    run(&[
        os("pkey"),
        os("-pubin"),
        os("-in"),
        public.as_os_str(),
        os("-outform"),
        os("der"),
        os("-out"),
        der.as_os_str(),
    ])?;
    let digest = dir.path().join("key.sha256");
    run(&[
        os("dgst"),
        os("-sha256"),
        os("-binary"),
        os("-out"),
        digest.as_os_str(),
        der.as_os_str(),
    ])?;
    let encoded = run(&[os("base64"), os("-A"), os("-in"), digest.as_os_str()])?;
    Ok(String::from_utf8(encoded)?.trim().to_string())
}

/// The selector of the error written next to field `path` in a create form.
pub fn field_error(path: &str) -> String {
    format!(".field-error[data-for='{path}']")
}

/// The text the page shows in `css` (empty if absent).
pub fn text_of(b: &mut Browser, css: &str) -> Result<Value> {
    b.js(&format!(
        "const e = document.querySelector({}); return e ? e.textContent : ''",
        json!(css)
    ))
}
