//! The storage agent's loops: the node's pools registered and heartbeated ([`crate::pool`]),
//! one kube-runtime controller each for the Volumes and VolumeSnapshots placed on the
//! node, whose reconcile reads the pool ([`Backend::observe`]), asks [`plan`] for the next
//! step and carries it out through the pool's [`Backend`], and one for the VolumeExports the
//! node serves (`spec.storageNode`), each served over NBD to its node ([`crate::export`]).

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use kube::api::{Api, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{EventType, Recorder, Reporter};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use stratus_api_types::common::{ConditionType, Reason, Time};
use stratus_api_types::compute::Hypervisor;
use stratus_api_types::image::{DiskFormat, Image, Visibility};
use stratus_api_types::storage::{
    ImageRef, MAX_ATTACHMENTS, StoragePool, Volume, VolumeExport, VolumeExportStatus, VolumePhase,
    VolumeSnapshot, VolumeSnapshotPhase, VolumeSnapshotStatus, VolumeStatus,
};
use stratus_image_cache::{Format, ImageCache, ImageError};
use stratus_runtime::finalizer;
use stratus_runtime::{Classify, Retry, Runtime, blocking};
use tracing::Instrument;

use crate::driver::{Backend, DriverError, InUseGrowth, Source, VolName};
use crate::export::{ExportError, Exports, Served as ServedAt};
use crate::plan::{Intent, Step, needs_observed, plan};
use crate::pool::{PoolConfig, Served};

/// The agent's name in Events and as field manager.
pub const MANAGER: &str = "stratus-storage-agent";

/// The finalizer the agent adds to a Volume or VolumeSnapshot before it makes its data, and
/// removes once the data is gone.
pub const FINALIZER: &str = "storage.stratus.dev/teardown";

/// The annotation on a VolumeSnapshot naming the uid of the Volume it was taken of.
pub const VOLUME_UID: &str = "storage.stratus.dev/volume-uid";

/// Reasons of the agent's `Ready` conditions (to move into api-types' `Reason`).
pub mod reasons {
    /// `Ready=True`: the data is there, at `status.devicePath`.
    pub const AVAILABLE: &str = "Available";
    /// `Ready=False`: the data is being made.
    pub const CREATING: &str = "Creating";
    /// `Ready=False`: growing to the size asked.
    pub const EXTENDING: &str = "Extending";
    /// `Ready=False`: the source (a snapshot, a volume) is not ready yet.
    pub const SOURCE_NOT_READY: &str = "SourceNotReady";
    /// `Ready=False`: the source does not exist, or is not in this pool.
    pub const SOURCE_NOT_FOUND: &str = "SourceNotFound";
    /// `Ready=False`: the pool refused to make or grow it (the message says why).
    pub const CREATE_FAILED: &str = "CreateFailed";
    /// `Ready=False`: its data was removed from the pool behind Stratus's back; it is not
    /// made again empty.
    pub const MISSING: &str = "DataMissing";
    /// `Ready=False`: it is deleted and waits for the Server holding it to let it go.
    pub const ATTACHED: &str = "Attached";
    /// A VolumeExport's `Ready=True`: served over NBD to its node.
    pub const EXPORTED: &str = "Exported";
    /// A VolumeExport's `Ready=False`: it cannot be served to its node (the message says why).
    pub const EXPORT_FAILED: &str = "ExportFailed";
    /// A VolumeExport's `Ready=False`: its volume is not made yet.
    pub const VOLUME_NOT_READY: &str = "VolumeNotReady";
    /// A VolumeExport's `Ready=False`: no attachment of its volume is on its node, so
    /// nothing is served to it.
    pub const NOT_ATTACHED: &str = "NotAttached";
}

/// How the agent runs on its node.
#[derive(Debug, Clone)]
pub struct Config {
    /// The node's name.
    pub node: String,
    /// Where the agent keeps the images volumes are made from (`volume-images/`).
    pub state_dir: PathBuf,
    /// How often pools report their capacity.
    pub heartbeat: Duration,
    /// How often each volume is read back from its pool (drift is found within this).
    pub resync: Duration,
    /// What the image cache may fetch.
    pub image_policy: stratus_image_cache::Policy,
    /// The address other nodes reach this node's volume exports at (none: its volumes are
    /// attached only on this node).
    pub storage_address: Option<IpAddr>,
    /// The ports volume exports are served on.
    pub export_ports: crate::export::PortRange,
    /// The node's NBD certificates, when exports are served over TLS (see
    /// [`crate::export::check_tls_dir`]).
    pub nbd_tls_dir: Option<PathBuf>,
}

/// What every reconcile shares.
pub struct Ctx {
    /// The API client.
    pub client: Client,
    /// The node's name.
    pub node: String,
    /// The pools served.
    pub served: Arc<Served>,
    /// Images volumes are made from.
    pub images: Arc<ImageCache>,
    /// Volume status writes and backoff.
    pub volumes: Runtime<Volume>,
    /// Snapshot status writes and backoff.
    pub snapshots: Runtime<VolumeSnapshot>,
    /// Events.
    pub recorder: Recorder,
    /// How often a volume is read back.
    pub resync: Duration,
    /// The volumes exported to other nodes.
    pub exports: Arc<Exports>,
}

/// A reconcile's failure.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// The API server.
    #[error("request to the API server")]
    Api(#[from] kube::Error),
    /// The pool's backing store.
    #[error("storage driver")]
    Driver(#[from] DriverError),
    /// The image cache.
    #[error("image cache")]
    Image(#[from] ImageError),
    /// The object lacks its uid (a bug).
    #[error("the object has no uid")]
    Incomplete,
    /// A blocking task panicked (a bug).
    #[error("blocking task failed")]
    Join(#[from] tokio::task::JoinError),
    /// A volume's export.
    #[error("volume export")]
    Export(#[from] ExportError),
}

impl Classify for StorageError {
    fn retry(&self) -> Retry {
        match self {
            Self::Api(e) => stratus_runtime::policy::kube_retry(e),
            Self::Driver(e) if e.is_final() => Retry::Never,
            Self::Image(e) if e.is_final() => Retry::Never,
            Self::Incomplete | Self::Join(_) | Self::Export(ExportError::NoAddress) => Retry::Never,
            _ => Retry::Backoff,
        }
    }
}

/// Why a volume cannot be made on this pass, and for how long to wait.
struct Blocked {
    reason: &'static str,
    message: String,
    /// Whether it can never be made as asked (phase Error) rather than waiting.
    failed: bool,
}

/// A source resolved to what the pool copies from.
enum Resolved {
    Empty,
    Image(PathBuf, Format, Box<Recorded>),
    Copy(VolName),
}

/// The images a volume filled from an Image records (`status.sourceImage`, `kernelImage`,
/// `ramdiskImage`), so that booting from it later takes these and no image named alike since.
#[derive(Debug, Default, Clone, PartialEq)]
struct Recorded {
    source: Option<ImageRef>,
    kernel: Option<ImageRef>,
    ramdisk: Option<ImageRef>,
}

/// `image` exactly: its namespace, name and uid.
fn image_ref(image: &Image) -> Result<ImageRef, StorageError> {
    Ok(ImageRef {
        namespace: image.namespace().ok_or(StorageError::Incomplete)?,
        name: image.name_any(),
        uid: uid(image)?,
    })
}

/// What a volume filled from `image` records: it, and its kernel and ramdisk images as
/// found now (one not found is not recorded, and a server cannot boot the volume by it).
async fn record(ctx: &Ctx, ns: &str, image: &Image) -> Result<Recorded, StorageError> {
    let found = |name: Option<String>| async move {
        let Some(name) = name else { return Ok(None) };
        match find_image(&ctx.client, ns, &name).await? {
            Ok(i) => image_ref(&i).map(Some),
            Err(_) => Ok(None),
        }
    };
    Ok(Recorded {
        source: Some(image_ref(image)?),
        kernel: found(image.spec.kernel_image.clone()).await?,
        ramdisk: found(image.spec.ramdisk_image.clone()).await?,
    })
}

fn uid<K: Resource>(obj: &K) -> Result<String, StorageError> {
    obj.meta().uid.clone().ok_or(StorageError::Incomplete)
}

/// The format the cache inspects an Image's data as.
fn cache_format(format: DiskFormat) -> Format {
    match format {
        DiskFormat::Qcow2 => Format::Qcow2,
        DiskFormat::Raw => Format::Raw,
        DiskFormat::Iso => Format::Iso,
        DiskFormat::Aki => Format::Kernel,
        DiskFormat::Ari => Format::Ramdisk,
    }
}

/// The Image a Volume in `ns` means by `name`, as a Server's is found: the project's own
/// image of that name first; else the one public image of that name (only cluster admins
/// publish images); several public ones of that name are ambiguous, and the volume says so
/// rather than picking one. A node reads the public ones by listing
/// `spec.visibility=public`, which the node authorizer allows.
async fn find_image(
    client: &Client,
    ns: &str,
    name: &str,
) -> Result<Result<Image, Blocked>, StorageError> {
    if let Some(i) = Api::<Image>::namespaced(client.clone(), ns)
        .get_opt(name)
        .await?
    {
        return Ok(Ok(i));
    }
    let mut public: Vec<Image> = Api::<Image>::all(client.clone())
        .list(
            &kube::api::ListParams::default()
                .fields(&format!("metadata.name={name},spec.visibility=public")),
        )
        .await?
        .items
        .into_iter()
        .filter(|i| i.spec.visibility == Visibility::Public && i.name_any() == name)
        .collect();
    Ok(match public.len() {
        0 => Err(Blocked {
            reason: Reason::ImageNotFound.as_str(),
            message: format!("image {name:?} not found in the project, nor as a public image"),
            failed: false,
        }),
        1 => Ok(public.remove(0)),
        n => {
            let mut places: Vec<String> = public.iter().filter_map(|i| i.namespace()).collect();
            places.sort();
            Err(Blocked {
                reason: Reason::ImageAmbiguous.as_str(),
                message: format!(
                    "image {name:?} is not in the project, and {n} public images have that name (in {}); make a private copy in the project or ask an admin to rename one",
                    places.join(", ")
                ),
                failed: false,
            })
        }
    })
}

/// What `vol`'s `spec.source` resolves to in pool `pool`.
async fn resolve(
    ctx: &Ctx,
    vol: &Volume,
    pool: &str,
) -> Result<Result<Resolved, Blocked>, StorageError> {
    let ns = vol.namespace().unwrap_or_default();
    let Some(source) = &vol.spec.source else {
        return Ok(Ok(Resolved::Empty));
    };
    let not_found = |message: String| Blocked {
        reason: reasons::SOURCE_NOT_FOUND,
        message,
        failed: true,
    };
    let not_ready = |message: String| Blocked {
        reason: reasons::SOURCE_NOT_READY,
        message,
        failed: false,
    };
    if let Some(name) = &source.snapshot {
        let api: Api<VolumeSnapshot> = Api::namespaced(ctx.client.clone(), &ns);
        let Some(snap) = api.get_opt(name).await? else {
            return Ok(Err(not_found(format!("snapshot {name:?} does not exist"))));
        };
        let st = snap.status.clone().unwrap_or_default();
        if st.pool.as_deref() != Some(pool) {
            return Ok(Err(not_found(format!(
                "snapshot {name:?} is not in pool {pool}"
            ))));
        }
        if st.phase != VolumeSnapshotPhase::Available {
            return Ok(Err(not_ready(format!(
                "snapshot {name:?} is {:?}, not Available",
                st.phase
            ))));
        }
        return Ok(Ok(Resolved::Copy(VolName::snapshot(&uid(&snap)?)?)));
    }
    if let Some(name) = &source.volume {
        let api: Api<Volume> = Api::namespaced(ctx.client.clone(), &ns);
        let Some(src) = api.get_opt(name).await? else {
            return Ok(Err(not_found(format!("volume {name:?} does not exist"))));
        };
        let st = src.status.clone().unwrap_or_default();
        if st.pool.as_deref() != Some(pool) {
            return Ok(Err(not_found(format!(
                "volume {name:?} is not in pool {pool}"
            ))));
        }
        if st.size_gib.is_none() || !matches!(st.phase, VolumePhase::Available | VolumePhase::InUse)
        {
            return Ok(Err(not_ready(format!(
                "volume {name:?} is {:?}, not Available",
                st.phase
            ))));
        }
        return Ok(Ok(Resolved::Copy(VolName::volume(&uid(&src)?)?)));
    }
    if let Some(name) = &source.image {
        let image = match find_image(&ctx.client, &ns, name).await? {
            Ok(i) => i,
            Err(blocked) => return Ok(Err(blocked)),
        };
        let image_uid = uid(&image)?;
        let recorded = record(ctx, &ns, &image).await?;
        let user = uid(vol)?;
        let source = image.spec.source.clone();
        let sum = stratus_runtime::image_token::checksum(&image);
        let format = cache_format(image.spec.disk_format);
        let cache = Arc::clone(&ctx.images);
        // Pinned, then looked up: the API server is asked for the data only on a miss.
        let hit = {
            let (cache, image_uid, source, sum) = (
                Arc::clone(&cache),
                image_uid.clone(),
                source.clone(),
                sum.clone(),
            );
            blocking(move || {
                cache.pin(&image_uid, &user)?;
                cache.cached(&image_uid, &source, sum.as_deref(), format)
            })
            .await?
        };
        let got = match hit {
            Ok(Some(hit)) => Ok(hit),
            Err(e) => Err(e),
            Ok(None) => {
                let data = stratus_runtime::image_token::served_data(&ctx.client, &image).await?;
                blocking(move || {
                    cache.fetch_source(&image_uid, &source, sum.as_deref(), format, data)
                })
                .await?
            }
        };
        return match got {
            Ok(c) => Ok(Ok(Resolved::Image(c.path, format, Box::new(recorded)))),
            Err(e) if e.is_final() => Ok(Err(Blocked {
                reason: Reason::ImageRefused.as_str(),
                message: format!("image {name:?}: {}", stratus_runtime::policy::chain(&e)),
                failed: true,
            })),
            Err(e) => Err(e.into()),
        };
    }
    Ok(Ok(Resolved::Empty))
}

/// Records an Event about `obj`.
async fn event<K: Resource<DynamicType = ()>>(
    ctx: &Ctx,
    obj: &K,
    type_: EventType,
    reason: &str,
    note: String,
) {
    stratus_runtime::events::publish(
        &ctx.recorder,
        &obj.object_ref(&()),
        type_,
        "Reconcile",
        reason,
        note,
    )
    .await;
}

/// Ends a pass that waits or failed for good: `phase` and a `Ready=False` condition.
async fn volume_blocked(
    ctx: &Ctx,
    vol: &Volume,
    phase: VolumePhase,
    reason: &'static str,
    message: &str,
) -> Result<(), StorageError> {
    let mut status = vol.status.clone().unwrap_or_default();
    status.phase = phase;
    ConditionType::Ready
        .no(reason, message)
        .set(&mut status.conditions, vol.metadata.generation);
    ctx.volumes.write_status(vol, &status).await?;
    Ok(())
}

/// Reports `vol`, held by a server, at the `size` it has rather than the one it asks for,
/// saying `why` its store does not grow it now: it grows once detached. Served as it is
/// meanwhile, its export kept to what its status asks: the guests holding it keep it at its
/// size, and a server may still be built with it.
async fn grow_when_detached(
    ctx: &Ctx,
    vol: &Volume,
    backend: &Arc<dyn Backend>,
    name: &VolName,
    size: u64,
    why: &str,
) -> Result<Action, StorageError> {
    let message = format!(
        "asks for {} GiB while a server holds it: {why}; it is served at {} GiB and grows once detached",
        vol.spec.size_gib,
        size >> 30
    );
    volume_report(ctx, vol, backend, name, size, None, Some(&message)).await?;
    Ok(Action::requeue(ctx.resync))
}

/// Reports `vol` made: its device, its size, Available (InUse while attached). `held`: why it is not at the size asked while a server
/// holds it (it grows once detached), said on `Ready=False` (`GrowsWhenDetached`) instead of
/// `Ready=True`.
async fn volume_report(
    ctx: &Ctx,
    vol: &Volume,
    backend: &Arc<dyn Backend>,
    name: &VolName,
    size: u64,
    recorded: Option<&Recorded>,
    held: Option<&str>,
) -> Result<(), StorageError> {
    let b = Arc::clone(backend);
    let n = name.clone();
    let device = blocking(move || b.device(&n)).await??;
    let mut status: VolumeStatus = vol.status.clone().unwrap_or_default();
    status.phase = if status.attached_to.is_some() {
        VolumePhase::InUse
    } else {
        VolumePhase::Available
    };
    status.size_gib = Some(size >> 30);
    status.device_path = Some(device.to_string_lossy().into_owned());
    if let Some(r) = recorded {
        status.source_image.clone_from(&r.source);
        status.kernel_image.clone_from(&r.kernel);
        status.ramdisk_image.clone_from(&r.ramdisk);
    }
    status.observed_generation = vol.metadata.generation;
    let ready = match held {
        Some(why) => ConditionType::Ready.no(Reason::GrowsWhenDetached.as_str(), why),
        None => ConditionType::Ready.yes(
            reasons::AVAILABLE,
            format!("{} in {}", name, backend.describe()),
        ),
    };
    ready.set(&mut status.conditions, vol.metadata.generation);
    if status.dropped_export.is_some() {
        // A status stored with an export of its own (before exports were VolumeExports) is
        // written whole without it: a server-side apply would leave it behind. A replace,
        // guarded by the resourceVersion read, writes the status as it is.
        let ns = vol.namespace().ok_or(StorageError::Incomplete)?;
        let mut next = vol.clone();
        next.status = Some(status);
        Api::<Volume>::namespaced(ctx.client.clone(), &ns)
            .replace_status(&vol.name_any(), &kube::api::PostParams::default(), &next)
            .await?;
    } else {
        ctx.volumes.write_status(vol, &status).await?;
    }
    Ok(())
}

/// Why the address of the node an export is for is not known.
#[derive(Debug)]
enum Peer {
    /// Its Hypervisor could not be read (the API did not answer): it may be known again soon.
    Unreadable(String),
    /// Its Hypervisor reports no address.
    NoAddress(String),
}

/// The address node `node` is reached from: its Hypervisor's `status.hostIp`.
async fn peer_address(ctx: &Ctx, node: &str) -> Result<IpAddr, Peer> {
    let hv = Api::<Hypervisor>::all(ctx.client.clone())
        .get_opt(node)
        .await
        .map_err(|e| Peer::Unreadable(format!("cannot read node {node}'s Hypervisor: {e}")))?;
    let ip = hv.and_then(|h| h.status?.host_ip);
    ip.as_deref().and_then(|ip| ip.parse().ok()).ok_or_else(|| {
        Peer::NoAddress(format!(
            "node {node} reports no address (its Hypervisor's status.hostIp) to export to"
        ))
    })
}

/// Whether the pool of the volume of `status` records the address exports are served on as
/// its node's storage address (`status.storageAddress`, written by the pools' heartbeat and
/// then kept): the API refuses an export at any other host, and compute nodes connect to no
/// other.
async fn recorded_address(
    ctx: &Ctx,
    status: &VolumeStatus,
) -> Result<Result<(), ExportError>, StorageError> {
    let Some(serving) = ctx.exports.address() else {
        return Ok(Err(ExportError::NoAddress));
    };
    let pool = status.pool.clone().unwrap_or_default();
    let recorded = Api::<StoragePool>::all(ctx.client.clone())
        .get_opt(&pool)
        .await?
        .and_then(|p| p.status?.storage_address);
    Ok(match recorded {
        None => Err(ExportError::Unrecorded(pool)),
        Some(r) if r.parse::<IpAddr>().ok() == Some(serving) => Ok(()),
        Some(recorded) => Err(ExportError::Moved {
            pool,
            recorded,
            serving,
        }),
    })
}

/// How many clients the export of a volume to `node` serves at once: one for a plain volume.
/// For a multi-attach volume over TLS (`tls`), every server it may have (16): only the
/// consuming node's certificate gets a session, and serving them all from the start means a
/// server joining there never makes the export again, which would cut the disks of the guests
/// already using it. In the clear, one per server of it on that node
/// (`status.attachments[].node`), so that no other process of that address gets a session.
fn export_clients(status: &VolumeStatus, node: &str, multi_attach: bool, tls: bool) -> u16 {
    if !multi_attach {
        return 1;
    }
    let there = if tls {
        MAX_ATTACHMENTS
    } else {
        status
            .attachments
            .iter()
            .filter(|a| a.node.as_deref() == Some(node))
            .count()
    };
    u16::try_from(there.clamp(1, MAX_ATTACHMENTS)).unwrap_or(1)
}

/// Whether a server of the volume of `status` is on another node than its data
/// (`status.attachments[].node`, `status.attachedNode`): it holds the volume over NBD.
fn over_nbd(status: &VolumeStatus) -> bool {
    let on = status.node.as_deref();
    status
        .attachments
        .iter()
        .filter_map(|a| a.node.as_deref())
        .chain(status.attached_node.as_deref())
        .any(|n| Some(n) != on)
}

/// Ends every export of `vol` (its data is going or gone, or no longer this node's to serve).
async fn end_export(ctx: &Ctx, vol: &Volume) -> Result<(), StorageError> {
    let (e, v) = (Arc::clone(&ctx.exports), uid(vol)?);
    blocking(move || e.stop_volume(&v)).await??;
    Ok(())
}

/// Where export `x` is served, as its status records it (a restarted agent serves it again
/// there).
fn recorded_served(x: &VolumeExport) -> Option<ServedAt> {
    let (host, port, name, tls) = x.served()?;
    Some(ServedAt {
        host: host.to_owned(),
        port,
        name: name.to_owned(),
        tls,
    })
}

/// `x`'s status after a pass: where it is served (`served`), or why it is not (`why`, with
/// its reason), its `Ready` condition saying so.
fn export_status(
    x: &VolumeExport,
    served: Option<&ServedAt>,
    why: Option<(&'static str, String)>,
) -> VolumeExportStatus {
    let mut status = x.status.clone().unwrap_or_default();
    status.host = served.map(|s| s.host.clone());
    status.port = served.map(|s| s.port);
    status.export_name = served.map(|s| s.name.clone());
    status.tls = served.is_some_and(|s| s.tls);
    let ready = match (served, why) {
        (_, Some((reason, message))) => ConditionType::Ready.no(reason, message),
        (Some(_), None) => ConditionType::Ready.yes(
            reasons::EXPORTED,
            format!("served over NBD to node {}", x.spec.node),
        ),
        (None, None) => ConditionType::Ready.no(reasons::EXPORT_FAILED, "not served"),
    };
    ready.set(&mut status.conditions, x.metadata.generation);
    status.observed_generation = x.metadata.generation;
    status
}

/// Writes `status` as `x`'s when it differs (a replace guarded by the resourceVersion read:
/// fields it no longer has go).
async fn write_export_status(
    ctx: &Ctx,
    x: &VolumeExport,
    status: VolumeExportStatus,
) -> Result<(), StorageError> {
    if x.status.as_ref() == Some(&status) {
        return Ok(());
    }
    let mut next = x.clone();
    next.status = Some(status);
    Api::<VolumeExport>::all(ctx.client.clone())
        .replace_status(&x.name_any(), &PostParams::default(), &next)
        .await?;
    Ok(())
}

/// Whether a running export is kept while the address of its node cannot be read: when its
/// status records it served (a guest there may be using it; only the export's deletion, or
/// its volume's, ends it, never an API that does not answer).
fn keeps_export(x: &VolumeExport, running: bool) -> bool {
    running && x.served().is_some()
}

/// Whether an attachment of the volume of `status` is on `node` (`status.attachments[].node`):
/// the only nodes its data is served to.
fn attached_on(status: &VolumeStatus, node: &str) -> bool {
    status
        .attachments
        .iter()
        .any(|a| a.node.as_deref() == Some(node))
}

/// One pass over a VolumeExport this node serves: its volume's data served over NBD to
/// `spec.node` (recorded in its status, `Ready=True`), or not served, saying why.
async fn serve_export(x: &VolumeExport, ctx: &Ctx) -> Result<Action, StorageError> {
    let key = x.name_any();
    let stop = || {
        let (e, k) = (Arc::clone(&ctx.exports), key.clone());
        blocking(move || e.stop(&k))
    };
    if x.spec.storage_node != ctx.node || x.metadata.deletion_timestamp.is_some() {
        stop().await??;
        return Ok(Action::await_change());
    }
    let v = &x.spec.volume;
    let vol = Api::<Volume>::namespaced(ctx.client.clone(), &v.namespace)
        .get_opt(&v.name)
        .await?
        .filter(|vol| vol.uid().as_deref() == Some(v.uid.as_str()));
    let status = vol
        .as_ref()
        .and_then(|vol| vol.status.clone())
        .unwrap_or_default();
    let Some(vol) = vol.filter(|_| status.node.as_deref() == Some(ctx.node.as_str())) else {
        // The volume is gone, or not this node's: the attachments controller deletes the
        // export; nothing of it is served meanwhile.
        stop().await??;
        return Ok(Action::await_change());
    };
    if !attached_on(&status, &x.spec.node) {
        // The API server makes an export only to a node holding the volume; one whose node
        // holds it no more (or never did, in an older store) serves nothing until it does.
        stop().await??;
        let why = format!(
            "no attachment of volume {}/{} is on node {}",
            v.namespace, v.name, x.spec.node
        );
        write_export_status(
            ctx,
            x,
            export_status(x, None, Some((reasons::NOT_ATTACHED, why))),
        )
        .await?;
        return Ok(Action::requeue(Duration::from_secs(5)));
    }
    let made = status.size_gib.is_some()
        && matches!(
            status.phase,
            VolumePhase::Available | VolumePhase::InUse | VolumePhase::Extending
        );
    let backend = status
        .pool
        .as_deref()
        .and_then(|p| Some(Arc::clone(ctx.served.get(p)?)));
    let (true, Some(backend)) = (made, backend) else {
        let why = format!(
            "volume {}/{} is {:?}, not made yet",
            v.namespace, v.name, status.phase
        );
        if !ctx.exports.runs(&key) {
            write_export_status(
                ctx,
                x,
                export_status(x, None, Some((reasons::VOLUME_NOT_READY, why))),
            )
            .await?;
        }
        return Ok(Action::requeue(Duration::from_secs(5)));
    };
    let name = VolName::volume(&v.uid)?;
    let device = blocking(move || backend.device(&name)).await??;
    let node = x.spec.node.clone();
    let made = match recorded_address(ctx, &status).await? {
        Err(e) => Err(e),
        Ok(()) => match peer_address(ctx, &node).await {
            Ok(peer) => {
                let clients =
                    export_clients(&status, &node, vol.spec.multi_attach, ctx.exports.tls());
                let (e, k, u, was) = (
                    Arc::clone(&ctx.exports),
                    key.clone(),
                    v.uid.clone(),
                    recorded_served(x),
                );
                // Served at the size its agent made it (an export keeps the size it opened
                // with: a volume grown since gets an export of its own beside it).
                let size = status.size_gib.unwrap_or_default() << 30;
                blocking(move || {
                    e.ensure(&k, &u, &device, &node, peer, clients, size, was.as_ref())
                })
                .await?
            }
            Err(Peer::Unreadable(why)) => {
                if keeps_export(x, ctx.exports.runs(&key)) {
                    // Kept as it is, status and all; the pass is tried again.
                    return Err(ExportError::Serve(why).into());
                }
                Err(ExportError::Serve(why))
            }
            Err(Peer::NoAddress(why)) => Err(ExportError::Serve(why)),
        },
    };
    match made {
        Ok(served) => {
            // The exports made before the volume grew end once the node's QEMU has left them
            // for this one (or holds none: its guest connects to this one when it starts).
            let (e, k) = (Arc::clone(&ctx.exports), key.clone());
            let held = blocking(move || e.end_left(&k)).await??;
            let mut next = export_status(x, Some(&served), None);
            if held > 0 {
                ConditionType::Ready
                    .yes(
                        reasons::EXPORTED,
                        format!(
                            "served over NBD to node {} at its new size; {held} earlier export(s) at its smaller size serve it until that node's QEMU leaves them",
                            x.spec.node
                        ),
                    )
                    .set(&mut next.conditions, x.metadata.generation);
            }
            write_export_status(ctx, x, next).await?;
            Ok(Action::requeue(if held > 0 {
                Duration::from_secs(2)
            } else {
                ctx.resync
            }))
        }
        Err(e) => {
            stop().await??;
            let why = format!("cannot serve it to node {}: {e}", x.spec.node);
            write_export_status(
                ctx,
                x,
                export_status(x, None, Some((reasons::EXPORT_FAILED, why))),
            )
            .await?;
            Err(e.into())
        }
    }
}

async fn reconcile_export(x: Arc<VolumeExport>, ctx: Arc<Ctx>) -> Result<Action, StorageError> {
    let span = tracing::info_span!("export", name = %x.name_any(), node = %x.spec.node);
    serve_export(&x, &ctx).instrument(span).await
}

fn export_error(x: Arc<VolumeExport>, e: &StorageError, _: Arc<Ctx>) -> Action {
    tracing::warn!(export = %x.name_any(), error = %stratus_runtime::policy::chain(e), "volume export pass failed");
    match e.retry() {
        Retry::Never => Action::requeue(Duration::from_secs(60)),
        _ => Action::requeue(Duration::from_secs(5)),
    }
}

/// One pass over a Volume.
async fn sync_volume(vol: &Volume, ctx: &Ctx) -> Result<Action, StorageError> {
    let Some(status) = &vol.status else {
        return Ok(Action::await_change());
    };
    if status.node.as_deref() != Some(ctx.node.as_str()) {
        return Ok(Action::await_change());
    }
    let Some((pool, backend)) = status
        .pool
        .as_deref()
        .and_then(|p| Some((p, Arc::clone(ctx.served.get(p)?))))
    else {
        // Not a pool this node serves (the pool's Ready condition says why).
        return Ok(Action::await_change());
    };
    let name = VolName::volume(&uid(vol)?)?;
    let intent = Intent {
        stage: finalizer::stage(vol, FINALIZER),
        size: Some(vol.spec.size_gib << 30),
        made: status.size_gib.is_some(),
        attached: !status.attached_servers().is_empty(),
        grows_in_use: backend.grows_in_use(),
    };
    let observed = if needs_observed(intent.stage) {
        let (b, n) = (Arc::clone(&backend), name.clone());
        blocking(move || b.observe(&n)).await??
    } else {
        None
    };
    let step = plan(intent, observed.map(|o| o.size));
    tracing::debug!(?step, "volume step");
    if matches!(
        step,
        Step::Nothing | Step::Missing | Step::Delete | Step::Release
    ) {
        // Whatever else this pass does or fails to do, a node that no longer holds the
        // volume keeps no access to it.
        end_export(ctx, vol).await?;
    }
    match step {
        Step::Nothing => Ok(Action::await_change()),
        Step::AddFinalizer => {
            finalizer::add(&ctx.client, vol, FINALIZER).await?;
            Ok(Action::await_change())
        }
        Step::Create => {
            let source = match resolve(ctx, vol, pool).await? {
                Ok(s) => s,
                Err(blocked) => {
                    let phase = if blocked.failed {
                        VolumePhase::Error
                    } else {
                        VolumePhase::Creating
                    };
                    volume_blocked(ctx, vol, phase, blocked.reason, &blocked.message).await?;
                    return Ok(Action::requeue(if blocked.failed {
                        Duration::from_secs(60)
                    } else {
                        Duration::from_secs(2)
                    }));
                }
            };
            let size = vol.spec.size_gib << 30;
            let recorded = match &source {
                Resolved::Image(_, _, r) => Some((**r).clone()),
                _ => None,
            };
            let (b, n) = (Arc::clone(&backend), name.clone());
            let made = blocking(move || {
                let source = match &source {
                    Resolved::Empty => Source::Empty,
                    Resolved::Image(path, format, _) => Source::Image {
                        path,
                        format: *format,
                    },
                    Resolved::Copy(from) => Source::Copy(from),
                };
                b.create(&n, size, source)
            })
            .await?;
            match made {
                Ok(o) => {
                    volume_report(ctx, vol, &backend, &name, o.size, recorded.as_ref(), None)
                        .await?;
                    Ok(Action::requeue(ctx.resync))
                }
                Err(e) => {
                    let message = stratus_runtime::policy::chain(&e);
                    let phase = if e.is_final() || matches!(e, DriverError::NotFound(_)) {
                        VolumePhase::Error
                    } else {
                        VolumePhase::Creating
                    };
                    volume_blocked(ctx, vol, phase, reasons::CREATE_FAILED, &message).await?;
                    Err(e.into())
                }
            }
        }
        Step::GrowWhenDetached => {
            let size = observed.map(|o| o.size).unwrap_or_default();
            let why = format!("{} cannot grow a volume a guest holds", backend.describe());
            grow_when_detached(ctx, vol, &backend, &name, size, &why).await
        }
        Step::Extend(to) | Step::ExtendInPlace(to) => {
            let held = matches!(step, Step::ExtendInPlace(_));
            // Tried before and waiting for the space after it or a detach: tried again at
            // each pass, without saying Extending each time.
            let waiting = held
                && ConditionType::Ready
                    .find(&status.conditions)
                    .is_some_and(|c| c.reason == Reason::GrowsWhenDetached.as_str());
            if status.phase != VolumePhase::Extending && !waiting {
                volume_blocked(
                    ctx,
                    vol,
                    VolumePhase::Extending,
                    reasons::EXTENDING,
                    &format!("growing to {} GiB", vol.spec.size_gib),
                )
                .await?;
            }
            let (b, n) = (Arc::clone(&backend), name.clone());
            // A volume a guest of another node holds through an export grows where it is
            // (a file pool's QEMU here grows the file it holds itself, with the guest's disk).
            let in_use = held || (intent.attached && over_nbd(status));
            let grown = blocking(move || {
                if in_use {
                    b.extend_held(&n, to)
                } else {
                    b.extend(&n, to)
                }
            })
            .await?;
            match grown {
                Err(DriverError::NotInPlace(why)) => {
                    let size = observed.map(|o| o.size).unwrap_or_default();
                    grow_when_detached(ctx, vol, &backend, &name, size, &why).await
                }
                Ok(o) => {
                    volume_report(ctx, vol, &backend, &name, o.size, None, None).await?;
                    event(
                        ctx,
                        vol,
                        EventType::Normal,
                        "Extended",
                        format!("grown to {} GiB", o.size >> 30),
                    )
                    .await;
                    Ok(Action::requeue(ctx.resync))
                }
                Err(e) => {
                    let message = stratus_runtime::policy::chain(&e);
                    volume_blocked(
                        ctx,
                        vol,
                        VolumePhase::Extending,
                        reasons::CREATE_FAILED,
                        &message,
                    )
                    .await?;
                    Err(e.into())
                }
            }
        }
        Step::Report => {
            let size = observed.map(|o| o.size).unwrap_or_default();
            volume_report(ctx, vol, &backend, &name, size, None, None).await?;
            Ok(Action::requeue(ctx.resync))
        }
        Step::Missing => {
            let told = status.phase == VolumePhase::Error
                && ConditionType::Ready
                    .find(&status.conditions)
                    .is_some_and(|c| c.reason == reasons::MISSING);
            let message = format!(
                "{name} is gone from {}: it was removed outside Stratus and is not made again empty; delete the volume",
                backend.describe()
            );
            if !told {
                tracing::warn!(volume = %vol.name_any(), %message, "volume data missing");
                event(
                    ctx,
                    vol,
                    EventType::Warning,
                    reasons::MISSING,
                    message.clone(),
                )
                .await;
            }
            let mut next = status.clone();
            next.phase = VolumePhase::Error;
            next.device_path = None;
            ConditionType::Ready
                .no(reasons::MISSING, message)
                .set(&mut next.conditions, vol.metadata.generation);
            ctx.volumes.write_status(vol, &next).await?;
            Ok(Action::requeue(ctx.resync))
        }
        Step::WaitDetach => {
            let to = status.attached_to.clone().unwrap_or_default();
            volume_blocked(
                ctx,
                vol,
                VolumePhase::Deleting,
                reasons::ATTACHED,
                &format!("deleted; waits for server {to:?} to detach it"),
            )
            .await?;
            Ok(Action::requeue(Duration::from_secs(10)))
        }
        Step::Delete => {
            let (b, n) = (Arc::clone(&backend), name.clone());
            blocking(move || b.delete(&n)).await??;
            finalizer::release(&ctx.client, vol, FINALIZER).await?;
            Ok(Action::await_change())
        }
        Step::Release => {
            finalizer::release(&ctx.client, vol, FINALIZER).await?;
            Ok(Action::await_change())
        }
    }
}

/// Writes a snapshot's `phase` and `Ready=False` condition.
async fn snapshot_blocked(
    ctx: &Ctx,
    snap: &VolumeSnapshot,
    phase: VolumeSnapshotPhase,
    reason: &'static str,
    message: &str,
) -> Result<(), StorageError> {
    let mut status = snap.status.clone().unwrap_or_default();
    status.phase = phase;
    ConditionType::Ready
        .no(reason, message)
        .set(&mut status.conditions, snap.metadata.generation);
    ctx.snapshots.write_status(snap, &status).await?;
    Ok(())
}

/// The Volume `snap` is of, if it is in `pool` and made: `Err` says why not.
async fn snapshot_source(
    ctx: &Ctx,
    snap: &VolumeSnapshot,
    pool: &str,
) -> Result<Result<VolName, Blocked>, StorageError> {
    let ns = snap.namespace().unwrap_or_default();
    let name = &snap.spec.volume;
    let api: Api<Volume> = Api::namespaced(ctx.client.clone(), &ns);
    let Some(vol) = api.get_opt(name).await? else {
        return Ok(Err(Blocked {
            reason: reasons::SOURCE_NOT_FOUND,
            message: format!("volume {name:?} does not exist"),
            failed: true,
        }));
    };
    let vol_uid = uid(&vol)?;
    if let Some(want) = snap.annotations().get(VOLUME_UID)
        && *want != vol_uid
    {
        return Ok(Err(Blocked {
            reason: reasons::SOURCE_NOT_FOUND,
            message: format!("volume {name:?} is not the volume the snapshot was asked of"),
            failed: true,
        }));
    }
    let st = vol.status.clone().unwrap_or_default();
    if st.pool.as_deref() != Some(pool) {
        return Ok(Err(Blocked {
            reason: reasons::SOURCE_NOT_FOUND,
            message: format!("volume {name:?} is not in pool {pool}"),
            failed: true,
        }));
    }
    if st.size_gib.is_none() {
        return Ok(Err(Blocked {
            reason: reasons::SOURCE_NOT_READY,
            message: format!("volume {name:?} is {:?}, not made yet", st.phase),
            failed: false,
        }));
    }
    Ok(Ok(VolName::volume(&vol_uid)?))
}

/// One pass over a VolumeSnapshot.
async fn sync_snapshot(snap: &VolumeSnapshot, ctx: &Ctx) -> Result<Action, StorageError> {
    let Some(status) = &snap.status else {
        return Ok(Action::await_change());
    };
    if status.node.as_deref() != Some(ctx.node.as_str()) {
        return Ok(Action::await_change());
    }
    let Some((pool, backend)) = status
        .pool
        .as_deref()
        .and_then(|p| Some((p, Arc::clone(ctx.served.get(p)?))))
    else {
        return Ok(Action::await_change());
    };
    let name = VolName::snapshot(&uid(snap)?)?;
    let intent = Intent {
        stage: finalizer::stage(snap, FINALIZER),
        size: None,
        made: status.created_at.is_some(),
        attached: false,
        grows_in_use: InUseGrowth::Always,
    };
    let observed = if needs_observed(intent.stage) {
        let (b, n) = (Arc::clone(&backend), name.clone());
        blocking(move || b.observe(&n)).await??
    } else {
        None
    };
    let report = |size: u64| {
        let mut next: VolumeSnapshotStatus = status.clone();
        next.phase = VolumeSnapshotPhase::Available;
        next.size_gib = next.size_gib.or(Some(size >> 30));
        next.created_at = next
            .created_at
            .clone()
            .or_else(|| Some(Time(k8s_openapi::jiff::Timestamp::now())));
        next.observed_generation = snap.metadata.generation;
        ConditionType::Ready
            .yes(
                reasons::AVAILABLE,
                format!("{name} in {}", backend.describe()),
            )
            .set(&mut next.conditions, snap.metadata.generation);
        next
    };
    match plan(intent, observed.map(|o| o.size)) {
        Step::Nothing => Ok(Action::await_change()),
        Step::AddFinalizer => {
            finalizer::add(&ctx.client, snap, FINALIZER).await?;
            Ok(Action::await_change())
        }
        Step::Create => {
            let volume = match snapshot_source(ctx, snap, pool).await? {
                Ok(v) => v,
                Err(blocked) => {
                    let phase = if blocked.failed {
                        VolumeSnapshotPhase::Error
                    } else {
                        VolumeSnapshotPhase::Creating
                    };
                    snapshot_blocked(ctx, snap, phase, blocked.reason, &blocked.message).await?;
                    return Ok(Action::requeue(if blocked.failed {
                        Duration::from_secs(60)
                    } else {
                        Duration::from_secs(2)
                    }));
                }
            };
            let (b, n) = (Arc::clone(&backend), name.clone());
            match blocking(move || b.snapshot(&volume, &n)).await? {
                Ok(o) => {
                    ctx.snapshots.write_status(snap, &report(o.size)).await?;
                    Ok(Action::requeue(ctx.resync))
                }
                Err(e) => {
                    let message = stratus_runtime::policy::chain(&e);
                    let phase = if e.is_final() || matches!(e, DriverError::NotFound(_)) {
                        VolumeSnapshotPhase::Error
                    } else {
                        VolumeSnapshotPhase::Creating
                    };
                    snapshot_blocked(ctx, snap, phase, reasons::CREATE_FAILED, &message).await?;
                    Err(e.into())
                }
            }
        }
        // A snapshot is never held by a guest nor grown.
        Step::Extend(_) | Step::ExtendInPlace(_) | Step::GrowWhenDetached | Step::Report => {
            let size = observed.map(|o| o.size).unwrap_or_default();
            ctx.snapshots.write_status(snap, &report(size)).await?;
            Ok(Action::requeue(ctx.resync))
        }
        Step::Missing => {
            let message = format!(
                "{name} is gone from {}: it was removed outside Stratus; delete the snapshot",
                backend.describe()
            );
            if status.phase != VolumeSnapshotPhase::Error {
                event(
                    ctx,
                    snap,
                    EventType::Warning,
                    reasons::MISSING,
                    message.clone(),
                )
                .await;
            }
            snapshot_blocked(
                ctx,
                snap,
                VolumeSnapshotPhase::Error,
                reasons::MISSING,
                &message,
            )
            .await?;
            Ok(Action::requeue(ctx.resync))
        }
        Step::WaitDetach => Ok(Action::requeue(Duration::from_secs(10))),
        Step::Delete => {
            let (b, n) = (Arc::clone(&backend), name.clone());
            blocking(move || b.delete(&n)).await??;
            finalizer::release(&ctx.client, snap, FINALIZER).await?;
            Ok(Action::await_change())
        }
        Step::Release => {
            finalizer::release(&ctx.client, snap, FINALIZER).await?;
            Ok(Action::await_change())
        }
    }
}

async fn reconcile_volume(vol: Arc<Volume>, ctx: Arc<Ctx>) -> Result<Action, StorageError> {
    let span = tracing::info_span!("volume", namespace = %vol.namespace().unwrap_or_default(), name = %vol.name_any());
    let result = sync_volume(&vol, &ctx).instrument(span).await;
    ctx.volumes.finish(&*vol, result).await
}

fn volume_error(vol: Arc<Volume>, e: &StorageError, ctx: Arc<Ctx>) -> Action {
    ctx.volumes.error_policy(&vol, e)
}

async fn reconcile_snapshot(
    snap: Arc<VolumeSnapshot>,
    ctx: Arc<Ctx>,
) -> Result<Action, StorageError> {
    let span = tracing::info_span!("snapshot", namespace = %snap.namespace().unwrap_or_default(), name = %snap.name_any());
    let result = sync_snapshot(&snap, &ctx).instrument(span).await;
    ctx.snapshots.finish(&*snap, result).await
}

fn snapshot_error(snap: Arc<VolumeSnapshot>, e: &StorageError, ctx: Arc<Ctx>) -> Action {
    ctx.snapshots.error_policy(&snap, e)
}

/// Removes what interrupted builds left in every pool (retried until it gets through, so no
/// reconcile runs over a half-built volume).
async fn recover(pools: &[(PoolConfig, Arc<dyn Backend>)]) {
    for (config, backend) in pools {
        let mut pause = Duration::from_millis(500);
        loop {
            let b = Arc::clone(backend);
            match blocking(move || b.recover()).await {
                Ok(Ok(removed)) => {
                    if !removed.is_empty() {
                        tracing::info!(pool = %config.name, ?removed, "removed what interrupted operations left");
                    }
                    break;
                }
                Ok(Err(DriverError::Unavailable(why))) => {
                    tracing::warn!(pool = %config.name, %why, "pool unavailable; nothing to recover");
                    break;
                }
                Ok(Err(e)) => {
                    tracing::warn!(pool = %config.name, error = %stratus_runtime::policy::chain(&e), "cannot recover the pool; retrying")
                }
                Err(e) => {
                    tracing::warn!(pool = %config.name, error = %e, "cannot recover the pool; retrying")
                }
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(30));
        }
    }
}

/// How often the pools are swept of volumes and snapshots no object names any more.
const ORPHAN_SWEEP: Duration = Duration::from_secs(120);

/// What a pool holds that no Volume or VolumeSnapshot placed on the node names (by uid): left
/// by objects deleted without the agent while its node was taken for lost (the volume
/// scheduler lets them go; see `stratus_controllers::volumes::LOST_AFTER`).
fn orphans(stored: &[VolName], volumes: &[String], snapshots: &[String]) -> Vec<VolName> {
    let named: std::collections::HashSet<VolName> = volumes
        .iter()
        .filter_map(|u| VolName::volume(u).ok())
        .chain(snapshots.iter().filter_map(|u| VolName::snapshot(u).ok()))
        .collect();
    stored
        .iter()
        .filter(|n| !named.contains(*n))
        .cloned()
        .collect()
}

/// One sweep: each served pool's volumes and snapshots are read first, then the objects
/// placed on the node, so whatever the agent makes meanwhile (only for an object it sees) is
/// never taken for an orphan; what no object names is deleted.
async fn sweep_orphans_once(ctx: &Ctx) -> Result<(), StorageError> {
    let mut stored = Vec::new();
    for (pool, backend) in ctx.served.iter() {
        let b = Arc::clone(backend);
        match blocking(move || b.list()).await? {
            Ok(list) => stored.push((pool.clone(), Arc::clone(backend), list)),
            Err(e) => {
                tracing::warn!(%pool, error = %stratus_runtime::policy::chain(&e), "cannot list the pool for orphans")
            }
        }
    }
    let fields = kube::api::ListParams::default().fields(&format!("status.node={}", ctx.node));
    let uids = |m: Vec<kube::api::ObjectMeta>| -> Vec<String> {
        m.into_iter().filter_map(|m| m.uid).collect()
    };
    let volumes = Api::<Volume>::all(ctx.client.clone()).list(&fields).await?;
    let volumes = uids(volumes.items.into_iter().map(|v| v.metadata).collect());
    let snapshots = Api::<VolumeSnapshot>::all(ctx.client.clone())
        .list(&fields)
        .await?;
    let snapshots = uids(snapshots.items.into_iter().map(|s| s.metadata).collect());
    for (pool, backend, list) in stored {
        let names: Vec<VolName> = list.into_iter().map(|(n, _)| n).collect();
        for name in orphans(&names, &volumes, &snapshots) {
            let (b, n) = (Arc::clone(&backend), name.clone());
            match blocking(move || b.delete(&n)).await? {
                Ok(()) => tracing::warn!(%pool, %name, "removed data no volume or snapshot names"),
                Err(e) => {
                    tracing::warn!(%pool, %name, error = %stratus_runtime::policy::chain(&e), "cannot remove orphaned data")
                }
            }
        }
    }
    Ok(())
}

/// Sweeps the pools of orphans at start and every [`ORPHAN_SWEEP`].
async fn sweep_orphans(ctx: Arc<Ctx>) {
    let mut tick = tokio::time::interval(ORPHAN_SWEEP);
    loop {
        tick.tick().await;
        if let Err(e) = sweep_orphans_once(&ctx).await {
            tracing::warn!(error = %stratus_runtime::policy::chain(&e), "orphan sweep failed");
        }
    }
}

/// Whether the objects of `store` were listed (within 2 s): a sweep decides nothing before.
async fn listed<K>(store: &Store<K>) -> bool
where
    K: kube::runtime::reflector::Lookup + Clone + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    tokio::time::timeout(Duration::from_secs(2), stratus_runtime::store_ready(store))
        .await
        .is_ok()
}

/// How often the exports are checked against the VolumeExports (and the table written again).
const EXPORT_SWEEP: Duration = Duration::from_secs(30);

/// Ends, every [`EXPORT_SWEEP`], the exports whose VolumeExport is gone (deleted while the
/// agent was away, or between two passes), and writes the table again.
async fn sweep_exports(exports: Arc<Exports>, objects: Store<VolumeExport>) {
    let mut tick = tokio::time::interval(EXPORT_SWEEP);
    loop {
        tick.tick().await;
        if !listed(&objects).await {
            continue;
        }
        let known: std::collections::HashSet<String> =
            objects.state().iter().map(|x| x.name_any()).collect();
        let e = Arc::clone(&exports);
        let swept = blocking(move || {
            for (x, _) in e.served() {
                if !known.contains(&x) {
                    e.stop(&x)?;
                }
            }
            e.refresh()
        })
        .await;
        match swept {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "export sweep failed"),
            Err(e) => tracing::warn!(error = %e, "export sweep failed"),
        }
    }
}

/// How often cached images no volume is being made from are removed.
const IMAGE_SWEEP: Duration = Duration::from_secs(300);

/// Whether volume `v` may still be made from the image it pinned: its data is copied into it
/// before it is recorded as made (`status.sizeGiB`), and the image is not needed after.
fn needs_image(v: &Volume) -> bool {
    v.status.as_ref().is_none_or(|s| s.size_gib.is_none())
}

/// Removes, every [`IMAGE_SWEEP`], the cached images no volume placed on the node is still
/// being made from (nothing before the volumes are listed).
async fn sweep_images(cache: Arc<ImageCache>, volumes: kube::runtime::reflector::Store<Volume>) {
    let mut tick = tokio::time::interval(IMAGE_SWEEP);
    loop {
        tick.tick().await;
        if !listed(&volumes).await {
            continue;
        }
        let users: std::collections::HashSet<String> = volumes
            .state()
            .iter()
            .filter(|v| needs_image(v))
            .filter_map(|v| v.uid())
            .collect();
        let c = Arc::clone(&cache);
        match blocking(move || c.sweep(|u| users.contains(u))).await {
            Ok(Ok(gone)) if gone.is_empty() => {}
            Ok(Ok(gone)) => {
                tracing::info!(images = ?gone, "removed cached images no volume is made from")
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "image cache sweep failed"),
            Err(e) => tracing::warn!(error = %e, "image cache sweep failed"),
        }
    }
}

/// Runs the storage agent until dropped: recovers each pool, registers the pools, heartbeats
/// them and reconciles the Volumes and VolumeSnapshots placed on the node's served pools.
pub async fn run(client: Client, config: Config, pools: Vec<(PoolConfig, Arc<dyn Backend>)>) {
    recover(&pools).await;
    let mut pause = Duration::from_millis(200);
    let served = loop {
        match crate::pool::register(&client, &config.node, &pools).await {
            Ok(s) => break Arc::new(s),
            Err(e) => {
                tracing::warn!(error = %e, "cannot register the storage pools; retrying");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(10));
            }
        }
    };
    tracing::info!(node = %config.node, pools = ?served.keys().collect::<Vec<_>>(), "storage agent serving");
    // The exports a previous run left serving guests are taken back before any reconcile, so
    // the table keeps their ports open to their nodes alone.
    let exports = Arc::new(
        Exports::new(
            config.storage_address,
            config.export_ports,
            config.state_dir.join("exports"),
        )
        .with_tls(config.nbd_tls_dir.clone()),
    );
    let e = Arc::clone(&exports);
    match blocking(move || e.adopt()).await {
        Ok(Ok(0)) => {}
        Ok(Ok(n)) => tracing::info!(exports = n, "exports taken back"),
        Ok(Err(e)) => tracing::warn!(error = %e, "cannot take back the exports"),
        Err(e) => tracing::warn!(error = %e, "cannot take back the exports"),
    }
    let heartbeat = crate::pool::heartbeat(
        client.clone(),
        config.node.clone(),
        pools,
        Arc::clone(&served),
        config.heartbeat,
        config.storage_address,
    );
    let ctx = Arc::new(Ctx {
        client: client.clone(),
        node: config.node.clone(),
        served,
        images: Arc::new(ImageCache::new(
            config.state_dir.join("volume-images"),
            config.image_policy.clone(),
        )),
        volumes: Runtime::new(client.clone(), MANAGER),
        snapshots: Runtime::new(client.clone(), MANAGER),
        recorder: Recorder::new(
            client.clone(),
            Reporter {
                controller: MANAGER.into(),
                instance: Some(config.node.clone()),
            },
        ),
        resync: config.resync,
        exports: Arc::clone(&exports),
    });
    let selector = format!("status.node={}", config.node);
    let controller = Controller::new(
        Api::<Volume>::all(client.clone()),
        watcher::Config::default().fields(&selector),
    );
    let store = controller.store();
    let volumes = controller
        .run(reconcile_volume, volume_error, Arc::clone(&ctx))
        .for_each(|_| async {});
    let sweeper = sweep_images(Arc::clone(&ctx.images), store);
    // The exports this node serves, each woken again by a change of its volume.
    let served = Controller::new(
        Api::<VolumeExport>::all(client.clone()),
        watcher::Config::default().fields(&format!("spec.storageNode={}", config.node)),
    );
    let objects = served.store();
    let of_volume = objects.clone();
    let served = served
        .watches(
            Api::<Volume>::all(client.clone()),
            watcher::Config::default().fields(&selector),
            move |vol: Volume| {
                let uid = vol.uid();
                of_volume
                    .state()
                    .into_iter()
                    .filter(|x| Some(&x.spec.volume.uid) == uid.as_ref())
                    .map(|x| ObjectRef::from_obj(&*x))
                    .collect::<Vec<_>>()
            },
        )
        .run(reconcile_export, export_error, Arc::clone(&ctx))
        .for_each(|_| async {});
    let exported = sweep_exports(Arc::clone(&ctx.exports), objects);
    let orphans = sweep_orphans(Arc::clone(&ctx));
    let snapshots = Controller::new(
        Api::<VolumeSnapshot>::all(client.clone()),
        watcher::Config::default().fields(&selector),
    )
    .run(reconcile_snapshot, snapshot_error, ctx)
    .for_each(|_| async {});
    tokio::select! {
        () = heartbeat => {}
        () = sweeper => {}
        () = orphans => {}
        () = exported => {}
        () = volumes => tracing::warn!("the volume controller stopped"),
        () = served => tracing::warn!("the volume export controller stopped"),
        () = snapshots => tracing::warn!("the snapshot controller stopped"),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn volume(status: serde_json::Value) -> Volume {
        serde_json::from_value(json!({
            "apiVersion": "storage.stratus.dev/v1", "kind": "Volume",
            "metadata": {"name": "v", "namespace": "demo", "uid": "u1"},
            "spec": {"sizeGiB": 1, "source": {"image": "tiny"}},
            "status": status,
        }))
        .expect("a volume")
    }

    #[test]
    fn a_volume_is_held_over_nbd_when_a_server_of_it_is_on_another_node() {
        let held = |status| over_nbd(&volume(status).status.unwrap_or_default());
        assert!(!held(json!({"node": "a"})), "detached");
        assert!(!held(
            json!({"node": "a", "attachedTo": "web", "attachedNode": "a", "attachments": [{"server": "web", "node": "a"}]})
        ));
        assert!(held(
            json!({"node": "a", "attachedTo": "web", "attachedNode": "b"})
        ));
        assert!(held(
            json!({"node": "a", "attachedTo": "web", "attachedNode": "a",
            "attachments": [{"server": "web", "node": "a"}, {"server": "db", "node": "b"}]})
        ));
    }

    #[test]
    fn an_image_is_kept_only_until_its_volume_is_made() {
        assert!(needs_image(&volume(json!({"phase": "Pending"}))));
        assert!(needs_image(&volume(
            json!({"phase": "Creating", "pool": "p", "node": "n"})
        )));
        assert!(!needs_image(&volume(
            json!({"phase": "Available", "sizeGiB": 1, "pool": "p", "node": "n"})
        )));
        // A made volume in Error (its data gone) is never made again from the image.
        assert!(!needs_image(&volume(
            json!({"phase": "Error", "sizeGiB": 1})
        )));
    }

    #[test]
    fn only_what_no_object_names_is_an_orphan() {
        let v = |u: &str| VolName::volume(u).expect("uid");
        let s = |u: &str| VolName::snapshot(u).expect("uid");
        let stored = [v("a"), v("b"), s("c"), s("d"), v("c")];
        assert_eq!(
            orphans(&stored, &["a".into()], &["c".into()]),
            vec![v("b"), s("d"), v("c")],
            "a snapshot's uid names no volume, nor the reverse"
        );
        assert!(orphans(&stored[..1], &["a".into()], &[]).is_empty());
        assert!(orphans(&[], &[], &[]).is_empty());
    }

    fn export(status: serde_json::Value) -> VolumeExport {
        serde_json::from_value(json!({
            "apiVersion": "storage.stratus.dev/v1", "kind": "VolumeExport",
            "metadata": {"name": "u1.n2", "generation": 1},
            "spec": {"volume": {"namespace": "demo", "name": "v", "uid": "u1"},
                     "storageNode": "n0", "node": "n2"},
            "status": status,
        }))
        .expect("an export")
    }

    #[test]
    fn an_export_is_served_only_to_a_node_an_attachment_is_on() {
        let v = volume(json!({"phase": "InUse", "node": "n0", "attachedTo": "web",
            "attachments": [{"server": "web", "node": "n2"}, {"server": "db"}]}));
        let status = v.status.expect("a status");
        assert!(attached_on(&status, "n2"));
        assert!(!attached_on(&status, "n3"), "no attachment there");
        assert!(!attached_on(&status, "n0"), "the storage node holds none");
        let legacy = volume(json!({"phase": "InUse", "attachedTo": "web", "attachedNode": "n2"}));
        assert!(
            !attached_on(&legacy.status.expect("a status"), "n2"),
            "the controller records attachments[] before it makes an export"
        );
    }

    #[test]
    fn a_running_export_outlives_an_unreadable_peer() {
        let served = export(json!({"host": "10.0.0.1", "port": 10809, "exportName": "x1"}));
        assert!(keeps_export(&served, true));
        assert!(
            !keeps_export(&served, false),
            "no export is running: nothing to keep"
        );
        assert!(
            !keeps_export(&export(json!({})), true),
            "its status records it served nowhere"
        );
    }

    #[test]
    fn an_exports_status_says_where_it_is_served_or_why_not() {
        let x = export(json!({}));
        let at = ServedAt {
            host: "10.0.0.1".into(),
            port: 10809,
            name: "x1".into(),
            tls: true,
        };
        let s = export_status(&x, Some(&at), None);
        assert_eq!(
            (s.host.as_deref(), s.port, s.export_name.as_deref(), s.tls),
            (Some("10.0.0.1"), Some(10809), Some("x1"), true)
        );
        let ready = ConditionType::Ready.find(&s.conditions).expect("Ready");
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("True", "Exported")
        );
        assert_eq!(
            recorded_served(&export(serde_json::to_value(&s).expect("json"))),
            Some(at)
        );
        // Not served: where it was is taken out, and the condition says why.
        let mut was = x.clone();
        was.status = Some(s);
        let s = export_status(
            &was,
            None,
            Some((
                reasons::EXPORT_FAILED,
                "cannot serve it to node n2: no address".into(),
            )),
        );
        assert_eq!(
            (s.host, s.port, s.export_name, s.tls),
            (None, None, None, false)
        );
        let ready = ConditionType::Ready.find(&s.conditions).expect("Ready");
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("False", "ExportFailed")
        );
        assert!(ready.message.contains("no address"), "{}", ready.message);
    }

    #[test]
    fn an_export_serves_as_many_clients_as_servers_on_its_node() {
        let status = serde_json::from_value::<VolumeStatus>(json!({
            "attachedTo": "a", "attachedNode": "n1",
            "attachments": [
                {"server": "a", "node": "n1"}, {"server": "b", "node": "n2"},
                {"server": "c", "node": "n1"}, {"server": "d"},
            ],
        }))
        .expect("a status");
        assert_eq!(export_clients(&status, "n1", true, false), 2);
        assert_eq!(export_clients(&status, "n2", true, false), 1);
        assert_eq!(
            export_clients(&status, "n3", true, false),
            1,
            "at least one"
        );
        assert_eq!(
            export_clients(&status, "n1", false, false),
            1,
            "a plain volume"
        );
        // Over TLS a multi-attach export serves every server it may have from the start, so
        // one joining never makes it again; a plain volume still one.
        let all = u16::try_from(MAX_ATTACHMENTS).expect("a small bound");
        assert_eq!(export_clients(&status, "n2", true, true), all);
        assert_eq!(
            export_clients(&status, "n1", false, true),
            1,
            "a plain volume"
        );
    }

    #[test]
    fn errors_say_whether_retrying_helps() {
        let invalid = StorageError::Driver(DriverError::Invalid("too small".into()));
        assert_eq!(invalid.retry(), Retry::Never);
        let busy = StorageError::Driver(DriverError::NoSpace("full".into()));
        assert_eq!(busy.retry(), Retry::Backoff);
        let conflict = StorageError::Api(kube::Error::Api(Box::new(kube::core::Status {
            code: 409,
            ..Default::default()
        })));
        assert_eq!(conflict.retry(), Retry::Soon);
    }
}
