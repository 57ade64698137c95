//! The object agent: one node's Swift account, container and object servers and their
//! replicators, updaters and auditors, run and supervised from configuration files generated
//! by [`config`] (through the escaping-safe [`ini`] writer), with each ObjectRing's current
//! version installed as its ring file, and the cluster's hash path prefix and suffix from
//! [`hash`] as their `swift.conf`; the next step decided by the pure [`plan`], carried out
//! by [`agent`] through the [`driver`], and reported on the node's ObjectNode.

pub mod agent;
pub mod config;
pub mod driver;
pub mod filter;
pub mod hash;
pub mod ini;
pub mod plan;
pub mod recon;
