//! One suite of the store's guarantees, run against the in-memory backend and against a real
//! etcd (started here; the `etcd` binary must be installed): what the verbs' unit tests
//! assume of the in-memory store is what etcd does.

#[allow(dead_code)]
mod common;

use std::time::Duration;

use serde_json::{Value, json};
use stratus_apiserver::storage::kv::{WatchFeed, WatchMsg};
use stratus_apiserver::storage::store::{Guard, Read, Store, StoreError, Write};

use common::Etcd;

/// Every check, each on keys of its own.
async fn suite(s: &Store) {
    revisions_count_transactions(s).await;
    conditional_writes_compare_the_revision(s).await;
    a_create_under_a_missing_parent_is_refused(s).await;
    a_create_under_a_changed_parent_is_refused(s).await;
    write_many_is_all_or_nothing(s).await;
    an_unchanged_guard_fails_on_a_new_or_changed_key_only(s).await;
    reads_at_a_past_revision_see_the_past(s).await;
    read_many_reads_at_one_revision(s).await;
    first_written_keeps_the_first_value(s).await;
    watches_replay_from_a_revision_with_previous_values(s).await;
    a_lease_removes_its_key(s).await;
    // Last: it makes every older revision unreadable.
    compaction_expires_old_revisions(s).await;
}

fn obj(n: i64) -> Value {
    json!({"metadata": {"name": format!("o{n}")}, "n": n})
}

fn done(w: Write) -> i64 {
    match w {
        Write::Done(rev) => rev,
        Write::Conflict(rev) => panic!("conflict at {rev}, expected a write"),
    }
}

async fn revisions_count_transactions(s: &Store) {
    let r0 = s.revision().await.expect("revision");
    let r1 = done(s.create("/t/rev/a", &obj(1)).await.expect("create"));
    assert_eq!(r1, r0 + 1, "a write raises the revision by one");
    assert_eq!(
        s.get("/t/rev/a")
            .await
            .expect("get")
            .map(|g| g.mod_revision),
        Some(r1)
    );
    s.get("/t/rev/a").await.expect("get");
    s.list("/t/rev/", None, 0, 0).await.expect("list");
    assert_eq!(
        s.revision().await.expect("revision"),
        r1,
        "reads leave the revision"
    );
    let r2 = done(s.create("/t/rev/b", &obj(2)).await.expect("create"));
    assert_eq!(r2, r1 + 1);
    assert_eq!(
        s.get("/t/rev/a")
            .await
            .expect("get")
            .map(|g| g.mod_revision),
        Some(r1),
        "another key's write leaves a key's mod_revision"
    );
}

async fn conditional_writes_compare_the_revision(s: &Store) {
    let r1 = done(s.create("/t/cas/a", &obj(1)).await.expect("create"));
    assert_eq!(
        s.create("/t/cas/a", &obj(2)).await.expect("create"),
        Write::Conflict(r1),
        "a create of an existing key reports its revision"
    );
    assert_eq!(
        s.update("/t/cas/a", &obj(3), r1 - 1).await.expect("update"),
        Write::Conflict(r1)
    );
    assert_eq!(
        s.update("/t/cas/none", &obj(3), 5).await.expect("update"),
        Write::Conflict(0),
        "an absent key is at revision 0"
    );
    let r2 = done(s.update("/t/cas/a", &obj(4), r1).await.expect("update"));
    let got = s.get("/t/cas/a").await.expect("get").expect("stored");
    assert_eq!((got.value["n"].as_i64(), got.mod_revision), (Some(4), r2));
    assert_eq!(
        s.delete("/t/cas/a", r1, &[]).await.expect("delete"),
        Write::Conflict(r2)
    );
    done(s.delete("/t/cas/a", r2, &[]).await.expect("delete"));
    assert!(s.get("/t/cas/a").await.expect("get").is_none());
}

async fn a_create_under_a_missing_parent_is_refused(s: &Store) {
    assert_eq!(
        s.create_under("/t/parent/child", &obj(1), Some(("/t/parent-of", 1)))
            .await
            .expect("create"),
        Write::Conflict(0)
    );
    assert!(s.get("/t/parent/child").await.expect("get").is_none());
    let at = done(s.create("/t/parent-of", &obj(0)).await.expect("create"));
    done(
        s.create_under("/t/parent/child", &obj(1), Some(("/t/parent-of", at)))
            .await
            .expect("create"),
    );
}

/// A create holds its parent at the revision it was checked at: a parent written since (a
/// Project whose deletion began) fails it, and nothing is written.
async fn a_create_under_a_changed_parent_is_refused(s: &Store) {
    let checked = done(s.create("/t/holder", &obj(0)).await.expect("create"));
    let changed = done(
        s.update("/t/holder", &obj(1), checked)
            .await
            .expect("update"),
    );
    assert_eq!(
        s.create_under("/t/held/child", &obj(1), Some(("/t/holder", checked)))
            .await
            .expect("create"),
        Write::Conflict(0)
    );
    assert!(s.get("/t/held/child").await.expect("get").is_none());
    done(
        s.create_under("/t/held/child", &obj(1), Some(("/t/holder", changed)))
            .await
            .expect("create"),
    );
}

