//! An unpaged LIST of many Flavors through the API vs raw etcd range reads of the same keys,
//! paged as the API server pages them: time, and how much this process's resident memory
//! grows during one LIST (the API server runs in it). And a label-selected LIST of 1% of the
//! Flavors (answered by the watch cache) vs the unselected first page and raw etcd reads.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use etcd_client::{Compare, CompareOp, GetOptions, Txn, TxnOp};
use futures::StreamExt;
use http_body_util::BodyExt;
use serde_json::Value;

use crate::{FLAVORS, Stack, flavor_key, ms, stored_flavor};

/// Keys per etcd range: the API server's page.
const PAGE: i64 = 1000;
/// Puts per transaction when filling etcd (etcd allows 128 operations in one).
const BATCH: usize = 100;

fn name(i: usize) -> String {
    format!("list-{i:06}")
}

/// A field of /proc/self/status, in KiB.
fn status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Measures the peak of resident memory over `f` above what was resident when it began
/// (`clear_refs` 5 resets the kernel's high-water mark to the current RSS).
async fn peak_growth<T>(f: impl std::future::Future<Output = Result<T>>) -> Result<(T, f64)> {
    std::fs::write("/proc/self/clear_refs", "5").context("reset VmHWM")?;
    let base = status_kib("VmRSS:");
    let out = f.await?;
    let peak = status_kib("VmHWM:");
    Ok((out, peak.saturating_sub(base) as f64 / 1024.0))
}

/// Writes Flavors `list-{from}`… up to `to` (excluded): the template with its name and uid
/// changed (and the label `share` that `label` gives it, if any), 8 transactions at a time.
async fn fill(
    etcd: &etcd_client::Client,
    template: &Value,
    from: usize,
    to: usize,
    label: fn(usize) -> Option<&'static str>,
) -> Result<()> {
    let batches: Vec<(usize, usize)> = (from..to)
        .step_by(BATCH)
        .map(|a| (a, (a + BATCH).min(to)))
        .collect();
    let results: Vec<Result<()>> = futures::stream::iter(batches)
        .map(|(a, b)| {
            let mut kv = etcd.kv_client();
            async move {
                let mut when = Vec::new();
                let mut then = Vec::new();
                for i in a..b {
                    let mut v = template.clone();
                    v["metadata"]["name"] = name(i).into();
                    v["metadata"]["uid"] = format!("00000000-0000-4000-8000-{i:012}").into();
                    if let Some(share) = label(i) {
                        v["metadata"]["labels"] = serde_json::json!({ "share": share });
                    }
                    let key = flavor_key(&name(i));
                    when.push(Compare::create_revision(key.clone(), CompareOp::Equal, 0));
                    then.push(TxnOp::put(key, serde_json::to_vec(&v)?, None));
                }
                let resp = kv.txn(Txn::new().when(when).and_then(then)).await?;
                ensure!(resp.succeeded(), "a Flavor of {a}..{b} exists already");
                Ok(())
            }
        })
        .buffer_unordered(8)
        .collect()
        .await;
    results.into_iter().collect()
}

/// Every Flavor's key and value in pages of [`PAGE`] keys at the first page's revision, as
/// the API server reads them: (keys, value bytes).
async fn raw_list(kv: &mut etcd_client::KvClient) -> Result<(usize, usize)> {
    let prefix = flavor_key("");
    let mut end = prefix.clone().into_bytes();
    if let Some(last) = end.last_mut() {
        *last += 1;
    }
    let mut start = prefix.into_bytes();
    let mut revision = 0;
    let (mut keys, mut bytes) = (0, 0);
    loop {
        let mut opts = GetOptions::new().with_range(end.clone()).with_limit(PAGE);
        if revision > 0 {
            opts = opts.with_revision(revision);
        }
        let resp = kv.get(start.clone(), Some(opts)).await?;
        if revision == 0 {
            revision = resp.header().map_or(0, |h| h.revision());
        }
        keys += resp.kvs().len();
        bytes += resp.kvs().iter().map(|kv| kv.value().len()).sum::<usize>();
        match resp.kvs().last() {
            Some(last) if resp.more() => {
                start = last.key().to_vec();
                start.push(0);
            }
            _ => return Ok((keys, bytes)),
        }
    }
}

