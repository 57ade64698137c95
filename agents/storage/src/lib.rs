//! The storage agent: the node's StoragePools registered and heartbeated ([`pool`]), and the
//! Volumes and VolumeSnapshots placed on them made real on LVM or in files ([`driver`]), each
//! step decided by a pure [`plan`] and carried out by the reconcile loops in [`agent`].

pub mod agent;
pub mod driver;
pub mod export;
pub mod plan;
pub mod pool;
