//! Config keys whose value is a short text form of a typed value (`momentum:0.9`,
//! `exp:0.94,50`, `crash:3@10+5`): written with `Display`, read with `FromStr`, so a bad
//! value is refused when the file is read, with the type's own message.

use serde::{de::Error, Deserialize, Deserializer, Serializer};
use std::fmt::Display;
use std::str::FromStr;

/// `#[serde(with = "text")]` for one value.
pub fn serialize<T: Display, S: Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

/// `#[serde(with = "text")]` for one value.
pub fn deserialize<'de, T, D>(d: D) -> Result<T, D::Error>
where
    T: FromStr,
    T::Err: Display,
    D: Deserializer<'de>,
{
    String::deserialize(d)?.parse().map_err(D::Error::custom)
}

/// `#[serde(with = "text::list")]` for a list of values.
pub mod list {
    use super::*;
    use serde::ser::SerializeSeq;

    /// Each value as its text.
    pub fn serialize<T: Display, S: Serializer>(v: &[T], s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(v.len()))?;
        for x in v {
            seq.serialize_element(&x.to_string())?;
        }
        seq.end()
    }

    /// Each text parsed.
    pub fn deserialize<'de, T, D>(d: D) -> Result<Vec<T>, D::Error>
    where
        T: FromStr,
        T::Err: Display,
        D: Deserializer<'de>,
    {
        Vec::<String>::deserialize(d)?.iter().map(|x| x.parse().map_err(D::Error::custom)).collect()
    }
}

/// `#[serde(with = "text::option")]` for an optional value.
pub mod option {
    use super::*;

    /// The value as its text; nothing when unset.
    pub fn serialize<T: Display, S: Serializer>(v: &Option<T>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(v) => s.collect_str(v),
            None => s.serialize_none(),
        }
    }

    /// The text parsed; unset when absent.
    pub fn deserialize<'de, T, D>(d: D) -> Result<Option<T>, D::Error>
    where
        T: FromStr,
        T::Err: Display,
        D: Deserializer<'de>,
    {
        Option::<String>::deserialize(d)?.map(|x| x.parse().map_err(D::Error::custom)).transpose()
    }
}
