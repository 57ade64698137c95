//! The Stratus API server: Kubernetes API conventions over etcd.

pub mod api;
pub mod audit;
pub mod binding;
pub mod body;
pub mod discovery;
pub mod error;
pub mod field_path;
pub mod fields;
pub mod hub;
pub mod identity;
pub mod meta;
pub mod metrics;
pub mod protobuf;
pub mod quota;
pub mod registry;
pub mod schema;
pub mod selector;
pub mod server;
pub mod store;
pub mod strategic;
pub mod table;
pub mod tls;
pub mod view;
pub mod watch;

pub use server::{Config, Server, start};
