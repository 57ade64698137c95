//! Leaf helpers every layer may use: API errors, field paths, object metadata, body decoding.

pub mod body;
pub mod encoded;
pub mod error;
pub mod field_path;
pub mod meta;
