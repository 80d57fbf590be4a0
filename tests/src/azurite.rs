//! A throw-away Azurite (the Azure Blob Storage emulator) for the blob
//! adapter's tests: `azurite-blob` on a free loopback port with its data in
//! a temporary directory, shared by the tests of one process and stopped
//! when the process ends. `tests/run` installs the pinned Azurite and
//! exports its path as `EVENTFOLD_AZURITE_BIN`. Each test works in a
//! container of its own ([`TestContainer::create`]).

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, TcpStream},
    path::PathBuf,
    process::ChildStdin,
    sync::OnceLock,
    time::{Duration, SystemTime},
};

use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The `azurite-blob` to start.
pub const AZURITE_BIN_ENV: &str = "EVENTFOLD_AZURITE_BIN";
/// Azurite's documented development account and key.
pub const ACCOUNT: &str = "devstoreaccount1";
pub const ACCOUNT_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

fn binary() -> PathBuf {
    if let Some(path) = std::env::var_os(AZURITE_BIN_ENV).filter(|p| !p.is_empty()) {
        return PathBuf::from(path);
    }
    // What tests/run installed: $EVENTFOLD_TOOLS_DIR/azurite-<version>-<lock>.
    let tools = std::env::var_os("EVENTFOLD_TOOLS_DIR")
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache/eventfold/tools")));
    let installed = tools.and_then(|tools| std::fs::read_dir(tools).ok()).and_then(|entries| {
        entries
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().starts_with("azurite-"))
            .map(|e| e.path().join("node_modules/.bin/azurite-blob"))
            .filter(|p| p.is_file())
            .max()
    });
    installed.unwrap_or_else(|| {
        panic!("no Azurite: run tests/run (it installs the pinned Azurite) or set {AZURITE_BIN_ENV}")
    })
}

/// A container of its own on the shared Azurite.
#[derive(Debug, Clone)]
pub struct TestContainer {
    port: u16,
    name: String,
}

impl TestContainer {
    /// Starts the shared Azurite on first use and creates a fresh container.
    ///
    /// # Panics
    ///
    /// If Azurite cannot be started or refuses the container.
    pub fn create() -> TestContainer {
        let port = port();
        // Container names: 3 to 63 lowercase letters, digits and dashes.
        let name = crate::unique_name().replace('_', "-").to_ascii_lowercase();
        let name: String = name.chars().take(63).collect();
        create_container(port, &name).unwrap_or_else(|e| panic!("{e}"));
        TestContainer { port, name }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The connection string of the emulator's account on this port.
    pub fn connection_string(&self) -> String {
        connection_string(self.port)
    }
}

/// `AccountName=…;AccountKey=…;BlobEndpoint=http://127.0.0.1:PORT/ACCOUNT`.
pub fn connection_string(port: u16) -> String {
    format!(
        "DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={ACCOUNT_KEY};\
         BlobEndpoint=http://127.0.0.1:{port}/{ACCOUNT};"
    )
}

/// The port of the shared Azurite, started on first use.
///
/// # Panics
///
/// If it cannot be started (every later call panics with the same message).
pub fn port() -> u16 {
    static SERVER: OnceLock<Result<u16, String>> = OnceLock::new();
    match SERVER.get_or_init(|| {
        start().map(|(port, watchdog)| {
            // Never dropped: the server lives until the process ends.
            std::mem::forget(watchdog);
            port
        })
    }) {
        Ok(port) => *port,
        Err(message) => panic!("{message}"),
    }
}

/// Starts Azurite under a watchdog shell that stops it (and removes its
/// data) when its stdin closes, i.e. when this process ends.
fn start() -> Result<(u16, ChildStdin), String> {
    let binary = binary();
    const SCRIPT: &str = r#"dir=$(mktemp -d)
"$EF_AZURITE" --blobHost 127.0.0.1 --blobPort "$EF_PORT" --location "$dir" --silent --skipApiVersionCheck \
  >/dev/null 2>&1 &
pid=$!
cat >/dev/null 2>&1
kill "$pid" 2>/dev/null
wait "$pid" 2>/dev/null
rm -rf "$dir""#;
    crate::watched_server(
        &format!("Azurite ({})", binary.display()),
        SCRIPT,
        &[("EF_AZURITE", binary.as_os_str())],
        Duration::from_secs(30),
        |port| {
            TcpStream::connect_timeout(&(Ipv4Addr::LOCALHOST, port).into(), Duration::from_millis(200))
                .map(drop)
                .map_err(|_| format!("nothing listens on port {port} after 30 s"))
        },
    )
}

/// Creates container `name` (Create Container, signed with the account's
/// shared key as the Blob service documents it).
fn create_container(port: u16, name: &str) -> Result<(), String> {
    let date = httpdate(SystemTime::now());
    let version = "2021-08-06";
    let string_to_sign = format!(
        "PUT\n\n\n\n\n\n\n\n\n\n\n\nx-ms-date:{date}\nx-ms-version:{version}\n/{ACCOUNT}/{ACCOUNT}/{name}\nrestype:container"
    );
    let key = base64::engine::general_purpose::STANDARD.decode(ACCOUNT_KEY).map_err(|e| e.to_string())?;
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).map_err(|e| e.to_string())?;
    mac.update(string_to_sign.as_bytes());
    let signature = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    let request = format!(
        "PUT /{ACCOUNT}/{name}?restype=container HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nx-ms-date: {date}\r\n\
         x-ms-version: {version}\r\nAuthorization: SharedKey {ACCOUNT}:{signature}\r\nContent-Length: 0\r\n\
         Connection: close\r\n\r\n"
    );
    let mut stream = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).map_err(|e| format!("Azurite: {e}"))?;
    stream.write_all(request.as_bytes()).map_err(|e| format!("Azurite: {e}"))?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).map_err(|e| format!("Azurite: {e}"))?;
    let status = answer.lines().next().unwrap_or_default();
    if status.contains(" 201 ") { Ok(()) } else { Err(format!("Azurite refused container {name}: {answer}")) }
}

/// An RFC 7231 date (`Sun, 06 Nov 1994 08:49:37 GMT`).
fn httpdate(time: SystemTime) -> String {
    let secs = time.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or_default();
    let days = secs / 86_400;
    let (hour, minute, second) = ((secs / 3600) % 24, (secs / 60) % 60, secs % 60);
    let weekday = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"][(days % 7) as usize];
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let months = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
    format!("{weekday}, {day:02} {} {year} {hour:02}:{minute:02}:{second:02} GMT", months[(month - 1) as usize])
}

#[cfg(test)]
mod tests {
    #[test]
    fn http_dates_are_rfc_7231() {
        let time = std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(784_111_777);
        assert_eq!(super::httpdate(time), "Sun, 06 Nov 1994 08:49:37 GMT");
        let leap = std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(951_782_400);
        assert_eq!(super::httpdate(leap), "Tue, 29 Feb 2000 00:00:00 GMT");
    }
}
