//! Served resource types and the verbs on them: registry, schemas, metadata rules, selectors,
//! server-side apply, patches, watch.

pub mod fields;
pub mod outcome;
pub mod pagination;
pub mod registry;
pub mod review;
pub mod schema;
pub mod selector;
pub mod strategic;
pub mod table;
pub mod verbs;
pub mod view;
pub mod watch;
