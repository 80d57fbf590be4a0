//! The store over TLS with `verify-full`: the conformance suite
//! (`common::conformance`) against a PostgreSQL server that accepts TCP
//! connections only over TLS, and the checks that make the encryption real:
//! a plain connection is refused, a certificate from another authority or for
//! another host is refused, and the server sees an encrypted session.

mod common;

use std::{any::Any, path::Path, sync::Arc};

use common::conformance::*;
use eventfold_store::{Database, DatabaseOptions, EventLog, PostgresConfig, PostgresEventLog, TlsMode};
use eventfold_tests::tls::TlsPostgres;

fn database(url: &str, tls: TlsMode, ca_file: Option<&Path>) -> Database {
    let options = DatabaseOptions { tls, ca_file: ca_file.map(Path::to_path_buf), ..DatabaseOptions::default() };
    Database::open(url, &options).expect("valid database options")
}

fn verify_full(url: &str, ca_file: &Path) -> Database {
    database(url, TlsMode::VerifyFull, Some(ca_file))
}

/// A fresh database on the shared TLS server, migrated over `verify-full`,
/// and a PostgreSQL event log on it that connects the same way. The server
/// refuses plain TCP, so every connection of the log (pool, listener) is
/// encrypted.
async fn tls_log() -> (Box<dyn Any + Send>, Arc<dyn EventLog>) {
    let server = TlsPostgres::shared();
    let db = server.create_database().await;
    let database = verify_full(db.url(), server.ca_file());
    let mut client = database.connect().await.expect("a verify-full connection");
    eventfold_migrations::up(&mut client).await.expect("migrations apply over TLS");
    drop(client);
    let log = PostgresEventLog::connect(database, PostgresConfig::default()).await.expect("connect over verify-full");
    (Box::new(db), Arc::new(log))
}

conformance!(postgres_tls, tls_log);

#[tokio::test]
async fn a_plain_connection_is_refused() {
    let server = TlsPostgres::shared();
    let Err(refused) = database(&server.url(), TlsMode::Disable, None).connect().await else {
        panic!("the server must refuse a connection without TLS");
    };
    assert!(refused.to_string().contains("no encryption"), "refused by pg_hba.conf: {refused}");
}

#[tokio::test]
async fn verify_full_refuses_a_certificate_from_another_authority() {
    let server = TlsPostgres::shared();
    // The same URL with the authority that signed the certificate connects:
    // only the CA file differs below.
    verify_full(&server.url(), server.ca_file()).connect().await.expect("the signing authority is trusted");
    let Err(refused) = verify_full(&server.url(), server.unrelated_ca_file()).connect().await else {
        panic!("verify-full must refuse a certificate signed by an authority not in the CA file");
    };
    assert!(refused.to_string().contains("TLS handshake"), "refused in the TLS handshake: {refused}");
}

#[tokio::test]
async fn verify_full_refuses_a_certificate_for_another_host() {
    let server = TlsPostgres::shared();
    // The right server and authority, but a host name the certificate does
    // not name (`hostaddr` still dials the server).
    let url = server.url().replace("@localhost:", "@not-localhost.invalid:") + "?hostaddr=127.0.0.1";
    let Err(refused) = verify_full(&url, server.ca_file()).connect().await else {
        panic!("verify-full must refuse a certificate that does not name the host");
    };
    assert!(refused.to_string().contains("TLS handshake"), "refused in the TLS handshake: {refused}");
}

#[tokio::test]
async fn the_server_sees_encrypted_sessions() {
    let server = TlsPostgres::shared();
    let database = verify_full(&server.url(), server.ca_file());
    let dedicated = database.connect().await.expect("a dedicated connection");
    let pooled = database.get().await.expect("a pooled connection");
    for (name, client) in [("dedicated", &dedicated), ("pooled", &*pooled)] {
        let row = client
            .query_one("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()", &[])
            .await
            .expect("pg_stat_ssl");
        assert!(row.get::<_, bool>(0), "the {name} connection is encrypted");
    }
}
