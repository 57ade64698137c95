//! Client libraries other than kubectl: the Python kubernetes client and kube-rs.

use std::time::Duration;

use anyhow::{Context, Result};
use futures::{StreamExt, TryStreamExt};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, reflector, watcher};
use serde_json::{Value, json};
use stratus_api_types::compute::{Flavor, FlavorSpec};
use stratus_e2e::{Cloud, repo_root};

#[test]
fn python_dynamic_client_crud_and_watch() -> Result<()> {
    let cloud = Cloud::up()?;
    cloud.projects(&["pyproj"])?;
    let script = repo_root().join("e2e/python/dynamic_client.py");
    let out = std::process::Command::new("/usr/bin/python3")
        .arg(&script)
        .arg(cloud.kubeconfig())
        .output()
        .context("run python3")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let steps: Vec<Value> = stdout
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let step = |name: &str| {
        steps
            .iter()
            .find(|s| s["step"] == name)
            .cloned()
            .unwrap_or(Value::Null)
    };
    assert_eq!(step("create")["name"], "py.small");
    assert_eq!(step("get")["vcpus"], 1);
    assert_eq!(
        step("patch"),
        json!({"step": "patch", "vcpus": 3, "generation": 2})
    );
    assert_eq!(step("stale-replace")["status"], 409);
    assert_eq!(step("list")["names"], json!(["k1"]));
    assert_eq!(step("list")["namespace"], "pyproj");
    assert_eq!(step("get-after-delete")["status"], 404);
    assert_eq!(
        step("watch")["events"],
        json!([
            ["ADDED", "py.small", 1],
            ["MODIFIED", "py.small", 3],
            ["DELETED", "py.small", 3]
        ])
    );
    Ok(())
}

/// The first flavor `events` yields with `vcpus`: the watcher lists anew each time its watch
/// ends (every 5 s here), and a list may come between a write and its event, yielding the
/// flavor as it was before.
async fn seen_with(
    events: &mut (impl futures::Stream<Item = Result<Flavor, watcher::Error>> + Unpin),
    vcpus: u32,
) -> Result<Flavor> {
    let wait = async {
        loop {
            let f = events.try_next().await?.context("watch ended")?;
            if f.spec.vcpus == vcpus {
                return anyhow::Ok(f);
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(60), wait)
        .await
        .with_context(|| format!("no flavor with {vcpus} vCPUs within 60 s"))?
}

#[tokio::test]
async fn kube_rs_typed_api_watcher_and_reflector() -> Result<()> {
    let cloud = Cloud::up()?;
    let client = cloud.client().await?;
    let api: Api<Flavor> = Api::all(client);
    let (reader, writer) = reflector::store();
    let events = watcher(api.clone(), watcher::Config::default().timeout(5))
        .default_backoff()
        .reflect(writer)
        .applied_objects();
    let mut events = Box::pin(events);
    let spec: FlavorSpec =
        serde_json::from_value(json!({"vcpus": 2, "ramMiB": 1024, "diskGiB": 5}))?;
    let mut f = Flavor::new("rs.medium", spec);
    f.metadata.labels = Some([("made-by".to_string(), "kube-rs".to_string())].into());
    let created = api.create(&PostParams::default(), &f).await?;
    assert_eq!(created.spec.vcpus, 2);
    let seen = seen_with(&mut events, 2).await?;
    assert_eq!(seen.metadata.name.as_deref(), Some("rs.medium"));
    api.patch(
        "rs.medium",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"vcpus": 4}})),
    )
    .await?;
    seen_with(&mut events, 4).await?;
    // Server-side apply through kube-rs, then the reflector's store agrees with the server.
    let applied = json!({"apiVersion": "compute.stratus.dev/v1", "kind": "Flavor", "metadata": {"name": "rs.medium"}, "spec": {"vcpus": 6, "ramMiB": 1024, "diskGiB": 5}});
    api.patch(
        "rs.medium",
        &PatchParams::apply("e2e").force(),
        &Patch::Apply(applied),
    )
    .await?;
    seen_with(&mut events, 6).await?;
    let cached = reader
        .get(&reflector::ObjectRef::new("rs.medium"))
        .context("reflector has the object")?;
    assert_eq!(cached.spec.vcpus, 6);
    api.delete("rs.medium", &DeleteParams::default()).await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while reader
        .get(&reflector::ObjectRef::new("rs.medium"))
        .is_some()
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the reflector never saw the deletion"
        );
        let _ = tokio::time::timeout(Duration::from_millis(200), events.next()).await;
    }
    Ok(())
}

#[tokio::test]
async fn kube_runtime_event_recorder_shows_in_kubectl_describe() -> Result<()> {
    use kube::runtime::events::{Event, EventType, Recorder, Reporter};
    let cloud = Cloud::up()?;
    cloud.projects(&["demo"])?;
    cloud.kubectl_ok(&[
        "apply",
        "-f",
        repo_root()
            .join("examples/server.yaml")
            .to_str()
            .unwrap_or_default(),
    ])?;
    let client = cloud.client().await?;
    let servers: Api<stratus_api_types::compute::Server> = Api::namespaced(client.clone(), "demo");
    let server = servers.get("web-1").await?;
    let reporter = Reporter {
        controller: "e2e-recorder".into(),
        instance: Some("e2e".into()),
    };
    let recorder = Recorder::new(client, reporter);
    let reference = kube::Resource::object_ref(&server, &());
    for _ in 0..2 {
        recorder
            .publish(
                &Event {
                    type_: EventType::Normal,
                    reason: "Scheduled".into(),
                    note: Some("placed on node-7".into()),
                    action: "Schedule".into(),
                    secondary: None,
                },
                &reference,
            )
            .await?;
    }
    // Written through events.k8s.io/v1, read through core/v1 by kubectl describe.
    let d = cloud.kubectl_ok(&["-n", "demo", "describe", "server", "web-1"])?;
    assert!(
        d.contains("Scheduled") && d.contains("placed on node-7"),
        "{d}"
    );
    // Both APIs list the same single event; the repeat became a series, not a second event.
    let core = serde_json::from_str::<Value>(
        &cloud.kubectl_ok(&["-n", "demo", "get", "events", "-o", "json"])?,
    )?;
    // (The scheduler records its own events about these servers too.)
    let mine = |v: &Value| -> Vec<Value> {
        v["items"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|e| {
                e["reportingComponent"] == "e2e-recorder"
                    || e["reportingController"] == "e2e-recorder"
            })
            .cloned()
            .collect()
    };
    let items = mine(&core);
    assert_eq!(items.len(), 1, "{core}");
    assert_eq!(items[0]["involvedObject"]["name"], "web-1");
    let v1 = serde_json::from_str::<Value>(&cloud.kubectl_ok(&[
        "-n",
        "demo",
        "get",
        "events.v1.events.k8s.io",
        "-o",
        "json",
        "--field-selector",
        "regarding.name=web-1",
    ])?)?;
    let items = mine(&v1);
    assert_eq!(items.len(), 1, "{v1}");
    assert_eq!(items[0]["apiVersion"], "events.k8s.io/v1");
    assert_eq!(items[0]["note"], "placed on node-7");
    assert_eq!(items[0]["regarding"]["kind"], "Server");
    assert!(
        items[0]["series"]["count"].as_i64().unwrap_or(0) >= 2,
        "{v1}"
    );
    Ok(())
}
