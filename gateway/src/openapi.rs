//! The OpenAPI 3.1 document of the gateway, generated from the same
//! descriptors and the same bindings it serves: one operation per binding,
//! path and query parameters as the transcoder reads them, request and
//! answer schemas in the proto3 JSON mapping, the proto comments as
//! descriptions, and the error shape of [`crate::error`].
//!
//! Every map is built sorted (or in descriptor order), so the document of a
//! descriptor set is the same byte for byte on every run.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use prost_reflect::{
    DescriptorPool, EnumDescriptor, ExtensionDescriptor, FieldDescriptor, Kind, MessageDescriptor, MethodDescriptor,
    Value as ProtoValue,
};
use serde_json::{Map, Value, json};

use crate::rules::{self, Binding, Body, RuleError};

/// The OpenAPI version written.
pub const OPENAPI_VERSION: &str = "3.1.0";
/// The component of the error body.
pub const ERROR_SCHEMA: &str = "Error";
/// Where component schemas live.
const SCHEMA_PREFIX: &str = "#/components/schemas/";
/// The extension of AIP-203 field behaviors, when the descriptor set has it.
const FIELD_BEHAVIOR_EXTENSION: &str = "google.api.field_behavior";
/// The method option that says who may call an RPC
/// (`proto/eventfold/auth/v1/auth.proto`), when the descriptor set has it.
const ACCESS_EXTENSION: &str = "eventfold.auth.v1.access";
/// The role that may call every RPC.
const ADMIN_ROLE: &str = "admin";
/// The security schemes of an operation that needs credentials: either one.
const BEARER_SCHEME: &str = "bearerAuth";
const API_KEY_SCHEME: &str = "apiKey";
/// `google.api.FieldBehavior` values.
const BEHAVIOR_REQUIRED: i32 = 2;
const BEHAVIOR_OUTPUT_ONLY: i32 = 3;
const BEHAVIOR_INPUT_ONLY: i32 = 4;
const BEHAVIOR_IMMUTABLE: i32 = 5;
/// Nesting of a query parameter's field path, as the transcoder allows.
const MAX_QUERY_DEPTH: usize = 8;
/// The methods a Path Item may hold (OpenAPI 3.1, "Path Item Object").
const OPENAPI_METHODS: &[&str] = &["get", "put", "post", "delete", "options", "head", "patch", "trace"];
/// `SourceCodeInfo` paths: `FileDescriptorProto.enum_type` /
/// `EnumDescriptorProto.value` (enum value comments are found under their
/// enum's path).
const ENUM_VALUE_PATH: i32 = 2;

/// The OpenAPI 3.1 document of every binding of `pool` (the same bindings
/// the gateway serves).
///
/// # Errors
///
/// A rule that does not parse (see [`rules::bindings`]), two bindings on
/// the same OpenAPI path and method, or a `custom` method OpenAPI cannot
/// describe.
pub fn document(pool: &DescriptorPool, title: &str, version: &str) -> Result<Value, RuleError> {
    let bindings = rules::bindings(pool)?;
    let mut generator = Generator::new(pool);
    let mut paths: BTreeMap<String, BTreeMap<String, Value>> = BTreeMap::new();
    let mut tags: BTreeMap<String, Option<String>> = BTreeMap::new();
    let mut operation_ids: BTreeMap<String, usize> = BTreeMap::new();
    for binding in &bindings {
        let invalid = |message: String| RuleError::Invalid { rpc: binding.rpc.full_name().to_owned(), message };
        let method = binding.method.as_str().to_ascii_lowercase();
        if !OPENAPI_METHODS.contains(&method.as_str()) {
            return Err(invalid(format!("OpenAPI 3.1 cannot describe the HTTP method {}", binding.method)));
        }
        let path = binding.template.openapi_path();
        let mut operation = generator.operation(binding);
        // An RPC with additional bindings has one operation per binding;
        // operationIds must be unique, so the later ones are numbered.
        let seen = operation_ids.entry(binding.operation_id()).or_insert(0usize);
        *seen = seen.saturating_add(1);
        if *seen > 1 {
            operation["operationId"] = Value::String(format!("{}_{seen}", binding.operation_id()));
        }
        let item = paths.entry(path.clone()).or_default();
        if item.contains_key(&method) {
            return Err(invalid(format!("a second binding of {} {path}", binding.method)));
        }
        item.insert(method, operation);
        let service = binding.rpc.parent_service();
        tags.entry(service.name().to_owned())
            .or_insert_with(|| generator.comments.of(&service.parent_file(), service.path()));
    }
    let schemas = generator.finish();

    let paths: Map<String, Value> =
        paths.into_iter().map(|(path, operations)| (path, Value::Object(operations.into_iter().collect()))).collect();
    let tags: Vec<Value> = tags
        .into_iter()
        .map(|(name, description)| {
            let mut tag = json!({ "name": name });
            if let (Some(description), Some(tag)) = (description, tag.as_object_mut()) {
                tag.insert("description".to_owned(), Value::String(description));
            }
            tag
        })
        .collect();
    Ok(json!({
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": title,
            "version": version,
            "description": "REST/JSON transcoding of the gRPC services from their google.api.http \
                annotations. JSON is the proto3 JSON mapping: lowerCamelCase field names (the proto \
                names are accepted in requests too), 64-bit integers as strings, enums by name (a \
                request may give a value's number instead, in a body or a query parameter), \
                Timestamp as RFC 3339, Duration as seconds with an `s` suffix.",
        },
        "tags": tags,
        "paths": paths,
        "components": {
            "schemas": Value::Object(schemas.into_iter().collect()),
            "securitySchemes": security_schemes(),
        },
    }))
}

/// How a caller proves who it is; the roles each operation needs are in
/// its description.
fn security_schemes() -> Value {
    json!({
        BEARER_SCHEME: {
            "type": "http",
            "scheme": "bearer",
            "bearerFormat": "JWT",
            "description": "A JWT in `Authorization: Bearer …`: its `sub` is the caller, a claim \
                (`roles` by default) lists the caller's roles.",
        },
        API_KEY_SCHEME: {
            "type": "apiKey",
            "in": "header",
            "name": "x-api-key",
            "description": "An API key (`eventfold keys create`), also accepted as \
                `Authorization: ApiKey …`; it carries the roles it was created with.",
        },
    })
}

/// Who may call an RPC, as its `(eventfold.auth.v1.access)` option says.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Access {
    Public,
    Roles(Vec<String>),
}

impl Access {
    /// The operation's `security`: none needed, or either scheme.
    fn security(&self) -> Value {
        match self {
            Access::Public => json!([]),
            Access::Roles(_) => json!([{ BEARER_SCHEME: [] }, { API_KEY_SCHEME: [] }]),
        }
    }

    /// The line of the operation's description that names the roles.
    fn description(&self) -> String {
        match self {
            Access::Public => "Public: no credentials needed.".to_owned(),
            Access::Roles(roles) if roles.iter().all(|role| role == ADMIN_ROLE) => format!("Roles: {ADMIN_ROLE}."),
            Access::Roles(roles) => {
                let roles: Vec<&str> = roles.iter().map(String::as_str).filter(|role| *role != ADMIN_ROLE).collect();
                format!("Roles: {} (or {ADMIN_ROLE}).", roles.join(", "))
            }
        }
    }
}

