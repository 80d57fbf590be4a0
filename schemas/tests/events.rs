//! Every event body the domain writes fits its Avro schema and comes back
//! the same, and the proto messages (which the schemas come from) have
//! exactly the fields of the domain's JSON bodies.

use std::collections::{BTreeMap, BTreeSet};

use eventfold_domain::{
    Currency, DomainEvent, Money, account::*, inventory::*, order::*, payment::*, saga::*, shipment::*, user::*,
};
use eventfold_schemas::{Catalog, Error, Schema, event_types};
use prost::Message as _;
use prost_types::{FileDescriptorSet, field_descriptor_proto::Type};
use serde_json::{Value, json};

fn eur() -> Currency {
    "EUR".parse().unwrap()
}

fn money(minor: i64) -> Money {
    Money::new(minor, eur())
}

/// A realistic body of every event type the domain writes, as the store
/// holds it (the domain's own JSON).
fn samples() -> Vec<(&'static str, u32, Value)> {
    let mut out = Vec::new();
    let mut add = |event| out.push(event);
    fn of<E: DomainEvent>(event: E) -> (&'static str, u32, Value) {
        (event.event_type(), event.schema_version(), event.to_data())
    }
    let items = vec![
        OrderItem { product_id: "sku-kettle".into(), quantity: 2, unit_price: money(2_499) },
        OrderItem { product_id: "sku-mug".into(), quantity: 6, unit_price: money(850) },
    ];
    add(of(OrderEvent::from(OrderCreated {
        order_id: "ord-20240611-0001".into(),
        customer_id: "cust-8842".into(),
        currency: eur(),
        items: items.clone(),
        total: money(10_098),
        payment_token: Some("tok_visa".into()),
        carrier: Some("DHL".into()),
    })));
    // Placed without checkout details: the optional fields are absent.
    add(of(OrderEvent::from(OrderCreated {
        order_id: "ord-20240611-0002".into(),
        customer_id: "cust-8842".into(),
        currency: eur(),
        items: items.clone(),
        total: money(10_098),
        payment_token: None,
        carrier: None,
    })));
    add(of(OrderEvent::from(OrderConfirmed { order_id: "ord-20240611-0001".into() })));
    add(of(OrderEvent::from(PaymentProcessed {
        order_id: "ord-20240611-0001".into(),
        payment_id: "pay-77f3".into(),
        amount: money(10_098),
    })));
    add(of(OrderEvent::from(OrderShipped {
        order_id: "ord-20240611-0001".into(),
        carrier: "DHL".into(),
        tracking_number: "JD014600006812345678".into(),
    })));
    add(of(OrderEvent::from(OrderCancelled {
        order_id: "ord-20240611-0002".into(),
        reason: "customer changed their mind — «größe» falsch".into(),
    })));
    add(of(InventoryEvent::from(ProductRegistered {
        product_id: "sku-kettle".into(),
        name: "Electric kettle 1.7 l".into(),
    })));
    add(of(InventoryEvent::from(StockReplenished { product_id: "sku-kettle".into(), quantity: 120 })));
    add(of(InventoryEvent::from(InventoryReserved {
        product_id: "sku-kettle".into(),
        order_id: "ord-20240611-0001".into(),
        quantity: 2,
    })));
    add(of(InventoryEvent::from(InventoryReleased {
        product_id: "sku-kettle".into(),
        order_id: "ord-20240611-0002".into(),
        quantity: 1,
        reason: "order cancelled".into(),
    })));
    add(of(InventoryEvent::from(InventoryConsumed {
        product_id: "sku-kettle".into(),
        order_id: "ord-20240611-0001".into(),
        quantity: 2,
    })));
    add(of(PaymentEvent::from(PaymentAuthorized {
        payment_id: "pay-77f3".into(),
        order_id: "ord-20240611-0001".into(),
        amount: money(10_098),
        provider_reference: "auth_1PXk2L".into(),
    })));
    add(of(PaymentEvent::from(PaymentDeclined {
        payment_id: "pay-77f4".into(),
        order_id: "ord-20240611-0003".into(),
        amount: money(i64::MAX),
        reason: "insufficient funds".into(),
    })));
    add(of(PaymentEvent::from(PaymentCaptured {
        payment_id: "pay-77f3".into(),
        order_id: "ord-20240611-0001".into(),
        amount: money(10_098),
    })));
    add(of(PaymentEvent::from(PaymentRefunded {
        payment_id: "pay-77f3".into(),
        order_id: "ord-20240611-0001".into(),
        amount: money(850),
        reason: "one mug arrived broken".into(),
    })));
    add(of(PaymentEvent::from(PaymentVoided {
        payment_id: "pay-77f5".into(),
        order_id: "ord-20240611-0002".into(),
        reason: "order cancelled".into(),
    })));
    add(of(ShipmentEvent::from(ShipmentCreated {
        shipment_id: "shp-1001".into(),
        order_id: "ord-20240611-0001".into(),
        carrier: "DHL".into(),
        tracking_number: "JD014600006812345678".into(),
    })));
    add(of(ShipmentEvent::from(ShipmentDispatched {
        shipment_id: "shp-1001".into(),
        order_id: "ord-20240611-0001".into(),
    })));
    add(of(ShipmentEvent::from(ShipmentDelivered {
        shipment_id: "shp-1001".into(),
        order_id: "ord-20240611-0001".into(),
    })));
    add(of(ShipmentEvent::from(ShipmentCancelled {
        shipment_id: "shp-1002".into(),
        order_id: "ord-20240611-0002".into(),
        reason: "order cancelled".into(),
    })));
    add(of(AccountEvent::from(AccountOpened {
        account_id: "acc-alice".into(),
        owner_id: "user-alice".into(),
        currency: eur(),
    })));
    add(of(AccountEvent::from(MoneyDeposited {
        account_id: "acc-alice".into(),
        transaction_id: "tx-0001".into(),
        amount: money(50_000),
        balance: money(50_000),
    })));
    add(of(AccountEvent::from(MoneyWithdrawn {
        account_id: "acc-alice".into(),
        transaction_id: "tx-0002".into(),
        amount: money(12_000),
        balance: money(38_000),
    })));
    add(of(AccountEvent::from(TransferRequested {
        account_id: "acc-alice".into(),
        transfer_id: "trf-0001".into(),
        to_account_id: "acc-bob".into(),
        amount: money(8_000),
    })));
    add(of(AccountEvent::from(TransferSent {
        account_id: "acc-alice".into(),
        transfer_id: "trf-0001".into(),
        to_account_id: "acc-bob".into(),
        amount: money(8_000),
        balance: money(30_000),
    })));
    add(of(AccountEvent::from(TransferReceived {
        account_id: "acc-bob".into(),
        transfer_id: "trf-0001".into(),
        from_account_id: "acc-alice".into(),
        amount: money(8_000),
        balance: money(8_000),
    })));
    add(of(AccountEvent::from(TransferRefunded {
        account_id: "acc-alice".into(),
        transfer_id: "trf-0002".into(),
        amount: money(1_500),
        reason: "target account closed".into(),
        balance: money(-1),
    })));
    add(of(AccountEvent::from(AccountClosed { account_id: "acc-carol".into() })));
    add(of(UserEvent::from(UserRegistered {
        user_id: "user-alice".into(),
        email: "alice@example.com".into(),
        display_name: "Alice Ämmerli".into(),
    })));
    add(of(UserEvent::from(UserLoggedIn { user_id: "user-alice".into(), source: "203.0.113.7".into() })));
    add(of(UserEvent::from(UserActionRecorded {
        user_id: "user-alice".into(),
        action: "viewed_product".into(),
        subject: String::new(),
    })));
    let saga_id = || "fulfil-ord-20240611-0001".to_owned();
    add(of(SagaEvent::from(SagaStarted {
        saga_id: saga_id(),
        saga_type: "ORDER_FULFILMENT".into(),
        correlation_id: "ord-20240611-0001".into(),
    })));
    add(of(SagaEvent::from(SagaStepEnded {
        saga_id: saga_id(),
        step: "AUTHORIZE_PAYMENT".into(),
        outcome: "TRANSIENT".into(),
        attempt: 2,
        detail: Some("provider unavailable".into()),
    })));
    // A step that succeeded has no detail.
    add(of(SagaEvent::from(SagaStepEnded {
        saga_id: saga_id(),
        step: "RESERVE_INVENTORY".into(),
        outcome: "DONE".into(),
        attempt: 1,
        detail: None,
    })));
    add(of(SagaEvent::from(SagaCompensating { saga_id: saga_id(), reason: "PAYMENT_DECLINED".into() })));
    add(of(SagaEvent::from(SagaCompleted { saga_id: saga_id() })));
    add(of(SagaEvent::from(SagaFailed {
        saga_id: saga_id(),
        reason: "CREATE_SHIPPING_LABEL_TIMED_OUT".into(),
        compensated: false,
        compensation_errors: vec!["VOID_AUTHORIZATION: AUTHORIZATION_CAPTURED".into()],
    })));
    out
}

