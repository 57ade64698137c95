//! The resource verbs: create, get, list, update, patch, delete, deletecollection, over etcd.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::{Map, Value, json};

use futures::StreamExt;
use futures::future::BoxFuture;

use crate::admission::binding::{self, PlacementLocks};
use crate::admission::{Change, Ctx, Held, Subject, Written, lifecycle};
use crate::base::body;
use crate::base::encoded;
use crate::base::error::{ApiError, ApiResult, Cause};
use crate::base::meta::{self, with_rv};
use crate::resource::outcome::{Item, List, Outcome};
use crate::resource::pagination::{self, ListScope, ReadAt};
use crate::resource::registry::{Registry, ResourceType};
use crate::resource::review::{Operation, Policy, Review, names_agree};
use crate::resource::selector::{FieldSelector, LabelSelector};
use crate::resource::table::{self, Rendering};
use crate::storage::cache::{Object, Page};
use crate::storage::kv::KeyValue;
use crate::storage::store::{Guard, Store, StoreError, Stored, Write};

/// How many times a patch or delete is retried when a concurrent writer got there first.
const WRITE_RETRIES: usize = 8;

/// How long a LIST waits for the watch cache (to be built, or to catch up with etcd) before it
/// reads etcd instead.
const CACHE_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

/// Objects per page of a streamed answer from the watch cache.
const CACHE_PAGE: usize = 500;

/// The most operations a JSON patch may hold (kube-apiserver's limit).
pub const MAX_JSON_PATCH_OPERATIONS: usize = 10_000;

/// The largest object stored, JSON-encoded: etcd's default request limit, which is what
/// bounds a Kubernetes object. A patch or apply whose result is larger is refused (a JSON
/// patch as soon as one operation makes it so, before the next runs).
pub const MAX_OBJECT_BYTES: usize = 3 * 512 * 1024;

/// What the server does with fields the schema does not declare (`fieldValidation`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldValidation {
    /// Refuse the request (400) naming every unknown or duplicate field. The default.
    Strict,
    /// Drop them and say so in `Warning` headers.
    Warn,
    /// Drop them silently.
    Ignore,
}

/// The query parameters of a request.
#[derive(Debug, Default, Clone)]
pub struct Params(BTreeMap<String, String>);

impl Params {
    /// Parses a query string.
    pub fn parse(query: Option<&str>) -> ApiResult<Self> {
        let pairs: Vec<(String, String)> = serde_urlencoded::from_str(query.unwrap_or(""))
            .map_err(|e| ApiError::bad_request(format!("invalid query string: {e}")))?;
        Ok(Self(pairs.into_iter().collect()))
    }

    /// A parameter's value.
    pub fn get(&self, k: &str) -> Option<&str> {
        self.0.get(k).map(String::as_str).filter(|v| !v.is_empty())
    }

    /// A boolean parameter, read as Go's `strconv.ParseBool` reads it (clients send `true`,
    /// `True` or `1`).
    pub fn flag(&self, k: &str) -> bool {
        matches!(
            self.get(k),
            Some("1" | "t" | "T" | "true" | "TRUE" | "True")
        )
    }

    /// The same parameters with every field of the field selector renamed by `f`.
    pub fn map_field_selector(&self, f: impl Fn(&str) -> String) -> Self {
        let mut out = self.clone();
        if let Some(sel) = self.get("fieldSelector") {
            let mapped: Vec<String> = sel
                .split(',')
                .map(|part| {
                    let (field, rest) = match part.find(['=', '!']) {
                        Some(i) => part.split_at(i),
                        None => (part, ""),
                    };
                    format!("{}{rest}", f(field.trim()))
                })
                .collect();
            out.0.insert("fieldSelector".into(), mapped.join(","));
        }
        out
    }

    /// Drops `limit` and `continue` (for reads that need every object).
    pub fn remove_paging(&mut self) {
        self.0.remove("limit");
        self.0.remove("continue");
    }

    /// The parameters of a watch's initial state: every object (no paging), at least as new
    /// as the watch's `resourceVersion` (a watch-list names `resourceVersionMatch=NotOlderThan`
    /// with or without one, as Kubernetes' does; unset is the most recent state).
    pub fn for_initial_state(&self) -> Self {
        let mut p = self.clone();
        p.remove_paging();
        p.0.remove("resourceVersionMatch");
        p
    }

    fn dry_run(&self) -> ApiResult<bool> {
        match self.get("dryRun") {
            None => Ok(false),
            Some("All") => Ok(true),
            Some(other) => Err(ApiError::bad_request(format!(
                "unsupported dryRun value \"{other}\": only \"All\" is supported"
            ))),
        }
    }

    fn field_validation(&self) -> ApiResult<FieldValidation> {
        match self.get("fieldValidation") {
            None | Some("Strict") => Ok(FieldValidation::Strict),
            Some("Warn") => Ok(FieldValidation::Warn),
            Some("Ignore") => Ok(FieldValidation::Ignore),
            Some(other) => Err(ApiError::bad_request(format!(
                "fieldValidation: invalid value \"{other}\": must be one of Strict, Warn, Ignore"
            ))),
        }
    }

    fn int(&self, k: &str) -> ApiResult<Option<i64>> {
        self.get(k)
            .map(|v| {
                v.parse::<i64>().map_err(|_| {
                    ApiError::bad_request(format!("{k}: invalid value \"{v}\": must be an integer"))
                })
            })
            .transpose()
    }
}

/// Which object a request addresses.
#[derive(Debug, Clone)]
pub struct Target {
    /// The resource type.
    pub rt: Arc<ResourceType>,
    /// Namespace from the path (None: cluster-scoped or all namespaces).
    pub namespace: Option<String>,
    /// Object name from the path.
    pub name: Option<String>,
    /// `status`, when the path ends in `/status`.
    pub subresource: Option<String>,
}

impl Target {
    pub(crate) fn key(&self, api: &Api) -> String {
        self.rt.key(
            &api.prefix,
            self.namespace.as_deref(),
            self.name.as_deref().unwrap_or_default(),
        )
    }

    pub(crate) fn name(&self) -> &str {
        self.name.as_deref().unwrap_or_default()
    }

    pub(crate) fn not_found(&self) -> ApiError {
        self.subject().not_found()
    }

    pub(crate) fn conflict(&self) -> ApiError {
        self.subject().conflict()
    }

    /// The object as admission sees it.
    pub fn subject(&self) -> Subject<'_> {
        Subject {
            group: &self.rt.group,
            kind: &self.rt.kind,
            plural: &self.rt.plural,
            namespaced: self.rt.namespaced,
            namespace: self.namespace.as_deref(),
            name: self.name(),
        }
    }
}

/// The API over one etcd.
#[derive(Debug, Clone)]
pub struct Api {
    /// The store.
    pub store: Store,
    /// Served types.
    pub registry: Arc<Registry>,
    /// Key prefix of every object in etcd.
    pub prefix: String,
    /// Shared watch feeds.
    pub hub: Arc<crate::storage::hub::Hub>,
    /// Placements onto one hypervisor, one at a time in this process.
    pub(crate) placement_locks: Arc<PlacementLocks>,
    /// Per system namespace, the uid and creation time it is shown with (see
    /// [`load_system_namespaces`]).
    pub system_namespaces: Arc<Value>,
    /// The networks a StoragePool's storage address may be in (`--storage-cidr`).
    pub storage_ranges: Arc<[crate::admission::pools::StorageCidr]>,
}

/// Which state a LIST shows (see [`ReadAt::parse`]).
fn read_at(p: &Params, limit: i64) -> ApiResult<ReadAt> {
    ReadAt::parse(
        p.get("resourceVersion"),
        p.get("resourceVersionMatch"),
        p.get("continue").is_some(),
        limit,
    )
}

fn parse_rv(rv: &str) -> ApiResult<i64> {
    rv.parse::<i64>().ok().filter(|r| *r >= 0).ok_or_else(|| {
        ApiError::bad_request(format!(
            "invalid resourceVersion \"{rv}\": must be a non-negative integer"
        ))
    })
}

/// The selectors of a list, watch or deletecollection.
#[derive(Debug, Clone, Default)]
pub struct Selectors {
    /// `labelSelector`.
    pub labels: LabelSelector,
    /// `fieldSelector`.
    pub fields: FieldSelector,
}

impl Selectors {
    /// Reads the selectors from the query.
    pub fn parse(rt: &ResourceType, p: &Params) -> ApiResult<Self> {
        Ok(Self {
            labels: LabelSelector::parse(p.get("labelSelector").unwrap_or(""))?,
            fields: FieldSelector::parse(
                p.get("fieldSelector").unwrap_or(""),
                |f| rt.field_selectable(f),
                &rt.kind,
            )?,
        })
    }

    /// Whether an object is selected.
    pub fn matches(&self, obj: &Value) -> bool {
        self.labels.matches(obj) && self.fields.matches(obj)
    }

    /// Whether an object of the watch cache is selected.
    pub fn matches_cached(&self, o: Object<'_>) -> bool {
        self.labels.matches_labels(|k| o.label(k)) && self.fields.matches_fields(|f| o.field(f))
    }

