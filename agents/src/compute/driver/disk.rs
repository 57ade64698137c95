//! A guest's disk files: qcow2 overlays over cached images, and cloud-init config drives.
//!
//! Both shell out (`qemu-img`, `genisoimage`) with argument vectors, and both appear at their
//! final path only when complete (written under a temporary name in the same directory, then
//! linked or renamed into place).

use std::fs::File;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};

use serde::Serialize;

use super::DiskFormat;

/// The program that creates overlays.
const QEMU_IMG: &str = "qemu-img";
/// The program that builds config drive images.
const GENISOIMAGE: &str = "genisoimage";
/// Volume label cloud-init's NoCloud data source looks for.
pub const CONFIG_DRIVE_LABEL: &str = "cidata";
/// `user-data` when the Server has none: an empty cloud-config, which cloud-init accepts.
const EMPTY_USER_DATA: &[u8] = b"#cloud-config\n{}\n";

/// Failures creating disk files.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// A tool ran and failed.
    #[error("{command} failed ({status}): {stderr}")]
    Command {
        /// What was run, e.g. `qemu-img create`.
        command: &'static str,
        /// How it exited.
        status: ExitStatus,
        /// What it wrote to stderr.
        stderr: String,
    },
    /// A tool could not be started (not installed, not executable).
    #[error("could not run {command}")]
    Spawn {
        /// What was run.
        command: &'static str,
        /// Why it did not start.
        #[source]
        source: io::Error,
    },
    /// The overlay's path is taken; overlays hold guest data and are never overwritten.
    #[error("{} already exists", .0.display())]
    Exists(PathBuf),
    /// A file operation failed.
    #[error("{op} {}", path.display())]
    Io {
        /// The operation, e.g. `write`.
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A config drive file could not be serialised.
    #[error("serialise {file}")]
    Yaml {
        /// Which file: `meta-data` or `network-config`.
        file: &'static str,
        /// The cause.
        #[source]
        source: serde_saphyr::SerializeError,
    },
}

fn io_error<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> DiskError + 'a {
    move |source| DiskError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

/// Creates a qcow2 overlay at `path` backed by `base` (`qemu-img create -f qcow2 -F <fmt> -b
/// <base> <path> [<size>G]`).
///
/// `size_gib` 0 keeps the base's virtual size. Both paths are made absolute first: qcow2 would
/// otherwise record a backing path relative to the overlay, and `qemu-img` would read a path
/// starting with `-` as an option or one with a `:` before any `/` as a protocol.
///
/// # Errors
///
/// [`DiskError::Exists`] if `path` exists (it is left alone), [`DiskError::Command`] with
/// `qemu-img`'s stderr if it fails (missing base, size smaller than the base, …).
pub fn create_overlay(
    base: &Path,
    base_format: DiskFormat,
    path: &Path,
    size_gib: u64,
) -> Result<(), DiskError> {
    let base = std::path::absolute(base).map_err(io_error("resolve", base))?;
    let path = std::path::absolute(path).map_err(io_error("resolve", path))?;
    if path.symlink_metadata().is_ok() {
        return Err(DiskError::Exists(path));
    }
    let dir = parent(&path);
    let tmp = tempfile::Builder::new()
        .prefix(".overlay-")
        .tempfile_in(dir)
        .map_err(io_error("create a temporary file in", dir))?;
    let mut cmd = Command::new(QEMU_IMG);
    cmd.args([
        "create",
        "-q",
        "-f",
        "qcow2",
        "-F",
        format_name(base_format),
        "-b",
    ])
    .arg(&base)
    .arg(tmp.path());
    if size_gib > 0 {
        cmd.arg(format!("{size_gib}G"));
    }
    run("qemu-img create", &mut cmd)?;
    tmp.as_file()
        .sync_all()
        .map_err(io_error("sync", tmp.path()))?;
    // Link, not rename: an overlay that appeared meanwhile holds a guest's data.
    tmp.persist_noclobber(&path).map_err(|e| {
        if e.error.kind() == io::ErrorKind::AlreadyExists {
            DiskError::Exists(path.clone())
        } else {
            DiskError::Io {
                op: "move into place",
                path: path.clone(),
                source: e.error,
            }
        }
    })?;
    sync_dir(dir)
}