/// A stored `OrderCreated` v1 body (see `eventfold_domain::upcast`).
fn order_created_v1() -> Value {
    json!({
        "order_id": "ord-2019-0042",
        "customer_id": "cust-17",
        "items": [
            { "product_id": "sku-1", "quantity": 2, "unit_price": "12.50" },
            { "product_id": "sku-2", "quantity": 1, "unit_price": "0.99" }
        ],
        "total": "25.99"
    })
}

#[test]
fn every_event_type_has_a_sample() {
    let sampled: BTreeSet<(&str, u32)> = samples().iter().map(|(t, v, _)| (*t, *v)).collect();
    let current: BTreeSet<(&str, u32)> = event_types().map(|e| (e.name, e.current_version)).collect();
    assert_eq!(sampled, current, "add a sample for every event type of the domain");
}

#[test]
fn every_body_round_trips_through_avro() {
    let catalog = Catalog::load().unwrap();
    let mut bodies = samples();
    bodies.push(("OrderCreated", 1, order_created_v1()));
    for (event_type, version, body) in bodies {
        let avro = catalog
            .encode(event_type, version, &body)
            .unwrap_or_else(|e| panic!("{event_type} v{version} does not encode: {e}\n{body}"));
        let back = catalog.decode(event_type, version, &avro).unwrap();
        assert_eq!(back, body, "{event_type} v{version}");
    }
}

