//! Run: `cargo run --release --example orders [-- --orders 10000 --url memory:// --topic orders]`
//!
//! The classic order pipeline. An order service publishes `OrderCreated` events (JSON,
//! key = customer id, a per-customer sequence number in the payload) to one topic;
//! payment, email and inventory consume it as three groups (publish-subscribe), and
//! inventory runs three competing members. Every group runs behind the middleware stack
//! dead letter → idempotency → retry. Faults on demand:
//!
//! - `--fail-rate F`: payment fails transiently with probability F per run (retried);
//! - `--poison K`: K orders whose payment always fails (they end in `<topic>.dlq`);
//! - `--duplicates D`: D orders published twice with the same id (skipped by idempotency).
//!
//! Every handler checks what it sees; the last line is the summary, and the exit status
//! is 0 only when no order is missing (handled, or dead-lettered as a poison order), no
//! customer's events were seen out of order, no handler ran twice for one order, and the
//! dead-letter topic holds exactly the poison orders.

use std::collections::HashMap;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use switchyard::middleware::{
    DeadLetterAdmin, DeadLetterLayer, IdempotencyLayer, MemoryStore, RetryLayer, RetryPolicy,
};
use switchyard::{App, CancellationToken, Consumer, HandlerError, Json, Message, SubscribeOptions};
use tower::ServiceBuilder;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct OrderCreated {
    /// Which run published it, so leftovers of an earlier run on a durable broker are ignored.
    run: String,
    order_id: u64,
    customer: String,
    /// 0, 1, 2, … per customer, in publish order.
    customer_seq: u64,
    amount_cents: u64,
}

struct Args {
    orders: u64,
    url: String,
    topic: String,
    customers: u64,
    timeout: Duration,
    fail_rate: f64,
    poison: u64,
    duplicates: u64,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        orders: 10_000,
        url: "memory://".into(),
        topic: "orders".into(),
        customers: 100,
        timeout: Duration::from_secs(300),
        fail_rate: 0.0,
        poison: 0,
        duplicates: 0,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = |name: &str| it.next().ok_or(format!("{name} needs a value"));
        match flag.as_str() {
            "--orders" => args.orders = value("--orders")?.parse().map_err(|e| format!("--orders: {e}"))?,
            "--url" => args.url = value("--url")?,
            "--topic" => args.topic = value("--topic")?,
            "--customers" => {
                args.customers = value("--customers")?.parse().map_err(|e| format!("--customers: {e}"))?;
                if args.customers == 0 {
                    return Err("--customers must be at least 1".into());
                }
            }
            "--timeout-secs" => {
                args.timeout = Duration::from_secs(
                    value("--timeout-secs")?.parse().map_err(|e| format!("--timeout-secs: {e}"))?,
                )
            }
            "--fail-rate" => {
                args.fail_rate = value("--fail-rate")?.parse().map_err(|e| format!("--fail-rate: {e}"))?;
                if !(0.0..0.9).contains(&args.fail_rate) {
                    return Err("--fail-rate must be in [0, 0.9)".into());
                }
            }
            "--poison" => args.poison = value("--poison")?.parse().map_err(|e| format!("--poison: {e}"))?,
            "--duplicates" => {
                args.duplicates = value("--duplicates")?.parse().map_err(|e| format!("--duplicates: {e}"))?
            }
            "-h" | "--help" => {
                return Err("usage: orders [--orders N] [--url URL] [--topic NAME] [--customers N] [--timeout-secs S] [--fail-rate F] [--poison K] [--duplicates D]".into())
            }
            other => return Err(format!("unknown flag {other}; try --help")),
        }
    }
    if args.poison > args.orders || args.duplicates > args.orders {
        return Err("--poison and --duplicates cannot exceed --orders".into());
    }
    Ok(args)
}

/// Which orders are poison: K orders spread evenly over the run.
fn is_poison(order_id: u64, args: &Args) -> bool {
    let every = (args.orders / args.poison.max(1)).max(1);
    args.poison > 0 && order_id.is_multiple_of(every) && order_id / every < args.poison
}

/// A stable pseudo-random draw in [0, 1) per (order, run).
fn draw(order_id: u64, run: u32) -> f64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (order_id, run).hash(&mut h);
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

/// What one group saw.
#[derive(Default)]
struct Seen {
    /// Successful handler runs per order.
    handled: HashMap<u64, u32>,
    /// Handler runs per order, failed ones included.
    runs: HashMap<u64, u32>,
    /// The highest sequence number each customer reached.
    last_seq: HashMap<String, u64>,
    violations: u64,
}

