//! The ring builder: its state (devices, the partition assignment, when each partition last
//! moved) and the rebalance that places partitions following Swift's rules.

use std::collections::BTreeMap;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::{Deserialize, Serialize};

use crate::BuildError;
use crate::device::{Device, validate_weight};
use crate::file::{RingData, RingDevice};
use crate::plan::{self, ReplicaPlan};
use crate::rng::Rng;
use crate::tier::{DEVICE_DEPTH, ROOT, Topology};

/// The device id that marks a replica slot with no device (as in Swift's `NONE_DEV`).
pub const NONE_DEV: u16 = u16::MAX;
/// Largest partition power built. Swift allows 32, but the assignment is held in memory and
/// in the API (2 bytes per replica per partition): 2^24 partitions is already 96 MiB at
/// three replicas.
pub const MAX_PART_POWER: u8 = 24;
/// Most replicas per partition.
pub const MAX_REPLICAS: f64 = 32.0;
/// Most device ids (ring format 1 stores ids as u16, and `NONE_DEV` is reserved).
pub const MAX_DEVICES: usize = NONE_DEV as usize;
/// Largest overload (a fraction: 0.1 is 10%).
pub const MAX_OVERLOAD: f64 = 100.0;
/// The balance reported for a device with no weight that still holds partitions.
pub const MAX_BALANCE: f64 = 999.99;
/// Rounds of gathering and placing in one rebalance.
const GATHER_ROUNDS: usize = 3;

/// What one rebalance did.
#[derive(Debug, Clone, PartialEq)]
pub struct Rebalanced {
    /// Replica slots whose device changed (what `swift-ring-builder` reports as
    /// "Reassigned N partitions").
    pub moved: usize,
    /// Balance afterwards (see [`RingBuilder::balance`]).
    pub balance: f64,
    /// Dispersion afterwards (see [`RingBuilder::dispersion`]).
    pub dispersion: f64,
    /// Devices removed from the ring by this rebalance.
    pub removed_devices: usize,
    /// Whether every device now has the partitions the plan gives it; false when
    /// `min_part_hours` (or the topology) held moves back, so another rebalance after the
    /// window can do more.
    pub finished: bool,
}

/// Swift's ring builder.
///
/// Devices are added, re-weighted and removed, then [`RingBuilder::rebalance`] assigns each
/// partition's replicas to devices: as far apart as the failure domains allow (regions, then
/// zones, then hosts, then devices), in proportion to weight (bent toward dispersion by at
/// most `overload`), moving as few replicas as it can, and no partition that moved less than
/// `min_part_hours` ago (a removed device's replicas excepted: they have nowhere to stay).
///
/// The state serialises (serde) compactly, so a controller can keep it between rebalances;
/// deserialising checks it as a whole ([`BuildError::State`]).
///
/// # Guarantees
/// - A rebalance that fails leaves the builder as it was.
/// - With the same state, time and seed, a rebalance gives the same assignment.
/// - No partition's replicas are placed twice on one device.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(into = "State", try_from = "State")]
pub struct RingBuilder {
    part_power: u8,
    replicas: f64,
    min_part_hours: u32,
    overload: f64,
    devs: Vec<Option<Device>>,
    removing: Vec<u16>,
    /// Replica → partition → device id; empty until the first rebalance.
    assignment: Vec<Vec<u16>>,
    /// Per partition: whole hours since it last moved, as of `last_moved_epoch`
    /// (saturating).
    last_moved: Vec<u16>,
    /// Unix time (seconds) `last_moved` counts from.
    last_moved_epoch: u64,
    gather_start: u64,
    version: u64,
    devices_changed: bool,
}

impl RingBuilder {
    /// A builder with no devices.
    ///
    /// # Errors
    /// [`BuildError::PartPower`], [`BuildError::Replicas`].
    pub fn new(part_power: u8, replicas: f64, min_part_hours: u32) -> Result<Self, BuildError> {
        validate_part_power(part_power)?;
        validate_replicas(replicas)?;
        Ok(RingBuilder {
            part_power,
            replicas,
            min_part_hours,
            overload: 0.0,
            devs: Vec::new(),
            removing: Vec::new(),
            assignment: Vec::new(),
            last_moved: vec![0; 1 << part_power],
            last_moved_epoch: 0,
            gather_start: 0,
            version: 0,
            devices_changed: false,
        })
    }

    /// A builder holding the assignment of a ring file (one `swift-ring-builder` made, say),
    /// every partition free to move.
    ///
    /// # Errors
    /// [`BuildError::State`] when the ring is not one this builder can hold.
    pub fn from_ring(ring: &RingData, min_part_hours: u32) -> Result<Self, BuildError> {
        let part_power = 32u8
            .checked_sub(ring.part_shift)
            .ok_or_else(|| state("part_shift above 32"))?;
        validate_part_power(part_power)?;
        let parts = 1usize << part_power;
        let replicas = match ring.replica2part2dev.split_last() {
            None => return Err(state("the ring has no replicas")),
            Some((last, rest)) => rest.len() as f64 + last.len() as f64 / parts as f64,
        };
        let devs = ring
            .devs
            .iter()
            .map(|d| {
                d.as_ref().map(|d| Device {
                    region: d.region,
                    zone: d.zone,
                    ip: d.ip.clone(),
                    port: d.port,
                    device: d.device.clone(),
                    weight: d.weight,
                    meta: d.meta.clone(),
                })
            })
            .collect();
        RingBuilder::try_from(State {
            part_power,
            replicas,
            min_part_hours,
            overload: 0.0,
            devs,
            removing: Vec::new(),
            assignment: Rows(ring.replica2part2dev.clone()),
            last_moved: Hours(vec![u16::MAX; parts]),
            last_moved_epoch: 0,
            gather_start: 0,
            version: ring.version.unwrap_or(0),
            devices_changed: false,
        })
    }

    /// Partitions in the ring (2^part_power).
    pub fn parts(&self) -> usize {
        1 << self.part_power
    }

    /// The partition power.
    pub fn part_power(&self) -> u8 {
        self.part_power
    }

    /// Replicas per partition (a fraction means some partitions have one replica fewer).
    pub fn replicas(&self) -> f64 {
        self.replicas
    }

    /// Hours a partition stays put after it moved.
    pub fn min_part_hours(&self) -> u32 {
        self.min_part_hours
    }

    /// How far (a fraction: 0.1 is 10%) a device may be given more than its weight to
    /// spread replicas over failure domains.
    pub fn overload(&self) -> f64 {
        self.overload
    }

    /// Increases with every change and every rebalance; written into the ring file.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// Whether devices changed since the last rebalance.
    pub fn devices_changed(&self) -> bool {
        self.devices_changed
    }

    /// The devices by id (ids of removed devices are skipped).
    pub fn devices(&self) -> impl Iterator<Item = (u16, &Device)> {
        self.devs
            .iter()
            .enumerate()
            .filter_map(|(id, d)| Some((u16::try_from(id).ok()?, d.as_ref()?)))
    }

    /// The device with this id.
    pub fn device(&self, id: u16) -> Option<&Device> {
        self.devs.get(usize::from(id)).and_then(Option::as_ref)
    }

    /// Whether the device is marked for removal at the next rebalance.
    pub fn is_removing(&self, id: u16) -> bool {
        self.removing.contains(&id)
    }

    /// Replica → partition → device id; empty before the first rebalance.
    pub fn assignment(&self) -> &[Vec<u16>] {
        &self.assignment
    }

