//! Quota enforced at admission, atomically with the write.

use anyhow::Result;
use kube::ResourceExt;
use kube::api::{Api, DynamicObject, PostParams};
use kube::discovery::ApiResource;
use serde_json::json;
use stratus_e2e::Cloud;

fn resource(group: &str, kind: &str, plural: &str) -> ApiResource {
    ApiResource {
        group: group.into(),
        version: "v1".into(),
        api_version: format!("{group}/v1"),
        kind: kind.into(),
        plural: plural.into(),
    }
}

#[tokio::test]
async fn fifty_concurrent_creates_against_a_quota_of_ten_leave_ten() -> Result<()> {
    let cloud = Cloud::up()?;
    cloud.projects(&["q", "free"])?;
    cloud.kubectl_in(
        &["apply", "-f", "-"],
        "apiVersion: identity.stratus.dev/v1\nkind: Quota\nmetadata:\n  name: default\n  namespace: q\nspec:\n  limits:\n    networks: 10\n    vcpus: 5\n",
    )?;
    let client = cloud.client().await?;
    let nets: Api<DynamicObject> = Api::namespaced_with(
        client.clone(),
        "q",
        &resource("network.stratus.dev", "Network", "networks"),
    );
    let mut tasks = Vec::new();
    for i in 0..50 {
        let nets = nets.clone();
        tasks.push(tokio::spawn(async move {
            let obj: DynamicObject = serde_json::from_value(json!({"apiVersion": "network.stratus.dev/v1", "kind": "Network", "metadata": {"name": format!("net-{i}")}, "spec": {}}))?;
            match nets.create(&PostParams::default(), &obj).await {
                Ok(_) => Ok::<_, anyhow::Error>(Ok(())),
                Err(kube::Error::Api(e)) => Ok(Err((e.code, e.message))),
                Err(e) => Err(e.into()),
            }
        }));
    }
    let (mut ok, mut refused) = (0, Vec::new());
    for t in tasks {
        match t.await?? {
            Ok(()) => ok += 1,
            Err(e) => refused.push(e),
        }
    }
    assert_eq!(ok, 10, "refusals: {refused:?}");
    assert_eq!(refused.len(), 40);
    assert!(
        refused.iter().all(|(code, msg)| *code == 403
            && msg.contains("exceeded quota")
            && msg.contains("networks")),
        "{refused:?}"
    );
    assert_eq!(nets.list(&Default::default()).await?.items.len(), 10);
    // Another project is not limited by q's quota.
    let other: Api<DynamicObject> = Api::namespaced_with(
        client.clone(),
        "free",
        &resource("network.stratus.dev", "Network", "networks"),
    );
    for i in 0..12 {
        let obj: DynamicObject = serde_json::from_value(
            json!({"apiVersion": "network.stratus.dev/v1", "kind": "Network", "metadata": {"name": format!("n{i}")}, "spec": {}}),
        )?;
        other.create(&PostParams::default(), &obj).await?;
    }
    // Freeing one makes room for exactly one.
    let first = nets.list(&Default::default()).await?.items[0].name_any();
    nets.delete(&first, &Default::default()).await?;
    let net = |n: &str| {
        format!(
            "apiVersion: network.stratus.dev/v1\nkind: Network\nmetadata:\n  name: {n}\nspec: {{}}\n"
        )
    };
    cloud.kubectl_in(&["-n", "q", "create", "-f", "-"], &net("again"))?;
    assert!(
        cloud
            .kubectl_in(&["-n", "q", "create", "-f", "-"], &net("again2"))
            .is_err(),
        "the quota let an eleventh network in"
    );

    // vCPUs are counted through each Server's flavor.
    cloud.kubectl_in(&["apply", "-f", "-"], "apiVersion: compute.stratus.dev/v1\nkind: Flavor\nmetadata:\n  name: two\nspec:\n  vcpus: 2\n  ramMiB: 256\n  diskGiB: 1\n")?;
    let server = |n: &str| {
        format!(
            "apiVersion: compute.stratus.dev/v1\nkind: Server\nmetadata:\n  name: {n}\n  namespace: q\nspec:\n  flavor: two\n  image: cirros\n"
        )
    };
    cloud.kubectl_in(&["create", "-f", "-"], &server("s1"))?;
    cloud.kubectl_in(&["create", "-f", "-"], &server("s2"))?;
    let err = cloud
        .kubectl_cmd()
        .args(["create", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let out = {
        use std::io::Write;
        let mut err = err;
        err.stdin
            .take()
            .map(|mut s| s.write_all(server("s3").as_bytes()));
        err.wait_with_output()?
    };
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && text.contains("Forbidden")
            && text.contains("vcpus=2")
            && text.contains("limited: vcpus=5"),
        "{text}"
    );
    // Resizing counts too: to 4 vCPUs would make 6 of 5; to 3 makes exactly 5.
    for (name, vcpus) in [("four", 4), ("three", 3)] {
        cloud.kubectl_in(&["apply", "-f", "-"], &format!("apiVersion: compute.stratus.dev/v1\nkind: Flavor\nmetadata:\n  name: {name}\nspec:\n  vcpus: {vcpus}\n  ramMiB: 256\n  diskGiB: 1\n"))?;
    }
    let err = cloud.kubectl_err(&[
        "-n",
        "q",
        "patch",
        "server",
        "s1",
        "--type",
        "merge",
        "-p",
        r#"{"spec":{"flavor":"four"}}"#,
    ])?;
    assert!(
        err.contains("exceeded quota") && err.contains("vcpus=4"),
        "{err}"
    );
    cloud.kubectl_ok(&[
        "-n",
        "q",
        "patch",
        "server",
        "s1",
        "--type",
        "merge",
        "-p",
        r#"{"spec":{"flavor":"three"}}"#,
    ])?;
    // Shrinking is always allowed.
    cloud.kubectl_ok(&[
        "-n",
        "q",
        "patch",
        "server",
        "s1",
        "--type",
        "merge",
        "-p",
        r#"{"spec":{"flavor":"two"}}"#,
    ])?;
    // The quota controller shows used against the limits.
    let used = stratus_e2e::wait_until(
        std::time::Duration::from_secs(90),
        "status.used to count",
        || {
            let v: serde_json::Value = serde_json::from_str(
                &cloud
                    .kubectl_ok(&["-n", "q", "get", "quota", "default", "-o", "json"])
                    .ok()?,
            )
            .ok()?;
            (v["status"]["used"]["networks"] == 10 && v["status"]["used"]["vcpus"] == 4)
                .then_some(v)
        },
    )?;
    assert_eq!(used["status"]["used"]["servers"], 2);
    assert_eq!(used["status"]["used"]["ramMiB"], 512);
    assert_eq!(used["status"]["used"]["volumes"], 0);
    assert_eq!(used["status"]["phase"], "Active");
    Ok(())
}
