//! Order-preserving JSON and Python-flavoured formatting.
//!
//! ComfyUI is Python: dicts keep insertion order, and that order is observable (the execution order
//! of nodes depends on the order of a node's inputs, `/history` lists entries in completion order).
//! `serde_json::Value` sorts object keys in this workspace, so the simulator parses prompts into
//! [`OValue`], which keeps keys in the order they were sent. This module also renders values the
//! way Python's `str()`/`repr()` would, because validation messages embed them.

use std::fmt;

use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::ser::{SerializeMap, SerializeSeq, Serializer};
use serde::{Deserialize, Serialize};
use serde_json::Number;

/// A JSON value whose objects keep their key order.
#[derive(Debug, Clone, PartialEq)]
pub enum OValue {
    /// `null`
    Null,
    /// `true` / `false`
    Bool(bool),
    /// any JSON number
    Number(Number),
    /// a string
    String(String),
    /// an array
    Array(Vec<OValue>),
    /// an object, in insertion order
    Object(OMap),
}

/// A JSON object that keeps insertion order. A repeated key keeps its first position and takes
/// the last value, as a Python dict built by `json.loads` does.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct OMap(Vec<(String, OValue)>);

impl OMap {
    /// An empty object.
    pub fn new() -> Self {
        Self(Vec::new())
    }

    /// Looks a key up.
    pub fn get(&self, key: &str) -> Option<&OValue> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// Looks a key up for in-place changes.
    pub fn get_mut(&mut self, key: &str) -> Option<&mut OValue> {
        self.0.iter_mut().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// Inserts or replaces a key, keeping the first position of an existing key.
    pub fn insert(&mut self, key: impl Into<String>, value: OValue) {
        let key = key.into();
        match self.get_mut(&key) {
            Some(slot) => *slot = value,
            None => self.0.push((key, value)),
        }
    }

    /// Removes a key.
    pub fn remove(&mut self, key: &str) -> Option<OValue> {
        let idx = self.0.iter().position(|(k, _)| k == key)?;
        Some(self.0.remove(idx).1)
    }

    /// Whether the key is present.
    pub fn contains_key(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    /// Entries in order.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &OValue)> {
        self.0.iter().map(|(k, v)| (k, v))
    }

    /// Keys in order.
    pub fn keys(&self) -> impl Iterator<Item = &String> {
        self.0.iter().map(|(k, _)| k)
    }

    /// Whether the object has no keys.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl OValue {
    /// Builds a string value.
    pub fn str(s: impl Into<String>) -> Self {
        OValue::String(s.into())
    }

    /// The object behind this value, if it is one.
    pub fn as_object(&self) -> Option<&OMap> {
        match self {
            OValue::Object(m) => Some(m),
            _ => None,
        }
    }

    /// The mutable object behind this value, if it is one.
    pub fn as_object_mut(&mut self) -> Option<&mut OMap> {
        match self {
            OValue::Object(m) => Some(m),
            _ => None,
        }
    }

    /// The string behind this value, if it is one.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            OValue::String(s) => Some(s),
            _ => None,
        }
    }

    /// The array behind this value, if it is one.
    pub fn as_array(&self) -> Option<&Vec<OValue>> {
        match self {
            OValue::Array(a) => Some(a),
            _ => None,
        }
    }

    /// Looks a key up when this value is an object.
    pub fn get(&self, key: &str) -> Option<&OValue> {
        self.as_object().and_then(|m| m.get(key))
    }

    /// Python truthiness (`bool(x)`).
    pub fn truthy(&self) -> bool {
        match self {
            OValue::Null => false,
            OValue::Bool(b) => *b,
            OValue::Number(n) => n.as_f64().is_some_and(|f| f != 0.0),
            OValue::String(s) => !s.is_empty(),
            OValue::Array(a) => !a.is_empty(),
            OValue::Object(m) => !m.is_empty(),
        }
    }

    /// Converts into a `serde_json::Value` (key order is lost there).
    pub fn to_value(&self) -> serde_json::Value {
        match self {
            OValue::Null => serde_json::Value::Null,
            OValue::Bool(b) => serde_json::Value::Bool(*b),
            OValue::Number(n) => serde_json::Value::Number(n.clone()),
            OValue::String(s) => serde_json::Value::String(s.clone()),
            OValue::Array(a) => serde_json::Value::Array(a.iter().map(OValue::to_value).collect()),
            OValue::Object(m) => serde_json::Value::Object(m.iter().map(|(k, v)| (k.clone(), v.to_value())).collect()),
        }
    }

    /// Parses JSON text, keeping key order.
    pub fn parse(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }

    /// Python `str(x)` of this value, as json.loads would have produced it.
    pub fn py_str(&self) -> String {
        match self {
            OValue::String(s) => s.clone(),
            other => other.py_repr(),
        }
    }

    /// Python `repr(x)` of this value.
    pub fn py_repr(&self) -> String {
        match self {
            OValue::Null => "None".to_string(),
            OValue::Bool(true) => "True".to_string(),
            OValue::Bool(false) => "False".to_string(),
            OValue::Number(n) => py_number(n),
            OValue::String(s) => py_str_repr(s),
            OValue::Array(a) => {
                let items: Vec<String> = a.iter().map(OValue::py_repr).collect();
                format!("[{}]", items.join(", "))
            }
            OValue::Object(m) => {
                let items: Vec<String> =
                    m.iter().map(|(k, v)| format!("{}: {}", py_str_repr(k), v.py_repr())).collect();
                format!("{{{}}}", items.join(", "))
            }
        }
    }

    /// The Python type name of this value (for `TypeError` messages).
    pub fn py_type_name(&self) -> &'static str {
        match self {
            OValue::Null => "NoneType",
            OValue::Bool(_) => "bool",
            OValue::Number(n) if n.is_f64() => "float",
            OValue::Number(_) => "int",
            OValue::String(_) => "str",
            OValue::Array(_) => "list",
            OValue::Object(_) => "dict",
        }
    }
}