/// What goes on a cloud-init NoCloud config drive.
#[derive(Debug, Clone, Copy)]
pub struct ConfigDrive<'a> {
    /// `instance-id`: cloud-init reruns per-instance modules when it changes.
    pub instance_id: &'a str,
    /// `local-hostname`.
    pub hostname: &'a str,
    /// SSH public keys for the default user.
    pub public_keys: &'a [String],
    /// `user-data`, passed through untouched; `None` writes an empty cloud-config.
    pub user_data: Option<&'a [u8]>,
    /// `network-config` (version 1 or 2), written as YAML when given.
    pub network_config: Option<&'a serde_json::Value>,
}

/// NoCloud `meta-data`.
#[derive(Serialize)]
struct MetaData<'a> {
    #[serde(rename = "instance-id")]
    instance_id: &'a str,
    #[serde(rename = "local-hostname")]
    local_hostname: &'a str,
    #[serde(rename = "public-keys")]
    public_keys: &'a [String],
}

/// Writes `drive` as an ISO 9660 image (volume id `cidata`, Joliet and Rock Ridge) at `path`,
/// replacing any previous image there in one rename.
///
/// # Errors
///
/// [`DiskError::Command`] with `genisoimage`'s stderr, [`DiskError::Yaml`], or
/// [`DiskError::Io`] for the staging files.
pub fn write_config_drive(path: &Path, drive: &ConfigDrive) -> Result<(), DiskError> {
    let path = std::path::absolute(path).map_err(io_error("resolve", path))?;
    let dir = parent(&path);

    let meta = MetaData {
        instance_id: drive.instance_id,
        local_hostname: drive.hostname,
        public_keys: drive.public_keys,
    };
    let meta = yaml(&meta).map_err(|source| DiskError::Yaml {
        file: "meta-data",
        source,
    })?;
    let network = drive
        .network_config
        .map(yaml)
        .transpose()
        .map_err(|source| DiskError::Yaml {
            file: "network-config",
            source,
        })?;

    // Staged next to the image rather than in /tmp: user-data may hold secrets, and the
    // staging directory is private (0700) and removed on drop.
    let staging = tempfile::Builder::new()
        .prefix(".cidata-")
        .tempdir_in(dir)
        .map_err(io_error("create a staging directory in", dir))?;
    let mut files = vec![
        stage(staging.path(), "meta-data", meta.as_bytes())?,
        stage(
            staging.path(),
            "user-data",
            drive.user_data.unwrap_or(EMPTY_USER_DATA),
        )?,
    ];
    if let Some(network) = &network {
        files.push(stage(staging.path(), "network-config", network.as_bytes())?);
    }

    let tmp = tempfile::Builder::new()
        .prefix(".cidata-")
        .suffix(".iso")
        .tempfile_in(dir)
        .map_err(io_error("create a temporary file in", dir))?;
    let mut cmd = Command::new(GENISOIMAGE);
    cmd.args([
        "-quiet",
        "-input-charset",
        "utf-8",
        "-volid",
        CONFIG_DRIVE_LABEL,
    ])
    .args(["-joliet", "-rock", "-output"])
    .arg(tmp.path())
    // Files given one by one land at the image's root under their own names.
    .args(&files);
    run("genisoimage", &mut cmd)?;
    tmp.as_file()
        .sync_all()
        .map_err(io_error("sync", tmp.path()))?;
    tmp.persist(&path).map_err(|e| DiskError::Io {
        op: "move into place",
        path: path.clone(),
        source: e.error,
    })?;
    sync_dir(dir)
}

fn stage(dir: &Path, name: &str, contents: &[u8]) -> Result<PathBuf, DiskError> {
    let file = dir.join(name);
    std::fs::write(&file, contents).map_err(io_error("write", &file))?;
    Ok(file)
}

fn format_name(format: DiskFormat) -> &'static str {
    match format {
        DiskFormat::Qcow2 => "qcow2",
        DiskFormat::Raw => "raw",
    }
}

/// The directory holding `path` (which is absolute, so it has one unless it is `/`).
fn parent(path: &Path) -> &Path {
    path.parent().unwrap_or(Path::new("/"))
}

/// Grows the disk image at `path` to `size_gib` GiB if it is smaller (`qemu-img resize`);
/// never shrinks it, since the guest's file system would lose data. Returns whether it grew.
///
/// # Errors
///
/// [`DiskError::Command`] with `qemu-img`'s stderr if reading or resizing the image fails.
pub fn grow(path: &Path, size_gib: u64) -> Result<bool, DiskError> {
    let path = std::path::absolute(path).map_err(io_error("resolve", path))?;
    let current = image_info(&path)?
        .get("virtual-size")
        .and_then(serde_json::Value::as_u64)
        .unwrap_or(0);
    let wanted = size_gib << 30;
    if wanted <= current {
        return Ok(false);
    }
    run(
        "qemu-img resize",
        Command::new(QEMU_IMG)
            .args(["resize", "-q"])
            .arg(&path)
            .arg(format!("{size_gib}G")),
    )?;
    Ok(true)
}

