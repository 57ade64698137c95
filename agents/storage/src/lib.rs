//! The storage agent: the node's StoragePools registered and heartbeated, and the Volumes
//! and VolumeSnapshots placed on them made real on LVM or in files ([`driver`]), each step
//! decided by a pure [`plan`] and carried out by the reconcile loop in [`agent`].

pub mod driver;
