//! Strict JSON: duplicate keys are an error anywhere in a document (spec §5.1).
//!
//! serde rejects a repeated field of a struct but silently keeps the last value of a
//! repeated map key, and other languages' parsers differ again. A file whose meaning
//! depends on the parser is a security problem, so the whole document is walked once.

use std::borrow::Cow;
use std::collections::HashSet;
use std::fmt;
use std::marker::PhantomData;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};

use crate::error::{Error, ErrorCode, Result};

const DUPLICATE: &str = "duplicate key";

/// Walks a JSON document and fails on the first object that repeats a key.
struct UniqueKeys;

impl<'de> Deserialize<'de> for UniqueKeys {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(UniqueKeysVisitor)
    }
}

struct UniqueKeysVisitor;

impl<'de> Visitor<'de> for UniqueKeysVisitor {
    type Value = UniqueKeys;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<UniqueKeys, A::Error> {
        let mut seen = HashSet::new();
        // Keys are kept, borrowed from the text unless they hold escapes, to compare
        // them after unescaping (spec §5.1 rule 3); values are walked, never built.
        while let Some(Key(key)) = map.next_key::<Key<'de>>()? {
            if seen.contains(&key) {
                return Err(de::Error::custom(format!("{DUPLICATE} {key:?}")));
            }
            seen.insert(key);
            map.next_value::<UniqueKeys>()?;
        }
        Ok(UniqueKeys)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<UniqueKeys, A::Error> {
        while seq.next_element::<UniqueKeys>()?.is_some() {}
        Ok(UniqueKeys)
    }

    fn visit_bool<E>(self, _: bool) -> Result<UniqueKeys, E> {
        Ok(UniqueKeys)
    }
    fn visit_i64<E>(self, _: i64) -> Result<UniqueKeys, E> {
        Ok(UniqueKeys)
    }
    fn visit_u64<E>(self, _: u64) -> Result<UniqueKeys, E> {
        Ok(UniqueKeys)
    }
    fn visit_f64<E>(self, _: f64) -> Result<UniqueKeys, E> {
        Ok(UniqueKeys)
    }
    fn visit_str<E>(self, _: &str) -> Result<UniqueKeys, E> {
        Ok(UniqueKeys)
    }
    fn visit_unit<E>(self) -> Result<UniqueKeys, E> {
        Ok(UniqueKeys)
    }
}

/// Checks that `text` is one JSON value in which no object repeats a key, building
/// nothing but each object's set of keys.
///
/// # Errors
/// `E_DUPLICATE_KEY` for a repeated key, `E_HEADER_INVALID` for anything else.
pub fn check_unique_keys(text: &str, what: &str) -> Result<()> {
    serde_json::from_str::<UniqueKeys>(text).map_err(|err| {
        let code =
            if err.to_string().starts_with(DUPLICATE) { ErrorCode::DuplicateKey } else { ErrorCode::HeaderInvalid };
        Error::new(code, format!("{what}: {err}"))
    })?;
    Ok(())
}

/// An object key: borrowed from the text when it has no escapes.
struct Key<'de>(Cow<'de, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_str(KeyVisitor)
    }
}

struct KeyVisitor;

impl<'de> Visitor<'de> for KeyVisitor {
    type Value = Key<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a key")
    }

    fn visit_borrowed_str<E>(self, key: &'de str) -> Result<Key<'de>, E> {
        Ok(Key(Cow::Borrowed(key)))
    }

    fn visit_str<E>(self, key: &str) -> Result<Key<'de>, E> {
        Ok(Key(Cow::Owned(key.to_owned())))
    }
}

/// A `T` read from a JSON object only. serde's derived structs also take an array of
/// their fields in order, a second spelling that the format does not have (spec §5.1
/// to §5.6 and §11.2 B0 speak of objects).
#[derive(Debug)]
pub struct ObjectOf<T>(pub T);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for ObjectOf<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(ObjectVisitor(PhantomData)).map(ObjectOf)
    }
}

struct ObjectVisitor<T>(PhantomData<T>);

impl<'de, T: Deserialize<'de>> Visitor<'de> for ObjectVisitor<T> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object")
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
        T::deserialize(de::value::MapAccessDeserializer::new(map))
    }
}

/// `deserialize_with` for an array of objects (see [`ObjectOf`]).
///
/// # Errors
/// The deserializer's, for anything but an array of objects that read as `T`.
pub fn objects<'de, D: Deserializer<'de>, T: Deserialize<'de>>(deserializer: D) -> Result<Vec<T>, D::Error> {
    Vec::<ObjectOf<T>>::deserialize(deserializer).map(|items| items.into_iter().map(|ObjectOf(t)| t).collect())
}

/// `deserialize_with` for an object (see [`ObjectOf`]).
///
/// # Errors
/// The deserializer's, for anything but an object that reads as `T`.
pub fn object<'de, D: Deserializer<'de>, T: Deserialize<'de>>(deserializer: D) -> Result<T, D::Error> {
    ObjectOf::<T>::deserialize(deserializer).map(|ObjectOf(t)| t)
}

/// `deserialize_with` for an object or `null` (see [`ObjectOf`]).
///
/// # Errors
/// The deserializer's, for anything but `null` or an object that reads as `T`.
pub fn optional_object<'de, D: Deserializer<'de>, T: Deserialize<'de>>(deserializer: D) -> Result<Option<T>, D::Error> {
    Option::<ObjectOf<T>>::deserialize(deserializer).map(|o| o.map(|ObjectOf(t)| t))
}

/// Parses `text` into `T` after checking that no object repeats a key.
///
/// # Errors
/// `E_DUPLICATE_KEY` for a repeated key, `E_HEADER_INVALID` for anything else.
pub fn parse_strict<T: de::DeserializeOwned>(text: &str, what: &str) -> Result<T> {
    check_unique_keys(text, what)?;
    serde_json::from_str(text).map_err(|err| Error::new(ErrorCode::HeaderInvalid, format!("{what}: {err}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nested_duplicates_are_found() {
        let err = parse_strict::<serde_json::Value>(r#"{"a": [{"b": 1, "b": 2}]}"#, "x").unwrap_err();
        assert_eq!(err.code(), ErrorCode::DuplicateKey);
        let ok = parse_strict::<serde_json::Value>(r#"{"a": {"b": 1}, "b": {"b": 2}}"#, "x");
        assert!(ok.is_ok());
        let bad = parse_strict::<serde_json::Value>("{", "x").unwrap_err();
        assert_eq!(bad.code(), ErrorCode::HeaderInvalid);
    }
}
