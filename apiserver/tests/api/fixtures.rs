//! A cloud on the in-memory store, driven through the verbs as the HTTP layer drives them, and
//! builders for the objects the tests write.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use serde_json::{Value, json};
use stratus_api_types::identity::Role;
use stratus_api_types::ports::CLAIMED_BY;
use stratus_apiserver::base::error::{ApiError, ApiResult};
use stratus_apiserver::policy::authn::Caller;
use stratus_apiserver::policy::request::RequestInfo;
use stratus_apiserver::policy::roles::Grant;
use stratus_apiserver::policy::{Decider, authorize};
use stratus_apiserver::resource::outcome::Outcome;
use stratus_apiserver::resource::registry::Registry;
use stratus_apiserver::resource::review::AllowAll;
use stratus_apiserver::resource::table::Rendering;
use stratus_apiserver::resource::verbs::{Api, Params, Target};
use stratus_apiserver::storage::store::Stored;
use stratus_apiserver::storage::store::{Paging, Store};

const PREFIX: &str = "/registry";
pub const JSON: &str = "application/json";
pub const YAML: &str = "application/yaml";
pub const STRATEGIC: &str = "application/strategic-merge-patch+json";
pub const MERGE: &str = "application/merge-patch+json";
pub const JSON_PATCH: &str = "application/json-patch+json";
pub const APPLY: &str = "application/apply-patch+yaml";

/// An object to write, built field by field.
#[derive(Debug, Clone)]
pub struct Obj(pub Value);

impl Obj {
    fn new(api_version: &str, kind: &str, ns: Option<&str>, name: &str, spec: Value) -> Self {
        let mut metadata = json!({"name": name});
        if let Some(ns) = ns {
            metadata["namespace"] = json!(ns);
        }
        Self(json!({"apiVersion": api_version, "kind": kind, "metadata": metadata, "spec": spec}))
    }

    /// A Flavor of `vcpus` and `ram_mib`, with a 1 GiB disk.
    pub fn flavor(name: &str, vcpus: u32, ram_mib: u64) -> Self {
        Self::new(
            "compute.stratus.dev/v1",
            "Flavor",
            None,
            name,
            json!({"vcpus": vcpus, "ramMiB": ram_mib, "diskGiB": 1}),
        )
    }

    /// A Project (its namespace).
    pub fn project(name: &str) -> Self {
        Self::new("identity.stratus.dev/v1", "Project", None, name, json!({}))
    }

    /// A Server of flavor `small`, booting image `cirros`.
    pub fn server(ns: &str, name: &str) -> Self {
        Self::new(
            "compute.stratus.dev/v1",
            "Server",
            Some(ns),
            name,
            json!({"flavor": "small", "image": "cirros"}),
        )
    }

    /// A Server of flavor `small`, booting image `cirros`, on Port `port` alone.
    pub fn server_on_port(ns: &str, name: &str, port: &str) -> Self {
        Self::server(ns, name).spec("networks", json!([{"port": port}]))
    }

    /// A Network.
    pub fn network(ns: &str, name: &str) -> Self {
        Self::new(
            "network.stratus.dev/v1",
            "Network",
            Some(ns),
            name,
            json!({}),
        )
    }

    /// A Port on Network `network`.
    pub fn port(ns: &str, name: &str, network: &str) -> Self {
        Self::new(
            "network.stratus.dev/v1",
            "Port",
            Some(ns),
            name,
            json!({"network": network}),
        )
    }

    /// A Quota with `limits`.
    pub fn quota(ns: &str, name: &str, limits: Value) -> Self {
        Self::new(
            "identity.stratus.dev/v1",
            "Quota",
            Some(ns),
            name,
            json!({"limits": limits}),
        )
    }

    /// A Hypervisor that holds exactly what its agent reports (no overcommit, nothing
    /// reserved for the host).
    pub fn hypervisor(name: &str) -> Self {
        Self::new(
            "compute.stratus.dev/v1",
            "Hypervisor",
            None,
            name,
            json!({
                "cpuAllocationRatio": 1.0,
                "ramAllocationRatio": 1.0,
                "reservedHostMemoryMiB": 0,
            }),
        )
    }

    /// With a label.
    pub fn label(mut self, k: &str, v: &str) -> Self {
        self.0["metadata"]["labels"][k] = json!(v);
        self
    }

