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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ConditionType {
    /// The object is fully realised and serving.
    Ready,
    /// A server or volume has been placed on a node.
    Scheduled,
    /// Addresses (IPs, MACs, VNIs) have been allocated.
    Allocated,
    /// The object's source (image download, snapshot copy) has been verified.
    Verified,
    /// The object is attached to (in use by) another object.
    Attached,
    /// A server's guest is not as Stratus made it, and its `driftPolicy` says to report that.
    Drifted,
    /// A server's guest was asked to shut down and has not finished yet.
    Stopping,
    /// A server's move to a new flavor.
    Resized,
    /// Whether the last reconcile got through: `False` (reason `ReconcileError`) when it
    /// failed in a way that retrying the same object cannot fix, with the error as message.
    Reconciled,
    /// A deleted project's namespace still holds objects (which ones, in the message).
    ContentRemaining,
    /// Objects of a deleted project wait for their finalizers (which ones, in the message).
    FinalizersRemaining,
}

impl ConditionType {
    /// The name in `status.conditions[].type`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Ready => "Ready",
            Self::Scheduled => "Scheduled",
            Self::Allocated => "Allocated",
            Self::Verified => "Verified",
            Self::Attached => "Attached",
            Self::Drifted => "Drifted",
            Self::Stopping => "Stopping",
            Self::Resized => "Resized",
            Self::Reconciled => "Reconciled",
            Self::ContentRemaining => "ContentRemaining",
            Self::FinalizersRemaining => "FinalizersRemaining",
        }
    }

    /// This condition with status `True`.
    pub fn yes(self, reason: &str, message: impl Into<String>) -> ConditionUpdate {
        ConditionUpdate::new(self, true, reason, message)
    }

    /// This condition with status `False`.
    pub fn no(self, reason: &str, message: impl Into<String>) -> ConditionUpdate {
        ConditionUpdate::new(self, false, reason, message)
    }

    /// The condition of this type in `conditions`, if any.
    pub fn find(self, conditions: &[Condition]) -> Option<&Condition> {
        conditions.iter().find(|c| c.type_ == self.as_str())
    }

    /// Whether `conditions` hold this condition with status `True`.
    pub fn is_true(self, conditions: &[Condition]) -> bool {
        self.find(conditions).is_some_and(|c| c.status == "True")
    }
}

impl std::fmt::Display for ConditionType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A condition to set: its type, status, reason and message (from [`ConditionType::yes`] or
/// [`ConditionType::no`]); [`ConditionUpdate::set`] writes it into a status's conditions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConditionUpdate {
    /// The condition's type.
    pub type_: ConditionType,
    /// `True` or `False`.
    pub status: bool,
    /// A CamelCase reason.
    pub reason: String,
    /// What a person reads.
    pub message: String,
}

impl ConditionUpdate {
    fn new(type_: ConditionType, status: bool, reason: &str, message: impl Into<String>) -> Self {
        Self {
            type_,
            status,
            reason: reason.into(),
            message: message.into(),
        }
    }

    /// Sets this condition in `conditions` for the object's `generation`, now. Returns
    /// whether anything changed (see [`set_condition`]).
    pub fn set(&self, conditions: &mut Vec<Condition>, generation: Option<i64>) -> bool {
        self.set_at(conditions, generation, Time(jiff_now()))
    }

    /// As [`ConditionUpdate::set`], at the time `now`.
    pub fn set_at(
        &self,
        conditions: &mut Vec<Condition>,
        generation: Option<i64>,
        now: Time,
    ) -> bool {
        set_condition(
            conditions,
            self.type_.as_str(),
            self.status,
            &self.reason,
            &self.message,
            generation,
            now,
        )
    }
}

fn jiff_now() -> k8s_openapi::jiff::Timestamp {
    k8s_openapi::jiff::Timestamp::now()
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
