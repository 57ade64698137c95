//! The resource types the API server serves: every Stratus kind plus the built-ins it needs.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Event;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use serde_json::Value;

use crate::resource::schema::Structural;

/// A printer column of `kubectl get` (a CRD `additionalPrinterColumns` entry).
#[derive(Debug, Clone)]
pub struct PrinterColumn {
    /// Column header.
    pub name: String,
    /// OpenAPI type: string, integer, number, boolean, date.
    pub type_: String,
    /// Optional format hint.
    pub format: Option<String>,
    /// Description shown by `kubectl explain`-like tools.
    pub description: String,
    /// 0 shows always; higher shows only with `-o wide`.
    pub priority: i32,
    /// Simple JSONPath, e.g. `.status.phase`.
    pub json_path: String,
}

/// Everything the server knows about one served resource.
#[derive(Debug)]
pub struct ResourceType {
    /// API group; empty for the core group.
    pub group: String,
    /// Version, e.g. `v1`.
    pub version: String,
    /// Kind, e.g. `Server`.
    pub kind: String,
    /// Lower-case plural used in paths.
    pub plural: String,
    /// Lower-case singular.
    pub singular: String,
    /// Whether objects live in a namespace (a project).
    pub namespaced: bool,
    /// Short names (`srv`).
    pub short_names: Vec<String>,
    /// Categories (`stratus`).
    pub categories: Vec<String>,
    /// The OpenAPI v3 schema of the whole object.
    pub schema: Value,
    /// The schema compiled for pruning, defaulting and validation.
    pub structural: Structural,
    /// Extra `kubectl get` columns.
    pub printer_columns: Vec<PrinterColumn>,
    /// Field paths (besides metadata.name / metadata.namespace) usable in field selectors.
    pub selectable_fields: Vec<String>,
    /// Whether `status` is a subresource (spec and status written separately).
    pub status_subresource: bool,
    /// Whether a change outside metadata and status bumps `metadata.generation`.
    pub tracks_generation: bool,
    /// Set for a type served from another type's storage.
    pub view: Option<crate::resource::view::View>,
    /// Whether strategic merge patch is accepted (Kubernetes built-ins; never custom kinds).
    pub strategic_merge: bool,
}

impl ResourceType {
    /// The admissions registered for this type.
    pub fn admission(&self) -> &'static [&'static dyn crate::admission::Admission] {
        crate::admission::for_kind(&self.group, &self.kind)
    }

    /// `group/version`, or `version` for the core group.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// The etcd key prefix holding every object of this type (with a trailing `/`), or of one
    /// namespace.
    pub fn key_prefix(&self, prefix: &str, namespace: Option<&str>) -> String {
        let namespace = namespace.filter(|_| self.namespaced);
        crate::storage::keys::collection(prefix, &self.group, &self.plural, namespace)
    }

    /// The etcd key of one object.
    pub fn key(&self, prefix: &str, namespace: Option<&str>, name: &str) -> String {
        format!("{}{name}", self.key_prefix(prefix, namespace))
    }

    /// Whether `path` may be used in a field selector on this type.
    pub fn field_selectable(&self, path: &str) -> bool {
        path == "metadata.name"
            || (self.namespaced && path == "metadata.namespace")
            || self
                .selectable_fields
                .iter()
                .any(|f| f.trim_start_matches('.') == path)
    }
}

/// Errors building the registry (bugs in a kind definition, found at start-up).
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// A CRD has no schema.
    #[error("kind {0} has no openAPIV3Schema")]
    NoSchema(String),
    /// A schema could not be compiled.
    #[error("kind {kind}: {reason}")]
    BadSchema { kind: String, reason: String },
}

/// The set of served types, looked up by group + version + plural.
#[derive(Debug, Default)]
pub struct Registry {
    types: Vec<Arc<ResourceType>>,
    by_path: BTreeMap<(String, String, String), Arc<ResourceType>>,
}

impl Registry {
    /// Every Stratus kind plus the built-in Event and Lease types.
    pub fn stratus() -> Result<Self, RegistryError> {
        let mut r = Self::default();
        for crd in stratus_api_types::crds() {
            r.add_crd(&crd)?;
        }
        r.add_builtins()?;
        Ok(r)
    }