/// The node's real disks: files under the agent's state directory, made with `qemu-img` and
/// `genisoimage` (the functions above).
#[derive(Debug, Clone, Copy, Default)]
pub struct HostDisks;

impl super::Disks for HostDisks {
    fn root_disk(
        &self,
        base: &Path,
        base_format: DiskFormat,
        path: &Path,
        size_gib: u64,
        fresh: bool,
    ) -> Result<(), DiskError> {
        let dir = parent(path);
        private_dir(dir)?;
        if fresh {
            match std::fs::remove_file(path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_error("remove", path)(e)),
            }
        }
        if path.exists() {
            // A resize to a flavor with a larger disk grows the root disk (never shrinks it).
            grow(path, size_gib)?;
        } else {
            create_overlay(base, base_format, path, size_gib)?;
        }
        owner_only(path)
    }

    fn config_drive(&self, path: &Path, drive: &ConfigDrive) -> Result<(), DiskError> {
        private_dir(parent(path))?;
        write_config_drive(path, drive)?;
        // It carries the tenant's user data and keys.
        owner_only(path)
    }

    fn inspect(&self, path: &Path) -> Result<Option<super::DiskInfo>, DiskError> {
        if !path.exists() {
            return Ok(None);
        }
        let path = std::path::absolute(path).map_err(io_error("resolve", path))?;
        let v = image_info(&path)?;
        Ok(Some(super::DiskInfo {
            virtual_size: v
                .get("virtual-size")
                .and_then(serde_json::Value::as_u64)
                .unwrap_or(0),
            backing: v
                .get("full-backing-filename")
                .or_else(|| v.get("backing-filename"))
                .and_then(serde_json::Value::as_str)
                .map(PathBuf::from),
        }))
    }

    fn remove_dir(&self, dir: &Path) -> Result<(), DiskError> {
        match std::fs::remove_dir_all(dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_error("remove", dir)(e)),
        }
    }
}

/// What `qemu-img info` says of the image at `path` (absolute): its JSON, `null` if that
/// does not parse. `-U`: the image may be open in a running guest.
fn image_info(path: &Path) -> Result<serde_json::Value, DiskError> {
    let info = run_output(
        "qemu-img info",
        Command::new(QEMU_IMG)
            .args(["info", "--output=json", "-U"])
            .arg(path),
    )?;
    Ok(serde_json::from_slice(&info).unwrap_or_default())
}

/// Makes `dir` (and its parents) exist, with `dir` itself readable by its owner only: a
/// guest's disks hold the tenant's data. (QEMU runs as root on a Stratus node.)
fn private_dir(dir: &Path) -> Result<(), DiskError> {
    std::fs::create_dir_all(dir).map_err(io_error("create", dir))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(io_error("chmod", dir))
}

/// Makes `path` readable and writable by its owner only.
fn owner_only(path: &Path) -> Result<(), DiskError> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(io_error("chmod", path))
}

/// Makes a rename in `dir` durable.
fn sync_dir(dir: &Path) -> Result<(), DiskError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_error("sync", dir))
}

fn run(command: &'static str, cmd: &mut Command) -> Result<(), DiskError> {
    run_output(command, cmd).map(|_| ())
}

/// Runs `cmd`; its standard output when it succeeds.
fn run_output(command: &'static str, cmd: &mut Command) -> Result<Vec<u8>, DiskError> {
    let output = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|source| DiskError::Spawn { command, source })?;
    if output.status.success() {
        Ok(output.stdout)
    } else {
        Err(DiskError::Command {
            command,
            status: output.status,
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        })
    }
}

