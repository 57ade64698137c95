//! `stratus agent`: one node's agents (compute, network, storage, object), against an API server.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use stratus_agents::compute::driver::TxChecksums;
use stratus_agents::compute::driver::libvirt::Libvirt;
use stratus_agents::compute::node::MAX_HEARTBEAT_SECONDS;
use stratus_network_agent::driver::dnsmasq::Dnsmasq;
use stratus_network_agent::driver::netlink::NetlinkLinks;
use stratus_network_agent::driver::nft::NftFirewall;
use stratus_network_agent::driver::ovs::{OvsLinks, attach_underlay};
use stratus_network_agent::driver::ovs_daemon::{Ovs, OvsDaemon};
use stratus_network_agent::driver::ovs_firewall::OvsFirewall;
use stratus_network_agent::driver::{Firewall, IfName, Links, Name, Netns};

/// What a node does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum Role {
    /// Runs the guests of the Servers placed on it (libvirt).
    Compute,
    /// Wires the Ports placed on it: bridges, VXLAN, nftables, DHCP (no libvirt needed).
    Network,
    /// Serves its storage pools: the Volumes and VolumeSnapshots placed on them (LVM, files).
    Storage,
    /// Runs Swift's account, container and object servers and their daemons on its devices,
    /// with the rings of the ObjectRings installed (no libvirt needed).
    Object,
}

/// Options of the object role.
#[derive(Debug, Default, clap::Args)]
pub struct ObjectArgs {
    /// Object role: the address Swift's servers listen on (their devices' `ip` in the rings).
    #[arg(long, value_name = "IP")]
    pub object_ip: Option<Ipv4Addr>,
    /// Object role: the directory holding one directory per device (Swift's `devices`).
    #[arg(long, value_name = "DIR", default_value = "/srv/node")]
    pub object_devices_dir: PathBuf,
    /// Object role: a device, a directory under --object-devices-dir (a ring device's
    /// `device`). Repeatable.
    #[arg(long = "object-device", value_name = "NAME")]
    pub object_devices: Vec<stratus_object_agent::config::DeviceName>,
    /// Object role: devices may be plain directories; without it each must be a mount point
    /// (Swift's `mount_check`), and one that is not is reported failed.
    #[arg(long)]
    pub object_unmounted_devices: bool,
    /// Object role: the account server's port.
    #[arg(long, default_value_t = 6202)]
    pub account_port: u16,
    /// Object role: the container server's port.
    #[arg(long, default_value_t = 6201)]
    pub container_port: u16,
    /// Object role: the object server's port.
    #[arg(long, default_value_t = 6200)]
    pub object_port: u16,
    /// Object role: seconds between the replicators' (and updaters') passes.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u32).range(1..=86_400))]
    pub object_replication_interval: u32,
    /// Object role: the user Swift's servers run as; the devices and STATE_DIR/object must
    /// be writable by it.
    #[arg(long, default_value = "root")]
    pub swift_user: String,
    /// Object role: seconds between reports of the node's devices, servers and replication
    /// (its ObjectNode's status).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub object_heartbeat_seconds: u64,
    /// Object role: the address of a Swift proxy, which with the rings' nodes is all that may
    /// reach the servers' ports (an nftables table drops the rest). Repeatable.
    #[arg(long = "object-proxy", value_name = "IP")]
    pub object_proxies: Vec<Ipv4Addr>,
    /// Object role: the cluster's Swift hash path prefix and suffix (Swift's `[swift-hash]`
    /// lines), a file only its owner reads (0600), the same on every node and proxy of the
    /// cluster; made with random values at the first start when it is not there (default
    /// STATE_DIR/object/swift-hash). The node's Swift processes read it as their swift.conf.
    #[arg(long, value_name = "FILE")]
    pub swift_hash_file: Option<PathBuf>,
}

