//! Group `image.stratus.dev`: disk, kernel and ramdisk images (Glance's job).

// kube's `printcolumn(...)`/`selectable` repeat keys by design; clippy reads that as duplicates.
#![allow(clippy::duplicated_attributes)]

use std::collections::BTreeMap;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{Condition, NAME_PATTERN, SHA256_PATTERN};

/// A bootable image, or a kernel or ramdisk for direct kernel boot.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "image.stratus.dev",
    version = "v1",
    kind = "Image",
    namespaced,
    status = "ImageStatus",
    derive = "PartialEq",
    shortname = "img",
    category = "stratus",
    selectable = ".spec.visibility",
    doc = "An image (Glance image): a disk image, or a kernel/ramdisk for direct kernel boot.",
    printcolumn(name = "Status", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Disk Format", type_ = "string", json_path = ".spec.diskFormat"),
    printcolumn(name = "Visibility", type_ = "string", json_path = ".spec.visibility"),
    printcolumn(
        name = "Size",
        type_ = "integer",
        json_path = ".status.sizeBytes",
        priority = 1
    ),
    printcolumn(
        name = "Kernel",
        type_ = "string",
        json_path = ".spec.kernelImage",
        priority = 1
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ImageSpec {
    /// Format of the image data. `aki` and `ari` mark a kernel and a ramdisk (initrd) for
    /// direct kernel boot, as in Glance.
    pub disk_format: DiskFormat,
    /// Container format; must be `aki`/`ari` for kernel/ramdisk images, `bare` otherwise.
    #[serde(default)]
    pub container_format: ContainerFormat,
    /// Where the image data is downloaded from.
    pub source: ImageSource,
    /// Expected SHA-256 of the downloaded data. When given, the image becomes Active only if
    /// the data matches.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = SHA256_PATTERN))]
    pub sha256: Option<String>,
    /// Who may boot from the image: `public` images are usable from every namespace.
    #[serde(default)]
    pub visibility: Visibility,
    /// Smallest root disk a Server booting this image needs, in GiB.
    #[serde(default, rename = "minDiskGiB")]
    pub min_disk_gib: u64,
    /// Smallest RAM a Server booting this image needs, in MiB.
    #[serde(default, rename = "minRamMiB")]
    pub min_ram_mib: u64,
    /// Name of the kernel Image (`diskFormat: aki`) to boot directly, instead of the image's
    /// own boot loader (Glance `kernel_id`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253), regex(pattern = NAME_PATTERN))]
    pub kernel_image: Option<String>,
    /// Name of the ramdisk Image (`diskFormat: ari`) used with `kernelImage` (Glance
    /// `ramdisk_id`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253), regex(pattern = NAME_PATTERN))]
    pub ramdisk_image: Option<String>,
    /// Kernel command line used with `kernelImage` (Glance `os_command_line`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2048))]
    pub kernel_cmdline: Option<String>,
    /// A protected image cannot be deleted.
    #[serde(default)]
    pub protected: bool,
    /// Free-form image properties, as in Glance (`hw_disk_bus`, `os_distro`, ...).
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
}

/// Format of an Image's data.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    /// QEMU copy-on-write disk image.
    Qcow2,
    /// Raw disk image.
    Raw,
    /// ISO 9660 (CD-ROM) image.
    Iso,
    /// A kernel for direct kernel boot.
    Aki,
    /// A ramdisk (initrd) for direct kernel boot.
    Ari,
}

/// Container format of an Image's data.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ContainerFormat {
    /// No container: the data is the disk image itself.
    #[default]
    Bare,
    /// A kernel.
    Aki,
    /// A ramdisk.
    Ari,
}

/// Visibility of an Image.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Visibility {
    /// Usable only in its own namespace.
    #[default]
    Private,
    /// Usable from every namespace (only admins may publish).
    Public,
}

/// Where an Image's data comes from: exactly one of `url`, `swift` and `upload`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ImageSource {
    /// HTTP or HTTPS URL of the data (Glance's web-download import).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(url, length(max = 2048), regex(pattern = r"^https?://[^\s]+$"))]
    pub url: Option<String>,
    /// An object in the Image's own project's account of the cloud's object store (Glance's
    /// Swift store). It is fetched with a short-lived read-only token of that project, so
    /// no other project's object can be named.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub swift: Option<SwiftObject>,
    /// The data is uploaded through the API (`PUT images/NAME/data`, as Glance's image
    /// upload) and kept in the cloud's object store under an account no tenant reaches.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upload: Option<ImageUpload>,
}

