//! Shared setup of the event store's gRPC tests.

// Each test binary uses a different part of the harness.
#![allow(dead_code, unreachable_pub)]

use std::{net::SocketAddr, sync::Arc, time::Duration};

use eventfold_eventstore::Config;
use eventfold_platform::{runtime::CancellationToken, server::GrpcServer};
use eventfold_store::EventLog;
use tokio::{net::TcpListener, task::JoinHandle};
use tonic::transport::Channel;

/// The event store serving `log` as `config` says, on a loopback port: its
/// address, a connected channel to it, what stops it and its task.
pub async fn serve(
    log: Arc<dyn EventLog>,
    config: &Config,
) -> (SocketAddr, Channel, CancellationToken, JoinHandle<Result<(), eventfold_platform::Error>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let token = CancellationToken::new();
    let mut server = GrpcServer::new();
    eventfold_eventstore::host(&mut server, config, log, token.clone());
    let grace = Duration::from_secs(config.shutdown_grace_secs);
    let handle = tokio::spawn(server.serve(listener, token.clone(), grace));
    (addr, eventfold_tests::channel(addr).await, token, handle)
}
