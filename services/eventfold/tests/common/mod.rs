//! The harness of the tests that run the `eventfold` binary as a user
//! would: `eventfold dev` (or `serve X`) as a child process on a free port,
//! grpcurl against it, and a guard that kills it when the test ends.

// Each test binary uses a different part of the harness.
#![allow(dead_code, unreachable_pub)]

use std::{
    io::{BufRead, BufReader, Read},
    path::PathBuf,
    process::{Child, Command, ExitStatus, Output, Stdio},
    sync::{Arc, Mutex, mpsc},
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_eventfold");
pub const SERVICE: &str = "eventfold.eventstore.v1.EventStoreService";
pub const GRPCURL_VERSION: &str = "1.8.6";

/// The grpcurl binary: `EVENTFOLD_GRPCURL`, else the copy `tests/run`
/// installs.
pub fn grpcurl() -> PathBuf {
    if let Some(path) = std::env::var_os("EVENTFOLD_GRPCURL").filter(|p| !p.is_empty()) {
        return path.into();
    }
    let tools = std::env::var_os("EVENTFOLD_TOOLS_DIR")
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache/eventfold/tools")));
    if let Some(tools) = tools {
        let path = tools.join(format!("grpcurl-{GRPCURL_VERSION}")).join("grpcurl");
        if path.is_file() {
            return path;
        }
    }
    panic!("grpcurl not found: run tests/run (it installs the pinned grpcurl) or set EVENTFOLD_GRPCURL");
}

/// `eventfold` with no `EVENTFOLD_*` configuration and no armed failpoints
/// (`FAILPOINTS`) from the test's environment.
pub fn eventfold() -> Command {
    let mut command = Command::new(BIN);
    command.env_remove(eventfold_store::failpoint::ENV);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("EVENTFOLD_") {
            command.env_remove(key);
        }
    }
    command.stdin(Stdio::null());
    command
}

/// Reads a pipe to its end on a thread, into a shared buffer.
pub fn drain(mut pipe: impl Read + Send + 'static) -> Arc<Mutex<String>> {
    let buffer = Arc::new(Mutex::new(String::new()));
    let sink = buffer.clone();
    thread::spawn(move || {
        let mut chunk = [0u8; 4096];
        while let Ok(n) = pipe.read(&mut chunk) {
            if n == 0 {
                break;
            }
            sink.lock().unwrap().push_str(&String::from_utf8_lossy(&chunk[..n]));
        }
    });
    buffer
}

/// Waits for a child to exit, for at most `timeout`.
pub fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// A child process killed when dropped (a failed assertion must not leave
/// it running).
pub struct Guard {
    pub child: Child,
    pub stderr: Arc<Mutex<String>>,
    /// What a server printed on stdout after its first line.
    pub stdout: Arc<Mutex<String>>,
}

impl Guard {
    /// The address after the first of `prefixes` on a line of stdout
    /// (within 10 s).
    pub fn printed_addr(&self, prefixes: &[&str]) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let printed = self.stdout.lock().unwrap().clone();
            if let Some(addr) = printed
                .lines()
                .find_map(|line| prefixes.iter().find_map(|prefix| line.strip_prefix(prefix)))
                .and_then(|rest| rest.split_whitespace().next())
            {
                return addr.to_owned();
            }
            assert!(Instant::now() < deadline, "no {prefixes:?} line on stdout: {printed:?}");
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until the process printed `needle` on stderr; false when it did
    /// not within `timeout` (or exited first).
    pub fn wait_for_stderr(&mut self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.stderr.lock().unwrap().contains(needle) {
                return true;
            }
            if Instant::now() >= deadline || self.child.try_wait().ok().flatten().is_some() {
                return self.stderr.lock().unwrap().contains(needle);
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL (`Child::kill`), then reaps the process: a crash, with no
    /// destructor, flush or drain.
    pub fn sigkill(&mut self) {
        self.child.kill().expect("SIGKILL the process");
        let status = self.child.wait().expect("reap the process");
        assert!(!status.success(), "a killed process does not exit 0: {status:?}");
    }
}

/// `eventfold COMMAND ARGS` with environment `env` as a child process
/// whose stderr is drained; returns once its first stdout line (which
/// must start with `prefix`) is printed, with that line.
pub fn spawn_process(command: &[&str], args: &[&str], env: &[(&str, &str)], prefix: &str) -> (Guard, String) {
    spawn_process_in(None, command, args, env, prefix)
}

/// [`spawn_process`] in the working directory `dir` (`None`: this one).
pub fn spawn_process_in(
    dir: Option<&std::path::Path>,
    command: &[&str],
    args: &[&str],
    env: &[(&str, &str)],
    prefix: &str,
) -> (Guard, String) {
    let mut child = eventfold();
    if let Some(dir) = dir {
        child.current_dir(dir);
    }
    let mut child = child
        .args(command)
        .args(args)
        .env("EVENTFOLD_LOG__FILTER", "info")
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {BIN}: {e}"));
    let stderr = drain(child.stderr.take().expect("stderr"));
    let stdout = child.stdout.take().expect("stdout");
    let rest = Arc::new(Mutex::new(String::new()));
    let process = Guard { child, stderr, stdout: rest.clone() };

    // The first stdout line says the process is up; keep the rest.
    let (line_tx, line_rx) = mpsc::channel();
    thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        if let Some(Ok(line)) = lines.next() {
            let _ = line_tx.send(line);
        }
        for line in lines.map_while(Result::ok) {
            let mut rest = rest.lock().unwrap();
            rest.push_str(&line);
            rest.push('\n');
        }
    });
    let Ok(line) = line_rx.recv_timeout(Duration::from_secs(30)) else {
        let mut process = process;
        let status = process.child.try_wait().ok().flatten();
        panic!(
            "eventfold {command:?} printed nothing within 30 s (exit: {status:?}); stderr:\n{}",
            process.stderr.lock().unwrap()
        );
    };
    assert!(line.starts_with(prefix), "unexpected first line of eventfold {command:?}: {line:?}");
    (process, line)
}

