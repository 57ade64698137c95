//! The client verbs: `apply`, `get`, `describe`, `delete`, `wait`, `diff`, `login`, `console`,
//! `evacuate`, over any Stratus API server (kubectl remains a first-class client; these need
//! nothing but `stratus`).

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Event;
use kube::Resource;
use kube::api::{
    Api, DeleteParams, DynamicObject, GetParams, ListParams, Patch, PatchParams, PostParams,
    PropagationPolicy, ResourceExt, TypeMeta,
};
use kube::core::{GroupVersionKind, Request};
use kube::discovery::{ApiCapabilities, ApiResource, Discovery, Scope, oneshot};
use kube::runtime::{WatchStreamExt, watcher};
use serde::Deserialize;
use serde_json::{Value, json};
use stratus_api_types::compute::Server;
use tokio::time::Instant;

use crate::kubeconfig::Kubeconfig;

/// Options shared by every client verb.
#[derive(Debug, Clone, clap::Args)]
pub struct ClientArgs {
    /// kubeconfig to use (defaults to the files $KUBECONFIG lists, then ~/.kube/config).
    #[arg(long, global = true)]
    pub kubeconfig: Option<PathBuf>,
    /// Namespace (project) of namespaced objects.
    #[arg(short = 'n', long, global = true)]
    pub namespace: Option<String>,
}

/// `stratus apply`.
#[derive(Debug, clap::Args)]
pub struct ApplyArgs {
    /// A YAML file (several documents allowed), a directory of them, or `-` for stdin.
    #[arg(short = 'f', long = "filename", required = true)]
    pub files: Vec<String>,
    /// Take over fields other managers own.
    #[arg(long)]
    pub force_conflicts: bool,
    /// Field manager name recorded in managedFields.
    #[arg(long, default_value = "stratus")]
    pub field_manager: String,
}

/// How `stratus get` prints what it found (a table when not given).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// The table with every column the server offers.
    Wide,
    /// The objects as YAML.
    Yaml,
    /// The objects as JSON.
    Json,
    /// `kind.group/name` of each object.
    Name,
}

/// `stratus get`.
#[derive(Debug, clap::Args)]
pub struct GetArgs {
    /// Kind, plural or short name (`servers`, `srv`, `Server`).
    pub kind: String,
    /// One object's name (all objects when absent).
    pub name: Option<String>,
    /// Output format (a table when not given).
    #[arg(short = 'o', long, value_enum)]
    pub output: Option<Output>,
    /// Every namespace.
    #[arg(short = 'A', long)]
    pub all_namespaces: bool,
    /// Label selector.
    #[arg(short = 'l', long)]
    pub selector: Option<String>,
    /// Field selector.
    #[arg(long)]
    pub field_selector: Option<String>,
}

/// `stratus describe`.
#[derive(Debug, clap::Args)]
pub struct DescribeArgs {
    /// Kind, plural or short name.
    pub kind: String,
    /// Object name.
    pub name: String,
}

/// What happens to an object's dependents when it is deleted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Cascade {
    /// The object goes at once; the garbage collector deletes its dependents afterwards.
    Background,
    /// The object stays until its dependents are gone.
    Foreground,
    /// The dependents are left in place.
    Orphan,
}

impl From<Cascade> for PropagationPolicy {
    fn from(c: Cascade) -> Self {
        match c {
            Cascade::Background => Self::Background,
            Cascade::Foreground => Self::Foreground,
            Cascade::Orphan => Self::Orphan,
        }
    }
}

/// `stratus delete`.
#[derive(Debug, clap::Args)]
pub struct DeleteArgs {
    /// Kind, plural or short name (or use -f).
    pub kind: Option<String>,
    /// Object names.
    pub names: Vec<String>,
    /// Delete the objects of these files instead.
    #[arg(short = 'f', long = "filename")]
    pub files: Vec<String>,
    /// Return at once instead of waiting until the objects are gone.
    #[arg(long)]
    pub no_wait: bool,
    /// How long to wait for finalizers.
    #[arg(long, default_value = "120", value_name = "SECONDS")]
    pub timeout: u64,
    /// What happens to the objects' dependents.
    #[arg(long, value_enum, ignore_case = true, default_value_t = Cascade::Background)]
    pub cascade: Cascade,
}

/// What `stratus wait` waits for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WaitFor {
    /// A condition of this type with this status (`True` unless given).
    Condition {
        /// The condition's type, compared without regard to case.
        type_: String,
        /// The status wanted, compared without regard to case.
        status: String,
    },
    /// The object to be gone.
    Delete,
}