/// Options of the storage role.
#[derive(Debug, Default, clap::Args)]
pub struct StorageArgs {
    /// Storage role: a pool the node serves, `NAME=lvm:VG` (an LVM volume group) or
    /// `NAME=file:DIR` (raw files in an absolute directory); its StoragePool is created if
    /// absent. Repeatable.
    #[arg(long = "storage-pool", value_name = "NAME=lvm:VG|NAME=file:DIR")]
    pub storage_pools: Vec<stratus_storage_agent::pool::PoolConfig>,
    /// Storage role: seconds between reports of the pools' capacity (their heartbeat).
    #[arg(long, default_value_t = 5)]
    pub storage_heartbeat_seconds: u64,
    /// Storage role: the address this node exports volumes to other nodes at (over NBD, each
    /// export's port open to the address of the node attaching it alone). Without it, this
    /// node's volumes attach only to servers on this node.
    #[arg(long, value_name = "IP")]
    pub storage_address: Option<std::net::IpAddr>,
    /// Storage role: this node's NBD certificates (`stratus pki nbd-node NAME --address IP
    /// --out DIR`): exports are served over TLS alone, each to the certificate of the node
    /// attaching it. Required with --storage-address, unless --nbd-insecure.
    #[arg(long, value_name = "DIR")]
    pub nbd_tls_dir: Option<std::path::PathBuf>,
    /// Storage and compute roles: volumes cross the storage network over NBD without TLS.
    /// A storage node serves its exports without it (any process of the attaching node's
    /// address reads the volume, and its data crosses the network in the clear); a compute
    /// node attaches exports served without it, which it otherwise refuses (the Server's
    /// `Attached` condition says `VolumeRefused`).
    #[arg(long, conflicts_with = "nbd_tls_dir")]
    pub nbd_insecure: bool,
    /// Storage and compute roles: the TCP ports volume exports are served on, outside the
    /// kernel's ephemeral range (net.ipv4.ip_local_port_range), so no outgoing connection of
    /// the host is given one; the cluster's one range, as a compute node attaches a volume of
    /// another node from no other port.
    #[arg(long, value_name = "FIRST-LAST", default_value_t)]
    pub export_ports: stratus_storage_agent::export::PortRange,
}

/// Options of the network role.
#[derive(Debug, Default, clap::Args)]
pub struct NetworkArgs {
    /// Network role: the address this node's VXLAN traffic leaves from. Without it, the
    /// address of --tunnel-interface, else the node's Hypervisor's `status.hostIP`. Given
    /// either way, it is reported as that Hypervisor's `status.hostIP` (when the Hypervisor
    /// exists), which is how other nodes find this one.
    #[arg(long)]
    pub underlay_ip: Option<Ipv4Addr>,
    /// Network role: take the underlay address from this interface's first IPv4 address.
    #[arg(long)]
    pub tunnel_interface: Option<String>,
    /// Network role: the network namespace (`ip netns` name) holding the node's bridges
    /// and VXLAN devices, for a simulated node; by default the agent's own.
    #[arg(long)]
    pub network_namespace: Option<String>,
    /// Network role: seconds between reads of the node's wiring from the kernel (wiring
    /// changed by hand is repaired within this time).
    #[arg(long, default_value_t = 2)]
    pub network_resync_seconds: u64,
    /// Network role: `PHYSNET=IFACE`, the node's interface for a physical network (flat
    /// provider networks naming PHYSNET are bridged to IFACE, vlan ones tagged on it).
    /// Repeatable.
    #[arg(long = "physical-interface", value_name = "PHYSNET=IFACE", value_parser = physical_interface)]
    pub physical_interfaces: Vec<(String, IfName)>,
    /// Network role: where the DHCP servers' files go (default `STATE_DIR/network/dhcp`). Its
    /// parents must be searchable by everyone: dnsmasq rereads its hosts file as `nobody`.
    #[arg(long)]
    pub dhcp_dir: Option<std::path::PathBuf>,
    /// Network role: what carries the node's networks: `kernel` (a Linux bridge and a VXLAN
    /// device per network) or `ovs` (one Open vSwitch integration bridge, br-int, userspace
    /// datapath: the system's switch when its database answers and no --network-namespace
    /// is given, else one the agent starts in the node's namespace with its files in
    /// STATE_DIR/network/ovs and leaves running for its next start). With `ovs`,
    /// --tunnel-interface is put on the switch's bridge br-phy with its address, which is
    /// where the userspace datapath sends tunnels from. Security groups and anti-spoofing
    /// are then OpenFlow flows with OVS conntrack. The compute role's guests then fill in
    /// the checksums of what they send (no virtio-net offloads to the host), which the
    /// userspace datapath cannot send through its tunnels.
    #[arg(long, value_enum, default_value = "kernel")]
    pub datapath: Datapath,
}

