//! Block storage through the API, against a real cloud (`stratus up`: etcd, the API server,
//! the controllers): the volume scheduler places Volumes on StoragePools registered by the
//! test as an agent would (status written by the test), the binding claims pool capacity in
//! the placement's transaction, extends and snapshots claim in theirs, bad input is a 4xx
//! naming the field, and a node reaches only the storage placed on it.

use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use stratus_api_types::storage::{StoragePool, Volume, VolumeSnapshot};
use stratus_e2e::Cloud;

/// Generous: the controllers share two cores with every other test.
const WAIT: Duration = Duration::from_secs(180);

/// Registers a Ready pool on `node` with `capacity` GiB, nothing reserved, as its storage
/// agent would (spec by the admin here, status as the agent writes it).
async fn pool(pools: &Api<StoragePool>, name: &str, node: &str, capacity: u64) -> Result<()> {
    let p: StoragePool = serde_json::from_value(json!({
        "apiVersion": "storage.stratus.dev/v1", "kind": "StoragePool",
        "metadata": {"name": name},
        "spec": {"backend": "lvm", "node": node, "vgName": "stratus", "reservedPercentage": 0},
    }))?;
    pools.create(&PostParams::default(), &p).await?;
    let status = json!({"status": {
        "phase": "Ready", "capacityGiB": capacity,
        "conditions": [{"type": "Ready", "status": "True", "reason": "AgentReady",
                        "message": "", "lastTransitionTime": "2026-01-01T00:00:00Z"}],
    }});
    pools
        .patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .with_context(|| format!("report pool {name}"))?;
    Ok(())
}

fn volume(name: &str, size: u64) -> Result<Volume> {
    Ok(serde_json::from_value(json!({
        "apiVersion": "storage.stratus.dev/v1", "kind": "Volume",
        "metadata": {"name": name},
        "spec": {"sizeGiB": size},
    }))?)
}

fn placed_on(v: &Volume) -> Option<&str> {
    v.status.as_ref()?.pool.as_deref()
}

/// The reason and message of a volume's `Scheduled=False`, if it has one.
fn unscheduled(v: &Volume) -> Option<(String, String)> {
    let c = v
        .status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == "Scheduled" && c.status == "False")?;
    Some((c.reason.clone(), c.message.clone()))
}

/// The pool's `(allocatedGiB, volumes)`, as the volume scheduler accounts them.
async fn accounted(pools: &Api<StoragePool>, name: &str) -> Result<(Option<u64>, Option<u32>)> {
    let p = pools.get(name).await?;
    let s = p.status.unwrap_or_default();
    Ok((s.allocated_gib, s.volumes))
}

