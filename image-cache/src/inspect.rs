//! Image data inspected before QEMU sees it: the header read by hand first (so that `qemu-img`
//! never opens a file a hostile header names), then `qemu-img info` with the declared format
//! and again probing, under CPU, memory and time limits.

use std::fmt;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// qemu-img, run through `prlimit` with these limits (OpenStack's for `qemu-img info`).
const QEMU_IMG: &str = "qemu-img";
const PRLIMIT: &str = "/usr/bin/prlimit";
const ADDRESS_SPACE: &str = "--as=1073741824";
const CPU_SECONDS: &str = "--cpu=30";
/// Wall-clock bound of one `qemu-img info`.
const INSPECT_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest backing file name read from a qcow2 header for a message (qemu's own limit).
const MAX_BACKING_NAME: u64 = 1023;

/// The format an Image declares for its data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// A qcow2 disk.
    Qcow2,
    /// A raw disk.
    Raw,
    /// An ISO 9660 image (raw to QEMU).
    Iso,
    /// A kernel for direct boot (a raw file).
    Kernel,
    /// A ramdisk for direct boot (a raw file).
    Ramdisk,
}

impl Format {
    /// The format QEMU must see the data as.
    pub fn qemu_format(self) -> &'static str {
        match self {
            Self::Qcow2 => "qcow2",
            Self::Raw | Self::Iso | Self::Kernel | Self::Ramdisk => "raw",
        }
    }

    /// A name for cache file names and messages.
    pub fn name(self) -> &'static str {
        match self {
            Self::Qcow2 => "qcow2",
            Self::Raw => "raw",
            Self::Iso => "iso",
            Self::Kernel => "kernel",
            Self::Ramdisk => "ramdisk",
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Why image data is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unsafe {
    /// The image names a backing file (QEMU would read it).
    #[error("it has a backing file ({0:?})")]
    BackingFile(String),
    /// The image names an external data file (QEMU would read and write it).
    #[error("it has an external data file{}", .0.as_ref().map(|f| format!(" ({f:?})")).unwrap_or_default())]
    DataFile(Option<String>),
    /// The image refers to a protocol or `json:` file name.
    #[error("it refers to the file name {0:?}")]
    Protocol(String),
    /// The data is another format than the one declared.
    #[error("it is declared {declared} but its data is {found}")]
    FormatMismatch {
        /// The declared format.
        declared: Format,
        /// What the data is.
        found: String,
    },
    /// The disk's virtual size is over the limit.
    #[error("its virtual size {size} bytes is over the limit of {limit} bytes")]
    VirtualSizeTooLarge {
        /// The image's virtual size.
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// `qemu-img` cannot read it as its declared format.
    #[error("qemu-img cannot read it as {declared}: {message}")]
    Unreadable {
        /// The declared format.
        declared: Format,
        /// What qemu-img said.
        message: String,
    },
}

impl Unsafe {
    /// A condition reason for it.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::BackingFile(_) => "BackingFile",
            Self::DataFile(_) => "DataFile",
            Self::Protocol(_) => "ProtocolFileName",
            Self::FormatMismatch { .. } => "FormatMismatch",
            Self::VirtualSizeTooLarge { .. } => "VirtualSizeTooLarge",
            Self::Unreadable { .. } => "Unreadable",
        }
    }
}