    /// Adds a device under the lowest free id, returned. It gets partitions at the next
    /// rebalance.
    ///
    /// # Errors
    /// [`BuildError::InvalidDevice`], [`BuildError::DuplicateDevice`] when a device with the
    /// same ip, port and name is in the ring, [`BuildError::TooManyDevices`].
    pub fn add_device(&mut self, dev: Device) -> Result<u16, BuildError> {
        dev.validate()?;
        if let Some((id, _)) = self.devices().find(|(_, d)| d.same_disk(&dev)) {
            return Err(BuildError::DuplicateDevice {
                id,
                ip: dev.ip,
                port: dev.port,
                device: dev.device,
            });
        }
        let slot = match self.devs.iter().position(Option::is_none) {
            Some(hole) => hole,
            None if self.devs.len() < MAX_DEVICES => {
                self.devs.push(None);
                self.devs.len() - 1
            }
            None => return Err(BuildError::TooManyDevices),
        };
        self.devs[slot] = Some(dev);
        self.devices_changed = true;
        self.version += 1;
        u16::try_from(slot).map_err(|_| BuildError::TooManyDevices)
    }

    /// Sets a device's weight; 0 drains it.
    ///
    /// # Errors
    /// [`BuildError::NoSuchDevice`], [`BuildError::DeviceRemoving`],
    /// [`BuildError::InvalidDevice`] for a weight out of range.
    pub fn set_weight(&mut self, id: u16, weight: f64) -> Result<(), BuildError> {
        validate_weight(weight)?;
        let dev = self.live_device(id)?;
        dev.weight = weight;
        self.devices_changed = true;
        self.version += 1;
        Ok(())
    }

    /// Marks a device for removal: its weight becomes 0 and the next rebalance moves its
    /// replicas elsewhere, whatever `min_part_hours` says (a removed device is taken to have
    /// failed), and forgets it.
    ///
    /// # Errors
    /// [`BuildError::NoSuchDevice`], [`BuildError::DeviceRemoving`].
    pub fn remove_device(&mut self, id: u16) -> Result<(), BuildError> {
        let dev = self.live_device(id)?;
        dev.weight = 0.0;
        self.removing.push(id);
        self.devices_changed = true;
        self.version += 1;
        Ok(())
    }

    fn live_device(&mut self, id: u16) -> Result<&mut Device, BuildError> {
        if self.removing.contains(&id) {
            return Err(BuildError::DeviceRemoving(id));
        }
        self.devs
            .get_mut(usize::from(id))
            .and_then(Option::as_mut)
            .ok_or(BuildError::NoSuchDevice(id))
    }

    /// Changes the replica count; the next rebalance adds or drops replica slots.
    ///
    /// # Errors
    /// [`BuildError::Replicas`].
    pub fn set_replicas(&mut self, replicas: f64) -> Result<(), BuildError> {
        validate_replicas(replicas)?;
        let parts = self.parts() as f64;
        if (parts * self.replicas) as u64 != (parts * replicas) as u64 {
            self.devices_changed = true;
        }
        self.replicas = replicas;
        Ok(())
    }

    /// Sets the overload (a fraction: 0.1 is 10%).
    ///
    /// # Errors
    /// [`BuildError::Overload`].
    pub fn set_overload(&mut self, overload: f64) -> Result<(), BuildError> {
        if !(overload.is_finite() && (0.0..=MAX_OVERLOAD).contains(&overload)) {
            return Err(BuildError::Overload(overload));
        }
        self.overload = overload;
        Ok(())
    }

    /// Sets the hours a partition stays put after it moved.
    pub fn set_min_part_hours(&mut self, hours: u32) {
        self.min_part_hours = hours;
    }

    /// Takes every partition as having moved long ago, so the next rebalance may move any
    /// (`swift-ring-builder pretend_min_part_hours_passed`).
    pub fn pretend_min_part_hours_passed(&mut self) {
        self.last_moved_epoch = 0;
        self.last_moved.fill(u16::MAX);
    }

    /// Seconds from `now` (Unix time) until every partition may move again (those moved by
    /// the last rebalance are the last to be free).
    pub fn min_part_seconds_left(&self, now: u64) -> u64 {
        let youngest = self.last_moved.iter().copied().min().unwrap_or(u16::MAX);
        let hours = self.min_part_hours.saturating_sub(u32::from(youngest));
        (u64::from(hours) * 3600).saturating_sub(now.saturating_sub(self.last_moved_epoch))
    }

    /// Replicas each device should hold once the ring is balanced: the partitions Swift's
    /// replica plan gives it (weights bent toward dispersion within `overload`), by id.
    /// The least a rebalance can move is the sum over devices of what they hold above this.
    ///
    /// # Errors
    /// As [`RingBuilder::rebalance`] for a ring that cannot be built.
    pub fn planned_parts(&self) -> Result<Vec<(u16, usize)>, BuildError> {
        self.check_devices()?;
        let topo = Topology::new(&self.devs);
        let plan = ReplicaPlan::build(&topo, &self.devs, self.replicas, self.overload)?;
        let by_tier = self.parts_by_tier(&topo, &plan)?;
        Ok(self
            .devices()
            .map(|(id, d)| {
                let n = if d.weight > 0.0 {
                    by_tier[topo.tiers(id)[DEVICE_DEPTH - 1]]
                } else {
                    0
                };
                (id, usize::try_from(n).unwrap_or(0))
            })
            .collect())
    }

    /// The overload that full dispersion needs with these weights
    /// (`swift-ring-builder`'s "required overload").
    ///
    /// # Errors
    /// As [`RingBuilder::rebalance`] for a ring that cannot be built.
    pub fn required_overload(&self) -> Result<f64, BuildError> {
        self.check_devices()?;
        let topo = Topology::new(&self.devs);
        plan::required(&topo, &self.devs, self.replicas)
    }

    /// Replicas held per device id (index = id).
    fn parts_per_device(&self) -> Vec<i64> {
        let mut parts = vec![0i64; self.devs.len()];
        for &dev in self.assignment.iter().flatten() {
            if let Some(n) = parts.get_mut(usize::from(dev)) {
                *n += 1;
            }
        }
        parts
    }

    /// How far the worst device is from the partitions its weight asks for, in percent of
    /// what it asks for (0 is perfect), as `swift-ring-builder` reports it: weight alone is
    /// the yardstick, not the replica plan; a device with no weight that still holds
    /// partitions counts as [`MAX_BALANCE`].
    pub fn balance(&self) -> f64 {
        let parts = self.parts_per_device();
        let total: f64 = self.devices().map(|(_, d)| d.weight).sum();
        let mut worst: f64 = 0.0;
        for (id, dev) in self.devices() {
            let held = parts[usize::from(id)] as f64;
            let b = if dev.weight <= 0.0 {
                if held > 0.0 { MAX_BALANCE } else { 0.0 }
            } else {
                let wanted = dev.weight * self.parts() as f64 * self.replicas / total;
                100.0 * held / wanted - 100.0
            };
            worst = worst.max(b.abs());
        }
        worst
    }

    /// The share of replicas (percent) placed on a tier that already holds as many of the
    /// partition's replicas as an even spread allows, counting each replica once at its
    /// worst tier, as `swift-ring-builder` reports it. 0 means every partition is as spread
    /// out as the failure domains allow.
    pub fn dispersion(&self) -> f64 {
        if self.assignment.is_empty() || self.devs.iter().all(Option::is_none) {
            return 0.0;
        }
        let topo = Topology::new(&self.devs);
        let at_risk = self.dispersion_with(&topo, None).1;
        100.0 * at_risk / (self.parts() as f64 * self.replicas)
    }

