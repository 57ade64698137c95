//! The floating IP association controller: a FloatingIP naming a Port (in its namespace) is
//! associated with one of the port's fixed addresses (`spec.fixedIP` when it is one of them,
//! else the first) and with the Router of its namespace that has an interface on that
//! address's subnet and its gateway on the floating IP's network: `status.fixedIP` and
//! `status.router`, the `Associated` condition saying why not when there is none. The address
//! itself was allocated at admission.

use std::sync::Arc;

use futures::StreamExt;
use kube::api::Api;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use stratus_api_types::common::{Blocked, ConditionType, Reason};
use stratus_api_types::network::{FloatingIP, FloatingIPStatus, Port, Router, network_ref};
use stratus_runtime::policy::kube_retry;
use stratus_runtime::{Classify, Retry, Runtime};

/// The field manager of the statuses this controller writes.
const MANAGER: &str = "stratus-floating-ip-controller";

/// Why a reconcile failed, and whether retrying can help.
#[derive(Debug, thiserror::Error)]
pub enum FloatingIpsError {
    /// A request to the API server failed.
    #[error("request to the API server")]
    Api(#[source] kube::Error),
    /// An object without a namespace (a bug elsewhere).
    #[error("object lacks a namespace")]
    Incomplete,
}

impl Classify for FloatingIpsError {
    fn retry(&self) -> Retry {
        match self {
            Self::Api(e) => kube_retry(e),
            Self::Incomplete => Retry::Never,
        }
    }
}

/// What a FloatingIP is associated with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Association {
    /// The port's fixed address it is NATed to.
    pub fixed_ip: String,
    /// The Router doing it.
    pub router: String,
}

/// The association of `fip` (in namespace `ns`) given its port (`None`: not found) and the
/// Routers of its namespace.
///
/// # Errors
/// Why there is none.
pub fn associate(
    fip: &FloatingIP,
    ns: &str,
    port: Option<&Port>,
    routers: &[Arc<Router>],
) -> Result<Association, Blocked> {
    let Some(port_name) = fip.spec.port.as_deref() else {
        return Err(Blocked::new(
            Reason::Unassociated,
            "spec.port names no port",
        ));
    };
    let Some(port) = port else {
        return Err(Blocked::new(
            Reason::PortNotFound,
            format!("spec.port: port {port_name:?} does not exist"),
        ));
    };
    let fixed = port
        .status
        .as_ref()
        .map(|s| s.fixed_ips.as_slice())
        .unwrap_or_default();
    let chosen = match fip.spec.fixed_ip.as_deref() {
        Some(want) => fixed.iter().find(|f| f.ip_address == want).ok_or_else(|| {
            Blocked::new(
                Reason::FixedIPNotFound,
                format!("spec.fixedIP: {want} is not an address of port {port_name:?}"),
            )
        })?,
        None => fixed
            .iter()
            .find(|f| f.ip_address.parse::<std::net::Ipv4Addr>().is_ok())
            .ok_or_else(|| {
                Blocked::new(
                    Reason::FixedIPNotFound,
                    format!("spec.port: port {port_name:?} has no IPv4 address yet"),
                )
            })?,
    };
    let network = network_ref(ns, &fip.spec.floating_network);
    let mut candidates: Vec<&Arc<Router>> = routers
        .iter()
        .filter(|r| r.namespace().as_deref() == Some(ns) && r.metadata.deletion_timestamp.is_none())
        .filter(|r| r.spec.interfaces.iter().any(|i| i.subnet == chosen.subnet))
        .filter(|r| {
            r.spec
                .external_gateway
                .as_ref()
                .is_some_and(|g| network_ref(ns, &g.network) == network)
        })
        .collect();
    candidates.sort_by_key(|r| r.name_any());
    match candidates.first() {
        Some(r) => Ok(Association {
            fixed_ip: chosen.ip_address.clone(),
            router: r.name_any(),
        }),
        None => Err(Blocked::new(
            Reason::NoRouter,
            format!(
                "no router has an interface on subnet {:?} and its gateway on network {:?}",
                chosen.subnet, fip.spec.floating_network
            ),
        )),
    }
}

struct Ctx {
    client: Client,
    runtime: Runtime<FloatingIP>,
    routers: Store<Router>,
}

async fn reconcile(fip: Arc<FloatingIP>, ctx: Arc<Ctx>) -> Result<Action, FloatingIpsError> {
    let result = sync(&fip, &ctx).await;
    ctx.runtime.finish(&fip, result).await
}

async fn sync(fip: &FloatingIP, ctx: &Ctx) -> Result<Action, FloatingIpsError> {
    if fip.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let ns = fip.namespace().ok_or(FloatingIpsError::Incomplete)?;
    let port = match fip.spec.port.as_deref() {
        Some(p) => Api::<Port>::namespaced(ctx.client.clone(), &ns)
            .get_opt(p)
            .await
            .map_err(FloatingIpsError::Api)?,
        None => None,
    };
    stratus_runtime::store_ready(&ctx.routers).await;
    let mut status: FloatingIPStatus = fip.status.clone().unwrap_or_default();
    let gen_ = fip.metadata.generation;
    match associate(fip, &ns, port.as_ref(), &ctx.routers.state()) {
        Ok(a) => {
            let message = format!("{} through router {}", a.fixed_ip, a.router);
            status.fixed_ip = Some(a.fixed_ip);
            status.router = Some(a.router);
            ConditionType::Associated
                .yes(Reason::Associated, message)
                .set(&mut status.conditions, gen_);
        }
        Err(b) => {
            status.fixed_ip = None;
            status.router = None;
            b.condition(ConditionType::Associated)
                .set(&mut status.conditions, gen_);
        }
    }
    status.observed_generation = gen_;
    ctx.runtime
        .write_status(fip, &status)
        .await
        .map_err(FloatingIpsError::Api)?;
    Ok(Action::await_change())
}

