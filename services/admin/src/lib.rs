//! `eventfold.admin.v1.AdminService`: operating the platform over gRPC
//! (and REST through the gateway). Every RPC is one call of the library
//! functions the CLI calls too (`eventfold_projector::admin`, the dead
//! letters of `eventfold_bus`, `eventfold_relay::checkpoints`), so the
//! service and `eventfold projections …` / `eventfold dlq …` cannot drift
//! apart. This is its edge: requests are checked here (names, topics and
//! consumers against documented bounds) and every error becomes its status
//! in one place, without database or broker text.

// Request values reach this crate: arithmetic is checked or saturating,
// casts that may wrap are refused, and nothing panics on `unwrap`/`expect`
// (tests may).
#![cfg_attr(
    not(test),
    warn(clippy::arithmetic_side_effects, clippy::cast_possible_wrap, clippy::unwrap_used, clippy::expect_used)
)]

use std::{
    collections::HashSet,
    sync::{Arc, Mutex},
    time::Duration,
};

use eventfold_bus::{ConsumerConfig, Decoder};
use eventfold_platform::{
    readiness::Readiness,
    server::GrpcServer,
    status::{self, error_info, invalid_argument},
};
use eventfold_projector::{Projection, ProjectorOptions, Status as ProjectionStatus, admin};
use eventfold_proto::admin::{
    self as pb,
    admin_service_server::{AdminService, AdminServiceServer},
};
use eventfold_store::{Database, EventLog};
use tonic::{Code, Request, Response, Status};

/// The gRPC names of the service, as health and reflection know them.
pub const SERVICE_NAMES: &[&str] = &["eventfold.admin.v1.AdminService"];

/// Longest projection name accepted.
pub const MAX_NAME_BYTES: usize = 64;
/// Longest topic name accepted (Kafka's own limit).
pub const MAX_TOPIC_BYTES: usize = 249;
/// Longest consumer name accepted.
pub const MAX_CONSUMER_BYTES: usize = 255;
/// Most parked events one ListParkedEvents answers.
pub const MAX_PARKED_LISTED: usize = 1000;

/// How often the service's health follows the database.
const HEALTH_INTERVAL: Duration = Duration::from_secs(5);

/// What the service works on: the same things the CLI is given.
pub struct AdminConfig {
    /// The pool the projectors write with (rebuilds, resets, replays).
    pub projections_database: Database,
    /// The pool of everything else (dead letters, relay checkpoints).
    pub database: Database,
    /// The event log, as the projectors read it.
    pub log: Arc<dyn EventLog>,
    /// Every projection the platform runs.
    pub projections: Vec<Arc<dyn Projection>>,
    /// The projectors' options (a rebuild takes larger batches).
    pub options: ProjectorOptions,
    /// The brokers of the Kafka consumers; `None`: no Kafka configured.
    pub consumer: Option<ConsumerConfig>,
    /// The schema registry the dead letters are decoded with, if any.
    pub registry_url: Option<String>,
    /// The dependencies of the hosting process.
    pub readiness: Readiness,
}

/// The service (cloning shares it).
#[derive(Clone)]
pub struct Admin {
    inner: Arc<Inner>,
}

struct Inner {
    config: AdminConfig,
    /// Projections a rebuild of this process is building.
    rebuilding: Mutex<HashSet<&'static str>>,
}

impl Admin {
    pub fn new(config: AdminConfig) -> Self {
        Self { inner: Arc::new(Inner { config, rebuilding: Mutex::default() }) }
    }
}

/// Hosts the AdminService on `server`, its health following the database.
pub fn host(server: &mut GrpcServer, admin: Admin) {
    let database = admin.inner.config.database.clone();
    server.add_service(eventfold_proto::FILE_DESCRIPTOR_SET, AdminServiceServer::new(admin));
    server.health_check(SERVICE_NAMES, HEALTH_INTERVAL, move || {
        let database = database.clone();
        async move { database.check().await.map_err(|e| e.to_string()) }
    });
}

// --- errors --------------------------------------------------------------------

fn projector_error(error: eventfold_projector::Error) -> Status {
    status::unavailable("the projections' database", &error)
}

fn bus_error(error: eventfold_bus::Error) -> Status {
    match error {
        eventfold_bus::Error::Broker(_) => status::unavailable("the Kafka brokers", &error),
        eventfold_bus::Error::NotAProjection(consumer) => error_info(
            Code::FailedPrecondition,
            format!(
                "consumer {consumer:?} is no Kafka-fed projection: only its own handler can replay its dead letters"
            ),
            "NOT_A_PROJECTION",
            &[("consumer", consumer)],
        ),
        other => status::unavailable("the database", &other),
    }
}

fn relay_error(error: eventfold_relay::Error) -> Status {
    status::unavailable("the database", &error)
}

