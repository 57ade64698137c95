//! The Stratus API server: Kubernetes API conventions over etcd.

pub mod admission;
pub mod base;
pub mod http;
pub mod policy;
pub mod resource;
pub mod storage;

pub use http::server::{Config, Server, start};
