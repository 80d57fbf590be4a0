//! Calls to the gRPC services with messages known only by their
//! descriptors: a codec over [`DynamicMessage`], and the channels of the
//! services (one upstream for all, or one per service).

use std::collections::HashMap;

use bytes::Buf;
use prost::Message;
use prost_reflect::{DynamicMessage, MessageDescriptor};
use tonic::{
    Status,
    codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder},
    transport::Channel,
};

/// Encodes request messages, decodes answers as `output`.
#[derive(Debug, Clone)]
pub struct DynamicCodec {
    output: MessageDescriptor,
}

impl DynamicCodec {
    pub fn new(output: MessageDescriptor) -> Self {
        Self { output }
    }
}

impl Codec for DynamicCodec {
    type Encode = DynamicMessage;
    type Decode = DynamicMessage;
    type Encoder = DynamicEncoder;
    type Decoder = DynamicDecoder;

    fn encoder(&mut self) -> DynamicEncoder {
        DynamicEncoder
    }

    fn decoder(&mut self) -> DynamicDecoder {
        DynamicDecoder { output: self.output.clone() }
    }
}

#[derive(Debug)]
pub struct DynamicEncoder;

impl Encoder for DynamicEncoder {
    type Item = DynamicMessage;
    type Error = Status;

    fn encode(&mut self, item: DynamicMessage, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        item.encode(dst).map_err(|e| Status::internal(format!("encoding the request: {e}")))
    }
}

#[derive(Debug)]
pub struct DynamicDecoder {
    output: MessageDescriptor,
}

impl Decoder for DynamicDecoder {
    type Item = DynamicMessage;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<DynamicMessage>, Status> {
        let bytes = src.copy_to_bytes(src.remaining());
        DynamicMessage::decode(self.output.clone(), bytes)
            .map(Some)
            .map_err(|e| Status::internal(format!("decoding the answer: {e}")))
    }
}

/// Where each service is served: one upstream for all, and upstreams per
/// proto package, named by the package's last part before the version
/// (`orders` for `eventfold.orders.v1`), so that each group of services may
/// live in its own process.
#[derive(Debug, Clone, Default)]
pub struct Upstreams {
    default: Option<Channel>,
    services: HashMap<String, Channel>,
}

/// The name of a service's package in `[gateway.upstreams]`:
/// `eventfold.orders.v1.OrderCommandService` → `orders`.
pub fn package_key(service: &str) -> &str {
    let mut parts: Vec<&str> = service.split('.').collect();
    parts.pop(); // the service
    let is_version = |p: &&str| p.len() > 1 && p.starts_with('v') && p[1..].bytes().all(|b| b.is_ascii_alphanumeric());
    if parts.last().is_some_and(is_version) {
        parts.pop();
    }
    parts.last().copied().unwrap_or(service)
}

impl Upstreams {
    /// Every service on one upstream (`eventfold dev`).
    pub fn all(channel: Channel) -> Self {
        Self { default: Some(channel), services: HashMap::new() }
    }

    /// The services of package `key` (see [`package_key`]) on their own
    /// upstream.
    pub fn with_package(mut self, key: impl Into<String>, channel: Channel) -> Self {
        self.services.insert(key.into(), channel);
        self
    }

    /// The channel of `service` (full name), if it has one.
    pub fn channel(&self, service: &str) -> Option<Channel> {
        self.services.get(package_key(service)).or(self.default.as_ref()).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn services_are_grouped_by_package() {
        assert_eq!(package_key("eventfold.orders.v1.OrderCommandService"), "orders");
        assert_eq!(package_key("eventfold.query.v1.OrderQueryService"), "query");
        assert_eq!(package_key("eventfold.eventstore.v1beta2.EventStoreService"), "eventstore");
        assert_eq!(package_key("grpc.health.v1.Health"), "health");
        assert_eq!(package_key("acme.Billing"), "acme");
        assert_eq!(package_key("Lonely"), "Lonely");
    }
}
