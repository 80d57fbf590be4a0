//! Schema-guided conversion between an event's JSON body (as the store
//! holds it) and Avro values.
//!
//! JSON forms: records are objects with exactly the schema's fields
//! (a missing field is allowed only when it has a default; an unknown one
//! is an error), arrays are arrays, maps are objects, `["null", T]` unions
//! are `null` or the `T` value, enums are their symbol, long/int/timestamp
//! values are integers, bytes and fixed are base64 strings (proto3 JSON),
//! uuids are strings.

use std::collections::HashMap;

use apache_avro::{
    Schema,
    schema::{Name, RecordSchema, UnionSchema},
    types::Value as Avro,
};
use base64::Engine as _;
use serde_json::{Map, Number, Value as Json};

/// A conversion failure: where in the body, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ShapeError {
    pub(crate) path: String,
    pub(crate) message: String,
}

/// The named types of a schema by full name, to resolve references.
pub(crate) fn named_types(schema: &Schema) -> HashMap<String, &Schema> {
    fn walk<'s>(schema: &'s Schema, names: &mut HashMap<String, &'s Schema>) {
        match schema {
            Schema::Record(RecordSchema { name, fields, .. }) => {
                names.insert(full(name), schema);
                for field in fields {
                    walk(&field.schema, names);
                }
            }
            Schema::Enum(e) => {
                names.insert(full(&e.name), schema);
            }
            Schema::Fixed(f) => {
                names.insert(full(&f.name), schema);
            }
            Schema::Array(a) => walk(&a.items, names),
            Schema::Map(m) => walk(&m.types, names),
            Schema::Union(u) => {
                for variant in u.variants() {
                    walk(variant, names);
                }
            }
            _ => {}
        }
    }
    let mut names = HashMap::new();
    walk(schema, &mut names);
    names
}

fn full(name: &Name) -> String {
    name.fullname(None)
}

pub(crate) struct ToAvro<'s> {
    names: HashMap<String, &'s Schema>,
}

impl<'s> ToAvro<'s> {
    pub(crate) fn new(schema: &'s Schema) -> Self {
        Self { names: named_types(schema) }
    }

