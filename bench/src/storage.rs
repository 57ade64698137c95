//! Block storage: Volumes through `stratus up --storage` (API server, volume scheduler,
//! storage agent on a file pool in its data directory), side by side in one run with the
//! `qemu-img` commands the file driver wraps, run by hand on the same directory: a blank
//! volume's create → Available and delete → gone vs `qemu-img create` and `rm`, and a clone's
//! data copy vs `qemu-img convert` and `dd` of the same file.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use kube::api::{Api, DeleteParams, PostParams};
use kube::runtime::wait::{await_condition, conditions};
use stratus_api_types::storage::{Volume, VolumePhase};
use stratus_e2e::Cloud;

/// How long one volume may take to be made or removed (a loaded 2-core machine).
const WAIT: Duration = Duration::from_secs(300);
const MIB: u64 = 1 << 20;

pub(crate) fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v.get(v.len() / 2).copied().unwrap_or_default()
}

/// Runs `program` with `args`: its standard output, or an error with its standard error.
pub(crate) fn run(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("run {program}"))?;
    if !out.status.success() {
        bail!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn timed(program: &str, args: &[&str]) -> Result<Duration> {
    let t = Instant::now();
    run(program, args)?;
    Ok(t.elapsed())
}

pub(crate) fn volume(name: &str, gib: u64, clone_of: Option<&str>) -> Result<Volume> {
    let mut v = serde_json::json!({
        "apiVersion": "storage.stratus.dev/v1", "kind": "Volume",
        "metadata": {"name": name},
        "spec": {"sizeGiB": gib},
    });
    if let Some(src) = clone_of {
        v["spec"]["source"] = serde_json::json!({"volume": src});
    }
    Ok(serde_json::from_value(v)?)
}

fn is_available(v: Option<&Volume>) -> bool {
    v.and_then(|v| v.status.as_ref())
        .is_some_and(|s| s.phase == VolumePhase::Available)
}

/// Creates `v` and waits until it is Available: the time taken and its device path.
pub(crate) async fn make(api: &Api<Volume>, v: &Volume) -> Result<(Duration, String)> {
    let name = v.metadata.name.clone().unwrap_or_default();
    let t = Instant::now();
    api.create(&PostParams::default(), v).await?;
    let made = tokio::time::timeout(WAIT, await_condition(api.clone(), &name, is_available))
        .await
        .with_context(|| format!("volume {name} Available within {WAIT:?}"))??;
    let took = t.elapsed();
    let path = made
        .and_then(|v| v.status?.device_path)
        .with_context(|| format!("volume {name} has no device path"))?;
    Ok((took, path))
}

/// Deletes volume `name` and waits until it is gone (its data removed by the agent).
pub(crate) async fn remove(api: &Api<Volume>, name: &str) -> Result<Duration> {
    let uid = api.get(name).await?.metadata.uid.unwrap_or_default();
    let t = Instant::now();
    api.delete(name, &DeleteParams::default()).await?;
    tokio::time::timeout(
        WAIT,
        await_condition(api.clone(), name, conditions::is_deleted(&uid)),
    )
    .await
    .with_context(|| format!("volume {name} gone within {WAIT:?}"))??;
    Ok(t.elapsed())
}

/// Writes `len` bytes of non-zero data at the start of `path` and syncs it.
fn fill(path: &Path, len: u64) -> Result<()> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new().write(true).open(path)?;
    let mut block = vec![0u8; MIB as usize];
    for i in 0..len / MIB {
        for (j, b) in block.iter_mut().enumerate() {
            *b = (i as usize).wrapping_mul(31).wrapping_add(j) as u8 | 1;
        }
        f.write_all(&block)?;
    }
    f.sync_all()?;
    Ok(())
}

pub(crate) fn row(label: &str, v: &[Duration]) {
    println!(
        "| {label} | {} | {} | {} |",
        crate::ms(median(v.to_vec())),
        crate::ms(v.iter().min().copied().unwrap_or_default()),
        crate::ms(v.iter().max().copied().unwrap_or_default()),
    );
}

pub(crate) fn ratio(ours: &[Duration], theirs: &[Duration]) -> f64 {
    median(ours.to_vec()).as_secs_f64() / median(theirs.to_vec()).as_secs_f64().max(1e-9)
}

fn mib_s(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / MIB as f64 / d.as_secs_f64().max(1e-9)
}

