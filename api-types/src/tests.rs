//! Crate-level tests: the generated manifests, the examples, and the shape of the CRDs.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use serde_json::{Value, json};

use crate::{common, compute, crds, identity, image, network, object, storage, validate};

const UPDATE_ENV: &str = "STRATUS_UPDATE_MANIFESTS";
const UPDATE_CMD: &str = "STRATUS_UPDATE_MANIFESTS=1 cargo test -p stratus-api-types manifests";

fn workspace_dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(name)
}

/// Each CRD as the file it is kept in: `<plural>.<group>.yaml`.
fn rendered_manifests() -> BTreeMap<String, String> {
    crds()
        .into_iter()
        .map(|crd| {
            let name = crd.metadata.name.clone().expect("a CRD has a name");
            let yaml = serde_saphyr::to_string(&crd).expect("serialize CRD");
            let text = format!(
                "# Generated from stratus-api-types; do not edit. Regenerate with:\n#   {UPDATE_CMD}\n{yaml}"
            );
            (format!("{name}.yaml"), text)
        })
        .collect()
}

fn crd(kind: &str) -> CustomResourceDefinition {
    crds()
        .into_iter()
        .find(|c| c.spec.names.kind == kind)
        .unwrap_or_else(|| panic!("no CRD for {kind}"))
}

fn schema(kind: &str) -> Value {
    let crd = crd(kind);
    let schema = crd.spec.versions[0]
        .schema
        .as_ref()
        .and_then(|s| s.open_api_v3_schema.as_ref())
        .expect("CRD has a schema");
    serde_json::to_value(schema).expect("schema to JSON")
}

/// The schema node at a dotted path of property names; `[]` steps into array items.
fn node<'a>(schema: &'a Value, path: &str) -> &'a Value {
    path.split('.').fold(schema, |n, step| match step {
        "[]" => &n["items"],
        prop => &n["properties"][prop],
    })
}

#[test]
fn manifests_match_code() {
    let dir = workspace_dir("manifests").join("crds");
    let want = rendered_manifests();
    let on_disk: BTreeSet<String> = std::fs::read_dir(&dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".yaml"))
                .collect()
        })
        .unwrap_or_default();

    if std::env::var(UPDATE_ENV).is_ok_and(|v| v == "1") {
        std::fs::create_dir_all(&dir).expect("create manifests/crds");
        for stale in on_disk.iter().filter(|n| !want.contains_key(*n)) {
            std::fs::remove_file(dir.join(stale)).expect("remove stale manifest");
        }
        for (name, text) in &want {
            std::fs::write(dir.join(name), text).expect("write manifest");
        }
        return;
    }

    let mut drift = Vec::new();
    for (name, text) in &want {
        match std::fs::read_to_string(dir.join(name)) {
            Ok(current) if &current == text => {}
            Ok(_) => drift.push(format!("{name}: differs from the code")),
            Err(_) => drift.push(format!("{name}: missing")),
        }
    }
    for stale in on_disk.iter().filter(|n| !want.contains_key(*n)) {
        drift.push(format!("{stale}: no longer generated"));
    }
    assert!(
        drift.is_empty(),
        "manifests/crds is out of date:\n  {}\nregenerate with:\n  {UPDATE_CMD}",
        drift.join("\n  ")
    );
}

#[test]
fn manifests_read_back_as_the_same_crds() {
    let rendered = rendered_manifests();
    assert_eq!(rendered.len(), crds().len(), "two CRDs share a file name");
    for crd in crds() {
        let name = format!("{}.yaml", crd.metadata.name.as_deref().unwrap_or_default());
        let text = rendered.get(&name).expect("rendered");
        let parsed: CustomResourceDefinition =
            serde_saphyr::from_str(text).unwrap_or_else(|e| panic!("{name}: {e}"));
        // Compared as JSON so a failure prints a readable diff target, not a Debug dump.
        let parsed = serde_json::to_value(parsed).expect("to JSON");
        let want = serde_json::to_value(crd).expect("to JSON");
        assert!(parsed == want, "{name} does not round-trip through YAML");
    }
}

