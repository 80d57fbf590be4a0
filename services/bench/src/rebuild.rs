//! `eventfold-bench rebuild`: every read model rebuilt from position 0 of a
//! generated log holding every event type it reads, beside raw PostgreSQL
//! writing the same rows.
//!
//! - The log: orders (created, confirmed, paid, shipped, cancelled before
//!   and after payment), products with reservations released and consumed,
//!   accounts with deposits, withdrawals, transfers sent, received and
//!   refunded, users registering, logging in and acting; appended by the
//!   store as the command side would (one append per stream and chunk).
//! - eventfold: `eventfold projections rebuild` (`admin::rebuild`) builds
//!   a fresh version of the model and activates it (batches of 2,000
//!   events, the engine's own transactions and checkpoints). Rates count the events of the types the model reads
//!   (and, beside, every event of the log it went through).
//! - raw: one `INSERT … SELECT` per table of the same rows (the rebuilt
//!   ones) into ordinary logged tables made like the model's (`LIKE …
//!   INCLUDING ALL`: same primary keys and indexes), in one transaction
//!   committed without waiting for the WAL flush, as the projector's.
//! - ratio: raw's time ÷ eventfold's time for the same rows (eventfold's
//!   rate ÷ raw's rate over the same events).

use std::{collections::HashMap, sync::Arc, time::Instant};

use anyhow::Context;
use eventfold_domain::{
    Currency, DomainEvent, Money,
    account::{
        AccountEvent, AccountOpened, MoneyDeposited, MoneyWithdrawn, TransferReceived, TransferRefunded, TransferSent,
    },
    inventory::{
        InventoryConsumed, InventoryEvent, InventoryReleased, InventoryReserved, ProductRegistered, StockReplenished,
    },
    order::{OrderCancelled, OrderConfirmed, OrderCreated, OrderEvent, OrderItem, OrderShipped, PaymentProcessed},
    user::{UserActionRecorded, UserEvent, UserLoggedIn, UserRegistered},
};
use eventfold_projector::{Projection, ProjectorOptions};
use eventfold_store::{AppendRequest, EventLog, ExpectedVersion, NewEvent};
use futures_util::StreamExt;

use crate::{append::thousands, queries::ReadSide};

/// Arguments of `eventfold-bench rebuild`.
#[derive(Debug, clap::Args)]
pub(crate) struct RebuildBenchArgs {
    /// PostgreSQL URL of a throw-away database (migrated; the log gets the
    /// generated events, each model new versions).
    #[arg(long, env = "EVENTFOLD_DATABASE__URL")]
    database_url: String,
    /// Orders in the generated log (users, products, reservations and
    /// accounts scale with it).
    #[arg(long, default_value_t = 20_000)]
    orders: usize,
    /// Rebuilds of each model (each a new version).
    #[arg(long, default_value_t = 3)]
    runs: usize,
}

/// The targets of issue 21, in events/s of the types the model reads.
fn target(model: &str) -> f64 {
    if model == "order_views" { 150_000.0 } else { 50_000.0 }
}

fn event<E: DomainEvent>(e: E) -> NewEvent {
    let mut new = NewEvent::new(e.event_type(), e.to_data());
    new.schema_version = e.schema_version();
    new
}