impl FromStr for WaitFor {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (type_, status) = match s.strip_prefix("condition=") {
            Some(rest) => rest.split_once('=').unwrap_or((rest, "True")),
            None if s == "delete" => return Ok(Self::Delete),
            None => return Err("use condition=TYPE[=STATUS] or delete".into()),
        };
        if type_.is_empty() || status.is_empty() {
            return Err("use condition=TYPE[=STATUS] or delete".into());
        }
        Ok(Self::Condition {
            type_: type_.into(),
            status: status.into(),
        })
    }
}

impl fmt::Display for WaitFor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Condition { type_, status } => write!(f, "condition={type_}={status}"),
            Self::Delete => f.write_str("delete"),
        }
    }
}

/// `stratus wait`.
#[derive(Debug, clap::Args)]
pub struct WaitArgs {
    /// `kind/name`.
    pub target: String,
    /// `condition=Type` or `condition=Type=Status`, or `delete`.
    #[arg(long = "for")]
    pub for_: WaitFor,
    /// Seconds to wait.
    #[arg(long, default_value = "300")]
    pub timeout: u64,
}

/// `stratus diff`.
#[derive(Debug, clap::Args)]
pub struct DiffArgs {
    /// Files as for `apply`.
    #[arg(short = 'f', long = "filename", required = true)]
    pub files: Vec<String>,
    /// Field manager the dry run applies as.
    #[arg(long, default_value = "stratus")]
    pub field_manager: String,
}

/// A served resource, as discovery describes it.
#[derive(Debug, Clone)]
struct Kind {
    ar: ApiResource,
    namespaced: bool,
}

impl Kind {
    fn new((ar, caps): (ApiResource, ApiCapabilities)) -> Self {
        Self {
            namespaced: caps.scope == Scope::Namespaced,
            ar,
        }
    }

    /// `kind.group`, as kubectl names a resource in its output.
    fn qualified(&self) -> String {
        if self.ar.group.is_empty() {
            self.ar.plural.clone()
        } else {
            format!("{}.{}", self.ar.kind.to_lowercase(), self.ar.group)
        }
    }
}

/// One document of a file given with `-f`.
struct Document {
    types: TypeMeta,
    name: String,
    namespace: Option<String>,
    /// The document as written, which is what gets applied.
    body: Value,
}

impl Document {
    fn parse(source: &str, body: Value) -> Result<Self> {
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Head {
            #[serde(flatten)]
            types: TypeMeta,
            metadata: Meta,
        }
        #[derive(Deserialize)]
        struct Meta {
            name: String,
            namespace: Option<String>,
        }
        let head = Head::deserialize(&body).with_context(|| {
            format!("a document in {source} lacks apiVersion, kind or metadata.name")
        })?;
        Ok(Self {
            types: head.types,
            name: head.metadata.name,
            namespace: head.metadata.namespace,
            body,
        })
    }
}

/// A connection and the namespace commands work in.
pub struct Session {
    client: kube::Client,
    namespace: String,
    /// What discovery said about each kind named by a document, so it is asked once.
    pinned: HashMap<(String, String), Kind>,
}

impl Session {
    /// Connects with the kubeconfig every subcommand uses.
    pub async fn connect(args: &ClientArgs) -> Result<Self> {
        let config = Kubeconfig::locate(args.kubeconfig.as_deref())?
            .config()
            .await?;
        let namespace = args
            .namespace
            .clone()
            .unwrap_or_else(|| config.default_namespace.clone());
        let client = kube::Client::try_from(config).context("build the API client")?;
        Ok(Self {
            client,
            namespace,
            pinned: HashMap::new(),
        })
    }

    /// The resource a user named by plural, kind, short name, or any of those with `.group`.
    async fn resolve(&self, name: &str) -> Result<Kind> {
        let (name, group) = match name.split_once('.') {
            Some((n, g)) => (n, Some(g)),
            None => (name, None),
        };
        let wanted = name.to_lowercase();
        let discovery = match group {
            Some(g) => Discovery::new(self.client.clone()).filter(&[g]),
            None => Discovery::new(self.client.clone()),
        }
        .run()
        .await
        .context("discover the served resources")?;
        let groups = discovery.groups_alphabetical();
        if let Some(found) = groups
            .iter()
            .flat_map(|g| g.recommended_resources())
            .find(|(ar, _)| ar.plural == wanted || ar.kind.to_lowercase() == wanted)
        {
            return Ok(Kind::new(found));
        }
        // Discovery's ApiResource carries no short names; the resource lists do.
        for g in groups {
            let version = g.preferred_version_or_latest();
            let list = if g.name().is_empty() {
                self.client.list_core_api_resources(version).await
            } else {
                self.client
                    .list_api_group_resources(&format!("{}/{version}", g.name()))
                    .await
            }
            .with_context(|| format!("discover the resources of {}", g.name()))?;
            let plural = list.resources.into_iter().find_map(|r| {
                r.short_names
                    .is_some_and(|s| s.contains(&wanted))
                    .then_some(r.name)
            });
            if let Some(found) = plural.and_then(|p| {
                g.recommended_resources()
                    .into_iter()
                    .find(|(ar, _)| ar.plural == p)
            }) {
                return Ok(Kind::new(found));
            }
        }
        bail!("the server doesn't have a resource type \"{name}\"")
    }