#[test]
fn the_legacy_body_upcasts_after_the_round_trip() {
    let catalog = Catalog::load().unwrap();
    let avro = catalog.encode("OrderCreated", 1, &order_created_v1()).unwrap();
    let body = catalog.decode("OrderCreated", 1, &avro).unwrap();
    let v2 = eventfold_domain::upcast::order_created_v1_to_v2(body).unwrap();
    // The upcast body is a v2 body: it encodes with the v2 schema.
    catalog.encode("OrderCreated", 2, &v2).unwrap();
}

/// The proto message of every event has exactly the fields of the domain's
/// JSON body (nested messages included), and the Avro record exactly the
/// proto fields in proto order.
#[test]
fn proto_messages_avro_records_and_json_bodies_have_the_same_fields() {
    let set = FileDescriptorSet::decode(eventfold_proto::FILE_DESCRIPTOR_SET).unwrap();
    let mut messages = BTreeMap::new();
    for file in &set.file {
        for message in &file.message_type {
            messages.insert(format!("{}.{}", file.package(), message.name()), message.clone());
        }
    }
    let catalog = Catalog::load().unwrap();
    let topics: BTreeMap<&str, &str> = event_types().map(|e| (e.name, e.topic)).collect();
    for (event_type, version, body) in samples() {
        let proto_name = format!("{}.{event_type}", topics[event_type]);
        let schema = catalog.schema(event_type, version).unwrap();
        compare(&messages, &proto_name, schema, &body, event_type);
    }
}

