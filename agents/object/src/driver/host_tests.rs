//! The real supervisor running Debian's Swift servers (scripts/setup.sh installs
//! swift-account, swift-container and swift-object) from the generated configuration, on an
//! address of the test's own (127.0.77.1) with a directory device: each answers its
//! healthcheck, the object server stores an object on the device under the hash of the node's
//! own swift.conf (the host's left as it was), a background daemon runs niced while the
//! servers do not, a stopped server no longer
//! answers, a process that exits is seen exited, and dropping the supervisor stops the rest.

use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use stratus_api_types::object::RingType;

use super::process::Processes;
use super::{ProcessSpec, Supervisor};
use crate::agent::{self, Config, process_spec};
use crate::config::{DAEMON_NICE, DeviceName, NodeConfig, Ports};
use crate::plan::Seen;

const IP: Ipv4Addr = Ipv4Addr::new(127, 0, 77, 1);
/// Generous: Swift's Python starts slowly on a loaded machine.
const WAIT: Duration = Duration::from_secs(120);

/// One HTTP/1.0 request; the status code and body.
fn http(port: u16, request: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&(IP, port).into(), Duration::from_secs(5)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
    s.write_all(request.as_bytes()).ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let code = out.split_whitespace().nth(1)?.parse().ok()?;
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_owned())?;
    Some((code, body))
}

fn healthy(port: u16) -> bool {
    http(port, "GET /healthcheck HTTP/1.0\r\n\r\n").is_some_and(|(c, b)| c == 200 && b == "OK")
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + WAIT;
    while Instant::now() < end {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    panic!("timed out waiting for {what}");
}

fn files_under(dir: &Path, suffix: &str) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(files_under(&p, suffix));
        } else if p.to_string_lossy().ends_with(suffix) {
            out.push(p);
        }
    }
    out
}

/// The nice values of the processes running `/usr/bin/{program}` on a configuration under
/// `state` (None when there is none).
fn nices(program: &str, state: &str) -> Option<Vec<i32>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if !cmdline.contains(&format!("/usr/bin/{program} ")) || !cmdline.contains(state) {
            continue;
        }
        let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
        // After "(comm)": state is the first field, nice the seventeenth.
        // A process gone since its command line was read is skipped.
        let nice = stat
            .rsplit(')')
            .next()
            .and_then(|f| f.split_whitespace().nth(16));
        if let Some(n) = nice.and_then(|n| n.parse().ok()) {
            out.push(n);
        }
    }
    (!out.is_empty()).then_some(out)
}

