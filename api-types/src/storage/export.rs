//! `VolumeExport`: one volume's data served over NBD by its storage node to one consuming node.

// kube's `printcolumn(...)`/`selectable` repeat keys by design; clippy reads that as duplicates.
#![allow(clippy::duplicated_attributes)]

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{Condition, LABEL_PATTERN, NAME_PATTERN};

/// One Volume's data served over NBD by the storage agent of its node (`spec.storageNode`) to
/// one other node (`spec.node`) that holds a Server attached to it: Kubernetes'
/// `storage.k8s.io/v1 VolumeAttachment`, for NBD.
///
/// # Why a kind of its own, and its name
/// Where a volume is served (the storage node's address, port and export name) is the
/// infrastructure's business: a cluster-scoped object is read by the two nodes it names and by
/// operators and controllers, never by the project that owns the volume (a Volume's status is).
/// One object per (volume, consuming node) serves a multi-attach volume whose Servers sit on
/// several other nodes to each of them. It is called `VolumeExport`, not `VolumeAttachment`
/// as in Kubernetes: a Volume's `status.attachments[]` are its attachments to Servers (Cinder's
/// word), and this object is what the storage node serves, not what a Server holds.
///
/// The attachments controller creates it (named [`volume_export_name`], so creates are
/// idempotent) while a Server on `spec.node` holds the volume, and deletes it once none there
/// does any more and its guests let the disk go; the storage node writes its status.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "storage.stratus.dev",
    version = "v1",
    kind = "VolumeExport",
    status = "VolumeExportStatus",
    derive = "PartialEq",
    category = "stratus",
    selectable = ".spec.node",
    selectable = ".spec.storageNode",
    doc = "A volume's data served over NBD by its storage node to one consuming node.",
    printcolumn(name = "Volume", type_ = "string", json_path = ".spec.volume.name"),
    printcolumn(
        name = "Namespace",
        type_ = "string",
        json_path = ".spec.volume.namespace"
    ),
    printcolumn(
        name = "Storage Node",
        type_ = "string",
        json_path = ".spec.storageNode"
    ),
    printcolumn(name = "Node", type_ = "string", json_path = ".spec.node"),
    printcolumn(
        name = "Host",
        type_ = "string",
        json_path = ".status.host",
        priority = 1
    ),
    printcolumn(
        name = "Port",
        type_ = "integer",
        json_path = ".status.port",
        priority = 1
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VolumeExportSpec {
    /// The Volume exported.
    pub volume: ExportedVolume,
    /// The node holding the volume's data (its `status.node`), whose storage agent serves it.
    #[schemars(length(min = 1, max = 253), regex(pattern = NAME_PATTERN))]
    pub storage_node: String,
    /// The node it is served to (the one node whose certificate and address are let in): a
    /// node other than `storageNode` holding a Server attached to the volume.
    #[schemars(length(min = 1, max = 253), regex(pattern = NAME_PATTERN))]
    pub node: String,
}

/// The Volume a VolumeExport serves, exactly: a new volume of that name is not it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ExportedVolume {
    /// The Volume's namespace (its project).
    #[schemars(length(min = 1, max = 63), regex(pattern = LABEL_PATTERN))]
    pub namespace: String,
    /// The Volume's name.
    #[schemars(length(min = 1, max = 253), regex(pattern = NAME_PATTERN))]
    pub name: String,
    /// The Volume's `metadata.uid`.
    #[schemars(length(min = 1, max = 64))]
    pub uid: String,
}

/// Where the storage node serves the export, once it does.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VolumeExportStatus {
    /// The storage node's address the NBD server listens on: the storage address its pool
    /// records (`StoragePool.status.storageAddress`), and no other.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 2, max = 45))]
    pub host: Option<String>,
    /// Its TCP port, one of the cluster's export ports (`stratus agent --export-ports`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1024, max = 65535))]
    pub port: Option<u16>,
    /// The export's name: random, made anew for each export.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64), regex(pattern = r"^[a-z0-9-]+$"))]
    pub export_name: Option<String>,
    /// Served over TLS with the cloud's NBD certificates, to `spec.node`'s certificate alone
    /// (subject `CN=system:node:<node>`): the node's QEMU connects with TLS.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub tls: bool,
    /// Latest observations (`Ready`: served at `host`:`port`, or why not).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// The `metadata.generation` this status was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// The most bytes of an object name.
const MAX_NAME: usize = 253;

/// The name of the VolumeExport of the Volume of uid `uid` to node `node`: `<uid>.<node>`, or,
/// when that is longer than a name may be, `<uid>.x<hash of node>` (FNV-1a, 64 bits). The same
/// pair always gives the same name, so a create that already happened answers 409.
pub fn volume_export_name(uid: &str, node: &str) -> String {
    let plain = format!("{uid}.{node}");
    if plain.len() <= MAX_NAME {
        return plain;
    }
    let hash = node.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    format!("{uid}.x{hash:016x}")
}

impl VolumeExport {
    /// Where it is served (host, port, export name, TLS), once its storage node says so.
    pub fn served(&self) -> Option<(&str, u16, &str, bool)> {
        let s = self.status.as_ref()?;
        Some((
            s.host.as_deref()?,
            s.port?,
            s.export_name.as_deref()?,
            s.tls,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_export_is_named_from_its_volume_and_node_alone() {
        let uid = "0f9e2c1a-5b1f-4c2e-9a7d-3e8b6f0a1c2d";
        assert_eq!(volume_export_name(uid, "n1"), format!("{uid}.n1"));
        assert_eq!(volume_export_name(uid, "n1"), volume_export_name(uid, "n1"));
        assert_ne!(volume_export_name(uid, "n1"), volume_export_name(uid, "n2"));
        let long = "a".repeat(240);
        let other = format!("{}b", "a".repeat(239));
        let n = volume_export_name(uid, &long);
        assert!(n.len() <= MAX_NAME && n.starts_with(uid), "{n}");
        assert_ne!(n, volume_export_name(uid, &other));
        assert!(
            regex_lite_free_check(&n),
            "a DNS subdomain name of lower-case letters, digits, '-' and '.': {n}"
        );
    }

    fn regex_lite_free_check(n: &str) -> bool {
        n.split('.').all(|l| {
            !l.is_empty()
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        })
    }
}
