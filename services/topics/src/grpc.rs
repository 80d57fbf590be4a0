//! The TopicService: requests checked and turned into topic, log and
//! callback calls; the one mapping of their errors to statuses.

use std::{pin::Pin, sync::Arc, time::Duration};

use eventfold_eventstore::{json_to_struct, struct_to_json, timestamp};
use eventfold_platform::{
    runtime::CancellationToken,
    status::{error_info, from_store, invalid, unavailable},
};
use eventfold_proto::topics::{self as pb, topic_service_server::TopicService};
use eventfold_store::{
    AllRead, AppendRequest, EventMetadata, ExpectedVersion, FieldViolation, NewEvent, RecordedEvent,
    SubscriptionMessage, Target, check_bigint, validate_stream_id,
};
use futures_util::{Stream, StreamExt};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request, Response, Status};

use crate::{
    callbacks::{self, CallbackView, Callbacks},
    spec::{RequestedTopic, TopicSpec, check_name},
    topics::{Topic, TopicError, Topics},
};

/// Most events one Publish carries.
pub const MAX_PUBLISH_EVENTS: usize = 1000;
const DEFAULT_PAGE_SIZE: usize = 100;
const MAX_PAGE_SIZE: usize = 1000;
/// The key of events published without one.
pub const DEFAULT_KEY: &str = "default";

/// The TopicService over this process's topics and callbacks.
pub struct TopicsGrpc {
    topics: Arc<Topics>,
    callbacks: Arc<Callbacks>,
    token: CancellationToken,
}

impl TopicsGrpc {
    pub fn new(topics: Arc<Topics>, callbacks: Arc<Callbacks>, token: CancellationToken) -> Self {
        Self { topics, callbacks, token }
    }
}

/// The status of a topic error.
pub fn topic_status(error: TopicError) -> Status {
    let message = error.to_string();
    match error {
        TopicError::Invalid(violations) => invalid(violations),
        TopicError::AlreadyExists(name) => {
            error_info(Code::AlreadyExists, message, "TOPIC_ALREADY_EXISTS", &[("topic", name)])
        }
        TopicError::NotFound(name) => error_info(Code::NotFound, message, "TOPIC_NOT_FOUND", &[("topic", name)]),
        TopicError::Unreachable(_) => error_info(Code::FailedPrecondition, message, "TOPIC_STORAGE_UNREACHABLE", &[]),
        TopicError::Unavailable(reason) => unavailable("the topic's storage", &reason),
        TopicError::TooMany(max) => {
            error_info(Code::ResourceExhausted, message, "TOO_MANY_TOPICS", &[("max_topics", max.to_string())])
        }
        TopicError::Catalog(e) => unavailable("the topic catalog", &e),
    }
}

fn check(violations: Vec<FieldViolation>) -> Result<(), Status> {
    if violations.is_empty() { Ok(()) } else { Err(invalid(violations)) }
}

fn topic_name(name: &str) -> Result<(), Status> {
    let mut violations = Vec::new();
    check_name("topic", name, &mut violations);
    check(violations)
}

fn topic_to_proto(spec: &TopicSpec, last_offset: u64) -> pb::Topic {
    pb::Topic {
        name: spec.name.clone(),
        adapter: spec.adapter.as_str().to_owned(),
        // Never returned: it may hold a secret.
        connection: String::new(),
        schema: spec.schema.clone(),
        table: spec.table.clone(),
        options: spec.options.clone().into_iter().collect(),
        location: spec.location(),
        create_time: Some(timestamp(eventfold_store::from_micros(spec.created_at))),
        last_offset,
    }
}

/// A topic's event as the service returns it.
pub fn event_to_proto(event: &RecordedEvent) -> pb::TopicEvent {
    pb::TopicEvent {
        offset: event.global_position,
        event_id: event.event_id.to_string(),
        event_type: event.event_type.clone(),
        key: event.stream_id.clone(),
        version: event.version,
        data: Some(json_to_struct(event.data.clone())),
        metadata: event.metadata.custom.clone().into_iter().collect(),
        publish_time: Some(timestamp(event.created_at)),
    }
}

