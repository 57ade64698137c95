//! An image uploaded through Stratus boots a server from the object store: with
//! `stratus up --object-store` and a simulated compute node, a member of a project makes an
//! Image with `source.upload`, sends the test guest's disk to `PUT images/NAME/data` with their
//! own token, and the Image goes Active with the checksum and size of the bytes sent. A Server
//! made from it boots (its console shows the guest's marker): the node fetched the disk through
//! `GET images/NAME/data`, the only place it is kept. The uploader reads the same bytes back;
//! a member of another project is refused them (403).
//!
//! `stratus image upload` makes an Image and streams a file to it; the object store holds the
//! bytes until the Image is deleted, and not after. A download whose client reads too slowly
//! is cut off, and holds the only transfer place only until then.

use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::Value;
use stratus_e2e::node::{Guest, Node};
use stratus_e2e::{Cloud, output_of, wait_until};

use super::up::{ObjectStoreAllowList, object_store_up_with};

/// Generous: TCG guests, Swift and the controllers share two cores with every other test.
const T: Duration = Duration::from_secs(300);

/// curl against the API server with `token` as a bearer token; the HTTP status it got.
fn curl(cloud: &Cloud, token: &str, args: &[&str]) -> Result<String> {
    let out = output_of(
        Command::new("curl")
            .args(["-sS", "-w", "%{http_code}", "--cacert"])
            .arg(cloud.dir.path().join("pki/ca.crt"))
            .args(["-H", &format!("Authorization: Bearer {token}")])
            .args(args),
        "curl",
    )?;
    Ok(String::from_utf8_lossy(&out).to_string())
}

fn get_json(cloud: &Cloud, ns: &str, kind: &str, name: &str) -> Option<Value> {
    let out = cloud
        .kubectl_ok(&["-n", ns, "get", kind, name, "-o", "json"])
        .ok()?;
    serde_json::from_str(&out).ok()
}

#[test]
fn an_image_uploaded_through_stratus_boots_a_server_from_the_object_store() -> Result<()> {
    let guest = Guest::serve()?;
    let mut node = Node::start("node-up")?;
    // An address of this test's own (the store's servers and rsync listen on fixed ports).
    let allow_list = ObjectStoreAllowList("127.0.87.9");
    let (ip, port) = (allow_list.0, stratus_e2e::free_port());
    let cloud = Cloud::up_with(&[
        "--nodes",
        "node-up",
        "--object-store",
        "--object-store-ip",
        ip,
        "--object-store-port",
        &port.to_string(),
    ])?;
    wait_until(T, "stratus up to show the object store", || {
        cloud
            .log()
            .contains(&format!(
                "Object store (Swift API and S3): http://{ip}:{port}"
            ))
            .then_some(())
    })
    .with_context(|| cloud.log())?;
    cloud.projects(&["upload1", "upload2"])?;
    node.start_agent(&cloud)?;
    let flavors = stratus_e2e::repo_root().join("examples/flavors.yaml");
    cloud.kubectl_ok(&["apply", "-f", flavors.to_str().unwrap_or_default()])?;
    cloud.member("uma", "upload1", "upload-pw-uma")?;
    cloud.member("otto", "upload2", "upload-pw-otto")?;
    let uma = cloud.keystone_token("uma", "upload-pw-uma", "upload1")?;
    let otto = cloud.keystone_token("otto", "upload-pw-otto", "upload2")?;

    // The guest's kernel and ramdisk from its file server; its disk only by upload (the
    // guest's own `tiny` Image, served by URL, is not made, so nothing else holds the disk).
    let kernel_and_ramdisk: String = guest
        .images_yaml("upload1")?
        .split_inclusive("---\n")
        .filter(|doc| !doc.contains("name: tiny\n"))
        .collect();
    let uploaded = "---\napiVersion: image.stratus.dev/v1\nkind: Image\nmetadata:\n  name: uploaded\n  namespace: upload1\nspec:\n  diskFormat: qcow2\n  containerFormat: bare\n  source:\n    upload: {}\n  kernelImage: tiny-kernel\n  ramdiskImage: tiny-initrd\n  kernelCmdline: console=ttyS0 quiet\n";
    cloud.kubectl_in(
        &["apply", "-f", "-"],
        &format!("{kernel_and_ramdisk}{uploaded}"),
    )?;

    let disk = guest.dir.join("disk.qcow2");
    let bytes = std::fs::read(&disk)?;
    let sha256 = guest.sha256("disk.qcow2")?;
    let data = format!(
        "{}/apis/image.stratus.dev/v1/namespaces/upload1/images/uploaded/data",
        cloud.url
    );
    let put = curl(
        &cloud,
        &uma,
        &[
            "-o",
            "/dev/null",
            "-H",
            "Content-Type: application/octet-stream",
            "-T",
            disk.to_str().context("a UTF-8 path")?,
            &data,
        ],
    )?;
    anyhow::ensure!(put.starts_with('2'), "PUT the image's data: {put}");

    // Active, with the checksum and size of the bytes sent.
    let mut last = Value::Null;
    let image = wait_until(T, "the uploaded image to be Active", || {
        last = get_json(&cloud, "upload1", "image", "uploaded")?;
        (last["status"]["phase"] == "Active").then(|| last.clone())
    })
    .with_context(|| format!("the image is {}", last["status"]))?;
    anyhow::ensure!(
        image["status"]["sha256"] == sha256.as_str(),
        "{}",
        image["status"]
    );
    anyhow::ensure!(
        image["status"]["sizeBytes"] == bytes.len(),
        "{}",
        image["status"]
    );

    // The uploader reads the very bytes back; a member of another project may not.
    let back = cloud.dir.path().join("downloaded.qcow2");
    let get = curl(
        &cloud,
        &uma,
        &["-o", back.to_str().context("a UTF-8 path")?, &data],
    )?;
    anyhow::ensure!(get == "200", "GET the image's data: {get}");
    anyhow::ensure!(std::fs::read(&back)? == bytes, "the data read back differs");
    std::fs::remove_file(&back)?;
    let refused = curl(&cloud, &otto, &["-o", "/dev/null", &data])?;
    anyhow::ensure!(
        refused == "403",
        "another project's member read the data: {refused}"
    );

    // A Server made from it boots the guest.
    super::images_url_store::server_boots(&cloud, &node, "upload1", "from-upload", "uploaded")?;

    drop(cloud);
    drop(node);
    anyhow::ensure!(!allow_list.present(), "the allow-list outlived stratus up");
    Ok(())
}