/// Waits until the pool's accounting reads `(gib, count)`.
async fn wait_accounted(pools: &Api<StoragePool>, name: &str, gib: u64, count: u32) -> Result<()> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let got = accounted(pools, name).await?;
        if got == (Some(gib), Some(count)) {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            bail!("pool {name} accounts {got:?}, not ({gib} GiB, {count} volumes)");
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Waits until `ok` holds of the project's volumes; the last list when it does.
async fn wait_volumes(
    vols: &Api<Volume>,
    what: &str,
    ok: impl Fn(&[Volume]) -> bool,
) -> Result<Vec<Volume>> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let list = vols.list(&Default::default()).await?.items;
        if ok(&list) {
            return Ok(list);
        }
        if tokio::time::Instant::now() > deadline {
            let seen: Vec<String> = list
                .iter()
                .map(|v| {
                    format!(
                        "{} on {:?}, unscheduled {:?}",
                        v.metadata.name.as_deref().unwrap_or_default(),
                        placed_on(v),
                        unscheduled(v)
                    )
                })
                .collect();
            bail!("{what}: not within {WAIT:?}; volumes: {seen:?}");
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

fn count_placed(list: &[Volume]) -> usize {
    list.iter().filter(|v| placed_on(v).is_some()).count()
}

/// The capacity race of issue 15: 30 concurrent 1 GiB volumes against a 10 GiB pool.
#[tokio::test]
async fn thirty_volumes_against_a_ten_gib_pool_place_exactly_ten() -> Result<()> {
    let cloud = Cloud::up()?;
    cloud.projects(&["demo"])?;
    let client = cloud.client().await?;
    let pools: Api<StoragePool> = Api::all(client.clone());
    let vols: Api<Volume> = Api::namespaced(client.clone(), "demo");
    pool(&pools, "p1", "n1", 10).await?;
    let creates = (0..30).map(|i| {
        let vols = vols.clone();
        async move {
            let v = volume(&format!("v{i:02}"), 1)?;
            vols.create(&PostParams::default(), &v).await?;
            Ok::<_, anyhow::Error>(())
        }
    });
    for r in futures::future::join_all(creates).await {
        r?;
    }
    let list = wait_volumes(&vols, "10 placed, 20 told why not", |l| {
        l.len() == 30
            && count_placed(l) == 10
            && l.iter()
                .filter(|v| placed_on(v).is_none())
                .all(|v| unscheduled(v).is_some())
    })
    .await
    .with_context(|| cloud.log())?;
    for v in list.iter().filter(|v| placed_on(v).is_none()) {
        let (reason, message) = unscheduled(v).context("a reason")?;
        ensure!(reason == "NoPoolAvailable", "{reason}: {message}");
        ensure!(
            message.contains("1 insufficient capacity"),
            "the message says why: {message}"
        );
        let phase = v.status.as_ref().map(|s| s.phase);
        ensure!(
            phase == Some(stratus_api_types::storage::VolumePhase::Pending),
            "{phase:?}"
        );
    }
    for v in list.iter().filter(|v| placed_on(v).is_some()) {
        let st = v.status.as_ref().context("status")?;
        ensure!(st.node.as_deref() == Some("n1"), "{st:?}");
        ensure!(
            st.phase == stratus_api_types::storage::VolumePhase::Creating,
            "{st:?}"
        );
    }
    wait_accounted(&pools, "p1", 10, 10).await?;
    // Nothing more is placed while nothing frees room.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let now = vols.list(&Default::default()).await?.items;
    ensure!(count_placed(&now) == 10, "{} placed", count_placed(&now));

    // Deleting a placed one frees its claim once its storage agent released it (the binding
    // added the agent's finalizer; the test releases it as the agent would): a waiting one
    // takes its place.
    let gone = list
        .iter()
        .find(|v| placed_on(v).is_some())
        .and_then(|v| v.metadata.name.clone())
        .context("a placed volume")?;
    vols.delete(&gone, &DeleteParams::default()).await?;
    let held = vols.get(&gone).await?;
    ensure!(
        held.metadata.finalizers.as_deref()
            == Some(&["storage.stratus.dev/teardown".to_string()][..]),
        "{:?}",
        held.metadata.finalizers
    );
    vols.patch(
        &gone,
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"finalizers": null}})),
    )
    .await?;
    wait_volumes(&vols, "a waiting volume placed in the freed room", |l| {
        l.len() == 29 && count_placed(l) == 10
    })
    .await
    .with_context(|| cloud.log())?;
    wait_accounted(&pools, "p1", 10, 10).await?;
    Ok(())
}

/// The API's error for a kubectl command that should fail: its stderr.
fn refused(cloud: &Cloud, args: &[&str], stdin: Option<&str>) -> Result<String> {
    let out = match stdin {
        Some(s) => stratus_e2e::with_stdin(
            {
                let mut c = cloud.kubectl_cmd();
                c.args(args);
                c
            },
            s,
        )?,
        None => cloud.kubectl(args)?,
    };
    ensure!(
        !out.status.success(),
        "kubectl {} was accepted: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout)
    );
    Ok(String::from_utf8_lossy(&out.stderr).into_owned())
}

