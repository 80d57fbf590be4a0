//! How each process is put together: the resources built once, the crates'
//! services hosted on one gRPC server, their background workers run by one
//! supervisor, and one way to serve, stop and drain. `eventfold dev` is
//! every piece in one process; each `serve X` is one of them.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context;
use eventfold_platform::{
    auth::keys::ApiKeyStore,
    readiness::Readiness,
    runtime::{Backoff, Databases, RedisOptions, Resources, Runtime},
    server::GrpcServer,
    tls::Tls,
};
use eventfold_store::{
    EventLog, FsConfig, FsEventLog, MemoryEventLog, Metered, PostgresConfig, PostgresEventLog, Upcasting,
};

use crate::embedded::DevStorage;
use tokio::net::TcpListener;

use crate::config::Config;

/// The admin listener of `eventfold dev` when `[admin] listen` is unset.
const DEV_ADMIN: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 9464);

/// The REST gateway of `eventfold dev` when `[gateway] listen` is unset.
const DEV_REST: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 8080);

/// The REST gateway of `eventfold serve gateway` when `[gateway] listen` is
/// unset.
const SERVE_REST: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 8080);

/// Waits of every supervised worker: restarts after 100 ms, 200 ms, … 30 s.
fn restart_backoff() -> Backoff {
    Backoff::new(Duration::from_millis(100), Duration::from_secs(30))
}

/// One eventfold process: its configuration, its resources, its tasks.
pub(crate) struct Process {
    config: Config,
    resources: Resources,
    runtime: Runtime,
    /// The API keys of the database, built on first use: the
    /// ApiKeyService and the authentication layer share it (and its cache).
    api_key_store: std::sync::OnceLock<ApiKeyStore>,
    /// `[tls]`: the certificates of the listeners and of calls to other
    /// services, reloaded when their files change.
    tls: Option<Arc<Tls>>,
    /// The dependencies the process needs (`/readyz`, the gRPC server's
    /// overall health).
    readiness: Readiness,
}

impl Process {
    /// Builds the resources of `config` (lazily connected pools; the Redis
    /// client only for a process that `caches`: it starts connecting at once)
    /// and stops on SIGTERM/SIGINT.
    pub(crate) fn new(config: Config, caches: bool) -> anyhow::Result<Self> {
        let tls = Tls::load(&config.tls).map_err(|e| eventfold_platform::Error::Config(e.to_string()))?;
        let redis = if caches { config.query.cache.redis() } else { None };
        let redis = redis.map(|options| RedisOptions { tls: tls.clone(), ..options });
        let resources = Resources::open(&config.database, config.query.pool_size, redis.as_ref())?;
        let runtime = Runtime::new();
        runtime.cancel_on_signal();
        if let Some(tls) = &tls {
            runtime.spawn("TLS reload", tls.clone().watch(runtime.token().clone()));
        }
        let readiness = Readiness::new();
        if let Some(databases) = &resources.database {
            let database = databases.main.clone();
            readiness.add("postgresql", config.admin.requires("postgresql"), move || {
                let database = database.clone();
                async move { database.check().await.map_err(|e| e.to_string()) }
            });
        }
        if let Some(redis) = &resources.redis {
            let redis = redis.clone();
            readiness.add("redis", config.admin.requires("redis"), move || {
                let redis = redis.clone();
                async move { eventfold_platform::runtime::redis_answers(&redis).await }
            });
        }
        Ok(Self { config, resources, runtime, api_key_store: std::sync::OnceLock::new(), tls, readiness })
    }

    /// The brokers and the registry join the dependencies (the relay, the
    /// Kafka-fed projectors).
    fn needs_kafka(&self, registry_url: &str) -> anyhow::Result<()> {
        let consumer = eventfold_bus::ConsumerConfig {
            brokers: self.config.relay.brokers.clone(),
            tls: self.broker_tls()?,
            ..Default::default()
        };
        self.readiness.add("kafka", self.config.admin.requires("kafka"), move || {
            let consumer = consumer.clone();
            async move { eventfold_bus::check_brokers(&consumer).await.map_err(|e| e.to_string()) }
        });
        let registry = Arc::new(eventfold_schemas::Registry::new(registry_url)?);
        self.readiness.add("registry", self.config.admin.requires("registry"), move || {
            let registry = registry.clone();
            async move { registry.check().await.map_err(|e| e.to_string()) }
        });
        Ok(())
    }

