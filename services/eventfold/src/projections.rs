//! `eventfold projections list|status|rebuild`: the operator's view of the
//! read side.

use std::{
    io::Write as _,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use eventfold_projector::{Projection, Projector, ProjectorOptions, Status};

use crate::{Config, ProjectionsAction, bench::connect, postgres};

/// Every projection this binary knows.
fn known() -> Vec<Arc<dyn Projection>> {
    eventfold_projector::all()
}

fn find(name: &str) -> anyhow::Result<Arc<dyn Projection>> {
    known().into_iter().find(|p| p.name() == name).with_context(|| {
        let names: Vec<&str> = known().iter().map(|p| p.name()).collect();
        format!("no projection {name:?}; known: {}", names.join(", "))
    })
}

fn print(statuses: &[Status], head: u64) {
    println!(
        "{:<24} {:>7} {:>6} {:>12} {:>12} {:>10} {:>7} state",
        "projection", "version", "active", "position", "applied", "behind", "parked"
    );
    for s in statuses {
        println!(
            "{:<24} {:>7} {:>6} {:>12} {:>12} {:>10} {:>7} {}",
            s.name,
            s.version,
            if s.active { "yes" } else { "" },
            s.position,
            s.events_applied,
            head.saturating_sub(s.position),
            s.parked,
            if s.stopped { "stopped" } else { "running" }
        );
    }
}

pub(crate) async fn run(config: &Config, action: ProjectionsAction) -> anyhow::Result<()> {
    let url = config.database.require_url()?.to_owned();
    let mut client = connect(&url).await?;
    let log = postgres(config).await?;
    let head = log.last_position().await?;
    match action {
        ProjectionsAction::List => print(&eventfold_projector::status(&client).await?, head),
        ProjectionsAction::Status { name } => {
            find(&name)?;
            let statuses: Vec<Status> =
                eventfold_projector::status(&client).await?.into_iter().filter(|s| s.name == name).collect();
            if statuses.is_empty() {
                println!("{name}: not started yet (no checkpoint)");
            } else {
                print(&statuses, head);
            }
        }
        ProjectionsAction::Rebuild { name } => {
            let projection = find(&name)?;
            let statuses = eventfold_projector::status(&client).await?;
            let next = statuses.iter().filter(|s| s.name == name).map(|s| s.version).max().unwrap_or(0) + 1;
            // Large batches: a rebuild is throughput work.
            let options =
                ProjectorOptions { batch_size: 2000, batch_time: Duration::from_secs(1), ..config.projector.options() };
            let projector = Projector::new(&url, log.clone(), projection, next, options).await?;
            projector.prepare().await?;
            let started = Instant::now();
            let mut last_print = Instant::now() - Duration::from_secs(1);
            loop {
                let considered = projector.step().await?;
                let position = projector.position().await?;
                let head = log.last_position().await?.max(position);
                if last_print.elapsed() >= Duration::from_millis(500) || considered == 0 {
                    last_print = Instant::now();
                    progress(&name, next, position, head, started.elapsed());
                }
                if considered == 0 && position >= head {
                    break;
                }
            }
            eprintln!();
            projector.activate().await?;
            let parked = eventfold_projector::status(&client)
                .await?
                .into_iter()
                .find(|s| s.name == name && s.version == next)
                .map_or(0, |s| s.parked);
            println!("{name}: version {next} built in {:.1}s and active", started.elapsed().as_secs_f64());
            if parked > 0 {
                bail!("{name} version {next} parked {parked} events: see `eventfold projections parked {name}`");
            }
        }
        ProjectionsAction::Stop { name } => {
            find(&name)?;
            if !eventfold_projector::set_stopped(&client, &name, true).await? {
                bail!("{name} has no version yet: nothing to stop");
            }
            println!("{name}: stopped (its projectors apply nothing until `eventfold projections start {name}`)");
        }
        ProjectionsAction::Start { name } => {
            find(&name)?;
            if !eventfold_projector::set_stopped(&client, &name, false).await? {
                bail!("{name} has no version yet: its projector creates one when it first runs");
            }
            println!("{name}: started");
        }
        ProjectionsAction::Reset { name } => {
            let projection = find(&name)?;
            match eventfold_projector::reset(&mut client, projection.as_ref()).await? {
                Some(version) => println!("{name}: version {version} emptied; its projectors apply the log again"),
                None => bail!("{name} has no active version: nothing to reset"),
            }
        }
        ProjectionsAction::Parked { name } => {
            find(&name)?;
            let rows = client
                .query(
                    "SELECT version, global_position, stream_id, event_type, attempts, error, \
                            replayed_at IS NOT NULL FROM projections.parked WHERE name = $1 \
                      ORDER BY version, global_position",
                    &[&name],
                )
                .await?;
            println!(
                "{:>7} {:>12} {:<28} {:<24} {:>8} {:<8} error",
                "version", "position", "stream", "type", "attempts", "replayed"
            );
            for r in &rows {
                println!(
                    "{:>7} {:>12} {:<28} {:<24} {:>8} {:<8} {}",
                    r.get::<_, i32>(0),
                    r.get::<_, i64>(1),
                    r.get::<_, String>(2),
                    r.get::<_, String>(3),
                    r.get::<_, i32>(4),
                    if r.get::<_, bool>(6) { "yes" } else { "" },
                    r.get::<_, String>(5)
                );
            }
        }
        ProjectionsAction::Replay { name } => {
            let projection = find(&name)?;
            let Some(active) =
                eventfold_projector::status(&client).await?.into_iter().find(|s| s.name == name && s.active)
            else {
                bail!("{name} has no active version");
            };
            let projector =
                Projector::new(&url, log.clone(), projection, active.version, ProjectorOptions::default()).await?;
            let applied = projector.replay_parked().await?;
            let left = eventfold_projector::status(&client)
                .await?
                .into_iter()
                .find(|s| s.name == name && s.version == active.version)
                .map_or(0, |s| s.parked);
            println!("{name} v{}: {applied} parked events applied, {left} still parked", active.version);
            if left > 0 {
                bail!("{left} events of {name} still fail: see `eventfold projections parked {name}`");
            }
        }
    }
    Ok(())
}

/// `\r`-updated progress bar with rate and ETA, on stderr.
fn progress(name: &str, version: u32, position: u64, head: u64, elapsed: Duration) {
    const WIDTH: usize = 30;
    let done = if head == 0 { 1.0 } else { position as f64 / head as f64 };
    let filled = ((done * WIDTH as f64) as usize).min(WIDTH);
    let rate = position as f64 / elapsed.as_secs_f64().max(0.001);
    let eta = if rate > 0.0 { head.saturating_sub(position) as f64 / rate } else { f64::NAN };
    eprint!(
        "\r{name} v{version} [{}{}] {position}/{head} events, {rate:.0}/s, ETA {eta:.0}s   ",
        "#".repeat(filled),
        "-".repeat(WIDTH - filled)
    );
    let _ = std::io::stderr().flush();
}
