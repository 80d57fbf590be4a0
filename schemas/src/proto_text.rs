//! The `.proto` texts of the catalog's files, for the registry's PROTOBUF
//! subjects.
//!
//! eventfold's own files are registered with their sources, embedded at
//! build time from `proto/` (comments included). The imports that are not
//! ours (`google/protobuf/*.proto` from protox's well-known types and
//! `google/api/*.proto` as the proto crate declares them) exist here only
//! as descriptors, so their text is printed from the descriptor by
//! [`print_file`]: a faithful proto source of the same definitions
//! (messages, fields with labels, defaults and json names, oneofs, maps,
//! enums, reserved ranges, extension ranges, extensions, services and the
//! options prost-types models), without the comments. A test compiles the
//! printed texts of the whole descriptor set again with protox and checks
//! that the descriptors come out the same.

use std::fmt::Write as _;

use prost_types::{
    DescriptorProto, EnumDescriptorProto, FieldDescriptorProto, FileDescriptorProto, ServiceDescriptorProto,
    field_descriptor_proto::{Label, Type},
};

use crate::embedded;

/// The embedded source of one of eventfold's proto files, by its import
/// path (e.g. `eventfold/orders/v1/orders.proto`).
pub fn embedded_source(name: &str) -> Option<&'static str> {
    embedded::PROTO_SOURCES.iter().find(|(path, _)| *path == name).map(|(_, text)| *text)
}

/// The text to register for a file of the descriptor set: its embedded
/// source when it is one of ours, else the text printed from its
/// descriptor.
pub fn proto_text(file: &FileDescriptorProto) -> String {
    match embedded_source(file.name()) {
        Some(text) => text.to_owned(),
        None => print_file(file),
    }
}

/// Field numbers run up to 2^29 - 1; ranges end exclusively at 2^29.
const FIELD_MAX_EXCLUSIVE: i32 = 536_870_912;

/// A proto source with the definitions of `file` (types fully qualified).
pub fn print_file(file: &FileDescriptorProto) -> String {
    let mut out = format!(
        "// {}: printed from its descriptor by eventfold-schemas (same definitions, no comments).\n\n",
        file.name()
    );
    let proto3 = file.syntax() == "proto3";
    // No syntax statement means proto2, as in the descriptor.
    if !file.syntax().is_empty() {
        let _ = writeln!(out, "syntax = {};\n", quote(file.syntax()));
    }
    if !file.package().is_empty() {
        let _ = writeln!(out, "package {};", file.package());
    }
    if !file.dependency.is_empty() {
        out.push('\n');
        for (i, dependency) in file.dependency.iter().enumerate() {
            let i = i as i32;
            let kind = if file.public_dependency.contains(&i) {
                "public "
            } else if file.weak_dependency.contains(&i) {
                "weak "
            } else {
                ""
            };
            let _ = writeln!(out, "import {kind}{};", quote(dependency));
        }
    }
    if let Some(o) = &file.options {
        let mut options = Vec::new();
        let strings = [
            ("java_package", &o.java_package),
            ("java_outer_classname", &o.java_outer_classname),
            ("go_package", &o.go_package),
            ("objc_class_prefix", &o.objc_class_prefix),
            ("csharp_namespace", &o.csharp_namespace),
            ("swift_prefix", &o.swift_prefix),
            ("php_class_prefix", &o.php_class_prefix),
            ("php_namespace", &o.php_namespace),
            ("php_metadata_namespace", &o.php_metadata_namespace),
            ("ruby_package", &o.ruby_package),
        ];
        for (name, value) in strings {
            if let Some(value) = value {
                options.push(format!("{name} = {}", quote(value)));
            }
        }
        let bools = [
            ("java_multiple_files", o.java_multiple_files),
            // Deprecated in descriptor.proto, still printed when a file sets it.
            #[allow(deprecated)]
            ("java_generate_equals_and_hash", o.java_generate_equals_and_hash),
            ("java_string_check_utf8", o.java_string_check_utf8),
            ("cc_generic_services", o.cc_generic_services),
            ("java_generic_services", o.java_generic_services),
            ("py_generic_services", o.py_generic_services),
            ("php_generic_services", o.php_generic_services),
            ("deprecated", o.deprecated),
            ("cc_enable_arenas", o.cc_enable_arenas),
        ];
        for (name, value) in bools {
            if let Some(value) = value {
                options.push(format!("{name} = {value}"));
            }
        }
        if let Some(mode) = o.optimize_for {
            let mode = match mode {
                2 => "CODE_SIZE",
                3 => "LITE_RUNTIME",
                _ => "SPEED",
            };
            options.push(format!("optimize_for = {mode}"));
        }
        if !options.is_empty() {
            out.push('\n');
            for option in options {
                let _ = writeln!(out, "option {option};");
            }
        }
    }
    let printer = Printer { proto3 };
    for message in &file.message_type {
        out.push('\n');
        printer.message(&mut out, message, 0);
    }
    for e in &file.enum_type {
        out.push('\n');
        printer.enumeration(&mut out, e, 0);
    }
    for service in &file.service {
        out.push('\n');
        printer.service(&mut out, service);
    }
    if !file.extension.is_empty() {
        out.push('\n');
        printer.extensions(&mut out, &file.extension, 0);
    }
    out
}