    /// The resource a document's apiVersion and kind name.
    async fn kind_of(&mut self, doc: &Document) -> Result<Kind> {
        let key = (doc.types.api_version.clone(), doc.types.kind.clone());
        if let Some(kind) = self.pinned.get(&key) {
            return Ok(kind.clone());
        }
        let gvk = GroupVersionKind::try_from(&doc.types)
            .with_context(|| format!("read apiVersion {}", doc.types.api_version))?;
        let kind = Kind::new(
            oneshot::pinned_kind(&self.client, &gvk)
                .await
                .with_context(|| {
                    format!(
                        "no resource of kind {} in {} is served",
                        doc.types.kind, doc.types.api_version
                    )
                })?,
        );
        self.pinned.insert(key, kind.clone());
        Ok(kind)
    }

    /// The namespace an object of `kind` lives in: the document's, else the session's.
    fn namespace_of(&self, kind: &Kind, doc: Option<&Document>) -> Option<String> {
        kind.namespaced.then(|| {
            doc.and_then(|d| d.namespace.clone())
                .unwrap_or_else(|| self.namespace.clone())
        })
    }

    fn api(&self, kind: &Kind, namespace: Option<&str>) -> Api<DynamicObject> {
        match namespace {
            Some(ns) => Api::namespaced_with(self.client.clone(), ns, &kind.ar),
            None => Api::all_with(self.client.clone(), &kind.ar),
        }
    }
}

/// Reads every document of the given files, directories or stdin.
fn read_documents(files: &[String]) -> Result<Vec<Document>> {
    let mut texts = Vec::new();
    for f in files {
        if f == "-" {
            let mut s = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut s).context("read stdin")?;
            texts.push(("-".to_string(), s));
            continue;
        }
        let p = Path::new(f);
        if p.is_dir() {
            let mut entries: Vec<PathBuf> = std::fs::read_dir(p)
                .with_context(|| format!("read {}", p.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    p.extension()
                        .is_some_and(|e| e == "yaml" || e == "yml" || e == "json")
                })
                .collect();
            entries.sort();
            for e in entries {
                texts.push((
                    e.display().to_string(),
                    std::fs::read_to_string(&e).with_context(|| format!("read {}", e.display()))?,
                ));
            }
        } else {
            texts.push((
                f.clone(),
                std::fs::read_to_string(p).with_context(|| format!("read {f}"))?,
            ));
        }
    }
    let mut docs = Vec::new();
    for (source, text) in texts {
        let parsed: Vec<Value> =
            serde_saphyr::from_multiple(&text).with_context(|| format!("parse {source}"))?;
        for body in parsed.into_iter().filter(|d| !d.is_null()) {
            docs.push(Document::parse(&source, body)?);
        }
    }
    Ok(docs)
}

/// `stratus apply -f`: server-side apply of every document.
pub async fn apply(c: &ClientArgs, a: ApplyArgs) -> Result<()> {
    let mut s = Session::connect(c).await?;
    let mut params = PatchParams::apply(&a.field_manager);
    if a.force_conflicts {
        params = params.force();
    }
    for doc in read_documents(&a.files)? {
        let kind = s.kind_of(&doc).await?;
        let label = format!("{}/{}", kind.qualified(), doc.name);
        let api = s.api(&kind, s.namespace_of(&kind, Some(&doc)).as_deref());
        let before = api
            .get_opt(&doc.name)
            .await
            .with_context(|| format!("get {label}"))?;
        let after = api
            .patch(&doc.name, &params, &Patch::Apply(&doc.body))
            .await
            .with_context(|| format!("apply {label}"))?;
        let verb = match before {
            None => "created",
            Some(b) if b.metadata.resource_version == after.metadata.resource_version => {
                "unchanged"
            }
            Some(_) => "configured",
        };
        println!("{label} {verb}");
    }
    Ok(())
}

const TABLE: &str = "application/json;as=Table;v=v1;g=meta.k8s.io";