    pub(crate) fn config(&self) -> &Config {
        &self.config
    }

    /// The TLS of the connections to the brokers: `[relay] tls` with the
    /// CAs (and certificate) of `[tls]`.
    pub(crate) fn broker_tls(&self) -> anyhow::Result<eventfold_bus::BrokerTls> {
        if !self.config.relay.tls {
            return Ok(eventfold_bus::BrokerTls::default());
        }
        match self.tls.as_ref().and_then(|tls| tls.plain_client_config()) {
            Some(config) => Ok(eventfold_bus::BrokerTls::new(config)),
            None => Err(eventfold_platform::Error::Config(
                "relay.tls = true needs tls.ca_file (the CAs of the brokers' certificates)".to_owned(),
            )
            .into()),
        }
    }

    pub(crate) fn databases(&self) -> anyhow::Result<&Databases> {
        Ok(self.resources.databases()?)
    }

    /// The event log on PostgreSQL, as every service reads it.
    pub(crate) async fn postgres_log(&self) -> anyhow::Result<Arc<dyn EventLog>> {
        let database = &self.config.database;
        let pg = PostgresConfig {
            writers: database.writers,
            request_retention: Duration::from_secs(database.request_retention_hours.saturating_mul(3600)),
            ..PostgresConfig::default()
        };
        Ok(upcasting(Arc::new(PostgresEventLog::connect(self.databases()?.store.clone(), pg).await?)))
    }

