//! Watches served from the shared feed, its history, and a private feed agree exactly.

use std::time::Duration;

use anyhow::{Context, Result};
use futures::TryStreamExt;
use kube::api::{Api, Patch, PatchParams, PostParams, WatchEvent, WatchParams};
use serde_json::json;
use stratus_api_types::compute::Flavor;
use stratus_e2e::{Apiserver, Etcd};

async fn collect(api: &Api<Flavor>, from: &str, n: usize) -> Result<Vec<(String, String, u32)>> {
    // Generous: the server shares two cores with every other test.
    let stream = api.watch(&WatchParams::default().timeout(60), from).await?;
    let mut stream = Box::pin(stream);
    let mut out = Vec::new();
    while out.len() < n {
        let Some(ev) = tokio::time::timeout(Duration::from_secs(60), stream.try_next()).await??
        else {
            break;
        };
        let (t, f) = match ev {
            WatchEvent::Added(f) => ("ADDED", f),
            WatchEvent::Modified(f) => ("MODIFIED", f),
            WatchEvent::Deleted(f) => ("DELETED", f),
            _ => continue,
        };
        out.push((
            t.to_string(),
            f.metadata.resource_version.unwrap_or_default(),
            f.spec.vcpus,
        ));
    }
    Ok(out)
}

#[tokio::test]
async fn shared_history_and_private_feeds_deliver_the_same_events() -> Result<()> {
    let etcd = Etcd::start()?;
    let server = Apiserver::start(&etcd.endpoint)?;
    let api: Api<Flavor> = Api::all(server.client().await?);
    let f: Flavor = serde_json::from_value(
        json!({"apiVersion": "compute.stratus.dev/v1", "kind": "Flavor", "metadata": {"name": "w"}, "spec": {"vcpus": 1, "ramMiB": 64, "diskGiB": 0}}),
    )?;
    let rv0 = api
        .create(&PostParams::default(), &f)
        .await?
        .metadata
        .resource_version
        .unwrap_or_default();
    api.patch(
        "w",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"vcpus": 2}})),
    )
    .await?;
    let rv1 = api
        .get("w")
        .await?
        .metadata
        .resource_version
        .unwrap_or_default();
    // The first watch starts the shared feed at rv1; later watches from rv1 are served from its
    // history, and a watch from rv0 (before the feed) from a private feed of its own.
    let first = tokio::spawn({
        let api = api.clone();
        let rv1 = rv1.clone();
        async move { collect(&api, &rv1, 3).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    for v in [3, 4] {
        api.patch(
            "w",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"vcpus": v}})),
        )
        .await?;
    }
    api.delete("w", &Default::default()).await?;
    let from_feed = first.await??;
    let from_history = collect(&api, &rv1, 3).await?;
    let from_private = collect(&api, &rv0, 4).await?;
    assert_eq!(
        from_feed
            .iter()
            .map(|e| (e.0.as_str(), e.2))
            .collect::<Vec<_>>(),
        vec![("MODIFIED", 3), ("MODIFIED", 4), ("DELETED", 4)]
    );
    assert_eq!(from_history, from_feed);
    assert_eq!(from_private[0].0, "MODIFIED");
    assert_eq!(from_private[0].2, 2);
    assert_eq!(&from_private[1..], &from_feed[..]);
    // Revisions are numbers (etcd revisions), and strictly increase.
    let revs = from_private
        .iter()
        .map(|e| {
            e.1.parse::<i64>()
                .with_context(|| format!("resourceVersion {:?} of {e:?}", e.1))
        })
        .collect::<Result<Vec<_>>>()?;
    assert_eq!(revs.len(), 4);
    assert!(revs.windows(2).all(|w| w[0] < w[1]), "{revs:?}");
    Ok(())
}
