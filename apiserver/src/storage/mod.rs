//! Objects in etcd: the store and its transactions, the key-value backends it runs them on
//! (etcd, or memory for tests), the shared watch feeds and the watch cache they keep.

pub mod cache;
pub mod etcd;
pub mod hub;
pub mod keys;
pub mod kv;
pub mod memory;
pub mod migrate;
pub mod store;
