//! Moving volume data: copies between regions, zeroing a region, the size of an image.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;

use serde::Deserialize;

use super::loopdev::Region;
use super::{DriverError, Format, cmd, io};

/// How much a copy moves at a time.
const CHUNK: usize = 1 << 20;

/// Copies the first `len` bytes of `from` to the start of `to`, then flushes `to` to disk.
/// `to` must read as zeroes already ([`zero`]): runs of zeroes are not written, so a
/// sparse backing file stays sparse.
///
/// # Errors
/// A read or write failed, or `len` is longer than either region.
pub fn copy(from: &Region, to: &Region, len: u64) -> Result<(), DriverError> {
    if len > from.len || len > to.len {
        return Err(DriverError::Invalid(format!(
            "a copy of {len} bytes from a region of {} into one of {}",
            from.len, to.len
        )));
    }
    let src = File::open(&from.path).map_err(io("open", &from.path))?;
    let dst = OpenOptions::new()
        .write(true)
        .open(&to.path)
        .map_err(io("open", &to.path))?;
    let mut buf = vec![0u8; CHUNK];
    let mut done = 0u64;
    while done < len {
        let n = usize::try_from((len - done).min(CHUNK as u64)).unwrap_or(CHUNK);
        src.read_exact_at(&mut buf[..n], from.offset + done)
            .map_err(io("read", &from.path))?;
        if buf[..n].iter().any(|b| *b != 0) {
            dst.write_all_at(&buf[..n], to.offset + done)
                .map_err(io("write", &to.path))?;
        }
        done += n as u64;
    }
    dst.sync_all().map_err(io("flush", &to.path))
}

/// Writes zeroes over `region` of a block device (the kernel's `BLKZEROOUT`, through
/// `blkdiscard --zeroout`: a loop device over a file punches the range out of it).
///
/// # Errors
/// blkdiscard failed.
pub fn zero(region: &Region) -> Result<(), DriverError> {
    if region.len == 0 {
        return Ok(());
    }
    cmd::run(
        "blkdiscard",
        [
            "--force".as_ref(),
            "--zeroout".as_ref(),
            "--offset".as_ref(),
            region.offset.to_string().as_ref(),
            "--length".as_ref(),
            region.len.to_string().as_ref(),
            region.path.as_os_str(),
        ] as [&std::ffi::OsStr; 7],
    )
    .map(drop)
}

/// Flushes what was written to the device or file at `path` to disk (a volume's loop device
/// before its data is read from beneath it).
///
/// # Errors
/// It could not be opened or flushed.
pub fn flush(path: &Path) -> Result<(), DriverError> {
    File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(io("flush", path))
}

#[derive(Deserialize)]
struct Info {
    #[serde(rename = "virtual-size")]
    virtual_size: u64,
}

/// The size of the disk the image at `path` holds (`qemu-img info`), read as `format`.
///
/// # Errors
/// qemu-img failed or its report did not parse.
pub fn virtual_size(path: &Path, format: Format) -> Result<u64, DriverError> {
    let out = cmd::run(
        "qemu-img",
        [
            "info".as_ref(),
            "--output=json".as_ref(),
            "-f".as_ref(),
            format.qemu_format().as_ref(),
            path.as_os_str(),
        ] as [&std::ffi::OsStr; 5],
    )?;
    let info: Info =
        serde_json::from_slice(&out).map_err(|e| DriverError::Report("qemu-img", e))?;
    Ok(info.virtual_size)
}

/// Writes the disk of the image at `path` (in `format`) onto the existing `target` (a block
/// device or raw file) as raw data, without creating or truncating it.
///
/// # Errors
/// qemu-img failed.
pub fn convert_onto(path: &Path, format: Format, target: &Path) -> Result<(), DriverError> {
    cmd::run(
        "qemu-img",
        [
            "convert".as_ref(),
            "-n".as_ref(),
            "-f".as_ref(),
            format.qemu_format().as_ref(),
            "-O".as_ref(),
            "raw".as_ref(),
            path.as_os_str(),
            target.as_os_str(),
        ] as [&std::ffi::OsStr; 8],
    )
    .map(drop)?;
    flush(target)
}

/// Refuses an image whose disk is larger than a volume of `size` bytes.
///
/// # Errors
/// [`DriverError::Invalid`] when it does not fit; qemu-img's errors.
pub fn check_fits(path: &Path, format: Format, size: u64) -> Result<u64, DriverError> {
    let need = virtual_size(path, format)?;
    if need > size {
        return Err(DriverError::Invalid(format!(
            "the image's disk is {need} bytes, larger than the volume's {size}"
        )));
    }
    Ok(need)
}