    /// Whether it selects everything.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty() && self.fields.is_empty()
    }
}

/// The fields of `rt` a field selector may name: what its watch cache keeps of each object.
fn selectable_fields(rt: &ResourceType) -> Vec<String> {
    let mut fields = vec!["metadata.name".to_string()];
    if rt.namespaced {
        fields.push("metadata.namespace".into());
    }
    fields.extend(
        rt.selectable_fields
            .iter()
            .map(|f| f.trim_start_matches('.').to_string()),
    );
    fields
}

impl Api {
    /// The API over `store`, for objects under `prefix`, with watch feeds reporting progress
    /// every `progress_every`; the system namespaces are read from the store (or made there,
    /// by the first API server on it).
    ///
    /// # Errors
    /// When the store cannot be reached.
    pub async fn open(
        store: Store,
        registry: Arc<Registry>,
        prefix: &str,
        progress_every: std::time::Duration,
    ) -> Result<Self, StoreError> {
        let hub = Arc::new(crate::storage::hub::Hub::new(store.clone(), progress_every));
        let system_namespaces = Arc::new(load_system_namespaces(&store, prefix).await?);
        Ok(Self {
            store,
            registry,
            prefix: prefix.to_string(),
            hub,
            placement_locks: Arc::default(),
            system_namespaces,
            storage_ranges: crate::admission::pools::StorageCidr::private().into(),
        })
    }

    /// The API with `ranges` as the networks storage addresses may be in.
    #[must_use]
    pub fn with_storage_ranges(
        mut self,
        ranges: Vec<crate::admission::pools::StorageCidr>,
    ) -> Self {
        self.storage_ranges = ranges.into();
        self
    }

    fn ctx(&self) -> Ctx<'_> {
        Ctx {
            store: &self.store,
            prefix: &self.prefix,
            storage_ranges: &self.storage_ranges,
        }
    }

    /// The write an admission of the type makes itself, if one checks this write.
    fn admitted_write<'a>(
        &'a self,
        t: &'a Target,
        w: Change<'a>,
    ) -> Option<BoxFuture<'a, ApiResult<Written>>> {
        t.rt.admission()
            .iter()
            .find_map(|a| a.write(self.ctx(), t.subject(), w))
    }

    /// Keys an object holds outside its own, deleted in the same transaction as the object.
    pub(crate) fn attached_keys(&self, rt: &ResourceType, obj: &Value) -> Vec<String> {
        rt.admission()
            .iter()
            .flat_map(|a| a.attached_keys(&self.prefix, obj))
            .collect()
    }

    /// What the type's admissions hold a delete of `obj` to (see
    /// [`Admission::check_delete`](crate::admission::Admission::check_delete)).
    async fn delete_held(&self, t: &Target, obj: &Value) -> ApiResult<Vec<Held>> {
        let mut held = Vec::new();
        for a in t.rt.admission() {
            if let Some(check) = a.check_delete(self.ctx(), t.subject(), obj) {
                held.extend(check.await?);
            }
        }
        Ok(held)
    }

    /// Writes a delete (`put`: the object with its `deletionTimestamp`; `None`: the object
    /// and `attached` go) of the object at `key` as read at `rev`, with nothing under what
    /// its checks read (`held`) changed since.
    async fn write_delete(
        &self,
        key: &str,
        rev: i64,
        put: Option<&Value>,
        attached: &[String],
        held: &[Held],
    ) -> ApiResult<Write> {
        let mut guards = vec![Guard::Revision(key, rev)];
        guards.extend(held.iter().map(|h| Guard::Unchanged(&h.prefix, h.revision)));
        let puts: Vec<(&str, &Value)> = put.map(|v| (key, v)).into_iter().collect();
        let deletes: Vec<&str> = match put {
            Some(_) => Vec::new(),
            None => std::iter::once(key)
                .chain(attached.iter().map(String::as_str))
                .collect(),
        };
        let done = self
            .store
            .write_many(&guards, &puts, &deletes)
            .await
            .map_err(ApiError::from)?;
        Ok(done.map_or(Write::Conflict(0), Write::Done))
    }

    /// `POST servers/{name}/binding`: see [`binding::bind`].
    ///
    /// # Errors
    /// As [`binding::bind`].
    /// The Binding's own name and namespace, when it gives them, must be the Server's; the
    /// policy sees the Server and the Binding first.
    pub async fn bind(
        &self,
        t: &Target,
        bytes: &[u8],
        content_type: &str,
        policy: &dyn Policy,
    ) -> ApiResult<Outcome> {
        let binding = body::decode(bytes, body::is_yaml(content_type))?.value;
        names_agree(&binding, t.namespace.as_deref(), t.name.as_deref())?;
        let server = self.read(t).await?;
        policy.review(&Review {
            operation: Operation::Connect,
            target: t,
            old: Some(&server.value),
            new: None,
            options: Some(&binding),
        })?;
        let (ctx, s, locks) = (self.ctx(), t.subject(), &self.placement_locks);
        let code = if crate::admission::storage::is_volume(&t.rt.group, &t.rt.kind) {
            crate::admission::storage::bind(ctx, &s, locks, bytes, content_type).await?
        } else {
            binding::bind(ctx, &s, locks, bytes, content_type).await?
        };
        Ok(Outcome::done(code))
    }

    /// `DELETE servers/{name}/binding`: see [`binding::unbind`].
    ///
    /// # Errors
    /// As [`binding::unbind`].
    pub async fn unbind(&self, t: &Target, policy: &dyn Policy) -> ApiResult<Outcome> {
        if !binding::is_server(&t.rt.group, &t.rt.kind) {
            return Err(ApiError::method_not_allowed(format!(
                "DELETE is not allowed on {}/binding: a placed volume stays where its data is",
                t.rt.plural
            )));
        }
        let server = self.read(t).await?;
        policy.review(&Review {
            operation: Operation::Connect,
            target: t,
            old: Some(&server.value),
            new: None,
            options: None,
        })?;
        let code = binding::unbind(self.ctx(), &t.subject()).await?;
        Ok(Outcome::done(code))
    }
}

/// What a write-side admission produced besides the object.
struct Admitted {
    warnings: Vec<String>,
}

impl Api {
    /// Decodes a body, applying `fieldValidation` to duplicate fields.
    fn decode(
        &self,
        bytes: &[u8],
        content_type: &str,
        fv: FieldValidation,
    ) -> ApiResult<(Value, Vec<String>)> {
        let d = body::decode(bytes, body::is_yaml(content_type))?;
        if !d.value.is_object() {
            return Err(ApiError::bad_request(
                "the request body must be a JSON or YAML object",
            ));
        }
        let mut warnings = Vec::new();
        if !d.duplicates.is_empty() {
            match fv {
                FieldValidation::Strict => {
                    let causes: Vec<Cause> = d.duplicates.iter().map(Cause::duplicate).collect();
                    let list: Vec<String> = causes.iter().map(|c| c.message.clone()).collect();
                    return Err(ApiError::bad_request_fields(
                        format!("strict decoding error: {}", list.join(", ")),
                        causes,
                    ));
                }
                FieldValidation::Warn => warnings.extend(
                    d.duplicates
                        .iter()
                        .map(|f| format!("duplicate field \"{f}\"")),
                ),
                FieldValidation::Ignore => {}
            }
        }
        Ok((d.value, warnings))
    }

    /// Checks `apiVersion` and `kind` of a body against the path.
    fn check_type(&self, rt: &ResourceType, obj: &Value) -> ApiResult<()> {
        let api_version = obj
            .get("apiVersion")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let kind = obj.get("kind").and_then(Value::as_str).unwrap_or_default();
        if kind.is_empty() {
            return Err(ApiError::bad_request(
                "Object 'Kind' is missing in the request body",
            ));
        }
        if api_version.is_empty() {
            return Err(ApiError::bad_request(
                "Object 'apiVersion' is missing in the request body",
            ));
        }
        if kind != rt.kind || api_version != rt.api_version() {
            return Err(ApiError::bad_request(format!(
                "the API version in the data ({api_version}) and kind ({kind}) do not match the resource {}/{} ({}) of the request",
                rt.api_version(),
                rt.plural,
                rt.kind
            )));
        }
        Ok(())
    }