fn volume_yaml(name: &str, size: &str) -> String {
    format!(
        "apiVersion: storage.stratus.dev/v1\nkind: Volume\nmetadata:\n  name: {name:?}\n  namespace: demo\nspec:\n  sizeGiB: {size}\n"
    )
}

#[tokio::test]
async fn extends_snapshots_bad_input_and_what_a_node_may_touch() -> Result<()> {
    let cloud = Cloud::up_with(&["--nodes", "n1,n2"])?;
    cloud.projects(&["demo"])?;
    let client = cloud.client().await?;
    let pools: Api<StoragePool> = Api::all(client.clone());
    let vols: Api<Volume> = Api::namespaced(client.clone(), "demo");
    let snaps: Api<VolumeSnapshot> = Api::namespaced(client.clone(), "demo");
    pool(&pools, "p1", "n1", 20).await?;
    let pinned: Volume = serde_json::from_value(json!({
        "apiVersion": "storage.stratus.dev/v1", "kind": "Volume",
        "metadata": {"name": "data"},
        "spec": {"sizeGiB": 3, "storagePool": "p1"},
    }))?;
    vols.create(&PostParams::default(), &pinned).await?;
    wait_volumes(&vols, "data placed", |l| {
        l.iter().any(|v| placed_on(v) == Some("p1"))
    })
    .await
    .with_context(|| cloud.log())?;

    // Extend within the pool: its claim grows; past it: 409, nothing changed.
    let grow = |size: u64| Patch::Merge(json!({"spec": {"sizeGiB": size}}));
    vols.patch("data", &PatchParams::default(), &grow(8))
        .await?;
    wait_accounted(&pools, "p1", 8, 1).await?;
    match vols.patch("data", &PatchParams::default(), &grow(21)).await {
        Err(kube::Error::Api(e)) if e.code == 409 => ensure!(
            e.message.contains("12 GiB free, 13 GiB more asked"),
            "{}",
            e.message
        ),
        other => bail!("an extend past the pool: {other:?}"),
    }
    ensure!(vols.get("data").await?.spec.size_gib == 8);
    // Shrinking, sizes of 0 or below: 422 naming spec.sizeGiB.
    let err = refused(
        &cloud,
        &[
            "-n",
            "demo",
            "patch",
            "volume",
            "data",
            "--type=merge",
            "-p",
            r#"{"spec":{"sizeGiB":4}}"#,
        ],
        None,
    )?;
    ensure!(
        err.contains("spec.sizeGiB") && err.contains("cannot shrink"),
        "{err}"
    );
    for size in ["0", "-1"] {
        let err = refused(
            &cloud,
            &["apply", "-f", "-"],
            Some(&volume_yaml("bad", size)),
        )?;
        ensure!(err.contains("spec.sizeGiB"), "size {size}: {err}");
    }
    // Names with shell metacharacters: refused, nothing made.
    for name in ["v;reboot", "$(id)", "a|b"] {
        let err = refused(
            &cloud,
            &["create", "-f", "-"],
            Some(&volume_yaml(name, "1")),
        )?;
        ensure!(
            err.contains("metadata.name") || err.contains("Invalid"),
            "{name}: {err}"
        );
    }
    ensure!(vols.list(&Default::default()).await?.items.len() == 1);

    // A snapshot of a missing volume: 422 on spec.volume. Of `data`: placed with it.
    let snap = |of: &str| {
        format!(
            "apiVersion: storage.stratus.dev/v1\nkind: VolumeSnapshot\nmetadata:\n  name: s1\n  namespace: demo\nspec:\n  volume: {of}\n"
        )
    };
    let err = refused(&cloud, &["apply", "-f", "-"], Some(&snap("missing")))?;
    ensure!(
        err.contains("spec.volume") && err.contains("does not exist"),
        "{err}"
    );
    cloud.kubectl_in(&["apply", "-f", "-"], &snap("data"))?;
    let s1 = snaps.get("s1").await?;
    let st = s1.status.context("the snapshot's status")?;
    ensure!(
        st.pool.as_deref() == Some("p1")
            && st.node.as_deref() == Some("n1")
            && st.size_gib == Some(8),
        "{st:?}"
    );
    wait_accounted(&pools, "p1", 16, 1).await?;
    // A volume with snapshots, or attached, is not deleted (409).
    let err = refused(
        &cloud,
        &["-n", "demo", "delete", "volume", "data", "--wait=false"],
        None,
    )?;
    ensure!(err.contains("snapshot") && err.contains("s1"), "{err}");
    snaps.delete("s1", &DeleteParams::default()).await?;
    wait_accounted(&pools, "p1", 8, 1).await?;
    // Attached as a server attaches it: the Server's create claims it (`status.attachedTo`).
    // The server is never placed (no hypervisor), so it holds the volume until it is deleted.
    cloud.kubectl_in(
        &["apply", "-f", "-"],
        "apiVersion: compute.stratus.dev/v1\nkind: Flavor\nmetadata:\n  name: vols-api\nspec:\n  vcpus: 1\n  ramMiB: 128\n  diskGiB: 1\n---\napiVersion: compute.stratus.dev/v1\nkind: Server\nmetadata:\n  name: web\n  namespace: demo\nspec:\n  flavor: vols-api\n  image: tiny\n  volumes:\n  - volume: data\n",
    )?;
    ensure!(
        vols.get("data")
            .await?
            .status
            .and_then(|s| s.attached_to)
            .as_deref()
            == Some("web"),
        "the server's create attached the volume"
    );
    let err = refused(
        &cloud,
        &["-n", "demo", "delete", "volume", "data", "--wait=false"],
        None,
    )?;
    ensure!(err.contains("attached to server"), "{err}");
    ensure!(vols.get_opt("data").await?.is_some(), "still there");

    // Node n2 reaches nothing of n1's; n1 reaches its own.
    let as_node = |n: &str| cloud.dir.path().join(format!("node-{n}.kubeconfig"));
    let node_refused = |n: &str, args: &[&str]| -> Result<()> {
        let out = cloud.kubectl_as(&as_node(n), args)?;
        let err = String::from_utf8_lossy(&out.stderr);
        ensure!(
            !out.status.success() && err.contains("Forbidden"),
            "node {n}: kubectl {} was not refused: {}{err}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout)
        );
        Ok(())
    };
    node_refused("n2", &["-n", "demo", "get", "volume", "data"])?;
    node_refused(
        "n2",
        &[
            "-n",
            "demo",
            "get",
            "volumes",
            "--field-selector",
            "status.node=n1",
        ],
    )?;
    node_refused(
        "n2",
        &[
            "-n",
            "demo",
            "patch",
            "volume",
            "data",
            "--subresource=status",
            "--type=merge",
            "-p",
            r#"{"status":{"phase":"Error"}}"#,
        ],
    )?;
    // A node reads a pool by name (the storage address of a volume it attaches from another
    // node) but lists none of others.
    node_refused("n2", &["get", "storagepools"])?;
    node_refused(
        "n2",
        &[
            "patch",
            "storagepool",
            "p1",
            "--subresource=status",
            "--type=merge",
            "-p",
            r#"{"status":{"capacityGiB":1000}}"#,
        ],
    )?;
    node_refused(
        "n1",
        &["-n", "demo", "delete", "volume", "data", "--wait=false"],
    )?;
    let out = cloud.kubectl_as(
        &as_node("n1"),
        &["-n", "demo", "get", "volume", "data", "-o", "json"],
    )?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seen: Value = serde_json::from_slice(&out.stdout)?;
    ensure!(seen["status"]["pool"] == "p1");
    let ok = cloud.kubectl_as(
        &as_node("n1"),
        &[
            "-n",
            "demo",
            "patch",
            "volume",
            "data",
            "--subresource=status",
            "--type=merge",
            "-p",
            r#"{"status":{"phase":"Available","devicePath":"/dev/loop9"}}"#,
        ],
    )?;
    ensure!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let moved = cloud.kubectl_as(
        &as_node("n1"),
        &[
            "-n",
            "demo",
            "patch",
            "volume",
            "data",
            "--subresource=status",
            "--type=merge",
            "-p",
            r#"{"status":{"node":"n2"}}"#,
        ],
    )?;
    ensure!(!moved.status.success(), "a node moved its volume");
    Ok(())
}

