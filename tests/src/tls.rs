//! A throw-away PostgreSQL server that only speaks TLS: a certificate
//! authority and a certificate for `localhost` and `127.0.0.1` made with
//! rcgen, `ssl = on`, and a `pg_hba.conf` whose only TCP entry is `hostssl`,
//! so that a plain connection is refused. The harness itself creates and
//! drops databases over the server's Unix socket.
//!
//! This server is always started here (`EVENTFOLD_TEST_DATABASE_URL` does
//! not apply): the test needs to know its certificate authority.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};

use crate::{Server, TestDatabase};

/// The authority that signed the server's certificate.
const CA_FILE: &str = "ca.crt";
/// An authority that signed nothing this server presents.
const UNRELATED_CA_FILE: &str = "unrelated-ca.crt";
const CERT_FILE: &str = "server.crt";
const KEY_FILE: &str = "server.key";
const HBA_FILE: &str = "pg_hba.conf";
/// TCP clients must use TLS; the Unix socket (the harness's way in) need not.
const HBA: &str = "\
local   all all              trust
hostssl all all 127.0.0.1/32 trust
";

/// A PostgreSQL server of its own that accepts TCP connections only over
/// TLS, with the certificate authority a client must trust.
///
/// Dropping it stops the server and removes its directory (certificates
/// included).
pub struct TlsPostgres {
    server: Server,
    ca_file: PathBuf,
    unrelated_ca_file: PathBuf,
}

impl std::fmt::Debug for TlsPostgres {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsPostgres").field("port", &self.server.port).field("dir", &self.server.dir).finish()
    }
}

impl TlsPostgres {
    /// Makes the certificates and starts the server on a free loopback port.
    ///
    /// # Panics
    ///
    /// If the PostgreSQL binaries are missing or the server does not start;
    /// the message says why.
    pub fn start() -> TlsPostgres {
        Self::try_start().unwrap_or_else(|message| panic!("{message}"))
    }

    /// One server for the whole test process, started on first use and
    /// removed when the process ends.
    ///
    /// # Panics
    ///
    /// As [`TlsPostgres::start`] (every later call panics with the same
    /// message).
    pub fn shared() -> &'static TlsPostgres {
        static SERVER: OnceLock<Result<TlsPostgres, String>> = OnceLock::new();
        match SERVER.get_or_init(Self::try_start) {
            Ok(server) => server,
            Err(message) => panic!("{message}"),
        }
    }

    fn try_start() -> Result<TlsPostgres, String> {
        let certificates = Certificates::generate().map_err(|e| format!("cannot make test certificates: {e}"))?;
        let server = Server::start_with(|dir| {
            write_file(&dir.join(CA_FILE), &certificates.ca, 0o644)?;
            write_file(&dir.join(UNRELATED_CA_FILE), &certificates.unrelated_ca, 0o644)?;
            write_file(&dir.join(CERT_FILE), &certificates.server_cert, 0o644)?;
            // PostgreSQL refuses a key that others may read.
            write_file(&dir.join(KEY_FILE), &certificates.server_key, 0o600)?;
            write_file(&dir.join(HBA_FILE), HBA, 0o600)?;
            Ok(format!(
                "-c ssl=on -c ssl_cert_file='{}' -c ssl_key_file='{}' -c hba_file='{}'",
                dir.join(CERT_FILE).display(),
                dir.join(KEY_FILE).display(),
                dir.join(HBA_FILE).display(),
            ))
        })
        .map_err(|e| {
            format!(
                "cannot start the TLS test PostgreSQL server (EVENTFOLD_TEST_DATABASE_URL does not apply to it): {e}"
            )
        })?;
        Ok(TlsPostgres {
            ca_file: server.dir.join(CA_FILE),
            unrelated_ca_file: server.dir.join(UNRELATED_CA_FILE),
            server,
        })
    }

    /// `postgresql://postgres@localhost:PORT/postgres`: the host name is the
    /// one the certificate names, so `verify-full` accepts it.
    pub fn url(&self) -> String {
        self.url_of("postgres")
    }

    /// The PEM file of the authority that signed the server's certificate.
    pub fn ca_file(&self) -> &Path {
        &self.ca_file
    }

    /// The PEM file of another authority, which signed nothing the server
    /// presents: `verify-full` with it must fail.
    pub fn unrelated_ca_file(&self) -> &Path {
        &self.unrelated_ca_file
    }

    /// A fresh, empty database on this server, dropped with the guard; its
    /// [`TestDatabase::url`] reaches it over TLS only.
    ///
    /// # Panics
    ///
    /// If the database cannot be created.
    pub async fn create_database(&self) -> TestDatabase {
        TestDatabase::create_on(self.admin_url(), |name| self.url_of(name)).await
    }

    fn url_of(&self, database: &str) -> String {
        format!("postgresql://postgres@localhost:{}/{database}", self.server.port)
    }

    /// The `postgres` database over the Unix socket, without TLS.
    fn admin_url(&self) -> String {
        format!("host='{}' port={} user=postgres dbname=postgres", self.server.dir.display(), self.server.port)
    }
}

