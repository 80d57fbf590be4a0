//! Avro schemas of every eventfold event, their encoding, the Confluent
//! wire format and a Schema Registry client: the only crate of the
//! workspace that uses apache-avro.
//!
//! OVERVIEW: [`generate`] writes an Avro schema per event type and version
//! from the proto messages of the events (checked in under
//! `schemas/avro/`); [`Catalog`] embeds those files and converts the JSON
//! bodies of the store to Avro datums and back; [`wire`]/[`unwire`] frame a
//! datum with its registry id; [`topic_for_stream`], [`topic_for_event`]
//! and [`subject`] name topics and subjects; [`Registry`] registers the
//! catalog (Avro subjects and the proto files as PROTOBUF subjects);
//! [`check_compatibility`], [`check_tree`] and [`check_against_git`]
//! refuse schema changes that consumers could not follow.

mod catalog;
mod compat;
mod generate;
mod json;
pub mod proto_text;
mod registry;
mod topics;
mod wire;

mod embedded {
    include!(concat!(env!("OUT_DIR"), "/embedded.rs"));
}

use std::path::PathBuf;

pub use apache_avro::Schema;

pub use self::{
    catalog::Catalog,
    compat::{
        CompatibilityLevel, Incompatibility, Problem, check_against_git, check_compatibility,
        check_compatibility_level, check_tree, read_tree, validate_avro, write_tree,
    },
    generate::{AVRO_DIR, file_path, generate},
    registry::{CONTENT_TYPE, CatalogIds, Reference, Registered, Registry, RegistryConfig, SchemaType},
    topics::{CATEGORIES, Category, EventType, event_types, subject, topic_for_event, topic_for_stream},
    wire::{MAGIC_BYTE, unwire, wire},
};

/// Errors of the schema catalog, the encoding and the registry client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("no Avro schema for event {event_type} v{version}")]
    UnknownEvent { event_type: String, version: u32 },
    #[error("event {event_type} v{version} does not fit its schema at {path}: {message}")]
    Shape { event_type: String, version: u32, path: String, message: String },
    #[error("event {event_type} v{version}: avro: {message}")]
    Avro { event_type: String, version: u32, message: String },
    #[error("schema file {path}: {message}")]
    SchemaFile { path: String, message: String },
    #[error("invalid Avro schema: {0}")]
    InvalidSchema(String),
    #[error("not in the Confluent wire format: {0}")]
    Wire(String),
    #[error("proto descriptors: {0}")]
    Descriptor(String),
    /// A registry call failed: `error_code` is the registry's (e.g. 409 for
    /// an incompatible schema, 40401 subject not found) when it answered
    /// one; `retriable` when the registry was unreachable or unavailable.
    #[error("schema registry: {message}")]
    Registry { error_code: Option<u32>, message: String, retriable: bool },
    #[error("{}: {message}", .path.display())]
    Io { path: PathBuf, message: String },
    #[error("{0}")]
    Git(String),
}

impl Error {
    /// The registry's error code, if this is a registry answer.
    pub fn registry_code(&self) -> Option<u32> {
        match self {
            Self::Registry { error_code, .. } => *error_code,
            _ => None,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