    /// Everything in one process: on PostgreSQL with the read side when a
    /// database is configured (or the private cluster runs), else on the
    /// file-system log or in memory, without the read side.
    pub(crate) async fn dev(self, storage: &DevStorage) -> anyhow::Result<()> {
        let config = &self.config;
        let token = self.runtime.token().clone();
        let mut server = GrpcServer::new();
        let on_postgres = self.resources.database.is_some();
        let retention = Duration::from_secs(config.database.request_retention_hours.saturating_mul(3600));
        let log = if on_postgres {
            let mut admin = self.databases()?.main.connect().await?;
            eventfold_migrations::up(&mut admin).await.context("applying the migrations")?;
            self.postgres_log().await?
        } else if let DevStorage::Files { dir, .. } = storage {
            let fs = FsConfig {
                fsync: config
                    .dev
                    .fsync
                    .parse()
                    .map_err(|e| eventfold_platform::Error::Config(format!("dev.fsync {e}")))?,
                request_retention: retention,
                ..FsConfig::default()
            };
            let log = FsEventLog::open(dir.join("log"), fs)
                .await
                .with_context(|| format!("cannot open the event log in {}", dir.join("log").display()))?;
            upcasting(Arc::new(log))
        } else {
            upcasting(Arc::new(MemoryEventLog::with_request_retention(retention)))
        };
        eventfold_eventstore::host(&mut server, &config.eventstore, log.clone(), token.clone());
        let bus = eventfold_command::bus(log.clone(), config.command.bus_options());
        eventfold_command::host(&mut server, &config.command, log.clone(), bus.clone());
        if on_postgres {
            let (query, invalidator) = self.read_side(log.clone()).await?;
            self.spawn_projectors(log.clone(), invalidator)?;
            eventfold_query::host(&mut server, &config.query, query, token.clone());
            eventfold_platform::auth::keys::grpc::host(&mut server, self.api_key_store()?);
            // No bus in dev: dead letters answer FAILED_PRECONDITION there.
            eventfold_admin::host(&mut server, self.admin_service(log.clone(), false)?);
        } else {
            eventfold_query::host_unavailable(&mut server, storage.read_side_hint());
        }
        let catalog: Arc<dyn eventfold_topics::Catalog> = match storage {
            _ if on_postgres => Arc::new(eventfold_topics::PgCatalog::new(self.databases()?.main.clone())),
            DevStorage::Files { dir, .. } => Arc::new(eventfold_topics::FileCatalog::new(dir.join("topics.json"))),
            _ => Arc::new(eventfold_topics::MemoryCatalog::default()),
        };
        let fs_root = config.topics.fs_root.clone().unwrap_or_else(|| config.dev.data_dir.join("topics"));
        self.host_topics(&mut server, catalog, &fs_root).await?;
        if config.saga.enabled {
            let sagas = if on_postgres {
                self.spawn_orchestrator(bus)?;
                eventfold_saga::grpc::Sagas::postgres(self.databases()?.main.clone())
            } else {
                // The sagas live in memory beside the log: their intake reads
                // the log from its start, the orchestrator is woken by every
                // start.
                let memory = eventfold_saga::MemorySagas::new(log.clone());
                let (intake_log, intake_sagas) = (log.clone(), memory.clone());
                self.runtime.supervise("saga intake", restart_backoff(), move |token| {
                    eventfold_saga::intake::run_in_memory(intake_log.clone(), intake_sagas.clone(), token)
                });
                let repository = eventfold_saga::Repository::Memory(memory.clone());
                let orchestrator = eventfold_saga::Orchestrator::over(
                    repository.clone(),
                    config.saga.fulfilment(Arc::new(bus)),
                    config.saga.orchestrator.clone(),
                );
                self.runtime.supervise("saga orchestrator", restart_backoff(), move |token| {
                    orchestrator.clone().run(memory.started(), token)
                });
                eventfold_saga::grpc::Sagas::new(repository)
            };
            eventfold_saga::grpc::host(&mut server, &config.saga, sagas.with_changes(log.appended()), token);
        }
        let (what, storage) = match storage {
            DevStorage::Postgres(Some(postgres)) => (
                "EventStoreService and the command and query services",
                format!("{} under the data directory, with projectors and queries", postgres.describe()),
            ),
            DevStorage::Postgres(None) => (
                "EventStoreService and the command and query services",
                "PostgreSQL, with projectors and queries".to_owned(),
            ),
            DevStorage::Files { dir, why } => (
                "EventStoreService and the command services",
                format!(
                    "file-system log in {}, since {why}; no read side: the query services answer \
                     FAILED_PRECONDITION (the read side needs PostgreSQL)",
                    dir.join("log").display()
                ),
            ),
            DevStorage::Memory => {
                ("EventStoreService and the command services", "in-memory store, nothing is persisted".to_owned())
            }
        };
        let storage = storage.as_str();
        self.serve(
            server,
            config.eventstore.listen,
            (what, storage),
            config.eventstore.shutdown_grace_secs,
            (Some(DEV_ADMIN), Some(DEV_REST)),
        )
        .await
    }

    /// `eventfold serve eventstore`.
    pub(crate) async fn eventstore(self) -> anyhow::Result<()> {
        let log = self.postgres_log().await?;
        let mut server = GrpcServer::new();
        eventfold_eventstore::host(&mut server, &self.config.eventstore, log.clone(), self.runtime.token().clone());
        eventfold_platform::auth::keys::grpc::host(&mut server, self.api_key_store()?);
        eventfold_admin::host(&mut server, self.admin_service(log, true)?);
        let fs_root = self.config.topics.fs_root.clone().unwrap_or_else(|| eventfold_topics::DEFAULT_FS_ROOT.into());
        let catalog = Arc::new(eventfold_topics::PgCatalog::new(self.databases()?.main.clone()));
        self.host_topics(&mut server, catalog, &fs_root).await?;
        let grace = self.config.eventstore.shutdown_grace_secs;
        self.serve(server, self.config.eventstore.listen, ("EventStoreService", "PostgreSQL"), grace, (None, None))
            .await
    }

