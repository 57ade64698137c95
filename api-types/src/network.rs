//! Group `network.stratus.dev`: networks, subnets, ports, routers, floating IPs and security
//! groups (Neutron's job).

// kube's `printcolumn(...)`/`selectable` repeat keys by design; clippy reads that as duplicates.
#![allow(clippy::duplicated_attributes)]

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{CIDR_PATTERN, Condition, IP_PATTERN, MAC_PATTERN, NAME_PATTERN};

/// Namespace of the network agents' Leases: one Lease per node running the network role,
/// named after the node and renewed as its heartbeat (as `kube-node-lease` holds the compute
/// agents'). Routers are placed only on nodes whose Lease here is fresh.
pub const NETWORK_AGENT_LEASE_NAMESPACE: &str = "stratus-network-agents";

/// Annotation on a network agent's Lease: the IPv4 address its VXLAN tunnels end on.
pub const TUNNEL_IP_ANNOTATION: &str = "network.stratus.dev/tunnel-ip";

/// Annotation on a network agent's Lease: the physical networks (comma-separated names) the
/// node has an interface on, for flat and VLAN provider networks.
pub const PHYSICAL_NETWORKS_ANNOTATION: &str = "network.stratus.dev/physical-networks";

/// How a Router's external gateway and a FloatingIP name their external Network: `NAME` for
/// one in their own namespace, or `NAMESPACE/NAME` for an external Network a cluster admin
/// made in another (shared provider networks live in the operator's namespace).
pub const NETWORK_REF_PATTERN: &str = r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?/)?[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$";

/// The namespace and name a network reference ([`NETWORK_REF_PATTERN`]) written in namespace
/// `ns` names.
pub fn network_ref<'a>(ns: &'a str, reference: &'a str) -> (&'a str, &'a str) {
    reference.split_once('/').unwrap_or((ns, reference))
}

/// A layer-2 network. Addresses come from its Subnets.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "network.stratus.dev",
    version = "v1",
    kind = "Network",
    namespaced,
    status = "NetworkStatus",
    derive = "PartialEq",
    shortname = "net",
    category = "stratus",
    doc = "A network (Neutron network): an isolated layer-2 segment.",
    printcolumn(name = "Status", type_ = "string", json_path = ".status.phase"),
    printcolumn(
        name = "Segmentation",
        type_ = "string",
        json_path = ".spec.segmentation"
    ),
    printcolumn(name = "VNI", type_ = "integer", json_path = ".status.vni"),
    printcolumn(name = "MTU", type_ = "integer", json_path = ".spec.mtu", priority = 1),
    printcolumn(
        name = "External",
        type_ = "boolean",
        json_path = ".spec.external",
        priority = 1
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NetworkSpec {
    /// Largest IP packet on the network, in bytes. The default leaves room for VXLAN's
    /// 50-byte overhead on a 1500-byte underlay.
    #[serde(default = "default_mtu")]
    #[schemars(range(min = 68, max = 9000))]
    pub mtu: u32,
    /// An external network provides router gateways and FloatingIPs (Neutron
    /// `router:external`).
    #[serde(default)]
    pub external: bool,
    /// How the network is carried between nodes.
    #[serde(default)]
    pub segmentation: Segmentation,
    /// For `flat` and `vlan` networks: the name of the host interface or bridge the network
    /// is bridged to (Neutron `provider:physical_network`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 15), regex(pattern = r"^[A-Za-z0-9_.-]+$"))]
    pub physical_network: Option<String>,
    /// For `vlan` networks: the 802.1Q VLAN ID asked for (Neutron
    /// `provider:segmentation_id`); without it one free on the physical network is allocated
    /// (`status.segmentationID`).
    #[serde(
        default,
        rename = "segmentationID",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(range(min = 1, max = 4094))]
    pub segmentation_id: Option<u16>,
    /// Default for the network's Ports: whether security groups and anti-spoofing apply.
    #[serde(default = "crate::common::default_true")]
    pub port_security_enabled: bool,
    /// Free-form description.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 255))]
    pub description: Option<String>,
}

fn default_mtu() -> u32 {
    1450
}

/// How a Network is carried between nodes.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Segmentation {
    /// An overlay: one VXLAN segment (VNI allocated by Stratus) per network.
    #[default]
    Vxlan,
    /// Untagged, bridged to `physicalNetwork` on every node.
    Flat,
    /// 802.1Q-tagged on `physicalNetwork`, one VLAN ID per network on that physical network.
    Vlan,
}