    /// Counts, over every partition, the replicas beyond the most a tier may hold, and the
    /// replica slots that differ from `old`.
    fn dispersion_with(&self, topo: &Topology, old: Option<&[Vec<u16>]>) -> (usize, f64) {
        let allowed = plan::max_replicas(topo, self.replicas, true);
        let mut counts = Counter::new(topo.len());
        let mut changed = 0;
        let mut at_risk = 0.0;
        for part in 0..self.parts() {
            for (replica, row) in self.assignment.iter().enumerate() {
                let Some(&dev) = row.get(part) else { continue };
                if let Some(old) = old
                    && old.get(replica).and_then(|r| r.get(part)) != Some(&dev)
                {
                    changed += 1;
                }
                if dev != NONE_DEV && self.device(dev).is_some() {
                    counts.add_dev(topo, dev, 1);
                }
            }
            let mut risk = [0.0f64; DEVICE_DEPTH + 1];
            for tier in counts.drain() {
                if tier.1 as f64 > allowed[tier.0] {
                    risk[topo.nodes[tier.0].depth] += tier.1 as f64 - allowed[tier.0];
                }
            }
            at_risk += risk.iter().copied().fold(0.0, f64::max);
        }
        (changed, at_risk)
    }

    /// The ring file's contents; `None` before the first rebalance.
    pub fn ring(&self) -> Option<RingData> {
        if self.assignment.is_empty() {
            return None;
        }
        Some(RingData {
            devs: self
                .devs
                .iter()
                .enumerate()
                .map(|(id, d)| {
                    let d = d.as_ref()?;
                    Some(RingDevice {
                        device: d.device.clone(),
                        id: u16::try_from(id).ok()?,
                        ip: d.ip.clone(),
                        meta: d.meta.clone(),
                        port: d.port,
                        region: d.region,
                        replication_ip: d.ip.clone(),
                        replication_port: d.port,
                        weight: d.weight,
                        zone: d.zone,
                    })
                })
                .collect(),
            part_shift: 32 - self.part_power,
            replica2part2dev: self.assignment.clone(),
            version: Some(self.version),
        })
    }

    fn check_devices(&self) -> Result<(), BuildError> {
        let weighted = self.devices().filter(|(_, d)| d.weight > 0.0).count();
        if (weighted as f64) < self.replicas {
            return Err(BuildError::NotEnoughDevices {
                replicas: self.replicas,
                devices: weighted,
            });
        }
        Ok(())
    }

    /// Places every replica slot that needs a device and moves replicas toward the plan, at
    /// `now` (Unix time, seconds; it decides which partitions `min_part_hours` holds), with
    /// `seed` for the random choices (start of the scan, order of placement, ties).
    ///
    /// # Errors
    /// [`BuildError::NotEnoughDevices`] when fewer devices have weight than there are
    /// replicas, [`BuildError::Empty`], [`BuildError::Plan`] for a topology the plan cannot
    /// spread. The builder is unchanged then.
    pub fn rebalance(&mut self, now: u64, seed: u64) -> Result<Rebalanced, BuildError> {
        let mut next = self.clone();
        let done = next.rebalance_in_place(now, seed)?;
        *self = next;
        Ok(done)
    }

    fn rebalance_in_place(&mut self, now: u64, seed: u64) -> Result<Rebalanced, BuildError> {
        self.check_devices()?;
        let old = self.assignment.clone();
        self.age_last_moved(now);
        let mut rng = Rng::new(seed);
        let topo = Topology::new(&self.devs);
        let plan = ReplicaPlan::build(&topo, &self.devs, self.replicas, self.overload)?;
        let mut work = Work {
            parts: self.parts_per_device(),
            wanted: vec![0; self.devs.len()],
            moved: vec![false; self.parts()],
            placed_any: false,
            counts: Counter::new(topo.len()),
        };
        // Rows are fitted to the replica count before each device's want is set (Swift sets
        // it first, so dropping a replica leaves every device looking overweight by the
        // slots it lost, and replicas move for nothing).
        let mut gathered = Gathered::new();
        self.fit_rows(&mut work, &mut gathered);
        self.set_parts_wanted(&topo, &plan, &mut work)?;
        let removed_devices = self.gather_from_removed(&mut work, &mut gathered);
        self.gather_for_dispersion(&topo, &plan, &mut work, &mut gathered);
        // Replicas that must move (new slots, removed devices, undispersed) are placed first,
        // then direct moves from devices above their share to devices below it, each a
        // single replica moved; Swift's gather-and-place rounds settle what is left.
        if !gathered.is_empty() {
            let mut list: Vec<(usize, Vec<usize>)> =
                std::mem::take(&mut gathered).into_iter().collect();
            rng.shuffle(&mut list);
            self.reassign(&topo, &plan, &mut work, list, &mut rng)?;
        }
        self.move_directly(&topo, &plan, &mut work, &mut rng);
        for round in 0..GATHER_ROUNDS {
            self.gather_for_balance(&topo, &plan, &mut work, &mut gathered, round == 0, &mut rng);
            if gathered.is_empty() {
                break;
            }
            let mut list: Vec<(usize, Vec<usize>)> =
                std::mem::take(&mut gathered).into_iter().collect();
            rng.shuffle(&mut list);
            self.reassign(&topo, &plan, &mut work, list, &mut rng)?;
            if self
                .devices()
                .all(|(id, _)| work.wanted[usize::from(id)] >= 0)
            {
                break;
            }
        }
        let finished = self.devices().all(|(id, d)| {
            let i = usize::from(id);
            if d.weight > 0.0 {
                work.wanted[i] >= 0
            } else {
                work.parts[i] == 0
            }
        });
        if work.placed_any || work.moved.iter().any(|m| *m) {
            // Moves are stamped as of now; the hours since the last epoch that were not
            // whole are given up by the others (they may wait a little longer, never less).
            self.last_moved_epoch = now;
        }
        self.devices_changed = false;
        let (moved, at_risk) = self.dispersion_with(&topo, Some(&old));
        self.version += 1;
        Ok(Rebalanced {
            moved,
            balance: self.balance(),
            dispersion: 100.0 * at_risk / (self.parts() as f64 * self.replicas),
            removed_devices,
            finished,
        })
    }

    /// Adds the whole hours since the epoch to every partition's age.
    fn age_last_moved(&mut self, now: u64) {
        let hours = now.saturating_sub(self.last_moved_epoch) / 3600;
        if hours == 0 {
            return;
        }
        let add = u16::try_from(hours).unwrap_or(u16::MAX);
        for age in &mut self.last_moved {
            *age = age.saturating_add(add);
        }
        self.last_moved_epoch = self.last_moved_epoch.saturating_add(hours * 3600);
    }

    fn can_move(&self, work: &Work, part: usize) -> bool {
        u32::from(self.last_moved[part]) >= self.min_part_hours && !work.moved[part]
    }

    fn mark_moved(&mut self, work: &mut Work, part: usize) {
        self.last_moved[part] = 0;
        work.moved[part] = true;
    }

    /// Takes a replica off its device, to be placed again.
    fn lift(
        &mut self,
        work: &mut Work,
        gathered: &mut Gathered,
        part: usize,
        replica: usize,
        dev: u16,
    ) {
        work.wanted[usize::from(dev)] += 1;
        work.parts[usize::from(dev)] -= 1;
        gathered.entry(part).or_default().push(replica);
        self.assignment[replica][part] = NONE_DEV;
        self.mark_moved(work, part);
    }