// --- requests ------------------------------------------------------------------

/// A projection name: 1 to [`MAX_NAME_BYTES`] bytes of `a-z`, `0-9`, `_`.
fn check_name(name: &str) -> Result<(), Status> {
    let valid = !name.is_empty()
        && name.len() <= MAX_NAME_BYTES
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if valid {
        return Ok(());
    }
    Err(invalid_argument([(
        "name".to_owned(),
        format!("a projection name: 1 to {MAX_NAME_BYTES} bytes of a-z, 0-9 and _"),
    )]))
}

/// A Kafka topic: 1 to [`MAX_TOPIC_BYTES`] bytes of `a-z`, `A-Z`, `0-9`,
/// `.`, `_`, `-`.
fn check_topic(topic: &str) -> Result<(), Status> {
    let valid = !topic.is_empty()
        && topic.len() <= MAX_TOPIC_BYTES
        && topic.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if valid {
        return Ok(());
    }
    Err(invalid_argument([(
        "topic".to_owned(),
        format!("a Kafka topic: 1 to {MAX_TOPIC_BYTES} bytes of a-z, A-Z, 0-9, '.', '_' and '-'"),
    )]))
}

/// A consumer name: at most [`MAX_CONSUMER_BYTES`] bytes, no control
/// characters (empty: every consumer).
fn check_consumer(consumer: &str) -> Result<(), Status> {
    if consumer.len() <= MAX_CONSUMER_BYTES && !consumer.chars().any(char::is_control) {
        return Ok(());
    }
    Err(invalid_argument([(
        "consumer".to_owned(),
        format!("at most {MAX_CONSUMER_BYTES} bytes, no control characters"),
    )]))
}

impl Inner {
    /// The projection named `name`, or NOT_FOUND naming the known ones.
    fn projection(&self, name: &str) -> Result<Arc<dyn Projection>, Status> {
        check_name(name)?;
        if let Some(projection) = self.config.projections.iter().find(|p| p.name() == name) {
            return Ok(projection.clone());
        }
        let known: Vec<&str> = self.config.projections.iter().map(|p| p.name()).collect();
        Err(error_info(
            Code::NotFound,
            format!("no projection {name:?}; known: {}", known.join(", ")),
            "PROJECTION_NOT_FOUND",
            &[("name", name.to_owned()), ("known", known.join(","))],
        ))
    }

    /// Every version of every projection (of `name` only, when given), with
    /// its lag behind the head of the log.
    async fn projections(&self, name: Option<&str>) -> Result<(Vec<pb::Projection>, u64), Status> {
        let head = self.config.log.last_position().await.map_err(status::from_store)?;
        let statuses = admin::status(&self.config.projections_database).await.map_err(projector_error)?;
        let projections =
            statuses.iter().filter(|s| name.is_none_or(|n| s.name == n)).map(|s| projection_pb(s, head)).collect();
        Ok((projections, head))
    }

    /// The Kafka consumers' configuration, or FAILED_PRECONDITION.
    fn consumer(&self) -> Result<&ConsumerConfig, Status> {
        self.config.consumer.as_ref().ok_or_else(|| {
            error_info(
                Code::FailedPrecondition,
                "no Kafka brokers are configured (relay.brokers): there are no dead letters to work on",
                "KAFKA_NOT_CONFIGURED",
                &[],
            )
        })
    }
}

fn projection_pb(status: &ProjectionStatus, head: u64) -> pb::Projection {
    pb::Projection {
        name: status.name.clone(),
        version: status.version,
        active: status.active,
        position: status.position,
        lag_events: head.saturating_sub(status.position),
        events_applied: status.events_applied,
        parked_events: status.parked,
        stopped: status.stopped,
    }
}

/// Takes `name` out of the running rebuilds when dropped.
struct Rebuilding {
    inner: Arc<Inner>,
    name: &'static str,
}

impl Drop for Rebuilding {
    fn drop(&mut self) {
        self.inner.rebuilding.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(self.name);
    }
}

#[tonic::async_trait]
impl AdminService for Admin {
    async fn list_projections(
        &self,
        _request: Request<pb::ListProjectionsRequest>,
    ) -> Result<Response<pb::ListProjectionsResponse>, Status> {
        let (projections, head_position) = self.inner.projections(None).await?;
        Ok(Response::new(pb::ListProjectionsResponse { projections, head_position }))
    }