struct Printer {
    proto3: bool,
}

impl Printer {
    fn message(&self, out: &mut String, message: &DescriptorProto, depth: usize) {
        let pad = indent(depth);
        let inner = indent(depth + 1);
        let _ = writeln!(out, "{pad}message {} {{", message.name());
        if let Some(o) = &message.options {
            for (name, value) in [
                ("message_set_wire_format", o.message_set_wire_format),
                ("no_standard_descriptor_accessor", o.no_standard_descriptor_accessor),
                ("deprecated", o.deprecated),
            ] {
                if let Some(value) = value {
                    let _ = writeln!(out, "{inner}option {name} = {value};");
                }
            }
        }
        let mut printed_oneofs = Vec::new();
        for field in &message.field {
            match field.oneof_index {
                Some(index) if !field.proto3_optional() => {
                    if printed_oneofs.contains(&index) {
                        continue;
                    }
                    printed_oneofs.push(index);
                    let name = message.oneof_decl.get(index as usize).map_or("", |o| o.name());
                    let _ = writeln!(out, "{inner}oneof {name} {{");
                    for member in message.field.iter().filter(|f| f.oneof_index == Some(index)) {
                        self.field(out, message, member, depth + 2, false, true);
                    }
                    let _ = writeln!(out, "{inner}}}");
                }
                _ => self.field(out, message, field, depth + 1, false, false),
            }
        }
        for nested in &message.nested_type {
            if !is_map_entry(nested) {
                self.message(out, nested, depth + 1);
            }
        }
        for e in &message.enum_type {
            self.enumeration(out, e, depth + 1);
        }
        for range in &message.extension_range {
            let _ = writeln!(out, "{inner}extensions {};", range_text(range.start(), range.end(), FIELD_MAX_EXCLUSIVE));
        }
        if !message.reserved_range.is_empty() {
            let ranges: Vec<String> =
                message.reserved_range.iter().map(|r| range_text(r.start(), r.end(), FIELD_MAX_EXCLUSIVE)).collect();
            let _ = writeln!(out, "{inner}reserved {};", ranges.join(", "));
        }
        if !message.reserved_name.is_empty() {
            let names: Vec<String> = message.reserved_name.iter().map(|n| quote(n)).collect();
            let _ = writeln!(out, "{inner}reserved {};", names.join(", "));
        }
        if !message.extension.is_empty() {
            self.extensions(out, &message.extension, depth + 1);
        }
        let _ = writeln!(out, "{pad}}}");
    }

