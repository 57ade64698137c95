//! The node's object storage configuration (from `stratus agent`'s flags) and the Swift
//! account, container and object servers' configuration files generated from it, through
//! [`Ini`](crate::ini::Ini): a value that could break out of its line is refused, never
//! written.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use stratus_api_types::object::RingType;

use crate::ini::{Ini, IniError};

/// A device's directory name under the devices root (a ring device's `device`): what the
/// ObjectRing schema allows.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct DeviceName(String);

impl DeviceName {
    /// `name`, if it is 1 to 64 of letters, digits, `_`, `.` and `-`, and not `.` or `..`.
    ///
    /// # Errors
    /// Why it is not a device name.
    pub fn new(name: &str) -> Result<Self, String> {
        let ok = !name.is_empty()
            && name.len() <= 64
            && name != "."
            && name != ".."
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
        if ok {
            Ok(Self(name.to_owned()))
        } else {
            Err(format!(
                "{name:?} is not a device name (1 to 64 letters, digits, '_', '.', '-')"
            ))
        }
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::str::FromStr for DeviceName {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::new(s)
    }
}

/// The ports the node's servers listen on (Swift's defaults: 6202, 6201, 6200).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ports {
    /// The account server's.
    pub account: u16,
    /// The container server's.
    pub container: u16,
    /// The object server's.
    pub object: u16,
}

impl Default for Ports {
    fn default() -> Self {
        Self {
            account: 6202,
            container: 6201,
            object: 6200,
        }
    }
}

impl Ports {
    /// The port of `kind`'s server.
    pub fn of(&self, kind: RingType) -> u16 {
        match kind {
            RingType::Account => self.account,
            RingType::Container => self.container,
            RingType::Object => self.object,
        }
    }
}

/// How the node runs Swift.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeConfig {
    /// The node's name (its ObjectNode).
    pub node: String,
    /// The address the servers listen on (the ring devices' `ip`).
    pub ip: Ipv4Addr,
    /// Their ports.
    pub ports: Ports,
    /// The directory holding one directory per device (Swift's `devices`).
    pub devices_dir: PathBuf,
    /// The node's devices.
    pub devices: Vec<DeviceName>,
    /// Whether a device must be a mount point to be used (Swift's `mount_check`); off for
    /// devices that are plain directories.
    pub mount_check: bool,
    /// Where the agent keeps the rings (Swift's `swift_dir`), the configuration files, the
    /// recon cache and the servers' logs.
    pub state_dir: PathBuf,
    /// Seconds between replication passes.
    pub replication_interval: u32,
    /// The user the servers run as (Swift's `user`): the devices and the state directory
    /// must be writable by it.
    pub user: String,
    /// The cluster's hash path prefix and suffix ([`crate::hash`]): the same file on every
    /// node of the cluster, made here at the first start when there is none.
    pub hash_file: PathBuf,
}

/// The rsync daemon's process name (and program).
pub const RSYNC: &str = "rsync";

/// The port of the rsync daemon (Swift's replicators name no other: `{replication_ip}::account`).
pub const RSYNC_PORT: u16 = 873;

/// The server types, in the order they are started.
pub const KINDS: [RingType; 3] = [RingType::Account, RingType::Container, RingType::Object];

/// `account`, `container` or `object`.
pub fn kind_name(kind: RingType) -> &'static str {
    match kind {
        RingType::Account => "account",
        RingType::Container => "container",
        RingType::Object => "object",
    }
}

/// The background daemons of `kind`'s server, by the suffix of their program
/// (`swift-object-replicator`).
pub fn daemons(kind: RingType) -> &'static [&'static str] {
    match kind {
        RingType::Account => &["replicator", "auditor", "reaper"],
        RingType::Container => &["replicator", "updater", "auditor"],
        RingType::Object => &["replicator", "updater", "auditor"],
    }
}

/// The background daemons' nice value (the servers keep 0).
pub const DAEMON_NICE: i32 = 10;

/// A configuration value that cannot be written.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A path that is not absolute or not UTF-8.
    #[error("{0}: must be an absolute UTF-8 path")]
    Path(PathBuf),
    /// A value the ini writer refuses.
    #[error(transparent)]
    Ini(#[from] IniError),
    /// No device.
    #[error("the object role needs at least one device")]
    NoDevice,
    /// Two devices of one name, or two servers on one port.
    #[error("{0}")]
    Duplicate(String),
}

fn path_str(p: &Path) -> Result<&str, ConfigError> {
    match p.to_str() {
        Some(s) if p.is_absolute() => Ok(s),
        _ => Err(ConfigError::Path(p.to_owned())),
    }
}

