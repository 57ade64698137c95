//! The client verbs: `apply`, `get`, `describe`, `delete`, `wait`, `diff`, over any Stratus
//! API server (kubectl remains a first-class client; these need nothing but `stratus`).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures::TryStreamExt;
use serde_json::{Value, json};

/// Options shared by every client verb.
#[derive(Debug, Clone, clap::Args)]
pub struct ClientArgs {
    /// kubeconfig to use (defaults to $KUBECONFIG, then ~/.kube/config).
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

/// `stratus get`.
#[derive(Debug, clap::Args)]
pub struct GetArgs {
    /// Kind, plural or short name (`servers`, `srv`, `Server`).
    pub kind: String,
    /// One object's name (all objects when absent).
    pub name: Option<String>,
    /// Output: table (default), wide, yaml, json, name.
    #[arg(short = 'o', long, default_value = "table")]
    pub output: String,
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
    /// Background, Foreground or Orphan.
    #[arg(long, default_value = "Background")]
    pub cascade: String,
}

/// `stratus wait`.
#[derive(Debug, clap::Args)]
pub struct WaitArgs {
    /// `kind/name`.
    pub target: String,
    /// `condition=Type` or `condition=Type=Status`, or `delete`.
    #[arg(long = "for")]
    pub for_: String,
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

/// A served resource found through discovery.
#[derive(Debug, Clone)]
struct Resource {
    group: String,
    version: String,
    kind: String,
    plural: String,
    namespaced: bool,
    short_names: Vec<String>,
}

impl Resource {
    fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    fn collection(&self, namespace: Option<&str>) -> String {
        let base = if self.group.is_empty() {
            format!("/api/{}", self.version)
        } else {
            format!("/apis/{}/{}", self.group, self.version)
        };
        match namespace {
            Some(ns) if self.namespaced => format!("{base}/namespaces/{ns}/{}", self.plural),
            _ => format!("{base}/{}", self.plural),
        }
    }

    fn qualified(&self) -> String {
        if self.group.is_empty() {
            self.plural.clone()
        } else {
            format!("{}.{}", self.kind.to_lowercase(), self.group)
        }
    }
}

/// A connection plus what discovery found.
pub struct Session {
    client: kube::Client,
    resources: Vec<Resource>,
    namespace: String,
}

fn request(
    method: &str,
    path: &str,
    content_type: &str,
    body: Vec<u8>,
) -> Result<http::Request<Vec<u8>>> {
    Ok(http::Request::builder()
        .method(method)
        .uri(path)
        .header("Content-Type", content_type)
        .body(body)?)
}

impl Session {
    /// Connects and discovers the served resources.
    pub async fn connect(args: &ClientArgs) -> Result<Self> {
        let (config, default_ns) = match &args.kubeconfig {
            Some(path) => {
                let kc = kube::config::Kubeconfig::read_from(path)
                    .with_context(|| format!("read {}", path.display()))?;
                let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default())
                    .await
                    .context("load kubeconfig")?;
                let ns = cfg.default_namespace.clone();
                (cfg, ns)
            }
            None => {
                let cfg = kube::Config::infer()
                    .await
                    .context("find a kubeconfig (set KUBECONFIG or --kubeconfig)")?;
                let ns = cfg.default_namespace.clone();
                (cfg, ns)
            }
        };
        let client = kube::Client::try_from(config).context("build the API client")?;
        let mut s = Self {
            client,
            resources: Vec::new(),
            namespace: args.namespace.clone().unwrap_or(default_ns),
        };
        s.discover().await?;
        Ok(s)
    }

    async fn get_json(&self, path: &str) -> Result<Value> {
        Ok(self
            .client
            .request::<Value>(request("GET", path, "application/json", vec![])?)
            .await?)
    }

