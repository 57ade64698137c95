//! Swift's ring file, format 1 (`RingData.serialize_v1`): gzip of the magic `R1NG`, a
//! big-endian u16 format version (1), a big-endian u32 length and that many bytes of JSON
//! (devices, `part_shift`, `replica_count`, `byteorder`, `version`), then each replica's row
//! of device ids, a u16 per partition in the byte order the header names.

use std::io::{self, Read, Write};

use flate2::Compression;
use flate2::GzBuilder;
use flate2::read::GzDecoder;
use serde::{Deserialize, Serialize};

use crate::builder::{MAX_PART_POWER, MAX_REPLICAS};

const MAGIC: &[u8; 4] = b"R1NG";
const FORMAT_VERSION: u16 = 1;
/// The gzip header's modification time Swift writes, so that equal rings are equal bytes.
const GZIP_MTIME: u32 = 1_300_507_380;
/// Largest JSON header read (65,535 devices of a few hundred bytes each fit).
pub const MAX_HEADER_LEN: u32 = 64 << 20;

/// A device as the ring file lists it (Swift's device dict).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct RingDevice {
    /// Directory name of the disk under the server's devices root.
    pub device: String,
    /// Index of the device in `devs`, the id the replica rows use.
    pub id: u16,
    /// Address of the storage server.
    pub ip: String,
    /// Free-form note.
    #[serde(default)]
    pub meta: String,
    /// Port of the server.
    pub port: u16,
    /// Region (rings from before regions have none: 1).
    #[serde(default = "one")]
    pub region: u32,
    /// Address replication traffic goes to (ours: `ip`).
    #[serde(default)]
    pub replication_ip: String,
    /// Port replication traffic goes to (ours: `port`).
    #[serde(default)]
    pub replication_port: u16,
    /// Relative share of partitions.
    pub weight: f64,
    /// Zone within the region.
    pub zone: u32,
}

fn one() -> u32 {
    1
}

/// What a ring file holds: what Swift's servers and proxy need to find a partition's devices.
#[derive(Clone, Debug, PartialEq)]
pub struct RingData {
    /// Devices by id; `None` for an id not in use.
    pub devs: Vec<Option<RingDevice>>,
    /// 32 minus the partition power: a hash's top bits are its partition.
    pub part_shift: u8,
    /// Replica → partition → device id. The last row may be shorter (a fractional replica).
    pub replica2part2dev: Vec<Vec<u16>>,
    /// The builder's version.
    pub version: Option<u64>,
}

/// The JSON header, keys in the sorted order Swift writes them.
#[derive(Serialize, Deserialize)]
struct Header {
    byteorder: String,
    devs: Vec<Option<RingDevice>>,
    part_shift: u8,
    replica_count: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    version: Option<u64>,
}

