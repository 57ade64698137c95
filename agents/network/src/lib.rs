//! The Stratus network agent: makes one node's bridges, VXLAN devices, nftables ruleset and
//! DHCP servers match the networks and ports placed on it. `driver` holds the host APIs
//! behind traits; `desired` turns the API's objects into what the node should have, `plan`
//! diffs that against what it has, and `agent` runs the loop.

pub mod agent;
pub mod desired;
pub mod driver;
pub mod metadata;
pub mod plan;

#[cfg(test)]
mod host_tests;

pub use agent::{Config, Host, run};
