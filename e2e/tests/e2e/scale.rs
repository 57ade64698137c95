//! A collection past what one etcd answer holds: 30,000 Flavors, listed unpaged by kubectl,
//! the Python client and kube-rs, whole and selected.

use std::time::Instant;

use anyhow::{Context, Result, ensure};
use futures::{StreamExt, TryStreamExt};
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, ListParams};
use serde_json::Value;
use stratus_apiserver::storage::store::{Guard, Store};
use stratus_e2e::{Apiserver, Etcd, repo_root};

const COUNT: usize = 30_000;
/// Puts per etcd transaction (etcd allows 128 operations in one).
const BATCH: usize = 100;

fn name(i: usize) -> String {
    format!("f-{i:05}")
}

/// Every 10th Flavor is `tier=gold`.
fn gold(i: usize) -> bool {
    i.is_multiple_of(10)
}

/// Writes Flavors `f-00001`… to etcd as the API server stores them: the stored form of
/// `f-00000` (made through the API) with its name, uid and labels changed.
async fn write_flavors(store: &Store, template_key: &str) -> Result<()> {
    let template = store
        .get(template_key)
        .await?
        .context("the template Flavor is stored")?
        .value;
    let prefix = template_key
        .strip_suffix(&name(0))
        .context("the template's key ends with its name")?
        .to_string();
    let batches: Vec<Vec<usize>> = (1..COUNT)
        .collect::<Vec<_>>()
        .chunks(BATCH)
        .map(<[usize]>::to_vec)
        .collect();
    futures::stream::iter(batches)
        .map(|batch| {
            let (template, prefix) = (&template, &prefix);
            async move {
                let objects: Vec<(String, Value)> = batch
                    .iter()
                    .map(|&i| {
                        let mut v = template.clone();
                        v["metadata"]["name"] = name(i).into();
                        v["metadata"]["uid"] = format!("00000000-0000-4000-8000-{i:012}").into();
                        v["metadata"]["labels"]["tier"] =
                            if gold(i) { "gold" } else { "silver" }.into();
                        (format!("{prefix}{}", name(i)), v)
                    })
                    .collect();
                let guards: Vec<Guard<'_>> =
                    objects.iter().map(|(k, _)| Guard::Absent(k)).collect();
                let puts: Vec<(&str, &Value)> =
                    objects.iter().map(|(k, v)| (k.as_str(), v)).collect();
                let written = store.write_many(&guards, &puts, &[]).await?;
                ensure!(written.is_some(), "a Flavor of the batch already exists");
                Ok(())
            }
        })
        .buffer_unordered(8)
        .try_collect::<Vec<()>>()
        .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_thousand_flavors_are_listed_unpaged_by_every_client() -> Result<()> {
    let etcd = Etcd::start()?;
    let api = Apiserver::start(&etcd.endpoint)?;
    api.kubectl_in(
        &["create", "-f", "-"],
        &format!(
            "apiVersion: compute.stratus.dev/v1\nkind: Flavor\nmetadata:\n  name: {}\n  labels:\n    tier: gold\nspec:\n  vcpus: 1\n  ramMiB: 512\n  diskGiB: 1\n",
            name(0)
        ),
    )?;
    let store = Store::connect(std::slice::from_ref(&etcd.endpoint)).await?;
    let registry = stratus_apiserver::resource::registry::Registry::stratus()?;
    let flavors = registry
        .by_kind("compute.stratus.dev", "Flavor")
        .context("the Flavor kind")?;
    let started = Instant::now();
    write_flavors(&store, &flavors.key("/stratus", None, &name(0))).await?;
    eprintln!("{COUNT} Flavors written in {:?}", started.elapsed());
    let golds = (0..COUNT).filter(|&i| gold(i)).count();

    // kubectl, unpaged.
    let started = Instant::now();
    let out = api.kubectl_ok(&["get", "flavors", "--chunk-size=0", "-o", "name"])?;
    eprintln!("kubectl --chunk-size=0: {:?}", started.elapsed());
    let listed: Vec<&str> = out.lines().collect();
    assert_eq!(listed.len(), COUNT);
    assert_eq!(listed.first(), Some(&"flavor.compute.stratus.dev/f-00000"));
    assert_eq!(listed.last(), Some(&"flavor.compute.stratus.dev/f-29999"));
    let selected = api.kubectl_ok(&[
        "get",
        "flavors",
        "--chunk-size=0",
        "-o",
        "name",
        "-l",
        "tier=gold",
    ])?;
    assert_eq!(selected.lines().count(), golds);
    assert!(selected.lines().all(|l| {
        l.strip_prefix("flavor.compute.stratus.dev/f-")
            .and_then(|n| n.parse::<usize>().ok())
            .is_some_and(gold)
    }));
    let one = api.kubectl_ok(&[
        "get",
        "flavors",
        "--chunk-size=0",
        "-o",
        "name",
        "--field-selector",
        "metadata.name=f-00042",
    ])?;
    assert_eq!(one.trim(), "flavor.compute.stratus.dev/f-00042");
    // The table kubectl shows by default, unpaged.
    let table = api.kubectl_ok(&["get", "flavors", "--chunk-size=0", "--no-headers"])?;
    assert_eq!(table.lines().count(), COUNT);

    // The Python client, unpaged.
    let out = std::process::Command::new("/usr/bin/python3")
        .arg(repo_root().join("e2e/python/list_all.py"))
        .arg(api.kubeconfig())
        .output()
        .context("run python3")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let py: Value = serde_json::from_str(stdout.trim()).context("the script's line")?;
    eprintln!("python: {py}");
    assert_eq!(py["kind"], "FlavorList");
    assert_eq!(py["count"], COUNT);
    assert_eq!(py["distinct"], COUNT);
    assert_eq!(py["sorted"], true);
    assert_eq!(py["gold"], golds);
    assert_eq!(py["gold_labelled"], true);
    assert_eq!(py["not_one"], COUNT - 1);
    assert_eq!(py["not_one_has_it"], false);

    // kube-rs, unpaged.
    let client = api.client().await?;
    let ar = ApiResource::from_gvk(&GroupVersionKind::gvk(
        "compute.stratus.dev",
        "v1",
        "Flavor",
    ));
    let flavors: Api<DynamicObject> = Api::all_with(client, &ar);
    let started = Instant::now();
    let all = flavors.list(&ListParams::default()).await?;
    eprintln!("kube-rs: {:?}", started.elapsed());
    assert_eq!(all.items.len(), COUNT);
    assert!(all.metadata.continue_.as_deref().unwrap_or("").is_empty());
    let rv: i64 = all
        .metadata
        .resource_version
        .as_deref()
        .context("a list revision")?
        .parse()?;
    assert!(all.items.iter().all(|f| {
        f.metadata
            .resource_version
            .as_deref()
            .and_then(|r| r.parse::<i64>().ok())
            .is_some_and(|r| r <= rv)
    }));
    let selected = flavors
        .list(&ListParams::default().labels("tier=gold"))
        .await?;
    assert_eq!(selected.items.len(), golds);
    let not_one = flavors
        .list(&ListParams::default().fields("metadata.name!=f-00042"))
        .await?;
    assert_eq!(not_one.items.len(), COUNT - 1);
    assert!(
        not_one
            .items
            .iter()
            .all(|f| f.metadata.name.as_deref() != Some("f-00042"))
    );

    // Selected LISTs come from the API server's watch cache, which follows etcd: a change
    // written straight to etcd (as another API server would write it) is in the very next
    // selected LIST, and `resourceVersion=0` is answered from the cache whole.
    let key = flavors_key(&name(1));
    let stored = store.get(&key).await?.context("f-00001 is stored")?;
    let mut relabelled = stored.value.clone();
    relabelled["metadata"]["labels"]["tier"] = "gold".into();
    let written = store.update(&key, &relabelled, stored.mod_revision).await?;
    ensure!(
        matches!(written, stratus_apiserver::storage::store::Write::Done(_)),
        "relabel f-00001: {written:?}"
    );
    let selected = flavors
        .list(&ListParams::default().labels("tier=gold"))
        .await?;
    assert_eq!(selected.items.len(), golds + 1);
    assert!(
        selected
            .items
            .iter()
            .any(|f| f.metadata.name.as_deref() == Some("f-00001"))
    );
    let any = flavors.list(&ListParams::default().match_any()).await?;
    assert_eq!(any.items.len(), COUNT);
    Ok(())
}

/// The etcd key of the Flavor `name`.
fn flavors_key(name: &str) -> String {
    format!("/stratus/compute.stratus.dev/flavors/{name}")
}
