//! What belongs to a User is tied to its uid; flavors and quotas at Server admission.

use serde_json::{Value, json};
use stratus_apiserver::admission::CLUSTER_ADMIN;
use stratus_apiserver::policy::identity::{Identity, LoginPolicy};

use crate::fixtures::{Cloud, MERGE, Obj, refused};

fn user(name: &str) -> Obj {
    Obj(json!({
        "apiVersion": "identity.stratus.dev/v1", "kind": "User",
        "metadata": {"name": name}, "spec": {"enabled": true},
    }))
}

fn assignment(ns: &str, name: &str, user: &str) -> Obj {
    Obj(json!({
        "apiVersion": "identity.stratus.dev/v1", "kind": "RoleAssignment",
        "metadata": {"name": name, "namespace": ns}, "spec": {"user": user, "role": "member"},
    }))
}

/// A cloud whose store puts the identity marker, as the API server's does, with project
/// `demo` and flavor `small`.
async fn marked() -> Cloud {
    use stratus_apiserver::storage::{keys, store::Store};
    let store = Store::memory().with_marker(
        keys::marker_key("/registry"),
        keys::marked_prefixes("/registry"),
    );
    let registry = std::sync::Arc::new(
        stratus_apiserver::resource::registry::Registry::stratus().expect("the Stratus kinds"),
    );
    let api = stratus_apiserver::resource::verbs::Api::open(
        store,
        registry,
        "/registry",
        std::time::Duration::from_millis(200),
    )
    .await
    .expect("open the API");
    let c = Cloud { api };
    c.create(&Obj::project("demo")).await.expect("project demo");
    c.create(&Obj::flavor("small", 1, 512))
        .await
        .expect("flavor small");
    c
}

