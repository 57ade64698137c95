//! Admission beyond the schema, registered per resource type ([`for_kind`]): checks and claims
//! made in the same etcd transaction as the write they admit. Quota, compute placement
//! (binding), identity (what belongs to a User), network IPAM and block storage (volume
//! placement and claims) are registered today.
//!
//! One write is made by one admission: the first of the type's whose [`Admission::write`]
//! answers. Where two must hold together, the one that writes carries the other's check in its
//! transaction: quota is such a check ([`quota::check`] gives the guards a counted kind's write
//! must carry), so IPAM, registered before quota for the network kinds, writes the object, its
//! claims and the quota's guards at once.

pub mod attachments;
pub mod binding;
pub mod console;
pub mod credentials;
pub mod exports;
pub mod identity;
pub mod images;
pub mod lifecycle;
pub mod network;
pub mod object;
pub mod pools;
pub mod quota;
pub mod router;
pub mod storage;

use futures::future::BoxFuture;
use serde_json::Value;

use crate::base::error::{ApiError, ApiResult};
use crate::storage::keys;
use crate::storage::store::{Guard, Store, Write};

tokio::task_local! {
    /// Whether the request being admitted is a cluster admin's (or a system identity's other
    /// than a node's): set by the HTTP layer around each authenticated request, from what the
    /// policy layer found. Unset (tests of the verbs, work outside a request), it is false.
    pub static CLUSTER_ADMIN: bool;
}

/// Whether the request being admitted is a cluster admin's (see [`CLUSTER_ADMIN`]).
pub fn by_cluster_admin() -> bool {
    CLUSTER_ADMIN.try_with(|a| *a).unwrap_or(false)
}

/// What admission works with: the store and the key prefix of every object.
#[derive(Debug, Clone, Copy)]
pub struct Ctx<'a> {
    /// The store.
    pub store: &'a Store,
    /// Key prefix of every object in etcd.
    pub prefix: &'a str,
    /// The networks a StoragePool's storage address may be in ([`pools`]).
    pub storage_ranges: &'a [pools::StorageCidr],
}

/// The object a request addresses, as admission sees it.
#[derive(Debug, Clone, Copy)]
pub struct Subject<'a> {
    /// API group.
    pub group: &'a str,
    /// Kind.
    pub kind: &'a str,
    /// Plural, as in paths and keys.
    pub plural: &'a str,
    /// Whether the type is namespaced.
    pub namespaced: bool,
    /// The namespace from the path.
    pub namespace: Option<&'a str>,
    /// The name from the path ("" for a collection).
    pub name: &'a str,
}

impl Subject<'_> {
    /// The object's key.
    pub fn key(&self, prefix: &str) -> String {
        keys::object(
            prefix,
            self.group,
            self.plural,
            self.namespace.filter(|_| self.namespaced),
            self.name,
        )
    }

    /// The key prefix of the type's objects in `ns`.
    pub fn collection(&self, prefix: &str, ns: &str) -> String {
        keys::collection(
            prefix,
            self.group,
            self.plural,
            Some(ns).filter(|_| self.namespaced),
        )
    }

    /// 404 for this object.
    pub fn not_found(&self) -> ApiError {
        ApiError::not_found(self.group, self.plural, self.name)
    }

    /// 409: the object changed since it was read.
    pub fn conflict(&self) -> ApiError {
        ApiError::conflict(
            self.group,
            self.plural,
            self.name,
            "the object has been modified; please apply your changes to the latest version and try again",
        )
    }
}

/// A write an admission may make itself, with its checks in the same transaction.
#[derive(Debug, Clone, Copy)]
pub struct Change<'a> {
    /// The object's key.
    pub key: &'a str,
    /// For an update: the stored object and the revision it was read at.
    pub old: Option<(&'a Value, i64)>,
    /// The object to store.
    pub new: &'a Value,
    /// For a create: the namespace's Project, by key and the revision it was found active
    /// at ([`lifecycle::admit_create`]). The write must hold it at that revision (as
    /// [`Guard::Revision`](crate::storage::store::Guard::Revision)): a Project whose deletion
    /// began since, or that is gone, fails the write, and the create is checked again.
    pub parent: Option<(&'a str, i64)>,
}

/// What an admission's write did.
#[derive(Debug)]
pub struct Written {
    /// The store's answer.
    pub write: Write,
    /// The object stored, when the admission stored another than it was given (what it
    /// allocated, recorded in the status); `None`: the one given.
    pub stored: Option<Value>,
}

impl From<Write> for Written {
    fn from(write: Write) -> Self {
        Self {
            write,
            stored: None,
        }
    }
}

/// What a delete's check read: no key under `prefix` may change after `revision` before the
/// delete is written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    /// The key prefix.
    pub prefix: String,
    /// The revision it was read at.
    pub revision: i64,
}

/// Admission for one resource type. Every method has a default that admits without a word.
pub trait Admission: Send + Sync {
    /// The status a new object starts with; `None`: no status until its controller reports.
    fn initial_status(&self) -> Option<Value> {
        None
    }

    /// Sets what every new object of the type carries from its birth, whoever creates it (a
    /// Project's cleanup finalizer, as a Kubernetes namespace has `kubernetes` in its
    /// finalizers from its creation). Runs after the creator's managed fields are recorded:
    /// what it sets belongs to no field manager, so no apply of the creator's removes it.
    fn on_create(&self, _obj: &mut Value) {}

    /// Refuses a status write that changes what only this admission sets.
    ///
    /// # Errors
    /// 422 naming the field.
    fn check_status_write(&self, _s: &Subject<'_>, _old: &Value, _new: &Value) -> ApiResult<()> {
        Ok(())
    }

