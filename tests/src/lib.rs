//! Test harness for eventfold: a throw-away PostgreSQL server per test process
//! (or the server named by `EVENTFOLD_TEST_DATABASE_URL`), and a fresh, empty
//! database for each test that asks for one through [`TestDatabase::create`];
//! likewise a throw-away Redis ([`redis`]) and a PostgreSQL server that only
//! speaks TLS ([`tls`]). Besides: event logs to serve ([`store`]), a test
//! binary's captured log ([`logs`]), what hostile clients send
//! ([`hostile`]) and orders to send ([`orders`]).

pub mod auth;
pub mod azurite;
pub mod hostile;
pub mod kafka;
pub mod logs;
pub mod orders;
pub mod redis;
pub mod registry;
pub mod store;
pub mod tls;

use std::collections::hash_map::RandomState;
use std::ffi::OsStr;
use std::hash::{BuildHasher, Hasher};
use std::io::{Read, Seek, SeekFrom};
use std::net::{Ipv4Addr, TcpListener};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio_postgres::NoTls;

/// Names a PostgreSQL server to use instead of starting a throw-away one,
/// e.g. `postgresql://postgres@127.0.0.1:5432/postgres`.
const URL_ENV: &str = "EVENTFOLD_TEST_DATABASE_URL";
/// How long the throw-away server may take to accept connections.
const STARTUP_TIMEOUT_SECS: u32 = 30;
/// How long dropping a [`TestDatabase`] waits for `DROP DATABASE`, and
/// dropping a server waits for it to stop and its directory to go.
const DROP_TIMEOUT: Duration = Duration::from_secs(10);
const NOT_FOUND: &str = "PostgreSQL binaries not found: install them with \
     `apt-get install -y postgresql` (or set EVENTFOLD_TEST_DATABASE_URL)";

/// A fresh, empty database on the shared test PostgreSQL server.
///
/// Dropping it drops the database (`DROP DATABASE ... WITH (FORCE)`,
/// best-effort, on a separate thread so that it works from any runtime).
#[derive(Debug)]
pub struct TestDatabase {
    name: String,
    url: String,
    /// The server's `postgres` database, reached without TLS: where the
    /// database is created and dropped.
    admin: String,
}

impl TestDatabase {
    /// Creates a new, uniquely named database, starting the shared server on
    /// first use.
    ///
    /// # Panics
    ///
    /// If the server cannot be started or reached, or the database cannot be
    /// created; the message says why.
    pub async fn create() -> TestDatabase {
        let server = server_url();
        Self::create_on(server.clone(), |name| with_database(&server, name)).await
    }

    /// Creates a database through `admin` (a server's `postgres` database,
    /// no TLS); `url` gives the URL clients use for a database name.
    pub(crate) async fn create_on(admin: String, url: impl FnOnce(&str) -> String) -> TestDatabase {
        let name = unique_name();
        let (client, connection) = tokio_postgres::connect(&admin, NoTls)
            .await
            .unwrap_or_else(|e| panic!("cannot connect to the test server {admin}: {e}"));
        let conn = tokio::spawn(connection);
        client
            .batch_execute(&format!(r#"CREATE DATABASE "{name}" TEMPLATE template0"#))
            .await
            .unwrap_or_else(|e| panic!("cannot create test database {name} on {admin}: {e}"));
        drop(client);
        // Wait for the connection task so that no socket outlives the call.
        let _ = conn.await;
        let url = url(&name);
        TestDatabase { name, url, admin }
    }

    /// [`TestDatabase::create`] with eventfold's migrations applied.
    pub async fn migrated() -> TestDatabase {
        Self::create().await.with_migrations().await
    }

    /// Applies eventfold's migrations to this database.
    async fn with_migrations(self) -> TestDatabase {
        let db = self;
        let (mut client, connection) = tokio_postgres::connect(db.url(), NoTls)
            .await
            .unwrap_or_else(|e| panic!("cannot connect to test database {}: {e}", db.name));
        let conn = tokio::spawn(connection);
        eventfold_migrations::up(&mut client)
            .await
            .unwrap_or_else(|e| panic!("migrations do not apply to test database {}: {e}", db.name));
        drop(client);
        let _ = conn.await;
        db
    }

    /// A libpq-style URL of this database, usable by
    /// `tokio_postgres::connect(url, NoTls)`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The name of this database.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let server = self.admin.clone();
        let sql = format!(r#"DROP DATABASE IF EXISTS "{}" WITH (FORCE)"#, self.name);
        let (done_tx, done_rx) = mpsc::channel::<()>();
        let spawned = std::thread::Builder::new().name(format!("drop-{}", self.name)).spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread().enable_all().build() else {
                return;
            };
            runtime.block_on(async move {
                if let Ok((client, connection)) = tokio_postgres::connect(&server, NoTls).await {
                    let conn = tokio::spawn(connection);
                    let _ = client.batch_execute(&sql).await;
                    drop(client);
                    let _ = conn.await;
                }
            });
            let _ = done_tx.send(());
        });
        if spawned.is_ok() {
            // Best-effort: wait a bounded time so that the process does not
            // exit (killing the thread) before the database is gone.
            let _ = done_rx.recv_timeout(DROP_TIMEOUT);
        }
    }
}

