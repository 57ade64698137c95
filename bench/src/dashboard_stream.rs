//! The dashboard's servers list under a stream of changes: a fixed rate of status writes
//! (each a merge patch of one server's `status.flavor`, which the list's Flavor column
//! shows, to a value naming the change) for a fixed time, through the API with one kube-rs
//! client. Each change is timed from just before its write until the page's DOM holds it (a
//! MutationObserver on the list records the wall clock per change, read once at the end) and
//! until a `kubectl get servers -w` running beside the page prints it.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use stratus_e2e::browser::Browser;
use stratus_e2e::wait_until;

use crate::dashboard::{epoch_ms, median, p99};
use crate::{ms, req};

/// How the changes are made and what the page and kubectl are measured against.
pub struct Stream<'a> {
    /// The project's servers collection (`/apis/.../namespaces/P/servers`).
    pub servers_path: &'a str,
    /// Servers changed in turn (`srv-00000` …): one change of each per `servers / rate`
    /// seconds, so that no two changes of one server can fall in one drawing of the page.
    pub servers: usize,
    /// Changes a second.
    pub rate: u32,
    /// For how long.
    pub seconds: u64,
}

/// The value a change writes: its number, which the page's Flavor cell and kubectl's
/// column then show.
fn mark(i: usize) -> String {
    format!("c-{i:06}")
}

fn index(mark: &str) -> Option<usize> {
    mark.strip_prefix("c-")?.parse().ok()
}

/// Installs, in the open servers list, the observer that records when each change's mark
/// appears in a Flavor cell (the page's own assets are not touched).
const OBSERVE: &str = "window.__stream = []; \
    const body = document.querySelector('#list tbody'); \
    window.__streamObserver = new MutationObserver((records) => { \
      const t = performance.timeOrigin + performance.now(); \
      for (const r of records) { \
        const e = r.target.nodeType === 1 ? r.target : r.target.parentElement; \
        const cell = e && e.closest('td[data-col=flavor]'); \
        if (cell && cell.textContent.startsWith('c-')) { window.__stream.push([cell.textContent, t]); } \
      } \
    }); \
    window.__streamObserver.observe(body, {subtree: true, childList: true, characterData: true}); \
    return true";