fn print_table(table: &Value, wide: bool, with_ns: bool) {
    let cols: Vec<(usize, String)> = table["columnDefinitions"]
        .as_array()
        .into_iter()
        .flatten()
        .enumerate()
        .filter(|(_, c)| wide || c["priority"].as_i64().unwrap_or(0) == 0)
        .map(|(i, c)| (i, c["name"].as_str().unwrap_or_default().to_uppercase()))
        .collect();
    let mut rows: Vec<Vec<String>> = Vec::new();
    let mut header: Vec<String> = cols.iter().map(|(_, n)| n.clone()).collect();
    if with_ns {
        header.insert(0, "NAMESPACE".into());
    }
    rows.push(header);
    for r in table["rows"].as_array().into_iter().flatten() {
        let mut row: Vec<String> = cols
            .iter()
            .map(|(i, _)| match &r["cells"][*i] {
                Value::Null => "<none>".to_string(),
                Value::String(s) if s.is_empty() => "<none>".to_string(),
                Value::String(s) => s.clone(),
                other => other.to_string(),
            })
            .collect();
        if with_ns {
            row.insert(
                0,
                r["object"]["metadata"]["namespace"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            );
        }
        rows.push(row);
    }
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0))
        .collect();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect();
        println!("{}", line.join("   ").trim_end());
    }
}

/// A Table of one Name column, for an answer that is an object or a list instead.
fn names_table(found: Value) -> Value {
    let items = match found.get("items") {
        Some(items) => items.as_array().cloned().unwrap_or_default(),
        None => vec![found],
    };
    let rows: Vec<Value> = items
        .into_iter()
        .map(|o| json!({"cells": [o["metadata"]["name"].clone()], "object": o}))
        .collect();
    json!({
        "kind": "Table",
        "columnDefinitions": [{"name": "Name", "type": "string", "priority": 0}],
        "rows": rows,
    })
}

/// `stratus get`.
pub async fn get(c: &ClientArgs, a: GetArgs) -> Result<()> {
    let s = Session::connect(c).await?;
    let kind = s.resolve(&a.kind).await?;
    let ns = if a.all_namespaces {
        None
    } else {
        s.namespace_of(&kind, None)
    };
    let mut lp = ListParams::default();
    if let Some(l) = &a.selector {
        lp = lp.labels(l);
    }
    if let Some(f) = &a.field_selector {
        lp = lp.fields(f);
    }
    let output = match a.output {
        None | Some(Output::Wide) => {
            // kube-rs has no Table verb: its request builder, with the Table media type.
            let url = Request::new(DynamicObject::url_path(&kind.ar, ns.as_deref()));
            let mut req = match &a.name {
                Some(n) => url.get(n, &GetParams::default()),
                None => url.list(&lp),
            }
            .context("build the request")?;
            req.headers_mut()
                .insert(http::header::ACCEPT, http::HeaderValue::from_static(TABLE));
            let table: Value = s
                .client
                .request(req)
                .await
                .with_context(|| format!("get {}", kind.qualified()))?;
            // A server may answer a resource it has no columns for with the plain object or
            // list, as kubectl allows: show the names.
            let table = if table["kind"] == "Table" {
                table
            } else {
                names_table(table)
            };
            if table["rows"].as_array().is_none_or(Vec::is_empty) {
                eprintln!("No resources found");
                return Ok(());
            }
            print_table(
                &table,
                a.output.is_some(),
                a.all_namespaces && kind.namespaced,
            );
            return Ok(());
        }
        Some(o) => o,
    };
    let api = s.api(&kind, ns.as_deref());
    let (found, names) = match &a.name {
        Some(n) => {
            let obj = api
                .get(n)
                .await
                .with_context(|| format!("get {}/{n}", kind.qualified()))?;
            let names = vec![obj.name_any()];
            (serde_json::to_value(obj)?, names)
        }
        None => {
            let list = api
                .list(&lp)
                .await
                .with_context(|| format!("list {}", kind.qualified()))?;
            let names = list.items.iter().map(ResourceExt::name_any).collect();
            (serde_json::to_value(list)?, names)
        }
    };
    match output {
        Output::Yaml => print!("{}", serde_saphyr::to_string(&found)?),
        Output::Json => println!("{}", serde_json::to_string_pretty(&found)?),
        // (Wide was printed as a table above.)
        Output::Name | Output::Wide => {
            for n in names {
                println!("{}/{n}", kind.qualified());
            }
        }
    }
    Ok(())
}

/// `stratus describe`: the object, then its events.
pub async fn describe(c: &ClientArgs, a: DescribeArgs) -> Result<()> {
    let s = Session::connect(c).await?;
    let kind = s.resolve(&a.kind).await?;
    let ns = s.namespace_of(&kind, None);
    let mut obj = s
        .api(&kind, ns.as_deref())
        .get(&a.name)
        .await
        .with_context(|| format!("get {}/{}", kind.qualified(), a.name))?;
    obj.metadata.managed_fields = None;
    print!("{}", serde_saphyr::to_string(&obj)?);
    let events: Api<Event> = match &ns {
        Some(ns) => Api::namespaced(s.client.clone(), ns),
        None => Api::all(s.client.clone()),
    };
    let uid = obj.metadata.uid.unwrap_or_default();
    let events = events
        .list(&ListParams::default().fields(&format!("involvedObject.uid={uid}")))
        .await
        .context("list the object's events")?;
    println!("Events:");
    if events.items.is_empty() {
        println!("  <none>");
    }
    for e in events.items {
        let component = e
            .source
            .and_then(|s| s.component)
            .or(e.reporting_component)
            .unwrap_or_default();
        println!(
            "  {:<8} {:<20} {:<24} {}",
            e.type_.unwrap_or_default(),
            e.reason.unwrap_or_default(),
            component,
            e.message.unwrap_or_default()
        );
    }
    Ok(())
}

