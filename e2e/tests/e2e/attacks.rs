//! Attacks on a running cloud, each made as its attacker (a node with its token, a project
//! admin or member logged in) with kubectl and curl: each must fail with a clear 4xx and leave
//! nothing changed (the objects are read back).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use stratus_e2e::Cloud;

/// An HTTP answer: status code and body.
struct Answer {
    code: u16,
    body: String,
}

/// Requests to a cloud with one bearer token, through curl.
struct Curl<'a> {
    cloud: &'a Cloud,
    token: String,
}

impl Curl<'_> {
    /// `METHOD path` with `body` of `content_type`.
    fn send(&self, method: &str, path: &str, content_type: &str, body: &str) -> Result<Answer> {
        let ca = self.cloud.dir.path().join("pki/ca.crt");
        // From a file: a body can be larger than one command-line argument may be.
        let file = tempfile::NamedTempFile::new()?;
        std::fs::write(file.path(), body)?;
        let out = Command::new("curl")
            .args(["-sS", "--max-time", "60", "--cacert"])
            .arg(&ca)
            .args(["-X", method, "-H"])
            .arg(format!("Authorization: Bearer {}", self.token))
            .args(["-H", &format!("Content-Type: {content_type}")])
            .arg("--data-binary")
            .arg(format!("@{}", file.path().display()))
            .args(["-w", "\n%{http_code}"])
            .arg(format!("{}{path}", self.cloud.url))
            .output()
            .context("run curl")?;
        if !out.status.success() {
            bail!(
                "curl {method} {path}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').context("no status code")?;
        Ok(Answer {
            code: code.trim().parse().context("status code")?,
            body: body.to_string(),
        })
    }

    /// Asserts a request is refused with `code`, its Status body naming `says`.
    fn refused(
        &self,
        method: &str,
        path: &str,
        content_type: &str,
        body: &str,
        code: u16,
        says: &str,
    ) -> Result<Answer> {
        let a = self.send(method, path, content_type, body)?;
        if a.code != code || !a.body.contains(says) {
            bail!(
                "{method} {path} answered {} (wanted {code} saying {says:?}): {}",
                a.code,
                a.body
            );
        }
        Ok(a)
    }
}

/// The token-file token of `user`.
fn file_token(cloud: &Cloud, user: &str) -> Result<String> {
    let text = std::fs::read_to_string(cloud.dir.path().join("tokens.csv"))?;
    text.lines()
        .filter_map(|l| l.split_once(','))
        .find(|(_, u)| u.trim() == user)
        .map(|(t, _)| t.trim().to_string())
        .with_context(|| format!("no token for {user}"))
}

/// Runs kubectl with `kubeconfig`; its output when it fails, an error when it succeeds.
fn kubectl_refused(cloud: &Cloud, kubeconfig: &Path, args: &[&str], says: &str) -> Result<()> {
    let out = cloud.kubectl_as(kubeconfig, args)?;
    let err = String::from_utf8_lossy(&out.stderr);
    if out.status.success() || !err.contains(says) {
        bail!(
            "kubectl {} (wanted a refusal saying {says:?}): {}{err}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout)
        );
    }
    Ok(())
}

/// An object as the admin reads it, as JSON.
fn read(cloud: &Cloud, args: &[&str]) -> Result<Value> {
    let mut all = args.to_vec();
    all.extend(["-o", "json"]);
    Ok(serde_json::from_str(&cloud.kubectl_ok(&all)?)?)
}

/// Creates user `name` with password `NAME-secret-pw` and `role` in `project`.
fn user(cloud: &Cloud, name: &str, role: &str, project: &str) -> Result<()> {
    cloud.kubectl_in(
        &["apply", "-f", "-"],
        &format!("apiVersion: identity.stratus.dev/v1\nkind: User\nmetadata:\n  name: {name}\nspec:\n  enabled: true\n---\napiVersion: identity.stratus.dev/v1\nkind: RoleAssignment\nmetadata:\n  name: {name}-{role}\n  namespace: {project}\nspec:\n  user: {name}\n  role: {role}\n"),
    )?;
    let admin = Curl {
        cloud,
        token: file_token(cloud, "system:admin")?,
    };
    let set = admin.send(
        "PUT",
        &format!("/apis/identity.stratus.dev/v1/users/{name}/password"),
        "application/json",
        &json!({"password": format!("{name}-secret-pw")}).to_string(),
    )?;
    if set.code != 200 {
        bail!("set {name}'s password: {} {}", set.code, set.body);
    }
    Ok(())
}

/// Logs in as `name`: the token, or the refusal's status code.
fn login(cloud: &Cloud, name: &str, password: &str) -> Result<Result<String, u16>> {
    let anon = Curl {
        cloud,
        token: "anonymous".into(),
    };
    let a = anon.send(
        "POST",
        "/apis/identity.stratus.dev/v1/tokens",
        "application/json",
        &json!({"user": name, "password": password}).to_string(),
    )?;
    if a.code != 201 {
        return Ok(Err(a.code));
    }
    let v: Value = serde_json::from_str(&a.body)?;
    Ok(Ok(v["token"].as_str().context("no token")?.to_string()))
}

/// A kubeconfig and a curl for user `name`, logged in.
fn logged_in<'a>(cloud: &'a Cloud, name: &str) -> Result<(PathBuf, Curl<'a>)> {
    let token = login(cloud, name, &format!("{name}-secret-pw"))?
        .map_err(|code| anyhow::anyhow!("login of {name}: {code}"))?;
    Ok((
        cloud.kubeconfig_with(name, Some(&token))?,
        Curl { cloud, token },
    ))
}

