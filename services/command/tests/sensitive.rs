//! The sensitive fields are listed once, in the proto files
//! (`[(eventfold.auth.v1.sensitive) = true]`), and masked in the domain by
//! `eventfold_domain::Sensitive`: this test holds the two together.
//!
//! Every RPC of every command service is called, built from its
//! descriptor, with a distinct value in every string field; a bus that
//! only records what it is sent gets the envelope. Its `{:?}`:
//! - shows no value of a field the descriptors mark sensitive (the domain
//!   masks at least what the proto files list), while the unmasked text
//!   does show it (the value is carried, so the check means something);
//! - shows `<redacted>` once per sensitive field sent (the domain masks
//!   nothing the proto files do not list).
//!
//! The events the empty aggregate decides from each command (the
//! creation events: OrderCreated, UserRegistered, ...) are checked the
//! same way against the proto message of the same name, field by field
//! through their JSON, whose keys are the proto field names.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
};

use bytes::Bytes;
use eventfold_command::{
    AccountCommands, Bus, Command, Envelope, Error, InventoryCommands, OrderCommands, PaymentCommands, Reply,
    SERVICE_NAMES, ShippingCommands, UserCommands,
};
use eventfold_domain::{
    Aggregate, DomainEvent,
    account::Account,
    inventory::Inventory,
    order::Order,
    payment::Payment,
    sensitive::{REDACTED, unmasked_debug},
    shipment::Shipment,
    user::User,
};
use eventfold_proto::{
    accounts::account_command_service_server::AccountCommandServiceServer,
    inventory::inventory_command_service_server::InventoryCommandServiceServer,
    orders::order_command_service_server::OrderCommandServiceServer,
    payments::payment_command_service_server::PaymentCommandServiceServer,
    shipping::shipping_command_service_server::ShippingCommandServiceServer,
    users::user_command_service_server::UserCommandServiceServer,
};
use http_body_util::Full;
use prost::Message as _;
use prost_reflect::{
    DescriptorPool, DynamicMessage, ExtensionDescriptor, FieldDescriptor, Kind, MessageDescriptor, Value,
};
use tonic::{codegen::http, service::Routes};
use tower::{ServiceExt, service_fn, util::BoxCloneSyncService};

const SENSITIVE: &str = "eventfold.auth.v1.sensitive";

fn pool() -> DescriptorPool {
    DescriptorPool::decode(eventfold_proto::FILE_DESCRIPTOR_SET).expect("the catalog decodes")
}

fn is_sensitive(field: &FieldDescriptor, extension: &ExtensionDescriptor) -> bool {
    let options = field.options();
    options.has_extension(extension) && options.get_extension(extension).as_bool() == Some(true)
}

/// Fills `message` with a value in every field: strings distinct (each
/// also remembered by field, to look for later), emails as addresses,
/// currencies a code (they must parse, and are not sensitive); numbers 1, enums their first non-zero value, one element
/// per repeated field, nested messages filled in turn.
struct Filler {
    next: u32,
    sent: Vec<(FieldDescriptor, String)>,
}

impl Filler {
    fn string(&mut self, field: &FieldDescriptor) -> String {
        if field.name() == "currency" {
            return "EUR".to_owned();
        }
        self.next += 1;
        let mut value = format!("val{:03}q", self.next);
        if field.name() == "email" {
            value.push_str("@example.com");
        }
        self.sent.push((field.clone(), value.clone()));
        value
    }

    fn value(&mut self, field: &FieldDescriptor, depth: usize) -> Option<Value> {
        Some(match field.kind() {
            Kind::String => Value::String(self.string(field)),
            Kind::Bool => Value::Bool(true),
            Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => Value::I32(1),
            Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 => Value::I64(1),
            Kind::Uint32 | Kind::Fixed32 => Value::U32(1),
            Kind::Uint64 | Kind::Fixed64 => Value::U64(1),
            Kind::Float => Value::F32(1.0),
            Kind::Double => Value::F64(1.0),
            Kind::Bytes => Value::Bytes(Bytes::from_static(b"\x01")),
            Kind::Enum(e) => Value::EnumNumber(e.values().map(|v| v.number()).find(|n| *n != 0)?),
            Kind::Message(m) if depth < 4 => Value::Message(self.message(&m, depth + 1)),
            Kind::Message(_) => return None,
        })
    }

