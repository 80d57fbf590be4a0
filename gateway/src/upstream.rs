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

/// Where each service is served.
#[derive(Debug, Clone, Default)]
pub struct Upstreams {
    default: Option<Channel>,
    services: HashMap<String, Channel>,
}

impl Upstreams {
    /// Every service on one upstream (`eventfold dev`).
    pub fn all(channel: Channel) -> Self {
        Self { default: Some(channel), services: HashMap::new() }
    }

    /// `service` (full name, e.g. `eventfold.orders.v1.OrderCommandService`)
    /// on its own upstream.
    pub fn with_service(mut self, service: impl Into<String>, channel: Channel) -> Self {
        self.services.insert(service.into(), channel);
        self
    }

    /// The channel of `service`, if it has one.
    pub fn channel(&self, service: &str) -> Option<Channel> {
        self.services.get(service).or(self.default.as_ref()).cloned()
    }
}
