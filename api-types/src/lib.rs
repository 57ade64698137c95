//! Stratus resource kinds: every kind's Spec and Status, their CRDs (schemas, printer columns,
//! selectable fields) and the I/O-free validation JSON Schema cannot express.
#![warn(missing_docs)]

pub mod common;
pub mod compute;
pub mod identity;
pub mod image;
pub mod network;
pub mod object;
pub mod placement;
pub mod ports;
pub mod quota;
pub mod storage;
pub mod validate;

pub use validate::{FieldError, validate};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

/// Every Stratus kind's CustomResourceDefinition (one served+storage version `v1`, status
/// subresource), in a stable order: by group, then kind as listed in the design.
pub fn crds() -> Vec<CustomResourceDefinition> {
    vec![
        identity::Project::crd(),
        identity::User::crd(),
        identity::RoleAssignment::crd(),
        identity::Quota::crd(),
        identity::S3Credential::crd(),
        compute::Flavor::crd(),
        compute::Hypervisor::crd(),
        compute::Server::crd(),
        compute::Keypair::crd(),
        compute::ServerGroup::crd(),
        image::Image::crd(),
        network::Network::crd(),
        network::Subnet::crd(),
        network::Port::crd(),
        network::Router::crd(),
        network::FloatingIP::crd(),
        network::SecurityGroup::crd(),
        storage::Volume::crd(),
        storage::VolumeSnapshot::crd(),
        storage::StoragePool::crd(),
        storage::VolumeExport::crd(),
        object::ObjectRing::crd(),
        object::ObjectRingVersion::crd(),
        object::ObjectNode::crd(),
    ]
}

#[cfg(test)]
mod tests;