impl Drop for Guard {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `eventfold dev` on a free loopback port.
pub struct DevServer {
    pub process: Guard,
    pub addr: String,
}

impl DevServer {
    pub fn start() -> Self {
        Self::start_with(&[], "eventfold: EventStoreService and the command services listening on ")
    }

    /// `eventfold dev` with `args` added; its first line starts `prefix`.
    pub fn start_with(args: &[&str], prefix: &str) -> Self {
        Self::start_env(args, &[], prefix)
    }

    /// [`DevServer::start_with`] with environment variables `env` too.
    /// Without `--database-url` or `--data-dir` it runs `--ephemeral` (in
    /// memory): tests keep nothing in the working directory.
    /// `fs` topics go to a temporary directory of this test process unless
    /// `env` says where.
    pub fn start_env(args: &[&str], env: &[(&str, &str)], prefix: &str) -> Self {
        static TOPICS: std::sync::OnceLock<tempfile::TempDir> = std::sync::OnceLock::new();
        let topics = TOPICS.get_or_init(|| tempfile::tempdir().expect("a directory for fs topics"));
        let mut env = env.to_vec();
        if !env.iter().any(|(k, _)| *k == "EVENTFOLD_TOPICS__FS_ROOT") {
            env.push(("EVENTFOLD_TOPICS__FS_ROOT", topics.path().to_str().expect("UTF-8")));
        }
        let env = env.as_slice();
        let stores = args.iter().any(|a| a.starts_with("--database-url") || a.starts_with("--data-dir"));
        let command: &[&str] = if stores {
            &["dev", "--listen", "127.0.0.1:0"]
        } else {
            &["dev", "--listen", "127.0.0.1:0", "--ephemeral"]
        };
        Self::start_command(command, args, env, prefix)
    }

    /// `eventfold dev` with the read side, on a throw-away database of its
    /// own (returned: it lives as long as the caller keeps it), its gateway
    /// on a free port.
    pub fn with_read_side() -> (eventfold_tests::TestDatabase, Self) {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        let db = runtime.block_on(eventfold_tests::TestDatabase::create());
        let server = Self::start_env(
            &["--database-url", db.url()],
            &[("EVENTFOLD_GATEWAY__LISTEN", "127.0.0.1:0")],
            "eventfold: EventStoreService and the command and query services listening on ",
        );
        (db, server)
    }

    /// `eventfold COMMAND ARGS` (a server); its first line starts `prefix`.
    pub fn start_command(command: &[&str], args: &[&str], env: &[(&str, &str)], prefix: &str) -> Self {
        let (process, line) = spawn_process(command, args, env, "");
        let addr = line
            .strip_prefix(prefix)
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap_or_else(|| panic!("unexpected first line of eventfold dev: {line:?}"))
            .to_owned();
        assert!(
            addr.starts_with("127.0.0.1:") && !addr.ends_with(":0"),
            "the printed address is the bound one: {line:?}"
        );
        DevServer { process, addr }
    }

    /// The address of the REST gateway, from the `eventfold: REST on
    /// http://ADDR` (or `https://ADDR`) line (within 10 s).
    pub fn rest_addr(&self) -> String {
        self.printed_addr(&["eventfold: REST on http://", "eventfold: REST on https://"])
    }

    /// The address of the admin listener, from the `eventfold: admin on
    /// http://ADDR` line (within 10 s).
    pub fn admin_addr(&self) -> String {
        self.printed_addr(&["eventfold: admin on http://"])
    }

    fn printed_addr(&self, prefixes: &[&str]) -> String {
        self.process.printed_addr(prefixes)
    }

    /// grpcurl against this server.
    pub fn grpcurl(&self, args: &[&str]) -> Command {
        let mut command = Command::new(grpcurl());
        command.arg("-plaintext").args(args).stdin(Stdio::null());
        command
    }

