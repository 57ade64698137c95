//! Objects in etcd: the store and its transactions, the key-value backends it runs them on
//! (etcd, or memory for tests), and the shared watch feeds.

pub mod etcd;
pub mod hub;
pub mod keys;
pub mod kv;
pub mod memory;
pub mod store;
