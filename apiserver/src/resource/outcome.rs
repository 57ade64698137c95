//! What a verb answers, before the HTTP layer encodes it.

use std::convert::Infallible;

use bytes::Bytes;
use futures::stream::BoxStream;
use serde_json::{Value, json};

/// The chunks of a watch: newline-delimited JSON events, one per chunk.
pub type Events = BoxStream<'static, Result<Bytes, Infallible>>;

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
        }
    }
}
