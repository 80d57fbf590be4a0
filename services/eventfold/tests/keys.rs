//! `eventfold keys create|list|revoke` as an operator runs them: the key is
//! printed once by `create` and works, `list` shows its id, prefix, name
//! and roles but never the key, and `revoke` marks it revoked and makes it
//! refused.

mod common;

use std::process::Output;

use eventfold_platform::auth::{
    KeyVerifier,
    keys::{ApiKeyStore, KEY_LEN, KEY_PREFIX},
};

fn keys(url: &str, args: &[&str]) -> Output {
    common::eventfold()
        .args(["keys", "--database-url", url])
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", common::BIN))
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn succeeded(what: &str, output: Output) -> String {
    assert!(
        output.status.success(),
        "eventfold keys {what} failed: {:?}\n{}\n{}",
        output.status,
        stdout(&output),
        String::from_utf8_lossy(&output.stderr)
    );
    stdout(&output)
}

/// The value of the `label:` line of `text`.
fn field<'a>(text: &'a str, label: &str) -> &'a str {
    text.lines()
        .find_map(|line| line.strip_prefix(label))
        .map(str::trim)
        .unwrap_or_else(|| panic!("no {label} line in:\n{text}"))
}

/// The line of `list` that shows key `id`.
fn row<'a>(list: &'a str, id: &str) -> &'a str {
    list.lines().find(|line| line.starts_with(id)).unwrap_or_else(|| panic!("{id} is not listed:\n{list}"))
}

#[test]
fn keys_are_created_listed_and_revoked_on_the_command_line() {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let db = runtime.block_on(eventfold_tests::TestDatabase::migrated());
    let url = db.url();
    let verify = |key: &str| {
        runtime.block_on(async {
            // A store of its own (no cache): what the database says now.
            let store = ApiKeyStore::new(eventfold_store::Database::from_url(url).expect("a URL"));
            store.verify(key).await.expect("the store answers")
        })
    };

    let created = succeeded(
        "create",
        keys(url, &["create", "--name", "billing sync", "--role", "orders.write", "--role", "orders.read"]),
    );
    let (id, key) = (field(&created, "id:").to_owned(), field(&created, "key:").to_owned());
    assert!(key.starts_with(KEY_PREFIX) && key.len() == KEY_LEN, "{key}");
    assert_eq!(field(&created, "roles:"), "orders.write,orders.read");
    let principal = verify(&key).expect("the printed key is valid");
    assert_eq!(principal.subject, format!("apikey:{id}"));
    assert_eq!(principal.roles, ["orders.write", "orders.read"]);

    let other = succeeded("create", keys(url, &["create", "--name", "ci", "--role", "eventstore.read"]));
    let other_id = field(&other, "id:").to_owned();

    let list = succeeded("list", keys(url, &["list"]));
    let listed = row(&list, &id);
    for shown in [&key[..12], "billing sync", "orders.write,orders.read"] {
        assert!(listed.contains(shown), "{shown:?} not in {listed:?}");
    }
    assert!(row(&list, &other_id).contains("eventstore.read"));
    assert!(!list.contains(&key) && !list.contains(&key[KEY_PREFIX.len()..]), "list prints the key:\n{list}");
    let revoked_column = |line: &str| line.split_whitespace().rev().nth(1).unwrap_or_default().to_owned();
    assert_eq!(revoked_column(listed), "-", "not revoked yet: {listed:?}");

    let revoked = succeeded("revoke", keys(url, &["revoke", &id]));
    assert!(revoked.contains(&id) && revoked.contains("revoked at"), "{revoked}");
    let list = succeeded("list", keys(url, &["list"]));
    assert!(revoked_column(row(&list, &id)).ends_with('Z'), "revoked with its time: {:?}", row(&list, &id));
    assert_eq!(revoked_column(row(&list, &other_id)), "-", "the other key stays valid");
    assert_eq!(verify(&key), None, "a revoked key is refused");
    // Revoking again is no error and keeps the first time.
    assert_eq!(succeeded("revoke", keys(url, &["revoke", &id])), revoked);

    // Refusals: a non-zero exit with the reason, nothing on stdout.
    let bad = keys(url, &["create", "--name", "x", "--role", "Orders Write"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("roles[0]"), "{}", String::from_utf8_lossy(&bad.stderr));
    assert!(stdout(&bad).is_empty());
    let unknown = keys(url, &["revoke", "0190aa3e-0000-7000-8000-000000000000"]);
    assert!(!unknown.status.success());
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("no API key has the id"));
}
