//! Users, passwords and tokens; roles authorising every request; projects isolated.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use stratus_e2e::Cloud;

/// Creates a user with a password and a role in a project (or cluster-wide).
fn user(cloud: &Cloud, name: &str, role: &str, project: &str, cluster_wide: bool) -> Result<()> {
    cloud.kubectl_in(&["apply", "-f", "-"], &format!("apiVersion: identity.stratus.dev/v1\nkind: User\nmetadata:\n  name: {name}\nspec:\n  enabled: true\n"))?;
    cloud.kubectl_in(
        &["apply", "-f", "-"],
        &format!("apiVersion: identity.stratus.dev/v1\nkind: RoleAssignment\nmetadata:\n  name: {name}-{role}\n  namespace: {project}\nspec:\n  user: {name}\n  role: {role}\n  clusterWide: {cluster_wide}\n"),
    )?;
    let body = std::env::temp_dir().join(format!("pw-{name}-{}.json", std::process::id()));
    std::fs::write(
        &body,
        json!({"password": format!("{name}-secret-pw")}).to_string(),
    )?;
    cloud.kubectl_ok(&[
        "replace",
        "--raw",
        &format!("/apis/identity.stratus.dev/v1/users/{name}/password"),
        "-f",
        body.to_str().unwrap_or_default(),
    ])?;
    let _ = std::fs::remove_file(body);
    Ok(())
}

/// Logs in as `name` with `password`; returns the token.
fn login(cloud: &Cloud, anon: &Path, name: &str, password: &str, ttl: i64) -> Result<String> {
    let body = std::env::temp_dir().join(format!("login-{name}-{}.json", std::process::id()));
    std::fs::write(
        &body,
        json!({"user": name, "password": password, "expirationSeconds": ttl}).to_string(),
    )?;
    let out = cloud.kubectl_as(
        anon,
        &[
            "create",
            "--raw",
            "/apis/identity.stratus.dev/v1/tokens",
            "-f",
            body.to_str().unwrap_or_default(),
        ],
    )?;
    let _ = std::fs::remove_file(body);
    if !out.status.success() {
        bail!("login failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let v: Value = serde_json::from_slice(&out.stdout)?;
    v["token"]
        .as_str()
        .map(String::from)
        .context("no token in the answer")
}

/// `name`, logged in with the password [`user`] gave her.
fn logged_in<'a>(cloud: &'a Cloud, anon: &Path, name: &str) -> Result<As<'a>> {
    let token = login(cloud, anon, name, &format!("{name}-secret-pw"), 600)?;
    Ok(As {
        cloud,
        kc: cloud.kubeconfig_with(name, Some(&token))?,
    })
}

struct As<'a> {
    cloud: &'a Cloud,
    kc: PathBuf,
}