/// The leading (else trailing) comments of the pool's declarations, by file
/// and `SourceCodeInfo` path. Empty when the descriptor set was built
/// without source info.
struct Comments(HashMap<String, HashMap<Vec<i32>, String>>);

impl Comments {
    fn new(pool: &DescriptorPool) -> Comments {
        let mut files = HashMap::new();
        for file in pool.files() {
            let Some(info) = &file.file_descriptor_proto().source_code_info else {
                continue;
            };
            let mut comments = HashMap::new();
            for location in &info.location {
                let text = [&location.leading_comments, &location.trailing_comments]
                    .into_iter()
                    .flatten()
                    .map(|text| clean_comment(text))
                    .find(|text| !text.is_empty());
                if let Some(text) = text {
                    comments.insert(location.path.clone(), text);
                }
            }
            files.insert(file.name().to_owned(), comments);
        }
        Comments(files)
    }

    fn of(&self, file: &prost_reflect::FileDescriptor, path: &[i32]) -> Option<String> {
        self.0.get(file.name())?.get(path).cloned()
    }
}

/// A comment's lines without the space after `//` and trailing blanks.
fn clean_comment(text: &str) -> String {
    let lines: Vec<&str> = text.lines().map(|line| line.strip_prefix(' ').unwrap_or(line).trim_end()).collect();
    lines.join("\n").trim().to_owned()
}

