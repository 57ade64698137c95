//! Simulated nodes for compute tests: each is a libvirtd (with its virtlogd) in its own network
//! and mount namespace, with its own /run/libvirt, /var/lib/libvirt and /etc/libvirt, and a
//! `stratus agent` reaching it through its socket. Also the test guest and a file server for
//! its Images.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::{Cloud, Proc, STARTUP, free_port, repo_root, stratus_bin, wait_until};

/// Starts libvirtd inside the namespaces: the node's directories are bound over the paths
/// libvirt uses, so each daemon sees only its own state. Paths come in as arguments.
const START_LIBVIRTD: &str = r#"set -e
mount --bind "$1/run" /run/libvirt
mount --bind "$1/lib" /var/lib/libvirt
mount --bind "$1/etc" /etc/libvirt
ip link set lo up
virtlogd -d --pid-file "$1/virtlogd.pid"
exec libvirtd --pid-file "$1/libvirtd.pid"
"#;

/// One simulated node.
pub struct Node {
    /// The node's name.
    pub name: String,
    /// Its directory (libvirt's state, the agent's state, logs).
    pub dir: tempfile::TempDir,
    libvirtd: Proc,
    /// The node's agent, while it runs.
    pub agent: Option<Proc>,
}

/// The directory of a node's NBD certificates, in its own.
const NBD_TLS: &str = "nbd-tls";

