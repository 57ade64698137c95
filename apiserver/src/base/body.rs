//! Request bodies: JSON or YAML into a JSON value, with duplicate fields found on the way.

use std::cell::RefCell;
use std::fmt;

use serde::de::{DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};

use crate::base::error::ApiError;
use crate::base::field_path::FieldPath;

/// A decoded body and the paths of the fields that appeared more than once in it.
#[derive(Debug)]
pub struct Decoded {
    /// The value (the last occurrence of a duplicate wins, as in Kubernetes' lax mode).
    pub value: Value,
    /// Paths of duplicated fields, e.g. `spec.size`.
    pub duplicates: Vec<String>,
}

struct Seed<'a> {
    at: FieldPath<'a>,
    dups: &'a RefCell<Vec<String>>,
}

impl<'de> DeserializeSeed<'de> for Seed<'_> {
    type Value = Value;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Seed<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(Number::from_f64(v).map_or(Value::Null, Value::Number))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_string()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut out = Vec::new();
        while let Some(v) = seq.next_element_seed(Seed {
            at: FieldPath::Index(&self.at, out.len()),
            dups: self.dups,
        })? {
            out.push(v);
        }
        Ok(Value::Array(out))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            let v = map.next_value_seed(Seed {
                at: FieldPath::Key(&self.at, &key),
                dups: self.dups,
            })?;
            if out.contains_key(&key) {
                self.dups
                    .borrow_mut()
                    .push(FieldPath::Key(&self.at, &key).render());
            }
            out.insert(key, v);
        }
        Ok(Value::Object(out))
    }
}

/// Whether a content type is YAML.
pub fn is_yaml(content_type: &str) -> bool {
    let ct = content_type.split(';').next().unwrap_or("").trim();
    ct == "application/yaml"
        || ct == "application/apply-patch+yaml"
        || ct == "application/x-yaml"
        || ct == "text/yaml"
}

/// Decodes a JSON or YAML body.
///
/// # Errors
/// A 400 `Status` naming the position of the syntax error.
pub fn decode(bytes: &[u8], yaml: bool) -> Result<Decoded, ApiError> {
    let dups = RefCell::new(Vec::new());
    let seed = Seed {
        at: FieldPath::Root,
        dups: &dups,
    };
    let value = if yaml {
        let text = std::str::from_utf8(bytes).map_err(|e| {
            ApiError::bad_request(format!("the request body is not valid UTF-8: {e}"))
        })?;
        let opts =
            serde_saphyr::options! { duplicate_keys: serde_saphyr::DuplicateKeyPolicy::LastWins };
        serde_saphyr::with_deserializer_from_str_with_options(text, opts, |de| seed.deserialize(de))
            .map_err(|e| ApiError::bad_request(format!("error decoding YAML: {e}")))?
    } else {
        let mut de = serde_json::Deserializer::from_slice(bytes);

        seed.deserialize(&mut de)
            .and_then(|v| de.end().map(|()| v))
            .map_err(|e| ApiError::bad_request(format!("error decoding JSON: {e}")))?
    };
    Ok(Decoded {
        value,
        duplicates: dups.into_inner(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duplicates_are_found_with_their_path() {
        let d = decode(
            br#"{"spec": {"a": 1, "b": [{"c": 1, "c": 2}], "a": 3}}"#,
            false,
        )
        .expect("decodes");
        assert_eq!(d.duplicates, vec!["spec.b[0].c", "spec.a"]);
        assert_eq!(d.value["spec"]["a"], 3);
    }

    #[test]
    fn malformed_json_is_a_400() {
        let e = decode(b"{\"spec\": ", false).expect_err("refused");
        assert_eq!(e.code, 400);
        let e = decode(b"{} trailing", false).expect_err("refused");
        assert_eq!(e.code, 400);
    }

    #[test]
    fn yaml_bodies_decode() {
        let d = decode(b"kind: Flavor\nspec:\n  vcpus: 2\n  vcpus: 3\n", true).expect("decodes");
        assert_eq!(d.value["spec"]["vcpus"], 3);
        assert_eq!(d.duplicates, vec!["spec.vcpus"]);
        assert_eq!(decode(b"a: [1, 2\n", true).expect_err("refused").code, 400);
    }
}