/// The unpaged LIST through the API, read as it arrives (never held whole by the client):
/// (items, body bytes).
async fn api_list(s: &Stack) -> Result<(usize, usize)> {
    const ITEM: &[u8] = br#""kind":"Flavor""#;
    let mut body = s.h2.stream(FLAVORS).await?;
    let (mut items, mut bytes) = (0, 0);
    // The end of the previous frame, so that a marker split between frames is counted.
    let mut carry: Vec<u8> = Vec::new();
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame?.into_data() else {
            continue;
        };
        bytes += data.len();
        carry.extend_from_slice(&data);
        items += carry.windows(ITEM.len()).filter(|w| *w == ITEM).count();
        let keep = carry.len().min(ITEM.len() - 1);
        carry.drain(..carry.len() - keep);
    }
    Ok((items, bytes))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or_default()
}

/// Unpaged LISTs of each of `sizes` Flavors, `rounds` times each way, alternating which
/// goes first.
pub async fn bench(sizes: &[usize], rounds: usize) -> Result<()> {
    let s = crate::stack().await?;
    let etcd = etcd_client::Client::connect([s.etcd.endpoint.as_str()], None).await?;
    let mut kv = etcd.kv_client().max_decoding_message_size(512 << 20);
    let template = stored_flavor(&s, &etcd, &name(0)).await?;
    let mut stored = 1;
    println!(
        "| Flavors | raw etcd ranges ms | API LIST ms | API / raw | body MiB | RSS growth, raw MiB | RSS growth, API MiB | RSS growth, first API LIST MiB |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for &n in sizes {
        let started = Instant::now();
        fill(&etcd, &template, stored, n, |_| None).await?;
        stored = stored.max(n);
        eprintln!("{n} Flavors in etcd ({:?} to write)", started.elapsed());
        // One of each first: connections warm. The API's is reported apart, as the growth of
        // a first LIST of this size (the allocator then holds what later ones reuse).
        raw_list(&mut kv).await?;
        let (_, first_growth) = peak_growth(api_list(&s)).await?;
        let (mut raw_t, mut api_t, mut raw_m, mut api_m) = (vec![], vec![], vec![], vec![]);
        let mut body_bytes = 0;
        for round in 0..rounds {
            for api_first in [round % 2 == 1, round % 2 == 0] {
                if api_first {
                    let t = Instant::now();
                    let ((items, bytes), grew) = peak_growth(api_list(&s)).await?;
                    api_t.push(t.elapsed().as_secs_f64());
                    api_m.push(grew);
                    body_bytes = bytes;
                    ensure!(items == n, "the API listed {items} Flavors of {n}");
                } else {
                    let t = Instant::now();
                    let ((keys, _), grew) = peak_growth(raw_list(&mut kv)).await?;
                    raw_t.push(t.elapsed().as_secs_f64());
                    raw_m.push(grew);
                    ensure!(keys == n, "etcd read {keys} Flavors of {n}");
                }
            }
        }
        let (raw, api) = (median(raw_t), median(api_t));
        println!(
            "| {n} | {} | {} | {:.2}× | {:.1} | {:.1} | {:.1} | {first_growth:.1} |",
            ms(Duration::from_secs_f64(raw)),
            ms(Duration::from_secs_f64(api)),
            api / raw,
            body_bytes as f64 / (1024.0 * 1024.0),
            median(raw_m),
            median(api_m),
        );
    }
    Ok(())
}

/// Which Flavors the selected LIST picks: one in a hundred.
fn one_in_100(i: usize) -> Option<&'static str> {
    Some(if i % 100 == 1 { "one" } else { "rest" })
}

/// A `GET` through the HTTP/2 client: the whole body.
async fn get(s: &Stack, path: &str) -> Result<bytes::Bytes> {
    s.h2.send(http::Method::GET, path, Vec::new()).await
}

/// The items of a list body.
fn items(body: &[u8]) -> Result<usize> {
    let v: Value = serde_json::from_slice(body)?;
    Ok(v["items"].as_array().map_or(0, Vec::len))
}

/// One way of reading, timed: a label with what it reads, and what it should return.
struct Way {
    label: &'static str,
    times: Vec<f64>,
}

