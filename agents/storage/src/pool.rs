//! The node's StoragePools: each pool configured on the node (`--storage-pool
//! NAME=lvm:VG|NAME=file:DIR`) created if absent and served only while its API object names
//! the node and the same backing store; a heartbeat writes each pool's capacity, whether it
//! grows volumes in use, and Ready.
//! A pool naming the node that the node does not configure is reported NotReady and never
//! touched.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use kube::api::{Api, ListParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;
use stratus_api_types::common::{ConditionType, Time};
use stratus_api_types::storage::{
    InUseGrowth, StorageBackend, StoragePool, StoragePoolPhase, StoragePoolSpec, StoragePoolStatus,
};
use stratus_runtime::Runtime;

use crate::driver::{Backend, DriverError};

/// Reasons of a pool's `Ready` condition (to move into api-types' `Reason`).
pub mod reasons {
    /// `Ready=True`: the agent serves the pool and reports its capacity.
    pub const POOL_READY: &str = "PoolReady";
    /// `Ready=False`: the pool names the node, which does not configure it.
    pub const NOT_CONFIGURED: &str = "NotConfigured";
    /// `Ready=False`: the pool's spec names another store than the node configures.
    pub const MISMATCH: &str = "BackendMismatch";
    /// `Ready=False`: the backing store cannot be read (its VG or directory is missing).
    pub const UNAVAILABLE: &str = "BackendUnavailable";
}

/// A pool as the operator configured it on the node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolConfig {
    /// The StoragePool's name.
    pub name: String,
    /// Its backing store.
    pub store: Store,
}

/// A backing store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Store {
    /// An LVM volume group.
    Lvm(String),
    /// A directory of files.
    File(PathBuf),
}

impl std::str::FromStr for PoolConfig {
    type Err = String;

    /// `NAME=lvm:VG` or `NAME=file:/ABSOLUTE/DIR`.
    fn from_str(s: &str) -> Result<Self, String> {
        let (name, store) = s
            .split_once('=')
            .ok_or_else(|| format!("{s:?}: expected NAME=lvm:VG or NAME=file:DIR"))?;
        let name_ok = !name.is_empty()
            && name.len() <= 253
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
            && name.starts_with(|c: char| c.is_ascii_alphanumeric())
            && name.ends_with(|c: char| c.is_ascii_alphanumeric());
        if !name_ok {
            return Err(format!("{name:?} is not a StoragePool name"));
        }
        let store = match store.split_once(':') {
            Some(("lvm", vg)) => {
                crate::driver::lvm::Lvm::new(vg).map_err(|e| e.to_string())?;
                Store::Lvm(vg.into())
            }
            Some(("file", dir)) => {
                let dir = PathBuf::from(dir);
                crate::driver::file::FilePool::new(&dir).map_err(|e| e.to_string())?;
                Store::File(dir)
            }
            _ => return Err(format!("{store:?}: expected lvm:VG or file:DIR")),
        };
        Ok(Self {
            name: name.into(),
            store,
        })
    }
}

impl PoolConfig {
    /// The spec the agent creates the pool with.
    pub fn spec(&self, node: &str) -> StoragePoolSpec {
        let (backend, vg_name, path) = match &self.store {
            Store::Lvm(vg) => (StorageBackend::Lvm, Some(vg.clone()), None),
            Store::File(dir) => (
                StorageBackend::File,
                None,
                Some(dir.to_string_lossy().into_owned()),
            ),
        };
        StoragePoolSpec {
            backend,
            node: node.into(),
            vg_name,
            path,
            availability_zone: None,
            reserved_percentage: 0,
            over_subscription_ratio: None,
            disabled: false,
        }
    }