    /// Adds one kind described by a CustomResourceDefinition.
    pub fn add_crd(&mut self, crd: &CustomResourceDefinition) -> Result<(), RegistryError> {
        let spec = &crd.spec;
        for v in spec.versions.iter().filter(|v| v.served) {
            let schema = v
                .schema
                .as_ref()
                .and_then(|s| s.open_api_v3_schema.as_ref())
                .ok_or_else(|| RegistryError::NoSchema(spec.names.kind.clone()))?;
            let schema = serde_json::to_value(schema).map_err(|e| RegistryError::BadSchema {
                kind: spec.names.kind.clone(),
                reason: e.to_string(),
            })?;
            let printer_columns = v
                .additional_printer_columns
                .iter()
                .flatten()
                .map(|c| PrinterColumn {
                    name: c.name.clone(),
                    type_: c.type_.clone(),
                    format: c.format.clone(),
                    description: c.description.clone().unwrap_or_default(),
                    priority: c.priority.unwrap_or(0),
                    json_path: c.json_path.clone(),
                })
                .collect();
            let selectable_fields = v
                .selectable_fields
                .iter()
                .flatten()
                .map(|f| f.json_path.clone())
                .collect();
            self.insert(ResourceType {
                group: spec.group.clone(),
                version: v.name.clone(),
                kind: spec.names.kind.clone(),
                plural: spec.names.plural.clone(),
                singular: spec
                    .names
                    .singular
                    .clone()
                    .unwrap_or_else(|| spec.names.kind.to_lowercase()),
                namespaced: spec.scope == "Namespaced",
                short_names: spec.names.short_names.clone().unwrap_or_default(),
                categories: spec.names.categories.clone().unwrap_or_default(),
                structural: Structural::compile(&schema).map_err(|reason| {
                    RegistryError::BadSchema {
                        kind: spec.names.kind.clone(),
                        reason,
                    }
                })?,
                schema,
                printer_columns,
                selectable_fields,
                status_subresource: v.subresources.as_ref().is_some_and(|s| s.status.is_some()),
                tracks_generation: true,
                view: None,
                strategic_merge: false,
            });
        }
        Ok(())
    }