/// What carries a node's networks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Datapath {
    /// Linux bridges, VXLAN devices and nftables.
    #[default]
    Kernel,
    /// Open vSwitch.
    Ovs,
}

/// The node's Open vSwitch: the system's, or one of its own (started if it is not running),
/// with `tunnel` put on its underlay bridge; and the underlay address `tunnel` then has.
fn ovs_links(
    netns: &Netns,
    state_dir: &std::path::Path,
    tunnel: Option<&IfName>,
) -> Result<(OvsLinks, Option<Ipv4Addr>)> {
    // The system's switch runs in the host's namespace: a simulated node (a namespace of
    // its own) has a switch of its own, or two such nodes would share one bridge.
    let system = Ovs::system();
    let (links, ovs) = if *netns == Netns::Host && system.answers() {
        (OvsLinks::new(netns.clone(), system.clone()), system)
    } else {
        let daemon = OvsDaemon::new(netns.clone(), state_dir.join("network").join("ovs"));
        daemon.start().context("start Open vSwitch")?;
        let ovs = daemon.ovs();
        (OvsLinks::with_daemon(netns.clone(), daemon), ovs)
    };
    let underlay = match tunnel {
        Some(iface) => Some(
            attach_underlay(&ovs, netns, iface)
                .with_context(|| format!("put {iface} on the switch's underlay bridge"))?
                .addr(),
        ),
        None => None,
    };
    Ok((links, underlay))
}

/// Parses `PHYSNET=IFACE`.
fn physical_interface(s: &str) -> Result<(String, IfName), String> {
    let (net, iface) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not PHYSNET=IFACE"))?;
    let ok = !net.is_empty()
        && net.len() <= 15
        && net
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if !ok {
        return Err(format!("{net:?} is not a physical network name"));
    }
    let iface = IfName::new(iface).map_err(|e| e.to_string())?;
    Ok((net.to_owned(), iface))
}

/// Options of `stratus agent`.
#[derive(Debug, clap::Args)]
pub struct AgentArgs {
    /// The node's name (its Hypervisor object; the agent's identity is `system:node:NAME`).
    #[arg(long)]
    pub node: String,
    /// What this node does, comma-separated: `compute`, `network`, `storage`, `object`.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "compute")]
    pub roles: Vec<Role>,
    /// kubeconfig of the node's identity (defaults to the files $KUBECONFIG lists, then
    /// ~/.kube/config).
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// libvirt connection URI: `qemu:///system`, a socket of its own
    /// (`qemu:///system?socket=PATH`), or `test:///default` for scale runs without guests.
    #[arg(long, default_value = "qemu:///system")]
    pub libvirt_uri: String,
    /// Where the image cache and the guests' disks, config drives and console logs live,
    /// and the network role's DHCP servers' files (under `network/`).
    #[arg(long, default_value = "/var/lib/stratus")]
    pub state_dir: PathBuf,
    /// Availability zone the node registers in.
    #[arg(long, default_value = "nova")]
    pub zone: String,
    /// Seconds between heartbeats (1 to 10); the node is NotReady after missing four. The
    /// node lifecycle controller honours a Lease for at most 40 s, so a longer interval would
    /// see the node lost between two heartbeats.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=MAX_HEARTBEAT_SECONDS))]
    pub heartbeat_seconds: u64,
    /// Seconds between reads of each guest's state from libvirt. libvirt's domain events
    /// already report changes at once; this is the safety net for a missed one.
    #[arg(long, default_value_t = 10)]
    pub resync_seconds: u64,
    /// What the node's image cache may fetch.
    #[command(flatten)]
    pub images: crate::image_policy::ImagePolicyArgs,
    /// The network role's options.
    #[command(flatten)]
    pub network: NetworkArgs,
    /// The storage role's options.
    #[command(flatten)]
    pub storage: StorageArgs,
    /// The object role's options.
    #[command(flatten)]
    pub object: ObjectArgs,
}

