//! A cloud over an etcd of a test's own ([`crate::common::Etcd`]), ended and removed with the
//! test.

use crate::common::Etcd;
use crate::fixtures::{Cloud, Obj};

/// A cloud with project `demo` and flavor `small`, as [`Cloud::with_demo`], over an etcd of
/// its own, which goes when the guard answered with it is dropped.
pub async fn cloud() -> (Etcd, Cloud) {
    let (etcd, store) = Etcd::start().await;
    let c = Cloud::over(store).await;
    c.create(&Obj::project("demo")).await.expect("project demo");
    c.create(&Obj::flavor("small", 1, 512))
        .await
        .expect("flavor small");
    (etcd, c)
}