    /// With a finalizer.
    pub fn finalizer(mut self, f: &str) -> Self {
        let m = &mut self.0["metadata"];
        match m.get_mut("finalizers").and_then(Value::as_array_mut) {
            Some(list) => list.push(json!(f)),
            None => m["finalizers"] = json!([f]),
        }
        self
    }

    /// With a `spec` field set.
    pub fn spec(mut self, field: &str, v: Value) -> Self {
        self.0["spec"][field] = v;
        self
    }

    fn kind(&self) -> &str {
        self.0["kind"].as_str().unwrap_or_default()
    }

    fn namespace(&self) -> Option<&str> {
        self.0["metadata"]["namespace"].as_str()
    }
}

/// The code and body of a verb's JSON answer.
pub fn answer(o: Outcome) -> (u16, Value) {
    match o {
        Outcome::Json { code, body, .. } => (code, body),
        Outcome::Watch(_) => panic!("a watch where a document was expected"),
        Outcome::List(_) => panic!("a streamed list: read it with `Outcome::collected` first"),
    }
}

/// An object's `metadata.resourceVersion`.
pub fn rv(obj: &Value) -> i64 {
    obj["metadata"]["resourceVersion"]
        .as_str()
        .and_then(|r| r.parse().ok())
        .unwrap_or_else(|| panic!("no resourceVersion in {obj}"))
}

