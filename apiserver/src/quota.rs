//! Quota at admission: a create that would take a project over one of its Quotas' limits is
//! refused, and the check is atomic with the write.
//!
//! # Guarantees
//! Usage is computed from the store at one revision R, and the create's etcd transaction
//! requires that neither the counted kind's objects in the project nor its Quotas changed
//! since R. Concurrent creates therefore serialise on the project: 50 at once against a limit
//! of 10 leave exactly 10, with no counter that could drift.

use serde_json::Value;

use crate::api::{Api, Target, store_err};
use crate::error::{ApiError, ApiResult};
use crate::store::{Stored, Write};

pub use stratus_api_types::quota::{counted, usage};

/// How many times a create is retried when another write to the same project's counted
/// objects got in between.
const RETRIES: usize = 64;

impl Api {
    /// Creates `obj` at `key` if the project's Quotas allow it, atomically with the check.
    pub(crate) async fn create_within_quota(
        &self,
        t: &Target,
        ns: &str,
        key: &str,
        obj: &Value,
    ) -> ApiResult<Write> {
        let rt = &t.rt;
        let quota_rt = self
            .registry
            .by_kind("identity.stratus.dev", "Quota")
            .ok_or_else(|| ApiError::internal("the Quota kind is not served"))?;
        let quota_prefix = quota_rt.key_prefix(&self.prefix, Some(ns));
        let kind_prefix = rt.key_prefix(&self.prefix, Some(ns));
        for _ in 0..RETRIES {
            let quotas = self
                .store
                .list(&quota_prefix, None, 0, 0)
                .await
                .map_err(store_err)?;
            let limited: Vec<&(String, Stored)> = quotas
                .items
                .iter()
                .filter(|(_, q)| {
                    q.value
                        .pointer("/spec/limits")
                        .and_then(Value::as_object)
                        .is_some_and(|m| !m.is_empty())
                })
                .collect();
            if limited.is_empty() {
                return self.store.create(key, obj).await.map_err(store_err);
            }
            let at = quotas.revision;
            let existing = self
                .store
                .list(&kind_prefix, None, at, 0)
                .await
                .map_err(store_err)?;
            let flavors = self.flavors(obj, &existing.items, at).await?;
            let flavor = |name: &str| flavors.iter().find(|(n, _)| n == name).map(|(_, v)| *v);
            let wanted = usage(&rt.group, &rt.kind, obj, &flavor);
            for (field, amount) in &wanted {
                if *amount == 0 {
                    continue;
                }
                let used: u64 = existing
                    .items
                    .iter()
                    .flat_map(|(_, s)| usage(&rt.group, &rt.kind, &s.value, &flavor))
                    .filter(|(f, _)| f == field)
                    .map(|(_, a)| a)
                    .sum();
                for (_, q) in &limited {
                    let Some(limit) = q
                        .value
                        .pointer(&format!("/spec/limits/{field}"))
                        .and_then(Value::as_u64)
                    else {
                        continue;
                    };
                    if used + amount > limit {
                        let name = q
                            .value
                            .pointer("/metadata/name")
                            .and_then(Value::as_str)
                            .unwrap_or_default();
                        return Err(ApiError::forbidden(format!(
                            "{}.{} \"{}\" is forbidden: exceeded quota: {name}, requested: {field}={amount}, used: {field}={used}, limited: {field}={limit}",
                            rt.plural,
                            rt.group,
                            obj.pointer("/metadata/name")
                                .and_then(Value::as_str)
                                .unwrap_or_default(),
                        )));
                    }
                }
            }
            match self
                .store
                .create_guarded(key, obj, &[(&kind_prefix, at), (&quota_prefix, at)])
                .await
                .map_err(store_err)?
            {
                Write::Done(rev) => return Ok(Write::Done(rev)),
                // The key exists: a plain conflict, no retry can help.
                Write::Conflict(rev) if rev > 0 => return Ok(Write::Conflict(rev)),
                // Something counted changed since `at`: count again.
                Write::Conflict(_) => continue,
            }
        }
        Err(ApiError::conflict(
            &rt.group,
            &rt.plural,
            obj.pointer("/metadata/name")
                .and_then(Value::as_str)
                .unwrap_or_default(),
            "too many concurrent changes to the project's quota-counted objects; retry",
        ))
    }