    /// Prunes, defaults and validates an object about to be stored.
    fn admit(&self, t: &Target, obj: &mut Value, fv: FieldValidation) -> ApiResult<Admitted> {
        let rt = &t.rt;
        let mut warnings = Vec::new();
        let unknown = rt.structural.prune_and_default(obj);
        if !unknown.is_empty() {
            match fv {
                FieldValidation::Strict => {
                    let causes: Vec<Cause> = unknown.iter().map(Cause::unknown).collect();
                    let list: Vec<String> = causes.iter().map(|c| c.message.clone()).collect();
                    return Err(ApiError::bad_request_fields(
                        format!(
                            "{} in version \"{}\" cannot be handled as a {}: strict decoding error: {}",
                            rt.kind,
                            rt.version,
                            rt.kind,
                            list.join(", ")
                        ),
                        causes,
                    ));
                }
                FieldValidation::Warn => {
                    warnings.extend(unknown.iter().map(|f| format!("unknown field \"{f}\"")))
                }
                FieldValidation::Ignore => {}
            }
        }
        let mut causes = meta::validate(obj.get("metadata").unwrap_or(&Value::Null), rt.namespaced);
        causes.extend(rt.structural.validate(obj));
        if causes.is_empty()
            && rt.group.ends_with(".stratus.dev")
            && let Err(errs) = stratus_api_types::validate::validate(&rt.group, &rt.kind, obj)
        {
            causes.extend(
                errs.into_iter()
                    .map(|e| Cause::invalid(e.field.clone(), e.to_string())),
            );
        }
        if !causes.is_empty() {
            return Err(ApiError::invalid(
                &rt.kind,
                &rt.group,
                &rt.plural,
                meta::meta_str(obj, "name").unwrap_or_default(),
                causes,
            ));
        }
        Ok(Admitted { warnings })
    }

    /// `POST` a new object.
    pub async fn create(
        &self,
        t: &Target,
        bytes: &[u8],
        content_type: &str,
        p: &Params,
        user_agent: &str,
        policy: &dyn Policy,
    ) -> ApiResult<Outcome> {
        let fv = p.field_validation()?;
        let (obj, warnings) = self.decode(bytes, content_type, fv)?;
        self.check_type(&t.rt, &obj)?;
        self.create_object(
            t,
            obj,
            warnings,
            p,
            Some(self.manager(p, user_agent)),
            policy,
        )
        .await
    }

    /// Creates a decoded object. `manager` records an Update entry in managedFields; `None`
    /// keeps the entries the object carries (server-side apply made them). The object's name
    /// and namespace must be the path's (an apply's path names the object).
    async fn create_object(
        &self,
        t: &Target,
        mut obj: Value,
        mut warnings: Vec<String>,
        p: &Params,
        manager: Option<String>,
        policy: &dyn Policy,
    ) -> ApiResult<Outcome> {
        let fv = p.field_validation()?;
        let dry_run = p.dry_run()?;
        let namespace = t.namespace.clone();
        names_agree(&obj, namespace.as_deref(), t.name.as_deref())?;
        {
            let m = meta::meta_mut(&mut obj);
            if let Some(name) = &t.name {
                m.insert("name".into(), Value::String(name.clone()));
            }
            match &namespace {
                Some(ns) if t.rt.namespaced => {
                    m.insert("namespace".into(), Value::String(ns.clone()));
                }
                _ => {
                    m.remove("namespace");
                }
            }
            if m.get("resourceVersion")
                .and_then(Value::as_str)
                .is_some_and(|s| !s.is_empty())
            {
                return Err(ApiError::invalid(
                    &t.rt.kind,
                    &t.rt.group,
                    &t.rt.plural,
                    m.get("name").and_then(Value::as_str).unwrap_or_default(),
                    vec![Cause::invalid(
                        "metadata.resourceVersion",
                        "must be empty on create",
                    )],
                ));
            }
            let name = m
                .get("name")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string();
            if name.is_empty() {
                match m.get("generateName").and_then(Value::as_str) {
                    Some(prefix) if !prefix.is_empty() => {
                        m.insert("name".into(), json!(meta::generate_name(prefix)));
                    }
                    _ => {
                        return Err(ApiError::invalid(
                            &t.rt.kind,
                            &t.rt.group,
                            &t.rt.plural,
                            "",
                            vec![Cause {
                                reason: "FieldValueRequired".into(),
                                message: "Required value: name or generateName is required".into(),
                                field: "metadata.name".into(),
                            }],
                        ));
                    }
                }
            }
            for f in [
                "uid",
                "creationTimestamp",
                "deletionTimestamp",
                "deletionGracePeriodSeconds",
                "generation",
                "selfLink",
            ] {
                m.remove(f);
            }
            if manager.is_some() {
                m.remove("managedFields");
            }
            m.insert(
                "uid".into(),
                Value::String(uuid::Uuid::new_v4().to_string()),
            );
            m.insert("creationTimestamp".into(), Value::String(meta::now()));
            if t.rt.tracks_generation {
                m.insert("generation".into(), Value::from(1));
            }
        }
        if t.rt.status_subresource
            && let Some(o) = obj.as_object_mut()
        {
            match t.rt.admission().iter().find_map(|a| a.initial_status()) {
                Some(s) => o.insert("status".into(), s),
                None => o.remove("status"),
            };
        }
        check_size(t, meta::meta_str(&obj, "name").unwrap_or_default(), &obj)?;
        let admitted = self.admit(t, &mut obj, fv)?;
        warnings.extend(admitted.warnings);
        if let Some(manager) = &manager {
            let (manager, rt, sub) = (manager.clone(), Arc::clone(&t.rt), t.subresource.clone());
            obj = off_workers(small(&[&obj]), move || {
                crate::resource::fields::record_update(
                    &mut obj,
                    None,
                    &manager,
                    &rt.api_version(),
                    sub.as_deref(),
                    rt.structural.shape(),
                );
                obj
            })
            .await?;
        }
        for a in t.rt.admission() {
            a.on_create(&mut obj);
        }
        let name = meta::meta_str(&obj, "name").unwrap_or_default().to_string();
        // What is stored carries its managedFields (and what admission set): that is the
        // size that counts.
        check_size(t, &name, &obj)?;
        policy.review(&Review {
            operation: Operation::Create,
            target: t,
            old: None,
            new: Some(&obj),
            options: None,
        })?;
        let project = namespace
            .as_deref()
            .filter(|_| t.rt.namespaced)
            .and_then(|ns| Some((ns, self.project_key(ns)?)));
        if dry_run {
            // Refused as the create would be.
            if let Some((ns, pk)) = &project {
                let state = self.project_state(ns, pk, false).await?;
                lifecycle::admit_create(&t.subject(), &name, ns, state)?;
            }
            return Ok(Outcome::json(201, obj, warnings));
        }
        let key = t.rt.key(&self.prefix, namespace.as_deref(), &name);
        // The first check may read the watch cache; once the Project is found changed since,
        // etcd.
        let mut fresh = false;
        for _ in 0..WRITE_RETRIES {
            let parent = match &project {
                Some((ns, pk)) => {
                    let state = self.project_state(ns, pk, fresh).await?;
                    let rev = lifecycle::admit_create(&t.subject(), &name, ns, state)?;
                    Some((pk.as_str(), rev))
                }
                None => None,
            };
            let change = Change {
                key: &key,
                old: None,
                new: &obj,
                parent,
            };
            let written = match self.admitted_write(t, change) {
                Some(write) => write.await?,
                None => self
                    .store
                    .create_under(&key, &obj, parent)
                    .await
                    .map_err(ApiError::from)?
                    .into(),
            };
            match written.write {
                Write::Done(rev) => {
                    // The object as stored, with what admission allocated (a Port's addresses).
                    let obj = written.stored.unwrap_or(obj);
                    return Ok(Outcome::json(201, with_rv(obj, rev), warnings));
                }
                // The object is absent, so what failed is its namespace's Project: changed
                // (its deletion begun, or only its status) or gone since it was checked.
                Write::Conflict(0) if parent.is_some() => fresh = true,
                Write::Conflict(_) => {
                    return Err(ApiError::already_exists(&t.rt.group, &t.rt.plural, &name));
                }
            }
        }
        Err(ApiError::conflict(
            &t.rt.group,
            &t.rt.plural,
            &name,
            "the namespace's Project kept changing while the object was created; retry",
        ))
    }

    /// The Project `key` of namespace `ns` as a create finds it: from the watch cache when it
    /// holds the Project active (the create's transaction then proves it still is, see
    /// [`lifecycle`]), else, or when `fresh`, from etcd (so a cache that is behind refuses
    /// nothing, and a retry after a failed transaction reads what made it fail).
    async fn project_state(
        &self,
        ns: &str,
        key: &str,
        fresh: bool,
    ) -> ApiResult<lifecycle::ProjectState> {
        if !fresh
            && let Some(rt) = self.registry.by_kind("identity.stratus.dev", "Project")
            && let Some(cache) = self
                .hub
                .cache(&rt.key_prefix(&self.prefix, None), &selectable_fields(rt))
            && let Some(page) = cache.page(key, None, 1, None, |_| true)
            && let Some((rev, stored)) = page.items.first()
            && let Some(state @ lifecycle::ProjectState::Active(_)) =
                lifecycle::ProjectState::of_stored(ns, *rev, stored)
        {
            return Ok(state);
        }
        let stored = self.store.get(key).await.map_err(ApiError::from)?;
        Ok(lifecycle::ProjectState::of_value(
            stored.as_ref().map(|s| (s.mod_revision, &s.value)),
        ))
    }