/// The base server URL (database `postgres`): the value of
/// `EVENTFOLD_TEST_DATABASE_URL` if set, otherwise the URL of this process's
/// throw-away server, which is started on first use.
///
/// # Panics
///
/// If the throw-away server cannot be started (every later call panics with
/// the same message).
pub fn server_url() -> String {
    static SERVER: OnceLock<Result<String, String>> = OnceLock::new();
    match SERVER.get_or_init(|| match std::env::var(URL_ENV) {
        Ok(url) if !url.trim().is_empty() => Ok(url.trim().to_owned()),
        _ => Server::start().map(|server| {
            let url = server.url();
            // Statics are never dropped: the server lives until the process
            // ends, and its watchdog removes it then.
            std::mem::forget(server);
            url
        }),
    }) {
        Ok(url) => url.clone(),
        Err(message) => panic!("{message}"),
    }
}

/// `eventfold_test_<pid>_<counter>_<random>`: unique within and across
/// processes sharing a server.
pub(crate) fn unique_name() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let counter = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or_default();
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u128(nanos);
    hasher.write_u64(counter);
    let random = hasher.finish() as u32;
    format!("eventfold_test_{}_{counter}_{random:08x}", std::process::id())
}

/// Replaces the database of a `postgres://` / `postgresql://` URL.
fn with_database(server_url: &str, database: &str) -> String {
    let Some(scheme_end) = server_url.find("://").map(|i| i + 3) else {
        panic!("{URL_ENV} must be a URL such as postgresql://postgres@127.0.0.1:5432/postgres, got {server_url:?}");
    };
    let rest = &server_url[scheme_end..];
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let query = tail.find('?').map(|i| &tail[i..]).unwrap_or("");
    format!("{}{authority}/{database}{query}", &server_url[..scheme_end])
}

/// A throw-away PostgreSQL server, started synchronously (no runtime needed).
///
/// Dropping it stops the server and removes its directory; a server that is
/// never dropped (the shared one) is removed when the process ends.
struct Server {
    port: u16,
    /// What `pg_ctl start` ran with (empty until started): the server
    /// starts again with the same port and options ([`OwnPostgres::start`]).
    pg_ctl: Vec<std::ffi::OsString>,
    /// Holds the data directory, the log and the Unix socket.
    dir: PathBuf,
    /// Write end of the watchdog's stdin: when this process ends, for any
    /// reason, the pipe closes and the watchdog stops the server and removes
    /// its directory.
    watchdog: Option<ChildStdin>,
    /// The watchdog itself, waited for on drop.
    watchdog_process: Child,
}

impl Server {
    fn url(&self) -> String {
        format!("postgresql://postgres@127.0.0.1:{}/postgres", self.port)
    }

    fn start() -> Result<Server, String> {
        Self::start_with(|_dir| Ok(String::new()))
    }