    pub(crate) fn convert(&self, schema: &'s Schema, json: &Json, path: &str) -> Result<Avro, ShapeError> {
        let fail = |message: String| ShapeError { path: display_path(path), message };
        let expected = |what: &str| fail(format!("expected {what}, got {}", describe(json)));
        Ok(match schema {
            Schema::Null => match json {
                Json::Null => Avro::Null,
                _ => return Err(expected("null")),
            },
            Schema::Boolean => Avro::Boolean(json.as_bool().ok_or_else(|| expected("a boolean"))?),
            Schema::Int => Avro::Int(self.int(json).ok_or_else(|| expected("an integer within 32 bits"))?),
            Schema::Long => Avro::Long(json.as_i64().ok_or_else(|| expected("an integer within 64 bits"))?),
            Schema::Float => Avro::Float(json.as_f64().ok_or_else(|| expected("a number"))? as f32),
            Schema::Double => Avro::Double(json.as_f64().ok_or_else(|| expected("a number"))?),
            Schema::String => Avro::String(json.as_str().ok_or_else(|| expected("a string"))?.to_owned()),
            Schema::Bytes => Avro::Bytes(self.base64(json).ok_or_else(|| expected("a base64 string"))?),
            Schema::Fixed(f) => {
                let bytes = self.base64(json).ok_or_else(|| expected("a base64 string"))?;
                if bytes.len() != f.size {
                    return Err(fail(format!("expected {} bytes, got {}", f.size, bytes.len())));
                }
                Avro::Fixed(f.size, bytes)
            }
            Schema::Enum(e) => {
                let symbol = json.as_str().ok_or_else(|| expected("an enum symbol"))?;
                let index = e
                    .symbols
                    .iter()
                    .position(|s| s == symbol)
                    .ok_or_else(|| fail(format!("{symbol:?} is not one of {:?}", e.symbols)))?;
                Avro::Enum(index as u32, symbol.to_owned())
            }
            Schema::Array(a) => {
                let items = json.as_array().ok_or_else(|| expected("an array"))?;
                let mut out = Vec::with_capacity(items.len());
                for (i, item) in items.iter().enumerate() {
                    out.push(self.convert(&a.items, item, &format!("{path}[{i}]"))?);
                }
                Avro::Array(out)
            }
            Schema::Map(m) => {
                let object = json.as_object().ok_or_else(|| expected("an object"))?;
                let mut out = HashMap::with_capacity(object.len());
                for (key, value) in object {
                    out.insert(key.clone(), self.convert(&m.types, value, &format!("{path}[{key:?}]"))?);
                }
                Avro::Map(out)
            }
            Schema::Union(u) => self.union(u, json, path)?,
            Schema::Record(r) => self.record(r, json, path)?,
            Schema::Ref { name } => {
                let target =
                    self.names.get(&full(name)).ok_or_else(|| fail(format!("unknown named type {}", full(name))))?;
                self.convert(target, json, path)?
            }
            Schema::Date => Avro::Date(self.int(json).ok_or_else(|| expected("a day number within 32 bits"))?),
            Schema::TimeMillis => Avro::TimeMillis(self.int(json).ok_or_else(|| expected("an integer"))?),
            Schema::TimeMicros => Avro::TimeMicros(json.as_i64().ok_or_else(|| expected("an integer"))?),
            Schema::TimestampMillis => Avro::TimestampMillis(json.as_i64().ok_or_else(|| expected("an integer"))?),
            Schema::TimestampMicros => Avro::TimestampMicros(json.as_i64().ok_or_else(|| expected("an integer"))?),
            Schema::TimestampNanos => Avro::TimestampNanos(json.as_i64().ok_or_else(|| expected("an integer"))?),
            Schema::Uuid(_) => {
                let text = json.as_str().ok_or_else(|| expected("a uuid string"))?;
                Avro::Uuid(text.parse().map_err(|e| fail(format!("{text:?} is not a uuid: {e}")))?)
            }
            other => return Err(fail(format!("the schema type {other:?} is not supported in event bodies"))),
        })
    }

    fn int(&self, json: &Json) -> Option<i32> {
        json.as_i64().and_then(|n| i32::try_from(n).ok())
    }

    fn base64(&self, json: &Json) -> Option<Vec<u8>> {
        base64::engine::general_purpose::STANDARD.decode(json.as_str()?).ok()
    }