impl Node {
    /// Starts the node's libvirtd and waits for its socket.
    pub fn start(name: &str) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let d = dir.path();
        for sub in ["run", "lib", "etc", "state"] {
            std::fs::create_dir_all(d.join(sub))?;
        }
        std::fs::create_dir_all("/run/libvirt")?;
        std::fs::create_dir_all("/var/log/libvirt/qemu")?;
        copy_tree(Path::new("/etc/libvirt"), &d.join("etc"))?;
        // libvirt's own directory layout, without its contents.
        for entry in walk_dirs(Path::new("/var/lib/libvirt"))? {
            if let Ok(rel) = entry.strip_prefix("/var/lib/libvirt") {
                std::fs::create_dir_all(d.join("lib").join(rel))?;
            }
        }
        // QEMU runs as root: the test's files are root's.
        let conf = d.join("etc/qemu.conf");
        let mut text = std::fs::read_to_string(&conf).unwrap_or_default();
        text.push_str("\nuser = \"root\"\ngroup = \"root\"\n");
        // The node's NBD certificates, which its QEMU presents to another node's volume
        // exports (see `Node::nbd_tls_dir`).
        let nbd_tls = d.join(NBD_TLS);
        std::fs::create_dir_all(&nbd_tls)?;
        text.push_str(&format!(
            "nbd_tls_x509_cert_dir = \"{}\"\n",
            nbd_tls.display()
        ));
        std::fs::write(&conf, text)?;
        let libvirtd = Proc::spawn(
            &format!("libvirtd of {name}"),
            Command::new("unshare")
                .args(["--net", "--mount", "--propagation", "private", "--"])
                .args(["sh", "-c", START_LIBVIRTD, "sh"])
                .arg(d),
            &d.join("libvirtd.log"),
        )?;
        let node = Self {
            name: name.to_string(),
            dir,
            libvirtd,
            agent: None,
        };
        let sock = node.dir.path().join("run/libvirt-sock");
        wait_until(STARTUP, "libvirtd's socket", || sock.exists().then_some(()))?;
        wait_until(STARTUP, "libvirtd to answer", || {
            node.virsh(&["version"])
                .ok()
                .filter(|o| o.status.success())
                .map(|_| ())
        })?;
        Ok(node)
    }

    /// Where this node's libvirtd reads its NBD certificates (`nbd_tls_x509_cert_dir`):
    /// `stratus pki nbd-node NAME --out` this.
    pub fn nbd_tls_dir(&self) -> std::path::PathBuf {
        self.dir.path().join(NBD_TLS)
    }

    /// The state directory its agent is given (`--state-dir`).
    pub fn state_dir(&self) -> std::path::PathBuf {
        self.dir.path().join("state")
    }

    /// The libvirt URI of this node's daemon.
    pub fn uri(&self) -> String {
        format!(
            "qemu:///system?socket={}",
            self.dir.path().join("run/libvirt-sock").display()
        )
    }

    /// Runs virsh against this node.
    pub fn virsh(&self, args: &[&str]) -> Result<std::process::Output> {
        Ok(Command::new("virsh")
            .args(["-c", &self.uri()])
            .args(args)
            .output()?)
    }

    /// Names of the domains defined on this node.
    pub fn domains(&self) -> Result<Vec<String>> {
        let out = self.virsh(&["list", "--all", "--name"])?;
        if !out.status.success() {
            bail!("virsh list: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(String::from)
            .collect())
    }

    /// Starts (or restarts) the node's agent against `cloud`, which must have issued the
    /// node's identity (`Cloud::up_with(&["--nodes", NAME])`).
    pub fn start_agent(&mut self, cloud: &Cloud) -> Result<()> {
        self.start_agent_with(cloud, &[])
    }

    /// Starts (or restarts) the node's agent as [`Node::start_agent`] does, with `extra`
    /// arguments.
    pub fn start_agent_with(&mut self, cloud: &Cloud, extra: &[&str]) -> Result<()> {
        // Long, so that what the tests see of drift comes from libvirt's events.
        self.spawn_agent(cloud, &[&["--resync-seconds", "300"][..], extra].concat())
    }

    /// Starts (or restarts) the node's agent as the node, on its libvirtd, with its state
    /// and log in the node's directory, and `args`.
    fn spawn_agent(&mut self, cloud: &Cloud, args: &[&str]) -> Result<()> {
        self.kill_agent();
        let kubeconfig = cloud
            .dir
            .path()
            .join(format!("node-{}.kubeconfig", self.name));
        self.agent = Some(Proc::spawn(
            &format!("agent of {}", self.name),
            Command::new(stratus_bin())
                .args(["agent", "--node", &self.name, "--libvirt-uri", &self.uri()])
                .args(["--heartbeat-seconds", "2"])
                // Tests serve their images from loopback (`FileServer`, `Guest`).
                .arg("--image-url-allow-loopback")
                .arg("--kubeconfig")
                .arg(kubeconfig)
                .arg("--state-dir")
                .arg(self.dir.path().join("state"))
                .args(args)
                .env(
                    "STRATUS_LOG",
                    "info,stratus_agents=debug,stratus_network_agent=debug",
                ),
            &self.dir.path().join("agent.log"),
        )?);
        Ok(())
    }

    /// Kills the agent at once (SIGKILL), as a crash would.
    pub fn kill_agent(&mut self) {
        if let Some(mut a) = self.agent.take() {
            a.kill();
        }
    }

    /// The agent's log so far.
    pub fn agent_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default()
    }

    /// The pty of domain `domain`'s serial console, as its live XML names it.
    pub fn console_pty(&self, domain: &str) -> Result<String> {
        let out = self.virsh(&["dumpxml", domain])?;
        let xml = String::from_utf8_lossy(&out.stdout);
        xml.split("<serial type='pty'>")
            .nth(1)
            .and_then(|s| s.split("<source path='").nth(1))
            .and_then(|s| s.split('\'').next())
            .map(str::to_string)
            .with_context(|| format!("no serial pty in {xml}"))
    }

    /// Types `command` (one line, safe to run again) on the shell of the test guest of
    /// server `uid` (domain `domain`) until `marker` shows on its console, at most `tries`
    /// times. QEMU reads the console only while its terminal is open: it stays open, and the
    /// command is typed again until its marker shows. Let the marker be computed by the
    /// command (`$((40+2))`), so that the echoed command is not it.
    pub fn type_until(
        &self,
        uid: &str,
        domain: &str,
        command: &str,
        marker: &str,
        tries: usize,
    ) -> Result<()> {
        use std::io::Write;
        wait_until(
            std::time::Duration::from_secs(240),
            "the guest's shell",
            || self.console(uid).contains("built-in shell").then_some(()),
        )
        .with_context(|| format!("console:\n{}", self.console(uid)))?;
        let mut pty = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(self.console_pty(domain)?)?;
        let typed = format!("\n{command}\n");
        for _ in 0..tries {
            std::thread::sleep(std::time::Duration::from_secs(2));
            pty.write_all(typed.as_bytes())?;
            let shown = wait_until(std::time::Duration::from_secs(30), marker, || {
                self.console(uid).contains(marker).then_some(())
            });
            if shown.is_ok() {
                return Ok(());
            }
        }
        bail!("{marker} never showed; console:\n{}", self.console(uid))
    }

    /// The serial console log of a domain, stripped of carriage returns.
    pub fn console(&self, uid: &str) -> String {
        std::fs::read_to_string(
            self.dir
                .path()
                .join("state/servers")
                .join(uid)
                .join("console.log"),
        )
        .unwrap_or_default()
        .replace('\r', "")
    }
}

