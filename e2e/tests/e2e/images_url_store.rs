//! A URL-sourced image is fetched once and kept in the object store: with `stratus up
//! --object-store` (whose controllers run with `--store-url-images`) and a simulated compute
//! node, the test guest's kernel, ramdisk and disk are served by a file server of this test
//! alone; their Images go Active with `status.stored` (the image store's object) and the
//! checksums of the files served (the ramdisk's Image gives none: its recorded one is what
//! the node checks). Then the file server stops and its files are removed, and a Server made
//! from the disk still boots: the node read the data from the API server, not from the URL.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use serde_json::Value;
use stratus_e2e::node::{FileServer, Guest, Node};
use stratus_e2e::{Cloud, wait_until};

use super::up::{ObjectStoreAllowList, object_store_up_with};

/// Generous: TCG guests, Swift and the controllers share two cores with every other test.
const T: Duration = Duration::from_secs(300);
const NS: &str = "urlstore1";

fn get_json(cloud: &Cloud, ns: &str, kind: &str, name: &str) -> Option<Value> {
    let out = cloud
        .kubectl_ok(&["-n", ns, "get", kind, name, "-o", "json"])
        .ok()?;
    serde_json::from_str(&out).ok()
}

/// Server `name` of project `ns`, made from Image `image` on `node`, runs and its guest
/// prints its marker on the console.
pub(super) fn server_boots(
    cloud: &Cloud,
    node: &Node,
    ns: &str,
    name: &str,
    image: &str,
) -> Result<()> {
    cloud.kubectl_in(
        &["apply", "-f", "-"],
        &format!(
            "apiVersion: compute.stratus.dev/v1\nkind: Server\nmetadata:\n  name: {name}\n  namespace: {ns}\nspec:\n  flavor: m1.nano\n  image: {image}\n"
        ),
    )?;
    let server = wait_until(T, "the server to run", || {
        get_json(cloud, ns, "server", name).filter(|s| s["status"]["phase"] == "Running")
    })
    .with_context(|| {
        format!(
            "{}\nagent:\n{}\n{}",
            cloud
                .kubectl_ok(&["-n", ns, "get", "server,image", "-o", "yaml"])
                .unwrap_or_default(),
            node.agent_log(),
            cloud.log()
        )
    })?;
    let uid = server["metadata"]["uid"]
        .as_str()
        .context("the server's uid")?
        .to_string();
    let marker = format!("STRATUS-GUEST-READY hostname={name} instance-id={uid}");
    wait_until(T, "the guest's marker", || {
        node.console(&uid).contains(&marker).then_some(())
    })
    .with_context(|| format!("console of {uid}:\n{}", node.console(&uid)))?;
    Ok(())
}

#[test]
fn a_url_image_is_kept_in_the_object_store_and_boots_after_its_url_is_gone() -> Result<()> {
    let guest = Guest::serve()?;
    // The guest's files, served by a server of this test only, which it stops.
    let files = tempfile::tempdir()?;
    for f in ["vmlinuz", "initrd.img", "disk.qcow2"] {
        std::fs::copy(guest.dir.join(f), files.path().join(f))
            .with_context(|| format!("copy {f}"))?;
    }
    let server = FileServer::serve(files.path())?;
    let url = server.url.clone();
    let mut node = Node::start("node-urlst")?;
    // An address of this test's own (the store's servers and rsync listen on fixed ports).
    let allow_list = ObjectStoreAllowList("127.0.87.12");
    let (ip, port) = (allow_list.0, stratus_e2e::free_port());
    let cloud = object_store_up_with(ip, port, &["--nodes", "node-urlst"])?;
    cloud.projects(&[NS])?;
    node.start_agent(&cloud)?;
    let flavors = stratus_e2e::repo_root().join("examples/flavors.yaml");
    cloud.kubectl_ok(&["apply", "-f", flavors.to_str().unwrap_or_default()])?;

    // The guest's Images, from this test's server; the ramdisk's without a checksum.
    let initrd_sum = guest.sha256("initrd.img")?;
    let images = guest
        .images_yaml(NS)?
        .replace(&guest.url, &url)
        .replace(&format!("  sha256: {initrd_sum}\n"), "");
    ensure!(images.contains(&url) && !images.contains(&initrd_sum));
    cloud.kubectl_in(&["apply", "-f", "-"], &images)?;

    // Each goes Active kept in the object store, with the checksum of the file served.
    for (name, file) in [
        ("tiny-kernel", "vmlinuz"),
        ("tiny-initrd", "initrd.img"),
        ("tiny", "disk.qcow2"),
    ] {
        let mut last = Value::Null;
        let image = wait_until(T, &format!("image {name} to be Active"), || {
            last = get_json(&cloud, NS, "image", name)?;
            (last["status"]["phase"] == "Active").then(|| last.clone())
        })
        .with_context(|| format!("the image is {}\n{}", last["status"], cloud.log()))?;
        let status = &image["status"];
        ensure!(status["sha256"] == guest.sha256(file)?.as_str(), "{status}");
        ensure!(
            status["sizeBytes"] == std::fs::metadata(files.path().join(file))?.len(),
            "{status}"
        );
        ensure!(
            status["stored"]["container"] == "stratus-images"
                && status["stored"]["object"] == image["metadata"]["uid"],
            "{name} is not kept in the object store: {status}"
        );
    }

    // The URL is gone: its server stopped, its files removed.
    drop(server);
    drop(files);
    ensure!(
        std::process::Command::new("curl")
            .args(["-sS", "-o", "/dev/null", "--max-time", "5"])
            .arg(format!("{url}/disk.qcow2"))
            .status()
            .is_ok_and(|s| !s.success()),
        "the file server still answers"
    );

    // A Server made from the disk boots the guest: its node read the data from the API server.
    server_boots(&cloud, &node, NS, "from-store", "tiny")?;
    ensure!(
        node.agent_log().contains("images/tiny/data"),
        "the node did not read the disk from the API server:\n{}",
        node.agent_log()
    );

    drop(cloud);
    drop(node);
    ensure!(!allow_list.present(), "the allow-list outlived stratus up");
    Ok(())
}