impl NodeConfig {
    /// Refuses what no server could run with: relative paths, no or repeated devices, two
    /// servers on one port.
    ///
    /// # Errors
    /// The first problem found.
    pub fn check(&self) -> Result<(), ConfigError> {
        path_str(&self.devices_dir)?;
        path_str(&self.state_dir)?;
        path_str(&self.hash_file)?;
        if self.devices.is_empty() {
            return Err(ConfigError::NoDevice);
        }
        let names: std::collections::BTreeSet<_> = self.devices.iter().collect();
        if names.len() != self.devices.len() {
            return Err(ConfigError::Duplicate("a device is named twice".into()));
        }
        let p = self.ports;
        if p.account == p.container || p.account == p.object || p.container == p.object {
            return Err(ConfigError::Duplicate(
                "the account, container and object servers need a port each".into(),
            ));
        }
        Ok(())
    }

    /// Where the ring files go (Swift's `swift_dir`).
    pub fn swift_dir(&self) -> PathBuf {
        self.state_dir.join("swift")
    }

    /// The node's `swift.conf` (its servers see it at Swift's fixed path).
    pub fn swift_conf_path(&self) -> PathBuf {
        self.swift_dir().join("swift.conf")
    }

    /// Where the replicators' progress is kept (Swift's `recon_cache_path`).
    pub fn recon_dir(&self) -> PathBuf {
        self.state_dir.join("recon")
    }

    /// Where the servers' and daemons' output goes.
    pub fn log_dir(&self) -> PathBuf {
        self.state_dir.join("log")
    }

    /// The configuration file of `kind`'s server and daemons.
    pub fn conf_path(&self, kind: RingType) -> PathBuf {
        self.state_dir
            .join(format!("{}-server.conf", kind_name(kind)))
    }

    /// The rsync daemon's configuration file.
    pub fn rsyncd_path(&self) -> PathBuf {
        self.state_dir.join("rsyncd.conf")
    }

    /// The rsync daemon's configuration (Swift's documented `rsyncd.conf`): on the node's
    /// address, modules `account` and `container` writing into the devices root, through
    /// which the account and container replicators copy a whole database to a node that lacks
    /// it. The object replicators use `ssync` and need none.
    ///
    /// # Errors
    /// A path or value that cannot be written.
    pub fn rsyncd_conf(&self) -> Result<String, ConfigError> {
        // Global parameters come before any section; rsync ignores blanks in a parameter's
        // name (`read only` is `readonly`), which keeps each key a plain name.
        let mut ini = Ini::new();
        ini.set("address", self.ip)?
            .set("port", RSYNC_PORT)?
            .set("uid", &self.user)?
            .set("usechroot", "no")?
            .set("logfile", path_str(&self.log_dir().join("rsyncd.log"))?)?;
        for kind in [RingType::Account, RingType::Container] {
            let name = kind_name(kind);
            ini.section(name)?
                .set("path", path_str(&self.devices_dir)?)?
                .set("readonly", "false")?
                .set("maxconnections", 8)?
                .set(
                    "lockfile",
                    path_str(&self.state_dir.join(format!("rsync-{name}.lock")))?,
                )?;
        }
        Ok(ini.finish())
    }

