//! Events that `kubectl describe` shows, as agents and controllers record them.

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType, Recorder};

/// Records an Event about `reference`; whether it was recorded. A failure is logged, not
/// raised: an Event only tells of work, and the work goes on without it.
pub async fn publish(
    recorder: &Recorder,
    reference: &ObjectReference,
    type_: EventType,
    action: &str,
    reason: &str,
    note: String,
) -> bool {
    let event = Event {
        type_,
        reason: reason.into(),
        note: Some(note),
        action: action.into(),
        secondary: None,
    };
    match recorder.publish(&event, reference).await {
        Ok(()) => true,
        Err(e) => {
            tracing::debug!(error = %e, reason, "cannot publish an event");
            false
        }
    }
}
