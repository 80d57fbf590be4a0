//! The tonic service: request validation and conversion, store calls, and
//! the one mapping of store errors to `tonic::Status` (AIP-193: an
//! `ErrorInfo` with an UPPER_SNAKE reason on every error, `BadRequest` field
//! violations for invalid arguments).

use std::{pin::Pin, sync::Arc};

use eventfold_platform::{input::system_time, runtime::CancellationToken};
use eventfold_proto::eventstore::{self as pb, event_store_service_server::EventStoreService};
use eventfold_store::{
    AllRead, AppendRequest, Direction, Error, EventFilter, EventLog, ExpectedVersion, FieldViolation, ListStreams,
    MAX_READ_COUNT, NewEvent, Snapshot, SnapshotNamespace, SnapshotQuery, StreamRead, SubscriptionMessage,
    Subscriptions, Target, check_bigint, check_stream_id, end_at_or_before,
};
use futures_util::{Stream, StreamExt};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request, Response, Status};
use uuid::Uuid;

use crate::convert::{
    decode_page_token, encode_page_token, event_to_proto, metadata_from_proto, snapshot_to_proto, stream_to_proto,
    struct_to_json,
};

pub use eventfold_platform::status::ERROR_DOMAIN;
const DEFAULT_READ_COUNT: usize = 500;
const DEFAULT_PAGE_SIZE: usize = 100;
const MAX_PAGE_SIZE: usize = 1000;
const DEFAULT_CHECKPOINT_INTERVAL: u64 = 1000;

/// The `EventStoreService` implementation.
pub struct EventStoreGrpc {
    log: Arc<dyn EventLog>,
    subscriptions: Arc<Subscriptions>,
    token: CancellationToken,
}

impl EventStoreGrpc {
    /// Serve `log`; live subscriptions end when `token` is cancelled.
    pub fn new(log: Arc<dyn EventLog>, subscriptions: Arc<Subscriptions>, token: CancellationToken) -> Self {
        Self { log, subscriptions, token }
    }
}

pub(crate) use eventfold_platform::status::{error_info, from_store as status, invalid};

fn check(violations: Vec<FieldViolation>) -> Result<(), Status> {
    if violations.is_empty() { Ok(()) } else { Err(invalid(violations)) }
}

fn stream_id(field: &str, id: &str) -> Result<(), Status> {
    check_stream_id(field, id).map_err(status)
}

fn read_count(requested: u32) -> usize {
    match requested {
        0 => DEFAULT_READ_COUNT,
        n => usize::try_from(n).unwrap_or(MAX_READ_COUNT).min(MAX_READ_COUNT),
    }
}

/// The filter of a request, checked against its bounds
/// ([`EventFilter::validate`]: at most 100 entries of 1 to 256 bytes each).
fn filter_from_proto(filter: Option<pb::EventFilter>, violations: &mut Vec<FieldViolation>) -> EventFilter {
    let filter = filter.unwrap_or_default();
    let filter = EventFilter { stream_prefixes: filter.stream_prefixes, event_types: filter.event_types };
    filter.validate("filter", violations);
    filter
}