const LEASES: &str = "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases";

fn lease(name: &str, renew: &str) -> String {
    format!(
        "apiVersion: coordination.k8s.io/v1\nkind: Lease\nmetadata:\n  name: {name}\n  namespace: kube-node-lease\nspec:\n  holderIdentity: {name}\n  leaseDurationSeconds: 40\n  renewTime: \"{renew}\"\n"
    )
}

#[test]
fn a_node_stays_a_node() -> Result<()> {
    let cloud = Cloud::up_with(&["--nodes", "a,b"])?;
    let node_a = cloud.dir.path().join("node-a.kubeconfig");
    let a = Curl {
        cloud: &cloud,
        token: file_token(&cloud, "system:node:a")?,
    };
    let b = Curl {
        cloud: &cloud,
        token: file_token(&cloud, "system:node:b")?,
    };
    cloud.projects(&["demo"])?;
    user(&cloud, "boss", "admin", "demo")?;

    // (a) A node sets a user's password: refused, and the old password still works.
    a.refused(
        "PUT",
        "/apis/identity.stratus.dev/v1/users/boss/password",
        "application/json",
        r#"{"password": "owned-by-node-a"}"#,
        403,
        "Forbidden",
    )?;
    assert_eq!(login(&cloud, "boss", "owned-by-node-a")?, Err(401));
    login(&cloud, "boss", "boss-secret-pw")?
        .map_err(|c| anyhow::anyhow!("the old password: {c}"))?;
    // Nor reads users, role assignments or quotas, or grants itself a role.
    for what in ["users", "roleassignments -A", "quotas -A", "networks -A"] {
        let mut args = vec!["get"];
        args.extend(what.split(' '));
        kubectl_refused(&cloud, &node_a, &args, "Forbidden")?;
    }
    let grant = "apiVersion: identity.stratus.dev/v1\nkind: RoleAssignment\nmetadata:\n  name: a-admin\n  namespace: demo\nspec:\n  user: system:node:a\n  role: admin\n  clusterWide: true\n";
    a.refused(
        "POST",
        "/apis/identity.stratus.dev/v1/namespaces/demo/roleassignments",
        "application/yaml",
        grant,
        403,
        "Forbidden",
    )?;
    cloud.kubectl_err(&["-n", "demo", "get", "roleassignment", "a-admin"])?;

    // (d) Node b's own Lease, then node a's attempts on it.
    let b_lease = lease("b", "2030-01-01T00:00:00.000000Z");
    let made = b.send(
        "PATCH",
        &format!("{LEASES}/b?fieldManager=agent&force=true"),
        "application/apply-patch+yaml",
        &b_lease,
    )?;
    assert_eq!(made.code, 201, "{}", made.body);
    let before = read(&cloud, &["-n", "kube-node-lease", "get", "lease", "b"])?;
    // DELETE .../leases/b with a body naming a.
    a.refused(
        "DELETE",
        &format!("{LEASES}/b"),
        "application/json",
        r#"{"kind":"DeleteOptions","apiVersion":"v1","metadata":{"name":"a"}}"#,
        403,
        "Forbidden",
    )?;
    // Apply to .../leases/a with a body naming b (and a renewal in 2000).
    let stale = lease("b", "2000-01-01T00:00:00.000000Z");
    a.refused(
        "PATCH",
        &format!("{LEASES}/a?fieldManager=agent&force=true"),
        "application/apply-patch+yaml",
        &stale,
        400,
        "metadata.name",
    )?;
    // The same lease in every content type, at b's own path.
    for (method, ct, body) in [
        ("PATCH", "application/apply-patch+yaml", stale.clone()),
        (
            "PATCH",
            "application/merge-patch+json",
            r#"{"spec":{"renewTime":"2000-01-01T00:00:00.000000Z"}}"#.into(),
        ),
        (
            "PATCH",
            "application/strategic-merge-patch+json",
            r#"{"spec":{"renewTime":"2000-01-01T00:00:00.000000Z"}}"#.into(),
        ),
        (
            "PATCH",
            "application/json-patch+json",
            r#"[{"op":"replace","path":"/spec/renew\u0054ime","value":"2000-01-01T00:00:00.000000Z"}]"#
                .into(),
        ),
        ("PUT", "application/yaml", stale.clone()),
    ] {
        a.refused(
            method,
            &format!("{LEASES}/b?fieldManager=agent&force=true"),
            ct,
            &body,
            403,
            "Forbidden",
        )?;
    }
    // A create of b's lease by a, in YAML, and a server-side apply with kubectl.
    a.refused("POST", LEASES, "application/yaml", &stale, 403, "Forbidden")?;
    let file = cloud.dir.path().join("lease-b.yaml");
    std::fs::write(&file, &stale)?;
    kubectl_refused(
        &cloud,
        &node_a,
        &[
            "apply",
            "--server-side",
            "--force-conflicts",
            "-f",
            file.to_str().unwrap_or_default(),
        ],
        "Forbidden",
    )?;
    assert_eq!(
        read(&cloud, &["-n", "kube-node-lease", "get", "lease", "b"])?,
        before,
        "node b's lease unchanged"
    );
    cloud.kubectl_err(&["-n", "kube-node-lease", "get", "lease", "a"])?;
    // Its own lease it may renew.
    let own = a.send(
        "PATCH",
        &format!("{LEASES}/a?fieldManager=agent&force=true"),
        "application/apply-patch+yaml",
        &lease("a", "2030-01-01T00:00:00.000000Z"),
    )?;
    assert_eq!(own.code, 201, "{}", own.body);
    // And reads other nodes' objects nowhere.
    kubectl_refused(
        &cloud,
        &node_a,
        &["-n", "kube-node-lease", "get", "lease", "b"],
        "Forbidden",
    )?;
    Ok(())
}

