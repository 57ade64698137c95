//! What a verb answers, before the HTTP layer encodes it.

use std::convert::Infallible;

use bytes::Bytes;
use futures::stream::BoxStream;
use serde_json::{Map, Value, json};

use crate::base::error::ApiError;

/// The chunks of a watch: newline-delimited JSON events, one per chunk.
pub type Events = BoxStream<'static, Result<Bytes, Infallible>>;

/// A collection answered as it is read (kube-apiserver's streaming list encoding): the list
/// object without its items, then the items a page at a time, so that what the server holds
/// for one LIST does not grow with the collection.
pub struct List {
    /// The list object without `field`: `kind`, `apiVersion`, `metadata`, a Table's
    /// `columnDefinitions`.
    pub head: Map<String, Value>,
    /// Where the items go: `items`, or a Table's `rows`.
    pub field: &'static str,
    /// The items, a page at a time, in order. An error ends the answer where it is (its
    /// status has been sent), so the client sees a truncated document, never a short list.
    pub pages: BoxStream<'static, Result<Vec<Item>, ApiError>>,
}

/// One item of a [`List`].
#[derive(Debug, Clone, PartialEq)]
pub enum Item {
    /// A document to encode.
    Value(Value),
    /// A document already encoded as JSON: a stored object with its `resourceVersion`
    /// spliced in, answered without decoding it.
    Json(Vec<u8>),
}

impl Item {
    /// The item as a document.
    ///
    /// # Errors
    /// When encoded JSON does not decode (a stored value that is not JSON).
    pub fn into_value(self) -> Result<Value, ApiError> {
        match self {
            Self::Value(v) => Ok(v),
            Self::Json(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| ApiError::internal(format!("a stored object cannot be decoded: {e}"))),
        }
    }
}

impl List {
    /// The whole document, read to the end (for callers that need it as one value).
    ///
    /// # Errors
    /// The first error of the pages.
    pub async fn collect(self) -> Result<Value, ApiError> {
        use futures::TryStreamExt;
        let items: Vec<Value> = self
            .pages
            .try_fold(Vec::new(), |mut all, page| async move {
                for item in page {
                    all.push(item.into_value()?);
                }
                Ok(all)
            })
            .await?;
        let mut doc = self.head;
        doc.insert(self.field.to_string(), Value::Array(items));
        Ok(Value::Object(doc))
    }
}

/// A verb's answer.
pub enum Outcome {
    /// A JSON document, with the HTTP status code it goes out with and `Warning`s.
    Json {
        /// HTTP status code.
        code: u16,
        /// The document.
        body: Value,
        /// `Warning` header texts.
        warnings: Vec<String>,
    },
    /// A watch: `200 OK` and JSON events as they happen.
    Watch(Events),
    /// A collection: `200 OK` and the list, encoded as its pages are read.
    List(List),
}

impl Outcome {
    /// `200 OK` with `body`.
    pub fn ok(body: Value) -> Self {
        Self::json(200, body, Vec::new())
    }

    /// A JSON document with `code` and `warnings`.
    pub fn json(code: u16, body: Value, warnings: Vec<String>) -> Self {
        Self::Json {
            code,
            body,
            warnings,
        }
    }

    /// A `Status` of success with its `code`, for a call that changed something it does not
    /// return.
    pub fn done(code: u16) -> Self {
        Self::json(
            code,
            json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": code}),
            Vec::new(),
        )
    }

    /// The same answer with a collection read to the end: a [`Outcome::Json`] list.
    ///
    /// # Errors
    /// The first error of the collection's pages.
    pub async fn collected(self) -> Result<Self, ApiError> {
        match self {
            Self::List(list) => Ok(Self::ok(list.collect().await?)),
            other => Ok(other),
        }
    }

    /// A `Status` of success, for calls that return no object.
    pub fn success() -> Self {
        Self::ok(json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success"}))
    }
}

impl std::fmt::Debug for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Json {
                code,
                body,
                warnings,
            } => f
                .debug_struct("Json")
                .field("code", code)
                .field("body", body)
                .field("warnings", warnings)
                .finish(),
            Self::Watch(_) => f.write_str("Watch(..)"),
            Self::List(l) => f
                .debug_struct("List")
                .field("head", &l.head)
                .finish_non_exhaustive(),
        }
    }
}