/// The generated log, as appends: (stream, events), in order per stream.
fn workload(run: &str, orders: usize) -> anyhow::Result<Vec<(String, Vec<NewEvent>)>> {
    let eur: Currency = "EUR".parse().map_err(anyhow::Error::msg)?;
    let usd: Currency = "USD".parse().map_err(anyhow::Error::msg)?;
    let mut appends = Vec::new();
    let products = 50;
    let mut stock: Vec<Vec<NewEvent>> = (0..products)
        .map(|p| {
            let product_id = format!("p-{run}-{p}");
            vec![
                event(InventoryEvent::Registered(ProductRegistered {
                    product_id: product_id.clone(),
                    name: format!("Product {p}"),
                })),
                event(InventoryEvent::Replenished(StockReplenished { product_id, quantity: 10_000_000 })),
            ]
        })
        .collect();
    for o in 0..orders {
        let order_id = format!("{run}-{o}");
        let currency = if o % 5 == 4 { usd } else { eur };
        let items: Vec<OrderItem> = (0..1 + o % 3)
            .map(|line| OrderItem {
                product_id: format!("p-{run}-{}", (o + line * 7) % products),
                quantity: 1 + ((o + line) % 4) as u32,
                unit_price: Money::new(100 + (o as i64 * 13 + line as i64 * 7) % 900, currency),
            })
            .collect();
        let total = Money::new(items.iter().map(|i| i.unit_price.minor * i64::from(i.quantity)).sum(), currency);
        let mut events = vec![event(OrderEvent::Created(OrderCreated {
            order_id: order_id.clone(),
            customer_id: format!("u-{run}-{}", o % (orders / 10).max(1)),
            currency,
            items: items.clone(),
            total,
            payment_token: None,
            carrier: None,
        }))];
        let cancel = || {
            event(OrderEvent::Cancelled(OrderCancelled { order_id: order_id.clone(), reason: "changed mind".into() }))
        };
        let confirm = || event(OrderEvent::Confirmed(OrderConfirmed { order_id: order_id.clone() }));
        let pay = || {
            event(OrderEvent::PaymentProcessed(PaymentProcessed {
                order_id: order_id.clone(),
                payment_id: format!("pay-{order_id}"),
                amount: total,
            }))
        };
        match o % 6 {
            0 => {}
            1 => events.push(confirm()),
            2 => events.extend([confirm(), pay()]),
            3 => events.extend([
                confirm(),
                pay(),
                event(OrderEvent::Shipped(OrderShipped {
                    order_id: order_id.clone(),
                    carrier: "DHL".into(),
                    tracking_number: format!("T-{o}"),
                })),
            ]),
            4 => events.push(cancel()),
            _ => events.extend([confirm(), pay(), cancel()]),
        }
        appends.push((format!("order-{order_id}"), events));
        // Its first line's stock: reserved, then released or consumed.
        let line = &items[0];
        let p = o % products;
        let product_id = line.product_id.clone();
        stock[p].push(event(InventoryEvent::Reserved(InventoryReserved {
            product_id: product_id.clone(),
            order_id: order_id.clone(),
            quantity: line.quantity,
        })));
        if o % 3 != 2 {
            stock[p].push(if o % 3 == 0 {
                event(InventoryEvent::Released(InventoryReleased {
                    product_id,
                    order_id,
                    quantity: line.quantity,
                    reason: "cancelled".into(),
                }))
            } else {
                event(InventoryEvent::Consumed(InventoryConsumed { product_id, order_id, quantity: line.quantity }))
            });
        }
    }
    for (p, events) in stock.into_iter().enumerate() {
        for events in events.chunks(200) {
            appends.push((format!("inventory-p-{run}-{p}"), events.to_vec()));
        }
    }
    for u in 0..(orders / 10).max(1) {
        let user_id = format!("u-{run}-{u}");
        let mut events = vec![event(UserEvent::Registered(UserRegistered {
            user_id: user_id.clone(),
            email: format!("{user_id}@example.com").into(),
            display_name: format!("User {u}"),
        }))];
        for n in 0..3 {
            events.push(event(UserEvent::LoggedIn(UserLoggedIn {
                user_id: user_id.clone(),
                source: format!("10.0.0.{n}"),
            })));
            events.push(event(UserEvent::ActionRecorded(UserActionRecorded {
                user_id: user_id.clone(),
                action: "viewed_product".into(),
                subject: format!("p-{run}-{}", (u + n) % products),
            })));
        }
        appends.push((format!("user-{user_id}"), events));
    }
    let accounts = (orders / 20).max(2);
    let mut balances: Vec<i64> = vec![0; accounts];
    let mut ledgers: Vec<Vec<NewEvent>> = Vec::with_capacity(accounts);
    for (a, balance) in balances.iter_mut().enumerate() {
        let account_id = format!("{run}-{a}");
        *balance = 1_000_000;
        ledgers.push(vec![
            event(AccountEvent::Opened(AccountOpened {
                account_id: account_id.clone(),
                owner_id: format!("u-{run}-{a}"),
                currency: eur,
            })),
            event(AccountEvent::Deposited(MoneyDeposited {
                account_id,
                transaction_id: format!("d-{a}"),
                amount: Money::new(1_000_000, eur),
                balance: Money::new(1_000_000, eur),
            })),
        ]);
    }
    for t in 0..accounts * 20 {
        let (from, to) = (t % accounts, (t * 7 + 1) % accounts);
        let amount = Money::new(1 + (t as i64 * 37) % 900, eur);
        let from_id = format!("{run}-{from}");
        balances[from] -= amount.minor;
        if t % 4 == 0 || from == to {
            ledgers[from].push(event(AccountEvent::Withdrawn(MoneyWithdrawn {
                account_id: from_id,
                transaction_id: format!("w-{t}"),
                amount,
                balance: Money::new(balances[from], eur),
            })));
            continue;
        }
        let transfer_id = format!("t-{t}");
        ledgers[from].push(event(AccountEvent::TransferSent(TransferSent {
            account_id: from_id.clone(),
            transfer_id: transfer_id.clone(),
            to_account_id: format!("{run}-{to}"),
            amount,
            balance: Money::new(balances[from], eur),
        })));
        if t % 9 == 5 {
            balances[from] += amount.minor;
            ledgers[from].push(event(AccountEvent::TransferRefunded(TransferRefunded {
                account_id: from_id,
                transfer_id,
                amount,
                reason: "refused".into(),
                balance: Money::new(balances[from], eur),
            })));
        } else {
            balances[to] += amount.minor;
            ledgers[to].push(event(AccountEvent::TransferReceived(TransferReceived {
                account_id: format!("{run}-{to}"),
                transfer_id,
                from_account_id: from_id,
                amount,
                balance: Money::new(balances[to], eur),
            })));
        }
    }
    for (a, events) in ledgers.into_iter().enumerate() {
        for events in events.chunks(200) {
            appends.push((format!("account-{run}-{a}"), events.to_vec()));
        }
    }
    Ok(appends)
}