/// Watches one object (absent: `None`) until `done` says so; false when `deadline` came first.
///
/// # Errors
/// When `done` fails, or the object cannot be listed at all (no such resource, no access).
async fn follow(
    api: Api<DynamicObject>,
    name: &str,
    deadline: Instant,
    mut done: impl FnMut(Option<&DynamicObject>) -> Result<bool>,
) -> Result<bool> {
    let mut changes = std::pin::pin!(watcher::watch_object(api, name).default_backoff());
    loop {
        let Ok(next) = tokio::time::timeout_at(deadline, changes.next()).await else {
            return Ok(false);
        };
        match next {
            Some(Ok(obj)) => {
                if done(obj.as_ref())? {
                    return Ok(true);
                }
            }
            Some(Err(watcher::Error::InitialListFailed(kube::Error::Api(e))))
                if (400..500).contains(&e.code) && e.code != 410 && e.code != 429 =>
            {
                return Err(kube::Error::Api(e)).context("list the object");
            }
            // The watcher starts again, after a pause.
            Some(Err(e)) => tracing::warn!(error = %e, "watch interrupted"),
            None => bail!("the watch ended"),
        }
    }
}

/// `stratus delete`: deletes, then waits (showing what it waits for) until the objects are gone.
pub async fn delete(c: &ClientArgs, a: DeleteArgs) -> Result<()> {
    let mut s = Session::connect(c).await?;
    let mut targets = Vec::new();
    if a.files.is_empty() {
        let name = a
            .kind
            .as_deref()
            .context("name a kind and objects, or use -f")?;
        let kind = s.resolve(name).await?;
        if a.names.is_empty() {
            bail!("name the objects to delete");
        }
        for n in &a.names {
            targets.push((kind.clone(), s.namespace_of(&kind, None), n.clone()));
        }
    } else {
        for doc in read_documents(&a.files)? {
            let kind = s.kind_of(&doc).await?;
            targets.push((kind.clone(), s.namespace_of(&kind, Some(&doc)), doc.name));
        }
    }
    let params = DeleteParams {
        propagation_policy: Some(a.cascade.into()),
        ..DeleteParams::default()
    };
    let mut remaining = Vec::new();
    for (kind, ns, name) in targets {
        let label = format!("{}/{name}", kind.qualified());
        let api = s.api(&kind, ns.as_deref());
        let answer = api
            .delete(&name, &params)
            .await
            .with_context(|| format!("delete {label}"))?;
        println!("{label} deleted");
        // The object when it is still there (finalizers), a Status when it is gone.
        if let Some(obj) = answer.left() {
            remaining.push((label, api, name, obj.metadata.uid));
        }
    }
    if a.no_wait {
        return Ok(());
    }
    let deadline = Instant::now() + Duration::from_secs(a.timeout);
    for (label, api, name, uid) in remaining {
        let mut shown = Vec::new();
        let gone = follow(api, &name, deadline, |obj| {
            // A new object of the same name is not the one deleted.
            let Some(obj) = obj.filter(|o| o.metadata.uid == uid) else {
                return Ok(true);
            };
            let finalizers = obj.finalizers();
            if !finalizers.is_empty() && finalizers != shown.as_slice() {
                eprintln!("{label}: waiting for finalizers {}", finalizers.join(", "));
                shown = finalizers.to_vec();
            }
            Ok(false)
        })
        .await
        .with_context(|| format!("wait for {label} to be deleted"))?;
        if !gone {
            bail!("timed out waiting for {label} to be deleted");
        }
    }
    Ok(())
}

fn condition_met(obj: &DynamicObject, type_: &str, status: &str) -> bool {
    obj.data
        .pointer("/status/conditions")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .any(|c| {
            c["type"]
                .as_str()
                .is_some_and(|t| t.eq_ignore_ascii_case(type_))
                && c["status"]
                    .as_str()
                    .is_some_and(|s| s.eq_ignore_ascii_case(status))
        })
}