    fn manager(&self, p: &Params, user_agent: &str) -> String {
        p.get("fieldManager").map(String::from).unwrap_or_else(|| {
            user_agent
                .split('/')
                .next()
                .unwrap_or("unknown")
                .to_string()
        })
    }

    /// Reads one object.
    pub async fn read(&self, t: &Target) -> ApiResult<Stored> {
        self.store
            .get(&t.key(self))
            .await
            .map_err(ApiError::from)?
            .ok_or_else(|| t.not_found())
    }

    /// `GET` one object; `read` is the object when the caller has just read it.
    pub async fn get(
        &self,
        t: &Target,
        rendering: Rendering,
        p: &Params,
        read: Option<Stored>,
    ) -> ApiResult<Outcome> {
        let s = match read {
            Some(s) => s,
            None => self.read(t).await?,
        };
        let obj = with_rv(s.value, s.mod_revision);
        let out = match rendering {
            Rendering::Full => obj,
            Rendering::Metadata => table::partial(&obj),
            Rendering::Table => table::table(
                &t.rt,
                &[obj],
                json!({"resourceVersion": s.mod_revision.to_string()}),
                p.get("includeObject").unwrap_or("Metadata"),
                true,
            ),
        };
        Ok(Outcome::json(200, out, Vec::new()))
    }

    /// Lists objects matching the selectors; pages with `limit`/`continue`. Returns the items,
    /// the revision they were read at and the continue token.
    pub async fn list_items(
        &self,
        t: &Target,
        p: &Params,
    ) -> ApiResult<(Vec<Value>, i64, Option<String>)> {
        let sel = Selectors::parse(&t.rt, p)?;
        let prefix = t.rt.key_prefix(&self.prefix, t.namespace.as_deref());
        let limit = p.int("limit")?.unwrap_or(0).max(0);
        let read = read_at(p, limit)?;
        let scope = ListScope::new(&prefix, p.get("labelSelector"), p.get("fieldSelector"));
        let (start, mut revision) = match p.get("continue") {
            Some(tok) => {
                let c = pagination::decode(tok, &scope)?;
                // The token is the client's to forge: its revision is no older than the
                // namespace's Project, as for an Exact LIST.
                self.check_epoch(t, c.rv).await?;
                (Some(c.start), c.rv)
            }
            None => (None, read.etcd_revision()),
        };
        if let Some(name) = sel.fields.pinned_name()
            && start.is_none()
            && (t.namespace.is_some() || !t.rt.namespaced)
        {
            let key = format!("{prefix}{name}");
            let page = self
                .store
                .list(&key, None, revision, 1)
                .await
                .map_err(|e| list_error(e, false, read))?;
            read.check(page.revision)?;
            let items = page
                .items
                .into_iter()
                .filter(|(k, s)| *k == key && sel.matches(&s.value))
                .map(|(_, s)| with_rv(s.value, s.mod_revision))
                .collect();
            return Ok((items, page.revision, None));
        }
        let has_token = p.get("continue").is_some();
        let mut scan = self.store.scan(&prefix, start.as_deref(), revision, 0);
        if limit > 0 {
            scan = scan.paced(limit);
        }
        let mut items = Vec::new();
        let mut token = None;
        'pages: while let Some(page) = scan
            .next()
            .await
            .map_err(|e| list_error(e, has_token, read))?
        {
            revision = scan.revision();
            let mut rest = page.into_iter();
            while let Some((key, s)) = rest.next() {
                if sel.matches(&s.value) {
                    items.push(with_rv(s.value, s.mod_revision));
                }
                if limit > 0 && items.len() as i64 >= limit {
                    // A token only when something is left after `key` (etcd's `more` is
                    // exact at a fixed revision).
                    if rest.len() > 0 || !scan.done() {
                        token = Some(pagination::encode(&scope, &format!("{key}\0"), revision));
                    }
                    break 'pages;
                }
            }
        }
        if revision == 0 {
            revision = scan.revision();
        }
        read.check(revision)?;
        Ok((items, revision, token))
    }

    /// `GET` a collection. Without `limit`, the collection is read from etcd in pages at the
    /// first page's revision and answered as the pages are read ([`Outcome::List`]), so no
    /// size of collection makes the server hold it whole; with `limit`, the page asked for is
    /// answered as one document.
    pub async fn list(&self, t: &Target, rendering: Rendering, p: &Params) -> ApiResult<Outcome> {
        let sel = Selectors::parse(&t.rt, p)?;
        let limit = p.int("limit")?.unwrap_or(0).max(0);
        if let ReadAt::Exact(n) = read_at(p, limit)? {
            self.check_epoch(t, n).await?;
        }
        let pinned = sel.fields.pinned_name().is_some()
            && p.get("continue").is_none()
            && (t.namespace.is_some() || !t.rt.namespaced);
        let include = p.get("includeObject").unwrap_or("Metadata");
        if !pinned && let Some((page, token)) = self.list_cached(t, p, &sel, limit, false).await? {
            let mut list_meta = json!({"resourceVersion": page.revision.to_string()});
            if let Some(tok) = &token {
                list_meta["continue"] = json!(tok);
            }
            return Ok(cached_list(t, rendering, include, list_meta, page));
        }
        if limit == 0 && !pinned {
            return self.list_streamed(t, rendering, p, sel).await;
        }
        let (items, revision, token) = self.list_items(t, p).await?;
        let mut list_meta = json!({"resourceVersion": revision.to_string()});
        if let Some(tok) = &token {
            list_meta["continue"] = json!(tok);
        }
        let mut doc = list_head(t, rendering, list_meta);
        let (field, items) = render_items(&t.rt, rendering, include, items);
        doc.insert(field.to_string(), Value::Array(items));
        Ok(Outcome::json(200, Value::Object(doc), Vec::new()))
    }

    /// The page a LIST asks for, from the watch cache, for a LIST with `resourceVersion=0`
    /// (any state the cache has) or with a selector (consistent: the state at etcd's current
    /// revision or later, waited for) or, with `always`, any LIST (a watch's initial state),
    /// and its continue token. `None` when the cache cannot
    /// answer (not built yet, behind etcd for longer than [`CACHE_WAIT`], or a continued list
    /// whose revision it cannot show): etcd is read instead.
    ///
    /// # Errors
    /// 400 for a malformed continue token; when etcd's revision cannot be read.
    pub async fn list_cached(
        &self,
        t: &Target,
        p: &Params,
        sel: &Selectors,
        limit: i64,
        always: bool,
    ) -> ApiResult<Option<(Page, Option<String>)>> {
        let read = read_at(p, limit)?;
        let any = read == ReadAt::Any;
        let not_older_than = match read {
            // An exact revision is etcd's to show.
            ReadAt::Exact(_) => return Ok(None),
            ReadAt::NotOlderThan(n) => Some(n),
            ReadAt::MostRecent | ReadAt::Any => None,
        };
        if !any && not_older_than.is_none() && sel.is_empty() && !always {
            return Ok(None);
        }
        let prefix = t.rt.key_prefix(&self.prefix, t.namespace.as_deref());
        let scope = ListScope::new(&prefix, p.get("labelSelector"), p.get("fieldSelector"));
        let cont = p
            .get("continue")
            .map(|tok| pagination::decode(tok, &scope))
            .transpose()?;
        if let Some(c) = &cont {
            self.check_epoch(t, c.rv).await?;
        }
        let type_prefix = t.rt.key_prefix(&self.prefix, None);
        let Some(cache) = self.hub.cache(&type_prefix, &selectable_fields(&t.rt)) else {
            return Ok(None);
        };
        // A continued list shows its token's revision (checked by `page`); a consistent one
        // what etcd holds now or later.
        let min = match not_older_than {
            _ if any || cont.is_some() => 0,
            Some(n) => n,
            None => self.store.revision().await.map_err(ApiError::from)?,
        };
        if !cache.wait(&self.hub, min, CACHE_WAIT).await {
            return Ok(None);
        }
        let limit = usize::try_from(limit).unwrap_or(0);
        let page = cache.page(
            &prefix,
            cont.as_ref().map(|c| c.start.as_str()),
            limit,
            cont.as_ref().map(|c| c.rv),
            |o| sel.matches_cached(o),
        );
        Ok(page.map(|page| {
            let token = page
                .last_key
                .as_ref()
                .map(|k| pagination::encode(&scope, &format!("{k}\0"), page.revision));
            (page, token)
        }))
    }