fn compare(
    messages: &BTreeMap<String, prost_types::DescriptorProto>,
    proto_name: &str,
    schema: &Schema,
    body: &Value,
    path: &str,
) {
    let message = messages.get(proto_name).unwrap_or_else(|| panic!("{path}: no proto message {proto_name}"));
    let proto_fields: Vec<&str> = message.field.iter().map(|f| f.name()).collect();
    let Schema::Record(record) = schema else { panic!("{path}: the schema is not a record") };
    let avro_fields: Vec<&str> = record.fields.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(avro_fields, proto_fields, "{path}: Avro fields vs proto fields of {proto_name}");
    let object = body.as_object().unwrap_or_else(|| panic!("{path}: the body is not an object"));
    let json_fields: BTreeSet<&str> = object.keys().map(String::as_str).collect();
    let proto_set: BTreeSet<&str> = proto_fields.iter().copied().collect();
    // Fields with explicit presence (`optional`, oneof members) may be
    // absent from a body; every other field is always there.
    let required: BTreeSet<&str> =
        message.field.iter().filter(|f| !f.proto3_optional() && f.oneof_index.is_none()).map(|f| f.name()).collect();
    assert!(
        required.is_subset(&json_fields) && json_fields.is_subset(&proto_set),
        "{path}: JSON body fields {json_fields:?} vs proto fields of {proto_name} {proto_set:?} (required {required:?})"
    );
    for field in &message.field {
        if field.r#type() != Type::Message {
            continue;
        }
        let nested_name = field.type_name().trim_start_matches('.');
        let value = &object[field.name()];
        let values: Vec<&Value> = match value {
            Value::Array(items) => items.iter().collect(),
            other => vec![other],
        };
        let avro_field = &record.fields[record.lookup[field.name()]];
        let nested_schema = named(schema, nested_name).unwrap_or_else(|| {
            panic!("{path}.{}: no Avro record {nested_name} ({:?})", field.name(), avro_field.schema)
        });
        for (i, v) in values.into_iter().enumerate() {
            compare(messages, nested_name, nested_schema, v, &format!("{path}.{}[{i}]", field.name()));
        }
    }
}

/// The definition of a named type inside `schema`.
fn named<'s>(schema: &'s Schema, full_name: &str) -> Option<&'s Schema> {
    match schema {
        Schema::Record(r) => {
            if r.name.fullname(None) == full_name {
                return Some(schema);
            }
            r.fields.iter().find_map(|f| named(&f.schema, full_name))
        }
        Schema::Array(a) => named(&a.items, full_name),
        Schema::Map(m) => named(&m.types, full_name),
        Schema::Union(u) => u.variants().iter().find_map(|v| named(v, full_name)),
        _ => None,
    }
}

#[test]
fn bodies_that_do_not_fit_say_where() {
    let catalog = Catalog::load().unwrap();
    let (_, _, good) = samples().into_iter().find(|(t, _, _)| *t == "OrderCreated").unwrap();
    let shape = |body: Value| match catalog.encode("OrderCreated", 2, &body) {
        Err(Error::Shape { path, message, .. }) => (path, message),
        other => panic!("expected a shape error, got {other:?}"),
    };

    let mut body = good.clone();
    body["items"][1]["unit_price"]["minor"] = json!("850");
    let (path, message) = shape(body);
    assert_eq!(path, "items[1].unit_price.minor");
    assert!(message.contains("integer"), "{message}");

    let mut body = good.clone();
    body.as_object_mut().unwrap().remove("customer_id");
    assert_eq!(shape(body).0, "customer_id");

    let mut body = good.clone();
    body["coupon"] = json!("SUMMER");
    let (path, message) = shape(body);
    assert_eq!(path, "coupon");
    assert!(message.contains("no such field"), "{message}");

    let mut body = good.clone();
    body["items"][0]["quantity"] = json!(u64::from(u32::MAX) + 1);
    assert_eq!(shape(body).0, "items[0].quantity");

    let err = catalog.encode("OrderCreated", 2, &json!([])).unwrap_err();
    assert!(err.to_string().contains("OrderCreated v2 does not fit its schema at the body"), "{err}");

    let err = catalog.encode("OrderExploded", 1, &good).unwrap_err();
    assert_eq!(err, Error::UnknownEvent { event_type: "OrderExploded".into(), version: 1 });
    assert_eq!(err.to_string(), "no Avro schema for event OrderExploded v1");
}

#[test]
fn bad_datums_are_errors() {
    let catalog = Catalog::load().unwrap();
    let avro = catalog.encode("OrderConfirmed", 1, &json!({ "order_id": "o-1" })).unwrap();
    let mut longer = avro.clone();
    longer.push(0);
    let err = catalog.decode("OrderConfirmed", 1, &longer).unwrap_err();
    assert!(err.to_string().contains("1 bytes left"), "{err}");
    assert!(catalog.decode("OrderCreated", 2, &avro[..1]).is_err());
}
