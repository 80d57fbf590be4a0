//! HTTP request → request message, and answer message → JSON, by the
//! proto3 JSON mapping (lowerCamelCase out, both names in, 64-bit integers
//! as strings, enums by name) and the rules of `google.api.http`: path
//! variables, then the body, then query parameters for every field left.

use prost_reflect::{
    DeserializeOptions, DynamicMessage, FieldDescriptor, Kind, MessageDescriptor, ReflectMessage, SerializeOptions,
    Value,
};

use crate::{
    error::ApiError,
    rules::{Binding, Body, field_path},
};

/// Query parameters a request may carry.
pub const MAX_QUERY_PARAMS: usize = 64;
/// Nesting of a query parameter's field path (`a.b.c`).
const MAX_FIELD_DEPTH: usize = 8;

/// The request message of `binding` from the path's bindings, the raw
/// query string and the body.
///
/// # Errors
///
/// INVALID_ARGUMENT naming the field: bad JSON, an unknown field, a value
/// of the wrong type, a query parameter that is no field (or one the path
/// or body already binds).
pub fn request(
    binding: &Binding,
    path: Vec<(String, String)>,
    query: Option<&str>,
    body: &[u8],
) -> Result<DynamicMessage, ApiError> {
    let input = binding.rpc.input();
    let mut message = match &binding.body {
        Body::All if !body.is_empty() => from_json(&input, body, "body")?,
        Body::Field(field) if !body.is_empty() => {
            let mut message = DynamicMessage::new(input.clone());
            let value = field_from_json(field, body)?;
            message.set_field(field, value);
            message
        }
        Body::None if !body.iter().all(u8::is_ascii_whitespace) => {
            return Err(ApiError::invalid_argument("body", "this operation takes no body"));
        }
        _ => DynamicMessage::new(input.clone()),
    };
    let mut bound: Vec<String> = Vec::new();
    for (field, value) in path {
        set_path(&mut message, &field, &field, &value, false)?;
        bound.push(field);
    }
    let Some(query) = query.filter(|q| !q.is_empty()) else {
        return Ok(message);
    };
    let pairs: Vec<(String, String)> = query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            Ok((decode_query(key)?, decode_query(value)?))
        })
        .collect::<Result<_, ApiError>>()?;
    if pairs.len() > MAX_QUERY_PARAMS {
        return Err(ApiError::invalid_argument("query", format!("at most {MAX_QUERY_PARAMS} query parameters")));
    }
    for (key, value) in pairs {
        if matches!(binding.body, Body::All) {
            return Err(ApiError::invalid_argument(key, "every field goes in the body of this operation"));
        }
        let canonical = canonical_path(&input, &key)
            .ok_or_else(|| ApiError::invalid_argument(key.clone(), format!("no such field in {}", input.name())))?;
        let top = canonical.split('.').next().unwrap_or_default();
        if bound.iter().any(|b| b == &canonical || b.starts_with(&format!("{canonical}.")))
            || matches!(&binding.body, Body::Field(f) if f.name() == top)
        {
            return Err(ApiError::invalid_argument(key, "already bound by the path or the body"));
        }
        set_path(&mut message, &canonical, &key, &value, true)?;
    }
    Ok(message)
}

/// The JSON of an answer (of its `response_body` field if the rule names
/// one).
pub fn response(binding: &Binding, message: &DynamicMessage) -> serde_json::Value {
    let options = SerializeOptions::new();
    let json = match &binding.response_body {
        Some(field) => {
            let value = message.get_field(field);
            value_json(field, &value, &options)
        }
        None => message.serialize_with_options(serde_json::value::Serializer, &options),
    };
    // Serializing a well-formed message into a JSON value cannot fail.
    let mut json = json.unwrap_or(serde_json::Value::Null);
    whole_numbers(&mut json);
    json
}

/// Largest integer a double holds exactly.
const MAX_SAFE_INTEGER: f64 = 9_007_199_254_740_991.0;