#[test]
fn a_project_admin_stays_in_its_project() -> Result<()> {
    let cloud = Cloud::up()?;
    cloud.projects(&["demo", "other"])?;
    user(&cloud, "pat", "admin", "demo")?;
    let (kc, pat) = logged_in(&cloud, "pat")?;
    kubectl_refused(&cloud, &kc, &["get", "hypervisors"], "Forbidden")?;
    // (Its status is the controller's, and may change meanwhile.)
    let spec = || -> Result<Value> {
        Ok(read(
            &cloud,
            &["-n", "demo", "get", "roleassignment", "pat-admin"],
        )?["spec"]
            .clone())
    };
    let before = spec()?;
    // (b) The attack as reported, with kubectl and with curl, and its variants.
    kubectl_refused(
        &cloud,
        &kc,
        &[
            "-n",
            "demo",
            "patch",
            "roleassignment",
            "pat-admin",
            "--type",
            "json",
            "-p",
            r#"[{"op":"add","path":"/spec/cluster\u0057ide","value":true}]"#,
        ],
        "Forbidden",
    )?;
    let path = "/apis/identity.stratus.dev/v1/namespaces/demo/roleassignments/pat-admin";
    let wide = "apiVersion: identity.stratus.dev/v1\nkind: RoleAssignment\nmetadata:\n  name: pat-admin\n  namespace: demo\nspec:\n  user: pat\n  role: admin\n  \"cluster\\x57ide\": true\n";
    for (method, ct, body) in [
        (
            "PATCH",
            "application/json-patch+json",
            r#"[{"op":"add","path":"/spec/cluster\u0057ide","value":true}]"#.to_string(),
        ),
        (
            "PATCH",
            "application/merge-patch+json",
            r#"{"spec":{"cluster\u0057ide":true}}"#.into(),
        ),
        ("PATCH", "application/apply-patch+yaml", wide.into()),
    ] {
        pat.refused(
            method,
            &format!("{path}?fieldManager=pat&force=true"),
            ct,
            &body,
            403,
            "cluster-wide",
        )?;
    }
    // A new cluster-wide assignment in YAML, and one in another project.
    pat.refused(
        "POST",
        "/apis/identity.stratus.dev/v1/namespaces/demo/roleassignments",
        "application/yaml",
        &wide.replace("pat-admin", "pat-wide"),
        403,
        "cluster-wide",
    )?;
    pat.refused(
        "POST",
        "/apis/identity.stratus.dev/v1/namespaces/other/roleassignments",
        "application/yaml",
        "apiVersion: identity.stratus.dev/v1\nkind: RoleAssignment\nmetadata:\n  name: pat-other\n  namespace: other\nspec:\n  user: pat\n  role: admin\n",
        403,
        "Forbidden",
    )?;
    // Path and body disagreeing on the namespace.
    pat.refused(
        "POST",
        "/apis/identity.stratus.dev/v1/namespaces/demo/roleassignments",
        "application/yaml",
        "apiVersion: identity.stratus.dev/v1\nkind: RoleAssignment\nmetadata:\n  name: pat-other\n  namespace: other\nspec:\n  user: pat\n  role: admin\n",
        400,
        "metadata.namespace",
    )?;
    assert_eq!(spec()?, before, "unchanged");
    assert!(
        before.get("clusterWide").is_none_or(|w| w == false),
        "{before}"
    );
    cloud.kubectl_err(&["-n", "demo", "get", "roleassignment", "pat-wide"])?;
    cloud.kubectl_err(&["-n", "other", "get", "roleassignment", "pat-other"])?;
    // A fresh token reads no hypervisors either.
    let (kc, _) = logged_in(&cloud, "pat")?;
    kubectl_refused(&cloud, &kc, &["get", "hypervisors"], "Forbidden")?;
    Ok(())
}