/// Inspection that could not be done (not a verdict on the data).
#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    /// Reading the file failed.
    #[error("read {path}")]
    Read {
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// qemu-img could not be run.
    #[error("run qemu-img")]
    Spawn(#[source] io::Error),
    /// qemu-img ran longer than allowed.
    #[error("qemu-img info took longer than {0:?}")]
    Timeout(Duration),
}

/// Inspection's outcome: refused data, or inspection that could not be done.
#[derive(Debug, thiserror::Error)]
pub enum Verdict {
    /// The data is refused.
    #[error("refused: {0}")]
    Unsafe(#[from] Unsafe),
    /// Inspection failed; try again.
    #[error("inspect the image")]
    Failed(#[from] InspectError),
}

/// Checks that `path` (an absolute path) holds a self-contained image of format `declared`
/// whose virtual size is at most `max_virtual_size`.
///
/// # Errors
///
/// [`Verdict::Unsafe`] with the first reason found; [`Verdict::Failed`] when the file cannot
/// be read or qemu-img cannot be run.
pub fn inspect(path: &Path, declared: Format, max_virtual_size: u64) -> Result<(), Verdict> {
    sniff(path, declared)?;
    let info = qemu_img_info(path, Some(declared.qemu_format()), declared)?;
    check_info(&info, path, declared, max_virtual_size)?;
    // Only now that no header names another file may qemu-img guess the format.
    let probed = qemu_img_info(path, None, declared)?;
    let found = probed
        .get("format")
        .and_then(serde_json::Value::as_str)
        .unwrap_or("unknown");
    if found != declared.qemu_format() {
        return Err(Unsafe::FormatMismatch {
            declared,
            found: format!("{found} (qemu-img's probe)"),
        }
        .into());
    }
    check_info(&probed, path, declared, max_virtual_size)?;
    Ok(())
}

/// Magic numbers of the formats QEMU probes (besides raw), as Glance's format inspector
/// knows them: (offset, bytes, format).
const MAGICS: &[(usize, &[u8], &str)] = &[
    (0, b"QFI\xfb", "qcow2"),
    (0, b"QED\0", "qed"),
    (0, b"KDMV", "vmdk"),
    (0, b"COWD", "vmdk"),
    (0, b"# Disk DescriptorFile", "vmdk"),
    (0, b"vhdxfile", "vhdx"),
    (0, b"conectix", "vpc"),
    (0x40, b"\x7f\x10\xda\xbe", "vdi"),
    (0, b"LUKS\xba\xbe", "luks"),
    (0, b"WithoutFreeSpace", "parallels"),
    (0, b"WithouFreSpacExt", "parallels"),
    (0, b"Bochs Virtual HD Image", "bochs"),
    (0, b"#!/bin/sh\n#V2.0 Format", "cloop"),
];

/// Reads the header by hand: the format it announces, and for qcow2 its backing file and
/// external data file, which `qemu-img` would open.
fn sniff(path: &Path, declared: Format) -> Result<(), Verdict> {
    let read_err = |source| InspectError::Read {
        path: path.display().to_string(),
        source,
    };
    let mut file = File::open(path).map_err(read_err)?;
    let mut head = Vec::with_capacity(4096);
    (&mut file)
        .take(4096)
        .read_to_end(&mut head)
        .map_err(read_err)?;
    let found = MAGICS
        .iter()
        .find(|(at, magic, _)| head.get(*at..*at + magic.len()) == Some(*magic))
        .map(|(_, _, f)| *f);
    match (declared, found) {
        (Format::Qcow2, Some("qcow2")) => {}
        (_, None) if declared != Format::Qcow2 => return Ok(()),
        (_, found) => {
            return Err(Unsafe::FormatMismatch {
                declared,
                found: found.unwrap_or("not qcow2").to_owned(),
            }
            .into());
        }
    }
    let be32 = |at: usize| {
        head.get(at..at + 4)
            .and_then(|b| b.try_into().ok())
            .map(u32::from_be_bytes)
    };
    let be64 = |at: usize| {
        head.get(at..at + 8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_be_bytes)
    };
    let version = be32(4).unwrap_or(0);
    if version < 2 {
        return Err(Unsafe::FormatMismatch {
            declared,
            found: format!("qcow version {version}"),
        }
        .into());
    }
    let backing_offset = be64(8).unwrap_or(0);
    if backing_offset != 0 {
        let len = u64::from(be32(16).unwrap_or(0)).min(MAX_BACKING_NAME);
        let mut name = Vec::new();
        let read = file
            .seek(SeekFrom::Start(backing_offset))
            .and_then(|_| (&mut file).take(len).read_to_end(&mut name));
        let name = match read {
            Ok(_) => String::from_utf8_lossy(&name).into_owned(),
            Err(_) => "(unreadable)".to_owned(),
        };
        return Err(Unsafe::BackingFile(name).into());
    }
    // Version 3 headers have feature bits; bit 2 of the incompatible ones is "external data
    // file".
    if version >= 3 && be64(72).is_some_and(|features| features & (1 << 2) != 0) {
        return Err(Unsafe::DataFile(None).into());
    }
    Ok(())
}

/// `qemu-img info --output=json [-f FORMAT] PATH`, limited in memory, CPU and time.
fn qemu_img_info(
    path: &Path,
    format: Option<&str>,
    declared: Format,
) -> Result<serde_json::Value, Verdict> {
    let mut cmd = Command::new(PRLIMIT);
    cmd.args([
        ADDRESS_SPACE,
        CPU_SECONDS,
        "--",
        QEMU_IMG,
        "info",
        "--output=json",
    ]);
    if let Some(f) = format {
        cmd.args(["-f", f]);
    }
    cmd.arg(path)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(InspectError::Spawn)?;
    let started = Instant::now();
    loop {
        match child.try_wait().map_err(InspectError::Spawn)? {
            Some(_) => break,
            None if started.elapsed() > INSPECT_TIMEOUT => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(InspectError::Timeout(INSPECT_TIMEOUT).into());
            }
            None => std::thread::sleep(Duration::from_millis(20)),
        }
    }
    let out = child.wait_with_output().map_err(InspectError::Spawn)?;
    if !out.status.success() {
        let message = String::from_utf8_lossy(&out.stderr).trim().to_owned();
        return Err(Unsafe::Unreadable { declared, message }.into());
    }
    serde_json::from_slice(&out.stdout).map_err(|e| {
        Unsafe::Unreadable {
            declared,
            message: format!("qemu-img info printed no JSON: {e}"),
        }
        .into()
    })
}

/// Refuses what `qemu-img info` reports that a self-contained image of `declared` cannot have.
fn check_info(
    info: &serde_json::Value,
    path: &Path,
    declared: Format,
    max_virtual_size: u64,
) -> Result<(), Unsafe> {
    let text = |v: &serde_json::Value, key: &str| {
        v.get(key)
            .and_then(serde_json::Value::as_str)
            .map(str::to_owned)
    };
    for key in ["backing-filename", "full-backing-filename"] {
        if let Some(name) = text(info, key) {
            return Err(Unsafe::BackingFile(name));
        }
    }
    if let Some(data) = info.pointer("/format-specific/data/data-file") {
        return Err(Unsafe::DataFile(data.as_str().map(str::to_owned)));
    }
    if info
        .pointer("/format-specific/data/data-file-raw")
        .is_some()
    {
        return Err(Unsafe::DataFile(None));
    }
    let filename = text(info, "filename").unwrap_or_default();
    if filename != path.to_string_lossy() {
        return Err(Unsafe::Protocol(filename));
    }
    let format = text(info, "format").unwrap_or_default();
    if format != declared.qemu_format() {
        return Err(Unsafe::FormatMismatch {
            declared,
            found: format,
        });
    }
    let size = info
        .get("virtual-size")
        .and_then(serde_json::Value::as_u64)
        .unwrap_or(u64::MAX);
    if size > max_virtual_size {
        return Err(Unsafe::VirtualSizeTooLarge {
            size,
            limit: max_virtual_size,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    const LIMIT: u64 = 1 << 40;

    fn qemu_img(args: &[&str]) {
        let out = Command::new(QEMU_IMG)
            .args(args)
            .output()
            .expect("run qemu-img (scripts/setup.sh installs it)");
        assert!(
            out.status.success(),
            "qemu-img {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn path(dir: &tempfile::TempDir, name: &str) -> PathBuf {
        dir.path().join(name)
    }

    fn s(p: &Path) -> &str {
        p.to_str().expect("UTF-8 temp path")
    }

    fn refused(path: &Path, declared: Format) -> Unsafe {
        match inspect(path, declared, LIMIT) {
            Err(Verdict::Unsafe(u)) => u,
            other => panic!("{} as {declared}: {other:?}", path.display()),
        }
    }

    #[test]
    fn plain_images_pass() {
        let dir = tempfile::tempdir().expect("tempdir");
        let qcow = path(&dir, "disk.qcow2");
        qemu_img(&["create", "-q", "-f", "qcow2", s(&qcow), "64M"]);
        inspect(&qcow, Format::Qcow2, LIMIT).expect("a plain qcow2");
        let raw = path(&dir, "disk.raw");
        std::fs::write(&raw, vec![0u8; 1 << 20]).expect("write");
        for f in [Format::Raw, Format::Iso, Format::Kernel, Format::Ramdisk] {
            inspect(&raw, f, LIMIT).expect("a raw file");
        }
    }

    #[test]
    fn a_backing_file_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let hostile = path(&dir, "hostile.qcow2");
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-F",
            "raw",
            "-b",
            "/etc/passwd",
            s(&hostile),
            "1M",
        ]);
        assert_eq!(
            refused(&hostile, Format::Qcow2),
            Unsafe::BackingFile("/etc/passwd".into())
        );
        // Declared raw, it is a qcow2 all the same.
        assert!(matches!(
            refused(&hostile, Format::Raw),
            Unsafe::FormatMismatch { found, .. } if found == "qcow2"
        ));
        // A json: backing name is a backing file too.
        let json = path(&dir, "json.qcow2");
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-u",
            "-F",
            "raw",
            "-b",
            r#"json:{"driver":"raw","file":{"driver":"file","filename":"/etc/shadow"}}"#,
            s(&json),
            "1M",
        ]);
        assert!(matches!(
            refused(&json, Format::Qcow2),
            Unsafe::BackingFile(name) if name.starts_with("json:")
        ));
    }

    #[test]
    fn an_external_data_file_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let hostile = path(&dir, "data.qcow2");
        let data = path(&dir, "host-file");
        std::fs::write(&data, b"a host file").expect("write");
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &format!("data_file={},data_file_raw=on", s(&data)),
            s(&hostile),
            "1M",
        ]);
        assert_eq!(refused(&hostile, Format::Qcow2), Unsafe::DataFile(None));
    }

    #[test]
    fn formats_must_be_the_declared_ones() {
        let dir = tempfile::tempdir().expect("tempdir");
        let raw = path(&dir, "disk.raw");
        std::fs::write(&raw, vec![0u8; 1 << 20]).expect("write");
        assert!(matches!(
            refused(&raw, Format::Qcow2),
            Unsafe::FormatMismatch {
                declared: Format::Qcow2,
                ..
            }
        ));
        let qcow = path(&dir, "disk.qcow2");
        qemu_img(&["create", "-q", "-f", "qcow2", s(&qcow), "1M"]);
        for f in [Format::Raw, Format::Kernel, Format::Ramdisk, Format::Iso] {
            assert!(
                matches!(refused(&qcow, f), Unsafe::FormatMismatch { declared, ref found } if declared == f && found == "qcow2"),
                "{f}"
            );
        }
        // A vmdk descriptor naming a host file, declared a kernel: qemu-img never opens it.
        let vmdk = path(&dir, "kernel");
        std::fs::write(
            &vmdk,
            "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType=\"monolithicFlat\"\nRW 8 FLAT \"/etc/passwd\" 0\n",
        )
        .expect("write");
        assert!(matches!(
            refused(&vmdk, Format::Kernel),
            Unsafe::FormatMismatch { found, .. } if found == "vmdk"
        ));
        // Other formats qemu-img probes are refused as what qemu-img says they are.
        let qed = path(&dir, "disk.qed");
        qemu_img(&["create", "-q", "-f", "qed", s(&qed), "1M"]);
        assert!(matches!(
            refused(&qed, Format::Raw),
            Unsafe::FormatMismatch { found, .. } if found == "qed"
        ));
    }

    #[test]
    fn a_huge_virtual_size_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let qcow = path(&dir, "huge.qcow2");
        qemu_img(&["create", "-q", "-f", "qcow2", s(&qcow), "64T"]);
        assert_eq!(
            refused(&qcow, Format::Qcow2),
            Unsafe::VirtualSizeTooLarge {
                size: 64 << 40,
                limit: LIMIT
            }
        );
    }
}