    fn add_builtins(&mut self) -> Result<(), RegistryError> {
        let lease = crate::resource::schema::schema_for::<Lease>();
        self.insert(ResourceType {
            group: "coordination.k8s.io".into(),
            version: "v1".into(),
            kind: "Lease".into(),
            plural: "leases".into(),
            singular: "lease".into(),
            namespaced: true,
            short_names: vec![],
            categories: vec![],
            structural: Structural::compile(&lease).map_err(|reason| RegistryError::BadSchema {
                kind: "Lease".into(),
                reason,
            })?,
            schema: lease,
            printer_columns: vec![PrinterColumn {
                name: "Holder".into(),
                type_: "string".into(),
                format: None,
                description: "The current holder of the lease".into(),
                priority: 0,
                json_path: ".spec.holderIdentity".into(),
            }],
            selectable_fields: vec![],
            status_subresource: false,
            tracks_generation: false,
            view: None,
            strategic_merge: true,
        });
        let event = crate::resource::schema::schema_for::<Event>();
        let col = |name: &str, path: &str, priority| PrinterColumn {
            name: name.into(),
            type_: "string".into(),
            format: None,
            description: String::new(),
            priority,
            json_path: path.into(),
        };
        self.insert(ResourceType {
            group: String::new(),
            version: "v1".into(),
            kind: "Event".into(),
            plural: "events".into(),
            singular: "event".into(),
            namespaced: true,
            short_names: vec!["ev".into()],
            categories: vec![],
            structural: Structural::compile(&event).map_err(|reason| RegistryError::BadSchema {
                kind: "Event".into(),
                reason,
            })?,
            schema: event,
            printer_columns: vec![
                col("Type", ".type", 0),
                col("Reason", ".reason", 0),
                col("Object", ".involvedObject.name", 0),
                col("Message", ".message", 0),
            ],
            selectable_fields: [
                "involvedObject.kind",
                "involvedObject.namespace",
                "involvedObject.name",
                "involvedObject.uid",
                "involvedObject.apiVersion",
                "involvedObject.resourceVersion",
                "involvedObject.fieldPath",
                "reason",
                "reportingComponent",
                "source",
                "type",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect(),
            status_subresource: false,
            tracks_generation: false,
            view: None,
            strategic_merge: true,
        });
        let events_v1 =
            crate::resource::schema::schema_for::<k8s_openapi::api::events::v1::Event>();
        self.insert(ResourceType {
            group: "events.k8s.io".into(),
            version: "v1".into(),
            kind: "Event".into(),
            plural: "events".into(),
            singular: "event".into(),
            namespaced: true,
            short_names: vec![],
            categories: vec![],
            structural: Structural::compile(&events_v1).map_err(|reason| {
                RegistryError::BadSchema {
                    kind: "Event".into(),
                    reason,
                }
            })?,
            schema: events_v1,
            printer_columns: vec![],
            selectable_fields: vec![],
            status_subresource: false,
            tracks_generation: false,
            view: Some(crate::resource::view::EVENTS),
            strategic_merge: true,
        });
        Ok(())
    }

    fn insert(&mut self, t: ResourceType) {
        let t = Arc::new(t);
        self.by_path.insert(
            (t.group.clone(), t.version.clone(), t.plural.clone()),
            Arc::clone(&t),
        );
        self.types.push(t);
    }

    /// The type served at `/apis/{group}/{version}/{plural}` (group empty for `/api/v1`).
    pub fn get(&self, group: &str, version: &str, plural: &str) -> Option<&Arc<ResourceType>> {
        self.by_path
            .get(&(group.to_string(), version.to_string(), plural.to_string()))
    }

    /// The type of a kind in a group.
    pub fn by_kind(&self, group: &str, kind: &str) -> Option<&Arc<ResourceType>> {
        self.types
            .iter()
            .find(|t| t.group == group && t.kind == kind)
    }

    /// Every served type.
    pub fn all(&self) -> &[Arc<ResourceType>] {
        &self.types
    }

    /// Groups in a stable order (core first), each with its versions.
    pub fn groups(&self) -> Vec<(String, Vec<String>)> {
        let mut out: Vec<(String, Vec<String>)> = Vec::new();
        for t in &self.types {
            match out.iter_mut().find(|(g, _)| *g == t.group) {
                Some((_, vs)) if !vs.contains(&t.version) => vs.push(t.version.clone()),
                Some(_) => {}
                None => out.push((t.group.clone(), vec![t.version.clone()])),
            }
        }
        out.sort_by(|a, b| (!a.0.is_empty(), &a.0).cmp(&(!b.0.is_empty(), &b.0)));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_compiles_and_is_served_once() {
        let r = Registry::stratus().expect("registry builds");
        let server = r
            .get("compute.stratus.dev", "v1", "servers")
            .expect("servers served");
        assert!(server.namespaced && server.status_subresource);
        assert!(server.categories.contains(&"stratus".to_string()));
        assert!(r.get("coordination.k8s.io", "v1", "leases").is_some());
        assert!(r.get("", "v1", "events").is_some());
        let mut seen = std::collections::BTreeSet::new();
        for t in r.all() {
            assert!(
                seen.insert((t.group.clone(), t.plural.clone())),
                "{} served twice",
                t.plural
            );
        }
    }

    #[test]
    fn key_layout_puts_a_kind_and_a_namespace_under_one_prefix() {
        let r = Registry::stratus().expect("registry builds");
        let s = r
            .get("compute.stratus.dev", "v1", "servers")
            .expect("servers");
        assert_eq!(
            s.key("/stratus", Some("demo"), "web"),
            "/stratus/compute.stratus.dev/servers/demo/web"
        );
        assert!(
            s.key("/stratus", Some("demo"), "web")
                .starts_with(&s.key_prefix("/stratus", None))
        );
        let f = r
            .get("compute.stratus.dev", "v1", "flavors")
            .expect("flavors");
        assert_eq!(
            f.key("/stratus", None, "m1.tiny"),
            "/stratus/compute.stratus.dev/flavors/m1.tiny"
        );
    }
}