/// The object files (`*.data`) under `dir` whose content is `bytes`.
fn objects_holding(dir: &std::path::Path, bytes: &[u8]) -> Vec<std::path::PathBuf> {
    stratus_e2e::files_ending(dir, "data")
        .into_iter()
        .filter(|p| std::fs::read(p).is_ok_and(|b| b == bytes))
        .collect()
}

#[test]
fn an_image_uploaded_with_the_cli_is_kept_until_it_is_deleted() -> Result<()> {
    // An address of this test's own (the store's servers and rsync listen on fixed ports).
    let allow_list = ObjectStoreAllowList("127.0.87.10");
    let (ip, port) = (allow_list.0, stratus_e2e::free_port());
    let cloud = object_store_up_with(
        ip,
        port,
        &[
            "--max-image-transfers",
            "1",
            "--image-min-transfer-kib-per-second",
            "256",
            "--image-transfer-window-seconds",
            "4",
        ],
    )?;
    cloud.projects(&["upload3"])?;
    cloud.member("ulla", "upload3", "upload-pw-ulla")?;
    let ulla = cloud.keystone_token("ulla", "upload-pw-ulla", "upload3")?;
    let kubeconfig = cloud.kubeconfig_with("ulla", Some(&ulla))?;

    // 32 MiB no other file holds.
    let mut x = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_nanos() as u64
        | 1;
    let bytes: Vec<u8> = (0..32 * 1024 * 1024 / 8)
        .flat_map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()
        })
        .collect();
    let file = cloud.dir.path().join("upload.raw");
    std::fs::write(&file, &bytes)?;
    let sum = output_of(Command::new("sha256sum").arg(&file), "sha256sum")?;
    let sha256 = String::from_utf8_lossy(&sum)
        .split_whitespace()
        .next()
        .context("no digest")?
        .to_string();
    let upload = |name: &str| -> Result<std::process::Output> {
        Ok(Command::new(stratus_e2e::stratus_bin())
            .env("KUBECONFIG", &kubeconfig)
            .args(["image", "upload", name])
            .arg(&file)
            .args(["-n", "upload3", "--disk-format", "raw"])
            .output()?)
    };

    // Made, sent, Active, with the checksum of the bytes sent, kept in the object store.
    let out = upload("disk")?;
    let said = String::from_utf8_lossy(&out.stdout).to_string();
    anyhow::ensure!(
        out.status.success() && said.contains("is Active") && said.contains(&sha256),
        "stratus image upload: {said}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let image = get_json(&cloud, "upload3", "image", "disk").context("the image")?;
    anyhow::ensure!(
        image["status"]["sha256"] == sha256.as_str(),
        "{}",
        image["status"]
    );
    anyhow::ensure!(
        image["metadata"]["finalizers"]
            .as_array()
            .is_some_and(|f| f.iter().any(|f| f == "image.stratus.dev/stored-data")),
        "{}",
        image["metadata"]
    );
    let stored = objects_holding(cloud.dir.path(), &bytes);
    anyhow::ensure!(stored.len() == 1, "the object store holds {stored:?}");

    // Its data and what it is are settled: a second upload and a change of format refused,
    // each saying why.
    let out = upload("disk")?;
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    anyhow::ensure!(!out.status.success() && err.contains("Active"), "{err}");
    let patch = cloud.kubectl(&[
        "-n",
        "upload3",
        "patch",
        "image",
        "disk",
        "--type=merge",
        "-p",
        r#"{"spec":{"diskFormat":"qcow2"}}"#,
    ])?;
    let err = String::from_utf8_lossy(&patch.stderr).to_string();
    anyhow::ensure!(
        !patch.status.success() && err.contains("spec.diskFormat") && err.contains("immutable"),
        "{err}"
    );

    // A client reading at 1 KiB/s holds the only transfer place (another download is 429)
    // only until the server gives it up, long before it could have read it all (what the
    // kernel buffers for it, it still reads after, so its end is not what is watched).
    let data = format!(
        "{}/apis/image.stratus.dev/v1/namespaces/upload3/images/disk/data",
        cloud.url
    );
    // HTTP/1.1: over HTTP/2, curl takes a 32 MiB window into its own memory at full speed,
    // which is no stalled reader for the server.
    let started = std::time::Instant::now();
    let mut slow = Command::new("curl")
        .args(["-sS", "-o", "/dev/null", "--http1.1", "--limit-rate", "1k"])
        .args(["--max-time", "300"])
        .arg("--cacert")
        .arg(cloud.dir.path().join("pki/ca.crt"))
        .args(["-H", &format!("Authorization: Bearer {ulla}")])
        .arg(&data)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    std::thread::sleep(Duration::from_secs(1));
    let back = cloud.dir.path().join("downloaded.raw");
    let back_arg = back.to_str().context("a UTF-8 path")?;
    let busy = curl(&cloud, &ulla, &["-o", back_arg, &data])?;
    let freed = if busy == "429" {
        wait_until(
            Duration::from_secs(90),
            "the stalled download to give up its place",
            || {
                let got = curl(&cloud, &ulla, &["-o", back_arg, &data]).ok()?;
                (got != "429").then_some(got)
            },
        )
    } else {
        Ok(busy.clone())
    };
    let still_reading = slow.try_wait()?.is_none();
    let _ = slow.kill();
    let _ = slow.wait();
    anyhow::ensure!(
        busy == "429",
        "a second download while one holds the place: {busy}"
    );
    let freed = freed?;
    let took = started.elapsed();
    anyhow::ensure!(
        freed == "200" && still_reading,
        "after {took:?}, with the slow client still reading: {still_reading}, a download got {freed}"
    );
    // The data reads back whole.
    anyhow::ensure!(std::fs::read(&back)? == bytes, "the data read back differs");
    std::fs::remove_file(&back)?;

    // Deleted, the Image goes only with its data: nothing of it is left in the object store.
    cloud.kubectl_ok(&["-n", "upload3", "delete", "image", "disk", "--timeout=120s"])?;
    anyhow::ensure!(
        get_json(&cloud, "upload3", "image", "disk").is_none(),
        "the image is still there"
    );
    let left = objects_holding(cloud.dir.path(), &bytes);
    anyhow::ensure!(left.is_empty(), "the object store still holds {left:?}");
    std::fs::remove_file(&file)?;

    drop(cloud);
    anyhow::ensure!(!allow_list.present(), "the allow-list outlived stratus up");
    Ok(())
}