/// Decodes a document into the Rust type of its kind (so unknown fields fail) and says
/// whether that kind is namespaced.
fn decode_typed(kind: &str, doc: &Value) -> Result<bool, String> {
    fn de<T: serde::de::DeserializeOwned>(doc: &Value) -> Result<(), String> {
        T::deserialize(doc).map(drop).map_err(|e| e.to_string())
    }
    let namespaced = match kind {
        "Project" => de::<identity::Project>(doc).map(|()| false),
        "User" => de::<identity::User>(doc).map(|()| false),
        "RoleAssignment" => de::<identity::RoleAssignment>(doc).map(|()| true),
        "S3Credential" => de::<identity::S3Credential>(doc).map(|()| true),
        "Quota" => de::<identity::Quota>(doc).map(|()| true),
        "Flavor" => de::<compute::Flavor>(doc).map(|()| false),
        "Hypervisor" => de::<compute::Hypervisor>(doc).map(|()| false),
        "Server" => de::<compute::Server>(doc).map(|()| true),
        "Keypair" => de::<compute::Keypair>(doc).map(|()| true),
        "ServerGroup" => de::<compute::ServerGroup>(doc).map(|()| true),
        "Image" => de::<image::Image>(doc).map(|()| true),
        "Network" => de::<network::Network>(doc).map(|()| true),
        "Subnet" => de::<network::Subnet>(doc).map(|()| true),
        "Port" => de::<network::Port>(doc).map(|()| true),
        "Router" => de::<network::Router>(doc).map(|()| true),
        "FloatingIP" => de::<network::FloatingIP>(doc).map(|()| true),
        "SecurityGroup" => de::<network::SecurityGroup>(doc).map(|()| true),
        "Volume" => de::<storage::Volume>(doc).map(|()| true),
        "VolumeSnapshot" => de::<storage::VolumeSnapshot>(doc).map(|()| true),
        "StoragePool" => de::<storage::StoragePool>(doc).map(|()| false),
        "VolumeExport" => de::<storage::VolumeExport>(doc).map(|()| false),
        "ObjectRing" => de::<object::ObjectRing>(doc).map(|()| false),
        "ObjectRingVersion" => de::<object::ObjectRingVersion>(doc).map(|()| false),
        "ObjectNode" => de::<object::ObjectNode>(doc).map(|()| false),
        other => Err(format!("unknown kind {other}")),
    }?;
    Ok(namespaced)
}

#[test]
fn examples_decode_validate_and_match_schema() {
    let dir = workspace_dir("examples");
    // `examples/later/` holds what is applied once the first examples have been acted on.
    let mut files: Vec<PathBuf> = [dir.clone(), dir.join("later")]
        .iter()
        .flat_map(|d| std::fs::read_dir(d).expect("read examples/"))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 4, "expected example files in {dir:?}");

    let crds = crds();
    let mut kinds_seen = BTreeSet::new();
    for file in files {
        let text = std::fs::read_to_string(&file).expect("read example");
        let docs: Vec<Value> = serde_saphyr::from_str_multiple(&text)
            .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        assert!(!docs.is_empty(), "{} has no documents", file.display());
        for (i, doc) in docs.iter().enumerate() {
            let at = format!("{} document {i}", file.display());
            let api_version = doc["apiVersion"].as_str().expect("apiVersion");
            let kind = doc["kind"].as_str().expect("kind");
            let (group, version) = api_version.split_once('/').expect("group/version");
            assert_eq!(version, "v1", "{at}");

            let namespaced = decode_typed(kind, doc).unwrap_or_else(|e| panic!("{at}: {e}"));
            let namespace = doc["metadata"]["namespace"].as_str();
            if namespaced {
                assert_eq!(
                    namespace,
                    Some("demo"),
                    "{at}: namespaced objects live in demo"
                );
            } else {
                assert_eq!(namespace, None, "{at}: {kind} is cluster-scoped");
            }
            assert!(
                doc["metadata"].get("finalizers").is_none(),
                "{at}: keep examples free of finalizers"
            );

            if let Err(errs) = validate(group, kind, doc) {
                let errs: Vec<String> = errs.iter().map(ToString::to_string).collect();
                panic!("{at}: {}", errs.join("; "));
            }

            let crd = crds
                .iter()
                .find(|c| c.spec.group == group && c.spec.names.kind == kind)
                .expect("a CRD for every example kind");
            let schema = serde_json::to_value(
                crd.spec.versions[0]
                    .schema
                    .as_ref()
                    .and_then(|s| s.open_api_v3_schema.as_ref())
                    .expect("schema"),
            )
            .expect("schema to JSON");
            let validator = jsonschema::validator_for(&schema).expect("schema compiles");
            let errs: Vec<String> = validator
                .iter_errors(doc)
                .map(|e| format!("{}: {e}", e.instance_path()))
                .collect();
            assert!(errs.is_empty(), "{at}: {}", errs.join("; "));
            kinds_seen.insert(kind.to_owned());
        }
    }
    for kind in [
        "Flavor",
        "Network",
        "Subnet",
        "SecurityGroup",
        "Keypair",
        "Image",
        "Server",
        "Volume",
    ] {
        assert!(kinds_seen.contains(kind), "no example of {kind}");
    }
}