/// The names of a list's items.
pub fn names(list: &Value) -> Vec<String> {
    list["items"]
        .as_array()
        .unwrap_or_else(|| panic!("not a list: {list}"))
        .iter()
        .map(|i| {
            i["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        })
        .collect()
}

/// The error of a verb that should have failed.
#[track_caller]
pub fn refused<T: std::fmt::Debug>(r: ApiResult<T>) -> ApiError {
    match r {
        Ok(v) => panic!("accepted: {v:?}"),
        Err(e) => e,
    }
}

/// The field the first cause of `e` names ("" when it names none).
pub fn field(e: &ApiError) -> &str {
    e.details
        .causes
        .first()
        .map(|c| c.field.as_str())
        .unwrap_or_default()
}

/// Asserts a verb was refused with `code`, its first cause naming `on`; the error, for more
/// checks.
#[track_caller]
pub fn refused_naming<T: std::fmt::Debug>(r: ApiResult<T>, code: u16, on: &str) -> ApiError {
    let e = refused(r);
    assert_eq!((e.code, field(&e)), (code, on), "{e:?}");
    e
}

fn params(query: &str) -> Params {
    Params::parse(Some(query)).expect("a valid query")
}

/// An API server's verbs over an in-memory store.
pub struct Cloud {
    pub api: Api,
}

impl Cloud {
    /// An empty cloud.
    pub async fn new() -> Self {
        Self::over(Store::memory()).await
    }

    /// An empty cloud whose store reads whole ranges in pages of `paging`.
    pub async fn with_paging(paging: Paging) -> Self {
        Self::over(Store::memory().with_paging(paging)).await
    }

    /// An empty cloud over `store` (a real etcd's: `api/etcd.rs`).
    pub async fn over(store: Store) -> Self {
        let registry = Arc::new(Registry::stratus().expect("the Stratus kinds"));
        let api = Api::open(store, registry, PREFIX, Duration::from_millis(200))
            .await
            .expect("open the API");
        Self { api }
    }

    /// A second API server on the same store (its own watch feeds and placement locks).
    pub async fn replica(&self) -> Self {
        let api = Api::open(
            self.api.store.clone(),
            Arc::clone(&self.api.registry),
            PREFIX,
            Duration::from_millis(200),
        )
        .await
        .expect("open the API");
        Self { api }
    }

    /// A cloud with project `demo` and flavor `small` (1 vCPU, 512 MiB).
    pub async fn with_demo() -> Self {
        let c = Self::new().await;
        c.create(&Obj::project("demo")).await.expect("project demo");
        c.create(&Obj::flavor("small", 1, 512))
            .await
            .expect("flavor small");
        c
    }

    /// The target of `kind` objects (`name`: one of them).
    pub fn target(&self, kind: &str, ns: Option<&str>, name: Option<&str>) -> Target {
        let rt = self
            .api
            .registry
            .all()
            .iter()
            .find(|rt| rt.kind == kind && rt.view.is_none())
            .unwrap_or_else(|| panic!("no kind {kind}"));
        Target {
            rt: Arc::clone(rt),
            namespace: ns.map(String::from),
            name: name.map(String::from),
            subresource: None,
        }
    }

    /// The `status` subresource of one object.
    pub fn status(&self, kind: &str, ns: Option<&str>, name: &str) -> Target {
        Target {
            subresource: Some("status".into()),
            ..self.target(kind, ns, Some(name))
        }
    }

    /// Node `node`'s storage agent records `address` as pool `pool`'s storage address.
    pub async fn storage_address(&self, node: &str, pool: &str, address: &str) {
        self.node(node)
            .patch(
                &self.status("StoragePool", None, pool),
                MERGE,
                &json!({"status": {"storageAddress": address}}).to_string(),
            )
            .await
            .expect("the pool's storage address");
    }

    fn target_of(&self, o: &Obj) -> Target {
        self.target(o.kind(), o.namespace(), None)
    }

    /// `POST`s an object; the stored object.
    pub async fn create(&self, o: &Obj) -> ApiResult<Value> {
        self.create_with(o, "").await.map(|(_, body)| body)
    }

    /// `POST`s an object with a query.
    pub async fn create_with(&self, o: &Obj, query: &str) -> ApiResult<(u16, Value)> {
        let bytes = serde_json::to_vec(&o.0).expect("JSON");
        self.api
            .create(
                &self.target_of(o),
                &bytes,
                JSON,
                &params(query),
                "test",
                &AllowAll,
            )
            .await
            .map(answer)
    }

    /// `GET`s one object.
    pub async fn get(&self, kind: &str, ns: Option<&str>, name: &str) -> ApiResult<Value> {
        self.api
            .get(
                &self.target(kind, ns, Some(name)),
                Rendering::Full,
                &Params::default(),
                None,
            )
            .await
            .map(|o| answer(o).1)
    }

    /// `GET`s a collection with a query.
    pub async fn list(&self, kind: &str, ns: Option<&str>, query: &str) -> ApiResult<Value> {
        self.api
            .list(
                &self.target(kind, ns, None),
                Rendering::Full,
                &params(query),
            )
            .await?
            .collected()
            .await
            .map(|o| answer(o).1)
    }

    /// `PUT`s an object (`t`: the object or its status).
    pub async fn put(&self, t: &Target, obj: &Value) -> ApiResult<Value> {
        let bytes = serde_json::to_vec(obj).expect("JSON");
        self.api
            .update(t, &bytes, JSON, &Params::default(), "test", &AllowAll)
            .await
            .map(|o| answer(o).1)
    }

    /// `PATCH`es an object (`t`: the object or its status) with a query.
    pub async fn patch(
        &self,
        t: &Target,
        content_type: &str,
        patch: &Value,
        query: &str,
    ) -> ApiResult<(u16, Value)> {
        let bytes = serde_json::to_vec(patch).expect("JSON");
        self.api
            .patch(t, &bytes, content_type, &params(query), "test", &AllowAll)
            .await
            .map(answer)
    }

    /// `DELETE`s one object with a query.
    pub async fn delete(
        &self,
        kind: &str,
        ns: Option<&str>,
        name: &str,
        query: &str,
    ) -> ApiResult<(u16, Value)> {
        self.api
            .delete(
                &self.target(kind, ns, Some(name)),
                b"",
                &params(query),
                &AllowAll,
            )
            .await
            .map(answer)
    }

    /// `DELETE`s a collection with a query.
    pub async fn delete_collection(
        &self,
        kind: &str,
        ns: Option<&str>,
        query: &str,
    ) -> ApiResult<(u16, Value)> {
        self.api
            .delete_collection(&self.target(kind, ns, None), b"", &params(query), &AllowAll)
            .await
            .map(answer)
    }

    /// The store's current revision.
    pub async fn revision(&self) -> i64 {
        self.api.store.revision().await.expect("revision")
    }

    /// A Hypervisor `name` whose agent reported `vcpus` and `ram_mib` (and 100 GiB of disk).
    pub async fn hypervisor(&self, name: &str, vcpus: u64, ram_mib: u64) {
        self.create(&Obj::hypervisor(name))
            .await
            .expect("hypervisor");
        let capacity =
            json!({"status": {"capacity": {"vcpus": vcpus, "ramMiB": ram_mib, "diskGiB": 100}}});
        self.patch(&self.status("Hypervisor", None, name), MERGE, &capacity, "")
            .await
            .expect("report capacity");
    }

    /// Creates each object in turn; panics on the first refused, naming it.
    pub async fn create_all(&self, objs: &[Obj]) {
        for o in objs {
            if let Err(e) = self.create(o).await {
                panic!("create {} {}: {e:?}", o.kind(), o.0["metadata"]["name"]);
            }
        }
    }

    /// The name of the Server whose claim Port `name` of project `ns` carries ("" when none).
    pub async fn port_claim(&self, ns: &str, name: &str) -> String {
        let p = self.get("Port", Some(ns), name).await.expect("port");
        p["metadata"]["annotations"][CLAIMED_BY]
            .as_str()
            .and_then(|v| v.split_once('/'))
            .map(|(s, _)| s.to_owned())
            .unwrap_or_default()
    }

    /// `POST servers/{name}/binding` onto `hypervisor`.
    pub async fn bind(&self, ns: &str, server: &str, hypervisor: &str) -> ApiResult<u16> {
        let body = json!({"target": {"name": hypervisor}}).to_string();
        self.api
            .bind(
                &self.target("Server", Some(ns), Some(server)),
                body.as_bytes(),
                JSON,
                &AllowAll,
            )
            .await
            .map(|o| answer(o).0)
    }

    /// Opens a watch with a query; its events as `(type, object)`.
    pub async fn watch(&self, kind: &str, ns: Option<&str>, query: &str) -> ApiResult<Events> {
        let o = stratus_apiserver::resource::watch::watch(
            &self.api,
            &self.target(kind, ns, None),
            Rendering::Full,
            &params(query),
            Duration::from_secs(60),
        )
        .await?;
        match o {
            Outcome::Watch(stream) => Ok(Events(stream)),
            Outcome::Json { code, body, .. } => panic!("{code} {body} where a watch was expected"),
            Outcome::List(_) => panic!("a list where a watch was expected"),
        }
    }
}

/// A watch's events.
pub struct Events(stratus_apiserver::resource::outcome::Events);

impl Events {
    /// The next event, within 5 s.
    pub async fn next(&mut self) -> (String, Value) {
        let chunk = tokio::time::timeout(Duration::from_secs(5), self.0.next())
            .await
            .expect("an event within 5 s")
            .expect("the watch goes on");
        let Ok(line) = chunk;
        let ev: Value = serde_json::from_slice(&line).expect("an event is JSON");
        (
            ev["type"].as_str().unwrap_or_default().to_string(),
            ev["object"].clone(),
        )
    }
}

/// A caller's requests, decided as the HTTP layer decides them: the request-level checks on
/// the typed request first, then the verb, whose policy decides on the final objects.
pub struct As<'a> {
    cloud: &'a Cloud,
    caller: Caller,
}

impl Cloud {
    /// Requests from node `name`'s agent (`system:node:NAME` from the token file).
    pub fn node(&self, name: &str) -> As<'_> {
        As {
            cloud: self,
            caller: Caller {
                user: format!("system:node:{name}"),
                user_agent: "agent".into(),
                system: true,
                grants: Vec::new(),
                claims: None,
            },
        }
    }

    /// Requests from user `name` holding `grants` (`(namespace, role)`, None: cluster-wide).
    pub fn user(&self, name: &str, grants: &[(Option<&str>, Role)]) -> As<'_> {
        As {
            cloud: self,
            caller: Caller {
                user: name.into(),
                user_agent: "kubectl".into(),
                system: false,
                grants: grants
                    .iter()
                    .map(|(ns, role)| Grant {
                        namespace: ns.map(String::from),
                        role: *role,
                    })
                    .collect(),
                claims: None,
            },
        }
    }
}