    /// Runs grpcurl to completion; panics unless it succeeds.
    pub fn run(&self, args: &[&str]) -> String {
        let mut command = self.grpcurl(args);
        let Output { status, stdout, stderr } = command.output().expect("run grpcurl");
        let stdout = String::from_utf8_lossy(&stdout).into_owned();
        assert!(
            status.success(),
            "grpcurl {args:?} failed ({status}):\n{stdout}\n{}",
            String::from_utf8_lossy(&stderr)
        );
        stdout
    }

    /// Calls `method` (`Service/Method`) with a JSON request; the JSON answer.
    pub fn call(&self, method: &str, request: &Value) -> Value {
        let request = request.to_string();
        let out = self.run(&["-d", &request, &self.addr, method]);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("grpcurl output of {method} is not JSON ({e}):\n{out}"))
    }

    pub fn subscribe(&self, request: &Value) -> Subscriber {
        let request = request.to_string();
        let mut child = self
            .grpcurl(&["-d", &request, &self.addr, &format!("{SERVICE}/Subscribe")])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn grpcurl Subscribe");
        let stdout = drain(child.stdout.take().expect("stdout"));
        let stderr = drain(child.stderr.take().expect("stderr"));
        Subscriber { process: Guard { child, stderr, stdout: Arc::default() }, stdout }
    }
}

/// A running `grpcurl ... Subscribe`.
pub struct Subscriber {
    pub process: Guard,
    pub stdout: Arc<Mutex<String>>,
}

impl Subscriber {
    /// The complete JSON messages printed so far.
    pub fn messages(&self) -> Vec<Value> {
        let out = self.stdout.lock().unwrap().clone();
        serde_json::Deserializer::from_str(&out).into_iter::<Value>().map_while(Result::ok).collect()
    }

    /// Waits until the messages satisfy `done`; returns them.
    pub fn wait_for(&self, what: &str, done: impl Fn(&[Value]) -> bool) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let messages = self.messages();
            if done(&messages) {
                return messages;
            }
            if Instant::now() >= deadline {
                panic!(
                    "subscription: no {what} within 10 s; stdout:\n{}\nstderr:\n{}",
                    self.stdout.lock().unwrap(),
                    self.process.stderr.lock().unwrap()
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }
}

/// The services' descriptor set with tonic-types' (`google.rpc` details,
/// so that grpcurl prints an ErrorInfo or a BadRequest), each file once,
/// in a temporary file for grpcurl's `-protoset`.
pub fn protoset_file() -> tempfile::NamedTempFile {
    use prost::Message as _;
    use std::io::Write as _;
    let mut set = prost_types::FileDescriptorSet::default();
    for bytes in [eventfold_proto::FILE_DESCRIPTOR_SET, tonic_types::pb::FILE_DESCRIPTOR_SET] {
        let more = prost_types::FileDescriptorSet::decode(bytes).expect("a descriptor set");
        for file in more.file {
            if !set.file.iter().any(|f| f.name == file.name) {
                set.file.push(file);
            }
        }
    }
    let mut file = tempfile::NamedTempFile::new().expect("a temporary file");
    file.write_all(&set.encode_to_vec()).expect("write the protoset");
    file
}

/// A step of a README walkthrough: its comment and its shell commands.
#[derive(Debug)]
pub struct Step {
    pub comment: String,
    pub script: String,
}

/// The ```sh blocks of the README's section `title`, cut into steps at
/// each comment that follows a command (a comment of several lines is one).
pub fn readme_steps(title: &str) -> Vec<Step> {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md")).expect("README");
    let section = readme.split(&format!("\n## {title}\n")).nth(1).unwrap_or_else(|| panic!("{title} in README.md"));
    let section = section.split("\n## ").next().unwrap_or_default();
    let blocks: Vec<&str> = section.split("```sh\n").skip(1).filter_map(|b| b.split("\n```").next()).collect();
    assert!(!blocks.is_empty(), "no ```sh block in {title}");
    let mut steps: Vec<Step> = Vec::new();
    for line in blocks.iter().flat_map(|block| block.lines()) {
        if let Some(comment) = line.strip_prefix("# ") {
            match steps.last_mut() {
                Some(step) if step.script.is_empty() => {
                    step.comment.push(' ');
                    step.comment.push_str(comment);
                }
                _ => steps.push(Step { comment: comment.to_owned(), script: String::new() }),
            }
        } else if !line.trim().is_empty() {
            let step = steps.last_mut().expect("a comment before the first command");
            step.script.push_str(line);
            step.script.push('\n');
        }
    }
    steps
}

/// A Schema Registry stand-in with every Avro schema and proto file of the
/// catalog registered (what `eventfold schemas register` does).
pub async fn registry_with_catalog() -> eventfold_tests::registry::RegistryStandIn {
    let registry = eventfold_tests::registry::RegistryStandIn::start().await;
    eventfold_schemas::Registry::new(registry.url())
        .expect("a registry client")
        .register_catalog(
            &eventfold_schemas::Catalog::load().expect("the catalog"),
            eventfold_proto::FILE_DESCRIPTOR_SET,
        )
        .await
        .expect("register the schemas");
    registry
}