    fn field(
        &self,
        out: &mut String,
        message: &DescriptorProto,
        field: &FieldDescriptorProto,
        depth: usize,
        extension: bool,
        in_oneof: bool,
    ) {
        let pad = indent(depth);
        let map_entry = (field.label() == Label::Repeated && field.r#type() == Type::Message)
            .then(|| {
                let simple = field.type_name().rsplit('.').next().unwrap_or_default();
                message.nested_type.iter().find(|n| n.name() == simple && is_map_entry(n))
            })
            .flatten();
        let ty = match map_entry {
            Some(entry) => {
                let key = entry.field.iter().find(|f| f.number() == 1);
                let value = entry.field.iter().find(|f| f.number() == 2);
                format!("map<{}, {}>", key.map(type_text).unwrap_or_default(), value.map(type_text).unwrap_or_default())
            }
            None => type_text(field),
        };
        let label = if in_oneof || map_entry.is_some() {
            ""
        } else {
            match field.label() {
                Label::Repeated => "repeated ",
                Label::Required => "required ",
                Label::Optional if !self.proto3 || field.proto3_optional() => "optional ",
                Label::Optional => "",
            }
        };
        let mut options = Vec::new();
        if let Some(default) = &field.default_value {
            let value = match field.r#type() {
                Type::String => quote(default),
                // Bytes defaults are stored C-escaped already.
                Type::Bytes => format!("\"{default}\""),
                _ => default.clone(),
            };
            options.push(format!("default = {value}"));
        }
        if !extension
            && let Some(json_name) = &field.json_name
            && *json_name != default_json_name(field.name())
        {
            options.push(format!("json_name = {}", quote(json_name)));
        }
        if let Some(o) = &field.options {
            if let Some(ctype) = o.ctype {
                options.push(format!(
                    "ctype = {}",
                    match ctype {
                        1 => "CORD",
                        2 => "STRING_PIECE",
                        _ => "STRING",
                    }
                ));
            }
            if let Some(jstype) = o.jstype {
                options.push(format!(
                    "jstype = {}",
                    match jstype {
                        1 => "JS_STRING",
                        2 => "JS_NUMBER",
                        _ => "JS_NORMAL",
                    }
                ));
            }
            for (name, value) in
                [("packed", o.packed), ("lazy", o.lazy), ("deprecated", o.deprecated), ("weak", o.weak)]
            {
                if let Some(value) = value {
                    options.push(format!("{name} = {value}"));
                }
            }
        }
        let options = if options.is_empty() { String::new() } else { format!(" [{}]", options.join(", ")) };
        let _ = writeln!(out, "{pad}{label}{ty} {} = {}{options};", field.name(), field.number());
    }

    fn extensions(&self, out: &mut String, extensions: &[FieldDescriptorProto], depth: usize) {
        let pad = indent(depth);
        let mut extendees: Vec<&str> = Vec::new();
        for e in extensions {
            if !extendees.contains(&e.extendee()) {
                extendees.push(e.extendee());
            }
        }
        let none = DescriptorProto::default();
        for extendee in extendees {
            let _ = writeln!(out, "{pad}extend {extendee} {{");
            for e in extensions.iter().filter(|e| e.extendee() == extendee) {
                self.field(out, &none, e, depth + 1, true, false);
            }
            let _ = writeln!(out, "{pad}}}");
        }
    }

    fn enumeration(&self, out: &mut String, e: &EnumDescriptorProto, depth: usize) {
        let pad = indent(depth);
        let inner = indent(depth + 1);
        let _ = writeln!(out, "{pad}enum {} {{", e.name());
        if let Some(o) = &e.options {
            for (name, value) in [("allow_alias", o.allow_alias), ("deprecated", o.deprecated)] {
                if let Some(value) = value {
                    let _ = writeln!(out, "{inner}option {name} = {value};");
                }
            }
        }
        for value in &e.value {
            let deprecated = value.options.as_ref().and_then(|o| o.deprecated);
            let options = deprecated.map(|d| format!(" [deprecated = {d}]")).unwrap_or_default();
            let _ = writeln!(out, "{inner}{} = {}{options};", value.name(), value.number());
        }
        if !e.reserved_range.is_empty() {
            // Enum reserved ranges are inclusive.
            let ranges: Vec<String> = e
                .reserved_range
                .iter()
                .map(|r| match (r.start(), r.end()) {
                    (s, end) if s == end => s.to_string(),
                    (s, i32::MAX) => format!("{s} to max"),
                    (s, end) => format!("{s} to {end}"),
                })
                .collect();
            let _ = writeln!(out, "{inner}reserved {};", ranges.join(", "));
        }
        if !e.reserved_name.is_empty() {
            let names: Vec<String> = e.reserved_name.iter().map(|n| quote(n)).collect();
            let _ = writeln!(out, "{inner}reserved {};", names.join(", "));
        }
        let _ = writeln!(out, "{pad}}}");
    }

