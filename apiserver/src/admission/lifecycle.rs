//! Namespace lifecycle, as Kubernetes' NamespaceLifecycle admission: nothing is created in a
//! namespace whose Project is being deleted (403 Forbidden) or that has no Project (404).
//! Every namespaced create passes here, whatever admission writes it; updates and deletes in a
//! terminating namespace pass (its content is being emptied through them).
//!
//! # Guarantees
//! A create is written only while its namespace's Project is still at the revision at which it
//! was found active: the create's etcd transaction compares the Project's `mod_revision`
//! ([`Change::parent`](super::Change::parent)), whichever admission writes it. A Project's
//! deletion is a write of the Project (its `deletionTimestamp`), so a create checked before the
//! deletion began and written after it fails its transaction, is checked again and refused.
//! Every create that succeeds is therefore at a revision before the deletion, and whatever
//! reads the namespace's content after the deletion began (the project controller's drain)
//! sees it.
//!
//! A Project carries the project controller's cleanup finalizer ([`PROJECT_FINALIZER`]) from
//! its creation ([`Projects`]), as a Kubernetes namespace carries `kubernetes` in its
//! finalizers: a Project deleted before the controller has seen it still waits for its
//! namespace to be emptied, rather than going at once and leaving its content behind.

use serde::Deserialize;
use serde::de::IgnoredAny;
use serde_json::Value;

use crate::admission::{Admission, Subject};
use crate::base::error::{ApiError, ApiResult, Cause};

/// The finalizer with which the project controller empties a Project's namespace before the
/// Project goes (the controller's `FINALIZER`).
pub const PROJECT_FINALIZER: &str = "identity.stratus.dev/project-cleanup";

/// Admission of Projects: registered for `identity.stratus.dev` Projects.
#[derive(Debug)]
pub struct Projects;

impl Admission for Projects {
    /// A new Project carries [`PROJECT_FINALIZER`] (once), after whatever finalizers its
    /// creator gave it.
    fn on_create(&self, obj: &mut Value) {
        let m = crate::base::meta::meta_mut(obj);
        let finalizers = m
            .entry("finalizers")
            .or_insert_with(|| Value::Array(Vec::new()));
        if !finalizers.is_array() {
            *finalizers = Value::Array(Vec::new());
        }
        if let Some(list) = finalizers.as_array_mut()
            && !list.iter().any(|f| f.as_str() == Some(PROJECT_FINALIZER))
        {
            list.push(Value::String(PROJECT_FINALIZER.into()));
        }
    }
}

/// How a create finds its namespace's Project.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProjectState {
    /// Active, at this revision: the create's transaction holds it there.
    Active(i64),
    /// Its deletion has begun (`deletionTimestamp` is set).
    Terminating,
    /// There is no such Project.
    Missing,
}

/// The part of a stored Project the check reads (the rest is skipped, not decoded).
#[derive(Debug, Deserialize)]
struct ProjectMeta {
    #[serde(default)]
    metadata: Meta,
}

#[derive(Debug, Default, Deserialize)]
struct Meta {
    #[serde(default)]
    name: Option<String>,
    #[serde(default, rename = "deletionTimestamp")]
    deletion_timestamp: Option<IgnoredAny>,
}

impl ProjectState {
    /// The state of the Project `ns` stored as `stored` (JSON) at `revision`; `None` when the
    /// value is not the Project of that name (a cache page starting at its key may hold the
    /// next Project's, whose name begins with `ns`) or cannot be read.
    pub fn of_stored(ns: &str, revision: i64, stored: &[u8]) -> Option<Self> {
        let p: ProjectMeta = serde_json::from_slice(stored).ok()?;
        if p.metadata.name.as_deref() != Some(ns) {
            return None;
        }
        Some(if p.metadata.deletion_timestamp.is_some() {
            Self::Terminating
        } else {
            Self::Active(revision)
        })
    }

    /// The state of a Project as the store answered it.
    pub fn of_value(project: Option<(i64, &serde_json::Value)>) -> Self {
        match project {
            None => Self::Missing,
            Some((_, p))
                if p.pointer("/metadata/deletionTimestamp")
                    .is_some_and(|t| !t.is_null()) =>
            {
                Self::Terminating
            }
            Some((rev, _)) => Self::Active(rev),
        }
    }
}

/// Admits a create of `name` (of the type of `s`) in namespace `ns` whose Project is in
/// `state`: the revision the create's transaction must hold the Project at.
///
/// # Errors
/// 403 Forbidden (cause `NamespaceTerminating` on `metadata.namespace`) while the Project is
/// being deleted, as Kubernetes answers; 404 for the namespace when there is no Project.
pub fn admit_create(s: &Subject<'_>, name: &str, ns: &str, state: ProjectState) -> ApiResult<i64> {
    match state {
        ProjectState::Active(rev) => Ok(rev),
        ProjectState::Missing => Err(ApiError::not_found("", "namespaces", ns)),
        ProjectState::Terminating => Err(terminating(s, name, ns)),
    }
}

