//! Sequential write throughput inside a running TCG guest to two volumes of the same size on
//! file pools, side by side in one run: one of the compute node's own pool (attached locally:
//! QEMU opens its file) and one of another node's, attached over NBD with TLS (the storage
//! node's `qemu-nbd` across a veth pair; in the clear with `--nbd-insecure`). Each round the
//! guest writes the same amount to each disk with `dd ... oflag=direct conv=fsync`,
//! alternating which goes first, timed by the guest's own clock (`/proc/uptime`) and, as a
//! cross-check, on the host from the keystroke to the result line on the console.

use std::fs::File;
use std::io::{Read, Write};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use kube::api::Api;
use stratus_agents::compute::volumes::serial;
use stratus_api_types::storage::Volume;
use stratus_e2e::node::Node;
use stratus_e2e::wait_until;

use crate::attach::{Bed, Nbd, Site, WAIT, servers, set_volumes};
use crate::storage::{make, volume};

/// Names and addresses of this benchmark's own (no test and no other benchmark uses them).
const SITE: Site = Site {
    node: "bench-write",
    ns: "bench-write",
    server: "bench-writer",
    storage_node: "bench-write-st",
    storage_ip: "10.251.202.1",
    compute_ip: "10.251.202.2",
    host_link: "bench-wst0",
    node_link: "bench-wcn0",
    table: "stratus_nbd_10_251_202_1",
};
/// What starts the line the guest prints for each write.
const RESULT: &str = "STRATUS-WB";
/// How often the console is looked at.
const POLL: Duration = Duration::from_millis(10);
/// The most MiB one write may be (the volumes are sized to hold it).
pub const MAX_MIB: u64 = 4096;

/// The two volumes: the compute node's own, and the storage node's over NBD.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Side {
    Local = 0,
    Nbd = 1,
}

impl Side {
    /// The Volume's name, and its pool's.
    fn name(self) -> &'static str {
        match self {
            Self::Local => "near",
            Self::Nbd => "far",
        }
    }

    fn remote(self) -> bool {
        self == Self::Nbd
    }
}

/// What the guest reported of one write.
#[derive(Debug, PartialEq)]
struct Written {
    /// The disk written (`vdc`, ...).
    dev: String,
    /// `/proc/uptime` before and after, in seconds (10 ms resolution).
    seconds: f64,
}

/// The shell command that writes `mib` MiB of zeroes sequentially to the disk whose serial
/// is `serial`, bypassing the guest's page cache and flushing at the end, and prints the
/// result line of `tag`. The disk is looked up by its serial (never by letter); `read` is
/// the shell's own, so nothing but `dd` is started between the two clock readings. The
/// echoed command holds `$` where the result line has values, so it is never taken for it.
fn write_command(tag: &str, serial: &str, mib: u64) -> String {
    format!(
        "d=$(grep -lx {serial} /sys/block/vd*/serial); d=${{d#/sys/block/}}; d=${{d%/serial}}; \
         read a _ </proc/uptime; \
         dd if=/dev/zero of=/dev/$d bs=1M count={mib} oflag=direct conv=fsync status=none; \
         s=$?; read b _ </proc/uptime; echo {RESULT} tag={tag} dev=$d rc=$s t0=$a t1=$b"
    )
}

/// The result line of `tag` in `console`, once the guest printed it whole: `None` while it
/// has not, an error if the write failed (or found no disk).
fn parse_result(console: &str, tag: &str) -> Option<Result<Written>> {
    let prefix = format!("{RESULT} tag={tag} ");
    // Whole lines only: the console may end mid-line.
    let done = &console[..console.rfind('\n')? + 1];
    done.lines().find_map(|line| {
        let rest = &line[line.find(&prefix)? + prefix.len()..];
        // The echoed command, or a piece of it (the shell's line editor may wrap it).
        if line.contains('$') {
            return None;
        }
        let field = |key: &str| {
            rest.split_whitespace()
                .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
        };
        let (dev, rc, t0, t1) = (field("dev")?, field("rc")?, field("t0")?, field("t1")?);
        Some(written(dev, rc, t0, t1).with_context(|| format!("the guest printed {line:?}")))
    })
}

