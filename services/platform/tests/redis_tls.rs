//! `rediss://`: the Redis client of every process (query cache, shared
//! rate limits) over TLS, trusting `[tls] ca_file` and presenting `[tls]
//! cert_file` to a Redis that requires client certificates
//! (`tls-auth-clients yes`). Certificates are made here by rcgen.

use std::{sync::Arc, time::Duration};

use eventfold_platform::{
    runtime::{RedisOptions, redis},
    tls::{Tls, TlsConfig},
};
use eventfold_tests::{redis::TlsRedis, tls::TestCa};
use fred::prelude::{ClientLike, LuaInterface};

struct Files {
    dir: tempfile::TempDir,
}

impl Files {
    fn write(&self, name: &str, contents: &str) -> std::path::PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, contents).unwrap();
        path
    }
}

/// A round trip through a client of `options`: `Ok` when a SET and a GET
/// (in one script) answer within 3 s.
async fn round_trip(options: &RedisOptions) -> Result<(), String> {
    let client = redis(options).map_err(|e| e.to_string())?;
    let result = tokio::time::timeout(Duration::from_secs(3), async {
        client.wait_for_connect().await.map_err(|e| e.to_string())?;
        let script = "redis.call('SET', KEYS[1], ARGV[1]); return redis.call('GET', KEYS[1])";
        let value: String = client.eval(script, vec!["tls-key"], vec!["over tls"]).await.map_err(|e| e.to_string())?;
        if value == "over tls" { Ok(()) } else { Err(format!("GET answered {value:?}")) }
    })
    .await
    .unwrap_or_else(|_| Err("no answer within 3 s".to_owned()));
    let _ = client.quit().await;
    result
}

fn options(url: String, tls: Option<Arc<Tls>>) -> RedisOptions {
    RedisOptions { url, command_timeout: Duration::from_secs(1), tls }
}

#[tokio::test]
async fn rediss_trusts_the_configured_ca_and_presents_the_process_certificate() {
    let ca = TestCa::new("eventfold test CA");
    let files = Files { dir: tempfile::tempdir().unwrap() };
    let ca_file = files.write("ca.crt", &ca.pem());
    let (cert, key) = ca.issue("redis", &["127.0.0.1"]);
    let (server_cert, server_key) = (files.write("redis.crt", &cert), files.write("redis.key", &key));
    let (cert, key) = ca.issue("eventfold", &["eventfold.example"]);
    let (client_cert, client_key) = (files.write("client.crt", &cert), files.write("client.key", &key));
    let server = TlsRedis::start(&server_cert, &server_key, &ca_file, true);

    let with_certificate = Tls::load(&TlsConfig {
        cert_file: Some(client_cert),
        key_file: Some(client_key),
        ca_file: Some(ca_file.clone()),
        ..TlsConfig::default()
    })
    .unwrap();
    round_trip(&options(server.url(), with_certificate.clone()))
        .await
        .expect("rediss:// with the CA and a client certificate");

    // The same server without a client certificate: refused.
    let trust_only = Tls::load(&TlsConfig { ca_file: Some(ca_file), ..TlsConfig::default() }).unwrap();
    let refused = round_trip(&options(server.url(), trust_only)).await;
    assert!(refused.is_err(), "no client certificate: refused by tls-auth-clients");

    // Not TLS at all: nothing is answered in plain text.
    let plain = round_trip(&options(server.plain_url(), with_certificate)).await;
    assert!(plain.is_err(), "redis:// to a TLS-only port");

    // Without [tls], the system's CAs do not know the test CA.
    let system = round_trip(&options(server.url(), None)).await;
    assert!(system.is_err(), "the test CA is not a system CA");
}
