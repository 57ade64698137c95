//! Servers placed on this node: their libvirt guests, disks and config drives, kept as the
//! Server asks (built, powered, rebooted, resized, rebuilt, torn down), with status read back
//! from libvirt on every pass.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use futures::StreamExt;
use kube::api::{Api, ListParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{EventType, Recorder};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use stratus_api_types::common::{Blocked, ConditionType, Reason, Time};
use stratus_api_types::compute::{
    DriftPolicy, Flavor, Keypair, ObservedPowerState, PowerState, RebootType, Server, ServerPhase,
    ServerStatus,
};
use stratus_api_types::image::{DiskFormat as ImageFormat, Image, Visibility};
use stratus_api_types::network::{Network, Port, Subnet};
use stratus_api_types::placement;
use stratus_api_types::ports::server_port_names;
use stratus_runtime::policy::kube_retry;
use stratus_runtime::{Classify, Retry, Runtime};

use super::Config;
use super::driver::disk;
use super::driver::{
    Backing, ConfigDrive, DiskFormat, DiskSpec, Disks, DomainDriver, DomainInfo, DomainSpec,
    DomainState, DriverError, InterfaceSpec, KernelBoot, Owner, VolumeDisk,
};
use super::interfaces as ifaces;
use super::volumes as vols;
use stratus_api_types::storage::{ImageRef, StoragePool, Volume, VolumeExport};
use stratus_image_cache::{Format, ImageCache, ImageError};

pub use stratus_api_types::compute::TEARDOWN_FINALIZER;

/// The field manager of the compute agent's status writes.
pub(crate) const MANAGER: &str = "stratus-compute-agent";

/// How long a guest has to shut down after an ACPI request before it is powered off.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// Why a reconcile failed, and whether retrying can help.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// A request to the API server failed (retry).
    #[error("request to the API server")]
    Api(#[source] kube::Error),
    /// libvirt failed (retry).
    #[error("hypervisor")]
    Driver(#[from] super::driver::DriverError),
    /// A disk or config drive could not be made (retry).
    #[error("disk")]
    Disk(#[from] disk::DiskError),
    /// Removing the guest's files failed (retry).
    #[error("remove {path}")]
    Files {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A blocking task panicked (a bug; retry).
    #[error("blocking task failed")]
    Join(#[from] tokio::task::JoinError),
    /// A Server without a namespace or uid (a bug elsewhere).
    #[error("server lacks a namespace or uid")]
    Incomplete,
}

impl Classify for ServerError {
    fn retry(&self) -> Retry {
        match self {
            Self::Api(e) => kube_retry(e),
            Self::Driver(_) | Self::Disk(_) | Self::Files { .. } => Retry::Backoff,
            Self::Join(_) | Self::Incomplete => Retry::Never,
        }
    }
}

/// What a pass does to a guest, decided from the Server and what libvirt reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// No domain: build disks and define and start it. `recreate`: it existed before (drift).
    Build {
        /// The Server had been built, so the domain went behind Stratus's back.
        recreate: bool,
    },
    /// `spec.image` changed: recreate the root disk from the new image.
    Rebuild,
    /// `spec.flavor` changed and its resources are claimed: restart with the new size.
    Resize,
    /// `spec.flavor` changed but the claim for it is not made yet: wait for the scheduler.
    AwaitResizeClaim,
    /// Power on.
    Start,
    /// Ask the guest to shut down.
    Shutdown,
    /// Power off (the guest did not shut down in time).
    PowerOff,
    /// Reboot as asked.
    Reboot(RebootType),
    /// The guest drifted and the Server's `driftPolicy` is `Report`: say so, touch nothing.
    ReportDrift(Drift),
    /// Nothing to change; report what libvirt says.
    Observe,
}

/// How a guest drifted from what Stratus made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drift {
    /// Its domain is gone from the hypervisor.
    Missing,
    /// It is shut off (or crashed) while the Server should run, and Stratus did not stop it.
    PoweredOff,
}

fn drifted(status: &ServerStatus) -> bool {
    ConditionType::Drifted.is_true(&status.conditions)
}

/// Decides the next step. `stopping_for`: how long ago the guest was asked to shut down, if it
/// was; `resize_claimed`: whether `status.allocated` is the claim of `spec.flavor`.
pub fn plan(
    server: &Server,
    state: Option<DomainState>,
    stopping_for: Option<Duration>,
    resize_claimed: bool,
) -> Step {
    let status = server.status.clone().unwrap_or_default();
    let report = server.spec.drift_policy == DriftPolicy::Report;
    let Some(state) = state else {
        let recreate = status.launched_at.is_some();
        return if recreate && report {
            Step::ReportDrift(Drift::Missing)
        } else {
            Step::Build { recreate }
        };
    };
    if status.image.is_some() && status.image != server.spec.image {
        return Step::Rebuild;
    }
    if status
        .flavor
        .as_ref()
        .is_some_and(|f| *f != server.spec.flavor)
    {
        return if resize_claimed {
            Step::Resize
        } else {
            Step::AwaitResizeClaim
        };
    }
    let up = matches!(
        state,
        DomainState::Running | DomainState::Paused | DomainState::ShuttingDown
    );
    match server.spec.power_state {
        PowerState::Running if !up => {
            // Down although it last ran: not Stratus's doing (a stop is PowerState::Stopped).
            let went_down = status.power_state == Some(ObservedPowerState::Running);
            if report && (went_down || drifted(&status)) {
                Step::ReportDrift(Drift::PoweredOff)
            } else {
                Step::Start
            }
        }
        PowerState::Running => {
            let asked = server.spec.reboot_request.as_ref();
            if asked.is_some() && asked != status.last_reboot_request.as_ref() {
                Step::Reboot(server.spec.reboot_type)
            } else {
                Step::Observe
            }
        }
        PowerState::Stopped if up => match stopping_for {
            None => Step::Shutdown,
            Some(t) if t >= SHUTDOWN_GRACE => Step::PowerOff,
            Some(_) => Step::Observe,
        },
        PowerState::Stopped => Step::Observe,
    }
}

/// The libvirt domain name of a Server.
pub fn instance_name(uid: &str) -> String {
    format!("stratus-{uid}")
}

pub(crate) struct Ctx {
    pub client: Client,
    pub runtime: Runtime<Server>,
    pub driver: Arc<dyn DomainDriver>,
    pub disks: Arc<dyn Disks>,
    pub config: Config,
    pub images: Arc<ImageCache>,
    pub recorder: Recorder,
}

impl Ctx {
    fn server_dir(&self, uid: &str) -> PathBuf {
        self.config.state_dir.join("servers").join(uid)
    }
}

/// Runs a blocking driver call on tokio's blocking pool.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ServerError> {
    Ok(stratus_runtime::blocking(f).await?)
}

fn now() -> Time {
    Time(jiff::Timestamp::now())
}

fn observed(state: Option<DomainState>) -> ObservedPowerState {
    match state {
        Some(DomainState::Running | DomainState::ShuttingDown) => ObservedPowerState::Running,
        Some(DomainState::Paused) => ObservedPowerState::Paused,
        Some(DomainState::Shutoff) => ObservedPowerState::Shutdown,
        Some(DomainState::Crashed) => ObservedPowerState::Crashed,
        Some(DomainState::Other) | None => ObservedPowerState::NoState,
    }
}

async fn publish(ctx: &Ctx, server: &Server, type_: EventType, reason: &str, note: String) {
    let reference = server.object_ref(&());
    stratus_runtime::events::publish(&ctx.recorder, &reference, type_, "Reconcile", reason, note)
        .await;
}

/// Writes `status` if it differs from the Server's (see [`Runtime::write_status`]: the
/// placement fields stay the binding's, the scheduler's conditions the scheduler's).
async fn write_status(ctx: &Ctx, server: &Server, status: ServerStatus) -> Result<(), ServerError> {
    ctx.runtime
        .write_status(server, &status)
        .await
        .map_err(ServerError::Api)?;
    Ok(())
}

/// Marks the server as failed for `b`, with an Event when the reason is new.
async fn block(ctx: &Ctx, server: &Server, b: Blocked) -> Result<Action, ServerError> {
    let mut status = server.status.clone().unwrap_or_default();
    let new_reason = !ConditionType::Ready
        .find(&status.conditions)
        .is_some_and(|c| c.reason == b.reason.as_str() && c.message == b.message);
    status.phase = ServerPhase::Error;
    b.condition(ConditionType::Ready)
        .set(&mut status.conditions, server.metadata.generation);
    write_status(ctx, server, status).await?;
    if new_reason {
        publish(
            ctx,
            server,
            EventType::Warning,
            b.reason.as_str(),
            b.message,
        )
        .await;
    }
    Ok(Action::requeue(Duration::from_secs(30)))
}

/// The Image a Server in `ns` means by `name`, resolved as documented in the README: the
/// project's own image of that name first; else the one public image of that name (only
/// cluster admins publish images); several public ones of that name are ambiguous, and the
/// server says so rather than picking one.
async fn find_image(client: &Client, ns: &str, name: &str) -> Result<Image, NotBuilt> {
    if let Some(i) = Api::<Image>::namespaced(client.clone(), ns)
        .get_opt(name)
        .await
        .map_err(ServerError::Api)?
    {
        return Ok(i);
    }
    let mut public: Vec<Image> = Api::<Image>::all(client.clone())
        .list(
            &ListParams::default().fields(&format!("metadata.name={name},spec.visibility=public")),
        )
        .await
        .map_err(ServerError::Api)?
        .items
        .into_iter()
        .filter(|i| i.spec.visibility == Visibility::Public)
        .collect();
    match public.len() {
        0 => Err(NotBuilt::Blocked(Blocked {
            reason: Reason::ImageNotFound,
            message: format!("image \"{name}\" not found in the project, nor as a public image"),
        })),
        1 => Ok(public.remove(0)),
        _ => {
            let mut places: Vec<String> = public.iter().filter_map(|i| i.namespace()).collect();
            places.sort();
            Err(NotBuilt::Blocked(Blocked {
                reason: Reason::ImageAmbiguous,
                message: format!(
                    "image \"{name}\" is not in the project, and {} public images have that name (in {}); make a private copy in the project or ask an admin to rename one",
                    public.len(),
                    places.join(", ")
                ),
            }))
        }
    }
}

/// Why a guest is not built on this pass.
enum NotBuilt {
    /// What the Server asks for cannot be built until something changes: reported in status.
    Blocked(Blocked),
    /// Something the guest needs is on its way (its Ports being placed on this node): the
    /// server stays Building and says what it waits for.
    Waiting(Blocked),
    /// A failure to retry.
    Failed(ServerError),
}

impl From<ServerError> for NotBuilt {
    fn from(e: ServerError) -> Self {
        Self::Failed(e)
    }
}

impl From<kube::Error> for NotBuilt {
    fn from(e: kube::Error) -> Self {
        Self::Failed(ServerError::Api(e))
    }
}

/// The format the cache inspects an Image's data as.
fn cache_format(format: ImageFormat) -> Format {
    match format {
        ImageFormat::Qcow2 => Format::Qcow2,
        ImageFormat::Raw => Format::Raw,
        ImageFormat::Iso => Format::Iso,
        ImageFormat::Aki => Format::Kernel,
        ImageFormat::Ari => Format::Ramdisk,
    }
}

/// Downloads (once per node and Image), verifies and inspects an Image's data, pinned first
/// as used by Server `user` (see [`super::images`]).
async fn fetch(ctx: &Ctx, user: &str, image: &Image) -> Result<PathBuf, NotBuilt> {
    let cache = Arc::clone(&ctx.images);
    let uid = image.uid().ok_or(ServerError::Incomplete)?;
    let source = image.spec.source.clone();
    let sum = stratus_runtime::image_token::checksum(image);
    let format = cache_format(image.spec.disk_format);
    let user = user.to_owned();
    // Pinned, then looked up: the API server is asked for the data only on a miss, so a
    // cached image starts servers while it cannot be had.
    let hit = {
        let (cache, uid, source, sum) =
            (Arc::clone(&cache), uid.clone(), source.clone(), sum.clone());
        blocking(move || {
            cache.pin(&uid, &user)?;
            cache.cached(&uid, &source, sum.as_deref(), format)
        })
        .await?
    };
    let got = match hit {
        Ok(Some(hit)) => Ok(hit),
        Err(e) => Err(e),
        Ok(None) => {
            let data = stratus_runtime::image_token::served_data(&ctx.client, image)
                .await
                .map_err(ServerError::Api)?;
            blocking(move || cache.fetch_source(&uid, &source, sum.as_deref(), format, data))
                .await?
        }
    };
    got.map(|c| c.path)
        .map_err(|e| NotBuilt::Blocked(image_blocked(&image.name_any(), &e)))
}

/// Why a Server cannot use the image `name` that failed to fetch with `e`.
fn image_blocked(name: &str, e: &ImageError) -> Blocked {
    let (reason, message) = match e {
        ImageError::ChecksumMismatch { expected, actual } => (
            Reason::ImageChecksumMismatch,
            format!("the data's sha256 is {actual}, not {expected}"),
        ),
        ImageError::Unsafe(u) => (
            Reason::ImageRefused,
            format!("the image data is refused: {u}"),
        ),
        ImageError::TooLarge { limit, .. } => (
            Reason::ImageTooLarge,
            format!("the data is larger than this cloud's limit of {limit} bytes"),
        ),
        ImageError::Refused { .. } => (Reason::ImageUrlRefused, stratus_runtime::policy::chain(e)),
        e => (
            Reason::ImageDownloadFailed,
            stratus_runtime::policy::chain(e),
        ),
    };
    Blocked {
        reason,
        message: format!("image \"{name}\": {message}"),
    }
}

/// Everything a guest is built from, resolved through the API.
struct Plan {
    domain: DomainSpec,
    /// The root disk to make over an image; `None` for a server booted from a volume.
    root: Option<RootDisk>,
    drive: DriveData,
    /// The volumes attached before the guest starts, in `spec.volumes` order.
    volumes: Vec<VolumeDisk>,
}

/// A root disk layered over a cached image.
struct RootDisk {
    base: PathBuf,
    format: DiskFormat,
    gib: u64,
}

/// What a guest boots from: its root disk and, for direct kernel boot, its kernel.
struct Boot {
    root: DiskSpec,
    made: Option<RootDisk>,
    kernel: Option<KernelBoot>,
}

struct DriveData {
    hostname: String,
    keys: Vec<String>,
    user_data: Option<Vec<u8>>,
    /// cloud-init `network-config` for the guest's interfaces; `None` without any.
    network: Option<serde_json::Value>,
}

/// How long a server whose Ports are not placed yet waits before looking again (a change to
/// one of its Ports placed here triggers a look at once).
const PORT_WAIT: Duration = Duration::from_secs(5);

/// One Port of a Server, as the guest gets it.
#[derive(Debug, Clone, PartialEq)]
pub struct Nic {
    /// The interface the hypervisor makes.
    pub interface: InterfaceSpec,
    /// Its IPv4 addresses with their prefix lengths (`10.0.0.5/24`), and their gateways.
    pub addresses: Vec<(String, Option<String>)>,
}

/// Whether `port` is ready to be plugged into `server`'s guest on `node`: its addresses
/// allocated, and it placed on this node, bound to this server, with its tap device named.
/// `Err` says what it waits for.
pub fn port_ready(port: &Port, server: &str, node: &str) -> Result<(String, String), String> {
    let name = port.name_any();
    let st = port.status.clone().unwrap_or_default();
    let Some(mac) = st.mac_address else {
        return Err(format!("port \"{name}\" has no MAC address yet"));
    };
    if st.bound_to.as_deref() != Some(server) {
        return Err(format!("port \"{name}\" is not bound to this server yet"));
    }
    if st.hypervisor.as_deref() != Some(node) {
        return Err(format!("port \"{name}\" is not placed on node {node} yet"));
    }
    let Some(tap) = st.interface_name else {
        return Err(format!("port \"{name}\" has no interface name yet"));
    };
    Ok((mac, tap))
}

/// cloud-init `network-config` (version 2) for `nics`: each interface matched by its MAC and
/// named `eth<i>` in guest order, with its static addresses (the ones IPAM gave its Port), the
/// first gateway as the default route, and DHCP when no address is known.
pub fn network_config(nics: &[Nic]) -> serde_json::Value {
    let mut ethernets = serde_json::Map::new();
    let mut routed = false;
    for (i, nic) in nics.iter().enumerate() {
        let mut eth = serde_json::json!({
            "match": {"macaddress": nic.interface.mac},
            "set-name": format!("eth{i}"),
        });
        if nic.addresses.is_empty() {
            eth["dhcp4"] = true.into();
        } else {
            eth["dhcp4"] = false.into();
            let addrs: Vec<&str> = nic.addresses.iter().map(|(a, _)| a.as_str()).collect();
            eth["addresses"] = addrs.into();
            if !routed && let Some(gw) = nic.addresses.iter().find_map(|(_, g)| g.clone()) {
                eth["routes"] = serde_json::json!([{"to": "0.0.0.0/0", "via": gw}]);
                routed = true;
            }
        }
        if let Some(mtu) = nic.interface.mtu {
            eth["mtu"] = mtu.into();
        }
        ethernets.insert(format!("eth{i}"), eth);
    }
    serde_json::json!({"version": 2, "ethernets": ethernets})
}

/// Reads an object a node may read only once it is related to the node (a Port placed here,
/// its Network and Subnets): a refusal means "not yet", as absence does.
async fn get_related<K>(api: &Api<K>, name: &str) -> Result<Option<K>, ServerError>
where
    K: Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    match api.get_opt(name).await {
        Ok(o) => Ok(o),
        Err(kube::Error::Api(e)) if e.code == 403 => Ok(None),
        Err(e) => Err(ServerError::Api(e)),
    }
}

/// The Ports of `server` as this node can plug them into its guest: the interfaces of those
/// ready here (each with its addresses, in guest order) and what the others wait for.
async fn resolve_ports(
    ctx: &Ctx,
    server: &Server,
    ns: &str,
) -> Result<(Vec<Nic>, ifaces::Resolved), ServerError> {
    let ports = Api::<Port>::namespaced(ctx.client.clone(), ns);
    let networks = Api::<Network>::namespaced(ctx.client.clone(), ns);
    let subnets = Api::<Subnet>::namespaced(ctx.client.clone(), ns);
    let node = ctx.config.node.as_str();
    let server_name = server.name_any();
    let mut out = Vec::new();
    let mut resolved = ifaces::Resolved::default();
    for name in server_port_names(server) {
        let Some(port) = get_related(&ports, &name).await? else {
            resolved.unknown = true;
            resolved.waiting.push(format!(
                "waiting for port \"{name}\" to be placed on node {node}"
            ));
            continue;
        };
        let (mac, tap) = match port_ready(&port, &server_name, node) {
            Ok(got) => got,
            Err(why) => {
                resolved
                    .keep
                    .extend(port.status.as_ref().and_then(|s| s.mac_address.clone()));
                resolved.waiting.push(why);
                continue;
            }
        };
        let mtu = get_related(&networks, &port.spec.network)
            .await?
            .map(|n| n.spec.mtu);
        let mut addresses = Vec::new();
        for ip in port.status.iter().flat_map(|s| s.fixed_ips.iter()) {
            if ip.ip_address.contains(':') {
                continue;
            }
            let Some(subnet) = get_related(&subnets, &ip.subnet).await? else {
                continue;
            };
            let Some((_, len)) = subnet.spec.cidr.split_once('/') else {
                continue;
            };
            let gateway = subnet
                .status
                .as_ref()
                .and_then(|s| s.gateway_ip.clone())
                .or(subnet.spec.gateway_ip.clone())
                .filter(|_| !subnet.spec.disable_gateway);
            addresses.push((format!("{}/{len}", ip.ip_address), gateway));
        }
        let interface = InterfaceSpec { mac, tap, mtu };
        resolved.ready.push(ifaces::Wanted {
            port: name,
            nic: interface.clone(),
        });
        out.push(Nic {
            interface,
            addresses,
        });
    }
    Ok((out, resolved))
}

/// The interfaces of `server`'s guest, one per Port in guest order, once every Port is placed
/// on this node ([`NotBuilt::Waiting`] naming the first that is not).
async fn nics(ctx: &Ctx, server: &Server, ns: &str) -> Result<Vec<Nic>, NotBuilt> {
    let (nics, resolved) = resolve_ports(ctx, server, ns).await?;
    match resolved.waiting.into_iter().next() {
        Some(message) => Err(NotBuilt::Waiting(Blocked {
            reason: Reason::PortNotPlaced,
            message,
        })),
        None => Ok(nics),
    }
}

async fn resolve(ctx: &Ctx, server: &Server) -> Result<Plan, NotBuilt> {
    let ns = server.namespace().ok_or(ServerError::Incomplete)?;
    let uid = server.uid().ok_or(ServerError::Incomplete)?;
    let Some(flavor) = Api::<Flavor>::all(ctx.client.clone())
        .get_opt(&server.spec.flavor)
        .await
        .map_err(ServerError::Api)?
    else {
        return Err(NotBuilt::Blocked(Blocked {
            reason: Reason::FlavorNotFound,
            message: format!("flavor \"{}\" not found", server.spec.flavor),
        }));
    };
    // The guest is built with every interface it asks for, or not at all: one without them
    // would not be the server the user applied.
    let nics = nics(ctx, server, &ns).await?;
    let name = server.name_any();
    // The guest starts with every volume it asks for, or waits: one without them would not be
    // the server the user applied.
    let volumes = resolve_volumes(ctx, server).await?;
    if let Some(why) = volumes.refused.first() {
        return Err(NotBuilt::Blocked(Blocked {
            reason: Reason::VolumeRefused,
            message: why.clone(),
        }));
    }
    if let Some(why) = volumes.waiting.first() {
        return Err(NotBuilt::Waiting(Blocked {
            reason: Reason::VolumesUnavailable,
            message: format!("waiting for its volumes: {why}"),
        }));
    }
    let dir = ctx.server_dir(&uid);
    let boot = match (&server.spec.boot_volume, server.spec.image.as_deref()) {
        (Some(v), _) => boot_volume(ctx, server, &ns, v).await?,
        (None, Some(image_name)) => {
            boot_image(ctx, server, &ns, &uid, image_name, &flavor, &dir).await?
        }
        (None, None) => {
            return Err(NotBuilt::Blocked(Blocked {
                reason: Reason::ImageNotFound,
                message: "the server names neither spec.image nor spec.bootVolume".into(),
            }));
        }
    };
    let mut keys = Vec::new();
    if let Some(k) = &server.spec.keypair {
        match Api::<Keypair>::namespaced(ctx.client.clone(), &ns)
            .get_opt(k)
            .await
            .map_err(ServerError::Api)?
        {
            Some(kp) => keys.push(kp.spec.public_key.clone()),
            None => {
                return Err(NotBuilt::Blocked(Blocked {
                    reason: Reason::KeypairNotFound,
                    message: format!("keypair \"{k}\" not found"),
                }));
            }
        }
    }
    let user_data = match &server.spec.user_data {
        Some(b64) => {
            let clean: String = b64.chars().filter(|c| !c.is_whitespace()).collect();
            match base64::engine::general_purpose::STANDARD.decode(clean) {
                Ok(d) => Some(d),
                Err(e) => {
                    return Err(NotBuilt::Blocked(Blocked {
                        reason: Reason::InvalidUserData,
                        message: format!("spec.userData is not base64: {e}"),
                    }));
                }
            }
        }
        None => None,
    };
    let hostname = server.spec.hostname.clone().unwrap_or_else(|| {
        // A valid host name is a DNS label; a dotted object name keeps its first label.
        name.split('.').next().unwrap_or("server").to_string()
    });
    let volumes = vols::plan(&volumes, &[], false)
        .into_iter()
        .filter_map(|step| match step {
            vols::Step::Attach(disk) => Some(disk),
            _ => None,
        })
        .collect();
    Ok(Plan {
        domain: DomainSpec {
            name: instance_name(&uid),
            uuid: uid.clone(),
            vcpus: flavor.spec.vcpus,
            memory_mib: flavor.spec.ram_mib,
            kernel: boot.kernel,
            disks: vec![
                boot.root,
                DiskSpec {
                    path: dir.join("config.iso"),
                    format: DiskFormat::Raw,
                    readonly: true,
                    backing: None,
                },
            ],
            console_log: dir.join("console.log"),
            interfaces: nics.iter().map(|n| n.interface.clone()).collect(),
            owner: Owner {
                namespace: ns,
                name,
                uid,
            },
        },
        root: boot.made,
        volumes,
        drive: DriveData {
            hostname,
            keys,
            user_data,
            network: (!nics.is_empty()).then(|| network_config(&nics)),
        },
    })
}

/// The kernel, initramfs and command line `image` names for direct kernel boot, if it names a
/// kernel image.
async fn kernel_of(
    ctx: &Ctx,
    ns: &str,
    user: &str,
    image: &Image,
) -> Result<Option<KernelBoot>, NotBuilt> {
    let Some(k) = &image.spec.kernel_image else {
        return Ok(None);
    };
    let k_img = find_image(&ctx.client, ns, k).await?;
    let kernel = fetch(ctx, user, &k_img).await?;
    let mut initrd = None;
    if let Some(r) = &image.spec.ramdisk_image {
        let r_img = find_image(&ctx.client, ns, r).await?;
        initrd = Some(fetch(ctx, user, &r_img).await?);
    }
    Ok(Some(KernelBoot {
        kernel,
        initrd,
        cmdline: image
            .spec
            .kernel_cmdline
            .clone()
            .unwrap_or_else(|| "console=ttyS0".into()),
    }))
}

/// Booting from an Image: a root disk layered over its cached data, grown to the flavor's
/// disk, and the image's kernel.
async fn boot_image(
    ctx: &Ctx,
    server: &Server,
    ns: &str,
    uid: &str,
    image_name: &str,
    flavor: &Flavor,
    dir: &Path,
) -> Result<Boot, NotBuilt> {
    let image = find_image(&ctx.client, ns, image_name).await?;
    // As Nova does: an image states the smallest disk and memory it runs with.
    if image.spec.min_disk_gib > flavor.spec.disk_gib && flavor.spec.disk_gib > 0 {
        return Err(NotBuilt::Blocked(Blocked {
            reason: Reason::FlavorDiskTooSmall,
            message: format!(
                "flavor \"{}\" has a {} GiB disk; image \"{image_name}\" needs {} GiB",
                server.spec.flavor, flavor.spec.disk_gib, image.spec.min_disk_gib
            ),
        }));
    }
    if image.spec.min_ram_mib > flavor.spec.ram_mib {
        return Err(NotBuilt::Blocked(Blocked {
            reason: Reason::FlavorMemoryTooSmall,
            message: format!(
                "flavor \"{}\" has {} MiB of memory; image \"{image_name}\" needs {} MiB",
                server.spec.flavor, flavor.spec.ram_mib, image.spec.min_ram_mib
            ),
        }));
    }
    let root_format = match image.spec.disk_format {
        ImageFormat::Qcow2 => DiskFormat::Qcow2,
        ImageFormat::Raw => DiskFormat::Raw,
        other => {
            return Err(NotBuilt::Blocked(Blocked {
                reason: Reason::ImageNotBootable,
                message: format!(
                    "image \"{image_name}\" has diskFormat {other:?}; a server boots from a qcow2 or raw image"
                ),
            }));
        }
    };
    let root_base = fetch(ctx, uid, &image).await?;
    let kernel = kernel_of(ctx, ns, uid, &image).await?;
    let claim = placement::claim(&flavor.spec);
    Ok(Boot {
        root: DiskSpec {
            path: dir.join("root.qcow2"),
            format: DiskFormat::Qcow2,
            readonly: false,
            backing: Some(Backing {
                path: root_base.clone(),
                format: root_format,
            }),
        },
        made: Some(RootDisk {
            base: root_base,
            format: root_format,
            gib: claim.disk_gib.max(flavor.spec.disk_gib),
        }),
        kernel,
    })
}

/// Booting from Volume `name` (claimed for the server by the API server, as its other
/// volumes): the volume itself is the root disk, raw; a volume made from an Image that names a
/// kernel boots that kernel (the tiny direct-kernel-boot images), any other from the disk.
async fn boot_volume(ctx: &Ctx, server: &Server, ns: &str, name: &str) -> Result<Boot, NotBuilt> {
    let api = Api::<Volume>::namespaced(ctx.client.clone(), ns);
    let Some(vol) = get_related(&api, name).await? else {
        return Err(NotBuilt::Waiting(Blocked {
            reason: Reason::VolumesUnavailable,
            message: format!("waiting for boot volume \"{name}\" to be readable by this node"),
        }));
    };
    let pool = match vol.status.as_ref().and_then(|s| s.pool.as_deref()) {
        Some(p) => get_related(&Api::<StoragePool>::all(ctx.client.clone()), p).await?,
        None => None,
    };
    let export = vols::export_to(&ctx.client, &vol, &ctx.config.node)
        .await
        .map_err(ServerError::Api)?;
    let (judged, vol) = {
        let (server, node) = (server.name_any(), ctx.config.node.clone());
        // The path check reads the disk (and, for an LVM pool, lvm2's reports).
        let nbd = ctx.config.nbd();
        blocking(move || {
            let judged = vols::ready(&vol, &server, &node, pool.as_ref(), export.as_ref(), nbd);
            (judged, vol)
        })
        .await?
    };
    let ready = judged.map_err(|why| match why {
        vols::NotReady::Refused(message) => NotBuilt::Blocked(Blocked {
            reason: Reason::VolumeRefused,
            message,
        }),
        vols::NotReady::Waiting(why) | vols::NotReady::Released(why) => {
            NotBuilt::Waiting(Blocked {
                reason: Reason::VolumesUnavailable,
                message: format!("waiting for its boot volume: {why}"),
            })
        }
    })?;
    if let Some(why) = ready.growing {
        // Booted at its old size, the guest would see its root disk grow under it.
        return Err(NotBuilt::Waiting(Blocked {
            reason: Reason::VolumesUnavailable,
            message: format!("waiting for its boot volume: {why}"),
        }));
    }
    let uid = server.uid().ok_or(ServerError::Incomplete)?;
    let st = vol.status.clone().unwrap_or_default();
    let kernel = match vol.spec.source.as_ref().and_then(|s| s.image.as_deref()) {
        Some(_) => {
            let source = recorded_image(ctx, name, "sourceImage", st.source_image.as_ref()).await?;
            let named = |n: &Option<String>| n.is_some();
            if !named(&source.spec.kernel_image) {
                None
            } else {
                let k = recorded_image(ctx, name, "kernelImage", st.kernel_image.as_ref()).await?;
                let kernel = fetch(ctx, &uid, &k).await?;
                let initrd = if named(&source.spec.ramdisk_image) {
                    let r = recorded_image(ctx, name, "ramdiskImage", st.ramdisk_image.as_ref())
                        .await?;
                    Some(fetch(ctx, &uid, &r).await?)
                } else {
                    None
                };
                Some(KernelBoot {
                    kernel,
                    initrd,
                    cmdline: source
                        .spec
                        .kernel_cmdline
                        .clone()
                        .unwrap_or_else(|| "console=ttyS0".into()),
                })
            }
        }
        None => None,
    };
    Ok(Boot {
        root: DiskSpec {
            path: ready.path,
            format: DiskFormat::Raw,
            readonly: false,
            backing: None,
        },
        made: None,
        kernel,
    })
}

/// Whether `image` (read where `recorded` says it is) is the image `recorded` names: the same
/// uid, not one published under its name since.
///
/// # Errors
/// Why not, for the volume's `status.FIELD`.
pub fn same_image(
    volume: &str,
    field: &str,
    recorded: Option<&ImageRef>,
    image: Option<&Image>,
) -> Result<(), Blocked> {
    let Some(r) = recorded else {
        return Err(Blocked {
            reason: Reason::ImageNotFound,
            message: format!(
                "boot volume \"{volume}\" records no status.{field}: the image it was made from is not known by uid, so it is not booted by whatever image has that name now"
            ),
        });
    };
    match image {
        Some(i) if i.uid().as_deref() == Some(r.uid.as_str()) => Ok(()),
        Some(_) => Err(Blocked {
            reason: Reason::ImageNotFound,
            message: format!(
                "image \"{}/{}\" is no longer the image boot volume \"{volume}\" was made from (uid {}): it was replaced by another of that name",
                r.namespace, r.name, r.uid
            ),
        }),
        None => Err(Blocked {
            reason: Reason::ImageNotFound,
            message: format!(
                "image \"{}/{}\" (uid {}) boot volume \"{volume}\" was made from is gone",
                r.namespace, r.name, r.uid
            ),
        }),
    }
}

/// The image a boot volume's `status.FIELD` records, read where it says and checked by uid.
async fn recorded_image(
    ctx: &Ctx,
    volume: &str,
    field: &str,
    recorded: Option<&ImageRef>,
) -> Result<Image, NotBuilt> {
    let image = match recorded {
        Some(r) => {
            get_related(
                &Api::<Image>::namespaced(ctx.client.clone(), &r.namespace),
                &r.name,
            )
            .await?
        }
        None => None,
    };
    same_image(volume, field, recorded, image.as_ref()).map_err(NotBuilt::Blocked)?;
    image.ok_or(NotBuilt::Failed(ServerError::Incomplete))
}

/// Makes the disks (a new root disk with `fresh_root`; else the one there, grown to the
/// flavor's size), defines the domain and starts it.
async fn build(ctx: &Ctx, plan: Plan, fresh_root: bool) -> Result<(), ServerError> {
    let driver = Arc::clone(&ctx.driver);
    let disks = Arc::clone(&ctx.disks);
    blocking(move || -> Result<(), ServerError> {
        if let Some(root) = &plan.root {
            disks.root_disk(
                &root.base,
                root.format,
                &plan.domain.disks[0].path,
                root.gib,
                fresh_root,
            )?;
        }
        disks.config_drive(
            &plan.domain.disks[1].path,
            &ConfigDrive {
                instance_id: &plan.domain.uuid,
                hostname: &plan.drive.hostname,
                public_keys: &plan.drive.keys,
                user_data: plan.drive.user_data.as_deref(),
                network_config: plan.drive.network.as_ref(),
            },
        )?;
        driver.define(&plan.domain)?;
        // A definition replaces the old one whole: its volumes go back in before it starts.
        for disk in &plan.volumes {
            driver.attach_volume(&plan.domain.name, disk)?;
        }
        if !driver
            .lookup(&plan.domain.name)?
            .is_some_and(|d| d.state == DomainState::Running)
        {
            driver.start(&plan.domain.name)?;
        }
        Ok(())
    })
    .await?
}

/// Removes the guest and its files; idempotent.
async fn teardown(ctx: &Ctx, uid: &str) -> Result<(), ServerError> {
    let driver = Arc::clone(&ctx.driver);
    let disks = Arc::clone(&ctx.disks);
    let name = instance_name(uid);
    let dir = ctx.server_dir(uid);
    blocking(move || -> Result<(), ServerError> {
        if let Some(d) = driver.lookup(&name)? {
            if d.state != DomainState::Shutoff {
                driver.destroy(&name)?;
            }
            driver.undefine(&name)?;
        }
        disks.remove_dir(&dir)?;
        Ok(())
    })
    .await?
}

/// Runs one driver verb on a domain, on the blocking pool.
async fn domain_verb(
    ctx: &Ctx,
    name: &str,
    verb: fn(&dyn DomainDriver, &str) -> Result<(), DriverError>,
) -> Result<(), ServerError> {
    let driver = Arc::clone(&ctx.driver);
    let name = name.to_owned();
    Ok(blocking(move || verb(driver.as_ref(), &name)).await??)
}

/// Drops this node's finalizer (see [`stratus_runtime::finalizer::release`]).
async fn release(ctx: &Ctx, server: &Server) -> Result<(), ServerError> {
    stratus_runtime::finalizer::release(&ctx.client, server, TEARDOWN_FINALIZER)
        .await
        .map_err(ServerError::Api)
}

fn stopping_for(server: &Server) -> Option<Duration> {
    let c = ConditionType::Stopping
        .find(&server.status.as_ref()?.conditions)
        .filter(|c| c.status == "True")?;
    let since = jiff::Timestamp::now().duration_since(c.last_transition_time.0);
    Some(Duration::try_from(since).unwrap_or_default())
}

/// The status after a pass, from the Server's and libvirt's state.
fn observe(server: &Server, info: Option<&DomainInfo>, dir: &Path) -> ServerStatus {
    let mut status = server.status.clone().unwrap_or_default();
    let state = info.map(|d| d.state);
    let gen_ = server.metadata.generation;
    status.power_state = Some(observed(state));
    status.instance_name = info.map(|d| d.name.clone());
    status.console = Some(stratus_api_types::compute::ServerConsole {
        log_path: Some(dir.join("console.log").display().to_string()),
        url: None,
    });
    let running = matches!(state, Some(DomainState::Running));
    if drifted(&status) {
        ConditionType::Drifted
            .no(Reason::InSync, "the guest is as the Server asks")
            .set(&mut status.conditions, gen_);
    }
    status.phase = match (server.spec.power_state, running) {
        (PowerState::Running, true) => ServerPhase::Running,
        (PowerState::Stopped, false) => ServerPhase::Stopped,
        (PowerState::Stopped, true) => status.phase,
        (PowerState::Running, false) => ServerPhase::Building,
    };
    if server.spec.power_state == PowerState::Stopped && !running {
        ConditionType::Stopping
            .no(Reason::Stopped, "")
            .set(&mut status.conditions, gen_);
    }
    let ready = match status.phase {
        ServerPhase::Running => ConditionType::Ready.yes(Reason::Running, "the guest is running"),
        ServerPhase::Stopped => ConditionType::Ready.no(Reason::Stopped, "stopped as requested"),
        _ => ConditionType::Ready.no(
            Reason::NotRunning,
            format!("the guest is {:?}", observed(state)),
        ),
    };
    ready.set(&mut status.conditions, gen_);
    status.observed_generation = gen_;
    status
}

async fn reconcile(server: Arc<Server>, ctx: Arc<Ctx>) -> Result<Action, ServerError> {
    let result = sync(&server, &ctx).await;
    ctx.runtime.finish(&server, result).await
}

/// What a step leaves for the end of the pass.
enum After {
    /// Read the guest back and write the status.
    Observe,
    /// The step wrote what it had to say; come back as this says.
    Return(Action),
}

/// One pass over a Server placed here: decide the step from the Server and the domain, take
/// it, then report what libvirt shows.
async fn sync(server: &Server, ctx: &Ctx) -> Result<Action, ServerError> {
    let uid = server.uid().ok_or(ServerError::Incomplete)?;
    let placed = server.status.as_ref().and_then(|s| s.hypervisor.as_deref());
    if placed != Some(ctx.config.node.as_str()) {
        return Ok(Action::await_change());
    }
    let name = instance_name(&uid);
    if server.metadata.deletion_timestamp.is_some() {
        teardown(ctx, &uid).await?;
        release(ctx, server).await?;
        return Ok(Action::await_change());
    }
    let info = lookup(ctx, &name).await?;
    let step = plan(
        server,
        info.as_ref().map(|d| d.state),
        stopping_for(server),
        resize_claimed(ctx, server).await?,
    );
    tracing::debug!(server = %server.name_any(), ?step, "reconcile");
    let mut status = server.status.clone().unwrap_or_default();
    let after = match step {
        Step::Build { .. } | Step::Rebuild | Step::Resize => {
            make(ctx, server, step, &name, &mut status).await?
        }
        Step::AwaitResizeClaim => await_resize_claim(ctx, server, status.clone()).await?,
        Step::ReportDrift(drift) => {
            report_drift(ctx, server, drift, info.as_ref(), status.clone()).await?
        }
        Step::Start => power_on(ctx, server, &name, &mut status).await?,
        Step::Shutdown => request_shutdown(ctx, server, &name, status.clone()).await?,
        Step::PowerOff => power_off(ctx, server, &name).await?,
        Step::Reboot(kind) => reboot(ctx, server, &name, kind, &mut status).await?,
        Step::Observe => After::Observe,
    };
    if let After::Return(action) = after {
        return Ok(action);
    }
    let info = lookup(ctx, &name).await?;
    let settled = match &info {
        Some(d) => {
            let volumes = sync_volumes(ctx, server, d, &mut status).await?;
            sync_interfaces(ctx, server, d).await? && volumes
        }
        None => true,
    };
    let mut server_now = server.clone();
    server_now.status = Some(status);
    let mut next = observe(&server_now, info.as_ref(), &ctx.server_dir(&uid));
    if !settled {
        // Not yet the guest this generation asks for: a volume taken out of the spec is
        // released (by the attachments controller) only once the generation is observed.
        next.observed_generation = server.status.as_ref().and_then(|s| s.observed_generation);
        write_status(ctx, server, next).await?;
        return Ok(Action::requeue(VOLUME_WAIT));
    }
    write_status(ctx, server, next).await?;
    Ok(Action::requeue(ctx.config.resync))
}

/// How soon a guest whose volumes are not yet as asked (a volume not made, a disk being
/// unplugged) is looked at again.
const VOLUME_WAIT: Duration = Duration::from_secs(2);

/// Brings a defined guest's volumes to the Server's (see [`vols::plan`]): attaches those
/// ready here, detaches those no longer asked for, tells a running guest of a volume that
/// grew. Sets the `Attached` condition; returns whether the guest has exactly the volumes
/// asked for (none still being unplugged, none waited for).
async fn sync_volumes(
    ctx: &Ctx,
    server: &Server,
    domain: &DomainInfo,
    status: &mut ServerStatus,
) -> Result<bool, ServerError> {
    let resolved = resolve_volumes(ctx, server).await?;
    let name = domain.name.clone();
    let running = domain.state == DomainState::Running;
    // A running guest's root disk follows its boot volume as it grows.
    let boot = match (&server.spec.boot_volume, running) {
        (Some(volume), true) => resolve_named(ctx, server, std::slice::from_ref(volume))
            .await?
            .ready
            .into_iter()
            .next(),
        _ => None,
    };
    let driver = Arc::clone(&ctx.driver);
    let plan_of = resolved.clone();
    let (done, left) = blocking(move || -> Result<_, DriverError> {
        let before = driver.volumes(&name)?;
        let mut steps = vols::plan(&plan_of, &before, running);
        if let Some(want) = &boot
            && let Some(root) = driver.root_volume(&name)?
        {
            steps.extend(vols::plan_root(want, &root));
        }
        for step in &steps {
            match step {
                vols::Step::Attach(disk) => driver.attach_volume(&name, disk)?,
                vols::Step::Detach(target) => driver.detach_volume(&name, target)?,
                vols::Step::Resize(target, bytes) => {
                    driver.resize_volume(&name, target, *bytes)?;
                }
                vols::Step::Move(disk) => driver.move_volume(&name, disk)?,
            }
        }
        let after = if steps.is_empty() {
            before
        } else {
            driver.volumes(&name)?
        };
        Ok((steps, after))
    })
    .await??;
    for step in done {
        let (reason, note) = match step {
            vols::Step::Attach(d) => (
                "VolumeAttached",
                format!("attached {} as {}", d.path.display(), d.target),
            ),
            vols::Step::Detach(t) => ("VolumeDetached", format!("detached the disk at {t}")),
            vols::Step::Resize(t, bytes) => (
                "VolumeResized",
                format!("the disk at {t} is now {bytes} bytes"),
            ),
            vols::Step::Move(d) => (
                "VolumeResized",
                format!(
                    "the disk at {} now reads its volume's export at its new size",
                    d.target
                ),
            ),
        };
        publish(ctx, server, EventType::Normal, reason, note).await;
    }
    let unplugging = vols::plan(&resolved, &left, false)
        .iter()
        .filter(|s| matches!(s, vols::Step::Detach(_)))
        .count();
    let gen_ = server.metadata.generation;
    if let Some(why) = resolved.refused.first() {
        ConditionType::Attached
            .no(Reason::VolumeRefused, why.clone())
            .set(&mut status.conditions, gen_);
    } else if let Some(why) = resolved.waiting.first() {
        ConditionType::Attached
            .no(Reason::VolumesUnavailable, why.clone())
            .set(&mut status.conditions, gen_);
    } else if unplugging > 0 {
        ConditionType::Attached
            .no(
                "Detaching",
                format!("{unplugging} disk(s) being unplugged by the guest"),
            )
            .set(&mut status.conditions, gen_);
    } else if !server.spec.volumes.is_empty()
        || ConditionType::Attached.find(&status.conditions).is_some()
    {
        ConditionType::Attached
            .yes(
                "Attached",
                format!("{} volume(s) attached", resolved.ready.len()),
            )
            .set(&mut status.conditions, gen_);
    }
    // Settled only once the definition holds nothing but the volumes asked for: a disk kept
    // for a volume that could not be read, or is in error, might be one the spec dropped.
    Ok(resolved.waiting.is_empty()
        && resolved.refused.is_empty()
        && resolved.holds_only_ready(&left))
}

/// Brings a defined guest's network interfaces to the Server's Ports (see [`ifaces::plan`]):
/// plugs in those ready here that it lacks (live, while it runs), unplugs those no Port of
/// the Server's is, each with an Event. Returns whether the guest has exactly the interfaces
/// asked for (none waited for, none still being unplugged).
async fn sync_interfaces(
    ctx: &Ctx,
    server: &Server,
    domain: &DomainInfo,
) -> Result<bool, ServerError> {
    let ns = server.namespace().ok_or(ServerError::Incomplete)?;
    let (_, resolved) = resolve_ports(ctx, server, &ns).await?;
    let name = domain.name.clone();
    let driver = Arc::clone(&ctx.driver);
    let wanted = resolved.clone();
    let uid = server.uid().ok_or(ServerError::Incomplete)?;
    let (before, done, left, notices) = blocking(move || -> Result<_, DriverError> {
        let before = driver.interfaces(&name)?;
        let planned = ifaces::plan(&wanted, &before);
        let asked = !planned.is_empty();
        // An interface the guest keeps losing is plugged in again only as its backoff allows.
        let now = std::time::Instant::now();
        let (steps, notices) = ifaces::replugs().admit(&uid, &wanted, &before, planned, now);
        for step in &steps {
            match step {
                ifaces::Step::Attach(w) => driver.attach_interface(&name, &w.nic)?,
                ifaces::Step::Detach(mac) => driver.detach_interface(&name, mac)?,
            }
        }
        let left = if asked {
            ifaces::plan(&wanted, &driver.interfaces(&name)?)
        } else {
            Vec::new()
        };
        Ok((before, steps, left, notices))
    })
    .await??;
    for n in notices {
        let (reason, note) = n.event();
        publish(ctx, server, EventType::Warning, reason, note).await;
    }
    for step in done {
        let (reason, note) = match step {
            ifaces::Step::Attach(w) => (
                "InterfaceAttached",
                format!(
                    "plugged in port \"{}\" (MAC {}, tap {})",
                    w.port, w.nic.mac, w.nic.tap
                ),
            ),
            ifaces::Step::Detach(mac) => {
                let tap = before
                    .iter()
                    .find(|i| i.mac == mac)
                    .and_then(|i| i.tap.clone())
                    .unwrap_or_default();
                (
                    "InterfaceDetached",
                    format!(
                        "unplugged the interface of MAC {mac} (tap {tap}): no port of this server's is it"
                    ),
                )
            }
        };
        publish(ctx, server, EventType::Normal, reason, note).await;
    }
    Ok(resolved.waiting.is_empty() && left.is_empty())
}

async fn lookup(ctx: &Ctx, name: &str) -> Result<Option<DomainInfo>, ServerError> {
    let driver = Arc::clone(&ctx.driver);
    let name = name.to_owned();
    Ok(blocking(move || driver.lookup(&name)).await??)
}

/// Whether `status.allocated` is the claim of a new `spec.flavor` (the binding re-claims on
/// this hypervisor before the agent resizes).
async fn resize_claimed(ctx: &Ctx, server: &Server) -> Result<bool, ServerError> {
    let Some(current) = server.status.as_ref().and_then(|s| s.flavor.as_ref()) else {
        return Ok(false);
    };
    if *current == server.spec.flavor {
        return Ok(false);
    }
    let flavor = Api::<Flavor>::all(ctx.client.clone())
        .get_opt(&server.spec.flavor)
        .await
        .map_err(ServerError::Api)?;
    Ok(flavor.is_some_and(|fl| {
        server.status.as_ref().and_then(|s| s.allocated.as_ref())
            == Some(&placement::claim(&fl.spec))
    }))
}

/// Build, Rebuild, Resize: resolve what the guest is made of, then (re)make it.
async fn make(
    ctx: &Ctx,
    server: &Server,
    step: Step,
    name: &str,
    status: &mut ServerStatus,
) -> Result<After, ServerError> {
    let gen_ = server.metadata.generation;
    // Resolved first: a server that cannot be built keeps one stable Error status instead of
    // flapping through Building on every pass.
    let plan = match resolve(ctx, server).await {
        Ok(p) => p,
        Err(NotBuilt::Blocked(b)) => return block(ctx, server, b).await.map(After::Return),
        Err(NotBuilt::Waiting(b)) => return wait(ctx, server, step, b).await.map(After::Return),
        Err(NotBuilt::Failed(e)) => return Err(e),
    };
    status.phase = match step {
        Step::Rebuild => ServerPhase::Rebuilding,
        Step::Resize => ServerPhase::Resizing,
        _ => ServerPhase::Building,
    };
    ConditionType::Ready
        .no(Reason::Building, "preparing disks and the guest")
        .set(&mut status.conditions, gen_);
    write_status(ctx, server, status.clone()).await?;
    if !matches!(step, Step::Build { .. }) {
        // Rebuild and resize start from a powered-off guest.
        domain_verb(ctx, name, |d, n| d.destroy(n)).await?;
    }
    build(ctx, plan, step == Step::Rebuild).await?;
    let (kind, reason, note) = match step {
        Step::Build { recreate: true } => (
            EventType::Warning,
            "Recreated",
            format!("domain {name} was missing from the hypervisor; recreated it"),
        ),
        Step::Rebuild => (
            EventType::Normal,
            "Rebuilt",
            format!(
                "root disk rebuilt from image {}",
                server.spec.image.as_deref().unwrap_or_default()
            ),
        ),
        Step::Resize => (
            EventType::Normal,
            "Resized",
            format!("now running with flavor {}", server.spec.flavor),
        ),
        _ => (
            EventType::Normal,
            "Started",
            format!("domain {name} defined and started"),
        ),
    };
    publish(ctx, server, kind, reason, note).await;
    if step == Step::Resize {
        ConditionType::Resized
            .yes(
                Reason::Resized,
                format!("running with flavor {}", server.spec.flavor),
            )
            .set(&mut status.conditions, gen_);
    }
    status.flavor = Some(server.spec.flavor.clone());
    status.image = server.spec.image.clone();
    status.launched_at = Some(now());
    status.last_reboot_request = server.spec.reboot_request.clone();
    Ok(After::Observe)
}

/// The guest waits for something on its way (its Ports): it stays in the phase of its step,
/// `Ready=False` naming what it waits for.
async fn wait(ctx: &Ctx, server: &Server, step: Step, b: Blocked) -> Result<Action, ServerError> {
    let mut status = server.status.clone().unwrap_or_default();
    status.phase = match step {
        Step::Rebuild => ServerPhase::Rebuilding,
        Step::Resize => ServerPhase::Resizing,
        _ => ServerPhase::Building,
    };
    b.condition(ConditionType::Ready)
        .set(&mut status.conditions, server.metadata.generation);
    write_status(ctx, server, status).await?;
    Ok(Action::requeue(PORT_WAIT))
}

/// A new flavor the scheduler has not claimed on this hypervisor yet: say so and wait.
async fn await_resize_claim(
    ctx: &Ctx,
    server: &Server,
    mut status: ServerStatus,
) -> Result<After, ServerError> {
    ConditionType::Resized
        .no(
            Reason::AwaitingCapacity,
            format!(
                "waiting for the scheduler to claim flavor {} on this hypervisor",
                server.spec.flavor
            ),
        )
        .set(&mut status.conditions, server.metadata.generation);
    status.phase = ServerPhase::Resizing;
    write_status(ctx, server, status).await?;
    Ok(After::Return(Action::requeue(ctx.config.resync)))
}

/// The guest drifted and the policy is to report it: say so, touch nothing.
async fn report_drift(
    ctx: &Ctx,
    server: &Server,
    drift: Drift,
    info: Option<&DomainInfo>,
    mut status: ServerStatus,
) -> Result<After, ServerError> {
    let gen_ = server.metadata.generation;
    let name = info.map_or_else(
        || server.uid().map(|u| instance_name(&u)).unwrap_or_default(),
        |d| d.name.clone(),
    );
    let (reason, what) = match drift {
        Drift::Missing => (Reason::DomainMissing, "is gone from the hypervisor"),
        Drift::PoweredOff => (Reason::PoweredOff, "was shut off outside Stratus"),
    };
    let msg = format!("domain {name} {what}; driftPolicy Report leaves it as it is");
    let new = !drifted(&status);
    status.phase = ServerPhase::Error;
    status.power_state = Some(observed(info.map(|d| d.state)));
    ConditionType::Drifted
        .yes(reason, msg.clone())
        .set(&mut status.conditions, gen_);
    ConditionType::Ready
        .no(Reason::Drifted, msg.clone())
        .set(&mut status.conditions, gen_);
    // The definition is left as it is, so a volume the spec dropped may still be in it: this
    // generation is observed (and the volume released by the attachments controller) only
    // once the definition holds no disk but the volumes asked for.
    if info.is_none() || definition_settled(ctx, server, &name).await? {
        status.observed_generation = gen_;
    }
    write_status(ctx, server, status).await?;
    if new {
        publish(ctx, server, EventType::Warning, "DriftDetected", msg).await;
    }
    Ok(After::Return(Action::requeue(ctx.config.resync)))
}

/// The volumes `server` names (`spec.volumes`), as this node can give them to its guest.
async fn resolve_volumes(ctx: &Ctx, server: &Server) -> Result<vols::Resolved, ServerError> {
    let names: Vec<String> = server
        .spec
        .volumes
        .iter()
        .map(|v| v.volume.clone())
        .collect();
    resolve_named(ctx, server, &names).await
}

/// The volumes `names` of `server`'s namespace as this node can give them to its guest.
async fn resolve_named(
    ctx: &Ctx,
    server: &Server,
    names: &[String],
) -> Result<vols::Resolved, ServerError> {
    let ns = server.namespace().ok_or(ServerError::Incomplete)?;
    vols::resolve(
        &ctx.client,
        &ns,
        &server.name_any(),
        &ctx.config.node,
        names,
        ctx.config.nbd(),
    )
    .await
    .map_err(ServerError::Api)
}

/// Whether domain `name`'s definition holds only volumes `server` asks for and this node
/// can give it (see [`vols::Resolved::holds_only_ready`]); nothing is changed.
async fn definition_settled(ctx: &Ctx, server: &Server, name: &str) -> Result<bool, ServerError> {
    let resolved = resolve_volumes(ctx, server).await?;
    let driver = Arc::clone(&ctx.driver);
    let name = name.to_owned();
    let attached = blocking(move || driver.volumes(&name)).await??;
    Ok(resolved.holds_only_ready(&attached))
}

/// Powers the guest on; a guest that last ran went down behind Stratus's back.
async fn power_on(
    ctx: &Ctx,
    server: &Server,
    name: &str,
    status: &mut ServerStatus,
) -> Result<After, ServerError> {
    if root_moved(ctx, server, name).await? {
        // Its definition's root disk names another export than the boot volume's now (one
        // ended since): defined anew from the Server, then started.
        return make(ctx, server, Step::Build { recreate: false }, name, status).await;
    }
    domain_verb(ctx, name, |d, n| d.start(n)).await?;
    status.launched_at = Some(now());
    let went_down = status.power_state == Some(ObservedPowerState::Running);
    let (kind, reason, note) = if went_down {
        (
            EventType::Warning,
            "Restarted",
            format!("domain {name} was shut off outside Stratus; started it again"),
        )
    } else {
        (
            EventType::Normal,
            "Started",
            format!("domain {name} started"),
        )
    };
    publish(ctx, server, kind, reason, note).await;
    Ok(After::Observe)
}

/// Whether a Server booting from a volume has its domain's root disk defined on another path
/// than the boot volume resolves to here now (its export served anew, the one defined ended).
/// A boot volume not resolved now says no: the start then fails or succeeds as defined.
async fn root_moved(ctx: &Ctx, server: &Server, name: &str) -> Result<bool, ServerError> {
    let (Some(volume), Some(ns)) = (server.spec.boot_volume.as_deref(), server.namespace()) else {
        return Ok(false);
    };
    let wanted = match boot_volume(ctx, server, &ns, volume).await {
        Ok(boot) => boot.root.path,
        Err(NotBuilt::Failed(e)) => return Err(e),
        Err(NotBuilt::Blocked(_) | NotBuilt::Waiting(_)) => return Ok(false),
    };
    let driver = Arc::clone(&ctx.driver);
    let name = name.to_owned();
    let defined = blocking(move || driver.defined_root(&name)).await??;
    Ok(defined.is_some_and(|d| d != wanted))
}

/// Asks the guest to shut down, and notes when, for the power-off after the grace period.
async fn request_shutdown(
    ctx: &Ctx,
    server: &Server,
    name: &str,
    mut status: ServerStatus,
) -> Result<After, ServerError> {
    domain_verb(ctx, name, |d, n| d.shutdown(n)).await?;
    ConditionType::Stopping
        .yes(
            Reason::ShutdownRequested,
            format!(
                "asked the guest to shut down; it is powered off after {}s",
                SHUTDOWN_GRACE.as_secs()
            ),
        )
        .set(&mut status.conditions, server.metadata.generation);
    write_status(ctx, server, status).await?;
    Ok(After::Return(Action::requeue(Duration::from_secs(1))))
}

/// The guest did not shut down in time: power it off.
async fn power_off(ctx: &Ctx, server: &Server, name: &str) -> Result<After, ServerError> {
    domain_verb(ctx, name, |d, n| d.destroy(n)).await?;
    publish(
        ctx,
        server,
        EventType::Warning,
        "PoweredOff",
        format!(
            "the guest did not shut down within {}s; powered it off",
            SHUTDOWN_GRACE.as_secs()
        ),
    )
    .await;
    Ok(After::Observe)
}

/// Reboots as asked, once per `rebootRequest`.
async fn reboot(
    ctx: &Ctx,
    server: &Server,
    name: &str,
    kind: RebootType,
    status: &mut ServerStatus,
) -> Result<After, ServerError> {
    match kind {
        RebootType::Soft => domain_verb(ctx, name, |d, n| d.reboot(n)).await?,
        RebootType::Hard => domain_verb(ctx, name, |d, n| d.reset(n)).await?,
    }
    status.last_reboot_request = server.spec.reboot_request.clone();
    publish(
        ctx,
        server,
        EventType::Normal,
        "Rebooted",
        format!("{kind:?} reboot of {name}"),
    )
    .await;
    Ok(After::Observe)
}

fn error_policy(server: Arc<Server>, e: &ServerError, ctx: Arc<Ctx>) -> Action {
    ctx.runtime.error_policy(&server, e)
}

/// Reconciles every Server placed on this node until the watch ends, and at once the one
/// whose domain a libvirt event names. Returns the Server cache (for the node's heartbeat and
/// the janitor).
pub(crate) fn controller(
    ctx: Arc<Ctx>,
    domain_events: tokio::sync::mpsc::UnboundedReceiver<String>,
) -> (Store<Server>, impl std::future::Future<Output = ()>) {
    let api = Api::<Server>::all(ctx.client.clone());
    let cfg = watcher::Config::default().fields(&format!("status.hypervisor={}", ctx.config.node));
    let controller = Controller::new(api, cfg)
        .with_config(kube::runtime::controller::Config::default().concurrency(64));
    let store = controller.store();
    let servers = store.clone();
    let holders = store.clone();
    let triggers = futures::stream::unfold(domain_events, |mut rx| async move {
        rx.recv().await.map(|name| (name, rx))
    })
    .filter_map(move |domain| {
        let uid = domain.strip_prefix("stratus-").map(str::to_owned);
        let server = uid.and_then(|uid| servers.find(|s| s.uid().as_deref() == Some(uid.as_str())));
        if let Some(s) = &server {
            tracing::debug!(%domain, server = %s.name_any(), "domain event");
        }
        std::future::ready(server.map(|s| ObjectRef::from_obj(&*s)))
    });
    // A Port placed here (or changed) wakes the Server it is bound to.
    let ports = Api::<Port>::all(ctx.client.clone());
    let ports_cfg =
        watcher::Config::default().fields(&format!("status.hypervisor={}", ctx.config.node));
    // A Volume of this node's pools (made, grown, claimed) wakes the Servers it is attached to;
    // so does a Volume of another node attached here (its export made, moved or ended), at
    // once rather than at the Server's next requeue.
    let volumes = Api::<Volume>::all(ctx.client.clone());
    let volumes_cfg =
        watcher::Config::default().fields(&format!("status.node={}", ctx.config.node));
    let attached_here =
        watcher::Config::default().fields(&format!("status.attachedNode={}", ctx.config.node));
    let attached_to = |vol: Volume| {
        let ns = vol.namespace().unwrap_or_default();
        let status = vol.status.unwrap_or_default();
        status
            .attached_servers()
            .into_iter()
            .map(|server| ObjectRef::<Server>::new(server).within(&ns))
            .collect::<Vec<_>>()
    };
    // A VolumeExport to this node (made, served, ended) wakes the Servers here naming its
    // volume.
    let exports = Api::<VolumeExport>::all(ctx.client.clone());
    let exports_cfg = watcher::Config::default().fields(&format!("spec.node={}", ctx.config.node));
    let naming = move |x: VolumeExport| {
        let v = x.spec.volume;
        holders
            .state()
            .into_iter()
            .filter(|s| {
                s.namespace().as_deref() == Some(v.namespace.as_str())
                    && (s.spec.boot_volume.as_deref() == Some(v.name.as_str())
                        || s.spec.volumes.iter().any(|sv| sv.volume == v.name))
            })
            .map(|s| ObjectRef::from_obj(&*s))
            .collect::<Vec<_>>()
    };
    let run = controller
        .watches(exports, exports_cfg, naming)
        .watches(ports, ports_cfg, |port| {
            let ns = port.namespace()?;
            let server = port.status.as_ref()?.bound_to.clone()?;
            Some(ObjectRef::<Server>::new(&server).within(&ns))
        })
        .watches(volumes.clone(), volumes_cfg, attached_to)
        .watches(volumes, attached_here, attached_to)
        .reconcile_on(triggers)
        .run(reconcile, error_policy, ctx)
        .for_each(|_| async {});
    (store, run)
}

/// Removes guests (and their files) whose Server is gone or placed elsewhere: what a
/// deletion behind the finalizer's back, or an agent dying mid-teardown, leaves.
pub(crate) async fn sweep(ctx: &Ctx) -> Result<usize, ServerError> {
    let driver = Arc::clone(&ctx.driver);
    let domains = blocking(move || driver.list()).await??;
    let mut removed = 0;
    for d in domains {
        let Some(owner) = &d.owner else { continue };
        let server = match Api::<Server>::namespaced(ctx.client.clone(), &owner.namespace)
            .get_opt(&owner.name)
            .await
        {
            Ok(s) => s,
            // A node may read only the servers placed on it: this one is placed elsewhere.
            Err(kube::Error::Api(e)) if e.code == 403 => None,
            Err(e) => return Err(ServerError::Api(e)),
        };
        let ours = server.as_ref().is_some_and(|s| {
            s.uid().as_deref() == Some(owner.uid.as_str())
                && s.status.as_ref().and_then(|st| st.hypervisor.as_deref())
                    == Some(ctx.config.node.as_str())
        });
        if !ours {
            tracing::info!(domain = %d.name, server = %owner.name, "removing a guest whose server is gone");
            teardown(ctx, &owner.uid).await?;
            removed += 1;
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn server(power: &str) -> Server {
        serde_json::from_value(json!({
            "apiVersion": "compute.stratus.dev/v1", "kind": "Server",
            "metadata": {"name": "web", "namespace": "demo", "uid": "u1"},
            "spec": {"flavor": "m1.tiny", "image": "tiny", "powerState": power},
            "status": {"hypervisor": "n1", "flavor": "m1.tiny", "image": "tiny",
                       "launchedAt": "2026-01-01T00:00:00Z"}
        }))
        .expect("a server")
    }

    #[test]
    fn a_missing_domain_is_built_and_a_vanished_one_recreated() {
        let mut s = server("Running");
        assert_eq!(plan(&s, None, None, false), Step::Build { recreate: true });
        s.status = None;
        assert_eq!(plan(&s, None, None, false), Step::Build { recreate: false });
    }

    #[test]
    fn power_follows_the_spec() {
        let run = server("Running");
        assert_eq!(
            plan(&run, Some(DomainState::Shutoff), None, false),
            Step::Start
        );
        assert_eq!(
            plan(&run, Some(DomainState::Crashed), None, false),
            Step::Start
        );
        assert_eq!(
            plan(&run, Some(DomainState::Running), None, false),
            Step::Observe
        );
        let stop = server("Stopped");
        assert_eq!(
            plan(&stop, Some(DomainState::Running), None, false),
            Step::Shutdown
        );
        assert_eq!(
            plan(
                &stop,
                Some(DomainState::Running),
                Some(Duration::from_secs(3)),
                false
            ),
            Step::Observe
        );
        assert_eq!(
            plan(
                &stop,
                Some(DomainState::Running),
                Some(SHUTDOWN_GRACE),
                false
            ),
            Step::PowerOff
        );
        assert_eq!(
            plan(&stop, Some(DomainState::Shutoff), None, false),
            Step::Observe
        );
    }

    #[test]
    fn drift_is_repaired_or_reported_as_the_policy_says() {
        let mut s = server("Running");
        if let Some(st) = s.status.as_mut() {
            st.power_state = Some(ObservedPowerState::Running);
        }
        // Recreate (the default): a vanished domain is built again, a stopped one started.
        assert_eq!(plan(&s, None, None, false), Step::Build { recreate: true });
        assert_eq!(
            plan(&s, Some(DomainState::Shutoff), None, false),
            Step::Start
        );
        s.spec.drift_policy = DriftPolicy::Report;
        assert_eq!(
            plan(&s, None, None, false),
            Step::ReportDrift(Drift::Missing)
        );
        assert_eq!(
            plan(&s, Some(DomainState::Crashed), None, false),
            Step::ReportDrift(Drift::PoweredOff)
        );
        // Once reported (the status now says Shutdown), it stays reported.
        if let Some(st) = s.status.as_mut() {
            st.power_state = Some(ObservedPowerState::Shutdown);
            ConditionType::Drifted
                .yes(Reason::PoweredOff, "")
                .set(&mut st.conditions, None);
        }
        assert_eq!(
            plan(&s, Some(DomainState::Shutoff), None, false),
            Step::ReportDrift(Drift::PoweredOff)
        );
        // A server that was stopped on request and is asked to run again is simply started.
        let mut stopped = server("Running");
        if let Some(st) = stopped.status.as_mut() {
            st.power_state = Some(ObservedPowerState::Shutdown);
        }
        stopped.spec.drift_policy = DriftPolicy::Report;
        assert_eq!(
            plan(&stopped, Some(DomainState::Shutoff), None, false),
            Step::Start
        );
        // Never built yet: built, whatever the policy.
        stopped.status = None;
        assert_eq!(
            plan(&stopped, None, None, false),
            Step::Build { recreate: false }
        );
    }

    #[test]
    fn reboot_once_per_request() {
        let mut s = server("Running");
        s.spec.reboot_request = Some("t1".into());
        assert_eq!(
            plan(&s, Some(DomainState::Running), None, false),
            Step::Reboot(RebootType::Soft)
        );
        if let Some(st) = s.status.as_mut() {
            st.last_reboot_request = Some("t1".into());
        }
        assert_eq!(
            plan(&s, Some(DomainState::Running), None, false),
            Step::Observe
        );
    }

    #[test]
    fn image_and_flavor_changes_rebuild_and_resize() {
        let mut s = server("Running");
        s.spec.image = Some("other".into());
        assert_eq!(
            plan(&s, Some(DomainState::Running), None, false),
            Step::Rebuild
        );
        let mut s = server("Running");
        s.spec.flavor = "m1.small".into();
        assert_eq!(
            plan(&s, Some(DomainState::Running), None, false),
            Step::AwaitResizeClaim
        );
        assert_eq!(
            plan(&s, Some(DomainState::Running), None, true),
            Step::Resize
        );
    }

    #[test]
    fn a_boot_volume_boots_only_the_images_it_was_made_from_by_uid() {
        let image = |uid: &str| -> Image {
            serde_json::from_value(json!({
                "apiVersion": "image.stratus.dev/v1", "kind": "Image",
                "metadata": {"name": "tiny", "namespace": "demo", "uid": uid},
                "spec": {"diskFormat": "raw", "source": {"url": "http://x/y"}},
            }))
            .expect("an image")
        };
        let recorded = ImageRef {
            namespace: "demo".into(),
            name: "tiny".into(),
            uid: "i1".into(),
        };
        assert_eq!(
            same_image("boot", "sourceImage", Some(&recorded), Some(&image("i1"))),
            Ok(())
        );
        // Re-published under the same name: not the volume's image.
        let b = same_image("boot", "kernelImage", Some(&recorded), Some(&image("i2")))
            .expect_err("another image");
        assert_eq!(b.reason, Reason::ImageNotFound);
        assert!(
            b.message.contains("replaced") && b.message.contains("i1"),
            "{}",
            b.message
        );
        let b = same_image("boot", "kernelImage", Some(&recorded), None).expect_err("gone");
        assert!(b.message.contains("gone"), "{}", b.message);
        // Nothing recorded: no name is trusted instead.
        let b = same_image("boot", "sourceImage", None, Some(&image("i1"))).expect_err("unknown");
        assert!(b.message.contains("status.sourceImage"), "{}", b.message);
    }

    #[test]
    fn image_failures_say_why_the_server_is_not_built() {
        use stratus_image_cache::{Refusal, Unsafe};
        let cases = [
            (
                ImageError::Unsafe(Unsafe::BackingFile("/etc/passwd".into())),
                Reason::ImageRefused,
                "image \"evil\": the image data is refused: it has a backing file (\"/etc/passwd\")",
            ),
            (
                ImageError::Unsafe(Unsafe::FormatMismatch {
                    declared: Format::Kernel,
                    found: "qcow2".into(),
                }),
                Reason::ImageRefused,
                "image \"evil\": the image data is refused: it is declared kernel but its data is qcow2",
            ),
            (
                ImageError::Refused {
                    url: "http://127.0.0.1/x".into(),
                    reason: Refusal::Scheme("gopher".into()),
                },
                Reason::ImageUrlRefused,
                "image \"evil\": image URL http://127.0.0.1/x refused: scheme \"gopher\" is not allowed",
            ),
            (
                ImageError::TooLarge {
                    url: "http://x/y".into(),
                    limit: 10,
                },
                Reason::ImageTooLarge,
                "image \"evil\": the data is larger than this cloud's limit of 10 bytes",
            ),
        ];
        for (e, reason, message) in cases {
            let b = image_blocked("evil", &e);
            assert_eq!((b.reason, b.message.as_str()), (reason, message));
        }
    }
}

#[cfg(test)]
mod port_tests {
    use super::*;
    use serde_json::json;

    fn port(status: serde_json::Value) -> Port {
        serde_json::from_value(json!({
            "apiVersion": "network.stratus.dev/v1", "kind": "Port",
            "metadata": {"name": "web-0", "namespace": "demo", "uid": "p1"},
            "spec": {"network": "private"},
            "status": status,
        }))
        .expect("a port")
    }

    #[test]
    fn a_port_is_plugged_in_only_once_placed_here_for_this_server() {
        let placed = json!({"phase": "Down", "macAddress": "fa:16:3e:00:00:01",
                            "fixedIPs": [{"subnet": "s", "ipAddress": "10.0.0.5"}],
                            "boundTo": "web", "hypervisor": "n1", "interfaceName": "tapabc"});
        assert_eq!(
            port_ready(&port(placed.clone()), "web", "n1"),
            Ok(("fa:16:3e:00:00:01".into(), "tapabc".into()))
        );
        let waits = |status: serde_json::Value, what: &str| {
            let e = port_ready(&port(status), "web", "n1").expect_err("waits");
            assert!(e.contains("\"web-0\"") && e.contains(what), "{e}");
        };
        waits(json!({"phase": "Pending"}), "MAC");
        let mut other = placed.clone();
        other["boundTo"] = "db".into();
        waits(other, "bound");
        let mut elsewhere = placed.clone();
        elsewhere["hypervisor"] = "n2".into();
        waits(elsewhere, "node n1");
        let mut unnamed = placed;
        unnamed["interfaceName"] = serde_json::Value::Null;
        waits(unnamed, "interface name");
    }

    #[test]
    fn the_config_drive_names_each_interface_by_mac_with_its_addresses() {
        let nic = |mac: &str, tap: &str, addresses: Vec<(String, Option<String>)>| Nic {
            interface: InterfaceSpec {
                mac: mac.into(),
                tap: tap.into(),
                mtu: Some(1450),
            },
            addresses,
        };
        let cfg = network_config(&[
            nic(
                "fa:16:3e:00:00:01",
                "tapa",
                vec![("10.0.0.5/24".into(), Some("10.0.0.1".into()))],
            ),
            nic(
                "fa:16:3e:00:00:02",
                "tapb",
                vec![("10.0.1.5/24".into(), Some("10.0.1.1".into()))],
            ),
            nic("fa:16:3e:00:00:03", "tapc", vec![]),
        ]);
        assert_eq!(cfg["version"], 2);
        let eth0 = &cfg["ethernets"]["eth0"];
        assert_eq!(eth0["match"]["macaddress"], "fa:16:3e:00:00:01");
        assert_eq!(eth0["set-name"], "eth0");
        assert_eq!(eth0["addresses"], json!(["10.0.0.5/24"]));
        assert_eq!(
            eth0["routes"],
            json!([{"to": "0.0.0.0/0", "via": "10.0.0.1"}])
        );
        assert_eq!(eth0["mtu"], 1450);
        // One default route: the first interface's.
        assert_eq!(cfg["ethernets"]["eth1"]["routes"], serde_json::Value::Null);
        assert_eq!(
            cfg["ethernets"]["eth1"]["addresses"],
            json!(["10.0.1.5/24"])
        );
        // No address known: the guest asks DHCP (the network agent serves static leases).
        assert_eq!(cfg["ethernets"]["eth2"]["dhcp4"], true);
    }
}