    /// Replicas each tier should hold in all (Swift's `_set_parts_wanted`): the ring's
    /// replica slots handed down the tree by target, what rounding leaves handed out one by
    /// one, smallest target first.
    fn parts_by_tier(&self, topo: &Topology, plan: &ReplicaPlan) -> Result<Vec<i64>, BuildError> {
        let parts = self.parts() as f64;
        let total = (self.replicas * parts) as i64;
        let mut by_tier = vec![0i64; topo.len()];
        let mut stack = vec![(ROOT, total)];
        while let Some((tier, mut left)) = stack.pop() {
            by_tier[tier] = left;
            let children = &topo.nodes[tier].children;
            if children.is_empty() {
                continue;
            }
            let mut place: Vec<i64> = Vec::with_capacity(children.len());
            for &c in children {
                let n = left.min((plan.target[c] * parts).floor() as i64);
                place.push(n);
                left -= n;
            }
            let mut order: Vec<usize> = (0..children.len()).collect();
            order.sort_by(|a, b| plan.target[children[*a]].total_cmp(&plan.target[children[*b]]));
            for i in order
                .iter()
                .cycle()
                .take(usize::try_from(left.max(0)).unwrap_or(0))
            {
                place[*i] += 1;
            }
            stack.extend(children.iter().copied().zip(place));
        }
        for depth in 1..=DEVICE_DEPTH {
            let sum: i64 = topo
                .nodes
                .iter()
                .enumerate()
                .filter(|(_, n)| n.depth == depth)
                .map(|(i, _)| by_tier[i])
                .sum();
            if sum != total {
                return Err(BuildError::Plan(format!(
                    "{sum} replicas planned at depth {depth}, not {total}"
                )));
            }
        }
        Ok(by_tier)
    }

    fn set_parts_wanted(
        &self,
        topo: &Topology,
        plan: &ReplicaPlan,
        work: &mut Work,
    ) -> Result<(), BuildError> {
        let by_tier = self.parts_by_tier(topo, plan)?;
        let drain = -((self.parts() as f64 * self.replicas) as i64);
        for (id, dev) in self.devices() {
            let i = usize::from(id);
            work.wanted[i] = if dev.weight <= 0.0 {
                drain
            } else {
                by_tier[topo.tiers(id)[DEVICE_DEPTH - 1]] - work.parts[i]
            };
        }
        Ok(())
    }

    /// Makes the rows match the replica count: whole replicas have a row of every
    /// partition, a fraction a shorter last row; new slots are gathered for placing.
    fn fit_rows(&mut self, work: &mut Work, gathered: &mut Gathered) {
        let parts = self.parts();
        let mut lengths = vec![parts; self.replicas.trunc() as usize];
        if self.replicas.fract() > 0.0 {
            lengths.push((parts as f64 * self.replicas.fract()) as usize);
        }
        for row in self
            .assignment
            .drain(lengths.len().min(self.assignment.len())..)
        {
            for dev in row {
                if let Some(n) = work.parts.get_mut(usize::from(dev)) {
                    *n -= 1;
                }
            }
        }
        for (replica, &len) in lengths.iter().enumerate() {
            match self.assignment.get_mut(replica) {
                Some(row) if row.len() < len => {
                    for part in row.len()..len {
                        gathered.entry(part).or_default().push(replica);
                    }
                    row.resize(len, NONE_DEV);
                }
                Some(row) => {
                    for dev in row.drain(len..) {
                        if let Some(n) = work.parts.get_mut(usize::from(dev)) {
                            *n -= 1;
                        }
                    }
                }
                None => {
                    for part in 0..len {
                        gathered.entry(part).or_default().push(replica);
                    }
                    self.assignment.push(vec![NONE_DEV; len]);
                }
            }
        }
    }

    /// Gathers every replica on a device being removed (whatever `min_part_hours` says),
    /// then forgets those devices.
    fn gather_from_removed(&mut self, work: &mut Work, gathered: &mut Gathered) -> usize {
        let removing: Vec<u16> = self
            .removing
            .iter()
            .copied()
            .filter(|id| work.parts.get(usize::from(*id)).is_some_and(|n| *n > 0))
            .collect();
        if !removing.is_empty() {
            for replica in 0..self.assignment.len() {
                for part in 0..self.assignment[replica].len() {
                    if removing.contains(&self.assignment[replica][part]) {
                        self.assignment[replica][part] = NONE_DEV;
                        self.mark_moved(work, part);
                        gathered.entry(part).or_default().push(replica);
                    }
                }
            }
        }
        let removed = self.removing.len();
        for id in std::mem::take(&mut self.removing) {
            if let Some(slot) = self.devs.get_mut(usize::from(id)) {
                *slot = None;
            }
        }
        removed
    }

    /// The devices of a partition's placed replicas, as (replica, device).
    fn placed(&self, part: usize) -> Vec<(usize, u16)> {
        self.assignment
            .iter()
            .enumerate()
            .filter_map(|(replica, row)| {
                let dev = *row.get(part)?;
                (dev != NONE_DEV).then_some((replica, dev))
            })
            .collect()
    }

    /// Gathers replicas sitting on a tier that holds more of their partition than the plan
    /// allows, neediest-to-shed device first.
    fn gather_for_dispersion(
        &mut self,
        topo: &Topology,
        plan: &ReplicaPlan,
        work: &mut Work,
        gathered: &mut Gathered,
    ) {
        for part in 0..self.parts() {
            if !self.can_move(work, part) {
                continue;
            }
            let placed = self.placed(part);
            for &(_, dev) in &placed {
                work.counts.add_dev(topo, dev, 1);
            }
            let mut undispersed: Vec<(usize, u16)> = placed
                .into_iter()
                .filter(|&(_, dev)| {
                    topo.tiers(dev)
                        .iter()
                        .any(|&t| work.counts.get(t) > plan.max[t])
                })
                .collect();
            undispersed.sort_by_key(|&(_, dev)| work.wanted[usize::from(dev)]);
            for (replica, dev) in undispersed {
                // Only a replica sharing its device with another may move twice (a ring
                // built by old code); otherwise one replica per partition per rebalance.
                if !self.can_move(work, part)
                    && work.counts.get(topo.tiers(dev)[DEVICE_DEPTH - 1]) <= 1
                {
                    continue;
                }
                self.lift(work, gathered, part, replica, dev);
                work.counts.add_dev(topo, dev, -1);
            }
            work.counts.clear();
        }
    }

    /// Gathers replicas from devices holding more than they want, scanning from a random
    /// point: first only those that can go to a tier with room and leave their partition
    /// dispersed (`disperse`), then any.
    fn gather_for_balance(
        &mut self,
        topo: &Topology,
        plan: &ReplicaPlan,
        work: &mut Work,
        gathered: &mut Gathered,
        disperse: bool,
        rng: &mut Rng,
    ) {
        let parts = self.parts() as u64;
        let start = (self.gather_start + parts / 4 + rng.below(parts / 2 + 1)) % parts;
        self.gather_start = start;
        if disperse {
            self.gather_dispersible(topo, plan, work, gathered, start);
        }
        self.gather_forced(work, gathered, start);
    }