/// An Image whose data is uploaded through the API (`upload: {}`): once, by a member who may
/// update the Image; an Active image's data never changes.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ImageUpload {}

/// The container uploaded images are kept in, in the image store's own account.
pub const UPLOAD_CONTAINER: &str = "stratus-images";

/// The finalizer of an Image whose data the API server keeps in the object store: set before
/// the data is written there, removed (`DELETE images/NAME/data`, by the image controller)
/// once the deleted Image's object is gone, so that no object outlives its Image.
pub const DATA_FINALIZER: &str = "image.stratus.dev/stored-data";

/// Where an uploaded Image's data is kept: an object of the image store's own account of the
/// cloud's object store, which only the API server reads and writes.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StoredObject {
    /// The container ([`UPLOAD_CONTAINER`]).
    #[schemars(length(min = 1, max = 256))]
    pub container: String,
    /// The object: the Image's uid, so a new Image of the same name has none of its data.
    #[schemars(length(min = 1, max = 1024))]
    pub object: String,
}

/// The longest Swift container name (Swift's `MAX_CONTAINER_NAME_LENGTH`).
pub const MAX_CONTAINER_NAME: usize = 256;
/// The longest Swift object name (Swift's `MAX_OBJECT_NAME_LENGTH`).
pub const MAX_OBJECT_NAME: usize = 1024;

/// An object in the Image's project's Swift account.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SwiftObject {
    /// The container: no `/`, not `.` or `..`.
    #[schemars(length(min = 1, max = 256))]
    pub container: String,
    /// The object's name; `/` separates pseudo-folders, no segment is empty, `.` or `..`.
    #[schemars(length(min = 1, max = 1024))]
    pub object: String,
}

impl SwiftObject {
    /// What is wrong with the names, as (field, reason): Swift refuses a container name with
    /// `/` or longer than [`MAX_CONTAINER_NAME`] and an object name longer than
    /// [`MAX_OBJECT_NAME`]; Stratus also refuses `.` and `..` (a path's meaning, not a name),
    /// empty object path segments and control characters, so the URL built from them names
    /// that object and no other.
    pub fn problems(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        let control = |s: &str| s.chars().any(char::is_control);
        let c = &self.container;
        if c.is_empty() || c.len() > MAX_CONTAINER_NAME {
            out.push((
                "container",
                format!("must be 1 to {MAX_CONTAINER_NAME} bytes"),
            ));
        } else if c.contains('/') {
            out.push(("container", "must not contain '/'".to_owned()));
        } else if c == "." || c == ".." {
            out.push(("container", "must not be '.' or '..'".to_owned()));
        } else if control(c) {
            out.push((
                "container",
                "must not contain control characters".to_owned(),
            ));
        }
        let o = &self.object;
        if o.is_empty() || o.len() > MAX_OBJECT_NAME {
            out.push(("object", format!("must be 1 to {MAX_OBJECT_NAME} bytes")));
        } else if o.split('/').any(|s| s.is_empty() || s == "." || s == "..") {
            out.push((
                "object",
                "must not start or end with '/', hold '//', or have a '.' or '..' segment"
                    .to_owned(),
            ));
        } else if control(o) {
            out.push(("object", "must not contain control characters".to_owned()));
        }
        out
    }
}

/// Lifecycle phase of an Image.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum ImagePhase {
    /// Waiting to be downloaded (or, for `source.upload`, uploaded).
    #[default]
    Pending,
    /// Its data is being uploaded through the API.
    Uploading,
    /// The data is being downloaded and hashed.
    Downloading,
    /// The data is stored and verified; Servers can boot from it.
    Active,
    /// The download or verification failed; see the conditions.
    Error,
    /// Being deleted.
    Deleting,
}

/// Observed state of an Image.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ImageStatus {
    /// Lifecycle phase.
    #[serde(default)]
    pub phase: ImagePhase,
    /// Size of the stored data, in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_bytes: Option<u64>,
    /// Virtual size of the disk the image describes, in bytes (as `qemu-img info` reports).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub virtual_size_bytes: Option<u64>,
    /// SHA-256 of the stored data, as computed while downloading.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = SHA256_PATTERN))]
    pub sha256: Option<String>,
    /// Where an uploaded image's data is kept (set once, by the upload that made it Active).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stored: Option<StoredObject>,
    /// The format the data was inspected as (`qemu-img info`), for an uploaded image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<DiskFormat>,
    /// Latest observations of the image's state (`Verified`, `Ready`, `Uploaded`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// The `metadata.generation` this status was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}