#[test]
fn every_kind_has_one_v1_version_with_status_and_category() {
    let crds = crds();
    assert_eq!(crds.len(), 24);
    let mut short_names = BTreeSet::new();
    // Short names of Kubernetes' own resources, which kubectl would resolve first.
    let builtin = [
        "cs", "cm", "ep", "ev", "limits", "ns", "no", "pvc", "pv", "po", "rc", "quota", "sa",
        "svc", "crd", "crds", "ds", "deploy", "rs", "sts", "hpa", "cj", "csr", "ing", "netpol",
        "pdb", "pc", "sc", "vac", "ipaddr",
    ];
    for crd in &crds {
        let name = crd.metadata.name.as_deref().expect("name");
        assert!(name.ends_with(".stratus.dev"), "{name}");
        assert_eq!(crd.spec.versions.len(), 1, "{name}");
        let v = &crd.spec.versions[0];
        assert!(v.name == "v1" && v.served && v.storage, "{name}");
        assert!(
            v.subresources.as_ref().is_some_and(|s| s.status.is_some()),
            "{name}: status subresource"
        );
        assert_eq!(
            crd.spec.names.categories.as_deref(),
            Some(&["stratus".to_owned()][..]),
            "{name}"
        );
        let columns = v.additional_printer_columns.as_deref().unwrap_or_default();
        assert_eq!(
            columns.last().map(|c| (c.name.as_str(), c.type_.as_str())),
            Some(("Age", "date")),
            "{name}: AGE is the last column"
        );
        for short in crd.spec.names.short_names.iter().flatten() {
            assert!(
                !builtin.contains(&short.as_str()),
                "{name}: {short} is a built-in"
            );
            assert!(
                short_names.insert(short.clone()),
                "{name}: {short} used twice"
            );
        }
    }
}

#[test]
fn scopes_match_the_design() {
    let cluster: BTreeSet<&str> = [
        "Project",
        "User",
        "Flavor",
        "Hypervisor",
        "StoragePool",
        "VolumeExport",
        "ObjectRing",
        "ObjectRingVersion",
        "ObjectNode",
    ]
    .into();
    for crd in crds() {
        let kind = crd.spec.names.kind.as_str();
        let want = if cluster.contains(kind) {
            "Cluster"
        } else {
            "Namespaced"
        };
        assert_eq!(crd.spec.scope, want, "{kind}");
    }
}

#[test]
fn server_crd_names_columns_and_required() {
    let crd = crd("Server");
    assert_eq!(
        crd.metadata.name.as_deref(),
        Some("servers.compute.stratus.dev")
    );
    assert_eq!(crd.spec.names.short_names, Some(vec!["srv".to_owned()]));
    assert_eq!(crd.spec.scope, "Namespaced");
    let columns: Vec<(String, String, i32)> = crd.spec.versions[0]
        .additional_printer_columns
        .iter()
        .flatten()
        .map(|c| (c.name.clone(), c.json_path.clone(), c.priority.unwrap_or(0)))
        .collect();
    let want = [
        ("Status", ".status.phase", 0),
        ("Flavor", ".spec.flavor", 0),
        ("Image", ".spec.image", 0),
        ("Node", ".status.hypervisor", 0),
        ("Addresses", ".status.addresses[*].ip", 0),
        ("Power", ".status.powerState", 1),
        ("Boot Volume", ".spec.bootVolume", 1),
        ("Zone", ".spec.availabilityZone", 1),
        ("Age", ".metadata.creationTimestamp", 0),
    ];
    let want: Vec<(String, String, i32)> = want
        .iter()
        .map(|(n, p, prio)| ((*n).to_owned(), (*p).to_owned(), *prio))
        .collect();
    assert_eq!(columns, want);

    let s = schema("Server");
    assert_eq!(s["required"], json!(["spec"]));
    assert_eq!(node(&s, "spec")["required"], json!(["flavor"]));
    assert_eq!(node(&s, "spec.volumes.[]")["required"], json!(["volume"]));
    assert_eq!(
        node(&s, "status.addresses.[]")["required"],
        json!(["ip", "network"])
    );
    assert!(
        node(&s, "status").get("required").is_none(),
        "status fields are all optional"
    );
}

