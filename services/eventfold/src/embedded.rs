//! What `eventfold dev` keeps its data on when given no database: a
//! private PostgreSQL cluster under the data directory when the server
//! binaries are on the machine (the whole platform, read side included),
//! else the file-system log.
//!
//! The cluster is created once (`initdb`, a random password kept in the
//! data directory, readable by its owner only), started on a free loopback
//! port with password authentication, stopped when `eventfold dev` stops,
//! and reused on the next start, also when a killed `eventfold dev` left it
//! running. Run as root, it runs as the `postgres` user (PostgreSQL refuses
//! root), through `runuser`.

use std::{
    io::Write,
    os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context, bail};

/// What the data directory holds.
pub(crate) enum DevStorage {
    /// The private cluster, or the one given by `--database-url`.
    Postgres(Option<PrivatePostgres>),
    /// The file-system log in this directory.
    Files { dir: PathBuf, why: String },
    /// Nothing is kept.
    Memory,
}

/// Where the PostgreSQL server binaries are: the first directory on `PATH`
/// holding `initdb`, `pg_ctl` and `postgres`, else `pg_config --bindir`,
/// else the first of `search` (a `*` matches one path component, highest
/// version first).
pub(crate) fn find_postgres(search: &[String]) -> Option<PathBuf> {
    let complete = |dir: &Path| ["initdb", "pg_ctl", "postgres"].iter().all(|b| dir.join(b).is_file());
    let path = std::env::var_os("PATH").unwrap_or_default();
    if let Some(dir) = std::env::split_paths(&path).find(|d| complete(d)) {
        return Some(dir);
    }
    let pg_config = std::env::split_paths(&path).map(|d| d.join("pg_config")).find(|p| p.is_file());
    if let Some(pg_config) = pg_config
        && let Ok(out) = Command::new(pg_config).arg("--bindir").stderr(Stdio::null()).output()
        && out.status.success()
    {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if complete(&dir) {
            return Some(dir);
        }
    }
    search.iter().flat_map(|pattern| expand(pattern)).find(|d| complete(d))
}

/// `pattern`'s matches; a `*` component matches every entry there, the
/// highest version (numeric parts compared) first.
fn expand(pattern: &str) -> Vec<PathBuf> {
    let Some((before, after)) = pattern.split_once('*') else { return vec![PathBuf::from(pattern)] };
    let (dir, prefix) = before.rsplit_once('/').unwrap_or(("", before));
    let (suffix, rest) = after.split_once('/').map_or((after, ""), |(s, r)| (s, r));
    let Ok(entries) = std::fs::read_dir(if dir.is_empty() { "/" } else { dir }) else { return Vec::new() };
    let mut found: Vec<(Vec<u64>, PathBuf)> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let middle = name.strip_prefix(prefix)?.strip_suffix(suffix)?.to_owned();
            let version = middle.split(|c: char| !c.is_ascii_digit()).filter_map(|p| p.parse().ok()).collect();
            let path = e.path();
            Some((version, if rest.is_empty() { path } else { path.join(rest) }))
        })
        .collect();
    found.sort_by(|a, b| b.0.cmp(&a.0));
    found.into_iter().map(|(_, p)| p).collect()
}

/// Whether to run the server programs as `postgres` (we are root).
#[derive(Debug, Clone)]
enum RunAs {
    Me,
    Postgres { runuser: PathBuf, uid: u32 },
}

impl RunAs {
    fn detect() -> anyhow::Result<Self> {
        let root = std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0);
        if !root {
            return Ok(Self::Me);
        }
        let uid = Command::new("id")
            .args(["-u", "postgres"])
            .stderr(Stdio::null())
            .output()
            .ok()
            .filter(|o| o.status.success())
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .context("running as root, but there is no `postgres` user to run the private PostgreSQL as")?;
        let runuser = ["/usr/sbin/runuser", "/sbin/runuser", "/usr/bin/runuser"]
            .iter()
            .map(PathBuf::from)
            .find(|p| p.is_file())
            .context("running as root, but `runuser` is missing to run the private PostgreSQL as `postgres`")?;
        Ok(Self::Postgres { runuser, uid })
    }

    fn command(&self, program: &Path) -> Command {
        let mut command = match self {
            Self::Me => Command::new(program),
            Self::Postgres { runuser, .. } => {
                let mut command = Command::new(runuser);
                command.args(["-u", "postgres", "--"]).arg(program);
                command
            }
        };
        crate::heap::without_threshold(&mut command);
        command
    }

    /// Hand `path` to the user the server runs as.
    fn own(&self, path: &Path) -> anyhow::Result<()> {
        if let Self::Postgres { uid, .. } = self {
            std::os::unix::fs::chown(path, Some(*uid), None)
                .with_context(|| format!("cannot hand {} to the postgres user", path.display()))?;
        }
        Ok(())
    }
}