fn error_policy(fip: Arc<FloatingIP>, e: &FloatingIpsError, ctx: Arc<Ctx>) -> Action {
    ctx.runtime.error_policy(&fip, e)
}

/// Runs the floating IP association controller until its watches end.
pub async fn run(client: Client) {
    let controller = Controller::new(
        Api::<FloatingIP>::all(client.clone()),
        watcher::Config::default(),
    );
    let fips = controller.store();
    let (router_store, router_writer) = reflector::store();
    let router_stream = watcher(
        Api::<Router>::all(client.clone()),
        watcher::Config::default(),
    )
    .default_backoff()
    .reflect(router_writer)
    .applied_objects();
    let ctx = Arc::new(Ctx {
        client: client.clone(),
        runtime: Runtime::new(client.clone(), MANAGER),
        routers: router_store,
    });
    let in_ns = |fips: &Store<FloatingIP>, ns: Option<String>, port: Option<String>| {
        fips.state()
            .into_iter()
            .filter(|f| {
                f.namespace() == ns
                    && port
                        .as_ref()
                        .is_none_or(|p| f.spec.port.as_ref() == Some(p))
            })
            .map(|f| ObjectRef::from_obj(&*f))
            .collect::<Vec<_>>()
    };
    let (for_ports, for_routers) = (fips.clone(), fips);
    controller
        // A port's addresses, or its appearance, decide the fixed address.
        .watches(
            Api::<Port>::all(client),
            watcher::Config::default(),
            move |p| in_ns(&for_ports, p.namespace(), Some(p.name_any())),
        )
        // Any router of the namespace may be the one.
        .watches_stream(router_stream, move |r: Router| {
            in_ns(&for_routers, r.namespace(), None)
        })
        .run(reconcile, error_policy, ctx)
        .for_each(|_| async {})
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn fip(spec: serde_json::Value) -> FloatingIP {
        serde_json::from_value(json!({
            "apiVersion": "network.stratus.dev/v1", "kind": "FloatingIP",
            "metadata": {"name": "f", "namespace": "demo"}, "spec": spec,
        }))
        .expect("a floating IP")
    }

    fn port() -> Port {
        serde_json::from_value(json!({
            "apiVersion": "network.stratus.dev/v1", "kind": "Port",
            "metadata": {"name": "web", "namespace": "demo"}, "spec": {"network": "n"},
            "status": {"fixedIPs": [{"subnet": "s6", "ipAddress": "fd00::5"},
                                    {"subnet": "s", "ipAddress": "10.0.0.5"},
                                    {"subnet": "t", "ipAddress": "10.1.0.5"}]},
        }))
        .expect("a port")
    }

    fn router(name: &str, subnets: &[&str], gateway: Option<&str>) -> Arc<Router> {
        let mut spec =
            json!({"interfaces": subnets.iter().map(|s| json!({"subnet": s})).collect::<Vec<_>>()});
        if let Some(g) = gateway {
            spec["externalGateway"] = json!({"network": g});
        }
        Arc::new(
            serde_json::from_value(json!({
                "apiVersion": "network.stratus.dev/v1", "kind": "Router",
                "metadata": {"name": name, "namespace": "demo"}, "spec": spec,
            }))
            .expect("a router"),
        )
    }

    #[test]
    fn a_floating_ip_goes_through_the_router_joining_its_ports_subnet_to_its_network() {
        let routers = [
            router("r0", &["s"], Some("ops/other")),
            router("r1", &["t"], Some("ops/ext")),
            router("r2", &["s"], Some("ops/ext")),
        ];
        let f = fip(json!({"floatingNetwork": "ops/ext", "port": "web"}));
        assert_eq!(
            associate(&f, "demo", Some(&port()), &routers),
            Ok(Association {
                fixed_ip: "10.0.0.5".into(),
                router: "r2".into()
            }),
            "the first IPv4 address, through the router with its subnet and network"
        );
        let f = fip(json!({"floatingNetwork": "ops/ext", "port": "web", "fixedIP": "10.1.0.5"}));
        assert_eq!(
            associate(&f, "demo", Some(&port()), &routers).map(|a| a.router),
            Ok("r1".into())
        );
    }

    #[test]
    fn an_association_that_cannot_be_made_says_why() {
        let routers = [router("r", &["t"], Some("ext"))];
        let reason = |spec: serde_json::Value, port: Option<&Port>| {
            associate(&fip(spec), "demo", port, &routers)
                .expect_err("none")
                .reason
        };
        let p = port();
        assert_eq!(
            reason(json!({"floatingNetwork": "ext"}), Some(&p)),
            Reason::Unassociated
        );
        assert_eq!(
            reason(json!({"floatingNetwork": "ext", "port": "web"}), None),
            Reason::PortNotFound
        );
        assert_eq!(
            reason(
                json!({"floatingNetwork": "ext", "port": "web", "fixedIP": "10.0.0.9"}),
                Some(&p)
            ),
            Reason::FixedIPNotFound
        );
        assert_eq!(
            reason(json!({"floatingNetwork": "ext", "port": "web"}), Some(&p)),
            Reason::NoRouter,
            "r is not on 10.0.0.5's subnet"
        );
        assert_eq!(
            reason(
                json!({"floatingNetwork": "demo2/ext", "port": "web", "fixedIP": "10.1.0.5"}),
                Some(&p)
            ),
            Reason::NoRouter,
            "r's gateway is demo/ext, not demo2/ext"
        );
    }
}
