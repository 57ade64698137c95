//! The replica plan: how many replicas of each partition every tier should hold ("replicanths",
//! fractions of a replica averaged over partitions), from weights, dispersion and overload.
//!
//! Swift reasons in three layers, and so does this module:
//! - *weighted*: each device's share by weight alone (capped at one replica per device);
//! - *wanted*: the most even spread over failure domains ("unique as possible"), which may
//!   ask a small tier to hold more than its weight;
//! - *target*: between the two, moved from weighted toward wanted by at most `overload`.

use crate::BuildError;
use crate::device::Device;
use crate::tier::{DEVICE_DEPTH, ROOT, Topology};

const EPSILON: f64 = 1e-10;
/// Bound on the spreading rounds of one tier; each round settles at least one child tier, so
/// real topologies need a handful.
const MAX_ROUNDS: usize = 10_000;

/// Per tier: the least and most whole replicas a partition may have there, and the target.
#[derive(Debug, Clone)]
pub(crate) struct ReplicaPlan {
    pub min: Vec<i64>,
    pub target: Vec<f64>,
    pub max: Vec<i64>,
}

impl ReplicaPlan {
    pub fn build(
        topo: &Topology,
        devs: &[Option<Device>],
        replicas: f64,
        overload: f64,
    ) -> Result<Self, BuildError> {
        let target = target_replicas(topo, devs, replicas, overload)?;
        Ok(ReplicaPlan {
            min: target
                .iter()
                .map(|t| (t + EPSILON).floor() as i64)
                .collect(),
            max: target.iter().map(|t| (t - EPSILON).ceil() as i64).collect(),
            target,
        })
    }
}

fn weighted_devs(devs: &[Option<Device>]) -> impl Iterator<Item = (u16, &Device)> {
    devs.iter().enumerate().filter_map(|(id, d)| {
        let d = d.as_ref()?;
        (d.weight > 0.0).then_some((u16::try_from(id).ok()?, d))
    })
}

/// Each tier's replicanths by weight alone: a device's share is its weight's fraction of all
/// replicas, at most 1 (a device holds a partition once); what the cap cuts off is handed to
/// the devices with room, in proportion to their share, until every replica is placed.
pub(crate) fn weighted_replicas(
    topo: &Topology,
    devs: &[Option<Device>],
    replicas: f64,
) -> Result<Vec<f64>, BuildError> {
    let total: f64 = devs.iter().flatten().map(|d| d.weight).sum();
    if total <= 0.0 {
        return Err(BuildError::Empty);
    }
    let mut share: Vec<(u16, f64)> = weighted_devs(devs)
        .map(|(id, d)| (id, (d.weight * replicas / total).min(1.0)))
        .collect();
    for _ in 0..MAX_ROUNDS {
        let remaining = replicas - share.iter().map(|(_, s)| s).sum::<f64>();
        if remaining < EPSILON {
            break;
        }
        let room: f64 = share.iter().filter(|(_, s)| *s < 1.0).map(|(_, s)| s).sum();
        if room <= 0.0 {
            return Err(BuildError::Plan(format!(
                "{replicas} replicas do not fit on the devices with weight"
            )));
        }
        let grow = remaining / room + 1.0;
        for (_, s) in share.iter_mut().filter(|(_, s)| *s < 1.0) {
            *s = (*s * grow).min(1.0);
        }
    }
    let mut by_tier = vec![0.0; topo.len()];
    for (id, s) in share {
        by_tier[ROOT] += s;
        for &t in topo.tiers(id) {
            by_tier[t] += s;
        }
    }
    Ok(by_tier)
}

/// The most replicas each tier may hold if the ring were spread perfectly evenly by failure
/// domain: a tier's count shared equally by its children (a device at most 1), rounded up
/// (`ceil`) or kept as a fraction.
pub(crate) fn max_replicas(topo: &Topology, replicas: f64, ceil: bool) -> Vec<f64> {
    let mut max = vec![0.0; topo.len()];
    max[ROOT] = replicas;
    let mut stack = vec![ROOT];
    while let Some(tier) = stack.pop() {
        let children = &topo.nodes[tier].children;
        for &child in children {
            let mut share = max[tier] / children.len() as f64;
            if ceil {
                share = share.ceil();
            }
            if topo.nodes[child].depth == DEVICE_DEPTH {
                share = share.min(1.0);
            }
            max[child] = share;
            stack.push(child);
        }
    }
    max
}

