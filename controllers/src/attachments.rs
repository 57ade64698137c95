//! The attachments controller: releases each of a Volume's attachments (`status.attachments`,
//! which the API server writes in a Server's own transaction when the Server adds the volume;
//! the first is also `status.attachedTo`) once that Server's guest no longer has it, keeping
//! the others: the Server is gone (deleted after its agent tore the guest
//! down), was never placed, or no longer asks for the volume and its agent has observed the
//! generation that dropped it (the agent detaches before it reports that generation).
//!
//! While a Server holds it, the controller records the node the Server is placed on in its
//! attachment (`status.attachments[].node`, and the first's in `status.attachedNode`; a node
//! cannot write them), and keeps one cluster-scoped [`VolumeExport`] per node other than the
//! volume's own that an attachment is on: the storage agent of the volume's node serves it
//! over NBD to that node, and to no other. An export goes only once no attachment is on its
//! node any more, which is once every guest there let the disk go (an attachment is released
//! only then, see above): an export never leaves a node whose guests still have it plugged
//! in. An export whose Volume is gone (or is another volume of that name) goes too.
//!
//! A release is a status replace with the Volume's resourceVersion as precondition: a Server
//! that adds the volume again meanwhile writes the Volume in its transaction, so the release
//! fails and is decided again.

use std::sync::Arc;
use std::time::Duration;

use std::collections::BTreeSet;

use futures::StreamExt;
use kube::api::{Api, DeleteParams, PostParams, Preconditions};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::reflector::Store;
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use stratus_api_types::common::ConditionType;
use stratus_api_types::compute::Server;
use stratus_api_types::storage::{
    ExportedVolume, Volume, VolumeAttachment, VolumeExport, VolumeExportSpec, VolumePhase,
    VolumeStatus, volume_export_name,
};
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
    let placed = placed_on(server);
    (recorded != placed.as_deref()).then_some(placed)
}

/// The node `server` is placed on.
fn placed_on(server: Option<&Server>) -> Option<String> {
    server
        .and_then(|s| s.status.as_ref())
        .and_then(|s| s.hypervisor.clone())
}

/// The attachments of `volume` that stay, each with the node its server is placed on now,
/// given what is recorded (`held`) and each holder's Server as read (`None`: gone).
pub fn settle(volume: &str, held: &[(VolumeAttachment, Option<Server>)]) -> Vec<VolumeAttachment> {
    held.iter()
        .filter(|(_, server)| decide(volume, server.as_ref()) == Decision::Keep)
        .map(|(a, server)| {
            let mut kept = a.clone();
            if let Some(node) = follow(a.node.as_deref(), server.as_ref()) {
                kept.node = node;
            }
            kept
        })
        .collect()
}

/// The attachments `status` records: `attachments`, or `attachedTo` (with `attachedNode`) for
/// a status written before there were attachments.
fn recorded(status: &VolumeStatus) -> Vec<VolumeAttachment> {
    if !status.attachments.is_empty() {
        return status.attachments.clone();
    }
    status
        .attached_to
        .clone()
        .map(|server| VolumeAttachment {
            server,
            node: status.attached_node.clone(),
        })
        .into_iter()
        .collect()
}

/// The nodes volume `status` is to be exported to: each node an attachment of it is on that
/// is not its own (`status.node`; none while it is on no node). An attachment stays while its
/// guest may still have the disk, so a node keeps its export while any guest there uses it.
pub fn export_nodes(status: &VolumeStatus) -> BTreeSet<String> {
    let Some(own) = status.node.as_deref() else {
        return BTreeSet::new();
    };
    status
        .attachments
        .iter()
        .filter_map(|a| a.node.as_deref())
        .filter(|n| *n != own)
        .map(str::to_owned)
        .collect()
}

/// What to do about the VolumeExports of a volume.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ExportPlan {
    /// The nodes to make an export for.
    pub create: Vec<String>,
    /// The exports (by name) to delete.
    pub delete: Vec<String>,
}