/// Lifecycle phase of a network object.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum NetworkPhase {
    /// Waiting for allocation (VNI, addresses) or realisation on the nodes.
    #[default]
    Pending,
    /// Realised and usable.
    Active,
    /// Realisation failed; see the conditions.
    Error,
    /// Being deleted; waiting for its dependents to go.
    Deleting,
}

/// Observed state of a Network.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NetworkStatus {
    /// Lifecycle phase.
    #[serde(default)]
    pub phase: NetworkPhase,
    /// VXLAN network identifier allocated to the network.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 16_777_215))]
    pub vni: Option<u32>,
    /// VLAN ID of a `vlan` network on its physical network (requested or allocated).
    #[serde(
        default,
        rename = "segmentationID",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(range(min = 1, max = 4094))]
    pub segmentation_id: Option<u16>,
    /// Latest observations of the network's state.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// The `metadata.generation` this status was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// An IP range on a Network, with DHCP settings.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "network.stratus.dev",
    version = "v1",
    kind = "Subnet",
    namespaced,
    status = "SubnetStatus",
    derive = "PartialEq",
    shortname = "sn",
    category = "stratus",
    selectable = ".spec.network",
    doc = "A subnet (Neutron subnet): an IP range on a Network.",
    printcolumn(name = "Network", type_ = "string", json_path = ".spec.network"),
    printcolumn(name = "CIDR", type_ = "string", json_path = ".spec.cidr"),
    printcolumn(name = "Gateway", type_ = "string", json_path = ".status.gatewayIP"),
    printcolumn(name = "Status", type_ = "string", json_path = ".status.phase"),
    printcolumn(
        name = "DHCP",
        type_ = "boolean",
        json_path = ".spec.enableDHCP",
        priority = 1
    ),
    printcolumn(
        name = "Used IPs",
        type_ = "integer",
        json_path = ".status.usedIPs",
        priority = 1
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SubnetSpec {
    /// Name of the Network.
    #[schemars(length(min = 1, max = 253), regex(pattern = NAME_PATTERN))]
    pub network: String,
    /// The address range, IPv4 or IPv6, with host bits zero (`10.0.0.0/24`).
    #[schemars(regex(pattern = CIDR_PATTERN), extend("format" = "cidr"))]
    pub cidr: String,
    /// Gateway address, inside `cidr`. Absent: the first host address of `cidr`, unless
    /// `disableGateway` is set.
    #[serde(default, rename = "gatewayIP", skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = IP_PATTERN))]
    pub gateway_ip: Option<String>,
    /// Give the subnet no gateway (Neutron `gateway_ip: null`).
    #[serde(default)]
    pub disable_gateway: bool,
    /// Ranges addresses are allocated from. Empty: all of `cidr` except the network,
    /// broadcast and gateway addresses.
    #[serde(default)]
    pub allocation_pools: Vec<AllocationPool>,
    /// DNS servers handed out by DHCP.
    #[serde(default)]
    #[schemars(length(max = 5), inner(regex(pattern = IP_PATTERN)))]
    pub dns_nameservers: Vec<String>,
    /// Serve DHCP on the subnet.
    #[serde(default = "crate::common::default_true", rename = "enableDHCP")]
    pub enable_dhcp: bool,
    /// Static routes handed out by DHCP.
    #[serde(default)]
    #[schemars(length(max = 20))]
    pub host_routes: Vec<Route>,
    /// Free-form description.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 255))]
    pub description: Option<String>,
}

/// An inclusive range of addresses.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AllocationPool {
    /// First address of the range.
    #[schemars(regex(pattern = IP_PATTERN))]
    pub start: String,
    /// Last address of the range (inclusive).
    #[schemars(regex(pattern = IP_PATTERN))]
    pub end: String,
}

/// A static route.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Route {
    /// Destination network in CIDR notation.
    #[schemars(regex(pattern = CIDR_PATTERN), extend("format" = "cidr"))]
    pub destination: String,
    /// Next-hop address.
    #[schemars(regex(pattern = IP_PATTERN))]
    pub nexthop: String,
}

