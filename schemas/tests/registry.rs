//! The registry client against the Schema Registry stand-in of the test
//! harness: the whole catalog registers, ids are stable, schemas come back
//! as registered, and an incompatible change is refused.

use eventfold_schemas::{
    Catalog, CompatibilityLevel, Error, Reference, Registry, SchemaType, subject, topic_for_event,
};
use eventfold_tests::registry::RegistryStandIn;
use serde_json::{Value, json};

async fn get(url: String) -> Value {
    let text = reqwest::get(&url).await.unwrap().text().await.unwrap();
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("GET {url}: {e}: {text}"))
}

#[tokio::test]
async fn the_whole_catalog_registers_with_stable_ids() {
    let sr = RegistryStandIn::start().await;
    let catalog = Catalog::load().unwrap();
    let descriptors = eventfold_proto::FILE_DESCRIPTOR_SET;
    let registry = Registry::new(sr.url()).unwrap();
    let ids = registry.register_catalog(&catalog, descriptors).await.unwrap();

    assert_eq!(get(format!("{}/config", sr.url())).await, json!({ "compatibilityLevel": "BACKWARD_TRANSITIVE" }));

    // Every Avro schema under its TopicRecordNameStrategy subject.
    assert_eq!(ids.events.len(), catalog.events().count());
    let created = &ids.events[&("OrderCreated".to_owned(), 2)];
    assert_eq!(created.subject, "eventfold.orders.v1-eventfold.orders.v1.OrderCreated");
    let legacy = &ids.events[&("OrderCreated".to_owned(), 1)];
    assert_eq!(legacy.subject, "eventfold.orders.v1-eventfold.orders.v1.legacy.OrderCreated");
    assert_ne!(legacy.id, created.id);
    for ((event_type, version), registered) in &ids.events {
        let full_name = catalog.full_name(event_type, *version).unwrap();
        assert_eq!(registered.subject, subject(topic_for_event(event_type).unwrap(), &full_name));
        assert_eq!(Some(&registered.subject), catalog.subject(event_type, *version).as_ref());
        assert_eq!(registered.version, 1);
        assert_eq!(registry.event_schema_id(&catalog, event_type, *version).await.unwrap(), registered.id);
        let text = registry.schema_by_id(registered.id).await.unwrap();
        assert_eq!(text, catalog.text(event_type, *version).unwrap(), "{event_type} v{version}");
    }

    // Every proto file, imports first and referenced by subject and version.
    let subjects = get(format!("{}/subjects", sr.url())).await;
    for file in ["eventfold/orders/v1/orders.proto", "eventfold/common/v1/common.proto", "google/api/http.proto"] {
        assert!(subjects.as_array().unwrap().contains(&json!(file)), "{file} in {subjects}");
        assert!(ids.protos.contains_key(file), "{file}");
    }
    for file in ["google/api/annotations.proto", "google/protobuf/descriptor.proto", "google/protobuf/timestamp.proto"]
    {
        assert!(ids.protos.contains_key(file), "{file}");
    }
    let orders = get(format!("{}/subjects/eventfold%2Forders%2Fv1%2Forders.proto/versions/latest", sr.url())).await;
    assert_eq!(orders["schemaType"], "PROTOBUF");
    assert_eq!(orders["schema"], include_str!("../../proto/eventfold/orders/v1/orders.proto"));
    assert_eq!(
        orders["references"],
        json!([
            { "name": "eventfold/auth/v1/auth.proto", "subject": "eventfold/auth/v1/auth.proto", "version": 1 },
            { "name": "eventfold/common/v1/common.proto", "subject": "eventfold/common/v1/common.proto", "version": 1 },
            { "name": "google/api/annotations.proto", "subject": "google/api/annotations.proto", "version": 1 },
            { "name": "google/api/field_behavior.proto", "subject": "google/api/field_behavior.proto", "version": 1 },
        ])
    );
    let annotations = registry.schema_by_id(ids.protos["google/api/annotations.proto"].id).await.unwrap();
    assert!(annotations.contains("extend .google.protobuf.MethodOptions"), "{annotations}");

    // Again, and from a fresh client (no cache): the same ids, no new version.
    assert_eq!(registry.register_catalog(&catalog, descriptors).await.unwrap(), ids);
    let fresh = Registry::new(sr.url()).unwrap();
    assert_eq!(fresh.register_catalog(&catalog, descriptors).await.unwrap(), ids);
    let versions = get(format!("{}/subjects/{}/versions", sr.url(), created.subject)).await;
    assert_eq!(versions, json!([1]));
    assert_eq!(fresh.schema_by_id(created.id).await.unwrap(), catalog.text("OrderCreated", 2).unwrap());
}

