//! Shared setup of the query side's end-to-end tests: the event store, the
//! command and the query services on one server (as `eventfold dev` serves
//! them), every projection running, with the cache invalidator when the
//! cache is on.

// Each test binary uses a different part of the harness.
#![allow(dead_code, unreachable_pub)]

use std::{sync::Arc, time::Duration};

use eventfold_platform::{runtime::CancellationToken, server::GrpcServer};
use eventfold_projector::{Projector, ProjectorOptions};
use eventfold_proto::{
    orders::order_command_service_client::OrderCommandServiceClient,
    query::order_query_service_client::OrderQueryServiceClient,
};
use eventfold_query::{Invalidator, Query};
use eventfold_store::{Database, EventLog, PostgresConfig, PostgresEventLog, Upcasting};
use eventfold_tests::TestDatabase;
use tokio::net::TcpListener;
use tokio_util::sync::DropGuard;
use tonic::transport::Channel;

pub struct Stack {
    pub orders: OrderCommandServiceClient<Channel>,
    pub queries: OrderQueryServiceClient<Channel>,
    pub channel: Channel,
    pub log: Arc<dyn EventLog>,
    pub query: Arc<Query>,
    pub invalidator: Option<Arc<Invalidator>>,
    pub database: Database,
    pub stop_projectors: CancellationToken,
    _db: TestDatabase,
    _shutdown: DropGuard,
}

/// How the projectors of the stack run: small, quick batches.
/// The cache of `config`, over a Redis client made the way every process
/// makes it (none without a URL).
pub async fn cache(config: &eventfold_query::CacheConfig) -> Option<Arc<eventfold_query::Cache>> {
    let options = config.redis()?;
    let client = eventfold_platform::runtime::redis(&options).expect("a Redis URL");
    Some(eventfold_query::Cache::new(client, config.clone()).await)
}

pub fn options() -> ProjectorOptions {
    ProjectorOptions {
        batch_size: 200,
        batch_time: Duration::from_millis(50),
        idle_poll: Duration::from_millis(200),
        ..ProjectorOptions::default()
    }
}

impl Stack {
    /// The stack on a fresh migrated database, the query side configured by
    /// `config`.
    pub async fn start(config: &eventfold_query::Config) -> Stack {
        let db = TestDatabase::migrated().await;
        let database = Database::from_url(db.url()).expect("a PostgreSQL URL");
        let store =
            PostgresEventLog::connect(database.clone(), PostgresConfig::default()).await.expect("connect the log");
        let log: Arc<dyn EventLog> = Arc::new(Upcasting::new(Arc::new(store), eventfold_command::upcasters()));
        let query = Query::connect(config, database.clone(), cache(&config.cache).await, log.clone())
            .await
            .expect("query side");
        let invalidator = query.cache().map(|cache| Invalidator::new(cache.clone()));
        let stop_projectors = CancellationToken::new();
        for projection in eventfold_projector::all() {
            let mut projector = Projector::new(database.clone(), log.clone(), projection, 1, options());
            if let Some(invalidator) = &invalidator {
                projector = projector.with_observer(invalidator.clone());
            }
            tokio::spawn(projector.run(stop_projectors.clone()));
        }
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().unwrap();
        let bus = eventfold_command::bus(log.clone(), eventfold_command::Config::default().bus_options());
        let token = CancellationToken::new();
        let mut server = GrpcServer::new();
        eventfold_eventstore::host(&mut server, &eventfold_eventstore::Config::default(), log.clone(), token.clone());
        eventfold_command::host(&mut server, &eventfold_command::Config::default(), log.clone(), bus);
        eventfold_query::host(&mut server, config, query.clone(), token.clone());
        tokio::spawn(server.serve(listener, token.clone(), Duration::from_secs(10)));
        let channel = Channel::from_shared(format!("http://{addr}")).unwrap().connect_lazy();
        Stack {
            orders: OrderCommandServiceClient::new(channel.clone()),
            queries: OrderQueryServiceClient::new(channel.clone()),
            channel,
            log,
            query,
            invalidator,
            database,
            stop_projectors,
            _db: db,
            _shutdown: token.drop_guard(),
        }
    }

    /// Waits until every projection has applied the whole log; the log's
    /// head.
    pub async fn projected(&self) -> u64 {
        let head = self.log.last_position().await.unwrap();
        for name in ["order_views", "inventory_views", "order_analytics", "account_views", "user_activity"] {
            self.query.positions().wait(name, head, Duration::from_secs(30)).await.unwrap_or_else(|at| {
                panic!("{name} stuck at {} of {head}", at.position);
            });
        }
        head
    }
}

/// `YYYY-MM-DD` of days since 1970-01-01 (civil from days, H. Hinnant).
pub fn day_string(days: i64) -> String {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}