/// `stratus wait --for=condition=X kind/name`: watches until the condition holds, printing
/// the object's conditions as they change.
pub async fn wait(c: &ClientArgs, a: WaitArgs) -> Result<()> {
    let s = Session::connect(c).await?;
    let (kind, name) = a
        .target
        .split_once('/')
        .context("the target must be kind/name")?;
    let kind = s.resolve(kind).await?;
    let label = format!("{}/{name}", kind.qualified());
    let api = s.api(&kind, s.namespace_of(&kind, None).as_deref());
    let deadline = Instant::now() + Duration::from_secs(a.timeout);
    let mut last = String::new();
    let met = follow(api, name, deadline, |obj| {
        let obj = match (obj, &a.for_) {
            (None, WaitFor::Delete) => return Ok(true),
            (None, WaitFor::Condition { .. }) => bail!("{label} not found"),
            (Some(o), WaitFor::Condition { type_, status }) if condition_met(o, type_, status) => {
                return Ok(true);
            }
            (Some(o), _) => o,
        };
        let now = format!(
            "{label}: phase {}, conditions {}",
            obj.data["status"]["phase"], obj.data["status"]["conditions"]
        );
        if now != last {
            eprintln!("{now}");
            last = now;
        }
        Ok(false)
    })
    .await?;
    if !met {
        bail!("timed out waiting for {} on {label}", a.for_);
    }
    match a.for_ {
        WaitFor::Delete => println!("{label} deleted"),
        WaitFor::Condition { .. } => println!("{label} condition met"),
    }
    Ok(())
}

/// An object as `diff` shows it: without what the server changes on every write.
fn for_diff(obj: Option<DynamicObject>) -> Result<String> {
    let Some(mut obj) = obj else {
        return Ok(String::new());
    };
    let m = &mut obj.metadata;
    m.managed_fields = None;
    m.resource_version = None;
    m.generation = None;
    m.creation_timestamp = None;
    m.uid = None;
    Ok(serde_saphyr::to_string(&obj)?)
}

/// `stratus diff -f`: what applying would change, from a server-side dry run.
pub async fn diff(c: &ClientArgs, a: DiffArgs) -> Result<bool> {
    let mut s = Session::connect(c).await?;
    let params = PatchParams::apply(&a.field_manager).force().dry_run();
    let mut changed = false;
    for doc in read_documents(&a.files)? {
        let kind = s.kind_of(&doc).await?;
        let label = format!("{}/{}", kind.qualified(), doc.name);
        let api = s.api(&kind, s.namespace_of(&kind, Some(&doc)).as_deref());
        let live = api
            .get_opt(&doc.name)
            .await
            .with_context(|| format!("get {label}"))?;
        let merged = api
            .patch(&doc.name, &params, &Patch::Apply(&doc.body))
            .await
            .with_context(|| format!("dry-run apply {label}"))?;
        let (old, new) = (for_diff(live)?, for_diff(Some(merged))?);
        if old != new {
            changed = true;
            let d = similar::TextDiff::from_lines(&old, &new);
            print!(
                "{}",
                d.unified_diff()
                    .header(&format!("live/{label}"), &format!("applied/{label}"))
            );
        }
    }
    Ok(changed)
}

/// `stratus login`.
#[derive(Debug, clap::Args)]
pub struct LoginArgs {
    /// The user to log in as.
    #[arg(long)]
    pub user: String,
    /// The project the new context selects (its namespace).
    #[arg(long)]
    pub project: Option<String>,
    /// How long the token lasts, in seconds (at most a day).
    #[arg(long, default_value_t = 3600)]
    pub expiration_seconds: i64,
    /// Read the password from this environment variable instead of standard input (where it
    /// is asked for without echo on a terminal, or read from the first line piped in).
    #[arg(long, default_value = "STRATUS_PASSWORD")]
    pub password_env: String,
}

fn set_named(list: &mut Value, name: &str, entry: Value) {
    if list.is_null() {
        *list = json!([]);
    }
    let Some(items) = list.as_array_mut() else {
        return;
    };
    items.retain(|i| i["name"] != name);
    items.push(entry);
}

/// Turns the terminal's echo off until dropped.
struct NoEcho;

impl NoEcho {
    /// Echo off on the terminal standard input is (`stty`, which acts on its standard input).
    fn new() -> Result<Self> {
        let ok = std::process::Command::new("stty")
            .arg("-echo")
            .stdin(std::process::Stdio::inherit())
            .status()
            .context("run stty to turn echo off")?
            .success();
        if !ok {
            bail!("stty could not turn the terminal's echo off");
        }
        Ok(Self)
    }
}

impl Drop for NoEcho {
    fn drop(&mut self) {
        let _ = std::process::Command::new("stty")
            .arg("echo")
            .stdin(std::process::Stdio::inherit())
            .status();
    }
}