    /// An unpaged `GET` of a collection: the first page is read before answering (so a bad
    /// token or a compacted revision is a status), the rest as the client reads the answer.
    async fn list_streamed(
        &self,
        t: &Target,
        rendering: Rendering,
        p: &Params,
        sel: Selectors,
    ) -> ApiResult<Outcome> {
        let prefix = t.rt.key_prefix(&self.prefix, t.namespace.as_deref());
        let scope = ListScope::new(&prefix, p.get("labelSelector"), p.get("fieldSelector"));
        let read = read_at(p, 0)?;
        let (start, revision) = match p.get("continue") {
            Some(tok) => {
                let c = pagination::decode(tok, &scope)?;
                // The token is the client's to forge: its revision is no older than the
                // namespace's Project, as for an Exact LIST.
                self.check_epoch(t, c.rv).await?;
                (Some(c.start), c.rv)
            }
            None => (None, read.etcd_revision()),
        };
        let has_token = start.is_some();
        let mut scan = self.store.scan(&prefix, start.as_deref(), revision, 0);
        let first = scan
            .next_raw()
            .await
            .map_err(|e| list_error(e, has_token, read))?;
        read.check(scan.revision())?;
        let head = list_head(
            t,
            rendering,
            json!({"resourceVersion": scan.revision().to_string()}),
        );
        let rt = Arc::clone(&t.rt);
        let include = p.get("includeObject").unwrap_or("Metadata").to_string();
        let (field, _) = render_items(&rt, rendering, &include, Vec::new());
        let rest = futures::stream::try_unfold(scan, |mut scan| async move {
            let page = scan.next_raw().await.map_err(ApiError::from)?;
            Ok::<_, ApiError>(page.map(|p| (p, scan)))
        });
        let pages = futures::stream::iter(first.map(Ok))
            .chain(rest)
            .map(move |page: ApiResult<Vec<KeyValue>>| {
                list_page(&rt, rendering, &include, &sel, page?)
            })
            .boxed();
        Ok(Outcome::List(List { head, field, pages }))
    }

    /// `PUT` an object (or its status).
    pub async fn update(
        &self,
        t: &Target,
        bytes: &[u8],
        content_type: &str,
        p: &Params,
        user_agent: &str,
        policy: &dyn Policy,
    ) -> ApiResult<Outcome> {
        let fv = p.field_validation()?;
        let (obj, warnings) = self.decode(bytes, content_type, fv)?;
        self.check_type(&t.rt, &obj)?;
        names_agree(&obj, t.namespace.as_deref(), t.name.as_deref())?;
        let rv = match meta::meta_str(&obj, "resourceVersion") {
            Some(rv) if !rv.is_empty() => parse_rv(rv)?,
            _ => {
                return Err(ApiError::invalid(
                    &t.rt.kind,
                    &t.rt.group,
                    &t.rt.plural,
                    t.name(),
                    vec![Cause::invalid(
                        "metadata.resourceVersion",
                        "Invalid value: 0x0: must be specified for an update",
                    )],
                ));
            }
        };
        let current = self.read(t).await?;
        if current.mod_revision != rv {
            return Err(t.conflict());
        }
        self.write_update(
            t,
            current,
            obj,
            p,
            Some(self.manager(p, user_agent)),
            warnings,
            policy,
        )
        .await
    }

    /// Stores `incoming` as the new state of `current`: keeps what the client may not change,
    /// bumps generation, deletes the object when its last finalizer is gone. The policy sees
    /// the stored object and the one about to replace it.
    #[allow(clippy::too_many_arguments)]
    async fn write_update(
        &self,
        t: &Target,
        mut current: Stored,
        mut incoming: Value,
        p: &Params,
        manager: Option<String>,
        mut warnings: Vec<String>,
        policy: &dyn Policy,
    ) -> ApiResult<Outcome> {
        let fv = p.field_validation()?;
        let dry_run = p.dry_run()?;
        names_agree(&incoming, t.namespace.as_deref(), t.name.as_deref())?;
        let old = &current.value;
        let status_write = t.subresource.as_deref() == Some("status");
        let mut new = if status_write {
            let mut n = old.clone();
            match incoming.get("status") {
                Some(s) => n["status"] = s.clone(),
                None => {
                    if let Some(o) = n.as_object_mut() {
                        o.remove("status");
                    }
                }
            }
            // An apply (no manager: it recorded its own fields) keeps its ownership.
            if manager.is_none()
                && let Some(mf) = incoming.pointer("/metadata/managedFields")
            {
                meta::meta_mut(&mut n).insert("managedFields".into(), mf.clone());
            }
            n
        } else {
            if t.rt.status_subresource {
                match old.get("status") {
                    Some(s) => incoming["status"] = s.clone(),
                    None => {
                        if let Some(o) = incoming.as_object_mut() {
                            o.remove("status");
                        }
                    }
                }
            }
            // System fields are the server's; the client's copies are ignored.
            {
                let m = meta::meta_mut(&mut incoming);
                m.insert("name".into(), json!(t.name()));
                for f in [
                    "uid",
                    "creationTimestamp",
                    "deletionTimestamp",
                    "deletionGracePeriodSeconds",
                    "generation",
                    "namespace",
                ] {
                    match old.pointer(&format!("/metadata/{f}")) {
                        Some(v) => m.insert(f.into(), v.clone()),
                        None => m.remove(f),
                    };
                }
                m.remove("selfLink");
                // A node's copy is not its to write (an apply's are the server's own).
                if manager.is_some() && policy.keeps_managed_fields() {
                    m.remove("managedFields");
                }
                if !m.contains_key("managedFields")
                    && let Some(mf) = old.pointer("/metadata/managedFields")
                {
                    m.insert("managedFields".into(), mf.clone());
                }
            }
            incoming
        };
        meta::meta_mut(&mut new).remove("resourceVersion");
        check_size(t, t.name(), &new)?;
        let admitted = self.admit(t, &mut new, fv)?;
        warnings.extend(admitted.warnings);

        let deleting = old.pointer("/metadata/deletionTimestamp").is_some();
        if deleting {
            let before = meta::finalizers(old);
            let added: Vec<String> = meta::finalizers(&new)
                .into_iter()
                .filter(|f| !before.contains(f))
                .collect();
            if !added.is_empty() {
                return Err(ApiError::invalid(
                    &t.rt.kind,
                    &t.rt.group,
                    &t.rt.plural,
                    t.name(),
                    vec![Cause::invalid(
                        "metadata.finalizers",
                        format!(
                            "Forbidden: no new finalizers can be added if the object is being deleted, found new finalizers {added:?}"
                        ),
                    )],
                ));
            }
        }
        if t.rt.tracks_generation && meta::spec_part(&new) != meta::spec_part(old) {
            let g = old
                .pointer("/metadata/generation")
                .and_then(Value::as_i64)
                .unwrap_or(0);
            meta::meta_mut(&mut new).insert("generation".into(), json!(g + 1));
        }
        if let Some(manager) = &manager {
            let (manager, rt, sub) = (manager.clone(), Arc::clone(&t.rt), t.subresource.clone());
            (new, current) = off_workers(small(&[&new, &current.value]), move || {
                crate::resource::fields::record_update(
                    &mut new,
                    Some(&current.value),
                    &manager,
                    &rt.api_version(),
                    sub.as_deref(),
                    rt.structural.shape(),
                );
                (new, current)
            })
            .await?;
        }
        let old = &current.value;
        // What is stored carries its managedFields (and what admission set): that is the size
        // that counts. A write that deletes the object (its last finalizer gone) stores nothing.
        if !(deleting && meta::finalizers(&new).is_empty()) {
            check_size(t, t.name(), &new)?;
        }
        policy.review(&Review {
            operation: Operation::Update,
            target: t,
            old: Some(old),
            new: Some(&new),
            options: None,
        })?;
        if &new == old {
            return Ok(Outcome::json(
                200,
                with_rv(new, current.mod_revision),
                warnings,
            ));
        }
        if status_write {
            for a in t.rt.admission() {
                a.check_status_write(&t.subject(), old, &new)?;
            }
        }
        let key = t.key(self);
        if deleting && meta::finalizers(&new).is_empty() {
            if dry_run {
                return Ok(Outcome::json(200, new, warnings));
            }
            return match self
                .store
                .delete(&key, current.mod_revision, &self.attached_keys(&t.rt, old))
                .await
                .map_err(ApiError::from)?
            {
                Write::Done(rev) => Ok(Outcome::json(200, with_rv(new, rev), warnings)),
                Write::Conflict(_) => Err(t.conflict()),
            };
        }
        if dry_run {
            return Ok(Outcome::json(
                200,
                with_rv(new, current.mod_revision),
                warnings,
            ));
        }
        let change = Change {
            key: &key,
            old: Some((old, current.mod_revision)),
            new: &new,
            parent: None,
        };
        let written = match self.admitted_write(t, change) {
            Some(write) => write.await?,
            None => self
                .store
                .update(&key, &new, current.mod_revision)
                .await
                .map_err(ApiError::from)?
                .into(),
        };
        let new = written.stored.unwrap_or(new);
        match written.write {
            Write::Done(rev) => Ok(Outcome::json(200, with_rv(new, rev), warnings)),
            Write::Conflict(_) => Err(t.conflict()),
        }
    }

