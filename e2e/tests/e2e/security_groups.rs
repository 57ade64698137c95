//! Every Project's `default` SecurityGroup, made by the controllers of `stratus up` as Neutron
//! makes it: members in, all IPv4 out; kept as the user edits it, made again when deleted,
//! never in a Project being deleted, and refused creates retried once the quota allows.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use stratus_api_types::network::{Direction, EtherType, Protocol, SecurityGroup};
use stratus_e2e::{Cloud, wait_until};

/// Generous: the controllers share two cores with every other test.
const T: Duration = Duration::from_secs(90);

/// The group `default` of project `ns`, if there is one.
fn default_group(cloud: &Cloud, ns: &str) -> Option<SecurityGroup> {
    let out = cloud
        .kubectl(&["-n", ns, "get", "securitygroup", "default", "-o", "json"])
        .ok()?;
    if !out.status.success() {
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
}

fn uid(g: &SecurityGroup) -> String {
    g.metadata.uid.clone().unwrap_or_default()
}

/// Whether `g` holds the rules Stratus gives a default group.
fn as_made(g: &SecurityGroup) -> Result<()> {
    let rules = &g.spec.rules;
    ensure!(rules.len() == 2, "not two rules: {rules:?}");
    let ingress = rules
        .iter()
        .find(|r| r.direction == Direction::Ingress)
        .context("no ingress rule")?;
    ensure!(
        ingress.remote_group.as_deref() == Some("default") && ingress.remote_ip_prefix.is_none(),
        "ingress is not from the group's members: {ingress:?}"
    );
    let egress = rules
        .iter()
        .find(|r| r.direction == Direction::Egress)
        .context("no egress rule")?;
    ensure!(
        egress.remote_group.is_none() && egress.remote_ip_prefix.is_none(),
        "egress is not to anywhere: {egress:?}"
    );
    for r in rules {
        ensure!(
            r.ethertype == EtherType::IPv4 && r.protocol == Protocol::Any,
            "{r:?}"
        );
        ensure!(r.port_range_min.is_none() && r.icmp_type.is_none(), "{r:?}");
    }
    let labels = g.metadata.labels.clone().unwrap_or_default();
    ensure!(
        labels
            .get("app.kubernetes.io/managed-by")
            .map(String::as_str)
            == Some("stratus"),
        "not marked as made by Stratus: {labels:?}"
    );
    Ok(())
}

#[test]
fn a_project_gets_a_default_group_kept_as_edited_and_made_again_when_deleted() -> Result<()> {
    let cloud = Cloud::up()?;
    let t = T;
    cloud.projects(&["demo"])?;
    let made = wait_until(t, "the default group of demo", || {
        default_group(&cloud, "demo")
    })
    .with_context(|| cloud.log())?;
    as_made(&made)?;

    // The user's edits are kept: the group is only made when absent.
    cloud.kubectl_ok(&[
        "-n",
        "demo",
        "patch",
        "securitygroup",
        "default",
        "--type",
        "merge",
        "-p",
        r#"{"spec":{"description":"mine","rules":[{"direction":"egress"},{"direction":"ingress","protocol":"tcp","portRangeMin":22,"remoteIPPrefix":"0.0.0.0/0"}]}}"#,
    ])?;
    // Long enough for the controller to see the change (it reacts to each within a second).
    std::thread::sleep(Duration::from_secs(3));
    let edited = default_group(&cloud, "demo").context("the edited group is gone")?;
    assert_eq!(uid(&edited), uid(&made));
    assert_eq!(edited.spec.description.as_deref(), Some("mine"));
    assert_eq!(edited.spec.rules.len(), 2);
    assert_eq!(edited.spec.rules[1].port_range_min, Some(22));

    // Deleted, it is made again, as it was first made.
    cloud.kubectl_ok(&["-n", "demo", "delete", "securitygroup", "default"])?;
    let again = wait_until(t, "the default group to be made again", || {
        default_group(&cloud, "demo").filter(|g| uid(g) != uid(&made))
    })
    .with_context(|| cloud.log())?;
    as_made(&again)?;

    // Deleting the Project completes, its default group with it, and none is made anew.
    cloud.kubectl_ok(&["delete", "project", "demo", "--wait=false"])?;
    wait_until(T, "project demo to be gone", || {
        let out = cloud.kubectl(&["get", "namespace", "demo"]).ok()?;
        (!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("not found"))
            .then_some(())
    })
    .with_context(|| cloud.log())?;
    let project = cloud.kubectl(&["get", "project", "demo"])?;
    assert!(!project.status.success(), "project demo is still there");
    std::thread::sleep(Duration::from_secs(2));
    let left = cloud.kubectl_ok(&[
        "get",
        "securitygroups",
        "-A",
        "-o",
        "jsonpath={range .items[*]}{.metadata.namespace}/{.metadata.name} {end}",
    ])?;
    assert!(!left.contains("demo/"), "groups left in demo: {left}");

    // A Project made again under the name gets a group of its own.
    cloud.projects(&["demo"])?;
    let fresh = wait_until(t, "the new project's default group", || {
        default_group(&cloud, "demo")
    })
    .with_context(|| cloud.log())?;
    as_made(&fresh)?;
    assert_ne!(uid(&fresh), uid(&again));
    Ok(())
}

#[test]
fn a_default_group_over_quota_is_told_on_the_project_and_made_once_the_quota_allows() -> Result<()>
{
    let cloud = Cloud::up()?;
    let t = T;
    cloud.projects(&["q"])?;
    let made = wait_until(t, "the default group of q", || default_group(&cloud, "q"))
        .with_context(|| cloud.log())?;
    let quota = |n: u32| {
        format!(
            "apiVersion: identity.stratus.dev/v1\nkind: Quota\nmetadata:\n  name: default\n  namespace: q\nspec:\n  limits:\n    securityGroups: {n}\n"
        )
    };
    cloud.kubectl_in(&["apply", "-f", "-"], &quota(0))?;
    cloud.kubectl_ok(&["-n", "q", "delete", "securitygroup", "default"])?;

    // Refused: a Warning Event on the Project says why, and there is no group.
    let events = wait_until(t, "an Event of the refused create", || {
        let events = cloud
            .kubectl_ok(&["get", "events", "-A", "-o", "json"])
            .ok()?;
        events
            .contains("DefaultSecurityGroupRefused")
            .then_some(events)
    })
    .with_context(|| cloud.log())?;
    let events: serde_json::Value = serde_json::from_str(&events)?;
    let event = events["items"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|e| e["reason"] == "DefaultSecurityGroupRefused")
        .context("the event")?;
    assert_eq!(event["type"], "Warning");
    let regarding = if event["regarding"].is_object() {
        &event["regarding"]
    } else {
        &event["involvedObject"]
    };
    assert_eq!(
        (&regarding["kind"], &regarding["name"]),
        (&serde_json::json!("Project"), &serde_json::json!("q")),
        "{event}"
    );
    let note = event["note"]
        .as_str()
        .or(event["message"].as_str())
        .unwrap_or_default();
    assert!(note.contains("securityGroups"), "{note}");
    assert!(default_group(&cloud, "q").is_none());

    // Raised, the quota lets the retry through.
    cloud.kubectl_in(&["apply", "-f", "-"], &quota(1))?;
    let again = wait_until(T, "the group once the quota allows", || {
        default_group(&cloud, "q")
    })
    .with_context(|| cloud.log())?;
    as_made(&again)?;
    assert_ne!(uid(&again), uid(&made));
    Ok(())
}