/// The exports to make and to end for the Volume of uid `uid` exported to `want`, given the
/// exports `have` (every VolumeExport naming that volume uid, each as (name, node)).
pub fn plan_exports(uid: &str, want: &BTreeSet<String>, have: &[(String, String)]) -> ExportPlan {
    let create = want
        .iter()
        .filter(|n| {
            !have
                .iter()
                .any(|(name, node)| node == *n && *name == volume_export_name(uid, n))
        })
        .cloned()
        .collect();
    let delete = have
        .iter()
        .filter(|(name, node)| !want.contains(node) || *name != volume_export_name(uid, node))
        .map(|(name, _)| name.clone())
        .collect();
    ExportPlan { create, delete }
}

/// `status` with attachments `now`: `attachedTo` is the first's, `attachedNode` the node it is
/// on, the phase
/// `Available` once none is left, and the `Attached` condition says who holds it.
fn record(
    status: &mut VolumeStatus,
    now: Vec<VolumeAttachment>,
    released: &[String],
    generation: Option<i64>,
) {
    status.attached_to = now.first().map(|a| a.server.clone());
    status.attached_node = now.first().and_then(|a| a.node.clone());
    if released.is_empty() {
        status.attachments = now;
        return;
    }
    let condition = if now.is_empty() {
        if status.phase == VolumePhase::InUse {
            status.phase = VolumePhase::Available;
        }
        ConditionType::Attached.no(
            "Detached",
            format!("detached from server {}", released.join(", ")),
        )
    } else {
        let held: Vec<&str> = now.iter().map(|a| a.server.as_str()).collect();
        ConditionType::Attached.yes(
            "Attached",
            format!(
                "attached to server {}; detached from server {}",
                held.join(", "),
                released.join(", ")
            ),
        )
    };
    condition.set(&mut status.conditions, generation);
    status.attachments = now;
}

struct Ctx {
    client: Client,
    runtime: Runtime<Volume>,
    exports: Store<VolumeExport>,
}

async fn reconcile(vol: Arc<Volume>, ctx: Arc<Ctx>) -> Result<Action, AttachmentsError> {
    let result = release(&vol, &ctx).await;
    ctx.runtime.finish(&vol, result).await
}

/// The exports of the Volume of uid `uid` the cache holds, as (name, node).
fn exports_of(ctx: &Ctx, uid: &str) -> Vec<(String, String)> {
    ctx.exports
        .state()
        .into_iter()
        .filter(|x| x.spec.volume.uid == uid)
        .map(|x| (x.name_any(), x.spec.node.clone()))
        .collect()
}

/// Brings the VolumeExports of `vol` (as just read, its status `status` as written) to
/// [`export_nodes`]: creates are idempotent (the name is the pair's), deletes carry the uid
/// of the export read, so an export made anew meanwhile is not touched.
async fn sync_exports(
    ctx: &Ctx,
    vol: &Volume,
    ns: &str,
    status: &VolumeStatus,
) -> Result<(), AttachmentsError> {
    let Some(uid) = vol.metadata.uid.clone() else {
        return Ok(());
    };
    let want = export_nodes(status);
    let plan = plan_exports(&uid, &want, &exports_of(ctx, &uid));
    let api = Api::<VolumeExport>::all(ctx.client.clone());
    for node in plan.create {
        let Some(storage_node) = status.node.clone() else {
            continue;
        };
        let name = volume_export_name(&uid, &node);
        let x = VolumeExport::new(
            &name,
            VolumeExportSpec {
                volume: ExportedVolume {
                    namespace: ns.to_owned(),
                    name: vol.name_any(),
                    uid: uid.clone(),
                },
                storage_node,
                node: node.clone(),
            },
        );
        match api.create(&PostParams::default(), &x).await {
            Ok(_) => {
                tracing::info!(volume = %vol.name_any(), namespace = %ns, %node, export = %name, "volume export made");
            }
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => return Err(AttachmentsError::Api(e)),
        }
    }
    for name in plan.delete {
        end_export(ctx, &name).await?;
    }
    Ok(())
}

