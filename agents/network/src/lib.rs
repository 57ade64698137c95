//! The Stratus network agent: makes one node's bridges, VXLAN devices, nftables ruleset and
//! DHCP servers match the networks and ports placed on it. `driver` holds the host APIs
//! behind traits.

pub mod driver;