    /// `PATCH` an object (or its status): JSON merge patch, JSON patch or server-side apply.
    pub async fn patch(
        &self,
        t: &Target,
        bytes: &[u8],
        content_type: &str,
        p: &Params,
        user_agent: &str,
        policy: &dyn Policy,
    ) -> ApiResult<Outcome> {
        let ct = content_type.split(';').next().unwrap_or("").trim();
        let fv = p.field_validation()?;
        enum Kind {
            Merge(Value),
            Strategic(Value),
            Json(json_patch::Patch),
            Apply(Value),
        }
        let (patch, warnings) = match ct {
            "application/merge-patch+json" => {
                let (v, w) = self.decode(bytes, "application/json", fv)?;
                (Kind::Merge(v), w)
            }
            "application/json-patch+json" => {
                let ops: json_patch::Patch = serde_json::from_slice(bytes).map_err(|e| {
                    ApiError::bad_request(format!("the JSON patch is not valid: {e}"))
                })?;
                if ops.len() > MAX_JSON_PATCH_OPERATIONS {
                    let mut e = ApiError::too_large(MAX_OBJECT_BYTES);
                    e.message = format!(
                        "the allowed maximum operations in a JSON patch is {MAX_JSON_PATCH_OPERATIONS}, got {}",
                        ops.len()
                    );
                    return Err(e);
                }
                (Kind::Json(ops), Vec::new())
            }
            "application/apply-patch+yaml" | "application/apply-patch+json" => {
                let (v, w) = self.decode(bytes, content_type, fv)?;
                self.check_type(&t.rt, &v)?;
                names_agree(&v, t.namespace.as_deref(), t.name.as_deref())?;
                if p.get("fieldManager").is_none() {
                    return Err(ApiError::bad_request(
                        "PATCH with apply requires the fieldManager query parameter",
                    ));
                }
                (Kind::Apply(v), w)
            }
            "application/strategic-merge-patch+json" if t.rt.strategic_merge => {
                let (v, w) = self.decode(bytes, "application/json", fv)?;
                (Kind::Strategic(v), w)
            }
            "application/strategic-merge-patch+json" => {
                return Err(ApiError::unsupported_media_type(&format!(
                    "{ct}: strategic merge patch is not supported for {}; use --type=merge or --type=json",
                    t.rt.kind
                )));
            }
            other => return Err(ApiError::unsupported_media_type(other)),
        };
        for _ in 0..WRITE_RETRIES {
            let current = match self.store.get(&t.key(self)).await.map_err(ApiError::from)? {
                Some(c) => c,
                None => match &patch {
                    Kind::Apply(v) if t.subresource.is_none() => {
                        return self.apply_create(t, v.clone(), p, warnings, policy).await;
                    }
                    _ => return Err(t.not_found()),
                },
            };
            let base = with_rv(current.value.clone(), current.mod_revision);
            let patched = match &patch {
                Kind::Merge(m) => {
                    let mut doc = base.clone();
                    json_patch::merge(&mut doc, m);
                    doc
                }
                Kind::Strategic(m) => crate::resource::strategic::patch(&base, m).map_err(|e| {
                    ApiError::invalid(&t.rt.kind, &t.rt.group, &t.rt.plural, t.name(), vec![e])
                })?,
                Kind::Json(ops) => {
                    let mut doc = base.clone();
                    apply_json_patch(t, &mut doc, ops)?;
                    doc
                }
                Kind::Apply(applied) => {
                    let manager = p.get("fieldManager").unwrap_or_default().to_string();
                    let applied = crate::resource::fields::endpoint_part(
                        applied,
                        t.subresource.as_deref(),
                        t.rt.status_subresource,
                    )
                    .into_owned();
                    let (rt, sub, force) =
                        (Arc::clone(&t.rt), t.subresource.clone(), p.flag("force"));
                    off_workers(small(&[&base, &applied]), move || {
                        crate::resource::fields::apply(
                            &base,
                            &applied,
                            &manager,
                            &rt.api_version(),
                            force,
                            sub.as_deref(),
                            rt.structural.shape(),
                        )
                    })
                    .await?
                    .map_err(|conflicts| {
                        ApiError::apply_conflict(&t.rt.group, &t.rt.plural, t.name(), conflicts)
                    })?
                }
            };
            if !patched.is_object() {
                return Err(ApiError::bad_request(
                    "the patch does not result in an object",
                ));
            }
            // The object stays what its URL names, as a PUT's body must (a JSON, merge or
            // strategic merge patch could otherwise store a Server whose kind is Volume).
            let api_version = t.rt.api_version();
            if patched.get("apiVersion").and_then(Value::as_str) != Some(api_version.as_str())
                || patched.get("kind").and_then(Value::as_str) != Some(t.rt.kind.as_str())
            {
                return Err(ApiError::bad_request(format!(
                    "the patch changes the object's apiVersion or kind: a {} stays {api_version} {}",
                    t.rt.kind, t.rt.kind
                )));
            }
            if let Some(rv) = meta::meta_str(&patched, "resourceVersion")
                && rv != current.mod_revision.to_string()
            {
                return Err(t.conflict());
            }
            let manager = match &patch {
                Kind::Apply(_) => None,
                _ => Some(self.manager(p, user_agent)),
            };
            match self
                .write_update(t, current, patched, p, manager, warnings.clone(), policy)
                .await
            {
                Err(e)
                    if e.code == 409 && e.reason == "Conflict" && e.details.causes.is_empty() =>
                {
                    continue;
                }
                other => return other,
            }
        }
        Err(t.conflict())
    }

    async fn apply_create(
        &self,
        t: &Target,
        applied: Value,
        p: &Params,
        warnings: Vec<String>,
        policy: &dyn Policy,
    ) -> ApiResult<Outcome> {
        let manager = p.get("fieldManager").unwrap_or_default().to_string();
        let rt = Arc::clone(&t.rt);
        let obj = off_workers(small(&[&applied]), move || {
            crate::resource::fields::apply(
                &json!({}),
                &crate::resource::fields::endpoint_part(&applied, None, rt.status_subresource),
                &manager,
                &rt.api_version(),
                false,
                None,
                rt.structural.shape(),
            )
        })
        .await?
        .map_err(|c| ApiError::apply_conflict(&t.rt.group, &t.rt.plural, t.name(), c))?;
        self.create_object(t, obj, warnings, p, None, policy).await
    }

    /// `DELETE` an object: at once, or by setting `deletionTimestamp` while finalizers remain.
    /// The policy sees the stored object and the `DeleteOptions` before anything is written.
    pub async fn delete(
        &self,
        t: &Target,
        bytes: &[u8],
        p: &Params,
        policy: &dyn Policy,
    ) -> ApiResult<Outcome> {
        let opts: Value = if bytes.iter().all(u8::is_ascii_whitespace) {
            json!({})
        } else {
            body::decode(bytes, false)?.value
        };
        let dry_run = p.dry_run()?
            || opts
                .get("dryRun")
                .and_then(Value::as_array)
                .is_some_and(|a| a.iter().any(|v| v == "All"));
        let propagation = p
            .get("propagationPolicy")
            .map(String::from)
            .or_else(|| {
                opts.get("propagationPolicy")
                    .and_then(Value::as_str)
                    .map(String::from)
            })
            .or_else(|| {
                match opts
                    .get("orphanDependents")
                    .and_then(Value::as_bool)
                    .or(p.get("orphanDependents").map(|v| v == "true"))
                {
                    Some(true) => Some("Orphan".into()),
                    _ => None,
                }
            })
            .unwrap_or_else(|| "Background".into());
        let extra_finalizer = match propagation.as_str() {
            "Background" => None,
            "Foreground" => Some("foregroundDeletion"),
            "Orphan" => Some("orphan"),
            other => {
                return Err(ApiError::bad_request(format!(
                    "propagationPolicy: unsupported value \"{other}\": must be Orphan, Background or Foreground"
                )));
            }
        };
        for _ in 0..WRITE_RETRIES {
            let current = self.read(t).await?;
            policy.review(&Review {
                operation: Operation::Delete,
                target: t,
                old: Some(&current.value),
                new: None,
                options: Some(&opts),
            })?;
            if let Some(uid) = opts.pointer("/preconditions/uid").and_then(Value::as_str)
                && meta::meta_str(&current.value, "uid") != Some(uid)
            {
                return Err(ApiError::conflict(
                    &t.rt.group,
                    &t.rt.plural,
                    t.name(),
                    format!(
                        "Precondition failed: UID in precondition: {uid}, UID in object meta: {}",
                        meta::meta_str(&current.value, "uid").unwrap_or_default()
                    ),
                ));
            }
            if let Some(rv) = opts
                .pointer("/preconditions/resourceVersion")
                .and_then(Value::as_str)
                && rv != current.mod_revision.to_string()
            {
                return Err(ApiError::conflict(
                    &t.rt.group,
                    &t.rt.plural,
                    t.name(),
                    format!(
                        "Precondition failed: ResourceVersion in precondition: {rv}, ResourceVersion in object meta: {}",
                        current.mod_revision
                    ),
                ));
            }
            // What admission checks when a delete begins (an object in use stays).
            let held = if current
                .value
                .pointer("/metadata/deletionTimestamp")
                .is_none()
            {
                self.delete_held(t, &current.value).await?
            } else {
                Vec::new()
            };
            let mut finalizers = meta::finalizers(&current.value);
            if let Some(f) = extra_finalizer
                && !finalizers.iter().any(|x| x == f)
            {
                finalizers.push(f.to_string());
            }
            let key = t.key(self);
            if finalizers.is_empty() {
                if dry_run {
                    return Ok(Outcome::json(
                        200,
                        with_rv(current.value, current.mod_revision),
                        Vec::new(),
                    ));
                }
                let attached = self.attached_keys(&t.rt, &current.value);
                let written = if held.is_empty() {
                    self.store
                        .delete(&key, current.mod_revision, &attached)
                        .await
                        .map_err(ApiError::from)?
                } else {
                    self.write_delete(&key, current.mod_revision, None, &attached, &held)
                        .await?
                };
                match written {
                    Write::Done(rev) => {
                        return Ok(Outcome::json(200, with_rv(current.value, rev), Vec::new()));
                    }
                    Write::Conflict(_) => continue,
                }
            }
            let mut obj = current.value.clone();
            let already = obj.pointer("/metadata/deletionTimestamp").is_some();
            {
                let m = meta::meta_mut(&mut obj);
                m.insert("finalizers".into(), json!(finalizers));
                if !already {
                    m.insert("deletionTimestamp".into(), json!(meta::now()));
                    m.insert("deletionGracePeriodSeconds".into(), json!(0));
                    if let Some(g) = m.get("generation").and_then(Value::as_i64) {
                        m.insert("generation".into(), json!(g + 1));
                    }
                }
            }
            if obj == current.value || dry_run {
                return Ok(Outcome::json(
                    202,
                    with_rv(obj, current.mod_revision),
                    Vec::new(),
                ));
            }
            let written = if held.is_empty() {
                self.store
                    .update(&key, &obj, current.mod_revision)
                    .await
                    .map_err(ApiError::from)?
            } else {
                self.write_delete(&key, current.mod_revision, Some(&obj), &[], &held)
                    .await?
            };
            match written {
                Write::Done(rev) => {
                    return Ok(Outcome::json(202, with_rv(obj, rev), Vec::new()));
                }
                Write::Conflict(_) => continue,
            }
        }
        Err(t.conflict())
    }

