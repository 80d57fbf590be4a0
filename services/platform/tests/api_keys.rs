//! The API key store (`eventfold_platform::auth::keys`) and its
//! ApiKeyService against a real PostgreSQL: a created key verifies with
//! its roles, lists never show it, a revoked key is refused by another
//! process (another store, pool and cache on the same database) within a
//! second, a malformed or overlong key costs no query, and PostgreSQL
//! being away is an error, never an "unknown key". The log never holds a
//! key, its hash or SQL.

use std::time::{Duration, Instant};

use eventfold_platform::auth::{
    KeyVerifier, Principal,
    keys::{self, ApiKeyStore, CACHE_TTL, Error, KEY_LEN, KEY_PREFIX, MAX_PRESENTED_KEY_BYTES, grpc::ApiKeys},
};
use eventfold_proto::admin::{self as pb, api_key_service_server::ApiKeyService};
use eventfold_store::{Database, DatabaseOptions};
use eventfold_tests::{OwnPostgres, TestDatabase, logs};
use tonic::{Code, Request, Status};
use tonic_types::StatusExt;

fn roles(names: &[&str]) -> Vec<String> {
    names.iter().map(|r| (*r).to_owned()).collect()
}

/// A store over `url` whose connections give up after `connect_timeout`:
/// one process's view of the keys.
fn open(url: &str, connect_timeout: Duration) -> ApiKeyStore {
    let options = DatabaseOptions { connect_timeout, pool_size: 2, ..DatabaseOptions::default() };
    ApiKeyStore::new(Database::open(url, &options).expect("a PostgreSQL URL"))
}

/// Ways a key or its hash could be printed.
fn leaks(key: &str) -> Vec<String> {
    let hash = keys::key_hash(key);
    let hex: String = hash.iter().map(|b| format!("{b:02x}")).collect();
    let random = key.trim_start_matches(KEY_PREFIX).to_owned();
    vec![key.to_owned(), random, hex, format!("{hash:?}")]
}

fn assert_no_leak(what: &str, text: &str, key: &str) {
    for leak in leaks(key) {
        assert!(!text.contains(&leak), "{what} shows the key or its hash ({leak}):\n{text}");
    }
}

fn reason(status: &Status) -> String {
    status.get_details_error_info().map(|info| info.reason).unwrap_or_default()
}

