//! An image uploaded through Stratus boots a server from the object store: with
//! `stratus up --object-store` and a simulated compute node, a member of a project makes an
//! Image with `source.upload`, sends the test guest's disk to `PUT images/NAME/data` with their
//! own token, and the Image goes Active with the checksum and size of the bytes sent. A Server
//! made from it boots (its console shows the guest's marker): the node fetched the disk through
//! `GET images/NAME/data`, the only place it is kept. The uploader reads the same bytes back;
//! a member of another project is refused them (403).

use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::Value;
use stratus_e2e::node::{Guest, Node};
use stratus_e2e::{Cloud, output_of, wait_until};

use super::up::ObjectStoreAllowList;

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
    cloud.kubectl_in(
        &["apply", "-f", "-"],
        "apiVersion: compute.stratus.dev/v1\nkind: Server\nmetadata:\n  name: from-upload\n  namespace: upload1\nspec:\n  flavor: m1.nano\n  image: uploaded\n",
    )?;
    let server = wait_until(T, "the server to run", || {
        get_json(&cloud, "upload1", "server", "from-upload")
            .filter(|s| s["status"]["phase"] == "Running")
    })
    .with_context(|| {
        format!(
            "{}\nagent:\n{}\n{}",
            cloud
                .kubectl_ok(&["-n", "upload1", "get", "server,image", "-o", "yaml"])
                .unwrap_or_default(),
            node.agent_log(),
            cloud.log()
        )
    })?;
    let uid = server["metadata"]["uid"]
        .as_str()
        .context("the server's uid")?
        .to_string();
    let marker = format!("STRATUS-GUEST-READY hostname=from-upload instance-id={uid}");
    wait_until(T, "the guest's marker", || {
        node.console(&uid).contains(&marker).then_some(())
    })
    .with_context(|| format!("console of {uid}:\n{}", node.console(&uid)))?;

    drop(cloud);
    drop(node);
    anyhow::ensure!(!allow_list.present(), "the allow-list outlived stratus up");
    Ok(())
}
