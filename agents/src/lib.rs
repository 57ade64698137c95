//! Stratus per-node agents: reconcilers that make one node's host match the objects placed on
//! it. Each domain splits into `driver` (a handle over the host API) and the reconcile logic
//! that uses it through a trait.

pub mod compute;