/// The password, from standard input: prompted for without echo on a terminal, else the first
/// line of what is piped in.
fn read_password(user: &str) -> Result<String> {
    use std::io::{BufRead, IsTerminal};
    let stdin = std::io::stdin();
    let mut line = String::new();
    if stdin.is_terminal() {
        eprint!("Password for {user}: ");
        let echo_off = NoEcho::new()?;
        let read = stdin.lock().read_line(&mut line);
        drop(echo_off);
        eprintln!();
        read.context("read the password")?;
    } else {
        stdin
            .lock()
            .read_line(&mut line)
            .context("read the password from standard input")?;
    }
    Ok(line.trim_end_matches(['\r', '\n']).to_string())
}

/// `stratus login`: trades a user name and password for a token and adds a kubeconfig
/// context using it (kubectl then works as that user with no other change). The context goes
/// into the first kubeconfig file, which wins when several are merged.
pub async fn login(c: &ClientArgs, a: LoginArgs) -> Result<()> {
    let files = Kubeconfig::locate(c.kubeconfig.as_deref())?;
    let merged = files.read()?;
    let password = match std::env::var(&a.password_env) {
        Ok(p) => p,
        Err(_) => read_password(&a.user)?,
    };
    // Log in without the kubeconfig's own credentials.
    let mut config = files.config().await?;
    config.auth_info = Default::default();
    let client = kube::Client::try_from(config).context("build the API client")?;
    let body = serde_json::to_vec(
        &json!({"user": a.user, "password": password, "expirationSeconds": a.expiration_seconds}),
    )?;
    let req = Request::new("/apis/identity.stratus.dev/v1/tokens")
        .create(&PostParams::default(), body)
        .context("build the login request")?;
    let answer: Value = client.request(req).await.map_err(|e| match e {
        kube::Error::Api(s) if s.code == 401 => {
            anyhow::anyhow!("login failed: wrong user name or password")
        }
        e => anyhow::Error::new(e).context("log in"),
    })?;
    let token = answer["token"]
        .as_str()
        .context("the server answered no token")?;

    let current = merged.current_context.clone().unwrap_or_default();
    let cluster = merged
        .contexts
        .iter()
        .find(|x| x.name == current)
        .and_then(|x| x.context.as_ref())
        .map(|x| x.cluster.clone())
        .or_else(|| merged.clusters.first().map(|x| x.name.clone()))
        .context("the kubeconfig names no cluster")?;
    let path = files.primary();
    let mut v = serde_json::to_value(Kubeconfig::file(path).read()?)?;
    let name = format!("{}@{cluster}", a.user);
    set_named(
        &mut v["users"],
        &name,
        json!({"name": name, "user": {"token": token}}),
    );
    let mut ctx = json!({"cluster": cluster, "user": name});
    if let Some(p) = &a.project {
        ctx["namespace"] = json!(p);
    }
    set_named(
        &mut v["contexts"],
        &name,
        json!({"name": name, "context": ctx}),
    );
    v["current-context"] = json!(name);
    let yaml = serde_saphyr::to_string(&v)?;
    {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(path)
            .with_context(|| format!("write {}", path.display()))?;
        f.write_all(yaml.as_bytes())
            .with_context(|| format!("write {}", path.display()))?;
    }
    println!(
        "Logged in as {} (token valid until {}); context \"{name}\" is now current in {}",
        a.user,
        answer["expiresAt"].as_str().unwrap_or("?"),
        path.display()
    );
    Ok(())
}

/// `stratus console`.
#[derive(Debug, clap::Args)]
pub struct ConsoleArgs {
    /// Server name.
    pub name: String,
    /// Wait until the console shows this text (then print it all).
    #[arg(long)]
    pub wait_for: Option<String>,
    /// Seconds to wait for `--wait-for`.
    #[arg(long, default_value_t = 120)]
    pub timeout: u64,
}

/// `stratus evacuate SERVER…`: `DELETE servers/NAME/binding` for each, which takes the server
/// off its hypervisor (its claim, placement and host-cleanup finalizer go in one transaction);
/// the scheduler then places it again and that node's agent rebuilds it.
pub async fn evacuate(c: &ClientArgs, names: &[String]) -> Result<()> {
    let s = Session::connect(c).await?;
    let servers = Server::url_path(&(), Some(&s.namespace));
    for name in names {
        // kube-rs has no verb for deleting a subresource: its builder, one level down.
        let req = Request::new(format!("{servers}/{name}"))
            .delete("binding", &DeleteParams::default())
            .context("build the request")?;
        s.client
            .request::<Value>(req)
            .await
            .with_context(|| format!("evacuate server {name}"))?;
        println!("server/{name} evacuated: it waits for the scheduler to place it again");
    }
    Ok(())
}

