//! Non-finite numbers never reach a report silently. serde_json writes NaN and ±Inf as `null`,
//! indistinguishable from "not computed", and `verify` then cannot read its own report back
//! into an `f64`. Before any report is written or printed, this serializer walks it and names
//! the first field whose value is not finite, so the command fails with that name (exit 3: a
//! non-finite result from finite, validated input is a failure of the analysis).

use serde::ser::{self, Serialize};

/// The JSON path of the first non-finite number in `x`, if any (`/spectrum/totals/capacity_bits`).
pub(crate) fn first_non_finite<T: Serialize + ?Sized>(x: &T) -> Option<String> {
    let mut w = Walker { path: vec![] };
    match x.serialize(&mut w) {
        Ok(()) => None,
        Err(Found(path)) => Some(path),
    }
}

#[derive(Debug)]
struct Found(String);

impl std::fmt::Display for Found {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "non-finite number at {}", self.0)
    }
}

impl std::error::Error for Found {}

impl ser::Error for Found {
    fn custom<M: std::fmt::Display>(_: M) -> Self {
        // A serialisation failure of another kind is not this check's concern: serde_json
        // reports it when the report is written.
        Found(String::new())
    }
}

struct Walker {
    path: Vec<String>,
}

impl Walker {
    fn found(&self) -> Found {
        Found(if self.path.is_empty() { "/".into() } else { format!("/{}", self.path.join("/")) })
    }
    fn at<T: Serialize + ?Sized>(&mut self, key: String, v: &T) -> Result<(), Found> {
        self.path.push(key);
        v.serialize(&mut *self)?;
        self.path.pop();
        Ok(())
    }
}

/// Map keys as path segments: strings as they are, anything else by its Debug-free display.
struct Key;

macro_rules! key_scalars {
    ($($f:ident: $t:ty),*) => { $(fn $f(self, v: $t) -> Result<String, Found> { Ok(v.to_string()) })* };
}

impl ser::Serializer for Key {
    type Ok = String;
    type Error = Found;
    type SerializeSeq = ser::Impossible<String, Found>;
    type SerializeTuple = ser::Impossible<String, Found>;
    type SerializeTupleStruct = ser::Impossible<String, Found>;
    type SerializeTupleVariant = ser::Impossible<String, Found>;
    type SerializeMap = ser::Impossible<String, Found>;
    type SerializeStruct = ser::Impossible<String, Found>;
    type SerializeStructVariant = ser::Impossible<String, Found>;
    key_scalars!(serialize_bool: bool, serialize_i8: i8, serialize_i16: i16, serialize_i32: i32, serialize_i64: i64,
        serialize_u8: u8, serialize_u16: u16, serialize_u32: u32, serialize_u64: u64, serialize_f32: f32,
        serialize_f64: f64, serialize_char: char, serialize_str: &str);
    fn serialize_bytes(self, _: &[u8]) -> Result<String, Found> {
        Ok("?".into())
    }
    fn serialize_none(self) -> Result<String, Found> {
        Ok("?".into())
    }
    fn serialize_some<T: Serialize + ?Sized>(self, v: &T) -> Result<String, Found> {
        v.serialize(self)
    }
    fn serialize_unit(self) -> Result<String, Found> {
        Ok("?".into())
    }
    fn serialize_unit_struct(self, _: &'static str) -> Result<String, Found> {
        Ok("?".into())
    }
    fn serialize_unit_variant(self, _: &'static str, _: u32, variant: &'static str) -> Result<String, Found> {
        Ok(variant.into())
    }
    fn serialize_newtype_struct<T: Serialize + ?Sized>(self, _: &'static str, v: &T) -> Result<String, Found> {
        v.serialize(self)
    }
    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _: &'static str,
        _: u32,
        variant: &'static str,
        _: &T,
    ) -> Result<String, Found> {
        Ok(variant.into())
    }
    fn serialize_seq(self, _: Option<usize>) -> Result<Self::SerializeSeq, Found> {
        Err(Found("?".into()))
    }
    fn serialize_tuple(self, _: usize) -> Result<Self::SerializeTuple, Found> {
        Err(Found("?".into()))
    }
    fn serialize_tuple_struct(self, _: &'static str, _: usize) -> Result<Self::SerializeTupleStruct, Found> {
        Err(Found("?".into()))
    }
    fn serialize_tuple_variant(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: usize,
    ) -> Result<Self::SerializeTupleVariant, Found> {
        Err(Found("?".into()))
    }
    fn serialize_map(self, _: Option<usize>) -> Result<Self::SerializeMap, Found> {
        Err(Found("?".into()))
    }
    fn serialize_struct(self, _: &'static str, _: usize) -> Result<Self::SerializeStruct, Found> {
        Err(Found("?".into()))
    }
    fn serialize_struct_variant(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: usize,
    ) -> Result<Self::SerializeStructVariant, Found> {
        Err(Found("?".into()))
    }
}

