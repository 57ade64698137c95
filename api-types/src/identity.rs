//! Group `identity.stratus.dev`: projects, users, role assignments and quotas (Keystone's job,
//! plus the Nova/Neutron/Cinder quota limits).

// kube's `printcolumn(...)`/`selectable` repeat keys by design; clippy reads that as duplicates.
#![allow(clippy::duplicated_attributes)]

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{Condition, NAME_PATTERN, default_true};

/// A project: the unit of ownership and quota. Each Project owns the namespace of the same name
/// (`kubectl -n demo get servers` lists project demo's servers).
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "identity.stratus.dev",
    version = "v1",
    kind = "Project",
    status = "ProjectStatus",
    derive = "PartialEq",
    shortname = "proj",
    category = "stratus",
    doc = "A project (Keystone project): owns the namespace of the same name.",
    printcolumn(name = "Status", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Enabled", type_ = "boolean", json_path = ".spec.enabled"),
    printcolumn(
        name = "Description",
        type_ = "string",
        json_path = ".spec.description",
        priority = 1
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProjectSpec {
    /// Free-form description shown to users.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 255))]
    pub description: Option<String>,
    /// A disabled project keeps its resources, but its members can no longer authenticate into it.
    #[serde(default = "default_true")]
    pub enabled: bool,
}

/// Lifecycle phase of a Project.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum ProjectPhase {
    /// The project's namespace exists and the project is usable.
    #[default]
    Active,
    /// The project is being deleted; its resources are being removed.
    Terminating,
}

/// Observed state of a Project.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProjectStatus {
    /// Lifecycle phase.
    #[serde(default)]
    pub phase: ProjectPhase,
    /// Latest observations of the project's state.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// The `metadata.generation` this status was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// A user who can authenticate to Stratus.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "identity.stratus.dev",
    version = "v1",
    kind = "User",
    status = "UserStatus",
    derive = "PartialEq",
    shortname = "usr",
    category = "stratus",
    doc = "A user (Keystone user). Credentials are managed separately.",
    printcolumn(
        name = "Display Name",
        type_ = "string",
        json_path = ".spec.displayName"
    ),
    printcolumn(
        name = "Email",
        type_ = "string",
        json_path = ".spec.email",
        priority = 1
    ),
    printcolumn(name = "Enabled", type_ = "boolean", json_path = ".spec.enabled"),
    printcolumn(name = "Status", type_ = "string", json_path = ".status.phase"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UserSpec {
    /// Human-readable name; the object name is the login name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 255))]
    pub display_name: Option<String>,
    /// Contact address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(email, length(max = 254))]
    pub email: Option<String>,
    /// A disabled user cannot authenticate; existing tokens stop working.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Project (namespace) selected when the user does not name one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63), regex(pattern = crate::common::LABEL_PATTERN))]
    pub default_project: Option<String>,
}

/// Lifecycle phase of a User.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum UserPhase {
    /// The user can authenticate.
    #[default]
    Active,
    /// The user is disabled (`spec.enabled: false`).
    Disabled,
}

/// Observed state of a User.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UserStatus {
    /// Lifecycle phase.
    #[serde(default)]
    pub phase: UserPhase,
    /// Latest observations of the user's state.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// The `metadata.generation` this status was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// Grants a role to a user in this object's project (namespace), or cluster-wide.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "identity.stratus.dev",
    version = "v1",
    kind = "RoleAssignment",
    namespaced,
    status = "RoleAssignmentStatus",
    derive = "PartialEq",
    shortname = "ra",
    category = "stratus",
    selectable = ".spec.user",
    doc = "A role assignment (Keystone role assignment): user + role in a project.",
    printcolumn(name = "User", type_ = "string", json_path = ".spec.user"),
    printcolumn(name = "Role", type_ = "string", json_path = ".spec.role"),
    printcolumn(
        name = "Cluster-Wide",
        type_ = "boolean",
        json_path = ".spec.clusterWide",
        priority = 1
    ),
    printcolumn(name = "Status", type_ = "string", json_path = ".status.phase"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RoleAssignmentSpec {
    /// Name of the User granted the role.
    #[schemars(length(min = 1, max = 253), regex(pattern = NAME_PATTERN))]
    pub user: String,
    /// The role granted.
    pub role: Role,
    /// Grant the role in every project instead of only this object's namespace. Only an admin
    /// with a cluster-wide admin assignment may create such an assignment.
    #[serde(default)]
    pub cluster_wide: bool,
}

/// A role: what a user may do in a project.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Everything, including quotas and other users' role assignments.
    Admin,
    /// Create, change and delete the project's resources.
    Member,
    /// Read-only access to the project's resources.
    Reader,
}

/// Lifecycle phase of a RoleAssignment.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum RoleAssignmentPhase {
    /// Not yet checked.
    #[default]
    Pending,
    /// The user exists and the grant is in force.
    Active,
    /// The grant has no effect (see conditions, e.g. the user does not exist).
    Invalid,
}

/// Observed state of a RoleAssignment.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RoleAssignmentStatus {
    /// Lifecycle phase.
    #[serde(default)]
    pub phase: RoleAssignmentPhase,
    /// Latest observations of the assignment's state.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// The `metadata.generation` this status was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// Resource limits of the project (namespace) this object lives in. One Quota per project is
