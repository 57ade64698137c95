//! An etcd of a test's own (the `etcd` binary must be installed), its data in a temporary
//! directory, ended and removed with the test.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use stratus_apiserver::storage::store::Store;

use crate::fixtures::{Cloud, Obj};

/// A running etcd; killed, and its data removed, when dropped.
pub struct Etcd {
    child: Child,
    _dir: tempfile::TempDir,
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A port the kernel just gave and took back.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// Starts an etcd and connects to it (waiting up to 40 s for it to answer, generous on a
/// loaded machine).
pub async fn start() -> (Etcd, Store) {
    let dir = tempfile::tempdir().expect("temp dir");
    let endpoint = format!("http://127.0.0.1:{}", free_port());
    let peer = format!("http://127.0.0.1:{}", free_port());
    let child = Command::new("etcd")
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .args(["--listen-client-urls", &endpoint])
        .args(["--advertise-client-urls", &endpoint])
        .args(["--listen-peer-urls", &peer])
        .args(["--initial-advertise-peer-urls", &peer])
        .args(["--initial-cluster", &format!("default={peer}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start etcd (is it installed?)");
    let etcd = Etcd { child, _dir: dir };
    for _ in 0..400 {
        if let Ok(s) = Store::connect(std::slice::from_ref(&endpoint)).await
            && s.revision().await.is_ok()
        {
            return (etcd, s);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("etcd did not answer within 40 s");
}

/// A cloud with project `demo` and flavor `small`, as [`Cloud::with_demo`], over an etcd of
/// its own, which goes when the guard answered with it is dropped.
pub async fn cloud() -> (Etcd, Cloud) {
    let (etcd, store) = start().await;
    let c = Cloud::over(store).await;
    c.create(&Obj::project("demo")).await.expect("project demo");
    c.create(&Obj::flavor("small", 1, 512))
        .await
        .expect("flavor small");
    (etcd, c)
}