    /// Starts a server whose `prepare` writes what it needs into the
    /// server's directory (before the directory is handed to the `postgres`
    /// user, so that the files are the server's) and returns more options for
    /// `postgres`, such as `-c ssl=on`.
    fn start_with(prepare: impl FnOnce(&Path) -> Result<String, String>) -> Result<Server, String> {
        let bin = find_bin_dir().ok_or_else(|| NOT_FOUND.to_owned())?;
        let (initdb, pg_ctl) = (bin.join("initdb"), bin.join("pg_ctl"));
        let run_as = RunAs::detect()?;

        let dir = tempfile::Builder::new()
            .prefix("eventfold-pg-")
            .tempdir()
            .map_err(|e| format!("cannot create a temporary directory: {e}"))?
            .keep();
        let data = dir.join("data");
        let log = dir.join("postgres.log");
        let prepared = prepare(&dir);
        if prepared.is_err() {
            let _ = std::fs::remove_dir_all(&dir);
        }
        let extra_options = prepared?;
        if let RunAs::Postgres(_) = run_as {
            run(Command::new("chown").arg("-R").arg("postgres").arg(&dir))?;
        }

        let (watchdog, watchdog_process) = spawn_watchdog(&run_as, &pg_ctl, &data, &dir)?;
        let mut server =
            Server { port: 0, pg_ctl: Vec::new(), dir: dir.clone(), watchdog: Some(watchdog), watchdog_process };

        run(run_as
            .command(&initdb)
            .current_dir(&dir)
            .arg("-D")
            .arg(&data)
            .args(["-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8"])
            .arg("--locale=C"))?;

        let mut last_error = String::new();
        for _attempt in 0..3 {
            let port = free_port()?;
            let options = format!(
                "-p {port} -k '{}' -c listen_addresses=127.0.0.1 -c fsync=on -c max_connections=200 {extra_options}",
                dir.display()
            );
            let mut command = run_as.command(&pg_ctl);
            command.current_dir(&dir).arg("-D").arg(&data).arg("-l").arg(&log).arg("-o").arg(&options);
            let start: Vec<std::ffi::OsString> = std::iter::once(command.get_program().to_owned())
                .chain(command.get_args().map(ToOwned::to_owned))
                .collect();
            let started = run(command.args(["-w", "-t", &STARTUP_TIMEOUT_SECS.to_string(), "start"]));
            match started {
                Ok(()) => {
                    server.port = port;
                    server.pg_ctl = start;
                    return Ok(server);
                }
                Err(e) => {
                    let tail = log_tail(&log);
                    last_error = format!("{e}\n--- tail of {} ---\n{tail}", log.display());
                    // Another process may have taken the port in between: retry.
                    if !tail.contains("Address already in use") {
                        break;
                    }
                }
            }
        }
        Err(format!("cannot start the test PostgreSQL server: {last_error}"))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // Closing the pipe tells the watchdog to stop the server and remove
        // its directory; wait a bounded time for it to be done.
        drop(self.watchdog.take());
        let deadline = Instant::now() + DROP_TIMEOUT;
        while Instant::now() < deadline {
            match self.watchdog_process.try_wait() {
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                Ok(Some(_)) | Err(_) => return,
            }
        }
    }
}

/// A PostgreSQL server of one test's own, which the test may stop and start
/// again on the same port (an outage), or use alone (no other test's
/// transactions on it). Always a throw-away server, even when
/// `EVENTFOLD_TEST_DATABASE_URL` names a shared one; removed on drop.
pub struct OwnPostgres {
    server: Server,
}

impl std::fmt::Debug for OwnPostgres {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OwnPostgres").field("port", &self.server.port).finish_non_exhaustive()
    }
}

impl OwnPostgres {
    /// Starts a server on a free loopback port.
    ///
    /// # Panics
    ///
    /// If it cannot be started.
    pub fn start() -> OwnPostgres {
        OwnPostgres { server: Server::start().unwrap_or_else(|e| panic!("{e}")) }
    }

    /// Its `postgres` database: `postgresql://postgres@127.0.0.1:PORT/postgres`.
    pub fn url(&self) -> String {
        self.server.url()
    }