/// 403: `ns` is being terminated.
fn terminating(s: &Subject<'_>, name: &str, ns: &str) -> ApiError {
    let resource = if s.group.is_empty() {
        s.plural.to_string()
    } else {
        format!("{}.{}", s.plural, s.group)
    };
    let mut e = ApiError::forbidden(format!(
        "{resource} \"{name}\" is forbidden: unable to create new content in namespace {ns} because it is being terminated"
    ))
    .about(s.group, s.plural, name);
    e.details.causes.push(Cause {
        reason: "NamespaceTerminating".into(),
        message: format!("namespace {ns} is being terminated"),
        field: "metadata.namespace".into(),
    });
    e
}

#[cfg(test)]
mod tests {
    use super::{PROJECT_FINALIZER, ProjectState, Projects, admit_create};
    use crate::admission::{Admission, Subject};
    use serde_json::json;

    fn port<'a>() -> Subject<'a> {
        Subject {
            group: "network.stratus.dev",
            kind: "Port",
            plural: "ports",
            namespaced: true,
            namespace: Some("demo"),
            name: "",
        }
    }

    #[test]
    fn a_new_project_carries_the_cleanup_finalizer_once_after_its_own() {
        let mut bare = json!({"metadata": {"name": "demo"}});
        Projects.on_create(&mut bare);
        assert_eq!(bare["metadata"]["finalizers"], json!([PROJECT_FINALIZER]));
        let mut own =
            json!({"metadata": {"name": "demo", "finalizers": ["a/b", PROJECT_FINALIZER]}});
        Projects.on_create(&mut own);
        assert_eq!(
            own["metadata"]["finalizers"],
            json!(["a/b", PROJECT_FINALIZER])
        );
        let mut odd = json!({"metadata": {"name": "demo", "finalizers": null}});
        Projects.on_create(&mut odd);
        assert_eq!(odd["metadata"]["finalizers"], json!([PROJECT_FINALIZER]));
    }

    #[test]
    fn a_terminating_project_refuses_creates_as_kubernetes_does() {
        let e =
            admit_create(&port(), "p1", "demo", ProjectState::Terminating).expect_err("refused");
        assert_eq!((e.code, e.reason), (403, "Forbidden"));
        assert_eq!(
            e.message,
            "ports.network.stratus.dev \"p1\" is forbidden: unable to create new content in namespace demo because it is being terminated"
        );
        assert_eq!(e.details.causes.len(), 1);
        assert_eq!(e.details.causes[0].reason, "NamespaceTerminating");
        assert_eq!(e.details.causes[0].field, "metadata.namespace");
        assert_eq!(e.details.name.as_deref(), Some("p1"));
    }

    #[test]
    fn a_missing_project_is_the_namespace_not_found() {
        let e = admit_create(&port(), "p1", "demo", ProjectState::Missing).expect_err("refused");
        assert_eq!(
            (e.code, e.message.as_str()),
            (404, "namespaces \"demo\" not found")
        );
        assert_eq!(
            admit_create(&port(), "p1", "demo", ProjectState::Active(7)).ok(),
            Some(7)
        );
    }

    #[test]
    fn the_state_is_read_from_the_stored_project_of_that_name_only() {
        let live = json!({"metadata": {"name": "demo", "uid": "u"}, "spec": {}});
        let going =
            json!({"metadata": {"name": "demo", "deletionTimestamp": "2026-01-01T00:00:00Z"}});
        let bytes = |v: &serde_json::Value| serde_json::to_vec(v).expect("JSON");
        assert_eq!(
            ProjectState::of_stored("demo", 5, &bytes(&live)),
            Some(ProjectState::Active(5))
        );
        assert_eq!(
            ProjectState::of_stored("demo", 5, &bytes(&going)),
            Some(ProjectState::Terminating)
        );
        // The next key of a cache page: another Project, whose name begins with "demo".
        let other = json!({"metadata": {"name": "demo2"}});
        assert_eq!(ProjectState::of_stored("demo", 5, &bytes(&other)), None);
        assert_eq!(ProjectState::of_stored("demo", 5, b"not json"), None);
        assert_eq!(
            ProjectState::of_value(Some((5, &live))),
            ProjectState::Active(5)
        );
        assert_eq!(
            ProjectState::of_value(Some((5, &going))),
            ProjectState::Terminating
        );
        assert_eq!(ProjectState::of_value(None), ProjectState::Missing);
    }
}
