//! Avro schemas generated from the proto descriptors of the events.
//!
//! Mapping: the record is named like the proto message, in the proto
//! package as namespace; fields keep the proto order and names; string →
//! string, (s)int64/(s)fixed64/uint64 → long, (s)int32/(s)fixed32/uint32 →
//! int, bool → boolean, double → double, float → float, bytes → bytes, enum
//! → Avro enum (default: the proto zero value), message → nested record
//! (defined once, then referenced by its full name), map → map,
//! `google.protobuf.Timestamp` → long with logicalType timestamp-micros,
//! repeated → array. A field gets a default only when proto gives it
//! explicit presence (`optional`, or a member of a `oneof`): then it is the
//! union `["null", T]` with default null.

use std::{
    collections::{BTreeMap, HashSet},
    path::PathBuf,
};

use prost::Message as _;
use prost_types::{
    DescriptorProto, EnumDescriptorProto, FieldDescriptorProto, FileDescriptorSet,
    field_descriptor_proto::{Label, Type},
};
use serde::Serialize;
use serde_json::Value;

use crate::{Error, topics::event_types};

/// Where the generated files live, relative to the repository root.
pub const AVRO_DIR: &str = "schemas/avro";

/// Event versions that no proto message describes any more: their schema
/// is written by hand here, from the body shape the upcasters read.
/// (event type, version, package of its topic, schema).
fn legacy_schemas() -> Vec<(&'static str, u32, &'static str, RecordType)> {
    // `OrderCreated` v1, see `eventfold_domain::upcast`: amounts are decimal
    // strings in the legacy currency, and there is no `currency` field.
    let namespace = "eventfold.orders.v1.legacy";
    let item = RecordType::new(
        "OrderItem",
        namespace,
        vec![
            Field::new("product_id", AvroType::name("string")),
            Field::new("quantity", AvroType::name("int")),
            Field::new("unit_price", AvroType::name("string")),
        ],
    );
    let created = RecordType::new(
        "OrderCreated",
        namespace,
        vec![
            Field::new("order_id", AvroType::name("string")),
            Field::new("customer_id", AvroType::name("string")),
            Field::new("items", AvroType::Array(ArrayType::new(AvroType::Record(Box::new(item))))),
            Field::new("total", AvroType::name("string")),
        ],
    );
    vec![("OrderCreated", 1, "eventfold.orders.v1", created)]
}

/// The Avro schema file of every event type and version: the current
/// versions generated from their proto messages in `descriptor_set` (an
/// encoded `FileDescriptorSet` with imports, e.g.
/// `eventfold_proto::FILE_DESCRIPTOR_SET`), older ones written by hand
/// here (`OrderCreated` v1). Paths are relative to the repository root
/// (`schemas/avro/<package>/<Type>.v<version>.avsc`), texts are pretty
/// JSON ending in a newline; sorted by path.
pub fn generate(descriptor_set: &[u8]) -> Result<Vec<(PathBuf, String)>, Error> {
    let set = FileDescriptorSet::decode(descriptor_set)
        .map_err(|e| Error::Descriptor(format!("cannot decode the descriptor set: {e}")))?;
    let index = Index::new(&set);
    let mut files = BTreeMap::new();
    for event in event_types() {
        let full_name = format!("{}.{}", event.topic, event.name);
        let record = Generator::new(&index).record(&full_name)?;
        files.insert(file_path(event.topic, event.name, event.current_version), to_text(&record)?);
    }
    for (event_type, version, package, record) in legacy_schemas() {
        files.insert(file_path(package, event_type, version), to_text(&record)?);
    }
    Ok(files.into_iter().collect())
}

/// `schemas/avro/<package>/<event_type>.v<version>.avsc`.
pub fn file_path(package: &str, event_type: &str, version: u32) -> PathBuf {
    PathBuf::from(AVRO_DIR).join(package).join(format!("{event_type}.v{version}.avsc"))
}

fn to_text(record: &RecordType) -> Result<String, Error> {
    let mut text = serde_json::to_string_pretty(record)
        .map_err(|e| Error::Descriptor(format!("cannot write the schema of {}: {e}", record.name)))?;
    text.push('\n');
    Ok(text)
}

/// Avro schema JSON, serialized with the keys in declaration order.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
enum AvroType {
    /// A primitive type or a reference to a named type by its full name.
    Name(String),
    Record(Box<RecordType>),
    Enum(EnumType),
    Array(ArrayType),
    Map(MapType),
    Logical(LogicalType),
    Union(Vec<AvroType>),
}

