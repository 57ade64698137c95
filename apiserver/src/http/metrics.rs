//! The API server's Prometheus metrics, named and labelled as kube-apiserver's are, so that
//! its dashboards and alerts work unchanged: `apiserver_request_total`,
//! `apiserver_request_duration_seconds`, `apiserver_current_inflight_requests` and
//! `apiserver_longrunning_requests` (open watches), `etcd_request_duration_seconds` and
//! `apiserver_storage_objects`. Served at `GET /metrics`.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::policy::request::RequestInfo;
use crate::resource::registry::Registry as Kinds;

/// kube-apiserver's request latency buckets, in seconds.
const BUCKETS: [f64; 23] = [
    0.005, 0.025, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 1.0, 1.25, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0,
    10.0, 15.0, 20.0, 30.0, 45.0, 60.0,
];

/// What a request is counted under. Only served resources are named, so that no label value
/// comes from an arbitrary path a client made up.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Request {
    /// GET, LIST, WATCH, POST, PUT, PATCH, APPLY or DELETE, as kube-apiserver reports it.
    pub verb: String,
    /// The API group ("" for core).
    pub group: String,
    /// The API version.
    pub version: String,
    /// The resource's plural name; "" for anything that is not a served resource.
    pub resource: String,
    /// `status`, `binding`, or "".
    pub subresource: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Answered {
    #[prometheus(flatten)]
    request: Request,
    code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Inflight {
    request_kind: &'static str,
}

/// The metrics of one API server.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    total: Family<Answered, Counter>,
    duration: Family<Request, Histogram, fn() -> Histogram>,
    inflight: Family<Inflight, Gauge>,
    longrunning: Family<Request, Gauge>,
    /// etcd request latency, filled by the [`crate::storage::store::Store`] given it.
    pub etcd: crate::storage::store::LatencyFamily,
    objects: Family<Stored, Gauge>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Stored {
    /// `PLURAL.GROUP` (`PLURAL` for core), as kube-apiserver names it.
    resource: String,
}

/// How often [`Metrics::count_objects`] counts.
pub const COUNT_EVERY: Duration = Duration::from_secs(60);

impl Default for Metrics {
    fn default() -> Self {
        let total = Family::<Answered, Counter>::default();
        let duration: Family<Request, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(|| Histogram::new(BUCKETS));
        let inflight = Family::<Inflight, Gauge>::default();
        let longrunning = Family::<Request, Gauge>::default();
        let etcd: crate::storage::store::LatencyFamily =
            Family::new_with_constructor(|| Histogram::new(BUCKETS));
        let objects = Family::<Stored, Gauge>::default();
        let mut registry = Registry::default();
        registry.register(
            "apiserver_request",
            "Counter of apiserver requests broken out for each verb, group, version, resource, subresource and HTTP response code",
            total.clone(),
        );
        registry.register(
            "apiserver_request_duration_seconds",
            "Response latency distribution in seconds for each verb, group, version, resource and subresource (watches excluded)",
            duration.clone(),
        );
        registry.register(
            "apiserver_current_inflight_requests",
            "Requests being served, read-only and mutating",
            inflight.clone(),
        );
        registry.register(
            "apiserver_longrunning_requests",
            "Long-running requests (watches) open, for each verb, group, version, resource and subresource",
            longrunning.clone(),
        );
        registry.register(
            "etcd_request_duration_seconds",
            "etcd request latency in seconds for each operation and object type",
            etcd.clone(),
        );
        registry.register(
            "apiserver_storage_objects",
            "Number of stored objects of each resource, counted every minute",
            objects.clone(),
        );
        Self {
            registry,
            total,
            duration,
            inflight,
            longrunning,
            etcd,
            objects,
        }
    }
}

/// Counts a request in flight until dropped.
#[derive(Debug)]
pub struct InFlight(Gauge);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl Metrics {
    /// What a request is counted under: `info` (parsed from its `method` and path), with
    /// `content_type`, against the served `kinds`.
    pub fn request(kinds: &Kinds, info: &RequestInfo, method: &str, content_type: &str) -> Request {
        let served = info
            .group
            .as_deref()
            .is_some_and(|g| kinds.get(g, &info.version, &info.resource).is_some());
        let verb = match (info.verb.as_str(), method) {
            ("watch", _) => "WATCH",
            ("list", _) => "LIST",
            (_, "PATCH") if content_type.starts_with("application/apply-patch") => "APPLY",
            (_, m) => m,
        };
        if !served {
            return Request {
                verb: verb.to_string(),
                group: String::new(),
                version: String::new(),
                resource: String::new(),
                subresource: String::new(),
            };
        }
        Request {
            verb: verb.to_string(),
            group: info.group.clone().unwrap_or_default(),
            version: info.version.clone(),
            resource: info.resource.clone(),
            subresource: info.subresource.clone(),
        }
    }

    /// Counts a request as being served until the returned guard is dropped.
    pub fn start(&self, mutating: bool) -> InFlight {
        let kind = if mutating { "mutating" } else { "readOnly" };
        let g = self
            .inflight
            .get_or_create(&Inflight { request_kind: kind })
            .clone();
        g.inc();
        InFlight(g)
    }

    /// Records an answered request; a watch is not timed (it lasts as long as its client
    /// wants).
    pub fn answered(&self, r: &Request, code: u16, took: Duration) {
        if r.verb != "WATCH" {
            self.duration.get_or_create(r).observe(took.as_secs_f64());
        }
        self.total
            .get_or_create(&Answered {
                request: r.clone(),
                code: code.to_string(),
            })
            .inc();
    }

    /// Counts an open watch until the returned guard is dropped.
    pub fn watching(&self, r: &Request) -> InFlight {
        let g = self.longrunning.get_or_create(r).clone();
        g.inc();
        InFlight(g)
    }

    /// Counts the stored objects of every served resource (views of another's are left out).
    pub async fn count_objects(
        &self,
        store: &crate::storage::store::Store,
        kinds: &Kinds,
        prefix: &str,
    ) {
        for rt in kinds.all().iter().filter(|rt| rt.view.is_none()) {
            if let Ok(n) = store.count(&rt.key_prefix(prefix, None)).await {
                let resource = if rt.group.is_empty() {
                    rt.plural.clone()
                } else {
                    format!("{}.{}", rt.plural, rt.group)
                };
                self.objects.get_or_create(&Stored { resource }).set(n);
            }
        }
    }

    /// Every metric in the OpenMetrics text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// The content type of [`Metrics::encode`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_labelled_as_kube_apiserver_labels_them() {
        let kinds = Kinds::stratus().expect("kinds");
        let r = |m, p, w, ct| {
            let x = Metrics::request(&kinds, &RequestInfo::parse(m, p, w), m, ct);
            (x.verb, x.group, x.resource, x.subresource)
        };
        let s = String::from;
        assert_eq!(
            r("GET", "/apis/compute.stratus.dev/v1/flavors", false, ""),
            (s("LIST"), s("compute.stratus.dev"), s("flavors"), s(""))
        );
        assert_eq!(
            r("GET", "/apis/compute.stratus.dev/v1/flavors", true, "").0,
            "WATCH"
        );
        assert_eq!(
            r("GET", "/api/v1/namespaces/demo/events/e1", false, ""),
            (s("GET"), s(""), s("events"), s(""))
        );
        assert_eq!(
            r(
                "PATCH",
                "/apis/compute.stratus.dev/v1/namespaces/demo/servers/web-1/status",
                false,
                "application/apply-patch+yaml"
            ),
            (
                s("APPLY"),
                s("compute.stratus.dev"),
                s("servers"),
                s("status")
            )
        );
        assert_eq!(
            r("POST", "/apis/compute.stratus.dev/v1/flavors", false, "").0,
            "POST"
        );
        // A path naming no served resource names nothing in the labels.
        assert_eq!(
            r("GET", "/apis/made.up/v1/anything-a-client-likes", false, ""),
            (s("LIST"), s(""), s(""), s(""))
        );
        assert_eq!(
            r("GET", "/no/such/path", false, ""),
            (s("GET"), s(""), s(""), s(""))
        );
    }

    #[test]
    fn answers_are_counted_and_timed_and_guards_release_their_gauges() {
        let m = Metrics::default();
        let kinds = Kinds::stratus().expect("kinds");
        let flavors = "/apis/compute.stratus.dev/v1/flavors";
        let create = Metrics::request(
            &kinds,
            &RequestInfo::parse("POST", flavors, false),
            "POST",
            "",
        );
        let watch = Metrics::request(&kinds, &RequestInfo::parse("GET", flavors, true), "GET", "");
        {
            let _busy = m.start(true);
            let _open = m.watching(&watch);
            let text = m.encode();
            assert!(
                text.contains(r#"apiserver_current_inflight_requests{request_kind="mutating"} 1"#),
                "{text}"
            );
            assert!(text.contains(r#"apiserver_longrunning_requests{verb="WATCH",group="compute.stratus.dev",version="v1",resource="flavors",subresource=""} 1"#), "{text}");
        }
        m.answered(&create, 201, Duration::from_millis(30));
        m.answered(&watch, 200, Duration::from_secs(100));
        let text = m.encode();
        assert!(
            text.contains(r#"apiserver_current_inflight_requests{request_kind="mutating"} 0"#),
            "{text}"
        );
        assert!(text.contains(r#"apiserver_longrunning_requests{verb="WATCH",group="compute.stratus.dev",version="v1",resource="flavors",subresource=""} 0"#), "{text}");
        assert!(text.contains(r#"apiserver_request_total{verb="POST",group="compute.stratus.dev",version="v1",resource="flavors",subresource="",code="201"} 1"#), "{text}");
        assert!(text.contains(r#"apiserver_request_duration_seconds_bucket{le="0.05",verb="POST",group="compute.stratus.dev",version="v1",resource="flavors",subresource=""} 1"#), "{text}");
        assert!(text.contains(r#"apiserver_request_duration_seconds_bucket{le="0.025",verb="POST",group="compute.stratus.dev",version="v1",resource="flavors",subresource=""} 0"#), "{text}");
        // Watches are counted, not timed.
        assert!(
            !text.contains(r#"apiserver_request_duration_seconds_count{verb="WATCH""#),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
