//! The brokers over TLS (`[relay] tls = true`): the connection the relay,
//! the consumers and the Kafka-fed projectors share, to a broker reached
//! only through a TLS terminator that requires client certificates of the
//! test CA. Certificates are made here by rcgen.

use std::{collections::BTreeMap, time::Duration};

use eventfold_bus::{BrokerTls, Kafka};
use eventfold_platform::tls::{Tls, TlsConfig};
use eventfold_tests::{kafka::TlsBroker, tls::TestCa};
use rskafka::{client::partition::Compression, record::Record};

const TIMEOUT: Duration = Duration::from_secs(5);

fn write(dir: &std::path::Path, name: &str, contents: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, contents).unwrap();
    path
}

/// The broker connection of `[tls]` as `config` sets it.
fn broker_tls(config: TlsConfig) -> BrokerTls {
    let tls = Tls::load(&config).unwrap().expect("[tls] is set");
    BrokerTls::new(tls.plain_client_config().expect("CAs to trust"))
}

/// Produces one record to a new topic and fetches it back over `tls`.
async fn round_trip(bootstrap: &str, tls: &BrokerTls) -> Result<(), String> {
    let mut kafka = Kafka::connect(&[bootstrap.to_owned()], tls, TIMEOUT, Duration::from_millis(200))
        .await
        .map_err(|e| e.to_string())?;
    kafka.ensure_topic("over-tls", 1, 1, TIMEOUT).await.map_err(|e| e.to_string())?;
    let partition = kafka.partition("over-tls", 0, TIMEOUT).await.map_err(|e| e.to_string())?;
    let record =
        Record { key: None, value: Some(b"sealed".to_vec()), headers: BTreeMap::new(), timestamp: chrono::Utc::now() };
    let offsets = partition.produce(vec![record], Compression::NoCompression).await.map_err(|e| e.to_string())?;
    let (fetched, _) = partition.fetch_records(offsets[0], 1..1_000_000, 100).await.map_err(|e| e.to_string())?;
    let value = fetched.first().and_then(|r| r.record.value.clone());
    if value.as_deref() == Some(b"sealed".as_slice()) { Ok(()) } else { Err(format!("fetched {value:?}")) }
}

#[tokio::test]
async fn the_brokers_over_tls_with_a_client_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("eventfold test CA");
    let ca_file = write(dir.path(), "ca.crt", &ca.pem());
    let (cert, key) = ca.issue("kafka", &["127.0.0.1"]);
    let (broker_cert, broker_key) = (write(dir.path(), "kafka.crt", &cert), write(dir.path(), "kafka.key", &key));
    let (cert, key) = ca.issue("eventfold-relay", &["relay.example"]);
    let (client_cert, client_key) = (write(dir.path(), "relay.crt", &cert), write(dir.path(), "relay.key", &key));
    let broker = TlsBroker::start(&broker_cert, &broker_key, Some(&ca_file));

    let with_certificate = broker_tls(TlsConfig {
        cert_file: Some(client_cert),
        key_file: Some(client_key),
        ca_file: Some(ca_file.clone()),
        ..TlsConfig::default()
    });
    let done = round_trip(&broker.bootstrap(), &with_certificate).await;
    assert_eq!(done, Ok(()), "produce and fetch over TLS; broker log:\n{}", broker.log());

    // Without a client certificate the terminator refuses the handshake.
    let trust_only = broker_tls(TlsConfig { ca_file: Some(ca_file), ..TlsConfig::default() });
    assert!(round_trip(&broker.bootstrap(), &trust_only).await.is_err(), "no client certificate");
    // In plain text nothing is answered.
    assert!(round_trip(&broker.bootstrap(), &BrokerTls::default()).await.is_err(), "plain text to a TLS port");
    // A CA that did not sign the broker's certificate: refused by the client.
    let other = TestCa::new("another CA");
    let other_ca = write(dir.path(), "other.crt", &other.pem());
    let wrong = broker_tls(TlsConfig { ca_file: Some(other_ca), ..TlsConfig::default() });
    assert!(round_trip(&broker.bootstrap(), &wrong).await.is_err(), "an unknown broker certificate");
}