    fn gather_dispersible(
        &mut self,
        topo: &Topology,
        plan: &ReplicaPlan,
        work: &mut Work,
        gathered: &mut Gathered,
        start: u64,
    ) {
        let mut wanted_in_tier = vec![0i64; topo.len()];
        for (id, _) in self.devices() {
            let w = work.wanted[usize::from(id)].max(0);
            for &t in topo.tiers(id) {
                wanted_in_tier[t] += w;
            }
        }
        let parts = self.parts();
        for offset in 0..parts {
            let part = (usize::try_from(start).unwrap_or(0) + offset) % parts;
            if !self.can_move(work, part) {
                continue;
            }
            let placed = self.placed(part);
            let mut over: Vec<(usize, u16)> = Vec::new();
            for &(replica, dev) in &placed {
                work.counts.add_dev(topo, dev, 1);
                if work.wanted[usize::from(dev)] < 0 {
                    over.push((replica, dev));
                }
            }
            over.sort_by_key(|&(_, dev)| work.wanted[usize::from(dev)]);
            for (replica, dev) in over {
                let tiers = *topo.tiers(dev);
                if tiers.iter().any(|&t| {
                    let n = work.counts.get(t);
                    plan.min[t] <= n && n < plan.max[t]
                }) {
                    continue; // the plan wants this replica where it is
                }
                // The widest tier the replica can leave without breaking the plan's minimum.
                let mut stuck = tiers[0];
                for &t in tiers.iter().rev() {
                    stuck = t;
                    if work.counts.get(t) - 1 < plan.min[t] {
                        break;
                    }
                }
                // Swift asks only whether some other child of that tier wants replicas; a
                // wanting device that already holds this partition (or sits under a tier
                // full of it) cannot take it, and the replica would be placed back on an
                // overweight device, moved for nothing. So look for a device that can.
                let room = topo.nodes[stuck]
                    .children
                    .iter()
                    .filter(|c| !tiers.contains(c))
                    .any(|&c| can_take(topo, plan, &work.counts, &wanted_in_tier, c));
                if !room {
                    continue; // nowhere in that tier wants it
                }
                self.lift(work, gathered, part, replica, dev);
                work.counts.add_dev(topo, dev, -1);
                for &t in &tiers {
                    wanted_in_tier[t] -= 1;
                }
                break;
            }
            work.counts.clear();
        }
    }

    /// Moves single replicas from devices holding more than the plan gives them straight to
    /// devices holding less, where the partition may go (no tier above its maximum, none
    /// left below its minimum): one replica slot changed per replica of imbalance, the
    /// least a rebalance can move. Swift's gathering lifts replicas first and places them
    /// wherever there is room, so a replica may land on a device no better than the one it
    /// left and need moving again.
    fn move_directly(
        &mut self,
        topo: &Topology,
        plan: &ReplicaPlan,
        work: &mut Work,
        rng: &mut Rng,
    ) {
        let parts = self.parts();
        let start = rng.below(parts as u64) as usize;
        let mut under: Vec<u16> = self
            .devices()
            .filter(|(id, d)| d.weight > 0.0 && work.wanted[usize::from(*id)] > 0)
            .map(|(id, _)| id)
            .collect();
        let holds_too_much = |work: &Work, id: u16| {
            work.wanted[usize::from(id)] < 0 && work.parts[usize::from(id)] > 0
        };
        if !self.devices().any(|(id, _)| holds_too_much(work, id)) {
            return;
        }
        for offset in 0..parts {
            if under.is_empty() {
                return;
            }
            let part = (start + offset) % parts;
            if !self.can_move(work, part) {
                continue;
            }
            let placed = self.placed(part);
            for &(_, dev) in &placed {
                work.counts.add_dev(topo, dev, 1);
            }
            let mut over: Vec<(usize, u16)> = placed
                .into_iter()
                .filter(|&(_, dev)| work.wanted[usize::from(dev)] < 0)
                .collect();
            over.sort_by_key(|&(_, dev)| work.wanted[usize::from(dev)]);
            rng.shuffle(&mut under);
            let mut chosen = None;
            'over: for &(replica, from) in &over {
                let from_tiers = topo.tiers(from);
                let mut best: Option<u16> = None;
                for &to in &under {
                    let to_tiers = topo.tiers(to);
                    let fits = to_tiers
                        .iter()
                        .filter(|t| !from_tiers.contains(t))
                        .all(|&t| work.counts.get(t) < plan.max[t])
                        && from_tiers
                            .iter()
                            .filter(|t| !to_tiers.contains(t))
                            .all(|&t| work.counts.get(t) > plan.min[t]);
                    if fits
                        && best.is_none_or(|b| {
                            work.wanted[usize::from(to)] > work.wanted[usize::from(b)]
                        })
                    {
                        best = Some(to);
                    }
                }
                if let Some(to) = best {
                    chosen = Some((replica, from, to));
                    break 'over;
                }
            }
            work.counts.clear();
            if let Some((replica, from, to)) = chosen {
                work.wanted[usize::from(from)] += 1;
                work.parts[usize::from(from)] -= 1;
                work.wanted[usize::from(to)] -= 1;
                work.parts[usize::from(to)] += 1;
                if work.wanted[usize::from(to)] == 0 {
                    under.retain(|d| *d != to);
                }
                self.assignment[replica][part] = to;
                self.mark_moved(work, part);
                work.placed_any = true;
            }
        }
    }

    fn gather_forced(&mut self, work: &mut Work, gathered: &mut Gathered, start: u64) {
        let parts = self.parts();
        for offset in 0..parts {
            let part = (usize::try_from(start).unwrap_or(0) + offset) % parts;
            if !self.can_move(work, part) {
                continue;
            }
            let most = self
                .placed(part)
                .into_iter()
                .filter(|&(_, dev)| work.wanted[usize::from(dev)] < 0)
                .min_by_key(|&(_, dev)| work.wanted[usize::from(dev)]);
            if let Some((replica, dev)) = most {
                self.lift(work, gathered, part, replica, dev);
            }
        }
    }

    /// Places gathered replicas: from the root down, into the child tier with the most room
    /// among those below the plan's maximum for the partition, ending on a device.
    fn reassign(
        &mut self,
        topo: &Topology,
        plan: &ReplicaPlan,
        work: &mut Work,
        list: Vec<(usize, Vec<usize>)>,
        rng: &mut Rng,
    ) -> Result<(), BuildError> {
        let mut available = vec![0i64; topo.len()];
        let mut keys: Vec<(i64, u64, u16)> = Vec::new();
        for (id, dev) in self.devices() {
            let w = work.wanted[usize::from(id)];
            for &t in topo.tiers(id) {
                available[t] += w.max(0);
            }
            if dev.weight > 0.0 {
                keys.push((w, rng.below(0x1_0000), id));
            }
        }
        keys.sort();
        // A tier sorts by its neediest device's key, so ties between tiers with equal room
        // go the way Swift's do.
        let mut tier_key = vec![(i64::MIN, 0u64, 0u16); topo.len()];
        for key in &keys {
            for &t in topo.tiers(key.2) {
                tier_key[t] = *key;
            }
        }
        let children: Vec<Vec<usize>> = topo
            .nodes
            .iter()
            .map(|n| {
                let mut c = n.children.clone();
                c.sort_by_key(|t| tier_key[*t]);
                c
            })
            .collect();

        for (part, replicas) in list {
            self.last_moved[part] = 0;
            work.placed_any = true;
            for (_, dev) in self.placed(part) {
                work.counts.add_dev(topo, dev, 1);
            }
            for replica in replicas {
                let mut tier = ROOT;
                for _ in 0..DEVICE_DEPTH {
                    // The roomiest tier; among equally roomy ones a random one (Swift takes
                    // the first, which pairs devices the same way partition after partition:
                    // a device's partitions then share their other replicas' devices, and
                    // removing it moves far more than its own replicas).
                    // Tiers where a device that wants replicas can take this one come
                    // first: Swift may descend into a roomy zone whose only eligible
                    // device is already full, and the replica has to move again later.
                    let wanting = children[tier]
                        .iter()
                        .any(|&c| can_take(topo, plan, &work.counts, &available, c));
                    let mut best: Option<usize> = None;
                    let mut ties = 0;
                    for &c in &children[tier] {
                        if work.counts.get(c) >= plan.max[c]
                            || (wanting && !can_take(topo, plan, &work.counts, &available, c))
                        {
                            continue;
                        }
                        match best {
                            Some(b) if available[c] < available[b] => {}
                            Some(b) if available[c] == available[b] => {
                                ties += 1;
                                if rng.below(ties + 1) == 0 {
                                    best = Some(c);
                                }
                            }
                            _ => {
                                best = Some(c);
                                ties = 0;
                            }
                        }
                    }
                    tier = best.ok_or_else(|| {
                        BuildError::Plan(format!(
                            "no device can take replica {replica} of partition {part}"
                        ))
                    })?;
                }
                let dev = topo
                    .device_of(tier)
                    .ok_or_else(|| BuildError::Plan("the tier tree is not four deep".into()))?;
                work.wanted[usize::from(dev)] -= 1;
                work.parts[usize::from(dev)] += 1;
                for &t in topo.tiers(dev) {
                    available[t] -= 1;
                }
                work.counts.add_dev(topo, dev, 1);
                self.assignment[replica][part] = dev;
            }
            work.counts.clear();
        }
        Ok(())
    }
}