impl AvroType {
    fn name(name: &str) -> Self {
        Self::Name(name.to_owned())
    }
}

#[derive(Debug, Clone, Serialize)]
struct RecordType {
    #[serde(rename = "type")]
    kind: &'static str,
    name: String,
    namespace: String,
    fields: Vec<Field>,
}

impl RecordType {
    fn new(name: &str, namespace: &str, fields: Vec<Field>) -> Self {
        Self { kind: "record", name: name.to_owned(), namespace: namespace.to_owned(), fields }
    }
}

#[derive(Debug, Clone, Serialize)]
struct Field {
    name: String,
    #[serde(rename = "type")]
    ty: AvroType,
    #[serde(skip_serializing_if = "Option::is_none")]
    default: Option<Value>,
}

impl Field {
    fn new(name: &str, ty: AvroType) -> Self {
        Self { name: name.to_owned(), ty, default: None }
    }
}

#[derive(Debug, Clone, Serialize)]
struct EnumType {
    #[serde(rename = "type")]
    kind: &'static str,
    name: String,
    namespace: String,
    symbols: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    default: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
struct ArrayType {
    #[serde(rename = "type")]
    kind: &'static str,
    items: Box<AvroType>,
}

impl ArrayType {
    fn new(items: AvroType) -> Self {
        Self { kind: "array", items: Box::new(items) }
    }
}

#[derive(Debug, Clone, Serialize)]
struct MapType {
    #[serde(rename = "type")]
    kind: &'static str,
    values: Box<AvroType>,
}

#[derive(Debug, Clone, Serialize)]
struct LogicalType {
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(rename = "logicalType")]
    logical_type: &'static str,
}