/// Appends `appends`, streams 8 at a time (a stream's chunks in order).
async fn write(log: &Arc<dyn EventLog>, appends: Vec<(String, Vec<NewEvent>)>) -> anyhow::Result<usize> {
    let mut by_stream: Vec<(String, Vec<Vec<NewEvent>>)> = Vec::new();
    let mut index: HashMap<String, usize> = HashMap::new();
    let mut total = 0;
    for (stream, events) in appends {
        total += events.len();
        let i = *index.entry(stream.clone()).or_insert_with(|| {
            by_stream.push((stream, Vec::new()));
            by_stream.len() - 1
        });
        by_stream[i].1.push(events);
    }
    let mut pending = futures_util::stream::iter(by_stream)
        .map(|(stream, chunks)| {
            let log = log.clone();
            async move {
                for events in chunks {
                    log.append(AppendRequest::new(stream.clone(), ExpectedVersion::Any, events))
                        .await
                        .with_context(|| format!("appending to {stream}"))?;
                }
                anyhow::Ok(())
            }
        })
        .buffer_unordered(8);
    while let Some(done) = pending.next().await {
        done?;
    }
    Ok(total)
}

pub(crate) async fn rebuild(args: RebuildBenchArgs) -> anyhow::Result<()> {
    let side = ReadSide::open(&args.database_url).await?;
    let run = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
    let started = Instant::now();
    let appended = write(&side.log, workload(&run, args.orders)?).await?;
    eprintln!("appended {appended} events in {:.1}s", started.elapsed().as_secs_f64());
    let head = side.log.last_position().await? as i64;
    let log_events: i64 = side
        .admin
        .query_one("SELECT count(*) FROM eventstore.events WHERE global_position <= $1", &[&head])
        .await?
        .get(0);
    let types: HashMap<String, i64> = side
        .admin
        .query("SELECT event_type, count(*) FROM eventstore.events WHERE global_position <= $1 GROUP BY 1", &[&head])
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();

    // Reading the log alone, as the projector reads it: the ceiling.
    let (read_events, read_secs) = read_alone(&side.log, eventfold_store::EventFilter::default()).await?;
    let read_rate = read_events as f64 / read_secs;

    println!("{}", side.machine);
    println!();
    println!(
        "Rebuild from position 0 of a generated log of {log_events} events ({} orders; every event type the models \
         read), as `eventfold projections rebuild` runs it (batches of 2,000 events); reading the log alone \
         (read_all, 2,000 per call): {} events/s.",
        args.orders,
        thousands(read_rate)
    );
    println!();
    println!(
        "| run | model | events it reads | eventfold s | events/s | log events/s | its events read alone, events/s | \
         raw INSERT … SELECT s | ratio | target |"
    );
    println!("|---:|---|---:|---:|---:|---:|---:|---:|---:|---|");
    for r in 1..=args.runs {
        for projection in eventfold_projector::all() {
            let name = projection.name();
            // The events of the types it reads (its filter's), whatever the
            // stream; its filtered read below must find exactly these.
            let handled: i64 =
                projection.event_filter().event_types.iter().map(|t| types.get(t).copied().unwrap_or(0)).sum();
            let (read, read_secs) = read_alone(&side.log, projection.event_filter()).await?;
            anyhow::ensure!(read as i64 == handled, "{name}: its filter read {read} events, it reads {handled}");
            let (secs, raw_secs) = rebuild_one(&side, projection).await?;
            let rate = handled as f64 / secs;
            let goal = target(name);
            println!(
                "| {r} | {name} | {handled} | {secs:.2} | {} | {} | {} | {raw_secs:.3} | {:.2}x | ≥ {} events/s: {} |",
                thousands(rate),
                thousands(log_events as f64 / secs),
                thousands(read as f64 / read_secs),
                raw_secs / secs,
                thousands(goal),
                if rate >= goal { "met" } else { "**missed**" }
            );
        }
    }
    Ok(())
}