    /// `DELETE` a collection: every selected object, as `DELETE` would (the policy decides on
    /// each).
    pub async fn delete_collection(
        &self,
        t: &Target,
        bytes: &[u8],
        p: &Params,
        policy: &dyn Policy,
    ) -> ApiResult<Outcome> {
        let mut lp = p.clone();
        lp.remove_paging();
        let (items, revision, _) = self.list_items(t, &lp).await?;
        let mut deleted = Vec::new();
        for item in items {
            let one = Target {
                rt: Arc::clone(&t.rt),
                namespace: meta::meta_str(&item, "namespace").map(String::from),
                name: meta::meta_str(&item, "name").map(String::from),
                subresource: None,
            };
            match self.delete(&one, bytes, p, policy).await {
                Ok(_) => deleted.push(item),
                Err(e) if e.code == 404 => {}
                Err(e) => return Err(e),
            }
        }
        Ok(Outcome::json(
            200,
            json!({
                "kind": format!("{}List", t.rt.kind),
                "apiVersion": t.rt.api_version(),
                "metadata": {"resourceVersion": revision.to_string()},
                "items": deleted,
            }),
            Vec::new(),
        ))
    }
}

/// A failed read of a list: past a continue token, a compacted revision is the token's age
/// and a future one a forged token; at an exact revision, the revision's.
fn list_error(e: StoreError, has_token: bool, read: ReadAt) -> ApiError {
    match e {
        StoreError::Compacted if let ReadAt::Exact(n) = read => ApiError::gone(format!(
            "too old resource version: {n}: etcd has compacted it; list again without resourceVersion, or with a newer one"
        )),
        StoreError::FutureRevision if let ReadAt::Exact(n) = read => {
            ApiError::timeout(format!("Too large resource version: {n}"))
        }
        StoreError::Compacted if has_token => ApiError::gone(
            "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter.",
        ),
        // Only a forged token names a revision etcd has not reached.
        StoreError::FutureRevision if has_token => ApiError::bad_request(
            "continue key is not valid: the token's revision is in the future",
        ),
        e => ApiError::from(e),
    }
}

/// One page of a streamed list: the selected objects as `rendering` shows them. Whole
/// objects are answered as stored, their `resourceVersion` spliced in, decoded only when a
/// selector needs to look at them.
fn list_page(
    rt: &ResourceType,
    rendering: Rendering,
    include: &str,
    sel: &Selectors,
    page: Vec<KeyValue>,
) -> ApiResult<Vec<Item>> {
    let unselected = sel.labels.is_empty() && sel.fields.is_empty();
    let mut items = Vec::with_capacity(page.len());
    for kv in page {
        if rendering == Rendering::Full
            && unselected
            && let Some(json) = encoded::with_rv(&kv.value, kv.mod_revision)
        {
            items.push(Item::Json(json));
            continue;
        }
        let s = Store::decode(&kv.key, &kv.value, kv.mod_revision)?;
        if !sel.matches(&s.value) {
            continue;
        }
        if rendering == Rendering::Full
            && let Some(json) = encoded::with_rv(&kv.value, kv.mod_revision)
        {
            items.push(Item::Json(json));
            continue;
        }
        let obj = with_rv(s.value, s.mod_revision);
        let (_, mut rendered) = render_items(rt, rendering, include, vec![obj]);
        items.extend(rendered.pop().map(Item::Value));
    }
    Ok(items)
}

/// A list answered from the watch cache, a [`CACHE_PAGE`] of objects at a time: whole
/// objects as stored with their `resourceVersion` spliced in, decoded only for a Table or
/// metadata.
fn cached_list(
    t: &Target,
    rendering: Rendering,
    include: &str,
    list_meta: Value,
    page: Page,
) -> Outcome {
    let head = list_head(t, rendering, list_meta);
    let rt = Arc::clone(&t.rt);
    let include = include.to_string();
    let (field, _) = render_items(&rt, rendering, &include, Vec::new());
    let mut items = page.items.into_iter();
    let chunks = std::iter::from_fn(move || {
        let chunk: Vec<_> = items.by_ref().take(CACHE_PAGE).collect();
        (!chunk.is_empty()).then_some(chunk)
    });
    let pages = futures::stream::iter(chunks)
        .map(move |chunk| {
            let mut out = Vec::with_capacity(chunk.len());
            for (rev, stored) in chunk {
                if rendering == Rendering::Full
                    && let Some(json) = encoded::with_rv(&stored, rev)
                {
                    out.push(Item::Json(json));
                    continue;
                }
                let obj = serde_json::from_slice(&stored).map_err(|e| {
                    ApiError::internal(format!("a cached object cannot be decoded: {e}"))
                })?;
                let (_, mut rendered) =
                    render_items(&rt, rendering, &include, vec![with_rv(obj, rev)]);
                out.extend(rendered.pop().map(Item::Value));
            }
            Ok(out)
        })
        .boxed();
    Outcome::List(List { head, field, pages })
}

/// A list document without its items: `kind`, `apiVersion`, `metadata` (and a Table's
/// `columnDefinitions`).
fn list_head(t: &Target, rendering: Rendering, list_meta: Value) -> Map<String, Value> {
    let head = match rendering {
        Rendering::Full => json!({
            "kind": format!("{}List", t.rt.kind),
            "apiVersion": t.rt.api_version(),
            "metadata": list_meta,
        }),
        Rendering::Metadata => json!({
            "kind": "PartialObjectMetadataList",
            "apiVersion": "meta.k8s.io/v1",
            "metadata": list_meta,
        }),
        Rendering::Table => json!({
            "kind": "Table",
            "apiVersion": "meta.k8s.io/v1",
            "metadata": list_meta,
            "columnDefinitions": table::columns(&t.rt),
        }),
    };
    match head {
        Value::Object(m) => m,
        _ => Map::new(),
    }
}

/// Objects as a list of `rendering` holds them, and the member they go in.
fn render_items(
    rt: &ResourceType,
    rendering: Rendering,
    include: &str,
    items: Vec<Value>,
) -> (&'static str, Vec<Value>) {
    match rendering {
        Rendering::Full => ("items", items),
        Rendering::Metadata => ("items", items.iter().map(table::partial).collect()),
        Rendering::Table => (
            "rows",
            items.iter().map(|o| table::row(rt, o, include)).collect(),
        ),
    }
}

/// Namespaces that always exist, as in Kubernetes: they hold the system's own Leases and
/// Events and cluster-wide role assignments. Every other namespace is a Project's.
pub const SYSTEM_NAMESPACES: [&str; 6] = [
    "default",
    "kube-node-lease",
    "kube-public",
    "kube-system",
    stratus_api_types::network::NETWORK_AGENT_LEASE_NAMESPACE,
    "stratus-system",
];