#[test]
fn a_json_patch_bomb_is_refused_at_once() -> Result<()> {
    let cloud = Cloud::up()?;
    cloud.projects(&["demo"])?;
    user(&cloud, "mem", "member", "demo")?;
    let (_, mem) = logged_in(&cloud, "mem")?;
    cloud.kubectl_in(
        &["apply", "-f", "-"],
        "apiVersion: compute.stratus.dev/v1\nkind: Keypair\nmetadata:\n  name: k\n  namespace: demo\nspec:\n  publicKey: ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIIAE4COqXr5at+NWW12Pky2bcpuhb0DP+OskDhJRD6a1 x@y\n",
    )?;
    let before = read(&cloud, &["-n", "demo", "get", "keypair", "k"])?;
    let path = "/apis/compute.stratus.dev/v1/namespaces/demo/keypairs/k";
    // (c) 20 copies of /metadata into itself: 2^20 times its size if nothing stopped it.
    let ops: Vec<Value> = (0..20)
        .map(|i| json!({"op": "copy", "from": "/metadata", "path": format!("/metadata/annotations/c{i}")}))
        .collect();
    let started = Instant::now();
    mem.refused(
        "PATCH",
        path,
        "application/json-patch+json",
        &Value::Array(ops).to_string(),
        413,
        "larger than the limit",
    )?;
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
    // More operations than allowed.
    let many: Vec<Value> = (0..10_001)
        .map(|_| json!({"op": "test", "path": "/kind", "value": "Keypair"}))
        .collect();
    mem.refused(
        "PATCH",
        path,
        "application/json-patch+json",
        &Value::Array(many).to_string(),
        413,
        "10000",
    )?;
    assert_eq!(
        read(&cloud, &["-n", "demo", "get", "keypair", "k"])?,
        before
    );
    // The server is still answering at once.
    let started = Instant::now();
    cloud.kubectl_ok(&["get", "flavors"])?;
    assert!(started.elapsed() < Duration::from_secs(5));
    Ok(())
}

/// The objects of `kind` in the network group, as YAML: `(namespace, name, spec)` each.
fn network_objects(kind: &str, objects: &[(&str, &str, Value)]) -> String {
    objects
        .iter()
        .map(|(ns, name, spec)| {
            format!(
                "apiVersion: network.stratus.dev/v1\nkind: {kind}\nmetadata:\n  name: {name}\n  namespace: {ns}\nspec: {spec}\n"
            )
        })
        .collect::<Vec<_>>()
        .join("---\n")
}