#[tokio::test]
async fn an_incompatible_change_is_refused_with_409() {
    let sr = RegistryStandIn::start().await;
    let catalog = Catalog::load().unwrap();
    let registry = Registry::new(sr.url()).unwrap();
    let ids = registry.register_catalog(&catalog, eventfold_proto::FILE_DESCRIPTOR_SET).await.unwrap();
    let shipped = &ids.events[&("OrderShipped".to_owned(), 1)];

    let mut schema: Value = serde_json::from_str(catalog.text("OrderShipped", 1).unwrap()).unwrap();
    schema["fields"].as_array_mut().unwrap().push(json!({ "name": "eta", "type": "string" }));
    let err = registry.register(&shipped.subject, &schema.to_string(), SchemaType::Avro, &[]).await.unwrap_err();
    assert_eq!(err.registry_code(), Some(409), "{err}");
    assert!(matches!(err, Error::Registry { retriable: false, .. }), "{err:?}");

    // With a default it evolves: a new version, a new id.
    schema["fields"][3] = json!({ "name": "eta", "type": ["null", "string"], "default": null });
    let id = registry.register(&shipped.subject, &schema.to_string(), SchemaType::Avro, &[]).await.unwrap();
    assert_ne!(id, shipped.id);
    let found = registry.lookup(&shipped.subject, &schema.to_string(), SchemaType::Avro, &[]).await.unwrap();
    assert_eq!((found.id, found.version), (id, 2));

    // A subject-level NONE lets anything in.
    registry.set_compatibility(Some(&shipped.subject), CompatibilityLevel::None).await.unwrap();
    assert_eq!(get(format!("{}/config/{}", sr.url(), shipped.subject)).await, json!({ "compatibilityLevel": "NONE" }));
    schema["fields"][3] = json!({ "name": "eta", "type": "long" });
    registry.register(&shipped.subject, &schema.to_string(), SchemaType::Avro, &[]).await.unwrap();
}

#[tokio::test]
async fn lookups_of_unknown_things_carry_the_registry_codes() {
    let sr = RegistryStandIn::start().await;
    let registry = Registry::new(sr.url()).unwrap();
    let schema = r#"{"type": "record", "name": "A", "fields": [{"name": "x", "type": "long"}]}"#;
    let err = registry.id_of("nope", schema, SchemaType::Avro, &[]).await.unwrap_err();
    assert_eq!(err.registry_code(), Some(40401), "{err}");
    let id = registry.register("a", schema, SchemaType::Avro, &[]).await.unwrap();
    assert_eq!(registry.id_of("a", schema, SchemaType::Avro, &[]).await.unwrap(), id);
    let other = r#"{"type": "record", "name": "B", "fields": []}"#;
    let err = registry.id_of("a", other, SchemaType::Avro, &[]).await.unwrap_err();
    assert_eq!(err.registry_code(), Some(40403), "{err}");
    let catalog = Catalog::load().unwrap();
    let err = registry.event_schema_id(&catalog, "OrderShipped", 1).await.unwrap_err();
    assert_eq!(err.registry_code(), Some(40401), "{err}");
    let err = registry.event_schema_id(&catalog, "OrderShipped", 9).await.unwrap_err();
    assert_eq!(err, Error::UnknownEvent { event_type: "OrderShipped".into(), version: 9 });
    let err = registry.schema_by_id(id + 100).await.unwrap_err();
    assert_eq!(err.registry_code(), Some(40403), "{err}");
    let err = registry.register("a", "{", SchemaType::Avro, &[]).await.unwrap_err();
    assert_eq!(err.registry_code(), Some(42201), "{err}");
    let missing = [Reference { name: "x.proto".into(), subject: "x.proto".into(), version: 1 }];
    let err = registry.register("p.proto", "syntax = \"proto3\";", SchemaType::Protobuf, &missing).await.unwrap_err();
    assert_eq!(err.registry_code(), Some(42201), "{err}");
}

#[tokio::test]
async fn an_unreachable_registry_is_a_retriable_error() {
    // A port that was free a moment ago: nothing listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let registry = Registry::new(format!("http://127.0.0.1:{port}")).unwrap();
    let err = registry.schema_by_id(1).await.unwrap_err();
    assert!(matches!(err, Error::Registry { error_code: None, retriable: true, .. }), "{err:?}");
    let err = registry.set_compatibility(None, CompatibilityLevel::Backward).await.unwrap_err();
    assert!(matches!(err, Error::Registry { error_code: None, retriable: true, .. }), "{err:?}");
}