/// Whole doubles as integers (`1`, not `1.0`), as the proto3 JSON printers
/// write them: event data (a `Struct`) reads back as it was written.
fn whole_numbers(json: &mut serde_json::Value) {
    match json {
        serde_json::Value::Number(n) => {
            if let Some(f) = n.as_f64().filter(|_| n.is_f64())
                && f.fract() == 0.0
                && f.abs() <= MAX_SAFE_INTEGER
            {
                #[allow(clippy::cast_possible_truncation)]
                let whole = f as i64;
                *n = serde_json::Number::from(whole);
            }
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(whole_numbers),
        serde_json::Value::Object(map) => map.values_mut().for_each(whole_numbers),
        _ => {}
    }
}

fn value_json(
    field: &FieldDescriptor,
    value: &Value,
    options: &SerializeOptions,
) -> Result<serde_json::Value, serde_json::Error> {
    // Wrap the field in a message of its own type to reuse the mapping.
    let mut holder = DynamicMessage::new(field.parent_message().clone());
    holder.set_field(field, value.clone());
    let whole = holder.serialize_with_options(serde_json::value::Serializer, options)?;
    Ok(whole.get(field.json_name()).cloned().unwrap_or(serde_json::Value::Null))
}

fn from_json(descriptor: &MessageDescriptor, body: &[u8], field: &str) -> Result<DynamicMessage, ApiError> {
    let mut deserializer = serde_json::Deserializer::from_slice(body);
    let message = DynamicMessage::deserialize_with_options(descriptor.clone(), &mut deserializer, &json_in())
        .map_err(|e| json_error(field, &e))?;
    deserializer.end().map_err(|e| json_error(field, &e))?;
    Ok(message)
}

fn field_from_json(field: &FieldDescriptor, body: &[u8]) -> Result<Value, ApiError> {
    // `{"<field>": <body>}` through the containing message.
    let value: serde_json::Value = serde_json::from_slice(body).map_err(|e| json_error(field.name(), &e))?;
    let wrapped = serde_json::json!({ field.json_name(): value });
    let message = DynamicMessage::deserialize_with_options(field.parent_message().clone(), wrapped, &json_in())
        .map_err(|e| json_error(field.name(), &e))?;
    Ok(message.get_field(field).into_owned())
}

fn json_in() -> DeserializeOptions {
    DeserializeOptions::new().deny_unknown_fields(true)
}

/// A JSON error as a field violation: `unknown field `x`` names `x`.
fn json_error(field: &str, error: &serde_json::Error) -> ApiError {
    let text = error.to_string();
    // prost-reflect says "unrecognized field name 'x' at line 1 column 7".
    let named = text
        .strip_prefix("unrecognized field name '")
        .and_then(|rest| rest.split('\'').next())
        .map(|name| if field == "body" { name.to_owned() } else { format!("{field}.{name}") });
    ApiError::invalid_argument(named.unwrap_or_else(|| field.to_owned()), without_value(&text))
}

/// A JSON error's text without the value it quotes. serde says "invalid
/// type: integer `4111111111111111`, expected a string": the value may be a
/// card number sent where a payment token belongs, and no error message
/// echoes a sensitive value (the line and column say where it was).
fn without_value(text: &str) -> String {
    for marker in ["invalid type: ", "invalid value: "] {
        let Some(at) = text.find(marker) else { continue };
        let (head, rest) = text.split_at(at.saturating_add(marker.len()));
        // The expected part is a type's description; a quoted value may
        // hold ", expected " itself, hence the last one.
        let Some((unexpected, expected)) = rest.rsplit_once(", expected ") else { continue };
        let quoted = [" `", " \""].iter().filter_map(|quote| unexpected.find(quote)).min();
        let kind = quoted.map_or(unexpected, |cut| &unexpected[..cut]);
        return format!("{head}{kind}, expected {expected}");
    }
    text.to_owned()
}

fn decode_query(text: &str) -> Result<String, ApiError> {
    let plus = text.replace('+', " ");
    percent_encoding::percent_decode_str(&plus)
        .decode_utf8()
        .map(std::borrow::Cow::into_owned)
        .map_err(|_| ApiError::invalid_argument("query", "not UTF-8 after percent-decoding"))
}

/// `a.b` with proto or JSON names → the proto names, if every part is a
/// field (through singular messages).
fn canonical_path(message: &MessageDescriptor, path: &str) -> Option<String> {
    if path.split('.').count() > MAX_FIELD_DEPTH {
        return None;
    }
    let mut current = message.clone();
    let mut names = Vec::new();
    let mut parts = path.split('.').peekable();
    while let Some(part) = parts.next() {
        let field = current.get_field_by_name(part).or_else(|| current.get_field_by_json_name(part))?;
        names.push(field.name().to_owned());
        if parts.peek().is_some() {
            match field.kind() {
                Kind::Message(inner) if !field.is_list() && !field.is_map() && !is_well_known(&inner) => {
                    current = inner;
                }
                _ => return None,
            }
        }
    }
    Some(names.join("."))
}

fn is_well_known(message: &MessageDescriptor) -> bool {
    message.full_name().starts_with("google.protobuf.")
}

/// Sets the field at `path` from its text; `repeated` fields take one
/// value per call (a query's `a=1&a=2`).
/// Errors name the field as the client wrote it (`label`).
fn set_path(
    message: &mut DynamicMessage,
    path: &str,
    label: &str,
    text: &str,
    from_query: bool,
) -> Result<(), ApiError> {
    let (head, rest) = match path.split_once('.') {
        Some((head, rest)) => (head, Some(rest)),
        None => (path, None),
    };
    let descriptor = message.descriptor();
    let Some(field) = descriptor.get_field_by_name(head) else {
        return Err(ApiError::invalid_argument(label, format!("no such field in {}", descriptor.name())));
    };
    if let Some(rest) = rest {
        let Value::Message(inner) = message.get_field_mut(&field) else {
            return Err(ApiError::invalid_argument(label, "not a message field"));
        };
        return set_path(inner, rest, label, text, from_query);
    }
    if field.is_map() {
        return Err(ApiError::invalid_argument(label, "a map field cannot be set from the URL"));
    }
    let value = scalar(&field, text).map_err(|why| ApiError::invalid_argument(label, why))?;
    if field.is_list() {
        if let Value::List(list) = message.get_field_mut(&field) {
            list.push(value);
        }
    } else {
        if from_query && message.has_field(&field) {
            return Err(ApiError::invalid_argument(label, "given more than once"));
        }
        message.set_field(&field, value);
    }
    Ok(())
}

/// A field's value from URL text: scalars as in their JSON mapping, enums
/// by name (or number), well-known message types by their JSON string form
/// (Timestamp as RFC 3339, Duration as `1.5s`, wrappers, FieldMask).
fn scalar(field: &FieldDescriptor, text: &str) -> Result<Value, String> {
    let number = |what: &str| format!("{text:?} is not {what}");
    Ok(match field.kind() {
        Kind::String => Value::String(text.to_owned()),
        Kind::Bool => match text {
            "true" => Value::Bool(true),
            "false" => Value::Bool(false),
            _ => return Err(number("true or false")),
        },
        Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => {
            Value::I32(text.parse().map_err(|_| number("a 32-bit integer"))?)
        }
        Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 => {
            Value::I64(text.parse().map_err(|_| number("a 64-bit integer"))?)
        }
        Kind::Uint32 | Kind::Fixed32 => Value::U32(text.parse().map_err(|_| number("an unsigned 32-bit integer"))?),
        Kind::Uint64 | Kind::Fixed64 => Value::U64(text.parse().map_err(|_| number("an unsigned 64-bit integer"))?),
        Kind::Float => Value::F32(text.parse().map_err(|_| number("a number"))?),
        Kind::Double => Value::F64(text.parse().map_err(|_| number("a number"))?),
        Kind::Bytes => {
            use base64::Engine;
            let engine = base64::engine::general_purpose::STANDARD;
            let url = base64::engine::general_purpose::URL_SAFE;
            let bytes = engine.decode(text).or_else(|_| url.decode(text)).map_err(|_| number("base64"))?;
            Value::Bytes(bytes.into())
        }
        Kind::Enum(descriptor) => match descriptor.get_value_by_name(text) {
            Some(value) => Value::EnumNumber(value.number()),
            None => match text.parse::<i32>().ok().and_then(|n| descriptor.get_value(n)) {
                Some(value) => Value::EnumNumber(value.number()),
                None => {
                    let names: Vec<String> = descriptor.values().map(|v| v.name().to_owned()).collect();
                    return Err(format!("{text:?} is not one of {}", names.join(", ")));
                }
            },
        },
        Kind::Message(descriptor) if is_well_known(&descriptor) => {
            // The JSON form of a well-known type given as a string (or, for
            // wrappers of numbers and bools, as the bare value).
            let json = match descriptor.full_name() {
                "google.protobuf.BoolValue"
                | "google.protobuf.Int32Value"
                | "google.protobuf.UInt32Value"
                | "google.protobuf.FloatValue"
                | "google.protobuf.DoubleValue" => serde_json::from_str(text).map_err(|_| number("a value"))?,
                _ => serde_json::Value::String(text.to_owned()),
            };
            let message = DynamicMessage::deserialize_with_options(descriptor.clone(), json, &json_in())
                .map_err(|e| format!("{text:?}: {e}"))?;
            Value::Message(message)
        }
        Kind::Message(descriptor) => {
            return Err(format!("a {} cannot be given in the URL; name its fields (a.b=...)", descriptor.name()));
        }
    })
}

/// The RPC path (`/package.Service/Method`) of a binding.
pub fn rpc_path(binding: &Binding) -> String {
    format!("/{}/{}", binding.rpc.parent_service().full_name(), binding.rpc.name())
}

/// Whether `path` names a field of `message` (for the router's checks).
pub fn has_field(message: &MessageDescriptor, path: &str) -> bool {
    field_path(message, path).is_some()
}

#[cfg(test)]
mod tests {
    use prost_reflect::DescriptorPool;

    use super::*;
    use crate::rules::bindings;

    fn binding(operation: &str) -> Binding {
        let pool = DescriptorPool::decode(eventfold_proto::FILE_DESCRIPTOR_SET).unwrap();
        bindings(&pool).unwrap().into_iter().find(|b| b.operation_id() == operation).unwrap()
    }

    fn json(message: &DynamicMessage) -> serde_json::Value {
        message.serialize_with_options(serde_json::value::Serializer, &SerializeOptions::new()).unwrap()
    }

    fn field_of(error: &ApiError) -> String {
        let body = error.body();
        body["error"]["details"]
            .as_array()
            .unwrap()
            .iter()
            .find_map(|d| d["fieldViolations"][0]["field"].as_str().map(str::to_owned))
            .unwrap()
    }

    #[test]
    fn path_body_and_query_fill_the_request() {
        let confirm = binding("OrderCommandService_ConfirmOrder");
        let message = request(&confirm, vec![("order_id".into(), "o-1".into())], None, br#"{"requestId": "r-1"}"#);
        let message = message.unwrap();
        let got = json(&message);
        assert_eq!(got["orderId"], "o-1");
        assert_eq!(got["requestId"], "r-1");

        let list = binding("OrderQueryService_ListOrders");
        let message = request(
            &list,
            vec![],
            Some(
                "page_size=5&customerId=c%201&status=ORDER_STATUS_CREATED&create_time_start=2026-01-02T03:04:05Z&min_position=9",
            ),
            b"",
        );
        let got = json(&message.unwrap());
        assert_eq!(got["pageSize"], 5);
        assert_eq!(got["customerId"], "c 1");
        assert_eq!(got["status"], "ORDER_STATUS_CREATED");
        assert_eq!(got["createTimeStart"], "2026-01-02T03:04:05Z");
        assert_eq!(got["minPosition"], "9", "64-bit integers are strings in JSON");
    }

    #[test]
    fn nested_repeated_and_well_known_query_parameters() {
        let read_all = binding("EventStoreService_ReadAll");
        let query = "filter.event_types=OrderCreated&filter.eventTypes=OrderShipped&filter.stream_prefixes=order-&fromPosition=18446744073709551615";
        let got = json(&request(&read_all, vec![], Some(query), b"").unwrap());
        assert_eq!(got["filter"]["eventTypes"], serde_json::json!(["OrderCreated", "OrderShipped"]));
        assert_eq!(got["filter"]["streamPrefixes"], serde_json::json!(["order-"]));
        assert_eq!(got["fromPosition"], "18446744073709551615");
        let too_big = request(&read_all, vec![], Some("fromPosition=18446744073709551616"), b"").unwrap_err();
        assert_eq!(field_of(&too_big), "fromPosition");
        let not_leaf = request(&read_all, vec![], Some("filter=x"), b"").unwrap_err();
        assert_eq!(field_of(&not_leaf), "filter");

        let list = binding("OrderQueryService_ListOrders");
        let bad_time = request(&list, vec![], Some("create_time_start=yesterday"), b"").unwrap_err();
        assert_eq!(field_of(&bad_time), "create_time_start");
        let by_number = json(&request(&list, vec![], Some("status=2"), b"").unwrap());
        assert_eq!(by_number["status"], "ORDER_STATUS_CONFIRMED", "enums by number too");
        let bad_enum = request(&list, vec![], Some("status=ORDER_STATUS_LOST"), b"").unwrap_err();
        assert_eq!(field_of(&bad_enum), "status");
    }

    #[test]
    fn answers_print_whole_numbers_as_integers() {
        let mut value = serde_json::json!({"a": 1.0, "b": [2.5, -3.0], "c": {"d": 1e300}});
        whole_numbers(&mut value);
        assert_eq!(value.to_string(), r#"{"a":1,"b":[2.5,-3],"c":{"d":1e+300}}"#);
    }

    #[test]
    fn bad_input_names_the_field() {
        let confirm = binding("OrderCommandService_ConfirmOrder");
        let unknown = request(&confirm, vec![], None, br#"{"nope": 1}"#).unwrap_err();
        assert_eq!((unknown.http_status().as_u16(), field_of(&unknown)), (400, "nope".to_owned()));
        let bad_json = request(&confirm, vec![], None, b"{").unwrap_err();
        assert_eq!(bad_json.http_status().as_u16(), 400);
        let in_query = request(&confirm, vec![], Some("requestId=x"), b"{}").unwrap_err();
        assert_eq!(field_of(&in_query), "requestId");

        let list = binding("OrderQueryService_ListOrders");
        let wrong_type = request(&list, vec![], Some("page_size=many"), b"").unwrap_err();
        assert_eq!(field_of(&wrong_type), "page_size");
        let no_field = request(&list, vec![], Some("colour=red"), b"").unwrap_err();
        assert_eq!(field_of(&no_field), "colour");
        let twice = request(&list, vec![], Some("page_size=1&page_size=2"), b"").unwrap_err();
        assert_eq!(field_of(&twice), "page_size");
        let body = request(&list, vec![], None, b"{}").unwrap_err();
        assert_eq!(field_of(&body), "body");
    }

    #[test]
    fn a_value_of_the_wrong_type_is_not_echoed() {
        let create = binding("OrderCommandService_CreateOrder");
        for (body, value) in [
            (r#"{"paymentToken": 4111111111111111}"#, "4111111111111111"),
            (r#"{"paymentToken": -41.5}"#, "41.5"),
            (r#"{"paymentToken": true}"#, "true"),
            (r#"{"items": "tok_1234, expected x"}"#, "tok_1234"),
        ] {
            let error = request(&create, vec![], None, body.as_bytes()).unwrap_err();
            let text = error.body().to_string();
            assert!(text.contains("invalid type") && !text.contains(value), "{body}: {text}");
        }
        assert_eq!(
            without_value("invalid type: floating point `1.5`, expected a string at line 1 column 9"),
            "invalid type: floating point, expected a string at line 1 column 9"
        );
        assert_eq!(
            without_value("unknown variant `X`, expected one of A, B"),
            "unknown variant `X`, expected one of A, B"
        );
    }
}