    fn service(&self, out: &mut String, service: &ServiceDescriptorProto) {
        let _ = writeln!(out, "service {} {{", service.name());
        if let Some(deprecated) = service.options.as_ref().and_then(|o| o.deprecated) {
            let _ = writeln!(out, "  option deprecated = {deprecated};");
        }
        for method in &service.method {
            let stream = |yes: bool| if yes { "stream " } else { "" };
            let _ = write!(
                out,
                "  rpc {}({}{}) returns ({}{})",
                method.name(),
                stream(method.client_streaming()),
                method.input_type(),
                stream(method.server_streaming()),
                method.output_type()
            );
            let mut options = Vec::new();
            if let Some(o) = &method.options {
                if let Some(deprecated) = o.deprecated {
                    options.push(format!("deprecated = {deprecated}"));
                }
                if let Some(level) = o.idempotency_level {
                    let level = match level {
                        1 => "NO_SIDE_EFFECTS",
                        2 => "IDEMPOTENT",
                        _ => "IDEMPOTENCY_UNKNOWN",
                    };
                    options.push(format!("idempotency_level = {level}"));
                }
            }
            if options.is_empty() {
                out.push_str(";\n");
            } else {
                out.push_str(" {\n");
                for option in options {
                    let _ = writeln!(out, "    option {option};");
                }
                out.push_str("  }\n");
            }
        }
        out.push_str("}\n");
    }
}

fn is_map_entry(message: &DescriptorProto) -> bool {
    message.options.as_ref().and_then(|o| o.map_entry).unwrap_or(false)
}

fn type_text(field: &FieldDescriptorProto) -> String {
    match field.r#type() {
        Type::Double => "double",
        Type::Float => "float",
        Type::Int64 => "int64",
        Type::Uint64 => "uint64",
        Type::Int32 => "int32",
        Type::Fixed64 => "fixed64",
        Type::Fixed32 => "fixed32",
        Type::Bool => "bool",
        Type::String => "string",
        Type::Bytes => "bytes",
        Type::Uint32 => "uint32",
        Type::Sfixed32 => "sfixed32",
        Type::Sfixed64 => "sfixed64",
        Type::Sint32 => "sint32",
        Type::Sint64 => "sint64",
        Type::Message | Type::Enum | Type::Group => return field.type_name().to_owned(),
    }
    .to_owned()
}

/// `start to end` of a range whose end is exclusive; `max` at the limit.
fn range_text(start: i32, end: i32, max_exclusive: i32) -> String {
    if end == start + 1 {
        start.to_string()
    } else if end >= max_exclusive {
        format!("{start} to max")
    } else {
        format!("{start} to {}", end - 1)
    }
}

/// protoc's default JSON name: underscores dropped, the next letter upper.
fn default_json_name(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    let mut upper = false;
    for c in name.chars() {
        if c == '_' {
            upper = true;
        } else if upper {
            out.extend(c.to_uppercase());
            upper = false;
        } else {
            out.push(c);
        }
    }
    out
}

fn indent(depth: usize) -> String {
    "  ".repeat(depth)
}

/// A proto string literal.
fn quote(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for byte in text.bytes() {
        match byte {
            b'"' => out.push_str("\\\""),
            b'\\' => out.push_str("\\\\"),
            b'\n' => out.push_str("\\n"),
            b'\r' => out.push_str("\\r"),
            b'\t' => out.push_str("\\t"),
            0x20..=0x7e => out.push(byte as char),
            other => {
                let _ = write!(out, "\\{other:03o}");
            }
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_names_and_ranges_print_like_protoc() {
        assert_eq!(default_json_name("order_id"), "orderId");
        assert_eq!(default_json_name("a_b_c"), "aBC");
        assert_eq!(range_text(4, 5, FIELD_MAX_EXCLUSIVE), "4");
        assert_eq!(range_text(4, 8, FIELD_MAX_EXCLUSIVE), "4 to 7");
        assert_eq!(range_text(1000, FIELD_MAX_EXCLUSIVE, FIELD_MAX_EXCLUSIVE), "1000 to max");
        assert_eq!(quote("a\"b\\c\u{e9}"), "\"a\\\"b\\\\c\\303\\251\"");
    }

    #[test]
    fn our_files_are_embedded_with_their_sources() {
        let orders = embedded_source("eventfold/orders/v1/orders.proto").expect("orders.proto is embedded");
        assert!(orders.contains("message OrderCreated"));
        assert!(embedded_source("google/protobuf/timestamp.proto").is_none());
    }
}
