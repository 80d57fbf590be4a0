//! The production encoder: Avro bodies in the Confluent wire format, with
//! the schema ids the registry assigned (looked up once per schema, then
//! cached by the registry client).

use eventfold_schemas::{Catalog, Registry, SchemaType};
use eventfold_store::RecordedEvent;

use crate::{EncodeError, ValueEncoder};

/// See the module documentation.
#[derive(Debug)]
pub struct AvroEncoder {
    catalog: Catalog,
    registry: Registry,
}

impl AvroEncoder {
    pub fn new(catalog: Catalog, registry: Registry) -> Self {
        Self { catalog, registry }
    }
}

#[async_trait::async_trait]
impl ValueEncoder for AvroEncoder {
    fn topic(&self, event: &RecordedEvent) -> String {
        eventfold_schemas::topic_for_stream(&event.stream_id)
    }

    async fn encode(&self, topic: &str, event: &RecordedEvent) -> Result<Vec<u8>, EncodeError> {
        let (event_type, version) = (event.event_type.as_str(), event.schema_version);
        let (Some(full_name), Some(text)) =
            (self.catalog.full_name(event_type, version), self.catalog.text(event_type, version))
        else {
            return Err(EncodeError::Unencodable(format!("no Avro schema for {event_type} v{version}")));
        };
        let body = self
            .catalog
            .encode(event_type, version, &event.data)
            .map_err(|e| EncodeError::Unencodable(e.to_string()))?;
        let subject = eventfold_schemas::subject(topic, &full_name);
        let id = self.registry.id_of(&subject, text, SchemaType::Avro, &[]).await.map_err(|e| {
            let hint = match e.registry_code() {
                Some(40401 | 40403) => " (register the catalog: eventfold schemas register)",
                _ => "",
            };
            EncodeError::Unavailable(format!("schema id of {subject}: {e}{hint}"))
        })?;
        Ok(eventfold_schemas::wire(id, &body))
    }
}