impl As<'_> {
    fn ok(&self, args: &[&str]) -> Result<String> {
        let out = self.cloud.kubectl_as(&self.kc, args)?;
        if !out.status.success() {
            bail!(
                "kubectl {} refused: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn denied(&self, args: &[&str]) -> Result<String> {
        let out = self.cloud.kubectl_as(&self.kc, args)?;
        if out.status.success() {
            bail!(
                "kubectl {} was allowed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stdout)
            );
        }
        Ok(String::from_utf8_lossy(&out.stderr).into_owned())
    }

    fn create(&self, ns: &str, doc: &str) -> Result<std::process::Output> {
        use std::io::Write;
        let mut child = std::process::Command::new("kubectl")
            .env("KUBECONFIG", &self.kc)
            .env("HOME", self.cloud.dir.path())
            .args(["-n", ns, "create", "-f", "-"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()?;
        child
            .stdin
            .take()
            .context("stdin")?
            .write_all(doc.as_bytes())?;
        Ok(child.wait_with_output()?)
    }
}

fn network(name: &str) -> String {
    format!(
        "apiVersion: network.stratus.dev/v1\nkind: Network\nmetadata:\n  name: {name}\nspec: {{}}\n"
    )
}

#[test]
fn roles_isolate_projects_and_tokens_can_be_revoked() -> Result<()> {
    let cloud = Cloud::up()?;
    cloud.projects(&["a", "b"])?;
    user(&cloud, "alice", "member", "a", false)?;
    user(&cloud, "bob", "member", "b", false)?;
    user(&cloud, "rita", "reader", "a", false)?;
    cloud.kubectl_in(
        &["-n", "b", "create", "-f", "-"],
        &network("bobs-secret-net"),
    )?;
    let anon = cloud.kubeconfig_with("anonymous", None)?;

    // Wrong password and unknown user: the same 401.
    let wrong = login(&cloud, &anon, "alice", "not-her-password", 600).expect_err("wrong password");
    let unknown = login(&cloud, &anon, "mallory", "whatever-pw", 600).expect_err("unknown user");
    assert!(
        wrong.to_string().contains("Unauthorized") && unknown.to_string().contains("Unauthorized"),
        "{wrong} / {unknown}"
    );
    // No anonymous access to resources.
    let out = cloud.kubectl_as(&anon, &["get", "flavors"])?;
    assert!(!out.status.success());

    let alice = logged_in(&cloud, &anon, "alice")?;
    let bob = logged_in(&cloud, &anon, "bob")?;
    let rita = logged_in(&cloud, &anon, "rita")?;

    // Metrics are for cluster-wide roles: not for anonymous callers, nor for a project's
    // member.
    let out = cloud.kubectl_as(&anon, &["get", "--raw", "/metrics"])?;
    assert!(!out.status.success());
    let err = alice.denied(&["get", "--raw", "/metrics"])?;
    assert!(
        err.contains("Forbidden") || err.contains("forbidden"),
        "{err}"
    );
    user(&cloud, "olga", "reader", "a", true)?;
    let olga = logged_in(&cloud, &anon, "olga")?;
    assert!(
        olga.ok(&["get", "--raw", "/metrics"])?
            .contains("apiserver_request_total")
    );

    // A member works in her project.
    assert!(alice.create("a", &network("alices-net"))?.status.success());
    alice.ok(&["-n", "a", "get", "networks", "alices-net"])?;
    // (Long enough for the initial events on a loaded machine.)
    let watched = alice.ok(&[
        "get",
        "--raw",
        "/apis/network.stratus.dev/v1/namespaces/a/networks?watch=true&timeoutSeconds=10",
    ])?;
    assert!(watched.contains("alices-net"), "{watched}");
    alice.ok(&["get", "flavors"])?;
    // ...and nowhere else: another project's objects are invisible, by get, list, watch or events.
    for args in [
        vec!["-n", "b", "get", "networks"],
        vec!["-n", "b", "get", "network", "bobs-secret-net"],
        vec!["-n", "b", "get", "events"],
        vec!["get", "networks", "-A"],
        vec![
            "get",
            "--raw",
            "/apis/network.stratus.dev/v1/namespaces/b/networks?watch=true&timeoutSeconds=1",
        ],
    ] {
        let err = alice.denied(&args)?;
        assert!(
            err.contains("Forbidden") || err.contains("forbidden"),
            "{args:?}: {err}"
        );
        assert!(
            !err.contains("bobs-secret-net"),
            "{args:?} leaks a name: {err}"
        );
    }
    assert!(!alice.create("b", &network("intruder"))?.status.success());
    // Members do not set quotas, hand out roles, or change flavors.
    assert!(!alice.create("a", "apiVersion: identity.stratus.dev/v1\nkind: Quota\nmetadata:\n  name: q\nspec:\n  limits: {}\n")?.status.success());
    assert!(!alice.create("a", "apiVersion: identity.stratus.dev/v1\nkind: RoleAssignment\nmetadata:\n  name: up\nspec:\n  user: alice\n  role: admin\n")?.status.success());
    alice.denied(&["delete", "flavor", "anything"])?;
    // kubectl auth can-i asks the server (SelfSubjectAccessReview).
    assert_eq!(
        alice
            .ok(&["auth", "can-i", "create", "networks", "-n", "a"])?
            .trim(),
        "yes"
    );
    // (kubectl prints "no - <the reason>".)
    let out = cloud.kubectl_as(
        &alice.kc,
        &["auth", "can-i", "create", "networks", "-n", "b"],
    )?;
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("no"));
    let out = cloud.kubectl_as(&alice.kc, &["auth", "can-i", "create", "flavors"])?;
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("no"));
    // Every namespaced kind, every verb: nothing in project b for alice; reads in a.
    let kinds = cloud.kubectl_ok(&["api-resources", "--namespaced=true", "-o", "name"])?;
    let kinds: Vec<&str> = kinds
        .lines()
        .filter(|k| k.contains(".stratus.dev"))
        .collect();
    assert!(kinds.len() >= 14, "{kinds:?}");
    let body = std::env::temp_dir().join(format!("matrix-{}.json", std::process::id()));
    std::fs::write(&body, "{}")?;
    let body = body.to_str().unwrap_or_default().to_string();
    for kind in &kinds {
        let (plural, group) = kind.split_once('.').context("kind.group")?;
        let coll = |ns: &str| format!("/apis/{group}/v1/namespaces/{ns}/{plural}");
        // A member lists only her own S3 credentials, by selecting them.
        let own = if plural == "s3credentials" {
            "?fieldSelector=spec.user%3Dalice"
        } else {
            ""
        };
        alice.ok(&["get", "--raw", &format!("{}{own}", coll("a"))])?;
        let (b, one) = (coll("b"), format!("{}/x", coll("b")));
        let watch = format!("{b}?watch=true&timeoutSeconds=1");
        for args in [
            vec!["get", "--raw", b.as_str()],
            vec!["get", "--raw", one.as_str()],
            vec!["get", "--raw", watch.as_str()],
            vec!["create", "--raw", b.as_str(), "-f", body.as_str()],
            vec!["replace", "--raw", one.as_str(), "-f", body.as_str()],
            vec!["delete", "--raw", one.as_str()],
            vec!["delete", "--raw", b.as_str()],
        ] {
            let err = alice.denied(&args)?;
            assert!(err.contains("orbidden"), "{args:?}: {err}");
        }
        let out = cloud.kubectl_as(
            &alice.kc,
            &["-n", "b", "patch", kind, "x", "--type", "merge", "-p", "{}"],
        )?;
        assert!(
            !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("orbidden"),
            "patch {kind}"
        );
    }
    // The others: bob cannot see a; rita reads a but cannot change it.
    bob.denied(&["-n", "a", "get", "networks"])?;
    rita.ok(&["-n", "a", "get", "networks", "alices-net"])?;
    assert!(!rita.create("a", &network("ritas-net"))?.status.success());
    rita.denied(&["-n", "a", "delete", "network", "alices-net"])?;

    // Removing the role assignment takes effect on the next request.
    cloud.kubectl_ok(&["-n", "a", "delete", "roleassignment", "rita-reader"])?;
    rita.denied(&["-n", "a", "get", "networks"])?;
    // Disabling a user stops her tokens at once; enabling restores them.
    cloud.kubectl_ok(&[
        "patch",
        "user",
        "bob",
        "--type",
        "merge",
        "-p",
        r#"{"spec":{"enabled":false}}"#,
    ])?;
    let err = bob.denied(&["-n", "b", "get", "networks"])?;
    assert!(
        err.contains("Unauthorized") || err.contains("provide credentials"),
        "{err}"
    );
    // ...nor can she log in with the right password.
    let refused = login(&cloud, &anon, "bob", "bob-secret-pw", 600).expect_err("disabled login");
    assert!(refused.to_string().contains("Unauthorized"), "{refused}");
    cloud.kubectl_ok(&[
        "patch",
        "user",
        "bob",
        "--type",
        "merge",
        "-p",
        r#"{"spec":{"enabled":true}}"#,
    ])?;
    bob.ok(&["-n", "b", "get", "networks"])?;
    // Logout revokes the token; a new login works.
    bob.ok(&[
        "delete",
        "--raw",
        "/apis/identity.stratus.dev/v1/tokens/self",
    ])?;
    bob.denied(&["-n", "b", "get", "networks"])?;
    // An expired token stops working.
    let short = As {
        cloud: &cloud,
        kc: cloud.kubeconfig_with(
            "short",
            Some(&login(&cloud, &anon, "alice", "alice-secret-pw", 1)?),
        )?,
    };
    std::thread::sleep(Duration::from_millis(2100));
    short.denied(&["-n", "a", "get", "networks"])?;
    // Passwords are never served.
    let u = cloud.kubectl_ok(&["get", "user", "alice", "-o", "json"])?;
    assert!(
        !u.contains("argon2") && !u.contains("alice-secret-pw"),
        "{u}"
    );
    // A user changes her own password (giving the current one), not someone else's.
    let pw = std::env::temp_dir().join(format!("pw-change-{}.json", std::process::id()));
    std::fs::write(&pw, json!({"password": "a-new-password"}).to_string())?;
    let refused = alice.denied(&[
        "replace",
        "--raw",
        "/apis/identity.stratus.dev/v1/users/alice/password",
        "-f",
        pw.to_str().unwrap_or_default(),
    ])?;
    assert!(refused.contains("currentPassword"), "{refused}");
    std::fs::write(
        &pw,
        json!({"password": "a-new-password", "currentPassword": "alice-secret-pw"}).to_string(),
    )?;
    alice.ok(&[
        "replace",
        "--raw",
        "/apis/identity.stratus.dev/v1/users/alice/password",
        "-f",
        pw.to_str().unwrap_or_default(),
    ])?;
    alice.denied(&[
        "replace",
        "--raw",
        "/apis/identity.stratus.dev/v1/users/bob/password",
        "-f",
        pw.to_str().unwrap_or_default(),
    ])?;
    let _ = std::fs::remove_file(pw);
    login(&cloud, &anon, "alice", "a-new-password", 60)?;
    // `stratus login` adds a context kubectl uses as is.
    let kc = cloud.dir.path().join("kubeconfig-login");
    std::fs::copy(cloud.kubeconfig(), &kc)?;
    let out = std::process::Command::new(stratus_e2e::stratus_bin())
        .args(["login", "--user", "alice", "--project", "a", "--kubeconfig"])
        .arg(&kc)
        .env("STRATUS_PASSWORD", "a-new-password")
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let logged = As { cloud: &cloud, kc };
    assert!(
        logged
            .ok(&["get", "networks", "-o", "name"])?
            .contains("alices-net"),
        "the context's project is not a"
    );
    logged.denied(&["-n", "b", "get", "networks"])?;
    let bad = std::process::Command::new(stratus_e2e::stratus_bin())
        .args(["login", "--user", "alice", "--kubeconfig"])
        .arg(cloud.dir.path().join("kubeconfig-login"))
        .env("STRATUS_PASSWORD", "wrong-password")
        .output()?;
    assert!(
        !bad.status.success()
            && String::from_utf8_lossy(&bad.stderr).contains("wrong user name or password")
    );
    // `stratus up` made the admin user, a cluster admin, with its password in the data dir.
    let admin_pw = std::fs::read_to_string(cloud.dir.path().join("admin-password"))?;
    let kc = cloud.dir.path().join("kubeconfig-admin");
    std::fs::copy(cloud.kubeconfig(), &kc)?;
    let out = std::process::Command::new(stratus_e2e::stratus_bin())
        .args(["login", "--user", "admin", "--kubeconfig"])
        .arg(&kc)
        .env("STRATUS_PASSWORD", admin_pw.trim())
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let admin = As { cloud: &cloud, kc };
    let networks = admin.ok(&["get", "networks", "-A", "-o", "name"])?;
    assert!(
        networks.contains("bobs-secret-net") && networks.contains("alices-net"),
        "{networks}"
    );
    admin.ok(&["auth", "can-i", "create", "flavors"])?;
    Ok(())
}

#[test]
fn a_node_reads_and_writes_only_what_is_placed_on_it() -> Result<()> {
    let mut cloud = Cloud::up()?;
    cloud.projects(&["demo"])?;
    // Node identities come from the API server's token file.
    cloud.add_token("node-1-token-0123456789", "system:node:node-1")?;
    cloud.kubectl_ok(&[
        "apply",
        "-f",
        stratus_e2e::repo_root()
            .join("examples/server.yaml")
            .to_str()
            .unwrap_or_default(),
    ])?;
    cloud.kubectl_ok(&[
        "apply",
        "-f",
        stratus_e2e::repo_root()
            .join("examples/flavors.yaml")
            .to_str()
            .unwrap_or_default(),
    ])?;
    for (server, node) in [("web-1", "node-1"), ("web-2", "node-2")] {
        cloud.place("demo", server, node)?;
    }
    let node = As {
        cloud: &cloud,
        kc: cloud.kubeconfig_with("node-1", Some("node-1-token-0123456789"))?,
    };
    // Reads: the servers placed on it (their user data is theirs), by selector or by name;
    // a keypair only when one of its servers uses it.
    let mine = node.ok(&[
        "get",
        "servers",
        "-A",
        "--field-selector",
        "status.hypervisor=node-1",
        "-o",
        "name",
    ])?;
    assert_eq!(mine.trim(), "server.compute.stratus.dev/web-1", "{mine}");
    // It reads a server placed on it as it is stored (the object its access was checked on).
    let fields = [
        "-n",
        "demo",
        "get",
        "server",
        "web-1",
        "-o",
        "jsonpath={.metadata.name} {.metadata.resourceVersion} {.status.hypervisor}",
    ];
    assert_eq!(node.ok(&fields)?, cloud.kubectl_ok(&fields)?);
    let why = node.denied(&["-n", "demo", "get", "servers"])?;
    assert!(why.contains("status.hypervisor=node-1"), "{why}");
    node.denied(&["-n", "demo", "get", "server", "web-2"])?;
    node.denied(&[
        "get",
        "servers",
        "-A",
        "--field-selector",
        "status.hypervisor=node-2",
    ])?;
    node.ok(&["-n", "demo", "get", "keypair", "demo-key"])?;
    cloud.kubectl_in(
        &["apply", "-f", "-"],
        "apiVersion: compute.stratus.dev/v1\nkind: Keypair\nmetadata:\n  name: unused\n  namespace: demo\nspec:\n  publicKey: ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIIAE4COqXr5at+NWW12Pky2bcpuhb0DP+OskDhJRD6a1 x@y\n",
    )?;
    node.denied(&["-n", "demo", "get", "keypair", "unused"])?;
    node.denied(&["-n", "demo", "get", "keypairs"])?;
    // Flavors: those of its servers, by name (no catalogue).
    node.ok(&["get", "flavor", "m1.nano"])?;
    node.denied(&["get", "flavors"])?;
    // Metrics are not a node's to read.
    node.denied(&["get", "--raw", "/metrics"])?;
    // Images: those its servers boot from (kernel and ramdisk included) and public ones.
    for image in [
        "cirros-0.6.2",
        "cirros-0.6.2-kernel",
        "cirros-0.6.2-initramfs",
    ] {
        node.ok(&["-n", "demo", "get", "image", image])?;
    }
    cloud.kubectl_in(
        &["apply", "-f", "-"],
        "apiVersion: image.stratus.dev/v1\nkind: Image\nmetadata:\n  name: private-unused\n  namespace: demo\nspec:\n  diskFormat: qcow2\n  source:\n    url: http://example.invalid/x.qcow2\n",
    )?;
    node.denied(&["-n", "demo", "get", "image", "private-unused"])?;
    node.denied(&["-n", "demo", "get", "images"])?;
    node.ok(&[
        "get",
        "images",
        "-A",
        "--field-selector",
        "spec.visibility=public",
    ])?;
    // Its own server's status: yes; the other node's, the spec, or moving a server away: no.
    node.ok(&[
        "-n",
        "demo",
        "patch",
        "server",
        "web-1",
        "--subresource=status",
        "--type",
        "merge",
        "-p",
        r#"{"status":{"phase":"Running"}}"#,
    ])?;
    node.denied(&[
        "-n",
        "demo",
        "patch",
        "server",
        "web-2",
        "--subresource=status",
        "--type",
        "merge",
        "-p",
        r#"{"status":{"phase":"Running"}}"#,
    ])?;
    node.denied(&[
        "-n",
        "demo",
        "patch",
        "server",
        "web-1",
        "--type",
        "merge",
        "-p",
        r#"{"spec":{"flavor":"m1.large"}}"#,
    ])?;
    node.denied(&[
        "-n",
        "demo",
        "patch",
        "server",
        "web-1",
        "--subresource=status",
        "--type",
        "merge",
        "-p",
        r#"{"status":{"hypervisor":"node-2"}}"#,
    ])?;
    node.denied(&["-n", "demo", "delete", "server", "web-1"])?;
    // Its own Hypervisor (registered again after an operator deleted it): yes; another
    // node's: no.
    cloud.kubectl_ok(&["delete", "hypervisor", "node-1"])?;
    let hv = |n: &str| {
        format!(
            "apiVersion: compute.stratus.dev/v1\nkind: Hypervisor\nmetadata:\n  name: {n}\nspec:\n  hypervisorType: qemu\n"
        )
    };
    assert!(node.create("default", &hv("node-1"))?.status.success());
    assert!(!node.create("default", &hv("node-3"))?.status.success());
    // Events: it reports its own (reporting instance: the node), reads none, and cannot
    // report as another node or change an event another reporter wrote.
    let event = |name: &str, instance: &str| {
        format!(
            "apiVersion: events.k8s.io/v1\nkind: Event\nmetadata:\n  name: {name}\neventTime: \"2026-01-01T00:00:00.000000Z\"\nreportingController: stratus-compute-agent\nreportingInstance: {instance}\naction: Reconcile\nreason: Started\ntype: Normal\nnote: guest started\nregarding:\n  apiVersion: compute.stratus.dev/v1\n  kind: Server\n  name: web-1\n  namespace: demo\n"
        )
    };
    let created = node.create("demo", &event("web-1.started", "node-1"))?;
    assert!(
        created.status.success(),
        "{}",
        String::from_utf8_lossy(&created.stderr)
    );
    let forged = node.create("demo", &event("web-2.started", "node-2"))?;
    assert!(!forged.status.success());
    assert!(
        String::from_utf8_lossy(&forged.stderr).contains("Forbidden"),
        "{}",
        String::from_utf8_lossy(&forged.stderr)
    );
    cloud.kubectl_in(
        &["-n", "demo", "create", "-f", "-"],
        &event("web-2.moved", "node-2"),
    )?;
    node.denied(&[
        "-n",
        "demo",
        "patch",
        "events.events.k8s.io",
        "web-2.moved",
        "--type",
        "merge",
        "-p",
        r#"{"reportingInstance":"node-1","note":"hijacked"}"#,
    ])?;
    node.ok(&[
        "-n",
        "demo",
        "patch",
        "events.events.k8s.io",
        "web-1.started",
        "--type",
        "merge",
        "-p",
        r#"{"note":"guest started again"}"#,
    ])?;
    let why = node.denied(&["-n", "demo", "get", "events"])?;
    assert!(why.contains("only the events it reported"), "{why}");
    node.denied(&["get", "events.events.k8s.io", "-A"])?;
    node.denied(&["-n", "demo", "get", "events.events.k8s.io", "web-2.moved"])?;
    Ok(())
}