#[test]
fn swift_servers_run_store_an_object_and_stop_under_the_real_supervisor() {
    let dir = tempfile::tempdir().expect("tempdir");
    let devices = dir.path().join("devices");
    std::fs::create_dir_all(devices.join("d1")).expect("device");
    let ports = Ports {
        account: 16_302,
        container: 16_301,
        object: 16_300,
    };
    let config = Config {
        node: NodeConfig {
            node: "host-test".into(),
            ip: IP,
            ports,
            devices_dir: devices.clone(),
            devices: vec![DeviceName::new("d1").expect("name")],
            mount_check: false,
            state_dir: dir.path().join("state"),
            replication_interval: 30,
            user: "root".into(),
            hash_file: dir.path().join("swift-hash"),
        },
        heartbeat: Duration::from_secs(5),
        tick: Duration::from_secs(1),
        python: "/usr/bin/python3".into(),
        bin_dir: "/usr/bin".into(),
        restart_delay: (Duration::from_secs(1), Duration::from_secs(30)),
        proxies: Vec::new(),
    };
    // The cluster's hash, as an operator provides it (0600).
    let (prefix, suffix) = ("host-test-prefix-0123456789", "host-test-suffix-0123456789");
    std::fs::write(
        &config.node.hash_file,
        format!(
            "[swift-hash]\nswift_hash_path_prefix = {prefix}\nswift_hash_path_suffix = {suffix}\n"
        ),
    )
    .expect("hash file");
    std::fs::set_permissions(
        &config.node.hash_file,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .expect("chmod");
    let host_conf = std::fs::read(crate::hash::SWIFT_CONF).expect("Debian's swift.conf");
    agent::prepare(&config.node).expect("prepare");
    let sup = Processes::new();
    for kind in ["account", "container", "object"] {
        sup.start(&process_spec(&config, &format!("swift-{kind}-server")))
            .expect("start");
    }
    for kind in [RingType::Account, RingType::Container, RingType::Object] {
        let port = ports.of(kind);
        wait_for(
            &format!("the {kind:?} server's healthcheck on {port}"),
            || healthy(port),
        );
    }
    // A background daemon runs niced, as its section asks; the servers at the normal
    // priority.
    sup.start(&process_spec(&config, "swift-object-auditor"))
        .expect("start the auditor");
    let state = config.node.state_dir.display().to_string();
    wait_for("the object auditor to lower its priority", || {
        nices("swift-object-auditor", &state).is_some_and(|n| n.iter().all(|n| *n == DAEMON_NICE))
    });
    assert_eq!(nices("swift-object-server", &state), Some(vec![0]));
    sup.stop("swift-object-auditor").expect("stop the auditor");

    // Starting a running server again leaves it as it is.
    sup.start(&process_spec(&config, "swift-object-server"))
        .expect("start again");
    assert_eq!(
        sup.observe()
            .values()
            .filter(|s| **s == Seen::Running)
            .count(),
        3
    );

    // An object written to the object server lands on the device.
    let put = "PUT /d1/0/AUTH_t/c/o HTTP/1.0\r\nX-Timestamp: 1800000000.00000\r\n\
               Content-Type: text/plain\r\nContent-Length: 5\r\n\r\nhello";
    let (code, _) = http(ports.object, put).expect("PUT");
    assert_eq!(code, 201);
    let data = files_under(&devices.join("d1").join("objects"), ".data");
    assert_eq!(data.len(), 1, "{data:?}");
    // Its directory is named by Swift's hash of its path salted with the node's prefix and
    // suffix (md5 of PREFIX/AUTH_t/c/oSUFFIX), not with the host's swift.conf, which is as
    // it was.
    let md5 = std::process::Command::new("/usr/bin/python3")
        .args([
            "-c",
            "import hashlib, sys; print(hashlib.md5(sys.argv[1].encode()).hexdigest())",
            &format!("{prefix}/AUTH_t/c/o{suffix}"),
        ])
        .output()
        .expect("python3");
    let want = String::from_utf8_lossy(&md5.stdout).trim().to_owned();
    let dir_name = data[0]
        .parent()
        .and_then(Path::file_name)
        .map(|n| n.to_string_lossy().into_owned());
    assert_eq!(dir_name.as_deref(), Some(want.as_str()), "{data:?}");
    assert_eq!(
        std::fs::read(crate::hash::SWIFT_CONF).expect("read"),
        host_conf
    );
    assert_eq!(std::fs::read(&data[0]).expect("read"), b"hello");
    let (code, body) = http(ports.object, "GET /d1/0/AUTH_t/c/o HTTP/1.0\r\n\r\n").expect("GET");
    assert_eq!((code, body.as_str()), (200, "hello"));

    // A stopped server is gone and forgotten.
    sup.stop("swift-object-server").expect("stop");
    assert!(!healthy(ports.object));
    assert!(!sup.observe().contains_key("swift-object-server"));

    // A process that exits is seen exited, with its status.
    sup.start(&ProcessSpec {
        name: "false".into(),
        program: "/bin/false".into(),
        args: vec![],
        log: dir.path().join("false.log"),
        swift_conf: None,
    })
    .expect("start false");
    wait_for(
        "false to exit",
        || matches!(sup.observe().get("false"), Some(Seen::Exited(how)) if how.contains("exit status: 1")),
    );

    // Dropped, the supervisor stops what runs.
    drop(sup);
    assert!(!healthy(ports.account));
    assert!(!healthy(ports.container));
}