    /// `eventfold serve command`.
    pub(crate) async fn command(self) -> anyhow::Result<()> {
        let log = self.postgres_log().await?;
        let bus = eventfold_command::bus(log.clone(), self.config.command.bus_options());
        let mut server = GrpcServer::new();
        eventfold_command::host(&mut server, &self.config.command, log, bus);
        let grace = self.config.command.shutdown_grace_secs;
        self.serve(server, self.config.command.listen, ("command services", "PostgreSQL"), grace, (None, None)).await
    }

    /// `eventfold serve query`.
    pub(crate) async fn query(self) -> anyhow::Result<()> {
        let log = self.postgres_log().await?;
        let (query, _) = self.read_side(log).await?;
        let mut server = GrpcServer::new();
        eventfold_query::host(&mut server, &self.config.query, query, self.runtime.token().clone());
        let grace = self.config.query.shutdown_grace_secs;
        self.serve(server, self.config.query.listen, ("query services", "PostgreSQL"), grace, (None, None)).await
    }

    /// `eventfold serve saga`: the orchestrator and the SagaService.
    pub(crate) async fn saga(self) -> anyhow::Result<()> {
        let log = self.postgres_log().await?;
        let changes = log.appended();
        self.spawn_orchestrator(eventfold_command::bus(log, self.config.command.bus_options()))?;
        let sagas = eventfold_saga::grpc::Sagas::postgres(self.databases()?.main.clone()).with_changes(changes);
        let mut server = GrpcServer::new();
        eventfold_saga::grpc::host(&mut server, &self.config.saga, sagas, self.runtime.token().clone());
        let (listen, grace) = (self.config.saga.listen, self.config.eventstore.shutdown_grace_secs);
        self.serve(server, listen, ("saga orchestrator and SagaService", "PostgreSQL"), grace, (None, None)).await
    }

    /// `eventfold serve projector`.
    pub(crate) async fn projector(self) -> anyhow::Result<()> {
        let log = self.postgres_log().await?;
        let invalidator = self.cache().await.map(eventfold_query::Invalidator::new);
        let running = self.spawn_projectors(log, invalidator)?;
        println!("eventfold: {running} projectors running (PostgreSQL)");
        self.run_workers().await
    }

    /// `eventfold serve relay`.
    pub(crate) async fn relay(self) -> anyhow::Result<()> {
        let Some(registry_url) = self.config.registry.url.clone() else {
            return Err(eventfold_platform::Error::Config(
                "registry.url is required to relay (EVENTFOLD_REGISTRY__URL)".to_owned(),
            )
            .into());
        };
        self.needs_kafka(&registry_url)?;
        let log = self.postgres_log().await?;
        let encoder = eventfold_relay::AvroEncoder::new(
            eventfold_schemas::Catalog::load()?,
            eventfold_schemas::Registry::new(&registry_url)?,
        );
        let relay = eventfold_relay::Relay::new(
            self.databases()?.workers.clone(),
            log,
            Arc::new(encoder),
            eventfold_relay::Config { tls_config: self.broker_tls()?, ..self.config.relay.clone() },
        )
        .await?;
        println!("eventfold: relaying to {} (registry {registry_url})", self.config.relay.brokers.join(","));
        self.runtime.supervise("relay", restart_backoff(), move |token| relay.clone().run(token));
        self.run_workers().await
    }

    /// `eventfold serve gateway`: the REST gateway in front of the gRPC
    /// servers of `[gateway] upstream` / `[gateway.upstreams]`.
    pub(crate) async fn gateway_alone(self) -> anyhow::Result<()> {
        let config = &self.config.gateway;
        if config.upstream.is_none() && config.upstreams.is_empty() {
            return Err(eventfold_platform::Error::Config(
                "gateway.upstream (--upstream) or [gateway.upstreams] is required".to_owned(),
            )
            .into());
        }
        let listener = bind(config.listen.unwrap_or(SERVE_REST)).await?;
        let upstreams = config.upstream_channels(|url| eventfold_platform::tls::channel(url, self.tls.as_ref()))?;
        self.serve_gateway(listener, upstreams)?;
        self.run_workers().await
    }