    async fn rebuild_projection(
        &self,
        request: Request<pb::RebuildProjectionRequest>,
    ) -> Result<Response<pb::RebuildProjectionResponse>, Status> {
        let projection = self.inner.projection(&request.get_ref().name)?;
        let name = projection.name();
        if !self.inner.rebuilding.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(name) {
            return Err(error_info(
                Code::Aborted,
                format!("a rebuild of {name} is running in this process; wait for it (ListProjections shows it)"),
                "REBUILD_RUNNING",
                &[("name", name.to_owned())],
            ));
        }
        let guard = Rebuilding { inner: self.inner.clone(), name };
        let config = &self.inner.config;
        let (database, log, options) =
            (config.projections_database.clone(), config.log.clone(), config.options.clone());
        // Its own task: a cancelled call does not stop it half-way.
        let rebuild = tokio::spawn(async move {
            let _guard = guard;
            admin::rebuild(&database, log, projection, options, |_| {}).await
        });
        let rebuilt = rebuild
            .await
            .map_err(|e| status::internal(&format!("the rebuild of {name} stopped: {e}")))?
            .map_err(projector_error)?;
        tracing::info!(projection = name, version = rebuilt.version, elapsed = ?rebuilt.elapsed, "projection rebuilt");
        let (projections, _) = self.inner.projections(Some(name)).await?;
        let projection = projections.into_iter().find(|p| p.version == rebuilt.version);
        Ok(Response::new(pb::RebuildProjectionResponse {
            projection,
            elapsed: prost_types::Duration::try_from(rebuilt.elapsed).ok(),
        }))
    }

    async fn stop_projection(
        &self,
        request: Request<pb::StopProjectionRequest>,
    ) -> Result<Response<pb::StopProjectionResponse>, Status> {
        let name = self.inner.projection(&request.get_ref().name)?.name();
        admin::set_stopped(&self.inner.config.projections_database, name, true).await.map_err(projector_error)?;
        let (projections, _) = self.inner.projections(Some(name)).await?;
        Ok(Response::new(pb::StopProjectionResponse { projections }))
    }

    async fn start_projection(
        &self,
        request: Request<pb::StartProjectionRequest>,
    ) -> Result<Response<pb::StartProjectionResponse>, Status> {
        let name = self.inner.projection(&request.get_ref().name)?.name();
        admin::set_stopped(&self.inner.config.projections_database, name, false).await.map_err(projector_error)?;
        let (projections, _) = self.inner.projections(Some(name)).await?;
        Ok(Response::new(pb::StartProjectionResponse { projections }))
    }

    async fn reset_projection(
        &self,
        request: Request<pb::ResetProjectionRequest>,
    ) -> Result<Response<pb::ResetProjectionResponse>, Status> {
        let projection = self.inner.projection(&request.get_ref().name)?;
        let name = projection.name();
        let version = admin::reset(&self.inner.config.projections_database, projection.as_ref())
            .await
            .map_err(projector_error)?;
        tracing::info!(projection = name, ?version, "projection reset");
        let (projections, _) = self.inner.projections(Some(name)).await?;
        let projection = version.and_then(|v| projections.into_iter().find(|p| p.version == v));
        Ok(Response::new(pb::ResetProjectionResponse { projection }))
    }

    async fn list_parked_events(
        &self,
        request: Request<pb::ListParkedEventsRequest>,
    ) -> Result<Response<pb::ListParkedEventsResponse>, Status> {
        let name = self.inner.projection(&request.get_ref().name)?.name();
        let parked = admin::parked(&self.inner.config.projections_database, name).await.map_err(projector_error)?;
        let truncated = parked.len() > MAX_PARKED_LISTED;
        let parked_events = parked
            .into_iter()
            .take(MAX_PARKED_LISTED)
            .map(|p| pb::ParkedEvent {
                version: p.version,
                global_position: p.position,
                stream_id: p.stream_id,
                event_type: p.event_type,
                attempts: p.attempts,
                error: p.error,
                replayed: p.replayed,
            })
            .collect();
        Ok(Response::new(pb::ListParkedEventsResponse { parked_events, truncated }))
    }

    async fn replay_parked_events(
        &self,
        request: Request<pb::ReplayParkedEventsRequest>,
    ) -> Result<Response<pb::ReplayParkedEventsResponse>, Status> {
        let projection = self.inner.projection(&request.get_ref().name)?;
        let config = &self.inner.config;
        let replayed =
            admin::replay(&config.projections_database, config.log.clone(), projection, config.options.clone())
                .await
                .map_err(projector_error)?;
        Ok(Response::new(match replayed {
            Some(r) => pb::ReplayParkedEventsResponse {
                version: r.version,
                applied: u64::try_from(r.applied).unwrap_or(u64::MAX),
                still_parked: r.left,
            },
            None => pb::ReplayParkedEventsResponse::default(),
        }))
    }