type SubscribeStream = Pin<Box<dyn Stream<Item = Result<pb::SubscribeResponse, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl EventStoreService for EventStoreGrpc {
    async fn append(&self, request: Request<pb::AppendRequest>) -> Result<Response<pb::AppendResponse>, Status> {
        let request = request.into_inner();
        let mut violations = Vec::new();
        let expected = match request.expected {
            None => ExpectedVersion::Any,
            Some(pb::append_request::Expected::ExpectedVersion(v)) => ExpectedVersion::Exact(v),
            Some(pb::append_request::Expected::ExpectedState(s)) => match pb::ExpectedState::try_from(s) {
                Ok(pb::ExpectedState::Unspecified | pb::ExpectedState::Any) => ExpectedVersion::Any,
                Ok(pb::ExpectedState::NoStream) => ExpectedVersion::NoStream,
                Ok(pb::ExpectedState::StreamExists) => ExpectedVersion::StreamExists,
                Err(_) => {
                    violations.push(FieldViolation::new("expected_state", format!("unknown value {s}")));
                    ExpectedVersion::Any
                }
            },
        };
        let mut events = Vec::with_capacity(request.events.len());
        for (i, e) in request.events.into_iter().enumerate() {
            let event_id = if e.event_id.is_empty() {
                Uuid::now_v7()
            } else {
                Uuid::parse_str(&e.event_id).unwrap_or_else(|_| {
                    violations.push(FieldViolation::new(format!("events[{i}].event_id"), "must be a UUID"));
                    Uuid::nil()
                })
            };
            let data = match e.data {
                Some(s) => struct_to_json(s, &format!("events[{i}].data"), &mut violations),
                None => serde_json::Value::Object(Default::default()),
            };
            events.push(NewEvent {
                event_id,
                event_type: e.event_type,
                schema_version: e.schema_version.max(1),
                data,
                metadata: metadata_from_proto(e.metadata),
            });
        }
        let append = AppendRequest {
            stream_id: request.stream_id,
            expected,
            events,
            request_id: (!request.request_id.is_empty()).then_some(request.request_id),
            request_scope: None,
            fingerprint: None,
        };
        if let Err(Error::InvalidArgument(more)) = append.validate() {
            violations.extend(more.into_iter().filter(|v| !v.description.contains("nil UUID")));
        }
        check(violations)?;
        let outcome = self.log.append(append).await.map_err(status)?;
        Ok(Response::new(pb::AppendResponse {
            last_position: outcome.last_position(),
            stream_id: outcome.stream_id,
            first_version: outcome.first_version,
            next_expected_version: outcome.last_version,
            positions: outcome.positions,
            duplicate: outcome.duplicate,
        }))
    }

    async fn read_stream(
        &self,
        request: Request<pb::ReadStreamRequest>,
    ) -> Result<Response<pb::ReadStreamResponse>, Status> {
        let r = request.into_inner();
        stream_id("stream_id", &r.stream_id)?;
        let mut violations = Vec::new();
        let direction = match pb::ReadDirection::try_from(r.direction) {
            Ok(pb::ReadDirection::Backwards) => Direction::Backwards,
            Ok(_) => Direction::Forwards,
            Err(_) => {
                violations.push(FieldViolation::new("direction", format!("unknown value {}", r.direction)));
                Direction::Forwards
            }
        };
        let start_time = r.start_time.and_then(|t| system_time(t, "start_time", &mut violations));
        let end_time = r.end_time.and_then(|t| system_time(t, "end_time", &mut violations));
        if let (Some(s), Some(e)) = (start_time, end_time)
            && e <= s
        {
            violations.push(FieldViolation::new("end_time", "must be after start_time"));
        }
        check(violations)?;
        let slice = self
            .log
            .read_stream(StreamRead {
                stream_id: r.stream_id,
                direction,
                from_version: r.from_version,
                max_count: read_count(r.max_count),
                start_time,
                end_time,
                max_version: None,
            })
            .await
            .map_err(status)?;
        Ok(Response::new(pb::ReadStreamResponse {
            events: slice.events.into_iter().map(event_to_proto).collect(),
            stream_version: slice.stream_version.unwrap_or_default(),
            end_of_stream: slice.end_of_stream,
        }))
    }

    async fn read_stream_at(
        &self,
        request: Request<pb::ReadStreamAtRequest>,
    ) -> Result<Response<pb::ReadStreamAtResponse>, Status> {
        let r = request.into_inner();
        stream_id("stream_id", &r.stream_id)?;
        let mut violations = Vec::new();
        let mut read = StreamRead::forwards(r.stream_id, read_count(r.max_count));
        read.from_version = Some(r.from_version);
        match r.point {
            Some(pb::read_stream_at_request::Point::Version(v)) => {
                check_bigint("version", v, &mut violations);
                read.max_version = Some(v);
            }
            Some(pb::read_stream_at_request::Point::Time(t)) => {
                // "At or before this time": stored times are whole
                // microseconds, so the exclusive end is the first one after
                // it. Past the end of 9999 there is none: no bound at all.
                read.end_time = system_time(t, "time", &mut violations).and_then(end_at_or_before);
            }
            None => {}
        }
        check(violations)?;
        read.validate().map_err(status)?;
        let point_version = read.max_version;
        let slice = self.log.read_stream(read.clone()).await.map_err(status)?;
        let version_at = match (point_version, read.end_time) {
            (Some(v), _) => slice.stream_version.map(|current| current.min(v)),
            (None, Some(_)) => {
                // The last version stored before the point, even if this
                // page starts later.
                let mut last = read.clone();
                last.direction = Direction::Backwards;
                last.from_version = None;
                last.max_count = 1;
                self.log.read_stream(last).await.map_err(status)?.events.first().map(|e| e.version)
            }
            (None, None) => slice.stream_version,
        };
        Ok(Response::new(pb::ReadStreamAtResponse {
            has_more: !slice.end_of_stream,
            events: slice.events.into_iter().map(event_to_proto).collect(),
            version_at,
        }))
    }

    async fn read_all(&self, request: Request<pb::ReadAllRequest>) -> Result<Response<pb::ReadAllResponse>, Status> {
        let r = request.into_inner();
        let mut violations = Vec::new();
        let filter = filter_from_proto(r.filter, &mut violations);
        check(violations)?;
        let read = AllRead { after: r.from_position, max_count: read_count(r.max_count), filter };
        read.validate().map_err(status)?;
        let slice = self.log.read_all(read).await.map_err(status)?;
        Ok(Response::new(pb::ReadAllResponse {
            events: slice.events.into_iter().map(event_to_proto).collect(),
            next_position: slice.next_position,
            end_of_log: slice.end_of_log,
        }))
    }

    type SubscribeStream = SubscribeStream;

    async fn subscribe(
        &self,
        request: Request<pb::SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let r = request.into_inner();
        let mut violations = Vec::new();
        let filter = filter_from_proto(r.filter, &mut violations);
        let target = if r.stream_id.is_empty() {
            if r.from_version.is_some() {
                violations.push(FieldViolation::new("from_version", "only for a stream subscription"));
            }
            if r.from_end && r.from_position != 0 {
                violations.push(FieldViolation::new("from_end", "conflicts with from_position"));
            }
            Target::All { after: (!r.from_end).then_some(r.from_position), filter }
        } else {
            check_stream_id("stream_id", &r.stream_id).map_err(status)?;
            if !filter.is_empty() {
                violations.push(FieldViolation::new("filter", "only for a subscription to the global log"));
            }
            if r.from_position != 0 || r.from_end {
                violations.push(FieldViolation::new("from_position", "a stream subscription starts from a version"));
            }
            Target::Stream { stream_id: r.stream_id, after_version: r.from_version }
        };
        check(violations)?;
        let interval = match r.checkpoint_interval {
            0 => DEFAULT_CHECKPOINT_INTERVAL,
            n => u64::from(n),
        };
        target.validate().map_err(status)?;
        let messages = ReceiverStream::new(self.subscriptions.subscribe(target, interval)).map(|item| {
            item.map_err(status).map(|message| pb::SubscribeResponse {
                message: Some(match message {
                    SubscriptionMessage::Event(e) => pb::subscribe_response::Message::Event(event_to_proto(e)),
                    SubscriptionMessage::CaughtUp(position) => {
                        pb::subscribe_response::Message::CaughtUp(pb::CaughtUp { position })
                    }
                    SubscriptionMessage::Checkpoint(position) => {
                        pb::subscribe_response::Message::Checkpoint(pb::Checkpoint { position })
                    }
                    SubscriptionMessage::FellBehind(position) => {
                        pb::subscribe_response::Message::FellBehind(pb::FellBehind { position })
                    }
                }),
            })
        });
        Ok(Response::new(Box::pin(messages.take_until(self.token.clone().cancelled_owned()))))
    }

    async fn list_streams(
        &self,
        request: Request<pb::ListStreamsRequest>,
    ) -> Result<Response<pb::ListStreamsResponse>, Status> {
        let r = request.into_inner();
        let mut violations = Vec::new();
        let limit = match r.page_size {
            n if n < 0 => {
                violations.push(FieldViolation::new("page_size", "must not be negative"));
                0
            }
            0 => DEFAULT_PAGE_SIZE,
            n => usize::try_from(n).unwrap_or(MAX_PAGE_SIZE).min(MAX_PAGE_SIZE),
        };
        let after = if r.page_token.is_empty() {
            None
        } else {
            match decode_page_token(&r.page_token, &r.prefix, r.show_deleted) {
                Ok(after) => Some(after),
                Err(v) => {
                    violations.push(v);
                    None
                }
            }
        };
        check(violations)?;
        let page = self
            .log
            .list_streams(ListStreams {
                after,
                limit,
                prefix: (!r.prefix.is_empty()).then(|| r.prefix.clone()),
                show_deleted: r.show_deleted,
            })
            .await
            .map_err(status)?;
        Ok(Response::new(pb::ListStreamsResponse {
            streams: page.streams.iter().map(stream_to_proto).collect(),
            next_page_token: page
                .next_after
                .map(|after| encode_page_token(&after, &r.prefix, r.show_deleted))
                .unwrap_or_default(),
        }))
    }

    async fn get_stream(
        &self,
        request: Request<pb::GetStreamRequest>,
    ) -> Result<Response<pb::GetStreamResponse>, Status> {
        let r = request.into_inner();
        stream_id("stream_id", &r.stream_id)?;
        let info = self.log.stream_info(&r.stream_id).await.map_err(status)?;
        Ok(Response::new(pb::GetStreamResponse { stream: Some(stream_to_proto(&info)) }))
    }

    async fn delete_stream(
        &self,
        request: Request<pb::DeleteStreamRequest>,
    ) -> Result<Response<pb::DeleteStreamResponse>, Status> {
        let r = request.into_inner();
        stream_id("stream_id", &r.stream_id)?;
        let info = self.log.delete_stream(&r.stream_id, r.expected_version).await.map_err(status)?;
        Ok(Response::new(pb::DeleteStreamResponse { stream: Some(stream_to_proto(&info)) }))
    }

    async fn verify_stream(
        &self,
        request: Request<pb::VerifyStreamRequest>,
    ) -> Result<Response<pb::VerifyStreamResponse>, Status> {
        let r = request.into_inner();
        stream_id("stream_id", &r.stream_id)?;
        let report = self.log.verify_stream(&r.stream_id).await.map_err(status)?;
        Ok(Response::new(pb::VerifyStreamResponse {
            valid: report.is_valid(),
            events_checked: report.events_checked,
            head_hash: report.head_hash.map(|h| crate::convert::hex(&h)).unwrap_or_default(),
            first_broken: report.first_broken.map(|b| pb::BrokenLink {
                stream_id: b.stream_id,
                version: b.version,
                global_position: b.global_position,
                event_id: b.event_id.to_string(),
                stored_hash: crate::convert::hex(&b.stored),
                computed_hash: crate::convert::hex(&b.computed),
            }),
        }))
    }

    async fn branch_stream(
        &self,
        request: Request<pb::BranchStreamRequest>,
    ) -> Result<Response<pb::BranchStreamResponse>, Status> {
        let r = request.into_inner();
        let info =
            self.log.branch_stream(&r.source_stream_id, r.at_version, &r.branch_stream_id).await.map_err(status)?;
        Ok(Response::new(pb::BranchStreamResponse { stream: Some(stream_to_proto(&info)) }))
    }

    async fn save_snapshot(
        &self,
        request: Request<pb::SaveSnapshotRequest>,
    ) -> Result<Response<pb::SaveSnapshotResponse>, Status> {
        let r = request.into_inner();
        stream_id("stream_id", &r.stream_id)?;
        let mut violations = Vec::new();
        let state = match r.state {
            Some(s) => struct_to_json(s, "state", &mut violations),
            None => {
                violations.push(FieldViolation::new("state", "is required"));
                serde_json::Value::Null
            }
        };
        check(violations)?;
        // Client snapshots live apart from the command side's own, which
        // never loads them (see `SnapshotNamespace`).
        let mut snapshot = Snapshot::new(r.stream_id, SnapshotNamespace::Client, r.version, state);
        snapshot.schema_version = r.schema_version.max(1);
        let saved = self.log.save_snapshot(snapshot).await.map_err(status)?;
        Ok(Response::new(pb::SaveSnapshotResponse { snapshot: Some(snapshot_to_proto(&saved)) }))
    }

    async fn load_snapshot(
        &self,
        request: Request<pb::LoadSnapshotRequest>,
    ) -> Result<Response<pb::LoadSnapshotResponse>, Status> {
        let r = request.into_inner();
        stream_id("stream_id", &r.stream_id)?;
        let snapshot = self
            .log
            .load_snapshot(SnapshotQuery {
                stream_id: r.stream_id.clone(),
                namespace: SnapshotNamespace::Client,
                max_version: r.max_version,
                schema_version: (r.schema_version != 0).then_some(r.schema_version),
            })
            .await
            .map_err(status)?;
        match snapshot {
            Some(s) => Ok(Response::new(pb::LoadSnapshotResponse { snapshot: Some(snapshot_to_proto(&s)) })),
            None => Err(error_info(
                Code::NotFound,
                format!("stream {} has no matching snapshot", r.stream_id),
                "SNAPSHOT_NOT_FOUND",
                &[("stream", r.stream_id)],
            )),
        }
    }
}