    async fn discover(&mut self) -> Result<()> {
        let mut lists = vec![(
            "".to_string(),
            self.get_json("/api/v1")
                .await
                .context("discover the core API")?,
        )];
        let groups = self
            .get_json("/apis")
            .await
            .context("discover API groups")?;
        for g in groups["groups"].as_array().into_iter().flatten() {
            let gv = g["preferredVersion"]["groupVersion"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            let name = g["name"].as_str().unwrap_or_default().to_string();
            lists.push((
                name,
                self.get_json(&format!("/apis/{gv}"))
                    .await
                    .with_context(|| format!("discover {gv}"))?,
            ));
        }
        for (group, list) in lists {
            let gv = list["groupVersion"].as_str().unwrap_or_default();
            let version = gv.rsplit('/').next().unwrap_or_default().to_string();
            for r in list["resources"].as_array().into_iter().flatten() {
                let plural = r["name"].as_str().unwrap_or_default();
                if plural.contains('/') {
                    continue;
                }
                self.resources.push(Resource {
                    group: group.clone(),
                    version: version.clone(),
                    kind: r["kind"].as_str().unwrap_or_default().to_string(),
                    plural: plural.to_string(),
                    namespaced: r["namespaced"].as_bool().unwrap_or(false),
                    short_names: r["shortNames"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|s| s.as_str().map(String::from))
                        .collect(),
                });
            }
        }
        Ok(())
    }

    fn resolve(&self, name: &str) -> Result<Resource> {
        let (name, group) = match name.split_once('.') {
            Some((n, g)) => (n, Some(g)),
            None => (name, None),
        };
        let lower = name.to_lowercase();
        self.resources
            .iter()
            .filter(|r| group.is_none_or(|g| r.group == g))
            .find(|r| {
                r.plural == lower
                    || r.kind.to_lowercase() == lower
                    || r.short_names.contains(&lower)
            })
            .cloned()
            .with_context(|| format!("the server doesn't have a resource type \"{name}\""))
    }

    fn by_kind(&self, api_version: &str, kind: &str) -> Result<Resource> {
        self.resources
            .iter()
            .find(|r| r.api_version() == api_version && r.kind == kind)
            .cloned()
            .with_context(|| format!("no resource of kind {kind} in {api_version} is served"))
    }

    fn ns_for(&self, r: &Resource, obj: Option<&Value>) -> Option<String> {
        r.namespaced.then(|| {
            obj.and_then(|o| o.pointer("/metadata/namespace"))
                .and_then(Value::as_str)
                .map(String::from)
                .unwrap_or_else(|| self.namespace.clone())
        })
    }
}

/// Reads every document of the given files, directories or stdin.
fn read_documents(files: &[String]) -> Result<Vec<Value>> {
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
    for (name, text) in texts {
        let parsed: Vec<Value> =
            serde_saphyr::from_multiple(&text).with_context(|| format!("parse {name}"))?;
        docs.extend(parsed.into_iter().filter(|d| !d.is_null()));
    }
    Ok(docs)
}

fn name_of(obj: &Value) -> Result<String> {
    obj.pointer("/metadata/name")
        .and_then(Value::as_str)
        .map(String::from)
        .context("a document has no metadata.name")
}

/// `stratus apply -f`: server-side apply of every document.
pub async fn apply(c: &ClientArgs, a: ApplyArgs) -> Result<()> {
    let s = Session::connect(c).await?;
    for doc in read_documents(&a.files)? {
        let api_version = doc["apiVersion"]
            .as_str()
            .context("a document has no apiVersion")?;
        let kind = doc["kind"].as_str().context("a document has no kind")?;
        let r = s.by_kind(api_version, kind)?;
        let name = name_of(&doc)?;
        let path = format!(
            "{}/{name}",
            r.collection(s.ns_for(&r, Some(&doc)).as_deref())
        );
        let before = s
            .client
            .request::<Value>(request("GET", &path, "application/json", vec![])?)
            .await
            .ok();
        let query = format!(
            "?fieldManager={}&force={}",
            a.field_manager, a.force_conflicts
        );
        let after: Value = s
            .client
            .request(request(
                "PATCH",
                &format!("{path}{query}"),
                "application/apply-patch+yaml",
                serde_json::to_vec(&doc)?,
            )?)
            .await
            .with_context(|| format!("apply {}/{name}", r.qualified()))?;
        let verb = match before {
            None => "created",
            Some(b) if b["metadata"]["resourceVersion"] == after["metadata"]["resourceVersion"] => {
                "unchanged"
            }
            Some(_) => "configured",
        };
        println!("{}/{name} {verb}", r.qualified());
    }
    Ok(())
}

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

/// `stratus get`.
pub async fn get(c: &ClientArgs, a: GetArgs) -> Result<()> {
    let s = Session::connect(c).await?;
    let r = s.resolve(&a.kind)?;
    let ns = if a.all_namespaces {
        None
    } else {
        s.ns_for(&r, None)
    };
    let mut path = r.collection(ns.as_deref());
    if let Some(n) = &a.name {
        path = format!("{path}/{n}");
    }
    let mut query = Vec::new();
    if let Some(l) = &a.selector {
        query.push(format!("labelSelector={}", urlencode(l)));
    }
    if let Some(f) = &a.field_selector {
        query.push(format!("fieldSelector={}", urlencode(f)));
    }
    if !query.is_empty() {
        path = format!("{path}?{}", query.join("&"));
    }
    match a.output.as_str() {
        "table" | "wide" => {
            let req = http::Request::builder()
                .uri(&path)
                .header("Accept", "application/json;as=Table;v=v1;g=meta.k8s.io")
                .body(vec![])?;
            let table: Value = s
                .client
                .request(req)
                .await
                .with_context(|| format!("get {}", r.qualified()))?;
            if table["rows"].as_array().is_none_or(Vec::is_empty) {
                eprintln!("No resources found");
                return Ok(());
            }
            print_table(&table, a.output == "wide", a.all_namespaces && r.namespaced);
        }
        "yaml" | "json" | "name" => {
            let v = s
                .get_json(&path)
                .await
                .with_context(|| format!("get {}", r.qualified()))?;
            match a.output.as_str() {
                "yaml" => print!("{}", serde_saphyr::to_string(&v)?),
                "json" => println!("{}", serde_json::to_string_pretty(&v)?),
                _ => {
                    let items = if a.name.is_some() {
                        vec![v]
                    } else {
                        v["items"].as_array().cloned().unwrap_or_default()
                    };
                    for i in items {
                        println!(
                            "{}/{}",
                            r.qualified(),
                            i["metadata"]["name"].as_str().unwrap_or_default()
                        );
                    }
                }
            }
        }
        other => bail!("unknown output format \"{other}\": use table, wide, yaml, json or name"),
    }
    Ok(())
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// `stratus describe`: the object, then its events.
pub async fn describe(c: &ClientArgs, a: DescribeArgs) -> Result<()> {
    let s = Session::connect(c).await?;
    let r = s.resolve(&a.kind)?;
    let ns = s.ns_for(&r, None);
    let mut obj = s
        .get_json(&format!("{}/{}", r.collection(ns.as_deref()), a.name))
        .await
        .with_context(|| format!("get {}/{}", r.qualified(), a.name))?;
    if let Some(m) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
        m.remove("managedFields");
    }
    print!("{}", serde_saphyr::to_string(&obj)?);
    let uid = obj["metadata"]["uid"].as_str().unwrap_or_default();
    let events_path = match &ns {
        Some(ns) => format!("/api/v1/namespaces/{ns}/events"),
        None => "/api/v1/events".to_string(),
    };
    let events = s
        .get_json(&format!(
            "{events_path}?fieldSelector={}",
            urlencode(&format!("involvedObject.uid={uid}"))
        ))
        .await?;
    println!("Events:");
    let items = events["items"].as_array().cloned().unwrap_or_default();
    if items.is_empty() {
        println!("  <none>");
    }
    for e in items {
        println!(
            "  {:<8} {:<20} {:<24} {}",
            e["type"].as_str().unwrap_or_default(),
            e["reason"].as_str().unwrap_or_default(),
            e["source"]["component"]
                .as_str()
                .or(e["reportingComponent"].as_str())
                .unwrap_or_default(),
            e["message"].as_str().unwrap_or_default()
        );
    }
    Ok(())
}

/// `stratus delete`: deletes, then waits (showing what it waits for) until the objects are gone.
pub async fn delete(c: &ClientArgs, a: DeleteArgs) -> Result<()> {
    let s = Session::connect(c).await?;
    let mut targets = Vec::new();
    if a.files.is_empty() {
        let kind = a
            .kind
            .as_deref()
            .context("name a kind and objects, or use -f")?;
        let r = s.resolve(kind)?;
        if a.names.is_empty() {
            bail!("name the objects to delete");
        }
        for n in &a.names {
            targets.push((r.clone(), s.ns_for(&r, None), n.clone()));
        }
    } else {
        for doc in read_documents(&a.files)? {
            let r = s.by_kind(
                doc["apiVersion"].as_str().unwrap_or_default(),
                doc["kind"].as_str().unwrap_or_default(),
            )?;
            targets.push((r.clone(), s.ns_for(&r, Some(&doc)), name_of(&doc)?));
        }
    }
    let body = serde_json::to_vec(
        &json!({"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": a.cascade}),
    )?;
    for (r, ns, name) in &targets {
        let path = format!("{}/{name}", r.collection(ns.as_deref()));
        s.client
            .request::<Value>(request("DELETE", &path, "application/json", body.clone())?)
            .await
            .with_context(|| format!("delete {}/{name}", r.qualified()))?;
        println!("{}/{name} deleted", r.qualified());
    }
    if a.no_wait {
        return Ok(());
    }
    let deadline = Instant::now() + Duration::from_secs(a.timeout);
    let mut last = String::new();
    for (r, ns, name) in &targets {
        let path = format!("{}/{name}", r.collection(ns.as_deref()));
        loop {
            let obj = match s
                .client
                .request::<Value>(request("GET", &path, "application/json", vec![])?)
                .await
            {
                Err(kube::Error::Api(e)) if e.code == 404 => break,
                other => other?,
            };
            let waiting = format!(
                "{}/{name}: waiting for finalizers {}",
                r.qualified(),
                obj["metadata"]["finalizers"]
            );
            if waiting != last {
                eprintln!("{waiting}");
                last = waiting;
            }
            if Instant::now() > deadline {
                bail!(
                    "timed out waiting for {}/{name} to be deleted",
                    r.qualified()
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
    Ok(())
}

fn condition_met(obj: &Value, cond: &str, want: &str) -> bool {
    obj.pointer("/status/conditions")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .any(|c| {
            c["type"]
                .as_str()
                .is_some_and(|t| t.eq_ignore_ascii_case(cond))
                && c["status"]
                    .as_str()
                    .is_some_and(|s| s.eq_ignore_ascii_case(want))
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
    let r = s.resolve(kind)?;
    let (cond, want) = match a.for_.strip_prefix("condition=") {
        Some(rest) => match rest.split_once('=') {
            Some((c, v)) => (c.to_string(), v.to_string()),
            None => (rest.to_string(), "True".to_string()),
        },
        None if a.for_ == "delete" => (String::new(), String::new()),
        None => bail!("--for must be condition=TYPE[=STATUS] or delete"),
    };
    let coll = r.collection(s.ns_for(&r, None).as_deref());
    let deadline = Instant::now() + Duration::from_secs(a.timeout);
    let mut last = String::new();
    loop {
        let obj = match s
            .client
            .request::<Value>(request(
                "GET",
                &format!("{coll}/{name}"),
                "application/json",
                vec![],
            )?)
            .await
        {
            Err(kube::Error::Api(e)) if e.code == 404 && cond.is_empty() => {
                println!("{}/{name} deleted", r.qualified());
                return Ok(());
            }
            other => other.with_context(|| format!("get {}/{name}", r.qualified()))?,
        };
        if !cond.is_empty() && condition_met(&obj, &cond, &want) {
            println!("{}/{name} condition met", r.qualified());
            return Ok(());
        }
        let now = format!(
            "{}/{name}: phase {}, conditions {}",
            r.qualified(),
            obj["status"]["phase"],
            obj["status"]["conditions"]
        );
        if now != last {
            eprintln!("{now}");
            last = now;
        }
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            bail!(
                "timed out waiting for {} on {}/{name}",
                a.for_,
                r.qualified()
            );
        }
        let rv = obj["metadata"]["resourceVersion"].as_str().unwrap_or("0");
        let secs = remaining.as_secs().clamp(1, 60);
        let watch = format!(
            "{coll}?watch=true&resourceVersion={rv}&timeoutSeconds={secs}&fieldSelector={}",
            urlencode(&format!("metadata.name={name}"))
        );
        let events = s
            .client
            .request_events::<Value>(request("GET", &watch, "application/json", vec![])?)
            .await?;
        let mut events = std::pin::pin!(events);
        // One change is enough to look again.
        let _ = tokio::time::timeout(remaining, events.try_next()).await;
    }
}

/// `stratus diff -f`: what applying would change, from a server-side dry run.
pub async fn diff(c: &ClientArgs, a: DiffArgs) -> Result<bool> {
    let s = Session::connect(c).await?;
    let mut changed = false;
    for doc in read_documents(&a.files)? {
        let r = s.by_kind(
            doc["apiVersion"].as_str().unwrap_or_default(),
            doc["kind"].as_str().unwrap_or_default(),
        )?;
        let name = name_of(&doc)?;
        let path = format!(
            "{}/{name}",
            r.collection(s.ns_for(&r, Some(&doc)).as_deref())
        );
        let live = s
            .client
            .request::<Value>(request("GET", &path, "application/json", vec![])?)
            .await
            .ok();
        let merged: Value = s
            .client
            .request(request(
                "PATCH",
                &format!(
                    "{path}?fieldManager={}&force=true&dryRun=All",
                    a.field_manager
                ),
                "application/apply-patch+yaml",
                serde_json::to_vec(&doc)?,
            )?)
            .await
            .with_context(|| format!("dry-run apply {}/{name}", r.qualified()))?;
        let render = |v: Option<Value>| -> Result<String> {
            let Some(mut v) = v else {
                return Ok(String::new());
            };
            if let Some(m) = v.get_mut("metadata").and_then(Value::as_object_mut) {
                for f in [
                    "managedFields",
                    "resourceVersion",
                    "generation",
                    "creationTimestamp",
                    "uid",
                ] {
                    m.remove(f);
                }
            }
            Ok(serde_saphyr::to_string(&v)?)
        };
        let (old, new) = (render(live)?, render(Some(merged))?);
        if old != new {
            changed = true;
            let label = format!("{}/{name}", r.qualified());
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
    /// Read the password from this environment variable instead of standard input.
    #[arg(long, default_value = "STRATUS_PASSWORD")]
    pub password_env: String,
}

fn set_named(list: &mut Value, name: &str, entry: Value) {
    let Some(items) = list.as_array_mut() else {
        return;
    };
    items.retain(|i| i["name"] != name);
    items.push(entry);
}

/// `stratus login`: trades a user name and password for a token and adds a kubeconfig
/// context using it (kubectl then works as that user with no other change).
pub async fn login(c: &ClientArgs, a: LoginArgs) -> Result<()> {
    let path = match &c.kubeconfig {
        Some(p) => p.clone(),
        None => std::env::var_os("KUBECONFIG")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".kube/config")))
            .context("no kubeconfig: set KUBECONFIG or pass --kubeconfig")?,
    };
    let kc = kube::config::Kubeconfig::read_from(&path)
        .with_context(|| format!("read {}", path.display()))?;
    let password = match std::env::var(&a.password_env) {
        Ok(p) => p,
        Err(_) => {
            eprint!("Password for {}: ", a.user);
            let mut line = String::new();
            std::io::stdin()
                .read_line(&mut line)
                .context("read the password")?;
            line.trim_end_matches(['\r', '\n']).to_string()
        }
    };
    // Log in without the kubeconfig's own credentials.
    let mut config = kube::Config::from_custom_kubeconfig(kc.clone(), &Default::default())
        .await
        .context("load kubeconfig")?;
    config.auth_info = Default::default();
    let client = kube::Client::try_from(config).context("build the API client")?;
    let body = serde_json::to_vec(
        &json!({"user": a.user, "password": password, "expirationSeconds": a.expiration_seconds}),
    )?;
    let answer: Value = client
        .request(request(
            "POST",
            "/apis/identity.stratus.dev/v1/tokens",
            "application/json",
            body,
        )?)
        .await
        .map_err(|e| match e {
            kube::Error::Api(s) if s.code == 401 => {
                anyhow::anyhow!("login failed: wrong user name or password")
            }
            e => anyhow::Error::new(e).context("log in"),
        })?;
    let token = answer["token"]
        .as_str()
        .context("the server answered no token")?;

    let mut v = serde_json::to_value(&kc)?;
    let current = kc.current_context.clone().unwrap_or_default();
    let cluster = kc
        .contexts
        .iter()
        .find(|x| x.name == current)
        .and_then(|x| x.context.as_ref())
        .map(|x| x.cluster.clone())
        .or_else(|| kc.clusters.first().map(|x| x.name.clone()))
        .context("the kubeconfig names no cluster")?;
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
            .open(&path)?;
        f.write_all(yaml.as_bytes())?;
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
    let r = s.resolve("servers")?;
    let ns = s.ns_for(&r, None);
    for name in names {
        let path = format!("{}/{name}/binding", r.collection(ns.as_deref()));
        s.client
            .request::<Value>(request("DELETE", &path, "application/json", vec![])?)
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
    let r = s.resolve("servers")?;
    let ns = s.ns_for(&r, None);
    let deadline = Instant::now() + Duration::from_secs(a.timeout);
    loop {
        let obj = s
            .get_json(&format!("{}/{}", r.collection(ns.as_deref()), a.name))
            .await
            .with_context(|| format!("get server {}", a.name))?;
        let path = obj
            .pointer("/status/console/logPath")
            .and_then(Value::as_str)
            .map(PathBuf::from);
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
            let node = obj
                .pointer("/status/hypervisor")
                .and_then(Value::as_str)
                .unwrap_or("(not placed yet)");
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