impl Node {
    /// Waits up to `timeout` for the test guest of server `uid` to print the whole line of
    /// its lease on `iface` (`STRATUS-GUEST-DHCP IFACE IP`), and checks that it took `ip`.
    pub fn wait_lease(
        &self,
        uid: &str,
        iface: &str,
        ip: &str,
        timeout: std::time::Duration,
    ) -> Result<()> {
        let prefix = format!("STRATUS-GUEST-DHCP {iface} ");
        let console = wait_until(timeout, &format!("the lease of {iface}"), || {
            // The whole line: a console read while the guest writes it ends mid-line.
            let console = self.console(uid);
            let done = console
                .split_once(&prefix)
                .is_some_and(|(_, rest)| rest.contains('\n'));
            done.then_some(console)
        })
        .with_context(|| format!("console:\n{}", self.console(uid)))?;
        if !console.contains(&format!("{prefix}{ip}\n")) {
            bail!("the guest did not take {ip} on {iface}: {console}");
        }
        Ok(())
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill_agent();
        // Guests first (libvirtd's children), then the daemons.
        if let Ok(names) = self.domains() {
            for n in names {
                let _ = self.virsh(&["destroy", &n]);
            }
        }
        for pid_file in ["libvirtd.pid", "virtlogd.pid"] {
            if let Ok(pid) = std::fs::read_to_string(self.dir.path().join(pid_file)) {
                let _ = Command::new("kill").arg(pid.trim()).status();
            }
        }
        self.libvirtd.kill();
    }
}

/// A simulated node's libvirtd network namespace given the node's name, so that the node's
/// network agent works where QEMU's taps appear, with an underlay veth at an address the test
/// chooses. Dropped: the name goes, and so do the DHCP namespaces (and their dnsmasq) the
/// network agent left in the node's state directory.
pub struct NodeNetns {
    name: String,
    dhcp_dir: PathBuf,
}

impl Node {
    /// Names this node's libvirtd network namespace after the node and gives it the underlay
    /// `underlay` (`192.0.2.1/24`: an address of the test's own).
    pub fn netns(&self, underlay: &str) -> Result<NodeNetns> {
        let ns = self.named_netns()?;
        crate::net::lone_underlay(&self.name, underlay)?;
        Ok(ns)
    }

    /// Names this node's libvirtd network namespace after the node, without an underlay (the
    /// test joins it to another node's, e.g. with [`crate::net::underlay`]).
    pub fn named_netns(&self) -> Result<NodeNetns> {
        let pid = std::fs::read_to_string(self.dir.path().join("libvirtd.pid"))?;
        crate::ip(&["netns", "attach", &self.name, pid.trim()])?;
        Ok(NodeNetns {
            name: self.name.clone(),
            dhcp_dir: self.dir.path().join("state/network/dhcp"),
        })
    }

    /// Starts (or restarts) the node's agent with the compute and network roles, the network
    /// role in the namespace of [`Node::netns`] with tunnel address `tunnel`, and `extra`
    /// arguments (which may override the defaults: the network resyncs every second).
    pub fn start_compute_network_agent(
        &mut self,
        cloud: &Cloud,
        tunnel: &str,
        extra: &[&str],
    ) -> Result<()> {
        self.start_compute_network_agent_resyncing(cloud, tunnel, 1, extra)
    }