    /// The AdminService over the process's databases and `log`, with the
    /// projections, brokers (when the platform has a `bus`) and registry
    /// the CLI would use.
    fn admin_service(&self, log: Arc<dyn EventLog>, bus: bool) -> anyhow::Result<eventfold_admin::Admin> {
        let config = &self.config;
        let databases = self.databases()?;
        let consumer = if bus && !config.relay.brokers.is_empty() {
            Some(eventfold_bus::ConsumerConfig {
                brokers: config.relay.brokers.clone(),
                tls: self.broker_tls()?,
                ..Default::default()
            })
        } else {
            None
        };
        Ok(eventfold_admin::Admin::new(eventfold_admin::AdminConfig {
            projections_database: databases.workers.clone(),
            database: databases.main.clone(),
            log,
            projections: crate::projections::known(config.saga.enabled),
            options: config.projector.options(),
            consumer,
            registry_url: config.registry.url.clone(),
            readiness: self.readiness.clone(),
        }))
    }

    /// The TopicService over the topics of `catalog` (each reopened now),
    /// `fs` topics under `fs_root`.
    async fn host_topics(
        &self,
        server: &mut GrpcServer,
        catalog: Arc<dyn eventfold_topics::Catalog>,
        fs_root: &std::path::Path,
    ) -> anyhow::Result<()> {
        let described = catalog.describe();
        let topics = eventfold_topics::Topics::open(catalog, fs_root, self.config.topics.max_topics)
            .await
            .context("opening the topics")?;
        tracing::info!(catalog = %described, "topics opened");
        eventfold_topics::host(server, topics, self.runtime.token().clone());
        Ok(())
    }

    /// The query side, and the invalidator its projectors should report to
    /// when a cache is configured.
    async fn read_side(
        &self,
        log: Arc<dyn EventLog>,
    ) -> anyhow::Result<(Arc<eventfold_query::Query>, Option<Arc<eventfold_query::Invalidator>>)> {
        let cache = self.cache().await;
        let query =
            eventfold_query::Query::connect(&self.config.query, self.databases()?.queries.clone(), cache, log).await?;
        let invalidator = query.cache().map(|cache| eventfold_query::Invalidator::new(cache.clone()));
        Ok((query, invalidator))
    }

    /// The query cache over the process's Redis client, if it has one.
    async fn cache(&self) -> Option<Arc<eventfold_query::Cache>> {
        match &self.resources.redis {
            Some(client) => Some(eventfold_query::Cache::new(client.clone(), self.config.query.cache.clone()).await),
            None => None,
        }
    }

    /// One supervised projector per projection, on its active version,
    /// following the switch of a rebuild; how many.
    fn spawn_projectors(
        &self,
        log: Arc<dyn EventLog>,
        invalidator: Option<Arc<eventfold_query::Invalidator>>,
    ) -> anyhow::Result<usize> {
        let config = &self.config;
        let observer = invalidator.map(|i| i as Arc<dyn eventfold_projector::CommitObserver>);
        let source: Option<Arc<dyn eventfold_store::EventSource>> = match config.projector.source {
            eventfold_projector::SourceKind::Log => None,
            eventfold_projector::SourceKind::Kafka => {
                let Some(registry_url) = &config.registry.url else {
                    return Err(eventfold_platform::Error::Config(
                        "projector.source = \"kafka\" needs registry.url (EVENTFOLD_REGISTRY__URL)".to_owned(),
                    )
                    .into());
                };
                let source_config = eventfold_bus::KafkaSourceConfig {
                    consumer: eventfold_bus::ConsumerConfig {
                        brokers: config.relay.brokers.clone(),
                        fetch_wait_ms: 1,
                        tls: self.broker_tls()?,
                        ..Default::default()
                    },
                    relay: config.relay.name.clone(),
                    ..Default::default()
                };
                self.needs_kafka(registry_url)?;
                let catalog = eventfold_schemas::Catalog::load()?;
                let registry = eventfold_schemas::Registry::new(registry_url)?;
                Some(eventfold_bus::KafkaSource::new(source_config, catalog, registry))
            }
        };
        let projections = crate::projections::known(config.saga.enabled);
        let database = self.databases()?.workers.clone();
        let count = projections.len();
        for projection in projections {
            let (database, log, options) = (database.clone(), log.clone(), config.projector.options());
            let attach = eventfold_projector::Attach { observer: observer.clone(), source: source.clone() };
            self.runtime.supervise(format!("projector {}", projection.name()), restart_backoff(), move |token| {
                eventfold_projector::run_active(
                    database.clone(),
                    log.clone(),
                    projection.clone(),
                    options.clone(),
                    attach.clone(),
                    Duration::from_secs(1),
                    token,
                )
            });
        }
        Ok(count)
    }