async fn write_many_is_all_or_nothing(s: &Store) {
    let r1 = done(s.create("/t/many/a", &obj(1)).await.expect("create"));
    let before = s.revision().await.expect("revision");
    let refused = s
        .write_many(
            &[Guard::Revision("/t/many/a", r1 - 1)],
            &[("/t/many/a", &obj(2)), ("/t/many/b", &obj(2))],
            &[],
        )
        .await
        .expect("write");
    assert_eq!(refused, None);
    assert_eq!(
        s.revision().await.expect("revision"),
        before,
        "nothing written"
    );
    assert!(s.get("/t/many/b").await.expect("get").is_none());
    let rev = s
        .write_many(
            &[Guard::Revision("/t/many/a", r1), Guard::Absent("/t/many/b")],
            &[("/t/many/b", &obj(3))],
            &["/t/many/a"],
        )
        .await
        .expect("write")
        .expect("guards hold");
    assert_eq!(rev, before + 1, "one transaction, one revision");
    assert!(s.get("/t/many/a").await.expect("get").is_none());
    assert_eq!(
        s.get("/t/many/b")
            .await
            .expect("get")
            .map(|g| g.mod_revision),
        Some(rev)
    );
}

async fn an_unchanged_guard_fails_on_a_new_or_changed_key_only(s: &Store) {
    let r1 = done(s.create("/t/guard/a", &obj(1)).await.expect("create"));
    done(s.create("/t/guard/b", &obj(2)).await.expect("create"));
    let guarded = |at: i64| async move {
        s.write_guarded("/t/other/x", &obj(9), None, &[("/t/guard/", at)], None)
            .await
            .expect("write")
    };
    // A guard failing leaves the key as expected: Conflict(0) on a create.
    assert_eq!(guarded(r1).await, Write::Conflict(0), "b changed after r1");
    let at = s.revision().await.expect("revision");
    let rb = s
        .get("/t/guard/b")
        .await
        .expect("get")
        .expect("b")
        .mod_revision;
    done(s.delete("/t/guard/b", rb, &[]).await.expect("delete"));
    // As etcd: a range compare sees the keys present, so a deletion does not fail it.
    done(guarded(at).await);
}

async fn reads_at_a_past_revision_see_the_past(s: &Store) {
    for i in 0..5 {
        done(
            s.create(&format!("/t/past/{i}"), &obj(i))
                .await
                .expect("create"),
        );
    }
    let then = s.revision().await.expect("revision");
    let r = s
        .get("/t/past/0")
        .await
        .expect("get")
        .expect("0")
        .mod_revision;
    done(s.update("/t/past/0", &obj(100), r).await.expect("update"));
    let r = s
        .get("/t/past/1")
        .await
        .expect("get")
        .expect("1")
        .mod_revision;
    done(s.delete("/t/past/1", r, &[]).await.expect("delete"));
    done(s.create("/t/past/9", &obj(9)).await.expect("create"));

    let page = s.list("/t/past/", None, then, 2).await.expect("list");
    let names: Vec<&str> = page.items.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(names, ["/t/past/0", "/t/past/1"]);
    assert!(page.more);
    assert_eq!(page.revision, then);
    assert_eq!(page.items[0].1.value["n"], 0, "the value before the update");
    let rest = s
        .list("/t/past/", Some("/t/past/1\0"), then, 0)
        .await
        .expect("list");
    let names: Vec<&str> = rest.items.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(names, ["/t/past/2", "/t/past/3", "/t/past/4"], "no 9 yet");
    assert!(!rest.more);
    let now = s.list("/t/past/", None, 0, 0).await.expect("list");
    let names: Vec<&str> = now.items.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        names,
        [
            "/t/past/0",
            "/t/past/2",
            "/t/past/3",
            "/t/past/4",
            "/t/past/9"
        ]
    );
    assert_eq!(s.count("/t/past/").await.expect("count"), 5);
    assert_eq!(s.keys("/t/past/").await.expect("keys").len(), 5);
    let future = s.revision().await.expect("revision") + 10;
    assert!(matches!(
        s.list("/t/past/", None, future, 0).await,
        Err(StoreError::FutureRevision)
    ));
}

async fn read_many_reads_at_one_revision(s: &Store) {
    let ra = done(s.create("/t/rm/a", &obj(1)).await.expect("create"));
    done(s.create("/t/rm/p/1", &obj(2)).await.expect("create"));
    done(s.create("/t/rm/p/2", &obj(3)).await.expect("create"));
    let (reads, rev) = s
        .read_many(&[
            Read::Key("/t/rm/a"),
            Read::Key("/t/rm/none"),
            Read::Prefix("/t/rm/p/"),
            Read::Presence("/t/rm/a"),
        ])
        .await
        .expect("read");
    assert_eq!(rev, s.revision().await.expect("revision"));
    assert_eq!(reads[0].len(), 1);
    assert!(reads[1].is_empty());
    assert_eq!(reads[2].len(), 2);
    assert_eq!(reads[3][0].1.value, Value::Null, "presence reads no value");
    assert_eq!(reads[3][0].1.mod_revision, ra);
}

