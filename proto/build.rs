//! Compiles the proto catalog hermetically: protox parses the files (no
//! system `protoc`), tonic-prost-build generates the Rust code, and the
//! encoded descriptor set is written for reflection and the gateway.

use std::{env, fs, path::PathBuf};

use protox::file::{ChainFileResolver, File, FileResolver, GoogleFileResolver, IncludeFileResolver};

/// The catalog's entry points, relative to `proto/`.
const PROTOS: &[&str] = &[
    "eventfold/auth/v1/auth.proto",
    "eventfold/common/v1/common.proto",
    "eventfold/eventstore/v1/eventstore.proto",
    "eventfold/orders/v1/orders.proto",
    "eventfold/inventory/v1/inventory.proto",
    "eventfold/payments/v1/payments.proto",
    "eventfold/shipping/v1/shipping.proto",
    "eventfold/accounts/v1/accounts.proto",
    "eventfold/users/v1/users.proto",
    "eventfold/query/v1/query.proto",
    "eventfold/sagas/v1/sagas.proto",
    "eventfold/admin/v1/api_keys.proto",
    "eventfold/admin/v1/admin.proto",
    "eventfold/topics/v1/topics.proto",
];

/// `google/api/http.proto` and `google/api/annotations.proto` declare the
/// `google.api.http` method option, `google/api/field_behavior.proto` the
/// `google.api.field_behavior` field option (AIP-203). They are not shipped
/// by any crate, so the build declares the public interface itself (same
/// package, names and numbers as the published googleapis definitions).
/// `buf` gets the published files from PyPI instead (see `tests/run`).
const GOOGLE_API_HTTP: &str = r#"
syntax = "proto3";
package google.api;

message Http {
  repeated HttpRule rules = 1;
  bool fully_decode_reserved_expansion = 2;
}

message HttpRule {
  string selector = 1;
  oneof pattern {
    string get = 2;
    string put = 3;
    string post = 4;
    string delete = 5;
    string patch = 6;
    CustomHttpPattern custom = 8;
  }
  string body = 7;
  string response_body = 12;
  repeated HttpRule additional_bindings = 11;
}

message CustomHttpPattern {
  string kind = 1;
  string path = 2;
}
"#;

const GOOGLE_API_ANNOTATIONS: &str = r#"
syntax = "proto3";
package google.api;

import "google/api/http.proto";
import "google/protobuf/descriptor.proto";

extend google.protobuf.MethodOptions {
  HttpRule http = 72295728;
}
"#;

const GOOGLE_API_FIELD_BEHAVIOR: &str = r#"
syntax = "proto3";
package google.api;

import "google/protobuf/descriptor.proto";

extend google.protobuf.FieldOptions {
  repeated FieldBehavior field_behavior = 1052;
}

enum FieldBehavior {
  FIELD_BEHAVIOR_UNSPECIFIED = 0;
  OPTIONAL = 1;
  REQUIRED = 2;
  OUTPUT_ONLY = 3;
  INPUT_ONLY = 4;
  IMMUTABLE = 5;
  UNORDERED_LIST = 6;
  NON_EMPTY_DEFAULT = 7;
  IDENTIFIER = 8;
}
"#;

struct GoogleApiResolver;

impl FileResolver for GoogleApiResolver {
    fn open_file(&self, name: &str) -> Result<File, protox::Error> {
        match name {
            "google/api/http.proto" => File::from_source(name, GOOGLE_API_HTTP),
            "google/api/annotations.proto" => File::from_source(name, GOOGLE_API_ANNOTATIONS),
            "google/api/field_behavior.proto" => File::from_source(name, GOOGLE_API_FIELD_BEHAVIOR),
            _ => Err(protox::Error::file_not_found(name)),
        }
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let out = PathBuf::from(env::var("OUT_DIR")?);

    let mut resolver = ChainFileResolver::new();
    resolver.add(IncludeFileResolver::new(root.clone()));
    resolver.add(GoogleApiResolver);
    resolver.add(GoogleFileResolver::new());

    let mut compiler = protox::Compiler::with_file_resolver(resolver);
    compiler.include_imports(true).include_source_info(true);
    for proto in PROTOS {
        compiler.open_file(proto)?;
        println!("cargo:rerun-if-changed={}", root.join(proto).display());
    }
    let fds = compiler.file_descriptor_set();
    fs::write(out.join("eventfold_descriptor.bin"), compiler.encode_file_descriptor_set())?;

    tonic_prost_build::configure().build_client(true).build_server(true).compile_fds(fds)?;
    Ok(())
}