    /// The saga orchestrator on PostgreSQL, sending commands through `bus`
    /// (it polls `saga.orchestrator.poll_ms`; nothing wakes it sooner).
    fn spawn_orchestrator(&self, bus: eventfold_command::Bus) -> anyhow::Result<()> {
        let orchestrator = eventfold_saga::Orchestrator::new(
            self.databases()?.main.clone(),
            self.config.saga.fulfilment(Arc::new(bus)),
            self.config.saga.orchestrator.clone(),
        );
        let (_, wake) = tokio::sync::watch::channel(0u64);
        self.runtime.supervise("saga orchestrator", restart_backoff(), move |token| {
            orchestrator.clone().run(wake.clone(), token)
        });
        Ok(())
    }

    /// Serves `server` on `listen` (and the admin listener) until the
    /// process is told to stop, then drains calls and workers.
    async fn serve(
        &self,
        server: GrpcServer,
        listen: SocketAddr,
        (what, storage): (&str, &str),
        grace_secs: u64,
        (admin_default, rest_default): (Option<SocketAddr>, Option<SocketAddr>),
    ) -> anyhow::Result<()> {
        let mut server = server;
        // Only `eventfold dev` serves REST beside gRPC by default.
        let notice = self.authenticate(&mut server, rest_default.is_some())?;
        // `[rate_limit]`, shared through Redis when `redis_url` is set.
        // `eventfold dev`'s gateway calls from loopback: its caller's
        // address counts, unless trusted proxies are configured.
        let mut limits = self.config.rate_limit.clone();
        if rest_default.is_some() && limits.trusted_proxies.is_empty() {
            limits.trusted_proxies = vec!["127.0.0.1".to_owned(), "::1".to_owned()];
        }
        let limits = &limits;
        let redis = limits
            .redis()
            .map(|options| eventfold_platform::runtime::redis(&RedisOptions { tls: self.tls.clone(), ..options }))
            .transpose()?;
        server.rate_limit(limits, redis);
        server.tls(self.tls.clone());
        server.readiness(self.readiness.clone());
        let listener = bind(listen).await?;
        let addr = listener.local_addr()?;
        print_banner(&server, addr, what, storage, self.tls.as_deref());
        if let Some(notice) = notice {
            println!("eventfold: {notice}");
        }
        self.admin(admin_default).await?;
        self.gateway(addr, rest_default).await?;
        tracing::info!(%addr, what, "serving");
        let grace = Duration::from_secs(grace_secs);
        let token = self.runtime.token().clone();
        let stopping = tokio::spawn(async move {
            token.cancelled().await;
            tokio::time::Instant::now()
        });
        let served = server.serve(listener, self.runtime.token().clone(), grace).await;
        // Calls and workers share one grace period, from the stop request
        // (or from now, when the server failed by itself).
        self.runtime.token().cancel();
        let left = match stopping.await {
            Ok(since) => grace.saturating_sub(since.elapsed()),
            Err(_) => grace,
        };
        self.stop(left).await;
        Ok(served?)
    }