macro_rules! fine_scalars {
    ($($f:ident: $t:ty),*) => { $(fn $f(self, _: $t) -> Result<(), Found> { Ok(()) })* };
}

impl<'a> ser::Serializer for &'a mut Walker {
    type Ok = ();
    type Error = Found;
    type SerializeSeq = Seq<'a>;
    type SerializeTuple = Seq<'a>;
    type SerializeTupleStruct = Seq<'a>;
    type SerializeTupleVariant = Seq<'a>;
    type SerializeMap = Map<'a>;
    type SerializeStruct = Self;
    type SerializeStructVariant = Self;
    fine_scalars!(serialize_bool: bool, serialize_i8: i8, serialize_i16: i16, serialize_i32: i32, serialize_i64: i64,
        serialize_u8: u8, serialize_u16: u16, serialize_u32: u32, serialize_u64: u64, serialize_char: char,
        serialize_str: &str, serialize_bytes: &[u8]);
    fn serialize_f32(self, v: f32) -> Result<(), Found> {
        self.serialize_f64(f64::from(v))
    }
    fn serialize_f64(self, v: f64) -> Result<(), Found> {
        if v.is_finite() {
            Ok(())
        } else {
            Err(self.found())
        }
    }
    fn serialize_none(self) -> Result<(), Found> {
        Ok(())
    }
    fn serialize_some<T: Serialize + ?Sized>(self, v: &T) -> Result<(), Found> {
        v.serialize(self)
    }
    fn serialize_unit(self) -> Result<(), Found> {
        Ok(())
    }
    fn serialize_unit_struct(self, _: &'static str) -> Result<(), Found> {
        Ok(())
    }
    fn serialize_unit_variant(self, _: &'static str, _: u32, _: &'static str) -> Result<(), Found> {
        Ok(())
    }
    fn serialize_newtype_struct<T: Serialize + ?Sized>(self, _: &'static str, v: &T) -> Result<(), Found> {
        v.serialize(self)
    }
    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _: &'static str,
        _: u32,
        variant: &'static str,
        v: &T,
    ) -> Result<(), Found> {
        self.at(variant.into(), v)
    }
    fn serialize_seq(self, _: Option<usize>) -> Result<Seq<'a>, Found> {
        Ok(Seq { w: self, i: 0 })
    }
    fn serialize_tuple(self, _: usize) -> Result<Seq<'a>, Found> {
        Ok(Seq { w: self, i: 0 })
    }
    fn serialize_tuple_struct(self, _: &'static str, _: usize) -> Result<Seq<'a>, Found> {
        Ok(Seq { w: self, i: 0 })
    }
    fn serialize_tuple_variant(self, _: &'static str, _: u32, _: &'static str, _: usize) -> Result<Seq<'a>, Found> {
        Ok(Seq { w: self, i: 0 })
    }
    fn serialize_map(self, _: Option<usize>) -> Result<Map<'a>, Found> {
        Ok(Map { w: self, key: String::new() })
    }
    fn serialize_struct(self, _: &'static str, _: usize) -> Result<Self, Found> {
        Ok(self)
    }
    fn serialize_struct_variant(self, _: &'static str, _: u32, _: &'static str, _: usize) -> Result<Self, Found> {
        Ok(self)
    }
}

