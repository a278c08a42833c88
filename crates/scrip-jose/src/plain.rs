//! JSON read as every other party reads it.
//!
//! With serde_json's `raw_value` feature on (a feature of the whole build:
//! axum and sqlx turn it on), `serde_json::Value` reads an object whose
//! first member is named `$serde_json::private::RawValue` as the JSON text
//! that member's string holds, and with `arbitrary_precision` one named
//! `$serde_json::private::Number` as a number: `{"exp": {"$serde_json::
//! private::RawValue": "1e12"}}` would be a number to scrip and an object
//! to every other library. Headers and claims holding either name,
//! however escaped, are refused. (`arbitrary_precision` is off in this
//! build; were it turned on, serde_json would hand every number to
//! [`Walk`] under the second name, and every token would be refused: loudly
//! wrong rather than quietly.)

use serde::de::{Deserializer as _, Error as _, MapAccess, SeqAccess, Visitor};

/// The member names serde_json reads as something else.
const RESERVED: [&str; 2] = [
    "$serde_json::private::RawValue",
    "$serde_json::private::Number",
];

/// Whether `json` (already known to be JSON, or about to be refused as
/// not JSON) names no member as serde_json reserves (see the module
/// documentation). Cheap (a `memchr` for each of two bytes) when the text
/// holds neither a `$` nor a backslash, which spelling either name needs,
/// as nearly every token does.
///
/// Every parse into [`serde_json::Value`] (or a map of them) of JSON that
/// a client sends, or an issuer's key set, asks this first, also one that
/// only peeks at a token before it is verified: besides the confusion, the re-read of a reserved member's
/// string starts serde_json's nesting limit afresh, so a few kilobytes
/// could nest deeper than the limit allows and exhaust the stack.
#[must_use]
pub fn plain(json: &[u8]) -> bool {
    if !json.contains(&b'$') && !json.contains(&b'\\') {
        return true;
    }
    let mut de = serde_json::Deserializer::from_slice(json);
    de.deserialize_any(Walk).is_ok()
}

/// Whether `json` names a member as serde_json reserves (as far as it is
/// JSON): of the texts [`plain`] refuses, those it refuses for that, told
/// apart from text that is no JSON, or nests deeper than serde_json reads.
pub(crate) fn names_reserved(json: &[u8]) -> bool {
    let mut de = serde_json::Deserializer::from_slice(json);
    // [`Walk`]'s own error is the only one of serde_json's data errors it
    // can meet; the others are syntax, the end of the text, or I/O.
    de.deserialize_any(Walk)
        .is_err_and(|e| e.classify() == serde_json::error::Category::Data)
}

/// Walks a JSON value, failing on a reserved member name.
struct Walk;

impl<'de> serde::de::DeserializeSeed<'de> for Walk {
    type Value = ();
    fn deserialize<D: serde::Deserializer<'de>>(self, de: D) -> Result<(), D::Error> {
        de.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Walk {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JSON")
    }
    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element_seed(Walk)?.is_some() {}
        Ok(())
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(name) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            if RESERVED.contains(&name.as_ref()) {
                return Err(A::Error::custom("a reserved member name"));
            }
            map.next_value_seed(Walk)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reserved_member_name_is_refused_however_written() {
        for json in [
            r#"{"exp":{"$serde_json::private::RawValue":"1e12"}}"#,
            r#"{"a":[1,{"b":{"$serde_json::private::Number":"1"}}]}"#,
            r#"{"k":{"\u0024serde_json::private::RawValue":"{}"}}"#,
            r#"{"k":{"$serde_json::private::Raw\u0056alue":"{}"}}"#,
            r#"{"x":1,"$serde_json::private::RawValue":"{}"}"#,
        ] {
            assert!(!plain(json.as_bytes()), "{json}");
        }
        for json in [
            r#"{"sub":"a","aud":["b"],"exp":1,"n":null,"t":true,"f":1.5}"#,
            r#"{"name":"caf\u00e9","s":"$serde_json::private::RawValue"}"#,
            r#"{"$serde_json::private::RawValueX":1}"#,
            "",
        ] {
            assert!(plain(json.as_bytes()), "{json}");
        }
    }
}