    async fn list_dead_letters(
        &self,
        request: Request<pb::ListDeadLettersRequest>,
    ) -> Result<Response<pb::ListDeadLettersResponse>, Status> {
        let topic = &request.get_ref().topic;
        check_topic(topic)?;
        let consumer = self.inner.consumer()?;
        let letters =
            eventfold_bus::dead_letters(consumer, &self.inner.config.database, topic).await.map_err(bus_error)?;
        let dead_letters = letters
            .iter()
            .map(|letter| {
                let (origin_topic, origin_partition, origin_offset) = letter.origin();
                pb::DeadLetter {
                    offset: letter.offset,
                    origin_topic,
                    origin_partition,
                    origin_offset,
                    consumer: letter.consumer().to_owned(),
                    error: letter.error().to_owned(),
                    replayed: letter.replayed,
                    dead_letter_time: Some(std::time::SystemTime::from(letter.message.timestamp).into()),
                }
            })
            .collect();
        Ok(Response::new(pb::ListDeadLettersResponse { dead_letters }))
    }

    async fn replay_dead_letters(
        &self,
        request: Request<pb::ReplayDeadLettersRequest>,
    ) -> Result<Response<pb::ReplayDeadLettersResponse>, Status> {
        let pb::ReplayDeadLettersRequest { topic, consumer: only } = request.into_inner();
        check_topic(&topic)?;
        check_consumer(&only)?;
        let consumer = self.inner.consumer()?;
        let Some(registry_url) = &self.inner.config.registry_url else {
            return Err(error_info(
                Code::FailedPrecondition,
                "no schema registry is configured (registry.url): dead letters cannot be decoded",
                "REGISTRY_NOT_CONFIGURED",
                &[],
            ));
        };
        let database = &self.inner.config.database;
        let consumers = if only.is_empty() {
            eventfold_bus::pending_consumers(consumer, database, &topic).await.map_err(bus_error)?
        } else {
            vec![only]
        };
        let catalog = eventfold_schemas::Catalog::load().map_err(|e| status::internal(&e))?;
        let registry = eventfold_schemas::Registry::new(registry_url).map_err(|e| status::internal(&e))?;
        let decoder = Arc::new(Decoder::new(catalog, registry));
        let mut replays = Vec::with_capacity(consumers.len());
        for name in consumers {
            let replayed = eventfold_bus::replay_projection(consumer, database, &topic, &name, decoder.clone())
                .await
                .map_err(bus_error)?;
            replays.push(pb::ConsumerReplay {
                consumer: name,
                applied: u64::try_from(replayed.applied).unwrap_or(u64::MAX),
                still_failing: u64::try_from(replayed.failing.len()).unwrap_or(u64::MAX),
            });
        }
        Ok(Response::new(pb::ReplayDeadLettersResponse { consumers: replays }))
    }

    async fn get_platform_status(
        &self,
        _request: Request<pb::GetPlatformStatusRequest>,
    ) -> Result<Response<pb::GetPlatformStatusResponse>, Status> {
        let (projections, head_position) = self.inner.projections(None).await?;
        let relays = eventfold_relay::checkpoints(&self.inner.config.database)
            .await
            .map_err(relay_error)?
            .into_iter()
            .map(|c| pb::RelayStatus {
                lag_events: head_position.saturating_sub(c.position),
                name: c.name,
                position: c.position,
                update_time: Some(c.updated_at.into()),
            })
            .collect();
        let readiness = &self.inner.config.readiness;
        let dependencies = readiness
            .report()
            .into_iter()
            .map(|d| pb::Dependency { name: d.name, required: d.required, up: d.up == Some(true) })
            .collect();
        Ok(Response::new(pb::GetPlatformStatusResponse {
            head_position,
            projections,
            relays,
            dependencies,
            ready: readiness.is_ready(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field_of(status: &Status) -> String {
        use tonic_types::StatusExt;
        status.get_details_bad_request().expect("BadRequest").field_violations[0].field.clone()
    }

    #[test]
    fn names_topics_and_consumers_are_checked_against_their_bounds() {
        assert!(check_name("order_views").is_ok());
        for bad in ["", "Order", "a-b", "x y", &"a".repeat(MAX_NAME_BYTES + 1), "views;drop"] {
            let refused = check_name(bad).expect_err(bad);
            assert_eq!((refused.code(), field_of(&refused)), (Code::InvalidArgument, "name".to_owned()), "{bad:?}");
        }
        assert!(check_topic("eventfold.orders.v1.dlq").is_ok());
        assert!(check_topic(&"t".repeat(MAX_TOPIC_BYTES)).is_ok());
        for bad in ["", "a/b", "a b", &"t".repeat(MAX_TOPIC_BYTES + 1)] {
            assert_eq!(field_of(&check_topic(bad).expect_err(bad)), "topic", "{bad:?}");
        }
        assert!(check_consumer("").is_ok() && check_consumer("projection:order_views:v1").is_ok());
        assert_eq!(field_of(&check_consumer("a\u{7}").expect_err("bell")), "consumer");
        assert_eq!(field_of(&check_consumer(&"c".repeat(MAX_CONSUMER_BYTES + 1)).expect_err("long")), "consumer");
    }
}