/// PEM texts of the server's certificate, its key, the authority that
/// signed it and an unrelated authority.
struct Certificates {
    ca: String,
    unrelated_ca: String,
    server_cert: String,
    server_key: String,
}

impl Certificates {
    fn generate() -> Result<Certificates, rcgen::Error> {
        let ca = TestCa::try_new("eventfold test CA")?;
        let unrelated_ca = TestCa::try_new("eventfold unrelated test CA")?;
        let (server_cert, server_key) = ca.try_issue("localhost", &["localhost", "127.0.0.1"])?;
        Ok(Certificates { ca: ca.pem(), unrelated_ca: unrelated_ca.pem(), server_cert, server_key })
    }
}

/// A certificate authority made for a test, and the certificates it
/// issues; nothing of it is ever written to the repository.
pub struct TestCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl std::fmt::Debug for TestCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestCa").finish_non_exhaustive()
    }
}

impl TestCa {
    /// A self-signed authority named `name`.
    ///
    /// # Panics
    ///
    /// If rcgen cannot make it.
    pub fn new(name: &str) -> TestCa {
        Self::try_new(name).expect("a test certificate authority")
    }

    fn try_new(name: &str) -> Result<TestCa, rcgen::Error> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        Ok(TestCa { issuer: CertifiedIssuer::self_signed(params, KeyPair::generate()?)? })
    }

    /// The authority's certificate (PEM).
    pub fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// A certificate named `common_name` for `names` (DNS names or IP
    /// addresses), for servers and clients alike: its PEM and its key's PEM.
    ///
    /// # Panics
    ///
    /// If rcgen cannot make it.
    pub fn issue(&self, common_name: &str, names: &[&str]) -> (String, String) {
        self.try_issue(common_name, names).expect("a test certificate")
    }

    fn try_issue(&self, common_name: &str, names: &[&str]) -> Result<(String, String), rcgen::Error> {
        let mut params = CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>())?;
        params.distinguished_name.push(DnType::CommonName, common_name);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &*self.issuer)?;
        Ok((cert.pem(), key.serialize_pem()))
    }
}

/// Writes a new file with permissions `mode`.
fn write_file(path: &Path, contents: &str, mode: u32) -> Result<(), String> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .and_then(|mut file| file.write_all(contents.as_bytes()))
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use tokio_postgres::NoTls;

    use super::*;

    #[tokio::test]
    async fn serves_tls_only_and_is_removed_on_drop() {
        let server = TlsPostgres::start();
        let dir = server.server.dir.clone();
        assert!(std::fs::read_to_string(server.ca_file()).unwrap().starts_with("-----BEGIN CERTIFICATE-----"));

        let (admin, connection) = tokio_postgres::connect(&server.admin_url(), NoTls).await.expect("the Unix socket");
        tokio::spawn(connection);
        let ssl: String = admin.query_one("SHOW ssl", &[]).await.unwrap().get(0);
        assert_eq!(ssl, "on");
        drop(admin);

        let Err(refused) = tokio_postgres::connect(&server.url(), NoTls).await else {
            panic!("a plain TCP connection must be refused");
        };
        let message = refused.as_db_error().map(|e| e.message().to_owned()).unwrap_or_default();
        assert!(message.contains("no encryption"), "refused by pg_hba.conf: {refused:?}");

        let database = server.create_database().await;
        assert!(database.url().starts_with("postgresql://postgres@localhost:"));
        drop(database);

        drop(server);
        assert!(!dir.exists(), "{} is removed with the server", dir.display());
    }
}
