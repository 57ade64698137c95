//! The attachments controller: releases a Volume's attachment (`status.attachedTo`, which the
//! API server writes in a Server's own transaction when the Server adds the volume) once the
//! Server's guest no longer has it: the Server is gone (deleted after its agent tore the guest
//! down), was never placed, or no longer asks for the volume and its agent has observed the
//! generation that dropped it (the agent detaches before it reports that generation).
//!
//! While the Server holds it, the controller records the node the Server is placed on in the
//! Volume's `status.attachedNode` (a node cannot write it): the storage agent of a volume on
//! another node exports it to that node, and to no other.
//!
//! A release is a status replace with the Volume's resourceVersion as precondition: a Server
//! that adds the volume again meanwhile writes the Volume in its transaction, so the release
//! fails and is decided again.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use kube::api::{Api, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use stratus_api_types::common::ConditionType;
use stratus_api_types::compute::Server;
use stratus_api_types::storage::{Volume, VolumePhase};
use stratus_runtime::policy::kube_retry;
use stratus_runtime::{Classify, Retry, Runtime};

use crate::cache::Shared;

/// The field manager of the controller's writes.
const MANAGER: &str = "stratus-attachments";
/// How soon a volume whose server has not yet let it go is looked at again (a change to the
/// server wakes it at once).
const WAIT: Duration = Duration::from_secs(30);

/// Why a reconcile failed.
#[derive(Debug, thiserror::Error)]
pub enum AttachmentsError {
    /// A request to the API server failed.
    #[error("request to the API server")]
    Api(#[source] kube::Error),
    /// A Volume without a namespace (a bug elsewhere: Volume is namespaced).
    #[error("volume has no namespace")]
    NoNamespace,
}

impl Classify for AttachmentsError {
    fn retry(&self) -> Retry {
        match self {
            Self::Api(e) => kube_retry(e),
            Self::NoNamespace => Retry::Never,
        }
    }
}

/// What to do with a Volume attached to a Server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// The Server holds it (asks for it, or its guest may still have it).
    Keep,
    /// The Server's guest cannot have it any more: clear the attachment.
    Release,
}

/// Whether `server` (the one the volume `volume` is attached to, `None` when it is gone)
/// still holds the volume.
pub fn decide(volume: &str, server: Option<&Server>) -> Decision {
    let Some(s) = server else {
        return Decision::Release;
    };
    let wants = s.spec.boot_volume.as_deref() == Some(volume)
        || s.spec.volumes.iter().any(|v| v.volume == volume);
    if wants || s.metadata.deletion_timestamp.is_some() {
        // A deleted server lets its volumes go once its agent tore it down and it is gone.
        return Decision::Keep;
    }
    let status = s.status.clone().unwrap_or_default();
    if status.hypervisor.is_none() {
        return Decision::Release;
    }
    match (status.observed_generation, s.metadata.generation) {
        (Some(seen), Some(now)) if seen >= now => Decision::Release,
        _ => Decision::Keep,
    }
}

/// What to record as the volume's `status.attachedNode` (now `recorded`) while `server`
/// holds it, when that is not what is recorded: the node the server is placed on, or none
/// while it is on no node (an evacuated server's old node keeps no export open to it).
pub fn follow(recorded: Option<&str>, server: Option<&Server>) -> Option<Option<String>> {
    let placed = server
        .and_then(|s| s.status.as_ref())
        .and_then(|s| s.hypervisor.as_deref());
    (recorded != placed).then(|| placed.map(str::to_owned))
}

struct Ctx {
    client: Client,
    runtime: Runtime<Volume>,
}

async fn reconcile(vol: Arc<Volume>, ctx: Arc<Ctx>) -> Result<Action, AttachmentsError> {
    let result = release(&vol, &ctx).await;
    ctx.runtime.finish(&vol, result).await
}

async fn release(vol: &Volume, ctx: &Ctx) -> Result<Action, AttachmentsError> {
    let ns = vol.namespace().ok_or(AttachmentsError::NoNamespace)?;
    let volumes = Api::<Volume>::namespaced(ctx.client.clone(), &ns);
    let name = vol.name_any();
    // Read afresh, the Volume before the Server: a Server that adds it after this read moves
    // its resourceVersion, so the release below fails.
    let Some(now) = volumes
        .get_opt(&name)
        .await
        .map_err(AttachmentsError::Api)?
    else {
        return Ok(Action::await_change());
    };
    let Some(server_name) = now.status.as_ref().and_then(|s| s.attached_to.clone()) else {
        return Ok(Action::await_change());
    };
    let server = Api::<Server>::namespaced(ctx.client.clone(), &ns)
        .get_opt(&server_name)
        .await
        .map_err(AttachmentsError::Api)?;
    if decide(&name, server.as_ref()) == Decision::Keep {
        let recorded = now.status.as_ref().and_then(|s| s.attached_node.as_deref());
        if let Some(node) = follow(recorded, server.as_ref()) {
            let mut followed = now.clone();
            followed
                .status
                .get_or_insert_with(Default::default)
                .attached_node = node.clone();
            match volumes
                .replace_status(&name, &PostParams::default(), &followed)
                .await
            {
                Ok(_) => {
                    tracing::info!(volume = %name, namespace = %ns, server = %server_name, node = ?node, "volume follows its server's node");
                }
                Err(kube::Error::Api(e)) if e.code == 409 => {
                    return Ok(Action::requeue(Duration::from_secs(1)));
                }
                Err(e) => return Err(AttachmentsError::Api(e)),
            }
        }
        return Ok(Action::requeue(WAIT));
    }
    let mut released = now.clone();
    let status = released.status.get_or_insert_with(Default::default);
    status.attached_to = None;
    status.attached_node = None;
    if status.phase == VolumePhase::InUse {
        status.phase = VolumePhase::Available;
    }
    ConditionType::Attached
        .no("Detached", format!("detached from server {server_name}"))
        .set(&mut status.conditions, now.metadata.generation);
    match volumes
        .replace_status(&name, &PostParams::default(), &released)
        .await
    {
        Ok(_) => {
            tracing::info!(volume = %name, namespace = %ns, server = %server_name, "volume detached");
            Ok(Action::await_change())
        }
        // Changed since it was read (a server took it again, an agent reported): decide again.
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(Action::requeue(Duration::from_secs(1))),
        Err(e) => Err(AttachmentsError::Api(e)),
    }
}

