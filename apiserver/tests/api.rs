//! The API server's verbs and admission, driven as the HTTP layer drives them, over the
//! in-memory store (`tests/store.rs` holds it to etcd's guarantees).

#[allow(dead_code)]
mod common;

mod api {
    pub mod admission;
    pub mod apply;
    pub mod attachments;
    pub mod etcd;
    pub mod exports;
    pub mod fixtures;
    pub mod identity;
    pub mod lifecycle;
    pub mod lists;
    pub mod multi_attach;
    pub mod network;
    pub mod node;
    pub mod object;
    pub mod policy;
    pub mod routers;
    pub mod server_ports;
    pub mod storage;
    pub mod verbs;
    pub mod watch;
}

use api::fixtures;