    /// Why the API's `pool` is not this configured pool on `node`, if it is not.
    pub fn mismatch(&self, node: &str, pool: &StoragePoolSpec) -> Option<String> {
        let want = self.spec(node);
        if pool.node != node {
            return Some(format!("the pool is on node {}", pool.node));
        }
        if pool.backend != want.backend || pool.vg_name != want.vg_name || pool.path != want.path {
            return Some(format!(
                "the pool's spec names {}, the node configures {}",
                describe(pool),
                describe(&want)
            ));
        }
        None
    }
}

fn describe(spec: &StoragePoolSpec) -> String {
    match spec.backend {
        StorageBackend::Lvm => format!("lvm:{}", spec.vg_name.as_deref().unwrap_or("?")),
        StorageBackend::File => format!("file:{}", spec.path.as_deref().unwrap_or("?")),
    }
}

/// The pools the agent serves: name → backing store.
pub type Served = BTreeMap<String, Arc<dyn Backend>>;

/// Creates each configured pool whose StoragePool is absent. Answers the configured pools
/// whose StoragePool (created now or before) names the node and the configured store; the
/// others are logged and left alone.
///
/// # Errors
/// The API could not be reached.
pub async fn register(
    client: &Client,
    node: &str,
    pools: &[(PoolConfig, Arc<dyn Backend>)],
) -> Result<Served, kube::Error> {
    let api: Api<StoragePool> = Api::all(client.clone());
    let mut served = Served::new();
    for (config, backend) in pools {
        let existing = match api.get_opt(&config.name).await {
            Ok(p) => p,
            // A node may read only its own pools: this name is another node's.
            Err(kube::Error::Api(e)) if e.code == 403 => {
                tracing::error!(pool = %config.name, "a StoragePool of that name belongs to another node; not served");
                continue;
            }
            Err(e) => return Err(e),
        };
        let existing = match existing {
            Some(p) => p,
            None => {
                let pool: StoragePool = serde_json::from_value(json!({
                    "apiVersion": "storage.stratus.dev/v1",
                    "kind": "StoragePool",
                    "metadata": {"name": config.name},
                    "spec": config.spec(node),
                }))
                .map_err(kube::Error::SerdeError)?;
                match api.create(&PostParams::default(), &pool).await {
                    Ok(p) => p,
                    Err(kube::Error::Api(e)) if e.code == 409 => api.get(&config.name).await?,
                    Err(e) => return Err(e),
                }
            }
        };
        match config.mismatch(node, &existing.spec) {
            None => {
                served.insert(config.name.clone(), Arc::clone(backend));
            }
            Some(why) => {
                tracing::error!(pool = %config.name, %why, "the StoragePool is not the one configured on this node; not served");
            }
        }
    }
    Ok(served)
}

/// What the agent found of a pool it serves: its capacity in bytes (or why it could not
/// read it) and whether it grows volumes in use ([`Backend::grows_in_use`]).
pub type Found = (Result<u64, DriverError>, InUseGrowth);

/// The status of `pool` as the agent reports it: what it found of its store (`None`: the
/// node does not serve it, for `unserved`), and the storage address `address` the node
/// serves exports at, recorded once (an address recorded before is kept: only an operator
/// moves it).
pub fn status(
    pool: &StoragePool,
    backend: Option<Found>,
    unserved: &str,
    address: Option<IpAddr>,
) -> StoragePoolStatus {
    let mut status = pool.status.clone().unwrap_or_default();
    let generation = pool.metadata.generation;
    if backend.is_some() && status.storage_address.is_none() {
        status.storage_address = address.map(|a| a.to_string());
    }
    let backend = backend.map(|(capacity, growth)| {
        status.grows_in_use = Some(growth);
        capacity
    });
    match backend {
        Some(Ok(bytes)) => {
            status.phase = StoragePoolPhase::Ready;
            status.capacity_gib = Some(bytes >> 30);
            ConditionType::Ready
                .yes(reasons::POOL_READY, "the storage agent serves the pool")
                .set(&mut status.conditions, generation);
        }
        Some(Err(e)) => {
            status.phase = StoragePoolPhase::NotReady;
            ConditionType::Ready
                .no(reasons::UNAVAILABLE, stratus_runtime::policy::chain(&e))
                .set(&mut status.conditions, generation);
        }
        None => {
            status.phase = StoragePoolPhase::NotReady;
            let reason = if unserved.starts_with("not configured") {
                reasons::NOT_CONFIGURED
            } else {
                reasons::MISMATCH
            };
            ConditionType::Ready
                .no(reason, unserved)
                .set(&mut status.conditions, generation);
        }
    }
    status.observed_generation = generation;
    status.last_heartbeat_time = Some(Time(k8s_openapi::jiff::Timestamp::now()));
    status
}