fn error_policy(vol: Arc<Volume>, e: &AttachmentsError, ctx: Arc<Ctx>) -> Action {
    ctx.runtime.error_policy(&vol, e)
}

/// Runs the controller until its watches end: every attached Volume, woken again by any
/// change to the Server it is attached to, told by the controllers' shared Server watch
/// (no watch of its own: each Server is decoded once, for every controller).
pub async fn run(client: Client, servers: &Shared<Server>) {
    let ctx = Arc::new(Ctx {
        client: client.clone(),
        runtime: Runtime::new(client.clone(), MANAGER),
    });
    let controller = Controller::new(
        Api::<Volume>::all(client.clone()),
        watcher::Config::default(),
    );
    let store = controller.store();
    controller
        .watches_shared_stream(servers.touched(), move |server: Arc<Server>| {
            let ns = server.namespace();
            let name = server.name_any();
            store
                .state()
                .into_iter()
                .filter(|v| {
                    v.namespace() == ns
                        && v.status.as_ref().and_then(|s| s.attached_to.as_deref())
                            == Some(name.as_str())
                })
                .map(|v| ObjectRef::from_obj(&*v))
                .collect::<Vec<_>>()
        })
        .run(reconcile, error_policy, ctx)
        .for_each(|_| async {})
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn server(spec: serde_json::Value, status: serde_json::Value, generation: i64) -> Server {
        serde_json::from_value(json!({
            "apiVersion": "compute.stratus.dev/v1", "kind": "Server",
            "metadata": {"name": "web", "namespace": "demo", "generation": generation},
            "spec": spec,
            "status": status,
        }))
        .expect("a server")
    }

    #[test]
    fn a_volume_is_released_only_once_the_guest_cannot_have_it() {
        let placed = json!({"hypervisor": "n1", "observedGeneration": 2});
        let asks = json!({"flavor": "m1", "image": "tiny", "volumes": [{"volume": "data"}]});
        let dropped = json!({"flavor": "m1", "image": "tiny"});
        // Gone (torn down, then deleted): released.
        assert_eq!(decide("data", None), Decision::Release);
        // Asked for: kept.
        assert_eq!(
            decide("data", Some(&server(asks.clone(), placed.clone(), 2))),
            Decision::Keep
        );
        let boots = json!({"flavor": "m1", "bootVolume": "data"});
        assert_eq!(
            decide("data", Some(&server(boots, placed.clone(), 2))),
            Decision::Keep
        );
        // Dropped from the spec at generation 3, which the agent has not observed: kept.
        assert_eq!(
            decide("data", Some(&server(dropped.clone(), placed.clone(), 3))),
            Decision::Keep
        );
        // Observed: released.
        assert_eq!(
            decide("data", Some(&server(dropped.clone(), placed, 2))),
            Decision::Release
        );
        // Never placed: no guest has it.
        assert_eq!(
            decide("data", Some(&server(dropped.clone(), json!({}), 3))),
            Decision::Release
        );
        // Being deleted: kept until the server is gone.
        let mut going = server(
            asks,
            json!({"hypervisor": "n1", "observedGeneration": 2}),
            2,
        );
        going.spec.volumes.clear();
        going.metadata.deletion_timestamp = Some(
            k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(jiff::Timestamp::now()),
        );
        assert_eq!(decide("data", Some(&going)), Decision::Keep);
    }

    #[test]
    fn the_volume_follows_the_node_its_server_is_placed_on() {
        let asks = json!({"flavor": "m1", "image": "tiny", "volumes": [{"volume": "data"}]});
        let on = |node: &str| server(asks.clone(), json!({"hypervisor": node}), 1);
        assert_eq!(follow(None, Some(&on("n2"))), Some(Some("n2".into())));
        assert_eq!(
            follow(Some("n2"), Some(&on("n2"))),
            None,
            "already recorded"
        );
        assert_eq!(
            follow(Some("n1"), Some(&on("n2"))),
            Some(Some("n2".into())),
            "moved"
        );
        let unplaced = server(asks.clone(), json!({}), 1);
        assert_eq!(
            follow(Some("n1"), Some(&unplaced)),
            Some(None),
            "an unplaced server (evacuated) leaves its old node"
        );
        assert_eq!(follow(None, Some(&unplaced)), None);
        assert_eq!(follow(None, None), None);
    }
}