#[test]
fn a_node_reaches_only_the_networks_of_its_own_ports() -> Result<()> {
    let cloud = Cloud::up_with(&["--nodes", "a,b"])?;
    let node_a = cloud.dir.path().join("node-a.kubeconfig");
    let a = Curl {
        cloud: &cloud,
        token: file_token(&cloud, "system:node:a")?,
    };
    cloud.projects(&["demo", "other"])?;
    // demo: network `net` with port `pa` on node a and `pb` on node b; `lonely` with `pl` on
    // node b. other (another tenant): network `net` with `po` on node b.
    let mut yaml = vec![
        network_objects(
            "Network",
            &[
                ("demo", "net", json!({})),
                ("demo", "lonely", json!({})),
                ("other", "net", json!({})),
            ],
        ),
        network_objects(
            "Subnet",
            &[
                (
                    "demo",
                    "net-sub",
                    json!({"network": "net", "cidr": "10.0.0.0/24"}),
                ),
                (
                    "demo",
                    "lonely-sub",
                    json!({"network": "lonely", "cidr": "10.0.1.0/24"}),
                ),
                (
                    "other",
                    "net-sub",
                    json!({"network": "net", "cidr": "10.9.0.0/24"}),
                ),
            ],
        ),
    ];
    let ports = [
        ("demo", "pa", "net", "a"),
        ("demo", "pb", "net", "b"),
        ("demo", "pl", "lonely", "b"),
        ("other", "po", "net", "b"),
    ];
    yaml.push(network_objects(
        "Port",
        &ports
            .iter()
            .map(|(ns, p, net, _)| (*ns, *p, json!({"network": net})))
            .collect::<Vec<_>>(),
    ));
    // Each project's `default` group is the controllers' to make.
    for ns in ["demo", "other"] {
        cloud.default_group_made(ns)?;
    }
    for doc in yaml {
        cloud.kubectl_in(&["apply", "-f", "-"], &doc)?;
    }
    for (ns, port, _, node) in ports {
        cloud.kubectl_ok(&[
            "-n",
            ns,
            "patch",
            "port",
            port,
            "--subresource=status",
            "--type",
            "merge",
            "-p",
            &json!({"status": {"phase": "Down", "hypervisor": node, "boundTo": "web"}}).to_string(),
        ])?;
    }

    // What node a's network agent needs: its ports, their network's ports, subnets and
    // groups, every hypervisor.
    let mine = cloud.kubectl_as(
        &node_a,
        &[
            "get",
            "ports",
            "-A",
            "--field-selector",
            "status.hypervisor=a",
            "-o",
            "name",
        ],
    )?;
    assert!(
        mine.status.success(),
        "{}",
        String::from_utf8_lossy(&mine.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&mine.stdout).trim(),
        "port.network.stratus.dev/pa"
    );
    for args in [
        vec!["-n", "demo", "get", "port", "pb"],
        vec![
            "-n",
            "demo",
            "get",
            "ports",
            "--field-selector",
            "spec.network=net",
        ],
        vec!["-n", "demo", "get", "network", "net"],
        vec!["-n", "demo", "get", "subnet", "net-sub"],
        vec!["-n", "demo", "get", "securitygroup", "default"],
        vec!["get", "hypervisors"],
    ] {
        let out = cloud.kubectl_as(&node_a, &args)?;
        assert!(
            out.status.success(),
            "{}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Node b's tenants' networks and ports, and every list that is not of its graph.
    for args in [
        vec!["-n", "other", "get", "port", "po"],
        vec!["-n", "other", "get", "network", "net"],
        vec!["-n", "other", "get", "subnet", "net-sub"],
        vec!["-n", "other", "get", "securitygroup", "default"],
        vec![
            "-n",
            "other",
            "get",
            "ports",
            "--field-selector",
            "spec.network=net",
        ],
        vec!["-n", "demo", "get", "port", "pl"],
        vec!["-n", "demo", "get", "network", "lonely"],
        vec![
            "-n",
            "demo",
            "get",
            "ports",
            "--field-selector",
            "spec.network=lonely",
        ],
        vec!["get", "ports", "-A"],
        vec![
            "get",
            "ports",
            "-A",
            "--field-selector",
            "status.hypervisor=b",
        ],
        vec!["get", "networks", "-A"],
        vec!["-n", "demo", "get", "subnets"],
    ] {
        kubectl_refused(&cloud, &node_a, &args, "Forbidden")?;
    }
    let watch = a.send(
        "GET",
        "/apis/network.stratus.dev/v1/ports?watch=true&timeoutSeconds=1",
        "application/json",
        "",
    )?;
    assert_eq!(watch.code, 403, "{}", watch.body);

    // Another node's port's status: refused in every content type, and unchanged.
    let pb_path = "/apis/network.stratus.dev/v1/namespaces/demo/ports/pb/status";
    let pb_before = read(&cloud, &["-n", "demo", "get", "port", "pb"])?;
    for (ct, body) in [
        ("application/merge-patch+json", r#"{"status":{"phase":"Active"}}"#.to_string()),
        (
            "application/json-patch+json",
            r#"[{"op":"replace","path":"/status/hyperv\u0069sor","value":"a"}]"#.into(),
        ),
        (
            "application/apply-patch+yaml",
            "apiVersion: network.stratus.dev/v1\nkind: Port\nmetadata:\n  name: pb\n  namespace: demo\nstatus:\n  phase: Active\n".into(),
        ),
    ] {
        a.refused(
            "PATCH",
            &format!("{pb_path}?fieldManager=agent&force=true"),
            ct,
            &body,
            403,
            "Forbidden",
        )?;
    }
    assert_eq!(
        read(&cloud, &["-n", "demo", "get", "port", "pb"])?,
        pb_before
    );

    // Its own port's addresses, placement and binding: refused, and unchanged.
    let pa_path = "/apis/network.stratus.dev/v1/namespaces/demo/ports/pa/status";
    let pa_before = read(&cloud, &["-n", "demo", "get", "port", "pa"])?;
    // Addresses other than those allocation gave it (which picks at random): a patch to what
    // it already has would change nothing.
    let other = |given: Option<&str>, a: &'static str, b: &'static str| {
        if given == Some(a) { b } else { a }
    };
    let mac = other(
        pa_before
            .pointer("/status/macAddress")
            .and_then(Value::as_str),
        "fa:16:3e:00:00:99",
        "fa:16:3e:00:00:98",
    );
    let ip = other(
        pa_before
            .pointer("/status/fixedIPs/0/ipAddress")
            .and_then(Value::as_str),
        "10.0.0.99",
        "10.0.0.98",
    );
    let mac_patch = json!({"status": {"macAddress": mac}}).to_string();
    let ip_patch = json!([{"op": "add", "path": "/status/fixedIPs",
        "value": [{"subnet": "net-sub", "ipAddress": ip}]}])
    .to_string();
    for (ct, body, says) in [
        (
            "application/merge-patch+json",
            mac_patch.as_str(),
            "status.macAddress",
        ),
        (
            "application/json-patch+json",
            ip_patch.as_str(),
            "status.fixedIPs",
        ),
        (
            "application/merge-patch+json",
            r#"{"status":{"boundTo":"db"}}"#,
            "status.boundTo",
        ),
        (
            "application/json-patch+json",
            r#"[{"op":"copy","from":"/status/boundTo","path":"/status/hypervisor"}]"#,
            "Forbidden",
        ),
    ] {
        a.refused("PATCH", pa_path, ct, body, 403, says)?;
    }
    assert_eq!(
        read(&cloud, &["-n", "demo", "get", "port", "pa"])?,
        pa_before
    );
    // Its own port's phase it reports.
    let up = a.send(
        "PATCH",
        pa_path,
        "application/merge-patch+json",
        r#"{"status":{"phase":"Active"}}"#,
    )?;
    assert_eq!(up.code, 200, "{}", up.body);
    Ok(())
}

#[test]
fn a_node_neither_registers_beyond_its_place_nor_removes_itself_nor_others_finalizers() -> Result<()>
{
    let cloud = Cloud::up_with(&["--nodes", "a"])?;
    let node_a = cloud.dir.path().join("node-a.kubeconfig");
    let a = Curl {
        cloud: &cloud,
        token: file_token(&cloud, "system:node:a")?,
    };
    let hvs = "/apis/compute.stratus.dev/v1/hypervisors";
    // Registering with room for far more than the node holds, or labelled: refused.
    for (ct, body, says) in [
        (
            "application/json",
            r#"{"apiVersion":"compute.stratus.dev/v1","kind":"Hypervisor","metadata":{"name":"a"},"spec":{"cpuAllocationRatio":1000}}"#,
            "spec.cpuAllocationRatio",
        ),
        (
            "application/yaml",
            "apiVersion: compute.stratus.dev/v1\nkind: Hypervisor\nmetadata:\n  name: a\nspec:\n  reservedHostMemoryMiB: 0\n",
            "spec.reservedHostMemoryMiB",
        ),
        (
            "application/json",
            r#"{"apiVersion":"compute.stratus.dev/v1","kind":"Hypervisor","metadata":{"name":"a","labels":{"node-restriction.stratus.dev/tier":"secure"}},"spec":{}}"#,
            "metadata.labels",
        ),
    ] {
        a.refused("POST", hvs, ct, body, 403, says)?;
        cloud.kubectl_err(&["get", "hypervisor", "a"])?;
    }
    // What the agent registers.
    let made = a.send(
        "POST",
        hvs,
        "application/yaml",
        "apiVersion: compute.stratus.dev/v1\nkind: Hypervisor\nmetadata:\n  name: a\nspec:\n  availabilityZone: az1\n  hypervisorType: qemu\n",
    )?;
    assert_eq!(made.code, 201, "{}", made.body);
    let before = read(&cloud, &["get", "hypervisor", "a"])?;
    kubectl_refused(
        &cloud,
        &node_a,
        &["delete", "hypervisor", "a"],
        "decommission",
    )?;
    a.refused(
        "DELETE",
        &format!("{hvs}/a"),
        "application/json",
        "",
        403,
        "decommission",
    )?;
    a.refused(
        "PATCH",
        &format!("{hvs}/a"),
        "application/merge-patch+json",
        r#"{"spec":{"disabled":false,"cpuAllocationRatio":64}}"#,
        403,
        "Forbidden",
    )?;
    assert_eq!(read(&cloud, &["get", "hypervisor", "a"])?, before);
    // Its status it reports.
    let capacity = a.send(
        "PATCH",
        &format!("{hvs}/a/status"),
        "application/merge-patch+json",
        r#"{"status":{"capacity":{"vcpus":4,"ramMiB":4096,"diskGiB":100}}}"#,
    )?;
    assert_eq!(capacity.code, 200, "{}", capacity.body);

    // A server placed on node a, holding another component's finalizer besides the agent's.
    cloud.projects(&["demo"])?;
    cloud.kubectl_in(
        &["apply", "-f", "-"],
        "apiVersion: compute.stratus.dev/v1\nkind: Flavor\nmetadata:\n  name: small\nspec:\n  vcpus: 1\n  ramMiB: 512\n  diskGiB: 1\n---\napiVersion: compute.stratus.dev/v1\nkind: Server\nmetadata:\n  name: web\n  namespace: demo\n  finalizers: [example.com/keep]\nspec:\n  flavor: small\n  image: cirros\n",
    )?;
    cloud.place("demo", "web", "a")?;
    let path = "/apis/compute.stratus.dev/v1/namespaces/demo/servers/web";
    let before = read(&cloud, &["-n", "demo", "get", "server", "web"])?;
    for (ct, body) in [
        (
            "application/merge-patch+json",
            r#"{"metadata":{"finalizers":["compute.stratus.dev/teardown"]}}"#,
        ),
        (
            "application/json-patch+json",
            r#"[{"op":"add","path":"/metadata/finalizers/-","value":"evil.example/forever"}]"#,
        ),
        (
            "application/json-patch+json",
            r#"[{"op":"move","from":"/metadata/finalizers/0","path":"/metadata/finalizers/1"},{"op":"replace","path":"/metadata/finalizers/0","value":"evil.example/x"}]"#,
        ),
    ] {
        a.refused("PATCH", path, ct, body, 403, "compute.stratus.dev/teardown")?;
    }
    assert_eq!(
        read(&cloud, &["-n", "demo", "get", "server", "web"])?,
        before
    );
    // Its own finalizer it releases.
    let released = a.send(
        "PATCH",
        path,
        "application/merge-patch+json",
        r#"{"metadata":{"finalizers":["example.com/keep"]}}"#,
    )?;
    assert_eq!(released.code, 200, "{}", released.body);
    Ok(())
}
