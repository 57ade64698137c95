//! Images kept in the object store: with `stratus up --object-store`, a member uploads a tiny
//! image to their project's account with their own token, an Image names it
//! (`source.swift`), and the image controller fetches it through the proxy with a short-lived
//! read-only token of that project: the bytes cached are the bytes uploaded. Another project's
//! Image naming the same container fails clearly (its own account has no such object), and no
//! such token is handed out (the API server keeps it to itself).

use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};
use stratus_e2e::{Cloud, output_of, wait_until};

use super::up::{ObjectStoreAllowList, object_store_up};

/// The Image `name` of project `ns` once its phase is `phase` (or it failed otherwise).
fn image_in_phase(cloud: &Cloud, ns: &str, name: &str, phase: &str) -> Result<serde_json::Value> {
    let mut last = serde_json::Value::Null;
    wait_until(
        Duration::from_secs(300),
        &format!("image {ns}/{name} to be {phase}"),
        || {
            let out = cloud
                .kubectl_ok(&["-n", ns, "get", "image", name, "-o", "json"])
                .ok()?;
            last = serde_json::from_str(&out).ok()?;
            (last["status"]["phase"] == phase).then(|| last.clone())
        },
    )
    .with_context(|| format!("the image is {}", last["status"]))
}

/// The condition `kind` of an Image.
fn condition<'a>(image: &'a serde_json::Value, kind: &str) -> &'a serde_json::Value {
    image["status"]["conditions"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["type"] == kind))
        .unwrap_or(&serde_json::Value::Null)
}

/// curl with `token` as `X-Auth-Token`; the HTTP status it got.
fn status_with(token: &str, args: &[&str]) -> Result<String> {
    let out = output_of(
        Command::new("curl")
            .args(["-sS", "-o", "/dev/null", "-w", "%{http_code}"])
            .args(["-H", &format!("X-Auth-Token: {token}")])
            .args(args),
        "curl",
    )?;
    Ok(String::from_utf8_lossy(&out).to_string())
}

#[test]
fn an_image_kept_in_swift_is_fetched_with_its_projects_read_only_token() -> Result<()> {
    // An address of this test's own (the store's servers and rsync listen on fixed ports).
    let allow_list = ObjectStoreAllowList("127.0.87.5");
    let (ip, port) = (allow_list.0, stratus_e2e::free_port());
    let cloud = object_store_up(ip, port)?;
    cloud.projects(&["imgswift1", "imgswift2"])?;
    let password = "image-store-pw-1";
    cloud.kubectl_in(
        &["apply", "-f", "-"],
        "apiVersion: identity.stratus.dev/v1\nkind: User\nmetadata:\n  name: ivy\nspec: {}\n---\n\
         apiVersion: identity.stratus.dev/v1\nkind: RoleAssignment\nmetadata:\n  name: ivy-member\n  namespace: imgswift1\nspec:\n  user: ivy\n  role: member\n",
    )?;
    cloud.kubectl_in(
        &[
            "replace",
            "--raw",
            "/apis/identity.stratus.dev/v1/users/ivy/password",
            "-f",
            "-",
        ],
        &serde_json::json!({ "password": password }).to_string(),
    )?;
    let uid = |p: &str| cloud.kubectl_ok(&["get", "project", p, "-o", "jsonpath={.metadata.uid}"]);
    let account = format!("http://{ip}:{port}/v1/AUTH_{}", uid("imgswift1")?);

    // Ivy's own token, from a Keystone login scoped to her project.
    let ivy = cloud.keystone_token("ivy", password, "imgswift1")?;

    // A tiny raw disk, uploaded by ivy under a pseudo-folder.
    let disk: Vec<u8> = (0..64 * 1024u32).map(|i| (i % 251) as u8).collect();
    let file = cloud.dir.path().join("tiny.raw");
    std::fs::write(&file, &disk)?;
    let object = format!("{account}/images/tiny/disk.raw");
    anyhow::ensure!(status_with(&ivy, &["-X", "PUT", &format!("{account}/images")])? == "201");
    let put = status_with(&ivy, &["-T", &file.to_string_lossy(), &object])?;
    anyhow::ensure!(put == "201", "PUT the image: {put}");
    let sum = output_of(Command::new("sha256sum").arg(&file), "sha256sum")?;
    let sha256 = String::from_utf8_lossy(&sum)
        .split_whitespace()
        .next()
        .context("no digest")?
        .to_string();

    // The Image in ivy's project: fetched, checked against its checksum, Active.
    let image = |ns: &str, name: &str, sum: &str| {
        format!(
            "apiVersion: image.stratus.dev/v1\nkind: Image\nmetadata:\n  name: {name}\n  namespace: {ns}\n\
             spec:\n  diskFormat: raw\n  sha256: {sum}\n  source:\n    swift:\n      container: images\n      object: tiny/disk.raw\n"
        )
    };
    cloud.kubectl_in(&["apply", "-f", "-"], &image("imgswift1", "tiny", &sha256))?;
    let active = image_in_phase(&cloud, "imgswift1", "tiny", "Active")?;
    anyhow::ensure!(
        active["status"]["sha256"] == sha256.as_str(),
        "{}",
        active["status"]
    );
    anyhow::ensure!(
        active["status"]["sizeBytes"] == disk.len(),
        "{}",
        active["status"]
    );
    // The controller's cache holds the very bytes uploaded.
    let cached = walk_named(cloud.dir.path(), &format!("raw-sha256-{sha256}"));
    anyhow::ensure!(!cached.is_empty(), "no cached copy of the image");
    for c in &cached {
        anyhow::ensure!(std::fs::read(c)? == disk, "{} differs", c.display());
    }

    // Another project's Image naming the same container and object: its own account has no
    // such object, and it says so.
    cloud.kubectl_in(
        &["apply", "-f", "-"],
        &image("imgswift2", "borrowed", &sha256),
    )?;
    let failed = image_in_phase(&cloud, "imgswift2", "borrowed", "Error")?;
    let verified = condition(&failed, "Verified");
    anyhow::ensure!(verified["reason"] == "SourceNotFound", "{verified}");
    anyhow::ensure!(
        verified["message"]
            .as_str()
            .is_some_and(|m| m.contains("404")),
        "{verified}"
    );

    // No component is handed a token of the project any more: the token subresource is gone.
    let asked = cloud.kubectl_in(
        &[
            "create",
            "--raw",
            "/apis/image.stratus.dev/v1/namespaces/imgswift1/images/tiny/token",
            "-f",
            "-",
        ],
        "{}",
    );
    anyhow::ensure!(asked.is_err(), "a token was handed out: {asked:?}");
    drop(cloud);
    anyhow::ensure!(!allow_list.present(), "the allow-list outlived stratus up");
    Ok(())
}

/// The files under `dir` (at any depth) named `name`.
fn walk_named(dir: &std::path::Path, name: &str) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if e.file_name().to_string_lossy() == name {
                out.push(p);
            }
        }
    }
    out
}