#[test]
fn selectable_fields_per_kind() {
    let want: BTreeMap<&str, Vec<&str>> = [
        ("Server", vec![".spec.flavor", ".status.hypervisor"]),
        (
            "Port",
            vec![".spec.network", ".status.hypervisor", ".status.boundTo"],
        ),
        ("Subnet", vec![".spec.network"]),
        ("Router", vec![".status.node"]),
        ("FloatingIP", vec![".status.router"]),
        (
            "Volume",
            vec![".status.node", ".status.pool", ".status.attachedNode"],
        ),
        ("VolumeSnapshot", vec![".spec.volume", ".status.node"]),
        ("StoragePool", vec![".spec.node"]),
        ("VolumeExport", vec![".spec.node", ".spec.storageNode"]),
        ("Hypervisor", vec![".spec.availabilityZone"]),
        ("Image", vec![".spec.visibility"]),
        ("RoleAssignment", vec![".spec.user"]),
        ("S3Credential", vec![".spec.user"]),
    ]
    .into();
    for crd in crds() {
        let kind = crd.spec.names.kind.as_str();
        let got: Vec<String> = crd.spec.versions[0]
            .selectable_fields
            .iter()
            .flatten()
            .map(|f| f.json_path.clone())
            .collect();
        assert_eq!(got, want.get(kind).cloned().unwrap_or_default(), "{kind}");
        // Kubernetes only selects on scalar string, integer or boolean fields.
        let s = schema(kind);
        for path in &got {
            let field = node(&s, path.trim_start_matches('.'));
            let ty = field["type"].as_str().unwrap_or("missing");
            assert!(
                ["string", "integer", "boolean"].contains(&ty),
                "{kind}: {path} has type {ty}"
            );
        }
    }
}

#[test]
fn printer_columns_point_at_existing_fields() {
    for crd in crds() {
        let kind = crd.spec.names.kind.clone();
        let s = schema(&kind);
        for c in crd.spec.versions[0]
            .additional_printer_columns
            .iter()
            .flatten()
        {
            if c.json_path.starts_with(".metadata.") {
                continue;
            }
            let path = c.json_path.trim_start_matches('.').replace("[*]", ".[]");
            let field = node(&s, &path);
            assert!(
                field.is_object(),
                "{kind}: column {} -> {} not in schema",
                c.name,
                c.json_path
            );
            let ty = field["type"].as_str().unwrap_or("missing");
            let compatible = match c.type_.as_str() {
                "date" => ty == "string" && field["format"] == "date-time",
                "number" => ty == "number" || ty == "integer",
                other => other == ty,
            };
            assert!(
                compatible,
                "{kind}: column {} is {} but the field is {ty}",
                c.name, c.type_
            );
        }
    }
}

/// Walks every schema node, calling `f(path, node)`.
fn walk(path: &str, n: &Value, f: &mut dyn FnMut(&str, &Value)) {
    f(path, n);
    if let Some(props) = n.get("properties").and_then(Value::as_object) {
        for (k, v) in props {
            walk(&format!("{path}.{k}"), v, f);
        }
    }
    if let Some(items) = n.get("items") {
        walk(&format!("{path}[]"), items, f);
    }
    if let Some(ap) = n.get("additionalProperties").filter(|v| v.is_object()) {
        walk(&format!("{path}{{}}"), ap, f);
    }
}

#[test]
fn schemas_are_structural_and_documented() {
    for crd in crds() {
        let kind = crd.spec.names.kind.clone();
        let s = schema(&kind);
        walk(&kind, &s, &mut |path, n| {
            for forbidden in [
                "$ref",
                "oneOf",
                "anyOf",
                "allOf",
                "not",
                "definitions",
                "$defs",
            ] {
                assert!(
                    n.get(forbidden).is_none(),
                    "{path}: {forbidden} is not structural"
                );
            }
            assert!(n.get("type").is_some(), "{path}: every node needs a type");
            if n.get("properties").is_some() {
                assert!(
                    n.get("additionalProperties").is_none(),
                    "{path}: properties and additionalProperties together"
                );
            }
        });
        // Every field carries a description (`kubectl explain`), from the doc comments.
        walk(&kind, &s, &mut |path, n| {
            for (k, v) in n
                .get("properties")
                .and_then(Value::as_object)
                .into_iter()
                .flatten()
            {
                if path == kind && ["apiVersion", "kind", "metadata"].contains(&k.as_str()) {
                    continue;
                }
                let d = v["description"].as_str().unwrap_or_default();
                assert!(!d.is_empty(), "{path}.{k} has no description");
            }
        });
    }
}

