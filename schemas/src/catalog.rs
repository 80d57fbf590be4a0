//! The catalog of checked-in Avro schemas (`schemas/avro/`, embedded at
//! build time) and the Avro encoding of event bodies.

use std::collections::BTreeMap;

use apache_avro::{Schema, reader::datum::GenericDatumReader, writer::datum::GenericDatumWriter};
use serde_json::Value;

use crate::{
    Error, embedded,
    json::{ShapeError, ToAvro, to_json},
    topics::{subject, topic_for_event},
};

/// One schema of the catalog.
#[derive(Debug, Clone)]
struct Entry {
    /// Relative to `schemas/avro/`, e.g. `eventfold.orders.v1/OrderCreated.v2.avsc`.
    path: String,
    text: String,
    schema: Schema,
    full_name: String,
}

/// Every event type and version with its Avro schema.
#[derive(Debug, Clone)]
pub struct Catalog {
    entries: BTreeMap<(String, u32), Entry>,
}

impl Catalog {
    /// The checked-in schemas, embedded in the binary when it was built.
    pub fn load() -> Result<Catalog, Error> {
        Self::from_files(embedded::AVRO_FILES.iter().map(|(path, text)| (*path, *text)))
    }

    /// A catalog of `(path, text)` files, paths relative to `schemas/avro/`
    /// (`<package>/<EventType>.v<version>.avsc`).
    pub fn from_files<'a>(files: impl IntoIterator<Item = (&'a str, &'a str)>) -> Result<Catalog, Error> {
        let mut entries = BTreeMap::new();
        for (path, text) in files {
            let bad = |message: String| Error::SchemaFile { path: path.to_owned(), message };
            let (event_type, version) =
                parse_file_name(path).ok_or_else(|| bad("not named <package>/<EventType>.v<N>.avsc".to_owned()))?;
            let schema = Schema::parse_str(text).map_err(|e| bad(format!("not a valid Avro schema: {e}")))?;
            let full_name = match &schema {
                Schema::Record(r) => r.name.fullname(None),
                _ => return Err(bad("the top-level type is not a record".to_owned())),
            };
            let entry = Entry { path: path.to_owned(), text: text.to_owned(), schema, full_name };
            if let Some(other) = entries.insert((event_type.to_owned(), version), entry) {
                return Err(bad(format!("{event_type} v{version} has a schema in {} too", other.path)));
            }
        }
        Ok(Catalog { entries })
    }

    /// Every (event type, version) of the catalog, sorted.
    pub fn events(&self) -> impl Iterator<Item = (&str, u32)> {
        self.entries.keys().map(|(t, v)| (t.as_str(), *v))
    }

    pub fn schema(&self, event_type: &str, version: u32) -> Option<&Schema> {
        self.entry(event_type, version).map(|e| &e.schema)
    }

    /// The schema file's text, as registered.
    pub fn text(&self, event_type: &str, version: u32) -> Option<&str> {
        self.entry(event_type, version).map(|e| e.text.as_str())
    }

    /// The full name of the record, e.g. `eventfold.orders.v1.OrderCreated`.
    pub fn full_name(&self, event_type: &str, version: u32) -> Option<String> {
        self.entry(event_type, version).map(|e| e.full_name.clone())
    }

    /// The registry subject of the schema: `{topic}-{record full name}`
    /// (TopicRecordNameStrategy), the topic from [`topic_for_event`].
    pub fn subject(&self, event_type: &str, version: u32) -> Option<String> {
        Some(subject(topic_for_event(event_type)?, &self.full_name(event_type, version)?))
    }

    /// The Avro datum of an event body (the JSON the store holds).
    pub fn encode(&self, event_type: &str, version: u32, data: &Value) -> Result<Vec<u8>, Error> {
        let entry = self.entry_or_error(event_type, version)?;
        let value = ToAvro::new(&entry.schema)
            .convert(&entry.schema, data, "")
            .map_err(|e| shape_error(event_type, version, e))?;
        GenericDatumWriter::builder(&entry.schema)
            .build()
            .and_then(|writer| writer.write_value_to_vec(value))
            .map_err(|e| Error::Avro { event_type: event_type.to_owned(), version, message: e.to_string() })
    }

    /// The JSON body of an Avro datum, as the store holds it.
    pub fn decode(&self, event_type: &str, version: u32, body: &[u8]) -> Result<Value, Error> {
        self.decode_inner(event_type, version, None, body)
    }

    /// [`Catalog::decode`] of a datum written with `writer` (the schema the
    /// registry holds for the datum's id), resolved to this catalog's
    /// schema of the event (Avro schema resolution: defaults for fields the
    /// writer did not have, fields the reader does not know dropped).
    pub fn decode_written_with(
        &self,
        event_type: &str,
        version: u32,
        writer: &Schema,
        body: &[u8],
    ) -> Result<Value, Error> {
        self.decode_inner(event_type, version, Some(writer), body)
    }

    fn decode_inner(
        &self,
        event_type: &str,
        version: u32,
        writer: Option<&Schema>,
        body: &[u8],
    ) -> Result<Value, Error> {
        let entry = self.entry_or_error(event_type, version)?;
        let avro_error = |message: String| Error::Avro { event_type: event_type.to_owned(), version, message };
        let mut reader = body;
        let value = match writer {
            None => GenericDatumReader::builder(&entry.schema).build(),
            Some(writer) => GenericDatumReader::builder(writer).reader_schema(&entry.schema).build(),
        }
        .and_then(|datum_reader| datum_reader.read_value(&mut reader))
        .map_err(|e| avro_error(e.to_string()))?;
        if !reader.is_empty() {
            return Err(avro_error(format!("{} bytes left after the datum", reader.len())));
        }
        to_json(value, "").map_err(|e| shape_error(event_type, version, e))
    }

    fn entry(&self, event_type: &str, version: u32) -> Option<&Entry> {
        self.entries.get(&(event_type.to_owned(), version))
    }

    fn entry_or_error(&self, event_type: &str, version: u32) -> Result<&Entry, Error> {
        self.entry(event_type, version)
            .ok_or_else(|| Error::UnknownEvent { event_type: event_type.to_owned(), version })
    }
}