    fn message(&mut self, descriptor: &MessageDescriptor, depth: usize) -> DynamicMessage {
        let mut message = DynamicMessage::new(descriptor.clone());
        for field in descriptor.fields() {
            if field.is_map() {
                continue;
            }
            let Some(value) = self.value(&field, depth) else { continue };
            let value = if field.is_list() { Value::List(vec![value]) } else { value };
            message.set_field(&field, value);
        }
        message
    }
}

/// A bus that records every envelope and refuses it.
fn recording_bus(seen: Arc<Mutex<Vec<Envelope>>>) -> Bus {
    BoxCloneSyncService::new(service_fn(move |envelope: Envelope| {
        let seen = seen.clone();
        async move {
            seen.lock().unwrap().push(envelope);
            Err::<Reply, Error>(Error::PermissionDenied("recorded".to_owned()))
        }
    }))
}

fn routes(bus: &Bus) -> Routes {
    Routes::new(OrderCommandServiceServer::new(OrderCommands::new(bus.clone())))
        .add_service(InventoryCommandServiceServer::new(InventoryCommands::new(bus.clone())))
        .add_service(PaymentCommandServiceServer::new(PaymentCommands::new(bus.clone())))
        .add_service(ShippingCommandServiceServer::new(ShippingCommands::new(bus.clone())))
        .add_service(AccountCommandServiceServer::new(AccountCommands::new(bus.clone())))
        .add_service(UserCommandServiceServer::new(UserCommands::new(bus.clone())))
}

/// Sends `message` as a unary gRPC call of `path`; the status the server
/// answered with (`grpc-status`, `grpc-message`), for a failure message.
async fn call(routes: &Routes, path: &str, message: &DynamicMessage) -> String {
    let body = message.encode_to_vec();
    let mut frame = vec![0u8];
    frame.extend_from_slice(&u32::try_from(body.len()).unwrap().to_be_bytes());
    frame.extend_from_slice(&body);
    let request = http::Request::builder()
        .method("POST")
        .uri(path)
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Full::new(Bytes::from(frame)))
        .unwrap();
    let response = routes.clone().oneshot(request).await.unwrap();
    let header = |name: &str| response.headers().get(name).map(|v| v.to_str().unwrap_or("?").to_owned());
    format!(
        "http {}, grpc-status {:?}, grpc-message {:?}",
        response.status(),
        header("grpc-status"),
        header("grpc-message")
    )
}

/// The text's `<redacted>` marks.
fn marks(text: &str) -> usize {
    text.matches(REDACTED).count()
}

/// The events the empty aggregate decides from `command`, as (type, JSON,
/// `{:?}`, unmasked `{:?}`); none when it refuses it (every command but a
/// creation needs an existing aggregate).
fn decided(command: &Command) -> Vec<(String, serde_json::Value, String, String)> {
    fn events<A: Aggregate>(command: &A::Command) -> Vec<(String, serde_json::Value, String, String)> {
        A::default()
            .decide(command)
            .unwrap_or_default()
            .iter()
            .map(|e| (e.event_type().to_owned(), e.to_data(), format!("{e:?}"), unmasked_debug(e)))
            .collect()
    }
    match command {
        Command::Order { command, .. } => events::<Order>(command),
        Command::Inventory { command, .. } => events::<Inventory>(command),
        Command::AuthorizePayment { .. } => Vec::new(),
        Command::Payment { command, .. } => events::<Payment>(command),
        Command::Shipment { command, .. } => events::<Shipment>(command),
        Command::Account { command, .. } => events::<Account>(command),
        Command::User { command, .. } => events::<User>(command),
    }
}