    /// How `server` authenticates: `[auth] enabled`, by default on for
    /// `serve` and off (said loudly) for `eventfold dev`, where `--auth`
    /// turns it on with an admin API key printed once. API keys are looked
    /// up in PostgreSQL when the process has a database. What `eventfold
    /// dev` says about it, to print after the banner.
    fn authenticate(&self, server: &mut GrpcServer, dev: bool) -> anyhow::Result<Option<String>> {
        use eventfold_platform::auth::{KeyVerifier, dev::DevAdminKey};
        let auth = &self.config.auth;
        if !auth.enabled.unwrap_or(!dev) {
            tracing::warn!("authentication is OFF: every caller may call every RPC");
            server.authenticate(auth, false, None);
            let notice = "authentication is OFF: every caller may call every RPC (--auth turns it on)";
            return Ok(dev.then(|| notice.to_owned()));
        }
        let mut keys: Option<Arc<dyn KeyVerifier>> = self.api_keys()?;
        let mut notice = None;
        if dev {
            let (key, admin) = DevAdminKey::generate(keys)?;
            notice = Some(format!("authentication on; admin API key (shown once): {key}"));
            keys = Some(Arc::new(admin));
        }
        server.authenticate(auth, true, keys);
        Ok(notice)
    }

    /// The API keys of the process's database, if it has one.
    fn api_keys(&self) -> anyhow::Result<Option<Arc<dyn eventfold_platform::auth::KeyVerifier>>> {
        if self.resources.database.is_none() {
            return Ok(None);
        }
        Ok(Some(Arc::new(self.api_key_store()?)))
    }

    /// The API keys of the process's database (one store per process).
    fn api_key_store(&self) -> anyhow::Result<ApiKeyStore> {
        if let Some(store) = self.api_key_store.get() {
            return Ok(store.clone());
        }
        let store = ApiKeyStore::new(self.databases()?.main.clone());
        Ok(self.api_key_store.get_or_init(|| store).clone())
    }

    /// Runs the supervised workers (and the admin listener) until the
    /// process is told to stop, then drains them.
    async fn run_workers(&self) -> anyhow::Result<()> {
        self.admin(None).await?;
        self.runtime.token().cancelled().await;
        self.stop(self.config.grace()).await;
        Ok(())
    }

    /// Cancels every task and waits for them for at most `grace`.
    async fn stop(&self, grace: Duration) {
        if self.runtime.shutdown(grace).await {
            tracing::info!("stopped");
        }
    }