    fn union(&self, union: &'s UnionSchema, json: &Json, path: &str) -> Result<Avro, ShapeError> {
        let variants = union.variants();
        if json.is_null()
            && let Some(i) = variants.iter().position(|v| matches!(v, Schema::Null))
        {
            return Ok(Avro::Union(i as u32, Box::new(Avro::Null)));
        }
        let mut first_error = None;
        for (i, variant) in variants.iter().enumerate() {
            if matches!(variant, Schema::Null) {
                continue;
            }
            match self.convert(variant, json, path) {
                Ok(value) => return Ok(Avro::Union(i as u32, Box::new(value))),
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        Err(first_error.unwrap_or_else(|| ShapeError {
            path: display_path(path),
            message: format!("expected null, got {}", describe(json)),
        }))
    }

    fn record(&self, record: &'s RecordSchema, json: &Json, path: &str) -> Result<Avro, ShapeError> {
        let object = json.as_object().ok_or_else(|| ShapeError {
            path: display_path(path),
            message: format!("expected an object ({}), got {}", full(&record.name), describe(json)),
        })?;
        if let Some(unknown) = object.keys().find(|k| !record.lookup.contains_key(*k)) {
            return Err(ShapeError {
                path: display_path(&join(path, unknown)),
                message: format!("{} has no such field", full(&record.name)),
            });
        }
        let mut fields = Vec::with_capacity(record.fields.len());
        for field in &record.fields {
            let field_path = join(path, &field.name);
            let value = match (object.get(&field.name), &field.default) {
                (Some(value), _) => self.convert(&field.schema, value, &field_path)?,
                // A union's default is a value of its first variant.
                (None, Some(default)) => match &field.schema {
                    Schema::Union(u) => {
                        let first = u.variants().first().ok_or_else(|| ShapeError {
                            path: display_path(&field_path),
                            message: "empty union".to_owned(),
                        })?;
                        Avro::Union(0, Box::new(self.convert(first, default, &field_path)?))
                    }
                    schema => self.convert(schema, default, &field_path)?,
                },
                (None, None) => {
                    return Err(ShapeError {
                        path: display_path(&field_path),
                        message: "missing, and the field has no default".to_owned(),
                    });
                }
            };
            fields.push((field.name.clone(), value));
        }
        Ok(Avro::Record(fields))
    }
}

/// The JSON body of a decoded Avro value.
pub(crate) fn to_json(value: Avro, path: &str) -> Result<Json, ShapeError> {
    let fail = |message: String| ShapeError { path: display_path(path), message };
    Ok(match value {
        Avro::Null => Json::Null,
        Avro::Boolean(b) => Json::Bool(b),
        Avro::Int(n) | Avro::Date(n) | Avro::TimeMillis(n) => Json::from(n),
        Avro::Long(n)
        | Avro::TimeMicros(n)
        | Avro::TimestampMillis(n)
        | Avro::TimestampMicros(n)
        | Avro::TimestampNanos(n)
        | Avro::LocalTimestampMillis(n)
        | Avro::LocalTimestampMicros(n)
        | Avro::LocalTimestampNanos(n) => Json::from(n),
        Avro::Float(f) => Number::from_f64(f64::from(f)).map(Json::Number).ok_or_else(|| fail(format!("{f}")))?,
        Avro::Double(f) => Number::from_f64(f).map(Json::Number).ok_or_else(|| fail(format!("{f}")))?,
        Avro::String(s) => Json::String(s),
        Avro::Bytes(b) | Avro::Fixed(_, b) => Json::String(base64::engine::general_purpose::STANDARD.encode(b)),
        Avro::Enum(_, symbol) => Json::String(symbol),
        Avro::Union(_, value) => to_json(*value, path)?,
        Avro::Array(items) => Json::Array(
            items
                .into_iter()
                .enumerate()
                .map(|(i, v)| to_json(v, &format!("{path}[{i}]")))
                .collect::<Result<_, _>>()?,
        ),
        Avro::Map(entries) => {
            let mut out = Map::new();
            for (k, v) in entries {
                let value = to_json(v, &format!("{path}[{k:?}]"))?;
                out.insert(k, value);
            }
            Json::Object(out)
        }
        Avro::Record(fields) => {
            let mut out = Map::new();
            for (name, v) in fields {
                // A field with explicit presence (`["null", T]`) that is
                // null was absent: the body leaves it out, as the domain
                // and proto3 JSON do.
                if matches!(&v, Avro::Union(_, inner) if matches!(**inner, Avro::Null)) {
                    continue;
                }
                let value = to_json(v, &join(path, &name))?;
                out.insert(name, value);
            }
            Json::Object(out)
        }
        Avro::Uuid(u) => Json::String(u.to_string()),
        other => return Err(fail(format!("the Avro value {other:?} has no JSON form here"))),
    })
}

fn join(path: &str, field: &str) -> String {
    if path.is_empty() { field.to_owned() } else { format!("{path}.{field}") }
}

fn display_path(path: &str) -> String {
    if path.is_empty() { "the body".to_owned() } else { path.to_owned() }
}

fn describe(json: &Json) -> String {
    let text = json.to_string();
    if text.len() <= 60 {
        return text;
    }
    let mut end = 60;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}