/// The first paragraph of a comment on one line (an operation's summary).
fn summary_of(comment: &str) -> String {
    let paragraph = comment.split("\n\n").next().unwrap_or(comment);
    paragraph.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn schema_ref(full_name: &str) -> Value {
    json!({ "$ref": format!("{SCHEMA_PREFIX}{full_name}") })
}

/// Adds `description` to a schema (a `$ref` may carry siblings in 3.1).
fn describe(mut schema: Value, description: Option<String>) -> Value {
    if let (Some(description), Some(object)) = (description.filter(|d| !d.is_empty()), schema.as_object_mut()) {
        object.insert("description".to_owned(), Value::String(description));
    }
    schema
}

/// The schema of a scalar kind in the proto3 JSON mapping.
fn scalar_schema(kind: &Kind) -> Option<Value> {
    Some(match kind {
        Kind::Double => json!({ "type": "number", "format": "double" }),
        Kind::Float => json!({ "type": "number", "format": "float" }),
        Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => {
            json!({ "type": "integer", "format": "int32", "minimum": i32::MIN, "maximum": i32::MAX })
        }
        Kind::Uint32 | Kind::Fixed32 => {
            json!({ "type": "integer", "format": "uint32", "minimum": 0, "maximum": u32::MAX })
        }
        Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 => {
            json!({ "type": "string", "format": "int64", "pattern": "^-?[0-9]+$" })
        }
        Kind::Uint64 | Kind::Fixed64 => json!({ "type": "string", "format": "uint64", "pattern": "^[0-9]+$" }),
        Kind::Bool => json!({ "type": "boolean" }),
        Kind::String => json!({ "type": "string" }),
        Kind::Bytes => json!({ "type": "string", "format": "byte", "contentEncoding": "base64" }),
        Kind::Message(_) | Kind::Enum(_) => return None,
    })
}

/// The wrapped kind of a `google.protobuf.*Value` wrapper.
fn wrapped_kind(message: &MessageDescriptor) -> Option<Kind> {
    const WRAPPERS: &[&str] = &[
        "google.protobuf.DoubleValue",
        "google.protobuf.FloatValue",
        "google.protobuf.Int64Value",
        "google.protobuf.UInt64Value",
        "google.protobuf.Int32Value",
        "google.protobuf.UInt32Value",
        "google.protobuf.BoolValue",
        "google.protobuf.StringValue",
        "google.protobuf.BytesValue",
    ];
    if !WRAPPERS.contains(&message.full_name()) {
        return None;
    }
    message.get_field_by_name("value").map(|field| field.kind())
}

/// The schema of a well-known type, which has a JSON form of its own.
/// `nullable`: a wrapper may also be `null` (it has presence).
fn well_known_schema(message: &MessageDescriptor, nullable: bool) -> Option<Value> {
    if let Some(kind) = wrapped_kind(message) {
        let mut schema = scalar_schema(&kind)?;
        if nullable && let Some(object) = schema.as_object_mut() {
            let single = object.get("type").cloned().unwrap_or(Value::Null);
            object.insert("type".to_owned(), json!([single, "null"]));
        }
        return Some(schema);
    }
    Some(match message.full_name() {
        "google.protobuf.Timestamp" => json!({ "type": "string", "format": "date-time" }),
        "google.protobuf.Duration" => json!({
            "type": "string",
            "pattern": r"^-?[0-9]+(\.[0-9]+)?s$",
            "description": "Seconds with up to 9 fractional digits and an `s` suffix, e.g. `1.5s`.",
        }),
        "google.protobuf.FieldMask" => json!({
            "type": "string",
            "description": "Comma-separated field paths in lowerCamelCase, e.g. `status,updateTime`.",
        }),
        "google.protobuf.Struct" => json!({ "type": "object", "additionalProperties": true }),
        "google.protobuf.Value" => json!({ "description": "Any JSON value." }),
        "google.protobuf.ListValue" => json!({ "type": "array", "items": {} }),
        "google.protobuf.Empty" => json!({ "type": "object", "additionalProperties": false }),
        "google.protobuf.Any" => json!({
            "type": "object",
            "properties": { "@type": { "type": "string", "description": "The type URL of the message." } },
            "required": ["@type"],
            "additionalProperties": true,
        }),
        _ => return None,
    })
}

/// Whether a query parameter may hold a value of this well-known type
/// (the transcoder reads these from their string form).
fn query_well_known(message: &MessageDescriptor) -> bool {
    wrapped_kind(message).is_some()
        || matches!(
            message.full_name(),
            "google.protobuf.Timestamp" | "google.protobuf.Duration" | "google.protobuf.FieldMask"
        )
}

fn is_well_known(message: &MessageDescriptor) -> bool {
    message.full_name().starts_with("google.protobuf.")
}

/// A message or enum waiting for its component schema.
enum Pending {
    Message(MessageDescriptor),
    Enum(EnumDescriptor),
}

/// Builds the operations and collects the component schemas they reach.
struct Generator {
    comments: Comments,
    behavior: Option<ExtensionDescriptor>,
    access: Option<ExtensionDescriptor>,
    pending: Vec<Pending>,
    queued: BTreeSet<String>,
}

impl Generator {
    fn new(pool: &DescriptorPool) -> Generator {
        Generator {
            comments: Comments::new(pool),
            behavior: pool.get_extension_by_name(FIELD_BEHAVIOR_EXTENSION),
            access: pool.get_extension_by_name(ACCESS_EXTENSION),
            pending: Vec::new(),
            queued: BTreeSet::new(),
        }
    }

    /// The component schemas of everything reached, and `Error`.
    fn finish(mut self) -> BTreeMap<String, Value> {
        let mut schemas = BTreeMap::new();
        while let Some(pending) = self.pending.pop() {
            let (name, schema) = match pending {
                Pending::Message(message) => (message.full_name().to_owned(), self.message_schema(&message, &[])),
                Pending::Enum(descriptor) => (descriptor.full_name().to_owned(), self.enum_schema(&descriptor)),
            };
            schemas.insert(name, schema);
        }
        schemas.insert(ERROR_SCHEMA.to_owned(), error_schema());
        schemas
    }

    fn operation(&mut self, binding: &Binding) -> Value {
        let rpc = &binding.rpc;
        let mut operation = Map::new();
        operation.insert("operationId".to_owned(), Value::String(binding.operation_id()));
        operation.insert("tags".to_owned(), json!([rpc.parent_service().name()]));
        let comment = self.comments.of(&rpc.parent_file(), rpc.path());
        if let Some(comment) = &comment {
            operation.insert("summary".to_owned(), Value::String(summary_of(comment)));
        }
        let access = self.access(rpc);
        let description = [comment, access.as_ref().map(Access::description)].into_iter().flatten().collect::<Vec<_>>();
        if !description.is_empty() {
            operation.insert("description".to_owned(), Value::String(description.join("\n\n")));
        }
        if let Some(access) = &access {
            operation.insert("security".to_owned(), access.security());
        }
        if rpc.method_descriptor_proto().options.as_ref().and_then(|o| o.deprecated) == Some(true) {
            operation.insert("deprecated".to_owned(), Value::Bool(true));
        }

        let input = rpc.input();
        let path_fields: Vec<String> = binding.template.variables().iter().map(|v| (*v).to_owned()).collect();
        let mut parameters = Vec::new();
        for variable in &path_fields {
            let Some(field) = rules::field_path(&input, variable) else {
                continue;
            };
            let mut parameter = json!({
                "name": variable,
                "in": "path",
                "required": true,
                "schema": self.field_schema(&field, false),
            });
            if let (Some(description), Some(object)) = (self.field_description(&field), parameter.as_object_mut()) {
                object.insert("description".to_owned(), Value::String(description));
            }
            parameters.push(parameter);
        }
        let skip_top = match &binding.body {
            Body::All => None,
            Body::Field(field) => Some(Some(field.name().to_owned())),
            Body::None => Some(None),
        };
        if let Some(skip_top) = skip_top {
            let mut chain = vec![input.full_name().to_owned()];
            self.query_parameters(&input, "", "", true, &path_fields, skip_top.as_deref(), &mut chain, &mut parameters);
        }
        if !parameters.is_empty() {
            operation.insert("parameters".to_owned(), Value::Array(parameters));
        }

        let body_schema = match &binding.body {
            Body::None => None,
            Body::All if path_fields.is_empty() => Some(self.message_ref(&input, true)),
            Body::All => {
                let excluded: Vec<&str> = path_fields.iter().map(String::as_str).collect();
                Some(self.message_schema(&input, &excluded))
            }
            Body::Field(field) => Some(describe(self.field_schema(field, true), self.field_description(field))),
        };
        if let Some(schema) = body_schema {
            operation.insert(
                "requestBody".to_owned(),
                json!({
                    "required": false,
                    "content": { "application/json": { "schema": schema } },
                }),
            );
        }

        let output = rpc.output();
        let answer = match &binding.response_body {
            Some(field) => self.field_schema(field, true),
            None => self.message_ref(&output, true),
        };
        let answer_name = match &binding.response_body {
            Some(field) => format!("the `{}` field of `{}`", field.json_name(), output.full_name()),
            None => format!("`{}`", output.full_name()),
        };
        let success = if binding.server_streaming() {
            let sse = format!(
                "Server-Sent Events: one event per message, its `data:` line the JSON of {answer_name}; \
                 `id:` is the message's position where it has one, so a reconnect with `Last-Event-ID` \
                 resumes after it. A failure ends the stream with an `event: error` whose data is an `Error`."
            );
            let ndjson = format!(
                "Newline-delimited JSON: one line per message, the JSON of {answer_name}. \
                 A failure ends the stream with a line that is an `Error`."
            );
            json!({
                "description": format!(
                    "A stream of {answer_name}: Server-Sent Events with `Accept: text/event-stream`, \
                     newline-delimited JSON otherwise."
                ),
                "content": {
                    "text/event-stream": {
                        "schema": { "type": "string", "description": sse },
                        "x-stream-item": answer.clone(),
                    },
                    "application/x-ndjson": {
                        "schema": { "type": "string", "description": ndjson },
                        "x-stream-item": answer,
                    },
                },
            })
        } else {
            json!({
                "description": format!("The answer: {answer_name}."),
                "content": { "application/json": { "schema": answer } },
            })
        };
        operation.insert(
            "responses".to_owned(),
            json!({
                "200": success,
                "default": {
                    "description": "An error: the gRPC status mapped to its HTTP status, with its details.",
                    "content": { "application/json": { "schema": schema_ref(ERROR_SCHEMA) } },
                },
            }),
        );
        Value::Object(operation)
    }

    /// Query parameters for every leaf field of `message` not bound by the
    /// path (`path_fields`, proto names) or the body (`skip_top`, a
    /// top-level field), through singular message fields, named by their
    /// dotted JSON names. `chain` holds the messages on the way (a message
    /// inside itself is not followed again).
    #[allow(clippy::too_many_arguments)]
    fn query_parameters(
        &mut self,
        message: &MessageDescriptor,
        proto_prefix: &str,
        json_prefix: &str,
        required_so_far: bool,
        path_fields: &[String],
        skip_top: Option<&str>,
        chain: &mut Vec<String>,
        out: &mut Vec<Value>,
    ) {
        for field in message.fields() {
            let proto_path = format!("{proto_prefix}{}", field.name());
            let json_path = format!("{json_prefix}{}", field.json_name());
            if proto_prefix.is_empty() && skip_top == Some(field.name()) {
                continue;
            }
            if path_fields.contains(&proto_path) || field.is_map() {
                continue;
            }
            let behaviors = self.behaviors(&field);
            if behaviors.contains(&BEHAVIOR_OUTPUT_ONLY) {
                continue;
            }
            let required = required_so_far && behaviors.contains(&BEHAVIOR_REQUIRED);
            if let Kind::Message(inner) = field.kind() {
                if is_well_known(&inner) {
                    if !query_well_known(&inner) {
                        continue;
                    }
                } else {
                    if field.is_list() || chain.len() >= MAX_QUERY_DEPTH || chain.iter().any(|c| c == inner.full_name())
                    {
                        continue;
                    }
                    chain.push(inner.full_name().to_owned());
                    self.query_parameters(
                        &inner,
                        &format!("{proto_path}."),
                        &format!("{json_path}."),
                        required,
                        path_fields,
                        skip_top,
                        chain,
                        out,
                    );
                    chain.pop();
                    continue;
                }
            }
            let mut parameter = Map::new();
            parameter.insert("name".to_owned(), Value::String(json_path));
            parameter.insert("in".to_owned(), Value::String("query".to_owned()));
            if required {
                parameter.insert("required".to_owned(), Value::Bool(true));
            }
            if let Some(description) = self.field_description(&field) {
                parameter.insert("description".to_owned(), Value::String(description));
            }
            if field.field_descriptor_proto().options.as_ref().and_then(|o| o.deprecated) == Some(true) {
                parameter.insert("deprecated".to_owned(), Value::Bool(true));
            }
            let schema = self.field_schema(&field, false);
            if field.is_list() {
                parameter.insert("style".to_owned(), Value::String("form".to_owned()));
                parameter.insert("explode".to_owned(), Value::Bool(true));
            }
            parameter.insert("schema".to_owned(), schema);
            out.push(Value::Object(parameter));
        }
    }

    /// The RPC's access rule; `None` without the option (an RPC the
    /// servers' policy does not govern) or with one that declares nothing.
    fn access(&self, rpc: &MethodDescriptor) -> Option<Access> {
        let extension = self.access.as_ref()?;
        let options = rpc.options();
        if !options.has_extension(extension) {
            return None;
        }
        let value = options.get_extension(extension);
        let access = value.as_message()?;
        let field = |name: &str| access.get_field_by_name(name).map(|value| value.into_owned());
        if field("public").and_then(|value| value.as_bool()) == Some(true) {
            return Some(Access::Public);
        }
        let roles: Vec<String> = match field("roles") {
            Some(ProtoValue::List(values)) => values.iter().filter_map(ProtoValue::as_str).map(str::to_owned).collect(),
            _ => Vec::new(),
        };
        (!roles.is_empty()).then_some(Access::Roles(roles))
    }

    /// The AIP-203 behaviors of a field (empty without the extension).
    fn behaviors(&self, field: &FieldDescriptor) -> Vec<i32> {
        let Some(extension) = &self.behavior else {
            return Vec::new();
        };
        let options = field.options();
        if !options.has_extension(extension) {
            return Vec::new();
        }
        match options.get_extension(extension).as_ref() {
            ProtoValue::List(values) => values.iter().filter_map(ProtoValue::as_enum_number).collect(),
            ProtoValue::EnumNumber(number) => vec![*number],
            _ => Vec::new(),
        }
    }

    /// A field's comment, with a note when it belongs to a oneof.
    fn field_description(&self, field: &FieldDescriptor) -> Option<String> {
        let mut parts = Vec::new();
        if let Some(comment) = self.comments.of(&field.parent_file(), field.path()) {
            parts.push(comment);
        }
        if let Some(oneof) = field.containing_oneof().filter(|o| !o.is_synthetic()) {
            let names: Vec<String> = oneof.fields().map(|f| format!("`{}`", f.json_name())).collect();
            parts.push(format!("Oneof `{}`: at most one of {} may be set.", oneof.name(), names.join(", ")));
        }
        let behaviors = self.behaviors(field);
        if behaviors.contains(&BEHAVIOR_IMMUTABLE) {
            parts.push("Immutable: set on creation only.".to_owned());
        }
        (!parts.is_empty()).then(|| parts.join("\n\n"))
    }

    /// `$ref` to a message's component, or the inline schema of a
    /// well-known type.
    fn message_ref(&mut self, message: &MessageDescriptor, nullable: bool) -> Value {
        if is_well_known(message)
            && let Some(schema) = well_known_schema(message, nullable)
        {
            return schema;
        }
        if self.queued.insert(message.full_name().to_owned()) {
            self.pending.push(Pending::Message(message.clone()));
        }
        schema_ref(message.full_name())
    }

    fn kind_schema(&mut self, kind: &Kind, nullable: bool) -> Value {
        match kind {
            Kind::Message(message) => self.message_ref(message, nullable),
            Kind::Enum(descriptor) if descriptor.full_name() == "google.protobuf.NullValue" => {
                json!({ "type": "null" })
            }
            Kind::Enum(descriptor) => {
                if self.queued.insert(descriptor.full_name().to_owned()) {
                    self.pending.push(Pending::Enum(descriptor.clone()));
                }
                schema_ref(descriptor.full_name())
            }
            scalar => scalar_schema(scalar).unwrap_or_else(|| json!({})),
        }
    }

    /// A field's value schema: maps as objects, repeated fields as arrays.
    fn field_schema(&mut self, field: &FieldDescriptor, nullable: bool) -> Value {
        if field.is_map()
            && let Kind::Message(entry) = field.kind()
        {
            let key = entry.map_entry_key_field().kind();
            let value = self.kind_schema(&entry.map_entry_value_field().kind(), nullable);
            let mut schema = json!({ "type": "object", "additionalProperties": value });
            let names = match key {
                Kind::Bool => Some(json!({ "enum": ["true", "false"] })),
                Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 | Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 => {
                    Some(json!({ "pattern": "^-?[0-9]+$" }))
                }
                Kind::Uint32 | Kind::Fixed32 | Kind::Uint64 | Kind::Fixed64 => Some(json!({ "pattern": "^[0-9]+$" })),
                _ => None,
            };
            if let (Some(names), Some(object)) = (names, schema.as_object_mut()) {
                object.insert("propertyNames".to_owned(), names);
            }
            return schema;
        }
        let item = self.kind_schema(&field.kind(), nullable);
        if field.is_list() { json!({ "type": "array", "items": item }) } else { item }
    }

    /// A message's object schema; `excluded` are dotted proto field paths
    /// left out (the path fields of a `body: "*"` request).
    fn message_schema(&mut self, message: &MessageDescriptor, excluded: &[&str]) -> Value {
        let mut properties = Map::new();
        let mut required = Vec::new();
        for field in message.fields() {
            if excluded.contains(&field.name()) {
                continue;
            }
            let prefix = format!("{}.", field.name());
            let deeper: Vec<&str> = excluded.iter().filter_map(|e| e.strip_prefix(prefix.as_str())).collect();
            let schema = match field.kind() {
                Kind::Message(inner) if !deeper.is_empty() && !field.is_list() && !field.is_map() => {
                    self.message_schema(&inner, &deeper)
                }
                _ => self.field_schema(&field, true),
            };
            let mut schema = describe(schema, self.field_description(&field));
            let behaviors = self.behaviors(&field);
            if let Some(object) = schema.as_object_mut() {
                if behaviors.contains(&BEHAVIOR_OUTPUT_ONLY) {
                    object.insert("readOnly".to_owned(), Value::Bool(true));
                }
                if behaviors.contains(&BEHAVIOR_INPUT_ONLY) {
                    object.insert("writeOnly".to_owned(), Value::Bool(true));
                }
                if field.field_descriptor_proto().options.as_ref().and_then(|o| o.deprecated) == Some(true) {
                    object.insert("deprecated".to_owned(), Value::Bool(true));
                }
            }
            if behaviors.contains(&BEHAVIOR_REQUIRED) {
                required.push(Value::String(field.json_name().to_owned()));
            }
            properties.insert(field.json_name().to_owned(), schema);
        }

        let mut schema = Map::new();
        schema.insert("type".to_owned(), Value::String("object".to_owned()));
        let mut description = Vec::new();
        if let Some(comment) = self.comments.of(&message.parent_file(), message.path()) {
            description.push(comment);
        }
        // At most one field of each oneof: no two of them together.
        let mut pairs = Vec::new();
        for oneof in message.oneofs().filter(|o| !o.is_synthetic()) {
            let names: Vec<String> =
                oneof.fields().filter(|f| !excluded.contains(&f.name())).map(|f| f.json_name().to_owned()).collect();
            let quoted: Vec<String> = names.iter().map(|n| format!("`{n}`")).collect();
            description.push(format!("Oneof `{}`: at most one of {} may be set.", oneof.name(), quoted.join(", ")));
            for (index, first) in names.iter().enumerate() {
                for second in names.iter().skip(index.saturating_add(1)) {
                    pairs.push(json!({ "required": [first, second] }));
                }
            }
        }
        if !description.is_empty() {
            schema.insert("description".to_owned(), Value::String(description.join("\n\n")));
        }
        schema.insert("properties".to_owned(), Value::Object(properties));
        if !required.is_empty() {
            schema.insert("required".to_owned(), Value::Array(required));
        }
        // The transcoder refuses unknown fields.
        schema.insert("additionalProperties".to_owned(), Value::Bool(false));
        if !pairs.is_empty() {
            schema.insert("not".to_owned(), json!({ "anyOf": pairs }));
        }
        Value::Object(schema)
    }

    /// An enum as the string of its value names, each value's comment in
    /// the description.
    fn enum_schema(&self, descriptor: &EnumDescriptor) -> Value {
        let names: Vec<String> = descriptor.values().map(|v| v.name().to_owned()).collect();
        let mut lines = Vec::new();
        if let Some(comment) = self.comments.of(&descriptor.parent_file(), descriptor.path()) {
            lines.push(comment);
        }
        let mut values = Vec::new();
        for (index, value) in descriptor.values().enumerate() {
            let Ok(index) = i32::try_from(index) else {
                break;
            };
            let mut path = descriptor.path().to_vec();
            path.extend([ENUM_VALUE_PATH, index]);
            if let Some(comment) = self.comments.of(&descriptor.parent_file(), &path) {
                values.push(format!("- `{}`: {}", value.name(), summary_of(&comment)));
            }
        }
        if !values.is_empty() {
            lines.push(values.join("\n"));
        }
        let mut schema = json!({ "type": "string", "enum": names });
        if !lines.is_empty()
            && let Some(object) = schema.as_object_mut()
        {
            object.insert("description".to_owned(), Value::String(lines.join("\n\n")));
        }
        schema
    }
}

/// The error body of [`crate::error::ApiError`].
fn error_schema() -> Value {
    json!({
        "type": "object",
        "description": "The JSON error: the gRPC status code mapped to its HTTP status (Google's mapping), \
            the message, the gRPC code name, and the status details decoded with their `@type` \
            (google.rpc.BadRequest, ErrorInfo, RetryInfo, ...).",
        "properties": {
            "error": {
                "type": "object",
                "properties": {
                    "code": { "type": "integer", "description": "The HTTP status." },
                    "message": { "type": "string" },
                    "status": { "type": "string", "description": "The gRPC code name, e.g. `NOT_FOUND`." },
                    "details": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "properties": { "@type": { "type": "string" } },
                            "required": ["@type"],
                            "additionalProperties": true,
                        },
                    },
                },
                "required": ["code", "message", "status", "details"],
            },
        },
        "required": ["error"],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool() -> DescriptorPool {
        DescriptorPool::decode(eventfold_proto::FILE_DESCRIPTOR_SET).unwrap()
    }

    fn eventfold_document() -> Value {
        document(&pool(), "eventfold", "1.2.3").unwrap()
    }

    fn operations(document: &Value) -> Vec<(String, String, &Value)> {
        let mut out = Vec::new();
        for (path, item) in document["paths"].as_object().unwrap() {
            for (method, operation) in item.as_object().unwrap() {
                out.push((path.clone(), method.clone(), operation));
            }
        }
        out
    }

    fn operation<'a>(document: &'a Value, id: &str) -> &'a Value {
        operations(document).into_iter().find(|(_, _, o)| o["operationId"] == id).unwrap().2
    }

    fn parameter<'a>(operation: &'a Value, name: &str) -> &'a Value {
        operation["parameters"].as_array().unwrap().iter().find(|p| p["name"] == name).unwrap()
    }

    /// Follows a `$ref` (once) to its component.
    fn resolve<'a>(document: &'a Value, schema: &'a Value) -> &'a Value {
        match schema["$ref"].as_str() {
            Some(reference) => {
                let name = reference.strip_prefix(SCHEMA_PREFIX).unwrap();
                &document["components"]["schemas"][name]
            }
            None => schema,
        }
    }

    fn walk_refs<'a>(value: &'a Value, out: &mut Vec<&'a str>) {
        match value {
            Value::Object(map) => {
                if let Some(Value::String(reference)) = map.get("$ref") {
                    out.push(reference);
                }
                map.values().for_each(|v| walk_refs(v, out));
            }
            Value::Array(items) => items.iter().for_each(|v| walk_refs(v, out)),
            _ => {}
        }
    }

    #[test]
    fn every_binding_is_one_operation_with_a_unique_id() {
        let pool = pool();
        let document = document(&pool, "eventfold", "1.2.3").unwrap();
        assert_eq!(document["openapi"], "3.1.0");
        assert_eq!(
            document["info"],
            json!({ "title": "eventfold", "version": "1.2.3", "description": document["info"]["description"] })
        );
        let bindings = rules::bindings(&pool).unwrap();
        let operations = operations(&document);
        assert_eq!(operations.len(), bindings.len());
        let ids: BTreeSet<&str> = operations.iter().map(|(_, _, o)| o["operationId"].as_str().unwrap()).collect();
        assert_eq!(ids.len(), operations.len(), "operationIds are unique");
        for binding in &bindings {
            let op = operation(&document, &binding.operation_id());
            assert_eq!(op["tags"], json!([binding.rpc.parent_service().name()]));
            assert!(
                document["paths"][binding.template.openapi_path()][binding.method.as_str().to_ascii_lowercase()]
                    .is_object()
            );
        }
        let tags: Vec<&str> =
            document["tags"].as_array().unwrap().iter().map(|t| t["name"].as_str().unwrap()).collect();
        assert!(tags.contains(&"OrderCommandService") && tags.contains(&"EventStoreService"), "{tags:?}");
        let mut sorted = tags.clone();
        sorted.sort_unstable();
        assert_eq!(tags, sorted);
    }

    #[test]
    fn a_custom_verb_with_a_path_parameter_and_a_body() {
        let document = eventfold_document();
        let confirm = &document["paths"]["/v1/orders/{order_id}:confirm"]["post"];
        assert_eq!(confirm["operationId"], "OrderCommandService_ConfirmOrder");
        assert_eq!(confirm["tags"], json!(["OrderCommandService"]));
        let order_id = parameter(confirm, "order_id");
        assert_eq!(order_id["in"], "path");
        assert_eq!(order_id["required"], true);
        assert_eq!(order_id["schema"], json!({ "type": "string" }));
        assert_eq!(confirm["parameters"].as_array().unwrap().len(), 1, "body \"*\": no query parameters");
        // The body is the request minus the path field, inline.
        let body = &confirm["requestBody"]["content"]["application/json"]["schema"];
        assert_eq!(body["type"], "object");
        assert!(body["properties"].get("orderId").is_none(), "{body}");
        assert!(body["properties"]["requestId"].is_object(), "{body}");
        assert_eq!(body["additionalProperties"], false);
        // No path field: the body is the request's component.
        let create = &document["paths"]["/v1/orders"]["post"];
        assert_eq!(
            create["requestBody"]["content"]["application/json"]["schema"],
            json!({ "$ref": "#/components/schemas/eventfold.orders.v1.CreateOrderRequest" })
        );
        let answer = &confirm["responses"]["200"]["content"]["application/json"]["schema"];
        assert_eq!(answer, &json!({ "$ref": "#/components/schemas/eventfold.orders.v1.ConfirmOrderResponse" }));
        assert_eq!(
            confirm["responses"]["default"]["content"]["application/json"]["schema"],
            json!({ "$ref": "#/components/schemas/Error" })
        );
    }

    #[test]
    fn proto_comments_are_descriptions() {
        let document = eventfold_document();
        let watch = operation(&document, "OrderQueryService_WatchOrder");
        assert!(watch["summary"].as_str().is_some_and(|s| !s.is_empty()), "{watch}");
        let list = operation(&document, "OrderQueryService_ListOrders");
        assert_eq!(parameter(list, "pageSize")["description"], "Default 50, at most 500.");
        assert_eq!(parameter(list, "customerId")["description"], "Only this customer's orders, if set.");
        let request = &document["components"]["schemas"]["eventfold.query.v1.ListOrdersResponse"];
        assert_eq!(request["properties"]["nextPageToken"]["description"], "Empty on the last page.");
        let tag = document["tags"].as_array().unwrap().iter().find(|t| t["name"] == "InventoryQueryService").unwrap();
        assert_eq!(tag["description"], "Stock per product and the products running low.");
    }

    #[test]
    fn query_parameters_are_every_field_left() {
        let document = eventfold_document();
        let list = operation(&document, "OrderQueryService_ListOrders");
        assert!(list.get("requestBody").is_none());
        let page_size = parameter(list, "pageSize");
        assert_eq!(page_size["in"], "query");
        assert_eq!(page_size["schema"]["type"], "integer");
        assert_eq!(page_size["schema"]["format"], "int32");
        assert_eq!(parameter(list, "customerId")["schema"], json!({ "type": "string" }));
        let status = resolve(&document, &parameter(list, "status")["schema"]);
        assert_eq!(status["type"], "string");
        let values = status["enum"].as_array().unwrap();
        assert!(values.contains(&json!("ORDER_STATUS_CREATED")) && values.contains(&json!("ORDER_STATUS_CONFIRMED")));
        assert_eq!(parameter(list, "createTimeStart")["schema"], json!({ "type": "string", "format": "date-time" }));
        let min_position = parameter(list, "minPosition");
        assert_eq!(min_position["schema"]["type"], "string");
        assert_eq!(min_position["schema"]["format"], "uint64");

        // Nested and repeated, named by their dotted JSON names.
        let read_all = operation(&document, "EventStoreService_ReadAll");
        let event_types = parameter(read_all, "filter.eventTypes");
        assert_eq!(event_types["schema"], json!({ "type": "array", "items": { "type": "string" } }));
        assert_eq!((&event_types["style"], &event_types["explode"]), (&json!("form"), &json!(true)));
        assert!(read_all["parameters"].as_array().unwrap().iter().all(|p| p["name"] != "filter"));

        // The path field is not a query parameter too.
        let watch = operation(&document, "OrderQueryService_WatchOrder");
        let names: Vec<&str> =
            watch["parameters"].as_array().unwrap().iter().map(|p| p["name"].as_str().unwrap()).collect();
        assert_eq!(names, ["order_id"]);
    }

    #[test]
    fn schemas_follow_the_proto3_json_mapping() {
        let document = eventfold_document();
        let schemas = document["components"]["schemas"].as_object().unwrap();
        // 64-bit integers are strings with a format.
        let view = &schemas["eventfold.query.v1.OrderView"];
        let last_position = &view["properties"]["lastPosition"];
        assert_eq!((&last_position["type"], &last_position["format"]), (&json!("string"), &json!("uint64")));
        assert_eq!(last_position["pattern"], "^[0-9]+$");
        let minor = &schemas["eventfold.common.v1.Money"]["properties"]["minor"];
        assert_eq!((&minor["type"], &minor["format"]), (&json!("string"), &json!("int64")));
        assert_eq!(view["properties"]["status"]["$ref"], "#/components/schemas/eventfold.query.v1.OrderStatus");
        assert!(schemas.contains_key("eventfold.query.v1.OrderStatus"));
        assert_eq!(view["additionalProperties"], false);
        // Every field of every message is named by its JSON name.
        let pool = pool();
        for (name, schema) in schemas {
            if let Some(message) = pool.get_message_by_name(name) {
                let want: BTreeSet<String> = message.fields().map(|f| f.json_name().to_owned()).collect();
                let got: BTreeSet<String> = schema["properties"].as_object().unwrap().keys().cloned().collect();
                assert_eq!(got, want, "{name}");
            }
        }
        // Well-known types are inline: no google.protobuf component.
        assert!(schemas.keys().all(|k| !k.starts_with("google.protobuf.")), "{:?}", schemas.keys());
        // A map, a Struct and a oneof in the event store's messages.
        let struct_field = schemas
            .values()
            .flat_map(|s| s["properties"].as_object().into_iter().flat_map(|p| p.values()))
            .find(|p| p["type"] == "object" && p["additionalProperties"] == true);
        assert!(struct_field.is_some(), "a google.protobuf.Struct field");
        let map_field = schemas
            .values()
            .flat_map(|s| s["properties"].as_object().into_iter().flat_map(|p| p.values()))
            .find(|p| p["type"] == "object" && p["additionalProperties"] == json!({ "type": "string" }));
        assert!(map_field.is_some(), "map<string, string>");
        let with_oneof = schemas.values().find(|s| s.get("not").is_some()).unwrap();
        assert!(with_oneof["description"].as_str().unwrap().contains("at most one of"), "{with_oneof}");
        assert_eq!(
            schemas[ERROR_SCHEMA]["properties"]["error"]["required"],
            json!(["code", "message", "status", "details"])
        );
    }

    #[test]
    fn server_streams_are_event_streams() {
        let document = eventfold_document();
        let watch = &document["paths"]["/v1/orders/{order_id}:watch"]["get"];
        assert_eq!(watch["operationId"], "OrderQueryService_WatchOrder");
        let content = &watch["responses"]["200"]["content"];
        assert_eq!(content["text/event-stream"]["schema"]["type"], "string");
        assert!(content["text/event-stream"]["schema"]["description"].as_str().unwrap().contains("data:"));
        assert!(content["application/x-ndjson"].is_object());
        assert!(content.get("application/json").is_none());
        assert_eq!(
            content["text/event-stream"]["x-stream-item"],
            json!({ "$ref": "#/components/schemas/eventfold.query.v1.WatchOrderResponse" })
        );
        let unary = operation(&document, "OrderQueryService_GetOrder");
        assert!(unary["responses"]["200"]["content"]["application/json"].is_object());
    }

    #[test]
    fn every_ref_resolves_and_the_document_is_deterministic() {
        let document = eventfold_document();
        let mut refs = Vec::new();
        walk_refs(&document, &mut refs);
        assert!(refs.len() > 50, "{}", refs.len());
        for reference in refs {
            let name = reference.strip_prefix(SCHEMA_PREFIX).unwrap_or_else(|| panic!("{reference}"));
            assert!(document["components"]["schemas"].get(name).is_some(), "{reference} does not resolve");
        }
        let text = serde_json::to_string_pretty(&document).unwrap();
        let again: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(again, document);
        assert_eq!(serde_json::to_string_pretty(&eventfold_document()).unwrap(), text, "same document every run");
    }

    #[test]
    fn well_known_types_have_their_json_forms() {
        let pool = pool();
        let message = |name: &str| pool.get_message_by_name(name);
        let timestamp = message("google.protobuf.Timestamp").unwrap();
        assert_eq!(well_known_schema(&timestamp, true), Some(json!({ "type": "string", "format": "date-time" })));
        let structure = message("google.protobuf.Struct").unwrap();
        assert_eq!(well_known_schema(&structure, true).unwrap()["additionalProperties"], true);
        if let Some(wrapper) = message("google.protobuf.Int64Value") {
            let schema = well_known_schema(&wrapper, true).unwrap();
            assert_eq!(schema["type"], json!(["string", "null"]));
            assert_eq!(schema["format"], "int64");
            assert_eq!(well_known_schema(&wrapper, false).unwrap()["type"], "string");
        }
        if let Some(duration) = message("google.protobuf.Duration") {
            assert_eq!(well_known_schema(&duration, true).unwrap()["pattern"], r"^-?[0-9]+(\.[0-9]+)?s$");
        }
        assert_eq!(scalar_schema(&Kind::Bytes).unwrap()["format"], "byte");
        assert_eq!(scalar_schema(&Kind::Int64).unwrap()["format"], "int64");
        assert_eq!(scalar_schema(&Kind::Double).unwrap()["type"], "number");
        assert_eq!(summary_of("One line\nand more.\n\nDetails."), "One line and more.");
        assert_eq!(clean_comment(" A comment.\n Second line.\n"), "A comment.\nSecond line.");
    }

    /// Adds a file given as the JSON of its `FileDescriptorProto`
    /// (extension options as `[full.name]`).
    fn add_file(pool: &mut DescriptorPool, file: Value) {
        let descriptor = pool.get_message_by_name("google.protobuf.FileDescriptorProto").unwrap();
        let message = prost_reflect::DynamicMessage::deserialize(descriptor, file).unwrap();
        pool.decode_file_descriptor_proto(prost::Message::encode_to_vec(&message).as_slice()).unwrap();
    }

    fn field(name: &str, number: i32, kind: &str, extra: Value) -> Value {
        let mut field = json!({ "name": name, "number": number, "label": "LABEL_OPTIONAL", "type": kind });
        field.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        field
    }

    /// eventfold's pool and a small service with field behaviors, a
    /// wrapper, self-reference and a `response_body`; `get_rule` is the
    /// rule of GetNode.
    fn node_pool(get_rule: Value) -> DescriptorPool {
        let mut pool = pool();
        add_file(
            &mut pool,
            json!({
                "name": "google/api/field_behavior.proto",
                "package": "google.api",
                "dependency": ["google/protobuf/descriptor.proto"],
                "enumType": [{ "name": "FieldBehavior", "value": [
                    { "name": "FIELD_BEHAVIOR_UNSPECIFIED", "number": 0 }, { "name": "OPTIONAL", "number": 1 },
                    { "name": "REQUIRED", "number": 2 }, { "name": "OUTPUT_ONLY", "number": 3 },
                    { "name": "INPUT_ONLY", "number": 4 }, { "name": "IMMUTABLE", "number": 5 },
                ]}],
                "extension": [{
                    "name": "field_behavior", "number": 1052, "label": "LABEL_REPEATED", "type": "TYPE_ENUM",
                    "typeName": ".google.api.FieldBehavior", "extendee": ".google.protobuf.FieldOptions",
                }],
                "syntax": "proto3",
            }),
        );
        add_file(
            &mut pool,
            json!({
                "name": "google/protobuf/wrappers.proto",
                "package": "google.protobuf",
                "messageType": [{ "name": "Int64Value", "field": [field("value", 1, "TYPE_INT64", json!({}))] }],
                "syntax": "proto3",
            }),
        );
        let behavior = |values: Value| json!({ "options": { "[google.api.field_behavior]": values } });
        let node = |number: i32, name: &str| field(name, number, "TYPE_MESSAGE", json!({ "typeName": ".t.v1.Node" }));
        add_file(
            &mut pool,
            json!({
                "name": "t/v1/t.proto",
                "package": "t.v1",
                "dependency": ["google/api/annotations.proto", "google/api/field_behavior.proto", "google/protobuf/wrappers.proto"],
                "messageType": [
                    { "name": "Node", "field": [
                        field("id", 1, "TYPE_STRING", behavior(json!(["REQUIRED", "IMMUTABLE"]))),
                        node(2, "parent"),
                        field("children", 3, "TYPE_MESSAGE", json!({ "typeName": ".t.v1.Node", "label": "LABEL_REPEATED" })),
                        field("weight", 4, "TYPE_MESSAGE", json!({ "typeName": ".google.protobuf.Int64Value" })),
                        field("etag", 5, "TYPE_STRING", behavior(json!(["OUTPUT_ONLY"]))),
                        field("inner", 6, "TYPE_MESSAGE", json!({ "typeName": ".t.v1.Inner" })),
                        field("display_name", 7, "TYPE_STRING", json!({})),
                    ]},
                    { "name": "Inner", "field": [
                        field("label", 1, "TYPE_STRING", behavior(json!(["REQUIRED"]))),
                        node(2, "back"),
                    ]},
                    { "name": "GetNodeRequest", "field": [
                        field("id", 1, "TYPE_STRING", json!({})),
                        node(2, "filter"),
                        field("secret", 3, "TYPE_STRING", behavior(json!(["REQUIRED", "INPUT_ONLY"]))),
                    ]},
                    { "name": "UpdateNodeRequest", "field": [node(1, "node")] },
                    { "name": "CreateNodeRequest", "field": [node(1, "node")] },
                ],
                "service": [{ "name": "NodeService", "method": [
                    { "name": "GetNode", "inputType": ".t.v1.GetNodeRequest", "outputType": ".t.v1.Node",
                      "options": { "[google.api.http]": get_rule } },
                    { "name": "UpdateNode", "inputType": ".t.v1.UpdateNodeRequest", "outputType": ".t.v1.Node",
                      "options": { "[google.api.http]": { "patch": "/v1/{node.id}", "body": "*" } } },
                    { "name": "CreateNode", "inputType": ".t.v1.CreateNodeRequest", "outputType": ".t.v1.Node",
                      "options": { "[google.api.http]": { "post": "/v1/nodes", "body": "node", "responseBody": "id" } } },
                ]}],
                "syntax": "proto3",
            }),
        );
        pool
    }

    #[test]
    fn field_behaviors_recursion_wrappers_and_body_fields() {
        let pool = node_pool(json!({ "get": "/v1/nodes/{id}" }));
        let document = document(&pool, "t", "1").unwrap();
        let schemas = &document["components"]["schemas"];
        let node = &schemas["t.v1.Node"];
        assert_eq!(node["required"], json!(["id"]));
        assert_eq!(node["properties"]["etag"]["readOnly"], true);
        assert!(node["properties"]["id"]["description"].as_str().unwrap().contains("Immutable"));
        assert_eq!(node["properties"]["displayName"], json!({ "type": "string" }));
        // Self-reference is a $ref to itself.
        assert_eq!(node["properties"]["parent"], json!({ "$ref": "#/components/schemas/t.v1.Node" }));
        assert_eq!(node["properties"]["children"]["items"], json!({ "$ref": "#/components/schemas/t.v1.Node" }));
        // A wrapper is its value, or null.
        assert_eq!(node["properties"]["weight"]["type"], json!(["string", "null"]));
        assert_eq!(schemas["t.v1.GetNodeRequest"], Value::Null, "a GET request is only parameters");

        let get = &document["paths"]["/v1/nodes/{id}"]["get"];
        let names: Vec<&str> =
            get["parameters"].as_array().unwrap().iter().map(|p| p["name"].as_str().unwrap()).collect();
        // filter.parent / filter.inner.back are Node again: not followed;
        // OUTPUT_ONLY filter.etag is no input.
        assert_eq!(
            names,
            ["id", "filter.id", "filter.weight", "filter.inner.label", "filter.displayName", "secret"],
            "{get}"
        );
        assert_eq!(parameter(get, "filter.weight")["schema"]["type"], "string", "no null in a query");
        assert_eq!(parameter(get, "secret")["required"], true);
        assert!(parameter(get, "filter.id").get("required").is_none(), "filter itself is not required");

        // body "*" with a nested path field: node without its id, inline.
        let update = &document["paths"]["/v1/{node.id}"]["patch"];
        assert_eq!(parameter(update, "node.id")["required"], true);
        let body = &update["requestBody"]["content"]["application/json"]["schema"];
        let inner = &body["properties"]["node"];
        assert!(inner["properties"].get("id").is_none() && inner["properties"]["displayName"].is_object(), "{body}");
        assert!(inner.get("required").is_none(), "the path field is not required in the body: {inner}");

        // body "node" and response_body "id".
        let create = &document["paths"]["/v1/nodes"]["post"];
        assert_eq!(
            create["requestBody"]["content"]["application/json"]["schema"]["$ref"],
            "#/components/schemas/t.v1.Node"
        );
        assert_eq!(create["responses"]["200"]["content"]["application/json"]["schema"], json!({ "type": "string" }));
        assert!(create.get("parameters").is_none(), "body \"node\" takes the only field");

        let mut refs = Vec::new();
        walk_refs(&document, &mut refs);
        assert!(refs.iter().all(|r| schemas.get(r.strip_prefix(SCHEMA_PREFIX).unwrap()).is_some()));
    }

    #[test]
    fn security_follows_the_access_option_of_each_rpc() {
        let catalog = eventfold_document();
        let schemes = &catalog["components"]["securitySchemes"];
        assert_eq!(
            (&schemes["bearerAuth"]["type"], &schemes["bearerAuth"]["scheme"], &schemes["bearerAuth"]["bearerFormat"]),
            (&json!("http"), &json!("bearer"), &json!("JWT"))
        );
        assert_eq!(
            (&schemes["apiKey"]["type"], &schemes["apiKey"]["in"], &schemes["apiKey"]["name"]),
            (&json!("apiKey"), &json!("header"), &json!("x-api-key"))
        );
        let either = json!([{ "bearerAuth": [] }, { "apiKey": [] }]);
        // Every eventfold RPC declares its access: GET /health (the topics'
        // health) is public, every other operation needs credentials and
        // says which roles.
        for (path, method, operation) in operations(&catalog) {
            let description = operation["description"].as_str().unwrap_or_default();
            if path == "/health" {
                assert_eq!(operation["security"], json!([]), "{method} {path}");
                assert!(description.ends_with("Public: no credentials needed."), "{method} {path}");
                continue;
            }
            assert_eq!(operation["security"], either, "{method} {path}");
            assert!(description.lines().last().is_some_and(|l| l.starts_with("Roles: ")), "{method} {path}");
        }
        let create = operation(&catalog, "OrderCommandService_CreateOrder");
        let description = create["description"].as_str().unwrap();
        assert!(description.ends_with("\n\nRoles: orders.write (or admin)."), "{description}");
        assert!(!create["summary"].as_str().unwrap().contains("Roles"), "the summary is the comment's");
        let delete = operation(&catalog, "EventStoreService_DeleteStream");
        assert!(delete["description"].as_str().unwrap().ends_with("\n\nRoles: admin."), "{delete}");
        let abort = operation(&catalog, "SagaService_AbortSaga");
        assert!(abort["description"].as_str().unwrap().ends_with("Roles: sagas.operate (or admin)."), "{abort}");

        // A public RPC needs no credentials; an RPC without the option (not
        // governed by the servers' policy) has no requirement at all.
        let mut pool = pool();
        let access = |value: Value| json!({ "[eventfold.auth.v1.access]": value });
        let method = |name: &str, path: &str, options: Value| {
            let mut options = options;
            options.as_object_mut().unwrap().insert("[google.api.http]".to_owned(), json!({ "get": path }));
            json!({ "name": name, "inputType": ".p.v1.M", "outputType": ".p.v1.M", "options": options })
        };
        add_file(
            &mut pool,
            json!({
                "name": "p/v1/p.proto",
                "package": "p.v1",
                "dependency": ["google/api/annotations.proto", "eventfold/auth/v1/auth.proto"],
                "messageType": [{ "name": "M" }],
                "service": [{ "name": "PService", "method": [
                    method("Open", "/v1/open", access(json!({ "public": true }))),
                    method("Ungoverned", "/v1/ungoverned", json!({})),
                    method("Several", "/v1/several", access(json!({ "roles": ["p.read", "admin", "p.audit"] }))),
                ]}],
                "syntax": "proto3",
            }),
        );
        let document = document(&pool, "t", "1").unwrap();
        let open = &document["paths"]["/v1/open"]["get"];
        assert_eq!(open["security"], json!([]), "{open}");
        assert_eq!(open["description"], "Public: no credentials needed.");
        let ungoverned = &document["paths"]["/v1/ungoverned"]["get"];
        assert!(ungoverned.get("security").is_none() && ungoverned.get("description").is_none(), "{ungoverned}");
        let several = &document["paths"]["/v1/several"]["get"];
        assert_eq!(several["security"], either);
        assert_eq!(several["description"], "Roles: p.read, p.audit (or admin).");
    }

    #[test]
    fn two_bindings_on_one_path_and_method_are_refused() {
        let pool = node_pool(json!({ "get": "/v1/nodes/{id}", "additionalBindings": [{ "get": "/v1/nodes/{id}" }] }));
        let error = document(&pool, "t", "1").unwrap_err();
        assert!(error.to_string().contains("a second binding of GET /v1/nodes/{id}"), "{error}");
        let pool = node_pool(json!({ "custom": { "kind": "LIST", "path": "/v1/nodes" } }));
        assert!(document(&pool, "t", "1").unwrap_err().to_string().contains("cannot describe"));
        let pool = node_pool(json!({ "get": "/v1/nodes/{id}", "additionalBindings": [{ "get": "/v1/things/{id}" }] }));
        let document = document(&pool, "t", "1").unwrap();
        let ids = [
            document["paths"]["/v1/things/{id}"]["get"]["operationId"].as_str().unwrap(),
            document["paths"]["/v1/nodes/{id}"]["get"]["operationId"].as_str().unwrap(),
        ];
        let mut sorted = ids;
        sorted.sort_unstable();
        assert_eq!(sorted, ["NodeService_GetNode", "NodeService_GetNode_2"], "one operationId per binding: {ids:?}");
    }
}