/// Reads the whole log with `filter` as a projector does (2,000 events per
/// call): the events read and the seconds it took.
async fn read_alone(log: &Arc<dyn EventLog>, filter: eventfold_store::EventFilter) -> anyhow::Result<(usize, f64)> {
    let started = Instant::now();
    let (mut after, mut read_events) = (0, 0usize);
    loop {
        let read = eventfold_store::AllRead { after, max_count: 2000, filter: filter.clone() };
        let slice = log.read_all(read).await?;
        read_events += slice.events.len();
        if slice.end_of_log || slice.next_position <= after {
            break;
        }
        after = slice.next_position;
    }
    Ok((read_events, started.elapsed().as_secs_f64()))
}

/// Rebuilds `projection` as `eventfold projections rebuild` does (a new
/// version, built and activated); its seconds, and raw's for the same rows.
async fn rebuild_one(side: &ReadSide, projection: Arc<dyn Projection>) -> anyhow::Result<(f64, f64)> {
    let name = projection.name();
    let rebuilt = eventfold_projector::admin::rebuild(
        &side.workers,
        side.log.clone(),
        projection.clone(),
        ProjectorOptions::default(),
        |_| {},
    )
    .await?;
    let (version, secs) = (rebuilt.version, rebuilt.elapsed.as_secs_f64());
    anyhow::ensure!(
        rebuilt.parked == 0,
        "{name} v{version} parked {} events: the workload is inconsistent",
        rebuilt.parked
    );

    // raw: the same rows, one INSERT … SELECT per table, one transaction.
    let tables = projection.tables(version);
    let mut ddl = String::new();
    for (i, table) in tables.iter().enumerate() {
        ddl.push_str(&format!(
            "DROP TABLE IF EXISTS public.bench_rebuild_raw_{i}; \
             CREATE TABLE public.bench_rebuild_raw_{i} (LIKE {table} INCLUDING ALL);"
        ));
    }
    side.admin.batch_execute(&ddl).await?;
    let mut copy = String::from("BEGIN; SET LOCAL synchronous_commit = off;");
    for (i, table) in tables.iter().enumerate() {
        // A generated column (inventory's low_stock) is computed again, as the model's is.
        let columns: Vec<String> = side
            .admin
            .query(
                "SELECT attname FROM pg_attribute WHERE attrelid = $1::text::regclass AND attnum > 0 \
                   AND NOT attisdropped AND attgenerated = '' ORDER BY attnum",
                &[&table],
            )
            .await?
            .iter()
            .map(|r| r.get::<_, String>(0))
            .collect();
        let columns = columns.join(", ");
        copy.push_str(&format!("INSERT INTO public.bench_rebuild_raw_{i} ({columns}) SELECT {columns} FROM {table};"));
    }
    copy.push_str("COMMIT;");
    // The catalog lookups above are not timed: only the copy.
    let started_copy = Instant::now();
    side.admin.batch_execute(&copy).await?;
    let raw_secs = started_copy.elapsed().as_secs_f64();
    let mut drop = String::new();
    for i in 0..tables.len() {
        drop.push_str(&format!("DROP TABLE public.bench_rebuild_raw_{i};"));
    }
    side.admin.batch_execute(&drop).await?;
    Ok((secs, raw_secs))
}