/// A snapshot asked of a volume no pool can take yet is accepted and waits (`Pending`,
/// `Ready=False` `SourceNotReady`); the volume scheduler places the volume once a pool
/// appears, and the snapshot with it when there is room, else once room appears (the
/// scheduler binds the volume again while a snapshot of it waits).
#[tokio::test]
async fn a_snapshot_of_a_volume_not_placed_yet_is_placed_with_it() -> Result<()> {
    let cloud = Cloud::up_with(&["--nodes", "n1"])?;
    cloud.projects(&["demo"])?;
    let client = cloud.client().await?;
    let pools: Api<StoragePool> = Api::all(client.clone());
    let vols: Api<Volume> = Api::namespaced(client.clone(), "demo");
    let snaps: Api<VolumeSnapshot> = Api::namespaced(client.clone(), "demo");
    vols.create(&PostParams::default(), &volume("v", 3)?)
        .await?;
    let early: VolumeSnapshot = serde_json::from_value(json!({
        "apiVersion": "storage.stratus.dev/v1", "kind": "VolumeSnapshot",
        "metadata": {"name": "early"},
        "spec": {"volume": "v"},
    }))?;
    let made = snaps.create(&PostParams::default(), &early).await?;
    let ready = |s: &VolumeSnapshot| {
        s.status
            .as_ref()
            .and_then(|st| st.conditions.iter().find(|c| c.type_ == "Ready").cloned())
    };
    let st = made.status.clone().context("its status")?;
    ensure!(st.pool.is_none() && st.size_gib.is_none(), "{st:?}");
    let waits = ready(&made).context("its Ready condition")?;
    ensure!(
        (waits.status.as_str(), waits.reason.as_str()) == ("False", "SourceNotReady"),
        "{waits:?}"
    );
    // A pool with room for the volume alone.
    pool(&pools, "p1", "n1", 4).await?;
    wait_volumes(&vols, "v placed", |l| {
        l.iter().any(|v| placed_on(v) == Some("p1"))
    })
    .await
    .with_context(|| cloud.log())?;
    let told = wait_snapshot(&snaps, "the snapshot saying why it waits", |s| {
        ready(s).is_some_and(|c| c.message.contains("1 GiB free, 3 GiB asked"))
    })
    .await
    .with_context(|| cloud.log())?;
    ensure!(
        told.status.as_ref().is_some_and(|s| s.pool.is_none()),
        "{told:?}"
    );
    // Room appears (the pool grows): the snapshot is placed with its volume.
    let grown = json!({"status": {"capacityGiB": 10}});
    pools
        .patch_status("p1", &PatchParams::default(), &Patch::Merge(&grown))
        .await?;
    wait_snapshot(&snaps, "the snapshot placed", |s| {
        s.status
            .as_ref()
            .is_some_and(|st| st.pool.as_deref() == Some("p1") && st.size_gib == Some(3))
    })
    .await
    .with_context(|| cloud.log())?;
    Ok(())
}

/// Waits until `ok` holds of snapshot `early`; the snapshot then.
async fn wait_snapshot(
    snaps: &Api<VolumeSnapshot>,
    what: &str,
    ok: impl Fn(&VolumeSnapshot) -> bool,
) -> Result<VolumeSnapshot> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let s = snaps.get("early").await?;
        if ok(&s) {
            return Ok(s);
        }
        if tokio::time::Instant::now() > deadline {
            bail!("{what}: not within {WAIT:?}; the snapshot: {:?}", s.status);
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}