async fn first_written_keeps_the_first_value(s: &Store) {
    let a = s
        .first_written("/t/first", &json!("a"))
        .await
        .expect("first");
    let b = s
        .first_written("/t/first", &json!("b"))
        .await
        .expect("second");
    assert_eq!((a, b), (json!("a"), json!("a")));
}

async fn next_events(w: &mut impl WatchFeed) -> Vec<(i64, String, bool, Option<Value>)> {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(10), w.message())
            .await
            .expect("a watch message in time")
            .expect("watch")
            .expect("the watch goes on");
        if let WatchMsg::Events(evs) = msg {
            return evs
                .into_iter()
                .map(|e| {
                    let prev = e
                        .prev
                        .map(|p| serde_json::from_slice(&p.value).expect("prev JSON"));
                    (
                        e.kv.mod_revision,
                        String::from_utf8_lossy(&e.kv.key).into_owned(),
                        e.deleted,
                        prev,
                    )
                })
                .collect();
        }
    }
}

async fn watches_replay_from_a_revision_with_previous_values(s: &Store) {
    let r1 = done(s.create("/t/w/a", &obj(1)).await.expect("create"));
    done(s.create("/t/not-w/x", &obj(0)).await.expect("create"));
    let r2 = done(s.update("/t/w/a", &obj(2), r1).await.expect("update"));
    let mut w = s.watch("/t/w/", r1).await.expect("watch");
    let mut seen = next_events(&mut w).await;
    if seen.len() < 2 {
        seen.extend(next_events(&mut w).await);
    }
    assert_eq!(
        seen,
        [
            (r1, "/t/w/a".to_string(), false, None),
            (r2, "/t/w/a".to_string(), false, Some(obj(1))),
        ],
        "history from r1 on, outside keys left out"
    );
    let r3 = s
        .write_many(&[], &[("/t/w/b", &obj(3))], &["/t/w/a"])
        .await
        .expect("write")
        .expect("no guard");
    assert_eq!(
        next_events(&mut w).await,
        [
            (r3, "/t/w/b".to_string(), false, None),
            (r3, "/t/w/a".to_string(), true, Some(obj(2))),
        ],
        "one transaction's changes together, in the order written"
    );
    w.request_progress().await.expect("progress");
    let progress = loop {
        match tokio::time::timeout(Duration::from_secs(10), w.message())
            .await
            .expect("progress in time")
            .expect("watch")
        {
            Some(WatchMsg::Progress(rev)) => break rev,
            Some(WatchMsg::Events(_)) => {}
            other => panic!("unexpected {other:?}"),
        }
    };
    assert!(progress >= r3);
}

async fn a_lease_removes_its_key(s: &Store) {
    // The value is empty, not JSON: it is read for its presence only.
    let present = || async {
        let (reads, _) = s
            .read_many(&[Read::Presence("/t/lease")])
            .await
            .expect("read");
        !reads[0].is_empty()
    };
    s.put_with_ttl("/t/lease", 1).await.expect("put");
    assert!(present().await);
    for _ in 0..100 {
        if !present().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the leased key outlived its lease");
}

async fn compaction_expires_old_revisions(s: &Store) {
    let r1 = done(s.create("/t/c/a", &obj(1)).await.expect("create"));
    let r2 = done(s.update("/t/c/a", &obj(2), r1).await.expect("update"));
    let r3 = done(s.create("/t/c/b", &obj(3)).await.expect("create"));
    s.compact(r2).await.expect("compact");
    assert!(matches!(
        s.list("/t/c/", None, r1, 0).await,
        Err(StoreError::Compacted)
    ));
    let at = s
        .list("/t/c/", None, r2, 0)
        .await
        .expect("list at the compaction");
    assert_eq!(at.items.len(), 1);
    assert_eq!(at.items[0].1.value["n"], 2);
    assert!(matches!(s.compact(r2).await, Err(StoreError::Compacted)));
    let mut w = s.watch("/t/c/", r1).await.expect("watch");
    let msg = tokio::time::timeout(Duration::from_secs(10), w.message())
        .await
        .expect("in time")
        .expect("watch");
    assert!(
        matches!(msg, Some(WatchMsg::Canceled { compact_revision }) if compact_revision == r2),
        "{msg:?}"
    );
    let mut w = s.watch("/t/c/", r3).await.expect("watch");
    assert_eq!(next_events(&mut w).await[0].0, r3);
}

#[tokio::test]
async fn the_memory_store_keeps_the_guarantees() {
    suite(&Store::memory()).await;
}

#[tokio::test]
async fn etcd_keeps_the_guarantees() {
    let (_etcd, store) = Etcd::start().await;
    suite(&store).await;
}