/// Runs the node's agents (each role given) until Ctrl-C or SIGTERM.
pub async fn run(args: AgentArgs) -> Result<()> {
    if args.roles.is_empty() {
        bail!("--roles names no role");
    }
    let kube_config = crate::kubeconfig::Kubeconfig::locate(args.kubeconfig.as_deref())?
        .config()
        .await?;
    let image_policy = args
        .images
        .policy(crate::image_policy::api_server_addrs(&kube_config).await);
    let client = stratus_runtime::client::client(kube_config).context("build the API client")?;
    std::fs::create_dir_all(&args.state_dir)
        .with_context(|| format!("create {}", args.state_dir.display()))?;
    let state_dir = std::path::absolute(&args.state_dir).context("resolve the state directory")?;
    let storage = args
        .roles
        .contains(&Role::Storage)
        .then(|| storage(client.clone(), &args, &state_dir, image_policy.clone()))
        .transpose()?;
    let compute = if args.roles.contains(&Role::Compute) {
        let uri = args.libvirt_uri.clone();
        let libvirt = tokio::task::spawn_blocking(move || Libvirt::connect(&uri))
            .await
            .context("connect to libvirt")?
            .with_context(|| format!("connect to libvirt at {}", args.libvirt_uri))?;
        // Open vSwitch's userspace datapath drops a tunneled frame whose checksum the guest
        // left to the host (see `TxChecksums`): on such a node guests fill them in.
        let libvirt = match args.network.datapath {
            Datapath::Kernel => libvirt,
            Datapath::Ovs => libvirt.with_tx_checksums(TxChecksums::Guest),
        };
        let config = stratus_agents::compute::Config {
            node: args.node.clone(),
            state_dir: state_dir.clone(),
            zone: args.zone.clone(),
            heartbeat: std::time::Duration::from_secs(args.heartbeat_seconds.max(1)),
            resync: std::time::Duration::from_secs(args.resync_seconds.max(1)),
            image_policy,
            export_ports: args.storage.export_ports,
            nbd_insecure: args.storage.nbd_insecure,
        };
        if config.nbd_insecure {
            tracing::warn!(
                "--nbd-insecure: volumes of other nodes are attached from exports served without TLS, in the clear on the storage network"
            );
        }
        tracing::info!(node = %config.node, uri = %args.libvirt_uri, "compute agent starting");
        Some(stratus_agents::compute::run(
            client.clone(),
            Arc::new(libvirt),
            config,
        ))
    } else {
        None
    };
    let object = args
        .roles
        .contains(&Role::Object)
        .then(|| object(client.clone(), &args, &state_dir))
        .transpose()?;
    let network = if args.roles.contains(&Role::Network) {
        Some(network(client, &args, &state_dir).await?)
    } else {
        None
    };
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("install SIGTERM handler")?;
    let compute = async {
        match compute {
            Some(c) => c.await,
            None => std::future::pending().await,
        }
    };
    let network = async {
        match network {
            Some(n) => n.await,
            None => std::future::pending().await,
        }
    };
    let storage = async {
        match storage {
            Some(s) => s.await,
            None => std::future::pending().await,
        }
    };
    let object = async {
        match object {
            Some(o) => {
                if let Err(e) = o.await {
                    tracing::error!(
                        error = format!("{:#}", anyhow::Error::new(e)),
                        "object agent stopped"
                    );
                }
            }
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        () = object => {}
        () = compute => {}
        () = network => {}
        () = storage => {}
        _ = tokio::signal::ctrl_c() => tracing::info!("interrupted"),
        _ = term.recv() => tracing::info!("terminated"),
    }
    Ok(())
}

/// The network agent of this node, ready to run.
async fn network(
    client: kube::Client,
    args: &AgentArgs,
    state_dir: &std::path::Path,
) -> Result<impl std::future::Future<Output = ()> + use<>> {
    let n = &args.network;
    let netns = match &n.network_namespace {
        Some(name) => Netns::Named(Name::new(name).context("--network-namespace")?),
        None => Netns::Host,
    };
    let ovs = match n.datapath {
        Datapath::Kernel => None,
        Datapath::Ovs => {
            let tunnel = match &n.tunnel_interface {
                Some(t) => Some(IfName::new(t).context("--tunnel-interface")?),
                None => None,
            };
            let (ns, dir) = (netns.clone(), state_dir.to_owned());
            Some(
                tokio::task::spawn_blocking(move || ovs_links(&ns, &dir, tunnel.as_ref()))
                    .await
                    .context("set up Open vSwitch")??,
            )
        }
    };
    let underlay = match (n.underlay_ip, &n.tunnel_interface) {
        (Some(ip), _) => Some(ip),
        (None, Some(_)) if ovs.is_some() => ovs.as_ref().and_then(|(_, ip)| *ip),
        (None, Some(iface)) => {
            let iface = IfName::new(iface).context("--tunnel-interface")?;
            let ns = netns.clone();
            let name = iface.clone();
            let addrs =
                tokio::task::spawn_blocking(move || NetlinkLinks::new().addresses(&ns, &name))
                    .await
                    .context("read the tunnel interface")?
                    .with_context(|| format!("read the addresses of {iface}"))?;
            let first = addrs.first().map(|a| a.addr());
            Some(first.with_context(|| format!("{iface} has no IPv4 address"))?)
        }
        (None, None) => None,
    };
    let nft = NftFirewall::new(netns.clone());
    let (links, firewall): (Arc<dyn Links>, Arc<dyn Firewall>) = match ovs {
        Some((l, _)) => {
            let physical = n.physical_interfaces.iter().map(|(_, i)| i.clone());
            let l = Arc::new(l.with_physical(physical));
            (Arc::clone(&l) as _, Arc::new(OvsFirewall::new(nft, l)))
        }
        None => (Arc::new(NetlinkLinks::new()), Arc::new(nft)),
    };
    let host = stratus_network_agent::Host {
        links,
        firewall,
        dhcp: Arc::new(Dnsmasq::new(
            n.dhcp_dir
                .clone()
                .unwrap_or_else(|| state_dir.join("network").join("dhcp")),
        )),
    };
    let config = stratus_network_agent::Config {
        node: stratus_network_agent::desired::NodeConfig {
            node: args.node.clone(),
            netns,
            underlay,
            physical: n.physical_interfaces.iter().cloned().collect(),
        },
        resync: std::time::Duration::from_secs(n.network_resync_seconds.max(1)),
    };
    tracing::info!(
        node = %args.node,
        underlay = ?underlay,
        datapath = ?n.datapath,
        "network agent starting"
    );
    Ok(stratus_network_agent::run(client, host, config))
}

/// The storage agent of this node, ready to run.
fn storage(
    client: kube::Client,
    args: &AgentArgs,
    state_dir: &std::path::Path,
    image_policy: stratus_image_cache::Policy,
) -> Result<impl std::future::Future<Output = ()> + use<>> {
    use stratus_storage_agent::driver::{Backend, file::FilePool, lvm::Lvm};
    use stratus_storage_agent::pool::Store;
    if args.storage.storage_pools.is_empty() {
        bail!("the storage role needs at least one --storage-pool");
    }
    let mut pools = Vec::new();
    for p in &args.storage.storage_pools {
        let backend: Arc<dyn Backend> = match &p.store {
            Store::Lvm(vg) => Arc::new(Lvm::new(vg).with_context(|| format!("pool {}", p.name))?),
            Store::File(dir) => {
                Arc::new(FilePool::new(dir).with_context(|| format!("pool {}", p.name))?)
            }
        };
        pools.push((p.clone(), backend));
    }
    let config = stratus_storage_agent::agent::Config {
        node: args.node.clone(),
        state_dir: state_dir.to_owned(),
        heartbeat: std::time::Duration::from_secs(args.storage.storage_heartbeat_seconds.max(1)),
        resync: std::time::Duration::from_secs(args.resync_seconds.max(1)),
        image_policy,
        storage_address: args.storage.storage_address,
        export_ports: args.storage.export_ports,
        nbd_tls_dir: args.storage.nbd_tls_dir.clone(),
    };
    match (&args.storage.nbd_tls_dir, args.storage.nbd_insecure) {
        (Some(dir), _) => stratus_storage_agent::export::check_tls_dir(dir)
            .map_err(|e| anyhow::anyhow!("--nbd-tls-dir: {e}"))?,
        (None, true) => tracing::warn!(
            "--nbd-insecure: volume exports are served without TLS, readable by any process of the attaching node's address and in the clear on the storage network"
        ),
        (None, false) if config.storage_address.is_some() => bail!(
            "--storage-address exports volumes to other nodes: give this node's NBD certificates (--nbd-tls-dir DIR, issued by stratus pki nbd-node) or --nbd-insecure"
        ),
        (None, false) => {}
    }
    if let Some(why) = stratus_storage_agent::export::ephemeral_ports()
        .and_then(|e| args.storage.export_ports.overlaps(e))
    {
        bail!("--export-ports: {why}");
    }
    tracing::info!(node = %config.node, pools = args.storage.storage_pools.len(), "storage agent starting");
    Ok(stratus_storage_agent::agent::run(client, config, pools))
}

/// The object agent of this node, ready to run.
fn object(
    client: kube::Client,
    args: &AgentArgs,
    state_dir: &std::path::Path,
) -> Result<
    impl std::future::Future<Output = Result<(), stratus_object_agent::agent::ObjectError>> + use<>,
> {
    use stratus_object_agent::config::{NodeConfig, Ports};
    let o = &args.object;
    let ip = o.object_ip.context("the object role needs --object-ip")?;
    let node = NodeConfig {
        node: args.node.clone(),
        ip,
        ports: Ports {
            account: o.account_port,
            container: o.container_port,
            object: o.object_port,
        },
        devices_dir: std::path::absolute(&o.object_devices_dir)
            .context("resolve --object-devices-dir")?,
        devices: o.object_devices.clone(),
        mount_check: !o.object_unmounted_devices,
        state_dir: state_dir.join("object"),
        replication_interval: o.object_replication_interval,
        user: o.swift_user.clone(),
        hash_file: match &o.swift_hash_file {
            Some(f) => std::path::absolute(f).context("resolve --swift-hash-file")?,
            None => state_dir.join("object").join("swift-hash"),
        },
    };
    node.check().context("the object role's configuration")?;
    let config = stratus_object_agent::agent::Config {
        node,
        heartbeat: std::time::Duration::from_secs(o.object_heartbeat_seconds),
        tick: std::time::Duration::from_secs(1),
        python: "/usr/bin/python3".into(),
        bin_dir: "/usr/bin".into(),
        restart_delay: (
            std::time::Duration::from_secs(1),
            std::time::Duration::from_secs(60),
        ),
        proxies: o.object_proxies.clone(),
    };
    tracing::info!(node = %args.node, %ip, devices = o.object_devices.len(), "object agent starting");
    let supervisor = Arc::new(stratus_object_agent::driver::process::Processes::new());
    Ok(stratus_object_agent::agent::run(client, config, supervisor))
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        agent: AgentArgs,
    }

    #[test]
    fn a_heartbeat_longer_than_the_controller_believes_a_lease_is_refused() {
        let parse =
            |s: &str| Cli::try_parse_from(["agent", "--node", "n1", "--heartbeat-seconds", s]);
        assert_eq!(parse("10").expect("10 s").agent.heartbeat_seconds, 10);
        assert_eq!(parse("2").expect("2 s").agent.heartbeat_seconds, 2);
        let err = parse("11").expect_err("four 11 s heartbeats outlast the 40 s believed");
        assert!(err.to_string().contains("1..=10"), "{err}");
        assert!(parse("0").is_err());
    }

    #[test]
    fn the_object_role_takes_device_names_and_refuses_paths() {
        let parse = |dev: &str| {
            Cli::try_parse_from([
                "agent",
                "--node",
                "o1",
                "--roles",
                "object",
                "--object-ip",
                "127.0.0.2",
                "--object-device",
                dev,
            ])
        };
        let ok = parse("sdb1").expect("a device name");
        assert_eq!(ok.agent.roles, [Role::Object]);
        assert_eq!(ok.agent.object.object_devices[0].as_str(), "sdb1");
        assert_eq!(ok.agent.object.object_port, 6200);
        for bad in ["../etc", "a/b", "..", ""] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
    }
}
