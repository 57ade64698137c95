//! Replication progress from Swift's recon cache (`account.recon`, `container.recon`,
//! `object.recon` under `recon_cache_path`), which each replicator rewrites after a pass.

use serde_json::Value;
use stratus_api_types::common::Time;
use stratus_api_types::object::{ReplicationStatus, RingType};

/// The progress `kind`'s replicator recorded in its recon file `text`, if it recorded any.
pub fn parse(kind: RingType, text: &str) -> Option<ReplicationStatus> {
    let v: Value = serde_json::from_str(text).ok()?;
    // The object replicator keys its entries apart and counts its pass in minutes.
    let (last, time, scale) = match kind {
        RingType::Object => ("object_replication_last", "object_replication_time", 60.0),
        _ => ("replication_last", "replication_time", 1.0),
    };
    let last = v.get(last).and_then(Value::as_f64)?;
    let stats = v.get("replication_stats");
    let count = |k: &str| stats.and_then(|s| s.get(k)).and_then(Value::as_u64);
    Some(ReplicationStatus {
        ring_type: kind,
        last_pass: jiff::Timestamp::from_second(last as i64).ok().map(Time),
        pass_seconds: v
            .get(time)
            .and_then(Value::as_f64)
            .map(|t| (t * scale * 1000.0).round() / 1000.0),
        attempted: count("attempted"),
        failures: count("failure"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_replicators_pass_is_read_from_its_recon_file() {
        let object = r#"{"object_replication_last": 1800000000.5, "object_replication_time": 0.5,
            "replication_stats": {"attempted": 12, "failure": 1, "success": 30}}"#;
        let r = parse(RingType::Object, object).expect("object");
        assert_eq!(r.pass_seconds, Some(30.0));
        assert_eq!((r.attempted, r.failures), (Some(12), Some(1)));
        assert_eq!(r.last_pass.map(|t| t.0.as_second()), Some(1_800_000_000));
        let container = r#"{"replication_last": 1800000000.0, "replication_time": 2.25,
            "replication_stats": {"attempted": 3, "failure": 0}}"#;
        let r = parse(RingType::Container, container).expect("container");
        assert_eq!(r.pass_seconds, Some(2.25));
        assert_eq!(r.ring_type, RingType::Container);
        // No pass yet, or not recon at all: nothing.
        assert_eq!(
            parse(RingType::Object, r#"{"object_auditor_stats_ALL": {}}"#),
            None
        );
        assert_eq!(parse(RingType::Account, "not json"), None);
    }
}