fn shape_error(event_type: &str, version: u32, e: ShapeError) -> Error {
    Error::Shape { event_type: event_type.to_owned(), version, path: e.path, message: e.message }
}

/// `eventfold.orders.v1/OrderCreated.v2.avsc` → (`OrderCreated`, 2).
fn parse_file_name(path: &str) -> Option<(&str, u32)> {
    let file = path.rsplit('/').next()?;
    let stem = file.strip_suffix(".avsc")?;
    let (event_type, version) = stem.rsplit_once(".v")?;
    let version = version.parse().ok()?;
    (!event_type.is_empty()).then_some((event_type, version))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_give_type_and_version() {
        assert_eq!(parse_file_name("eventfold.orders.v1/OrderCreated.v2.avsc"), Some(("OrderCreated", 2)));
        assert_eq!(parse_file_name("OrderCreated.v10.avsc"), Some(("OrderCreated", 10)));
        assert_eq!(parse_file_name("x/OrderCreated.avsc"), None);
        assert_eq!(parse_file_name("x/OrderCreated.vX.avsc"), None);
        assert_eq!(parse_file_name("x/.v1.avsc"), None);
    }

    #[test]
    fn a_bad_file_is_named_in_the_error() {
        let err = Catalog::from_files([("p.v1/X.v1.avsc", "{")]).unwrap_err();
        assert!(err.to_string().contains("p.v1/X.v1.avsc"), "{err}");
        let err = Catalog::from_files([("p.v1/X.avsc", "\"string\"")]).unwrap_err();
        assert!(err.to_string().contains("<EventType>.v<N>.avsc"), "{err}");
        let err = Catalog::from_files([("p.v1/X.v1.avsc", "\"string\"")]).unwrap_err();
        assert!(err.to_string().contains("not a record"), "{err}");
    }
}