/// The path of a request on `t`.
fn path_of(t: &Target) -> String {
    let mut p = if t.rt.group.is_empty() {
        format!("/api/{}", t.rt.version)
    } else {
        format!("/apis/{}/{}", t.rt.group, t.rt.version)
    };
    if let Some(ns) = &t.namespace {
        p.push_str(&format!("/namespaces/{ns}"));
    }
    p.push_str(&format!("/{}", t.rt.plural));
    if let Some(n) = &t.name {
        p.push_str(&format!("/{n}"));
    }
    if let Some(s) = &t.subresource {
        p.push_str(&format!("/{s}"));
    }
    p
}

impl As<'_> {
    async fn authorized(
        &self,
        method: &str,
        t: &Target,
        p: &Params,
    ) -> ApiResult<Option<(String, Stored)>> {
        let info = RequestInfo::parse(method, &path_of(t), p.flag("watch"));
        authorize(&self.cloud.api, &info, p, &self.caller).await
    }

    /// `POST` of `body` (of `content_type`) to `t`'s collection.
    pub async fn create(&self, t: &Target, content_type: &str, body: &str) -> ApiResult<Value> {
        let p = Params::default();
        self.authorized("POST", t, &p).await?;
        let o = self
            .cloud
            .api
            .create(
                t,
                body.as_bytes(),
                content_type,
                &p,
                "test",
                &Decider::new(&self.caller),
            )
            .await?;
        Ok(answer(o).1)
    }

    /// `PUT` of `body` (of `content_type`) to `t`.
    pub async fn put(&self, t: &Target, content_type: &str, body: &str) -> ApiResult<Value> {
        let p = Params::default();
        self.authorized("PUT", t, &p).await?;
        let o = self
            .cloud
            .api
            .update(
                t,
                body.as_bytes(),
                content_type,
                &p,
                "test",
                &Decider::new(&self.caller),
            )
            .await?;
        Ok(answer(o).1)
    }

    /// `PATCH` of `t` with `body` of `content_type` (applies as field manager `caller`,
    /// forcing: taking every field it names from other managers).
    pub async fn patch(&self, t: &Target, content_type: &str, body: &str) -> ApiResult<Value> {
        let p = params("fieldManager=caller&force=true");
        self.authorized("PATCH", t, &p).await?;
        let o = self
            .cloud
            .api
            .patch(
                t,
                body.as_bytes(),
                content_type,
                &p,
                "test",
                &Decider::new(&self.caller),
            )
            .await?;
        Ok(answer(o).1)
    }

    /// `DELETE` of `t` with `body` (DeleteOptions, or nothing).
    pub async fn delete(&self, t: &Target, body: &str) -> ApiResult<Value> {
        let p = Params::default();
        self.authorized("DELETE", t, &p).await?;
        let o = self
            .cloud
            .api
            .delete(t, body.as_bytes(), &p, &Decider::new(&self.caller))
            .await?;
        Ok(answer(o).1)
    }

    /// `DELETE` of `t`'s collection.
    pub async fn delete_collection(&self, t: &Target) -> ApiResult<Value> {
        let p = Params::default();
        self.authorized("DELETE", t, &p).await?;
        let o = self
            .cloud
            .api
            .delete_collection(t, b"", &p, &Decider::new(&self.caller))
            .await?;
        Ok(answer(o).1)
    }

    /// `POST servers/{name}/binding` with `body`.
    pub async fn bind(&self, t: &Target, body: &str) -> ApiResult<u16> {
        let t = Target {
            subresource: Some("binding".into()),
            ..t.clone()
        };
        let p = Params::default();
        self.authorized("POST", &t, &p).await?;
        let o = self
            .cloud
            .api
            .bind(&t, body.as_bytes(), JSON, &Decider::new(&self.caller))
            .await?;
        Ok(answer(o).0)
    }

    /// `GET` of `t` (one object), or a list of `t`'s collection with `query`.
    pub async fn read(&self, t: &Target, query: &str) -> ApiResult<Value> {
        let p = params(query);
        let read = self.authorized("GET", t, &p).await?;
        let o = match t.name {
            Some(_) => {
                // Answered with what authorising it read (the object it names), as the HTTP
                // layer does.
                let read = read.map(|(_, s)| s);
                self.cloud.api.get(t, Rendering::Full, &p, read).await?
            }
            None => {
                self.cloud
                    .api
                    .list(t, Rendering::Full, &p)
                    .await?
                    .collected()
                    .await?
            }
        };
        Ok(answer(o).1)
    }
}
