//! `servers/NAME/console`: a Server's serial console log, the last
//! [`MAX_BYTES`](crate::admission::console::MAX_BYTES) of it. The compute agent of the node
//! running the server writes it (PUT, the raw bytes); those who may change the server (its
//! project's members and admins, as OpenStack's console output is theirs) read it (GET, as
//! text). The log is kept with the Server's uid and deleted with the Server.

use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use crate::admission::console::{MAX_BYTES, key};
use crate::base::error::{ApiError, ApiResult};
use crate::http::server::AppState;
use crate::policy::authn::{Caller, Principal};
use crate::policy::request::RequestInfo;
use crate::storage::store::Guard;

const GROUP: &str = "compute.stratus.dev";

/// Answers a request for `…/namespaces/NS/servers/NAME/console`; `None` for any other path.
pub(crate) async fn call(
    state: &AppState,
    method: &Method,
    segs: &[&str],
    bytes: &[u8],
    caller: &Caller,
) -> Option<ApiResult<Response>> {
    let [
        "apis",
        GROUP,
        "v1",
        "namespaces",
        ns,
        "servers",
        name,
        "console",
    ] = segs
    else {
        return None;
    };
    Some(console(state, method, ns, name, bytes, caller).await)
}

async fn console(
    state: &AppState,
    method: &Method,
    ns: &str,
    name: &str,
    bytes: &[u8],
    caller: &Caller,
) -> ApiResult<Response> {
    if !crate::base::meta::is_dns1123_label(ns) {
        return Err(ApiError::bad_request(format!(
            "invalid namespace \"{ns}\": must be a DNS-1123 label"
        )));
    }
    if !crate::base::meta::is_dns1123_subdomain(name) {
        return Err(ApiError::bad_request(format!(
            "invalid name \"{name}\": must be a DNS-1123 subdomain"
        )));
    }
    let write = match *method {
        Method::GET => false,
        Method::PUT => true,
        ref m => {
            return Err(ApiError::method_not_allowed(format!(
                "{m} is not allowed on servers/{name}/console: it is read with GET and written with PUT"
            )));
        }
    };
    allowed(caller, ns, name, write)?;
    let api = &state.api;
    let server_key = crate::storage::keys::object(&api.prefix, GROUP, "servers", Some(ns), name);
    let server = api
        .store
        .get(&server_key)
        .await
        .map_err(ApiError::from)?
        .ok_or_else(|| ApiError::not_found(GROUP, "servers", name))?;
    let uid = server
        .value
        .pointer("/metadata/uid")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let console_key = key(&api.prefix, ns, name);
    if !write {
        let log = api
            .store
            .get(&console_key)
            .await
            .map_err(ApiError::from)?
            .filter(|c| c.value["uid"] == uid.as_str())
            .and_then(|c| c.value["log"].as_str().map(str::to_string))
            .unwrap_or_default();
        let mut r = (StatusCode::OK, log).into_response();
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        r.headers_mut().insert(
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        );
        return Ok(r);
    }
    if bytes.len() > MAX_BYTES {
        return Err(ApiError::too_large(MAX_BYTES));
    }
    if let Some(node) = caller.node() {
        let on = server
            .value
            .pointer("/status/hypervisor")
            .and_then(Value::as_str);
        if on != Some(node) {
            return Err(ApiError::forbidden(format!(
                "node \"{node}\" cannot write the console of servers \"{name}\" in project \"{ns}\": the server is not placed on it"
            )));
        }
    }
    let record = json!({
        "uid": uid,
        "node": caller.node().unwrap_or_default(),
        "log": String::from_utf8_lossy(bytes),
    });
    // Written only while the Server is as read: placed on this node, not deleted and made
    // again meanwhile.
    let written = api
        .store
        .write_leased(
            &[Guard::Revision(&server_key, server.mod_revision)],
            &[(&console_key, &record, 0)],
        )
        .await
        .map_err(ApiError::from)?;
    if written.is_none() {
        return Err(ApiError::conflict(
            GROUP,
            "servers",
            name,
            "the server changed while its console was written; write it again",
        ));
    }
    Ok(crate::resource::outcome::Outcome::success().into_response())
}

/// Who may read or write a console: system identities anything; a node writes (only, and only
/// for a server placed on it, decided on the stored Server); a user reads where a role lets
/// it change the server (a member or an admin of the project, or a cluster admin), never
/// writes; a service nothing.
fn allowed(caller: &Caller, ns: &str, name: &str, write: bool) -> ApiResult<()> {
    match caller.principal() {
        Principal::System(_) => Ok(()),
        Principal::Node(_) if write => Ok(()),
        Principal::Node(node) => Err(ApiError::forbidden(format!(
            "node \"{node}\" cannot read the console of servers \"{name}\": a node only writes the consoles of its servers"
        ))),
        Principal::User(user) if !write => {
            let info = RequestInfo {
                verb: "update".into(),
                group: Some(GROUP.into()),
                version: "v1".into(),
                resource: "servers".into(),
                subresource: String::new(),
                namespace: ns.into(),
                name: name.into(),
            };
            crate::policy::roles::authorize(user, &caller.grants, &info, true).map_err(|_| {
                ApiError::forbidden(format!(
                    "User \"{user}\" cannot read the console of servers \"{name}\" in project \"{ns}\": it is for the project's members and admins"
                ))
            })
        }
        Principal::User(user) => Err(ApiError::forbidden(format!(
            "User \"{user}\" cannot write the console of servers \"{name}\" in project \"{ns}\": only the node running the server writes it"
        ))),
        Principal::Service(_) => Err(crate::policy::credentials::service_refused(caller)),
    }
}
