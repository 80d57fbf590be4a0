//! Schema evolution checks: apache-avro's compatibility check with the
//! registry's semantics, and the comparison of schema trees.

use std::{path::PathBuf, process::Command};

use eventfold_schemas::{
    CompatibilityLevel, Incompatibility, Problem, check_against_git, check_compatibility, check_compatibility_level,
    check_tree,
};

const V1: &str = r#"{"type": "record", "name": "OrderShipped", "namespace": "eventfold.orders.v1", "fields": [
    {"name": "order_id", "type": "string"},
    {"name": "carrier", "type": "string"},
    {"name": "tracking_number", "type": "string"}
]}"#;

/// `tracking_number` removed (it had no default).
const REMOVED: &str = r#"{"type": "record", "name": "OrderShipped", "namespace": "eventfold.orders.v1", "fields": [
    {"name": "order_id", "type": "string"},
    {"name": "carrier", "type": "string"}
]}"#;

/// `eta` added with a default.
const ADDED_WITH_DEFAULT: &str = r#"{"type": "record", "name": "OrderShipped", "namespace": "eventfold.orders.v1", "fields": [
    {"name": "order_id", "type": "string"},
    {"name": "carrier", "type": "string"},
    {"name": "tracking_number", "type": "string"},
    {"name": "eta", "type": ["null", "string"], "default": null}
]}"#;

/// `eta` added without a default.
const ADDED_WITHOUT_DEFAULT: &str = r#"{"type": "record", "name": "OrderShipped", "namespace": "eventfold.orders.v1", "fields": [
    {"name": "order_id", "type": "string"},
    {"name": "carrier", "type": "string"},
    {"name": "tracking_number", "type": "string"},
    {"name": "eta", "type": "string"}
]}"#;

/// `carrier` turned into a number.
const RETYPED: &str = r#"{"type": "record", "name": "OrderShipped", "namespace": "eventfold.orders.v1", "fields": [
    {"name": "order_id", "type": "string"},
    {"name": "carrier", "type": "long"},
    {"name": "tracking_number", "type": "string"}
]}"#;

#[test]
fn adding_a_field_with_a_default_is_compatible() {
    assert_eq!(check_compatibility(V1, ADDED_WITH_DEFAULT), Ok(()));
    for level in CompatibilityLevel::ALL {
        assert_eq!(check_compatibility_level(level, &[V1], ADDED_WITH_DEFAULT), Ok(()), "{level}");
    }
}

#[test]
fn adding_a_field_without_a_default_is_incompatible() {
    let err = check_compatibility(V1, ADDED_WITHOUT_DEFAULT).unwrap_err();
    let Incompatibility::Incompatible { message } = &err else { panic!("{err:?}") };
    assert!(message.contains("eta"), "{message}");
}

/// A field without a default that disappears: new readers do not care
/// (BACKWARD, as in Confluent's table: "delete fields" is allowed), but
/// readers of the old schema find no value for it (FORWARD and FULL fail).
#[test]
fn removing_a_field_without_a_default_breaks_old_readers() {
    assert_eq!(check_compatibility(V1, REMOVED), Ok(()));
    assert_eq!(check_compatibility_level(CompatibilityLevel::BackwardTransitive, &[V1], REMOVED), Ok(()));
    for level in [CompatibilityLevel::Forward, CompatibilityLevel::Full, CompatibilityLevel::FullTransitive] {
        let err = check_compatibility_level(level, &[V1], REMOVED).unwrap_err();
        assert!(err.to_string().contains("tracking_number"), "{level}: {err}");
    }
    // And putting it back without a default cannot read the data written
    // in between.
    assert!(check_compatibility(REMOVED, V1).is_err());
}

#[test]
fn changing_a_type_is_incompatible_and_garbage_is_invalid() {
    assert!(matches!(check_compatibility(V1, RETYPED), Err(Incompatibility::Incompatible { .. })));
    assert!(matches!(check_compatibility(V1, "{"), Err(Incompatibility::Invalid { which: "new", .. })));
    assert!(matches!(check_compatibility("[", V1), Err(Incompatibility::Invalid { which: "old", .. })));
}

#[test]
fn levels_pick_the_versions_they_compare() {
    // v1 → v2 (eta, default "") → v3 (eta without default): fine against
    // v2 (its data has eta), not against v1 (no eta there).
    let v2 = ADDED_WITHOUT_DEFAULT.replace(
        r#""type": "string"}
]"#,
        r#""type": "string", "default": ""}
]"#,
    );
    assert_ne!(v2, ADDED_WITHOUT_DEFAULT);
    let history = [V1, v2.as_str()];
    assert_eq!(check_compatibility_level(CompatibilityLevel::Backward, &history, ADDED_WITHOUT_DEFAULT), Ok(()));
    let err =
        check_compatibility_level(CompatibilityLevel::BackwardTransitive, &history, ADDED_WITHOUT_DEFAULT).unwrap_err();
    assert!(err.to_string().contains("schema #1"), "{err}");
    assert_eq!(check_compatibility_level(CompatibilityLevel::None, &history, RETYPED), Ok(()));
    // An invalid new schema is refused whatever the level.
    assert!(check_compatibility_level(CompatibilityLevel::None, &[], "nope").is_err());
}

