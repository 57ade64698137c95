//! Admission beyond the schema: quota and compute placement, checked in the write's own
//! etcd transaction.

pub mod binding;
pub mod quota;