    /// Keys an object holds outside its own, deleted in the same transaction as the object.
    fn attached_keys(&self, _prefix: &str, _obj: &Value) -> Vec<String> {
        Vec::new()
    }

    /// Checks a delete before it begins (before the object goes, or its `deletionTimestamp`
    /// is set); `None` when this admission does not check deletes. The answer is what the
    /// check read and must still hold when the delete is written: prefixes under which no
    /// key may change after the revision given, carried by the delete's transaction as
    /// [`Guard::Unchanged`](crate::storage::store::Guard::Unchanged) (when one does change,
    /// the delete is read and checked again).
    ///
    /// # Errors
    /// The delete is refused (409 for an object still in use).
    fn check_delete<'a>(
        &'a self,
        _ctx: Ctx<'a>,
        _s: Subject<'a>,
        _obj: &'a Value,
    ) -> Option<BoxFuture<'a, ApiResult<Vec<Held>>>> {
        None
    }

    /// Makes a create or update itself, atomically with what it checks; `None` when this
    /// admission does not check the write.
    fn write<'a>(
        &'a self,
        _ctx: Ctx<'a>,
        _s: Subject<'a>,
        _w: Change<'a>,
    ) -> Option<BoxFuture<'a, ApiResult<Written>>> {
        None
    }
}

/// After a guarded write failed with the object's key as expected: whether what failed is
/// the create's parent (the namespace's Project) having changed or gone since it was checked,
/// rather than a guard. The create is then answered `Conflict(0)`, and checked again.
///
/// # Errors
/// The store could not be read.
pub(crate) async fn parent_changed(ctx: Ctx<'_>, parent: Option<(&str, i64)>) -> ApiResult<bool> {
    match parent {
        Some((key, rev)) => Ok(ctx
            .store
            .get(key)
            .await
            .map_err(ApiError::from)?
            .is_none_or(|p| p.mod_revision != rev)),
        None => Ok(false),
    }
}

/// An admission's own write in one guarded transaction: done, or the conflict of the object
/// at `key` (its revision now, 0 when it is gone), whichever guard failed.
///
/// # Errors
/// The store could not be written or read.
pub(crate) async fn settle(
    ctx: Ctx<'_>,
    key: &str,
    guards: &[Guard<'_>],
    puts: &[(&str, &Value)],
    deletes: &[&str],
) -> ApiResult<Written> {
    if let Some(rev) = ctx
        .store
        .write_many(guards, puts, deletes)
        .await
        .map_err(ApiError::from)?
    {
        return Ok(Write::Done(rev).into());
    }
    let current = ctx.store.get(key).await.map_err(ApiError::from)?;
    Ok(Write::Conflict(current.map_or(0, |c| c.mod_revision)).into())
}

/// The admissions of a resource type, in the order they apply.
pub fn for_kind(group: &str, kind: &str) -> &'static [&'static dyn Admission] {
    static BOTH: [&dyn Admission; 4] = [
        &binding::Binding,
        &attachments::Attachments,
        &quota::Quota,
        &console::Console,
    ];
    static BINDING: [&dyn Admission; 3] = [
        &binding::Binding,
        &attachments::Attachments,
        &console::Console,
    ];
    static QUOTA: [&dyn Admission; 1] = [&quota::Quota];
    static USERS: [&dyn Admission; 1] = [&identity::Users];
    static IPAM: [&dyn Admission; 2] = [&network::Ipam, &quota::Quota];
    static ASSIGNMENTS: [&dyn Admission; 1] = [&identity::Assignments];
    static STORAGE: [&dyn Admission; 2] = [&storage::Storage, &quota::Quota];
    static ROUTERS: [&dyn Admission; 2] = [&router::Routers, &quota::Quota];
    static PROJECTS: [&dyn Admission; 1] = [&lifecycle::Projects];
    static CREDENTIALS: [&dyn Admission; 1] = [&credentials::S3Credentials];
    static OBJECT_NODES: [&dyn Admission; 1] = [&object::ObjectNodes];
    static OBJECT_RINGS: [&dyn Admission; 1] = [&object::ObjectRings];
    static STORAGE_POOLS: [&dyn Admission; 1] = [&pools::StoragePools];
    static VOLUME_EXPORTS: [&dyn Admission; 1] = [&exports::VolumeExports];
    static IMAGES: [&dyn Admission; 1] = [&images::Images];
    match (group, kind) {
        ("identity.stratus.dev", "Project") => return &PROJECTS,
        ("identity.stratus.dev", "User") => return &USERS,
        ("identity.stratus.dev", "RoleAssignment") => return &ASSIGNMENTS,
        ("identity.stratus.dev", "S3Credential") => return &CREDENTIALS,
        ("object.stratus.dev", "ObjectNode") => return &OBJECT_NODES,
        ("object.stratus.dev", "ObjectRing") => return &OBJECT_RINGS,
        (network::GROUP, "Network" | "Subnet" | "Port" | "FloatingIP") => return &IPAM,
        (network::GROUP, "Router") => return &ROUTERS,
        (storage::GROUP, "Volume" | "VolumeSnapshot") => return &STORAGE,
        (storage::GROUP, "StoragePool") => return &STORAGE_POOLS,
        (storage::GROUP, "VolumeExport") => return &VOLUME_EXPORTS,
        ("image.stratus.dev", "Image") => return &IMAGES,
        _ => {}
    }
    match (binding::is_server(group, kind), quota::counted(group, kind)) {
        (true, true) => &BOTH,
        (true, false) => &BINDING,
        (false, true) => &QUOTA,
        (false, false) => &[],
    }
}