/// A sequence: elements are path segments by index.
struct Seq<'a> {
    w: &'a mut Walker,
    i: usize,
}

impl Seq<'_> {
    fn element<T: Serialize + ?Sized>(&mut self, v: &T) -> Result<(), Found> {
        self.w.at(self.i.to_string(), v)?;
        self.i += 1;
        Ok(())
    }
}

macro_rules! seq_impl {
    ($($tr:ident :: $m:ident),*) => {$(
        impl ser::$tr for Seq<'_> {
            type Ok = ();
            type Error = Found;
            fn $m<T: Serialize + ?Sized>(&mut self, v: &T) -> Result<(), Found> {
                self.element(v)
            }
            fn end(self) -> Result<(), Found> {
                Ok(())
            }
        }
    )*};
}

seq_impl!(
    SerializeSeq::serialize_element,
    SerializeTuple::serialize_element,
    SerializeTupleStruct::serialize_field,
    SerializeTupleVariant::serialize_field
);

/// A map: values are path segments by their key.
struct Map<'a> {
    w: &'a mut Walker,
    key: String,
}

impl ser::SerializeMap for Map<'_> {
    type Ok = ();
    type Error = Found;
    fn serialize_key<T: Serialize + ?Sized>(&mut self, k: &T) -> Result<(), Found> {
        self.key = k.serialize(Key).unwrap_or_else(|_| "?".into());
        Ok(())
    }
    fn serialize_value<T: Serialize + ?Sized>(&mut self, v: &T) -> Result<(), Found> {
        self.w.at(std::mem::take(&mut self.key), v)
    }
    fn end(self) -> Result<(), Found> {
        Ok(())
    }
}

impl ser::SerializeStruct for &mut Walker {
    type Ok = ();
    type Error = Found;
    fn serialize_field<T: Serialize + ?Sized>(&mut self, key: &'static str, v: &T) -> Result<(), Found> {
        self.at(key.into(), v)
    }
    fn end(self) -> Result<(), Found> {
        Ok(())
    }
}

impl ser::SerializeStructVariant for &mut Walker {
    type Ok = ();
    type Error = Found;
    fn serialize_field<T: Serialize + ?Sized>(&mut self, key: &'static str, v: &T) -> Result<(), Found> {
        self.at(key.into(), v)
    }
    fn end(self) -> Result<(), Found> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[derive(serde::Serialize)]
    struct Inner {
        ok: f64,
        maybe: Option<f64>,
        list: Vec<f64>,
    }

    #[derive(serde::Serialize)]
    struct Outer {
        name: String,
        inner: Inner,
        by_name: BTreeMap<String, f32>,
    }

    fn outer() -> Outer {
        Outer {
            name: "x".into(),
            inner: Inner { ok: 1.0, maybe: None, list: vec![0.0, 2.5] },
            by_name: [("a".to_string(), 1.0f32)].into_iter().collect(),
        }
    }

    #[test]
    fn finds_the_first_non_finite_number_by_its_path() {
        assert_eq!(first_non_finite(&outer()), None);
        let mut o = outer();
        o.inner.list[1] = f64::NAN;
        assert_eq!(first_non_finite(&o).as_deref(), Some("/inner/list/1"));
        let mut o = outer();
        o.inner.maybe = Some(f64::INFINITY);
        assert_eq!(first_non_finite(&o).as_deref(), Some("/inner/maybe"));
        let mut o = outer();
        o.by_name.insert("b".into(), f32::NEG_INFINITY);
        assert_eq!(first_non_finite(&o).as_deref(), Some("/by_name/b"));
    }
}