impl Seen {
    /// Called at the start of every handler run; returns this order's run number.
    fn start(&mut self, order: &OrderCreated) -> u32 {
        let already = self.handled.contains_key(&order.order_id);
        if !already {
            // In order means: the next sequence number, or the same one again (a retry).
            let next = self.last_seq.get(&order.customer).map_or(0, |s| s + 1);
            let last = next.saturating_sub(1);
            let retry = self.last_seq.contains_key(&order.customer) && order.customer_seq == last;
            if order.customer_seq != next && !retry {
                self.violations += 1;
                if self.violations <= 5 {
                    eprintln!(
                        "order violation: {} #{} arrived when #{next} was due (order {})",
                        order.customer, order.customer_seq, order.order_id
                    );
                }
            }
            let entry = self.last_seq.entry(order.customer.clone()).or_insert(0);
            *entry = (*entry).max(order.customer_seq);
        }
        let runs = self.runs.entry(order.order_id).or_default();
        *runs += 1;
        *runs
    }

    fn done(&mut self, order: &OrderCreated) {
        *self.handled.entry(order.order_id).or_default() += 1;
    }
}

type Tracker = Arc<Mutex<Seen>>;

/// A group's handler: ignore other runs' events, record ours, fail where told to.
fn handler(
    run: String,
    seen: Tracker,
    fail_rate: f64,
    poison: Arc<std::collections::HashSet<u64>>,
) -> impl Fn(Json<OrderCreated>) -> futures::future::Ready<Result<(), HandlerError>>
       + Clone
       + Send
       + Sync
       + 'static {
    move |Json(order): Json<OrderCreated>| {
        if order.run != run {
            return futures::future::ready(Ok(()));
        }
        let mut seen = seen.lock().unwrap();
        let attempt = seen.start(&order);
        if poison.contains(&order.order_id) {
            return futures::future::ready(Err(HandlerError::transient(std::io::Error::other(
                "card issuer unreachable (poison order)",
            ))));
        }
        if fail_rate > 0.0 && draw(order.order_id, attempt) < fail_rate {
            return futures::future::ready(Err(HandlerError::transient(std::io::Error::other(
                "payment gateway timeout",
            ))));
        }
        seen.done(&order);
        futures::future::ready(Ok(()))
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    match run(args).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("orders: {e}");
            ExitCode::from(2)
        }
    }
}