/// Observed state of a Subnet.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SubnetStatus {
    /// Lifecycle phase.
    #[serde(default)]
    pub phase: NetworkPhase,
    /// The gateway address in effect (absent: no gateway).
    #[serde(default, rename = "gatewayIP", skip_serializing_if = "Option::is_none")]
    pub gateway_ip: Option<String>,
    /// The address of the subnet's DHCP server (Neutron's DHCP port), claimed for the Subnet
    /// at its create when it serves DHCP, so no Port ever takes it; every node's DHCP server
    /// for the subnet answers from it.
    #[serde(default, rename = "dhcpIP", skip_serializing_if = "Option::is_none")]
    pub dhcp_ip: Option<String>,
    /// Number of the subnet's addresses held: its gateway's and DHCP server's, and its Ports'
    /// and FloatingIPs' (kept by the subnets controller).
    #[serde(default, rename = "usedIPs", skip_serializing_if = "Option::is_none")]
    pub used_ips: Option<u64>,
    /// Number of addresses still free in the allocation pools (kept by the subnets
    /// controller).
    #[serde(
        default,
        rename = "availableIPs",
        skip_serializing_if = "Option::is_none"
    )]
    pub available_ips: Option<u64>,
    /// Latest observations of the subnet's state.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// The `metadata.generation` this status was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// A virtual NIC on a Network: a MAC address and fixed IPs, bound to a Server.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "network.stratus.dev",
    version = "v1",
    kind = "Port",
    namespaced,
    status = "PortStatus",
    derive = "PartialEq",
    category = "stratus",
    selectable = ".spec.network",
    selectable = ".status.hypervisor",
    selectable = ".status.boundTo",
    doc = "A port (Neutron port): a virtual NIC on a Network.",
    printcolumn(name = "Status", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Network", type_ = "string", json_path = ".spec.network"),
    printcolumn(name = "MAC", type_ = "string", json_path = ".status.macAddress"),
    printcolumn(
        name = "IPs",
        type_ = "string",
        json_path = ".status.fixedIPs[*].ipAddress"
    ),
    printcolumn(name = "Server", type_ = "string", json_path = ".status.boundTo"),
    printcolumn(
        name = "Node",
        type_ = "string",
        json_path = ".status.hypervisor",
        priority = 1
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PortSpec {
    /// Name of the Network.
    #[schemars(length(min = 1, max = 253), regex(pattern = NAME_PATTERN))]
    pub network: String,
    /// Addresses requested. Empty: one address allocated from each of the network's subnets
    /// of each IP version, as Neutron does.
    #[serde(default, rename = "fixedIPs")]
    #[schemars(length(max = 16))]
    pub fixed_ips: Vec<FixedIP>,
    /// MAC address to use. Absent: allocated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = MAC_PATTERN))]
    pub mac_address: Option<String>,
    /// Names of the SecurityGroups applied to the port. Absent: the group named `default`
    /// (none when port security is disabled); empty: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(max = 16),
        inner(length(min = 1, max = 253), regex(pattern = NAME_PATTERN))
    )]
    pub security_groups: Option<Vec<String>>,
    /// Whether security groups and anti-spoofing apply. Absent: the network's setting.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port_security_enabled: Option<bool>,
    /// Extra addresses the port may send from despite anti-spoofing (VRRP, VIPs).
    #[serde(default)]
    #[schemars(length(max = 10))]
    pub allowed_address_pairs: Vec<AddressPair>,
    /// Free-form description.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 255))]
    pub description: Option<String>,
}

/// A requested fixed address: a subnet, an address, or both.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FixedIP {
    /// Name of the Subnet to allocate from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253), regex(pattern = NAME_PATTERN))]
    pub subnet: Option<String>,
    /// The address. Absent: allocated from `subnet`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = IP_PATTERN))]
    pub ip_address: Option<String>,
}

/// An address (or network) a port may also send from.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AddressPair {
    /// An IP address or a CIDR.
    #[schemars(regex(pattern = r"^[0-9a-fA-F:.]+(/[0-9]{1,3})?$"))]
    pub ip_address: String,
    /// MAC address to allow with it. Absent: the port's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = MAC_PATTERN))]
    pub mac_address: Option<String>,
}

/// An allocated fixed address.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AllocatedIP {
    /// Name of the Subnet the address belongs to.
    pub subnet: String,
    /// The address.
    pub ip_address: String,
}

/// Lifecycle phase of a Port.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum PortPhase {
    /// Waiting for address allocation.
    #[default]
    Pending,
    /// Addresses allocated; not plugged into a running server.
    Down,
    /// Plugged in on its hypervisor and forwarding.
    Active,
    /// Allocation or plugging failed; see the conditions.
    Error,
    /// Being deleted.
    Deleting,
}

