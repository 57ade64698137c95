//! Types, patterns and condition names shared by every Stratus kind.

pub use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

macro_rules! ipv4 {
    () => {
        r"(25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])(\.(25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])){3}"
    };
}

// Deliberately loose: the schema only keeps out what is obviously not an IPv6 address;
// `validate` parses every address exactly.
macro_rules! ipv6 {
    () => {
        r"([0-9a-fA-F]{0,4}:){2,7}[0-9a-fA-F.]{0,15}"
    };
}

/// A reference to another object by name: a DNS-1123 subdomain (at most 253 characters).
pub const NAME_PATTERN: &str = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$";

/// Longest allowed object name (DNS-1123 subdomain).
pub const NAME_MAX_LENGTH: u32 = 253;

/// A DNS-1123 label, as used for host names (at most 63 characters).
pub const LABEL_PATTERN: &str = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$";

/// An IPv4 address in dotted-quad form.
pub const IPV4_PATTERN: &str = concat!("^", ipv4!(), "$");

/// An IPv4 or IPv6 address (the IPv6 part is loose; `validate` parses exactly).
pub const IP_PATTERN: &str = concat!("^(", ipv4!(), "|", ipv6!(), ")$");

/// An IPv4 or IPv6 network in CIDR notation (`10.0.0.0/24`, `2001:db8::/64`).
pub const CIDR_PATTERN: &str = concat!(
    "^(",
    ipv4!(),
    "/(3[0-2]|[12]?[0-9])|",
    ipv6!(),
    "/(12[0-8]|1[01][0-9]|[1-9]?[0-9]))$"
);

/// A unicast MAC address, lower case, colon separated.
pub const MAC_PATTERN: &str = r"^([0-9a-f]{2}:){5}[0-9a-f]{2}$";

/// A SHA-256 digest as 64 lower-case hexadecimal digits.
pub const SHA256_PATTERN: &str = r"^[a-f0-9]{64}$";

/// Condition types used across kinds (`status.conditions[].type`).
pub mod condition {
    /// The object is fully realised and serving.
    pub const READY: &str = "Ready";
    /// A server or volume has been placed on a node.
    pub const SCHEDULED: &str = "Scheduled";
    /// Addresses (IPs, MACs, VNIs) have been allocated.
    pub const ALLOCATED: &str = "Allocated";
    /// The object's source (image download, snapshot copy) has been verified.
    pub const VERIFIED: &str = "Verified";
    /// The object is attached to (in use by) another object.
    pub const ATTACHED: &str = "Attached";
}

pub(crate) fn default_true() -> bool {
    true
}

/// Sets the condition `type_` in `conditions` (adding it if absent). `lastTransitionTime`
/// moves to `now` only when the status changes, as the Kubernetes conventions ask. Returns
/// whether anything changed.
pub fn set_condition(
    conditions: &mut Vec<Condition>,
    type_: &str,
    status: bool,
    reason: &str,
    message: &str,
    generation: Option<i64>,
    now: Time,
) -> bool {
    let status = if status { "True" } else { "False" };
    match conditions.iter_mut().find(|c| c.type_ == type_) {
        Some(c) => {
            let before = c.clone();
            if c.status != status {
                c.last_transition_time = now;
            }
            c.status = status.into();
            c.reason = reason.into();
            c.message = message.into();
            c.observed_generation = generation;
            *c != before
        }
        None => {
            conditions.push(Condition {
                type_: type_.into(),
                status: status.into(),
                reason: reason.into(),
                message: message.into(),
                observed_generation: generation,
                last_transition_time: now,
            });
            true
        }
    }
}

#[cfg(test)]
mod condition_tests {
    use super::*;

    fn at(s: &str) -> Time {
        Time(s.parse().expect("a timestamp"))
    }

    #[test]
    fn transition_time_moves_only_when_the_status_does() {
        let mut c = Vec::new();
        assert!(set_condition(
            &mut c,
            "Ready",
            false,
            "Building",
            "",
            Some(1),
            at("2026-01-01T00:00:00Z")
        ));
        assert!(set_condition(
            &mut c,
            "Ready",
            false,
            "Building",
            "disks",
            Some(1),
            at("2026-01-01T00:01:00Z")
        ));
        assert_eq!(c[0].last_transition_time, at("2026-01-01T00:00:00Z"));
        assert!(!set_condition(
            &mut c,
            "Ready",
            false,
            "Building",
            "disks",
            Some(1),
            at("2026-01-01T00:02:00Z")
        ));
        assert!(set_condition(
            &mut c,
            "Ready",
            true,
            "Running",
            "",
            Some(1),
            at("2026-01-01T00:03:00Z")
        ));
        assert_eq!(c[0].last_transition_time, at("2026-01-01T00:03:00Z"));
        assert_eq!(c.len(), 1);
    }
}