/// Deletes VolumeExport `name` as the cache holds it (its uid as precondition).
async fn end_export(ctx: &Ctx, name: &str) -> Result<(), AttachmentsError> {
    let held = ctx.exports.get(&ObjectRef::<VolumeExport>::new(name));
    let dp = DeleteParams {
        preconditions: held
            .and_then(|x| x.metadata.uid.clone())
            .map(|uid| Preconditions {
                uid: Some(uid),
                resource_version: None,
            }),
        ..DeleteParams::default()
    };
    match Api::<VolumeExport>::all(ctx.client.clone())
        .delete(name, &dp)
        .await
    {
        Ok(_) => {
            tracing::info!(export = %name, "volume export ended");
            Ok(())
        }
        Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => Ok(()),
        Err(e) => Err(AttachmentsError::Api(e)),
    }
}

async fn release(vol: &Volume, ctx: &Ctx) -> Result<Action, AttachmentsError> {
    let ns = vol.namespace().ok_or(AttachmentsError::NoNamespace)?;
    let volumes = Api::<Volume>::namespaced(ctx.client.clone(), &ns);
    let name = vol.name_any();
    // Read afresh, the Volume before its Servers: a Server that adds it after this read moves
    // its resourceVersion, so the write below fails.
    let Some(now) = volumes
        .get_opt(&name)
        .await
        .map_err(AttachmentsError::Api)?
    else {
        return Ok(Action::await_change());
    };
    let status = now.status.clone().unwrap_or_default();
    let held = recorded(&status);
    if held.is_empty() && status.dropped_export.is_none() {
        sync_exports(ctx, &now, &ns, &status).await?;
        return Ok(Action::await_change());
    }
    let servers = Api::<Server>::namespaced(ctx.client.clone(), &ns);
    let mut read = Vec::with_capacity(held.len());
    for a in held {
        let server = servers
            .get_opt(&a.server)
            .await
            .map_err(AttachmentsError::Api)?;
        read.push((a, server));
    }
    let kept = settle(&name, &read);
    let released: Vec<String> = read
        .iter()
        .map(|(a, _)| a.server.clone())
        .filter(|s| !kept.iter().any(|k| &k.server == s))
        .collect();
    let mut written = status.clone();
    record(&mut written, kept, &released, now.metadata.generation);
    let wait = if written.attachments.is_empty() {
        Action::await_change()
    } else {
        Action::requeue(WAIT)
    };
    // A status stored with an export of its own (before exports were VolumeExports) is
    // written again without it, once.
    if written == status && status.dropped_export.is_none() {
        sync_exports(ctx, &now, &ns, &written).await?;
        return Ok(wait);
    }
    let mut next = now.clone();
    next.status = Some(written.clone());
    match volumes
        .replace_status(&name, &PostParams::default(), &next)
        .await
    {
        Ok(_) => {
            sync_exports(ctx, &now, &ns, &written).await?;
            let held: Vec<&str> = written
                .attachments
                .iter()
                .map(|a| a.server.as_str())
                .collect();
            if released.is_empty() {
                tracing::info!(volume = %name, namespace = %ns, servers = ?held, "volume follows its servers' nodes");
            } else {
                tracing::info!(volume = %name, namespace = %ns, detached = ?released, still = ?held, "volume detached");
            }
            Ok(wait)
        }
        // Changed since it was read (a server took it, an agent reported): decide again.
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
    let exports = Controller::new(
        Api::<VolumeExport>::all(client.clone()),
        watcher::Config::default(),
    );
    let ctx = Arc::new(Ctx {
        client: client.clone(),
        runtime: Runtime::new(client.clone(), MANAGER),
        exports: exports.store(),
    });
    let controller = Controller::new(
        Api::<Volume>::all(client.clone()),
        watcher::Config::default(),
    );
    let store = controller.store();
    let volumes = controller
        .watches_shared_stream(servers.touched(), move |server: Arc<Server>| {
            let ns = server.namespace();
            let name = server.name_any();
            store
                .state()
                .into_iter()
                .filter(|v| {
                    v.namespace() == ns
                        && v.status.as_ref().is_some_and(|s| s.is_attached_to(&name))
                })
                .map(|v| ObjectRef::from_obj(&*v))
                .collect::<Vec<_>>()
        })
        .run(reconcile, error_policy, Arc::clone(&ctx))
        .for_each(|_| async {});
    let ended = exports
        .run(check_export, export_error_policy, ctx)
        .for_each(|_| async {});
    futures::future::join(volumes, ended).await;
}

/// How often an export is checked against its Volume when nothing changes.
const EXPORT_CHECK: Duration = Duration::from_secs(300);

/// Ends export `x` when its Volume no longer asks for it: the Volume is gone (or is another
/// volume of that name), or no attachment of it is on the export's node any more
/// ([`export_nodes`]). What a Volume reconcile that failed halfway, or a Volume deleted, would
/// otherwise leave behind.
async fn check_export(x: Arc<VolumeExport>, ctx: Arc<Ctx>) -> Result<Action, AttachmentsError> {
    let v = &x.spec.volume;
    let vol = Api::<Volume>::namespaced(ctx.client.clone(), &v.namespace)
        .get_opt(&v.name)
        .await
        .map_err(AttachmentsError::Api)?;
    let wanted = vol
        .filter(|vol| vol.metadata.uid.as_deref() == Some(v.uid.as_str()))
        .is_some_and(|vol| {
            export_nodes(&vol.status.unwrap_or_default()).contains(&x.spec.node)
                && x.name_any() == volume_export_name(&v.uid, &x.spec.node)
        });
    if wanted || x.metadata.deletion_timestamp.is_some() {
        return Ok(Action::requeue(EXPORT_CHECK));
    }
    end_export(&ctx, &x.name_any()).await?;
    Ok(Action::await_change())
}

fn export_error_policy(x: Arc<VolumeExport>, e: &AttachmentsError, _: Arc<Ctx>) -> Action {
    tracing::warn!(export = %x.name_any(), error = %e, "volume export check failed");
    Action::requeue(Duration::from_secs(10))
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
    fn each_attachment_is_released_on_its_own_and_the_others_stay() {
        let asks = json!({"flavor": "m1", "image": "tiny", "volumes": [{"volume": "data"}]});
        let dropped = json!({"flavor": "m1", "image": "tiny"});
        let named = |name: &str, spec: serde_json::Value, node: &str| {
            let mut s = server(
                spec,
                json!({"hypervisor": node, "observedGeneration": 1}),
                1,
            );
            s.metadata.name = Some(name.into());
            s
        };
        let at = |server: &str, node: Option<&str>| VolumeAttachment {
            server: server.into(),
            node: node.map(Into::into),
        };
        let held = vec![
            (at("a", Some("n1")), Some(named("a", dropped.clone(), "n1"))),
            (at("b", None), Some(named("b", asks.clone(), "n2"))),
            (at("c", Some("n1")), None),
            (at("d", Some("n1")), Some(named("d", asks.clone(), "n1"))),
        ];
        assert_eq!(
            settle("data", &held),
            vec![at("b", Some("n2")), at("d", Some("n1"))],
            "a (dropped, observed) and c (gone) go; b gets its node; d stays as it is"
        );

        let mut status = VolumeStatus {
            phase: VolumePhase::InUse,
            attached_to: Some("a".into()),
            attached_node: Some("n1".into()),
            ..Default::default()
        };
        record(
            &mut status,
            vec![at("b", Some("n2")), at("d", Some("n1"))],
            &["a".into(), "c".into()],
            Some(1),
        );
        assert_eq!(status.attached_to.as_deref(), Some("b"), "the first left");
        assert_eq!(
            status.attached_node.as_deref(),
            Some("n2"),
            "the first's node"
        );
        // Its data on n1: exported to n2 alone, where b is (d is on n1 with the data).
        status.node = Some("n1".into());
        assert_eq!(export_nodes(&status), ["n2".to_string()].into());
        status.node = Some("n2".into());
        assert_eq!(export_nodes(&status), ["n1".to_string()].into());
        record(
            &mut status,
            vec![at("b", Some("n1")), at("d", Some("n1"))],
            &[],
            Some(1),
        );
        status.node = Some("n1".into());
        assert!(export_nodes(&status).is_empty(), "all local: no export");
        assert_eq!(status.phase, VolumePhase::InUse);
        assert_eq!(status.attachments.len(), 2);
        record(&mut status, vec![], &["b".into(), "d".into()], Some(1));
        assert_eq!(status.attached_to, None);
        assert_eq!(status.attached_node, None);
        assert!(status.attachments.is_empty());
        assert_eq!(status.phase, VolumePhase::Available, "the last left");
        let c = &status.conditions[0];
        assert_eq!(
            (c.type_.as_str(), c.reason.as_str()),
            ("Attached", "Detached")
        );

        // A status written before there were attachments is read as its one attachment.
        let legacy = VolumeStatus {
            attached_to: Some("a".into()),
            attached_node: Some("n1".into()),
            ..Default::default()
        };
        assert_eq!(recorded(&legacy), vec![at("a", Some("n1"))]);
    }

    #[test]
    fn each_other_node_gets_an_export_while_a_server_there_holds_the_volume() {
        let at = |server: &str, node: &str| VolumeAttachment {
            server: server.into(),
            node: Some(node.into()),
        };
        let nodes = |list: &[&str]| {
            list.iter()
                .map(|n| (*n).to_owned())
                .collect::<BTreeSet<_>>()
        };
        // Its data on n0; servers on n1 (two) and n2: both other nodes are served at once.
        let mut status = VolumeStatus {
            phase: VolumePhase::InUse,
            node: Some("n0".into()),
            ..Default::default()
        };
        record(
            &mut status,
            vec![at("a", "n1"), at("b", "n2"), at("c", "n1"), at("d", "n0")],
            &[],
            Some(1),
        );
        assert_eq!(export_nodes(&status), nodes(&["n1", "n2"]));
        // a goes: c on n1 still has the disk plugged in, so n1 keeps its export.
        record(
            &mut status,
            vec![at("b", "n2"), at("c", "n1"), at("d", "n0")],
            &["a".into()],
            Some(1),
        );
        assert_eq!(export_nodes(&status), nodes(&["n1", "n2"]));
        // c goes too: nothing is left on n1, so its export goes; n2's stays.
        record(
            &mut status,
            vec![at("b", "n2"), at("d", "n0")],
            &["c".into()],
            Some(1),
        );
        assert_eq!(export_nodes(&status), nodes(&["n2"]));
        // Not placed on a node: nothing is exported.
        status.node = None;
        assert!(export_nodes(&status).is_empty());

        let uid = "u1";
        let name = |n: &str| volume_export_name(uid, n);
        let have = vec![
            (name("n1"), "n1".to_string()),
            (name("n3"), "n3".to_string()),
            ("u1.forged".to_string(), "n2".to_string()),
        ];
        assert_eq!(
            plan_exports(uid, &nodes(&["n1", "n2"]), &have),
            ExportPlan {
                create: vec!["n2".into()],
                delete: vec![name("n3"), "u1.forged".into()],
            },
            "n1's kept, n2's made, n3's (no server left there) and one not named for its pair end"
        );
        assert_eq!(
            plan_exports(uid, &nodes(&["n1"]), &have[..1]),
            ExportPlan::default(),
            "an export made already is not made again"
        );
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