#[tokio::test]
async fn a_created_key_verifies_with_its_roles_and_lists_never_show_it() {
    let logs = logs::capture();
    let db = TestDatabase::migrated().await;
    let store = open(db.url(), Duration::from_secs(5));
    let service = ApiKeys::new(store.clone());

    let created = service
        .create_api_key(Request::new(pb::CreateApiKeyRequest {
            name: "billing sync".to_owned(),
            roles: roles(&["orders.write", "orders.read", "orders.write"]),
        }))
        .await
        .expect("created")
        .into_inner();
    let key = created.key.clone();
    let resource = created.api_key.expect("the key's resource");
    assert_eq!(key.len(), KEY_LEN);
    assert!(key.starts_with(KEY_PREFIX), "{key}");
    assert_eq!(resource.name, "billing sync");
    assert_eq!(resource.roles, ["orders.write", "orders.read"], "a role named twice counts once");
    assert_eq!(resource.prefix, key[..12]);
    assert!(resource.create_time.is_some() && resource.last_use_time.is_none() && resource.revoke_time.is_none());

    let principal = store.verify(&key).await.expect("the store answers").expect("a valid key");
    assert_eq!(
        principal,
        Principal { subject: format!("apikey:{}", resource.id), roles: roles(&["orders.write", "orders.read"]) }
    );
    // Another process (no cache) agrees: what is stored is what verifies.
    let other = open(db.url(), Duration::from_secs(5));
    assert_eq!(other.verify(&key).await.unwrap(), Some(principal));

    // Unknown, near-miss and foreign keys are refused.
    let unknown = keys::generate_key().unwrap();
    assert_eq!(store.verify(unknown.expose()).await.unwrap(), None);
    let mut near = key.clone();
    near.pop();
    near.push(if key.ends_with('A') { 'B' } else { 'A' });
    assert_eq!(store.verify(&near).await.unwrap(), None);
    assert_eq!(store.verify(&format!("Bearer {key}")).await.unwrap(), None);

    // The list: the key's name, prefix and roles, never the key or its hash,
    // and when it was last used (written without the call waiting for it).
    let deadline = Instant::now() + Duration::from_secs(5);
    let listed = loop {
        let listed =
            service.list_api_keys(Request::new(pb::ListApiKeysRequest::default())).await.expect("listed").into_inner();
        if listed.api_keys.first().is_some_and(|k| k.last_use_time.is_some()) || Instant::now() > deadline {
            break listed;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(listed.api_keys.len(), 1);
    let shown = &listed.api_keys[0];
    assert_eq!((shown.id.as_str(), shown.name.as_str()), (resource.id.as_str(), "billing sync"));
    assert_eq!((shown.prefix.as_str(), shown.roles.as_slice()), (&key[..12], resource.roles.as_slice()));
    assert!(shown.last_use_time.is_some(), "the use of the key is recorded within 5 s");
    assert!(listed.next_page_token.is_empty());
    assert_no_leak("ListApiKeys", &format!("{listed:?}"), &key);
    let hash = keys::key_hash(&key);
    let stored = store.list(None, 10).await.unwrap();
    assert_no_leak("ApiKeyStore::list", &format!("{stored:?}"), &key);
    assert_no_leak("ApiKeyStore", &format!("{store:?}"), &key);

    // The key is kept as its SHA-256 only.
    let (client, connection) = tokio_postgres::connect(db.url(), tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    let row = client.query_one("SELECT key_hash, prefix FROM auth.api_keys", &[]).await.unwrap();
    assert_eq!(row.get::<_, Vec<u8>>(0), hash.to_vec());
    let columns =
        client.query_one("SELECT row_to_json(k)::text FROM auth.api_keys k", &[]).await.unwrap().get::<_, String>(0);
    assert!(!columns.contains(&key) && !columns.contains(key.trim_start_matches(KEY_PREFIX)), "{columns}");

    assert_no_leak("the log", &logs.text(), &key);
}

#[tokio::test]
async fn a_revoked_key_is_refused_by_another_process_within_a_second() {
    let db = TestDatabase::migrated().await;
    let (a, b) = (open(db.url(), Duration::from_secs(5)), open(db.url(), Duration::from_secs(5)));
    let created = a.create("ci", &roles(&["eventstore.read"])).await.unwrap();
    let key = created.key.expose().to_owned();
    let id = created.api_key.id.to_string();

    // A and B have just verified (and cached) the key when A revokes it.
    assert!(a.verify(&key).await.unwrap().is_some());
    let before_b_read = Instant::now();
    assert!(b.verify(&key).await.unwrap().is_some());
    let revoked = a.revoke(&id).await.unwrap();
    let revoked_at = Instant::now();
    assert!(revoked.revoke_time.is_some());
    assert_eq!(a.verify(&key).await.unwrap(), None, "the revoking process refuses it at once");

    // B answers from its cache for a while (what makes verification cheap)…
    let still = b.verify(&key).await.unwrap();
    if before_b_read.elapsed() < CACHE_TTL {
        assert!(still.is_some(), "B's read is younger than the cache TTL: B answers from its cache");
    }
    // …and refuses the key within a second of the revocation.
    let limit = Duration::from_secs(1);
    loop {
        if b.verify(&key).await.unwrap().is_none() {
            break;
        }
        assert!(revoked_at.elapsed() < limit, "another process still accepts a revoked key after {limit:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    println!("refused by the other process {:?} after the revocation", revoked_at.elapsed());
    assert!(revoked_at.elapsed() < limit);

    // Revoking again changes nothing (the first revoke_time stays); an id no
    // key has is NOT_FOUND, a malformed one INVALID_ARGUMENT.
    let again = a.revoke(&id).await.unwrap();
    assert_eq!(again.revoke_time, revoked.revoke_time);
    let service = ApiKeys::new(a.clone());
    for unknown in [uuid::Uuid::new_v4().to_string(), "not-a-uuid".to_owned()] {
        let status = service.revoke_api_key(Request::new(pb::RevokeApiKeyRequest { id: unknown })).await.unwrap_err();
        assert_eq!((status.code(), reason(&status).as_str()), (Code::NotFound, "API_KEY_NOT_FOUND"), "{status:?}");
    }
    let status =
        service.revoke_api_key(Request::new(pb::RevokeApiKeyRequest { id: "a b".to_owned() })).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    let through_grpc = service.revoke_api_key(Request::new(pb::RevokeApiKeyRequest { id })).await.unwrap().into_inner();
    let listed = through_grpc.api_key.unwrap();
    assert_eq!(listed.revoke_time, revoked.revoke_time.map(Into::into));
}

#[tokio::test]
async fn a_malformed_or_overlong_key_is_refused_without_a_query() {
    // Nothing listens there: any query fails, so an answer without an error
    // is one that asked nothing.
    let store = open(&eventfold_tests::unreachable_database_url(), Duration::from_millis(300));
    let well_formed = keys::generate_key().unwrap();
    assert!(store.verify(well_formed.expose()).await.is_err(), "a well-formed key is looked up");

    let overlong = format!("{}{}", well_formed.expose(), "A".repeat(MAX_PRESENTED_KEY_BYTES));
    let mut refused = vec![
        overlong,
        "A".repeat(MAX_PRESENTED_KEY_BYTES + 1),
        String::new(),
        well_formed.expose()[..KEY_LEN - 1].to_owned(),
        format!("{}=", &well_formed.expose()[..KEY_LEN - 1]),
        well_formed.expose().replacen(KEY_PREFIX, "xyz_", 1),
        format!("{} ", &well_formed.expose()[..KEY_LEN - 1]),
    ];
    refused.push("é".repeat(MAX_PRESENTED_KEY_BYTES));
    for key in &refused {
        let started = Instant::now();
        assert_eq!(store.verify(key).await.unwrap(), None, "{key:?}");
        assert!(started.elapsed() < Duration::from_millis(100), "{key:?} waited for the database");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_postgres_stopped_verification_fails_instead_of_refusing_the_key() {
    let logs = logs::capture();
    let postgres = tokio::task::spawn_blocking(OwnPostgres::start).await.unwrap();
    let db = postgres.migrated().await;
    let store = open(db.url(), Duration::from_secs(1));
    let service = ApiKeys::new(store.clone());
    let key = store.create("outage", &roles(&["admin"])).await.unwrap().key.expose().to_owned();
    assert!(store.verify(&key).await.unwrap().is_some());

    tokio::task::block_in_place(|| postgres.stop());
    tokio::time::sleep(CACHE_TTL + Duration::from_millis(100)).await;
    assert!(store.verify(&key).await.is_err(), "a valid key with PostgreSQL away: an error, not a refusal");
    let unknown = keys::generate_key().unwrap();
    assert!(store.verify(unknown.expose()).await.is_err(), "an unknown key with PostgreSQL away: an error too");
    // The service answers UNAVAILABLE, with nothing of the database's text.
    let status = service.list_api_keys(Request::new(pb::ListApiKeysRequest::default())).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().starts_with("the API key store is unavailable"), "{}", status.message());
    let created = store.create("during", &roles(&["admin"])).await;
    assert!(matches!(created, Err(Error::Store(eventfold_store::Error::Unavailable(_)))), "{created:?}");

    tokio::task::block_in_place(|| postgres.start_again());
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match store.verify(&key).await {
            Ok(Some(_)) => break,
            Ok(None) => panic!("the key was refused as unknown after PostgreSQL came back"),
            Err(_) => assert!(Instant::now() < deadline, "verification did not recover within 15 s"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let text = logs.text();
    assert!(text.contains("cannot verify an API key"), "the outage is logged:\n{text}");
    assert_no_leak("the log", &text, &key);
    assert_no_leak("the log", &text, unknown.expose());
    assert!(!text.contains("SELECT") && !text.contains("auth.api_keys"), "SQL in the log:\n{text}");
}

#[tokio::test]
async fn the_service_validates_and_pages() {
    let db = TestDatabase::migrated().await;
    let service = ApiKeys::new(open(db.url(), Duration::from_secs(5)));
    let create = |name: &str, roles: Vec<String>| {
        service.create_api_key(Request::new(pb::CreateApiKeyRequest { name: name.to_owned(), roles }))
    };

    let status = create("", vec![]).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    let fields: Vec<String> =
        status.get_details_bad_request().unwrap().field_violations.into_iter().map(|v| v.field).collect();
    assert_eq!(fields, ["name", "roles"]);
    let status = create("ci", roles(&["orders.write", "Orders Write"])).await.unwrap_err();
    let fields: Vec<String> =
        status.get_details_bad_request().unwrap().field_violations.into_iter().map(|v| v.field).collect();
    assert_eq!(fields, ["roles[1]"]);
    let status = create(&"n".repeat(129), roles(&["admin"])).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);

    let mut ids = Vec::new();
    for i in 0..5 {
        let created = create(&format!("key-{i}"), roles(&["admin"])).await.unwrap().into_inner();
        ids.push(created.api_key.unwrap().id);
    }
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = service
            .list_api_keys(Request::new(pb::ListApiKeysRequest { page_size: 2, page_token: token.clone() }))
            .await
            .unwrap()
            .into_inner();
        assert!(page.api_keys.len() <= 2);
        seen.extend(page.api_keys.into_iter().map(|k| k.id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(seen, ids, "every key once, in creation order");

    for (page_size, page_token) in [(-1, String::new()), (0, "garbage".to_owned()), (0, "x".repeat(2000))] {
        let status =
            service.list_api_keys(Request::new(pb::ListApiKeysRequest { page_size, page_token })).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    }
}