    /// A fresh database on this server, with eventfold's migrations.
    pub async fn migrated(&self) -> TestDatabase {
        let admin = self.url();
        TestDatabase::create_on(admin.clone(), |name| with_database(&admin, name)).await.with_migrations().await
    }

    /// Stops the server at once, as a crash would (`pg_ctl stop -m
    /// immediate`: no checkpoint, every connection cut); what was committed
    /// survives, as after a power cut with fsync on.
    ///
    /// # Panics
    ///
    /// If `pg_ctl` fails.
    pub fn stop(&self) {
        let mut command = self.pg_ctl();
        run(command.args(["-m", "immediate", "-w", "stop"])).unwrap_or_else(|e| panic!("{e}"));
    }

    /// Starts the stopped server again on the same port (it recovers from
    /// its WAL first).
    ///
    /// # Panics
    ///
    /// If it does not start within 30 s.
    pub fn start_again(&self) {
        let mut command = self.pg_ctl();
        run(command.args(["-w", "-t", &STARTUP_TIMEOUT_SECS.to_string(), "start"])).unwrap_or_else(|e| {
            panic!("{e}\n--- tail of the server log ---\n{}", log_tail(&self.server.dir.join("postgres.log")))
        });
    }

    fn pg_ctl(&self) -> Command {
        let (program, args) = self.server.pg_ctl.split_first().expect("a started server");
        let mut command = Command::new(program);
        command.args(args);
        command
    }
}

/// Whether server processes must run as the `postgres` user (they refuse to
/// run as root).
enum RunAs {
    Me,
    /// Through `runuser` (this path to it).
    Postgres(PathBuf),
}

impl RunAs {
    fn detect() -> Result<RunAs, String> {
        let is_root = std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0);
        if !is_root {
            return Ok(RunAs::Me);
        }
        let has_user = Command::new("id")
            .arg("postgres")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !has_user {
            return Err("running as root, but there is no `postgres` user to run the test \
                 server as (initdb refuses root): `apt-get install -y postgresql` creates it"
                .to_owned());
        }
        let path = std::env::var_os("PATH").unwrap_or_default();
        std::env::split_paths(&path)
            .chain(["/usr/sbin".into(), "/sbin".into()])
            .map(|dir| dir.join("runuser"))
            .find(|runuser| runuser.is_file())
            .map(RunAs::Postgres)
            .ok_or_else(|| {
                "running as root, but `runuser` (util-linux) is missing: it runs the test \
                 server as `postgres` (initdb refuses root)"
                    .to_owned()
            })
    }

    fn command(&self, program: &Path) -> Command {
        match self {
            RunAs::Me => Command::new(program),
            RunAs::Postgres(runuser) => {
                let mut command = Command::new(runuser);
                command.args(["-u", "postgres", "--"]).arg(program);
                command
            }
        }
    }
}

/// A directory holding `initdb` and `pg_ctl`: the first on `PATH`, else the
/// highest `/usr/lib/postgresql/<version>/bin`.
fn find_bin_dir() -> Option<PathBuf> {
    let has_both = |dir: &Path| dir.join("initdb").is_file() && dir.join("pg_ctl").is_file();
    if let Some(path) = std::env::var_os("PATH")
        && let Some(dir) = std::env::split_paths(&path).find(|dir| has_both(dir))
    {
        return Some(dir);
    }
    std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let version: Vec<u32> =
                entry.file_name().to_str()?.split('.').map(|part| part.parse().ok()).collect::<Option<_>>()?;
            let bin = entry.path().join("bin");
            has_both(&bin).then_some((version, bin))
        })
        .max()
        .map(|(_, bin)| bin)
}

/// A PostgreSQL URL on a loopback port nothing listens on, for tests of how
/// services behave while their database is unreachable.
pub fn unreachable_database_url() -> String {
    let port = free_port().unwrap_or_else(|e| panic!("{e}"));
    format!("postgresql://postgres@127.0.0.1:{port}/eventfold")
}

/// A channel to the gRPC server listening on `addr` (`host:port`),
/// connected within 5 s.
///
/// # Panics
///
/// If it does not connect.
pub async fn channel(addr: impl std::fmt::Display) -> tonic::transport::Channel {
    tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .expect("endpoint")
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .unwrap_or_else(|e| panic!("connect to the server at {addr}: {e}"))
}

