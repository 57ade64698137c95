//! A device (one disk of one storage server) as the ring builder places partitions on it.

use serde::{Deserialize, Serialize};

use crate::BuildError;

/// Longest `ip` accepted (an IPv6 address or a host name fits).
pub const MAX_IP_LEN: usize = 253;
/// Longest `device` name accepted.
pub const MAX_DEVICE_NAME_LEN: usize = 64;
/// Longest `meta` accepted.
pub const MAX_META_LEN: usize = 1024;
/// Largest weight accepted: far above any disk's size in GiB, small enough that sums of
/// thousands of weights stay exact in an `f64`.
pub const MAX_WEIGHT: f64 = 1e9;

/// A disk of a storage server: where it sits (region, zone, server) and its share of
/// partitions (`weight`, relative to the other devices).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Device {
    /// Region: the widest failure domain.
    pub region: u32,
    /// Zone within the region.
    pub zone: u32,
    /// Address of the storage server; devices with the same region, zone and ip are one host.
    pub ip: String,
    /// Port of the server.
    pub port: u16,
    /// Directory name of the disk under the server's devices root.
    pub device: String,
    /// Relative share of partitions; 0 drains the device.
    pub weight: f64,
    /// Free-form note kept in the ring.
    #[serde(default)]
    pub meta: String,
}

impl Device {
    /// A device with no `meta`.
    pub fn new(
        region: u32,
        zone: u32,
        ip: impl Into<String>,
        port: u16,
        device: impl Into<String>,
        weight: f64,
    ) -> Self {
        Device {
            region,
            zone,
            ip: ip.into(),
            port,
            device: device.into(),
            weight,
            meta: String::new(),
        }
    }

    /// Checks the fields Swift's ring and servers rely on.
    ///
    /// # Errors
    /// [`BuildError::InvalidDevice`] naming the field at fault.
    pub fn validate(&self) -> Result<(), BuildError> {
        validate_weight(self.weight)?;
        if self.ip.is_empty() || self.ip.len() > MAX_IP_LEN {
            return Err(invalid(
                "ip",
                format!("must be 1 to {MAX_IP_LEN} characters"),
            ));
        }
        if !self
            .ip
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | ':' | '-' | '[' | ']'))
        {
            return Err(invalid("ip", "must be an address or a host name".into()));
        }
        if self.port == 0 {
            return Err(invalid("port", "must be between 1 and 65535".into()));
        }
        if self.device.is_empty() || self.device.len() > MAX_DEVICE_NAME_LEN {
            return Err(invalid(
                "device",
                format!("must be 1 to {MAX_DEVICE_NAME_LEN} characters"),
            ));
        }
        if !self
            .device
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
            || self.device == "."
            || self.device == ".."
        {
            return Err(invalid(
                "device",
                "may hold only letters, digits, '_', '.' and '-' and is not '.' or '..'".into(),
            ));
        }
        if self.meta.len() > MAX_META_LEN || self.meta.chars().any(char::is_control) {
            return Err(invalid(
                "meta",
                format!("must be at most {MAX_META_LEN} characters without control characters"),
            ));
        }
        Ok(())
    }

    /// Whether `other` names the same disk (same server address, port and device name).
    pub fn same_disk(&self, other: &Device) -> bool {
        self.ip == other.ip && self.port == other.port && self.device == other.device
    }
}

pub(crate) fn validate_weight(weight: f64) -> Result<(), BuildError> {
    if weight.is_finite() && (0.0..=MAX_WEIGHT).contains(&weight) {
        Ok(())
    } else {
        Err(invalid(
            "weight",
            format!("must be a number from 0 to {MAX_WEIGHT}, not {weight}"),
        ))
    }
}

fn invalid(field: &'static str, reason: String) -> BuildError {
    BuildError::InvalidDevice { field, reason }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_fields_are_refused_by_name() {
        let good = Device::new(1, 1, "127.0.0.1", 6200, "sdb1", 100.0);
        assert_eq!(good.validate(), Ok(()));
        let cases: Vec<(&str, Device)> = vec![
            (
                "weight",
                Device {
                    weight: -1.0,
                    ..good.clone()
                },
            ),
            (
                "weight",
                Device {
                    weight: f64::NAN,
                    ..good.clone()
                },
            ),
            (
                "weight",
                Device {
                    weight: f64::INFINITY,
                    ..good.clone()
                },
            ),
            (
                "ip",
                Device {
                    ip: String::new(),
                    ..good.clone()
                },
            ),
            (
                "ip",
                Device {
                    ip: "1.2.3.4; rm -rf /".into(),
                    ..good.clone()
                },
            ),
            (
                "port",
                Device {
                    port: 0,
                    ..good.clone()
                },
            ),
            (
                "device",
                Device {
                    device: "../etc".into(),
                    ..good.clone()
                },
            ),
            (
                "device",
                Device {
                    device: "..".into(),
                    ..good.clone()
                },
            ),
            (
                "device",
                Device {
                    device: "a".repeat(65),
                    ..good.clone()
                },
            ),
            (
                "meta",
                Device {
                    meta: "x\ny".into(),
                    ..good.clone()
                },
            ),
        ];
        for (field, dev) in cases {
            match dev.validate() {
                Err(BuildError::InvalidDevice { field: f, .. }) => assert_eq!(f, field, "{dev:?}"),
                other => panic!("{dev:?}: {other:?}"),
            }
        }
    }
}