type Gathered = BTreeMap<usize, Vec<usize>>;

/// Whether a device under `tier` wants replicas and may take one more of the partition
/// counted in `counts` (no tier on the way holds the plan's maximum of it).
fn can_take(
    topo: &Topology,
    plan: &ReplicaPlan,
    counts: &Counter,
    wanted_in_tier: &[i64],
    tier: usize,
) -> bool {
    if wanted_in_tier[tier] <= 0 || counts.get(tier) >= plan.max[tier] {
        return false;
    }
    let node = &topo.nodes[tier];
    node.depth == DEVICE_DEPTH
        || node
            .children
            .iter()
            .any(|&c| can_take(topo, plan, counts, wanted_in_tier, c))
}

/// What one rebalance tracks beside the builder's state.
struct Work {
    /// Replicas held, per device id.
    parts: Vec<i64>,
    /// Replicas wanted beyond those held (negative: to shed), per device id.
    wanted: Vec<i64>,
    /// Partitions moved in this rebalance (each moves at most once).
    moved: Vec<bool>,
    /// Whether any replica was placed (new slots are placed without being gathered).
    placed_any: bool,
    counts: Counter,
}

/// Replicas of one partition per tier, cleared between partitions by the tiers touched.
struct Counter {
    counts: Vec<i64>,
    touched: Vec<usize>,
}

impl Counter {
    fn new(tiers: usize) -> Self {
        Counter {
            counts: vec![0; tiers],
            touched: Vec::new(),
        }
    }

    fn add_dev(&mut self, topo: &Topology, dev: u16, n: i64) {
        for &t in topo.tiers(dev) {
            self.counts[t] += n;
            self.touched.push(t);
        }
    }

    fn get(&self, tier: usize) -> i64 {
        self.counts[tier]
    }

    /// Each touched tier once with its count, and clears them.
    fn drain(&mut self) -> Vec<(usize, i64)> {
        let mut out = Vec::new();
        for t in std::mem::take(&mut self.touched) {
            if self.counts[t] != 0 {
                out.push((t, self.counts[t]));
                self.counts[t] = 0;
            }
        }
        out
    }

    fn clear(&mut self) {
        for t in self.touched.drain(..) {
            self.counts[t] = 0;
        }
    }
}

fn validate_part_power(part_power: u8) -> Result<(), BuildError> {
    if part_power > MAX_PART_POWER {
        return Err(BuildError::PartPower(part_power));
    }
    Ok(())
}

fn validate_replicas(replicas: f64) -> Result<(), BuildError> {
    if replicas.is_finite() && (1.0..=MAX_REPLICAS).contains(&replicas) {
        Ok(())
    } else {
        Err(BuildError::Replicas(replicas))
    }
}

fn state(reason: &str) -> BuildError {
    BuildError::State(reason.to_owned())
}

/// The serialised form of a [`RingBuilder`]: the assignment and the partitions' ages as
/// base64 of little-endian u16s (a few bytes per partition rather than a JSON number each).
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct State {
    part_power: u8,
    replicas: f64,
    min_part_hours: u32,
    overload: f64,
    devs: Vec<Option<Device>>,
    #[serde(default)]
    removing: Vec<u16>,
    assignment: Rows,
    last_moved: Hours,
    last_moved_epoch: u64,
    gather_start: u64,
    version: u64,
    devices_changed: bool,
}

struct Rows(Vec<Vec<u16>>);
struct Hours(Vec<u16>);

fn encode(values: &[u16]) -> String {
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    BASE64.encode(bytes)
}

fn decode<E: serde::de::Error>(text: &str) -> Result<Vec<u16>, E> {
    let bytes = BASE64.decode(text).map_err(E::custom)?;
    if bytes.len() % 2 != 0 {
        return Err(E::custom("odd number of bytes in a u16 array"));
    }
    Ok(bytes
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .collect())
}

impl Serialize for Rows {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.0.iter().map(|row| encode(row)))
    }
}

impl<'de> Deserialize<'de> for Rows {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let rows = Vec::<String>::deserialize(d)?;
        rows.iter()
            .map(|r| decode(r))
            .collect::<Result<_, _>>()
            .map(Rows)
    }
}

impl Serialize for Hours {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&encode(&self.0))
    }
}

impl<'de> Deserialize<'de> for Hours {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        decode(&String::deserialize(d)?).map(Hours)
    }
}

impl From<RingBuilder> for State {
    fn from(b: RingBuilder) -> Self {
        State {
            part_power: b.part_power,
            replicas: b.replicas,
            min_part_hours: b.min_part_hours,
            overload: b.overload,
            devs: b.devs,
            removing: b.removing,
            assignment: Rows(b.assignment),
            last_moved: Hours(b.last_moved),
            last_moved_epoch: b.last_moved_epoch,
            gather_start: b.gather_start,
            version: b.version,
            devices_changed: b.devices_changed,
        }
    }
}

impl TryFrom<State> for RingBuilder {
    type Error = BuildError;

