//! The Stratus API server: Kubernetes API conventions over etcd.
//!
//! # Layers
//! Top to bottom; a layer uses itself and the layers below it, never one above
//! (`tests/layers.rs` fails on a new upward use, or on axum outside `http`).
//!
//! - [`http`]: serving, TLS, routing, reading a request once into its typed form, bodies in and
//!   responses out (verb [`resource::outcome::Outcome`]s and [`base::error::ApiError`]s),
//!   discovery, OpenAPI, metrics, audit, view serving. The only layer that knows axum.
//! - [`policy`]: who is asking ([`policy::authn`], tokens in [`policy::identity`]) and what they
//!   may do: roles ([`policy::roles`], the api-types `Role`), the node authorizer
//!   ([`policy::node`]), the typed request they decide on ([`policy::request`]).
//! - [`resource`]: the served types (registry, schemas, views), metadata rules, selectors,
//!   server-side apply, strategic merge, Table rendering, watch, and the verbs
//!   ([`resource::verbs`]) answering [`resource::outcome::Outcome`]s.
//! - [`admission`]: the [`admission::Admission`] trait, registered per resource type, and its
//!   implementations (quota, compute binding): checks and claims in the write's transaction.
//!   It sees objects as [`admission::Subject`]s, not as resource types.
//! - [`storage`]: etcd: the store and its transactions, the key layout, the identity marker,
//!   the shared watch feeds (hub).
//! - [`base`]: leaves every layer may use: `ApiError`, field paths, object metadata helpers,
//!   body decoding.

pub mod admission;
pub mod base;
pub mod http;
pub mod policy;
pub mod resource;
pub mod storage;

pub use http::server::{Config, Server, start};