#[test]
fn enums_are_enums_in_the_schema() {
    let cases: [(&str, &str, &[&str]); 9] = [
        (
            "RoleAssignment",
            "spec.role",
            &["admin", "member", "reader"],
        ),
        (
            "ServerGroup",
            "spec.policy",
            &[
                "affinity",
                "anti-affinity",
                "soft-affinity",
                "soft-anti-affinity",
            ],
        ),
        ("Server", "spec.powerState", &["Running", "Stopped"]),
        ("Hypervisor", "spec.hypervisorType", &["qemu", "test"]),
        (
            "Image",
            "spec.diskFormat",
            &["qcow2", "raw", "iso", "aki", "ari"],
        ),
        ("Image", "spec.visibility", &["private", "public"]),
        (
            "SecurityGroup",
            "spec.rules.[].protocol",
            &["tcp", "udp", "icmp", "any"],
        ),
        ("StoragePool", "spec.backend", &["lvm", "file"]),
        (
            "ObjectRing",
            "spec.ringType",
            &["account", "container", "object"],
        ),
    ];
    for (kind, path, values) in cases {
        let s = schema(kind);
        let n = node(&s, path);
        assert_eq!(n["type"], "string", "{kind} {path}");
        assert_eq!(n["enum"], json!(values), "{kind} {path}");
    }
    let phase = node(&schema("Server"), "status.phase").clone();
    for p in [
        "Pending",
        "Scheduled",
        "Building",
        "Running",
        "Stopped",
        "Rebooting",
        "Error",
    ] {
        assert!(
            phase["enum"]
                .as_array()
                .is_some_and(|e| e.contains(&json!(p))),
            "{p}"
        );
    }
    // An optional enum keeps its values (kube rewrites schemars' anyOf-with-null).
    let power = node(&schema("Server"), "status.powerState").clone();
    assert_eq!(power["nullable"], true);
    assert!(
        power["enum"]
            .as_array()
            .is_some_and(|e| e.contains(&json!("Shutdown")))
    );
}

#[test]
fn formats_patterns_ranges_and_defaults() {
    let port = schema("Port");
    assert_eq!(
        node(&port, "spec.macAddress")["pattern"],
        common::MAC_PATTERN
    );
    assert_eq!(node(&port, "spec.network")["pattern"], common::NAME_PATTERN);
    assert_eq!(node(&port, "spec.network")["maxLength"], 253);
    assert_eq!(
        node(&port, "spec.securityGroups.[]")["pattern"],
        common::NAME_PATTERN
    );

    let subnet = schema("Subnet");
    assert_eq!(node(&subnet, "spec.cidr")["pattern"], common::CIDR_PATTERN);
    assert_eq!(node(&subnet, "spec.cidr")["format"], "cidr");
    assert_eq!(node(&subnet, "spec.enableDHCP")["default"], true);
    assert_eq!(node(&subnet, "spec.dnsNameservers")["maxItems"], 5);

    let net = schema("Network");
    assert_eq!(node(&net, "spec.mtu")["minimum"], 68.0);
    assert_eq!(node(&net, "spec.mtu")["maximum"], 9000.0);
    assert_eq!(node(&net, "spec.mtu")["default"], 1450);

    let flavor = schema("Flavor");
    assert_eq!(node(&flavor, "spec.vcpus")["minimum"], 1.0);
    assert_eq!(node(&flavor, "spec.ramMiB")["minimum"], 16.0);
    assert_eq!(node(&flavor, "spec.isPublic")["default"], true);
    assert_eq!(
        node(&flavor, "spec.extraSpecs")["additionalProperties"]["type"],
        "string"
    );

    let hv = schema("Hypervisor");
    assert_eq!(node(&hv, "spec.cpuAllocationRatio")["default"], 16.0);
    assert_eq!(node(&hv, "spec.ramAllocationRatio")["default"], 1.5);
    assert_eq!(node(&hv, "spec.diskAllocationRatio")["default"], 1.0);
    assert_eq!(node(&hv, "status.lastHeartbeatTime")["format"], "date-time");

    let img = schema("Image");
    assert_eq!(node(&img, "spec.sha256")["pattern"], common::SHA256_PATTERN);
    // One of url and swift, checked by validation (the schema cannot say "exactly one").
    assert_eq!(node(&img, "spec.source")["required"], Value::Null);
    assert_eq!(node(&img, "spec.source.swift.container")["maxLength"], 256);
    assert_eq!(node(&img, "spec.source.swift.object")["maxLength"], 1024);

    let ring = schema("ObjectRing");
    assert_eq!(node(&ring, "spec.partPower")["maximum"], 32.0);
    assert_eq!(node(&ring, "spec.devices.[].port")["minimum"], 1.0);
    assert_eq!(node(&ring, "spec.devices.[].ip")["format"], "ipv4");

    let server = schema("Server");
    assert_eq!(node(&server, "spec.powerState")["default"], "Running");
    assert_eq!(node(&server, "spec.userData")["maxLength"], 65535);
    let conditions = node(&server, "status.conditions");
    assert_eq!(conditions["x-kubernetes-list-type"], "map");
    assert_eq!(conditions["maxItems"], 64);
    assert!(node(conditions, "[].observedGeneration").is_object());
}