/// A label-selected LIST matching 1% of `n` Flavors, answered by the watch cache, vs the
/// unselected first page (`limit=500`, read from etcd) and raw etcd reads of the same keys,
/// each `rounds` times in rotated order.
pub async fn selected(n: usize, rounds: usize) -> Result<()> {
    let s = crate::stack().await?;
    let etcd = etcd_client::Client::connect([s.etcd.endpoint.as_str()], None).await?;
    let mut kv = etcd.kv_client().max_decoding_message_size(512 << 20);
    let template = stored_flavor(&s, &etcd, &name(0)).await?;
    let started = Instant::now();
    fill(&etcd, &template, 1, n, one_in_100).await?;
    let want = (1..n).filter(|i| i % 100 == 1).count();
    eprintln!(
        "{n} Flavors in etcd ({:?} to write), {want} labelled share=one",
        started.elapsed()
    );
    let selected = format!("{FLAVORS}?labelSelector=share%3Done");
    let selected_page = format!("{FLAVORS}?limit=500&labelSelector=share%3Done");
    let unselected_page = format!("{FLAVORS}?limit=500");

    // The first selected LIST builds the cache of Flavors (read from etcd at one revision).
    let rss_before = status_kib("VmRSS:");
    let t = Instant::now();
    let (body, grew) = peak_growth(get(&s, &selected)).await?;
    let first = t.elapsed();
    ensure!(items(&body)? == want, "the first selected LIST");
    drop(body);
    // Settled: what the cache holds stays.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let held = status_kib("VmRSS:").saturating_sub(rss_before);

    let mut ways = [
        Way {
            label: "API: labelSelector, unpaged (watch cache)",
            times: vec![],
        },
        Way {
            label: "API: labelSelector, limit=500 (watch cache)",
            times: vec![],
        },
        Way {
            label: "API: unselected page, limit=500 (etcd)",
            times: vec![],
        },
        Way {
            label: "raw etcd: the first 500 keys",
            times: vec![],
        },
        Way {
            label: "raw etcd: every key (what a selection read before the cache)",
            times: vec![],
        },
    ];
    let prefix = flavor_key("");
    let mut end = prefix.clone().into_bytes();
    if let Some(last) = end.last_mut() {
        *last += 1;
    }
    for round in 0..rounds {
        for k in 0..ways.len() {
            let which = (k + round) % ways.len();
            let t = Instant::now();
            match which {
                0 => {
                    let b = get(&s, &selected).await?;
                    ways[which].times.push(t.elapsed().as_secs_f64());
                    ensure!(items(&b)? == want, "selected LIST");
                }
                1 => {
                    let b = get(&s, &selected_page).await?;
                    ways[which].times.push(t.elapsed().as_secs_f64());
                    ensure!(items(&b)? == want.min(500), "selected page");
                }
                2 => {
                    let b = get(&s, &unselected_page).await?;
                    ways[which].times.push(t.elapsed().as_secs_f64());
                    ensure!(items(&b)? == 500, "unselected page");
                }
                3 => {
                    let opts = GetOptions::new().with_range(end.clone()).with_limit(500);
                    let r = kv.get(prefix.clone(), Some(opts)).await?;
                    ways[which].times.push(t.elapsed().as_secs_f64());
                    ensure!(r.kvs().len() == 500, "raw page");
                }
                _ => {
                    let (keys, _) = raw_list(&mut kv).await?;
                    ways[which].times.push(t.elapsed().as_secs_f64());
                    ensure!(keys == n, "raw scan");
                }
            }
        }
    }
    println!("| {n} Flavors, {want} selected | median ms | p.s. |");
    println!("|---|---|---|");
    println!(
        "| API: the first labelSelector LIST (builds the watch cache) | {} | once |",
        ms(first)
    );
    for w in ways {
        let times = w.times.clone();
        let max = times.iter().copied().fold(0.0, f64::max);
        println!(
            "| {} | {} | max {} |",
            w.label,
            ms(Duration::from_secs_f64(median(times))),
            ms(Duration::from_secs_f64(max)),
        );
    }
    println!(
        "\nRSS growth that stays once the cache is built: {:.1} MiB (peak during the first selected LIST: {grew:.1} MiB)",
        held as f64 / 1024.0
    );
    Ok(())
}
