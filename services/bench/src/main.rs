//! `eventfold-bench`: every figure of docs/benchmarks.md, each measured
//! beside raw PostgreSQL (or the raw broker) doing the same work in the same
//! run, and printed as a ratio that survives a noisy machine.

mod append;
mod auth;
mod commands;
mod gateway;
mod metrics;
mod pacing;
mod queries;
mod rebuild;
mod relay;
mod stages;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "eventfold-bench", version, about = "Measure eventfold against raw PostgreSQL doing the same work")]
struct Cli {
    #[command(subcommand)]
    bench: Bench,
}

#[derive(Debug, Subcommand)]
enum Bench {
    /// Append throughput and latency beside raw INSERTs.
    Append(append::AppendBenchArgs),
    /// CreateOrder over gRPC with authentication off, with a JWT and with
    /// a cached API key, open loop at one rate.
    Auth(auth::AuthBenchArgs),
    /// CreateOrder over gRPC at fixed arrival rates beside raw INSERTs.
    Commands(commands::CommandBenchArgs),
    /// CreateOrder and cached GetOrder over REST through the gateway
    /// beside the same over gRPC, open loop at one rate.
    Gateway(gateway::GatewayBenchArgs),
    /// CreateOrder over gRPC with the metrics layer on and off (and an A/A
    /// control), open loop at one rate.
    Metrics(metrics::MetricsBenchArgs),
    /// GetOrder over gRPC, cached and uncached, beside the raw SELECT.
    Queries(queries::QueryBenchArgs),
    /// Append → read-model-visible lag at a fixed rate, and rebuild speed.
    ProjectionLag(queries::LagBenchArgs),
    /// Every read model rebuilt from a generated log beside raw INSERT …
    /// SELECTs of the same rows.
    Rebuild(rebuild::RebuildBenchArgs),
    /// Relay throughput and append → Kafka → read model lag, beside the
    /// raw broker.
    Relay(relay::RelayBenchArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("eventfold-bench: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.bench {
            Bench::Append(args) => append::append(args).await,
            Bench::Auth(args) => auth::auth(args).await,
            Bench::Commands(args) => commands::commands(args).await,
            Bench::Gateway(args) => gateway::gateway(args).await,
            Bench::Metrics(args) => metrics::metrics(args).await,
            Bench::Queries(args) => queries::queries(args).await,
            Bench::ProjectionLag(args) => queries::lag(args).await,
            Bench::Rebuild(args) => rebuild::rebuild(args).await,
            Bench::Relay(args) => relay::relay(args).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("eventfold-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}
