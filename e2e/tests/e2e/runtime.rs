//! The reconciler runtime every controller and agent shares, against a real API server: a
//! failure that retrying cannot fix is reported in the object's status and retried only at
//! the cap; a failure that may pass is retried with a delay that doubles; a success clears
//! both.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Result;
use futures::StreamExt;
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::watcher;
use stratus_api_types::common::ConditionType;
use stratus_api_types::image::Image;
use stratus_e2e::{Apiserver, Etcd, wait_until};
use stratus_runtime::{Backoff, Classify, Retry, Runtime};

/// What the test reconciler fails with.
#[derive(Debug)]
enum Failure {
    /// Retrying cannot help.
    Bug,
    /// It may pass.
    Flaky,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Bug => f.write_str("the image's spec breaks an invariant of this reconciler"),
            Self::Flaky => f.write_str("the backend is not answering"),
        }
    }
}

impl std::error::Error for Failure {}

impl Classify for Failure {
    fn retry(&self) -> Retry {
        match self {
            Self::Bug => Retry::Never,
            Self::Flaky => Retry::Backoff,
        }
    }
}

struct Ctx {
    runtime: Runtime<Image>,
    attempts: Mutex<HashMap<String, Vec<Instant>>>,
    healed: AtomicBool,
}

impl Ctx {
    fn attempts(&self, name: &str) -> Vec<Instant> {
        self.attempts
            .lock()
            .expect("attempts")
            .get(name)
            .cloned()
            .unwrap_or_default()
    }
}

async fn reconcile(image: Arc<Image>, ctx: Arc<Ctx>) -> Result<Action, Failure> {
    let name = image.name_any();
    ctx.attempts
        .lock()
        .expect("attempts")
        .entry(name.clone())
        .or_default()
        .push(Instant::now());
    let result = match (ctx.healed.load(Ordering::SeqCst), name.as_str()) {
        (true, _) => Ok(Action::await_change()),
        (false, "bug") => Err(Failure::Bug),
        (false, _) => Err(Failure::Flaky),
    };
    ctx.runtime.finish(&image, result).await
}

fn error_policy(image: Arc<Image>, e: &Failure, ctx: Arc<Ctx>) -> Action {
    ctx.runtime.error_policy(&image, e)
}

fn gaps(times: &[Instant]) -> Vec<Duration> {
    times.windows(2).map(|w| w[1] - w[0]).collect()
}

fn reconciled(image: &Image) -> Option<(String, String, String)> {
    let c = ConditionType::Reconciled.find(&image.status.as_ref()?.conditions)?;
    Some((c.status.clone(), c.reason.clone(), c.message.clone()))
}

#[tokio::test]
async fn unfixable_failures_are_reported_in_status_and_others_back_off() -> Result<()> {
    let etcd = Etcd::start()?;
    let api = Apiserver::start(&etcd.endpoint)?;
    api.projects(&["rt"])?;
    for name in ["bug", "flaky"] {
        api.kubectl_in(
            &["apply", "-f", "-"],
            &format!(
                "apiVersion: image.stratus.dev/v1\nkind: Image\nmetadata:\n  name: {name}\n  namespace: rt\nspec:\n  diskFormat: raw\n  containerFormat: bare\n  source:\n    url: http://127.0.0.1:9/{name}.img\n"
            ),
        )?;
    }
    let client = api.client().await?;
    let images: Api<Image> = Api::namespaced(client.clone(), "rt");
    let cap = Duration::from_millis(1600);
    let ctx = Arc::new(Ctx {
        runtime: Runtime::with_backoff(
            client.clone(),
            "e2e-runtime",
            Backoff::new(
                Duration::from_millis(50),
                Duration::from_millis(200),
                Duration::from_millis(200),
                cap,
            ),
        ),
        attempts: Mutex::default(),
        healed: AtomicBool::new(false),
    });
    let controller = tokio::spawn(
        Controller::new(images.clone(), watcher::Config::default())
            .run(reconcile, error_policy, Arc::clone(&ctx))
            .for_each(|_| async {}),
    );

    // The unfixable failure is in the object's status, with the error as message.
    let t = Duration::from_secs(90);
    let images_ = images.clone();
    let status = tokio::task::spawn_blocking(move || {
        let rt = tokio::runtime::Handle::current();
        wait_until(t, "Reconciled=False on the image", || {
            rt.block_on(images_.get("bug"))
                .ok()
                .and_then(|i| reconciled(&i))
        })
    })
    .await??;
    assert_eq!(
        status,
        (
            "False".to_string(),
            "ReconcileError".to_string(),
            "the image's spec breaks an invariant of this reconciler".to_string()
        )
    );

    // Five tries of the flaky one: 200, 400, 800, 1600 ms apart (and no status report);
    // awaited, as a loaded machine takes longer than those 3 s to make them.
    let deadline = Instant::now() + t;
    while ctx.attempts("flaky").len() < 5 || ctx.attempts("bug").len() < 3 {
        anyhow::ensure!(
            Instant::now() < deadline,
            "within {t:?}, {} tries of the flaky image and {} of the unfixable one",
            ctx.attempts("flaky").len(),
            ctx.attempts("bug").len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let flaky = ctx.attempts("flaky");
    assert!(
        flaky.len() >= 5,
        "only {} tries of the flaky image",
        flaky.len()
    );
    let expected = [200, 400, 800, 1600].map(Duration::from_millis);
    for (i, (gap, want)) in gaps(&flaky).iter().zip(expected).enumerate() {
        assert!(
            *gap >= want.mul_f64(0.9),
            "try {} of the flaky image came {gap:?} after the one before, not after {want:?}",
            i + 2
        );
    }
    assert_eq!(reconciled(&images.get("flaky").await?), None);
    // The unfixable one is tried again only at the cap (its status write is a change of its
    // own, which reconciles it once more at once).
    let bug = ctx.attempts("bug");
    assert!(
        bug.len() >= 3,
        "only {} tries of the unfixable image",
        bug.len()
    );
    for gap in &gaps(&bug)[1..] {
        assert!(
            *gap >= cap.mul_f64(0.9),
            "the unfixable image was retried after {gap:?}; the cap is {cap:?}"
        );
    }
    assert!(ctx.runtime.backoff().failures(&images.get("flaky").await?) >= 5);

    // Mended: the next reconcile succeeds, clears the report and forgets the failures.
    ctx.healed.store(true, Ordering::SeqCst);
    for name in ["bug", "flaky"] {
        images
            .patch(
                name,
                &PatchParams::default(),
                &Patch::Merge(serde_json::json!({"metadata": {"labels": {"mended": "yes"}}})),
            )
            .await?;
    }
    let images_ = images.clone();
    let status = tokio::task::spawn_blocking(move || {
        let rt = tokio::runtime::Handle::current();
        wait_until(t, "Reconciled=True on the image", || {
            rt.block_on(images_.get("bug"))
                .ok()
                .and_then(|i| reconciled(&i))
                .filter(|(s, _, _)| s == "True")
        })
    })
    .await??;
    assert_eq!(status.1, "Reconciled");
    for name in ["bug", "flaky"] {
        let image = images.get(name).await?;
        assert_eq!(ctx.runtime.backoff().failures(&image), 0, "{name}");
    }
    controller.abort();
    Ok(())
}

/// Client sockets of this process's namespace connected to `port` on loopback (IPv4).
fn connections_to(port: u16) -> Result<usize> {
    let table = std::fs::read_to_string("/proc/self/net/tcp")?;
    let want = format!("0100007F:{port:04X}");
    // Columns: slot, local address, remote address, state (01: established).
    Ok(table
        .lines()
        .skip(1)
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 3 && f[2] == want && f[3] == "01"
        })
        .count())
}