fn uid(obj: &Value) -> String {
    obj["metadata"]["uid"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

#[tokio::test]
async fn an_assignment_is_owned_by_its_user_and_refused_for_none() {
    let c = Cloud::with_demo().await;
    let e = refused(c.create(&assignment("demo", "ghost", "ghost")).await);
    assert_eq!(e.code, 422);
    assert_eq!(e.details.causes[0].field, "spec.user");
    let alice = c.create(&user("alice")).await.expect("alice");
    let answer = c
        .create(&assignment("demo", "a", "alice"))
        .await
        .expect("assignment");
    let stored = c
        .get("RoleAssignment", Some("demo"), "a")
        .await
        .expect("stored");
    assert_eq!(
        stored["metadata"]["ownerReferences"],
        json!([{"apiVersion": "identity.stratus.dev/v1", "kind": "User", "name": "alice", "uid": uid(&alice)}])
    );
    assert_eq!(answer, stored, "the create answers what it stored");
    // A reference forged by the writer is replaced by the User as it is.
    let mut forged = stored.clone();
    forged["metadata"]["ownerReferences"][0]["uid"] = json!("someone-else");
    let answer = c
        .put(
            &c.target("RoleAssignment", Some("demo"), Some("a")),
            &forged,
        )
        .await
        .expect("update");
    let stored = c
        .get("RoleAssignment", Some("demo"), "a")
        .await
        .expect("stored");
    assert_eq!(
        stored["metadata"]["ownerReferences"][0]["uid"],
        json!(uid(&alice))
    );
    assert_eq!(answer, stored, "the update answers what it stored");
}

#[tokio::test]
async fn a_deleted_users_password_goes_with_it_and_a_new_user_inherits_nothing() {
    let c = marked().await;
    let id = Identity::load(c.api.store.clone(), "/registry", &LoginPolicy::default())
        .await
        .expect("identity");
    assert_eq!(
        refused(id.set_password("alice", "alice-password", None).await).code,
        404,
        "a password for no user"
    );
    c.create(&user("alice")).await.expect("alice");
    c.create(&assignment("demo", "a", "alice"))
        .await
        .expect("assignment");
    id.set_password("alice", "alice-password", None)
        .await
        .expect("password");
    let first = id
        .check_password("alice", "alice-password")
        .await
        .expect("checked")
        .expect("her password");
    let (_, claims) = id.signer.issue("alice", &first, 60);
    let grants = id.token_grants(&claims).await.expect("read");
    assert_eq!(grants.map(|g| g.len()), Some(1));

    c.delete("User", None, "alice", "").await.expect("deleted");
    assert!(
        c.api
            .store
            .get("/registry/_system/passwords/alice")
            .await
            .expect("read")
            .is_none(),
        "the password outlived its user"
    );
    c.create(&user("alice")).await.expect("a new alice");
    assert_eq!(
        id.check_password("alice", "alice-password")
            .await
            .expect("checked"),
        None
    );
    assert_eq!(
        id.token_grants(&claims).await.expect("read"),
        None,
        "the old alice's token works for the new one"
    );
    // The new alice, with a password of her own, gets no grant of the old one's (whose
    // assignment the garbage collector has not removed yet).
    id.set_password("alice", "new-alice-password", None)
        .await
        .expect("password");
    let new = id
        .check_password("alice", "new-alice-password")
        .await
        .expect("checked")
        .expect("her password");
    let (_, claims) = id.signer.issue("alice", &new, 60);
    assert_eq!(id.token_grants(&claims).await.expect("read"), Some(vec![]));
}

#[tokio::test]
async fn a_password_change_revokes_every_token_but_the_one_kept() {
    let c = marked().await;
    let id = Identity::load(c.api.store.clone(), "/registry", &LoginPolicy::default())
        .await
        .expect("identity");
    c.create(&user("alice")).await.expect("alice");
    id.set_password("alice", "alice-password", None)
        .await
        .expect("password");
    let v = id
        .check_password("alice", "alice-password")
        .await
        .expect("checked")
        .expect("her password");
    let (_, mine) = id.signer.issue("alice", &v, 60);
    let (_, stolen) = id.signer.issue("alice", &v, 60);
    id.set_password("alice", "second-password", Some(&mine.jti))
        .await
        .expect("changed");
    assert!(id.token_grants(&mine).await.expect("read").is_some());
    assert_eq!(id.token_grants(&stolen).await.expect("read"), None);
    // An admin's reset keeps none.
    id.set_password("alice", "third-password", None)
        .await
        .expect("reset");
    assert_eq!(id.token_grants(&mine).await.expect("read"), None);
}

#[tokio::test]
async fn a_disabled_project_grants_nothing() {
    let c = marked().await;
    let id = Identity::load(c.api.store.clone(), "/registry", &LoginPolicy::default())
        .await
        .expect("identity");
    c.create(&user("alice")).await.expect("alice");
    c.create(&assignment("demo", "a", "alice"))
        .await
        .expect("assignment");
    id.set_password("alice", "alice-password", None)
        .await
        .expect("password");
    let v = id
        .check_password("alice", "alice-password")
        .await
        .expect("checked")
        .expect("her password");
    let (_, claims) = id.signer.issue("alice", &v, 60);
    assert_eq!(
        id.token_grants(&claims)
            .await
            .expect("read")
            .map(|g| g.len()),
        Some(1)
    );
    c.patch(
        &c.target("Project", None, Some("demo")),
        MERGE,
        &json!({"spec": {"enabled": false}}),
        "",
    )
    .await
    .expect("disabled");
    assert_eq!(id.token_grants(&claims).await.expect("read"), Some(vec![]));
}

#[tokio::test]
async fn a_non_public_flavor_is_only_for_cluster_admins_servers() {
    let c = Cloud::with_demo().await;
    c.create(&Obj::flavor("secret", 1, 512).spec("isPublic", json!(false)))
        .await
        .expect("flavor");
    let e = refused(
        c.create(&Obj::server("demo", "a").spec("flavor", json!("secret")))
            .await,
    );
    assert_eq!(
        (e.code, e.details.causes[0].field.as_str()),
        (422, "spec.flavor")
    );
    // A resize onto it, too.
    c.create(&Obj::server("demo", "b")).await.expect("small");
    let e = refused(
        c.patch(
            &c.target("Server", Some("demo"), Some("b")),
            MERGE,
            &json!({"spec": {"flavor": "secret"}}),
            "",
        )
        .await,
    );
    assert_eq!(e.code, 422);
    CLUSTER_ADMIN
        .scope(
            true,
            c.create(&Obj::server("demo", "a").spec("flavor", json!("secret"))),
        )
        .await
        .expect("a cluster admin's server");
}

#[tokio::test]
async fn under_a_quota_a_server_of_an_unknown_flavor_is_refused() {
    let c = Cloud::with_demo().await;
    c.create(&Obj::server("demo", "free").spec("flavor", json!("nonesuch")))
        .await
        .expect("no quota: the scheduler waits for the flavor");
    c.create(&Obj::quota("demo", "q", json!({"vcpus": 4})))
        .await
        .expect("quota");
    let e = refused(
        c.create(&Obj::server("demo", "a").spec("flavor", json!("nonesuch")))
            .await,
    );
    assert_eq!(
        (e.code, e.details.causes[0].field.as_str()),
        (422, "spec.flavor")
    );
    c.create(&Obj::server("demo", "b")).await.expect("small");
}