    /// The configuration file of `kind`'s server and its daemons.
    ///
    /// # Errors
    /// A path or value that cannot be written.
    pub fn server_conf(&self, kind: RingType) -> Result<String, ConfigError> {
        let name = kind_name(kind);
        let mut ini = Ini::new();
        ini.section("DEFAULT")?
            .set("bind_ip", self.ip)?
            .set("bind_port", self.ports.of(kind))?
            // One process: the agent supervises what it started, no forked workers.
            .set("workers", 0)?
            .set("user", &self.user)?
            .set("devices", path_str(&self.devices_dir)?)?
            .set("mount_check", self.mount_check)?
            .set("swift_dir", path_str(&self.swift_dir())?)?
            .set("recon_cache_path", path_str(&self.recon_dir())?)?
            .set("log_name", format!("{name}-server"))?;
        ini.section("pipeline:main")?
            .set("pipeline", format!("healthcheck recon {name}-server"))?;
        ini.section(&format!("app:{name}-server"))?
            .set("use", format!("egg:swift#{name}"))?;
        ini.section("filter:healthcheck")?
            .set("use", "egg:swift#healthcheck")?;
        ini.section("filter:recon")?.set("use", "egg:swift#recon")?;
        for daemon in daemons(kind) {
            // Background work yields the CPU and the disk to the servers answering requests
            // (Swift's own `nice_priority` and `ionice_class`, read by its daemons alone):
            // a pass that runs while clients wait takes longer instead of slowing them.
            ini.section(&format!("{name}-{daemon}"))?
                .set("nice_priority", DAEMON_NICE)?
                .set("ionice_class", "IOPRIO_CLASS_BE")?
                .set("ionice_priority", 7)?;
            match *daemon {
                "replicator" => {
                    ini.set("interval", self.replication_interval)?;
                    if kind == RingType::Object {
                        // Over the object servers' own SSYNC verb: no rsync daemon needed.
                        ini.set("sync_method", "ssync")?;
                    }
                }
                "updater" | "reaper" => {
                    ini.set("interval", self.replication_interval)?;
                }
                _ => {}
            }
        }
        Ok(ini.finish())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn config() -> NodeConfig {
        NodeConfig {
            node: "o1".into(),
            ip: Ipv4Addr::new(127, 0, 0, 2),
            ports: Ports::default(),
            devices_dir: "/srv/node".into(),
            devices: vec![DeviceName::new("d1").expect("name")],
            mount_check: false,
            state_dir: "/var/lib/stratus/object".into(),
            replication_interval: 30,
            user: "root".into(),
            hash_file: "/etc/stratus/swift-hash".into(),
        }
    }

    #[test]
    fn the_object_server_conf_names_its_address_devices_rings_and_daemons() {
        let text = config().server_conf(RingType::Object).expect("conf");
        for line in [
            "[DEFAULT]\nbind_ip = 127.0.0.2\nbind_port = 6200\nworkers = 0\nuser = root\ndevices = /srv/node\nmount_check = false\nswift_dir = /var/lib/stratus/object/swift\n",
            "recon_cache_path = /var/lib/stratus/object/recon\n",
            "[pipeline:main]\npipeline = healthcheck recon object-server\n",
            "[app:object-server]\nuse = egg:swift#object\n",
            "[object-replicator]\nnice_priority = 10\nionice_class = IOPRIO_CLASS_BE\nionice_priority = 7\ninterval = 30\nsync_method = ssync\n",
            "[object-updater]\nnice_priority = 10\n",
            "[object-auditor]\nnice_priority = 10\n",
        ] {
            assert!(text.contains(line), "{line:?} not in\n{text}");
        }
        let account = config().server_conf(RingType::Account).expect("conf");
        assert!(account.contains("bind_port = 6202\n"));
        assert!(account.contains("[account-reaper]\n"));
        assert!(!account.contains("sync_method"));
        assert!(account.contains("[account-reaper]\nnice_priority = 10\n"));
        // The servers themselves run at the normal priority.
        let default = text.split("[pipeline:main]").next().unwrap_or_default();
        assert!(!default.contains("nice"), "{default}");
    }

    #[test]
    fn the_rsyncd_conf_serves_account_and_container_modules_on_the_node_address() {
        let text = config().rsyncd_conf().expect("conf");
        assert!(
            text.starts_with("address = 127.0.0.2\nport = 873\nuid = root\n"),
            "{text}"
        );
        for module in ["account", "container"] {
            let section = format!(
                "[{module}]\npath = /srv/node\nreadonly = false\nmaxconnections = 8\nlockfile = /var/lib/stratus/object/rsync-{module}.lock\n"
            );
            assert!(text.contains(&section), "{section:?} not in\n{text}");
        }
        assert!(!text.contains("[object]"));
        let mut c = config();
        c.devices_dir = "/srv/node\n[account]\npath = /".into();
        assert!(c.rsyncd_conf().is_err());
    }

    #[test]
    fn bad_values_are_refused_not_written() {
        let mut c = config();
        c.devices_dir = "/srv/node\n[DEFAULT]\nuser = nobody".into();
        assert!(matches!(
            c.server_conf(RingType::Object),
            Err(ConfigError::Ini(_))
        ));
        let mut c = config();
        c.devices_dir = "/srv/%(here)s".into();
        assert!(c.server_conf(RingType::Object).is_err());
        let mut c = config();
        c.state_dir = "relative".into();
        assert!(matches!(c.check(), Err(ConfigError::Path(_))));
        let mut c = config();
        c.devices.clear();
        assert!(matches!(c.check(), Err(ConfigError::NoDevice)));
        let mut c = config();
        c.devices.push(DeviceName::new("d1").expect("name"));
        assert!(matches!(c.check(), Err(ConfigError::Duplicate(_))));
        let mut c = config();
        c.ports.container = c.ports.object;
        assert!(matches!(c.check(), Err(ConfigError::Duplicate(_))));
        assert!(config().check().is_ok());
    }

    #[test]
    fn device_names_are_plain_directory_names() {
        for good in ["sdb1", "d-1", "a.b_c"] {
            assert!(DeviceName::new(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            ".",
            "..",
            "a/b",
            "../etc",
            "a b",
            "x\n",
            &"a".repeat(65),
        ] {
            assert!(DeviceName::new(bad).is_err(), "{bad:?}");
        }
    }
}
