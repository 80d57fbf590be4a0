//! The checked-in Avro schemas are exactly what the generator makes of the
//! current proto files: a proto change without regenerating fails here.

use std::path::{Path, PathBuf};

use eventfold_schemas::{Catalog, event_types, generate, read_tree};

const REGENERATE: &str = "run `cargo run -p eventfold -- schemas generate` and commit schemas/avro";

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("schemas/ is in the repository").to_owned()
}

#[test]
fn checked_in_schemas_are_the_generated_ones() {
    let generated = generate(eventfold_proto::FILE_DESCRIPTOR_SET).unwrap();
    let checked_in = read_tree(&repo_root()).unwrap();
    let names = |files: &[(PathBuf, String)]| files.iter().map(|(p, _)| p.clone()).collect::<Vec<_>>();
    assert_eq!(names(&checked_in), names(&generated), "the schema files differ from the generated ones: {REGENERATE}");
    for ((path, text), (_, expected)) in checked_in.iter().zip(&generated) {
        assert_eq!(text, expected, "{} differs from the generated schema: {REGENERATE}", path.display());
    }
}

/// The embedded catalog is the checked-in tree (the build embeds it).
#[test]
fn the_catalog_has_every_event_type_and_version() {
    let catalog = Catalog::load().unwrap();
    for event in event_types() {
        for version in 1..=event.current_version {
            assert!(
                catalog.schema(event.name, version).is_some(),
                "{} v{version} has no schema: {REGENERATE}",
                event.name
            );
        }
    }
    let checked_in = read_tree(&repo_root()).unwrap();
    assert_eq!(catalog.events().count(), checked_in.len());
    assert_eq!(catalog.full_name("OrderCreated", 2).as_deref(), Some("eventfold.orders.v1.OrderCreated"));
    assert_eq!(catalog.full_name("OrderCreated", 1).as_deref(), Some("eventfold.orders.v1.legacy.OrderCreated"));
    assert_eq!(catalog.full_name("TransferSent", 1).as_deref(), Some("eventfold.accounts.v1.TransferSent"));
    assert_eq!(catalog.full_name("OrderCreated", 3), None);
}

#[test]
fn generation_is_stable() {
    let a = generate(eventfold_proto::FILE_DESCRIPTOR_SET).unwrap();
    let b = generate(eventfold_proto::FILE_DESCRIPTOR_SET).unwrap();
    assert_eq!(a, b);
    let (path, text) = a.iter().find(|(p, _)| p.ends_with("eventfold.orders.v1/OrderCreated.v2.avsc")).unwrap();
    assert_eq!(path, Path::new("schemas/avro/eventfold.orders.v1/OrderCreated.v2.avsc"));
    // Proto field order, Money defined once then referenced by full name.
    let json: serde_json::Value = serde_json::from_str(text).unwrap();
    let fields: Vec<&str> = json["fields"].as_array().unwrap().iter().map(|f| f["name"].as_str().unwrap()).collect();
    assert_eq!(fields, ["order_id", "customer_id", "currency", "items", "total", "payment_token", "carrier"]);
    // proto3 `optional`: a union with null, defaulting to null.
    assert_eq!(json["fields"][5]["type"], serde_json::json!(["null", "string"]));
    assert_eq!(json["fields"][5]["default"], serde_json::Value::Null);
    assert_eq!(json["fields"][3]["type"]["items"]["fields"][2]["type"]["name"], "Money");
    assert_eq!(json["fields"][3]["type"]["items"]["fields"][2]["type"]["namespace"], "eventfold.common.v1");
    assert_eq!(json["fields"][4]["type"], "eventfold.common.v1.Money");
}
