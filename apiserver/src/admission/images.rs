//! Admission of Images: what an Active Image's data is stays as it was verified.
//!
//! # Guarantees
//! - Once an Image is Active, the fields that say what its data is (`spec.source`,
//!   `spec.diskFormat`, `spec.containerFormat`, `spec.sha256`) are immutable: an update
//!   changing one is 422 naming it, as Glance keeps an active image's data, format and
//!   checksum. The rest of the spec (visibility, minimums, kernel, properties, protection)
//!   may change.

use futures::future::BoxFuture;
use serde_json::Value;

use super::{Admission, Change, Ctx, Subject, Written};
use crate::base::error::{ApiError, ApiResult, Cause};

/// The fields, by JSON pointer and by name, that describe an Image's data.
const DATA_FIELDS: [(&str, &str); 4] = [
    ("/spec/source", "spec.source"),
    ("/spec/diskFormat", "spec.diskFormat"),
    ("/spec/containerFormat", "spec.containerFormat"),
    ("/spec/sha256", "spec.sha256"),
];

/// Admission of Images: registered for `image.stratus.dev` Images.
#[derive(Debug)]
pub struct Images;

impl Admission for Images {
    fn write<'a>(
        &'a self,
        _ctx: Ctx<'a>,
        s: Subject<'a>,
        w: Change<'a>,
    ) -> Option<BoxFuture<'a, ApiResult<Written>>> {
        let (old, _) = w.old?;
        let e = changed_data(&s, old, w.new)?;
        Some(Box::pin(async move { Err(e) }))
    }
}

/// 422 naming each field of the data of an Active Image (`old`) that `new` changes; `None`
/// when the Image is not Active or none changes.
fn changed_data(s: &Subject<'_>, old: &Value, new: &Value) -> Option<ApiError> {
    if old.pointer("/status/phase").and_then(Value::as_str) != Some("Active") {
        return None;
    }
    let causes: Vec<Cause> = DATA_FIELDS
        .iter()
        .filter(|(pointer, _)| old.pointer(pointer) != new.pointer(pointer))
        .map(|(_, field)| {
            Cause::invalid(
                *field,
                "Invalid value: field is immutable once the image is Active (its data is verified and kept): make a new Image for other data",
            )
        })
        .collect();
    if causes.is_empty() {
        return None;
    }
    let name = crate::base::meta::meta_str(new, "name").unwrap_or_default();
    Some(ApiError::invalid(s.kind, s.group, s.plural, name, causes))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn subject() -> Subject<'static> {
        Subject {
            group: "image.stratus.dev",
            kind: "Image",
            plural: "images",
            namespaced: true,
            namespace: Some("p1"),
            name: "disk",
        }
    }

    fn image(phase: &str, spec: Value) -> Value {
        json!({"metadata": {"name": "disk"}, "spec": spec, "status": {"phase": phase}})
    }

    #[test]
    fn an_active_images_data_fields_are_immutable() {
        let spec = json!({"diskFormat": "raw", "source": {"upload": {}}, "visibility": "private"});
        let old = image("Active", spec.clone());
        let mut new = old.clone();
        new["spec"]["diskFormat"] = json!("qcow2");
        new["spec"]["sha256"] = json!("a".repeat(64));
        let e = changed_data(&subject(), &old, &new).expect("refused");
        assert_eq!(e.code, 422);
        let fields: Vec<&str> = e.details.causes.iter().map(|c| c.field.as_str()).collect();
        assert_eq!(fields, ["spec.diskFormat", "spec.sha256"]);

        let mut new = old.clone();
        new["spec"]["source"] = json!({"url": "https://example.org/d.raw"});
        let e = changed_data(&subject(), &old, &new).expect("refused");
        assert_eq!(e.details.causes[0].field, "spec.source");
    }

    #[test]
    fn the_rest_of_an_active_images_spec_and_an_inactive_image_may_change() {
        let spec = json!({"diskFormat": "raw", "source": {"upload": {}}, "visibility": "private"});
        let old = image("Active", spec.clone());
        let mut new = old.clone();
        new["spec"]["visibility"] = json!("public");
        new["spec"]["properties"] = json!({"os_distro": "debian"});
        assert!(changed_data(&subject(), &old, &new).is_none());
        for phase in ["Pending", "Uploading", "Error"] {
            let old = image(phase, spec.clone());
            let mut new = old.clone();
            new["spec"]["diskFormat"] = json!("qcow2");
            assert!(changed_data(&subject(), &old, &new).is_none(), "{phase}");
        }
    }
}