/// A PostgreSQL cluster of `eventfold dev`'s own, under its data directory.
pub(crate) struct PrivatePostgres {
    bin: PathBuf,
    cluster: PathBuf,
    run_as: RunAs,
    port: u16,
    password: String,
}

impl std::fmt::Debug for PrivatePostgres {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrivatePostgres").field("cluster", &self.cluster).field("port", &self.port).finish()
    }
}

/// Run a server program; its output goes to `log` (appended), and a
/// failure says which program and where to look, without its text (which
/// names paths).
fn run(command: &mut Command, what: &str, log: &Path) -> anyhow::Result<()> {
    let out = command.stdin(Stdio::null()).output().with_context(|| format!("cannot run {what}"))?;
    let mut file = std::fs::OpenOptions::new().create(true).append(true).open(log)?;
    file.write_all(&out.stdout)?;
    file.write_all(&out.stderr)?;
    if !out.status.success() {
        let name = log.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        bail!("{what} failed ({}; see {name} in the data directory)", out.status);
    }
    Ok(())
}

impl PrivatePostgres {
    /// Create (once) and start the cluster in `data_dir/postgres`, or take
    /// over the one a previous `eventfold dev` left running.
    pub(crate) fn start(data_dir: &Path, bin: PathBuf) -> anyhow::Result<Self> {
        let data_dir = std::path::absolute(data_dir).context("the data directory")?;
        let cluster = data_dir.join("postgres");
        let password_file = data_dir.join("postgres.password");
        let run_as = RunAs::detect()?;
        if !cluster.join("PG_VERSION").is_file() {
            std::fs::create_dir_all(&cluster).context("cannot create the cluster's directory")?;
            std::fs::set_permissions(&cluster, std::fs::Permissions::from_mode(0o700))?;
            run_as.own(&cluster)?;
            let password = uuid::Uuid::new_v4().simple().to_string();
            let mut file = std::fs::OpenOptions::new()
                .create(true)
                .truncate(true)
                .write(true)
                .mode(0o600)
                .open(&password_file)
                .context("cannot write the cluster's password file")?;
            file.write_all(password.as_bytes())?;
            drop(file);
            run_as.own(&password_file)?;
            run(
                run_as
                    .command(&bin.join("initdb"))
                    .arg("-D")
                    .arg(&cluster)
                    .args(["-U", "eventfold", "--auth=scram-sha-256", "-E", "UTF8", "--locale=C"])
                    .arg(format!("--pwfile={}", password_file.display())),
                "initdb",
                &data_dir.join("postgres.log"),
            )?;
        }
        let password = std::fs::read_to_string(&password_file)
            .context("cannot read the cluster's password file")?
            .trim()
            .to_owned();
        let mut postgres = Self { bin, cluster, run_as, port: 0, password };
        if let Some(port) = postgres.running_port() {
            postgres.port = port;
            return Ok(postgres);
        }
        postgres.port = free_port()?;
        let options = format!("-p {} -c listen_addresses=127.0.0.1 -k ''", postgres.port);
        let log = data_dir.join("postgres.log");
        if !log.exists() {
            std::fs::File::create(&log)?;
        }
        postgres.run_as.own(&log)?;
        run(
            postgres
                .run_as
                .command(&postgres.bin.join("pg_ctl"))
                .arg("-D")
                .arg(&postgres.cluster)
                .arg("-l")
                .arg(&log)
                .arg("-o")
                .arg(options)
                .args(["-w", "-t", "60", "start"]),
            "pg_ctl start",
            &log,
        )?;
        Ok(postgres)
    }

