//! A Confluent Schema Registry client over plain HTTP, with an in-memory
//! cache of ids and schemas.
//!
//! The calls go through `schema_registry_converter`'s async API
//! (`perform_sr_call` for the two POSTs, `get_schema_by_id`), which keeps
//! the registry's error codes (`RawError`) as the error source. Two things
//! it does not offer are done here: references are sent as
//! `{name, subject, version}` of subjects registered beforehand (its
//! `post_schema` wants the referenced schemas' texts and registers them
//! itself, in an order we would not control), and the compatibility
//! configuration (`PUT /config`), which it has no call for: that one
//! request is sent with `reqwest` directly, the HTTP client the converter
//! is built on (same version, no TLS features).

use std::{
    collections::{BTreeMap, HashMap},
    sync::Mutex,
    time::Duration,
};

use prost::Message as _;
use prost_types::FileDescriptorSet;
use schema_registry_converter::{
    async_impl::schema_registry::{SrSettings, get_schema_by_id, perform_sr_call},
    error::SRCError,
    schema_registry_common::{RawError, SrCall},
};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::{Catalog, CompatibilityLevel, Error, proto_text::proto_text};

/// The content type of the registry's API, requests and answers.
pub const CONTENT_TYPE: &str = "application/vnd.schemaregistry.v1+json";
/// How long one registry request may take.
const TIMEOUT: Duration = Duration::from_secs(10);

/// Where the Schema Registry is (`[registry]`).
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RegistryConfig {
    /// e.g. `http://localhost:8081`.
    pub url: Option<String>,
}

/// The kinds of schema eventfold registers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SchemaType {
    Avro,
    Protobuf,
}

impl SchemaType {
    /// The registry's `schemaType`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Avro => "AVRO",
            Self::Protobuf => "PROTOBUF",
        }
    }
}

/// A schema reference: the import `name` is the `version` of `subject`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct Reference {
    pub name: String,
    pub subject: String,
    pub version: u32,
}

/// A schema as registered under a subject.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registered {
    pub subject: String,
    pub id: u32,
    pub version: u32,
}

/// What [`Registry::register_catalog`] registered.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CatalogIds {
    /// Avro schemas by (event type, version).
    pub events: BTreeMap<(String, u32), Registered>,
    /// Proto files by path (the subject too), imports included.
    pub protos: BTreeMap<String, Registered>,
}

type SchemaKey = (String, SchemaType, String, Vec<Reference>);

#[derive(Debug, Default)]
struct Cache {
    /// (subject, type, schema, references) → id, version (if known).
    registered: HashMap<SchemaKey, (u32, Option<u32>)>,
    /// id → schema text, as the registry answered.
    schemas: HashMap<u32, String>,
}

/// A client of one Confluent Schema Registry.
pub struct Registry {
    url: String,
    settings: SrSettings,
    http: reqwest::Client,
    cache: Mutex<Cache>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").field("url", &self.url).finish_non_exhaustive()
    }
}

