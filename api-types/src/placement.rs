//! Placement arithmetic shared by the scheduler and the API server's binding check: what a
//! hypervisor can hold and what a flavor claims (as Nova's placement service computes them).

use crate::compute::{ComputeResources, FlavorSpec, HypervisorSpec};

/// An amount of compute resources, fractional where allocation ratios make it so.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct Amount {
    /// Virtual CPUs.
    pub vcpus: f64,
    /// Memory, in MiB.
    pub ram_mib: f64,
    /// Disk, in GiB.
    pub disk_gib: f64,
}

impl Amount {
    /// The sum of two amounts.
    #[must_use]
    pub fn plus(self, o: Amount) -> Amount {
        Amount {
            vcpus: self.vcpus + o.vcpus,
            ram_mib: self.ram_mib + o.ram_mib,
            disk_gib: self.disk_gib + o.disk_gib,
        }
    }
}

impl From<&ComputeResources> for Amount {
    fn from(r: &ComputeResources) -> Self {
        Amount {
            vcpus: r.vcpus as f64,
            ram_mib: r.ram_mib as f64,
            disk_gib: r.disk_gib as f64,
        }
    }
}

/// What a server of `flavor` claims on its hypervisor: its vCPUs, RAM, and root plus
/// ephemeral disk.
pub fn claim(flavor: &FlavorSpec) -> ComputeResources {
    ComputeResources {
        vcpus: u64::from(flavor.vcpus),
        ram_mib: flavor.ram_mib,
        disk_gib: flavor.disk_gib + flavor.ephemeral_gib,
    }
}

/// What a hypervisor with `capacity` can hold: capacity less the host's reservation, times the
/// allocation ratio.
pub fn allocatable(spec: &HypervisorSpec, capacity: &ComputeResources) -> Amount {
    let less = |a: u64, b: u64| a.saturating_sub(b) as f64;
    Amount {
        vcpus: less(capacity.vcpus, u64::from(spec.reserved_host_cpus)) * spec.cpu_allocation_ratio,
        ram_mib: less(capacity.ram_mib, spec.reserved_host_memory_mib) * spec.ram_allocation_ratio,
        disk_gib: less(capacity.disk_gib, spec.reserved_host_disk_gib) * spec.disk_allocation_ratio,
    }
}

/// A resource a placement can lack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lack {
    /// Virtual CPUs.
    Vcpus,
    /// Memory.
    Ram,
    /// Disk.
    Disk,
}

impl Lack {
    /// Its name in messages (`vcpus`, `ram`, `disk`).
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Vcpus => "vcpus",
            Self::Ram => "ram",
            Self::Disk => "disk",
        }
    }
}

/// The first resource that `need` does not fit in `limit - used`, without saying by how much
/// (no allocation: the scheduler asks this of every hypervisor).
pub fn lacking(limit: Amount, used: Amount, need: Amount) -> Option<Lack> {
    if used.vcpus + need.vcpus > limit.vcpus {
        Some(Lack::Vcpus)
    } else if used.ram_mib + need.ram_mib > limit.ram_mib {
        Some(Lack::Ram)
    } else if used.disk_gib + need.disk_gib > limit.disk_gib {
        Some(Lack::Disk)
    } else {
        None
    }
}

/// The first resource (`vcpus`, `ram` or `disk`) that `need` does not fit in `limit - used`,
/// with a message saying by how much.
pub fn shortfall(limit: Amount, used: Amount, need: Amount) -> Option<(&'static str, String)> {
    [
        ("vcpus", limit.vcpus, used.vcpus, need.vcpus, ""),
        ("ram", limit.ram_mib, used.ram_mib, need.ram_mib, " MiB"),
        ("disk", limit.disk_gib, used.disk_gib, need.disk_gib, " GiB"),
    ]
    .into_iter()
    .find(|(_, l, u, n, _)| u + n > *l)
    .map(|(what, l, u, n, unit)| {
        (
            what,
            format!(
                "insufficient {what}: requested {n}{unit}, free {}{unit}",
                (l - u).max(0.0).floor()
            ),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocatable_applies_reservations_and_ratios() {
        let spec: HypervisorSpec = serde_json::from_value(serde_json::json!({
            "cpuAllocationRatio": 2.0, "ramAllocationRatio": 1.0,
            "reservedHostCPUs": 1, "reservedHostMemoryMiB": 1024, "reservedHostDiskGiB": 10
        }))
        .expect("a hypervisor spec");
        let cap = ComputeResources {
            vcpus: 4,
            ram_mib: 8192,
            disk_gib: 110,
        };
        assert_eq!(
            allocatable(&spec, &cap),
            Amount {
                vcpus: 6.0,
                ram_mib: 7168.0,
                disk_gib: 100.0
            }
        );
        // A reservation larger than the capacity leaves nothing, not a negative amount.
        let tiny = ComputeResources {
            vcpus: 0,
            ram_mib: 256,
            disk_gib: 0,
        };
        assert_eq!(allocatable(&spec, &tiny).ram_mib, 0.0);
    }

    #[test]
    fn shortfall_names_the_first_resource_that_does_not_fit() {
        let limit = Amount {
            vcpus: 4.0,
            ram_mib: 1024.0,
            disk_gib: 10.0,
        };
        let used = Amount {
            vcpus: 2.0,
            ram_mib: 768.0,
            disk_gib: 0.0,
        };
        let fits = Amount {
            vcpus: 2.0,
            ram_mib: 256.0,
            disk_gib: 10.0,
        };
        assert_eq!(shortfall(limit, used, fits), None);
        let big = Amount {
            vcpus: 1.0,
            ram_mib: 512.0,
            disk_gib: 1.0,
        };
        assert_eq!(
            shortfall(limit, used, big),
            Some((
                "ram",
                "insufficient ram: requested 512 MiB, free 256 MiB".to_string()
            ))
        );
    }

    #[test]
    fn a_flavor_claims_its_root_and_ephemeral_disk() {
        let f: FlavorSpec = serde_json::from_value(
            serde_json::json!({"vcpus": 2, "ramMiB": 2048, "diskGiB": 20, "ephemeralGiB": 5}),
        )
        .expect("a flavor spec");
        assert_eq!(
            claim(&f),
            ComputeResources {
                vcpus: 2,
                ram_mib: 2048,
                disk_gib: 25
            }
        );
    }
}