/// A loopback port that was free a moment ago.
pub(crate) fn free_port() -> Result<u16, String> {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .map_err(|e| format!("cannot find a free loopback port: {e}"))
}

/// A detached shell (own process group, so a terminal's Ctrl-C does not reach
/// it) that waits for its stdin to close, then stops the server and removes
/// its directory.
fn spawn_watchdog(run_as: &RunAs, pg_ctl: &Path, data: &Path, dir: &Path) -> Result<(ChildStdin, Child), String> {
    // Retried: the process may have died while initdb or `pg_ctl start` was
    // still running (a postmaster whose lock file is gone stops itself within
    // a minute anyway).
    const SCRIPT: &str = r#"cat >/dev/null 2>&1
for _ in 1 2 3 4 5 6 7 8 9 10; do
  $EF_RUN_AS "$EF_PG_CTL" -D "$EF_DATA" stop -m immediate -w >/dev/null 2>&1
  rm -rf "$EF_DIR"
  [ -e "$EF_DIR" ] || break
  sleep 1
done"#;
    let run_as = match run_as {
        RunAs::Me => String::new(),
        RunAs::Postgres(runuser) => format!("{} -u postgres --", runuser.display()),
    };
    let env: [(&str, &OsStr); 4] = [
        ("EF_RUN_AS", run_as.as_ref()),
        ("EF_PG_CTL", pg_ctl.as_os_str()),
        ("EF_DATA", data.as_os_str()),
        ("EF_DIR", dir.as_os_str()),
    ];
    watchdog_shell("test server", SCRIPT, &env)
}

/// `sh -c script` with `env`, detached (its own process group, in `/`, no
/// output), its stdin a pipe whose closing tells it to stop what it runs:
/// the pipe and the child.
fn watchdog_shell(what: &str, script: &str, env: &[(&str, &OsStr)]) -> Result<(ChildStdin, Child), String> {
    let mut child = Command::new("sh")
        .args(["-c", script])
        .envs(env.iter().copied())
        .current_dir("/")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .map_err(|e| format!("cannot start the {what} watchdog (sh): {e}"))?;
    let stdin = child.stdin.take().ok_or_else(|| "the watchdog has no stdin".to_owned())?;
    Ok((stdin, child))
}

/// Starts a server under a watchdog shell on a free loopback port: `script`
/// runs it with `$EF_PORT` (and `env`) in the background and stops it once
/// its stdin closes, i.e. when this process ends for any reason. Returns
/// the port and the watchdog's stdin once `ready(port)` passes (within
/// `timeout`); tries three ports, since another process may take one in
/// between.
pub(crate) fn watched_server(
    what: &str,
    script: &str,
    env: &[(&str, &OsStr)],
    timeout: Duration,
    ready: impl Fn(u16) -> Result<(), String>,
) -> Result<(u16, ChildStdin), String> {
    let mut last_error = String::new();
    for _attempt in 0..3 {
        let port = free_port()?;
        let port_text = port.to_string();
        let mut env = env.to_vec();
        env.push(("EF_PORT", port_text.as_ref()));
        let (watchdog, _child) = watchdog_shell(what, script, &env)?;
        let deadline = Instant::now() + timeout;
        loop {
            match ready(port) {
                Ok(()) => return Ok((port, watchdog)),
                Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
                Err(e) => {
                    last_error = e;
                    break;
                }
            }
        }
        // Dropping the watchdog's stdin stops whatever did start.
        drop(watchdog);
    }
    Err(format!("cannot start {what}: {last_error}"))
}

/// Runs a command to completion; on failure, the error has its output.
fn run(command: &mut Command) -> Result<(), String> {
    let output = command.stdin(Stdio::null()).output().map_err(|e| format!("cannot run {command:?}: {e}"))?;
    if output.status.success() {
        return Ok(());
    }
    Err(format!(
        "{command:?} failed ({})\n--- stdout ---\n{}\n--- stderr ---\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout).trim_end(),
        String::from_utf8_lossy(&output.stderr).trim_end(),
    ))
}