    /// Starts (or restarts) the node's agent as [`Node::start_compute_network_agent`] does,
    /// the network role reading the whole host every `resync` seconds.
    pub fn start_compute_network_agent_resyncing(
        &mut self,
        cloud: &Cloud,
        tunnel: &str,
        resync: u64,
        extra: &[&str],
    ) -> Result<()> {
        // The namespace is named as the node.
        let name = self.name.clone();
        let resync = resync.to_string();
        let network = [
            "--roles",
            "compute,network",
            "--network-namespace",
            &name,
            "--underlay-ip",
            tunnel,
            "--network-resync-seconds",
            &resync,
        ];
        self.spawn_agent(cloud, &[&network[..], extra].concat())
    }
}

impl Drop for NodeNetns {
    fn drop(&mut self) {
        crate::net::remove_dhcp_servers(&self.dhcp_dir);
        let _ = crate::ip(&["netns", "del", &self.name]);
    }
}

impl Node {
    /// Joins this node's network namespace (its libvirtd's) to the host's by a veth pair, as a
    /// storage network: `host_link` in the host's namespace with `host_address`, `node_link`
    /// in the node's with `node_address` (both `ADDRESS/PREFIX`), both up. A `host_link` left
    /// by an earlier run is removed first; the caller removes `host_link` when done (its peer
    /// goes with it).
    pub fn join_host(
        &self,
        host_link: &str,
        host_address: &str,
        node_link: &str,
        node_address: &str,
    ) -> Result<()> {
        let pid = std::fs::read_to_string(self.dir.path().join("libvirtd.pid"))?;
        let pid = pid.trim();
        let _ = crate::ip(&["link", "del", host_link]);
        crate::ip(&[
            "link", "add", host_link, "type", "veth", "peer", "name", node_link, "netns", pid,
        ])?;
        crate::ip(&["addr", "add", host_address, "dev", host_link])?;
        crate::ip(&["link", "set", host_link, "up"])?;
        self.ip(&["addr", "add", node_address, "dev", node_link])?;
        self.ip(&["link", "set", node_link, "up"])
    }

    /// Runs `ip ARGS` in this node's network namespace (its libvirtd's).
    pub fn ip(&self, args: &[&str]) -> Result<()> {
        let pid = std::fs::read_to_string(self.dir.path().join("libvirtd.pid"))?;
        let out = Command::new("nsenter")
            .args(["-t", pid.trim(), "-n", "ip"])
            .args(args)
            .output()
            .context("run nsenter")?;
        if !out.status.success() {
            bail!(
                "ip {args:?} in {}: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }
}

fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    let status = Command::new("cp")
        .arg("-a")
        .arg(format!("{}/.", from.display()))
        .arg(to)
        .status()?;
    if !status.success() {
        bail!("copy {} to {}", from.display(), to.display());
    }
    Ok(())
}

fn walk_dirs(root: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d)? {
            let e = e?;
            if e.file_type()?.is_dir() {
                todo.push(e.path());
                out.push(e.path());
            }
        }
    }
    Ok(out)
}

/// The test guest (kernel, initramfs, empty root disk), built once by scripts/build-guest.sh,
/// served over HTTP on 127.0.0.1 for Images to download.
/// A directory served over HTTP on loopback (Python's `http.server`), as Images' `source.url`
/// needs.
pub struct FileServer {
    _server: Proc,
    /// Base URL of the files.
    pub url: String,
}

impl FileServer {
    /// Serves `dir` on a free port, once it answers.
    pub fn serve(dir: &Path) -> Result<Self> {
        let port = free_port();
        let log = std::env::temp_dir().join(format!("file-server-{port}.log"));
        let server = Proc::spawn(
            "file server",
            Command::new("/usr/bin/python3")
                .args([
                    "-m",
                    "http.server",
                    "--bind",
                    "127.0.0.1",
                    &port.to_string(),
                ])
                .arg("--directory")
                .arg(dir),
            &log,
        )?;
        wait_until(STARTUP, "the file server", || {
            std::net::TcpStream::connect(("127.0.0.1", port))
                .ok()
                .map(|_| ())
        })?;
        Ok(Self {
            _server: server,
            url: format!("http://127.0.0.1:{port}"),
        })
    }
}