/// One heartbeat: the status of every pool naming the node.
async fn beat(
    client: &Client,
    runtime: &Runtime<StoragePool>,
    node: &str,
    configured: &[(PoolConfig, Arc<dyn Backend>)],
    served: &Served,
    address: Option<IpAddr>,
) -> Result<(), kube::Error> {
    let api: Api<StoragePool> = Api::all(client.clone());
    let pools = api
        .list(&ListParams::default().fields(&format!("spec.node={node}")))
        .await?;
    for pool in pools {
        let name = pool.name_any();
        let config = configured.iter().find(|(c, _)| c.name == name);
        let (backend, why) = match (served.get(&name), config) {
            (Some(b), Some((c, _))) => match c.mismatch(node, &pool.spec) {
                None => {
                    let b = Arc::clone(b);
                    let store = Arc::clone(&b);
                    let cap = stratus_runtime::blocking(move || store.capacity())
                        .await
                        .unwrap_or_else(|e| {
                            Err(DriverError::Unavailable(format!(
                                "capacity check failed: {e}"
                            )))
                        });
                    (
                        Some((cap.map(|c| c.total), b.grows_in_use())),
                        String::new(),
                    )
                }
                Some(why) => (None, why),
            },
            (None, Some((c, _))) => (
                None,
                c.mismatch(node, &pool.spec)
                    .unwrap_or_else(|| "the agent does not serve it yet".into()),
            ),
            (_, None) => (None, "not configured on this node".into()),
        };
        let mut next = status(&pool, backend, &why, address);
        let mut written = runtime.write_status(&pool, &next).await;
        if let Err(kube::Error::Api(e)) = &written
            && e.code == 422
            && e.message.contains("status.storageAddress")
            && pool
                .status
                .as_ref()
                .is_none_or(|s| s.storage_address.is_none())
        {
            // The API refused the address (outside the storage networks the operator
            // granted, or another node's): the pool still serves this node's own guests, and
            // no volume of it is exported until the address is one the API takes.
            tracing::error!(pool = %name, error = %e.message, "the storage address is refused; volumes of the pool are not exported");
            next.storage_address = None;
            written = runtime.write_status(&pool, &next).await;
        }
        if let Err(e) = written {
            tracing::warn!(pool = %name, error = %e, "cannot report the pool's status");
        }
    }
    Ok(())
}