impl Registry {
    /// A client of the registry at `url`, e.g. `http://127.0.0.1:8081`.
    pub fn new(url: impl Into<String>) -> Result<Registry, Error> {
        let url = url.into().trim_end_matches('/').to_owned();
        install_crypto_provider();
        let settings = SrSettings::new_builder(url.clone()).set_timeout(TIMEOUT).build().map_err(from_src)?;
        let http = reqwest::Client::builder().timeout(TIMEOUT).build().map_err(|e| Error::Registry {
            error_code: None,
            message: format!("cannot build the HTTP client: {e}"),
            retriable: false,
        })?;
        Ok(Registry { url, settings, http, cache: Mutex::new(Cache::default()) })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// Registers `schema` under `subject` (`POST /subjects/{subject}/versions`)
    /// and gives its global id; the same schema again gives the same id
    /// (from the cache after the first time).
    pub async fn register(
        &self,
        subject: &str,
        schema: &str,
        schema_type: SchemaType,
        references: &[Reference],
    ) -> Result<u32, Error> {
        let key = (subject.to_owned(), schema_type, schema.to_owned(), references.to_vec());
        if let Some((id, _)) = self.cache().registered.get(&key) {
            return Ok(*id);
        }
        let body = request_body(schema, schema_type, references);
        let answer = perform_sr_call(&self.settings, SrCall::PostNew(subject, &body)).await.map_err(from_src)?;
        let id = answer.id.ok_or_else(|| missing("id", subject))?;
        self.cache().registered.insert(key, (id, None));
        Ok(id)
    }

    /// The id of `schema` if it is registered under `subject`
    /// (`POST /subjects/{subject}`); a registry error with code 40401 or
    /// 40403 if it is not.
    pub async fn id_of(
        &self,
        subject: &str,
        schema: &str,
        schema_type: SchemaType,
        references: &[Reference],
    ) -> Result<u32, Error> {
        Ok(self.lookup(subject, schema, schema_type, references).await?.id)
    }

    /// Id and version of `schema` under `subject` (`POST /subjects/{subject}`).
    pub async fn lookup(
        &self,
        subject: &str,
        schema: &str,
        schema_type: SchemaType,
        references: &[Reference],
    ) -> Result<Registered, Error> {
        let key = (subject.to_owned(), schema_type, schema.to_owned(), references.to_vec());
        if let Some((id, Some(version))) = self.cache().registered.get(&key) {
            return Ok(Registered { subject: subject.to_owned(), id: *id, version: *version });
        }
        let body = request_body(schema, schema_type, references);
        let answer = perform_sr_call(&self.settings, SrCall::PostForVersion(subject, &body)).await.map_err(from_src)?;
        let id = answer.id.ok_or_else(|| missing("id", subject))?;
        let version = answer.version.ok_or_else(|| missing("version", subject))?;
        self.cache().registered.insert(key, (id, Some(version)));
        Ok(Registered { subject: subject.to_owned(), id, version })
    }

    /// The schema text with the global `id` (`GET /schemas/ids/{id}`),
    /// cached.
    pub async fn schema_by_id(&self, id: u32) -> Result<String, Error> {
        if let Some(schema) = self.cache().schemas.get(&id) {
            return Ok(schema.clone());
        }
        let answer = get_schema_by_id(id, &self.settings).await.map_err(from_src)?;
        self.cache().schemas.insert(id, answer.schema.clone());
        Ok(answer.schema)
    }

    /// Sets the compatibility level of `subject`, or the global one when
    /// `None` (`PUT /config/{subject}`, `PUT /config`).
    pub async fn set_compatibility(&self, subject: Option<&str>, level: CompatibilityLevel) -> Result<(), Error> {
        let url = match subject {
            Some(subject) => format!("{}/config/{}", self.url, encode_path_segment(subject)),
            None => format!("{}/config", self.url),
        };
        let response = self
            .http
            .put(&url)
            .header(reqwest::header::CONTENT_TYPE, CONTENT_TYPE)
            .header(reqwest::header::ACCEPT, CONTENT_TYPE)
            .body(json!({ "compatibility": level.as_str() }).to_string())
            .send()
            .await
            .map_err(|e| Error::Registry { error_code: None, message: format!("PUT {url}: {e}"), retriable: true })?;
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        let text = response.text().await.unwrap_or_default();
        let error: Option<serde_json::Value> = serde_json::from_str(&text).ok();
        let code = error.as_ref().and_then(|e| e["error_code"].as_u64()).and_then(|c| u32::try_from(c).ok());
        let message = error.as_ref().and_then(|e| e["message"].as_str().map(str::to_owned)).unwrap_or(text);
        Err(Error::Registry {
            error_code: code,
            message: format!("PUT {url} answered {status}: {message}"),
            retriable: status.is_server_error(),
        })
    }

    /// Whether the registry answers (`GET /config`, the global
    /// compatibility: a small answer whatever the number of schemas).
    pub async fn check(&self) -> Result<(), Error> {
        let url = format!("{}/config", self.url);
        let response = self.http.get(&url).header(reqwest::header::ACCEPT, CONTENT_TYPE).send().await.map_err(|e| {
            Error::Registry { error_code: None, message: format!("GET /config: {}", e.without_url()), retriable: true }
        })?;
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        Err(Error::Registry {
            error_code: None,
            message: format!("GET /config answered {status}"),
            retriable: status.is_server_error(),
        })
    }

    /// The registry id of the schema of `event_type` at `version`, looked up
    /// (not registered) under its subject and cached: what a producer puts
    /// in the wire format.
    pub async fn event_schema_id(&self, catalog: &Catalog, event_type: &str, version: u32) -> Result<u32, Error> {
        let unknown = || Error::UnknownEvent { event_type: event_type.to_owned(), version };
        let subject = catalog.subject(event_type, version).ok_or_else(unknown)?;
        let text = catalog.text(event_type, version).ok_or_else(unknown)?;
        self.id_of(&subject, text, SchemaType::Avro, &[]).await
    }

    /// Registers the whole catalog: the global compatibility level becomes
    /// BACKWARD_TRANSITIVE; every Avro schema of `catalog` goes under
    /// `{topic}-{record full name}` (TopicRecordNameStrategy; the legacy
    /// `OrderCreated` v1 record has a name, and so a subject, of its own);
    /// every file of `descriptor_set` becomes a PROTOBUF subject named by
    /// its path, after its imports, which it references by subject and
    /// version (see [`crate::proto_text`] for the texts).
    pub async fn register_catalog(&self, catalog: &Catalog, descriptor_set: &[u8]) -> Result<CatalogIds, Error> {
        self.set_compatibility(None, CompatibilityLevel::BackwardTransitive).await?;
        let mut ids = CatalogIds::default();
        for (event_type, version) in catalog.events() {
            let unknown = || Error::UnknownEvent { event_type: event_type.to_owned(), version };
            let subject = catalog.subject(event_type, version).ok_or_else(unknown)?;
            let text = catalog.text(event_type, version).ok_or_else(unknown)?;
            self.register(&subject, text, SchemaType::Avro, &[]).await?;
            let registered = self.lookup(&subject, text, SchemaType::Avro, &[]).await?;
            ids.events.insert((event_type.to_owned(), version), registered);
        }
        let set = FileDescriptorSet::decode(descriptor_set)
            .map_err(|e| Error::Descriptor(format!("cannot decode the descriptor set: {e}")))?;
        for file in dependencies_first(&set)? {
            let mut references = Vec::with_capacity(file.dependency.len());
            for import in &file.dependency {
                let registered = ids.protos.get(import).ok_or_else(|| {
                    Error::Descriptor(format!("{} imports {import}, which is not in the descriptor set", file.name()))
                })?;
                references.push(Reference {
                    name: import.clone(),
                    subject: registered.subject.clone(),
                    version: registered.version,
                });
            }
            let text = proto_text(file);
            self.register(file.name(), &text, SchemaType::Protobuf, &references).await?;
            let registered = self.lookup(file.name(), &text, SchemaType::Protobuf, &references).await?;
            ids.protos.insert(file.name().to_owned(), registered);
        }
        Ok(ids)
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, Cache> {
        self.cache.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The files of `set`, each after the files it imports.
fn dependencies_first(set: &FileDescriptorSet) -> Result<Vec<&prost_types::FileDescriptorProto>, Error> {
    let by_name: BTreeMap<&str, &prost_types::FileDescriptorProto> = set.file.iter().map(|f| (f.name(), f)).collect();
    let mut ordered = Vec::with_capacity(set.file.len());
    let mut state: HashMap<&str, bool> = HashMap::new(); // false: in progress, true: done
    fn visit<'a>(
        name: &'a str,
        by_name: &BTreeMap<&'a str, &'a prost_types::FileDescriptorProto>,
        state: &mut HashMap<&'a str, bool>,
        ordered: &mut Vec<&'a prost_types::FileDescriptorProto>,
    ) -> Result<(), Error> {
        match state.get(name) {
            Some(true) => return Ok(()),
            Some(false) => return Err(Error::Descriptor(format!("{name} imports itself through its imports"))),
            None => {}
        }
        let file = by_name
            .get(name)
            .ok_or_else(|| Error::Descriptor(format!("{name} is imported but not in the descriptor set")))?;
        state.insert(name, false);
        for import in &file.dependency {
            visit(import, by_name, state, ordered)?;
        }
        state.insert(name, true);
        ordered.push(file);
        Ok(())
    }
    for file in &set.file {
        visit(file.name(), &by_name, &mut state, &mut ordered)?;
    }
    Ok(ordered)
}

fn request_body(schema: &str, schema_type: SchemaType, references: &[Reference]) -> String {
    let mut body = json!({ "schema": schema, "schemaType": schema_type.as_str() });
    if !references.is_empty() {
        body["references"] = json!(references);
    }
    body.to_string()
}

fn missing(what: &str, subject: &str) -> Error {
    Error::Registry {
        error_code: None,
        message: format!("the registry's answer for {subject} has no {what}"),
        retriable: false,
    }
}

/// The registry's error, with its `error_code` when the registry answered
/// one.
fn from_src(e: SRCError) -> Error {
    let raw = std::error::Error::source(&e).and_then(|s| s.downcast_ref::<RawError>());
    match raw {
        Some(raw) => Error::Registry {
            error_code: Some(raw.error_code),
            message: format!("{}: {}", e.error, raw.message),
            retriable: e.retriable,
        },
        None => Error::Registry {
            error_code: None,
            message: match &e.cause {
                Some(cause) => format!("{}: {cause}", e.error),
                None => e.error.clone(),
            },
            retriable: e.retriable,
        },
    }
}

/// Percent-encodes everything but RFC 3986's unreserved characters.
fn encode_path_segment(segment: &str) -> String {
    let mut out = String::with_capacity(segment.len());
    for byte in segment.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// ring as the process's rustls provider: reqwest is built (for the
/// workspace's HTTPS users) without one of its own, and refuses to build a
/// client until one is installed. A second call does nothing.
#[allow(deprecated)]
fn install_crypto_provider() {
    drop(rustls::crypto::ring::default_provider().install_default());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_are_one_path_segment() {
        assert_eq!(encode_path_segment("eventfold/orders/v1/orders.proto"), "eventfold%2Forders%2Fv1%2Forders.proto");
        assert_eq!(encode_path_segment("a.b-c_d~e"), "a.b-c_d~e");
    }

    #[test]
    fn bodies_carry_type_and_references() {
        let body: serde_json::Value = serde_json::from_str(&request_body(
            "syntax = \"proto3\";",
            SchemaType::Protobuf,
            &[Reference { name: "a.proto".into(), subject: "a.proto".into(), version: 2 }],
        ))
        .unwrap();
        assert_eq!(
            body,
            json!({
                "schema": "syntax = \"proto3\";",
                "schemaType": "PROTOBUF",
                "references": [{ "name": "a.proto", "subject": "a.proto", "version": 2 }]
            })
        );
        let body: serde_json::Value = serde_json::from_str(&request_body("\"string\"", SchemaType::Avro, &[])).unwrap();
        assert_eq!(body, json!({ "schema": "\"string\"", "schemaType": "AVRO" }));
    }
}