/// Python `repr()` of a string: single quotes unless the text contains one and no double quote.
pub fn py_str_repr(s: &str) -> String {
    let quote = if s.contains('\'') && !s.contains('"') { '"' } else { '\'' };
    let mut out = String::with_capacity(s.len() + 2);
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if (c as u32) < 0x20 || c as u32 == 0x7f => out.push_str(&format!("\\x{:02x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push(quote);
    out
}

/// Python `repr()` of a JSON number (`1.0` stays `1.0`, integers stay integers).
pub fn py_number(n: &Number) -> String {
    if let Some(i) = n.as_i64() {
        return i.to_string();
    }
    if let Some(u) = n.as_u64() {
        return u.to_string();
    }
    py_float(n.as_f64().unwrap_or(f64::NAN))
}

/// Python `repr()` of a float.
pub fn py_float(f: f64) -> String {
    if f.is_nan() {
        return "nan".to_string();
    }
    if f.is_infinite() {
        return if f > 0.0 { "inf".to_string() } else { "-inf".to_string() };
    }
    let abs = f.abs();
    if abs != 0.0 && !(1e-4..1e16).contains(&abs) {
        // Python switches to exponent notation outside this range, e.g. `1e+16`, `1e-05`.
        let s = format!("{f:e}");
        let (mantissa, exp) = s.split_once('e').unwrap_or((&s, "0"));
        let exp: i32 = exp.parse().unwrap_or(0);
        let sign = if exp < 0 { '-' } else { '+' };
        return format!("{mantissa}e{sign}{:02}", exp.abs());
    }
    if f.fract() == 0.0 { format!("{f:.1}") } else { format!("{f}") }
}

impl Serialize for OValue {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            OValue::Null => serializer.serialize_unit(),
            OValue::Bool(b) => serializer.serialize_bool(*b),
            OValue::Number(n) => n.serialize(serializer),
            OValue::String(s) => serializer.serialize_str(s),
            OValue::Array(a) => {
                let mut seq = serializer.serialize_seq(Some(a.len()))?;
                for item in a {
                    seq.serialize_element(item)?;
                }
                seq.end()
            }
            OValue::Object(m) => m.serialize(serializer),
        }
    }
}

impl Serialize for OMap {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

impl<'de> Deserialize<'de> for OValue {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(OValueVisitor)
    }
}

struct OValueVisitor;

impl<'de> Visitor<'de> for OValueVisitor {
    type Value = OValue;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<OValue, E> {
        Ok(OValue::Bool(v))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<OValue, E> {
        Ok(OValue::Number(v.into()))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<OValue, E> {
        Ok(OValue::Number(v.into()))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<OValue, E> {
        Ok(Number::from_f64(v).map_or(OValue::Null, OValue::Number))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<OValue, E> {
        Ok(OValue::String(v.to_string()))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<OValue, E> {
        Ok(OValue::String(v))
    }

    fn visit_unit<E: de::Error>(self) -> Result<OValue, E> {
        Ok(OValue::Null)
    }

    fn visit_none<E: de::Error>(self) -> Result<OValue, E> {
        Ok(OValue::Null)
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<OValue, D::Error> {
        OValue::deserialize(d)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<OValue, A::Error> {
        let mut out = Vec::new();
        while let Some(item) = seq.next_element::<OValue>()? {
            out.push(item);
        }
        Ok(OValue::Array(out))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<OValue, A::Error> {
        let mut out = OMap::new();
        while let Some((k, v)) = map.next_entry::<String, OValue>()? {
            out.insert(k, v);
        }
        Ok(OValue::Object(out))
    }
}

/// Serializes `(key, value)` pairs as a JSON object in the given order.
pub struct OrderedPairs<'a, V: Serialize>(pub &'a [(String, V)]);

impl<V: Serialize> Serialize for OrderedPairs<'_, V> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (k, v) in self.0 {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_key_order_and_round_trips() {
        let text = r#"{"b":1,"a":{"z":[1,2.5,"x"],"y":null},"c":true}"#;
        let v = OValue::parse(text.as_bytes()).expect("valid json");
        assert_eq!(serde_json::to_string(&v).expect("serializes"), text);
    }

    #[test]
    fn python_reprs_match_python() {
        assert_eq!(py_float(1.0), "1.0");
        assert_eq!(py_float(0.01), "0.01");
        assert_eq!(py_float(1e16), "1e+16");
        assert_eq!(py_float(1.5e-5), "1.5e-05");
        let list = OValue::parse(br#"["nearest-exact","bilinear"]"#).expect("valid json");
        assert_eq!(list.py_repr(), "['nearest-exact', 'bilinear']");
        assert_eq!(OValue::str("it's").py_repr(), "\"it's\"");
        let obj = OValue::parse(br#"{"a":[1,true,null]}"#).expect("valid json");
        assert_eq!(obj.py_repr(), "{'a': [1, True, None]}");
    }
}