/// Observed state of a Port.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PortStatus {
    /// Lifecycle phase.
    #[serde(default)]
    pub phase: PortPhase,
    /// MAC address in use (the requested one, or the allocated one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac_address: Option<String>,
    /// Addresses allocated.
    #[serde(default, rename = "fixedIPs", skip_serializing_if = "Vec::is_empty")]
    pub fixed_ips: Vec<AllocatedIP>,
    /// Name of the Server (in this namespace) using the port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bound_to: Option<String>,
    /// Name of the Hypervisor the port is plugged in on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hypervisor: Option<String>,
    /// Name of the host interface (tap device) backing the port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface_name: Option<String>,
    /// Latest observations of the port's state.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// The `metadata.generation` this status was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// Routes between Subnets, and to an external Network with source NAT.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "network.stratus.dev",
    version = "v1",
    kind = "Router",
    namespaced,
    status = "RouterStatus",
    derive = "PartialEq",
    shortname = "rtr",
    category = "stratus",
    selectable = ".status.node",
    doc = "A router (Neutron router): routes between subnets and to an external network.",
    printcolumn(name = "Status", type_ = "string", json_path = ".status.phase"),
    printcolumn(
        name = "External Network",
        type_ = "string",
        json_path = ".spec.externalGateway.network"
    ),
    printcolumn(
        name = "External IP",
        type_ = "string",
        json_path = ".status.externalGatewayIPs[*]"
    ),
    printcolumn(
        name = "Node",
        type_ = "string",
        json_path = ".status.node",
        priority = 1
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RouterSpec {
    /// Uplink to an external Network.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external_gateway: Option<ExternalGateway>,
    /// Subnets the router is attached to; it takes each subnet's gateway address.
    #[serde(default)]
    #[schemars(length(max = 64))]
    pub interfaces: Vec<RouterInterface>,
    /// Extra static routes.
    #[serde(default)]
    #[schemars(length(max = 64))]
    pub routes: Vec<Route>,
    /// Free-form description.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 255))]
    pub description: Option<String>,
}

/// A Router's uplink.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ExternalGateway {
    /// The external Network (`external: true`): `NAME` in the router's namespace, or
    /// `NAMESPACE/NAME` (see [`NETWORK_REF_PATTERN`]).
    #[schemars(length(min = 1, max = 317), regex(pattern = NETWORK_REF_PATTERN))]
    pub network: String,
    /// Source-NAT traffic from the internal subnets to the gateway address.
    #[serde(default = "crate::common::default_true", rename = "enableSNAT")]
    pub enable_snat: bool,
}

/// A Router's attachment to a Subnet.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RouterInterface {
    /// Name of the Subnet.
    #[schemars(length(min = 1, max = 253), regex(pattern = NAME_PATTERN))]
    pub subnet: String,
}

/// An attached interface as realised.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RouterInterfaceStatus {
    /// Name of the Subnet.
    pub subnet: String,
    /// The router's address on it.
    pub ip_address: String,
    /// Name of the Port created for the interface.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<String>,
}

/// Observed state of a Router.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RouterStatus {
    /// Lifecycle phase.
    #[serde(default)]
    pub phase: NetworkPhase,
    /// Addresses of the router on the external network.
    #[serde(
        default,
        rename = "externalGatewayIPs",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub external_gateway_ips: Vec<String>,
    /// Attached interfaces.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub interfaces: Vec<RouterInterfaceStatus>,
    /// The Port on the external network that carries the router's gateway address, as
    /// `namespace/name` (the external network may belong to another project).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external_gateway_port: Option<String>,
    /// Node hosting the router's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Latest observations of the router's state.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// The `metadata.generation` this status was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// An address on an external Network, NATed to a Port's fixed address.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "network.stratus.dev",
    version = "v1",
    kind = "FloatingIP",
    namespaced,
    status = "FloatingIPStatus",
    derive = "PartialEq",
    shortname = "fip",
    category = "stratus",
    selectable = ".status.router",
    doc = "A floating IP (Neutron floating IP): a public address NATed to a Port.",
    printcolumn(name = "Status", type_ = "string", json_path = ".status.phase"),
    printcolumn(
        name = "Floating IP",
        type_ = "string",
        json_path = ".status.floatingIPAddress"
    ),
    printcolumn(name = "Port", type_ = "string", json_path = ".spec.port"),
    printcolumn(
        name = "Fixed IP",
        type_ = "string",
        json_path = ".status.fixedIP",
        priority = 1
    ),
    printcolumn(
        name = "Network",
        type_ = "string",
        json_path = ".spec.floatingNetwork",
        priority = 1
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FloatingIPSpec {
    /// The external Network the address is allocated from: `NAME` in the floating IP's
    /// namespace, or `NAMESPACE/NAME` (see [`NETWORK_REF_PATTERN`]).
    #[schemars(length(min = 1, max = 317), regex(pattern = NETWORK_REF_PATTERN))]
    pub floating_network: String,
    /// Name of the Port to NAT to. Absent: allocated but unassociated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253), regex(pattern = NAME_PATTERN))]
    pub port: Option<String>,
    /// Which of the port's fixed addresses to NAT to. Absent: its first IPv4 address.
    #[serde(default, rename = "fixedIP", skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = IP_PATTERN))]
    pub fixed_ip: Option<String>,
    /// Free-form description.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 255))]
    pub description: Option<String>,
}

/// Lifecycle phase of a FloatingIP.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum FloatingIPPhase {
    /// Waiting for an address.
    #[default]
    Pending,
    /// Allocated, not associated with a port (or its port is down).
    Down,
    /// NAT in place.
    Active,
    /// Allocation or NAT failed; see the conditions.
    Error,
}