/// Messages and enums of a descriptor set by full name (without the
/// leading dot), with the Avro namespace of each (the proto package plus
/// the enclosing messages).
struct Index<'a> {
    /// (message, Avro namespace, whether its file is proto2).
    messages: BTreeMap<String, (&'a DescriptorProto, String, bool)>,
    enums: BTreeMap<String, (&'a EnumDescriptorProto, String)>,
}

impl<'a> Index<'a> {
    fn new(set: &'a FileDescriptorSet) -> Self {
        let mut index = Index { messages: BTreeMap::new(), enums: BTreeMap::new() };
        for file in &set.file {
            let package = file.package();
            let proto2 = matches!(file.syntax(), "" | "proto2");
            for message in &file.message_type {
                index.add_message(package, message, proto2);
            }
            for e in &file.enum_type {
                index.enums.insert(join(package, e.name()), (e, package.to_owned()));
            }
        }
        index
    }

    fn add_message(&mut self, scope: &str, message: &'a DescriptorProto, proto2: bool) {
        let full_name = join(scope, message.name());
        for nested in &message.nested_type {
            self.add_message(&full_name, nested, proto2);
        }
        for e in &message.enum_type {
            self.enums.insert(join(&full_name, e.name()), (e, full_name.clone()));
        }
        self.messages.insert(full_name, (message, scope.to_owned(), proto2));
    }
}

fn join(scope: &str, name: &str) -> String {
    if scope.is_empty() { name.to_owned() } else { format!("{scope}.{name}") }
}

/// One schema's generation: remembers the named types already defined in
/// it, so that later uses refer to them by full name.
struct Generator<'i, 'a> {
    index: &'i Index<'a>,
    defined: HashSet<String>,
}

impl<'i, 'a> Generator<'i, 'a> {
    fn new(index: &'i Index<'a>) -> Self {
        Self { index, defined: HashSet::new() }
    }

    fn record(&mut self, full_name: &str) -> Result<RecordType, Error> {
        let (message, namespace, proto2) = self
            .index
            .messages
            .get(full_name)
            .ok_or_else(|| Error::Descriptor(format!("no proto message {full_name} in the descriptor set")))?;
        self.defined.insert(full_name.to_owned());
        let mut fields = Vec::with_capacity(message.field.len());
        for field in &message.field {
            fields.push(self.field(full_name, field, *proto2)?);
        }
        Ok(RecordType::new(message.name(), namespace, fields))
    }

    fn field(&mut self, message: &str, field: &FieldDescriptorProto, proto2: bool) -> Result<Field, Error> {
        let ty = self.field_type(message, field)?;
        // Explicit presence: proto3 `optional`, oneof members, proto2
        // `optional`. A proto3 message field without `optional` counts as
        // always there (its JSON body always has it).
        let explicit_presence =
            field.proto3_optional() || field.oneof_index.is_some() || (proto2 && field.label() == Label::Optional);
        Ok(if explicit_presence {
            Field {
                name: field.name().to_owned(),
                ty: AvroType::Union(vec![AvroType::name("null"), ty]),
                default: Some(Value::Null),
            }
        } else {
            Field::new(field.name(), ty)
        })
    }

    fn field_type(&mut self, message: &str, field: &FieldDescriptorProto) -> Result<AvroType, Error> {
        if field.label() == Label::Repeated {
            if let Some(entry) = self.map_entry(field) {
                let value = entry.field.iter().find(|f| f.number() == 2).ok_or_else(|| {
                    Error::Descriptor(format!("map entry of {message}.{} has no value field", field.name()))
                })?;
                let values = self.single_type(message, value)?;
                return Ok(AvroType::Map(MapType { kind: "map", values: Box::new(values) }));
            }
            return Ok(AvroType::Array(ArrayType::new(self.single_type(message, field)?)));
        }
        self.single_type(message, field)
    }

    fn map_entry(&self, field: &FieldDescriptorProto) -> Option<&'a DescriptorProto> {
        if field.r#type() != Type::Message {
            return None;
        }
        let (entry, _, _) = self.index.messages.get(field.type_name().trim_start_matches('.'))?;
        entry.options.as_ref().and_then(|o| o.map_entry).unwrap_or(false).then_some(*entry)
    }

    fn single_type(&mut self, message: &str, field: &FieldDescriptorProto) -> Result<AvroType, Error> {
        Ok(match field.r#type() {
            Type::String => AvroType::name("string"),
            Type::Bytes => AvroType::name("bytes"),
            Type::Bool => AvroType::name("boolean"),
            Type::Double => AvroType::name("double"),
            Type::Float => AvroType::name("float"),
            Type::Int64 | Type::Uint64 | Type::Sint64 | Type::Fixed64 | Type::Sfixed64 => AvroType::name("long"),
            Type::Int32 | Type::Uint32 | Type::Sint32 | Type::Fixed32 | Type::Sfixed32 => AvroType::name("int"),
            Type::Enum => self.enumeration(field.type_name().trim_start_matches('.'))?,
            Type::Message => {
                let name = field.type_name().trim_start_matches('.');
                if name == "google.protobuf.Timestamp" {
                    AvroType::Logical(LogicalType { kind: "long", logical_type: "timestamp-micros" })
                } else if self.defined.contains(name) {
                    AvroType::name(name)
                } else {
                    AvroType::Record(Box::new(self.record(name)?))
                }
            }
            Type::Group => {
                return Err(Error::Descriptor(format!(
                    "{message}.{} is a proto2 group, which has no Avro mapping",
                    field.name()
                )));
            }
        })
    }

    fn enumeration(&mut self, full_name: &str) -> Result<AvroType, Error> {
        if self.defined.contains(full_name) {
            return Ok(AvroType::name(full_name));
        }
        let (e, namespace) = self
            .index
            .enums
            .get(full_name)
            .ok_or_else(|| Error::Descriptor(format!("no proto enum {full_name} in the descriptor set")))?;
        self.defined.insert(full_name.to_owned());
        let mut symbols: Vec<String> = Vec::with_capacity(e.value.len());
        for value in &e.value {
            // Aliases (allow_alias) share a number: Avro has one symbol each.
            if !symbols.iter().any(|s| s == value.name()) {
                symbols.push(value.name().to_owned());
            }
        }
        let default = e.value.iter().find(|v| v.number() == 0).map(|v| v.name().to_owned());
        Ok(AvroType::Enum(EnumType {
            kind: "enum",
            name: e.name().to_owned(),
            namespace: namespace.clone(),
            symbols,
            default,
        }))
    }
}

#[cfg(test)]
mod tests {
    use prost_types::{EnumValueDescriptorProto, FileDescriptorProto, MessageOptions, field_descriptor_proto::Label};

    use super::*;

    fn field(name: &str, number: i32, ty: Type, type_name: Option<&str>, label: Label) -> FieldDescriptorProto {
        FieldDescriptorProto {
            name: Some(name.to_owned()),
            number: Some(number),
            r#type: Some(ty as i32),
            type_name: type_name.map(str::to_owned),
            label: Some(label as i32),
            ..Default::default()
        }
    }

