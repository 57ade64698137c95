//! The policy hook of every write: the object a verb is about to store or delete, shown to the
//! policy layer before anything is written, as Kubernetes' validating admission sees it.
//!
//! The verbs compute the final object first (a create's defaulted object, an update's or a
//! patch's or an apply's result, a delete's stored object), so a decision never depends on how
//! the request was spelled: content type, escaped keys, JSON patch `move`/`copy`, YAML.

use serde_json::Value;

use crate::base::error::{ApiError, ApiResult, Cause};
use crate::resource::verbs::Target;

/// What a write does to its object, as Kubernetes' admission names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    /// A new object (`POST`, or an apply that creates).
    Create,
    /// A change to a stored object (`PUT`, `PATCH`, apply; of the object or its status).
    Update,
    /// A deletion (`DELETE` of one object, or each object of a `deletecollection`).
    Delete,
    /// A subresource acting on a stored object without storing it (a Server's `binding`).
    Connect,
}

/// One write, as the policy decides on it.
#[derive(Debug, Clone, Copy)]
pub struct Review<'a> {
    /// What the write does.
    pub operation: Operation,
    /// The object's type, and the namespace, name and subresource of the request's path (for
    /// a deletecollection, of the one object being deleted).
    pub target: &'a Target,
    /// The stored object (update, delete, connect).
    pub old: Option<&'a Value>,
    /// The object about to be stored (create, update).
    pub new: Option<&'a Value>,
    /// The request's options object: a delete's `DeleteOptions`, a binding's `Binding`.
    pub options: Option<&'a Value>,
}

/// The policy every write passes before it is made (dry runs included). It runs on the
/// decoded, defaulted and validated objects, inside the verb.
pub trait Policy: Send + Sync {
    /// Refuses what the caller may not do to this object.
    ///
    /// # Errors
    /// 403 naming why.
    fn review(&self, r: &Review<'_>) -> ApiResult<()>;

    /// Whether an update by the caller keeps the stored `metadata.managedFields` whatever its
    /// body carries, the server's own recording of the write aside. Kubernetes lets a client
    /// replace them (to reset them, say), and so does the default; a node may not, so that it
    /// cannot rewrite who owns the fields of the objects placed on it.
    fn keeps_managed_fields(&self) -> bool {
        false
    }
}

/// The policy of a caller allowed every write (system identities, and tests of the verbs).
#[derive(Debug, Clone, Copy, Default)]
pub struct AllowAll;

impl Policy for AllowAll {
    fn review(&self, _r: &Review<'_>) -> ApiResult<()> {
        Ok(())
    }
}

/// Checks that the name and namespace an object carries are those of the request's path: a
/// mismatch is a 400 naming the field. An absent or empty field agrees (the path fills it).
/// `name` is None for a request that names no object (a `POST` to a collection).
///
/// # Errors
/// 400 with a cause naming `metadata.name` or `metadata.namespace`.
pub fn names_agree(obj: &Value, namespace: Option<&str>, name: Option<&str>) -> ApiResult<()> {
    let field = |f: &str| {
        obj.get("metadata")
            .and_then(|m| m.get(f))
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
    };
    let mut causes = Vec::new();
    if let (Some(url), Some(body)) = (name, field("name"))
        && url != body
    {
        causes.push(Cause::invalid(
            "metadata.name",
            format!("the name of the object ({body}) does not match the name on the URL ({url})"),
        ));
    }
    if let (Some(url), Some(body)) = (namespace, field("namespace"))
        && url != body
    {
        causes.push(Cause::invalid(
            "metadata.namespace",
            format!(
                "the namespace of the provided object ({body}) does not match the namespace sent on the request ({url})"
            ),
        ));
    }
    if causes.is_empty() {
        return Ok(());
    }
    let list: Vec<String> = causes.iter().map(|c| c.message.clone()).collect();
    Err(ApiError::bad_request_fields(list.join("; "), causes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn names_agree_or_name_the_field() {
        let obj = json!({"metadata": {"name": "a", "namespace": "demo"}});
        assert!(names_agree(&obj, Some("demo"), Some("a")).is_ok());
        assert!(names_agree(&obj, None, None).is_ok());
        assert!(names_agree(&json!({}), Some("demo"), Some("a")).is_ok());
        let e = names_agree(&obj, Some("demo"), Some("b")).expect_err("refused");
        assert_eq!(e.code, 400);
        assert_eq!(e.details.causes[0].field, "metadata.name");
        let e = names_agree(&obj, Some("other"), Some("a")).expect_err("refused");
        assert_eq!(e.details.causes[0].field, "metadata.namespace");
    }
}
