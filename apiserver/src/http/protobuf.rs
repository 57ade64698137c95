//! The few Kubernetes protobuf messages clients send Stratus: kubectl's typed clients encode
//! built-in request bodies (SelfSubjectAccessReview for `kubectl auth can-i`) as protobuf.
//! Answers are always JSON, which every client accepts.

use prost::Message;
use serde_json::{Value, json};

/// The prefix of every Kubernetes protobuf body.
const MAGIC: &[u8] = b"k8s\0";

#[derive(Clone, PartialEq, Message)]
struct TypeMeta {
    #[prost(string, optional, tag = "1")]
    api_version: Option<String>,
    #[prost(string, optional, tag = "2")]
    kind: Option<String>,
}

/// `runtime.Unknown`: the envelope around every object.
#[derive(Clone, PartialEq, Message)]
struct Unknown {
    #[prost(message, optional, tag = "1")]
    type_meta: Option<TypeMeta>,
    #[prost(bytes = "vec", optional, tag = "2")]
    raw: Option<Vec<u8>>,
}

#[derive(Clone, PartialEq, Message)]
struct ResourceAttributes {
    #[prost(string, optional, tag = "1")]
    namespace: Option<String>,
    #[prost(string, optional, tag = "2")]
    verb: Option<String>,
    #[prost(string, optional, tag = "3")]
    group: Option<String>,
    #[prost(string, optional, tag = "4")]
    version: Option<String>,
    #[prost(string, optional, tag = "5")]
    resource: Option<String>,
    #[prost(string, optional, tag = "6")]
    subresource: Option<String>,
    #[prost(string, optional, tag = "7")]
    name: Option<String>,
}

#[derive(Clone, PartialEq, Message)]
struct NonResourceAttributes {
    #[prost(string, optional, tag = "1")]
    path: Option<String>,
    #[prost(string, optional, tag = "2")]
    verb: Option<String>,
}

#[derive(Clone, PartialEq, Message)]
struct ReviewSpec {
    #[prost(message, optional, tag = "1")]
    resource_attributes: Option<ResourceAttributes>,
    #[prost(message, optional, tag = "2")]
    non_resource_attributes: Option<NonResourceAttributes>,
}

#[derive(Clone, PartialEq, Message)]
struct SelfSubjectAccessReview {
    #[prost(message, optional, tag = "2")]
    spec: Option<ReviewSpec>,
}

/// Whether a body is Kubernetes protobuf.
pub fn is_protobuf(body: &[u8]) -> bool {
    body.starts_with(MAGIC)
}

/// A protobuf SelfSubjectAccessReview as the JSON object it stands for.
pub fn self_subject_access_review(body: &[u8]) -> Option<Value> {
    let envelope = Unknown::decode(body.strip_prefix(MAGIC)?).ok()?;
    let review = SelfSubjectAccessReview::decode(envelope.raw?.as_slice()).ok()?;
    let spec = review.spec.unwrap_or_default();
    let mut out = json!({"apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectAccessReview", "metadata": {}, "spec": {}});
    if let Some(r) = spec.resource_attributes {
        out["spec"]["resourceAttributes"] = json!({
            "namespace": r.namespace.unwrap_or_default(), "verb": r.verb.unwrap_or_default(),
            "group": r.group.unwrap_or_default(), "version": r.version.unwrap_or_default(),
            "resource": r.resource.unwrap_or_default(), "subresource": r.subresource.unwrap_or_default(),
            "name": r.name.unwrap_or_default(),
        });
    }
    if let Some(n) = spec.non_resource_attributes {
        out["spec"]["nonResourceAttributes"] =
            json!({"path": n.path.unwrap_or_default(), "verb": n.verb.unwrap_or_default()});
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_review_round_trips_through_the_envelope() {
        let review = SelfSubjectAccessReview {
            spec: Some(ReviewSpec {
                resource_attributes: Some(ResourceAttributes {
                    namespace: Some("a".into()),
                    verb: Some("create".into()),
                    group: Some("network.stratus.dev".into()),
                    resource: Some("networks".into()),
                    ..Default::default()
                }),
                non_resource_attributes: None,
            }),
        };
        let envelope = Unknown {
            type_meta: Some(TypeMeta {
                api_version: Some("authorization.k8s.io/v1".into()),
                kind: Some("SelfSubjectAccessReview".into()),
            }),
            raw: Some(review.encode_to_vec()),
        };
        let mut body = MAGIC.to_vec();
        body.extend(envelope.encode_to_vec());
        assert!(is_protobuf(&body));
        let v = self_subject_access_review(&body).expect("decodes");
        assert_eq!(v["spec"]["resourceAttributes"]["resource"], "networks");
        assert_eq!(v["spec"]["resourceAttributes"]["namespace"], "a");
        assert!(self_subject_access_review(b"{}").is_none());
    }
}
