//! Swift rings: the ring builder (Swift's placement of partition replicas on devices by
//! failure domain and weight) and Swift's ring file format. No I/O beyond writing and
//! reading bytes.

mod builder;
mod device;
mod file;
mod plan;
mod rng;
mod tier;

pub use builder::{
    MAX_BALANCE, MAX_DEVICES, MAX_OVERLOAD, MAX_PART_POWER, MAX_REPLICAS, NONE_DEV, Rebalanced,
    RingBuilder,
};
pub use device::{Device, MAX_DEVICE_NAME_LEN, MAX_IP_LEN, MAX_META_LEN, MAX_WEIGHT};
pub use file::{MAX_HEADER_LEN, RingData, RingDevice, RingFileError};

/// Why a ring cannot be built or changed as asked.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum BuildError {
    #[error("partition power {0} is out of range (0 to {MAX_PART_POWER})")]
    PartPower(u8),
    #[error("replicas {0} is out of range (1 to {MAX_REPLICAS})")]
    Replicas(f64),
    #[error("overload {0} is out of range (0 to {MAX_OVERLOAD})")]
    Overload(f64),
    #[error("device {field}: {reason}")]
    InvalidDevice { field: &'static str, reason: String },
    #[error("device {ip}:{port}/{device} is already in the ring as id {id}")]
    DuplicateDevice {
        id: u16,
        ip: String,
        port: u16,
        device: String,
    },
    #[error("no device has id {0}")]
    NoSuchDevice(u16),
    #[error("device {0} is being removed")]
    DeviceRemoving(u16),
    #[error("a ring holds at most {MAX_DEVICES} devices")]
    TooManyDevices,
    #[error("{replicas} replicas need as many devices with weight above 0; the ring has {devices}")]
    NotEnoughDevices { replicas: f64, devices: usize },
    #[error("the ring has no device with weight")]
    Empty,
    #[error("the replica plan cannot be met: {0}")]
    Plan(String),
    #[error("builder state: {0}")]
    State(String),
}