/// The test guest's files, served.
pub struct Guest {
    _server: FileServer,
    /// Base URL of the files.
    pub url: String,
    /// The directory served.
    pub dir: PathBuf,
}

impl Guest {
    /// Builds the guest if needed and serves it.
    pub fn serve() -> Result<Self> {
        let dir = repo_root().join("target/stratus-guest");
        let out = Command::new(repo_root().join("scripts/build-guest.sh"))
            .arg(&dir)
            .output()
            .context("run scripts/build-guest.sh")?;
        if !out.status.success() {
            bail!(
                "build-guest.sh failed:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let server = FileServer::serve(&dir)?;
        let url = server.url.clone();
        Ok(Self {
            _server: server,
            url,
            dir,
        })
    }

    /// The sha256 of one of the guest's files.
    pub fn sha256(&self, file: &str) -> Result<String> {
        let sums = std::fs::read_to_string(self.dir.join("SHA256SUMS"))?;
        sums.lines()
            .find_map(|l| {
                let (sum, name) = l.split_once("  ")?;
                (name == file).then(|| sum.to_string())
            })
            .with_context(|| format!("no checksum for {file}"))
    }

    /// YAML for the guest's three Images in `namespace` (public ones, so any project boots
    /// them): `tiny-kernel`, `tiny-initrd` and `tiny`, the disk image naming the other two.
    pub fn images_yaml(&self, namespace: &str) -> Result<String> {
        let image = |name: &str, file: &str, format: &str, extra: &str| -> Result<String> {
            Ok(format!(
                "---\napiVersion: image.stratus.dev/v1\nkind: Image\nmetadata:\n  name: {name}\n  namespace: {namespace}\nspec:\n  diskFormat: {format}\n  containerFormat: {container}\n  visibility: public\n  source:\n    url: {url}/{file}\n  sha256: {sum}\n{extra}",
                container = if format == "qcow2" { "bare" } else { format },
                url = self.url,
                sum = self.sha256(file)?,
            ))
        };
        Ok([
            image("tiny-kernel", "vmlinuz", "aki", "")?,
            image("tiny-initrd", "initrd.img", "ari", "")?,
            image(
                "tiny",
                "disk.qcow2",
                "qcow2",
                "  kernelImage: tiny-kernel\n  ramdiskImage: tiny-initrd\n  kernelCmdline: console=ttyS0 quiet\n",
            )?,
        ]
        .concat())
    }
}

impl Guest {
    /// [`Guest::images_yaml`], the guest giving a root shell on its console (for
    /// [`Node::type_until`]) and not checking its timer interrupt (a TCG guest starved of the
    /// CPU can miss that check and panic: "IO-APIC + timer doesn't work").
    pub fn shell_images_yaml(&self, namespace: &str) -> Result<String> {
        Ok(self.images_yaml(namespace)?.replace(
            "console=ttyS0 quiet",
            "console=ttyS0 quiet no_timer_check stratus.shell",
        ))
    }
}

impl Node {
    /// Starts (or restarts) the node's agent with the compute and network roles as
    /// [`Node::start_compute_network_agent_resyncing`] does (resyncing every 2 s, as a node
    /// runs it), on `datapath` with tunnel address `tunnel`, and `extra` arguments. On Open
    /// vSwitch the tunnel is put on the switch's underlay bridge (`--tunnel-interface
    /// underlay`: the userspace datapath sends VXLAN from there), and the node's switch is
    /// returned, to be dropped after the agent and before the node's namespace goes.
    pub fn start_agent_on(
        &mut self,
        cloud: &Cloud,
        datapath: crate::net::Datapath,
        tunnel: &str,
        extra: &[&str],
    ) -> Result<Option<crate::net::Switch>> {
        let ovs = datapath == crate::net::Datapath::Ovs;
        let mut args = vec!["--datapath", datapath.name()];
        if ovs {
            args.extend(["--tunnel-interface", "underlay"]);
        }
        args.extend_from_slice(extra);
        self.start_compute_network_agent_resyncing(cloud, tunnel, 2, &args)?;
        Ok(ovs.then(|| crate::net::Switch::of_state(&self.state_dir())))
    }
}