/// Streams the changes and prints the comparison.
pub async fn run(
    s: Stream<'_>,
    b: &mut Browser,
    admin: &kube::Client,
    kubectl: impl Fn(&[&str]) -> Command,
) -> Result<()> {
    let total = s.rate as usize * s.seconds as usize;
    if s.servers < s.rate as usize {
        // Two changes of one server within a second could be drawn as one: the page would
        // rightly skip the first, and be counted as missing it.
        bail!(
            "--stream-rate {} needs at least as many servers (--servers {})",
            s.rate,
            s.servers
        );
    }
    let load_before = loadavg();
    tokio::task::block_in_place(|| -> Result<()> {
        b.until(
            &format!(
                "return document.querySelectorAll('#list tbody tr').length >= {} && document.querySelector('#live').dataset.state === 'live'",
                s.servers
            ),
            120,
            "the servers list, live",
        )?;
        b.js(OBSERVE)?;
        Ok(())
    })?;

    // The reference: kubectl's watch of the same servers, printing each one's name and
    // status.flavor; the first time each change's mark is printed.
    let mut watch = kubectl(&[
        "get",
        "servers",
        "-w",
        "--no-headers",
        "-o",
        "custom-columns=NAME:.metadata.name,FLAVOR:.status.flavor",
    ])
    .stdout(Stdio::piped())
    .stderr(Stdio::null())
    .spawn()
    .context("run kubectl get -w")?;
    let lines = Arc::new(Mutex::new(0usize));
    let printed: Arc<Mutex<HashMap<usize, f64>>> = Arc::default();
    {
        let (lines, printed) = (Arc::clone(&lines), Arc::clone(&printed));
        let out = watch.stdout.take().context("kubectl's stdout")?;
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let t = epoch_ms();
                if let Ok(mut l) = lines.lock() {
                    *l += 1;
                }
                if let Some(i) = line.split_whitespace().nth(1).and_then(index)
                    && let Ok(mut p) = printed.lock()
                {
                    p.entry(i).or_insert(t);
                }
            }
        });
    }
    tokio::task::block_in_place(|| {
        wait_until(Duration::from_secs(60), "kubectl -w to list", || {
            (*lines.lock().ok()? >= s.servers).then_some(())
        })
    })?;

    // The writes, each started on its own schedule (a slow answer delays no later write).
    let start = tokio::time::Instant::now();
    let period = Duration::from_secs(1) / s.rate.max(1);
    let mut sent = Vec::with_capacity(total);
    let mut writes = tokio::task::JoinSet::new();
    for i in 0..total {
        tokio::time::sleep_until(start + period * i as u32).await;
        let path = format!("{}/srv-{:05}/status", s.servers_path, i % s.servers);
        let body = json!({"status": {"flavor": mark(i)}})
            .to_string()
            .into_bytes();
        sent.push(epoch_ms());
        let admin = admin.clone();
        writes.spawn(async move {
            admin
                .request::<Value>(req("PATCH", &path, "application/merge-patch+json", body)?)
                .await
                .with_context(|| format!("change {i}"))
        });
    }
    let sending = start.elapsed();
    let (mut written, mut failed) = (0usize, Vec::new());
    while let Some(r) = writes.join_next().await {
        match r? {
            Ok(_) => written += 1,
            Err(e) => failed.push(format!("{e:#}")),
        }
    }
    if written == 0 {
        bail!("no change was written: {:?}", failed.first());
    }

    // Until both have seen every written change, or have seen nothing new for 10 s.
    let mut page: HashMap<usize, f64> = HashMap::new();
    let mut last = (0, 0, tokio::time::Instant::now());
    loop {
        // Taken and emptied in one script: the page adds nothing in between.
        let got = tokio::task::block_in_place(|| {
            b.js("const s = window.__stream; window.__stream = []; return s")
        })?;
        for e in got.as_array().context("the page's records")? {
            if let (Some(i), Some(t)) = (e[0].as_str().and_then(index), e[1].as_f64()) {
                page.entry(i).or_insert(t);
            }
        }
        let by_kubectl = printed.lock().map(|p| p.len()).unwrap_or_default();
        if page.len() >= written && by_kubectl >= written {
            break;
        }
        if (page.len(), by_kubectl) != (last.0, last.1) {
            last = (page.len(), by_kubectl, tokio::time::Instant::now());
        } else if last.2.elapsed() > Duration::from_secs(10) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    tokio::task::block_in_place(|| b.js("window.__streamObserver.disconnect(); return true"))?;
    let _ = watch.kill();
    let _ = watch.wait();
    let printed = printed.lock().map(|p| p.clone()).unwrap_or_default();
    let load_after = loadavg();

    let lags = |seen: &HashMap<usize, f64>, from: usize, to: usize| -> Vec<Duration> {
        (from..to.min(total))
            .filter_map(|i| seen.get(&i).map(|t| (t - sent[i]).max(0.0)))
            .map(|l| Duration::from_secs_f64(l / 1000.0))
            .collect()
    };
    println!();
    println!(
        "A stream of changes: {total} status writes at {}/s for {} s (sent in {:.1} s; {written} answered 200, {} failed), one of the {} listed servers after another, while the list is open; each timed from just before its write (load average before {load_before}, after {load_after}):",
        s.rate,
        s.seconds,
        sending.as_secs_f64(),
        failed.len(),
        s.servers
    );
    println!();
    println!("| seen by | changes seen | p50 ms | p99 ms | max ms |");
    println!("|---|---|---|---|---|");
    for (who, seen) in [
        ("dashboard (Flavor cell in the page's DOM)", &page),
        ("kubectl get servers -w (line printed)", &printed),
    ] {
        let all = lags(seen, 0, total);
        let max = all.iter().max().copied().unwrap_or_default();
        println!(
            "| {who} | {} of {written} | {} | {} | {} |",
            seen.len(),
            ms(median(all.clone())),
            ms(p99(all)),
            ms(max)
        );
    }
    // Whether the page falls behind: window by window over the stream, its lag and how much
    // later than kubectl it showed each change (the API server's and etcd's share of the lag,
    // which both see, taken out).
    let window = (s.rate as usize * 5).max(1);
    let after = |from: usize, to: usize| -> Vec<f64> {
        let mut v: Vec<f64> = (from..to.min(total))
            .filter_map(|i| Some(page.get(&i)? - printed.get(&i)?))
            .collect();
        v.sort_by(f64::total_cmp);
        v
    };
    let at = |v: &[f64], q: f64| -> f64 {
        let i = ((v.len() as f64 * q).ceil() as usize).clamp(1, v.len().max(1)) - 1;
        v.get(i).copied().unwrap_or_default()
    };
    println!();
    println!(
        "| changes sent in | dashboard p50 ms | dashboard p99 ms | kubectl -w p50 ms | kubectl -w p99 ms | dashboard after kubectl p50 ms | p99 ms |"
    );
    println!("|---|---|---|---|---|---|---|");
    let mut behind = Vec::new();
    for from in (0..total).step_by(window) {
        let (d, k) = (
            lags(&page, from, from + window),
            lags(&printed, from, from + window),
        );
        let a = after(from, from + window);
        behind.push(at(&a, 0.99));
        println!(
            "| {}–{} s | {} | {} | {} | {} | {:.2} | {:.2} |",
            from / s.rate as usize,
            (from + window).min(total) / s.rate as usize,
            ms(median(d.clone())),
            ms(p99(d)),
            ms(median(k.clone())),
            ms(p99(k)),
            at(&a, 0.5),
            at(&a, 0.99)
        );
    }
    let all_page = lags(&page, 0, total);
    let all_kubectl = lags(&printed, 0, total);
    let all_after = after(0, total);
    let (first, last) = (
        behind.first().copied().unwrap_or_default(),
        behind.last().copied().unwrap_or_default(),
    );
    // Kept up: every written change drawn, and the page's own delay over kubectl at the end
    // of the stream no more than twice (plus a frame or so) what it was at the start.
    let kept_up = page.len() >= written && last <= first.max(0.0) * 2.0 + 100.0;
    println!();
    println!(
        "Rendered / delivered: {} / {} changes; dashboard / kubectl -w: p50 {:.2}×, p99 {:.2}×; the dashboard showed a change p50 {:.2} ms, p99 {:.2} ms after kubectl printed it; the page {} (that p99 in the first 5 s {first:.2} ms, in the last {last:.2} ms)",
        page.len(),
        printed.len(),
        median(all_page.clone()).as_secs_f64()
            / median(all_kubectl.clone()).as_secs_f64().max(1e-9),
        p99(all_page).as_secs_f64() / p99(all_kubectl).as_secs_f64().max(1e-9),
        at(&all_after, 0.5),
        at(&all_after, 0.99),
        if kept_up { "kept up" } else { "fell behind" },
    );
    if let Some(e) = failed.first() {
        println!("First failed write: {e}");
    }
    Ok(())
}

/// The host's load average (1, 5 and 15 minutes).
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}