/// YAML with every string on one line (plain or quoted): what the simplest readers of a
/// config drive (a shell script in a test guest, early boot code) handle, and cloud-init too.
fn yaml<T: serde::Serialize>(v: &T) -> Result<String, serde_saphyr::SerializeError> {
    let mut options = serde_saphyr::SerializerOptions::default();
    options.prefer_block_scalars = false;
    serde_saphyr::to_string_with_options(v, options)
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;

    #[test]
    fn host_disks_pass_the_disks_suite() {
        let dir = tempfile::tempdir().expect("tempdir");
        let base = super::super::conformance::raw_base(dir.path(), 64);
        let servers = dir.path().join("servers");
        super::super::conformance::disks(&HostDisks, &base, DiskFormat::Raw, &servers);
    }

    #[test]
    fn a_guests_disks_are_readable_by_their_owner_only() {
        use super::super::Disks;
        let dir = tempfile::tempdir().expect("tempdir");
        let base = super::super::conformance::raw_base(dir.path(), 16);
        let guest = dir.path().join("servers/g");
        let root = guest.join("root.qcow2");
        let config = guest.join("config.iso");
        HostDisks
            .root_disk(&base, DiskFormat::Raw, &root, 1, false)
            .expect("root disk");
        let keys = ["ssh-ed25519 AAAA k".to_string()];
        HostDisks
            .config_drive(
                &config,
                &ConfigDrive {
                    instance_id: "i",
                    hostname: "h",
                    public_keys: &keys,
                    user_data: Some(b"secret"),
                    network_config: None,
                },
            )
            .expect("config drive");
        let mode = |p: &Path| std::fs::metadata(p).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode(&guest), 0o700);
        assert_eq!(mode(&root), 0o600);
        assert_eq!(mode(&config), 0o600);
    }

    #[test]
    fn grow_enlarges_but_never_shrinks() {
        let dir = tempfile::tempdir().expect("tempdir");
        let base = dir.path().join("base.qcow2");
        let out = Command::new(QEMU_IMG)
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&base)
            .arg("64M")
            .output()
            .expect("qemu-img");
        assert!(out.status.success());
        let disk = dir.path().join("root.qcow2");
        create_overlay(&base, DiskFormat::Qcow2, &disk, 1).expect("overlay");
        assert!(grow(&disk, 2).expect("grow"));
        assert_eq!(qemu_img_info(&disk)["virtual-size"], json!(2u64 << 30));
        assert!(!grow(&disk, 1).expect("no shrink"));
        assert_eq!(qemu_img_info(&disk)["virtual-size"], json!(2u64 << 30));
    }

    fn qemu_img_info(path: &Path) -> Value {
        let out = Command::new(QEMU_IMG)
            .args(["info", "--output=json", "-U"])
            .arg(path)
            .output()
            .expect("run qemu-img info");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("qemu-img info JSON")
    }

    fn make_base(dir: &Path, name: &str, format: &str, size: &str) -> PathBuf {
        let base = dir.join(name);
        let status = Command::new(QEMU_IMG)
            .args(["create", "-q", "-f", format])
            .arg(&base)
            .arg(size)
            .status()
            .expect("run qemu-img create");
        assert!(status.success());
        base
    }

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    #[test]
    fn overlay_keeps_the_base_size_or_grows() {
        let dir = tempfile::tempdir().expect("tempdir");
        let base = make_base(dir.path(), "base image.qcow2", "qcow2", "64M");

        let same = dir.path().join("same.qcow2");
        create_overlay(&base, DiskFormat::Qcow2, &same, 0).expect("overlay");
        let info = qemu_img_info(&same);
        assert_eq!(info["format"], "qcow2");
        assert_eq!(info["virtual-size"], 64 * MIB);
        assert_eq!(info["backing-filename"], base.to_str().expect("utf-8"));
        assert_eq!(info["backing-filename-format"], "qcow2");

        let grown = dir.path().join("grown.qcow2");
        create_overlay(&base, DiskFormat::Qcow2, &grown, 2).expect("overlay");
        let info = qemu_img_info(&grown);
        assert_eq!(info["virtual-size"], 2 * GIB);
        assert_eq!(info["backing-filename"], base.to_str().expect("utf-8"));

        let raw = make_base(dir.path(), "-raw:base", "raw", "32M");
        let over_raw = dir.path().join("over-raw.qcow2");
        create_overlay(&raw, DiskFormat::Raw, &over_raw, 1).expect("overlay of raw");
        let info = qemu_img_info(&over_raw);
        assert_eq!(info["backing-filename"], raw.to_str().expect("utf-8"));
        assert_eq!(info["backing-filename-format"], "raw");
        assert_eq!(info["virtual-size"], GIB);

        // Only the three overlays and two bases: no temporary files left behind.
        assert_eq!(std::fs::read_dir(dir.path()).expect("read dir").count(), 5);
    }

    #[test]
    fn overlay_never_overwrites() {
        let dir = tempfile::tempdir().expect("tempdir");
        let base = make_base(dir.path(), "base.qcow2", "qcow2", "16M");
        let path = dir.path().join("root.qcow2");
        std::fs::write(&path, b"guest data").expect("write");
        assert!(matches!(
            create_overlay(&base, DiskFormat::Qcow2, &path, 0),
            Err(DiskError::Exists(p)) if p == path
        ));
        assert_eq!(std::fs::read(&path).expect("read"), b"guest data");
    }

    #[test]
    fn overlay_failure_reports_qemu_img_stderr() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("root.qcow2");
        let err = create_overlay(&dir.path().join("missing"), DiskFormat::Qcow2, &path, 1)
            .expect_err("missing base");
        match &err {
            DiskError::Command {
                command, stderr, ..
            } => {
                assert_eq!(*command, "qemu-img create");
                assert!(stderr.contains("missing"), "{stderr}");
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(
            err.to_string().starts_with("qemu-img create failed"),
            "{err}"
        );
        assert!(!path.exists());
        assert_eq!(std::fs::read_dir(dir.path()).expect("read dir").count(), 0);
    }

    /// A file from the image, by its Rock Ridge name.
    fn iso_file(iso: &Path, name: &str) -> Vec<u8> {
        let out = Command::new("isoinfo")
            .args(["-R", "-i"])
            .arg(iso)
            .args(["-x", name])
            .output()
            .expect("run isoinfo");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    }

    fn iso_listing(iso: &Path) -> Vec<String> {
        let out = Command::new("isoinfo")
            .args(["-R", "-f", "-i"])
            .arg(iso)
            .output()
            .expect("run isoinfo");
        assert!(out.status.success());
        let mut names: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_owned)
            .collect();
        names.sort();
        names
    }

    fn volume_id(iso: &Path) -> String {
        let out = Command::new("isoinfo")
            .args(["-d", "-i"])
            .arg(iso)
            .output()
            .expect("run isoinfo");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find_map(|l| l.strip_prefix("Volume id: "))
            .map(|v| v.trim().to_owned())
            .unwrap_or_default()
    }

    #[test]
    fn config_drive_round_trips_hostile_values() {
        let dir = tempfile::tempdir().expect("tempdir");
        let iso = dir.path().join("config.iso");
        let hostname = "evil: yes\n- injected: true\n# comment\n'\"{}[]&*!|>%@`";
        let keys = vec![
            "ssh-ed25519 AAAAC3Nza key: one".to_owned(),
            "no".to_owned(),
            "~".to_owned(),
        ];
        let user_data: &[u8] = b"#cloud-config\nruncmd: [\"echo '<&>' \\\"x\\\"\"]\n\0\xff";
        let network = json!({
            "version": 2,
            "ethernets": {"eth0": {"match": {"macaddress": "52:54:00:12:34:56"},
                                   "dhcp4": true, "addresses": ["10.0.0.5/24"],
                                   "nameservers": {"search": ["null", "0x10", "true"]}}}
        });
        let drive = ConfigDrive {
            instance_id: "i-0123: &anchor",
            hostname,
            public_keys: &keys,
            user_data: Some(user_data),
            network_config: Some(&network),
        };
        write_config_drive(&iso, &drive).expect("write config drive");

        assert_eq!(volume_id(&iso), CONFIG_DRIVE_LABEL);
        assert_eq!(
            iso_listing(&iso),
            ["/meta-data", "/network-config", "/user-data"]
        );
        let meta: Value = serde_saphyr::from_slice(&iso_file(&iso, "/meta-data")).expect("YAML");
        assert_eq!(
            meta,
            json!({
                "instance-id": "i-0123: &anchor",
                "local-hostname": hostname,
                "public-keys": keys,
            })
        );
        assert_eq!(iso_file(&iso, "/user-data"), user_data);
        let net: Value =
            serde_saphyr::from_slice(&iso_file(&iso, "/network-config")).expect("YAML");
        assert_eq!(net, network);

        // Rewriting replaces the image; nothing else is left in the directory.
        let drive = ConfigDrive {
            user_data: None,
            network_config: None,
            ..drive
        };
        write_config_drive(&iso, &drive).expect("rewrite config drive");
        assert_eq!(iso_listing(&iso), ["/meta-data", "/user-data"]);
        assert_eq!(iso_file(&iso, "/user-data"), EMPTY_USER_DATA);
        assert_eq!(std::fs::read_dir(dir.path()).expect("read dir").count(), 1);
    }
}