/// `stratus-bench storage`: `volumes` blank 1 GiB volumes made and deleted one at a time,
/// alternating with `qemu-img create` and `rm` of a 1 GiB raw file in the same directory;
/// then `rounds` clones of a volume holding `copy_mib` MiB of data, alternating with
/// `qemu-img convert` and `dd` of its file.
pub async fn bench(volumes: usize, copy_mib: u64, rounds: usize) -> Result<()> {
    let cloud = Cloud::up_with(&["--storage"])?;
    cloud.projects(&["bench"])?;
    let client = cloud.client().await?;
    let api: Api<Volume> = Api::namespaced(client, "bench");
    let pool: PathBuf = cloud.dir.path().join("volumes");
    let reference = pool.join("reference.raw");
    let reference = reference.to_str().context("a UTF-8 path")?.to_string();

    // The pool registers and the project's namespace is made: one volume first, unmeasured.
    let warm = volume("warm-up", 1, None)?;
    let started = Instant::now();
    loop {
        match api.create(&PostParams::default(), &warm).await {
            Ok(_) => break,
            // The project's namespace may not take objects yet.
            Err(_) if started.elapsed() < WAIT => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
    tokio::time::timeout(WAIT, await_condition(api.clone(), "warm-up", is_available))
        .await
        .context("the warm-up volume Available")??;
    remove(&api, "warm-up").await?;

    let (mut ours_make, mut ours_delete) = (Vec::new(), Vec::new());
    let (mut ref_make, mut ref_delete) = (Vec::new(), Vec::new());
    for i in 0..volumes {
        let name = format!("v-{i}");
        let (took, _) = make(&api, &volume(&name, 1, None)?).await?;
        ours_make.push(took);
        ours_delete.push(remove(&api, &name).await?);
        ref_make.push(timed(
            "qemu-img",
            &["create", "-q", "-f", "raw", &reference, "1G"],
        )?);
        ref_delete.push(timed("rm", &["-f", &reference])?);
    }

    // A source volume with data, cloned `rounds` times.
    let copy_gib = copy_mib.div_ceil(1024).max(1);
    let (_, src_path) = make(&api, &volume("source", copy_gib, None)?).await?;
    fill(Path::new(&src_path), copy_mib * MIB)?;
    let (mut ours_clone, mut ref_convert, mut ref_dd) = (Vec::new(), Vec::new(), Vec::new());
    for r in 0..rounds {
        let name = format!("clone-{r}");
        let (took, path) = make(&api, &volume(&name, copy_gib, Some("source"))?).await?;
        ensure!(
            std::fs::metadata(&path)?.len() == copy_gib << 30,
            "the clone {name} is not its size"
        );
        ours_clone.push(took);
        remove(&api, &name).await?;
        ref_convert.push(timed(
            "qemu-img",
            &["convert", "-f", "raw", "-O", "raw", &src_path, &reference],
        )?);
        run("rm", &["-f", &reference])?;
        ref_dd.push(timed(
            "dd",
            &[
                &format!("if={src_path}"),
                &format!("of={reference}"),
                "bs=4M",
                "conv=sparse,fsync",
                "status=none",
            ],
        )?);
        run("rm", &["-f", &reference])?;
    }
    remove(&api, "source").await?;

    println!(
        "| file pool, {volumes} volumes and {rounds} clones of {copy_mib} MiB, alternating | median | min | max |"
    );
    println!("|---|---|---|---|");
    row("reference: `qemu-img create -f raw` 1 GiB", &ref_make);
    row("Stratus: create Volume 1 GiB → Available", &ours_make);
    row("reference: `rm` of the file", &ref_delete);
    row("Stratus: delete Volume → gone", &ours_delete);
    row(
        &format!("reference: `qemu-img convert` of {copy_mib} MiB"),
        &ref_convert,
    );
    row(
        &format!("reference: `dd bs=4M conv=sparse,fsync` of {copy_mib} MiB"),
        &ref_dd,
    );
    row(
        &format!("Stratus: create clone Volume ({copy_mib} MiB of data) → Available"),
        &ours_clone,
    );
    println!();
    let bytes = copy_mib * MIB;
    println!(
        "create: Stratus {:.2}x the reference (+{:.0} ms, goal ≤ +300 ms); delete {:.2}x; clone throughput {:.0} MiB/s vs qemu-img convert {:.0} MiB/s ({:.2}x its time) and dd {:.0} MiB/s (medians).",
        ratio(&ours_make, &ref_make),
        (median(ours_make.clone()).as_secs_f64() - median(ref_make.clone()).as_secs_f64()) * 1e3,
        ratio(&ours_delete, &ref_delete),
        mib_s(bytes, median(ours_clone.clone())),
        mib_s(bytes, median(ref_convert.clone())),
        ratio(&ours_clone, &ref_convert),
        mib_s(bytes, median(ref_dd.clone())),
    );
    Ok(())
}