async fn run(args: Args) -> switchyard::Result<bool> {
    let broker = switchyard::connect(&args.url).await?;
    let run_id = switchyard::new_id();
    let groups = ["payment", "email", "inventory"];
    let trackers: Vec<Tracker> = groups.iter().map(|_| Tracker::default()).collect();
    let poison: Arc<std::collections::HashSet<u64>> = Arc::new(
        (0..args.orders)
            .filter(|id| is_poison(*id, &args))
            .collect(),
    );
    let dlq_topic = format!("{}.dlq", args.topic);
    // One reading group for every run (runs are told apart by the run id in each event),
    // so brokers that keep a queue per group do not collect one per run.
    let dead_letters = DeadLetterAdmin::new(broker.clone());
    // The reading group must exist before anything is dead-lettered (brokers without replay).
    dead_letters.prepare(&dlq_topic).await?;

    // Subscribe every group before publishing, so brokers without replay keep every event.
    let shutdown = CancellationToken::new();
    let mut app = App::new(broker.clone());
    for (group, seen) in groups.iter().zip(&trackers) {
        let options = SubscribeOptions::new(&args.topic, *group).prefetch(512);
        let members = if *group == "inventory" { 3 } else { 1 };
        // Only payment fails; every group is protected the same way.
        let (fail_rate, poison) = if *group == "payment" {
            (args.fail_rate, poison.clone())
        } else {
            (0.0, Arc::default())
        };
        let service = ServiceBuilder::new()
            .layer(DeadLetterLayer::new(broker.clone()).max_deliveries(3))
            .layer(IdempotencyLayer::new(Arc::new(MemoryStore::default())))
            .layer(RetryLayer::new(RetryPolicy::new(8)?.backoff(
                Duration::from_millis(1),
                Duration::from_millis(50),
            )?))
            .service(switchyard::handler_fn(handler(
                run_id.clone(),
                seen.clone(),
                fail_rate,
                poison,
            )));
        app = app.consumer(
            Consumer::new(options, service)
                .concurrency(64)
                .members(members),
        );
    }
    let running = app.start(shutdown.clone()).await?;

    // The order service.
    let started = Instant::now();
    let mut next_seq: HashMap<String, u64> = HashMap::new();
    let mut batch = Vec::with_capacity(500);
    for order_id in 0..args.orders {
        let customer = format!("customer-{}", order_id % args.customers);
        let seq = next_seq.entry(customer.clone()).or_default();
        let event = OrderCreated {
            run: run_id.clone(),
            order_id,
            customer: customer.clone(),
            customer_seq: *seq,
            amount_cents: 1_000 + order_id % 9_000,
        };
        *seq += 1;
        let message = Message::json(&event)?.with_key(customer);
        // A duplicate is the same message (same id) sent again, as a retrying producer would.
        if order_id < args.duplicates {
            batch.push(message.clone());
        }
        batch.push(message);
        if batch.len() >= 500 {
            broker
                .publish_batch(&args.topic, std::mem::take(&mut batch))
                .await?;
        }
    }
    if !batch.is_empty() {
        broker.publish_batch(&args.topic, batch).await?;
    }
    let published = started.elapsed();
    eprintln!(
        "published {} orders to {:?} in {published:.2?}",
        args.orders, args.topic
    );

    // Wait until every group handled every order it can (or give up and report what is missing).
    let expected = |i: usize| {
        if i == 0 {
            args.orders - poison.len() as u64
        } else {
            args.orders
        }
    };
    let complete_all = || {
        trackers
            .iter()
            .enumerate()
            .all(|(i, t)| t.lock().unwrap().handled.len() as u64 >= expected(i))
    };
    while !complete_all() && started.elapsed() < args.timeout {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let handled = started.elapsed();
    // Poison orders reach the DLQ after their last retry; give them the time that takes.
    let mut dead = dead_letters.list(&dlq_topic).await?;
    while (dead.len() as u64) < args.poison && started.elapsed() < args.timeout {
        tokio::time::sleep(Duration::from_millis(200)).await;
        dead = dead_letters.list(&dlq_topic).await?;
    }
    shutdown.cancel();
    let reports = running.join().await?;
    for r in &reports {
        eprintln!(
            "group {:<9} acked={} nacked={} panics={} abandoned={}",
            r.group, r.acked, r.nacked, r.panics, r.abandoned
        );
    }
    let rate = args.orders as f64 * 3.0 / handled.as_secs_f64();
    eprintln!("all groups done in {handled:.2?} ({rate:.0} handled events/s across 3 groups)");
    // Commit after processing, all the way: every group should be caught up now.
    let mut lag_ok = true;
    let mut lags = Vec::new();
    for group in groups {
        match broker.lag(&args.topic, group).await {
            Ok(n) => {
                lag_ok &= n == 0;
                lags.push(format!("{group}={n}"));
            }
            Err(switchyard::Error::Unsupported { .. }) => lags.push(format!("{group}=n/a")),
            Err(e) => return Err(e),
        }
    }
    eprintln!("lag after shutdown: {}", lags.join(" "));
    broker.close().await?;

    let dead_orders: std::collections::HashSet<u64> = dead
        .iter()
        .filter_map(|r| r.original().decode_json::<OrderCreated>().ok())
        .filter(|o| o.run == run_id)
        .map(|o| o.order_id)
        .collect();
    let seen: Vec<_> = trackers.iter().map(|t| t.lock().unwrap()).collect();
    let count = |s: &Seen| s.handled.len() as u64;
    // Handler successes beyond the first, per order and group.
    let duplicates: u64 = seen
        .iter()
        .flat_map(|s| s.handled.values())
        .map(|&n| u64::from(n) - 1)
        .sum();
    let violations: u64 = seen.iter().map(|s| s.violations).sum();
    if violations > 0 {
        let per_group: Vec<String> = groups
            .iter()
            .zip(&seen)
            .map(|(g, s)| format!("{g}={}", s.violations))
            .collect();
        eprintln!("order violations per group: {}", per_group.join(" "));
    }
    // Missing: some group neither handled it nor dead-lettered it.
    let missing = (0..args.orders)
        .filter(|id| seen.iter().any(|s| !s.handled.contains_key(id)) && !dead_orders.contains(id))
        .count();
    let dlq = dead_orders.len() as u64;
    println!(
        "summary orders={} payment={} email={} inventory={} duplicates={duplicates} order_violations={violations} missing={missing} dlq={dlq}",
        args.orders,
        count(&seen[0]),
        count(&seen[1]),
        count(&seen[2]),
    );
    Ok(missing == 0 && violations == 0 && duplicates == 0 && dlq == args.poison && lag_ok)
}