/// `stratus console SERVER`: prints the server's serial console log. The log lives on its
/// hypervisor (`status.console.logPath`), so this reads it on that node.
pub async fn console(c: &ClientArgs, a: ConsoleArgs) -> Result<()> {
    let s = Session::connect(c).await?;
    let servers: Api<Server> = Api::namespaced(s.client.clone(), &s.namespace);
    let deadline = Instant::now() + Duration::from_secs(a.timeout);
    loop {
        let server = servers
            .get(&a.name)
            .await
            .with_context(|| format!("get server {}", a.name))?;
        let status = server.status.unwrap_or_default();
        let path = status.console.and_then(|c| c.log_path).map(PathBuf::from);
        let text = path
            .as_ref()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .map(|t| t.replace('\r', ""));
        let done = match (&text, &a.wait_for) {
            (Some(t), Some(w)) => t.contains(w.as_str()),
            (Some(_), None) => true,
            (None, _) => false,
        };
        if done {
            print!("{}", text.unwrap_or_default());
            return Ok(());
        }
        if a.wait_for.is_none() || Instant::now() >= deadline {
            let node = status
                .hypervisor
                .unwrap_or_else(|| "(not placed yet)".into());
            match (text, path) {
                (Some(t), _) => {
                    print!("{t}");
                    bail!(
                        "the console did not show {:?} in time",
                        a.wait_for.unwrap_or_default()
                    );
                }
                (None, Some(p)) => bail!(
                    "the console log is on hypervisor {node} at {}; run this on that node",
                    p.display()
                ),
                (None, None) => bail!("server {} has no console yet (hypervisor: {node})", a.name),
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_for_reads_a_condition_with_or_without_status_or_delete() {
        assert_eq!(
            "condition=Ready".parse(),
            Ok(WaitFor::Condition {
                type_: "Ready".into(),
                status: "True".into()
            })
        );
        assert_eq!(
            "condition=Ready=False".parse(),
            Ok(WaitFor::Condition {
                type_: "Ready".into(),
                status: "False".into()
            })
        );
        assert_eq!("delete".parse(), Ok(WaitFor::Delete));
        for bad in [
            "",
            "Ready",
            "condition=",
            "condition==True",
            "condition=Ready=",
        ] {
            assert!(bad.parse::<WaitFor>().is_err(), "{bad}");
        }
    }

    #[test]
    fn conditions_match_without_regard_to_case() -> Result<()> {
        let obj: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "compute.stratus.dev/v1", "kind": "Flavor",
            "metadata": {"name": "f"},
            "status": {"conditions": [{"type": "Ready", "status": "True"}]},
        }))?;
        assert!(condition_met(&obj, "ready", "true"));
        assert!(!condition_met(&obj, "Ready", "False"));
        assert!(!condition_met(&obj, "Degraded", "True"));
        Ok(())
    }

    #[test]
    fn documents_need_a_type_and_a_name_and_keep_their_text() -> Result<()> {
        let body = json!({
            "apiVersion": "compute.stratus.dev/v1", "kind": "Keypair",
            "metadata": {"name": "k", "namespace": "demo", "labels": null},
            "spec": {"publicKey": "x"},
        });
        let doc = Document::parse("f.yaml", body.clone())?;
        assert_eq!(
            (doc.types.kind.as_str(), doc.name.as_str()),
            ("Keypair", "k")
        );
        assert_eq!(doc.namespace.as_deref(), Some("demo"));
        assert_eq!(doc.body, body);
        let nameless = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {}});
        assert!(Document::parse("f.yaml", nameless).is_err());
        Ok(())
    }

    #[test]
    fn a_list_without_columns_is_shown_by_name() {
        let list = json!({"kind": "NamespaceList", "items": [
            {"metadata": {"name": "a"}}, {"metadata": {"name": "b"}},
        ]});
        let table = names_table(list);
        assert_eq!(table["rows"][1]["cells"], json!(["b"]));
        let one = names_table(json!({"kind": "Namespace", "metadata": {"name": "a"}}));
        assert_eq!(one["rows"][0]["cells"], json!(["a"]));
    }

    #[test]
    fn kinds_are_named_kind_dot_group_except_in_the_core_group() {
        let kind = |group: &str, kind: &str, plural: &str| Kind {
            ar: ApiResource {
                group: group.into(),
                version: "v1".into(),
                api_version: "v1".into(),
                kind: kind.into(),
                plural: plural.into(),
            },
            namespaced: true,
        };
        assert_eq!(
            kind("compute.stratus.dev", "Flavor", "flavors").qualified(),
            "flavor.compute.stratus.dev"
        );
        assert_eq!(kind("", "Event", "events").qualified(), "events");
    }

    #[test]
    fn cascade_maps_to_propagation_policy() {
        assert!(matches!(
            PropagationPolicy::from(Cascade::Foreground),
            PropagationPolicy::Foreground
        ));
        assert!(matches!(
            PropagationPolicy::from(Cascade::Orphan),
            PropagationPolicy::Orphan
        ));
    }
}