    /// The REST gateway at `[gateway] listen`, else at `default` (for
    /// `eventfold dev`; another free port when that one is taken), in front
    /// of the gRPC services at `upstream`.
    async fn gateway(&self, upstream: SocketAddr, default: Option<SocketAddr>) -> anyhow::Result<()> {
        let listener = match (self.config.gateway.listen, default) {
            (Some(addr), _) => bind(addr).await?,
            (None, Some(addr)) => match TcpListener::bind(addr).await {
                Ok(listener) => listener,
                Err(_) => bind(SocketAddr::new(addr.ip(), 0)).await?,
            },
            (None, None) => return Ok(()),
        };
        let upstream = if upstream.ip().is_unspecified() {
            SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), upstream.port())
        } else {
            upstream
        };
        // Over TLS when the gRPC server speaks it: the certificate must name
        // the address the gateway dials (127.0.0.1 when it listens on all).
        let scheme = if self.tls.as_ref().is_some_and(|tls| tls.serves()) { "https" } else { "http" };
        let channel =
            eventfold_platform::tls::channel(&format!("{scheme}://{upstream}"), self.tls.as_ref()).map_err(|e| {
                eventfold_platform::Error::Config(format!("the REST gateway cannot call the gRPC server: {e}"))
            })?;
        self.serve_gateway(listener, eventfold_gateway::Upstreams::all(channel))
    }

    /// Serves the REST gateway on `listener` until the process stops.
    fn serve_gateway(&self, listener: TcpListener, upstreams: eventfold_gateway::Upstreams) -> anyhow::Result<()> {
        let addr = listener.local_addr()?;
        let gateway = eventfold_gateway::Gateway::new(
            eventfold_proto::FILE_DESCRIPTOR_SET,
            upstreams,
            self.config.gateway.options(),
        )?;
        let tls = self.tls.clone().filter(|tls| tls.serves());
        let scheme = if tls.is_some() { "https" } else { "http" };
        println!("eventfold: REST on {scheme}://{addr} ({} operations)", gateway.bindings().len());
        let token = self.runtime.token().clone();
        let router = gateway.router();
        self.runtime.spawn("REST gateway", async move {
            if let Err(e) = eventfold_platform::admin::serve_tls(listener, tls, router, token).await {
                tracing::error!(error = %e, "REST gateway failed");
            }
        });
        Ok(())
    }

    /// The admin HTTP listener at `[admin] listen`, else at `default` (for
    /// `eventfold dev`; another free port when that one is taken).
    /// The readiness prober starts here too (the gRPC server's health
    /// follows it with or without the listener).
    async fn admin(&self, default: Option<SocketAddr>) -> anyhow::Result<()> {
        let interval = Duration::from_millis(self.config.admin.readiness_interval_ms.max(100));
        self.runtime.spawn("readiness", self.readiness.clone().run(interval, self.runtime.token().clone()));
        let listener = match (self.config.admin.listen, default) {
            (Some(addr), _) => bind(addr).await?,
            (None, Some(addr)) => match TcpListener::bind(addr).await {
                Ok(listener) => listener,
                Err(_) => bind(SocketAddr::new(addr.ip(), 0)).await?,
            },
            (None, None) => return Ok(()),
        };
        let addr = listener.local_addr()?;
        println!("eventfold: admin on http://{addr} (/healthz, /readyz, /metrics)");
        let token = self.runtime.token().clone();
        let routes = eventfold_platform::admin::routes(token.clone(), self.readiness.clone());
        self.runtime.spawn("admin listener", async move {
            if let Err(e) = eventfold_platform::admin::serve(listener, routes, token).await {
                tracing::error!(error = %e, "admin listener failed");
            }
        });
        Ok(())
    }
}

/// The log as every service reads it: old event versions upcast, appends
/// counted and timed.
fn upcasting(log: Arc<dyn EventLog>) -> Arc<dyn EventLog> {
    Arc::new(Upcasting::new(Metered::new(log), eventfold_command::upcasters()))
}

async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).await.with_context(|| format!("cannot listen on {addr}"))
}

/// What the server hosts and how to try it.
fn print_banner(server: &GrpcServer, addr: SocketAddr, what: &str, storage: &str, tls: Option<&Tls>) {
    let commands = server.hosts("eventfold.orders.");
    let queries = server.hosts("eventfold.query.");
    let over = match tls {
        Some(tls) if tls.mutual() => " over mutual TLS",
        Some(tls) if tls.serves() => " over TLS",
        _ => "",
    };
    println!("eventfold: {what} listening on {addr}{over} ({storage})");
    // grpcurl's flags for this server: the CA (and a client certificate).
    let flags = match tls {
        Some(tls) if tls.mutual() => "-cacert ca.crt -cert client.crt -key client.key",
        Some(tls) if tls.serves() => "-cacert ca.crt",
        _ => "-plaintext",
    };
    println!("  try: grpcurl {flags} {addr} list");
    if commands {
        let order = r#"{"order_id":"o-1","customer_id":"c-1","currency":"EUR","items":[{"product_id":"sku-1","quantity":2,"unit_price":{"minor":1250,"currency":"EUR"}}]}"#;
        println!("       grpcurl {flags} -d '{order}' {addr} eventfold.orders.v1.OrderCommandService/CreateOrder");
    }
    if queries {
        println!(
            "       grpcurl {flags} -d '{{\"order_id\":\"o-1\"}}' {addr} eventfold.query.v1.OrderQueryService/GetOrder"
        );
    } else if commands {
        println!("  (read models and queries run with a database: eventfold dev --database-url postgresql://…)");
    }
}