/// Heartbeats the node's pools every `every` until dropped, recording `address` as their
/// storage address.
pub async fn heartbeat(
    client: Client,
    node: String,
    configured: Vec<(PoolConfig, Arc<dyn Backend>)>,
    served: Arc<Served>,
    every: Duration,
    address: Option<IpAddr>,
) {
    let runtime = Runtime::new(client.clone(), crate::agent::MANAGER);
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        if let Err(e) = beat(&client, &runtime, &node, &configured, &served, address).await {
            tracing::warn!(error = %e, "storage pool heartbeat failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_flags_parse() {
        let p: PoolConfig = "fast=lvm:vg0".parse().expect("lvm");
        assert_eq!(p.store, Store::Lvm("vg0".into()));
        let f: PoolConfig = "files=file:/srv/volumes".parse().expect("file");
        assert_eq!(f.store, Store::File("/srv/volumes".into()));
        for bad in [
            "fast",
            "=lvm:vg0",
            "Fast=lvm:vg0",
            "fast=lvm:",
            "fast=lvm:a/b",
            "fast=file:relative",
            "fast=nfs:x",
            "a;b=lvm:vg0",
        ] {
            assert!(bad.parse::<PoolConfig>().is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn a_pool_is_served_only_as_configured() {
        let p: PoolConfig = "fast=lvm:vg0".parse().expect("lvm");
        assert_eq!(p.mismatch("n1", &p.spec("n1")), None);
        assert!(p.mismatch("n1", &p.spec("n2")).is_some());
        let mut other = p.spec("n1");
        other.vg_name = Some("vg1".into());
        let why = p.mismatch("n1", &other).expect("a mismatch");
        assert!(why.contains("lvm:vg1") && why.contains("lvm:vg0"), "{why}");
        let f: PoolConfig = "fast=file:/srv".parse().expect("file");
        assert!(f.mismatch("n1", &p.spec("n1")).is_some());
    }

    fn pool() -> StoragePool {
        let p: PoolConfig = "fast=lvm:vg0".parse().expect("lvm");
        StoragePool::new("fast", p.spec("n1"))
    }

    #[test]
    fn status_says_ready_with_the_capacity_or_why_not() {
        let s = status(
            &pool(),
            Some((Ok((10 << 30) + 5), InUseGrowth::Always)),
            "",
            None,
        );
        assert_eq!(s.phase, StoragePoolPhase::Ready);
        assert_eq!(s.capacity_gib, Some(10));
        assert!(s.last_heartbeat_time.is_some());
        assert!(ConditionType::Ready.is_true(&s.conditions));
        assert_eq!(s.grows_in_use, Some(InUseGrowth::Always));

        let s = status(
            &pool(),
            Some((
                Err(DriverError::Unavailable("no volume group vg0".into())),
                InUseGrowth::WhenSpaceFollows,
            )),
            "",
            None,
        );
        assert_eq!(s.phase, StoragePoolPhase::NotReady);
        let c = ConditionType::Ready.find(&s.conditions).expect("Ready");
        assert_eq!(c.reason, reasons::UNAVAILABLE);
        assert!(c.message.contains("no volume group vg0"));
        // What the store can do is known without reading it.
        assert_eq!(s.grows_in_use, Some(InUseGrowth::WhenSpaceFollows));

        let s = status(&pool(), None, "not configured on this node", None);
        let c = ConditionType::Ready.find(&s.conditions).expect("Ready");
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("False", reasons::NOT_CONFIGURED)
        );
        // A pool the node does not serve: nothing said of a store it does not know.
        assert_eq!(s.grows_in_use, None);
    }

    #[test]
    fn a_storage_address_is_recorded_once_and_kept() {
        let a: IpAddr = "10.0.0.1".parse().expect("an address");
        let b: IpAddr = "10.0.0.9".parse().expect("an address");
        let mut p = pool();
        let s = status(&p, Some((Ok(10 << 30), InUseGrowth::Always)), "", Some(a));
        assert_eq!(s.storage_address.as_deref(), Some("10.0.0.1"));
        p.status = Some(s);
        // Another address given later (the agent started with another flag) moves nothing.
        let s = status(&p, Some((Ok(10 << 30), InUseGrowth::Always)), "", Some(b));
        assert_eq!(s.storage_address.as_deref(), Some("10.0.0.1"));
        assert_eq!(
            status(&p, Some((Ok(10 << 30), InUseGrowth::Always)), "", None)
                .storage_address
                .as_deref(),
            Some("10.0.0.1"),
            "nor does none"
        );
        // A pool the node does not serve gets none.
        assert_eq!(
            status(&pool(), None, "not configured", Some(a)).storage_address,
            None
        );
    }
}
