//! Objects in etcd: the store and its transactions, and the shared watch feeds.

pub mod hub;
pub mod keys;
pub mod store;
