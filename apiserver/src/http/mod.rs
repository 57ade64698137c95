//! The HTTP(S) front: serving, TLS, routing, discovery, OpenAPI, metrics, audit.

pub mod audit;
pub mod console;
pub mod dashboard;
pub mod discovery;
pub mod image_data;
pub mod image_token;
pub mod keystone;
pub mod limits;
pub mod login;
pub mod metrics;
pub mod nbd_pki;
pub mod protobuf;
pub mod response;
pub mod route;
pub mod server;
pub mod tls;
pub mod whoami;