#[test]
fn trees_report_removed_and_incompatible_files() {
    let p = |s: &str| PathBuf::from(format!("schemas/avro/eventfold.orders.v1/{s}"));
    let old = vec![
        (p("OrderShipped.v1.avsc"), V1.to_owned()),
        (p("OrderConfirmed.v1.avsc"), V1.replace("OrderShipped", "OrderConfirmed")),
        (p("OrderCancelled.v1.avsc"), V1.replace("OrderShipped", "OrderCancelled")),
    ];
    let new = vec![
        (p("OrderShipped.v1.avsc"), ADDED_WITHOUT_DEFAULT.to_owned()),
        (p("OrderCancelled.v1.avsc"), ADDED_WITH_DEFAULT.replace("OrderShipped", "OrderCancelled")),
        (p("OrderPacked.v1.avsc"), V1.replace("OrderShipped", "OrderPacked")),
    ];
    let problems = check_tree(CompatibilityLevel::Backward, &old, &new);
    assert_eq!(problems.len(), 2, "{problems:?}");
    assert_eq!(problems[0], Problem::Removed { path: p("OrderConfirmed.v1.avsc") });
    assert!(matches!(&problems[1], Problem::Incompatible { path, .. } if *path == p("OrderShipped.v1.avsc")));
    assert!(problems[1].to_string().starts_with("schemas/avro/eventfold.orders.v1/OrderShipped.v1.avsc: "));
    assert!(check_tree(CompatibilityLevel::Backward, &old, &old).is_empty());
}

fn git(dir: &std::path::Path, args: &[&str]) {
    let status = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(["-c", "user.name=test", "-c", "user.email=test@example.com", "-c", "commit.gpgsign=false"])
        .args(args)
        .status()
        .unwrap();
    assert!(status.success(), "git {args:?}");
}

#[test]
fn the_working_tree_is_checked_against_a_git_revision() {
    let repo = tempfile::tempdir().unwrap();
    let root = repo.path();
    let dir = root.join("schemas/avro/eventfold.orders.v1");
    std::fs::create_dir_all(&dir).unwrap();
    git(root, &["init", "-q"]);
    // A revision without schemas has nothing to compare.
    std::fs::write(root.join("README.md"), "x\n").unwrap();
    git(root, &["add", "."]);
    git(root, &["commit", "-q", "-m", "start"]);
    std::fs::write(dir.join("OrderShipped.v1.avsc"), V1).unwrap();
    assert_eq!(check_against_git(root, "HEAD", CompatibilityLevel::Backward).unwrap(), vec![]);

    std::fs::write(dir.join("OrderConfirmed.v1.avsc"), V1.replace("OrderShipped", "OrderConfirmed")).unwrap();
    git(root, &["add", "."]);
    git(root, &["commit", "-q", "-m", "schemas"]);
    assert_eq!(check_against_git(root, "HEAD", CompatibilityLevel::Backward).unwrap(), vec![]);

    std::fs::write(dir.join("OrderShipped.v1.avsc"), ADDED_WITHOUT_DEFAULT).unwrap();
    std::fs::remove_file(dir.join("OrderConfirmed.v1.avsc")).unwrap();
    let problems = check_against_git(root, "HEAD", CompatibilityLevel::Backward).unwrap();
    assert_eq!(problems.len(), 2, "{problems:?}");
    assert_eq!(
        problems[0],
        Problem::Removed { path: PathBuf::from("schemas/avro/eventfold.orders.v1/OrderConfirmed.v1.avsc") }
    );
    assert!(matches!(problems[1], Problem::Incompatible { .. }));

    std::fs::write(dir.join("OrderShipped.v1.avsc"), ADDED_WITH_DEFAULT).unwrap();
    std::fs::write(dir.join("OrderConfirmed.v1.avsc"), V1.replace("OrderShipped", "OrderConfirmed")).unwrap();
    assert_eq!(check_against_git(root, "HEAD", CompatibilityLevel::Backward).unwrap(), vec![]);

    let err = check_against_git(root, "no-such-rev", CompatibilityLevel::Backward).unwrap_err();
    assert!(err.to_string().contains("git ls-tree"), "{err}");
}