/// What the API server's JSON-schema step will do with the generated schemas.
#[test]
fn schemas_reject_bad_values() {
    let check = |kind: &str, spec: Value| -> bool {
        let s = schema(kind);
        let v = jsonschema::validator_for(&s).expect("schema compiles");
        v.is_valid(
            &json!({"apiVersion": "x/v1", "kind": kind, "metadata": {"name": "a"}, "spec": spec}),
        )
    };
    let port = |mac: &str| json!({"network": "private", "macAddress": mac});
    assert!(check("Port", port("fa:16:3e:00:00:01")));
    assert!(!check("Port", port("FA:16:3E:00:00:01")));
    assert!(!check("Port", port("fa:16:3e:00:00")));
    assert!(!check("Port", json!({"network": "Private_Net"})));

    let subnet = |cidr: &str| json!({"network": "n", "cidr": cidr});
    for good in [
        "10.0.0.0/24",
        "0.0.0.0/0",
        "2001:db8::/64",
        "::/0",
        "fd00:1:2:3::/64",
    ] {
        assert!(check("Subnet", subnet(good)), "{good}");
    }
    for bad in [
        "10.0.0.0/33",
        "10.0.0/24",
        "256.0.0.0/8",
        "10.0.0.0",
        "2001:db8::/129",
        "x",
    ] {
        assert!(!check("Subnet", subnet(bad)), "{bad}");
    }

    assert!(!check("Network", json!({"mtu": 67})));
    assert!(!check("Network", json!({"mtu": 9001})));
    assert!(!check("Network", json!({"segmentation": "geneve"})));
    assert!(!check("Network", json!({"segmentationID": 4095})));
    assert!(!check("Network", json!({"segmentationID": 0})));
    assert!(check("Network", json!({"segmentationID": 4094})));
    assert!(check("Network", json!({"mtu": 9000})));

    let flavor = |vcpus: i64, ram: i64| json!({"vcpus": vcpus, "ramMiB": ram, "diskGiB": 0});
    assert!(check("Flavor", flavor(1, 16)));
    assert!(!check("Flavor", flavor(0, 16)));
    assert!(!check("Flavor", flavor(1, 15)));
    assert!(
        !check("Flavor", json!({"vcpus": 1, "ramMiB": 16})),
        "diskGiB is required"
    );

    let rule = |min: i64| json!({"rules": [{"direction": "ingress", "protocol": "tcp", "portRangeMin": min}]});
    assert!(check("SecurityGroup", rule(1)));
    assert!(!check("SecurityGroup", rule(0)));
    assert!(!check("SecurityGroup", rule(65536)));

    let img = |sha: &str| json!({"diskFormat": "raw", "source": {"url": "https://x.example/i"}, "sha256": sha});
    assert!(check("Image", img(&"a".repeat(64))));
    assert!(!check("Image", img(&"A".repeat(64))));
    assert!(!check("Image", img(&"a".repeat(63))));
    assert!(!check(
        "Image",
        json!({"diskFormat": "raw", "source": {"url": "file:///etc/shadow"}})
    ));

    let ring = |ip: &str, replicas: i64| {
        json!({"ringType": "object", "partPower": 8, "replicas": replicas,
               "devices": [{"zone": 1, "ip": ip, "port": 6200, "device": "sdb1", "weight": 1.0}]})
    };
    assert!(check("ObjectRing", ring("127.0.0.1", 3)));
    assert!(!check("ObjectRing", ring("::1", 3)));
    assert!(!check("ObjectRing", ring("127.0.0.1", 11)));
}
