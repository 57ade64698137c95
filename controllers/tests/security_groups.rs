//! The default security group controller's decisions: which Projects get `default`, with
//! which rules, and what a refused create means.

use serde_json::json;
use stratus_api_types::identity::Project;
use stratus_api_types::network::{Direction, EtherType, Protocol, SecurityGroup};
use stratus_controllers::project::FINALIZER;
use stratus_controllers::security_groups::{
    MANAGED_BY, MANAGED_BY_LABEL, Plan, SecurityGroupsError, create_failed, plan,
};
use stratus_runtime::{Classify, Retry};

fn project(finalizers: &[&str], deleting: bool, phase: &str) -> Project {
    let mut metadata = json!({"name": "demo", "uid": "p-1", "finalizers": finalizers});
    if deleting {
        metadata["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
    }
    serde_json::from_value(json!({
        "apiVersion": "identity.stratus.dev/v1", "kind": "Project",
        "metadata": metadata,
        "spec": {"enabled": true},
        "status": {"phase": phase},
    }))
    .expect("a project")
}

fn user_group() -> SecurityGroup {
    serde_json::from_value(json!({
        "apiVersion": "network.stratus.dev/v1", "kind": "SecurityGroup",
        "metadata": {"name": "default", "namespace": "demo"},
        "spec": {"rules": [{"direction": "ingress", "protocol": "tcp", "portRangeMin": 22,
                            "remoteIPPrefix": "0.0.0.0/0"}]},
    }))
    .expect("a group")
}

fn api_error(code: u16) -> kube::Error {
    kube::Error::Api(Box::new(kube::core::Status {
        code,
        ..Default::default()
    }))
}

#[test]
fn an_active_project_without_one_gets_default_allowing_its_members_in_and_all_ipv4_out() {
    let Plan::Create(g) = plan(&project(&[FINALIZER], false, "Active"), None) else {
        panic!("no create");
    };
    assert_eq!(g.metadata.name.as_deref(), Some("default"));
    assert_eq!(g.metadata.namespace.as_deref(), Some("demo"));
    let labels = g.metadata.labels.clone().unwrap_or_default();
    assert_eq!(
        labels.get(MANAGED_BY_LABEL).map(String::as_str),
        Some(MANAGED_BY)
    );
    let rules = &g.spec.rules;
    assert_eq!(rules.len(), 2, "{rules:?}");
    let ingress: Vec<_> = rules
        .iter()
        .filter(|r| r.direction == Direction::Ingress)
        .collect();
    assert_eq!(ingress.len(), 1);
    assert_eq!(ingress[0].remote_group.as_deref(), Some("default"));
    assert_eq!(ingress[0].remote_ip_prefix, None);
    let egress: Vec<_> = rules
        .iter()
        .filter(|r| r.direction == Direction::Egress)
        .collect();
    assert_eq!(egress.len(), 1);
    assert_eq!(
        (
            egress[0].remote_group.as_ref(),
            egress[0].remote_ip_prefix.as_ref()
        ),
        (None, None)
    );
    for r in rules {
        assert_eq!(r.ethertype, EtherType::IPv4);
        assert_eq!(r.protocol, Protocol::Any);
        assert_eq!((r.port_range_min, r.icmp_type), (None, None));
    }
    // What is sent is a valid SecurityGroup on the wire.
    let wire = serde_json::to_value(&*g).expect("serializes");
    assert_eq!(wire["spec"]["rules"][0]["remoteGroup"], "default");
    let back: SecurityGroup = serde_json::from_value(wire).expect("deserializes");
    assert_eq!(back.spec, g.spec);
}

#[test]
fn an_existing_default_is_kept_whatever_the_user_made_of_it() {
    assert_eq!(
        plan(&project(&[FINALIZER], false, "Active"), Some(&user_group())),
        Plan::Keep
    );
}

#[test]
fn a_project_being_deleted_gets_nothing() {
    for p in [
        project(&[FINALIZER], true, "Active"),
        project(&[FINALIZER], true, "Terminating"),
        project(&[FINALIZER], false, "Terminating"),
    ] {
        assert_eq!(plan(&p, None), Plan::Terminating);
        assert_eq!(plan(&p, Some(&user_group())), Plan::Terminating);
    }
}

#[test]
fn a_project_gets_its_group_only_once_its_deletion_would_clean_it_up() {
    assert_eq!(plan(&project(&[], false, "Active"), None), Plan::NotAdopted);
    assert!(matches!(
        plan(
            &project(&["other/finalizer", FINALIZER], false, "Active"),
            None
        ),
        Plan::Create(_)
    ));
}

#[test]
fn a_refused_create_is_retried_with_backoff_and_a_made_or_gone_one_is_done() {
    // Made meanwhile, or the Project is gone: nothing left to do.
    assert!(create_failed(api_error(409)).is_ok());
    assert!(create_failed(api_error(404)).is_ok());
    // The Project's deletion began after it was read (the API's NamespaceLifecycle answer):
    // nothing is made in its namespace, and nothing is retried.
    let terminating: kube::core::Status = serde_json::from_value(serde_json::json!({
        "code": 403, "reason": "Forbidden",
        "message": "securitygroups.network.stratus.dev \"default\" is forbidden: unable to create new content in namespace demo because it is being terminated",
        "details": {"causes": [{"reason": "NamespaceTerminating", "field": "metadata.namespace"}]},
    }))
    .expect("a Status");
    assert!(create_failed(kube::Error::Api(Box::new(terminating))).is_ok());
    // Over quota: refused, and tried again with backoff (the quota may be raised).
    let refused = create_failed(api_error(403)).expect_err("refused");
    assert!(matches!(refused, SecurityGroupsError::Refused(_)));
    assert_eq!(refused.retry(), Retry::Backoff);
    // A server in trouble: backoff; an invalid write (a bug): at the cap.
    assert_eq!(
        create_failed(api_error(503))
            .expect_err("unavailable")
            .retry(),
        Retry::Backoff
    );
    assert_eq!(
        create_failed(api_error(422)).expect_err("invalid").retry(),
        Retry::Never
    );
}