/// A ring file that could not be read.
#[derive(Debug, thiserror::Error)]
pub enum RingFileError {
    #[error("read ring file")]
    Io(#[from] io::Error),
    #[error("not a ring file (no R1NG magic)")]
    Magic,
    #[error("ring file format {0} is not supported (only 1)")]
    Format(u16),
    #[error("ring file header of {0} bytes is over the limit")]
    HeaderTooLong(u32),
    #[error("ring file header")]
    Header(#[source] serde_json::Error),
    #[error("ring file: {0}")]
    Invalid(String),
}

impl RingData {
    /// Partitions in the ring.
    pub fn parts(&self) -> usize {
        1usize << (32 - u32::from(self.part_shift))
    }

    /// Writes the ring in format 1, gzipped, to `out`.
    ///
    /// # Errors
    /// What writing to `out` returns.
    pub fn write_v1<W: Write>(&self, out: W) -> io::Result<()> {
        let mut gz = GzBuilder::new()
            .mtime(GZIP_MTIME)
            .write(out, Compression::default());
        let header = serde_json::to_vec(&Header {
            byteorder: "little".into(),
            devs: self.devs.clone(),
            part_shift: self.part_shift,
            replica_count: self.replica2part2dev.len(),
            version: self.version,
        })
        .map_err(io::Error::other)?;
        let len = u32::try_from(header.len()).map_err(io::Error::other)?;
        gz.write_all(MAGIC)?;
        gz.write_all(&FORMAT_VERSION.to_be_bytes())?;
        gz.write_all(&len.to_be_bytes())?;
        gz.write_all(&header)?;
        for row in &self.replica2part2dev {
            let bytes: Vec<u8> = row.iter().flat_map(|d| d.to_le_bytes()).collect();
            gz.write_all(&bytes)?;
        }
        gz.finish()?.flush()
    }

    /// Reads a gzipped format-1 ring file, with bounds on every length it declares.
    ///
    /// # Errors
    /// [`RingFileError`] naming what is wrong.
    pub fn read_v1<R: Read>(input: R) -> Result<Self, RingFileError> {
        let mut gz = GzDecoder::new(input);
        let mut magic = [0u8; 4];
        gz.read_exact(&mut magic)?;
        if &magic != MAGIC {
            return Err(RingFileError::Magic);
        }
        let mut word = [0u8; 2];
        gz.read_exact(&mut word)?;
        let format = u16::from_be_bytes(word);
        if format != FORMAT_VERSION {
            return Err(RingFileError::Format(format));
        }
        let mut len = [0u8; 4];
        gz.read_exact(&mut len)?;
        let len = u32::from_be_bytes(len);
        if len > MAX_HEADER_LEN {
            return Err(RingFileError::HeaderTooLong(len));
        }
        let mut header = Vec::new();
        (&mut gz).take(u64::from(len)).read_to_end(&mut header)?;
        if header.len() != len as usize {
            return Err(RingFileError::Invalid("the header is cut short".into()));
        }
        let header: Header = serde_json::from_slice(&header).map_err(RingFileError::Header)?;
        let big = match header.byteorder.as_str() {
            "little" => false,
            "big" => true,
            other => return Err(RingFileError::Invalid(format!("byteorder {other:?}"))),
        };
        if header.part_shift > 32 || 32 - header.part_shift > MAX_PART_POWER {
            return Err(RingFileError::Invalid(format!(
                "part_shift {} (partition power above {MAX_PART_POWER})",
                header.part_shift
            )));
        }
        if header.replica_count as f64 > MAX_REPLICAS {
            return Err(RingFileError::Invalid(format!(
                "replica_count {}",
                header.replica_count
            )));
        }
        let parts = 1usize << (32 - u32::from(header.part_shift));
        let mut rows = Vec::with_capacity(header.replica_count);
        for replica in 0..header.replica_count {
            let mut bytes = Vec::with_capacity(parts * 2);
            (&mut gz).take(parts as u64 * 2).read_to_end(&mut bytes)?;
            let last = replica + 1 == header.replica_count;
            if bytes.len() % 2 != 0 || (!last && bytes.len() != parts * 2) {
                return Err(RingFileError::Invalid(format!(
                    "replica {replica}'s row is cut short"
                )));
            }
            rows.push(
                bytes
                    .chunks_exact(2)
                    .map(|c| {
                        let b = [c[0], c[1]];
                        if big {
                            u16::from_be_bytes(b)
                        } else {
                            u16::from_le_bytes(b)
                        }
                    })
                    .collect::<Vec<u16>>(),
            );
        }
        for (i, dev) in header.devs.iter().enumerate() {
            if let Some(dev) = dev
                && usize::from(dev.id) != i
            {
                return Err(RingFileError::Invalid(format!(
                    "device {i} says id {}",
                    dev.id
                )));
            }
        }
        if let Some(dev) = rows.iter().flatten().find(|d| {
            header
                .devs
                .get(usize::from(**d))
                .is_none_or(Option::is_none)
        }) {
            return Err(RingFileError::Invalid(format!(
                "a partition is on device {dev}, not listed"
            )));
        }
        Ok(RingData {
            devs: header.devs,
            part_shift: header.part_shift,
            replica2part2dev: rows,
            version: header.version,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring() -> RingData {
        let dev = |id: u16, zone: u32| RingDevice {
            device: format!("sd{id}"),
            id,
            ip: "127.0.0.1".into(),
            meta: String::new(),
            port: 6200,
            region: 1,
            replication_ip: "127.0.0.1".into(),
            replication_port: 6200,
            weight: 100.0,
            zone,
        };
        RingData {
            devs: vec![Some(dev(0, 1)), None, Some(dev(2, 2))],
            part_shift: 30,
            replica2part2dev: vec![vec![0, 2, 0, 2], vec![2, 0, 2]],
            version: Some(7),
        }
    }

    #[test]
    fn a_written_ring_reads_back_the_same() {
        let mut bytes = Vec::new();
        ring().write_v1(&mut bytes).expect("as the test set it up");
        assert_eq!(
            RingData::read_v1(&bytes[..]).expect("as the test set it up"),
            ring()
        );
    }

    #[test]
    fn the_layout_is_swifts() {
        let mut bytes = Vec::new();
        ring().write_v1(&mut bytes).expect("as the test set it up");
        let mut raw = Vec::new();
        GzDecoder::new(&bytes[..])
            .read_to_end(&mut raw)
            .expect("as the test set it up");
        assert_eq!(&raw[..6], b"R1NG\x00\x01");
        let len = u32::from_be_bytes([raw[6], raw[7], raw[8], raw[9]]) as usize;
        let header: serde_json::Value =
            serde_json::from_slice(&raw[10..10 + len]).expect("as the test set it up");
        assert_eq!(header["byteorder"], "little");
        assert_eq!(header["part_shift"], 30);
        assert_eq!(header["replica_count"], 2);
        assert_eq!(header["devs"][1], serde_json::Value::Null);
        assert_eq!(header["devs"][2]["replication_port"], 6200);
        // Row 0 then the short row 1, u16 little-endian.
        assert_eq!(
            &raw[10 + len..],
            &[0, 0, 2, 0, 0, 0, 2, 0, 2, 0, 0, 0, 2, 0]
        );
    }

    #[test]
    fn damaged_files_are_refused_not_trusted() {
        let mut good = Vec::new();
        ring().write_v1(&mut good).expect("as the test set it up");
        let mut raw = Vec::new();
        GzDecoder::new(&good[..])
            .read_to_end(&mut raw)
            .expect("as the test set it up");
        let gz = |raw: &[u8]| {
            let mut out = GzBuilder::new().write(Vec::new(), Compression::fast());
            out.write_all(raw).expect("as the test set it up");
            out.finish().expect("as the test set it up")
        };
        let mut huge_header = raw.clone();
        huge_header[6..10].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(
            RingData::read_v1(&gz(&huge_header)[..]),
            Err(RingFileError::HeaderTooLong(_))
        ));
        let mut magic = raw.clone();
        magic[0] = b'X';
        assert!(matches!(
            RingData::read_v1(&gz(&magic)[..]),
            Err(RingFileError::Magic)
        ));
        let cut = &raw[..raw.len() - 9];
        assert!(matches!(
            RingData::read_v1(&gz(cut)[..]),
            Err(RingFileError::Invalid(_))
        ));
        let mut bad_dev = raw.clone();
        let n = bad_dev.len();
        bad_dev[n - 2] = 9; // a partition on device 9, which is not listed
        assert!(matches!(
            RingData::read_v1(&gz(&bad_dev)[..]),
            Err(RingFileError::Invalid(_))
        ));
    }
}