    /// Checks the state as a whole: a builder read back from storage is one a rebalance can
    /// work on.
    fn try_from(s: State) -> Result<Self, BuildError> {
        validate_part_power(s.part_power)?;
        validate_replicas(s.replicas)?;
        if !(s.overload.is_finite() && (0.0..=MAX_OVERLOAD).contains(&s.overload)) {
            return Err(BuildError::Overload(s.overload));
        }
        if s.devs.len() > MAX_DEVICES {
            return Err(BuildError::TooManyDevices);
        }
        for dev in s.devs.iter().flatten() {
            dev.validate()?;
        }
        let present = |id: u16| s.devs.get(usize::from(id)).is_some_and(Option::is_some);
        if let Some(id) = s.removing.iter().find(|id| !present(**id)) {
            return Err(state(&format!("device {id} to remove is not in the ring")));
        }
        let parts = 1usize << s.part_power;
        let rows = &s.assignment.0;
        if !rows.is_empty() {
            if rows.len() != s.replicas.ceil() as usize {
                return Err(state("the assignment has a row per replica"));
            }
            if let Some((last, whole)) = rows.split_last()
                && (whole.iter().any(|r| r.len() != parts) || last.len() > parts)
            {
                return Err(state("each replica row has a slot per partition"));
            }
            if let Some(dev) = rows.iter().flatten().find(|d| !present(**d)) {
                return Err(state(&format!(
                    "a partition is on device {dev}, not in the ring"
                )));
            }
        }
        if s.last_moved.0.len() != parts {
            return Err(state("lastMoved has an entry per partition"));
        }
        Ok(RingBuilder {
            part_power: s.part_power,
            replicas: s.replicas,
            min_part_hours: s.min_part_hours,
            overload: s.overload,
            devs: s.devs,
            removing: s.removing,
            assignment: s.assignment.0,
            last_moved: s.last_moved.0,
            last_moved_epoch: s.last_moved_epoch,
            gather_start: s.gather_start % parts as u64,
            version: s.version,
            devices_changed: s.devices_changed,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: u64 = 3600;
    const T0: u64 = 1_800_000_000;

    /// `zones` zones of one region, `per_zone` hosts each with one device of weight 100.
    fn ring(part_power: u8, replicas: f64, zones: u32, per_zone: u32) -> RingBuilder {
        let mut b = RingBuilder::new(part_power, replicas, 1).expect("as the test set it up");
        for z in 1..=zones {
            for h in 1..=per_zone {
                b.add_device(Device::new(
                    1,
                    z,
                    format!("10.0.{z}.{h}"),
                    6200,
                    "sdb",
                    100.0,
                ))
                .expect("as the test set it up");
            }
        }
        b
    }

    fn held(b: &RingBuilder) -> BTreeMap<u16, usize> {
        let mut m = BTreeMap::new();
        for &d in b.assignment().iter().flatten() {
            *m.entry(d).or_default() += 1;
        }
        m
    }

    fn slots_changed(a: &[Vec<u16>], b: &[Vec<u16>]) -> usize {
        a.iter()
            .zip(b)
            .map(|(x, y)| x.iter().zip(y).filter(|(p, q)| p != q).count())
            .sum()
    }

    /// Three zones, the third with twice the weight (two devices): by weight alone it would
    /// take half the replicas, two of some partition's three; an overload of a half lets
    /// every partition have one replica in each zone, whatever the seed.
    #[test]
    fn overload_disperses_replicas_over_unequal_zones() {
        for seed in 1..20 {
            let mut b = RingBuilder::new(4, 3.0, 0).expect("as the test set it up");
            for (zone, dev) in [(1, "d1"), (2, "d1"), (3, "d1"), (3, "d2")] {
                b.add_device(Device::new(
                    1,
                    zone,
                    format!("127.0.78.{}", zone + 1),
                    6200,
                    dev,
                    100.0,
                ))
                .expect("as the test set it up");
            }
            b.set_overload(0.5).expect("as the test set it up");
            let done = b.rebalance(T0, seed).expect("as the test set it up");
            assert_eq!(done.dispersion, 0.0, "seed {seed}");
            for part in 0..b.parts() {
                let mut zones: Vec<u32> = b
                    .assignment()
                    .iter()
                    .map(|r| b.device(r[part]).expect("as the test set it up").zone)
                    .collect();
                zones.sort();
                assert_eq!(zones, [1, 2, 3], "seed {seed}, partition {part}");
            }
        }
    }

    #[test]
    fn replicas_go_to_distinct_zones_evenly() {
        let mut b = ring(10, 3.0, 3, 2);
        let done = b.rebalance(T0, 1).expect("as the test set it up");
        assert_eq!(done.moved, 3 * 1024);
        assert_eq!((done.balance, done.dispersion), (0.0, 0.0));
        assert!(done.finished);
        for part in 0..b.parts() {
            let mut zones: Vec<u32> = b
                .assignment()
                .iter()
                .map(|r| b.device(r[part]).expect("as the test set it up").zone)
                .collect();
            zones.sort();
            assert_eq!(zones, [1, 2, 3], "partition {part}");
        }
        assert!(held(&b).values().all(|n| *n == 512));
    }

    #[test]
    fn weights_share_partitions() {
        let mut b = RingBuilder::new(10, 1.0, 1).expect("as the test set it up");
        b.add_device(Device::new(1, 1, "10.0.0.1", 6200, "a", 100.0))
            .expect("as the test set it up");
        b.add_device(Device::new(1, 1, "10.0.0.1", 6200, "b", 300.0))
            .expect("as the test set it up");
        b.rebalance(T0, 1).expect("as the test set it up");
        assert_eq!(
            held(&b).into_iter().collect::<Vec<_>>(),
            [(0, 256), (1, 768)]
        );
    }

    #[test]
    fn removing_a_device_moves_only_its_replicas_even_within_min_part_hours() {
        let mut b = ring(10, 3.0, 3, 2);
        b.rebalance(T0, 1).expect("as the test set it up");
        let before = b.assignment().to_vec();
        let on_5 = held(&b)[&5];
        b.remove_device(5).expect("as the test set it up");
        // Zone 3 is left with one device: spreading one replica per zone needs it to take
        // more than its weight, which overload allows.
        b.set_overload(1.0).expect("as the test set it up");
        let done = b.rebalance(T0 + 60, 2).expect("as the test set it up");
        assert_eq!(done.removed_devices, 1);
        assert_eq!(
            done.moved, on_5,
            "exactly the removed device's replicas move"
        );
        assert_eq!(slots_changed(&before, b.assignment()), on_5);
        assert!(b.device(5).is_none());
        assert!(!b.assignment().iter().flatten().any(|d| *d == 5));
        // Its zone-mate took them: every partition still has one replica per zone.
        assert_eq!(done.dispersion, 0.0);
    }

    #[test]
    fn no_partition_moves_twice_within_min_part_hours() {
        let mut b = ring(10, 3.0, 3, 2);
        b.set_min_part_hours(3);
        b.rebalance(T0, 1).expect("as the test set it up");
        // Within the window nothing may move: the initial placement moved every partition.
        b.set_weight(0, 200.0).expect("as the test set it up");
        let first = b.assignment().to_vec();
        let held_back = b
            .rebalance(T0 + 2 * HOUR, 2)
            .expect("as the test set it up");
        assert_eq!(held_back.moved, 0);
        assert!(!held_back.finished);
        assert_eq!(b.min_part_seconds_left(T0 + 2 * HOUR), HOUR);
        // After it, partitions move toward the new weight.
        let after = b
            .rebalance(T0 + 3 * HOUR, 3)
            .expect("as the test set it up");
        assert!(after.moved > 0);
        let second = b.assignment().to_vec();
        let moved: Vec<usize> = (0..b.parts())
            .filter(|&p| first.iter().zip(&second).any(|(x, y)| x[p] != y[p]))
            .collect();
        // A further change an hour later: none of those partitions moves again.
        b.set_weight(1, 50.0).expect("as the test set it up");
        b.rebalance(T0 + 4 * HOUR, 4)
            .expect("as the test set it up");
        let third = b.assignment().to_vec();
        for &p in &moved {
            assert!(
                second.iter().zip(&third).all(|(x, y)| x[p] == y[p]),
                "partition {p} moved twice within 3 hours"
            );
        }
        // Each partition moves at most one replica per rebalance.
        for p in 0..b.parts() {
            assert!(
                first
                    .iter()
                    .zip(&second)
                    .filter(|(x, y)| x[p] != y[p])
                    .count()
                    <= 1
            );
        }
    }

    #[test]
    fn a_failed_rebalance_leaves_the_builder_as_it_was() {
        let mut b = ring(6, 3.0, 2, 1);
        let before = b.clone();
        assert_eq!(
            b.rebalance(T0, 1),
            Err(BuildError::NotEnoughDevices {
                replicas: 3.0,
                devices: 2
            })
        );
        assert_eq!(b, before);
        let mut b = ring(6, 3.0, 3, 1);
        b.rebalance(T0, 1).expect("as the test set it up");
        b.set_weight(0, 0.0).expect("as the test set it up");
        let before = b.clone();
        assert!(matches!(
            b.rebalance(T0 + 9 * HOUR, 1),
            Err(BuildError::NotEnoughDevices { .. })
        ));
        assert_eq!(b, before);
    }

    #[test]
    fn the_same_seed_gives_the_same_ring() {
        let mut a = ring(8, 3.0, 4, 2);
        let mut b = a.clone();
        a.rebalance(T0, 42).expect("as the test set it up");
        b.rebalance(T0, 42).expect("as the test set it up");
        assert_eq!(a, b);
    }

    #[test]
    fn bad_changes_are_refused_by_field() {
        assert_eq!(
            RingBuilder::new(25, 3.0, 1).err(),
            Some(BuildError::PartPower(25))
        );
        assert_eq!(
            RingBuilder::new(8, 0.5, 1).err(),
            Some(BuildError::Replicas(0.5))
        );
        let mut b = ring(4, 1.0, 1, 1);
        assert!(matches!(
            b.add_device(Device::new(1, 2, "10.0.1.1", 6200, "sdb", 1.0)),
            Err(BuildError::DuplicateDevice { id: 0, .. })
        ));
        assert_eq!(b.set_weight(9, 1.0), Err(BuildError::NoSuchDevice(9)));
        assert!(matches!(
            b.set_weight(0, -3.0),
            Err(BuildError::InvalidDevice {
                field: "weight",
                ..
            })
        ));
        b.remove_device(0).expect("as the test set it up");
        assert_eq!(b.set_weight(0, 1.0), Err(BuildError::DeviceRemoving(0)));
        assert!(matches!(
            b.set_overload(f64::NAN),
            Err(BuildError::Overload(_))
        ));
        assert_eq!(b.set_overload(-1.0), Err(BuildError::Overload(-1.0)));
    }

    #[test]
    fn state_round_trips_and_damaged_state_is_refused() {
        let mut b = ring(8, 3.0, 3, 2);
        b.rebalance(T0, 1).expect("as the test set it up");
        b.remove_device(2).expect("as the test set it up");
        let json = serde_json::to_string(&b).expect("as the test set it up");
        assert!(json.len() < 8 * 1024, "{} bytes", json.len());
        let back: RingBuilder = serde_json::from_str(&json).expect("as the test set it up");
        assert_eq!(back, b);

        let mut v: serde_json::Value = serde_json::from_str(&json).expect("as the test set it up");
        v["lastMoved"] = serde_json::Value::String(BASE64.encode([0u8; 6]));
        let e = serde_json::from_value::<RingBuilder>(v).expect_err("refused");
        assert!(e.to_string().contains("lastMoved"), "{e}");

        let mut v: serde_json::Value = serde_json::from_str(&json).expect("as the test set it up");
        v["assignment"][0] = serde_json::Value::String(encode(&vec![77; 256]));
        let e = serde_json::from_value::<RingBuilder>(v).expect_err("refused");
        assert!(e.to_string().contains("device 77"), "{e}");
    }

    #[test]
    fn two_regions_hold_replicas_by_weight_and_dispersion() {
        let mut b = RingBuilder::new(10, 3.0, 1).expect("as the test set it up");
        for (r, z, ip) in [(1, 1, "10.1.1.1"), (1, 2, "10.1.2.1"), (2, 1, "10.2.1.1")] {
            for d in ["sdb", "sdc"] {
                b.add_device(Device::new(r, z, ip, 6200, d, 100.0))
                    .expect("as the test set it up");
            }
        }
        let done = b.rebalance(T0, 1).expect("as the test set it up");
        assert_eq!(done.dispersion, 0.0);
        for part in 0..b.parts() {
            let regions: Vec<u32> = b
                .assignment()
                .iter()
                .map(|r| b.device(r[part]).expect("as the test set it up").region)
                .collect();
            assert!(
                regions.contains(&1) && regions.contains(&2),
                "partition {part}: {regions:?}"
            );
        }
    }
}

#[cfg(test)]
mod replica_count_tests {
    use super::*;

    fn ring(replicas: f64) -> RingBuilder {
        let mut b = RingBuilder::new(8, replicas, 0).expect("builder");
        for z in 1..=4 {
            b.add_device(Device::new(1, z, format!("10.0.{z}.1"), 6200, "sdb", 100.0))
                .expect("device");
        }
        b
    }

    fn distinct_devices(b: &RingBuilder) {
        for part in 0..b.parts() {
            let mut devs: Vec<u16> = b
                .assignment()
                .iter()
                .filter_map(|r| r.get(part).copied())
                .collect();
            let n = devs.len();
            devs.sort();
            devs.dedup();
            assert_eq!(
                devs.len(),
                n,
                "partition {part} has two replicas on one device"
            );
        }
    }

    #[test]
    fn a_fractional_replica_count_gives_a_short_last_row() {
        let mut b = ring(2.5);
        let done = b.rebalance(1_800_000_000, 1).expect("rebalance");
        let lengths: Vec<usize> = b.assignment().iter().map(Vec::len).collect();
        assert_eq!(lengths, [256, 256, 128]);
        assert_eq!(done.moved, 640);
        assert_eq!(done.dispersion, 0.0);
        assert!(done.balance < 1.0, "{done:?}");
        distinct_devices(&b);
        let ring = b.ring().expect("built");
        let mut bytes = Vec::new();
        ring.write_v1(&mut bytes).expect("write");
        assert_eq!(RingData::read_v1(&bytes[..]).expect("read"), ring);
    }

    #[test]
    fn changing_the_replica_count_adds_or_drops_whole_rows() {
        let mut b = ring(3.0);
        b.rebalance(1_800_000_000, 1).expect("rebalance");
        let before = b.assignment().to_vec();
        b.set_replicas(2.0).expect("replicas");
        assert!(b.devices_changed());
        let done = b.rebalance(1_800_000_000 + 7200, 2).expect("rebalance");
        assert_eq!(b.assignment().len(), 2);
        assert_eq!(done.dispersion, 0.0);
        // The two rows kept are where they were, but for moves toward balance.
        assert!(done.moved <= 256 / 4 + 2, "{done:?}");
        b.set_replicas(4.0).expect("replicas");
        let done = b.rebalance(1_800_000_000 + 4 * 7200, 3).expect("rebalance");
        assert_eq!(b.assignment().len(), 4);
        assert_eq!((done.balance, done.dispersion), (0.0, 0.0));
        distinct_devices(&b);
        assert_ne!(before, b.assignment());
    }
}

#[cfg(test)]
mod scale_tests {
    use super::*;

    /// 2^16 partitions on 48 devices (4 zones, 3 hosts each, 4 disks per host): balanced,
    /// fully dispersed, and a failed disk's replicas are all that move.
    #[test]
    fn sixty_five_thousand_partitions_on_forty_eight_devices() {
        let t = std::time::Instant::now();
        let mut b = RingBuilder::new(16, 3.0, 1).expect("builder");
        for z in 1..=4 {
            for h in 1..=3 {
                for d in ["sdb", "sdc", "sdd", "sde"] {
                    b.add_device(Device::new(1, z, format!("10.0.{z}.{h}"), 6200, d, 100.0))
                        .expect("device");
                }
            }
        }
        let first = b.rebalance(1_800_000_000, 1).expect("rebalance");
        assert!(first.balance < 1.0, "{first:?}");
        assert_eq!(first.dispersion, 0.0);
        let on_7 = b.assignment().iter().flatten().filter(|d| **d == 7).count();
        b.remove_device(7).expect("remove");
        let second = b.rebalance(1_800_000_000 + 7200, 2).expect("rebalance");
        assert_eq!(second.dispersion, 0.0);
        assert!(
            second.moved <= on_7 + on_7 / 20,
            "{second:?}, {on_7} on the removed device"
        );
        eprintln!("{first:?} {second:?} in {:?}", t.elapsed());
    }
}