    /// Every mapping rule on one synthetic message.
    #[test]
    fn proto_types_map_to_avro_types() {
        let mut optional = field("nickname", 9, Type::String, None, Label::Optional);
        optional.proto3_optional = Some(true);
        optional.oneof_index = Some(0);
        let message = DescriptorProto {
            name: Some("Thing".to_owned()),
            field: vec![
                field("id", 1, Type::String, None, Label::Optional),
                field("count", 2, Type::Uint64, None, Label::Optional),
                field("small", 3, Type::Sint32, None, Label::Optional),
                field("ok", 4, Type::Bool, None, Label::Optional),
                field("ratio", 5, Type::Double, None, Label::Optional),
                field("blob", 6, Type::Bytes, None, Label::Optional),
                field("state", 7, Type::Enum, Some(".x.v1.State"), Label::Optional),
                field("at", 8, Type::Message, Some(".google.protobuf.Timestamp"), Label::Optional),
                optional,
                field("parts", 10, Type::Message, Some(".x.v1.Part"), Label::Repeated),
                field("main", 11, Type::Message, Some(".x.v1.Part"), Label::Optional),
                field("labels", 12, Type::Message, Some(".x.v1.Thing.LabelsEntry"), Label::Repeated),
                field("states", 13, Type::Enum, Some(".x.v1.State"), Label::Repeated),
            ],
            nested_type: vec![DescriptorProto {
                name: Some("LabelsEntry".to_owned()),
                field: vec![
                    field("key", 1, Type::String, None, Label::Optional),
                    field("value", 2, Type::Int32, None, Label::Optional),
                ],
                options: Some(MessageOptions { map_entry: Some(true), ..Default::default() }),
                ..Default::default()
            }],
            oneof_decl: vec![prost_types::OneofDescriptorProto {
                name: Some("_nickname".to_owned()),
                ..Default::default()
            }],
            ..Default::default()
        };
        let part = DescriptorProto {
            name: Some("Part".to_owned()),
            field: vec![field("sku", 1, Type::String, None, Label::Optional)],
            ..Default::default()
        };
        let state = EnumDescriptorProto {
            name: Some("State".to_owned()),
            value: vec![
                EnumValueDescriptorProto { name: Some("STATE_UNSPECIFIED".to_owned()), number: Some(0), options: None },
                EnumValueDescriptorProto { name: Some("STATE_ON".to_owned()), number: Some(1), options: None },
            ],
            ..Default::default()
        };
        let set = FileDescriptorSet {
            file: vec![FileDescriptorProto {
                name: Some("x/v1/x.proto".to_owned()),
                package: Some("x.v1".to_owned()),
                message_type: vec![message, part],
                enum_type: vec![state],
                syntax: Some("proto3".to_owned()),
                ..Default::default()
            }],
        };
        let index = Index::new(&set);
        let record = Generator::new(&index).record("x.v1.Thing").unwrap();
        let json = serde_json::to_value(&record).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "type": "record", "name": "Thing", "namespace": "x.v1",
                "fields": [
                    { "name": "id", "type": "string" },
                    { "name": "count", "type": "long" },
                    { "name": "small", "type": "int" },
                    { "name": "ok", "type": "boolean" },
                    { "name": "ratio", "type": "double" },
                    { "name": "blob", "type": "bytes" },
                    { "name": "state", "type": {
                        "type": "enum", "name": "State", "namespace": "x.v1",
                        "symbols": ["STATE_UNSPECIFIED", "STATE_ON"], "default": "STATE_UNSPECIFIED"
                    } },
                    { "name": "at", "type": { "type": "long", "logicalType": "timestamp-micros" } },
                    { "name": "nickname", "type": ["null", "string"], "default": null },
                    { "name": "parts", "type": { "type": "array", "items": {
                        "type": "record", "name": "Part", "namespace": "x.v1",
                        "fields": [{ "name": "sku", "type": "string" }]
                    } } },
                    { "name": "main", "type": "x.v1.Part" },
                    { "name": "labels", "type": { "type": "map", "values": "int" } },
                    { "name": "states", "type": { "type": "array", "items": "x.v1.State" } },
                ]
            })
        );
        // And apache-avro accepts it.
        apache_avro::Schema::parse_str(&to_text(&record).unwrap()).unwrap();
    }

    #[test]
    fn a_missing_message_is_an_error() {
        let set = FileDescriptorSet::default();
        let index = Index::new(&set);
        let err = Generator::new(&index).record("x.v1.Nope").unwrap_err();
        assert!(err.to_string().contains("x.v1.Nope"), "{err}");
    }
}
