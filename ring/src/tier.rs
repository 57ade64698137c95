//! The failure-domain tree: ring → regions → zones → hosts → devices.
//!
//! Swift names a tier by a tuple (`(region,)`, `(region, zone)`, `(region, zone, ip)`,
//! `(region, zone, ip, id)`); here each tier is a node index, so per-tier numbers are plain
//! vectors indexed by node.

use std::collections::HashMap;

use crate::device::Device;

/// The depth of a device tier (region 1, zone 2, host 3, device 4; the root is 0).
pub(crate) const DEVICE_DEPTH: usize = 4;

/// The last component of a tier's name; siblings sort by it as Swift's tuples do.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Key {
    Root,
    Region(u32),
    Zone(u32),
    Host(String),
    Device(u16),
}

#[derive(Debug)]
pub(crate) struct Node {
    pub depth: usize,
    key: Key,
    /// Child tiers holding at least one device with weight, sorted by name.
    pub children: Vec<usize>,
    /// Devices with weight in this tier.
    pub weighted_devices: usize,
}

#[derive(Debug)]
pub(crate) struct Topology {
    /// Node 0 is the root.
    pub nodes: Vec<Node>,
    /// For each device id present: its tiers from region (index 0) down to the device.
    pub dev_tiers: Vec<Option<[usize; DEVICE_DEPTH]>>,
}

pub(crate) const ROOT: usize = 0;

impl Topology {
    /// Builds the tree over every present device; only devices with weight are linked as
    /// children (Swift's `build_tier_tree` leaves zero-weight devices out), but every device
    /// has its tiers so that replicas on a draining device are still counted.
    pub fn new(devs: &[Option<Device>]) -> Self {
        let mut nodes = vec![Node {
            depth: 0,
            key: Key::Root,
            children: Vec::new(),
            weighted_devices: 0,
        }];
        let mut index: HashMap<(usize, Key), usize> = HashMap::new();
        let mut dev_tiers = vec![None; devs.len()];
        for (id, dev) in devs.iter().enumerate() {
            let Some(dev) = dev else { continue };
            let keys = [
                Key::Region(dev.region),
                Key::Zone(dev.zone),
                Key::Host(dev.ip.clone()),
                Key::Device(u16::try_from(id).unwrap_or(u16::MAX)),
            ];
            let weighted = dev.weight > 0.0;
            let mut tiers = [ROOT; DEVICE_DEPTH];
            let mut parent = ROOT;
            if weighted {
                nodes[ROOT].weighted_devices += 1;
            }
            for (depth, key) in keys.into_iter().enumerate() {
                let node = *index.entry((parent, key.clone())).or_insert_with(|| {
                    nodes.push(Node {
                        depth: depth + 1,
                        key,
                        children: Vec::new(),
                        weighted_devices: 0,
                    });
                    nodes.len() - 1
                });
                if weighted {
                    if nodes[node].weighted_devices == 0 {
                        nodes[parent].children.push(node);
                    }
                    nodes[node].weighted_devices += 1;
                }
                tiers[depth] = node;
                parent = node;
            }
            dev_tiers[id] = Some(tiers);
        }
        let keys: Vec<Key> = nodes.iter().map(|n| n.key.clone()).collect();
        for node in &mut nodes {
            node.children.sort_by(|a, b| keys[*a].cmp(&keys[*b]));
        }
        Topology { nodes, dev_tiers }
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn tiers(&self, dev: u16) -> &[usize; DEVICE_DEPTH] {
        const NONE: [usize; DEVICE_DEPTH] = [ROOT; DEVICE_DEPTH];
        self.dev_tiers
            .get(usize::from(dev))
            .and_then(Option::as_ref)
            .unwrap_or(&NONE)
    }

    /// The device id of a device tier.
    pub fn device_of(&self, node: usize) -> Option<u16> {
        match self.nodes[node].key {
            Key::Device(id) => Some(id),
            _ => None,
        }
    }
}