    /// The port of the cluster's server if one runs already.
    fn running_port(&self) -> Option<u16> {
        let status = self
            .run_as
            .command(&self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(&self.cluster)
            .arg("status")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .ok()?;
        if !status.success() {
            return None;
        }
        // The fourth line of postmaster.pid is the port.
        let pid = std::fs::read_to_string(self.cluster.join("postmaster.pid")).ok()?;
        pid.lines().nth(3)?.trim().parse().ok()
    }

    /// The URL of the cluster's `postgres` database (holds the password:
    /// never print it).
    pub(crate) fn url(&self) -> String {
        format!("postgresql://eventfold:{}@127.0.0.1:{}/postgres", self.password, self.port)
    }

    pub(crate) fn describe(&self) -> String {
        let version = std::fs::read_to_string(self.cluster.join("PG_VERSION")).unwrap_or_default();
        format!("private PostgreSQL {} on 127.0.0.1:{}", version.trim(), self.port)
    }

    /// Stop the server (fast shutdown: sessions end, the data is kept).
    pub(crate) fn stop(&self) {
        let stopped = run(
            self.run_as
                .command(&self.bin.join("pg_ctl"))
                .arg("-D")
                .arg(&self.cluster)
                .args(["-m", "fast", "-w", "-t", "60", "stop"]),
            "pg_ctl stop",
            &self.cluster.with_file_name("postgres.log"),
        );
        if let Err(e) = stopped {
            tracing::warn!(error = %e, "the private PostgreSQL did not stop");
        }
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// What to tell a user who has no PostgreSQL server binaries.
pub(crate) const INSTALL_HINT: &str = "the read side (projections and the query services) needs PostgreSQL, \
     and no PostgreSQL server binaries were found: install them (Debian/Ubuntu: apt-get install postgresql; \
     Fedora: dnf install postgresql-server; macOS: brew install postgresql) and start eventfold dev again, \
     or give it a server with --database-url postgresql://…";

/// What to tell a user whose private cluster did not start.
pub(crate) const CLUSTER_HINT: &str = "the read side (projections and the query services) needs PostgreSQL, \
     and eventfold dev's private PostgreSQL did not start (see postgres.log in the data directory; run as root, \
     the postgres user must be able to reach the data directory): fix that and start eventfold dev again, \
     or give it a server with --database-url postgresql://…";

/// What to tell a user of `eventfold dev --ephemeral`.
pub(crate) const EPHEMERAL_HINT: &str = "eventfold dev --ephemeral runs no read side (projections and the query \
     services need PostgreSQL): start it without --ephemeral where PostgreSQL is installed, or with \
     --database-url postgresql://…";

impl DevStorage {
    /// What the query services answer without the read side.
    pub(crate) fn read_side_hint(&self) -> &'static str {
        match self {
            Self::Files { why, .. } if why.starts_with("the private PostgreSQL") => CLUSTER_HINT,
            Self::Memory => EPHEMERAL_HINT,
            _ => INSTALL_HINT,
        }
    }
}

/// Decide where `eventfold dev` keeps its data.
pub(crate) fn choose(config: &crate::config::DevConfig, database_url: bool) -> anyhow::Result<DevStorage> {
    if database_url {
        return Ok(DevStorage::Postgres(None));
    }
    if config.ephemeral {
        return Ok(DevStorage::Memory);
    }
    let dir = config.data_dir.clone();
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create the data directory {}", dir.display()))?;
    // A data directory keeps the storage it started with: switching would
    // hide what it holds.
    let has_cluster = dir.join("postgres").join("PG_VERSION").is_file();
    if dir.join("log").is_dir() && !has_cluster {
        return Ok(DevStorage::Files { dir, why: "this data directory holds a file-system log".into() });
    }
    if !config.postgres && !has_cluster {
        return Ok(DevStorage::Files { dir, why: "dev.postgres = false".into() });
    }
    match find_postgres(&config.postgres_search) {
        None if has_cluster => bail!(
            "{} holds a PostgreSQL cluster, but no PostgreSQL server binaries were found: install them, \
             or choose another --data-dir",
            dir.display()
        ),
        None => Ok(DevStorage::Files { dir, why: "no PostgreSQL server binaries were found".into() }),
        Some(bin) => match PrivatePostgres::start(&dir, bin) {
            Ok(postgres) => Ok(DevStorage::Postgres(Some(postgres))),
            Err(e) if has_cluster => Err(e.context("the private PostgreSQL of the data directory did not start")),
            Err(e) => {
                // Nothing kept yet: the file-system log instead, said loudly.
                drop(std::fs::remove_dir_all(dir.join("postgres")));
                drop(std::fs::remove_file(dir.join("postgres.password")));
                Ok(DevStorage::Files { dir, why: format!("the private PostgreSQL did not start: {e:#}") })
            }
        },
    }
}