/// The uid and creation time of each system namespace, as `{name: {"metadata": {...}}}`: made
/// by the first API server to start on this etcd, read by every later one.
///
/// # Errors
/// When etcd cannot be reached.
pub async fn load_system_namespaces(store: &Store, prefix: &str) -> Result<Value, StoreError> {
    let key = format!("{prefix}/_system/namespaces");
    let created = meta::now();
    let fresh: Map<String, Value> = SYSTEM_NAMESPACES
        .iter()
        .map(|n| {
            let uid = uuid::Uuid::new_v4().to_string();
            (
                (*n).to_string(),
                json!({"metadata": {"uid": uid, "creationTimestamp": created}}),
            )
        })
        .collect();
    store.first_written(&key, &Value::Object(fresh)).await
}

impl Api {
    /// The key of the Project that namespace `ns` belongs to; `None` for a system namespace.
    pub fn project_key(&self, ns: &str) -> Option<String> {
        if SYSTEM_NAMESPACES.contains(&ns) {
            return None;
        }
        self.registry
            .by_kind("identity.stratus.dev", "Project")
            .map(|rt| rt.key(&self.prefix, None, ns))
    }

    /// Refuses a read of `t`'s namespace at `revision` (an Exact LIST, a continued LIST at its
    /// token's revision, a watch from it) from
    /// before the namespace's Project was created: a Project deleted and created again under
    /// the same name does not show its new members the old Project's objects, which etcd keeps
    /// until it compacts them. 410, as for a compacted revision, so clients list afresh.
    ///
    /// # Errors
    /// 410 Gone; when etcd cannot be read.
    pub async fn check_epoch(&self, t: &Target, revision: i64) -> ApiResult<()> {
        let Some(ns) = t.namespace.as_deref().filter(|_| t.rt.namespaced) else {
            return Ok(());
        };
        let Some(key) = self.project_key(ns) else {
            return Ok(());
        };
        if revision > 0
            && self
                .store
                .created_after(&key, revision)
                .await
                .map_err(ApiError::from)?
        {
            return Err(ApiError::gone(format!(
                "too old resource version: {revision}: namespace {ns} was created after it; list again without resourceVersion"
            )));
        }
        Ok(())
    }

    /// The namespace `ns` as a core/v1 Namespace: a system namespace, or a Project's (then
    /// Terminating while the Project is being deleted). `None` if there is no such namespace.
    pub async fn namespace(&self, ns: &str) -> ApiResult<Option<Value>> {
        let Some(key) = self.project_key(ns) else {
            return Ok(Some(namespace_object(ns, self.system_namespaces.get(ns))));
        };
        Ok(self
            .store
            .get(&key)
            .await
            .map_err(ApiError::from)?
            .map(|p| namespace_object(ns, Some(&p.value))))
    }

    /// Every namespace: the system ones and one per Project.
    pub async fn namespaces(&self) -> ApiResult<Vec<Value>> {
        let mut out: Vec<Value> = SYSTEM_NAMESPACES
            .iter()
            .map(|n| namespace_object(n, self.system_namespaces.get(*n)))
            .collect();
        if let Some(rt) = self.registry.by_kind("identity.stratus.dev", "Project") {
            let projects = self
                .store
                .list(&rt.key_prefix(&self.prefix, None), None, 0, 0)
                .await
                .map_err(ApiError::from)?;
            out.extend(projects.items.iter().filter_map(|(_, p)| {
                let name = meta::meta_str(&p.value, "name")?;
                Some(namespace_object(name, Some(&p.value)))
            }));
        }
        out.sort_by(|a, b| {
            a["metadata"]["name"]
                .as_str()
                .cmp(&b["metadata"]["name"].as_str())
        });
        Ok(out)
    }
}

/// A core/v1 Namespace as Stratus presents a namespace: a system one, with the uid and
/// creation time it was given, or a Project's, with the Project's uid, labels and timestamps
/// (`kubectl get ns` shows its age).
fn namespace_object(name: &str, origin: Option<&Value>) -> Value {
    let mut metadata = Map::new();
    metadata.insert("name".into(), Value::String(name.to_string()));
    if let Some(m) = origin.and_then(|p| p.get("metadata")) {
        for f in ["uid", "creationTimestamp", "deletionTimestamp", "labels"] {
            if let Some(v) = m.get(f) {
                metadata.insert(f.into(), v.clone());
            }
        }
    }
    let phase = if metadata.contains_key("deletionTimestamp") {
        "Terminating"
    } else {
        "Active"
    };
    json!({"kind": "Namespace", "apiVersion": "v1", "metadata": metadata, "spec": {"finalizers": ["kubernetes"]}, "status": {"phase": phase}})
}

/// The JSON-encoded size of `v`, or None once it passes `cap` (counting stops there).
fn encoded_len(v: &Value, cap: usize) -> Option<usize> {
    struct Count {
        n: usize,
        cap: usize,
    }
    impl std::io::Write for Count {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.n += b.len();
            if self.n > self.cap {
                return Err(std::io::Error::other("over the limit"));
            }
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut c = Count { n: 0, cap };
    serde_json::to_writer(&mut c, v).ok().map(|()| c.n)
}

/// Runs work that grows with an object's size (recording field ownership over up to
/// [`MAX_OBJECT_BYTES`], about a second of CPU in a debug build) on the blocking pool, so the
/// async workers keep serving every other request meanwhile.
async fn off_workers<T: Send + 'static>(
    small: bool,
    work: impl FnOnce() -> T + Send + 'static,
) -> ApiResult<T> {
    if small {
        return Ok(work());
    }
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| ApiError::internal(format!("recording field ownership failed: {e}")))
}

/// Objects up to this size (encoded) have their field ownership recorded on the request's
/// own worker: it takes microseconds, less than a hop to the blocking pool (whose threads
/// each warm an allocator heap of their own), which is kept for the large ones.
const INLINE_BYTES: usize = 32 * 1024;

/// Whether every object in `objs` is small enough to record inline (see [`INLINE_BYTES`]).
fn small(objs: &[&Value]) -> bool {
    objs.iter().all(|o| encoded_len(o, INLINE_BYTES).is_some())
}

/// 413 for an object larger than [`MAX_OBJECT_BYTES`].
fn too_large(t: &Target, name: &str, what: &str) -> ApiError {
    let mut e = ApiError::too_large(MAX_OBJECT_BYTES).about(&t.rt.group, &t.rt.plural, name);
    e.message = format!(
        "{what} is larger than the limit of {MAX_OBJECT_BYTES} bytes for a {}",
        t.rt.kind
    );
    e
}

/// Refuses an object about to be stored that is larger than [`MAX_OBJECT_BYTES`].
fn check_size(t: &Target, name: &str, obj: &Value) -> ApiResult<()> {
    match encoded_len(obj, MAX_OBJECT_BYTES) {
        Some(_) => Ok(()),
        None => Err(too_large(t, name, "the object")),
    }
}

/// Applies a JSON patch to `doc` one operation at a time, with the document's size bounded
/// after each one: an upper bound grows by what an operation may add (its value, or a copy's
/// source) and the document is measured again only when the bound passes the limit, so a
/// patch of `copy` operations doubling a field stops at the limit instead of exhausting memory.
/// As in Kubernetes, `test` of an absent field against null passes (kube-rs' finalizer helper
/// relies on it). `doc` is a copy, dropped on failure: no rollback is needed (the crate's own
/// rollback panics when a failed `move` already took its source away).
fn apply_json_patch(t: &Target, doc: &mut Value, ops: &json_patch::Patch) -> ApiResult<()> {
    use json_patch::PatchOperation as Op;
    let limit = MAX_OBJECT_BYTES;
    let mut bound = encoded_len(doc, limit).ok_or_else(|| too_large(t, t.name(), "the object"))?;
    for (i, op) in ops.iter().enumerate() {
        let grows = match op {
            Op::Test(x) if x.value.is_null() && doc.pointer(x.path.as_str()).is_none() => continue,
            Op::Add(x) => encoded_len(&x.value, limit).map(|n| n + x.path.as_str().len()),
            Op::Replace(x) => encoded_len(&x.value, limit),
            Op::Copy(x) => doc
                .pointer(x.from.as_str())
                .map_or(Some(0), |v| encoded_len(v, limit))
                .map(|n| n + x.path.as_str().len()),
            Op::Move(x) => Some(x.path.as_str().len()),
            Op::Remove(_) | Op::Test(_) => Some(0),
        };
        json_patch::patch_unsafe(doc, std::slice::from_ref(op)).map_err(|e| {
            ApiError::invalid(
                &t.rt.kind,
                &t.rt.group,
                &t.rt.plural,
                t.name(),
                vec![Cause::invalid(
                    crate::resource::schema::pointer_to_path(e.path.as_str()),
                    format!(
                        "the JSON patch cannot be applied: operation {i} at \"{}\": {}",
                        e.path, e.kind
                    ),
                )],
            )
        })?;
        bound = match grows.map(|g| bound.saturating_add(g)) {
            Some(b) if b <= limit => b,
            // Past the bound: measure what the document really is now.
            _ => encoded_len(doc, limit).ok_or_else(|| {
                too_large(
                    t,
                    t.name(),
                    &format!("the result of the JSON patch's operation {i}"),
                )
            })?,
        };
    }
    Ok(())
}