/// expected; if there are several, each limit is the smallest given.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "identity.stratus.dev",
    version = "v1",
    kind = "Quota",
    namespaced,
    status = "QuotaStatus",
    derive = "PartialEq",
    category = "stratus",
    doc = "Resource limits of a project (Nova, Neutron and Cinder quotas).",
    printcolumn(
        name = "Servers",
        type_ = "integer",
        json_path = ".spec.limits.servers"
    ),
    printcolumn(name = "VCPUs", type_ = "integer", json_path = ".spec.limits.vcpus"),
    printcolumn(name = "RAM MiB", type_ = "integer", json_path = ".spec.limits.ramMiB"),
    printcolumn(
        name = "Used Servers",
        type_ = "integer",
        json_path = ".status.used.servers",
        priority = 1
    ),
    printcolumn(
        name = "Used VCPUs",
        type_ = "integer",
        json_path = ".status.used.vcpus",
        priority = 1
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct QuotaSpec {
    /// Upper bounds; an absent limit is unlimited.
    pub limits: QuotaLimits,
}

/// Per-resource limits of a Quota. An absent field means unlimited; 0 forbids the resource.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct QuotaLimits {
    /// Number of Servers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub servers: Option<u64>,
    /// Sum of the flavors' vCPUs over all Servers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcpus: Option<u64>,
    /// Sum of the flavors' RAM over all Servers, in MiB.
    #[serde(default, rename = "ramMiB", skip_serializing_if = "Option::is_none")]
    pub ram_mib: Option<u64>,
    /// Number of Volumes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volumes: Option<u64>,
    /// Sum of Volume sizes, in GiB.
    #[serde(default, rename = "volumeGiB", skip_serializing_if = "Option::is_none")]
    pub volume_gib: Option<u64>,
    /// Number of VolumeSnapshots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshots: Option<u64>,
    /// Number of Networks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub networks: Option<u64>,
    /// Number of Subnets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subnets: Option<u64>,
    /// Number of Ports (including those created for Servers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ports: Option<u64>,
    /// Number of Routers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub routers: Option<u64>,
    /// Number of FloatingIPs.
    #[serde(
        default,
        rename = "floatingIPs",
        skip_serializing_if = "Option::is_none"
    )]
    pub floating_ips: Option<u64>,
    /// Number of SecurityGroups.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub security_groups: Option<u64>,
}

/// Current consumption of a project, for the same resources as [`QuotaLimits`].
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct QuotaUsage {
    /// Number of Servers.
    pub servers: u64,
    /// Sum of the flavors' vCPUs over all Servers.
    pub vcpus: u64,
    /// Sum of the flavors' RAM over all Servers, in MiB.
    #[serde(rename = "ramMiB")]
    pub ram_mib: u64,
    /// Number of Volumes.
    pub volumes: u64,
    /// Sum of Volume sizes, in GiB.
    #[serde(rename = "volumeGiB")]
    pub volume_gib: u64,
    /// Number of VolumeSnapshots.
    pub snapshots: u64,
    /// Number of Networks.
    pub networks: u64,
    /// Number of Subnets.
    pub subnets: u64,
    /// Number of Ports.
    pub ports: u64,
    /// Number of Routers.
    pub routers: u64,
    /// Number of FloatingIPs.
    #[serde(rename = "floatingIPs")]
    pub floating_ips: u64,
    /// Number of SecurityGroups.
    pub security_groups: u64,
}

/// Lifecycle phase of a Quota.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum QuotaPhase {
    /// Usage has not been counted yet.
    #[default]
    Pending,
    /// Usage is within every limit.
    Active,
    /// Usage exceeds at least one limit (the limit was lowered below usage); new
    /// resources of that type are refused until usage drops.
    Exceeded,
}

/// Observed state of a Quota.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct QuotaStatus {
    /// Lifecycle phase.
    #[serde(default)]
    pub phase: QuotaPhase,
    /// What the project currently consumes.
    #[serde(default)]
    pub used: QuotaUsage,
    /// Latest observations of the quota's state.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// The `metadata.generation` this status was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// An S3 access key of a user in this object's project (namespace), for Swift's S3 API (Keystone's
/// EC2 credentials). The key id and secret are made by the server: the secret is in the answer
/// to the create only, never stored, never shown again (it is derived from a key the API server
/// keeps outside every served object). Deleting the object revokes the key.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "identity.stratus.dev",
    version = "v1",
    kind = "S3Credential",
    namespaced,
    status = "S3CredentialStatus",
    derive = "PartialEq",
    shortname = "s3c",
    category = "stratus",
    selectable = ".spec.user",
    doc = "An S3 access key (Keystone EC2 credential) of a user in a project.",
    printcolumn(name = "User", type_ = "string", json_path = ".spec.user"),
    printcolumn(
        name = "Access Key",
        type_ = "string",
        json_path = ".status.accessKeyId"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct S3CredentialSpec {
    /// Name of the User whose key this is; it acts with that user's roles in this project.
    /// Users make keys for themselves only (cluster admins for anyone). Cannot be changed.
    #[schemars(length(min = 1, max = 253), regex(pattern = NAME_PATTERN))]
    pub user: String,
}

/// What the server made for an S3Credential.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct S3CredentialStatus {
    /// The access key id (the `aws_access_key_id`), made at creation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub access_key_id: Option<String>,
    /// The secret (the `aws_secret_access_key`): only in the answer to the create, never
    /// stored nor shown again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 128))]
    pub secret_access_key: Option<String>,
}
