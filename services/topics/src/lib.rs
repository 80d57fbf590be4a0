//! Topics: event logs created at run time, each stored where its
//! configuration says (memory, a directory, a PostgreSQL schema and table,
//! an Azure Blob Storage container), with their catalog (so that they are
//! reopened on restart), the `TopicService`, and callbacks (webhooks) that
//! POST a topic's events to a URL.

// Request values reach this crate: arithmetic is checked or saturating,
// casts that may wrap are refused, and nothing panics on `unwrap`/`expect`
// (tests may).
#![cfg_attr(
    not(test),
    warn(clippy::arithmetic_side_effects, clippy::cast_possible_wrap, clippy::unwrap_used, clippy::expect_used)
)]

pub mod callbacks;
pub mod catalog;
pub mod grpc;
pub mod spec;
pub mod topics;

use std::{path::PathBuf, sync::Arc};

use eventfold_platform::{runtime::CancellationToken, server::GrpcServer};
use eventfold_proto::topics::topic_service_server::TopicServiceServer;
use serde::{Deserialize, Serialize};

pub use crate::{
    callbacks::Callbacks,
    catalog::{Catalog, FileCatalog, MemoryCatalog, PgCatalog},
    grpc::TopicsGrpc,
    topics::{Topic, TopicError, Topics},
};

pub const SERVICE_NAME: &str = "eventfold.topics.v1.TopicService";

/// `[topics]`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct TopicsConfig {
    /// Where `fs` topics may live (relative: from the working directory).
    /// `eventfold dev` uses `<data_dir>/topics` unless this is set.
    pub fs_root: Option<PathBuf>,
    /// Most topics.
    pub max_topics: usize,
}

impl Default for TopicsConfig {
    fn default() -> Self {
        Self { fs_root: None, max_topics: 1000 }
    }
}

/// The default `fs_root` of a process that is not `eventfold dev`.
pub const DEFAULT_FS_ROOT: &str = "/var/lib/eventfold/topics";

/// Hosts the TopicService over `topics` on `server`; its streams and
/// callbacks end when `token` is cancelled.
pub fn host(server: &mut GrpcServer, topics: Arc<Topics>, token: CancellationToken) {
    let callbacks = Callbacks::new();
    let stop = callbacks.clone();
    let watch = token.clone();
    tokio::spawn(async move {
        watch.cancelled().await;
        stop.stop_all();
    });
    let service = TopicsGrpc::new(topics, callbacks, token);
    server.add_service(eventfold_proto::FILE_DESCRIPTOR_SET, TopicServiceServer::new(service));
}