/// Observed state of a FloatingIP.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FloatingIPStatus {
    /// Lifecycle phase.
    #[serde(default)]
    pub phase: FloatingIPPhase,
    /// The allocated external address.
    #[serde(
        default,
        rename = "floatingIPAddress",
        skip_serializing_if = "Option::is_none"
    )]
    pub floating_ip_address: Option<String>,
    /// The fixed address it is NATed to.
    #[serde(default, rename = "fixedIP", skip_serializing_if = "Option::is_none")]
    pub fixed_ip: Option<String>,
    /// Name of the Router doing the NAT.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub router: Option<String>,
    /// Latest observations of the floating IP's state.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// The `metadata.generation` this status was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// A set of firewall rules applied to Ports. Traffic no rule allows is dropped; unlike
/// Neutron, no allow-all egress rules are added implicitly: write them.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "network.stratus.dev",
    version = "v1",
    kind = "SecurityGroup",
    namespaced,
    status = "SecurityGroupStatus",
    derive = "PartialEq",
    shortname = "sg",
    category = "stratus",
    doc = "A security group (Neutron security group): stateful firewall rules for Ports.",
    printcolumn(name = "Status", type_ = "string", json_path = ".status.phase"),
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
pub struct SecurityGroupSpec {
    /// Rules; a packet is allowed if any rule matches it. Replies to allowed connections are
    /// always allowed (stateful).
    #[serde(default)]
    #[schemars(length(max = 256))]
    pub rules: Vec<SecurityGroupRule>,
    /// Free-form description.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 255))]
    pub description: Option<String>,
}

/// One rule of a SecurityGroup.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SecurityGroupRule {
    /// Traffic direction, seen from the port.
    pub direction: Direction,
    /// IP version matched.
    #[serde(default)]
    pub ethertype: EtherType,
    /// IP protocol matched.
    #[serde(default)]
    pub protocol: Protocol,
    /// For tcp/udp: first destination port matched. Absent: all ports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub port_range_min: Option<u16>,
    /// For tcp/udp: last destination port matched. Absent: `portRangeMin`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub port_range_max: Option<u16>,
    /// For icmp: ICMP type matched. Absent: all types.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub icmp_type: Option<u8>,
    /// For icmp with `icmpType`: ICMP code matched. Absent: all codes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub icmp_code: Option<u8>,
    /// Peer addresses matched (source for ingress, destination for egress). At most one of
    /// `remoteIPPrefix` and `remoteGroup`; neither: any address.
    #[serde(
        default,
        rename = "remoteIPPrefix",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(regex(pattern = CIDR_PATTERN), extend("format" = "cidr"))]
    pub remote_ip_prefix: Option<String>,
    /// Name of a SecurityGroup: matches the addresses of the ports in that group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253), regex(pattern = NAME_PATTERN))]
    pub remote_group: Option<String>,
    /// Free-form description.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 255))]
    pub description: Option<String>,
}

/// Direction of a security group rule.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// Traffic arriving at the port.
    Ingress,
    /// Traffic leaving the port.
    Egress,
}

/// IP version of a security group rule.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum EtherType {
    /// IPv4.
    #[default]
    IPv4,
    /// IPv6.
    IPv6,
}

/// IP protocol of a security group rule.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
    /// ICMP (ICMPv6 with `ethertype: IPv6`).
    Icmp,
    /// Any protocol.
    #[default]
    Any,
}

/// Observed state of a SecurityGroup.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SecurityGroupStatus {
    /// Lifecycle phase.
    #[serde(default)]
    pub phase: NetworkPhase,
    /// Latest observations of the group's state.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// The `metadata.generation` this status was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}