    /// Updates `key` from `old` to `new` (revision `expected`) if the project's Quotas allow
    /// what the change adds (a resize to a larger flavor, a grown volume), atomically.
    pub(crate) async fn update_within_quota(
        &self,
        t: &Target,
        ns: &str,
        key: &str,
        old: &Value,
        new: &Value,
        expected: i64,
    ) -> ApiResult<Write> {
        let rt = &t.rt;
        let quota_rt = self
            .registry
            .by_kind("identity.stratus.dev", "Quota")
            .ok_or_else(|| ApiError::internal("the Quota kind is not served"))?;
        let quota_prefix = quota_rt.key_prefix(&self.prefix, Some(ns));
        let kind_prefix = rt.key_prefix(&self.prefix, Some(ns));
        for _ in 0..RETRIES {
            let quotas = self
                .store
                .list(&quota_prefix, None, 0, 0)
                .await
                .map_err(store_err)?;
            let at = quotas.revision;
            let existing = self
                .store
                .list(&kind_prefix, None, at, 0)
                .await
                .map_err(store_err)?;
            let mut flavors = self.flavors(new, &existing.items, at).await?;
            flavors.extend(self.flavors(old, &[], at).await?);
            let flavor = |name: &str| flavors.iter().find(|(n, _)| n == name).map(|(_, v)| *v);
            let before = usage(&rt.group, &rt.kind, old, &flavor);
            let grows: Vec<(&str, u64)> = usage(&rt.group, &rt.kind, new, &flavor)
                .into_iter()
                .filter(|(f, a)| {
                    before
                        .iter()
                        .find(|(g, _)| g == f)
                        .is_none_or(|(_, b)| a > b)
                })
                .collect();
            if grows.is_empty() {
                return self
                    .store
                    .update(key, new, expected)
                    .await
                    .map_err(store_err);
            }
            for (field, amount) in &grows {
                let others: u64 = existing
                    .items
                    .iter()
                    .filter(|(k, _)| k != key)
                    .flat_map(|(_, s)| usage(&rt.group, &rt.kind, &s.value, &flavor))
                    .filter(|(f, _)| f == field)
                    .map(|(_, a)| a)
                    .sum();
                for (_, q) in &quotas.items {
                    let Some(limit) = q
                        .value
                        .pointer(&format!("/spec/limits/{field}"))
                        .and_then(Value::as_u64)
                    else {
                        continue;
                    };
                    if others + amount > limit {
                        let qname = q
                            .value
                            .pointer("/metadata/name")
                            .and_then(Value::as_str)
                            .unwrap_or_default();
                        return Err(ApiError::forbidden(format!(
                            "{}.{} \"{}\" is forbidden: exceeded quota: {qname}, requested: {field}={amount}, used by others: {field}={others}, limited: {field}={limit}",
                            rt.plural,
                            rt.group,
                            new.pointer("/metadata/name")
                                .and_then(Value::as_str)
                                .unwrap_or_default(),
                        )));
                    }
                }
            }
            match self
                .store
                .update_guarded(
                    key,
                    new,
                    expected,
                    &[(&kind_prefix, at), (&quota_prefix, at)],
                )
                .await
                .map_err(store_err)?
            {
                Write::Conflict(rev) if rev == expected => continue,
                other => return Ok(other),
            }
        }
        Err(ApiError::conflict(
            &rt.group,
            &rt.plural,
            new.pointer("/metadata/name")
                .and_then(Value::as_str)
                .unwrap_or_default(),
            "too many concurrent changes to the project's quota-counted objects; retry",
        ))
    }

    /// The (vCPUs, RAM MiB) of every flavor the new object and the existing ones name.
    async fn flavors(
        &self,
        obj: &Value,
        existing: &[(String, Stored)],
        at: i64,
    ) -> ApiResult<Vec<(String, (u64, u64))>> {
        let mut names: Vec<&str> = existing
            .iter()
            .filter_map(|(_, s)| s.value.pointer("/spec/flavor").and_then(Value::as_str))
            .collect();
        names.extend(obj.pointer("/spec/flavor").and_then(Value::as_str));
        names.sort_unstable();
        names.dedup();
        let Some(flavor_rt) = self.registry.by_kind("compute.stratus.dev", "Flavor") else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for n in names {
            let key = flavor_rt.key(&self.prefix, None, n);
            let page = self
                .store
                .list(&key, None, at, 1)
                .await
                .map_err(store_err)?;
            if let Some((k, s)) = page.items.first().filter(|(k, _)| *k == key) {
                let _ = k;
                let get = |p: &str| s.value.pointer(p).and_then(Value::as_u64).unwrap_or(0);
                out.push((n.to_string(), (get("/spec/vcpus"), get("/spec/ramMiB"))));
            }
        }
        Ok(out)
    }
}