/// Starts `n` watches of Hypervisors by name through `client`; returned once each listed.
async fn watches(client: &kube::Client, n: usize) -> Result<Vec<tokio::task::JoinHandle<()>>> {
    use stratus_api_types::compute::Hypervisor;
    let (tx, mut rx) = tokio::sync::mpsc::channel(n);
    let tasks = (0..n)
        .map(|i| {
            let api: Api<Hypervisor> = Api::all(client.clone());
            let cfg = watcher::Config::default().fields(&format!("metadata.name=h{i}"));
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut events = std::pin::pin!(watcher(api, cfg));
                let mut told = false;
                while let Some(ev) = events.next().await {
                    if !told && matches!(ev, Ok(watcher::Event::InitDone)) {
                        told = tx.send(()).await.is_ok();
                    }
                }
            })
        })
        .collect();
    for _ in 0..n {
        tokio::time::timeout(Duration::from_secs(60), rx.recv())
            .await?
            .ok_or_else(|| anyhow::anyhow!("a watch ended"))?;
    }
    Ok(tasks)
}

/// An agent watches each network, subnet list, port list and security group of its node one
/// by one, as the node authorizer lets it: the shared runtime's client carries all of a
/// process's watches over one HTTP/2 connection, where kube's own (HTTP/1.1) holds one
/// connection a watch (hundreds for a node of a hundred networks); the API server lets that
/// connection carry more streams than the watches, so a request is answered while they run.
#[tokio::test]
async fn a_processs_watches_share_one_connection_to_the_api_server() -> Result<()> {
    let etcd = Etcd::start()?;
    // More watches than HTTP/2's usual 200 streams a connection, all one identity's.
    let api = Apiserver::start_with_flags(&etcd.endpoint, &["--max-watches-per-user", "1000"])?;
    let port: u16 = api.url.rsplit(':').next().unwrap_or_default().parse()?;
    let kc = kube::config::Kubeconfig::read_from(api.kubeconfig())?;
    let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?;
    let n = 250;
    let h2 = stratus_runtime::client::client(cfg.clone())?;
    let tasks = watches(&h2, n).await?;
    let by_h2 = connections_to(port)?;
    // And requests go over the same connection while the watches run, at once.
    let hvs: Api<stratus_api_types::compute::Hypervisor> = Api::all(h2.clone());
    tokio::time::timeout(Duration::from_secs(10), hvs.list(&Default::default())).await??;
    assert_eq!(
        (by_h2, connections_to(port)?),
        (1, 1),
        "{n} watches and a list"
    );
    // kube's client, for contrast (what this test rests on): a connection a watch.
    let h1 = kube::Client::try_from(cfg)?;
    let more = watches(&h1, n).await?;
    let by_h1 = connections_to(port)? - 1;
    assert!(by_h1 >= n, "HTTP/1.1: {by_h1} connections for {n} watches");
    tasks.iter().chain(&more).for_each(|t| t.abort());
    Ok(())
}