/// Each tier's replicanths for the most even spread over failure domains, following the
/// weights as far as that spread allows and never more replicas than a tier has devices.
fn wanted_replicas(
    topo: &Topology,
    replicas: f64,
    weighted: &[f64],
) -> Result<Vec<f64>, BuildError> {
    let dispersed = max_replicas(topo, replicas, false);
    let dispersed_min: Vec<f64> = dispersed.iter().map(|r| r.floor()).collect();
    let dispersed_max: Vec<f64> = dispersed.iter().map(|r| r.ceil()).collect();
    let devices: Vec<f64> = topo
        .nodes
        .iter()
        .map(|n| n.weighted_devices as f64)
        .collect();
    let mut wanted = vec![0.0; topo.len()];
    let mut stack = vec![(ROOT, replicas)];
    while let Some((tier, replicanths)) = stack.pop() {
        if replicanths > devices[tier] + EPSILON {
            return Err(BuildError::Plan(format!(
                "{replicanths} replicas wanted in a tier of {} devices",
                devices[tier]
            )));
        }
        wanted[tier] = replicanths;
        let children = &topo.nodes[tier].children;
        if children.is_empty() {
            continue;
        }
        let mut place = vec![0.0; children.len()];
        let mut spread: Vec<usize> = (0..children.len()).collect();
        let mut remaining = replicanths;
        let mut device_limited = false;
        let mut settled = false;
        for _ in 0..MAX_ROUNDS {
            let weight: f64 = spread.iter().map(|&i| weighted[children[i]]).sum();
            if weight <= 0.0 {
                break;
            }
            let rel = remaining / weight;
            for &i in &spread {
                let t = children[i];
                let mut r = place[i] + weighted[t] * rel;
                if r < dispersed_min[t] {
                    r = dispersed_min[t];
                } else if r > dispersed_max[t] && !device_limited {
                    r = dispersed_max[t];
                }
                if r > devices[t] {
                    r = devices[t];
                }
                place[i] = r;
            }
            remaining = replicanths - place.iter().sum::<f64>();
            if remaining < -EPSILON {
                spread = (0..children.len())
                    .filter(|&i| place[i] > dispersed_min[children[i]])
                    .collect();
            } else if remaining > EPSILON {
                spread = (0..children.len())
                    .filter(|&i| {
                        let t = children[i];
                        devices[t] > place[i] && place[i] < dispersed_max[t]
                    })
                    .collect();
                if spread.is_empty() {
                    device_limited = true;
                    spread = (0..children.len())
                        .filter(|&i| place[i] < devices[children[i]])
                        .collect();
                }
            } else {
                settled = true;
                break;
            }
        }
        if !settled {
            return Err(BuildError::Plan(format!(
                "could not spread {replicanths} replicas over the tier's children"
            )));
        }
        for (i, &child) in children.iter().enumerate() {
            stack.push((child, place[i]));
        }
    }
    Ok(wanted)
}

/// Target replicanths: `wanted` where weights allow it without overload; otherwise moved from
/// `weighted` toward `wanted` in proportion to `overload` over the overload full dispersion
/// would need.
fn target_replicas(
    topo: &Topology,
    devs: &[Option<Device>],
    replicas: f64,
    overload: f64,
) -> Result<Vec<f64>, BuildError> {
    let weighted = weighted_replicas(topo, devs, replicas)?;
    let wanted = wanted_replicas(topo, replicas, &weighted)?;
    let required = required_overload(topo, devs, &weighted, &wanted)?;
    if required <= 0.0 {
        return Ok(wanted);
    }
    let overload = overload.min(required);
    Ok(weighted
        .iter()
        .zip(&wanted)
        .map(|(w, x)| {
            if *w > 0.0 {
                (x - w) / required * overload + w
            } else {
                0.0
            }
        })
        .collect())
}

/// The overload full dispersion needs: the largest relative excess of a device's wanted
/// share over its weighted share.
fn required_overload(
    topo: &Topology,
    devs: &[Option<Device>],
    weighted: &[f64],
    wanted: &[f64],
) -> Result<f64, BuildError> {
    let mut max: f64 = 0.0;
    for (id, dev) in devs.iter().enumerate() {
        let (Some(dev), Ok(id)) = (dev, u16::try_from(id)) else {
            continue;
        };
        let tier = topo.tiers(id)[DEVICE_DEPTH - 1];
        if dev.weight <= 0.0 {
            if wanted[tier] > 0.0 {
                return Err(BuildError::Plan(format!(
                    "device {id} has no weight and is wanted for replicas"
                )));
            }
            continue;
        }
        max = max.max((wanted[tier] - weighted[tier]) / weighted[tier]);
    }
    Ok(max)
}

/// The overload full dispersion would need (`swift-ring-builder`'s "required overload").
pub(crate) fn required(
    topo: &Topology,
    devs: &[Option<Device>],
    replicas: f64,
) -> Result<f64, BuildError> {
    let weighted = weighted_replicas(topo, devs, replicas)?;
    let wanted = wanted_replicas(topo, replicas, &weighted)?;
    required_overload(topo, devs, &weighted, &wanted)
}