/// A topic's event as callbacks receive it (the JSON of [`event_to_proto`]).
pub fn event_json(event: &RecordedEvent) -> serde_json::Value {
    let time = eventfold_store::to_micros(event.created_at);
    serde_json::json!({
        "offset": event.global_position.to_string(),
        "eventId": event.event_id.to_string(),
        "eventType": event.event_type,
        "key": event.stream_id,
        "version": event.version.to_string(),
        "data": event.data,
        "metadata": event.metadata.custom,
        "publishTimeMicros": time.to_string(),
    })
}

fn callback_to_proto(view: CallbackView) -> pb::Callback {
    pb::Callback {
        callback_id: view.id,
        url: view.url,
        max_batch: i32::try_from(view.max_batch).unwrap_or(i32::MAX),
        drop_after: prost_types::Duration::try_from(view.drop_after).ok(),
        secret: view.secret.unwrap_or_default(),
        cursor: view.cursor,
        failures: view.failures,
        failing_since: view.failing_since.map(timestamp),
        create_time: Some(timestamp(view.created)),
    }
}

async fn last_offset(topic: Option<&Arc<Topic>>) -> u64 {
    match topic {
        Some(topic) => topic.log.last_position().await.unwrap_or(0),
        None => 0,
    }
}

type SubscribeStream = Pin<Box<dyn Stream<Item = Result<pb::SubscribeResponse, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl TopicService for TopicsGrpc {
    async fn create_topic(
        &self,
        request: Request<pb::CreateTopicRequest>,
    ) -> Result<Response<pb::CreateTopicResponse>, Status> {
        let Some(topic) = request.into_inner().topic else {
            return Err(invalid(vec![FieldViolation::new("topic", "is required")]));
        };
        let requested = RequestedTopic {
            name: topic.name,
            adapter: topic.adapter,
            connection: topic.connection,
            schema: topic.schema,
            table: topic.table,
            options: topic.options.into_iter().collect(),
        };
        let created = self.topics.create(requested).await.map_err(topic_status)?;
        let last = last_offset(Some(&created)).await;
        Ok(Response::new(pb::CreateTopicResponse { topic: Some(topic_to_proto(&created.spec, last)) }))
    }

    async fn list_topics(
        &self,
        _request: Request<pb::ListTopicsRequest>,
    ) -> Result<Response<pb::ListTopicsResponse>, Status> {
        let mut topics = Vec::new();
        for (spec, open) in self.topics.list().await.map_err(topic_status)? {
            topics.push(topic_to_proto(&spec, last_offset(open.as_ref()).await));
        }
        Ok(Response::new(pb::ListTopicsResponse { topics }))
    }

    async fn get_topic(&self, request: Request<pb::GetTopicRequest>) -> Result<Response<pb::GetTopicResponse>, Status> {
        let name = request.into_inner().topic;
        topic_name(&name)?;
        let topic = self.topics.get(&name).await.map_err(topic_status)?;
        let last = last_offset(Some(&topic)).await;
        Ok(Response::new(pb::GetTopicResponse { topic: Some(topic_to_proto(&topic.spec, last)) }))
    }

    async fn delete_topic(
        &self,
        request: Request<pb::DeleteTopicRequest>,
    ) -> Result<Response<pb::DeleteTopicResponse>, Status> {
        let name = request.into_inner().topic;
        topic_name(&name)?;
        self.topics.delete(&name).await.map_err(topic_status)?;
        self.callbacks.forget_topic(&name);
        Ok(Response::new(pb::DeleteTopicResponse {}))
    }

    async fn publish(&self, request: Request<pb::PublishRequest>) -> Result<Response<pb::PublishResponse>, Status> {
        let r = request.into_inner();
        let mut violations = Vec::new();
        check_name("topic", &r.topic, &mut violations);
        let key = if r.key.is_empty() { DEFAULT_KEY.to_owned() } else { r.key };
        validate_stream_id("key", &key, &mut violations);
        if r.events.is_empty() || r.events.len() > MAX_PUBLISH_EVENTS {
            violations.push(FieldViolation::new("events", format!("1 to {MAX_PUBLISH_EVENTS} events")));
        }
        if let Some(v) = r.expected_version {
            check_bigint("expected_version", v, &mut violations);
        }
        let mut events = Vec::with_capacity(r.events.len().min(MAX_PUBLISH_EVENTS));
        for (i, event) in r.events.into_iter().take(MAX_PUBLISH_EVENTS).enumerate() {
            let event_id = if event.event_id.is_empty() {
                uuid::Uuid::now_v7()
            } else {
                match uuid::Uuid::parse_str(&event.event_id) {
                    Ok(id) => id,
                    Err(_) => {
                        violations.push(FieldViolation::new(format!("events[{i}].event_id"), "must be a UUID"));
                        uuid::Uuid::now_v7()
                    }
                }
            };
            if event.event_type.is_empty()
                || event.event_type.len() > eventfold_store::MAX_NAME_LEN
                || event.event_type.chars().any(char::is_control)
            {
                violations.push(FieldViolation::new(
                    format!("events[{i}].event_type"),
                    format!("must be 1 to {} bytes, without control characters", eventfold_store::MAX_NAME_LEN),
                ));
            }
            if event.metadata.len() > eventfold_store::MAX_CUSTOM_METADATA {
                violations.push(FieldViolation::new(
                    format!("events[{i}].metadata"),
                    format!("at most {} entries", eventfold_store::MAX_CUSTOM_METADATA),
                ));
            }
            let data = struct_to_json(event.data.unwrap_or_default(), &format!("events[{i}].data"), &mut violations);
            events.push(NewEvent {
                event_id,
                event_type: event.event_type,
                schema_version: 1,
                data,
                metadata: EventMetadata { custom: event.metadata.into_iter().collect(), ..EventMetadata::default() },
            });
        }
        check(violations)?;
        let topic = self.topics.get(&r.topic).await.map_err(topic_status)?;
        let mut append =
            AppendRequest::new(key, r.expected_version.map_or(ExpectedVersion::Any, ExpectedVersion::Exact), events);
        append.request_id = (!r.request_id.is_empty()).then_some(r.request_id);
        let outcome = topic.log.append(append).await.map_err(from_store)?;
        Ok(Response::new(pb::PublishResponse {
            offsets: outcome.positions,
            first_version: outcome.first_version,
            last_version: outcome.last_version,
            duplicate: outcome.duplicate,
        }))
    }

    async fn read_events(
        &self,
        request: Request<pb::ReadEventsRequest>,
    ) -> Result<Response<pb::ReadEventsResponse>, Status> {
        let r = request.into_inner();
        let mut violations = Vec::new();
        check_name("topic", &r.topic, &mut violations);
        check_bigint("from", r.from_offset, &mut violations);
        let page_size = match r.page_size {
            0 => DEFAULT_PAGE_SIZE,
            n => match usize::try_from(n) {
                Ok(n) if n <= MAX_PAGE_SIZE => n,
                _ => {
                    violations.push(FieldViolation::new("page_size", format!("must be 1 to {MAX_PAGE_SIZE}")));
                    DEFAULT_PAGE_SIZE
                }
            },
        };
        check(violations)?;
        let topic = self.topics.get(&r.topic).await.map_err(topic_status)?;
        let read = AllRead { after: r.from_offset.saturating_sub(1), max_count: page_size, filter: Default::default() };
        let slice = topic.log.read_all(read).await.map_err(from_store)?;
        Ok(Response::new(pb::ReadEventsResponse {
            events: slice.events.iter().map(event_to_proto).collect(),
            next_offset: slice.next_position.saturating_add(1),
            end_of_topic: slice.end_of_log,
        }))
    }

    type SubscribeStream = SubscribeStream;

    async fn subscribe(
        &self,
        request: Request<pb::SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let r = request.into_inner();
        let mut violations = Vec::new();
        check_name("topic", &r.topic, &mut violations);
        check_bigint("from", r.from_offset, &mut violations);
        check(violations)?;
        let topic = self.topics.get(&r.topic).await.map_err(topic_status)?;
        let target = Target::All { after: Some(r.from_offset.saturating_sub(1)), filter: Default::default() };
        let messages = ReceiverStream::new(topic.subscriptions.subscribe(target, u64::MAX)).filter_map(|item| async {
            match item {
                Ok(SubscriptionMessage::Event(e)) => Some(Ok(pb::SubscribeResponse {
                    message: Some(pb::subscribe_response::Message::Event(event_to_proto(&e))),
                })),
                Ok(SubscriptionMessage::CaughtUp(_)) => {
                    Some(Ok(pb::SubscribeResponse { message: Some(pb::subscribe_response::Message::CaughtUp(true)) }))
                }
                // A subscriber that fell behind catches up by itself,
                // losing and repeating nothing: nothing to tell.
                Ok(SubscriptionMessage::Checkpoint(_) | SubscriptionMessage::FellBehind(_)) => None,
                Err(e) => Some(Err(from_store(e))),
            }
        });
        let stop = self.token.clone();
        let closed = topic.closed.clone();
        let stream = messages.take_until(async move {
            tokio::select! {
                () = stop.cancelled() => {}
                () = closed.cancelled() => {}
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn register_callback(
        &self,
        request: Request<pb::RegisterCallbackRequest>,
    ) -> Result<Response<pb::RegisterCallbackResponse>, Status> {
        let r = request.into_inner();
        let mut violations = Vec::new();
        check_name("topic", &r.topic, &mut violations);
        if r.callback.is_none() {
            violations.push(FieldViolation::new("callback", "is required"));
        }
        let callback = r.callback.unwrap_or_default();
        let drop_after = match callback.drop_after {
            None => None,
            Some(d) => match Duration::try_from(d) {
                Ok(d) => Some(d),
                Err(_) => {
                    violations.push(FieldViolation::new("callback.drop_after", "must not be negative"));
                    None
                }
            },
        };
        let checked = callbacks::check(&callback.url, callback.max_batch, drop_after, r.from_offset);
        let checked = match checked {
            Ok(checked) => Some(checked),
            Err(found) => {
                violations.extend(found);
                None
            }
        };
        check(violations)?;
        let Some(checked) = checked else { return Err(Status::internal("unchecked callback")) };
        let topic = self.topics.get(&r.topic).await.map_err(topic_status)?;
        let view = self.callbacks.register(topic, checked).ok_or_else(|| {
            error_info(
                Code::ResourceExhausted,
                format!("at most {} callbacks per topic", callbacks::MAX_PER_TOPIC),
                "TOO_MANY_CALLBACKS",
                &[],
            )
        })?;
        Ok(Response::new(pb::RegisterCallbackResponse { callback: Some(callback_to_proto(view)) }))
    }

    async fn list_callbacks(
        &self,
        request: Request<pb::ListCallbacksRequest>,
    ) -> Result<Response<pb::ListCallbacksResponse>, Status> {
        let name = request.into_inner().topic;
        topic_name(&name)?;
        self.topics.get(&name).await.map_err(topic_status)?;
        let callbacks = self.callbacks.list(&name).into_iter().map(callback_to_proto).collect();
        Ok(Response::new(pb::ListCallbacksResponse { callbacks }))
    }

    async fn delete_callback(
        &self,
        request: Request<pb::DeleteCallbackRequest>,
    ) -> Result<Response<pb::DeleteCallbackResponse>, Status> {
        let r = request.into_inner();
        let mut violations = Vec::new();
        check_name("topic", &r.topic, &mut violations);
        eventfold_store::check_id("callback_id", &r.callback_id, &mut violations);
        check(violations)?;
        if self.callbacks.delete(&r.topic, &r.callback_id) {
            Ok(Response::new(pb::DeleteCallbackResponse {}))
        } else {
            Err(error_info(
                Code::NotFound,
                format!("topic {} has no callback {}", r.topic, r.callback_id),
                "CALLBACK_NOT_FOUND",
                &[],
            ))
        }
    }

    async fn get_health(
        &self,
        _request: Request<pb::GetHealthRequest>,
    ) -> Result<Response<pb::GetHealthResponse>, Status> {
        let mut topics = Vec::new();
        for (spec, open) in self.topics.list().await.map_err(topic_status)? {
            let serving = match open {
                Some(topic) => {
                    matches!(tokio::time::timeout(Duration::from_secs(2), topic.log.check_health()).await, Ok(Ok(())))
                }
                None => false,
            };
            topics.push(pb::TopicHealth { topic: spec.name, serving });
        }
        let status = if topics.iter().all(|t| t.serving) { "SERVING" } else { "NOT_SERVING" };
        Ok(Response::new(pb::GetHealthResponse { status: status.to_owned(), topics }))
    }
}
