//! `eventfold projections list|status|rebuild|…`: the operator's view of
//! the read side, printed; the work is `eventfold_projector::admin`'s.

use std::{io::Write as _, sync::Arc, time::Duration};

use anyhow::{Context, bail};
use eventfold_projector::{
    Projection, ProjectorOptions, Status,
    admin::{self, Progress},
};
use eventfold_store::{Database, EventLog};

use crate::cli::ProjectionsAction;

/// Every projection this binary runs: the saga intake too when the sagas
/// are enabled.
pub(crate) fn known(saga_enabled: bool) -> Vec<Arc<dyn Projection>> {
    let mut projections = eventfold_projector::all();
    if saga_enabled {
        projections.push(Arc::new(eventfold_saga::SagaIntake));
    }
    projections
}

fn find(known: &[Arc<dyn Projection>], name: &str) -> anyhow::Result<Arc<dyn Projection>> {
    known.iter().find(|p| p.name() == name).cloned().with_context(|| {
        let names: Vec<&str> = known.iter().map(|p| p.name()).collect();
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

/// Runs `action` on the projections kept in `database`, whose events are
/// those of `log`; `options` are the projectors' (a rebuild takes larger
/// batches).
pub(crate) async fn run(
    database: &Database,
    log: Arc<dyn EventLog>,
    saga_enabled: bool,
    options: ProjectorOptions,
    action: ProjectionsAction,
) -> anyhow::Result<()> {
    let known = known(saga_enabled);
    match action {
        ProjectionsAction::List => print(&admin::status(database).await?, log.last_position().await?),
        ProjectionsAction::Status { name } => {
            find(&known, &name)?;
            let statuses: Vec<Status> = admin::status(database).await?.into_iter().filter(|s| s.name == name).collect();
            if statuses.is_empty() {
                println!("{name}: not started yet (no checkpoint)");
            } else {
                print(&statuses, log.last_position().await?);
            }
        }
        ProjectionsAction::Rebuild { name } => {
            let projection = find(&known, &name)?;
            let mut last_print = None::<std::time::Instant>;
            let rebuilt = admin::rebuild(database, log, projection, options, |p| {
                if p.idle || last_print.is_none_or(|at| at.elapsed() >= Duration::from_millis(500)) {
                    last_print = Some(std::time::Instant::now());
                    progress(&name, p);
                }
            })
            .await?;
            eprintln!();
            let version = rebuilt.version;
            println!("{name}: version {version} built in {:.1}s and active", rebuilt.elapsed.as_secs_f64());
            if rebuilt.parked > 0 {
                bail!(
                    "{name} version {version} parked {} events: see `eventfold projections parked {name}`",
                    rebuilt.parked
                );
            }
        }
        ProjectionsAction::Stop { name } => {
            find(&known, &name)?;
            if !admin::set_stopped(database, &name, true).await? {
                bail!("{name} has no version yet: nothing to stop");
            }
            println!("{name}: stopped (its projectors apply nothing until `eventfold projections start {name}`)");
        }
        ProjectionsAction::Start { name } => {
            find(&known, &name)?;
            if !admin::set_stopped(database, &name, false).await? {
                bail!("{name} has no version yet: its projector creates one when it first runs");
            }
            println!("{name}: started");
        }
        ProjectionsAction::Reset { name } => {
            let projection = find(&known, &name)?;
            match admin::reset(database, projection.as_ref()).await? {
                Some(version) => println!("{name}: version {version} emptied; its projectors apply the log again"),
                None => bail!("{name} has no active version: nothing to reset"),
            }
        }
        ProjectionsAction::Parked { name } => {
            find(&known, &name)?;
            println!(
                "{:>7} {:>12} {:<28} {:<24} {:>8} {:<8} error",
                "version", "position", "stream", "type", "attempts", "replayed"
            );
            for p in admin::parked(database, &name).await? {
                println!(
                    "{:>7} {:>12} {:<28} {:<24} {:>8} {:<8} {}",
                    p.version,
                    p.position,
                    p.stream_id,
                    p.event_type,
                    p.attempts,
                    if p.replayed { "yes" } else { "" },
                    p.error
                );
            }
        }
        ProjectionsAction::Replay { name } => {
            let projection = find(&known, &name)?;
            let Some(replayed) = admin::replay(database, log, projection, ProjectorOptions::default()).await? else {
                bail!("{name} has no active version");
            };
            let (version, applied, left) = (replayed.version, replayed.applied, replayed.left);
            println!("{name} v{version}: {applied} parked events applied, {left} still parked");
            if left > 0 {
                bail!("{left} events of {name} still fail: see `eventfold projections parked {name}`");
            }
        }
    }
    Ok(())
}

/// `\r`-updated progress bar with rate and ETA, on stderr.
fn progress(name: &str, p: Progress) {
    const WIDTH: usize = 30;
    let Progress { version, position, head, elapsed, .. } = p;
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