/// The eventfold message named `name` (an event type), if there is one.
fn event_message(pool: &DescriptorPool, name: &str) -> Option<MessageDescriptor> {
    let found: Vec<_> =
        pool.all_messages().filter(|m| m.name() == name && m.package_name().starts_with("eventfold.")).collect();
    assert!(found.len() <= 1, "event type {name} names {} messages", found.len());
    found.into_iter().next()
}

#[tokio::test]
async fn the_domain_masks_exactly_the_fields_the_descriptors_mark_sensitive() {
    let pool = pool();
    let extension = pool.get_extension_by_name(SENSITIVE).expect("auth.proto declares the option");
    let seen = Arc::new(Mutex::new(Vec::new()));
    let routes = routes(&recording_bus(seen.clone()));
    let mut rpcs = 0;
    let mut sensitive_sent = BTreeMap::<String, usize>::new();
    let mut events_checked = BTreeMap::<String, usize>::new();

    for service in SERVICE_NAMES {
        let service = pool.get_service_by_name(service).expect("the command service is in the catalog");
        for method in service.methods() {
            rpcs += 1;
            let rpc = format!("/{}/{}", service.full_name(), method.name());
            let mut filler = Filler { next: 0, sent: Vec::new() };
            let request = filler.message(&method.input(), 0);
            let answer = call(&routes, &rpc, &request).await;
            let envelope = {
                let mut seen = seen.lock().unwrap();
                assert_eq!(seen.len(), 1, "{rpc}: one command reaches the bus ({answer}); request {request:?}");
                seen.remove(0)
            };

            let (masked, unmasked) = (format!("{envelope:?}"), unmasked_debug(&envelope));
            let secrets: Vec<_> = filler.sent.iter().filter(|(field, _)| is_sensitive(field, &extension)).collect();
            for (field, value) in &secrets {
                assert!(unmasked.contains(value.as_str()), "{rpc}: {} is not carried: {unmasked}", field.full_name());
                assert!(!masked.contains(value.as_str()), "{rpc}: {} is marked sensitive: {masked}", field.full_name());
                *sensitive_sent.entry(field.full_name().to_owned()).or_default() += 1;
            }
            assert_eq!(
                marks(&masked),
                secrets.len(),
                "{rpc}: the command masks exactly the fields marked sensitive {:?}: {masked}",
                secrets.iter().map(|(f, _)| f.name()).collect::<Vec<_>>()
            );

            for (event_type, json, masked, unmasked) in decided(&envelope.command) {
                let message = event_message(&pool, &event_type)
                    .unwrap_or_else(|| panic!("event {event_type} has no proto message"));
                let mut marked = 0;
                for field in message.fields().filter(|f| is_sensitive(f, &extension)) {
                    let Some(value) = json.get(field.name()).and_then(serde_json::Value::as_str) else { continue };
                    marked += 1;
                    assert!(unmasked.contains(value), "{event_type}.{} is not carried: {unmasked}", field.name());
                    assert!(!masked.contains(value), "{event_type}.{} is marked sensitive: {masked}", field.name());
                }
                assert_eq!(marks(&masked), marked, "{event_type} masks exactly its sensitive fields: {masked}");
                *events_checked.entry(event_type).or_default() += marked;
            }
        }
    }

    assert!(rpcs >= 27, "every command RPC was called: {rpcs}");
    assert_eq!(
        sensitive_sent.keys().map(String::as_str).collect::<Vec<_>>(),
        ["eventfold.orders.v1.CreateOrderRequest.payment_token", "eventfold.users.v1.RegisterUserRequest.email"],
        "the sensitive request fields"
    );
    for (event, masked) in [("OrderCreated", 1), ("UserRegistered", 1), ("ProductRegistered", 0)] {
        assert_eq!(events_checked.get(event), Some(&masked), "{event} was checked: {events_checked:?}");
    }
}