/// The last few KiB of the server log.
fn log_tail(log: &Path) -> String {
    const TAIL: u64 = 4096;
    let Ok(mut file) = std::fs::File::open(log) else {
        return "(no log)".to_owned();
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = file.seek(SeekFrom::Start(len.saturating_sub(TAIL)));
    let mut bytes = Vec::new();
    let _ = file.read_to_end(&mut bytes);
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Runs each case, an `async fn case(server: Server)` of the calling test
/// file, once on the in-memory log (module `memory`) and once on PostgreSQL
/// (module `postgres`). The file provides `Server::start(backend)` and the
/// backends `memory()` and `postgres()` (those of [`store`], imported, or
/// its own).
#[macro_export]
macro_rules! backends {
    ($($case:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::$case(super::Server::start(super::memory().await).await).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::$case(super::Server::start(super::postgres().await).await).await;
                }
            )*
        }
    };
}

/// Every row `sql` returns, as `read` takes it, collected (into a `Vec`, a
/// map, ...).
///
/// # Panics
///
/// If the query fails.
pub async fn select<T, C: FromIterator<T>>(
    client: &tokio_postgres::Client,
    sql: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    read: impl FnMut(&tokio_postgres::Row) -> T,
) -> C {
    client.query(sql, params).await.unwrap_or_else(|e| panic!("{sql}: {e}")).iter().map(read).collect()
}

/// Every row of `table` as its JSON text, in `order_by` order: two tables
/// compare row for row by comparing these.
///
/// # Panics
///
/// If the query fails.
pub async fn table_rows(client: &tokio_postgres::Client, table: &str, order_by: &str) -> Vec<String> {
    client
        .query(&format!("SELECT to_jsonb(t)::text FROM {table} t ORDER BY {order_by}"), &[])
        .await
        .unwrap_or_else(|e| panic!("read {table}: {e}"))
        .iter()
        .map(|r| r.get(0))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_the_database_of_a_url() {
        assert_eq!(
            with_database("postgresql://postgres@127.0.0.1:5432/postgres", "x"),
            "postgresql://postgres@127.0.0.1:5432/x"
        );
        assert_eq!(with_database("postgres://u:p@h:1?sslmode=disable", "x"), "postgres://u:p@h:1/x?sslmode=disable");
        assert_eq!(with_database("postgres://h/db?a=b", "x"), "postgres://h/x?a=b");
    }

    #[tokio::test]
    async fn an_own_server_stops_and_starts_again_with_what_it_committed() {
        let server = OwnPostgres::start();
        let db = server.migrated().await;
        let connect = || async {
            let (client, connection) = tokio_postgres::connect(db.url(), NoTls).await?;
            tokio::spawn(connection);
            Ok::<_, tokio_postgres::Error>(client)
        };
        let client = connect().await.expect("connect");
        client.batch_execute("CREATE TABLE kept (n INT4); INSERT INTO kept VALUES (7)").await.unwrap();
        server.stop();
        assert!(client.query_one("SELECT 1", &[]).await.is_err(), "a stopped server answers nothing");
        assert!(connect().await.is_err(), "a stopped server takes no connection");
        server.start_again();
        let client = connect().await.expect("connect after the restart");
        let row = client.query_one("SELECT n FROM kept", &[]).await.unwrap();
        assert_eq!(row.get::<_, i32>(0), 7);
    }

    #[tokio::test]
    async fn creates_distinct_usable_databases() {
        let first = TestDatabase::create().await;
        let second = TestDatabase::create().await;
        assert_ne!(first.name(), second.name());
        assert_ne!(first.url(), second.url());
        assert!(first.url().ends_with(first.name()));

        let (client, connection) =
            tokio_postgres::connect(first.url(), NoTls).await.expect("connect to the test database");
        tokio::spawn(connection);
        let row = client.query_one("SELECT 1::INT4, current_database()", &[]).await.unwrap();
        assert_eq!(row.get::<_, i32>(0), 1);
        assert_eq!(row.get::<_, String>(1), first.name());
    }
}