fn written(dev: &str, rc: &str, t0: &str, t1: &str) -> Result<Written> {
    ensure!(rc == "0", "dd exited with {rc}");
    ensure!(
        dev.len() > 2 && dev.starts_with("vd") && dev[2..].bytes().all(|b| b.is_ascii_lowercase()),
        "no disk of that serial"
    );
    let (t0, t1): (f64, f64) = (t0.parse()?, t1.parse()?);
    ensure!(t1 >= t0, "the clock went back");
    Ok(Written {
        dev: dev.to_string(),
        seconds: t1 - t0,
    })
}

/// The `<disk>` element of the domain XML `xml` whose serial is `serial`.
fn disk_of<'a>(xml: &'a str, serial: &str) -> Option<&'a str> {
    let tag = format!("<serial>{serial}</serial>");
    xml.split("<disk ")
        .skip(1)
        .map(|d| d.split("</disk>").next().unwrap_or(d))
        .find(|d| d.contains(&tag))
}

/// The guest's shell on its serial console, held open for the whole run: what QEMU writes to
/// the terminal is read (and kept) all along, so that the guest never waits on it.
struct Shell {
    pty: File,
    seen: Arc<Mutex<String>>,
}

impl Shell {
    /// Opens the console of `node`'s domain `domain` once the shell of its guest (server
    /// `uid`) is up.
    fn open(node: &Node, uid: &str, domain: &str) -> Result<Self> {
        wait_until(WAIT, "the guest's shell", || {
            node.console(uid).contains("built-in shell").then_some(())
        })
        .with_context(|| format!("console:\n{}", node.console(uid)))?;
        let pty = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(node.console_pty(domain)?)?;
        let mut reader = pty.try_clone()?;
        let seen = Arc::new(Mutex::new(String::new()));
        let sink = seen.clone();
        // Ends when the terminal hangs up (the domain is destroyed).
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = reader.read(&mut buf) {
                if n == 0 {
                    break;
                }
                let text = String::from_utf8_lossy(&buf[..n]).replace('\r', "");
                if let Ok(mut s) = sink.lock() {
                    s.push_str(&text);
                }
            }
        });
        Ok(Self { pty, seen })
    }

    /// Types `command` once and waits up to `timeout` for `found` to find its answer in what
    /// the console shows after it: the answer, and the time from the keystroke to it.
    async fn run<T>(
        &mut self,
        command: &str,
        timeout: Duration,
        found: impl Fn(&str) -> Option<T>,
    ) -> Result<(T, Duration)> {
        let from = self.text().len();
        self.pty.write_all(format!("\n{command}\n").as_bytes())?;
        let t = Instant::now();
        loop {
            if let Some(v) = found(&self.text()[from..]) {
                return Ok((v, t.elapsed()));
            }
            if t.elapsed() > timeout {
                bail!(
                    "no answer within {timeout:?} to {command:?}; console:\n{}",
                    &self.text()[from..]
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    fn text(&self) -> String {
        self.seen.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

/// MiB/s of `mib` MiB in `seconds` (at least the clock's 10 ms).
fn rate(mib: u64, seconds: f64) -> f64 {
    mib as f64 / seconds.max(0.01)
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or_default()
}

fn row(label: &str, v: &[f64]) {
    let min = v.iter().copied().fold(f64::INFINITY, f64::min);
    let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    println!("| {label} | {:.2} | {min:.2} | {max:.2} |", median(v));
}

/// `stratus-bench storage-write [--nbd-insecure]`: `rounds` rounds (after one warm-up) of
/// `mib` MiB written by the guest to each of its two volumes, alternating which goes first;
/// the NBD volume over TLS, or (`insecure`) in the clear.
pub async fn bench(mib: u64, rounds: u64, insecure: bool) -> Result<()> {
    let bed = Bed::up(&SITE, if insecure { Nbd::Insecure } else { Nbd::Tls }, true)?;
    let (node, uid, domain) = (&bed.node, &bed.uid, bed.domain());
    let mut agents = Vec::new();
    for side in [Side::Local, Side::Nbd] {
        let pool = bed.pool_dir(side.remote()).join("pool");
        std::fs::create_dir_all(&pool)?;
        let arg = format!("{}=file:{}", side.name(), pool.display());
        agents.push(bed.storage_agent(side.remote(), &arg)?);
    }
    for side in [Side::Local, Side::Nbd] {
        wait_until(WAIT, &format!("storage pool {}", side.name()), || {
            bed.cloud
                .kubectl_ok(&["get", "storagepool", side.name()])
                .ok()
        })?;
    }
    let client = bed.cloud.client().await?;
    let vols: Api<Volume> = Api::namespaced(client.clone(), SITE.ns);
    let gib = mib.div_ceil(1024);
    // Each volume's serial, which its disk has in the guest; by side.
    let mut serials = [String::new(), String::new()];
    for side in [Side::Local, Side::Nbd] {
        let mut v = volume(side.name(), gib, None)?;
        v.spec.storage_pool = Some(side.name().to_string());
        make(&vols, &v).await?;
        let made = vols.get(side.name()).await?;
        serials[side as usize] = serial(&made.metadata.uid.unwrap_or_default());
    }
    set_volumes(
        &servers(&client, SITE.ns),
        SITE.server,
        &[Side::Local.name(), Side::Nbd.name()],
    )
    .await?;

    // Both disks in the guest (typed again until it answers: the first keystrokes may come
    // before QEMU reads the terminal).
    let mut shell = Shell::open(node, uid, &domain)?;
    let [near, far] = &serials;
    let t = Instant::now();
    loop {
        let seen = shell
            .run(
                // (A serial's file has no newline: each is grepped on its own.)
                &format!(
                    "echo WB-DISKS-$(grep -lx -e {near} -e {far} /sys/block/vd*/serial | wc -l)"
                ),
                Duration::from_secs(5),
                |s| s.contains("WB-DISKS-2").then_some(()),
            )
            .await;
        if seen.is_ok() {
            break;
        }
        ensure!(
            t.elapsed() < WAIT,
            "the guest has not both disks after {WAIT:?}; its console:\n{}",
            node.console(uid)
        );
    }
    // Attached as the benchmark says: a file, and the storage node's export (over TLS unless
    // told otherwise).
    let xml = String::from_utf8_lossy(&node.virsh(&["dumpxml", &domain])?.stdout).into_owned();
    let local = disk_of(&xml, near).context("no disk of the local volume")?;
    ensure!(local.starts_with("type='file'"), "local disk: {local}");
    let nbd = disk_of(&xml, far).context("no disk of the NBD volume")?;
    ensure!(
        nbd.starts_with("type='network'")
            && nbd.contains("protocol='nbd'")
            && nbd.contains("tls='yes'") != insecure
            && nbd.contains(&format!("<host name='{}'", SITE.storage_ip)),
        "NBD disk: {nbd}"
    );

    // A write of `mib` takes seconds at most here; the bound is for a starved machine.
    let timeout = WAIT + Duration::from_secs(mib);
    let (mut guest_clock, mut host_clock) = ([vec![], vec![]], [vec![], vec![]]);
    let mut ratios = Vec::new();
    // Round 0 is a warm-up (the first write of each volume's blocks): not counted.
    for r in 0..=rounds {
        let order = if r % 2 == 0 {
            [Side::Local, Side::Nbd]
        } else {
            [Side::Nbd, Side::Local]
        };
        let mut this = [0.0; 2];
        for side in order {
            let tag = format!("r{r}-{}", side.name());
            let command = write_command(&tag, &serials[side as usize], mib);
            let (written, host) = shell
                .run(&command, timeout, |s| parse_result(s, &tag))
                .await?;
            let written = written.with_context(|| format!("round {r}, {side:?}"))?;
            let i = side as usize;
            this[i] = rate(mib, written.seconds);
            if r > 0 {
                guest_clock[i].push(this[i]);
                host_clock[i].push(rate(mib, host.as_secs_f64()));
            }
            eprintln!(
                "round {r} {side:?} ({}): {:.2} MiB/s, host-side {:.2}",
                written.dev,
                this[i],
                rate(mib, host.as_secs_f64())
            );
        }
        if r > 0 {
            ratios.push(this[1] / this[0]);
        }
    }

    println!(
        "| {mib} MiB written sequentially by the guest to a {gib} GiB file-pool volume (`dd bs=1M oflag=direct conv=fsync`), {rounds} rounds, alternating, MiB/s | median | min | max |"
    );
    println!("|---|---|---|---|");
    row(
        "local: the compute node's own volume (QEMU opens the file)",
        &guest_clock[0],
    );
    let nbd = format!(
        "NBD: the storage node's volume (`qemu-nbd`, {}, over a veth pair)",
        if insecure { "in the clear" } else { "TLS" }
    );
    row(&nbd, &guest_clock[1]);
    row("NBD / local, each round", &ratios);
    row(
        "local, timed on the host (keystroke → result line)",
        &host_clock[0],
    );
    row("NBD, timed on the host", &host_clock[1]);
    println!();
    println!(
        "NBD/local: {:.2} (medians, guest clock); {:.2} (host-side).",
        median(&guest_clock[1]) / median(&guest_clock[0]).max(1e-9),
        median(&host_clock[1]) / median(&host_clock[0]).max(1e-9),
    );
    drop(shell);
    servers(&client, SITE.ns)
        .delete(SITE.server, &Default::default())
        .await?;
    // The agents stop before the cloud and the nodes go.
    drop(agents);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_result_line_gives_the_disk_and_the_seconds() {
        let console = "~ # d=$(grep ...); echo STRATUS-WB tag=r1-far dev=$d rc=$s t0=$a t1=$b\n\
                       STRATUS-WB tag=r1-far dev=vdd rc=0 t0=123.45 t1=125.70\n~ # ";
        let w = parse_result(console, "r1-far")
            .expect("a result line")
            .expect("a write");
        assert_eq!(w.dev, "vdd");
        assert!((w.seconds - 2.25).abs() < 1e-9, "{}", w.seconds);
        assert!((rate(64, w.seconds) - 28.444).abs() < 1e-3);
    }

    #[test]
    fn the_echoed_command_and_other_tags_are_not_results() {
        let echoed = write_command("r1-far", "0123456789abcdef0123", 64);
        assert!(parse_result(&format!("~ # {echoed}\n"), "r1-far").is_none());
        // Wrapped by the line editor: no piece of it is a result either.
        let wrapped: String = echoed
            .as_bytes()
            .chunks(80)
            .map(|c| format!("{}\n", String::from_utf8_lossy(c)))
            .collect();
        assert!(parse_result(&wrapped, "r1-far").is_none(), "{wrapped}");
        let other = "STRATUS-WB tag=r1-near dev=vdc rc=0 t0=1.00 t1=2.00\n";
        assert!(parse_result(other, "r1-far").is_none());
        // r1 is not r11.
        let longer = "STRATUS-WB tag=r11-far dev=vdc rc=0 t0=1.00 t1=2.00\n";
        assert!(parse_result(longer, "r1-far").is_none());
    }

    #[test]
    fn a_line_not_yet_whole_is_waited_for() {
        let partial = "STRATUS-WB tag=r2-near dev=vdc rc=0 t0=10.00 t1=1";
        assert!(parse_result(partial, "r2-near").is_none());
        let whole = format!("{partial}1.50\n");
        let w = parse_result(&whole, "r2-near")
            .expect("a result line")
            .expect("a write");
        assert!((w.seconds - 1.5).abs() < 1e-9);
    }

    #[test]
    fn a_failed_write_or_a_missing_disk_is_an_error() {
        let failed = "STRATUS-WB tag=r0-far dev=vdd rc=1 t0=1.00 t1=2.00\n";
        let e = parse_result(failed, "r0-far")
            .expect("a result line")
            .expect_err("an error");
        assert!(format!("{e:#}").contains("dd exited with 1"), "{e:#}");
        let missing = "STRATUS-WB tag=r0-far dev= rc=0 t0=1.00 t1=2.00\n";
        let e = parse_result(missing, "r0-far")
            .expect("a result line")
            .expect_err("an error");
        assert!(format!("{e:#}").contains("no disk"), "{e:#}");
        let garbled = "STRATUS-WB tag=r0-far dev=vdc rc=0 t0=x t1=2.00\n";
        assert!(
            parse_result(garbled, "r0-far")
                .expect("a result line")
                .is_err()
        );
        let back = "STRATUS-WB tag=r0-far dev=vdc rc=0 t0=3.00 t1=2.00\n";
        assert!(
            parse_result(back, "r0-far")
                .expect("a result line")
                .is_err()
        );
    }

    #[test]
    fn the_disk_of_a_serial_is_found_in_the_domain_xml() {
        let xml = "<domain><devices>\
            <disk type='file' device='disk'><source file='/p/root'/><target dev='vda'/></disk>\
            <disk type='file' device='disk'><source file='/p/near'/><serial>aaa</serial></disk>\
            <disk type='network' device='disk'><source protocol='nbd' tls='yes'/><serial>bbb</serial></disk>\
            </devices></domain>";
        assert!(disk_of(xml, "aaa").expect("a disk").contains("/p/near"));
        let far = disk_of(xml, "bbb").expect("a disk");
        assert!(far.starts_with("type='network'") && far.contains("tls='yes'"));
        assert!(disk_of(xml, "ccc").is_none());
        assert!(disk_of(xml, "aa").is_none());
    }
}
